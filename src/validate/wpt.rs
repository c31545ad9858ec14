//! Workload Proof Tokens (WIMSE draft-ietf-wimse-wpt): the checks of a proof against the
//! WIT it accompanies — `typ: wpt+jwt`, the `alg` of the WIT's `cnf.jwk`, a signature by
//! that key, `aud`, an `exp` inside a short window, `wth` (the hash of the very WIT
//! presented), `ath`/`tth` when an access or transaction token comes with it, no `oth`
//! (not understood, so refused) — pure, with time passed in. Also the bounded replay cache
//! (one use per proof `jti` within the window) and the signing side, for `mayfly wpt sign`
//! and tests. Records nothing: `Validator::verify_proof` does.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use serde_json::{Map, Value, json};

use crate::clock::unix_secs;
use crate::keys::ProofSigner;
use crate::ledger::LedgerError;
use crate::mint::jws;
use crate::mint::wit::{ValidatedWit, WitError};

/// The `typ` of a Workload Proof Token (`application/wpt+jwt`).
pub const WPT_TYPE: &str = "wpt+jwt";
/// Proofs longer than this are refused before any decoding.
pub const MAX_WPT_BYTES: usize = 8 * 1024;
/// An access or transaction token bound by `ath`/`tth` may be this long.
pub const MAX_BOUND_TOKEN_BYTES: usize = 16 * 1024;
pub const MAX_AUDIENCE_BYTES: usize = 512;
/// A proof `jti` longer than this is refused (128 random bits are 22 characters).
const MAX_JTI_BYTES: usize = 256;
/// Clock difference tolerated between the signer and mayfly, on `iat` and the window.
pub const SKEW_SECS: i64 = 30;

