//! The TLS listener's routes: the CI token exchange as gRPC (`mayfly.v1.Exchange`) and as
//! plain HTTPS + JSON (`POST /v1/exchange`, so a workflow step can use curl), and the
//! documents relying parties verify mayfly's JWTs with (`/.well-known/openid-configuration`,
//! `/.well-known/jwks.json`), and for WIT-SVIDs the WIT keys (`/v1/wit/jwks.json`) and
//! proof-of-possession checks for relying parties (`POST /v1/wpt/verify`). Parses at the
//! edge, maps errors to statuses in one place, decides nothing: the `Issuer` verifies the
//! token and runs the one issuance path; the `Validator` checks proofs.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use serde::Deserialize;
use serde_json::{Value, json};
use tonic::Code;

use super::pb::exchange_server::{Exchange, ExchangeServer};
use super::pb::{ExchangeRequest as PbRequest, ExchangeResponse as PbResponse};
use super::{aws_credentials, status};
use crate::breakglass::{BreakGlassDesk, EmergencyOutcome, EmergencyRequest};
use crate::clock::unix_secs;
use crate::identity::{Ttl, TtlBounds};
use crate::issue::{Ask, Caller, Credential, IssueError, IssueRequest, Issued, Issuer, KeySource, Origin};
use crate::mint::{TrustBundle, VerifiedCsr};
use crate::policy::AwsRole;
use crate::validate::Validator;
use crate::validate::wpt::{self, Presented, ProofError};

/// The remote address of a TLS connection, put on each request by the listener.
#[derive(Clone, Debug)]
pub struct RemoteAddr(pub String);

#[derive(Clone)]
pub struct ExchangeApi {
    issuer: Arc<Issuer>,
    desk: Arc<BreakGlassDesk>,
    validator: Arc<Validator>,
    /// `iss` of mayfly's JWTs and the base of its discovery document.
    jwt_issuer: String,
    x509_ttl: Ttl,
    jwt_ttl: Ttl,
    aws_ttl: Ttl,
    bounds: TtlBounds,
    request_timeout: Duration,
    /// The published bundle: its JWKS at /.well-known/jwks.json, its CRLs at /crl.der and /crl.pem.
    bundles: Option<tokio::sync::watch::Receiver<Arc<TrustBundle>>>,
}

/// A parsed exchange request.
pub struct Asked {
    ask: Ask,
    ttl: Ttl,
    remote: String,
}

impl ExchangeApi {
    #[expect(clippy::too_many_arguments, reason = "the narrow handles and limits of the listener, each named")]
    pub fn new(
        issuer: Arc<Issuer>,
        desk: Arc<BreakGlassDesk>,
        validator: Arc<Validator>,
        jwt_issuer: String,
        x509_ttl: Ttl,
        jwt_ttl: Ttl,
        bounds: TtlBounds,
        request_timeout: Duration,
    ) -> Self {
        Self {
            issuer,
            desk,
            validator,
            jwt_issuer,
            x509_ttl,
            jwt_ttl,
            aws_ttl: x509_ttl,
            bounds,
            request_timeout,
            bundles: None,
        }
    }

    /// What an AWS request without a lifetime asks for.
    pub fn with_aws_ttl(mut self, ttl: Ttl) -> Self {
        self.aws_ttl = ttl;
        self
    }

    pub fn with_bundles(mut self, bundles: tokio::sync::watch::Receiver<Arc<TrustBundle>>) -> Self {
        self.bundles = Some(bundles);
        self
    }

    /// Every route of the listener, with the body limit on all of them. A path nothing
    /// serves answers 404, or gRPC UNIMPLEMENTED to a gRPC request (`/healthz` and
    /// `/readyz` are merged in by the daemon, which owns the health).
    pub fn router(self, max_request_bytes: usize) -> Router {
        let grpc =
            tonic::service::Routes::new(ExchangeServer::new(self.clone()).max_decoding_message_size(max_request_bytes))
                .prepare()
                .into_axum_router()
                .fallback(unknown_path);
        let json_only = axum::middleware::from_fn(move |request, next| json_body(max_request_bytes, request, next));
        let json_routes = Router::new()
            .route("/v1/exchange", post(http_exchange))
            .route("/v1/wpt/verify", post(verify_wpt))
            .route_layer(json_only)
            .with_state(self.clone());
        Router::new()
            .route("/.well-known/openid-configuration", get(discovery))
            .route("/.well-known/jwks.json", get(jwks))
            .route("/crl.der", get(crl_der))
            .route("/crl.pem", get(crl_pem))
            .route("/v1/introspect", post(introspect))
            .route("/v1/wit/jwks.json", get(wit_jwks))
            .with_state(self)
            .merge(json_routes)
            .merge(grpc)
            .layer(DefaultBodyLimit::max(max_request_bytes))
    }

