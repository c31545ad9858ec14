//! Signed checkpoints: each chain's events are also the leaves of an RFC 6962 Merkle tree
//! (a leaf is the event's chain hash), and a checkpoint is that tree's size and root in a
//! C2SP signed note (tlog-checkpoint), signed with Ed25519. The hash chain alone shows an
//! edit only to someone who does not recompute the hashes; a checkpoint kept where the
//! database's writers cannot reach (a file outside the data directory, a webhook) pins the
//! first `size` events, so truncation, deletion, insertion, reordering and rewriting with
//! recomputed hashes all change the root.
//!
//! Note format (<https://c2sp.org/tlog-checkpoint>, <https://c2sp.org/signed-note>):
//!
//! ```text
//! <trust domain>/mayfly-ledger[/<chain>]
//! <size>
//! <base64 root>
//! [mayfly-final]                       (the daemon's last checkpoint before it stopped)
//!
//! — <origin> <base64(key id (4 bytes) || Ed25519 signature)>
//! ```
//!
//! The key id is the first 4 bytes of SHA-256(name || "\n" || 0x01 || public key), the
//! signed-note rule for Ed25519 keys.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use tokio::sync::{Mutex, watch};

use super::merkle::{self, Frontier, Hash};
use super::{ChainError, ChainLink, EventFilter, LedgerError, LedgerRead};
use crate::breakglass::sinks::ElevatedSink;
use crate::policy::bundle::{PublicKey, SigningKey};

/// The extension line of a daemon's last checkpoint before it stopped: nothing may follow
/// it in the chain until the daemon starts again (and publishes a newer checkpoint).
pub const FINAL: &str = "mayfly-final";

const ORIGIN_PATH: &str = "/mayfly-ledger";

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("`{path}`: {why}")]
    File { path: PathBuf, why: String },
    #[error("ledger.checkpoint_webhook: {0}")]
    Sink(String),
    #[error("not a checkpoint: {0}")]
    Format(String),
    #[error("the checkpoint is not signed by key {key_id} (signed by another key, or edited)")]
    Signature { key_id: String },
    #[error("{0}")]
    Tree(#[from] TreeError),
    #[error(
        "the ledger does not extend its last checkpoint `{path}` (chain {chain}, {size} events): {why}. \
         If the ledger was restored from a backup on purpose, move the checkpoint aside (keep it: it is \
         evidence) and start again"
    )]
    NotExtended { path: PathBuf, chain: String, size: u64, why: Mismatch },
}

/// How a chain fails to match a checkpoint.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Mismatch {
    #[error("the ledger holds {held} events of the chain; the checkpoint covers {size} (truncated or deleted)")]
    Short { held: u64, size: u64 },
    #[error(
        "its first {size} events do not hash to the signed root (an event was edited, deleted, inserted or \
         reordered, even if the chain's hashes were recomputed)"
    )]
    Root { size: u64 },
    #[error("{after} events were appended after the daemon's final checkpoint at {size}")]
    AfterFinal { size: u64, after: u64 },
    #[error("the checkpoint is of chain `{theirs}`, not `{ours}`")]
    OtherChain { theirs: String, ours: String },
}

#[derive(Debug, thiserror::Error)]
pub enum TreeError {
    #[error(transparent)]
    Ledger(#[from] LedgerError),
    #[error("{}{source}", if chain.is_empty() { String::new() } else { format!("chain `{chain}`: ") })]
    Chain { chain: String, source: ChainError },
    #[error("event {seq}: its hash is not 32 bytes of hex")]
    BadHash { seq: i64 },
}

/// A chain's tree size and root, as signed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    pub origin: String,
    pub size: u64,
    pub root: Hash,
    pub extensions: Vec<String>,
}

/// The origin line of a chain's checkpoints (`""`: a local ledger's one chain).
pub fn origin(trust_domain: &str, chain: &str) -> String {
    if chain.is_empty() {
        format!("{trust_domain}{ORIGIN_PATH}")
    } else {
        format!("{trust_domain}{ORIGIN_PATH}/{chain}")
    }
}

