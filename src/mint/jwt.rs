//! JWT-SVIDs signed ES256 (jsonwebtoken on aws-lc-rs): minting exactly what a `JwtGrant`
//! allows, the JWKS relying parties verify with, and verification of mayfly's own tokens.
//! Expiry is checked against the time passed in, never the library's own clock read. One
//! minter serves every path that hands out JWTs. Records nothing, decides nothing.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::Serialize;
use serde_json::{Map, Value, json};

use super::{JwtError, JwtMinter, JwtSvid, MintError, ValidatedJwt};
use crate::clock::unix_secs;
use crate::identity::{TrustDomain, WorkloadId};
use crate::keys::{JwtKey, SecretString};
use crate::policy::JwtGrant;

/// Tokens longer than this are refused before any parsing (ours are ~600 bytes).
pub const MAX_TOKEN_BYTES: usize = 8 * 1024;
/// How far in the future a token's nbf/iat may be and still validate.
const START_SKEW_SECS: i64 = 30;

pub struct Es256Minter {
    keys: ArcSwap<KeySet>,
    trust_domain: TrustDomain,
    /// `iss` of every token, when mayfly publishes OIDC discovery (the TLS listener's URL).
    issuer: Option<String>,
}

#[derive(Serialize)]
struct Claims<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    iss: Option<&'a str>,
    sub: &'a str,
    aud: &'a [String],
    exp: i64,
    iat: i64,
    nbf: i64,
    jti: &'a str,
    #[serde(flatten)]
    extra: Map<String, Value>,
}

/// A signing key with its jsonwebtoken forms.
struct SigningKey {
    key: JwtKey,
    encoding: EncodingKey,
    decoding: DecodingKey,
}

impl SigningKey {
    fn new(key: JwtKey) -> Result<Self, MintError> {
        let (x, y) = key.public_xy();
        let decoding = DecodingKey::from_ec_components(&x, &y).map_err(|e| MintError::Signing(e.to_string()))?;
        let encoding = EncodingKey::from_ec_der(key.pkcs8_der());
        Ok(Self { key, encoding, decoding })
    }
}

/// The key that signs, and retired keys still published (and accepted) until every token
/// they signed has expired.
struct KeySet {
    active: Arc<SigningKey>,
    retired: Vec<(Arc<SigningKey>, SystemTime)>,
}

impl KeySet {
    fn find(&self, kid: &str, now: SystemTime) -> Option<&SigningKey> {
        std::iter::once(&self.active)
            .chain(self.retired.iter().filter(|(_, until)| *until > now).map(|(k, _)| k))
            .find(|k| k.key.kid() == kid)
            .map(|k| k.as_ref())
    }
}

impl Es256Minter {
    pub fn new(key: JwtKey, trust_domain: TrustDomain) -> Result<Self, MintError> {
        let active = Arc::new(SigningKey::new(key)?);
        Ok(Self { keys: ArcSwap::from_pointee(KeySet { active, retired: vec![] }), trust_domain, issuer: None })
    }

    pub fn active_kid(&self) -> String {
        self.keys.load().active.key.kid().to_owned()
    }

    /// Retired keys still in the JWKS, each with when it leaves.
    pub fn retired_keys(&self) -> Vec<(String, SystemTime)> {
        self.keys.load().retired.iter().map(|(k, until)| (k.key.kid().to_owned(), *until)).collect()
    }

    /// Makes `next` the signing key. The replaced key stays in the JWKS, and its tokens
    /// keep validating, for `longest_ttl` (no token it signed lives longer).
    pub fn rotate(&self, next: JwtKey, now: SystemTime, longest_ttl: Duration) -> Result<(), MintError> {
        let next = Arc::new(SigningKey::new(next)?);
        self.keys.rcu(|set| {
            let mut retired: Vec<_> = set.retired.iter().filter(|(_, until)| *until > now).cloned().collect();
            retired.insert(0, (set.active.clone(), now + longest_ttl));
            KeySet { active: next.clone(), retired }
        });
        Ok(())
    }

