//! `mayfly break-glass …`: the emergency request (over the workload socket, attested like
//! any other caller), and the second person's and the reviewer's side (admin socket), and
//! the report afterwards (read from the ledger).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;

use serde_json::json;

use super::{AdminAt, SocketAt};
use crate::api::pb::broker_client::BrokerClient;
use crate::api::pb::{
    BreakGlassApproveRequest, BreakGlassListRequest, BreakGlassRequest, BreakGlassReviewRequest, BreakGlassWaitRequest,
};
use crate::clock::rfc3339_secs;
use crate::identity::Ttl;
use crate::ledger::event::{Event, Operator, Stage};
use crate::ledger::{EventFilter, read_typed};

#[derive(clap::Args)]
#[command(
    args_conflicts_with_subcommands = true,
    after_help = "Examples:\n  \
        mayfly break-glass --kind x509 --reason \"primary DB down\" --ticket INC-1234 --out ./bg\n  \
        sudo mayfly break-glass list --json                  # a second person\n  \
        sudo mayfly break-glass approve ID --reason \"on-call lead: approved\"\n  \
        mayfly break-glass report --since 7d --data-dir /var/lib/mayfly"
)]
pub struct Args {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    request: RequestArgs,
}

#[derive(clap::Args)]
pub struct RequestArgs {
    #[command(flatten)]
    at: SocketAt,
    /// x509, jwt, aws or wit.
    #[arg(long)]
    kind: Option<String>,
    /// jwt: the audience.
    #[arg(long)]
    audience: Option<String>,
    /// aws: the role ARN (written as aws-credentials.json, the credential_process format).
    #[arg(long)]
    role: Option<String>,
    /// Why you need it now (recorded verbatim).
    #[arg(long)]
    reason: Option<String>,
    /// The incident or change ticket, e.g. INC-1234.
    #[arg(long)]
    ticket: Option<String>,
    /// Lifetime asked for (capped by break_glass.max_ttl and the rule's @max_ttl).
    #[arg(long, default_value = "10m")]
    ttl: String,
    /// x509: where cert.pem, key.pem (0600) and bundle.pem go; jwt: token (0600); wit:
    /// wit.jwt and wit-key.jwk (0600).
    #[arg(long, default_value = "break-glass")]
    out: PathBuf,
}

#[derive(clap::Subcommand)]
enum Command {
    /// Requests awaiting a second person (admin socket).
    List {
        /// One JSON object per line: id, identity, requester_uid, reason, ticket, requested_at, expires_at (RFC 3339).
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        at: AdminAt,
    },
    /// Approve a pending request (never your own).
    Approve {
        /// The pending request's id (`mayfly break-glass list`).
        id: String,
        /// Why you approve (recorded with who you are).
        #[arg(long)]
        reason: String,
        #[command(flatten)]
        at: AdminAt,
    },
    /// Record the review of a break-glass request or credential.
    Review {
        /// A break-glass request id or credential id.
        id: String,
        /// What the review found (recorded).
        #[arg(long)]
        note: String,
        #[command(flatten)]
        at: AdminAt,
    },
    /// Every break-glass request: who, why, ticket, approver, uses, end, review (read from
    /// the ledger: --ledger, --data-dir, --config or MAYFLY_CONFIG).
    Report {
        /// How far back (e.g. 7d, 24h).
        #[arg(long, default_value = "7d")]
        since: String,
        /// Unreviewed requests older than this are flagged OVERDUE.
        #[arg(long, default_value = "7d")]
        review_within: String,
        #[command(flatten)]
        at: super::LedgerAt,
        /// One JSON object per request, per line.
        #[arg(long)]
        json: bool,
    },
}