    /// Parses a request (the same rules for gRPC and JSON) into the domain request.
    fn parse(
        &self,
        kind: &str,
        audience: Option<String>,
        csr: Option<&[u8]>,
        role: Option<String>,
        ttl: Option<i64>,
        remote: String,
    ) -> Result<Asked, Rejection> {
        let ttl_for = |default: Ttl| match ttl {
            None => Ok(default),
            Some(secs) => Ttl::from_request(secs, self.bounds).map_err(|e| Rejection::invalid("ttl", e)),
        };
        let kind = match kind {
            "jwt" => {
                let audience = audience
                    .filter(|a| !a.is_empty())
                    .ok_or_else(|| Rejection::invalid("audience", "required for kind jwt"))?;
                if audience.len() > 512 || audience.chars().any(char::is_control) {
                    return Err(Rejection::invalid("audience", "at most 512 characters, no control characters"));
                }
                Ask::Jwt { audiences: vec![audience] }
            }
            "x509" => {
                let csr =
                    csr.filter(|c| !c.is_empty()).ok_or_else(|| Rejection::invalid("csr", "required for kind x509"))?;
                Ask::X509 { key: KeySource::Csr(VerifiedCsr::parse(csr).map_err(|e| Rejection::invalid("csr", e))?) }
            }
            "aws" => {
                let role = role
                    .filter(|r| !r.is_empty())
                    .ok_or_else(|| Rejection::invalid("role", "required for kind aws"))?;
                Ask::Aws { role: AwsRole::parse(role.trim()).map_err(|e| Rejection::invalid("role", e))? }
            }
            other => {
                return Err(Rejection::invalid(
                    "kind",
                    format!("`{}` is not one of jwt, x509, aws", other.escape_debug()),
                ));
            }
        };
        let ttl = ttl_for(match kind {
            Ask::Jwt { .. } => self.jwt_ttl,
            Ask::X509 { .. } | Ask::Wit => self.x509_ttl,
            Ask::Aws { .. } => self.aws_ttl,
        })?;
        Ok(Asked { ask: kind, ttl, remote })
    }

    async fn run(&self, token: &str, req: Asked) -> Result<Issued, Rejection> {
        if token.is_empty() {
            return Err(Rejection::new(
                StatusCode::UNAUTHORIZED,
                Code::Unauthenticated,
                "invalid_token",
                "an id-token is required",
            ));
        }
        let caller = Caller::Presented { token, remote: &req.remote };
        let origin = Origin { api: "exchange", rotates: None, emergency: None };
        let request = IssueRequest { ask: req.ask, ttl: req.ttl, spiffe_id: None, origin };
        match tokio::time::timeout(self.request_timeout, self.issuer.issue(caller, request)).await {
            Ok(result) => result.map_err(|e| Rejection::from_issue(&e)),
            Err(_) => Err(Rejection::new(
                StatusCode::SERVICE_UNAVAILABLE,
                Code::Unavailable,
                "unavailable",
                "the request timed out",
            )),
        }
    }
}

/// A refused request: the HTTP status, the gRPC code, a short error name and the reason.
#[derive(Debug)]
pub struct Rejection {
    http: StatusCode,
    grpc: Code,
    error: &'static str,
    reason: String,
    /// Whole seconds to wait (a limit refused the request): `Retry-After`.
    retry_after: Option<u64>,
}

impl Rejection {
    fn new(http: StatusCode, grpc: Code, error: &'static str, reason: impl Into<String>) -> Self {
        Self { http, grpc, error, reason: reason.into(), retry_after: None }
    }

