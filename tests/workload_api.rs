#![expect(clippy::unwrap_used, reason = "tests fail loudly on any unexpected error")]

//! The SPIFFE Workload API on a real daemon in-process: the generated client of the standard
//! proto over the real Unix socket, SQLite in a temp dir, and a paused clock that moves only
//! when a test moves it, so rotation and expiry are exact.

use std::path::Path;
use std::time::{Duration, SystemTime};

use mayfly::api::spiffe::spiffe_workload_api_client::SpiffeWorkloadApiClient;
use mayfly::api::spiffe::{
    JwtBundlesRequest, JwtsvidRequest, ValidateJwtsvidRequest, WitsvidRequest, X509BundlesRequest, X509svidRequest,
    X509svidResponse,
};
use mayfly::config::RawCa;
use mayfly::identity::TrustDomain;
use mayfly::keys::CertificateAuthority;
use mayfly::ledger::{StoredEvent, verify_chain};
use support::{Running, WAIT, repo_policies, setup};
use tonic::transport::Channel;
use tonic::{Code, Streaming};
use x509_parser::extensions::GeneralName;

mod support;

const DEV_ID: &str = "spiffe://mayfly.local/dev/quickstart";

/// A daemon in its own temporary directory, on a paused clock.
struct TestDaemon {
    _dir: tempfile::TempDir,
    running: Running,
}

impl std::ops::Deref for TestDaemon {
    type Target = Running;

    fn deref(&self) -> &Running {
        &self.running
    }
}

impl TestDaemon {
    async fn start(policies: &Path, now: SystemTime) -> Self {
        Self::start_with_ca(
            policies,
            now,
            RawCa { generate: Some(true), ..Default::default() },
            tempfile::tempdir().unwrap(),
        )
        .await
    }

    async fn start_with_ca(policies: &Path, now: SystemTime, ca: RawCa, dir: tempfile::TempDir) -> Self {
        let running = setup(dir.path()).policies(policies).at(now).raw(|raw| raw.ca = Some(ca)).start().await;
        Self { _dir: dir, running }
    }

    async fn stop(self) {
        self.running.stop().await;
    }

    async fn client(&self) -> SpiffeWorkloadApiClient<Channel> {
        self.running.workload().await
    }
}

/// A request with the SPIFFE security header, as every SPIFFE client sends it.
fn req<T>(message: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(message);
    r.metadata_mut().insert("workload.spiffe.io", "true".parse().unwrap());
    r
}

/// A copy of the shipped policies with another inventory.
fn policies_with_inventory(inventory: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    copy_tree(&repo_policies(), dir.path());
    std::fs::remove_dir_all(dir.path().join("tests")).unwrap();
    std::fs::write(dir.path().join("inventory.toml"), inventory).unwrap();
    dir
}

fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let path = entry.unwrap().path();
        let target = to.join(path.file_name().unwrap());
        if path.is_dir() {
            copy_tree(&path, &target);
        } else {
            std::fs::copy(&path, &target).unwrap();
        }
    }
}

fn dev_entry(expires: &str) -> String {
    format!(
        r#"
        [[workload]]
        id = "{DEV_ID}"
        owner = "platform-security@example.org"
        purpose = "tests"
        environment = "dev"
        tier = "standard"
        expires = {expires}
        selectors = ["unix:uid:self"]
        "#
    )
}

async fn next(stream: &mut Streaming<X509svidResponse>) -> Result<X509svidResponse, tonic::Status> {
    tokio::time::timeout(WAIT, stream.message())
        .await
        .expect("stream message in time")
        .map(|m| m.expect("stream still open"))
}

struct Svid {
    serial: String,
    not_before: i64,
    not_after: i64,
}

