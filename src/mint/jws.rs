//! Compact JWS (RFC 7515) with ES256 only, as WIT-SVIDs and Workload Proof Tokens use it:
//! signing a header and claims with a P-256 key, and splitting a presented token into its
//! decoded parts before anything trusts it. Strict on input from strangers: a size bound
//! before any decoding, exactly three parts, unpadded base64url, JSON objects for header
//! and claims, a 64-byte signature. Knows nothing of what the claims mean.

use base64::Engine;
use serde_json::{Map, Value};

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::URL_SAFE_NO_PAD;

/// Why a compact JWS could not be read. Names the part, never echoes the token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JwsError {
    #[error("longer than {0} bytes")]
    TooLong(usize),
    #[error("not a compact JWS (header.claims.signature)")]
    Shape,
    #[error("the {0} is not unpadded base64url")]
    Encoding(&'static str),
    #[error("the {0} is not a JSON object")]
    Json(&'static str),
    #[error("the signature is not a 64-byte ES256 signature")]
    SignatureLength,
}

/// A compact JWS, decoded but not yet verified.
#[derive(Debug)]
pub struct Compact<'a> {
    pub header: Map<String, Value>,
    pub claims: Map<String, Value>,
    /// `base64url(header) "." base64url(claims)`: what the signature covers.
    pub signing_input: &'a str,
    pub signature: Vec<u8>,
}

impl Compact<'_> {
    /// A header member as a string (`None` when absent or not a string).
    pub fn header_str(&self, name: &str) -> Option<&str> {
        self.header.get(name).and_then(Value::as_str)
    }

    /// Whether the ES256 signature verifies with the uncompressed P-256 point `public`.
    pub fn verifies_with(&self, public: &[u8]) -> bool {
        use aws_lc_rs::signature::{ECDSA_P256_SHA256_FIXED, UnparsedPublicKey};
        UnparsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, public)
            .verify(self.signing_input.as_bytes(), &self.signature)
            .is_ok()
    }
}

/// Splits and decodes `token`; `max` bounds its length before anything else is done.
pub fn parse(token: &str, max: usize) -> Result<Compact<'_>, JwsError> {
    if token.len() > max {
        return Err(JwsError::TooLong(max));
    }
    let mut parts = token.split('.');
    let (Some(h), Some(c), Some(s), None) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
        return Err(JwsError::Shape);
    };
    let object = |part: &str, what: &'static str| -> Result<Map<String, Value>, JwsError> {
        let bytes = B64.decode(part).map_err(|_| JwsError::Encoding(what))?;
        match serde_json::from_slice(&bytes) {
            Ok(Value::Object(map)) => Ok(map),
            _ => Err(JwsError::Json(what)),
        }
    };
    let header = object(h, "header")?;
    let claims = object(c, "claims")?;
    let signature = B64.decode(s).map_err(|_| JwsError::Encoding("signature"))?;
    if signature.len() != 64 {
        return Err(JwsError::SignatureLength);
    }
    Ok(Compact { header, claims, signing_input: &token[..h.len() + 1 + c.len()], signature })
}

/// `header.claims.signature`, the signature made by `sign` over the first two parts.
pub fn sign(
    header: &Value,
    claims: &Value,
    sign: impl FnOnce(&[u8]) -> Result<Vec<u8>, String>,
) -> Result<String, String> {
    let mut token = format!("{}.{}", B64.encode(header.to_string()), B64.encode(claims.to_string()));
    let signature = sign(token.as_bytes())?;
    token.push('.');
    token.push_str(&B64.encode(signature));
    Ok(token)
}

/// base64url (no padding) of SHA-256 over `text`: `wth`, `ath` and `tth` of a proof.
pub fn sha256_b64url(text: &str) -> String {
    B64.encode(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, text.as_bytes()))
}

/// base64url without padding.
pub fn b64url(bytes: &[u8]) -> String {
    B64.encode(bytes)
}

/// Decodes unpadded base64url.
pub fn from_b64url(text: &str) -> Option<Vec<u8>> {
    B64.decode(text).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::{ProofSigner, WorkloadKey};

    #[test]
    fn a_signed_token_parses_back_and_verifies_only_with_its_key() {
        let key = WorkloadKey::generate().unwrap();
        let signer = ProofSigner::from_private_jwk(key.private_jwk().expose()).unwrap();
        let token =
            sign(&serde_json::json!({"alg": "ES256", "typ": "x"}), &serde_json::json!({"a": 1}), |m| signer.sign(m))
                .unwrap();
        let parsed = parse(&token, 1024).unwrap();
        assert_eq!(parsed.header_str("typ"), Some("x"));
        assert_eq!(parsed.claims["a"], 1);
        let point = |x: &str, y: &str| [vec![4], from_b64url(x).unwrap(), from_b64url(y).unwrap()].concat();
        assert!(parsed.verifies_with(&point(&key.x, &key.y)));
        let other = WorkloadKey::generate().unwrap();
        assert!(!parsed.verifies_with(&point(&other.x, &other.y)));
        assert!(!parsed.verifies_with(b"garbage"), "a bad point is a failed verification, not a panic");
    }

    #[test]
    fn malformed_tokens_are_refused_by_part() {
        let h = b64url(br#"{"alg":"ES256"}"#);
        let sig = b64url(&[0u8; 64]);
        assert_eq!(parse(&"a".repeat(20), 10).unwrap_err(), JwsError::TooLong(10));
        assert_eq!(parse("a.b", 100).unwrap_err(), JwsError::Shape);
        assert_eq!(parse("a.b.c.d", 100).unwrap_err(), JwsError::Shape);
        assert_eq!(parse(&format!("{h}=.{h}.{sig}"), 1000).unwrap_err(), JwsError::Encoding("header"));
        assert_eq!(parse(&format!("{h}.{}.{sig}", b64url(b"[1]")), 1000).unwrap_err(), JwsError::Json("claims"));
        assert_eq!(parse(&format!("{h}.{h}.{}", b64url(&[0u8; 63])), 1000).unwrap_err(), JwsError::SignatureLength);
        assert_eq!(parse("..", 100).unwrap_err(), JwsError::Json("header"));
        assert!(parse(&format!("{h}.{h}.{sig}"), 1000).is_ok());
    }
}
