#![expect(clippy::unwrap_used, reason = "tests fail loudly on any unexpected error")]

//! Revocation, locks and expiry on a real daemon in-process: the admin socket as responders
//! use it, the SPIFFE Workload API as workloads use it, the TLS listener's CRL and
//! introspection as relying parties use them, SQLite in a temp dir and a paused clock.

use std::path::Path;
use std::time::{Duration, SystemTime};

use mayfly::api::pb::admin_client::AdminClient;
use mayfly::api::pb::revoke_request::Target;
use mayfly::api::pb::{ListCredentialsRequest, RevokeRequest, UnlockRequest};
use mayfly::api::spiffe::spiffe_workload_api_client::SpiffeWorkloadApiClient;
use mayfly::api::spiffe::{JwtsvidRequest, ValidateJwtsvidRequest, X509BundlesRequest, X509svidRequest};
use mayfly::ledger::{StoredEvent, verify_chain};
use serde_json::Value;
use support::{Running, WAIT, setup};
use tonic::Code;
use tonic::transport::Channel;

mod support;

const DEV_ID: &str = "spiffe://mayfly.local/dev/quickstart";

/// A daemon on `dir` with the TLS listener (CRL, introspection).
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
    /// A daemon on `dir` (kept across restarts by the caller) at `now`.
    async fn start(dir: &Path, now: SystemTime) -> Self {
        Self { running: setup(dir).at(now).tls().start().await }
    }

    async fn stop(self) {
        self.running.stop().await;
    }

    async fn workload(&self) -> SpiffeWorkloadApiClient<Channel> {
        self.running.workload().await
    }

    async fn admin(&self) -> AdminClient<Channel> {
        self.running.admin().await
    }

    async fn crl_serials(&self) -> Vec<String> {
        let der = self.https().get(self.url("/crl.der")).send().await.unwrap().bytes().await.unwrap();
        let (_, crl) = x509_parser::parse_x509_crl(&der).unwrap();
        crl.iter_revoked_certificates().map(|r| hex::encode(r.raw_serial())).collect()
    }

    async fn introspect(&self, token: &str) -> Value {
        let body = format!("token={token}");
        let r = self
            .https()
            .post(self.url("/v1/introspect"))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(body)
            .send()
            .await
            .unwrap();
        r.json().await.unwrap()
    }

    async fn events(&self) -> Vec<StoredEvent> {
        self.running.events().await
    }
}

fn req<T>(message: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(message);
    r.metadata_mut().insert("workload.spiffe.io", "true".parse().unwrap());
    r
}

fn revoke(target: Target, dry_run: bool) -> RevokeRequest {
    RevokeRequest {
        target: Some(target),
        reason: "INC-42: key material exposed in a build log".into(),
        dry_run,
        all: false,
        lock_ttl_seconds: 0,
    }
}

fn serial_of(der: &[u8]) -> String {
    hex::encode(x509_parser::parse_x509_certificate(der).unwrap().1.raw_serial())
}

