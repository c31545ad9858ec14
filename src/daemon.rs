//! Builds everything from `Config` — the only module that names concrete implementations —
//! and runs it: each long-running service (listeners, policy watch, key watch, CRL
//! publishing, expiry sweep, AWS deny sweep, reloads) lives in the module that owns it and
//! runs here under one task set with one drain path: on shutdown `/readyz` turns "draining"
//! (and the service manager hears STOPPING=1), the stop flag flips, in-flight requests
//! finish (bounded by `DRAIN_LIMIT`), the stop is recorded and the ledger flushed; the
//! telemetry listener stops last. A reload (`ReloadHandle`, SIGHUP) is `reload`'s.

mod counted;
mod reload;

pub use reload::ReloadHandle;

use std::future::Future;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::UnixListener;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::api::admin::AdminService;
use crate::api::broker::BrokerService;
use crate::api::exchange::ExchangeApi;
use crate::api::pb::admin_server::AdminServer;
use crate::api::pb::broker_server::BrokerServer;
use crate::api::serve::{self, ServeError};
use crate::api::spiffe::spiffe_workload_api_server::SpiffeWorkloadApiServer;
use crate::api::wiped::WithWipedSvids;
use crate::api::workload::{WorkloadApiService, WorkloadApiSettings};
use crate::attest::UnixAttestor;
use crate::attest::oidc::{HttpKeySource, OidcVerifier};
use crate::breakglass::{BreakGlassDesk, Elevated, ElevatedSink, EmergencyLog, FileSink, WebhookSink};
use crate::clock::Clock;
use crate::cluster::{Cluster, Follower};
use crate::config::{AwsMode, CaSource, Config};
use crate::issue::refusals::RefusalLog;
use crate::issue::{ExchangeSettings, Issuer, Minters, Parts};
use crate::keys::{CertificateAuthority, JwtKey, KeyError, WIT_KEY_FILE};
use crate::ledger::checkpoint::{CheckpointError, Checkpointer};
use crate::ledger::event::{AwsEndpoint, DaemonStarted, DaemonStopped, Event, Operator};
use crate::ledger::{CredentialFilter, GroupCommitLedger, Ledger, LedgerError, LedgerRead};
use crate::limits::Admission;
use crate::mint::aws::AwsMinter;
use crate::mint::jwt::Es256Minter;
use crate::mint::rotation::KeyWatch;
use crate::mint::wit::Es256WitMinter;
use crate::mint::x509::X509Minter;
use crate::mint::{JwtMinter, MintError, Minter};
use crate::policy::activation::{ActivationError, PolicyController};
use crate::policy::shadow::Shadow;
use crate::revoke::aws::{AwsRevoker, DenySweep};
use crate::revoke::expiry::ExpirySweep;
use crate::revoke::publish::BundlePublisher;
use crate::revoke::{AwsRevocation, Desk, NoAws, Revocations};
use crate::telemetry::health::Health;
use crate::telemetry::layer::RequestMetricsLayer;
use crate::telemetry::{Metrics, notify};
use crate::validate::{ProofSettings, Validator};

