//! SQLite ledger backend (WAL, synchronous=FULL): one connection owned by the writer
//! task, one multi-row INSERT per table per batch; a small read-only pool answers
//! `LedgerRead` beside it (WAL lets readers run while the writer commits). The SQL is kept
//! to what PostgreSQL also accepts, apart from the `?` placeholders. The only place that
//! knows the file's name and layout.

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{AssertSqlSafe, Connection, Row, SqliteConnection};

use super::{
    Backend, BoxFuture, CredentialFilter, CredentialRecord, CredentialRow, EventFilter, EventId, LedgerError,
    LedgerRead, StoredEvent,
};

/// The ledger's file in a data directory.
pub const FILE_NAME: &str = "ledger.db";

const SCHEMA: &[&str] = &[
    "CREATE TABLE IF NOT EXISTS events (
        seq BIGINT PRIMARY KEY,
        at_ms BIGINT NOT NULL,
        kind TEXT NOT NULL,
        body TEXT NOT NULL,
        prev_hash TEXT NOT NULL,
        hash TEXT NOT NULL
    )",
    "CREATE TABLE IF NOT EXISTS credentials (
        id TEXT PRIMARY KEY,
        kind TEXT NOT NULL,
        identity TEXT NOT NULL,
        serial TEXT NOT NULL,
        fingerprint TEXT NOT NULL,
        not_before BIGINT NOT NULL,
        not_after BIGINT NOT NULL,
        decision_id BIGINT NOT NULL REFERENCES events(seq),
        issued_event BIGINT NOT NULL REFERENCES events(seq)
    )",
    "CREATE INDEX IF NOT EXISTS credentials_identity ON credentials(identity)",
    "CREATE INDEX IF NOT EXISTS credentials_not_after ON credentials(not_after)",
];

fn storage(e: impl std::fmt::Display) -> LedgerError {
    LedgerError::Storage(e.to_string())
}

pub struct SqliteBackend {
    conn: SqliteConnection,
}

impl SqliteBackend {
    /// Opens (creating if needed) the ledger database for writing.
    pub async fn open(path: &Path, busy_timeout: Duration) -> Result<Self, LedgerError> {
        let options = SqliteConnectOptions::from_str(&format!("sqlite://{}", path.display()))
            .map_err(storage)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .foreign_keys(true)
            .busy_timeout(busy_timeout);
        let mut conn = SqliteConnection::connect_with(&options).await.map_err(storage)?;
        for stmt in SCHEMA {
            sqlx::query(*stmt).execute(&mut conn).await.map_err(storage)?;
        }
        // The ledger holds no secrets, but it maps every identity and binary on the host.
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(storage)?;
        Ok(Self { conn })
    }
}

impl Backend for SqliteBackend {
    async fn head(&mut self) -> Result<Option<(EventId, String)>, LedgerError> {
        let row = sqlx::query("SELECT seq, hash FROM events ORDER BY seq DESC LIMIT 1")
            .fetch_optional(&mut self.conn)
            .await
            .map_err(storage)?;
        row.map(|r| Ok((r.try_get("seq").map_err(storage)?, r.try_get("hash").map_err(storage)?))).transpose()
    }

    async fn append(
        &mut self,
        events: &[StoredEvent],
        credentials: &[(EventId, CredentialRecord)],
    ) -> Result<(), LedgerError> {
        let mut tx = self.conn.begin().await.map_err(storage)?;
        // SQLite allows 32766 bound parameters per statement: 6 per event, 9 per credential.
        // Why AssertSqlSafe is sound: only `?` placeholders are formatted into the SQL; every
        // value is bound.
        for chunk in events.chunks(1000) {
            let sql = format!(
                "INSERT INTO events (seq, at_ms, kind, body, prev_hash, hash) VALUES {}",
                vec!["(?, ?, ?, ?, ?, ?)"; chunk.len()].join(", ")
            );
            let mut q = sqlx::query(AssertSqlSafe(sql));
            for e in chunk {
                q = q.bind(e.seq).bind(e.at_ms).bind(&e.kind).bind(&e.body).bind(&e.prev_hash).bind(&e.hash);
            }
            q.execute(&mut *tx).await.map_err(storage)?;
        }
        for chunk in credentials.chunks(1000) {
            let sql = format!(
                "INSERT INTO credentials (id, kind, identity, serial, fingerprint, not_before, not_after, decision_id, issued_event) VALUES {}",
                vec!["(?, ?, ?, ?, ?, ?, ?, ?, ?)"; chunk.len()].join(", ")
            );
            let mut q = sqlx::query(AssertSqlSafe(sql));
            for (issued, c) in chunk {
                q = q
                    .bind(&c.id)
                    .bind(&c.kind)
                    .bind(&c.identity)
                    .bind(&c.serial)
                    .bind(&c.fingerprint)
                    .bind(c.not_before)
                    .bind(c.not_after)
                    .bind(c.decision_id)
                    .bind(*issued);
            }
            q.execute(&mut *tx).await.map_err(storage)?;
        }
        tx.commit().await.map_err(storage)
    }

