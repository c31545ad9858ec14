//! Builds everything from `Config` — the only module that names concrete implementations —
//! and runs it: binds the workload socket, serves, and on shutdown stops accepting, lets
//! in-flight issuances finish, records the stop and flushes the ledger.

use std::future::Future;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::json;
use tokio::net::UnixListener;
use tokio::task::JoinHandle;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::UnixListenerStream;

use crate::api::admin::AdminService;
use crate::api::authority::AuthorityFix;
use crate::api::broker::BrokerService;
use crate::api::exchange::{ExchangeApi, RemoteAddr};
use crate::api::pb::admin_server::AdminServer;
use crate::api::pb::broker_server::BrokerServer;
use crate::api::spiffe::spiffe_workload_api_server::SpiffeWorkloadApiServer;
use crate::api::workload::{WorkloadApiService, WorkloadApiSettings};
use crate::attest::oidc::{HttpKeySource, OidcVerifier};
use crate::attest::{PeerStream, UnixAttestor};
use crate::breakglass::Approvals;
use crate::clock::Clock;
use crate::config::AwsMode;
use crate::config::{CaSource, Config, TlsSource};
use crate::events::{Elevated, ElevatedSink, FileSink, WebhookSink};
use crate::issue::Issuer;
use crate::issue::{BreakGlassSettings, ExchangeSettings};
use crate::keys::{CertificateAuthority, JwtKey, KeyError};
use crate::ledger::sqlite::LedgerReader;
use crate::ledger::sqlite::SqliteBackend;
use crate::ledger::{EventKind, GroupCommitLedger, Ledger, LedgerError, NewEvent};
use crate::mint::aws::AwsMinter;
use crate::mint::jwt::Es256Minter;
use crate::mint::x509::X509Minter;
use crate::mint::{MintError, TrustBundle};
use crate::policy::activation::{ActivationError, PolicyController};
use crate::revoke::aws::{AwsRevoker, DenySweep};
use crate::revoke::{AwsRevocation, Desk, NoAws, Revocations};

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("cannot create data dir `{path}`: {source}")]
    DataDir { path: PathBuf, source: std::io::Error },
    #[error(transparent)]
    Keys(#[from] KeyError),
    #[error("JWT signer: {0}")]
    Jwt(#[from] MintError),
    #[error("policy: {0}")]
    Policy(#[from] ActivationError),
    #[error("ledger `{path}`: {source}")]
    Ledger { path: PathBuf, source: LedgerError },
    #[error("socket `{path}`: {why}")]
    Socket { path: PathBuf, why: String },
    #[error("server: {0}")]
    Serve(String),
    #[error("listener `{address}`: {why}")]
    Listen { address: String, why: String },
    #[error("OIDC: {0}")]
    Oidc(String),
}

/// A TLS handshake that has not finished after this long is dropped.
const TLS_HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// The bound TLS listener and what it serves under.
struct NetListener {
    tcp: tokio::net::TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    jwt_issuer: String,
}

/// How long shutdown waits for in-flight requests before closing their connections.
pub const DRAIN_LIMIT: std::time::Duration = std::time::Duration::from_secs(10);

pub struct Daemon {
    config: Config,
    issuer: Arc<Issuer>,
    ledger: Arc<GroupCommitLedger>,
    writer: JoinHandle<()>,
    listener: UnixListener,
    admin: Option<UnixListener>,
    policy: Arc<PolicyController>,
    /// What relying parties trust now (CAs, JWKS, CRLs); every bundle stream follows it.
    publisher: Arc<BundlePublisher>,
    minter: Arc<X509Minter>,
    jwt: Arc<Es256Minter>,
    net: Option<NetListener>,
    /// STS and IAM, when `[aws]` is configured.
    aws: Option<Arc<crate::aws::SdkAws>>,
    clock: Arc<dyn Clock>,
}

impl Daemon {
    /// Loads keys, policy and inventory, opens the ledger and binds the socket. When this
    /// returns, the socket accepts connections.
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
        // Why bound here: in dev the JWT issuer URL is the address actually bound.
        let tcp = match &config.listen {
            Some(l) => Some(
                tokio::net::TcpListener::bind(l.address)
                    .await
                    .map_err(|e| DaemonError::Listen { address: l.address.to_string(), why: e.to_string() })?,
            ),
            None => None,
        };
        let bound = tcp.as_ref().and_then(|t| t.local_addr().ok());
        let jwt_issuer = config.jwt_issuer.clone().or_else(|| bound.map(|a| format!("https://{a}")));
        let jwt = Arc::new(Es256Minter::new(jwt_key, config.trust_domain.clone())?.with_issuer(jwt_issuer.clone()));
        let jwt_minter = jwt.clone();
        let ledger_err = |source| DaemonError::Ledger { path: config.ledger_path.clone(), source };
        let backend = SqliteBackend::open(&config.ledger_path, config.ledger_busy_timeout).await.map_err(ledger_err)?;
        // The ledger holds no secrets, but it maps every identity and binary on the host.
        let _ = std::fs::set_permissions(&config.ledger_path, std::fs::Permissions::from_mode(0o600));
        let (ledger, writer) = GroupCommitLedger::start(backend, config.ledger_max_batch).await.map_err(ledger_err)?;
        let ledger = Arc::new(ledger);
        let ca_fingerprint = hex::encode(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, ca.cert_der()));
        // Why before anything is recorded: binding is what refuses a second daemon on the same
        // socket, and a second daemon must not append to this ledger.
        let listener = bind_socket(&config.socket, 0o666)?;
        let admin = config.admin_socket.as_deref().map(|path| bind_socket(path, 0o600)).transpose()?;
        if let (Some(path), Some(uid)) = (&config.admin_socket, config.admin_owner_uid) {
            // Why chown rather than widen the mode: the socket stays 0600, for exactly one owner.
            rustix::fs::chown(path, Some(rustix::fs::Uid::from_raw(uid)), None).map_err(|e| DaemonError::Socket {
                path: path.clone(),
                why: format!("chown to uid {uid} (admin.owner_uid): {e}"),
            })?;
        }
        let policy = PolicyController::start(
            config.policy.clone(),
            config.trust_domain.clone(),
            &config.data_dir,
            ledger.clone() as Arc<dyn Ledger>,
            clock.clone(),
        )
        .await?;
        let policy = Arc::new(policy);
        let store = policy.store();
        let policy_version = store.current().version().to_owned();
        let entries = store.current().inventory.entries().len();
        let net = match (tcp, &config.listen) {
            (Some(tcp), Some(listen)) => {
                let acceptor = tls_acceptor(&listen.tls, &ca, bound, now)?;
                Some(NetListener { tcp, acceptor, jwt_issuer: jwt_issuer.clone().unwrap_or_default() })
            }
            _ => None,
        };
        let minter = Arc::new(X509Minter::new(Arc::new(ca)));
        // Revocations and locks are rebuilt from the ledger: they survive restarts.
        let (revocations, break_glass_ids) = {
            let mut reader = LedgerReader::open(&config.ledger_path).await.map_err(ledger_err)?;
            let events = reader.events_of_kinds(&["revoked", "locked", "unlocked"]).await.map_err(ledger_err)?;
            let issued = reader.events_of_kinds(&["issued"]).await.map_err(ledger_err)?;
            let ids: Vec<String> = issued
                .iter()
                .filter_map(|e| serde_json::from_str::<serde_json::Value>(&e.body).ok())
                .filter(|b| b.get("break_glass").and_then(serde_json::Value::as_bool) == Some(true))
                .filter_map(|b| b.get("id").and_then(serde_json::Value::as_str).map(str::to_owned))
                .collect();
            (Arc::new(Revocations::from_events(&events)), ids)
        };
        let issuer = Issuer::new(
            Arc::new(UnixAttestor::new(config.max_binary_bytes)),
            store,
            minter.clone(),
            jwt,
            ledger.clone() as Arc<dyn Ledger>,
            clock.clone(),
        );
        let issuer = match &net {
            Some(_) => {
                let source = HttpKeySource::new().map_err(|e| DaemonError::Oidc(e.to_string()))?;
                issuer.with_exchange(ExchangeSettings {
                    verifier: Arc::new(OidcVerifier::new(config.oidc_issuers.clone(), Arc::new(source))),
                    trust_domain: config.trust_domain.clone(),
                })
            }
            None => issuer,
        }
        .with_revocations(revocations)
        .with_break_glass(break_glass_settings(&config)?)
        .with_break_glass_credentials(break_glass_ids);
        let aws = match &config.aws {
            Some(a) => Some(Arc::new(crate::aws::SdkAws::connect(a).await)),
            None => None,
        };
        let issuer = Arc::new(match (&aws, &config.aws) {
            (Some(sdk), Some(a)) => {
                let mode = match a.mode {
                    AwsMode::AssumeRole => crate::mint::aws::Mode::AssumeRole,
                    AwsMode::WebIdentity => crate::mint::aws::Mode::WebIdentity {
                        jwt: jwt_minter.clone(),
                        audience: a.web_identity_audience.clone(),
                    },
                };
                let limits = crate::mint::aws::Limits {
                    attempts: a.attempts,
                    attempt_timeout: a.attempt_timeout,
                    backoff: std::time::Duration::from_millis(200),
                    max_in_flight: a.max_in_flight,
                };
                issuer.with_aws(Arc::new(AwsMinter::new(sdk.clone(), Some(sdk.clone()), mode, limits)))
            }
            _ => issuer,
        });
        let publisher = Arc::new(BundlePublisher::new(issuer.clone(), minter.clone(), clock.clone()));
        ledger
            .record(NewEvent {
                kind: EventKind::DaemonStarted,
                at: clock.now(),
                body: json!({
                    "version": env!("CARGO_PKG_VERSION"),
                    "trust_domain": config.trust_domain.as_str(),
                    "policy_version": policy_version,
                    "inventory_entries": entries,
                    "ca_sha256": ca_fingerprint,
                    "jwt_kid": jwt_kid,
                    "listen": bound.map(|a| a.to_string()),
                    "jwt_issuer": jwt_issuer,
                    "oidc_issuers": config.oidc_issuers.iter().map(|i| i.issuer.as_str()).collect::<Vec<_>>(),
                    "socket": config.socket.display().to_string(),
                    "admin_socket": config.admin_socket.as_ref().map(|p| p.display().to_string()),
                    "aws": config.aws.as_ref().map(|a| json!({ "region": a.region, "endpoint": a.endpoint, "mode": format!("{:?}", a.mode) })),
                }),
                credential: None,
            })
            .await
            .map_err(ledger_err)?;
        tracing::info!(socket = %config.socket.display(), policy_version, entries, ca_sha256 = ca_fingerprint, "mayfly ready");
        if let Some(addr) = bound {
            tracing::info!(listen = %addr, jwt_issuer = jwt_issuer.as_deref().unwrap_or_default(), issuers = config.oidc_issuers.len(), "TLS listener ready: token exchange, OIDC discovery, JWKS");
        }
        Ok(Self {
            config,
            issuer,
            ledger,
            writer,
            listener,
            admin,
            policy,
            publisher,
            minter,
            jwt: jwt_minter,
            net,
            aws,
            clock,
        })
    }

    pub fn socket(&self) -> &Path {
        &self.config.socket
    }

    /// The TLS listener's bound address, when there is one.
    pub fn listen_address(&self) -> Option<std::net::SocketAddr> {
        self.net.as_ref().and_then(|n| n.tcp.local_addr().ok())
    }

    /// Serves until `shutdown` resolves, then drains and records the stop.
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send) -> Result<(), DaemonError> {
        let Self { config, issuer, ledger, writer, listener, admin, policy, publisher, minter, jwt, net, aws, clock } =
            self;
        let aws_ttl = config.aws.as_ref().map_or(config.default_ttl, |a| a.default_ttl);
        let service = BrokerServer::new(
            BrokerService::new(issuer.clone(), config.default_ttl, config.max_ttl).with_aws_ttl(aws_ttl),
        )
        .max_decoding_message_size(config.max_request_bytes);
        // Why the filter: gRPC C-core clients (py-spiffe) send the socket path as :authority,
        // which the HTTP/2 server would reject; see api::authority.
        let incoming =
            UnixListenerStream::new(listener).map(|conn| conn.map(|s| AuthorityFix::new(PeerStream::new(s))));
        let (draining, drain_started) = tokio::sync::oneshot::channel::<()>();
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let settings = WorkloadApiSettings {
            trust_domain: config.trust_domain.clone(),
            x509_ttl: config.default_ttl,
            jwt_ttl: config.jwt_ttl,
            rotate_at_percent: config.rotate_at_percent,
        };
        let workload_api = SpiffeWorkloadApiServer::new(WorkloadApiService::new(
            issuer.clone(),
            settings,
            publisher.subscribe(),
            stop_rx.clone(),
        ))
        .max_decoding_message_size(config.max_request_bytes);
        let shutdown = async move {
            shutdown.await;
            let _ = stop_tx.send(true);
            let _ = draining.send(());
        };
        let watcher = tokio::spawn(watch_policy(policy.clone(), config.policy_poll, stop_rx.clone()));
        let ca_watch = KeyWatch {
            files: match &config.ca {
                CaSource::Files { cert, key } => Some((cert.clone(), key.clone())),
                CaSource::Generated { .. } => None,
            },
            minter,
            jwt_file: config.jwt_key.clone(),
            jwt,
            jwt_refused: None,
            publisher: publisher.clone(),
            ledger: ledger.clone() as Arc<dyn Ledger>,
            clock: clock.clone(),
            longest_ttl: config.max_ttl.as_duration(),
            refused: None,
        };
        let ca_watcher = tokio::spawn(ca_watch.run(config.policy_poll, stop_rx.clone()));
        let crl_publisher = tokio::spawn(publish_on_revocation(publisher.clone(), stop_rx.clone()));
        let sweeper = tokio::spawn(
            ExpirySweep::new(
                config.ledger_path.clone(),
                ledger.clone() as Arc<dyn Ledger>,
                issuer.clone(),
                clock.clone(),
            )
            .run(config.policy_poll, stop_rx.clone()),
        );
        // AWS revocation denies come off their roles once every session they caught is over.
        let deny_sweeper = aws.as_ref().map(|sdk| {
            let sweep = DenySweep {
                iam: sdk.clone(),
                ledger: ledger.clone() as Arc<dyn Ledger>,
                ledger_path: config.ledger_path.clone(),
                clock: clock.clone(),
            };
            tokio::spawn(sweep.run(std::time::Duration::from_secs(60), stop_rx.clone()))
        });
        let net_server = match (net, &config.listen) {
            (Some(net), Some(listen)) => {
                let api = ExchangeApi::new(
                    issuer.clone(),
                    net.jwt_issuer.clone(),
                    config.default_ttl,
                    config.jwt_ttl,
                    config.max_ttl,
                    listen.request_timeout,
                )
                .with_bundles(publisher.subscribe())
                .with_aws_ttl(aws_ttl);
                Some(tokio::spawn(serve_tls(net, api.router(listen.max_request_bytes), stop_rx.clone())))
            }
            _ => None,
        };
        let admin_server = admin.map(|listener| {
            let desk = Arc::new(Desk {
                ledger: ledger.clone() as Arc<dyn Ledger>,
                ledger_path: config.ledger_path.clone(),
                revocations: issuer.revocations().clone(),
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
                desk,
                issuer.clone(),
                rustix::process::geteuid().as_raw(),
                config.admin_owner_uid,
            ))
            .max_decoding_message_size(64 * 1024);
            let incoming = UnixListenerStream::new(listener).map(|conn| conn.map(PeerStream::new));
            let mut stop = stop_rx.clone();
            tokio::spawn(
                tonic::transport::Server::builder()
                    .timeout(config.request_timeout)
                    .add_service(service)
                    .serve_with_incoming_shutdown(incoming, async move {
                        let _ = stop.wait_for(|s| *s).await;
                    }),
            )
        });
        let serve = tonic::transport::Server::builder()
            .timeout(config.request_timeout)
            .concurrency_limit_per_connection(64)
            .add_service(service)
            .add_service(workload_api)
            .serve_with_incoming_shutdown(incoming, shutdown);
        // Why bounded: graceful shutdown waits for every connection to finish; a client that
        // holds a stream open must not keep the daemon (and its ledger) from stopping.
        let drain_limit = async {
            if drain_started.await.is_ok() {
                tokio::time::sleep(DRAIN_LIMIT).await;
            } else {
                std::future::pending::<()>().await;
            }
        };
        let served = tokio::select! {
            result = serve => result,
            () = drain_limit => {
                tracing::warn!(limit_secs = DRAIN_LIMIT.as_secs(), "in-flight requests did not finish in time; closing them");
                Ok(())
            }
        };
        let _ = std::fs::remove_file(&config.socket);
        watcher.abort();
        let _ = watcher.await;
        // Why abort is safe for the deny sweep: a delete cut short is found again at the
        // next start (still outstanding) and recorded then.
        for task in [ca_watcher, crl_publisher, sweeper].into_iter().chain(deny_sweeper) {
            task.abort();
            let _ = task.await;
        }
        if let Some(server) = net_server {
            // It drains its own connections (bounded) once `stop` flips.
            let _ = server.await;
        }
        if let Some(server) = admin_server {
            server.abort();
            let _ = server.await;
        }
        if let Some(path) = &config.admin_socket {
            let _ = std::fs::remove_file(path);
        }
        drop(policy);
        drop(publisher);
        // Shadow mode lives in memory: its end is on record, so no one reads silence as
        // "the candidate saw nothing different".
        if issuer.shadow_version().is_some() {
            let _ = issuer
                .set_shadow(
                    None,
                    json!({ "daemon": "stopping" }),
                    "the daemon stopped; shadow mode does not survive a restart",
                )
                .await;
        }
        let stopped = ledger
            .record(NewEvent {
                kind: EventKind::DaemonStopped,
                at: clock.now(),
                body: json!({ "clean": served.is_ok() }),
                credential: None,
            })
            .await;
        drop(issuer);
        drop(ledger);
        let _ = writer.await;
        tracing::info!("mayfly stopped");
        served.map_err(|e| DaemonError::Serve(e.to_string()))?;
        stopped.map_err(|source| DaemonError::Ledger { path: config.ledger_path, source })?;
        Ok(())
    }
}

