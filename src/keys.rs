//! Signing keys and the certificate authority built on them. Key material is zeroized on
//! drop and its `Debug` prints no bytes. Loads or generates the CA; knows nothing of
//! policy, ledgers or sockets.

use std::fmt;
use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use aws_lc_rs::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair as _};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    PublicKeyData, SanType, SignatureAlgorithm, SigningKey,
};
use zeroize::{Zeroize, Zeroizing};

use crate::identity::TrustDomain;

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot read `{path}`: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("cannot write `{path}`: {source}")]
    Write { path: PathBuf, source: std::io::Error },
    #[error("`{path}` is not a usable {what}: {why}")]
    Parse { path: PathBuf, what: &'static str, why: String },
    #[error("the CA certificate `{path}` does not match its private key")]
    Mismatch { path: PathBuf },
    #[error("the CA certificate `{path}` expired at {not_after}; remove it (dev) or install a new one")]
    Expired { path: PathBuf, not_after: String },
    #[error("the CA private key `{path}` is readable by group or others (mode {mode:o}); chmod 600 it")]
    KeyPermissions { path: PathBuf, mode: u32 },
    #[error("generating the CA failed: {0}")]
    Generate(String),
    #[error(
        "the CA certificate `{path}` has no subjectKeyIdentifier; RFC 5280 4.2.1.2 requires one in every CA \
         certificate (mayfly checks each certificate before signing it with a twin that carries the same identifier)"
    )]
    NoKeyIdentifier { path: PathBuf },
}

/// A private signing key. Zeroized on drop; `Debug` shows only the algorithm.
pub struct CaKey(KeyPair);

impl CaKey {
    pub fn generate_p256() -> Result<Self, KeyError> {
        KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map(Self).map_err(|e| KeyError::Generate(e.to_string()))
    }

    /// PKCS#8 PEM of the private key, in a buffer zeroized on drop (and no other copy).
    pub fn to_pkcs8_pem(&self) -> Zeroizing<String> {
        private_key_pem(self.0.serialized_der())
    }
}

impl Drop for CaKey {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

impl fmt::Debug for CaKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CaKey({:?}, private bytes redacted)", self.0.algorithm())
    }
}

impl PublicKeyData for CaKey {
    fn der_bytes(&self) -> &[u8] {
        self.0.der_bytes()
    }

    fn algorithm(&self) -> &'static SignatureAlgorithm {
        self.0.algorithm()
    }
}

impl SigningKey for CaKey {
    fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, rcgen::Error> {
        self.0.sign(msg)
    }
}

/// The X.509 CA: its certificate, its key (inside the rcgen `Issuer`) and its lifetime.
pub struct CertificateAuthority {
    issuer: Issuer<'static, CaKey>,
    /// The CA's lint twin: the same name, key identifier and signature algorithm, with a
    /// key made here at load that signs nothing but pre-certificates, which are parsed,
    /// checked against mayfly's profile and thrown away before the real key signs
    /// (`mint::profile`). Nothing it signs is trusted by anyone.
    lint: Issuer<'static, KeyPair>,
    cert_der: Vec<u8>,
    cert_pem: String,
    not_after: SystemTime,
}

impl fmt::Debug for CertificateAuthority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertificateAuthority").field("not_after", &self.not_after).finish_non_exhaustive()
    }
}

pub const CA_CERT_FILE: &str = "ca.pem";
pub const CA_KEY_FILE: &str = "ca-key.pem";