impl Checkpoint {
    /// The chain this checkpoint is of, from its origin.
    pub fn chain(&self) -> Result<String, CheckpointError> {
        let (_, rest) = self
            .origin
            .split_once(ORIGIN_PATH)
            .ok_or_else(|| CheckpointError::Format(format!("origin `{}` is not a mayfly ledger's", self.origin)))?;
        match rest.strip_prefix('/') {
            None if rest.is_empty() => Ok(String::new()),
            Some(chain) if !chain.is_empty() => Ok(chain.to_owned()),
            _ => Err(CheckpointError::Format(format!("origin `{}` is not a mayfly ledger's", self.origin))),
        }
    }

    pub fn is_final(&self) -> bool {
        self.extensions.iter().any(|e| e == FINAL)
    }

    /// The signed text: origin, size, root, extensions, one per line.
    pub fn body(&self) -> String {
        let mut text = format!("{}\n{}\n{}\n", self.origin, self.size, B64.encode(self.root));
        for e in &self.extensions {
            text.push_str(e);
            text.push('\n');
        }
        text
    }

    /// The signed note.
    pub fn sign(&self, key: &SigningKey) -> String {
        let body = self.body();
        let mut blob = note_key_id(&self.origin, key.public().raw()).to_vec();
        blob.extend_from_slice(&key.sign_message(body.as_bytes()));
        format!("{body}\n\u{2014} {} {}\n", self.origin, B64.encode(blob))
    }

    /// Parses a signed note and checks its signature by `key` (named by the origin).
    pub fn open(note: &str, key: &PublicKey) -> Result<Self, CheckpointError> {
        let bad = |why: &str| CheckpointError::Format(why.to_owned());
        let (text, signatures) = note.split_once("\n\n").ok_or_else(|| bad("no blank line before the signatures"))?;
        let body = format!("{text}\n");
        let mut lines = text.split('\n');
        let origin = lines.next().filter(|l| !l.is_empty()).ok_or_else(|| bad("no origin line"))?.to_owned();
        let size_line = lines.next().ok_or_else(|| bad("no size line"))?;
        if size_line.len() > 1 && size_line.starts_with('0') {
            return Err(bad("the size has leading zeros"));
        }
        let size: u64 = size_line.parse().map_err(|_| bad("the size is not a decimal number"))?;
        let root = B64
            .decode(lines.next().ok_or_else(|| bad("no root line"))?)
            .ok()
            .and_then(|r| Hash::try_from(r.as_slice()).ok())
            .ok_or_else(|| bad("the root is not 32 bytes of base64"))?;
        let extensions: Vec<String> = lines.map(str::to_owned).collect();
        if extensions.iter().any(String::is_empty) {
            return Err(bad("an empty line in the note's text"));
        }
        let id = note_key_id(&origin, key.raw());
        let signed = signatures.lines().filter_map(|line| line.strip_prefix("\u{2014} ")).any(|line| {
            let Some((name, blob)) = line.split_once(' ') else { return false };
            let Ok(blob) = B64.decode(blob) else { return false };
            name == origin && blob.len() == 68 && blob[..4] == id && key.verifies(body.as_bytes(), &blob[4..])
        });
        if !signed {
            return Err(CheckpointError::Signature { key_id: key.key_id().to_owned() });
        }
        Ok(Self { origin, size, root, extensions })
    }

    /// Reads and opens a checkpoint file.
    pub fn read(path: &Path, key: &PublicKey) -> Result<Self, CheckpointError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| CheckpointError::File { path: path.into(), why: e.to_string() })?;
        Self::open(&text, key)
    }
}

/// The signed-note key id of an Ed25519 key named `name`.
fn note_key_id(name: &str, public: &[u8; 32]) -> [u8; 4] {
    let mut ctx = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
    ctx.update(name.as_bytes());
    ctx.update(b"\n\x01");
    ctx.update(public);
    let digest = ctx.finish();
    let mut id = [0u8; 4];
    id.copy_from_slice(&digest.as_ref()[..4]);
    id
}

/// A chain's Merkle tree built by reading its events in order, each link of the hash chain
/// checked on the way.
pub struct ChainTree {
    chain: String,
    frontier: Frontier,
    link: ChainLink,
    after: i64,
    /// Every leaf, when proofs will be asked for.
    leaves: Option<Vec<Hash>>,
}

impl ChainTree {
    pub fn new(chain: &str) -> Self {
        Self {
            chain: chain.to_owned(),
            frontier: Frontier::default(),
            link: ChainLink::default(),
            after: i64::MIN,
            leaves: None,
        }
    }

