# Policy assurance: replay, shadow mode and the cvc5 proof catch a careless permit and pass a tightening
# Recorded CI traffic (two repositories of the acme organisation, one asking for the
# production deploy role it may not have) on `mayfly serve`; then a candidate that adds a
# careless permit (any acme repository may assume the deploy role) is caught three ways —
# replay of the ledger shows the recorded requests it would newly allow, shadow mode on live
# traffic records the difference without acting on it, and the proof (cvc5) prints a
# counterexample naming the rule — while a pure tightening passes all three; promote-check
# reports both, and its report is a ledger event.
# (Sourced by integration/run in a subshell; helpers in integration/lib.sh.)

ask() { # claims, body-extra (JSON fields), expected HTTP status
  local code
  code=$(curl -s -o "$pa/reply.json" -w '%{http_code}' --cacert "$pa/tls.pem" -H 'content-type: application/json' \
    -d "{\"token\": \"$(mint "$1")\", $2}" "https://127.0.0.1:$pa_port/v1/exchange")
  echo "HTTP $code: $(head -c 300 "$pa/reply.json")"; [ "$code" = "$3" ]
}

replay_says() { # bundle, expected exit, pattern
  "$bin" policy replay --bundle "$pa/$1.bundle" --key "$pa/release.pub" --data-dir "$pa/data" --since 1h > "$pa/replay-$1.txt"; local rc=$?
  cat "$pa/replay-$1.txt"; [ "$rc" = "$2" ] && grep -q -- "$3" "$pa/replay-$1.txt"
}

prove_says() { # current, candidate, expected exit, pattern
  "$bin" policy diff --prove "$pa/$1.bundle" "$pa/$2.bundle" --key "$pa/release.pub" > "$pa/prove-$2.txt" 2>&1; local rc=$?
  cat "$pa/prove-$2.txt"; [ "$rc" = "$3" ] && grep -q -- "$4" "$pa/prove-$2.txt"
}

# Why the sleep: the daemon is live, and its ledger writer commits events in groups.
pa_rows() { sleep 0.3; rows_are "$pa/data/ledger.db" "$@"; }
pa_rows_at_least() { rows_at_least "$pa/data/ledger.db" "$@"; }

gate() { # candidate, expected exit, pattern
  "$bin" policy promote-check --current "$pa/current.bundle" --candidate "$pa/$1.bundle" --key "$pa/release.pub" --data-dir "$pa/data" --since 1h --admin-socket "$pa/admin.sock" > "$pa/gate-$1.md" 2>&1; local rc=$?
  cat "$pa/gate-$1.md"; [ "$rc" = "$2" ] && grep -q -- "$3" "$pa/gate-$1.md"
}

tight_active() { # serve has activated the tight release, within 10 s
  for _ in $(seq 1 100); do
    "$bin" policy status --admin-socket "$pa/admin.sock" | grep -q "current:  $tight_version" && return 0
    sleep 0.1
  done
  "$bin" policy status --admin-socket "$pa/admin.sock"; return 1
}

evidence_of() { # version, expected exit, pattern...
  local v=$1 want=$2; shift 2
  "$bin" policy evidence "$v" --data-dir "$pa/data" > "$pa/evidence.txt"; local rc=$?; cat "$pa/evidence.txt"; [ "$rc" = "$want" ] || return 1
  for p in "$@"; do grep -q -- "$p" "$pa/evidence.txt" || { echo "missing: $p"; return 1; }; done
}

pa=$work/assurance; mkdir -p "$pa"
start_moto "$pa" || exit 1
start_issuer "$pa" || exit 1
make_tls_cert "$pa" && make_release_key "$pa" || exit 1
cp -r "$root/policies" "$pa/current"
cat >> "$pa/current/inventory.toml" <<TOML

[[workload]]
id = "spiffe://mayfly.local/ci/acme/app-mock"
owner = "acme-app-team@example.org"
purpose = "acme/app pipelines (integration issuer)"
environment = "ci"
tier = "critical"
expires = 2030-01-01
selectors = ["oidc:iss:$issuer_url", "oidc:repository:acme/app"]

