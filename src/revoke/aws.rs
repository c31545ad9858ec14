//! Revoking AWS sessions by identity. STS sessions cannot be recalled, so for each role an
//! identity holds a live session of, mayfly puts an inline policy on the role that denies
//! everything to sessions whose `aws:SourceIdentity` is that identity and whose
//! `aws:TokenIssueTime` is before the revocation (IAM `PutRolePolicy`). Sessions issued
//! later (after the identity is unlocked) are unaffected. Each deny is recorded with the
//! revocation; once the role's maximum session duration has passed every session it could
//! catch has expired, and the sweep deletes it and records that too.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde_json::{Value, json};

use super::AwsRevocation;
use crate::clock::{Clock, unix_secs};
use crate::identity::WorkloadId;
use crate::ledger::{BoxFuture, CredentialRecord, EventKind, Ledger, LedgerError, NewEvent, StoredEvent};
use crate::mint::aws::{IamApi, source_identity};

/// Assumed when a role's maximum cannot be read: AWS's largest, so a deny is never removed
/// while a session it must catch could still be live.
const LONGEST_SESSION: Duration = Duration::from_secs(12 * 3600);
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

pub struct AwsRevoker {
    iam: Arc<dyn IamApi>,
}

impl AwsRevoker {
    pub fn new(iam: Arc<dyn IamApi>) -> Self {
        Self { iam }
    }
}

/// The name of the inline policy that denies one identity's sessions on a role.
pub fn deny_policy_name(source_identity: &str) -> String {
    format!("mayfly-revoke-{source_identity}")
}

/// Deny everything to the identity's sessions issued before `before`.
pub fn deny_document(source_identity: &str, before: SystemTime) -> String {
    let before = crate::clock::rfc3339(before);
    json!({
        "Version": "2012-10-17",
        "Statement": [{
            "Sid": "MayflyRevokedSessions",
            "Effect": "Deny",
            "Action": "*",
            "Resource": "*",
            "Condition": {
                "StringEquals": { "aws:SourceIdentity": source_identity },
                "DateLessThan": { "aws:TokenIssueTime": before },
            },
        }],
    })
    .to_string()
}

fn ceil_second(t: SystemTime) -> SystemTime {
    let since = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    let whole = since.as_secs() + u64::from(since.subsec_nanos() > 0);
    SystemTime::UNIX_EPOCH + Duration::from_secs(whole)
}

/// `arn:aws:sts::<account>:assumed-role/<role>/<session>` → (account, role name).
fn role_of(assumed_role_arn: &str) -> Option<(String, String)> {
    let mut parts = assumed_role_arn.splitn(6, ':');
    let (_, _, _, _, account, resource) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let mut path = resource.strip_prefix("assumed-role/")?.split('/');
    Some((account.to_owned(), path.next()?.to_owned()))
}

