//! gRPC services. Turns wire requests into domain requests (parsing at the edge) and
//! domain errors into `Status` in exactly one place (`status`). Decides nothing.

pub mod admin;
pub mod authority;
pub mod broker;
pub mod deadline;
pub mod exchange;
pub mod serve;
pub mod wiped;
pub mod workload;

use tonic::{Code, Status};

use crate::attest::AttestError;
use crate::attest::oidc::OidcError;
use crate::breakglass::ApprovalError;
use crate::issue::IssueError;
use crate::mint::MintError;
use crate::mint::aws::AwsMintError;

/// The generated `mayfly.v1` types.
pub mod pb {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("mayfly.v1");
}

/// The generated SPIFFE Workload API types (the standard proto has no package).
pub mod spiffe {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("_");
}

/// The one mapping from a domain error to what the peer sees: the category and a message
/// that names no secret. Details beyond that go to the log and the ledger.
pub fn status(err: &IssueError) -> Status {
    let code = match err {
        IssueError::Attest(AttestError::PeerWithoutCredentials | AttestError::Proc { .. }) => Code::Unauthenticated,
        IssueError::Attest(AttestError::CallerExited { .. } | AttestError::CredentialsChanged { .. }) => {
            Code::PermissionDenied
        }
        IssueError::NoEntry
        | IssueError::NameReused(_)
        | IssueError::EntryExpired { .. }
        | IssueError::Denied { .. } => Code::PermissionDenied,
        IssueError::Ambiguous(_) => Code::FailedPrecondition,
        IssueError::Ledger(_) => Code::Unavailable,
        IssueError::Mint(MintError::CsrEncoding(_) | MintError::CsrSignature | MintError::CsrKeyAlgorithm) => {
            Code::InvalidArgument
        }
        IssueError::Mint(
            MintError::CaExpired(_) | MintError::Signing(_) | MintError::KeyGeneration(_) | MintError::Profile { .. },
        ) => Code::Internal,
        IssueError::Mint(MintError::TooShort { .. }) => Code::FailedPrecondition,
        IssueError::InvalidJwt(_) => Code::InvalidArgument,
        IssueError::Token(OidcError::Unavailable(_)) => Code::Unavailable,
        IssueError::Token(_) => Code::Unauthenticated,
        IssueError::NoExchange => Code::FailedPrecondition,
        IssueError::Locked { .. } => Code::PermissionDenied,
        IssueError::Revoked(_) => Code::InvalidArgument,
        IssueError::BreakGlass(_) => Code::PermissionDenied,
        IssueError::Approval(ApprovalError::Unknown(_)) => Code::NotFound,
        IssueError::Approval(_) => Code::PermissionDenied,
        IssueError::Elevated(_) => Code::Unavailable,
        IssueError::Aws(AwsMintError::Upstream(_) | AwsMintError::Busy) => Code::Unavailable,
        IssueError::Aws(AwsMintError::Grant(_)) | IssueError::NoAws => Code::FailedPrecondition,
        IssueError::Aws(AwsMintError::Assertion(_)) => Code::Internal,
        IssueError::Stale { .. } => Code::Unavailable,
        IssueError::Limited(limited) => return limited_status(limited),
    };
    if code == Code::Internal || code == Code::Unavailable {
        tracing::error!(error = %err, "issuance failed");
    }
    Status::new(code, err.to_string())
}

/// RESOURCE_EXHAUSTED with when to retry: `grpc-retry-pushback-ms` (gRPC's retry pushback,
/// which gRPC clients with a retry policy honour) and `retry-after` (seconds, as HTTP says).
pub fn limited_status(limited: &crate::limits::Limited) -> Status {
    let mut status = Status::resource_exhausted(limited.to_string());
    let ms = limited.retry_after.as_millis().max(1);
    let secs = limited.retry_after.as_secs() + u64::from(limited.retry_after.subsec_nanos() > 0);
    if let Ok(v) = ms.to_string().parse() {
        status.metadata_mut().insert("grpc-retry-pushback-ms", v);
    }
    if let Ok(v) = secs.max(1).to_string().parse() {
        status.metadata_mut().insert("retry-after", v);
    }
    status
}

impl std::fmt::Debug for pb::AwsCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AwsCredentials")
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &"<redacted>")
            .field("session_token", &"<redacted>")
            .field("expiration", &self.expiration)
            .field("assumed_role_arn", &self.assumed_role_arn)
            .field("session_name", &self.session_name)
            .field("source_identity", &self.source_identity)
            .finish()
    }
}

impl std::fmt::Debug for pb::BreakGlassResponse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BreakGlassResponse")
            .field("pending_id", &self.pending_id)
            .field("credential_id", &self.credential_id)
            .field("spiffe_id", &self.spiffe_id)
            .field("serial", &self.serial)
            .field("not_after", &self.not_after)
            .field("token", &format_args!("<{} bytes>", self.token.len()))
            .field("wit_key", &"<redacted>")
            .field("aws", &self.aws)
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for spiffe::Witsvid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WITSVID")
            .field("spiffe_id", &self.spiffe_id)
            .field("wit_svid", &format_args!("<{} bytes>", self.wit_svid.len()))
            .field("wit_svid_key", &"<redacted>")
            .field("hint", &self.hint)
            .finish()
    }
}

/// An issued AWS session on the wire (the secrets are copied into the message here;
/// prost's buffers are beyond zeroize's reach, see PITFALLS).
pub fn aws_credentials(issued: &crate::issue::AwsCredential) -> pb::AwsCredentials {
    pb::AwsCredentials {
        access_key_id: issued.session.access_key_id.clone(),
        secret_access_key: issued.session.secret_access_key.expose().to_owned(),
        session_token: issued.session.session_token.expose().to_owned(),
        expiration: crate::clock::unix_secs(issued.session.expiration),
        assumed_role_arn: issued.session.assumed_role_arn.clone(),
        session_name: issued.session_name.clone(),
        source_identity: issued.source_identity.clone(),
    }
}

/// The lifetime asked for and granted, on the wire.
pub fn lifetime(l: &crate::issue::Lifetime) -> pb::Lifetime {
    let secs = |s: u64| i64::try_from(s).unwrap_or(i64::MAX);
    pb::Lifetime {
        requested_seconds: secs(l.requested),
        granted_seconds: secs(l.granted),
        clamped_by: l.clamped_by.clone().unwrap_or_default(),
    }
}

/// An issued credential of another kind than asked for: cannot happen (the pipeline mints
/// the kind it was asked), answered as an internal error rather than a panic.
pub fn wrong_kind() -> Status {
    tracing::error!("the pipeline returned a credential of another kind than asked for");
    Status::internal("internal error: unexpected credential kind")
}

/// A request refused at the edge, before attestation or policy: logged, not a ledger decision.
pub fn invalid(what: &str, err: impl std::fmt::Display) -> Status {
    tracing::info!(field = what, error = %err, "request refused as invalid");
    Status::invalid_argument(format!("{what}: {err}"))
}
