//! Argument parsing and the client subcommands. Business logic stays in the library; this
//! prints results for people (and `--json` for programs).
//!
//! Exit codes, for every command: 0 it fully happened (or the check passed); 1 it did not,
//! or the check found a problem (a denied request, a failed test, a bad ledger, a revocation
//! applied but not recorded); 2 the command line was wrong, or a check could not run (no
//! solver, unreadable input). Output goes through `out!`, which ends the process quietly
//! (exit 0) when the reader of stdout has gone (`mayfly audit trace … | head`).

/// `println!` that treats a closed stdout (EPIPE) as the end of the command, not a panic.
macro_rules! out {
    () => { $crate::cli::print_line(format_args!("")) };
    ($($arg:tt)*) => { $crate::cli::print_line(format_args!($($arg)*)) };
}

mod assurance;
mod audit;
mod aws;
mod bench;
mod breakglass;
mod check;
mod init;
mod ledger;
mod policy;
mod respond;
mod wit;

pub use x509::connect;
pub mod x509;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{CommandFactory, Parser, Subcommand};

use crate::clock::SystemClock;
use crate::config::{Config, DevNet};
use crate::daemon::Daemon;
use crate::telemetry::logging::LogFormat;

#[derive(Parser)]
#[command(
    name = "mayfly",
    version,
    about = "Ephemeral credential broker: attested workloads get short-lived credentials, every step in a tamper-evident ledger",
    after_help = "Exit codes: 0 done; 1 not done, or a check found a problem; 2 bad usage, or a check could not run.\n\
                  Client commands find the daemon's sockets and ledger through --config FILE or MAYFLY_CONFIG, or their own flags."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// How the daemon logs (dev and serve).
#[derive(clap::Args, Clone, Debug, Default)]
struct LogArgs {
    /// Log lines as `text` (people) or `json` (one object per line, for collectors);
    /// default: the config's `telemetry.log_format`, else text. No colour unless stderr is a terminal.
    #[arg(long, value_enum)]
    log_format: Option<LogFormat>,
    /// Log level or filter directive (`info`, `debug`, `mayfly=debug,info`); default: the
    /// config's `telemetry.log_level`, else RUST_LOG, else info.
    #[arg(long, value_name = "LEVEL")]
    log_level: Option<String>,
}

