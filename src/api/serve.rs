//! The listeners: the workload socket (any local user; `mayfly.v1` and the SPIFFE Workload
//! API), the admin socket (0600), and the TLS listener (the token exchange, discovery,
//! JWKS, CRL). Each serves until the daemon's stop flag flips, then lets in-flight
//! requests finish within the drain limit. Decides nothing.

use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::UnixListener;
use tokio::sync::watch;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::UnixListenerStream;

use super::authority::AuthorityFix;
use super::deadline::{OnTimeout, ReadDeadline};
use super::exchange::RemoteAddr;
use crate::attest::PeerStream;
use crate::config::TlsSource;
use crate::keys::CertificateAuthority;
use crate::limits::{CallerKey, Connections, LimitsConfig};
use crate::telemetry::Metrics;
use crate::telemetry::layer::RequestMetricsLayer;

/// The TLS listener's server configuration, swapped whole on a reload: a handshake uses
/// the configuration current when it starts, so no connection is dropped by a swap.
pub type TlsConfig = Arc<arc_swap::ArcSwap<rustls::ServerConfig>>;

/// How long shutdown waits for in-flight requests before closing their connections.
pub const DRAIN_LIMIT: Duration = Duration::from_secs(10);
/// A TLS handshake that has not finished after this long is dropped.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long an accept loop waits after a failed accept (e.g. no descriptor left).
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("socket `{path}`: {why}")]
    Socket { path: PathBuf, why: String },
    #[error("listener `{address}`: {why}")]
    Listen { address: String, why: String },
}

/// What the listeners bound for every caller (`[limits]`), and where they count refusals.
#[derive(Clone)]
pub struct ListenerLimits {
    pub limits: LimitsConfig,
    /// Each listener's connection total (within the descriptor limit, see `limits`).
    pub max_connections: usize,
    pub metrics: Arc<Metrics>,
}

impl ListenerLimits {
    fn on_timeout(&self, listener: &'static str) -> OnTimeout {
        let metrics = self.metrics.clone();
        Arc::new(move |which| metrics.connection_refused(listener, which))
    }
}

/// Serves the workload socket: `mayfly.v1` and the SPIFFE Workload API. Why the
/// authority filter: gRPC C-core clients (py-spiffe) send the socket path as :authority,
/// which the HTTP/2 server would reject; see `api::authority`. Each connection counts
/// against its uid's share (`limits.connections_per_uid`) and the socket's total, and is
/// under the header and idle deadlines (`api::deadline`); the server pings every quarter
/// of the idle timeout, which live clients answer.
pub async fn workload(
    listener: UnixListener,
    routes: tonic::service::Routes,
    request_timeout: Duration,
    metrics: RequestMetricsLayer,
    limits: ListenerLimits,
    mut stop: watch::Receiver<bool>,
) -> Result<(), String> {
    let connections = Connections::new(limits.limits.connections_per_uid, limits.max_connections);
    let counted = Arc::downgrade(&connections);
    limits.metrics.sample_with(move |m| m.connections_open("workload", counted.upgrade().map_or(0, |c| c.open())));
    let (tx, rx) = tokio::sync::mpsc::channel::<std::io::Result<AuthorityFix<ReadDeadline<PeerStream>>>>(16);
    let accept_stop = stop.clone();
    let accepting = tokio::spawn(accept_workload(listener, connections, limits.clone(), tx, accept_stop));
    let idle = limits.limits.idle_timeout;
    let served = tonic::transport::Server::builder()
        .timeout(request_timeout)
        .concurrency_limit_per_connection(64)
        .http2_keepalive_interval(Some((idle / 4).max(Duration::from_secs(1))))
        .http2_keepalive_timeout(Some((idle / 4).clamp(Duration::from_secs(1), Duration::from_secs(20))))
        .layer(metrics)
        .add_routes(routes)
        .serve_with_incoming_shutdown(tokio_stream::wrappers::ReceiverStream::new(rx), async move {
            let _ = stop.wait_for(|s| *s).await;
        })
        .await
        .map_err(|e| e.to_string());
    accepting.abort();
    served
}

