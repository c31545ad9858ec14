//! `mayfly.v1.Broker` on the workload socket.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::pb::broker_server::Broker;
use super::pb::{IssueX509Request, IssueX509Response};
use super::{invalid, status};
use crate::attest::PeerInfo;
use crate::clock::unix_secs;
use crate::identity::{Ttl, WorkloadId};
use crate::issue::{Issuer, KeySource, Origin, X509Request};
use crate::mint::VerifiedCsr;

pub struct BrokerService {
    issuer: Arc<Issuer>,
    default_ttl: Ttl,
    max_ttl: Ttl,
}

impl BrokerService {
    pub fn new(issuer: Arc<Issuer>, default_ttl: Ttl, max_ttl: Ttl) -> Self {
        Self { issuer, default_ttl, max_ttl }
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
            .issue_x509(&peer, X509Request { key: KeySource::Csr(csr), ttl, spiffe_id, origin: Origin { api: "mayfly.v1", rotates: None } })
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
}
