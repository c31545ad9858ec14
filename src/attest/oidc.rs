//! OIDC id-token attestation for callers that are not on this host (CI runners: GitHub
//! Actions, GitLab CI, any OIDC issuer). A token is accepted only from a configured issuer
//! (exact `iss`), signed with an allowed asymmetric algorithm by a key from that issuer's
//! JWKS, for a configured audience, inside its lifetime (with a small skew), and only once
//! (a replay cache keyed by issuer + `jti`, or the token's hash, until the token expires).
//! Its claims become selectors and typed Cedar context, with the CI platforms' immutable
//! ids (GitHub `repository_id`/`repository_owner_id`, GitLab `project_id`/`namespace_id`)
//! beside the names; both GitHub subject formats (`repo:OWNER/REPO:…` and the immutable
//! `repo:OWNER@OWNER_ID/REPO@REPO_ID:…`) are parsed and must agree with those claims. Keys are fetched through the
//! issuer's discovery document and cached (moka); an unknown `kid` refreshes them at most
//! once per `REFRESH_MIN_INTERVAL` per issuer. Knows nothing of policy or minting.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use base64::Engine;
use jsonwebtoken::jwk::{AlgorithmParameters, JwkSet};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::{Map, Value};

use crate::clock::unix_secs;
use crate::identity::{OidcClaims, Selector, Selectors};
use crate::ledger::BoxFuture;
use crate::ledger::event::Provenance;

/// Tokens longer than this are refused before parsing.
pub const MAX_TOKEN_BYTES: usize = 16 * 1024;
/// A token valid for longer than this from now is refused: CI tokens live minutes.
pub const MAX_TOKEN_LIFETIME: Duration = Duration::from_secs(24 * 3600);
/// How long fetched keys are trusted before they are fetched again.
pub const KEYS_TTL: Duration = Duration::from_secs(600);
/// An unknown `kid` refreshes an issuer's keys at most this often, so a flood of tokens
/// with made-up kids cannot make mayfly hammer the issuer.
pub const REFRESH_MIN_INTERVAL: Duration = Duration::from_secs(30);
/// Largest discovery document or JWKS accepted.
pub const MAX_DOCUMENT_BYTES: usize = 1024 * 1024;

#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum OidcError {
    #[error("the token is malformed: {0}")]
    Malformed(String),
    #[error("the token's issuer `{0}` is not trusted here")]
    UnknownIssuer(String),
    #[error("the token's algorithm `{0}` is not allowed for this issuer")]
    Algorithm(String),
    #[error("the token's kid is malformed")]
    BadKid,
    #[error("no key of the issuer matches the token's kid")]
    UnknownKey,
    #[error("the token's signature does not verify")]
    Signature,
    #[error("the token is not for an audience this broker accepts")]
    Audience,
    #[error("the token expired at {0}")]
    Expired(i64),
    #[error("the token is not valid before {0}")]
    NotYetValid(i64),
    #[error("the token was issued in the future ({0})")]
    IssuedInFuture(i64),
    #[error("the token lives longer than {} h", MAX_TOKEN_LIFETIME.as_secs() / 3600)]
    TooLongLived,
    #[error("the token's type `{0}` is not an id-token (JWT)")]
    Type(String),
    #[error("the token was already used (replay)")]
    Replayed,
    #[error("the issuer's keys cannot be fetched: {0}")]
    Unavailable(String),
}

/// One trusted issuer, as configured.
#[derive(Clone, Debug)]
pub struct IssuerConfig {
    /// Exact `iss` value, e.g. `https://token.actions.githubusercontent.com`.
    pub issuer: String,
    /// The token's `aud` must contain one of these.
    pub audiences: Vec<String>,
    /// Asymmetric algorithms only (checked at configuration).
    pub algorithms: Vec<Algorithm>,
    pub clock_skew: Duration,
    /// Which claims become selectors (`oidc:<key>:<value>`); `iss` and `sub` always do.
    pub selector_claims: BTreeSet<String>,
    /// `mayfly dev --oidc-issuer`: a verified token that matches no inventory entry gets
    /// the dev identity `spiffe://<td>/dev/oidc/<sub>`. Never set by `serve`.
    pub dev_fallback: bool,
}

/// Algorithms an issuer may be configured with: asymmetric only. `none` and the HMAC
/// family are never accepted (an HMAC "verified" with a public key is a forgery).
pub fn parse_algorithm(name: &str) -> Result<Algorithm, String> {
    let alg: Algorithm = name.parse().map_err(|_| format!("unknown algorithm `{name}`"))?;
    match alg {
        Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512 => {
            Err(format!("`{name}` is symmetric; only asymmetric algorithms are allowed"))
        }
        _ => Ok(alg),
    }
}

/// A verified id-token: who the caller is, as the issuer vouches.
#[derive(Clone, Debug)]
pub struct VerifiedToken {
    pub claims: OidcClaims,
    pub selectors: Selectors,
    /// What an auditor needs to trace a credential to the run that asked for it
    /// (issuer, subject, repository, ref, sha, workflow, run), for the ledger.
    pub provenance: Provenance,
    pub dev_fallback: bool,
}

/// Where an issuer's keys come from (HTTPS in production; a fake in unit tests).
pub trait KeySource: Send + Sync + 'static {
    fn fetch(&self, issuer: &str) -> BoxFuture<'_, Result<JwkSet, OidcError>>;
}