    /// Keeps every leaf (for `inclusion_proof`).
    pub fn keeping_leaves(mut self) -> Self {
        self.leaves = Some(Vec::new());
        self
    }

    pub fn size(&self) -> u64 {
        self.frontier.size()
    }

    pub fn root(&self) -> Hash {
        self.frontier.root()
    }

    /// Reads the events after those already read, up to `until` leaves in all if given.
    /// Returns how many were added.
    pub async fn extend(&mut self, reader: &dyn LedgerRead, until: Option<u64>) -> Result<u64, TreeError> {
        const PAGE: u64 = 10_000;
        let mut added = 0;
        loop {
            let want = until.map_or(PAGE, |u| u.saturating_sub(self.size()).min(PAGE));
            if want == 0 {
                break;
            }
            let filter = EventFilter {
                chain: Some(self.chain.clone()),
                after: self.after,
                limit: Some(i64::try_from(want).unwrap_or(i64::MAX)),
                ..EventFilter::default()
            };
            let page = reader.events(filter).await?;
            let Some(last) = page.last() else { break };
            self.after = last.pos;
            for e in &page {
                self.link.check(e).map_err(|source| TreeError::Chain { chain: self.chain.clone(), source })?;
                let raw = hex::decode(&e.hash)
                    .ok()
                    .and_then(|h| <[u8; 32]>::try_from(h.as_slice()).ok())
                    .ok_or(TreeError::BadHash { seq: e.seq })?;
                let leaf = merkle::leaf_hash(&raw);
                self.frontier.push(leaf);
                if let Some(leaves) = &mut self.leaves {
                    leaves.push(leaf);
                }
            }
            added += page.len() as u64;
            if (page.len() as u64) < want {
                break;
            }
        }
        Ok(added)
    }

    /// An inclusion proof of leaf `index` in the tree of the first `size` leaves (only with
    /// `keeping_leaves`).
    pub fn inclusion_proof(&self, index: u64, size: u64) -> Option<Vec<Hash>> {
        let leaves = self.leaves.as_ref()?;
        let size = usize::try_from(size).ok().filter(|s| *s <= leaves.len())?;
        merkle::inclusion_proof(&leaves[..size], usize::try_from(index).ok()?)
    }

    pub fn leaf(&self, index: u64) -> Option<Hash> {
        self.leaves.as_ref()?.get(usize::try_from(index).ok()?).copied()
    }
}

/// Checks that chain `chain` in `reader` extends `checkpoint`: it holds at least its
/// events, the first `size` of them hash to its root, and nothing follows a final one.
/// Leaves `tree` at the checkpoint's size (extend it further to read the rest).
pub async fn check_prefix(
    reader: &dyn LedgerRead,
    tree: &mut ChainTree,
    checkpoint: &Checkpoint,
) -> Result<Result<(), Mismatch>, TreeError> {
    tree.extend(reader, Some(checkpoint.size)).await?;
    if tree.size() < checkpoint.size {
        return Ok(Err(Mismatch::Short { held: tree.size(), size: checkpoint.size }));
    }
    if tree.root() != checkpoint.root {
        return Ok(Err(Mismatch::Root { size: checkpoint.size }));
    }
    Ok(Ok(()))
}

/// Where and how often a daemon publishes its checkpoints (`[ledger] checkpoint_*`).
#[derive(Clone, Debug)]
pub struct CheckpointSettings {
    /// The latest checkpoint, replaced atomically; outside the data directory.
    pub file: PathBuf,
    /// The Ed25519 signing key (PKCS#8 PEM); generated (mode 0600) when missing.
    pub key: PathBuf,
    pub interval: Duration,
    /// Each checkpoint is also POSTed here (a witness the box's users cannot rewrite).
    pub webhook: Option<String>,
}

impl CheckpointSettings {
    /// The public key auditors verify with: beside the checkpoint, `<file>.pub`.
    pub fn public_key_file(file: &Path) -> PathBuf {
        let mut name = file.as_os_str().to_owned();
        name.push(".pub");
        PathBuf::from(name)
    }
}

/// The daemon's checkpoint publisher for its own chain.
pub struct Checkpointer {
    reader: Arc<dyn LedgerRead>,
    tree: ChainTree,
    origin: String,
    key: SigningKey,
    file: PathBuf,
    sink: Option<Arc<dyn ElevatedSink>>,
    published: Option<u64>,
}

