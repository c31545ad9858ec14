#![expect(clippy::unwrap_used, reason = "tests fail loudly on any unexpected error")]

//! Break-glass on a real daemon in-process: the request over the workload socket, the
//! second person's side on the admin socket, the elevated log as a file, a paused clock.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use mayfly::api::pb::admin_client::AdminClient;
use mayfly::api::pb::broker_client::BrokerClient;
use mayfly::api::pb::{
    BreakGlassApproveRequest, BreakGlassListRequest, BreakGlassRequest, BreakGlassReviewRequest, BreakGlassWaitRequest,
};
use mayfly::config::RawBreakGlass;
use mayfly::ledger::{StoredEvent, verify_chain};
use support::{Running, setup};
use tonic::Code;
use tonic::transport::Channel;

mod support;

/// A daemon in `dir` with these break-glass settings.
struct TestDaemon {
    running: Running,
}

impl std::ops::Deref for TestDaemon {
    type Target = Running;

    fn deref(&self) -> &Running {
        &self.running
    }
}

impl TestDaemon {
    async fn start(dir: &Path, break_glass: RawBreakGlass) -> Self {
        Self { running: setup(dir).raw(|raw| raw.break_glass = break_glass).start().await }
    }

    async fn stop(self) {
        self.running.stop().await;
    }

    async fn broker(&self) -> BrokerClient<Channel> {
        self.running.broker().await
    }

    async fn admin(&self) -> AdminClient<Channel> {
        self.running.admin().await
    }

    async fn events(&self) -> Vec<StoredEvent> {
        self.running.events().await
    }

    async fn credentials(&self) -> usize {
        self.running.credentials().await.len()
    }
}

fn csr() -> Vec<u8> {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    rcgen::CertificateParams::default().serialize_request(&key).unwrap().der().to_vec()
}

fn x509(ticket: &str) -> BreakGlassRequest {
    BreakGlassRequest {
        kind: "x509".into(),
        csr: csr(),
        audience: String::new(),
        reason: "primary DB down, failover needs a client cert".into(),
        ticket: ticket.into(),
        ttl_seconds: Some(3600),
        role: String::new(),
    }
}

