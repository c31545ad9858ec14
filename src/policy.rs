//! Issuance policy: the Cedar schema and rules of one release, validated, indexed, and
//! deciding. `Engine::decide` is pure and synchronous: no I/O, no clock read (time is passed
//! in). A `Grant` can only be built here, so nothing can be minted without an allow.
//!
//! Rule annotations: every rule has `@id("...")`; every permit has `@max_ttl("...")` (the
//! grant's ceiling); every forbid has `@reason("...")` (what the denied caller is told, so
//! they can act on it). Rules in `exceptions/` are permits that also carry `@owner` and
//! `@expires("YYYY-MM-DD")`: after that day they grant nothing.
//!
//! The version is the content digest of the release's files (`bundle::PolicyFiles::version`),
//! the same whether the files came from a directory or a signed bundle.

pub mod activation;
pub mod aws;
pub mod bundle;
pub mod cases;
pub mod engine;
pub mod prove;
pub mod release;
pub mod replay;
pub mod shadow;
pub mod store;

use std::path::PathBuf;

use crate::identity::{InventoryEntry, OidcClaims, Selectors, Ttl, WorkloadId};
use bundle::BundleError;

pub use engine::{Engine, Exception};

#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error(transparent)]
    Files(#[from] BundleError),
    #[error("`{path}`: {why}")]
    Parse { path: PathBuf, why: String },
    #[error("`{path}`: a rule has no @id(\"...\") annotation:\n{rule}")]
    MissingId { path: PathBuf, rule: String },
    #[error("`{path}`: permit rule `{id}` needs @max_ttl(\"...\") (e.g. \"1h\"): {why}")]
    MaxTtl { path: PathBuf, id: String, why: String },
    #[error("`{path}`: forbid rule `{id}` needs @reason(\"...\"): what a denied caller should know or do")]
    Reason { path: PathBuf, id: String },
    #[error("rule id `{id}` is used twice (second time in `{path}`)")]
    DuplicateId { path: PathBuf, id: String },
    #[error("the rules do not validate against schema.cedarschema:\n{0}")]
    Validation(String),
    #[error("`{path}`: exception `{id}` {why}")]
    Exception { path: PathBuf, id: String, why: String },
    #[error("the release has no issuance rules (issuance/*.cedar)")]
    Empty,
}

/// The credential kinds policy can grant. Each is a Cedar action `Mayfly::Action::"issue_<kind>"`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CredentialKind {
    X509,
    Jwt,
    Aws,
    /// A WIT-SVID: a JWT bound to a key mayfly makes for the workload (`cnf.jwk`).
    Wit,
}

impl CredentialKind {
    pub fn as_str(&self) -> &'static str {
        match self {
            CredentialKind::X509 => "x509",
            CredentialKind::Jwt => "jwt",
            CredentialKind::Aws => "aws",
            CredentialKind::Wit => "wit",
        }
    }

    pub fn from_action(action: &str) -> Option<Self> {
        match action {
            "issue_x509" => Some(Self::X509),
            "issue_jwt" => Some(Self::Jwt),
            "issue_aws" => Some(Self::Aws),
            "issue_wit" => Some(Self::Wit),
            _ => None,
        }
    }
}

/// An IAM role ARN, split into the parts policy can test (`resource.account`, `resource.name`).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct AwsRole {
    arn: String,
    account: String,
    name: String,
}

impl AwsRole {
    /// `arn:<partition>:iam::<12-digit account>:role/[<path>/]<name>`.
    pub fn parse(arn: &str) -> Result<Self, String> {
        let bad = |why: &str| format!("`{arn}` is not an IAM role ARN: {why}");
        let parts: Vec<&str> = arn.splitn(6, ':').collect();
        let [scheme, partition, service, region, account, resource] = parts.as_slice() else {
            return Err(bad("expected arn:aws:iam::<account>:role/<name>"));
        };
        if *scheme != "arn" || partition.is_empty() || *service != "iam" || !region.is_empty() {
            return Err(bad("expected arn:<partition>:iam::…"));
        }
        if account.len() != 12 || !account.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad("the account must be 12 digits"));
        }
        let path = resource.strip_prefix("role/").ok_or_else(|| bad("not a role"))?;
        let name = path.rsplit('/').next().unwrap_or_default();
        let name_ok = !name.is_empty()
            && name.len() <= 64
            && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"+=,.@_-".contains(&b));
        if !name_ok {
            return Err(bad("the role name must be 1-64 of A-Z a-z 0-9 +=,.@_-"));
        }
        Ok(Self { arn: arn.to_owned(), account: (*account).to_owned(), name: name.to_owned() })
    }

    pub fn arn(&self) -> &str {
        &self.arn
    }

    /// The role name, without its path.
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn account(&self) -> &str {
        &self.account
    }
}