impl CertificateAuthority {
    /// A new self-signed ECDSA P-256 root for `trust_domain`, valid from `now` for `validity`.
    pub fn generate(trust_domain: &TrustDomain, now: SystemTime, validity: Duration) -> Result<Self, KeyError> {
        let key = CaKey::generate_p256()?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "mayfly");
        dn.push(DnType::CommonName, format!("mayfly CA for {trust_domain}"));
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages =
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        let uri = format!("spiffe://{trust_domain}");
        params.subject_alt_names =
            vec![SanType::URI(uri.try_into().map_err(|e: rcgen::Error| KeyError::Generate(e.to_string()))?)];
        params.not_before = now.into();
        params.not_after = (now + validity).into();
        params.serial_number = Some(random_serial()?.into());
        let cert = params.self_signed(&key).map_err(|e| KeyError::Generate(e.to_string()))?;
        let cert_der = cert.der().to_vec();
        Self::from_parts(cert_der, key, Path::new("(generated)"))
    }

    /// Loads a CA from PEM files. The key file must not be readable by group or others.
    pub fn load(cert_path: &Path, key_path: &Path, now: SystemTime) -> Result<Self, KeyError> {
        let cert_pem =
            fs::read_to_string(cert_path).map_err(|source| KeyError::Read { path: cert_path.into(), source })?;
        let meta = fs::metadata(key_path).map_err(|source| KeyError::Read { path: key_path.into(), source })?;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(KeyError::KeyPermissions { path: key_path.into(), mode });
        }
        let key_pem = Zeroizing::new(
            fs::read_to_string(key_path).map_err(|source| KeyError::Read { path: key_path.into(), source })?,
        );
        let parse = |why: String| KeyError::Parse { path: key_path.into(), what: "private key", why };
        let der = private_key_der(&key_pem).map_err(parse)?;
        let key = KeyPair::try_from(der.as_slice()).map(CaKey).map_err(|e| parse(e.to_string()))?;
        let cert_der = pem::parse(&cert_pem)
            .map_err(|e| KeyError::Parse { path: cert_path.into(), what: "certificate", why: e.to_string() })?
            .into_contents();
        let ca = Self::from_parts(cert_der, key, cert_path)?;
        if ca.not_after <= now {
            return Err(KeyError::Expired {
                path: cert_path.into(),
                not_after: time::OffsetDateTime::from(ca.not_after).to_string(),
            });
        }
        Ok(ca)
    }

    /// The dev CA: reused from `dir` when present, otherwise generated (1 year) and persisted
    /// there with the key at mode 0600.
    pub fn load_or_generate(dir: &Path, trust_domain: &TrustDomain, now: SystemTime) -> Result<Self, KeyError> {
        let cert_path = dir.join(CA_CERT_FILE);
        let key_path = dir.join(CA_KEY_FILE);
        if cert_path.exists() || key_path.exists() {
            return Self::load(&cert_path, &key_path, now);
        }
        let ca = Self::generate(trust_domain, now, Duration::from_secs(365 * 86_400))?;
        write_private(&key_path, ca.issuer.key().to_pkcs8_pem().as_bytes())?;
        fs::write(&cert_path, ca.cert_pem.as_bytes()).map_err(|source| KeyError::Write { path: cert_path, source })?;
        Ok(ca)
    }

    fn from_parts(cert_der: Vec<u8>, key: CaKey, path: &Path) -> Result<Self, KeyError> {
        let parse_err = |why: String| KeyError::Parse { path: path.into(), what: "CA certificate", why };
        let (_, x509) = x509_parser::parse_x509_certificate(&cert_der).map_err(|e| parse_err(e.to_string()))?;
        if x509.public_key().subject_public_key.data.as_ref() != key.der_bytes() {
            return Err(KeyError::Mismatch { path: path.into() });
        }
        let has_key_id = x509
            .iter_extensions()
            .any(|e| matches!(e.parsed_extension(), x509_parser::extensions::ParsedExtension::SubjectKeyIdentifier(_)));
        if !has_key_id {
            return Err(KeyError::NoKeyIdentifier { path: path.into() });
        }
        let twin_key = KeyPair::generate_for(key.algorithm()).map_err(|e| KeyError::Generate(e.to_string()))?;
        // Why the certificate's own SKI makes the twin's AKI equal the real one: rcgen takes
        // a CA certificate's subjectKeyIdentifier as its key identifier when it has one.
        let lint =
            Issuer::from_ca_cert_der(&cert_der.as_slice().into(), twin_key).map_err(|e| parse_err(e.to_string()))?;
        let not_after = SystemTime::UNIX_EPOCH
            + Duration::from_secs(u64::try_from(x509.validity().not_after.timestamp()).unwrap_or(0));
        let issuer =
            Issuer::from_ca_cert_der(&cert_der.as_slice().into(), key).map_err(|e| parse_err(e.to_string()))?;
        let cert_pem = pem::encode(&pem::Pem::new("CERTIFICATE", cert_der.clone()));
        Ok(Self { issuer, lint, cert_der, cert_pem, not_after })
    }

    /// A TLS server certificate for `names` (DNS names or IP addresses) signed by this CA,
    /// with a fresh P-256 key: `mayfly dev`'s listener certificate. Checked against mayfly's
    /// TLS server profile (`mint::profile`) on a pre-certificate before the CA signs it.
    pub fn issue_tls_server(
        &self,
        names: &[String],
        now: SystemTime,
        validity: Duration,
    ) -> Result<(Vec<u8>, SecretDer), KeyError> {
        use crate::mint::profile;
        let mut key =
            KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(|e| KeyError::Generate(e.to_string()))?;
        let mut params = CertificateParams::new(names.to_vec()).map_err(|e| KeyError::Generate(e.to_string()))?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "mayfly");
        params.distinguished_name = dn;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        let serial = random_serial()?;
        params.serial_number = Some(serial.clone().into());
        // Whole seconds: X.509 times carry no fractions.
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(crate::clock::unix_secs(now).max(0).unsigned_abs());
        let not_after = (now + validity).min(self.not_after);
        params.not_before = now.into();
        params.not_after = not_after.into();
        let (ips, dns): (Vec<_>, Vec<_>) = names.iter().partition(|n| n.parse::<std::net::IpAddr>().is_ok());
        let ips: Vec<std::net::IpAddr> = ips.iter().filter_map(|n| n.parse().ok()).collect();
        let dns: Vec<String> = dns.into_iter().cloned().collect();
        let spki = key.subject_public_key_info();
        let expected = profile::Expected {
            leaf: profile::Leaf::TlsServer { dns: &dns, ips: &ips },
            ca_cert: &self.cert_der,
            spki: &spki,
            serial: &serial,
            not_before: crate::clock::unix_secs(now),
            not_after_max: crate::clock::unix_secs(now + validity),
            min_lifetime: 1,
        };
        let refused = |v: profile::Violation| KeyError::Generate(format!("the listener certificate: {v}"));
        let linted = params.signed_by(&key, &self.lint).map_err(|e| KeyError::Generate(e.to_string()))?;
        profile::check(linted.der(), &expected).map_err(refused)?;
        let cert = params.signed_by(&key, &self.issuer).map_err(|e| KeyError::Generate(e.to_string()))?;
        profile::same_tbs(linted.der(), cert.der()).map_err(refused)?;
        let secret = SecretDer::new(Zeroizing::new(key.serialize_der()));
        key.zeroize();
        Ok((cert.der().to_vec(), secret))
    }

    pub fn issuer(&self) -> &Issuer<'static, CaKey> {
        &self.issuer
    }

    /// The lint twin that signs pre-certificates (see the field).
    pub fn lint_issuer(&self) -> &Issuer<'static, KeyPair> {
        &self.lint
    }

    pub fn cert_der(&self) -> &[u8] {
        &self.cert_der
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }
}

