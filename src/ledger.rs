//! The ledger: append-only, hash-chained events (each carries the SHA-256 of the previous
//! one), written by one group-commit task so many issuances share a transaction and an
//! fsync while each caller awaits its own acknowledgement. Its schema is the typed `Event`
//! (`event`); writers call `Ledger::record`, and every reader — start-up state, revocation,
//! the expiry and AWS sweeps, replay, `audit`, reports, evidence — goes through `LedgerRead`.
//! Backends (`sqlite`, later PostgreSQL) only store batches and answer reads; chaining,
//! batching and verification live here. Nothing outside this module knows the storage or
//! its file names: callers name a `Location`. Never holds secrets: serials, fingerprints
//! and ids only.

pub mod checkpoint;
#[cfg(any(test, feature = "test-support"))]
pub mod contract;
pub mod event;
pub mod export;
#[cfg(any(test, feature = "test-support"))]
pub mod memory;
pub mod merkle;
pub mod postgres;
pub mod sqlite;

use std::collections::HashMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use serde::Serialize;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

pub use event::{CredentialRecord, DecodeError, Event, EventKind};

pub type EventId = i64;
pub use crate::BoxFuture;

/// Hash of the (absent) event before the first one.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    #[error("ledger storage failed: {0}")]
    Storage(String),
    #[error("no ledger at `{0}`")]
    Missing(String),
    #[error("the ledger at `{0}` cannot be read: permission denied")]
    PermissionDenied(String),
    #[error("the ledger writer has stopped")]
    WriterStopped,
    #[error("event {seq}: {source}")]
    Decode { seq: EventId, source: DecodeError },
    #[error("an event could not be encoded: {0}")]
    Encode(String),
    #[error(
        "the ledger `{ledger}` has schema version {found}, newer than this mayfly knows ({known}): upgrade mayfly, do not run an older one against it (UPGRADING.md)"
    )]
    NewerSchema { ledger: String, found: i64, known: i64 },
    #[error("`{0}` exists; a backup never replaces a file")]
    Exists(String),
}

/// Where a ledger lives. Built from the config (`[ledger]`) or a CLI's `--data-dir` /
/// `--ledger`; only this module turns it into storage.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Location {
    /// An SQLite database file.
    Sqlite(PathBuf),
    /// A PostgreSQL database several daemons share, each appending to its own chain.
    Postgres(postgres::Target),
}

impl Location {
    /// The default ledger of a data directory.
    pub fn in_data_dir(data_dir: &Path) -> Self {
        Location::Sqlite(data_dir.join(sqlite::FILE_NAME))
    }

    /// A ledger file given by path (a copy is fine for readers).
    pub fn file(path: &Path) -> Self {
        Location::Sqlite(path.to_path_buf())
    }
}

impl std::fmt::Display for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Location::Sqlite(path) => write!(f, "{}", path.display()),
            Location::Postgres(target) => write!(f, "{target}"),
        }
    }
}

/// How the daemon's ledger is opened for writing.
#[derive(Clone, Debug)]
pub struct Settings {
    pub location: Location,
    /// How long a write waits for a lock another process holds (SQLite busy timeout).
    pub busy_timeout: Duration,
    /// Most events committed in one transaction.
    pub max_batch: usize,
    /// This daemon's chain in a shared ledger (PostgreSQL): unique per daemon, stable
    /// across its restarts.
    pub chain: String,
    /// Connections to a shared ledger.
    pub pool_size: u32,
    /// A daemon whose view of the shared state is older than this refuses issuance.
    pub max_staleness: Duration,
}

impl Settings {
    /// A local ledger with the defaults (tests, benchmarks).
    pub fn local(location: Location) -> Self {
        Self {
            location,
            busy_timeout: Duration::from_secs(5),
            max_batch: 256,
            chain: String::new(),
            pool_size: 8,
            max_staleness: Duration::from_secs(5),
        }
    }
}

/// The daemon's ledger: the group-commit writer, its task, a reader over the same storage,
/// and — for a shared ledger — what other daemons share with this one.
pub struct Opened {
    pub writer: GroupCommitLedger,
    pub task: JoinHandle<()>,
    pub reader: Arc<dyn LedgerRead>,
    /// `Some` when several daemons share the ledger.
    pub shared: Option<postgres::Shared>,
}

