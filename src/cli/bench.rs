//! `mayfly bench`: commands that measure and print figures (never assertions).
//! `issue` drives a running daemon over its socket; `ledger` drives the group-commit writer
//! on a fresh ledger; `policy` times decisions in-process over the shipped rules and
//! a generated rule set. All are bounded by their request/event/decision counts.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant, SystemTime};

use super::fail;

mod hot;
mod load;
use crate::api::pb::IssueX509Request;
use crate::api::pb::broker_client::BrokerClient;
use crate::ledger::event::{Caller, Decision, Event, Verdict};
use crate::ledger::{Ledger, Location, Settings};

#[derive(clap::Subcommand)]
pub enum Command {
    /// Issue X.509 SVIDs from a running daemon at each concurrency level in turn; print
    /// throughput, latency and the daemon's CPU per issuance (read from /proc of the pid
    /// serving the socket) beside one P-256 verify + sign measured in the same run.
    Issue {
        /// The daemon's workload socket.
        #[arg(long, default_value = "mayfly.sock")]
        socket: PathBuf,
        /// How many requests at each level.
        #[arg(long, default_value_t = 2000, value_parser = clap::value_parser!(u32).range(1..=100_000))]
        requests: u32,
        /// Requests in flight at once: one level, or several (`1,8,32`) run in turn.
        #[arg(long, value_delimiter = ',', default_value = "1,8,32", value_parser = clap::value_parser!(u32).range(1..=1024))]
        concurrency: Vec<u32>,
        /// `mayfly.v1` IssueX509 with a CSR the client made (the key never travels). Without
        /// it: the SPIFFE Workload API's FetchX509SVID (the daemon makes the key).
        #[arg(long)]
        csr: bool,
        /// Then run open loop at half the best throughput seen and print its latency.
        #[arg(long)]
        half_load: bool,
    },
    /// Append events to a fresh ledger (the default backend) through the group-commit writer.
    Ledger {
        /// How many events.
        #[arg(long, default_value_t = 20_000, value_parser = clap::value_parser!(u32).range(1..=20_000_000))]
        events: u32,
        /// Requests (or writers) in flight at once.
        #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=4096))]
        concurrency: u32,
        /// Largest group commit (1 = one transaction and fsync per event).
        #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..=4096))]
        max_batch: u32,
        /// Grow the ledger of this data directory instead (kept, appended to): each write is
        /// an issuance as the daemon records it (a decision with its request and the
        /// `issued` event, one commit), so a daemon started on it sees a ledger of that size.
        #[arg(long)]
        data_dir: Option<PathBuf>,
    },
    /// Time policy decisions (request building included): the shipped rules, then with
    /// RULES generated per-workload rules added, each through the scope index and as a full scan.
    Policy {
        /// The policies/ tree.
        #[arg(default_value = "policies")]
        dir: PathBuf,
        /// Generated per-workload rules added to the shipped ones.
        #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(u32).range(1..=100_000))]
        rules: u32,
        /// How many decisions to time.
        #[arg(long, default_value_t = 20_000, value_parser = clap::value_parser!(u32).range(1..=10_000_000))]
        decisions: u32,
    },
    /// FetchJWTSVID (mint + record) and ValidateJWTSVID (verify + record a use) over the
    /// SPIFFE Workload API of a running daemon at each concurrency level; print throughput,
    /// latency and the daemon's CPU per operation beside one ES256 sign / verify.
    Jwt {
        /// The daemon's workload socket.
        #[arg(long, default_value = "mayfly.sock")]
        socket: PathBuf,
        /// How many requests at each level.
        #[arg(long, default_value_t = 2000, value_parser = clap::value_parser!(u32).range(1..=100_000))]
        requests: u32,
        /// Requests in flight at once: one level, or several (`1,8,32`) run in turn.
        #[arg(long, value_delimiter = ',', default_value = "1,8,32", value_parser = clap::value_parser!(u32).range(1..=1024))]
        concurrency: Vec<u32>,
    },
    /// The peer benchmark: cfssl's `serve` signing the same kind of CSR over HTTP on
    /// loopback (POST /api/v1/cfssl/sign), with its CPU read from /proc of PID: the figures
    /// `bench issue --csr` prints, for the process that does no attestation, no policy and
    /// keeps no record.
    Cfssl {
        /// cfssl's address, e.g. http://127.0.0.1:8888.
        #[arg(long)]
        url: String,
        /// cfssl's pid (its CPU time is read from /proc).
        #[arg(long)]
        pid: i32,
        /// How many requests at each level.
        #[arg(long, default_value_t = 2000, value_parser = clap::value_parser!(u32).range(1..=100_000))]
        requests: u32,
        /// Requests in flight at once: one level, or several (`1,8,32`) run in turn.
        #[arg(long, value_delimiter = ',', default_value = "1,8,32", value_parser = clap::value_parser!(u32).range(1..=1024))]
        concurrency: Vec<u32>,
    },
    /// WIT-SVIDs against a running daemon: FetchWITSVID (key pair + ES256 mint + decision +
    /// issued record, the first message of a stream) beside FetchJWTSVID for comparison,
    /// then, with --url, POST /v1/wpt/verify (WIT and proof verified, one use recorded) with
    /// a fresh proof each time.
    Wit {
        /// The daemon's workload socket.
        #[arg(long, default_value = "mayfly.sock")]
        socket: PathBuf,
        /// How many WIT-SVIDs to fetch in all.
        #[arg(long, default_value_t = 2000, value_parser = clap::value_parser!(u32).range(1..=100_000))]
        requests: u32,
        /// How many fetches at once.
        #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=1024))]
        concurrency: u32,
        /// The daemon's TLS listener, e.g. https://127.0.0.1:8443 (proof checks are skipped without it).
        #[arg(long)]
        url: Option<String>,
        /// The CA certificate (PEM) the listener's certificate chains to.
        #[arg(long)]
        cacert: Option<PathBuf>,
    },
    /// IssueAws (attest, decide, STS AssumeRole, two durable events) against a running daemon
    /// with [aws] (e.g. `mayfly dev --aws-endpoint` and moto): what the broker adds to STS.
    Aws {
        /// The daemon's workload socket.
        #[arg(long, default_value = "mayfly.sock")]
        socket: PathBuf,
        /// The IAM role ARN to assume.
        #[arg(long)]
        role: String,
        /// How many requests.
        #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(u32).range(1..=100_000))]
        requests: u32,
        /// Requests (or writers) in flight at once.
        #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=1024))]
        concurrency: u32,
    },
    /// Several daemons sharing a ledger: lock IDENTITY on one daemon (admin socket) and time
    /// until each other daemon (workload socket) refuses it, then unlock and time until they
    /// issue again; TRIALS times. Prints p50/p99/max of both.
    Propagation {
        /// The admin socket of the daemon the lock is placed on.
        #[arg(long)]
        admin_socket: PathBuf,
        /// The workload socket of another daemon, where the lock must show (repeatable).
        #[arg(long = "to", required = true)]
        to: Vec<PathBuf>,
        /// The identity the callers of `--to` sockets get (e.g. the dev identity).
        #[arg(long)]
        identity: String,
        /// How many lock propagations to time.
        #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=10_000))]
        trials: u32,
    },
    /// Sign a CRL with ENTRIES revoked serials (what a revocation re-publishes), ROUNDS times.
    Crl {
        /// Revoked serials on the CRL.
        #[arg(long, default_value_t = 100_000, value_parser = clap::value_parser!(u32).range(1..=10_000_000))]
        entries: u32,
        /// How many times to sign it.
        #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=1000))]
        rounds: u32,
    },
}

