# A policy release: build, sign with OpenSSL's key, activate on `mayfly serve`, refuse a tampered one, roll back
# Validate, test, build, sign (OpenSSL's key), verify, activate on a running `mayfly serve`,
# refuse a tampered bundle while serving, roll back.
# (Sourced by integration/run in a subshell; helpers in integration/lib.sh.)

openssl_verifies_bundle() { # bundle, pubkey: check the signature without mayfly
  local x=$work/x-bundle; rm -rf "$x"; mkdir -p "$x"; tar -xf "$1" -C "$x" || return 1
  { printf 'mayfly policy bundle v1\n'; cat "$x/mayfly-bundle.json"; } > "$x/message"
  python3 -c "import json,sys; sys.stdout.buffer.write(bytes.fromhex(json.load(open('$x/mayfly-bundle.sig'))['signature']))" > "$x/sig"
  openssl pkeyutl -verify -pubin -inkey "$2" -rawin -in "$x/message" -sigfile "$x/sig" &&
    (cd "$x/files" && python3 -c "
import json,hashlib,sys
m=json.load(open('../mayfly-bundle.json'))
bad=[p for p,d in m['files'].items() if hashlib.sha256(open(p,'rb').read()).hexdigest()!=d]
sys.exit(1 if bad else 0)")
}

x509_lasts() { # out-dir, seconds: x509 asking for 2 h gets exactly this lifetime
  "$bin" x509 --socket "$rel/w.sock" --ttl 2h --out "$1" || return 1
  local nb na
  nb=$(date -d "$(openssl x509 -in "$1/cert.pem" -noout -startdate | cut -d= -f2)" +%s)
  na=$(date -d "$(openssl x509 -in "$1/cert.pem" -noout -enddate | cut -d= -f2)" +%s)
  echo "lifetime $((na - nb))s (want $2s)"
  [ $((na - nb)) -eq "$2" ]
}

events_of() { "$bin" audit tail --json --data-dir "$rel/data" -n 100000 | grep -c "\"kind\":\"$1\""; }
wait_events() { # kind, count: at most 10 s
  for _ in $(seq 1 100); do [ "$(events_of "$1")" -ge "$2" ] && return 0; sleep 0.1; done
  echo "fewer than $2 $1 events"; return 1
}

rel=$work/release; mkdir -p "$rel"; cp -r "$root/policies" "$rel/src"
make_release_key "$rel"
check "policy validate"                  "$bin" policy validate "$rel/src"
check "policy test"                      "$bin" policy test "$rel/src"
check "policy build"                     "$bin" policy build "$rel/src" --out "$rel/v1.bundle" --label git:v1
check "a build is reproducible"          bash -c "'$bin' policy build '$rel/src' --out '$rel/again.bundle' --label git:v1 && cmp '$rel/v1.bundle' '$rel/again.bundle'"
check "unsigned bundle does not verify"  refused_with unsigned "$bin" policy verify "$rel/v1.bundle" --key "$rel/release.pub"
check "policy sign with an openssl key"  "$bin" policy sign "$rel/v1.bundle" --key "$rel/release.key"
check "policy verify"                    "$bin" policy verify "$rel/v1.bundle" --key "$rel/release.pub"
check "policy keygen"                    "$bin" policy keygen --out "$rel/other"
check "openssl reads the keygen key"     bash -c "[ \"\$(openssl pkey -in '$rel/other.key' -pubout)\" = \"\$(cat '$rel/other.pub')\" ]"
check "another key does not verify it"   refused_with "not among the trusted keys" "$bin" policy verify "$rel/v1.bundle" --key "$rel/other.pub"
check "openssl verifies the signature, python the digests" openssl_verifies_bundle "$rel/v1.bundle" "$rel/release.pub"
cp -r "$rel/src" "$rel/loose"
sed -i 's|context.oidc.git_ref == "refs/heads/main"|context.oidc.git_ref like "refs/heads/*"|' "$rel/loose/issuance/ci.cedar" "$rel/loose/issuance/guardrails.cedar"
check "a change opening deploys to branches fails the tests" refused_with "expected deny, decided allow" "$bin" policy test "$rel/loose"
check "and is not built"                 refused_with "not built" "$bin" policy build "$rel/loose" --out "$rel/loose.bundle"
printf '@id("x") @max_ttl("1h")\npermit(principal, action, resource) when { principal.team == "x" };\n' > "$rel/loose/issuance/bad.cedar"
check "an off-schema rule: file and line" refused_with "bad.cedar.*line 2" "$bin" policy validate "$rel/loose"

cat > "$rel/mayfly.toml" <<TOML
trust_domain = "mayfly.local"
data_dir = "$rel/data"
[policy]
bundle = "$rel/policy.bundle"
trusted_keys = ["$rel/release.pub"]
poll_interval = "1s"
[workload_api]
socket = "$rel/w.sock"
[admin]
socket = "$rel/admin.sock"
[ca]
generate = true
TOML
cp "$rel/v1.bundle" "$rel/policy.bundle"
start_daemon serve "$rel/data" "$rel/w.sock" "$bin" serve --config "$rel/mayfly.toml" || exit 1
check "serve activates the signed bundle" wait_events policy_activated 1
check "admin socket is mode 0600"        bash -c "[ \"\$(stat -c %a '$rel/admin.sock')\" = 600 ]"
check "x509 under v1: 1 h"               x509_lasts "$rel/c1" 3600
# v2: the local ceiling goes to 20 min, with its test expectations (a change and its tests together).
sed -i 's/@max_ttl("1h")/@max_ttl("20m")/' "$rel/src/issuance/local.cedar"
sed -i 's/granted_ttl = "30m"/granted_ttl = "20m"/; s/granted_ttl = "1h"/granted_ttl = "20m"/' "$rel/src/tests/local.toml" "$rel/src/tests/break-glass.toml"
signed_bundle "$rel/src" "$rel/v2.bundle" git:v2 "$rel/release.key"
cp "$rel/v2.bundle" "$rel/policy.bundle.new" && mv "$rel/policy.bundle.new" "$rel/policy.bundle"
check "v2 is activated without a restart" wait_events policy_activated 2
check "x509 under v2: 20 min"            x509_lasts "$rel/c2" 1200
check "policy status names v2"           bash -c "'$bin' policy status --admin-socket '$rel/admin.sock' | grep -q 'current:.*git:v2'"
sed 's/max_ttl("20m")/max_ttl("12h")/' "$rel/v2.bundle" > "$rel/tampered.bundle"
check "the tampered copy differs"        bash -c "! cmp -s '$rel/v2.bundle' '$rel/tampered.bundle'"
check "policy verify refuses it"         refused_with REJECTED "$bin" policy verify "$rel/tampered.bundle" --key "$rel/release.pub"
cp "$rel/tampered.bundle" "$rel/policy.bundle.new" && mv "$rel/policy.bundle.new" "$rel/policy.bundle"
check "the daemon refuses it (ledger)"   wait_events policy_rejected 1
check "and keeps serving v2"             x509_lasts "$rel/c3" 1200
check "rollback needs a reason"          refused_with "reason" "$bin" policy rollback --admin-socket "$rel/admin.sock"
check "policy rollback"                  "$bin" policy rollback --admin-socket "$rel/admin.sock" --reason "INC-7: 20 min breaks batch renewals"
check "x509 after rollback: 1 h again"   x509_lasts "$rel/c4" 3600
check "the rollback is in the ledger with its reason" bash -c "'$bin' audit tail --json --data-dir '$rel/data' -n 100 | grep policy_rolled_back | grep -q INC-7"
check "decisions name the release"       bash -c "'$bin' audit tail --json --data-dir '$rel/data' -n 3 | grep decision | grep -q \"\$('$bin' policy verify '$rel/v1.bundle' --key '$rel/release.pub' | grep -o 'sha256:[0-9a-f]*')\""
check "serve stops cleanly"              stop_daemon
check "audit verify passes"              "$bin" audit verify --data-dir "$rel/data"

