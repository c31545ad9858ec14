//! The engine of one release: the schema, the rules (issuance and break-glass, indexed by
//! scope), the annotations they carry, and `decide` — pure and synchronous, no I/O, no clock
//! read (time is passed in). The only place a `Grant` is made.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::SystemTime;

use cedar_policy::{
    ActionConstraint, Authorizer, Context, Effect, Entities, Entity, EntityId, EntityTypeName, EntityUid, Policy,
    PolicyId, PolicySet, PrincipalConstraint, Request, ResourceConstraint, RestrictedExpression, Schema,
    ValidationMode, Validator,
};

use super::bundle::{BundleError, PolicyFiles};
use super::{Decision, DecisionRequest, Grant, PolicyError, RESERVED_AUDIENCE_RULE, Resource, Verdict, aws};
use crate::clock::unix_secs;
use crate::identity::Ttl;

/// A time-bound exception (a permit in exceptions/): who owns it and the last day (UTC) it
/// applies. After that day it stops granting anything, without anyone editing a file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Exception {
    pub id: String,
    pub owner: String,
    pub expires: time::Date,
    pub path: PathBuf,
}

impl Exception {
    pub fn is_expired(&self, today: time::Date) -> bool {
        today > self.expires
    }
}

/// Rules grouped by the exact action / principal / resource their scope names (`==`), so a
/// request is evaluated only against rules that can apply to it. `""` is "any" (rules whose
/// scope is unconstrained, `in`, or `is`: those are evaluated for every request). Cedar
/// allows iff some permit holds and no forbid holds, so evaluating disjoint groups and
/// combining (any forbid → deny; else any permit → allow) is the same decision as one scan.
#[derive(Default)]
struct ScopeIndex {
    buckets: HashMap<String, HashMap<String, HashMap<String, PolicySet>>>,
    groups: usize,
}

impl ScopeIndex {
    fn build(policies: &PolicySet) -> Result<Self, String> {
        let mut index = Self::default();
        for policy in policies.policies() {
            let action = match policy.action_constraint() {
                ActionConstraint::Eq(uid) => uid.to_string(),
                _ => String::new(),
            };
            let principal = match policy.principal_constraint() {
                PrincipalConstraint::Eq(uid) => uid.to_string(),
                _ => String::new(),
            };
            let resource = match policy.resource_constraint() {
                ResourceConstraint::Eq(uid) => uid.to_string(),
                _ => String::new(),
            };
            let set =
                index.buckets.entry(action).or_default().entry(principal).or_default().entry(resource).or_default();
            set.add(policy.clone()).map_err(|e| e.to_string())?;
        }
        index.groups = index.buckets.values().flat_map(HashMap::values).map(HashMap::len).sum();
        Ok(index)
    }

    /// The groups that can apply to a request with these scope strings.
    fn for_request<'a>(
        &'a self,
        action: &'a str,
        principal: &'a str,
        resource: &'a str,
    ) -> impl Iterator<Item = &'a PolicySet> + 'a {
        [action, ""].into_iter().filter_map(|a| self.buckets.get(a)).flat_map(move |by_p| {
            [principal, ""]
                .into_iter()
                .filter_map(|p| by_p.get(p))
                .flat_map(move |by_r| [resource, ""].into_iter().filter_map(|r| by_r.get(r)))
        })
    }
}

pub struct Engine {
    exceptions: HashMap<String, Exception>,
    policies: PolicySet,
    index: ScopeIndex,
    /// Break-glass requests are decided by break-glass/ permits and every forbid (from any
    /// directory), never by the normal permits; normal requests never see break-glass rules.
    break_glass: PolicySet,
    break_glass_index: ScopeIndex,
    /// Break-glass permits annotated `@approval("required")`: a second person must approve.
    needs_approval: HashSet<String>,
    schema: Schema,
    /// The schema's action entities (and their groups), made once per release: each
    /// request's entities start from these.
    actions: Entities,
    max_ttl: HashMap<String, Ttl>,
    aws: aws::AwsRules,
    reasons: HashMap<String, String>,
    version: String,
    authorizer: Authorizer,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("version", &self.version)
            .field("rules", &self.rule_count())
            .field("scope_groups", &self.index.groups)
            .finish()
    }
}

