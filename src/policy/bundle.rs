//! Policy bundles: the policies/ tree as one content-addressed archive, signed with Ed25519.
//!
//! A bundle is a ustar archive with fixed headers (mode 0644, owner 0, mtime 0), so the same
//! tree always builds the same bytes:
//!
//! ```text
//! mayfly-bundle.json   manifest: format, version, label, the SHA-256 of every file
//! files/<path>         schema.cedarschema, inventory.toml, issuance/, exceptions/, break-glass/, tests/
//! mayfly-bundle.sig    after `mayfly policy sign`: key id + Ed25519 signature over the manifest
//! ```
//!
//! The **version** is the SHA-256 over the sorted list of (path, SHA-256 of content): it
//! names the policy content, whatever the label or signature. The signature covers the manifest
//! bytes (with a context prefix), and the manifest pins every file's digest, so nothing in a
//! verified bundle is unsigned. Reading a bundle is strict: regular files only, no duplicate
//! or unlisted entries, bounded sizes.

use std::collections::BTreeMap;
use std::fmt;
use std::io::Read;
use std::path::{Path, PathBuf};

use aws_lc_rs::signature::{ED25519, Ed25519KeyPair, KeyPair, UnparsedPublicKey};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

pub const MANIFEST: &str = "mayfly-bundle.json";
pub const SIGNATURE: &str = "mayfly-bundle.sig";
const FILES_PREFIX: &str = "files/";
const FORMAT: &str = "mayfly.policy.bundle/v1";
/// Domain separation: a signature over a bundle manifest can never be replayed as anything else.
const SIGNING_CONTEXT: &[u8] = b"mayfly policy bundle v1\n";
pub const MAX_BUNDLE_BYTES: u64 = 16 * 1024 * 1024;
const MAX_FILES: usize = 4096;
/// The directories of policies/ that go into a bundle, and the extension of their files.
const TREE: [(&str, &str); 6] = [
    ("issuance", "cedar"),
    ("exceptions", "cedar"),
    ("break-glass", "cedar"),
    ("session-policies", "json"),
    ("assurance", "cedar"),
    ("tests", "toml"),
];
const TOP_FILES: [&str; 2] = ["schema.cedarschema", "inventory.toml"];

#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error("cannot read `{path}`: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("cannot write `{path}`: {source}")]
    Write { path: PathBuf, source: std::io::Error },
    #[error("`{path}` is missing (a policy tree needs schema.cedarschema and inventory.toml)")]
    Missing { path: PathBuf },
    #[error("`{path}` is not UTF-8 text")]
    NotText { path: String },
    #[error("not a mayfly policy bundle: {0}")]
    Format(String),
    #[error("the bundle is unsigned (sign it with `mayfly policy sign FILE --key KEY`)")]
    Unsigned,
    #[error("the bundle is signed by key {key_id}, which is not among the trusted keys")]
    UnknownKey { key_id: String },
    #[error("the signature does not verify: the bundle was altered after signing, or forged")]
    BadSignature,
    #[error("`{path}` is not a usable Ed25519 {what}: {why}")]
    Key { path: PathBuf, what: &'static str, why: String },
}

/// The policy files of one release, by relative path (`issuance/local.cedar`). All text.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PolicyFiles {
    files: BTreeMap<String, String>,
}