pub use crate::api::serve::DRAIN_LIMIT;

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("cannot create data dir `{path}`: {source}")]
    DataDir { path: PathBuf, source: std::io::Error },
    #[error(transparent)]
    Keys(#[from] KeyError),
    #[error("JWT signer: {0}")]
    Jwt(#[from] MintError),
    #[error("wit.key: {0}")]
    WitKey(String),
    #[error("policy: {0}")]
    Policy(#[from] ActivationError),
    #[error("ledger `{location}`: {source}")]
    Ledger { location: String, source: LedgerError },
    #[error(transparent)]
    Serve(#[from] ServeError),
    #[error("server: {0}")]
    Stopped(String),
    #[error("OIDC: {0}")]
    Oidc(String),
    #[error("break_glass.webhook: {0}")]
    Webhook(String),
    #[error("checkpoints: {0}")]
    Checkpoint(#[from] CheckpointError),
    #[error("cannot keep the daemon's memory from its own user: {0}")]
    Protect(String),
}

/// Puts the daemon's memory out of reach of other processes of its own user, before any
/// key is loaded: not dumpable (so `/proc/<pid>/mem`, ptrace and core dumps need
/// CAP_SYS_PTRACE; /proc/<pid> files become root's) and a core size limit of 0, soft and
/// hard (no core file, whatever the environment or a later `prctl` says). Process-wide:
/// `serve` and `dev` call it first thing; a failure stops start-up.
pub fn protect_process() -> Result<(), DaemonError> {
    use rustix::process::{DumpableBehavior, Resource, Rlimit, set_dumpable_behavior, setrlimit};
    set_dumpable_behavior(DumpableBehavior::NotDumpable)
        .map_err(|e| DaemonError::Protect(format!("PR_SET_DUMPABLE 0: {e}")))?;
    setrlimit(Resource::Core, Rlimit { current: Some(0), maximum: Some(0) })
        .map_err(|e| DaemonError::Protect(format!("RLIMIT_CORE 0: {e}")))?;
    Ok(())
}

/// The AWS revocation denies are checked for removal this often.
const DENY_SWEEP_EVERY: Duration = Duration::from_secs(60);

/// The bound TLS listener and what it serves under.
struct NetListener {
    tcp: tokio::net::TcpListener,
    tls: serve::TlsConfig,
    jwt_issuer: String,
}

/// Everything built, waiting to serve.
pub struct Daemon {
    config: Config,
    issuer: Arc<Issuer>,
    desk: Arc<BreakGlassDesk>,
    validator: Arc<Validator>,
    shadow: Arc<Shadow>,
    revocations: Arc<Revocations>,
    emergency: Arc<EmergencyLog>,
    ledger: Arc<GroupCommitLedger>,
    reader: Arc<dyn LedgerRead>,
    writer: JoinHandle<()>,
    listener: UnixListener,
    admin: Option<UnixListener>,
    policy: Arc<PolicyController>,
    publisher: Arc<BundlePublisher>,
    minter: Arc<X509Minter>,
    jwt: Arc<Es256Minter>,
    /// The WIT key's kid: the JWT key watch refuses a key with it.
    wit_kid: String,
    net: Option<NetListener>,
    /// STS and IAM, when `[aws]` is configured.
    aws: Option<Arc<crate::aws::SdkAws>>,
    clock: Arc<dyn Clock>,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    /// The telemetry listener, when `[telemetry] listen` (or `dev --telemetry`) is set.
    telemetry: Option<tokio::net::TcpListener>,
    /// The exchange's token verifier (its trusted issuers are reloadable).
    oidc: Option<Arc<OidcVerifier>>,
    reloads: (mpsc::Sender<tokio::sync::oneshot::Sender<crate::ledger::event::ConfigReloaded>>, ReloadRequests),
    /// Several daemons share the ledger.
    cluster: Option<Cluster>,
    /// Publishes signed checkpoints of this daemon's chain.
    checkpointer: Option<Arc<tokio::sync::Mutex<Checkpointer>>>,
    /// Issuance admission (`[limits]`); its idle buckets are forgotten periodically.
    admission: Arc<Admission>,
    /// Refusals counted rather than written one by one.
    refusals: Arc<RefusalLog>,
}

type ReloadRequests = mpsc::Receiver<tokio::sync::oneshot::Sender<crate::ledger::event::ConfigReloaded>>;

impl Daemon {
    /// Loads keys, policy and inventory, opens the ledger and binds the sockets. When this
    /// returns, the sockets accept connections.
    pub async fn build(config: Config, clock: Arc<dyn Clock>) -> Result<Self, DaemonError> {
        create_private_dir(&config.data_dir)?;
        let now = clock.now();
        let ca = match &config.ca {
            CaSource::Files { cert, key } => CertificateAuthority::load(cert, key, now)?,
            CaSource::Generated { dir } => CertificateAuthority::load_or_generate(dir, &config.trust_domain, now)?,
        };
        let jwt_key = match &config.jwt_key {
            Some(path) => JwtKey::load(path)?,
            None => JwtKey::load_or_generate(&config.data_dir)?,
        };
        let jwt_kid = jwt_key.kid().to_owned();
        let wit_key = match &config.wit.key {
            Some(path) => JwtKey::load(path)?,
            None => JwtKey::load_or_generate_file(&config.data_dir.join(WIT_KEY_FILE))?,
        };
        // Why: a kid names one key across the whole bundle (WIT-SVID spec, section 6.1), and
        // a WIT must never verify as a JWT-SVID: the two signers never share a key.
        if wit_key.kid() == jwt_kid {
            return Err(DaemonError::WitKey(format!(
                "the WIT key is the JWT key (kid `{jwt_kid}`); WIT-SVIDs need a key of their own"
            )));
        }
        let wit_kid = wit_key.kid().to_owned();
        // Why bound here: in dev the JWT issuer URL is the address actually bound.
        let tcp = match &config.listen {
            Some(l) => Some(
                tokio::net::TcpListener::bind(l.address)
                    .await
                    .map_err(|e| ServeError::Listen { address: l.address.to_string(), why: e.to_string() })?,
            ),
            None => None,
        };
        let bound = tcp.as_ref().and_then(|t| t.local_addr().ok());
        let jwt_issuer = config.jwt_issuer.clone().or_else(|| bound.map(|a| format!("https://{a}")));
        let jwt = Arc::new(Es256Minter::new(jwt_key, config.trust_domain.clone())?.with_issuer(jwt_issuer.clone()));
        let wit =
            Arc::new(Es256WitMinter::new(wit_key, config.trust_domain.clone())?.with_issuer(config.wit.issuer.clone()));
        let ledger_err = |source| DaemonError::Ledger { location: config.ledger.location.to_string(), source };
        let opened = crate::ledger::open(&config.ledger).await.map_err(ledger_err)?;
        let (ledger, reader, writer) = (Arc::new(opened.writer), opened.reader, opened.task);
        let metrics = Arc::new(Metrics::new());
        ledger.observe(metrics.clone());
        // Several daemons share the ledger: what they share is wired through `cluster`.
        let cluster = opened.shared.map(Cluster::new);
        let ca_fingerprint = hex::encode(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, ca.cert_der()));
        // Why before anything is recorded: binding is what refuses a second daemon on the same
        // socket, and a second daemon must not append to this ledger.
        let listener = serve::bind_socket(&config.socket, 0o666)?;
        let admin = config.admin_socket.as_deref().map(|path| serve::bind_socket(path, 0o600)).transpose()?;
        let telemetry = match config.telemetry.listen {
            Some(address) => Some(
                tokio::net::TcpListener::bind(address)
                    .await
                    .map_err(|e| ServeError::Listen { address: address.to_string(), why: e.to_string() })?,
            ),
            None => None,
        };
        if let (Some(path), Some(uid)) = (&config.admin_socket, config.admin_owner_uid) {
            // Why chown rather than widen the mode: the socket stays 0600, for exactly one owner.
            rustix::fs::chown(path, Some(rustix::fs::Uid::from_raw(uid)), None).map_err(|e| ServeError::Socket {
                path: path.clone(),
                why: format!("chown to uid {uid} (admin.owner_uid): {e}"),
            })?;
        }
        // Why before anything is recorded: a ledger cut or rewritten behind the daemon's back
        // must not be extended (and so laundered) by it.
        let checkpointer = match &config.checkpoint {
            Some(settings) => {
                let sink = settings
                    .webhook
                    .as_ref()
                    .map(|url| WebhookSink::new(url.clone(), 3).map(|s| Arc::new(s) as Arc<dyn ElevatedSink>))
                    .transpose()
                    .map_err(CheckpointError::Sink)?;
                let trust_domain = config.trust_domain.to_string();
                let c =
                    Checkpointer::start(reader.clone(), &trust_domain, &config.ledger.chain, settings, sink).await?;
                Some(Arc::new(tokio::sync::Mutex::new(c)))
            }
            None => None,
        };
        let as_ledger = ledger.clone() as Arc<dyn Ledger>;
        let last_policy_change = match &cluster {
            Some(c) => c.last_policy_change(reader.as_ref()).await.map_err(ledger_err)?,
            None => None,
        };
        let mut policy = PolicyController::start(
            config.policy.clone(),
            config.trust_domain.clone(),
            &config.data_dir,
            as_ledger.clone(),
            clock.clone(),
        )
        .await?;
        if let Some(cluster) = &cluster {
            policy.share(Arc::new(cluster.clone())).await?;
        }
        let policy = Arc::new(policy);
        if let (Some(cluster), Some(last)) = (&cluster, last_policy_change) {
            // The release the daemons serve is the latest any of them activated.
            cluster.catch_up_policy(last, &policy).await;
        }
        let store = policy.store();
        let policy_version = store.current().version().to_owned();
        let entries = store.current().inventory.entries().len();
        let net = match (tcp, &config.listen) {
            (Some(tcp), Some(listen)) => {
                let tls = Arc::new(arc_swap::ArcSwap::new(serve::tls_config(&listen.tls, &ca, bound, now)?));
                Some(NetListener { tcp, tls, jwt_issuer: jwt_issuer.clone().unwrap_or_default() })
            }
            _ => None,
        };
        let minter = Arc::new(X509Minter::new(Arc::new(ca)).with_min_lifetime(config.min_ttl.as_duration()));
        // Revocations, locks and the break-glass flags are rebuilt from the ledger: they
        // survive restarts.
        let revocations = Arc::new(Revocations::load(reader.as_ref()).await.map_err(ledger_err)?);
        let flagged = break_glass_credentials(reader.as_ref()).await.map_err(ledger_err)?;
        let emergency =
            Arc::new(EmergencyLog::new(elevated_sinks(&config)?, flagged, as_ledger.clone(), clock.clone()));
        let shadow = Arc::new(Shadow::new(store.clone(), as_ledger.clone(), clock.clone()));
        let aws = match &config.aws {
            Some(a) => Some(Arc::new(crate::aws::SdkAws::connect(a).await)),
            None => None,
        };
        let aws_minter = match (&aws, &config.aws) {
            (Some(sdk), Some(a)) => {
                let sts = Arc::new(counted::CountedSts { inner: sdk.clone(), metrics: metrics.clone() });
                let mode = match a.mode {
                    AwsMode::AssumeRole => crate::mint::aws::Mode::AssumeRole,
                    AwsMode::WebIdentity => crate::mint::aws::Mode::WebIdentity {
                        jwt: jwt.clone(),
                        audience: a.web_identity_audience.clone(),
                    },
                };
                let limits = crate::mint::aws::Limits {
                    attempts: a.attempts,
                    attempt_timeout: a.attempt_timeout,
                    backoff: Duration::from_millis(200),
                    max_in_flight: a.max_in_flight,
                };
                Some(Arc::new(AwsMinter::new(sts, Some(sdk.clone()), mode, limits)))
            }
            _ => None,
        };
        let oidc = match &net {
            Some(_) => {
                let source = HttpKeySource::new().map_err(|e| DaemonError::Oidc(e.to_string()))?;
                let source = counted::CountedKeys { inner: Arc::new(source), metrics: metrics.clone() };
                let verifier = OidcVerifier::new(config.oidc_issuers.clone(), Arc::new(source));
                Some(Arc::new(match &cluster {
                    Some(c) => verifier.with_replay(Arc::new(c.clone())),
                    None => verifier,
                }))
            }
            None => None,
        };
        let exchange = oidc
            .as_ref()
            .map(|verifier| ExchangeSettings { verifier: verifier.clone(), trust_domain: config.trust_domain.clone() });
        let issuer = Issuer::new(Parts {
            attestor: Arc::new(UnixAttestor::new(config.max_binary_bytes)),
            policy: store,
            minters: Minters { x509: minter.clone(), jwt: jwt.clone(), wit: wit.clone(), aws: aws_minter },
            ledger: as_ledger.clone(),
            clock: clock.clone(),
            revocations: revocations.clone(),
            emergency: emergency.clone(),
            shadow: shadow.clone(),
            exchange,
        })
        .with_metrics(metrics.clone())
        .with_min_ttl(config.min_ttl);
        let admission = Arc::new(Admission::new(&config.limits));
        let refusals = Arc::new(RefusalLog::new(config.limits.refusal_window, config.limits.refusals_in_full));
        let issuer = issuer.with_limits(admission.clone(), refusals.clone());
        let issuer = Arc::new(match &cluster {
            Some(c) => issuer.with_freshness(Arc::new(c.clone())),
            None => issuer,
        });
        let desk = BreakGlassDesk::new(issuer.clone(), config.break_glass.clone(), emergency.clone(), clock.clone());
        let desk = Arc::new(match &cluster {
            Some(c) => desk.with_shared(Arc::new(c.clone())),
            None => desk,
        });
        let proofs =
            ProofSettings { window: config.wit.proof_max_lifetime, replay_entries: config.wit.replay_cache_entries };
        let validator = Validator::new(
            jwt.clone(),
            wit.clone(),
            proofs,
            revocations.clone(),
            emergency.clone(),
            as_ledger.clone(),
            clock.clone(),
        );
        // Several daemons: a proof accepted by one is used for all (the shared replay table).
        let validator = Arc::new(match &cluster {
            Some(c) => validator.with_shared_replay(Arc::new(c.clone())),
            None => validator,
        });
        // Proofs accepted just before a restart stay used.
        let remembered = validator.remember_accepted_proofs(reader.as_ref()).await.map_err(ledger_err)?;
        if remembered > 0 {
            tracing::info!(remembered, "proof jtis still inside their window reloaded from the ledger");
        }
        let publisher = Arc::new(BundlePublisher::new(
            minter.clone() as Arc<dyn Minter>,
            jwt.clone() as Arc<dyn JwtMinter>,
            wit.clone() as Arc<dyn crate::mint::WitMinter>,
            revocations.clone(),
            clock.clone(),
        ));
        let started = DaemonStarted {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            trust_domain: config.trust_domain.to_string(),
            policy_version: policy_version.clone(),
            inventory_entries: entries,
            ca_sha256: ca_fingerprint.clone(),
            jwt_kid,
            wit_kid: Some(wit_kid.clone()),
            listen: bound.map(|a| a.to_string()),
            jwt_issuer: jwt_issuer.clone(),
            oidc_issuers: config.oidc_issuers.iter().map(|i| i.issuer.clone()).collect(),
            socket: config.socket.display().to_string(),
            admin_socket: config.admin_socket.as_ref().map(|p| p.display().to_string()),
            aws: config.aws.as_ref().map(|a| AwsEndpoint {
                region: Some(a.region.clone()),
                endpoint: a.endpoint.clone(),
                mode: format!("{:?}", a.mode),
            }),
        };
        ledger.record(clock.now(), Event::DaemonStarted(started)).await.map_err(ledger_err)?;
        let freshness = cluster.clone().map(|c| Arc::new(c) as Arc<dyn crate::issue::Freshness>);
        let health = Arc::new(readiness(&ledger, &policy, &minter, &clock, freshness));
        sample_state(&metrics, &policy, &minter, &jwt, &desk, &revocations, &clock);
        tracing::info!(socket = %config.socket.display(), policy_version, entries, ca_sha256 = ca_fingerprint, "mayfly ready");
        if let Some(addr) = bound {
            tracing::info!(listen = %addr, jwt_issuer = jwt_issuer.as_deref().unwrap_or_default(), issuers = config.oidc_issuers.len(), "TLS listener ready: token exchange, OIDC discovery, JWKS");
        }
        Ok(Self {
            config,
            issuer,
            desk,
            validator,
            shadow,
            revocations,
            emergency,
            ledger,
            reader,
            writer,
            listener,
            admin,
            policy,
            publisher,
            minter,
            jwt,
            wit_kid,
            net,
            aws,
            clock,
            metrics,
            health,
            telemetry,
            oidc,
            reloads: mpsc::channel(4),
            cluster,
            checkpointer,
            admission,
            refusals,
        })
    }

    pub fn socket(&self) -> &Path {
        &self.config.socket
    }

    /// The telemetry listener's bound address, when there is one.
    pub fn telemetry_address(&self) -> Option<std::net::SocketAddr> {
        self.telemetry.as_ref().and_then(|t| t.local_addr().ok())
    }

    /// Asks the daemon (once it runs) to reload; SIGHUP does this.
    pub fn reload_handle(&self) -> ReloadHandle {
        ReloadHandle { tx: self.reloads.0.clone() }
    }

    /// The daemon's metrics (what `/metrics` serves).
    pub fn metrics(&self) -> Arc<Metrics> {
        self.metrics.clone()
    }

    /// The TLS listener's bound address, when there is one.
    pub fn listen_address(&self) -> Option<std::net::SocketAddr> {
        self.net.as_ref().and_then(|n| n.tcp.local_addr().ok())
    }

    /// Serves until `shutdown` resolves, then drains and records the stop.
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send) -> Result<(), DaemonError> {
        let Self {
            config,
            issuer,
            desk,
            validator,
            shadow,
            revocations,
            emergency,
            ledger,
            reader,
            writer,
            listener,
            admin,
            policy,
            publisher,
            minter,
            jwt,
            wit_kid,
            net,
            aws,
            clock,
            metrics,
            health,
            telemetry,
            oidc,
            reloads,
            cluster,
            checkpointer,
            admission,
            refusals,
        } = self;
        let as_ledger = ledger.clone() as Arc<dyn Ledger>;
        let mut tasks = Tasks::new();
        let poll = config.policy_poll;
        // Why its own stop flag: the telemetry listener outlives the drain, so /readyz
        // answers "draining" while in-flight requests finish.
        let telemetry_stop = watch::Sender::new(false);
        let telemetry_task = telemetry.map(|tcp| {
            let router = crate::telemetry::listener::router(metrics.clone(), health.clone());
            tokio::spawn(crate::telemetry::listener::serve(tcp, router, telemetry_stop.subscribe()))
        });

        // The workload socket: mayfly.v1 and the SPIFFE Workload API.
        let aws_ttl = config.aws.as_ref().map_or(config.default_ttl, |a| a.default_ttl);
        let broker = BrokerServer::new(
            BrokerService::new(issuer.clone(), desk.clone(), config.default_ttl, config.ttl_bounds())
                .with_aws_ttl(aws_ttl),
        )
        .max_decoding_message_size(config.max_request_bytes);
        let settings = WorkloadApiSettings {
            trust_domain: config.trust_domain.clone(),
            x509_ttl: config.default_ttl,
            jwt_ttl: config.jwt_ttl,
            wit_ttl: config.wit.ttl,
            rotate_at_percent: config.rotate_at_percent,
        };
        let workload = Arc::new(
            WorkloadApiService::new(
                issuer.clone(),
                validator.clone(),
                policy.store(),
                revocations.clone(),
                clock.clone(),
                settings,
                publisher.subscribe(),
                tasks.stop(),
            )
            .with_metrics(metrics.clone()),
        );
        // FetchX509SVID sends server-made keys: served outside tonic's codec (api::wiped).
        let workload_api = WithWipedSvids::new(
            SpiffeWorkloadApiServer::from_arc(workload.clone()).max_decoding_message_size(config.max_request_bytes),
            workload,
        );
        let routes = tonic::service::Routes::new(broker).add_service(workload_api);
        let timed = |listener| RequestMetricsLayer::new(metrics.clone(), listener);
        // Client connections stay below the descriptor limit, less a reserve for the admin
        // socket, health checks and the ledger.
        let descriptors = crate::limits::raise_descriptor_limit();
        let listener_limits = serve::ListenerLimits {
            limits: config.limits.clone(),
            max_connections: crate::limits::connections_within(descriptors, config.limits.max_connections),
            metrics: metrics.clone(),
        };
        tracing::info!(
            descriptors,
            max_connections = listener_limits.max_connections,
            "client connections bounded per listener"
        );
        tasks.spawn(
            "workload socket",
            serve::workload(
                listener,
                routes,
                config.request_timeout,
                timed("workload"),
                listener_limits.clone(),
                tasks.stop(),
            ),
        );
        let tls_config = net.as_ref().map(|n| n.tls.clone());

        if let (Some(net), Some(listen)) = (net, &config.listen) {
            let api = ExchangeApi::new(
                issuer.clone(),
                desk.clone(),
                validator.clone(),
                net.jwt_issuer.clone(),
                config.default_ttl,
                config.jwt_ttl,
                config.ttl_bounds(),
                listen.request_timeout,
            )
            .with_bundles(publisher.subscribe())
            .with_aws_ttl(aws_ttl);
            let router = api.router(listen.max_request_bytes).merge(crate::telemetry::health::routes(health.clone()));
            // gRPC framing adds 5 bytes a message to the limit on what it carries.
            let router = serve::body_deadline(router, listen.max_request_bytes + 64, config.limits.body_timeout)
                .layer(timed("tls"));
            tasks.spawn("TLS listener", serve::tls(net.tcp, net.tls, router, listener_limits.clone(), tasks.stop()));
        }
        if let Some(listener) = admin {
            let responders = Arc::new(Desk {
                ledger: as_ledger.clone(),
                reader: reader.clone(),
                revocations: revocations.clone(),
                policy: policy.store(),
                clock: clock.clone(),
                trust_domain: config.trust_domain.clone(),
                aws: match &aws {
                    Some(sdk) => Arc::new(AwsRevoker::new(sdk.clone())) as Arc<dyn AwsRevocation>,
                    None => Arc::new(NoAws),
                },
            });
            let service = AdminServer::new(AdminService::new(
                policy.clone(),
                responders,
                desk.clone(),
                shadow.clone(),
                rustix::process::geteuid().as_raw(),
                config.admin_owner_uid,
            ))
            .max_decoding_message_size(64 * 1024);
            let routes = tonic::service::Routes::new(service);
            tasks.spawn(
                "admin socket",
                serve::admin(listener, routes, config.request_timeout, timed("admin"), tasks.stop()),
            );
        }

        tasks.spawn("policy watch", ok(policy.clone().watch(poll, tasks.stop())));
        let key_watch = KeyWatch::new(
            match &config.ca {
                CaSource::Files { cert, key } => Some((cert.clone(), key.clone())),
                CaSource::Generated { .. } => None,
            },
            minter,
            config.jwt_key.clone(),
            jwt,
            publisher.clone(),
            as_ledger.clone(),
            clock.clone(),
            config.max_ttl.as_duration(),
        )
        .with_reserved_kids(vec![wit_kid]);
        let key_watch = Arc::new(tokio::sync::Mutex::new(key_watch));
        tasks.spawn("key watch", ok(KeyWatch::run(key_watch.clone(), poll, tasks.stop())));
        let reloader = reload::Reloader {
            running: config.clone(),
            policy: policy.clone(),
            tls: tls_config,
            keys: key_watch,
            oidc,
            desk: desk.clone(),
            ledger: as_ledger.clone(),
            clock: clock.clone(),
            metrics: metrics.clone(),
        };
        let (_, reload_requests) = reloads;
        tasks.spawn("reloads", reloader.run(reload_requests, tasks.stop()));
        if let (Some(c), Some(settings)) = (&checkpointer, &config.checkpoint) {
            tasks.spawn("checkpoints", ok(Checkpointer::run(c.clone(), settings.interval, tasks.stop())));
        }
        tasks.spawn("CRL publisher", ok(publisher.clone().follow_revocations(tasks.stop())));
        let expiry =
            ExpirySweep::new(as_ledger.clone(), reader.clone(), revocations.clone(), emergency.clone(), clock.clone());
        // AWS revocation denies come off their roles once every session they caught is over.
        let deny_sweep = aws.as_ref().map(|sdk| DenySweep {
            iam: sdk.clone(),
            ledger: as_ledger.clone(),
            reader: reader.clone(),
            clock: clock.clone(),
        });
        match &cluster {
            None => {
                tasks.spawn("expiry sweep", ok(expiry.run(poll, tasks.stop())));
                if let Some(sweep) = deny_sweep {
                    tasks.spawn("AWS deny sweep", ok(sweep.run(DENY_SWEEP_EVERY, tasks.stop())));
                }
            }
            Some(cluster) => {
                let follower = Follower {
                    revocations: revocations.clone(),
                    policy: policy.clone(),
                    desk: desk.clone(),
                    shadow: shadow.clone(),
                };
                tasks.spawn("shared-state feed", ok(cluster.follow(follower, tasks.stop())));
                // One daemon at a time sweeps (expiry and AWS denies), every poll interval.
                let expiry = Arc::new(tokio::sync::Mutex::new(expiry));
                let deny_sweep = deny_sweep.map(Arc::new);
                let sweeps = move || {
                    let (expiry, deny_sweep) = (expiry.clone(), deny_sweep.clone());
                    async move {
                        if let Err(e) = expiry.lock().await.sweep().await {
                            tracing::warn!(error = %e, "expiry sweep failed; retrying next tick");
                        }
                        if let Some(d) = deny_sweep
                            && let Err(e) = d.sweep().await
                        {
                            tracing::warn!(error = %e, "AWS deny sweep failed; retrying next tick");
                        }
                    }
                };
                tasks.spawn("sweeps (leader)", ok(cluster.clone().lead(poll, tasks.stop(), sweeps)));
            }
        }

        {
            let (admission, refusals, ledger, clock) =
                (admission.clone(), refusals.clone(), as_ledger.clone(), clock.clone());
            tasks.spawn(
                "refusal counts",
                ok(refusals.run(ledger, clock, tasks.stop(), move || admission.forget_idle())),
            );
        }

        // Every socket serves: tell the service manager (systemd Type=notify).
        notify::notify("READY=1");
        shutdown.await;
        health.set_draining();
        notify::notify("STOPPING=1");
        tracing::info!("draining: /readyz answers 503 until the daemon has stopped");
        let clean = tasks.drain(DRAIN_LIMIT).await;
        let _ = std::fs::remove_file(&config.socket);
        if let Some(path) = &config.admin_socket {
            let _ = std::fs::remove_file(path);
        }
        // Shadow mode lives in memory: its end is on record, so no one reads silence as
        // "the candidate saw nothing different".
        if shadow.is_on() {
            let daemon = Operator { daemon: Some("stopping".into()), ..Operator::default() };
            let _ = shadow.stop(daemon, "the daemon stopped; shadow mode does not survive a restart").await;
        }
        // Refusals counted since the last aggregate, now that no request is in flight.
        for aggregate in refusals.take_due(clock.now(), true) {
            if let Err(e) = ledger.record(clock.now(), Event::Refusals(aggregate)).await {
                tracing::error!(error = %e, "counted refusals could not be recorded at the stop");
            }
        }
        let stopped = ledger.record(clock.now(), Event::DaemonStopped(DaemonStopped { clean: clean.is_ok() })).await;
        drop((issuer, desk, validator, shadow, emergency, policy, publisher, as_ledger, reader));
        drop(ledger);
        let _ = writer.await;
        // The final checkpoint covers the `stopped` event: nothing may follow it until the
        // next start.
        if let Some(c) = &checkpointer {
            match c.lock().await.publish(true).await {
                Ok(size) => tracing::info!(size, "final checkpoint published"),
                Err(e) => tracing::error!(error = %e, "the final checkpoint failed"),
            }
        }
        telemetry_stop.send_replace(true);
        if let Some(task) = telemetry_task {
            let _ = task.await;
        }
        tracing::info!("mayfly stopped");
        clean.map_err(DaemonError::Stopped)?;
        stopped.map_err(|source| DaemonError::Ledger { location: config.ledger.location.to_string(), source })?;
        Ok(())
    }
}

/// The daemon's long-running tasks, one stop flag, one drain path.
struct Tasks {
    stop: watch::Sender<bool>,
    running: Vec<(&'static str, JoinHandle<Result<(), String>>)>,
}

impl Tasks {
    fn new() -> Self {
        Self { stop: watch::Sender::new(false), running: Vec::new() }
    }

    /// What each task watches to know the daemon is stopping.
    fn stop(&self) -> watch::Receiver<bool> {
        self.stop.subscribe()
    }

    fn spawn(&mut self, name: &'static str, task: impl Future<Output = Result<(), String>> + Send + 'static) {
        self.running.push((name, tokio::spawn(task)));
    }

    /// Flips the stop flag and waits for every task, together at most `limit`; a task
    /// still running then is aborted (a sweep cut short is found again at the next start).
    /// `Err` names what failed or had to be cut off.
    async fn drain(self, limit: Duration) -> Result<(), String> {
        self.stop.send_replace(true);
        let deadline = tokio::time::Instant::now() + limit;
        let mut problems = Vec::new();
        for (name, mut task) in self.running {
            match tokio::time::timeout_at(deadline, &mut task).await {
                Ok(Ok(Ok(()))) => {}
                Ok(Ok(Err(e))) => problems.push(format!("{name}: {e}")),
                Ok(Err(e)) => problems.push(format!("{name}: {e}")),
                Err(_) => {
                    tracing::warn!(task = name, limit_secs = limit.as_secs(), "did not finish in time; stopping it");
                    task.abort();
                    problems.push(format!("{name}: cut off after {} s", limit.as_secs()));
                }
            }
        }
        if problems.is_empty() { Ok(()) } else { Err(problems.join("; ")) }
    }
}

/// What `/readyz` checks: the ledger can be written, a policy release is active, the CA
/// that signs is loaded and not expired.
fn readiness(
    ledger: &Arc<GroupCommitLedger>,
    policy: &Arc<PolicyController>,
    minter: &Arc<X509Minter>,
    clock: &Arc<dyn Clock>,
    freshness: Option<Arc<dyn crate::issue::Freshness>>,
) -> Health {
    // Why weak: the writer task ends only when every handle is gone, and the health (held
    // by the telemetry listener) outlives the ledger at shutdown.
    let (ledger, store, minter, clock) = (Arc::downgrade(ledger), policy.store(), minter.clone(), clock.clone());
    let health = Health::new()
        .probe("ledger", move || match ledger.upgrade() {
            Some(l) => l.writable().map(|()| "writable".to_owned()),
            None => Err("the ledger is closed (the daemon is stopping)".to_owned()),
        })
        .probe("policy", move || Ok(format!("release {} active", store.current().version())))
        .probe("ca", move || {
            let not_after = minter.active_ca_not_after();
            if not_after > clock.now() {
                Ok(format!("loaded, valid until {}", crate::clock::rfc3339(not_after)))
            } else {
                Err(format!("the signing CA expired at {}", crate::clock::rfc3339(not_after)))
            }
        });
    // Several daemons: one whose view of the shared state is too old refuses issuance.
    match freshness {
        Some(f) => health.probe("shared_state", move || {
            f.check()
                .map(|()| "fresh".to_owned())
                .map_err(|age| format!("{} s old, over ledger.max_staleness", age.as_secs()))
        }),
        None => health,
    }
}

/// State the metrics read at each scrape.
fn sample_state(
    metrics: &Metrics,
    policy: &Arc<PolicyController>,
    minter: &Arc<X509Minter>,
    jwt: &Arc<Es256Minter>,
    desk: &Arc<BreakGlassDesk>,
    revocations: &Arc<Revocations>,
    clock: &Arc<dyn Clock>,
) {
    // Why weak: the desk holds the issuer, which holds the ledger and these metrics.
    let (store, minter, jwt, desk, revocations, clock) =
        (policy.store(), minter.clone(), jwt.clone(), Arc::downgrade(desk), revocations.clone(), clock.clone());
    metrics.sample_with(move |m| {
        let release = store.current();
        let p = &release.provenance;
        m.set_policy_release(&p.version, p.label.as_deref(), p.signed_by.as_deref());
        m.set_ca_not_after(minter.active_ca_not_after());
        m.set_jwt_keys(&jwt.active_kid(), &jwt.retired_keys());
        if let Some(desk) = desk.upgrade() {
            m.set_break_glass_pending(desk.pending_here());
        }
        m.set_locks_active(revocations.live_locks(clock.now()));
    });
}

/// A service that cannot fail, as a task.
async fn ok(service: impl Future<Output = ()>) -> Result<(), String> {
    service.await;
    Ok(())
}

fn create_private_dir(path: &Path) -> Result<(), DaemonError> {
    let err = |source| DaemonError::DataDir { path: path.into(), source };
    if !path.exists() {
        std::fs::create_dir_all(path).map_err(err)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700)).map_err(err)?;
    }
    Ok(())
}

/// The credentials issued on the emergency path so far: the flagged rows of the credential
/// table (a partial index finds them, so this costs what the few flagged rows cost; before
/// schema 3 it read every `issued` event, 4.2 s of start-up at 1M events).
async fn break_glass_credentials(reader: &dyn LedgerRead) -> Result<Vec<String>, LedgerError> {
    let rows = reader.credentials(CredentialFilter::BreakGlass).await?;
    Ok(rows.into_iter().map(|r| r.credential.id).collect())
}

/// The elevated sinks from config (file and/or webhook).
fn elevated_sinks(config: &Config) -> Result<Elevated, DaemonError> {
    let bg = &config.break_glass;
    let mut sinks: Vec<Arc<dyn ElevatedSink>> = Vec::new();
    if let Some(path) = &bg.log_file {
        sinks.push(Arc::new(FileSink::new(path.clone())));
    }
    if let Some(url) = &bg.webhook {
        sinks.push(Arc::new(WebhookSink::new(url.clone(), bg.webhook_retries).map_err(DaemonError::Webhook)?));
    }
    Ok(Elevated::new(sinks))
}