pub async fn run(command: Command) -> ExitCode {
    match command {
        Command::Issue { socket, requests, concurrency, csr, half_load } => {
            hot::issue(socket, requests, &concurrency, csr, half_load).await
        }
        Command::Ledger { events, concurrency, max_batch, data_dir: None } => {
            bench_ledger(events, concurrency, max_batch).await
        }
        Command::Ledger { events, concurrency, max_batch, data_dir: Some(dir) } => {
            grow_ledger(&dir, events, concurrency, max_batch).await
        }
        Command::Policy { dir, rules, decisions } => bench_policy(&dir, rules, decisions),
        Command::Crl { entries, rounds } => bench_crl(entries, rounds),
        Command::Jwt { socket, requests, concurrency } => hot::jwt(socket, requests, &concurrency).await,
        Command::Cfssl { url, pid, requests, concurrency } => hot::cfssl(&url, pid, requests, &concurrency).await,
        Command::Wit { socket, requests, concurrency, url, cacert } => {
            bench_wit(socket, requests, concurrency, url, cacert).await
        }
        Command::Aws { socket, role, requests, concurrency } => bench_aws(socket, role, requests, concurrency).await,
        Command::Propagation { admin_socket, to, identity, trials } => {
            bench_propagation(&admin_socket, &to, &identity, trials).await
        }
    }
}

