//! The SPIFFE Workload API (`SpiffeWorkloadAPI`, the standard proto, no package) on the
//! workload socket, beside `mayfly.v1`. Every call must carry `workload.spiffe.io: true`.
//! Issuance goes through the one `Issuer` path (attest → inventory → policy → ledger →
//! mint → ledger); this module only turns wire requests into domain requests and keeps
//! streams current: a fresh SVID at a fraction of its lifetime, every bundle change, and an
//! empty set (then PERMISSION_DENIED) when the identity loses its entitlement or the SVID
//! is revoked. Serves X.509 SVIDs, JWT-SVIDs and WIT-SVIDs (`FetchWITSVID` with a key
//! mayfly makes, as a private JWK; `FetchWITBundles` with the WIT keys). Decides nothing.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use prost_types::value::Kind;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::metadata::MetadataMap;
use tonic::{Code, Request, Response, Status};

use super::spiffe::spiffe_workload_api_server::SpiffeWorkloadApi;
use super::spiffe::{
    JwtBundlesRequest, JwtBundlesResponse, Jwtsvid, JwtsvidRequest, JwtsvidResponse, ValidateJwtsvidRequest,
    ValidateJwtsvidResponse, WitBundlesRequest, WitBundlesResponse, Witsvid, WitsvidRequest, WitsvidResponse,
    X509BundlesRequest, X509BundlesResponse, X509svidRequest, X509svidResponse,
};
use super::{invalid, status, wiped};
use crate::attest::PeerInfo;
use crate::clock::Clock;
use crate::identity::{TrustDomain, Ttl, WorkloadId};
use crate::issue::{Ask, Caller, Credential, IssueError, IssueRequest, Issued, Issuer, KeySource, Origin};
use crate::keys::{SecretDer, SecretString};
use crate::mint::{MintError, TrustBundle, X509Svid};
use crate::policy::store::PolicyStore;
use crate::revoke::Revocations;
use crate::validate::Validator;

/// The metadata every Workload API call must carry (SPIFFE Workload Endpoint spec): it
/// keeps a browser or an SSRF-able HTTP client from reaching the API.
pub const SECURITY_HEADER: &str = "workload.spiffe.io";
const API: &str = "spiffe_workload_api";
/// Audiences per JWT request, and bytes per audience.
const MAX_AUDIENCES: usize = 16;
const MAX_AUDIENCE_BYTES: usize = 512;
/// After a failed re-issuance that is not a denial (the ledger is unavailable), try again
/// after this long (or sooner, if the SVID would expire first).
const RETRY_AFTER: Duration = Duration::from_secs(10);
/// WIT-SVIDs one FetchWITSVID stream holds at most (one per identity the caller matches).
const MAX_WITS_PER_STREAM: usize = 16;

#[derive(Clone, Debug)]
pub struct WorkloadApiSettings {
    pub trust_domain: TrustDomain,
    /// Requested lifetime of X.509 SVIDs (policy may grant less).
    pub x509_ttl: Ttl,
    /// Requested lifetime of JWT-SVIDs (policy may grant less).
    pub jwt_ttl: Ttl,
    /// Requested lifetime of WIT-SVIDs (policy may grant less).
    pub wit_ttl: Ttl,
    /// A pushed SVID is renewed when this share of its lifetime has passed (1..=99).
    pub rotate_at_percent: u32,
}

pub struct WorkloadApiService {
    issuer: Arc<Issuer>,
    validator: Arc<Validator>,
    policy: Arc<PolicyStore>,
    revocations: Arc<Revocations>,
    clock: Arc<dyn Clock>,
    settings: WorkloadApiSettings,
    bundles: watch::Receiver<Arc<TrustBundle>>,
    /// Flips to true at shutdown: streams end so the drain can finish.
    stop: watch::Receiver<bool>,
    /// Open streams are counted here (`mayfly_workload_api_streams`).
    metrics: Option<Arc<crate::telemetry::Metrics>>,
}

impl WorkloadApiService {
    pub fn with_metrics(mut self, metrics: Arc<crate::telemetry::Metrics>) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// Counts a stream open until the returned guard is dropped (the stream's task ends).
    fn opened(&self, stream: &'static str) -> Option<crate::telemetry::StreamGuard> {
        self.metrics.as_ref().map(|m| m.stream_opened(stream))
    }

