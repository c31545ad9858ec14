//! AWS STS sessions: turns an AWS `Grant` into exactly one STS request — the role policy
//! granted, a session name unique to this issuance, the identity as `SourceIdentity` (so
//! CloudTrail names the workload in every call of the session and of roles chained from
//! it), the tags and session policy the rules set, a duration inside both AWS's bounds and
//! the rule's — and sends it with bounded retries. STS and IAM sit behind traits (the SDK
//! implementation is `crate::aws`), so tests check the exact request without AWS.
//!
//! Secrets: the secret key and session token live in `SecretString`s (zeroized on drop)
//! from the moment they leave the SDK's response; nothing here logs or records them.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde_json::{Map, Value, json};
use tokio::sync::Semaphore;

use super::{JwtMinter, MintError};
use crate::aws::{AwsError, AwsSessionRequest, IamApi, StsApi, StsSession};
use crate::identity::WorkloadId;
#[cfg(test)]
use crate::keys::SecretString;
use crate::policy::{Grant, Resource};

/// AWS's floor for `DurationSeconds`.
pub const MIN_SESSION_SECS: u64 = 900;
/// The role maximum assumed when IAM cannot be asked: every role allows at least 1 h.
pub const DEFAULT_ROLE_MAX_SECS: u64 = 3600;
/// How long the web-identity JWT lives: long enough for STS to check it, no longer.
const WEB_IDENTITY_TTL: Duration = Duration::from_secs(300);

/// Why no session was minted.
#[derive(Debug, thiserror::Error)]
pub enum AwsMintError {
    #[error("STS: {0}")]
    Upstream(AwsError),
    #[error("too many AWS requests in flight; try again shortly")]
    Busy,
    #[error("{0}")]
    Grant(String),
    #[error(transparent)]
    Assertion(#[from] MintError),
}

/// How the broker proves itself to STS.
pub enum Mode {
    /// `AssumeRole` with the broker's own AWS credentials.
    AssumeRole,
    /// `AssumeRoleWithWebIdentity` with a JWT signed by mayfly's JWT key.
    WebIdentity { jwt: Arc<dyn JwtMinter>, audience: String },
}

/// Retries and limits for the STS call.
#[derive(Clone, Debug)]
pub struct Limits {
    pub attempts: u32,
    pub attempt_timeout: Duration,
    /// The first backoff; it doubles each try (plus up to half again, random).
    pub backoff: Duration,
    pub max_in_flight: usize,
}

/// A minted session and what the ledger keeps of how it was made.
#[derive(Debug)]
pub struct MintedSession {
    pub session: StsSession,
    pub request: AwsSessionRequest,
    /// `web_identity` or `assume_role`.
    pub mode: &'static str,
    /// The jti of the web-identity JWT presented to STS, if any.
    pub assertion_jti: Option<String>,
    /// How many STS calls it took.
    pub attempts: u32,
}

pub struct AwsMinter {
    sts: Arc<dyn StsApi>,
    iam: Option<Arc<dyn IamApi>>,
    mode: Mode,
    limits: Limits,
    in_flight: Arc<Semaphore>,
    /// Role name → its MaxSessionDuration, asked of IAM at most every 10 minutes.
    role_max: moka::sync::Cache<String, Duration>,
}

impl AwsMinter {
    pub fn new(sts: Arc<dyn StsApi>, iam: Option<Arc<dyn IamApi>>, mode: Mode, limits: Limits) -> Self {
        let in_flight = Arc::new(Semaphore::new(limits.max_in_flight.max(1)));
        let role_max = moka::sync::Cache::builder().max_capacity(10_000).time_to_live(Duration::from_secs(600)).build();
        Self { sts, iam, mode, limits, in_flight, role_max }
    }

    /// The `aud` of the web-identity assertions, in that mode.
    pub fn assertion_audience(&self) -> Option<&str> {
        match &self.mode {
            Mode::WebIdentity { audience, .. } => Some(audience),
            Mode::AssumeRole => None,
        }
    }

