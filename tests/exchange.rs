#![expect(clippy::unwrap_used, reason = "tests fail loudly on any unexpected error")]

//! The CI token exchange on a real daemon in-process: TLS on loopback with a certificate
//! from a test CA, an OIDC issuer on loopback serving discovery and its JWKS over HTTP, and
//! GitHub-Actions-shaped id-tokens it signs. Every bad token is refused with 401, recorded
//! as a denial, and issues nothing.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use mayfly::config::{Config, RawIssuer, RawJwt, RawOidc};
use mayfly::keys::JwtKey;
use mayfly::ledger::{StoredEvent, verify_chain};
use serde_json::{Value, json};
use support::{Running, setup};

mod support;

const CI_ID: &str = "spiffe://mayfly.local/ci/acme/app";
const ARTIFACTS: &str = "https://artifacts.example.org";

/// An OIDC issuer on loopback: discovery and JWKS over plain HTTP (allowed for loopback).
struct Issuer {
    url: String,
    key: JwtKey,
    task: tokio::task::JoinHandle<()>,
}

impl Issuer {
    async fn start() -> Self {
        let key = JwtKey::generate().unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let (x, y) = key.public_xy();
        let jwks = json!({ "keys": [{ "kty": "EC", "crv": "P-256", "x": x, "y": y, "kid": key.kid(), "alg": "ES256", "use": "sig" }] });
        let discovery = json!({ "issuer": url, "jwks_uri": format!("{url}/keys") });
        let app = axum::Router::new()
            .route(
                "/.well-known/openid-configuration",
                axum::routing::get(move || async move { axum::Json(discovery) }),
            )
            .route("/keys", axum::routing::get(move || async move { axum::Json(jwks) }));
        let task = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        Self { url, key, task }
    }

    /// A token shaped like GitHub Actions' for acme/app; `change` edits the claims.
    fn token(&self, change: impl FnOnce(&mut Value)) -> String {
        let now = mayfly::clock::unix_secs(SystemTime::now());
        let mut claims = json!({
            "iss": self.url, "aud": "mayfly", "sub": "repo:acme/app:ref:refs/heads/main",
            "exp": now + 300, "iat": now, "nbf": now, "jti": uuid::Uuid::new_v4().to_string(),
            "repository": "acme/app", "repository_owner": "acme", "repository_id": "892735111",
            "repository_owner_id": "1342004", "ref": "refs/heads/main", "ref_type": "branch",
            "event_name": "push", "sha": "9fceb02d0ae598e95dc970b74767f19372d61af8",
            "job_workflow_ref": "acme/app/.github/workflows/ci.yml@refs/heads/main", "run_id": "4242",
        });
        change(&mut claims);
        self.sign(&claims, Algorithm::ES256, Some(self.key.kid()))
    }

    fn sign(&self, claims: &Value, alg: Algorithm, kid: Option<&str>) -> String {
        let mut header = Header::new(alg);
        header.kid = kid.map(str::to_owned);
        jsonwebtoken::encode(&header, claims, &EncodingKey::from_ec_der(self.key.pkcs8_der())).unwrap()
    }
}

impl Drop for Issuer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A daemon in its own temporary directory with the TLS listener and one trusted issuer.
struct TestDaemon {
    dir: tempfile::TempDir,
    ca_pem: String,
    running: Running,
}

fn policies_for(issuer: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("policies");
    for sub in ["issuance", "exceptions", "session-policies"] {
        std::fs::create_dir(dir.path().join(sub)).unwrap();
        for f in std::fs::read_dir(src.join(sub)).unwrap() {
            let f = f.unwrap().path();
            std::fs::copy(&f, dir.path().join(sub).join(f.file_name().unwrap())).unwrap();
        }
    }
    std::fs::copy(src.join("schema.cedarschema"), dir.path().join("schema.cedarschema")).unwrap();
    let inventory = format!(
        r#"
        [[workload]]
        id = "{CI_ID}"
        owner = "acme-app-team@example.org"
        purpose = "CI of acme/app"
        environment = "ci"
        tier = "critical"
        expires = 2030-01-01
        selectors = ["oidc:iss:{issuer}", "oidc:repository_owner_id:1342004", "oidc:repository_id:892735111"]
        known_as = ["oidc:repository:acme/app"]
        "#
    );
    std::fs::write(dir.path().join("inventory.toml"), inventory).unwrap();
    dir
}

