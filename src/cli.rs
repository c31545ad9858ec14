//! Argument parsing and the client subcommands. Business logic stays in the library; this
//! prints results for people (and `--json` for programs).

mod assurance;
mod audit;
mod aws;
mod bench;
mod breakglass;
mod ledger;
mod policy;
mod respond;
mod wit;

pub use x509::connect;
pub mod x509;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};

use crate::clock::SystemClock;
use crate::config::{Config, DevNet};
use crate::daemon::Daemon;

#[derive(Parser)]
#[command(name = "mayfly", version, about = "Ephemeral credential broker")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run with embedded defaults: a generated CA and the ledger in the data dir.
    Dev {
        #[arg(long, default_value = ".mayfly")]
        data_dir: PathBuf,
        #[arg(long, default_value = "policies")]
        policies: PathBuf,
        #[arg(long, default_value = "mayfly.sock")]
        socket: PathBuf,
        /// Admin socket (mode 0600): `mayfly policy status|rollback`.
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
    },
    /// Run from a configuration file (see deploy/mayfly.toml).
    Serve {
        #[arg(long)]
        config: PathBuf,
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
    /// The ledger itself: copy it to another backend.
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
            } => {
                let net = DevNet {
                    listen: (listen != "none").then_some(listen),
                    oidc_issuers,
                    aws_endpoint,
                    postgres,
                    checkpoint_file,
                };
                match Config::dev(data_dir, policies, socket, admin_socket, net) {
                    Ok(config) => run_daemon(config, true).await,
                    Err(e) => fail(e),
                }
            }
            Command::Serve { config } => match Config::from_file(&config) {
                Ok(config) => run_daemon(config, false).await,
                Err(e) => fail(e),
            },
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

async fn run_daemon(config: Config, announce_socket: bool) -> ExitCode {
    init_logging();
    let daemon = match Daemon::build(config, Arc::new(SystemClock)).await {
        Ok(d) => d,
        Err(e) => return fail(e),
    };
    if announce_socket {
        // SPIFFE clients find the Workload API through this variable (SPIFFE Workload Endpoint spec).
        let socket = std::path::absolute(daemon.socket()).unwrap_or_else(|_| daemon.socket().to_path_buf());
        println!("SPIFFE Workload API and mayfly.v1 on {}; for SPIFFE clients:", socket.display());
        println!("export SPIFFE_ENDPOINT_SOCKET=unix://{}", socket.display());
        if let Some(addr) = daemon.listen_address() {
            println!(
                "token exchange and OIDC discovery on https://{addr} (certificate from the dev CA: curl --cacert <data dir>/ca.pem)"
            );
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

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).try_init();
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
