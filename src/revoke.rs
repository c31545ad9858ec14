//! Revocation and identity locks: which credentials were taken back before they expired,
//! and which identities may get nothing new. The state is rebuilt from the ledger at start
//! (`revoked`, `locked`, `unlocked` events), so it survives restarts; a change wakes every
//! holder (Workload API streams, the CRL publisher) through a watch channel. Also builds
//! the X.509 CRL. Decides no issuance and mints nothing.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use tokio::sync::watch;

use crate::clock::{Clock, unix_secs};
use crate::identity::{TrustDomain, WorkloadId};
use crate::ledger::event::{self, AwsRevocation as AwsAnswer, Event, EventKind, Operator};
use crate::ledger::{
    BoxFuture, CredentialFilter, CredentialRecord, EventFilter, EventId, Ledger, LedgerError, LedgerRead,
};
use crate::policy::store::PolicyStore;

pub mod aws;
pub mod expiry;
pub mod publish;

pub use crate::ledger::event::{Lock, RevokedCredential as Revoked};

/// Whether a lock keeps `identity` from getting a new credential at `now`.
pub fn lock_covers(lock: &Lock, identity: &WorkloadId, now: SystemTime) -> bool {
    let live = lock.until.is_none_or(|u| unix_secs(now) < u);
    let matches = if lock.target.ends_with('/') {
        identity.as_str().starts_with(&lock.target)
    } else {
        identity.as_str() == lock.target
    };
    live && matches
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
    /// The kinds of event the state is rebuilt from.
    pub const KINDS: [EventKind; 3] = [EventKind::Revoked, EventKind::Locked, EventKind::Unlocked];

    /// Rebuilds the state from the ledger's `revoked`, `locked` and `unlocked` events, in
    /// order. An event that does not decode stops start-up (`LedgerError::Decode`) rather
    /// than forget a lock.
    pub async fn load(reader: &dyn LedgerRead) -> Result<Self, LedgerError> {
        let events = crate::ledger::read_typed(reader, EventFilter::kinds(&Self::KINDS)).await?;
        Ok(Self::from_events(events.into_iter().map(|(_, e)| e)))
    }

    pub fn from_events(events: impl IntoIterator<Item = Event>) -> Self {
        let me = Self::default();
        {
            let mut s = me.write();
            for e in events {
                match e {
                    Event::Revoked(r) => {
                        for c in r.credentials {
                            s.revoked.insert(c.credential_id.clone(), c);
                        }
                    }
                    Event::Locked(l) => {
                        s.locks.insert(l.lock.target.clone(), l.lock);
                    }
                    Event::Unlocked(u) => {
                        s.locks.remove(&u.target);
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
        self.read().locks.values().find(|l| lock_covers(l, identity, now)).cloned()
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

    /// How many locks are in force at `now`.
    pub fn live_locks(&self, now: SystemTime) -> usize {
        let now = unix_secs(now);
        self.read().locks.values().filter(|l| l.until.is_none_or(|u| now < u)).count()
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
    fn revoke_identity<'a>(&'a self, sessions: &'a [CredentialRecord], before: SystemTime) -> BoxFuture<'a, AwsAnswer>;
}

/// A daemon without `[aws]`: it cannot reach IAM, so it can only say so.
pub struct NoAws;

impl AwsRevocation for NoAws {
    fn revoke_identity<'a>(
        &'a self,
        sessions: &'a [CredentialRecord],
        _before: SystemTime,
    ) -> BoxFuture<'a, AwsAnswer> {
        let live = sessions.iter().filter(|s| s.kind == "aws").count();
        Box::pin(async move {
            if live == 0 {
                return AwsAnswer::default();
            }
            tracing::error!(live, "AWS sessions on record, but [aws] is not configured: they cannot be denied");
            AwsAnswer {
                needed: true,
                applied: Some(false),
                why: Some("AWS is not configured on this daemon ([aws]): its live sessions cannot be denied".into()),
                live_sessions: u64::try_from(live).ok(),
                ..AwsAnswer::default()
            }
        })
    }
}

/// A credential found for a revocation or a listing.
#[derive(Clone, Debug)]
pub struct Found {
    pub credential: CredentialRecord,
    pub policy_version: String,
    pub revoked: bool,
}

#[derive(Debug)]
pub struct RevokeOutcome {
    /// What the target matched; `revoked` says whether each was revoked before this call.
    pub found: Vec<Found>,
    /// The identity was already locked (by exactly this target) before this call.
    pub already_locked: bool,
    pub lock: Option<Lock>,
    /// False when the ledger could not record it: applied in memory only, lost at restart.
    pub durable: bool,
    pub event_id: Option<EventId>,
    /// What the AWS hook did (or why it did nothing), as recorded.
    pub aws: Option<AwsAnswer>,
}

/// Where responders' calls are carried out: finds credentials in the ledger, records the
/// revocation or lock (durable first), then applies it. A revocation that cannot be
/// recorded is still applied in memory (it never weakens anything) and reported as such.
pub struct Desk {
    pub ledger: Arc<dyn Ledger>,
    pub reader: Arc<dyn LedgerRead>,
    pub revocations: Arc<Revocations>,
    pub policy: Arc<PolicyStore>,
    pub clock: Arc<dyn Clock>,
    pub trust_domain: TrustDomain,
    pub aws: Arc<dyn AwsRevocation>,
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
        if let Target::Identity(id) = target {
            self.check_identity_target(id, all)?;
        }
        let now = unix_secs(self.clock.now());
        let active = self.credentials(CredentialFilter::ActiveAt(now)).await?;
        let mut found = Vec::new();
        for (c, decision) in active {
            let version = decision.as_ref().map(|d| d.policy_version.clone()).unwrap_or_default();
            let hit = match target {
                Target::Credential(id) => &c.id == id,
                Target::Serial(serial) => {
                    c.kind == "x509" && c.serial.eq_ignore_ascii_case(serial.trim_start_matches("0x"))
                }
                Target::Identity(id) if id.ends_with('/') => c.identity.starts_with(id.as_str()),
                Target::Identity(id) => &c.identity == id,
                Target::Selector { key, value } => {
                    decision.as_ref().and_then(|d| d.caller.field(key)).is_some_and(|v| &v == value)
                }
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

    /// Credential rows with the decision that allowed each (its release, its caller).
    async fn credentials(
        &self,
        filter: CredentialFilter,
    ) -> Result<Vec<(CredentialRecord, Option<event::Decision>)>, RevokeError> {
        let ledger_err = |e: LedgerError| RevokeError::Ledger(e.to_string());
        let rows = self.reader.credentials(filter).await.map_err(ledger_err)?;
        // The decisions live in the chains of the daemons that issued the credentials.
        let mut by_chain: HashMap<&str, Vec<EventId>> = HashMap::new();
        for r in &rows {
            by_chain.entry(r.chain.as_str()).or_default().push(r.credential.decision_id);
        }
        let mut decisions: HashMap<(String, EventId), event::Decision> = HashMap::new();
        for (chain, ids) in by_chain {
            for (seq, row) in self.reader.events_by_seq(chain, &ids).await.map_err(ledger_err)? {
                if let Event::Decision(d) = row.event().map_err(ledger_err)? {
                    decisions.insert((chain.to_owned(), seq), d);
                }
            }
        }
        Ok(rows
            .into_iter()
            .map(|r| {
                let decision = decisions.remove(&(r.chain, r.credential.decision_id));
                (r.credential, decision)
            })
            .collect())
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
        operator: Operator,
    ) -> Result<RevokeOutcome, RevokeError> {
        let reason = check_reason(reason)?;
        let found = self.find(&target, all).await?;
        let now = self.clock.now();
        let already_locked = match &target {
            Target::Identity(id) => {
                self.revocations.lock_for_target(id).is_some_and(|l| l.until.is_none_or(|u| unix_secs(now) < u))
            }
            _ => false,
        };
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
            let mut details = serde_json::Map::new();
            details.insert("dry_run".into(), true.into());
            details.insert("target".into(), target.describe().into());
            details.insert("reason".into(), reason.into());
            details.insert("would_revoke".into(), found.iter().filter(|f| !f.revoked).count().into());
            let call =
                event::Admin { call: "revoke".into(), operator: Some(operator), details, ..event::Admin::default() };
            let event_id = self.record(Event::Admin(call)).await.ok();
            return Ok(RevokeOutcome { found, already_locked, lock, durable: event_id.is_some(), event_id, aws: None });
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
            _ if !sessions.is_empty() => Some(AwsAnswer {
                applied: Some(false),
                why: Some(
                    "an AWS session cannot be recalled alone: revoke its identity to deny all of that identity's sessions"
                        .into(),
                ),
                ..AwsAnswer::default()
            }),
            _ => None,
        };
        let revoked = event::Revoked {
            target: target.describe(),
            operator,
            reason: reason.to_owned(),
            credentials: list.clone(),
            aws: aws.clone(),
        };
        let recorded = self.record(Event::Revoked(revoked)).await;
        let mut durable = recorded.is_ok();
        if let Some(lock) = &lock {
            let locked = self.record(Event::Locked(event::Locked { lock: lock.clone() })).await;
            durable &= locked.is_ok();
        }
        // Why apply even when not recorded: a revocation only ever takes away; during an
        // incident it must hold now. The caller is told it is not durable.
        self.revocations.apply_revoked(&list);
        if let Some(lock) = &lock {
            self.revocations.apply_lock(lock.clone());
        }
        tracing::warn!(
            target = %target.describe(), revoked = list.len(), already_revoked = found.len() - list.len(),
            locked = lock.is_some(), durable, reason, "revocation applied"
        );
        Ok(RevokeOutcome { found, already_locked, lock, durable, event_id: recorded.ok(), aws })
    }

    pub async fn lock(
        &self,
        target: &str,
        reason: &str,
        ttl: Option<Duration>,
        operator: Operator,
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
        let durable = self.record(Event::Locked(event::Locked { lock: lock.clone() })).await.is_ok();
        self.revocations.apply_lock(lock.clone());
        Ok((lock, durable))
    }

    pub async fn unlock(&self, target: &str, reason: &str, operator: Operator) -> Result<bool, RevokeError> {
        let reason = check_reason(reason)?;
        if self.revocations.lock_for_target(target).is_none() {
            return Err(RevokeError::NotFound(format!("`{target}` is not locked")));
        }
        // Why recorded first here: an unlock gives access back, so it happens only if durable.
        let unlocked = event::Unlocked { target: target.to_owned(), operator, reason: reason.to_owned() };
        self.record(Event::Unlocked(unlocked)).await.map_err(|e| RevokeError::Ledger(e.to_string()))?;
        Ok(self.revocations.apply_unlock(target))
    }

    /// Credentials on record for an identity (exact or prefix ending in `/`; `None`: all),
    /// newest first, with the release each was decided under.
    pub async fn list(&self, identity: Option<&str>, active_only: bool) -> Result<Vec<Found>, RevokeError> {
        let filter =
            if active_only { CredentialFilter::ActiveAt(unix_secs(self.clock.now())) } else { CredentialFilter::All };
        let mut found: Vec<Found> = self
            .credentials(filter)
            .await?
            .into_iter()
            .filter(|(c, _)| match identity {
                None => true,
                Some(p) if p.ends_with('/') => c.identity.starts_with(p),
                Some(id) => c.identity == id,
            })
            .map(|(c, decision)| {
                let revoked = self.revocations.is_revoked(&c.id);
                Found { policy_version: decision.map(|d| d.policy_version).unwrap_or_default(), revoked, credential: c }
            })
            .collect();
        found.reverse();
        Ok(found)
    }

    /// Records an admin call (or a refused one) that changes nothing else, or any other
    /// responder-side event (a policy check's report).
    pub async fn record(&self, event: Event) -> Result<EventId, RevokeError> {
        self.ledger.record(self.clock.now(), event).await.map_err(|e| RevokeError::Ledger(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let lock = |target: &str| {
            Event::Locked(event::Locked {
                lock: Lock {
                    target: target.into(),
                    until: None,
                    reason: "INC-1".into(),
                    operator: Operator::default(),
                },
            })
        };
        let events = vec![
            Event::Revoked(event::Revoked { credentials: vec![r], ..event::Revoked::default() }),
            lock("spiffe://td/a"),
            lock("spiffe://td/ci/"),
            Event::Unlocked(event::Unlocked { target: "spiffe://td/a".into(), ..event::Unlocked::default() }),
        ];
        let s = Revocations::from_events(events);
        assert!(s.is_revoked("c1") && !s.is_revoked("c2"));
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_500_000_000);
        assert!(s.lock_for(&WorkloadId::parse("spiffe://td/a").unwrap(), now).is_none(), "unlocked later");
        assert!(s.lock_for(&WorkloadId::parse("spiffe://td/ci/acme/app").unwrap(), now).is_some(), "prefix lock");
        assert!(s.lock_for(&WorkloadId::parse("spiffe://td/cidr").unwrap(), now).is_none(), "a prefix ends at a /");
        assert_eq!(s.revoked_x509(now), vec![("40aa".to_owned(), 1_000)]);
    }

    #[test]
    fn a_lock_with_an_expiry_ends_by_itself() {
        let lock = Lock {
            target: "spiffe://td/a".into(),
            until: Some(2_000),
            reason: "x".into(),
            operator: Operator::default(),
        };
        let id = WorkloadId::parse("spiffe://td/a").unwrap();
        assert!(lock_covers(&lock, &id, SystemTime::UNIX_EPOCH + Duration::from_secs(1_999)));
        assert!(!lock_covers(&lock, &id, SystemTime::UNIX_EPOCH + Duration::from_secs(2_000)));
    }
}
