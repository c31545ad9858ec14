//! In-memory ledger backend for unit tests, with a switch that makes writes fail.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use super::{Backend, CredentialRecord, EventId, LedgerError, StoredEvent};

#[derive(Clone, Default)]
pub struct MemoryBackend {
    events: Arc<Mutex<Vec<StoredEvent>>>,
    credentials: Arc<Mutex<Vec<(EventId, CredentialRecord)>>>,
    failing: Arc<AtomicBool>,
    batches: Arc<AtomicUsize>,
}

impl MemoryBackend {
    pub fn events(&self) -> Vec<StoredEvent> {
        self.events.lock().unwrap().clone()
    }

    pub fn credentials(&self) -> Vec<(EventId, CredentialRecord)> {
        self.credentials.lock().unwrap().clone()
    }

    pub fn set_failing(&self, failing: bool) {
        self.failing.store(failing, Ordering::SeqCst);
    }

    pub fn batches(&self) -> usize {
        self.batches.load(Ordering::SeqCst)
    }
}

impl Backend for MemoryBackend {
    async fn head(&mut self) -> Result<Option<(EventId, String)>, LedgerError> {
        Ok(self.events.lock().unwrap().last().map(|e| (e.seq, e.hash.clone())))
    }

    async fn append(
        &mut self,
        events: &[StoredEvent],
        credentials: &[(EventId, CredentialRecord)],
    ) -> Result<(), LedgerError> {
        if self.failing.load(Ordering::SeqCst) {
            return Err(LedgerError::Storage("injected failure".into()));
        }
        self.batches.fetch_add(1, Ordering::SeqCst);
        self.events.lock().unwrap().extend_from_slice(events);
        self.credentials.lock().unwrap().extend_from_slice(credentials);
        Ok(())
    }

    async fn close(self) -> Result<(), LedgerError> {
        Ok(())
    }
}
