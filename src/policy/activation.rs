//! Policy activation: reads the configured source (a signed bundle, or the unsigned dev
//! tree), verifies and validates each new release off the request path, swaps it in,
//! keeps the previous good one, and records every activation, rejection and rollback.
//!
//! Signed mode keeps the active bundle and the rollback history in `<data_dir>/policy/`
//! (`current.bundle`, then `previous.bundle`, `previous-2.bundle`, … most recent first,
//! re-verified on every start) and the versions operators rolled back from (`held`, one a
//! line), so a restart neither loses a rollback nor fails on a bad published bundle. A held
//! version is not activated from the source again until a version that is not held is
//! published (which clears the list). See `store` for the history's rules.
//! Order of an activation: build the release → record `policy_activated` → persist → swap.
//! A release that cannot be recorded is not activated.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::BoxFuture;
use crate::clock::Clock;
use crate::config::PolicySource;
use crate::identity::TrustDomain;
use crate::ledger::event::{Event, Operator, PolicyActivated, PolicyRejected, PolicyRolledBack};
use crate::ledger::{EventId, Ledger, LedgerError};
use crate::policy::bundle::{Bundle, PolicyFiles, PublicKey, sha256_hex};
use crate::policy::release::Release;
use crate::policy::store::{HISTORY, PolicyStore};

#[derive(Debug, thiserror::Error)]
pub enum ActivationError {
    #[error("no usable policy release: {0}")]
    NoRelease(String),
    #[error("there is no earlier good release to roll back to{}", held_note(.0))]
    NoPrevious(Vec<String>),
    #[error("cannot record the policy change; nothing changed: {0}")]
    Ledger(#[from] LedgerError),
    #[error("{0}")]
    Keys(String),
}

/// A release read from the source, before it is built: the bundle bytes (signed mode) or
/// the files (dev), with a fingerprint of what was read.
struct Candidate {
    fingerprint: String,
    source: String,
    content: Content,
}

enum Content {
    Bundle(Vec<u8>),
    Files(PolicyFiles),
}

fn held_note(held: &[String]) -> String {
    if held.is_empty() { String::new() } else { format!(" (rolled back from, and held: {})", held.join(", ")) }
}

struct Watch {
    /// Fingerprint of the source as last considered: an unchanged source is not rebuilt.
    last_seen: Option<String>,
    /// Versions rolled back from, oldest first: not re-activated from the source.
    held: Vec<String>,
}

/// What one look at the policy source did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Polled {
    /// The source holds what was considered last time (or the active version again).
    Unchanged {
        version: String,
    },
    Activated {
        from: String,
        to: String,
    },
    /// Refused (bad, held, or not recordable); the active release stays.
    Rejected {
        why: String,
    },
}

/// Reads and builds releases from the configured source.
struct Loader {
    source: PolicySource,
    keys: Vec<PublicKey>,
    trust_domain: TrustDomain,
}

pub struct PolicyController {
    loader: Loader,
    source: PolicySource,
    state_dir: PathBuf,
    store: Arc<PolicyStore>,
    ledger: Arc<dyn Ledger>,
    clock: Arc<dyn Clock>,
    watch: tokio::sync::Mutex<Watch>,
    /// Several daemons: where each activated bundle is kept so the others serve it too.
    releases: Option<Arc<dyn ReleaseStore>>,
}

/// Signed bundles by version, shared by the daemons of one ledger (PostgreSQL).
pub trait ReleaseStore: Send + Sync + 'static {
    fn put<'a>(&'a self, version: &'a str, bundle: &'a [u8]) -> BoxFuture<'a, Result<(), String>>;
    fn get<'a>(&'a self, version: &'a str) -> BoxFuture<'a, Result<Option<Vec<u8>>, String>>;
}

