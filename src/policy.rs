//! Issuance policy: loads the Cedar schema and rules from `policies/`, validates them, and
//! decides. `Engine::decide` is pure and synchronous: no I/O, no clock read (time is passed
//! in). A `Grant` can only be built here, so nothing can be minted without an allow.
//!
//! Every permit rule carries `@id("...")` and `@max_ttl("...")`; forbid rules carry `@id`.
//! Rules in `exceptions/` are permits that also carry `@owner` and `@expires("YYYY-MM-DD")`:
//! after that day they grant nothing.
//! The bundle version is the SHA-256 of the files the engine was built from.

pub mod cases;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::SystemTime;

use cedar_policy::{
    Authorizer, Context, Effect, Entities, Entity, EntityId, EntityTypeName, EntityUid, PolicyId, PolicySet,
    Request, RestrictedExpression, Schema, ValidationMode, Validator,
};

use crate::clock::unix_secs;
use crate::identity::{InventoryEntry, Selectors, Ttl, WorkloadId};

#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("cannot read `{path}`: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("`{path}`: {why}")]
    Parse { path: PathBuf, why: String },
    #[error("`{path}`: a rule has no @id(\"...\") annotation:\n{rule}")]
    MissingId { path: PathBuf, rule: String },
    #[error("`{path}`: permit rule `{id}` needs @max_ttl(\"...\") (e.g. \"1h\"): {why}")]
    MaxTtl { path: PathBuf, id: String, why: String },
    #[error("rule id `{id}` is used twice (second time in `{path}`)")]
    DuplicateId { path: PathBuf, id: String },
    #[error("the rules do not validate against schema.cedarschema:\n{0}")]
    Validation(String),
    #[error("`{path}`: exception `{id}` {why}")]
    Exception { path: PathBuf, id: String, why: String },
    #[error("`{dir}` has no issuance rules (issuance/*.cedar)")]
    Empty { dir: PathBuf },
}

/// The credential kinds policy can grant. Each is a Cedar action `Mayfly::Action::"issue_<kind>"`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CredentialKind {
    X509,
}

impl CredentialKind {
    pub fn as_str(&self) -> &'static str {
        match self {
            CredentialKind::X509 => "x509",
        }
    }
}

/// What the caller asked for, after attestation and the inventory lookup.
#[derive(Debug)]
pub struct DecisionRequest<'a> {
    pub workload: &'a InventoryEntry,
    pub selectors: &'a Selectors,
    pub kind: CredentialKind,
    pub requested_ttl: Ttl,
}

/// Permission to mint exactly this: one identity, one kind, at most this lifetime.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Grant {
    identity: WorkloadId,
    kind: CredentialKind,
    ttl: Ttl,
}

impl Grant {
    pub fn identity(&self) -> &WorkloadId {
        &self.identity
    }

    pub fn kind(&self) -> CredentialKind {
        self.kind
    }

    /// The lifetime to mint: the request, capped by the largest `@max_ttl` among the live
    /// permitting rules (permits are a union; forbids still deny outright).
    pub fn ttl(&self) -> Ttl {
        self.ttl
    }

    #[cfg(test)]
    pub(crate) fn for_tests(identity: WorkloadId, ttl: Ttl) -> Self {
        Self { identity, kind: CredentialKind::X509, ttl }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    Allow(Grant),
    Deny,
}

/// A decision and why: the ids of the rules that decided (permits for an allow, forbids
/// for a deny; none when nothing permitted), evaluation errors, and the bundle version.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    pub verdict: Verdict,
    pub rules: Vec<String>,
    pub errors: Vec<String>,
    pub policy_version: String,
}

impl Decision {
    pub fn is_allow(&self) -> bool {
        matches!(self.verdict, Verdict::Allow(_))
    }

