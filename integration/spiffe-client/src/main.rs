//! `spiffe-client`: an independent SPIFFE Workload API client for mayfly's
//! integration suite, built on the crates.io `spiffe` crate (not on mayfly's
//! own code), so it checks the daemon against a third-party reading of the
//! standard.
//!
//! The endpoint comes from `SPIFFE_ENDPOINT_SOCKET` (`unix:///abs/path`).
//! Each subcommand prints one JSON line on success and exits 0; on any failure
//! it prints `spiffe-client: <reason>` on stderr and exits 1 (2 for bad usage).
//!
//! - `x509`: fetch the X.509 context; check that the default SVID chains to the
//!   X.509 bundle of its own trust domain (signatures checked with aws-lc),
//!   that it is within its validity period, that its URI SAN is its SPIFFE ID,
//!   and that the private key matches the leaf's public key.
//! - `jwt AUDIENCE`: fetch a JWT-SVID, validate it through `ValidateJWTSVID`,
//!   and verify it again locally against the fetched JWT bundles.
//! - `watch SECONDS`: stream X.509 contexts until the leaf serial changes
//!   (a rotation push); fail if that does not happen within SECONDS.

use std::error::Error;
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_lc_rs::signature::{
    ECDSA_P256_SHA256_ASN1_SIGNING, ECDSA_P384_SHA384_ASN1_SIGNING, EcdsaKeyPair, Ed25519KeyPair,
    KeyPair as _, RsaKeyPair,
};
use futures::StreamExt as _;
use serde_json::json;
use spiffe::{JwtSvid, WorkloadApiClient, X509Bundle, X509Context, X509Svid};
use tokio::time::{Instant, timeout, timeout_at};
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer as _, X509Certificate};

type Result<T> = std::result::Result<T, Box<dyn Error>>;

/// Upper bound for connecting and for each one-shot call.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

const USAGE: &str = "usage: spiffe-client x509 | jwt AUDIENCE | watch SECONDS";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let command = match argv.as_slice() {
        ["x509"] => Command::X509,
        ["jwt", audience] => Command::Jwt((*audience).to_owned()),
        ["watch", seconds] => match seconds.parse::<u64>() {
            Ok(seconds) if seconds > 0 => Command::Watch(seconds),
            _ => return usage(),
        },
        _ => return usage(),
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => return fail(&err),
    };
    match runtime.block_on(run(command)) {
        Ok(line) => {
            println!("{line}");
            ExitCode::SUCCESS
        }
        Err(err) => fail(err.as_ref()),
    }
}

enum Command {
    X509,
    Jwt(String),
    Watch(u64),
}

fn usage() -> ExitCode {
    eprintln!("{USAGE}");
    ExitCode::from(2)
}

fn fail(err: &dyn Error) -> ExitCode {
    // Print the whole cause chain: the crate wraps gRPC statuses and parse errors.
    let mut message = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !message.contains(&cause_text) {
            message.push_str(": ");
            message.push_str(&cause_text);
        }
        source = cause.source();
    }
    eprintln!("spiffe-client: {message}");
    ExitCode::FAILURE
}

async fn run(command: Command) -> Result<serde_json::Value> {
    let client = timeout(CALL_TIMEOUT, WorkloadApiClient::connect_env())
        .await
        .map_err(|_elapsed| "timed out connecting to SPIFFE_ENDPOINT_SOCKET")??;
    match command {
        Command::X509 => x509(&client).await,
        Command::Jwt(audience) => jwt(&client, &audience).await,
        Command::Watch(seconds) => watch(&client, seconds).await,
    }
}

async fn x509(client: &WorkloadApiClient) -> Result<serde_json::Value> {
    let context = timeout(CALL_TIMEOUT, client.fetch_x509_context())
        .await
        .map_err(|_elapsed| "timed out fetching the X.509 context")??;
    let checked = check_context(&context)?;
    Ok(json!({
        "spiffe_id": checked.spiffe_id,
        "serial": checked.serial,
        "not_after": checked.not_after,
        "chain_len": checked.chain_len,
    }))
}

