# Break-glass with a second person: uid nobody asks, cannot approve itself, root approves; elevated log, report, review
# An on-call engineer (uid nobody, who runs the daemon here so the dev inventory matches
# them) asks for an emergency JWT; the rule needs approval; they cannot approve it
# themselves; root approves on the admin socket; every step is in the elevated log; report
# and review afterwards. Needs root (CI is) and setpriv; skipped otherwise.
# (Sourced by integration/run in a subshell; helpers in integration/lib.sh.)

if [ "$(id -u)" != 0 ] || ! command -v setpriv >/dev/null; then
  echo "integration: break-glass (a second uid) needs root and setpriv; skipped"
  exit 0
fi

as_nobody() { setpriv --reuid=65534 --regid=65534 --clear-groups "$@"; }

wait_request() { # the request's client ends by itself once approved
  await "$req_pid"
  local rc=$?; cat "$work/bg-req.out"; return $rc
}

elevated_stages() { python3 -c "import json,sys; print(' '.join(json.loads(l)['break_glass'] for l in open(sys.argv[1])))" "$bgd/run/data/break-glass.log"; }

report_line() { # pattern: the INC-502 line of the report must match it
  "$bin" break-glass report --data-dir "$bgd/run/data" > "$work/bg-report.txt"; cat "$work/bg-report.txt"
  grep 'INC-502' "$work/bg-report.txt" | grep -q -- "$1"
}

# Why not $work: nobody must reach the binary, the policies and its own directory.
bgd=$(mktemp -d /tmp/mayfly-integration-bg.XXXXXX); scratch+=("$bgd"); chmod 755 "$bgd"
cp "$bin" "$bgd/mayfly"; cp -r "$root/policies" "$bgd/policies"; chmod -R a+rX "$bgd"
mkdir "$bgd/run"; chown 65534:65534 "$bgd/run"; chmod 700 "$bgd/run"
start_daemon dev "$bgd/run/data" "$bgd/run/admin.sock" setpriv --reuid=65534 --regid=65534 --clear-groups "$bgd/mayfly" dev --data-dir "$bgd/run/data" --policies "$bgd/policies" \
    --socket "$bgd/run/w.sock" --admin-socket "$bgd/run/admin.sock" --listen none || exit 1
check "break-glass X.509 (no approval needed): 10 min" bash -c "setpriv --reuid=65534 --regid=65534 --clear-groups '$bgd/mayfly' break-glass --socket '$bgd/run/w.sock' --kind x509 --reason 'primary DB down' --ticket INC-501 --out '$bgd/run/x' && openssl verify -CAfile '$bgd/run/x/bundle.pem' '$bgd/run/x/cert.pem'"
check "a ticket off the pattern is refused"     refused_with "ticket_pattern" as_nobody "$bgd/mayfly" break-glass --socket "$bgd/run/w.sock" --kind x509 --reason r --ticket "later" --out "$bgd/run/y"
spawn setpriv --reuid=65534 --regid=65534 --clear-groups "$bgd/mayfly" break-glass --socket "$bgd/run/w.sock" --kind jwt --audience payments-db --reason "payments outage, need DB access" --ticket INC-502 --out "$bgd/run/jwt" >"$work/bg-req.out" 2>&1
req_pid=$spawned
pending=
for _ in $(seq 1 100); do
  pending=$("$bin" break-glass list --admin-socket "$bgd/run/admin.sock" 2>/dev/null | awk '/INC-502/ {print $1; exit}')
  [ -n "$pending" ] && break; sleep 0.1
done
check "the JWT request waits for a second person" test -n "$pending"
check "the requester cannot approve it"         refused_with "own" as_nobody "$bgd/mayfly" break-glass approve "$pending" --reason "self" --admin-socket "$bgd/run/admin.sock"
check "root approves it"                        "$bin" break-glass approve "$pending" --reason "on call lead: approved for INC-502" --admin-socket "$bgd/run/admin.sock"
check "the requester gets the JWT after approval" wait_request
check "the token file is the requester's, 0600" bash -c "[ \"\$(stat -c '%u %a' '$bgd/run/jwt/token')\" = '65534 600' ]"
check "the elevated log took every step"        bash -c "$(declare -f elevated_stages); bgd='$bgd'; s=\$(elevated_stages); echo \"\$s\"; [ \"\$s\" = 'requested issued denied requested approved issued' ]"
check "report: who, why, ticket, approver"      report_line 'payments outage.*approved by \[{[^]]*"uid":0[,}]'
check "report: not reviewed yet"                report_line 'unreviewed'
bg_cred=$(sed -n 's/.*credential \([0-9a-f-]*\),.*/\1/p' "$work/bg-req.out")
check "a review is recorded"                    "$bin" break-glass review "$bg_cred" --note "checked with the DBA: access was needed" --admin-socket "$bgd/run/admin.sock"
check "report shows it reviewed"                report_line '; reviewed$'
check "audit trace flags the emergency path"    bash -c "'$bin' audit trace --data-dir '$bgd/run/data' --identity '$dev_id' | grep -q 'BREAK-GLASS'"
check "break-glass WIT-SVID (no approval needed): 10 min, its key 0600" bash -c "setpriv --reuid=65534 --regid=65534 --clear-groups '$bgd/mayfly' break-glass --socket '$bgd/run/w.sock' --kind wit --reason 'service mesh down' --ticket INC-503 --out '$bgd/run/wit' && [ \"\$(stat -c '%u %a' '$bgd/run/wit/wit-key.jwk')\" = '65534 600' ] && python3 -c 'import base64,json,sys; p=open(sys.argv[1]).read().split(\".\"); h,c=(json.loads(base64.urlsafe_b64decode(x+\"==\")) for x in p[:2]); print(h,c); sys.exit(0 if h[\"typ\"]==\"wit+jwt\" and c[\"exp\"]-c[\"iat\"]==600 else 1)' '$bgd/run/wit/wit.jwt'"
check "dev (as nobody) stops cleanly"           stop_daemon
check "audit verify passes"                     "$bin" audit verify --data-dir "$bgd/run/data"