impl PolicyFiles {
    /// Reads a policies/ directory: the two top files and the `*.cedar` / `*.toml` files of
    /// its rule and test directories (other files, e.g. a README, are not policy).
    pub fn read_dir(dir: &Path) -> Result<Self, BundleError> {
        let mut files = BTreeMap::new();
        for name in TOP_FILES {
            let path = dir.join(name);
            match std::fs::read(&path) {
                Ok(bytes) => {
                    files.insert(name.to_owned(), text(name, bytes)?);
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(BundleError::Missing { path }),
                Err(source) => return Err(BundleError::Read { path, source }),
            }
        }
        for (sub, ext) in TREE {
            let sub_dir = dir.join(sub);
            let listing = match std::fs::read_dir(&sub_dir) {
                Ok(listing) => listing,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(source) => return Err(BundleError::Read { path: sub_dir, source }),
            };
            for entry in listing {
                let entry = entry.map_err(|source| BundleError::Read { path: sub_dir.clone(), source })?;
                let path = entry.path();
                let Some(name) = path.file_name().and_then(|n| n.to_str()) else { continue };
                if path.extension().is_none_or(|e| e != ext) || !path.is_file() {
                    continue;
                }
                let rel = format!("{sub}/{name}");
                let bytes = std::fs::read(&path).map_err(|source| BundleError::Read { path: path.clone(), source })?;
                files.insert(rel.clone(), text(&rel, bytes)?);
            }
        }
        Ok(Self { files })
    }

    pub fn from_map(files: BTreeMap<String, String>) -> Self {
        Self { files }
    }

    pub fn get(&self, path: &str) -> Option<&str> {
        self.files.get(path).map(String::as_str)
    }

    /// Files under `dir/` with extension `ext`, in path order.
    pub fn under<'a>(&'a self, dir: &'a str, ext: &'a str) -> impl Iterator<Item = (&'a str, &'a str)> + 'a {
        self.files
            .iter()
            .filter(move |(p, _)| {
                p.strip_prefix(dir).and_then(|r| r.strip_prefix('/')).is_some_and(|n| !n.contains('/'))
                    && p.ends_with(&format!(".{ext}"))
            })
            .map(|(p, t)| (p.as_str(), t.as_str()))
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.files.iter().map(|(p, t)| (p.as_str(), t.as_str()))
    }

    pub fn len(&self) -> usize {
        self.files.len()
    }

    pub fn is_empty(&self) -> bool {
        self.files.is_empty()
    }

    /// Each file's SHA-256 (lower-case hex), by path.
    fn digests(&self) -> BTreeMap<String, String> {
        self.files.iter().map(|(p, t)| (p.clone(), sha256_hex(t.as_bytes()))).collect()
    }

    /// `sha256:<hex>` over the sorted (path, content digest) list: the release's name.
    pub fn version(&self) -> String {
        version_of(&self.digests())
    }
}

fn version_of(digests: &BTreeMap<String, String>) -> String {
    let mut listing = String::new();
    for (path, digest) in digests {
        listing.push_str(path);
        listing.push('\n');
        listing.push_str(digest);
        listing.push('\n');
    }
    format!("sha256:{}", sha256_hex(listing.as_bytes()))
}

fn text(path: &str, bytes: Vec<u8>) -> Result<String, BundleError> {
    String::from_utf8(bytes).map_err(|_| BundleError::NotText { path: path.to_owned() })
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, bytes))
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub format: String,
    pub version: String,
    /// A human label, e.g. a git commit or release tag. Not part of the version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
    /// SHA-256 of each file, by path.
    pub files: BTreeMap<String, String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct SignatureFile {
    alg: String,
    key_id: String,
    signature: String,
}

/// A bundle read from bytes whose files match its manifest. Not yet trusted: `verify`.
#[derive(Clone, Debug)]
pub struct Bundle {
    pub manifest: Manifest,
    pub files: PolicyFiles,
    manifest_bytes: Vec<u8>,
    signature: Option<SignatureFile>,
}

impl Bundle {
    /// Builds the unsigned archive for `files`.
    pub fn build(files: &PolicyFiles, label: Option<String>) -> Result<Vec<u8>, BundleError> {
        if let Some(l) = &label
            && (l.len() > 200 || l.chars().any(char::is_control))
        {
            return Err(BundleError::Format("the label must be one line of at most 200 characters".into()));
        }
        let digests = files.digests();
        let manifest = Manifest { format: FORMAT.into(), version: version_of(&digests), label, files: digests };
        let manifest_bytes = serde_json::to_vec_pretty(&manifest).map_err(|e| BundleError::Format(e.to_string()))?;
        let mut entries: Vec<(String, &[u8])> = vec![(MANIFEST.to_owned(), &manifest_bytes)];
        entries.extend(files.iter().map(|(p, t)| (format!("{FILES_PREFIX}{p}"), t.as_bytes())));
        archive(&entries)
    }