fn create_private_dir(path: &Path) -> Result<(), DaemonError> {
    let err = |source| DaemonError::DataDir { path: path.into(), source };
    if !path.exists() {
        std::fs::create_dir_all(path).map_err(err)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700)).map_err(err)?;
    }
    Ok(())
}

/// Checks the policy source every `every` until shutdown.
async fn watch_policy(
    policy: Arc<PolicyController>,
    every: std::time::Duration,
    stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut ticker = crate::clock::Ticker::delayed(every, stop).await;
    while ticker.next().await {
        policy.poll().await;
    }
}

/// The emergency path from config: elevated sinks (file and/or webhook) and approvals.
fn break_glass_settings(config: &Config) -> Result<BreakGlassSettings, DaemonError> {
    let bg = &config.break_glass;
    let mut sinks: Vec<Arc<dyn ElevatedSink>> = Vec::new();
    if let Some(path) = &bg.log_file {
        sinks.push(Arc::new(FileSink::new(path.clone())));
    }
    if let Some(url) = &bg.webhook {
        sinks.push(Arc::new(
            WebhookSink::new(url.clone(), bg.webhook_retries)
                .map_err(|e| DaemonError::Serve(format!("break_glass.webhook: {e}")))?,
        ));
    }
    Ok(BreakGlassSettings {
        config: bg.clone(),
        elevated: Elevated::new(sinks),
        approvals: Approvals::new(bg.approvers.clone(), bg.approval_timeout),
    })
}

