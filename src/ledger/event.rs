//! The ledger's schema as types: one `Event` enum, a variant per stored `kind`, each with a
//! serde payload struct that maps onto the stored JSON body. Writers build an `Event`;
//! readers decode a stored row back into one. Ledgers written before these types existed
//! decode too: every field a later release added is optional (`#[serde(default)]`), unknown
//! fields are ignored, and field names are the ones those ledgers used.
//!
//! Holds no secrets by construction: no payload has a field for a key, a token or a secret
//! access key — fingerprints, serials, jtis, access key ids and session names only.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::EventId;

/// Declares `Event`, `EventKind` and the mapping between them and the stored `kind`.
macro_rules! events {
    ($( $(#[$doc:meta])* $variant:ident($payload:ty) = $kind:literal, )*) => {
        /// One ledger event, typed.
        #[derive(Clone, Debug, PartialEq)]
        pub enum Event {
            $( $(#[$doc])* $variant($payload), )*
        }

        /// The stored `kind` of an event, for filtering reads.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum EventKind {
            $( $(#[$doc])* $variant, )*
        }

        impl EventKind {
            pub const ALL: &[EventKind] = &[$(EventKind::$variant),*];

            /// The stored name (the `kind` column).
            pub fn as_str(self) -> &'static str {
                match self {
                    $( EventKind::$variant => $kind, )*
                }
            }

            pub fn parse(kind: &str) -> Option<Self> {
                match kind {
                    $( $kind => Some(EventKind::$variant), )*
                    _ => None,
                }
            }
        }

        impl Event {
            pub fn kind(&self) -> EventKind {
                match self {
                    $( Event::$variant(_) => EventKind::$variant, )*
                }
            }

            /// The stored body: the payload as compact JSON.
            pub fn body(&self) -> Result<String, serde_json::Error> {
                match self {
                    $( Event::$variant(p) => serde_json::to_string(p), )*
                }
            }

            /// A stored (`kind`, body) back into its event.
            pub fn decode(kind: &str, body: &str) -> Result<Self, DecodeError> {
                let invalid = |e: serde_json::Error| DecodeError::Body { kind: kind.to_owned(), why: e.to_string() };
                match kind {
                    $( $kind => serde_json::from_str(body).map(Event::$variant).map_err(invalid), )*
                    other => Err(DecodeError::UnknownKind(other.to_owned())),
                }
            }
        }

        $(
            impl From<$payload> for Event {
                fn from(p: $payload) -> Self {
                    Event::$variant(p)
                }
            }
        )*
    };
}

events! {
    /// A decision on a credential request: allowed or denied, by which rules, under which
    /// release, for whom, with the request itself (for replay).
    Decision(Decision) = "decision",
    /// A credential was handed out; carries the credential-table row.
    Issued(Issued) = "issued",
    /// A credential was presented and checked (a JWT-SVID validation, an introspection).
    Used(Used) = "used",
    /// A credential passed its not-after (the removal half of its lifecycle).
    Expired(Expired) = "expired",
    /// Credentials taken back before their expiry, with who and why.
    Revoked(Revoked) = "revoked",
    /// An identity (or prefix) may get no new credential.
    Locked(Locked) = "locked",
    Unlocked(Unlocked) = "unlocked",
    /// A step of the emergency path beyond decision and issuance: pending, approved,
    /// denied, refused (elevated sink), reviewed.
    BreakGlass(BreakGlassStep) = "break_glass",
    PolicyActivated(PolicyActivated) = "policy_activated",
    PolicyRejected(PolicyRejected) = "policy_rejected",
    PolicyRolledBack(PolicyRolledBack) = "policy_rolled_back",
    /// Shadow mode started or stopped for a candidate release.
    PolicyShadow(PolicyShadow) = "policy_shadow",
    /// A live request the shadow candidate would decide differently (never acted on).
    PolicyShadowDiff(PolicyShadowDiff) = "policy_shadow_diff",
    /// A candidate release was checked before promotion (replay, proof, promote-check).
    PolicyCheck(PolicyCheck) = "policy_check",
    /// An admin call (operator, what it asked): every one is recorded, refused ones too.
    Admin(Admin) = "admin",
    /// A new X.509 CA became the signer (the old one stays in the bundle until its SVIDs expire).
    CaRotated(CaRotated) = "ca_rotated",
    /// New CA files on disk were not usable; the current CA keeps signing.
    CaRejected(CaRejected) = "ca_rejected",
    /// A new JWT signing key took over (the old one stays in the JWKS until its tokens expire).
    JwtKeyRotated(JwtKeyRotated) = "jwt_key_rotated",
    /// A new JWT key file was not usable; the current key keeps signing.
    JwtKeyRejected(JwtKeyRejected) = "jwt_key_rejected",
    DaemonStarted(DaemonStarted) = "daemon_started",
    DaemonStopped(DaemonStopped) = "daemon_stopped",
    /// An AWS revocation deny was deleted from a role: every session it caught has expired.
    AwsDenyRemoved(AwsDenyRemoved) = "aws_deny_removed",
    /// A reload (SIGHUP): what was applied, what needs a restart, what failed.
    ConfigReloaded(ConfigReloaded) = "config_reloaded",
    /// One caller's refusals of one window that were counted rather than written one by
    /// one: repeats of refusals recorded in full, the ones beyond those, and requests a
    /// limit refused (`issue::refusals`).
    Refusals(Refusals) = "refusals",
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("unknown event kind `{0}`")]
    UnknownKind(String),
    #[error("`{kind}` event body does not decode: {why}")]
    Body { kind: String, why: String },
}

/// A row of the credential table, written in the same transaction as its `issued` event
/// (whose body carries the same fields).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CredentialRecord {
    pub id: String,
    pub kind: String,
    pub identity: String,
    /// X.509: the certificate serial (hex); JWT: the jti; AWS: the access key id.
    pub serial: String,
    pub fingerprint: String,
    pub not_before: i64,
    pub not_after: i64,
    pub decision_id: EventId,
    /// Issued on the emergency path: the `issued` event's `break_glass` detail, kept in the
    /// table too so start-up finds the flagged few through an index, not by reading every
    /// `issued` event. Never serialized here (the event body has it once, in its details).
    #[serde(skip)]
    pub break_glass: bool,
}

/// Who made a request or a call: a local process (peer credentials and what `/proc` said),
/// the holder of a verified id-token (its provenance), or a remote address. Only the facts
/// known are written.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Caller {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub uid: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gid: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pid: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exe: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub container: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub oidc: Option<Provenance>,
    /// The TLS peer address (the exchange, introspection).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub remote: Option<String>,
    /// The `iss` an id-token that failed verification claimed (unverified, for the record).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub claimed_issuer: Option<String>,
    /// Set when the daemon itself acts (e.g. shadow mode ending at a stop).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub daemon: Option<String>,
}

impl Caller {
    /// A local process by its peer credentials.
    pub fn local(uid: u32, gid: u32, pid: Option<i32>) -> Self {
        Self { uid: Some(uid), gid: Some(gid), pid, ..Self::default() }
    }

    /// A field by the name revocation selectors use (`repository`, `uid`, `exe`, …).
    pub fn field(&self, key: &str) -> Option<String> {
        let own = match key {
            "uid" => self.uid.map(|v| v.to_string()),
            "gid" => self.gid.map(|v| v.to_string()),
            "pid" => self.pid.map(|v| v.to_string()),
            "exe" => self.exe.clone(),
            "sha256" => self.sha256.clone(),
            "container" => self.container.clone(),
            "remote" => self.remote.clone(),
            _ => None,
        };
        own.or_else(|| self.oidc.as_ref().and_then(|p| p.field(key)))
    }
}

/// Where a token caller's request came from: the CI run that asked (no token, only facts).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Provenance {
    pub issuer: Option<String>,
    pub subject: Option<String>,
    pub repository: Option<String>,
    #[serde(rename = "ref")]
    pub git_ref: Option<String>,
    pub sha: Option<String>,
    pub workflow: Option<String>,
    pub run_id: Option<String>,
    pub event_name: Option<String>,
    pub environment: Option<String>,
    /// The id-token's `jti` (the replay cache's key), never the token.
    pub jti: Option<String>,
}

