#![expect(clippy::unwrap_used, reason = "tests fail loudly on any unexpected error")]

//! Ledgers written by mayfly 0.1.0, before the ledger's schema was the typed `Event`
//! (tests/fixtures/ledgers, see its README), still verify and decode: every event of every
//! kind, every field of every body kept by the types.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use mayfly::ledger::event::{Event, EventKind};
use mayfly::ledger::{EventFilter, Location};
use serde_json::Value;

fn fixtures() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/ledgers");
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "db"))
        .collect();
    files.sort();
    assert!(files.len() >= 6, "the fixtures are missing: {files:?}");
    files
}

/// A copy to read (a reader may leave -wal/-shm files beside a ledger).
fn copy(file: &Path, to: &Path) -> Location {
    let target = to.join(file.file_name().unwrap());
    std::fs::copy(file, &target).unwrap();
    Location::file(&target)
}

/// The value without what the typed encoding leaves out as a default (null, false, empty).
fn pruned(v: &Value) -> Value {
    match v {
        Value::Object(map) => Value::Object(
            map.iter()
                .map(|(k, v)| (k.clone(), pruned(v)))
                .filter(|(_, v)| !matches!(v, Value::Null | Value::Bool(false)) && v != &Value::Array(vec![]))
                .filter(|(_, v)| v != &Value::Object(serde_json::Map::new()))
                .collect(),
        ),
        Value::Array(items) => Value::Array(items.iter().map(pruned).collect()),
        other => other.clone(),
    }
}

/// Every field of `old` is in `new` with the same value (`new` may say more).
fn kept(old: &Value, new: &Value, path: &str) -> Result<(), String> {
    match (old, new) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, v) in a {
                let Some(w) = b.get(k) else { return Err(format!("{path}.{k} dropped (was {v})")) };
                kept(v, w, &format!("{path}.{k}"))?;
            }
            Ok(())
        }
        (Value::Array(a), Value::Array(b)) if a.len() == b.len() => {
            a.iter().zip(b).enumerate().try_for_each(|(i, (v, w))| kept(v, w, &format!("{path}[{i}]")))
        }
        (a, b) if a == b => Ok(()),
        (a, b) => Err(format!("{path}: was {a}, decodes as {b}")),
    }
}

#[tokio::test]
async fn ledgers_of_the_previous_release_verify_and_every_event_decodes_keeping_every_field() {
    let tmp = tempfile::tempdir().unwrap();
    let mut seen = BTreeSet::new();
    let mut total = 0;
    for file in fixtures() {
        let location = copy(&file, tmp.path());
        let reader = mayfly::ledger::open_reader(&location).await.unwrap();
        let n = mayfly::ledger::verify(reader.as_ref()).await.unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        let rows = reader.events(EventFilter::all()).await.unwrap();
        assert_eq!(n, rows.len());
        for row in rows {
            let event = row.event().unwrap_or_else(|e| panic!("{}: {e}", file.display()));
            assert_eq!(event.kind().as_str(), row.kind);
            seen.insert(event.kind());
            // Nothing the old body said is lost in the typed value.
            let again: Value = serde_json::from_str(&event.body().unwrap()).unwrap();
            let old: Value = serde_json::from_str(&row.body).unwrap();
            kept(&pruned(&old), &again, &format!("{} #{} {}", file.display(), row.seq, row.kind))
                .unwrap_or_else(|e| panic!("{e}"));
            // And the typed value encodes to itself.
            assert_eq!(Event::decode(&row.kind, &event.body().unwrap()).unwrap(), event);
            total += 1;
        }
    }
    // Kinds added after 0.1.0, which no ledger it wrote can hold.
    let newer = [EventKind::ConfigReloaded, EventKind::Refusals];
    let missing: Vec<&str> =
        EventKind::ALL.iter().filter(|k| !seen.contains(k) && !newer.contains(k)).map(|k| k.as_str()).collect();
    assert!(missing.is_empty(), "kinds no fixture holds: {missing:?}");
    assert!(total >= 100, "{total} events");
}
