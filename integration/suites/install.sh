# Installed, outside the checkout: `mayfly init` writes a starter dir where policy test, dev and serve work
# The binary alone in a directory that is not the repository: `mayfly init` writes mayfly.toml
# and the example policies/ (compiled into the binary), refuses to overwrite them without
# --force; the policies' own tests pass there; `mayfly dev` starts from that directory and
# issues a certificate OpenSSL accepts; a release of the starter tree signed with an
# OpenSSL-made key lets `mayfly serve --config mayfly.toml` start and issue.
# (Sourced by integration/run in a subshell; helpers in integration/lib.sh.)

home=$work/elsewhere
mkdir -p "$home"
# Why cd: nothing may be found through the repository (a relative policies/, a .mayfly).
cd "$home" || exit 2

check "mayfly init writes mayfly.toml and policies/" bash -c "'$bin' init starter && [ -f starter/mayfly.toml ] && [ -f starter/policies/inventory.toml ] && [ -d starter/policies/tests ]"
check "the starter policies are the shipped ones" diff -r "$root/policies" "$home/starter/policies"
echo "# edited" >>"$home/starter/mayfly.toml"
check "init again refuses and writes nothing"  refused_with "exist already" "$bin" init starter
check "the edit is still there"                grep -q "^# edited" "$home/starter/mayfly.toml"
check "init --force puts the starter back"     bash -c "'$bin' init --force starter && ! grep -q '^# edited' starter/mayfly.toml"

cd "$home/starter" || exit 2
check "mayfly policy test policies passes there" "$bin" policy test policies

# dev, from the starter directory with its defaults (policies/, .mayfly/, ./mayfly.sock).
start_daemon dev "$home/starter/.mayfly" "$home/starter/mayfly.sock" "$bin" dev --listen none || exit 1
check "dev from the starter dir issues an X.509 SVID" "$bin" x509 --out "$work/dev-svid"
check "openssl verify accepts it"             openssl verify -CAfile "$work/dev-svid/bundle.pem" "$work/dev-svid/cert.pem"
check "dev stops cleanly"                     stop_daemon

# serve, from the starter config: an OpenSSL-made release key, the starter tree signed.
make_release_key "$home/starter" || exit 1
check "a signed release of the starter policies" signed_bundle policies policy.bundle starter release.key
check "mayfly config check --config mayfly.toml" "$bin" config check --config mayfly.toml
start_daemon serve "$home/starter/data" "$home/starter/mayfly.sock" "$bin" serve --config "$home/starter/mayfly.toml" || exit 1
check "serve from the starter config issues an X.509 SVID" "$bin" x509 --config mayfly.toml --out "$work/serve-svid"
check "openssl verify accepts it"             openssl verify -CAfile "$work/serve-svid/bundle.pem" "$work/serve-svid/cert.pem"
check "serve stops cleanly"                   stop_daemon
check "its ledger verifies"                   "$bin" audit verify --config mayfly.toml