impl Provenance {
    pub fn field(&self, key: &str) -> Option<String> {
        match key {
            "issuer" => self.issuer.clone(),
            "subject" => self.subject.clone(),
            "repository" => self.repository.clone(),
            "ref" => self.git_ref.clone(),
            "sha" => self.sha.clone(),
            "workflow" => self.workflow.clone(),
            "run_id" => self.run_id.clone(),
            "event_name" => self.event_name.clone(),
            "environment" => self.environment.clone(),
            _ => None,
        }
    }
}

/// An operator's identity on an admin call (peer credentials on the admin socket).
pub type Operator = Caller;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    Allow,
    #[default]
    Deny,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Decision {
    /// `issue_x509`, `issue_jwt`, `issue_aws`.
    pub action: String,
    /// What was asked for, described (`x509-svid`, `audience db`, `role arn:…`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resource: Option<String>,
    pub outcome: Verdict,
    pub reason: String,
    /// The rules that decided (permits on an allow, forbids or none on a deny).
    pub rules: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<String>,
    pub policy_version: String,
    pub identity: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub purpose: Option<String>,
    pub caller: Caller,
    pub requested_ttl_secs: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub granted_ttl_secs: Option<u64>,
    pub api: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rotates: Option<String>,
    pub break_glass: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ticket: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub justification: Option<String>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub needs_approval: bool,
    /// What policy was (or would have been) asked, for `mayfly policy replay`; absent for
    /// refusals before the inventory (attestation, invalid tokens) and for locks.
    pub request: Option<RequestRecord>,
}