fn bench_policy(dir: &std::path::Path, generated: u32, decisions: u32) -> ExitCode {
    use crate::identity::{InventoryEntry, Selector, Selectors, Ttl, WorkloadId};
    use crate::policy::bundle::PolicyFiles;
    use crate::policy::{DecisionRequest, Engine, RequestContext, Resource};

    let shipped = match PolicyFiles::read_dir(dir) {
        Ok(f) => f,
        Err(e) => return fail(e),
    };
    // Generated: one permit per workload for its own JWT audience, and one forbid per tenth.
    let mut rules = String::new();
    for i in 0..generated {
        rules.push_str(&format!(
            "@id(\"gen-{i}\") @max_ttl(\"10m\")\npermit (principal == Mayfly::Workload::\"spiffe://mayfly.local/svc/{i}\", action == Mayfly::Action::\"issue_jwt\", resource == Mayfly::Audience::\"https://svc-{i}.example.org\")\nwhen {{ principal.attestation == \"unix\" && context.requested_ttl_secs <= 3600 }};\n"
        ));
        if i % 10 == 0 {
            rules.push_str(&format!(
                "@id(\"gen-forbid-{i}\") @reason(\"frozen\")\nforbid (principal == Mayfly::Workload::\"spiffe://mayfly.local/svc/{i}\", action, resource) when {{ context.break_glass }};\n"
            ));
        }
    }
    let big = PolicyFiles::from_map(
        shipped
            .iter()
            .map(|(p, t)| (p.to_owned(), t.to_owned()))
            .chain([("issuance/generated.cedar".to_owned(), rules)])
            .collect(),
    );
    let started = Instant::now();
    let engines = Engine::from_files(&shipped).and_then(|small| Ok((small, Engine::from_files(&big)?)));
    let (small, large) = match engines {
        Ok(e) => e,
        Err(e) => return fail(e),
    };
    let load = started.elapsed();
    let entries = (0..generated.max(1))
        .map(|i| {
            WorkloadId::parse(&format!("spiffe://mayfly.local/svc/{i}")).map(|id| InventoryEntry {
                id,
                owner: "bench".into(),
                purpose: "bench".into(),
                environment: "prod".into(),
                tier: "standard".into(),
                expires: time::macros::date!(2099 - 12 - 31),
                selectors: Selectors::new(),
                known_as: Selectors::new(),
            })
        })
        .collect::<Result<Vec<_>, _>>();
    let (entries, ttl) = match (entries, Ttl::parse("5m")) {
        (Ok(e), Ok(t)) => (e, t),
        (Err(e), _) | (_, Err(e)) => return fail(e),
    };
    let selectors: Selectors = [Selector::new("unix", "uid", 1000)].into();
    let context = RequestContext::default();
    let now = SystemTime::now();
    out!("policy bench: {decisions} decisions per row; load of both rule sets {:.1} ms", load.as_secs_f64() * 1000.0);
    out!("{:<44} {:>9} {:>9} {:>9} {:>8}", "rule set / evaluation", "p50 µs", "p99 µs", "mean µs", "allowed");
    for (name, engine) in [("shipped", &small), ("shipped + generated", &large)] {
        for indexed in [true, false] {
            let mut latencies = Vec::with_capacity(decisions as usize);
            let mut allowed = 0u32;
            for n in 0..decisions {
                let i = n as usize % entries.len();
                let resource = Resource::Jwt { audience: format!("https://svc-{i}.example.org") };
                let req = DecisionRequest {
                    workload: &entries[i],
                    attestation: "unix",
                    selectors: &selectors,
                    resource: &resource,
                    requested_ttl: ttl,
                    context: &context,
                    reserved_audiences: &[],
                };
                let t = Instant::now();
                let d = if indexed { engine.decide(&req, now) } else { engine.decide_full_scan(&req, now) };
                latencies.push(t.elapsed());
                allowed += u32::from(d.is_allow());
            }
            latencies.sort();
            let pct = |p: f64| {
                latencies[((latencies.len() as f64 * p) as usize).min(latencies.len() - 1)].as_secs_f64() * 1e6
            };
            let mean = latencies.iter().sum::<Duration>().as_secs_f64() * 1e6 / latencies.len() as f64;
            let label = format!(
                "{name} ({} rules), {}",
                engine.rule_count(),
                if indexed { "scope index" } else { "full scan" }
            );
            out!("{label:<44} {:>9.1} {:>9.1} {:>9.1} {:>8}", pct(0.5), pct(0.99), mean, allowed);
        }
    }
    ExitCode::SUCCESS
}