const WORKLOAD_TYPE: &str = "Mayfly::Workload";
const KIND_TYPE: &str = "Mayfly::CredentialKind";
const AUDIENCE_TYPE: &str = "Mayfly::Audience";
const ROLE_TYPE: &str = "Mayfly::AwsRole";
const ACTION_TYPE: &str = "Mayfly::Action";

impl Engine {
    /// Reads a policies/ directory (see `PolicyFiles::read_dir`) and builds its engine.
    pub fn load(dir: &Path) -> Result<Self, PolicyError> {
        Self::from_files(&PolicyFiles::read_dir(dir)?)
    }

    /// Parses schema.cedarschema and the rules in issuance/ and exceptions/, checks every
    /// rule's annotations, validates every rule against the schema (strict mode, errors with
    /// file, line and rule id) and indexes the rules by scope.
    pub fn from_files(files: &PolicyFiles) -> Result<Self, PolicyError> {
        let schema_path = Path::new("schema.cedarschema");
        let schema_src =
            files.get("schema.cedarschema").ok_or_else(|| BundleError::Missing { path: schema_path.into() })?;
        let (schema, _warnings) = Schema::from_cedarschema_str(schema_src)
            .map_err(|e| PolicyError::Parse { path: schema_path.into(), why: located(schema_src, &e) })?;
        let validator = Validator::new(schema.clone());
        let mut invalid = Vec::new();
        let mut policies = PolicySet::new();
        let mut max_ttl = HashMap::new();
        let mut reasons = HashMap::new();
        let mut exceptions = HashMap::new();
        let mut break_glass = PolicySet::new();
        let mut needs_approval = HashSet::new();
        let mut aws_rules = aws::AwsRules::load(files)?;
        let rule_files: Vec<(&str, &str)> = files
            .under("issuance", "cedar")
            .chain(files.under("exceptions", "cedar"))
            .chain(files.under("break-glass", "cedar"))
            .collect();
        if files.under("issuance", "cedar").next().is_none() {
            return Err(PolicyError::Empty);
        }
        for (name, text) in rule_files {
            let path = PathBuf::from(name);
            let set = PolicySet::from_str(text)
                .map_err(|e| PolicyError::Parse { path: path.clone(), why: located(text, &e) })?;
            let mut file_set = PolicySet::new();
            for policy in set.policies() {
                let id = policy
                    .annotation("id")
                    .ok_or_else(|| PolicyError::MissingId { path: path.clone(), rule: policy.to_string() })?
                    .to_owned();
                if name.starts_with("exceptions/") {
                    exceptions.insert(id.clone(), exception(&path, &id, policy)?);
                }
                match policy.effect() {
                    Effect::Permit => {
                        let raw = policy.annotation("max_ttl").unwrap_or("");
                        let ttl = Ttl::parse(raw).map_err(|e| PolicyError::MaxTtl {
                            path: path.clone(),
                            id: id.clone(),
                            why: e.to_string(),
                        })?;
                        max_ttl.insert(id.clone(), ttl);
                        aws_rules.annotate(name, &id, policy)?;
                    }
                    Effect::Forbid => {
                        let reason = policy.annotation("reason").filter(|r| !r.trim().is_empty());
                        let reason =
                            reason.ok_or_else(|| PolicyError::Reason { path: path.clone(), id: id.clone() })?;
                        reasons.insert(id.clone(), reason.to_owned());
                    }
                }
                let emergency = name.starts_with("break-glass/");
                match policy.annotation("approval") {
                    Some("required") if emergency && policy.effect() == Effect::Permit => {
                        needs_approval.insert(id.clone());
                    }
                    Some(other) => {
                        return Err(PolicyError::Parse {
                            path: path.clone(),
                            why: format!(
                                "rule `{id}`: @approval(\"{other}\") is only meaningful as @approval(\"required\") on a break-glass/ permit"
                            ),
                        });
                    }
                    None => {}
                }
                let policy = policy.new_id(PolicyId::new(&id));
                // Forbids are guardrails everywhere; permits go to their own path only.
                if emergency || policy.effect() == Effect::Forbid {
                    break_glass
                        .add(policy.clone())
                        .map_err(|_| PolicyError::DuplicateId { path: path.clone(), id: id.clone() })?;
                }
                if !emergency {
                    policies
                        .add(policy.clone())
                        .map_err(|_| PolicyError::DuplicateId { path: path.clone(), id: id.clone() })?;
                } else if policy.effect() == Effect::Forbid {
                    // A break-glass forbid also guards normal issuance.
                    policies
                        .add(policy.clone())
                        .map_err(|_| PolicyError::DuplicateId { path: path.clone(), id: id.clone() })?;
                }
                file_set.add(policy).map_err(|_| PolicyError::DuplicateId { path: path.clone(), id: id.clone() })?;
            }
            // Why: strict validation is per rule, so validating file by file loses nothing and
            // lets every error point at its own file, line and rule id.
            for e in validator.validate(&file_set, ValidationMode::Strict).validation_errors() {
                invalid.push(format!("  - `{}`: {}", path.display(), located(text, e)));
            }
        }
        if !invalid.is_empty() {
            return Err(PolicyError::Validation(invalid.join("\n")));
        }
        let index = ScopeIndex::build(&policies).map_err(PolicyError::Validation)?;
        let break_glass_index = ScopeIndex::build(&break_glass).map_err(PolicyError::Validation)?;
        let actions = Entities::from_entities([], Some(&schema)).map_err(|e| PolicyError::Validation(e.to_string()))?;
        Ok(Self {
            exceptions,
            policies,
            index,
            break_glass,
            break_glass_index,
            needs_approval,
            schema,
            actions,
            max_ttl,
            aws: aws_rules,
            reasons,
            version: files.version(),
            authorizer: Authorizer::new(),
        })
    }