/// Why a proof was refused. Says what is wrong, never echoes a token.
#[derive(Debug, thiserror::Error)]
pub enum ProofError {
    #[error(transparent)]
    Wit(#[from] WitError),
    #[error("the WIT `{0}` was revoked")]
    Revoked(String),
    #[error("the proof is malformed: {0}")]
    Malformed(String),
    #[error("the proof's `typ` is not `wpt+jwt`")]
    Type,
    #[error("the proof's algorithm `{0}` is not the WIT key's (`cnf.jwk.alg`)")]
    Algorithm(String),
    #[error("the proof is not signed by the WIT's key (`cnf.jwk`)")]
    Signature,
    #[error("the proof is not for this audience")]
    Audience,
    #[error("the proof expired at {exp}")]
    Expired { exp: i64 },
    #[error("the proof lives too long: its `exp` is more than {window_secs} s ahead")]
    TooLong { window_secs: u64 },
    #[error("the proof is not valid before {iat}")]
    NotYetValid { iat: i64 },
    #[error("the proof's `wth` is not the hash of the WIT presented with it")]
    WitHash,
    #[error("the proof's `{0}` does not match the token presented with it")]
    TokenHash(&'static str),
    #[error("the proof binds no {0}, but one was presented")]
    MissingBinding(&'static str),
    #[error("the proof is bound to {0} that was not presented")]
    Unbound(&'static str),
    #[error("the proof was already used (replayed `jti`)")]
    Replayed,
    #[error("too many proofs within the window; try again shortly")]
    Busy,
    #[error("the shared replay table cannot be reached, so the proof was not accepted: {0}")]
    Unavailable(String),
    #[error("the use cannot be recorded, so the proof was not accepted")]
    Ledger(#[from] LedgerError),
}

/// What a relying party presents: the WIT, the proof, the audience it expects, and the
/// tokens the proof must bind when they accompany the request.
#[derive(Clone, Copy, Debug)]
pub struct Presented<'a> {
    pub wit: &'a str,
    pub wpt: &'a str,
    pub audience: &'a str,
    pub access_token: Option<&'a str>,
    pub txn_token: Option<&'a str>,
}

/// A proof that passed every check but the replay cache.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckedProof {
    pub jti: String,
    pub exp: i64,
}

/// Checks `p.wpt` against `wit` (already verified from `p.wit`) at `now`, with proofs
/// living at most `window`.
pub fn check_proof(
    p: &Presented<'_>,
    wit: &ValidatedWit,
    now: SystemTime,
    window: Duration,
) -> Result<CheckedProof, ProofError> {
    let proof = jws::parse(p.wpt, MAX_WPT_BYTES).map_err(|e| ProofError::Malformed(e.to_string()))?;
    let typ = proof.header_str("typ").unwrap_or_default();
    if !(typ.eq_ignore_ascii_case(WPT_TYPE) || typ.eq_ignore_ascii_case("application/wpt+jwt")) {
        return Err(ProofError::Type);
    }
    // Why string-equal to cnf.jwk.alg: the draft binds the proof's algorithm to the key's.
    let alg = proof.header_str("alg").unwrap_or_default();
    if alg != wit.cnf.alg {
        return Err(ProofError::Algorithm(alg.chars().take(16).collect()));
    }
    if proof.header.contains_key("crit") {
        return Err(ProofError::Malformed("`crit` names extensions mayfly does not understand".into()));
    }
    if !proof.verifies_with(&wit.cnf.point) {
        return Err(ProofError::Signature);
    }
    let claims = &proof.claims;
    let audience_ok = match claims.get("aud") {
        Some(Value::String(aud)) => aud == p.audience,
        Some(Value::Array(auds)) => auds.iter().any(|a| a.as_str() == Some(p.audience)),
        _ => return Err(ProofError::Malformed("no `aud`".into())),
    };
    if !audience_ok {
        return Err(ProofError::Audience);
    }
    let now_secs = unix_secs(now);
    let window_secs = window.as_secs();
    let latest = now_secs.saturating_add(i64::try_from(window_secs).unwrap_or(i64::MAX)).saturating_add(SKEW_SECS);
    let exp = number(claims, "exp")?.ok_or_else(|| ProofError::Malformed("no `exp`".into()))?;
    if exp <= now_secs {
        return Err(ProofError::Expired { exp });
    }
    if exp > latest {
        return Err(ProofError::TooLong { window_secs });
    }
    if let Some(iat) = number(claims, "iat")? {
        if iat > now_secs + SKEW_SECS {
            return Err(ProofError::NotYetValid { iat });
        }
        if exp.saturating_sub(iat) > latest - now_secs {
            return Err(ProofError::TooLong { window_secs });
        }
    }
    let jti = claims
        .get("jti")
        .and_then(Value::as_str)
        .filter(|j| !j.is_empty() && j.len() <= MAX_JTI_BYTES)
        .ok_or_else(|| ProofError::Malformed(format!("no `jti` of 1..={MAX_JTI_BYTES} bytes")))?;
    let wth = claims.get("wth").and_then(Value::as_str).ok_or_else(|| ProofError::Malformed("no `wth`".into()))?;
    if wth != jws::sha256_b64url(p.wit) {
        return Err(ProofError::WitHash);
    }
    bound(claims, "ath", "an access token", p.access_token)?;
    bound(claims, "tth", "a transaction token", p.txn_token)?;
    // Why refuse: the draft says a proof whose `oth` entries are not understood MUST be.
    if claims.contains_key("oth") {
        return Err(ProofError::Malformed("`oth` (other token hashes) is not supported".into()));
    }
    Ok(CheckedProof { jti: jti.to_owned(), exp })
}

/// A numeric claim (`None` when absent).
fn number(claims: &Map<String, Value>, name: &str) -> Result<Option<i64>, ProofError> {
    match claims.get(name) {
        None => Ok(None),
        Some(v) => v.as_i64().map(Some).ok_or_else(|| ProofError::Malformed(format!("`{name}` is not a number"))),
    }
}

/// `ath`/`tth`: present exactly when the token is, and its hash.
fn bound(
    claims: &Map<String, Value>,
    claim: &'static str,
    what: &'static str,
    token: Option<&str>,
) -> Result<(), ProofError> {
    match (claims.get(claim), token) {
        (None, None) => Ok(()),
        (Some(_), None) => Err(ProofError::Unbound(what)),
        (None, Some(_)) => Err(ProofError::MissingBinding(claim)),
        (Some(hash), Some(token)) if hash.as_str() == Some(jws::sha256_b64url(token).as_str()) => Ok(()),
        (Some(_), Some(_)) => Err(ProofError::TokenHash(claim)),
    }
}

/// Proof `jti`s seen, each until its proof expires: one use per proof. Bounded: when it is
/// full of live entries, new proofs are refused (`Busy`) rather than an entry forgotten.
/// Why not a general-purpose cache (moka): its eviction and admission policy may drop a
/// live entry under pressure, and a dropped entry is a replay let through. Only proofs
/// that verified reach it, so filling it takes valid WITs and their keys.
pub struct ReplayCache {
    capacity: usize,
    state: Mutex<ReplayState>,
}

#[derive(Default)]
struct ReplayState {
    seen: HashMap<[u8; 32], i64>,
    by_expiry: BTreeSet<(i64, [u8; 32])>,
}

impl ReplayCache {
    pub fn new(capacity: usize) -> Self {
        Self { capacity, state: Mutex::new(ReplayState::default()) }
    }

    /// Records the proof `jti` of the WIT `wit_jti` until `until` (Unix seconds): `Ok` the
    /// first time, `Replayed` after.
    pub fn first_use(&self, wit_jti: &str, proof_jti: &str, until: i64, now: i64) -> Result<(), ProofError> {
        let mut hasher = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
        hasher.update(wit_jti.as_bytes());
        hasher.update(&[0]);
        hasher.update(proof_jti.as_bytes());
        let mut key = [0u8; 32];
        key.copy_from_slice(hasher.finish().as_ref());
        // Why: entries are inserted and removed whole; a panic elsewhere leaves them consistent.
        let mut s = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        while let Some(&(expires, k)) = s.by_expiry.first() {
            if expires >= now {
                break;
            }
            s.by_expiry.pop_first();
            s.seen.remove(&k);
        }
        if s.seen.contains_key(&key) {
            return Err(ProofError::Replayed);
        }
        if s.seen.len() >= self.capacity {
            return Err(ProofError::Busy);
        }
        s.seen.insert(key, until);
        s.by_expiry.insert((until, key));
        Ok(())
    }

    pub fn len(&self) -> usize {
        self.state.lock().unwrap_or_else(PoisonError::into_inner).seen.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// What a proof says about its request.
#[derive(Clone, Copy, Debug)]
pub struct ProofRequest<'a> {
    pub wit: &'a str,
    pub audience: &'a str,
    pub lifetime: Duration,
    pub access_token: Option<&'a str>,
    pub txn_token: Option<&'a str>,
}

/// A Workload Proof Token for `req`, signed with the WIT's key: `typ: wpt+jwt`, ES256,
/// `aud`, `iat`, `exp`, a random 128-bit `jti`, `wth` and, when given, `ath`/`tth`.
pub fn sign_proof(key: &ProofSigner, req: &ProofRequest<'_>, now: SystemTime) -> Result<String, String> {
    let mut random = [0u8; 16];
    aws_lc_rs::rand::fill(&mut random).map_err(|_| "the system RNG failed".to_owned())?;
    let iat = unix_secs(now);
    let lifetime = i64::try_from(req.lifetime.as_secs()).map_err(|e| e.to_string())?;
    let mut claims = json!({
        "aud": req.audience,
        "iat": iat,
        "exp": iat + lifetime,
        "jti": jws::b64url(&random),
        "wth": jws::sha256_b64url(req.wit),
    });
    if let Some(map) = claims.as_object_mut() {
        if let Some(t) = req.access_token {
            map.insert("ath".into(), jws::sha256_b64url(t).into());
        }
        if let Some(t) = req.txn_token {
            map.insert("tth".into(), jws::sha256_b64url(t).into());
        }
    }
    jws::sign(&json!({ "alg": "ES256", "typ": WPT_TYPE }), &claims, |m| key.sign(m))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::{TrustDomain, Ttl, WorkloadId};
    use crate::keys::{JwtKey, WorkloadKey};
    use crate::mint::wit::{Es256WitMinter, WitMinter};
    use crate::policy::Grant;

    const AUD: &str = "https://db.example.org/query";

    fn now() -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000)
    }

    struct Fixture {
        wit: String,
        checked: ValidatedWit,
        signer: ProofSigner,
    }

    fn fixture() -> Fixture {
        let m = Es256WitMinter::new(JwtKey::generate().unwrap(), TrustDomain::parse("example.org").unwrap()).unwrap();
        let key = WorkloadKey::generate().unwrap();
        let grant =
            Grant::wit_for_tests(WorkloadId::parse("spiffe://example.org/api").unwrap(), Ttl::parse("10m").unwrap());
        let wit = m.mint_wit(grant, &key, "wit-1", now()).unwrap().token.expose().to_owned();
        let checked = m.validate_wit(&wit, now()).unwrap();
        let signer = ProofSigner::from_private_jwk(key.private_jwk().expose()).unwrap();
        Fixture { wit, checked, signer }
    }

    fn request<'a>(wit: &'a str) -> ProofRequest<'a> {
        ProofRequest { wit, audience: AUD, lifetime: Duration::from_secs(60), access_token: None, txn_token: None }
    }

