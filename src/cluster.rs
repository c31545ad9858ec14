//! Several daemons, one state (PostgreSQL). Owns what connects the shared ledger
//! (`ledger::postgres::Shared`) to the modules that use it: the replay guard (a token is
//! accepted once across daemons), the release store (every daemon serves the release any of
//! them activated), shared break-glass requests (approved through any daemon), the staleness
//! gate, the follower that applies other daemons' revocations, locks, policy changes and
//! approvals as they commit, and the leadership that lets one daemon at a time run the
//! sweeps. Decides nothing and mints nothing.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use sqlx::Connection;
use tokio::sync::{mpsc, watch};

use crate::BoxFuture;
use crate::attest::oidc::ReplayGuard;
use crate::breakglass::{BreakGlassDesk, PendingRequest, SharedRequests};
use crate::issue::Freshness;
use crate::ledger::StoredEvent;
use crate::ledger::event::{Event, Operator, ShadowState, Stage};
use crate::ledger::postgres::{Shared, SharedRequest};
use crate::policy::activation::{PolicyController, ReleaseStore};
use crate::policy::shadow::Shadow;
use crate::revoke::Revocations;

/// The shared ledger, seen through the seams of the modules that share state.
#[derive(Clone)]
pub struct Cluster {
    shared: Shared,
}

impl Cluster {
    pub fn new(shared: Shared) -> Self {
        Self { shared }
    }

    pub fn chain(&self) -> &str {
        self.shared.chain()
    }

    /// Follows the other daemons' chains (`Shared::follow`) and applies what they commit.
    pub fn follow(&self, follower: Follower, stop: watch::Receiver<bool>) -> impl Future<Output = ()> + Send + 'static {
        let (tx, rx) = mpsc::channel(64);
        let feed = self.shared.clone().follow(tx, stop.clone());
        async move {
            tokio::join!(feed, follower.run(rx, stop));
        }
    }

    /// Runs `sweep` each tick while this daemon leads (holds the sweeps' advisory lock on a
    /// session of its own); another daemon takes over when this one dies. The ledger's
    /// unique indexes make each `expired` and `aws_deny_removed` event exactly once even in
    /// the moment two daemons both think they lead.
    pub async fn lead<F, Fut>(self, every: Duration, stop: watch::Receiver<bool>, mut sweep: F)
    where
        F: FnMut() -> Fut + Send,
        Fut: Future<Output = ()> + Send,
    {
        let mut session: Option<sqlx::PgConnection> = None;
        let mut leading = false;
        let mut ticker = crate::clock::Ticker::new(every, stop);
        while ticker.next().await {
            if session.is_none() {
                session = self.shared.session().await.ok();
                leading = false;
            }
            let Some(conn) = session.as_mut() else { continue };
            // The lock lives with the session: while the session is alive, it is still held.
            let checked: Result<bool, sqlx::Error> = if leading {
                sqlx::query_scalar("SELECT true").fetch_one(&mut *conn).await
            } else {
                sqlx::query_scalar("SELECT pg_try_advisory_lock(hashtextextended('mayfly-sweeps', 0))")
                    .fetch_one(&mut *conn)
                    .await
            };
            match checked {
                Ok(true) => {
                    if !leading {
                        tracing::info!(chain = self.shared.chain(), "this daemon runs the sweeps");
                    }
                    leading = true;
                    sweep().await;
                    if let Err(e) = self.shared.prune_seen().await {
                        tracing::debug!(error = %e, "replay cache not pruned this time");
                    }
                }
                Ok(false) => {}
                Err(e) => {
                    tracing::debug!(error = %e, "sweep leadership session lost");
                    leading = false;
                    if let Some(conn) = session.take() {
                        let _ = conn.close().await;
                    }
                }
            }
        }
    }
}

/// The policy change the daemons last made (an activation or a rollback), read before this
/// daemon records its own start, with which chain made it.
pub struct LastPolicyChange {
    via: String,
    event: Event,
}

impl Cluster {
    /// Reads the last policy change any daemon recorded (call it before this daemon's
    /// policy starts, so its own start-up activation is not taken for the cluster's).
    pub async fn last_policy_change(
        &self,
        reader: &dyn crate::ledger::LedgerRead,
    ) -> Result<Option<LastPolicyChange>, crate::ledger::LedgerError> {
        use crate::ledger::event::EventKind;
        let filter = crate::ledger::EventFilter {
            last: Some(1),
            ..crate::ledger::EventFilter::kinds(&[EventKind::PolicyActivated, EventKind::PolicyRolledBack])
        };
        let Some(row) = reader.events(filter).await?.pop() else { return Ok(None) };
        Ok(Some(LastPolicyChange { via: format!("chain {} (at start)", row.chain), event: row.event()? }))
    }

    /// At start: serve the release the daemons serve, if this daemon's source gave another.
    pub async fn catch_up_policy(&self, last: LastPolicyChange, policy: &PolicyController) {
        match last.event {
            Event::PolicyActivated(a) => policy.adopt(&a.version, &last.via).await,
            Event::PolicyRolledBack(r) => policy.follow_rollback(&r.from, &r.to, &last.via).await,
            _ => {}
        }
    }
}

impl ReplayGuard for Cluster {
    fn first_use<'a>(&'a self, key: &'a str, until: SystemTime) -> BoxFuture<'a, Result<bool, String>> {
        Box::pin(async move { self.shared.first_use(key, until).await.map_err(|e| e.to_string()) })
    }
}

