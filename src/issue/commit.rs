//! The last steps of an issuance: mint exactly what the grants allow (each grant consumed
//! by its minting), then commit — the lock re-check, the elevated sinks for break-glass
//! (if they fail, nothing is issued), then the durable `issued` event. `Issued`, the only
//! value a credential can leave the pipeline in, is made here and only here, after that
//! event is durable.

use std::time::SystemTime;

use super::{Ask, Authorized, IssueError, Issuer, KeySource, Lifetime, Origin};
use crate::aws::StsSession;
use crate::clock::unix_secs;
use crate::identity::WorkloadId;
use crate::keys::{SecretDer, WorkloadKey};
use crate::ledger::EventId;
use crate::ledger::event::{AwsSessionRecord, CredentialRecord, Event, IssuedDetails};
use crate::mint::{JwtSvid, VerifiedCsr, WitSvid, X509Svid};
use crate::policy::{CredentialKind, JwtGrant};

/// A credential whose `issued` event is durable: what the API answers with.
#[derive(Debug)]
pub struct Issued {
    pub credential_id: String,
    pub identity: WorkloadId,
    pub decision_id: EventId,
    pub issued_id: EventId,
    pub credential: Credential,
    /// Asked for, granted, and what capped it.
    pub lifetime: Lifetime,
    /// Only `commit` can make one: an `Issued` proves its record is durable.
    _durable: Durable,
}

#[derive(Debug)]
struct Durable;

#[derive(Debug)]
pub enum Credential {
    X509(X509Credential),
    /// The token is zeroized on drop; only its jti and SHA-256 are recorded.
    Jwt(JwtSvid),
    Aws(AwsCredential),
    Wit(WitCredential),
}

/// A WIT-SVID and the key it binds. The private JWK is zeroized when this is dropped
/// (after the reply is written); only the key's thumbprint is recorded.
#[derive(Debug)]
pub struct WitCredential {
    pub svid: WitSvid,
    pub key: WorkloadKey,
}

#[derive(Debug)]
pub struct X509Credential {
    pub svid: X509Svid,
    /// The PKCS#8 key, when mayfly made it (`KeySource::ServerMade`). Zeroized on drop.
    pub private_key: Option<SecretDer>,
    pub bundle: Vec<Vec<u8>>,
}

/// An AWS STS session. The secret key and session token are zeroized when this is dropped
/// (after the reply is written).
#[derive(Debug)]
pub struct AwsCredential {
    pub session: StsSession,
    pub role_arn: String,
    pub session_name: String,
    pub source_identity: String,
}

/// The decision that allowed an issuance: on record already, or to be written with it.
pub(crate) enum Decided {
    Recorded(EventId),
    Deferred(Box<crate::ledger::event::Decision>),
}

impl Issuer {
    /// Nothing will be issued after an allow: a deferred decision is written alone now.
    async fn settle(&self, decision: Decided, now: SystemTime) -> Result<EventId, IssueError> {
        match decision {
            Decided::Recorded(id) => Ok(id),
            Decided::Deferred(d) => Ok(self.record_decision(*d, now).await?),
        }
    }
}

/// Minted, not yet recorded: exists only in the pipeline's frame until `commit`.
struct Minted {
    record: CredentialRecord,
    details: IssuedDetails,
    credential: Credential,
}

impl Issuer {
    /// Mints what an allowed decision granted and commits it. `details` adds what the
    /// record needs beyond the credential (break-glass facts); `elevated` sends the step to
    /// the elevated sinks first.
    pub(crate) async fn deliver(
        &self,
        auth: Authorized,
        ask: Ask,
        origin: &Origin,
        mut details: IssuedDetails,
        elevated: bool,
    ) -> Result<Issued, IssueError> {
        details.provenance = auth.provenance.clone();
        let Authorized { grants, identity, decision_id, deferred, now, rules, lifetime, .. } = auth;
        let decision = match deferred {
            Some(d) => Decided::Deferred(d),
            None => Decided::Recorded(decision_id),
        };
        // Why UUIDv7 (time first, then 74 random bits): credential ids are the credential
        // table's key, and ids that grow with time are appended to its index instead of
        // landing on a random page of it; with random (v4) ids, issuance on a 3-million-event
        // ledger cost 5x the CPU it did on an empty one. The time it shows is the issuance
        // time the certificate or token states anyway.
        let credential_id = uuid::Uuid::now_v7().to_string();
        // A deferred decision's id is set by the ledger as the pair is written.
        let minted = match ask {
            Ask::X509 { key } => self.mint_x509(grants, key, &credential_id, decision_id, now),
            Ask::Jwt { .. } => self.mint_jwt(grants, &credential_id, decision_id, now),
            Ask::Aws { .. } => self.mint_aws(grants, &credential_id, decision_id, now).await,
            Ask::Wit => self.mint_wit(grants, &credential_id, decision_id, now),
        };
        let minted = match minted {
            Ok(m) => m,
            Err(e) => {
                // Allowed, then nothing could be minted: the allow is still on record.
                self.settle(decision, now).await?;
                return Err(e);
            }
        };
        let Minted { record, details: mint_details, credential } = minted;
        details.aws = mint_details.aws;
        details.cnf_jkt = mint_details.cnf_jkt;
        let kind = record.kind.clone();
        let not_after = record.not_after;
        let mut issued = self.commit(&identity, record, details, credential, now, decision, elevated).await?;
        if let Some(metrics) = self.metrics() {
            metrics.issued(&kind, origin.api);
        }
        tracing::info!(
            identity = %identity, credential_id, decision_id = issued.decision_id, issued_id = issued.issued_id, kind, api = origin.api,
            rules = %rules.join(","), requested_ttl_secs = lifetime.requested, granted_ttl_secs = lifetime.granted,
            clamped_by = lifetime.clamped_by.as_deref().unwrap_or_default(), rotation = origin.rotates.is_some(),
            break_glass = origin.emergency.is_some(), not_after, "credential issued"
        );
        issued.lifetime = lifetime;
        Ok(issued)
    }

