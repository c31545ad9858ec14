#![expect(clippy::unwrap_used, reason = "tests fail loudly on any unexpected error")]

//! The spine, end to end: a real daemon in-process on a temporary socket, SQLite in a temp
//! dir, a fixed clock; requests over the real Unix socket with the real gRPC client.

use std::io::IoSliceMut;
use std::os::fd::OwnedFd;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use hyper_util::rt::TokioIo;
use mayfly::api::pb::broker_client::BrokerClient;
use mayfly::api::pb::{IssueX509Request, IssueX509Response};
use mayfly::clock::FixedClock;
use mayfly::config::{Config, RawAdmin};
use mayfly::daemon::Daemon;
use mayfly::ledger::{StoredEvent, verify_chain};
use support::{Running, Setup, repo_policies, setup};
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};
use x509_parser::extensions::GeneralName;

mod support;

const DEV_ID: &str = "spiffe://mayfly.local/dev/quickstart";

/// A daemon that owns its temporary directory (handed back at shutdown for a restart).
struct TestDaemon {
    dir: tempfile::TempDir,
    socket: PathBuf,
    running: Running,
}

/// The spine's daemon: socket `mayfly.sock`, no admin socket, a 1 s SQLite busy timeout.
fn spine(dir: &Path, policies: &Path) -> Setup {
    let socket = dir.join("mayfly.sock");
    setup(dir).policies(policies).raw(|raw| {
        raw.workload_api.socket = Some(socket);
        raw.admin = RawAdmin::default();
        raw.ledger.busy_timeout = Some("1s".into());
    })
}

fn config(dir: &Path, policies: &Path) -> Config {
    spine(dir, policies).config()
}

impl TestDaemon {
    async fn start() -> Self {
        Self::start_with(tempfile::tempdir().unwrap(), &repo_policies(), SystemTime::now()).await
    }

    async fn start_with(dir: tempfile::TempDir, policies: &Path, now: SystemTime) -> Self {
        let running = spine(dir.path(), policies).at(now).start().await;
        Self { socket: running.socket.clone(), dir, running }
    }

    async fn shutdown(self) -> tempfile::TempDir {
        self.running.stop().await;
        self.dir
    }

    fn ledger_path(&self) -> PathBuf {
        self.running.ledger_file()
    }

    async fn events(&self) -> Vec<StoredEvent> {
        self.running.events().await
    }

    async fn client(&self) -> BrokerClient<Channel> {
        self.running.broker().await
    }

    async fn issue(&self, req: IssueX509Request) -> Result<IssueX509Response, Status> {
        self.client().await.issue_x509(req).await.map(tonic::Response::into_inner)
    }
}

fn csr() -> Vec<u8> {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = rcgen::CertificateParams::new(vec!["asked-for.example.com".into()]).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params.serialize_request(&key).unwrap().der().to_vec()
}

fn request(ttl: Option<i64>) -> IssueX509Request {
    IssueX509Request { csr: csr(), ttl_seconds: ttl, spiffe_id: String::new() }
}

