//! Proofs about a candidate release, not samples: Cedar's symbolic compiler
//! (`cedar-policy-symcc`) turns the rules into SMT and the cvc5 solver checks, for every
//! request environment the schema allows (principal type × action × resource type):
//!
//! - **no escalation**: every request the candidate's issuance rules allow, the current
//!   release's allow too (and the same for the break-glass rules); otherwise a concrete
//!   counterexample request and the candidate rule that grants it;
//! - **critical stays closed**: no break-glass rule permits a request that the release's
//!   `assurance/critical.cedar` marks critical (its permits describe such requests);
//! - **no rule can error** on any request the schema allows.
//!
//! Results hold for every schema-valid request; the solver knows nothing of inventory.toml,
//! so a counterexample may use attribute values no inventory entry has — it is still a
//! request the rules would allow. Each counterexample is replayed through Cedar's own
//! authorizer before it is reported; one that does not reproduce is reported as
//! inconclusive, never as a pass. `@max_ttl` is compared outside the solver.

use std::collections::BTreeMap;

use cedar_policy::{Authorizer, Decision, Effect, PolicySet, RequestEnv, Schema};
use cedar_policy_symcc::solver::LocalSolver;
use cedar_policy_symcc::{CedarSymCompiler, CompiledPolicy, CompiledPolicySet, Env};
use serde::Serialize;

use super::Engine;

/// The environment variable naming the cvc5 binary (else `cvc5` on PATH).
pub const SOLVER_ENV: &str = "CVC5";
pub const INSTALL_HINT: &str =
    "install the cvc5 SMT solver (Debian/Ubuntu: `apt-get install cvc5`), or point CVC5=/path/to/cvc5 at one";

#[derive(Debug, thiserror::Error)]
pub enum ProveError {
    #[error("the cvc5 solver is not available ({0}); {INSTALL_HINT}")]
    SolverMissing(String),
    #[error("the proof could not be carried out: {0}")]
    Failed(String),
}

/// Something the candidate does that it must not.
#[derive(Clone, Debug, Serialize)]
pub struct Finding {
    /// `escalation`, `break_glass_escalation`, `critical`, `can_error`, `longer_max_ttl`.
    pub check: &'static str,
    /// The request environment, e.g. `Mayfly::Workload / issue_aws / Mayfly::AwsRole`.
    pub env: String,
    /// The candidate rules that grant the counterexample (or the rule that can error).
    pub rules: Vec<String>,
    /// The concrete request (and entities) the solver found, as Cedar prints it.
    pub counterexample: String,
}

#[derive(Debug, Default, Serialize)]
pub struct ProofReport {
    pub current: String,
    pub candidate: String,
    pub environments: usize,
    pub queries: usize,
    pub findings: Vec<Finding>,
    /// Counterexamples the authorizer did not reproduce, and solver answers of `unknown`.
    pub inconclusive: Vec<String>,
    /// Whether `assurance/critical.cedar` was present (the critical check ran).
    pub critical_checked: bool,
}

impl ProofReport {
    pub fn proven(&self) -> bool {
        self.findings.is_empty() && self.inconclusive.is_empty()
    }
}

fn env_name(env: &RequestEnv) -> String {
    format!("{} / {} / {}", env.principal(), env.action(), env.resource())
}

fn failed(e: impl std::fmt::Display) -> ProveError {
    ProveError::Failed(e.to_string())
}

/// The solver, started once for every query. `--tlimit-per` bounds each query (cvc5's
/// `--tlimit`, which symcc's default passes, would bound the whole process).
fn solver() -> Result<CedarSymCompiler<LocalSolver>, ProveError> {
    let solver =
        LocalSolver::cvc5_with_args(["--tlimit-per=60000"]).map_err(|e| ProveError::SolverMissing(e.to_string()))?;
    CedarSymCompiler::new(solver).map_err(failed)
}

/// `set` as one path of the daemon sees it: the break-glass set only ever decides requests
/// with `context.break_glass`, the normal set only requests without.
fn on_path(set: &PolicySet, break_glass: bool) -> Result<PolicySet, ProveError> {
    let condition = if break_glass { "!context.break_glass" } else { "context.break_glass" };
    let guard = cedar_policy::Policy::parse(
        Some(cedar_policy::PolicyId::new("mayfly-proof-path")),
        format!("forbid (principal, action, resource) when {{ {condition} }};"),
    )
    .map_err(failed)?;
    let mut set = set.clone();
    set.add(guard).map_err(failed)?;
    Ok(set)
}

