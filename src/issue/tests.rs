//! The pipeline's order and its fail-closed steps, over fakes (`crate::testing`).

use std::sync::Arc;
use std::time::Duration;

use super::*;
use crate::clock::unix_secs;
use crate::identity::TrustDomain;
use crate::ledger::event::{Event, EventKind};
use crate::ledger::verify_chain;
use crate::mint::aws::Limits;
use crate::policy::release::Release;
use crate::testing::{FakeSts, IssuerBuilder, NOW_SECS, TestIssuer};

const INVENTORY: &str = r#"
    [[workload]]
    id = "spiffe://mayfly.local/api"
    owner = "team-api"
    purpose = "test"
    environment = "prod"
    tier = "standard"
    expires = 2030-01-01
    selectors = ["unix:uid:1001"]
"#;

/// The shipped rules plus a JWT permit for one audience, so a multi-audience request can
/// be half allowed.
const JWT_RULE: &str = r#"
    @id("api-jwt-db")
    @max_ttl("10m")
    permit (principal, action == Mayfly::Action::"issue_jwt", resource == Mayfly::Audience::"db")
    when { principal.attestation == "unix" };
"#;

const AWS_RULE: &str = r#"
    @id("api-reads-reports")
    @max_ttl("1h")
    @aws_session_tags("owner")
    permit (principal, action == Mayfly::Action::"issue_aws", resource == Mayfly::AwsRole::"arn:aws:iam::111122223333:role/api-reports-read")
    when { principal.attestation == "unix" };
"#;

/// WIT-SVIDs for the (production) test identity, 20 min at most.
const WIT_RULE: &str = r#"
    @id("api-wit")
    @max_ttl("20m")
    permit (principal, action == Mayfly::Action::"issue_wit", resource == Mayfly::CredentialKind::"wit")
    when { principal.attestation == "unix" };
"#;

const REPORTS_ROLE: &str = "arn:aws:iam::111122223333:role/api-reports-read";

fn release(extra: &[(&str, Option<&str>)]) -> Release {
    let mut files = vec![
        ("inventory.toml", Some(INVENTORY)),
        ("tests/local.toml", None),
        ("tests/ci.toml", None),
        ("issuance/jwt-test.cedar", Some(JWT_RULE)),
        ("issuance/aws-test.cedar", Some(AWS_RULE)),
        ("issuance/wit-test.cedar", Some(WIT_RULE)),
    ];
    files.extend_from_slice(extra);
    let files = crate::policy::shipped_files_with(&files);
    Release::build(&files, &TrustDomain::parse("mayfly.local").unwrap(), None, None, "test".into()).unwrap()
}

async fn issuer(selectors: &[&str], ledger_ok_records: Option<usize>) -> TestIssuer {
    let builder = IssuerBuilder::new(selectors, release(&[]));
    match ledger_ok_records {
        Some(n) => builder.ledger_fails_after(n),
        None => builder,
    }
    .build()
    .await
}

/// `issuer` with AWS served by a scripted STS (and the rule above).
async fn aws_issuer(ledger_ok_records: Option<usize>) -> (TestIssuer, Arc<FakeSts>) {
    let sts = Arc::new(FakeSts::default());
    let limits = Limits {
        attempts: 2,
        attempt_timeout: Duration::from_secs(30),
        backoff: Duration::from_millis(1),
        max_in_flight: 8,
    };
    let builder = IssuerBuilder::new(&["unix:uid:1001"], release(&[])).aws(sts.clone(), limits, false);
    let t = match ledger_ok_records {
        Some(n) => builder.ledger_fails_after(n),
        None => builder,
    }
    .build()
    .await;
    (t, sts)
}

fn local() -> PeerInfo {
    PeerInfo::without_credentials()
}

fn x509(ttl: &str) -> IssueRequest {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let csr = rcgen::CertificateParams::default().serialize_request(&key).unwrap();
    IssueRequest {
        ask: Ask::X509 { key: KeySource::Csr(VerifiedCsr::parse(csr.der()).unwrap()) },
        ttl: Ttl::parse(ttl).unwrap(),
        spiffe_id: None,
        origin: Origin::default(),
    }
}