/// Accepts workload-socket connections: the uid from SO_PEERCRED decides the share it
/// counts against before anything else is done for it (a refused connection is closed at
/// once). An accept error (descriptors exhausted) backs off rather than spinning.
async fn accept_workload(
    listener: UnixListener,
    connections: Arc<Connections>,
    limits: ListenerLimits,
    tx: tokio::sync::mpsc::Sender<std::io::Result<AuthorityFix<ReadDeadline<PeerStream>>>>,
    mut stop: watch::Receiver<bool>,
) {
    let on_timeout = limits.on_timeout("workload");
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = stop.wait_for(|s| *s) => return,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                tracing::warn!(error = %e, "accept on the workload socket failed; backing off");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
                continue;
            }
        };
        let uid = stream.peer_cred().map_or(u32::MAX, |c| c.uid());
        let slot = match connections.admit(CallerKey::Uid(uid)) {
            Ok(slot) => slot,
            Err(refused) => {
                tracing::debug!(uid, reason = refused.as_str(), "workload connection refused");
                limits.metrics.connection_refused("workload", refused.as_str());
                continue;
            }
        };
        let conn = ReadDeadline::new(
            PeerStream::new(stream),
            limits.limits.header_timeout,
            limits.limits.idle_timeout,
            Some(slot),
            Some(on_timeout.clone()),
        );
        if tx.send(Ok(AuthorityFix::new(conn))).await.is_err() {
            return;
        }
    }
}

/// Serves the admin socket (0600): responders and operators.
pub async fn admin(
    listener: UnixListener,
    routes: tonic::service::Routes,
    request_timeout: Duration,
    metrics: RequestMetricsLayer,
    mut stop: watch::Receiver<bool>,
) -> Result<(), String> {
    let incoming = UnixListenerStream::new(listener).map(|conn| conn.map(PeerStream::new));
    tonic::transport::Server::builder()
        .timeout(request_timeout)
        .layer(metrics)
        .add_routes(routes)
        .serve_with_incoming_shutdown(incoming, async move {
            let _ = stop.wait_for(|s| *s).await;
        })
        .await
        .map_err(|e| e.to_string())
}

/// Accepts TLS connections until `stop`, then lets in-flight requests finish (bounded).
///
/// Each connection counts against its source address's share
/// (`limits.connections_per_address`) and the listener's total; the handshake, the request
/// head, an idle connection and a request body are each under a deadline.
pub async fn tls(
    tcp: tokio::net::TcpListener,
    config: TlsConfig,
    router: axum::Router,
    limits: ListenerLimits,
    mut stop: watch::Receiver<bool>,
) -> Result<(), String> {
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let connections = Connections::new(limits.limits.connections_per_address, limits.max_connections);
    let counted = Arc::downgrade(&connections);
    limits.metrics.sample_with(move |m| m.connections_open("tls", counted.upgrade().map_or(0, |c| c.open())));
    let on_timeout = limits.on_timeout("tls");
    let (header_timeout, idle_timeout) = (limits.limits.header_timeout, limits.limits.idle_timeout);
    loop {
        tokio::select! {
            accepted = tcp.accept() => {
                let (tcp, remote) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        tracing::warn!(error = %e, "accept on the TLS listener failed; backing off");
                        tokio::time::sleep(ACCEPT_BACKOFF).await;
                        continue;
                    }
                };
                let slot = match connections.admit(CallerKey::Address(remote.ip())) {
                    Ok(slot) => slot,
                    Err(refused) => {
                        tracing::debug!(%remote, reason = refused.as_str(), "TLS connection refused");
                        limits.metrics.connection_refused("tls", refused.as_str());
                        continue;
                    }
                };
                let tcp = ReadDeadline::new(tcp, TLS_HANDSHAKE_TIMEOUT.min(header_timeout), idle_timeout, Some(slot), Some(on_timeout.clone()));
                let acceptor = tokio_rustls::TlsAcceptor::from(config.load_full());
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
                    builder.http1().timer(hyper_util::rt::TokioTimer::new()).header_read_timeout(header_timeout);
                    builder
                        .http2()
                        .timer(hyper_util::rt::TokioTimer::new())
                        .max_concurrent_streams(64)
                        .keep_alive_interval(Some((idle_timeout / 4).max(Duration::from_secs(1))))
                        .keep_alive_timeout((idle_timeout / 4).clamp(Duration::from_secs(1), Duration::from_secs(20)));
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
    drop(tcp);
    if tokio::time::timeout(DRAIN_LIMIT, graceful.shutdown()).await.is_err() {
        tracing::warn!("TLS connections did not finish in time; closing them");
    }
    Ok(())
}

/// The rustls server configuration: the configured certificate, or (dev) one for
/// localhost and the bound address from the daemon's own CA. ALPN offers h2 (gRPC, curl)
/// and http/1.1 (plain HTTPS clients fetching JWKS). Read again on a reload.
pub fn tls_config(
    source: &TlsSource,
    ca: &CertificateAuthority,
    bound: Option<std::net::SocketAddr>,
    now: std::time::SystemTime,
) -> Result<Arc<rustls::ServerConfig>, ServeError> {
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
    let fail = |why: String| ServeError::Listen { address: bound.map(|a| a.to_string()).unwrap_or_default(), why };
    match source {
        TlsSource::Files { cert, key } => tls_files_config(cert, key).map_err(fail),
        TlsSource::FromCa => {
            let mut names = vec!["localhost".to_owned(), "127.0.0.1".to_owned()];
            if let Some(addr) = bound.filter(|a| !a.ip().is_unspecified() && a.ip().to_string() != "127.0.0.1") {
                names.push(addr.ip().to_string());
            }
            let (cert, key) = ca
                .issue_tls_server(&names, now, std::time::Duration::from_secs(30 * 86_400))
                .map_err(|e| fail(e.to_string()))?;
            let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.expose().to_vec()));
            server_config(vec![CertificateDer::from(cert)], key).map_err(fail)
        }
    }
}

