# Operators: /metrics read by Prometheus's own parser equals the ledger, /readyz while draining, SIGHUP under load, sd_notify, the scriptable CLI and its defects
# - metrics: a known mix of traffic, then /metrics parsed by PyPI prometheus-client's
#   OpenMetrics parser (not ours): issued and decision counters equal sqlite3's counts;
# - health: /healthz, /readyz JSON; /readyz answers 503 "draining" while a slow upload keeps
#   the drain going; unknown paths 404 on both listeners; READY=1 and STOPPING=1 reach
#   $NOTIFY_SOCKET (a Python datagram receiver);
# - reload: `mayfly serve` (signed bundles, an OpenSSL CA's TLS certificate) gets SIGHUP with a
#   new signed release and a new certificate while two clients keep issuing and fetching:
#   no request fails, the new release and certificate serve, `config_reloaded` says so;
# - CLI: --json parses, `audit trace | true` exits 0 without a panic, the capping rule is
#   named, revoke twice, break-glass report from another directory and another ledger, a
#   ledger another user cannot read is "permission denied" (as nobody, via setpriv),
#   `config check`, completions and man pages, the README's AWS example.
# (Sourced by integration/run in a subshell; helpers in integration/lib.sh.)

need_prometheus_parser

metrics_match_ledger() { # metrics-url, ledger.db: counters parsed by prometheus_client = sqlite3's counts
  curl -sf "$1" >"$work/metrics.txt" || return 1
  "$venv/bin/python" - "$work/metrics.txt" "$2" <<'PY'
import sqlite3, sys
from prometheus_client.openmetrics.parser import text_string_to_metric_families
families = {f.name: f for f in text_string_to_metric_families(open(sys.argv[1]).read())}
def total(name, **labels):
    return sum(s.value for s in families[name].samples
               if s.name == name + "_total" and all(s.labels.get(k) == v for k, v in labels.items()))
db = sqlite3.connect(sys.argv[2])
q = lambda sql: db.execute(sql).fetchone()[0]
ledger = {
    "issued": q("SELECT count(*) FROM events WHERE kind = 'issued'"),
    "allow": q("SELECT count(*) FROM events WHERE kind = 'decision' AND json_extract(body, '$.outcome') = 'allow'"),
    "deny": q("SELECT count(*) FROM events WHERE kind = 'decision' AND json_extract(body, '$.outcome') = 'deny'"),
}
# Repeats of a recorded refusal are counted (limits.refusal_window), not written again until
# the window's `refusals` event: the metrics count them apart.
counted = total("mayfly_refusals_counted")
metrics = {
    "issued": total("mayfly_credentials_issued"),
    "allow": total("mayfly_decisions", outcome="allow"),
    "deny": total("mayfly_decisions", outcome="deny") - counted,
}
print("ledger ", ledger)
print("metrics", metrics, "counted", counted)
assert all(metrics[k] == ledger[k] for k in ledger), "metrics and ledger disagree"
assert ledger["issued"] >= 4 and ledger["deny"] >= 1 and counted >= 2, "the traffic did not happen"
assert total("mayfly_decisions", outcome="deny", rule="forbid-ttl-over-12h") == 3
assert "mayfly_policy_release_info" in families, "no policy release info"
assert families["mayfly_request_duration_seconds"].type == "histogram"
assert "process_cpu_seconds" in families and "process_resident_memory_bytes" in families
PY
}

http_code() { curl -s -o /dev/null -w '%{http_code}' "$@"; }

json_ok() { # command...: its stdout is JSON (each line), and it exits 0
  local out; out=$("$@") || { echo "exit $?: $out"; return 1; }
  echo "$out"; python3 -c 'import json,sys; [json.loads(l) for l in sys.stdin if l.strip()]' <<<"$out"
}

json_field() { # field, expected, command...: the last JSON line's field
  local field=$1 want=$2 out; shift 2
  out=$("$@"); echo "$out"
  python3 -c 'import json,sys; v=json.loads(sys.stdin.read().strip().splitlines()[-1]); f=sys.argv[1]; print(f, "=", v[f]); sys.exit(0 if str(v[f])==sys.argv[2] else 1)' "$field" "$want" <<<"$out"
}

no_panic_on_closed_pipe() { # command...: its reader goes away at once; exit 0, no panic
  local rc
  "$@" 2>"$work/pipe.err" | true
  rc=${PIPESTATUS[0]}
  cat "$work/pipe.err"; echo "exit $rc"
  [ "$rc" = 0 ] && ! grep -q panicked "$work/pipe.err"
}