    /// Parses and checks structure: every listed file present with its digest, nothing else.
    pub fn parse(bytes: &[u8]) -> Result<Self, BundleError> {
        let bad = |why: String| BundleError::Format(why);
        if bytes.len() as u64 > MAX_BUNDLE_BYTES {
            return Err(bad(format!("larger than {MAX_BUNDLE_BYTES} bytes")));
        }
        let mut archive = tar::Archive::new(bytes);
        let mut raw: BTreeMap<String, Vec<u8>> = BTreeMap::new();
        for entry in archive.entries().map_err(|e| bad(e.to_string()))? {
            let mut entry = entry.map_err(|e| bad(e.to_string()))?;
            if entry.header().entry_type() != tar::EntryType::Regular {
                return Err(bad("only regular files are allowed".into()));
            }
            let path = entry.path().map_err(|e| bad(e.to_string()))?.to_string_lossy().into_owned();
            let safe = !path.starts_with('/') && path.split('/').all(|s| !s.is_empty() && s != "." && s != "..");
            if !safe {
                return Err(bad(format!("unsafe path `{path}`")));
            }
            let mut content = Vec::new();
            entry.by_ref().take(MAX_BUNDLE_BYTES).read_to_end(&mut content).map_err(|e| bad(e.to_string()))?;
            if raw.insert(path.clone(), content).is_some() {
                return Err(bad(format!("`{path}` appears twice")));
            }
            if raw.len() > MAX_FILES + 2 {
                return Err(bad(format!("more than {MAX_FILES} files")));
            }
        }
        let manifest_bytes = raw.remove(MANIFEST).ok_or_else(|| bad(format!("no {MANIFEST}")))?;
        let manifest: Manifest =
            serde_json::from_slice(&manifest_bytes).map_err(|e| bad(format!("{MANIFEST}: {e}")))?;
        if manifest.format != FORMAT {
            return Err(bad(format!("format `{}` (this mayfly reads {FORMAT})", manifest.format)));
        }
        let signature = match raw.remove(SIGNATURE) {
            Some(b) => Some(serde_json::from_slice::<SignatureFile>(&b).map_err(|e| bad(format!("{SIGNATURE}: {e}")))?),
            None => None,
        };
        let mut files = BTreeMap::new();
        for (path, content) in raw {
            let rel = path.strip_prefix(FILES_PREFIX).ok_or_else(|| bad(format!("unexpected entry `{path}`")))?;
            let listed = manifest.files.get(rel).ok_or_else(|| bad(format!("`{rel}` is not in the manifest")))?;
            if *listed != sha256_hex(&content) {
                return Err(bad(format!("`{rel}` does not match its digest in the manifest")));
            }
            files.insert(rel.to_owned(), text(rel, content)?);
        }
        if let Some(missing) = manifest.files.keys().find(|p| !files.contains_key(*p)) {
            return Err(bad(format!("`{missing}` is in the manifest but not in the archive")));
        }
        let files = PolicyFiles { files };
        if files.version() != manifest.version {
            return Err(bad(format!(
                "the manifest says version {} but the files are {}",
                manifest.version,
                files.version()
            )));
        }
        Ok(Self { manifest, files, manifest_bytes, signature })
    }

    pub fn version(&self) -> &str {
        &self.manifest.version
    }

    pub fn is_signed(&self) -> bool {
        self.signature.is_some()
    }

    /// The same archive with `key`'s signature (replacing any earlier one).
    pub fn sign(&self, key: &SigningKey) -> Result<Vec<u8>, BundleError> {
        let signature = key.pair.sign(&signed_message(&self.manifest_bytes));
        let sig = SignatureFile {
            alg: "ed25519".into(),
            key_id: key.key_id.clone(),
            signature: hex::encode(signature.as_ref()),
        };
        let sig_bytes = serde_json::to_vec_pretty(&sig).map_err(|e| BundleError::Format(e.to_string()))?;
        let mut entries: Vec<(String, &[u8])> =
            vec![(MANIFEST.to_owned(), &self.manifest_bytes), (SIGNATURE.to_owned(), &sig_bytes)];
        entries.extend(self.files.iter().map(|(p, t)| (format!("{FILES_PREFIX}{p}"), t.as_bytes())));
        archive(&entries)
    }

