//! PostgreSQL backend: one database several daemons share. Each daemon appends to its own
//! hash chain (`events.chain`, claimed with a session advisory lock for the daemon's life,
//! so two daemons cannot write one chain), through the same group-commit writer as SQLite
//! (one multi-row INSERT per table per batch). What daemons share goes through here too:
//! the change feed (other daemons' events in commit order), the id-token replay cache (one
//! unique insert), policy release bundles, and break-glass requests waiting for approval.
//!
//! The feed reads `events` by transaction id, never by sequence: rows whose transaction id is
//! below the oldest transaction still running (`pg_snapshot_xmin`) can no longer change, so
//! reading `[low, xmin)` and moving `low` to `xmin` skips nothing that commits late (the
//! trap of reading by a sequence, which is not commit-ordered). `NOTIFY` is only a wake-up
//! for it; a poll every `FEED_POLL` bounds the delay without one.
//!
//! Schema changes are versioned migrations, applied at start under a transaction-level
//! advisory lock; a database whose schema is newer than this build knows is refused.

use std::collections::HashMap;
use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, SystemTime};

use sqlx::postgres::{PgConnectOptions, PgListener, PgPool, PgPoolOptions, PgRow, PgSslMode};
use sqlx::{Connection, PgConnection, Row};
use tokio::sync::{mpsc, watch};

use super::event::{CredentialRecord, EventKind};
use super::{
    Backend, BoxFuture, CredentialFilter, CredentialRow, EventFilter, EventId, LedgerError, LedgerRead, Settings,
    StoredEvent,
};
use crate::keys::SecretString;

/// The schema this build writes; a database at a higher version is refused.
pub const SCHEMA_VERSION: i32 = 2;
/// The `NOTIFY` channel that wakes other daemons' feeds.
const CHANNEL: &str = "mayfly_events";
/// How often the feed reads without a wake-up.
const FEED_POLL: Duration = Duration::from_millis(200);
/// Kinds whose commit changes what other daemons must enforce or serve.
pub const SHARED_KINDS: [EventKind; 7] = [
    EventKind::Revoked,
    EventKind::Locked,
    EventKind::Unlocked,
    EventKind::PolicyActivated,
    EventKind::PolicyRolledBack,
    EventKind::PolicyShadow,
    EventKind::BreakGlass,
];

const MIGRATIONS: &[&[&str]] = &[
    &[
        "CREATE TABLE events (
        pos BIGSERIAL PRIMARY KEY,
        chain TEXT NOT NULL,
        seq BIGINT NOT NULL,
        at_ms BIGINT NOT NULL,
        kind TEXT NOT NULL,
        body TEXT NOT NULL,
        prev_hash TEXT NOT NULL,
        hash TEXT NOT NULL,
        xid XID8 NOT NULL DEFAULT pg_current_xact_id(),
        UNIQUE (chain, seq)
    )",
        "CREATE INDEX events_kind ON events (kind, pos)",
        "CREATE INDEX events_xid ON events (xid)",
        // Exactly once across daemons, whoever sweeps: one `expired` per credential, one
        // removal per placed deny. A duplicate fails its batch; the sweep finds it done.
        "CREATE UNIQUE INDEX events_expired_once ON events (((body::jsonb) ->> 'credential_id')) WHERE kind = 'expired'",
        "CREATE UNIQUE INDEX events_deny_removed_once ON events (((body::jsonb) ->> 'placed_in_chain'), ((body::jsonb) ->> 'placed_in'), ((body::jsonb) ->> 'role'), ((body::jsonb) ->> 'policy_name')) WHERE kind = 'aws_deny_removed'",
        "CREATE TABLE credentials (
        id TEXT PRIMARY KEY,
        kind TEXT NOT NULL,
        identity TEXT NOT NULL,
        serial TEXT NOT NULL,
        fingerprint TEXT NOT NULL,
        not_before BIGINT NOT NULL,
        not_after BIGINT NOT NULL,
        decision_id BIGINT NOT NULL,
        chain TEXT NOT NULL,
        issued_event BIGINT NOT NULL,
        FOREIGN KEY (chain, issued_event) REFERENCES events (chain, seq)
    )",
        "CREATE INDEX credentials_identity ON credentials (identity)",
        "CREATE INDEX credentials_not_after ON credentials (not_after, id)",
        "CREATE TABLE seen_tokens (key TEXT PRIMARY KEY, expires_ms BIGINT NOT NULL)",
        "CREATE INDEX seen_tokens_expiry ON seen_tokens (expires_ms)",
        "CREATE TABLE releases (version TEXT PRIMARY KEY, bundle BYTEA NOT NULL, stored_ms BIGINT NOT NULL)",
        "CREATE TABLE break_glass_requests (
        id TEXT PRIMARY KEY,
        chain TEXT NOT NULL,
        requester_uid BIGINT NOT NULL,
        identity TEXT NOT NULL,
        decision_id BIGINT NOT NULL,
        reason TEXT NOT NULL,
        ticket TEXT NOT NULL,
        requested_ms BIGINT NOT NULL,
        expires_ms BIGINT NOT NULL,
        approved_by TEXT
    )",
    ],
    &[
        // 2: the break-glass flag in the credential table (an `issued` event's detail until
        // now), behind a partial index: start-up rebuilds the flagged set from the few
        // flagged rows instead of reading every `issued` event of every chain.
        "ALTER TABLE credentials ADD COLUMN break_glass BOOLEAN NOT NULL DEFAULT FALSE",
        "UPDATE credentials c SET break_glass = TRUE FROM events e
           WHERE e.chain = c.chain AND e.seq = c.issued_event AND e.kind = 'issued'
             AND (e.body::jsonb ->> 'break_glass') = 'true'",
        "CREATE INDEX credentials_break_glass ON credentials (issued_event) WHERE break_glass",
    ],
];

