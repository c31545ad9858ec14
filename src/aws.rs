//! The AWS seam: the STS and IAM calls mayfly makes (`StsApi`, `IamApi`, used by
//! `mint::aws` and `revoke::aws`), and their SDK implementation: STS and IAM clients built
//! from the standard AWS configuration chain (environment, profile, container and instance
//! credentials), the configured region, and an optional endpoint (an emulator or a VPC
//! endpoint). Retries are mayfly's own (`AwsMinter`, bounded and logged), so the SDK's are
//! off; each attempt has a connect timeout here and an overall timeout in the minter.

use std::time::{Duration, SystemTime};

use aws_sdk_sts::error::{ProvideErrorMetadata, SdkError};

use crate::BoxFuture;
use crate::config::AwsConfig;
use crate::keys::SecretString;

/// Exactly what is sent to STS (never holds a secret).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AwsSessionRequest {
    pub role_arn: String,
    pub role_session_name: String,
    pub source_identity: String,
    pub tags: Vec<(String, String)>,
    pub policy: Option<String>,
    pub duration_seconds: i32,
}

/// A session STS issued. The secret key and token are zeroized on drop; `Debug` shows
/// only their lengths.
#[derive(Debug)]
pub struct StsSession {
    pub access_key_id: String,
    pub secret_access_key: SecretString,
    pub session_token: SecretString,
    pub expiration: SystemTime,
    pub assumed_role_arn: String,
}

/// An STS or IAM call that failed: the AWS error code and message (which never carry a
/// secret), or that AWS could not be reached in time.
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum AwsError {
    #[error("{operation} refused: {code}: {message}")]
    Service { operation: &'static str, code: String, message: String },
    #[error("{operation} did not answer in time")]
    Timeout { operation: &'static str },
    #[error("{operation}: AWS could not be reached: {why}")]
    Transport { operation: &'static str, why: String },
}

impl AwsError {
    /// The AWS error code, or `Timeout` / `Unreachable`.
    pub fn code(&self) -> &str {
        match self {
            AwsError::Service { code, .. } => code,
            AwsError::Timeout { .. } => "Timeout",
            AwsError::Transport { .. } => "Unreachable",
        }
    }

    /// Worth another try: throttling, AWS-side faults, timeouts, connection failures.
    pub fn is_transient(&self) -> bool {
        const TRANSIENT: [&str; 11] = [
            "Throttling",
            "ThrottlingException",
            "RequestLimitExceeded",
            "TooManyRequestsException",
            "ServiceUnavailable",
            "ServiceUnavailableException",
            "InternalFailure",
            "InternalError",
            "IDPCommunicationError",
            "RequestTimeout",
            "PriorRequestNotComplete",
        ];
        match self {
            AwsError::Service { code, .. } => TRANSIENT.contains(&code.as_str()),
            AwsError::Timeout { .. } | AwsError::Transport { .. } => true,
        }
    }
}

/// The STS calls mayfly makes.
pub trait StsApi: Send + Sync + 'static {
    fn assume_role<'a>(&'a self, req: &'a AwsSessionRequest) -> BoxFuture<'a, Result<StsSession, AwsError>>;

    /// The session's source identity and tags travel in the token's claims; STS takes
    /// the rest of `req` as parameters.
    fn assume_role_with_web_identity<'a>(
        &'a self,
        req: &'a AwsSessionRequest,
        token: &'a SecretString,
    ) -> BoxFuture<'a, Result<StsSession, AwsError>>;
}

/// The IAM calls mayfly makes: a role's session ceiling, and the revocation hook's
/// inline deny policies.
pub trait IamApi: Send + Sync + 'static {
    /// The AWS account the broker's credentials are in: IAM calls only ever reach roles there.
    fn account(&self) -> BoxFuture<'_, Result<String, AwsError>>;
    fn max_session_duration<'a>(&'a self, role_name: &'a str) -> BoxFuture<'a, Result<Duration, AwsError>>;
    fn put_role_policy<'a>(
        &'a self,
        role_name: &'a str,
        policy_name: &'a str,
        document: &'a str,
    ) -> BoxFuture<'a, Result<(), AwsError>>;
    /// `Ok(false)`: there was no such policy (already removed).
    fn delete_role_policy<'a>(
        &'a self,
        role_name: &'a str,
        policy_name: &'a str,
    ) -> BoxFuture<'a, Result<bool, AwsError>>;
}

pub struct SdkAws {
    sts: aws_sdk_sts::Client,
    iam: aws_sdk_iam::Client,
    /// The broker's own account (STS GetCallerIdentity), asked once.
    account: tokio::sync::OnceCell<String>,
}

impl SdkAws {
    /// Loads the standard chain once at start. Credentials themselves are fetched (and
    /// refreshed) lazily by the SDK, so a missing one shows up as an STS error per call.
    pub async fn connect(config: &AwsConfig) -> Self {
        let timeouts = aws_config::timeout::TimeoutConfig::builder()
            .connect_timeout(Duration::from_secs(3))
            .operation_attempt_timeout(config.attempt_timeout)
            .build();
        let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest())
            .region(aws_config::Region::new(config.region.clone()))
            .retry_config(aws_config::retry::RetryConfig::disabled())
            .timeout_config(timeouts);
        if let Some(url) = &config.endpoint {
            loader = loader.endpoint_url(url);
        }
        let shared = loader.load().await;
        Self {
            sts: aws_sdk_sts::Client::new(&shared),
            iam: aws_sdk_iam::Client::new(&shared),
            account: tokio::sync::OnceCell::new(),
        }
    }
}

