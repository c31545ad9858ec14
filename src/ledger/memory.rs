//! In-memory ledger backend for tests (writer and reader), with a switch that makes writes
//! fail and a count of the batches committed.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use super::{
    Backend, BoxFuture, CredentialFilter, CredentialRecord, CredentialRow, EventFilter, EventId, LedgerError,
    LedgerRead, StoredEvent,
};

#[derive(Clone, Default)]
pub struct MemoryBackend {
    events: Arc<Mutex<Vec<StoredEvent>>>,
    credentials: Arc<Mutex<Vec<(EventId, CredentialRecord)>>>,
    failing: Arc<AtomicBool>,
    batches: Arc<AtomicUsize>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Why: rows are appended whole; a panicking test thread cannot leave half a row.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl MemoryBackend {
    pub fn events(&self) -> Vec<StoredEvent> {
        lock(&self.events).clone()
    }

    pub fn credentials(&self) -> Vec<(EventId, CredentialRecord)> {
        lock(&self.credentials).clone()
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
        Ok(lock(&self.events).last().map(|e| (e.seq, e.hash.clone())))
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
        lock(&self.events).extend_from_slice(events);
        lock(&self.credentials).extend_from_slice(credentials);
        Ok(())
    }

    async fn close(self) -> Result<(), LedgerError> {
        Ok(())
    }
}

impl LedgerRead for MemoryBackend {
    fn chains(&self) -> BoxFuture<'_, Result<Vec<String>, LedgerError>> {
        Box::pin(async { Ok(vec![String::new()]) })
    }

    fn events(&self, f: EventFilter) -> BoxFuture<'_, Result<Vec<StoredEvent>, LedgerError>> {
        let other_chain = f.chain.as_deref().is_some_and(|c| !c.is_empty());
        let matching = lock(&self.events)
            .iter()
            .filter(|_| !other_chain)
            .filter(|e| e.pos > f.after)
            .filter(|e| f.since_ms.is_none_or(|s| e.at_ms >= s))
            .filter(|e| f.kinds.is_empty() || f.kinds.iter().any(|k| k.as_str() == e.kind))
            .cloned()
            .collect::<Vec<_>>();
        let out = match (f.last, f.limit) {
            (Some(n), _) => matching[matching.len().saturating_sub(usize::try_from(n).unwrap_or(0))..].to_vec(),
            (None, Some(n)) => matching.into_iter().take(usize::try_from(n).unwrap_or(0)).collect(),
            (None, None) => matching,
        };
        Box::pin(async move { Ok(out) })
    }

    fn events_by_seq<'a>(
        &'a self,
        chain: &'a str,
        seqs: &'a [EventId],
    ) -> BoxFuture<'a, Result<HashMap<EventId, StoredEvent>, LedgerError>> {
        let out = lock(&self.events)
            .iter()
            .filter(|e| chain.is_empty() && seqs.contains(&e.seq))
            .map(|e| (e.seq, e.clone()))
            .collect();
        Box::pin(async move { Ok(out) })
    }

    fn credentials(&self, filter: CredentialFilter) -> BoxFuture<'_, Result<Vec<CredentialRow>, LedgerError>> {
        let rows = lock(&self.credentials).clone();
        let out = match filter {
            CredentialFilter::All => rows,
            CredentialFilter::ActiveAt(now) => rows.into_iter().filter(|(_, c)| c.not_after > now).collect(),
            CredentialFilter::Expiring { after, until, limit } => {
                let mut rows: Vec<_> = rows
                    .into_iter()
                    .filter(|(_, c)| (c.not_after, c.id.as_str()) > (after.0, after.1.as_str()) && c.not_after <= until)
                    .collect();
                rows.sort_by(|(_, a), (_, b)| (a.not_after, &a.id).cmp(&(b.not_after, &b.id)));
                rows.truncate(usize::try_from(limit).unwrap_or(0));
                rows
            }
            CredentialFilter::BreakGlass => rows.into_iter().filter(|(_, c)| c.break_glass).collect(),
        };
        let out = out
            .into_iter()
            .map(|(issued_event, credential)| CredentialRow { chain: String::new(), issued_event, credential })
            .collect();
        Box::pin(async move { Ok(out) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    impl crate::ledger::contract::Harness for MemoryBackend {
        type Backend = MemoryBackend;

        async fn backend(&self) -> MemoryBackend {
            self.clone()
        }

        async fn reader(&self) -> Result<Arc<dyn LedgerRead>, LedgerError> {
            Ok(Arc::new(self.clone()))
        }
    }

    #[tokio::test]
    async fn the_memory_backend_keeps_the_ledger_contract() {
        crate::ledger::contract::run(MemoryBackend::default()).await;
    }
}
