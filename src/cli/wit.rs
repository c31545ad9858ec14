//! `mayfly wit` (a client of the Workload API's FetchWITSVID and FetchWITBundles) and
//! `mayfly wpt sign|verify`. `sign` works locally with a WIT's private key; `verify` asks a
//! running daemon (`POST /v1/wpt/verify` on its TLS listener), because only the daemon knows
//! revocations, holds the one-use replay cache and records each accepted proof as a `used`
//! event. A relying party that verifies on its own uses FetchWITBundles (or
//! `/v1/wit/jwks.json`) and any JOSE library, without those three.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use clap::Subcommand;
use zeroize::Zeroizing;

use super::fail;
use crate::api::spiffe::spiffe_workload_api_client::SpiffeWorkloadApiClient;
use crate::api::spiffe::{WitBundlesRequest, WitsvidRequest};
use crate::identity::Ttl;
use crate::keys::ProofSigner;
use crate::validate::wpt::{ProofRequest, sign_proof};

/// Files this command reads are refused beyond this size (tokens and keys are small).
const MAX_FILE_BYTES: u64 = 64 * 1024;

#[derive(clap::Args)]
pub struct Args {
    /// The daemon's workload socket.
    #[arg(long, default_value = "mayfly.sock")]
    socket: PathBuf,
    /// Which identity, when the caller is registered under several.
    #[arg(long)]
    spiffe_id: Option<String>,
    /// Directory for wit.jwt, wit-key.jwk (0600) and wit-bundle.json.
    #[arg(long)]
    out: PathBuf,
}

#[derive(Subcommand)]
pub enum WptCommand {
    /// Make a Workload Proof Token with a WIT's key and print it (for tries).
    Sign {
        /// The WIT-SVID (compact JWS), e.g. wit.jwt from `mayfly wit`.
        #[arg(long)]
        wit: PathBuf,
        /// Its private key, a JWK, e.g. wit-key.jwk.
        #[arg(long)]
        key: PathBuf,
        /// The proof's `aud`: the URI of the request it goes with.
        #[arg(long)]
        audience: String,
        /// How long the proof lives.
        #[arg(long, default_value = "60s")]
        ttl: String,
        /// An OAuth access token sent with the request: bound as `ath`.
        #[arg(long)]
        access_token: Option<PathBuf>,
        /// A transaction token sent with the request: bound as `tth`.
        #[arg(long)]
        txn_token: Option<PathBuf>,
    },
    /// Have a running daemon verify a WIT-SVID and its proof for an audience: the WIT's
    /// signature, type, expiry and revocation, the proof's type, key, audience, lifetime,
    /// `wth` (and `ath`/`tth`), and its one use. Exit 0 when accepted, 1 when refused.
    Verify {
        /// The caller's WIT-SVID (a file holding the compact JWS).
        #[arg(long)]
        wit: PathBuf,
        /// The caller's Workload Proof Token for this request (a file).
        #[arg(long)]
        wpt: PathBuf,
        /// The audience the relying party expects.
        #[arg(long)]
        audience: String,
        /// The daemon's TLS listener.
        #[arg(long, default_value = "https://127.0.0.1:8443")]
        url: String,
        /// The CA certificate (PEM) the listener's certificate chains to; `mayfly dev`'s is
        /// `<data dir>/ca.pem`. Without it, the system's roots.
        #[arg(long)]
        cacert: Option<PathBuf>,
        /// An access token sent along with the request (its hash must be the proof's `ath`).
        #[arg(long)]
        access_token: Option<PathBuf>,
        /// A transaction token sent along with the request (its hash must be the proof's `tth`).
        #[arg(long)]
        txn_token: Option<PathBuf>,
        /// Print the daemon's JSON answer.
        #[arg(long)]
        json: bool,
    },
}

/// Writes a WIT and its private JWK into `dir`: wit.jwt, and wit-key.jwk at mode 0600.
pub fn write_wit(dir: &Path, token: &str, key: &str) -> Result<(), String> {
    if token.is_empty() || key.is_empty() {
        return Err("the answer holds no WIT or no key".into());
    }
    std::fs::write(dir.join("wit.jwt"), format!("{token}\n")).map_err(|e| format!("wit.jwt: {e}"))?;
    let path = dir.join("wit-key.jwk");
    let _ = std::fs::remove_file(&path);
    crate::keys::write_private(&path, key.as_bytes()).map_err(|e| e.to_string())
}

pub async fn fetch(args: Args) -> ExitCode {
    let channel = match super::connect(&args.socket).await {
        Ok(c) => c,
        Err(e) => return fail(format!("cannot reach `{}`: {e}", args.socket.display())),
    };
    let mut client = SpiffeWorkloadApiClient::new(channel);
    let first = async {
        let mut stream = client
            .fetch_witsvid(with_security_header(WitsvidRequest {
                spiffe_id: args.spiffe_id.clone().unwrap_or_default(),
            }))
            .await?
            .into_inner();
        stream.message().await
    };
    let response = match tokio::time::timeout(Duration::from_secs(30), first).await {
        Ok(Ok(Some(r))) => r,
        Ok(Ok(None)) => return fail("the stream ended before a WIT-SVID came"),
        Ok(Err(s)) => return fail(format!("refused ({:?}): {}", s.code(), s.message())),
        Err(_) => return fail("no WIT-SVID within 30 s"),
    };
    let Some(mut svid) = response.svids.into_iter().next() else { return fail("the answer holds no WIT-SVID") };
    let key = Zeroizing::new(std::mem::take(&mut svid.wit_svid_key));
    if let Err(e) = std::fs::create_dir_all(&args.out).map_err(|e| e.to_string()) {
        return fail(format!("`{}`: {e}", args.out.display()));
    }
    if let Err(e) = write_wit(&args.out, &svid.wit_svid, &key) {
        return fail(e);
    }
    let bundles = async {
        let mut stream = client.fetch_wit_bundles(with_security_header(WitBundlesRequest {})).await?.into_inner();
        stream.message().await
    };
    if let Ok(Ok(Some(b))) = tokio::time::timeout(Duration::from_secs(10), bundles).await {
        let text = serde_json::to_string_pretty(&b.bundles).unwrap_or_default();
        if let Err(e) = std::fs::write(args.out.join("wit-bundle.json"), text) {
            return fail(format!("wit-bundle.json: {e}"));
        }
    }
    println!(
        "WIT-SVID for {} written to {} (wit.jwt, wit-key.jwk, wit-bundle.json)",
        svid.spiffe_id,
        args.out.display()
    );
    ExitCode::SUCCESS
}

