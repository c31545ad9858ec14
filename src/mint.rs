//! The `Minter` seam: turns a policy `Grant` into a credential. A minter makes exactly what
//! the grant allows (identity, lifetime) and never reads names or extensions from the raw
//! request; it takes the grant by value, so one grant mints once. It does not record
//! anything (the `issue` module does) and decides nothing. `rotation` keeps the signing
//! keys current from their files.

pub mod aws;
pub mod jws;
pub mod jwt;
pub mod profile;
pub mod rotation;
pub mod wit;
pub mod x509;

use std::fmt;
use std::time::SystemTime;

use crate::identity::WorkloadId;
use crate::keys::{SecretDer, SecretString};
use crate::policy::{Grant, JwtGrant};

pub use wit::{ValidatedWit, WitError, WitMinter, WitSvid};

#[derive(Debug, thiserror::Error)]
pub enum MintError {
    #[error("the CSR is not valid PEM or DER: {0}")]
    CsrEncoding(String),
    #[error("the CSR signature does not verify")]
    CsrSignature,
    #[error("the CSR's public key algorithm is not supported (use ECDSA P-256/P-384, Ed25519 or RSA)")]
    CsrKeyAlgorithm,
    #[error("the CA expired at {0}; no certificate can be issued")]
    CaExpired(String),
    #[error("signing failed: {0}")]
    Signing(String),
    #[error("key generation failed: {0}")]
    KeyGeneration(String),
    /// The pre-certificate broke mayfly's profile: a bug; the CA signed nothing.
    #[error("the certificate for `{identity}` breaks mayfly's certificate profile, so the CA signed nothing: {why}")]
    Profile { identity: String, why: String },
    /// The certificate would live shorter than `issuance.min_ttl`.
    #[error("no certificate for `{identity}` was issued: {why}")]
    TooShort { identity: String, why: String },
}

/// Why a JWT-SVID did not validate. Says what is wrong, never echoes the token.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum JwtError {
    #[error("the token is malformed: {0}")]
    Malformed(String),
    #[error("the token's algorithm `{0}` is not ES256")]
    Algorithm(String),
    #[error("the token was not signed by a key of this trust domain (unknown kid)")]
    UnknownKey,
    #[error("the token's signature does not verify")]
    Signature,
    #[error("the token expired at {exp}")]
    Expired { exp: i64 },
    #[error("the token is not valid before {nbf}")]
    NotYetValid { nbf: i64 },
    #[error("the token is not for audience `{0}`")]
    Audience(String),
    #[error("the token's subject is not a SPIFFE ID of this trust domain: {0}")]
    Subject(String),
}

/// A CSR whose self-signature verified. Only its public key is kept: nothing else the
/// requester wrote can reach a certificate.
#[derive(Clone, PartialEq, Eq)]
pub struct VerifiedCsr {
    public_key: rcgen::SubjectPublicKeyInfo,
}

impl fmt::Debug for VerifiedCsr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("VerifiedCsr")
    }
}

impl VerifiedCsr {
    /// A key pair made here for the caller (the Workload API hands it out with the SVID):
    /// its public half stands in for a CSR, and the PKCS#8 private half is returned in a
    /// buffer zeroized on drop. The key pair itself is zeroized before this returns.
    pub fn server_made() -> Result<(Self, SecretDer), MintError> {
        use zeroize::Zeroize;
        let mut pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .map_err(|e| MintError::KeyGeneration(e.to_string()))?;
        let public_key = rcgen::SubjectPublicKeyInfo::from_der(&rcgen::PublicKeyData::subject_public_key_info(&pair))
            .map_err(|e| MintError::KeyGeneration(e.to_string()));
        let private = SecretDer::new(zeroize::Zeroizing::new(pair.serialize_der()));
        pair.zeroize();
        Ok((Self { public_key: public_key? }, private))
    }
}

/// A freshly minted X.509 SVID. Holds no private key: the workload made its own.
#[derive(Clone, Debug)]
pub struct X509Svid {
    pub cert_der: Vec<u8>,
    /// Lower-case hex serial.
    pub serial: String,
    /// SHA-256 of the certificate DER, lower-case hex.
    pub fingerprint: String,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

/// A freshly minted JWT-SVID. The token is a bearer secret: only its jti and SHA-256 are
/// ever recorded.
#[derive(Debug)]
pub struct JwtSvid {
    pub token: SecretString,
    pub jti: String,
    /// SHA-256 of the compact token, lower-case hex.
    pub fingerprint: String,
    pub audiences: Vec<String>,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

/// A JWT-SVID that verified: signed by this trust domain's key, unexpired, for the audience.
#[derive(Debug)]
pub struct ValidatedJwt {
    pub identity: WorkloadId,
    pub jti: String,
    pub exp: i64,
    pub claims: serde_json::Map<String, serde_json::Value>,
}

/// What relying parties trust right now: the trust domain's X.509 CA certificates (DER),
/// its JWKS for JWT-SVIDs and, apart, the JWKS of its WIT-SVID keys. Published through a
/// watch channel so every open bundle stream sees each change.
#[derive(Clone, Debug, PartialEq)]
pub struct TrustBundle {
    pub x509: Vec<Vec<u8>>,
    pub jwks: serde_json::Value,
    /// The WIT-SVID keys (`use: wit-svid`): never in `jwks`, so no JWT-SVID or OIDC
    /// verifier can take a WIT for one of its tokens.
    pub wit_jwks: serde_json::Value,
    /// DER CRLs, one per CA in `x509`, listing revoked SVID serials.
    pub crls: Vec<Vec<u8>>,
}

/// Signs JWT-SVIDs and verifies its own; publishes the public keys as a JWKS.
pub trait JwtMinter: Send + Sync + 'static {
    fn mint_jwt(&self, grant: JwtGrant, jti: &str, now: SystemTime) -> Result<JwtSvid, MintError>;

    /// A short token that asserts `identity` to one upstream service (AWS STS's
    /// AssumeRoleWithWebIdentity), with that service's own claims added. Only the AWS
    /// minter calls it, for a grant policy made; it is never handed to the caller.
    fn mint_assertion(
        &self,
        identity: &WorkloadId,
        audience: &str,
        extra: serde_json::Map<String, serde_json::Value>,
        jti: &str,
        ttl: std::time::Duration,
        now: SystemTime,
    ) -> Result<JwtSvid, MintError>;

    /// The JWKS (RFC 7517) of every key whose tokens may still be live.
    fn jwks(&self) -> serde_json::Value;

    /// `audience: None` (introspection) checks everything but the audience.
    fn validate_jwt(&self, token: &str, audience: Option<&str>, now: SystemTime) -> Result<ValidatedJwt, JwtError>;
}

/// Signs X.509 SVIDs (consuming the grant that allowed each) and the CRLs of its CAs.
pub trait Minter: Send + Sync + 'static {
    fn mint_x509(&self, csr: &VerifiedCsr, grant: Grant, now: SystemTime) -> Result<X509Svid, MintError>;

    /// DER certificates a relying party trusts for X.509 SVIDs of this trust domain.
    fn x509_bundle(&self) -> Vec<Vec<u8>>;

    /// One DER CRL per CA in the bundle, listing `entries` (hex serial, revocation time).
    fn crls(&self, entries: &[(String, i64)], now: SystemTime, number: u64) -> Result<Vec<Vec<u8>>, MintError>;
}