/// What a credential is for: the Cedar resource of the request.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Resource {
    X509,
    /// A JWT for this audience.
    Jwt {
        audience: String,
    },
    /// AWS credentials of this role.
    Aws {
        role: AwsRole,
    },
    /// A WIT-SVID (`Mayfly::CredentialKind::"wit"`).
    Wit,
}

impl Resource {
    pub fn kind(&self) -> CredentialKind {
        match self {
            Resource::X509 => CredentialKind::X509,
            Resource::Jwt { .. } => CredentialKind::Jwt,
            Resource::Aws { .. } => CredentialKind::Aws,
            Resource::Wit => CredentialKind::Wit,
        }
    }

    /// The resource as a person reads it in a decision record.
    pub fn describe(&self) -> String {
        match self {
            Resource::X509 => "x509".into(),
            Resource::Jwt { audience } => format!("audience {audience}"),
            Resource::Aws { role } => format!("role {}", role.arn),
            Resource::Wit => "wit".into(),
        }
    }
}

/// What the request says beyond who is asking: its stated purpose and target, the
/// break-glass flag and ticket, and the id-token claims it came with (OIDC callers).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RequestContext {
    pub purpose: Option<String>,
    pub target: Option<String>,
    pub break_glass: bool,
    pub ticket: Option<String>,
    pub oidc: Option<OidcClaims>,
}

/// What the caller asked for, after attestation and the inventory lookup.
#[derive(Debug)]
pub struct DecisionRequest<'a> {
    pub workload: &'a InventoryEntry,
    /// How the caller was attested: `unix` (kernel peer credentials) or `oidc` (an id-token).
    pub attestation: &'a str,
    pub selectors: &'a Selectors,
    pub resource: &'a Resource,
    pub requested_ttl: Ttl,
    pub context: &'a RequestContext,
    /// JWT audiences the daemon keeps for itself (its own STS assertions): denied by the
    /// built-in rule `mayfly-reserved-audience`, whatever the release says.
    pub reserved_audiences: &'a [String],
}

/// The built-in rule that denies a JWT for an audience the daemon keeps for itself.
pub const RESERVED_AUDIENCE_RULE: &str = "mayfly-reserved-audience";

/// Permission to mint exactly this: one identity, one resource, at most this lifetime.
/// Made only by `Engine::decide`, not `Clone`: a minter takes it by value, so one grant
/// mints one credential.
#[derive(Debug, PartialEq, Eq)]
pub struct Grant {
    identity: WorkloadId,
    resource: Resource,
    ttl: Ttl,
    /// For an AWS role: the session policy, tags and ceiling the permitting rules set.
    aws: Option<Box<aws::AwsGrant>>,
    /// The rule whose `@max_ttl` made `ttl` shorter than the request, if one did.
    clamped_by: Option<String>,
}

impl Grant {
    /// The rule whose `@max_ttl` cut the requested lifetime down, if the request asked for
    /// more than the rules allow.
    pub fn clamped_by(&self) -> Option<&str> {
        self.clamped_by.as_deref()
    }

    pub fn identity(&self) -> &WorkloadId {
        &self.identity
    }

    pub fn kind(&self) -> CredentialKind {
        self.resource.kind()
    }

    pub fn resource(&self) -> &Resource {
        &self.resource
    }

    /// The lifetime to mint: the request, capped by the largest `@max_ttl` among the live
    /// permitting rules (permits are a union; forbids still deny outright).
    pub fn ttl(&self) -> Ttl {
        self.ttl
    }

    /// The AWS shape of a role grant (`None` for other kinds).
    pub fn aws(&self) -> Option<&aws::AwsGrant> {
        self.aws.as_deref()
    }

    #[cfg(test)]
    pub(crate) fn for_tests(identity: WorkloadId, ttl: Ttl) -> Self {
        Self { identity, resource: Resource::X509, ttl, aws: None, clamped_by: None }
    }

    #[cfg(test)]
    pub(crate) fn wit_for_tests(identity: WorkloadId, ttl: Ttl) -> Self {
        Self { identity, resource: Resource::Wit, ttl, aws: None, clamped_by: None }
    }

    #[cfg(test)]
    pub(crate) fn jwt_for_tests(identity: WorkloadId, audience: &str, ttl: Ttl) -> Self {
        Self { identity, resource: Resource::Jwt { audience: audience.into() }, ttl, aws: None, clamped_by: None }
    }

    #[cfg(test)]
    pub(crate) fn aws_for_tests(identity: WorkloadId, role: &str, ttl: Ttl, aws: aws::AwsGrant) -> Self {
        let role = AwsRole::parse(role).unwrap();
        Self { identity, resource: Resource::Aws { role }, ttl, aws: Some(Box::new(aws)), clamped_by: None }
    }
}

/// Permission to mint one JWT for several audiences: each audience was granted on its own
/// to the same identity, and the token lives no longer than the shortest of those grants.
/// Built only from `Grant`s (consuming them), so a JWT cannot carry an audience policy did
/// not allow.
#[derive(Debug, PartialEq, Eq)]
pub struct JwtGrant {
    identity: WorkloadId,
    audiences: Vec<String>,
    ttl: Ttl,
}