impl Decision {
    pub fn is_allow(&self) -> bool {
        self.outcome == Verdict::Allow
    }
}

/// A request as policy saw it: enough to decide it again under another release. No
/// secrets: selectors and verified claims only, never a token.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct RequestRecord {
    /// `unix` or `oidc`.
    pub attestation: String,
    pub selectors: Vec<String>,
    pub resources: Vec<ResourceRecord>,
    pub requested_ttl_secs: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub spiffe_id: Option<String>,
    /// The verified id-token's typed claims (`OidcClaims` field names).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub oidc: Option<Map<String, Value>>,
    pub break_glass: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ticket: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub purpose: Option<String>,
    /// `mayfly dev` made the identity for an unregistered token subject.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub dev_identity: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ResourceRecord {
    X509,
    Wit,
    Jwt { audience: String },
    Aws { role: String },
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Issued {
    #[serde(flatten)]
    pub credential: CredentialRecord,
    #[serde(flatten)]
    pub details: IssuedDetails,
}

impl Issued {
    /// The credential-table row this event stands for (the break-glass flag from its details).
    pub fn row(&self) -> CredentialRecord {
        CredentialRecord { break_glass: self.details.break_glass, ..self.credential.clone() }
    }
}

/// What an auditor needs beyond the credential row: a token caller's provenance, the
/// break-glass facts, an AWS session's shape.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct IssuedDetails {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub provenance: Option<Provenance>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub break_glass: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ticket: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub justification: Option<String>,
    /// The approved break-glass request this was issued for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub approved_by: Option<Operator>,
    /// A WIT-SVID: the RFC 7638 thumbprint of the key it binds (`cnf.jwk`), never the key.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cnf_jkt: Option<String>,
    #[serde(flatten)]
    pub aws: AwsSessionRecord,
}