    /// Checks the signature against the trusted keys; returns the id of the key that signed.
    pub fn verify(&self, trusted: &[PublicKey]) -> Result<String, BundleError> {
        let sig = self.signature.as_ref().ok_or(BundleError::Unsigned)?;
        if sig.alg != "ed25519" {
            return Err(BundleError::Format(format!("signature algorithm `{}` (only ed25519)", sig.alg)));
        }
        let key = trusted
            .iter()
            .find(|k| k.key_id == sig.key_id)
            .ok_or_else(|| BundleError::UnknownKey { key_id: sig.key_id.clone() })?;
        let signature = hex::decode(&sig.signature).map_err(|_| BundleError::BadSignature)?;
        UnparsedPublicKey::new(&ED25519, &key.raw)
            .verify(&signed_message(&self.manifest_bytes), &signature)
            .map_err(|_| BundleError::BadSignature)?;
        Ok(key.key_id.clone())
    }
}

fn signed_message(manifest: &[u8]) -> Vec<u8> {
    let mut message = SIGNING_CONTEXT.to_vec();
    message.extend_from_slice(manifest);
    message
}

fn archive(entries: &[(String, &[u8])]) -> Result<Vec<u8>, BundleError> {
    let mut builder = tar::Builder::new(Vec::new());
    for (path, content) in entries {
        let mut header = tar::Header::new_ustar();
        header.set_size(content.len() as u64);
        header.set_mode(0o644);
        header.set_uid(0);
        header.set_gid(0);
        header.set_mtime(0);
        header.set_entry_type(tar::EntryType::Regular);
        builder.append_data(&mut header, path, *content).map_err(|e| BundleError::Format(format!("`{path}`: {e}")))?;
    }
    builder.into_inner().map_err(|e| BundleError::Format(e.to_string()))
}

/// An Ed25519 private key for signing bundles. `Debug` shows only its key id.
pub struct SigningKey {
    pair: Ed25519KeyPair,
    key_id: String,
}

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SigningKey").field("key_id", &self.key_id).field("private", &"<redacted>").finish()
    }
}

impl SigningKey {
    /// Reads a PKCS#8 PEM (`-----BEGIN PRIVATE KEY-----`, as `openssl genpkey -algorithm
    /// ed25519` writes). The file's bytes are zeroized after parsing.
    pub fn load(path: &Path) -> Result<Self, BundleError> {
        let bad = |why: String| BundleError::Key { path: path.into(), what: "private key", why };
        let text =
            Zeroizing::new(std::fs::read(path).map_err(|source| BundleError::Read { path: path.into(), source })?);
        let block = pem::parse(&*text).map_err(|e| bad(e.to_string()))?;
        if block.tag() != "PRIVATE KEY" {
            return Err(bad(format!("expected a `PRIVATE KEY` PEM block, found `{}`", block.tag())));
        }
        let der = Zeroizing::new(block.into_contents());
        let pair = Ed25519KeyPair::from_pkcs8(&der).map_err(|e| bad(e.to_string()))?;
        let key_id = key_id(pair.public_key().as_ref());
        Ok(Self { pair, key_id })
    }

    pub fn key_id(&self) -> &str {
        &self.key_id
    }

    /// An Ed25519 signature over `message` (ledger checkpoints use the same keys).
    pub fn sign_message(&self, message: &[u8]) -> [u8; 64] {
        let mut out = [0u8; 64];
        out.copy_from_slice(self.pair.sign(message).as_ref());
        out
    }

    /// The raw 32-byte public key.
    pub fn public(&self) -> PublicKey {
        let mut raw = [0u8; 32];
        raw.copy_from_slice(self.pair.public_key().as_ref());
        PublicKey { raw, key_id: key_id(&raw) }
    }
}

/// A trusted Ed25519 public key (SubjectPublicKeyInfo PEM, `-----BEGIN PUBLIC KEY-----`).
#[derive(Clone, PartialEq, Eq)]
pub struct PublicKey {
    raw: [u8; 32],
    key_id: String,
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PublicKey").field("key_id", &self.key_id).finish()
    }
}

