//! `mayfly audit tail|trace|verify|prove`: read the ledger (read-only), found the way every
//! command finds it (`--ledger`, `--data-dir`, `--config`).

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use serde_json::Value;

use super::{LedgerAt, fail};
use crate::ledger::checkpoint::{ChainTree, Checkpoint, CheckpointSettings, Mismatch, check_prefix};
use crate::ledger::event::{Event, Stage};
use crate::ledger::{CredentialFilter, EventFilter, LedgerRead, StoredEvent};
use crate::policy::bundle::PublicKey;

#[derive(clap::Subcommand)]
pub enum Command {
    /// Print the last events.
    Tail {
        #[command(flatten)]
        at: LedgerAt,
        /// How many events.
        #[arg(short = 'n', long, default_value_t = 20)]
        lines: i64,
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
    },
    /// The whole story of one identity: who owns it, each decision (rules, release), each
    /// credential issued, used, expired or revoked, and its locks — oldest first.
    #[command(after_help = "Examples:\n  \
        mayfly audit trace --identity spiffe://mayfly.local/ci/acme/app --data-dir /var/lib/mayfly\n  \
        mayfly audit trace --identity spiffe://mayfly.local/dev/quickstart --json | head -5")]
    Trace {
        /// The SPIFFE ID whose story to tell.
        #[arg(long)]
        identity: String,
        #[command(flatten)]
        at: LedgerAt,
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
    },
    /// Check the whole hash chain and the credential table; exit 1 naming the first bad event.
    /// With `--checkpoint`, also that the ledger holds, unchanged, every event a signed
    /// checkpoint covers (truncation and rewrites with recomputed hashes included).
    #[command(
        after_help = "Examples:\n  mayfly audit verify --data-dir /var/lib/mayfly --json\n  mayfly audit verify --data-dir /var/lib/mayfly --checkpoint /var/lib/mayfly-witness/checkpoint --checkpoint-key witness.pub"
    )]
    Verify {
        #[command(flatten)]
        at: LedgerAt,
        /// One JSON object: ledger, ok, events, error, checkpoints (file, ok, detail).
        #[arg(long)]
        json: bool,
        /// A signed checkpoint (`[ledger] checkpoint_file`); repeatable, one per daemon chain.
        #[arg(long, value_name = "FILE")]
        checkpoint: Vec<PathBuf>,
        /// The checkpoints' Ed25519 public key (PEM) [default: FILE.pub beside each
        /// checkpoint]. Pin it: a key read from beside the file is only as safe as the file.
        #[arg(long, value_name = "PUB")]
        checkpoint_key: Option<PathBuf>,
    },
    /// Write ledger events as JSON lines for a SIEM: OCSF 1.3.0 events or CloudEvents 1.0
    /// (README: "Exporting to a SIEM" has the class mapping). Never secrets: token- or
    /// key-shaped fields are dropped even if an event carried one.
    #[command(after_help = "Examples:\n  \
        mayfly audit export --format ocsf --since 1d --config /etc/mayfly/mayfly.toml > mayfly-ocsf.jsonl\n  \
        mayfly audit export --format cloudevents --follow --data-dir /var/lib/mayfly | vector --config …\n\
        --follow keeps reading new events every --poll-interval until SIGINT or SIGTERM.")]
    Export {
        /// `ocsf` or `cloudevents`.
        #[arg(long, value_enum)]
        format: crate::ledger::export::Format,
        /// Only events of the last DURATION (`90s`, `30m`, `12h`, `7d`) [default: every event].
        #[arg(long, value_name = "DURATION")]
        since: Option<String>,
        /// After the events on record, keep writing new ones as they are committed.
        #[arg(long)]
        follow: bool,
        /// How often --follow reads the ledger (`1s` default; 1s..=60s).
        #[arg(long, value_name = "DURATION", default_value = "1s")]
        poll_interval: String,
        /// CloudEvents `source` [default: urn:mayfly:<host name>].
        #[arg(long, value_name = "URI")]
        source: Option<String>,
        #[command(flatten)]
        at: LedgerAt,
    },
    /// Print, as JSON, an inclusion proof of a credential's `issued` event in the Merkle
    /// tree a signed checkpoint pins: the event, its leaf index, the audit path and the
    /// checkpoint, for a verifier that trusts only the checkpoint's key (e.g.
    /// integration/verify_proof.py).
    Prove {
        /// The credential's id (`mayfly credentials list`, `audit trace`).
        credential_id: String,
        #[command(flatten)]
        at: LedgerAt,
        /// The signed checkpoint to prove against.
        #[arg(long, value_name = "FILE")]
        checkpoint: PathBuf,
        /// Its public key [default: FILE.pub].
        #[arg(long, value_name = "PUB")]
        checkpoint_key: Option<PathBuf>,
    },
}