async fn bench_aws(socket: PathBuf, role: String, requests: u32, concurrency: u32) -> ExitCode {
    let channel = match super::connect(&socket).await {
        Ok(c) => c,
        Err(e) => return fail(format!("cannot connect to `{}`: {e}", socket.display())),
    };
    let client = BrokerClient::new(channel);
    let (elapsed, mut latencies, errors) = drive(requests, concurrency, move |_, _| {
        let mut client = client.clone();
        let req =
            crate::api::pb::IssueAwsRequest { role: role.clone(), ttl_seconds: Some(900), spiffe_id: String::new() };
        async move { client.issue_aws(req).await.is_ok() }
    })
    .await;
    report("issue aws (STS AssumeRole) over the workload socket", elapsed, &mut latencies, errors, concurrency);
    ExitCode::SUCCESS
}

async fn bench_ledger(events: u32, concurrency: u32, max_batch: u32) -> ExitCode {
    let dir = std::env::temp_dir().join(format!("mayfly-bench-{}", std::process::id()));
    if let Err(e) = std::fs::create_dir_all(&dir) {
        return fail(e);
    }
    let settings = Settings { max_batch: max_batch as usize, ..Settings::local(Location::in_data_dir(&dir)) };
    let result = async {
        let opened = crate::ledger::open(&settings).await?;
        let (ledger, writer) = (opened.writer, opened.task);
        let writer_handle = ledger.clone();
        let (elapsed, mut latencies, errors) = drive(events, concurrency, move |worker, i| {
            let ledger = writer_handle.clone();
            async move {
                let event = Event::Decision(Decision {
                    action: "issue_x509".into(),
                    outcome: Verdict::Allow,
                    rules: vec!["bench".into()],
                    caller: Caller::local(worker, worker, i32::try_from(i).ok()),
                    api: "bench".into(),
                    ..Decision::default()
                });
                ledger.record(SystemTime::now(), event).await.is_ok()
            }
        })
        .await;
        drop(ledger);
        let _ = writer.await;
        report(
            &format!("ledger appends (default backend, durable commits, max batch {max_batch})"),
            elapsed,
            &mut latencies,
            errors,
            concurrency,
        );
        Ok::<(), crate::ledger::LedgerError>(())
    }
    .await;
    let _ = std::fs::remove_dir_all(&dir);
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(e),
    }
}