    fn status(self) -> tonic::Status {
        let mut status = tonic::Status::new(self.grpc, self.reason);
        if let Some(secs) = self.retry_after
            && let Ok(v) = secs.to_string().parse()
        {
            status.metadata_mut().insert("retry-after", v);
        }
        status
    }

    fn invalid(field: &str, why: impl std::fmt::Display) -> Self {
        tracing::info!(field, error = %why, "exchange request refused as invalid");
        Self::new(StatusCode::BAD_REQUEST, Code::InvalidArgument, "invalid_request", format!("{field}: {why}"))
    }

    /// Through the one error → status mapping, then the HTTP equivalent.
    fn from_issue(err: &IssueError) -> Self {
        let s = status(err);
        let (http, error) = match s.code() {
            Code::Unauthenticated => (StatusCode::UNAUTHORIZED, "invalid_token"),
            Code::PermissionDenied => (StatusCode::FORBIDDEN, "access_denied"),
            Code::InvalidArgument => (StatusCode::BAD_REQUEST, "invalid_request"),
            Code::Unavailable => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
            Code::FailedPrecondition => (StatusCode::CONFLICT, "failed_precondition"),
            Code::ResourceExhausted => (StatusCode::TOO_MANY_REQUESTS, "too_many_requests"),
            _ => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        };
        let retry_after = s.metadata().get("retry-after").and_then(|v| v.to_str().ok()).and_then(|v| v.parse().ok());
        Self { http, grpc: s.code(), error, reason: s.message().to_owned(), retry_after }
    }
}

