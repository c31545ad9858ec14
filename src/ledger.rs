//! The ledger: append-only, hash-chained events (each carries the SHA-256 of the previous
//! one), written by one group-commit task so many issuances share a transaction and an
//! fsync while each caller awaits its own acknowledgement. Backends (`sqlite`, later
//! PostgreSQL) only store batches; chaining and batching live here. Never holds secrets:
//! serials, fingerprints and ids only.

#[cfg(test)]
pub mod memory;
pub mod sqlite;

use std::future::Future;
use std::pin::Pin;
use std::time::{Duration, SystemTime};

use serde::Serialize;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

pub type EventId = i64;
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Hash of the (absent) event before the first one.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    #[error("ledger storage failed: {0}")]
    Storage(String),
    #[error("the ledger writer has stopped")]
    WriterStopped,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    Decision,
    Issued,
    /// A credential was presented and checked (a JWT-SVID validation).
    Used,
    DaemonStarted,
    DaemonStopped,
    PolicyActivated,
    PolicyRejected,
    PolicyRolledBack,
    /// A new X.509 CA became the signer (the old one stays in the bundle until its SVIDs expire).
    CaRotated,
    /// New CA files on disk were not usable; the current CA keeps signing.
    CaRejected,
    /// A new JWT signing key took over (the old one stays in the JWKS until its tokens expire).
    JwtKeyRotated,
    /// A new JWT key file was not usable; the current key keeps signing.
    JwtKeyRejected,
    /// Credentials taken back before their expiry, with who and why.
    Revoked,
    /// An identity (or prefix) may get no new credential.
    Locked,
    Unlocked,
    /// A credential passed its not-after (the removal half of its lifecycle).
    Expired,
    /// An admin call (operator, reason, what it asked): every one is recorded.
    Admin,
    /// A step of the emergency path beyond decision and issuance: pending, approved,
    /// denied, refused (elevated sink), reviewed.
    BreakGlass,
    /// An AWS revocation deny was deleted from a role: every session it caught has expired.
    AwsDenyRemoved,
    /// A candidate release was checked before promotion (replay, proof, promote-check).
    PolicyCheck,
    /// Shadow mode started or stopped for a candidate release.
    PolicyShadow,
    /// A live request the shadow candidate would decide differently (never acted on).
    PolicyShadowDiff,
}

impl EventKind {
    pub fn as_str(&self) -> &'static str {
        match self {
            EventKind::Decision => "decision",
            EventKind::Issued => "issued",
            EventKind::Used => "used",
            EventKind::DaemonStarted => "daemon_started",
            EventKind::DaemonStopped => "daemon_stopped",
            EventKind::PolicyActivated => "policy_activated",
            EventKind::PolicyRejected => "policy_rejected",
            EventKind::PolicyRolledBack => "policy_rolled_back",
            EventKind::CaRotated => "ca_rotated",
            EventKind::CaRejected => "ca_rejected",
            EventKind::JwtKeyRotated => "jwt_key_rotated",
            EventKind::JwtKeyRejected => "jwt_key_rejected",
            EventKind::Revoked => "revoked",
            EventKind::Locked => "locked",
            EventKind::Unlocked => "unlocked",
            EventKind::Expired => "expired",
            EventKind::Admin => "admin",
            EventKind::BreakGlass => "break_glass",
            EventKind::AwsDenyRemoved => "aws_deny_removed",
            EventKind::PolicyCheck => "policy_check",
            EventKind::PolicyShadow => "policy_shadow",
            EventKind::PolicyShadowDiff => "policy_shadow_diff",
        }
    }
}

/// A row of the credential table, written in the same transaction as its `issued` event.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct CredentialRecord {
    pub id: String,
    pub kind: String,
    pub identity: String,
    pub serial: String,
    pub fingerprint: String,
    pub not_before: i64,
    pub not_after: i64,
    pub decision_id: EventId,
}

/// An event to append. For `issued`, `credential` carries the credential-table row.
#[derive(Clone, Debug)]
pub struct NewEvent {
    pub kind: EventKind,
    pub at: SystemTime,
    pub body: serde_json::Value,
    pub credential: Option<CredentialRecord>,
}

/// An event as stored: the chain fields make any edit, deletion or reordering detectable.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct StoredEvent {
    pub seq: EventId,
    pub at_ms: i64,
    pub kind: String,
    pub body: String,
    pub prev_hash: String,
    pub hash: String,
}