impl AwsRevocation for AwsRevoker {
    fn revoke_identity<'a>(&'a self, sessions: &'a [CredentialRecord], before: SystemTime) -> BoxFuture<'a, Value> {
        Box::pin(async move {
            // Why round up: aws:TokenIssueTime has whole seconds, so a session issued earlier
            // in the revocation's own second must still be "before" the cutoff.
            let before = ceil_second(before);
            // One deny per (identity, role), however many sessions it holds there.
            let mut targets: BTreeMap<(String, String, String), ()> = BTreeMap::new();
            let mut denies = Vec::new();
            for s in sessions.iter().filter(|s| s.kind == "aws") {
                match (role_of(&s.fingerprint), WorkloadId::parse(&s.identity)) {
                    (Some((account, role)), Ok(id)) => {
                        targets.insert((source_identity(&id), role, account), ());
                    }
                    _ => denies.push(json!({
                        "credential_id": s.id, "applied": false,
                        "error": format!("cannot tell the role of session `{}` from `{}`: deny it by hand", s.serial, s.fingerprint),
                    })),
                }
            }
            let own = tokio::time::timeout(CALL_TIMEOUT, self.iam.account()).await.ok().and_then(Result::ok);
            for (source, role, account) in targets.into_keys() {
                let name = deny_policy_name(&source);
                let document = deny_document(&source, before);
                // IAM calls name a role, and reach the broker's own account only.
                let error = if own.as_deref() != Some(account.as_str()) {
                    Some(format!(
                        "the role is in account {account} but this broker's IAM credentials are for {}: place the deny there",
                        own.as_deref().unwrap_or("an unknown account")
                    ))
                } else {
                    match tokio::time::timeout(CALL_TIMEOUT, self.iam.put_role_policy(&role, &name, &document)).await {
                        Ok(Ok(())) => None,
                        Ok(Err(e)) => Some(e.to_string()),
                        Err(_) => Some("PutRolePolicy did not answer in time".to_owned()),
                    }
                };
                let max = match (&error, tokio::time::timeout(CALL_TIMEOUT, self.iam.max_session_duration(&role)).await)
                {
                    (None, Ok(Ok(d))) => d,
                    _ => LONGEST_SESSION,
                };
                if let Some(e) = &error {
                    tracing::error!(role, policy = name, error = %e, "AWS deny NOT placed: the identity's sessions on this role stay valid until they expire");
                } else {
                    tracing::warn!(role, policy = name, source_identity = source, "AWS deny placed on the role");
                }
                denies.push(json!({
                    "role": role,
                    "account": account,
                    "policy_name": name,
                    "source_identity": source,
                    "issued_before": unix_secs(before),
                    "remove_after": unix_secs(before + max),
                    "document": serde_json::from_str::<Value>(&document).unwrap_or(Value::Null),
                    "applied": error.is_none(),
                    "error": error,
                }));
            }
            if denies.is_empty() {
                return json!({ "needed": false, "why": "no live AWS session of this identity on record", "denies": [] });
            }
            let applied = denies.iter().all(|d| d["applied"] == json!(true));
            json!({ "needed": true, "applied": applied, "denies": denies })
        })
    }
}

/// A deny on record that has not been removed yet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlacedDeny {
    pub role: String,
    pub policy_name: String,
    pub source_identity: String,
    pub remove_after: i64,
    /// The `revoked` event that placed it (the latest one, for a policy placed again).
    pub placed_in: i64,
}

/// From `revoked` and `aws_deny_removed` events in order: every applied deny whose latest
/// placement has no removal after it.
pub fn outstanding(events: &[StoredEvent]) -> Vec<PlacedDeny> {
    let mut latest: HashMap<(String, String), PlacedDeny> = HashMap::new();
    for e in events {
        let Ok(body) = serde_json::from_str::<Value>(&e.body) else { continue };
        match e.kind.as_str() {
            "revoked" => {
                for d in body.pointer("/aws/denies").and_then(Value::as_array).into_iter().flatten() {
                    if d["applied"] != json!(true) {
                        continue;
                    }
                    let text = |k: &str| d[k].as_str().unwrap_or_default().to_owned();
                    let deny = PlacedDeny {
                        role: text("role"),
                        policy_name: text("policy_name"),
                        source_identity: text("source_identity"),
                        remove_after: d["remove_after"].as_i64().unwrap_or(i64::MAX),
                        placed_in: e.seq,
                    };
                    latest.insert((deny.role.clone(), deny.policy_name.clone()), deny);
                }
            }
            "aws_deny_removed" => {
                let key = (
                    body["role"].as_str().unwrap_or_default().to_owned(),
                    body["policy_name"].as_str().unwrap_or_default().to_owned(),
                );
                if latest.get(&key).is_some_and(|d| body["placed_in"].as_i64() == Some(d.placed_in)) {
                    latest.remove(&key);
                }
            }
            _ => {}
        }
    }
    let mut list: Vec<PlacedDeny> = latest.into_values().collect();
    list.sort_by_key(|d| (d.remove_after, d.placed_in));
    list
}

