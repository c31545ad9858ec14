//! Revoking AWS sessions by identity. STS sessions cannot be recalled, so for each role an
//! identity holds a live session of, mayfly puts an inline policy on the role that denies
//! everything to sessions whose `aws:SourceIdentity` is that identity and whose
//! `aws:TokenIssueTime` is before the revocation (IAM `PutRolePolicy`). Sessions issued
//! later (after the identity is unlocked) are unaffected. Each deny is recorded with the
//! revocation; once the role's maximum session duration has passed every session it could
//! catch has expired, and the sweep deletes it and records that too.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde_json::json;

use super::AwsRevocation;
use crate::aws::IamApi;
use crate::clock::{Clock, unix_secs};
use crate::identity::WorkloadId;
use crate::ledger::event::{AwsDeny, AwsDenyRemoved, AwsRevocation as AwsAnswer, Event, EventKind};
use crate::ledger::{BoxFuture, CredentialRecord, EventFilter, EventId, Ledger, LedgerError, LedgerRead};
use crate::mint::aws::source_identity;

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
    fn revoke_identity<'a>(&'a self, sessions: &'a [CredentialRecord], before: SystemTime) -> BoxFuture<'a, AwsAnswer> {
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
                    _ => denies.push(AwsDeny {
                        credential_id: Some(s.id.clone()),
                        applied: false,
                        error: Some(format!(
                            "cannot tell the role of session `{}` from `{}`: deny it by hand",
                            s.serial, s.fingerprint
                        )),
                        ..AwsDeny::default()
                    }),
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
                denies.push(AwsDeny {
                    credential_id: None,
                    role: Some(role),
                    account: Some(account),
                    policy_name: Some(name),
                    source_identity: Some(source),
                    issued_before: Some(unix_secs(before)),
                    remove_after: Some(unix_secs(before + max)),
                    document: serde_json::from_str(&document).ok(),
                    applied: error.is_none(),
                    error,
                });
            }
            if denies.is_empty() {
                return AwsAnswer {
                    why: Some("no live AWS session of this identity on record".into()),
                    ..AwsAnswer::default()
                };
            }
            let applied = denies.iter().all(|d| d.applied);
            AwsAnswer { needed: true, applied: Some(applied), denies, ..AwsAnswer::default() }
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
    /// The `revoked` event that placed it (the latest one, for a policy placed again): its
    /// chain and sequence number.
    pub placed_in_chain: String,
    pub placed_in: i64,
}