    /// One line for the caller and the ledger.
    pub fn explain(&self) -> String {
        match (&self.verdict, self.rules.is_empty()) {
            (Verdict::Allow(g), _) => format!("allowed by {} (ttl {})", self.rules.join(", "), g.ttl()),
            (Verdict::Deny, false) => format!("denied by {}", self.rules.join(", ")),
            (Verdict::Deny, true) if !self.errors.is_empty() => {
                format!("denied: no rule permits ({})", self.errors.join("; "))
            }
            (Verdict::Deny, true) => "denied: no rule permits this request".to_owned(),
        }
    }
}

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

pub struct Engine {
    exceptions: HashMap<String, Exception>,
    policies: PolicySet,
    schema: Schema,
    max_ttl: HashMap<String, Ttl>,
    version: String,
    authorizer: Authorizer,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine").field("version", &self.version).field("rules", &self.max_ttl.len()).finish()
    }
}

const WORKLOAD_TYPE: &str = "Mayfly::Workload";
const KIND_TYPE: &str = "Mayfly::CredentialKind";
const ACTION_TYPE: &str = "Mayfly::Action";

impl Engine {
    /// Loads `dir/schema.cedarschema` and `dir/issuance/*.cedar`, checks every rule has its
    /// annotations and validates against the schema (strict mode).
    pub fn load(dir: &Path) -> Result<Self, PolicyError> {
        let schema_path = dir.join("schema.cedarschema");
        let schema_src = read(&schema_path)?;
        let mut files = BTreeMap::new();
        let issuance = dir.join("issuance");
        let listing = std::fs::read_dir(&issuance).map_err(|source| PolicyError::Read { path: issuance.clone(), source })?;
        for entry in listing {
            let path = entry.map_err(|source| PolicyError::Read { path: issuance.clone(), source })?.path();
            if path.extension().is_some_and(|e| e == "cedar") {
                let text = read(&path)?;
                files.insert(path, text);
            }
        }
        if files.is_empty() {
            return Err(PolicyError::Empty { dir: dir.into() });
        }
        let exceptions = dir.join("exceptions");
        if exceptions.is_dir() {
            let listing =
                std::fs::read_dir(&exceptions).map_err(|source| PolicyError::Read { path: exceptions.clone(), source })?;
            for entry in listing {
                let path = entry.map_err(|source| PolicyError::Read { path: exceptions.clone(), source })?.path();
                if path.extension().is_some_and(|e| e == "cedar") {
                    let text = read(&path)?;
                    files.insert(path, text);
                }
            }
        }
        Self::from_sources(&schema_path, &schema_src, &files)
    }