impl JwtGrant {
    /// `None` unless there is at least one grant, all are JWT grants, and all name one identity.
    pub fn join(grants: Vec<Grant>) -> Option<Self> {
        let ttl = grants.iter().map(|g| g.ttl).min()?;
        let mut grants = grants.into_iter();
        let first = grants.next()?;
        let Resource::Jwt { audience } = first.resource else { return None };
        let mut audiences = vec![audience];
        for g in grants {
            match g.resource {
                Resource::Jwt { audience } if g.identity == first.identity => audiences.push(audience),
                _ => return None,
            }
        }
        Some(Self { identity: first.identity, audiences, ttl })
    }

    pub fn identity(&self) -> &WorkloadId {
        &self.identity
    }

    pub fn audiences(&self) -> &[String] {
        &self.audiences
    }

    pub fn ttl(&self) -> Ttl {
        self.ttl
    }
}

#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    Allow(Grant),
    Deny,
}

/// A decision and why: the ids of the rules that decided (permits for an allow, forbids
/// for a deny; none when nothing permitted), the forbids' reasons, evaluation errors (for
/// the ledger, not the caller), and the release version.
#[derive(Debug, PartialEq, Eq)]
pub struct Decision {
    pub verdict: Verdict,
    pub rules: Vec<String>,
    pub reasons: Vec<String>,
    pub errors: Vec<String>,
    pub policy_version: String,
    /// An allowed break-glass request a deciding rule says needs a second person's approval.
    pub needs_approval: bool,
}

impl Decision {
    /// The grant of an allow (consumed: it mints once).
    pub fn into_grant(self) -> Option<Grant> {
        match self.verdict {
            Verdict::Allow(g) => Some(g),
            Verdict::Deny => None,
        }
    }

    pub fn is_allow(&self) -> bool {
        matches!(self.verdict, Verdict::Allow(_))
    }

    /// One line for the caller and the ledger: the deciding rules and, on a deny, what to
    /// do about it. Names rule ids, never evaluation internals.
    pub fn explain(&self) -> String {
        match (&self.verdict, self.rules.is_empty()) {
            (Verdict::Allow(g), _) => format!("allowed by {} (ttl {})", self.rules.join(", "), g.ttl()),
            (Verdict::Deny, false) => {
                let reasons =
                    if self.reasons.is_empty() { String::new() } else { format!(": {}", self.reasons.join("; ")) };
                format!("denied by {}{reasons}", self.rules.join(", "))
            }
            (Verdict::Deny, true) => {
                let hint =
                    if self.reasons.is_empty() { String::new() } else { format!(" ({})", self.reasons.join("; ")) };
                format!(
                    "denied: no rule permits this request{hint}; ask the identity's owner to add a permit to policies/issuance/ or check the inventory entry"
                )
            }
        }
    }
}

/// The decisions of one request's resources (JWT audiences) taken together: allowed only
/// if each is; the grant lives no longer than the shortest; every deciding rule; why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Combined {
    pub allowed: bool,
    pub granted_ttl_secs: Option<u64>,
    /// Every rule that decided any of them, sorted.
    pub rules: Vec<String>,
    /// An allow: every decision's explanation; a deny: the denying ones'.
    pub explain: String,
}

impl Combined {
    pub fn of(decisions: &[Decision]) -> Self {
        let allowed = !decisions.is_empty() && decisions.iter().all(Decision::is_allow);
        let mut rules: Vec<String> = decisions.iter().flat_map(|d| d.rules.iter().cloned()).collect();
        rules.sort();
        rules.dedup();
        let explain =
            decisions.iter().filter(|d| allowed || !d.is_allow()).map(Decision::explain).collect::<Vec<_>>().join("; ");
        let granted_ttl_secs = decisions
            .iter()
            .filter_map(|d| match &d.verdict {
                Verdict::Allow(g) => Some(g.ttl().as_secs()),
                Verdict::Deny => None,
            })
            .min()
            .filter(|_| allowed);
        Self { allowed, granted_ttl_secs, rules, explain }
    }
}

/// The shipped policies/ files with some replaced (`Some`) or removed (`None`), for tests.
#[cfg(test)]
pub(crate) fn shipped_files_with(changes: &[(&str, Option<&str>)]) -> bundle::PolicyFiles {
    let mut files: std::collections::BTreeMap<String, String> =
        bundle::PolicyFiles::read_dir(&std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("policies"))
            .unwrap()
            .iter()
            .map(|(p, t)| (p.to_owned(), t.to_owned()))
            .collect();
    for (path, text) in changes {
        match text {
            Some(t) => files.insert((*path).to_owned(), (*t).to_owned()),
            None => files.remove(*path),
        };
    }
    bundle::PolicyFiles::from_map(files)
}