/// Private key bytes that leave the daemon once (the Workload API hands a workload the key
/// of its X.509 SVID). Zeroized on drop; `Debug` shows only the length.
pub struct SecretDer(Zeroizing<Vec<u8>>);

impl SecretDer {
    pub fn new(bytes: Zeroizing<Vec<u8>>) -> Self {
        Self(bytes)
    }

    pub fn expose(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Debug for SecretDer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretDer({} bytes)", self.0.len())
    }
}

/// A bearer token (a JWT-SVID): whoever holds it is the identity until it expires. Zeroized
/// on drop; `Debug` shows only the length. The ledger keeps its jti and SHA-256, never it.
pub struct SecretString(Zeroizing<String>);

impl SecretString {
    pub fn new(s: String) -> Self {
        Self(Zeroizing::new(s))
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for SecretString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretString({} bytes)", self.0.len())
    }
}

pub const JWT_KEY_FILE: &str = "jwt-key.pem";
/// The dev / default WIT-SVID signing key, beside the JWT key and never the same key.
pub const WIT_KEY_FILE: &str = "wit-key.pem";

/// An ES256 (P-256) signing key: the one that signs JWT-SVIDs, and (another one) the one
/// that signs WIT-SVIDs. The PKCS#8 bytes are zeroized on drop; `Debug` shows only the key
/// id. The key id is the RFC 7638 JWK thumbprint, so it names the public key and changes
/// whenever the key does (two different keys never share a kid).
pub struct JwtKey {
    pkcs8: Zeroizing<Vec<u8>>,
    /// Uncompressed SEC1 point: 0x04 || x (32 bytes) || y (32 bytes).
    public_point: Vec<u8>,
    kid: String,
}

