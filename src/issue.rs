//! The one issuance pipeline, for every credential kind and every caller:
//! identify (attest a local peer, or verify a presented id-token) → inventory → decide
//! (policy) → record the decision → mint → commit (the durable `issued` event) → answer.
//! Nothing leaves without its `issued` event being durable (`commit` makes the only value
//! a credential can leave in); every refusal after the request parsed is a recorded
//! `decision`, written in one place (`record_decision`). Break-glass (`breakglass`) and
//! shadow evaluation (`policy::shadow`) are built around these steps; JWT validation lives
//! in `validate`. Knows nothing of protobuf or sockets.

mod commit;
pub mod refusals;

use std::sync::Arc;
use std::time::SystemTime;

use crate::attest::oidc::{OidcError, OidcVerifier};
use crate::attest::{AttestError, Attestor, CallerSummary, PeerInfo};
use crate::breakglass::{ApprovalError, EmergencyLog};
use crate::clock::{Clock, utc_date};
use crate::identity::{InventoryEntry, Lookup, OidcClaims, Selectors, TrustDomain, Ttl, WorkloadId};
use crate::ledger::event::{self, Caller as CallerRecord, IssuedDetails, Provenance, RequestRecord, ResourceRecord};
use crate::ledger::{EventId, Ledger, LedgerError};
use crate::limits::{Admission, Admitted, CallerKey, Limited};
use crate::mint::aws::{AwsMintError, AwsMinter};
use crate::mint::{JwtError, JwtMinter, MintError, Minter, VerifiedCsr, WitMinter};
use crate::policy::shadow::Shadow;
use crate::policy::store::PolicyStore;
use crate::policy::{AwsRole, Combined, CredentialKind, Decision, DecisionRequest, Grant, RequestContext, Resource};
use crate::revoke::Revocations;

pub use commit::{AwsCredential, Credential, Issued, WitCredential, X509Credential};

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
    /// An entry knows the caller's repository name under other immutable ids.
    #[error("{0}")]
    NameReused(String),
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
    #[error("this daemon's view of the shared state is {} s old (over ledger.max_staleness); nothing was issued", .age.as_secs())]
    Stale { age: std::time::Duration },
    #[error(transparent)]
    Limited(#[from] Limited),
}

/// How current this daemon's view of state other daemons share is (revocations, locks,
/// policy): past its bound, issuance is refused rather than made under a lock it may have
/// missed.
pub trait Freshness: Send + Sync + 'static {
    /// `Err(age)` when the view is older than allowed.
    fn check(&self) -> Result<(), std::time::Duration>;
}

/// Who is asking: a local process (kernel-attested) or the holder of an id-token presented
/// over TLS (verified here, so its refusal is recorded like any other).
#[derive(Clone, Copy, Debug)]
pub enum Caller<'a> {
    Local(&'a PeerInfo),
    Presented { token: &'a str, remote: &'a str },
}

/// Where the key of an X.509 SVID comes from.
#[derive(Debug)]
pub enum KeySource {
    /// The workload made its key and sent a CSR (`mayfly.v1`, the exchange): the key never travels.
    Csr(VerifiedCsr),
    /// The Workload API: mayfly makes the key after the decision and hands it out once.
    ServerMade,
}

/// What is asked for. The lifetime, identity and names of what is minted come from the
/// grant, never from here.
#[derive(Debug)]
pub enum Ask {
    X509 {
        key: KeySource,
    },
    /// Every audience must be granted.
    Jwt {
        audiences: Vec<String>,
    },
    Aws {
        role: AwsRole,
    },
    /// A WIT-SVID. Its key is always made here, after the decision, and handed out once.
    Wit,
}

impl Ask {
    pub fn kind(&self) -> CredentialKind {
        match self {
            Ask::X509 { .. } => CredentialKind::X509,
            Ask::Jwt { .. } => CredentialKind::Jwt,
            Ask::Aws { .. } => CredentialKind::Aws,
            Ask::Wit => CredentialKind::Wit,
        }
    }

