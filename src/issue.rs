//! The one place that knows the order of an issuance: attest → inventory → decide →
//! record the decision → mint → record the issuance → answer. Nothing leaves without its
//! `issued` event being durable; every refusal after the request parsed is a recorded
//! `decision`. Knows nothing of protobuf or sockets.

use std::sync::Arc;
use std::time::SystemTime;

use serde_json::json;

use crate::attest::oidc::{OidcError, OidcVerifier, VerifiedToken};
use crate::attest::{AttestError, Attestation, Attestor, CallerSummary, PeerInfo};
use crate::breakglass::{ApprovalError, Approvals, Pending, PendingKind, Waited};
use crate::clock::{Clock, unix_secs, utc_date};
use crate::config::BreakGlassConfig;
use crate::events::Elevated;
use crate::identity::{InventoryEntry, Lookup, OidcClaims, Selectors, TrustDomain, Ttl, WorkloadId};
use crate::keys::SecretDer;
use crate::ledger::{CredentialRecord, EventId, EventKind, Ledger, LedgerError, NewEvent};
use crate::mint::aws::{AwsMintError, AwsMinter, StsSession};
use crate::mint::{JwtError, JwtMinter, JwtSvid, MintError, Minter, ValidatedJwt, VerifiedCsr, X509Svid};
use crate::policy::release::Release;
use crate::policy::replay::{self, Outcome};
use crate::policy::store::PolicyStore;
use crate::policy::{
    AwsRole, Combined, CredentialKind, Decision, DecisionRequest, Grant, JwtGrant, RequestContext, Resource, Verdict,
};
use crate::revoke::Revocations;