/// An AWS session as recorded: never the secret key or the session token.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct AwsSessionRecord {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role_arn: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub assumed_role_arn: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub access_key_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub session_name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source_identity: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub duration_seconds: Option<i64>,
    /// Tag keys only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub session_tags: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub session_policy: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sts_mode: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub web_identity_jti: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sts_attempts: Option<u32>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Used {
    pub credential_id: String,
    pub kind: String,
    pub identity: String,
    /// `validate_jwt_svid` or `introspect`.
    #[serde(rename = "use")]
    pub use_kind: String,
    pub audience: Option<String>,
    pub by: Caller,
    /// Why the use was refused although the token verified (`revoked`).
    pub refused: Option<String>,
    pub break_glass: bool,
    /// A WIT-SVID's proof of possession: the accepted Workload Proof Token's `jti`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub proof_jti: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Expired {
    pub credential_id: String,
    pub kind: String,
    pub identity: String,
    pub serial: String,
    pub not_after: i64,
    pub break_glass: bool,
}

/// A credential taken back.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RevokedCredential {
    pub credential_id: String,
    pub kind: String,
    pub identity: String,
    /// X.509: the certificate serial (hex); JWT: the jti.
    pub serial: String,
    pub not_after: i64,
    pub revoked_at: i64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Revoked {
    /// What the responder named (`identity spiffe://…`, `credential …`, …).
    pub target: String,
    pub operator: Operator,
    pub reason: String,
    pub credentials: Vec<RevokedCredential>,
    /// What the AWS hook did, or why it did nothing.
    pub aws: Option<AwsRevocation>,
}

/// The AWS part of a revocation: a deny per role the identity's live sessions are of.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct AwsRevocation {
    pub needed: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub applied: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub why: Option<String>,
    pub denies: Vec<AwsDeny>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub live_sessions: Option<u64>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct AwsDeny {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub credential_id: Option<String>,
    pub role: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub account: Option<String>,
    pub policy_name: Option<String>,
    pub source_identity: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub issued_before: Option<i64>,
    pub remove_after: Option<i64>,
    /// The IAM policy document placed (conditions on SourceIdentity and TokenIssueTime).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub document: Option<Value>,
    pub applied: bool,
    pub error: Option<String>,
}