    fn resources(&self) -> Vec<Resource> {
        match self {
            Ask::X509 { .. } => vec![Resource::X509],
            Ask::Jwt { audiences } => audiences.iter().map(|a| Resource::Jwt { audience: a.clone() }).collect(),
            Ask::Aws { role } => vec![Resource::Aws { role: role.clone() }],
            Ask::Wit => vec![Resource::Wit],
        }
    }
}

/// A parsed request for a credential.
#[derive(Debug)]
pub struct IssueRequest {
    pub ask: Ask,
    pub ttl: Ttl,
    /// The identity to issue for, when the caller matches several.
    pub spiffe_id: Option<WorkloadId>,
    pub origin: Origin,
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

/// The CI exchange: trusted issuers, and the trust domain dev identities are made in.
pub struct ExchangeSettings {
    pub verifier: Arc<OidcVerifier>,
    pub trust_domain: TrustDomain,
}

/// The minters the pipeline hands grants to.
pub struct Minters {
    pub x509: Arc<dyn Minter>,
    pub jwt: Arc<dyn JwtMinter>,
    /// WIT-SVIDs, signed by a key of their own.
    pub wit: Arc<dyn WitMinter>,
    /// AWS STS sessions, when `[aws]` is configured.
    pub aws: Option<Arc<AwsMinter>>,
}

/// Everything the pipeline is built from (the daemon names the implementations).
pub struct Parts {
    pub attestor: Arc<dyn Attestor>,
    pub policy: Arc<PolicyStore>,
    pub minters: Minters,
    pub ledger: Arc<dyn Ledger>,
    pub clock: Arc<dyn Clock>,
    pub revocations: Arc<Revocations>,
    /// Break-glass credentials: flagged, and their later steps go to the elevated sinks.
    pub emergency: Arc<EmergencyLog>,
    pub shadow: Arc<Shadow>,
    /// The token exchange, when the TLS listener is on.
    pub exchange: Option<ExchangeSettings>,
}

/// A caller once identified: what attestation (or the verified token) says about them.
pub(crate) struct Identified {
    selectors: Selectors,
    pub(crate) record: CallerRecord,
    attestation: &'static str,
    oidc: Option<OidcClaims>,
    /// `mayfly dev --oidc-issuer`: an unregistered token subject gets a dev identity.
    dev_fallback: bool,
    /// A token caller's provenance, kept with what it is issued.
    pub(crate) provenance: Option<Provenance>,
    /// A local caller's uid (who may wait for a break-glass approval).
    pub(crate) uid: Option<u32>,
}

/// The lifetime asked for, the one policy granted, and what capped it when it is shorter.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Lifetime {
    pub requested: u64,
    pub granted: u64,
    /// The rule whose `@max_ttl` capped the request (or a setting, `break_glass.max_ttl`).
    pub clamped_by: Option<String>,
}

impl Lifetime {
    /// For people: "granted 1h (requested 13h; capped by rule `x`)", or "" when not shortened.
    pub fn note(&self) -> Option<String> {
        (self.granted < self.requested).then(|| {
            let by = self.clamped_by.as_deref().map(|r| format!("; capped by `{r}`")).unwrap_or_default();
            format!(
                "granted {} instead of the {} requested{by}",
                crate::clock::human_duration(self.granted),
                crate::clock::human_duration(self.requested)
            )
        })
    }
}

/// What an allowed request may mint, and the decision event that allowed it.
pub(crate) struct Authorized {
    pub(crate) grants: Vec<Grant>,
    pub(crate) identity: WorkloadId,
    /// The recorded decision's id; 0 while it is `deferred`.
    pub(crate) decision_id: EventId,
    /// An allow not yet written: it is stored with the `issued` event in one transaction
    /// (`Ledger::record_issuance`), or alone if nothing is issued after all.
    pub(crate) deferred: Option<Box<event::Decision>>,
    /// The deciding rules (for the issuance's log line).
    pub(crate) rules: Vec<String>,
    pub(crate) lifetime: Lifetime,
    pub(crate) now: SystemTime,
    /// A permitting rule says `@approval("required")` (break-glass only).
    pub(crate) needs_approval: bool,
    pub(crate) provenance: Option<Provenance>,
}

