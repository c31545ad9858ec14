# WIT-SVIDs with independent peers: grpcio fetches over the socket, PyJWT verifies the WIT and signs proofs, mayfly accepts each once
# `mayfly dev` serves FetchWITSVID / FetchWITBundles on its socket and POST /v1/wpt/verify on
# its TLS listener. A Python client on grpcio, with stubs grpcio-tools generates from the
# SPIFFE proto, fetches a WIT unchanged; PyJWT verifies its header, claims and signature
# against the fetched WIT bundle and signs Workload Proof Tokens with the received key.
# mayfly accepts a proof exactly once and refuses every bad variant; `mayfly revoke
# --identity` takes the WIT off an open stream and its proofs are refused from then on.
# (Sourced by integration/run in a subshell; helpers in integration/lib.sh.)

wit_py() { WIT_STUBS=$wt/stubs "$venv/bin/python" "$root/integration/wit_check.py" "$@"; }

verify_body() { # wit-file, wpt, audience: the JSON body of a proof check
  python3 -c 'import json,sys; print(json.dumps({"wit": open(sys.argv[1]).read().strip(), "wpt": sys.argv[2], "audience": sys.argv[3]}))' "$@"
}

post_verify() { # wit-file, wpt, audience: the HTTP status; the answer in $wt/answer.json
  verify_body "$@" | curl -s -o "$wt/answer.json" -w '%{http_code}' --cacert "$wt/data/ca.pem" \
    -H 'content-type: application/json' --data-binary @- "https://127.0.0.1:$wt_port/v1/wpt/verify"
}

accepted() { # wit-file, wpt, audience: 200 with the WIT's identity
  local code; code=$(post_verify "$@"); echo "$code $(cat "$wt/answer.json")"
  [ "$code" = 200 ] && grep -q "\"spiffe_id\":\"$dev_id\"" "$wt/answer.json"
}

refused_proof() { # reason-pattern, wit-file, wpt, audience: 401 saying the pattern
  local pattern=$1 code; shift
  code=$(post_verify "$@"); echo "$code $(cat "$wt/answer.json")"
  [ "$code" = 401 ] && grep -q "invalid_proof" "$wt/answer.json" && grep -q -- "$pattern" "$wt/answer.json"
}

same_bundle() { # the published /v1/wit/jwks.json is the bundle the stream sent
  curl -sf --cacert "$wt/data/ca.pem" "https://127.0.0.1:$wt_port/v1/wit/jwks.json" -o "$wt/published.json" || return 1
  python3 -c 'import json,sys; a,b=(json.load(open(p)) for p in sys.argv[1:]); print(a); sys.exit(0 if a==b else 1)' "$wt/published.json" "$wt/a/bundle.json"
}

wait_hold() { # the held stream ends once its WIT is withdrawn
  await "$hold_pid"
  local rc=$?; cat "$wt/hold.json" "$wt/hold.err"; return $rc
}

need_pip "grpc_tools jwt cryptography" 'grpcio-tools>=1.60' 'pyjwt[crypto]>=2.9'
wt=$work/wit; mkdir -p "$wt"
wt_port=$(free_port)
start_daemon dev "$wt/data" "$wt/admin.sock" \
  "$bin" dev --data-dir "$wt/data" --policies "$root/policies" --socket "$wt/w.sock" --admin-socket "$wt/admin.sock" --listen "127.0.0.1:$wt_port" || exit 1
