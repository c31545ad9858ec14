//! Shadow mode: a candidate release decides every live request beside the active one.
//! Each different outcome is a `policy_shadow_diff` event, written in the background (it
//! must not slow or fail the live request); the live answer is always the active release's.
//! Starting and stopping are events. Lives in memory: it does not survive a restart.

use std::sync::Arc;
use std::time::SystemTime;

use arc_swap::ArcSwapOption;

use super::release::Release;
use super::replay;
use super::store::PolicyStore;
use crate::clock::Clock;
use crate::ledger::event::{self, Event, Operator, PolicyShadow, PolicyShadowDiff, ShadowState};
use crate::ledger::{EventId, Ledger, LedgerError};

/// Shadow differences being written at once; beyond it they are counted, not queued.
const MAX_PENDING_WRITES: usize = 256;

pub struct Shadow {
    candidate: ArcSwapOption<Release>,
    writes: Arc<tokio::sync::Semaphore>,
    policy: Arc<PolicyStore>,
    ledger: Arc<dyn Ledger>,
    clock: Arc<dyn Clock>,
}

impl Shadow {
    pub fn new(policy: Arc<PolicyStore>, ledger: Arc<dyn Ledger>, clock: Arc<dyn Clock>) -> Self {
        Self {
            candidate: ArcSwapOption::empty(),
            writes: Arc::new(tokio::sync::Semaphore::new(MAX_PENDING_WRITES)),
            policy,
            ledger,
            clock,
        }
    }

    pub fn is_on(&self) -> bool {
        self.candidate.load().is_some()
    }

    /// The release being shadowed, if any.
    pub fn version(&self) -> Option<String> {
        self.candidate.load().as_ref().map(|r| r.version().to_owned())
    }

    /// Starts shadowing `candidate` (replacing any other), recorded first.
    pub async fn start(
        &self,
        candidate: Arc<Release>,
        operator: Operator,
        reason: &str,
    ) -> Result<EventId, LedgerError> {
        let p = &candidate.provenance;
        let started = PolicyShadow {
            shadow: ShadowState::Started,
            candidate: Some(candidate.version().to_owned()),
            label: p.label.clone(),
            signed_by: p.signed_by.clone(),
            source: Some(p.source.clone()),
            active: Some(self.policy.current().version().to_owned()),
            operator,
            reason: reason.to_owned(),
        };
        let id = self.ledger.record(self.clock.now(), Event::PolicyShadow(started)).await?;
        self.candidate.store(Some(candidate));
        Ok(id)
    }

    /// Stops shadow mode, recorded first.
    pub async fn stop(&self, operator: Operator, reason: &str) -> Result<EventId, LedgerError> {
        let stopped = PolicyShadow {
            shadow: ShadowState::Stopped,
            candidate: self.version(),
            operator,
            reason: reason.to_owned(),
            ..PolicyShadow::default()
        };
        let id = self.ledger.record(self.clock.now(), Event::PolicyShadow(stopped)).await?;
        self.candidate.store(None);
        Ok(id)
    }

    /// Decides a live request (its recorded decision) under the candidate too; a different
    /// outcome is recorded in the background, and nothing else happens.
    pub fn observe(&self, decision: &event::Decision, decision_id: EventId, now: SystemTime) {
        let Some(candidate) = self.candidate.load_full() else { return };
        let recorded = match replay::from_decision(decision, decision_id, now) {
            Ok(r) => r,
            Err(why) => {
                tracing::debug!(why, "shadow: request not decidable");
                return;
            }
        };
        let shadowed = replay::decide(&candidate, &recorded);
        let Some(change) = replay::compare(&recorded.outcome, &shadowed) else { return };
        let (action, resource) = replay::describe(&recorded.resources);
        tracing::info!(
            change = ?change,
            identity = recorded.outcome.identity.as_deref().unwrap_or_default(),
            action,
            resource,
            candidate = candidate.version(),
            "shadow policy decides differently (not acted on)"
        );
        let diff = PolicyShadowDiff {
            candidate: candidate.version().to_owned(),
            active: self.policy.current().version().to_owned(),
            decision_id: Some(decision_id),
            change,
            escalation: change.is_escalation(),
            action,
            resource,
            live: recorded.outcome,
            shadow: shadowed,
        };
        let Ok(permit) = self.writes.clone().try_acquire_owned() else {
            tracing::warn!(
                candidate = candidate.version(),
                "shadow differences arrive faster than the ledger takes them; this one is not recorded"
            );
            return;
        };
        let ledger = self.ledger.clone();
        let at = self.clock.now();
        tokio::spawn(async move {
            if let Err(e) = ledger.record(at, Event::PolicyShadowDiff(diff)).await {
                tracing::warn!(error = %e, "shadow difference not recorded");
            }
            drop(permit);
        });
    }
}