/// Appends `events` events (as issuance pairs) to the ledger in `dir`, through the writer
/// the daemon uses; prints the rate and the ledger's size.
async fn grow_ledger(dir: &std::path::Path, events: u32, concurrency: u32, max_batch: u32) -> ExitCode {
    use crate::ledger::event::{CredentialRecord, Issued, IssuedDetails, RequestRecord, ResourceRecord};
    let settings = Settings { max_batch: max_batch as usize, ..Settings::local(Location::in_data_dir(dir)) };
    let opened = match crate::ledger::open(&settings).await {
        Ok(o) => o,
        Err(e) => return fail(e),
    };
    let (ledger, writer) = (opened.writer, opened.task);
    let handle = ledger.clone();
    let exe = "/usr/local/bin/payments-api";
    let sha = "9f2c".repeat(16);
    let (elapsed, _, errors) = drive(events.div_ceil(2), concurrency, move |worker, i| {
        let ledger = handle.clone();
        let sha = sha.clone();
        async move {
            let identity = format!("spiffe://mayfly.local/svc/payments-{}", worker % 50);
            let decision = Decision {
                action: "issue_x509".into(),
                resource: Some("x509".into()),
                outcome: Verdict::Allow,
                reason: "allowed by local-workloads-x509 (ttl 5m)".into(),
                rules: vec!["local-workloads-x509".into()],
                policy_version: format!("sha256:{}", "ab".repeat(32)),
                identity: Some(identity.clone()),
                owner: Some("payments-team@example.org".into()),
                purpose: Some("payments API: mTLS to the ledger service".into()),
                caller: Caller {
                    exe: Some(exe.into()),
                    sha256: Some(sha.clone()),
                    ..Caller::local(1000 + worker, 1000, i32::try_from(i).ok())
                },
                requested_ttl_secs: 300,
                granted_ttl_secs: Some(300),
                api: "mayfly.v1".into(),
                request: Some(RequestRecord {
                    attestation: "unix".into(),
                    selectors: vec![
                        format!("unix:gid:{}", 1000),
                        format!("unix:path:{exe}"),
                        format!("unix:sha256:{sha}"),
                        format!("unix:uid:{}", 1000 + worker),
                    ],
                    resources: vec![ResourceRecord::X509],
                    requested_ttl_secs: 300,
                    ..RequestRecord::default()
                }),
                ..Decision::default()
            };
            let now = SystemTime::now();
            let at = crate::clock::unix_secs(now);
            let credential = CredentialRecord {
                id: uuid::Uuid::now_v7().to_string(),
                kind: "x509".into(),
                identity,
                serial: format!("{:032x}", rand_serial(worker, i)),
                fingerprint: "c3".repeat(32),
                not_before: at,
                // Why a month: the grown ledger is history to measure issuance against; with
                // five minutes the daemon's expiry sweep would record every one of them as it
                // starts, during the measurement.
                not_after: at + 30 * 86_400,
                decision_id: 0,
                break_glass: false,
            };
            let issued = Issued { credential, details: IssuedDetails::default() };
            ledger.record_issuance(now, decision, issued).await.is_ok()
        }
    })
    .await;
    drop(ledger);
    let _ = writer.await;
    let written = u64::from(events.div_ceil(2)).saturating_sub(u64::from(errors)) * 2;
    out!(
        "grew the ledger in `{}` by {written} events ({errors} failed writes) in {:.1} s: {:.0} events/s",
        dir.display(),
        elapsed.as_secs_f64(),
        written as f64 / elapsed.as_secs_f64().max(1e-9)
    );
    ExitCode::SUCCESS
}

/// A serial-like number, distinct per writer and write (no randomness needed here).
fn rand_serial(worker: u32, i: u32) -> u128 {
    (u128::from(worker) << 64 | u128::from(i)).wrapping_mul(0x9e37_79b9_7f4a_7c15_f39c_c060_5ced_c835)
}

