# Several daemons, one PostgreSQL: revocation everywhere within 1 s, break-glass approved through another daemon, one use per token, outage and recovery
# A real PostgreSQL server (Debian's package, on loopback, fsync off) and three `mayfly serve`
# daemons (A, B, C), each on its own chain: a certificate issued on A; `mayfly revoke
# --identity` on B; C and A refuse that identity within 1 s; a break-glass request waiting on
# A approved through B's admin socket by another uid; an id-token exchanged on A and replayed
# to B is refused; a policy release activated on A is served by B and C, and B's rollback
# reaches A and C; PostgreSQL stopped → UNAVAILABLE with nothing issued, restarted → service
# resumes by itself; kill -9 of a daemon under load loses nothing a client received;
# `audit verify` passes over every chain; an SQLite ledger migrated in verifies.
# (Sourced by integration/run in a subshell; helpers in integration/lib.sh.)

if [ "$(id -u)" != 0 ] || ! command -v setpriv >/dev/null; then
  echo "integration: postgres (a second uid approves) needs root and setpriv; skipped"
  exit 0
fi

# Why a scratch dir (0755) and node dirs 0711: uid 65534 approves through a node's admin
# socket, and must be able to reach it; the sockets' own modes still decide who connects.
pg=$(mktemp -d /tmp/mayfly-integration-nodes.XXXXXX); scratch+=("$pg"); chmod 755 "$pg"
# Why not under $work: the server runs as the postgres user, who cannot enter $work (0700).
pg_server=$(mktemp -d /tmp/mayfly-integration-pg.XXXXXX); scratch+=("$pg_server"); chmod 755 "$pg_server"
pg_url=$("$root/integration/postgres" start "$pg_server/db") || { echo "PostgreSQL did not start:"; cat "$pg_server/db/"*.log 2>/dev/null; exit 1; }
on_teardown+=("'$root/integration/postgres' stop '$pg_server/db'")
psqlq() { psql "$pg_url" -Atq -c "$1"; }

start_issuer "$work" || exit 1
make_release_key "$work" || exit 1
make_tls_cert "$work" || exit 1
cp -r "$root/policies" "$work/policies"
cat >> "$work/policies/inventory.toml" <<TOML

[[workload]]
id = "spiffe://mayfly.local/ci/acme/app-mock"
owner = "acme-app-team@example.org"
purpose = "acme/app pipelines (integration issuer)"
environment = "ci"
tier = "critical"
expires = 2030-01-01
selectors = ["oidc:iss:$issuer_url", "oidc:repository:acme/app"]
TOML
signed_bundle "$work/policies" "$work/v1.bundle" integration:v1 "$work/release.key" || exit 1
printf '%s\n' "$pg_url" > "$work/pg.url"; chmod 600 "$work/pg.url"

declare -A port sock admin
for d in a b c; do
  mkdir -p "$pg/$d"; chmod 711 "$pg/$d"
  port[$d]=$(free_port); sock[$d]=$pg/$d/w.sock; admin[$d]=$pg/$d/admin.sock
  cp "$work/v1.bundle" "$pg/$d/policy.bundle"
  cat > "$pg/$d/mayfly.toml" <<TOML
trust_domain = "mayfly.local"
data_dir = "$pg/$d/data"
[policy]
bundle = "$pg/$d/policy.bundle"
trusted_keys = ["$work/release.pub"]
poll_interval = "1s"
[workload_api]
socket = "${sock[$d]}"
[admin]
socket = "${admin[$d]}"
owner_uid = 65534
[ca]
generate = true
[listen]
address = "127.0.0.1:${port[$d]}"
cert = "$work/tls.pem"
key = "$work/tls-key.pem"
[jwt]
issuer = "https://127.0.0.1:${port[$d]}"
[[oidc.issuer]]
url = "$issuer_url"
audiences = ["mayfly"]
algorithms = ["RS256"]
[break_glass]
approvers = [65534]
log_file = "$pg/$d/break-glass.log"
[ledger]
backend = "postgres"
url_file = "$work/pg.url"
chain = "daemon-$d"
max_staleness = "3s"
checkpoint_file = "$pg/$d/witness/checkpoint"
checkpoint_interval = "1s"
TOML
  mkdir -p "$pg/$d/witness"
done

stop_pid_clean() { # pid: SIGTERM, and the daemon's exit status
  kill -TERM "$1" && wait "$1"; local rc=$?; forget "$1"; return $rc
}

start_node() { # a|b|c
  start_daemon "node-$1" "$pg/$1/data" "${sock[$1]}" "$bin" serve --config "$pg/$1/mayfly.toml" || return 1
  eval "pid_$1=$daemon_pid"
}