    async fn close(mut self) -> Result<(), LedgerError> {
        // Why: fold the WAL into the main file so the database is one self-contained file
        // after a clean stop (backups and copies of ledger.db alone are then complete).
        sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)").execute(&mut self.conn).await.map_err(storage)?;
        self.conn.close().await.map_err(storage)
    }
}

/// Read-only access: every `LedgerRead` of this backend.
pub struct SqliteReader {
    pool: SqlitePool,
}

impl SqliteReader {
    pub async fn open(path: &Path) -> Result<Self, LedgerError> {
        let shown = path.display().to_string();
        // Why not open the file to find out: closing any descriptor of a file drops every
        // POSIX lock this process holds on it — the writer's too — and SQLite would then let
        // another process reset the WAL under the daemon. `stat` and `access` open nothing.
        match std::fs::metadata(path) {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(LedgerError::Missing(shown)),
            // A directory on the way the user may not search: the ledger is there or not,
            // but this user cannot tell, and "missing" would send them looking elsewhere.
            Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
                return Err(LedgerError::PermissionDenied(shown));
            }
            Err(e) => return Err(LedgerError::Storage(format!("`{shown}`: {e}"))),
        }
        if rustix::fs::access(path, rustix::fs::Access::READ_OK).is_err() {
            return Err(LedgerError::PermissionDenied(shown));
        }
        let options =
            SqliteConnectOptions::from_str(&format!("sqlite://{}", path.display())).map_err(storage)?.read_only(true);
        let pool = SqlitePoolOptions::new().max_connections(4).connect_with(options).await.map_err(storage)?;
        Ok(Self { pool })
    }

    async fn select_events(&self, f: EventFilter) -> Result<Vec<StoredEvent>, LedgerError> {
        // One chain, the default one.
        if f.chain.as_deref().is_some_and(|c| !c.is_empty()) {
            return Ok(Vec::new());
        }
        let mut sql = String::from("SELECT seq, at_ms, kind, body, prev_hash, hash FROM events WHERE seq > ?");
        if f.since_ms.is_some() {
            sql.push_str(" AND at_ms >= ?");
        }
        if !f.kinds.is_empty() {
            sql.push_str(&format!(" AND kind IN ({})", vec!["?"; f.kinds.len()].join(", ")));
        }
        let newest_first = f.last.is_some();
        sql.push_str(if newest_first { " ORDER BY seq DESC" } else { " ORDER BY seq" });
        if f.limit.is_some() || f.last.is_some() {
            sql.push_str(" LIMIT ?");
        }
        // Why AssertSqlSafe is sound: only `?` placeholders and fixed clauses are formatted
        // into the SQL; every value is bound.
        let mut q = sqlx::query(AssertSqlSafe(sql)).bind(f.after);
        if let Some(since) = f.since_ms {
            q = q.bind(since);
        }
        for k in &f.kinds {
            q = q.bind(k.as_str());
        }
        if let Some(n) = f.last.or(f.limit) {
            q = q.bind(n);
        }
        let rows = q.fetch_all(&self.pool).await.map_err(storage)?;
        let mut events = rows.iter().map(event_row).collect::<Result<Vec<_>, sqlx::Error>>().map_err(storage)?;
        if newest_first {
            events.reverse();
        }
        Ok(events)
    }

    async fn select_by_seq(&self, seqs: &[EventId]) -> Result<HashMap<EventId, StoredEvent>, LedgerError> {
        let mut out = HashMap::new();
        for chunk in seqs.chunks(500) {
            let placeholders = vec!["?"; chunk.len()].join(", ");
            // Why AssertSqlSafe is sound: only `?` placeholders are formatted in.
            let sql =
                format!("SELECT seq, at_ms, kind, body, prev_hash, hash FROM events WHERE seq IN ({placeholders})");
            let mut query = sqlx::query(AssertSqlSafe(sql));
            for seq in chunk {
                query = query.bind(*seq);
            }
            for r in query.fetch_all(&self.pool).await.map_err(storage)? {
                let e = event_row(&r).map_err(storage)?;
                out.insert(e.seq, e);
            }
        }
        Ok(out)
    }

    async fn select_credentials(&self, f: CredentialFilter) -> Result<Vec<CredentialRow>, LedgerError> {
        const COLUMNS: &str = "SELECT id, kind, identity, serial, fingerprint, not_before, not_after, decision_id, issued_event FROM credentials";
        let rows = match f {
            CredentialFilter::All => {
                sqlx::query(AssertSqlSafe(format!("{COLUMNS} ORDER BY issued_event"))).fetch_all(&self.pool).await
            }
            CredentialFilter::ActiveAt(now) => {
                sqlx::query(AssertSqlSafe(format!("{COLUMNS} WHERE not_after > ? ORDER BY issued_event")))
                    .bind(now)
                    .fetch_all(&self.pool)
                    .await
            }
            CredentialFilter::Expiring { after, until, limit } => {
                sqlx::query(AssertSqlSafe(format!(
                    "{COLUMNS} WHERE (not_after > ? OR (not_after = ? AND id > ?)) AND not_after <= ? ORDER BY not_after, id LIMIT ?"
                )))
                .bind(after.0)
                .bind(after.0)
                .bind(after.1)
                .bind(until)
                .bind(limit)
                .fetch_all(&self.pool)
                .await
            }
        }
        .map_err(storage)?;
        rows.iter()
            .map(|r| {
                Ok(CredentialRow {
                    chain: String::new(),
                    issued_event: r.try_get("issued_event")?,
                    credential: credential_row(r)?,
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(storage)
    }
}

impl LedgerRead for SqliteReader {
    fn chains(&self) -> BoxFuture<'_, Result<Vec<String>, LedgerError>> {
        Box::pin(async { Ok(vec![String::new()]) })
    }

    fn events(&self, filter: EventFilter) -> BoxFuture<'_, Result<Vec<StoredEvent>, LedgerError>> {
        Box::pin(self.select_events(filter))
    }

    fn events_by_seq<'a>(
        &'a self,
        chain: &'a str,
        seqs: &'a [EventId],
    ) -> BoxFuture<'a, Result<HashMap<EventId, StoredEvent>, LedgerError>> {
        Box::pin(async move {
            if !chain.is_empty() {
                return Ok(HashMap::new());
            }
            self.select_by_seq(seqs).await
        })
    }

    fn credentials(&self, filter: CredentialFilter) -> BoxFuture<'_, Result<Vec<CredentialRow>, LedgerError>> {
        Box::pin(self.select_credentials(filter))
    }
}