    pub fn from_sources(
        schema_path: &Path,
        schema_src: &str,
        files: &BTreeMap<PathBuf, String>,
    ) -> Result<Self, PolicyError> {
        let (schema, _warnings) = Schema::from_cedarschema_str(schema_src)
            .map_err(|e| PolicyError::Parse { path: schema_path.into(), why: located(schema_src, &e) })?;
        let validator = Validator::new(schema.clone());
        let mut invalid = Vec::new();
        let mut policies = PolicySet::new();
        let mut max_ttl = HashMap::new();
        let mut exceptions = HashMap::new();
        let mut hasher = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
        hasher.update(schema_src.as_bytes());
        for (path, text) in files {
            hasher.update(path.file_name().map(|n| n.as_encoded_bytes()).unwrap_or_default());
            hasher.update(&(text.len() as u64).to_be_bytes());
            hasher.update(text.as_bytes());
            let set = PolicySet::from_str(text).map_err(|e| PolicyError::Parse { path: path.clone(), why: located(text, &e) })?;
            let mut file_set = PolicySet::new();
            for policy in set.policies() {
                let id = policy
                    .annotation("id")
                    .ok_or_else(|| PolicyError::MissingId { path: path.clone(), rule: policy.to_string() })?
                    .to_owned();
                let in_exceptions = path.parent().and_then(Path::file_name).is_some_and(|n| n == "exceptions");
                if in_exceptions {
                    let exception = |why: &str| PolicyError::Exception { path: path.clone(), id: id.clone(), why: why.into() };
                    if policy.effect() != Effect::Permit {
                        return Err(exception("must be a permit (guardrail forbids are never exceptions)"));
                    }
                    let owner = policy.annotation("owner").filter(|o| !o.trim().is_empty());
                    let owner = owner.ok_or_else(|| exception("needs @owner(\"...\")"))?.to_owned();
                    let expires = policy
                        .annotation("expires")
                        .and_then(|d| time::Date::parse(d, time::macros::format_description!("[year]-[month]-[day]")).ok())
                        .ok_or_else(|| exception("needs @expires(\"YYYY-MM-DD\"), the last day it applies"))?;
                    exceptions.insert(id.clone(), Exception { id: id.clone(), owner, expires, path: path.clone() });
                }
                if policy.effect() == Effect::Permit {
                    let raw = policy.annotation("max_ttl").unwrap_or("");
                    let ttl = Ttl::parse(raw).map_err(|e| PolicyError::MaxTtl {
                        path: path.clone(),
                        id: id.clone(),
                        why: e.to_string(),
                    })?;
                    max_ttl.insert(id.clone(), ttl);
                }
                let policy = policy.new_id(PolicyId::new(&id));
                policies
                    .add(policy.clone())
                    .map_err(|_| PolicyError::DuplicateId { path: path.clone(), id: id.clone() })?;
                file_set.add(policy).map_err(|_| PolicyError::DuplicateId { path: path.clone(), id: id.clone() })?;
            }
            // Strict validation is per rule, so validating file by file loses nothing and lets
            // every error point at its own file, line and rule id.
            for e in validator.validate(&file_set, ValidationMode::Strict).validation_errors() {
                invalid.push(format!("  - `{}`: {}", path.display(), located(text, e)));
            }
        }
        if !invalid.is_empty() {
            return Err(PolicyError::Validation(invalid.join("\n")));
        }
        let version = format!("sha256:{}", &hex::encode(hasher.finish())[..16]);
        Ok(Self { exceptions, policies, schema, max_ttl, version, authorizer: Authorizer::new() })
    }

    pub fn version(&self) -> &str {
        &self.version
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
        let deny = |errors: Vec<String>| Decision {
            verdict: Verdict::Deny,
            rules: vec![],
            errors,
            policy_version: self.version.clone(),
        };
        let (request, entities) = match self.build(req, now) {
            Ok(parts) => parts,
            Err(why) => return deny(vec![why]),
        };
        let response = self.authorizer.is_authorized(&request, &self.policies, &entities);
        let mut rules: Vec<String> = response.diagnostics().reason().map(ToString::to_string).collect();
        let mut errors: Vec<String> = response.diagnostics().errors().map(|e| e.to_string()).collect();
        let verdict = match response.decision() {
            cedar_policy::Decision::Allow => {
                // Why: exceptions are permits only, so dropping an expired one from the
                // permitting set is exactly "the rule no longer exists" for this decision.
                let today = crate::clock::utc_date(now);
                let (expired, live): (Vec<String>, Vec<String>) =
                    rules.into_iter().partition(|id| self.exceptions.get(id).is_some_and(|e| e.is_expired(today)));
                rules = live;
                // Permits are a union: each one authorises up to its own @max_ttl.
                let ceiling = rules.iter().filter_map(|id| self.max_ttl.get(id)).max().copied();
                match ceiling {
                    Some(max) => Verdict::Allow(Grant {
                        identity: req.workload.id.clone(),
                        kind: req.kind,
                        ttl: req.requested_ttl.min(max),
                    }),
                    None if !expired.is_empty() => {
                        errors.extend(expired.iter().map(|id| {
                            let until = self.exceptions.get(id).map(|e| e.expires.to_string()).unwrap_or_default();
                            format!("exception `{id}` expired after {until}")
                        }));
                        Verdict::Deny
                    }
                    // Why: an allow can only come from a permit, and every permit has a max_ttl
                    // (checked at load); deny rather than mint without a ceiling.
                    None => return deny(vec!["permitting rule has no max_ttl".into()]),
                }
            }
            cedar_policy::Decision::Deny => Verdict::Deny,
        };
        Decision { verdict, rules, errors, policy_version: self.version.clone() }
    }