/// Checks one X509SVID the way a relying party would and returns its facts.
fn check_svid(msg: &X509svidResponse) -> Svid {
    assert_eq!(msg.svids.len(), 1);
    let svid = &msg.svids[0];
    assert_eq!(svid.spiffe_id, DEV_ID);
    let (_, cert) = x509_parser::parse_x509_certificate(&svid.x509_svid).unwrap();
    let sans = cert.subject_alternative_name().unwrap().unwrap().value.general_names.clone();
    assert_eq!(sans, vec![GeneralName::URI(DEV_ID)]);
    assert!(!cert.basic_constraints().unwrap().unwrap().value.ca);
    let (_, ca) = x509_parser::parse_x509_certificate(&svid.bundle).unwrap();
    cert.verify_signature(Some(ca.public_key())).unwrap();
    // The key handed out is the certificate's key, as PKCS#8.
    let key = rcgen::KeyPair::try_from(svid.x509_svid_key.as_slice()).unwrap();
    assert_eq!(cert.public_key().raw, rcgen::PublicKeyData::subject_public_key_info(&key).as_slice());
    Svid {
        serial: hex::encode(cert.raw_serial()),
        not_before: cert.validity().not_before.timestamp(),
        not_after: cert.validity().not_after.timestamp(),
    }
}

fn at(rfc3339: &str) -> SystemTime {
    time::OffsetDateTime::parse(rfc3339, &time::format_description::well_known::Rfc3339).unwrap().into()
}

