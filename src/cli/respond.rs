//! Incident responders' commands on a running daemon's admin socket: `mayfly revoke`,
//! `mayfly lock`, `mayfly unlock`, `mayfly credentials list`. Each prints what happened and
//! exits non-zero when it did not fully happen (including a revocation that holds but
//! could not be recorded).

use std::process::ExitCode;

use serde_json::json;

use super::AdminAt;
use crate::api::pb::revoke_request::Target;
use crate::api::pb::{CredentialInfo, ListCredentialsRequest, LockRequest, RevokeRequest, UnlockRequest};
use crate::clock::rfc3339_secs as rfc3339;
use crate::identity::Ttl;

#[derive(clap::Args)]
#[group(id = "what", required = true, multiple = false)]
pub struct What {
    /// A credential id (for a JWT also its jti).
    #[arg(long, group = "what")]
    credential: Option<String>,
    /// An X.509 serial, hex.
    #[arg(long, group = "what")]
    serial: Option<String>,
    /// A SPIFFE ID, or a prefix ending in `/`: revokes everything it holds and locks it.
    #[arg(long, group = "what")]
    identity: Option<String>,
    /// key=value against what the issuing decision recorded: repository=acme/app, ref=…,
    /// sha=…, workflow=…, run_id=…, uid=1001, exe=/usr/bin/x, …
    #[arg(long, group = "what")]
    selector: Option<String>,
    /// A policy bundle version: everything issued under that release.
    #[arg(long, group = "what")]
    bundle: Option<String>,
}

#[derive(clap::Args)]
#[command(after_help = "Examples:\n  \
    mayfly revoke --identity spiffe://mayfly.local/ci/acme/app --reason \"INC-7: token in a log\" --dry-run\n  \
    mayfly revoke --selector repository=acme/app --reason \"INC-7\" --json\n  \
    mayfly revoke --credential 3f1c9a0b-… --reason \"leaked\" --admin-socket /run/mayfly/admin.sock\n\
    Exit 0: revoked (or nothing was left to revoke); 1: refused, or applied but NOT recorded, or an AWS deny not placed.")]
pub struct RevokeArgs {
    #[command(flatten)]
    what: What,
    /// Why (required): recorded with who you are.
    #[arg(long)]
    reason: String,
    /// List what would be revoked; change nothing.
    #[arg(long)]
    dry_run: bool,
    /// Confirm a prefix that matches every identity of the trust domain.
    #[arg(long)]
    all: bool,
    /// How long the identity's lock lasts (e.g. 24h); default: until `mayfly unlock`.
    #[arg(long)]
    lock_ttl: Option<String>,
    /// One JSON object: credentials (each with already_revoked), newly_revoked,
    /// already_revoked, locked, durable, event_id, aws_denies.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    at: AdminAt,
}

#[derive(clap::Args)]
#[command(after_help = "Example:\n  mayfly lock --identity spiffe://mayfly.local/ci/acme/ --reason \"INC-7\" --ttl 2h")]
pub struct LockArgs {
    /// A SPIFFE ID, or a prefix ending in `/`.
    #[arg(long)]
    identity: String,
    /// Why (required): recorded with who you are.
    #[arg(long)]
    reason: String,
    /// How long the lock lasts (e.g. 2h); default: until unlocked.
    #[arg(long)]
    ttl: Option<String>,
    /// One JSON object: identity, until (RFC 3339, or null), durable.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    at: AdminAt,
}

#[derive(clap::Args)]
pub struct UnlockArgs {
    /// The SPIFFE ID or prefix exactly as locked.
    #[arg(long)]
    identity: String,
    /// Why (required): recorded with who you are.
    #[arg(long)]
    reason: String,
    /// One JSON object: identity, unlocked.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    at: AdminAt,
}

#[derive(clap::Subcommand)]
pub enum CredentialsCommand {
    /// Credentials on record, newest first, with their state.
    List {
        /// A SPIFFE ID, or a prefix ending in `/`.
        #[arg(long)]
        identity: Option<String>,
        /// Only those not yet expired.
        #[arg(long)]
        active: bool,
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        at: AdminAt,
    },
}

