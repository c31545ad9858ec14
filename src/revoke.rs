//! Revocation and identity locks: which credentials were taken back before they expired,
//! and which identities may get nothing new. The state is rebuilt from the ledger at start
//! (`revoked`, `locked`, `unlocked` events), so it survives restarts; a change wakes every
//! holder (Workload API streams, the CRL publisher) through a watch channel. Also builds
//! the X.509 CRL. Decides no issuance and mints nothing.

use std::collections::HashMap;
use std::sync::RwLock;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::watch;

use crate::clock::unix_secs;
use crate::identity::WorkloadId;
use crate::keys::CertificateAuthority;
use crate::ledger::{BoxFuture, CredentialRecord, StoredEvent};

pub mod aws;

/// A credential taken back, as recorded in a `revoked` event.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Revoked {
    pub credential_id: String,
    pub kind: String,
    pub identity: String,
    /// X.509: the certificate serial (hex); JWT: the jti.
    pub serial: String,
    pub not_after: i64,
    pub revoked_at: i64,
}

/// No new credential for an identity (or every identity under a prefix ending in `/`)
/// until unlocked or `until` (Unix seconds) passes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lock {
    pub target: String,
    pub until: Option<i64>,
    pub reason: String,
    pub operator: Value,
}

impl Lock {
    pub fn covers(&self, identity: &WorkloadId, now: SystemTime) -> bool {
        let live = self.until.is_none_or(|u| unix_secs(now) < u);
        let matches = if self.target.ends_with('/') {
            identity.as_str().starts_with(&self.target)
        } else {
            identity.as_str() == self.target
        };
        live && matches
    }
}

#[derive(Default)]
struct State {
    revoked: HashMap<String, Revoked>,
    locks: HashMap<String, Lock>,
}

pub struct Revocations {
    state: RwLock<State>,
    changed: watch::Sender<u64>,
}

impl Default for Revocations {
    fn default() -> Self {
        Self { state: RwLock::new(State::default()), changed: watch::Sender::new(0) }
    }
}

impl std::fmt::Debug for Revocations {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = self.read();
        f.debug_struct("Revocations").field("revoked", &s.revoked.len()).field("locks", &s.locks.len()).finish()
    }
}

impl Revocations {
    /// Rebuilds the state from the ledger's `revoked`, `locked` and `unlocked` events, in order.
    pub fn from_events(events: &[StoredEvent]) -> Self {
        let me = Self::default();
        {
            let mut s = me.write();
            for e in events {
                let Ok(body) = serde_json::from_str::<Value>(&e.body) else { continue };
                match e.kind.as_str() {
                    "revoked" => {
                        for r in body.get("credentials").and_then(Value::as_array).into_iter().flatten() {
                            if let Ok(r) = serde_json::from_value::<Revoked>(r.clone()) {
                                s.revoked.insert(r.credential_id.clone(), r);
                            }
                        }
                    }
                    "locked" => {
                        if let Some(lock) =
                            body.get("lock").and_then(|l| serde_json::from_value::<Lock>(l.clone()).ok())
                        {
                            s.locks.insert(lock.target.clone(), lock);
                        }
                    }
                    "unlocked" => {
                        if let Some(target) = body.get("target").and_then(Value::as_str) {
                            s.locks.remove(target);
                        }
                    }
                    _ => {}
                }
            }
        }
        me
    }