    fn build(&self, req: &DecisionRequest<'_>, now: SystemTime) -> Result<(Request, Entities), String> {
        let uid = |ty: &str, id: &str| -> Result<EntityUid, String> {
            let ty = EntityTypeName::from_str(ty).map_err(|e| e.to_string())?;
            Ok(EntityUid::from_type_name_and_id(ty, EntityId::new(id)))
        };
        let principal = uid(WORKLOAD_TYPE, req.workload.id.as_str())?;
        let action = uid(ACTION_TYPE, &format!("issue_{}", req.kind.as_str()))?;
        let resource = uid(KIND_TYPE, req.kind.as_str())?;
        let s = |v: &str| RestrictedExpression::new_string(v.to_owned());
        let attrs = HashMap::from([
            ("owner".to_owned(), s(&req.workload.owner)),
            ("purpose".to_owned(), s(&req.workload.purpose)),
            ("trust_domain".to_owned(), s(req.workload.id.trust_domain())),
            ("path".to_owned(), s(req.workload.id.path())),
        ]);
        let workload = Entity::new(principal.clone(), attrs, HashSet::new()).map_err(|e| e.to_string())?;
        let kind = Entity::new_no_attrs(resource.clone(), HashSet::new());
        let entities = Entities::from_entities([workload, kind], Some(&self.schema)).map_err(|e| e.to_string())?;
        let ttl = i64::try_from(req.requested_ttl.as_secs()).map_err(|e| e.to_string())?;
        let context = Context::from_pairs([
            ("requested_ttl_secs".to_owned(), RestrictedExpression::new_long(ttl)),
            ("now_unix".to_owned(), RestrictedExpression::new_long(unix_secs(now))),
            ("selectors".to_owned(), RestrictedExpression::new_set(req.selectors.iter().map(|x| s(x.as_str())))),
        ])
        .map_err(|e| e.to_string())?;
        let request = Request::new(principal, action, resource, context, Some(&self.schema)).map_err(|e| e.to_string())?;
        Ok((request, entities))
    }
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
            let before = &src[..o];
            let line = before.matches('\n').count() + 1;
            let column = o - before.rfind('\n').map_or(0, |i| i + 1) + 1;
            format!("{message} (line {line}, column {column})")
        }
        None => message,
    }
}

