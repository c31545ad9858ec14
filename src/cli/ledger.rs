//! `mayfly ledger migrate`: copies a ledger to another backend with its chain intact (every
//! event with its sequence number and hashes, every credential row), then verifies the copy.
//! `mayfly ledger backup`: a consistent copy of a live SQLite ledger, verified.

use std::path::PathBuf;
use std::process::ExitCode;

use super::{LedgerAt, fail, location_of};

#[derive(clap::Subcommand)]
pub enum Command {
    /// Copy a ledger, e.g. `--from sqlite:/var/lib/mayfly/ledger.db --to postgres://…`, into
    /// a chain of its own in the target; `audit verify` passes on the copy.
    Migrate {
        /// The ledger to copy: `sqlite:PATH` (or a path).
        #[arg(long)]
        from: String,
        /// Where to: `postgres:URL` (or a `postgres://` URL).
        #[arg(long)]
        to: String,
        /// The chain the copy becomes in the target (the `ledger.chain` of the daemon that
        /// will continue it).
        #[arg(long)]
        chain: String,
    },
    /// Copy a live SQLite ledger to a new file while the daemon serves (one consistent
    /// snapshot, `VACUUM INTO`); the copy is verified before it takes its name. Restore:
    /// stop the daemon, put the copy in place of ledger.db, start it (README: Backups).
    #[command(after_help = "Examples:\n  \
        mayfly ledger backup --config /etc/mayfly/mayfly.toml --to /var/backups/mayfly/ledger-$(date +%F).db\n  \
        mayfly ledger backup --data-dir .mayfly --to ledger-copy.db && mayfly audit verify --ledger ledger-copy.db\n\
        A PostgreSQL ledger is backed up with pg_dump; this command says so and exits 2.")]
    Backup {
        /// The file to write (mode 0600); never replaced if it exists.
        #[arg(long, value_name = "FILE")]
        to: PathBuf,
        #[command(flatten)]
        at: LedgerAt,
    },
}

pub async fn run(command: Command) -> ExitCode {
    match command {
        Command::Migrate { from, to, chain } => {
            let (from, to) = match (location_of(&from), location_of(&to)) {
                (Ok(f), Ok(t)) => (f, t),
                (Err(e), _) | (_, Err(e)) => return fail(e),
            };
            match crate::ledger::migrate(&from, &to, &chain).await {
                Ok(n) => {
                    out!("copied {n} events from `{from}` to `{to}` as chain `{chain}`; the copy verifies");
                    ExitCode::SUCCESS
                }
                Err(e) => fail(e),
            }
        }
        Command::Backup { to, at } => {
            let from = match at.location() {
                Ok(l) => l,
                Err(e) => return fail(e),
            };
            if matches!(from, crate::ledger::Location::Postgres(_)) {
                eprintln!(
                    "mayfly: `{from}` is a PostgreSQL ledger: back it up with PostgreSQL's tools, e.g. `pg_dump --format=custom --file=mayfly.dump DBNAME` (README: Backups)"
                );
                return ExitCode::from(2);
            }
            let started = std::time::Instant::now();
            match crate::ledger::backup(&from, &to).await {
                Ok(copy) => {
                    out!(
                        "backed up `{from}` to `{}`: {} events, {} bytes, in {:.2?}; the copy verifies",
                        to.display(),
                        copy.events,
                        copy.bytes,
                        started.elapsed()
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => fail(e),
            }
        }
    }
}