const ED25519_OID: &str = "1.3.101.112";

impl PublicKey {
    pub fn load(path: &Path) -> Result<Self, BundleError> {
        let text = std::fs::read(path).map_err(|source| BundleError::Read { path: path.into(), source })?;
        Self::from_pem(&text).map_err(|why| BundleError::Key { path: path.into(), what: "public key", why })
    }

    pub fn from_pem(text: &[u8]) -> Result<Self, String> {
        use x509_parser::prelude::FromDer;
        let block = pem::parse(text).map_err(|e| e.to_string())?;
        if block.tag() != "PUBLIC KEY" {
            return Err(format!("expected a `PUBLIC KEY` PEM block, found `{}`", block.tag()));
        }
        let (rest, spki) =
            x509_parser::x509::SubjectPublicKeyInfo::from_der(block.contents()).map_err(|e| e.to_string())?;
        if !rest.is_empty() {
            return Err("trailing bytes after the key".into());
        }
        if spki.algorithm.algorithm.to_id_string() != ED25519_OID {
            return Err(format!(
                "algorithm {} is not Ed25519 ({ED25519_OID})",
                spki.algorithm.algorithm.to_id_string()
            ));
        }
        let raw: [u8; 32] = spki.subject_public_key.data.as_ref().try_into().map_err(|_| "not 32 bytes".to_owned())?;
        Ok(Self { raw, key_id: key_id(&raw) })
    }

    pub fn key_id(&self) -> &str {
        &self.key_id
    }

    /// The raw 32-byte key.
    pub fn raw(&self) -> &[u8; 32] {
        &self.raw
    }

    /// Whether `signature` is this key's Ed25519 signature over `message`.
    pub fn verifies(&self, message: &[u8], signature: &[u8]) -> bool {
        UnparsedPublicKey::new(&ED25519, &self.raw).verify(message, signature).is_ok()
    }

    pub fn to_pem(&self) -> String {
        // Why a fixed prefix: an Ed25519 SubjectPublicKeyInfo is always this 12-byte DER header
        // (SEQUENCE, AlgorithmIdentifier 1.3.101.112, BIT STRING of 32 bytes) + the raw key.
        let mut der = vec![0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00];
        der.extend_from_slice(&self.raw);
        pem_lf(&pem::Pem::new("PUBLIC KEY", der))
    }
}

/// PEM with `\n` line endings, as OpenSSL writes it (the pem crate defaults to `\r\n`).
fn pem_lf(block: &pem::Pem) -> String {
    pem::encode_config(block, pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF))
}

/// A key's id: the first 16 hex digits of the SHA-256 of its raw public key.
fn key_id(raw: &[u8]) -> String {
    sha256_hex(raw)[..16].to_owned()
}