impl IntoResponse for Rejection {
    fn into_response(self) -> Response {
        let mut response = (self.http, Json(json!({ "error": self.error, "reason": self.reason }))).into_response();
        if self.http == StatusCode::UNAUTHORIZED {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer error=\"invalid_token\""));
        }
        if let Some(secs) = self.retry_after {
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        response
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonRequest {
    token: String,
    kind: String,
    audience: Option<String>,
    /// PEM text (or base64 DER).
    csr: Option<String>,
    role: Option<String>,
    /// Seconds, or a duration like "10m".
    ttl: Option<Value>,
    /// The emergency path for an operator off-host: `{"reason": …, "ticket": …}`.
    break_glass: Option<JsonEmergency>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonEmergency {
    reason: String,
    ticket: String,
}

fn emergency_text(field: &str, v: &str, max: usize) -> Result<String, Rejection> {
    let v = v.trim();
    if v.is_empty() || v.len() > max || v.chars().any(char::is_control) {
        return Err(Rejection::invalid(field, format!("required, at most {max} characters, no control characters")));
    }
    Ok(v.to_owned())
}

/// The JSON body of `POST /v1/exchange`, read with nothing decided: the fields, the
/// lifetime in seconds and the CSR's bytes. Bounded by the body limit before it is called.
pub struct JsonBody {
    req: JsonRequest,
    ttl: Option<i64>,
    csr: Option<Vec<u8>>,
}

/// Parses an exchange body (also the fuzz target `exchange_body`); a refusal names the field.
pub fn parse_json_body(body: &[u8]) -> Result<JsonBody, Rejection> {
    let req: JsonRequest = serde_json::from_slice(body)
        .map_err(|e| Rejection::invalid("body", format!("not an exchange request: {e}")))?;
    let ttl = match &req.ttl {
        None => None,
        Some(Value::Number(n)) => Some(n.as_i64().ok_or_else(|| Rejection::invalid("ttl", "whole seconds"))?),
        Some(Value::String(s)) => {
            let t = Ttl::parse(s).map_err(|e| Rejection::invalid("ttl", e))?;
            Some(i64::try_from(t.as_secs()).unwrap_or(i64::MAX))
        }
        Some(_) => return Err(Rejection::invalid("ttl", "seconds or a duration like \"10m\"")),
    };
    let csr = req.csr.as_deref().map(csr_bytes).transpose().map_err(|e| Rejection::invalid("csr", e))?;
    Ok(JsonBody { req, ttl, csr })
}

async fn http_exchange(State(api): State<ExchangeApi>, remote: Option<Extension<RemoteAddr>>, body: Bytes) -> Response {
    let remote = remote.map(|Extension(r)| r.0).unwrap_or_default();
    let JsonBody { req, ttl, csr } = match parse_json_body(&body) {
        Ok(b) => b,
        Err(r) => return r.into_response(),
    };
    let parsed = match api.parse(&req.kind, req.audience, csr.as_deref(), req.role, ttl, remote) {
        Ok(p) => p,
        Err(r) => return r.into_response(),
    };
    if let Some(emergency) = req.break_glass {
        return http_break_glass(&api, &req.token, parsed, emergency).await;
    }
    match api.run(&req.token, parsed).await {
        Ok(issued) => Json(issued_json(&issued, false)).into_response(),
        Err(r) => r.into_response(),
    }
}

/// An issued credential as the exchange's JSON answer. AWS sessions carry the
/// credential_process fields (Version 1, AccessKeyId, SecretAccessKey, SessionToken,
/// Expiration in RFC 3339) beside mayfly's record of them.
fn issued_json(issued: &Issued, break_glass: bool) -> Value {
    let pem_of = |der: &[u8]| pem::encode(&pem::Pem::new("CERTIFICATE", der.to_vec()));
    let mut answer = match &issued.credential {
        Credential::Jwt(svid) => json!({
            "kind": "jwt",
            "token": svid.token.expose(),
            "expires_at": unix_secs(svid.not_after),
        }),
        Credential::X509(x) => json!({
            "kind": "x509",
            "certificate": pem_of(&x.svid.cert_der),
            "bundle": x.bundle.iter().map(|c| pem_of(c)).collect::<String>(),
            "serial": x.svid.serial,
            "expires_at": unix_secs(x.svid.not_after),
        }),
        Credential::Wit(wit) => json!({
            "kind": "wit",
            "token": wit.svid.token.expose(),
            "key": wit.key.private_jwk().expose(),
            "expires_at": unix_secs(wit.svid.not_after),
        }),
        Credential::Aws(aws) => json!({
            "kind": "aws",
            "expires_at": unix_secs(aws.session.expiration),
            "role_arn": aws.role_arn,
            "assumed_role_arn": aws.session.assumed_role_arn,
            "session_name": aws.session_name,
            "source_identity": aws.source_identity,
            "Version": 1,
            "AccessKeyId": aws.session.access_key_id,
            "SecretAccessKey": aws.session.secret_access_key.expose(),
            "SessionToken": aws.session.session_token.expose(),
            "Expiration": crate::clock::rfc3339(aws.session.expiration),
        }),
    };
    if let Some(map) = answer.as_object_mut() {
        if let Some(note) = issued.lifetime.note() {
            map.insert("requested_ttl".into(), issued.lifetime.requested.into());
            map.insert("granted_ttl".into(), issued.lifetime.granted.into());
            map.insert("ttl_note".into(), note.into());
        }
        map.insert("credential_id".into(), issued.credential_id.clone().into());
        map.insert("spiffe_id".into(), issued.identity.to_string().into());
        if break_glass || matches!(issued.credential, Credential::Aws(_)) {
            map.insert("break_glass".into(), break_glass.into());
        }
    }
    answer
}

async fn http_break_glass(api: &ExchangeApi, token: &str, parsed: Asked, emergency: JsonEmergency) -> Response {
    let (reason, ticket) = match (
        emergency_text("break_glass.reason", &emergency.reason, 1000),
        emergency_text("break_glass.ticket", &emergency.ticket, 64),
    ) {
        (Ok(r), Ok(t)) => (r, t),
        (Err(e), _) | (_, Err(e)) => return e.into_response(),
    };
    let request = EmergencyRequest { ask: parsed.ask, ttl: parsed.ttl, reason, ticket };
    let caller = Caller::Presented { token, remote: &parsed.remote };
    match tokio::time::timeout(api.request_timeout, api.desk.request(caller, request)).await {
        Ok(Ok(EmergencyOutcome::Issued(issued))) => Json(issued_json(&issued, true)).into_response(),
        Ok(Ok(EmergencyOutcome::Pending { .. })) => Rejection::new(
            StatusCode::FORBIDDEN,
            Code::PermissionDenied,
            "access_denied",
            "approval is served on the workload socket only",
        )
        .into_response(),
        Ok(Err(e)) => Rejection::from_issue(&e).into_response(),
        Err(_) => {
            Rejection::new(StatusCode::SERVICE_UNAVAILABLE, Code::Unavailable, "unavailable", "the request timed out")
                .into_response()
        }
    }
}

/// The JSON routes' gate, before any of the body is read: a declared length over the limit
/// is 413 at once (the body limit alone would read up to the limit first), and a body that
/// does not say it is JSON is 415.
async fn json_body(
    max_request_bytes: usize,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let declared =
        request.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > u64::try_from(max_request_bytes).unwrap_or(u64::MAX)) {
        return Rejection::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            Code::InvalidArgument,
            "invalid_request",
            format!("the body is over the limit of {max_request_bytes} bytes"),
        )
        .into_response();
    }
    let json = request
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("application/json"));
    if !json {
        return Rejection::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Code::InvalidArgument,
            "invalid_request",
            "the body must be JSON (content-type: application/json)",
        )
        .into_response();
    }
    next.run(request).await
}