/// Discovery (`/.well-known/openid-configuration`) then `jwks_uri`, over HTTPS; plain
/// HTTP only for loopback issuers (tests). Bounded in time and size.
pub struct HttpKeySource {
    client: reqwest::Client,
}

impl HttpKeySource {
    pub fn new() -> Result<Self, OidcError> {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .connect_timeout(Duration::from_secs(3))
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| OidcError::Unavailable(e.to_string()))?;
        Ok(Self { client })
    }

    async fn get_json(&self, url: &str) -> Result<Value, OidcError> {
        check_fetch_url(url)?;
        let mut response =
            self.client.get(url).send().await.map_err(|e| OidcError::Unavailable(format!("`{url}`: {e}")))?;
        if !response.status().is_success() {
            return Err(OidcError::Unavailable(format!("`{url}` answered {}", response.status())));
        }
        let mut body = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(|e| OidcError::Unavailable(format!("`{url}`: {e}")))? {
            body.extend_from_slice(&chunk);
            if body.len() > MAX_DOCUMENT_BYTES {
                return Err(OidcError::Unavailable(format!("`{url}` is larger than {MAX_DOCUMENT_BYTES} bytes")));
            }
        }
        serde_json::from_slice(&body).map_err(|e| OidcError::Unavailable(format!("`{url}` is not JSON: {e}")))
    }
}

impl KeySource for HttpKeySource {
    fn fetch(&self, issuer: &str) -> BoxFuture<'_, Result<JwkSet, OidcError>> {
        let discovery = format!("{}/.well-known/openid-configuration", issuer.trim_end_matches('/'));
        let issuer = issuer.to_owned();
        Box::pin(async move {
            let doc = self.get_json(&discovery).await?;
            if doc.get("issuer").and_then(Value::as_str) != Some(issuer.as_str()) {
                return Err(OidcError::Unavailable(format!(
                    "the discovery document of `{issuer}` names another issuer"
                )));
            }
            let jwks_uri = doc
                .get("jwks_uri")
                .and_then(Value::as_str)
                .ok_or_else(|| OidcError::Unavailable("no jwks_uri in discovery".into()))?;
            let jwks = self.get_json(jwks_uri).await?;
            serde_json::from_value(jwks).map_err(|e| OidcError::Unavailable(format!("`{jwks_uri}` is not a JWKS: {e}")))
        })
    }
}

/// HTTPS, or HTTP to a loopback host (tests run issuers on 127.0.0.1).
pub fn check_fetch_url(url: &str) -> Result<(), OidcError> {
    let parsed = reqwest::Url::parse(url).map_err(|e| OidcError::Unavailable(format!("`{url}`: {e}")))?;
    let loopback = match parsed.host() {
        Some(url::Host::Domain(d)) => d == "localhost",
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        None => false,
    };
    match parsed.scheme() {
        "https" => Ok(()),
        "http" if loopback => Ok(()),
        _ => Err(OidcError::Unavailable(format!(
            "`{url}`: keys are fetched over HTTPS only (plain HTTP for loopback issuers)"
        ))),
    }
}

/// Where a presented token is accepted once: this daemon's memory, or — several daemons
/// sharing a ledger — one unique row they all see.
pub trait ReplayGuard: Send + Sync + 'static {
    /// `Ok(true)` the first time `key` is presented before `until`.
    fn first_use<'a>(&'a self, key: &'a str, until: SystemTime) -> crate::BoxFuture<'a, Result<bool, String>>;
}

/// The single-daemon replay cache: issuer + jti (or token hash) → seen, each entry living
/// until its token's expiry.
pub struct MemoryReplay {
    seen: moka::sync::Cache<String, Duration>,
}

impl Default for MemoryReplay {
    fn default() -> Self {
        // Why this large: evicting a live entry would let its token be replayed; at
        // ~150 bytes an entry this bounds the cache near 150 MB, far above CI volume.
        Self { seen: moka::sync::Cache::builder().max_capacity(1_000_000).expire_after(UntilTokenExpiry).build() }
    }
}

impl ReplayGuard for MemoryReplay {
    fn first_use<'a>(&'a self, key: &'a str, until: SystemTime) -> crate::BoxFuture<'a, Result<bool, String>> {
        let remaining = until.duration_since(SystemTime::now()).unwrap_or_default().max(Duration::from_secs(1));
        let fresh = self.seen.entry(key.to_owned()).or_insert_with(|| remaining).is_fresh();
        Box::pin(async move { Ok(fresh) })
    }
}

pub struct OidcVerifier {
    /// Swapped whole on a reload (`set_issuers`); a verification uses one snapshot.
    issuers: arc_swap::ArcSwap<HashMap<String, IssuerConfig>>,
    source: Arc<dyn KeySource>,
    keys: moka::sync::Cache<String, Arc<JwkSet>>,
    last_refresh: Mutex<HashMap<String, Instant>>,
    replay: Arc<dyn ReplayGuard>,
}

struct UntilTokenExpiry;

impl moka::Expiry<String, Duration> for UntilTokenExpiry {
    fn expire_after_create(&self, _key: &String, value: &Duration, _created_at: Instant) -> Option<Duration> {
        Some(*value)
    }
}

