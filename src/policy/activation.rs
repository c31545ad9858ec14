//! Policy activation: reads the configured source (a signed bundle, or the unsigned dev
//! tree), verifies and validates each new release off the request path, swaps it in,
//! keeps the previous good one, and records every activation, rejection and rollback.
//!
//! Signed mode keeps the last two good bundles in `<data_dir>/policy/` (`current.bundle`,
//! `previous.bundle`, re-verified on every start) and the version an operator rolled back
//! from (`held`), so a restart neither loses a rollback nor fails on a bad published bundle.
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
use crate::policy::store::PolicyStore;

#[derive(Debug, thiserror::Error)]
pub enum ActivationError {
    #[error("no usable policy release: {0}")]
    NoRelease(String),
    #[error("there is no previous good release to roll back to")]
    NoPrevious,
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

struct Watch {
    /// Fingerprint of the source as last considered: an unchanged source is not rebuilt.
    last_seen: Option<String>,
    /// Version rolled back from: not re-activated from the source.
    held: Option<String>,
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
    pub previous: Option<Arc<Release>>,
    pub held: Option<String>,
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
        let held = if signed { read_held(&state_dir) } else { None };
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
        let (stored_current, stored_previous) =
            if signed { (kept("current.bundle"), kept("previous.bundle")) } else { (None, None) };
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
        let (current, previous, via) = match built {
            Ok((_, release)) if held.as_deref() == Some(release.version()) && stored_current.is_some() => {
                tracing::warn!(
                    version = release.version(),
                    "the published policy is held after a rollback; keeping the kept release"
                );
                (stored_current, stored_previous, "startup (published release held)")
            }
            Ok((candidate, release)) => {
                let same = stored_current.as_ref().is_some_and(|s| s.version() == release.version());
                let previous = if same { stored_previous } else { stored_current };
                if let (true, Content::Bundle(bytes)) = (signed && !same, &candidate.content) {
                    persist_new(&state_dir, bytes);
                }
                (Some(release), previous, "startup")
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
                    Some(kept) => (Some(kept), stored_previous, "startup (kept release)"),
                    None => return Err(ActivationError::NoRelease(why)),
                }
            }
        };
        let current = Arc::new(current.ok_or_else(|| ActivationError::NoRelease("no release".into()))?);
        let previous = previous.map(Arc::new);
        record(Event::PolicyActivated(activated(&current, previous.as_deref(), via))).await?;
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
            store: Arc::new(PolicyStore::new(current, previous)),
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
        watch.held = watch.held.take().filter(|h| h != version);
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
        let mut watch = self.watch.lock().await;
        watch.held = Some(from.to_owned());
        self.write_held(Some(from));
    }

    pub fn store(&self) -> Arc<PolicyStore> {
        self.store.clone()
    }

    pub async fn status(&self) -> Status {
        let held = self.watch.lock().await.held.clone();
        Status { current: self.store.current(), previous: self.store.previous(), held }
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

    pub async fn poll(self: &Arc<Self>) {
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
                return;
            }
        };
        if watch.last_seen.as_deref() == Some(fingerprint.as_str()) {
            return;
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
            Err(why) => return self.reject(&why, None).await,
        };
        let current = self.store.current();
        if release.version() == current.version() {
            tracing::debug!(version = release.version(), "policy source re-published the active version");
            return;
        }
        if watch.held.as_deref() == Some(release.version()) {
            let why = "this version was rolled back by an operator; publish a different version to move on";
            return self.reject(why, Some(release.version())).await;
        }
        let release = Arc::new(release);
        if let (Some(releases), Content::Bundle(bytes)) = (&self.releases, &candidate.content)
            && let Err(e) = releases.put(release.version(), bytes).await
        {
            tracing::error!(error = %e, version = release.version(), "cannot share the release with the other daemons; not activating it yet");
            watch.last_seen = None;
            return;
        }
        if let Err(e) = self.record(Event::PolicyActivated(activated(&release, Some(&current), "watch"))).await {
            tracing::error!(error = %e, version = release.version(), "cannot record the activation; keeping the current policy");
            watch.last_seen = None;
            return;
        }
        if let Content::Bundle(bytes) = &candidate.content {
            persist_new(&self.state_dir, bytes);
        }
        watch.held = None;
        self.write_held(None);
        self.store.activate(release.clone());
        tracing::info!(from = current.version(), to = release.version(), "policy activated");
    }

    /// Returns to the previous good release and holds the one rolled back from.
    pub async fn rollback(
        &self,
        operator: Operator,
        reason: &str,
    ) -> Result<(Arc<Release>, Arc<Release>, EventId), ActivationError> {
        let mut watch = self.watch.lock().await;
        let (from, to) = (self.store.current(), self.store.previous().ok_or(ActivationError::NoPrevious)?);
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
            self.persist_swap();
        }
        watch.held = Some(from.version().to_owned());
        self.write_held(Some(from.version()));
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

/// current.bundle → previous.bundle, the new bundle → current.bundle. Best effort: the
/// kept copies are a fallback for restarts, not the source of truth.
fn persist_new(state_dir: &Path, bytes: &[u8]) {
    let (current, previous) = (state_dir.join("current.bundle"), state_dir.join("previous.bundle"));
    let result = (|| -> std::io::Result<()> {
        if current.exists() {
            std::fs::rename(&current, &previous)?;
        }
        write_atomic(&current, bytes)
    })();
    if let Err(e) = result {
        tracing::error!(error = %e, dir = %state_dir.display(), "cannot keep a copy of the activated bundle");
    }
}

impl PolicyController {
    fn persist_swap(&self) {
        let (current, previous, tmp) = (
            self.state_dir.join("current.bundle"),
            self.state_dir.join("previous.bundle"),
            self.state_dir.join("swap.tmp"),
        );
        let result = (|| -> std::io::Result<()> {
            std::fs::rename(&current, &tmp)?;
            std::fs::rename(&previous, &current)?;
            std::fs::rename(&tmp, &previous)
        })();
        if let Err(e) = result {
            tracing::error!(error = %e, dir = %self.state_dir.display(), "cannot swap the kept bundles");
        }
    }

    fn write_held(&self, version: Option<&str>) {
        if !matches!(self.source, PolicySource::Bundle { .. }) {
            return;
        }
        let path = self.state_dir.join("held");
        let result = match version {
            Some(v) => write_atomic(&path, v.as_bytes()),
            None if path.exists() => std::fs::remove_file(&path),
            None => Ok(()),
        };
        if let Err(e) = result {
            tracing::error!(error = %e, path = %path.display(), "cannot record the held policy version");
        }
    }
}

fn read_held(state_dir: &Path) -> Option<String> {
    std::fs::read_to_string(state_dir.join("held")).ok().map(|s| s.trim().to_owned()).filter(|s| !s.is_empty())
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