async fn jwt(client: &WorkloadApiClient, audience: &str) -> Result<serde_json::Value> {
    let svid = timeout(CALL_TIMEOUT, client.fetch_jwt_svid([audience], None))
        .await
        .map_err(|_elapsed| "timed out fetching a JWT-SVID")??;
    if !svid.audience().iter().any(|aud| aud == audience) {
        return Err(format!("JWT-SVID aud {:?} lacks {audience:?}", svid.audience()).into());
    }

    // Validation by the Workload API (the crate also checks the response's
    // spiffe_id and sub/aud/exp claims are present and well-formed).
    let by_server = timeout(
        CALL_TIMEOUT,
        client.validate_jwt_token(audience, svid.token()),
    )
    .await
    .map_err(|_elapsed| "timed out in ValidateJWTSVID")??;
    if by_server.spiffe_id() != svid.spiffe_id() {
        return Err(format!(
            "ValidateJWTSVID returned {} for a token of {}",
            by_server.spiffe_id(),
            svid.spiffe_id()
        )
        .into());
    }

    // Independent local verification against the JWT bundles (signature via
    // the `kid` authority, alg, aud, exp, nbf).
    let bundles = timeout(CALL_TIMEOUT, client.fetch_jwt_bundles())
        .await
        .map_err(|_elapsed| "timed out fetching JWT bundles")??;
    let local = JwtSvid::parse_and_validate(svid.token(), &bundles, &[audience])?;
    if local.spiffe_id() != svid.spiffe_id() {
        return Err("locally verified JWT-SVID names a different SPIFFE ID".into());
    }

    Ok(json!({
        "spiffe_id": local.spiffe_id().to_string(),
        "aud": local.audience(),
        "exp": local.claims().exp(),
        "validated": true,
    }))
}

async fn watch(client: &WorkloadApiClient, seconds: u64) -> Result<serde_json::Value> {
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let mut updates = timeout_at(deadline, client.stream_x509_contexts())
        .await
        .map_err(|_elapsed| "timed out opening the X.509 stream")??;
    let mut first: Option<Checked> = None;
    loop {
        let update = match timeout_at(deadline, updates.next()).await {
            Ok(Some(update)) => update?,
            Ok(None) => return Err("X.509 stream ended before a rotation arrived".into()),
            Err(_elapsed) => {
                let serial = first.map_or_else(|| "none".to_owned(), |f| f.serial);
                return Err(
                    format!("no rotation within {seconds}s (first serial {serial})").into(),
                );
            }
        };
        let checked = check_context(&update)?;
        match &first {
            None => first = Some(checked),
            Some(old) if old.serial != checked.serial => {
                if old.spiffe_id != checked.spiffe_id {
                    return Err(format!(
                        "rotation changed identity: {} -> {}",
                        old.spiffe_id, checked.spiffe_id
                    )
                    .into());
                }
                return Ok(json!({
                    "first": old.serial,
                    "rotated": checked.serial,
                    "first_not_after": old.not_after,
                    "rotated_at": unix_now()?,
                }));
            }
            Some(_) => {} // same SVID re-sent (e.g. a bundle-only update)
        }
    }
}

/// What the checks established about a context's default X.509-SVID.
struct Checked {
    spiffe_id: String,
    serial: String,
    not_after: i64,
    chain_len: usize,
}

fn check_context(context: &X509Context) -> Result<Checked> {
    let svid = context
        .default_svid()
        .ok_or("X.509 context carries no SVID")?;
    let trust_domain = svid.spiffe_id().trust_domain();
    let bundle = context
        .bundle_set()
        .get(trust_domain)
        .ok_or_else(|| format!("no X.509 bundle for trust domain {trust_domain}"))?;
    check_svid(svid, &bundle)
}