# --- a dev daemon, its telemetry, and a known mix of traffic ------------------------------------
op=$work/op; mkdir -p "$op"; chmod 700 "$op"
tport=$(free_port); lport=$(free_port)
python3 -c '
import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM); s.bind(sys.argv[1]); s.settimeout(60)
with open(sys.argv[2], "a") as out:
    while True:
        try: msg = s.recv(4096).decode()
        except socket.timeout: break
        out.write(msg.replace("\n", " ") + "\n"); out.flush()
        if msg.startswith("STOPPING"): break
' "$op/notify.sock" "$op/notify.log" &
notify_pid=$!; started+=("$notify_pid")
wait_until test -S "$op/notify.sock"
NOTIFY_SOCKET=$op/notify.sock start_daemon dev "$op/data" "$op/w.sock" \
  "$bin" dev --data-dir "$op/data" --policies "$root/policies" --socket "$op/w.sock" --admin-socket "$op/admin.sock" \
  --listen "127.0.0.1:$lport" --telemetry "$tport" --log-format json || exit 1
dev_pid=$daemon_pid
check "READY=1 reaches \$NOTIFY_SOCKET once the sockets serve" wait_until grep -qx "READY=1" "$op/notify.log"
for i in 1 2 3; do "$bin" x509 --socket "$op/w.sock" --out "$op/c$i" >/dev/null; done
for i in 1 2 3; do "$bin" x509 --socket "$op/w.sock" --ttl 13h --out "$op/x" >/dev/null 2>&1; done
check "a lifetime cut short names the rule that capped it" bash -c "'$bin' x509 --socket '$op/w.sock' --ttl 2h --out '$op/c4' | tee /dev/stderr | grep -q 'granted 1h instead of the 2h requested; capped by \`local-workloads-x509\`'"
check "/metrics, read by prometheus_client's OpenMetrics parser, equals the ledger" metrics_match_ledger "http://127.0.0.1:$tport/metrics" "$op/data/ledger.db"
check "/healthz: alive (JSON)"          json_field status alive curl -sf "http://127.0.0.1:$tport/healthz"
check "/readyz: ready, with its checks"  json_field status ready curl -sf "http://127.0.0.1:$tport/readyz"
check "/readyz on the TLS listener too"  json_field status ready curl -sf --cacert "$op/data/ca.pem" "https://127.0.0.1:$lport/readyz"
check "unknown path: 404 on the telemetry listener" test "$(http_code "http://127.0.0.1:$tport/admin")" = 404
check "unknown path: 404 on the TLS listener (not 200)" test "$(http_code --cacert "$op/data/ca.pem" "https://127.0.0.1:$lport/admin")" = 404
check "the issuance log line is JSON with the ids" bash -c "grep '\"credential issued\"' '$work/dev.log' | tail -n 1 | python3 -c 'import json,sys; l=json.loads(sys.stdin.read()); assert l[\"credential_id\"] and l[\"decision_id\"] and l[\"identity\"] and l[\"rules\"]'"
check "the denial log line names the rule" bash -c "grep '\"issuance denied\"' '$work/dev.log' | grep -q forbid-ttl-over-12h"
check "no ANSI colour in a log file" bash -c "! grep -q $'\\e\\[' '$work/dev.log'"

