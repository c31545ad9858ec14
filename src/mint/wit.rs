//! WIT-SVIDs: the SPIFFE WIT-SVID profile of the WIMSE Workload Identity Token. A WIT is a
//! JWT signed ES256 by a key of its own (never the JWT-SVID key; kids are RFC 7638
//! thumbprints, so they differ whenever the keys do), typed `wit+jwt`, with `kid`, `sub`
//! (the SPIFFE ID), `iat`, `exp`, `jti` (the credential id, for audit) and `cnf.jwk` — the
//! public half of the key mayfly made for the workload. No `aud`; `iss` only when
//! configured (never an OIDC-discoverable URL: config refuses one). The WIT keys are
//! published as a JWKS with `use: wit-svid`. Also verifies mayfly's own WITs, the first
//! half of checking a proof (`validate::wpt` does the second). Records nothing, decides
//! nothing.

use std::time::{Duration, SystemTime};

use serde_json::{Value, json};

use super::{MintError, jws};
use crate::clock::unix_secs;
use crate::identity::{TrustDomain, WorkloadId};
use crate::keys::{JwtKey, SecretString, WorkloadKey, ec_thumbprint};
use crate::policy::{Grant, Resource};

/// The `typ` of a WIT (`application/wit+jwt`).
pub const WIT_TYPE: &str = "wit+jwt";
/// WITs longer than this are refused before any decoding (ours are ~700 bytes).
pub const MAX_WIT_BYTES: usize = 8 * 1024;
/// How far in the future a WIT's `nbf` may be and still validate (another host's clock).
const START_SKEW_SECS: i64 = 30;
/// `jti` values longer than this are not ours.
const MAX_JTI_BYTES: usize = 128;

/// Why a WIT did not verify. Says what is wrong, never echoes the token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WitError {
    #[error("the WIT is malformed: {0}")]
    Malformed(String),
    #[error("the WIT's `typ` is not `wit+jwt`")]
    Type,
    #[error("the WIT's algorithm `{0}` is not ES256")]
    Algorithm(String),
    #[error("the WIT was not signed by a WIT key of this trust domain (unknown or missing kid)")]
    UnknownKey,
    #[error("the WIT's signature does not verify")]
    Signature,
    #[error("the WIT expired at {exp}")]
    Expired { exp: i64 },
    #[error("the WIT is not valid before {nbf}")]
    NotYetValid { nbf: i64 },
    #[error("the WIT's subject is not a SPIFFE ID of this trust domain: {0}")]
    Subject(String),
    #[error("the WIT's confirmation key (cnf.jwk) is not usable: {0}")]
    Confirmation(String),
}

/// A freshly minted WIT-SVID. Not a bearer secret (it is useless without its key), but it
/// is still never logged or recorded: the ledger keeps its jti, its SHA-256 and the key's
/// thumbprint.
#[derive(Debug)]
pub struct WitSvid {
    pub token: SecretString,
    pub jti: String,
    /// SHA-256 of the compact token, lower-case hex.
    pub fingerprint: String,
    /// RFC 7638 thumbprint of the confirmation key (`cnf.jwk`).
    pub key_thumbprint: String,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

/// The public key a WIT binds (its `cnf.jwk`): a P-256 key for ES256 proofs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfirmationKey {
    /// Uncompressed SEC1 point, 0x04 || x || y.
    pub point: Vec<u8>,
    /// The JWK's `alg`, the only algorithm a proof may use: ES256.
    pub alg: String,
    pub thumbprint: String,
}

/// One of mayfly's WITs that verified: signed by a WIT key, typed, unexpired.
#[derive(Clone, Debug)]
pub struct ValidatedWit {
    pub identity: WorkloadId,
    /// The credential id.
    pub jti: String,
    pub exp: i64,
    pub kid: String,
    pub cnf: ConfirmationKey,
}