impl fmt::Debug for JwtKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "JwtKey(ES256, kid {}, private bytes redacted)", self.kid)
    }
}

impl JwtKey {
    pub fn generate() -> Result<Self, KeyError> {
        let rng = aws_lc_rs::rand::SystemRandom::new();
        let doc = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
            .map_err(|_| KeyError::Generate("the system RNG failed".into()))?;
        Self::from_pkcs8(Zeroizing::new(doc.as_ref().to_vec())).map_err(KeyError::Generate)
    }

    fn from_pkcs8(pkcs8: Zeroizing<Vec<u8>>) -> Result<Self, String> {
        let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &pkcs8)
            .map_err(|e| format!("not a P-256 PKCS#8 private key: {e}"))?;
        let public_point = pair.public_key().as_ref().to_vec();
        if public_point.len() != 65 || public_point[0] != 0x04 {
            return Err("unexpected public key encoding".into());
        }
        let kid = ec_thumbprint(&b64url(&public_point[1..33]), &b64url(&public_point[33..65]));
        Ok(Self { pkcs8, public_point, kid })
    }

    /// Loads a PKCS#8 PEM P-256 key. The file must not be readable by group or others.
    pub fn load(path: &Path) -> Result<Self, KeyError> {
        let meta = fs::metadata(path).map_err(|source| KeyError::Read { path: path.into(), source })?;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(KeyError::KeyPermissions { path: path.into(), mode });
        }
        let text =
            Zeroizing::new(fs::read_to_string(path).map_err(|source| KeyError::Read { path: path.into(), source })?);
        let parse = |why: String| KeyError::Parse { path: path.into(), what: "JWT signing key", why };
        if !text.trim_start().starts_with(PEM_BEGIN) {
            return Err(parse("not a `-----BEGIN PRIVATE KEY-----` (PKCS#8) PEM file".into()));
        }
        Self::from_pkcs8(private_key_der(&text).map_err(parse)?).map_err(parse)
    }

    /// The dev / default key: reused from `dir` when present, otherwise generated and
    /// persisted there at mode 0600.
    pub fn load_or_generate(dir: &Path) -> Result<Self, KeyError> {
        Self::load_or_generate_file(&dir.join(JWT_KEY_FILE))
    }

    /// `load_or_generate` at another file name (the WIT signing key's).
    pub fn load_or_generate_file(path: &Path) -> Result<Self, KeyError> {
        let path = path.to_path_buf();
        if path.exists() {
            return Self::load(&path);
        }
        let key = Self::generate()?;
        write_private(&path, private_key_pem(&key.pkcs8).as_bytes())?;
        Ok(key)
    }

    pub fn pkcs8_der(&self) -> &[u8] {
        &self.pkcs8
    }

    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// The public key's x and y coordinates, base64url without padding (JWK form).
    pub fn public_xy(&self) -> (String, String) {
        (b64url(&self.public_point[1..33]), b64url(&self.public_point[33..65]))
    }

    /// The uncompressed SEC1 public point (0x04 || x || y).
    pub fn public_point(&self) -> &[u8] {
        &self.public_point
    }
}