# --- the scriptable CLI ------------------------------------------------------------------------
check "audit trace | (reader gone): exit 0, no panic" no_panic_on_closed_pipe "$bin" audit trace --identity "$dev_id" --data-dir "$op/data"
check "audit tail | (reader gone): exit 0, no panic"  no_panic_on_closed_pipe "$bin" audit tail -n 1000 --data-dir "$op/data"
check "audit trace shows RFC 3339, not Unix seconds" bash -c "'$bin' audit trace --identity '$dev_id' --data-dir '$op/data' | grep -qE 'valid until 20[0-9]{2}-[0-9]{2}-[0-9]{2}T'"
check "audit verify --json"               json_field ok True "$bin" audit verify --json --data-dir "$op/data"
check "credentials list --json"           json_ok "$bin" credentials list --json --admin-socket "$op/admin.sock"
check "policy status --json"              json_ok "$bin" policy status --json --admin-socket "$op/admin.sock"
check "policy validate --json"            json_field valid True "$bin" policy validate "$root/policies" --json
check "policy test --json"                json_field failed 0 "$bin" policy test "$root/policies" --json
check "policy rollback with no history: exit 1, says so" refused_with "no earlier good release" "$bin" policy rollback --reason "INC-1" --admin-socket "$op/admin.sock"
check "lock --json"                       json_field durable True "$bin" lock --identity "$dev_id" --reason "INC-3" --ttl 1m --json --admin-socket "$op/admin.sock"
check "unlock --json"                     json_field unlocked True "$bin" unlock --identity "$dev_id" --reason "INC-3 done" --json --admin-socket "$op/admin.sock"
check "revoke --json: the first run revokes" json_field newly_revoked 4 "$bin" revoke --identity "$dev_id" --reason "INC-4" --json --admin-socket "$op/admin.sock"
check "revoke again: nothing new, all already revoked" json_field already_revoked 4 "$bin" revoke --identity "$dev_id" --reason "INC-4 again" --json --admin-socket "$op/admin.sock"
check "revoke again, for people: says already revoked" bash -c "'$bin' revoke --identity '$dev_id' --reason 'INC-4 thrice' --admin-socket '$op/admin.sock' | tee /dev/stderr | grep -q '0 credential(s) revoked, 4 already revoked before'"
"$bin" unlock --identity "$dev_id" --reason "INC-4 done" --admin-socket "$op/admin.sock" >/dev/null
check "break-glass list --json"           json_ok "$bin" break-glass list --json --admin-socket "$op/admin.sock"
check "a break-glass x509 for the report" "$bin" break-glass --socket "$op/w.sock" --kind x509 --reason "DB down" --ticket INC-77 --out "$op/bg"
check "break-glass report --data-dir from another directory" bash -c "cd / && '$bin' break-glass report --data-dir '$op/data' | grep -q 'INC-77'"
sqlite3 "$op/data/ledger.db" ".backup '$op/copy.db'"
check "break-glass report --ledger another file" bash -c "cd / && '$bin' break-glass report --ledger '$op/copy.db' --json | grep -q '\"ticket\":\"INC-77\"'"
check "break-glass report: a ledger not there is named" refused_with "no ledger at" bash -c "cd / && '$bin' break-glass report --data-dir /nonexistent"

# --- readiness flips while draining ------------------------------------------------------------
# A slow upload to the TLS listener is in flight when SIGTERM comes: the drain waits for it,
# and meanwhile /readyz must answer 503 "draining".
head -c 20000 /dev/zero | tr '\0' 'a' >"$op/slow.body"
spawn curl -s --cacert "$op/data/ca.pem" --limit-rate 4k -o /dev/null -H "content-type: application/json" -X POST --data-binary @"$op/slow.body" "https://127.0.0.1:$lport/v1/exchange"
slow_pid=$spawned
sleep 0.5
kill -TERM "$dev_pid"
draining() { curl -s -o "$op/readyz.json" -w '%{http_code}' "http://127.0.0.1:$tport/readyz" | grep -q 503 && grep -q '"status":"draining"' "$op/readyz.json"; }
check "/readyz turns 503 draining once SIGTERM comes" wait_until draining
check "STOPPING=1 reaches \$NOTIFY_SOCKET" wait_until grep -qx "STOPPING=1" "$op/notify.log"
await "$slow_pid"
check "dev drains and stops cleanly"       bash -c "wait $dev_pid 2>/dev/null; rc=\$?; [ \$rc = 0 ] || [ \$rc = 127 ]"
forget "$dev_pid"; daemon_pid=
check "the drained daemon's ledger verifies" "$bin" audit verify --data-dir "$op/data"

# --- an unreadable ledger is "permission denied" (another user) ----------------------------------
if [ "$(id -u)" = 0 ] && command -v setpriv >/dev/null; then
  as_nobody() { setpriv --reuid=65534 --regid=65534 --clear-groups "$@"; }
  pub=$(mktemp -d /tmp/mayfly-integration-perm.XXXXXX); scratch+=("$pub"); chmod 755 "$pub"
  # The binary itself when nobody may run it where it is (it is large); else a copy.
  if as_nobody "$bin" --version >/dev/null 2>&1; then ln -s "$bin" "$pub/mayfly"; else cp "$bin" "$pub/mayfly"; chmod 755 "$pub/mayfly"; fi
  mkdir -m 755 "$pub/open"; cp "$op/data/ledger.db" "$pub/open/ledger.db"; chmod 600 "$pub/open/ledger.db"
  mkdir -m 700 "$pub/closed"; cp "$op/data/ledger.db" "$pub/closed/ledger.db"
  check "a ledger file another user cannot read: permission denied, not missing" refused_with "permission denied" as_nobody "$pub/mayfly" audit verify --data-dir "$pub/open"
  check "a data dir another user cannot enter: permission denied, not missing" refused_with "permission denied" as_nobody "$pub/mayfly" break-glass report --data-dir "$pub/closed"
  check "and not reported as missing" bash -c "! setpriv --reuid=65534 --regid=65534 --clear-groups '$pub/mayfly' audit tail --data-dir '$pub/closed' 2>&1 | grep -q 'no ledger'"
