//! The one place that knows the order of an issuance: attest → inventory → decide →
//! record the decision → mint → record the issuance → answer. Nothing leaves without its
//! `issued` event being durable; every refusal after the request parsed is a recorded
//! `decision`. Knows nothing of protobuf or sockets.

use std::sync::Arc;
use serde_json::json;

use crate::attest::{AttestError, Attestation, Attestor, CallerSummary, PeerInfo};
use crate::clock::{unix_secs, utc_date, Clock};
use crate::identity::{Lookup, Ttl, WorkloadId};
use crate::ledger::{CredentialRecord, EventId, EventKind, Ledger, LedgerError, NewEvent};
use crate::mint::{MintError, Minter, VerifiedCsr, X509Svid};
use crate::policy::store::PolicyStore;
use crate::policy::{CredentialKind, DecisionRequest, RequestContext, Resource, Verdict};

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
}

/// A parsed request for an X.509 SVID.
#[derive(Debug)]
pub struct X509Request {
    pub csr: VerifiedCsr,
    pub ttl: Ttl,
    pub spiffe_id: Option<WorkloadId>,
}

#[derive(Debug)]
pub struct IssuedX509 {
    pub credential_id: String,
    pub identity: WorkloadId,
    pub svid: X509Svid,
    pub bundle: Vec<Vec<u8>>,
    pub decision_id: EventId,
}

pub struct Issuer {
    attestor: Arc<dyn Attestor>,
    policy: Arc<PolicyStore>,
    minter: Arc<dyn Minter>,
    ledger: Arc<dyn Ledger>,
    clock: Arc<dyn Clock>,
}

impl Issuer {
    pub fn new(
        attestor: Arc<dyn Attestor>,
        policy: Arc<PolicyStore>,
        minter: Arc<dyn Minter>,
        ledger: Arc<dyn Ledger>,
        clock: Arc<dyn Clock>,
    ) -> Self {
        Self { attestor, policy, minter, ledger, clock }
    }

    pub fn policy_version(&self) -> String {
        self.policy.current().version().to_owned()
    }

    pub fn x509_bundle(&self) -> Vec<Vec<u8>> {
        self.minter.x509_bundle()
    }