impl OidcVerifier {
    pub fn new(issuers: Vec<IssuerConfig>, source: Arc<dyn KeySource>) -> Self {
        Self {
            issuers: arc_swap::ArcSwap::from_pointee(issuers.into_iter().map(|c| (c.issuer.clone(), c)).collect()),
            source,
            keys: moka::sync::Cache::builder().max_capacity(1024).time_to_live(KEYS_TTL).build(),
            last_refresh: Mutex::new(HashMap::new()),
            replay: Arc::new(MemoryReplay::default()),
        }
    }

    /// Accepts each token once through `replay` (shared by several daemons).
    pub fn with_replay(mut self, replay: Arc<dyn ReplayGuard>) -> Self {
        self.replay = replay;
        self
    }

    pub fn is_empty(&self) -> bool {
        self.issuers.load().is_empty()
    }

    /// Trusts exactly these issuers from now on (a reload). Tokens of an issuer no longer
    /// listed are refused from the next request; cached keys of listed ones are kept.
    pub fn set_issuers(&self, issuers: Vec<IssuerConfig>) {
        self.issuers.store(std::sync::Arc::new(issuers.into_iter().map(|c| (c.issuer.clone(), c)).collect()));
    }

    /// The `iss` a token claims, read without verifying anything: for the ledger only.
    pub fn claimed_issuer(token: &str) -> Option<String> {
        unverified_claims(token).ok()?.get("iss")?.as_str().map(|s| s.chars().take(256).collect())
    }

    pub async fn verify(&self, token: &str, now: SystemTime) -> Result<VerifiedToken, OidcError> {
        if token.len() > MAX_TOKEN_BYTES {
            return Err(OidcError::Malformed(format!("longer than {MAX_TOKEN_BYTES} bytes")));
        }
        let header = jsonwebtoken::decode_header(token)
            .map_err(|_| OidcError::Malformed("not a JWS (header.payload.signature, base64url JSON)".into()))?;
        // Only the issuer is read before the signature is checked, to pick its keys; an
        // unconfigured issuer is refused without any network request.
        let claimed = unverified_claims(token)?;
        let iss = claimed.get("iss").and_then(Value::as_str).ok_or_else(|| OidcError::Malformed("no `iss`".into()))?;
        let issuers = self.issuers.load_full();
        let config = issuers.get(iss).ok_or_else(|| OidcError::UnknownIssuer(iss.chars().take(256).collect()))?;
        if !config.algorithms.contains(&header.alg) {
            return Err(OidcError::Algorithm(format!("{:?}", header.alg)));
        }
        if let Some(typ) = header.typ.as_ref().filter(|t| !t.eq_ignore_ascii_case("JWT")) {
            return Err(OidcError::Type(typ.chars().take(64).collect()));
        }
        let kid = match &header.kid {
            Some(kid) if kid_is_sane(kid) => Some(kid.as_str()),
            Some(_) => return Err(OidcError::BadKid),
            None => None,
        };
        let key = self.key_for(config, kid, header.alg).await?;

        let mut validation = Validation::new(header.alg);
        // Why: time comes from the injected clock, with the issuer's skew, checked below.
        validation.validate_exp = false;
        validation.validate_nbf = false;
        validation.leeway = 0;
        validation.set_issuer(&[config.issuer.as_str()]);
        validation.set_audience(&config.audiences);
        validation.required_spec_claims = ["exp", "iss", "aud", "sub"].into_iter().map(String::from).collect();
        let data =
            jsonwebtoken::decode::<Map<String, Value>>(token, &key, &validation).map_err(|e| match e.kind() {
                jsonwebtoken::errors::ErrorKind::InvalidSignature => OidcError::Signature,
                jsonwebtoken::errors::ErrorKind::InvalidAudience => OidcError::Audience,
                jsonwebtoken::errors::ErrorKind::InvalidAlgorithm => OidcError::Algorithm(format!("{:?}", header.alg)),
                _ => OidcError::Malformed(e.to_string()),
            })?;
        let claims = data.claims;

        let now_secs = unix_secs(now);
        let skew = i64::try_from(config.clock_skew.as_secs()).unwrap_or(60);
        let number = |name: &str| claims.get(name).and_then(Value::as_i64);
        let exp = number("exp").ok_or_else(|| OidcError::Malformed("`exp` is not a number".into()))?;
        if now_secs > exp + skew {
            return Err(OidcError::Expired(exp));
        }
        if let Some(nbf) = number("nbf").filter(|nbf| *nbf > now_secs + skew) {
            return Err(OidcError::NotYetValid(nbf));
        }
        if let Some(iat) = number("iat").filter(|iat| *iat > now_secs + skew) {
            return Err(OidcError::IssuedInFuture(iat));
        }
        let max_life = i64::try_from(MAX_TOKEN_LIFETIME.as_secs()).unwrap_or(i64::MAX);
        if exp - now_secs > max_life {
            return Err(OidcError::TooLongLived);
        }

        let verified = map_claims(config, &claims)?;
        // Replay: the first verified presentation wins; the entry lives until the token
        // could no longer be accepted anyway.
        let id = match claims.get("jti").and_then(Value::as_str) {
            Some(jti) => format!("jti:{jti}"),
            None => format!(
                "sha256:{}",
                hex::encode(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, token.as_bytes()))
            ),
        };
        let remaining = Duration::from_secs(u64::try_from(exp + skew - now_secs).unwrap_or(0).max(1));
        match self.replay.first_use(&format!("{iss}\u{0}{id}"), SystemTime::now() + remaining).await {
            Ok(true) => Ok(verified),
            Ok(false) => Err(OidcError::Replayed),
            Err(e) => Err(OidcError::Unavailable(format!("the replay cache cannot be checked: {e}"))),
        }
    }

    async fn key_for(
        &self,
        config: &IssuerConfig,
        kid: Option<&str>,
        alg: Algorithm,
    ) -> Result<DecodingKey, OidcError> {
        let cached = self.keys.get(&config.issuer);
        let keys = match cached {
            Some(keys) if find(&keys, kid).is_some() => keys,
            _ => {
                // Unknown kid (or nothing cached): refresh, rate-limited per issuer.
                let allowed = {
                    let mut last = self.last_refresh.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                    let now = Instant::now();
                    let ok = last.get(&config.issuer).is_none_or(|t| now.duration_since(*t) >= REFRESH_MIN_INTERVAL);
                    if ok {
                        last.insert(config.issuer.clone(), now);
                    }
                    ok
                };
                match (allowed, self.keys.get(&config.issuer)) {
                    (true, _) | (false, None) => {
                        let fresh = Arc::new(self.source.fetch(&config.issuer).await?);
                        self.keys.insert(config.issuer.clone(), fresh.clone());
                        fresh
                    }
                    (false, Some(keys)) => keys,
                }
            }
        };
        let jwk = find(&keys, kid).ok_or(OidcError::UnknownKey)?;
        if matches!(jwk.algorithm, AlgorithmParameters::OctetKey(_)) {
            return Err(OidcError::UnknownKey);
        }
        if jwk.common.key_algorithm.is_some_and(|key_alg| format!("{key_alg:?}") != format!("{alg:?}")) {
            return Err(OidcError::Algorithm(format!("{alg:?}")));
        }
        DecodingKey::from_jwk(jwk).map_err(|_| OidcError::UnknownKey)
    }
}