else
  echo "integration: operator: permission checks need root and setpriv; skipped"
fi

# --- SIGHUP under load: a new signed release and a new TLS certificate, no request dropped -------
srv=$work/serve; mkdir -p "$srv"; chmod 700 "$srv"
make_release_key "$srv"
cp -r "$root/policies" "$srv/v1"; cp -r "$root/policies" "$srv/v2"
printf '\n// release v2: same rules, a new version\n' >>"$srv/v2/issuance/local.cedar"
signed_bundle "$srv/v1" "$srv/v1.bundle" v1 "$srv/release.key" && signed_bundle "$srv/v2" "$srv/v2.bundle" v2 "$srv/release.key"
v2_version=$("$bin" policy verify "$srv/v2.bundle" --key "$srv/release.pub" | sed -n 's/.*version \(sha256:[0-9a-f]*\).*/\1/p')
cp "$srv/v1.bundle" "$srv/policy.bundle"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 1 -subj /CN=op-ca -keyout "$srv/ca.key" -out "$srv/ca.pem" 2>/dev/null
server_cert() { # name: a certificate for 127.0.0.1 from the suite's OpenSSL CA
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=$1" -keyout "$srv/$1.key" -out "$srv/$1.csr" 2>/dev/null &&
    openssl x509 -req -in "$srv/$1.csr" -CA "$srv/ca.pem" -CAkey "$srv/ca.key" -CAcreateserial -days 1 \
      -extfile <(printf 'subjectAltName=DNS:localhost,IP:127.0.0.1') -out "$srv/$1.pem" 2>/dev/null && chmod 600 "$srv/$1.key"
}
server_cert first; server_cert second
cp "$srv/first.pem" "$srv/tls.pem"; cp "$srv/first.key" "$srv/tls-key.pem"; chmod 600 "$srv/tls-key.pem"
sport=$(free_port); stport=$(free_port)
cat > "$srv/mayfly.toml" <<TOML
trust_domain = "mayfly.local"
data_dir = "$srv/data"
[policy]
bundle = "$srv/policy.bundle"
trusted_keys = ["$srv/release.pub"]
# Only SIGHUP activates a new release here.
poll_interval = "1h"
[workload_api]
socket = "$srv/w.sock"
[admin]
socket = "$srv/admin.sock"
[ca]
generate = true
[jwt]
issuer = "https://127.0.0.1:$sport"
[listen]
address = "127.0.0.1:$sport"
cert = "$srv/tls.pem"
key = "$srv/tls-key.pem"
[telemetry]
listen = "$stport"
log_format = "json"
TOML
check "config check: valid, every file it names" "$bin" config check --config "$srv/mayfly.toml"
check "config check --json"                json_field ok True "$bin" config check --config "$srv/mayfly.toml" --json
start_daemon serve "$srv/data" "$srv/w.sock" "$bin" serve --config "$srv/mayfly.toml" || exit 1
serve_pid=$daemon_pid
served_cert() { openssl s_client -connect "127.0.0.1:$sport" -servername localhost </dev/null 2>/dev/null | openssl x509 -noout -fingerprint -sha256; }
want_cert() { openssl x509 -in "$1" -noout -fingerprint -sha256; }
check "serve presents the first certificate" bash -c "[ \"\$($(declare -f served_cert); sport=$sport; served_cert)\" = \"$(want_cert "$srv/first.pem")\" ]"
check "clients find the sockets through MAYFLY_CONFIG" env MAYFLY_CONFIG="$srv/mayfly.toml" "$bin" policy status
check "x509 through --config"             "$bin" x509 --config "$srv/mayfly.toml" --out "$srv/c0"

