//! Incident responders' commands on a running daemon's admin socket: `mayfly revoke`,
//! `mayfly lock`, `mayfly unlock`, `mayfly credentials list`. Each prints what happened and
//! exits non-zero when it did not fully happen (including a revocation that holds but
//! could not be recorded).

use std::path::PathBuf;
use std::process::ExitCode;

use super::admin;
use crate::api::pb::revoke_request::Target;
use crate::api::pb::{CredentialInfo, ListCredentialsRequest, LockRequest, RevokeRequest, UnlockRequest};
use crate::identity::Ttl;

const DEFAULT_ADMIN_SOCKET: &str = "mayfly-admin.sock";

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
    #[arg(long, default_value = DEFAULT_ADMIN_SOCKET)]
    admin_socket: PathBuf,
}

#[derive(clap::Args)]
pub struct LockArgs {
    /// A SPIFFE ID, or a prefix ending in `/`.
    #[arg(long)]
    identity: String,
    #[arg(long)]
    reason: String,
    /// How long the lock lasts (e.g. 2h); default: until unlocked.
    #[arg(long)]
    ttl: Option<String>,
    #[arg(long, default_value = DEFAULT_ADMIN_SOCKET)]
    admin_socket: PathBuf,
}

#[derive(clap::Args)]
pub struct UnlockArgs {
    #[arg(long)]
    identity: String,
    #[arg(long)]
    reason: String,
    #[arg(long, default_value = DEFAULT_ADMIN_SOCKET)]
    admin_socket: PathBuf,
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
        #[arg(long, default_value = DEFAULT_ADMIN_SOCKET)]
        admin_socket: PathBuf,
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
    let mut client = match admin(&args.admin_socket).await {
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
            let verb = if args.dry_run { "would revoke" } else { "revoked" };
            for c in &r.credentials {
                println!("{verb} {}", line(c));
            }
            println!("{} credential(s) {verb}", r.credentials.len());
            if !r.locked.is_empty() {
                println!("{} {}", if args.dry_run { "would lock" } else { "locked" }, r.locked);
            }
            let mut aws_failed = false;
            for d in &r.aws_denies {
                if d.applied {
                    println!(
                        "aws: role {} denies sessions of {} issued before {} (inline policy {}, removed after {})",
                        d.role,
                        d.source_identity,
                        rfc3339(d.issued_before),
                        d.policy_name,
                        rfc3339(d.remove_after)
                    );
                } else {
                    aws_failed = true;
                    eprintln!(
                        "WARNING: aws: role {}: the deny was NOT placed ({}); its sessions of {} stay valid until they expire",
                        d.role, d.error, d.source_identity
                    );
                }
            }
            if !r.aws_note.is_empty() {
                aws_failed = true;
                eprintln!("WARNING: aws: {}", r.aws_note);
            }
            if !r.durable && !args.dry_run {
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
    let mut client = match admin(&args.admin_socket).await {
        Ok(c) => c,
        Err(code) => return code,
    };
    match client.lock(LockRequest { identity: args.identity.clone(), reason: args.reason, ttl_seconds }).await {
        Ok(r) => {
            let r = r.into_inner();
            let until = if r.until == 0 { "until unlocked".to_owned() } else { format!("until {}", rfc3339(r.until)) };
            println!("locked {} {until}", args.identity);
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
    let mut client = match admin(&args.admin_socket).await {
        Ok(c) => c,
        Err(code) => return code,
    };
    match client.unlock(UnlockRequest { identity: args.identity.clone(), reason: args.reason }).await {
        Ok(_) => {
            println!("unlocked {}", args.identity);
            ExitCode::SUCCESS
        }
        Err(s) => super::fail(format!("unlock refused ({:?}): {}", s.code(), s.message())),
    }
}

pub async fn credentials(command: CredentialsCommand) -> ExitCode {
    let CredentialsCommand::List { identity, active, json, admin_socket } = command;
    let mut client = match admin(&admin_socket).await {
        Ok(c) => c,
        Err(code) => return code,
    };
    match client.list_credentials(ListCredentialsRequest { identity: identity.unwrap_or_default(), active }).await {
        Ok(r) => {
            for c in r.into_inner().credentials {
                if json {
                    println!(
                        "{}",
                        serde_json::json!({
                            "credential_id": c.credential_id, "kind": c.kind, "identity": c.identity, "serial": c.serial,
                            "not_before": c.not_before, "not_after": c.not_after, "policy_version": c.policy_version, "revoked": c.revoked,
                        })
                    );
                } else {
                    println!("{}", line(&c));
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

fn rfc3339(secs: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(secs)
        .ok()
        .and_then(|t| t.format(&time::format_description::well_known::Rfc3339).ok())
        .unwrap_or_else(|| secs.to_string())
}