/// A PostgreSQL server and database: the URL (which may hold a password, so it never
/// prints) and the CA that signs the server's certificate, when TLS is required.
#[derive(Debug)]
pub struct Target {
    url: SecretString,
    /// `host:port/database`, for messages.
    shown: String,
    ca_file: Option<PathBuf>,
}

impl Target {
    pub fn new(url: &str, ca_file: Option<PathBuf>) -> Result<Self, String> {
        let options = PgConnectOptions::from_str(url).map_err(|e| format!("not a PostgreSQL URL: {e}"))?;
        let shown = format!(
            "postgres://{}:{}/{}",
            options.get_host(),
            options.get_port(),
            options.get_database().unwrap_or_default()
        );
        Ok(Self { url: SecretString::new(url.to_owned()), shown, ca_file })
    }

    fn options(&self) -> Result<PgConnectOptions, LedgerError> {
        let mut options = PgConnectOptions::from_str(self.url.expose()).map_err(storage)?;
        if let Some(ca) = &self.ca_file {
            options = options.ssl_mode(PgSslMode::VerifyFull).ssl_root_cert(ca);
        }
        Ok(options.application_name("mayfly"))
    }
}

impl Clone for Target {
    fn clone(&self) -> Self {
        Self {
            url: SecretString::new(self.url.expose().to_owned()),
            shown: self.shown.clone(),
            ca_file: self.ca_file.clone(),
        }
    }
}

impl PartialEq for Target {
    fn eq(&self, other: &Self) -> bool {
        self.url.expose() == other.url.expose() && self.ca_file == other.ca_file
    }
}

impl Eq for Target {}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.shown)
    }
}

fn storage(e: impl fmt::Display) -> LedgerError {
    LedgerError::Storage(e.to_string())
}

/// Connects, migrates, claims `settings.chain` and returns the writer's backend, a reader
/// and what is shared with the other daemons.
pub async fn open(target: &Target, settings: &Settings) -> Result<(PgBackend, PgReader, Shared), LedgerError> {
    if settings.chain.is_empty() {
        return Err(LedgerError::Storage("a shared ledger needs a chain name for this daemon (ledger.chain)".into()));
    }
    let options = target.options()?;
    let pool = PgPoolOptions::new()
        .max_connections(settings.pool_size.max(2))
        .acquire_timeout(settings.busy_timeout.max(Duration::from_secs(1)))
        .connect_with(options.clone())
        .await
        .map_err(storage)?;
    migrate(&pool).await?;
    // Why a connection of its own: the advisory lock lives as long as the session, so the
    // chain stays claimed while this daemon runs and is released when it dies.
    let mut claim = PgConnection::connect_with(&options).await.map_err(storage)?;
    let claimed: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock(hashtextextended('mayfly-chain:' || $1, 0))")
        .bind(&settings.chain)
        .fetch_one(&mut claim)
        .await
        .map_err(storage)?;
    if !claimed {
        return Err(LedgerError::Storage(format!(
            "chain `{}` is in use by another running daemon; give each daemon its own ledger.chain",
            settings.chain
        )));
    }
    let low = snapshot_xmin(&pool).await?;
    let shared = Shared {
        pool: pool.clone(),
        options,
        chain: settings.chain.clone(),
        low: Arc::new(tokio::sync::Mutex::new(low)),
        fresh_ms: Arc::new(AtomicI64::new(now_ms())),
        max_staleness: settings.max_staleness,
        _claim: Arc::new(tokio::sync::Mutex::new(claim)),
    };
    Ok((
        PgBackend { pool: pool.clone(), chain: settings.chain.clone() },
        PgReader { pool, break_glass: "c.break_glass" },
        shared,
    ))
}

/// A writer for `mayfly ledger migrate`: the schema made current, `chain` not claimed by a
/// running daemon (the copy must not interleave with one).
pub async fn migration_backend(target: &Target, chain: &str) -> Result<PgBackend, LedgerError> {
    let pool = PgPoolOptions::new().max_connections(2).connect_with(target.options()?).await.map_err(storage)?;
    migrate(&pool).await?;
    let free: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock(hashtextextended('mayfly-chain:' || $1, 0))")
        .bind(chain)
        .fetch_one(&pool)
        .await
        .map_err(storage)?;
    if !free {
        return Err(LedgerError::Storage(format!("chain `{chain}` is in use by a running daemon")));
    }
    Ok(PgBackend { pool, chain: chain.to_owned() })
}

