//! `mayfly.v1.Admin` on the admin socket (mode 0600). The operator is the socket peer; a
//! peer that is neither the daemon's user nor root is refused even if file permissions
//! were loosened by hand.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::pb::admin_server::Admin;
use super::pb::revoke_request::Target as RevokeTarget;
use super::pb::{
    AwsDeny, BreakGlassApproveRequest, BreakGlassApproveResponse, BreakGlassListRequest, BreakGlassListResponse,
    BreakGlassReviewRequest, BreakGlassReviewResponse, CredentialInfo, ListCredentialsRequest, ListCredentialsResponse,
    LockRequest, LockResponse, PendingBreakGlass, PolicyRelease, PolicyRollbackRequest, PolicyRollbackResponse,
    PolicyShadowRequest, PolicyShadowResponse, PolicyStatusRequest, PolicyStatusResponse, RecordPolicyCheckRequest,
    RecordPolicyCheckResponse, RevokeRequest, RevokeResponse, UnlockRequest, UnlockResponse,
};
use crate::attest::PeerInfo;
use crate::breakglass::BreakGlassDesk;
use crate::ledger::event::{Admin as AdminCall, CheckReport, Event, Operator, PolicyCheck};
use crate::policy::activation::{ActivationError, PolicyController};
use crate::policy::release::Release;
use crate::policy::shadow::Shadow;
use crate::revoke::{Desk, Found, RevokeError, SELECTOR_KEYS, Target, check_reason};

pub struct AdminService {
    policy: Arc<PolicyController>,
    desk: Arc<Desk>,
    break_glass: Arc<BreakGlassDesk>,
    shadow: Arc<Shadow>,
    daemon_uid: u32,
    owner_uid: Option<u32>,
}

/// An admin call as recorded: the call, who made it, and its own arguments.
fn call(name: &str, operator: &Operator, details: &[(&str, serde_json::Value)]) -> Event {
    Event::Admin(AdminCall {
        call: name.to_owned(),
        operator: Some(operator.clone()),
        details: details.iter().map(|(k, v)| ((*k).to_owned(), v.clone())).collect(),
        ..AdminCall::default()
    })
}

impl AdminService {
    pub fn new(
        policy: Arc<PolicyController>,
        desk: Arc<Desk>,
        break_glass: Arc<BreakGlassDesk>,
        shadow: Arc<Shadow>,
        daemon_uid: u32,
        owner_uid: Option<u32>,
    ) -> Self {
        Self { policy, desk, break_glass, shadow, daemon_uid, owner_uid }
    }

    fn operator(&self, request_peer: Option<&PeerInfo>) -> Result<Operator, Status> {
        let peer = request_peer.ok_or_else(|| Status::unauthenticated("the admin peer has no process credentials"))?;
        if peer.uid != self.daemon_uid && peer.uid != 0 && Some(peer.uid) != self.owner_uid {
            tracing::warn!(
                uid = peer.uid,
                "admin call from a user who is not the daemon's, the socket's owner or root; refused"
            );
            return Err(Status::permission_denied("admin calls are for the daemon's user, admin.owner_uid or root"));
        }
        Ok(Operator::local(peer.uid, peer.gid, peer.pid))
    }

    /// `operator`, with a refused caller recorded as an admin event.
    async fn admin(&self, call: &str, request_peer: Option<&PeerInfo>) -> Result<Operator, Status> {
        match self.operator(request_peer) {
            Ok(op) => Ok(op),
            Err(status) => {
                let refused = AdminCall {
                    call: call.to_owned(),
                    refused: Some(status.message().to_owned()),
                    uid: request_peer.map(|p| p.uid),
                    ..AdminCall::default()
                };
                let _ = self.desk.record(Event::Admin(refused)).await;
                Err(status)
            }
        }
    }
}

fn info(f: &Found) -> CredentialInfo {
    let c = &f.credential;
    CredentialInfo {
        credential_id: c.id.clone(),
        kind: c.kind.clone(),
        identity: c.identity.clone(),
        serial: c.serial.clone(),
        not_before: c.not_before,
        not_after: c.not_after,
        policy_version: f.policy_version.clone(),
        revoked: f.revoked,
        already_revoked: false,
    }
}