#[tokio::test(flavor = "multi_thread")]
async fn calls_without_the_security_header_are_refused_before_anything_happens() {
    let d = TestDaemon::start(&repo_policies(), SystemTime::now()).await;
    let before = d.events().await.len();
    let mut c = d.client().await;
    let e = c.fetch_x509svid(X509svidRequest {}).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("security header"), "{}", e.message());
    let e =
        c.fetch_jwtsvid(JwtsvidRequest { audience: vec!["db".into()], spiffe_id: String::new() }).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    let e =
        c.validate_jwtsvid(ValidateJwtsvidRequest { audience: "db".into(), svid: "x.y.z".into() }).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    let mut wrong = tonic::Request::new(X509BundlesRequest {});
    wrong.metadata_mut().insert("workload.spiffe.io", "yes".parse().unwrap());
    assert_eq!(c.fetch_x509_bundles(wrong).await.unwrap_err().code(), Code::InvalidArgument);
    assert_eq!(
        c.fetch_witsvid(WitsvidRequest { spiffe_id: String::new() }).await.unwrap_err().code(),
        Code::InvalidArgument,
        "the WIT-SVID profile asks for the header too"
    );
    assert_eq!(d.events().await.len(), before, "nothing decided, nothing issued");
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn fetch_x509svid_hands_out_a_server_made_key_recorded_like_any_issuance() {
    let d = TestDaemon::start(&repo_policies(), SystemTime::now()).await;
    let mut c = d.client().await;
    let mut stream = c.fetch_x509svid(req(X509svidRequest {})).await.unwrap().into_inner();
    let first = next(&mut stream).await.unwrap();
    let svid = check_svid(&first);
    assert_eq!(svid.not_after - svid.not_before, 3600, "the default lifetime, within local-workloads-x509's 1 h");

    let mut bundles = c.fetch_x509_bundles(req(X509BundlesRequest {})).await.unwrap().into_inner();
    let b = tokio::time::timeout(WAIT, bundles.message()).await.unwrap().unwrap().unwrap();
    assert_eq!(b.bundles.get("spiffe://mayfly.local"), Some(&first.svids[0].bundle));

    let events = d.events().await;
    let decision = events.iter().rev().find(|e| e.kind == "decision").unwrap();
    assert!(
        decision.body.contains("\"api\":\"spiffe_workload_api\"") && decision.body.contains("\"outcome\":\"allow\"")
    );
    let issued = events.iter().rev().find(|e| e.kind == "issued").unwrap();
    assert!(issued.body.contains(&svid.serial));
    // The private key is never recorded, in any encoding.
    let key_hex = hex::encode(&first.svids[0].x509_svid_key);
    assert!(!events.iter().any(|e| e.body.contains(&key_hex[key_hex.len() - 40..]) || e.body.contains("PRIVATE")));
    assert_eq!(verify_chain(&events), Ok(events.len()));
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_stream_pushes_a_fresh_svid_at_half_its_lifetime_on_a_paused_clock() {
    let t0 = at("2027-03-01T12:00:00Z");
    let d = TestDaemon::start(&repo_policies(), t0).await;
    let mut c = d.client().await;
    let mut stream = c.fetch_x509svid(req(X509svidRequest {})).await.unwrap().into_inner();
    let first = check_svid(&next(&mut stream).await.unwrap());
    assert_eq!(first.not_before, time::OffsetDateTime::from(t0).unix_timestamp());

    // One second before half-life: nothing is pushed.
    d.clock.advance(Duration::from_secs(30 * 60 - 1));
    assert!(
        tokio::time::timeout(Duration::from_millis(500), stream.message()).await.is_err(),
        "no rotation before half-life"
    );

    d.clock.advance(Duration::from_secs(1));
    let second = check_svid(&next(&mut stream).await.unwrap());
    assert_ne!(second.serial, first.serial);
    assert_eq!(second.not_before, first.not_before + 1800, "renewed at half of the first's lifetime");
    assert!(second.not_before < first.not_after, "pushed before the first expired");

    d.clock.advance(Duration::from_secs(30 * 60));
    let third = check_svid(&next(&mut stream).await.unwrap());
    assert_ne!(third.serial, second.serial);

    // Every rotation is an issuance: decided, recorded, naming the credential it renews.
    let events = d.events().await;
    let issued: Vec<&StoredEvent> = events.iter().filter(|e| e.kind == "issued").collect();
    assert_eq!(issued.len(), 3);
    let rotations = events.iter().filter(|e| e.kind == "decision" && e.body.contains("\"rotates\":\"")).count();
    assert_eq!(rotations, 2);
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn when_the_inventory_entry_expires_the_stream_withdraws_the_svid() {
    let policies = policies_with_inventory(&dev_entry("2027-06-30"));
    let d = TestDaemon::start(policies.path(), at("2027-06-30T23:40:00Z")).await;
    let mut c = d.client().await;
    let mut stream = c.fetch_x509svid(req(X509svidRequest {})).await.unwrap().into_inner();
    check_svid(&next(&mut stream).await.unwrap());

    // Midnight: the entry's last day is over, well before the SVID's half-life (00:10).
    d.clock.set(at("2027-07-01T00:00:00Z"));
    let empty = next(&mut stream).await.unwrap();
    assert!(empty.svids.is_empty(), "a set without the SVID");
    let end = next(&mut stream).await.unwrap_err();
    assert_eq!(end.code(), Code::PermissionDenied);
    assert!(end.message().contains("expired on 2027-06-30"), "{}", end.message());
    let last = d.events().await.into_iter().rev().find(|e| e.kind == "decision").unwrap();
    assert!(last.body.contains("\"outcome\":\"deny\"") && last.body.contains("expired"));
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_release_that_removes_the_identity_empties_open_streams() {
    let policies = policies_with_inventory(&dev_entry("2030-01-01"));
    let d = TestDaemon::start(policies.path(), SystemTime::now()).await;
    let mut c = d.client().await;
    let mut stream = c.fetch_x509svid(req(X509svidRequest {})).await.unwrap().into_inner();
    check_svid(&next(&mut stream).await.unwrap());

    // A new release without the entry (dev re-reads policies/ within a poll interval).
    let other = dev_entry("2030-01-01")
        .replace(DEV_ID, "spiffe://mayfly.local/other")
        .replace("unix:uid:self", "unix:uid:4242424");
    std::fs::write(policies.path().join("inventory.toml"), other).unwrap();
    let empty = next(&mut stream).await.unwrap();
    assert!(empty.svids.is_empty());
    let end = next(&mut stream).await.unwrap_err();
    assert_eq!(end.code(), Code::PermissionDenied);
    assert!(end.message().contains("no inventory entry"), "{}", end.message());

    // And a new call is refused as having no entitlement, recorded as a denial.
    let e = c.fetch_x509svid(req(X509svidRequest {})).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    let e = c
        .fetch_jwtsvid(req(JwtsvidRequest { audience: vec!["db".into()], spiffe_id: String::new() }))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    let events = d.events().await;
    let denials = events.iter().filter(|e| e.kind == "decision" && e.body.contains("\"outcome\":\"deny\"")).count();
    assert!(denials >= 3, "stream renewal and both calls recorded as denials");
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn jwt_svids_are_minted_per_policy_validated_as_recorded_uses_and_verifiable_by_the_bundle() {
    let d = TestDaemon::start(&repo_policies(), SystemTime::now()).await;
    let mut c = d.client().await;
    let reply = c
        .fetch_jwtsvid(req(JwtsvidRequest {
            audience: vec!["spiffe://mayfly.local/db".into()],
            spiffe_id: String::new(),
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.svids.len(), 1);
    assert_eq!(reply.svids[0].spiffe_id, DEV_ID);
    let token = reply.svids[0].svid.clone();

    // The JWKS from FetchJWTBundles verifies it (kid, ES256), independently of ValidateJWTSVID.
    let mut bundles = c.fetch_jwt_bundles(req(JwtBundlesRequest {})).await.unwrap().into_inner();
    let b = tokio::time::timeout(WAIT, bundles.message()).await.unwrap().unwrap().unwrap();
    let jwks: serde_json::Value = serde_json::from_slice(&b.bundles["spiffe://mayfly.local"]).unwrap();
    let jwk = &jwks["keys"][0];
    let header = jsonwebtoken::decode_header(&token).unwrap();
    assert_eq!(header.kid.as_deref(), jwk["kid"].as_str());
    let key =
        jsonwebtoken::DecodingKey::from_ec_components(jwk["x"].as_str().unwrap(), jwk["y"].as_str().unwrap()).unwrap();
    let mut v = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::ES256);
    v.set_audience(&["spiffe://mayfly.local/db"]);
    let data = jsonwebtoken::decode::<serde_json::Value>(&token, &key, &v).unwrap();
    assert_eq!(data.claims["sub"], DEV_ID);
    assert_eq!(data.claims["exp"].as_i64().unwrap() - data.claims["iat"].as_i64().unwrap(), 300, "default 5 min");

    let ok = c
        .validate_jwtsvid(req(ValidateJwtsvidRequest {
            audience: "spiffe://mayfly.local/db".into(),
            svid: token.clone(),
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ok.spiffe_id, DEV_ID);
    assert!(ok.claims.unwrap().fields.contains_key("exp"));
    let wrong = c
        .validate_jwtsvid(req(ValidateJwtsvidRequest { audience: "other".into(), svid: token.clone() }))
        .await
        .unwrap_err();
    assert_eq!(wrong.code(), Code::InvalidArgument);
    assert!(wrong.message().contains("audience"), "{}", wrong.message());

    // Expired on the daemon's clock: refused.
    d.clock.advance(Duration::from_secs(301));
    let late = c
        .validate_jwtsvid(req(ValidateJwtsvidRequest {
            audience: "spiffe://mayfly.local/db".into(),
            svid: token.clone(),
        }))
        .await
        .unwrap_err();
    assert!(late.message().contains("expired"), "{}", late.message());

    let events = d.events().await;
    let jti = data.claims["jti"].as_str().unwrap();
    let used: Vec<&StoredEvent> = events.iter().filter(|e| e.kind == "used").collect();
    assert_eq!(used.len(), 1, "one successful validation, one use");
    assert!(used[0].body.contains(jti));
    assert!(!events.iter().any(|e| e.body.contains(&token)), "the token itself is never recorded");
    let creds = d.credentials().await;
    assert!(creds.iter().any(|c| c.kind == "jwt" && c.id == jti));

    // No audience, or too many: invalid before anything is decided.
    let e = c.fetch_jwtsvid(req(JwtsvidRequest { audience: vec![], spiffe_id: String::new() })).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    d.stop().await;
}

/// Writes a new CA pair the way an operator publishes one: key first, then the certificate,
/// each renamed into place.
fn publish_ca(dir: &Path, now: SystemTime) -> Vec<u8> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let ca = CertificateAuthority::generate(
        &TrustDomain::parse("mayfly.local").unwrap(),
        now - Duration::from_secs(60),
        Duration::from_secs(30 * 86_400),
    )
    .unwrap();
    let tmp = dir.join("ca-key.pem.new");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp).unwrap();
    f.write_all(ca.issuer().key().to_pkcs8_pem().as_bytes()).unwrap();
    std::fs::rename(&tmp, dir.join("ca-key.pem")).unwrap();
    std::fs::write(dir.join("ca.pem.new"), ca.cert_pem()).unwrap();
    std::fs::rename(dir.join("ca.pem.new"), dir.join("ca.pem")).unwrap();
    ca.cert_der().to_vec()
}

fn certs_in(concatenated: &[u8]) -> Vec<Vec<u8>> {
    let mut rest = concatenated;
    let mut out = Vec::new();
    while !rest.is_empty() {
        let (tail, _) = x509_parser::parse_x509_certificate(rest).unwrap();
        out.push(rest[..rest.len() - tail.len()].to_vec());
        rest = tail;
    }
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rotated_ca_reaches_open_bundle_streams_and_svids_are_renewed_under_it() {
    let now = SystemTime::now();
    let dir = tempfile::tempdir().unwrap();
    let cas = dir.path().join("ca");
    std::fs::create_dir(&cas).unwrap();
    let first_ca = publish_ca(&cas, now);
    let ca = RawCa { cert: Some(cas.join("ca.pem")), key: Some(cas.join("ca-key.pem")), generate: None };
    let d = TestDaemon::start_with_ca(&repo_policies(), now, ca, dir).await;
    let mut c = d.client().await;
    let mut bundles = c.fetch_x509_bundles(req(X509BundlesRequest {})).await.unwrap().into_inner();
    let mut svids = c.fetch_x509svid(req(X509svidRequest {})).await.unwrap().into_inner();
    let b0 = tokio::time::timeout(WAIT, bundles.message()).await.unwrap().unwrap().unwrap();
    assert_eq!(certs_in(&b0.bundles["spiffe://mayfly.local"]), vec![first_ca.clone()]);
    check_svid(&next(&mut svids).await.unwrap());

    let second_ca = publish_ca(&cas, now);
    // The bundle stream gets the new CA first and keeps the old one (its SVIDs are live).
    let b1 = tokio::time::timeout(WAIT, bundles.message()).await.unwrap().unwrap().unwrap();
    assert_eq!(certs_in(&b1.bundles["spiffe://mayfly.local"]), vec![second_ca.clone(), first_ca.clone()]);
    // The SVID stream is renewed under the new CA, with the new bundle.
    let renewed = next(&mut svids).await.unwrap();
    let svid = &renewed.svids[0];
    let (_, cert) = x509_parser::parse_x509_certificate(&svid.x509_svid).unwrap();
    let (_, new_ca) = x509_parser::parse_x509_certificate(&second_ca).unwrap();
    cert.verify_signature(Some(new_ca.public_key())).unwrap();
    assert_eq!(certs_in(&svid.bundle), vec![second_ca.clone(), first_ca]);
    assert!(d.events().await.iter().any(|e| e.kind == "ca_rotated"));

    // Once every SVID the old CA signed has expired (issuance.max_ttl, 24 h), it leaves the bundle.
    d.clock.advance(Duration::from_secs(24 * 3600 + 1));
    let b2 = loop {
        let b = tokio::time::timeout(WAIT, bundles.message()).await.unwrap().unwrap().unwrap();
        if certs_in(&b.bundles["spiffe://mayfly.local"]).len() == 1 {
            break b;
        }
    };
    assert_eq!(certs_in(&b2.bundles["spiffe://mayfly.local"]), vec![second_ca]);

    // A broken pair (a key that does not match) is refused and recorded; the CA stays.
    std::fs::write(
        cas.join("ca.pem"),
        CertificateAuthority::generate(&TrustDomain::parse("mayfly.local").unwrap(), now, Duration::from_secs(86_400))
            .unwrap()
            .cert_pem(),
    )
    .unwrap();
    let mut refused = false;
    for _ in 0..100 {
        if d.events().await.iter().any(|e| e.kind == "ca_rejected" && e.body.contains("does not match")) {
            refused = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(refused, "the mismatched pair is recorded as refused");
    let events = d.events().await;
    assert_eq!(events.iter().filter(|e| e.kind == "ca_rotated").count(), 1);
    assert_eq!(verify_chain(&events), Ok(events.len()));
    d.stop().await;
}
