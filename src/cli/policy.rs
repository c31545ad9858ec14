//! `mayfly policy …`: the release path of a policies/ change — validate, test, build, sign,
//! verify — and the admin side on a running daemon — status, rollback. Each step exits 0
//! only when it fully succeeded; output names the file, line and rule.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::SystemTime;

use serde_json::json;

use super::AdminAt;
use crate::api::pb::{PolicyRelease, PolicyRollbackRequest, PolicyStatusRequest};
use crate::config::DEV_TRUST_DOMAIN;
use crate::identity::{Inventory, TrustDomain};
use crate::policy::Engine;
use crate::policy::bundle::{Bundle, PolicyFiles, PublicKey, SigningKey, keygen};
use crate::policy::cases;
use crate::policy::release::Release;

#[derive(clap::Subcommand)]
pub enum Command {
    /// Parse the rules, validate them against the schema, and check the inventory.
    #[command(
        after_help = "Examples:\n  mayfly policy validate policies\n  mayfly policy validate policies --json | jq .valid"
    )]
    Validate {
        /// The policies/ tree.
        #[arg(default_value = "policies")]
        dir: PathBuf,
        /// Trust domain inventory ids must belong to.
        #[arg(long, default_value = DEV_TRUST_DOMAIN)]
        trust_domain: String,
        /// One JSON object: valid, version, rules, inventory_entries, exceptions, debts, error.
        #[arg(long)]
        json: bool,
    },
    /// Run every case in DIR/tests/*.toml and print what failed and why.
    #[command(
        after_help = "Examples:\n  mayfly policy test policies        # exit 1 if any case fails\n  mayfly policy test policies --json"
    )]
    Test {
        /// The policies/ tree.
        #[arg(default_value = "policies")]
        dir: PathBuf,
        /// Trust domain inventory ids must belong to.
        #[arg(long, default_value = DEV_TRUST_DOMAIN)]
        trust_domain: String,
        /// One JSON object: passed, failed, cases [{name, file, ok, failure}].
        #[arg(long)]
        json: bool,
    },
    /// Validate and test DIR, then write it as one content-addressed bundle (unsigned).
    Build {
        /// The policies/ tree.
        #[arg(default_value = "policies")]
        dir: PathBuf,
        /// Where to write the bundle.
        #[arg(long)]
        out: PathBuf,
        /// A human label carried in the manifest, e.g. a git commit (not part of the version).
        #[arg(long)]
        label: Option<String>,
        /// Trust domain inventory ids must belong to.
        #[arg(long, default_value = DEV_TRUST_DOMAIN)]
        trust_domain: String,
    },
    /// Sign a bundle with an Ed25519 private key (PKCS#8 PEM); rewrites FILE in place.
    Sign {
        /// The bundle to sign (rewritten in place).
        file: PathBuf,
        /// The Ed25519 private key (PKCS#8 PEM).
        #[arg(long)]
        key: PathBuf,
    },
    /// Check a bundle's signature against a public key (PEM), and that it validates and its tests pass.
    Verify {
        /// The bundle to check.
        file: PathBuf,
        /// A public key (PEM) the signature may verify with; repeatable.
        #[arg(long)]
        key: Vec<PathBuf>,
        /// Trust domain inventory ids must belong to.
        #[arg(long, default_value = DEV_TRUST_DOMAIN)]
        trust_domain: String,
    },
    /// Make an Ed25519 signing pair: PREFIX.key (PKCS#8 PEM, mode 0600) and PREFIX.pub.
    Keygen {
        /// File name prefix: writes PREFIX.key and PREFIX.pub.
        #[arg(long, default_value = "policy-signing")]
        out: PathBuf,
    },
    /// Show the running daemon's active release, its rollback history and held versions (admin socket).
    Status {
        /// One JSON object: current, history (most recent first), held.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        at: AdminAt,
    },
    /// Decide the requests recorded in the ledger again under a candidate release and report
    /// every decision that would change, by identity and rule; exit 1 if any recorded
    /// request would get more (newly allowed, or a longer lifetime).
    Replay {
        /// The candidate: a bundle file or a policies/ directory.
        #[arg(long)]
        bundle: PathBuf,
        #[command(flatten)]
        ledger: super::assurance::LedgerArgs,
        #[command(flatten)]
        source: super::assurance::Source,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
        /// Also record the report in the running daemon's ledger (a `policy_check` event).
        #[arg(long)]
        admin_socket: Option<PathBuf>,
    },
    /// `--prove CURRENT CANDIDATE`: prove with Cedar's symbolic compiler and cvc5 that the
    /// candidate permits nothing the current release denies (issuance and break-glass
    /// rules, per request environment), that no break-glass rule permits a request
    /// assurance/critical.cedar marks critical, and that no rule can error; or print a
    /// counterexample and the rule that grants it. Exit 1 on any finding, 2 without cvc5.
    Diff {
        /// Prove with the symbolic compiler and cvc5 (the only mode).
        #[arg(long)]
        prove: bool,
        /// The active release: a bundle file or a policies/ directory.
        current: PathBuf,
        /// The candidate release: a bundle file or a policies/ directory.
        candidate: PathBuf,
        #[command(flatten)]
        source: super::assurance::Source,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
        /// Also record the report in the running daemon's ledger (a `policy_check` event) through this admin socket.
        #[arg(long)]
        admin_socket: Option<PathBuf>,
    },
    /// The release gate: validate, tests, replay (with a ledger) and the proof (with cvc5),
    /// as one Markdown report for a pull request; exit 1 on any escalation or failed test.
    PromoteCheck {
        /// The active release: a bundle file or a policies/ directory.
        #[arg(long)]
        current: PathBuf,
        /// The candidate release: a bundle file or a policies/ directory.
        #[arg(long)]
        candidate: PathBuf,
        /// Replay recorded requests from this ledger (else from --data-dir's, if it has one).
        #[arg(long)]
        ledger: Option<PathBuf>,
        /// Replay from this data directory's ledger.
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// How far back to replay recorded requests (e.g. 24h, 7d).
        #[arg(long, default_value = "7d")]
        since: String,
        #[command(flatten)]
        source: super::assurance::Source,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
        /// Also record the report in the running daemon's ledger (a `policy_check` event) through this admin socket.
        #[arg(long)]
        admin_socket: Option<PathBuf>,
        /// Block when the proof cannot run (no cvc5) instead of reporting it skipped.
        #[arg(long)]
        require_proof: bool,
        /// Block when there is no ledger to replay.
        #[arg(long)]
        require_replay: bool,
    },
    /// What a release went through, from the ledger: recorded checks, shadow runs and their
    /// differences, activations. Exit 1 if it was activated without a passing promote-check
    /// recorded before.
    Evidence {
        /// The release version (`sha256:…`, or just the hex).
        version: String,
        #[command(flatten)]
        ledger: super::assurance::LedgerArgs,
    },
    /// Shadow mode on a running daemon: decide live requests with CANDIDATE beside the active
    /// release and record each difference (`policy_shadow_diff`), never acting on it.
    Shadow {
        /// A bundle file (verified with the daemon's trusted keys), or in dev a policies/ directory.
        candidate: Option<PathBuf>,
        /// End shadow mode instead of starting it.
        #[arg(long)]
        stop: bool,
        /// Why (recorded).
        #[arg(long)]
        reason: String,
        #[command(flatten)]
        at: AdminAt,
    },
    /// Return the running daemon to the most recent release of its rollback history (admin socket).
    #[command(after_help = "The release rolled back from leaves the history and is held (not activated from the\n\
        bundle path again until a version that is not held is published): a second rollback goes\n\
        one more release back, never forward; with no earlier release it fails (exit 1).\n\
        Example:\n  mayfly policy rollback --reason \"INC-7: release denies deploys\" --admin-socket /run/mayfly/admin.sock")]
    Rollback {
        /// Why: recorded in the ledger with the operator.
        #[arg(long)]
        reason: String,
        /// One JSON object: from, to (releases), event_id.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        at: AdminAt,
    },
}