/// The rustls server configuration: the configured certificate, or (dev) one for
/// localhost and the bound address from the daemon's own CA. ALPN offers h2 (gRPC, curl)
/// and http/1.1 (plain HTTPS clients fetching JWKS).
fn tls_acceptor(
    source: &TlsSource,
    ca: &CertificateAuthority,
    bound: Option<std::net::SocketAddr>,
    now: std::time::SystemTime,
) -> Result<tokio_rustls::TlsAcceptor, DaemonError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
    let fail = |why: String| DaemonError::Listen { address: bound.map(|a| a.to_string()).unwrap_or_default(), why };
    let (chain, key): (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) = match source {
        TlsSource::Files { cert, key } => {
            let chain = CertificateDer::pem_file_iter(cert)
                .and_then(Iterator::collect::<Result<Vec<_>, _>>)
                .map_err(|e| fail(format!("certificate `{}`: {e}", cert.display())))?;
            let meta = std::fs::metadata(key).map_err(|e| fail(format!("key `{}`: {e}", key.display())))?;
            if meta.mode() & 0o077 != 0 {
                return Err(fail(format!("key `{}` is readable by group or others; chmod 600 it", key.display())));
            }
            let key = PrivateKeyDer::from_pem_file(key).map_err(|e| fail(format!("key `{}`: {e}", key.display())))?;
            (chain, key)
        }
        TlsSource::FromCa => {
            let mut names = vec!["localhost".to_owned(), "127.0.0.1".to_owned()];
            if let Some(addr) = bound.filter(|a| !a.ip().is_unspecified() && a.ip().to_string() != "127.0.0.1") {
                names.push(addr.ip().to_string());
            }
            let (cert, key) = ca.issue_tls_server(&names, now, std::time::Duration::from_secs(30 * 86_400))?;
            (vec![CertificateDer::from(cert)], PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.expose().to_vec())))
        }
    };
    let mut config =
        rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|e| fail(e.to_string()))?
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .map_err(|e| fail(e.to_string()))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

