//! Break-glass requests waiting for a second person. A request whose deciding rule says
//! `@approval("required")` waits here (bounded) until an approver who is not the requester
//! approves it on the admin socket; when its time runs out it is denied. Fails closed: no
//! configured approver, or the requester approving, is a refusal. Knows nothing of minting
//! or sockets: what a request will be issued as is held opaquely until it is approved.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use tokio::sync::watch;

use crate::clock::Clock;
use crate::ledger::EventId;
use crate::ledger::event::Operator;

/// A request waiting for a second person: what an approver and the admin listing see.
#[derive(Clone, Debug)]
pub struct PendingRequest {
    pub id: String,
    pub requester_uid: u32,
    pub identity: String,
    pub decision_id: EventId,
    pub reason: String,
    pub ticket: String,
    pub requested_at: SystemTime,
    pub expires_at: SystemTime,
    pub approved_by: Option<Operator>,
}

/// A pending request and what it will be issued as once approved (`T`: the held grants,
/// which only the issuing side knows how to use).
struct Entry<T> {
    request: PendingRequest,
    held: T,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ApprovalError {
    #[error("no pending break-glass request `{0}` (unknown, already issued, or expired)")]
    Unknown(String),
    #[error("the requester cannot approve their own break-glass request")]
    SelfApproval,
    #[error("uid {0} is not among break_glass.approvers")]
    NotAnApprover(u32),
    #[error("no approvers are configured (break_glass.approvers): approval-required requests are denied")]
    NoApprovers,
    #[error(
        "nobody other than the requester (uid {0}) can approve: break_glass.approvers lists only the requester, who may never approve their own request"
    )]
    OnlyRequester(u32),
    #[error("only the requester may wait for request `{0}`")]
    NotRequester(String),
}

/// Where a wait ended.
#[derive(Debug)]
pub enum Waited<T> {
    /// Taken out: issued at most once.
    Approved(PendingRequest, T),
    Expired(PendingRequest),
    StillPending(PendingRequest),
}

pub struct Approvals<T> {
    /// Replaced whole on a reload (`set_approvers`).
    approvers: std::sync::RwLock<Vec<u32>>,
    timeout: Duration,
    pending: Mutex<HashMap<String, Entry<T>>>,
    changed: watch::Sender<u64>,
}

impl<T> Approvals<T> {
    pub fn new(approvers: Vec<u32>, timeout: Duration) -> Self {
        Self {
            approvers: std::sync::RwLock::new(approvers),
            timeout,
            pending: Mutex::new(HashMap::new()),
            changed: watch::Sender::new(0),
        }
    }

    /// Who may approve from now on (a reload); pending requests are checked against it.
    pub fn set_approvers(&self, approvers: Vec<u32>) {
        *self.approvers.write().unwrap_or_else(std::sync::PoisonError::into_inner) = approvers;
    }