pub async fn run(command: Command) -> ExitCode {
    match command {
        Command::Validate { dir, trust_domain, json } => validate(&dir, &trust_domain, json),
        Command::Test { dir, trust_domain, json } => test(&dir, &trust_domain, json),
        Command::Build { dir, out, label, trust_domain } => build(&dir, &out, label, &trust_domain),
        Command::Sign { file, key } => sign(&file, &key),
        Command::Verify { file, key, trust_domain } => verify(&file, &key, &trust_domain),
        Command::Keygen { out } => keygen_files(&out),
        Command::Status { json, at } => status(&at, json).await,
        Command::Rollback { reason, json, at } => rollback(&at, reason, json).await,
        Command::Replay { bundle, ledger, source, json, admin_socket } => {
            super::assurance::replay_cmd(&bundle, &source, &ledger, json, admin_socket.as_deref()).await
        }
        Command::Diff { prove, current, candidate, source, json, admin_socket } => {
            super::assurance::diff_cmd(prove, &current, &candidate, &source, json, admin_socket.as_deref()).await
        }
        Command::PromoteCheck {
            current,
            candidate,
            ledger,
            data_dir,
            since,
            source,
            json,
            admin_socket,
            require_proof,
            require_replay,
        } => {
            let ledger = (ledger.is_some() || data_dir.is_some())
                .then(|| super::assurance::LedgerArgs::new(super::LedgerAt { ledger, data_dir, config: None }, since));
            super::assurance::promote_check(super::assurance::PromoteArgs {
                current: &current,
                candidate: &candidate,
                source: &source,
                ledger: ledger.as_ref(),
                json_out: json,
                admin_socket: admin_socket.as_deref(),
                require_proof,
                require_replay,
            })
            .await
        }
        Command::Evidence { version, ledger } => super::assurance::evidence(&version, &ledger).await,
        Command::Shadow { candidate, stop, reason, at } => {
            super::assurance::shadow_cmd(candidate.as_deref(), stop, &reason, &at).await
        }
    }
}