/// Applies the migrations this database lacks; refuses a newer schema.
async fn migrate(pool: &PgPool) -> Result<(), LedgerError> {
    let mut tx = pool.begin().await.map_err(storage)?;
    // Why: daemons starting together must not both create the tables.
    sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended('mayfly-migrate', 0))")
        .execute(&mut *tx)
        .await
        .map_err(storage)?;
    sqlx::query(
        "CREATE TABLE IF NOT EXISTS mayfly_schema (only_row BOOLEAN PRIMARY KEY DEFAULT TRUE CHECK (only_row), version INTEGER NOT NULL)",
    )
    .execute(&mut *tx)
    .await
    .map_err(storage)?;
    let current: Option<i32> =
        sqlx::query_scalar("SELECT version FROM mayfly_schema").fetch_optional(&mut *tx).await.map_err(storage)?;
    let current = current.unwrap_or(0);
    if current > SCHEMA_VERSION {
        return Err(LedgerError::Storage(format!(
            "the ledger's schema is version {current}, newer than this mayfly knows ({SCHEMA_VERSION}): upgrade mayfly, do not run an older one against it"
        )));
    }
    for (index, steps) in MIGRATIONS.iter().enumerate().skip(usize::try_from(current).unwrap_or(0)) {
        for step in *steps {
            sqlx::query(*step).execute(&mut *tx).await.map_err(|e| storage(format!("migration {}: {e}", index + 1)))?;
        }
    }
    sqlx::query("INSERT INTO mayfly_schema (version) VALUES ($1) ON CONFLICT (only_row) DO UPDATE SET version = $1")
        .bind(SCHEMA_VERSION)
        .execute(&mut *tx)
        .await
        .map_err(storage)?;
    tx.commit().await.map_err(storage)
}

/// The oldest transaction still running: everything below it is final.
async fn snapshot_xmin(pool: &PgPool) -> Result<String, LedgerError> {
    sqlx::query_scalar("SELECT pg_snapshot_xmin(pg_current_snapshot())::text").fetch_one(pool).await.map_err(storage)
}

fn now_ms() -> i64 {
    i64::try_from(SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().as_millis())
        .unwrap_or(i64::MAX)
}

/// The writer's side: appends this daemon's chain.
pub struct PgBackend {
    pool: PgPool,
    chain: String,
}

impl Backend for PgBackend {
    async fn head(&mut self) -> Result<Option<(EventId, String)>, LedgerError> {
        let row = sqlx::query("SELECT seq, hash FROM events WHERE chain = $1 ORDER BY seq DESC LIMIT 1")
            .bind(&self.chain)
            .fetch_optional(&self.pool)
            .await
            .map_err(storage)?;
        row.map(|r| Ok((r.try_get("seq").map_err(storage)?, r.try_get("hash").map_err(storage)?))).transpose()
    }

    async fn append(
        &mut self,
        events: &[StoredEvent],
        credentials: &[(EventId, CredentialRecord)],
    ) -> Result<(), LedgerError> {
        // Why one statement: it is atomic by itself (an implicit transaction), so a batch
        // costs one round trip and one commit instead of BEGIN, two INSERTs, COMMIT. The
        // credential rows' foreign key is checked at the statement's end, when the events
        // inserted beside them are visible.
        let col = |f: fn(&StoredEvent) -> String| events.iter().map(f).collect::<Vec<String>>();
        let c = |f: fn(&CredentialRecord) -> String| credentials.iter().map(|(_, c)| f(c)).collect::<Vec<String>>();
        let n = |f: fn(&CredentialRecord) -> i64| credentials.iter().map(|(_, c)| f(c)).collect::<Vec<i64>>();
        // A wake-up only (the feed reads the table): rare, so the commit-time lock it takes
        // costs nothing on the issuance path.
        let notify = events.iter().any(|e| SHARED_KINDS.iter().any(|k| k.as_str() == e.kind));
        sqlx::query(
            "WITH ev AS (
               INSERT INTO events (chain, seq, at_ms, kind, body, prev_hash, hash)
               SELECT $1, * FROM UNNEST($2::BIGINT[], $3::BIGINT[], $4::TEXT[], $5::TEXT[], $6::TEXT[], $7::TEXT[])
               RETURNING 1
             ), cr AS (
               INSERT INTO credentials (id, kind, identity, serial, fingerprint, not_before, not_after, decision_id, chain, issued_event, break_glass)
               SELECT id, kind, identity, serial, fingerprint, not_before, not_after, decision_id, $1, issued_event, break_glass
               FROM UNNEST($8::TEXT[], $9::TEXT[], $10::TEXT[], $11::TEXT[], $12::TEXT[], $13::BIGINT[], $14::BIGINT[], $15::BIGINT[], $16::BIGINT[], $19::BOOLEAN[])
                 AS t(id, kind, identity, serial, fingerprint, not_before, not_after, decision_id, issued_event, break_glass)
               RETURNING 1
             )
             SELECT (SELECT count(*) FROM ev), (SELECT count(*) FROM cr),
                    CASE WHEN $17 THEN pg_notify($18, $1) END",
        )
        .bind(&self.chain)
        .bind(events.iter().map(|e| e.seq).collect::<Vec<i64>>())
        .bind(events.iter().map(|e| e.at_ms).collect::<Vec<i64>>())
        .bind(col(|e| e.kind.clone()))
        .bind(col(|e| e.body.clone()))
        .bind(col(|e| e.prev_hash.clone()))
        .bind(col(|e| e.hash.clone()))
        .bind(c(|c| c.id.clone()))
        .bind(c(|c| c.kind.clone()))
        .bind(c(|c| c.identity.clone()))
        .bind(c(|c| c.serial.clone()))
        .bind(c(|c| c.fingerprint.clone()))
        .bind(n(|c| c.not_before))
        .bind(n(|c| c.not_after))
        .bind(n(|c| c.decision_id))
        .bind(credentials.iter().map(|(seq, _)| *seq).collect::<Vec<i64>>())
        .bind(notify)
        .bind(CHANNEL)
        .bind(credentials.iter().map(|(_, c)| c.break_glass).collect::<Vec<bool>>())
        .execute(&self.pool)
        .await
        .map(|_| ())
        .map_err(storage)
    }

    async fn close(self) -> Result<(), LedgerError> {
        // The pool is shared with the reader; it closes when the last handle goes.
        Ok(())
    }
}

