# The CI token exchange over TLS: an OIDC issuer from npm, curl, PyJWT; AWS credentials from moto's STS
# An independent issuer mints CI-shaped id-tokens, curl exchanges them with `mayfly serve`
# over TLS (an OpenSSL-made certificate) for JWTs PyJWT verifies and for AWS sessions through
# AssumeRoleWithWebIdentity; refusals are recorded.
# (Sourced by integration/run in a subshell; helpers in integration/lib.sh.)

exchange() { # token, expected HTTP status, [audience]: POST /v1/exchange with curl over TLS
  local code
  code=$(curl -s -o "$ex/reply.json" -w '%{http_code}' --cacert "$ex/tls.pem" -H 'content-type: application/json' \
    -d "{\"token\": \"$1\", \"kind\": \"jwt\", \"audience\": \"${3:-https://artifacts.example.org}\"}" \
    "https://127.0.0.1:$tls_port/v1/exchange")
  echo "HTTP $code: $(cat "$ex/reply.json")"
  [ "$code" = "$2" ]
}

exchange_aws() { # token, expected HTTP status, role
  local code
  code=$(curl -s -o "$ex/aws.json" -w '%{http_code}' --cacert "$ex/tls.pem" -H 'content-type: application/json' \
    -d "{\"token\": \"$1\", \"kind\": \"aws\", \"role\": \"$3\", \"ttl\": \"30m\"}" "https://127.0.0.1:$tls_port/v1/exchange")
  echo "HTTP $code: $(python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); [d.pop(k, None) for k in ("SecretAccessKey", "SessionToken")]; print(d)' "$ex/aws.json")"
  [ "$code" = "$2" ]
}

verify_with_pyjwt() { # the minted JWT through mayfly's discovery document and JWKS
  "$venv/bin/python" "$root/integration/verify_jwt.py" "https://127.0.0.1:$tls_port" "$ex/tls.pem" https://artifacts.example.org \
    < "$ex/minted.jwt" > "$ex/claims.json"
  local rc=$?; cat "$ex/claims.json"; return $rc
}

need_pyjwt
ex=$work/exchange; mkdir -p "$ex"
start_moto "$ex" || exit 1
check "moto: a role for the CI identity"          awsx iam create-role --role-name acme-app-read --assume-role-policy-document "$moto_trust"
start_issuer "$ex" || exit 1
make_tls_cert "$ex" && make_release_key "$ex" || exit 1
cp -r "$root/policies" "$ex/src"
cat >> "$ex/src/inventory.toml" <<TOML

