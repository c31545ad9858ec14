//! The TLS listener's routes: the CI token exchange as gRPC (`mayfly.v1.Exchange`) and as
//! plain HTTPS + JSON (`POST /v1/exchange`, so a workflow step can use curl), and the
//! documents relying parties verify mayfly's JWTs with (`/.well-known/openid-configuration`,
//! `/.well-known/jwks.json`). Parses at the edge, maps errors to statuses in one place,
//! decides nothing: the `Issuer` verifies the token and runs the one issuance path.

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
use crate::clock::unix_secs;
use crate::identity::Ttl;
use crate::issue::{
    EmergencyKind, EmergencyOutcome, EmergencyRequest, ExchangeKind, ExchangeRequest, Exchanged, IssueError, IssuedAws,
    Issuer,
};
use crate::mint::{TrustBundle, VerifiedCsr};
use crate::policy::AwsRole;

/// The remote address of a TLS connection, put on each request by the listener.
#[derive(Clone, Debug)]
pub struct RemoteAddr(pub String);

#[derive(Clone)]
pub struct ExchangeApi {
    issuer: Arc<Issuer>,
    /// `iss` of mayfly's JWTs and the base of its discovery document.
    jwt_issuer: String,
    x509_ttl: Ttl,
    jwt_ttl: Ttl,
    aws_ttl: Ttl,
    max_ttl: Ttl,
    request_timeout: Duration,
    /// The published bundle: its CRLs are served at /crl.der and /crl.pem.
    bundles: Option<tokio::sync::watch::Receiver<Arc<TrustBundle>>>,
}