    #[expect(clippy::too_many_arguments, reason = "the narrow handles the Workload API uses, each named")]
    pub fn new(
        issuer: Arc<Issuer>,
        validator: Arc<Validator>,
        policy: Arc<PolicyStore>,
        revocations: Arc<Revocations>,
        clock: Arc<dyn Clock>,
        settings: WorkloadApiSettings,
        bundles: watch::Receiver<Arc<TrustBundle>>,
        stop: watch::Receiver<bool>,
    ) -> Self {
        Self { issuer, validator, policy, revocations, clock, settings, bundles, stop, metrics: None }
    }

    fn trust_domain_key(&self) -> String {
        format!("spiffe://{}", self.settings.trust_domain)
    }

    async fn issue_x509(&self, peer: &PeerInfo, rotates: Option<String>) -> Result<Svid, IssueError> {
        issue_svid(&self.issuer, peer, self.settings.x509_ttl, None, rotates).await
    }

    /// FetchX509SVID: the security header, the first SVID (issued before the call is
    /// answered, so a caller with no entitlement gets PERMISSION_DENIED as the call's
    /// status, as the spec asks), then the stream that keeps it current, as encoded
    /// gRPC messages (`api::wiped` serves them).
    pub(crate) async fn x509_svid_frames(
        &self,
        metadata: &MetadataMap,
        peer: PeerInfo,
    ) -> Result<mpsc::Receiver<Result<bytes::Bytes, Status>>, Status> {
        check_header(metadata)?;
        let first = self.issue_x509(&peer, None).await.map_err(|e| status(&e))?;
        let (tx, rx) = mpsc::channel(2);
        let stream = SvidStream {
            issuer: self.issuer.clone(),
            store: self.policy.clone(),
            revocations: self.revocations.clone(),
            clock: self.clock.clone(),
            settings: self.settings.clone(),
            bundles: self.bundles.clone(),
            policy: self.policy.changes(),
            revocation_changes: self.revocations.changes(),
            stop: self.stop.clone(),
            peer,
            tx,
        };
        let open = self.opened("x509_svid");
        tokio::spawn(async move {
            stream.run(first).await;
            drop(open);
        });
        Ok(rx)
    }
}

/// An X.509 SVID a stream holds: the key leaves with the first message it is in.
struct Svid {
    credential_id: String,
    identity: WorkloadId,
    svid: X509Svid,
    private_key: Option<SecretDer>,
}

/// An X.509 SVID with a key mayfly makes, through the one pipeline.
async fn issue_svid(
    issuer: &Issuer,
    peer: &PeerInfo,
    ttl: Ttl,
    spiffe_id: Option<WorkloadId>,
    rotates: Option<String>,
) -> Result<Svid, IssueError> {
    let req = IssueRequest {
        ask: Ask::X509 { key: KeySource::ServerMade },
        ttl,
        spiffe_id,
        origin: Origin { api: API, rotates, emergency: None },
    };
    let Issued { credential_id, identity, credential, .. } = issuer.issue(Caller::Local(peer), req).await?;
    match credential {
        Credential::X509(x) => Ok(Svid { credential_id, identity, svid: x.svid, private_key: x.private_key }),
        // Why an error, not a panic: the pipeline mints the kind it is asked for.
        _ => Err(IssueError::Mint(MintError::Signing("unexpected credential kind".into()))),
    }
}

/// A WIT-SVID a stream holds: its key leaves with the first message it is in.
struct HeldWit {
    credential_id: String,
    identity: WorkloadId,
    token: SecretString,
    /// The private JWK, until the message carrying it is sent. Zeroized on drop.
    key: Option<SecretString>,
    not_before: SystemTime,
    not_after: SystemTime,
}

/// A WIT-SVID with a key mayfly makes, through the one pipeline.
async fn issue_wit(
    issuer: &Issuer,
    peer: &PeerInfo,
    ttl: Ttl,
    spiffe_id: Option<WorkloadId>,
    rotates: Option<String>,
) -> Result<HeldWit, IssueError> {
    let req = IssueRequest { ask: Ask::Wit, ttl, spiffe_id, origin: Origin { api: API, rotates, emergency: None } };
    let Issued { credential_id, identity, credential, .. } = issuer.issue(Caller::Local(peer), req).await?;
    match credential {
        Credential::Wit(w) => Ok(HeldWit {
            credential_id,
            identity,
            not_before: w.svid.not_before,
            not_after: w.svid.not_after,
            token: w.svid.token,
            key: Some(SecretString::new(w.key.private_jwk().expose().to_owned())),
        }),
        // Why an error, not a panic: the pipeline mints the kind it is asked for.
        _ => Err(IssueError::Mint(MintError::Signing("unexpected credential kind".into()))),
    }
}

