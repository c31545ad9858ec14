# The SPIFFE Workload API with unchanged clients (py-spiffe, the Rust spiffe crate): SVIDs, JWTs, a pushed rotation
# Against `mayfly serve` on a signed release of the shipped policies with 8 s SVIDs, so a
# rotation is pushed at 4 s (half-life).
# (Sourced by integration/run in a subshell; helpers in integration/lib.sh.)

rotated_in_time() { # json-line-file: a new serial, pushed before the first SVID expired
  python3 -c "
import json,sys
r=json.loads(open(sys.argv[1]).read().strip().splitlines()[-1]); print(r)
sys.exit(0 if r['rotated'] != r['first'] and r['rotated_at'] < r['first_not_after'] else 1)" "$1"
}

need_py_spiffe
need_rust_spiffe_client
sp=$work/spiffe; mkdir -p "$sp"
make_release_key "$sp" && signed_bundle "$root/policies" "$sp/v1.bundle" git:v1 "$sp/release.key" || exit 1
cat > "$sp/mayfly.toml" <<TOML
trust_domain = "mayfly.local"
data_dir = "$sp/data"
[policy]
bundle = "$sp/v1.bundle"
trusted_keys = ["$sp/release.pub"]
[workload_api]
socket = "$sp/w.sock"
[ca]
generate = true
[issuance]
default_ttl = "8s"
# Below the 5-minute default floor on purpose: a rotation within the suite's time.
min_ttl = "1s"
TOML
start_daemon serve "$sp/data" "$sp/w.sock" "$bin" serve --config "$sp/mayfly.toml" || exit 1
export SPIFFE_ENDPOINT_SOCKET=unix://$sp/w.sock
check "py-spiffe: X.509 SVID chains to the fetched bundle, key matches" save "$sp/py-x509.json" py_client x509
check "py-spiffe: the SVID is the inventory id"   field_is "$sp/py-x509.json" spiffe_id "$dev_id"
check "py-spiffe: JWT-SVID fetched, validated by the API and the JWKS" save "$sp/py-jwt.json" py_client jwt spiffe://mayfly.local/db
check "py-spiffe: JWT validated"                  field_is "$sp/py-jwt.json" validated True
check "py-spiffe: a rotated SVID is pushed before the first expires" save "$sp/py-watch.json" py_client watch 20
check "py-spiffe: new serial, in time"            rotated_in_time "$sp/py-watch.json"
check "no security header: INVALID_ARGUMENT"      py_client nometa
check "rust spiffe crate: X.509 SVID verifies"    save "$sp/rs-x509.json" "$rust_client" x509
check "rust spiffe crate: the SVID is the inventory id" field_is "$sp/rs-x509.json" spiffe_id "$dev_id"
check "rust spiffe crate: JWT-SVID fetched and validated" save "$sp/rs-jwt.json" "$rust_client" jwt spiffe://mayfly.local/db
check "rust spiffe crate: a rotated SVID is pushed in time" save "$sp/rs-watch.json" "$rust_client" watch 20
check "rust spiffe crate: new serial, in time"    rotated_in_time "$sp/rs-watch.json"
unset SPIFFE_ENDPOINT_SOCKET
check "serve stops with streams open"            stop_daemon
check "each rotation is a recorded issuance"      rows_at_least "$sp/data/ledger.db" "SELECT count(*) FROM events WHERE kind = 'decision' AND body LIKE '%\"rotates\":\"%'" 2
check "each validation is a recorded use"         rows_at_least "$sp/data/ledger.db" "SELECT count(*) FROM events WHERE kind = 'used'" 2
check "no key or token in the ledger"             bash -c "! sqlite3 '$sp/data/ledger.db' 'SELECT body FROM events' | grep -q -e 'PRIVATE' -e 'eyJ'"
check "audit verify passes"                       "$bin" audit verify --data-dir "$sp/data"