    pub fn version(&self) -> &str {
        &self.version
    }

    /// The schema the rules validate against.
    pub fn schema(&self) -> &Schema {
        &self.schema
    }

    /// What decides normal requests: issuance/ and exceptions/ rules, and every forbid.
    pub fn issuance_rules(&self) -> &PolicySet {
        &self.policies
    }

    /// What decides break-glass requests: break-glass/ permits and every forbid.
    pub fn break_glass_rules(&self) -> &PolicySet {
        &self.break_glass
    }

    /// Rules present in both releases whose `@max_ttl` is higher in `candidate`.
    pub fn max_ttls_raised_in(&self, candidate: &Engine) -> Vec<(String, Ttl, Ttl)> {
        let mut raised: Vec<(String, Ttl, Ttl)> = candidate
            .max_ttl
            .iter()
            .filter_map(|(id, after)| {
                self.max_ttl.get(id).filter(|before| after > *before).map(|before| (id.clone(), *before, *after))
            })
            .collect();
        raised.sort_by(|a, b| a.0.cmp(&b.0));
        raised
    }

    /// What a candidate loosens through annotations, which no solver sees: for rules in
    /// both releases, a session policy dropped or rewritten, an approval no longer
    /// required, an exception that lasts longer. `(rule id, what changed)`.
    pub fn annotations_loosened_in(&self, candidate: &Engine) -> Vec<(String, String)> {
        let mut out = Vec::new();
        for id in candidate.max_ttl.keys().filter(|id| self.max_ttl.contains_key(*id)) {
            match (self.aws.policy_of(id), candidate.aws.policy_of(id)) {
                (Some((name, _)), None) => out.push((
                    id.clone(),
                    format!("@aws_session_policy(\"{name}\") dropped: the role is no longer scoped down"),
                )),
                (Some((a, before)), Some((b, after))) if a != b || before != after => {
                    out.push((
                        id.clone(),
                        format!("session policy `{a}` → `{b}` changed; review that it allows no more"),
                    ));
                }
                _ => {}
            }
            if self.needs_approval.contains(id) && !candidate.needs_approval.contains(id) {
                out.push((id.clone(), "@approval(\"required\") removed: no second person any more".into()));
            }
            if let (Some(a), Some(b)) = (self.exceptions.get(id), candidate.exceptions.get(id))
                && b.expires > a.expires
            {
                out.push((id.clone(), format!("exception extended from {} to {}", a.expires, b.expires)));
            }
        }
        out.sort();
        out
    }

    /// Every rule of the release: issuance, exceptions and break-glass (forbids once).
    pub fn rule_count(&self) -> usize {
        let emergency_permits = self.break_glass.policies().filter(|p| p.effect() == Effect::Permit).count();
        self.policies.policies().count() + emergency_permits
    }