fn find<'a>(keys: &'a JwkSet, kid: Option<&str>) -> Option<&'a jsonwebtoken::jwk::Jwk> {
    match kid {
        Some(kid) => keys.find(kid),
        // No kid: only unambiguous when the issuer has exactly one key.
        None if keys.keys.len() == 1 => keys.keys.first(),
        None => None,
    }
}

/// Key ids are opaque but short and plain; anything else (paths, URLs, control
/// characters) is refused before it is compared with anything. Never used to build a URL.
fn kid_is_sane(kid: &str) -> bool {
    !kid.is_empty()
        && kid.len() <= 256
        && kid.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.=+/".contains(&b))
        && !kid.contains("..")
        && !kid.contains("//")
}

fn unverified_claims(token: &str) -> Result<Map<String, Value>, OidcError> {
    let payload = token.split('.').nth(1).ok_or_else(|| OidcError::Malformed("not a compact JWS".into()))?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .map_err(|_| OidcError::Malformed("the payload is not base64url".into()))?;
    serde_json::from_slice(&bytes).map_err(|_| OidcError::Malformed("the payload is not a JSON object".into()))
}

/// Maps raw claims (GitHub Actions and GitLab CI shapes) to the typed claims policy sees.
fn map_claims(config: &IssuerConfig, claims: &Map<String, Value>) -> Result<VerifiedToken, OidcError> {
    let text = |name: &str| -> Option<String> {
        match claims.get(name)? {
            Value::String(s) if !s.is_empty() && s.len() <= 1024 && !s.chars().any(char::is_control) => Some(s.clone()),
            Value::Number(n) => Some(n.to_string()),
            Value::Bool(b) => Some(b.to_string()),
            _ => None,
        }
    };
    let subject = text("sub").ok_or_else(|| OidcError::Malformed("`sub` is missing or not a string".into()))?;
    // GitLab: project_path / namespace_path, `ref` is a bare branch or tag name.
    let gitlab = claims.contains_key("project_path");
    let ref_type = text("ref_type");
    let git_ref = text("ref").map(|r| match (gitlab, ref_type.as_deref()) {
        (true, Some("branch")) if !r.starts_with("refs/") => format!("refs/heads/{r}"),
        (true, Some("tag")) if !r.starts_with("refs/") => format!("refs/tags/{r}"),
        _ => r,
    });
    let id = |name: &str| -> Result<Option<String>, OidcError> {
        match text(name) {
            Some(v) if crate::identity::is_numeric_id(&v) => Ok(Some(v)),
            Some(v) => Err(OidcError::Malformed(format!("`{name}` `{}` is not a numeric id", v.escape_debug()))),
            None => Ok(None),
        }
    };
    let mut oidc = OidcClaims {
        issuer: config.issuer.clone(),
        subject,
        repository: text("repository").or_else(|| text("project_path")),
        repository_owner: text("repository_owner").or_else(|| text("namespace_path")),
        repository_id: id("repository_id")?,
        repository_owner_id: id("repository_owner_id")?,
        project_id: id("project_id")?,
        namespace_id: id("namespace_id")?,
        git_ref,
        ref_type,
        environment: text("environment"),
        workflow_ref: text("job_workflow_ref").or_else(|| text("workflow_ref")).or_else(|| text("ci_config_ref_uri")),
        event_name: text("event_name").or_else(|| text("pipeline_source")),
        sha: text("sha"),
        run_id: text("run_id").or_else(|| text("pipeline_id")),
        ref_protected: text("ref_protected"),
    };
    let subject = oidc.subject.clone();
    if !gitlab && let Some(sub) = GithubSubject::parse(&subject)? {
        sub.reconcile(&mut oidc)?;
    }
    let selectors = oidc
        .selectors()
        .into_iter()
        .filter(|s| {
            let key = s.as_str().split(':').nth(1).unwrap_or_default();
            key == "iss" || key == "sub" || config.selector_claims.contains(key)
        })
        .collect::<BTreeSet<Selector>>();
    let provenance = Provenance {
        issuer: Some(oidc.issuer.clone()),
        subject: Some(oidc.subject.clone()),
        repository: oidc.repository.clone(),
        git_ref: oidc.git_ref.clone(),
        sha: oidc.sha.clone(),
        workflow: oidc.workflow_ref.clone(),
        run_id: oidc.run_id.clone(),
        event_name: oidc.event_name.clone(),
        environment: oidc.environment.clone(),
        jti: claims.get("jti").and_then(Value::as_str).map(str::to_owned),
    };
    Ok(VerifiedToken { claims: oidc, selectors, provenance, dev_fallback: config.dev_fallback })
}

