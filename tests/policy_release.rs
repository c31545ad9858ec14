#![expect(clippy::unwrap_used, reason = "tests fail loudly on any unexpected error")]

//! Policy releases on a running daemon: a signed bundle is activated hot while requests keep
//! flowing, tampered / unsigned / foreign-key bundles are refused while the daemon keeps
//! serving on the last good one, an operator rolls back over the admin socket, and a restart
//! keeps all of that. Real daemon in-process, real sockets, real SQLite, real signatures.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mayfly::api::pb::admin_client::AdminClient;
use mayfly::api::pb::broker_client::BrokerClient;
use mayfly::api::pb::{IssueX509Request, PolicyRollbackRequest, PolicyStatusRequest};
use mayfly::clock::SystemClock;
use mayfly::config::{Config, RawPolicy};
use mayfly::daemon::Daemon;
use mayfly::ledger::{EventFilter, Location, StoredEvent, verify_chain};
use mayfly::policy::bundle::{Bundle, PolicyFiles, SigningKey, keygen};
use support::{repo_policies, setup};
use tonic::Code;

mod support;

/// The shipped policies with the local rule's ceiling set to `max_ttl`.
fn policies(max_ttl: &str) -> PolicyFiles {
    let shipped = PolicyFiles::read_dir(&repo_policies()).unwrap();
    let files = shipped
        .iter()
        .map(|(p, t)| {
            let t = if p == "issuance/local.cedar" {
                t.replace("@max_ttl(\"1h\")", &format!("@max_ttl(\"{max_ttl}\")"))
            } else {
                t.to_owned()
            };
            (p.to_owned(), t)
        })
        .collect();
    PolicyFiles::from_map(files)
}

fn signed(files: &PolicyFiles, key: &SigningKey) -> Vec<u8> {
    Bundle::parse(&Bundle::build(files, Some("test".into())).unwrap()).unwrap().sign(key).unwrap()
}

fn key(dir: &Path, name: &str) -> (SigningKey, PathBuf) {
    let (private, public, _) = keygen().unwrap();
    std::fs::write(dir.join(format!("{name}.key")), private.as_bytes()).unwrap();
    std::fs::write(dir.join(format!("{name}.pub")), public).unwrap();
    (SigningKey::load(&dir.join(format!("{name}.key"))).unwrap(), dir.join(format!("{name}.pub")))
}

/// Publishes as an operator should: write beside, then rename into place.
fn publish(dir: &Path, bytes: &[u8]) {
    std::fs::write(dir.join("policy.bundle.new"), bytes).unwrap();
    std::fs::rename(dir.join("policy.bundle.new"), dir.join("policy.bundle")).unwrap();
}

struct Running {
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

/// A daemon on signed bundles at `dir/policy.bundle`, trusting `trusted`, on the real
/// clock, polling every 50 ms.
fn signed_config(dir: &Path, trusted: &Path) -> Config {
    let policy = RawPolicy {
        bundle: Some(dir.join("policy.bundle")),
        trusted_keys: vec![trusted.to_path_buf()],
        poll_interval: None,
    };
    let mut config = setup(dir).signed().raw(|raw| raw.policy = policy).config();
    config.policy_poll = Duration::from_millis(50);
    config
}

async fn start(dir: &Path, trusted: &Path) -> Running {
    let daemon = Daemon::build(signed_config(dir, trusted), Arc::new(SystemClock)).await.unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        daemon
            .run(async {
                let _ = stopped.await;
            })
            .await
            .unwrap();
    });
    Running { stop, task }
}

impl Running {
    async fn stop(self) {
        let _ = self.stop.send(());
        self.task.await.unwrap();
    }
}

async fn events(dir: &Path) -> Vec<StoredEvent> {
    let reader = mayfly::ledger::open_reader(&Location::in_data_dir(&dir.join("data"))).await.unwrap();
    reader.events(EventFilter::all()).await.unwrap()
}