    fn presented<'a>(wit: &'a str, wpt: &'a str) -> Presented<'a> {
        Presented { wit, wpt, audience: AUD, access_token: None, txn_token: None }
    }

    const WINDOW: Duration = Duration::from_secs(300);

    /// A proof with `claims` changed as given, signed by `signer`.
    fn edited(signer: &ProofSigner, proof: &str, header: &[(&str, Value)], claims: &[(&str, Option<Value>)]) -> String {
        let parsed = jws::parse(proof, MAX_WPT_BYTES).unwrap();
        let (mut h, mut c) = (parsed.header.clone(), parsed.claims.clone());
        for (k, v) in header {
            h.insert((*k).into(), v.clone());
        }
        for (k, v) in claims {
            match v {
                Some(v) => c.insert((*k).into(), v.clone()),
                None => c.remove(*k),
            };
        }
        jws::sign(&Value::Object(h), &Value::Object(c), |m| signer.sign(m)).unwrap()
    }

    #[test]
    fn a_proof_signed_with_the_wit_key_passes_and_says_its_jti() {
        let f = fixture();
        let wpt = sign_proof(&f.signer, &request(&f.wit), now()).unwrap();
        let ok = check_proof(&presented(&f.wit, &wpt), &f.checked, now(), WINDOW).unwrap();
        assert_eq!(ok.exp, 1_800_000_060);
        assert_eq!(ok.jti.len(), 22, "128 random bits, base64url");
        let header = jws::parse(&wpt, MAX_WPT_BYTES).unwrap().header;
        assert_eq!(Value::Object(header), json!({ "alg": "ES256", "typ": "wpt+jwt" }));
        // Bound tokens: ath and tth are checked when the tokens are presented.
        let bound_req = ProofRequest { access_token: Some("at-123"), txn_token: Some("txn-9"), ..request(&f.wit) };
        let wpt = sign_proof(&f.signer, &bound_req, now()).unwrap();
        let p = Presented { access_token: Some("at-123"), txn_token: Some("txn-9"), ..presented(&f.wit, &wpt) };
        assert!(check_proof(&p, &f.checked, now(), WINDOW).is_ok());
        let wrong = Presented { access_token: Some("at-124"), ..p };
        assert!(matches!(check_proof(&wrong, &f.checked, now(), WINDOW), Err(ProofError::TokenHash("ath"))));
        let missing = Presented { txn_token: None, ..p };
        assert!(matches!(check_proof(&missing, &f.checked, now(), WINDOW), Err(ProofError::Unbound(_))));
        let plain = sign_proof(&f.signer, &request(&f.wit), now()).unwrap();
        let unbound = Presented { access_token: Some("at-123"), ..presented(&f.wit, &plain) };
        assert!(matches!(check_proof(&unbound, &f.checked, now(), WINDOW), Err(ProofError::MissingBinding("ath"))));
    }