/// Accepts TLS connections until `stop`, then lets in-flight requests finish (bounded).
async fn serve_tls(net: NetListener, router: axum::Router, mut stop: tokio::sync::watch::Receiver<bool>) {
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    loop {
        tokio::select! {
            accepted = net.tcp.accept() => {
                let (tcp, remote) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        tracing::warn!(error = %e, "accept on the TLS listener failed");
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let acceptor = net.acceptor.clone();
                let service = router.clone().layer(axum::Extension(RemoteAddr(remote.to_string())));
                let watcher = graceful.watcher();
                tokio::spawn(async move {
                    let tls = match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                        Ok(Ok(tls)) => tls,
                        Ok(Err(e)) => {
                            tracing::debug!(%remote, error = %e, "TLS handshake failed");
                            return;
                        }
                        Err(_) => return,
                    };
                    let mut builder = hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
                    builder.http1().timer(hyper_util::rt::TokioTimer::new()).header_read_timeout(std::time::Duration::from_secs(10));
                    builder.http2().max_concurrent_streams(64);
                    let service = hyper_util::service::TowerToHyperService::new(service);
                    let connection = builder.serve_connection(hyper_util::rt::TokioIo::new(tls), service);
                    if let Err(e) = watcher.watch(connection).await {
                        tracing::debug!(%remote, error = %e, "TLS connection ended with an error");
                    }
                });
            }
            () = async { let _ = stop.wait_for(|s| *s).await; } => break,
        }
    }
    drop(net);
    if tokio::time::timeout(DRAIN_LIMIT, graceful.shutdown()).await.is_err() {
        tracing::warn!("TLS connections did not finish in time; closing them");
    }
}