fn fail(what: impl std::fmt::Display) -> ExitCode {
    eprintln!("{what}");
    ExitCode::FAILURE
}

fn load(dir: &Path, trust_domain: &str) -> Result<(PolicyFiles, Engine, Inventory), String> {
    let td = TrustDomain::parse(trust_domain).map_err(|e| format!("--trust-domain: {e}"))?;
    let files = PolicyFiles::read_dir(dir).map_err(|e| e.to_string())?;
    let engine = Engine::from_files(&files).map_err(|e| e.to_string())?;
    let text = files.get("inventory.toml").unwrap_or_default();
    let inventory =
        Inventory::parse(text, &td).map_err(|e| format!("`{}`: {e}", dir.join("inventory.toml").display()))?;
    Ok((files, engine, inventory))
}

fn validate(dir: &Path, trust_domain: &str, json: bool) -> ExitCode {
    let (_, engine, inventory) = match load(dir, trust_domain) {
        Ok(loaded) => loaded,
        Err(why) if json => {
            out!("{}", json!({ "dir": dir.display().to_string(), "valid": false, "error": why }));
            return ExitCode::FAILURE;
        }
        Err(why) => return fail(format!("policy `{}`: INVALID\n{why}", dir.display())),
    };
    let today = crate::clock::utc_date(SystemTime::now());
    let mut notes = Vec::new();
    for e in engine.exceptions() {
        let days_left = (e.expires - today).whole_days();
        if e.is_expired(today) {
            notes.push(format!(
                "debt: exception `{}` ({}) expired after {}; it grants nothing; owner {} should remove it",
                e.id,
                e.path.display(),
                e.expires,
                e.owner
            ));
        } else if days_left < 14 {
            notes.push(format!(
                "warning: exception `{}` ({}) stops applying after {} ({} days); owner {}",
                e.id,
                e.path.display(),
                e.expires,
                days_left,
                e.owner
            ));
        }
    }
    for entry in inventory.entries().iter().filter(|e| e.is_expired(today)) {
        notes.push(format!(
            "debt: inventory entry `{}` expired on {}; owner {} should renew or remove it",
            entry.id, entry.expires, entry.owner
        ));
    }
    if json {
        out!(
            "{}",
            json!({
                "dir": dir.display().to_string(), "valid": true, "version": engine.version(),
                "rules": engine.rule_count(), "inventory_entries": inventory.entries().len(),
                "exceptions": engine.exceptions().len(), "notes": notes,
            })
        );
        return ExitCode::SUCCESS;
    }
    out!(
        "policy `{}`: valid (version {}, {} rules, {} inventory entries, {} exceptions)",
        dir.display(),
        engine.version(),
        engine.rule_count(),
        inventory.entries().len(),
        engine.exceptions().len()
    );
    for note in notes {
        out!("{note}");
    }
    ExitCode::SUCCESS
}