/// Every read of the shared ledger.
pub struct PgReader {
    pool: PgPool,
    /// The SQL for a credential row's break-glass flag: its column, or for a database
    /// before schema 2 (no daemon of this release has started on it), its event's detail.
    break_glass: &'static str,
}

impl PgReader {
    pub async fn connect(target: &Target) -> Result<Self, LedgerError> {
        let pool = PgPoolOptions::new()
            .max_connections(4)
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(target.options()?)
            .await
            .map_err(storage)?;
        let version: Option<i32> = sqlx::query_scalar("SELECT version FROM mayfly_schema")
            .fetch_optional(&pool)
            .await
            .map_err(|e| LedgerError::Storage(format!("`{target}` holds no mayfly ledger (no schema version): {e}")))?;
        match version {
            Some(v) if v > SCHEMA_VERSION => Err(LedgerError::Storage(format!(
                "the ledger's schema is version {v}, newer than this mayfly knows ({SCHEMA_VERSION})"
            ))),
            Some(v) => {
                let break_glass = if v >= 2 {
                    "c.break_glass"
                } else {
                    "COALESCE((e.body::jsonb ->> 'break_glass') = 'true', FALSE)"
                };
                Ok(Self { pool, break_glass })
            }
            None => Err(LedgerError::Missing(target.to_string())),
        }
    }

    async fn select_events(&self, f: EventFilter) -> Result<Vec<StoredEvent>, LedgerError> {
        let newest_first = f.last.is_some();
        let sql = format!(
            "SELECT pos, chain, seq, at_ms, kind, body, prev_hash, hash FROM events
             WHERE pos > $1 AND ($2::TEXT IS NULL OR chain = $2) AND ($3::BIGINT IS NULL OR at_ms >= $3)
               AND (cardinality($4::TEXT[]) = 0 OR kind = ANY($4))
             ORDER BY pos {} LIMIT $5",
            if newest_first { "DESC" } else { "ASC" }
        );
        let kinds: Vec<&str> = f.kinds.iter().map(|k| k.as_str()).collect();
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(f.after)
            .bind(f.chain)
            .bind(f.since_ms)
            .bind(kinds)
            .bind(f.last.or(f.limit).unwrap_or(i64::MAX))
            .fetch_all(&self.pool)
            .await
            .map_err(storage)?;
        let mut events = rows.iter().map(event_row).collect::<Result<Vec<_>, sqlx::Error>>().map_err(storage)?;
        if newest_first {
            events.reverse();
        }
        Ok(events)
    }

    async fn select_by_seq(&self, chain: &str, seqs: &[EventId]) -> Result<HashMap<EventId, StoredEvent>, LedgerError> {
        let rows = sqlx::query(
            "SELECT pos, chain, seq, at_ms, kind, body, prev_hash, hash FROM events WHERE chain = $1 AND seq = ANY($2)",
        )
        .bind(chain)
        .bind(seqs)
        .fetch_all(&self.pool)
        .await
        .map_err(storage)?;
        rows.iter().map(|r| event_row(r).map(|e| (e.seq, e))).collect::<Result<_, sqlx::Error>>().map_err(storage)
    }

    async fn select_credentials(&self, f: CredentialFilter) -> Result<Vec<CredentialRow>, LedgerError> {
        let flag = self.break_glass;
        let columns = format!(
            "SELECT c.id, c.kind, c.identity, c.serial, c.fingerprint, c.not_before, c.not_after, c.decision_id, c.chain, c.issued_event, {flag} AS break_glass FROM credentials c JOIN events e ON e.chain = c.chain AND e.seq = c.issued_event"
        );
        let rows = match f {
            CredentialFilter::All => {
                sqlx::query(sqlx::AssertSqlSafe(format!("{columns} ORDER BY e.pos"))).fetch_all(&self.pool).await
            }
            CredentialFilter::ActiveAt(now) => {
                sqlx::query(sqlx::AssertSqlSafe(format!("{columns} WHERE c.not_after > $1 ORDER BY e.pos")))
                    .bind(now)
                    .fetch_all(&self.pool)
                    .await
            }
            CredentialFilter::Expiring { after, until, limit } => {
                sqlx::query(sqlx::AssertSqlSafe(format!(
                    "{columns} WHERE (c.not_after, c.id) > ($1, $2) AND c.not_after <= $3 ORDER BY c.not_after, c.id LIMIT $4"
                )))
                .bind(after.0)
                .bind(after.1)
                .bind(until)
                .bind(limit)
                .fetch_all(&self.pool)
                .await
            }
            CredentialFilter::BreakGlass => {
                sqlx::query(sqlx::AssertSqlSafe(format!("{columns} WHERE {flag} ORDER BY e.pos")))
                    .fetch_all(&self.pool)
                    .await
            }
        }
        .map_err(storage)?;
        rows.iter()
            .map(|r| {
                Ok(CredentialRow {
                    chain: r.try_get("chain")?,
                    issued_event: r.try_get("issued_event")?,
                    credential: CredentialRecord {
                        id: r.try_get("id")?,
                        kind: r.try_get("kind")?,
                        identity: r.try_get("identity")?,
                        serial: r.try_get("serial")?,
                        fingerprint: r.try_get("fingerprint")?,
                        not_before: r.try_get("not_before")?,
                        not_after: r.try_get("not_after")?,
                        decision_id: r.try_get("decision_id")?,
                        break_glass: r.try_get("break_glass")?,
                    },
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(storage)
    }
}

impl LedgerRead for PgReader {
    fn chains(&self) -> BoxFuture<'_, Result<Vec<String>, LedgerError>> {
        Box::pin(async move {
            sqlx::query_scalar("SELECT DISTINCT chain FROM events ORDER BY chain")
                .fetch_all(&self.pool)
                .await
                .map_err(storage)
        })
    }

    fn events(&self, filter: EventFilter) -> BoxFuture<'_, Result<Vec<StoredEvent>, LedgerError>> {
        Box::pin(self.select_events(filter))
    }

    fn events_by_seq<'a>(
        &'a self,
        chain: &'a str,
        seqs: &'a [EventId],
    ) -> BoxFuture<'a, Result<HashMap<EventId, StoredEvent>, LedgerError>> {
        Box::pin(self.select_by_seq(chain, seqs))
    }

