//! The in-process test daemon every file in tests/ starts: a real `Daemon` on temporary
//! sockets, its ledger in a temp dir, a fixed clock the test moves. One builder
//! (`setup(dir)`) with the defaults most tests want — trust domain `mayfly.local`, a
//! generated CA, the repository's `policies/` read unsigned (as `mayfly dev` does), a
//! workload socket `w.sock` and an admin socket `admin.sock` in `dir` — and a hook to change
//! any config key. Each test binary uses only part of it.
#![allow(dead_code, reason = "each test binary uses a different part of the support module")]
#![expect(clippy::unwrap_used, reason = "tests fail loudly on any unexpected error")]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use mayfly::api::pb::admin_client::AdminClient;
use mayfly::api::pb::broker_client::BrokerClient;
use mayfly::api::spiffe::spiffe_workload_api_client::SpiffeWorkloadApiClient;
use mayfly::clock::FixedClock;
use mayfly::config::{Config, PolicySource, RawAdmin, RawCa, RawConfig, RawJwt, RawListen, RawPolicy, RawWorkloadApi};
use mayfly::daemon::Daemon;
use mayfly::identity::TrustDomain;
use mayfly::keys::CertificateAuthority;
use mayfly::ledger::event::Event;
use mayfly::ledger::{CredentialFilter, CredentialRecord, EventFilter, LedgerRead, Location, StoredEvent};
use tonic::transport::Channel;

/// How long a test waits for anything (a stop, a stream message) before it fails.
pub const WAIT: Duration = Duration::from_secs(20);

pub fn repo_policies() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("policies")
}

/// A daemon to be started in `dir` (which the caller keeps across restarts).
pub struct Setup {
    dir: PathBuf,
    raw: RawConfig,
    policies: Option<PathBuf>,
    now: SystemTime,
    tls: bool,
}

pub fn setup(dir: &Path) -> Setup {
    Setup {
        dir: dir.to_path_buf(),
        raw: RawConfig {
            trust_domain: Some("mayfly.local".into()),
            data_dir: Some(dir.join("data")),
            policy: RawPolicy {
                bundle: Some(dir.join("unused.bundle")),
                trusted_keys: vec![dir.join("unused.pub")],
                poll_interval: Some("1s".into()),
            },
            workload_api: RawWorkloadApi { socket: Some(dir.join("w.sock")), ..Default::default() },
            admin: RawAdmin { socket: Some(dir.join("admin.sock")), owner_uid: None },
            ca: Some(RawCa { generate: Some(true), ..Default::default() }),
            ..Default::default()
        },
        policies: Some(repo_policies()),
        now: SystemTime::now(),
        tls: false,
    }
}

impl Setup {
    /// Changes any key of the configuration.
    pub fn raw(mut self, change: impl FnOnce(&mut RawConfig)) -> Self {
        change(&mut self.raw);
        self
    }

    /// Reads this policies/ tree unsigned instead of the repository's.
    pub fn policies(mut self, dir: &Path) -> Self {
        self.policies = Some(dir.to_path_buf());
        self
    }

    /// Runs on signed bundles as `[policy]` says (set it with `raw`), not an unsigned tree.
    pub fn signed(mut self) -> Self {
        self.policies = None;
        self
    }

    pub fn at(mut self, now: SystemTime) -> Self {
        self.now = now;
        self
    }

    /// A TLS listener on a loopback port, with a certificate for `localhost` from a CA of
    /// its own (`Running::https` trusts it), and JWT issuer `https://mayfly.test`.
    pub fn tls(mut self) -> Self {
        self.tls = true;
        self
    }

    /// The validated configuration (for tests of start-up itself).
    pub fn config(&self) -> Config {
        let mut config = Config::try_from(self.raw.clone()).unwrap();
        if let Some(dir) = &self.policies {
            config.policy = PolicySource::UnsignedDir(dir.clone());
        }
        config
    }

    pub async fn start(mut self) -> Running {
        let tls_ca = if self.tls {
            let (ca_pem, listen) = tls_listener(&self.dir, self.now);
            self.raw.listen = Some(listen);
            if self.raw.jwt.issuer.is_none() {
                self.raw.jwt = RawJwt { issuer: Some("https://mayfly.test".into()), ..self.raw.jwt.clone() };
            }
            Some(ca_pem)
        } else {
            None
        };
        run(self.config(), &self.dir, self.now, tls_ca).await
    }
}