/// Signs WIT-SVIDs (consuming the grant that allowed each) and verifies its own.
pub trait WitMinter: Send + Sync + 'static {
    fn mint_wit(&self, grant: Grant, key: &WorkloadKey, jti: &str, now: SystemTime) -> Result<WitSvid, MintError>;

    /// The JWKS of the WIT keys, each `use: wit-svid`.
    fn wit_jwks(&self) -> Value;

    fn validate_wit(&self, token: &str, now: SystemTime) -> Result<ValidatedWit, WitError>;
}

/// The ES256 WIT signer.
pub struct Es256WitMinter {
    key: JwtKey,
    pair: aws_lc_rs::signature::EcdsaKeyPair,
    trust_domain: TrustDomain,
    issuer: Option<String>,
}

impl std::fmt::Debug for Es256WitMinter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Es256WitMinter").field("kid", &self.key.kid()).field("issuer", &self.issuer).finish()
    }
}

impl Es256WitMinter {
    pub fn new(key: JwtKey, trust_domain: TrustDomain) -> Result<Self, MintError> {
        use aws_lc_rs::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair};
        let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, key.pkcs8_der())
            .map_err(|e| MintError::Signing(format!("the WIT key: {e}")))?;
        Ok(Self { key, pair, trust_domain, issuer: None })
    }

    /// Stamps `iss` on every WIT (config keeps it from being an OIDC-discoverable URL).
    pub fn with_issuer(mut self, issuer: Option<String>) -> Self {
        self.issuer = issuer;
        self
    }

    pub fn kid(&self) -> &str {
        self.key.kid()
    }
}

impl WitMinter for Es256WitMinter {
    fn mint_wit(&self, grant: Grant, key: &WorkloadKey, jti: &str, now: SystemTime) -> Result<WitSvid, MintError> {
        if grant.resource() != &Resource::Wit {
            return Err(MintError::Signing("a WIT needs a WIT grant".into()));
        }
        let iat = unix_secs(now);
        let ttl = i64::try_from(grant.ttl().as_secs()).map_err(|e| MintError::Signing(e.to_string()))?;
        let exp = iat + ttl;
        let header = json!({ "alg": "ES256", "kid": self.key.kid(), "typ": WIT_TYPE });
        let mut claims = json!({
            "sub": grant.identity().as_str(),
            "iat": iat,
            "exp": exp,
            "jti": jti,
            "cnf": { "jwk": { "kty": "EC", "crv": "P-256", "x": key.x, "y": key.y, "alg": "ES256" } },
        });
        if let (Some(iss), Some(map)) = (&self.issuer, claims.as_object_mut()) {
            map.insert("iss".into(), iss.clone().into());
        }
        let rng = aws_lc_rs::rand::SystemRandom::new();
        let token = jws::sign(&header, &claims, |m| {
            self.pair.sign(&rng, m).map(|s| s.as_ref().to_vec()).map_err(|_| "ECDSA signing failed".to_owned())
        })
        .map_err(MintError::Signing)?;
        let fingerprint = hex::encode(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, token.as_bytes()));
        let at = |secs: i64| SystemTime::UNIX_EPOCH + Duration::from_secs(secs.max(0).unsigned_abs());
        Ok(WitSvid {
            token: SecretString::new(token),
            jti: jti.to_owned(),
            fingerprint,
            key_thumbprint: key.thumbprint.clone(),
            not_before: at(iat),
            not_after: at(exp),
        })
    }

    fn wit_jwks(&self) -> Value {
        let (x, y) = self.key.public_xy();
        // `use: wit-svid` marks a WIT authority in a SPIFFE bundle (WIT-SVID spec, section 6).
        json!({ "keys": [{ "kty": "EC", "crv": "P-256", "x": x, "y": y, "kid": self.key.kid(), "use": "wit-svid", "alg": "ES256" }] })
    }

    fn validate_wit(&self, token: &str, now: SystemTime) -> Result<ValidatedWit, WitError> {
        let key = |kid: &str| (kid == self.key.kid()).then(|| self.key.public_point().to_vec());
        verify(token, key, &self.trust_domain, now)
    }
}