pub async fn run(args: Args) -> ExitCode {
    match args.command {
        None => request(args.request).await,
        Some(Command::List { json, at }) => list(&at, json).await,
        Some(Command::Approve { id, reason, at }) => {
            let mut client = match at.client().await {
                Ok(c) => c,
                Err(code) => return code,
            };
            match client.break_glass_approve(BreakGlassApproveRequest { id: id.clone(), reason }).await {
                Ok(_) => {
                    out!("approved {id}");
                    ExitCode::SUCCESS
                }
                Err(s) => super::fail(format!("approval refused ({:?}): {}", s.code(), s.message())),
            }
        }
        Some(Command::Review { id, note, at }) => {
            let mut client = match at.client().await {
                Ok(c) => c,
                Err(code) => return code,
            };
            match client.break_glass_review(BreakGlassReviewRequest { id: id.clone(), note }).await {
                Ok(r) => {
                    out!("review of {id} recorded (event {})", r.into_inner().event_id);
                    ExitCode::SUCCESS
                }
                Err(s) => super::fail(format!("review refused ({:?}): {}", s.code(), s.message())),
            }
        }
        Some(Command::Report { since, review_within, at, json }) => report(&at, &since, &review_within, json).await,
    }
}

async fn request(args: RequestArgs) -> ExitCode {
    let (Some(kind), Some(reason), Some(ticket)) = (args.kind, args.reason, args.ticket) else {
        return super::fail("break-glass needs --kind, --reason and --ticket");
    };
    let ttl = match Ttl::parse(&args.ttl) {
        Ok(t) => i64::try_from(t.as_secs()).unwrap_or(i64::MAX),
        Err(e) => return super::fail(format!("--ttl: {e}")),
    };
    let key = match kind.as_str() {
        "x509" => match rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256) {
            Ok(k) => Some(k),
            Err(e) => return super::fail(e),
        },
        _ => None,
    };
    let csr = match &key {
        Some(k) => match rcgen::CertificateParams::default().serialize_request(k) {
            Ok(csr) => csr.der().to_vec(),
            Err(e) => return super::fail(e),
        },
        None => vec![],
    };
    let socket = match args.at.socket() {
        Ok(s) => s,
        Err(e) => return super::fail(e),
    };
    let channel = match super::connect(&socket).await {
        Ok(c) => c,
        Err(e) => return super::fail(format!("cannot reach `{}`: {e}", socket.display())),
    };
    let mut client = BrokerClient::new(channel);
    if kind == "aws" && args.role.is_none() {
        return super::fail("--kind aws needs --role ARN");
    }
    let req = BreakGlassRequest {
        kind: kind.clone(),
        csr,
        audience: args.audience.unwrap_or_default(),
        reason,
        ticket,
        ttl_seconds: Some(ttl),
        role: args.role.clone().unwrap_or_default(),
    };
    let mut reply = match client.break_glass(req).await {
        Ok(r) => r.into_inner(),
        Err(s) => return super::fail(format!("break-glass refused ({:?}): {}", s.code(), s.message())),
    };
    while !reply.pending_id.is_empty() {
        eprintln!(
            "waiting for a second person: `mayfly break-glass approve {} --reason …` (until {})",
            reply.pending_id,
            rfc3339_secs(reply.pending_until)
        );
        reply = match client.break_glass_wait(BreakGlassWaitRequest { pending_id: reply.pending_id.clone() }).await {
            Ok(r) => r.into_inner(),
            Err(s) => return super::fail(format!("break-glass refused ({:?}): {}", s.code(), s.message())),
        };
    }
    if let Err(e) = std::fs::create_dir_all(&args.out) {
        return super::fail(format!("`{}`: {e}", args.out.display()));
    }
    let written = if kind == "x509" {
        let pem_of = |der: &[u8]| pem::encode(&pem::Pem::new("CERTIFICATE", der.to_vec()));
        let chain: String = reply.cert_chain.iter().map(|c| pem_of(c)).collect();
        let bundle: String = reply.trust_bundle.iter().map(|c| pem_of(c)).collect();
        let key_pem = key.map(|k| zeroize::Zeroizing::new(k.serialize_pem())).unwrap_or_default();
        std::fs::write(args.out.join("cert.pem"), chain)
            .and_then(|()| std::fs::write(args.out.join("bundle.pem"), bundle))
            .map_err(|e| e.to_string())
            .and_then(|()| {
                let _ = std::fs::remove_file(args.out.join("key.pem"));
                crate::keys::write_private(&args.out.join("key.pem"), key_pem.as_bytes()).map_err(|e| e.to_string())
            })
    } else if kind == "wit" {
        // The WIT and its private JWK, as `mayfly wit` writes them (`mayfly wpt sign` reads them).
        super::wit::write_wit(&args.out, &reply.token, &reply.wit_key)
    } else if kind == "aws" {
        // The credential_process format, so `credential_process = cat <file>` works too.
        let c = reply.aws.take().unwrap_or_default();
        let at = std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(c.expiration.max(0).unsigned_abs());
        let text = zeroize::Zeroizing::new(
            serde_json::json!({
                "Version": 1, "AccessKeyId": c.access_key_id, "SecretAccessKey": c.secret_access_key,
                "SessionToken": c.session_token, "Expiration": crate::clock::rfc3339(at),
            })
            .to_string(),
        );
        let _ = std::fs::remove_file(args.out.join("aws-credentials.json"));
        crate::keys::write_private(&args.out.join("aws-credentials.json"), text.as_bytes()).map_err(|e| e.to_string())
    } else {
        let _ = std::fs::remove_file(args.out.join("token"));
        crate::keys::write_private(&args.out.join("token"), reply.token.as_bytes()).map_err(|e| e.to_string())
    };
    if let Err(e) = written {
        return super::fail(e);
    }
    out!(
        "break-glass {kind} for {} written to {}: credential {}, serial {}, until {}",
        reply.spiffe_id,
        args.out.display(),
        reply.credential_id,
        reply.serial,
        rfc3339_secs(reply.not_after)
    );
    if let Some(note) = reply.lifetime.as_ref().and_then(super::lifetime_note) {
        eprintln!("note: {note}");
    }
    ExitCode::SUCCESS
}

