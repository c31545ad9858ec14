//! `mayfly audit tail|verify`: read the ledger directly (read-only).

use std::path::PathBuf;
use std::process::ExitCode;

use super::fail;
use crate::ledger::sqlite::LedgerReader;
use crate::ledger::{StoredEvent, verify_chain};

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
    /// The whole story of one identity: who owns it, each decision (rules, release), each
    /// credential issued, used, expired or revoked, and its locks — oldest first.
    Trace {
        #[arg(long)]
        identity: String,
        #[arg(long, default_value = ".mayfly")]
        data_dir: PathBuf,
        #[arg(long)]
        ledger: Option<PathBuf>,
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
        Command::Trace { identity, data_dir, ledger, json } => {
            let path = ledger.unwrap_or_else(|| data_dir.join("ledger.db"));
            match trace(&path, &identity).await {
                Ok(lines) if lines.is_empty() => fail(format!("no event in `{}` names `{identity}`", path.display())),
                Ok(lines) => {
                    for (event, body, what) in &lines {
                        if json {
                            println!(
                                "{}",
                                serde_json::json!({ "seq": event.seq, "at_ms": event.at_ms, "kind": event.kind, "summary": what, "event": body })
                            );
                        } else {
                            println!("{} #{:<6} {:<9} {what}", time_of(event), event.seq, event.kind);
                        }
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

/// Every event that concerns `identity` (exact, or a prefix lock covering it), with a
/// one-line summary. Credentials are followed by id from their `issued` event on.
async fn trace(
    path: &std::path::Path,
    identity: &str,
) -> Result<Vec<(StoredEvent, serde_json::Value, String)>, String> {
    use serde_json::Value;
    let mut reader = LedgerReader::open(path).await.map_err(|e| e.to_string())?;
    let events = reader.events().await.map_err(|e| e.to_string())?;
    let mut credentials = std::collections::HashSet::new();
    let mut out = Vec::new();
    let mut told_owner = false;
    let mut emergency: Vec<(StoredEvent, serde_json::Value, String)> = Vec::new();
    let mut reviewed = std::collections::HashSet::new();
    for e in events {
        let Ok(body) = serde_json::from_str::<Value>(&e.body) else { continue };
        let s = |k: &str| body.get(k).and_then(Value::as_str).unwrap_or_default().to_owned();
        let summary = match e.kind.as_str() {
            "decision" if s("identity") == identity => {
                let mut line = format!(
                    "{} {} via {}: {} (rules {}; release {})",
                    s("outcome"),
                    s("action"),
                    s("api"),
                    s("reason"),
                    body.get("rules").map(Value::to_string).unwrap_or_default(),
                    s("policy_version")
                );
                if !told_owner && !s("owner").is_empty() {
                    line = format!("[owner {}; purpose: {}] {line}", s("owner"), s("purpose"));
                    told_owner = true;
                }
                Some(line)
            }
            "issued" if s("identity") == identity => {
                credentials.insert(s("id"));
                if body.get("break_glass").and_then(Value::as_bool) == Some(true) {
                    emergency.push((e.clone(), body.clone(), s("id")));
                }
                let flag = if body.get("break_glass").and_then(Value::as_bool) == Some(true) {
                    format!("BREAK-GLASS (ticket {}, {}) ", s("ticket"), s("justification"))
                } else {
                    String::new()
                };
                let provenance = body.get("provenance").map(|p| format!(" from {p}")).unwrap_or_default();
                Some(format!(
                    "{flag}{} credential {} serial {} valid until {}{provenance}",
                    s("kind"),
                    s("id"),
                    s("serial"),
                    body.get("not_after").map(Value::to_string).unwrap_or_default()
                ))
            }
            "used" | "expired" if credentials.contains(&s("credential_id")) => Some(match e.kind.as_str() {
                "used" => format!(
                    "credential {} used: {} {}{}",
                    s("credential_id"),
                    s("use"),
                    body.get("by").map(Value::to_string).unwrap_or_default(),
                    if s("refused").is_empty() { String::new() } else { format!(" REFUSED: {}", s("refused")) }
                ),
                _ => format!("credential {} expired", s("credential_id")),
            }),
            "revoked" => {
                let ids: Vec<String> = body
                    .get("credentials")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                    .filter(|c| c.get("identity").and_then(Value::as_str) == Some(identity))
                    .filter_map(|c| c.get("credential_id").and_then(Value::as_str).map(str::to_owned))
                    .collect();
                let names_identity = s("target").ends_with(identity);
                (!ids.is_empty() || names_identity).then(|| {
                    format!(
                        "revoked {} by {}: {} ({})",
                        if ids.is_empty() { "nothing active".into() } else { ids.join(", ") },
                        body.get("operator").map(Value::to_string).unwrap_or_default(),
                        s("reason"),
                        s("target")
                    )
                })
            }
            "locked" => {
                let target = body.pointer("/lock/target").and_then(Value::as_str).unwrap_or_default();
                let covers = target == identity || (target.ends_with('/') && identity.starts_with(target));
                covers.then(|| {
                    format!(
                        "locked ({target}) by {}: {}",
                        body.pointer("/lock/operator").map(Value::to_string).unwrap_or_default(),
                        body.pointer("/lock/reason").and_then(Value::as_str).unwrap_or_default()
                    )
                })
            }
            "break_glass" if s("stage") == "reviewed" && credentials.contains(&s("subject")) => {
                reviewed.insert(s("subject"));
                Some(format!(
                    "BREAK-GLASS reviewed by {}: {}",
                    body.get("reviewer").map(Value::to_string).unwrap_or_default(),
                    s("note")
                ))
            }
            "break_glass" if s("identity") == identity || credentials.contains(&s("subject")) => Some(format!(
                "BREAK-GLASS {}{}{}",
                s("stage"),
                body.get("approver").map(|a| format!(" by {a}")).unwrap_or_default(),
                [s("why"), s("reason"), s("note")]
                    .into_iter()
                    .filter(|t| !t.is_empty())
                    .map(|t| format!(": {t}"))
                    .collect::<String>()
            )),
            "unlocked" => {
                let target = s("target");
                let covers = target == identity || (target.ends_with('/') && identity.starts_with(&target));
                covers.then(|| {
                    format!(
                        "unlocked ({target}) by {}: {}",
                        body.get("operator").map(Value::to_string).unwrap_or_default(),
                        s("reason")
                    )
                })
            }
            _ => None,
        };
        if let Some(summary) = summary {
            out.push((e, body, summary));
        }
    }
    // Why last: an unreviewed emergency credential is what an auditor must not miss.
    for (event, body, id) in emergency.into_iter().filter(|(_, _, id)| !reviewed.contains(id)) {
        out.push((
            event,
            body,
            format!("UNREVIEWED break-glass credential {id}: `mayfly break-glass review {id} --note …`"),
        ));
    }
    Ok(out)
}

async fn verify(path: &std::path::Path) -> Result<usize, String> {
    let mut reader = LedgerReader::open(path).await.map_err(|e| e.to_string())?;
    let events = reader.events().await.map_err(|e| e.to_string())?;
    let n = verify_chain(&events).map_err(|e| e.to_string())?;
    // Every credential row must equal the body of its (chained) issued event, and every
    // issued event must have its row: the table cannot be edited or pruned unnoticed.
    let credentials = reader.credentials().await.map_err(|e| e.to_string())?;
    let mut rows = std::collections::HashMap::new();
    let issued: std::collections::HashMap<i64, &StoredEvent> =
        events.iter().filter(|e| e.kind == "issued").map(|e| (e.seq, e)).collect();
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