/// Verifies a WIT with the WIT key `key_for(kid)` names: header (`typ`, `alg`, `kid`, no
/// `crit`), signature, then claims (`exp`, `nbf`, no `aud`, `sub` in `trust_domain`, `jti`,
/// `cnf.jwk`).
pub fn verify(
    token: &str,
    key_for: impl Fn(&str) -> Option<Vec<u8>>,
    trust_domain: &TrustDomain,
    now: SystemTime,
) -> Result<ValidatedWit, WitError> {
    let jws = jws::parse(token, MAX_WIT_BYTES).map_err(|e| WitError::Malformed(e.to_string()))?;
    let typ = jws.header_str("typ").unwrap_or_default();
    if !(typ.eq_ignore_ascii_case(WIT_TYPE) || typ.eq_ignore_ascii_case("application/wit+jwt")) {
        return Err(WitError::Type);
    }
    let alg = jws.header_str("alg").unwrap_or_default();
    if alg != "ES256" {
        return Err(WitError::Algorithm(alg.chars().take(16).collect()));
    }
    if jws.header.contains_key("crit") {
        return Err(WitError::Malformed("`crit` names extensions mayfly does not understand".into()));
    }
    let kid = jws.header_str("kid").ok_or(WitError::UnknownKey)?;
    let public = key_for(kid).ok_or(WitError::UnknownKey)?;
    if !jws.verifies_with(&public) {
        return Err(WitError::Signature);
    }
    let claims = &jws.claims;
    let exp =
        claims.get("exp").and_then(Value::as_i64).ok_or_else(|| WitError::Malformed("no numeric `exp`".into()))?;
    let now_secs = unix_secs(now);
    if exp <= now_secs {
        return Err(WitError::Expired { exp });
    }
    if let Some(nbf) = claims.get("nbf") {
        let nbf = nbf.as_i64().ok_or_else(|| WitError::Malformed("`nbf` is not a number".into()))?;
        if nbf > now_secs + START_SKEW_SECS {
            return Err(WitError::NotYetValid { nbf });
        }
    }
    if claims.contains_key("aud") {
        return Err(WitError::Malformed("a WIT-SVID carries no `aud`".into()));
    }
    let sub = claims.get("sub").and_then(Value::as_str).ok_or_else(|| WitError::Malformed("no `sub`".into()))?;
    let identity = WorkloadId::parse(sub).map_err(|e| WitError::Subject(e.to_string()))?;
    if !identity.is_member_of(trust_domain) {
        return Err(WitError::Subject(format!("`{sub}` is not in the trust domain `{trust_domain}`")));
    }
    let jti = claims
        .get("jti")
        .and_then(Value::as_str)
        .filter(|j| !j.is_empty() && j.len() <= MAX_JTI_BYTES)
        .ok_or_else(|| WitError::Malformed(format!("no `jti` of 1..={MAX_JTI_BYTES} bytes")))?;
    let cnf = confirmation_key(claims.get("cnf")).map_err(WitError::Confirmation)?;
    Ok(ValidatedWit { identity, jti: jti.to_owned(), exp, kid: kid.to_owned(), cnf })
}