/// Runs `total` operations spread over `concurrency` tasks; returns the wall time, the
/// latency of each successful operation and the number that failed.
/// How long until each daemon behind `to` refuses `identity` after a lock placed through
/// `admin_socket` (and issues again after the unlock).
async fn bench_propagation(admin_socket: &std::path::Path, to: &[PathBuf], identity: &str, trials: u32) -> ExitCode {
    use crate::api::pb::{LockRequest, UnlockRequest};
    const GIVE_UP: Duration = Duration::from_secs(10);
    let mut admin = match super::admin(admin_socket).await {
        Ok(a) => a,
        Err(code) => return code,
    };
    let mut brokers = Vec::new();
    for socket in to {
        match super::connect(socket).await {
            Ok(channel) => brokers.push(BrokerClient::new(channel)),
            Err(e) => return fail(format!("`{}`: {e}", socket.display())),
        }
    }
    let csr = match bench_csr() {
        Ok(c) => c,
        Err(e) => return fail(e),
    };
    // Until `refused` says so for every daemon: the time each took, from `since`.
    async fn until_all(
        brokers: &[BrokerClient<tonic::transport::Channel>],
        csr: &[u8],
        refused: bool,
        since: Instant,
    ) -> Result<Vec<Duration>, String> {
        let tasks: Vec<_> = brokers
            .iter()
            .map(|b| {
                let (mut b, csr) = (b.clone(), csr.to_vec());
                tokio::spawn(async move {
                    loop {
                        let request =
                            IssueX509Request { csr: csr.clone(), ttl_seconds: Some(300), spiffe_id: String::new() };
                        let outcome = b.issue_x509(request).await;
                        let is_refused = matches!(&outcome, Err(s) if s.message().contains("locked"));
                        if is_refused == refused {
                            return Ok(since.elapsed());
                        }
                        if let Err(s) = &outcome
                            && !s.message().contains("locked")
                        {
                            return Err(format!("issuance failed: {}", s.message()));
                        }
                        if since.elapsed() > GIVE_UP {
                            let what = if refused { "refused" } else { "issued" };
                            return Err(format!("not {what} within {} s", GIVE_UP.as_secs()));
                        }
                    }
                })
            })
            .collect();
        let mut out = Vec::new();
        for t in tasks {
            out.push(t.await.map_err(|e| e.to_string())??);
        }
        Ok(out)
    }
    let (mut locks, mut unlocks) = (Vec::new(), Vec::new());
    for trial in 0..trials {
        let reason = format!("bench propagation, trial {trial}");
        let since = Instant::now();
        if let Err(s) =
            admin.lock(LockRequest { identity: identity.into(), reason: reason.clone(), ttl_seconds: 0 }).await
        {
            return fail(format!("lock refused: {}", s.message()));
        }
        match until_all(&brokers, &csr, true, since).await {
            Ok(d) => locks.extend(d),
            Err(e) => return fail(e),
        }
        let since = Instant::now();
        if let Err(s) = admin.unlock(UnlockRequest { identity: identity.into(), reason }).await {
            return fail(format!("unlock refused: {}", s.message()));
        }
        match until_all(&brokers, &csr, false, since).await {
            Ok(d) => unlocks.extend(d),
            Err(e) => return fail(e),
        }
    }
    let show = |what: &str, v: &mut Vec<Duration>| {
        v.sort_unstable();
        let pct = |p: f64| {
            let i = ((v.len() as f64 * p).ceil() as usize).clamp(1, v.len().max(1)) - 1;
            v.get(i).map_or(0.0, |d| d.as_secs_f64() * 1e3)
        };
        out!(
            "  {what}: p50 {:.0} ms  p99 {:.0} ms  max {:.0} ms  ({} samples)",
            pct(0.5),
            pct(0.99),
            pct(1.0),
            v.len()
        );
    };
    out!(
        "propagation over {} daemon(s), {trials} trials (the time from the admin call's answer to the first refusal or issuance there)",
        brokers.len()
    );
    show("lock → refused", &mut locks);
    show("unlock → issued", &mut unlocks);
    ExitCode::SUCCESS
}

fn bench_csr() -> Result<Vec<u8>, String> {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(|e| e.to_string())?;
    rcgen::CertificateParams::default().serialize_request(&key).map(|c| c.der().to_vec()).map_err(|e| e.to_string())
}