/// Builds and publishes what relying parties trust: CA certificates, the JWKS, and a CRL
/// per CA listing revoked SVIDs (re-signed on every change and at least hourly).
struct BundlePublisher {
    issuer: Arc<Issuer>,
    minter: Arc<X509Minter>,
    clock: Arc<dyn Clock>,
    bundles: tokio::sync::watch::Sender<Arc<TrustBundle>>,
    crl_made: std::sync::Mutex<std::time::SystemTime>,
    /// The revoked serials on the published CRL: a revocation that changes none of them
    /// (a JWT, a lock) does not re-sign it.
    crl_entries: std::sync::Mutex<Vec<(String, i64)>>,
}

/// A CRL older than this is re-signed even without a change (its validity is a day).
const CRL_REFRESH: std::time::Duration = std::time::Duration::from_secs(3600);

impl BundlePublisher {
    fn new(issuer: Arc<Issuer>, minter: Arc<X509Minter>, clock: Arc<dyn Clock>) -> Self {
        let now = clock.now();
        let me = Self {
            issuer,
            minter,
            clock,
            bundles: tokio::sync::watch::Sender::new(Arc::new(TrustBundle {
                x509: vec![],
                jwks: json!({ "keys": [] }),
                crls: vec![],
            })),
            crl_made: std::sync::Mutex::new(now),
            crl_entries: std::sync::Mutex::new(Vec::new()),
        };
        me.publish();
        me
    }