/// The counterexample's request and the two entities it is about (the solver's store
/// also holds entities no rule looks at).
fn describe(cex: &Env) -> String {
    let full = cex.to_string();
    let head = full.split("entities:").next().unwrap_or(&full).trim_end();
    let about = [cex.request.principal(), cex.request.resource()];
    let entities: Vec<String> =
        cex.entities.iter().filter(|e| about.contains(&Some(&e.uid()))).map(|e| format!("{e}")).collect();
    format!("{head}\n{}", entities.join("\n"))
}

/// Which candidate rules allow the counterexample, if the authorizer agrees it is one:
/// `granting` allows it and `other` (when given) does not.
fn reproduce(cex: &Env, granting: &PolicySet, other: Option<&PolicySet>) -> Option<Vec<String>> {
    let authorizer = Authorizer::new();
    let allowed = authorizer.is_authorized(&cex.request, granting, &cex.entities);
    if allowed.decision() != Decision::Allow {
        return None;
    }
    if let Some(other) = other
        && authorizer.is_authorized(&cex.request, other, &cex.entities).decision() == Decision::Allow
    {
        return None;
    }
    let mut rules: Vec<String> = allowed.diagnostics().reason().map(ToString::to_string).collect();
    rules.sort();
    Some(rules)
}

/// Checks `candidate` against `current`; `critical` is the candidate tree's
/// `assurance/critical.cedar`, if it has one.
pub async fn prove(
    current: &Engine,
    candidate: &Engine,
    critical: Option<&PolicySet>,
) -> Result<ProofReport, ProveError> {
    let schema: &Schema = candidate.schema();
    let mut report = ProofReport {
        current: current.version().to_owned(),
        candidate: candidate.version().to_owned(),
        critical_checked: critical.is_some(),
        ..ProofReport::default()
    };
    // Outside the solver: a rule that exists in both with a higher ceiling now.
    for (id, before, after) in current.max_ttls_raised_in(candidate) {
        report.findings.push(Finding {
            check: "longer_max_ttl",
            env: "(annotations)".into(),
            rules: vec![id],
            counterexample: format!("@max_ttl raised from {before} to {after}"),
        });
    }
    // The daemon decides a request by one set or the other, by its break-glass flag: the
    // proofs compare like with like, so no counterexample is a request that cannot happen.
    let cand_normal = on_path(candidate.issuance_rules(), false)?;
    let cur_normal = on_path(current.issuance_rules(), false)?;
    let cand_emergency = on_path(candidate.break_glass_rules(), true)?;
    let cur_emergency = on_path(current.break_glass_rules(), true)?;
    for (id, what) in current.annotations_loosened_in(candidate) {
        report.findings.push(Finding {
            check: "annotation",
            env: "(annotations)".into(),
            rules: vec![id],
            counterexample: what,
        });
    }
    let mut cc = solver()?;
    let envs: Vec<RequestEnv> = schema.request_envs().collect();
    report.environments = envs.len();
    let mut inconclusive = Vec::new();
    for env in &envs {
        let name = env_name(env);
        let pairs =
            [("escalation", &cand_normal, &cur_normal), ("break_glass_escalation", &cand_emergency, &cur_emergency)];
        for (check, cand, cur) in pairs {
            let compiled_cand = CompiledPolicySet::compile(cand, env, schema).map_err(failed)?;
            let compiled_cur = CompiledPolicySet::compile(cur, env, schema).map_err(|e| {
                ProveError::Failed(format!(
                    "the current release does not compile under the candidate's schema ({name}): {e}"
                ))
            })?;
            report.queries += 1;
            match cc.check_implies_with_counterexample_opt(&compiled_cand, &compiled_cur).await {
                Ok(None) => {}
                Ok(Some(cex)) => match reproduce(&cex, cand, Some(cur)) {
                    Some(rules) => report.findings.push(Finding {
                        check,
                        env: name.clone(),
                        rules,
                        counterexample: describe(&cex),
                    }),
                    None => inconclusive
                        .push(format!("{check} ({name}): a counterexample the authorizer does not reproduce")),
                },
                Err(e) => inconclusive.push(format!("{check} ({name}): {e}")),
            }
        }
        if let Some(marker) = critical {
            let compiled_bg = CompiledPolicySet::compile(&cand_emergency, env, schema).map_err(failed)?;
            let compiled_marker = CompiledPolicySet::compile(marker, env, schema)
                .map_err(|e| ProveError::Failed(format!("assurance/critical.cedar ({name}): {e}")))?;
            report.queries += 1;
            match cc.check_disjoint_with_counterexample_opt(&compiled_bg, &compiled_marker).await {
                Ok(None) => {}
                Ok(Some(cex)) => match reproduce(&cex, &cand_emergency, None) {
                    Some(rules) => report.findings.push(Finding {
                        check: "critical",
                        env: name.clone(),
                        rules,
                        counterexample: describe(&cex),
                    }),
                    None => inconclusive
                        .push(format!("critical ({name}): a counterexample the authorizer does not reproduce")),
                },
                Err(e) => inconclusive.push(format!("critical ({name}): {e}")),
            }
        }
        let mut seen = BTreeMap::new();
        for policy in candidate.issuance_rules().policies().chain(candidate.break_glass_rules().policies()) {
            if seen.insert(policy.id().to_string(), ()).is_some() {
                continue;
            }
            let compiled = CompiledPolicy::compile(policy, env, schema).map_err(failed)?;
            report.queries += 1;
            match cc.check_never_errors_with_counterexample_opt(&compiled).await {
                Ok(None) => {}
                Ok(Some(cex)) => report.findings.push(Finding {
                    check: "can_error",
                    env: name.clone(),
                    rules: vec![policy.id().to_string()],
                    counterexample: describe(&cex),
                }),
                Err(e) => inconclusive.push(format!("can_error `{}` ({name}): {e}", policy.id())),
            }
        }
    }
    let _ = cc.solver_mut().clean_up().await;
    report.inconclusive = inconclusive;
    Ok(report)
}