fn check_svid(svid: &X509Svid, bundle: &X509Bundle) -> Result<Checked> {
    let spiffe_id = svid.spiffe_id().to_string();
    if svid.spiffe_id().trust_domain() != bundle.trust_domain() {
        return Err(format!(
            "{spiffe_id} is not in trust domain {}",
            bundle.trust_domain()
        )
        .into());
    }
    let chain = svid
        .cert_chain()
        .iter()
        .map(|cert| parse_cert(cert.as_bytes()))
        .collect::<Result<Vec<_>>>()?;
    let leaf = chain.first().ok_or("empty certificate chain")?;

    let uris: Vec<&str> = leaf
        .subject_alternative_name()?
        .map(|san| san.value.general_names.as_slice())
        .unwrap_or_default()
        .iter()
        .filter_map(|name| match name {
            GeneralName::URI(uri) => Some(*uri),
            _ => None,
        })
        .collect();
    if uris != [spiffe_id.as_str()] {
        return Err(format!("leaf URI SANs {uris:?} do not equal [{spiffe_id}]").into());
    }

    for (i, cert) in chain.iter().enumerate() {
        if !cert.validity().is_valid() {
            return Err(format!("chain[{i}] of {spiffe_id} is outside its validity period").into());
        }
    }
    // Each certificate is signed by the next one; the last by a bundle authority.
    for (i, pair) in chain.windows(2).enumerate() {
        if let [child, parent] = pair {
            child
                .verify_signature(Some(parent.public_key()))
                .map_err(|err| {
                    format!(
                        "chain[{i}] of {spiffe_id} is not signed by chain[{}]: {err}",
                        i + 1
                    )
                })?;
        }
    }
    let top = chain.last().ok_or("empty certificate chain")?;
    let authorities = bundle
        .authorities()
        .iter()
        .map(|cert| parse_cert(cert.as_bytes()))
        .collect::<Result<Vec<_>>>()?;
    if !authorities
        .iter()
        .any(|ca| top.verify_signature(Some(ca.public_key())).is_ok())
    {
        return Err(format!(
            "chain[{}] of {spiffe_id} is not signed by any of the {} authorities in the {} bundle",
            chain.len() - 1,
            authorities.len(),
            bundle.trust_domain()
        )
        .into());
    }

    check_key_matches(svid.private_key().as_bytes(), leaf)?;

    Ok(Checked {
        spiffe_id,
        serial: format!("{:x}", leaf.serial),
        not_after: leaf.validity().not_after.timestamp(),
        chain_len: chain.len(),
    })
}

fn parse_cert(der: &[u8]) -> Result<X509Certificate<'_>> {
    let (rest, cert) = X509Certificate::from_der(der)?;
    if !rest.is_empty() {
        return Err("trailing bytes after a DER certificate".into());
    }
    Ok(cert)
}

/// The PKCS#8 private key must be the one whose public half is in the leaf.
fn check_key_matches(pkcs8: &[u8], leaf: &X509Certificate<'_>) -> Result<()> {
    let public: Vec<u8> =
        if let Ok(key) = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, pkcs8) {
            key.public_key().as_ref().to_vec()
        } else if let Ok(key) = EcdsaKeyPair::from_pkcs8(&ECDSA_P384_SHA384_ASN1_SIGNING, pkcs8) {
            key.public_key().as_ref().to_vec()
        } else if let Ok(key) = Ed25519KeyPair::from_pkcs8(pkcs8) {
            key.public_key().as_ref().to_vec()
        } else if let Ok(key) = RsaKeyPair::from_pkcs8(pkcs8) {
            key.public_key().as_ref().to_vec()
        } else {
            return Err("private key is not a PKCS#8 EC P-256/P-384, Ed25519 or RSA key".into());
        };
    if public.as_slice() != leaf.public_key().subject_public_key.data.as_ref() {
        return Err("private key does not match the leaf certificate's public key".into());
    }
    Ok(())
}

fn unix_now() -> Result<u64> {
    Ok(SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs())
}
