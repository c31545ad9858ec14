//! The emergency path around the issuance pipeline. An on-call engineer is identified like
//! any caller (attested, or by a presented id-token); the request is decided only by
//! break-glass rules (and every forbid); every step goes to the ledger (flagged
//! `break_glass`) and, synchronously, to the elevated sinks; a grant that needs a second
//! person waits for one (`approvals`). Fails closed at each step. The order of an issuance
//! itself stays `issue`'s: this module calls its steps and never mints.

pub mod approvals;
pub mod sinks;

use std::collections::HashSet;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime};

use serde::Serialize;

pub use approvals::{ApprovalError, Approvals, PendingRequest, Waited};
pub use sinks::{Elevated, ElevatedSink, FileSink, WebhookSink};

use crate::BoxFuture;
use crate::attest::PeerInfo;
use crate::clock::{Clock, unix_secs};
use crate::config::BreakGlassConfig;
use crate::identity::Ttl;
use crate::issue::{Ask, Authorized, Caller, Emergency, IssueError, Issued, Issuer, Origin, Refusal};
use crate::ledger::event::{BreakGlassStep, Event, IssuedDetails, Operator, Stage};
use crate::ledger::{EventId, Ledger, LedgerError};
use crate::policy::CredentialKind;

/// What a break-glass request asks for, why, and under which ticket.
#[derive(Debug)]
pub struct EmergencyRequest {
    pub ask: Ask,
    pub ttl: Ttl,
    pub reason: String,
    pub ticket: String,
}

#[derive(Debug)]
pub enum EmergencyOutcome {
    Issued(Box<Issued>),
    /// Waiting for a second person: poll with the id until approved, denied or expired.
    Pending {
        id: String,
        expires_at: SystemTime,
    },
}

/// Credentials issued on the emergency path, and the elevated sinks their steps go to:
/// shared by issuance (which flags them), validation and the expiry sweep (whose uses and
/// expiries of flagged credentials are written to the sinks too).
pub struct EmergencyLog {
    elevated: Elevated,
    flagged: Mutex<HashSet<String>>,
    ledger: Arc<dyn Ledger>,
    clock: Arc<dyn Clock>,
}

#[derive(Serialize)]
struct Line<'a, T: Serialize> {
    break_glass: &'a str,
    at: i64,
    event: &'a T,
}

impl EmergencyLog {
    /// `flagged`: the break-glass credentials already on record (read at start).
    pub fn new(
        elevated: Elevated,
        flagged: impl IntoIterator<Item = String>,
        ledger: Arc<dyn Ledger>,
        clock: Arc<dyn Clock>,
    ) -> Self {
        Self { elevated, flagged: Mutex::new(flagged.into_iter().collect()), ledger, clock }
    }

    pub fn is_flagged(&self, credential_id: &str) -> bool {
        self.ids().contains(credential_id)
    }

    pub(crate) fn flag(&self, credential_id: &str) {
        self.ids().insert(credential_id.to_owned());
    }

    /// One line to every elevated sink, or the step fails (and is recorded as refused).
    pub async fn elevate<T: Serialize>(&self, stage: &str, event: &T) -> Result<(), String> {
        let line = self.line(stage, event)?;
        if let Err(why) = self.elevated.write(&line).await {
            let refused = BreakGlassStep {
                stage: Stage::Refused,
                at_stage: Some(stage.to_owned()),
                why: Some(why.clone()),
                event: serde_json::to_value(event).ok(),
                ..BreakGlassStep::default()
            };
            let _ = self.record(refused).await;
            return Err(why);
        }
        Ok(())
    }

    /// A later step of a break-glass credential (a use, its expiry) to the elevated sinks.
    /// The step itself already happened; a failed write is logged loudly, not hidden.
    pub async fn later<T: Serialize>(&self, stage: &str, event: &T) {
        let written = match self.line(stage, event) {
            Ok(line) => self.elevated.write(&line).await,
            Err(e) => Err(e),
        };
        if let Err(e) = written {
            tracing::error!(stage, error = %e, "break-glass step not written to the elevated sinks");
        }
    }

    /// A break-glass step in the ledger, flagged.
    pub async fn record(&self, mut step: BreakGlassStep) -> Result<EventId, LedgerError> {
        step.break_glass = true;
        self.ledger.record(self.clock.now(), Event::BreakGlass(step)).await
    }

    fn line<T: Serialize>(&self, stage: &str, event: &T) -> Result<String, String> {
        let line = Line { break_glass: stage, at: unix_secs(self.clock.now()), event };
        serde_json::to_string(&line).map_err(|e| format!("elevated line: {e}"))
    }