/// What issuance needs from a ledger: append an event and learn it is durable.
pub trait Ledger: Send + Sync + 'static {
    /// Resolves once the event is committed; its sequence number is its id.
    fn record(&self, event: NewEvent) -> BoxFuture<'_, Result<EventId, LedgerError>>;
}

/// Storage for chained batches. `append` must store all rows of a batch atomically.
pub trait Backend: Send + 'static {
    /// The last stored event's sequence number and hash.
    fn head(&mut self) -> impl Future<Output = Result<Option<(EventId, String)>, LedgerError>> + Send;
    fn append(
        &mut self,
        events: &[StoredEvent],
        credentials: &[(EventId, CredentialRecord)],
    ) -> impl Future<Output = Result<(), LedgerError>> + Send;
    /// Flushes and releases storage once the writer has drained (shutdown).
    fn close(self) -> impl Future<Output = Result<(), LedgerError>> + Send;
}

/// SHA-256 over the previous hash and this event's fields, each length-prefixed.
pub fn event_hash(prev_hash: &str, seq: EventId, at_ms: i64, kind: &str, body: &str) -> String {
    let mut ctx = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
    for part in [prev_hash.as_bytes(), &seq.to_be_bytes(), &at_ms.to_be_bytes(), kind.as_bytes(), body.as_bytes()] {
        ctx.update(&(part.len() as u64).to_be_bytes());
        ctx.update(part);
    }
    hex::encode(ctx.finish())
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    #[error("event {seq}: its hash does not match its contents (edited)")]
    Hash { seq: EventId },
    #[error("event {seq}: prev_hash does not match event {prev} (deleted, inserted or reordered rows)")]
    Link { seq: EventId, prev: EventId },
    #[error("event {seq}: expected sequence number {expected} (deleted or reordered rows)")]
    Sequence { seq: EventId, expected: EventId },
}

/// Checks the whole chain in order; names the first bad event.
pub fn verify_chain(events: &[StoredEvent]) -> Result<usize, ChainError> {
    let mut prev_hash = GENESIS.to_owned();
    let mut prev_seq = 0;
    for e in events {
        if e.seq != prev_seq + 1 {
            return Err(ChainError::Sequence { seq: e.seq, expected: prev_seq + 1 });
        }
        if e.prev_hash != prev_hash {
            return Err(ChainError::Link { seq: e.seq, prev: prev_seq });
        }
        if event_hash(&e.prev_hash, e.seq, e.at_ms, &e.kind, &e.body) != e.hash {
            return Err(ChainError::Hash { seq: e.seq });
        }
        prev_hash.clone_from(&e.hash);
        prev_seq = e.seq;
    }
    Ok(events.len())
}

struct Pending {
    event: NewEvent,
    ack: oneshot::Sender<Result<EventId, LedgerError>>,
}

/// The group-commit writer in front of a `Backend`.
#[derive(Clone)]
pub struct GroupCommitLedger {
    tx: mpsc::Sender<Pending>,
}

impl GroupCommitLedger {
    /// Starts the writer task. It ends when every handle is dropped, after committing
    /// whatever was queued.
    pub async fn start<B: Backend>(mut backend: B, max_batch: usize) -> Result<(Self, JoinHandle<()>), LedgerError> {
        let head = backend.head().await?;
        let (tx, rx) = mpsc::channel(max_batch.max(1) * 4);
        let task = tokio::spawn(write_loop(backend, rx, head, max_batch.max(1)));
        Ok((Self { tx }, task))
    }
}

impl Ledger for GroupCommitLedger {
    fn record(&self, event: NewEvent) -> BoxFuture<'_, Result<EventId, LedgerError>> {
        Box::pin(async move {
            let (ack, done) = oneshot::channel();
            self.tx.send(Pending { event, ack }).await.map_err(|_| LedgerError::WriterStopped)?;
            done.await.map_err(|_| LedgerError::WriterStopped)?
        })
    }
}