fn seconds(ttl: Option<String>) -> Result<i64, ExitCode> {
    match ttl {
        None => Ok(0),
        Some(t) => Ttl::parse(&t)
            .map(|t| i64::try_from(t.as_secs()).unwrap_or(i64::MAX))
            .map_err(|e| super::fail(format!("--ttl: {e}"))),
    }
}

pub async fn revoke(args: RevokeArgs) -> ExitCode {
    let w = args.what;
    let target = match (w.credential, w.serial, w.identity, w.selector, w.bundle) {
        (Some(c), ..) => Target::CredentialId(c),
        (_, Some(s), ..) => Target::Serial(s),
        (_, _, Some(i), ..) => Target::Identity(i),
        (_, _, _, Some(s), _) => Target::Selector(s),
        (_, _, _, _, Some(b)) => Target::BundleVersion(b),
        _ => return super::fail("name what to revoke: --credential, --serial, --identity, --selector or --bundle"),
    };
    let lock_ttl_seconds = match seconds(args.lock_ttl) {
        Ok(s) => s,
        Err(code) => return code,
    };
    let mut client = match args.at.client().await {
        Ok(c) => c,
        Err(code) => return code,
    };
    let request = RevokeRequest {
        target: Some(target),
        reason: args.reason,
        dry_run: args.dry_run,
        all: args.all,
        lock_ttl_seconds,
    };
    match client.revoke(request).await {
        Ok(r) => {
            let r = r.into_inner();
            let aws_failed = !r.aws_note.is_empty() || r.aws_denies.iter().any(|d| !d.applied);
            let not_durable = !r.durable && !args.dry_run;
            if args.json {
                let denies: Vec<_> = r
                    .aws_denies
                    .iter()
                    .map(|d| {
                        json!({
                            "role": d.role, "policy_name": d.policy_name, "source_identity": d.source_identity,
                            "issued_before": rfc3339(d.issued_before), "remove_after": rfc3339(d.remove_after),
                            "applied": d.applied, "error": d.error,
                        })
                    })
                    .collect();
                out!(
                    "{}",
                    json!({
                        "dry_run": args.dry_run,
                        "credentials": r.credentials.iter().map(credential_json).collect::<Vec<_>>(),
                        "newly_revoked": r.newly_revoked, "already_revoked": r.already_revoked,
                        "locked": (!r.locked.is_empty()).then_some(&r.locked), "already_locked": r.already_locked,
                        "durable": r.durable, "event_id": r.event_id, "aws_denies": denies,
                        "aws_note": (!r.aws_note.is_empty()).then_some(&r.aws_note),
                    })
                );
            } else {
                let verb = if args.dry_run { "would revoke" } else { "revoked" };
                for c in &r.credentials {
                    let what = if c.already_revoked { "already revoked" } else { verb };
                    out!("{what:<15} {}", line(c));
                }
                out!("{} credential(s) {verb}, {} already revoked before", r.newly_revoked, r.already_revoked);
                if !r.locked.is_empty() {
                    let lock = match (args.dry_run, r.already_locked) {
                        (true, true) | (false, true) => "already locked (lock renewed)",
                        (true, false) => "would lock",
                        (false, false) => "locked",
                    };
                    out!("{lock} {}", r.locked);
                }
                for d in &r.aws_denies {
                    if d.applied {
                        out!(
                            "aws: role {} denies sessions of {} issued before {} (inline policy {}, removed after {})",
                            d.role,
                            d.source_identity,
                            rfc3339(d.issued_before),
                            d.policy_name,
                            rfc3339(d.remove_after)
                        );
                    }
                }
            }
            for d in r.aws_denies.iter().filter(|d| !d.applied) {
                eprintln!(
                    "WARNING: aws: role {}: the deny was NOT placed ({}); its sessions of {} stay valid until they expire",
                    d.role, d.error, d.source_identity
                );
            }
            if !r.aws_note.is_empty() {
                eprintln!("WARNING: aws: {}", r.aws_note);
            }
            if not_durable {
                eprintln!(
                    "WARNING: applied on this daemon but NOT recorded in the ledger; it is lost at a restart. Fix the ledger and revoke again."
                );
                return ExitCode::FAILURE;
            }
            if aws_failed { ExitCode::FAILURE } else { ExitCode::SUCCESS }
        }
        Err(s) => super::fail(format!("revoke refused ({:?}): {}", s.code(), s.message())),
    }
}

