# Certificate lint: every certificate and CRL mayfly issues passes pkilint (PyPI) with no error but the linter's own, argued mistakes
# Against `mayfly dev`: its generated CA, the TLS listener certificate it makes from that CA,
# X509-SVIDs for an EC, an RSA and an Ed25519 CSR and for a key mayfly makes (py-spiffe over
# the Workload API), each also linted as a chain under the CA, and the CRL empty and after a
# revocation. pkilint's findings pass only through integration/pkilint_check.py, which exempts
# exactly two kinds, each after checking the value against the standard the finding cites:
#   - pkix.invalid_uri_syntax on `spiffe://` URI SANs: pkilint 0.13 validates URIs with
#     python-validators, which knows nine schemes (http, https, ftp, …) and calls every other
#     one invalid. RFC 5280 4.2.1.6 asks for an RFC 3986 URI; the script matches each value
#     against RFC 3986's grammar (scheme "://" authority path-abempty) and the SPIFFE-ID spec,
#     and checks pkilint accepts the same URI with the scheme changed to https.
#   - pkix.invalid_domain_name_syntax on the dNSName `localhost`: RFC 1034 3.5's preferred
#     name syntax (which RFC 5280 cites) allows a single label; python-validators wants a TLD.
# Then the floor: a certificate shorter than issuance.min_ttl is refused at the edge.
# (Sourced by integration/run in a subshell; helpers in integration/lib.sh.)

lint() { "$venv/bin/python" "$root/integration/pkilint_check.py" "$@"; }

fetch_server_made() { # out.pem: the leaf of an X509-SVID whose key mayfly made, via py-spiffe
  SPIFFE_ENDPOINT_SOCKET=unix://$lt/mayfly.sock "$venv/bin/python" -c '
import sys
from cryptography.hazmat.primitives.serialization import Encoding
from spiffe import WorkloadApiClient
svid = WorkloadApiClient(default_timeout=10.0).fetch_x509_svid()
open(sys.argv[1], "wb").write(svid.leaf.public_bytes(Encoding.PEM))
print(svid.spiffe_id)' "$1"
}

crl_lists() { # crl.pem, serial: the CRL names the serial (openssl's reading)
  openssl crl -in "$1" -noout -text | tr -d ' :' | grep -qi "SerialNumber$2"
}

need_pkilint
need_py_spiffe
lt=$work/lint; mkdir -p "$lt"
port=$(free_port)
start_daemon dev "$lt/data" "$lt/mayfly.sock" "$bin" dev --data-dir "$lt/data" --policies "$root/policies" \
  --socket "$lt/mayfly.sock" --admin-socket "$lt/admin.sock" --listen "127.0.0.1:$port" || exit 1

openssl req -new -newkey rsa:2048 -nodes -subj /CN=ignored -keyout "$lt/rsa.key" -out "$lt/rsa.csr" 2>/dev/null
openssl genpkey -algorithm ed25519 -out "$lt/ed.key" 2>/dev/null &&
  openssl req -new -key "$lt/ed.key" -subj /CN=ignored -out "$lt/ed.csr" 2>/dev/null
check "an X509-SVID for an EC P-256 key (mayfly x509)" "$bin" x509 --socket "$lt/mayfly.sock" --out "$lt/ec"
check "an X509-SVID for an RSA 2048 CSR"         "$bin" x509 --socket "$lt/mayfly.sock" --csr "$lt/rsa.csr" --out "$lt/rsa"
check "an X509-SVID for an Ed25519 CSR"          "$bin" x509 --socket "$lt/mayfly.sock" --csr "$lt/ed.csr" --out "$lt/ed"
check "an X509-SVID with a server-made key (py-spiffe)" fetch_server_made "$lt/server-made.pem"
check "the dev TLS listener's certificate"       bash -c "openssl s_client -connect 127.0.0.1:$port </dev/null 2>/dev/null | openssl x509 > '$lt/tls.pem'"
check "the CRL, empty"                           curl -sf --cacert "$lt/data/ca.pem" -o "$lt/crl-empty.pem" "https://127.0.0.1:$port/crl.pem"

check "pkilint: the CA certificate"              lint cert "$lt/data/ca.pem"
for leaf in ec rsa ed; do
  check "pkilint: the X509-SVID ($leaf CSR)"      lint cert "$lt/$leaf/cert.pem"
  check "pkilint: CA → X509-SVID ($leaf CSR) chain" lint chain "$lt/data/ca.pem" "$lt/$leaf/cert.pem"
done
check "pkilint: the X509-SVID (server-made key)" lint cert "$lt/server-made.pem"
check "pkilint: CA → X509-SVID (server-made key) chain" lint chain "$lt/data/ca.pem" "$lt/server-made.pem"
check "pkilint: the TLS listener certificate"    lint cert "$lt/tls.pem"
check "pkilint: CA → TLS listener chain"         lint chain "$lt/data/ca.pem" "$lt/tls.pem"
check "pkilint: the empty CRL"                   lint crl "$lt/crl-empty.pem"

serial=$(openssl x509 -in "$lt/ec/cert.pem" -noout -serial | cut -d= -f2)
check "revoke one SVID"                          "$bin" revoke --admin-socket "$lt/admin.sock" --serial "$serial" --reason "lint: a CRL with an entry"
check "the CRL lists it"                         wait_until bash -c "curl -sf --cacert '$lt/data/ca.pem' -o '$lt/crl.pem' https://127.0.0.1:$port/crl.pem && openssl crl -in '$lt/crl.pem' -noout -text | tr -d ' :' | grep -qi 'SerialNumber$serial'"
check "pkilint: the CRL with a revoked serial"   lint crl "$lt/crl.pem"

check "the floor: 1 s refused as invalid, naming issuance.min_ttl" refused_with "issuance.min_ttl" "$bin" x509 --socket "$lt/mayfly.sock" --ttl 1s --out "$lt/short"
check "the floor: 299 s refused too"             refused_with "under the minimum" "$bin" x509 --socket "$lt/mayfly.sock" --ttl 299s --out "$lt/short"
check "the floor: 5 min is issued"               "$bin" x509 --socket "$lt/mayfly.sock" --ttl 5m --out "$lt/five"
check "dev stops cleanly"                        stop_daemon
check "audit verify passes"                      "$bin" audit verify --data-dir "$lt/data"
