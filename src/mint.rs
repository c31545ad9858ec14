//! The `Minter` seam: turns a policy `Grant` into a credential. A minter makes exactly what
//! the grant allows (identity, lifetime) and never reads names or extensions from the raw
//! request. It does not record anything (the `issue` module does) and decides nothing.

pub mod x509;

use std::fmt;
use std::time::SystemTime;

use crate::policy::Grant;

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

pub trait Minter: Send + Sync + 'static {
    fn mint_x509(&self, csr: &VerifiedCsr, grant: &Grant, now: SystemTime) -> Result<X509Svid, MintError>;

    /// DER certificates a relying party trusts for X.509 SVIDs of this trust domain.
    fn x509_bundle(&self) -> Vec<Vec<u8>>;
}