fn jwt(audiences: &[&str], ttl: &str) -> IssueRequest {
    IssueRequest {
        ask: Ask::Jwt { audiences: audiences.iter().map(|a| (*a).to_owned()).collect() },
        ttl: Ttl::parse(ttl).unwrap(),
        spiffe_id: None,
        origin: Origin::default(),
    }
}

fn aws(role: &str, ttl: &str) -> IssueRequest {
    IssueRequest {
        ask: Ask::Aws { role: AwsRole::parse(role).unwrap() },
        ttl: Ttl::parse(ttl).unwrap(),
        spiffe_id: None,
        origin: Origin::default(),
    }
}

fn kinds(t: &TestIssuer) -> Vec<String> {
    t.backend.events().into_iter().map(|e| e.kind).collect()
}

fn decision(t: &TestIssuer, index: usize) -> event::Decision {
    match t.backend.events()[index].event().unwrap() {
        Event::Decision(d) => d,
        other => panic!("not a decision: {other:?}"),
    }
}

#[tokio::test]
async fn issuance_records_decision_then_credential() {
    let t = issuer(&["unix:uid:1001"], None).await;
    let issued = t.issuer.issue(Caller::Local(&local()), x509("2h")).await.unwrap();
    assert_eq!(issued.identity.as_str(), "spiffe://mayfly.local/api");
    let Credential::X509(x) = &issued.credential else { panic!("x509") };
    assert_eq!(unix_secs(x.svid.not_after) - unix_secs(x.svid.not_before), 3600);
    assert_eq!(kinds(&t), ["decision", "issued"]);
    assert_eq!(decision(&t, 0).rules, ["local-workloads-x509"]);
    let creds = t.backend.credentials();
    assert_eq!(creds.len(), 1);
    assert_eq!(creds[0].1.serial, x.svid.serial);
    assert_eq!(creds[0].1.decision_id, issued.decision_id);
    assert_eq!((issued.decision_id, issued.issued_id), (1, 2));
    assert_eq!(t.backend.batches(), 1, "the allow and the issuance are one commit");
    assert_eq!(verify_chain(&t.backend.events()), Ok(2));
}

#[tokio::test]
async fn unknown_callers_are_denied_and_the_denial_recorded() {
    let t = issuer(&["unix:uid:4242"], None).await;
    let err = t.issuer.issue(Caller::Local(&local()), x509("1h")).await.unwrap_err();
    assert!(matches!(err, IssueError::NoEntry));
    assert_eq!(kinds(&t), ["decision"]);
    let d = decision(&t, 0);
    assert!(!d.is_allow());
    assert_eq!(d.reason, "no inventory entry matches this caller");
    assert!(d.request.is_some(), "kept for replay: another release's inventory might know the caller");
    assert!(t.backend.credentials().is_empty());
}

#[tokio::test]
async fn a_failed_attestation_is_a_recorded_refusal_without_a_request() {
    let mut t = issuer(&["unix:uid:1001"], None).await;
    t.issuer = Arc::new(Issuer::new(Parts {
        attestor: Arc::new(crate::testing::FakeAttestor(Err(AttestError::CallerExited { pid: 7 }))),
        policy: t.policy.clone(),
        minters: Minters {
            x509: Arc::new(crate::mint::x509::X509Minter::new(Arc::new(
                crate::keys::CertificateAuthority::generate(
                    &TrustDomain::parse("mayfly.local").unwrap(),
                    t.clock.now(),
                    Duration::from_secs(3600),
                )
                .unwrap(),
            ))),
            jwt: t.jwt.clone(),
            wit: t.wit.clone(),
            aws: None,
        },
        ledger: t.ledger.clone(),
        clock: t.clock.clone(),
        revocations: t.revocations.clone(),
        emergency: t.emergency.clone(),
        shadow: t.shadow.clone(),
        exchange: None,
    }));
    let err = t.issuer.issue(Caller::Local(&local()), x509("1h")).await.unwrap_err();
    assert!(matches!(err, IssueError::Attest(AttestError::CallerExited { pid: 7 })), "{err:?}");
    let d = decision(&t, 0);
    assert!(d.reason.contains("exited"), "{}", d.reason);
    assert!(d.request.is_none(), "nothing attested, nothing to replay");
}

