//! The outside calls the daemon counts, as wrappers around the seams (so neither the OIDC
//! verifier nor the AWS minter knows about metrics): fetches of a trusted issuer's
//! discovery document and JWKS, and every STS call with its outcome.

use std::sync::Arc;

use crate::BoxFuture;
use jsonwebtoken::jwk::JwkSet;

use crate::attest::oidc::{KeySource, OidcError};
use crate::aws::{AwsError, AwsSessionRequest, StsApi, StsSession};
use crate::keys::SecretString;
use crate::telemetry::Metrics;

/// A key source whose failures are counted per issuer (issuers are bounded by the config).
pub(super) struct CountedKeys {
    pub(super) inner: Arc<dyn KeySource>,
    pub(super) metrics: Arc<Metrics>,
}

impl KeySource for CountedKeys {
    fn fetch(&self, issuer: &str) -> BoxFuture<'_, Result<JwkSet, OidcError>> {
        let issuer = issuer.to_owned();
        Box::pin(async move {
            let fetched = self.inner.fetch(&issuer).await;
            if fetched.is_err() {
                self.metrics.oidc_fetch_failed(&issuer);
            }
            fetched
        })
    }
}

/// STS with each call's outcome counted: `ok`, or the AWS error code (`Throttling`,
/// `AccessDenied`, `Timeout`, `Unreachable`, …).
pub(super) struct CountedSts {
    pub(super) inner: Arc<dyn StsApi>,
    pub(super) metrics: Arc<Metrics>,
}

impl CountedSts {
    fn count(&self, call: &'static str, result: &Result<StsSession, AwsError>) {
        let outcome = match result {
            Ok(_) => "ok",
            Err(e) => e.code(),
        };
        self.metrics.sts_call(call, outcome);
    }
}

impl StsApi for CountedSts {
    fn assume_role<'a>(&'a self, req: &'a AwsSessionRequest) -> BoxFuture<'a, Result<StsSession, AwsError>> {
        Box::pin(async move {
            let result = self.inner.assume_role(req).await;
            self.count("assume_role", &result);
            result
        })
    }

    fn assume_role_with_web_identity<'a>(
        &'a self,
        req: &'a AwsSessionRequest,
        token: &'a SecretString,
    ) -> BoxFuture<'a, Result<StsSession, AwsError>> {
        Box::pin(async move {
            let result = self.inner.assume_role_with_web_identity(req, token).await;
            self.count("assume_role_with_web_identity", &result);
            result
        })
    }
}
