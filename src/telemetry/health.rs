//! `/healthz` and `/readyz`, on the telemetry listener and the TLS listener.
//!
//! - `/healthz` — liveness: the process answers. Depends on nothing else (not the ledger),
//!   so a slow or full disk never makes a supervisor restart a daemon that is draining or
//!   waiting for storage. Always 200 while the process serves HTTP.
//! - `/readyz` — readiness: every probe the daemon registered passes (the ledger writer is
//!   running and its last commit succeeded, a policy release is active, the signing CA is
//!   loaded and not expired; with a shared ledger, the shared state is fresh) and the
//!   daemon is not draining. 200 or 503.
//!
//! Both answer a small JSON body naming each check.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::{Map, Value, json};

/// A readiness check: `Ok(detail)` or `Err(why)`.
type Check = Box<dyn Fn() -> Result<String, String> + Send + Sync>;

pub struct Health {
    started: Instant,
    draining: AtomicBool,
    probes: Vec<(&'static str, Check)>,
}

impl std::fmt::Debug for Health {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Health").field("draining", &self.is_draining()).finish_non_exhaustive()
    }
}

impl Default for Health {
    fn default() -> Self {
        Self::new()
    }
}

impl Health {
    pub fn new() -> Self {
        Self { started: Instant::now(), draining: AtomicBool::new(false), probes: Vec::new() }
    }

    /// Adds a readiness check (before the health is shared).
    pub fn probe(
        mut self,
        name: &'static str,
        check: impl Fn() -> Result<String, String> + Send + Sync + 'static,
    ) -> Self {
        self.probes.push((name, Box::new(check)));
        self
    }

    /// The daemon stopped accepting work: not ready from now on.
    pub fn set_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    /// Liveness: always true while the process answers.
    pub fn live(&self) -> Value {
        json!({
            "status": "alive",
            "version": env!("CARGO_PKG_VERSION"),
            "uptime_seconds": self.started.elapsed().as_secs(),
        })
    }

    /// Readiness and the JSON body that explains it.
    pub fn ready(&self) -> (bool, Value) {
        let mut checks = Map::new();
        let mut ready = true;
        for (name, check) in &self.probes {
            let entry = match check() {
                Ok(detail) => json!({ "ok": true, "detail": detail }),
                Err(why) => {
                    ready = false;
                    json!({ "ok": false, "detail": why })
                }
            };
            checks.insert((*name).to_owned(), entry);
        }
        let draining = self.is_draining();
        ready &= !draining;
        let status = if ready {
            "ready"
        } else if draining {
            "draining"
        } else {
            "not_ready"
        };
        (ready, json!({ "status": status, "draining": draining, "checks": checks }))
    }
}

/// `/healthz` and `/readyz` as routes (merged into the telemetry and TLS routers).
pub fn routes(health: Arc<Health>) -> axum::Router {
    let live = health.clone();
    axum::Router::new().route("/healthz", get(move || async move { Json(live.live()) })).route(
        "/readyz",
        get(move || async move {
            let (ready, body) = health.ready();
            let code = if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
            (code, Json(body)).into_response()
        }),
    )
}

/// What an unknown path answers: 404 with a small JSON body.
pub async fn not_found() -> Response {
    (StatusCode::NOT_FOUND, Json(json!({ "error": "not_found" }))).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_follows_the_probes_and_the_drain() {
        let failing = Arc::new(AtomicBool::new(false));
        let f = failing.clone();
        let health = Health::new().probe("ledger", move || {
            if f.load(Ordering::SeqCst) { Err("last commit failed".into()) } else { Ok("writable".into()) }
        });
        assert!(health.ready().0);
        failing.store(true, Ordering::SeqCst);
        let (ready, body) = health.ready();
        assert!(!ready);
        assert_eq!(body["checks"]["ledger"]["detail"], "last commit failed");
        failing.store(false, Ordering::SeqCst);
        health.set_draining();
        let (ready, body) = health.ready();
        assert!(!ready);
        assert_eq!(body["status"], "draining");
        assert_eq!(health.live()["status"], "alive", "liveness does not follow readiness");
    }
}