#[tokio::test]
async fn when_the_issued_record_fails_nothing_is_returned() {
    // The decision is recorded, the issued event is not: the caller gets an error, no certificate.
    let t = issuer(&["unix:uid:1001"], Some(1)).await;
    let err = t.issuer.issue(Caller::Local(&local()), x509("1h")).await.unwrap_err();
    assert!(matches!(err, IssueError::Ledger(_)), "{err:?}");
    assert!(t.backend.credentials().is_empty());
    assert_eq!(t.backend.events().len(), 1);
}

#[tokio::test]
async fn when_the_decision_cannot_be_recorded_nothing_is_handed_out() {
    // The allow is written with the issuance; a ledger that takes neither means no answer
    // but an error, and nothing on record claims a credential.
    let t = issuer(&["unix:uid:1001"], Some(0)).await;
    let err = t.issuer.issue(Caller::Local(&local()), x509("1h")).await.unwrap_err();
    assert!(matches!(err, IssueError::Ledger(_)));
    assert!(t.backend.events().is_empty() && t.backend.credentials().is_empty());
}

#[tokio::test]
async fn a_denial_is_durable_before_its_answer_and_alone() {
    let t = issuer(&["unix:uid:1001"], None).await;
    let err = t.issuer.issue(Caller::Local(&local()), jwt(&["https://not-granted.example"], "1h")).await.unwrap_err();
    assert!(matches!(err, IssueError::Denied { .. }), "{err:?}");
    assert_eq!(kinds(&t), ["decision"]);
    assert_eq!(t.backend.batches(), 1);
}

#[tokio::test]
async fn a_server_made_key_is_made_only_after_an_allow_and_matches_the_certificate() {
    let t = issuer(&["unix:uid:1001"], None).await;
    let server_made = || IssueRequest {
        ask: Ask::X509 { key: KeySource::ServerMade },
        ttl: Ttl::parse("10m").unwrap(),
        spiffe_id: None,
        origin: Origin::default(),
    };
    let issued = t.issuer.issue(Caller::Local(&local()), server_made()).await.unwrap();
    let Credential::X509(x) = issued.credential else { panic!("x509") };
    let key = x.private_key.expect("server-made key returned");
    let pair = rcgen::KeyPair::try_from(key.expose()).unwrap();
    let (_, cert) = x509_parser::parse_x509_certificate(&x.svid.cert_der).unwrap();
    assert_eq!(cert.public_key().raw, rcgen::PublicKeyData::subject_public_key_info(&pair).as_slice());
    // The ledger holds the serial, never the key.
    let der_hex = hex::encode(key.expose());
    assert!(!t.backend.events().iter().any(|e| e.body.contains(&der_hex[..32])));

    let stranger = issuer(&["unix:uid:4242"], None).await;
    assert!(matches!(stranger.issuer.issue(Caller::Local(&local()), server_made()).await, Err(IssueError::NoEntry)));
}

fn wit(ttl: &str) -> IssueRequest {
    IssueRequest { ask: Ask::Wit, ttl: Ttl::parse(ttl).unwrap(), spiffe_id: None, origin: Origin::default() }
}