    fn ids(&self) -> MutexGuard<'_, HashSet<String>> {
        // Why: a set of ids, inserted whole; a poisoned lock is still consistent.
        self.flagged.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Break-glass requests shared by the daemons of one ledger (PostgreSQL), so a request
/// waiting on one daemon can be approved through another.
pub trait SharedRequests: Send + Sync + 'static {
    fn put<'a>(&'a self, request: &'a PendingRequest) -> BoxFuture<'a, Result<(), String>>;
    fn get<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<Option<PendingRequest>, String>>;
    /// Every daemon's requests still waiting at `now`.
    fn pending(&self, now: SystemTime) -> BoxFuture<'_, Result<Vec<PendingRequest>, String>>;
    /// Marks `id` approved, once: `false` when it already was, or has expired.
    fn approve<'a>(
        &'a self,
        id: &'a str,
        approver: &'a Operator,
        now: SystemTime,
    ) -> BoxFuture<'a, Result<bool, String>>;
}

/// A request waiting for approval, held with what it will be issued as.
struct Held {
    auth: Authorized,
    ask: Ask,
    origin: Origin,
}

/// Where break-glass requests are taken, approved, waited for and reviewed.
pub struct BreakGlassDesk {
    issuer: Arc<Issuer>,
    config: BreakGlassConfig,
    log: Arc<EmergencyLog>,
    approvals: Approvals<Held>,
    clock: Arc<dyn Clock>,
    shared: Option<Arc<dyn SharedRequests>>,
}

/// The body of an elevated `denied` line.
#[derive(Serialize)]
struct DeniedLine<'a> {
    caller: &'a Operator,
    ticket: &'a str,
    justification: &'a str,
    why: &'a str,
}

impl BreakGlassDesk {
    pub fn new(issuer: Arc<Issuer>, config: BreakGlassConfig, log: Arc<EmergencyLog>, clock: Arc<dyn Clock>) -> Self {
        let approvals = Approvals::new(config.approvers.clone(), config.approval_timeout);
        Self { issuer, config, log, approvals, clock, shared: None }
    }

    /// Shares waiting requests with the other daemons of the ledger.
    pub fn with_shared(mut self, shared: Arc<dyn SharedRequests>) -> Self {
        self.shared = Some(shared);
        self
    }

    /// Another daemon recorded the approval of request `id`: if this daemon holds it, its
    /// requester's wait ends with the credential.
    pub fn approved_elsewhere(&self, id: &str, approver: Operator) {
        if self.approvals.holds(id) {
            self.approvals.commit_approval(id, approver);
        }
    }

