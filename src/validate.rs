//! Checks of mayfly's own tokens presented back to it: the Workload API's `ValidateJWTSVID`,
//! RFC 7662 introspection on the TLS listener, and a WIT-SVID's proof of possession
//! (`POST /v1/wpt/verify`; the proof checks themselves are in `wpt`). A check that passes
//! the signature (for a WIT: the WIT's and the proof's) is a durable `used` event before
//! the answer — also when the credential was revoked (incident responders want the
//! attempt); uses of break-glass credentials go to the elevated sinks too. Issues nothing
//! and decides nothing.

pub mod wpt;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::attest::PeerInfo;
use crate::attest::oidc::ReplayGuard;
use crate::breakglass::EmergencyLog;
use crate::clock::Clock;
use crate::identity::WorkloadId;
use crate::issue::IssueError;
use crate::ledger::event::EventKind;
use crate::ledger::event::{Caller, Event, Used};
use crate::ledger::{EventFilter, Ledger, LedgerError, LedgerRead};
use crate::mint::{JwtMinter, ValidatedJwt, WitMinter};
use crate::policy::CredentialKind;
use crate::revoke::Revocations;
use wpt::{Presented, ProofError, ReplayCache};

pub struct Validator {
    jwt: Arc<dyn JwtMinter>,
    wit: Arc<dyn WitMinter>,
    proofs: ProofSettings,
    replay: ReplayCache,
    /// Several daemons on one ledger: the replay table they share (each proof once for all).
    shared_replay: Option<Arc<dyn ReplayGuard>>,
    revocations: Arc<Revocations>,
    emergency: Arc<EmergencyLog>,
    ledger: Arc<dyn Ledger>,
    clock: Arc<dyn Clock>,
}

/// How proofs of possession are accepted.
#[derive(Clone, Copy, Debug)]
pub struct ProofSettings {
    /// A proof's `exp` may be at most this far ahead (plus `wpt::SKEW_SECS`).
    pub window: Duration,
    /// Proof `jti`s remembered at once; beyond that new proofs are refused, never a live
    /// entry forgotten.
    pub replay_entries: usize,
}

impl Default for ProofSettings {
    fn default() -> Self {
        Self { window: Duration::from_secs(300), replay_entries: 100_000 }
    }
}

/// A proof of possession that was accepted (and recorded as a use).
#[derive(Clone, Debug)]
pub struct VerifiedProof {
    pub identity: WorkloadId,
    /// The WIT's jti: its credential id.
    pub credential_id: String,
    /// The WIT's expiry, Unix seconds.
    pub wit_expires_at: i64,
    pub proof_jti: String,
}

impl Validator {
    pub fn new(
        jwt: Arc<dyn JwtMinter>,
        wit: Arc<dyn WitMinter>,
        proofs: ProofSettings,
        revocations: Arc<Revocations>,
        emergency: Arc<EmergencyLog>,
        ledger: Arc<dyn Ledger>,
        clock: Arc<dyn Clock>,
    ) -> Self {
        let replay = ReplayCache::new(proofs.replay_entries);
        Self { jwt, wit, proofs, replay, shared_replay: None, revocations, emergency, ledger, clock }
    }

    /// Accepts each proof once across every daemon sharing `replay` (as well as locally).
    pub fn with_shared_replay(mut self, replay: Arc<dyn ReplayGuard>) -> Self {
        self.shared_replay = Some(replay);
        self
    }

