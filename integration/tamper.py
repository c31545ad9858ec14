#!/usr/bin/env python3
"""Tamper with a stopped daemon's SQLite ledger the way an attacker who can write the file
would, for integration/suites/checkpoint.sh. Written outside the crate on purpose: it
recomputes mayfly's hash chain from the documented rule (SHA-256 over the previous hash,
seq, at_ms, kind and body, each prefixed by its length as a big-endian u64), so the
"recomputed hashes" scenarios are forgeries that pass the chain check alone.

usage: tamper.py LEDGER.db SCENARIO      (tamper.py --list: the scenarios)
"""
import hashlib
import json
import sqlite3
import sys

GENESIS = "0" * 64


def event_hash(prev, seq, at_ms, kind, body):
    h = hashlib.sha256()
    for part in (prev.encode(), seq.to_bytes(8, "big", signed=True), at_ms.to_bytes(8, "big", signed=True),
                 kind.encode(), body.encode()):
        h.update(len(part).to_bytes(8, "big"))
        h.update(part)
    return h.hexdigest()


def load(db):
    events = [dict(zip(("seq", "at_ms", "kind", "body", "prev_hash", "hash"), r))
              for r in db.execute("SELECT seq, at_ms, kind, body, prev_hash, hash FROM events ORDER BY seq")]
    return events


def dumps(value):
    # mayfly's serde_json: compact, fields in order, non-ASCII as is.
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def rewrite(db, events):
    """Renumber 1..n, re-chain every hash, and keep the credential table consistent with the
    rewritten `issued` events (ids and decision numbers follow the renumbering)."""
    old_to_new = {e["seq"]: i + 1 for i, e in enumerate(events) if "seq" in e and e["seq"] is not None}
    prev = GENESIS
    rows = []
    for i, e in enumerate(events):
        seq = i + 1
        if e["kind"] == "issued":
            body = json.loads(e["body"])
            if body.get("decision_id") in old_to_new:
                body["decision_id"] = old_to_new[body["decision_id"]]
                e["body"] = dumps(body)
        h = event_hash(prev, seq, e["at_ms"], e["kind"], e["body"])
        rows.append((seq, e["at_ms"], e["kind"], e["body"], prev, h))
        prev = h
    db.execute("DELETE FROM credentials")
    db.execute("DELETE FROM events")
    db.executemany("INSERT INTO events (seq, at_ms, kind, body, prev_hash, hash) VALUES (?,?,?,?,?,?)", rows)
    for seq, _, kind, body, _, _ in rows:
        if kind != "issued":
            continue
        c = json.loads(body)
        db.execute(
            "INSERT INTO credentials (id, kind, identity, serial, fingerprint, not_before, not_after, decision_id,"
            " issued_event, break_glass) VALUES (?,?,?,?,?,?,?,?,?,?)",
            (c["id"], c["kind"], c["identity"], c["serial"], c["fingerprint"], c["not_before"], c["not_after"],
             c["decision_id"], seq, bool(c.get("break_glass"))))


def middle(events, kind=None):
    """An event near the middle (of `kind`, if given)."""
    candidates = [e for e in events if kind is None or e["kind"] == kind]
    return candidates[len(candidates) // 2]


def drop_rows_of(db, seqs):
    q = ",".join("?" * len(seqs))
    db.execute(f"DELETE FROM credentials WHERE issued_event IN ({q})", seqs)
    db.execute(f"DELETE FROM events WHERE seq IN ({q})", seqs)


def delete_newest(db, events):
    drop_rows_of(db, [events[-1]["seq"]])


def delete_newest_six(db, events):
    drop_rows_of(db, [e["seq"] for e in events[-6:]])


def truncate_after_2(db, events):
    drop_rows_of(db, [e["seq"] for e in events[2:]])


def delete_middle(db, events):
    drop_rows_of(db, [middle(events, "decision")["seq"]])


def delete_middle_rehash(db, events):
    victim = middle(events, "decision")
    rewrite(db, [e for e in events if e is not victim])


def swap(db, events):
    a = middle(events, "decision")
    b = events[events.index(a) + 1]
    db.execute("UPDATE events SET body = ?, kind = ? WHERE seq = ?", (b["body"], b["kind"], a["seq"]))
    db.execute("UPDATE events SET body = ?, kind = ? WHERE seq = ?", (a["body"], a["kind"], b["seq"]))


def swap_rehash(db, events):
    i = events.index(middle(events, "decision"))
    events[i], events[i + 1] = events[i + 1], events[i]
    rewrite(db, events)


def insert_rehash(db, events):
    i = events.index(middle(events, "decision"))
    forged = dict(events[i])
    body = json.loads(forged["body"])
    body["reason"] = "forged: a decision that never happened"
    forged["body"] = dumps(body)
    events.insert(i, forged)
    rewrite(db, events)


def edit(db, events):
    e = middle(events, "decision")
    db.execute("UPDATE events SET body = ? WHERE seq = ?", (e["body"].replace('"allow"', '"deny"', 1) + " ", e["seq"]))


def edit_rehash(db, events):
    e = middle(events, "decision")
    body = json.loads(e["body"])
    body["reason"] = "rewritten after the fact"
    e["body"] = dumps(body)
    rewrite(db, events)


def append_forged_issued(db, events):
    issued = [e for e in events if e["kind"] == "issued"][-1]
    body = json.loads(issued["body"])
    body["id"] = "forged-credential"
    body["serial"] = "00ff00ff"
    events.append({"seq": None, "at_ms": events[-1]["at_ms"] + 1, "kind": "issued", "body": dumps(body)})
    rewrite(db, events)


def rewrite_all_rehash(db, events):
    for e in events:
        e["at_ms"] += 1000
    rewrite(db, events)


def edit_credential_row(db, events):
    db.execute("UPDATE credentials SET not_after = not_after + 86400 WHERE rowid = (SELECT min(rowid) FROM credentials)")


SCENARIOS = {
    "delete-newest": delete_newest,
    "delete-newest-six": delete_newest_six,
    "truncate-after-2": truncate_after_2,
    "delete-middle": delete_middle,
    "delete-middle-rehash": delete_middle_rehash,
    "swap": swap,
    "swap-rehash": swap_rehash,
    "insert-rehash": insert_rehash,
    "edit": edit,
    "edit-rehash": edit_rehash,
    "append-forged-issued": append_forged_issued,
    "rewrite-all-rehash": rewrite_all_rehash,
    "edit-credential-row": edit_credential_row,
}


def main():
    if sys.argv[1:] == ["--list"]:
        print("\n".join(SCENARIOS))
        return 0
    if len(sys.argv) != 3 or sys.argv[2] not in SCENARIOS:
        print(__doc__, file=sys.stderr)
        return 2
    db = sqlite3.connect(sys.argv[1])
    with db:
        SCENARIOS[sys.argv[2]](db, load(db))
    db.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