pub async fn run(command: Command) -> ExitCode {
    match command {
        Command::Export { format, since, follow, poll_interval, source, at } => {
            match export(format, since.as_deref(), follow, &poll_interval, source, &at).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => fail(e),
            }
        }
        Command::Tail { at, lines, json } => {
            let events = match at.open().await {
                Ok((_, reader)) => reader.events(EventFilter::tail(lines)).await.map_err(|e| e.to_string()),
                Err(e) => Err(e),
            };
            match events {
                Ok(events) => {
                    for e in &events {
                        out!("{}", if json { json_line(e) } else { text_line(e) });
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => fail(e),
            }
        }
        Command::Trace { identity, at, json } => match trace(&at, &identity).await {
            Ok(lines) if lines.is_empty() => fail(format!("no event in the ledger names `{identity}`")),
            Ok(lines) => {
                for (event, what) in &lines {
                    if json {
                        let body = serde_json::from_str::<Value>(&event.body).unwrap_or(Value::Null);
                        let line = serde_json::json!({ "seq": event.seq, "at_ms": event.at_ms, "at": time_of(event), "kind": event.kind, "summary": what, "event": body });
                        out!("{line}");
                    } else {
                        out!("{} #{:<6} {:<9} {what}", time_of(event), event.seq, event.kind);
                    }
                }
                ExitCode::SUCCESS
            }
            Err(e) => fail(e),
        },
        Command::Verify { at, json, checkpoint, checkpoint_key } => {
            let (location, reader) = match at.open().await {
                Ok(opened) => opened,
                Err(e) if json => {
                    out!("{}", serde_json::json!({ "ok": false, "error": e }));
                    return ExitCode::FAILURE;
                }
                Err(e) => return fail(e),
            };
            let verified = crate::ledger::verify(reader.as_ref()).await.map_err(|e| e.to_string());
            let mut checkpoints = Vec::new();
            if verified.is_ok() {
                for file in &checkpoint {
                    checkpoints
                        .push((file, against_checkpoint(reader.as_ref(), file, checkpoint_key.as_deref()).await));
                }
            }
            let ok = verified.is_ok() && checkpoints.iter().all(|(_, r)| r.is_ok());
            if json {
                let checkpoints: Vec<Value> = checkpoints
                    .iter()
                    .map(|(file, r)| {
                        let (Ok(detail) | Err(detail)) = r;
                        serde_json::json!({ "file": file.display().to_string(), "ok": r.is_ok(), "detail": detail })
                    })
                    .collect();
                let doc = serde_json::json!({
                    "ledger": location.to_string(),
                    "ok": ok,
                    "events": verified.as_ref().ok(),
                    "error": verified.as_ref().err(),
                    "checkpoints": checkpoints,
                });
                out!("{doc}");
                return if ok { ExitCode::SUCCESS } else { ExitCode::FAILURE };
            }
            match &verified {
                Ok(n) => out!("ledger `{location}`: {n} events, hash chain and credential table intact"),
                Err(why) => {
                    eprintln!("ledger `{location}`: FAILED: {why}");
                    return ExitCode::FAILURE;
                }
            }
            for (file, r) in &checkpoints {
                match r {
                    Ok(line) => out!("{line}"),
                    Err(why) => eprintln!("ledger `{location}`: FAILED against checkpoint `{}`: {why}", file.display()),
                }
            }
            if ok { ExitCode::SUCCESS } else { ExitCode::FAILURE }
        }
        Command::Prove { credential_id, at, checkpoint, checkpoint_key } => {
            match prove(&at, &credential_id, &checkpoint, checkpoint_key.as_deref()).await {
                Ok(proof) => {
                    out!("{proof}");
                    ExitCode::SUCCESS
                }
                Err(e) => fail(e),
            }
        }
    }
}

/// A checkpoint and the key it must be signed with (`--checkpoint-key`, else `FILE.pub`).
fn read_checkpoint(file: &Path, key: Option<&Path>) -> Result<(Checkpoint, String), String> {
    let key_file = key.map_or_else(|| CheckpointSettings::public_key_file(file), Path::to_path_buf);
    let key = PublicKey::load(&key_file).map_err(|e| e.to_string())?;
    let note = std::fs::read_to_string(file).map_err(|e| format!("`{}`: {e}", file.display()))?;
    let checkpoint = Checkpoint::open(&note, &key).map_err(|e| e.to_string())?;
    Ok((checkpoint, note))
}

/// `audit verify --checkpoint`: the checkpoint's chain holds its events unchanged, and
/// nothing follows a final checkpoint.
async fn against_checkpoint(reader: &dyn LedgerRead, file: &Path, key: Option<&Path>) -> Result<String, String> {
    let (checkpoint, _) = read_checkpoint(file, key)?;
    let chain = checkpoint.chain().map_err(|e| e.to_string())?;
    let mut tree = ChainTree::new(&chain);
    check_prefix(reader, &mut tree, &checkpoint).await.map_err(|e| e.to_string())?.map_err(|m| m.to_string())?;
    tree.extend(reader, None).await.map_err(|e| e.to_string())?;
    let after = tree.size() - checkpoint.size;
    if checkpoint.is_final() && after > 0 {
        return Err(Mismatch::AfterFinal { size: checkpoint.size, after }.to_string());
    }
    let name = if chain.is_empty() { "the chain".to_owned() } else { format!("chain `{chain}`") };
    Ok(format!(
        "checkpoint `{}` ({}): {name}'s first {} events match the signed root{}",
        file.display(),
        checkpoint.origin,
        checkpoint.size,
        match (checkpoint.is_final(), after) {
            (true, _) => ", and nothing follows the daemon's final checkpoint".to_owned(),
            (false, 0) => String::new(),
            (false, n) => format!("; {n} later events are not covered by it yet"),
        }
    ))
}

/// `audit prove`: the credential's `issued` event, its leaf index and audit path in the
/// tree the checkpoint signs, as one JSON object.
async fn prove(at: &LedgerAt, id: &str, file: &Path, key: Option<&Path>) -> Result<String, String> {
    let (checkpoint, note) = read_checkpoint(file, key)?;
    let chain = checkpoint.chain().map_err(|e| e.to_string())?;
    let (_, reader) = at.open().await?;
    let row = reader
        .credentials(CredentialFilter::All)
        .await
        .map_err(|e| e.to_string())?
        .into_iter()
        .find(|r| r.credential.id == id)
        .ok_or_else(|| format!("no credential `{id}` in the ledger"))?;
    if row.chain != chain {
        return Err(format!(
            "credential `{id}` was issued on chain `{}`; the checkpoint is of chain `{chain}`",
            row.chain
        ));
    }
    let index = u64::try_from(row.issued_event - 1).map_err(|_| "the issued event's number is not positive")?;
    if index >= checkpoint.size {
        return Err(format!(
            "credential `{id}` was issued at event {} of the chain, after the checkpoint ({} events): prove it against a later one",
            row.issued_event, checkpoint.size
        ));
    }
    let mut tree = ChainTree::new(&chain).keeping_leaves();
    check_prefix(reader.as_ref(), &mut tree, &checkpoint)
        .await
        .map_err(|e| e.to_string())?
        .map_err(|m| format!("the ledger does not match the checkpoint: {m}"))?;
    let event = reader
        .events_by_seq(&chain, &[row.issued_event])
        .await
        .map_err(|e| e.to_string())?
        .remove(&row.issued_event)
        .ok_or_else(|| format!("issued event {} is missing", row.issued_event))?;
    let proof = tree.inclusion_proof(index, checkpoint.size).ok_or("no inclusion proof for that leaf")?;
    let leaf = tree.leaf(index).ok_or("no such leaf")?;
    let proof = serde_json::json!({
        "credential_id": id,
        "chain": chain,
        "event": {
            "seq": event.seq,
            "at_ms": event.at_ms,
            "kind": event.kind,
            "body": event.body,
            "prev_hash": event.prev_hash,
            "hash": event.hash,
        },
        "leaf_index": index,
        "leaf_hash": hex::encode(leaf),
        "tree_size": checkpoint.size,
        "proof": proof.iter().map(hex::encode).collect::<Vec<_>>(),
        "root": hex::encode(checkpoint.root),
        "checkpoint": note,
    });
    serde_json::to_string_pretty(&proof).map_err(|e| e.to_string())
}

/// Whether a lock or unlock target (an identity, or a prefix ending in `/`) covers `identity`.
fn covers(target: &str, identity: &str) -> bool {
    target == identity || (target.ends_with('/') && identity.starts_with(target))
}

fn who(o: &impl serde::Serialize) -> String {
    serde_json::to_string(o).unwrap_or_default()
}

/// Every event that concerns `identity` (exact, or a prefix lock covering it), with a
/// one-line summary. Credentials are followed by id from their `issued` event on.
async fn trace(at: &LedgerAt, identity: &str) -> Result<Vec<(StoredEvent, String)>, String> {
    let (_, reader) = at.open().await?;
    let events = crate::ledger::read_typed(reader.as_ref(), EventFilter::all()).await.map_err(|e| e.to_string())?;
    let mut credentials = HashSet::new();
    let mut out = Vec::new();
    let mut told_owner = false;
    let mut emergency: Vec<(StoredEvent, String)> = Vec::new();
    let mut reviewed = HashSet::new();
    for (row, event) in events {
        let summary = match &event {
            Event::Decision(d) if d.identity.as_deref() == Some(identity) => {
                let lifetime = match d.granted_ttl_secs {
                    Some(g) if g < d.requested_ttl_secs => format!(
                        "; lifetime {} of {} requested",
                        crate::clock::human_duration(g),
                        crate::clock::human_duration(d.requested_ttl_secs)
                    ),
                    Some(g) => format!("; lifetime {}", crate::clock::human_duration(g)),
                    None => String::new(),
                };
                let mut line = format!(
                    "{} {} via {}: {} (rules {}; release {}{lifetime})",
                    if d.is_allow() { "allow" } else { "deny" },
                    d.action,
                    d.api,
                    d.reason,
                    who(&d.rules),
                    d.policy_version
                );
                if let (false, Some(owner)) = (told_owner, d.owner.as_deref().filter(|o| !o.is_empty())) {
                    line = format!("[owner {owner}; purpose: {}] {line}", d.purpose.as_deref().unwrap_or_default());
                    told_owner = true;
                }
                Some(line)
            }
            Event::Issued(i) if i.credential.identity == identity => {
                let c = &i.credential;
                credentials.insert(c.id.clone());
                let flag = if i.details.break_glass {
                    emergency.push((row.clone(), c.id.clone()));
                    format!(
                        "BREAK-GLASS (ticket {}, {}) ",
                        i.details.ticket.as_deref().unwrap_or_default(),
                        i.details.justification.as_deref().unwrap_or_default()
                    )
                } else {
                    String::new()
                };
                let provenance = i.details.provenance.as_ref().map(|p| format!(" from {}", who(p))).unwrap_or_default();
                Some(format!(
                    "{flag}{} credential {} serial {} valid until {}{provenance}",
                    c.kind,
                    c.id,
                    c.serial,
                    crate::clock::rfc3339_secs(c.not_after)
                ))
            }
            Event::Used(u) if credentials.contains(&u.credential_id) => Some(format!(
                "credential {} used: {} {}{}{}",
                u.credential_id,
                u.use_kind,
                who(&u.by),
                u.proof_jti.as_deref().map(|j| format!(" with proof {j}")).unwrap_or_default(),
                u.refused.as_deref().map(|r| format!(" REFUSED: {r}")).unwrap_or_default()
            )),
            Event::Expired(e) if credentials.contains(&e.credential_id) => {
                Some(format!("credential {} expired", e.credential_id))
            }
            Event::Revoked(r) => {
                let ids: Vec<&str> =
                    r.credentials.iter().filter(|c| c.identity == identity).map(|c| c.credential_id.as_str()).collect();
                let names_identity = r.target.ends_with(identity);
                (!ids.is_empty() || names_identity).then(|| {
                    format!(
                        "revoked {} by {}: {} ({})",
                        if ids.is_empty() { "nothing active".into() } else { ids.join(", ") },
                        who(&r.operator),
                        r.reason,
                        r.target
                    )
                })
            }
            Event::Locked(l) if covers(&l.lock.target, identity) => {
                Some(format!("locked ({}) by {}: {}", l.lock.target, who(&l.lock.operator), l.lock.reason))
            }
            Event::Unlocked(u) if covers(&u.target, identity) => {
                Some(format!("unlocked ({}) by {}: {}", u.target, who(&u.operator), u.reason))
            }
            Event::BreakGlass(b)
                if b.stage == Stage::Reviewed && b.subject.as_ref().is_some_and(|s| credentials.contains(s)) =>
            {
                reviewed.insert(b.subject.clone().unwrap_or_default());
                Some(format!(
                    "BREAK-GLASS reviewed by {}: {}",
                    b.reviewer.as_ref().map(who).unwrap_or_default(),
                    b.note.as_deref().unwrap_or_default()
                ))
            }
            Event::BreakGlass(b)
                if b.identity.as_deref() == Some(identity)
                    || b.subject.as_ref().is_some_and(|s| credentials.contains(s)) =>
            {
                let stage =
                    serde_json::to_value(b.stage).ok().and_then(|v| v.as_str().map(str::to_owned)).unwrap_or_default();
                Some(format!(
                    "BREAK-GLASS {stage}{}{}",
                    b.approver.as_ref().map(|a| format!(" by {}", who(a))).unwrap_or_default(),
                    [&b.why, &b.reason, &b.note]
                        .into_iter()
                        .flatten()
                        .filter(|t| !t.is_empty())
                        .map(|t| format!(": {t}"))
                        .collect::<String>()
                ))
            }
            _ => None,
        };
        if let Some(summary) = summary {
            out.push((row, summary));
        }
    }
    // Why last: an unreviewed emergency credential is what an auditor must not miss.
    for (event, id) in emergency.into_iter().filter(|(_, id)| !reviewed.contains(id)) {
        out.push((event, format!("UNREVIEWED break-glass credential {id}: `mayfly break-glass review {id} --note …`")));
    }
    Ok(out)
}

/// `audit export`: pages of events as records, then (with `follow`) new ones until a signal.
async fn export(
    format: crate::ledger::export::Format,
    since: Option<&str>,
    follow: bool,
    poll_interval: &str,
    source: Option<String>,
    at: &LedgerAt,
) -> Result<(), String> {
    const PAGE: i64 = 5000;
    let since_ms = match since {
        Some(text) => {
            let ttl = crate::identity::Ttl::parse(text).map_err(|e| format!("--since: {e}"))?;
            let from = std::time::SystemTime::now() - ttl.as_duration();
            Some(crate::policy::replay::epoch_ms(from))
        }
        None => None,
    };
    let poll = crate::identity::Ttl::parse(poll_interval)
        .map_err(|e| format!("--poll-interval: {e}"))?
        .as_duration()
        .clamp(std::time::Duration::from_secs(1), std::time::Duration::from_secs(60));
    // Why /proc: uname(2) would need another rustix feature for one string.
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "localhost".to_owned());
    let origin = crate::ledger::export::Origin { source: source.unwrap_or_else(|| format!("urn:mayfly:{host}")), host };
    let (_, reader) = at.open().await?;
    let mut stop = std::pin::pin!(crate::cli::shutdown_signal());
    let mut after = i64::MIN;
    loop {
        loop {
            let filter = EventFilter { after, since_ms, limit: Some(PAGE), ..EventFilter::default() };
            let page = reader.events(filter).await.map_err(|e| e.to_string())?;
            let Some(last) = page.last() else { break };
            after = last.pos;
            let mut lines = String::new();
            for e in &page {
                lines.push_str(&crate::ledger::export::record(format, &origin, e).to_string());
                lines.push('\n');
            }
            super::print_text(&lines);
            if page.len() < usize::try_from(PAGE).unwrap_or(usize::MAX) {
                break;
            }
        }
        if !follow {
            return Ok(());
        }
        tokio::select! {
            () = &mut stop => return Ok(()),
            () = tokio::time::sleep(poll) => {}
        }
    }
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
    let body: Value = serde_json::from_str(&e.body).unwrap_or(Value::String(e.body.clone()));
    let fields: HashMap<&str, Value> = HashMap::from([
        ("seq", e.seq.into()),
        ("at", time_of(e).into()),
        ("kind", e.kind.clone().into()),
        ("body", body),
        ("prev_hash", e.prev_hash.clone().into()),
        ("hash", e.hash.clone().into()),
    ]);
    serde_json::to_string(&fields).unwrap_or_default()
}