fn kinds(events: &[StoredEvent]) -> Vec<&str> {
    events.iter().map(|e| e.kind.as_str()).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_local_workload_gets_a_short_lived_svid_recorded_before_it_is_returned() {
    let d = TestDaemon::start().await;
    let reply = d.issue(request(None)).await.unwrap();
    assert_eq!(reply.spiffe_id, DEV_ID);

    let (_, cert) = x509_parser::parse_x509_certificate(&reply.cert_chain[0]).unwrap();
    let sans = cert.subject_alternative_name().unwrap().unwrap().value.general_names.clone();
    assert_eq!(sans, vec![GeneralName::URI(DEV_ID)], "CSR's DNS name must not be copied");
    assert!(!cert.basic_constraints().unwrap().unwrap().value.ca);
    let lifetime = cert.validity().not_after.timestamp() - cert.validity().not_before.timestamp();
    assert_eq!(lifetime, 3600, "default lifetime is 1 h");
    assert_eq!(cert.validity().not_after.timestamp(), reply.not_after);
    let (_, ca) = x509_parser::parse_x509_certificate(&reply.trust_bundle[0]).unwrap();
    cert.verify_signature(Some(ca.public_key())).unwrap();

    let events = d.events().await;
    assert_eq!(kinds(&events), ["policy_activated", "daemon_started", "decision", "issued"]);
    assert!(events[0].body.contains("\"unsigned\":true"), "dev reads policies/ unsigned and says so");
    assert!(events[2].body.contains("\"outcome\":\"allow\"") && events[2].body.contains("local-workloads-x509"));
    assert!(events[3].body.contains(&reply.serial) && events[3].body.contains(&reply.credential_id));
    let creds = d.running.credentials().await;
    assert_eq!(creds.len(), 1);
    assert_eq!(creds[0].serial, reply.serial);
    assert_eq!(creds[0].decision_id, events[2].seq);
    assert_eq!(verify_chain(&events), Ok(4));
    // Nothing secret in the ledger: no PEM, no key.
    assert!(!events.iter().any(|e| e.body.contains("PRIVATE KEY") || e.body.contains("BEGIN")));

    let (ledger, location) = (d.ledger_path(), d.running.location.clone());
    let dir = d.shutdown().await;
    let reader = mayfly::ledger::open_reader(&location).await.unwrap();
    let events = reader.events(mayfly::ledger::EventFilter::all()).await.unwrap();
    assert_eq!(kinds(&events).last(), Some(&"daemon_stopped"));
    assert!(!dir.path().join("mayfly.sock").exists(), "socket removed at shutdown");
    let wal = ledger.with_extension("db-wal");
    assert!(std::fs::metadata(&wal).map_or(true, |m| m.len() == 0), "WAL folded into ledger.db at a clean stop");
}

#[tokio::test(flavor = "multi_thread")]
async fn requested_ttl_is_clamped_to_policy_and_guardrails_deny_with_the_rule_named() {
    let d = TestDaemon::start().await;
    let short = d.issue(request(Some(600))).await.unwrap();
    let (_, cert) = x509_parser::parse_x509_certificate(&short.cert_chain[0]).unwrap();
    assert_eq!(cert.validity().not_after.timestamp() - cert.validity().not_before.timestamp(), 600);

    let clamped = d.issue(request(Some(2 * 3600))).await.unwrap();
    let (_, cert) = x509_parser::parse_x509_certificate(&clamped.cert_chain[0]).unwrap();
    assert_eq!(cert.validity().not_after.timestamp() - cert.validity().not_before.timestamp(), 3600);

    let denied = d.issue(request(Some(13 * 3600))).await.unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied);
    assert!(denied.message().contains("forbid-ttl-over-12h"), "{}", denied.message());
    let last = d.events().await.pop().unwrap();
    assert_eq!(last.kind, "decision");
    assert!(last.body.contains("\"outcome\":\"deny\"") && last.body.contains("forbid-ttl-over-12h"));
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_input_gets_a_clear_error_and_changes_nothing() {
    let d = TestDaemon::start().await;
    let before = d.events().await.len();

    let garbage = d.issue(IssueX509Request { csr: b"hello".to_vec(), ..request(None) }).await.unwrap_err();
    assert_eq!(garbage.code(), Code::InvalidArgument);
    assert!(garbage.message().contains("csr"), "{}", garbage.message());

    let mut tampered = csr();
    let mid = tampered.len() / 2;
    tampered[mid] ^= 0x01;
    let bad_sig = d.issue(IssueX509Request { csr: tampered, ..request(None) }).await.unwrap_err();
    assert_eq!(bad_sig.code(), Code::InvalidArgument);

    for ttl in [0, -60, 25 * 3600] {
        let e = d.issue(request(Some(ttl))).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "ttl {ttl}: {}", e.message());
        assert!(e.message().contains("ttl"), "{}", e.message());
    }

    let huge = d.issue(IssueX509Request { csr: vec![0x30; 70 * 1024], ..request(None) }).await.unwrap_err();
    assert!(matches!(huge.code(), Code::OutOfRange | Code::ResourceExhausted | Code::InvalidArgument), "{huge:?}");

    let bad_id = d.issue(IssueX509Request { spiffe_id: "not-a-spiffe-id".into(), ..request(None) }).await.unwrap_err();
    assert_eq!(bad_id.code(), Code::InvalidArgument);

    // Nothing was decided or recorded, and the daemon still serves.
    assert_eq!(d.events().await.len(), before);
    d.issue(request(None)).await.unwrap();
}

async fn policies_with_inventory(inventory: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let src = repo_policies();
    std::fs::copy(src.join("schema.cedarschema"), dir.path().join("schema.cedarschema")).unwrap();
    for sub in ["issuance", "session-policies"] {
        std::fs::create_dir(dir.path().join(sub)).unwrap();
        for f in std::fs::read_dir(src.join(sub)).unwrap() {
            let f = f.unwrap().path();
            std::fs::copy(&f, dir.path().join(sub).join(f.file_name().unwrap())).unwrap();
        }
    }
    std::fs::write(dir.path().join("inventory.toml"), inventory).unwrap();
    dir
}

