# AWS through the workload socket: `mayfly aws` as the AWS CLI's credential_process on moto, revocation's deny read back
# `mayfly dev --aws-endpoint` (moto's STS and IAM), `mayfly aws` as the AWS CLI's
# credential_process, the ledger's record, and revocation by identity, whose deny
# `aws iam get-role-policy` reads back from the emulator's IAM.
# (Sourced by integration/run in a subshell; helpers in integration/lib.sh.)

dev_role=arn:aws:iam::123456789012:role/mayfly-dev-reader

cp_json() { # mayfly aws: credential_process JSON, capped at the rule's 1 h
  "$bin" aws --socket "$aw/w.sock" --role "$dev_role" --ttl 2h > "$aw/cp.json" || return 1
  python3 -c '
import json, sys, datetime
d = json.load(open(sys.argv[1]))
assert set(d) == {"Version", "AccessKeyId", "SecretAccessKey", "SessionToken", "Expiration"}, d.keys()
assert d["Version"] == 1 and d["AccessKeyId"].startswith("ASIA") and d["SecretAccessKey"] and d["SessionToken"]
left = datetime.datetime.fromisoformat(d["Expiration"].replace("Z", "+00:00")) - datetime.datetime.now(datetime.timezone.utc)
print("expires in", left); assert 3500 < left.total_seconds() <= 3600, "the dev rule allows 1h"
' "$aw/cp.json"; }

caller_is_session() {
  env -u AWS_ACCESS_KEY_ID -u AWS_SECRET_ACCESS_KEY "$venv/bin/aws" --profile mayfly-dev --endpoint-url "$moto_url" sts get-caller-identity > "$aw/caller.json" || return 1
  cat "$aw/caller.json"; grep -q '"Arn": "arn:aws:sts::123456789012:assumed-role/mayfly-dev-reader/dev.quickstart-' "$aw/caller.json"
}

aw_rows() { rows_are "$aw/data/ledger.db" "$@"; }

no_secret_in_ledger() {
  local secret; secret=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["SecretAccessKey"])' "$aw/cp.json")
  ! sqlite3 "$aw/data/ledger.db" 'SELECT body FROM events' | grep -qF -- "$secret"
}

no_token_in_log() {
  local t; t=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["SessionToken"])' "$aw/cp.json")
  ! grep -qF -- "${t:0:40}" "$work/dev.log"
}

deny_reads_back() {
  awsx iam get-role-policy --role-name mayfly-dev-reader --policy-name mayfly-revoke-mayfly.local+dev+quickstart > "$aw/deny.json" || return 1
  python3 -c '
import json, sys, datetime
s = json.load(open(sys.argv[1]))["PolicyDocument"]["Statement"][0]; print(s)
assert s["Effect"] == "Deny" and s["Action"] == "*" and s["Resource"] == "*"
assert s["Condition"]["StringEquals"]["aws:SourceIdentity"] == "mayfly.local+dev+quickstart"
cut = datetime.datetime.fromisoformat(s["Condition"]["DateLessThan"]["aws:TokenIssueTime"].replace("Z", "+00:00"))
assert abs((cut - datetime.datetime.now(datetime.timezone.utc)).total_seconds()) < 120, cut
' "$aw/deny.json"; }

aw=$work/aws; mkdir -p "$aw"
start_moto "$aw" || exit 1
check "moto: a role for the dev identity (max session 2 h)" awsx iam create-role --role-name mayfly-dev-reader --max-session-duration 7200 --assume-role-policy-document "$moto_trust"
start_daemon dev "$aw/data" "$aw/admin.sock" \
  "$bin" dev --data-dir "$aw/data" --policies "$root/policies" --socket "$aw/w.sock" --admin-socket "$aw/admin.sock" --listen none --aws-endpoint "$moto_url" || exit 1
check "mayfly aws prints credential_process JSON (1 h: the rule's ceiling)" cp_json
cat > "$AWS_CONFIG_FILE" <<CFG
[profile mayfly-dev]
region = us-east-1
credential_process = $bin aws --socket $aw/w.sock --role $dev_role
[profile mayfly-denied]
region = us-east-1
credential_process = $bin aws --socket $aw/w.sock --role arn:aws:iam::123456789012:role/admin
CFG
check "the AWS CLI uses it via credential_process (sts get-caller-identity)" caller_is_session
check "a role policy does not grant: the CLI gets no credentials" refused_with "PermissionDenied" env -u AWS_ACCESS_KEY_ID -u AWS_SECRET_ACCESS_KEY "$venv/bin/aws" --profile mayfly-denied --endpoint-url "$moto_url" sts get-caller-identity
check "each session's record: key id, role, session name, source identity, expiry" aw_rows "SELECT count(*) FROM events WHERE kind = 'issued' AND json_extract(body, '\$.kind') = 'aws' AND json_extract(body, '\$.source_identity') = 'mayfly.local+dev+quickstart' AND json_extract(body, '\$.access_key_id') LIKE 'ASIA%' AND json_extract(body, '\$.session_name') LIKE 'dev.quickstart-%' AND json_extract(body, '\$.role_arn') = '$dev_role' AND json_extract(body, '\$.not_after') > CAST(strftime('%s','now') AS INTEGER)" 2
check "the denial is in the ledger"                aw_rows "SELECT count(*) FROM events WHERE kind = 'decision' AND body LIKE '%role/admin%' AND body LIKE '%\"outcome\":\"deny\"%'" 1
check "no secret access key in the ledger"        no_secret_in_ledger
check "no session token in the daemon's log"      no_token_in_log
check "mayfly revoke --identity places the deny"  bash -c "'$bin' revoke --admin-socket '$aw/admin.sock' --identity '$dev_id' --reason 'INC-11: laptop stolen' | tee '$aw/revoke.out' | grep -q 'aws: role mayfly-dev-reader denies sessions of mayfly.local+dev+quickstart'"
check "aws iam get-role-policy reads the deny back" deny_reads_back
check "the deny is in the ledger, with its removal time (role max: 2 h)" aw_rows "SELECT count(*) FROM events WHERE kind = 'revoked' AND json_extract(body, '\$.aws.denies[0].policy_name') = 'mayfly-revoke-mayfly.local+dev+quickstart' AND json_extract(body, '\$.aws.denies[0].remove_after') - json_extract(body, '\$.aws.denies[0].issued_before') = 7200" 1
check "the locked identity gets no new session"   refused_with "locked" "$bin" aws --socket "$aw/w.sock" --role "$dev_role"
check "dev (AWS) stops cleanly"                   stop_daemon
check "audit verify passes"                       "$bin" audit verify --data-dir "$aw/data"