    /// Wakes on every revocation, lock and unlock.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    pub fn is_revoked(&self, credential_id: &str) -> bool {
        self.read().revoked.contains_key(credential_id)
    }

    /// The lock that keeps `identity` from getting a new credential now, if any.
    pub fn lock_for(&self, identity: &WorkloadId, now: SystemTime) -> Option<Lock> {
        self.read().locks.values().find(|l| l.covers(identity, now)).cloned()
    }

    pub fn apply_revoked(&self, revoked: &[Revoked]) {
        {
            let mut s = self.write();
            for r in revoked {
                s.revoked.insert(r.credential_id.clone(), r.clone());
            }
        }
        self.changed.send_modify(|n| *n += 1);
    }

    /// The lock set on exactly this target (identity or prefix), live or not.
    pub fn lock_for_target(&self, target: &str) -> Option<Lock> {
        self.read().locks.get(target).cloned()
    }

    pub fn apply_lock(&self, lock: Lock) {
        self.write().locks.insert(lock.target.clone(), lock);
        self.changed.send_modify(|n| *n += 1);
    }

    /// True when there was such a lock.
    pub fn apply_unlock(&self, target: &str) -> bool {
        let was = self.write().locks.remove(target).is_some();
        self.changed.send_modify(|n| *n += 1);
        was
    }

    /// Revoked X.509 serials still worth listing (not yet expired), with revocation times.
    pub fn revoked_x509(&self, now: SystemTime) -> Vec<(String, i64)> {
        let now = unix_secs(now);
        let mut list: Vec<(String, i64)> = self
            .read()
            .revoked
            .values()
            .filter(|r| r.kind == "x509" && r.not_after > now)
            .map(|r| (r.serial.clone(), r.revoked_at))
            .collect();
        list.sort();
        list
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, State> {
        // Why: the maps are only ever replaced entry by entry; a panic elsewhere cannot leave
        // them half-written, so a poisoned lock is still consistent.
        self.state.read().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RevokeError {
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    NotFound(String),
    #[error("the ledger cannot be read or written: {0}")]
    Ledger(String),
}

/// What to take back.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// A credential id (for a JWT also its jti).
    Credential(String),
    /// An X.509 serial, hex.
    Serial(String),
    /// A SPIFFE ID, or a prefix ending in `/`: revokes and locks.
    Identity(String),
    /// `key=value` against what the issuing decision recorded about the caller, e.g.
    /// `repository=acme/app`, `ref=refs/heads/main`, `sha=…` (CI) or `uid=1001`, `exe=/usr/bin/x` (local).
    Selector { key: String, value: String },
    /// Everything issued under one policy release.
    Bundle(String),
}

/// Selector keys a revocation can match, and where each lives in a decision's `caller`.
pub const SELECTOR_KEYS: [&str; 14] = [
    "repository",
    "ref",
    "sha",
    "workflow",
    "run_id",
    "environment",
    "event_name",
    "issuer",
    "subject",
    "uid",
    "gid",
    "exe",
    "sha256",
    "container",
];

impl Target {
    pub fn describe(&self) -> String {
        match self {
            Target::Credential(id) => format!("credential {id}"),
            Target::Serial(s) => format!("serial {s}"),
            Target::Identity(id) => format!("identity {id}"),
            Target::Selector { key, value } => format!("selector {key}={value}"),
            Target::Bundle(v) => format!("policy release {v}"),
        }
    }
}

/// Cutting AWS sessions short: on each role that the identity's live `sessions` are of,
/// deny every session of that identity issued before `before` (`aws::AwsRevoker`). The
/// answer is recorded with the revocation.
pub trait AwsRevocation: Send + Sync + 'static {
    fn revoke_identity<'a>(&'a self, sessions: &'a [CredentialRecord], before: SystemTime) -> BoxFuture<'a, Value>;
}

/// A daemon without `[aws]`: it cannot reach IAM, so it can only say so.
pub struct NoAws;

impl AwsRevocation for NoAws {
    fn revoke_identity<'a>(&'a self, sessions: &'a [CredentialRecord], _before: SystemTime) -> BoxFuture<'a, Value> {
        let live = sessions.iter().filter(|s| s.kind == "aws").count();
        Box::pin(async move {
            if live == 0 {
                return serde_json::json!({ "needed": false, "denies": [] });
            }
            tracing::error!(live, "AWS sessions on record, but [aws] is not configured: they cannot be denied");
            serde_json::json!({ "needed": true, "applied": false, "why": "AWS is not configured on this daemon ([aws]): its live sessions cannot be denied", "live_sessions": live })
        })
    }
}

/// A credential found for a revocation or a listing.
#[derive(Clone, Debug, Serialize)]
pub struct Found {
    pub credential: crate::ledger::CredentialRecord,
    pub policy_version: String,
    pub revoked: bool,
}

#[derive(Debug)]
pub struct RevokeOutcome {
    pub found: Vec<Found>,
    pub lock: Option<Lock>,
    /// False when the ledger could not record it: applied in memory only, lost at restart.
    pub durable: bool,
    pub event_id: Option<crate::ledger::EventId>,
    /// What the AWS hook did (or why it did nothing), as recorded.
    pub aws: Option<Value>,
}