/// The server configuration for a certificate chain and key in PEM files (the key mode
/// 0600 or stricter): at start, and again on a reload.
pub fn tls_files_config(cert: &Path, key: &Path) -> Result<Arc<rustls::ServerConfig>, String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let chain = CertificateDer::pem_file_iter(cert)
        .and_then(Iterator::collect::<Result<Vec<_>, _>>)
        .map_err(|e| format!("certificate `{}`: {e}", cert.display()))?;
    if chain.is_empty() {
        return Err(format!("certificate `{}`: no PEM certificate in it", cert.display()));
    }
    let meta = std::fs::metadata(key).map_err(|e| format!("key `{}`: {e}", key.display()))?;
    if meta.mode() & 0o077 != 0 {
        return Err(format!("key `{}` is readable by group or others; chmod 600 it", key.display()));
    }
    let key_der = PrivateKeyDer::from_pem_file(key).map_err(|e| format!("key `{}`: {e}", key.display()))?;
    server_config(chain, key_der)
}

fn server_config(
    chain: Vec<rustls::pki_types::CertificateDer<'static>>,
    key: rustls::pki_types::PrivateKeyDer<'static>,
) -> Result<Arc<rustls::ServerConfig>, String> {
    let mut config =
        rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .map_err(|e| e.to_string())?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// SHA-256 of the first certificate of a PEM file (what a reload reports it now serves).
pub fn certificate_sha256(cert: &Path) -> Option<String> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let first = CertificateDer::pem_file_iter(cert).ok()?.next()?.ok()?;
    Some(hex::encode(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &first)))
}

/// Binds a socket with `mode`: the workload socket 0666 (any local user may connect;
/// attestation is the gate), the admin socket 0600. The socket's directory must not be
/// writable by others, a symlink is refused, a stale socket is removed, and a live one
/// (another daemon) is left alone.
pub fn bind_socket(path: &Path, mode: u32) -> Result<UnixListener, ServeError> {
    let fail = |why: String| ServeError::Socket { path: path.into(), why };
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

/// Request bodies on the TLS listener must arrive whole within `timeout` (a client
/// trickling a body holds a connection and a task for no longer), and a declared length
/// over `max_bytes` is refused from the request head. The body is then handed on in full
/// (bounded by `max_bytes`).
pub fn body_deadline(router: axum::Router, max_bytes: usize, timeout: Duration) -> axum::Router {
    use axum::http::{Method, StatusCode, header};
    use axum::response::IntoResponse;
    let refuse = |status: StatusCode, reason: String| {
        (status, axum::Json(serde_json::json!({ "error": "invalid_request", "reason": reason }))).into_response()
    };
    router.layer(axum::middleware::from_fn(
        move |request: axum::extract::Request, next: axum::middleware::Next| async move {
            if request.method() != Method::POST {
                return next.run(request).await;
            }
            let declared = request
                .headers()
                .get(header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u64>().ok());
            if declared.is_some_and(|n| n > u64::try_from(max_bytes).unwrap_or(u64::MAX)) {
                return refuse(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!("the body is over the limit of {max_bytes} bytes"),
                );
            }
            let (parts, body) = request.into_parts();
            match tokio::time::timeout(timeout, axum::body::to_bytes(body, max_bytes)).await {
                Ok(Ok(bytes)) => {
                    next.run(axum::extract::Request::from_parts(parts, axum::body::Body::from(bytes))).await
                }
                Ok(Err(e)) if over_limit(&e) => {
                    refuse(StatusCode::PAYLOAD_TOO_LARGE, format!("the body is over the limit of {max_bytes} bytes"))
                }
                Ok(Err(_)) => refuse(StatusCode::BAD_REQUEST, "the body could not be read".into()),
                Err(_) => refuse(
                    StatusCode::REQUEST_TIMEOUT,
                    format!("the body did not arrive within {} s (limits.body_timeout)", timeout.as_secs()),
                ),
            }
        },
    ))
}

/// Whether reading a body failed on its length limit (not on the client going away).
fn over_limit(e: &axum::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(s) = source {
        if s.is::<http_body_util::LengthLimitError>() {
            return true;
        }
        source = s.source();
    }
    false
}