    /// Refills the replay cache from the ledger after a restart: every proof accepted
    /// recently enough to be still inside its window (a `used` event with a `proof_jti`)
    /// is remembered again, so a proof captured before the restart is not good once more.
    /// Returns how many.
    pub async fn remember_accepted_proofs(&self, reader: &dyn LedgerRead) -> Result<usize, LedgerError> {
        let now = crate::clock::unix_secs(self.clock.now());
        // Why this far back: an accepted proof's exp is at most window + skew after its use.
        let live_for =
            i64::try_from(self.proofs.window.as_secs()).unwrap_or(i64::MAX).saturating_add(2 * wpt::SKEW_SECS);
        // Read a page at a time and decode only proof uses: the window can hold every
        // JWT-SVID validation of the last minutes too (a daemon that had validated 12,000
        // started in 130 ms with 85 MiB when they were all held decoded at once).
        const PAGE: i64 = 4096;
        let mut remembered = 0;
        let mut after = 0;
        loop {
            let filter = EventFilter {
                since_ms: Some(now.saturating_sub(live_for).saturating_mul(1000)),
                after,
                limit: Some(PAGE),
                ..EventFilter::kinds(&[EventKind::Used])
            };
            let page = reader.events(filter).await?;
            let Some(last) = page.last() else { return Ok(remembered) };
            after = last.pos;
            let full = page.len() == usize::try_from(PAGE).unwrap_or(usize::MAX);
            for stored in page {
                // Why a text check first: a use without a proof has no `proof_jti` field.
                if !stored.body.contains("\"proof_jti\"") {
                    continue;
                }
                // An event that does not decode stops start-up, as in `read_typed`.
                if let Event::Used(Used { credential_id, proof_jti: Some(proof), .. }) = stored.event()? {
                    let at = stored.at_ms / 1000;
                    if self.replay.first_use(&credential_id, &proof, at.saturating_add(live_for), now).is_ok() {
                        remembered += 1;
                    }
                }
            }
            if !full {
                return Ok(remembered);
            }
        }
    }

    /// A WIT-SVID and its Workload Proof Token, presented by a relying party at `remote`:
    /// the WIT (signature by a WIT key, `typ`, expiry), the proof (`wpt::check_proof`), one
    /// use per proof `jti` within the window, then revocation. A proof that passed is a
    /// durable `used` event before the answer (a revoked WIT's too, marked refused).
    pub async fn verify_proof(&self, p: &Presented<'_>, remote: &str) -> Result<VerifiedProof, ProofError> {
        let now = self.clock.now();
        let wit = match self.wit.validate_wit(p.wit, now) {
            Ok(wit) => wit,
            Err(e) => {
                tracing::info!(%remote, error = %e, "proof of possession refused: the WIT does not verify");
                return Err(e.into());
            }
        };
        let proof = match wpt::check_proof(p, &wit, now, self.proofs.window) {
            Ok(proof) => proof,
            Err(e) => {
                tracing::info!(%remote, credential_id = wit.jti, identity = %wit.identity, error = %e, "proof of possession refused");
                return Err(e);
            }
        };
        // Why until exp + skew: a proof is accepted until its exp, judged by clocks up to
        // the skew apart; it must be remembered at least as long.
        let until = proof.exp.saturating_add(wpt::SKEW_SECS);
        let mut first = self.replay.first_use(&wit.jti, &proof.jti, until, crate::clock::unix_secs(now));
        if let (Ok(()), Some(shared)) = (&first, &self.shared_replay) {
            // Why the prefix: the table also holds id-tokens' issuer + jti; a WIT jti is a
            // credential id, never an issuer URL, so the two never collide.
            let key = format!("wpt\u{0}{}\u{0}{}", wit.jti, proof.jti);
            let expires = SystemTime::UNIX_EPOCH + Duration::from_secs(until.max(0).unsigned_abs());
            first = match shared.first_use(&key, expires).await {
                Ok(true) => Ok(()),
                Ok(false) => Err(ProofError::Replayed),
                // Fail closed: without the shared table, another daemon may have taken it.
                Err(why) => Err(ProofError::Unavailable(why)),
            };
        }
        if let Err(e) = first {
            tracing::warn!(%remote, credential_id = wit.jti, identity = %wit.identity, error = %e, "proof of possession refused");
            return Err(e);
        }
        let revoked = self.revocations.is_revoked(&wit.jti);
        let emergency = self.emergency.is_flagged(&wit.jti);
        let used = Used {
            credential_id: wit.jti.clone(),
            kind: CredentialKind::Wit.as_str().to_owned(),
            identity: wit.identity.to_string(),
            use_kind: "verify_wpt".to_owned(),
            audience: Some(p.audience.to_owned()),
            by: Caller { remote: Some(remote.to_owned()), ..Caller::default() },
            refused: revoked.then(|| "revoked".to_owned()),
            break_glass: emergency,
            proof_jti: Some(proof.jti.clone()),
        };
        let line = emergency.then(|| used.clone());
        self.ledger.record(now, Event::Used(used)).await?;
        if let Some(line) = line {
            self.emergency.later("used", &line).await;
        }
        if revoked {
            tracing::warn!(credential_id = wit.jti, identity = %wit.identity, "a proof with a revoked WIT was presented");
            return Err(ProofError::Revoked(wit.jti));
        }
        Ok(VerifiedProof {
            identity: wit.identity,
            credential_id: wit.jti,
            wit_expires_at: wit.exp,
            proof_jti: proof.jti,
        })
    }