async fn list(at: &AdminAt, json: bool) -> ExitCode {
    let mut client = match at.client().await {
        Ok(c) => c,
        Err(code) => return code,
    };
    match client.break_glass_list(BreakGlassListRequest {}).await {
        Ok(r) => {
            for p in r.into_inner().pending {
                if json {
                    out!(
                        "{}",
                        json!({
                            "id": p.id, "identity": p.identity, "requester_uid": p.requester_uid,
                            "reason": p.reason, "ticket": p.ticket,
                            "requested_at": rfc3339_secs(p.requested_at), "expires_at": rfc3339_secs(p.expires_at),
                        })
                    );
                } else {
                    out!(
                        "{} {} uid {} ticket {} until {}: {}",
                        p.id,
                        p.identity,
                        p.requester_uid,
                        p.ticket,
                        rfc3339_secs(p.expires_at),
                        p.reason
                    );
                }
            }
            ExitCode::SUCCESS
        }
        Err(s) => super::fail(format!("list refused ({:?}): {}", s.code(), s.message())),
    }
}

/// One break-glass request as the ledger tells it.
#[derive(Default, serde::Serialize)]
struct Entry {
    decision: i64,
    at_ms: i64,
    /// `at_ms` as RFC 3339.
    at: String,
    identity: String,
    caller: Operator,
    justification: String,
    ticket: String,
    outcome: String,
    request: Option<String>,
    approved_by: Vec<Operator>,
    credentials: Vec<String>,
    uses: usize,
    ended: Vec<String>,
    reviews: Vec<Review>,
    overdue: bool,
}

#[derive(serde::Serialize)]
struct Review {
    by: Option<Operator>,
    note: String,
}

