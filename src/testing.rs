//! Fakes behind the seams, for unit tests and (feature `test-support`) for tests/: a
//! scripted STS, an attestor with fixed selectors, a ledger that fails after n records, and
//! an `Issuer` built on them over an in-memory ledger. Never in a shipped build.
#![allow(clippy::unwrap_used, reason = "test support: a failed unwrap is a failed test")]

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use crate::BoxFuture;
use crate::attest::{AttestError, Attestation, Attestor, CallerSummary, PeerInfo};
use crate::aws::{AwsError, AwsSessionRequest, StsApi, StsSession};
use crate::breakglass::{Elevated, EmergencyLog};
use crate::clock::{Clock, FixedClock};
use crate::identity::{Selector, Selectors, TrustDomain};
use crate::issue::{Issuer, Minters, Parts};
use crate::keys::{CertificateAuthority, JwtKey, SecretString};
use crate::ledger::event::Event;
use crate::ledger::memory::MemoryBackend;
use crate::ledger::{EventId, GroupCommitLedger, Ledger, LedgerError};
use crate::mint::aws::AwsMinter;
use crate::mint::jwt::Es256Minter;
use crate::mint::wit::Es256WitMinter;
use crate::mint::x509::X509Minter;
use crate::policy::release::Release;
use crate::policy::shadow::Shadow;
use crate::policy::store::PolicyStore;
use crate::revoke::Revocations;

/// The tests' clock: 2027-01-15T08:00:00Z.
pub const NOW_SECS: u64 = 1_800_000_000;

/// Attests every caller with fixed selectors (or fails).
pub struct FakeAttestor(pub Result<Selectors, AttestError>);

impl FakeAttestor {
    pub fn with(selectors: &[&str]) -> Self {
        Self(
            selectors
                .iter()
                .map(|s| Selector::parse(s))
                .collect::<Result<_, _>>()
                .map_err(|e| AttestError::Proc { pid: 0, why: e.to_string() }),
        )
    }
}

impl Attestor for FakeAttestor {
    fn attest(&self, _peer: &PeerInfo) -> Result<Attestation, AttestError> {
        self.0.clone().map(|selectors| Attestation { selectors, caller: CallerSummary::default() })
    }
}

/// Lets the first `n` records through, then fails every one ("disk full").
pub struct FailAfter {
    inner: Arc<dyn Ledger>,
    left: Mutex<usize>,
}

impl FailAfter {
    pub fn new(inner: Arc<dyn Ledger>, n: usize) -> Self {
        Self { inner, left: Mutex::new(n) }
    }
}

impl Ledger for FailAfter {
    fn record(&self, at: SystemTime, event: Event) -> BoxFuture<'_, Result<EventId, LedgerError>> {
        let mut left = self.left.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if *left == 0 {
            return Box::pin(async { Err(LedgerError::Storage("disk full".into())) });
        }
        *left -= 1;
        self.inner.record(at, event)
    }
}

/// An `Issuer` over fakes: what `TestIssuer::build` made, with handles to inspect.
pub struct TestIssuer {
    pub issuer: Arc<Issuer>,
    pub backend: MemoryBackend,
    pub ledger: Arc<dyn Ledger>,
    pub clock: Arc<FixedClock>,
    pub revocations: Arc<Revocations>,
    pub emergency: Arc<EmergencyLog>,
    pub shadow: Arc<Shadow>,
    pub policy: Arc<PolicyStore>,
    pub jwt: Arc<Es256Minter>,
    pub wit: Arc<Es256WitMinter>,
}

/// How to build a `TestIssuer`.
pub struct IssuerBuilder {
    selectors: Vec<String>,
    release: Release,
    ledger_ok_records: Option<usize>,
    aws: Option<(Arc<FakeSts>, crate::mint::aws::Limits, bool)>,
    elevated: Elevated,
}

impl IssuerBuilder {
    /// An issuer whose callers attest with `selectors`, deciding under `release`.
    pub fn new(selectors: &[&str], release: Release) -> Self {
        Self {
            selectors: selectors.iter().map(|s| (*s).to_owned()).collect(),
            release,
            ledger_ok_records: None,
            aws: None,
            elevated: Elevated::default(),
        }
    }

    /// The ledger takes `n` records, then fails.
    pub fn ledger_fails_after(mut self, n: usize) -> Self {
        self.ledger_ok_records = Some(n);
        self
    }

    /// AWS served by `sts` (AssumeRole; `web_identity` mints assertions for audience `db`).
    pub fn aws(mut self, sts: Arc<FakeSts>, limits: crate::mint::aws::Limits, web_identity: bool) -> Self {
        self.aws = Some((sts, limits, web_identity));
        self
    }

    pub fn elevated(mut self, elevated: Elevated) -> Self {
        self.elevated = elevated;
        self
    }