/// A refusal before policy was asked (or the lock check after the inventory): recorded as
/// a `decision` like every other.
pub(crate) struct Refusal<'a> {
    pub(crate) kind: CredentialKind,
    pub(crate) caller: CallerRecord,
    pub(crate) identity: Option<&'a WorkloadId>,
    pub(crate) ttl: Ttl,
    pub(crate) reason: String,
    pub(crate) origin: &'a Origin,
    /// The request, when the caller was attested (so a candidate release can replay it).
    pub(crate) request: Option<RequestRecord>,
}

pub struct Issuer {
    attestor: Arc<dyn Attestor>,
    policy: Arc<PolicyStore>,
    minters: Minters,
    ledger: Arc<dyn Ledger>,
    clock: Arc<dyn Clock>,
    revocations: Arc<Revocations>,
    emergency: Arc<EmergencyLog>,
    shadow: Arc<Shadow>,
    exchange: Option<ExchangeSettings>,
    /// JWT audiences no JWT-SVID is issued for: the audience of mayfly's own STS
    /// web-identity assertions (policy denies them, rule `mayfly-reserved-audience`).
    reserved_audiences: Vec<String>,
    /// Counts decisions and issuances once the ledger has them.
    metrics: Option<Arc<crate::telemetry::Metrics>>,
    /// Several daemons: how current the shared state is.
    freshness: Option<Arc<dyn Freshness>>,
    /// `issuance.min_ttl`: a grant shorter than this issues nothing.
    min_ttl: Ttl,
    /// `[limits]`: admission before anything is done for a caller.
    admission: Option<Arc<Admission>>,
    /// Repeated refusals counted rather than written one by one.
    refusals: Option<Arc<refusals::RefusalLog>>,
}

impl Issuer {
    pub fn new(parts: Parts) -> Self {
        let reserved_audiences =
            parts.minters.aws.as_ref().and_then(|a| a.assertion_audience()).map(str::to_owned).into_iter().collect();
        Self {
            attestor: parts.attestor,
            policy: parts.policy,
            minters: parts.minters,
            ledger: parts.ledger,
            clock: parts.clock,
            revocations: parts.revocations,
            emergency: parts.emergency,
            shadow: parts.shadow,
            exchange: parts.exchange,
            reserved_audiences,
            metrics: None,
            freshness: None,
            min_ttl: Ttl::SECOND,
            admission: None,
            refusals: None,
        }
    }

    /// Reports every recorded decision and issuance to `metrics`.
    pub fn with_metrics(mut self, metrics: Arc<crate::telemetry::Metrics>) -> Self {
        self.metrics = Some(metrics);
        self
    }

    pub(crate) fn metrics(&self) -> Option<&crate::telemetry::Metrics> {
        self.metrics.as_deref()
    }

    /// The shortest lifetime granted (`issuance.min_ttl`); without it, any positive one.
    pub fn with_min_ttl(mut self, min_ttl: Ttl) -> Self {
        self.min_ttl = min_ttl;
        self
    }

    /// Admits each request through `admission` (refusing what is over a bound) and counts
    /// repeated refusals in `refusals` (see `issue::refusals`).
    pub fn with_limits(mut self, admission: Arc<Admission>, refusals: Arc<refusals::RefusalLog>) -> Self {
        self.admission = Some(admission);
        self.refusals = Some(refusals);
        self
    }

    /// Refuses issuance while the view of the state shared with other daemons is stale.
    pub fn with_freshness(mut self, freshness: Arc<dyn Freshness>) -> Self {
        self.freshness = Some(freshness);
        self
    }