/// Where responders' calls are carried out: finds credentials in the ledger, records the
/// revocation or lock (durable first), then applies it. A revocation that cannot be
/// recorded is still applied in memory (it never weakens anything) and reported as such.
pub struct Desk {
    pub ledger: std::sync::Arc<dyn crate::ledger::Ledger>,
    pub ledger_path: std::path::PathBuf,
    pub revocations: std::sync::Arc<Revocations>,
    pub policy: std::sync::Arc<crate::policy::store::PolicyStore>,
    pub clock: std::sync::Arc<dyn crate::clock::Clock>,
    pub trust_domain: crate::identity::TrustDomain,
    pub aws: std::sync::Arc<dyn AwsRevocation>,
}

pub fn check_reason(reason: &str) -> Result<&str, RevokeError> {
    let reason = reason.trim();
    if reason.is_empty() || reason.len() > 1000 || reason.chars().any(|c| c.is_control() && c != '\n') {
        return Err(RevokeError::Invalid("reason: required, one paragraph of at most 1000 characters".into()));
    }
    Ok(reason)
}

impl Desk {
    /// Finds the active credentials `target` names (and, for an identity, checks it exists).
    pub async fn find(&self, target: &Target, all: bool) -> Result<Vec<Found>, RevokeError> {
        let ledger_err = |e: crate::ledger::LedgerError| RevokeError::Ledger(e.to_string());
        let mut reader = crate::ledger::sqlite::LedgerReader::open(&self.ledger_path).await.map_err(ledger_err)?;
        let now = unix_secs(self.clock.now());
        if let Target::Identity(id) = target {
            self.check_identity_target(id, all)?;
        }
        let active = reader.active(now).await.map_err(ledger_err)?;
        let decision_ids: Vec<i64> = active.iter().map(|c| c.decision_id).collect();
        let bodies = reader.bodies(&decision_ids).await.map_err(ledger_err)?;
        let decision = |c: &crate::ledger::CredentialRecord| -> Value {
            bodies.get(&c.decision_id).and_then(|b| serde_json::from_str(b).ok()).unwrap_or(Value::Null)
        };
        let mut found = Vec::new();
        for c in active {
            let d = decision(&c);
            let version = d.get("policy_version").and_then(Value::as_str).unwrap_or_default().to_owned();
            let hit = match target {
                Target::Credential(id) => &c.id == id,
                Target::Serial(serial) => {
                    c.kind == "x509" && c.serial.eq_ignore_ascii_case(serial.trim_start_matches("0x"))
                }
                Target::Identity(id) if id.ends_with('/') => c.identity.starts_with(id.as_str()),
                Target::Identity(id) => &c.identity == id,
                Target::Selector { key, value } => caller_field(&d, key).is_some_and(|v| &v == value),
                Target::Bundle(v) => version == *v || version.strip_prefix("sha256:") == Some(v.as_str()),
            };
            if hit {
                let revoked = self.revocations.is_revoked(&c.id);
                found.push(Found { credential: c, policy_version: version, revoked });
            }
        }
        if found.is_empty() {
            match target {
                Target::Credential(_) | Target::Serial(_) | Target::Selector { .. } | Target::Bundle(_) => {
                    return Err(RevokeError::NotFound(format!(
                        "no active credential matches {} (unknown, or already expired)",
                        target.describe()
                    )));
                }
                Target::Identity(_) => {}
            }
        }
        Ok(found)
    }

    fn check_identity_target(&self, id: &str, all: bool) -> Result<(), RevokeError> {
        let root = format!("spiffe://{}/", self.trust_domain);
        if id.ends_with('/') {
            if !id.starts_with(&root) {
                return Err(RevokeError::Invalid(format!("identity prefix `{id}` is not inside `{root}`")));
            }
            if id == root && !all {
                return Err(RevokeError::Invalid(format!("`{id}` matches every identity; add --all if that is meant")));
            }
            return Ok(());
        }
        let parsed = WorkloadId::parse(id).map_err(|e| RevokeError::Invalid(format!("identity: {e}")))?;
        let known =
            self.policy.current().inventory.entries().iter().any(|e| e.id == parsed) || id.contains("/dev/oidc/");
        if !known {
            return Err(RevokeError::NotFound(format!("identity `{id}` is not in the inventory")));
        }
        Ok(())
    }