pub async fn lock(args: LockArgs) -> ExitCode {
    let ttl_seconds = match seconds(args.ttl) {
        Ok(s) => s,
        Err(code) => return code,
    };
    let mut client = match args.at.client().await {
        Ok(c) => c,
        Err(code) => return code,
    };
    match client.lock(LockRequest { identity: args.identity.clone(), reason: args.reason, ttl_seconds }).await {
        Ok(r) => {
            let r = r.into_inner();
            if args.json {
                let until = (r.until != 0).then(|| rfc3339(r.until));
                out!("{}", json!({ "identity": args.identity, "until": until, "durable": r.durable }));
            } else {
                let until =
                    if r.until == 0 { "until unlocked".to_owned() } else { format!("until {}", rfc3339(r.until)) };
                out!("locked {} {until}", args.identity);
            }
            if r.durable {
                ExitCode::SUCCESS
            } else {
                super::fail("WARNING: the lock holds but was NOT recorded in the ledger")
            }
        }
        Err(s) => super::fail(format!("lock refused ({:?}): {}", s.code(), s.message())),
    }
}

pub async fn unlock(args: UnlockArgs) -> ExitCode {
    let mut client = match args.at.client().await {
        Ok(c) => c,
        Err(code) => return code,
    };
    match client.unlock(UnlockRequest { identity: args.identity.clone(), reason: args.reason }).await {
        Ok(_) => {
            if args.json {
                out!("{}", json!({ "identity": args.identity, "unlocked": true }));
            } else {
                out!("unlocked {}", args.identity);
            }
            ExitCode::SUCCESS
        }
        Err(s) => super::fail(format!("unlock refused ({:?}): {}", s.code(), s.message())),
    }
}

pub async fn credentials(command: CredentialsCommand) -> ExitCode {
    let CredentialsCommand::List { identity, active, json, at } = command;
    let mut client = match at.client().await {
        Ok(c) => c,
        Err(code) => return code,
    };
    match client.list_credentials(ListCredentialsRequest { identity: identity.unwrap_or_default(), active }).await {
        Ok(r) => {
            for c in r.into_inner().credentials {
                if json {
                    out!("{}", credential_json(&c));
                } else {
                    out!("{}", line(&c));
                }
            }
            ExitCode::SUCCESS
        }
        Err(s) => super::fail(format!("list refused ({:?}): {}", s.code(), s.message())),
    }
}

fn line(c: &CredentialInfo) -> String {
    let state = if c.revoked {
        "REVOKED"
    } else if c.not_after <= crate::clock::unix_secs(std::time::SystemTime::now()) {
        "expired"
    } else {
        "active"
    };
    format!(
        "{:<8} {:<4} {} {} serial {} until {} ({})",
        state,
        c.kind,
        c.credential_id,
        c.identity,
        c.serial,
        rfc3339(c.not_after),
        c.policy_version
    )
}

/// A credential as JSON: times as RFC 3339 and as Unix seconds.
fn credential_json(c: &CredentialInfo) -> serde_json::Value {
    json!({
        "credential_id": c.credential_id, "kind": c.kind, "identity": c.identity, "serial": c.serial,
        "not_before": c.not_before, "not_after": c.not_after,
        "not_before_rfc3339": rfc3339(c.not_before), "not_after_rfc3339": rfc3339(c.not_after),
        "policy_version": c.policy_version, "revoked": c.revoked, "already_revoked": c.already_revoked,
    })
}