    /// Issues one credential: the whole pipeline.
    pub async fn issue(&self, caller: Caller<'_>, req: IssueRequest) -> Result<Issued, IssueError> {
        let kind = req.ask.kind();
        self.serves(kind)?;
        let _admitted = self.admit(caller).await?;
        let who = self.identify(caller, kind, req.ttl, &req.origin).await?;
        // Why defer: an allow is then written with its issuance in one commit (one fsync,
        // not two in series). Not for AWS: an STS call takes seconds, and the decision is
        // on record before it starts.
        let defer = kind != CredentialKind::Aws;
        let auth = self.authorize(&who, &req.ask, req.ttl, req.spiffe_id.as_ref(), &req.origin, defer).await?;
        self.deliver(auth, req.ask, &req.origin, IssuedDetails::default(), false).await
    }

    /// The X.509 CA certificates relying parties trust now.
    pub fn x509_bundle(&self) -> Vec<Vec<u8>> {
        self.minters.x509.x509_bundle()
    }

    /// Admission for the caller as the kernel or the network names it (uid, source address),
    /// before anything is read or decided for it: `None` without `[limits]`.
    pub(crate) async fn admit(&self, caller: Caller<'_>) -> Result<Option<Admitted<'_>>, IssueError> {
        let Some(admission) = self.admission.as_deref() else { return Ok(None) };
        let key = match caller {
            Caller::Local(peer) => CallerKey::Uid(peer.uid),
            Caller::Presented { remote, .. } => match CallerKey::address(remote) {
                Some(key) => key,
                None => return Ok(None),
            },
        };
        match admission.admit(key.clone()).await {
            Ok(admitted) => Ok(Some(admitted)),
            Err(limited) => Err(self.limited(&key, limited)),
        }
    }

    /// Takes a token of `key`'s bucket (a verified token's subject, an identity).
    fn check_rate(&self, key: CallerKey) -> Result<(), IssueError> {
        match self.admission.as_deref().map(|a| a.check_rate(&key)) {
            Some(Err(limited)) => Err(self.limited(&key, limited)),
            _ => Ok(()),
        }
    }

    /// Counts a request a limit refused (metrics, and the ledger in aggregate).
    fn limited(&self, key: &CallerKey, limited: Limited) -> IssueError {
        tracing::debug!(caller = %key, limit = limited.kind.as_str(), "request refused by a limit");
        if let Some(m) = &self.metrics {
            m.limited(limited.kind.as_str());
        }
        if let Some(r) = &self.refusals {
            r.on_limited(key, limited.kind, self.clock.now());
        }
        IssueError::Limited(limited)
    }

    /// Refuses at once (nothing decided) a kind this daemon is not configured to serve, or
    /// any request while its view of the shared state is stale.
    pub(crate) fn serves(&self, kind: CredentialKind) -> Result<(), IssueError> {
        if kind == CredentialKind::Aws && self.minters.aws.is_none() {
            return Err(IssueError::NoAws);
        }
        if let Some(Err(age)) = self.freshness.as_ref().map(|f| f.check()) {
            tracing::warn!(age_ms = age.as_millis(), "shared state too old; refusing issuance");
            return Err(IssueError::Stale { age });
        }
        Ok(())
    }

    /// Attests a local caller or verifies a presented id-token. A failure is a recorded
    /// refusal.
    pub(crate) async fn identify(
        &self,
        caller: Caller<'_>,
        kind: CredentialKind,
        ttl: Ttl,
        origin: &Origin,
    ) -> Result<Identified, IssueError> {
        let refusal = |caller: CallerRecord, reason: String| Refusal {
            kind,
            caller,
            identity: None,
            ttl,
            reason,
            origin,
            request: None,
        };
        match caller {
            Caller::Local(peer) => match self.attest(peer).await {
                Ok(a) => Ok(Identified {
                    selectors: a.selectors,
                    record: caller_record(&a.caller),
                    attestation: "unix",
                    oidc: None,
                    dev_fallback: false,
                    provenance: None,
                    uid: Some(peer.uid),
                }),
                Err(e) => {
                    let summary = CallerSummary {
                        uid: peer.uid,
                        gid: peer.gid,
                        pid: peer.pid.unwrap_or(0),
                        ..Default::default()
                    };
                    self.refuse(refusal(caller_record(&summary), e.to_string())).await?;
                    Err(e.into())
                }
            },
            Caller::Presented { token, remote } => {
                let exchange = self.exchange.as_ref().ok_or(IssueError::NoExchange)?;
                match exchange.verifier.verify(token, self.clock.now()).await {
                    Ok(t) => {
                        if let (Some(issuer), Some(subject)) = (&t.provenance.issuer, &t.provenance.subject) {
                            self.check_rate(CallerKey::Subject { issuer: issuer.clone(), subject: subject.clone() })?;
                        }
                        Ok(Identified {
                            selectors: t.selectors,
                            record: CallerRecord { oidc: Some(t.provenance.clone()), ..CallerRecord::default() },
                            attestation: "oidc",
                            oidc: Some(t.claims),
                            dev_fallback: t.dev_fallback,
                            provenance: Some(t.provenance),
                            uid: None,
                        })
                    }
                    Err(e) => {
                        let record = CallerRecord {
                            remote: Some(remote.to_owned()),
                            claimed_issuer: OidcVerifier::claimed_issuer(token),
                            ..CallerRecord::default()
                        };
                        self.refuse(refusal(record, e.to_string())).await?;
                        Err(e.into())
                    }
                }
            }
        }
    }

    /// inventory → lock → decide every resource → record one decision. Every refusal is a
    /// recorded `decision`; an allow returns the grants, its decision recorded — or, with
    /// `defer`, kept to be recorded with the issuance (`deliver` writes it either way).
    pub(crate) async fn authorize(
        &self,
        who: &Identified,
        ask: &Ask,
        ttl: Ttl,
        wanted: Option<&WorkloadId>,
        origin: &Origin,
        defer: bool,
    ) -> Result<Authorized, IssueError> {
        // One snapshot for the whole request: the inventory and rules it is decided under
        // belong to one release even if another is activated meanwhile.
        let release = self.policy.current();
        let kind = ask.kind();
        let resources = ask.resources();
        let now = self.clock.now();
        let request = |dev_identity: bool| RequestRecord {
            attestation: who.attestation.to_owned(),
            selectors: who.selectors.iter().map(ToString::to_string).collect(),
            resources: resources.iter().map(resource_record).collect(),
            requested_ttl_secs: ttl.as_secs(),
            spiffe_id: wanted.map(ToString::to_string),
            oidc: who.oidc.as_ref().map(|c| c.fields().into_iter().map(|(k, v)| (k.to_owned(), v.into())).collect()),
            break_glass: origin.emergency.is_some(),
            ticket: origin.emergency.as_ref().map(|e| e.ticket.clone()),
            purpose: origin.emergency.as_ref().map(|e| e.reason.clone()),
            dev_identity,
        };
        let refusal = |identity, reason: String, request| Refusal {
            kind,
            caller: who.record.clone(),
            identity,
            ttl,
            reason,
            origin,
            request,
        };
        let dev_entry;
        let mut dev_identity = false;
        let entry = match release.inventory.lookup(&who.selectors, wanted, utc_date(now)) {
            Lookup::Found(entry) => entry,
            Lookup::NoMatch if who.dev_fallback && wanted.is_none() => {
                dev_identity = true;
                // `mayfly dev --oidc-issuer` only: an unregistered token subject gets a dev
                // identity, which the dev rules may grant (serve never sets dev_fallback).
                dev_entry = self.dev_oidc_entry(who.oidc.as_ref(), &who.selectors, now);
                match &dev_entry {
                    Some(e) => e,
                    None => {
                        let err = IssueError::NoEntry;
                        self.refuse(refusal(wanted, err.to_string(), Some(request(false)))).await?;
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
                    Lookup::NameReused { entry, pinned, presented } => {
                        IssueError::NameReused(Lookup::name_reused_reason(entry, pinned, presented.as_ref()))
                    }
                    _ => IssueError::NoEntry,
                };
                // The inventory said no: a candidate release's inventory might say yes, so
                // the request is kept for `mayfly policy replay`.
                self.refuse(refusal(wanted, err.to_string(), Some(request(false)))).await?;
                return Err(err);
            }
        };
        // Each identity's own bucket, however many processes or runners share it.
        self.check_rate(CallerKey::Identity(entry.id.to_string()))?;
        if let Some(lock) = self.revocations.lock_for(&entry.id, now) {
            let err = IssueError::Locked { identity: entry.id.to_string(), reason: lock.reason };
            self.refuse(refusal(Some(&entry.id), err.to_string(), None)).await?;
            return Err(err);
        }
        let context = RequestContext {
            oidc: who.oidc.clone(),
            break_glass: origin.emergency.is_some(),
            ticket: origin.emergency.as_ref().map(|e| e.ticket.clone()),
            purpose: origin.emergency.as_ref().map(|e| e.reason.clone()),
            ..RequestContext::default()
        };
        let decisions: Vec<Decision> = resources
            .iter()
            .map(|resource| {
                release.engine.decide(
                    &DecisionRequest {
                        workload: entry,
                        attestation: who.attestation,
                        selectors: &who.selectors,
                        resource,
                        requested_ttl: ttl,
                        context: &context,
                        reserved_audiences: &self.reserved_audiences,
                    },
                    now,
                )
            })
            .collect();
        // Several resources (JWT audiences) are allowed only if each one is.
        let Combined { mut allowed, granted_ttl_secs, rules, mut explain } = Combined::of(&decisions);
        // The floor: a rule whose ceiling is under issuance.min_ttl grants nothing rather
        // than a credential shorter than the operator allows (recorded as this deny).
        if let Some(granted) = granted_ttl_secs.filter(|g| *g < self.min_ttl.as_secs()) {
            allowed = false;
            explain = format!(
                "the rules grant at most {granted}s, under issuance.min_ttl {}; nothing is issued ({explain})",
                self.min_ttl
            );
        }
        let needs_approval = decisions.iter().any(|d| d.needs_approval);
        let decision = event::Decision {
            action: format!("issue_{}", kind.as_str()),
            resource: Some(resources.iter().map(Resource::describe).collect::<Vec<_>>().join(", ")),
            outcome: if allowed { event::Verdict::Allow } else { event::Verdict::Deny },
            reason: explain.clone(),
            rules,
            errors: decisions.iter().flat_map(|d| d.errors.iter().cloned()).collect(),
            policy_version: release.version().to_owned(),
            identity: Some(entry.id.to_string()),
            owner: Some(entry.owner.clone()),
            purpose: Some(entry.purpose.clone()),
            caller: who.record.clone(),
            requested_ttl_secs: ttl.as_secs(),
            granted_ttl_secs,
            needs_approval,
            request: Some(request(dev_identity)),
            ..origin_fields(origin)
        };
        let deciding = decision.rules.clone();
        let (decision_id, deferred) = if allowed && defer {
            (0, Some(Box::new(decision)))
        } else {
            (self.record_decision(decision, now).await?, None)
        };
        if !allowed {
            tracing::info!(
                identity = %entry.id, decision_id, kind = kind.as_str(), api = origin.api, rules = %deciding.join(","),
                policy_version = release.version(), reason = %explain, "issuance denied"
            );
            let denying: Vec<String> =
                decisions.iter().filter(|d| !d.is_allow()).flat_map(|d| d.rules.iter().cloned()).collect();
            // Under the floor every decision allowed: the permitting rules are the ones to name.
            let rules = if denying.is_empty() { deciding } else { denying };
            return Err(IssueError::Denied { explain, rules });
        }
        let clamped_by = decisions.iter().find_map(|d| match &d.verdict {
            crate::policy::Verdict::Allow(g) => g.clamped_by().map(str::to_owned),
            crate::policy::Verdict::Deny => None,
        });
        let lifetime =
            Lifetime { requested: ttl.as_secs(), granted: granted_ttl_secs.unwrap_or(ttl.as_secs()), clamped_by };
        Ok(Authorized {
            grants: decisions.into_iter().filter_map(Decision::into_grant).collect(),
            identity: entry.id.clone(),
            decision_id,
            deferred,
            rules: deciding,
            lifetime,
            now,
            needs_approval: origin.emergency.is_some() && needs_approval,
            provenance: who.provenance.clone(),
        })
    }

    /// Records a refusal as a `decision` (deny, no rules, the reason).
    pub(crate) async fn refuse(&self, r: Refusal<'_>) -> Result<EventId, LedgerError> {
        let (kind, api, identity) = (r.kind.as_str(), r.origin.api, r.identity.map(ToString::to_string));
        let (uid, pid, remote) = (r.caller.uid, r.caller.pid, r.caller.remote.clone());
        let reason = r.reason.clone();
        let decision = event::Decision {
            action: format!("issue_{}", r.kind.as_str()),
            outcome: event::Verdict::Deny,
            reason: r.reason,
            policy_version: self.policy.current().version().to_owned(),
            identity: r.identity.map(ToString::to_string),
            caller: r.caller,
            requested_ttl_secs: r.ttl.as_secs(),
            request: r.request,
            ..origin_fields(r.origin)
        };
        let decision_id = self.record_decision(decision, self.clock.now()).await?;
        tracing::info!(
            decision_id,
            kind,
            api,
            identity = identity.unwrap_or_default(),
            uid,
            pid,
            remote,
            rules = "",
            reason,
            "issuance refused"
        );
        Ok(decision_id)
    }

    /// The one place a `decision` is written. A decision that carries its request is also
    /// decided under the shadow candidate, if there is one (never acted on).
    pub(crate) async fn record_decision(
        &self,
        decision: event::Decision,
        now: SystemTime,
    ) -> Result<EventId, LedgerError> {
        let counted = self.metrics.as_ref().map(|m| (m.clone(), decision.outcome, decision.rules.clone()));
        // A refusal this caller already has in full this window is counted, not written.
        let repeat = self.refusals.as_deref().and_then(|log| {
            let key = refusals::RefusalLog::key(&decision)?;
            Some((log, key, refusals::RefusalLog::fingerprint(&decision)))
        });
        let shadowed = self.shadow.is_on().then(|| decision.clone());
        if let Some((log, key, fingerprint)) = &repeat
            && let refusals::Verdict::Counted(first) = log.on_refusal(key, *fingerprint, now)
        {
            if let Some((metrics, outcome, rules)) = counted {
                metrics.decision(outcome, &rules);
                metrics.refusal_counted();
            }
            let id = first.unwrap_or_default();
            // The shadow candidate still sees every live request (its own writes are bounded).
            if let Some(decision) = shadowed {
                self.shadow.observe(&decision, id, now);
            }
            return Ok(id);
        }
        let id = match self.ledger.record(now, event::Event::Decision(decision)).await {
            Ok(id) => id,
            Err(e) => {
                if let Some((log, key, fingerprint)) = &repeat {
                    log.forget(key, *fingerprint);
                }
                return Err(e);
            }
        };
        if let Some((log, key, fingerprint)) = &repeat {
            log.recorded(key, *fingerprint, id);
        }
        self.decided(Noticed { counted, shadowed }, id, now);
        Ok(id)
    }

    /// What a decision is told to once it is durable, taken before it goes to the ledger.
    pub(crate) fn notice(&self, decision: &event::Decision) -> Noticed {
        Noticed {
            counted: self.metrics.as_ref().map(|m| (m.clone(), decision.outcome, decision.rules.clone())),
            shadowed: self.shadow.is_on().then(|| decision.clone()),
        }
    }

    /// A decision is durable as `id`: counted, and decided again under the shadow candidate.
    pub(crate) fn decided(&self, noticed: Noticed, id: EventId, now: SystemTime) {
        if let Some((metrics, outcome, rules)) = noticed.counted {
            metrics.decision(outcome, &rules);
        }
        if let Some(decision) = noticed.shadowed {
            self.shadow.observe(&decision, id, now);
        }
    }

    async fn attest(&self, peer: &PeerInfo) -> Result<crate::attest::Attestation, AttestError> {
        // Why here when it can: a few /proc reads cost less than the hand-off to a blocking
        // thread and back; hashing an executable not seen before does not belong on a worker.
        if let Some(done) = self.attestor.attest_cached(peer) {
            return done;
        }
        let attestor = Arc::clone(&self.attestor);
        let peer = peer.clone();
        let pid = peer.pid.unwrap_or(0);
        tokio::task::spawn_blocking(move || attestor.attest(&peer))
            .await
            .unwrap_or_else(|_| Err(AttestError::Proc { pid, why: "attestation task failed".into() }))
    }

    /// The dev identity for an unregistered token subject: `spiffe://<td>/dev/oidc/<sub>`,
    /// the subject written as one path segment by `identity::path_segment` — injective, so
    /// `repo:a/b` and `repo:a_b` (or a subject with `/`, `.`, `..`) never share an
    /// identity; a subject too long for one is refused (no dev identity), never cut.
    fn dev_oidc_entry(
        &self,
        claims: Option<&OidcClaims>,
        selectors: &Selectors,
        now: SystemTime,
    ) -> Option<InventoryEntry> {
        let td = &self.exchange.as_ref()?.trust_domain;
        let sub = crate::identity::path_segment(&claims?.subject, DEV_SUBJECT_MAX)?;
        let id = WorkloadId::parse(&format!("spiffe://{td}/dev/oidc/{sub}")).ok()?;
        Some(InventoryEntry {
            id,
            owner: "mayfly dev (--oidc-issuer)".into(),
            purpose: "quick tries of the token exchange".into(),
            environment: "dev".into(),
            tier: "experimental".into(),
            expires: utc_date(now),
            selectors: selectors.clone(),
            known_as: Selectors::new(),
        })
    }
}

/// Taken from a decision before it is written: the metrics it counts toward and, with a
/// shadow candidate on, the decision itself to replay under it.
pub(crate) struct Noticed {
    counted: Option<(Arc<crate::telemetry::Metrics>, event::Verdict, Vec<String>)>,
    shadowed: Option<event::Decision>,
}

/// Longest escaped subject in a dev identity (a SPIFFE ID is at most 2048 bytes).
const DEV_SUBJECT_MAX: usize = 1024;

/// The decision fields that say which API and path a request came through.
fn origin_fields(origin: &Origin) -> event::Decision {
    event::Decision {
        api: origin.api.to_owned(),
        rotates: origin.rotates.clone(),
        break_glass: origin.emergency.is_some(),
        ticket: origin.emergency.as_ref().map(|e| e.ticket.clone()),
        justification: origin.emergency.as_ref().map(|e| e.reason.clone()),
        ..event::Decision::default()
    }
}

fn caller_record(c: &CallerSummary) -> CallerRecord {
    CallerRecord {
        uid: Some(c.uid),
        gid: Some(c.gid),
        pid: Some(c.pid),
        exe: c.exe.clone(),
        sha256: c.sha256.clone(),
        container: c.container.clone(),
        ..CallerRecord::default()
    }
}

pub(crate) fn resource_record(r: &Resource) -> ResourceRecord {
    match r {
        Resource::X509 => ResourceRecord::X509,
        Resource::Wit => ResourceRecord::Wit,
        Resource::Jwt { audience } => ResourceRecord::Jwt { audience: audience.clone() },
        Resource::Aws { role } => ResourceRecord::Aws { role: role.arn().to_owned() },
    }
}

#[cfg(test)]
mod tests;