async fn drive<F, Fut>(total: u32, concurrency: u32, op: F) -> (Duration, Vec<Duration>, u32)
where
    F: Fn(u32, u32) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = bool> + Send,
{
    let per_worker = total.div_ceil(concurrency);
    let started = Instant::now();
    let workers: Vec<_> = (0..concurrency)
        .map(|worker| {
            let op = op.clone();
            let n = per_worker.min(total.saturating_sub(worker * per_worker));
            tokio::spawn(async move {
                let mut latencies = Vec::with_capacity(n as usize);
                let mut errors = 0u32;
                for i in 0..n {
                    let t = Instant::now();
                    if op(worker, i).await {
                        latencies.push(t.elapsed());
                    } else {
                        errors += 1;
                    }
                }
                (latencies, errors)
            })
        })
        .collect();
    let mut latencies = Vec::with_capacity(total as usize);
    let mut errors = 0;
    for w in workers {
        match w.await {
            Ok((l, e)) => {
                latencies.extend(l);
                errors += e;
            }
            Err(_) => errors += per_worker,
        }
    }
    (started.elapsed(), latencies, errors)
}

fn report(what: &str, elapsed: Duration, latencies: &mut [Duration], errors: u32, concurrency: u32) {
    latencies.sort_unstable();
    let pct = |p: f64| {
        let i = ((latencies.len() as f64 * p).ceil() as usize).clamp(1, latencies.len().max(1)) - 1;
        latencies.get(i).map_or(0.0, |d| d.as_secs_f64() * 1e3)
    };
    let ok = latencies.len();
    out!("{what}");
    out!("  {ok} ok, {errors} failed, concurrency {concurrency}, {:.2} s", elapsed.as_secs_f64());
    out!("  throughput {:.0}/s", ok as f64 / elapsed.as_secs_f64().max(1e-9));
    out!(
        "  latency ms: p50 {:.2}  p90 {:.2}  p99 {:.2}  max {:.2}",
        pct(0.50),
        pct(0.90),
        pct(0.99),
        latencies.last().map_or(0.0, |d| d.as_secs_f64() * 1e3)
    );
}

/// CRL regeneration: build the entry list and sign, as `BundlePublisher` does on a change.
fn bench_crl(entries: u32, rounds: u32) -> ExitCode {
    let now = std::time::SystemTime::now();
    let td = match crate::identity::TrustDomain::parse("bench.local") {
        Ok(td) => td,
        Err(e) => return super::fail(e),
    };
    let ca = match crate::keys::CertificateAuthority::generate(&td, now, std::time::Duration::from_secs(86_400)) {
        Ok(ca) => ca,
        Err(e) => return super::fail(e),
    };
    let list: Vec<(String, i64)> =
        (0..entries).map(|n| (format!("40{:030x}", u128::from(n) * 7_919), crate::clock::unix_secs(now))).collect();
    let mut times = Vec::new();
    let mut size = 0;
    for round in 0..rounds {
        let started = std::time::Instant::now();
        match crate::keys::build_crl(&ca, &list, now, u64::from(round) + 1) {
            Ok(der) => size = der.len(),
            Err(e) => return super::fail(e),
        }
        times.push(started.elapsed());
    }
    times.sort();
    let median = times[times.len() / 2];
    out!(
        "crl: {entries} revoked serials, {} bytes DER; sign+encode median {:.1} ms, best {:.1} ms, worst {:.1} ms over {rounds} rounds",
        size,
        median.as_secs_f64() * 1e3,
        times[0].as_secs_f64() * 1e3,
        times[times.len() - 1].as_secs_f64() * 1e3
    );
    ExitCode::SUCCESS
}