impl ExchangeApi {
    pub fn new(
        issuer: Arc<Issuer>,
        jwt_issuer: String,
        x509_ttl: Ttl,
        jwt_ttl: Ttl,
        max_ttl: Ttl,
        request_timeout: Duration,
    ) -> Self {
        Self { issuer, jwt_issuer, x509_ttl, jwt_ttl, aws_ttl: x509_ttl, max_ttl, request_timeout, bundles: None }
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

    /// Every route of the listener, with the body limit on all of them.
    pub fn router(self, max_request_bytes: usize) -> Router {
        let grpc =
            tonic::service::Routes::new(ExchangeServer::new(self.clone()).max_decoding_message_size(max_request_bytes))
                .prepare()
                .into_axum_router();
        Router::new()
            .route("/v1/exchange", post(http_exchange))
            .route("/.well-known/openid-configuration", get(discovery))
            .route("/.well-known/jwks.json", get(jwks))
            .route("/healthz", get(|| async { "ok\n" }))
            .route("/crl.der", get(crl_der))
            .route("/crl.pem", get(crl_pem))
            .route("/v1/introspect", post(introspect))
            .with_state(self)
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
    ) -> Result<ExchangeRequest, Rejection> {
        let ttl_for = |default: Ttl| match ttl {
            None => Ok(default),
            Some(secs) => Ttl::from_request(secs, self.max_ttl).map_err(|e| Rejection::invalid("ttl", e)),
        };
        let kind = match kind {
            "jwt" => {
                let audience = audience
                    .filter(|a| !a.is_empty())
                    .ok_or_else(|| Rejection::invalid("audience", "required for kind jwt"))?;
                if audience.len() > 512 || audience.chars().any(char::is_control) {
                    return Err(Rejection::invalid("audience", "at most 512 characters, no control characters"));
                }
                ExchangeKind::Jwt { audience }
            }
            "x509" => {
                let csr =
                    csr.filter(|c| !c.is_empty()).ok_or_else(|| Rejection::invalid("csr", "required for kind x509"))?;
                ExchangeKind::X509 { csr: VerifiedCsr::parse(csr).map_err(|e| Rejection::invalid("csr", e))? }
            }
            "aws" => {
                let role = role
                    .filter(|r| !r.is_empty())
                    .ok_or_else(|| Rejection::invalid("role", "required for kind aws"))?;
                ExchangeKind::Aws { role: AwsRole::parse(role.trim()).map_err(|e| Rejection::invalid("role", e))? }
            }
            other => {
                return Err(Rejection::invalid(
                    "kind",
                    format!("`{}` is not one of jwt, x509, aws", other.escape_debug()),
                ));
            }
        };
        let ttl = ttl_for(match kind {
            ExchangeKind::Jwt { .. } => self.jwt_ttl,
            ExchangeKind::X509 { .. } => self.x509_ttl,
            ExchangeKind::Aws { .. } => self.aws_ttl,
        })?;
        Ok(ExchangeRequest { kind, ttl, remote })
    }

    async fn run(&self, token: &str, req: ExchangeRequest) -> Result<Exchanged, Rejection> {
        if token.is_empty() {
            return Err(Rejection::new(
                StatusCode::UNAUTHORIZED,
                Code::Unauthenticated,
                "invalid_token",
                "an id-token is required",
            ));
        }
        match tokio::time::timeout(self.request_timeout, self.issuer.exchange(token, req)).await {
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
}

impl Rejection {
    fn new(http: StatusCode, grpc: Code, error: &'static str, reason: impl Into<String>) -> Self {
        Self { http, grpc, error, reason: reason.into() }
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
            _ => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        };
        Self { http, grpc: s.code(), error, reason: s.message().to_owned() }
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

async fn http_exchange(State(api): State<ExchangeApi>, remote: Option<Extension<RemoteAddr>>, body: Bytes) -> Response {
    let remote = remote.map(|Extension(r)| r.0).unwrap_or_default();
    let req: JsonRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => return Rejection::invalid("body", format!("not an exchange request: {e}")).into_response(),
    };
    let ttl = match req.ttl {
        None => None,
        Some(Value::Number(n)) => match n.as_i64() {
            Some(secs) => Some(secs),
            None => return Rejection::invalid("ttl", "whole seconds").into_response(),
        },
        Some(Value::String(s)) => match Ttl::parse(&s) {
            Ok(t) => Some(i64::try_from(t.as_secs()).unwrap_or(i64::MAX)),
            Err(e) => return Rejection::invalid("ttl", e).into_response(),
        },
        Some(_) => return Rejection::invalid("ttl", "seconds or a duration like \"10m\"").into_response(),
    };
    let csr = match req.csr.as_deref().map(csr_bytes) {
        Some(Err(e)) => return Rejection::invalid("csr", e).into_response(),
        Some(Ok(bytes)) => Some(bytes),
        None => None,
    };
    let parsed = match api.parse(&req.kind, req.audience, csr.as_deref(), req.role, ttl, remote) {
        Ok(p) => p,
        Err(r) => return r.into_response(),
    };
    if let Some(emergency) = req.break_glass {
        return http_break_glass(&api, &req.token, parsed, emergency).await;
    }
    match api.run(&req.token, parsed).await {
        Ok(Exchanged::Jwt(issued)) => Json(json!({
            "kind": "jwt",
            "credential_id": issued.credential_id,
            "spiffe_id": issued.identity.as_str(),
            "token": issued.svid.token.expose(),
            "expires_at": unix_secs(issued.svid.not_after),
        }))
        .into_response(),
        Ok(Exchanged::X509(issued)) => {
            let pem_of = |der: &[u8]| pem::encode(&pem::Pem::new("CERTIFICATE", der.to_vec()));
            Json(json!({
                "kind": "x509",
                "credential_id": issued.credential_id,
                "spiffe_id": issued.identity.as_str(),
                "certificate": pem_of(&issued.svid.cert_der),
                "bundle": issued.bundle.iter().map(|c| pem_of(c)).collect::<String>(),
                "serial": issued.svid.serial,
                "expires_at": unix_secs(issued.svid.not_after),
            }))
            .into_response()
        }
        Ok(Exchanged::Aws(issued)) => Json(aws_json(&issued, false)).into_response(),
        Err(r) => r.into_response(),
    }
}

/// An AWS session as JSON: the credential_process fields (Version 1, AccessKeyId,
/// SecretAccessKey, SessionToken, Expiration in RFC 3339) and mayfly's record of it.
fn aws_json(issued: &IssuedAws, break_glass: bool) -> Value {
    json!({
        "kind": "aws",
        "break_glass": break_glass,
        "credential_id": issued.credential_id,
        "spiffe_id": issued.identity.as_str(),
        "expires_at": unix_secs(issued.session.expiration),
        "role_arn": issued.role_arn,
        "assumed_role_arn": issued.session.assumed_role_arn,
        "session_name": issued.session_name,
        "source_identity": issued.source_identity,
        "Version": 1,
        "AccessKeyId": issued.session.access_key_id,
        "SecretAccessKey": issued.session.secret_access_key.expose(),
        "SessionToken": issued.session.session_token.expose(),
        "Expiration": crate::clock::rfc3339(issued.session.expiration),
    })
}

async fn http_break_glass(
    api: &ExchangeApi,
    token: &str,
    parsed: ExchangeRequest,
    emergency: JsonEmergency,
) -> Response {
    let (reason, ticket) = match (
        emergency_text("break_glass.reason", &emergency.reason, 1000),
        emergency_text("break_glass.ticket", &emergency.ticket, 64),
    ) {
        (Ok(r), Ok(t)) => (r, t),
        (Err(e), _) | (_, Err(e)) => return e.into_response(),
    };
    let kind = match parsed.kind {
        ExchangeKind::Jwt { audience } => EmergencyKind::Jwt { audience },
        ExchangeKind::X509 { csr } => EmergencyKind::X509 { csr },
        ExchangeKind::Aws { role } => EmergencyKind::Aws { role },
    };
    let request = EmergencyRequest { kind, ttl: parsed.ttl, reason, ticket };
    let outcome =
        tokio::time::timeout(api.request_timeout, api.issuer.exchange_break_glass(token, &parsed.remote, request))
            .await;
    let pem_of = |der: &[u8]| pem::encode(&pem::Pem::new("CERTIFICATE", der.to_vec()));
    match outcome {
        Ok(Ok(EmergencyOutcome::Jwt(issued))) => Json(json!({
            "kind": "jwt", "break_glass": true, "credential_id": issued.credential_id, "spiffe_id": issued.identity.as_str(),
            "token": issued.svid.token.expose(), "expires_at": unix_secs(issued.svid.not_after),
        }))
        .into_response(),
        Ok(Ok(EmergencyOutcome::X509(issued))) => Json(json!({
            "kind": "x509", "break_glass": true, "credential_id": issued.credential_id, "spiffe_id": issued.identity.as_str(),
            "certificate": pem_of(&issued.svid.cert_der), "bundle": issued.bundle.iter().map(|c| pem_of(c)).collect::<String>(),
            "serial": issued.svid.serial, "expires_at": unix_secs(issued.svid.not_after),
        }))
        .into_response(),
        Ok(Ok(EmergencyOutcome::Aws(issued))) => Json(aws_json(&issued, true)).into_response(),
        Ok(Ok(EmergencyOutcome::Pending { .. })) => Rejection::new(StatusCode::FORBIDDEN, Code::PermissionDenied, "access_denied", "approval is served on the workload socket only").into_response(),
        Ok(Err(e)) => Rejection::from_issue(&e).into_response(),
        Err(_) => Rejection::new(StatusCode::SERVICE_UNAVAILABLE, Code::Unavailable, "unavailable", "the request timed out").into_response(),
    }
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
    match api.issuer.introspect(&token, &remote).await {
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
    let mut set = api.issuer.jwks();
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
        let to_status = |r: Rejection| tonic::Status::new(r.grpc, r.reason);
        let opt = |s: String| if s.is_empty() { None } else { Some(s) };
        let csr = if req.csr.is_empty() { None } else { Some(req.csr.as_slice()) };
        let parsed =
            self.parse(&req.kind, opt(req.audience), csr, opt(req.role), req.ttl_seconds, remote).map_err(to_status)?;
        let reply = match self.run(&req.token, parsed).await.map_err(to_status)? {
            Exchanged::Jwt(issued) => PbResponse {
                credential_id: issued.credential_id,
                spiffe_id: issued.identity.to_string(),
                kind: "jwt".into(),
                token: issued.svid.token.expose().to_owned(),
                expires_at: unix_secs(issued.svid.not_after),
                ..Default::default()
            },
            Exchanged::X509(issued) => PbResponse {
                credential_id: issued.credential_id,
                spiffe_id: issued.identity.to_string(),
                kind: "x509".into(),
                cert_chain: vec![issued.svid.cert_der],
                trust_bundle: issued.bundle,
                serial: issued.svid.serial,
                expires_at: unix_secs(issued.svid.not_after),
                ..Default::default()
            },
            Exchanged::Aws(issued) => PbResponse {
                credential_id: issued.credential_id.clone(),
                spiffe_id: issued.identity.to_string(),
                kind: "aws".into(),
                serial: issued.session.access_key_id.clone(),
                expires_at: unix_secs(issued.session.expiration),
                aws: Some(aws_credentials(&issued)),
                ..Default::default()
            },
        };
        Ok(tonic::Response::new(reply))
    }
}
