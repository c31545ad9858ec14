# Signed checkpoints: 13 tamper scenarios caught, an inclusion proof checked by an independent verifier, a cut ledger refused at start
# `mayfly dev --checkpoint-file` publishes C2SP signed checkpoints while serving and a final one
# at shutdown. An attacker who can write the SQLite file (integration/tamper.py, which
# recomputes the hash chain from its documented rule) tries 13 edits on copies; `audit verify`
# alone misses the ones with recomputed hashes and truncations, `audit verify --checkpoint`
# catches all 13. `audit prove` gives an inclusion proof that integration/verify_proof.py
# (Python `cryptography`, RFC 9162's algorithm) verifies offline, and refuses when edited.
# The daemon refuses to start on a ledger that does not extend its checkpoint, and says so.
# (Sourced by integration/run in a subshell; helpers in integration/lib.sh.)

need_pip "cryptography" cryptography
ck=$work/checkpoint; mkdir -p "$ck/witness"
file=$ck/witness/checkpoint
start_ck() { # name, data-dir: dev on it, checkpoints to $file, its output in $work/<name>.log
  log=$work/$1.log
  start_daemon "$1" "$2" "$ck/w.sock" \
    "$bin" dev --data-dir "$2" --policies "$root/policies" --socket "$ck/w.sock" --admin-socket "$ck/admin.sock" \
    --listen none --checkpoint-file "$file"
}
size_of() { sed -n 2p "$file"; }
covers_issuance() { # the periodic checkpoint has caught up with the ledger while serving
  local n; n=$(sqlite3 "$ck/data/ledger.db" "SELECT count(*) FROM events")
  [ "$(size_of)" -ge "$n" ] && ! grep -q mayfly-final "$file"
}
stops_cleanly() { stop_daemon || { tail -n 20 "$log"; return 1; }; }
waits_for_checkpoint() { for _ in $(seq 1 80); do covers_issuance && return 0; sleep 0.25; done; return 1; }

start_ck checkpoint "$ck/data" || exit 1
check "a checkpoint is published at start"        wait_until test -s "$file"
check "its public key beside it"                  grep -q "BEGIN PUBLIC KEY" "$file.pub"
for i in 1 2 3 4; do "$bin" x509 --socket "$ck/w.sock" --out "$ck/x$i" >/dev/null; done
check "13 h refused (a denial on record)"         refused_with forbid-ttl-over-12h "$bin" x509 --socket "$ck/w.sock" --ttl 13h --out "$ck/x"
check "the next checkpoint covers the issuance"   waits_for_checkpoint
check "dev stops cleanly"                         stops_cleanly
check "the shutdown's checkpoint is final"        grep -qx mayfly-final "$file"
check "it covers every event"                     rows_are "$ck/data/ledger.db" "SELECT count(*) FROM events" "$(size_of)"
check "its signature line is a signed note's"     grep -q "^— mayfly.local/mayfly-ledger " "$file"
check "the signing key stays in the data dir, 0600" test "$(stat -c %a "$ck/data/checkpoint-key.pem")" = 600
check "audit verify --checkpoint passes"          bash -c "'$bin' audit verify --data-dir '$ck/data' --checkpoint '$file' | grep -q 'nothing follows'"

# An inclusion proof, checked outside the crate.
cred=$(sqlite3 "$ck/data/ledger.db" "SELECT id FROM credentials ORDER BY issued_event LIMIT 1 OFFSET 1")
check "audit prove prints a proof"                save "$ck/proof.json" "$bin" audit prove "$cred" --data-dir "$ck/data" --checkpoint "$file"
check "verify_proof.py accepts it"                "$venv/bin/python" "$root/integration/verify_proof.py" "$ck/proof.json" "$file.pub" "$cred"
python3 - "$ck/proof.json" "$ck/edited-proof.json" <<'EOF'
import json, sys
p = json.load(open(sys.argv[1])); p["event"]["body"] = p["event"]["body"].replace('"not_after":', '"not_after":1', 1)
json.dump(p, open(sys.argv[2], "w"))
EOF
check "…and refuses an edited event"              refused_with "does not match its fields" "$venv/bin/python" "$root/integration/verify_proof.py" "$ck/edited-proof.json" "$file.pub"
python3 - "$ck/proof.json" "$ck/path-proof.json" <<'EOF'
import json, sys
p = json.load(open(sys.argv[1])); p["proof"][0] = "00" * 32
json.dump(p, open(sys.argv[2], "w"))
EOF
check "…and a wrong audit path"                   refused_with "signed root" "$venv/bin/python" "$root/integration/verify_proof.py" "$ck/path-proof.json" "$file.pub"
openssl genpkey -algorithm ed25519 2>/dev/null | openssl pkey -pubout -out "$ck/other.pub" 2>/dev/null
check "…and another signer's key"                 refused_with "no signature line" "$venv/bin/python" "$root/integration/verify_proof.py" "$ck/proof.json" "$ck/other.pub"
check "…and another credential"                   refused_with "another credential" "$venv/bin/python" "$root/integration/verify_proof.py" "$ck/proof.json" "$file.pub" not-this-one

# 13 tamper scenarios, each on a copy of the stopped daemon's ledger.
for scenario in $("$venv/bin/python" "$root/integration/tamper.py" --list); do
  copy=$ck/tampered-$scenario.db
  cp "$ck/data/ledger.db" "$copy"
  "$venv/bin/python" "$root/integration/tamper.py" "$copy" "$scenario" || { check "tamper: $scenario" false; continue; }
  if "$bin" audit verify --ledger "$copy" >/dev/null 2>&1; then alone="missed by the chain alone"; else alone="caught by the chain too"; fi
  check "$scenario ($alone): caught with --checkpoint" refused_with FAILED "$bin" audit verify --ledger "$copy" --checkpoint "$file"
done
# The forgeries are good ones: the chain check alone passes them (what the checkpoint is for).
for scenario in delete-newest delete-newest-six truncate-after-2 delete-middle-rehash swap-rehash insert-rehash edit-rehash append-forged-issued rewrite-all-rehash; do
  check "$scenario passes audit verify without a checkpoint" "$bin" audit verify --ledger "$ck/tampered-$scenario.db"
done

# The daemon refuses to extend a ledger cut behind its back, and says what to do.
cp -a "$ck/data" "$ck/cut"
rm -f "$ck/cut/ledger.db-wal" "$ck/cut/ledger.db-shm"
"$venv/bin/python" "$root/integration/tamper.py" "$ck/cut/ledger.db" delete-newest-six
check "a cut ledger: the daemon refuses to start" refused_with "does not extend its last checkpoint" timeout 30 \
  "$bin" dev --data-dir "$ck/cut" --policies "$root/policies" --socket "$ck/cut.sock" --admin-socket "$ck/cut-admin.sock" --listen none --checkpoint-file "$file"
check "…and leaves the ledger as it found it"    rows_are "$ck/cut/ledger.db" "SELECT count(*) FROM events WHERE kind = 'daemon_started'" 1
start_ck restarted "$ck/data" || exit 1
check "the intact ledger starts again"            wait_until grep -q "mayfly ready" "$log"
check "…and says it extends the checkpoint"      grep -q "the ledger extends its last checkpoint" "$log"
check "its first checkpoint is no longer final"   bash -c "! grep -q mayfly-final '$file'"
check "dev stops cleanly"                         stops_cleanly
check "audit verify --checkpoint after a restart" "$bin" audit verify --data-dir "$ck/data" --checkpoint "$file"