    pub async fn revoke(
        &self,
        target: Target,
        reason: &str,
        dry_run: bool,
        all: bool,
        lock_ttl: Option<Duration>,
        operator: Value,
    ) -> Result<RevokeOutcome, RevokeError> {
        let reason = check_reason(reason)?;
        let found = self.find(&target, all).await?;
        let now = self.clock.now();
        let lock = match &target {
            Target::Identity(id) => Some(Lock {
                target: id.clone(),
                until: lock_ttl.map(|t| unix_secs(now + t)),
                reason: reason.to_owned(),
                operator: operator.clone(),
            }),
            _ => None,
        };
        if dry_run {
            let body = serde_json::json!({ "call": "revoke", "dry_run": true, "target": target.describe(), "operator": operator, "reason": reason, "would_revoke": found.iter().filter(|f| !f.revoked).count() });
            let event_id = self.record(crate::ledger::EventKind::Admin, body).await.ok();
            return Ok(RevokeOutcome { found, lock, durable: event_id.is_some(), event_id, aws: None });
        }
        let list: Vec<Revoked> = found
            .iter()
            .filter(|f| !f.revoked)
            .map(|f| Revoked {
                credential_id: f.credential.id.clone(),
                kind: f.credential.kind.clone(),
                identity: f.credential.identity.clone(),
                serial: f.credential.serial.clone(),
                not_after: f.credential.not_after,
                revoked_at: unix_secs(now),
            })
            .collect();
        let sessions: Vec<CredentialRecord> =
            found.iter().filter(|f| f.credential.kind == "aws").map(|f| f.credential.clone()).collect();
        // Why the lock first, in memory: the AWS denies take seconds per role, and no new
        // session may be handed out meanwhile (issuance re-checks the lock after STS).
        if let (Some(lock), false) = (&lock, dry_run) {
            self.revocations.apply_lock(lock.clone());
        }
        let aws = match &target {
            Target::Identity(_) if !dry_run => Some(self.aws.revoke_identity(&sessions, now).await),
            _ if !sessions.is_empty() => Some(serde_json::json!({
                "applied": false,
                "why": "an AWS session cannot be recalled alone: revoke its identity to deny all of that identity's sessions",
            })),
            _ => None,
        };
        let body = serde_json::json!({ "target": target.describe(), "operator": operator, "reason": reason, "credentials": list, "aws": aws.clone() });
        let recorded = self.record(crate::ledger::EventKind::Revoked, body).await;
        let mut durable = recorded.is_ok();
        if let Some(lock) = &lock {
            let locked = self.record(crate::ledger::EventKind::Locked, serde_json::json!({ "lock": lock })).await;
            durable &= locked.is_ok();
        }
        // Why apply even when not recorded: a revocation only ever takes away; during an
        // incident it must hold now. The caller is told it is not durable.
        self.revocations.apply_revoked(&list);
        if let Some(lock) = &lock {
            self.revocations.apply_lock(lock.clone());
        }
        tracing::warn!(target = %target.describe(), revoked = list.len(), locked = lock.is_some(), durable, reason, "revocation applied");
        let mut found = found;
        for f in &mut found {
            f.revoked = true;
        }
        Ok(RevokeOutcome { found, lock, durable, event_id: recorded.ok(), aws })
    }

    pub async fn lock(
        &self,
        target: &str,
        reason: &str,
        ttl: Option<Duration>,
        operator: Value,
    ) -> Result<(Lock, bool), RevokeError> {
        let reason = check_reason(reason)?;
        self.check_identity_target(target, false)?;
        let now = self.clock.now();
        let lock = Lock {
            target: target.to_owned(),
            until: ttl.map(|t| unix_secs(now + t)),
            reason: reason.to_owned(),
            operator,
        };
        let durable = self.record(crate::ledger::EventKind::Locked, serde_json::json!({ "lock": lock })).await.is_ok();
        self.revocations.apply_lock(lock.clone());
        Ok((lock, durable))
    }

