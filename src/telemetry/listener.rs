//! The telemetry listener: plain HTTP (loopback unless configured otherwise) serving
//! `/metrics` (OpenMetrics text, which Prometheus scrapes), `/healthz` and `/readyz`; any
//! other path is 404. It is the last listener to stop, so `/readyz` answers "draining"
//! while the other listeners finish their in-flight requests.

use std::sync::Arc;
use std::time::Duration;

use axum::http::{HeaderValue, header};
use axum::response::IntoResponse;
use axum::routing::get;
use tokio::sync::watch;

use super::Metrics;
use super::health::{self, Health};

/// What Prometheus is told the exposition is.
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The listener's routes.
pub fn router(metrics: Arc<Metrics>, health: Arc<Health>) -> axum::Router {
    let scrape = move || {
        let metrics = metrics.clone();
        async move {
            let mut response = metrics.encode().into_response();
            response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(OPENMETRICS));
            response
        }
    };
    axum::Router::new().route("/metrics", get(scrape)).merge(health::routes(health)).fallback(health::not_found)
}

/// Serves until `stop` flips, then closes connections (requests in flight get a second).
pub async fn serve(
    tcp: tokio::net::TcpListener,
    router: axum::Router,
    mut stop: watch::Receiver<bool>,
) -> Result<(), String> {
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    loop {
        tokio::select! {
            accepted = tcp.accept() => {
                let (stream, remote) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        tracing::warn!(error = %e, "accept on the telemetry listener failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let service = hyper_util::service::TowerToHyperService::new(router.clone());
                let watcher = graceful.watcher();
                tokio::spawn(async move {
                    let mut builder = hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
                    builder.http1().timer(hyper_util::rt::TokioTimer::new()).header_read_timeout(Duration::from_secs(10));
                    let connection = builder.serve_connection(hyper_util::rt::TokioIo::new(stream), service);
                    if let Err(e) = watcher.watch(connection).await {
                        tracing::debug!(%remote, error = %e, "telemetry connection ended with an error");
                    }
                });
            }
            () = async { let _ = stop.wait_for(|s| *s).await; } => break,
        }
    }
    drop(tcp);
    let _ = tokio::time::timeout(Duration::from_secs(1), graceful.shutdown()).await;
    Ok(())
}
