# Sourced by integration/run and integration/make-fixtures: what the suites share.
#   - the check tally and a suite's life: its own work dir, and a teardown (EXIT trap) that
#     stops by pid every process the suite started, keeps its daemons' ledgers when asked
#     (MAYFLY_KEEP_LEDGERS) and removes its directories, whether its checks passed or not;
#   - daemons and peers started by pid: mayfly (dev or serve), the OIDC issuer, moto;
#   - what a suite makes for itself: a release key, a signed bundle, a TLS certificate;
#   - installing the peers (integration/.venv, integration/node_modules, target/spiffe-client)
#     when a suite first needs them, at most once per run, kept between runs.
# The sourcing script sets root (the repository), bin (the mayfly binary), state (this run's
# directory: tally and install stamps) and keep (where ledgers go; empty: nowhere).
# Each suite runs in its own subshell, so its variables, exports, traps and exits are its own.

venv=$root/integration/.venv
rust_client=$root/target/spiffe-client/debug/spiffe-client
# The identity the dev inventory gives the user running the tier.
dev_id=spiffe://mayfly.local/dev/quickstart

# --- a suite's life ---------------------------------------------------------------------

run_suite() { # name: integration/suites/<name>.sh, in a subshell of its own
  begin_suite "$1"
  source "$root/integration/suites/$1.sh"
}

begin_suite() { # name: this subshell's work dir, and its teardown when it exits
  suite=$1
  work=$(mktemp -d "/tmp/mayfly-integration-$suite.XXXXXX")
  chmod 700 "$work"
  trap teardown EXIT
  # Why: a signal would otherwise end the subshell without its EXIT trap, leaving daemons behind.
  trap 'exit 130' INT TERM
}

started=()              # pids this suite started and has not reaped yet, oldest first
declare -A ledger_of=() # daemon name -> its ledger.db
scratch=()              # directories besides $work that teardown removes
on_teardown=()          # commands teardown runs after stopping the processes (e.g. a database server)
daemon_pid=             # the mayfly daemon started last