/// WIT-SVIDs for every identity the caller is entitled to, or for the one it names. A
/// caller that matches several identities gets one WIT for each that policy allows (each
/// its own recorded decision), after the recorded refusal of the request that named none.
async fn issue_wits(
    issuer: &Issuer,
    peer: &PeerInfo,
    ttl: Ttl,
    spiffe_id: Option<WorkloadId>,
) -> Result<Vec<HeldWit>, IssueError> {
    let named = spiffe_id.is_some();
    match issue_wit(issuer, peer, ttl, spiffe_id, None).await {
        Ok(held) => Ok(vec![held]),
        Err(IssueError::Ambiguous(ids)) if !named => {
            let mut held = Vec::new();
            let mut refused = None;
            for id in ids.iter().take(MAX_WITS_PER_STREAM).filter_map(|id| WorkloadId::parse(id).ok()) {
                match issue_wit(issuer, peer, ttl, Some(id), None).await {
                    Ok(w) => held.push(w),
                    Err(e) if lost_entitlement(&e) => refused = Some(e),
                    Err(e) => return Err(e),
                }
            }
            match refused {
                _ if !held.is_empty() => Ok(held),
                Some(e) => Err(e),
                None => Err(IssueError::Ambiguous(ids)),
            }
        }
        Err(e) => Err(e),
    }
}

/// One WIT-SVID on the wire with its private JWK (prost's copies are beyond zeroize's
/// reach: built, sent, dropped).
fn wit_svid(held: &HeldWit) -> Witsvid {
    Witsvid {
        spiffe_id: held.identity.to_string(),
        wit_svid: held.token.expose().to_owned(),
        wit_svid_key: held.key.as_ref().map(|k| k.expose().to_owned()).unwrap_or_default(),
        hint: String::new(),
    }
}

/// Why a pushed credential must leave its stream now: it was revoked, or its identity
/// is locked.
fn withdrawal(
    revocations: &Revocations,
    credential_id: &str,
    identity: &WorkloadId,
    now: SystemTime,
) -> Option<IssueError> {
    if revocations.is_revoked(credential_id) {
        return Some(IssueError::Revoked(credential_id.to_owned()));
    }
    revocations.lock_for(identity, now).map(|l| IssueError::Locked { identity: identity.to_string(), reason: l.reason })
}

/// Refuses a call without `workload.spiffe.io: true`, before anything else happens.
fn check_header(metadata: &MetadataMap) -> Result<(), Status> {
    match metadata.get(SECURITY_HEADER).and_then(|v| v.to_str().ok()) {
        Some("true") => Ok(()),
        _ => {
            tracing::info!("workload api call without the security header refused");
            Err(Status::invalid_argument("security header missing from request"))
        }
    }
}

fn peer_of<T>(request: &Request<T>) -> PeerInfo {
    request.extensions().get::<PeerInfo>().cloned().unwrap_or_else(PeerInfo::without_credentials)
}

fn bundle_crls(bundle: &TrustBundle) -> Vec<Vec<u8>> {
    bundle.crls.clone()
}

fn concat(certs: &[Vec<u8>]) -> Vec<u8> {
    certs.concat()
}

/// The message carrying `issued` (and its key, the first time), as a self-wiping frame.
fn svid_response(issued: &Svid, bundle: &TrustBundle) -> Result<bytes::Bytes, Status> {
    wiped::svid_frame(&wiped::SvidMessage {
        spiffe_id: issued.identity.as_str(),
        cert_der: &issued.svid.cert_der,
        key: issued.private_key.as_ref(),
        bundle: &concat(&bundle.x509),
        crls: &bundle.crls,
    })
}

/// A message without an SVID (the withdrawal), as a frame.
fn empty_response(crl: Vec<Vec<u8>>) -> Result<bytes::Bytes, Status> {
    wiped::plain_frame(&X509svidResponse { svids: vec![], crl, federated_bundles: HashMap::new() })
}

/// When a pushed SVID is renewed: `percent` of the way from not-before to not-after.
pub fn rotation_time(not_before: SystemTime, not_after: SystemTime, percent: u32) -> SystemTime {
    let life = not_after.duration_since(not_before).unwrap_or_default();
    not_before + life.mul_f64(f64::from(percent.clamp(1, 99)) / 100.0)
}