impl PolicyController {
    /// A candidate release for shadow mode, read and checked like an activation would be:
    /// a bundle file is verified with the trusted keys when the daemon runs on signed
    /// bundles; `mayfly dev` also takes a policies/ directory. Never activated.
    pub async fn load_candidate(&self, path: &Path) -> Result<Release, String> {
        let path = path.to_path_buf();
        let signed = matches!(self.source, PolicySource::Bundle { .. });
        let keys = self.loader.keys.clone();
        let td = self.loader.trust_domain.clone();
        let built = tokio::task::spawn_blocking(move || {
            if path.is_dir() {
                if signed {
                    return Err(
                        "this daemon runs signed bundles: shadow a signed bundle file, not a directory".to_owned()
                    );
                }
                let files = PolicyFiles::read_dir(&path).map_err(|e| e.to_string())?;
                return Release::build(&files, &td, None, None, path.display().to_string()).map(|r| (r, None));
            }
            let bytes = read_bounded(&path)?;
            let bundle = Bundle::parse(&bytes).map_err(|e| e.to_string())?;
            let key_id = if signed { Some(bundle.verify(&keys).map_err(|e| e.to_string())?) } else { None };
            Release::build(&bundle.files, &td, bundle.manifest.label.clone(), key_id, path.display().to_string())
                .map(|r| (r, Some(bytes)))
        })
        .await
        .map_err(|e| e.to_string())?;
        let (release, bytes) = match built {
            Ok(parts) => parts,
            Err(e) => return Err(e),
        };
        // Several daemons: they shadow the same candidate, read from the shared ledger.
        if let (Some(releases), Some(bytes), true) = (&self.releases, bytes, signed) {
            releases.put(release.version(), &bytes).await.map_err(|e| format!("cannot share the candidate: {e}"))?;
        }
        Ok(release)
    }

    /// A candidate another daemon shadows, from the shared ledger, verified with this
    /// daemon's trusted keys.
    pub async fn shared_candidate(&self, version: &str) -> Result<Release, String> {
        let releases = self.releases.as_ref().ok_or("this daemon shares no releases")?;
        let bytes =
            releases.get(version).await?.ok_or_else(|| format!("release {version} is not in the shared ledger"))?;
        let release = self.loader.build(&Content::Bundle(bytes), format!("shared ledger (candidate {version})"))?;
        if release.version() != version {
            return Err(format!("the shared bundle for {version} builds as {}", release.version()));
        }
        Ok(release)
    }
}

/// What `status` reports.
pub struct Status {
    pub current: Arc<Release>,
    /// The rollback history, most recent first (the first is where a rollback goes).
    pub history: Vec<Arc<Release>>,
    /// Versions rolled back from, oldest first.
    pub held: Vec<String>,
}