/// Opens (creating or migrating if needed) the ledger for writing and starts the
/// group-commit writer.
pub async fn open(settings: &Settings) -> Result<Opened, LedgerError> {
    match &settings.location {
        Location::Sqlite(path) => {
            let backend = sqlite::SqliteBackend::open(path, settings.busy_timeout).await?;
            let (writer, task) = GroupCommitLedger::start(backend, settings.max_batch).await?;
            let reader = Arc::new(sqlite::SqliteReader::open(path).await?);
            Ok(Opened { writer, task, reader, shared: None })
        }
        Location::Postgres(target) => {
            let (backend, reader, shared) = postgres::open(target, settings).await?;
            let (writer, task) = GroupCommitLedger::start(backend, settings.max_batch).await?;
            Ok(Opened { writer, task, reader: Arc::new(reader), shared: Some(shared) })
        }
    }
}

/// Opens an existing ledger read-only (the CLI, `mayfly policy replay`, reports).
pub async fn open_reader(location: &Location) -> Result<Arc<dyn LedgerRead>, LedgerError> {
    match location {
        Location::Sqlite(path) => Ok(Arc::new(sqlite::SqliteReader::open(path).await?)),
        Location::Postgres(target) => Ok(Arc::new(postgres::PgReader::connect(target).await?)),
    }
}

/// Copies the ledger at `from` into chain `chain` of the shared ledger at `to`, unchanged
/// (sequence numbers, times, bodies and hashes), then verifies the copy. Refuses a target
/// chain that already holds events.
pub async fn migrate(from: &Location, to: &Location, chain: &str) -> Result<usize, LedgerError> {
    const PAGE: i64 = 1000;
    let Location::Postgres(target) = to else {
        return Err(LedgerError::Storage("the target of a migration is a PostgreSQL ledger (postgres:URL)".into()));
    };
    let source = open_reader(from).await?;
    let source_chains = source.chains().await?;
    let [source_chain] = source_chains.as_slice() else {
        return Err(LedgerError::Storage(format!(
            "`{from}` holds {} chains; copy one ledger file at a time",
            source_chains.len()
        )));
    };
    verify(source.as_ref()).await.map_err(|e| LedgerError::Storage(format!("the source does not verify: {e}")))?;
    let mut backend = postgres::migration_backend(target, chain).await?;
    if backend.head().await?.is_some() {
        return Err(LedgerError::Storage(format!("chain `{chain}` already holds events in `{to}`")));
    }
    let mut rows: HashMap<EventId, CredentialRecord> =
        source.credentials(CredentialFilter::All).await?.into_iter().map(|r| (r.issued_event, r.credential)).collect();
    let mut after = i64::MIN;
    let mut copied = 0;
    loop {
        let filter =
            EventFilter { chain: Some(source_chain.clone()), after, limit: Some(PAGE), ..EventFilter::default() };
        let page = source.events(filter).await?;
        let Some(last) = page.last() else { break };
        after = last.pos;
        let credentials: Vec<(EventId, CredentialRecord)> =
            page.iter().filter_map(|e| rows.remove(&e.seq).map(|c| (e.seq, c))).collect();
        backend.append(&page, &credentials).await?;
        copied += page.len();
    }
    let copy = open_reader(to).await?;
    verify(copy.as_ref()).await.map_err(|e| LedgerError::Storage(format!("the copy does not verify: {e}")))?;
    Ok(copied)
}

/// What `backup` copied.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackupCopy {
    /// Events in the copy (it verified).
    pub events: usize,
    pub bytes: u64,
}

