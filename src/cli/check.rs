//! `mayfly config check [--config FILE]`: validates a configuration and every file it names
//! — the policy source (signature, schema, inventory, as an activation would), the trusted
//! keys, the CA and JWT key files, the TLS certificate and key, the directories the daemon
//! writes and the sockets' directories — without starting anything, binding anything or
//! writing anything. Exit 0 when every check passes, 1 otherwise.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::SystemTime;

use serde_json::json;

use crate::config::{CaSource, Config, TlsSource};

#[derive(clap::Subcommand)]
pub enum Command {
    /// Validate a configuration and the files it points to; start nothing.
    #[command(after_help = "Examples:\n  \
        mayfly config check --config /etc/mayfly/mayfly.toml\n  \
        MAYFLY_CONFIG=/etc/mayfly/mayfly.toml mayfly config check --json")]
    Check {
        /// The configuration file.
        #[arg(long, env = "MAYFLY_CONFIG", default_value = "mayfly.toml")]
        config: PathBuf,
        /// One JSON object: {"config", "ok", "checks": [{"check", "ok", "detail"}]}.
        #[arg(long)]
        json: bool,
    },
}

pub async fn run(command: Command) -> ExitCode {
    let Command::Check { config, json } = command;
    let checks = check(&config);
    let ok = checks.iter().all(|(_, r)| r.is_ok());
    if json {
        let list: Vec<_> = checks
            .iter()
            .map(|(name, r)| match r {
                Ok(d) => json!({ "check": name, "ok": true, "detail": d }),
                Err(why) => json!({ "check": name, "ok": false, "detail": why }),
            })
            .collect();
        out!("{}", json!({ "config": config.display().to_string(), "ok": ok, "checks": list }));
    } else {
        for (name, result) in &checks {
            match result {
                Ok(detail) => out!("ok    {name}: {detail}"),
                Err(why) => out!("FAIL  {name}: {why}"),
            }
        }
        let failed = checks.iter().filter(|(_, r)| r.is_err()).count();
        out!("config `{}`: {}", config.display(), if ok { "valid".to_owned() } else { format!("{failed} problem(s)") });
    }
    if ok { ExitCode::SUCCESS } else { ExitCode::FAILURE }
}

type Check = (String, Result<String, String>);

fn check(path: &Path) -> Vec<Check> {
    let config = match Config::from_file(path) {
        Ok(c) => c,
        Err(e) => return vec![("config".into(), Err(e.to_string()))],
    };
    let mut checks: Vec<Check> = vec![("config".into(), Ok("every key is known and valid".into()))];
    let mut add = |name: &str, result: Result<String, String>| checks.push((name.to_owned(), result));
    add("data_dir", writable_dir(&config.data_dir, true));
    add("policy", crate::policy::activation::check_source(&config.policy, &config.trust_domain));
    let now = SystemTime::now();
    match &config.ca {
        CaSource::Files { cert, key } => add(
            "ca",
            crate::keys::CertificateAuthority::load(cert, key, now)
                .map(|ca| format!("`{}`, valid until {}", cert.display(), crate::clock::rfc3339(ca.not_after())))
                .map_err(|e| e.to_string()),
        ),
        CaSource::Generated { dir } => add("ca", Ok(format!("generated on first start into `{}`", dir.display()))),
    }
    match &config.jwt_key {
        Some(key) => add(
            "jwt.key",
            crate::keys::JwtKey::load(key)
                .map(|k| format!("`{}`, kid {}", key.display(), k.kid()))
                .map_err(|e| e.to_string()),
        ),
        None => add("jwt.key", Ok("generated on first start into data_dir".into())),
    }
    if let Some(listen) = &config.listen {
        match &listen.tls {
            TlsSource::Files { cert, key } => add(
                "listen.cert",
                crate::api::serve::tls_files_config(cert, key).map(|_| {
                    let sha = crate::api::serve::certificate_sha256(cert).unwrap_or_default();
                    format!("`{}` with its key (sha256 {sha}), for {}", cert.display(), listen.address)
                }),
            ),
            TlsSource::FromCa => add("listen.cert", Ok("from the daemon's own CA".into())),
        }
    }
    add("workload_api.socket", socket_dir(&config.socket));
    if let Some(admin) = &config.admin_socket {
        add("admin.socket", socket_dir(admin));
    }
    add("ledger", ledger_dir(&config.ledger.location));
    if let Some(log) = &config.break_glass.log_file {
        add(
            "break_glass.log_file",
            log.parent().map_or(Ok("in the working directory".into()), |d| writable_dir(d, false)),
        );
    }
    if config.break_glass.log_file.is_none() && config.break_glass.webhook.is_none() {
        add("break_glass", Ok("no elevated sink: break-glass requests are refused".into()));
    }
    if let Some(addr) = config.telemetry.listen {
        let scope = if addr.ip().is_loopback() { "loopback" } else { "NOT loopback: expose it only to monitoring" };
        add("telemetry.listen", Ok(format!("http://{addr} ({scope})")));
    }
    checks
}

/// A directory the daemon writes: it exists (or, when `create`, its parent does) and this
/// user could write it. (Run as the daemon's user for a faithful answer.)
fn writable_dir(dir: &Path, create: bool) -> Result<String, String> {
    if dir.is_dir() {
        return rustix::fs::access(dir, rustix::fs::Access::WRITE_OK)
            .map(|()| format!("`{}` exists and is writable", dir.display()))
            .map_err(|e| format!("`{}` is not writable by this user: {e}", dir.display()));
    }
    let parent = dir.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    if create && parent.is_dir() {
        return Ok(format!("`{}` will be created (mode 0700)", dir.display()));
    }
    Err(format!("`{}` does not exist", dir.display()))
}

fn socket_dir(socket: &Path) -> Result<String, String> {
    use std::os::unix::fs::MetadataExt;
    let dir = socket.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let meta = std::fs::metadata(dir).map_err(|e| format!("directory `{}`: {e}", dir.display()))?;
    if meta.mode() & 0o022 != 0 {
        return Err(format!(
            "directory `{}` is writable by others (mode {:o}): the daemon refuses it",
            dir.display(),
            meta.mode() & 0o7777
        ));
    }
    Ok(format!("`{}` (directory mode {:o})", socket.display(), meta.mode() & 0o7777))
}

fn ledger_dir(location: &crate::ledger::Location) -> Result<String, String> {
    match location {
        crate::ledger::Location::Sqlite(path) if path.exists() => Ok(format!("`{}` exists", path.display())),
        crate::ledger::Location::Sqlite(path) => {
            let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
            writable_dir(dir, true).map(|_| format!("`{}` will be created", path.display()))
        }
        // Why not connect: the check starts nothing and opens no connection; the URL parsed.
        crate::ledger::Location::Postgres(target) => Ok(format!("PostgreSQL {target} (not contacted)")),
    }
}