/// The first instant after the last valid day of an inventory entry.
fn end_of_day(date: time::Date) -> SystemTime {
    let next = date.next_day().unwrap_or(date);
    SystemTime::from(next.midnight().assume_utc())
}

/// Whether a failed re-issuance means the identity is no longer entitled (drop its SVID).
fn lost_entitlement(err: &IssueError) -> bool {
    matches!(status(err).code(), Code::PermissionDenied | Code::Unauthenticated | Code::FailedPrecondition)
}

#[tonic::async_trait]
impl SpiffeWorkloadApi for WorkloadApiService {
    type FetchX509SVIDStream = ReceiverStream<Result<X509svidResponse, Status>>;
    type FetchX509BundlesStream = ReceiverStream<Result<X509BundlesResponse, Status>>;
    type FetchJWTBundlesStream = ReceiverStream<Result<JwtBundlesResponse, Status>>;
    type FetchWITSVIDStream = ReceiverStream<Result<WitsvidResponse, Status>>;
    type FetchWITBundlesStream = ReceiverStream<Result<WitBundlesResponse, Status>>;

    /// Served by `api::wiped` (in front of this service), which encodes the key into
    /// buffers that wipe themselves; reaching this means the route was not installed, and
    /// no key is sent through a codec that would leave copies of it.
    async fn fetch_x509svid(
        &self,
        _request: Request<X509svidRequest>,
    ) -> Result<Response<Self::FetchX509SVIDStream>, Status> {
        tracing::error!("FetchX509SVID reached the generated service; api::wiped::WithWipedSvids is not installed");
        Err(Status::internal("internal error: FetchX509SVID is not served on this route"))
    }

    async fn fetch_x509_bundles(
        &self,
        request: Request<X509BundlesRequest>,
    ) -> Result<Response<Self::FetchX509BundlesStream>, Status> {
        check_header(request.metadata())?;
        let key = self.trust_domain_key();
        let make = move |b: &TrustBundle| X509BundlesResponse {
            crl: bundle_crls(b),
            bundles: HashMap::from([(key.clone(), concat(&b.x509))]),
        };
        Ok(Response::new(follow_bundles(self.bundles.clone(), self.stop.clone(), self.opened("x509_bundles"), make)))
    }

    async fn fetch_jwtsvid(&self, request: Request<JwtsvidRequest>) -> Result<Response<JwtsvidResponse>, Status> {
        check_header(request.metadata())?;
        let peer = peer_of(&request);
        let req = request.into_inner();
        if req.audience.is_empty() {
            return Err(invalid("audience", "at least one audience is required"));
        }
        if req.audience.len() > MAX_AUDIENCES {
            return Err(invalid("audience", format!("at most {MAX_AUDIENCES} audiences")));
        }
        if let Some(bad) = req
            .audience
            .iter()
            .find(|a| a.is_empty() || a.len() > MAX_AUDIENCE_BYTES || a.chars().any(char::is_control))
        {
            return Err(invalid(
                "audience",
                format!("`{}` must be 1..={MAX_AUDIENCE_BYTES} bytes without control characters", bad.escape_debug()),
            ));
        }
        let spiffe_id = match req.spiffe_id.as_str() {
            "" => None,
            s => Some(WorkloadId::parse(s).map_err(|e| invalid("spiffe_id", e))?),
        };
        let request = IssueRequest {
            ask: Ask::Jwt { audiences: req.audience },
            ttl: self.settings.jwt_ttl,
            spiffe_id,
            origin: Origin { api: API, rotates: None, emergency: None },
        };
        let issued = self.issuer.issue(Caller::Local(&peer), request).await.map_err(|e| status(&e))?;
        let Credential::Jwt(svid) = &issued.credential else { return Err(super::wrong_kind()) };
        Ok(Response::new(JwtsvidResponse {
            svids: vec![Jwtsvid {
                spiffe_id: issued.identity.to_string(),
                svid: svid.token.expose().to_owned(),
                hint: String::new(),
            }],
        }))
    }

    async fn fetch_jwt_bundles(
        &self,
        request: Request<JwtBundlesRequest>,
    ) -> Result<Response<Self::FetchJWTBundlesStream>, Status> {
        check_header(request.metadata())?;
        let key = self.trust_domain_key();
        let make = move |b: &TrustBundle| JwtBundlesResponse {
            bundles: HashMap::from([(key.clone(), b.jwks.to_string().into_bytes())]),
        };
        Ok(Response::new(follow_bundles(self.bundles.clone(), self.stop.clone(), self.opened("jwt_bundles"), make)))
    }

