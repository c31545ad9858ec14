//! What relying parties trust, published: CA certificates, the JWKS, the WIT keys, and a CRL per CA
//! listing revoked SVIDs — re-signed on every revocation that changes it, on every key
//! change, and at least hourly. Every bundle stream (Workload API, HTTPS) follows the
//! watch channel.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime};

use tokio::sync::watch;

use super::Revocations;
use crate::clock::Clock;
use crate::mint::rotation::Republish;
use crate::mint::{JwtMinter, Minter, TrustBundle, WitMinter};

/// A CRL older than this is re-signed even without a change (its validity is a day).
const CRL_REFRESH: Duration = Duration::from_secs(3600);

pub struct BundlePublisher {
    x509: Arc<dyn Minter>,
    jwt: Arc<dyn JwtMinter>,
    wit: Arc<dyn WitMinter>,
    revocations: Arc<Revocations>,
    clock: Arc<dyn Clock>,
    bundles: watch::Sender<Arc<TrustBundle>>,
    crl_made: Mutex<SystemTime>,
    /// The revoked serials on the published CRL: a revocation that changes none of them
    /// (a JWT, a lock) does not re-sign it.
    crl_entries: Mutex<Vec<(String, i64)>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Why: plain values replaced whole; a poisoned lock is still consistent.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl BundlePublisher {
    /// Publishes the first bundle at once.
    pub fn new(
        x509: Arc<dyn Minter>,
        jwt: Arc<dyn JwtMinter>,
        wit: Arc<dyn WitMinter>,
        revocations: Arc<Revocations>,
        clock: Arc<dyn Clock>,
    ) -> Self {
        let now = clock.now();
        let empty = TrustBundle { x509: vec![], jwks: jwt.jwks(), wit_jwks: wit.wit_jwks(), crls: vec![] };
        let me = Self {
            x509,
            jwt,
            wit,
            revocations,
            clock,
            bundles: watch::Sender::new(Arc::new(empty)),
            crl_made: Mutex::new(now),
            crl_entries: Mutex::new(Vec::new()),
        };
        me.publish();
        me
    }

    pub fn subscribe(&self) -> watch::Receiver<Arc<TrustBundle>> {
        self.bundles.subscribe()
    }

    /// Re-publishes on every revocation that changes the CRL, until the daemon stops.
    pub async fn follow_revocations(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        let mut changes = self.revocations.changes();
        loop {
            tokio::select! {
                r = changes.changed() => {
                    if r.is_err() {
                        return;
                    }
                    self.publish_if_crl_changed();
                }
                () = async { let _ = stop.wait_for(|s| *s).await; } => return,
            }
        }
    }

    /// Publishes only when the CRL's entries changed.
    pub fn publish_if_crl_changed(&self) {
        let entries = self.revocations.revoked_x509(self.clock.now());
        if *lock(&self.crl_entries) != entries {
            self.publish();
        }
    }

    pub fn crl_is_stale(&self) -> bool {
        self.clock.now().duration_since(*lock(&self.crl_made)).unwrap_or_default() >= CRL_REFRESH
    }

    pub fn publish(&self) {
        let now = self.clock.now();
        let entries = self.revocations.revoked_x509(now);
        // Why the number: CRL numbers must increase; milliseconds since the epoch do.
        let number = u64::try_from(now.duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_millis())
            .unwrap_or(u64::MAX);
        let crls = match self.x509.crls(&entries, now, number) {
            Ok(crls) => crls,
            Err(e) => {
                // Keep the last CRLs rather than publish none: an empty CRL would un-revoke.
                tracing::error!(error = %e, "CRL signing failed; the previous CRL stays published");
                self.bundles.borrow().crls.clone()
            }
        };
        *lock(&self.crl_made) = now;
        *lock(&self.crl_entries) = entries;
        self.bundles.send_replace(Arc::new(TrustBundle {
            x509: self.x509.x509_bundle(),
            jwks: self.jwt.jwks(),
            wit_jwks: self.wit.wit_jwks(),
            crls,
        }));
    }
}

impl Republish for BundlePublisher {
    fn publish(&self) {
        BundlePublisher::publish(self);
    }

    fn crl_is_stale(&self) -> bool {
        BundlePublisher::crl_is_stale(self)
    }
}
