//! SQLite ledger backend (WAL, synchronous=FULL): one connection owned by the writer
//! task, one multi-row INSERT per table per batch; a small read-only pool answers
//! `LedgerRead` beside it (WAL lets readers run while the writer commits). The SQL is kept
//! to what PostgreSQL also accepts, apart from the `?` placeholders. The only place that
//! knows the file's name and layout.
//!
//! Schema changes are versioned migrations, as in `postgres`: the version is the database
//! header's `user_version` (0 for ledgers written before it was recorded, whose tables
//! migration 1 finds already made); the writer applies what the file lacks at open, in one
//! `BEGIN IMMEDIATE` transaction; writer and readers refuse a file newer than this build.
//! `backup` copies a live ledger with `VACUUM INTO`.

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

/// The schema this build writes (`PRAGMA user_version`); a ledger at a higher version is
/// refused. UPGRADING.md lists what each version changed.
pub const SCHEMA_VERSION: i64 = 3;

/// Migration N (1-based) takes a ledger from version N-1 to N. Never edit a shipped one:
/// append.
const MIGRATIONS: &[&[&str]] = &[
    &[
        // 1: the events and the credential table. `IF NOT EXISTS`: ledgers from before the
        // version was recorded (user_version 0) already hold these tables.
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
    ],
    &[
        // 2: events by kind, as PostgreSQL has them. What start-up reads (revocations and
        // locks, the last `expired` event, recent `used` events) is then found through the
        // index instead of a scan of the whole ledger, so start-up does not grow with it.
        "CREATE INDEX IF NOT EXISTS events_kind ON events(kind, seq)",
    ],
    &[
        // 3: the break-glass flag in the credential table (an `issued` event's detail until
        // now), behind a partial index: start-up rebuilds the flagged set from the few
        // flagged rows instead of reading every `issued` event (4.2 s at 1M events).
        "ALTER TABLE credentials ADD COLUMN break_glass BOOLEAN NOT NULL DEFAULT FALSE",
        "UPDATE credentials SET break_glass = TRUE WHERE issued_event IN
           (SELECT seq FROM events WHERE kind = 'issued' AND json_extract(body, '$.break_glass') = 1)",
        "CREATE INDEX IF NOT EXISTS credentials_break_glass ON credentials(issued_event) WHERE break_glass",
    ],
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
        migrate(&mut conn, &path.display().to_string()).await?;
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
        // SQLite allows 32766 bound parameters per statement: 6 per event, 10 per credential.
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
                "INSERT INTO credentials (id, kind, identity, serial, fingerprint, not_before, not_after, decision_id, issued_event, break_glass) VALUES {}",
                vec!["(?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"; chunk.len()].join(", ")
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
                    .bind(*issued)
                    .bind(c.break_glass);
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

/// Copies the live ledger at `source` to the new file `to` (mode 0600) with `VACUUM INTO`,
/// then hands the copy to `check` before it takes its name; refuses an existing `to`.
///
/// Why `VACUUM INTO` and not the online backup API: sqlx exposes no safe binding of
/// `sqlite3_backup_*` (and `unsafe` is forbidden here); `VACUUM INTO` runs in one read
/// transaction, so under WAL the copy is the snapshot of one commit while the daemon keeps
/// writing, and the writer is never blocked. The copy is a compacted, rollback-journal file:
/// self-contained, no -wal beside it.
pub async fn backup<F, Fut, T>(source: &Path, to: &Path, check: F) -> Result<T, LedgerError>
where
    F: FnOnce(std::path::PathBuf) -> Fut,
    Fut: std::future::Future<Output = Result<T, LedgerError>>,
{
    use std::os::unix::fs::OpenOptionsExt;
    let shown = to.display().to_string();
    if std::fs::symlink_metadata(to).is_ok() {
        return Err(LedgerError::Exists(shown));
    }
    // Why a leading read: `open` distinguishes a missing ledger from an unreadable one.
    let reader = SqliteReader::open(source).await?;
    let dir = match to.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => std::path::PathBuf::from("."),
    };
    let name = to.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let partial = dir.join(format!(".{name}.partial-{}", std::process::id()));
    // Why an empty file made here: VACUUM INTO fills an empty file and keeps its mode, so
    // the copy is never readable by others, not even while it is written.
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&partial)
        .map_err(|e| LedgerError::Storage(format!("`{}`: {e}", partial.display())))?;
    let copied = async {
        sqlx::query("VACUUM INTO ?")
            .bind(partial.to_string_lossy().into_owned())
            .execute(&reader.pool)
            .await
            .map_err(storage)?;
        reader.pool.close().await;
        std::fs::File::open(&partial).and_then(|f| f.sync_all()).map_err(storage)?;
        let checked = check(partial.clone()).await?;
        let dir_fd = std::fs::File::open(&dir).map_err(storage)?;
        rustix::fs::renameat_with(&dir_fd, &partial, &dir_fd, to, rustix::fs::RenameFlags::NOREPLACE).map_err(|e| {
            match e {
                rustix::io::Errno::EXIST => LedgerError::Exists(shown.clone()),
                e => LedgerError::Storage(format!("`{shown}`: {e}")),
            }
        })?;
        dir_fd.sync_all().map_err(storage)?;
        Ok(checked)
    }
    .await;
    if copied.is_err() {
        let _ = std::fs::remove_file(&partial);
    }
    copied
}