fn event_row(r: &sqlx::sqlite::SqliteRow) -> Result<StoredEvent, sqlx::Error> {
    let seq = r.try_get("seq")?;
    Ok(StoredEvent {
        chain: String::new(),
        pos: seq,
        seq,
        at_ms: r.try_get("at_ms")?,
        kind: r.try_get("kind")?,
        body: r.try_get("body")?,
        prev_hash: r.try_get("prev_hash")?,
        hash: r.try_get("hash")?,
    })
}

fn credential_row(r: &sqlx::sqlite::SqliteRow) -> Result<CredentialRecord, sqlx::Error> {
    Ok(CredentialRecord {
        id: r.try_get("id")?,
        kind: r.try_get("kind")?,
        identity: r.try_get("identity")?,
        serial: r.try_get("serial")?,
        fingerprint: r.try_get("fingerprint")?,
        not_before: r.try_get("not_before")?,
        not_after: r.try_get("not_after")?,
        decision_id: r.try_get("decision_id")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Sqlite(tempfile::TempDir);

    impl crate::ledger::contract::Harness for Sqlite {
        type Backend = SqliteBackend;

        async fn backend(&self) -> SqliteBackend {
            SqliteBackend::open(&self.0.path().join(FILE_NAME), Duration::from_secs(5)).await.unwrap()
        }

        async fn reader(&self) -> Result<std::sync::Arc<dyn LedgerRead>, LedgerError> {
            Ok(std::sync::Arc::new(SqliteReader::open(&self.0.path().join(FILE_NAME)).await?))
        }
    }

    #[tokio::test]
    async fn the_sqlite_backend_keeps_the_ledger_contract() {
        crate::ledger::contract::run(Sqlite(tempfile::tempdir().unwrap())).await;
    }

    #[tokio::test]
    async fn a_missing_ledger_is_named_and_a_new_one_is_private() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FILE_NAME);
        let missing = SqliteReader::open(&path).await.err().unwrap();
        assert!(matches!(missing, LedgerError::Missing(_)), "{missing}");
        SqliteBackend::open(&path, Duration::from_secs(1)).await.unwrap().close().await.unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
    }
}