    /// Publishes only when the CRL's entries changed.
    fn publish_if_crl_changed(&self) {
        let entries = self.issuer.revocations().revoked_x509(self.clock.now());
        let same = *self.crl_entries.lock().unwrap_or_else(std::sync::PoisonError::into_inner) == entries;
        if !same {
            self.publish();
        }
    }

    fn subscribe(&self) -> tokio::sync::watch::Receiver<Arc<TrustBundle>> {
        self.bundles.subscribe()
    }

    fn crl_is_stale(&self) -> bool {
        let made = *self.crl_made.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        self.clock.now().duration_since(made).unwrap_or_default() >= CRL_REFRESH
    }

    fn publish(&self) {
        let now = self.clock.now();
        let entries = self.issuer.revocations().revoked_x509(now);
        // Why the number: CRL numbers must increase; milliseconds since the epoch do.
        let number = u64::try_from(now.duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_millis())
            .unwrap_or(u64::MAX);
        let crls = match self.minter.crls(&entries, now, number) {
            Ok(crls) => crls,
            Err(e) => {
                // Keep the last CRLs rather than publish none: an empty CRL would un-revoke.
                tracing::error!(error = %e, "CRL signing failed; the previous CRL stays published");
                self.bundles.borrow().crls.clone()
            }
        };
        *self.crl_made.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = now;
        *self.crl_entries.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = entries;
        self.bundles.send_replace(Arc::new(TrustBundle {
            x509: self.issuer.x509_bundle(),
            jwks: self.issuer.jwks(),
            crls,
        }));
    }
}

/// Re-publishes the bundle (a new CRL) on every revocation, lock or unlock.
async fn publish_on_revocation(publisher: Arc<BundlePublisher>, mut stop: tokio::sync::watch::Receiver<bool>) {
    let mut changes = publisher.issuer.revocations().changes();
    loop {
        tokio::select! {
            r = changes.changed() => {
                if r.is_err() {
                    return;
                }
                publisher.publish_if_crl_changed();
            }
            () = async { let _ = stop.wait_for(|s| *s).await; } => return,
        }
    }
}