    fn credentials(&self, filter: CredentialFilter) -> BoxFuture<'_, Result<Vec<CredentialRow>, LedgerError>> {
        Box::pin(self.select_credentials(filter))
    }
}

fn event_row(r: &PgRow) -> Result<StoredEvent, sqlx::Error> {
    Ok(StoredEvent {
        chain: r.try_get("chain")?,
        pos: r.try_get("pos")?,
        seq: r.try_get("seq")?,
        at_ms: r.try_get("at_ms")?,
        kind: r.try_get("kind")?,
        body: r.try_get("body")?,
        prev_hash: r.try_get("prev_hash")?,
        hash: r.try_get("hash")?,
    })
}

/// A break-glass request as other daemons see it while it waits for approval.
#[derive(Clone, Debug)]
pub struct SharedRequest {
    pub id: String,
    pub chain: String,
    pub requester_uid: u32,
    pub identity: String,
    pub decision_id: EventId,
    pub reason: String,
    pub ticket: String,
    pub requested_at: SystemTime,
    pub expires_at: SystemTime,
    /// The approver, as recorded (JSON of the operator), once approved.
    pub approved_by: Option<String>,
}

/// What this daemon shares with the others through the database.
#[derive(Clone)]
pub struct Shared {
    pool: PgPool,
    options: PgConnectOptions,
    chain: String,
    /// The feed's position: every transaction below it has been read.
    low: Arc<tokio::sync::Mutex<String>>,
    /// When the feed last read the database (Unix ms).
    fresh_ms: Arc<AtomicI64>,
    max_staleness: Duration,
    /// Holds the chain's advisory lock for the daemon's life.
    _claim: Arc<tokio::sync::Mutex<PgConnection>>,
}

impl Shared {
    pub fn chain(&self) -> &str {
        &self.chain
    }

    /// How old this daemon's view of the shared state is; `Err` past `ledger.max_staleness`.
    pub fn check_fresh(&self) -> Result<(), Duration> {
        let age = Duration::from_millis(u64::try_from(now_ms() - self.fresh_ms.load(Ordering::Relaxed)).unwrap_or(0));
        if age > self.max_staleness { Err(age) } else { Ok(()) }
    }

