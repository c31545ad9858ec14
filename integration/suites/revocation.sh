# Revocation while py-spiffe holds a stream: the SVID withdrawn, its serial on the CRL, the JWT-SVID invalid, a lock
# `mayfly revoke --identity` withdraws the SVID from a py-spiffe stream, its serial is on the
# CRL that `openssl crl` reads and verifies, a revoked JWT-SVID no longer validates, the
# identity is locked until unlocked.
# (Sourced by integration/run in a subshell; helpers in integration/lib.sh.)

wait_hold() { # the held stream ends by itself once its SVID is withdrawn
  await "$hold_pid"
  local rc=$?; cat "$rv/hold.json" "$rv/hold.err"; return $rc
}

crl_lists() { # the held serial on the CRL, read and verified by openssl
  curl -sf --cacert "$rv/data/ca.pem" "https://127.0.0.1:$rv_port/crl.der" -o "$rv/crl.der" || return 1
  openssl crl -inform DER -in "$rv/crl.der" -CAfile "$rv/data/ca.pem" -noout 2>&1 | grep -q "verify OK" || { echo "CRL signature not verified"; return 1; }
  openssl crl -inform DER -in "$rv/crl.der" -noout -text | tee "$rv/crl.txt" | grep -qi "Serial Number: *$held"
}

trace_tells_the_story() { # revoked, locked and issued, in the trace of the identity
  # Why a file first: `| grep -q` stops reading at its first match, which cut the trace short
  # for the greps after it (and made mayfly panic on the closed pipe).
  "$bin" audit trace --data-dir "$rv/data" --identity "$dev_id" > "$rv/trace.txt" || return 1
  cat "$rv/trace.txt"
  grep -q 'revoked' "$rv/trace.txt" && grep -q 'locked' "$rv/trace.txt" && grep -q 'issued\|x509 credential' "$rv/trace.txt"
}

need_py_spiffe
rv=$work/revoke; mkdir -p "$rv"
rv_port=$(free_port)
start_daemon dev "$rv/data" "$rv/admin.sock" \
  "$bin" dev --data-dir "$rv/data" --policies "$root/policies" --socket "$rv/w.sock" --admin-socket "$rv/admin.sock" --listen "127.0.0.1:$rv_port" || exit 1
export SPIFFE_ENDPOINT_SOCKET=unix://$rv/w.sock
check "py-spiffe fetches a JWT-SVID to revoke later" save "$rv/jwt.json" py_client fetchjwt db "$rv/token.jwt"
spawn "$venv/bin/python" "$root/integration/spiffe_check.py" hold 30 > "$rv/hold.json" 2>"$rv/hold.err"
hold_pid=$spawned
wait_until test -s "$rv/hold.json"
held=$(python3 -c 'import json,sys; print(json.loads(open(sys.argv[1]).readline())["holding"])' "$rv/hold.json" 2>/dev/null)
check "a py-spiffe stream holds an SVID"          test -n "$held"
check "revoke --dry-run lists, changes nothing"   bash -c "'$bin' revoke --admin-socket '$rv/admin.sock' --identity '$dev_id' --reason 'INC-9: drill' --dry-run | grep -q 'would revoke' && '$venv/bin/python' '$root/integration/spiffe_check.py' validate db '$rv/token.jwt' | grep -q '\"valid\": true'"
check "mayfly revoke --identity"                  "$bin" revoke --admin-socket "$rv/admin.sock" --identity "$dev_id" --reason "INC-9: token leaked in a build log"
check "the SVID leaves the py-spiffe stream"      wait_hold
check "the withdrawn SVID is the one held"        bash -c "tail -n 1 '$rv/hold.json' | grep -q '\"withdrawn\": true'"
check "openssl verifies the CRL and finds the serial" crl_lists
check "the revoked JWT-SVID no longer validates"  bash -c "'$venv/bin/python' '$root/integration/spiffe_check.py' validate db '$rv/token.jwt' | grep -q '\"valid\": false'"
check "the identity is locked: nothing new"       refused_with "locked" "$bin" x509 --socket "$rv/w.sock" --out "$rv/x"
check "credentials list shows them revoked"       bash -c "'$bin' credentials list --admin-socket '$rv/admin.sock' --identity '$dev_id' | grep -c REVOKED | grep -qx 2"
check "audit trace tells the story"               trace_tells_the_story
check "mayfly unlock"                             "$bin" unlock --admin-socket "$rv/admin.sock" --identity "$dev_id" --reason "INC-9 closed"
check "a new SVID after unlock"                   "$bin" x509 --socket "$rv/w.sock" --out "$rv/after"
unset SPIFFE_ENDPOINT_SOCKET
check "dev stops cleanly"                         stop_daemon
check "audit verify passes"                       "$bin" audit verify --data-dir "$rv/data"