impl PolicyController {
    /// Loads the first release: the configured source if it is good (and not held),
    /// otherwise the last good bundle kept in the data dir. Fails only when there is none.
    pub async fn start(
        source: PolicySource,
        trust_domain: TrustDomain,
        data_dir: &Path,
        ledger: Arc<dyn Ledger>,
        clock: Arc<dyn Clock>,
    ) -> Result<Self, ActivationError> {
        let keys = match &source {
            PolicySource::Bundle { trusted_keys, .. } => trusted_keys
                .iter()
                .map(|p| PublicKey::load(p).map_err(|e| ActivationError::Keys(e.to_string())))
                .collect::<Result<Vec<_>, _>>()?,
            PolicySource::UnsignedDir(dir) => {
                tracing::warn!(
                    dir = %dir.display(),
                    "DEV MODE: policy is read UNSIGNED from this directory and re-read when it changes; `mayfly serve` accepts only signed bundles"
                );
                Vec::new()
            }
        };
        let state_dir = data_dir.join("policy");
        let signed = matches!(source, PolicySource::Bundle { .. });
        if signed {
            std::fs::create_dir_all(&state_dir)
                .map_err(|e| ActivationError::NoRelease(format!("`{}`: {e}", state_dir.display())))?;
        }
        let held = if signed { read_held(&state_dir) } else { Vec::new() };
        let loader = Loader { source: source.clone(), keys, trust_domain };
        let kept = |name: &str| -> Option<Release> {
            let path = state_dir.join(name);
            let bytes = std::fs::read(&path).ok()?;
            match loader.build(&Content::Bundle(bytes), path.display().to_string()) {
                Ok(r) => Some(r),
                Err(why) => {
                    tracing::warn!(path = %path.display(), why, "kept policy bundle no longer verifies; ignoring it");
                    None
                }
            }
        };
        let stored_current = if signed { kept("current.bundle") } else { None };
        // Most recent first; stops at the first missing or unusable file.
        let stored_history: Vec<Release> =
            if signed { (0..HISTORY).map_while(|i| kept(&history_file(i))).collect() } else { Vec::new() };
        let candidate = loader.read_source();
        let fingerprint = candidate.as_ref().map(|c| c.fingerprint.clone()).unwrap_or_else(|e| format!("error:{e}"));
        let built = candidate.and_then(|c| {
            let release = loader.build(&c.content, c.source.clone())?;
            Ok((c, release))
        });
        let record = |event: Event| {
            let (ledger, at) = (ledger.clone(), clock.now());
            async move { ledger.record(at, event).await }
        };
        let (current, history, via) = match built {
            Ok((_, release)) if held.iter().any(|h| h == release.version()) && stored_current.is_some() => {
                tracing::warn!(
                    version = release.version(),
                    "the published policy is held after a rollback; keeping the kept release"
                );
                (stored_current, stored_history, "startup (published release held)")
            }
            Ok((candidate, release)) => {
                let same = stored_current.as_ref().is_some_and(|s| s.version() == release.version());
                let history = if same {
                    stored_history
                } else {
                    stored_current.into_iter().chain(stored_history).take(HISTORY).collect()
                };
                if let (true, Content::Bundle(bytes)) = (signed && !same, &candidate.content) {
                    persist_new(&state_dir, bytes);
                }
                (Some(release), history, "startup")
            }
            Err(why) => {
                let kept = stored_current.as_ref().map(|r| r.version().to_owned());
                record(Event::PolicyRejected(PolicyRejected {
                    source: source_name(&source),
                    reason: why.clone(),
                    version: None,
                    kept,
                }))
                .await?;
                tracing::error!(reason = %why, "policy release rejected at start-up");
                match stored_current {
                    Some(kept) => (Some(kept), stored_history, "startup (kept release)"),
                    None => return Err(ActivationError::NoRelease(why)),
                }
            }
        };
        let current = Arc::new(current.ok_or_else(|| ActivationError::NoRelease("no release".into()))?);
        // The store keeps the history oldest first.
        let history: Vec<Arc<Release>> = history.into_iter().rev().map(Arc::new).collect();
        record(Event::PolicyActivated(activated(&current, history.last().map(Arc::as_ref), via))).await?;
        tracing::info!(
            version = current.version(),
            label = current.provenance.label.as_deref().unwrap_or(""),
            signed_by = current.provenance.signed_by.as_deref().unwrap_or("UNSIGNED"),
            rules = current.engine.rule_count(),
            "policy active"
        );
        Ok(Self {
            loader,
            source,
            state_dir,
            store: Arc::new(PolicyStore::new(current, history)),
            ledger,
            clock,
            watch: tokio::sync::Mutex::new(Watch { last_seen: Some(fingerprint), held }),
            releases: None,
        })
    }

    /// Shares activations with the other daemons of the ledger: the active bundle is kept in
    /// `releases` now and every later one before it is activated. Signed bundles only (a
    /// `mayfly dev` tree is each daemon's own).
    pub async fn share(&mut self, releases: Arc<dyn ReleaseStore>) -> Result<(), ActivationError> {
        if !matches!(self.source, PolicySource::Bundle { .. }) {
            return Ok(());
        }
        if let Ok(bytes) = std::fs::read(self.state_dir.join("current.bundle")) {
            let version = self.store.current().version().to_owned();
            releases.put(&version, &bytes).await.map_err(ActivationError::NoRelease)?;
        }
        self.releases = Some(releases);
        Ok(())
    }

