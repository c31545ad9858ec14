#![expect(clippy::unwrap_used, reason = "tests fail loudly on any unexpected error")]

//! The operator surface on a real daemon in-process: metrics that agree with the ledger,
//! health and readiness, a reload (what it applies, what needs a restart, the
//! `config_reloaded` event), the TLS listener's unknown paths, and the defects a first
//! evaluation found (revoke twice, an approver list of only the requester, a lifetime cut
//! short without saying by what).

use std::collections::HashMap;
use std::path::Path;
use std::time::SystemTime;

use mayfly::api::pb::revoke_request::Target;
use mayfly::api::pb::{BreakGlassRequest, IssueX509Request, RevokeRequest};
use mayfly::config::{Config, PolicySource, RawTelemetry};
use mayfly::ledger::event::Event;
use support::{Running, repo_policies, setup};
use tonic::Code;

mod support;

const DEV_ID: &str = "spiffe://mayfly.local/dev/quickstart";

fn csr() -> Vec<u8> {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    rcgen::CertificateParams::default().serialize_request(&key).unwrap().der().to_vec()
}

fn x509(ttl: Option<i64>) -> IssueX509Request {
    IssueX509Request { csr: csr(), ttl_seconds: ttl, spiffe_id: String::new() }
}

async fn get(url: &str) -> (u16, String) {
    let response = reqwest::get(url).await.unwrap();
    (response.status().as_u16(), response.text().await.unwrap())
}

/// `sum` of a family's samples whose labels include `matching` (from the exposition).
fn sum(exposition: &str, name: &str, matching: &[(&str, &str)]) -> f64 {
    exposition
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (metric, labels) = series.split_once('{').map_or((series, ""), |(m, l)| (m, l.trim_end_matches('}')));
            (metric == name).then_some(())?;
            let labels: HashMap<&str, &str> = labels
                .split("\",")
                .filter_map(|kv| kv.split_once("=\"").map(|(k, v)| (k, v.trim_end_matches('"'))))
                .collect();
            matching.iter().all(|(k, v)| labels.get(k) == Some(v)).then(|| value.parse::<f64>().unwrap())
        })
        .sum()
}