    /// The time-bound exceptions, soonest expiry first.
    pub fn exceptions(&self) -> Vec<&Exception> {
        let mut list: Vec<&Exception> = self.exceptions.values().collect();
        list.sort_by(|a, b| (a.expires, &a.id).cmp(&(b.expires, &b.id)));
        list
    }

    /// Decides a request at time `now`. Default deny; any forbid wins; a request that does
    /// not fit the schema is denied with the reason.
    pub fn decide(&self, req: &DecisionRequest<'_>, now: SystemTime) -> Decision {
        self.decide_with(req, now, true)
    }

    /// `decide` evaluating every rule instead of the scope index: for tests and benchmarks
    /// that show the two agree and what the index saves.
    pub fn decide_full_scan(&self, req: &DecisionRequest<'_>, now: SystemTime) -> Decision {
        self.decide_with(req, now, false)
    }

    fn decide_with(&self, req: &DecisionRequest<'_>, now: SystemTime, indexed: bool) -> Decision {
        let deny = |errors: Vec<String>| Decision {
            verdict: Verdict::Deny,
            rules: vec![],
            reasons: vec![],
            errors,
            policy_version: self.version.clone(),
            needs_approval: false,
        };
        if let Resource::Jwt { audience } = req.resource
            && req.reserved_audiences.contains(audience)
        {
            return Decision {
                verdict: Verdict::Deny,
                rules: vec![RESERVED_AUDIENCE_RULE.into()],
                reasons: vec![format!(
                    "the audience `{audience}` is reserved for mayfly's own STS assertions (aws.web_identity_audience)"
                )],
                ..deny(vec![])
            };
        }
        let (request, entities, scope) = match self.build(req, now) {
            Ok(parts) => parts,
            Err(why) => return deny(vec![why]),
        };
        let (mut forbids, mut permits, mut errors) = (Vec::new(), Vec::new(), Vec::new());
        let mut evaluate = |set: &PolicySet| {
            let response = self.authorizer.is_authorized(&request, set, &entities);
            errors.extend(response.diagnostics().errors().map(ToString::to_string));
            let reasons = response.diagnostics().reason().map(ToString::to_string);
            match response.decision() {
                cedar_policy::Decision::Allow => permits.extend(reasons),
                cedar_policy::Decision::Deny => forbids.extend(reasons),
            }
        };
        let (set, index) = if req.context.break_glass {
            (&self.break_glass, &self.break_glass_index)
        } else {
            (&self.policies, &self.index)
        };
        if indexed {
            index.for_request(&scope[0], &scope[1], &scope[2]).for_each(&mut evaluate);
        } else {
            evaluate(set);
        }
        forbids.sort();
        permits.sort();
        if !forbids.is_empty() {
            let reasons = forbids.iter().filter_map(|id| self.reasons.get(id).cloned()).collect();
            return Decision {
                verdict: Verdict::Deny,
                rules: forbids,
                reasons,
                errors,
                policy_version: self.version.clone(),
                needs_approval: false,
            };
        }
        // Why: exceptions are permits only, so dropping an expired one from the permitting
        // set is exactly "the rule no longer exists" for this decision.
        let today = crate::clock::utc_date(now);
        let (expired, live): (Vec<String>, Vec<String>) =
            permits.into_iter().partition(|id| self.exceptions.get(id).is_some_and(|e| e.is_expired(today)));
        // Permits are a union: each one authorises up to its own @max_ttl.
        let ceiling = live.iter().filter_map(|id| self.max_ttl.get(id)).max().copied();
        match ceiling {
            Some(max) => {
                // The rule with the longest ceiling (ties: the first id): it shapes an AWS
                // session, and it is what capped a request for more.
                let widest =
                    live.iter().filter(|id| self.max_ttl.get(*id) == Some(&max)).min().cloned().unwrap_or_default();
                Decision {
                    verdict: Verdict::Allow(Grant {
                        identity: req.workload.id.clone(),
                        resource: req.resource.clone(),
                        ttl: req.requested_ttl.min(max),
                        aws: matches!(req.resource, Resource::Aws { .. })
                            .then(|| Box::new(self.aws.grant(&widest, req.workload, max))),
                        clamped_by: (req.requested_ttl > max).then(|| widest.clone()),
                    }),
                    needs_approval: live.iter().any(|id| self.needs_approval.contains(id)),
                    rules: live,
                    reasons: vec![],
                    errors,
                    policy_version: self.version.clone(),
                }
            }
            None => {
                let reasons = expired
                    .iter()
                    .map(|id| {
                        let until = self.exceptions.get(id).map(|e| e.expires.to_string()).unwrap_or_default();
                        format!("exception `{id}` expired after {until}")
                    })
                    .collect();
                Decision {
                    verdict: Verdict::Deny,
                    rules: vec![],
                    reasons,
                    errors,
                    policy_version: self.version.clone(),
                    needs_approval: false,
                }
            }
        }
    }

