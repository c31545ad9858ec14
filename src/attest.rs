//! Attestation: turns a caller into `Selectors`. Owns the `Attestor` seam and the peer
//! facts captured when a connection is accepted; knows nothing of policy or keys.

pub mod oidc;
pub mod unix;

use std::sync::Arc;

use serde::Serialize;

use crate::identity::Selectors;

pub use unix::{PeerInfo, PeerStream, UnixAttestor};

#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum AttestError {
    #[error("the peer has no process credentials")]
    PeerWithoutCredentials,
    /// Why it matters: the kernel recycles PIDs; a caller that is gone (or replaced) gets nothing.
    #[error("the calling process `{pid}` exited or was replaced before attestation finished")]
    CallerExited { pid: i32 },
    #[error("cannot read /proc for pid `{pid}`: {why}")]
    Proc { pid: i32, why: String },
    /// Why it matters: SO_PEERCRED is fixed when the socket connects; a process that then
    /// switched user (or can switch back) must not get the identity of the user it was.
    #[error(
        "the calling process `{pid}` no longer runs as the user that connected \
         (connected as uid {uid} gid {gid}; now uids {now_uids} gids {now_gids}, as real/effective/saved/filesystem)"
    )]
    CredentialsChanged { pid: i32, uid: u32, gid: u32, now_uids: String, now_gids: String },
}

/// What attestation established about the caller. `caller` is a summary for the ledger.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attestation {
    pub selectors: Selectors,
    pub caller: CallerSummary,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct CallerSummary {
    pub uid: u32,
    pub gid: u32,
    pub pid: i32,
    pub exe: Option<String>,
    pub sha256: Option<String>,
    pub container: Option<String>,
}

/// Attests a caller from what was captured at connect time. Blocking (reads /proc):
/// callers run it on a blocking thread.
pub trait Attestor: Send + Sync + 'static {
    fn attest(&self, peer: &PeerInfo) -> Result<Attestation, AttestError>;

    /// `attest` when it needs no slow read (the executable's hash is cached): cheap enough
    /// for an async task. `None`: call `attest` on a blocking thread instead.
    fn attest_cached(&self, _peer: &PeerInfo) -> Option<Result<Attestation, AttestError>> {
        None
    }
}

impl<A: Attestor + ?Sized> Attestor for Arc<A> {
    fn attest(&self, peer: &PeerInfo) -> Result<Attestation, AttestError> {
        (**self).attest(peer)
    }

    fn attest_cached(&self, peer: &PeerInfo) -> Option<Result<Attestation, AttestError>> {
        (**self).attest_cached(peer)
    }
}