    /// The last steps before a minted credential may leave, in the one order every kind
    /// follows: the lock re-check, the elevated sinks (break-glass; if they fail, nothing
    /// is issued), then the durable `issued` event.
    #[expect(clippy::too_many_arguments, reason = "each is a fact of the issuance the record needs")]
    async fn commit(
        &self,
        identity: &WorkloadId,
        record: CredentialRecord,
        details: IssuedDetails,
        credential: Credential,
        now: SystemTime,
        decision: Decided,
        elevated: bool,
    ) -> Result<Issued, IssueError> {
        let id = record.id.clone();
        // Again here, after minting: a lock placed while this request was in flight (an STS
        // call takes seconds; an approval, minutes) stops the credential from leaving.
        if let Some(lock) = self.revocations.lock_for(identity, self.clock.now()) {
            tracing::warn!(identity = %identity, credential_id = id, kind = record.kind, "identity locked while the request was in flight; the credential is dropped");
            self.settle(decision, now).await?;
            return Err(IssueError::Locked { identity: identity.to_string(), reason: lock.reason });
        }
        if elevated {
            #[derive(serde::Serialize)]
            struct Line<'a> {
                credential: &'a CredentialRecord,
                emergency: &'a IssuedDetails,
            }
            let line = Line { credential: &record, emergency: &details };
            if let Err(e) = self.emergency.elevate("issued", &line).await {
                self.settle(decision, now).await?;
                return Err(IssueError::Elevated(e));
            }
        }
        let issued = crate::ledger::event::Issued { credential: record, details };
        let written = match decision {
            Decided::Recorded(decision_id) => {
                self.ledger.record(now, Event::Issued(issued)).await.map(|issued_id| (decision_id, issued_id))
            }
            Decided::Deferred(decision) => {
                // Both rows or neither: a failed commit leaves no allow without its outcome
                // and no credential without its decision.
                let noticed = self.notice(&decision);
                let written = self.ledger.record_issuance(now, *decision, issued).await;
                if let Ok((decision_id, _)) = &written {
                    self.decided(noticed, *decision_id, now);
                }
                written
            }
        };
        let (decision_id, issued_id) = match written {
            Ok(ids) => ids,
            Err(e) => {
                tracing::error!(identity = %identity, credential_id = id, error = %e, "a credential was minted but could not be recorded; it was not handed out");
                return Err(e.into());
            }
        };
        if elevated {
            self.emergency.flag(&id);
        }
        Ok(Issued {
            credential_id: id,
            identity: identity.clone(),
            decision_id,
            issued_id,
            credential,
            lifetime: Lifetime::default(),
            _durable: Durable,
        })
    }

    fn mint_x509(
        &self,
        grants: Vec<crate::policy::Grant>,
        key: KeySource,
        credential_id: &str,
        decision_id: EventId,
        now: SystemTime,
    ) -> Result<Minted, IssueError> {
        let grant = grants.into_iter().next().ok_or(IssueError::NoEntry)?;
        let identity = grant.identity().to_string();
        // Why here and not earlier: a denied caller never causes a key to be made.
        let (csr, private_key) = match key {
            KeySource::Csr(csr) => (csr, None),
            KeySource::ServerMade => {
                let (csr, key) = VerifiedCsr::server_made()?;
                (csr, Some(key))
            }
        };
        let svid = self.minters.x509.mint_x509(&csr, grant, now)?;
        let record = CredentialRecord {
            id: credential_id.to_owned(),
            kind: CredentialKind::X509.as_str().to_owned(),
            identity,
            serial: svid.serial.clone(),
            fingerprint: svid.fingerprint.clone(),
            not_before: unix_secs(svid.not_before),
            not_after: unix_secs(svid.not_after),
            decision_id,
            break_glass: false,
        };
        let bundle = self.minters.x509.x509_bundle();
        Ok(Minted {
            record,
            details: IssuedDetails::default(),
            credential: Credential::X509(X509Credential { svid, private_key, bundle }),
        })
    }

    fn mint_jwt(
        &self,
        grants: Vec<crate::policy::Grant>,
        credential_id: &str,
        decision_id: EventId,
        now: SystemTime,
    ) -> Result<Minted, IssueError> {
        let grant = JwtGrant::join(grants).ok_or_else(|| IssueError::Denied {
            explain: "denied: the audiences were not all granted to one identity".into(),
            rules: vec![],
        })?;
        let identity = grant.identity().to_string();
        // The jti is the credential id: a validation names the credential without a lookup.
        let svid = self.minters.jwt.mint_jwt(grant, credential_id, now)?;
        let record = CredentialRecord {
            id: credential_id.to_owned(),
            kind: CredentialKind::Jwt.as_str().to_owned(),
            identity,
            serial: svid.jti.clone(),
            fingerprint: svid.fingerprint.clone(),
            not_before: unix_secs(svid.not_before),
            not_after: unix_secs(svid.not_after),
            decision_id,
            break_glass: false,
        };
        Ok(Minted { record, details: IssuedDetails::default(), credential: Credential::Jwt(svid) })
    }

    /// A WIT-SVID and the key pair it binds, made only now that policy allowed it. The
    /// record keeps the jti (the credential id), the token's SHA-256 and the key's
    /// thumbprint; never the token or the key.
    fn mint_wit(
        &self,
        grants: Vec<crate::policy::Grant>,
        credential_id: &str,
        decision_id: EventId,
        now: SystemTime,
    ) -> Result<Minted, IssueError> {
        let grant = grants.into_iter().next().ok_or(IssueError::NoEntry)?;
        let identity = grant.identity().to_string();
        // Why here and not earlier: a denied caller never causes a key to be made.
        let key = WorkloadKey::generate().map_err(|e| crate::mint::MintError::KeyGeneration(e.to_string()))?;
        // The jti is the credential id: a proof check names the credential without a lookup.
        let svid = self.minters.wit.mint_wit(grant, &key, credential_id, now)?;
        let record = CredentialRecord {
            id: credential_id.to_owned(),
            kind: CredentialKind::Wit.as_str().to_owned(),
            identity,
            serial: svid.jti.clone(),
            fingerprint: svid.fingerprint.clone(),
            not_before: unix_secs(svid.not_before),
            not_after: unix_secs(svid.not_after),
            decision_id,
            break_glass: false,
        };
        let details = IssuedDetails { cnf_jkt: Some(svid.key_thumbprint.clone()), ..IssuedDetails::default() };
        Ok(Minted { record, details, credential: Credential::Wit(WitCredential { svid, key }) })
    }

    /// Asks STS for the session the grant describes: the record keeps the access key id,
    /// the assumed-role ARN (as the credential's fingerprint), the session name, the source
    /// identity and the expiry; never the secret key or token.
    async fn mint_aws(
        &self,
        grants: Vec<crate::policy::Grant>,
        credential_id: &str,
        decision_id: EventId,
        now: SystemTime,
    ) -> Result<Minted, IssueError> {
        let minter = self.minters.aws.as_ref().ok_or(IssueError::NoAws)?;
        let grant = grants.into_iter().next().ok_or(IssueError::NoEntry)?;
        let identity = grant.identity().to_string();
        let session_policy = grant.aws().and_then(|a| a.session_policy.as_ref()).map(|p| p.names.clone());
        let minted = match minter.mint(grant, credential_id, now).await {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(identity, decision_id, error = %e, "no AWS session");
                return Err(e.into());
            }
        };
        let (session, request) = (minted.session, minted.request);
        let record = CredentialRecord {
            id: credential_id.to_owned(),
            kind: CredentialKind::Aws.as_str().to_owned(),
            identity,
            serial: session.access_key_id.clone(),
            fingerprint: session.assumed_role_arn.clone(),
            not_before: unix_secs(now),
            not_after: unix_secs(session.expiration),
            decision_id,
            break_glass: false,
        };
        let aws = AwsSessionRecord {
            role_arn: Some(request.role_arn.clone()),
            assumed_role_arn: Some(session.assumed_role_arn.clone()),
            access_key_id: Some(session.access_key_id.clone()),
            session_name: Some(request.role_session_name.clone()),
            source_identity: Some(request.source_identity.clone()),
            duration_seconds: Some(i64::from(request.duration_seconds)),
            session_tags: Some(request.tags.iter().map(|(k, _)| k.clone()).collect()),
            session_policy,
            sts_mode: Some(minted.mode.to_owned()),
            web_identity_jti: minted.assertion_jti,
            sts_attempts: Some(minted.attempts),
        };
        let credential = Credential::Aws(AwsCredential {
            session,
            role_arn: request.role_arn,
            session_name: request.role_session_name,
            source_identity: request.source_identity,
        });
        Ok(Minted { record, details: IssuedDetails { aws, ..IssuedDetails::default() }, credential })
    }
}