fn log_lines(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path).unwrap_or_default().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn an_emergency_credential_is_short_flagged_and_logged_before_it_leaves() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("elevated.log");
    let d = TestDaemon::start(dir.path(), RawBreakGlass { log_file: Some(log.clone()), ..Default::default() }).await;
    let mut broker = d.broker().await;
    let reply = broker.break_glass(x509("INC-4711")).await.unwrap().into_inner();
    assert!(reply.pending_id.is_empty(), "break-glass-dev-x509 needs no second person");
    let (_, cert) = x509_parser::parse_x509_certificate(&reply.cert_chain[0]).unwrap();
    assert_eq!(
        cert.validity().not_after.timestamp() - cert.validity().not_before.timestamp(),
        600,
        "asked 1 h, the rule allows 10 min"
    );

    // The elevated log took the request and the issuance, with who, why and the ticket.
    let lines = log_lines(&log);
    let stages: Vec<&str> = lines.iter().map(|l| l["break_glass"].as_str().unwrap()).collect();
    assert_eq!(stages, ["requested", "issued"]);
    assert_eq!(lines[0]["event"]["ticket"], "INC-4711");
    assert_eq!(lines[1]["event"]["credential"]["serial"], reply.serial);

    // The ledger: the decision and the issuance are flagged, with ticket and justification.
    let events = d.events().await;
    let decision = events.iter().rev().find(|e| e.kind == "decision").unwrap();
    assert!(
        decision.body.contains("\"break_glass\":true")
            && decision.body.contains("break-glass-dev-x509")
            && decision.body.contains("INC-4711")
    );
    let issued = events.iter().rev().find(|e| e.kind == "issued").unwrap();
    assert!(issued.body.contains("\"break_glass\":true") && issued.body.contains("primary DB down"));

    // Refusals: a ticket off the pattern is a recorded, flagged denial; no ticket or reason is invalid.
    let e = broker.break_glass(x509("JIRA-12")).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    assert!(e.message().contains("ticket_pattern"), "{}", e.message());
    let last = d.events().await.pop().unwrap();
    assert!(
        last.kind == "decision"
            && last.body.contains("\"break_glass\":true")
            && last.body.contains("\"outcome\":\"deny\"")
    );
    let mut no_reason = x509("INC-1");
    no_reason.reason = " ".into();
    assert_eq!(broker.break_glass(no_reason).await.unwrap_err().code(), Code::InvalidArgument);
    let mut control = x509("INC-1\nINC-2");
    control.reason = "x".into();
    assert_eq!(broker.break_glass(control).await.unwrap_err().code(), Code::InvalidArgument);
    assert_eq!(d.credentials().await, 1);

    // A review afterwards is recorded.
    let mut admin = d.admin().await;
    admin
        .break_glass_review(BreakGlassReviewRequest {
            id: reply.credential_id.clone(),
            note: "failover done, cert unused after".into(),
        })
        .await
        .unwrap();
    let events = d.events().await;
    assert!(events.iter().any(|e| e.kind == "break_glass" && e.body.contains("\"stage\":\"reviewed\"")));
    assert_eq!(verify_chain(&events), Ok(events.len()));
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn when_the_elevated_log_cannot_be_written_nothing_is_issued() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("no-such-dir/elevated.log");
    let d = TestDaemon::start(dir.path(), RawBreakGlass { log_file: Some(log), ..Default::default() }).await;
    let e = d.broker().await.break_glass(x509("INC-1")).await.unwrap_err();
    assert_eq!(e.code(), Code::Unavailable);
    assert!(e.message().contains("elevated log") && e.message().contains("nothing was issued"), "{}", e.message());
    assert_eq!(d.credentials().await, 0);
    assert!(d.events().await.iter().any(|e| e.kind == "break_glass" && e.body.contains("\"stage\":\"refused\"")));
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_second_person_must_approve_and_the_requester_never_can() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("elevated.log");
    let me = rustix::process::geteuid().as_raw();
    let other = me.wrapping_add(4242);
    let bg = RawBreakGlass {
        log_file: Some(log.clone()),
        approvers: Some(vec![me, other]),
        approval_timeout: Some("10m".into()),
        ..Default::default()
    };
    let d = TestDaemon::start(dir.path(), bg).await;
    let mut broker = d.broker().await;
    let jwt = BreakGlassRequest {
        kind: "jwt".into(),
        csr: vec![],
        audience: "payments-db".into(),
        reason: "payments outage".into(),
        ticket: "INC-77".into(),
        ttl_seconds: None,
        role: String::new(),
    };
    let pending = broker.break_glass(jwt).await.unwrap().into_inner();
    assert!(
        !pending.pending_id.is_empty() && pending.token.is_empty(),
        "break-glass-dev-jwt-approved waits for approval"
    );
    let mut admin = d.admin().await;
    let listed = admin.break_glass_list(BreakGlassListRequest {}).await.unwrap().into_inner().pending;
    assert_eq!(listed.len(), 1);
    assert_eq!((listed[0].ticket.as_str(), listed[0].requester_uid), ("INC-77", me));

    // The requester (this uid) approving their own request is refused and recorded.
    let own = admin
        .break_glass_approve(BreakGlassApproveRequest {
            id: pending.pending_id.clone(),
            reason: "looks fine to me".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(own.code(), Code::PermissionDenied);
    assert!(own.message().contains("own"), "{}", own.message());
    assert!(d.events().await.iter().any(|e| e.kind == "break_glass" && e.body.contains("approval_refused")));

    // Nobody else approves in time: denied, recorded, nothing issued.
    let waiter = {
        let mut b = d.broker().await;
        let id = pending.pending_id.clone();
        tokio::spawn(async move { b.break_glass_wait(BreakGlassWaitRequest { pending_id: id }).await })
    };
    d.clock.advance(Duration::from_secs(601));
    let denied = tokio::time::timeout(Duration::from_secs(30), waiter).await.unwrap().unwrap().unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied);
    assert!(denied.message().contains("no approval"), "{}", denied.message());
    assert_eq!(d.credentials().await, 0);
    let stages: Vec<String> = log_lines(&log).iter().map(|l| l["break_glass"].as_str().unwrap().to_owned()).collect();
    assert_eq!(stages, ["requested", "denied"]);
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn without_any_approver_an_approval_rule_denies_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let bg = RawBreakGlass {
        log_file: Some(dir.path().join("elevated.log")),
        approvers: Some(vec![]),
        ..Default::default()
    };
    let d = TestDaemon::start(dir.path(), bg).await;
    let jwt = BreakGlassRequest {
        kind: "jwt".into(),
        csr: vec![],
        audience: "x".into(),
        reason: "r".into(),
        ticket: "INC-1".into(),
        ttl_seconds: None,
        role: String::new(),
    };
    let e = d.broker().await.break_glass(jwt).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    assert!(e.message().contains("no approvers"), "{}", e.message());
    assert_eq!(d.credentials().await, 0);
    d.stop().await;
}

/// A webhook receiver on loopback (a paging system stand-in): answers `status` and keeps
/// what it was sent.
async fn webhook(status: u16) -> (String, Arc<std::sync::Mutex<Vec<serde_json::Value>>>) {
    let got = Arc::new(std::sync::Mutex::new(Vec::new()));
    let keep = got.clone();
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |axum::Json(v): axum::Json<serde_json::Value>| {
            let keep = keep.clone();
            async move {
                keep.lock().unwrap().push(v);
                axum::http::StatusCode::from_u16(status).unwrap()
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, got)
}

#[tokio::test(flavor = "multi_thread")]
async fn the_webhook_hears_every_step_and_a_failing_one_stops_issuance() {
    let (url, got) = webhook(200).await;
    let dir = tempfile::tempdir().unwrap();
    let d = TestDaemon::start(dir.path(), RawBreakGlass { webhook: Some(url), ..Default::default() }).await;
    d.broker().await.break_glass(x509("INC-808")).await.unwrap();
    let stages: Vec<String> =
        got.lock().unwrap().iter().map(|v| v["break_glass"].as_str().unwrap().to_owned()).collect();
    assert_eq!(stages, ["requested", "issued"]);
    d.stop().await;

    // A webhook that keeps failing (retried, then given up): no credential.
    let (url, got) = webhook(503).await;
    let dir = tempfile::tempdir().unwrap();
    let d = TestDaemon::start(
        dir.path(),
        RawBreakGlass { webhook: Some(url), webhook_retries: Some(2), ..Default::default() },
    )
    .await;
    let e = d.broker().await.break_glass(x509("INC-809")).await.unwrap_err();
    assert_eq!(e.code(), Code::Unavailable);
    assert!(e.message().contains("503"), "{}", e.message());
    assert_eq!(got.lock().unwrap().len(), 3, "one try and two retries");
    assert_eq!(d.credentials().await, 0);
    d.stop().await;
}
