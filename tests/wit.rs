#![expect(clippy::unwrap_used, reason = "tests fail loudly on any unexpected error")]

//! WIT-SVIDs on a real daemon in-process: FetchWITSVID and FetchWITBundles with the
//! generated client of the standard proto over the real Unix socket, proofs of possession
//! checked over TLS (`POST /v1/wpt/verify`) as a relying party asks, revocation through the
//! admin socket, SQLite in a temp dir and a paused clock. The WIT's signature is checked
//! here with aws-lc-rs directly against the published bundle, not with mayfly's verifier.

use std::time::{Duration, SystemTime};

use base64::Engine;
use mayfly::api::pb::RevokeRequest;
use mayfly::api::pb::revoke_request::Target;
use mayfly::api::spiffe::{JwtBundlesRequest, WitBundlesRequest, WitsvidRequest, WitsvidResponse};
use mayfly::clock::Clock;
use mayfly::keys::ProofSigner;
use mayfly::ledger::event::Event;
use mayfly::ledger::verify_chain;
use mayfly::validate::wpt::{ProofRequest, sign_proof};
use serde_json::{Value, json};
use support::{Running, WAIT, setup};
use tonic::{Code, Streaming};

mod support;

const DEV_ID: &str = "spiffe://mayfly.local/dev/quickstart";
const TD: &str = "spiffe://mayfly.local";
const AUD: &str = "https://db.example.org/query";

fn req<T>(message: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(message);
    r.metadata_mut().insert("workload.spiffe.io", "true".parse().unwrap());
    r
}

async fn start(dir: &tempfile::TempDir, now: SystemTime) -> Running {
    setup(dir.path()).at(now).tls().start().await
}

async fn next(stream: &mut Streaming<WitsvidResponse>) -> Result<WitsvidResponse, tonic::Status> {
    tokio::time::timeout(WAIT, stream.message()).await.expect("a message in time").map(|m| m.expect("stream open"))
}

fn b64(part: &str) -> Vec<u8> {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(part).unwrap()
}

