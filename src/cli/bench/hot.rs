//! The hot-path benchmarks: X.509 and JWT-SVID issuance (and validation) against a running
//! daemon, and cfssl signing the same CSRs, each at several concurrency levels with the
//! serving process's CPU per operation beside the crypto an operation cannot avoid.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use super::load::{self, Crypto, Level};
use crate::api::pb::IssueX509Request;
use crate::api::pb::broker_client::BrokerClient;
use crate::api::spiffe::spiffe_workload_api_client::SpiffeWorkloadApiClient;
use crate::api::spiffe::{JwtsvidRequest, ValidateJwtsvidRequest, X509svidRequest};
use crate::cli::fail;

/// Signatures timed per batch when measuring the crypto (three batches, best kept).
const CRYPTO_ROUNDS: u32 = 2000;

fn with_header<T>(message: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(message);
    r.metadata_mut().insert("workload.spiffe.io", tonic::metadata::MetadataValue::from_static("true"));
    r
}

pub async fn issue(socket: PathBuf, requests: u32, levels: &[u32], csr: bool, half_load: bool) -> ExitCode {
    let der = match super::bench_csr() {
        Ok(c) => c,
        Err(e) => return fail(e),
    };
    let pid = load::socket_owner(&socket).await.map_err(|e| tracing::warn!("no daemon CPU figures: {e}")).ok();
    let channel = match super::super::connect(&socket).await {
        Ok(c) => c,
        Err(e) => return fail(format!("cannot connect to `{}`: {e}", socket.display())),
    };
    let broker = BrokerClient::new(channel.clone());
    let workload = SpiffeWorkloadApiClient::new(channel);
    // One operation, whichever API: true when a certificate came back.
    let op = move |_: u32, _: u32| {
        let (mut broker, mut workload, der) = (broker.clone(), workload.clone(), der.clone());
        async move {
            if csr {
                let req = IssueX509Request { csr: der, ttl_seconds: Some(300), spiffe_id: String::new() };
                broker.issue_x509(req).await.is_ok()
            } else {
                match workload.fetch_x509svid(with_header(X509svidRequest {})).await {
                    Ok(r) => matches!(r.into_inner().message().await, Ok(Some(m)) if !m.svids.is_empty()),
                    Err(_) => false,
                }
            }
        }
    };
    let what = if csr {
        "issue x509 from a CSR over the workload socket (mayfly.v1 IssueX509)"
    } else {
        "issue x509 over the workload socket (SPIFFE FetchX509SVID, key made by the daemon)"
    };
    let done = match certificate_levels(what, pid, requests, levels, op.clone()).await {
        Ok(done) => done,
        Err(code) => return code,
    };
    if half_load && let Some(best) = done.iter().map(|l| l.throughput).reduce(f64::max) {
        let rate = best / 2.0;
        let before = pid.and_then(load::cpu_time);
        let (p50, p99, failed, achieved) = load::paced(requests, rate, 256, move |i| op(0, i)).await;
        let after = pid.and_then(load::cpu_time);
        let cpu = match (before, after) {
            (Some(b), Some(a)) => {
                format!(", daemon {:.0} µs/op", a.saturating_sub(b).as_secs_f64() * 1e6 / f64::from(requests))
            }
            _ => String::new(),
        };
        out!(
            "half load: {requests} requests open loop at {rate:.0}/s (half of {best:.0}/s; achieved {achieved:.0}/s): p50 {p50:.2} ms, p99 {p99:.2} ms, {failed} failed{cpu}"
        );
    }
    if let Some(kib) = pid.and_then(load::rss_kib) {
        out!("daemon RSS now {:.1} MiB", kib as f64 / 1024.0);
    }
    ExitCode::SUCCESS
}