impl Checkpointer {
    /// Loads (or generates) the key, reads the chain, and checks that it extends the last
    /// checkpoint in the file: a daemon never starts on a ledger that was cut or rewritten
    /// behind its back.
    pub async fn start(
        reader: Arc<dyn LedgerRead>,
        trust_domain: &str,
        chain: &str,
        settings: &CheckpointSettings,
        sink: Option<Arc<dyn ElevatedSink>>,
    ) -> Result<Self, CheckpointError> {
        let key = load_or_generate_key(&settings.key)?;
        write_public_key(&settings.file, &key.public())?;
        let mut tree = ChainTree::new(chain);
        let origin = origin(trust_domain, chain);
        let not_extended = |why| CheckpointError::NotExtended {
            path: settings.file.clone(),
            chain: display_chain(chain),
            size: 0,
            why,
        };
        match std::fs::read_to_string(&settings.file) {
            Ok(text) => {
                let last = Checkpoint::open(&text, &key.public()).map_err(|e| CheckpointError::File {
                    path: settings.file.clone(),
                    why: format!("{e}; refusing to start on a ledger whose last checkpoint cannot be checked"),
                })?;
                let theirs = last.chain()?;
                if theirs != chain {
                    return Err(not_extended(Mismatch::OtherChain { theirs, ours: chain.to_owned() }));
                }
                if let Err(why) = check_prefix(reader.as_ref(), &mut tree, &last).await? {
                    return Err(CheckpointError::NotExtended {
                        path: settings.file.clone(),
                        chain: display_chain(chain),
                        size: last.size,
                        why,
                    });
                }
                tree.extend(reader.as_ref(), None).await?;
                if last.is_final() && tree.size() > last.size {
                    let after = tree.size() - last.size;
                    return Err(CheckpointError::NotExtended {
                        path: settings.file.clone(),
                        chain: display_chain(chain),
                        size: last.size,
                        why: Mismatch::AfterFinal { size: last.size, after },
                    });
                }
                tracing::info!(file = %settings.file.display(), size = last.size, events = tree.size(), "the ledger extends its last checkpoint");
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                tree.extend(reader.as_ref(), None).await?;
                tracing::warn!(file = %settings.file.display(), events = tree.size(), "no checkpoint yet: starting a new series of checkpoints at this size");
            }
            Err(e) => return Err(CheckpointError::File { path: settings.file.clone(), why: e.to_string() }),
        }
        let mut this = Self { reader, tree, origin, key, file: settings.file.clone(), sink, published: None };
        // Why publish before anything is appended: a final checkpoint says "nothing
        // follows"; replaced now by a plain one, a daemon that dies before its first tick
        // (SIGKILL, power) is not refused at its next start for events it wrote itself.
        this.publish(false).await?;
        Ok(this)
    }

    /// Reads what was committed since, signs a checkpoint of it, replaces the file and
    /// posts it to the sink. Skips an unchanged tree unless `last` (the shutdown's final
    /// checkpoint). Returns the size published.
    pub async fn publish(&mut self, last: bool) -> Result<u64, CheckpointError> {
        self.tree.extend(self.reader.as_ref(), None).await?;
        let size = self.tree.size();
        if !last && self.published == Some(size) {
            return Ok(size);
        }
        let checkpoint = Checkpoint {
            origin: self.origin.clone(),
            size,
            root: self.tree.root(),
            extensions: if last { vec![FINAL.to_owned()] } else { Vec::new() },
        };
        let note = checkpoint.sign(&self.key);
        write_atomically(&self.file, note.as_bytes(), 0o644)?;
        self.published = Some(size);
        if let Some(sink) = &self.sink {
            let line = serde_json::json!({ "origin": self.origin, "size": size, "checkpoint": note }).to_string();
            if let Err(e) = sink.write(&line).await {
                tracing::warn!(sink = sink.name(), error = %e, size, "checkpoint not delivered to its sink; the next one will be");
            }
        }
        Ok(size)
    }

    /// Publishes every `interval` until `stop`. The final checkpoint is the caller's, once
    /// the writer has drained.
    pub async fn run(this: Arc<Mutex<Self>>, interval: Duration, mut stop: watch::Receiver<bool>) {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.wait_for(|s| *s) => return,
            }
            if let Err(e) = this.lock().await.publish(false).await {
                tracing::error!(error = %e, "checkpoint failed; retrying next interval");
            }
        }
    }
}