/// Applies the migrations the ledger lacks; refuses a schema newer than this build knows.
async fn migrate(conn: &mut SqliteConnection, shown: &str) -> Result<(), LedgerError> {
    // Why IMMEDIATE: the write lock is taken before the version is read, so two processes
    // opening one new file cannot both migrate it.
    let mut tx = conn.begin_with("BEGIN IMMEDIATE").await.map_err(storage)?;
    let current: i64 = sqlx::query_scalar("PRAGMA user_version").fetch_one(&mut *tx).await.map_err(storage)?;
    newer_refused(current, shown)?;
    for (index, steps) in MIGRATIONS.iter().enumerate().skip(usize::try_from(current).unwrap_or(0)) {
        for step in *steps {
            sqlx::query(*step).execute(&mut *tx).await.map_err(|e| storage(format!("migration {}: {e}", index + 1)))?;
        }
    }
    if current < SCHEMA_VERSION {
        // Why format: a PRAGMA takes no bound parameter; the value is this build's constant.
        sqlx::query(AssertSqlSafe(format!("PRAGMA user_version = {SCHEMA_VERSION}")))
            .execute(&mut *tx)
            .await
            .map_err(storage)?;
    }
    tx.commit().await.map_err(storage)
}

fn newer_refused(version: i64, shown: &str) -> Result<(), LedgerError> {
    if version > SCHEMA_VERSION {
        return Err(LedgerError::NewerSchema { ledger: shown.to_owned(), found: version, known: SCHEMA_VERSION });
    }
    Ok(())
}