/// A path nothing serves: gRPC clients get UNIMPLEMENTED (as gRPC says), everyone else a
/// plain 404 (tonic's own fallback answered every path HTTP 200 with a gRPC status).
async fn unknown_path(request: axum::extract::Request) -> Response {
    let grpc = request
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"));
    if grpc {
        return tonic::Status::unimplemented(format!("`{}` is not served here", request.uri().path())).into_http();
    }
    crate::telemetry::health::not_found().await
}

/// A CSR in JSON: PEM text, or base64 of DER.
fn csr_bytes(text: &str) -> Result<Vec<u8>, String> {
    use base64::Engine;
    if text.trim_start().starts_with("-----BEGIN") {
        return Ok(text.trim().as_bytes().to_vec());
    }
    base64::engine::general_purpose::STANDARD.decode(text.trim()).map_err(|_| "neither PEM nor base64 DER".to_owned())
}

/// The active CA's CRL (DER): what `openssl crl -inform DER` reads.
async fn crl_der(State(api): State<ExchangeApi>) -> Response {
    let crl = api.bundles.as_ref().and_then(|b| b.borrow().crls.first().cloned());
    match crl {
        Some(der) => ([(header::CONTENT_TYPE, "application/pkix-crl")], der).into_response(),
        None => {
            Rejection::new(StatusCode::SERVICE_UNAVAILABLE, Code::Unavailable, "unavailable", "no CRL is published")
                .into_response()
        }
    }
}

/// Every CA's CRL (the active one first), PEM.
async fn crl_pem(State(api): State<ExchangeApi>) -> Response {
    let crls = api.bundles.as_ref().map(|b| b.borrow().crls.clone()).unwrap_or_default();
    let text: String = crls.into_iter().map(|der| pem::encode(&pem::Pem::new("X509 CRL", der))).collect();
    ([(header::CONTENT_TYPE, "application/x-pem-file")], text).into_response()
}

/// RFC 7662 token introspection for mayfly's JWTs: `token=<jwt>` (form) → `{"active": …}`.
/// A live token's introspection is a `used` event; anything else is `{"active": false}`.
async fn introspect(State(api): State<ExchangeApi>, remote: Option<Extension<RemoteAddr>>, body: Bytes) -> Response {
    let remote = remote.map(|Extension(r)| r.0).unwrap_or_default();
    let token = form_value(&body, "token").unwrap_or_default();
    if token.is_empty() {
        return Rejection::invalid("token", "required (application/x-www-form-urlencoded `token=…`)").into_response();
    }
    match api.validator.introspect(&token, &remote).await {
        Ok(v) => {
            let mut reply = serde_json::Map::from_iter(v.claims);
            reply.insert("active".into(), json!(true));
            reply.insert("token_type".into(), json!("Bearer"));
            Json(Value::Object(reply)).into_response()
        }
        Err(IssueError::Ledger(_)) => Rejection::new(
            StatusCode::SERVICE_UNAVAILABLE,
            Code::Unavailable,
            "unavailable",
            "the use cannot be recorded",
        )
        .into_response(),
        Err(e) => {
            tracing::info!(%remote, reason = %e, "introspection: inactive token");
            Json(json!({ "active": false })).into_response()
        }
    }
}

