//! What operators watch the daemon with: Prometheus metrics (`Metrics`, one registry of
//! typed families), `/healthz` and `/readyz` (`health`), the telemetry listener that serves
//! them (`listener`), the log format (`logging`), and the service manager's notifications
//! (`notify`). Decides nothing and records nothing: the pipeline, the ledger writer and the
//! services report into a narrow `Arc<Metrics>` where things happen; values that are state
//! rather than events (policy release, CA not-after, pending approvals, process figures)
//! are read at scrape time by samplers the daemon registers.
//!
//! Label cardinality stays bounded: kinds, APIs, outcomes and RPC names are fixed sets; rule
//! ids are bounded by the active releases; issuers by the configuration. An identity, a
//! credential id or a caller is never a label.

pub mod health;
pub mod layer;
pub mod listener;
pub mod logging;
pub mod notify;
mod process;

use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};

use crate::ledger::event::{Event, Verdict};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct IssuedLabels {
    /// `x509`, `jwt`, `aws`.
    pub kind: String,
    /// The API the request came through (`mayfly.v1`, `spiffe_workload_api`, `exchange`, `break_glass`).
    pub api: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DecisionLabels {
    /// `allow` or `deny`.
    pub outcome: String,
    /// The first rule that decided (`@id` of the release's rule); empty when no rule did
    /// (a refusal before policy: attestation, token, inventory, lock).
    pub rule: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RpcLabels {
    /// Which listener: `workload`, `admin`, `tls`.
    pub listener: String,
    /// The RPC or route (`/mayfly.v1.Broker/IssueX509`, `/v1/exchange`); `other` for a
    /// path the listener does not serve (never the raw path: that would be unbounded).
    pub rpc: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StreamLabels {
    stream: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PolicyLabels {
    version: String,
    label: String,
    signed_by: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KidLabels {
    kid: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct IssuerLabels {
    issuer: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StsLabels {
    call: String,
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LimitLabels {
    limit: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ConnectionLabels {
    listener: String,
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ListenerLabels {
    listener: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StageLabels {
    stage: String,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

fn latency_histogram() -> Histogram {
    // 0.5 ms .. ~8 s.
    Histogram::new(exponential_buckets(0.0005, 2.0, 15))
}

/// A state value read when `/metrics` is scraped.
type Sampler = Box<dyn Fn(&Metrics) + Send + Sync>;

/// The daemon's metric families, registered once; cheap to update from any task.
pub struct Metrics {
    registry: Registry,
    issued: Family<IssuedLabels, Counter>,
    decisions: Family<DecisionLabels, Counter>,
    requests: HistogramFamily<RpcLabels>,
    ledger_commit: Histogram,
    ledger_batch: Histogram,
    ledger_failures: Counter,
    policy_release: Family<PolicyLabels, Gauge>,
    policy_activations: Counter,
    policy_rejections: Counter,
    policy_rollbacks: Counter,
    revoked: Family<KindLabels, Counter>,
    revocations: Counter,
    locks: Counter,
    unlocks: Counter,
    locks_active: Gauge,
    streams: Family<StreamLabels, Gauge>,
    ca_not_after: Gauge,
    jwt_key: Family<KidLabels, Gauge>,
    jwt_retired_until: Family<KidLabels, Gauge>,
    key_rotations: Family<KindLabels, Counter>,
    oidc_failures: Family<IssuerLabels, Counter>,
    sts_calls: Family<StsLabels, Counter>,
    break_glass_pending: Gauge,
    break_glass_steps: Family<StageLabels, Counter>,
    reloads: Family<ResultLabels, Counter>,
    limited: Family<LimitLabels, Counter>,
    connections_refused: Family<ConnectionLabels, Counter>,
    connections_open: Family<ListenerLabels, Gauge>,
    refusals_counted: Counter,
    process: process::ProcessMetrics,
    samplers: Mutex<Vec<Sampler>>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Registers `metric` under `name` and returns it (the registry keeps a handle).
fn reg<M: prometheus_client::registry::Metric + Clone>(r: &mut Registry, name: &str, help: &str, metric: M) -> M {
    // The encoder ends each help with a period of its own.
    r.register(name, help.trim_end_matches('.'), metric.clone());
    metric
}

fn reg_unit<M: prometheus_client::registry::Metric + Clone>(
    r: &mut Registry,
    name: &str,
    help: &str,
    unit: Unit,
    metric: M,
) -> M {
    r.register_with_unit(name, help.trim_end_matches('.'), unit, metric.clone());
    metric
}

impl Metrics {
    pub fn new() -> Self {
        let mut r = Registry::default();
        let issued = reg(
            &mut r,
            "mayfly_credentials_issued",
            "Credentials issued (their issued event durable), by kind and API",
            Family::default(),
        );
        let decisions = reg(
            &mut r,
            "mayfly_decisions",
            "Issuance decisions recorded, by outcome and the first deciding rule (empty: refused before policy)",
            Family::default(),
        );
        let requests = reg_unit(
            &mut r,
            "mayfly_request_duration",
            "Time to answer an RPC or HTTP request (streams: to the response headers), by listener and RPC.",
            Unit::Seconds,
            HistogramFamily::<RpcLabels>::new_with_constructor(latency_histogram),
        );
        let ledger_commit = reg_unit(
            &mut r,
            "mayfly_ledger_commit_duration",
            "Time to commit one group of ledger events (one transaction and fsync).",
            Unit::Seconds,
            Histogram::new(exponential_buckets(0.0001, 2.0, 16)),
        );
        let ledger_batch = reg(
            &mut r,
            "mayfly_ledger_commit_batch_events",
            "Events committed together in one ledger transaction",
            Histogram::new(exponential_buckets(1.0, 2.0, 13)),
        );
        let ledger_failures = reg(
            &mut r,
            "mayfly_ledger_commit_failures",
            "Ledger commits that failed (nothing in the batch was recorded or issued)",
            Counter::default(),
        );
        let policy_release =
            reg(&mut r, "mayfly_policy_release_info", "The active policy release (value 1).", Family::default());
        let policy_activations = reg(
            &mut r,
            "mayfly_policy_activations",
            "Policy releases activated (start-up included)",
            Counter::default(),
        );
        let policy_rejections = reg(
            &mut r,
            "mayfly_policy_rejections",
            "Policy releases refused (bad signature, invalid, failing tests, held)",
            Counter::default(),
        );
        let policy_rollbacks = reg(
            &mut r,
            "mayfly_policy_rollbacks",
            "Rollbacks to an earlier release by an operator",
            Counter::default(),
        );
        let revoked = reg(
            &mut r,
            "mayfly_credentials_revoked",
            "Credentials revoked before their expiry, by kind",
            Family::default(),
        );
        let revocations =
            reg(&mut r, "mayfly_revocations", "Revocations recorded (one per revoke call).", Counter::default());
        let locks = reg(
            &mut r,
            "mayfly_identity_locks",
            "Identity locks placed (revoke by identity included)",
            Counter::default(),
        );
        let unlocks = reg(&mut r, "mayfly_identity_unlocks", "Identity locks lifted.", Counter::default());
        let locks_active =
            reg(&mut r, "mayfly_identity_locks_active", "Identity locks in force now.", Gauge::default());
        let streams = reg(
            &mut r,
            "mayfly_workload_api_streams",
            "Open SPIFFE Workload API streams, by stream (x509_svid, x509_bundles, jwt_bundles)",
            Family::default(),
        );
        let ca_not_after = reg_unit(
            &mut r,
            "mayfly_ca_not_after",
            "Not-after of the X.509 CA that signs, Unix time.",
            Unit::Seconds,
            Gauge::default(),
        );
        let jwt_key = reg(
            &mut r,
            "mayfly_jwt_key_info",
            "The JWT signing key (value 1); an ES256 key has no not-after of its own",
            Family::default(),
        );
        let jwt_retired_until = reg_unit(
            &mut r,
            "mayfly_jwt_key_not_after",
            "Retired JWT keys: when each leaves the JWKS (its last token expired), Unix time.",
            Unit::Seconds,
            Family::default(),
        );
        let key_rotations = reg(
            &mut r,
            "mayfly_key_rotations",
            "Signing key changes recorded: ca_rotated, ca_rejected, jwt_key_rotated, jwt_key_rejected",
            Family::default(),
        );
        let oidc_failures = reg(
            &mut r,
            "mayfly_oidc_key_fetch_failures",
            "Failed fetches of a trusted OIDC issuer's discovery document or JWKS",
            Family::default(),
        );
        let sts_calls = reg(
            &mut r,
            "mayfly_sts_calls",
            "AWS STS calls, by call and outcome (ok, or the AWS error code; retries counted each)",
            Family::default(),
        );
        let limited = reg(
            &mut r,
            "mayfly_limited",
            "Requests refused by a limit before anything was decided, by limit (rate, caller_busy, busy)",
            Family::default(),
        );
        let connections_refused = reg(
            &mut r,
            "mayfly_connections_refused",
            "Connections closed at accept or before their first request, by listener and reason (per_caller, total, header_timeout, idle_timeout)",
            Family::default(),
        );
        let connections_open =
            reg(&mut r, "mayfly_connections_open", "Client connections open now, by listener.", Family::default());
        let refusals_counted = reg(
            &mut r,
            "mayfly_refusals_counted",
            "Refusals counted in a refusals event rather than written one by one (repeats within the window)",
            Counter::default(),
        );
        let break_glass_pending = reg(
            &mut r,
            "mayfly_break_glass_pending",
            "Break-glass requests waiting for a second person on this daemon",
            Gauge::default(),
        );
        let break_glass_steps =
            reg(&mut r, "mayfly_break_glass_steps", "Break-glass steps recorded, by stage.", Family::default());
        let reloads = reg(
            &mut r,
            "mayfly_config_reloads",
            "Reloads (SIGHUP), by result: applied, partial (some changes need a restart), failed",
            Family::default(),
        );
        let process = process::ProcessMetrics::register(&mut r);
        Self {
            registry: r,
            issued,
            decisions,
            requests,
            ledger_commit,
            ledger_batch,
            ledger_failures,
            policy_release,
            policy_activations,
            policy_rejections,
            policy_rollbacks,
            revoked,
            revocations,
            locks,
            unlocks,
            locks_active,
            streams,
            ca_not_after,
            jwt_key,
            jwt_retired_until,
            key_rotations,
            oidc_failures,
            sts_calls,
            break_glass_pending,
            break_glass_steps,
            reloads,
            limited,
            connections_refused,
            connections_open,
            refusals_counted,
            process,
            samplers: Mutex::new(Vec::new()),
        }
    }

    /// The exposition (OpenMetrics text, which Prometheus reads), after every sampler ran.
    pub fn encode(&self) -> String {
        self.process.sample();
        for sample in self.samplers().iter() {
            sample(self);
        }
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::error!(error = %e, "metrics could not be encoded");
        }
        out
    }

    /// Registers a state value to be read at every scrape.
    pub fn sample_with(&self, sampler: impl Fn(&Metrics) + Send + Sync + 'static) {
        self.samplers().push(Box::new(sampler));
    }

    /// A decision the ledger accepted.
    pub fn decision(&self, outcome: Verdict, rules: &[String]) {
        let outcome = match outcome {
            Verdict::Allow => "allow",
            Verdict::Deny => "deny",
        };
        let labels = DecisionLabels { outcome: outcome.into(), rule: rules.first().cloned().unwrap_or_default() };
        self.decisions.get_or_create(&labels).inc();
    }

    /// A credential whose `issued` event is durable.
    pub fn issued(&self, kind: &str, api: &str) {
        self.issued.get_or_create(&IssuedLabels { kind: kind.into(), api: api.into() }).inc();
    }

    pub fn request(&self, listener: &str, rpc: &str, took: Duration) {
        let labels = RpcLabels { listener: listener.into(), rpc: rpc.into() };
        self.requests.get_or_create(&labels).observe(took.as_secs_f64());
    }

    /// A stream opened; the guard closes it (the gauge goes down) when dropped.
    pub fn stream_opened(self: &std::sync::Arc<Self>, stream: &'static str) -> StreamGuard {
        self.streams.get_or_create(&StreamLabels { stream: stream.into() }).inc();
        StreamGuard { metrics: self.clone(), stream }
    }

    pub fn oidc_fetch_failed(&self, issuer: &str) {
        self.oidc_failures.get_or_create(&IssuerLabels { issuer: issuer.into() }).inc();
    }

    pub fn sts_call(&self, call: &'static str, outcome: &str) {
        self.sts_calls.get_or_create(&StsLabels { call: call.into(), outcome: outcome.into() }).inc();
    }

    /// `result`: `applied`, `partial` or `failed`.
    /// A request a limit refused (`limits::LimitKind`).
    pub fn limited(&self, limit: &'static str) {
        self.limited.get_or_create(&LimitLabels { limit: limit.into() }).inc();
    }

    /// A connection closed at accept or before its first request.
    pub fn connection_refused(&self, listener: &'static str, reason: &'static str) {
        self.connections_refused
            .get_or_create(&ConnectionLabels { listener: listener.into(), reason: reason.into() })
            .inc();
    }

    /// Client connections open now on `listener`.
    pub fn connections_open(&self, listener: &'static str, open: usize) {
        self.connections_open
            .get_or_create(&ListenerLabels { listener: listener.into() })
            .set(i64::try_from(open).unwrap_or(i64::MAX));
    }

    /// A refusal counted rather than written (a repeat within its window).
    pub fn refusal_counted(&self) {
        self.refusals_counted.inc();
    }

    pub fn reloaded(&self, result: &'static str) {
        self.reloads.get_or_create(&ResultLabels { result: result.into() }).inc();
    }

    pub fn set_policy_release(&self, version: &str, label: Option<&str>, signed_by: Option<&str>) {
        let labels = PolicyLabels {
            version: version.into(),
            label: label.unwrap_or_default().into(),
            signed_by: signed_by.unwrap_or_default().into(),
        };
        if self.policy_release.get(&labels).is_none() {
            self.policy_release.clear();
        }
        self.policy_release.get_or_create(&labels).set(1);
    }

    pub fn set_ca_not_after(&self, not_after: SystemTime) {
        self.ca_not_after.set(crate::clock::unix_secs(not_after));
    }

    /// The active JWT key and the retired ones with the time each leaves the JWKS.
    pub fn set_jwt_keys(&self, active: &str, retired: &[(String, SystemTime)]) {
        let labels = KidLabels { kid: active.into() };
        if self.jwt_key.get(&labels).is_none() {
            self.jwt_key.clear();
        }
        self.jwt_key.get_or_create(&labels).set(1);
        self.jwt_retired_until.clear();
        for (kid, until) in retired {
            self.jwt_retired_until.get_or_create(&KidLabels { kid: kid.clone() }).set(crate::clock::unix_secs(*until));
        }
    }

    pub fn set_break_glass_pending(&self, n: usize) {
        self.break_glass_pending.set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    pub fn set_locks_active(&self, n: usize) {
        self.locks_active.set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    fn samplers(&self) -> std::sync::MutexGuard<'_, Vec<Sampler>> {
        // Why: the list is only ever pushed to whole; a poisoned lock is still consistent.
        self.samplers.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// The ledger writer's view: every committed group, and every event once durable. Counts
/// what is on record, so the counters agree with the ledger.
impl crate::ledger::Observer for Metrics {
    fn batch(&self, events: usize, took: Duration, committed: bool) {
        if committed {
            self.ledger_commit.observe(took.as_secs_f64());
            self.ledger_batch.observe(events as f64);
        } else {
            self.ledger_failures.inc();
        }
    }

    fn recorded(&self, event: &Event) {
        match event {
            Event::PolicyActivated(_) => self.policy_activations.inc(),
            Event::PolicyRejected(_) => self.policy_rejections.inc(),
            Event::PolicyRolledBack(_) => self.policy_rollbacks.inc(),
            Event::Revoked(r) => {
                for c in &r.credentials {
                    self.revoked.get_or_create(&KindLabels { kind: c.kind.clone() }).inc();
                }
                self.revocations.inc()
            }
            Event::Locked(_) => self.locks.inc(),
            Event::Unlocked(_) => self.unlocks.inc(),
            Event::CaRotated(_) | Event::CaRejected(_) | Event::JwtKeyRotated(_) | Event::JwtKeyRejected(_) => {
                self.key_rotations.get_or_create(&KindLabels { kind: event.kind().as_str().into() }).inc()
            }
            Event::BreakGlass(b) => {
                let stage = serde_json::to_value(b.stage).ok().and_then(|v| v.as_str().map(str::to_owned));
                self.break_glass_steps.get_or_create(&StageLabels { stage: stage.unwrap_or_default() }).inc()
            }
            _ => 0,
        };
    }
}

/// An open stream; the gauge goes down when it is dropped (the stream ended).
pub struct StreamGuard {
    metrics: std::sync::Arc<Metrics>,
    stream: &'static str,
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.metrics.streams.get_or_create(&StreamLabels { stream: self.stream.into() }).dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_exposition_names_the_issue_s_metrics_with_their_labels() {
        let m = std::sync::Arc::new(Metrics::new());
        m.issued("x509", "mayfly.v1");
        m.issued("x509", "mayfly.v1");
        m.decision(Verdict::Deny, &["forbid-ttl-over-12h".into()]);
        m.decision(Verdict::Deny, &[]);
        m.set_policy_release("sha256:ab", Some("v1"), None);
        m.set_policy_release("sha256:cd", None, Some("key1"));
        let guard = m.stream_opened("x509_svid");
        let text = m.encode();
        assert!(text.contains("mayfly_credentials_issued_total{kind=\"x509\",api=\"mayfly.v1\"} 2"), "{text}");
        assert!(text.contains("mayfly_decisions_total{outcome=\"deny\",rule=\"forbid-ttl-over-12h\"} 1"), "{text}");
        assert!(text.contains("mayfly_decisions_total{outcome=\"deny\",rule=\"\"} 1"), "{text}");
        assert!(text.contains("mayfly_workload_api_streams{stream=\"x509_svid\"} 1"), "{text}");
        assert!(!text.contains("sha256:ab"), "only the active release is reported: {text}");
        assert!(text.contains("version=\"sha256:cd\""), "{text}");
        assert!(text.contains("process_resident_memory_bytes"), "{text}");
        assert!(text.trim_end().ends_with("# EOF"), "{text}");
        drop(guard);
        assert!(m.encode().contains("mayfly_workload_api_streams{stream=\"x509_svid\"} 0"));
    }
}