    /// Another daemon activated `version`: serve it here too (recorded here as well). A no-op
    /// when it is already active; refused (and recorded) when it does not verify with this
    /// daemon's trusted keys.
    pub async fn adopt(&self, version: &str, via: &str) {
        let mut watch = self.watch.lock().await;
        if self.store.current().version() == version {
            return;
        }
        let Some(releases) = &self.releases else { return };
        let bytes = match releases.get(version).await {
            Ok(Some(b)) => b,
            Ok(None) => {
                return self.reject(&format!("release {version} is not in the shared ledger"), Some(version)).await;
            }
            Err(e) => {
                tracing::warn!(error = %e, version, "cannot read a release another daemon activated; retrying at its next change");
                return;
            }
        };
        let source = format!("shared ledger ({via})");
        let built = self.loader.build(&Content::Bundle(bytes.clone()), source);
        let release = match built {
            Ok(r) if r.version() == version => Arc::new(r),
            Ok(r) => {
                let why = format!("the shared bundle for {version} builds as {}", r.version());
                return self.reject(&why, Some(version)).await;
            }
            Err(why) => return self.reject(&why, Some(version)).await,
        };
        let current = self.store.current();
        if let Err(e) = self.record(Event::PolicyActivated(activated(&release, Some(&current), via))).await {
            tracing::error!(error = %e, version, "cannot record the adopted activation; keeping the current policy");
            return;
        }
        persist_new(&self.state_dir, &bytes);
        if watch.held.iter().any(|h| h == version) {
            watch.held.retain(|h| h != version);
            self.write_held(&watch.held);
        }
        self.store.activate(release);
        tracing::info!(from = current.version(), to = version, via, "policy activated (another daemon's release)");
    }

    /// Another daemon rolled back from `from` to `to`: do the same here, and hold `from`.
    pub async fn follow_rollback(&self, from: &str, to: &str, via: &str) {
        let (current, previous) = (self.store.current(), self.store.previous());
        if current.version() == from && previous.as_ref().is_some_and(|p| p.version() == to) {
            let operator = Operator { daemon: Some(via.to_owned()), ..Operator::default() };
            if let Err(e) = self.rollback(operator, &format!("rolled back by another daemon ({via})")).await {
                tracing::error!(error = %e, from, to, "cannot follow another daemon's rollback");
            }
            return;
        }
        self.adopt(to, via).await;
        // The release rolled back from is no rollback target here either.
        self.store.forget(from);
        let mut watch = self.watch.lock().await;
        if !watch.held.iter().any(|h| h == from) {
            watch.held.push(from.to_owned());
        }
        self.write_held(&watch.held);
    }

    pub fn store(&self) -> Arc<PolicyStore> {
        self.store.clone()
    }

    pub async fn status(&self) -> Status {
        let held = self.watch.lock().await.held.clone();
        Status { current: self.store.current(), history: self.store.history(), held }
    }

    /// Checks the source once; activates a new good release, records a bad one. Building
    /// runs on a blocking thread: issuance keeps using the current release meanwhile.
    /// Polls the source every `every` until the daemon stops.
    pub async fn watch(self: Arc<Self>, every: std::time::Duration, stop: tokio::sync::watch::Receiver<bool>) {
        let mut ticker = crate::clock::Ticker::delayed(every, stop).await;
        while ticker.next().await {
            self.poll().await;
        }
    }

    /// Looks at the source now (a reload): like a tick of the watch, but a source that
    /// has not changed since it was last refused is looked at again too.
    pub async fn poll_now(self: &Arc<Self>) -> Polled {
        self.watch.lock().await.last_seen = None;
        self.poll().await
    }