#[derive(Subcommand)]
enum Command {
    /// Run with embedded defaults: a generated CA and the ledger in the data dir.
    #[command(after_help = "Examples:\n  \
        mayfly dev                                   # sockets in ., data in ./.mayfly, TLS on 127.0.0.1:8443\n  \
        mayfly dev --listen none --telemetry 9090    # Unix sockets only; metrics on http://127.0.0.1:9090/metrics\n  \
        mayfly dev --listen 127.0.0.1:8444 --socket b.sock --admin-socket b-admin.sock --data-dir .mayfly-b   # a second daemon\n\
        SIGHUP re-reads the policies/ tree and the key files; SIGTERM or Ctrl-C drains and stops.")]
    Dev {
        /// Data directory: the generated CA and JWT key, the ledger, the break-glass log.
        #[arg(long, default_value = ".mayfly")]
        data_dir: PathBuf,
        /// The policies/ tree, read unsigned and re-read when it changes (dev only).
        #[arg(long, default_value = "policies")]
        policies: PathBuf,
        /// The workload socket: mayfly.v1 and the SPIFFE Workload API.
        #[arg(long, default_value = "mayfly.sock")]
        socket: PathBuf,
        /// Admin socket (mode 0600): `mayfly policy status|rollback`, revoke, lock, break-glass approve.
        #[arg(long, default_value = "mayfly-admin.sock")]
        admin_socket: PathBuf,
        /// TLS listener for the CI token exchange and the OIDC documents (certificate from
        /// the dev CA); `none` to serve only the Unix sockets.
        #[arg(long, default_value = "127.0.0.1:8443")]
        listen: String,
        /// Trust an OIDC issuer for quick tries: `URL[=AUDIENCE]` (audience `mayfly` by
        /// default); repeatable. Tokens matching no inventory entry get the identity
        /// spiffe://mayfly.local/dev/oidc/<sub>.
        #[arg(long = "oidc-issuer", value_name = "URL[=AUDIENCE]")]
        oidc_issuers: Vec<String>,
        /// Serve AWS credentials with STS and IAM at this URL (an emulator such as moto);
        /// the broker's AWS credentials come from the environment, the region from
        /// AWS_REGION (us-east-1 if unset). The dev identity may assume roles `mayfly-dev-*`.
        #[arg(long, value_name = "URL")]
        aws_endpoint: Option<String>,
        /// Keep the ledger in this PostgreSQL database instead of the data dir (for tries of
        /// several daemons; this daemon's chain is named after its socket path).
        #[arg(long, value_name = "URL")]
        postgres: Option<String>,
        /// Publish signed checkpoints of the ledger to this file (outside the data dir)
        /// every 5 s and at shutdown; the signing key is generated in the data dir, its
        /// public half written beside the file as PATH.pub.
        #[arg(long, value_name = "PATH")]
        checkpoint_file: Option<PathBuf>,
        /// Telemetry listener (plain HTTP: /metrics, /healthz, /readyz): `HOST:PORT`, or a
        /// port on 127.0.0.1. Off unless given.
        #[arg(long, value_name = "ADDR")]
        telemetry: Option<String>,
        #[command(flatten)]
        log: LogArgs,
    },
    /// Run from a configuration file (see deploy/mayfly.toml).
    #[command(after_help = "Examples:\n  \
        mayfly config check --config /etc/mayfly/mayfly.toml   # first\n  \
        mayfly serve --config /etc/mayfly/mayfly.toml --log-format json\n\
        Signals: SIGHUP reloads (policy, TLS certificate, CA and JWT key files, OIDC issuers,\n\
        break-glass approvers; a `config_reloaded` event says what changed and what needs a restart);\n\
        SIGTERM/SIGINT drain and stop. With $NOTIFY_SOCKET set (systemd Type=notify) it sends\n\
        READY=1 once its sockets serve, and STOPPING=1 when it drains.")]
    Serve {
        /// The configuration file (deploy/mayfly.toml documents every key).
        #[arg(long, env = "MAYFLY_CONFIG")]
        config: PathBuf,
        #[command(flatten)]
        log: LogArgs,
    },
    /// Write a starter directory: mayfly.toml (for `serve`) and the example policies/ tree.
    Init(init::Args),
    /// Check a configuration and the files it names, without starting anything.
    Config {
        #[command(subcommand)]
        command: check::Command,
    },
    /// Print a shell completion script: `mayfly completions bash > /etc/bash_completion.d/mayfly`.
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
    /// Write man pages (mayfly.1, mayfly-serve.1, …), generated from this command line.
    Man {
        /// Directory to write them to (created if missing).
        #[arg(long, default_value = "man")]
        out: PathBuf,
    },
    /// Get an X.509 SVID from a running daemon and write cert.pem, key.pem, bundle.pem.
    X509(x509::Args),
    /// Get AWS credentials for a role from a running daemon, printed as the JSON the AWS
    /// SDKs' `credential_process` setting reads.
    Aws(aws::Args),
    /// Get a WIT-SVID (SPIFFE Workload API, FetchWITSVID) and write wit.jwt and its private
    /// key wit-key.jwk (0600), and the WIT keys (wit-bundle.json).
    Wit(wit::Args),
    /// Workload Proof Tokens: sign one with a WIT's key (for tries), or have a running
    /// daemon verify one (`POST /v1/wpt/verify`).
    Wpt {
        #[command(subcommand)]
        command: wit::WptCommand,
    },
    /// Read and check the ledger.
    Audit {
        #[command(subcommand)]
        command: audit::Command,
    },
    /// The ledger itself: back it up, copy it to another backend.
    Ledger {
        #[command(subcommand)]
        command: ledger::Command,
    },
    /// Policy releases: validate, test, build, sign, verify, keygen; status and rollback on a running daemon.
    Policy {
        #[command(subcommand)]
        command: policy::Command,
    },
    /// Revoke credentials (by credential, serial, identity, selector or policy bundle) on a running daemon.
    Revoke(respond::RevokeArgs),
    /// Lock an identity (or prefix): no new credential of any kind until unlocked.
    Lock(respond::LockArgs),
    /// Lift an identity's lock.
    Unlock(respond::UnlockArgs),
    /// Emergency access: request (workload socket), list/approve/review (admin socket), report (ledger).
    BreakGlass(breakglass::Args),
    /// Credentials on record.
    Credentials {
        #[command(subcommand)]
        command: respond::CredentialsCommand,
    },
    /// Measure and print figures (throughput, latency).
    Bench {
        #[command(subcommand)]
        command: bench::Command,
    },
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => return fail(format!("cannot start the runtime: {e}")),
    };
    runtime.block_on(async move {
        match cli.command {
            Command::Dev {
                data_dir,
                policies,
                socket,
                admin_socket,
                listen,
                oidc_issuers,
                aws_endpoint,
                postgres,
                checkpoint_file,
                telemetry,
                log,
            } => {
                let net = DevNet {
                    listen: (listen != "none").then_some(listen),
                    oidc_issuers,
                    aws_endpoint,
                    telemetry,
                    postgres,
                    checkpoint_file,
                };
                match Config::dev(data_dir, policies, socket, admin_socket, net) {
                    Ok(config) => run_daemon(config, log, true).await,
                    Err(e) => fail(e),
                }
            }
            Command::Serve { config, log } => match Config::from_file(&config) {
                Ok(config) => run_daemon(config, log, false).await,
                Err(e) => fail(e),
            },
            Command::Init(args) => init::run(args),
            Command::Config { command } => check::run(command).await,
            Command::Completions { shell } => {
                let mut out = std::io::stdout();
                clap_complete::generate(shell, &mut Cli::command(), "mayfly", &mut out);
                ExitCode::SUCCESS
            }
            Command::Man { out } => man_pages(&out),
            Command::X509(args) => x509::run(args).await,
            Command::Aws(args) => aws::run(args).await,
            Command::Wit(args) => wit::fetch(args).await,
            Command::Wpt { command } => wit::wpt(command).await,
            Command::Audit { command } => audit::run(command).await,
            Command::Ledger { command } => ledger::run(command).await,
            Command::Bench { command } => bench::run(command).await,
            Command::Policy { command } => policy::run(command).await,
            Command::Revoke(args) => respond::revoke(args).await,
            Command::Lock(args) => respond::lock(args).await,
            Command::Unlock(args) => respond::unlock(args).await,
            Command::Credentials { command } => respond::credentials(command).await,
            Command::BreakGlass(args) => breakglass::run(args).await,
        }
    })
}