    pub async fn unlock(&self, target: &str, reason: &str, operator: Value) -> Result<bool, RevokeError> {
        let reason = check_reason(reason)?;
        if self.revocations.lock_for_target(target).is_none() {
            return Err(RevokeError::NotFound(format!("`{target}` is not locked")));
        }
        // Why recorded first here: an unlock gives access back, so it happens only if durable.
        self.record(
            crate::ledger::EventKind::Unlocked,
            serde_json::json!({ "target": target, "operator": operator, "reason": reason }),
        )
        .await
        .map_err(|e| RevokeError::Ledger(e.to_string()))?;
        Ok(self.revocations.apply_unlock(target))
    }

    /// Credentials on record for an identity (exact or prefix ending in `/`; `None`: all),
    /// newest first, with the release each was decided under.
    pub async fn list(&self, identity: Option<&str>, active_only: bool) -> Result<Vec<Found>, RevokeError> {
        let ledger_err = |e: crate::ledger::LedgerError| RevokeError::Ledger(e.to_string());
        let mut reader = crate::ledger::sqlite::LedgerReader::open(&self.ledger_path).await.map_err(ledger_err)?;
        let now = unix_secs(self.clock.now());
        let rows = if active_only {
            reader.active(now).await.map_err(ledger_err)?
        } else {
            reader.credentials().await.map_err(ledger_err)?.into_iter().map(|(_, c)| c).collect()
        };
        let rows: Vec<_> = rows
            .into_iter()
            .filter(|c| match identity {
                None => true,
                Some(p) if p.ends_with('/') => c.identity.starts_with(p),
                Some(id) => c.identity == id,
            })
            .collect();
        let bodies =
            reader.bodies(&rows.iter().map(|c| c.decision_id).collect::<Vec<_>>()).await.map_err(ledger_err)?;
        let mut found: Vec<Found> = rows
            .into_iter()
            .map(|c| {
                let version = bodies
                    .get(&c.decision_id)
                    .and_then(|b| serde_json::from_str::<Value>(b).ok())
                    .and_then(|d| d.get("policy_version").and_then(Value::as_str).map(str::to_owned))
                    .unwrap_or_default();
                let revoked = self.revocations.is_revoked(&c.id);
                Found { credential: c, policy_version: version, revoked }
            })
            .collect();
        found.reverse();
        Ok(found)
    }

    /// Records an admin call (or a refused one) that changes nothing else.
    pub async fn record_admin(&self, body: Value) -> Result<crate::ledger::EventId, RevokeError> {
        self.record(crate::ledger::EventKind::Admin, body).await.map_err(|e| RevokeError::Ledger(e.to_string()))
    }

    /// Any other responder-side event (a policy check's report).
    pub async fn record_event(
        &self,
        kind: crate::ledger::EventKind,
        body: Value,
    ) -> Result<crate::ledger::EventId, RevokeError> {
        self.record(kind, body).await.map_err(|e| RevokeError::Ledger(e.to_string()))
    }

    async fn record(
        &self,
        kind: crate::ledger::EventKind,
        body: Value,
    ) -> Result<crate::ledger::EventId, crate::ledger::LedgerError> {
        self.ledger.record(crate::ledger::NewEvent { kind, at: self.clock.now(), body, credential: None }).await
    }
}