    pub async fn poll(self: &Arc<Self>) -> Polled {
        let mut watch = self.watch.lock().await;
        let me = Arc::clone(self);
        let read = tokio::task::spawn_blocking(move || {
            let candidate = me.loader.read_source()?;
            Ok::<_, String>((candidate.fingerprint.clone(), candidate.source.clone(), candidate))
        })
        .await
        .unwrap_or_else(|e| Err(format!("reading the policy source failed: {e}")));
        let (fingerprint, source, candidate) = match read {
            Ok(parts) => parts,
            Err(why) => {
                let fingerprint = format!("error:{why}");
                if watch.last_seen.as_deref() != Some(fingerprint.as_str()) {
                    watch.last_seen = Some(fingerprint);
                    self.reject(&why, None).await;
                }
                return Polled::Rejected { why };
            }
        };
        if watch.last_seen.as_deref() == Some(fingerprint.as_str()) {
            return Polled::Unchanged { version: self.store.current().version().to_owned() };
        }
        watch.last_seen = Some(fingerprint);
        let me = Arc::clone(self);
        let built = tokio::task::spawn_blocking(move || {
            let release = me.loader.build(&candidate.content, source)?;
            Ok::<_, String>((release, candidate))
        })
        .await
        .unwrap_or_else(|e| Err(format!("building the release failed: {e}")));
        let (release, candidate) = match built {
            Ok(parts) => parts,
            Err(why) => {
                self.reject(&why, None).await;
                return Polled::Rejected { why };
            }
        };
        let current = self.store.current();
        if release.version() == current.version() {
            tracing::debug!(version = release.version(), "policy source re-published the active version");
            return Polled::Unchanged { version: current.version().to_owned() };
        }
        if watch.held.iter().any(|h| h == release.version()) {
            let why = "this version was rolled back by an operator; publish a different version to move on";
            self.reject(why, Some(release.version())).await;
            return Polled::Rejected { why: format!("`{}`: {why}", release.version()) };
        }
        let release = Arc::new(release);
        if let (Some(releases), Content::Bundle(bytes)) = (&self.releases, &candidate.content)
            && let Err(e) = releases.put(release.version(), bytes).await
        {
            tracing::error!(error = %e, version = release.version(), "cannot share the release with the other daemons; not activating it yet");
            watch.last_seen = None;
            return Polled::Rejected { why: format!("the release cannot be shared with the other daemons: {e}") };
        }
        if let Err(e) = self.record(Event::PolicyActivated(activated(&release, Some(&current), "watch"))).await {
            tracing::error!(error = %e, version = release.version(), "cannot record the activation; keeping the current policy");
            watch.last_seen = None;
            return Polled::Rejected { why: format!("the activation cannot be recorded: {e}") };
        }
        if let Content::Bundle(bytes) = &candidate.content {
            persist_new(&self.state_dir, bytes);
        }
        watch.held.clear();
        self.write_held(&[]);
        self.store.activate(release.clone());
        tracing::info!(from = current.version(), to = release.version(), "policy activated");
        Polled::Activated { from: current.version().to_owned(), to: release.version().to_owned() }
    }

    /// Returns to the most recent release of the history and holds the one rolled back
    /// from (it leaves the history: a second rollback goes further back, never forward).
    pub async fn rollback(
        &self,
        operator: Operator,
        reason: &str,
    ) -> Result<(Arc<Release>, Arc<Release>, EventId), ActivationError> {
        let mut watch = self.watch.lock().await;
        let to = self.store.previous().ok_or_else(|| ActivationError::NoPrevious(watch.held.clone()))?;
        let from = self.store.current();
        let event = self
            .record(Event::PolicyRolledBack(PolicyRolledBack {
                from: from.version().to_owned(),
                to: to.version().to_owned(),
                to_label: to.provenance.label.clone(),
                operator,
                reason: reason.to_owned(),
            }))
            .await?;
        if matches!(self.source, PolicySource::Bundle { .. }) {
            self.persist_rollback();
        }
        if !watch.held.iter().any(|h| h == from.version()) {
            watch.held.push(from.version().to_owned());
        }
        self.write_held(&watch.held);
        self.store.rollback();
        tracing::warn!(from = from.version(), to = to.version(), reason, "policy rolled back");
        Ok((from, to, event))
    }

