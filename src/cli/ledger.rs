//! `mayfly ledger migrate`: copies a ledger to another backend with its chain intact (every
//! event with its sequence number and hashes, every credential row), then verifies the copy.

use std::process::ExitCode;

use super::{fail, location_of};

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
    }
}