[[workload]]
id = "spiffe://mayfly.local/ci/acme/app-mock"
owner = "acme-app-team@example.org"
purpose = "acme/app pipelines, as minted by the integration tier's OIDC issuer"
environment = "ci"
tier = "critical"
expires = 2030-01-01
selectors = ["oidc:iss:$issuer_url", "oidc:repository:acme/app"]
TOML
# This tier's own rule: the mock CI identity may read through acme-app-read (in moto's
# account) from main, tagged with its SPIFFE ID.
cat > "$ex/src/issuance/integration-aws.cedar" <<'CEDAR'
@id("integration-ci-aws-read")
@max_ttl("1h")
@aws_session_tags("spiffe_id")
permit (
  principal == Mayfly::Workload::"spiffe://mayfly.local/ci/acme/app-mock",
  action == Mayfly::Action::"issue_aws",
  resource == Mayfly::AwsRole::"arn:aws:iam::123456789012:role/acme-app-read"
)
when { principal.attestation == "oidc" && context has oidc && context.oidc has git_ref && context.oidc.git_ref == "refs/heads/main" };
CEDAR
signed_bundle "$ex/src" "$ex/policy.bundle" integration "$ex/release.key" || exit 1
tls_port=$(free_port)
cat > "$ex/mayfly.toml" <<TOML
trust_domain = "mayfly.local"
data_dir = "$ex/data"
[policy]
bundle = "$ex/policy.bundle"
trusted_keys = ["$ex/release.pub"]
[workload_api]
socket = "$ex/w.sock"
[ca]
generate = true
[listen]
address = "127.0.0.1:$tls_port"
cert = "$ex/tls.pem"
key = "$ex/tls-key.pem"
[jwt]
issuer = "https://127.0.0.1:$tls_port"
[[oidc.issuer]]
url = "$issuer_url"
audiences = ["mayfly"]
algorithms = ["RS256"]
[aws]
region = "us-east-1"
endpoint = "$moto_url"
# No AWS key needed on the broker: STS gets a 5-minute JWT mayfly signs (moto accepts any).
mode = "web_identity"
TOML
start_daemon serve "$ex/data" "$ex/w.sock" "$bin" serve --config "$ex/mayfly.toml" || exit 1
token=$(mint)
check "curl exchanges an issuer's id-token for a JWT over TLS" exchange "$token" 200
check "the JWT is for the CI identity"            field_is "$ex/reply.json" spiffe_id spiffe://mayfly.local/ci/acme/app-mock
python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["token"])' "$ex/reply.json" > "$ex/minted.jwt"
check "PyJWT verifies it via mayfly's discovery + JWKS" verify_with_pyjwt
check "its subject is the SPIFFE ID"              field_is "$ex/claims.json" sub spiffe://mayfly.local/ci/acme/app-mock
check "the same id-token again: 401 (replay)"     exchange "$token" 401
check "a token for another audience: 401"         exchange "$(mint '{}' someone-else)" 401
check "an expired token: 401"                     exchange "$(mint "{\"exp\": $(( $(date +%s) - 3600 ))}")" 401
check "a tampered token: 401"                     exchange "$(mint | python3 -c 'import sys; h,p,s=sys.stdin.read().strip().split("."); print(h+"."+p[:-4]+"AAAA."+s)')" 401
check "another repository: 403 (no inventory entry)" exchange "$(mint '{"repository": "acme/other", "sub": "repo:acme/other:ref:refs/heads/main"}')" 403
check "a sub naming another repository than the claims: 401" exchange "$(mint '{"repository": "acme/other"}')" 401
check "an audience no rule grants: 403"           exchange "$(mint)" 403 https://payments.example.org
check "a CI run exchanges its id-token for AWS credentials (moto STS)" exchange_aws "$(mint)" 200 arn:aws:iam::123456789012:role/acme-app-read
check "the session's source identity is the CI identity" field_is "$ex/aws.json" source_identity mayfly.local+ci+acme+app-mock
check "in credential_process shape (Version 1)"  field_is "$ex/aws.json" Version 1
check "a branch run gets no AWS credentials: 403" exchange_aws "$(mint '{"ref": "refs/heads/feature-x", "sub": "repo:acme/app:ref:refs/heads/feature-x"}')" 403 arn:aws:iam::123456789012:role/acme-app-read
check "discovery and JWKS over HTTP/1.1 too"      bash -c "curl -s --http1.1 --cacert '$ex/tls.pem' https://127.0.0.1:$tls_port/.well-known/jwks.json | grep -q '\"use\":\"sig\"'"
check "serve stops cleanly"                       stop_daemon
check "each refusal is a recorded denial"         rows_at_least "$ex/data/ledger.db" "SELECT count(*) FROM events WHERE kind = 'decision' AND body LIKE '%\"api\":\"exchange\"%' AND body LIKE '%\"outcome\":\"deny\"%'" 6
check "the issuance names commit and run"         rows_at_least "$ex/data/ledger.db" "SELECT count(*) FROM events WHERE kind = 'issued' AND body LIKE '%c0ffee0000000000000000000000000000000001%' AND body LIKE '%\"run_id\":\"1001\"%'" 1
check "no id-token or JWT in the ledger"          bash -c "! sqlite3 '$ex/data/ledger.db' 'SELECT body FROM events' | grep -q 'eyJ'"
check "...through AssumeRoleWithWebIdentity with mayfly's own JWT" rows_at_least "$ex/data/ledger.db" "SELECT count(*) FROM events WHERE kind = 'issued' AND json_extract(body, '\$.sts_mode') = 'web_identity' AND json_extract(body, '\$.web_identity_jti') LIKE '%.sts'" 1
check "the AWS session is recorded with its source identity" rows_at_least "$ex/data/ledger.db" "SELECT count(*) FROM events WHERE kind = 'issued' AND body LIKE '%\"source_identity\":\"mayfly.local+ci+acme+app-mock\"%' AND body LIKE '%\"run_id\":\"1001\"%'" 1
check "audit verify passes"                       "$bin" audit verify --data-dir "$ex/data"