/// A WIT as a relying party reads it: header and claims, its signature checked with the
/// bundle's key for its kid (aws-lc-rs, not mayfly's verifier).
fn read_wit(token: &str, bundle: &Value) -> (Value, Value) {
    let parts: Vec<&str> = token.split('.').collect();
    assert_eq!(parts.len(), 3);
    let header: Value = serde_json::from_slice(&b64(parts[0])).unwrap();
    let claims: Value = serde_json::from_slice(&b64(parts[1])).unwrap();
    let key = bundle["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["kid"] == header["kid"])
        .expect("the kid is in the bundle");
    assert_eq!(key["use"], "wit-svid");
    let point = [vec![4u8], b64(key["x"].as_str().unwrap()), b64(key["y"].as_str().unwrap())].concat();
    aws_lc_rs::signature::UnparsedPublicKey::new(&aws_lc_rs::signature::ECDSA_P256_SHA256_FIXED, point)
        .verify(format!("{}.{}", parts[0], parts[1]).as_bytes(), &b64(parts[2]))
        .expect("the WIT's signature verifies with the published WIT key");
    (header, claims)
}

async fn wit_bundle(d: &Running) -> Value {
    let mut c = d.workload().await;
    let mut s = c.fetch_wit_bundles(req(WitBundlesRequest {})).await.unwrap().into_inner();
    let msg = tokio::time::timeout(WAIT, s.message()).await.unwrap().unwrap().unwrap();
    serde_json::from_str(&msg.bundles[TD]).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_wit_comes_with_its_key_verifies_against_the_published_bundle_is_renewed_at_half_life_and_expires_on_record()
{
    let dir = tempfile::tempdir().unwrap();
    let d = start(&dir, SystemTime::now()).await;
    let mut c = d.workload().await;
    let mut stream = c.fetch_witsvid(req(WitsvidRequest { spiffe_id: String::new() })).await.unwrap().into_inner();
    let first = next(&mut stream).await.unwrap();
    assert_eq!(first.svids.len(), 1);
    let svid = &first.svids[0];
    assert_eq!(svid.spiffe_id, DEV_ID);
    let bundle = wit_bundle(&d).await;
    let (header, claims) = read_wit(&svid.wit_svid, &bundle);
    assert_eq!(header["typ"], "wit+jwt");
    assert_eq!(header["alg"], "ES256");
    assert_eq!(claims["sub"], DEV_ID);
    assert!(claims.get("aud").is_none() && claims.get("iss").is_none());
    assert_eq!(
        claims["exp"].as_i64().unwrap() - claims["iat"].as_i64().unwrap(),
        1800,
        "wit.ttl, within local-dev-wit"
    );
    // The key handed out is the private half of cnf.jwk.
    let key: Value = serde_json::from_str(&svid.wit_svid_key).unwrap();
    let cnf = &claims["cnf"]["jwk"];
    assert_eq!((&key["x"], &key["y"], &key["kty"], &cnf["alg"]), (&cnf["x"], &cnf["y"], &json!("EC"), &json!("ES256")));
    assert!(key["d"].is_string() && cnf.get("d").is_none());
    // WIT kids are not JWT-SVID kids, and the WIT keys are not in the JWT bundle or the OIDC JWKS.
    let mut jwt = c.fetch_jwt_bundles(req(JwtBundlesRequest {})).await.unwrap().into_inner();
    let jwt_bundle: Value =
        serde_json::from_slice(&tokio::time::timeout(WAIT, jwt.message()).await.unwrap().unwrap().unwrap().bundles[TD])
            .unwrap();
    let jwt_kids: Vec<&Value> = jwt_bundle["keys"].as_array().unwrap().iter().map(|k| &k["kid"]).collect();
    assert!(!jwt_kids.contains(&&header["kid"]), "{jwt_kids:?}");
    let oidc: Value = d.https().get(d.url("/.well-known/jwks.json")).send().await.unwrap().json().await.unwrap();
    assert!(!oidc["keys"].as_array().unwrap().iter().any(|k| k["kid"] == header["kid"]));
    let published: Value = d.https().get(d.url("/v1/wit/jwks.json")).send().await.unwrap().json().await.unwrap();
    assert_eq!(published, bundle);

    // Half-life: a new WIT with a new key and jti, recorded as a rotation of the first.
    d.clock.advance(Duration::from_secs(15 * 60));
    let second = next(&mut stream).await.unwrap();
    let (_, renewed) = read_wit(&second.svids[0].wit_svid, &bundle);
    assert_ne!(renewed["jti"], claims["jti"]);
    assert_ne!(renewed["cnf"], claims["cnf"]);
    let events = d.typed().await;
    let rotation = events.iter().rev().find_map(|e| match e {
        Event::Decision(x) if x.action == "issue_wit" => Some(x.clone()),
        _ => None,
    });
    assert_eq!(rotation.unwrap().rotates.as_deref(), claims["jti"].as_str());
    let issued: Vec<_> = events
        .iter()
        .filter_map(|e| match e {
            Event::Issued(i) if i.credential.kind == "wit" => Some(i.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(issued.len(), 2);
    assert_eq!(issued[0].credential.id, claims["jti"].as_str().unwrap());
    assert_eq!(
        issued[0].details.cnf_jkt.as_deref(),
        Some(mayfly::keys::ec_thumbprint(key["x"].as_str().unwrap(), key["y"].as_str().unwrap()).as_str())
    );
    // The first WIT passing its expiry is an `expired` event, like any credential's.
    d.clock.advance(Duration::from_secs(15 * 60 + 1));
    let first_jti = claims["jti"].as_str().unwrap().to_owned();
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let expired = d
            .typed()
            .await
            .into_iter()
            .any(|e| matches!(e, Event::Expired(x) if x.credential_id == first_jti && x.kind == "wit"));
        if expired {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "no `expired` event for the first WIT");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Neither key nor token is on record.
    let stored = d.events().await;
    assert!(!stored.iter().any(|e| e.body.contains(key["d"].as_str().unwrap()) || e.body.contains(&svid.wit_svid)));
    assert_eq!(verify_chain(&stored), Ok(stored.len()));
    drop(stream);
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_proof_is_accepted_once_over_https_and_revoking_the_identity_withdraws_the_wit() {
    let dir = tempfile::tempdir().unwrap();
    let d = start(&dir, SystemTime::now()).await;
    let mut c = d.workload().await;
    let mut stream = c.fetch_witsvid(req(WitsvidRequest { spiffe_id: DEV_ID.into() })).await.unwrap().into_inner();
    let first = next(&mut stream).await.unwrap();
    let (wit, key) = (first.svids[0].wit_svid.clone(), first.svids[0].wit_svid_key.clone());
    let signer = ProofSigner::from_private_jwk(&key).unwrap();
    let proof = |audience: &str| {
        let r = ProofRequest {
            wit: &wit,
            audience,
            lifetime: Duration::from_secs(60),
            access_token: None,
            txn_token: None,
        };
        sign_proof(&signer, &r, d.clock.now()).unwrap()
    };
    let http = d.https();
    let verify = |body: Value| {
        let http = http.clone();
        let url = d.url("/v1/wpt/verify");
        async move {
            let r = http.post(url).json(&body).send().await.unwrap();
            (r.status().as_u16(), r.json::<Value>().await.unwrap())
        }
    };
    let wpt = proof(AUD);
    let (code, ok) = verify(json!({ "wit": wit, "wpt": wpt, "audience": AUD })).await;
    assert_eq!(code, 200, "{ok}");
    assert_eq!(ok["spiffe_id"], DEV_ID);
    let (_, claims) = read_wit(&wit, &wit_bundle(&d).await);
    assert_eq!(ok["expires_at"], claims["exp"]);
    // Exactly once; every bad variant is a 401 that says why.
    let (code, again) = verify(json!({ "wit": wit, "wpt": wpt, "audience": AUD })).await;
    assert_eq!((code, again["error"].as_str()), (401, Some("invalid_proof")));
    assert!(again["reason"].as_str().unwrap().contains("already used"), "{again}");
    let (code, other) = verify(json!({ "wit": wit, "wpt": proof(AUD), "audience": "https://other.example.org" })).await;
    assert!(code == 401 && other["reason"].as_str().unwrap().contains("audience"), "{other}");
    let (code, _) = verify(json!({ "wit": wit, "wpt": proof(AUD), "audience": AUD, "access_token": "at" })).await;
    assert_eq!(code, 401, "a proof that binds no access token does not go with one");
    let (code, bad) = verify(json!({ "wit": wit, "audience": AUD })).await;
    assert_eq!((code, bad["error"].as_str()), (400, Some("invalid_request")));
    let (code, _) = verify(json!({ "wit": "x".repeat(9000), "wpt": proof(AUD), "audience": AUD })).await;
    assert_eq!(code, 400, "oversized input is refused before any decoding");
    let uses: Vec<_> = d
        .typed()
        .await
        .into_iter()
        .filter_map(|e| match e {
            Event::Used(u) => Some(u),
            _ => None,
        })
        .collect();
    assert_eq!(uses.len(), 1, "only the accepted proof is a use");
    assert_eq!(
        (uses[0].kind.as_str(), uses[0].use_kind.as_str(), uses[0].audience.as_deref()),
        ("wit", "verify_wpt", Some(AUD))
    );
    assert_eq!(uses[0].credential_id, claims["jti"].as_str().unwrap());

    // Revoking the identity: the WIT leaves the open stream, and its proofs are refused.
    let mut admin = d.admin().await;
    admin
        .revoke(RevokeRequest {
            target: Some(Target::Identity(DEV_ID.into())),
            reason: "INC-77: WIT key exposed".into(),
            dry_run: false,
            all: false,
            lock_ttl_seconds: 0,
        })
        .await
        .unwrap();
    let withdrawn = next(&mut stream).await.unwrap();
    assert!(withdrawn.svids.is_empty(), "an empty set first");
    assert_eq!(next(&mut stream).await.unwrap_err().code(), Code::PermissionDenied);
    let (code, revoked) = verify(json!({ "wit": wit, "wpt": proof(AUD), "audience": AUD })).await;
    assert!(code == 401 && revoked["reason"].as_str().unwrap().contains("revoked"), "{revoked}");
    // Locked: no new WIT either.
    let refused = c.fetch_witsvid(req(WitsvidRequest { spiffe_id: String::new() })).await.unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied);
    let stored = d.events().await;
    assert_eq!(verify_chain(&stored), Ok(stored.len()));
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_requests_are_refused_and_an_unentitled_identity_gets_permission_denied() {
    let dir = tempfile::tempdir().unwrap();
    let d = start(&dir, SystemTime::now()).await;
    let mut c = d.workload().await;
    let before = d.events().await.len();
    let e = c.fetch_witsvid(req(WitsvidRequest { spiffe_id: "not a spiffe id".into() })).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert_eq!(c.fetch_wit_bundles(WitBundlesRequest {}).await.unwrap_err().code(), Code::InvalidArgument);
    assert_eq!(d.events().await.len(), before, "refused at the edge: nothing decided");
    // Naming an identity the caller is not: a recorded denial, no WIT.
    let e = c
        .fetch_witsvid(req(WitsvidRequest { spiffe_id: "spiffe://mayfly.local/legacy/batch".into() }))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    let events = d.typed().await;
    assert!(matches!(events.last(), Some(Event::Decision(x)) if x.action == "issue_wit" && !x.is_allow()));
    assert!(!events.iter().any(|e| matches!(e, Event::Issued(_))));
    d.stop().await;
}

/// A copy of the shipped policies with another inventory (and without the shipped cases,
/// which name the shipped identities).
fn policies_with_inventory(inventory: &str) -> tempfile::TempDir {
    fn copy_tree(from: &std::path::Path, to: &std::path::Path) {
        std::fs::create_dir_all(to).unwrap();
        for entry in std::fs::read_dir(from).unwrap() {
            let path = entry.unwrap().path();
            let target = to.join(path.file_name().unwrap());
            if path.is_dir() { copy_tree(&path, &target) } else { std::fs::copy(&path, &target).map(|_| ()).unwrap() }
        }
    }
    let dir = tempfile::tempdir().unwrap();
    copy_tree(&support::repo_policies(), dir.path());
    std::fs::remove_dir_all(dir.path().join("tests")).unwrap();
    std::fs::write(dir.path().join("inventory.toml"), inventory).unwrap();
    dir
}

#[tokio::test(flavor = "multi_thread")]
async fn a_caller_of_two_identities_gets_a_wit_for_each_and_losing_one_leaves_the_other() {
    let entry = |id: &str| {
        format!(
            "[[workload]]\nid = \"{id}\"\nowner = \"team\"\npurpose = \"tests\"\nenvironment = \"dev\"\ntier = \"standard\"\nexpires = 2030-01-01\nselectors = [\"unix:uid:self\"]\n"
        )
    };
    let (a, b) = ("spiffe://mayfly.local/dev/frontend", "spiffe://mayfly.local/dev/worker");
    let policies = policies_with_inventory(&format!("{}\n{}", entry(a), entry(b)));
    let dir = tempfile::tempdir().unwrap();
    let d = setup(dir.path()).policies(policies.path()).tls().start().await;
    let mut c = d.workload().await;
    let mut stream = c.fetch_witsvid(req(WitsvidRequest { spiffe_id: String::new() })).await.unwrap().into_inner();
    let first = next(&mut stream).await.unwrap();
    let bundle = wit_bundle(&d).await;
    let mut ids: Vec<&str> = first.svids.iter().map(|s| s.spiffe_id.as_str()).collect();
    ids.sort_unstable();
    assert_eq!(ids, [a, b], "one WIT per entitled identity");
    for svid in &first.svids {
        let (_, claims) = read_wit(&svid.wit_svid, &bundle);
        assert_eq!(claims["sub"], svid.spiffe_id.as_str());
        let key: Value = serde_json::from_str(&svid.wit_svid_key).unwrap();
        assert_eq!(
            (&key["x"], &key["y"]),
            (&claims["cnf"]["jwk"]["x"], &claims["cnf"]["jwk"]["y"]),
            "each with its own key"
        );
    }
    let worker_jti = {
        let w = first.svids.iter().find(|s| s.spiffe_id == b).unwrap();
        read_wit(&w.wit_svid, &bundle).1["jti"].clone()
    };
    // The request that named no identity is on record as such, then one decision each.
    let decisions: Vec<_> = d
        .typed()
        .await
        .into_iter()
        .filter_map(|e| match e {
            Event::Decision(x) if x.action == "issue_wit" => Some(x),
            _ => None,
        })
        .collect();
    assert_eq!(decisions.len(), 3);
    assert!(!decisions[0].is_allow() && decisions[0].reason.contains("several identities"));
    assert!(decisions[1].is_allow() && decisions[2].is_allow());

    // Revoking one identity: the set goes on with the other, freshly issued (keys leave with
    // each message), then without either: empty, PERMISSION_DENIED.
    let mut admin = d.admin().await;
    let revoke = |id: &str| RevokeRequest {
        target: Some(Target::Identity(id.into())),
        reason: "INC-78: frontend compromised".into(),
        dry_run: false,
        all: false,
        lock_ttl_seconds: 0,
    };
    admin.revoke(revoke(a)).await.unwrap();
    let after = next(&mut stream).await.unwrap();
    assert_eq!(after.svids.len(), 1);
    assert_eq!(after.svids[0].spiffe_id, b);
    let (_, renewed) = read_wit(&after.svids[0].wit_svid, &bundle);
    assert_ne!(renewed["jti"], worker_jti);
    assert!(!after.svids[0].wit_svid_key.is_empty());
    admin.revoke(revoke(b)).await.unwrap();
    assert!(next(&mut stream).await.unwrap().svids.is_empty());
    assert_eq!(next(&mut stream).await.unwrap_err().code(), Code::PermissionDenied);
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_daemon_whose_wit_key_is_its_jwt_key_does_not_start() {
    let dir = tempfile::tempdir().unwrap();
    let key = mayfly::keys::JwtKey::generate().unwrap();
    let pem = pem::encode(&pem::Pem::new("PRIVATE KEY", key.pkcs8_der().to_vec()));
    let (jwt, wit) = (dir.path().join("jwt.pem"), dir.path().join("wit.pem"));
    mayfly::keys::write_private(&jwt, pem.as_bytes()).unwrap();
    mayfly::keys::write_private(&wit, pem.as_bytes()).unwrap();
    let config = setup(dir.path())
        .raw(|r| {
            r.jwt.key = Some(jwt.clone());
            r.wit.key = Some(wit.clone());
        })
        .config();
    let clock = std::sync::Arc::new(mayfly::clock::FixedClock::new(SystemTime::now()));
    let err = mayfly::daemon::Daemon::build(config, clock).await.err().expect("refused");
    assert!(err.to_string().contains("WIT key is the JWT key"), "{err}");
}