async fn with_telemetry(dir: &Path) -> Running {
    setup(dir)
        .raw(|r| r.telemetry = RawTelemetry { listen: Some("127.0.0.1:0".into()), ..RawTelemetry::default() })
        .start()
        .await
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_count_what_the_ledger_holds() {
    let dir = tempfile::tempdir().unwrap();
    let d = with_telemetry(dir.path()).await;
    let mut broker = d.broker().await;
    for _ in 0..3 {
        broker.issue_x509(x509(None)).await.unwrap();
    }
    for _ in 0..2 {
        let e = broker.issue_x509(x509(Some(13 * 3600))).await.unwrap_err();
        assert_eq!(e.code(), Code::PermissionDenied);
    }
    let base = format!("http://{}", d.telemetry.unwrap());
    let (code, text) = get(&format!("{base}/metrics")).await;
    assert_eq!(code, 200);
    let events = d.typed().await;
    let issued = events.iter().filter(|e| matches!(e, Event::Issued(_))).count();
    let denied = events.iter().filter(|e| matches!(e, Event::Decision(d) if !d.is_allow())).count();
    let allowed = events.iter().filter(|e| matches!(e, Event::Decision(d) if d.is_allow())).count();
    // The second, identical denial is counted (in a `refusals` event at the window's end),
    // not written again; the metrics count both.
    assert_eq!((issued, denied, allowed), (3, 1, 3));
    let counted = sum(&text, "mayfly_refusals_counted_total", &[]);
    assert_eq!(counted, 1.0);
    let issued_metric = [("kind", "x509"), ("api", "mayfly.v1")];
    assert_eq!(sum(&text, "mayfly_credentials_issued_total", &issued_metric), issued as f64, "{text}");
    assert_eq!(sum(&text, "mayfly_decisions_total", &[("outcome", "deny")]), denied as f64 + counted);
    assert_eq!(sum(&text, "mayfly_decisions_total", &[("outcome", "deny"), ("rule", "forbid-ttl-over-12h")]), 2.0);
    assert_eq!(sum(&text, "mayfly_decisions_total", &[("outcome", "allow")]), allowed as f64);
    let issue_rpc = [("listener", "workload"), ("rpc", "/mayfly.v1.Broker/IssueX509")];
    assert_eq!(sum(&text, "mayfly_request_duration_seconds_count", &issue_rpc), 5.0, "{text}");
    assert!(sum(&text, "mayfly_ledger_commit_batch_events_count", &[]) >= 1.0);
    assert!(text.contains("mayfly_policy_release_info{version=\"sha256:"), "{text}");
    assert!(sum(&text, "mayfly_policy_activations_total", &[]) >= 1.0);
    assert!(sum(&text, "mayfly_ca_not_after_seconds", &[]) > 1.7e9);
    assert!(sum(&text, "process_open_fds", &[]) > 0.0);
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn health_and_readiness_answer_json_and_unknown_paths_404() {
    let dir = tempfile::tempdir().unwrap();
    let d = with_telemetry(dir.path()).await;
    let base = format!("http://{}", d.telemetry.unwrap());
    let (code, body) = get(&format!("{base}/healthz")).await;
    assert_eq!(code, 200);
    assert_eq!(serde_json::from_str::<serde_json::Value>(&body).unwrap()["status"], "alive");
    let (code, body) = get(&format!("{base}/readyz")).await;
    assert_eq!(code, 200, "{body}");
    let ready: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(ready["checks"]["ledger"]["ok"], true);
    assert_eq!(ready["checks"]["ca"]["ok"], true);
    assert!(ready["checks"]["policy"]["detail"].as_str().unwrap().contains("sha256:"));
    assert_eq!(get(&format!("{base}/nope")).await.0, 404);
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_tls_listener_serves_health_and_404_unknown_paths_while_grpc_still_works() {
    let dir = tempfile::tempdir().unwrap();
    let d = setup(dir.path()).tls().start().await;
    let https = d.https();
    let unknown = https.get(d.url("/no/such/path")).send().await.unwrap();
    assert_eq!(unknown.status().as_u16(), 404, "not HTTP 200 with a gRPC status");
    let ready = https.get(d.url("/readyz")).send().await.unwrap();
    assert_eq!(ready.status().as_u16(), 200);
    let live: serde_json::Value = https.get(d.url("/healthz")).send().await.unwrap().json().await.unwrap();
    assert_eq!(live["status"], "alive");
    // gRPC is still routed: an exchange without a token is refused by the service itself.
    let tls = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(d.tls_ca_pem()))
        .domain_name("localhost");
    let channel =
        tonic::transport::Endpoint::from_shared(d.url("")).unwrap().tls_config(tls).unwrap().connect().await.unwrap();
    let mut exchange = mayfly::api::pb::exchange_client::ExchangeClient::new(channel);
    let request = mayfly::api::pb::ExchangeRequest { kind: "jwt".into(), audience: "a".into(), ..Default::default() };
    let refused = exchange.exchange(request).await.unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated, "{refused:?}");
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_lifetime_granted_shorter_than_asked_names_the_rule_that_capped_it() {
    let dir = tempfile::tempdir().unwrap();
    let d = setup(dir.path()).start().await;
    let reply = d.broker().await.issue_x509(x509(Some(2 * 3600))).await.unwrap().into_inner();
    let lifetime = reply.lifetime.unwrap();
    assert_eq!((lifetime.requested_seconds, lifetime.granted_seconds), (7200, 3600));
    assert_eq!(lifetime.clamped_by, "local-workloads-x509");
    let asked_less = d.broker().await.issue_x509(x509(Some(600))).await.unwrap().into_inner().lifetime.unwrap();
    assert_eq!((asked_less.granted_seconds, asked_less.clamped_by.as_str()), (600, ""));
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn revoking_twice_reports_what_was_new_and_what_already_was() {
    let dir = tempfile::tempdir().unwrap();
    let d = setup(dir.path()).start().await;
    d.broker().await.issue_x509(x509(None)).await.unwrap();
    let revoke = || RevokeRequest {
        target: Some(Target::Identity(DEV_ID.into())),
        reason: "INC-9: test".into(),
        ..Default::default()
    };
    let first = d.admin().await.revoke(revoke()).await.unwrap().into_inner();
    assert_eq!((first.newly_revoked, first.already_revoked, first.already_locked), (1, 0, false));
    assert!(!first.credentials[0].already_revoked);
    let second = d.admin().await.revoke(revoke()).await.unwrap().into_inner();
    assert_eq!(
        (second.newly_revoked, second.already_revoked, second.already_locked),
        (0, 1, true),
        "the second run revokes nothing new"
    );
    assert!(second.credentials[0].already_revoked && second.credentials[0].revoked);
    let revoked_events = d.typed().await.into_iter().filter_map(|e| match e {
        Event::Revoked(r) => Some(r.credentials.len()),
        _ => None,
    });
    assert_eq!(revoked_events.collect::<Vec<_>>(), vec![1, 0], "the ledger agrees");
    d.stop().await;
}

/// A config file as `mayfly serve` reads it (policy read unsigned from the repository's tree).
fn write_config(dir: &Path, socket: &str, approvers: &[u32]) -> std::path::PathBuf {
    let path = dir.join("mayfly.toml");
    let text = format!(
        r#"trust_domain = "mayfly.local"
data_dir = "{data}"
[policy]
bundle = "{dir}/unused.bundle"
trusted_keys = ["{dir}/unused.pub"]
[workload_api]
socket = "{dir}/{socket}"
[admin]
socket = "{dir}/admin.sock"
[ca]
generate = true
[break_glass]
log_file = "{dir}/elevated.log"
approvers = {approvers:?}
"#,
        data = dir.join("data").display(),
        dir = dir.display(),
    );
    std::fs::write(&path, text).unwrap();
    path
}

fn config(path: &Path) -> Config {
    let mut config = Config::from_file(path).unwrap();
    config.policy = PolicySource::UnsignedDir(repo_policies());
    config
}

#[tokio::test(flavor = "multi_thread")]
async fn a_reload_applies_approvers_names_what_needs_a_restart_and_is_recorded() {
    let dir = tempfile::tempdir().unwrap();
    let me = rustix::process::getuid().as_raw();
    let path = write_config(dir.path(), "w.sock", &[me]);
    let d = support::run(config(&path), dir.path(), SystemTime::now(), None).await;
    let jwt = || BreakGlassRequest {
        kind: "jwt".into(),
        audience: "payments-db".into(),
        reason: "payments outage".into(),
        ticket: "INC-1".into(),
        ..Default::default()
    };
    // Only the requester is an approver: said as such, not as "no approvers".
    let refused = d.broker().await.break_glass(jwt()).await.unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied);
    assert!(refused.message().contains("nobody other than the requester"), "{}", refused.message());
    assert!(!refused.message().contains("no approvers are configured"), "{}", refused.message());

    write_config(dir.path(), "moved.sock", &[me, me + 1]);
    let reloaded = d.reload.reload().await.unwrap();
    assert!(reloaded.applied.iter().any(|a| a.starts_with("break_glass.approvers")), "{reloaded:?}");
    assert!(reloaded.applied.iter().any(|a| a.starts_with("policy:")), "{reloaded:?}");
    // (The policy source differs only because this test reads the tree unsigned.)
    let restart: Vec<&String> = reloaded.restart_required.iter().filter(|k| !k.starts_with("policy.")).collect();
    assert_eq!(restart, vec!["workload_api.socket"]);
    assert!(reloaded.failed.is_empty(), "{reloaded:?}");
    // The socket did not move; the new approver list holds: the request now waits.
    let pending = d.broker().await.break_glass(jwt()).await.unwrap().into_inner();
    assert!(!pending.pending_id.is_empty());
    let recorded: Vec<_> = d
        .typed()
        .await
        .into_iter()
        .filter_map(|e| match e {
            Event::ConfigReloaded(r) => Some(r),
            _ => None,
        })
        .collect();
    assert_eq!(recorded, vec![reloaded]);

    std::fs::write(&path, "trust_domain = ").unwrap();
    let broken = d.reload.reload().await.unwrap();
    assert!(broken.failed.iter().any(|f| f.starts_with("config:")), "{broken:?}");
    d.stop().await;
}
