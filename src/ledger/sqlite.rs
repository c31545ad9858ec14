//! SQLite ledger backend (WAL, synchronous=FULL): one connection owned by the writer
//! task, one multi-row INSERT per table per batch. The SQL is kept to what PostgreSQL also
//! accepts, apart from the `?` placeholders. Also the read side for `mayfly audit`.

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqliteSynchronous};
use sqlx::{AssertSqlSafe, Connection, Row, SqliteConnection};

use super::{Backend, CredentialRecord, EventId, LedgerError, StoredEvent};

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

/// Read-only access for `mayfly audit`.
pub struct LedgerReader {
    conn: SqliteConnection,
}

impl LedgerReader {
    pub async fn open(path: &Path) -> Result<Self, LedgerError> {
        if !path.exists() {
            return Err(LedgerError::Storage(format!("no ledger at `{}`", path.display())));
        }
        let options =
            SqliteConnectOptions::from_str(&format!("sqlite://{}", path.display())).map_err(storage)?.read_only(true);
        Ok(Self { conn: SqliteConnection::connect_with(&options).await.map_err(storage)? })
    }

    /// All events in storage order (by sequence number).
    pub async fn events(&mut self) -> Result<Vec<StoredEvent>, LedgerError> {
        self.events_after(0, i64::MAX).await
    }

    /// The last `n` events, oldest first.
    pub async fn tail(&mut self, n: i64) -> Result<Vec<StoredEvent>, LedgerError> {
        let last: Option<i64> = sqlx::query("SELECT MAX(seq) AS m FROM events")
            .fetch_one(&mut self.conn)
            .await
            .and_then(|r| r.try_get("m"))
            .map_err(storage)?;
        self.events_after(last.unwrap_or(0).saturating_sub(n), n).await
    }

    async fn events_after(&mut self, after: i64, limit: i64) -> Result<Vec<StoredEvent>, LedgerError> {
        let rows = sqlx::query(
            "SELECT seq, at_ms, kind, body, prev_hash, hash FROM events WHERE seq > ? ORDER BY seq LIMIT ?",
        )
        .bind(after)
        .bind(limit)
        .fetch_all(&mut self.conn)
        .await
        .map_err(storage)?;
        rows.iter().map(event_row).collect::<Result<_, sqlx::Error>>().map_err(storage)
    }

    /// Up to `limit` events of `kind` after sequence number `after` and at or after
    /// `since_ms`, in order: for reading a long window page by page.
    pub async fn kind_page(
        &mut self,
        kind: &str,
        after: i64,
        since_ms: i64,
        limit: i64,
    ) -> Result<Vec<StoredEvent>, LedgerError> {
        let rows = sqlx::query(
            "SELECT seq, at_ms, kind, body, prev_hash, hash FROM events WHERE kind = ? AND seq > ? AND at_ms >= ? ORDER BY seq LIMIT ?",
        )
        .bind(kind)
        .bind(after)
        .bind(since_ms)
        .bind(limit)
        .fetch_all(&mut self.conn)
        .await
        .map_err(storage)?;
        rows.iter().map(event_row).collect::<Result<_, sqlx::Error>>().map_err(storage)
    }

    /// Every event of these kinds, in order (revocation state, traces).
    pub async fn events_of_kinds(&mut self, kinds: &[&str]) -> Result<Vec<StoredEvent>, LedgerError> {
        let placeholders = vec!["?"; kinds.len()].join(", ");
        // Why AssertSqlSafe is sound: only `?` placeholders are formatted in; kinds are bound.
        let sql = format!(
            "SELECT seq, at_ms, kind, body, prev_hash, hash FROM events WHERE kind IN ({placeholders}) ORDER BY seq"
        );
        let mut query = sqlx::query(AssertSqlSafe(sql));
        for k in kinds {
            query = query.bind(*k);
        }
        let rows = query.fetch_all(&mut self.conn).await.map_err(storage)?;
        rows.iter().map(event_row).collect::<Result<_, sqlx::Error>>().map_err(storage)
    }

    /// The bodies of these events (decisions behind credentials), by sequence number.
    pub async fn bodies(
        &mut self,
        seqs: &[EventId],
    ) -> Result<std::collections::HashMap<EventId, String>, LedgerError> {
        let mut out = std::collections::HashMap::new();
        for chunk in seqs.chunks(500) {
            let placeholders = vec!["?"; chunk.len()].join(", ");
            let sql = format!("SELECT seq, body FROM events WHERE seq IN ({placeholders})");
            let mut query = sqlx::query(AssertSqlSafe(sql));
            for seq in chunk {
                query = query.bind(*seq);
            }
            for r in query.fetch_all(&mut self.conn).await.map_err(storage)? {
                out.insert(r.try_get("seq").map_err(storage)?, r.try_get("body").map_err(storage)?);
            }
        }
        Ok(out)
    }

    /// Credentials whose not-after is in `(after, until]`, ordered by (not_after, id), at
    /// most `limit`: the expiry sweep's next batch. `after` is (not_after, id) exclusive.
    pub async fn expiring(
        &mut self,
        after: (i64, &str),
        until: i64,
        limit: i64,
    ) -> Result<Vec<CredentialRecord>, LedgerError> {
        let rows = sqlx::query(
            "SELECT id, kind, identity, serial, fingerprint, not_before, not_after, decision_id FROM credentials
             WHERE (not_after > ? OR (not_after = ? AND id > ?)) AND not_after <= ?
             ORDER BY not_after, id LIMIT ?",
        )
        .bind(after.0)
        .bind(after.0)
        .bind(after.1)
        .bind(until)
        .bind(limit)
        .fetch_all(&mut self.conn)
        .await
        .map_err(storage)?;
        rows.iter().map(credential_row).collect::<Result<_, sqlx::Error>>().map_err(storage)
    }

    /// Credentials still valid at `now` (not_after after it), oldest first.
    pub async fn active(&mut self, now: i64) -> Result<Vec<CredentialRecord>, LedgerError> {
        let rows = sqlx::query(
            "SELECT id, kind, identity, serial, fingerprint, not_before, not_after, decision_id FROM credentials
             WHERE not_after > ? ORDER BY issued_event",
        )
        .bind(now)
        .fetch_all(&mut self.conn)
        .await
        .map_err(storage)?;
        rows.iter().map(credential_row).collect::<Result<_, sqlx::Error>>().map_err(storage)
    }

    /// Every credential row with the sequence number of its `issued` event.
    pub async fn credentials(&mut self) -> Result<Vec<(EventId, CredentialRecord)>, LedgerError> {
        let rows = sqlx::query(
            "SELECT id, kind, identity, serial, fingerprint, not_before, not_after, decision_id, issued_event
             FROM credentials ORDER BY issued_event",
        )
        .fetch_all(&mut self.conn)
        .await
        .map_err(storage)?;
        rows.iter()
            .map(|r| Ok((r.try_get("issued_event")?, credential_row(r)?)))
            .collect::<Result<_, sqlx::Error>>()
            .map_err(storage)
    }
}

fn event_row(r: &sqlx::sqlite::SqliteRow) -> Result<StoredEvent, sqlx::Error> {
    Ok(StoredEvent {
        seq: r.try_get("seq")?,
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