x509_on() { "$bin" x509 --socket "${sock[$1]}" --out "$pg/$1/cert-$2"; }

refused_within() { # daemon, seconds, pattern: x509 there is refused saying pattern within the time
  local start end
  start=$(date +%s%N)
  end=$((start + $2 * 1000000000))
  while [ "$(date +%s%N)" -lt "$end" ]; do
    if ! out=$("$bin" x509 --socket "${sock[$1]}" --out "$pg/$1/probe" 2>&1); then
      if grep -q -- "$3" <<<"$out"; then
        echo "refused after $(( ($(date +%s%N) - start) / 1000000 )) ms: $out"; return 0
      fi
    fi
    rm -rf "$pg/$1/probe"
  done
  echo "still not refused after $2 s: $out"; return 1
}

issues_within() { # daemon, seconds
  local start end
  start=$(date +%s%N); end=$((start + $2 * 1000000000))
  while [ "$(date +%s%N)" -lt "$end" ]; do
    if "$bin" x509 --socket "${sock[$1]}" --out "$pg/$1/probe" >/dev/null 2>&1; then
      echo "issued after $(( ($(date +%s%N) - start) / 1000000 )) ms"; return 0
    fi
    sleep 0.05
  done
  "$bin" x509 --socket "${sock[$1]}" --out "$pg/$1/probe"
}

status_shows() { # daemon, version, seconds
  for _ in $(seq 1 $(($3 * 10))); do
    "$bin" policy status --admin-socket "${admin[$1]}" | grep -q "current:  $2" && return 0
    sleep 0.1
  done
  "$bin" policy status --admin-socket "${admin[$1]}"; return 1
}

exchange_on() { # daemon, token, expected HTTP status
  local code
  code=$(curl -s -o "$work/reply.json" -w '%{http_code}' --cacert "$work/tls.pem" -H 'content-type: application/json' \
    -d "{\"token\": \"$2\", \"kind\": \"jwt\", \"audience\": \"https://artifacts.example.org\"}" "https://127.0.0.1:${port[$1]}/v1/exchange")
  echo "HTTP $code: $(head -c 300 "$work/reply.json")"; [ "$code" = "$3" ]
}

for d in a b c; do start_node "$d" || exit 1; done
three_chains() { [ "$(psqlq "SELECT string_agg(DISTINCT chain, ',' ORDER BY chain) FROM events")" = daemon-a,daemon-b,daemon-c ]; }
# Why wait: a daemon's socket is bound before it records its start.
check "three daemons on one PostgreSQL, each on its own chain" wait_until three_chains
check "a second daemon on a running daemon's chain is refused" refused_with "in use by another running daemon" \
  "$bin" serve --config <(sed -e "s#$pg/c/#$pg/c2/#g" -e "s/${port[c]}/$(free_port)/g" -e 's/chain = "daemon-c"/chain = "daemon-a"/' "$pg/c/mayfly.toml")
check "A issues a certificate"                   x509_on a first
check "openssl verifies it"                      openssl verify -CAfile "$pg/a/cert-first/bundle.pem" "$pg/a/cert-first/cert.pem"
check "its credential row is shared"             bash -c "[ \"\$(psql '$pg_url' -Atq -c \"SELECT chain FROM credentials WHERE serial = lower('\$(openssl x509 -in '$pg/a/cert-first/cert.pem' -noout -serial | cut -d= -f2)')\")\" = daemon-a ]"
check "mayfly revoke --identity on B"            "$bin" revoke --admin-socket "${admin[b]}" --identity "$dev_id" --reason "INC-16: key on a lost laptop"
check "C refuses that identity within 1 s"       refused_within c 1 locked
check "A refuses it too"                         refused_within a 1 locked
check "B's revocation is on A's CRL"             bash -c "curl -sf --cacert '$work/tls.pem' https://127.0.0.1:${port[a]}/crl.der -o '$pg/crl.der' && openssl crl -inform DER -in '$pg/crl.der' -noout -text | grep -qi \"Serial Number: *\$(openssl x509 -in '$pg/a/cert-first/cert.pem' -noout -serial | cut -d= -f2)\""
check "unlock on C; A issues again within 1 s"   bash -c "'$bin' unlock --admin-socket '${admin[c]}' --identity '$dev_id' --reason 'INC-16 closed' && $(declare -f issues_within); bin='$bin'; declare -A sock=([a]='${sock[a]}'); pg='$pg'; issues_within a 1"

# Break-glass: the request waits on A; nobody (uid 65534, an approver) approves through B.
spawn "$bin" break-glass --socket "${sock[a]}" --kind jwt --audience payments-db --reason "payments outage" --ticket INC-1601 --out "$pg/a/bg" >"$work/bg.out" 2>&1
bg_pid=$spawned
pending=
for _ in $(seq 1 100); do
  pending=$("$bin" break-glass list --admin-socket "${admin[b]}" 2>/dev/null | awk '/INC-1601/ {print $1; exit}')
  [ -n "$pending" ] && break; sleep 0.1