    /// Verifies one of mayfly's JWT-SVIDs for `audience` (a Workload API caller asks).
    pub async fn validate_jwt(&self, peer: &PeerInfo, token: &str, audience: &str) -> Result<ValidatedJwt, IssueError> {
        self.check(token, Some(audience), "validate_jwt_svid", Caller::local(peer.uid, peer.gid, peer.pid)).await
    }

    /// RFC 7662 introspection: `Ok` for a live token (recorded as a use), an error saying
    /// why it is not active otherwise.
    pub async fn introspect(&self, token: &str, remote: &str) -> Result<ValidatedJwt, IssueError> {
        let by = Caller { remote: Some(remote.to_owned()), ..Caller::default() };
        self.check(token, None, "introspect", by).await
    }

    /// Signature, expiry, audience when given, then revocation; a token that verified is a
    /// durable `used` event before the answer.
    async fn check(
        &self,
        token: &str,
        audience: Option<&str>,
        use_kind: &str,
        by: Caller,
    ) -> Result<ValidatedJwt, IssueError> {
        let now = self.clock.now();
        let validated = match self.jwt.validate_jwt(token, audience, now) {
            Ok(v) => v,
            Err(e) => {
                tracing::info!(by = ?by, audience = audience.unwrap_or_default(), error = %e, "jwt validation failed");
                return Err(e.into());
            }
        };
        let revoked = self.revocations.is_revoked(&validated.jti);
        let emergency = self.emergency.is_flagged(&validated.jti);
        let used = Used {
            credential_id: validated.jti.clone(),
            kind: CredentialKind::Jwt.as_str().to_owned(),
            identity: validated.identity.to_string(),
            use_kind: use_kind.to_owned(),
            audience: audience.map(str::to_owned),
            by,
            refused: revoked.then(|| "revoked".to_owned()),
            break_glass: emergency,
            proof_jti: None,
        };
        let line = emergency.then(|| used.clone());
        self.ledger.record(now, Event::Used(used)).await?;
        if let Some(line) = line {
            self.emergency.later("used", &line).await;
        }
        if revoked {
            tracing::warn!(credential_id = validated.jti, identity = %validated.identity, "a revoked JWT was presented");
            return Err(IssueError::Revoked(validated.jti));
        }
        Ok(validated)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::{TrustDomain, Ttl};
    use crate::issue::{Ask, Caller as Asker, Credential, IssueRequest, Origin};
    use crate::ledger::verify_chain;
    use crate::policy::release::Release;
    use crate::testing::IssuerBuilder;
    use crate::validate::wpt::ProofError;

    const RULES: &str = r#"
        @id("api-jwt-db")
        @max_ttl("10m")
        permit (principal, action == Mayfly::Action::"issue_jwt", resource == Mayfly::Audience::"db")
        when { principal.attestation == "unix" };
    "#;

    #[tokio::test]
    async fn a_proof_is_accepted_once_each_acceptance_is_a_use_and_a_revoked_wit_is_refused() {
        use crate::keys::ProofSigner;
        use wpt::{ProofRequest, sign_proof};
        let inventory = r#"
            [[workload]]
            id = "spiffe://mayfly.local/dev/api"
            owner = "team-api"
            purpose = "test"
            environment = "dev"
            tier = "standard"
            expires = 2030-01-01
            selectors = ["unix:uid:1001"]
        "#;
        let files = crate::policy::shipped_files_with(&[
            ("inventory.toml", Some(inventory)),
            ("tests/local.toml", None),
            ("tests/ci.toml", None),
            ("tests/break-glass.toml", None),
        ]);
        let release =
            Release::build(&files, &TrustDomain::parse("mayfly.local").unwrap(), None, None, "t".into()).unwrap();
        let t = IssuerBuilder::new(&["unix:uid:1001"], release).build().await;
        let settings = ProofSettings { window: std::time::Duration::from_secs(60), replay_entries: 16 };
        let validator = Validator::new(
            t.jwt.clone(),
            t.wit.clone(),
            settings,
            t.revocations.clone(),
            t.emergency.clone(),
            t.ledger.clone(),
            t.clock.clone(),
        );
        let request =
            IssueRequest { ask: Ask::Wit, ttl: Ttl::parse("10m").unwrap(), spiffe_id: None, origin: Origin::default() };
        let issued = t.issuer.issue(Asker::Local(&PeerInfo::without_credentials()), request).await.unwrap();
        let Credential::Wit(w) = &issued.credential else { panic!("wit") };
        let (token, signer) =
            (w.svid.token.expose(), ProofSigner::from_private_jwk(w.key.private_jwk().expose()).unwrap());
        let aud = "https://db.example.org";
        let proof = |lifetime: u64| {
            let req = ProofRequest {
                wit: token,
                audience: aud,
                lifetime: std::time::Duration::from_secs(lifetime),
                access_token: None,
                txn_token: None,
            };
            sign_proof(&signer, &req, t.clock.now()).unwrap()
        };
        let presented =
            |wpt: &'static str| wpt::Presented { wit: token, wpt, audience: aud, access_token: None, txn_token: None };
        // More than a page of JWT-SVID validations first (uses without a proof), all inside
        // the window: the proof's use lands on the second page that a restart reads.
        for n in 0..5000 {
            let used = Used { credential_id: format!("jwt-{n}"), kind: "jwt".into(), ..Used::default() };
            t.ledger.record(t.clock.now(), Event::Used(used)).await.unwrap();
        }
        let wpt: &'static str = proof(30).leak();
        let ok = validator.verify_proof(&presented(wpt), "127.0.0.1:5").await.unwrap();
        assert_eq!(
            (ok.identity.as_str(), ok.credential_id.as_str()),
            ("spiffe://mayfly.local/dev/api", issued.credential_id.as_str())
        );
        let uses = |t: &crate::testing::TestIssuer| -> Vec<Used> {
            t.backend
                .events()
                .iter()
                .filter_map(|e| match e.event() {
                    // The WIT uses (the JWT-SVID ones written below are filler).
                    Ok(Event::Used(u)) if u.kind == "wit" => Some(u),
                    _ => None,
                })
                .collect()
        };
        let first = uses(&t);
        assert_eq!(first.len(), 1);
        assert_eq!(
            (first[0].kind.as_str(), first[0].use_kind.as_str(), first[0].proof_jti.as_deref()),
            ("wit", "verify_wpt", Some(ok.proof_jti.as_str()))
        );
        assert_eq!(first[0].audience.as_deref(), Some(aud));
        // Once only; refusals before acceptance are not uses.
        assert!(matches!(validator.verify_proof(&presented(wpt), "x").await, Err(ProofError::Replayed)));
        // A restart: the new validator learns the accepted proof from the ledger.
        let restarted = Validator::new(
            t.jwt.clone(),
            t.wit.clone(),
            settings,
            t.revocations.clone(),
            t.emergency.clone(),
            t.ledger.clone(),
            t.clock.clone(),
        );
        assert_eq!(restarted.remember_accepted_proofs(&t.backend).await.unwrap(), 1);
        assert!(matches!(restarted.verify_proof(&presented(wpt), "x").await, Err(ProofError::Replayed)));
        let too_long: &'static str = proof(3600).leak();
        assert!(matches!(validator.verify_proof(&presented(too_long), "x").await, Err(ProofError::TooLong { .. })));
        let other_aud = wpt::Presented { audience: "https://other.example.org", ..presented(proof(30).leak()) };
        assert!(matches!(validator.verify_proof(&other_aud, "x").await, Err(ProofError::Audience)));
        assert_eq!(uses(&t).len(), 1);
        // Revoked: a valid proof is recorded as a refused use and refused.
        t.revocations.apply_revoked(&[crate::revoke::Revoked {
            credential_id: issued.credential_id.clone(),
            kind: "wit".into(),
            identity: issued.identity.to_string(),
            serial: issued.credential_id.clone(),
            not_after: i64::MAX,
            revoked_at: 0,
        }]);
        let err = validator.verify_proof(&presented(proof(30).leak()), "x").await.unwrap_err();
        assert!(matches!(err, ProofError::Revoked(_)), "{err:?}");
        assert_eq!(uses(&t).last().unwrap().refused.as_deref(), Some("revoked"));
        // The WIT past its expiry: refused before the proof is looked at.
        t.clock.advance(std::time::Duration::from_secs(600));
        assert!(matches!(validator.verify_proof(&presented(proof(30).leak()), "x").await, Err(ProofError::Wit(_))));
        let events = t.backend.events();
        assert_eq!(verify_chain(&events), Ok(events.len()));
    }

    /// A replay table two validators (two daemons) share; `down` makes it unreachable.
    #[derive(Default)]
    struct SharedTable {
        seen: std::sync::Mutex<std::collections::HashSet<String>>,
        down: std::sync::atomic::AtomicBool,
    }

    impl ReplayGuard for SharedTable {
        fn first_use<'a>(&'a self, key: &'a str, _until: SystemTime) -> crate::BoxFuture<'a, Result<bool, String>> {
            let answer = if self.down.load(std::sync::atomic::Ordering::SeqCst) {
                Err("connection refused".to_owned())
            } else {
                Ok(self.seen.lock().unwrap().insert(key.to_owned()))
            };
            Box::pin(async move { answer })
        }
    }

    #[tokio::test]
    async fn with_several_daemons_a_proof_is_accepted_once_for_all_and_never_without_the_shared_table() {
        use crate::keys::ProofSigner;
        use wpt::{ProofRequest, sign_proof};
        let inventory = r#"
            [[workload]]
            id = "spiffe://mayfly.local/dev/api"
            owner = "team-api"
            purpose = "test"
            environment = "dev"
            tier = "standard"
            expires = 2030-01-01
            selectors = ["unix:uid:1001"]
        "#;
        let files = crate::policy::shipped_files_with(&[
            ("inventory.toml", Some(inventory)),
            ("tests/local.toml", None),
            ("tests/ci.toml", None),
        ]);
        let release =
            Release::build(&files, &TrustDomain::parse("mayfly.local").unwrap(), None, None, "t".into()).unwrap();
        let t = IssuerBuilder::new(&["unix:uid:1001"], release).build().await;
        let table = Arc::new(SharedTable::default());
        let daemon = || {
            Validator::new(
                t.jwt.clone(),
                t.wit.clone(),
                ProofSettings::default(),
                t.revocations.clone(),
                t.emergency.clone(),
                t.ledger.clone(),
                t.clock.clone(),
            )
            .with_shared_replay(table.clone())
        };
        let (a, b) = (daemon(), daemon());
        let request =
            IssueRequest { ask: Ask::Wit, ttl: Ttl::parse("10m").unwrap(), spiffe_id: None, origin: Origin::default() };
        let issued = t.issuer.issue(Asker::Local(&PeerInfo::without_credentials()), request).await.unwrap();
        let Credential::Wit(w) = &issued.credential else { panic!("wit") };
        let (token, signer) =
            (w.svid.token.expose(), ProofSigner::from_private_jwk(w.key.private_jwk().expose()).unwrap());
        let proof = || {
            let req = ProofRequest {
                wit: token,
                audience: "db",
                lifetime: std::time::Duration::from_secs(30),
                access_token: None,
                txn_token: None,
            };
            sign_proof(&signer, &req, t.clock.now()).unwrap()
        };
        let wpt = proof();
        let p = wpt::Presented { wit: token, wpt: &wpt, audience: "db", access_token: None, txn_token: None };
        assert!(a.verify_proof(&p, "a").await.is_ok());
        assert!(matches!(b.verify_proof(&p, "b").await, Err(ProofError::Replayed)), "the other daemon knows it");
        table.down.store(true, std::sync::atomic::Ordering::SeqCst);
        let fresh = proof();
        let p = wpt::Presented { wpt: &fresh, ..p };
        assert!(matches!(b.verify_proof(&p, "b").await, Err(ProofError::Unavailable(_))), "fail closed");
    }

    #[tokio::test]
    async fn a_successful_validation_is_a_used_event_and_a_failed_one_is_not() {
        let inventory = r#"
            [[workload]]
            id = "spiffe://mayfly.local/api"
            owner = "team-api"
            purpose = "test"
            environment = "prod"
            tier = "standard"
            expires = 2030-01-01
            selectors = ["unix:uid:1001"]
        "#;
        let files = crate::policy::shipped_files_with(&[
            ("inventory.toml", Some(inventory)),
            ("tests/local.toml", None),
            ("tests/ci.toml", None),
            ("issuance/jwt-test.cedar", Some(RULES)),
        ]);
        let release =
            Release::build(&files, &TrustDomain::parse("mayfly.local").unwrap(), None, None, "t".into()).unwrap();
        let t = IssuerBuilder::new(&["unix:uid:1001"], release).build().await;
        let validator = Validator::new(
            t.jwt.clone(),
            t.wit.clone(),
            ProofSettings::default(),
            t.revocations.clone(),
            t.emergency.clone(),
            t.ledger.clone(),
            t.clock.clone(),
        );
        let peer = PeerInfo::without_credentials();
        let request = IssueRequest {
            ask: Ask::Jwt { audiences: vec!["db".into()] },
            ttl: Ttl::parse("5m").unwrap(),
            spiffe_id: None,
            origin: Origin::default(),
        };
        let issued = t.issuer.issue(Asker::Local(&peer), request).await.unwrap();
        let Credential::Jwt(svid) = &issued.credential else { panic!("jwt") };
        let ok = validator.validate_jwt(&peer, svid.token.expose(), "db").await.unwrap();
        assert_eq!(ok.identity.as_str(), "spiffe://mayfly.local/api");
        let before = t.backend.events().len();
        assert!(matches!(
            validator.validate_jwt(&peer, svid.token.expose(), "other").await,
            Err(IssueError::InvalidJwt(_))
        ));
        let events = t.backend.events();
        assert_eq!(events.len(), before, "a token that does not verify is not a use");
        let used = events.iter().find_map(|e| match e.event() {
            Ok(Event::Used(u)) => Some(u),
            _ => None,
        });
        let used = used.expect("a used event");
        assert_eq!(
            (used.credential_id.as_str(), used.audience.as_deref()),
            (issued.credential_id.as_str(), Some("db"))
        );
        assert_eq!(verify_chain(&events), Ok(events.len()));

        // Revoked: the attempt is recorded, and refused.
        t.revocations.apply_revoked(&[crate::revoke::Revoked {
            credential_id: issued.credential_id.clone(),
            kind: "jwt".into(),
            identity: issued.identity.to_string(),
            serial: issued.credential_id.clone(),
            not_after: i64::MAX,
            revoked_at: 0,
        }]);
        let err = validator.validate_jwt(&peer, svid.token.expose(), "db").await.unwrap_err();
        assert!(matches!(err, IssueError::Revoked(_)), "{err:?}");
        let last = t.backend.events().pop().unwrap().event().unwrap();
        assert!(matches!(last, Event::Used(u) if u.refused.as_deref() == Some("revoked")));
    }
}
