//! The contract every ledger backend keeps, as one test suite a backend runs against
//! itself (`contract::run`): the chain continues across restarts, batches of any size
//! commit whole, every read filter returns what it says in sequence order, typed events
//! come back as written, and `verify` passes over what was written.
#![allow(clippy::unwrap_used, reason = "a contract suite: a failed unwrap is a failed test")]

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use super::event::{self, Caller, CredentialRecord, Event, EventKind, Issued, IssuedDetails, Lock, Locked, Verdict};
use super::{
    Backend, CredentialFilter, CredentialRow, EventFilter, GroupCommitLedger, Ledger, LedgerError, LedgerRead,
};

/// A backend under test: opens its writer side (again, on the same storage) and a reader.
pub trait Harness: Send + Sync {
    type Backend: Backend;
    fn backend(&self) -> impl Future<Output = Self::Backend> + Send;
    fn reader(&self) -> impl Future<Output = Result<Arc<dyn LedgerRead>, LedgerError>> + Send;
}

/// Runs the whole contract; panics (a test failure) naming the clause broken.
pub async fn run<H: Harness>(harness: H) {
    let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
    let (ledger, task) = GroupCommitLedger::start(harness.backend().await, 64).await.expect("start the writer");
    let reader = harness.reader().await.expect("open a reader");
    assert!(reader.events(EventFilter::all()).await.unwrap().is_empty(), "a new ledger is empty");

    // Written in this order: a decision, two credentials (the second on the emergency
    // path), a lock, and a stop.
    let written = vec![
        (t0, decision("spiffe://mayfly.local/a")),
        (t0 + Duration::from_secs(1), issued("c-late", "spiffe://mayfly.local/a", 1, 900)),
        (t0 + Duration::from_secs(2), break_glass(issued("c-early", "spiffe://mayfly.local/b", 1, 600))),
        (t0 + Duration::from_secs(3), lock("spiffe://mayfly.local/b")),
        (t0 + Duration::from_secs(4), Event::DaemonStopped(event::DaemonStopped { clean: true })),
    ];
    for (n, (at, e)) in written.iter().enumerate() {
        let seq = ledger.record(*at, e.clone()).await.expect("record");
        assert_eq!(seq, n as i64 + 1, "sequence numbers start at 1 and have no gaps");
    }

    // Every event comes back typed as written, in order, at its time.
    let all = reader.events(EventFilter::all()).await.unwrap();
    assert_eq!(all.len(), written.len());
    for (row, (at, e)) in all.iter().zip(&written) {
        assert_eq!(&row.event().unwrap(), e, "event {} decodes to what was written", row.seq);
        assert_eq!(row.at(), *at);
        assert_eq!(row.kind, e.kind().as_str());
    }

    // Filters.
    let kinds = reader.events(EventFilter::kinds(&[EventKind::Issued, EventKind::Locked])).await.unwrap();
    assert_eq!(kinds.iter().map(|e| e.seq).collect::<Vec<_>>(), [2, 3, 4], "kind filter");
    let page =
        reader.events(EventFilter { after: all[0].pos, limit: Some(2), ..EventFilter::default() }).await.unwrap();
    assert_eq!(page.iter().map(|e| e.seq).collect::<Vec<_>>(), [2, 3], "after + limit pages forward");
    let since = reader.events(EventFilter { since_ms: Some(all[3].at_ms), ..EventFilter::default() }).await.unwrap();
    assert_eq!(since.iter().map(|e| e.seq).collect::<Vec<_>>(), [4, 5], "since_ms is inclusive");
    let tail = reader.events(EventFilter::tail(2)).await.unwrap();
    assert_eq!(tail.iter().map(|e| e.seq).collect::<Vec<_>>(), [4, 5], "a tail is the newest, oldest first");
    let chain = all[0].chain.clone();
    assert!(all.iter().all(|e| e.chain == chain), "one writer writes one chain");
    assert_eq!(reader.chains().await.unwrap(), std::slice::from_ref(&chain));
    let by_seq = reader.events_by_seq(&chain, &[1, 4, 99]).await.unwrap();
    assert_eq!(by_seq.len(), 2, "unknown sequence numbers are absent, not errors");
    assert_eq!(by_seq[&4].kind, "locked");

    // Credential rows: written with their issued events, each knowing it.
    let rows = reader.credentials(CredentialFilter::All).await.unwrap();
    assert_eq!(
        rows.iter().map(|r| (r.issued_event, r.credential.id.as_str())).collect::<Vec<_>>(),
        [(2, "c-late"), (3, "c-early")]
    );
    assert!(rows.iter().all(|r| r.chain == chain));
    let active = reader.credentials(CredentialFilter::ActiveAt(700)).await.unwrap();
    assert_eq!(
        active.iter().map(|r| r.credential.id.as_str()).collect::<Vec<_>>(),
        ["c-late"],
        "active: not_after > now"
    );
    let expiring = |after: (i64, &str), until, limit| {
        let r = reader.clone();
        let after = (after.0, after.1.to_owned());
        async move { r.credentials(CredentialFilter::Expiring { after, until, limit }).await.unwrap() }
    };
    let ids = |rows: Vec<CredentialRow>| rows.into_iter().map(|r| r.credential.id).collect::<Vec<_>>();
    assert_eq!(ids(expiring((i64::MIN, ""), 1000, 10).await), ["c-early", "c-late"], "expiry order is not_after");
    assert_eq!(ids(expiring((600, "c-early"), 1000, 10).await), ["c-late"], "the watermark is exclusive");
    assert_eq!(ids(expiring((i64::MIN, ""), 1000, 1).await), ["c-early"], "limit");
    assert!(expiring((i64::MIN, ""), 599, 10).await.is_empty(), "until is inclusive of nothing later");
    let flagged = reader.credentials(CredentialFilter::BreakGlass).await.unwrap();
    assert_eq!(
        flagged.iter().map(|r| (r.issued_event, r.credential.id.as_str())).collect::<Vec<_>>(),
        [(3, "c-early")],
        "the break-glass filter: the emergency issuance only"
    );
    assert!(flagged[0].credential.break_glass && !rows[0].credential.break_glass, "the row carries its event's flag");

    assert_eq!(super::verify(reader.as_ref()).await.unwrap(), written.len(), "verify passes over what was written");

    // The chain continues across a restart of the writer.
    drop(ledger);
    task.await.expect("the writer drains and closes");
    let (ledger, task) = GroupCommitLedger::start(harness.backend().await, 64).await.expect("restart the writer");
    let seq = ledger.record(t0 + Duration::from_secs(5), decision("spiffe://mayfly.local/c")).await.unwrap();
    assert_eq!(seq, written.len() as i64 + 1, "the chain continues where it stopped");

    // Many at once: more rows than one statement takes, each acknowledged once.
    let handles: Vec<_> = (0..2500)
        .map(|n| {
            let l = ledger.clone();
            tokio::spawn(
                async move { l.record(t0, issued(&format!("bulk-{n}"), "spiffe://mayfly.local/d", 1, 2)).await },
            )
        })
        .collect();
    let mut seqs = Vec::new();
    for h in handles {
        seqs.push(h.await.unwrap().unwrap());
    }
    seqs.sort_unstable();
    seqs.dedup();
    assert_eq!(seqs.len(), 2500, "each record got its own sequence number");
    drop(ledger);
    task.await.unwrap();
    let reader = harness.reader().await.unwrap();
    assert_eq!(super::verify(reader.as_ref()).await.unwrap(), written.len() + 1 + 2500);
    assert_eq!(reader.credentials(CredentialFilter::All).await.unwrap().len(), 2 + 2500);
}