load() { # seconds, out-file: issuances (into out-file.dir, its own) and HTTPS fetches back to back; one line per failure
  local until=$((SECONDS + $1)) n=0
  : >"$2"
  while [ $SECONDS -lt $until ]; do
    "$bin" x509 --socket "$srv/w.sock" --out "$2.dir" >/dev/null 2>>"$2.err" || echo "x509 failed" >>"$2"
    curl -sf --cacert "$srv/ca.pem" -o /dev/null "https://127.0.0.1:$sport/.well-known/jwks.json" || echo "https failed" >>"$2"
    n=$((n + 2))
  done
  echo "$n" >"$2.count"
}
spawn load 6 "$srv/load-a"; load_a=$spawned
spawn load 6 "$srv/load-b"; load_b=$spawned
sleep 2
cp "$srv/second.pem" "$srv/tls.pem.new"; mv "$srv/tls.pem.new" "$srv/tls.pem"
cp "$srv/second.key" "$srv/tls-key.new"; chmod 600 "$srv/tls-key.new"; mv "$srv/tls-key.new" "$srv/tls-key.pem"
cp "$srv/v2.bundle" "$srv/policy.bundle.new"; mv "$srv/policy.bundle.new" "$srv/policy.bundle"
kill -HUP "$serve_pid"
sleep 1
kill -HUP "$serve_pid"
await "$load_a"; await "$load_b"
check "under load through two SIGHUPs, no request failed" bash -c "cat '$srv'/load-*.count; n=\$(cat '$srv'/load-a '$srv'/load-b | wc -l); echo \"\$n failures\"; cat '$srv'/load-*.err | tail -n 5; [ \"\$n\" = 0 ] && [ \$(cat '$srv/load-a.count') -gt 10 ]"
check "serve still runs"                  kill -0 "$serve_pid"
check "the new certificate is served"     bash -c "[ \"\$($(declare -f served_cert); sport=$sport; served_cert)\" = \"$(want_cert "$srv/second.pem")\" ]"
check "the new release is active"         json_field current "$v2_version" bash -c "'$bin' policy status --json --config '$srv/mayfly.toml' | python3 -c 'import json,sys; d=json.load(sys.stdin); print(json.dumps({\"current\": d[\"current\"][\"version\"]}))'"
check "config_reloaded names the release and the certificate" bash -c "'$bin' audit tail --json --data-dir '$srv/data' -n 100000 | grep '\"kind\":\"config_reloaded\"' | head -n 1 | grep -q 'policy: activated sha256:.*listen.cert: serving'"
check "mayfly_config_reloads_total counts both" bash -c "curl -sf http://127.0.0.1:$stport/metrics | grep -E '^mayfly_config_reloads_total\\{result=\"applied\"\\} 2'"
check "policy status --json shows the history" json_ok "$bin" policy status --json --config "$srv/mayfly.toml"
sed -i "s|^socket = \"$srv/w.sock\"|socket = \"$srv/moved.sock\"|" "$srv/mayfly.toml"
kill -HUP "$serve_pid"
check "a changed socket path is reported as needing a restart" wait_until bash -c "'$bin' audit tail --json --data-dir '$srv/data' -n 1 | grep -q 'restart_required.*workload_api.socket'"
check "and the old socket keeps serving"  "$bin" x509 --socket "$srv/w.sock" --out "$srv/c2"
check "serve stops cleanly"               stop_daemon
chmod 644 "$srv/tls-key.pem"
check "config check names a TLS key others can read" refused_with "listen.cert.*chmod 600" "$bin" config check --config "$srv/mayfly.toml"

# --- help, completions, man pages, the README's AWS example -------------------------------------
check "completions bash"                  bash -c "'$bin' completions bash | grep -q '_mayfly'"
check "completions zsh"                   bash -c "'$bin' completions zsh | grep -q '#compdef mayfly'"
check "man pages from the CLI definition" bash -c "'$bin' man --out '$work/man' && grep -q '^.TH mayfly-serve' '$work/man/mayfly-serve.1' && grep -qF 'log\-format' '$work/man/mayfly-serve.1' && grep -q '^.TH mayfly-config-check' '$work/man/mayfly-config-check.1'"
check "--help of serve has examples"      bash -c "'$bin' serve --help | grep -q 'Examples:'"
aws_block() { sed -n '/^## AWS credentials/,/^## /p' "$root/README.md"; }
check "README's AWS example exports AWS_DEFAULT_REGION" bash -c "$(declare -f aws_block); root='$root'; aws_block | grep -q 'export .*AWS_DEFAULT_REGION='"
check "README's AWS example does not start a second daemon on port 8443" bash -c "$(declare -f aws_block); root='$root'; line=\$(aws_block | grep 'mayfly dev --aws-endpoint'); echo \"\$line\"; echo \"\$line\" | grep -q -- '--listen' && echo \"\$line\" | grep -q -- '--socket'"