#[tokio::test(flavor = "multi_thread")]
async fn callers_without_a_live_inventory_entry_are_denied_saying_which() {
    let policies = policies_with_inventory(
        r#"
        [[workload]]
        id = "spiffe://mayfly.local/other"
        owner = "team-other"
        purpose = "another uid"
        environment = "dev"
        tier = "standard"
        expires = 2030-01-01
        selectors = ["unix:uid:4242424"]
        "#,
    )
    .await;
    let d = TestDaemon::start_with(tempfile::tempdir().unwrap(), policies.path(), SystemTime::now()).await;
    let e = d.issue(request(None)).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    assert!(e.message().contains("no inventory entry"), "{}", e.message());
    let last = d.events().await.pop().unwrap();
    assert!(last.kind == "decision" && last.body.contains("no inventory entry"));

    // The shipped dev entry expires 2027-12-31; on 2028-01-01 it no longer issues.
    let after_expiry = SystemTime::UNIX_EPOCH + Duration::from_secs(1_830_297_600);
    let d = TestDaemon::start_with(tempfile::tempdir().unwrap(), &repo_policies(), after_expiry).await;
    let e = d.issue(request(None)).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    assert!(e.message().contains("expired on 2027-12-31"), "{}", e.message());
    let last = d.events().await.pop().unwrap();
    assert!(last.body.contains("\"outcome\":\"deny\"") && last.body.contains("expired"));
}