export SPIFFE_ENDPOINT_SOCKET=unix://$wt/w.sock
aud=https://db.example.org/query
check "grpcio-tools makes stubs from proto/spiffe/workload.proto" wit_py gen "$wt/stubs"
check "grpcio: FetchWITSVID and FetchWITBundles over the socket" save "$wt/fetch.json" wit_py fetch "$wt/a"
check "the WIT is the inventory id"                field_is "$wt/fetch.json" spiffe_id "$dev_id"
check "PyJWT: typ, alg, kid in the bundle, signature, sub, no aud, cnf.jwk = the key handed out" wit_py check "$wt/a"
check "/v1/wit/jwks.json is the streamed WIT bundle" same_bundle
wpt=$(wit_py sign "$wt/a" "$aud")
check "mayfly accepts a PyJWT-signed proof"        accepted "$wt/a/wit.jwt" "$wpt" "$aud"
check "the same proof again: refused (replayed jti)" refused_proof "already used" "$wt/a/wit.jwt" "$wpt" "$aud"
check "a proof signed with another key: refused"   refused_proof "not signed by the WIT" "$wt/a/wit.jwt" "$(wit_py sign "$wt/a" "$aud" --other-key)" "$aud"
check "a proof with a wrong wth: refused"          refused_proof "wth" "$wt/a/wit.jwt" "$(wit_py sign "$wt/a" "$aud" --wth "$(python3 -c 'print("A"*43)')")" "$aud"
check "a proof for another audience: refused"      refused_proof "audience" "$wt/a/wit.jwt" "$(wit_py sign "$wt/a" https://other.example.org)" "$aud"
check "an expired proof: refused"                  refused_proof "expired" "$wt/a/wit.jwt" "$(wit_py sign "$wt/a" "$aud" --exp-in -5)" "$aud"
check "a proof living an hour: refused"            refused_proof "too long" "$wt/a/wit.jwt" "$(wit_py sign "$wt/a" "$aud" --exp-in 3600)" "$aud"
wit_py sign "$wt/a" "$aud" > "$wt/cli.wpt"
verify_cli() { "$bin" wpt verify --wit "$wt/a/wit.jwt" --wpt "$1" --audience "$aud" --url "https://127.0.0.1:$wt_port" --cacert "$wt/data/ca.pem"; }
check "mayfly wpt verify accepts a fresh proof"    verify_cli "$wt/cli.wpt"
check "mayfly wpt verify refuses it again (exit 1)" refused_with "already used" verify_cli "$wt/cli.wpt"
"$bin" wpt sign --wit "$wt/a/wit.jwt" --key "$wt/a/key.jwk" --audience "$aud" > "$wt/signed.wpt"
check "PyJWT verifies mayfly wpt sign's proof with the cnf key" wit_py verify-wpt "$wt/a" "$(cat "$wt/signed.wpt")" "$aud"
check "mayfly accepts mayfly wpt sign's proof"     accepted "$wt/a/wit.jwt" "$(cat "$wt/signed.wpt")" "$aud"
export WIT_STUBS=$wt/stubs
readme_try() { # the README's three commands: mayfly wit, wpt sign, wpt verify
  "$bin" wit --socket "$wt/w.sock" --out "$wt/m" && [ "$(stat -c %a "$wt/m/wit-key.jwk")" = 600 ] &&
    "$bin" wpt sign --wit "$wt/m/wit.jwt" --key "$wt/m/wit-key.jwk" --audience "$aud" > "$wt/m/wpt" &&
    "$bin" wpt verify --wit "$wt/m/wit.jwt" --wpt "$wt/m/wpt" --audience "$aud" --url "https://127.0.0.1:$wt_port" --cacert "$wt/data/ca.pem"
}
check "mayfly wit, wpt sign, wpt verify (the README's try)" readme_try
spawn "$venv/bin/python" "$root/integration/wit_check.py" hold 30 > "$wt/hold.json" 2>"$wt/hold.err"
hold_pid=$spawned
wait_until test -s "$wt/hold.json"
check "a grpcio stream holds a WIT"                grep -q holding "$wt/hold.json"
check "mayfly revoke --identity"                   "$bin" revoke --admin-socket "$wt/admin.sock" --identity "$dev_id" --reason "INC-31: WIT key on a shared disk"
check "the WIT leaves the open stream (empty set, then PERMISSION_DENIED)" wait_hold
check "a proof with the revoked WIT: refused"      refused_proof "revoked" "$wt/a/wit.jwt" "$(wit_py sign "$wt/a" "$aud")" "$aud"
check "the identity is locked: no new WIT"         refused_with "locked" "$bin" wit --socket "$wt/w.sock" --out "$wt/b"
check "dev stops cleanly"                          stop_daemon
start_daemon dev "$wt/data" "$wt/admin.sock" \
  "$bin" dev --data-dir "$wt/data" --policies "$root/policies" --socket "$wt/w.sock" --admin-socket "$wt/admin.sock" --listen "127.0.0.1:$wt_port" || exit 1
check "after a restart, a proof accepted before it is still used" refused_proof "already used" "$wt/a/wit.jwt" "$(cat "$wt/signed.wpt")" "$aud"
unset SPIFFE_ENDPOINT_SOCKET WIT_STUBS
check "dev stops cleanly again"                    stop_daemon
db=$wt/data/ledger.db
check "each accepted proof is one used event"      rows_are "$db" "SELECT count(*) FROM events WHERE kind = 'used' AND body LIKE '%\"use\":\"verify_wpt\"%' AND body LIKE '%\"refused\":null%'" 4
check "the revoked WIT's proof is a refused use"   rows_are "$db" "SELECT count(*) FROM events WHERE kind = 'used' AND body LIKE '%\"refused\":\"revoked\"%'" 1
check "WITs are issued and revoked as kind wit"    rows_at_least "$db" "SELECT count(*) FROM credentials WHERE kind = 'wit'" 2
check "no WIT key or token in the ledger"          bash -c "d=\$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))[\"d\"])' '$wt/a/key.jwk'); ! sqlite3 '$db' 'SELECT body FROM events' | grep -q -e \"\$d\" -e 'eyJ'"
check "audit trace tells the WIT's story"          bash -c "'$bin' audit trace --data-dir '$wt/data' --identity '$dev_id' > '$wt/trace.txt' && cat '$wt/trace.txt' && grep -q 'wit credential' '$wt/trace.txt' && grep -q 'verify_wpt' '$wt/trace.txt' && grep -q 'REFUSED: revoked' '$wt/trace.txt'"
check "audit verify passes"                        "$bin" audit verify --data-dir "$wt/data"
