//! Configuration: `RawConfig` (what mayfly.toml says, unknown keys refused) is validated
//! once into `Config`; every error names the key. Opens nothing.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::attest::oidc::{IssuerConfig, parse_algorithm};
use crate::identity::{OidcClaims, TrustDomain, Ttl, TtlBounds};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read `{path}`: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("`{path}`: {message}")]
    Syntax { path: PathBuf, message: String },
    #[error("config key `{key}`: {why}")]
    Key { key: &'static str, why: String },
}

fn key(key: &'static str) -> impl Fn(String) -> ConfigError {
    move |why| ConfigError::Key { key, why }
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    pub trust_domain: Option<String>,
    pub data_dir: Option<PathBuf>,
    #[serde(default)]
    pub policy: RawPolicy,
    #[serde(default)]
    pub workload_api: RawWorkloadApi,
    #[serde(default)]
    pub admin: RawAdmin,
    pub ca: Option<RawCa>,
    #[serde(default)]
    pub jwt: RawJwt,
    #[serde(default)]
    pub wit: RawWit,
    pub listen: Option<RawListen>,
    #[serde(default)]
    pub oidc: RawOidc,
    #[serde(default)]
    pub break_glass: RawBreakGlass,
    #[serde(default)]
    pub ledger: RawLedger,
    #[serde(default)]
    pub issuance: RawIssuance,
    #[serde(default)]
    pub attestation: RawAttestation,
    pub aws: Option<RawAws>,
    #[serde(default)]
    pub telemetry: RawTelemetry,
    #[serde(default)]
    pub limits: RawLimits,
}