/// Runs tests/support/handoff.py and returns the connection it hands back.
async fn handed_off_connection(socket: &Path, mode: &str) -> (UnixStream, std::os::unix::net::UnixStream) {
    let dir = tempfile::tempdir().unwrap();
    let control_path = dir.path().join("control.sock");
    let control = std::os::unix::net::UnixListener::bind(&control_path).unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/handoff.py");
    let mut child = std::process::Command::new("python3")
        .arg(script)
        .arg(socket)
        .arg(&control_path)
        .arg(mode)
        .spawn()
        .expect("python3 is needed for the PID-race test");
    let (holder, fd) = tokio::task::spawn_blocking(move || {
        let (holder, _) = control.accept().unwrap();
        holder.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut space = [std::mem::MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
        let mut ancillary = rustix::net::RecvAncillaryBuffer::new(&mut space);
        let mut byte = [0u8; 1];
        rustix::net::recvmsg(
            &holder,
            &mut [IoSliceMut::new(&mut byte)],
            &mut ancillary,
            rustix::net::RecvFlags::empty(),
        )
        .unwrap();
        let mut fd: Option<OwnedFd> = None;
        for msg in ancillary.drain() {
            if let rustix::net::RecvAncillaryMessage::ScmRights(mut fds) = msg {
                fd = fds.next();
            }
        }
        (holder, fd.expect("no fd received"))
    })
    .await
    .unwrap();
    if mode == "exit" {
        // The connecting process has exited; reap it so not even a zombie is left.
        child.wait().unwrap();
    } else {
        std::mem::forget(child);
    }
    let std_stream = std::os::unix::net::UnixStream::from(fd);
    std_stream.set_nonblocking(true).unwrap();
    (UnixStream::from_std(std_stream).unwrap(), holder)
}

async fn channel_over(stream: UnixStream) -> Channel {
    let slot = Arc::new(Mutex::new(Some(stream)));
    Endpoint::from_static("http://handoff.invalid")
        .connect_with_connector(tower::service_fn(move |_| {
            let taken = slot.lock().unwrap().take();
            async move { taken.map(TokioIo::new).ok_or_else(|| std::io::Error::other("used once")) }
        }))
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_connection_outliving_its_connecting_process_gets_nothing() {
    let d = TestDaemon::start().await;

    // Control: the connecting process is alive, so the handed-off connection works.
    let (stream, holder) = handed_off_connection(&d.socket, "stay").await;
    let mut client = BrokerClient::new(channel_over(stream).await);
    let ok = client.issue_x509(request(None)).await.unwrap().into_inner();
    assert_eq!(ok.spiffe_id, DEV_ID);
    drop(holder);

    // The connecting process forks, exits; the grandchild keeps the connection.
    let (stream, holder) = handed_off_connection(&d.socket, "exit").await;
    let mut client = BrokerClient::new(channel_over(stream).await);
    let e = client.issue_x509(request(None)).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains("exited"), "{}", e.message());
    drop(holder);

    let events = d.events().await;
    let issued = events.iter().filter(|e| e.kind == "issued").count();
    assert_eq!(issued, 1, "only the live caller got a certificate");
    let last = events.last().unwrap();
    assert!(last.kind == "decision" && last.body.contains("\"outcome\":\"deny\"") && last.body.contains("exited"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_caller_that_switched_user_after_connecting_gets_nothing() {
    if !rustix::process::geteuid().is_root() {
        eprintln!("skipped: switching to nobody after connecting needs root");
        return;
    }
    let d = TestDaemon::start().await;
    // Connected as root (the dev entry's `unix:uid:self`), then setuid(65534): SO_PEERCRED
    // still says root, /proc/<pid>/status says nobody.
    let (stream, holder) = handed_off_connection(&d.socket, "drop").await;
    let mut client = BrokerClient::new(channel_over(stream).await);
    let e = client.issue_x509(request(None)).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains("no longer runs as the user that connected"), "{}", e.message());
    assert!(e.message().contains("uids 65534/65534/65534/65534"), "{}", e.message());
    drop(holder);

    let events = d.events().await;
    assert_eq!(events.iter().filter(|e| e.kind == "issued").count(), 0, "nothing issued to the switched process");
    let last = events.last().unwrap();
    assert!(
        last.kind == "decision"
            && last.body.contains("\"outcome\":\"deny\"")
            && last.body.contains("no longer runs as the user that connected"),
        "{}",
        last.body
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn when_the_ledger_cannot_be_written_the_caller_gets_unavailable_and_no_certificate() {
    let d = TestDaemon::start().await;
    d.issue(request(None)).await.unwrap();

    // Another process holds SQLite's write lock longer than the daemon's busy timeout (1 s).
    use sqlx::Connection;
    let mut locker = sqlx::SqliteConnection::connect(&format!("sqlite://{}", d.ledger_path().display())).await.unwrap();
    sqlx::query("BEGIN IMMEDIATE").execute(&mut locker).await.unwrap();
    let e = d.issue(request(None)).await.unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    assert!(e.message().contains("nothing was issued"), "{}", e.message());
    sqlx::query("ROLLBACK").execute(&mut locker).await.unwrap();

    // The daemon recovers; the chain has no gap and only one certificate was ever issued before.
    let reply = d.issue(request(None)).await.unwrap();
    let events = d.events().await;
    assert_eq!(events.iter().filter(|e| e.kind == "issued").count(), 2);
    assert!(events.last().unwrap().body.contains(&reply.serial));
    assert_eq!(verify_chain(&events), Ok(events.len()));
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_issuances_are_each_recorded_once() {
    let d = TestDaemon::start().await;
    let client = d.client().await;
    let calls: Vec<_> = (0..40)
        .map(|_| {
            let mut c = client.clone();
            tokio::spawn(async move { c.issue_x509(request(Some(300))).await.map(|r| r.into_inner().serial) })
        })
        .collect();
    let mut serials = Vec::new();
    for call in calls {
        serials.push(call.await.unwrap().unwrap());
    }
    serials.sort();
    serials.dedup();
    assert_eq!(serials.len(), 40, "serials are unique");
    let events = d.events().await;
    assert_eq!(events.iter().filter(|e| e.kind == "issued").count(), 40);
    assert_eq!(verify_chain(&events), Ok(events.len()));
}

#[tokio::test(flavor = "multi_thread")]
async fn the_socket_is_open_to_local_users_but_guarded_against_takeover() {
    // A stale socket file is replaced; the CA survives a restart.
    let dir = tempfile::tempdir().unwrap();
    let stale = std::os::unix::net::UnixListener::bind(dir.path().join("mayfly.sock")).unwrap();
    drop(stale);
    let d = TestDaemon::start_with(dir, &repo_policies(), SystemTime::now()).await;
    let mode = std::fs::metadata(&d.socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o666, "any local user may connect; attestation is the gate");
    let first_bundle = d.issue(request(None)).await.unwrap().trust_bundle;

    // A live socket is not stolen by a second daemon.
    let again =
        Daemon::build(config(d.dir.path(), &repo_policies()), Arc::new(FixedClock::new(SystemTime::now()))).await;
    assert!(again.err().unwrap().to_string().contains("another process"));

    let dir = d.shutdown().await;
    let d = TestDaemon::start_with(dir, &repo_policies(), SystemTime::now()).await;
    assert_eq!(d.issue(request(None)).await.unwrap().trust_bundle, first_bundle, "dev CA reused on restart");
    // A client that keeps its connection open does not hold the daemon up at shutdown.
    let mut idle = d.client().await;
    idle.issue_x509(request(None)).await.unwrap();
    let dir = tokio::time::timeout(Duration::from_secs(20), d.shutdown()).await.expect("shutdown is bounded");
    drop(idle);

    // A symlink at the socket path is refused.
    std::os::unix::fs::symlink("/tmp/elsewhere.sock", dir.path().join("mayfly.sock")).unwrap();
    let e = Daemon::build(config(dir.path(), &repo_policies()), Arc::new(FixedClock::new(SystemTime::now()))).await;
    assert!(e.err().unwrap().to_string().contains("symlink"));
    std::fs::remove_file(dir.path().join("mayfly.sock")).unwrap();

    // A directory others can write is refused.
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let e = Daemon::build(config(dir.path(), &repo_policies()), Arc::new(FixedClock::new(SystemTime::now()))).await;
    assert!(e.err().unwrap().to_string().contains("writable by others"));
}
