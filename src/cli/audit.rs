//! `mayfly audit tail|verify`: read the ledger directly (read-only).

use std::path::PathBuf;
use std::process::ExitCode;

use super::fail;
use crate::ledger::sqlite::LedgerReader;
use crate::ledger::{verify_chain, StoredEvent};

#[derive(clap::Subcommand)]
pub enum Command {
    /// Print the last events.
    Tail {
        #[arg(long, default_value = ".mayfly")]
        data_dir: PathBuf,
        /// The ledger file, when not `<data-dir>/ledger.db`.
        #[arg(long)]
        ledger: Option<PathBuf>,
        #[arg(short = 'n', long, default_value_t = 20)]
        lines: i64,
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
    },
    /// Check the whole hash chain and the credential table; exit 1 naming the first bad event.
    Verify {
        #[arg(long, default_value = ".mayfly")]
        data_dir: PathBuf,
        #[arg(long)]
        ledger: Option<PathBuf>,
    },
}

pub async fn run(command: Command) -> ExitCode {
    match command {
        Command::Tail { data_dir, ledger, lines, json } => {
            let path = ledger.unwrap_or_else(|| data_dir.join("ledger.db"));
            let events = match LedgerReader::open(&path).await {
                Ok(mut r) => r.tail(lines.max(0)).await,
                Err(e) => Err(e),
            };
            match events {
                Ok(events) => {
                    for e in &events {
                        println!("{}", if json { json_line(e) } else { text_line(e) });
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => fail(e),
            }
        }
        Command::Verify { data_dir, ledger } => {
            let path = ledger.unwrap_or_else(|| data_dir.join("ledger.db"));
            match verify(&path).await {
                Ok(n) => {
                    println!("ledger `{}`: {n} events, hash chain and credential table intact", path.display());
                    ExitCode::SUCCESS
                }
                Err(why) => {
                    eprintln!("ledger `{}`: FAILED: {why}", path.display());
                    ExitCode::FAILURE
                }
            }
        }
    }
}

async fn verify(path: &std::path::Path) -> Result<usize, String> {
    let mut reader = LedgerReader::open(path).await.map_err(|e| e.to_string())?;
    let events = reader.events().await.map_err(|e| e.to_string())?;
    let n = verify_chain(&events).map_err(|e| e.to_string())?;
    // Every credential row must equal the body of its (chained) issued event, and every
    // issued event must have its row: the table cannot be edited or pruned unnoticed.
    let credentials = reader.credentials().await.map_err(|e| e.to_string())?;
    let mut rows = std::collections::HashMap::new();
    let issued: std::collections::HashMap<i64, &StoredEvent> = events.iter().filter(|e| e.kind == "issued").map(|e| (e.seq, e)).collect();
    for (seq, c) in &credentials {
        let event = issued.get(seq);
        // The event may say more (a token caller's provenance); every field of the row must
        // equal the event's.
        let matches = event.is_some_and(|e| {
            let body = serde_json::from_str::<serde_json::Value>(&e.body).ok();
            let row = serde_json::to_value(c).ok();
            match (body.as_ref().and_then(|b| b.as_object()), row.as_ref().and_then(|r| r.as_object())) {
                (Some(b), Some(r)) => r.iter().all(|(k, v)| b.get(k) == Some(v)),
                _ => false,
            }
        });
        if !matches {
            return Err(format!("credential `{}` does not match its issued event {seq} (edited)", c.id));
        }
        rows.insert(*seq, ());
    }
    if let Some(e) = events.iter().find(|e| e.kind == "issued" && !rows.contains_key(&e.seq)) {
        return Err(format!("event {}: issued credential has no row in the credential table (deleted)", e.seq));
    }
    Ok(n)
}

fn time_of(e: &StoredEvent) -> String {
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(e.at_ms) * 1_000_000)
        .ok()
        .and_then(|t| t.format(&time::format_description::well_known::Rfc3339).ok())
        .unwrap_or_else(|| e.at_ms.to_string())
}

fn text_line(e: &StoredEvent) -> String {
    format!("{:>6}  {}  {:<14}  {}", e.seq, time_of(e), e.kind, e.body)
}

fn json_line(e: &StoredEvent) -> String {
    let body: serde_json::Value = serde_json::from_str(&e.body).unwrap_or(serde_json::Value::String(e.body.clone()));
    serde_json::json!({
        "seq": e.seq, "at": time_of(e), "kind": e.kind, "body": body, "prev_hash": e.prev_hash, "hash": e.hash,
    })
    .to_string()
}