/// The RFC 7638 thumbprint of a P-256 public key given as JWK `x` and `y` (base64url).
pub fn ec_thumbprint(x: &str, y: &str) -> String {
    // RFC 7638: the required members in lexicographic order, no whitespace.
    let canonical = format!(r#"{{"crv":"P-256","kty":"EC","x":"{x}","y":"{y}"}}"#);
    b64url(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, canonical.as_bytes()).as_ref())
}

/// The key pair of one WIT-SVID, made by mayfly for the workload after policy allowed it:
/// the public half goes into the token's `cnf.jwk`, the private half leaves once, as a JWK
/// (RFC 7517) in a buffer zeroized on drop. `Debug` shows only the thumbprint.
pub struct WorkloadKey {
    /// The public JWK members: `x`, `y` (base64url of the P-256 coordinates).
    pub x: String,
    pub y: String,
    /// RFC 7638 thumbprint of the public key (`jkt`): what the ledger may name it by.
    pub thumbprint: String,
    /// `{"kty","crv","x","y","d","alg"}`: the private JWK the Workload API hands out.
    private_jwk: SecretString,
}

impl fmt::Debug for WorkloadKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "WorkloadKey(ES256, jkt {}, private bytes redacted)", self.thumbprint)
    }
}

impl WorkloadKey {
    /// A fresh P-256 key pair. The scalar exists only in zeroizing buffers and the JWK.
    pub fn generate() -> Result<Self, KeyError> {
        use aws_lc_rs::encoding::AsBigEndian;
        let rng_failed = |_| KeyError::Generate("the system RNG failed".into());
        let pair = EcdsaKeyPair::generate(&ECDSA_P256_SHA256_FIXED_SIGNING).map_err(rng_failed)?;
        let point = pair.public_key().as_ref();
        if point.len() != 65 || point[0] != 0x04 {
            return Err(KeyError::Generate("unexpected public key encoding".into()));
        }
        let (x, y) = (b64url(&point[1..33]), b64url(&point[33..65]));
        // Why zeroizing: `d` is the workload's private key; the buffer aws-lc-rs returns is
        // zeroized on drop, and so is every copy made here.
        let scalar = pair.private_key().as_be_bytes().map_err(rng_failed)?;
        let d = Zeroizing::new(b64url(scalar.as_ref()));
        // Why the capacity: the JWK is ~200 bytes; a buffer that grew would leave a copy of
        // the scalar behind in freed memory, unzeroized.
        let mut jwk = Zeroizing::new(String::with_capacity(512));
        jwk.push_str(&format!(r#"{{"kty":"EC","crv":"P-256","alg":"ES256","x":"{x}","y":"{y}","d":""#));
        jwk.push_str(&d);
        jwk.push_str("\"}");
        let thumbprint = ec_thumbprint(&x, &y);
        Ok(Self { x, y, thumbprint, private_jwk: SecretString(jwk) })
    }

    /// The private JWK (with `d`), for the one message that hands it to the workload.
    pub fn private_jwk(&self) -> &SecretString {
        &self.private_jwk
    }
}

/// A workload's P-256 key read back from its private JWK (`mayfly wpt sign`, tests): signs
/// proofs. The key pair is aws-lc-rs's (freed and cleansed by it); the JWK text is never
/// kept.
pub struct ProofSigner {
    pair: EcdsaKeyPair,
    /// The public JWK's `x` and `y`.
    pub x: String,
    pub y: String,
}

impl fmt::Debug for ProofSigner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ProofSigner(ES256, jkt {}, private bytes redacted)", ec_thumbprint(&self.x, &self.y))
    }
}