/// Copies the live ledger at `from` to the new file `to`, consistently while its daemon
/// writes, and verifies the copy (hash chain and credential table) before it takes the
/// name. SQLite only: a PostgreSQL ledger is backed up with the database's own tools.
pub async fn backup(from: &Location, to: &Path) -> Result<BackupCopy, LedgerError> {
    let Location::Sqlite(source) = from else {
        return Err(LedgerError::Storage(format!(
            "`{from}` is a PostgreSQL ledger: back it up with PostgreSQL's tools, e.g. `pg_dump --format=custom --file=mayfly.dump DBNAME` (consistent while daemons write; README: Backups)"
        )));
    };
    let events = sqlite::backup(source, to, |copy| async move {
        let reader = sqlite::SqliteReader::open(&copy).await?;
        verify(&reader)
            .await
            .map_err(|e| LedgerError::Storage(format!("the copy does not verify, so it was not kept: {e}")))
    })
    .await?;
    let bytes = std::fs::metadata(to).map_err(|e| LedgerError::Storage(e.to_string()))?.len();
    Ok(BackupCopy { events, bytes })
}

/// An event to append, encoded by the caller (off the writer task).
#[derive(Clone, Debug)]
struct NewEvent {
    kind: EventKind,
    at: SystemTime,
    body: String,
    credential: Option<CredentialRecord>,
}

/// An event as stored: the chain fields make any edit, deletion or reordering detectable.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct StoredEvent {
    /// The daemon chain it belongs to (`""`: the single chain of a local ledger).
    pub chain: String,
    /// Its position among all chains' events, in insertion order (a local ledger: `seq`).
    pub pos: i64,
    pub seq: EventId,
    pub at_ms: i64,
    pub kind: String,
    pub body: String,
    pub prev_hash: String,
    pub hash: String,
}

impl StoredEvent {
    /// The typed event this row holds.
    pub fn event(&self) -> Result<Event, LedgerError> {
        Event::decode(&self.kind, &self.body).map_err(|source| LedgerError::Decode { seq: self.seq, source })
    }

    pub fn at(&self) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_millis(self.at_ms.max(0).unsigned_abs())
    }
}

/// What issuance needs from a ledger: append an event and learn it is durable.
pub trait Ledger: Send + Sync + 'static {
    /// Resolves once the event is committed; its sequence number is its id.
    fn record(&self, at: SystemTime, event: Event) -> BoxFuture<'_, Result<EventId, LedgerError>>;

    /// Records the decision that allowed an issuance and its `issued` event together,
    /// the `issued` event right after the decision and naming it (`decision_id` is set
    /// here, whatever the caller put there); resolves with both ids once both are durable.
    /// The group-commit writer stores the two in one transaction (one commit, one fsync);
    /// this default records them one after the other.
    fn record_issuance(
        &self,
        at: SystemTime,
        decision: event::Decision,
        mut issued: event::Issued,
    ) -> BoxFuture<'_, Result<(EventId, EventId), LedgerError>> {
        Box::pin(async move {
            let decision_id = self.record(at, Event::Decision(decision)).await?;
            issued.credential.decision_id = decision_id;
            let issued_id = self.record(at, Event::Issued(issued)).await?;
            Ok((decision_id, issued_id))
        })
    }
}

/// Which events a read returns, in position order.
#[derive(Clone, Debug, Default)]
pub struct EventFilter {
    /// Only this chain (`None`: every chain).
    pub chain: Option<String>,
    /// Only these kinds (empty: every kind).
    pub kinds: Vec<EventKind>,
    /// Only events after this position (`StoredEvent::pos`; paging).
    pub after: i64,
    /// Only events at or after this time (Unix milliseconds).
    pub since_ms: Option<i64>,
    /// At most this many (the first ones after `after`).
    pub limit: Option<i64>,
    /// Only the last this many (a tail), oldest first.
    pub last: Option<i64>,
}

impl EventFilter {
    pub fn all() -> Self {
        Self::default()
    }

    pub fn kinds(kinds: &[EventKind]) -> Self {
        Self { kinds: kinds.to_vec(), ..Self::default() }
    }

    pub fn tail(n: i64) -> Self {
        Self { last: Some(n.max(0)), ..Self::default() }
    }
}

/// A credential row and its `issued` event's place.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CredentialRow {
    pub chain: String,
    /// The `issued` event's sequence number in `chain`.
    pub issued_event: EventId,
    pub credential: CredentialRecord,
}

