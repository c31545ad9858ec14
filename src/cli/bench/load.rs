//! What the hot-path benchmarks share: a closed-loop sweep over concurrency levels that
//! reads the **daemon's** CPU time from /proc around each level (the client shares the
//! cores, so its own time says nothing), an open-loop run at a fixed rate (latency at half
//! the best throughput), and the cost of the crypto an issuance cannot avoid, measured in
//! the same run on one core so every figure is put beside it.

use std::future::Future;
use std::path::Path;
use std::time::{Duration, Instant};

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{self, EcdsaKeyPair, KeyPair};

/// The daemon's user + system CPU time so far, from `/proc/<pid>/stat` (every thread, live
/// or exited). Clock ticks are 10 ms here, so a level should run for seconds.
pub fn cpu_time(pid: i32) -> Option<Duration> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the last `)` (the command name may hold spaces): state is the first;
    // utime and stime are the 12th and 13th.
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    let per_second = rustix::param::clock_ticks_per_second().max(1);
    Some(Duration::from_nanos(ticks.saturating_mul(1_000_000_000) / per_second))
}

/// The daemon's resident set, from `/proc/<pid>/status` (`VmRSS`, KiB).
pub fn rss_kib(pid: i32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    text.lines().find_map(|l| l.strip_prefix("VmRSS:"))?.split_whitespace().next()?.parse().ok()
}

/// The pid of the process serving `socket`: the kernel's peer credentials of a connection
/// to it (a daemon's socket names its own pid, as it names the caller's to the daemon).
pub async fn socket_owner(socket: &Path) -> Result<i32, String> {
    let stream = tokio::net::UnixStream::connect(socket).await.map_err(|e| format!("`{}`: {e}", socket.display()))?;
    let pid = stream.peer_cred().ok().and_then(|c| c.pid()).filter(|p| *p > 0);
    pid.ok_or_else(|| format!("`{}`: the kernel gave no pid for its server", socket.display()))
}

/// One level's figures.
pub struct Level {
    pub concurrency: u32,
    pub ok: usize,
    pub failed: u32,
    pub throughput: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    /// Daemon CPU per successful operation, µs (`None` without a pid).
    pub cpu_us: Option<f64>,
}

/// Runs `total` operations over `concurrency` tasks, reading the daemon's CPU around them;
/// prints the block `report` prints plus the daemon's CPU per operation.
pub async fn level<F, Fut>(what: &str, pid: Option<i32>, total: u32, concurrency: u32, op: F) -> Level
where
    F: Fn(u32, u32) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = bool> + Send,
{
    let before = pid.and_then(cpu_time);
    let (elapsed, mut latencies, failed) = super::drive(total, concurrency, op).await;
    let after = pid.and_then(cpu_time);
    super::report(what, elapsed, &mut latencies, failed, concurrency);
    let ok = latencies.len();
    let cpu_us = match (before, after) {
        (Some(b), Some(a)) if ok > 0 => Some(a.saturating_sub(b).as_secs_f64() * 1e6 / ok as f64),
        _ => None,
    };
    if let Some(us) = cpu_us {
        out!("  daemon CPU {us:.0} µs per operation ({:.0} operations per daemon CPU-second)", 1e6 / us.max(1e-9));
    }
    Level {
        concurrency,
        ok,
        failed,
        throughput: ok as f64 / elapsed.as_secs_f64().max(1e-9),
        p50_ms: percentile(&latencies, 0.5),
        p99_ms: percentile(&latencies, 0.99),
        cpu_us,
    }
}