/// No new credential for an identity (or every identity under a prefix ending in `/`)
/// until unlocked or `until` (Unix seconds) passes.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Lock {
    pub target: String,
    pub until: Option<i64>,
    pub reason: String,
    pub operator: Operator,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Locked {
    pub lock: Lock,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Unlocked {
    pub target: String,
    pub operator: Operator,
    pub reason: String,
}

/// The stages of a break-glass request after its decision.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stage {
    Pending,
    Approved,
    ApprovalRefused,
    #[default]
    Denied,
    /// An elevated sink could not be written: the step did not happen.
    Refused,
    Reviewed,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct BreakGlassStep {
    pub stage: Stage,
    /// Always true: the flag every break-glass record carries.
    pub break_glass: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub decision_id: Option<EventId>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub identity: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub why: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub approver: Option<Operator>,
    /// The approver's reason.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub requester_uid: Option<u32>,
    /// What a review is of (a credential or request id).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reviewer: Option<Operator>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
    /// For `refused`: the stage whose elevated write failed, and what it would have said.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub at_stage: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub event: Option<Value>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct PolicyActivated {
    pub version: String,
    pub label: Option<String>,
    pub signed_by: Option<String>,
    pub unsigned: bool,
    pub source: String,
    pub previous: Option<String>,
    pub rules: usize,
    pub inventory_entries: usize,
    /// `startup`, `watch`, `startup (kept release)`, …
    pub via: String,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct PolicyRejected {
    pub source: String,
    pub reason: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// The release that stays active.
    pub kept: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct PolicyRolledBack {
    pub from: String,
    pub to: String,
    pub to_label: Option<String>,
    pub operator: Operator,
    pub reason: String,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ShadowState {
    #[default]
    Started,
    Stopped,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct PolicyShadow {
    pub shadow: ShadowState,
    pub candidate: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub signed_by: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub active: Option<String>,
    pub operator: Operator,
    pub reason: String,
}

/// A decision's result, recorded or recomputed (replay, shadow mode).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Outcome {
    pub allowed: bool,
    pub identity: Option<String>,
    pub granted_ttl_secs: Option<u64>,
    pub rules: Vec<String>,
    pub reason: String,
}

/// What a replayed (or shadowed) request would do differently.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Change {
    /// Denied before, allowed now: possible privilege escalation.
    NewlyAllowed,
    /// Allowed before, for a longer lifetime now.
    LongerLifetime,
    /// Allowed before, denied now: would break someone.
    NewlyDenied,
    /// Allowed before, for a shorter lifetime now.
    ShorterLifetime,
}

impl Change {
    pub fn is_escalation(self) -> bool {
        matches!(self, Change::NewlyAllowed | Change::LongerLifetime)
    }

    pub fn title(self) -> &'static str {
        match self {
            Change::NewlyAllowed => "NEWLY ALLOWED (possible privilege escalation)",
            Change::LongerLifetime => "LONGER LIFETIME (more than was granted)",
            Change::NewlyDenied => "NEWLY DENIED (would break someone)",
            Change::ShorterLifetime => "SHORTER LIFETIME",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyShadowDiff {
    pub candidate: String,
    pub active: String,
    pub decision_id: Option<EventId>,
    pub change: Change,
    pub escalation: bool,
    pub action: String,
    pub resource: String,
    pub live: Outcome,
    pub shadow: Outcome,
}

/// A check's report as the CLI made it; the fields `policy evidence` reads are typed, the
/// rest is kept as written.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct PolicyCheck {
    pub operator: Operator,
    pub report: CheckReport,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct CheckReport {
    /// `replay`, `proof` or `promote-check`.
    pub check: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub candidate: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub verdict: Option<String>,
    #[serde(flatten)]
    pub rest: Map<String, Value>,
}

impl CheckReport {
    /// The candidate the report is about, wherever the check put it.
    pub fn candidate(&self) -> Option<&str> {
        self.candidate.as_deref().or_else(|| {
            ["replay", "proof"]
                .into_iter()
                .find_map(|k| self.rest.get(k).and_then(|v| v.get("candidate")).and_then(Value::as_str))
        })
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Admin {
    /// The RPC (`revoke`, `policy_status`, `list_credentials`, …).
    pub call: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub operator: Option<Operator>,
    /// Why the call was refused (not an operator, …).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refused: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub uid: Option<u32>,
    /// The call's own arguments (target, reason, path, …).
    #[serde(flatten)]
    pub details: Map<String, Value>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct CaRotated {
    pub from_sha256: String,
    pub to_sha256: String,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct CaRejected {
    pub reason: String,
    pub ca_sha256: String,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct JwtKeyRotated {
    pub from_kid: String,
    pub to_kid: String,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct JwtKeyRejected {
    pub reason: String,
    pub kid: String,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct DaemonStarted {
    pub version: String,
    pub trust_domain: String,
    pub policy_version: String,
    pub inventory_entries: usize,
    pub ca_sha256: String,
    pub jwt_kid: String,
    /// The WIT-SVID signing key's kid.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub wit_kid: Option<String>,
    pub listen: Option<String>,
    pub jwt_issuer: Option<String>,
    pub oidc_issuers: Vec<String>,
    pub socket: String,
    pub admin_socket: Option<String>,
    pub aws: Option<AwsEndpoint>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct AwsEndpoint {
    pub region: Option<String>,
    pub endpoint: Option<String>,
    pub mode: String,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct DaemonStopped {
    pub clean: bool,
}

/// Refusals of one caller within one window, counted (see `Event::Refusals`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Refusals {
    /// Who: `uid N`, `address A`, `subject S of I` (a verified id-token).
    pub caller: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub uid: Option<u32>,
    /// The window, Unix milliseconds.
    pub since_ms: i64,
    pub until_ms: i64,
    /// Refusals that repeated one recorded in full (its `decision` event), by that event.
    pub repeats: Vec<RefusalRepeats>,
    /// Distinct refusals beyond the ones recorded in full, counted only.
    pub unrecorded: u64,
    /// Requests a limit refused before anything was decided, by limit (`rate`,
    /// `caller_busy`, `busy`).
    pub limited: std::collections::BTreeMap<String, u64>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct RefusalRepeats {
    pub decision: EventId,
    pub count: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct AwsDenyRemoved {
    pub role: String,
    pub policy_name: String,
    pub source_identity: Option<String>,
    /// The `revoked` event that placed the deny: its chain (several daemons) and sequence.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub placed_in_chain: Option<String>,
    pub placed_in: EventId,
    pub remove_after: Option<i64>,
    /// False when the deny was already gone from the role.
    pub existed: bool,
}

/// A reload of the configuration and the files it names (SIGHUP). Nothing in it is a secret:
/// key names, versions, fingerprints and reasons.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ConfigReloaded {
    /// The configuration file read again (`None`: `mayfly dev`, which has none).
    pub file: Option<String>,
    /// What took effect, one line each (`policy: …`, `listen.cert: …`, `break_glass.approvers: …`).
    pub applied: Vec<String>,
    /// Changed keys this daemon keeps until it restarts (`workload_api.socket`, …).
    pub restart_required: Vec<String>,
    /// What could not be applied and why; the daemon keeps what it had for those.
    pub failed: Vec<String>,
    /// The policy release active after the reload.
    pub policy_version: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_round_trips_through_its_stored_name() {
        for kind in EventKind::ALL {
            assert_eq!(EventKind::parse(kind.as_str()), Some(*kind));
        }
        assert_eq!(EventKind::ALL.len(), 24);
    }

    #[test]
    fn an_issued_event_keeps_the_credential_row_at_the_top_level() {
        let credential = CredentialRecord {
            id: "c1".into(),
            kind: "x509".into(),
            identity: "spiffe://mayfly.local/api".into(),
            serial: "0a".into(),
            fingerprint: "ff".into(),
            not_before: 1,
            not_after: 2,
            decision_id: 7,
            break_glass: false,
        };
        let event = Event::Issued(Issued { credential: credential.clone(), details: IssuedDetails::default() });
        let body = event.body().unwrap();
        let value: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(value["serial"], "0a");
        assert_eq!(value["decision_id"], 7);
        assert!(value.get("break_glass").is_none(), "defaults are not written: {body}");
        assert_eq!(Event::decode("issued", &body).unwrap(), event);
    }

    #[test]
    fn unknown_kinds_and_bad_bodies_are_errors_not_panics() {
        assert_eq!(Event::decode("nope", "{}"), Err(DecodeError::UnknownKind("nope".into())));
        assert!(matches!(Event::decode("issued", "{}"), Err(DecodeError::Body { .. })));
        assert!(matches!(Event::decode("decision", "[1"), Err(DecodeError::Body { .. })));
    }

    #[test]
    fn caller_fields_are_found_where_revocation_selectors_look() {
        let token = Caller {
            oidc: Some(Provenance { repository: Some("acme/app".into()), ..Provenance::default() }),
            ..Caller::default()
        };
        assert_eq!(token.field("repository").as_deref(), Some("acme/app"));
        assert_eq!(Caller::local(1001, 1001, Some(4)).field("uid").as_deref(), Some("1001"));
        assert_eq!(Caller::local(1001, 1001, None).field("exe"), None);
    }
}