/// `POST /v1/wpt/verify`: a relying party asks whether a WIT-SVID and its Workload Proof
/// Token prove the caller's identity for `audience` (and bind the access or transaction
/// token that came with the request, when given).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WptRequest {
    wit: String,
    wpt: String,
    audience: String,
    access_token: Option<String>,
    txn_token: Option<String>,
}

/// 200 `{"spiffe_id", "expires_at", "credential_id"}` for an accepted proof (recorded as a
/// use); 401 `{"error": "invalid_proof", "reason"}` for any refused one; 400 for a request
/// that is not one; 503 when the use cannot be recorded or too many proofs are live.
async fn verify_wpt(State(api): State<ExchangeApi>, remote: Option<Extension<RemoteAddr>>, body: Bytes) -> Response {
    let remote = remote.map(|Extension(r)| r.0).unwrap_or_default();
    let req: WptRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => return Rejection::invalid("body", format!("not a proof check: {e}")).into_response(),
    };
    let text = |field: &str, v: &str, max: usize| -> Result<(), Rejection> {
        if v.is_empty() || v.len() > max || v.chars().any(char::is_control) {
            return Err(Rejection::invalid(field, format!("required, 1..={max} bytes, no control characters")));
        }
        Ok(())
    };
    let checks = [
        text("wit", &req.wit, crate::mint::wit::MAX_WIT_BYTES),
        text("wpt", &req.wpt, wpt::MAX_WPT_BYTES),
        text("audience", &req.audience, wpt::MAX_AUDIENCE_BYTES),
        req.access_token.as_deref().map_or(Ok(()), |t| text("access_token", t, wpt::MAX_BOUND_TOKEN_BYTES)),
        req.txn_token.as_deref().map_or(Ok(()), |t| text("txn_token", t, wpt::MAX_BOUND_TOKEN_BYTES)),
    ];
    if let Some(Err(rejection)) = checks.into_iter().find(Result::is_err) {
        return rejection.into_response();
    }
    let presented = Presented {
        wit: &req.wit,
        wpt: &req.wpt,
        audience: &req.audience,
        access_token: req.access_token.as_deref(),
        txn_token: req.txn_token.as_deref(),
    };
    match api.validator.verify_proof(&presented, &remote).await {
        Ok(v) => Json(json!({
            "spiffe_id": v.identity.to_string(),
            "expires_at": v.wit_expires_at,
            "credential_id": v.credential_id,
        }))
        .into_response(),
        Err(e @ (ProofError::Ledger(_) | ProofError::Busy | ProofError::Unavailable(_))) => {
            Rejection::new(StatusCode::SERVICE_UNAVAILABLE, Code::Unavailable, "unavailable", e.to_string())
                .into_response()
        }
        Err(e) => {
            let mut response =
                (StatusCode::UNAUTHORIZED, Json(json!({ "error": "invalid_proof", "reason": e.to_string() })))
                    .into_response();
            // Why this scheme: RFC 9110 wants a challenge with a 401, and a WIT is never a
            // Bearer token (WIT-SVID spec, section 5).
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Workload-Proof-Token error=\"invalid_proof\""),
            );
            response
        }
    }
}

/// The WIT-SVID keys (`use: wit-svid`), for relying parties that verify WITs themselves.
async fn wit_jwks(State(api): State<ExchangeApi>) -> Json<Value> {
    Json(api.bundles.as_ref().map(|b| b.borrow().wit_jwks.clone()).unwrap_or_else(|| json!({ "keys": [] })))
}

/// One field of an application/x-www-form-urlencoded body.
fn form_value(body: &[u8], name: &str) -> Option<String> {
    url::form_urlencoded::parse(body).find(|(k, _)| k == name).map(|(_, v)| v.into_owned())
}