impl TestDaemon {
    async fn start(issuer: &str, policies: &Path) -> Self {
        Self::start_in(tempfile::tempdir().unwrap(), issuer, policies, None).await
    }

    async fn start_in(dir: tempfile::TempDir, issuer: &str, policies: &Path, jwt_key: Option<PathBuf>) -> Self {
        let issuers = vec![RawIssuer { url: Some(issuer.into()), ..Default::default() }];
        let running = setup(dir.path())
            .policies(policies)
            .tls()
            .raw(|raw| {
                raw.jwt = RawJwt { issuer: Some("https://mayfly.test".into()), key: jwt_key };
                raw.oidc = RawOidc { issuer: issuers };
            })
            .start()
            .await;
        Self { ca_pem: running.tls_ca_pem().to_owned(), dir, running }
    }

    fn client(&self) -> reqwest::Client {
        reqwest::Client::builder()
            .tls_certs_only([reqwest::Certificate::from_pem(self.ca_pem.as_bytes()).unwrap()])
            .timeout(Duration::from_secs(90))
            .build()
            .unwrap()
    }

    fn url(&self, path: &str) -> String {
        self.running.url(path)
    }

    async fn exchange(&self, body: Value) -> (u16, Value) {
        let response = self.client().post(self.url("/v1/exchange")).json(&body).send().await.unwrap();
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    async fn events(&self) -> Vec<StoredEvent> {
        self.running.events().await
    }

    async fn credentials(&self) -> usize {
        self.running.credentials().await.len()
    }

    async fn stop(self) {
        self.running.stop().await;
    }
}

fn dir_path(d: &tempfile::TempDir) -> PathBuf {
    d.path().to_path_buf()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_ci_token_is_exchanged_for_a_jwt_that_the_published_jwks_verifies() {
    let issuer = Issuer::start().await;
    let policies = policies_for(&issuer.url);
    let d = TestDaemon::start(&issuer.url, &dir_path(&policies)).await;

    let (status, body) =
        d.exchange(json!({ "token": issuer.token(|_| {}), "kind": "jwt", "audience": ARTIFACTS, "ttl": "10m" })).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["spiffe_id"], CI_ID);
    let token = body["token"].as_str().unwrap();

    // Verify it as a relying party would: discovery → JWKS → signature, iss, aud.
    let discovery: Value =
        d.client().get(d.url("/.well-known/openid-configuration")).send().await.unwrap().json().await.unwrap();
    assert_eq!(discovery["issuer"], "https://mayfly.test");
    let jwks: Value = d.client().get(d.url("/.well-known/jwks.json")).send().await.unwrap().json().await.unwrap();
    let jwk: jsonwebtoken::jwk::Jwk = serde_json::from_value(jwks["keys"][0].clone()).unwrap();
    assert_eq!(jwks["keys"][0]["use"], "sig");
    let mut v = jsonwebtoken::Validation::new(Algorithm::ES256);
    v.set_audience(&[ARTIFACTS]);
    v.set_issuer(&["https://mayfly.test"]);
    let claims =
        jsonwebtoken::decode::<Value>(token, &jsonwebtoken::DecodingKey::from_jwk(&jwk).unwrap(), &v).unwrap().claims;
    assert_eq!(claims["sub"], CI_ID);
    assert_eq!(
        claims["exp"].as_i64().unwrap() - claims["iat"].as_i64().unwrap(),
        600,
        "asked 10 min, under the rule's 15"
    );

    // The ledger traces the credential to the commit and run that asked for it.
    let events = d.events().await;
    let issued = events.iter().rev().find(|e| e.kind == "issued").unwrap();
    assert!(
        issued.body.contains("9fceb02d0ae598e95dc970b74767f19372d61af8") && issued.body.contains("\"run_id\":\"4242\""),
        "{}",
        issued.body
    );
    let decision = events.iter().rev().find(|e| e.kind == "decision").unwrap();
    assert!(decision.body.contains("ci-artifact-cache-jwt") && decision.body.contains("\"api\":\"exchange\""));
    assert!(!events.iter().any(|e| e.body.contains(token)), "the minted token is never recorded");
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn policy_still_decides_what_a_verified_runner_gets() {
    let issuer = Issuer::start().await;
    let policies = policies_for(&issuer.url);
    let d = TestDaemon::start(&issuer.url, &dir_path(&policies)).await;

    // A verified token, but no rule grants this audience.
    let (status, body) = d
        .exchange(json!({ "token": issuer.token(|_| {}), "kind": "jwt", "audience": "https://payments.example.org" }))
        .await;
    assert_eq!((status, body["error"].as_str()), (403, Some("access_denied")), "{body}");
    // Another repository of the same issuer matches no inventory entry (and `serve` makes no dev identities).
    let other = issuer.token(|c| {
        c["repository"] = json!("acme/other");
        c["repository_id"] = json!("700000001");
        c["sub"] = json!("repo:acme/other:ref:refs/heads/main");
    });
    let (status, body) = d.exchange(json!({ "token": other, "kind": "jwt", "audience": ARTIFACTS })).await;
    assert_eq!(status, 403);
    assert!(body["reason"].as_str().unwrap().contains("no inventory entry"), "{body}");
    // acme/app deleted and re-created by someone else: the name is the same, the id is not.
    let recreated = issuer.token(|c| {
        c["repository_id"] = json!("990000001");
        c["sub"] = json!("repo:acme@1342004/app@990000001:ref:refs/heads/main");
    });
    let (status, body) = d.exchange(json!({ "token": recreated, "kind": "jwt", "audience": ARTIFACTS })).await;
    assert_eq!((status, body["error"].as_str()), (403, Some("access_denied")), "{body}");
    let reason = body["reason"].as_str().unwrap();
    assert!(reason.contains("pinned to `oidc:repository_id:892735111`") && reason.contains("re-created"), "{reason}");
    // Renamed (same ids, new name, the immutable subject): still the identity.
    let renamed = issuer.token(|c| {
        c["repository"] = json!("acme/application");
        c["sub"] = json!("repo:acme@1342004/application@892735111:ref:refs/heads/main");
    });
    let (status, body) = d.exchange(json!({ "token": renamed, "kind": "jwt", "audience": ARTIFACTS })).await;
    assert_eq!((status, body["spiffe_id"].as_str()), (200, Some(CI_ID)), "{body}");
    // X.509 through the exchange reuses the spine's minter; the rules give CI no X.509.
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let csr = rcgen::CertificateParams::default().serialize_request(&key).unwrap().pem().unwrap();
    let (status, _) = d.exchange(json!({ "token": issuer.token(|_| {}), "kind": "x509", "csr": csr })).await;
    assert_eq!(status, 403);
    // This daemon has no [aws]: a clear refusal naming it, nothing decided or issued.
    let (status, body) = d.exchange(json!({ "token": issuer.token(|_| {}), "kind": "aws", "role": "arn:aws:iam::111122223333:role/acme-app-deploy" })).await;
    assert_eq!((status, body["error"].as_str()), (409, Some("failed_precondition")), "{body}");
    assert!(body["reason"].as_str().unwrap().contains("[aws]"), "{body}");
    let (status, body) =
        d.exchange(json!({ "token": issuer.token(|_| {}), "kind": "aws", "role": "arn:aws:s3:::bucket" })).await;
    assert_eq!((status, body["error"].as_str()), (400, Some("invalid_request")), "{body}");
    assert_eq!(d.credentials().await, 1, "only the renamed repository's JWT");
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn every_bad_token_gets_401_a_recorded_denial_and_nothing_issued() {
    let issuer = Issuer::start().await;
    let policies = policies_for(&issuer.url);
    let d = TestDaemon::start(&issuer.url, &dir_path(&policies)).await;
    let now = mayfly::clock::unix_secs(SystemTime::now());
    use base64::Engine;
    let b64 = |v: &Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string());

    let stranger = JwtKey::generate().unwrap();
    let mut foreign = Header::new(Algorithm::ES256);
    foreign.kid = Some(issuer.key.kid().into());
    let good_claims = |iss: &str| json!({ "iss": iss, "aud": "mayfly", "sub": "repo:acme/app:ref:refs/heads/main", "exp": now + 300, "iat": now, "repository": "acme/app", "jti": uuid::Uuid::new_v4().to_string() });
    let (x, _) = issuer.key.public_xy();
    let mut hs = Header::new(Algorithm::HS256);
    hs.kid = Some(issuer.key.kid().into());
    let replayed = issuer.token(|_| {});
    let cases: Vec<(&str, String)> = vec![
        ("alg none", format!("{}.{}.", b64(&json!({"alg": "none", "typ": "JWT"})), b64(&good_claims(&issuer.url)))),
        (
            "HS256 keyed with the public key",
            jsonwebtoken::encode(&hs, &good_claims(&issuer.url), &EncodingKey::from_secret(x.as_bytes()).unwrap())
                .unwrap(),
        ),
        ("wrong issuer", issuer.token(|c| c["iss"] = json!("https://token.actions.githubusercontent.com"))),
        ("wrong audience", issuer.token(|c| c["aud"] = json!("someone-else"))),
        ("expired", issuer.token(|c| c["exp"] = json!(now - 3600))),
        ("not yet valid", issuer.token(|c| c["nbf"] = json!(now + 3600))),
        ("unknown kid", issuer.sign(&good_claims(&issuer.url), Algorithm::ES256, Some("no-such-kid"))),
        ("kid with a path", issuer.sign(&good_claims(&issuer.url), Algorithm::ES256, Some("../../../etc/passwd"))),
        ("kid with a URL", issuer.sign(&good_claims(&issuer.url), Algorithm::ES256, Some("https://evil.example/jwks"))),
        (
            "signed by another key",
            jsonwebtoken::encode(&foreign, &good_claims(&issuer.url), &EncodingKey::from_ec_der(stranger.pkcs8_der()))
                .unwrap(),
        ),
        ("unconfigured issuer", issuer.token(|c| c["iss"] = json!("https://gitlab.example.com"))),
        ("garbage", "this is not a token".into()),
        ("oversized", format!("{}.{}.x", "a".repeat(10_000), "b".repeat(10_000))),
        ("replayed", replayed.clone()),
    ];
    // The first use of `replayed` succeeds; its second use is in the table.
    let (status, _) = d.exchange(json!({ "token": replayed, "kind": "jwt", "audience": ARTIFACTS })).await;
    assert_eq!(status, 200);
    let issued_before = d.credentials().await;
    // The same refusal again from the same address within the window is counted, not
    // written again (`issue::refusals`): a refusal with a reason not seen before is always
    // one decision in full.
    let mut reasons = std::collections::HashSet::new();
    for (name, token) in &cases {
        let before = d.events().await.len();
        let (status, body) = d.exchange(json!({ "token": token, "kind": "jwt", "audience": ARTIFACTS })).await;
        assert_eq!(status, 401, "{name}: {body}");
        assert_eq!(body["error"], "invalid_token", "{name}");
        let reason = body["reason"].as_str().unwrap_or_default().to_owned();
        assert!(!reason.is_empty(), "{name}: a short reason");
        let events = d.events().await;
        let new: Vec<&StoredEvent> =
            events[before..].iter().filter(|e| e.kind == "decision" || e.kind == "issued").collect();
        let seen = !reasons.insert(reason.clone());
        if seen && new.is_empty() {
            // A repeat (same reason, same claimed issuer, same address): counted.
            continue;
        }
        assert_eq!(new.len(), 1, "{name}: one recorded denial, nothing issued");
        let last = new[0];
        assert!(
            last.kind == "decision"
                && last.body.contains("\"outcome\":\"deny\"")
                && last.body.contains("\"api\":\"exchange\""),
            "{name}: {}",
            last.body
        );
    }
    assert_eq!(d.credentials().await, issued_before, "no credential for any bad token");
    let events = d.events().await;
    assert!(events.iter().any(|e| e.body.contains("replay")));
    assert_eq!(verify_chain(&events), Ok(events.len()));

    // Bad requests are refused before anything is decided.
    let before = d.events().await.len();
    for body in [
        json!({ "token": issuer.token(|_| {}), "kind": "jwt" }),
        json!({ "token": "x", "kind": "ssh" }),
        json!({ "kind": "jwt" }),
    ] {
        let (status, reply) = d.exchange(body).await;
        assert_eq!(status, 400, "{reply}");
    }
    // A body over the limit is 413 from its declared length, before the body is read (so a
    // client still uploading may see its pipe closed instead):
    // a_declared_body_over_the_limit_is_413_before_any_of_it_arrives.
    // A body that does not say it is JSON: 415, for the exchange and for proof checks.
    let token = issuer.token(|_| {});
    for (path, content_type) in [
        ("/v1/exchange", "application/x-www-form-urlencoded"),
        ("/v1/exchange", "text/plain"),
        ("/v1/wpt/verify", "application/jsonx"),
    ] {
        let body = json!({ "token": token, "kind": "jwt", "audience": ARTIFACTS });
        let reply = d
            .client()
            .post(d.url(path))
            .header("content-type", content_type)
            .body(body.to_string())
            .send()
            .await
            .unwrap();
        assert_eq!(reply.status().as_u16(), 415, "{path} as {content_type}");
    }
    // The charset parameter is allowed: the same token is then taken.
    let reply = d
        .client()
        .post(d.url("/v1/exchange"))
        .header("content-type", "Application/JSON; charset=utf-8")
        .body(json!({ "token": token, "kind": "jwt", "audience": ARTIFACTS }).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(reply.status().as_u16(), 200);
    assert_eq!(d.events().await.len(), before + 2, "only the one taken request is decided and issued");
    d.stop().await;
}

/// A declared length over the limit is refused from the request head: the client that never
/// sends the 10 MB it announced still gets its 413, and the connection is not held open.
#[tokio::test(flavor = "multi_thread")]
async fn a_declared_body_over_the_limit_is_413_before_any_of_it_arrives() {
    use rustls::pki_types::pem::PemObject;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let issuer = Issuer::start().await;
    let policies = policies_for(&issuer.url);
    let d = TestDaemon::start(&issuer.url, &dir_path(&policies)).await;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(rustls::pki_types::CertificateDer::from_pem_slice(d.ca_pem.as_bytes()).unwrap()).unwrap();
    let mut config =
        rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let port: u16 = d.url("").rsplit(':').next().unwrap().parse().unwrap();
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config)).connect(name, tcp).await.unwrap();
    tls.write_all(
        b"POST /v1/exchange HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\ncontent-length: 10000000\r\n\r\n{",
    )
    .await
    .unwrap();
    let mut head = vec![0u8; 64];
    // The bound is how long the test waits for a refusal that needs no body, not a speed target.
    let n = tokio::time::timeout(Duration::from_secs(30), tls.read(&mut head))
        .await
        .expect("413 without the body")
        .unwrap();
    let head = String::from_utf8_lossy(&head[..n]);
    assert!(head.starts_with("HTTP/1.1 413"), "{head}");
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_grpc_exchange_answers_like_the_json_one() {
    let issuer = Issuer::start().await;
    let policies = policies_for(&issuer.url);
    let d = TestDaemon::start(&issuer.url, &dir_path(&policies)).await;
    let tls = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(&d.ca_pem))
        .domain_name("localhost");
    let channel =
        tonic::transport::Endpoint::from_shared(d.url("")).unwrap().tls_config(tls).unwrap().connect().await.unwrap();
    let mut client = mayfly::api::pb::exchange_client::ExchangeClient::new(channel);
    let reply = client
        .exchange(mayfly::api::pb::ExchangeRequest {
            token: issuer.token(|_| {}),
            kind: "jwt".into(),
            audience: ARTIFACTS.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.spiffe_id, CI_ID);
    assert!(!reply.token.is_empty());
    let err = client
        .exchange(mayfly::api::pb::ExchangeRequest {
            token: "garbage".into(),
            kind: "jwt".into(),
            audience: ARTIFACTS.into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated);
    d.stop().await;
}

fn write_jwt_key(path: &Path) -> String {
    let key = JwtKey::generate().unwrap();
    let tmp = path.with_extension("new");
    let _ = std::fs::remove_file(&tmp);
    mayfly::keys::write_private(&tmp, pem::encode(&pem::Pem::new("PRIVATE KEY", key.pkcs8_der().to_vec())).as_bytes())
        .unwrap();
    std::fs::rename(&tmp, path).unwrap();
    key.kid().to_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_new_jwt_key_signs_at_once_and_the_old_one_stays_published_for_its_tokens() {
    let issuer = Issuer::start().await;
    let policies = policies_for(&issuer.url);
    let dir = tempfile::tempdir().unwrap();
    let key_path = dir.path().join("jwt-signing.pem");
    let first_kid = write_jwt_key(&key_path);
    let d = TestDaemon::start_in(dir, &issuer.url, &dir_path(&policies), Some(key_path.clone())).await;
    let (status, body) =
        d.exchange(json!({ "token": issuer.token(|_| {}), "kind": "jwt", "audience": ARTIFACTS })).await;
    assert_eq!(status, 200, "{body}");
    let old_token = body["token"].as_str().unwrap().to_owned();
    assert_eq!(jsonwebtoken::decode_header(&old_token).unwrap().kid.as_deref(), Some(first_kid.as_str()));

    let second_kid = write_jwt_key(&key_path);
    let kids = |jwks: &Value| {
        jwks["keys"].as_array().unwrap().iter().map(|k| k["kid"].as_str().unwrap().to_owned()).collect::<Vec<_>>()
    };
    let mut jwks = Value::Null;
    for _ in 0..100 {
        jwks = d.client().get(d.url("/.well-known/jwks.json")).send().await.unwrap().json().await.unwrap();
        if kids(&jwks).len() == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(kids(&jwks), vec![second_kid.clone(), first_kid.clone()], "the new key first, the old one kept");
    let (status, body) =
        d.exchange(json!({ "token": issuer.token(|_| {}), "kind": "jwt", "audience": ARTIFACTS })).await;
    assert_eq!(status, 200);
    let new_token = body["token"].as_str().unwrap();
    assert_eq!(jsonwebtoken::decode_header(new_token).unwrap().kid.as_deref(), Some(second_kid.as_str()));
    // Both verify against the published JWKS.
    for token in [old_token.as_str(), new_token] {
        let kid = jsonwebtoken::decode_header(token).unwrap().kid.unwrap();
        let jwk = jwks["keys"].as_array().unwrap().iter().find(|k| k["kid"] == kid.as_str()).unwrap();
        let jwk: jsonwebtoken::jwk::Jwk = serde_json::from_value(jwk.clone()).unwrap();
        let mut v = jsonwebtoken::Validation::new(Algorithm::ES256);
        v.set_audience(&[ARTIFACTS]);
        jsonwebtoken::decode::<Value>(token, &jsonwebtoken::DecodingKey::from_jwk(&jwk).unwrap(), &v).unwrap();
    }
    assert!(d.events().await.iter().any(|e| e.kind == "jwt_key_rotated" && e.body.contains(&second_kid)));
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn mayfly_dev_gives_an_unregistered_subject_a_dev_identity_for_quick_tries() {
    let issuer = Issuer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let policies = Path::new(env!("CARGO_MANIFEST_DIR")).join("policies");
    let config = Config::dev(
        dir.path().join("data"),
        policies,
        dir.path().join("mayfly.sock"),
        dir.path().join("admin.sock"),
        mayfly::config::DevNet {
            listen: Some("127.0.0.1:0".into()),
            oidc_issuers: vec![issuer.url.clone()],
            ..mayfly::config::DevNet::default()
        },
    )
    .unwrap();
    let running = support::run(config, dir.path(), SystemTime::now(), None).await;
    // The dev CA signs the listener's certificate; it is made at the first start.
    let ca_pem = std::fs::read_to_string(dir.path().join("data/ca.pem")).unwrap();
    let d = TestDaemon { dir, ca_pem, running };

    let token = issuer.token(|c| {
        c["sub"] = json!("repo:someone/tool:ref:refs/heads/dev");
        c["repository"] = json!("someone/tool");
        c["repository_owner"] = json!("someone");
    });
    let (status, body) =
        d.exchange(json!({ "token": token, "kind": "jwt", "audience": "anything-at-all", "ttl": "1h" })).await;
    assert_eq!(status, 200, "{body}");
    // The subject as one escaped path segment: `/` and `:` cannot make two subjects one identity.
    assert_eq!(body["spiffe_id"], "spiffe://mayfly.local/dev/oidc/repo_3asomeone_2ftool_3aref_3arefs_2fheads_2fdev");
    let claims = jsonwebtoken::dangerous::insecure_decode::<Value>(body["token"].as_str().unwrap()).unwrap().claims;
    assert_eq!(
        claims["iss"],
        format!("https://127.0.0.1:{}", d.running.port.unwrap()),
        "dev's issuer is the bound listener"
    );
    assert_eq!(
        claims["exp"].as_i64().unwrap() - claims["iat"].as_i64().unwrap(),
        900,
        "dev-oidc-jwt grants at most 15 min"
    );
    // Break-glass off-host: the same exchange with a reason and ticket, decided by
    // break-glass rules only, written to the elevated log; its later use is flagged too.
    let bg = issuer.token(|c| c["sub"] = json!("oncall-alice"));
    let (status, body) = d.exchange(json!({ "token": bg, "kind": "jwt", "audience": "payments-db", "ttl": "1h", "break_glass": { "reason": "payments down", "ticket": "INC-9001" } })).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["break_glass"], true);
    let bg_token = body["token"].as_str().unwrap().to_owned();
    let claims = jsonwebtoken::dangerous::insecure_decode::<Value>(&bg_token).unwrap().claims;
    assert_eq!(
        claims["exp"].as_i64().unwrap() - claims["iat"].as_i64().unwrap(),
        600,
        "break-glass-dev-oidc-jwt: 10 min"
    );
    let introspected: Value = d
        .client()
        .post(d.url("/v1/introspect"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(format!("token={bg_token}"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(introspected["active"], true);
    let log = std::fs::read_to_string(d.dir.path().join("data/break-glass.log")).unwrap();
    let stages: Vec<String> = log
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap()["break_glass"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(stages, ["requested", "issued", "used"]);
    assert!(!log.contains(&bg_token), "the token itself is never written");
    let events = d.events().await;
    assert!(events.iter().any(|e| e.kind == "used" && e.body.contains("\"break_glass\":true")));
    // A bad ticket over TLS: refused, recorded, nothing issued.
    let (status, body) = d.exchange(json!({ "token": issuer.token(|c| c["sub"] = json!("oncall-bob")), "kind": "jwt", "audience": "x", "break_glass": { "reason": "r", "ticket": "whenever" } })).await;
    assert_eq!(status, 403, "{body}");
    assert!(body["reason"].as_str().unwrap().contains("ticket_pattern"));

    // The dev identity gets JWTs only: no X.509, no AWS.
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let csr = rcgen::CertificateParams::default().serialize_request(&key).unwrap().pem().unwrap();
    let (status, _) = d.exchange(json!({ "token": issuer.token(|_| {}), "kind": "x509", "csr": csr })).await;
    assert_eq!(status, 403);
    d.stop().await;
}