fn revoke_status(e: RevokeError) -> Status {
    match e {
        RevokeError::Invalid(m) => Status::invalid_argument(m),
        RevokeError::NotFound(m) => Status::not_found(m),
        RevokeError::Ledger(m) => Status::unavailable(m),
    }
}

fn ttl(secs: i64) -> Result<Option<std::time::Duration>, Status> {
    match secs {
        0 => Ok(None),
        s if s > 0 => Ok(Some(std::time::Duration::from_secs(s.unsigned_abs()))),
        _ => Err(Status::invalid_argument("ttl: must not be negative")),
    }
}

fn release(r: &Release) -> PolicyRelease {
    let p = &r.provenance;
    PolicyRelease {
        version: p.version.clone(),
        label: p.label.clone().unwrap_or_default(),
        signed_by: p.signed_by.clone().unwrap_or_default(),
        source: p.source.clone(),
        rules: u32::try_from(r.engine.rule_count()).unwrap_or(u32::MAX),
        inventory_entries: u32::try_from(r.inventory.entries().len()).unwrap_or(u32::MAX),
    }
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn policy_status(
        &self,
        request: Request<PolicyStatusRequest>,
    ) -> Result<Response<PolicyStatusResponse>, Status> {
        let operator = self.admin("policy_status", request.extensions().get::<PeerInfo>()).await?;
        let _ = self.desk.record(call("policy_status", &operator, &[])).await;
        let status = self.policy.status().await;
        Ok(Response::new(PolicyStatusResponse {
            current: Some(release(&status.current)),
            previous: status.history.first().map(|r| release(r)),
            held: status.held.last().cloned().unwrap_or_default(),
            history: status.history.iter().map(|r| release(r)).collect(),
            held_versions: status.held,
        }))
    }

    async fn policy_rollback(
        &self,
        request: Request<PolicyRollbackRequest>,
    ) -> Result<Response<PolicyRollbackResponse>, Status> {
        let operator = self.admin("policy_rollback", request.extensions().get::<PeerInfo>()).await?;
        let reason = request.into_inner().reason;
        if reason.trim().is_empty() || reason.len() > 1000 || reason.chars().any(|c| c.is_control() && c != '\n') {
            return Err(Status::invalid_argument("reason: required, one paragraph of at most 1000 characters"));
        }
        match self.policy.rollback(operator, reason.trim()).await {
            Ok((from, to, event_id)) => Ok(Response::new(PolicyRollbackResponse {
                from: Some(release(&from)),
                to: Some(release(&to)),
                event_id,
            })),
            Err(e @ ActivationError::NoPrevious(_)) => Err(Status::failed_precondition(e.to_string())),
            Err(e @ ActivationError::Ledger(_)) => {
                tracing::error!(error = %e, "rollback not recorded; nothing changed");
                Err(Status::unavailable(e.to_string()))
            }
            Err(e) => Err(Status::internal(e.to_string())),
        }
    }

    async fn revoke(&self, request: Request<RevokeRequest>) -> Result<Response<RevokeResponse>, Status> {
        let operator = self.admin("revoke", request.extensions().get::<PeerInfo>()).await?;
        let req = request.into_inner();
        let target = match req.target {
            Some(RevokeTarget::CredentialId(id)) if !id.is_empty() => Target::Credential(id),
            Some(RevokeTarget::Serial(s)) if !s.is_empty() => Target::Serial(s.to_ascii_lowercase()),
            Some(RevokeTarget::Identity(id)) if !id.is_empty() => Target::Identity(id),
            Some(RevokeTarget::Selector(sel)) => {
                let (key, value) =
                    sel.split_once('=').ok_or_else(|| Status::invalid_argument("selector: expected key=value"))?;
                if !SELECTOR_KEYS.contains(&key) || value.is_empty() {
                    return Err(Status::invalid_argument(format!(
                        "selector: `{key}` with a value; keys: {}",
                        SELECTOR_KEYS.join(", ")
                    )));
                }
                Target::Selector { key: key.to_owned(), value: value.to_owned() }
            }
            Some(RevokeTarget::BundleVersion(v)) if !v.is_empty() => Target::Bundle(v),
            _ => {
                return Err(Status::invalid_argument(
                    "name what to revoke: credential, serial, identity, selector or bundle",
                ));
            }
        };
        let outcome = self
            .desk
            .revoke(target, &req.reason, req.dry_run, req.all, ttl(req.lock_ttl_seconds)?, operator)
            .await
            .map_err(revoke_status)?;
        let aws = outcome.aws.unwrap_or_default();
        let aws_denies = aws
            .denies
            .iter()
            .map(|d| AwsDeny {
                role: d.role.clone().unwrap_or_default(),
                policy_name: d.policy_name.clone().unwrap_or_default(),
                source_identity: d.source_identity.clone().unwrap_or_default(),
                issued_before: d.issued_before.unwrap_or_default(),
                remove_after: d.remove_after.unwrap_or_default(),
                applied: d.applied,
                error: d.error.clone().unwrap_or_default(),
            })
            .collect();
        // A hook's answer without `needed` (a non-identity revocation of an AWS session)
        // still carries a note worth showing.
        let aws_note = match &aws.why {
            Some(why) if aws.needed || aws.applied == Some(false) => why.clone(),
            _ => String::new(),
        };
        let already = outcome.found.iter().filter(|f| f.revoked).count();
        let count = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
        let credentials = outcome
            .found
            .iter()
            .map(|f| CredentialInfo { revoked: f.revoked || !req.dry_run, already_revoked: f.revoked, ..info(f) })
            .collect();
        Ok(Response::new(RevokeResponse {
            credentials,
            newly_revoked: count(outcome.found.len() - already),
            already_revoked: count(already),
            already_locked: outcome.already_locked,
            locked: outcome.lock.map(|l| l.target).unwrap_or_default(),
            durable: outcome.durable,
            event_id: outcome.event_id.unwrap_or_default(),
            aws_denies,
            aws_note,
        }))
    }

    async fn lock(&self, request: Request<LockRequest>) -> Result<Response<LockResponse>, Status> {
        let operator = self.admin("lock", request.extensions().get::<PeerInfo>()).await?;
        let req = request.into_inner();
        let (lock, durable) =
            self.desk.lock(&req.identity, &req.reason, ttl(req.ttl_seconds)?, operator).await.map_err(revoke_status)?;
        Ok(Response::new(LockResponse { durable, until: lock.until.unwrap_or_default() }))
    }

    async fn unlock(&self, request: Request<UnlockRequest>) -> Result<Response<UnlockResponse>, Status> {
        let operator = self.admin("unlock", request.extensions().get::<PeerInfo>()).await?;
        let req = request.into_inner();
        self.desk.unlock(&req.identity, &req.reason, operator).await.map_err(revoke_status)?;
        Ok(Response::new(UnlockResponse {}))
    }

    async fn list_credentials(
        &self,
        request: Request<ListCredentialsRequest>,
    ) -> Result<Response<ListCredentialsResponse>, Status> {
        let operator = self.admin("list_credentials", request.extensions().get::<PeerInfo>()).await?;
        let req = request.into_inner();
        let identity = if req.identity.is_empty() { None } else { Some(req.identity.as_str()) };
        let _ = self
            .desk
            .record(call(
                "list_credentials",
                &operator,
                &[("identity", identity.into()), ("active", req.active.into())],
            ))
            .await;
        let found = self.desk.list(identity, req.active).await.map_err(revoke_status)?;
        Ok(Response::new(ListCredentialsResponse { credentials: found.iter().map(info).collect() }))
    }

    async fn break_glass_list(
        &self,
        request: Request<BreakGlassListRequest>,
    ) -> Result<Response<BreakGlassListResponse>, Status> {
        let operator = self.admin("break_glass_list", request.extensions().get::<PeerInfo>()).await?;
        let _ = self.desk.record(call("break_glass_list", &operator, &[])).await;
        let pending = self
            .break_glass
            .pending()
            .await
            .into_iter()
            .map(|p| PendingBreakGlass {
                id: p.id,
                identity: p.identity,
                requester_uid: p.requester_uid,
                reason: p.reason,
                ticket: p.ticket,
                requested_at: crate::clock::unix_secs(p.requested_at),
                expires_at: crate::clock::unix_secs(p.expires_at),
            })
            .collect();
        Ok(Response::new(BreakGlassListResponse { pending }))
    }

    async fn break_glass_approve(
        &self,
        request: Request<BreakGlassApproveRequest>,
    ) -> Result<Response<BreakGlassApproveResponse>, Status> {
        let peer = request.extensions().get::<PeerInfo>().cloned();
        let operator = self.admin("break_glass_approve", peer.as_ref()).await?;
        let req = request.into_inner();
        let reason = check_reason(&req.reason).map_err(revoke_status)?;
        let uid = peer.map(|p| p.uid).unwrap_or(u32::MAX);
        self.break_glass.approve(uid, operator, &req.id, reason).await.map_err(|e| super::status(&e))?;
        Ok(Response::new(BreakGlassApproveResponse {}))
    }

    async fn break_glass_review(
        &self,
        request: Request<BreakGlassReviewRequest>,
    ) -> Result<Response<BreakGlassReviewResponse>, Status> {
        let operator = self.admin("break_glass_review", request.extensions().get::<PeerInfo>()).await?;
        let req = request.into_inner();
        let note = check_reason(&req.note).map_err(revoke_status)?;
        if req.id.trim().is_empty() {
            return Err(Status::invalid_argument("id: the break-glass request or credential id"));
        }
        let event_id = self.break_glass.review(operator, req.id.trim(), note).await.map_err(|e| super::status(&e))?;
        Ok(Response::new(BreakGlassReviewResponse { event_id }))
    }

    async fn policy_shadow(
        &self,
        request: Request<PolicyShadowRequest>,
    ) -> Result<Response<PolicyShadowResponse>, Status> {
        let operator = self.admin("policy_shadow", request.extensions().get::<PeerInfo>()).await?;
        let req = request.into_inner();
        let reason = check_reason(&req.reason).map_err(revoke_status)?;
        let candidate = if req.stop {
            None
        } else {
            if req.path.trim().is_empty() {
                return Err(Status::invalid_argument("path: the candidate bundle (or, in dev, policies/ directory)"));
            }
            match self.policy.load_candidate(std::path::Path::new(req.path.trim())).await {
                Ok(r) => Some(std::sync::Arc::new(r)),
                Err(why) => {
                    let mut refused = call("policy_shadow", &operator, &[("path", req.path.clone().into())]);
                    if let Event::Admin(a) = &mut refused {
                        a.refused = Some(why.clone());
                    }
                    let _ = self.desk.record(refused).await;
                    return Err(Status::failed_precondition(format!("candidate refused: {why}")));
                }
            }
        };
        let version = candidate.as_ref().map(|r| r.version().to_owned()).unwrap_or_default();
        let recorded = match candidate {
            Some(c) => self.shadow.start(c, operator, reason).await,
            None => self.shadow.stop(operator, reason).await,
        };
        let event_id = recorded.map_err(|e| Status::unavailable(format!("shadow mode not changed: {e}")))?;
        Ok(Response::new(PolicyShadowResponse {
            candidate_version: version,
            active_version: self.policy.store().current().version().to_owned(),
            event_id,
        }))
    }

    async fn record_policy_check(
        &self,
        request: Request<RecordPolicyCheckRequest>,
    ) -> Result<Response<RecordPolicyCheckResponse>, Status> {
        let operator = self.admin("record_policy_check", request.extensions().get::<PeerInfo>()).await?;
        let report: CheckReport = serde_json::from_str(&request.into_inner().report)
            .map_err(|e| Status::invalid_argument(format!("report: not a JSON report object: {e}")))?;
        if report.check.is_empty() {
            return Err(Status::invalid_argument("report: a JSON object naming its `check`"));
        }
        let event_id =
            self.desk.record(Event::PolicyCheck(PolicyCheck { operator, report })).await.map_err(revoke_status)?;
        Ok(Response::new(RecordPolicyCheckResponse { event_id }))
    }
}
