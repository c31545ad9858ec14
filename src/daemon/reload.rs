//! A reload (SIGHUP, or `ReloadHandle::reload`): the configuration file is read again and
//! what can change without a restart takes effect — the policy source is read now, the TLS
//! listener's certificate and the CA and JWT key files are read again, the trusted OIDC
//! issuers and the break-glass approvers are replaced — each by an atomic swap, so no
//! request in flight is dropped and none is answered by half a change. Every other changed
//! key is named as needing a restart. The whole outcome is one `config_reloaded` event.

use std::sync::Arc;

use tokio::sync::{mpsc, oneshot, watch};

use crate::api::serve::{self, TlsConfig};
use crate::attest::oidc::OidcVerifier;
use crate::breakglass::BreakGlassDesk;
use crate::clock::Clock;
use crate::config::{Config, TlsSource};
use crate::ledger::Ledger;
use crate::ledger::event::{ConfigReloaded, Event};
use crate::mint::rotation::{KeyFile, KeyWatch};
use crate::policy::activation::{PolicyController, Polled};
use crate::telemetry::{Metrics, notify};

/// Asks the running daemon to reload and waits for what it did.
#[derive(Clone)]
pub struct ReloadHandle {
    pub(super) tx: mpsc::Sender<oneshot::Sender<ConfigReloaded>>,
}

impl ReloadHandle {
    /// Reloads once (reloads are serialised); `None` when the daemon has stopped.
    pub async fn reload(&self) -> Option<ConfigReloaded> {
        let (done, answer) = oneshot::channel();
        self.tx.send(done).await.ok()?;
        answer.await.ok()
    }
}

/// Everything a reload can change, and the configuration as it is running.
pub(super) struct Reloader {
    pub(super) running: Config,
    pub(super) policy: Arc<PolicyController>,
    pub(super) tls: Option<TlsConfig>,
    pub(super) keys: Arc<tokio::sync::Mutex<KeyWatch>>,
    pub(super) oidc: Option<Arc<OidcVerifier>>,
    pub(super) desk: Arc<BreakGlassDesk>,
    pub(super) ledger: Arc<dyn Ledger>,
    pub(super) clock: Arc<dyn Clock>,
    pub(super) metrics: Arc<Metrics>,
}

impl Reloader {
    /// Serves reload requests until the daemon stops.
    pub(super) async fn run(
        mut self,
        mut requests: mpsc::Receiver<oneshot::Sender<ConfigReloaded>>,
        mut stop: watch::Receiver<bool>,
    ) -> Result<(), String> {
        loop {
            tokio::select! {
                request = requests.recv() => match request {
                    Some(done) => {
                        let outcome = self.reload().await;
                        let _ = done.send(outcome);
                    }
                    None => return Ok(()),
                },
                () = async { let _ = stop.wait_for(|s| *s).await; } => return Ok(()),
            }
        }
    }

    async fn reload(&mut self) -> ConfigReloaded {
        notify::reloading();
        let mut out = ConfigReloaded {
            file: self.running.file.as_ref().map(|p| p.display().to_string()),
            ..ConfigReloaded::default()
        };
        let next = match &self.running.file {
            Some(path) => match Config::from_file(path) {
                Ok(c) => Some(c),
                Err(e) => {
                    out.failed.push(format!("config: {e}; nothing in it was applied"));
                    None
                }
            },
            None => None,
        };
        if let Some(next) = &next {
            out.restart_required = restart_required(&self.running, next);
        }
        self.reload_policy(&mut out).await;
        self.reload_tls(next.as_ref(), &mut out);
        self.reload_keys(&mut out).await;
        if let Some(next) = next {
            self.reload_issuers(next.oidc_issuers.clone(), &mut out);
            self.reload_approvers(next.break_glass.approvers.clone(), &mut out);
        }
        out.policy_version = self.policy.store().current().version().to_owned();
        let result = match (out.failed.is_empty(), out.restart_required.is_empty()) {
            (false, _) => "failed",
            (true, false) => "partial",
            (true, true) => "applied",
        };
        self.metrics.reloaded(result);
        if let Err(e) = self.ledger.record(self.clock.now(), Event::ConfigReloaded(out.clone())).await {
            tracing::error!(error = %e, "the reload could not be recorded in the ledger");
            out.failed.push(format!("ledger: the reload was not recorded: {e}"));
        }
        tracing::info!(
            result, applied = ?out.applied, restart_required = ?out.restart_required, failed = ?out.failed,
            policy_version = out.policy_version, "configuration reloaded"
        );
        notify::notify("READY=1");
        out
    }

    async fn reload_policy(&self, out: &mut ConfigReloaded) {
        match self.policy.poll_now().await {
            Polled::Activated { from, to } => out.applied.push(format!("policy: activated {to} (was {from})")),
            Polled::Unchanged { version } => {
                out.applied.push(format!("policy: source read again; {version} stays active"))
            }
            Polled::Rejected { why } => out.failed.push(format!("policy: {why}; the active release stays")),
        }
    }

    /// The TLS listener's certificate and key, from the files the new configuration names
    /// (the running ones when it could not be read). `mayfly dev`'s certificate comes from
    /// its own CA and is not reloaded.
    fn reload_tls(&mut self, next: Option<&Config>, out: &mut ConfigReloaded) {
        let (Some(tls), Some(running)) = (&self.tls, &mut self.running.listen) else { return };
        let source = match next.and_then(|n| n.listen.as_ref()) {
            Some(l) if l.address == running.address => l.tls.clone(),
            _ => running.tls.clone(),
        };
        let TlsSource::Files { cert, key } = &source else { return };
        match serve::tls_files_config(cert, key) {
            Ok(config) => {
                tls.store(config);
                let sha = serve::certificate_sha256(cert).unwrap_or_default();
                out.applied.push(format!("listen.cert: serving `{}` (sha256 {sha})", cert.display()));
                running.tls = source;
            }
            Err(why) => out.failed.push(format!("listen.cert: {why}; the previous certificate is still served")),
        }
    }