/// Deletes denies whose sessions have all expired, and records each removal.
pub struct DenySweep {
    pub iam: Arc<dyn IamApi>,
    pub ledger: Arc<dyn Ledger>,
    pub ledger_path: PathBuf,
    pub clock: Arc<dyn Clock>,
}

impl DenySweep {
    pub async fn run(self, every: Duration, stop: tokio::sync::watch::Receiver<bool>) {
        let mut ticker = crate::clock::Ticker::new(every, stop);
        while ticker.next().await {
            if let Err(e) = self.sweep().await {
                tracing::warn!(error = %e, "AWS deny sweep failed; retrying next tick");
            }
        }
    }

    /// One pass: how many denies were removed.
    pub async fn sweep(&self) -> Result<usize, LedgerError> {
        let mut reader = crate::ledger::sqlite::LedgerReader::open(&self.ledger_path).await?;
        let events = reader.events_of_kinds(&["revoked", "aws_deny_removed"]).await?;
        let now = unix_secs(self.clock.now());
        let mut removed = 0;
        for deny in outstanding(&events).into_iter().filter(|d| d.remove_after <= now) {
            match tokio::time::timeout(CALL_TIMEOUT, self.iam.delete_role_policy(&deny.role, &deny.policy_name)).await {
                Ok(Ok(existed)) => {
                    let body = json!({
                        "role": deny.role, "policy_name": deny.policy_name, "source_identity": deny.source_identity,
                        "placed_in": deny.placed_in, "remove_after": deny.remove_after, "existed": existed,
                    });
                    self.ledger
                        .record(NewEvent {
                            kind: EventKind::AwsDenyRemoved,
                            at: self.clock.now(),
                            body,
                            credential: None,
                        })
                        .await?;
                    tracing::info!(
                        role = deny.role,
                        policy = deny.policy_name,
                        existed,
                        "AWS deny removed: every session it caught has expired"
                    );
                    removed += 1;
                }
                Ok(Err(e)) => {
                    tracing::warn!(role = deny.role, policy = deny.policy_name, error = %e, "cannot remove the AWS deny yet")
                }
                Err(_) => tracing::warn!(
                    role = deny.role,
                    policy = deny.policy_name,
                    "DeleteRolePolicy did not answer in time"
                ),
            }
        }
        Ok(removed)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::mint::aws::AwsError;

    #[derive(Default)]
    struct FakeIam {
        puts: Mutex<Vec<(String, String, String)>>,
        deletes: Mutex<Vec<(String, String)>>,
        refuse_role: Option<String>,
    }

    impl IamApi for FakeIam {
        fn account(&self) -> BoxFuture<'_, Result<String, AwsError>> {
            Box::pin(async { Ok("111122223333".to_owned()) })
        }
        fn max_session_duration<'a>(&'a self, role: &'a str) -> BoxFuture<'a, Result<Duration, AwsError>> {
            Box::pin(async move {
                if role == "deploy" {
                    Ok(Duration::from_secs(7200))
                } else {
                    Err(AwsError::Timeout { operation: "GetRole" })
                }
            })
        }
        fn put_role_policy<'a>(
            &'a self,
            role: &'a str,
            name: &'a str,
            doc: &'a str,
        ) -> BoxFuture<'a, Result<(), AwsError>> {
            Box::pin(async move {
                if self.refuse_role.as_deref() == Some(role) {
                    return Err(AwsError::Service {
                        operation: "PutRolePolicy",
                        code: "AccessDenied".into(),
                        message: "no".into(),
                    });
                }
                self.puts.lock().unwrap().push((role.into(), name.into(), doc.into()));
                Ok(())
            })
        }
        fn delete_role_policy<'a>(&'a self, role: &'a str, name: &'a str) -> BoxFuture<'a, Result<bool, AwsError>> {
            Box::pin(async move {
                self.deletes.lock().unwrap().push((role.into(), name.into()));
                Ok(true)
            })
        }
    }

    fn session(identity: &str, role: &str, n: u32) -> CredentialRecord {
        CredentialRecord {
            id: format!("c{n}"),
            kind: "aws".into(),
            identity: identity.into(),
            serial: format!("ASIA{n}"),
            fingerprint: format!("arn:aws:sts::111122223333:assumed-role/{role}/s{n}"),
            not_before: 0,
            not_after: 0,
            decision_id: 1,
        }
    }

    #[test]
    fn the_deny_names_the_identity_and_the_revocation_time() {
        let at = SystemTime::UNIX_EPOCH + Duration::from_secs(1_796_000_000);
        let doc: Value = serde_json::from_str(&deny_document("mayfly.local+ci+acme+app", at)).unwrap();
        let s = &doc["Statement"][0];
        assert_eq!(
            (s["Effect"].as_str(), s["Action"].as_str(), s["Resource"].as_str()),
            (Some("Deny"), Some("*"), Some("*"))
        );
        assert_eq!(s["Condition"]["StringEquals"]["aws:SourceIdentity"], "mayfly.local+ci+acme+app");
        assert_eq!(s["Condition"]["DateLessThan"]["aws:TokenIssueTime"], "2026-11-30T00:53:20Z");
    }

    #[tokio::test]
    async fn one_deny_per_role_the_identity_holds_and_failures_are_reported() {
        let iam = Arc::new(FakeIam { refuse_role: Some("locked-down".into()), ..FakeIam::default() });
        let revoker = AwsRevoker::new(iam.clone());
        // Half a second into a second: sessions issued earlier in it must be caught too.
        let at = SystemTime::UNIX_EPOCH + Duration::from_millis(1_795_999_999_500);
        let id = "spiffe://mayfly.local/ci/acme/app";
        let mut x509 = session(id, "deploy", 9);
        x509.kind = "x509".into();
        let mut elsewhere = session(id, "deploy", 5);
        elsewhere.fingerprint = "arn:aws:sts::999999999999:assumed-role/deploy/s5".into();
        let mut unknown = session(id, "deploy", 6);
        unknown.fingerprint = String::new();
        let sessions = [
            session(id, "deploy", 1),
            session(id, "deploy", 2),
            session(id, "read", 3),
            session(id, "locked-down", 4),
            x509,
            elsewhere,
            unknown,
        ];
        let out = revoker.revoke_identity(&sessions, at).await;
        let puts = iam.puts.lock().unwrap().clone();
        let roles: Vec<&str> = puts.iter().map(|(r, _, _)| r.as_str()).collect();
        assert_eq!(roles, vec!["deploy", "read"], "one per role; the refused role is not among them");
        assert!(puts.iter().all(|(_, name, _)| name == "mayfly-revoke-mayfly.local+ci+acme+app"));
        assert_eq!(out["applied"], json!(false), "one role could not be denied: {out}");
        assert!(
            puts[0].2.contains("2026-11-30T00:53:20Z"),
            "the cutoff is rounded up to the next second: {}",
            puts[0].2
        );
        let denies = out["denies"].as_array().unwrap();
        let deploy = denies.iter().find(|d| d["role"] == "deploy").unwrap();
        assert_eq!(deploy["remove_after"], json!(1_796_000_000 + 7200), "the role's own maximum");
        let read = denies.iter().find(|d| d["role"] == "read").unwrap();
        assert_eq!(read["remove_after"], json!(1_796_000_000 + 43_200), "unknown maximum: AWS's longest");
        let refused = denies.iter().find(|d| d["role"] == "locked-down").unwrap();
        assert!(refused["error"].as_str().unwrap().contains("AccessDenied"));
        let foreign = denies.iter().find(|d| d["account"] == "999999999999").unwrap();
        assert_eq!(foreign["applied"], json!(false));
        assert!(
            foreign["error"]
                .as_str()
                .unwrap()
                .contains("account 999999999999 but this broker's IAM credentials are for 111122223333"),
            "{foreign}"
        );
        let unmapped = denies.iter().find(|d| d["credential_id"] == "c6").unwrap();
        assert_eq!(unmapped["applied"], json!(false), "a session whose role is unknown is a failure, not skipped");
    }

    #[tokio::test]
    async fn the_sweep_removes_a_deny_once_the_role_maximum_has_passed_and_records_it_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ledger.db");
        let backend = crate::ledger::sqlite::SqliteBackend::open(&path, Duration::from_secs(5)).await.unwrap();
        let (ledger, _writer) = crate::ledger::GroupCommitLedger::start(backend, 16).await.unwrap();
        let ledger: Arc<dyn Ledger> = Arc::new(ledger);
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_796_000_000);
        let clock = Arc::new(crate::clock::FixedClock::new(t0));
        let iam = Arc::new(FakeIam::default());
        // What a revocation records: the hook's answer inside the `revoked` event.
        let placed = AwsRevoker::new(iam.clone())
            .revoke_identity(&[session("spiffe://mayfly.local/ci/acme/app", "deploy", 1)], t0)
            .await;
        ledger
            .record(NewEvent { kind: EventKind::Revoked, at: t0, body: json!({ "aws": placed }), credential: None })
            .await
            .unwrap();
        let sweep =
            DenySweep { iam: iam.clone(), ledger: ledger.clone(), ledger_path: path.clone(), clock: clock.clone() };

        clock.set(t0 + Duration::from_secs(7199));
        assert_eq!(sweep.sweep().await.unwrap(), 0, "a session issued just before the revocation may still be live");
        clock.set(t0 + Duration::from_secs(7200));
        assert_eq!(sweep.sweep().await.unwrap(), 1);
        assert_eq!(
            iam.deletes.lock().unwrap().clone(),
            vec![("deploy".to_owned(), "mayfly-revoke-mayfly.local+ci+acme+app".to_owned())]
        );
        assert_eq!(sweep.sweep().await.unwrap(), 0, "removed once, and the removal is on record");
        let mut reader = crate::ledger::sqlite::LedgerReader::open(&path).await.unwrap();
        let removed = reader.events_of_kinds(&["aws_deny_removed"]).await.unwrap();
        assert_eq!(removed.len(), 1);
        assert!(removed[0].body.contains("\"existed\":true"), "{}", removed[0].body);
    }

    #[test]
    fn a_deny_is_outstanding_until_the_removal_of_its_latest_placement() {
        let ev = |seq: i64, kind: &str, body: Value| StoredEvent {
            seq,
            at_ms: 0,
            kind: kind.into(),
            body: body.to_string(),
            prev_hash: String::new(),
            hash: String::new(),
        };
        let placed = |after: i64| json!({ "aws": { "denies": [{ "role": "deploy", "policy_name": "p", "source_identity": "s", "remove_after": after, "applied": true }] } });
        let failed = json!({ "aws": { "denies": [{ "role": "read", "policy_name": "p", "remove_after": 5, "applied": false }] } });
        let events = [
            ev(1, "revoked", placed(100)),
            ev(2, "revoked", failed.clone()),
            ev(3, "revoked", placed(200)),
            ev(4, "aws_deny_removed", json!({ "role": "deploy", "policy_name": "p", "placed_in": 1 })),
        ];
        let out = outstanding(&events);
        assert_eq!(out.len(), 1, "a removal of an older placement does not end a newer one: {out:?}");
        assert_eq!((out[0].remove_after, out[0].placed_in), (200, 3));
        let done = [
            ev(1, "revoked", placed(100)),
            ev(2, "aws_deny_removed", json!({ "role": "deploy", "policy_name": "p", "placed_in": 1 })),
        ];
        assert!(outstanding(&done).is_empty());
    }
}