done
check "B lists the request waiting on A"         test -n "$pending"
check "nobody approves it through B"             setpriv --reuid=65534 --regid=65534 --clear-groups "$bin" break-glass approve "$pending" --reason "on-call lead for INC-1601" --admin-socket "${admin[b]}"
await "$bg_pid"; bg_rc=$?; forget "$bg_pid"
check "the requester on A gets the JWT"          bash -c "cat '$work/bg.out'; [ $bg_rc = 0 ] && test -s '$pg/a/bg/token'"
check "a second approval (through C) is refused" refused_with "no pending" setpriv --reuid=65534 --regid=65534 --clear-groups "$bin" break-glass approve "$pending" --reason "again" --admin-socket "${admin[c]}"

# One use per id-token, across daemons.
token=$(mint '{"repository": "acme/app", "sub": "repo:acme/app:ref:refs/heads/main", "ref": "refs/heads/main", "event_name": "push"}')
check "an id-token exchanged on A"               exchange_on a "$token" 200
check "... and replayed to B is refused"         exchange_on b "$token" 401
check "... saying it was already used"           grep -q "already used" "$work/reply.json"

# Policy: a release activated on A is served by B and C; B's rollback reaches A and C.
echo "// v2: the same rules, a new release" >> "$work/policies/issuance/local.cedar"
signed_bundle "$work/policies" "$work/v2.bundle" integration:v2 "$work/release.key" || exit 1
v1=$("$bin" policy verify "$work/v1.bundle" --key "$work/release.pub" | grep -o 'sha256:[0-9a-f]*' | head -n 1)
v2=$("$bin" policy verify "$work/v2.bundle" --key "$work/release.pub" | grep -o 'sha256:[0-9a-f]*' | head -n 1)
cp "$work/v2.bundle" "$pg/a/next.bundle" && mv "$pg/a/next.bundle" "$pg/a/policy.bundle"
check "A activates v2 from its bundle"           status_shows a "$v2" 10
check "B serves v2 too"                          status_shows b "$v2" 3
check "C serves v2 too"                          status_shows c "$v2" 3
check "rollback on B"                            "$bin" policy rollback --admin-socket "${admin[b]}" --reason "CHG-16: v2 breaks the batch job"
check "A is back on v1"                          status_shows a "$v1" 3
check "C is back on v1"                          status_shows c "$v1" 3

# Shadow mode started on A is shadowed by B and C too (the candidate from the shared ledger).
echo "// v3: a candidate to shadow" >> "$work/policies/issuance/local.cedar"
signed_bundle "$work/policies" "$work/v3.bundle" integration:v3 "$work/release.key" || exit 1
v3=$("$bin" policy verify "$work/v3.bundle" --key "$work/release.pub" | grep -o 'sha256:[0-9a-f]*' | head -n 1)
shadowing() { # state, expected number of daemons (chains) that recorded it for v3, within 3 s
  local n
  for _ in $(seq 1 30); do
    n=$(psqlq "SELECT count(DISTINCT chain) FROM events WHERE kind = 'policy_shadow' AND (body::jsonb)->>'shadow' = '$1' AND (body::jsonb)->>'candidate' = '$v3'")
    [ "$n" = "$2" ] && { echo "$n daemons: $1"; return 0; }
    sleep 0.1
  done
  echo "$n daemons recorded shadow $1 (want $2)"; return 1
}
check "shadow v3 on A"                           "$bin" policy shadow "$work/v3.bundle" --reason "CHG-17: try v3" --admin-socket "${admin[a]}"
check "B and C shadow it too"                    shadowing started 3
check "shadow --stop on A stops it everywhere"   bash -c "'$bin' policy shadow --stop --reason 'CHG-17 done' --admin-socket '${admin[a]}' && $(declare -f shadowing psqlq); pg_url='$pg_url'; v3='$v3'; shadowing stopped 3"

# PostgreSQL down: nothing is issued, and each caller is told; back up: service resumes.
before=$(psqlq "SELECT count(*) FROM credentials")
"$root/integration/postgres" stop "$pg_server/db"
check "PostgreSQL stopped: A answers UNAVAILABLE, nothing issued" refused_with "nothing was issued\|Unavailable\|UNAVAILABLE" x509_on a during-outage
check "... and writes no certificate"            test ! -e "$pg/a/cert-during-outage/cert.pem"
"$root/integration/postgres" restart "$pg_server/db"
check "PostgreSQL back: A issues again by itself" bash -c "$(declare -f issues_within); bin='$bin'; declare -A sock=([a]='${sock[a]}'); pg='$pg'; issues_within a 20"
check "nothing was recorded for the refused request" bash -c "n=\$(psql '$pg_url' -Atq -c 'SELECT count(*) FROM credentials'); echo \"\$n rows, \$(( $before )) before + 1 after\"; [ \"\$n\" = $((before + 1)) ]"

