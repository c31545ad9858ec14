//! `mayfly.v1.Broker` on the workload socket.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::pb::broker_server::Broker;
use super::pb::{
    BreakGlassRequest, BreakGlassResponse, BreakGlassWaitRequest, IssueAwsRequest, IssueAwsResponse, IssueX509Request,
    IssueX509Response,
};
use super::{aws_credentials, invalid, status};
use crate::attest::PeerInfo;
use crate::clock::unix_secs;
use crate::identity::{Ttl, WorkloadId};
use crate::issue::{
    AwsRequest, EmergencyKind, EmergencyOutcome, EmergencyRequest, Issuer, KeySource, Origin, X509Request,
};
use crate::mint::VerifiedCsr;
use crate::policy::AwsRole;

pub struct BrokerService {
    issuer: Arc<Issuer>,
    default_ttl: Ttl,
    max_ttl: Ttl,
    /// What an AWS request without a lifetime asks for.
    aws_ttl: Ttl,
}

impl BrokerService {
    pub fn new(issuer: Arc<Issuer>, default_ttl: Ttl, max_ttl: Ttl) -> Self {
        Self { issuer, default_ttl, max_ttl, aws_ttl: default_ttl }
    }

    pub fn with_aws_ttl(mut self, ttl: Ttl) -> Self {
        self.aws_ttl = ttl;
        self
    }
}

#[tonic::async_trait]
impl Broker for BrokerService {
    async fn issue_x509(&self, request: Request<IssueX509Request>) -> Result<Response<IssueX509Response>, Status> {
        let peer = request.extensions().get::<PeerInfo>().cloned().unwrap_or_else(PeerInfo::without_credentials);
        let req = request.into_inner();
        let ttl = match req.ttl_seconds {
            None => self.default_ttl,
            Some(secs) => Ttl::from_request(secs, self.max_ttl).map_err(|e| invalid("ttl_seconds", e))?,
        };
        let spiffe_id = match req.spiffe_id.as_str() {
            "" => None,
            s => Some(WorkloadId::parse(s).map_err(|e| invalid("spiffe_id", e))?),
        };
        let csr = VerifiedCsr::parse(&req.csr).map_err(|e| invalid("csr", e))?;
        let issued = self
            .issuer
            .issue_x509(
                &peer,
                X509Request {
                    key: KeySource::Csr(csr),
                    ttl,
                    spiffe_id,
                    origin: Origin { api: "mayfly.v1", rotates: None, emergency: None },
                },
            )
            .await
            .map_err(|e| status(&e))?;
        Ok(Response::new(IssueX509Response {
            credential_id: issued.credential_id,
            spiffe_id: issued.identity.to_string(),
            cert_chain: vec![issued.svid.cert_der],
            trust_bundle: issued.bundle,
            not_after: unix_secs(issued.svid.not_after),
            serial: issued.svid.serial,
        }))
    }

    async fn issue_aws(&self, request: Request<IssueAwsRequest>) -> Result<Response<IssueAwsResponse>, Status> {
        let peer = request.extensions().get::<PeerInfo>().cloned().unwrap_or_else(PeerInfo::without_credentials);
        let req = request.into_inner();
        let role = AwsRole::parse(req.role.trim()).map_err(|e| invalid("role", e))?;
        let ttl = match req.ttl_seconds {
            None => self.aws_ttl,
            Some(secs) => Ttl::from_request(secs, self.max_ttl).map_err(|e| invalid("ttl_seconds", e))?,
        };
        let spiffe_id = match req.spiffe_id.as_str() {
            "" => None,
            s => Some(WorkloadId::parse(s).map_err(|e| invalid("spiffe_id", e))?),
        };
        let origin = Origin { api: "mayfly.v1", rotates: None, emergency: None };
        let issued =
            self.issuer.issue_aws(&peer, AwsRequest { role, ttl, spiffe_id, origin }).await.map_err(|e| status(&e))?;
        Ok(Response::new(IssueAwsResponse {
            credential_id: issued.credential_id.clone(),
            spiffe_id: issued.identity.to_string(),
            credentials: Some(aws_credentials(&issued)),
        }))
    }