pub async fn wpt(command: WptCommand) -> ExitCode {
    match command {
        WptCommand::Sign { wit, key, audience, ttl, access_token, txn_token } => {
            let lifetime = match Ttl::parse(&ttl) {
                Ok(t) => t.as_duration(),
                Err(e) => return fail(format!("--ttl: {e}")),
            };
            let read = |p: &PathBuf| read_text(p);
            let (wit, key, access_token, txn_token) = match (
                read(&wit),
                read(&key),
                access_token.as_ref().map(read).transpose(),
                txn_token.as_ref().map(read).transpose(),
            ) {
                (Ok(w), Ok(k), Ok(a), Ok(t)) => (w, Zeroizing::new(k), a, t),
                (Err(e), ..) | (_, Err(e), ..) | (.., Err(e), _) | (.., Err(e)) => return fail(e),
            };
            let signer = match ProofSigner::from_private_jwk(&key) {
                Ok(s) => s,
                Err(e) => return fail(format!("--key: {e}")),
            };
            let req = ProofRequest {
                wit: &wit,
                audience: &audience,
                lifetime,
                access_token: access_token.as_deref(),
                txn_token: txn_token.as_deref(),
            };
            match sign_proof(&signer, &req, SystemTime::now()) {
                Ok(proof) => {
                    println!("{proof}");
                    ExitCode::SUCCESS
                }
                Err(e) => fail(e),
            }
        }
        WptCommand::Verify { wit, wpt, audience, url, cacert, access_token, txn_token, json } => {
            let read = |p: &PathBuf| read_text(p);
            let body = match (
                read(&wit),
                read(&wpt),
                access_token.as_ref().map(read).transpose(),
                txn_token.as_ref().map(read).transpose(),
            ) {
                (Ok(wit), Ok(wpt), Ok(access_token), Ok(txn_token)) => serde_json::json!({
                    "wit": wit, "wpt": wpt, "audience": audience, "access_token": access_token, "txn_token": txn_token,
                }),
                (Err(e), ..) | (_, Err(e), ..) | (.., Err(e), _) | (.., Err(e)) => return fail(e),
            };
            let mut builder =
                reqwest::Client::builder().timeout(Duration::from_secs(15)).redirect(reqwest::redirect::Policy::none());
            if let Some(path) = &cacert {
                let pem = match std::fs::read(path) {
                    Ok(p) => p,
                    Err(e) => return fail(format!("--cacert `{}`: {e}", path.display())),
                };
                match reqwest::Certificate::from_pem(&pem) {
                    Ok(ca) => builder = builder.tls_certs_only([ca]),
                    Err(e) => return fail(format!("--cacert `{}`: {e}", path.display())),
                }
            }
            let client = match builder.build() {
                Ok(c) => c,
                Err(e) => return fail(e),
            };
            let endpoint = format!("{}/v1/wpt/verify", url.trim_end_matches('/'));
            let response = match client.post(&endpoint).json(&body).send().await {
                Ok(r) => r,
                Err(e) => return fail(format!("`{endpoint}`: {e}")),
            };
            let status = response.status();
            let answer: serde_json::Value = match response.json().await {
                Ok(v) => v,
                Err(e) => return fail(format!("`{endpoint}` answered {status} without JSON: {e}")),
            };
            if json {
                println!("{answer}");
            }
            let text = |k: &str| {
                answer.get(k).map(|v| v.as_str().map_or_else(|| v.to_string(), str::to_owned)).unwrap_or_default()
            };
            match status.as_u16() {
                200 => {
                    if !json {
                        println!(
                            "accepted: {} (WIT {}, expires {})",
                            text("spiffe_id"),
                            text("credential_id"),
                            text("expires_at")
                        );
                    }
                    ExitCode::SUCCESS
                }
                401 => {
                    if !json {
                        println!("refused: {}", text("reason"));
                    }
                    ExitCode::FAILURE
                }
                _ => fail(format!("`{endpoint}` answered {status}: {}", text("reason"))),
            }
        }
    }
}

/// A Workload API request with the header every SPIFFE client sends.
fn with_security_header<T>(message: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(message);
    r.metadata_mut().insert("workload.spiffe.io", tonic::metadata::MetadataValue::from_static("true"));
    r
}

/// A small text file, trimmed of surrounding whitespace.
fn read_text(path: &Path) -> Result<String, String> {
    let len = std::fs::metadata(path).map_err(|e| format!("`{}`: {e}", path.display()))?.len();
    if len > MAX_FILE_BYTES {
        return Err(format!("`{}` is over {MAX_FILE_BYTES} bytes", path.display()));
    }
    let text = std::fs::read_to_string(path).map_err(|e| format!("`{}`: {e}", path.display()))?;
    Ok(text.trim().to_owned())
}