# kill -9 under load: every certificate a client received is on record.
mkdir -p "$pg/load"
loaders=()
for w in 1 2 3 4; do
  spawn bash -c "for i in \$(seq 1 40); do '$bin' x509 --socket '${sock[c]}' --out '$pg/load/$w-\$i' >/dev/null 2>&1 || true; done"
  loaders+=("$spawned")
done
sleep 2
kill -9 "$pid_c" 2>/dev/null; wait "$pid_c" 2>/dev/null; forget "$pid_c"
for l in "${loaders[@]}"; do await "$l"; done
received=0; missing=0
for cert in "$pg"/load/*/cert.pem; do
  [ -f "$cert" ] || continue
  received=$((received + 1))
  serial=$(openssl x509 -in "$cert" -noout -serial | cut -d= -f2 | tr 'A-F' 'a-f')
  [ "$(psqlq "SELECT count(*) FROM credentials WHERE serial = '$serial'")" = 1 ] || missing=$((missing + 1))
done
check "kill -9 of C under load: all $received received certificates are on record" test "$received" -gt 0 -a "$missing" = 0

check "A stops cleanly"                          stop_pid_clean "$pid_a"
check "B stops cleanly"                          stop_pid_clean "$pid_b"
check "audit verify passes over every chain"     bash -c "'$bin' audit verify --ledger '$pg_url' | tee /dev/stderr | grep -q 'hash chain and credential table intact'"
checkpoints=(--checkpoint "$pg/a/witness/checkpoint" --checkpoint "$pg/b/witness/checkpoint" --checkpoint "$pg/c/witness/checkpoint")
check "each daemon's signed checkpoint covers its chain" bash -c "'$bin' audit verify --ledger '$pg_url' ${checkpoints[*]} | tee /dev/stderr | grep -c 'match the signed root' | grep -qx 3"
check "A's and B's are final, C's (killed) is not" bash -c "grep -qx mayfly-final '$pg/a/witness/checkpoint' && grep -qx mayfly-final '$pg/b/witness/checkpoint' && ! grep -q mayfly-final '$pg/c/witness/checkpoint'"

# An SQLite ledger of one daemon migrated in: its chain intact, and it verifies.
mkdir -p "$pg/lite"; chmod 700 "$pg/lite"
start_daemon lite "$pg/lite/data" "$pg/lite/w.sock" "$bin" dev --data-dir "$pg/lite/data" --policies "$root/policies" --socket "$pg/lite/w.sock" --admin-socket "$pg/lite/admin.sock" --listen none || exit 1
"$bin" x509 --socket "$pg/lite/w.sock" --out "$pg/lite/c" >/dev/null
stop_daemon >/dev/null
check "mayfly ledger migrate --from sqlite --to postgres" "$bin" ledger migrate --from "sqlite:$pg/lite/data/ledger.db" --to "$pg_url" --chain migrated-lite
check "the migrated chain is there, event for event" bash -c "[ \"\$(psql '$pg_url' -Atq -c \"SELECT count(*) FROM events WHERE chain = 'migrated-lite'\")\" = \"\$(sqlite3 '$pg/lite/data/ledger.db' 'SELECT count(*) FROM events')\" ]"
check "audit verify passes with it"              "$bin" audit verify --ledger "$pg_url"

# A dropped tail on one daemon's chain: the chains alone still verify; B's checkpoint does
# not, and B refuses to start on it.
psqlq "WITH tail AS (SELECT seq FROM events WHERE chain = 'daemon-b' ORDER BY seq DESC LIMIT 3)
       DELETE FROM credentials WHERE chain = 'daemon-b' AND issued_event IN (SELECT seq FROM tail)" >/dev/null
psqlq "DELETE FROM events WHERE chain = 'daemon-b' AND seq > (SELECT max(seq) - 3 FROM events WHERE chain = 'daemon-b')" >/dev/null
check "B's tail dropped: the chains alone still verify" "$bin" audit verify --ledger "$pg_url"
check "…B's checkpoint catches it, naming the chain" refused_with "FAILED against checkpoint \`$pg/b/witness/checkpoint\`" "$bin" audit verify --ledger "$pg_url" "${checkpoints[@]}"
check "…and B refuses to start on it"           refused_with "does not extend its last checkpoint" timeout 30 "$bin" serve --config "$pg/b/mayfly.toml"