/// `[limits]`: what any one caller may take (see `limits::LimitsConfig` for each key).
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLimits {
    pub connections_per_uid: Option<usize>,
    pub connections_per_address: Option<usize>,
    pub max_connections: Option<usize>,
    pub header_timeout: Option<String>,
    pub idle_timeout: Option<String>,
    pub body_timeout: Option<String>,
    pub max_in_flight: Option<usize>,
    pub max_queued: Option<usize>,
    pub queue_timeout: Option<String>,
    pub in_flight_per_caller: Option<usize>,
    pub rate_per_caller: Option<u32>,
    pub burst_per_caller: Option<u32>,
    pub refusal_window: Option<String>,
    pub refusals_in_full: Option<usize>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTelemetry {
    pub listen: Option<String>,
    pub log_format: Option<String>,
    pub log_level: Option<String>,
}

/// Metrics, health and logs (`[telemetry]`).
#[derive(Clone, Debug, Default)]
pub struct TelemetryConfig {
    /// The plain-HTTP listener for /metrics, /healthz, /readyz; `None`: off.
    pub listen: Option<std::net::SocketAddr>,
    pub log_format: crate::telemetry::logging::LogFormat,
    /// A level or filter directive (`info`, `mayfly=debug`); `None`: RUST_LOG, else info.
    pub log_level: Option<String>,
}

/// The telemetry listener's address: `HOST:PORT`, or a bare `PORT` on loopback.
pub fn telemetry_address(text: &str) -> Result<std::net::SocketAddr, String> {
    if let Ok(port) = text.parse::<u16>() {
        return Ok(std::net::SocketAddr::from(([127, 0, 0, 1], port)));
    }
    text.parse().map_err(|e| format!("`{text}`: {e} (HOST:PORT, or a port for 127.0.0.1)"))
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAws {
    pub region: Option<String>,
    pub endpoint: Option<String>,
    pub mode: Option<String>,
    pub web_identity_audience: Option<String>,
    pub attempts: Option<u32>,
    pub attempt_timeout: Option<String>,
    pub default_ttl: Option<String>,
    pub max_in_flight: Option<usize>,
}

/// How the broker gets sessions from STS.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AwsMode {
    /// `sts:AssumeRole` with the broker's own AWS credentials (the standard chain).
    AssumeRole,
    /// `sts:AssumeRoleWithWebIdentity` with a short JWT mayfly signs itself (mayfly as an
    /// OIDC provider in IAM): no AWS key on the broker.
    WebIdentity,
}

/// AWS STS sessions: where STS and IAM are, how hard to try, and the default lifetime.
#[derive(Clone, Debug)]
pub struct AwsConfig {
    pub region: String,
    /// STS and IAM at this URL instead of AWS's (an emulator, a VPC endpoint).
    pub endpoint: Option<String>,
    pub mode: AwsMode,
    /// `aud` of the web-identity JWT: what the IAM OIDC provider lists as client id.
    pub web_identity_audience: String,
    /// Tries per STS call (throttling, timeouts, 5xx), with exponential backoff between.
    pub attempts: u32,
    pub attempt_timeout: Duration,
    pub default_ttl: Ttl,
    /// STS calls in flight at once; more are refused (UNAVAILABLE) rather than queued.
    pub max_in_flight: usize,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawWorkloadApi {
    pub socket: Option<PathBuf>,
    pub max_request_bytes: Option<usize>,
    pub request_timeout: Option<String>,
    pub rotate_at_percent: Option<u32>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawJwt {
    pub key: Option<PathBuf>,
    pub issuer: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawWit {
    pub key: Option<PathBuf>,
    pub issuer: Option<String>,
    pub ttl: Option<String>,
    pub proof_max_lifetime: Option<String>,
    pub replay_cache_entries: Option<usize>,
}

/// WIT-SVIDs and the proofs of possession relying parties ask mayfly to check.
#[derive(Clone, Debug)]
pub struct WitConfig {
    /// The ES256 key that signs WIT-SVIDs (never the JWT key): a PKCS#8 PEM file, or
    /// `None` for one generated on first start and kept in data_dir (wit-key.pem, 0600).
    pub key: Option<PathBuf>,
    /// `iss` of every WIT, when set; never an http(s) URL (a WIT must not pass for an
    /// OIDC token).
    pub issuer: Option<String>,
    /// Lifetime asked for WIT-SVIDs on the Workload API (policy may grant less).
    pub ttl: Ttl,
    /// A proof's `exp` may be at most this far ahead.
    pub proof_max_lifetime: Duration,
    /// Proof `jti`s remembered at once (one use each); beyond that proofs are refused.
    pub replay_cache_entries: usize,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBreakGlass {
    pub ticket_pattern: Option<String>,
    pub max_ttl: Option<String>,
    pub approval_timeout: Option<String>,
    pub approvers: Option<Vec<u32>>,
    pub log_file: Option<PathBuf>,
    pub webhook: Option<String>,
    pub webhook_retries: Option<u32>,
}

/// The emergency path's own settings. Without an elevated sink it issues nothing.
#[derive(Clone, Debug)]
pub struct BreakGlassConfig {
    /// Tickets must match this whole (anchored).
    pub ticket_pattern: regex::Regex,
    pub max_ttl: Ttl,
    pub approval_timeout: Duration,
    /// Uids that may approve (never the requester). Empty: approval-required requests are denied.
    pub approvers: Vec<u32>,
    pub log_file: Option<PathBuf>,
    pub webhook: Option<String>,
    pub webhook_retries: u32,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawListen {
    pub address: Option<String>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    pub max_request_bytes: Option<usize>,
    pub request_timeout: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawOidc {
    #[serde(default)]
    pub issuer: Vec<RawIssuer>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawIssuer {
    pub url: Option<String>,
    pub audiences: Option<Vec<String>>,
    pub algorithms: Option<Vec<String>>,
    pub clock_skew: Option<String>,
    pub selector_claims: Option<Vec<String>>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPolicy {
    pub bundle: Option<PathBuf>,
    #[serde(default)]
    pub trusted_keys: Vec<PathBuf>,
    pub poll_interval: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAdmin {
    pub socket: Option<PathBuf>,
    /// A uid (besides the daemon's and root) that owns the admin socket and may call it.
    pub owner_uid: Option<u32>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCa {
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    pub generate: Option<bool>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLedger {
    /// `sqlite` (default: one daemon, a file in the data dir) or `postgres` (several daemons).
    pub backend: Option<String>,
    pub path: Option<PathBuf>,
    pub busy_timeout: Option<String>,
    pub max_batch: Option<usize>,
    /// PostgreSQL: the connection URL, or a file holding it (so the password is not here).
    pub url: Option<String>,
    pub url_file: Option<PathBuf>,
    /// PostgreSQL: verify the server's TLS certificate against this CA (PEM); TLS required.
    pub tls_ca: Option<PathBuf>,
    pub pool_size: Option<u32>,
    /// PostgreSQL: this daemon's chain, unique among the daemons sharing the database.
    pub chain: Option<String>,
    /// PostgreSQL: refuse issuance when the view of the shared state is older than this.
    pub max_staleness: Option<String>,
    /// Signed checkpoints of this daemon's chain: the latest in this file (outside the data
    /// directory), replaced every `checkpoint_interval` and at shutdown.
    pub checkpoint_file: Option<PathBuf>,
    /// Their Ed25519 signing key (PKCS#8 PEM); default `<data_dir>/checkpoint-key.pem`,
    /// generated when missing.
    pub checkpoint_key: Option<PathBuf>,
    pub checkpoint_interval: Option<String>,
    /// Each checkpoint is also POSTed here as JSON (a witness off the box).
    pub checkpoint_webhook: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawIssuance {
    pub default_ttl: Option<String>,
    pub jwt_ttl: Option<String>,
    pub max_ttl: Option<String>,
    /// The shortest lifetime issued (default 5 min): a shorter request is refused, and so
    /// is a certificate the CA's own expiry would cut shorter.
    pub min_ttl: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAttestation {
    pub max_binary_bytes: Option<u64>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CaSource {
    Files {
        cert: PathBuf,
        key: PathBuf,
    },
    /// Generated on first start and persisted in this directory (dev, or `ca.generate = true`).
    Generated {
        dir: PathBuf,
    },
}

/// Where the daemon's policy comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PolicySource {
    /// A signed bundle file, or a directory whose newest `*.bundle` is used; activated only
    /// when its signature verifies with one of `trusted_keys` (Ed25519 public key PEM files).
    Bundle { path: PathBuf, trusted_keys: Vec<PathBuf> },
    /// `mayfly dev` only: a policies/ tree read unsigned.
    UnsignedDir(PathBuf),
}

/// Where the TLS listener's certificate comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TlsSource {
    Files {
        cert: PathBuf,
        key: PathBuf,
    },
    /// `mayfly dev`: a certificate for localhost / 127.0.0.1 from the daemon's own CA.
    FromCa,
}

/// The network listener (HTTPS + gRPC over TLS): the CI exchange and the OIDC documents.
#[derive(Clone, Debug)]
pub struct ListenConfig {
    pub address: std::net::SocketAddr,
    pub tls: TlsSource,
    pub max_request_bytes: usize,
    pub request_timeout: Duration,
}

#[derive(Clone, Debug)]
pub struct Config {
    pub trust_domain: TrustDomain,
    pub data_dir: PathBuf,
    pub policy: PolicySource,
    /// How often the policy source is checked for a new release.
    pub policy_poll: Duration,
    pub socket: PathBuf,
    /// The admin socket (mode 0600): rollback, status. `None`: no admin interface.
    pub admin_socket: Option<PathBuf>,
    /// The admin socket's owner (mode stays 0600) and an accepted operator uid.
    pub admin_owner_uid: Option<u32>,
    pub max_request_bytes: usize,
    pub request_timeout: Duration,
    pub ca: CaSource,
    /// The ES256 key that signs JWT-SVIDs: a PKCS#8 PEM file, or `None` for one generated
    /// on first start and kept in data_dir (jwt-key.pem, mode 0600).
    pub jwt_key: Option<PathBuf>,
    /// `iss` of mayfly's JWTs and the base URL of its discovery document. `None` with a
    /// listener in dev: `https://<listen address>`.
    pub jwt_issuer: Option<String>,
    pub wit: WitConfig,
    pub listen: Option<ListenConfig>,
    /// Trusted CI / OIDC issuers for the token exchange.
    pub oidc_issuers: Vec<IssuerConfig>,
    pub break_glass: BreakGlassConfig,
    /// Where the ledger lives and how it is written (`[ledger]`).
    pub ledger: crate::ledger::Settings,
    pub default_ttl: Ttl,
    /// Lifetime asked for JWT-SVIDs (policy may grant less).
    pub jwt_ttl: Ttl,
    pub max_ttl: Ttl,
    /// No credential lives shorter (`issuance.min_ttl`).
    pub min_ttl: Ttl,
    /// Workload API streams renew an SVID when this share of its lifetime has passed.
    pub rotate_at_percent: u32,
    pub max_binary_bytes: u64,
    /// `None`: AWS credentials are not served.
    pub aws: Option<AwsConfig>,
    /// Signed checkpoints of the ledger (`[ledger] checkpoint_*`); `None`: not published.
    pub checkpoint: Option<crate::ledger::checkpoint::CheckpointSettings>,
    pub telemetry: TelemetryConfig,
    /// `[limits]`: connections, admission, rates, refusal counting.
    pub limits: crate::limits::LimitsConfig,
    /// The file this was read from (a reload reads it again); `None` for `mayfly dev`.
    pub file: Option<PathBuf>,
}

pub const DEV_TRUST_DOMAIN: &str = "mayfly.local";
pub const DEFAULT_MAX_REQUEST_BYTES: usize = 64 * 1024;
/// `issuance.min_ttl` unless set: a credential shorter than this is refused.
pub const DEFAULT_MIN_TTL: &str = "5m";

impl Config {
    /// The lifetimes a request may ask for.
    pub fn ttl_bounds(&self) -> TtlBounds {
        TtlBounds { min: self.min_ttl, max: self.max_ttl }
    }

    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.into(), source })?;
        let raw: RawConfig =
            toml::from_str(&text).map_err(|e| ConfigError::Syntax { path: path.into(), message: e.to_string() })?;
        let mut config = Self::try_from(raw)?;
        config.file = Some(path.to_path_buf());
        Ok(config)
    }

    /// `mayfly dev`: embedded defaults, a generated CA in the data dir, and the policies/
    /// tree read unsigned (re-read when it changes).
    pub fn dev(
        data_dir: PathBuf,
        policies: PathBuf,
        socket: PathBuf,
        admin_socket: PathBuf,
        dev_net: DevNet,
    ) -> Result<Self, ConfigError> {
        let data_dir_for_dev = data_dir.clone();
        let issuers = dev_net
            .oidc_issuers
            .iter()
            .map(|spec| {
                let (url, audience) = spec.split_once('=').map_or((spec.as_str(), "mayfly"), |(u, a)| (u, a));
                RawIssuer {
                    url: Some(url.to_owned()),
                    audiences: Some(vec![audience.to_owned()]),
                    ..RawIssuer::default()
                }
            })
            .collect();
        let raw = RawConfig {
            listen: dev_net.listen.map(|address| RawListen { address: Some(address), ..RawListen::default() }),
            oidc: RawOidc { issuer: issuers },
            trust_domain: Some(DEV_TRUST_DOMAIN.into()),
            ca: Some(RawCa { generate: Some(true), ..RawCa::default() }),
            data_dir: Some(data_dir),
            policy: RawPolicy { poll_interval: Some("2s".into()), ..RawPolicy::default() },
            ledger: RawLedger {
                checkpoint_interval: dev_net.checkpoint_file.as_ref().map(|_| "5s".into()),
                checkpoint_file: dev_net.checkpoint_file.clone(),
                ..match &dev_net.postgres {
                    Some(url) => RawLedger {
                        backend: Some("postgres".into()),
                        url: Some(url.clone()),
                        chain: Some(dev_chain(&socket)),
                        ..RawLedger::default()
                    },
                    None => RawLedger::default(),
                }
            },
            workload_api: RawWorkloadApi { socket: Some(socket), ..RawWorkloadApi::default() },
            admin: RawAdmin { socket: Some(admin_socket), owner_uid: None },
            // Credentials for the emulator come from the environment, as for any AWS tool.
            aws: dev_net.aws_endpoint.map(|endpoint| RawAws {
                endpoint: Some(endpoint),
                region: std::env::var("AWS_REGION").or_else(|_| std::env::var("AWS_DEFAULT_REGION")).ok(),
                ..RawAws::default()
            }),
            telemetry: RawTelemetry { listen: dev_net.telemetry, ..RawTelemetry::default() },
            break_glass: RawBreakGlass {
                log_file: Some(data_dir_for_dev.join("break-glass.log")),
                // Dev: root may approve (`sudo mayfly break-glass approve …`), never the requester.
                approvers: Some(vec![0]),
                ..RawBreakGlass::default()
            },
            ..RawConfig::default()
        };
        let mut config = Self::from_raw(raw, Some(PolicySource::UnsignedDir(policies)))?;
        // Dev only: unregistered token subjects get a dev identity (`serve` never does this).
        for issuer in &mut config.oidc_issuers {
            issuer.dev_fallback = true;
        }
        Ok(config)
    }
}

/// `mayfly dev`'s network options: the TLS listener and issuers trusted for quick tries.
#[derive(Clone, Debug, Default)]
pub struct DevNet {
    pub listen: Option<String>,
    /// `URL[=AUDIENCE]`, audience `mayfly` by default.
    pub oidc_issuers: Vec<String>,
    /// STS and IAM at this URL (an emulator such as moto), region from AWS_REGION.
    pub aws_endpoint: Option<String>,
    /// The telemetry listener (`HOST:PORT` or a port on loopback).
    pub telemetry: Option<String>,
    /// The ledger in this PostgreSQL database, on a chain named after the socket path.
    pub postgres: Option<String>,
    /// Signed checkpoints of the ledger in this file (outside the data directory).
    pub checkpoint_file: Option<PathBuf>,
}

/// `mayfly dev`'s chain in a shared ledger: `dev-` and a digest of its socket's absolute
/// path, stable across restarts and distinct for daemons on different sockets.
fn dev_chain(socket: &Path) -> String {
    let path = std::path::absolute(socket).unwrap_or_else(|_| socket.to_path_buf());
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, path.as_os_str().as_encoded_bytes());
    format!("dev-{}", &hex::encode(digest)[..12])
}

/// Where `[ledger]` says the ledger is; errors name the key.
fn ledger_location(raw: &RawLedger, data_dir: &Path) -> Result<crate::ledger::Location, ConfigError> {
    match raw.backend.as_deref().unwrap_or("sqlite") {
        "sqlite" => {
            if raw.url.is_some() || raw.url_file.is_some() || raw.tls_ca.is_some() {
                return Err(key("ledger.url")("only with backend = \"postgres\"".into()));
            }
            Ok(match &raw.path {
                Some(path) => crate::ledger::Location::file(path),
                None => crate::ledger::Location::in_data_dir(data_dir),
            })
        }
        "postgres" => {
            let url = match (&raw.url, &raw.url_file) {
                (Some(url), None) => url.clone(),
                (None, Some(file)) => std::fs::read_to_string(file)
                    .map(|s| s.trim().to_owned())
                    .map_err(|e| key("ledger.url_file")(format!("`{}`: {e}", file.display())))?,
                _ => return Err(key("ledger.url")("set exactly one of `url` and `url_file`".into())),
            };
            if raw.path.is_some() {
                return Err(key("ledger.path")("only with backend = \"sqlite\"".into()));
            }
            let target = crate::ledger::postgres::Target::new(&url, raw.tls_ca.clone()).map_err(key("ledger.url"))?;
            Ok(crate::ledger::Location::Postgres(target))
        }
        other => Err(key("ledger.backend")(format!("`{}` is not one of sqlite, postgres", other.escape_debug()))),
    }
}

impl TryFrom<RawConfig> for Config {
    type Error = ConfigError;

    fn try_from(raw: RawConfig) -> Result<Self, ConfigError> {
        Self::from_raw(raw, None)
    }
}

impl Config {
    /// `dev_policy` is how `mayfly dev` reads policies/ unsigned; a config file cannot.
    fn from_raw(raw: RawConfig, dev_policy: Option<PolicySource>) -> Result<Self, ConfigError> {
        let dev = dev_policy.is_some();
        let trust_domain = raw
            .trust_domain
            .ok_or_else(|| key("trust_domain")("required (e.g. \"example.org\")".into()))
            .and_then(|s| TrustDomain::parse(&s).map_err(|e| key("trust_domain")(e.to_string())))?;
        let data_dir = raw.data_dir.ok_or_else(|| key("data_dir")("required".into()))?;
        let policy = match (dev_policy, raw.policy.bundle) {
            (Some(dev), _) => dev,
            (None, None) => {
                return Err(key("policy.bundle")("required: a signed bundle file or a directory of them".into()));
            }
            (None, Some(_)) if raw.policy.trusted_keys.is_empty() => {
                return Err(key("policy.trusted_keys")(
                    "required: the Ed25519 public key files bundles must be signed with".into(),
                ));
            }
            (None, Some(path)) => PolicySource::Bundle { path, trusted_keys: raw.policy.trusted_keys },
        };
        let socket = raw.workload_api.socket.ok_or_else(|| key("workload_api.socket")("required".into()))?;
        let max_request_bytes = raw.workload_api.max_request_bytes.unwrap_or(DEFAULT_MAX_REQUEST_BYTES);
        if !(1024..=16 * 1024 * 1024).contains(&max_request_bytes) {
            return Err(key("workload_api.max_request_bytes")(format!(
                "`{max_request_bytes}` must be 1024..=16777216"
            )));
        }
        let duration = |k: &'static str, v: Option<String>, default: &str| -> Result<Ttl, ConfigError> {
            Ttl::parse(v.as_deref().unwrap_or(default)).map_err(|e| key(k)(e.to_string()))
        };
        let request_timeout = duration("workload_api.request_timeout", raw.workload_api.request_timeout, "30s")?;
        let policy_poll = duration("policy.poll_interval", raw.policy.poll_interval, "5s")?;
        let ca = match raw.ca {
            None => return Err(key("ca")("required: `cert` and `key` files, or `generate = true`".into())),
            Some(RawCa { cert: Some(cert), key: Some(k), generate: None | Some(false) }) => {
                CaSource::Files { cert, key: k }
            }
            Some(RawCa { cert: None, key: None, generate: Some(true) }) => {
                CaSource::Generated { dir: data_dir.clone() }
            }
            Some(_) => return Err(key("ca")("set both `cert` and `key`, or only `generate = true`".into())),
        };
        let ledger_location = ledger_location(&raw.ledger, &data_dir)?;
        let max_staleness = duration("ledger.max_staleness", raw.ledger.max_staleness.clone(), "5s")?;
        let pool_size = raw.ledger.pool_size.unwrap_or(8);
        if !(2..=64).contains(&pool_size) {
            return Err(key("ledger.pool_size")(format!("`{pool_size}` must be 2..=64")));
        }
        let chain = match (&raw.ledger.chain, &ledger_location) {
            (Some(c), _)
                if c.is_empty()
                    || c.len() > 64
                    || !c.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) =>
            {
                return Err(key("ledger.chain")(format!("`{c}` must be 1..=64 of [A-Za-z0-9._-]")));
            }
            (Some(c), _) => c.clone(),
            (None, crate::ledger::Location::Postgres(_)) => {
                return Err(key("ledger.chain")(
                    "required with backend = \"postgres\": a name unique to this daemon, the same across its restarts"
                        .into(),
                ));
            }
            (None, _) => String::new(),
        };
        let checkpoint = checkpoint_settings(&raw.ledger, &data_dir)?;
        let busy = duration("ledger.busy_timeout", raw.ledger.busy_timeout, "5s")?;
        let ledger_max_batch = raw.ledger.max_batch.unwrap_or(256);
        if !(1..=4096).contains(&ledger_max_batch) {
            return Err(key("ledger.max_batch")(format!("`{ledger_max_batch}` must be 1..=4096")));
        }
        let default_ttl = duration("issuance.default_ttl", raw.issuance.default_ttl, "1h")?;
        let max_ttl = duration("issuance.max_ttl", raw.issuance.max_ttl, "24h")?;
        if default_ttl > max_ttl {
            return Err(key("issuance.default_ttl")(format!("`{default_ttl}` is over issuance.max_ttl `{max_ttl}`")));
        }
        let jwt_ttl = duration("issuance.jwt_ttl", raw.issuance.jwt_ttl, "5m")?;
        if jwt_ttl > max_ttl {
            return Err(key("issuance.jwt_ttl")(format!("`{jwt_ttl}` is over issuance.max_ttl `{max_ttl}`")));
        }
        let min_ttl = duration("issuance.min_ttl", raw.issuance.min_ttl, DEFAULT_MIN_TTL)?;
        for (name, ttl) in [("issuance.default_ttl", default_ttl), ("issuance.jwt_ttl", jwt_ttl)] {
            if ttl < min_ttl {
                return Err(key(name)(format!("`{ttl}` is under issuance.min_ttl `{min_ttl}`")));
            }
        }
        if min_ttl > max_ttl {
            return Err(key("issuance.min_ttl")(format!("`{min_ttl}` is over issuance.max_ttl `{max_ttl}`")));
        }
        let rotate_at_percent = raw.workload_api.rotate_at_percent.unwrap_or(50);
        if !(10..=90).contains(&rotate_at_percent) {
            return Err(key("workload_api.rotate_at_percent")(format!("`{rotate_at_percent}` must be 10..=90")));
        }
        let listen = match raw.listen {
            None => None,
            Some(l) => {
                let address = l.address.as_deref().unwrap_or("127.0.0.1:8443");
                let address = address.parse().map_err(|e| key("listen.address")(format!("`{address}`: {e}")))?;
                let tls = match (l.cert, l.key) {
                    (Some(cert), Some(k)) => TlsSource::Files { cert, key: k },
                    (None, None) if dev => TlsSource::FromCa,
                    _ => return Err(key("listen")("set both `cert` and `key` (PEM files)".into())),
                };
                let max_request_bytes = l.max_request_bytes.unwrap_or(DEFAULT_MAX_REQUEST_BYTES);
                if !(1024..=1024 * 1024).contains(&max_request_bytes) {
                    return Err(key("listen.max_request_bytes")(format!(
                        "`{max_request_bytes}` must be 1024..=1048576"
                    )));
                }
                let request_timeout = duration("listen.request_timeout", l.request_timeout, "15s")?.as_duration();
                Some(ListenConfig { address, tls, max_request_bytes, request_timeout })
            }
        };
        let mut oidc_issuers = Vec::new();
        for r in raw.oidc.issuer {
            let url = r.url.ok_or_else(|| key("oidc.issuer.url")("required".into()))?;
            crate::attest::oidc::check_fetch_url(&url).map_err(|e| key("oidc.issuer.url")(e.to_string()))?;
            if oidc_issuers.iter().any(|i: &IssuerConfig| i.issuer == url) {
                return Err(key("oidc.issuer.url")(format!("`{url}` is listed twice")));
            }
            let audiences = r.audiences.unwrap_or_else(|| vec!["mayfly".into()]);
            if audiences.is_empty() || audiences.iter().any(String::is_empty) {
                return Err(key("oidc.issuer.audiences")(format!("`{url}`: at least one non-empty audience")));
            }
            let algorithms = r
                .algorithms
                .unwrap_or_else(|| vec!["RS256".into(), "ES256".into()])
                .iter()
                .map(|a| parse_algorithm(a))
                .collect::<Result<Vec<_>, _>>()
                .map_err(key("oidc.issuer.algorithms"))?;
            let clock_skew = duration("oidc.issuer.clock_skew", r.clock_skew, "60s")?;
            if clock_skew.as_secs() > 300 {
                return Err(key("oidc.issuer.clock_skew")(format!("`{clock_skew}` is over 5 minutes")));
            }
            let selector_claims = match r.selector_claims {
                None => OidcClaims::SELECTOR_KEYS.iter().map(|k| (*k).to_owned()).collect(),
                Some(list) => {
                    if let Some(bad) = list.iter().find(|k| !OidcClaims::SELECTOR_KEYS.contains(&k.as_str())) {
                        return Err(key("oidc.issuer.selector_claims")(format!(
                            "`{bad}` is not one of {}",
                            OidcClaims::SELECTOR_KEYS.join(", ")
                        )));
                    }
                    list.into_iter().collect()
                }
            };
            oidc_issuers.push(IssuerConfig {
                issuer: url,
                audiences,
                algorithms,
                clock_skew: clock_skew.as_duration(),
                selector_claims,
                dev_fallback: false,
            });
        }
        if !oidc_issuers.is_empty() && listen.is_none() {
            return Err(key("listen")(
                "required when [[oidc.issuer]] is set: the exchange is served on the TLS listener".into(),
            ));
        }
        let jwt_issuer = match raw.jwt.issuer {
            Some(url) if url.starts_with("https://") && !url.ends_with('/') => Some(url),
            Some(url) => {
                return Err(key("jwt.issuer")(format!("`{url}` must be an https:// URL without a trailing slash")));
            }
            None => None,
        };
        if listen.is_some() && jwt_issuer.is_none() && !dev {
            return Err(key("jwt.issuer")(
                "required with [listen]: the https:// URL relying parties reach this listener at".into(),
            ));
        }
        let wit = wit_config(raw.wit, raw.jwt.key.as_deref(), jwt_issuer.as_deref(), max_ttl)?;
        let bg = raw.break_glass;
        let pattern = bg.ticket_pattern.unwrap_or_else(|| "INC-[0-9]+".into());
        let ticket_pattern = regex::Regex::new(&format!("^(?:{pattern})$"))
            .map_err(|e| key("break_glass.ticket_pattern")(format!("`{pattern}`: {e}")))?;
        let bg_max = duration("break_glass.max_ttl", bg.max_ttl, "15m")?;
        if bg_max.as_secs() > 3600 {
            return Err(key("break_glass.max_ttl")(format!("`{bg_max}` is over 1 h: emergency credentials are short")));
        }
        if bg_max < min_ttl {
            return Err(key("break_glass.max_ttl")(format!(
                "`{bg_max}` is under issuance.min_ttl `{min_ttl}`: no break-glass credential could be issued"
            )));
        }
        if let Some(url) = &bg.webhook {
            crate::attest::oidc::check_fetch_url(url).map_err(|e| key("break_glass.webhook")(e.to_string()))?;
        }
        let break_glass = BreakGlassConfig {
            ticket_pattern,
            max_ttl: bg_max,
            approval_timeout: duration("break_glass.approval_timeout", bg.approval_timeout, "10m")?.as_duration(),
            approvers: bg.approvers.unwrap_or_default(),
            log_file: bg.log_file,
            webhook: bg.webhook,
            webhook_retries: bg.webhook_retries.unwrap_or(3).min(10),
        };
        let aws = match raw.aws {
            None => None,
            Some(a) => {
                let region = a.region.unwrap_or_else(|| "us-east-1".into());
                if region.is_empty()
                    || !region.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                {
                    return Err(key("aws.region")(format!("`{region}` is not a region name (e.g. eu-west-1)")));
                }
                if let Some(url) = &a.endpoint {
                    let parsed = url::Url::parse(url).map_err(|e| key("aws.endpoint")(format!("`{url}`: {e}")))?;
                    let loopback = matches!(parsed.host_str(), Some("127.0.0.1" | "localhost" | "[::1]"));
                    if parsed.scheme() != "https" && !(parsed.scheme() == "http" && loopback) {
                        return Err(key("aws.endpoint")(format!(
                            "`{url}`: https://, or http:// on loopback (an emulator)"
                        )));
                    }
                }
                let mode = match a.mode.as_deref().unwrap_or("assume_role") {
                    "assume_role" => AwsMode::AssumeRole,
                    "web_identity" if jwt_issuer.is_some() || dev => AwsMode::WebIdentity,
                    "web_identity" => {
                        return Err(key("aws.mode")(
                            "web_identity needs jwt.issuer: STS fetches mayfly's keys from its discovery document"
                                .into(),
                        ));
                    }
                    other => return Err(key("aws.mode")(format!("`{other}` is not assume_role or web_identity"))),
                };
                let attempts = a.attempts.unwrap_or(3);
                if !(1..=10).contains(&attempts) {
                    return Err(key("aws.attempts")(format!("`{attempts}` must be 1..=10")));
                }
                let default_ttl = duration("aws.default_ttl", a.default_ttl, "1h")?;
                if !(900..=43200).contains(&default_ttl.as_secs()) {
                    return Err(key("aws.default_ttl")(format!("`{default_ttl}`: AWS sessions last 15m..12h")));
                }
                let max_in_flight = a.max_in_flight.unwrap_or(64);
                if max_in_flight == 0 {
                    return Err(key("aws.max_in_flight")("must be positive".into()));
                }
                Some(AwsConfig {
                    region,
                    endpoint: a.endpoint,
                    mode,
                    web_identity_audience: a.web_identity_audience.unwrap_or_else(|| "sts.amazonaws.com".into()),
                    attempts,
                    attempt_timeout: duration("aws.attempt_timeout", a.attempt_timeout, "5s")?.as_duration(),
                    default_ttl,
                    max_in_flight,
                })
            }
        };
        let telemetry = TelemetryConfig {
            listen: raw
                .telemetry
                .listen
                .as_deref()
                .filter(|l| *l != "none")
                .map(telemetry_address)
                .transpose()
                .map_err(key("telemetry.listen"))?,
            log_format: raw
                .telemetry
                .log_format
                .as_deref()
                .map(crate::telemetry::logging::LogFormat::parse)
                .transpose()
                .map_err(key("telemetry.log_format"))?
                .unwrap_or_default(),
            log_level: match raw.telemetry.log_level {
                Some(level) => {
                    crate::telemetry::logging::check_level(&level).map_err(key("telemetry.log_level"))?;
                    Some(level)
                }
                None => None,
            },
        };
        let max_binary_bytes = raw.attestation.max_binary_bytes.unwrap_or(256 * 1024 * 1024);
        if max_binary_bytes == 0 {
            return Err(key("attestation.max_binary_bytes")("must be positive".into()));
        }
        let limits = limits(raw.limits)?;
        Ok(Self {
            trust_domain,
            data_dir,
            policy,
            policy_poll: policy_poll.as_duration(),
            socket,
            admin_socket: raw.admin.socket,
            admin_owner_uid: raw.admin.owner_uid,
            max_request_bytes,
            request_timeout: request_timeout.as_duration(),
            ca,
            jwt_key: raw.jwt.key,
            jwt_issuer,
            wit,
            listen,
            oidc_issuers,
            break_glass,
            ledger: crate::ledger::Settings {
                location: ledger_location,
                busy_timeout: busy.as_duration(),
                max_batch: ledger_max_batch,
                chain,
                pool_size,
                max_staleness: max_staleness.as_duration(),
            },
            default_ttl,
            jwt_ttl,
            max_ttl,
            min_ttl,
            rotate_at_percent,
            max_binary_bytes,
            aws,
            checkpoint,
            telemetry,
            limits,
            file: None,
        })
    }
}

/// `[ledger] checkpoint_*`: the file must be outside the data directory (whoever can
/// rewrite the ledger there must not also be able to rewrite what pins it).
fn checkpoint_settings(
    raw: &RawLedger,
    data_dir: &Path,
) -> Result<Option<crate::ledger::checkpoint::CheckpointSettings>, ConfigError> {
    let Some(file) = &raw.checkpoint_file else {
        for (set, name) in [
            (raw.checkpoint_key.is_some(), "ledger.checkpoint_key"),
            (raw.checkpoint_interval.is_some(), "ledger.checkpoint_interval"),
            (raw.checkpoint_webhook.is_some(), "ledger.checkpoint_webhook"),
        ] {
            if set {
                return Err(key(name)("only with `checkpoint_file`".into()));
            }
        }
        return Ok(None);
    };
    let resolve = |p: &Path| {
        let p = std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf());
        // Why canonicalize the parent: a symlinked directory must not hide that the file
        // is inside the data directory.
        match (p.parent().and_then(|d| d.canonicalize().ok()), p.file_name()) {
            (Some(dir), Some(name)) => dir.join(name),
            _ => p,
        }
    };
    let data = std::path::absolute(data_dir).unwrap_or_else(|_| data_dir.to_path_buf());
    let data = data.canonicalize().unwrap_or(data);
    if resolve(file).starts_with(&data) {
        return Err(key("ledger.checkpoint_file")(format!(
            "`{}` is inside the data directory `{}`; keep checkpoints where whoever can rewrite the ledger cannot",
            file.display(),
            data_dir.display()
        )));
    }
    let interval = Ttl::parse(raw.checkpoint_interval.as_deref().unwrap_or("60s"))
        .map_err(|e| key("ledger.checkpoint_interval")(e.to_string()))?
        .as_duration();
    if !(Duration::from_secs(1)..=Duration::from_secs(86_400)).contains(&interval) {
        return Err(key("ledger.checkpoint_interval")("must be 1s..=24h".into()));
    }
    if let Some(url) = &raw.checkpoint_webhook {
        crate::attest::oidc::check_fetch_url(url).map_err(|e| key("ledger.checkpoint_webhook")(e.to_string()))?;
    }
    Ok(Some(crate::ledger::checkpoint::CheckpointSettings {
        file: file.clone(),
        key: raw.checkpoint_key.clone().unwrap_or_else(|| data_dir.join("checkpoint-key.pem")),
        interval,
        webhook: raw.checkpoint_webhook.clone(),
    }))
}

/// `[wit]`, checked against the JWT settings it must differ from.
fn wit_config(
    raw: RawWit,
    jwt_key: Option<&Path>,
    jwt_issuer: Option<&str>,
    max_ttl: Ttl,
) -> Result<WitConfig, ConfigError> {
    if let (Some(wit), Some(jwt)) = (&raw.key, jwt_key)
        && wit == jwt
    {
        return Err(key("wit.key")(format!(
            "`{}` is also jwt.key: WIT-SVIDs are signed by a key of their own",
            wit.display()
        )));
    }
    let issuer = match raw.issuer {
        None => None,
        Some(iss) => {
            let lower = iss.to_ascii_lowercase();
            if iss.is_empty() || iss.len() > 256 || iss.chars().any(char::is_control) {
                return Err(key("wit.issuer")("1..=256 characters, no control characters".into()));
            }
            // Why: an `iss` a verifier can run OIDC discovery on would let a WIT pass as an
            // OIDC token without its proof (WIT-SVID spec, section 3.7).
            if lower.starts_with("https://") || lower.starts_with("http://") || Some(iss.as_str()) == jwt_issuer {
                return Err(key("wit.issuer")(format!(
                    "`{iss}` must not be an http(s) URL or jwt.issuer (a WIT must never pass for an OIDC token); use e.g. spiffe://<trust domain>"
                )));
            }
            Some(iss)
        }
    };
    let duration = |k: &'static str, v: Option<String>, default: &str| -> Result<Ttl, ConfigError> {
        Ttl::parse(v.as_deref().unwrap_or(default)).map_err(|e| key(k)(e.to_string()))
    };
    let ttl = duration("wit.ttl", raw.ttl, "30m")?;
    if ttl > max_ttl {
        return Err(key("wit.ttl")(format!("`{ttl}` is over issuance.max_ttl `{max_ttl}`")));
    }
    let window = duration("wit.proof_max_lifetime", raw.proof_max_lifetime, "5m")?;
    if window.as_secs() > 900 {
        return Err(key("wit.proof_max_lifetime")(format!("`{window}` is over 15 minutes: proofs are short")));
    }
    let replay_cache_entries = raw.replay_cache_entries.unwrap_or(100_000);
    if !(1..=10_000_000).contains(&replay_cache_entries) {
        return Err(key("wit.replay_cache_entries")(format!("`{replay_cache_entries}` must be 1..=10000000")));
    }
    Ok(WitConfig { key: raw.key, issuer, ttl, proof_max_lifetime: window.as_duration(), replay_cache_entries })
}

/// `[limits]` over the defaults; every count at least 1, every duration positive.
fn limits(raw: RawLimits) -> Result<crate::limits::LimitsConfig, ConfigError> {
    let d = crate::limits::LimitsConfig::default();
    let count = |k: &'static str, v: Option<usize>, default: usize| -> Result<usize, ConfigError> {
        match v {
            Some(0) => Err(key(k)("must be at least 1".into())),
            Some(n) => Ok(n),
            None => Ok(default),
        }
    };
    let duration = |k: &'static str, v: Option<String>, default: Duration| -> Result<Duration, ConfigError> {
        match v {
            Some(s) => Ttl::parse(&s).map(|t| t.as_duration()).map_err(|e| key(k)(e.to_string())),
            None => Ok(default),
        }
    };
    let rate = |k: &'static str, v: Option<u32>, default| match v {
        Some(n) => std::num::NonZeroU32::new(n).ok_or_else(|| key(k)("must be at least 1".into())),
        None => Ok(default),
    };
    Ok(crate::limits::LimitsConfig {
        connections_per_uid: count("limits.connections_per_uid", raw.connections_per_uid, d.connections_per_uid)?,
        connections_per_address: count(
            "limits.connections_per_address",
            raw.connections_per_address,
            d.connections_per_address,
        )?,
        max_connections: count("limits.max_connections", raw.max_connections, d.max_connections)?,
        header_timeout: duration("limits.header_timeout", raw.header_timeout, d.header_timeout)?,
        idle_timeout: duration("limits.idle_timeout", raw.idle_timeout, d.idle_timeout)?,
        body_timeout: duration("limits.body_timeout", raw.body_timeout, d.body_timeout)?,
        max_in_flight: count("limits.max_in_flight", raw.max_in_flight, d.max_in_flight)?,
        max_queued: raw.max_queued.unwrap_or(d.max_queued),
        queue_timeout: duration("limits.queue_timeout", raw.queue_timeout, d.queue_timeout)?,
        in_flight_per_caller: count("limits.in_flight_per_caller", raw.in_flight_per_caller, d.in_flight_per_caller)?,
        rate_per_caller: rate("limits.rate_per_caller", raw.rate_per_caller, d.rate_per_caller)?,
        burst_per_caller: rate("limits.burst_per_caller", raw.burst_per_caller, d.burst_per_caller)?,
        refusal_window: duration("limits.refusal_window", raw.refusal_window, d.refusal_window)?,
        refusals_in_full: count("limits.refusals_in_full", raw.refusals_in_full, d.refusals_in_full)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wit_settings_are_checked_and_never_borrow_the_jwt_key_or_an_oidc_issuer() {
        let wit = |extra: &str| {
            parse(&format!(
                "{BASE}[jwt]\nkey = \"/etc/mayfly/jwt.pem\"\nissuer = \"https://mayfly.example.org\"\n[wit]\n{extra}"
            ))
        };
        let c = wit("").unwrap().wit;
        assert_eq!(
            (c.ttl.as_secs(), c.proof_max_lifetime.as_secs(), c.replay_cache_entries, c.issuer),
            (1800, 300, 100_000, None)
        );
        assert_eq!(
            wit("issuer = \"spiffe://example.org\"\n").unwrap().wit.issuer.as_deref(),
            Some("spiffe://example.org")
        );
        for (text, k) in [
            ("key = \"/etc/mayfly/jwt.pem\"\n", "wit.key"),
            ("issuer = \"https://mayfly.example.org\"\n", "wit.issuer"),
            ("issuer = \"HTTP://wit.example.org\"\n", "wit.issuer"),
            ("ttl = \"48h\"\n", "wit.ttl"),
            ("proof_max_lifetime = \"1h\"\n", "wit.proof_max_lifetime"),
            ("replay_cache_entries = 0\n", "wit.replay_cache_entries"),
            ("colour = \"red\"\n", "colour"),
        ] {
            let err = wit(text).unwrap_err().to_string();
            assert!(err.contains(k), "{text}: {err}");
        }
    }

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::try_from(
            toml::from_str::<RawConfig>(text)
                .map_err(|e| ConfigError::Syntax { path: "t".into(), message: e.to_string() })?,
        )
    }

    const BASE: &str = r#"
        trust_domain = "example.org"
        data_dir = "/var/lib/mayfly"
        [policy]
        bundle = "/etc/mayfly/policy.bundle"
        trusted_keys = ["/etc/mayfly/policy-signing.pub"]
        [workload_api]
        socket = "/run/mayfly/workload.sock"
        [ca]
        generate = true
    "#;

    #[test]
    fn the_shipped_example_is_valid() {
        let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/mayfly.toml")).unwrap();
        let c = parse(&text).unwrap();
        assert_eq!(c.default_ttl.as_secs(), 3600);
    }

    #[test]
    fn min_ttl_defaults_to_five_minutes_and_every_default_lifetime_must_clear_it() {
        let c = parse(BASE).unwrap();
        assert_eq!(c.min_ttl.as_secs(), 300);
        assert_eq!(c.ttl_bounds(), TtlBounds { min: c.min_ttl, max: c.max_ttl });
        for (section, key_name) in [
            ("[issuance]\ndefault_ttl = \"8s\"\n", "issuance.default_ttl"),
            ("[issuance]\njwt_ttl = \"1m\"\n", "issuance.jwt_ttl"),
            ("[issuance]\nmin_ttl = \"2d\"\n", "issuance.min_ttl"),
            ("[break_glass]\nmax_ttl = \"2m\"\n", "break_glass.max_ttl"),
        ] {
            let err = parse(&format!("{BASE}\n{section}")).unwrap_err().to_string();
            assert!(err.contains(key_name), "{section}: {err}");
        }
        let low = parse(&format!("{BASE}\n[issuance]\nmin_ttl = \"1s\"\ndefault_ttl = \"8s\"\n")).unwrap();
        assert_eq!((low.min_ttl.as_secs(), low.default_ttl.as_secs()), (1, 8));
    }

    #[test]
    fn limits_default_when_absent_and_a_bad_value_names_its_key() {
        let c = parse(BASE).unwrap();
        assert_eq!(c.limits, crate::limits::LimitsConfig::default());
        let set = parse(&format!("{BASE}\n[limits]\nconnections_per_uid = 8\nrefusal_window = \"2m\"\n")).unwrap();
        assert_eq!((set.limits.connections_per_uid, set.limits.refusal_window.as_secs()), (8, 120));
        for (text, k) in [
            ("connections_per_uid = 0\n", "limits.connections_per_uid"),
            ("rate_per_caller = 0\n", "limits.rate_per_caller"),
            ("body_timeout = \"soon\"\n", "limits.body_timeout"),
            ("per_uid = 3\n", "per_uid"),
        ] {
            let err = parse(&format!("{BASE}\n[limits]\n{text}")).unwrap_err().to_string();
            assert!(err.contains(k), "{text}: {err}");
        }
    }

    #[test]
    fn errors_name_the_key() {
        assert!(parse(BASE).is_ok());
        let unknown = format!("{BASE}\n[issuance]\nmax_tll = \"1h\"\n");
        assert!(parse(&unknown).unwrap_err().to_string().contains("max_tll"));
        let bad = format!("{BASE}\n[issuance]\nmax_ttl = \"banana\"\n");
        assert!(parse(&bad).unwrap_err().to_string().contains("issuance.max_ttl"));
        let no_td = BASE.replace("trust_domain = \"example.org\"", "");
        assert!(parse(&no_td).unwrap_err().to_string().contains("trust_domain"));
        let half_ca = BASE.replace("generate = true", "cert = \"/x.pem\"");
        assert!(parse(&half_ca).unwrap_err().to_string().contains("`ca`"));
        let with_rotation = |pct: u32| {
            BASE.replace(
                "socket = \"/run/mayfly/workload.sock\"",
                &format!("socket = \"/run/mayfly/workload.sock\"\nrotate_at_percent = {pct}"),
            )
        };
        assert_eq!(parse(&with_rotation(80)).unwrap().rotate_at_percent, 80);
        assert!(parse(&with_rotation(100)).unwrap_err().to_string().contains("workload_api.rotate_at_percent"));
        let unsigned = BASE.replace("trusted_keys = [\"/etc/mayfly/policy-signing.pub\"]", "");
        assert!(parse(&unsigned).unwrap_err().to_string().contains("policy.trusted_keys"));
    }

    #[test]
    fn the_exchange_is_configured_strictly() {
        let listen = "\n[listen]\naddress = \"127.0.0.1:8443\"\ncert = \"/t.pem\"\nkey = \"/k.pem\"\n";
        let issuer = |extra: &str| {
            format!(
                "{BASE}{listen}[jwt]\nissuer = \"https://mayfly.example.org\"\n[[oidc.issuer]]\nurl = \"https://token.actions.githubusercontent.com\"\n{extra}"
            )
        };
        let c = parse(&issuer("")).unwrap();
        assert_eq!(c.oidc_issuers[0].audiences, vec!["mayfly".to_owned()]);
        assert!(!c.oidc_issuers[0].dev_fallback, "serve never makes dev identities");
        let hs = parse(&issuer("algorithms = [\"HS256\"]\n")).unwrap_err().to_string();
        assert!(hs.contains("oidc.issuer.algorithms") && hs.contains("symmetric"), "{hs}");
        let plain = issuer("").replace("https://token.actions", "http://token.actions");
        assert!(parse(&plain).unwrap_err().to_string().contains("oidc.issuer.url"));
        let skew = parse(&issuer("clock_skew = \"10m\"\n")).unwrap_err().to_string();
        assert!(skew.contains("oidc.issuer.clock_skew"), "{skew}");
        let no_iss = format!("{BASE}{listen}");
        assert!(parse(&no_iss).unwrap_err().to_string().contains("jwt.issuer"));
        let no_listener = format!("{BASE}[[oidc.issuer]]\nurl = \"https://token.actions.githubusercontent.com\"\n");
        assert!(parse(&no_listener).unwrap_err().to_string().contains("`listen`"));
    }

    #[test]
    fn aws_is_configured_strictly() {
        let aws = |extra: &str| parse(&format!("{BASE}[aws]\n{extra}"));
        let c = aws("").unwrap().aws.unwrap();
        assert_eq!(
            (c.region.as_str(), c.mode, c.attempts, c.default_ttl.as_secs()),
            ("us-east-1", AwsMode::AssumeRole, 3, 3600)
        );
        assert!(aws("endpoint = \"http://127.0.0.1:5000\"\n").is_ok(), "an emulator on loopback");
        for (text, k) in [
            ("endpoint = \"http://sts.example.org\"\n", "aws.endpoint"),
            ("mode = \"web_identity\"\n", "aws.mode"),
            ("mode = \"keys\"\n", "aws.mode"),
            ("attempts = 0\n", "aws.attempts"),
            ("default_ttl = \"5m\"\n", "aws.default_ttl"),
            ("region = \"EU West\"\n", "aws.region"),
        ] {
            let err = aws(text).unwrap_err().to_string();
            assert!(err.contains(k), "{text}: {err}");
        }
        assert!(parse(BASE).unwrap().aws.is_none(), "no [aws]: no AWS credentials served");
    }
}
