# Hostile callers, local and remote, each bounded: the daemon keeps serving everyone else
# `mayfly dev` runs as root with a TLS listener; root is the well-behaved caller. The attacks
# come from uid nobody (65534, given a dev identity here so its requests are issued and
# cost a durable commit each) and uid 4242 (no identity: every request refused) over the
# workload socket, and from loopback over TLS (integration/hostile.py, standard library
# only). A 1 MiB HEADERS frame and a 62 KiB HPACK amplification block each end their
# connection with the daemon's memory unchanged in order of magnitude (bench/hostile prints
# the figures); 1,100 idle connections of nobody: 64 kept (limits.connections_per_uid), the
# rest closed at accept, the kept ones closed at the header timeout, and root's issuance
# meanwhile all succeeds; 300 TLS connections trickling bodies: 64 kept (per address), each
# answered 408 at the body timeout; 240 concurrent requests of nobody (two clients): beyond its
# share RESOURCE_EXHAUSTED at once; 1,500 identical refusals of uid 4242: one decision in full and,
# at the stop, one `refusals` event counting the rest (1,500 refusals of uid 4242 add at most
# 8 KB while they run); a body not JSON is 415; the ledger
# verifies; the metrics say what was refused.
# (Sourced by integration/run in a subshell; helpers in integration/lib.sh.)

command -v setpriv >/dev/null || { echo "integration: setpriv (util-linux) is required"; exit 2; }
[ "$(id -u)" = 0 ] || { echo "integration: the hostile suite needs root (to attack as nobody)"; exit 2; }
need_prometheus_parser

hx=$(mktemp -d /tmp/mayfly-integration-hostile.XXXXXX)
scratch+=("$hx")
chmod 755 "$hx"
cp "$root/integration/hostile.py" "$hx/hostile.py"
chmod 644 "$hx/hostile.py"
pybin=$(command -v /usr/bin/python3 || command -v python3)
as_nobody() { setpriv --reuid=65534 --regid=65534 --clear-groups "$@"; }
# Nobody gets a dev identity (the dev rules issue to it); uid 4242 has none.
cp -r "$root/policies" "$hx/policies"
cat >>"$hx/policies/inventory.toml" <<'TOML'

[[workload]]
id = "spiffe://mayfly.local/dev/hostile-nobody"
owner = "integration/suites/hostile.sh"
purpose = "a local user whose requests are issued, flooding the daemon"
environment = "dev"
tier = "experimental"
expires = 2099-12-31
selectors = ["unix:uid:65534"]
TOML
# The binary itself when nobody may run it where it is (it is large); else a copy.
if as_nobody "$bin" --version >/dev/null 2>&1; then nbin=$bin; else cp "$bin" "$hx/mayfly"; chmod 755 "$hx/mayfly"; nbin=$hx/mayfly; fi
hostile() { "$pybin" "$hx/hostile.py" "$@"; }

tls_port=$(free_port); tport=$(free_port)
start_daemon dev "$hx/data" "$hx/w.sock" "$bin" dev --data-dir "$hx/data" --policies "$hx/policies" \
  --socket "$hx/w.sock" --admin-socket "$hx/a.sock" --listen "127.0.0.1:$tls_port" --telemetry "127.0.0.1:$tport" || exit 1
db=$hx/data/ledger.db
metric() { # name{labels}: its value on /metrics (0 when absent)
  curl -s "http://127.0.0.1:$tport/metrics" | "$venv/bin/python" -c '
import sys
from prometheus_client.parser import text_string_to_metric_families
want = sys.argv[1]
total = 0
for fam in text_string_to_metric_families(sys.stdin.read()):
    for s in fam.samples:
        labels = ",".join(f"{k}=\"{v}\"" for k, v in sorted(s.labels.items()))
        if f"{s.name}{{{labels}}}" == want or s.name == want:
            total += s.value
print(int(total))' "$1"
}
metric_at_least() { local v; v=$(metric "$1"); echo "$1 = $v (at least $2)"; [ "$v" -ge "$2" ]; }
serves() { "$bin" x509 --socket "$hx/w.sock" --out "$hx/x509-$1" >/dev/null; }
legit() { # name, requests: root's issuance during an attack: every request succeeds
  "$bin" bench issue --csr --socket "$hx/w.sock" --requests "$2" --concurrency 1 | tee "$hx/legit-$1.txt"
  grep -q " 0 failed" "$hx/legit-$1.txt"
}
rss_mib() { hostile rss "$daemon_pid" | "$pybin" -c 'import json,sys; print(json.load(sys.stdin)["rss_kib"] // 1024)'; }
rss_within() { # MiB over the base
  local now; now=$(rss_mib); echo "RSS $now MiB (base $base MiB, bound +$1)"; [ "$now" -le $((base + $1)) ]
}

check "the daemon serves before the attacks" serves first
base=$(rss_mib)

# --- memory: header blocks ------------------------------------------------------------------
check "a 1 MiB HEADERS frame: the connection ends"      bash -c "'$pybin' '$hx/hostile.py' header-frame '$hx/w.sock' 1048576 | tee /dev/stderr | grep -q '\"closed_by_daemon\": true'"
check "a 62 KiB amplification block (240 MB decoded): the connection ends" bash -c "'$pybin' '$hx/hostile.py' amplify '$hx/w.sock' 63488 | tee /dev/stderr | grep -q '\"closed_by_daemon\": true'"
check "memory stays within 64 MiB of the base"        rss_within 64
check "the daemon still serves"                         serves after-headers

