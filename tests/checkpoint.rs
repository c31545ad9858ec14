#![expect(clippy::unwrap_used, reason = "tests fail loudly on any unexpected error")]

//! Signed checkpoints on a real daemon in-process: published at start, periodically and at
//! shutdown (final), to a file outside the data directory and to a webhook; a restart on a
//! ledger that does not extend the last checkpoint is refused with the reason.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use mayfly::api::pb::IssueX509Request;
use mayfly::daemon::Daemon;
use mayfly::ledger::checkpoint::{ChainTree, Checkpoint, CheckpointSettings};
use mayfly::ledger::event::{DaemonStopped, Event};
use mayfly::ledger::{EventFilter, Ledger, Location, Settings};
use mayfly::policy::bundle::PublicKey;
use support::{Setup, WAIT, setup};

mod support;

fn with_checkpoints(dir: &Path, webhook: Option<String>) -> Setup {
    let file = checkpoint_file(dir);
    std::fs::create_dir_all(file.parent().unwrap()).unwrap();
    setup(dir).raw(|raw| {
        raw.ledger.checkpoint_file = Some(file);
        raw.ledger.checkpoint_interval = Some("1s".into());
        raw.ledger.checkpoint_webhook = webhook;
    })
}

fn checkpoint_file(dir: &Path) -> PathBuf {
    dir.join("witness").join("checkpoint")
}

fn read_checkpoint(dir: &Path) -> Checkpoint {
    let file = checkpoint_file(dir);
    let key = PublicKey::load(&CheckpointSettings::public_key_file(&file)).unwrap();
    Checkpoint::read(&file, &key).unwrap()
}

async fn issue(running: &support::Running) {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let csr = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap().serialize_request(&key).unwrap();
    let req = IssueX509Request { csr: csr.der().to_vec(), ttl_seconds: None, spiffe_id: String::new() };
    running.broker().await.issue_x509(req).await.unwrap();
}

async fn tree_of(location: &Location) -> ChainTree {
    let reader = mayfly::ledger::open_reader(location).await.unwrap();
    let mut tree = ChainTree::new("");
    tree.extend(reader.as_ref(), None).await.unwrap();
    tree
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stopped_daemon_leaves_a_final_checkpoint_of_every_event_and_starts_again_on_it() {
    let dir = tempfile::tempdir().unwrap();
    let running = with_checkpoints(dir.path(), None).start().await;
    issue(&running).await;
    issue(&running).await;
    let location = running.location.clone();
    running.stop().await;

    let checkpoint = read_checkpoint(dir.path());
    assert!(checkpoint.is_final(), "the shutdown's checkpoint is marked final");
    assert_eq!(checkpoint.origin, "mayfly.local/mayfly-ledger");
    let tree = tree_of(&location).await;
    assert_eq!(checkpoint.size, tree.size(), "it covers every event, `daemon_stopped` included");
    assert_eq!(checkpoint.root, tree.root());
    let key_mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(dir.path().join("data/checkpoint-key.pem")).unwrap().permissions(),
    );
    assert_eq!(key_mode & 0o777, 0o600, "the signing key is private");

    // An intact ledger starts again, and the next checkpoints extend the series.
    let running = with_checkpoints(dir.path(), None).start().await;
    issue(&running).await;
    running.stop().await;
    let next = read_checkpoint(dir.path());
    assert!(next.size > checkpoint.size);
}