impl ProofSigner {
    /// Parses an EC P-256 private JWK (`kty` EC, `crv` P-256, `x`, `y`, `d`; `alg`, when
    /// present, ES256). The public members must match the private scalar.
    pub fn from_private_jwk(text: &str) -> Result<Self, String> {
        use base64::Engine;
        #[derive(serde::Deserialize)]
        struct Jwk {
            kty: String,
            crv: String,
            x: String,
            y: String,
            d: Option<String>,
            alg: Option<String>,
        }
        if text.len() > 4096 {
            return Err("longer than 4096 bytes: not a P-256 JWK".into());
        }
        let jwk: Jwk = serde_json::from_str(text).map_err(|e| format!("not a JWK: {e}"))?;
        if jwk.kty != "EC" || jwk.crv != "P-256" {
            return Err(format!("`kty` `{}` / `crv` `{}`: only EC P-256 keys sign ES256 proofs", jwk.kty, jwk.crv));
        }
        if jwk.alg.as_deref().is_some_and(|a| a != "ES256") {
            return Err("`alg` must be ES256".into());
        }
        let d = jwk.d.map(Zeroizing::new).ok_or("no `d`: this is a public key, a private JWK is needed")?;
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let scalar = Zeroizing::new(b64.decode(d.as_bytes()).map_err(|_| "`d` is not base64url".to_owned())?);
        let mut point = vec![0x04];
        for (name, value) in [("x", &jwk.x), ("y", &jwk.y)] {
            let bytes = b64.decode(value).map_err(|_| format!("`{name}` is not base64url"))?;
            if bytes.len() != 32 {
                return Err(format!("`{name}` is not a 32-byte P-256 coordinate"));
            }
            point.extend_from_slice(&bytes);
        }
        let pair = EcdsaKeyPair::from_private_key_and_public_key(&ECDSA_P256_SHA256_FIXED_SIGNING, &scalar, &point)
            .map_err(|e| format!("the private and public members do not form a P-256 key: {e}"))?;
        Ok(Self { pair, x: jwk.x, y: jwk.y })
    }

    /// The fixed-width (r || s) ES256 signature of `message`, as JWS wants it.
    pub fn sign(&self, message: &[u8]) -> Result<Vec<u8>, String> {
        let rng = aws_lc_rs::rand::SystemRandom::new();
        self.pair.sign(&rng, message).map(|s| s.as_ref().to_vec()).map_err(|_| "signing failed".to_owned())
    }
}

const PEM_BEGIN: &str = "-----BEGIN PRIVATE KEY-----";
const PEM_END: &str = "-----END PRIVATE KEY-----";

/// A PKCS#8 private key as PEM, written straight into one buffer of its exact size that
/// is zeroized on drop: no intermediate copy (the `pem` crate keeps the DER in a plain
/// `Vec` and grows its output, leaving pieces of the key in freed memory).
pub fn private_key_pem(der: &[u8]) -> Zeroizing<String> {
    use base64::Engine;
    let b64_len = der.len().div_ceil(3) * 4;
    let lines = b64_len.div_ceil(64);
    let total = PEM_BEGIN.len() + 1 + b64_len + lines + PEM_END.len() + 1;
    let mut b64 = Zeroizing::new(vec![0u8; b64_len]);
    let written = base64::engine::general_purpose::STANDARD.encode_slice(der, &mut b64).unwrap_or(0);
    let mut out = Zeroizing::new(String::with_capacity(total));
    out.push_str(PEM_BEGIN);
    out.push('\n');
    for line in b64[..written].chunks(64) {
        // Why this cannot fail: base64's alphabet is ASCII.
        out.push_str(std::str::from_utf8(line).unwrap_or_default());
        out.push('\n');
    }
    out.push_str(PEM_END);
    out.push('\n');
    out
}

/// The DER inside a `-----BEGIN … PRIVATE KEY-----` PEM block (PKCS#8, SEC1 or PKCS#1),
/// decoded into buffers of exact size that are zeroized on drop.
pub fn private_key_der(pem_text: &str) -> Result<Zeroizing<Vec<u8>>, String> {
    use base64::Engine;
    let begin = pem_text.find("-----BEGIN ").ok_or("no `-----BEGIN` line")?;
    let after_begin = &pem_text[begin..];
    let label_end = after_begin.find('\n').ok_or("no line after `-----BEGIN`")?;
    let label = after_begin[..label_end].trim_end();
    if !label.ends_with("PRIVATE KEY-----") {
        return Err(format!("`{label}` is not a private key"));
    }
    let body = &after_begin[label_end..];
    let end = body.find("-----END ").ok_or("no `-----END` line")?;
    let body = &body[..end];
    let mut b64 = Zeroizing::new(Vec::with_capacity(body.len()));
    b64.extend(body.bytes().filter(|b| !b.is_ascii_whitespace()));
    let mut der = Zeroizing::new(vec![0u8; base64::decoded_len_estimate(b64.len())]);
    let n = base64::engine::general_purpose::STANDARD
        .decode_slice(&b64[..], &mut der[..])
        .map_err(|e| format!("the key is not base64: {e}"))?;
    der.truncate(n);
    Ok(der)
}

