//! Signing-key rotation from files. With CA files configured, a new valid pair on disk
//! becomes the X.509 signer (recorded first, `ca_rotated`); with a JWT key file, a new key
//! becomes the JWT signer (`jwt_key_rotated`). A file that is not usable is refused once
//! (`ca_rejected`, `jwt_key_rejected`) and the current signer keeps signing. Retired CAs
//! and keys stay in the bundles until what they signed has expired; every change is
//! published to every bundle stream (and SVID streams renew).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::jwt::Es256Minter;
use super::x509::X509Minter;
use crate::clock::{Clock, Ticker};
use crate::keys::{CertificateAuthority, JwtKey};
use crate::ledger::Ledger;
use crate::ledger::event::{CaRejected, CaRotated, Event, JwtKeyRejected, JwtKeyRotated};

/// Where a change of signer is announced: whoever publishes the trust bundles (CA
/// certificates, JWKS, CRLs) to relying parties.
pub trait Republish: Send + Sync + 'static {
    fn publish(&self);
    /// The published CRL is old enough to be re-signed without a change.
    fn crl_is_stale(&self) -> bool;
}

/// Keeps the signing keys current. With CA files configured, a new valid pair on disk
/// becomes the X.509 signer (recorded first, `ca_rotated`); with a JWT key file, a new key
/// becomes the JWT signer (`jwt_key_rotated`). Retired CAs and keys stay in the bundles
/// until what they signed has expired; every change reaches every bundle stream (and SVID
/// streams renew).
pub struct KeyWatch {
    /// The CA certificate and key files, when configured (not generated).
    pub files: Option<(PathBuf, PathBuf)>,
    pub minter: Arc<X509Minter>,
    pub jwt_file: Option<PathBuf>,
    pub jwt: Arc<Es256Minter>,
    /// Told after every change of a signer or a bundle, and asked whether the CRL is stale.
    pub publisher: Arc<dyn Republish>,
    pub ledger: Arc<dyn Ledger>,
    pub clock: Arc<dyn Clock>,
    /// The longest SVID lifetime: how long a retired CA or key stays in the bundles.
    pub longest_ttl: std::time::Duration,
    /// The JWT key file content last refused, so a bad file is reported once.
    jwt_refused: Option<Vec<u8>>,
    /// The certificate file content last refused, so a bad file is reported once.
    refused: Option<Vec<u8>>,
    /// Kids of other signers (the WIT key): a JWT key file holding one of them is refused.
    reserved_kids: Vec<String>,
}

impl KeyWatch {
    #[expect(clippy::too_many_arguments, reason = "each is a part the watch reads or updates")]
    pub fn new(
        files: Option<(PathBuf, PathBuf)>,
        minter: Arc<X509Minter>,
        jwt_file: Option<PathBuf>,
        jwt: Arc<Es256Minter>,
        publisher: Arc<dyn Republish>,
        ledger: Arc<dyn Ledger>,
        clock: Arc<dyn Clock>,
        longest_ttl: std::time::Duration,
    ) -> Self {
        Self {
            files,
            minter,
            jwt_file,
            jwt,
            publisher,
            ledger,
            clock,
            longest_ttl,
            jwt_refused: None,
            refused: None,
            reserved_kids: Vec::new(),
        }
    }

    /// Kids no JWT key may have (another signer's): such a key file is refused.
    pub fn with_reserved_kids(mut self, kids: Vec<String>) -> Self {
        self.reserved_kids = kids;
        self
    }

    /// Checks the files every `every` until the daemon stops; a reload checks at once
    /// through the same lock (`check`).
    pub async fn run(
        watch: Arc<tokio::sync::Mutex<Self>>,
        every: std::time::Duration,
        stop: tokio::sync::watch::Receiver<bool>,
    ) {
        let mut ticker = Ticker::delayed(every, stop).await;
        while ticker.next().await {
            watch.lock().await.check().await;
        }
    }

    /// Prunes expired retired signers and reads the key files once; publishes any change.
    pub async fn check(&mut self) -> Checked {
        let now = self.clock.now();
        let mut changed = self.minter.prune(now);
        changed |= self.jwt.prune(now);
        let mut checked = Checked::default();
        if let Some((cert, key)) = self.files.clone() {
            checked.ca = self.reload(&cert, &key, now).await;
        }
        if let Some(path) = self.jwt_file.clone() {
            checked.jwt = self.reload_jwt(&path, now).await;
        }
        changed |= checked.ca.rotated() || checked.jwt.rotated();
        if changed || self.publisher.crl_is_stale() {
            self.publisher.publish();
        }
        checked
    }