fn decision(identity: &str) -> Event {
    Event::Decision(event::Decision {
        action: "issue_x509".into(),
        outcome: Verdict::Allow,
        reason: "allowed by local-workloads-x509".into(),
        rules: vec!["local-workloads-x509".into()],
        policy_version: "sha256:00".into(),
        identity: Some(identity.into()),
        caller: Caller::local(1001, 1001, Some(42)),
        requested_ttl_secs: 3600,
        granted_ttl_secs: Some(3600),
        api: "mayfly.v1".into(),
        ..event::Decision::default()
    })
}

fn issued(id: &str, identity: &str, not_before: i64, not_after: i64) -> Event {
    Event::Issued(Issued {
        credential: CredentialRecord {
            id: id.into(),
            kind: "x509".into(),
            identity: identity.into(),
            serial: format!("{:x}", not_after),
            fingerprint: "ab".into(),
            not_before,
            not_after,
            decision_id: 1,
            break_glass: false,
        },
        details: IssuedDetails::default(),
    })
}

/// An issuance on the emergency path (flagged in its details).
fn break_glass(issued: Event) -> Event {
    match issued {
        Event::Issued(mut i) => {
            i.details.break_glass = true;
            Event::Issued(i)
        }
        other => other,
    }
}

fn lock(target: &str) -> Event {
    Event::Locked(Locked {
        lock: Lock { target: target.into(), until: None, reason: "INC-1".into(), operator: Caller::local(0, 0, None) },
    })
}