    #[test]
    fn each_bad_proof_is_refused_saying_why() {
        let f = fixture();
        let good = sign_proof(&f.signer, &request(&f.wit), now()).unwrap();
        let check = |wpt: &str| check_proof(&presented(&f.wit, wpt), &f.checked, now(), WINDOW).unwrap_err();
        let other = ProofSigner::from_private_jwk(WorkloadKey::generate().unwrap().private_jwk().expose()).unwrap();
        assert!(matches!(check(&sign_proof(&other, &request(&f.wit), now()).unwrap()), ProofError::Signature));
        assert!(matches!(check(&edited(&f.signer, &good, &[("typ", json!("JWT"))], &[])), ProofError::Type));
        assert!(matches!(check(&edited(&f.signer, &good, &[("alg", json!("ES384"))], &[])), ProofError::Algorithm(_)));
        assert!(matches!(check(&edited(&f.signer, &good, &[("crit", json!(["x"]))], &[])), ProofError::Malformed(_)));
        let claims = |c: &[(&str, Option<Value>)]| check(&edited(&f.signer, &good, &[], c));
        assert!(matches!(claims(&[("aud", Some(json!("https://other.example.org")))]), ProofError::Audience));
        assert!(matches!(claims(&[("aud", None)]), ProofError::Malformed(_)));
        assert!(matches!(claims(&[("exp", Some(json!(1_800_000_000)))]), ProofError::Expired { .. }));
        assert!(matches!(claims(&[("exp", None)]), ProofError::Malformed(_)));
        assert!(matches!(claims(&[("exp", Some(json!(1_800_000_000 + 331)))]), ProofError::TooLong { .. }));
        assert!(matches!(
            claims(&[("iat", Some(json!(1_799_999_000))), ("exp", Some(json!(1_800_000_100)))]),
            ProofError::TooLong { .. }
        ));
        assert!(matches!(claims(&[("iat", Some(json!(1_800_000_031)))]), ProofError::NotYetValid { .. }));
        assert!(matches!(claims(&[("wth", Some(json!(jws::sha256_b64url("another WIT"))))]), ProofError::WitHash));
        assert!(matches!(claims(&[("wth", None)]), ProofError::Malformed(_)));
        assert!(matches!(claims(&[("jti", None)]), ProofError::Malformed(_)));
        assert!(matches!(claims(&[("jti", Some(json!("j".repeat(257))))]), ProofError::Malformed(_)));
        assert!(matches!(claims(&[("oth", Some(json!({ "x-token": "abc" })))]), ProofError::Malformed(_)));
        assert!(matches!(check("not.a.proof"), ProofError::Malformed(_)));
        assert!(matches!(check(&"x".repeat(MAX_WPT_BYTES + 1)), ProofError::Malformed(_)));
        // The proof of one WIT does not pass with another WIT of the same key holder.
        let g = fixture();
        let err = check_proof(&presented(&g.wit, &good), &g.checked, now(), WINDOW).unwrap_err();
        assert!(matches!(err, ProofError::Signature | ProofError::WitHash), "{err:?}");
        // An audience array naming ours passes.
        assert!(
            check_proof(
                &presented(&f.wit, &edited(&f.signer, &good, &[], &[("aud", Some(json!(["a", AUD])))])),
                &f.checked,
                now(),
                WINDOW
            )
            .is_ok()
        );
    }

    #[test]
    fn the_replay_cache_takes_each_jti_once_forgets_it_after_expiry_and_refuses_when_full() {
        let c = ReplayCache::new(2);
        assert!(c.first_use("wit-1", "p1", 100, 10).is_ok());
        assert!(matches!(c.first_use("wit-1", "p1", 100, 20), Err(ProofError::Replayed)));
        assert!(c.first_use("wit-2", "p1", 100, 20).is_ok(), "per WIT: another sender's jti is its own");
        assert!(matches!(c.first_use("wit-3", "p9", 100, 30), Err(ProofError::Busy)), "full of live entries");
        assert!(matches!(c.first_use("wit-1", "p1", 100, 30), Err(ProofError::Replayed)), "still remembered");
        assert!(c.first_use("wit-3", "p9", 200, 101).is_ok(), "expired entries make room");
        assert_eq!(c.len(), 1);
        assert!(c.first_use("wit-1", "p1", 300, 102).is_ok(), "a jti past its proof's expiry is forgotten");
    }
}
