//! Policy test cases (`policies/tests/*.toml`): a request as attestation would present it
//! (selectors and/or id-token claims, optionally the identity it asks for), the action, the
//! resource and context → the expected decision, optionally the deciding rule ids and the
//! granted TTL. The inventory lookup runs exactly as in the daemon, so a case also proves
//! which callers reach an identity at all. Pure: `run_all` takes the files and the time.

use std::time::SystemTime;

use serde::Deserialize;

use super::bundle::PolicyFiles;
use super::{AwsRole, CredentialKind, DecisionRequest, Engine, RequestContext, Resource, Verdict};
use crate::identity::{Inventory, Lookup, OidcClaims, Selector, Selectors, Ttl, WorkloadId};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CaseFile {
    #[serde(rename = "case", default)]
    pub cases: Vec<Case>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Case {
    pub name: String,
    /// The SPIFFE ID the caller asks for (as `spiffe_id` in a request). Absent: whichever
    /// inventory entry the selectors match.
    pub identity: Option<String>,
    /// `issue_x509`, `issue_jwt`, `issue_aws` or `issue_wit`.
    pub action: String,
    /// The JWT audience (`issue_jwt`).
    pub audience: Option<String>,
    /// The IAM role ARN (`issue_aws`).
    pub role: Option<String>,
    /// Requested lifetime, e.g. "30m".
    pub ttl: String,
    /// Attested selectors the request carries (default: none).
    #[serde(default)]
    pub selectors: Vec<String>,
    /// Verified id-token claims (CI callers); they add `oidc:*` selectors and `context.oidc`.
    pub oidc: Option<OidcClaims>,
    /// `unix` or `oidc` (default: `oidc` when claims are given, else `unix`).
    pub attestation: Option<String>,
    pub purpose: Option<String>,
    pub target: Option<String>,
    #[serde(default)]
    pub break_glass: bool,
    pub ticket: Option<String>,
    /// Decision time, RFC 3339 (default: now).
    pub now: Option<toml::value::Datetime>,
    /// "allow" or "deny".
    pub expect: String,
    /// The deciding rule ids, in any order (checked only when given).
    pub rules: Option<Vec<String>>,
    /// Words the decision's explanation must contain (checked only when given): what a
    /// refused caller and the ledger are told.
    pub reason: Option<String>,
    /// The lifetime the grant must carry (checked only when given; allow only).
    pub granted_ttl: Option<String>,
    /// `issue_aws`: the session-policies/ names the session is scoped by (`[]`: none, the
    /// role's own permissions). Checked only when given; allow only.
    pub session_policy: Option<Vec<String>>,
    /// `issue_aws`: the session tags, `key=value`. Checked only when given; allow only.
    pub session_tags: Option<Vec<String>>,
}

/// One case's result: `None` when it passed, otherwise what went wrong.
#[derive(Debug)]
pub struct Outcome {
    pub file: String,
    pub name: String,
    pub failure: Option<String>,
}

/// Runs every case of every `tests/*.toml` in `files`. A file that does not parse is one
/// failed outcome named after the file.
pub fn run_all(engine: &Engine, inventory: &Inventory, files: &PolicyFiles, default_now: SystemTime) -> Vec<Outcome> {
    let mut outcomes = Vec::new();
    for (path, text) in files.under("tests", "toml") {
        match toml::from_str::<CaseFile>(text) {
            Ok(file) => outcomes.extend(file.cases.iter().map(|case| Outcome {
                file: path.to_owned(),
                name: case.name.clone(),
                failure: check(engine, inventory, case, default_now).err(),
            })),
            Err(e) => {
                outcomes.push(Outcome { file: path.to_owned(), name: "(file)".into(), failure: Some(e.to_string()) })
            }
        }
    }
    outcomes
}

fn check(engine: &Engine, inventory: &Inventory, case: &Case, default_now: SystemTime) -> Result<(), String> {
    let kind = CredentialKind::from_action(&case.action).ok_or_else(|| {
        format!("unknown action `{}` (known: issue_x509, issue_jwt, issue_aws, issue_wit)", case.action)
    })?;
    let resource = match (kind, &case.audience, &case.role) {
        (CredentialKind::X509, None, None) => Resource::X509,
        (CredentialKind::Wit, None, None) => Resource::Wit,
        (CredentialKind::Jwt, Some(audience), None) => Resource::Jwt { audience: audience.clone() },
        (CredentialKind::Aws, None, Some(role)) => Resource::Aws { role: AwsRole::parse(role)? },
        _ => return Err("issue_jwt needs `audience`, issue_aws needs `role`, issue_x509 and issue_wit neither".into()),
    };
    let requested_ttl = Ttl::parse(&case.ttl).map_err(|e| format!("ttl: {e}"))?;
    let mut selectors = case
        .selectors
        .iter()
        .map(|s| Selector::parse(s))
        .collect::<Result<Selectors, _>>()
        .map_err(|e| e.to_string())?;
    if let Some(claims) = &case.oidc {
        selectors.extend(claims.selectors());
    }
    let now = match &case.now {
        Some(dt) => time::OffsetDateTime::parse(&dt.to_string(), &time::format_description::well_known::Rfc3339)
            .map_err(|e| format!("now `{dt}`: {e} (use RFC 3339, e.g. 2026-11-23T12:00:00Z)"))?
            .into(),
        None => default_now,
    };
    let wanted = match &case.identity {
        Some(id) => {
            let id = WorkloadId::parse(id).map_err(|e| e.to_string())?;
            if !inventory.entries().iter().any(|e| e.id == id) {
                return Err(format!("identity `{id}` is not in inventory.toml"));
            }
            Some(id)
        }
        None => None,
    };
    let attestation =
        case.attestation.clone().unwrap_or_else(|| if case.oidc.is_some() { "oidc" } else { "unix" }.into());
    let context = RequestContext {
        purpose: case.purpose.clone(),
        target: case.target.clone(),
        break_glass: case.break_glass,
        ticket: case.ticket.clone(),
        oidc: case.oidc.clone(),
    };
    let (decided, explain, rules, verdict) =
        match inventory.lookup(&selectors, wanted.as_ref(), crate::clock::utc_date(now)) {
            Lookup::Found(workload) => {
                let req = DecisionRequest {
                    workload,
                    attestation: &attestation,
                    selectors: &selectors,
                    resource: &resource,
                    requested_ttl,
                    context: &context,
                    reserved_audiences: &[],
                };
                let decision = engine.decide(&req, now);
                let decided = if decision.is_allow() { "allow" } else { "deny" };
                (decided, decision.explain(), decision.rules.clone(), Some(decision.verdict))
            }
            Lookup::NoMatch => ("deny", "no inventory entry matches these selectors".to_owned(), vec![], None),
            Lookup::Expired(e) => {
                ("deny", format!("the inventory entry `{}` expired on {}", e.id, e.expires), vec![], None)
            }
            Lookup::Ambiguous(ids) => {
                let ids: Vec<String> = ids.iter().map(ToString::to_string).collect();
                ("deny", format!("the selectors match several identities ({}); name one", ids.join(", ")), vec![], None)
            }
            Lookup::NameReused { entry, pinned, presented } => {
                ("deny", Lookup::name_reused_reason(entry, pinned, presented.as_ref()), vec![], None)
            }
        };
    if decided != case.expect {
        return Err(format!("expected {}, decided {decided}: {explain}", case.expect));
    }
    if let Some(want) = case.reason.as_ref().filter(|w| !explain.contains(w.as_str())) {
        return Err(format!("expected the reason to say `{want}`, it says: {explain}"));
    }
    if let Some(expected) = &case.rules {
        let (mut want, mut got) = (expected.clone(), rules);
        want.sort();
        got.sort();
        if want != got {
            return Err(format!("expected deciding rules {want:?}, got {got:?}: {explain}"));
        }
    }
    if let Some(ttl) = &case.granted_ttl {
        let want = Ttl::parse(ttl).map_err(|e| format!("granted_ttl: {e}"))?;
        match &verdict {
            Some(Verdict::Allow(grant)) if grant.ttl() == want => {}
            Some(Verdict::Allow(grant)) => return Err(format!("expected granted ttl {want}, got {}", grant.ttl())),
            _ => return Err("granted_ttl given for a denied request".into()),
        }
    }
    let aws = match &verdict {
        Some(Verdict::Allow(grant)) => grant.aws(),
        _ => None,
    };
    if let Some(want) = &case.session_policy {
        let aws = aws.ok_or("session_policy given for a request that is not an allowed issue_aws")?;
        let got = aws.session_policy.as_ref().map(|p| p.names.clone()).unwrap_or_default();
        let mut want = want.clone();
        want.sort();
        if got != want {
            return Err(format!("expected session policy {want:?}, got {got:?}"));
        }
    }
    if let Some(want) = &case.session_tags {
        let aws = aws.ok_or("session_tags given for a request that is not an allowed issue_aws")?;
        let got: Vec<String> = aws.tags.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let mut want = want.clone();
        want.sort();
        if got != want {
            return Err(format!("expected session tags {want:?}, got {got:?}"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::TrustDomain;
    use crate::policy::shipped_files_with;

    fn outcomes(files: &PolicyFiles) -> Vec<Outcome> {
        let engine = Engine::from_files(files).unwrap();
        let td = TrustDomain::parse("mayfly.local").unwrap();
        let inventory = Inventory::parse(files.get("inventory.toml").unwrap(), &td).unwrap();
        run_all(&engine, &inventory, files, SystemTime::now())
    }

    fn failures(files: &PolicyFiles) -> Vec<String> {
        outcomes(files).into_iter().filter_map(|o| o.failure).collect()
    }

    #[test]
    fn shipped_cases_pass() {
        let all = outcomes(&shipped_files_with(&[]));
        assert!(all.len() >= 15, "{}", all.len());
        for o in all {
            assert!(o.failure.is_none(), "{} / {}: {:?}", o.file, o.name, o.failure);
        }
    }

    #[test]
    fn a_wrong_expectation_fails_with_what_was_decided_and_why() {
        let shipped = shipped_files_with(&[]);
        let local = shipped.get("tests/local.toml").unwrap();
        let flipped = local.replacen("expect = \"deny\"", "expect = \"allow\"", 1);
        let f = failures(&shipped_files_with(&[("tests/local.toml", Some(&flipped))]));
        assert_eq!(f.len(), 1, "{f:?}");
        assert!(f[0].contains("expected allow, decided deny") && f[0].contains("forbid-ttl-over-12h"), "{f:?}");

        let wrong_rule = local.replacen("rules = [\"local-workloads-x509\"]", "rules = [\"other\"]", 1);
        let f = failures(&shipped_files_with(&[("tests/local.toml", Some(&wrong_rule))]));
        assert!(f[0].contains("expected deciding rules"), "{f:?}");

        let unknown = local.replacen("spiffe://mayfly.local/dev/quickstart", "spiffe://mayfly.local/nobody", 1);
        let f = failures(&shipped_files_with(&[("tests/local.toml", Some(&unknown))]));
        assert!(f[0].contains("not in inventory.toml"), "{f:?}");
    }

    #[test]
    fn a_policy_change_that_opens_deploys_to_branches_fails_the_shipped_escalation_cases() {
        let shipped = shipped_files_with(&[]);
        let pin = "context.oidc.git_ref == \"refs/heads/main\"";
        let loosen = |path: &str| {
            let text = shipped.get(path).unwrap();
            assert!(text.contains(pin), "{path} must pin main");
            text.replace(pin, "context.oidc.git_ref like \"refs/heads/*\"")
        };
        let (ci, guard) = (loosen("issuance/ci.cedar"), loosen("issuance/guardrails.cedar"));
        let f = failures(&shipped_files_with(&[
            ("issuance/ci.cedar", Some(&ci)),
            ("issuance/guardrails.cedar", Some(&guard)),
        ]));
        assert!(f.iter().any(|f| f.contains("expected deny, decided allow")), "{f:?}");
    }
}