    async fn validate_jwtsvid(
        &self,
        request: Request<ValidateJwtsvidRequest>,
    ) -> Result<Response<ValidateJwtsvidResponse>, Status> {
        check_header(request.metadata())?;
        let peer = peer_of(&request);
        let req = request.into_inner();
        if req.audience.is_empty() {
            return Err(invalid("audience", "required"));
        }
        if req.svid.is_empty() {
            return Err(invalid("svid", "required"));
        }
        let validated = self.validator.validate_jwt(&peer, &req.svid, &req.audience).await.map_err(|e| status(&e))?;
        let claims =
            prost_types::Struct { fields: validated.claims.into_iter().map(|(k, v)| (k, to_prost(v))).collect() };
        Ok(Response::new(ValidateJwtsvidResponse { spiffe_id: validated.identity.to_string(), claims: Some(claims) }))
    }

    async fn fetch_witsvid(
        &self,
        request: Request<WitsvidRequest>,
    ) -> Result<Response<Self::FetchWITSVIDStream>, Status> {
        check_header(request.metadata())?;
        let peer = peer_of(&request);
        let spiffe_id = match request.into_inner().spiffe_id.as_str() {
            "" => None,
            s => Some(WorkloadId::parse(s).map_err(|e| invalid("spiffe_id", e))?),
        };
        // As for X.509: the first WITs are issued before the call is answered, so a caller
        // with no entitlement gets PERMISSION_DENIED as the call's status.
        let first = issue_wits(&self.issuer, &peer, self.settings.wit_ttl, spiffe_id).await.map_err(|e| status(&e))?;
        let (tx, rx) = mpsc::channel(2);
        let stream = WitStream {
            issuer: self.issuer.clone(),
            store: self.policy.clone(),
            revocations: self.revocations.clone(),
            clock: self.clock.clone(),
            settings: self.settings.clone(),
            policy: self.policy.changes(),
            revocation_changes: self.revocations.changes(),
            stop: self.stop.clone(),
            peer,
            tx,
        };
        tokio::spawn(stream.run(first));
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn fetch_wit_bundles(
        &self,
        request: Request<WitBundlesRequest>,
    ) -> Result<Response<Self::FetchWITBundlesStream>, Status> {
        check_header(request.metadata())?;
        let key = self.trust_domain_key();
        let make = move |b: &TrustBundle| WitBundlesResponse {
            bundles: HashMap::from([(key.clone(), b.wit_jwks.to_string())]),
        };
        // Only the WIT keys' changes: a new CRL or CA says nothing to a WIT verifier.
        Ok(Response::new(follow_changes(self.bundles.clone(), self.stop.clone(), make)))
    }
}

/// One open FetchWITSVID stream: owns the caller's current WIT-SVIDs, one per entitled
/// identity, and renews them at the configured share of their life and on a new policy
/// release (re-decided). A WIT that is revoked, whose identity is locked or that loses its
/// entitlement leaves the set; an empty set is followed by PERMISSION_DENIED. Every message
/// carries a key for each of its WITs — the keys leave with the message — so a set that
/// changes is sent as freshly issued WITs. A new WIT key needs no renewal: the old key stays
/// published until its WITs have expired.
struct WitStream {
    issuer: Arc<Issuer>,
    store: Arc<PolicyStore>,
    revocations: Arc<Revocations>,
    clock: Arc<dyn Clock>,
    settings: WorkloadApiSettings,
    policy: watch::Receiver<u64>,
    revocation_changes: watch::Receiver<u64>,
    stop: watch::Receiver<bool>,
    peer: PeerInfo,
    tx: mpsc::Sender<Result<WitsvidResponse, Status>>,
}

impl WitStream {
    async fn run(mut self, first: Vec<HeldWit>) {
        let mut current = first;
        self.policy.mark_unchanged();
        self.revocation_changes.mark_unchanged();
        if !self.send(&mut current).await {
            return;
        }
        let mut retry_at: Option<SystemTime> = None;
        loop {
            let percent = self.settings.rotate_at_percent;
            let due = current
                .iter()
                .flat_map(|w| {
                    let entry_end = self.store.entry_expires(&w.identity).map(end_of_day);
                    [Some(rotation_time(w.not_before, w.not_after, percent)), entry_end]
                })
                .chain([retry_at])
                .flatten()
                .min()
                .unwrap_or_else(|| self.clock.now());
            let wake = tokio::select! {
                () = self.clock.sleep_until(due) => Wake::Due,
                r = self.policy.changed() => if r.is_ok() { Wake::PolicyChanged } else { Wake::Gone },
                r = self.revocation_changes.changed() => if r.is_ok() { Wake::Revocation } else { Wake::Gone },
                () = self.tx.closed() => Wake::Gone,
                _ = self.stop.wait_for(|s| *s) => Wake::Gone,
            };
            let why = match wake {
                Wake::Gone | Wake::BundleChanged => return,
                Wake::Due => "rotation",
                Wake::PolicyChanged => "policy release changed",
                Wake::Revocation => "revocation",
            };
            // Whatever woke the stream, a revoked WIT (or a locked identity's) leaves now.
            let now = self.clock.now();
            let mut refusal = None;
            current.retain(|w| match withdrawal(&self.revocations, &w.credential_id, &w.identity, now) {
                None => true,
                Some(err) => {
                    tracing::info!(identity = %w.identity, credential_id = w.credential_id, reason = %err, "wit withdrawn from the stream");
                    refusal = Some(Status::permission_denied(err.to_string()));
                    false
                }
            });
            if matches!(wake, Wake::Revocation) && refusal.is_none() {
                continue;
            }
            tracing::debug!(wits = current.len(), why, "renewing pushed wits");
            let mut renewed = Vec::with_capacity(current.len());
            let mut transient = None;
            for held in &current {
                let rotates = Some(held.credential_id.clone());
                match issue_wit(&self.issuer, &self.peer, self.settings.wit_ttl, Some(held.identity.clone()), rotates)
                    .await
                {
                    Ok(next) => renewed.push(next),
                    Err(e) if lost_entitlement(&e) => {
                        tracing::info!(identity = %held.identity, credential_id = held.credential_id, reason = %e, "entitlement lost; wit withdrawn from the stream");
                        refusal = Some(status(&e));
                    }
                    Err(e) => transient = Some(e),
                }
            }
            if let Some(e) = transient {
                // The set stays as it is (its keys were handed out) until it can be renewed
                // whole; the WITs made in this round are on record but never sent.
                let expired = current.iter().any(|w| w.not_after <= now);
                if expired || refusal.is_some() {
                    let _ = self.tx.send(Err(status(&e))).await;
                    return;
                }
                let left = current.iter().map(|w| w.not_after.duration_since(now).unwrap_or_default()).min();
                retry_at = Some(now + RETRY_AFTER.min(left.unwrap_or_default() / 2));
                tracing::warn!(error = %e, "wit renewal failed; the current wits stay until they can be renewed");
                continue;
            }
            retry_at = None;
            current = renewed;
            if current.is_empty() {
                // The set without any WIT, then the spec's PERMISSION_DENIED: the client drops
                // them and may reconnect (and be re-decided) after a backoff.
                if self.tx.send(Ok(WitsvidResponse { svids: vec![] })).await.is_ok() {
                    let denied = refusal.unwrap_or_else(|| Status::permission_denied("no WIT-SVID is left"));
                    let _ = self.tx.send(Err(denied)).await;
                }
                return;
            }
            if !self.send(&mut current).await {
                return;
            }
        }
    }