    async fn reload_keys(&self, out: &mut ConfigReloaded) {
        let checked = self.keys.lock().await.check().await;
        for (name, file) in [("ca", checked.ca), ("jwt.key", checked.jwt)] {
            match file {
                KeyFile::NotConfigured => {}
                KeyFile::Unchanged => out.applied.push(format!("{name}: read again, unchanged")),
                KeyFile::Rotated { from, to } => out.applied.push(format!("{name}: rotated from {from} to {to}")),
                KeyFile::Refused(why) => out.failed.push(format!("{name}: {why}; the current one keeps signing")),
            }
        }
    }

    fn reload_issuers(&mut self, issuers: Vec<crate::attest::oidc::IssuerConfig>, out: &mut ConfigReloaded) {
        if differs(&issuers, &self.running.oidc_issuers) {
            match &self.oidc {
                Some(verifier) => {
                    let urls: Vec<&str> = issuers.iter().map(|i| i.issuer.as_str()).collect();
                    out.applied.push(format!("oidc.issuer: {} trusted ({})", urls.len(), urls.join(", ")));
                    verifier.set_issuers(issuers.clone());
                    self.running.oidc_issuers = issuers;
                }
                None => out.restart_required.push("oidc.issuer (the TLS listener is off)".into()),
            }
        }
    }

    fn reload_approvers(&mut self, approvers: Vec<u32>, out: &mut ConfigReloaded) {
        if approvers != self.running.break_glass.approvers {
            out.applied.push(format!("break_glass.approvers: {approvers:?}"));
            self.desk.set_approvers(approvers.clone());
            self.running.break_glass.approvers = approvers;
        }
    }
}

/// Both sides' debug text: every field of these is plain data whose `Debug` prints it whole.
fn differs(a: &impl std::fmt::Debug, b: &impl std::fmt::Debug) -> bool {
    format!("{a:?}") != format!("{b:?}")
}

/// The keys that differ between the running configuration and `next` and take a restart.
fn restart_required(running: &Config, next: &Config) -> Vec<String> {
    let (r, n) = (running, next);
    let bg = |c: &Config| {
        let b = &c.break_glass;
        (b.ticket_pattern.as_str().to_owned(), b.max_ttl, b.approval_timeout, b.log_file.clone(), b.webhook.clone())
    };
    let listen = |c: &Config| {
        c.listen.as_ref().map(|l| (l.address, l.max_request_bytes, l.request_timeout)).map(|t| format!("{t:?}"))
    };
    let telemetry = |c: &Config| format!("{:?}", c.telemetry);
    [
        ("trust_domain", differs(&r.trust_domain, &n.trust_domain)),
        ("data_dir", r.data_dir != n.data_dir),
        ("policy.bundle / policy.trusted_keys", r.policy != n.policy),
        ("policy.poll_interval", r.policy_poll != n.policy_poll),
        ("workload_api.socket", r.socket != n.socket),
        ("workload_api.max_request_bytes", r.max_request_bytes != n.max_request_bytes),
        ("workload_api.request_timeout", r.request_timeout != n.request_timeout),
        ("workload_api.rotate_at_percent", r.rotate_at_percent != n.rotate_at_percent),
        ("admin.socket", r.admin_socket != n.admin_socket),
        ("admin.owner_uid", r.admin_owner_uid != n.admin_owner_uid),
        ("ca.cert / ca.key / ca.generate", r.ca != n.ca),
        ("jwt.key", r.jwt_key != n.jwt_key),
        ("jwt.issuer", r.jwt_issuer != n.jwt_issuer),
        ("listen", listen(r) != listen(n)),
        ("ledger", differs(&r.ledger, &n.ledger)),
        ("ledger.checkpoint_*", differs(&r.checkpoint, &n.checkpoint)),
        (
            "issuance",
            differs(
                &(r.default_ttl, r.jwt_ttl, r.max_ttl, r.min_ttl),
                &(n.default_ttl, n.jwt_ttl, n.max_ttl, n.min_ttl),
            ),
        ),
        ("attestation.max_binary_bytes", r.max_binary_bytes != n.max_binary_bytes),
        ("aws", differs(&r.aws, &n.aws)),
        ("telemetry", telemetry(r) != telemetry(n)),
        ("limits", r.limits != n.limits),
        ("break_glass (other than approvers)", differs(&bg(r), &bg(n))),
    ]
    .into_iter()
    .filter(|(_, changed)| *changed)
    .map(|(key, _)| key.to_owned())
    .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(extra: &str) -> Config {
        let text = format!(
            "trust_domain = \"example.org\"\ndata_dir = \"/d\"\n[policy]\nbundle = \"/b\"\ntrusted_keys = [\"/k\"]\n[workload_api]\nsocket = \"/s\"\n[ca]\ngenerate = true\n{extra}"
        );
        Config::try_from(toml::from_str::<crate::config::RawConfig>(&text).unwrap()).unwrap()
    }

    #[test]
    fn a_changed_socket_needs_a_restart_and_approvers_do_not() {
        let running = config("[break_glass]\napprovers = [0]\n");
        let next = config("[break_glass]\napprovers = [0, 1000]\n").clone();
        assert!(restart_required(&running, &next).is_empty(), "{:?}", restart_required(&running, &next));
        let moved = config("[break_glass]\napprovers = [0]\n");
        let mut moved = moved;
        moved.socket = "/elsewhere.sock".into();
        assert_eq!(restart_required(&running, &moved), vec!["workload_api.socket".to_owned()]);
    }
}