async fn run_daemon(config: Config, log: LogArgs, announce_socket: bool) -> ExitCode {
    let format = log.log_format.unwrap_or(config.telemetry.log_format);
    let level = log.log_level.or_else(|| config.telemetry.log_level.clone());
    if let Some(level) = &level
        && let Err(e) = crate::telemetry::logging::check_level(level)
    {
        return fail(format!("--log-level: {e}"));
    }
    crate::telemetry::logging::init(format, level.as_deref());
    if let Err(e) = crate::daemon::protect_process() {
        return fail(e);
    }
    // Why before building: SIGHUP's default action ends the process; from here on it
    // means "reload" (requests wait until the daemon runs).
    let hangups = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(s) => s,
        Err(e) => return fail(format!("cannot handle SIGHUP: {e}")),
    };
    let daemon = match Daemon::build(config, Arc::new(SystemClock)).await {
        Ok(d) => d,
        Err(e) => return fail(e),
    };
    let reload = daemon.reload_handle();
    tokio::spawn(async move {
        let mut hangups = hangups;
        while hangups.recv().await.is_some() {
            tracing::info!("SIGHUP: reloading");
            if reload.reload().await.is_none() {
                return;
            }
        }
    });
    if announce_socket {
        // SPIFFE clients find the Workload API through this variable (SPIFFE Workload Endpoint spec).
        let socket = std::path::absolute(daemon.socket()).unwrap_or_else(|_| daemon.socket().to_path_buf());
        out!("SPIFFE Workload API and mayfly.v1 on {}; for SPIFFE clients:", socket.display());
        out!("export SPIFFE_ENDPOINT_SOCKET=unix://{}", socket.display());
        if let Some(addr) = daemon.listen_address() {
            out!(
                "token exchange and OIDC discovery on https://{addr} (certificate from the dev CA: curl --cacert <data dir>/ca.pem)"
            );
        }
        if let Some(addr) = daemon.telemetry_address() {
            out!("metrics on http://{addr}/metrics, health on /healthz and /readyz");
        }
    }
    match daemon.run(shutdown_signal()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(e),
    }
}

async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = term => {}
    }
    tracing::info!("shutting down: finishing in-flight requests");
}

/// Writes one line to stdout; a reader that went away (EPIPE) ends the command quietly
/// with exit 0, as `head` expects of a producer. Any other write error is reported.
pub(crate) fn print_line(args: std::fmt::Arguments<'_>) {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    let written = stdout.write_fmt(args).and_then(|()| stdout.write_all(b"\n")).and_then(|()| stdout.flush());
    written_or_exit(written);
}