    /// The request STS will see for this grant (no STS call).
    pub async fn request_for(&self, grant: &Grant, credential_id: &str) -> Result<AwsSessionRequest, AwsMintError> {
        let (Resource::Aws { role }, Some(aws)) = (grant.resource(), grant.aws()) else {
            return Err(AwsMintError::Grant("not an AWS role grant".into()));
        };
        let wanted = grant.ttl().as_secs().max(MIN_SESSION_SECS);
        if wanted > aws.ceiling.as_secs() {
            return Err(AwsMintError::Grant(format!(
                "the rules allow this role for at most {} but AWS sessions last at least 15m; raise the rule's @max_ttl",
                aws.ceiling
            )));
        }
        let duration = wanted.min(self.role_max(role.account(), role.name()).await.as_secs());
        Ok(AwsSessionRequest {
            role_arn: role.arn().to_owned(),
            role_session_name: session_name(grant.identity(), credential_id),
            source_identity: source_identity(grant.identity()),
            tags: aws.tags.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            policy: aws.session_policy.as_ref().map(|p| p.document.clone()),
            duration_seconds: i32::try_from(duration).unwrap_or(i32::MAX),
        })
    }

    /// One STS session for this grant, or why not. Never waits for a slot: when
    /// `max_in_flight` calls are out, the request is refused at once.
    pub async fn mint(
        &self,
        grant: Grant,
        credential_id: &str,
        now: SystemTime,
    ) -> Result<MintedSession, AwsMintError> {
        let _slot = self.in_flight.clone().try_acquire_owned().map_err(|_| AwsMintError::Busy)?;
        let request = self.request_for(&grant, credential_id).await?;
        let (assertion, mode) = match &self.mode {
            Mode::AssumeRole => (None, "assume_role"),
            Mode::WebIdentity { jwt, audience } => {
                let jti = format!("{credential_id}.sts");
                let token = jwt.mint_assertion(
                    grant.identity(),
                    audience,
                    web_identity_claims(&request),
                    &jti,
                    WEB_IDENTITY_TTL,
                    now,
                )?;
                (Some(token), "web_identity")
            }
        };
        let mut attempt = 0;
        loop {
            attempt += 1;
            let call = async {
                match &assertion {
                    None => self.sts.assume_role(&request).await,
                    Some(token) => self.sts.assume_role_with_web_identity(&request, &token.token).await,
                }
            };
            let operation = if assertion.is_some() { "AssumeRoleWithWebIdentity" } else { "AssumeRole" };
            let outcome = tokio::time::timeout(self.limits.attempt_timeout, call)
                .await
                .unwrap_or(Err(AwsError::Timeout { operation }));
            match outcome {
                Ok(mut session) => {
                    if session.assumed_role_arn.is_empty() {
                        // What STS names the session; revocation finds the role by it.
                        session.assumed_role_arn = assumed_role_arn(&request.role_arn, &request.role_session_name);
                    }
                    return Ok(MintedSession {
                        session,
                        request,
                        mode,
                        assertion_jti: assertion.map(|a| a.jti),
                        attempts: attempt,
                    });
                }
                Err(e) if e.is_transient() && attempt < self.limits.attempts => {
                    tracing::warn!(attempt, code = e.code(), role = %request.role_arn, "STS call failed; retrying");
                    tokio::time::sleep(backoff(self.limits.backoff, attempt)).await;
                }
                Err(e) => return Err(AwsMintError::Upstream(e)),
            }
        }
    }