async fn discovery(State(api): State<ExchangeApi>) -> Json<Value> {
    Json(json!({
        "issuer": api.jwt_issuer,
        "jwks_uri": format!("{}/.well-known/jwks.json", api.jwt_issuer),
        "response_types_supported": ["id_token"],
        "subject_types_supported": ["public"],
        "id_token_signing_alg_values_supported": ["ES256"],
        "claims_supported": ["iss", "sub", "aud", "exp", "iat", "nbf", "jti"],
        "introspection_endpoint": format!("{}/v1/introspect", api.jwt_issuer),
    }))
}

/// The JWKS for OIDC relying parties: the same keys as the SPIFFE JWT bundle, marked for
/// signature verification (`use: sig`), which generic OIDC libraries look for.
async fn jwks(State(api): State<ExchangeApi>) -> Json<Value> {
    let mut set = api.bundles.as_ref().map(|b| b.borrow().jwks.clone()).unwrap_or_else(|| json!({ "keys": [] }));
    if let Some(keys) = set.get_mut("keys").and_then(Value::as_array_mut) {
        for key in keys {
            key["use"] = json!("sig");
        }
    }
    Json(set)
}

#[tonic::async_trait]
impl Exchange for ExchangeApi {
    async fn exchange(&self, request: tonic::Request<PbRequest>) -> Result<tonic::Response<PbResponse>, tonic::Status> {
        let remote = request.extensions().get::<RemoteAddr>().map(|r| r.0.clone()).unwrap_or_default();
        let req = request.into_inner();
        let to_status = Rejection::status;
        let opt = |s: String| if s.is_empty() { None } else { Some(s) };
        let csr = if req.csr.is_empty() { None } else { Some(req.csr.as_slice()) };
        let parsed =
            self.parse(&req.kind, opt(req.audience), csr, opt(req.role), req.ttl_seconds, remote).map_err(to_status)?;
        let issued = self.run(&req.token, parsed).await.map_err(to_status)?;
        let (credential_id, spiffe_id) = (issued.credential_id.clone(), issued.identity.to_string());
        let lifetime = Some(super::lifetime(&issued.lifetime));
        let reply = match issued.credential {
            Credential::Jwt(svid) => PbResponse {
                credential_id,
                spiffe_id,
                kind: "jwt".into(),
                token: svid.token.expose().to_owned(),
                expires_at: unix_secs(svid.not_after),
                ..Default::default()
            },
            Credential::X509(x) => PbResponse {
                credential_id,
                spiffe_id,
                kind: "x509".into(),
                cert_chain: vec![x.svid.cert_der],
                trust_bundle: x.bundle,
                serial: x.svid.serial,
                expires_at: unix_secs(x.svid.not_after),
                ..Default::default()
            },
            // Why refused: the exchange parses no `wit` request (a WIT's key is handed out on
            // the workload socket only), so this is a pipeline fault, not a reply.
            Credential::Wit(_) => return Err(super::wrong_kind()),
            Credential::Aws(aws) => PbResponse {
                credential_id,
                spiffe_id,
                kind: "aws".into(),
                serial: aws.session.access_key_id.clone(),
                expires_at: unix_secs(aws.session.expiration),
                aws: Some(aws_credentials(&aws)),
                ..Default::default()
            },
        };
        Ok(tonic::Response::new(PbResponse { lifetime, ..reply }))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::limits::{LimitKind, Limited};

    #[test]
    fn a_limited_request_is_429_with_retry_after_and_resource_exhausted_with_pushback() {
        let err = IssueError::Limited(Limited { kind: LimitKind::Rate, retry_after: Duration::from_millis(1500) });
        let status = status(&err);
        assert_eq!(status.code(), Code::ResourceExhausted);
        assert_eq!(status.metadata().get("grpc-retry-pushback-ms").unwrap(), "1500");
        assert_eq!(status.metadata().get("retry-after").unwrap(), "2", "whole seconds, rounded up");
        let response = Rejection::from_issue(&err).into_response();
        assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(response.headers().get(header::RETRY_AFTER).unwrap(), "2");
        let grpc = Rejection::from_issue(&err).status();
        assert_eq!(
            (grpc.code(), grpc.metadata().get("retry-after").unwrap().to_str().unwrap()),
            (Code::ResourceExhausted, "2")
        );
    }
}
