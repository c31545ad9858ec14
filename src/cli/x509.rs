//! `mayfly x509`: a client of the workload socket. Without --csr it makes a P-256 key
//! locally; the private key never leaves this process except into key.pem (mode 0600).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint};
use zeroize::Zeroizing;

use super::fail;
use crate::api::pb::IssueX509Request;
use crate::api::pb::broker_client::BrokerClient;
use crate::identity::Ttl;

#[derive(clap::Args)]
#[command(after_help = "Examples:\n  \
    mayfly x509 --out /tmp/c                       # a P-256 key made here, sent as a CSR\n  \
    mayfly x509 --csr my.csr --ttl 30m --out /tmp/c --config /etc/mayfly/mayfly.toml\n\
    When policy grants less than --ttl asks for, the output says so and names the rule that capped it.")]
pub struct Args {
    #[command(flatten)]
    at: super::SocketAt,
    /// A PKCS#10 CSR (PEM or DER). Without it a P-256 key is generated here.
    #[arg(long)]
    csr: Option<PathBuf>,
    /// Requested lifetime (`90s`, `30m`, `1h`); policy may shorten it.
    #[arg(long)]
    ttl: Option<String>,
    /// Which identity, when the caller is registered under several.
    #[arg(long)]
    spiffe_id: Option<String>,
    /// Directory for cert.pem, key.pem and bundle.pem.
    #[arg(long)]
    out: PathBuf,
}

/// A gRPC channel over a Unix socket.
pub async fn connect(socket: &Path) -> Result<Channel, tonic::transport::Error> {
    let socket = socket.to_path_buf();
    // The URI is required by the API and ignored by the connector.
    Endpoint::from_static("http://mayfly.invalid")
        .connect_with_connector(tower::service_fn(move |_| {
            let socket = socket.clone();
            async move { UnixStream::connect(socket).await.map(TokioIo::new) }
        }))
        .await
}

pub async fn run(args: Args) -> ExitCode {
    let ttl_seconds = match args.ttl.as_deref().map(Ttl::parse).transpose() {
        Ok(t) => t.map(|t| i64::try_from(t.as_secs()).unwrap_or(i64::MAX)),
        Err(e) => return fail(format!("--ttl: {e}")),
    };
    let (csr, key_pem) = match &args.csr {
        Some(path) => match std::fs::read(path) {
            Ok(bytes) => (bytes, None),
            Err(e) => return fail(format!("--csr `{}`: {e}", path.display())),
        },
        None => match new_key_and_csr() {
            Ok((csr, key)) => (csr, Some(key)),
            Err(e) => return fail(format!("making a key: {e}")),
        },
    };
    let socket = match args.at.socket() {
        Ok(s) => s,
        Err(e) => return fail(e),
    };
    let channel = match connect(&socket).await {
        Ok(c) => c,
        Err(e) => return fail(format!("cannot connect to `{}`: {e}", socket.display())),
    };
    let request = IssueX509Request { csr, ttl_seconds, spiffe_id: args.spiffe_id.unwrap_or_default() };
    let reply = match BrokerClient::new(channel).issue_x509(request).await {
        Ok(r) => r.into_inner(),
        Err(status) => return fail(format!("{:?}: {}", status.code(), status.message())),
    };
    let pems = |ders: &[Vec<u8>]| {
        ders.iter().map(|d| pem::encode(&pem::Pem::new("CERTIFICATE", d.clone()))).collect::<String>()
    };
    let written = write_out(
        &args.out,
        &pems(&reply.cert_chain),
        &pems(&reply.trust_bundle),
        key_pem.as_deref().map(String::as_str),
    );
    if let Err(e) = written {
        return fail(format!("writing to `{}`: {e}", args.out.display()));
    }
    let expires = time::OffsetDateTime::from_unix_timestamp(reply.not_after)
        .ok()
        .and_then(|t| t.format(&time::format_description::well_known::Rfc3339).ok())
        .unwrap_or_default();
    out!("{}", reply.spiffe_id);
    out!("  credential {}  serial {}  expires {expires}", reply.credential_id, reply.serial);
    out!("  wrote {}/cert.pem, bundle.pem{}", args.out.display(), if key_pem.is_some() { ", key.pem" } else { "" });
    if let Some(note) = reply.lifetime.as_ref().and_then(super::lifetime_note) {
        out!("  {note}");
    }
    ExitCode::SUCCESS
}

fn new_key_and_csr() -> Result<(Vec<u8>, Zeroizing<String>), rcgen::Error> {
    use zeroize::Zeroize;
    let mut key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let csr = rcgen::CertificateParams::default().serialize_request(&key);
    let pem = Zeroizing::new(key.serialize_pem());
    key.zeroize();
    Ok((csr?.der().to_vec(), pem))
}

fn write_out(dir: &Path, cert: &str, bundle: &str, key: Option<&str>) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    if !dir.exists() {
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
    }
    if let Some(key) = key {
        let path = dir.join("key.pem");
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        crate::keys::write_private(&path, key.as_bytes()).map_err(std::io::Error::other)?;
    }
    std::fs::write(dir.join("cert.pem"), cert)?;
    std::fs::write(dir.join("bundle.pem"), bundle)?;
    Ok(())
}
