//! `mayfly.v1.Broker` on the workload socket.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::pb::broker_server::Broker;
use super::pb::{
    BreakGlassRequest, BreakGlassResponse, BreakGlassWaitRequest, IssueAwsRequest, IssueAwsResponse, IssueX509Request,
    IssueX509Response,
};
use super::{aws_credentials, invalid, status, wrong_kind};
use crate::attest::PeerInfo;
use crate::breakglass::{BreakGlassDesk, EmergencyOutcome, EmergencyRequest};
use crate::clock::unix_secs;
use crate::identity::{Ttl, TtlBounds, WorkloadId};
use crate::issue::{Ask, Caller, Credential, IssueRequest, Issued, Issuer, KeySource, Origin};
use crate::mint::VerifiedCsr;
use crate::policy::AwsRole;

pub struct BrokerService {
    issuer: Arc<Issuer>,
    desk: Arc<BreakGlassDesk>,
    default_ttl: Ttl,
    bounds: TtlBounds,
    /// What an AWS request without a lifetime asks for.
    aws_ttl: Ttl,
}

const API: &str = "mayfly.v1";

impl BrokerService {
    pub fn new(issuer: Arc<Issuer>, desk: Arc<BreakGlassDesk>, default_ttl: Ttl, bounds: TtlBounds) -> Self {
        Self { issuer, desk, default_ttl, bounds, aws_ttl: default_ttl }
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
            Some(secs) => Ttl::from_request(secs, self.bounds).map_err(|e| invalid("ttl_seconds", e))?,
        };
        let spiffe_id = match req.spiffe_id.as_str() {
            "" => None,
            s => Some(WorkloadId::parse(s).map_err(|e| invalid("spiffe_id", e))?),
        };
        let csr = VerifiedCsr::parse(&req.csr).map_err(|e| invalid("csr", e))?;
        let request = IssueRequest {
            ask: Ask::X509 { key: KeySource::Csr(csr) },
            ttl,
            spiffe_id,
            origin: Origin { api: API, rotates: None, emergency: None },
        };
        let issued = self.issuer.issue(Caller::Local(&peer), request).await.map_err(|e| status(&e))?;
        let (credential_id, identity) = (issued.credential_id.clone(), issued.identity.to_string());
        let lifetime = Some(super::lifetime(&issued.lifetime));
        let Credential::X509(x) = issued.credential else { return Err(wrong_kind()) };
        Ok(Response::new(IssueX509Response {
            credential_id,
            spiffe_id: identity,
            cert_chain: vec![x.svid.cert_der],
            trust_bundle: x.bundle,
            not_after: unix_secs(x.svid.not_after),
            serial: x.svid.serial,
            lifetime,
        }))
    }

    async fn issue_aws(&self, request: Request<IssueAwsRequest>) -> Result<Response<IssueAwsResponse>, Status> {
        let peer = request.extensions().get::<PeerInfo>().cloned().unwrap_or_else(PeerInfo::without_credentials);
        let req = request.into_inner();
        let role = AwsRole::parse(req.role.trim()).map_err(|e| invalid("role", e))?;
        let ttl = match req.ttl_seconds {
            None => self.aws_ttl,
            Some(secs) => Ttl::from_request(secs, self.bounds).map_err(|e| invalid("ttl_seconds", e))?,
        };
        let spiffe_id = match req.spiffe_id.as_str() {
            "" => None,
            s => Some(WorkloadId::parse(s).map_err(|e| invalid("spiffe_id", e))?),
        };
        let origin = Origin { api: API, rotates: None, emergency: None };
        let request = IssueRequest { ask: Ask::Aws { role }, ttl, spiffe_id, origin };
        let issued = self.issuer.issue(Caller::Local(&peer), request).await.map_err(|e| status(&e))?;
        let Credential::Aws(aws) = &issued.credential else { return Err(wrong_kind()) };
        Ok(Response::new(IssueAwsResponse {
            credential_id: issued.credential_id.clone(),
            spiffe_id: issued.identity.to_string(),
            credentials: Some(aws_credentials(aws)),
            lifetime: Some(super::lifetime(&issued.lifetime)),
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
            Some(secs) => Ttl::from_request(secs, self.bounds).map_err(|e| invalid("ttl_seconds", e))?,
        };
        let ask = match req.kind.as_str() {
            "x509" => Ask::X509 { key: KeySource::Csr(VerifiedCsr::parse(&req.csr).map_err(|e| invalid("csr", e))?) },
            "jwt" => Ask::Jwt { audiences: vec![text("audience", &req.audience, 512)?] },
            "aws" => Ask::Aws { role: AwsRole::parse(req.role.trim()).map_err(|e| invalid("role", e))? },
            "wit" => Ask::Wit,
            other => {
                return Err(invalid("kind", format!("`{}` is not one of x509, jwt, aws, wit", other.escape_debug())));
            }
        };
        let outcome = self
            .desk
            .request(Caller::Local(&peer), EmergencyRequest { ask, ttl, reason, ticket })
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
        let outcome = self.desk.wait(&peer, &id, std::time::Duration::from_secs(20)).await.map_err(|e| status(&e))?;
        Ok(Response::new(emergency_response(outcome)))
    }
}

fn emergency_response(outcome: EmergencyOutcome) -> BreakGlassResponse {
    match outcome {
        EmergencyOutcome::Pending { id, expires_at } => {
            BreakGlassResponse { pending_id: id, pending_until: unix_secs(expires_at), ..Default::default() }
        }
        EmergencyOutcome::Issued(issued) => issued_response(*issued),
    }
}

fn issued_response(issued: Issued) -> BreakGlassResponse {
    let (credential_id, spiffe_id) = (issued.credential_id, issued.identity.to_string());
    let lifetime = Some(super::lifetime(&issued.lifetime));
    let answer = match issued.credential {
        Credential::X509(x) => BreakGlassResponse {
            credential_id,
            spiffe_id,
            not_after: unix_secs(x.svid.not_after),
            serial: x.svid.serial,
            cert_chain: vec![x.svid.cert_der],
            trust_bundle: x.bundle,
            ..Default::default()
        },
        Credential::Jwt(svid) => BreakGlassResponse {
            credential_id,
            spiffe_id,
            not_after: unix_secs(svid.not_after),
            serial: svid.jti.clone(),
            token: svid.token.expose().to_owned(),
            ..Default::default()
        },
        Credential::Aws(aws) => BreakGlassResponse {
            credential_id,
            spiffe_id,
            not_after: unix_secs(aws.session.expiration),
            serial: aws.session.access_key_id.clone(),
            aws: Some(aws_credentials(&aws)),
            ..Default::default()
        },
        Credential::Wit(wit) => BreakGlassResponse {
            credential_id,
            spiffe_id,
            not_after: unix_secs(wit.svid.not_after),
            serial: wit.svid.jti.clone(),
            token: wit.svid.token.expose().to_owned(),
            wit_key: wit.key.private_jwk().expose().to_owned(),
            ..Default::default()
        },
    };
    BreakGlassResponse { lifetime, ..answer }
}