/// Which credential rows a read returns.
#[derive(Clone, Debug)]
pub enum CredentialFilter {
    /// Every row, in issuance order.
    All,
    /// Rows still valid at this Unix time (not_after after it), in issuance order.
    ActiveAt(i64),
    /// Rows whose not-after is in `(after, until]`, ordered by (not_after, id), at most
    /// `limit`: the expiry sweep's next batch. `after` is (not_after, id), exclusive.
    Expiring { after: (i64, String), until: i64, limit: i64 },
    /// Rows issued on the emergency path, in issuance order: found through a partial
    /// index, so the read costs what the few flagged rows cost, not the ledger's size.
    BreakGlass,
}

/// Every read of the ledger goes through this: one trait, so a second backend serves
/// every reader the same way.
pub trait LedgerRead: Send + Sync + 'static {
    /// The daemon chains in the ledger (a local ledger: the one chain `""`).
    fn chains(&self) -> BoxFuture<'_, Result<Vec<String>, LedgerError>>;
    fn events(&self, filter: EventFilter) -> BoxFuture<'_, Result<Vec<StoredEvent>, LedgerError>>;
    /// These events of one chain by sequence number (the decisions behind credentials).
    fn events_by_seq<'a>(
        &'a self,
        chain: &'a str,
        seqs: &'a [EventId],
    ) -> BoxFuture<'a, Result<HashMap<EventId, StoredEvent>, LedgerError>>;
    /// Credential rows, each with where its `issued` event is.
    fn credentials(&self, filter: CredentialFilter) -> BoxFuture<'_, Result<Vec<CredentialRow>, LedgerError>>;
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