/// Read-only access: every `LedgerRead` of this backend.
pub struct SqliteReader {
    pool: SqlitePool,
    /// The SQL for a credential row's break-glass flag: its column, or for a ledger before
    /// schema 3, its `issued` event's detail.
    break_glass: &'static str,
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
        let version: i64 = sqlx::query_scalar("PRAGMA user_version").fetch_one(&pool).await.map_err(storage)?;
        newer_refused(version, &shown)?;
        // A ledger not migrated yet (a backup, a copy, a file whose daemon has not started
        // this release) has no flag column: the flag is then read from each row's event,
        // as the migration would have filled it.
        let break_glass = if version >= 3 {
            "break_glass"
        } else {
            "IFNULL((SELECT json_extract(body, '$.break_glass') = 1 FROM events WHERE seq = issued_event), 0)"
        };
        Ok(Self { pool, break_glass })
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
        let flag = self.break_glass;
        let columns = format!(
            "SELECT id, kind, identity, serial, fingerprint, not_before, not_after, decision_id, issued_event, {flag} AS break_glass FROM credentials"
        );
        let rows = match f {
            CredentialFilter::All => {
                sqlx::query(AssertSqlSafe(format!("{columns} ORDER BY issued_event"))).fetch_all(&self.pool).await
            }
            CredentialFilter::ActiveAt(now) => {
                sqlx::query(AssertSqlSafe(format!("{columns} WHERE not_after > ? ORDER BY issued_event")))
                    .bind(now)
                    .fetch_all(&self.pool)
                    .await
            }
            CredentialFilter::Expiring { after, until, limit } => {
                sqlx::query(AssertSqlSafe(format!(
                    "{columns} WHERE (not_after > ? OR (not_after = ? AND id > ?)) AND not_after <= ? ORDER BY not_after, id LIMIT ?"
                )))
                .bind(after.0)
                .bind(after.0)
                .bind(after.1)
                .bind(until)
                .bind(limit)
                .fetch_all(&self.pool)
                .await
            }
            CredentialFilter::BreakGlass => {
                sqlx::query(AssertSqlSafe(format!("{columns} WHERE {flag} ORDER BY issued_event")))
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
        break_glass: r.try_get("break_glass")?,
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

    async fn user_version(path: &Path) -> i64 {
        let options = SqliteConnectOptions::from_str(&format!("sqlite://{}", path.display())).unwrap();
        let mut conn = SqliteConnection::connect_with(&options).await.unwrap();
        sqlx::query_scalar("PRAGMA user_version").fetch_one(&mut conn).await.unwrap()
    }

    async fn set_user_version(path: &Path, version: i64) {
        let options = SqliteConnectOptions::from_str(&format!("sqlite://{}", path.display())).unwrap();
        let mut conn = SqliteConnection::connect_with(&options).await.unwrap();
        sqlx::query(AssertSqlSafe(format!("PRAGMA user_version = {version}"))).execute(&mut conn).await.unwrap();
        conn.close().await.unwrap();
    }

    #[tokio::test]
    async fn a_new_ledger_records_its_schema_version_and_an_unversioned_one_is_migrated() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FILE_NAME);
        SqliteBackend::open(&path, Duration::from_secs(1)).await.unwrap().close().await.unwrap();
        assert_eq!(user_version(&path).await, SCHEMA_VERSION);

        // A ledger from before the version was recorded: the first tables, user_version 0.
        let old = dir.path().join("old.db");
        let options =
            SqliteConnectOptions::from_str(&format!("sqlite://{}", old.display())).unwrap().create_if_missing(true);
        let mut conn = SqliteConnection::connect_with(&options).await.unwrap();
        for step in MIGRATIONS[0] {
            sqlx::query(*step).execute(&mut conn).await.unwrap();
        }
        sqlx::query("INSERT INTO events VALUES (1, 1, 'daemon_started', '{}', ?, 'h')")
            .bind(crate::ledger::GENESIS)
            .execute(&mut conn)
            .await
            .unwrap();
        conn.close().await.unwrap();
        assert_eq!(user_version(&old).await, 0);
        let mut migrated = SqliteBackend::open(&old, Duration::from_secs(1)).await.unwrap();
        assert_eq!(migrated.head().await.unwrap(), Some((1, "h".to_owned())), "events kept");
        migrated.close().await.unwrap();
        assert_eq!(user_version(&old).await, SCHEMA_VERSION);
    }