    async fn role_max(&self, account: &str, role_name: &str) -> Duration {
        let key = format!("{account}:{role_name}");
        if let Some(d) = self.role_max.get(&key) {
            return d;
        }
        let Some(iam) = &self.iam else { return Duration::from_secs(DEFAULT_ROLE_MAX_SECS) };
        // GetRole takes a name and answers for the broker's own account only: a role of
        // another account (a cross-account grant) keeps the 1 h every role allows.
        match tokio::time::timeout(self.limits.attempt_timeout, iam.account()).await {
            Ok(Ok(own)) if own == account => {}
            _ => return Duration::from_secs(DEFAULT_ROLE_MAX_SECS),
        }
        match tokio::time::timeout(self.limits.attempt_timeout, iam.max_session_duration(role_name)).await {
            Ok(Ok(d)) => {
                self.role_max.insert(key, d);
                d
            }
            Ok(Err(e)) => {
                tracing::info!(
                    role = role_name,
                    code = e.code(),
                    "cannot read the role's MaxSessionDuration; assuming 1h"
                );
                Duration::from_secs(DEFAULT_ROLE_MAX_SECS)
            }
            Err(_) => Duration::from_secs(DEFAULT_ROLE_MAX_SECS),
        }
    }
}

/// `arn:<partition>:iam::<account>:role/[path/]<name>` + session → the assumed-role ARN.
fn assumed_role_arn(role_arn: &str, session_name: &str) -> String {
    let parts: Vec<&str> = role_arn.splitn(6, ':').collect();
    let (partition, account) = (parts.get(1).copied().unwrap_or("aws"), parts.get(4).copied().unwrap_or_default());
    let name = role_arn.rsplit('/').next().unwrap_or_default();
    format!("arn:{partition}:sts::{account}:assumed-role/{name}/{session_name}")
}

/// The claims AWS reads from a web-identity token: the source identity and session tags
/// (they cannot be parameters of AssumeRoleWithWebIdentity).
fn web_identity_claims(req: &AwsSessionRequest) -> Map<String, Value> {
    let principal_tags: Map<String, Value> = req.tags.iter().map(|(k, v)| (k.clone(), json!([v]))).collect();
    let mut claims = Map::new();
    claims.insert("https://aws.amazon.com/source_identity".into(), json!(req.source_identity));
    if !principal_tags.is_empty() {
        claims.insert(
            "https://aws.amazon.com/tags".into(),
            json!({ "principal_tags": principal_tags, "transitive_tag_keys": [] }),
        );
    }
    claims
}

fn backoff(base: Duration, attempt: u32) -> Duration {
    let exp = base.saturating_mul(1 << attempt.saturating_sub(1).min(10));
    let mut byte = [0u8; 1];
    // Why ignore a failure: jitter only spreads retries; without it the backoff still holds.
    let _ = aws_lc_rs::rand::fill(&mut byte);
    exp + exp.mul_f64(f64::from(byte[0]) / 512.0)
}

/// Characters AWS allows in a session name and a source identity: `[\w+=,.@-]`.
fn aws_safe(c: char) -> bool {
    c.is_ascii_alphanumeric() || "_+=,.@-".contains(c)
}

/// A stable, AWS-safe form of a SPIFFE ID for `SourceIdentity` (2–64 characters of
/// `[\w+=,.@-]`): the trust domain and path with `/` written `+`, e.g.
/// `spiffe://mayfly.local/ci/acme/app` → `mayfly.local+ci+acme+app`. SPIFFE IDs never
/// contain `+`, so distinct identities stay distinct; one longer than 64 characters keeps
/// its first 47 and adds 16 hex digits of the SHA-256 of the whole ID.
pub fn source_identity(id: &WorkloadId) -> String {
    let text: String = format!("{}{}", id.trust_domain(), id.path())
        .chars()
        .map(|c| {
            if c == '/' {
                '+'
            } else if aws_safe(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    if text.len() <= 64 {
        return text;
    }
    let digest = hex::encode(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, id.as_str().as_bytes()));
    format!("{}-{}", &text[..47], &digest[..16])
}

/// A `RoleSessionName` (2–64 of `[\w+=,.@-]`) unique to this issuance: the identity's path
/// (its most specific end, if long) and 16 hex digits of the credential id, e.g.
/// `ci.acme.app-9a8b0c1d2e3f4a5b`.
pub fn session_name(id: &WorkloadId, credential_id: &str) -> String {
    // The last 16 hex digits: the random end of a UUIDv7 (its first ones are the time).
    let hex: Vec<char> = credential_id.chars().filter(char::is_ascii_hexdigit).collect();
    let unique: String = hex[hex.len().saturating_sub(16)..].iter().collect();
    let path: String = id
        .path()
        .trim_start_matches('/')
        .chars()
        .map(|c| {
            if c == '/' {
                '.'
            } else if aws_safe(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    let room = 64 - 1 - unique.len();
    let start = path.len().saturating_sub(room);
    let tail = &path[start..];
    if tail.is_empty() { format!("mayfly-{unique}") } else { format!("{tail}-{unique}") }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::BoxFuture;
    use crate::identity::Ttl;
    use crate::policy::aws::{AwsGrant, SessionPolicy};
    use crate::testing::FakeSts;

    struct FixedRoleMax(u64);

    impl IamApi for FixedRoleMax {
        fn account(&self) -> BoxFuture<'_, Result<String, AwsError>> {
            Box::pin(async { Ok("111122223333".to_owned()) })
        }
        fn max_session_duration<'a>(&'a self, _: &'a str) -> BoxFuture<'a, Result<Duration, AwsError>> {
            Box::pin(async move { Ok(Duration::from_secs(self.0)) })
        }
        fn put_role_policy<'a>(&'a self, _: &'a str, _: &'a str, _: &'a str) -> BoxFuture<'a, Result<(), AwsError>> {
            Box::pin(async { Ok(()) })
        }
        fn delete_role_policy<'a>(&'a self, _: &'a str, _: &'a str) -> BoxFuture<'a, Result<bool, AwsError>> {
            Box::pin(async { Ok(true) })
        }
    }

    fn id(s: &str) -> WorkloadId {
        WorkloadId::parse(s).unwrap()
    }

    fn limits() -> Limits {
        Limits {
            attempts: 3,
            attempt_timeout: Duration::from_secs(5),
            backoff: Duration::from_millis(1),
            max_in_flight: 4,
        }
    }

    fn grant(ttl_secs: u64, ceiling_secs: u64, policy: Option<&str>) -> Grant {
        let aws = AwsGrant {
            ceiling: Ttl::from_secs(ceiling_secs).unwrap(),
            session_policy: policy.map(|d| SessionPolicy { names: vec!["read-only".into()], document: d.into() }),
            tags: BTreeMap::from([
                ("environment".to_owned(), "ci".to_owned()),
                ("owner".to_owned(), "payments@example.org".to_owned()),
            ]),
        };
        Grant::aws_for_tests(
            id("spiffe://mayfly.local/ci/acme/app"),
            "arn:aws:iam::111122223333:role/ci/acme-app-read",
            Ttl::from_secs(ttl_secs).unwrap(),
            aws,
        )
    }

    const CREDENTIAL: &str = "3f1c9a0b-7d2e-4f61-9a8b-0c1d2e3f4a5b";

    #[tokio::test]
    async fn the_request_carries_exactly_what_the_grant_allows() {
        let sts = Arc::new(FakeSts::default());
        let minter = AwsMinter::new(sts.clone(), Some(Arc::new(FixedRoleMax(7200))), Mode::AssumeRole, limits());
        let doc = r#"{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Action":"s3:GetObject","Resource":"*"}]}"#;
        let minted = minter.mint(grant(1800, 3600, Some(doc)), CREDENTIAL, SystemTime::now()).await.unwrap();
        let sent = &sts.requests.lock().unwrap()[0].0;
        assert_eq!(sent.role_arn, "arn:aws:iam::111122223333:role/ci/acme-app-read");
        assert_eq!(sent.role_session_name, "ci.acme.app-9a8b0c1d2e3f4a5b");
        assert_eq!(sent.source_identity, "mayfly.local+ci+acme+app");
        assert_eq!(
            sent.tags,
            vec![("environment".into(), "ci".into()), ("owner".into(), "payments@example.org".into())]
        );
        assert_eq!(sent.policy.as_deref(), Some(doc));
        assert_eq!(sent.duration_seconds, 1800);
        assert_eq!((minted.mode, minted.attempts, minted.assertion_jti.as_deref()), ("assume_role", 1, None));
        assert_eq!(&minted.request, sent);
    }

    #[tokio::test]
    async fn durations_respect_the_aws_floor_the_rule_and_the_role() {
        let sts = Arc::new(FakeSts::default());
        let minter = AwsMinter::new(sts.clone(), Some(Arc::new(FixedRoleMax(3600))), Mode::AssumeRole, limits());
        // Asked for 5 minutes: AWS's floor is 15, which the rule (1 h) allows.
        minter.mint(grant(300, 3600, None), CREDENTIAL, SystemTime::now()).await.unwrap();
        // Asked for 4 h under a 6 h rule: the role's own maximum (1 h) wins.
        minter.mint(grant(4 * 3600, 6 * 3600, None), CREDENTIAL, SystemTime::now()).await.unwrap();
        let durations: Vec<i32> = sts.requests.lock().unwrap().iter().map(|(r, _)| r.duration_seconds).collect();
        assert_eq!(durations, vec![900, 3600]);
        // A rule that allows only 10 minutes cannot be honoured by STS: nothing is asked.
        let err = minter.mint(grant(300, 600, None), CREDENTIAL, SystemTime::now()).await.unwrap_err();
        assert!(err.to_string().contains("at least 15m"), "{err}");
        assert_eq!(sts.requests.lock().unwrap().len(), 2);
    }

    #[tokio::test]
    async fn without_iam_the_role_is_assumed_to_allow_one_hour() {
        let sts = Arc::new(FakeSts::default());
        let minter = AwsMinter::new(sts.clone(), None, Mode::AssumeRole, limits());
        minter.mint(grant(8 * 3600, 12 * 3600, None), CREDENTIAL, SystemTime::now()).await.unwrap();
        assert_eq!(sts.requests.lock().unwrap()[0].0.duration_seconds, 3600);
    }

    #[tokio::test]
    async fn throttling_is_retried_a_bounded_number_of_times_and_then_reported_with_its_code() {
        let throttled =
            AwsError::Service { operation: "AssumeRole", code: "Throttling".into(), message: "Rate exceeded".into() };
        let sts = Arc::new(FakeSts::default());
        sts.failures.lock().unwrap().extend([throttled.clone(), throttled.clone()]);
        let minter = AwsMinter::new(sts.clone(), None, Mode::AssumeRole, limits());
        let ok = minter.mint(grant(900, 3600, None), CREDENTIAL, SystemTime::now()).await.unwrap();
        assert_eq!(ok.attempts, 3);

        sts.failures.lock().unwrap().extend([throttled.clone(), throttled.clone(), throttled.clone()]);
        let err = minter.mint(grant(900, 3600, None), CREDENTIAL, SystemTime::now()).await.unwrap_err();
        assert!(matches!(&err, AwsMintError::Upstream(e) if e.code() == "Throttling"), "{err}");
        assert_eq!(sts.requests.lock().unwrap().len(), 6, "3 attempts each, never more");

        // A refusal is not retried: asking again cannot change AccessDenied.
        sts.failures.lock().unwrap().push(AwsError::Service {
            operation: "AssumeRole",
            code: "AccessDenied".into(),
            message: "not authorized".into(),
        });
        let err = minter.mint(grant(900, 3600, None), CREDENTIAL, SystemTime::now()).await.unwrap_err();
        assert!(err.to_string().contains("AccessDenied"), "{err}");
        assert_eq!(sts.requests.lock().unwrap().len(), 7);
    }

    #[tokio::test(start_paused = true)]
    async fn a_hung_sts_times_out_per_attempt() {
        struct Hung;
        impl StsApi for Hung {
            fn assume_role<'a>(&'a self, _: &'a AwsSessionRequest) -> BoxFuture<'a, Result<StsSession, AwsError>> {
                Box::pin(std::future::pending())
            }
            fn assume_role_with_web_identity<'a>(
                &'a self,
                _: &'a AwsSessionRequest,
                _: &'a SecretString,
            ) -> BoxFuture<'a, Result<StsSession, AwsError>> {
                Box::pin(std::future::pending())
            }
        }
        let minter = AwsMinter::new(Arc::new(Hung), None, Mode::AssumeRole, limits());
        let err = minter.mint(grant(900, 3600, None), CREDENTIAL, SystemTime::now()).await.unwrap_err();
        assert!(matches!(&err, AwsMintError::Upstream(AwsError::Timeout { .. })), "{err}");
    }

    #[tokio::test]
    async fn calls_beyond_the_in_flight_limit_are_refused_not_queued() {
        struct Gate(tokio::sync::Notify);
        impl StsApi for Gate {
            fn assume_role<'a>(&'a self, _: &'a AwsSessionRequest) -> BoxFuture<'a, Result<StsSession, AwsError>> {
                Box::pin(async move {
                    self.0.notified().await;
                    Err(AwsError::Service { operation: "AssumeRole", code: "AccessDenied".into(), message: "x".into() })
                })
            }
            fn assume_role_with_web_identity<'a>(
                &'a self,
                r: &'a AwsSessionRequest,
                _: &'a SecretString,
            ) -> BoxFuture<'a, Result<StsSession, AwsError>> {
                self.assume_role(r)
            }
        }
        let gate = Arc::new(Gate(tokio::sync::Notify::new()));
        let minter =
            Arc::new(AwsMinter::new(gate.clone(), None, Mode::AssumeRole, Limits { max_in_flight: 1, ..limits() }));
        let first = tokio::spawn({
            let minter = minter.clone();
            async move { minter.mint(grant(900, 3600, None), CREDENTIAL, SystemTime::now()).await }
        });
        while minter.in_flight.available_permits() > 0 {
            tokio::task::yield_now().await;
        }
        let second = minter.mint(grant(900, 3600, None), CREDENTIAL, SystemTime::now()).await.unwrap_err();
        assert!(matches!(second, AwsMintError::Busy), "{second}");
        gate.0.notify_one();
        assert!(first.await.unwrap().is_err());
    }

    #[tokio::test]
    async fn web_identity_presents_a_mayfly_jwt_carrying_source_identity_and_tags() {
        let jwt = Arc::new(
            crate::mint::jwt::Es256Minter::new(
                crate::keys::JwtKey::generate().unwrap(),
                crate::identity::TrustDomain::parse("mayfly.local").unwrap(),
            )
            .unwrap()
            .with_issuer(Some("https://mayfly.example.org".into())),
        );
        let sts = Arc::new(FakeSts::default());
        let mode = Mode::WebIdentity { jwt: jwt.clone(), audience: "sts.amazonaws.com".into() };
        let minter = AwsMinter::new(sts.clone(), None, mode, limits());
        let now = SystemTime::now();
        let minted = minter.mint(grant(900, 3600, None), CREDENTIAL, now).await.unwrap();
        let (sent, token) = sts.requests.lock().unwrap()[0].clone();
        let token = token.expect("a token was presented");
        let claims = jwt.validate_jwt(&token, Some("sts.amazonaws.com"), now).unwrap().claims;
        assert_eq!(claims["sub"], "spiffe://mayfly.local/ci/acme/app");
        assert_eq!(claims["iss"], "https://mayfly.example.org");
        assert_eq!(claims["https://aws.amazon.com/source_identity"], "mayfly.local+ci+acme+app");
        assert_eq!(claims["https://aws.amazon.com/tags"]["principal_tags"]["owner"], json!(["payments@example.org"]));
        assert!(
            claims["exp"].as_i64().unwrap() - claims["iat"].as_i64().unwrap() <= 300,
            "the assertion is short-lived"
        );
        assert_eq!(minted.assertion_jti.as_deref(), Some(format!("{CREDENTIAL}.sts").as_str()));
        assert_eq!((minted.mode, sent.source_identity.as_str()), ("web_identity", "mayfly.local+ci+acme+app"));
    }

    #[test]
    fn names_are_aws_safe_bounded_and_distinct() {
        let allowed = |s: &str| s.chars().all(aws_safe) && (2..=64).contains(&s.len());
        let long = id(&format!("spiffe://mayfly.local/{}", ["team", "service", "component"].repeat(8).join("/")));
        for w in [id("spiffe://mayfly.local/ci/acme/app"), id("spiffe://a/b"), long.clone()] {
            assert!(allowed(&source_identity(&w)), "{}", source_identity(&w));
            assert!(allowed(&session_name(&w, CREDENTIAL)), "{}", session_name(&w, CREDENTIAL));
        }
        assert_eq!(source_identity(&long).len(), 64);
        let other_long = id(&format!("{}x", long.as_str()));
        assert_ne!(source_identity(&long), source_identity(&other_long));
        assert!(session_name(&long, CREDENTIAL).ends_with("component-9a8b0c1d2e3f4a5b"), "keeps the most specific end");
        assert_ne!(session_name(&long, CREDENTIAL), session_name(&long, "99999999-0000-4000-8000-000000000000"));
        assert_eq!(
            source_identity(&id("spiffe://mayfly.local/ci/acme/app")),
            source_identity(&id("spiffe://mayfly.local/ci/acme/app")),
            "stable"
        );
    }

    #[test]
    fn secrets_stay_out_of_debug_output() {
        let s = StsSession {
            access_key_id: "ASIAFAKE".into(),
            secret_access_key: SecretString::new("wJalrXUtnFEMI/K7MDENG".into()),
            session_token: SecretString::new("FwoGZXIvYXdzEJr".into()),
            expiration: SystemTime::UNIX_EPOCH,
            assumed_role_arn: "arn:aws:sts::111122223333:assumed-role/r/s".into(),
        };
        let text = format!("{s:?}");
        assert!(!text.contains("wJalr") && !text.contains("FwoGZ") && text.contains("ASIAFAKE"), "{text}");
    }
}