/// JWT-SVIDs through the standard API, as a SPIFFE client calls it (with the header).
pub async fn jwt(socket: PathBuf, requests: u32, levels: &[u32]) -> ExitCode {
    let pid = load::socket_owner(&socket).await.map_err(|e| tracing::warn!("no daemon CPU figures: {e}")).ok();
    let channel = match super::super::connect(&socket).await {
        Ok(c) => c,
        Err(e) => return fail(format!("cannot connect to `{}`: {e}", socket.display())),
    };
    let client = SpiffeWorkloadApiClient::new(channel);
    let fetch = client.clone();
    let fetch_op = move |_: u32, _: u32| {
        let mut c = fetch.clone();
        async move {
            c.fetch_jwtsvid(with_header(JwtsvidRequest { audience: vec!["bench".into()], spiffe_id: String::new() }))
                .await
                .is_ok()
        }
    };
    let mut fetched = Vec::new();
    for &c in levels {
        fetched.push(
            load::level("FetchJWTSVID (ES256 mint + decision + issued record)", pid, requests, c, fetch_op.clone())
                .await,
        );
    }
    let token = {
        let mut c = client.clone();
        match c
            .fetch_jwtsvid(with_header(JwtsvidRequest { audience: vec!["bench".into()], spiffe_id: String::new() }))
            .await
        {
            Ok(r) => r.into_inner().svids.first().map(|s| s.svid.clone()).unwrap_or_default(),
            Err(e) => return fail(format!("FetchJWTSVID refused: {}", e.message())),
        }
    };
    let validate_op = move |_: u32, _: u32| {
        let mut c = client.clone();
        let svid = token.clone();
        async move {
            c.validate_jwtsvid(with_header(ValidateJwtsvidRequest { audience: "bench".into(), svid })).await.is_ok()
        }
    };
    let mut validated: Vec<Level> = Vec::new();
    for &c in levels {
        validated.push(
            load::level("ValidateJWTSVID (ES256 verify + used record)", pid, requests, c, validate_op.clone()).await,
        );
    }
    let crypto = match Crypto::measure(CRYPTO_ROUNDS) {
        Ok(c) => c,
        Err(e) => return fail(e),
    };
    out!(
        "crypto, this run, one core (aws-lc-rs): ES256 sign {:.1} µs, verify {:.1} µs",
        crypto.sign_us,
        crypto.verify_us
    );
    load::table("FetchJWTSVID", &fetched, "ES256 sign", crypto.sign_us);
    load::table("ValidateJWTSVID", &validated, "ES256 verify", crypto.verify_us);
    ExitCode::SUCCESS
}

/// cfssl's sign endpoint with the same CSR, as `issue --csr` drives mayfly.
pub async fn cfssl(url: &str, pid: i32, requests: u32, levels: &[u32]) -> ExitCode {
    let csr = match super::bench_csr() {
        Ok(der) => pem::encode(&pem::Pem::new("CERTIFICATE REQUEST", der)),
        Err(e) => return fail(e),
    };
    let http = match reqwest::Client::builder().timeout(Duration::from_secs(15)).pool_max_idle_per_host(1024).build() {
        Ok(c) => c,
        Err(e) => return fail(e),
    };
    let endpoint = format!("{}/api/v1/cfssl/sign", url.trim_end_matches('/'));
    let body = serde_json::json!({ "certificate_request": csr }).to_string();
    let op = move |_: u32, _: u32| {
        let (http, endpoint, body) = (http.clone(), endpoint.clone(), body.clone());
        async move {
            let sent = http.post(&endpoint).header("content-type", "application/json").body(body).send().await;
            match sent {
                Ok(r) if r.status().is_success() => {
                    r.json::<serde_json::Value>().await.is_ok_and(|v| v["success"] == serde_json::Value::Bool(true))
                }
                _ => false,
            }
        }
    };
    let what = "cfssl serve: sign a CSR (POST /api/v1/cfssl/sign, loopback HTTP/1.1)";
    match certificate_levels(what, Some(pid), requests, levels, op).await {
        Ok(_) => ExitCode::SUCCESS,
        Err(code) => code,
    }
}

/// Each level of a certificate-signing load, then one P-256 verify + sign timed here and
/// the summary table against it (mayfly and cfssl alike).
async fn certificate_levels<F, Fut>(
    what: &str,
    pid: Option<i32>,
    requests: u32,
    levels: &[u32],
    op: F,
) -> Result<Vec<Level>, ExitCode>
where
    F: Fn(u32, u32) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = bool> + Send,
{
    let mut done = Vec::new();
    for &c in levels {
        done.push(load::level(what, pid, requests, c, op.clone()).await);
    }
    let crypto = Crypto::measure(CRYPTO_ROUNDS).map_err(fail)?;
    let unit = crypto.sign_us + crypto.verify_us;
    out!(
        "crypto, this run, one core (aws-lc-rs): P-256 sign {:.1} µs, verify {:.1} µs; verify + sign {unit:.1} µs",
        crypto.sign_us,
        crypto.verify_us
    );
    load::table(what, &done, "verify+sign", unit);
    Ok(done)
}
