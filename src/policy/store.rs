//! The active release and the good one before it. A request takes one snapshot
//! (`current()`, a single atomic load) and decides with that engine + inventory even if a
//! new release is activated meanwhile: activation swaps a pointer and never blocks issuance.

use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;

use super::release::Release;

pub struct PolicyStore {
    current: ArcSwap<Release>,
    /// Serialises writers; also holds the previous good release.
    previous: Mutex<Option<Arc<Release>>>,
    /// Counts activations and rollbacks, so long-lived holders (Workload API streams)
    /// re-check entitlement when the release changes.
    changed: tokio::sync::watch::Sender<u64>,
}

impl std::fmt::Debug for PolicyStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PolicyStore").field("current", &self.current().version()).finish()
    }
}

impl PolicyStore {
    pub fn new(current: Arc<Release>, previous: Option<Arc<Release>>) -> Self {
        Self {
            current: ArcSwap::new(current),
            previous: Mutex::new(previous),
            changed: tokio::sync::watch::Sender::new(0),
        }
    }

    pub fn changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changed.subscribe()
    }

    pub fn current(&self) -> Arc<Release> {
        self.current.load_full()
    }

    /// The last day an identity's inventory entry is valid under the active release, if
    /// it still has one: streams end its SVIDs when that day is over.
    pub fn entry_expires(&self, id: &crate::identity::WorkloadId) -> Option<time::Date> {
        self.current().inventory.entries().iter().find(|e| &e.id == id).map(|e| e.expires)
    }

    pub fn previous(&self) -> Option<Arc<Release>> {
        self.lock().clone()
    }

    /// Makes `next` current; the release it replaces becomes the previous good one.
    pub fn activate(&self, next: Arc<Release>) -> Arc<Release> {
        let mut previous = self.lock();
        let replaced = self.current.swap(next);
        *previous = Some(replaced.clone());
        self.changed.send_modify(|n| *n += 1);
        replaced
    }

    /// Swaps current and previous (so a second rollback rolls forward again). Returns
    /// (from, to), or `None` when there is no previous release.
    pub fn rollback(&self) -> Option<(Arc<Release>, Arc<Release>)> {
        let mut previous = self.lock();
        let to = previous.take()?;
        let from = self.current.swap(to.clone());
        *previous = Some(from.clone());
        self.changed.send_modify(|n| *n += 1);
        Some((from, to))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Arc<Release>>> {
        // Why: the guarded value is a plain Option<Arc>; a panic elsewhere cannot leave it
        // half-written, so a poisoned lock is still consistent.
        self.previous.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}