#[derive(Debug, thiserror::Error)]
pub enum IssueError {
    #[error(transparent)]
    Attest(#[from] AttestError),
    #[error("no inventory entry matches this caller")]
    NoEntry,
    #[error("the inventory entry `{id}` expired on {expires}")]
    EntryExpired { id: String, expires: String },
    #[error("the caller matches several identities ({}); name one with spiffe_id", .0.join(", "))]
    Ambiguous(Vec<String>),
    #[error("{explain}")]
    Denied { explain: String, rules: Vec<String> },
    #[error("the ledger cannot record this issuance; nothing was issued")]
    Ledger(#[from] LedgerError),
    #[error(transparent)]
    Mint(#[from] MintError),
    #[error("JWT-SVID invalid: {0}")]
    InvalidJwt(#[from] JwtError),
    #[error("id-token refused: {0}")]
    Token(#[from] OidcError),
    #[error("this daemon has no trusted OIDC issuers; the exchange is off")]
    NoExchange,
    #[error("the identity `{identity}` is locked: {reason}")]
    Locked { identity: String, reason: String },
    #[error("the credential `{0}` was revoked")]
    Revoked(String),
    #[error("break-glass refused: {0}")]
    BreakGlass(String),
    #[error("break-glass: {0}")]
    Approval(#[from] ApprovalError),
    #[error("break-glass refused, nothing was issued: {0}")]
    Elevated(String),
    #[error("no AWS credentials were issued: {0}")]
    Aws(#[from] AwsMintError),
    #[error("this daemon does not serve AWS credentials ([aws] is not configured)")]
    NoAws,
}

/// What a break-glass request asks for.
#[derive(Debug)]
pub enum EmergencyKind {
    X509 { csr: VerifiedCsr },
    Jwt { audience: String },
    Aws { role: AwsRole },
}

impl EmergencyKind {
    fn credential_kind(&self) -> CredentialKind {
        match self {
            EmergencyKind::X509 { .. } => CredentialKind::X509,
            EmergencyKind::Jwt { .. } => CredentialKind::Jwt,
            EmergencyKind::Aws { .. } => CredentialKind::Aws,
        }
    }
}

#[derive(Debug)]
pub struct EmergencyRequest {
    pub kind: EmergencyKind,
    pub ttl: Ttl,
    pub reason: String,
    pub ticket: String,
}

#[derive(Debug)]
pub enum EmergencyOutcome {
    X509(IssuedX509),
    Jwt(IssuedJwt),
    Aws(IssuedAws),
    /// Waiting for a second person: poll with the id until approved, denied or expired.
    Pending {
        id: String,
        expires_at: SystemTime,
    },
}

/// The emergency path's settings and state: the elevated sinks every step is written to
/// (fail-closed), the ticket pattern and ceiling, and the requests awaiting approval.
pub struct BreakGlassSettings {
    pub config: BreakGlassConfig,
    pub elevated: Elevated,
    pub approvals: Approvals,
}

/// Who is asking: a local process (kernel-attested) or the holder of a verified id-token.
#[derive(Clone, Copy, Debug)]
pub enum Caller<'a> {
    Local(&'a PeerInfo),
    Token(&'a VerifiedToken),
}

/// What the token exchange can hand out.
#[derive(Debug)]
pub enum ExchangeKind {
    Jwt { audience: String },
    X509 { csr: VerifiedCsr },
    Aws { role: AwsRole },
}

#[derive(Debug)]
pub struct ExchangeRequest {
    pub kind: ExchangeKind,
    pub ttl: Ttl,
    /// Where the request came from (the TLS peer address), for the ledger.
    pub remote: String,
}

#[derive(Debug)]
pub enum Exchanged {
    Jwt(IssuedJwt),
    X509(IssuedX509),
    Aws(IssuedAws),
}

/// The CI exchange: trusted issuers, and the trust domain dev identities are made in.
pub struct ExchangeSettings {
    pub verifier: Arc<OidcVerifier>,
    pub trust_domain: TrustDomain,
}

/// Where the key of an X.509 SVID comes from.
#[derive(Debug)]
pub enum KeySource {
    /// The workload made its key and sent a CSR (`mayfly.v1`): the key never travels.
    Csr(VerifiedCsr),
    /// The Workload API: mayfly makes the key after the decision and hands it out once.
    ServerMade,
}

/// Which API a request came through, and whether it renews a credential the caller holds
/// (a pushed rotation). Recorded with the decision.
#[derive(Clone, Debug, Default)]
pub struct Origin {
    pub api: &'static str,
    pub rotates: Option<String>,
    /// The break-glass path: the justification and ticket, recorded verbatim.
    pub emergency: Option<Emergency>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Emergency {
    pub reason: String,
    pub ticket: String,
}

/// A parsed request for an X.509 SVID.
#[derive(Debug)]
pub struct X509Request {
    pub key: KeySource,
    pub ttl: Ttl,
    pub spiffe_id: Option<WorkloadId>,
    pub origin: Origin,
}

#[derive(Debug)]
pub struct IssuedX509 {
    pub credential_id: String,
    pub identity: WorkloadId,
    pub svid: X509Svid,
    /// The PKCS#8 key, when mayfly made it (`KeySource::ServerMade`). Zeroized on drop.
    pub private_key: Option<SecretDer>,
    pub bundle: Vec<Vec<u8>>,
    pub decision_id: EventId,
}

/// A parsed request for a JWT-SVID: every audience must be granted.
#[derive(Debug)]
pub struct JwtRequest {
    pub audiences: Vec<String>,
    pub ttl: Ttl,
    pub spiffe_id: Option<WorkloadId>,
    pub origin: Origin,
}

#[derive(Debug)]
pub struct IssuedJwt {
    pub credential_id: String,
    pub identity: WorkloadId,
    pub svid: JwtSvid,
    pub decision_id: EventId,
}

/// A parsed request for an AWS session of one role.
#[derive(Debug)]
pub struct AwsRequest {
    pub role: AwsRole,
    pub ttl: Ttl,
    pub spiffe_id: Option<WorkloadId>,
    pub origin: Origin,
}

/// An AWS STS session, recorded. The secret key and session token are zeroized when this
/// is dropped (after the reply is written).
#[derive(Debug)]
pub struct IssuedAws {
    pub credential_id: String,
    pub identity: WorkloadId,
    pub session: StsSession,
    pub role_arn: String,
    pub session_name: String,
    pub source_identity: String,
    pub decision_id: EventId,
}

/// What an allowed request may mint, and the decision event that allowed it.
struct Authorized {
    grants: Vec<Grant>,
    decision_id: EventId,
    now: SystemTime,
    needs_approval: bool,
    identity_record: serde_json::Value,
}

pub struct Issuer {
    exchange: Option<ExchangeSettings>,
    break_glass: Option<BreakGlassSettings>,
    /// Credentials issued on the emergency path: their uses and expiry are flagged and
    /// written to the elevated sinks too.
    break_glass_credentials: std::sync::Mutex<std::collections::HashSet<String>>,
    revocations: Arc<Revocations>,
    attestor: Arc<dyn Attestor>,
    policy: Arc<PolicyStore>,
    minter: Arc<dyn Minter>,
    jwt: Arc<dyn JwtMinter>,
    aws: Option<Arc<AwsMinter>>,
    /// JWT audiences no JWT-SVID is issued for, whatever policy says: the audience of
    /// mayfly's own STS web-identity assertions (a JWT-SVID for it would let a workload
    /// call AssumeRoleWithWebIdentity itself, past the AWS rules and the ledger).
    reserved_audiences: Vec<String>,
    /// A candidate release decided beside the active one on live requests (shadow mode):
    /// differences are recorded, never acted on.
    shadow: arc_swap::ArcSwapOption<Release>,
    /// Shadow differences being written; beyond the limit they are counted, not queued.
    shadow_writes: Arc<tokio::sync::Semaphore>,
    ledger: Arc<dyn Ledger>,
    clock: Arc<dyn Clock>,
}

impl Issuer {
    pub fn new(
        attestor: Arc<dyn Attestor>,
        policy: Arc<PolicyStore>,
        minter: Arc<dyn Minter>,
        jwt: Arc<dyn JwtMinter>,
        ledger: Arc<dyn Ledger>,
        clock: Arc<dyn Clock>,
    ) -> Self {
        Self {
            exchange: None,
            break_glass: None,
            break_glass_credentials: Default::default(),
            revocations: Arc::new(Revocations::default()),
            attestor,
            policy,
            minter,
            jwt,
            aws: None,
            reserved_audiences: vec![],
            shadow: arc_swap::ArcSwapOption::empty(),
            shadow_writes: Arc::new(tokio::sync::Semaphore::new(256)),
            ledger,
            clock,
        }
    }

    /// Starts (`Some`) or stops (`None`) shadow mode, recorded either way.
    pub async fn set_shadow(
        &self,
        candidate: Option<Arc<Release>>,
        operator: serde_json::Value,
        reason: &str,
    ) -> Result<EventId, IssueError> {
        let body = match &candidate {
            Some(r) => {
                json!({ "shadow": "started", "candidate": r.version(), "label": r.provenance.label, "signed_by": r.provenance.signed_by, "source": r.provenance.source, "active": self.policy_version(), "operator": operator, "reason": reason })
            }
            None => {
                json!({ "shadow": "stopped", "candidate": self.shadow.load().as_ref().map(|r| r.version().to_owned()), "operator": operator, "reason": reason })
            }
        };
        let id = self
            .ledger
            .record(NewEvent { kind: EventKind::PolicyShadow, at: self.clock.now(), body, credential: None })
            .await?;
        self.shadow.store(candidate);
        Ok(id)
    }

    /// The release being shadowed, if any.
    pub fn shadow_version(&self) -> Option<String> {
        self.shadow.load().as_ref().map(|r| r.version().to_owned())
    }

    /// Decides `request` under the shadow release too; a different outcome is recorded
    /// (in the background: it must not slow or fail the live request) and nothing else.
    fn shadow_compare(
        &self,
        request: &serde_json::Value,
        live: Outcome,
        decision_id: Option<EventId>,
        now: SystemTime,
    ) {
        let Some(candidate) = self.shadow.load_full() else { return };
        let body = json!({ "request": request, "identity": live.identity });
        let recorded = match replay::from_body(&body, decision_id.unwrap_or_default(), now) {
            Ok(r) => r,
            Err(why) => {
                tracing::debug!(why, "shadow: request not decidable");
                return;
            }
        };
        let shadowed = replay::decide(&candidate, &recorded);
        let Some(change) = replay::compare(&live, &shadowed) else { return };
        let (action, resource) = replay::describe(&recorded.resources);
        tracing::info!(change = ?change, identity = live.identity.as_deref().unwrap_or_default(), action, resource, candidate = candidate.version(), "shadow policy decides differently (not acted on)");
        let body = json!({
            "candidate": candidate.version(),
            "active": self.policy_version(),
            "decision_id": decision_id,
            "change": change,
            "escalation": change.is_escalation(),
            "action": action,
            "resource": resource,
            "live": live,
            "shadow": shadowed,
        });
        let Ok(permit) = self.shadow_writes.clone().try_acquire_owned() else {
            tracing::warn!(
                candidate = candidate.version(),
                "shadow differences arrive faster than the ledger takes them; this one is not recorded"
            );
            return;
        };
        let ledger = self.ledger.clone();
        let at = self.clock.now();
        tokio::spawn(async move {
            if let Err(e) =
                ledger.record(NewEvent { kind: EventKind::PolicyShadowDiff, at, body, credential: None }).await
            {
                tracing::warn!(error = %e, "shadow difference not recorded");
            }
            drop(permit);
        });
    }

    /// Turns AWS STS sessions on.
    pub fn with_aws(mut self, aws: Arc<AwsMinter>) -> Self {
        self.reserved_audiences.extend(aws.assertion_audience().map(str::to_owned));
        self.aws = Some(aws);
        self
    }

    /// Turns the break-glass path on (with its elevated sinks and approvals).
    pub fn with_break_glass(mut self, settings: BreakGlassSettings) -> Self {
        self.break_glass = Some(settings);
        self
    }

    /// Credentials issued on the emergency path before this start (from the ledger).
    pub fn with_break_glass_credentials(self, ids: impl IntoIterator<Item = String>) -> Self {
        self.bg_ids().extend(ids);
        self
    }

    pub fn is_break_glass(&self, credential_id: &str) -> bool {
        self.bg_ids().contains(credential_id)
    }

    /// A later step of a break-glass credential (a use, its expiry) to the elevated sinks.
    /// The step itself already happened; a failed write is logged loudly, not hidden.
    pub async fn elevate_later(&self, stage: &str, body: serde_json::Value) {
        if let Some(bg) = &self.break_glass {
            let line = json!({ "break_glass": stage, "at": unix_secs(self.clock.now()), "event": body });
            if let Err(e) = bg.elevated.write(&line).await {
                tracing::error!(stage, error = %e, "break-glass step not written to the elevated sinks");
            }
        }
    }

    fn bg_ids(&self) -> std::sync::MutexGuard<'_, std::collections::HashSet<String>> {
        // Why: a set of ids, inserted whole; a poisoned lock is still consistent.
        self.break_glass_credentials.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub fn pending_break_glass(&self) -> Vec<Pending> {
        self.break_glass.as_ref().map(|b| b.approvals.list(self.clock.now())).unwrap_or_default()
    }

    /// The revocation state issuance and validation consult (shared with the admin API).
    pub fn with_revocations(mut self, revocations: Arc<Revocations>) -> Self {
        self.revocations = revocations;
        self
    }

    pub fn revocations(&self) -> &Arc<Revocations> {
        &self.revocations
    }

    /// Turns the token exchange on: id-tokens from these issuers are verified and exchanged.
    pub fn with_exchange(mut self, exchange: ExchangeSettings) -> Self {
        self.exchange = Some(exchange);
        self
    }

    pub fn policy_version(&self) -> String {
        self.policy.current().version().to_owned()
    }

    /// Wakes whenever another policy release becomes active (activation or rollback), so
    /// holders of credentials (Workload API streams) re-check their entitlement.
    pub fn policy_changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.policy.changes()
    }

    pub fn x509_bundle(&self) -> Vec<Vec<u8>> {
        self.minter.x509_bundle()
    }

    pub fn jwks(&self) -> serde_json::Value {
        self.jwt.jwks()
    }

    pub fn now(&self) -> SystemTime {
        self.clock.now()
    }

    /// Waits until the daemon's clock reaches `deadline` (renewal timers use it, so a test
    /// clock drives them).
    pub async fn sleep_until(&self, deadline: SystemTime) {
        self.clock.sleep_until(deadline).await;
    }

    /// The last day an identity's inventory entry is valid under the active release, if
    /// it still has one: streams end its SVIDs when that day is over.
    pub fn entry_expires(&self, id: &WorkloadId) -> Option<time::Date> {
        self.policy.current().inventory.entries().iter().find(|e| &e.id == id).map(|e| e.expires)
    }

    pub async fn issue_x509(&self, peer: &PeerInfo, req: X509Request) -> Result<IssuedX509, IssueError> {
        self.issue_x509_as(Caller::Local(peer), req).await
    }

    pub async fn issue_jwt(&self, peer: &PeerInfo, req: JwtRequest) -> Result<IssuedJwt, IssueError> {
        self.issue_jwt_as(Caller::Local(peer), req).await
    }

    pub async fn issue_aws(&self, peer: &PeerInfo, req: AwsRequest) -> Result<IssuedAws, IssueError> {
        self.issue_aws_as(Caller::Local(peer), req).await
    }

    pub async fn issue_aws_as(&self, caller: Caller<'_>, req: AwsRequest) -> Result<IssuedAws, IssueError> {
        if self.aws.is_none() {
            return Err(IssueError::NoAws);
        }
        let resources = vec![Resource::Aws { role: req.role }];
        let auth = self
            .authorize(caller, CredentialKind::Aws, resources, req.ttl, req.spiffe_id.as_ref(), &req.origin)
            .await?;
        let grant = auth.grants.first().ok_or(IssueError::NoEntry)?;
        self.deliver_aws(grant, auth.decision_id, auth.now, &req.origin, provenance(caller), None).await
    }

    /// Asks STS for the session the grant describes and records it before it is handed
    /// out: the `issued` event keeps the access key id, the assumed-role ARN (as the
    /// credential's fingerprint), the session name, the source identity and the expiry;
    /// never the secret key or token. A session STS made that cannot be recorded is
    /// dropped (its secrets zeroized) and the caller gets an error.
    async fn deliver_aws(
        &self,
        grant: &Grant,
        decision_id: EventId,
        now: SystemTime,
        origin: &Origin,
        extra: Option<serde_json::Value>,
        elevated: Option<&Elevated>,
    ) -> Result<IssuedAws, IssueError> {
        let minter = self.aws.as_ref().ok_or(IssueError::NoAws)?;
        let credential_id = uuid::Uuid::new_v4().to_string();
        let minted = match minter.mint(grant, &credential_id, now).await {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(identity = %grant.identity(), decision_id, error = %e, "no AWS session");
                return Err(e.into());
            }
        };
        let session = minted.session;
        let request = minted.request;
        let record = CredentialRecord {
            id: credential_id.clone(),
            kind: CredentialKind::Aws.as_str().to_owned(),
            identity: grant.identity().to_string(),
            serial: session.access_key_id.clone(),
            fingerprint: session.assumed_role_arn.clone(),
            not_before: unix_secs(now),
            not_after: unix_secs(session.expiration),
            decision_id,
        };
        let aws = grant.aws();
        let mut details = json!({
            "role_arn": request.role_arn,
            "assumed_role_arn": session.assumed_role_arn,
            "access_key_id": session.access_key_id,
            "session_name": request.role_session_name,
            "source_identity": request.source_identity,
            "duration_seconds": request.duration_seconds,
            "session_tags": request.tags.iter().map(|(k, _)| k.clone()).collect::<Vec<_>>(),
            "session_policy": aws.and_then(|a| a.session_policy.as_ref()).map(|p| p.names.clone()),
            "sts_mode": minted.mode,
            "web_identity_jti": minted.assertion_jti,
            "sts_attempts": minted.attempts,
        });
        if let (Some(serde_json::Value::Object(more)), Some(map)) = (extra, details.as_object_mut()) {
            map.extend(more);
        }
        let issued_id = match self.commit(grant.identity(), record, now, Some(details), elevated).await {
            Ok(id) => id,
            Err(e) => {
                tracing::error!(
                    identity = %grant.identity(), access_key_id = session.access_key_id, session_name = request.role_session_name,
                    error = %e, "an STS session was made but could not be recorded; it was not handed out"
                );
                return Err(e);
            }
        };
        tracing::info!(
            identity = %grant.identity(), credential_id, decision_id, issued_id, api = origin.api, break_glass = origin.emergency.is_some(),
            role = request.role_arn, access_key_id = session.access_key_id, not_after = unix_secs(session.expiration), "aws session issued"
        );
        Ok(IssuedAws {
            credential_id,
            identity: grant.identity().clone(),
            session,
            role_arn: request.role_arn,
            session_name: request.role_session_name,
            source_identity: request.source_identity,
            decision_id,
        })
    }

    /// The CI exchange: verify the id-token (a refusal is a recorded decision), then issue
    /// through the same path as a local caller, with the token's claims as context.
    pub async fn exchange(&self, token: &str, req: ExchangeRequest) -> Result<Exchanged, IssueError> {
        let kind = match &req.kind {
            ExchangeKind::Jwt { .. } => CredentialKind::Jwt,
            ExchangeKind::X509 { .. } => CredentialKind::X509,
            ExchangeKind::Aws { .. } => CredentialKind::Aws,
        };
        if kind == CredentialKind::Aws && self.aws.is_none() {
            return Err(IssueError::NoAws);
        }
        let origin = Origin { api: "exchange", rotates: None, emergency: None };
        let exchange = self.exchange.as_ref().ok_or(IssueError::NoExchange)?;
        let verified = match exchange.verifier.verify(token, self.clock.now()).await {
            Ok(v) => v,
            Err(e) => {
                let caller = json!({ "remote": req.remote, "claimed_issuer": OidcVerifier::claimed_issuer(token) });
                let version = self.policy.current().version().to_owned();
                self.record_refusal(kind, &caller, None, &req.ttl, &e.to_string(), &version, &origin, None).await?;
                return Err(e.into());
            }
        };
        let caller = Caller::Token(&verified);
        match req.kind {
            ExchangeKind::Jwt { audience } => {
                let jwt = JwtRequest { audiences: vec![audience], ttl: req.ttl, spiffe_id: None, origin };
                Ok(Exchanged::Jwt(self.issue_jwt_as(caller, jwt).await?))
            }
            ExchangeKind::X509 { csr } => {
                let x509 = X509Request { key: KeySource::Csr(csr), ttl: req.ttl, spiffe_id: None, origin };
                Ok(Exchanged::X509(self.issue_x509_as(caller, x509).await?))
            }
            ExchangeKind::Aws { role } => {
                let aws = AwsRequest { role, ttl: req.ttl, spiffe_id: None, origin };
                Ok(Exchanged::Aws(self.issue_aws_as(caller, aws).await?))
            }
        }
    }

    pub async fn issue_x509_as(&self, caller: Caller<'_>, req: X509Request) -> Result<IssuedX509, IssueError> {
        let auth = self
            .authorize(caller, CredentialKind::X509, vec![Resource::X509], req.ttl, req.spiffe_id.as_ref(), &req.origin)
            .await?;
        let grant = auth.grants.first().ok_or(IssueError::NoEntry)?;
        self.deliver_x509(grant, auth.decision_id, auth.now, req.key, &req.origin, provenance(caller), None).await
    }

    /// Mints what an allowed decision granted and records it: the certificate (and key)
    /// exist only in this frame until the `issued` event is durable. For break-glass, the
    /// elevated sinks take their line first; if they cannot, nothing is issued.
    #[expect(clippy::too_many_arguments, reason = "each is a fact of the issuance the record needs")]
    async fn deliver_x509(
        &self,
        grant: &Grant,
        decision_id: EventId,
        now: SystemTime,
        key: KeySource,
        origin: &Origin,
        extra: Option<serde_json::Value>,
        elevated: Option<&Elevated>,
    ) -> Result<IssuedX509, IssueError> {
        // Why here and not earlier: a denied caller never causes a key to be made.
        let (csr, private_key) = match key {
            KeySource::Csr(csr) => (csr, None),
            KeySource::ServerMade => {
                let (csr, key) = VerifiedCsr::server_made()?;
                (csr, Some(key))
            }
        };
        let svid = self.minter.mint_x509(&csr, grant, now)?;
        let credential_id = uuid::Uuid::new_v4().to_string();
        let record = CredentialRecord {
            id: credential_id.clone(),
            kind: CredentialKind::X509.as_str().to_owned(),
            identity: grant.identity().to_string(),
            serial: svid.serial.clone(),
            fingerprint: svid.fingerprint.clone(),
            not_before: unix_secs(svid.not_before),
            not_after: unix_secs(svid.not_after),
            decision_id,
        };
        let issued_id = self.commit(grant.identity(), record, now, extra, elevated).await?;
        tracing::info!(
            identity = %grant.identity(), credential_id, serial = %svid.serial, decision_id, issued_id,
            api = origin.api, rotation = origin.rotates.is_some(), break_glass = origin.emergency.is_some(),
            not_after = unix_secs(svid.not_after), "x509 svid issued"
        );
        Ok(IssuedX509 {
            credential_id,
            identity: grant.identity().clone(),
            svid,
            private_key,
            bundle: self.minter.x509_bundle(),
            decision_id,
        })
    }

    pub async fn issue_jwt_as(&self, caller: Caller<'_>, req: JwtRequest) -> Result<IssuedJwt, IssueError> {
        let resources = req.audiences.iter().map(|a| Resource::Jwt { audience: a.clone() }).collect();
        let auth = self
            .authorize(caller, CredentialKind::Jwt, resources, req.ttl, req.spiffe_id.as_ref(), &req.origin)
            .await?;
        self.deliver_jwt(&auth.grants, auth.decision_id, auth.now, &req.origin, provenance(caller), None).await
    }

    async fn deliver_jwt(
        &self,
        grants: &[Grant],
        decision_id: EventId,
        now: SystemTime,
        origin: &Origin,
        extra: Option<serde_json::Value>,
        elevated: Option<&Elevated>,
    ) -> Result<IssuedJwt, IssueError> {
        let grant = JwtGrant::join(grants).ok_or_else(|| IssueError::Denied {
            explain: "denied: the audiences were not all granted to one identity".into(),
            rules: vec![],
        })?;
        // The jti is the credential id: a validation names the credential without a lookup.
        let credential_id = uuid::Uuid::new_v4().to_string();
        let svid = self.jwt.mint_jwt(&grant, &credential_id, now)?;
        let record = CredentialRecord {
            id: credential_id.clone(),
            kind: CredentialKind::Jwt.as_str().to_owned(),
            identity: grant.identity().to_string(),
            serial: svid.jti.clone(),
            fingerprint: svid.fingerprint.clone(),
            not_before: unix_secs(svid.not_before),
            not_after: unix_secs(svid.not_after),
            decision_id,
        };
        let issued_id = self.commit(grant.identity(), record, now, extra, elevated).await?;
        tracing::info!(
            identity = %grant.identity(), credential_id, decision_id, issued_id, api = origin.api,
            break_glass = origin.emergency.is_some(), audiences = ?grant.audiences(), not_after = unix_secs(svid.not_after), "jwt svid issued"
        );
        Ok(IssuedJwt { credential_id, identity: grant.identity().clone(), svid, decision_id })
    }

    /// The emergency path. The caller is attested like any other; the request is decided
    /// only by break-glass rules (and every forbid); every step goes to the ledger (flagged
    /// `break_glass`) and, synchronously, to the elevated sinks; a grant that needs a second
    /// person waits for one. Fails closed at each step.
    pub async fn break_glass(&self, peer: &PeerInfo, req: EmergencyRequest) -> Result<EmergencyOutcome, IssueError> {
        self.break_glass_as(Caller::Local(peer), req).await
    }

    /// Break-glass for an operator off-host, through the TLS listener: the id-token is
    /// verified like any exchange (a refusal is recorded), then the same emergency path.
    pub async fn exchange_break_glass(
        &self,
        token: &str,
        remote: &str,
        req: EmergencyRequest,
    ) -> Result<EmergencyOutcome, IssueError> {
        let exchange = self.exchange.as_ref().ok_or(IssueError::NoExchange)?;
        let kind = req.kind.credential_kind();
        let origin = Origin {
            api: "break_glass",
            rotates: None,
            emergency: Some(Emergency { reason: req.reason.clone(), ticket: req.ticket.clone() }),
        };
        let verified = match exchange.verifier.verify(token, self.clock.now()).await {
            Ok(v) => v,
            Err(e) => {
                let caller = json!({ "remote": remote, "claimed_issuer": OidcVerifier::claimed_issuer(token) });
                let version = self.policy.current().version().to_owned();
                self.record_refusal(kind, &caller, None, &req.ttl, &e.to_string(), &version, &origin, None).await?;
                return Err(e.into());
            }
        };
        self.break_glass_as(Caller::Token(&verified), req).await
    }

    async fn break_glass_as(
        &self,
        caller_ref: Caller<'_>,
        req: EmergencyRequest,
    ) -> Result<EmergencyOutcome, IssueError> {
        let bg = self
            .break_glass
            .as_ref()
            .ok_or_else(|| IssueError::BreakGlass("the break-glass path is not configured".into()))?;
        let kind = req.kind.credential_kind();
        if kind == CredentialKind::Aws && self.aws.is_none() {
            return Err(IssueError::NoAws);
        }
        let emergency = Emergency { reason: req.reason.clone(), ticket: req.ticket.clone() };
        let origin = Origin { api: "break_glass", rotates: None, emergency: Some(emergency) };
        let ttl = req.ttl.min(bg.config.max_ttl);
        let version = self.policy.current().version().to_owned();
        let (caller, requester_uid) = match caller_ref {
            Caller::Local(peer) => (json!({ "uid": peer.uid, "gid": peer.gid, "pid": peer.pid }), Some(peer.uid)),
            Caller::Token(t) => (json!({ "oidc": t.provenance }), None),
        };
        // Refusals before policy is asked are still recorded (and flagged).
        let early = if !bg.config.ticket_pattern.is_match(&req.ticket) {
            Some(format!(
                "the ticket `{}` does not match break_glass.ticket_pattern `{}`",
                req.ticket.escape_debug(),
                bg.config.ticket_pattern.as_str()
            ))
        } else if !bg.elevated.is_configured() {
            Some("no elevated sink is configured, so nothing can be issued".into())
        } else if kind == CredentialKind::Aws && bg.config.max_ttl.as_secs() < crate::mint::aws::MIN_SESSION_SECS {
            Some(format!(
                "break_glass.max_ttl `{}` is under AWS's 15-minute floor: no AWS session can be that short",
                bg.config.max_ttl
            ))
        } else {
            None
        };
        if let Some(why) = early {
            self.record_refusal(kind, &caller, None, &ttl, &why, &version, &origin, None).await?;
            self.elevate_later(
                "denied",
                json!({ "caller": caller, "ticket": req.ticket, "justification": req.reason, "why": why }),
            )
            .await;
            return Err(IssueError::BreakGlass(why));
        }
        let resources = match &req.kind {
            EmergencyKind::X509 { .. } => vec![Resource::X509],
            EmergencyKind::Jwt { audience } => vec![Resource::Jwt { audience: audience.clone() }],
            EmergencyKind::Aws { role } => vec![Resource::Aws { role: role.clone() }],
        };
        let auth = match self.authorize(caller_ref, kind, resources, ttl, None, &origin).await {
            Ok(auth) => auth,
            Err(e) => {
                // A refused emergency request is loud too (it was recorded by `authorize`).
                self.elevate_later("denied", json!({ "caller": caller, "ticket": req.ticket, "justification": req.reason, "why": e.to_string() })).await;
                return Err(e);
            }
        };
        let mut extra = json!({ "break_glass": true, "ticket": req.ticket, "justification": req.reason });
        if let (Some(p), Some(map)) = (provenance(caller_ref), extra.as_object_mut()) {
            map.extend(p.as_object().cloned().unwrap_or_default());
        }
        self.elevate(&bg.elevated, "requested", json!({ "decision_id": auth.decision_id, "who": auth.identity_record, "ticket": req.ticket, "justification": req.reason, "kind": kind.as_str(), "needs_approval": auth.needs_approval })).await?;
        if auth.needs_approval {
            let Some(requester_uid) = requester_uid else {
                let why = "a rule needs a second person's approval, which is served on the workload socket only";
                self.record_break_glass("denied", json!({ "decision_id": auth.decision_id, "why": why })).await?;
                return Err(IssueError::BreakGlass(why.into()));
            };
            let id = uuid::Uuid::new_v4().to_string();
            let expires_at = auth.now + bg.approvals.timeout();
            let identity = auth.grants.first().map(|g| g.identity().to_string()).unwrap_or_default();
            let pending = Pending {
                id: id.clone(),
                requester_uid,
                identity: identity.clone(),
                grants: auth.grants,
                decision_id: auth.decision_id,
                kind: match req.kind {
                    EmergencyKind::X509 { csr } => PendingKind::X509 { csr },
                    EmergencyKind::Jwt { .. } => PendingKind::Jwt,
                    EmergencyKind::Aws { .. } => PendingKind::Aws,
                },
                reason: req.reason,
                ticket: req.ticket,
                requested_at: auth.now,
                expires_at,
                approved_by: None,
            };
            if let Err(e) = bg.approvals.add(pending) {
                self.record_break_glass("denied", json!({ "request": id, "decision_id": auth.decision_id, "identity": identity, "why": e.to_string() })).await?;
                return Err(e.into());
            }
            self.record_break_glass("pending", json!({ "request": id, "decision_id": auth.decision_id, "identity": identity, "expires_at": unix_secs(expires_at) })).await?;
            return Ok(EmergencyOutcome::Pending { id, expires_at });
        }
        match req.kind {
            EmergencyKind::X509 { csr } => {
                let grant = auth.grants.first().ok_or(IssueError::NoEntry)?;
                Ok(EmergencyOutcome::X509(
                    self.deliver_x509(
                        grant,
                        auth.decision_id,
                        auth.now,
                        KeySource::Csr(csr),
                        &origin,
                        Some(extra),
                        Some(&bg.elevated),
                    )
                    .await?,
                ))
            }
            EmergencyKind::Jwt { .. } => Ok(EmergencyOutcome::Jwt(
                self.deliver_jwt(&auth.grants, auth.decision_id, auth.now, &origin, Some(extra), Some(&bg.elevated))
                    .await?,
            )),
            EmergencyKind::Aws { .. } => {
                let grant = auth.grants.first().ok_or(IssueError::NoEntry)?;
                Ok(EmergencyOutcome::Aws(
                    self.deliver_aws(grant, auth.decision_id, auth.now, &origin, Some(extra), Some(&bg.elevated))
                        .await?,
                ))
            }
        }
    }

    /// The requester waits (at most `at_most`) for an approval; approved → issued once.
    pub async fn break_glass_wait(
        &self,
        peer: &PeerInfo,
        id: &str,
        at_most: std::time::Duration,
    ) -> Result<EmergencyOutcome, IssueError> {
        let bg = self
            .break_glass
            .as_ref()
            .ok_or_else(|| IssueError::BreakGlass("the break-glass path is not configured".into()))?;
        match bg.approvals.wait(id, peer.uid, at_most, self.clock.as_ref()).await? {
            Waited::StillPending(p) => Ok(EmergencyOutcome::Pending { id: p.id.clone(), expires_at: p.expires_at }),
            Waited::Expired(p) => {
                let why = format!("no approval within {} s", bg.approvals.timeout().as_secs());
                self.record_break_glass(
                    "denied",
                    json!({ "request": p.id, "decision_id": p.decision_id, "identity": p.identity, "why": why }),
                )
                .await?;
                let _ = bg
                    .elevated
                    .write(&json!({ "break_glass": "denied", "request": p.id, "identity": p.identity, "why": why }))
                    .await;
                Err(IssueError::BreakGlass(why))
            }
            Waited::Approved(p) => {
                let emergency = Emergency { reason: p.reason.clone(), ticket: p.ticket.clone() };
                let origin = Origin { api: "break_glass", rotates: None, emergency: Some(emergency) };
                let extra = json!({ "break_glass": true, "ticket": p.ticket, "justification": p.reason, "request": p.id, "approved_by": p.approved_by });
                let now = self.clock.now();
                match p.kind {
                    PendingKind::X509 { csr } => {
                        let grant = p.grants.first().ok_or(IssueError::NoEntry)?;
                        Ok(EmergencyOutcome::X509(
                            self.deliver_x509(
                                grant,
                                p.decision_id,
                                now,
                                KeySource::Csr(csr),
                                &origin,
                                Some(extra),
                                Some(&bg.elevated),
                            )
                            .await?,
                        ))
                    }
                    PendingKind::Jwt => Ok(EmergencyOutcome::Jwt(
                        self.deliver_jwt(&p.grants, p.decision_id, now, &origin, Some(extra), Some(&bg.elevated))
                            .await?,
                    )),
                    PendingKind::Aws => {
                        let grant = p.grants.first().ok_or(IssueError::NoEntry)?;
                        Ok(EmergencyOutcome::Aws(
                            self.deliver_aws(grant, p.decision_id, now, &origin, Some(extra), Some(&bg.elevated))
                                .await?,
                        ))
                    }
                }
            }
        }
    }

    /// A second person approves a pending request: recorded (ledger and elevated sinks)
    /// before it takes effect; never the requester; only a configured approver.
    pub async fn break_glass_approve(
        &self,
        approver_uid: u32,
        approver: serde_json::Value,
        id: &str,
        reason: &str,
    ) -> Result<(), IssueError> {
        let bg = self
            .break_glass
            .as_ref()
            .ok_or_else(|| IssueError::BreakGlass("the break-glass path is not configured".into()))?;
        let now = self.clock.now();
        let p = match bg.approvals.check_approval(id, approver_uid, now) {
            Ok(p) => p,
            Err(e) => {
                self.record_break_glass(
                    "approval_refused",
                    json!({ "request": id, "approver": approver, "why": e.to_string() }),
                )
                .await?;
                return Err(e.into());
            }
        };
        let body = json!({ "request": id, "decision_id": p.decision_id, "identity": p.identity, "approver": approver, "reason": reason, "requester_uid": p.requester_uid });
        self.elevate(&bg.elevated, "approved", body.clone()).await?;
        self.record_break_glass("approved", body).await?;
        bg.approvals.commit_approval(id, approver);
        Ok(())
    }

    /// A review afterwards (`mayfly break-glass review`): recorded, flagged.
    pub async fn break_glass_review(
        &self,
        reviewer: serde_json::Value,
        id: &str,
        note: &str,
    ) -> Result<EventId, IssueError> {
        self.record_break_glass("reviewed", json!({ "subject": id, "reviewer": reviewer, "note": note })).await
    }

    async fn record_break_glass(&self, stage: &str, mut body: serde_json::Value) -> Result<EventId, IssueError> {
        if let Some(map) = body.as_object_mut() {
            map.insert("stage".into(), json!(stage));
            map.insert("break_glass".into(), json!(true));
        }
        Ok(self
            .ledger
            .record(NewEvent { kind: EventKind::BreakGlass, at: self.clock.now(), body, credential: None })
            .await?)
    }

    /// One line to every elevated sink, or the step fails (and is recorded as refused).
    async fn elevate(&self, elevated: &Elevated, stage: &str, body: serde_json::Value) -> Result<(), IssueError> {
        let line = json!({ "break_glass": stage, "at": unix_secs(self.clock.now()), "event": body });
        if let Err(why) = elevated.write(&line).await {
            let _ = self.record_break_glass("refused", json!({ "at_stage": stage, "why": why, "event": body })).await;
            return Err(IssueError::Elevated(why));
        }
        Ok(())
    }

    /// Verifies one of mayfly's JWT-SVIDs for `audience`. A successful validation is a `used`
    /// event for the token's credential, durable before the answer; a failed one is logged.
    pub async fn validate_jwt(&self, peer: &PeerInfo, token: &str, audience: &str) -> Result<ValidatedJwt, IssueError> {
        let by = json!({ "uid": peer.uid, "gid": peer.gid, "pid": peer.pid });
        self.check_jwt(token, Some(audience), "validate_jwt_svid", by).await
    }

    /// RFC 7662 introspection: `Ok` for a live token (recorded as a use), an error saying
    /// why it is not active otherwise.
    pub async fn introspect(&self, token: &str, remote: &str) -> Result<ValidatedJwt, IssueError> {
        self.check_jwt(token, None, "introspect", json!({ "remote": remote })).await
    }

    /// Verifies one of mayfly's JWTs (signature, expiry, audience when given) and that it
    /// was not revoked; a live token's check is a durable `used` event before the answer.
    /// A revoked token's attempted use is recorded too (incident responders want it).
    async fn check_jwt(
        &self,
        token: &str,
        audience: Option<&str>,
        use_kind: &str,
        by: serde_json::Value,
    ) -> Result<ValidatedJwt, IssueError> {
        let now = self.clock.now();
        let audience_text = audience.unwrap_or_default();
        let validated = match self.jwt.validate_jwt(token, audience, now) {
            Ok(v) => v,
            Err(e) => {
                tracing::info!(by = %by, audience = audience_text, error = %e, "jwt validation failed");
                return Err(e.into());
            }
        };
        let revoked = self.revocations.is_revoked(&validated.jti);
        let emergency = self.is_break_glass(&validated.jti);
        let body = json!({
            "credential_id": validated.jti,
            "kind": CredentialKind::Jwt.as_str(),
            "identity": validated.identity.as_str(),
            "use": use_kind,
            "audience": audience,
            "by": by,
            "refused": if revoked { Some("revoked") } else { None },
            "break_glass": emergency,
        });
        self.ledger.record(NewEvent { kind: EventKind::Used, at: now, body: body.clone(), credential: None }).await?;
        if emergency {
            self.elevate_later("used", body).await;
        }
        if revoked {
            tracing::warn!(credential_id = validated.jti, identity = %validated.identity, "a revoked JWT was presented");
            return Err(IssueError::Revoked(validated.jti));
        }
        Ok(validated)
    }

    /// attest → inventory → decide every resource → record one decision. Every refusal
    /// after the request parsed is a recorded `decision`; an allow returns the grants.
    async fn authorize(
        &self,
        caller: Caller<'_>,
        kind: CredentialKind,
        resources: Vec<Resource>,
        ttl: Ttl,
        wanted: Option<&WorkloadId>,
        origin: &Origin,
    ) -> Result<Authorized, IssueError> {
        // One snapshot for the whole request: the inventory and rules it is decided under
        // belong to one release even if another is activated meanwhile.
        let release = self.policy.current();
        let version = release.version();
        let (selectors, caller_record, attestation_kind, oidc, dev_fallback) = match caller {
            Caller::Local(peer) => match self.attest(peer).await {
                Ok(a) => (a.selectors, serde_json::to_value(&a.caller).unwrap_or_default(), "unix", None, false),
                Err(e) => {
                    let summary = CallerSummary {
                        uid: peer.uid,
                        gid: peer.gid,
                        pid: peer.pid.unwrap_or(0),
                        ..Default::default()
                    };
                    let record = serde_json::to_value(&summary).unwrap_or_default();
                    self.record_refusal(kind, &record, wanted, &ttl, &e.to_string(), version, origin, None).await?;
                    return Err(e.into());
                }
            },
            Caller::Token(t) => {
                (t.selectors.clone(), json!({ "oidc": t.provenance }), "oidc", Some(t.claims.clone()), t.dev_fallback)
            }
        };
        let now = self.clock.now();
        let dev_entry;
        let mut used_dev_identity = false;
        let entry = match release.inventory.lookup(&selectors, wanted, utc_date(now)) {
            Lookup::Found(entry) => entry,
            Lookup::NoMatch if dev_fallback && wanted.is_none() => {
                used_dev_identity = true;
                // `mayfly dev --oidc-issuer` only: an unregistered token subject gets a dev
                // identity, which the dev rules may grant (serve never sets dev_fallback).
                dev_entry = self.dev_oidc_entry(oidc.as_ref(), &selectors, now);
                match &dev_entry {
                    Some(e) => e,
                    None => {
                        let err = IssueError::NoEntry;
                        let request = request_record(
                            attestation_kind,
                            &selectors,
                            &resources,
                            ttl,
                            wanted,
                            oidc.as_ref(),
                            origin,
                            false,
                        );
                        self.record_refusal(
                            kind,
                            &caller_record,
                            wanted,
                            &ttl,
                            &err.to_string(),
                            version,
                            origin,
                            Some(request),
                        )
                        .await?;
                        return Err(err);
                    }
                }
            }
            other => {
                let err = match other {
                    Lookup::Expired(e) => {
                        IssueError::EntryExpired { id: e.id.to_string(), expires: e.expires.to_string() }
                    }
                    Lookup::Ambiguous(ids) => IssueError::Ambiguous(ids.iter().map(ToString::to_string).collect()),
                    _ => IssueError::NoEntry,
                };
                // The inventory said no: a candidate release's inventory might say yes, so
                // the request is kept for `mayfly policy replay`.
                let request =
                    request_record(attestation_kind, &selectors, &resources, ttl, wanted, oidc.as_ref(), origin, false);
                self.record_refusal(
                    kind,
                    &caller_record,
                    wanted,
                    &ttl,
                    &err.to_string(),
                    version,
                    origin,
                    Some(request),
                )
                .await?;
                return Err(err);
            }
        };

        if let Some(lock) = self.revocations.lock_for(&entry.id, now) {
            let err = IssueError::Locked { identity: entry.id.to_string(), reason: lock.reason };
            self.record_refusal(kind, &caller_record, Some(&entry.id), &ttl, &err.to_string(), version, origin, None)
                .await?;
            return Err(err);
        }
        let request = request_record(
            attestation_kind,
            &selectors,
            &resources,
            ttl,
            wanted,
            oidc.as_ref(),
            origin,
            used_dev_identity,
        );
        let context = RequestContext {
            oidc,
            break_glass: origin.emergency.is_some(),
            ticket: origin.emergency.as_ref().map(|e| e.ticket.clone()),
            purpose: origin.emergency.as_ref().map(|e| e.reason.clone()),
            ..RequestContext::default()
        };
        let decisions: Vec<Decision> = resources
            .iter()
            .map(|resource| {
                if let Resource::Jwt { audience } = resource
                    && self.reserved_audiences.contains(audience)
                {
                    return Decision {
                        verdict: Verdict::Deny,
                        rules: vec!["mayfly-reserved-audience".into()],
                        reasons: vec![format!("the audience `{audience}` is reserved for mayfly's own STS assertions (aws.web_identity_audience)")],
                        errors: vec![],
                        policy_version: release.version().to_owned(),
                        needs_approval: false,
                    };
                }
                release.engine.decide(
                    &DecisionRequest {
                        workload: entry,
                        attestation: attestation_kind,
                        selectors: &selectors,
                        resource,
                        requested_ttl: ttl,
                        context: &context,
                    },
                    now,
                )
            })
            .collect();
        // Several resources (JWT audiences) are allowed only if each one is.
        let Combined { allowed, granted_ttl_secs: granted, rules, explain } = Combined::of(&decisions);
        let errors: Vec<&String> = decisions.iter().flat_map(|d| d.errors.iter()).collect();
        let described: Vec<String> = resources.iter().map(Resource::describe).collect();
        let shadow_request = self.shadow.load().is_some().then(|| request.clone());
        let decision_id = self
            .ledger
            .record(NewEvent {
                kind: EventKind::Decision,
                at: now,
                body: json!({
                    "action": format!("issue_{}", kind.as_str()),
                    "resource": described.join(", "),
                    "outcome": if allowed { "allow" } else { "deny" },
                    "reason": explain,
                    "rules": rules,
                    "errors": errors,
                    "policy_version": version,
                    "identity": entry.id.as_str(),
                    "owner": entry.owner,
                    "purpose": entry.purpose,
                    "caller": caller_record,
                    "requested_ttl_secs": ttl.as_secs(),
                    "granted_ttl_secs": granted,
                    "api": origin.api,
                    "rotates": origin.rotates,
                    "break_glass": origin.emergency.is_some(),
                    "ticket": origin.emergency.as_ref().map(|e| &e.ticket),
                    "justification": origin.emergency.as_ref().map(|e| &e.reason),
                    "needs_approval": decisions.iter().any(|d| d.needs_approval),
                    "request": request,
                }),
                credential: None,
            })
            .await?;
        if let Some(request) = shadow_request {
            let live = Outcome {
                allowed,
                identity: Some(entry.id.to_string()),
                granted_ttl_secs: granted,
                rules: rules.clone(),
                reason: explain.clone(),
            };
            self.shadow_compare(&request, live, Some(decision_id), now);
        }
        if !allowed {
            tracing::info!(identity = %entry.id, decision_id, reason = %explain, "issuance denied");
            let denied_rules =
                decisions.iter().filter(|d| !d.is_allow()).flat_map(|d| d.rules.iter().cloned()).collect();
            return Err(IssueError::Denied { explain, rules: denied_rules });
        }
        let decisions_needed_approval = decisions.iter().any(|d| d.needs_approval);
        let grants = decisions
            .into_iter()
            .filter_map(|d| match d.verdict {
                Verdict::Allow(g) => Some(g),
                Verdict::Deny => None,
            })
            .collect();
        Ok(Authorized {
            grants,
            decision_id,
            now,
            needs_approval: origin.emergency.is_some() && decisions_needed_approval,
            identity_record: json!({ "identity": entry.id.as_str(), "caller": caller_record }),
        })
    }

    /// The last steps before a minted credential may leave, in the one order every kind
    /// follows: the elevated sinks first (break-glass; if they fail, nothing is issued),
    /// then the durable `issued` event. Until this returns the credential exists only in
    /// the caller's frame.
    async fn commit(
        &self,
        identity: &WorkloadId,
        record: CredentialRecord,
        now: SystemTime,
        extra: Option<serde_json::Value>,
        elevated: Option<&Elevated>,
    ) -> Result<EventId, IssueError> {
        let id = record.id.clone();
        // Again here, after minting: a lock placed while this request was in flight (an STS
        // call takes seconds; an approval, minutes) stops the credential from leaving.
        if let Some(lock) = self.revocations.lock_for(identity, self.clock.now()) {
            tracing::warn!(identity = %identity, credential_id = id, kind = record.kind, "identity locked while the request was in flight; the credential is dropped");
            return Err(IssueError::Locked { identity: identity.to_string(), reason: lock.reason });
        }
        if let Some(elevated) = elevated {
            self.elevate(elevated, "issued", json!({ "credential": record, "emergency": extra })).await?;
        }
        let issued_id = self.record_issued(record, now, extra).await?;
        if elevated.is_some() {
            self.bg_ids().insert(id);
        }
        Ok(issued_id)
    }

    /// The dev identity for an unregistered token subject: `spiffe://<td>/dev/oidc/<sub>`,
    /// the subject reduced to the characters a SPIFFE path allows.
    fn dev_oidc_entry(
        &self,
        claims: Option<&OidcClaims>,
        selectors: &Selectors,
        now: SystemTime,
    ) -> Option<InventoryEntry> {
        let td = &self.exchange.as_ref()?.trust_domain;
        let sub: String = claims?
            .subject
            .chars()
            .take(128)
            .map(|c| if c.is_ascii_alphanumeric() || "-._".contains(c) { c } else { '_' })
            .collect();
        let id = WorkloadId::parse(&format!("spiffe://{td}/dev/oidc/{sub}")).ok()?;
        Some(InventoryEntry {
            id,
            owner: "mayfly dev (--oidc-issuer)".into(),
            purpose: "quick tries of the token exchange".into(),
            environment: "dev".into(),
            tier: "experimental".into(),
            expires: utc_date(now),
            selectors: selectors.clone(),
        })
    }

    /// The `issued` event: the credential row, plus what an auditor needs beyond it — a
    /// token caller's provenance (repository, ref, sha, workflow, run) or the break-glass
    /// flag, ticket and justification.
    async fn record_issued(
        &self,
        record: CredentialRecord,
        at: SystemTime,
        extra: Option<serde_json::Value>,
    ) -> Result<EventId, IssueError> {
        let mut body =
            serde_json::to_value(&record).map_err(|e| LedgerError::Storage(format!("issued record: {e}")))?;
        if let (Some(serde_json::Value::Object(extra)), Some(map)) = (extra, body.as_object_mut()) {
            for (k, v) in extra {
                map.entry(k).or_insert(v);
            }
        }
        Ok(self.ledger.record(NewEvent { kind: EventKind::Issued, at, body, credential: Some(record) }).await?)
    }

    async fn attest(&self, peer: &PeerInfo) -> Result<Attestation, AttestError> {
        let attestor = Arc::clone(&self.attestor);
        let peer = peer.clone();
        let pid = peer.pid.unwrap_or(0);
        tokio::task::spawn_blocking(move || attestor.attest(&peer))
            .await
            .unwrap_or_else(|_| Err(AttestError::Proc { pid, why: "attestation task failed".into() }))
    }

    /// A denial that happened before policy could be asked: still a `decision` in the ledger,
    /// with the request when the caller was attested (so a candidate release can replay it).
    #[expect(clippy::too_many_arguments, reason = "each argument is a recorded field of the refusal")]
    async fn record_refusal(
        &self,
        kind: CredentialKind,
        caller: &serde_json::Value,
        wanted: Option<&WorkloadId>,
        ttl: &Ttl,
        reason: &str,
        policy_version: &str,
        origin: &Origin,
        request: Option<serde_json::Value>,
    ) -> Result<EventId, LedgerError> {
        tracing::info!(caller = %caller, reason, "issuance refused");
        let shadow_request = request.as_ref().filter(|_| self.shadow.load().is_some()).cloned();
        let id = self
            .ledger
            .record(NewEvent {
                kind: EventKind::Decision,
                at: self.clock.now(),
                body: json!({
                    "action": format!("issue_{}", kind.as_str()),
                    "outcome": "deny",
                    "reason": reason,
                    "rules": [],
                    "policy_version": policy_version,
                    "identity": wanted.map(WorkloadId::as_str),
                    "caller": caller,
                    "requested_ttl_secs": ttl.as_secs(),
                    "api": origin.api,
                    "rotates": origin.rotates,
                    "break_glass": origin.emergency.is_some(),
                    "ticket": origin.emergency.as_ref().map(|e| &e.ticket),
                    "justification": origin.emergency.as_ref().map(|e| &e.reason),
                    "request": request,
                }),
                credential: None,
            })
            .await?;
        if let Some(request) = shadow_request {
            let live = Outcome {
                allowed: false,
                identity: wanted.map(ToString::to_string),
                granted_ttl_secs: None,
                rules: vec![],
                reason: reason.to_owned(),
            };
            self.shadow_compare(&request, live, Some(id), self.clock.now());
        }
        Ok(id)
    }
}

/// What policy was (or would have been) asked, as the decision event keeps it: enough for
/// `mayfly policy replay` to decide the same request again under another release. No
/// secrets: selectors and verified claims only, never a token.
#[expect(clippy::too_many_arguments, reason = "each is a field of the recorded request")]
fn request_record(
    attestation: &str,
    selectors: &Selectors,
    resources: &[Resource],
    ttl: Ttl,
    wanted: Option<&WorkloadId>,
    oidc: Option<&OidcClaims>,
    origin: &Origin,
    dev_identity: bool,
) -> serde_json::Value {
    let resources: Vec<serde_json::Value> = resources
        .iter()
        .map(|r| match r {
            Resource::X509 => json!({ "kind": "x509" }),
            Resource::Jwt { audience } => json!({ "kind": "jwt", "audience": audience }),
            Resource::Aws { role } => json!({ "kind": "aws", "role": role.arn() }),
        })
        .collect();
    let claims: Option<serde_json::Map<String, serde_json::Value>> =
        oidc.map(|c| c.fields().into_iter().map(|(k, v)| (k.to_owned(), json!(v))).collect());
    json!({
        "attestation": attestation,
        "selectors": selectors.iter().map(ToString::to_string).collect::<Vec<_>>(),
        "resources": resources,
        "requested_ttl_secs": ttl.as_secs(),
        "spiffe_id": wanted.map(WorkloadId::as_str),
        "oidc": claims,
        "break_glass": origin.emergency.is_some(),
        "ticket": origin.emergency.as_ref().map(|e| &e.ticket),
        "purpose": origin.emergency.as_ref().map(|e| &e.reason),
        "dev_identity": dev_identity,
    })
}

fn provenance(caller: Caller<'_>) -> Option<serde_json::Value> {
    match caller {
        Caller::Local(_) => None,
        Caller::Token(t) => Some(json!({ "provenance": t.provenance })),
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime};

    use super::*;
    use crate::clock::FixedClock;
    use crate::identity::{Selector, Selectors, TrustDomain};
    use crate::keys::{CertificateAuthority, JwtKey};
    use crate::ledger::memory::MemoryBackend;
    use crate::ledger::{GroupCommitLedger, verify_chain};
    use crate::mint::aws::fake::FakeSts;
    use crate::mint::jwt::Es256Minter;
    use crate::mint::x509::X509Minter;
    use crate::policy::release::Release;

    /// Attests every caller with fixed selectors.
    struct FakeAttestor(Result<Selectors, AttestError>);

    impl Attestor for FakeAttestor {
        fn attest(&self, _peer: &PeerInfo) -> Result<Attestation, AttestError> {
            self.0.clone().map(|selectors| Attestation { selectors, caller: CallerSummary::default() })
        }
    }

    /// Lets the first `n` records through, then fails.
    struct FailAfter {
        inner: GroupCommitLedger,
        left: std::sync::Mutex<usize>,
    }

    impl Ledger for FailAfter {
        fn record(&self, event: NewEvent) -> crate::ledger::BoxFuture<'_, Result<EventId, LedgerError>> {
            let mut left = self.left.lock().unwrap();
            if *left == 0 {
                return Box::pin(async { Err(LedgerError::Storage("disk full".into())) });
            }
            *left -= 1;
            self.inner.record(event)
        }
    }

    const INVENTORY: &str = r#"
        [[workload]]
        id = "spiffe://mayfly.local/api"
        owner = "team-api"
        purpose = "test"
        environment = "prod"
        tier = "standard"
        expires = 2030-01-01
        selectors = ["unix:uid:1001"]
    "#;

    /// The shipped rules plus a JWT permit for one audience, so a multi-audience request
    /// can be half allowed.
    const JWT_RULE: &str = r#"
        @id("api-jwt-db")
        @max_ttl("10m")
        permit (principal, action == Mayfly::Action::"issue_jwt", resource == Mayfly::Audience::"db")
        when { principal.attestation == "unix" };
    "#;

    async fn issuer(selectors: &[&str], ledger_ok_records: Option<usize>) -> (Issuer, MemoryBackend) {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let td = TrustDomain::parse("mayfly.local").unwrap();
        let ca =
            CertificateAuthority::generate(&td, now - Duration::from_secs(60), Duration::from_secs(86_400)).unwrap();
        let files = crate::policy::shipped_files_with(&[
            ("inventory.toml", Some(INVENTORY)),
            ("tests/local.toml", None),
            ("tests/ci.toml", None),
            ("issuance/jwt-test.cedar", Some(JWT_RULE)),
            ("issuance/aws-test.cedar", Some(AWS_RULE)),
        ]);
        let release = Release::build(&files, &td, None, None, "test".into()).unwrap();
        let backend = MemoryBackend::default();
        let (gc, _task) = GroupCommitLedger::start(backend.clone(), 16).await.unwrap();
        let ledger: Arc<dyn Ledger> = match ledger_ok_records {
            Some(n) => Arc::new(FailAfter { inner: gc, left: std::sync::Mutex::new(n) }),
            None => Arc::new(gc),
        };
        let selectors = selectors.iter().map(|s| Selector::parse(s).unwrap()).collect();
        let issuer = Issuer::new(
            Arc::new(FakeAttestor(Ok(selectors))),
            Arc::new(PolicyStore::new(Arc::new(release), None)),
            Arc::new(X509Minter::new(Arc::new(ca))),
            Arc::new(Es256Minter::new(JwtKey::generate().unwrap(), td.clone()).unwrap()),
            ledger,
            Arc::new(FixedClock::new(now)),
        );
        (issuer, backend)
    }

    fn request(ttl: &str) -> X509Request {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let csr = rcgen::CertificateParams::default().serialize_request(&key).unwrap();
        X509Request {
            key: KeySource::Csr(VerifiedCsr::parse(csr.der()).unwrap()),
            ttl: Ttl::parse(ttl).unwrap(),
            spiffe_id: None,
            origin: Origin::default(),
        }
    }

    const AWS_RULE: &str = r#"
        @id("api-reads-reports")
        @max_ttl("1h")
        @aws_session_tags("owner")
        permit (principal, action == Mayfly::Action::"issue_aws", resource == Mayfly::AwsRole::"arn:aws:iam::111122223333:role/api-reports-read")
        when { principal.attestation == "unix" };
    "#;

    /// `issuer` with AWS served by a scripted STS (and the rule above).
    async fn aws_issuer(ledger_ok_records: Option<usize>) -> (Arc<Issuer>, MemoryBackend, Arc<FakeSts>) {
        let (issuer, backend) = issuer(&["unix:uid:1001"], ledger_ok_records).await;
        let sts = Arc::new(FakeSts::default());
        let limits = crate::mint::aws::Limits {
            attempts: 2,
            attempt_timeout: Duration::from_secs(30),
            backoff: Duration::from_millis(1),
            max_in_flight: 8,
        };
        let minter = AwsMinter::new(sts.clone(), None, crate::mint::aws::Mode::AssumeRole, limits);
        (Arc::new(issuer.with_aws(Arc::new(minter))), backend, sts)
    }

    fn aws_request(role: &str, ttl: &str) -> AwsRequest {
        AwsRequest {
            role: AwsRole::parse(role).unwrap(),
            ttl: Ttl::parse(ttl).unwrap(),
            spiffe_id: None,
            origin: Origin::default(),
        }
    }

    const REPORTS_ROLE: &str = "arn:aws:iam::111122223333:role/api-reports-read";

    #[tokio::test]
    async fn an_aws_session_is_recorded_with_its_source_identity_and_expiry_and_never_its_secrets() {
        let (issuer, backend, sts) = aws_issuer(None).await;
        let issued = issuer.issue_aws(&PeerInfo::without_credentials(), aws_request(REPORTS_ROLE, "2h")).await.unwrap();
        assert_eq!(issued.source_identity, "mayfly.local+api");
        assert_eq!(issued.session.secret_access_key.expose(), "fake-secret", "the caller gets the secret");
        let sent = sts.requests.lock().unwrap()[0].0.clone();
        assert_eq!(
            (sent.duration_seconds, sent.tags.clone()),
            (3600, vec![("owner".to_owned(), "team-api".to_owned())]),
            "the rule's 1h ceiling and tag"
        );
        let events = backend.events();
        assert_eq!(events.iter().map(|e| e.kind.as_str()).collect::<Vec<_>>(), ["decision", "issued"]);
        let body: serde_json::Value = serde_json::from_str(&events[1].body).unwrap();
        assert_eq!(body["source_identity"], "mayfly.local+api");
        assert_eq!(body["access_key_id"], "ASIAFAKE0000000001");
        assert_eq!(body["session_name"], sent.role_session_name);
        assert_eq!(
            body["assumed_role_arn"],
            format!("arn:aws:sts::111122223333:assumed-role/api-reports-read/{}", sent.role_session_name)
        );
        assert_eq!(body["not_after"], json!(1_800_000_000 + 3600));
        for e in &events {
            assert!(
                !e.body.contains("fake-secret") && !e.body.contains("fake-token"),
                "a secret reached the ledger: {}",
                e.body
            );
        }
        let creds = backend.credentials();
        assert_eq!((creds[0].1.kind.as_str(), creds[0].1.serial.as_str()), ("aws", "ASIAFAKE0000000001"));
    }

    #[tokio::test]
    async fn a_denied_aws_request_never_reaches_sts_and_the_denial_is_recorded() {
        let (issuer, backend, sts) = aws_issuer(None).await;
        let err = issuer
            .issue_aws(&PeerInfo::without_credentials(), aws_request("arn:aws:iam::111122223333:role/admin", "15m"))
            .await
            .unwrap_err();
        assert!(matches!(err, IssueError::Denied { .. }), "{err:?}");
        assert!(sts.requests.lock().unwrap().is_empty());
        let events = backend.events();
        assert_eq!(events.len(), 1);
        assert!(
            events[0].body.contains("\"outcome\":\"deny\"")
                && events[0].body.contains("role arn:aws:iam::111122223333:role/admin")
        );
    }

    #[tokio::test]
    async fn an_sts_failure_leaves_no_credential_and_says_unavailable_with_the_aws_code() {
        let (issuer, backend, sts) = aws_issuer(None).await;
        let throttled = crate::mint::aws::AwsError::Service {
            operation: "AssumeRole",
            code: "Throttling".into(),
            message: "Rate exceeded".into(),
        };
        sts.failures.lock().unwrap().extend([throttled.clone(), throttled]);
        let err =
            issuer.issue_aws(&PeerInfo::without_credentials(), aws_request(REPORTS_ROLE, "1h")).await.unwrap_err();
        let status = crate::api::status(&err);
        assert_eq!(status.code(), tonic::Code::Unavailable);
        assert!(status.message().contains("Throttling"), "{}", status.message());
        assert_eq!(sts.requests.lock().unwrap().len(), 2, "attempts = 2");
        assert!(backend.credentials().is_empty());
        assert_eq!(backend.events().iter().map(|e| e.kind.as_str()).collect::<Vec<_>>(), ["decision"]);
    }

    #[tokio::test]
    async fn a_session_that_cannot_be_recorded_is_not_handed_out() {
        let (issuer, backend, sts) = aws_issuer(Some(1)).await;
        let err =
            issuer.issue_aws(&PeerInfo::without_credentials(), aws_request(REPORTS_ROLE, "1h")).await.unwrap_err();
        assert!(matches!(err, IssueError::Ledger(_)), "{err:?}");
        assert_eq!(sts.requests.lock().unwrap().len(), 1, "STS made one");
        assert!(backend.credentials().is_empty());
    }

    /// An AWS issuance started and now waiting inside STS until `gate` is notified.
    async fn aws_issuance_held_at_sts(
        issuer: &Arc<Issuer>,
        sts: &FakeSts,
    ) -> (Arc<tokio::sync::Notify>, tokio::task::JoinHandle<Result<IssuedAws, IssueError>>) {
        let gate = Arc::new(tokio::sync::Notify::new());
        *sts.hold.lock().unwrap() = Some(gate.clone());
        let pending = tokio::spawn({
            let issuer = issuer.clone();
            async move { issuer.issue_aws(&PeerInfo::without_credentials(), aws_request(REPORTS_ROLE, "1h")).await }
        });
        while sts.waiting.load(std::sync::atomic::Ordering::SeqCst) == 0 {
            tokio::task::yield_now().await;
        }
        (gate, pending)
    }

    #[tokio::test]
    async fn a_slow_sts_does_not_hold_up_x509_or_jwt_issuance() {
        let (issuer, _backend, sts) = aws_issuer(None).await;
        let (gate, pending) = aws_issuance_held_at_sts(&issuer, &sts).await;
        issuer.issue_x509(&PeerInfo::without_credentials(), request("1h")).await.unwrap();
        assert!(!pending.is_finished(), "the AWS call is still waiting on STS");
        gate.notify_one();
        assert!(pending.await.unwrap().is_ok());
    }

    #[tokio::test]
    async fn shadow_mode_records_what_a_candidate_would_change_and_never_acts_on_it() {
        let (issuer, backend) = issuer(&["unix:uid:1001"], None).await;
        let wider = r#"
            @id("api-jwt-anything")
            @max_ttl("10m")
            permit (principal, action == Mayfly::Action::"issue_jwt", resource) when { principal.attestation == "unix" };
        "#;
        let files = crate::policy::shipped_files_with(&[
            ("inventory.toml", Some(INVENTORY)),
            ("tests/local.toml", None),
            ("tests/ci.toml", None),
            ("issuance/jwt-test.cedar", Some(JWT_RULE)),
            ("issuance/aws-test.cedar", Some(AWS_RULE)),
            ("issuance/wider.cedar", Some(wider)),
        ]);
        let candidate =
            Release::build(&files, &TrustDomain::parse("mayfly.local").unwrap(), None, None, "candidate".into())
                .unwrap();
        let candidate_version = candidate.version().to_owned();
        issuer.set_shadow(Some(Arc::new(candidate)), json!({ "uid": 0 }), "try the wider JWT rule").await.unwrap();
        assert_eq!(issuer.shadow_version().as_deref(), Some(candidate_version.as_str()));

        // Live: denied, as the active release says. The shadow would allow it: recorded only.
        let err =
            issuer.issue_jwt(&PeerInfo::without_credentials(), jwt_request(&["payments"], "5m")).await.unwrap_err();
        assert!(matches!(err, IssueError::Denied { .. }), "{err:?}");
        // Same decision under both: nothing recorded.
        issuer.issue_jwt(&PeerInfo::without_credentials(), jwt_request(&["db"], "5m")).await.unwrap();
        let mut diffs = Vec::new();
        for _ in 0..200 {
            diffs = backend.events().into_iter().filter(|e| e.kind == "policy_shadow_diff").collect();
            if !diffs.is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(diffs.len(), 1, "one difference");
        let body: serde_json::Value = serde_json::from_str(&diffs[0].body).unwrap();
        assert_eq!((body["change"].as_str(), body["escalation"].as_bool()), (Some("newly_allowed"), Some(true)));
        assert_eq!(body["candidate"], candidate_version);
        assert_eq!(body["resource"], "audience payments");
        assert_eq!(body["shadow"]["rules"], json!(["api-jwt-anything"]));
        assert_eq!(body["live"]["allowed"], json!(false));
        let kinds: Vec<String> = backend.events().iter().map(|e| e.kind.clone()).collect();
        assert_eq!(
            kinds.iter().filter(|k| *k == "issued").count(),
            1,
            "only the live allow issued anything: {kinds:?}"
        );
        assert!(kinds.contains(&"policy_shadow".to_owned()));

        issuer.set_shadow(None, json!({ "uid": 0 }), "done").await.unwrap();
        assert!(issuer.shadow_version().is_none());
    }

    #[tokio::test]
    async fn a_lock_placed_while_sts_answers_stops_the_session_from_leaving() {
        let (issuer, backend, sts) = aws_issuer(None).await;
        let (gate, pending) = aws_issuance_held_at_sts(&issuer, &sts).await;
        issuer.revocations().apply_lock(crate::revoke::Lock {
            target: "spiffe://mayfly.local/api".into(),
            until: None,
            reason: "INC-3".into(),
            operator: json!({}),
        });
        gate.notify_one();
        let err = pending.await.unwrap().unwrap_err();
        assert!(matches!(err, IssueError::Locked { .. }), "{err:?}");
        assert!(backend.credentials().is_empty(), "the session STS made was not handed out");
    }

    #[tokio::test]
    async fn no_jwt_svid_is_issued_for_the_sts_assertion_audience() {
        let (issuer, backend) = issuer(&["unix:uid:1001"], None).await;
        let td = TrustDomain::parse("mayfly.local").unwrap();
        let jwt: Arc<dyn JwtMinter> = Arc::new(Es256Minter::new(JwtKey::generate().unwrap(), td).unwrap());
        let limits = crate::mint::aws::Limits {
            attempts: 1,
            attempt_timeout: Duration::from_secs(5),
            backoff: Duration::from_millis(1),
            max_in_flight: 1,
        };
        // The assertion audience is one a rule grants JWT-SVIDs for: the reservation wins.
        let minter = AwsMinter::new(
            Arc::new(FakeSts::default()),
            None,
            crate::mint::aws::Mode::WebIdentity { jwt, audience: "db".into() },
            limits,
        );
        let issuer = issuer.with_aws(Arc::new(minter));
        let err = issuer.issue_jwt(&PeerInfo::without_credentials(), jwt_request(&["db"], "5m")).await.unwrap_err();
        assert!(
            matches!(&err, IssueError::Denied { rules, .. } if rules == &vec!["mayfly-reserved-audience".to_owned()]),
            "{err:?}"
        );
        assert!(backend.events()[0].body.contains("reserved for mayfly's own STS assertions"));
        assert!(backend.credentials().is_empty());
    }

    #[tokio::test]
    async fn without_aws_configured_nothing_is_decided() {
        let (issuer, backend) = issuer(&["unix:uid:1001"], None).await;
        let err =
            issuer.issue_aws(&PeerInfo::without_credentials(), aws_request(REPORTS_ROLE, "1h")).await.unwrap_err();
        assert!(matches!(err, IssueError::NoAws));
        assert_eq!(crate::api::status(&err).code(), tonic::Code::FailedPrecondition);
        assert!(backend.events().is_empty());
    }

    fn jwt_request(audiences: &[&str], ttl: &str) -> JwtRequest {
        JwtRequest {
            audiences: audiences.iter().map(|a| (*a).to_owned()).collect(),
            ttl: Ttl::parse(ttl).unwrap(),
            spiffe_id: None,
            origin: Origin::default(),
        }
    }

    #[tokio::test]
    async fn issuance_records_decision_then_credential() {
        let (issuer, backend) = issuer(&["unix:uid:1001"], None).await;
        let issued = issuer.issue_x509(&PeerInfo::without_credentials(), request("2h")).await.unwrap();
        assert_eq!(issued.identity.as_str(), "spiffe://mayfly.local/api");
        assert_eq!(unix_secs(issued.svid.not_after) - unix_secs(issued.svid.not_before), 3600);
        let events = backend.events();
        assert_eq!(events.iter().map(|e| e.kind.as_str()).collect::<Vec<_>>(), ["decision", "issued"]);
        assert!(events[0].body.contains("local-workloads-x509"));
        let creds = backend.credentials();
        assert_eq!(creds.len(), 1);
        assert_eq!(creds[0].1.serial, issued.svid.serial);
        assert_eq!(creds[0].1.decision_id, issued.decision_id);
        assert_eq!(verify_chain(&events), Ok(2));
    }

    #[tokio::test]
    async fn unknown_callers_are_denied_and_the_denial_recorded() {
        let (issuer, backend) = issuer(&["unix:uid:4242"], None).await;
        let err = issuer.issue_x509(&PeerInfo::without_credentials(), request("1h")).await.unwrap_err();
        assert!(matches!(err, IssueError::NoEntry));
        let events = backend.events();
        assert_eq!(events.len(), 1);
        assert!(events[0].body.contains("\"outcome\":\"deny\""));
        assert!(backend.credentials().is_empty());
    }

    #[tokio::test]
    async fn when_the_issued_record_fails_nothing_is_returned() {
        // The decision is recorded, the issued event is not: the caller gets an error, no certificate.
        let (issuer, backend) = issuer(&["unix:uid:1001"], Some(1)).await;
        let err = issuer.issue_x509(&PeerInfo::without_credentials(), request("1h")).await.unwrap_err();
        assert!(matches!(err, IssueError::Ledger(_)), "{err:?}");
        assert!(backend.credentials().is_empty());
        assert_eq!(backend.events().len(), 1);
    }

    #[tokio::test]
    async fn when_the_decision_cannot_be_recorded_nothing_is_minted() {
        let (issuer, backend) = issuer(&["unix:uid:1001"], Some(0)).await;
        let err = issuer.issue_x509(&PeerInfo::without_credentials(), request("1h")).await.unwrap_err();
        assert!(matches!(err, IssueError::Ledger(_)));
        assert!(backend.events().is_empty());
    }

    #[tokio::test]
    async fn a_server_made_key_is_made_only_after_an_allow_and_matches_the_certificate() {
        let (issuer, backend) = issuer(&["unix:uid:1001"], None).await;
        let req = X509Request {
            key: KeySource::ServerMade,
            ttl: Ttl::parse("10m").unwrap(),
            spiffe_id: None,
            origin: Origin::default(),
        };
        let issued = issuer.issue_x509(&PeerInfo::without_credentials(), req).await.unwrap();
        let key = issued.private_key.expect("server-made key returned");
        let pair = rcgen::KeyPair::try_from(key.expose()).unwrap();
        let (_, cert) = x509_parser::parse_x509_certificate(&issued.svid.cert_der).unwrap();
        assert_eq!(cert.public_key().raw, rcgen::PublicKeyData::subject_public_key_info(&pair).as_slice());
        // The ledger holds the serial, never the key.
        let der_hex = hex::encode(key.expose());
        assert!(!backend.events().iter().any(|e| e.body.contains(&der_hex[..32])));

        let (stranger, _) = super::tests::issuer(&["unix:uid:4242"], None).await;
        let req = X509Request {
            key: KeySource::ServerMade,
            ttl: Ttl::parse("10m").unwrap(),
            spiffe_id: None,
            origin: Origin::default(),
        };
        assert!(matches!(stranger.issue_x509(&PeerInfo::without_credentials(), req).await, Err(IssueError::NoEntry)));
    }

    #[tokio::test]
    async fn a_jwt_needs_every_audience_granted_and_is_recorded_by_jti() {
        let (issuer, backend) = issuer(&["unix:uid:1001"], None).await;
        let issued = issuer.issue_jwt(&PeerInfo::without_credentials(), jwt_request(&["db"], "1h")).await.unwrap();
        assert_eq!(issued.svid.jti, issued.credential_id);
        assert_eq!(
            unix_secs(issued.svid.not_after) - unix_secs(issued.svid.not_before),
            600,
            "clamped to the rule's 10m"
        );
        let creds = backend.credentials();
        assert_eq!(creds.len(), 1);
        assert_eq!((creds[0].1.kind.as_str(), creds[0].1.serial.as_str()), ("jwt", issued.credential_id.as_str()));
        // The token itself is never recorded.
        assert!(!backend.events().iter().any(|e| e.body.contains(issued.svid.token.expose())));

        // One audience not granted: the whole request is denied, naming nothing it should not.
        let err = issuer
            .issue_jwt(&PeerInfo::without_credentials(), jwt_request(&["db", "payments"], "5m"))
            .await
            .unwrap_err();
        assert!(matches!(err, IssueError::Denied { .. }), "{err:?}");
        let events = backend.events();
        let last = events.last().unwrap();
        assert!(
            last.kind == "decision"
                && last.body.contains("\"outcome\":\"deny\"")
                && last.body.contains("audience payments")
        );
        assert_eq!(backend.credentials().len(), 1);
    }

    #[tokio::test]
    async fn a_successful_validation_is_a_used_event_and_a_failed_one_is_not() {
        let (issuer, backend) = issuer(&["unix:uid:1001"], None).await;
        let issued = issuer.issue_jwt(&PeerInfo::without_credentials(), jwt_request(&["db"], "5m")).await.unwrap();
        let peer = PeerInfo::without_credentials();
        let ok = issuer.validate_jwt(&peer, issued.svid.token.expose(), "db").await.unwrap();
        assert_eq!(ok.identity.as_str(), "spiffe://mayfly.local/api");
        let before = backend.events().len();
        assert!(matches!(
            issuer.validate_jwt(&peer, issued.svid.token.expose(), "other").await,
            Err(IssueError::InvalidJwt(_))
        ));
        let events = backend.events();
        assert_eq!(events.len(), before);
        let used = events.iter().find(|e| e.kind == "used").unwrap();
        assert!(used.body.contains(&issued.credential_id) && used.body.contains("\"audience\":\"db\""));
        assert_eq!(verify_chain(&events), Ok(events.len()));
    }
}