    /// Sends the set, then drops its keys: they were handed over; the stream keeps only
    /// the tokens' facts. False when the client is gone.
    async fn send(&self, current: &mut [HeldWit]) -> bool {
        let message = WitsvidResponse { svids: current.iter().map(wit_svid).collect() };
        let sent = self.tx.send(Ok(message)).await.is_ok();
        for held in current.iter_mut() {
            drop(held.key.take());
        }
        sent
    }
}

/// One open FetchX509SVID stream: owns the caller's current SVID and renews it.
struct SvidStream {
    issuer: Arc<Issuer>,
    store: Arc<PolicyStore>,
    revocations: Arc<Revocations>,
    clock: Arc<dyn Clock>,
    settings: WorkloadApiSettings,
    bundles: watch::Receiver<Arc<TrustBundle>>,
    policy: watch::Receiver<u64>,
    revocation_changes: watch::Receiver<u64>,
    stop: watch::Receiver<bool>,
    peer: PeerInfo,
    tx: mpsc::Sender<Result<bytes::Bytes, Status>>,
}

enum Wake {
    Due,
    PolicyChanged,
    BundleChanged,
    Revocation,
    Gone,
}

impl SvidStream {
    async fn run(mut self, first: Svid) {
        let mut current = first;
        self.bundles.mark_unchanged();
        self.policy.mark_unchanged();
        self.revocation_changes.mark_unchanged();
        let mut sent = self.bundles.borrow().clone();
        if self.tx.send(svid_response(&current, &sent)).await.is_err() {
            return;
        }
        // Why: the key was handed over (its frame wipes itself once sent); the stream
        // keeps only the certificate facts.
        drop(current.private_key.take());
        let mut retry_at: Option<SystemTime> = None;
        loop {
            let rotate_at =
                rotation_time(current.svid.not_before, current.svid.not_after, self.settings.rotate_at_percent);
            // Why: an inventory entry that expires ends the identity's entitlement that day,
            // not at the next rotation.
            let entry_end = self.store.entry_expires(&current.identity).map(end_of_day);
            let due = [Some(rotate_at), entry_end, retry_at].into_iter().flatten().min().unwrap_or(rotate_at);
            let wake = tokio::select! {
                () = self.clock.sleep_until(due) => Wake::Due,
                r = self.policy.changed() => if r.is_ok() { Wake::PolicyChanged } else { Wake::Gone },
                r = self.bundles.changed() => if r.is_ok() { Wake::BundleChanged } else { Wake::Gone },
                r = self.revocation_changes.changed() => if r.is_ok() { Wake::Revocation } else { Wake::Gone },
                () = self.tx.closed() => Wake::Gone,
                _ = self.stop.wait_for(|s| *s) => Wake::Gone,
            };
            if matches!(wake, Wake::Gone) {
                return;
            }
            // Whatever woke the stream, a revoked SVID (or a locked identity's) leaves the
            // workload now, not at the next rotation; the stream ends and is never renewed.
            let refusal = withdrawal(&self.revocations, &current.credential_id, &current.identity, self.clock.now());
            if let Some(err) = refusal {
                tracing::info!(identity = %current.identity, credential_id = current.credential_id, reason = %err, "svid withdrawn from the stream");
                let empty = empty_response(bundle_crls(&self.bundles.borrow()));
                if self.tx.send(empty).await.is_ok() {
                    let _ = self.tx.send(Err(Status::permission_denied(err.to_string()))).await;
                }
                return;
            }
            if matches!(wake, Wake::Revocation) {
                continue;
            }
            // A JWT-only change (a new JWT signing key) leaves the X.509 SVID as it is. A new
            // CA or CRL renews it: the key left with the last message, and a message without
            // an SVID would read as a withdrawal.
            if matches!(wake, Wake::BundleChanged) {
                let now = self.bundles.borrow();
                if now.x509 == sent.x509 && now.crls == sent.crls {
                    continue;
                }
            }
            let why = match wake {
                Wake::Gone => return,
                Wake::Due => "rotation",
                Wake::PolicyChanged => "policy release changed",
                Wake::BundleChanged => "trust bundle changed",
                Wake::Revocation => "revocation",
            };
            tracing::debug!(identity = %current.identity, credential_id = current.credential_id, why, "renewing pushed x509 svid");
            match self.renew(&current).await {
                Ok(next) => {
                    retry_at = None;
                    current = next;
                    sent = self.bundles.borrow_and_update().clone();
                    if self.tx.send(svid_response(&current, &sent)).await.is_err() {
                        return;
                    }
                    drop(current.private_key.take());
                }
                Err(e) if lost_entitlement(&e) => {
                    tracing::info!(identity = %current.identity, credential_id = current.credential_id, reason = %e, "entitlement lost; svid withdrawn from the stream");
                    // The set without the SVID, then the spec's PERMISSION_DENIED: the client
                    // drops the SVID and may reconnect (and be re-decided) after a backoff.
                    if self.tx.send(empty_response(vec![])).await.is_ok() {
                        let _ = self.tx.send(Err(status(&e))).await;
                    }
                    return;
                }
                Err(e) => {
                    let now = self.clock.now();
                    if current.svid.not_after <= now {
                        let _ = self.tx.send(Err(status(&e))).await;
                        return;
                    }
                    let left = current.svid.not_after.duration_since(now).unwrap_or_default();
                    retry_at = Some(now + RETRY_AFTER.min(left / 2));
                    tracing::warn!(identity = %current.identity, error = %e, "svid renewal failed; the current svid stays until it can be renewed");
                }
            }
        }
    }