#[tokio::test]
async fn a_wit_binds_a_key_made_after_the_allow_and_only_its_thumbprint_is_recorded() {
    let t = issuer(&["unix:uid:1001"], None).await;
    let issued = t.issuer.issue(Caller::Local(&local()), wit("1h")).await.unwrap();
    let Credential::Wit(w) = &issued.credential else { panic!("wit") };
    assert_eq!(unix_secs(w.svid.not_after) - unix_secs(w.svid.not_before), 1200, "clamped to api-wit's 20 min");
    assert_eq!(kinds(&t), ["decision", "issued"]);
    assert_eq!(
        (decision(&t, 0).action.as_str(), decision(&t, 0).rules.clone()),
        ("issue_wit", vec!["api-wit".to_owned()])
    );
    // The token verifies with the WIT key, names the credential and binds the handed-out key.
    let checked = t.wit.validate_wit(w.svid.token.expose(), t.clock.now()).unwrap();
    assert_eq!(
        (checked.identity.as_str(), checked.jti.as_str()),
        ("spiffe://mayfly.local/api", issued.credential_id.as_str())
    );
    assert_eq!(checked.cnf.thumbprint, w.key.thumbprint);
    let signer = crate::keys::ProofSigner::from_private_jwk(w.key.private_jwk().expose()).unwrap();
    assert_eq!(crate::keys::ec_thumbprint(&signer.x, &signer.y), w.key.thumbprint);
    // The record: kind, jti, the token's hash, the key's thumbprint — never the token or key.
    let creds = t.backend.credentials();
    assert_eq!((creds[0].1.kind.as_str(), creds[0].1.serial.as_str()), ("wit", issued.credential_id.as_str()));
    let Event::Issued(record) = t.backend.events()[1].event().unwrap() else { panic!("issued") };
    assert_eq!(record.details.cnf_jkt.as_deref(), Some(w.key.thumbprint.as_str()));
    let d: serde_json::Value = serde_json::from_str(w.key.private_jwk().expose()).unwrap();
    let bodies: String = t.backend.events().iter().map(|e| e.body.clone()).collect();
    assert!(!bodies.contains(d["d"].as_str().unwrap()) && !bodies.contains(w.svid.token.expose()));
    assert!(!format!("{issued:?}").contains(d["d"].as_str().unwrap()), "Debug shows no key");
}

#[tokio::test]
async fn a_denied_wit_request_is_recorded_and_nothing_is_issued() {
    let t = issuer(&["unix:uid:1001"], None).await;
    let err = t.issuer.issue(Caller::Local(&local()), wit("13h")).await.unwrap_err();
    assert!(matches!(&err, IssueError::Denied { rules, .. } if rules == &["forbid-ttl-over-12h"]), "{err:?}");
    assert_eq!(kinds(&t), ["decision"]);
    assert!(t.backend.credentials().is_empty());
}

#[tokio::test]
async fn a_jwt_needs_every_audience_granted_and_is_recorded_by_jti() {
    let t = issuer(&["unix:uid:1001"], None).await;
    let issued = t.issuer.issue(Caller::Local(&local()), jwt(&["db"], "1h")).await.unwrap();
    let Credential::Jwt(svid) = &issued.credential else { panic!("jwt") };
    assert_eq!(svid.jti, issued.credential_id);
    assert_eq!(unix_secs(svid.not_after) - unix_secs(svid.not_before), 600, "clamped to the rule's 10m");
    let creds = t.backend.credentials();
    assert_eq!((creds[0].1.kind.as_str(), creds[0].1.serial.as_str()), ("jwt", issued.credential_id.as_str()));
    // The token itself is never recorded.
    assert!(!t.backend.events().iter().any(|e| e.body.contains(svid.token.expose())));

    // One audience not granted: the whole request is denied, naming nothing it should not.
    let err = t.issuer.issue(Caller::Local(&local()), jwt(&["db", "payments"], "5m")).await.unwrap_err();
    assert!(matches!(err, IssueError::Denied { .. }), "{err:?}");
    let last = decision(&t, t.backend.events().len() - 1);
    assert!(!last.is_allow());
    assert_eq!(last.resource.as_deref(), Some("audience db, audience payments"));
    assert_eq!(t.backend.credentials().len(), 1);
}

#[tokio::test]
async fn an_aws_session_is_recorded_with_its_source_identity_and_expiry_and_never_its_secrets() {
    let (t, sts) = aws_issuer(None).await;
    let issued = t.issuer.issue(Caller::Local(&local()), aws(REPORTS_ROLE, "2h")).await.unwrap();
    let Credential::Aws(session) = &issued.credential else { panic!("aws") };
    assert_eq!(session.source_identity, "mayfly.local+api");
    assert_eq!(session.session.secret_access_key.expose(), "fake-secret", "the caller gets the secret");
    let sent = sts.requests.lock().unwrap()[0].0.clone();
    assert_eq!(
        (sent.duration_seconds, sent.tags.clone()),
        (3600, vec![("owner".to_owned(), "team-api".to_owned())]),
        "the rule's 1h ceiling and tag"
    );
    assert_eq!(kinds(&t), ["decision", "issued"]);
    let Event::Issued(record) = t.backend.events()[1].event().unwrap() else { panic!("issued") };
    let a = &record.details.aws;
    assert_eq!(a.source_identity.as_deref(), Some("mayfly.local+api"));
    assert_eq!(a.access_key_id.as_deref(), Some("ASIAFAKE0000000001"));
    assert_eq!(a.session_name.as_deref(), Some(sent.role_session_name.as_str()));
    assert_eq!(
        a.assumed_role_arn.as_deref(),
        Some(format!("arn:aws:sts::111122223333:assumed-role/api-reports-read/{}", sent.role_session_name).as_str())
    );
    assert_eq!(record.credential.not_after, i64::try_from(NOW_SECS).unwrap() + 3600);
    for e in t.backend.events() {
        assert!(
            !e.body.contains("fake-secret") && !e.body.contains("fake-token"),
            "a secret reached the ledger: {}",
            e.body
        );
    }
    let creds = t.backend.credentials();
    assert_eq!((creds[0].1.kind.as_str(), creds[0].1.serial.as_str()), ("aws", "ASIAFAKE0000000001"));
}