    #[tokio::test]
    async fn migration_3_flags_the_break_glass_credentials_a_schema_2_ledger_holds() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FILE_NAME);
        let options =
            SqliteConnectOptions::from_str(&format!("sqlite://{}", path.display())).unwrap().create_if_missing(true);
        let mut conn = SqliteConnection::connect_with(&options).await.unwrap();
        for step in MIGRATIONS[..2].iter().flat_map(|m| m.iter()) {
            sqlx::query(*step).execute(&mut conn).await.unwrap();
        }
        // Two issuances as schema 2 stored them: the flag only in the emergency one's body.
        let bodies = [
            r#"{"id":"c-normal","kind":"x509","identity":"spiffe://t/a","serial":"01","fingerprint":"f","not_before":1,"not_after":2,"decision_id":1}"#,
            r#"{"id":"c-emergency","kind":"x509","identity":"spiffe://t/a","serial":"02","fingerprint":"f","not_before":1,"not_after":2,"decision_id":1,"break_glass":true,"ticket":"INC-1"}"#,
        ];
        for (n, body) in bodies.iter().enumerate() {
            let seq = i64::try_from(n).unwrap() + 1;
            sqlx::query(
                "INSERT INTO events (seq, at_ms, kind, body, prev_hash, hash) VALUES (?, 1, 'issued', ?, 'p', 'h')",
            )
            .bind(seq)
            .bind(*body)
            .execute(&mut conn)
            .await
            .unwrap();
            let id = if n == 0 { "c-normal" } else { "c-emergency" };
            sqlx::query("INSERT INTO credentials VALUES (?, 'x509', 'spiffe://t/a', ?, 'f', 1, 2, 1, ?)")
                .bind(id)
                .bind(format!("0{seq}"))
                .bind(seq)
                .execute(&mut conn)
                .await
                .unwrap();
        }
        sqlx::query("PRAGMA user_version = 2").execute(&mut conn).await.unwrap();
        conn.close().await.unwrap();
        // Read before any migration (a backup, `audit verify` on a copy): the flag comes from
        // the events.
        let unmigrated = SqliteReader::open(&path).await.unwrap();
        let flagged = unmigrated.credentials(CredentialFilter::BreakGlass).await.unwrap();
        assert_eq!(flagged.iter().map(|r| r.credential.id.as_str()).collect::<Vec<_>>(), ["c-emergency"]);
        unmigrated.pool.close().await;

        SqliteBackend::open(&path, Duration::from_secs(1)).await.unwrap().close().await.unwrap();
        assert_eq!(user_version(&path).await, SCHEMA_VERSION);
        let reader = SqliteReader::open(&path).await.unwrap();
        let flagged = reader.credentials(CredentialFilter::BreakGlass).await.unwrap();
        assert_eq!(flagged.iter().map(|r| r.credential.id.as_str()).collect::<Vec<_>>(), ["c-emergency"]);
        assert!(flagged[0].credential.break_glass);
        let all = reader.credentials(CredentialFilter::All).await.unwrap();
        assert!(!all[0].credential.break_glass, "the other row stays unflagged");
    }

    #[tokio::test]
    async fn a_ledger_newer_than_this_build_is_refused_naming_both_versions() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FILE_NAME);
        SqliteBackend::open(&path, Duration::from_secs(1)).await.unwrap().close().await.unwrap();
        set_user_version(&path, SCHEMA_VERSION + 1).await;
        let newer = format!("schema version {}, newer than this mayfly knows ({SCHEMA_VERSION})", SCHEMA_VERSION + 1);
        let writer = SqliteBackend::open(&path, Duration::from_secs(1)).await.err().unwrap();
        assert!(matches!(writer, LedgerError::NewerSchema { .. }) && writer.to_string().contains(&newer), "{writer}");
        let reader = SqliteReader::open(&path).await.err().unwrap();
        assert!(reader.to_string().contains(&newer), "{reader}");
        assert_eq!(user_version(&path).await, SCHEMA_VERSION + 1, "the refusal changed nothing");
    }

    #[tokio::test]
    async fn a_backup_taken_while_the_writer_commits_verifies_and_never_replaces_a_file() {
        use crate::ledger::{Event, Ledger, Location, Settings, event};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FILE_NAME);
        let opened = crate::ledger::open(&Settings::local(Location::file(&path))).await.unwrap();
        let writer = std::sync::Arc::new(opened.writer);
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let load = {
            let (writer, stop) = (writer.clone(), stop.clone());
            tokio::spawn(async move {
                let mut n = 0;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let e = Event::DaemonStopped(event::DaemonStopped { clean: true });
                    writer.record(std::time::SystemTime::now(), e).await.unwrap();
                    n += 1;
                }
                n
            })
        };
        tokio::time::sleep(Duration::from_millis(100)).await;
        let copy = dir.path().join("copy.db");
        let backed = crate::ledger::backup(&Location::file(&path), &copy).await.unwrap();
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let written = load.await.unwrap();
        assert!(backed.events > 0 && backed.events <= written, "{backed:?} of {written}");
        let reader = SqliteReader::open(&copy).await.unwrap();
        assert_eq!(crate::ledger::verify(&reader).await.unwrap(), backed.events);
        assert_eq!(std::fs::metadata(&copy).unwrap().permissions().mode() & 0o777, 0o600);

        let again = crate::ledger::backup(&Location::file(&path), &copy).await.unwrap_err();
        assert!(matches!(again, LedgerError::Exists(_)), "{again}");
        let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert!(!left.iter().any(|n| n.to_string_lossy().contains("partial")), "{left:?}");
    }
}