    async fn renew(&self, current: &Svid) -> Result<Svid, IssueError> {
        let rotates = Some(current.credential_id.clone());
        issue_svid(&self.issuer, &self.peer, self.settings.x509_ttl, Some(current.identity.clone()), rotates).await
    }
}

/// A stream that sends the current bundle at once and again after every change, until
/// the client goes away or the daemon stops.
fn follow_bundles<T: Send + 'static>(
    mut bundles: watch::Receiver<Arc<TrustBundle>>,
    mut stop: watch::Receiver<bool>,
    open: Option<crate::telemetry::StreamGuard>,
    make: impl Fn(&TrustBundle) -> T + Send + 'static,
) -> ReceiverStream<Result<T, Status>> {
    let (tx, rx) = mpsc::channel(2);
    tokio::spawn(async move {
        // Counted open until this task ends.
        let _open = open;
        loop {
            let message = make(&bundles.borrow_and_update());
            if tx.send(Ok(message)).await.is_err() {
                return;
            }
            tokio::select! {
                r = bundles.changed() => if r.is_err() { return },
                () = tx.closed() => return,
                _ = stop.wait_for(|s| *s) => return,
            }
        }
    });
    ReceiverStream::new(rx)
}

/// Like `follow_bundles`, but a message only when it differs from the last one sent.
fn follow_changes<T: PartialEq + Clone + Send + 'static>(
    mut bundles: watch::Receiver<Arc<TrustBundle>>,
    mut stop: watch::Receiver<bool>,
    make: impl Fn(&TrustBundle) -> T + Send + 'static,
) -> ReceiverStream<Result<T, Status>> {
    let (tx, rx) = mpsc::channel(2);
    tokio::spawn(async move {
        let mut sent: Option<T> = None;
        loop {
            let message = make(&bundles.borrow_and_update());
            if sent.as_ref() != Some(&message) {
                if tx.send(Ok(message.clone())).await.is_err() {
                    return;
                }
                sent = Some(message);
            }
            tokio::select! {
                r = bundles.changed() => if r.is_err() { return },
                () = tx.closed() => return,
                _ = stop.wait_for(|s| *s) => return,
            }
        }
    });
    ReceiverStream::new(rx)
}