    /// Drops retired keys whose tokens have all expired. True when the JWKS changed.
    pub fn prune(&self, now: SystemTime) -> bool {
        let before = self.keys.load().retired.len();
        self.keys.rcu(|set| KeySet {
            active: set.active.clone(),
            retired: set.retired.iter().filter(|(_, until)| *until > now).cloned().collect(),
        });
        self.keys.load().retired.len() != before
    }

    /// Stamps `iss` on every token (the URL relying parties find discovery under).
    pub fn with_issuer(mut self, issuer: Option<String>) -> Self {
        self.issuer = issuer;
        self
    }
}

impl Es256Minter {
    /// Signs `sub`/`aud`/times/`jti` (plus `extra`, which cannot override them).
    fn sign(
        &self,
        sub: &str,
        audiences: &[String],
        extra: Map<String, Value>,
        jti: &str,
        ttl: Duration,
        now: SystemTime,
    ) -> Result<JwtSvid, MintError> {
        let iat = unix_secs(now);
        let ttl = i64::try_from(ttl.as_secs()).map_err(|e| MintError::Signing(e.to_string()))?;
        let exp = iat + ttl;
        let keys = self.keys.load();
        let signer = &keys.active;
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some(signer.key.kid().to_owned());
        header.typ = Some("JWT".into());
        let claims = Claims { iss: self.issuer.as_deref(), sub, aud: audiences, exp, iat, nbf: iat, jti, extra };
        let token =
            jsonwebtoken::encode(&header, &claims, &signer.encoding).map_err(|e| MintError::Signing(e.to_string()))?;
        let fingerprint = hex::encode(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, token.as_bytes()));
        let at = |secs: i64| SystemTime::UNIX_EPOCH + Duration::from_secs(secs.max(0).unsigned_abs());
        Ok(JwtSvid {
            token: SecretString::new(token),
            jti: jti.to_owned(),
            fingerprint,
            audiences: audiences.to_vec(),
            not_before: at(iat),
            not_after: at(exp),
        })
    }
}

impl JwtMinter for Es256Minter {
    fn mint_jwt(&self, grant: JwtGrant, jti: &str, now: SystemTime) -> Result<JwtSvid, MintError> {
        self.sign(grant.identity().as_str(), grant.audiences(), Map::new(), jti, grant.ttl().as_duration(), now)
    }

    fn mint_assertion(
        &self,
        identity: &WorkloadId,
        audience: &str,
        extra: Map<String, Value>,
        jti: &str,
        ttl: Duration,
        now: SystemTime,
    ) -> Result<JwtSvid, MintError> {
        let reserved = ["iss", "sub", "aud", "exp", "iat", "nbf", "jti"];
        let extra = extra.into_iter().filter(|(k, _)| !reserved.contains(&k.as_str())).collect();
        self.sign(identity.as_str(), &[audience.to_owned()], extra, jti, ttl, now)
    }

    fn jwks(&self) -> Value {
        let keys = self.keys.load();
        let all = std::iter::once(&keys.active).chain(keys.retired.iter().map(|(k, _)| k));
        // `use: jwt-svid` marks a JWT authority in a SPIFFE bundle (SPIFFE Trust Domain and Bundle spec).
        let jwks: Vec<Value> = all
            .map(|k| {
                let (x, y) = k.key.public_xy();
                json!({ "kty": "EC", "crv": "P-256", "x": x, "y": y, "kid": k.key.kid(), "use": "jwt-svid", "alg": "ES256" })
            })
            .collect();
        json!({ "keys": jwks })
    }