/// Typed events of `filter`, each with its sequence number and time. An event that does
/// not decode is an error, never skipped: state rebuilt from the ledger (locks,
/// revocations) must not silently forget one.
pub async fn read_typed(
    reader: &dyn LedgerRead,
    filter: EventFilter,
) -> Result<Vec<(StoredEvent, Event)>, LedgerError> {
    let rows = reader.events(filter).await?;
    rows.into_iter()
        .map(|row| {
            let event = row.event()?;
            Ok((row, event))
        })
        .collect()
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

/// Checks a whole chain in order; names the first bad event.
pub fn verify_chain(events: &[StoredEvent]) -> Result<usize, ChainError> {
    let mut link = ChainLink::default();
    for e in events {
        link.check(e)?;
    }
    Ok(events.len())
}

/// The chain position a verification has reached: checks events one page at a time.
#[derive(Debug, Clone)]
struct ChainLink {
    prev_hash: String,
    prev_seq: EventId,
}

impl Default for ChainLink {
    fn default() -> Self {
        Self { prev_hash: GENESIS.to_owned(), prev_seq: 0 }
    }
}

impl ChainLink {
    fn check(&mut self, e: &StoredEvent) -> Result<(), ChainError> {
        if e.seq != self.prev_seq + 1 {
            return Err(ChainError::Sequence { seq: e.seq, expected: self.prev_seq + 1 });
        }
        if e.prev_hash != self.prev_hash {
            return Err(ChainError::Link { seq: e.seq, prev: self.prev_seq });
        }
        if event_hash(&e.prev_hash, e.seq, e.at_ms, &e.kind, &e.body) != e.hash {
            return Err(ChainError::Hash { seq: e.seq });
        }
        self.prev_hash.clone_from(&e.hash);
        self.prev_seq = e.seq;
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("{}{source}", if chain.is_empty() { String::new() } else { format!("chain `{chain}`: ") })]
    Chain { chain: String, source: ChainError },
    #[error("credential `{id}` does not match its issued event {seq} (edited)")]
    CredentialEdited { id: String, seq: EventId },
    #[error("credential `{id}` has no issued event (inserted)")]
    CredentialWithoutEvent { id: String },
    #[error("event {seq}: issued credential has no row in the credential table (deleted)")]
    CredentialMissing { seq: EventId },
    #[error(transparent)]
    Ledger(#[from] LedgerError),
}

/// `mayfly audit verify`: every chain, page by page, and the credential table against the
/// chained `issued` events (every row equals its event's credential; every issued event
/// has its row). Returns the number of events.
pub async fn verify(reader: &dyn LedgerRead) -> Result<usize, VerifyError> {
    const PAGE: i64 = 10_000;
    let mut issued: HashMap<(String, EventId), CredentialRecord> = HashMap::new();
    let mut count = 0;
    for chain in reader.chains().await? {
        let mut link = ChainLink::default();
        let mut after = i64::MIN;
        loop {
            let filter = EventFilter { chain: Some(chain.clone()), after, limit: Some(PAGE), ..EventFilter::default() };
            let page = reader.events(filter).await?;
            let Some(last) = page.last() else { break };
            after = last.pos;
            for e in &page {
                link.check(e).map_err(|e| VerifyError::Chain { chain: chain.clone(), source: e })?;
                if e.kind == EventKind::Issued.as_str() {
                    // Why decode only here: an issued body that does not decode cannot be
                    // compared with its row, which is itself a failure.
                    if let Event::Issued(i) = e.event()? {
                        issued.insert((chain.clone(), e.seq), i.row());
                    }
                }
            }
            count += page.len();
        }
    }
    for row in reader.credentials(CredentialFilter::All).await? {
        let seq = row.issued_event;
        match issued.remove(&(row.chain, seq)) {
            Some(event) if event == row.credential => {}
            Some(_) => return Err(VerifyError::CredentialEdited { id: row.credential.id, seq }),
            None => return Err(VerifyError::CredentialWithoutEvent { id: row.credential.id }),
        }
    }
    if let Some((_, seq)) = issued.keys().min_by_key(|(_, seq)| *seq) {
        return Err(VerifyError::CredentialMissing { seq: *seq });
    }
    Ok(count)
}

struct Pending {
    event: NewEvent,
    /// An `issued` event stored right after `event` (the decision that allowed it), in the
    /// same transaction, its `decision_id` set to the decision's sequence number here.
    then: Option<event::Issued>,
    /// Acknowledged with the (first) event's sequence number.
    ack: oneshot::Sender<Result<EventId, LedgerError>>,
}

/// Told about the writer's work (telemetry): each committed (or failed) group, and each
/// event once it is durable. Called on the writer's and the callers' tasks: keep it cheap.
pub trait Observer: Send + Sync + 'static {
    fn batch(&self, events: usize, took: Duration, committed: bool);
    fn recorded(&self, event: &Event);
}

/// What the writer task and its handles share.
#[derive(Default)]
struct Shared {
    observer: OnceLock<Arc<dyn Observer>>,
    /// The last group failed to commit (cleared by the next one that commits).
    failing: AtomicBool,
}

/// The group-commit writer in front of a `Backend`.
#[derive(Clone)]
pub struct GroupCommitLedger {
    tx: mpsc::Sender<Pending>,
    shared: Arc<Shared>,
}

impl GroupCommitLedger {
    /// Starts the writer task. It ends when every handle is dropped, after committing
    /// whatever was queued.
    pub async fn start<B: Backend>(mut backend: B, max_batch: usize) -> Result<(Self, JoinHandle<()>), LedgerError> {
        let head = backend.head().await?;
        let (tx, rx) = mpsc::channel(max_batch.max(1) * 4);
        let shared = Arc::new(Shared::default());
        let task = tokio::spawn(write_loop(backend, rx, head, max_batch.max(1), shared.clone()));
        Ok((Self { tx, shared }, task))
    }

    /// Reports the writer's work to `observer` from now on (set once; later calls are ignored).
    pub fn observe(&self, observer: Arc<dyn Observer>) {
        let _ = self.shared.observer.set(observer);
    }

    /// Whether events can be recorded now: the writer runs and its last commit succeeded
    /// (readiness; it recovers with the next group that commits).
    pub fn writable(&self) -> Result<(), String> {
        if self.tx.is_closed() {
            return Err("the ledger writer has stopped".into());
        }
        if self.shared.failing.load(Ordering::Relaxed) {
            return Err("the last ledger commit failed".into());
        }
        Ok(())
    }
}

impl Ledger for GroupCommitLedger {
    fn record(&self, at: SystemTime, event: Event) -> BoxFuture<'_, Result<EventId, LedgerError>> {
        Box::pin(async move {
            // Why encode here: callers run in parallel, the writer task is one thread.
            let kind = event.kind();
            let body = event.body().map_err(|e| LedgerError::Encode(e.to_string()))?;
            let observer = self.shared.observer.get();
            let (credential, event) = match (event, observer) {
                // Why clone only when observed: the event is needed again once durable.
                (Event::Issued(i), Some(_)) => (Some(i.row()), Some(Event::Issued(i))),
                (Event::Issued(i), None) => (Some(i.row()), None),
                (other, Some(_)) => (None, Some(other)),
                (_, None) => (None, None),
            };
            let (ack, done) = oneshot::channel();
            let new = NewEvent { kind, at, body, credential };
            self.tx.send(Pending { event: new, then: None, ack }).await.map_err(|_| LedgerError::WriterStopped)?;
            let id = done.await.map_err(|_| LedgerError::WriterStopped)??;
            if let (Some(observer), Some(event)) = (observer, event) {
                observer.recorded(&event);
            }
            Ok(id)
        })
    }

    fn record_issuance(
        &self,
        at: SystemTime,
        decision: event::Decision,
        issued: event::Issued,
    ) -> BoxFuture<'_, Result<(EventId, EventId), LedgerError>> {
        Box::pin(async move {
            let decision = Event::Decision(decision);
            let body = decision.body().map_err(|e| LedgerError::Encode(e.to_string()))?;
            let observer = self.shared.observer.get();
            // Why clone only when observed: the events are needed again once durable.
            let observed = observer.map(|_| issued.clone());
            let (ack, done) = oneshot::channel();
            let new = NewEvent { kind: EventKind::Decision, at, body, credential: None };
            self.tx
                .send(Pending { event: new, then: Some(issued), ack })
                .await
                .map_err(|_| LedgerError::WriterStopped)?;
            let decision_id = done.await.map_err(|_| LedgerError::WriterStopped)??;
            if let (Some(observer), Some(mut issued)) = (observer, observed) {
                issued.credential.decision_id = decision_id;
                observer.recorded(&decision);
                observer.recorded(&Event::Issued(issued));
            }
            // Why +1: the writer stores the pair as consecutive rows of one batch.
            Ok((decision_id, decision_id + 1))
        })
    }
}

