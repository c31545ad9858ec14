//! The active release and the rollback history: the good releases that were active before
//! it, most recent last, at most `HISTORY` of them. A request takes one snapshot
//! (`current()`, a single atomic load) and decides with that engine + inventory even if a
//! new release is activated meanwhile: activation swaps a pointer and never blocks issuance.
//!
//! Rollback history: an activation pushes the release it replaces; a rollback pops the most
//! recent one and makes it current, and the release rolled back from leaves the history
//! (it is never a rollback target again). So `rollback` twice goes two releases back —
//! never forward to the release just rolled back from — and fails once the history is empty.

use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;

use super::release::Release;

/// How many earlier releases the history keeps.
pub const HISTORY: usize = 4;

pub struct PolicyStore {
    current: ArcSwap<Release>,
    /// Serialises writers; also holds the rollback history, oldest first.
    history: Mutex<Vec<Arc<Release>>>,
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
    /// `history`: earlier good releases, oldest first (only the last `HISTORY` are kept).
    pub fn new(current: Arc<Release>, history: Vec<Arc<Release>>) -> Self {
        let mut history = history;
        let excess = history.len().saturating_sub(HISTORY);
        history.drain(..excess);
        Self {
            current: ArcSwap::new(current),
            history: Mutex::new(history),
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

    /// The release a rollback would return to.
    pub fn previous(&self) -> Option<Arc<Release>> {
        self.lock().last().cloned()
    }

    /// The rollback history, most recent first.
    pub fn history(&self) -> Vec<Arc<Release>> {
        self.lock().iter().rev().cloned().collect()
    }

    /// Makes `next` current; the release it replaces joins the history.
    pub fn activate(&self, next: Arc<Release>) -> Arc<Release> {
        let mut history = self.lock();
        let replaced = self.current.swap(next);
        history.push(replaced.clone());
        let excess = history.len().saturating_sub(HISTORY);
        history.drain(..excess);
        self.changed.send_modify(|n| *n += 1);
        replaced
    }

    /// Returns to the most recent earlier release; the release rolled back from leaves the
    /// history. Returns (from, to), or `None` when the history is empty.
    pub fn rollback(&self) -> Option<(Arc<Release>, Arc<Release>)> {
        let mut history = self.lock();
        let to = history.pop()?;
        let from = self.current.swap(to.clone());
        self.changed.send_modify(|n| *n += 1);
        Some((from, to))
    }

    /// Drops `version` from the history (another daemon rolled back from it).
    pub fn forget(&self, version: &str) {
        self.lock().retain(|r| r.version() != version);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Arc<Release>>> {
        // Why: the guarded list is only pushed to and popped whole; a panic elsewhere cannot
        // leave it half-written, so a poisoned lock is still consistent.
        self.history.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}