/// A field of what the issuing decision recorded about its caller.
fn caller_field(decision: &Value, key: &str) -> Option<String> {
    let caller = decision.get("caller")?;
    let v = caller.get("oidc").and_then(|o| o.get(key)).or_else(|| caller.get(key))?;
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// How long a CRL is valid; it is re-signed on every change and well before this passes.
pub const CRL_VALIDITY: Duration = Duration::from_secs(24 * 3600);

/// A DER CRL signed by `ca` listing `entries` (hex serial, revocation time).
pub fn build_crl(
    ca: &CertificateAuthority,
    entries: &[(String, i64)],
    now: SystemTime,
    number: u64,
) -> Result<Vec<u8>, String> {
    let at = |secs: i64| time::OffsetDateTime::from_unix_timestamp(secs).map_err(|e| e.to_string());
    let revoked_certs = entries
        .iter()
        .map(|(serial, when)| {
            let bytes = hex::decode(serial).map_err(|e| format!("serial `{serial}`: {e}"))?;
            Ok(rcgen::RevokedCertParams {
                serial_number: rcgen::SerialNumber::from_slice(&bytes),
                revocation_time: at(*when)?,
                reason_code: Some(rcgen::RevocationReason::Superseded),
                invalidity_date: None,
            })
        })
        .collect::<Result<Vec<_>, String>>()?;
    let now_secs = unix_secs(now);
    let params = rcgen::CertificateRevocationListParams {
        this_update: at(now_secs)?,
        next_update: at(now_secs + i64::try_from(CRL_VALIDITY.as_secs()).unwrap_or(86_400))?,
        crl_number: rcgen::SerialNumber::from_slice(&number.to_be_bytes()),
        issuing_distribution_point: None,
        revoked_certs,
        key_identifier_method: rcgen::KeyIdMethod::Sha256,
    };
    params.signed_by(ca.issuer()).map(|crl| crl.der().to_vec()).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::TrustDomain;

    fn event(seq: i64, kind: &str, body: Value) -> StoredEvent {
        StoredEvent {
            seq,
            at_ms: 0,
            kind: kind.into(),
            body: body.to_string(),
            prev_hash: String::new(),
            hash: String::new(),
        }
    }

    #[test]
    fn state_is_rebuilt_from_the_ledger_in_order() {
        let r = Revoked {
            credential_id: "c1".into(),
            kind: "x509".into(),
            identity: "spiffe://td/a".into(),
            serial: "40aa".into(),
            not_after: 2_000_000_000,
            revoked_at: 1_000,
        };
        let lock = |target: &str| serde_json::json!({ "lock": { "target": target, "until": null, "reason": "INC-1", "operator": {"uid": 0} } });
        let events = vec![
            event(1, "revoked", serde_json::json!({ "credentials": [r] })),
            event(2, "locked", lock("spiffe://td/a")),
            event(3, "locked", lock("spiffe://td/ci/")),
            event(4, "unlocked", serde_json::json!({ "target": "spiffe://td/a" })),
        ];
        let s = Revocations::from_events(&events);
        assert!(s.is_revoked("c1") && !s.is_revoked("c2"));
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_500_000_000);
        assert!(s.lock_for(&WorkloadId::parse("spiffe://td/a").unwrap(), now).is_none(), "unlocked later");
        assert!(s.lock_for(&WorkloadId::parse("spiffe://td/ci/acme/app").unwrap(), now).is_some(), "prefix lock");
        assert!(s.lock_for(&WorkloadId::parse("spiffe://td/cidr").unwrap(), now).is_none(), "a prefix ends at a /");
        assert_eq!(s.revoked_x509(now), vec![("40aa".to_owned(), 1_000)]);
    }

    #[test]
    fn a_lock_with_an_expiry_ends_by_itself() {
        let lock =
            Lock { target: "spiffe://td/a".into(), until: Some(2_000), reason: "x".into(), operator: Value::Null };
        let id = WorkloadId::parse("spiffe://td/a").unwrap();
        assert!(lock.covers(&id, SystemTime::UNIX_EPOCH + Duration::from_secs(1_999)));
        assert!(!lock.covers(&id, SystemTime::UNIX_EPOCH + Duration::from_secs(2_000)));
    }

    #[test]
    fn the_crl_lists_the_serials_and_is_signed_by_the_ca() {
        let now = SystemTime::now();
        let ca = CertificateAuthority::generate(
            &TrustDomain::parse("td").unwrap(),
            now - Duration::from_secs(60),
            Duration::from_secs(86_400),
        )
        .unwrap();
        let der =
            build_crl(&ca, &[("4000aa".into(), unix_secs(now)), ("7f01".into(), unix_secs(now))], now, 7).unwrap();
        let (_, crl) = x509_parser::parse_x509_crl(&der).unwrap();
        let serials: Vec<String> = crl.iter_revoked_certificates().map(|r| hex::encode(r.raw_serial())).collect();
        assert_eq!(serials, vec!["4000aa", "7f01"]);
        let (_, ca_cert) = x509_parser::parse_x509_certificate(ca.cert_der()).unwrap();
        crl.verify_signature(ca_cert.public_key()).unwrap();
    }
}