fn b64url(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// A positive serial of 127 random bits (RFC 5280 allows up to 20 octets; CAB forum asks
/// for at least 64 bits of entropy). The top byte is fixed to 01xxxxxx so the encoding is
/// always 16 octets and never negative. Fails closed: no randomness, no serial.
pub fn random_serial() -> Result<Vec<u8>, KeyError> {
    let mut serial = vec![0u8; 16];
    aws_lc_rs::rand::fill(&mut serial).map_err(|_| KeyError::Generate("the system RNG failed".into()))?;
    serial[0] = (serial[0] & 0x3f) | 0x40;
    Ok(serial)
}

/// Writes a secret file created with mode 0600 (never briefly world-readable).
pub fn write_private(path: &Path, bytes: &[u8]) -> Result<(), KeyError> {
    let write = || -> std::io::Result<()> {
        let mut f = fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path)?;
        f.write_all(bytes)?;
        f.sync_all()
    };
    write().map_err(|source| KeyError::Write { path: path.into(), source })
}

/// How long a CRL is valid; it is re-signed on every change and well before this passes.
pub const CRL_VALIDITY: Duration = Duration::from_secs(24 * 3600);

/// A DER CRL signed by `ca` listing `entries` (hex serial, revocation time).
pub fn build_crl(
    ca: &CertificateAuthority,
    entries: &[(String, i64)],
    now: SystemTime,
    number: u64,
) -> Result<Vec<u8>, String> {
    let at = |secs: i64| time::OffsetDateTime::from_unix_timestamp(secs).map_err(|e| e.to_string());
    let revoked_certs = entries
        .iter()
        .map(|(serial, when)| {
            let bytes = hex::decode(serial).map_err(|e| format!("serial `{serial}`: {e}"))?;
            Ok(rcgen::RevokedCertParams {
                serial_number: rcgen::SerialNumber::from_slice(&bytes),
                revocation_time: at(*when)?,
                reason_code: Some(rcgen::RevocationReason::Superseded),
                invalidity_date: None,
            })
        })
        .collect::<Result<Vec<_>, String>>()?;
    let now_secs = crate::clock::unix_secs(now);
    let params = rcgen::CertificateRevocationListParams {
        this_update: at(now_secs)?,
        next_update: at(now_secs + i64::try_from(CRL_VALIDITY.as_secs()).unwrap_or(86_400))?,
        crl_number: rcgen::SerialNumber::from_slice(&number.to_be_bytes()),
        issuing_distribution_point: None,
        revoked_certs,
        key_identifier_method: rcgen::KeyIdMethod::Sha256,
    };
    params.signed_by(ca.issuer()).map(|crl| crl.der().to_vec()).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_of_keys_shows_no_key_bytes() {
        let key = CaKey::generate_p256().unwrap();
        let pem = key.to_pkcs8_pem();
        let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
        let shown = format!("{key:?}");
        assert!(shown.contains("redacted"), "{shown}");
        assert!(!shown.contains(&body[..16]));
    }

    #[test]
    fn dev_ca_is_persisted_and_reused_with_a_private_key_file() {
        let dir = tempfile::tempdir().unwrap();
        let td = TrustDomain::parse("example.org").unwrap();
        let now = SystemTime::now();
        let first = CertificateAuthority::load_or_generate(dir.path(), &td, now).unwrap();
        let mode = fs::metadata(dir.path().join(CA_KEY_FILE)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let again = CertificateAuthority::load_or_generate(dir.path(), &td, now).unwrap();
        assert_eq!(first.cert_der(), again.cert_der());
        // A group-readable key is refused.
        fs::set_permissions(dir.path().join(CA_KEY_FILE), fs::Permissions::from_mode(0o640)).unwrap();
        assert!(matches!(
            CertificateAuthority::load_or_generate(dir.path(), &td, now),
            Err(KeyError::KeyPermissions { .. })
        ));
    }

    #[test]
    fn jwt_key_is_persisted_private_reused_and_named_by_its_thumbprint() {
        let dir = tempfile::tempdir().unwrap();
        let first = JwtKey::load_or_generate(dir.path()).unwrap();
        let mode = fs::metadata(dir.path().join(JWT_KEY_FILE)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let again = JwtKey::load_or_generate(dir.path()).unwrap();
        assert_eq!(first.kid(), again.kid());
        assert_eq!(first.public_xy(), again.public_xy());
        assert_ne!(first.kid(), JwtKey::generate().unwrap().kid());
        assert_eq!(first.kid().len(), 43, "base64url SHA-256 without padding");
        let shown = format!("{first:?}");
        assert!(shown.contains("redacted") && !shown.contains(&hex::encode(&first.pkcs8_der()[..8])));
        fs::set_permissions(dir.path().join(JWT_KEY_FILE), fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(JwtKey::load_or_generate(dir.path()), Err(KeyError::KeyPermissions { .. })));
    }

    #[test]
    fn private_key_pem_round_trips_and_reads_like_openssl_writes() {
        let key = CaKey::generate_p256().unwrap();
        let pem = key.to_pkcs8_pem();
        assert!(pem.starts_with(PEM_BEGIN) && pem.ends_with("-----END PRIVATE KEY-----\n"), "{}", pem.as_str());
        assert_eq!(pem.capacity(), pem.len(), "written into a buffer of exactly its size");
        assert!(pem.lines().all(|l| l.len() <= 64));
        assert_eq!(private_key_der(&pem).unwrap().as_slice(), key.0.serialized_der());
        // The pem crate (as openssl formats it) reads the same DER.
        assert_eq!(pem::parse(pem.as_bytes()).unwrap().contents(), key.0.serialized_der());
        assert!(private_key_der("-----BEGIN CERTIFICATE-----\nAA==\n-----END CERTIFICATE-----\n").is_err());
        assert!(private_key_der("-----BEGIN PRIVATE KEY-----\n!!!!\n-----END PRIVATE KEY-----\n").is_err());
    }

    #[test]
    fn secrets_debug_as_lengths() {
        assert_eq!(format!("{:?}", SecretString::new("eyJhbGciOi.x.y".into())), "SecretString(14 bytes)");
        assert_eq!(format!("{:?}", SecretDer::new(Zeroizing::new(vec![1, 2, 3]))), "SecretDer(3 bytes)");
    }

    #[test]
    fn serials_are_random_positive_and_16_octets() {
        let a = random_serial().unwrap();
        let b = random_serial().unwrap();
        assert_eq!(a.len(), 16);
        assert_ne!(a, b);
        assert_eq!(a[0] & 0xc0, 0x40);
    }

    #[test]
    fn the_crl_lists_the_serials_and_is_signed_by_the_ca() {
        let now = SystemTime::now();
        let ca = CertificateAuthority::generate(
            &TrustDomain::parse("td").unwrap(),
            now - Duration::from_secs(60),
            Duration::from_secs(86_400),
        )
        .unwrap();
        let der = build_crl(
            &ca,
            &[("4000aa".into(), crate::clock::unix_secs(now)), ("7f01".into(), crate::clock::unix_secs(now))],
            now,
            7,
        )
        .unwrap();
        let (_, crl) = x509_parser::parse_x509_crl(&der).unwrap();
        let serials: Vec<String> = crl.iter_revoked_certificates().map(|r| hex::encode(r.raw_serial())).collect();
        assert_eq!(serials, vec!["4000aa", "7f01"]);
        let (_, ca_cert) = x509_parser::parse_x509_certificate(ca.cert_der()).unwrap();
        crl.verify_signature(ca_cert.public_key()).unwrap();
    }
}