teardown() {
  local i
  for ((i = ${#started[@]} - 1; i >= 0; i--)); do
    kill -TERM "${started[i]}" 2>/dev/null && wait "${started[i]}" 2>/dev/null
  done
  started=()
  for ((i = ${#on_teardown[@]} - 1; i >= 0; i--)); do
    eval "${on_teardown[i]}" >/dev/null 2>&1
  done
  keep_ledgers
  rm -rf "$work" "${scratch[@]}"
}

keep_ledgers() { # each daemon's ledger.db to $keep/<suite>-<name>.db
  [ -n "$keep" ] || return 0
  local name db
  mkdir -p "$keep"
  for name in "${!ledger_of[@]}"; do
    db=${ledger_of[$name]}
    [ -f "$db" ] || continue
    cp "$db" "$keep/$suite-$name.db"
    # Why the .db is enough: a daemon checkpoints its WAL when it stops cleanly. After an
    # unclean stop the WAL still holds the last commits, so it goes along, named to match.
    if [ -s "$db-wal" ]; then cp "$db-wal" "$keep/$suite-$name.db-wal"; fi
  done
}

check() { # name, command...: one ok/FAIL line; the command's output only when it fails
  local name=$1; shift
  if "$@" >"$work/last.out" 2>&1; then
    echo ok >>"$state/tally"; echo "ok    $name"
  else
    echo FAIL >>"$state/tally"; echo "FAIL  $name"; sed 's/^/      /' "$work/last.out" | tail -n 20
  fi
}

# --- processes, by pid ------------------------------------------------------------------

spawn() { # command...: in the background until teardown at the latest; its pid in $spawned
  "$@" &
  spawned=$!
  started+=("$spawned")
}

await() { # pid: wait for a process spawned here to end by itself; its exit status
  wait "$1"
  local rc=$?
  forget "$1"
  return $rc
}

stop() { # pid: SIGTERM to a peer spawned here, and reap it
  kill "$1" 2>/dev/null; wait "$1" 2>/dev/null
  forget "$1"
}

forget() { # pid: reaped, so teardown must not signal it (the kernel may reuse the number)
  local kept=() pid
  for pid in "${started[@]}"; do [ "$pid" = "$1" ] || kept+=("$pid"); done
  started=("${kept[@]}")
}

wait_until() { # command...: true within 10 s
  for _ in $(seq 1 100); do "$@" && return 0; sleep 0.1; done
  return 1
}

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

# name, data-dir, socket, command...: a mayfly daemon run from data-dir's parent, its output
# in $work/<name>.log, up once socket exists; its pid in $daemon_pid, its ledger kept by name.
start_daemon() {
  local name=$1 data=$2 socket=$3; shift 3
  spawn bash -c 'cd "$1" && shift && exec "$@"' - "$(dirname "$data")" "$@" >>"$work/$name.log" 2>&1
  daemon_pid=$spawned
  ledger_of[$name]=$data/ledger.db
  for _ in $(seq 1 100); do
    [ -S "$socket" ] && return 0
    kill -0 "$daemon_pid" 2>/dev/null || break
    sleep 0.1
  done
  echo "$name did not start:"; cat "$work/$name.log"; return 1
}

stop_daemon() { # the daemon started last: SIGTERM, and its exit status
  kill -TERM "$daemon_pid" && wait "$daemon_pid"
  local rc=$?
  forget "$daemon_pid"
  daemon_pid=
  return $rc
}

# --- what a suite makes for itself ------------------------------------------------------

make_release_key() { # dir: an Ed25519 policy release key made by OpenSSL, dir/release.{key,pub}
  openssl genpkey -algorithm ed25519 -out "$1/release.key" 2>/dev/null &&
    openssl pkey -in "$1/release.key" -pubout -out "$1/release.pub"
}

signed_bundle() { # policy-dir, bundle, label, key: mayfly policy build + sign, quietly
  "$bin" policy build "$1" --out "$2" --label "$3" >/dev/null && "$bin" policy sign "$2" --key "$4" >/dev/null
}

make_tls_cert() { # dir: a server certificate for 127.0.0.1 made by OpenSSL, dir/tls.pem and dir/tls-key.pem
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 1 -subj /CN=localhost \
    -addext "subjectAltName=DNS:localhost,IP:127.0.0.1" -keyout "$1/tls-key.pem" -out "$1/tls.pem" 2>/dev/null &&
    chmod 600 "$1/tls-key.pem"
}

# --- peers ------------------------------------------------------------------------------

start_issuer() { # dir: the OIDC issuer (oauth2-mock-server) on loopback; $issuer_url, $issuer_pid
  need_oidc_issuer
  spawn node "$root/integration/oidc_issuer.mjs" "$(free_port)" >"$1/issuer.url" 2>"$1/issuer.log"
  issuer_pid=$spawned
  wait_until test -s "$1/issuer.url" || { echo "the OIDC issuer did not start:"; cat "$1/issuer.log"; return 1; }
  issuer_url=$(head -n 1 "$1/issuer.url")
}

mint() { # [claims-json [audience]]: an id-token from the suite's issuer
  curl -s -X POST "$issuer_url/token" -d grant_type=client_credentials -d "aud=${2:-mayfly}" --data-urlencode "claims=${1:-{\}}" |
    python3 -c 'import sys, json; print(json.load(sys.stdin)["access_token"])'
}

start_moto() { # dir: moto's server (STS + IAM) on loopback; $moto_url, $moto_pid; AWS CLI config in dir
  need_moto
  # Any access key works with moto; these are the broker's "own" credentials from the
  # standard chain (environment).
  export AWS_ACCESS_KEY_ID=mayfly-broker AWS_SECRET_ACCESS_KEY=mayfly-broker-secret AWS_REGION=us-east-1 AWS_DEFAULT_REGION=us-east-1
  export AWS_CONFIG_FILE=$1/aws-config AWS_SHARED_CREDENTIALS_FILE=$1/aws-credentials
  : >"$AWS_CONFIG_FILE"; : >"$AWS_SHARED_CREDENTIALS_FILE"
  local port; port=$(free_port)
  spawn "$venv/bin/moto_server" -H 127.0.0.1 -p "$port" >"$1/moto.log" 2>&1
  moto_pid=$spawned
  moto_url=http://127.0.0.1:$port
  wait_until curl -s -o /dev/null "$moto_url/moto-api/" || { echo "moto did not start:"; cat "$1/moto.log"; return 1; }
}

awsx() { "$venv/bin/aws" --endpoint-url "$moto_url" "$@"; }

# The trust policy of a role in moto's account: the broker's credentials may assume it, name
# the session's source identity and tag it.
moto_trust='{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Principal":{"AWS":"arn:aws:iam::123456789012:root"},"Action":["sts:AssumeRole","sts:SetSourceIdentity","sts:TagSession"]}]}'

py_client() { "$venv/bin/python" "$root/integration/spiffe_check.py" "$@"; }

# --- checks more than one suite makes ---------------------------------------------------

refused_with() { # pattern, command...: must fail and say pattern
  local pattern=$1 out; shift
  if out=$("$@" 2>&1); then echo "unexpectedly succeeded: $out"; return 1; fi
  echo "$out"
  grep -q -- "$pattern" <<<"$out"
}

save() { # file, command...: the command's JSON line kept for the checks after it
  local out=$1; shift; "$@" >"$out"; local rc=$?; cat "$out"; return $rc
}

field_is() { # json-line-file, field, expected
  python3 -c "import json,sys; v=json.loads(open(sys.argv[1]).read().strip().splitlines()[-1])[sys.argv[2]]; print(sys.argv[2], '=', v); sys.exit(0 if str(v)==sys.argv[3] else 1)" "$@"
}

rows_are() { # ledger.db, sql, expected: the query's single value
  local n; n=$(sqlite3 "$1" "$2"); echo "$n rows (want $3)"; [ "$n" = "$3" ]
}

rows_at_least() { # ledger.db, sql, minimum
  local n; n=$(sqlite3 "$1" "$2"); echo "$n rows (at least $3)"; [ "$n" -ge "$3" ]
}

# --- installing the peers, once per run -------------------------------------------------

need_py_spiffe() { need_pip "spiffe cryptography" 'spiffe==0.3.2' cryptography; }
need_pyjwt() { need_pip "jwt cryptography" 'pyjwt[crypto]>=2.9'; }
need_moto() { need_pip "moto awscli" 'moto[server]>=5.1,<6' 'awscli>=1.40,<2'; }
# Prometheus's own Python client: its OpenMetrics parser reads /metrics independently of ours.
need_prometheus_parser() { need_pip "prometheus_client" 'prometheus-client>=0.20,<1'; }
need_pkilint() { need_pip "pkilint validators" 'pkilint==0.13.3'; }
# CloudEvents' JSON schema needs date-time and uri-reference checked: the format extras.
need_jsonschema() { need_pip "jsonschema rfc3339_validator rfc3986_validator" 'jsonschema[format-nongpl]>=4.23,<5'; }

need_pip() { # modules, requirement...: the modules importable from integration/.venv
  local stamp=$state/pip-${1// /-}
  [ -e "$stamp" ] && return 0
  if ! "$venv/bin/python" -c "import ${1// /, }" 2>/dev/null; then
    local modules=$1; shift
    echo "integration: installing $* into $venv"
    { [ -x "$venv/bin/pip" ] || python3 -m venv "$venv"; } &&
      "$venv/bin/pip" install --quiet --disable-pip-version-check "$@" ||
      { echo "integration: cannot install $modules (python3-venv, PyPI)"; exit 2; }
  fi
  touch "$stamp"
}

need_oidc_issuer() {
  [ -e "$state/oidc-issuer" ] && return 0
  if [ ! -d "$root/integration/node_modules/oauth2-mock-server" ]; then
    echo "integration: installing oauth2-mock-server (npm)"
    (cd "$root/integration" && npm ci --silent --no-audit --no-fund) ||
      { echo "integration: npm ci failed (node >= 20.19 and npm are needed)"; exit 2; }
  fi
  touch "$state/oidc-issuer"
}

need_rust_spiffe_client() {
  [ -e "$state/spiffe-client" ] && return 0
  echo "integration: building the Rust spiffe-crate client"
  (cd "$root/integration/spiffe-client" && CARGO_TARGET_DIR="$root/target/spiffe-client" cargo build --quiet --locked) ||
    { echo "integration: cannot build integration/spiffe-client"; exit 2; }
  touch "$state/spiffe-client"
}