    /// Accepts `key` once across every daemon until `until`: one unique insert, which
    /// affects exactly one row the first time. Old keys are pruned on the way.
    pub async fn first_use(&self, key: &str, until: SystemTime) -> Result<bool, LedgerError> {
        let until_ms = i64::try_from(until.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().as_millis())
            .unwrap_or(i64::MAX);
        // Why a digest: fixed length, no NUL (which TEXT refuses), and no jti in the table.
        let key = hex::encode(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, key.as_bytes()));
        let inserted = sqlx::query(
            "INSERT INTO seen_tokens (key, expires_ms) VALUES ($1, $2) ON CONFLICT (key) DO UPDATE SET expires_ms = $2 WHERE seen_tokens.expires_ms < $3",
        )
        .bind(key)
        .bind(until_ms)
        .bind(now_ms())
        .execute(&self.pool)
        .await
        .map_err(storage)?
        .rows_affected();
        Ok(inserted == 1)
    }

    /// Drops replay keys whose tokens have expired.
    pub async fn prune_seen(&self) -> Result<u64, LedgerError> {
        Ok(sqlx::query("DELETE FROM seen_tokens WHERE expires_ms < $1")
            .bind(now_ms())
            .execute(&self.pool)
            .await
            .map_err(storage)?
            .rows_affected())
    }

    /// Keeps a release's bundle so every daemon can activate the same version.
    pub async fn put_release(&self, version: &str, bundle: &[u8]) -> Result<(), LedgerError> {
        sqlx::query(
            "INSERT INTO releases (version, bundle, stored_ms) VALUES ($1, $2, $3) ON CONFLICT (version) DO NOTHING",
        )
        .bind(version)
        .bind(bundle)
        .bind(now_ms())
        .execute(&self.pool)
        .await
        .map_err(storage)?;
        Ok(())
    }

    pub async fn release(&self, version: &str) -> Result<Option<Vec<u8>>, LedgerError> {
        sqlx::query_scalar("SELECT bundle FROM releases WHERE version = $1")
            .bind(version)
            .fetch_optional(&self.pool)
            .await
            .map_err(storage)
    }

    pub async fn put_request(&self, r: &SharedRequest) -> Result<(), LedgerError> {
        sqlx::query(
            "INSERT INTO break_glass_requests (id, chain, requester_uid, identity, decision_id, reason, ticket, requested_ms, expires_ms)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
        )
        .bind(&r.id)
        .bind(&r.chain)
        .bind(i64::from(r.requester_uid))
        .bind(&r.identity)
        .bind(r.decision_id)
        .bind(&r.reason)
        .bind(&r.ticket)
        .bind(ms(r.requested_at))
        .bind(ms(r.expires_at))
        .execute(&self.pool)
        .await
        .map_err(storage)?;
        Ok(())
    }

    pub async fn request(&self, id: &str) -> Result<Option<SharedRequest>, LedgerError> {
        let row = sqlx::query("SELECT * FROM break_glass_requests WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await
            .map_err(storage)?;
        row.map(|r| request_row(&r).map_err(storage)).transpose()
    }

    /// Pending requests of every daemon (not approved, not expired).
    pub async fn pending_requests(&self, now: SystemTime) -> Result<Vec<SharedRequest>, LedgerError> {
        let rows = sqlx::query(
            "SELECT * FROM break_glass_requests WHERE approved_by IS NULL AND expires_ms > $1 ORDER BY requested_ms",
        )
        .bind(ms(now))
        .fetch_all(&self.pool)
        .await
        .map_err(storage)?;
        rows.iter().map(|r| request_row(r).map_err(storage)).collect()
    }

    /// Marks a request approved, once: `false` when it already was or has expired.
    pub async fn approve_request(&self, id: &str, approver: &str, now: SystemTime) -> Result<bool, LedgerError> {
        let n = sqlx::query(
            "UPDATE break_glass_requests SET approved_by = $2 WHERE id = $1 AND approved_by IS NULL AND expires_ms > $3",
        )
        .bind(id)
        .bind(approver)
        .bind(ms(now))
        .execute(&self.pool)
        .await
        .map_err(storage)?
        .rows_affected();
        Ok(n == 1)
    }

    /// Follows the other daemons' chains until `stop`: each batch of their shared-state
    /// events, in commit order, goes to `tx`. Every successful read (even an empty one)
    /// refreshes this daemon's view; a failed one leaves it to age.
    pub async fn follow(self, tx: mpsc::Sender<Vec<StoredEvent>>, mut stop: watch::Receiver<bool>) {
        let mut listener: Option<PgListener> = None;
        loop {
            if listener.is_none() {
                listener = match PgListener::connect_with(&self.pool).await {
                    Ok(mut l) => match l.listen(CHANNEL).await {
                        Ok(()) => Some(l),
                        Err(e) => {
                            tracing::debug!(error = %e, "feed: LISTEN failed; polling");
                            None
                        }
                    },
                    Err(e) => {
                        tracing::debug!(error = %e, "feed: no listener connection; polling");
                        None
                    }
                };
            }
            match self.read_feed().await {
                Ok(batch) => {
                    self.fresh_ms.store(now_ms(), Ordering::Relaxed);
                    if !batch.is_empty() && tx.send(batch).await.is_err() {
                        return;
                    }
                }
                Err(e) => tracing::warn!(error = %e, "shared ledger unreachable; this daemon's view is ageing"),
            }
            let woken = async {
                match listener.as_mut() {
                    Some(l) => l.recv().await.map(|_| ()).map_err(|e| e.to_string()),
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                r = woken => if let Err(e) = r {
                    tracing::debug!(error = %e, "feed: listener lost; reconnecting");
                    listener = None;
                },
                () = tokio::time::sleep(FEED_POLL) => {}
                _ = stop.wait_for(|s| *s) => return,
            }
        }
    }

    /// Other chains' shared-state events of every transaction now final, in commit order.
    async fn read_feed(&self) -> Result<Vec<StoredEvent>, LedgerError> {
        let mut low = self.low.lock().await;
        let kinds: Vec<&str> = SHARED_KINDS.iter().map(|k| k.as_str()).collect();
        let mut tx = self.pool.begin().await.map_err(storage)?;
        let xmin: String = sqlx::query_scalar("SELECT pg_snapshot_xmin(pg_current_snapshot())::text")
            .fetch_one(&mut *tx)
            .await
            .map_err(storage)?;
        let rows = sqlx::query(
            "SELECT pos, chain, seq, at_ms, kind, body, prev_hash, hash FROM events
             WHERE xid >= $1::xid8 AND xid < $2::xid8 AND chain <> $3 AND kind = ANY($4)
             ORDER BY xid, pos",
        )
        .bind(low.as_str())
        .bind(&xmin)
        .bind(&self.chain)
        .bind(kinds)
        .fetch_all(&mut *tx)
        .await
        .map_err(storage)?;
        tx.commit().await.map_err(storage)?;
        let events = rows.iter().map(event_row).collect::<Result<Vec<_>, sqlx::Error>>().map_err(storage)?;
        *low = xmin;
        Ok(events)
    }

    /// A connection of its own, for work that must hold a session (the sweeps' leader lock).
    pub async fn session(&self) -> Result<PgConnection, LedgerError> {
        PgConnection::connect_with(&self.options).await.map_err(storage)
    }
}

fn ms(t: SystemTime) -> i64 {
    i64::try_from(t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().as_millis()).unwrap_or(i64::MAX)
}

fn request_row(r: &PgRow) -> Result<SharedRequest, sqlx::Error> {
    let at = |name: &str| -> Result<SystemTime, sqlx::Error> {
        let v: i64 = r.try_get(name)?;
        Ok(SystemTime::UNIX_EPOCH + Duration::from_millis(v.max(0).unsigned_abs()))
    };
    let uid: i64 = r.try_get("requester_uid")?;
    Ok(SharedRequest {
        id: r.try_get("id")?,
        chain: r.try_get("chain")?,
        requester_uid: u32::try_from(uid).unwrap_or(u32::MAX),
        identity: r.try_get("identity")?,
        decision_id: r.try_get("decision_id")?,
        reason: r.try_get("reason")?,
        ticket: r.try_get("ticket")?,
        requested_at: at("requested_ms")?,
        expires_at: at("expires_ms")?,
        approved_by: r.try_get("approved_by")?,
    })
}

/// A fresh database on the test server named by `MAYFLY_TEST_POSTGRES` (a URL whose user may
/// create databases; `integration/postgres start DIR` prints one), or `None` — said loudly —
/// when it is not set. With `MAYFLY_REQUIRE_POSTGRES=1` (as `.ci/run` sets) a missing server
/// is a failure, not a skip.
#[cfg(any(test, feature = "test-support"))]
pub async fn test_database() -> Option<(Target, String)> {
    let Ok(url) = std::env::var("MAYFLY_TEST_POSTGRES") else {
        assert!(
            std::env::var("MAYFLY_REQUIRE_POSTGRES").is_err(),
            "MAYFLY_REQUIRE_POSTGRES is set but MAYFLY_TEST_POSTGRES is not"
        );
        eprintln!("SKIPPED: set MAYFLY_TEST_POSTGRES to a PostgreSQL URL (integration/postgres start DIR prints one)");
        return None;
    };
    let name = format!("mayfly_test_{}", uuid::Uuid::new_v4().simple());
    let mut admin = PgConnection::connect(&url).await.unwrap_or_else(|e| panic!("MAYFLY_TEST_POSTGRES: {e}"));
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&mut admin)
        .await
        .unwrap_or_else(|e| panic!("create a test database: {e}"));
    let base = url.rsplit_once('/').map_or(url.as_str(), |(b, _)| b);
    let target = Target::new(&format!("{base}/{name}"), None).unwrap_or_else(|e| panic!("{e}"));
    Some((target, name))
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Postgres {
        pool: PgPool,
        target: Target,
    }

    impl crate::ledger::contract::Harness for Postgres {
        type Backend = PgBackend;

        async fn backend(&self) -> PgBackend {
            PgBackend { pool: self.pool.clone(), chain: "contract".into() }
        }

        async fn reader(&self) -> Result<Arc<dyn LedgerRead>, LedgerError> {
            Ok(Arc::new(PgReader::connect(&self.target).await?))
        }
    }

    async fn migrated(target: &Target) -> PgPool {
        let pool = PgPoolOptions::new().max_connections(4).connect_with(target.options().unwrap()).await.unwrap();
        migrate(&pool).await.unwrap();
        pool
    }

    #[tokio::test]
    async fn the_postgres_backend_keeps_the_ledger_contract() {
        let Some((target, _)) = test_database().await else { return };
        let pool = migrated(&target).await;
        crate::ledger::contract::run(Postgres { pool, target }).await;
    }

    #[tokio::test]
    async fn a_schema_newer_than_this_build_is_refused_and_a_chain_is_claimed_once() {
        let Some((target, _)) = test_database().await else { return };
        let pool = migrated(&target).await;
        migrate(&pool).await.expect("migrating twice is a no-op");
        let settings =
            Settings { chain: "a".into(), ..Settings::local(crate::ledger::Location::Postgres(target.clone())) };
        let (_backend, _reader, shared) = open(&target, &settings).await.unwrap();
        let again = open(&target, &settings).await.err().expect("a second daemon on chain `a`");
        assert!(again.to_string().contains("in use by another running daemon"), "{again}");
        drop(shared);
        sqlx::query("UPDATE mayfly_schema SET version = $1").bind(SCHEMA_VERSION + 1).execute(&pool).await.unwrap();
        let newer = migrate(&pool).await.unwrap_err().to_string();
        assert!(newer.contains("newer than this mayfly knows"), "{newer}");
    }

    #[tokio::test]
    async fn migration_2_flags_the_break_glass_credentials_a_schema_1_ledger_holds() {
        let Some((target, _)) = test_database().await else { return };
        let pool = PgPoolOptions::new().max_connections(2).connect_with(target.options().unwrap()).await.unwrap();
        sqlx::query("CREATE TABLE mayfly_schema (only_row BOOLEAN PRIMARY KEY DEFAULT TRUE CHECK (only_row), version INTEGER NOT NULL)")
            .execute(&pool)
            .await
            .unwrap();
        for step in MIGRATIONS[0] {
            sqlx::query(*step).execute(&pool).await.unwrap();
        }
        sqlx::query("INSERT INTO mayfly_schema (version) VALUES (1)").execute(&pool).await.unwrap();
        // Two issuances as schema 1 stored them: the flag only in the emergency one's body.
        let bodies = [
            (
                "c-normal",
                r#"{"id":"c-normal","kind":"x509","identity":"spiffe://t/a","serial":"01","fingerprint":"f","not_before":1,"not_after":2,"decision_id":1}"#,
            ),
            (
                "c-emergency",
                r#"{"id":"c-emergency","kind":"x509","identity":"spiffe://t/a","serial":"02","fingerprint":"f","not_before":1,"not_after":2,"decision_id":1,"break_glass":true,"ticket":"INC-1"}"#,
            ),
        ];
        for (seq, (id, body)) in (1_i64..).zip(bodies) {
            sqlx::query("INSERT INTO events (chain, seq, at_ms, kind, body, prev_hash, hash) VALUES ('a', $1, 1, 'issued', $2, 'p', 'h')")
                .bind(seq)
                .bind(body)
                .execute(&pool)
                .await
                .unwrap();
            sqlx::query("INSERT INTO credentials VALUES ($1, 'x509', 'spiffe://t/a', $2, 'f', 1, 2, 1, 'a', $3)")
                .bind(id)
                .bind(format!("0{seq}"))
                .bind(seq)
                .execute(&pool)
                .await
                .unwrap();
        }
        // Read before any migration (a newer `audit verify`): the flag comes from the events.
        let unmigrated = PgReader::connect(&target).await.unwrap();
        let flagged = unmigrated.credentials(CredentialFilter::BreakGlass).await.unwrap();
        assert_eq!(flagged.iter().map(|r| r.credential.id.as_str()).collect::<Vec<_>>(), ["c-emergency"]);
        migrate(&pool).await.unwrap();
        let reader = PgReader::connect(&target).await.unwrap();
        let flagged = reader.credentials(CredentialFilter::BreakGlass).await.unwrap();
        assert_eq!(flagged.iter().map(|r| r.credential.id.as_str()).collect::<Vec<_>>(), ["c-emergency"]);
        assert!(flagged[0].credential.break_glass);
        let all = reader.credentials(CredentialFilter::All).await.unwrap();
        assert!(!all[0].credential.break_glass, "the other row stays unflagged");
    }

    #[tokio::test]
    async fn a_token_is_accepted_once_across_daemons() {
        let Some((target, _)) = test_database().await else { return };
        migrated(&target).await;
        let a = Settings { chain: "a".into(), ..Settings::local(crate::ledger::Location::Postgres(target.clone())) };
        let b = Settings { chain: "b".into(), ..a.clone() };
        let (_, _, on_a) = open(&target, &a).await.unwrap();
        let (_, _, on_b) = open(&target, &b).await.unwrap();
        let until = SystemTime::now() + Duration::from_secs(300);
        assert!(on_a.first_use("iss\0jti-1", until).await.unwrap());
        assert!(!on_b.first_use("iss\0jti-1", until).await.unwrap(), "replayed to another daemon");
        assert!(on_b.first_use("iss\0jti-2", until).await.unwrap());
        // An expired key no longer blocks (its token cannot verify any more anyway).
        assert!(on_a.first_use("iss\0old", SystemTime::now() - Duration::from_secs(1)).await.unwrap());
        assert!(on_b.first_use("iss\0old", until).await.unwrap());
    }

    #[tokio::test]
    async fn the_feed_delivers_other_chains_shared_events_in_commit_order_and_skips_none() {
        let Some((target, _)) = test_database().await else { return };
        migrated(&target).await;
        let a = Settings { chain: "a".into(), ..Settings::local(crate::ledger::Location::Postgres(target.clone())) };
        let b = Settings { chain: "b".into(), ..a.clone() };
        let (backend_a, _, _shared_a) = open(&target, &a).await.unwrap();
        let (_, _, shared_b) = open(&target, &b).await.unwrap();
        let (writer, _task) = crate::ledger::GroupCommitLedger::start(backend_a, 16).await.unwrap();
        // A transaction that starts first and commits last must still be delivered.
        let pool = PgPoolOptions::new().max_connections(2).connect_with(target.options().unwrap()).await.unwrap();
        let mut late = pool.begin().await.unwrap();
        sqlx::query("INSERT INTO events (chain, seq, at_ms, kind, body, prev_hash, hash) VALUES ('c', 1, 0, 'locked', '{}', '', '')")
            .execute(&mut *late)
            .await
            .unwrap();
        let lock = crate::ledger::event::Event::Unlocked(crate::ledger::event::Unlocked {
            target: "spiffe://mayfly.local/x".into(),
            ..Default::default()
        });
        crate::ledger::Ledger::record(&writer, SystemTime::now(), lock).await.unwrap();
        let first = shared_b.read_feed().await.unwrap();
        assert!(first.is_empty(), "nothing below the running transaction is final yet: {first:?}");
        late.commit().await.unwrap();
        let mut got = Vec::new();
        for _ in 0..20 {
            got.extend(shared_b.read_feed().await.unwrap());
            if got.len() >= 2 {
                break;
            }
        }
        let kinds: Vec<(&str, &str)> = got.iter().map(|e| (e.chain.as_str(), e.kind.as_str())).collect();
        assert_eq!(kinds, [("c", "locked"), ("a", "unlocked")], "commit-safe order: by transaction id");
        assert!(shared_b.check_fresh().is_ok());
    }
}