/// Records `expired` for every credential past its not-after (the removal half of its
/// lifecycle), in (not_after, id) order from a watermark kept in the events themselves, so
/// a restart catches up on what expired while the daemon was down. Revoked credentials were
/// already removed and are skipped.
struct ExpirySweep {
    ledger_path: PathBuf,
    ledger: Arc<dyn Ledger>,
    issuer: Arc<Issuer>,
    clock: Arc<dyn Clock>,
    watermark: Option<(i64, String)>,
}

impl ExpirySweep {
    fn new(ledger_path: PathBuf, ledger: Arc<dyn Ledger>, issuer: Arc<Issuer>, clock: Arc<dyn Clock>) -> Self {
        Self { ledger_path, ledger, issuer, clock, watermark: None }
    }

    async fn run(mut self, every: std::time::Duration, stop: tokio::sync::watch::Receiver<bool>) {
        let mut ticker = crate::clock::Ticker::new(every, stop);
        while ticker.next().await {
            if let Err(e) = self.sweep().await {
                tracing::warn!(error = %e, "expiry sweep failed; retrying next tick");
            }
        }
    }

    async fn sweep(&mut self) -> Result<(), LedgerError> {
        let mut reader = LedgerReader::open(&self.ledger_path).await?;
        if self.watermark.is_none() {
            let last = reader.events_of_kinds(&["expired"]).await?.pop();
            let mark = last
                .and_then(|e| serde_json::from_str::<serde_json::Value>(&e.body).ok())
                .and_then(|b| Some((b.get("not_after")?.as_i64()?, b.get("credential_id")?.as_str()?.to_owned())));
            self.watermark = Some(mark.unwrap_or((i64::MIN, String::new())));
        }
        let now = crate::clock::unix_secs(self.clock.now());
        loop {
            let (after_na, after_id) = self.watermark.clone().unwrap_or((i64::MIN, String::new()));
            let batch = reader.expiring((after_na, &after_id), now, 500).await?;
            if batch.is_empty() {
                return Ok(());
            }
            for c in batch {
                if !self.issuer.revocations().is_revoked(&c.id) {
                    let emergency = self.issuer.is_break_glass(&c.id);
                    let body = json!({ "credential_id": c.id, "kind": c.kind, "identity": c.identity, "serial": c.serial, "not_after": c.not_after, "break_glass": emergency });
                    self.ledger
                        .record(NewEvent {
                            kind: EventKind::Expired,
                            at: self.clock.now(),
                            body: body.clone(),
                            credential: None,
                        })
                        .await?;
                    if emergency {
                        self.issuer.elevate_later("expired", body).await;
                    }
                }
                self.watermark = Some((c.not_after, c.id));
            }
        }
    }
}

/// Keeps the signing keys current. With CA files configured, a new valid pair on disk
/// becomes the X.509 signer (recorded first, `ca_rotated`); with a JWT key file, a new key
/// becomes the JWT signer (`jwt_key_rotated`). Retired CAs and keys stay in the bundles
/// until what they signed has expired; every change reaches every bundle stream (and SVID
/// streams renew).
struct KeyWatch {
    files: Option<(PathBuf, PathBuf)>,
    minter: Arc<X509Minter>,
    jwt_file: Option<PathBuf>,
    jwt: Arc<Es256Minter>,
    /// The JWT key file content last refused, so a bad file is reported once.
    jwt_refused: Option<Vec<u8>>,
    publisher: Arc<BundlePublisher>,
    ledger: Arc<dyn Ledger>,
    clock: Arc<dyn Clock>,
    longest_ttl: std::time::Duration,
    /// The certificate file content last refused, so a bad file is reported once.
    refused: Option<Vec<u8>>,
}

impl KeyWatch {
    async fn run(mut self, every: std::time::Duration, stop: tokio::sync::watch::Receiver<bool>) {
        let mut ticker = crate::clock::Ticker::delayed(every, stop).await;
        while ticker.next().await {
            self.check().await;
        }
    }

    async fn check(&mut self) {
        let now = self.clock.now();
        let mut changed = self.minter.prune(now);
        changed |= self.jwt.prune(now);
        if let Some((cert, key)) = self.files.clone() {
            changed |= self.reload(&cert, &key, now).await;
        }
        if let Some(path) = self.jwt_file.clone() {
            changed |= self.reload_jwt(&path, now).await;
        }
        if changed || self.publisher.crl_is_stale() {
            self.publisher.publish();
        }
    }