    pub async fn build(self) -> TestIssuer {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(NOW_SECS);
        let td = TrustDomain::parse("mayfly.local").unwrap_or_else(|e| panic!("trust domain: {e}"));
        let ca = CertificateAuthority::generate(&td, now - Duration::from_secs(60), Duration::from_secs(86_400))
            .unwrap_or_else(|e| panic!("test CA: {e}"));
        let backend = MemoryBackend::default();
        let (gc, _task) =
            GroupCommitLedger::start(backend.clone(), 16).await.unwrap_or_else(|e| panic!("test ledger: {e}"));
        let ledger: Arc<dyn Ledger> = match self.ledger_ok_records {
            Some(n) => Arc::new(FailAfter::new(Arc::new(gc), n)),
            None => Arc::new(gc),
        };
        let clock = Arc::new(FixedClock::new(now));
        let dyn_clock: Arc<dyn Clock> = clock.clone();
        let policy = Arc::new(PolicyStore::new(Arc::new(self.release), Vec::new()));
        let revocations = Arc::new(Revocations::default());
        let emergency = Arc::new(EmergencyLog::new(self.elevated, Vec::new(), ledger.clone(), dyn_clock.clone()));
        let shadow = Arc::new(Shadow::new(policy.clone(), ledger.clone(), dyn_clock.clone()));
        let jwt = Arc::new(
            Es256Minter::new(JwtKey::generate().unwrap_or_else(|e| panic!("jwt key: {e}")), td.clone())
                .unwrap_or_else(|e| panic!("jwt minter: {e}")),
        );
        let wit = Arc::new(
            Es256WitMinter::new(JwtKey::generate().unwrap_or_else(|e| panic!("wit key: {e}")), td.clone())
                .unwrap_or_else(|e| panic!("wit minter: {e}")),
        );
        let aws = self.aws.map(|(sts, limits, web_identity)| {
            let mode = if web_identity {
                crate::mint::aws::Mode::WebIdentity { jwt: jwt.clone(), audience: "db".into() }
            } else {
                crate::mint::aws::Mode::AssumeRole
            };
            Arc::new(AwsMinter::new(sts, None, mode, limits))
        });
        let selectors: Vec<&str> = self.selectors.iter().map(String::as_str).collect();
        let issuer = Arc::new(Issuer::new(Parts {
            attestor: Arc::new(FakeAttestor::with(&selectors)),
            policy: policy.clone(),
            minters: Minters { x509: Arc::new(X509Minter::new(Arc::new(ca))), jwt: jwt.clone(), wit: wit.clone(), aws },
            ledger: ledger.clone(),
            clock: dyn_clock,
            revocations: revocations.clone(),
            emergency: emergency.clone(),
            shadow: shadow.clone(),
            exchange: None,
        }));
        TestIssuer { issuer, backend, ledger, clock, revocations, emergency, shadow, policy, jwt, wit }
    }
}

/// Records every request; answers from a script (errors first, then sessions). A
/// session expires `duration_seconds` after 1_800_000_000 (the tests' clock).
#[derive(Default)]
pub struct FakeSts {
    pub requests: Mutex<Vec<(AwsSessionRequest, Option<String>)>>,
    pub failures: Mutex<Vec<AwsError>>,
    /// While set, calls are counted in `waiting` and wait for it to be notified.
    pub hold: Mutex<Option<std::sync::Arc<tokio::sync::Notify>>>,
    pub waiting: std::sync::atomic::AtomicUsize,
}

impl FakeSts {
    async fn call(&self, req: &AwsSessionRequest, token: Option<&SecretString>) -> Result<StsSession, AwsError> {
        let hold = self.hold.lock().unwrap().clone();
        if let Some(gate) = hold {
            self.waiting.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            gate.notified().await;
        }
        self.answer(req, token)
    }
}

impl FakeSts {
    fn answer(&self, req: &AwsSessionRequest, token: Option<&SecretString>) -> Result<StsSession, AwsError> {
        self.requests.lock().unwrap().push((req.clone(), token.map(|t| t.expose().to_owned())));
        if let Some(e) = self.failures.lock().unwrap().pop() {
            return Err(e);
        }
        let name = req.role_arn.rsplit('/').next().unwrap();
        Ok(StsSession {
            access_key_id: "ASIAFAKE0000000001".into(),
            secret_access_key: SecretString::new("fake-secret".into()),
            session_token: SecretString::new("fake-token".into()),
            expiration: SystemTime::UNIX_EPOCH
                + Duration::from_secs(1_800_000_000_u64 + u64::from(req.duration_seconds.unsigned_abs())),
            assumed_role_arn: format!("arn:aws:sts::111122223333:assumed-role/{name}/{}", req.role_session_name),
        })
    }
}

impl StsApi for FakeSts {
    fn assume_role<'a>(&'a self, req: &'a AwsSessionRequest) -> BoxFuture<'a, Result<StsSession, AwsError>> {
        Box::pin(self.call(req, None))
    }
    fn assume_role_with_web_identity<'a>(
        &'a self,
        req: &'a AwsSessionRequest,
        token: &'a SecretString,
    ) -> BoxFuture<'a, Result<StsSession, AwsError>> {
        Box::pin(self.call(req, Some(token)))
    }
}