fn read(path: &Path) -> Result<String, PolicyError> {
    std::fs::read_to_string(path).map_err(|source| PolicyError::Read { path: path.into(), source })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::Selector;

    fn engine() -> Engine {
        Engine::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("policies")).unwrap()
    }

    fn workload(id: &str) -> InventoryEntry {
        InventoryEntry {
            id: WorkloadId::parse(id).unwrap(),
            owner: "team".into(),
            purpose: "test".into(),
            expires: time::macros::date!(2030 - 01 - 01),
            selectors: Selectors::new(),
        }
    }

    fn decide(e: &Engine, ttl: &str) -> Decision {
        let w = workload("spiffe://mayfly.local/dev/quickstart");
        let selectors: Selectors = [Selector::parse("unix:uid:1000").unwrap()].into();
        let req = DecisionRequest { workload: &w, selectors: &selectors, kind: CredentialKind::X509, requested_ttl: Ttl::parse(ttl).unwrap() };
        e.decide(&req, SystemTime::now())
    }

    #[test]
    fn shipped_policy_allows_local_x509_and_clamps_to_the_rule_maximum() {
        let d = decide(&engine(), "2h");
        let Verdict::Allow(grant) = &d.verdict else { panic!("{d:?}") };
        assert_eq!(grant.ttl().as_secs(), 3600);
        assert_eq!(d.rules, vec!["local-workloads-x509"]);
        assert!(d.policy_version.starts_with("sha256:"));
    }

    #[test]
    fn guardrail_forbid_names_its_rule() {
        let d = decide(&engine(), "13h");
        assert_eq!(d.verdict, Verdict::Deny);
        assert_eq!(d.rules, vec!["forbid-ttl-over-12h"]);
        assert!(d.explain().contains("forbid-ttl-over-12h"));
    }

    fn with_exception(exception: &str) -> Result<Engine, PolicyError> {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("policies");
        let schema = std::fs::read_to_string(dir.join("schema.cedarschema")).unwrap();
        let guardrails = std::fs::read_to_string(dir.join("issuance/guardrails.cedar")).unwrap();
        Engine::from_sources(
            Path::new("s"),
            &schema,
            &BTreeMap::from([
                (PathBuf::from("issuance/guardrails.cedar"), guardrails),
                (PathBuf::from("exceptions/x.cedar"), exception.to_owned()),
            ]),
        )
    }

    const EXCEPTION: &str = r#"@id("exc") @owner("team") @expires("2027-03-31") @max_ttl("2h")
        permit(principal, action == Mayfly::Action::"issue_x509", resource);"#;

    #[test]
    fn an_exception_grants_until_its_last_day_and_nothing_after() {
        let e = with_exception(EXCEPTION).unwrap();
        let w = workload("spiffe://mayfly.local/dev/quickstart");
        let selectors = Selectors::new();
        let req = DecisionRequest { workload: &w, selectors: &selectors, kind: CredentialKind::X509, requested_ttl: Ttl::parse("2h").unwrap() };
        let at = |s: &str| SystemTime::from(time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).unwrap());
        let during = e.decide(&req, at("2027-03-31T23:59:59Z"));
        assert!(matches!(&during.verdict, Verdict::Allow(g) if g.ttl().as_secs() == 7200), "{during:?}");
        assert_eq!(during.rules, vec!["exc"]);
        let after = e.decide(&req, at("2027-04-01T00:00:00Z"));
        assert_eq!(after.verdict, Verdict::Deny);
        assert!(after.explain().contains("exception `exc` expired after 2027-03-31"), "{}", after.explain());
        // Guardrails still win while it lasts.
        let long = DecisionRequest { requested_ttl: Ttl::parse("13h").unwrap(), ..req };
        assert_eq!(e.decide(&long, at("2027-01-01T00:00:00Z")).rules, vec!["forbid-ttl-over-12h"]);
    }

    #[test]
    fn exceptions_need_an_owner_an_expiry_and_must_be_permits() {
        let no_owner = EXCEPTION.replace("@owner(\"team\") ", "");
        assert!(with_exception(&no_owner).unwrap_err().to_string().contains("@owner"));
        let bad_date = EXCEPTION.replace("2027-03-31", "next spring");
        assert!(with_exception(&bad_date).unwrap_err().to_string().contains("@expires"));
        let forbid = r#"@id("f") @owner("t") @expires("2027-01-01") forbid(principal, action, resource);"#;
        assert!(with_exception(forbid).unwrap_err().to_string().contains("must be a permit"));
    }

    #[test]
    fn rules_without_annotations_or_off_schema_are_refused() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("policies");
        let schema = std::fs::read_to_string(dir.join("schema.cedarschema")).unwrap();
        let p = Path::new("x.cedar");
        let load = |rule: &str| Engine::from_sources(Path::new("s"), &schema, &BTreeMap::from([(p.to_path_buf(), rule.to_owned())]));
        assert!(matches!(load("permit(principal, action, resource);"), Err(PolicyError::MissingId { .. })));
        assert!(matches!(load("@id(\"a\") permit(principal, action, resource);"), Err(PolicyError::MaxTtl { .. })));
        assert!(matches!(
            load("@id(\"a\") @max_ttl(\"1h\") permit(principal, action, resource) when { principal.nope == 1 };"),
            Err(PolicyError::Validation(_))
        ));
    }
}
