//! `mayfly aws`: AWS credentials for a role from a running daemon, printed as the JSON
//! the AWS SDKs and CLI read from a `credential_process` (Version 1, AccessKeyId,
//! SecretAccessKey, SessionToken, Expiration). In ~/.aws/config:
//!
//! ```text
//! [profile deploy]
//! credential_process = mayfly aws --socket /run/mayfly/workload.sock --role arn:aws:iam::111122223333:role/deploy
//! ```
//!
//! The secrets go to stdout only (for the SDK that ran this); errors go to stderr with a
//! non-zero exit, which the SDKs report as a credentials failure.

use std::io::Write;
use std::process::ExitCode;

use zeroize::Zeroizing;

use super::fail;
use crate::api::pb::IssueAwsRequest;
use crate::api::pb::broker_client::BrokerClient;
use crate::identity::Ttl;

/// The `credential_process` output format (AWS SDKs and CLI).
#[derive(serde::Serialize)]
#[serde(rename_all = "PascalCase")]
struct CredentialProcess<'a> {
    version: u8,
    access_key_id: &'a str,
    secret_access_key: &'a str,
    session_token: &'a str,
    expiration: &'a str,
}

#[derive(clap::Args)]
#[command(after_help = "Examples:\n  \
    mayfly aws --role arn:aws:iam::123456789012:role/mayfly-dev-reader\n  \
    credential_process = mayfly aws --socket /run/mayfly/workload.sock --role arn:aws:iam::111122223333:role/deploy\n\
    A lifetime granted shorter than --ttl asks for is reported on stderr with the rule that capped it.")]
pub struct Args {
    #[command(flatten)]
    at: super::SocketAt,
    /// The IAM role ARN to assume.
    #[arg(long)]
    role: String,
    /// Requested session lifetime (`15m`, `1h`); AWS's floor is 15 minutes, and policy and
    /// the role's maximum may shorten it.
    #[arg(long)]
    ttl: Option<String>,
    /// Which identity, when the caller is registered under several.
    #[arg(long)]
    spiffe_id: Option<String>,
}

pub async fn run(args: Args) -> ExitCode {
    let ttl_seconds = match args.ttl.as_deref().map(Ttl::parse).transpose() {
        Ok(t) => t.map(|t| i64::try_from(t.as_secs()).unwrap_or(i64::MAX)),
        Err(e) => return fail(format!("--ttl: {e}")),
    };
    let socket = match args.at.socket() {
        Ok(s) => s,
        Err(e) => return fail(e),
    };
    let channel = match super::connect(&socket).await {
        Ok(c) => c,
        Err(e) => return fail(format!("cannot reach the daemon at `{}`: {e}", socket.display())),
    };
    let request = IssueAwsRequest { role: args.role, ttl_seconds, spiffe_id: args.spiffe_id.unwrap_or_default() };
    let reply = match BrokerClient::new(channel).issue_aws(request).await {
        Ok(r) => r.into_inner(),
        Err(status) => return fail(format!("{:?}: {}", status.code(), status.message())),
    };
    // Why stderr: stdout is the credential_process document the SDK parses.
    if let Some(note) = reply.lifetime.as_ref().and_then(super::lifetime_note) {
        eprintln!("mayfly aws: {note}");
    }
    let Some(mut c) = reply.credentials else {
        return fail("the daemon answered without credentials");
    };
    let expiration = crate::clock::rfc3339(
        std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(c.expiration.max(0).unsigned_abs()),
    );
    // Serialized straight from the reply's strings into one buffer zeroized on drop; the
    // reply's own copies are zeroized below.
    let output = serde_json::to_string(&CredentialProcess {
        version: 1,
        access_key_id: &c.access_key_id,
        secret_access_key: &c.secret_access_key,
        session_token: &c.session_token,
        expiration: &expiration,
    })
    .map(Zeroizing::new);
    {
        use zeroize::Zeroize;
        c.secret_access_key.zeroize();
        c.session_token.zeroize();
    }
    let output = match output {
        Ok(o) => o,
        Err(e) => return fail(format!("encoding the credentials: {e}")),
    };
    let mut stdout = std::io::stdout().lock();
    if let Err(e) =
        stdout.write_all(output.as_bytes()).and_then(|()| stdout.write_all(b"\n")).and_then(|()| stdout.flush())
    {
        return fail(format!("writing the credentials: {e}"));
    }
    ExitCode::SUCCESS
}