fn test(dir: &Path, trust_domain: &str, json: bool) -> ExitCode {
    let (files, engine, inventory) = match load(dir, trust_domain) {
        Ok(loaded) => loaded,
        Err(why) if json => {
            out!("{}", json!({ "dir": dir.display().to_string(), "valid": false, "error": why }));
            return ExitCode::FAILURE;
        }
        Err(why) => return fail(format!("policy `{}`: INVALID\n{why}", dir.display())),
    };
    let outcomes = cases::run_all(&engine, &inventory, &files, SystemTime::now());
    if outcomes.is_empty() {
        return fail(format!("no cases in `{}`", dir.join("tests").display()));
    }
    let failed = outcomes.iter().filter(|o| o.failure.is_some()).count();
    let passed = outcomes.len() - failed;
    if json {
        let cases: Vec<_> = outcomes
            .iter()
            .map(|o| {
                json!({
                    "name": o.name, "file": dir.join(&o.file).display().to_string(),
                    "ok": o.failure.is_none(), "failure": o.failure,
                })
            })
            .collect();
        out!("{}", json!({ "dir": dir.display().to_string(), "passed": passed, "failed": failed, "cases": cases }));
        return if failed == 0 { ExitCode::SUCCESS } else { ExitCode::FAILURE };
    }
    for o in &outcomes {
        match &o.failure {
            None => out!("ok    {}", o.name),
            Some(why) => out!("FAIL  {} ({})\n      {why}", o.name, dir.join(&o.file).display()),
        }
    }
    out!("policy: {passed} passed, {failed} failed");
    if failed == 0 { ExitCode::SUCCESS } else { ExitCode::FAILURE }
}

fn build(dir: &Path, out: &Path, label: Option<String>, trust_domain: &str) -> ExitCode {
    let td = match TrustDomain::parse(trust_domain) {
        Ok(td) => td,
        Err(e) => return fail(format!("--trust-domain: {e}")),
    };
    let files = match PolicyFiles::read_dir(dir) {
        Ok(f) => f,
        Err(e) => return fail(e),
    };
    let release = match Release::build(&files, &td, label.clone(), None, dir.display().to_string()) {
        Ok(r) => r,
        Err(why) => return fail(format!("policy `{}`: not built: {why}", dir.display())),
    };
    let cases = match release.test(&files, SystemTime::now()) {
        Ok(n) if n > 0 => n,
        Ok(_) => {
            return fail(format!(
                "policy `{}`: not built: tests/ has no cases; a release is tested before it ships",
                dir.display()
            ));
        }
        Err(why) => return fail(format!("policy `{}`: not built: {why}", dir.display())),
    };
    let bytes = match Bundle::build(&files, label) {
        Ok(b) => b,
        Err(e) => return fail(e),
    };
    if let Err(e) = write_atomic(out, &bytes) {
        return fail(format!("cannot write `{}`: {e}", out.display()));
    }
    out!(
        "built `{}`: version {} ({} files, {} rules, {} test cases passed); unsigned: run `mayfly policy sign {} --key KEY`",
        out.display(),
        release.version(),
        files.len(),
        release.engine.rule_count(),
        cases,
        out.display()
    );
    ExitCode::SUCCESS
}

fn sign(file: &Path, key: &Path) -> ExitCode {
    let key = match SigningKey::load(key) {
        Ok(k) => k,
        Err(e) => return fail(e),
    };
    let bundle =
        match std::fs::read(file).map_err(|e| e.to_string()).and_then(|b| Bundle::parse(&b).map_err(|e| e.to_string()))
        {
            Ok(b) => b,
            Err(why) => return fail(format!("`{}`: {why}", file.display())),
        };
    let signed = match bundle.sign(&key) {
        Ok(s) => s,
        Err(e) => return fail(e),
    };
    if let Err(e) = write_atomic(file, &signed) {
        return fail(format!("cannot write `{}`: {e}", file.display()));
    }
    out!("signed `{}`: version {} with key {}", file.display(), bundle.version(), key.key_id());
    ExitCode::SUCCESS
}

fn verify(file: &Path, keys: &[PathBuf], trust_domain: &str) -> ExitCode {
    if keys.is_empty() {
        return fail("--key PUBKEY is required (repeatable)");
    }
    let keys = match keys.iter().map(|k| PublicKey::load(k)).collect::<Result<Vec<_>, _>>() {
        Ok(k) => k,
        Err(e) => return fail(e),
    };
    let td = match TrustDomain::parse(trust_domain) {
        Ok(td) => td,
        Err(e) => return fail(format!("--trust-domain: {e}")),
    };
    let bundle =
        match std::fs::read(file).map_err(|e| e.to_string()).and_then(|b| Bundle::parse(&b).map_err(|e| e.to_string()))
        {
            Ok(b) => b,
            Err(why) => return fail(format!("`{}`: REJECTED: {why}", file.display())),
        };
    let key_id = match bundle.verify(&keys) {
        Ok(id) => id,
        Err(e) => return fail(format!("`{}`: REJECTED: {e}", file.display())),
    };
    let label = bundle.manifest.label.clone();
    let tested = Release::build(&bundle.files, &td, label, Some(key_id.clone()), file.display().to_string())
        .and_then(|r| r.test(&bundle.files, SystemTime::now()).map(|cases| (r, cases)));
    match tested {
        Ok((r, cases)) => {
            out!(
                "verified `{}`: version {}{}, signed by {key_id}, {} rules, {} test cases passed",
                file.display(),
                r.version(),
                r.provenance.label.as_deref().map(|l| format!(" ({l})")).unwrap_or_default(),
                r.engine.rule_count(),
                cases
            );
            ExitCode::SUCCESS
        }
        Err(why) => fail(format!("`{}`: REJECTED: signature good but the release is not: {why}", file.display())),
    }
}