# --- connections: idle ones from one uid ------------------------------------------------------
spawn bash -c 'exec setpriv --reuid=65534 --regid=65534 --clear-groups "$@" >"$0"' "$hx/idle.json" "$pybin" "$hx/hostile.py" idle "$hx/w.sock" 1100 13
idle_pid=$spawned
sleep 2
check "root's issuance while nobody holds 1,100 connections: all succeed" legit idle 100
await "$idle_pid"
cat "$hx/idle.json"
check "nobody kept 64 connections (limits.connections_per_uid), none after the header timeout" \
  bash -c "grep -q '\"open_after_1s\": 64' '$hx/idle.json' && grep -q '\"open_after_hold\": 0' '$hx/idle.json'"
check "mayfly_connections_refused{per_caller} counts the rest" metric_at_least 'mayfly_connections_refused_total{listener="workload",reason="per_caller"}' 1036
check "mayfly_connections_refused{header_timeout} counts the kept ones" metric_at_least 'mayfly_connections_refused_total{listener="workload",reason="header_timeout"}' 64

# --- connections: trickled TLS bodies -------------------------------------------------------
spawn bash -c 'exec "$@" >"$0"' "$hx/trickle.json" "$pybin" "$hx/hostile.py" trickle "127.0.0.1:$tls_port" 300 14
trickle_pid=$spawned
sleep 2
check "root's issuance while 300 TLS bodies trickle: all succeed" legit trickle 100
await "$trickle_pid"
cat "$hx/trickle.json"
check "64 trickling bodies kept (per address), each answered 408 at the body timeout" \
  bash -c "grep -q '\"statuses\": {\"408\": 64}' '$hx/trickle.json' && grep -q '\"connect_failed\": 236' '$hx/trickle.json'"

# --- admission: many concurrent requests from one caller ---------------------------------------
# Two clients of nobody's, 120 requests in flight each (one connection carries at most 64).
spawn bash -c 'exec setpriv --reuid=65534 --regid=65534 --clear-groups "$@" >"$0"' "$hx/burst.txt" "$nbin" bench issue --csr --socket "$hx/w.sock" --requests 1200 --concurrency 120
burst_pid=$spawned
spawn bash -c 'exec setpriv --reuid=65534 --regid=65534 --clear-groups "$@" >"$0"' "$hx/burst2.txt" "$nbin" bench issue --csr --socket "$hx/w.sock" --requests 1200 --concurrency 120
burst2_pid=$spawned
check "root's issuance while nobody has 240 requests in flight: all succeed" legit burst 100
await "$burst_pid"; await "$burst2_pid"
cat "$hx/burst.txt" "$hx/burst2.txt"
check "nobody's requests beyond its share: RESOURCE_EXHAUSTED (mayfly_limited{caller_busy})" metric_at_least 'mayfly_limited_total{limit="caller_busy"}' 1
check "nobody still got credentials (its share was served)" bash -c "grep -Eq '^  [1-9][0-9]* ok' '$hx/burst.txt'"

# --- the ledger: a flood of identical refusals ------------------------------------------------
sqlite3 "$db" "select count(*) from events" >"$hx/events-before"
bytes_before=$(sqlite3 "$db" "select coalesce(sum(length(body)), 0) from events")
check "uid 4242's 1,500 requests (no inventory entry) are all refused" bash -c "
  setpriv --reuid=4242 --regid=4242 --clear-groups '$nbin' bench issue --csr --socket '$hx/w.sock' --requests 1500 --concurrency 4 | tee /dev/stderr | grep -q '0 ok, 1500 failed'"
bytes_during=$(sqlite3 "$db" "select coalesce(sum(length(body)), 0) from events")
check "the flood added at most 8 KB to the ledger while it ran" bash -c "echo \$(( $bytes_during - $bytes_before )) bytes; [ \$(( $bytes_during - $bytes_before )) -le 8192 ]"

# --- the exchange: strict bodies --------------------------------------------------------------
check "a body that is not JSON: 415" bash -c "[ \$(curl -s -o /dev/null -w '%{http_code}' --cacert '$hx/data/ca.pem' -H 'content-type: text/plain' -d x https://127.0.0.1:$tls_port/v1/exchange) = 415 ]"
head -c 300000 /dev/zero >"$hx/big.body"
# HTTP/1.1: curl 7.88 over HTTP/2 drops a response that came before its upload finished when
# the stream is then reset (NO_ERROR, as RFC 9113 8.1 lets a server do); newer curl keeps it.
check "a declared body over the limit: 413 (from the head)" bash -c "[ \$(curl -s --http1.1 -o /dev/null -w '%{http_code}' --cacert '$hx/data/ca.pem' -H 'content-type: application/json' --data-binary @'$hx/big.body' https://127.0.0.1:$tls_port/v1/exchange) = 413 ]"

check "the daemon still serves after every attack" serves last
check "memory after every attack stays within 64 MiB of the base" rss_within 64
check "the daemon stops cleanly" stop_daemon
check "the ledger verifies" "$bin" audit verify --data-dir "$hx/data"
check "at the stop, one refusals event per caller counts what was not written one by one" \
  rows_at_least "$db" "select count(*) from events where kind = 'refusals' and body like '%\"caller\":\"uid 4242\"%'" 1
check "the counts add up to nobody's refusals beyond those written in full" "$pybin" -c '
import json, sqlite3, sys
db = sqlite3.connect(sys.argv[1])
counted = 0
for (body,) in db.execute("select body from events where kind = ?", ("refusals",)):
    r = json.loads(body)
    if r["caller"] == "uid 4242":
        counted += sum(x["count"] for x in r["repeats"]) + r["unrecorded"] + sum(r["limited"].values())
full = db.execute("select count(*) from events where kind = ? and body like ?", ("decision", "%\"uid\":4242%")).fetchone()[0]
print(f"{full} decisions in full, {counted} counted")
# 1,500 requests of uid 4242: each either decided in full or counted.
sys.exit(0 if 1 <= full <= 8 and full + counted == 1500 else 1)' "$db"