#[tokio::test(flavor = "multi_thread")]
async fn checkpoints_are_published_while_serving() {
    let dir = tempfile::tempdir().unwrap();
    let running = with_checkpoints(dir.path(), None).start().await;
    issue(&running).await;
    let issued_by = running.events().await.len() as u64;
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        // The file is replaced atomically: it always opens.
        if read_checkpoint(dir.path()).size >= issued_by {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "no checkpoint covered the issuance within {WAIT:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(!read_checkpoint(dir.path()).is_final());
    running.stop().await;
}

/// Opens the stopped daemon's ledger file with SQL, behind mayfly's back.
async fn sql(location: &Location, statement: &str) {
    let Location::Sqlite(path) = location else { panic!("a file ledger") };
    let url = format!("sqlite://{}", path.display());
    let pool = sqlx::SqlitePool::connect(&url).await.unwrap();
    sqlx::query(sqlx::AssertSqlSafe(statement.to_owned())).execute(&pool).await.unwrap();
    pool.close().await;
}

async fn refused(setup: Setup) -> String {
    match Daemon::build(setup.config(), Arc::new(mayfly::clock::SystemClock)).await {
        Ok(_) => panic!("the daemon started on a ledger that does not extend its checkpoint"),
        Err(e) => e.to_string(),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_daemon_refuses_a_truncated_ledger_and_says_why() {
    let dir = tempfile::tempdir().unwrap();
    let running = with_checkpoints(dir.path(), None).start().await;
    issue(&running).await;
    let location = running.location.clone();
    running.stop().await;
    let size = read_checkpoint(dir.path()).size;

    sql(&location, "DELETE FROM events WHERE seq = (SELECT max(seq) FROM events)").await;
    let why = refused(with_checkpoints(dir.path(), None)).await;
    assert!(why.contains("does not extend its last checkpoint"), "{why}");
    assert!(why.contains(&format!("holds {} events of the chain; the checkpoint covers {size}", size - 1)), "{why}");
    assert!(why.contains("move the checkpoint aside"), "{why}");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_daemon_refuses_a_ledger_rewritten_with_recomputed_hashes() {
    let dir = tempfile::tempdir().unwrap();
    let running = with_checkpoints(dir.path(), None).start().await;
    issue(&running).await;
    let location = running.location.clone();
    running.stop().await;

    // Rewrite every event's time and recompute the chain: `verify` alone cannot tell.
    let reader = mayfly::ledger::open_reader(&location).await.unwrap();
    let events = reader.events(EventFilter::all()).await.unwrap();
    drop(reader);
    let mut prev = mayfly::ledger::GENESIS.to_owned();
    for e in &events {
        let at_ms = e.at_ms + 1;
        let hash = mayfly::ledger::event_hash(&prev, e.seq, at_ms, &e.kind, &e.body);
        sql(
            &location,
            &format!("UPDATE events SET at_ms = {at_ms}, prev_hash = '{prev}', hash = '{hash}' WHERE seq = {}", e.seq),
        )
        .await;
        prev = hash;
    }
    let reader = mayfly::ledger::open_reader(&location).await.unwrap();
    assert!(mayfly::ledger::verify(reader.as_ref()).await.is_ok(), "the rewrite passes the chain check");
    drop(reader);

    let why = refused(with_checkpoints(dir.path(), None)).await;
    assert!(why.contains("do not hash to the signed root"), "{why}");
}

#[tokio::test(flavor = "multi_thread")]
async fn events_appended_after_the_final_checkpoint_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let running = with_checkpoints(dir.path(), None).start().await;
    let location = running.location.clone();
    running.stop().await;

    // A well-chained event appended while the daemon was stopped.
    let opened = mayfly::ledger::open(&Settings::local(location)).await.unwrap();
    let event = Event::DaemonStopped(DaemonStopped { clean: true });
    opened.writer.record(SystemTime::now(), event).await.unwrap();
    drop(opened.writer);
    opened.task.await.unwrap();

    let why = refused(with_checkpoints(dir.path(), None)).await;
    assert!(why.contains("1 events were appended after the daemon's final checkpoint"), "{why}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_checkpoint_signed_by_another_key_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let running = with_checkpoints(dir.path(), None).start().await;
    running.stop().await;
    std::fs::remove_file(dir.path().join("data/checkpoint-key.pem")).unwrap();
    let why = refused(with_checkpoints(dir.path(), None)).await;
    assert!(why.contains("is not signed by key"), "{why}");
}

#[tokio::test(flavor = "multi_thread")]
async fn every_checkpoint_reaches_the_webhook() {
    let received: Arc<Mutex<Vec<serde_json::Value>>> = Arc::default();
    let sink = received.clone();
    let app = axum::Router::new().route(
        "/checkpoints",
        axum::routing::post(move |axum::Json(body): axum::Json<serde_json::Value>| {
            let sink = sink.clone();
            async move {
                sink.lock().unwrap().push(body);
                "ok"
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/checkpoints", listener.local_addr().unwrap());
    let server = tokio::spawn(async move { axum::serve(listener, app).await });

    let dir = tempfile::tempdir().unwrap();
    let running = with_checkpoints(dir.path(), Some(url)).start().await;
    issue(&running).await;
    running.stop().await;
    server.abort();

    let file = read_checkpoint(dir.path());
    let key = PublicKey::load(&CheckpointSettings::public_key_file(&checkpoint_file(dir.path()))).unwrap();
    let posted = received.lock().unwrap().clone();
    let last = posted.last().expect("checkpoints were posted");
    let note = last["checkpoint"].as_str().unwrap();
    assert_eq!(Checkpoint::open(note, &key).unwrap(), file, "the webhook got the final checkpoint too");
    assert_eq!(last["size"], file.size);
}

#[test]
fn a_checkpoint_file_inside_the_data_directory_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut raw = None;
    let _ = setup(dir.path()).raw(|r| {
        r.ledger.checkpoint_file = Some(dir.path().join("data").join("checkpoint"));
        raw = Some(r.clone());
    });
    let e = mayfly::config::Config::try_from(raw.unwrap()).unwrap_err().to_string();
    assert!(e.contains("ledger.checkpoint_file") && e.contains("inside the data directory"), "{e}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_daemon_that_dies_right_after_starting_is_not_refused_for_its_own_events() {
    let dir = tempfile::tempdir().unwrap();
    with_checkpoints(dir.path(), None).start().await.stop().await;
    assert!(read_checkpoint(dir.path()).is_final());

    // Built (it records its start), then gone without a stop: no final checkpoint, no tick.
    let daemon =
        Daemon::build(with_checkpoints(dir.path(), None).config(), Arc::new(mayfly::clock::SystemClock)).await.unwrap();
    drop(daemon);
    assert!(!read_checkpoint(dir.path()).is_final(), "the final checkpoint is replaced before anything is appended");

    let running = with_checkpoints(dir.path(), None).start().await;
    running.stop().await;
}