    /// The emergency path for a local caller or an operator off-host with an id-token.
    pub async fn request(&self, caller: Caller<'_>, req: EmergencyRequest) -> Result<EmergencyOutcome, IssueError> {
        let kind = req.ask.kind();
        self.issuer.serves(kind)?;
        let origin = Origin {
            api: "break_glass",
            rotates: None,
            emergency: Some(Emergency { reason: req.reason.clone(), ticket: req.ticket.clone() }),
        };
        let ttl = req.ttl.min(self.config.max_ttl);
        let who = self.issuer.identify(caller, kind, ttl, &origin).await?;
        // Refusals before policy is asked are still recorded (and flagged).
        if let Some(why) = self.early_refusal(kind, &req.ticket) {
            let refusal = Refusal {
                kind,
                caller: who.record.clone(),
                identity: None,
                ttl,
                reason: why.clone(),
                origin: &origin,
                request: None,
            };
            self.issuer.refuse(refusal).await?;
            self.denied(&who.record, &req, &why).await;
            return Err(IssueError::BreakGlass(why));
        }
        let mut auth = match self.issuer.authorize(&who, &req.ask, ttl, None, &origin, false).await {
            Ok(auth) => auth,
            Err(e) => {
                // A refused emergency request is loud too (it was recorded by `authorize`).
                self.denied(&who.record, &req, &e.to_string()).await;
                return Err(e);
            }
        };
        if req.ttl > self.config.max_ttl {
            auth.lifetime.requested = req.ttl.as_secs();
            auth.lifetime.clamped_by.get_or_insert_with(|| "break_glass.max_ttl".into());
        }
        #[derive(Serialize)]
        struct Requested<'a> {
            decision_id: EventId,
            who: RequestedBy<'a>,
            ticket: &'a str,
            justification: &'a str,
            kind: &'a str,
            needs_approval: bool,
        }
        #[derive(Serialize)]
        struct RequestedBy<'a> {
            identity: &'a str,
            caller: &'a Operator,
        }
        let requested = Requested {
            decision_id: auth.decision_id,
            who: RequestedBy { identity: auth.identity.as_str(), caller: &who.record },
            ticket: &req.ticket,
            justification: &req.reason,
            kind: kind.as_str(),
            needs_approval: auth.needs_approval,
        };
        self.log.elevate("requested", &requested).await.map_err(IssueError::Elevated)?;
        if auth.needs_approval {
            return self.hold(auth, req, origin, who.uid).await;
        }
        let details = details(&req.ticket, &req.reason, None, None);
        Ok(EmergencyOutcome::Issued(Box::new(self.issuer.deliver(auth, req.ask, &origin, details, true).await?)))
    }

    /// The requester waits (at most `at_most`) for an approval; approved → issued once.
    pub async fn wait(&self, peer: &PeerInfo, id: &str, at_most: Duration) -> Result<EmergencyOutcome, IssueError> {
        match self.approvals.wait(id, peer.uid, at_most, self.clock.as_ref()).await? {
            Waited::StillPending(p) => Ok(EmergencyOutcome::Pending { id: p.id, expires_at: p.expires_at }),
            Waited::Expired(p) => {
                let why = format!("no approval within {} s", self.approvals.timeout().as_secs());
                self.log
                    .record(BreakGlassStep {
                        stage: Stage::Denied,
                        request: Some(p.id.clone()),
                        decision_id: Some(p.decision_id),
                        identity: Some(p.identity.clone()),
                        why: Some(why.clone()),
                        ..BreakGlassStep::default()
                    })
                    .await?;
                #[derive(Serialize)]
                struct ExpiredLine<'a> {
                    request: &'a str,
                    identity: &'a str,
                    why: &'a str,
                }
                self.log.later("denied", &ExpiredLine { request: &p.id, identity: &p.identity, why: &why }).await;
                Err(IssueError::BreakGlass(why))
            }
            Waited::Approved(p, held) => {
                let details = details(&p.ticket, &p.reason, Some(p.id.clone()), p.approved_by.clone());
                let Held { mut auth, ask, origin } = held;
                auth.now = self.clock.now();
                Ok(EmergencyOutcome::Issued(Box::new(self.issuer.deliver(auth, ask, &origin, details, true).await?)))
            }
        }
    }

    /// A second person approves a pending request: recorded (ledger and elevated sinks)
    /// before it takes effect; never the requester; only a configured approver.
    pub async fn approve(
        &self,
        approver_uid: u32,
        approver: Operator,
        id: &str,
        reason: &str,
    ) -> Result<(), IssueError> {
        let now = self.clock.now();
        let checked = match (self.approvals.check_approval(id, approver_uid, now), &self.shared) {
            // Held by another daemon: its shared row says who asked and until when.
            (Err(ApprovalError::Unknown(_)), Some(shared)) => match shared.get(id).await {
                Ok(Some(p)) => self.approvals.check_request(&p, approver_uid, now).map(|()| p),
                Ok(None) => Err(ApprovalError::Unknown(id.to_owned())),
                Err(e) => return Err(IssueError::BreakGlass(format!("the shared request cannot be read: {e}"))),
            },
            (checked, _) => checked,
        };
        let p = match checked {
            Ok(p) => p,
            Err(e) => {
                self.log
                    .record(BreakGlassStep {
                        stage: Stage::ApprovalRefused,
                        request: Some(id.to_owned()),
                        approver: Some(approver),
                        why: Some(e.to_string()),
                        ..BreakGlassStep::default()
                    })
                    .await?;
                return Err(e.into());
            }
        };
        let step = BreakGlassStep {
            stage: Stage::Approved,
            break_glass: true,
            request: Some(id.to_owned()),
            decision_id: Some(p.decision_id),
            identity: Some(p.identity.clone()),
            approver: Some(approver.clone()),
            reason: Some(reason.to_owned()),
            requester_uid: Some(p.requester_uid),
            ..BreakGlassStep::default()
        };
        if let Some(shared) = &self.shared {
            // Once across daemons: a second approval, or one after the expiry, changes nothing.
            match shared.approve(id, &approver, now).await {
                Ok(true) => {}
                Ok(false) => return Err(ApprovalError::Unknown(id.to_owned()).into()),
                Err(e) => return Err(IssueError::BreakGlass(format!("the approval cannot be shared: {e}"))),
            }
        }
        self.log.elevate("approved", &step).await.map_err(IssueError::Elevated)?;
        self.log.record(step).await?;
        if self.approvals.holds(id) {
            self.approvals.commit_approval(id, approver);
        }
        Ok(())
    }

    /// A review afterwards (`mayfly break-glass review`): recorded, flagged.
    pub async fn review(&self, reviewer: Operator, id: &str, note: &str) -> Result<EventId, IssueError> {
        let step = BreakGlassStep {
            stage: Stage::Reviewed,
            subject: Some(id.to_owned()),
            reviewer: Some(reviewer),
            note: Some(note.to_owned()),
            ..BreakGlassStep::default()
        };
        Ok(self.log.record(step).await?)
    }

    /// Requests waiting for approval: every daemon's, when they share a ledger.
    pub async fn pending(&self) -> Vec<PendingRequest> {
        let now = self.clock.now();
        match &self.shared {
            Some(shared) => shared.pending(now).await.unwrap_or_else(|e| {
                tracing::warn!(error = %e, "shared break-glass requests unreadable; listing this daemon's");
                self.approvals.list(now)
            }),
            None => self.approvals.list(now),
        }
    }

    /// Requests waiting for approval on this daemon (what its metrics report).
    pub fn pending_here(&self) -> usize {
        self.approvals.list(self.clock.now()).len()
    }

    /// Who may approve from now on (a reload of `break_glass.approvers`).
    pub fn set_approvers(&self, approvers: Vec<u32>) {
        self.approvals.set_approvers(approvers);
    }

    /// Why this request is refused before policy is asked, if it is.
    fn early_refusal(&self, kind: CredentialKind, ticket: &str) -> Option<String> {
        if !self.config.ticket_pattern.is_match(ticket) {
            Some(format!(
                "the ticket `{}` does not match break_glass.ticket_pattern `{}`",
                ticket.escape_debug(),
                self.config.ticket_pattern.as_str()
            ))
        } else if !self.log.elevated.is_configured() {
            Some("no elevated sink is configured, so nothing can be issued".into())
        } else if kind == CredentialKind::Aws && self.config.max_ttl.as_secs() < crate::mint::aws::MIN_SESSION_SECS {
            Some(format!(
                "break_glass.max_ttl `{}` is under AWS's 15-minute floor: no AWS session can be that short",
                self.config.max_ttl
            ))
        } else {
            None
        }
    }

    async fn denied(&self, caller: &Operator, req: &EmergencyRequest, why: &str) {
        let line = DeniedLine { caller, ticket: &req.ticket, justification: &req.reason, why };
        self.log.later("denied", &line).await;
    }

    /// A grant that needs a second person: held until approved (bounded), recorded as pending.
    async fn hold(
        &self,
        auth: Authorized,
        req: EmergencyRequest,
        origin: Origin,
        requester_uid: Option<u32>,
    ) -> Result<EmergencyOutcome, IssueError> {
        let (decision_id, identity) = (auth.decision_id, auth.identity.to_string());
        let step = |stage, why: Option<String>| BreakGlassStep {
            stage,
            decision_id: Some(decision_id),
            identity: Some(identity.clone()),
            why,
            ..BreakGlassStep::default()
        };
        let Some(requester_uid) = requester_uid else {
            let why = "a rule needs a second person's approval, which is served on the workload socket only";
            self.log.record(BreakGlassStep { identity: None, ..step(Stage::Denied, Some(why.into())) }).await?;
            return Err(IssueError::BreakGlass(why.into()));
        };
        let id = uuid::Uuid::new_v4().to_string();
        let expires_at = auth.now + self.approvals.timeout();
        let request = PendingRequest {
            id: id.clone(),
            requester_uid,
            identity: auth.identity.to_string(),
            decision_id: auth.decision_id,
            reason: req.reason,
            ticket: req.ticket,
            requested_at: auth.now,
            expires_at,
            approved_by: None,
        };
        let pending = BreakGlassStep {
            request: Some(id.clone()),
            expires_at: Some(unix_secs(expires_at)),
            ..step(Stage::Pending, None)
        };
        let refused = |why: String| BreakGlassStep { request: Some(id.clone()), ..step(Stage::Denied, Some(why)) };
        if let Some(shared) = &self.shared
            && let Err(e) = shared.put(&request).await
        {
            let why = format!("the request cannot be shared for approval: {e}");
            self.log.record(refused(why.clone())).await?;
            return Err(IssueError::BreakGlass(why));
        }
        if let Err(e) = self.approvals.add(request, Held { auth, ask: req.ask, origin }) {
            self.log.record(refused(e.to_string())).await?;
            return Err(e.into());
        }
        self.log.record(pending).await?;
        Ok(EmergencyOutcome::Pending { id, expires_at })
    }
}

/// The break-glass facts an emergency credential's `issued` event carries.
fn details(ticket: &str, reason: &str, request: Option<String>, approved_by: Option<Operator>) -> IssuedDetails {
    IssuedDetails {
        break_glass: true,
        ticket: Some(ticket.to_owned()),
        justification: Some(reason.to_owned()),
        request,
        approved_by,
        ..IssuedDetails::default()
    }
}