    async fn reload_jwt(&mut self, path: &Path, now: std::time::SystemTime) -> KeyFile {
        let bytes = match std::fs::read(path) {
            Ok(b) => b,
            Err(e) => return KeyFile::Refused(format!("`{}`: {e}", path.display())),
        };
        if self.jwt_refused.as_ref() == Some(&bytes) {
            return KeyFile::Refused("the file was refused before and has not changed".into());
        }
        let from = self.jwt.active_kid();
        let loaded = JwtKey::load(path).and_then(|k| {
            if self.reserved_kids.iter().any(|r| r == k.kid()) {
                return Err(crate::keys::KeyError::Parse {
                    path: path.into(),
                    what: "JWT signing key",
                    why: "it is the WIT-SVID key; JWT-SVIDs need a key of their own".into(),
                });
            }
            Ok(k)
        });
        let next = match loaded {
            Ok(k) if k.kid() == from => return KeyFile::Unchanged,
            Ok(k) => k,
            Err(e) => {
                tracing::warn!(error = %e, "new JWT key file refused; the current key keeps signing");
                let event = Event::JwtKeyRejected(JwtKeyRejected { reason: e.to_string(), kid: from });
                if self.ledger.record(now, event).await.is_ok() {
                    self.jwt_refused = Some(bytes);
                }
                return KeyFile::Refused(e.to_string());
            }
        };
        let to = next.kid().to_owned();
        let event = Event::JwtKeyRotated(JwtKeyRotated { from_kid: from.clone(), to_kid: to.clone() });
        if let Err(e) = self.ledger.record(now, event).await {
            tracing::error!(error = %e, "JWT key rotation not recorded; not rotating yet");
            return KeyFile::Refused(format!("not recorded, so not rotated: {e}"));
        }
        if let Err(e) = self.jwt.rotate(next, now, self.longest_ttl) {
            tracing::error!(error = %e, "JWT key rotation failed; the current key keeps signing");
            return KeyFile::Refused(e.to_string());
        }
        self.jwt_refused = None;
        tracing::info!(from_kid = from, to_kid = to, "JWT signing key rotated");
        KeyFile::Rotated { from, to }
    }

    async fn reload(&mut self, cert: &Path, key: &Path, now: std::time::SystemTime) -> KeyFile {
        let bytes = match std::fs::read(cert) {
            Ok(b) => b,
            Err(e) => return KeyFile::Refused(format!("`{}`: {e}", cert.display())),
        };
        let same = pem::parse(&bytes).is_ok_and(|p| p.contents() == self.minter.active_ca_der().as_slice());
        if same {
            return KeyFile::Unchanged;
        }
        if self.refused.as_ref() == Some(&bytes) {
            return KeyFile::Refused("the file was refused before and has not changed".into());
        }
        let sha = |der: &[u8]| hex::encode(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, der));
        let from = sha(&self.minter.active_ca_der());
        let next = match CertificateAuthority::load(cert, key, now) {
            Ok(ca) => ca,
            Err(e) => {
                tracing::warn!(error = %e, "new CA files refused; the current CA keeps signing");
                let event = Event::CaRejected(CaRejected { reason: e.to_string(), ca_sha256: from });
                if self.ledger.record(now, event).await.is_ok() {
                    self.refused = Some(bytes);
                }
                return KeyFile::Refused(e.to_string());
            }
        };
        let to = sha(next.cert_der());
        // Why record first: a signer change nobody can trace is worse than a late one; on a
        // ledger error the next tick tries again.
        let event = Event::CaRotated(CaRotated { from_sha256: from.clone(), to_sha256: to.clone() });
        if let Err(e) = self.ledger.record(now, event).await {
            tracing::error!(error = %e, "CA rotation not recorded; not rotating yet");
            return KeyFile::Refused(format!("not recorded, so not rotated: {e}"));
        }
        self.minter.rotate(Arc::new(next), now, self.longest_ttl);
        self.refused = None;
        tracing::info!(from_sha256 = from, to_sha256 = to, "x509 CA rotated");
        KeyFile::Rotated { from, to }
    }
}

/// What one check of the key files found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Checked {
    pub ca: KeyFile,
    pub jwt: KeyFile,
}

/// One key file's state after a check.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum KeyFile {
    /// Generated and kept in the data dir: nothing to read.
    #[default]
    NotConfigured,
    Unchanged,
    Rotated {
        from: String,
        to: String,
    },
    /// Not usable (or not recordable): the current signer keeps signing.
    Refused(String),
}

impl KeyFile {
    pub fn rotated(&self) -> bool {
        matches!(self, KeyFile::Rotated { .. })
    }
}