async fn report(at: &super::LedgerAt, since: &str, review_within: &str, json: bool) -> ExitCode {
    let (since, within) = match (Ttl::parse(since), Ttl::parse(review_within)) {
        (Ok(s), Ok(w)) => (s, w),
        (Err(e), _) | (_, Err(e)) => return super::fail(e),
    };
    let events = match at.open().await {
        Ok((_, reader)) => read_typed(reader.as_ref(), EventFilter::all()).await.map_err(|e| e.to_string()),
        Err(e) => Err(e),
    };
    let events = match events {
        Ok(e) => e,
        Err(e) => return super::fail(e),
    };
    let now_ms = i64::try_from(
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_millis(),
    )
    .unwrap_or(i64::MAX);
    let from_ms = now_ms - i64::try_from(since.as_secs()).unwrap_or(0) * 1000;
    let mut entries: BTreeMap<i64, Entry> = BTreeMap::new();
    let mut by_credential: BTreeMap<String, i64> = BTreeMap::new();
    let mut by_request: BTreeMap<String, i64> = BTreeMap::new();
    let text = |s: &Option<String>| s.clone().unwrap_or_default();
    for (row, event) in &events {
        match event {
            Event::Decision(d) if d.break_glass && row.at_ms >= from_ms => {
                let entry = Entry {
                    decision: row.seq,
                    at_ms: row.at_ms,
                    at: crate::clock::rfc3339(row.at()),
                    identity: text(&d.identity),
                    caller: d.caller.clone(),
                    justification: text(&d.justification),
                    ticket: text(&d.ticket),
                    outcome: if d.is_allow() { "allow" } else { "deny" }.to_owned(),
                    ..Entry::default()
                };
                entries.insert(row.seq, entry);
            }
            Event::BreakGlass(b) => {
                let request = text(&b.request);
                let subject = text(&b.subject);
                let target = b
                    .decision_id
                    .or_else(|| by_request.get(&request).copied())
                    .or_else(|| by_request.get(&subject).copied())
                    .or_else(|| by_credential.get(&subject).copied());
                if let Some(entry) = target.and_then(|d| entries.get_mut(&d)) {
                    if !request.is_empty() {
                        entry.request = Some(request.clone());
                        by_request.insert(request, entry.decision);
                    }
                    match b.stage {
                        Stage::Approved => entry.approved_by.push(b.approver.clone().unwrap_or_default()),
                        Stage::Reviewed => entry.reviews.push(Review { by: b.reviewer.clone(), note: text(&b.note) }),
                        Stage::Denied => entry.outcome = format!("denied ({})", text(&b.why)),
                        Stage::Refused => entry.outcome = format!("refused ({})", text(&b.why)),
                        _ => {}
                    }
                }
            }
            Event::Issued(i) if i.details.break_glass => {
                if let Some(entry) = entries.get_mut(&i.credential.decision_id) {
                    entry.credentials.push(i.credential.id.clone());
                    entry.outcome = "issued".into();
                    by_credential.insert(i.credential.id.clone(), entry.decision);
                }
            }
            Event::Used(u) => {
                if let Some(entry) = by_credential.get(&u.credential_id).and_then(|d| entries.get_mut(d)) {
                    entry.uses += 1;
                }
            }
            Event::Expired(e) => {
                if let Some(entry) = by_credential.get(&e.credential_id).and_then(|d| entries.get_mut(d)) {
                    entry.ended.push("expired".into());
                }
            }
            Event::Revoked(r) => {
                for c in &r.credentials {
                    if let Some(entry) = by_credential.get(&c.credential_id).and_then(|d| entries.get_mut(d)) {
                        entry.ended.push(format!("revoked: {}", r.reason));
                    }
                }
            }
            _ => {}
        }
    }
    let within_ms = i64::try_from(within.as_secs()).unwrap_or(0) * 1000;
    let mut overdue = 0;
    for entry in entries.values_mut() {
        entry.overdue = entry.reviews.is_empty() && entry.outcome == "issued" && now_ms - entry.at_ms > within_ms;
        overdue += usize::from(entry.overdue);
        if json {
            out!("{}", serde_json::to_string(&entry).unwrap_or_default());
        } else {
            let review = if !entry.reviews.is_empty() {
                "reviewed".to_owned()
            } else if entry.overdue {
                "UNREVIEWED, OVERDUE".to_owned()
            } else {
                "unreviewed".to_owned()
            };
            let approvers = if entry.approved_by.is_empty() {
                "nobody".to_owned()
            } else {
                serde_json::to_string(&entry.approved_by).unwrap_or_default()
            };
            let list = |v: &[String]| if v.is_empty() { "-".to_owned() } else { v.join(", ") };
            out!(
                "decision #{} at {} {} by {} ticket {} — {} — {}; approved by {approvers}; credentials {}; {} use(s); ended {}; {review}",
                entry.decision,
                entry.at,
                entry.identity,
                serde_json::to_string(&entry.caller).unwrap_or_default(),
                entry.ticket,
                entry.justification,
                entry.outcome,
                list(&entry.credentials),
                entry.uses,
                list(&entry.ended)
            );
        }
    }
    if !json {
        out!("{} break-glass request(s), {overdue} overdue for review", entries.len());
    }
    ExitCode::SUCCESS
}