async fn write_loop<B: Backend>(
    mut backend: B,
    mut rx: mpsc::Receiver<Pending>,
    head: Option<(EventId, String)>,
    max_batch: usize,
) {
    let (mut last_seq, mut last_hash) = head.unwrap_or((0, GENESIS.to_owned()));
    let mut batch = Vec::with_capacity(max_batch);
    // Why: while one batch commits, new requests queue in the channel; taking all of them
    // at once is what turns one fsync per issuance into one per batch.
    while rx.recv_many(&mut batch, max_batch).await > 0 {
        let mut rows = Vec::with_capacity(batch.len());
        let mut credentials = Vec::new();
        let (mut seq, mut prev) = (last_seq, last_hash.clone());
        for p in &batch {
            seq += 1;
            let at_ms =
                i64::try_from(p.event.at.duration_since(SystemTime::UNIX_EPOCH).unwrap_or(Duration::ZERO).as_millis())
                    .unwrap_or(i64::MAX);
            let kind = p.event.kind.as_str().to_owned();
            let body = p.event.body.to_string();
            let hash = event_hash(&prev, seq, at_ms, &kind, &body);
            rows.push(StoredEvent { seq, at_ms, kind, body, prev_hash: prev, hash: hash.clone() });
            if let Some(c) = &p.event.credential {
                credentials.push((seq, c.clone()));
            }
            prev = hash;
        }
        match backend.append(&rows, &credentials).await {
            Ok(()) => {
                last_seq = seq;
                last_hash = prev;
                for (p, row) in batch.drain(..).zip(&rows) {
                    let _ = p.ack.send(Ok(row.seq));
                }
            }
            Err(e) => {
                tracing::error!(error = %e, events = batch.len(), "ledger batch failed; nothing in it was recorded");
                for p in batch.drain(..) {
                    let _ = p.ack.send(Err(LedgerError::Storage(e.to_string())));
                }
            }
        }
    }
    if let Err(e) = backend.close().await {
        tracing::warn!(error = %e, "closing the ledger failed; committed events are safe in the WAL");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::memory::MemoryBackend;

    fn event(n: i64) -> NewEvent {
        NewEvent {
            kind: EventKind::Decision,
            at: SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000),
            body: serde_json::json!({ "n": n }),
            credential: None,
        }
    }

    #[tokio::test]
    async fn chain_detects_edit_delete_and_reorder() {
        let backend = MemoryBackend::default();
        let (ledger, _task) = GroupCommitLedger::start(backend.clone(), 8).await.unwrap();
        for n in 0..5 {
            ledger.record(event(n)).await.unwrap();
        }
        let events = backend.events();
        assert_eq!(verify_chain(&events), Ok(5));

        let mut edited = events.clone();
        edited[2].body = "{\"n\":99}".into();
        assert_eq!(verify_chain(&edited), Err(ChainError::Hash { seq: 3 }));

        let mut deleted = events.clone();
        deleted.remove(1);
        assert_eq!(verify_chain(&deleted), Err(ChainError::Sequence { seq: 3, expected: 2 }));

        let mut reordered = events.clone();
        reordered.swap(1, 2);
        assert!(verify_chain(&reordered).is_err());
    }

    #[tokio::test]
    async fn concurrent_records_are_batched_and_each_acknowledged() {
        let backend = MemoryBackend::default();
        let (ledger, _task) = GroupCommitLedger::start(backend.clone(), 64).await.unwrap();
        let handles: Vec<_> = (0..200)
            .map(|n| {
                let l = ledger.clone();
                tokio::spawn(async move { l.record(event(n)).await })
            })
            .collect();
        let mut ids = Vec::new();
        for h in handles {
            ids.push(h.await.unwrap().unwrap());
        }
        ids.sort_unstable();
        assert_eq!(ids, (1..=200).collect::<Vec<_>>());
        assert!(backend.batches() < 200, "expected group commits, got {} batches", backend.batches());
        assert_eq!(verify_chain(&backend.events()), Ok(200));
    }

    #[tokio::test]
    async fn a_failed_batch_is_reported_and_does_not_break_the_chain() {
        let backend = MemoryBackend::default();
        let (ledger, _task) = GroupCommitLedger::start(backend.clone(), 8).await.unwrap();
        ledger.record(event(1)).await.unwrap();
        backend.set_failing(true);
        assert!(matches!(ledger.record(event(2)).await, Err(LedgerError::Storage(_))));
        backend.set_failing(false);
        assert_eq!(ledger.record(event(3)).await.unwrap(), 2);
        assert_eq!(verify_chain(&backend.events()), Ok(2));
    }
}