/// Text as it is (no newline added), with `print_line`'s handling of a closed stdout.
pub(crate) fn print_text(text: &str) {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    written_or_exit(stdout.write_all(text.as_bytes()).and_then(|()| stdout.flush()));
}

fn written_or_exit(written: std::io::Result<()>) {
    match written {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => std::process::exit(0),
        Err(e) => {
            eprintln!("mayfly: cannot write the output: {e}");
            std::process::exit(1);
        }
    }
}

/// `mayfly man --out DIR`: one page per command and subcommand, from the same definition
/// `--help` prints.
fn man_pages(dir: &std::path::Path) -> ExitCode {
    fn write(dir: &std::path::Path, cmd: clap::Command, name: &str) -> std::io::Result<usize> {
        let mut page = Vec::new();
        clap_mangen::Man::new(cmd.clone()).render(&mut page)?;
        std::fs::write(dir.join(format!("{name}.1")), page)?;
        let mut written = 1;
        for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set() && s.get_name() != "help") {
            written += write(dir, sub.clone(), &format!("{name}-{}", sub.get_name()))?;
        }
        Ok(written)
    }
    if let Err(e) = std::fs::create_dir_all(dir) {
        return fail(format!("`{}`: {e}", dir.display()));
    }
    let mut cmd = Cli::command();
    cmd.build();
    match write(dir, cmd, "mayfly") {
        Ok(n) => {
            out!("wrote {n} man pages to {}", dir.display());
            ExitCode::SUCCESS
        }
        Err(e) => fail(format!("writing man pages to `{}`: {e}", dir.display())),
    }
}

/// Where a client command finds the ledger, the same way for every command: `--ledger
/// FILE`, else `--data-dir DIR`, else the `[ledger]` of `--config FILE` (or `MAYFLY_CONFIG`),
/// else `./.mayfly`. Read-only: commands never write the ledger.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct LedgerAt {
    /// A ledger file (a copy is fine), when not the data directory's own; or a
    /// `postgres://` URL of a ledger several daemons share.
    #[arg(long)]
    pub ledger: Option<PathBuf>,
    /// The daemon's data directory [default: .mayfly].
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// The daemon's configuration file: its `[ledger]` and `data_dir` say where the ledger is.
    #[arg(long, env = "MAYFLY_CONFIG")]
    pub config: Option<PathBuf>,
}

impl LedgerAt {
    pub fn location(&self) -> Result<crate::ledger::Location, String> {
        if let Some(file) = &self.ledger {
            return location_of(&file.to_string_lossy());
        }
        if let Some(dir) = &self.data_dir {
            return Ok(crate::ledger::Location::in_data_dir(dir));
        }
        if let Some(path) = &self.config {
            return Config::from_file(path).map(|c| c.ledger.location).map_err(|e| e.to_string());
        }
        Ok(crate::ledger::Location::in_data_dir(std::path::Path::new(".mayfly")))
    }

    /// The ledger, opened for reading, and where it is (for messages).
    pub async fn open(&self) -> Result<(crate::ledger::Location, Arc<dyn crate::ledger::LedgerRead>), String> {
        let location = self.location()?;
        let reader = crate::ledger::open_reader(&location).await.map_err(|e| e.to_string())?;
        Ok((location, reader))
    }
}

/// Where a client command finds the admin socket: `--admin-socket`, else the `[admin]
/// socket` of `--config FILE` (or `MAYFLY_CONFIG`), else `./mayfly-admin.sock` (dev's).
#[derive(clap::Args, Clone, Debug, Default)]
pub struct AdminAt {
    /// The daemon's admin socket [default: the config's admin.socket, else mayfly-admin.sock].
    #[arg(long)]
    pub admin_socket: Option<PathBuf>,
    /// The daemon's configuration file: its `[admin] socket` is used.
    #[arg(long, env = "MAYFLY_CONFIG")]
    pub config: Option<PathBuf>,
}

impl AdminAt {
    pub fn socket(&self) -> Result<PathBuf, String> {
        if let Some(path) = &self.admin_socket {
            return Ok(path.clone());
        }
        match &self.config {
            Some(file) => Config::from_file(file)
                .map_err(|e| e.to_string())?
                .admin_socket
                .ok_or_else(|| format!("`{}` configures no [admin] socket", file.display())),
            None => Ok(PathBuf::from("mayfly-admin.sock")),
        }
    }