    pub async fn issue_x509(&self, peer: &PeerInfo, req: X509Request) -> Result<IssuedX509, IssueError> {
        let kind = CredentialKind::X509;
        // One snapshot for the whole request: the inventory and rules it is decided under
        // belong to one release even if another is activated meanwhile.
        let release = self.policy.current();
        let version = release.version();
        let attestation = match self.attest(peer).await {
            Ok(a) => a,
            Err(e) => {
                let caller = CallerSummary { uid: peer.uid, gid: peer.gid, pid: peer.pid.unwrap_or(0), ..Default::default() };
                self.record_refusal(kind, &caller, None, &req.ttl, &e.to_string(), version).await?;
                return Err(e.into());
            }
        };
        let now = self.clock.now();
        let entry = match release.inventory.lookup(&attestation.selectors, req.spiffe_id.as_ref(), utc_date(now)) {
            Lookup::Found(entry) => entry,
            other => {
                let err = match other {
                    Lookup::Expired(e) => IssueError::EntryExpired { id: e.id.to_string(), expires: e.expires.to_string() },
                    Lookup::Ambiguous(ids) => IssueError::Ambiguous(ids.iter().map(ToString::to_string).collect()),
                    _ => IssueError::NoEntry,
                };
                self.record_refusal(kind, &attestation.caller, req.spiffe_id.as_ref(), &req.ttl, &err.to_string(), version)
                    .await?;
                return Err(err);
            }
        };

        let resource = Resource::X509;
        let context = RequestContext::default();
        let decision = release.engine.decide(
            &DecisionRequest {
                workload: entry,
                attestation: "unix",
                selectors: &attestation.selectors,
                resource: &resource,
                requested_ttl: req.ttl,
                context: &context,
            },
            now,
        );
        let granted = match &decision.verdict {
            Verdict::Allow(g) => Some(g.ttl().as_secs()),
            Verdict::Deny => None,
        };
        let decision_id = self
            .ledger
            .record(NewEvent {
                kind: EventKind::Decision,
                at: now,
                body: json!({
                    "action": format!("issue_{}", kind.as_str()),
                    "resource": resource.describe(),
                    "outcome": if decision.is_allow() { "allow" } else { "deny" },
                    "reason": decision.explain(),
                    "rules": decision.rules,
                    "errors": decision.errors,
                    "policy_version": decision.policy_version,
                    "identity": entry.id.as_str(),
                    "caller": attestation.caller,
                    "requested_ttl_secs": req.ttl.as_secs(),
                    "granted_ttl_secs": granted,
                }),
                credential: None,
            })
            .await?;
        let grant = match decision.verdict {
            Verdict::Allow(grant) => grant,
            Verdict::Deny => {
                tracing::info!(identity = %entry.id, decision_id, reason = %decision.explain(), "issuance denied");
                return Err(IssueError::Denied { explain: decision.explain(), rules: decision.rules });
            }
        };

        let svid = self.minter.mint_x509(&req.csr, &grant, now)?;
        let credential_id = uuid::Uuid::new_v4().to_string();
        let record = CredentialRecord {
            id: credential_id.clone(),
            kind: kind.as_str().to_owned(),
            identity: grant.identity().to_string(),
            serial: svid.serial.clone(),
            fingerprint: svid.fingerprint.clone(),
            not_before: unix_secs(svid.not_before),
            not_after: unix_secs(svid.not_after),
            decision_id,
        };
        // Why: the certificate exists only in this stack frame until its record is durable;
        // on a ledger error it is dropped here and the caller learns nothing but UNAVAILABLE.
        let body = serde_json::to_value(&record).map_err(|e| LedgerError::Storage(format!("issued record: {e}")))?;
        let issued_id = self
            .ledger
            .record(NewEvent {
                kind: EventKind::Issued,
                at: now,
                body,
                credential: Some(record),
            })
            .await?;
        tracing::info!(
            identity = %grant.identity(), credential_id, serial = %svid.serial, decision_id, issued_id,
            not_after = unix_secs(svid.not_after), "x509 svid issued"
        );
        Ok(IssuedX509 {
            credential_id,
            identity: grant.identity().clone(),
            svid,
            bundle: self.minter.x509_bundle(),
            decision_id,
        })
    }

    async fn attest(&self, peer: &PeerInfo) -> Result<Attestation, AttestError> {
        let attestor = Arc::clone(&self.attestor);
        let peer = peer.clone();
        let pid = peer.pid.unwrap_or(0);
        tokio::task::spawn_blocking(move || attestor.attest(&peer))
            .await
            .unwrap_or_else(|_| Err(AttestError::Proc { pid, why: "attestation task failed".into() }))
    }

    /// A denial that happened before policy could be asked: still a `decision` in the ledger.
    async fn record_refusal(
        &self,
        kind: CredentialKind,
        caller: &CallerSummary,
        wanted: Option<&WorkloadId>,
        ttl: &Ttl,
        reason: &str,
        policy_version: &str,
    ) -> Result<EventId, LedgerError> {
        tracing::info!(uid = caller.uid, pid = caller.pid, reason, "issuance refused");
        self.ledger
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
                }),
                credential: None,
            })
            .await
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime};

    use super::*;
    use crate::clock::FixedClock;
    use crate::identity::{Selector, Selectors, TrustDomain};
    use crate::keys::CertificateAuthority;
    use crate::ledger::memory::MemoryBackend;
    use crate::ledger::{verify_chain, GroupCommitLedger};
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

    async fn issuer(selectors: &[&str], ledger_ok_records: Option<usize>) -> (Issuer, MemoryBackend) {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let td = TrustDomain::parse("mayfly.local").unwrap();
        let ca = CertificateAuthority::generate(&td, now - Duration::from_secs(60), Duration::from_secs(86_400)).unwrap();
        let files = crate::policy::shipped_files_with(&[("inventory.toml", Some(INVENTORY)), ("tests/local.toml", None), ("tests/ci.toml", None)]);
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
            ledger,
            Arc::new(FixedClock::new(now)),
        );
        (issuer, backend)
    }

    fn request(ttl: &str) -> X509Request {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let csr = rcgen::CertificateParams::default().serialize_request(&key).unwrap();
        X509Request { csr: VerifiedCsr::parse(csr.der()).unwrap(), ttl: Ttl::parse(ttl).unwrap(), spiffe_id: None }
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
}