fn keygen_files(prefix: &Path) -> ExitCode {
    let (private, public, key_id) = match keygen() {
        Ok(k) => k,
        Err(e) => return fail(e),
    };
    let (key_path, pub_path) = (prefix.with_extension("key"), prefix.with_extension("pub"));
    if let Err(e) = crate::keys::write_private(&key_path, private.as_bytes()) {
        return fail(e);
    }
    if let Err(e) = std::fs::write(&pub_path, public) {
        return fail(format!("cannot write `{}`: {e}", pub_path.display()));
    }
    out!(
        "key {key_id}: private `{}` (mode 0600; keep it off the daemon's host), public `{}` (list it in policy.trusted_keys)",
        key_path.display(),
        pub_path.display()
    );
    ExitCode::SUCCESS
}

fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("partial");
    std::fs::write(&tmp, bytes)?;
    std::fs::File::open(&tmp)?.sync_all()?;
    std::fs::rename(&tmp, path)
}

fn describe(r: &PolicyRelease) -> String {
    let label = if r.label.is_empty() { String::new() } else { format!(" ({})", r.label) };
    let signer = if r.signed_by.is_empty() { "UNSIGNED".to_owned() } else { format!("signed by {}", r.signed_by) };
    format!(
        "{}{label}, {signer}, {} rules, {} inventory entries, from {}",
        r.version, r.rules, r.inventory_entries, r.source
    )
}

fn release_json(r: &PolicyRelease) -> serde_json::Value {
    json!({
        "version": r.version, "label": r.label, "signed_by": r.signed_by, "source": r.source,
        "rules": r.rules, "inventory_entries": r.inventory_entries,
    })
}

async fn status(at: &AdminAt, json: bool) -> ExitCode {
    let mut client = match at.client().await {
        Ok(c) => c,
        Err(code) => return code,
    };
    match client.policy_status(PolicyStatusRequest {}).await {
        Ok(r) => {
            let r = r.into_inner();
            if json {
                out!(
                    "{}",
                    json!({
                        "current": r.current.as_ref().map(release_json),
                        "history": r.history.iter().map(release_json).collect::<Vec<_>>(),
                        "held": r.held_versions,
                    })
                );
                return ExitCode::SUCCESS;
            }
            out!("current:  {}", r.current.as_ref().map(describe).unwrap_or_default());
            if r.history.is_empty() {
                out!("history:  none (nothing to roll back to)");
            }
            for (i, h) in r.history.iter().enumerate() {
                let label = if i == 0 { "previous:" } else { "earlier: " };
                out!("{label} {}", describe(h));
            }
            for held in &r.held_versions {
                out!("held:     {held} (rolled back; not re-activated until a version that is not held is published)");
            }
            ExitCode::SUCCESS
        }
        Err(s) => fail(format!("policy status: {}", s.message())),
    }
}

async fn rollback(at: &AdminAt, reason: String, json: bool) -> ExitCode {
    let mut client = match at.client().await {
        Ok(c) => c,
        Err(code) => return code,
    };
    match client.policy_rollback(PolicyRollbackRequest { reason }).await {
        Ok(r) => {
            let r = r.into_inner();
            if json {
                out!(
                    "{}",
                    json!({
                        "from": r.from.as_ref().map(release_json), "to": r.to.as_ref().map(release_json),
                        "event_id": r.event_id,
                    })
                );
            } else {
                out!(
                    "rolled back: {} -> {} (ledger event {}); {} is held",
                    r.from.as_ref().map(|f| f.version.as_str()).unwrap_or_default(),
                    r.to.as_ref().map(describe).unwrap_or_default(),
                    r.event_id,
                    r.from.as_ref().map(|f| f.version.as_str()).unwrap_or_default(),
                );
            }
            ExitCode::SUCCESS
        }
        Err(s) => fail(format!("policy rollback refused: {}", s.message())),
    }
}
