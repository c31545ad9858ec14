//! A tower layer timing every request of a listener into `mayfly_request_duration_seconds`,
//! labelled by the RPC or route. A path the listener does not serve (HTTP 404, gRPC
//! UNIMPLEMENTED) is labelled `other`, so a caller cannot grow the label set.

use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use super::Metrics;

#[derive(Clone)]
pub struct RequestMetricsLayer {
    metrics: Arc<Metrics>,
    listener: &'static str,
}

impl RequestMetricsLayer {
    pub fn new(metrics: Arc<Metrics>, listener: &'static str) -> Self {
        Self { metrics, listener }
    }
}

impl<S> tower::Layer<S> for RequestMetricsLayer {
    type Service = RequestMetrics<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RequestMetrics { inner, metrics: self.metrics.clone(), listener: self.listener }
    }
}

#[derive(Clone)]
pub struct RequestMetrics<S> {
    inner: S,
    metrics: Arc<Metrics>,
    listener: &'static str,
}

impl<S, B, R> tower::Service<axum::http::Request<B>> for RequestMetrics<S>
where
    S: tower::Service<axum::http::Request<B>, Response = axum::http::Response<R>>,
    S::Future: Send + 'static,
    S::Error: 'static,
    R: 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = crate::BoxFuture<'static, Result<S::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: axum::http::Request<B>) -> Self::Future {
        let path = request.uri().path().to_owned();
        let started = Instant::now();
        let answer = self.inner.call(request);
        let (metrics, listener) = (self.metrics.clone(), self.listener);
        Box::pin(async move {
            let response = answer.await;
            if let Ok(r) = &response {
                let unimplemented = r.headers().get("grpc-status").is_some_and(|v| v == "12");
                let served = r.status() != axum::http::StatusCode::NOT_FOUND && !unimplemented;
                metrics.request(listener, if served { &path } else { "other" }, started.elapsed());
            }
            response
        })
    }
}