#[tokio::test]
async fn a_denied_aws_request_never_reaches_sts_and_the_denial_is_recorded() {
    let (t, sts) = aws_issuer(None).await;
    let err =
        t.issuer.issue(Caller::Local(&local()), aws("arn:aws:iam::111122223333:role/admin", "15m")).await.unwrap_err();
    assert!(matches!(err, IssueError::Denied { .. }), "{err:?}");
    assert!(sts.requests.lock().unwrap().is_empty());
    assert_eq!(kinds(&t), ["decision"]);
    let d = decision(&t, 0);
    assert!(!d.is_allow());
    assert_eq!(d.resource.as_deref(), Some("role arn:aws:iam::111122223333:role/admin"));
}

#[tokio::test]
async fn an_sts_failure_leaves_no_credential_and_says_unavailable_with_the_aws_code() {
    let (t, sts) = aws_issuer(None).await;
    let throttled = crate::aws::AwsError::Service {
        operation: "AssumeRole",
        code: "Throttling".into(),
        message: "Rate exceeded".into(),
    };
    sts.failures.lock().unwrap().extend([throttled.clone(), throttled]);
    let err = t.issuer.issue(Caller::Local(&local()), aws(REPORTS_ROLE, "1h")).await.unwrap_err();
    let status = crate::api::status(&err);
    assert_eq!(status.code(), tonic::Code::Unavailable);
    assert!(status.message().contains("Throttling"), "{}", status.message());
    assert_eq!(sts.requests.lock().unwrap().len(), 2, "attempts = 2");
    assert!(t.backend.credentials().is_empty());
    assert_eq!(kinds(&t), ["decision"]);
}

#[tokio::test]
async fn a_session_that_cannot_be_recorded_is_not_handed_out() {
    let (t, sts) = aws_issuer(Some(1)).await;
    let err = t.issuer.issue(Caller::Local(&local()), aws(REPORTS_ROLE, "1h")).await.unwrap_err();
    assert!(matches!(err, IssueError::Ledger(_)), "{err:?}");
    assert_eq!(sts.requests.lock().unwrap().len(), 1, "STS made one");
    assert!(t.backend.credentials().is_empty());
}

/// An AWS issuance started and now waiting inside STS until `gate` is notified.
async fn aws_issuance_held_at_sts(
    issuer: &Arc<Issuer>,
    sts: &FakeSts,
) -> (Arc<tokio::sync::Notify>, tokio::task::JoinHandle<Result<Issued, IssueError>>) {
    let gate = Arc::new(tokio::sync::Notify::new());
    *sts.hold.lock().unwrap() = Some(gate.clone());
    let pending = tokio::spawn({
        let issuer = issuer.clone();
        async move { issuer.issue(Caller::Local(&local()), aws(REPORTS_ROLE, "1h")).await }
    });
    while sts.waiting.load(std::sync::atomic::Ordering::SeqCst) == 0 {
        tokio::task::yield_now().await;
    }
    (gate, pending)
}