[[workload]]
id = "spiffe://mayfly.local/ci/acme/tools"
owner = "tools@example.org"
purpose = "acme/tools pipelines (integration issuer)"
environment = "ci"
tier = "standard"
expires = 2030-01-01
selectors = ["oidc:iss:$issuer_url", "oidc:repository:acme/tools"]
TOML
cp -r "$pa/current" "$pa/careless"; cp -r "$pa/current" "$pa/tight"
cat > "$pa/careless/issuance/org-deploys.cedar" <<'CEDAR'
// "Every repository of the organisation deploys": the careless permit the checks must catch.
@id("ci-any-acme-repo-deploys")
@max_ttl("30m")
permit (
  principal,
  action == Mayfly::Action::"issue_aws",
  resource == Mayfly::AwsRole::"arn:aws:iam::111122223333:role/acme-app-deploy"
)
when { principal.attestation == "oidc" && context has oidc && context.oidc has repository_owner && context.oidc.repository_owner == "acme" };
CEDAR
cat > "$pa/tight/issuance/no-prt-jwt.cedar" <<'CEDAR'
// A pure tightening: pull_request_target runs get no JWT at all.
@id("forbid-jwt-on-pull-request-target")
@reason("pull_request_target runs untrusted code with the repository's secrets")
forbid (principal, action == Mayfly::Action::"issue_jwt", resource)
when { context has oidc && context.oidc has event_name && context.oidc.event_name == "pull_request_target" };
CEDAR
for v in current careless tight; do
  signed_bundle "$pa/$v" "$pa/$v.bundle" "integration:$v" "$pa/release.key"
