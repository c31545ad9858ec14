//! Checks of mayfly's own JWTs presented back to it: the Workload API's `ValidateJWTSVID`
//! and RFC 7662 introspection on the TLS listener. A check that passes the signature is a
//! durable `used` event before the answer — also when the token was revoked (incident
//! responders want the attempt); uses of break-glass credentials go to the elevated sinks
//! too. Issues nothing and decides nothing.

use std::sync::Arc;

use crate::attest::PeerInfo;
use crate::breakglass::EmergencyLog;
use crate::clock::Clock;
use crate::issue::IssueError;
use crate::ledger::Ledger;
use crate::ledger::event::{Caller, Event, Used};
use crate::mint::{JwtMinter, ValidatedJwt};
use crate::policy::CredentialKind;
use crate::revoke::Revocations;

pub struct Validator {
    jwt: Arc<dyn JwtMinter>,
    revocations: Arc<Revocations>,
    emergency: Arc<EmergencyLog>,
    ledger: Arc<dyn Ledger>,
    clock: Arc<dyn Clock>,
}

impl Validator {
    pub fn new(
        jwt: Arc<dyn JwtMinter>,
        revocations: Arc<Revocations>,
        emergency: Arc<EmergencyLog>,
        ledger: Arc<dyn Ledger>,
        clock: Arc<dyn Clock>,
    ) -> Self {
        Self { jwt, revocations, emergency, ledger, clock }
    }

    /// Verifies one of mayfly's JWT-SVIDs for `audience` (a Workload API caller asks).
    pub async fn validate_jwt(&self, peer: &PeerInfo, token: &str, audience: &str) -> Result<ValidatedJwt, IssueError> {
        self.check(token, Some(audience), "validate_jwt_svid", Caller::local(peer.uid, peer.gid, peer.pid)).await
    }

    /// RFC 7662 introspection: `Ok` for a live token (recorded as a use), an error saying
    /// why it is not active otherwise.
    pub async fn introspect(&self, token: &str, remote: &str) -> Result<ValidatedJwt, IssueError> {
        let by = Caller { remote: Some(remote.to_owned()), ..Caller::default() };
        self.check(token, None, "introspect", by).await
    }

    /// Signature, expiry, audience when given, then revocation; a token that verified is a
    /// durable `used` event before the answer.
    async fn check(
        &self,
        token: &str,
        audience: Option<&str>,
        use_kind: &str,
        by: Caller,
    ) -> Result<ValidatedJwt, IssueError> {
        let now = self.clock.now();
        let validated = match self.jwt.validate_jwt(token, audience, now) {
            Ok(v) => v,
            Err(e) => {
                tracing::info!(by = ?by, audience = audience.unwrap_or_default(), error = %e, "jwt validation failed");
                return Err(e.into());
            }
        };
        let revoked = self.revocations.is_revoked(&validated.jti);
        let emergency = self.emergency.is_flagged(&validated.jti);
        let used = Used {
            credential_id: validated.jti.clone(),
            kind: CredentialKind::Jwt.as_str().to_owned(),
            identity: validated.identity.to_string(),
            use_kind: use_kind.to_owned(),
            audience: audience.map(str::to_owned),
            by,
            refused: revoked.then(|| "revoked".to_owned()),
            break_glass: emergency,
        };
        let line = emergency.then(|| used.clone());
        self.ledger.record(now, Event::Used(used)).await?;
        if let Some(line) = line {
            self.emergency.later("used", &line).await;
        }
        if revoked {
            tracing::warn!(credential_id = validated.jti, identity = %validated.identity, "a revoked JWT was presented");
            return Err(IssueError::Revoked(validated.jti));
        }
        Ok(validated)
    }
}