#[tokio::test]
async fn a_slow_sts_does_not_hold_up_x509_or_jwt_issuance() {
    let (t, sts) = aws_issuer(None).await;
    let (gate, pending) = aws_issuance_held_at_sts(&t.issuer, &sts).await;
    t.issuer.issue(Caller::Local(&local()), x509("1h")).await.unwrap();
    t.issuer.issue(Caller::Local(&local()), jwt(&["db"], "5m")).await.unwrap();
    assert!(!pending.is_finished(), "the AWS call is still waiting on STS");
    gate.notify_one();
    assert!(pending.await.unwrap().is_ok());
}

#[tokio::test]
async fn a_lock_placed_while_sts_answers_stops_the_session_from_leaving() {
    let (t, sts) = aws_issuer(None).await;
    let (gate, pending) = aws_issuance_held_at_sts(&t.issuer, &sts).await;
    t.revocations.apply_lock(crate::revoke::Lock {
        target: "spiffe://mayfly.local/api".into(),
        until: None,
        reason: "INC-3".into(),
        operator: event::Operator::default(),
    });
    gate.notify_one();
    let err = pending.await.unwrap().unwrap_err();
    assert!(matches!(err, IssueError::Locked { .. }), "{err:?}");
    assert!(t.backend.credentials().is_empty(), "the session STS made was not handed out");
}

#[tokio::test]
async fn a_locked_identity_is_refused_before_policy_and_the_refusal_recorded() {
    let t = issuer(&["unix:uid:1001"], None).await;
    t.revocations.apply_lock(crate::revoke::Lock {
        target: "spiffe://mayfly.local/".into(),
        until: None,
        reason: "INC-9".into(),
        operator: event::Operator::default(),
    });
    let err = t.issuer.issue(Caller::Local(&local()), x509("1h")).await.unwrap_err();
    assert!(matches!(&err, IssueError::Locked { reason, .. } if reason == "INC-9"), "{err:?}");
    let d = decision(&t, 0);
    assert_eq!(d.identity.as_deref(), Some("spiffe://mayfly.local/api"));
    assert!(d.reason.contains("locked"), "{}", d.reason);
}

#[tokio::test]
async fn no_jwt_svid_is_issued_for_the_sts_assertion_audience() {
    // The assertion audience (`db`) is one a rule grants JWT-SVIDs for: the reservation wins.
    let limits = Limits {
        attempts: 1,
        attempt_timeout: Duration::from_secs(5),
        backoff: Duration::from_millis(1),
        max_in_flight: 1,
    };
    let t = IssuerBuilder::new(&["unix:uid:1001"], release(&[]))
        .aws(Arc::new(FakeSts::default()), limits, true)
        .build()
        .await;
    let err = t.issuer.issue(Caller::Local(&local()), jwt(&["db"], "5m")).await.unwrap_err();
    assert!(
        matches!(&err, IssueError::Denied { rules, .. } if rules == &vec![crate::policy::RESERVED_AUDIENCE_RULE.to_owned()]),
        "{err:?}"
    );
    let d = decision(&t, 0);
    assert_eq!(d.rules, [crate::policy::RESERVED_AUDIENCE_RULE]);
    assert!(d.reason.contains("reserved for mayfly's own STS assertions"), "{}", d.reason);
    assert!(t.backend.credentials().is_empty());
}

#[tokio::test]
async fn without_aws_configured_nothing_is_decided() {
    let t = issuer(&["unix:uid:1001"], None).await;
    let err = t.issuer.issue(Caller::Local(&local()), aws(REPORTS_ROLE, "1h")).await.unwrap_err();
    assert!(matches!(err, IssueError::NoAws));
    assert_eq!(crate::api::status(&err).code(), tonic::Code::FailedPrecondition);
    assert!(t.backend.events().is_empty());
}

#[tokio::test]
async fn a_presented_token_without_an_exchange_is_refused_before_anything_is_decided() {
    let t = issuer(&["unix:uid:1001"], None).await;
    let caller = Caller::Presented { token: "eyJ.x.y", remote: "127.0.0.1:9" };
    assert!(matches!(t.issuer.issue(caller, jwt(&["db"], "5m")).await, Err(IssueError::NoExchange)));
    assert!(t.backend.events().is_empty());
}