fn to_prost(value: serde_json::Value) -> prost_types::Value {
    use serde_json::Value as J;
    let kind = match value {
        J::Null => Kind::NullValue(0),
        J::Bool(b) => Kind::BoolValue(b),
        J::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or_default()),
        J::String(s) => Kind::StringValue(s),
        J::Array(items) => {
            Kind::ListValue(prost_types::ListValue { values: items.into_iter().map(to_prost).collect() })
        }
        J::Object(map) => {
            Kind::StructValue(prost_types::Struct { fields: map.into_iter().map(|(k, v)| (k, to_prost(v))).collect() })
        }
    };
    prost_types::Value { kind: Some(kind) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotation_is_due_at_the_configured_share_of_the_lifetime() {
        let nb = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000);
        let na = nb + Duration::from_secs(3_600);
        assert_eq!(rotation_time(nb, na, 50), nb + Duration::from_secs(1_800));
        assert_eq!(rotation_time(nb, na, 80), nb + Duration::from_secs(2_880));
        assert_eq!(rotation_time(nb, na, 0), nb + Duration::from_secs(36), "clamped to at least 1%");
    }

    #[test]
    fn an_entry_ends_at_midnight_after_its_last_day() {
        let d = time::macros::date!(2027 - 12 - 31);
        assert_eq!(end_of_day(d), SystemTime::from(time::macros::datetime!(2028-01-01 00:00 UTC)));
    }

    #[test]
    fn the_security_header_must_say_true() {
        let mut m = MetadataMap::new();
        assert_eq!(check_header(&m).unwrap_err().code(), Code::InvalidArgument);
        m.insert(SECURITY_HEADER, "false".parse().unwrap());
        assert_eq!(check_header(&m).unwrap_err().code(), Code::InvalidArgument);
        m.insert(SECURITY_HEADER, "true".parse().unwrap());
        assert!(check_header(&m).is_ok());
    }

    #[test]
    fn claims_keep_their_json_types() {
        let v = to_prost(serde_json::json!({ "aud": ["a"], "exp": 5, "sub": "x" }));
        let Some(Kind::StructValue(s)) = v.kind else { panic!("not a struct") };
        assert!(matches!(s.fields["exp"].kind, Some(Kind::NumberValue(n)) if n == 5.0));
        assert!(matches!(&s.fields["aud"].kind, Some(Kind::ListValue(l)) if l.values.len() == 1));
    }
}