async fn write_loop<B: Backend>(
    mut backend: B,
    mut rx: mpsc::Receiver<Pending>,
    head: Option<(EventId, String)>,
    max_batch: usize,
    shared: Arc<Shared>,
) {
    let (mut last_seq, mut last_hash) = head.unwrap_or((0, GENESIS.to_owned()));
    let mut batch = Vec::with_capacity(max_batch);
    // Why: a batch whose commit failed may still have committed (the connection dropped
    // after COMMIT was sent); the chain continues from what storage says, not from memory.
    let mut head_unknown = false;
    // Why: while one batch commits, new requests queue in the channel; taking all of them
    // at once is what turns one fsync per issuance into one per batch.
    while rx.recv_many(&mut batch, max_batch).await > 0 {
        if head_unknown {
            match backend.head().await {
                Ok(head) => {
                    (last_seq, last_hash) = head.unwrap_or((0, GENESIS.to_owned()));
                    head_unknown = false;
                }
                Err(e) => {
                    tracing::error!(error = %e, events = batch.len(), "ledger unreachable; nothing in this batch was recorded");
                    for p in batch.drain(..) {
                        let _ = p.ack.send(Err(LedgerError::Storage(e.to_string())));
                    }
                    continue;
                }
            }
        }
        let mut rows = Vec::with_capacity(batch.len() * 2);
        let mut credentials = Vec::new();
        let (mut seq, mut prev) = (last_seq, last_hash.clone());
        // Each pending's first sequence number (`None`: refused before it was stored).
        let mut firsts: Vec<Result<EventId, LedgerError>> = Vec::with_capacity(batch.len());
        for p in &mut batch {
            let at_ms =
                i64::try_from(p.event.at.duration_since(SystemTime::UNIX_EPOCH).unwrap_or(Duration::ZERO).as_millis())
                    .unwrap_or(i64::MAX);
            // The issued event of a decision + issuance pair names the decision's seq,
            // known only here; encoded before either row is taken so both or neither are.
            let linked = match p.then.take() {
                None => None,
                Some(mut issued) => {
                    issued.credential.decision_id = seq + 1;
                    let credential = issued.row();
                    match Event::Issued(issued).body() {
                        Ok(body) => Some((body, credential)),
                        Err(e) => {
                            firsts.push(Err(LedgerError::Encode(e.to_string())));
                            continue;
                        }
                    }
                }
            };
            let mut push = |kind: EventKind, body: String, credential: Option<CredentialRecord>| {
                seq += 1;
                let kind = kind.as_str().to_owned();
                let hash = event_hash(&prev, seq, at_ms, &kind, &body);
                let prev_hash = std::mem::replace(&mut prev, hash.clone());
                rows.push(StoredEvent { chain: String::new(), pos: seq, seq, at_ms, kind, body, prev_hash, hash });
                if let Some(c) = credential {
                    credentials.push((seq, c));
                }
                seq
            };
            let first = push(p.event.kind, std::mem::take(&mut p.event.body), p.event.credential.take());
            if let Some((body, credential)) = linked {
                push(EventKind::Issued, body, Some(credential));
            }
            firsts.push(Ok(first));
        }
        if rows.is_empty() {
            for (p, first) in batch.drain(..).zip(firsts) {
                let _ = p.ack.send(first);
            }
            continue;
        }
        let started = Instant::now();
        let appended = backend.append(&rows, &credentials).await;
        shared.failing.store(appended.is_err(), Ordering::Relaxed);
        if let Some(observer) = shared.observer.get() {
            observer.batch(rows.len(), started.elapsed(), appended.is_ok());
        }
        match appended {
            Ok(()) => {
                last_seq = seq;
                last_hash = prev;
                for (p, first) in batch.drain(..).zip(firsts) {
                    let _ = p.ack.send(first);
                }
            }
            Err(e) => {
                head_unknown = true;
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

    const AT: SystemTime = SystemTime::UNIX_EPOCH;

    fn event(n: i64) -> Event {
        Event::DaemonStopped(event::DaemonStopped { clean: n % 2 == 0 })
    }

    #[tokio::test]
    async fn chain_detects_edit_delete_and_reorder() {
        let backend = MemoryBackend::default();
        let (ledger, _task) = GroupCommitLedger::start(backend.clone(), 8).await.unwrap();
        for n in 0..5 {
            ledger.record(AT, event(n)).await.unwrap();
        }
        let events = backend.events();
        assert_eq!(verify_chain(&events), Ok(5));

        let mut edited = events.clone();
        edited[2].body = "{\"clean\":false}".into();
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
                tokio::spawn(async move { l.record(AT, event(n)).await })
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

    #[derive(Default)]
    struct Seen {
        batches: std::sync::Mutex<Vec<(usize, bool)>>,
        events: std::sync::Mutex<Vec<EventKind>>,
    }

    impl Observer for Seen {
        fn batch(&self, events: usize, _took: Duration, committed: bool) {
            self.batches.lock().unwrap().push((events, committed));
        }

        fn recorded(&self, event: &Event) {
            self.events.lock().unwrap().push(event.kind());
        }
    }

    #[tokio::test]
    async fn the_observer_sees_durable_events_only_and_readiness_follows_the_last_commit() {
        let backend = MemoryBackend::default();
        let (ledger, _task) = GroupCommitLedger::start(backend.clone(), 8).await.unwrap();
        let seen = Arc::new(Seen::default());
        ledger.observe(seen.clone());
        ledger.record(AT, event(1)).await.unwrap();
        assert!(ledger.writable().is_ok());
        backend.set_failing(true);
        assert!(ledger.record(AT, event(2)).await.is_err());
        assert_eq!(ledger.writable().unwrap_err(), "the last ledger commit failed");
        backend.set_failing(false);
        ledger.record(AT, event(3)).await.unwrap();
        assert!(ledger.writable().is_ok(), "the next commit clears it");
        assert_eq!(*seen.batches.lock().unwrap(), vec![(1, true), (1, false), (1, true)]);
        assert_eq!(seen.events.lock().unwrap().len(), 2, "the failed event was not counted");
    }

    fn pair(n: u32) -> (event::Decision, event::Issued) {
        let decision =
            event::Decision { action: "issue_x509".into(), outcome: event::Verdict::Allow, ..Default::default() };
        let credential = CredentialRecord {
            id: format!("cred-{n}"),
            kind: "x509".into(),
            identity: "spiffe://t/a".into(),
            serial: format!("{n:032x}"),
            fingerprint: "f".into(),
            not_before: 1,
            not_after: 2,
            decision_id: 999_999,
            break_glass: false,
        };
        (decision, event::Issued { credential, details: event::IssuedDetails::default() })
    }

    #[tokio::test]
    async fn a_decision_and_its_issuance_are_one_commit_and_the_issued_event_names_the_decision() {
        let backend = MemoryBackend::default();
        let (ledger, _task) = GroupCommitLedger::start(backend.clone(), 64).await.unwrap();
        let seen = Arc::new(Seen::default());
        ledger.observe(seen.clone());
        ledger.record(AT, event(1)).await.unwrap();
        let (d, i) = pair(1);
        assert_eq!(ledger.record_issuance(AT, d, i).await.unwrap(), (2, 3));
        assert_eq!(*seen.batches.lock().unwrap(), vec![(1, true), (2, true)], "one commit for the pair");
        // Many at once, mixed with single events: each pair stays adjacent and linked.
        let handles: Vec<_> = (0..100u32)
            .map(|n| {
                let l = ledger.clone();
                tokio::spawn(async move {
                    if n % 3 == 0 {
                        let id = l.record(AT, event(i64::from(n))).await.unwrap();
                        (id, None)
                    } else {
                        let (d, i) = pair(n);
                        let (did, iid) = l.record_issuance(AT, d, i).await.unwrap();
                        (did, Some(iid))
                    }
                })
            })
            .collect();
        let events = {
            let mut out = Vec::new();
            for h in handles {
                out.push(h.await.unwrap());
            }
            out
        };
        let stored = backend.events();
        assert_eq!(verify_chain(&stored), Ok(stored.len()));
        for (first, issued) in events {
            let Some(issued) = issued else { continue };
            assert_eq!(issued, first + 1);
            let row = &stored[usize::try_from(issued - 1).unwrap()];
            let Ok(Event::Issued(i)) = row.event() else { panic!("seq {issued} is not the issued event") };
            assert_eq!(i.credential.decision_id, first, "the issued event names its decision");
            assert_eq!(stored[usize::try_from(first - 1).unwrap()].kind, "decision");
        }
        let credentials = backend.credentials();
        assert!(credentials.iter().all(|(seq, c)| c.decision_id == seq - 1), "credential rows name the decision too");
        // The observer saw both events of every pair, with the decision's id in place.
        assert_eq!(seen.events.lock().unwrap().iter().filter(|k| **k == EventKind::Issued).count(), 1 + 66);
    }

    #[tokio::test]
    async fn a_failed_pair_stores_neither_event() {
        let backend = MemoryBackend::default();
        let (ledger, _task) = GroupCommitLedger::start(backend.clone(), 8).await.unwrap();
        backend.set_failing(true);
        let (d, i) = pair(1);
        assert!(ledger.record_issuance(AT, d, i).await.is_err());
        backend.set_failing(false);
        assert!(backend.events().is_empty());
        let (d, i) = pair(2);
        assert_eq!(ledger.record_issuance(AT, d, i).await.unwrap(), (1, 2));
    }

    #[tokio::test]
    async fn a_failed_batch_is_reported_and_does_not_break_the_chain() {
        let backend = MemoryBackend::default();
        let (ledger, _task) = GroupCommitLedger::start(backend.clone(), 8).await.unwrap();
        ledger.record(AT, event(1)).await.unwrap();
        backend.set_failing(true);
        assert!(matches!(ledger.record(AT, event(2)).await, Err(LedgerError::Storage(_))));
        backend.set_failing(false);
        assert_eq!(ledger.record(AT, event(3)).await.unwrap(), 2);
        assert_eq!(verify_chain(&backend.events()), Ok(2));
    }
}