/// Starts a daemon from any configuration (`mayfly dev`'s, say); `tls_ca` is the PEM its
/// TLS listener's certificate chains to, if it has one.
pub async fn run(config: Config, dir: &Path, now: SystemTime, tls_ca: Option<String>) -> Running {
    let socket = config.socket.clone();
    let admin_socket = config.admin_socket.clone();
    let location = config.ledger.location.clone();
    let clock = Arc::new(FixedClock::new(now));
    let daemon = Daemon::build(config, clock.clone()).await.unwrap();
    let port = daemon.listen_address().map(|a| a.port());
    let telemetry = daemon.telemetry_address();
    let reload = daemon.reload_handle();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        daemon
            .run(async {
                let _ = stopped.await;
            })
            .await
            .unwrap();
    });
    Running {
        dir: dir.to_path_buf(),
        socket,
        admin_socket,
        location,
        clock,
        port,
        telemetry,
        reload,
        tls_ca,
        stop: Some(stop),
        task: Some(task),
    }
}

/// A started daemon.
pub struct Running {
    pub dir: PathBuf,
    pub socket: PathBuf,
    pub admin_socket: Option<PathBuf>,
    pub location: Location,
    pub clock: Arc<FixedClock>,
    /// The TLS listener's port, with `Setup::tls`.
    pub port: Option<u16>,
    /// The telemetry listener's address, with `[telemetry] listen`.
    pub telemetry: Option<std::net::SocketAddr>,
    /// What SIGHUP does to `mayfly serve`.
    pub reload: mayfly::daemon::ReloadHandle,
    tls_ca: Option<String>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Running {
    /// Drains and stops (bounded); panics if the daemon's run failed.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            tokio::time::timeout(WAIT, task).await.unwrap().unwrap();
        }
    }

    pub async fn broker(&self) -> BrokerClient<Channel> {
        BrokerClient::new(mayfly::cli::connect(&self.socket).await.unwrap())
    }

    pub async fn workload(&self) -> SpiffeWorkloadApiClient<Channel> {
        SpiffeWorkloadApiClient::new(mayfly::cli::connect(&self.socket).await.unwrap())
    }

    pub async fn admin(&self) -> AdminClient<Channel> {
        let socket = self.admin_socket.as_ref().unwrap();
        AdminClient::new(mayfly::cli::connect(socket).await.unwrap())
    }

    pub async fn reader(&self) -> Arc<dyn LedgerRead> {
        mayfly::ledger::open_reader(&self.location).await.unwrap()
    }

    /// Every event on record, in order.
    pub async fn events(&self) -> Vec<StoredEvent> {
        self.reader().await.events(EventFilter::all()).await.unwrap()
    }

    /// Every event on record, typed.
    pub async fn typed(&self) -> Vec<Event> {
        self.events().await.iter().map(|e| e.event().unwrap()).collect()
    }

    pub async fn credentials(&self) -> Vec<CredentialRecord> {
        self.reader()
            .await
            .credentials(CredentialFilter::All)
            .await
            .unwrap()
            .into_iter()
            .map(|r| r.credential)
            .collect()
    }

    /// The SQLite file itself, for tests that lock or edit it behind the daemon's back.
    pub fn ledger_file(&self) -> PathBuf {
        match &self.location {
            Location::Sqlite(path) => path.clone(),
            Location::Postgres(target) => panic!("no ledger file: the ledger is in {target}"),
        }
    }

    /// An HTTPS client that trusts the TLS listener's certificate.
    pub fn https(&self) -> reqwest::Client {
        let ca = self.tls_ca.as_ref().unwrap();
        reqwest::Client::builder()
            .tls_certs_only([reqwest::Certificate::from_pem(ca.as_bytes()).unwrap()])
            .timeout(WAIT)
            .build()
            .unwrap()
    }

    pub fn url(&self, path: &str) -> String {
        format!("https://localhost:{}{path}", self.port.unwrap())
    }

    /// The PEM of the CA that signed the TLS listener's certificate.
    pub fn tls_ca_pem(&self) -> &str {
        self.tls_ca.as_deref().unwrap()
    }
}

/// A certificate and key for `localhost` in `dir`, from a CA made here.
fn tls_listener(dir: &Path, now: SystemTime) -> (String, RawListen) {
    let week = Duration::from_secs(7 * 86_400);
    let ca = CertificateAuthority::generate(
        &TrustDomain::parse("mayfly.local").unwrap(),
        now - Duration::from_secs(3600),
        week,
    )
    .unwrap();
    let (cert, key) = ca.issue_tls_server(&["localhost".into()], now - Duration::from_secs(3600), week).unwrap();
    let (tls_cert, tls_key) = (dir.join("tls.pem"), dir.join("tls-key.pem"));
    let _ = std::fs::remove_file(&tls_key);
    std::fs::write(&tls_cert, pem::encode(&pem::Pem::new("CERTIFICATE", cert))).unwrap();
    mayfly::keys::write_private(&tls_key, pem::encode(&pem::Pem::new("PRIVATE KEY", key.expose().to_vec())).as_bytes())
        .unwrap();
    let listen = RawListen {
        address: Some("127.0.0.1:0".into()),
        cert: Some(tls_cert),
        key: Some(tls_key),
        request_timeout: Some("60s".into()),
        ..Default::default()
    };
    (ca.cert_pem().to_owned(), listen)
}
