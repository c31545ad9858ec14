# `mayfly dev` as the README starts it: x509, OpenSSL's CSRs, refusals, a tampered ledger, a restart
# The dev daemon on its own data dir: a local key and certificates OpenSSL accepts, CSRs asking
# for more than they may have, refusals, the ledger edited behind mayfly's back, a restart that
# keeps the CA.
# (Sourced by integration/run in a subshell; helpers in integration/lib.sh.)

start_dev() { # on a new port each time, over the same data dir
  dev_port=$(free_port)
  start_daemon dev "$work/data" "$work/mayfly.sock" \
    "$bin" dev --data-dir "$work/data" --policies "$root/policies" --socket "$work/mayfly.sock" --listen "127.0.0.1:$dev_port"
}

lifetime_at_most() { # cert, seconds
  local nb na
  nb=$(date -d "$(openssl x509 -in "$1" -noout -startdate | cut -d= -f2)" +%s)
  na=$(date -d "$(openssl x509 -in "$1" -noout -enddate | cut -d= -f2)" +%s)
  echo "lifetime $((na - nb))s (limit $2s)"
  [ $((na - nb)) -gt 0 ] && [ $((na - nb)) -le "$2" ]
}

only_san_is() { # cert, uri
  local sans
  sans=$(openssl x509 -in "$1" -noout -ext subjectAltName | tail -n +2 | tr -d ' ')
  echo "SAN: $sans"
  [ "$sans" = "URI:$2" ]
}

not_a_ca() {
  openssl x509 -in "$1" -noout -ext basicConstraints | grep -q "CA:FALSE"
}

key_is_private() {
  [ "$(stat -c %a "$1")" = 600 ]
}

audit_fails() {
  ! "$bin" audit verify --data-dir "$work/data"
}

start_dev || exit 1

# 1. The quick start: a key made locally, a certificate OpenSSL accepts.
check "x509 with a local key"            "$bin" x509 --socket "$work/mayfly.sock" --out "$work/c"
check "dev serves OIDC discovery over TLS, certificate from its CA" bash -c "curl -sf --cacert '$work/data/ca.pem' https://127.0.0.1:$dev_port/.well-known/openid-configuration | grep -q '\"issuer\":\"https://127.0.0.1:$dev_port\"'"
check "openssl verify accepts it"        openssl verify -CAfile "$work/c/bundle.pem" "$work/c/cert.pem"
check "one URI SAN, the inventory id"    only_san_is "$work/c/cert.pem" "$dev_id"
check "lifetime at most 1 h"             lifetime_at_most "$work/c/cert.pem" 3600
check "CA:FALSE"                         not_a_ca "$work/c/cert.pem"
check "key.pem is mode 0600"             key_is_private "$work/c/key.pem"
check "the key matches the certificate"  bash -c "[ \"\$(openssl x509 -in $work/c/cert.pem -noout -pubkey)\" = \"\$(openssl pkey -in $work/c/key.pem -pubout)\" ]"

# 2. CSRs made by OpenSSL asking for more than they may have.
openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout "$work/ec.key" \
  -subj "/CN=root" -addext "subjectAltName=DNS:evil.example.com,URI:spiffe://mayfly.local/admin" \
  -addext "basicConstraints=critical,CA:TRUE" -out "$work/ec.csr" 2>/dev/null
check "EC CSR from openssl, 30m"         "$bin" x509 --socket "$work/mayfly.sock" --csr "$work/ec.csr" --ttl 30m --out "$work/ec"
check "its names were not copied"        only_san_is "$work/ec/cert.pem" "$dev_id"
check "its CA request was not copied"    not_a_ca "$work/ec/cert.pem"
check "lifetime at most 30 m"            lifetime_at_most "$work/ec/cert.pem" 1800
check "openssl verify accepts it"        openssl verify -CAfile "$work/ec/bundle.pem" "$work/ec/cert.pem"
check "no key.pem when the CSR is ours"  test ! -e "$work/ec/key.pem"
openssl req -new -newkey rsa:2048 -nodes -keyout "$work/rsa.key" -subj "/CN=rsa" -out "$work/rsa.csr" 2>/dev/null
check "RSA CSR from openssl (PEM)"       "$bin" x509 --socket "$work/mayfly.sock" --csr "$work/rsa.csr" --out "$work/rsa"
check "openssl verify accepts it"        openssl verify -CAfile "$work/rsa/bundle.pem" "$work/rsa/cert.pem"
openssl req -in "$work/ec.csr" -outform DER -out "$work/ec.der"
check "DER CSR"                          "$bin" x509 --socket "$work/mayfly.sock" --csr "$work/ec.der" --out "$work/der"

# 3. Refusals.
printf 'garbage' > "$work/garbage.csr"
check "garbage CSR refused"              refused_with InvalidArgument "$bin" x509 --socket "$work/mayfly.sock" --csr "$work/garbage.csr" --out "$work/x"
check "13 h denied by the guardrail"     refused_with forbid-ttl-over-12h "$bin" x509 --socket "$work/mayfly.sock" --ttl 13h --out "$work/x"
check "nothing written on refusal"       test ! -e "$work/x/cert.pem"

# 4. The ledger: intact, then edited behind mayfly's back.
check "audit tail shows the decisions"   bash -c "'$bin' audit tail --data-dir '$work/data' -n 50 | grep -q forbid-ttl-over-12h"
check "audit tail --json is JSON"        bash -c "'$bin' audit tail --json --data-dir '$work/data' | python3 -c 'import sys,json; [json.loads(l) for l in sys.stdin]'"
check "daemon stops cleanly on SIGTERM"  stop_daemon
check "stop is recorded"                 bash -c "'$bin' audit tail --data-dir '$work/data' -n 1 | grep -q daemon_stopped"
check "audit verify passes"              "$bin" audit verify --data-dir "$work/data"
db=$work/data/ledger.db
snapshot() { sqlite3 "$db" ".backup '$work/pristine.db'"; }
restore() { rm -f "$db-wal" "$db-shm"; cp "$work/pristine.db" "$db"; }
check "no WAL left after a clean stop"   test ! -s "$db-wal"
snapshot
sqlite3 "$db" "UPDATE events SET body = replace(body, '\"outcome\":\"deny\"', '\"outcome\":\"allow\"') WHERE kind = 'decision'"
check "audit verify catches an edited row"   audit_fails
restore
sqlite3 "$db" "DELETE FROM events WHERE seq = 2"
check "audit verify catches a deleted row"   audit_fails
restore
sqlite3 "$db" "UPDATE credentials SET not_after = not_after + 86400"
check "audit verify catches an edited credential" audit_fails
restore

# 5. Restart: the dev CA is reused, so earlier certificates still verify.
start_dev || exit 1
check "x509 after restart"               "$bin" x509 --socket "$work/mayfly.sock" --out "$work/c2"
check "same CA after restart"            cmp "$work/c/bundle.pem" "$work/c2/bundle.pem"
check "daemon stops cleanly"             stop_daemon
check "audit verify passes after restart" "$bin" audit verify --data-dir "$work/data"
check "dev says loudly that policy is unsigned" grep -q "UNSIGNED" "$work/dev.log"
check "dev prints SPIFFE_ENDPOINT_SOCKET" grep -qx "export SPIFFE_ENDPOINT_SOCKET=unix://$work/mayfly.sock" "$work/dev.log"
