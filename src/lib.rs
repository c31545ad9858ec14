//! mayfly: an ephemeral credential broker. See DESIGN.md for the module map; `issue` holds
//! the order of an issuance, `daemon` wires the concrete pieces together.

pub mod api;
pub mod attest;
pub mod aws;
pub mod breakglass;
pub mod cli;
pub mod clock;
pub mod cluster;
pub mod config;
pub mod daemon;
pub mod identity;
pub mod issue;
pub mod keys;
pub mod ledger;
pub mod limits;
pub mod mint;
pub mod policy;
pub mod revoke;
pub mod telemetry;
#[cfg(any(test, feature = "test-support"))]
pub mod testing;
pub mod validate;

/// A boxed future, for the object-safe async traits of the seams (`Ledger`, `StsApi`, …).
pub type BoxFuture<'a, T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'a>>;