    fn build(&self, req: &DecisionRequest<'_>, now: SystemTime) -> Result<(Request, Entities, [String; 3]), String> {
        let uid = |ty: &str, id: &str| -> Result<EntityUid, String> {
            let ty = EntityTypeName::from_str(ty).map_err(|e| e.to_string())?;
            Ok(EntityUid::from_type_name_and_id(ty, EntityId::new(id)))
        };
        let s = |v: &str| RestrictedExpression::new_string(v.to_owned());
        let principal = uid(WORKLOAD_TYPE, req.workload.id.as_str())?;
        let action = uid(ACTION_TYPE, &format!("issue_{}", req.resource.kind().as_str()))?;
        let (resource, resource_attrs) = match req.resource {
            Resource::X509 => (uid(KIND_TYPE, "x509")?, HashMap::new()),
            Resource::Wit => (uid(KIND_TYPE, "wit")?, HashMap::new()),
            Resource::Jwt { audience } => (uid(AUDIENCE_TYPE, audience)?, HashMap::new()),
            Resource::Aws { role } => (
                uid(ROLE_TYPE, &role.arn)?,
                HashMap::from([("account".to_owned(), s(&role.account)), ("name".to_owned(), s(&role.name))]),
            ),
        };
        let w = req.workload;
        let attrs = HashMap::from([
            ("owner".to_owned(), s(&w.owner)),
            ("purpose".to_owned(), s(&w.purpose)),
            ("environment".to_owned(), s(&w.environment)),
            ("tier".to_owned(), s(&w.tier)),
            ("trust_domain".to_owned(), s(w.id.trust_domain())),
            ("path".to_owned(), s(w.id.path())),
            ("attestation".to_owned(), s(req.attestation)),
        ]);
        let workload = Entity::new(principal.clone(), attrs, HashSet::new()).map_err(|e| e.to_string())?;
        let target = Entity::new(resource.clone(), resource_attrs, HashSet::new()).map_err(|e| e.to_string())?;
        // Why no schema here: the two entities are built above with exactly the schema's
        // attribute types, and the release's rules were validated against it when it was
        // loaded; checking again costs more than the decision (the action entities the
        // schema defines come from `actions`).
        let entities = self.actions.clone().add_entities([workload, target], None).map_err(|e| e.to_string())?;
        let ttl = i64::try_from(req.requested_ttl.as_secs()).map_err(|e| e.to_string())?;
        let c = req.context;
        let mut context = vec![
            ("requested_ttl_secs".to_owned(), RestrictedExpression::new_long(ttl)),
            ("now_unix".to_owned(), RestrictedExpression::new_long(unix_secs(now))),
            ("selectors".to_owned(), RestrictedExpression::new_set(req.selectors.iter().map(|x| s(x.as_str())))),
            ("break_glass".to_owned(), RestrictedExpression::new_bool(c.break_glass)),
        ];
        for (key, value) in [("purpose", &c.purpose), ("target", &c.target), ("ticket", &c.ticket)] {
            if let Some(v) = value {
                context.push((key.to_owned(), s(v)));
            }
        }
        if let Some(claims) = &c.oidc {
            let record = claims.fields().into_iter().map(|(k, v)| (k.to_owned(), s(v)));
            context.push(("oidc".to_owned(), RestrictedExpression::new_record(record).map_err(|e| e.to_string())?));
        }
        let context = Context::from_pairs(context).map_err(|e| e.to_string())?;
        let scope = [action.to_string(), principal.to_string(), resource.to_string()];
        // The context is built above with the schema's types (see `entities`).
        let request = Request::new(principal, action, resource, context, None).map_err(|e| e.to_string())?;
        Ok((request, entities, scope))
    }
}