/// `assurance/critical.cedar`: permits that describe critical requests (they are never
/// issuance rules). `None` when the tree has no such file.
pub fn critical_marker(files: &super::bundle::PolicyFiles) -> Result<Option<PolicySet>, String> {
    let Some(text) = files.get("assurance/critical.cedar") else { return Ok(None) };
    let set: PolicySet = text.parse().map_err(|e| format!("assurance/critical.cedar: {e}"))?;
    if set.policies().any(|p| p.effect() != Effect::Permit) {
        return Err("assurance/critical.cedar: only permits (each describes critical requests)".into());
    }
    Ok(Some(set))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::replay::tests::{CARELESS, TIGHTER, release};

    /// The proofs need cvc5. `.ci/run` installs it and sets MAYFLY_REQUIRE_SOLVER=1, so there
    /// a missing solver fails the test; elsewhere it is reported and the test returns.
    async fn proof(current: Option<&str>, candidate: Option<&str>, critical: Option<&str>) -> Option<ProofReport> {
        let (cur, cand) = (release(current), release(candidate));
        let marker: Option<PolicySet> = critical.map(|c| c.parse().unwrap());
        match prove(&cur.engine, &cand.engine, marker.as_ref()).await {
            Ok(r) => Some(r),
            Err(ProveError::SolverMissing(why)) if std::env::var("MAYFLY_REQUIRE_SOLVER").is_err() => {
                eprintln!("SKIPPED: no cvc5 ({why}); set MAYFLY_REQUIRE_SOLVER=1 to make this a failure");
                None
            }
            Err(e) => panic!("{e}"),
        }
    }

    #[tokio::test]
    async fn the_careless_permit_is_a_counterexample_naming_its_rule() {
        let Some(r) = proof(None, Some(CARELESS), None).await else { return };
        let f = r.findings.iter().find(|f| f.check == "escalation").unwrap_or_else(|| panic!("{r:?}"));
        assert_eq!(f.rules, vec!["ci-any-acme-repo-deploys".to_owned()]);
        assert!(f.env.contains("issue_aws"), "{}", f.env);
        assert!(
            f.counterexample.contains("acme-app-deploy") && f.counterexample.contains("repository_owner: \"acme\""),
            "{}",
            f.counterexample
        );
        assert!(!r.proven());
    }

    #[tokio::test]
    async fn a_pure_tightening_is_proven_and_a_release_implies_itself() {
        let Some(r) = proof(None, Some(TIGHTER), None).await else { return };
        assert!(r.proven(), "{r:?}");
        assert!(r.queries >= r.environments * 2);
        let Some(same) = proof(Some(CARELESS), Some(CARELESS), None).await else { return };
        assert!(same.proven(), "{same:?}");
        // And the other way round the careless permit is gone: that is a tightening too.
        let Some(back) = proof(Some(CARELESS), None, None).await else { return };
        assert!(back.proven(), "{back:?}");
    }

    #[tokio::test]
    async fn the_shipped_break_glass_rules_never_open_critical_requests_and_a_wide_one_does() {
        let critical =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/policies/assurance/critical.cedar")).unwrap();
        let Some(r) = proof(None, None, Some(&critical)).await else { return };
        assert!(r.proven() && r.critical_checked, "{r:?}");
        let wide = r#"
            @id("break-glass-prod-anything")
            @max_ttl("10m")
            permit (principal, action, resource) when { context.break_glass && context has ticket };
        "#;
        let files_rule = Some(wide);
        let cur = release(None);
        let files = crate::policy::shipped_files_with(&[("break-glass/wide.cedar", files_rule)]);
        let cand = crate::policy::release::Release::build(
            &files,
            &crate::identity::TrustDomain::parse("mayfly.local").unwrap(),
            None,
            None,
            "t".into(),
        )
        .unwrap();
        let marker: PolicySet = critical.parse().unwrap();
        let r = match prove(&cur.engine, &cand.engine, Some(&marker)).await {
            Ok(r) => r,
            Err(e) => panic!("{e}"),
        };
        let f = r.findings.iter().find(|f| f.check == "critical").unwrap_or_else(|| panic!("{r:?}"));
        assert_eq!(f.rules, vec!["break-glass-prod-anything".to_owned()]);
        assert!(r.findings.iter().any(|f| f.check == "break_glass_escalation"));
    }

    #[tokio::test]
    async fn a_rule_that_can_error_is_found() {
        // `context.target` is optional: reading it without `has` errors when it is absent.
        let risky = r#"
            @id("risky-target")
            @max_ttl("5m")
            permit (principal, action == Mayfly::Action::"issue_jwt", resource)
            when { principal.attestation == "unix" && (context has purpose || context.break_glass) && context.requested_ttl_secs + 9223372036854775807 > 0 };
        "#;
        let Some(r) = proof(None, Some(risky), None).await else { return };
        let f = r.findings.iter().find(|f| f.check == "can_error").unwrap_or_else(|| panic!("{r:?}"));
        assert_eq!(f.rules, vec!["risky-target".to_owned()]);
    }

    #[test]
    fn loosened_annotations_are_findings_the_solver_cannot_make() {
        let cur = release(None);
        let ci = crate::policy::shipped_files_with(&[])
            .get("issuance/ci.cedar")
            .unwrap()
            .replace("@aws_session_policy(\"artifacts-read\")\n", "");
        let bg = crate::policy::shipped_files_with(&[])
            .get("break-glass/oncall.cedar")
            .unwrap()
            .replace("@approval(\"required\")\n", "");
        let ex = crate::policy::shipped_files_with(&[])
            .get("exceptions/legacy-batch.cedar")
            .unwrap()
            .replace("@expires(\"2027-03-31\")", "@expires(\"2029-03-31\")");
        let files = crate::policy::shipped_files_with(&[
            ("issuance/ci.cedar", Some(ci.as_str())),
            ("break-glass/oncall.cedar", Some(bg.as_str())),
            ("exceptions/legacy-batch.cedar", Some(ex.as_str())),
        ]);
        let cand = crate::policy::release::Release::build(
            &files,
            &crate::identity::TrustDomain::parse("mayfly.local").unwrap(),
            None,
            None,
            "t".into(),
        )
        .unwrap();
        let found = cur.engine.annotations_loosened_in(&cand.engine);
        let ids: Vec<&str> = found.iter().map(|(id, _)| id.as_str()).collect();
        assert_eq!(
            ids,
            vec!["break-glass-dev-jwt-approved", "ci-read-artifacts", "exception-legacy-batch-4h"],
            "{found:?}"
        );
        assert!(cand.engine.annotations_loosened_in(&cur.engine).is_empty(), "the reverse only tightens");
    }

    #[tokio::test]
    async fn a_raised_ceiling_is_a_finding_without_the_solver_too() {
        let cur = release(None);
        let text = crate::policy::shipped_files_with(&[])
            .get("issuance/local.cedar")
            .unwrap()
            .replace("@max_ttl(\"1h\")", "@max_ttl(\"8h\")");
        let files = crate::policy::shipped_files_with(&[("issuance/local.cedar", Some(text.as_str()))]);
        let cand = crate::policy::release::Release::build(
            &files,
            &crate::identity::TrustDomain::parse("mayfly.local").unwrap(),
            None,
            None,
            "t".into(),
        )
        .unwrap();
        let raised = cur.engine.max_ttls_raised_in(&cand.engine);
        assert!(
            raised
                .iter()
                .any(|(id, b, a)| id == "local-workloads-x509" && b.as_secs() == 3600 && a.as_secs() == 8 * 3600),
            "{raised:?}"
        );
    }
}