#[tokio::test]
async fn shadow_mode_records_what_a_candidate_would_change_and_never_acts_on_it() {
    let t = issuer(&["unix:uid:1001"], None).await;
    let wider = r#"
        @id("api-jwt-anything")
        @max_ttl("10m")
        permit (principal, action == Mayfly::Action::"issue_jwt", resource) when { principal.attestation == "unix" };
    "#;
    let candidate = release(&[("issuance/wider.cedar", Some(wider))]);
    let candidate_version = candidate.version().to_owned();
    t.shadow.start(Arc::new(candidate), event::Operator::local(0, 0, None), "try the wider JWT rule").await.unwrap();
    assert_eq!(t.shadow.version().as_deref(), Some(candidate_version.as_str()));

    // Live: denied, as the active release says. The shadow would allow it: recorded only.
    let err = t.issuer.issue(Caller::Local(&local()), jwt(&["payments"], "5m")).await.unwrap_err();
    assert!(matches!(err, IssueError::Denied { .. }), "{err:?}");
    // Same decision under both: nothing recorded.
    t.issuer.issue(Caller::Local(&local()), jwt(&["db"], "5m")).await.unwrap();
    let diff_of = |e: &crate::ledger::StoredEvent| match e.event() {
        Ok(Event::PolicyShadowDiff(d)) => Some(d),
        _ => None,
    };
    let mut diffs = Vec::new();
    for _ in 0..200 {
        diffs = t.backend.events().iter().filter_map(diff_of).collect();
        if !diffs.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(diffs.len(), 1, "one difference");
    let d = &diffs[0];
    assert_eq!((d.change, d.escalation), (event::Change::NewlyAllowed, true));
    assert_eq!(d.candidate, candidate_version);
    assert_eq!(d.resource, "audience payments");
    assert_eq!(d.shadow.rules, ["api-jwt-anything"]);
    assert!(!d.live.allowed);
    let kinds = kinds(&t);
    assert_eq!(
        kinds.iter().filter(|k| *k == EventKind::Issued.as_str()).count(),
        1,
        "only the live allow issued: {kinds:?}"
    );
    assert!(kinds.contains(&EventKind::PolicyShadow.as_str().to_owned()));

    t.shadow.stop(event::Operator::local(0, 0, None), "done").await.unwrap();
    assert!(t.shadow.version().is_none());
}

/// A view of shared state of a fixed age.
struct Aged(Option<Duration>);

impl Freshness for Aged {
    fn check(&self) -> Result<(), Duration> {
        self.0.map_or(Ok(()), Err)
    }
}

#[tokio::test]
async fn a_daemon_whose_view_of_shared_state_is_stale_refuses_and_issues_nothing() {
    let t = issuer(&["unix:uid:1001"], None).await;
    let parts = |t: &TestIssuer| Parts {
        attestor: Arc::new(crate::testing::FakeAttestor::with(&["unix:uid:1001"])),
        policy: t.policy.clone(),
        minters: Minters {
            x509: Arc::new(crate::mint::x509::X509Minter::new(Arc::new(
                crate::keys::CertificateAuthority::generate(
                    &TrustDomain::parse("mayfly.local").unwrap(),
                    t.clock.now(),
                    Duration::from_secs(3600),
                )
                .unwrap(),
            ))),
            jwt: t.jwt.clone(),
            wit: t.wit.clone(),
            aws: None,
        },
        ledger: t.ledger.clone(),
        clock: t.clock.clone(),
        revocations: t.revocations.clone(),
        emergency: t.emergency.clone(),
        shadow: t.shadow.clone(),
        exchange: None,
    };
    let stale = Issuer::new(parts(&t)).with_freshness(Arc::new(Aged(Some(Duration::from_secs(7)))));
    let err = stale.issue(Caller::Local(&local()), x509("1h")).await.unwrap_err();
    assert!(matches!(err, IssueError::Stale { .. }), "{err:?}");
    assert_eq!(crate::api::status(&err).code(), tonic::Code::Unavailable);
    assert!(err.to_string().contains("7 s old") && err.to_string().contains("nothing was issued"), "{err}");
    assert!(t.backend.events().is_empty() && t.backend.credentials().is_empty());
    let fresh = Issuer::new(parts(&t)).with_freshness(Arc::new(Aged(None)));
    fresh.issue(Caller::Local(&local()), x509("1h")).await.unwrap();
}