/// From `revoked` and `aws_deny_removed` events in order: every applied deny whose latest
/// placement has no removal after it.
pub fn outstanding(events: &[(String, EventId, Event)]) -> Vec<PlacedDeny> {
    let mut latest: HashMap<(String, String), PlacedDeny> = HashMap::new();
    for (chain, seq, e) in events {
        match e {
            Event::Revoked(r) => {
                for d in r.aws.iter().flat_map(|a| &a.denies).filter(|d| d.applied) {
                    let deny = PlacedDeny {
                        role: d.role.clone().unwrap_or_default(),
                        policy_name: d.policy_name.clone().unwrap_or_default(),
                        source_identity: d.source_identity.clone().unwrap_or_default(),
                        remove_after: d.remove_after.unwrap_or(i64::MAX),
                        placed_in_chain: chain.clone(),
                        placed_in: *seq,
                    };
                    latest.insert((deny.role.clone(), deny.policy_name.clone()), deny);
                }
            }
            Event::AwsDenyRemoved(removed) => {
                let key = (removed.role.clone(), removed.policy_name.clone());
                let placed_by = removed.placed_in_chain.as_deref().unwrap_or_default();
                if latest.get(&key).is_some_and(|d| removed.placed_in == d.placed_in && placed_by == d.placed_in_chain)
                {
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
    pub reader: Arc<dyn LedgerRead>,
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
        let filter = EventFilter::kinds(&[EventKind::Revoked, EventKind::AwsDenyRemoved]);
        let events: Vec<(String, EventId, Event)> = crate::ledger::read_typed(self.reader.as_ref(), filter)
            .await?
            .into_iter()
            .map(|(row, e)| (row.chain, row.seq, e))
            .collect();
        let now = unix_secs(self.clock.now());
        let mut removed = 0;
        for deny in outstanding(&events).into_iter().filter(|d| d.remove_after <= now) {
            match tokio::time::timeout(CALL_TIMEOUT, self.iam.delete_role_policy(&deny.role, &deny.policy_name)).await {
                Ok(Ok(existed)) => {
                    let record = AwsDenyRemoved {
                        role: deny.role.clone(),
                        policy_name: deny.policy_name.clone(),
                        source_identity: Some(deny.source_identity.clone()),
                        placed_in_chain: Some(deny.placed_in_chain.clone()).filter(|c| !c.is_empty()),
                        placed_in: deny.placed_in,
                        remove_after: Some(deny.remove_after),
                        existed,
                    };
                    self.ledger.record(self.clock.now(), Event::AwsDenyRemoved(record)).await?;
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

    use serde_json::Value;

    use super::*;
    use crate::aws::AwsError;

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
            break_glass: false,
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
        assert_eq!(out.applied, Some(false), "one role could not be denied: {out:?}");
        assert!(
            puts[0].2.contains("2026-11-30T00:53:20Z"),
            "the cutoff is rounded up to the next second: {}",
            puts[0].2
        );
        let role = |name: &str| out.denies.iter().find(|d| d.role.as_deref() == Some(name)).unwrap();
        assert_eq!(role("deploy").remove_after, Some(1_796_000_000 + 7200), "the role's own maximum");
        assert_eq!(role("read").remove_after, Some(1_796_000_000 + 43_200), "unknown maximum: AWS's longest");
        assert!(role("locked-down").error.as_deref().unwrap().contains("AccessDenied"));
        let foreign = out.denies.iter().find(|d| d.account.as_deref() == Some("999999999999")).unwrap();
        assert!(!foreign.applied);
        assert!(
            foreign
                .error
                .as_deref()
                .unwrap()
                .contains("account 999999999999 but this broker's IAM credentials are for 111122223333"),
            "{foreign:?}"
        );
        let unmapped = out.denies.iter().find(|d| d.credential_id.as_deref() == Some("c6")).unwrap();
        assert!(!unmapped.applied, "a session whose role is unknown is a failure, not skipped");
    }

    #[tokio::test]
    async fn the_sweep_removes_a_deny_once_the_role_maximum_has_passed_and_records_it_once() {
        let dir = tempfile::tempdir().unwrap();
        let settings = crate::ledger::Settings {
            max_batch: 16,
            ..crate::ledger::Settings::local(crate::ledger::Location::in_data_dir(dir.path()))
        };
        let opened = crate::ledger::open(&settings).await.unwrap();
        let (ledger, reader): (Arc<dyn Ledger>, _) = (Arc::new(opened.writer), opened.reader);
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_796_000_000);
        let clock = Arc::new(crate::clock::FixedClock::new(t0));
        let iam = Arc::new(FakeIam::default());
        // What a revocation records: the hook's answer inside the `revoked` event.
        let placed = AwsRevoker::new(iam.clone())
            .revoke_identity(&[session("spiffe://mayfly.local/ci/acme/app", "deploy", 1)], t0)
            .await;
        let revoked = crate::ledger::event::Revoked { aws: Some(placed), ..Default::default() };
        ledger.record(t0, Event::Revoked(revoked)).await.unwrap();
        let sweep =
            DenySweep { iam: iam.clone(), ledger: ledger.clone(), reader: reader.clone(), clock: clock.clone() };

        clock.set(t0 + Duration::from_secs(7199));
        assert_eq!(sweep.sweep().await.unwrap(), 0, "a session issued just before the revocation may still be live");
        clock.set(t0 + Duration::from_secs(7200));
        assert_eq!(sweep.sweep().await.unwrap(), 1);
        assert_eq!(
            iam.deletes.lock().unwrap().clone(),
            vec![("deploy".to_owned(), "mayfly-revoke-mayfly.local+ci+acme+app".to_owned())]
        );
        assert_eq!(sweep.sweep().await.unwrap(), 0, "removed once, and the removal is on record");
        let removed = reader.events(EventFilter::kinds(&[EventKind::AwsDenyRemoved])).await.unwrap();
        assert_eq!(removed.len(), 1);
        assert!(matches!(removed[0].event().unwrap(), Event::AwsDenyRemoved(r) if r.existed && r.placed_in == 1));
    }

    #[test]
    fn a_deny_is_outstanding_until_the_removal_of_its_latest_placement() {
        let deny = |role: &str, after: i64, applied: bool| AwsDeny {
            role: Some(role.into()),
            policy_name: Some("p".into()),
            source_identity: Some("s".into()),
            remove_after: Some(after),
            applied,
            ..AwsDeny::default()
        };
        let revoked = |d: AwsDeny| {
            Event::Revoked(crate::ledger::event::Revoked {
                aws: Some(AwsAnswer { needed: true, denies: vec![d], ..AwsAnswer::default() }),
                ..Default::default()
            })
        };
        let removed = |placed_in| {
            Event::AwsDenyRemoved(AwsDenyRemoved {
                role: "deploy".into(),
                policy_name: "p".into(),
                placed_in,
                ..Default::default()
            })
        };
        let events = [
            (String::new(), 1, revoked(deny("deploy", 100, true))),
            (String::new(), 2, revoked(deny("read", 5, false))),
            (String::new(), 3, revoked(deny("deploy", 200, true))),
            (String::new(), 4, removed(1)),
        ];
        let out = outstanding(&events);
        assert_eq!(out.len(), 1, "a removal of an older placement does not end a newer one: {out:?}");
        assert_eq!((out[0].remove_after, out[0].placed_in), (200, 3));
        let done = [(String::new(), 1, revoked(deny("deploy", 100, true))), (String::new(), 2, removed(1))];
        assert!(outstanding(&done).is_empty());
    }
}