fn exception(path: &Path, id: &str, policy: &Policy) -> Result<Exception, PolicyError> {
    let fail = |why: &str| PolicyError::Exception { path: path.into(), id: id.into(), why: why.into() };
    if policy.effect() != Effect::Permit {
        return Err(fail("must be a permit (guardrail forbids are never exceptions)"));
    }
    let owner = policy.annotation("owner").filter(|o| !o.trim().is_empty());
    let owner = owner.ok_or_else(|| fail("needs @owner(\"...\")"))?.to_owned();
    let expires = policy
        .annotation("expires")
        .and_then(|d| time::Date::parse(d, time::macros::format_description!("[year]-[month]-[day]")).ok())
        .ok_or_else(|| fail("needs @expires(\"YYYY-MM-DD\"), the last day it applies"))?;
    Ok(Exception { id: id.into(), owner, expires, path: path.into() })
}

/// A Cedar diagnostic as `message (line L, column C)`, located in `src` by its first label.
fn located(src: &str, err: &dyn miette::Diagnostic) -> String {
    let mut message = err.to_string();
    if let Some(help) = err.help() {
        message.push_str(&format!("; {help}"));
    }
    let offset = err.labels().and_then(|mut labels| labels.next()).map(|l| l.offset());
    match offset.filter(|o| *o <= src.len()) {
        Some(o) => {
            let (line, column) = crate::identity::line_col(src, o);
            format!("{message} (line {line}, column {column})")
        }
        None => message,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::{Inventory, Selector, TrustDomain};
    use crate::identity::{InventoryEntry, Selectors, WorkloadId};
    use crate::policy::{AwsRole, RequestContext, shipped_files_with};

    fn engine() -> Engine {
        Engine::from_files(&shipped_files_with(&[])).unwrap()
    }

    fn workload(id: &str) -> InventoryEntry {
        InventoryEntry {
            id: WorkloadId::parse(id).unwrap(),
            owner: "team".into(),
            purpose: "test".into(),
            environment: "dev".into(),
            tier: "standard".into(),
            expires: time::macros::date!(2030 - 01 - 01),
            selectors: Selectors::new(),
            known_as: Selectors::new(),
        }
    }

    fn decide_at(
        e: &Engine,
        w: &InventoryEntry,
        resource: &Resource,
        ttl: &str,
        ctx: &RequestContext,
        now: SystemTime,
    ) -> Decision {
        let selectors: Selectors = [Selector::parse("unix:uid:1000").unwrap()].into();
        let req = DecisionRequest {
            workload: w,
            attestation: "unix",
            selectors: &selectors,
            resource,
            requested_ttl: Ttl::parse(ttl).unwrap(),
            context: ctx,
            reserved_audiences: &[],
        };
        let indexed = e.decide(&req, now);
        assert_eq!(indexed, e.decide_full_scan(&req, now), "the scope index must not change a decision");
        indexed
    }

    fn decide(e: &Engine, ttl: &str) -> Decision {
        let w = workload("spiffe://mayfly.local/dev/quickstart");
        decide_at(e, &w, &Resource::X509, ttl, &RequestContext::default(), SystemTime::now())
    }

    #[test]
    fn shipped_policy_allows_local_x509_and_clamps_to_the_rule_maximum() {
        let d = decide(&engine(), "2h");
        let Verdict::Allow(grant) = &d.verdict else { panic!("{d:?}") };
        assert_eq!(grant.ttl().as_secs(), 3600);
        assert_eq!(d.rules, vec!["local-workloads-x509"]);
        assert_eq!(d.policy_version, shipped_files_with(&[]).version());
    }

    #[test]
    fn a_forbid_names_its_rule_and_its_reason() {
        let d = decide(&engine(), "13h");
        assert_eq!(d.verdict, Verdict::Deny);
        assert_eq!(d.rules, vec!["forbid-ttl-over-12h"]);
        assert_eq!(d.explain(), "denied by forbid-ttl-over-12h: credentials live at most 12 h; ask for less and renew");
    }

    #[test]
    fn a_default_deny_says_what_to_do_and_shows_no_internals() {
        // A production workload: only dev ones get JWT-SVIDs for any audience.
        let w = InventoryEntry { environment: "prod".into(), ..workload("spiffe://mayfly.local/api") };
        let jwt = Resource::Jwt { audience: "https://payments.example.org".into() };
        let d = decide_at(&engine(), &w, &jwt, "5m", &RequestContext::default(), SystemTime::now());
        assert_eq!(d.verdict, Verdict::Deny);
        assert!(d.rules.is_empty());
        assert!(
            d.explain().contains("no rule permits") && d.explain().contains("policies/issuance"),
            "{}",
            d.explain()
        );
    }

    #[test]
    fn aws_roles_parse_into_what_policy_tests() {
        let r = AwsRole::parse("arn:aws:iam::111122223333:role/ci/acme-app-deploy").unwrap();
        assert_eq!((r.account.as_str(), r.name.as_str()), ("111122223333", "acme-app-deploy"));
        for bad in [
            "arn:aws:s3:::bucket",
            "arn:aws:iam::12:role/x",
            "arn:aws:iam::111122223333:user/x",
            "arn:aws:iam::111122223333:role/",
            "role/x",
        ] {
            assert!(AwsRole::parse(bad).is_err(), "{bad}");
        }
    }

    const EXCEPTION: &str = r#"@id("exc") @owner("team") @expires("2027-03-31") @max_ttl("2h")
        permit(principal, action == Mayfly::Action::"issue_x509", resource);"#;

    fn with_exception(exception: &str) -> Result<Engine, PolicyError> {
        Engine::from_files(&shipped_files_with(&[
            ("exceptions/legacy-batch.cedar", None),
            ("exceptions/x.cedar", Some(exception)),
        ]))
    }

    fn at(s: &str) -> SystemTime {
        SystemTime::from(time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).unwrap())
    }

    #[test]
    fn an_exception_grants_until_its_last_day_and_nothing_after() {
        let e = with_exception(EXCEPTION).unwrap();
        let w = workload("spiffe://mayfly.local/dev/quickstart");
        let ctx = RequestContext::default();
        let during = decide_at(&e, &w, &Resource::X509, "2h", &ctx, at("2027-03-31T23:59:59Z"));
        assert!(matches!(&during.verdict, Verdict::Allow(g) if g.ttl().as_secs() == 7200), "{during:?}");
        assert_eq!(during.rules, vec!["exc", "local-workloads-x509"]);
        // After its last day only the local rule is left: 1 h.
        let after = decide_at(&e, &w, &Resource::X509, "2h", &ctx, at("2027-04-01T00:00:00Z"));
        assert!(matches!(&after.verdict, Verdict::Allow(g) if g.ttl().as_secs() == 3600), "{after:?}");
        assert_eq!(after.rules, vec!["local-workloads-x509"]);
        // Guardrails still win while it lasts.
        let long = decide_at(&e, &w, &Resource::X509, "13h", &ctx, at("2027-01-01T00:00:00Z"));
        assert_eq!(long.rules, vec!["forbid-ttl-over-12h"]);
    }

    #[test]
    fn an_expired_exception_that_was_the_only_permit_is_named_in_the_denial() {
        let jwt_exception = r#"@id("exc-jwt") @owner("team") @expires("2027-03-31") @max_ttl("10m")
            permit(principal, action == Mayfly::Action::"issue_jwt", resource);"#;
        let e = with_exception(jwt_exception).unwrap();
        let w = InventoryEntry { environment: "prod".into(), ..workload("spiffe://mayfly.local/api") };
        let jwt = Resource::Jwt { audience: "x".into() };
        let d = decide_at(&e, &w, &jwt, "5m", &RequestContext::default(), at("2027-04-01T00:00:00Z"));
        assert_eq!(d.verdict, Verdict::Deny);
        assert!(d.explain().contains("exception `exc-jwt` expired after 2027-03-31"), "{}", d.explain());
    }

    #[test]
    fn exceptions_need_an_owner_an_expiry_and_must_be_permits() {
        let no_owner = EXCEPTION.replace("@owner(\"team\") ", "");
        assert!(with_exception(&no_owner).unwrap_err().to_string().contains("@owner"));
        let bad_date = EXCEPTION.replace("2027-03-31", "next spring");
        assert!(with_exception(&bad_date).unwrap_err().to_string().contains("@expires"));
        let forbid = r#"@id("f") @reason("r") @owner("t") @expires("2027-01-01") forbid(principal, action, resource);"#;
        assert!(with_exception(forbid).unwrap_err().to_string().contains("must be a permit"));
    }

    #[test]
    fn rules_without_annotations_or_off_schema_are_refused_with_file_and_line() {
        let load = |rule: &str| Engine::from_files(&shipped_files_with(&[("issuance/x.cedar", Some(rule))]));
        assert!(matches!(load("permit(principal, action, resource);"), Err(PolicyError::MissingId { .. })));
        assert!(matches!(load("@id(\"a\") permit(principal, action, resource);"), Err(PolicyError::MaxTtl { .. })));
        assert!(matches!(load("@id(\"a\") forbid(principal, action, resource);"), Err(PolicyError::Reason { .. })));
        assert!(matches!(
            load("@id(\"local-workloads-x509\") @max_ttl(\"1h\") permit(principal, action, resource);"),
            Err(PolicyError::DuplicateId { .. })
        ));
        let off_schema = "// a comment\n@id(\"a\") @max_ttl(\"1h\")\npermit(principal, action, resource) when { principal.nope == 1 };";
        let err = load(off_schema).unwrap_err().to_string();
        assert!(err.contains("issuance/x.cedar") && err.contains("line 3"), "{err}");
    }

    /// Many per-workload and per-role rules plus generic ones: the index must agree with a
    /// full scan on every request, allow or deny, whichever rules decide.
    #[test]
    fn the_scope_index_decides_exactly_like_a_full_scan() {
        let mut rules = String::new();
        for i in 0..60 {
            rules.push_str(&format!(
                "@id(\"w{i}\") @max_ttl(\"{}m\") permit(principal == Mayfly::Workload::\"spiffe://mayfly.local/svc/{i}\", action == Mayfly::Action::\"issue_jwt\", resource == Mayfly::Audience::\"aud-{}\");\n",
                i + 1,
                i % 7
            ));
            rules.push_str(&format!(
                "@id(\"r{i}\") @max_ttl(\"20m\") permit(principal, action == Mayfly::Action::\"issue_aws\", resource == Mayfly::AwsRole::\"arn:aws:iam::111122223333:role/r{}\") when {{ principal.path like \"/svc/{}*\" }};\n",
                i % 5,
                i % 3
            ));
        }
        rules.push_str("@id(\"f-aud-3\") @reason(\"no\") forbid(principal, action, resource == Mayfly::Audience::\"aud-3\") when { context.requested_ttl_secs > 600 };\n");
        rules.push_str("@id(\"f-svc-9\") @reason(\"no\") forbid(principal == Mayfly::Workload::\"spiffe://mayfly.local/svc/9\", action, resource);\n");
        let e = Engine::from_files(&shipped_files_with(&[("issuance/many.cedar", Some(&rules))])).unwrap();
        assert!(e.index.groups > 60, "{}", e.index.groups);
        let (mut allows, mut denies) = (0, 0);
        for w in 0..70 {
            let w = workload(&format!("spiffe://mayfly.local/svc/{w}"));
            for resource in (0..8)
                .map(|a| Resource::Jwt { audience: format!("aud-{a}") })
                .chain((0..6).map(|r| Resource::Aws {
                    role: AwsRole::parse(&format!("arn:aws:iam::111122223333:role/r{r}")).unwrap(),
                }))
                .chain([Resource::X509])
            {
                for ttl in ["5m", "15m", "13h"] {
                    let d = decide_at(&e, &w, &resource, ttl, &RequestContext::default(), SystemTime::now());
                    if d.is_allow() { allows += 1 } else { denies += 1 }
                }
            }
        }
        assert!(allows > 100 && denies > 100, "{allows} {denies}");
    }

    #[test]
    fn the_shipped_inventory_and_rules_agree() {
        let files = shipped_files_with(&[]);
        let inv = Inventory::parse(files.get("inventory.toml").unwrap(), &TrustDomain::parse("mayfly.local").unwrap())
            .unwrap();
        assert!(inv.entries().iter().any(|e| e.environment == "ci"));
        assert!(engine().exceptions().iter().all(|e| !e.owner.is_empty()));
    }
}