done
check "three signed bundles: current, careless, tight" test -s "$pa/tight.bundle"
pa_port=$(free_port)
cat > "$pa/mayfly.toml" <<TOML
trust_domain = "mayfly.local"
data_dir = "$pa/data"
[policy]
bundle = "$pa/current.bundle"
trusted_keys = ["$pa/release.pub"]
poll_interval = "1s"
[workload_api]
socket = "$pa/w.sock"
[admin]
socket = "$pa/admin.sock"
[ca]
generate = true
[listen]
address = "127.0.0.1:$pa_port"
cert = "$pa/tls.pem"
key = "$pa/tls-key.pem"
[jwt]
issuer = "https://127.0.0.1:$pa_port"
[[oidc.issuer]]
url = "$issuer_url"
audiences = ["mayfly"]
algorithms = ["RS256"]
[aws]
region = "us-east-1"
endpoint = "$moto_url"
[limits]
# Repeated refusals are counted into a refusals event per window: short here, so replay
# sees the repeats (it weighs each by its count) within the suite.
refusal_window = "1s"
TOML
start_daemon serve "$pa/data" "$pa/admin.sock" "$bin" serve --config "$pa/mayfly.toml" || exit 1
tools='{"repository": "acme/tools", "sub": "repo:acme/tools:ref:refs/heads/main"}'
deploy='"kind": "aws", "role": "arn:aws:iam::111122223333:role/acme-app-deploy"'
cache='"kind": "jwt", "audience": "https://artifacts.example.org"'
check "traffic: acme/tools asks for the deploy role: 403" ask "$tools" "$deploy" 403
check "traffic: ... and again: 403"               ask "$tools" "$deploy" 403
check "traffic: acme/app gets an artifact-cache JWT" ask '{}' "$cache" 200
check "traffic: a pull_request_target run gets one too" ask '{"event_name": "pull_request_target"}' "$cache" 200
check "the repeated refusal is counted in a refusals event" wait_until pa_rows_at_least "SELECT count(*) FROM events WHERE kind = 'refusals'" 1
check "replay: the careless permit newly allows acme/tools' recorded requests (exit 1)" replay_says careless 1 'NEWLY ALLOWED (possible privilege escalation): 2 request(s)'
check "replay: ... by identity and rule"          grep -q 'spiffe://mayfly.local/ci/acme/tools  issue_aws role arn:aws:iam::111122223333:role/acme-app-deploy  ×2  now: allowed; by ci-any-acme-repo-deploys' "$pa/replay-careless.txt"
check "replay: the tightening escalates nothing (exit 0)" replay_says tight 0 'result: no escalation'
check "replay: ... and names whom it would break" grep -q 'NEWLY DENIED (would break someone): 1 request(s)' "$pa/replay-tight.txt"
check "proof: a counterexample for the careless permit (exit 1)" prove_says current careless 1 'granted by: ci-any-acme-repo-deploys'
check "proof: ... a concrete request for the deploy role" grep -q 'resource: Mayfly::AwsRole::"arn:aws:iam::111122223333:role/acme-app-deploy"' "$pa/prove-careless.txt"
check "proof: the tightening is proven (exit 0)"  prove_says current tight 0 'result: proven'
check "shadow the careless candidate on the running daemon" "$bin" policy shadow "$pa/careless.bundle" --reason "CHG-12: try org-wide deploys" --admin-socket "$pa/admin.sock"
check "live: acme/tools still gets 403 (shadow never acts)" ask "$tools" "$deploy" 403
check "shadow: the difference is recorded: newly allowed, by the careless rule" pa_rows "SELECT count(*) FROM events WHERE kind = 'policy_shadow_diff' AND json_extract(body, '\$.change') = 'newly_allowed' AND json_extract(body, '\$.shadow.identity') = 'spiffe://mayfly.local/ci/acme/tools' AND json_extract(body, '\$.shadow.rules[0]') = 'ci-any-acme-repo-deploys'" 1
check "shadow: nothing was issued for it"         pa_rows "SELECT count(*) FROM events WHERE kind = 'issued' AND json_extract(body, '\$.identity') = 'spiffe://mayfly.local/ci/acme/tools'" 0
check "shadow the tightening instead"             "$bin" policy shadow "$pa/tight.bundle" --reason "CHG-13: no JWTs for pull_request_target" --admin-socket "$pa/admin.sock"
check "live traffic under the tight shadow"       ask '{"event_name": "pull_request_target"}' "$cache" 200
check "live: ... acme/tools again 403"            ask "$tools" "$deploy" 403
tight_version=$(sqlite3 "$pa/data/ledger.db" "SELECT json_extract(body, '\$.candidate') FROM events WHERE kind = 'policy_shadow' ORDER BY seq DESC LIMIT 1")
check "shadow (tight): no escalation recorded, one request it would deny" pa_rows "SELECT sum(json_extract(body, '\$.escalation') = 1) || '/' || sum(json_extract(body, '\$.change') = 'newly_denied') FROM events WHERE kind = 'policy_shadow_diff' AND json_extract(body, '\$.candidate') = '$tight_version'" "0/1"
check "shadow --stop"                             "$bin" policy shadow --stop --reason "CHG-13 evaluated" --admin-socket "$pa/admin.sock"
check "promote-check blocks the careless candidate (exit 1)" gate careless 1 '\*\*verdict: BLOCK\*\*'
check "promote-check: replay and proof both flag it" bash -c "grep -q '| replay | \*\*ESCALATION\*\*' '$pa/gate-careless.md' && grep -q '| proof | \*\*NOT PROVEN\*\*' '$pa/gate-careless.md' && grep -q 'rules added: .ci-any-acme-repo-deploys.' '$pa/gate-careless.md'"
check "promote-check passes the tightening (exit 0)" gate tight 0 '\*\*verdict: PASS\*\*'
check "each check is a ledger event (policy_check)" pa_rows "SELECT count(*) FROM events WHERE kind = 'policy_check' AND json_extract(body, '\$.report.check') = 'promote-check'" 2
check "the tight release is published where serve looks" bash -c "cp '$pa/tight.bundle' '$pa/next.bundle' && mv '$pa/next.bundle' '$pa/current.bundle'"
check "... and serve activates it"                tight_active
check "policy evidence: the checks it passed before it went live" evidence_of "$tight_version" 0 'check promote-check: pass' 'shadow started' 'shadow differences on live traffic: newly_denied 1' 'ACTIVATED via'
careless_version=$(sqlite3 "$pa/data/ledger.db" "SELECT json_extract(body, '\$.report.candidate') FROM events WHERE kind = 'policy_check' AND json_extract(body, '\$.report.verdict') = 'block' LIMIT 1")
check "policy evidence: the careless one was blocked, never live" evidence_of "$careless_version" 0 'check promote-check: block' 'newly_allowed 1'
check "assurance: serve stops cleanly"            stop_daemon
check "audit verify passes"                       "$bin" audit verify --data-dir "$pa/data"