#[tokio::test(flavor = "multi_thread")]
async fn revoking_an_identity_stops_every_credential_it_holds_and_locks_it() {
    let dir = tempfile::tempdir().unwrap();
    let d = TestDaemon::start(dir.path(), SystemTime::now()).await;
    let mut w = d.workload().await;
    let mut stream = w.fetch_x509svid(req(X509svidRequest {})).await.unwrap().into_inner();
    let first = tokio::time::timeout(WAIT, stream.message()).await.unwrap().unwrap().unwrap();
    let serial = serial_of(&first.svids[0].x509_svid);
    let jwt = w
        .fetch_jwtsvid(req(JwtsvidRequest { audience: vec!["db".into()], spiffe_id: String::new() }))
        .await
        .unwrap()
        .into_inner()
        .svids[0]
        .svid
        .clone();
    assert_eq!(d.introspect(&jwt).await["active"], true);
    let mut bundles = w.fetch_x509_bundles(req(X509BundlesRequest {})).await.unwrap().into_inner();
    let b0 = tokio::time::timeout(WAIT, bundles.message()).await.unwrap().unwrap().unwrap();
    assert_eq!(b0.crl.len(), 1, "a CRL per CA, empty at first");
    assert!(d.crl_serials().await.is_empty());

    let mut admin = d.admin().await;
    // Dry run: lists, changes nothing.
    let dry = admin.revoke(revoke(Target::Identity(DEV_ID.into()), true)).await.unwrap().into_inner();
    assert_eq!(dry.credentials.len(), 2, "the SVID and the JWT");
    assert_eq!(dry.locked, DEV_ID);
    assert!(w.validate_jwtsvid(req(ValidateJwtsvidRequest { audience: "db".into(), svid: jwt.clone() })).await.is_ok());

    let done = admin.revoke(revoke(Target::Identity(DEV_ID.into()), false)).await.unwrap().into_inner();
    assert!(done.durable && done.credentials.iter().all(|c| c.revoked));

    // X.509: the stream drops the SVID at once, the serial is on the CRL (HTTPS and bundle stream).
    let empty = tokio::time::timeout(WAIT, stream.message()).await.unwrap().unwrap().unwrap();
    assert!(empty.svids.is_empty());
    let end = tokio::time::timeout(WAIT, stream.message()).await.unwrap().unwrap_err();
    assert_eq!(end.code(), Code::PermissionDenied);
    assert_eq!(d.crl_serials().await, vec![serial.clone()]);
    let b1 = tokio::time::timeout(WAIT, bundles.message()).await.unwrap().unwrap().unwrap();
    let (_, crl) = x509_parser::parse_x509_crl(&b1.crl[0]).unwrap();
    let (_, ca) = x509_parser::parse_x509_certificate(&b1.bundles["spiffe://mayfly.local"]).unwrap();
    crl.verify_signature(ca.public_key()).unwrap();
    assert_eq!(crl.iter_revoked_certificates().map(|r| hex::encode(r.raw_serial())).collect::<Vec<_>>(), vec![serial]);
    // JWT: validation and introspection answer revoked.
    let v =
        w.validate_jwtsvid(req(ValidateJwtsvidRequest { audience: "db".into(), svid: jwt.clone() })).await.unwrap_err();
    assert!(v.message().contains("revoked"), "{}", v.message());
    assert_eq!(d.introspect(&jwt).await, serde_json::json!({ "active": false }));
    // Locked: nothing new of any kind, and the refusal is recorded.
    let e = w.fetch_x509svid(req(X509svidRequest {})).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    assert!(e.message().contains("locked") && e.message().contains("INC-42"), "{}", e.message());
    let e = w
        .fetch_jwtsvid(req(JwtsvidRequest { audience: vec!["db".into()], spiffe_id: String::new() }))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);

    let events = d.events().await;
    let revoked = events.iter().find(|e| e.kind == "revoked").unwrap();
    assert!(revoked.body.contains("INC-42") && revoked.body.contains("\"uid\""), "who and why: {}", revoked.body);
    assert!(events.iter().any(|e| e.kind == "locked"));
    assert!(events.iter().any(|e| e.kind == "admin" && e.body.contains("\"dry_run\":true")));
    assert!(
        events.iter().any(|e| e.kind == "used" && e.body.contains("\"refused\":\"revoked\"")),
        "a revoked token's use is on record"
    );
    assert_eq!(verify_chain(&events), Ok(events.len()));

    // Unlock: new credentials again; the revoked ones stay revoked.
    admin.unlock(UnlockRequest { identity: DEV_ID.into(), reason: "INC-42 closed, key rotated".into() }).await.unwrap();
    let mut again = w.fetch_x509svid(req(X509svidRequest {})).await.unwrap().into_inner();
    assert_eq!(tokio::time::timeout(WAIT, again.message()).await.unwrap().unwrap().unwrap().svids.len(), 1);
    assert!(
        w.validate_jwtsvid(req(ValidateJwtsvidRequest { audience: "db".into(), svid: jwt.clone() })).await.is_err()
    );
    d.stop().await;

    // Revocations survive a restart.
    let d = TestDaemon::start(dir.path(), SystemTime::now()).await;
    assert_eq!(d.crl_serials().await.len(), 1);
    let mut w = d.workload().await;
    assert!(w.validate_jwtsvid(req(ValidateJwtsvidRequest { audience: "db".into(), svid: jwt })).await.is_err());
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn each_revoke_mode_takes_exactly_what_it_names_and_bad_requests_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let d = TestDaemon::start(dir.path(), SystemTime::now()).await;
    let mut w = d.workload().await;
    let mut jwts = Vec::new();
    for aud in ["a", "b", "c", "d"] {
        jwts.push(
            w.fetch_jwtsvid(req(JwtsvidRequest { audience: vec![aud.into()], spiffe_id: String::new() }))
                .await
                .unwrap()
                .into_inner()
                .svids[0]
                .svid
                .clone(),
        );
    }
    let jti = |t: &str| {
        jsonwebtoken::dangerous::insecure_decode::<Value>(t).unwrap().claims["jti"].as_str().unwrap().to_owned()
    };
    let mut stream = w.fetch_x509svid(req(X509svidRequest {})).await.unwrap().into_inner();
    let svid = tokio::time::timeout(WAIT, stream.message()).await.unwrap().unwrap().unwrap();
    let serial = serial_of(&svid.svids[0].x509_svid);
    let mut admin = d.admin().await;

    // By credential id (a JWT's jti): only that one.
    let r = admin.revoke(revoke(Target::CredentialId(jti(&jwts[0])), false)).await.unwrap().into_inner();
    assert_eq!(r.credentials.len(), 1);
    assert!(r.locked.is_empty(), "revoking a credential does not lock the identity");
    assert_eq!(d.introspect(&jwts[0]).await["active"], false);
    assert_eq!(d.introspect(&jwts[1]).await["active"], true);
    // By serial: the SVID leaves its stream; the identity may still get a new one.
    admin.revoke(revoke(Target::Serial(serial.to_uppercase()), false)).await.unwrap();
    assert!(tokio::time::timeout(WAIT, stream.message()).await.unwrap().unwrap().unwrap().svids.is_empty());
    assert!(w.fetch_x509svid(req(X509svidRequest {})).await.is_ok());
    // By selector: what the decision recorded about the caller (here the local uid).
    let uid = rustix::process::geteuid().as_raw();
    let dry = admin.revoke(revoke(Target::Selector(format!("uid={uid}")), true)).await.unwrap().into_inner();
    assert!(dry.credentials.len() >= 3, "every credential of this uid: {:?}", dry.credentials.len());
    // By policy release: everything decided under this version.
    let listed = admin
        .list_credentials(ListCredentialsRequest { identity: DEV_ID.into(), active: true })
        .await
        .unwrap()
        .into_inner()
        .credentials;
    let version = listed[0].policy_version.clone();
    let r = admin.revoke(revoke(Target::BundleVersion(version), false)).await.unwrap().into_inner();
    assert!(r.credentials.iter().all(|c| c.revoked));
    assert_eq!(d.introspect(&jwts[3]).await["active"], false);

    // Bad requests: a clear error, nothing changes.
    let before = d.events().await.iter().filter(|e| e.kind == "revoked").count();
    let unknown = admin.revoke(revoke(Target::CredentialId("no-such-credential".into()), false)).await.unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound);
    let empty = admin.revoke(revoke(Target::Selector("repository=".into()), false)).await.unwrap_err();
    assert_eq!(empty.code(), Code::InvalidArgument);
    let everything = admin.revoke(revoke(Target::Identity("spiffe://mayfly.local/".into()), false)).await.unwrap_err();
    assert!(everything.message().contains("--all"), "{}", everything.message());
    let stranger =
        admin.revoke(revoke(Target::Identity("spiffe://mayfly.local/nobody".into()), false)).await.unwrap_err();
    assert_eq!(stranger.code(), Code::NotFound);
    let mut no_reason = revoke(Target::Identity(DEV_ID.into()), false);
    no_reason.reason = "  ".into();
    assert_eq!(admin.revoke(no_reason).await.unwrap_err().code(), Code::InvalidArgument);
    assert_eq!(d.events().await.iter().filter(|e| e.kind == "revoked").count(), before);
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn expiry_is_recorded_and_a_restart_catches_up_on_what_expired_while_down() {
    let dir = tempfile::tempdir().unwrap();
    let t0 = SystemTime::now();
    let d = TestDaemon::start(dir.path(), t0).await;
    let mut w = d.workload().await;
    let jwt = w
        .fetch_jwtsvid(req(JwtsvidRequest { audience: vec!["db".into()], spiffe_id: String::new() }))
        .await
        .unwrap()
        .into_inner()
        .svids[0]
        .svid
        .clone();
    // Live: introspection answers active and is a recorded use.
    assert_eq!(d.introspect(&jwt).await["active"], true);
    assert!(d.events().await.iter().any(|e| e.kind == "used" && e.body.contains("\"use\":\"introspect\"")));
    d.clock.advance(Duration::from_secs(301));
    let mut expired = 0;
    for _ in 0..100 {
        expired = d.events().await.iter().filter(|e| e.kind == "expired").count();
        if expired > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(expired, 1, "the JWT's expiry is on record");
    assert_eq!(d.introspect(&jwt).await["active"], false);
    // An SVID issued now, and the daemon stopped before it expires.
    let mut stream = w.fetch_x509svid(req(X509svidRequest {})).await.unwrap().into_inner();
    tokio::time::timeout(WAIT, stream.message()).await.unwrap().unwrap().unwrap();
    drop(stream);
    d.stop().await;

    let d = TestDaemon::start(dir.path(), t0 + Duration::from_secs(3 * 3600)).await;
    let mut events = Vec::new();
    for _ in 0..100 {
        events = d.events().await;
        if events.iter().filter(|e| e.kind == "expired").count() >= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let expired: Vec<&StoredEvent> = events.iter().filter(|e| e.kind == "expired").collect();
    assert_eq!(expired.len(), 2, "caught up once, not twice");
    assert!(expired[1].body.contains("\"kind\":\"x509\""));
    assert_eq!(verify_chain(&events), Ok(events.len()));
    d.stop().await;
}