/// Waits (at most 10 s) until the ledger holds `n` events of `kind`; returns the last one.
async fn wait_for(dir: &Path, kind: &str, n: usize) -> StoredEvent {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let matching: Vec<StoredEvent> = events(dir).await.into_iter().filter(|e| e.kind == kind).collect();
        if matching.len() >= n {
            return matching[n - 1].clone();
        }
        assert!(Instant::now() < deadline, "no {n}th `{kind}` event within 10 s");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Issues with the default TTL and returns the certificate's lifetime in seconds.
async fn lifetime(dir: &Path) -> i64 {
    let channel = mayfly::cli::connect(&dir.join("w.sock")).await.unwrap();
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let csr = rcgen::CertificateParams::default().serialize_request(&key).unwrap().der().to_vec();
    let reply = BrokerClient::new(channel)
        .issue_x509(IssueX509Request { csr, ttl_seconds: Some(7200), spiffe_id: String::new() })
        .await
        .unwrap()
        .into_inner();
    let (_, cert) = x509_parser::parse_x509_certificate(&reply.cert_chain[0]).unwrap();
    cert.validity().not_after.timestamp() - cert.validity().not_before.timestamp()
}

async fn admin(dir: &Path) -> AdminClient<tonic::transport::Channel> {
    AdminClient::new(mayfly::cli::connect(&dir.join("admin.sock")).await.unwrap())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_signed_release_is_activated_hot_bad_ones_are_refused_and_an_operator_can_roll_back() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (signer, trusted) = key(dir, "release");
    let (stranger, _) = key(dir, "stranger");
    let v1 = policies("1h");
    publish(dir, &signed(&v1, &signer));
    let daemon = start(dir, &trusted).await;
    let first = wait_for(dir, "policy_activated", 1).await;
    assert!(first.body.contains(&v1.version()) && first.body.contains(signer.key_id()), "{}", first.body);
    assert_eq!(lifetime(dir).await, 3600);
    let admin_mode = std::fs::metadata(dir.join("admin.sock")).unwrap();
    assert_eq!(std::os::unix::fs::PermissionsExt::mode(&admin_mode.permissions()) & 0o777, 0o600);

    // v2 is published while requests keep coming: none fails, and issuance moves to 20 min.
    let v2 = policies("20m");
    let load = {
        let dir = dir.to_path_buf();
        tokio::spawn(async move {
            let mut seen = Vec::new();
            for _ in 0..60 {
                seen.push(lifetime(&dir).await);
            }
            seen
        })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    publish(dir, &signed(&v2, &signer));
    let activated = wait_for(dir, "policy_activated", 2).await;
    assert!(
        activated.body.contains(&v2.version())
            && activated.body.contains(&format!("\"previous\":\"{}\"", v1.version()))
    );
    let seen = load.await.unwrap();
    assert!(seen.iter().all(|l| *l == 3600 || *l == 1200), "{seen:?}");
    assert_eq!(lifetime(dir).await, 1200);
    let last_decision = events(dir).await.into_iter().rfind(|e| e.kind == "decision").unwrap();
    assert!(last_decision.body.contains(&v2.version()), "decisions name the release they were made under");

    // Tampered after signing: a rule's ceiling edited inside the archive.
    let mut tampered = signed(&policies("20m"), &signer);
    let at = tampered.windows(5).position(|w| w == b"\"20m\"").unwrap();
    tampered[at + 1] = b'9';
    publish(dir, &tampered);
    let rejected = wait_for(dir, "policy_rejected", 1).await;
    assert!(rejected.body.contains(&format!("\"kept\":\"{}\"", v2.version())), "{}", rejected.body);
    // Unsigned, and signed by a key the daemon does not trust.
    publish(dir, &Bundle::build(&policies("12h"), None).unwrap());
    assert!(wait_for(dir, "policy_rejected", 2).await.body.contains("unsigned"));
    publish(dir, &signed(&policies("12h"), &stranger));
    assert!(wait_for(dir, "policy_rejected", 3).await.body.contains("not among the trusted keys"));
    // Signed and intact but invalid (a rule off the schema): refused too.
    let mut invalid = policies("20m");
    invalid = PolicyFiles::from_map(
        invalid
            .iter()
            .map(|(p, t)| (p.to_owned(), t.to_owned()))
            .chain([(
                "issuance/bad.cedar".to_owned(),
                "@id(\"bad\") @max_ttl(\"1h\") permit(principal, action, resource) when { principal.nope };".to_owned(),
            )])
            .collect(),
    );
    publish(dir, &signed(&invalid, &signer));
    assert!(wait_for(dir, "policy_rejected", 4).await.body.contains("bad.cedar"));
    assert_eq!(lifetime(dir).await, 1200, "still serving on the last good release");

    // Rollback: a reason is required; then back to v1, recorded with the operator.
    let mut client = admin(dir).await;
    let e = client.policy_rollback(PolicyRollbackRequest { reason: " ".into() }).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    let reply = client
        .policy_rollback(PolicyRollbackRequest { reason: "INC-42: 20 min breaks the batch jobs".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((reply.from.unwrap().version, reply.to.unwrap().version), (v2.version(), v1.version()));
    assert_eq!(lifetime(dir).await, 3600);
    let rolled = wait_for(dir, "policy_rolled_back", 1).await;
    assert!(
        rolled.body.contains("INC-42") && rolled.body.contains(&format!("\"uid\":{}", own_uid())),
        "{}",
        rolled.body
    );
    let status = client.policy_status(PolicyStatusRequest {}).await.unwrap().into_inner();
    assert_eq!(status.current.unwrap().version, v1.version());
    assert_eq!(status.held, v2.version());
    // Rolling back again does not return to the release just rolled back from: the history
    // held only v1, so there is nothing earlier, and v1 stays.
    let again = client.policy_rollback(PolicyRollbackRequest { reason: "INC-42: again".into() }).await.unwrap_err();
    assert_eq!(again.code(), Code::FailedPrecondition);
    assert!(again.message().contains("no earlier good release"), "{}", again.message());
    assert_eq!(lifetime(dir).await, 3600, "still v1, not the rolled-back v2");

    // Re-publishing the release rolled back from does not bring it back; a new one does.
    publish(dir, &signed(&v2, &signer));
    assert!(wait_for(dir, "policy_rejected", 5).await.body.contains("rolled back"));
    assert_eq!(lifetime(dir).await, 3600);
    daemon.stop().await;

    // A restart with a bad bundle at the path starts on the kept good release (v1).
    publish(dir, &tampered);
    let daemon = start(dir, &trusted).await;
    assert!(wait_for(dir, "policy_rejected", 6).await.body.contains(&format!("\"kept\":\"{}\"", v1.version())));
    assert_eq!(lifetime(dir).await, 3600);
    let v3 = policies("45m");
    publish(dir, &signed(&v3, &signer));
    let activated = wait_for(dir, "policy_activated", 4).await;
    assert!(activated.body.contains(&v3.version()), "{}", activated.body);
    assert_eq!(lifetime(dir).await, 2700);
    daemon.stop().await;

    let all = events(dir).await;
    assert!(verify_chain(&all).is_ok());
}

#[tokio::test(flavor = "multi_thread")]
async fn without_any_good_release_the_daemon_does_not_start() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (_, trusted) = key(dir, "release");
    let (stranger, _) = key(dir, "stranger");
    publish(dir, &signed(&policies("1h"), &stranger));
    let err = Daemon::build(signed_config(dir, &trusted), Arc::new(SystemClock)).await.err().unwrap().to_string();
    assert!(err.contains("no usable policy release") && err.contains("not among the trusted keys"), "{err}");
    let recorded = events(dir).await;
    assert_eq!(recorded.len(), 1);
    assert_eq!(recorded[0].kind, "policy_rejected");
}

/// The test process's own uid, as the admin socket's peer credentials report it.
fn own_uid() -> u32 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn rollback_walks_back_through_the_history_and_never_forward() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (signer, trusted) = key(dir, "release");
    let (v1, v2, v3) = (policies("60m"), policies("40m"), policies("20m"));
    publish(dir, &signed(&v1, &signer));
    let daemon = start(dir, &trusted).await;
    publish(dir, &signed(&v2, &signer));
    wait_for(dir, "policy_activated", 2).await;
    publish(dir, &signed(&v3, &signer));
    wait_for(dir, "policy_activated", 3).await;
    assert_eq!(lifetime(dir).await, 1200);
    let mut client = admin(dir).await;
    let status = client.policy_status(PolicyStatusRequest {}).await.unwrap().into_inner();
    let history: Vec<String> = status.history.iter().map(|r| r.version.clone()).collect();
    assert_eq!(history, vec![v2.version(), v1.version()], "most recent first");

    let rollback = |reason: &str| PolicyRollbackRequest { reason: reason.into() };
    let first = client.policy_rollback(rollback("INC-1: v3 is wrong")).await.unwrap().into_inner();
    assert_eq!((first.from.unwrap().version, first.to.unwrap().version), (v3.version(), v2.version()));
    assert_eq!(lifetime(dir).await, 2400);
    let second = client.policy_rollback(rollback("INC-1: v2 too")).await.unwrap().into_inner();
    assert_eq!(
        (second.from.unwrap().version, second.to.unwrap().version),
        (v2.version(), v1.version()),
        "the second rollback goes further back, not forward to v3"
    );
    assert_eq!(lifetime(dir).await, 3600);
    let third = client.policy_rollback(rollback("INC-1: and again")).await.unwrap_err();
    assert_eq!(third.code(), Code::FailedPrecondition);
    assert!(third.message().contains(&v3.version()) && third.message().contains(&v2.version()), "{}", third.message());
    let status = client.policy_status(PolicyStatusRequest {}).await.unwrap().into_inner();
    assert!(status.history.is_empty());
    assert_eq!(status.held_versions, vec![v3.version(), v2.version()]);
    daemon.stop().await;

    // Across a restart, with v3 (held) still at the bundle path: v1 stays, both stay held.
    let daemon = start(dir, &trusted).await;
    assert_eq!(lifetime(dir).await, 3600);
    let status = admin(dir).await.policy_status(PolicyStatusRequest {}).await.unwrap().into_inner();
    assert_eq!(status.current.unwrap().version, v1.version());
    assert_eq!(status.held_versions, vec![v3.version(), v2.version()]);
    // A version that is not held moves on, and clears the held list.
    let v4 = policies("30m");
    publish(dir, &signed(&v4, &signer));
    wait_for(dir, "policy_activated", 5).await;
    assert_eq!(lifetime(dir).await, 1800);
    let status = admin(dir).await.policy_status(PolicyStatusRequest {}).await.unwrap().into_inner();
    assert!(status.held_versions.is_empty());
    assert_eq!(status.history.iter().map(|r| r.version.clone()).collect::<Vec<_>>(), vec![v1.version()]);
    daemon.stop().await;
}