async fn bench_wit(
    socket: PathBuf,
    requests: u32,
    concurrency: u32,
    url: Option<String>,
    cacert: Option<PathBuf>,
) -> ExitCode {
    use crate::api::spiffe::spiffe_workload_api_client::SpiffeWorkloadApiClient;
    use crate::api::spiffe::{JwtsvidRequest, WitsvidRequest};
    use crate::keys::ProofSigner;
    use crate::validate::wpt::{ProofRequest, sign_proof};
    fn with_header<T>(message: T) -> tonic::Request<T> {
        let mut r = tonic::Request::new(message);
        r.metadata_mut().insert("workload.spiffe.io", tonic::metadata::MetadataValue::from_static("true"));
        r
    }
    let channel = match super::connect(&socket).await {
        Ok(c) => c,
        Err(e) => return fail(format!("cannot connect to `{}`: {e}", socket.display())),
    };
    let client = SpiffeWorkloadApiClient::new(channel);
    let fetch = client.clone();
    let (elapsed, mut latencies, errors) = drive(requests, concurrency, move |_, _| {
        let mut c = fetch.clone();
        async move {
            match c.fetch_witsvid(with_header(WitsvidRequest { spiffe_id: String::new() })).await {
                Ok(r) => matches!(r.into_inner().message().await, Ok(Some(m)) if !m.svids.is_empty()),
                Err(_) => false,
            }
        }
    })
    .await;
    report(
        "FetchWITSVID (P-256 key pair + ES256 mint + decision + issued record)",
        elapsed,
        &mut latencies,
        errors,
        concurrency,
    );
    let fetch = client.clone();
    let (elapsed, mut latencies, errors) = drive(requests, concurrency, move |_, _| {
        let mut c = fetch.clone();
        async move {
            c.fetch_jwtsvid(with_header(JwtsvidRequest { audience: vec!["bench".into()], spiffe_id: String::new() }))
                .await
                .is_ok()
        }
    })
    .await;
    report(
        "FetchJWTSVID, for comparison (ES256 mint + decision + issued record)",
        elapsed,
        &mut latencies,
        errors,
        concurrency,
    );
    let Some(url) = url else { return ExitCode::SUCCESS };
    let first = async {
        let mut c = client.clone();
        c.fetch_witsvid(with_header(WitsvidRequest { spiffe_id: String::new() })).await?.into_inner().message().await
    };
    let Ok(Some(svid)) = first.await.map(|m| m.and_then(|m| m.svids.into_iter().next())) else {
        return fail("FetchWITSVID gave no WIT-SVID");
    };
    let signer = match ProofSigner::from_private_jwk(&svid.wit_svid_key) {
        Ok(s) => std::sync::Arc::new(s),
        Err(e) => return fail(e),
    };
    let mut builder = reqwest::Client::builder().timeout(Duration::from_secs(15));
    if let Some(path) = &cacert {
        match std::fs::read(path)
            .map_err(|e| e.to_string())
            .and_then(|p| reqwest::Certificate::from_pem(&p).map_err(|e| e.to_string()))
        {
            Ok(ca) => builder = builder.tls_certs_only([ca]),
            Err(e) => return fail(format!("--cacert `{}`: {e}", path.display())),
        }
    }
    let http = match builder.build() {
        Ok(c) => c,
        Err(e) => return fail(e),
    };
    let endpoint = format!("{}/v1/wpt/verify", url.trim_end_matches('/'));
    let wit = std::sync::Arc::new(svid.wit_svid);
    let (elapsed, mut latencies, errors) = drive(requests, concurrency, move |_, _| {
        let (http, endpoint, wit, signer) = (http.clone(), endpoint.clone(), wit.clone(), signer.clone());
        async move {
            let request = ProofRequest {
                wit: &wit,
                audience: "bench",
                lifetime: Duration::from_secs(60),
                access_token: None,
                txn_token: None,
            };
            let Ok(wpt) = sign_proof(&signer, &request, std::time::SystemTime::now()) else { return false };
            let body = serde_json::json!({ "wit": *wit, "wpt": wpt, "audience": "bench" });
            matches!(http.post(&endpoint).json(&body).send().await, Ok(r) if r.status().is_success())
        }
    })
    .await;
    report(
        "POST /v1/wpt/verify (WIT + proof verify + replay check + used record; proof signing included)",
        elapsed,
        &mut latencies,
        errors,
        concurrency,
    );
    ExitCode::SUCCESS
}