/// What a GitHub Actions `sub` says about the repository, in either format:
/// `repo:OWNER/REPO:<context>` or, the default for repositories created, renamed or
/// transferred since 2026-07-15, `repo:OWNER@OWNER_ID/REPO@REPO_ID:<context>`.
#[derive(Debug, PartialEq, Eq)]
pub struct GithubSubject<'a> {
    pub owner: &'a str,
    pub repo: &'a str,
    /// Both ids, in the immutable format; `None` in the name format.
    pub ids: Option<(&'a str, &'a str)>,
}

impl<'a> GithubSubject<'a> {
    /// `Ok(None)` for a subject that is not `repo:…` (a customised template: nothing to
    /// check it against); an error for a `repo:` subject in neither format.
    pub fn parse(sub: &'a str) -> Result<Option<Self>, OidcError> {
        let Some(rest) = sub.strip_prefix("repo:") else { return Ok(None) };
        let bad = || OidcError::Malformed(format!("`sub` `{}` is in neither GitHub format", sub.escape_debug()));
        // Owner and repository names never hold `:` (nor `/` or `@`); the context follows.
        let path = rest.split(':').next().unwrap_or_default();
        let (owner, repo) = path.split_once('/').ok_or_else(bad)?;
        let split_id = |part: &'a str| match part.split_once('@') {
            Some((name, id)) if crate::identity::is_numeric_id(id) => Some((name, Some(id))),
            Some(_) => None,
            None => Some((part, None)),
        };
        let ((owner, owner_id), (repo, repo_id)) = (split_id(owner).ok_or_else(bad)?, split_id(repo).ok_or_else(bad)?);
        let name_ok = |n: &str| !n.is_empty() && !n.contains('/');
        if !name_ok(owner) || !name_ok(repo) {
            return Err(bad());
        }
        let ids = match (owner_id, repo_id) {
            (Some(o), Some(r)) => Some((o, r)),
            (None, None) => None,
            // One id without the other is neither format.
            _ => return Err(bad()),
        };
        Ok(Some(Self { owner, repo, ids }))
    }

    /// The subject and the claims must name the same repository; ids the claims lack are
    /// taken from the immutable subject.
    fn reconcile(&self, oidc: &mut OidcClaims) -> Result<(), OidcError> {
        let disagree = |what: &str, sub: &str, claim: &str| {
            Err(OidcError::Malformed(format!("`sub` names {what} `{sub}` but the `{what}` claim says `{claim}`")))
        };
        let full = format!("{}/{}", self.owner, self.repo);
        if let Some(claim) = oidc.repository.as_deref().filter(|c| !c.eq_ignore_ascii_case(&full)) {
            return disagree("repository", &full, claim);
        }
        if let Some(claim) = oidc.repository_owner.as_deref().filter(|c| !c.eq_ignore_ascii_case(self.owner)) {
            return disagree("repository_owner", self.owner, claim);
        }
        if let Some((owner_id, repo_id)) = self.ids {
            for (what, from_sub, claim) in [
                ("repository_owner_id", owner_id, &mut oidc.repository_owner_id),
                ("repository_id", repo_id, &mut oidc.repository_id),
            ] {
                match claim.as_deref() {
                    Some(c) if c != from_sub => return disagree(what, from_sub, c),
                    Some(_) => {}
                    None => *claim = Some(from_sub.to_owned()),
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use jsonwebtoken::{EncodingKey, Header};
    use serde_json::json;

    use super::*;
    use crate::keys::JwtKey;

    const ISS: &str = "https://token.actions.githubusercontent.com";

    /// Serves fixed keys and counts fetches.
    struct FixedKeys {
        keys: JwkSet,
        fetches: std::sync::atomic::AtomicUsize,
    }

    impl KeySource for FixedKeys {
        fn fetch(&self, _issuer: &str) -> BoxFuture<'_, Result<JwkSet, OidcError>> {
            self.fetches.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let keys = self.keys.clone();
            Box::pin(async move { Ok(keys) })
        }
    }

    struct Fixture {
        key: JwtKey,
        verifier: OidcVerifier,
        source: Arc<FixedKeys>,
        now: SystemTime,
    }

    fn fixture() -> Fixture {
        let key = JwtKey::generate().unwrap();
        let (x, y) = key.public_xy();
        let jwks: JwkSet = serde_json::from_value(json!({ "keys": [{ "kty": "EC", "crv": "P-256", "x": x, "y": y, "kid": key.kid(), "alg": "ES256", "use": "sig" }] })).unwrap();
        let source = Arc::new(FixedKeys { keys: jwks, fetches: Default::default() });
        let config = IssuerConfig {
            issuer: ISS.into(),
            audiences: vec!["mayfly".into()],
            algorithms: vec![Algorithm::ES256, Algorithm::RS256],
            clock_skew: Duration::from_secs(60),
            selector_claims: [
                "repository",
                "ref",
                "environment",
                "event_name",
                "repository_id",
                "repository_owner_id",
                "project_id",
                "namespace_id",
            ]
            .into_iter()
            .map(String::from)
            .collect(),
            dev_fallback: false,
        };
        let verifier = OidcVerifier::new(vec![config], source.clone());
        Fixture { key, verifier, source, now: SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000) }
    }

    impl Fixture {
        fn claims(&self) -> Value {
            let now = unix_secs(self.now);
            json!({
                "iss": ISS, "aud": "mayfly", "sub": "repo:acme/app:ref:refs/heads/main", "exp": now + 300, "iat": now, "nbf": now,
                "jti": format!("{}", uuid::Uuid::new_v4()), "repository": "acme/app", "repository_owner": "acme",
                "repository_id": "892735111", "repository_owner_id": "1342004",
                "ref": "refs/heads/main", "ref_type": "branch", "event_name": "push", "sha": "0123abcd",
                "job_workflow_ref": "acme/app/.github/workflows/deploy.yml@refs/heads/main", "run_id": "42"
            })
        }

        fn sign(&self, claims: &Value) -> String {
            let mut header = Header::new(Algorithm::ES256);
            header.kid = Some(self.key.kid().into());
            jsonwebtoken::encode(&header, claims, &EncodingKey::from_ec_der(self.key.pkcs8_der())).unwrap()
        }

        async fn verify(&self, token: &str) -> Result<VerifiedToken, OidcError> {
            self.verifier.verify(token, self.now).await
        }
    }

    fn b64(v: &Value) -> String {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
    }

    #[tokio::test]
    async fn a_github_token_becomes_claims_selectors_and_provenance() {
        let f = fixture();
        let v = f.verify(&f.sign(&f.claims())).await.unwrap();
        assert_eq!(v.claims.repository.as_deref(), Some("acme/app"));
        assert_eq!(v.claims.git_ref.as_deref(), Some("refs/heads/main"));
        assert_eq!(v.claims.workflow_ref.as_deref(), Some("acme/app/.github/workflows/deploy.yml@refs/heads/main"));
        let sel: Vec<&str> = v.selectors.iter().map(Selector::as_str).collect();
        assert!(
            sel.contains(&"oidc:repository:acme/app")
                && sel.contains(&"oidc:ref:refs/heads/main")
                && sel.contains(&format!("oidc:iss:{ISS}").as_str())
        );
        assert!(!sel.iter().any(|s| s.starts_with("oidc:sha:")), "only configured claims become selectors");
        assert_eq!(v.provenance.sha.as_deref(), Some("0123abcd"));
        assert_eq!(v.provenance.run_id.as_deref(), Some("42"));
    }

    #[tokio::test]
    async fn both_github_subject_formats_are_read_and_must_agree_with_the_id_claims() {
        let f = fixture();
        let v = f.verify(&f.sign(&f.claims())).await.unwrap();
        assert_eq!(v.claims.repository_id.as_deref(), Some("892735111"));
        assert_eq!(v.claims.repository_owner_id.as_deref(), Some("1342004"));
        let sel: Vec<&str> = v.selectors.iter().map(Selector::as_str).collect();
        assert!(sel.contains(&"oidc:repository_id:892735111") && sel.contains(&"oidc:repository_owner_id:1342004"));

        // The immutable format, after a rename: the ids agree, the name is the new one.
        let mut c = f.claims();
        c["sub"] = json!("repo:acme@1342004/application@892735111:ref:refs/heads/main");
        c["repository"] = json!("acme/application");
        let v = f.verify(&f.sign(&c)).await.unwrap();
        assert_eq!(v.claims.repository_id.as_deref(), Some("892735111"));
        assert_eq!(v.claims.repository.as_deref(), Some("acme/application"));

        // A token whose id claims are missing takes them from the immutable subject.
        let mut c = f.claims();
        c["sub"] = json!("repo:acme@1342004/app@892735111:environment:prod");
        c.as_object_mut().unwrap().remove("repository_id");
        c.as_object_mut().unwrap().remove("repository_owner_id");
        let v = f.verify(&f.sign(&c)).await.unwrap();
        assert_eq!(
            (v.claims.repository_owner_id.as_deref(), v.claims.repository_id.as_deref()),
            (Some("1342004"), Some("892735111"))
        );

        // The subject and the claims naming different repositories is refused, saying which.
        for (sub, field, why) in [
            ("repo:acme@1342004/app@990000001:ref:refs/heads/main", "repository_id", "990000001"),
            ("repo:evil@1342004/app@892735111:ref:refs/heads/main", "repository", "evil/app"),
            ("repo:acme@77/app@892735111:ref:refs/heads/main", "repository_owner_id", "77"),
            ("repo:acme/other:ref:refs/heads/main", "repository", "acme/other"),
        ] {
            let mut c = f.claims();
            c["sub"] = json!(sub);
            let err = f.verify(&f.sign(&c)).await.unwrap_err();
            assert!(matches!(&err, OidcError::Malformed(m) if m.contains(field) && m.contains(why)), "{sub}: {err}");
        }
        // Neither format, or an id that is not one.
        for sub in ["repo:acme@1342004/app:ref:refs/heads/main", "repo:acme/app@12x:ref:x", "repo:noslash:ref:x"] {
            let mut c = f.claims();
            c["sub"] = json!(sub);
            assert!(matches!(f.verify(&f.sign(&c)).await.unwrap_err(), OidcError::Malformed(_)), "{sub}");
        }
        let mut c = f.claims();
        c["repository_id"] = json!("12; DROP");
        assert!(
            matches!(f.verify(&f.sign(&c)).await.unwrap_err(), OidcError::Malformed(m) if m.contains("numeric id"))
        );
        // A customised subject template is not a `repo:` subject: nothing to compare.
        let mut c = f.claims();
        c["sub"] = json!("repository_owner_id:1342004:repository_id:892735111");
        assert!(f.verify(&f.sign(&c)).await.is_ok());
        // GitHub sends ids as strings; a number is read the same.
        let mut c = f.claims();
        c["repository_id"] = json!(892735111);
        assert_eq!(f.verify(&f.sign(&c)).await.unwrap().claims.repository_id.as_deref(), Some("892735111"));
    }

    #[test]
    fn github_subjects_parse_in_both_formats() {
        assert_eq!(
            GithubSubject::parse("repo:acme/app:ref:refs/heads/main").unwrap(),
            Some(GithubSubject { owner: "acme", repo: "app", ids: None })
        );
        assert_eq!(
            GithubSubject::parse("repo:acme@1342004/app.js@892735111:pull_request").unwrap(),
            Some(GithubSubject { owner: "acme", repo: "app.js", ids: Some(("1342004", "892735111")) })
        );
        assert_eq!(GithubSubject::parse("project_path:acme/app:ref_type:branch:ref:main").unwrap(), None);
        assert!(GithubSubject::parse("repo:/app:ref:x").is_err());
        assert!(GithubSubject::parse("repo:acme@0123/app@1:ref:x").is_err(), "no leading zero");
    }

    #[tokio::test]
    async fn a_gitlab_token_is_mapped_to_the_same_shape() {
        let f = fixture();
        let mut c = f.claims();
        let m = c.as_object_mut().unwrap();
        for k in ["repository", "repository_owner", "job_workflow_ref", "run_id", "event_name"] {
            m.remove(k);
        }
        m.insert("project_path".into(), json!("acme/app"));
        m.insert("ref".into(), json!("main"));
        m.insert("ref_protected".into(), json!("true"));
        m.insert("pipeline_id".into(), json!(77));
        m.insert("project_id".into(), json!("4242"));
        m.insert("namespace_id".into(), json!("77"));
        m.insert("sub".into(), json!("project_path:acme/app:ref_type:branch:ref:main"));
        m.remove("repository_id");
        m.remove("repository_owner_id");
        let v = f.verify(&f.sign(&c)).await.unwrap();
        assert_eq!((v.claims.project_id.as_deref(), v.claims.namespace_id.as_deref()), (Some("4242"), Some("77")));
        assert!(v.selectors.iter().any(|s| s.as_str() == "oidc:project_id:4242"));
        assert!(v.selectors.iter().any(|s| s.as_str() == "oidc:namespace_id:77"));
        assert_eq!(v.claims.repository.as_deref(), Some("acme/app"));
        assert_eq!(v.claims.git_ref.as_deref(), Some("refs/heads/main"));
        assert_eq!(v.claims.ref_protected.as_deref(), Some("true"));
        assert_eq!(v.claims.run_id.as_deref(), Some("77"));
    }

    #[tokio::test]
    async fn each_bad_token_is_refused_for_its_own_reason() {
        let f = fixture();
        let now = unix_secs(f.now);
        let with = |k: &str, v: Value| {
            let mut c = f.claims();
            c[k] = v;
            c
        };
        assert_eq!(
            f.verify(&f.sign(&with("iss", json!("https://evil.example")))).await.unwrap_err(),
            OidcError::UnknownIssuer("https://evil.example".into())
        );
        assert_eq!(f.verify(&f.sign(&with("aud", json!("someone-else")))).await.unwrap_err(), OidcError::Audience);
        assert_eq!(f.verify(&f.sign(&with("exp", json!(now - 61)))).await.unwrap_err(), OidcError::Expired(now - 61));
        assert!(f.verify(&f.sign(&with("exp", json!(now - 30)))).await.is_ok(), "within the 60 s skew");
        assert_eq!(
            f.verify(&f.sign(&with("nbf", json!(now + 120)))).await.unwrap_err(),
            OidcError::NotYetValid(now + 120)
        );
        assert_eq!(
            f.verify(&f.sign(&with("iat", json!(now + 120)))).await.unwrap_err(),
            OidcError::IssuedInFuture(now + 120)
        );
        assert_eq!(
            f.verify(&f.sign(&with("exp", json!(now + 3 * 86_400)))).await.unwrap_err(),
            OidcError::TooLongLived
        );

        // alg none: the header says none, there is no signature.
        let none = format!("{}.{}.", b64(&json!({"alg": "none", "typ": "JWT"})), b64(&f.claims()));
        assert!(matches!(f.verify(&none).await.unwrap_err(), OidcError::Malformed(_) | OidcError::Algorithm(_)));
        // HS256 "signed" with the issuer's public key as the HMAC secret.
        let (x, _) = f.key.public_xy();
        let mut hs = Header::new(Algorithm::HS256);
        hs.kid = Some(f.key.kid().into());
        let forged = jsonwebtoken::encode(&hs, &f.claims(), &EncodingKey::from_secret(x.as_bytes()).unwrap()).unwrap();
        assert_eq!(f.verify(&forged).await.unwrap_err(), OidcError::Algorithm("HS256".into()));
        // Another key claiming the issuer's kid.
        let other = JwtKey::generate().unwrap();
        let mut h = Header::new(Algorithm::ES256);
        h.kid = Some(f.key.kid().into());
        let wrong_key = jsonwebtoken::encode(&h, &f.claims(), &EncodingKey::from_ec_der(other.pkcs8_der())).unwrap();
        assert_eq!(f.verify(&wrong_key).await.unwrap_err(), OidcError::Signature);
        // Unknown and hostile kids.
        h.kid = Some("no-such-key".into());
        let unknown = jsonwebtoken::encode(&h, &f.claims(), &EncodingKey::from_ec_der(f.key.pkcs8_der())).unwrap();
        assert_eq!(f.verify(&unknown).await.unwrap_err(), OidcError::UnknownKey);
        for kid in ["../../etc/passwd", "https://evil.example/keys", "a\u{0}b"] {
            h.kid = Some(kid.into());
            let t = jsonwebtoken::encode(&h, &f.claims(), &EncodingKey::from_ec_der(f.key.pkcs8_der())).unwrap();
            assert_eq!(f.verify(&t).await.unwrap_err(), OidcError::BadKid, "{kid}");
        }
        // Garbage and oversize.
        assert!(matches!(f.verify("not-a-token").await.unwrap_err(), OidcError::Malformed(_)));
        assert!(matches!(f.verify(&"a".repeat(MAX_TOKEN_BYTES + 1)).await.unwrap_err(), OidcError::Malformed(_)));
        // A claim changed after signing.
        let good = f.sign(&f.claims());
        let parts: Vec<&str> = good.split('.').collect();
        let tampered = format!("{}.{}.{}", parts[0], b64(&with("repository", json!("acme/other"))), parts[2]);
        assert_eq!(f.verify(&tampered).await.unwrap_err(), OidcError::Signature);
    }

    #[tokio::test]
    async fn a_token_is_accepted_once() {
        let f = fixture();
        let token = f.sign(&f.claims());
        f.verify(&token).await.unwrap();
        assert_eq!(f.verify(&token).await.unwrap_err(), OidcError::Replayed);
        // Without a jti, the token's hash is the key.
        let mut c = f.claims();
        c.as_object_mut().unwrap().remove("jti");
        let no_jti = f.sign(&c);
        f.verify(&no_jti).await.unwrap();
        assert_eq!(f.verify(&no_jti).await.unwrap_err(), OidcError::Replayed);
    }

    #[tokio::test]
    async fn unknown_kids_cannot_make_mayfly_refetch_keys_within_the_interval() {
        let f = fixture();
        f.verify(&f.sign(&f.claims())).await.unwrap();
        assert_eq!(f.source.fetches.load(std::sync::atomic::Ordering::SeqCst), 1);
        let mut h = Header::new(Algorithm::ES256);
        for n in 0..50 {
            h.kid = Some(format!("made-up-{n}"));
            let t = jsonwebtoken::encode(&h, &f.claims(), &EncodingKey::from_ec_der(f.key.pkcs8_der())).unwrap();
            assert_eq!(f.verify(&t).await.unwrap_err(), OidcError::UnknownKey);
        }
        assert_eq!(
            f.source.fetches.load(std::sync::atomic::Ordering::SeqCst),
            1,
            "no refetch within the interval, whatever the kids say"
        );
    }

    #[test]
    fn only_asymmetric_algorithms_and_https_or_loopback_are_configurable() {
        assert!(parse_algorithm("RS256").is_ok() && parse_algorithm("ES256").is_ok());
        assert!(parse_algorithm("HS256").is_err() && parse_algorithm("none").is_err());
        assert!(
            check_fetch_url("https://token.actions.githubusercontent.com/.well-known/openid-configuration").is_ok()
        );
        assert!(check_fetch_url("http://127.0.0.1:8080/.well-known/openid-configuration").is_ok());
        assert!(check_fetch_url("http://issuer.example/.well-known/openid-configuration").is_err());
    }
}