/// `cnf.jwk` as a P-256 public key for ES256 (the only kind mayfly binds).
fn confirmation_key(cnf: Option<&Value>) -> Result<ConfirmationKey, String> {
    let jwk = cnf.and_then(|c| c.get("jwk")).and_then(Value::as_object).ok_or("no `cnf.jwk` object")?;
    let text = |name: &str| jwk.get(name).and_then(Value::as_str);
    if jwk.contains_key("d") {
        return Err("it holds a private key".into());
    }
    if text("kty") != Some("EC") || text("crv") != Some("P-256") {
        return Err("not an EC P-256 key".into());
    }
    let alg = text("alg").ok_or("no `alg`")?;
    if alg != "ES256" {
        return Err(format!("`alg` `{}` is not ES256", alg.chars().take(16).collect::<String>()));
    }
    let (x, y) = (text("x").ok_or("no `x`")?, text("y").ok_or("no `y`")?);
    let mut point = vec![0x04];
    for (name, value) in [("x", x), ("y", y)] {
        match jws::from_b64url(value) {
            Some(bytes) if bytes.len() == 32 => point.extend_from_slice(&bytes),
            _ => return Err(format!("`{name}` is not a 32-byte base64url coordinate")),
        }
    }
    Ok(ConfirmationKey { point, alg: alg.to_owned(), thumbprint: ec_thumbprint(x, y) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::Ttl;
    use crate::keys::ProofSigner;

    fn minter() -> Es256WitMinter {
        Es256WitMinter::new(JwtKey::generate().unwrap(), TrustDomain::parse("example.org").unwrap()).unwrap()
    }

    fn grant(ttl: &str) -> Grant {
        Grant::wit_for_tests(WorkloadId::parse("spiffe://example.org/api").unwrap(), Ttl::parse(ttl).unwrap())
    }

    fn now() -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000)
    }

    fn decoded(token: &str) -> (Value, Value) {
        let c = jws::parse(token, MAX_WIT_BYTES).unwrap();
        (Value::Object(c.header), Value::Object(c.claims))
    }

    #[test]
    fn a_minted_wit_follows_the_profile_and_binds_the_workload_key() {
        let m = minter();
        let key = WorkloadKey::generate().unwrap();
        let wit = m.mint_wit(grant("10m"), &key, "cred-1", now()).unwrap();
        let (header, claims) = decoded(wit.token.expose());
        assert_eq!(header, json!({ "alg": "ES256", "kid": m.kid(), "typ": "wit+jwt" }));
        assert_eq!(claims["sub"], "spiffe://example.org/api");
        assert_eq!(claims["exp"].as_i64().unwrap() - claims["iat"].as_i64().unwrap(), 600);
        assert_eq!(claims["jti"], "cred-1");
        assert_eq!(
            claims["cnf"]["jwk"],
            json!({ "kty": "EC", "crv": "P-256", "x": key.x, "y": key.y, "alg": "ES256" })
        );
        assert!(claims.get("aud").is_none() && claims.get("iss").is_none());
        assert_eq!(wit.key_thumbprint, key.thumbprint);
        // The handed-out private JWK is the key in cnf: it signs what cnf verifies.
        let signer = ProofSigner::from_private_jwk(key.private_jwk().expose()).unwrap();
        assert_eq!((signer.x.as_str(), signer.y.as_str()), (key.x.as_str(), key.y.as_str()));
        let ok = m.validate_wit(wit.token.expose(), now() + Duration::from_secs(599)).unwrap();
        assert_eq!(
            (ok.identity.as_str(), ok.jti.as_str(), ok.kid.as_str()),
            ("spiffe://example.org/api", "cred-1", m.kid())
        );
        assert_eq!(ok.cnf.thumbprint, key.thumbprint);
        let jwks = m.wit_jwks();
        assert_eq!(jwks["keys"][0]["use"], "wit-svid");
        assert_eq!(jwks["keys"][0]["kid"], m.kid());
    }

    #[test]
    fn an_issuer_is_stamped_only_when_configured() {
        let m = minter().with_issuer(Some("spiffe://example.org".into()));
        let wit = m.mint_wit(grant("1m"), &WorkloadKey::generate().unwrap(), "c", now()).unwrap();
        assert_eq!(decoded(wit.token.expose()).1["iss"], "spiffe://example.org");
        let err = m.mint_wit(
            Grant::for_tests(WorkloadId::parse("spiffe://example.org/api").unwrap(), Ttl::parse("1m").unwrap()),
            &WorkloadKey::generate().unwrap(),
            "c",
            now(),
        );
        assert!(err.is_err(), "an X.509 grant mints no WIT");
    }

    /// A WIT with `header`/`claims` as given, signed by `m`'s key.
    fn forged(m: &Es256WitMinter, header: Value, claims: Value) -> String {
        jws::sign(&header, &claims, |msg| {
            let rng = aws_lc_rs::rand::SystemRandom::new();
            m.pair.sign(&rng, msg).map(|s| s.as_ref().to_vec()).map_err(|_| "x".to_owned())
        })
        .unwrap()
    }

    #[test]
    fn verification_refuses_every_departure_from_the_profile() {
        let m = minter();
        let key = WorkloadKey::generate().unwrap();
        let wit = m.mint_wit(grant("5m"), &key, "cred-2", now()).unwrap();
        let t = wit.token.expose();
        assert_eq!(
            m.validate_wit(t, now() + Duration::from_secs(300)).unwrap_err(),
            WitError::Expired { exp: 1_800_000_300 }
        );
        let (header, claims) = decoded(t);
        let with = |path: &str, v: Value| {
            let (mut h, mut c) = (header.clone(), claims.clone());
            match path.split_once('.') {
                Some(("h", k)) => h[k] = v,
                Some(("c", k)) => c[k] = v,
                _ => unreachable!(),
            }
            forged(&m, h, c)
        };
        type Expect = fn(&WitError) -> bool;
        let cases: Vec<(String, Expect)> = vec![
            (with("h.typ", json!("JWT")), |e| *e == WitError::Type),
            (with("h.alg", json!("ES384")), |e| matches!(e, WitError::Algorithm(_))),
            (with("h.kid", json!("other")), |e| *e == WitError::UnknownKey),
            (with("h.crit", json!(["b64"])), |e| matches!(e, WitError::Malformed(_))),
            (with("c.aud", json!("db")), |e| matches!(e, WitError::Malformed(_))),
            (with("c.sub", json!("spiffe://other.org/api")), |e| matches!(e, WitError::Subject(_))),
            (with("c.sub", json!("https://example.org/api")), |e| matches!(e, WitError::Subject(_))),
            (with("c.nbf", json!(1_800_000_100)), |e| matches!(e, WitError::NotYetValid { .. })),
            (with("c.jti", json!("")), |e| matches!(e, WitError::Malformed(_))),
            (with("c.exp", json!("soon")), |e| matches!(e, WitError::Malformed(_))),
            (
                with(
                    "c.cnf",
                    json!({ "jwk": { "kty": "EC", "crv": "P-256", "x": key.x, "y": key.y, "alg": "RS256" } }),
                ),
                |e| matches!(e, WitError::Confirmation(_)),
            ),
            (
                with(
                    "c.cnf",
                    json!({ "jwk": { "kty": "EC", "crv": "P-256", "x": "AAAA", "y": key.y, "alg": "ES256" } }),
                ),
                |e| matches!(e, WitError::Confirmation(_)),
            ),
            (with("c.cnf", json!({ "jkt": key.thumbprint })), |e| matches!(e, WitError::Confirmation(_))),
        ];
        for (token, expected) in cases {
            let err = m.validate_wit(&token, now()).unwrap_err();
            assert!(expected(&err), "{err:?}");
        }
        // A WIT signed by another WIT key (same kid claimed) and a tampered claim.
        let other = minter();
        let mut h = header.clone();
        h["kid"] = json!(m.kid());
        assert_eq!(m.validate_wit(&forged(&other, h, claims.clone()), now()).unwrap_err(), WitError::Signature);
        let parts: Vec<&str> = t.split('.').collect();
        let mut c = claims.clone();
        c["sub"] = json!("spiffe://example.org/admin");
        let tampered = format!("{}.{}.{}", parts[0], jws::b64url(c.to_string().as_bytes()), parts[2]);
        assert_eq!(m.validate_wit(&tampered, now()).unwrap_err(), WitError::Signature);
        assert!(matches!(m.validate_wit("garbage", now()), Err(WitError::Malformed(_))));
        assert!(matches!(m.validate_wit(&"a.".repeat(MAX_WIT_BYTES), now()), Err(WitError::Malformed(_))));
    }
}