    async fn reject(&self, why: &str, version: Option<&str>) {
        tracing::error!(reason = why, "policy release rejected; keeping the active one");
        let rejected = PolicyRejected {
            source: source_name(&self.source),
            reason: why.to_owned(),
            version: version.map(str::to_owned),
            kept: Some(self.store.current().version().to_owned()),
        };
        if let Err(e) = self.record(Event::PolicyRejected(rejected)).await {
            tracing::error!(error = %e, "cannot record the policy rejection");
        }
    }

    async fn record(&self, event: Event) -> Result<EventId, LedgerError> {
        self.ledger.record(self.clock.now(), event).await
    }
}

/// What `mayfly config check` does with the policy source: loads the trusted keys, reads
/// the source and builds the release as an activation would (signature, validation, the
/// release's own tests). Returns a line describing the release.
pub fn check_source(source: &PolicySource, trust_domain: &TrustDomain) -> Result<String, String> {
    let keys = match source {
        PolicySource::Bundle { trusted_keys, .. } => trusted_keys
            .iter()
            .map(|p| PublicKey::load(p).map_err(|e| format!("policy.trusted_keys: {e}")))
            .collect::<Result<Vec<_>, _>>()?,
        PolicySource::UnsignedDir(_) => Vec::new(),
    };
    let loader = Loader { source: source.clone(), keys, trust_domain: trust_domain.clone() };
    let candidate = loader.read_source()?;
    let release = loader.build(&candidate.content, candidate.source.clone())?;
    let p = &release.provenance;
    Ok(format!(
        "release {}{} from `{}`, {}, {} rules, {} inventory entries",
        p.version,
        p.label.as_deref().map(|l| format!(" ({l})")).unwrap_or_default(),
        candidate.source,
        p.signed_by.as_deref().map(|k| format!("signed by {k}")).unwrap_or_else(|| "UNSIGNED".into()),
        release.engine.rule_count(),
        release.inventory.entries().len()
    ))
}

fn source_name(source: &PolicySource) -> String {
    match source {
        PolicySource::Bundle { path, .. } | PolicySource::UnsignedDir(path) => path.display().to_string(),
    }
}

impl Loader {
    /// Reads what the source holds now. A directory of bundles yields its newest `*.bundle`.
    fn read_source(&self) -> Result<Candidate, String> {
        match &self.source {
            PolicySource::UnsignedDir(dir) => {
                let files = PolicyFiles::read_dir(dir).map_err(|e| e.to_string())?;
                Ok(Candidate {
                    fingerprint: files.version(),
                    source: dir.display().to_string(),
                    content: Content::Files(files),
                })
            }
            PolicySource::Bundle { path, .. } => {
                let file = if path.is_dir() { newest_bundle(path)? } else { path.clone() };
                let bytes = read_bounded(&file)?;
                Ok(Candidate {
                    fingerprint: sha256_hex(&bytes),
                    source: file.display().to_string(),
                    content: Content::Bundle(bytes),
                })
            }
        }
    }

    /// Verifies (signed mode) and validates a release. CPU only: call off the runtime.
    fn build(&self, content: &Content, source: String) -> Result<Release, String> {
        match content {
            Content::Files(files) => Release::build(files, &self.trust_domain, None, None, source),
            Content::Bundle(bytes) => {
                let bundle = Bundle::parse(bytes).map_err(|e| e.to_string())?;
                let key_id = bundle.verify(&self.keys).map_err(|e| e.to_string())?;
                let label = bundle.manifest.label.clone();
                Release::build(&bundle.files, &self.trust_domain, label, Some(key_id), source)
            }
        }
    }
}

/// The kept bundle of the `i`-th release of the history, most recent first.
fn history_file(i: usize) -> String {
    if i == 0 { "previous.bundle".to_owned() } else { format!("previous-{}.bundle", i + 1) }
}