/// Generates a signing pair: the private key as PKCS#8 v1 PEM (what OpenSSL writes and
/// reads), in a buffer zeroized on drop, and the public key as SubjectPublicKeyInfo PEM.
pub fn keygen() -> Result<(Zeroizing<String>, String, String), BundleError> {
    let fail = |why: String| BundleError::Key { path: PathBuf::from("<generated>"), what: "key pair", why };
    let pair = Ed25519KeyPair::generate().map_err(|e| fail(e.to_string()))?;
    let pkcs8 = pair.to_pkcs8v1().map_err(|e| fail(e.to_string()))?;
    let private = Zeroizing::new(pem_lf(&pem::Pem::new("PRIVATE KEY", pkcs8.as_ref().to_vec())));
    let raw: [u8; 32] = pair.public_key().as_ref().try_into().map_err(|_| fail("public key is not 32 bytes".into()))?;
    let public = PublicKey { raw, key_id: key_id(&raw) };
    Ok((private, public.to_pem(), public.key_id))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shipped() -> PolicyFiles {
        PolicyFiles::read_dir(&Path::new(env!("CARGO_MANIFEST_DIR")).join("policies")).unwrap()
    }

    fn keys(dir: &Path) -> (SigningKey, PublicKey) {
        let (private, public, _) = keygen().unwrap();
        std::fs::write(dir.join("k"), private.as_bytes()).unwrap();
        std::fs::write(dir.join("k.pub"), public).unwrap();
        (SigningKey::load(&dir.join("k")).unwrap(), PublicKey::load(&dir.join("k.pub")).unwrap())
    }

    #[test]
    fn builds_are_reproducible_and_the_version_names_the_content_only() {
        let files = shipped();
        let a = Bundle::build(&files, Some("git:abc".into())).unwrap();
        let b = Bundle::build(&files, Some("git:abc".into())).unwrap();
        assert_eq!(a, b);
        let other_label = Bundle::parse(&Bundle::build(&files, Some("git:def".into())).unwrap()).unwrap();
        assert_eq!(other_label.version(), Bundle::parse(&a).unwrap().version());
        assert_eq!(other_label.version(), files.version());
        let mut changed = files.files.clone();
        changed.insert("issuance/extra.cedar".into(), "// nothing".into());
        assert_ne!(PolicyFiles::from_map(changed).version(), files.version());
        assert!(files.get("tests/local.toml").is_some(), "tests travel with the bundle");
    }

    #[test]
    fn a_signed_bundle_verifies_and_any_change_breaks_it() {
        let dir = tempfile::tempdir().unwrap();
        let (key, public) = keys(dir.path());
        let unsigned = Bundle::build(&shipped(), None).unwrap();
        assert!(matches!(
            Bundle::parse(&unsigned).unwrap().verify(std::slice::from_ref(&public)),
            Err(BundleError::Unsigned)
        ));
        let signed = Bundle::parse(&unsigned).unwrap().sign(&key).unwrap();
        let bundle = Bundle::parse(&signed).unwrap();
        assert_eq!(bundle.verify(std::slice::from_ref(&public)).unwrap(), key.key_id());

        // Another key is not trusted.
        let (_, stranger) = keys(tempfile::tempdir().unwrap().path());
        assert!(matches!(bundle.verify(&[stranger]), Err(BundleError::UnknownKey { .. })));

        // A rule changed inside the archive no longer matches the signed manifest.
        let needle = b"@max_ttl(\"1h\")";
        let at = signed.windows(needle.len()).position(|w| w == needle).unwrap();
        let mut tampered = signed.clone();
        tampered[at + 10] = b'9';
        assert!(Bundle::parse(&tampered).is_err(), "a changed file must not parse (digest mismatch or tar checksum)");

        // A consistent manifest + files, re-signed by nobody: the old signature does not cover it.
        let mut files = bundle.files.files.clone();
        files.insert(
            "issuance/evil.cedar".into(),
            "@id(\"evil\") @max_ttl(\"12h\") permit(principal, action, resource);".into(),
        );
        let rebuilt = Bundle::parse(&Bundle::build(&PolicyFiles::from_map(files), None).unwrap()).unwrap();
        let forged = Bundle { signature: bundle.signature.clone(), ..rebuilt };
        assert!(matches!(forged.verify(&[public]), Err(BundleError::BadSignature)));
    }

    #[test]
    fn hostile_archives_are_refused() {
        let dot = archive(&[(MANIFEST.into(), b"{}"), ("files/../x".into(), b"x")]);
        // tar itself may refuse to write `..`; either way nothing parses.
        if let Ok(bytes) = dot {
            assert!(Bundle::parse(&bytes).is_err());
        }
        let extra = archive(&[
            (
                MANIFEST.into(),
                &serde_json::to_vec(&Manifest {
                    format: FORMAT.into(),
                    version: version_of(&BTreeMap::new()),
                    label: None,
                    files: BTreeMap::new(),
                })
                .unwrap(),
            ),
            ("files/inventory.toml".into(), b"x"),
        ])
        .unwrap();
        assert!(Bundle::parse(&extra).unwrap_err().to_string().contains("not in the manifest"));
        assert!(Bundle::parse(b"not a tar").is_err());
    }

    #[test]
    fn debug_shows_no_key_material() {
        let dir = tempfile::tempdir().unwrap();
        let (key, _) = keys(dir.path());
        let shown = format!("{key:?}");
        assert!(shown.contains("redacted") && shown.contains(key.key_id()));
    }
}