    pub fn approvers(&self) -> Vec<u32> {
        // Why: the list is replaced whole; a poisoned lock still holds a whole list.
        self.approvers.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Registers a request; refuses at once when nobody could ever approve it.
    pub fn add(&self, request: PendingRequest, held: T) -> Result<(), ApprovalError> {
        let approvers = self.approvers();
        if approvers.is_empty() {
            return Err(ApprovalError::NoApprovers);
        }
        if approvers.iter().all(|uid| *uid == request.requester_uid) {
            return Err(ApprovalError::OnlyRequester(request.requester_uid));
        }
        self.lock().insert(request.id.clone(), Entry { request, held });
        Ok(())
    }

    pub fn list(&self, now: SystemTime) -> Vec<PendingRequest> {
        let mut list: Vec<PendingRequest> =
            self.lock().values().map(|e| &e.request).filter(|p| p.expires_at > now).cloned().collect();
        list.sort_by_key(|p| p.requested_at);
        list
    }

    /// Checks an approval; `commit_approval` then marks it (after the approval is recorded).
    pub fn check_approval(
        &self,
        id: &str,
        approver_uid: u32,
        now: SystemTime,
    ) -> Result<PendingRequest, ApprovalError> {
        let p = self.lock().get(id).map(|e| e.request.clone()).ok_or_else(|| ApprovalError::Unknown(id.to_owned()))?;
        self.check_request(&p, approver_uid, now)?;
        Ok(p)
    }

    /// Whether `approver_uid` may approve `p` now (a request held here or by another daemon).
    pub fn check_request(&self, p: &PendingRequest, approver_uid: u32, now: SystemTime) -> Result<(), ApprovalError> {
        if p.expires_at <= now || p.approved_by.is_some() {
            return Err(ApprovalError::Unknown(p.id.clone()));
        }
        if p.requester_uid == approver_uid {
            return Err(ApprovalError::SelfApproval);
        }
        if !self.approvers().contains(&approver_uid) {
            return Err(ApprovalError::NotAnApprover(approver_uid));
        }
        Ok(())
    }

    /// Whether this daemon holds request `id` (and could issue it once approved).
    pub fn holds(&self, id: &str) -> bool {
        self.lock().contains_key(id)
    }

    pub fn commit_approval(&self, id: &str, approver: Operator) {
        if let Some(e) = self.lock().get_mut(id) {
            e.request.approved_by = Some(approver);
        }
        self.changed.send_modify(|n| *n += 1);
    }

    /// Waits up to `at_most` for request `id` to be approved or to expire (by `clock`).
    /// Only the requester may wait; an approved or expired request is taken out (issued once).
    pub async fn wait(
        &self,
        id: &str,
        requester_uid: u32,
        at_most: Duration,
        clock: &dyn Clock,
    ) -> Result<Waited<T>, ApprovalError> {
        let mut changes = self.changed.subscribe();
        let give_up = tokio::time::Instant::now() + at_most;
        loop {
            let expires_at = {
                let mut map = self.lock();
                let p = &map.get(id).ok_or_else(|| ApprovalError::Unknown(id.to_owned()))?.request;
                if p.requester_uid != requester_uid {
                    return Err(ApprovalError::NotRequester(id.to_owned()));
                }
                if p.approved_by.is_some() {
                    let e = map.remove(id).ok_or_else(|| ApprovalError::Unknown(id.to_owned()))?;
                    return Ok(Waited::Approved(e.request, e.held));
                }
                if p.expires_at <= clock.now() {
                    let e = map.remove(id).ok_or_else(|| ApprovalError::Unknown(id.to_owned()))?;
                    return Ok(Waited::Expired(e.request));
                }
                if tokio::time::Instant::now() >= give_up {
                    return Ok(Waited::StillPending(p.clone()));
                }
                p.expires_at
            };
            // Wake on an approval, at the expiry, or when this wait's own bound is reached.
            tokio::select! {
                _ = changes.changed() => {}
                () = clock.sleep_until(expires_at) => {}
                () = tokio::time::sleep_until(give_up) => {}
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Entry<T>>> {
        // Why: entries are inserted, updated and removed whole; a poisoned lock is consistent.
        self.pending.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pending(id: &str, requester: u32, now: SystemTime) -> PendingRequest {
        PendingRequest {
            id: id.into(),
            requester_uid: requester,
            identity: "spiffe://td/a".into(),
            decision_id: 1,
            reason: "db down".into(),
            ticket: "INC-1".into(),
            requested_at: now,
            expires_at: now + Duration::from_secs(600),
            approved_by: None,
        }
    }

    #[test]
    fn approval_fails_closed() {
        let now = SystemTime::now();
        assert_eq!(
            Approvals::<&str>::new(vec![], Duration::from_secs(600)).add(pending("a", 1000, now), "grant"),
            Err(ApprovalError::NoApprovers)
        );
        let only_me = Approvals::new(vec![1000], Duration::from_secs(600)).add(pending("a", 1000, now), "grant");
        assert_eq!(only_me, Err(ApprovalError::OnlyRequester(1000)), "only the requester could approve");
        let said = only_me.unwrap_err().to_string();
        assert!(said.contains("nobody other than the requester"), "{said}");
        assert!(!said.contains("no approvers are configured"), "{said}");
        let a = Approvals::new(vec![1000, 2000], Duration::from_secs(600));
        a.add(pending("a", 1000, now), "grant").unwrap();
        assert_eq!(a.check_approval("a", 1000, now).unwrap_err(), ApprovalError::SelfApproval);
        assert_eq!(a.check_approval("a", 3000, now).unwrap_err(), ApprovalError::NotAnApprover(3000));
        assert!(a.check_approval("a", 2000, now).is_ok());
        a.set_approvers(vec![1000, 3000]);
        assert!(a.check_approval("a", 3000, now).is_ok(), "a reload's approvers take effect at once");
        assert_eq!(a.check_approval("a", 2000, now).unwrap_err(), ApprovalError::NotAnApprover(2000));
        a.set_approvers(vec![1000, 2000]);
        assert!(
            matches!(a.check_approval("a", 2000, now + Duration::from_secs(601)), Err(ApprovalError::Unknown(_))),
            "expired"
        );
    }

    #[tokio::test]
    async fn a_waiting_requester_gets_the_approval_or_the_expiry() {
        let now = SystemTime::now();
        let a = std::sync::Arc::new(Approvals::new(vec![2000], Duration::from_secs(600)));
        a.add(pending("a", 1000, now), "grant").unwrap();
        let clock = std::sync::Arc::new(crate::clock::FixedClock::new(now));
        assert!(matches!(
            a.wait("a", 3000, Duration::from_millis(10), clock.as_ref()).await,
            Err(ApprovalError::NotRequester(_))
        ));
        assert!(matches!(
            a.wait("a", 1000, Duration::from_millis(100), clock.as_ref()).await,
            Ok(Waited::StillPending(_))
        ));
        let waiter = {
            let (a, clock) = (a.clone(), clock.clone());
            tokio::spawn(async move { a.wait("a", 1000, Duration::from_secs(20), clock.as_ref()).await })
        };
        a.commit_approval("a", Operator::local(2000, 2000, None));
        assert!(matches!(waiter.await.unwrap(), Ok(Waited::Approved(_, "grant"))));
        assert!(
            matches!(
                a.wait("a", 1000, Duration::from_millis(10), clock.as_ref()).await,
                Err(ApprovalError::Unknown(_))
            ),
            "issued once"
        );
        a.add(pending("b", 1000, now), "grant").unwrap();
        let waiter = {
            let (a, clock) = (a.clone(), clock.clone());
            tokio::spawn(async move { a.wait("b", 1000, Duration::from_secs(20), clock.as_ref()).await })
        };
        clock.advance(Duration::from_secs(601));
        let started = std::time::Instant::now();
        assert!(matches!(waiter.await.unwrap(), Ok(Waited::Expired(_))));
        assert!(started.elapsed() < Duration::from_secs(10), "the paused clock's expiry wakes the waiter");
    }
}