/// Every kept bundle moves one place back (the oldest beyond `HISTORY` goes), the new one
/// becomes current.bundle. Best effort: the kept copies are a fallback for restarts, not the
/// source of truth.
fn persist_new(state_dir: &Path, bytes: &[u8]) {
    let current = state_dir.join("current.bundle");
    let result = (|| -> std::io::Result<()> {
        for i in (0..HISTORY).rev() {
            let from = if i == 0 { current.clone() } else { state_dir.join(history_file(i - 1)) };
            let to = state_dir.join(history_file(i));
            if from.exists() {
                std::fs::rename(&from, &to)?;
            }
        }
        write_atomic(&current, bytes)
    })();
    if let Err(e) = result {
        tracing::error!(error = %e, dir = %state_dir.display(), "cannot keep a copy of the activated bundle");
    }
}

impl PolicyController {
    /// previous.bundle becomes current.bundle and every older one moves up; the bundle
    /// rolled back from is dropped (its version is held).
    fn persist_rollback(&self) {
        let dir = &self.state_dir;
        let result = (|| -> std::io::Result<()> {
            for i in 0..HISTORY {
                let from = dir.join(history_file(i));
                let to = if i == 0 { dir.join("current.bundle") } else { dir.join(history_file(i - 1)) };
                if from.exists() {
                    std::fs::rename(&from, &to)?;
                }
            }
            Ok(())
        })();
        if let Err(e) = result {
            tracing::error!(error = %e, dir = %dir.display(), "cannot move the kept bundles after a rollback");
        }
    }

    fn write_held(&self, versions: &[String]) {
        if !matches!(self.source, PolicySource::Bundle { .. }) {
            return;
        }
        let path = self.state_dir.join("held");
        let result = if versions.is_empty() {
            if path.exists() { std::fs::remove_file(&path) } else { Ok(()) }
        } else {
            write_atomic(&path, versions.join("\n").as_bytes())
        };
        if let Err(e) = result {
            tracing::error!(error = %e, path = %path.display(), "cannot record the held policy versions");
        }
    }
}

/// The held versions, oldest first (a file of one line, written before the history, reads too).
fn read_held(state_dir: &Path) -> Vec<String> {
    std::fs::read_to_string(state_dir.join("held"))
        .map(|s| s.lines().map(str::trim).filter(|l| !l.is_empty()).map(str::to_owned).collect())
        .unwrap_or_default()
}

fn activated(release: &Release, previous: Option<&Release>, via: &str) -> PolicyActivated {
    let p = &release.provenance;
    PolicyActivated {
        version: p.version.clone(),
        label: p.label.clone(),
        signed_by: p.signed_by.clone(),
        unsigned: p.signed_by.is_none(),
        source: p.source.clone(),
        previous: previous.map(|r| r.version().to_owned()),
        rules: release.engine.rule_count(),
        inventory_entries: release.inventory.entries().len(),
        via: via.to_owned(),
    }
}

fn newest_bundle(dir: &Path) -> Result<PathBuf, String> {
    let listing = std::fs::read_dir(dir).map_err(|e| format!("`{}`: {e}", dir.display()))?;
    listing
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "bundle") && p.is_file())
        .filter_map(|p| Some((std::fs::metadata(&p).ok()?.modified().ok()?, p)))
        .max()
        .map(|(_, p)| p)
        .ok_or_else(|| format!("`{}` holds no *.bundle file", dir.display()))
}

fn read_bounded(path: &Path) -> Result<Vec<u8>, String> {
    use std::io::Read;
    let file = std::fs::File::open(path).map_err(|e| format!("`{}`: {e}", path.display()))?;
    let mut bytes = Vec::new();
    file.take(crate::policy::bundle::MAX_BUNDLE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("`{}`: {e}", path.display()))?;
    if bytes.len() as u64 > crate::policy::bundle::MAX_BUNDLE_BYTES {
        return Err(format!("`{}` is larger than {} bytes", path.display(), crate::policy::bundle::MAX_BUNDLE_BYTES));
    }
    Ok(bytes)
}

fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}