    async fn reload_jwt(&mut self, path: &Path, now: std::time::SystemTime) -> bool {
        let Ok(bytes) = std::fs::read(path) else { return false };
        if self.jwt_refused.as_ref() == Some(&bytes) {
            return false;
        }
        let from = self.jwt.active_kid();
        let next = match JwtKey::load(path) {
            Ok(k) if k.kid() == from => return false,
            Ok(k) => k,
            Err(e) => {
                tracing::warn!(error = %e, "new JWT key file refused; the current key keeps signing");
                let event = NewEvent {
                    kind: EventKind::JwtKeyRejected,
                    at: now,
                    body: json!({ "reason": e.to_string(), "kid": from }),
                    credential: None,
                };
                if self.ledger.record(event).await.is_ok() {
                    self.jwt_refused = Some(bytes);
                }
                return false;
            }
        };
        let to = next.kid().to_owned();
        let event = NewEvent {
            kind: EventKind::JwtKeyRotated,
            at: now,
            body: json!({ "from_kid": from, "to_kid": to }),
            credential: None,
        };
        if let Err(e) = self.ledger.record(event).await {
            tracing::error!(error = %e, "JWT key rotation not recorded; not rotating yet");
            return false;
        }
        if let Err(e) = self.jwt.rotate(next, now, self.longest_ttl) {
            tracing::error!(error = %e, "JWT key rotation failed; the current key keeps signing");
            return false;
        }
        self.jwt_refused = None;
        tracing::info!(from_kid = from, to_kid = to, "JWT signing key rotated");
        true
    }

    async fn reload(&mut self, cert: &Path, key: &Path, now: std::time::SystemTime) -> bool {
        let Ok(bytes) = std::fs::read(cert) else { return false };
        let same = pem::parse(&bytes).is_ok_and(|p| p.contents() == self.minter.active_ca_der().as_slice());
        if same || self.refused.as_ref() == Some(&bytes) {
            return false;
        }
        let sha = |der: &[u8]| hex::encode(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, der));
        let from = sha(&self.minter.active_ca_der());
        let next = match CertificateAuthority::load(cert, key, now) {
            Ok(ca) => ca,
            Err(e) => {
                tracing::warn!(error = %e, "new CA files refused; the current CA keeps signing");
                let event = NewEvent {
                    kind: EventKind::CaRejected,
                    at: now,
                    body: json!({ "reason": e.to_string(), "ca_sha256": from }),
                    credential: None,
                };
                if self.ledger.record(event).await.is_ok() {
                    self.refused = Some(bytes);
                }
                return false;
            }
        };
        let to = sha(next.cert_der());
        // Why record first: a signer change nobody can trace is worse than a late one; on a
        // ledger error the next tick tries again.
        let event = NewEvent {
            kind: EventKind::CaRotated,
            at: now,
            body: json!({ "from_sha256": from, "to_sha256": to }),
            credential: None,
        };
        if let Err(e) = self.ledger.record(event).await {
            tracing::error!(error = %e, "CA rotation not recorded; not rotating yet");
            return false;
        }
        self.minter.rotate(Arc::new(next), now, self.longest_ttl);
        self.refused = None;
        tracing::info!(from_sha256 = from, to_sha256 = to, "x509 CA rotated");
        true
    }
}

/// Binds a socket with `mode`: the workload socket 0666 (any local user may connect;
/// attestation is the gate), the admin socket 0600. The socket's directory must not be
/// writable by others, a symlink is refused, a stale socket is removed, and a live one
/// (another daemon) is left alone.
fn bind_socket(path: &Path, mode: u32) -> Result<UnixListener, DaemonError> {
    let fail = |why: String| DaemonError::Socket { path: path.into(), why };
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let dir = std::fs::metadata(&parent).map_err(|e| fail(format!("directory `{}`: {e}", parent.display())))?;
    let me = rustix::process::geteuid().as_raw();
    if dir.mode() & 0o022 != 0 || (dir.uid() != me && dir.uid() != 0) {
        return Err(fail(format!(
            "directory `{}` is writable by others or owned by another user (mode {:o}, uid {}); others could replace the socket",
            parent.display(),
            dir.mode() & 0o7777,
            dir.uid()
        )));
    }
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_symlink() => return Err(fail("is a symlink; refusing to use it".into())),
        Ok(meta) if meta.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(fail("another process is serving on it".into()));
            }
            std::fs::remove_file(path).map_err(|e| fail(format!("removing stale socket: {e}")))?;
        }
        Ok(_) => return Err(fail("exists and is not a socket; refusing to remove it".into())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(fail(e.to_string())),
    }
    let listener = UnixListener::bind(path).map_err(|e| fail(e.to_string()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(|e| fail(e.to_string()))?;
    Ok(listener)
}