fn display_chain(chain: &str) -> String {
    if chain.is_empty() { "local".into() } else { format!("`{chain}`") }
}

fn load_or_generate_key(path: &Path) -> Result<SigningKey, CheckpointError> {
    let file_err = |why: String| CheckpointError::File { path: path.into(), why };
    if !path.exists() {
        let (private, _, _) = crate::policy::bundle::keygen().map_err(|e| file_err(e.to_string()))?;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(|e| file_err(e.to_string()))?;
        f.write_all(private.as_bytes()).and_then(|()| f.sync_all()).map_err(|e| file_err(e.to_string()))?;
        tracing::info!(key = %path.display(), "generated the checkpoint signing key");
    }
    SigningKey::load(path).map_err(|e| file_err(e.to_string()))
}

/// `<file>.pub`, for auditors; rewritten only when it differs.
fn write_public_key(file: &Path, public: &PublicKey) -> Result<(), CheckpointError> {
    let path = CheckpointSettings::public_key_file(file);
    let pem = public.to_pem();
    if std::fs::read_to_string(&path).is_ok_and(|text| text == pem) {
        return Ok(());
    }
    write_atomically(&path, pem.as_bytes(), 0o644)
}

/// Write to a temporary file beside `path`, fsync, rename over it, fsync the directory: a
/// reader sees the old or the new file, never half of one.
fn write_atomically(path: &Path, bytes: &[u8], mode: u32) -> Result<(), CheckpointError> {
    let err = |e: std::io::Error| CheckpointError::File { path: path.into(), why: e.to_string() };
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = path.file_name().ok_or_else(|| err(std::io::Error::other("not a file name")))?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(".tmp");
    let tmp = dir.join(tmp_name);
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(mode).open(&tmp).map_err(err)?;
    f.write_all(bytes).and_then(|()| f.sync_all()).map_err(err)?;
    std::fs::rename(&tmp, path).map_err(err)?;
    std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(err)
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use super::*;
    use crate::ledger::event::{DaemonStopped, Event};
    use crate::ledger::memory::MemoryBackend;
    use crate::ledger::{GroupCommitLedger, Ledger};

    /// A ledger of `n` events; `odd_one` makes event `odd_one` differ.
    async fn ledger_of(n: usize, odd_one: Option<usize>) -> MemoryBackend {
        let backend = MemoryBackend::default();
        let (writer, task) = GroupCommitLedger::start(backend.clone(), 4).await.unwrap();
        for i in 1..=n {
            let event = Event::DaemonStopped(DaemonStopped { clean: odd_one != Some(i) });
            writer.record(SystemTime::UNIX_EPOCH, event).await.unwrap();
        }
        drop(writer);
        task.await.unwrap();
        backend
    }

    async fn tree(backend: &MemoryBackend, until: Option<u64>) -> ChainTree {
        let mut tree = ChainTree::new("").keeping_leaves();
        tree.extend(backend, until).await.unwrap();
        tree
    }

    #[tokio::test]
    async fn a_chains_tree_is_rfc_6962s_over_its_event_hashes_read_in_pages_or_not() {
        for n in [0, 1, 2, 3, 7, 8, 9, 33] {
            let backend = ledger_of(n, None).await;
            let leaves: Vec<Hash> =
                backend.events().iter().map(|e| merkle::leaf_hash(&hex::decode(&e.hash).unwrap())).collect();
            let whole = tree(&backend, None).await;
            assert_eq!((whole.size(), whole.root()), (n as u64, merkle::root(&leaves)), "{n} events");
            // Read in two steps (as the checkpointer does between ticks): the same root.
            let mut stepwise = tree(&backend, Some(n as u64 / 2)).await;
            stepwise.extend(&backend, None).await.unwrap();
            assert_eq!(stepwise.root(), whole.root());
            for (i, leaf) in leaves.iter().enumerate() {
                let proof = whole.inclusion_proof(i as u64, n as u64).unwrap();
                assert!(merkle::verify_inclusion(leaf, i as u64, n as u64, &proof, &whole.root()));
            }
        }
    }

    #[tokio::test]
    async fn a_ledger_is_checked_against_a_checkpoint_of_it_and_of_others() {
        let signed = tree(&ledger_of(5, None).await, None).await;
        let checkpoint = Checkpoint { origin: origin("td", ""), size: 5, root: signed.root(), extensions: Vec::new() };
        let check = |backend: MemoryBackend| {
            let checkpoint = checkpoint.clone();
            async move { check_prefix(&backend, &mut ChainTree::new(""), &checkpoint).await.unwrap() }
        };
        assert_eq!(check(ledger_of(5, None).await).await, Ok(()));
        assert_eq!(check(ledger_of(9, None).await).await, Ok(()), "a ledger that grew still extends it");
        assert_eq!(check(ledger_of(3, None).await).await, Err(Mismatch::Short { held: 3, size: 5 }));
        assert_eq!(check(ledger_of(5, Some(2)).await).await, Err(Mismatch::Root { size: 5 }));
        assert_eq!(check(ledger_of(9, Some(4)).await).await, Err(Mismatch::Root { size: 5 }));
        assert_eq!(check(ledger_of(9, Some(6)).await).await, Ok(()), "events after the checkpoint are not its to pin");
    }

    fn key(dir: &Path) -> SigningKey {
        load_or_generate_key(&dir.join("k.pem")).unwrap()
    }

    fn checkpoint() -> Checkpoint {
        Checkpoint { origin: origin("example.org", "a-1"), size: 42, root: [7u8; 32], extensions: vec![FINAL.into()] }
    }

    #[test]
    fn a_signed_note_opens_with_its_key_and_with_no_other() {
        let dir = tempfile::tempdir().unwrap();
        let k = key(dir.path());
        let note = checkpoint().sign(&k);
        assert!(note.starts_with("example.org/mayfly-ledger/a-1\n42\n"), "{note}");
        assert!(note.contains("\nmayfly-final\n\n\u{2014} example.org/mayfly-ledger/a-1 "), "{note}");
        let opened = Checkpoint::open(&note, &k.public()).unwrap();
        assert_eq!(opened, checkpoint());
        assert_eq!(opened.chain().unwrap(), "a-1");
        assert!(opened.is_final());

        let other = load_or_generate_key(&dir.path().join("other.pem")).unwrap();
        assert!(matches!(Checkpoint::open(&note, &other.public()), Err(CheckpointError::Signature { .. })));
        let edited = note.replacen("\n42\n", "\n41\n", 1);
        assert!(matches!(Checkpoint::open(&edited, &k.public()), Err(CheckpointError::Signature { .. })));
        let not_final = note.replacen("mayfly-final\n", "", 1);
        assert!(Checkpoint::open(&not_final, &k.public()).is_err());
    }

    #[test]
    fn the_key_id_follows_the_signed_note_rule() {
        // c2sp.org/signed-note: key id = SHA-256(name || 0x0A || 0x01 || key)[:4].
        let public = [1u8; 32];
        let mut input = b"origin\n\x01".to_vec();
        input.extend_from_slice(&public);
        let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &input);
        assert_eq!(note_key_id("origin", &public), digest.as_ref()[..4]);
    }

    #[test]
    fn the_origin_names_the_chain() {
        let local = Checkpoint { origin: origin("td", ""), ..checkpoint() };
        assert_eq!(local.origin, "td/mayfly-ledger");
        assert_eq!(local.chain().unwrap(), "");
        let odd = Checkpoint { origin: "td/other".into(), ..checkpoint() };
        assert!(odd.chain().is_err());
    }

    #[test]
    fn malformed_notes_are_refused_with_a_reason() {
        let dir = tempfile::tempdir().unwrap();
        let k = key(dir.path()).public();
        for (note, why) in [
            ("", "blank line"),
            ("o\n\n— o AAAA\n", "size"),
            ("o\n012\nAAAA\n\n— o AAAA\n", "leading zeros"),
            ("o\n12\nAAAA\n\n— o AAAA\n", "32 bytes"),
        ] {
            let e = Checkpoint::open(note, &k).unwrap_err().to_string();
            assert!(e.contains(why), "{note:?}: {e}");
        }
    }

    #[test]
    fn a_generated_key_is_private_to_its_owner_and_reused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let a = key(dir.path());
        let mode = std::fs::metadata(dir.path().join("k.pem")).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(key(dir.path()).key_id(), a.key_id());
    }
}