/// Open loop: `total` operations started at `rate` per second whatever the answers do
/// (at most `cap` outstanding), each timed from its start. Returns p50 and p99 in ms and the
/// number that failed.
pub async fn paced<F, Fut>(total: u32, rate: f64, cap: usize, op: F) -> (f64, f64, u32, f64)
where
    F: Fn(u32) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = bool> + Send + 'static,
{
    let period = Duration::from_secs_f64(1.0 / rate.max(1.0));
    let limit = std::sync::Arc::new(tokio::sync::Semaphore::new(cap.max(1)));
    let started = tokio::time::Instant::now();
    let mut tasks = Vec::with_capacity(total as usize);
    for i in 0..total {
        tokio::time::sleep_until(started + period * i).await;
        let Ok(permit) = limit.clone().acquire_owned().await else { break };
        let op = op.clone();
        tasks.push(tokio::spawn(async move {
            let t = Instant::now();
            let ok = op(i).await;
            drop(permit);
            ok.then(|| t.elapsed())
        }));
    }
    let mut latencies = Vec::with_capacity(total as usize);
    let mut failed = 0;
    for t in tasks {
        match t.await {
            Ok(Some(d)) => latencies.push(d),
            _ => failed += 1,
        }
    }
    let achieved = latencies.len() as f64 / started.elapsed().as_secs_f64().max(1e-9);
    latencies.sort_unstable();
    (percentile(&latencies, 0.5), percentile(&latencies, 0.99), failed, achieved)
}

/// `latencies` sorted ascending; the value at `p`, in ms.
fn percentile(latencies: &[Duration], p: f64) -> f64 {
    if latencies.is_empty() {
        return 0.0;
    }
    let mut sorted = latencies.to_vec();
    sorted.sort_unstable();
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i].as_secs_f64() * 1e3
}

/// The crypto an issuance cannot avoid, timed on one core in this process: one P-256 ECDSA
/// signature and one verification (aws-lc-rs, what the daemon uses), µs each.
pub struct Crypto {
    pub sign_us: f64,
    pub verify_us: f64,
}

impl Crypto {
    pub fn measure(rounds: u32) -> Result<Self, String> {
        let rng = SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&signature::ECDSA_P256_SHA256_ASN1_SIGNING, &rng)
            .map_err(|_| "cannot make a P-256 key".to_owned())?;
        let key = EcdsaKeyPair::from_pkcs8(&signature::ECDSA_P256_SHA256_ASN1_SIGNING, pkcs8.as_ref())
            .map_err(|_| "cannot read the P-256 key".to_owned())?;
        // About the size of what is signed: a certificate's TBS, a JWT's header and claims.
        let message = [0x5au8; 400];
        let public = signature::UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_ASN1, key.public_key().as_ref());
        let sig = key.sign(&rng, &message).map_err(|_| "cannot sign".to_owned())?;
        // Warm up, then take the best of three batches (the machine is shared with nothing
        // while this runs; the best is the least disturbed).
        let mut best = (f64::MAX, f64::MAX);
        for _ in 0..3 {
            let t = Instant::now();
            for _ in 0..rounds {
                key.sign(&rng, &message).map_err(|_| "cannot sign".to_owned())?;
            }
            best.0 = best.0.min(t.elapsed().as_secs_f64() * 1e6 / f64::from(rounds));
            let t = Instant::now();
            for _ in 0..rounds {
                public.verify(&message, sig.as_ref()).map_err(|_| "the signature does not verify".to_owned())?;
            }
            best.1 = best.1.min(t.elapsed().as_secs_f64() * 1e6 / f64::from(rounds));
        }
        Ok(Self { sign_us: best.0, verify_us: best.1 })
    }
}

/// The summary table: one line per level, each cost beside `unit_us` (the crypto an
/// operation needs) as a multiple of it.
pub fn table(title: &str, levels: &[Level], unit: &str, unit_us: f64) {
    out!("{title}");
    out!(
        "  {:>5} {:>10} {:>9} {:>9} {:>14} {:>10}",
        "conc",
        "ops/s",
        "p50 ms",
        "p99 ms",
        "daemon µs/op",
        format!("× {unit}")
    );
    for l in levels {
        let (cpu, ratio) = match l.cpu_us {
            Some(us) => (format!("{us:.0}"), format!("{:.2}", us / unit_us.max(1e-9))),
            None => ("-".into(), "-".into()),
        };
        out!(
            "  {:>5} {:>10.0} {:>9.2} {:>9.2} {:>14} {:>10}{}",
            l.concurrency,
            l.throughput,
            l.p50_ms,
            l.p99_ms,
            cpu,
            ratio,
            if l.failed > 0 {
                format!("  ({} failed of {})", l.failed, l.ok + l.failed as usize)
            } else {
                String::new()
            }
        );
    }
}