fn sdk_error<E, R>(operation: &'static str, err: SdkError<E, R>) -> AwsError
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
    R: std::fmt::Debug,
{
    match err {
        SdkError::ServiceError(e) => {
            let e = e.err();
            AwsError::Service {
                operation,
                code: e.code().unwrap_or("Unknown").to_owned(),
                message: e.message().unwrap_or_default().to_owned(),
            }
        }
        SdkError::TimeoutError(_) => AwsError::Timeout { operation },
        other => AwsError::Transport { operation, why: display_chain(&other) },
    }
}

/// An error and its sources, by `Display` only: `DisplayErrorContext` appends Debug output,
/// which for a response error includes the raw response (and so could carry a secret).
fn display_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// Moves the secrets out of the SDK's response into zeroizing strings (the SDK's own
/// strings are left empty; its response buffers are out of reach, see PITFALLS).
fn session(
    operation: &'static str,
    credentials: Option<aws_sdk_sts::types::Credentials>,
    arn: Option<String>,
) -> Result<StsSession, AwsError> {
    let missing = || AwsError::Service {
        operation,
        code: "IncompleteResponse".into(),
        message: "STS answered without credentials".into(),
    };
    let mut c = credentials.ok_or_else(missing)?;
    let expiration = SystemTime::try_from(c.expiration).map_err(|_| missing())?;
    Ok(StsSession {
        access_key_id: std::mem::take(&mut c.access_key_id),
        secret_access_key: SecretString::new(std::mem::take(&mut c.secret_access_key)),
        session_token: SecretString::new(std::mem::take(&mut c.session_token)),
        expiration,
        assumed_role_arn: arn.unwrap_or_default(),
    })
}

fn tags(operation: &'static str, req: &AwsSessionRequest) -> Result<Vec<aws_sdk_sts::types::Tag>, AwsError> {
    req.tags
        .iter()
        .map(|(k, v)| {
            aws_sdk_sts::types::Tag::builder().key(k).value(v).build().map_err(|e| AwsError::Service {
                operation,
                code: "InvalidTag".into(),
                message: e.to_string(),
            })
        })
        .collect()
}

impl StsApi for SdkAws {
    fn assume_role<'a>(&'a self, req: &'a AwsSessionRequest) -> BoxFuture<'a, Result<StsSession, AwsError>> {
        Box::pin(async move {
            const OP: &str = "AssumeRole";
            let tags = tags(OP, req)?;
            let mut out = self
                .sts
                .assume_role()
                .role_arn(&req.role_arn)
                .role_session_name(&req.role_session_name)
                .source_identity(&req.source_identity)
                .set_tags((!tags.is_empty()).then_some(tags))
                .set_policy(req.policy.clone())
                .duration_seconds(req.duration_seconds)
                .send()
                .await
                .map_err(|e| sdk_error(OP, e))?;
            let arn = out.assumed_role_user.take().map(|u| u.arn);
            session(OP, out.credentials.take(), arn)
        })
    }

    fn assume_role_with_web_identity<'a>(
        &'a self,
        req: &'a AwsSessionRequest,
        token: &'a SecretString,
    ) -> BoxFuture<'a, Result<StsSession, AwsError>> {
        Box::pin(async move {
            const OP: &str = "AssumeRoleWithWebIdentity";
            let mut out = self
                .sts
                .assume_role_with_web_identity()
                .role_arn(&req.role_arn)
                .role_session_name(&req.role_session_name)
                .web_identity_token(token.expose())
                .set_policy(req.policy.clone())
                .duration_seconds(req.duration_seconds)
                .send()
                .await
                .map_err(|e| sdk_error(OP, e))?;
            let arn = out.assumed_role_user.take().map(|u| u.arn);
            session(OP, out.credentials.take(), arn)
        })
    }
}

impl IamApi for SdkAws {
    fn account(&self) -> BoxFuture<'_, Result<String, AwsError>> {
        Box::pin(async move {
            self.account
                .get_or_try_init(|| async {
                    let out =
                        self.sts.get_caller_identity().send().await.map_err(|e| sdk_error("GetCallerIdentity", e))?;
                    out.account.ok_or_else(|| AwsError::Service {
                        operation: "GetCallerIdentity",
                        code: "IncompleteResponse".into(),
                        message: "no account".into(),
                    })
                })
                .await
                .cloned()
        })
    }

    fn max_session_duration<'a>(&'a self, role_name: &'a str) -> BoxFuture<'a, Result<Duration, AwsError>> {
        Box::pin(async move {
            let out = self.iam.get_role().role_name(role_name).send().await.map_err(|e| sdk_error("GetRole", e))?;
            let secs = out.role().and_then(|r| r.max_session_duration()).unwrap_or(3600);
            Ok(Duration::from_secs(u64::try_from(secs).unwrap_or(3600)))
        })
    }

    fn put_role_policy<'a>(
        &'a self,
        role_name: &'a str,
        policy_name: &'a str,
        document: &'a str,
    ) -> BoxFuture<'a, Result<(), AwsError>> {
        Box::pin(async move {
            self.iam
                .put_role_policy()
                .role_name(role_name)
                .policy_name(policy_name)
                .policy_document(document)
                .send()
                .await
                .map_err(|e| sdk_error("PutRolePolicy", e))?;
            Ok(())
        })
    }

    fn delete_role_policy<'a>(
        &'a self,
        role_name: &'a str,
        policy_name: &'a str,
    ) -> BoxFuture<'a, Result<bool, AwsError>> {
        Box::pin(async move {
            match self.iam.delete_role_policy().role_name(role_name).policy_name(policy_name).send().await {
                Ok(_) => Ok(true),
                Err(SdkError::ServiceError(e)) if e.err().is_no_such_entity_exception() => Ok(false),
                Err(e) => Err(sdk_error("DeleteRolePolicy", e)),
            }
        })
    }
}
