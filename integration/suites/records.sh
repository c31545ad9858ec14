# The ledger leaving the host: a backup of a live ledger under load that verifies, SIEM exports valid against their schemas
# - backup: `mayfly ledger backup` while two loops fetch X.509 SVIDs back to back; the copy
#   verifies with `audit verify --ledger`, holds a prefix of the live chain (no torn write), is
#   mode 0600, and a second backup to the same file is refused; sqlite3 reads it too;
# - export: decisions (allowed, denied), issuances, a lock, an unlock and a revocation written
#   by the daemon, exported as CloudEvents 1.0 (validated by Python's jsonschema against the
#   vendored CloudEvents JSON schema, formats checked) and as OCSF 1.3.0 (each record against
#   its class's required attributes, tests/fixtures/ocsf-1.3.0-classes.json); `--follow`
#   writes an event committed after it started, and ends cleanly on SIGTERM.
# (Sourced by integration/run in a subshell; helpers in integration/lib.sh.)

need_jsonschema
data=$work/data
sock=$work/mayfly.sock
admin=$work/admin.sock
start_daemon records "$data" "$sock" "$bin" dev --data-dir "$data" --policies "$root/policies" \
  --socket "$sock" --admin-socket "$admin" --listen none || exit 1

# --- a backup under load ------------------------------------------------------------------

load() { # seconds, out-file: X.509 fetches back to back (into out-file.dir); one line per failure
  local until=$((SECONDS + $1)) n=0
  : >"$2"
  while [ $SECONDS -lt $until ]; do
    "$bin" x509 --socket "$sock" --out "$2.dir" >/dev/null 2>>"$2.err" || echo "x509 failed" >>"$2"
    n=$((n + 1))
  done
  echo "$n" >"$2.count"
}
spawn load 6 "$work/load-a"; load_a=$spawned
spawn load 6 "$work/load-b"; load_b=$spawned
sleep 3
check "ledger backup while two loops fetch certificates" bash -c "'$bin' ledger backup --data-dir '$data' --to '$work/backup.db' | tee '$work/backup.out'"
await "$load_a"; await "$load_b"
check "the load saw no failure"            bash -c "cat '$work'/load-*.count; [ ! -s '$work/load-a' ] && [ ! -s '$work/load-b' ]"
check "audit verify passes on the copy"    "$bin" audit verify --ledger "$work/backup.db"
copy_prefix() { # the copy's events are the live ledger's first N, hash for hash
  local n live copy
  n=$(sqlite3 "$work/backup.db" "SELECT count(*) FROM events")
  copy=$(sqlite3 "$work/backup.db" "SELECT group_concat(hash) FROM (SELECT hash FROM events ORDER BY seq)")
  live=$("$bin" audit tail --json -n 100000 --data-dir "$data" | python3 -c "import sys, json; print(','.join(json.loads(l)['hash'] for l in sys.stdin))" | cut -d, -f1-"$n")
  echo "copy: $n events; live: $(sqlite3 "file:$data/ledger.db?mode=ro" 'SELECT count(*) FROM events') events"
  [ "$n" -gt 10 ] && [ "$copy" = "$live" ]
}
check "the copy is a prefix of the live chain, taken mid-load" copy_prefix
check "the copy is mode 0600, one file (no -wal)" bash -c "[ \"\$(stat -c %a '$work/backup.db')\" = 600 ] && [ ! -e '$work/backup.db-wal' ]"
check "a second backup to the same file is refused" refused_with "never replaces" "$bin" ledger backup --data-dir "$data" --to "$work/backup.db"
check "the copy still verifies after the refusal" "$bin" audit verify --ledger "$work/backup.db"

# --- events of every mapped kind, then the exports ----------------------------------------

"$bin" x509 --socket "$sock" --ttl 13h --out "$work/denied" >/dev/null 2>&1 # denied by the guardrail
"$bin" lock --admin-socket "$admin" --identity spiffe://mayfly.local/legacy/batch --reason "records suite" >/dev/null
"$bin" unlock --admin-socket "$admin" --identity spiffe://mayfly.local/legacy/batch --reason "records suite" >/dev/null
"$bin" revoke --admin-socket "$admin" --identity "$dev_id" --reason "records suite" >/dev/null

check "export --format cloudevents"        save "$work/ce.jsonl" "$bin" audit export --format cloudevents --data-dir "$data"
check "every CloudEvent is valid under the CloudEvents 1.0 JSON schema" \
  "$venv/bin/python" "$root/integration/siem_check.py" cloudevents "$root/tests/fixtures/cloudevents-1.0.schema.json" "$work/ce.jsonl"
check "export --format ocsf"               save "$work/ocsf.jsonl" "$bin" audit export --format ocsf --data-dir "$data"
check "every OCSF record has its class's required attributes" \
  "$venv/bin/python" "$root/integration/siem_check.py" ocsf "$root/tests/fixtures/ocsf-1.3.0-classes.json" "$work/ocsf.jsonl"
check "OCSF: a denial is Authorize Session, failed; a lock is Account Change Lock; a revocation Entity Management Delete" python3 -c "
import json, sys
r = [json.loads(l) for l in open('$work/ocsf.jsonl')]
by = lambda kind: [x for x in r if x['unmapped']['kind'] == kind]
assert any(x['class_uid'] == 3003 and x['status_id'] == 2 for x in by('decision')), 'no failed Authorize Session'
assert by('issued') and all(x['class_uid'] == 3002 and x['activity_id'] == 3 for x in by('issued')), 'issued'
assert by('locked') and {x['type_uid'] for x in by('locked')} == {300109}, 'lock'
assert by('unlocked') and {x['type_uid'] for x in by('unlocked')} == {300102}, 'unlock'
assert by('revoked')[0]['type_uid'] == 300404, 'revoke'
print(len(r), 'records')"
check "export --since 1h writes the same events" bash -c "[ \"\$('$bin' audit export --format cloudevents --since 1h --data-dir '$data' | wc -l)\" = \"\$(wc -l <'$work/ce.jsonl')\" ]"

spawn "$bin" audit export --format cloudevents --follow --data-dir "$data" >"$work/follow.jsonl"
follower=$spawned
before=$(wc -l <"$work/ce.jsonl")
check "export --follow writes the events on record" wait_until bash -c "[ \$(wc -l <'$work/follow.jsonl') -ge $before ]"
"$bin" unlock --admin-socket "$admin" --identity "$dev_id" --reason "records suite: after" >/dev/null
check "and an event committed after it started" wait_until grep -q "records suite: after" "$work/follow.jsonl"
kill -TERM "$follower"
check "export --follow ends cleanly on SIGTERM" await "$follower"

check "the daemon stops cleanly"           stop_daemon
check "the live ledger verifies"           "$bin" audit verify --data-dir "$data"
