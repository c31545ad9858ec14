//! `mayfly.v1.Admin` on the admin socket (mode 0600). The operator is the socket peer; a
//! peer that is neither the daemon's user nor root is refused even if file permissions
//! were loosened by hand.

use std::sync::Arc;

use serde_json::json;
use tonic::{Request, Response, Status};

use super::pb::admin_server::Admin;
use super::pb::{PolicyRelease, PolicyRollbackRequest, PolicyRollbackResponse, PolicyStatusRequest, PolicyStatusResponse};
use crate::attest::PeerInfo;
use crate::policy::activation::{ActivationError, PolicyController};
use crate::policy::release::Release;

pub struct AdminService {
    policy: Arc<PolicyController>,
    daemon_uid: u32,
}

impl AdminService {
    pub fn new(policy: Arc<PolicyController>, daemon_uid: u32) -> Self {
        Self { policy, daemon_uid }
    }

    fn operator(&self, request_peer: Option<&PeerInfo>) -> Result<serde_json::Value, Status> {
        let peer = request_peer.ok_or_else(|| Status::unauthenticated("the admin peer has no process credentials"))?;
        if peer.uid != self.daemon_uid && peer.uid != 0 {
            tracing::warn!(uid = peer.uid, "admin call from a user who is neither the daemon's nor root; refused");
            return Err(Status::permission_denied("admin calls are for the daemon's user or root"));
        }
        Ok(json!({ "uid": peer.uid, "gid": peer.gid, "pid": peer.pid }))
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
    async fn policy_status(&self, request: Request<PolicyStatusRequest>) -> Result<Response<PolicyStatusResponse>, Status> {
        self.operator(request.extensions().get::<PeerInfo>())?;
        let status = self.policy.status().await;
        Ok(Response::new(PolicyStatusResponse {
            current: Some(release(&status.current)),
            previous: status.previous.as_deref().map(release),
            held: status.held.unwrap_or_default(),
        }))
    }

    async fn policy_rollback(&self, request: Request<PolicyRollbackRequest>) -> Result<Response<PolicyRollbackResponse>, Status> {
        let operator = self.operator(request.extensions().get::<PeerInfo>())?;
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
            Err(e @ ActivationError::NoPrevious) => Err(Status::failed_precondition(e.to_string())),
            Err(e @ ActivationError::Ledger(_)) => {
                tracing::error!(error = %e, "rollback not recorded; nothing changed");
                Err(Status::unavailable(e.to_string()))
            }
            Err(e) => Err(Status::internal(e.to_string())),
        }
    }
}