impl ReleaseStore for Cluster {
    fn put<'a>(&'a self, version: &'a str, bundle: &'a [u8]) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async move { self.shared.put_release(version, bundle).await.map_err(|e| e.to_string()) })
    }

    fn get<'a>(&'a self, version: &'a str) -> BoxFuture<'a, Result<Option<Vec<u8>>, String>> {
        Box::pin(async move { self.shared.release(version).await.map_err(|e| e.to_string()) })
    }
}

impl Freshness for Cluster {
    fn check(&self) -> Result<(), Duration> {
        self.shared.check_fresh()
    }
}

impl SharedRequests for Cluster {
    fn put<'a>(&'a self, r: &'a PendingRequest) -> BoxFuture<'a, Result<(), String>> {
        let row = SharedRequest {
            id: r.id.clone(),
            chain: self.shared.chain().to_owned(),
            requester_uid: r.requester_uid,
            identity: r.identity.clone(),
            decision_id: r.decision_id,
            reason: r.reason.clone(),
            ticket: r.ticket.clone(),
            requested_at: r.requested_at,
            expires_at: r.expires_at,
            approved_by: None,
        };
        Box::pin(async move { self.shared.put_request(&row).await.map_err(|e| e.to_string()) })
    }

    fn get<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<Option<PendingRequest>, String>> {
        Box::pin(async move { self.shared.request(id).await.map(|r| r.map(pending)).map_err(|e| e.to_string()) })
    }

    fn pending(&self, now: SystemTime) -> BoxFuture<'_, Result<Vec<PendingRequest>, String>> {
        Box::pin(async move {
            self.shared
                .pending_requests(now)
                .await
                .map(|rs| rs.into_iter().map(pending).collect())
                .map_err(|e| e.to_string())
        })
    }

    fn approve<'a>(
        &'a self,
        id: &'a str,
        approver: &'a Operator,
        now: SystemTime,
    ) -> BoxFuture<'a, Result<bool, String>> {
        Box::pin(async move {
            let approver = serde_json::to_string(approver).map_err(|e| e.to_string())?;
            self.shared.approve_request(id, &approver, now).await.map_err(|e| e.to_string())
        })
    }
}

fn pending(r: SharedRequest) -> PendingRequest {
    PendingRequest {
        id: r.id,
        requester_uid: r.requester_uid,
        identity: r.identity,
        decision_id: r.decision_id,
        reason: r.reason,
        ticket: r.ticket,
        requested_at: r.requested_at,
        expires_at: r.expires_at,
        approved_by: r.approved_by.and_then(|a| serde_json::from_str(&a).ok()),
    }
}

/// Applies other daemons' committed events to this daemon's state.
pub struct Follower {
    pub revocations: Arc<Revocations>,
    pub policy: Arc<PolicyController>,
    pub desk: Arc<BreakGlassDesk>,
    pub shadow: Arc<Shadow>,
}

impl Follower {
    async fn run(self, mut rx: mpsc::Receiver<Vec<StoredEvent>>, mut stop: watch::Receiver<bool>) {
        loop {
            let batch = tokio::select! {
                batch = rx.recv() => batch,
                _ = stop.wait_for(|s| *s) => None,
            };
            let Some(batch) = batch else { return };
            for row in batch {
                self.apply(&row).await;
            }
        }
    }

    /// Shadow mode started or stopped on another daemon: the same here (recorded here too).
    async fn follow_shadow(&self, s: crate::ledger::event::PolicyShadow, via: &str) {
        let operator = Operator { daemon: Some(via.to_owned()), ..Operator::default() };
        let reason = format!("following {via}: {}", s.reason);
        match (s.shadow, s.candidate) {
            (ShadowState::Started, Some(version)) if self.shadow.version().as_deref() != Some(&version) => {
                match self.policy.shared_candidate(&version).await {
                    Ok(candidate) => {
                        if let Err(e) = self.shadow.start(Arc::new(candidate), operator, &reason).await {
                            tracing::warn!(error = %e, version, "cannot follow another daemon's shadow mode");
                        }
                    }
                    Err(why) => tracing::warn!(why, version, "another daemon's shadow candidate is not usable here"),
                }
            }
            (ShadowState::Stopped, Some(version)) if self.shadow.version().as_deref() == Some(&version) => {
                if let Err(e) = self.shadow.stop(operator, &reason).await {
                    tracing::warn!(error = %e, "cannot follow another daemon's end of shadow mode");
                }
            }
            _ => {}
        }
    }

    async fn apply(&self, row: &StoredEvent) {
        let event = match row.event() {
            Ok(e) => e,
            Err(e) => {
                tracing::error!(chain = row.chain, seq = row.seq, error = %e, "another daemon's event does not decode; not applied");
                return;
            }
        };
        let via = format!("chain {}", row.chain);
        match event {
            Event::Revoked(r) => {
                tracing::info!(
                    via,
                    target = r.target,
                    n = r.credentials.len(),
                    "revocation from another daemon applied"
                );
                self.revocations.apply_revoked(&r.credentials);
            }
            Event::Locked(l) => {
                tracing::info!(via, target = l.lock.target, "lock from another daemon applied");
                self.revocations.apply_lock(l.lock);
            }
            Event::Unlocked(u) => {
                self.revocations.apply_unlock(&u.target);
            }
            Event::PolicyActivated(a) => self.policy.adopt(&a.version, &via).await,
            Event::PolicyRolledBack(r) => self.policy.follow_rollback(&r.from, &r.to, &via).await,
            Event::PolicyShadow(s) => self.follow_shadow(s, &via).await,
            Event::BreakGlass(step) if step.stage == Stage::Approved => {
                if let (Some(request), Some(approver)) = (step.request, step.approver) {
                    self.desk.approved_elsewhere(&request, approver);
                }
            }
            _ => {}
        }
    }
}