    fn validate_jwt(&self, token: &str, audience: Option<&str>, now: SystemTime) -> Result<ValidatedJwt, JwtError> {
        if token.len() > MAX_TOKEN_BYTES {
            return Err(JwtError::Malformed(format!("longer than {MAX_TOKEN_BYTES} bytes")));
        }
        let header = jsonwebtoken::decode_header(token).map_err(|e| JwtError::Malformed(e.to_string()))?;
        if header.alg != Algorithm::ES256 {
            return Err(JwtError::Algorithm(format!("{:?}", header.alg)));
        }
        let keys = self.keys.load();
        let signer = header.kid.as_deref().and_then(|kid| keys.find(kid, now)).ok_or(JwtError::UnknownKey)?;
        let mut validation = Validation::new(Algorithm::ES256);
        // Why: time comes from the injected clock (below), not the library's own clock read.
        validation.validate_exp = false;
        validation.validate_nbf = false;
        validation.leeway = 0;
        validation.required_spec_claims = HashSet::from(["sub".to_owned(), "aud".to_owned(), "exp".to_owned()]);
        match audience {
            Some(aud) => validation.set_audience(&[aud]),
            None => validation.validate_aud = false,
        }
        let data =
            jsonwebtoken::decode::<Map<String, Value>>(token, &signer.decoding, &validation).map_err(|e| {
                match e.kind() {
                    jsonwebtoken::errors::ErrorKind::InvalidAudience => {
                        JwtError::Audience(audience.unwrap_or_default().to_owned())
                    }
                    jsonwebtoken::errors::ErrorKind::InvalidSignature => JwtError::Signature,
                    _ => JwtError::Malformed(e.to_string()),
                }
            })?;
        let claims = data.claims;
        let exp = claims
            .get("exp")
            .and_then(Value::as_i64)
            .ok_or_else(|| JwtError::Malformed("`exp` is not a number".into()))?;
        let now_secs = unix_secs(now);
        if exp <= now_secs {
            return Err(JwtError::Expired { exp });
        }
        // Why a small skew on the start only: a token is never accepted after its exp, but
        // another host of the same trust domain may stamp iat a few seconds ahead of ours.
        let start = claims.get("nbf").and_then(Value::as_i64).or_else(|| claims.get("iat").and_then(Value::as_i64));
        if let Some(nbf) = start.filter(|nbf| *nbf > now_secs + START_SKEW_SECS) {
            return Err(JwtError::NotYetValid { nbf });
        }
        let sub = claims
            .get("sub")
            .and_then(Value::as_str)
            .ok_or_else(|| JwtError::Malformed("`sub` is not a string".into()))?;
        let identity = WorkloadId::parse(sub).map_err(|e| JwtError::Subject(e.to_string()))?;
        if !identity.is_member_of(&self.trust_domain) {
            return Err(JwtError::Subject(format!("`{sub}` is not in the trust domain `{}`", self.trust_domain)));
        }
        let jti = claims.get("jti").and_then(Value::as_str).unwrap_or_default().to_owned();
        Ok(ValidatedJwt { identity, jti, exp, claims })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::Ttl;
    use crate::policy::Grant;

    fn minter() -> Es256Minter {
        Es256Minter::new(JwtKey::generate().unwrap(), TrustDomain::parse("example.org").unwrap()).unwrap()
    }

    fn grant(auds: &[&str], ttl: &str) -> JwtGrant {
        let id = WorkloadId::parse("spiffe://example.org/api").unwrap();
        let grants: Vec<Grant> =
            auds.iter().map(|a| Grant::jwt_for_tests(id.clone(), a, Ttl::parse(ttl).unwrap())).collect();
        JwtGrant::join(grants).unwrap()
    }

    fn b64json(part: &str) -> Value {
        use base64::Engine;
        serde_json::from_slice(&base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(part).unwrap()).unwrap()
    }

    #[test]
    fn a_minted_token_is_an_es256_jwt_svid_with_our_kid_and_the_granted_lifetime() {
        let m = minter();
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let svid = m.mint_jwt(grant(&["db", "cache"], "5m"), "cred-1", now).unwrap();
        let parts: Vec<&str> = svid.token.expose().split('.').collect();
        let header = b64json(parts[0]);
        assert_eq!(header["alg"], "ES256");
        assert_eq!(header["kid"], m.jwks()["keys"][0]["kid"]);
        let claims = b64json(parts[1]);
        assert_eq!(claims["sub"], "spiffe://example.org/api");
        assert_eq!(claims["aud"], json!(["db", "cache"]));
        assert_eq!(claims["exp"].as_i64().unwrap() - claims["iat"].as_i64().unwrap(), 300);
        assert_eq!(claims["jti"], "cred-1");
        let ok = m.validate_jwt(svid.token.expose(), Some("cache"), now + Duration::from_secs(299)).unwrap();
        assert_eq!(ok.identity.as_str(), "spiffe://example.org/api");
        assert_eq!(ok.jti, "cred-1");
    }

    #[test]
    fn validation_refuses_expiry_audience_tampering_and_foreign_keys() {
        let m = minter();
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let token = m.mint_jwt(grant(&["db"], "5m"), "cred-2", now).unwrap().token;
        let t = token.expose();
        assert!(matches!(m.validate_jwt(t, Some("db"), now + Duration::from_secs(300)), Err(JwtError::Expired { .. })));
        assert!(matches!(m.validate_jwt(t, Some("other"), now), Err(JwtError::Audience(_))));
        assert!(matches!(
            m.validate_jwt(t, Some("db"), now - Duration::from_secs(60)),
            Err(JwtError::NotYetValid { .. })
        ));
        // A claim edited after signing (another subject) breaks the signature.
        let parts: Vec<&str> = t.split('.').collect();
        let mut claims = b64json(parts[1]);
        claims["sub"] = json!("spiffe://example.org/admin");
        use base64::Engine;
        let forged = format!(
            "{}.{}.{}",
            parts[0],
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(claims.to_string()),
            parts[2]
        );
        assert!(matches!(m.validate_jwt(&forged, Some("db"), now), Err(JwtError::Signature)));
        // Signed by another key with the same kid claimed: unknown kid is refused, and a
        // token carrying our kid but another key's signature fails the signature check.
        let other = minter();
        let foreign = other.mint_jwt(grant(&["db"], "5m"), "x", now).unwrap().token;
        assert!(matches!(m.validate_jwt(foreign.expose(), Some("db"), now), Err(JwtError::UnknownKey)));
        let fp: Vec<&str> = foreign.expose().split('.').collect();
        let spliced = format!("{}.{}.{}", parts[0], fp[1], fp[2]);
        assert!(matches!(m.validate_jwt(&spliced, Some("db"), now), Err(JwtError::Signature)));
        // alg none and garbage.
        let none =
            format!("{}.{}.", base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(r#"{"alg":"none"}"#), parts[1]);
        assert!(m.validate_jwt(&none, Some("db"), now).is_err());
        assert!(matches!(m.validate_jwt("garbage", Some("db"), now), Err(JwtError::Malformed(_))));
        assert!(matches!(
            m.validate_jwt(&"a".repeat(MAX_TOKEN_BYTES + 1), Some("db"), now),
            Err(JwtError::Malformed(_))
        ));
    }

    #[test]
    fn a_rotated_key_signs_at_once_and_the_old_one_verifies_until_its_tokens_expire() {
        let m = minter();
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let old = m.mint_jwt(grant(&["db"], "5m"), "a", now).unwrap().token;
        let old_kid = m.active_kid();
        m.rotate(JwtKey::generate().unwrap(), now, Duration::from_secs(3600)).unwrap();
        assert_ne!(m.active_kid(), old_kid);
        let kids: Vec<String> =
            m.jwks()["keys"].as_array().unwrap().iter().map(|k| k["kid"].as_str().unwrap().to_owned()).collect();
        assert_eq!(kids, vec![m.active_kid(), old_kid.clone()], "both published");
        let new = m.mint_jwt(grant(&["db"], "5m"), "b", now).unwrap().token;
        assert!(m.validate_jwt(old.expose(), Some("db"), now).is_ok(), "tokens of the old key still validate");
        assert!(m.validate_jwt(new.expose(), Some("db"), now).is_ok());
        assert!(!m.prune(now + Duration::from_secs(3599)));
        assert!(m.prune(now + Duration::from_secs(3600)));
        assert_eq!(m.jwks()["keys"].as_array().unwrap().len(), 1);
    }
}