    async fn break_glass(&self, request: Request<BreakGlassRequest>) -> Result<Response<BreakGlassResponse>, Status> {
        let peer = request.extensions().get::<PeerInfo>().cloned().unwrap_or_else(PeerInfo::without_credentials);
        let req = request.into_inner();
        let text = |field: &str, v: &str, max: usize| -> Result<String, Status> {
            let v = v.trim();
            if v.is_empty() || v.len() > max || v.chars().any(char::is_control) {
                return Err(invalid(field, format!("required, at most {max} characters, no control characters")));
            }
            Ok(v.to_owned())
        };
        let reason = text("reason", &req.reason, 1000)?;
        let ticket = text("ticket", &req.ticket, 64)?;
        let ttl = match req.ttl_seconds {
            None => self.default_ttl,
            Some(secs) => Ttl::from_request(secs, self.max_ttl).map_err(|e| invalid("ttl_seconds", e))?,
        };
        let kind = match req.kind.as_str() {
            "x509" => EmergencyKind::X509 { csr: VerifiedCsr::parse(&req.csr).map_err(|e| invalid("csr", e))? },
            "jwt" => EmergencyKind::Jwt { audience: text("audience", &req.audience, 512)? },
            "aws" => EmergencyKind::Aws { role: AwsRole::parse(req.role.trim()).map_err(|e| invalid("role", e))? },
            other => return Err(invalid("kind", format!("`{}` is not one of x509, jwt, aws", other.escape_debug()))),
        };
        let outcome = self
            .issuer
            .break_glass(&peer, EmergencyRequest { kind, ttl, reason, ticket })
            .await
            .map_err(|e| status(&e))?;
        Ok(Response::new(emergency_response(outcome)))
    }

    async fn break_glass_wait(
        &self,
        request: Request<BreakGlassWaitRequest>,
    ) -> Result<Response<BreakGlassResponse>, Status> {
        let peer = request.extensions().get::<PeerInfo>().cloned().unwrap_or_else(PeerInfo::without_credentials);
        let id = request.into_inner().pending_id;
        let outcome = self
            .issuer
            .break_glass_wait(&peer, &id, std::time::Duration::from_secs(20))
            .await
            .map_err(|e| status(&e))?;
        Ok(Response::new(emergency_response(outcome)))
    }
}

fn emergency_response(outcome: EmergencyOutcome) -> BreakGlassResponse {
    match outcome {
        EmergencyOutcome::Pending { id, expires_at } => {
            BreakGlassResponse { pending_id: id, pending_until: unix_secs(expires_at), ..Default::default() }
        }
        EmergencyOutcome::X509(issued) => BreakGlassResponse {
            credential_id: issued.credential_id,
            spiffe_id: issued.identity.to_string(),
            not_after: unix_secs(issued.svid.not_after),
            serial: issued.svid.serial,
            cert_chain: vec![issued.svid.cert_der],
            trust_bundle: issued.bundle,
            ..Default::default()
        },
        EmergencyOutcome::Jwt(issued) => BreakGlassResponse {
            credential_id: issued.credential_id,
            spiffe_id: issued.identity.to_string(),
            not_after: unix_secs(issued.svid.not_after),
            serial: issued.svid.jti.clone(),
            token: issued.svid.token.expose().to_owned(),
            ..Default::default()
        },
        EmergencyOutcome::Aws(issued) => BreakGlassResponse {
            credential_id: issued.credential_id.clone(),
            spiffe_id: issued.identity.to_string(),
            not_after: unix_secs(issued.session.expiration),
            serial: issued.session.access_key_id.clone(),
            aws: Some(aws_credentials(&issued)),
            ..Default::default()
        },
    }
}