    /// A client of the admin socket, or the exit code of the failure (already reported).
    pub async fn client(
        &self,
    ) -> Result<crate::api::pb::admin_client::AdminClient<tonic::transport::Channel>, ExitCode> {
        match self.socket() {
            Ok(socket) => admin(&socket).await,
            Err(e) => Err(fail(e)),
        }
    }
}

/// Where a client command finds the workload socket: `--socket`, else the `[workload_api]
/// socket` of `--config FILE` (or `MAYFLY_CONFIG`), else `./mayfly.sock` (dev's).
#[derive(clap::Args, Clone, Debug, Default)]
pub struct SocketAt {
    /// The daemon's workload socket [default: the config's workload_api.socket, else mayfly.sock].
    #[arg(long, env = "MAYFLY_SOCKET")]
    pub socket: Option<PathBuf>,
    /// The daemon's configuration file: its `[workload_api] socket` is used.
    #[arg(long, env = "MAYFLY_CONFIG")]
    pub config: Option<PathBuf>,
}

impl SocketAt {
    pub fn socket(&self) -> Result<PathBuf, String> {
        if let Some(path) = &self.socket {
            return Ok(path.clone());
        }
        match &self.config {
            Some(file) => Config::from_file(file).map(|c| c.socket).map_err(|e| e.to_string()),
            None => Ok(PathBuf::from("mayfly.sock")),
        }
    }
}

/// What a client tells its user about a lifetime the daemon granted shorter than asked.
pub(crate) fn lifetime_note(l: &crate::api::pb::Lifetime) -> Option<String> {
    let lifetime = crate::issue::Lifetime {
        requested: u64::try_from(l.requested_seconds).unwrap_or(0),
        granted: u64::try_from(l.granted_seconds).unwrap_or(0),
        clamped_by: (!l.clamped_by.is_empty()).then(|| l.clamped_by.clone()),
    };
    lifetime.note()
}

/// A ledger named on the command line: a `postgres://` URL, an `sqlite:` path, or a file.
pub(crate) fn location_of(text: &str) -> Result<crate::ledger::Location, String> {
    if text.starts_with("postgres://") || text.starts_with("postgresql://") {
        let target = crate::ledger::postgres::Target::new(text, None)?;
        return Ok(crate::ledger::Location::Postgres(target));
    }
    if let Some(url) = text.strip_prefix("postgres:") {
        let target = crate::ledger::postgres::Target::new(url, None)?;
        return Ok(crate::ledger::Location::Postgres(target));
    }
    let path = text.strip_prefix("sqlite:").unwrap_or(text);
    Ok(crate::ledger::Location::file(std::path::Path::new(path)))
}

/// A client of the daemon's admin socket.
pub(crate) async fn admin(
    socket: &std::path::Path,
) -> Result<crate::api::pb::admin_client::AdminClient<tonic::transport::Channel>, ExitCode> {
    match connect(socket).await {
        Ok(channel) => Ok(crate::api::pb::admin_client::AdminClient::new(channel)),
        Err(e) => Err(fail(format!("cannot reach the admin socket `{}`: {e}", socket.display()))),
    }
}

fn fail(err: impl std::fmt::Display) -> ExitCode {
    eprintln!("mayfly: {err}");
    ExitCode::FAILURE
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every option and argument of every command says what it is (`--help`, man pages).
    #[test]
    fn every_option_is_described() {
        fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
            for arg in cmd.get_arguments() {
                let id = arg.get_id().as_str();
                if id == "help" || id == "version" {
                    continue;
                }
                if arg.get_help().is_none() && arg.get_long_help().is_none() {
                    missing.push(format!("{path} --{id}"));
                }
            }
            for sub in cmd.get_subcommands() {
                if sub.get_about().is_none() && sub.get_name() != "help" {
                    missing.push(format!("{path} {} (no about)", sub.get_name()));
                }
                walk(sub, &format!("{path} {}", sub.get_name()), missing);
            }
        }
        let mut cmd = Cli::command();
        cmd.build();
        let mut missing = Vec::new();
        walk(&cmd, "mayfly", &mut missing);
        assert!(missing.is_empty(), "undescribed:\n{}", missing.join("\n"));
    }

    #[test]
    fn the_main_commands_show_examples() {
        let mut cmd = Cli::command();
        cmd.build();
        for name in ["dev", "serve", "x509", "aws", "revoke", "break-glass"] {
            let sub = cmd.find_subcommand(name).unwrap();
            let help = sub.get_after_help().map(ToString::to_string).unwrap_or_default();
            assert!(help.contains("Example"), "`mayfly {name} --help` has no example");
        }
    }
}
