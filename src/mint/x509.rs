//! X.509 SVIDs signed by the local CA (rcgen). The profile follows the X509-SVID standard:
//! exactly one URI SAN (the SPIFFE ID), CA=false, digitalSignature (critical),
//! serverAuth + clientAuth, a random 127-bit serial, not-after clamped to the CA's. Every
//! certificate is first signed by the CA's lint twin and checked against that profile
//! (`profile`), and only then signed for real; the signed TBS must equal the checked one.
//!
//! CA rotation: `rotate` makes a new CA the signer at once; the one it replaces stays in
//! the trust bundle until every SVID it signed has expired, so nothing verifying against
//! the bundle breaks mid-rotation.

use std::sync::Arc;
use std::time::SystemTime;

use arc_swap::ArcSwap;
use rcgen::{CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, KeyUsagePurpose, SanType};
use x509_parser::prelude::FromDer;

use super::profile::{self, Violation};
use super::{MintError, Minter, VerifiedCsr, X509Svid};
use crate::keys::{CertificateAuthority, random_serial};
use crate::policy::Grant;

impl VerifiedCsr {
    /// Parses a PKCS#10 CSR (PEM or DER) and verifies its self-signature.
    pub fn parse(bytes: &[u8]) -> Result<Self, MintError> {
        let der = if bytes.starts_with(b"-----BEGIN") {
            let p = pem::parse(bytes).map_err(|e| MintError::CsrEncoding(e.to_string()))?;
            if p.tag() != "CERTIFICATE REQUEST" && p.tag() != "NEW CERTIFICATE REQUEST" {
                return Err(MintError::CsrEncoding(format!("PEM label `{}` is not a certificate request", p.tag())));
            }
            p.into_contents()
        } else {
            bytes.to_vec()
        };
        let (rest, csr) = x509_parser::certification_request::X509CertificationRequest::from_der(&der)
            .map_err(|e| MintError::CsrEncoding(e.to_string()))?;
        if !rest.is_empty() {
            return Err(MintError::CsrEncoding("trailing bytes after the CSR".into()));
        }
        csr.verify_signature().map_err(|_| MintError::CsrSignature)?;
        let public_key = rcgen::SubjectPublicKeyInfo::from_der(csr.certification_request_info.subject_pki.raw)
            .map_err(|_| MintError::CsrKeyAlgorithm)?;
        Ok(Self { public_key })
    }
}

pub struct X509Minter {
    cas: ArcSwap<CaSet>,
    /// `issuance.min_ttl`: no certificate lives shorter (a CA about to expire issues none).
    min_lifetime: std::time::Duration,
}

/// The signing CA and the retired ones still trusted, each until its last SVID expires.
struct CaSet {
    active: Arc<CertificateAuthority>,
    retired: Vec<(Arc<CertificateAuthority>, SystemTime)>,
}

impl X509Minter {
    pub fn new(ca: Arc<CertificateAuthority>) -> Self {
        Self {
            cas: ArcSwap::from_pointee(CaSet { active: ca, retired: vec![] }),
            min_lifetime: std::time::Duration::from_secs(1),
        }
    }

    /// No certificate shorter than `min` (`issuance.min_ttl`); without it, one second.
    pub fn with_min_lifetime(mut self, min: std::time::Duration) -> Self {
        self.min_lifetime = min;
        self
    }

    /// DER of the CA that signs new SVIDs.
    pub fn active_ca_der(&self) -> Vec<u8> {
        self.cas.load().active.cert_der().to_vec()
    }

    /// Not-after of the CA that signs new SVIDs.
    pub fn active_ca_not_after(&self) -> SystemTime {
        self.cas.load().active.not_after()
    }

    /// Makes `next` the signer. The replaced CA stays in the bundle until `longest_ttl`
    /// from `now` (no SVID it signed lives longer), or its own expiry if sooner.
    pub fn rotate(&self, next: Arc<CertificateAuthority>, now: SystemTime, longest_ttl: std::time::Duration) {
        self.cas.rcu(|set| {
            let keep_until = (now + longest_ttl).min(set.active.not_after());
            let mut retired: Vec<_> = set.retired.iter().filter(|(_, until)| *until > now).cloned().collect();
            retired.insert(0, (set.active.clone(), keep_until));
            CaSet { active: next.clone(), retired }
        });
    }

    /// Drops retired CAs whose SVIDs have all expired. True when the bundle changed.
    pub fn prune(&self, now: SystemTime) -> bool {
        let before = self.cas.load().retired.len();
        self.cas.rcu(|set| CaSet {
            active: set.active.clone(),
            retired: set.retired.iter().filter(|(_, until)| *until > now).cloned().collect(),
        });
        self.cas.load().retired.len() != before
    }
}

impl Minter for X509Minter {
    /// One CRL per trusted CA (active first), each listing `entries` (hex serial, revoked
    /// at). A serial another CA issued is harmless on a CRL, and this way a relying party
    /// finds the revocation whichever CA signed the SVID.
    fn crls(&self, entries: &[(String, i64)], now: SystemTime, number: u64) -> Result<Vec<Vec<u8>>, MintError> {
        let set = self.cas.load();
        std::iter::once(&set.active)
            .chain(set.retired.iter().map(|(ca, _)| ca))
            .map(|ca| crate::keys::build_crl(ca, entries, now, number).map_err(MintError::Signing))
            .collect()
    }

    fn mint_x509(&self, csr: &VerifiedCsr, grant: Grant, now: SystemTime) -> Result<X509Svid, MintError> {
        let ca = self.cas.load().active.clone();
        let ca_not_after = ca.not_after();
        if ca_not_after <= now {
            return Err(MintError::CaExpired(time::OffsetDateTime::from(ca_not_after).to_string()));
        }
        // Whole seconds: X.509 times carry no fractions, and the ledger must show the same value.
        let now =
            SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(crate::clock::unix_secs(now).max(0).unsigned_abs());
        let not_after = (now + grant.ttl().as_duration()).min(ca_not_after);

        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "mayfly");
        params.distinguished_name = dn;
        let uri = grant
            .identity()
            .as_str()
            .to_owned()
            .try_into()
            .map_err(|e: rcgen::Error| MintError::Signing(e.to_string()))?;
        params.subject_alt_names = vec![SanType::URI(uri)];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        params.use_authority_key_identifier_extension = true;
        let serial = random_serial().map_err(|e| MintError::Signing(e.to_string()))?;
        params.serial_number = Some(serial.clone().into());
        params.not_before = now.into();
        params.not_after = not_after.into();

        let sign_err = |e: rcgen::Error| MintError::Signing(e.to_string());
        let violation = |v: Violation| match v {
            Violation::TooShort { .. } => {
                MintError::TooShort { identity: grant.identity().to_string(), why: v.to_string() }
            }
            Violation::Profile(why) => {
                tracing::error!(identity = %grant.identity(), why, "pre-certificate broke the X509-SVID profile; nothing signed");
                MintError::Profile { identity: grant.identity().to_string(), why }
            }
        };
        let spki = rcgen::PublicKeyData::subject_public_key_info(&csr.public_key);
        let expected = profile::Expected {
            leaf: profile::Leaf::Svid(grant.identity()),
            ca_cert: ca.cert_der(),
            spki: &spki,
            serial: &serial,
            not_before: crate::clock::unix_secs(now),
            not_after_max: crate::clock::unix_secs(now + grant.ttl().as_duration()),
            min_lifetime: self.min_lifetime.as_secs(),
        };
        // Why twice: the CA key signs only what the profile check has seen (Boulder's
        // pre-signing lint); the lint twin's signature is thrown away.
        let linted = params.signed_by(&csr.public_key, ca.lint_issuer()).map_err(sign_err)?;
        profile::check(linted.der(), &expected).map_err(violation)?;
        let cert = params.signed_by(&csr.public_key, ca.issuer()).map_err(sign_err)?;
        profile::same_tbs(linted.der(), cert.der()).map_err(violation)?;
        let cert_der = cert.der().to_vec();
        let fingerprint = hex::encode(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &cert_der));
        Ok(X509Svid { cert_der, serial: hex::encode(serial), fingerprint, not_before: now, not_after })
    }

    fn x509_bundle(&self) -> Vec<Vec<u8>> {
        let set = self.cas.load();
        std::iter::once(&set.active)
            .chain(set.retired.iter().map(|(ca, _)| ca))
            .map(|ca| ca.cert_der().to_vec())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use x509_parser::extensions::{GeneralName, ParsedExtension};

    use super::*;
    use crate::identity::{TrustDomain, Ttl, WorkloadId};

    fn csr_with_extras() -> (rcgen::KeyPair, Vec<u8>) {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = CertificateParams::new(vec!["evil.example.com".to_string()]).unwrap();
        params.is_ca = IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let csr = params.serialize_request(&key).unwrap();
        (key, csr.der().to_vec())
    }

    fn minter(now: SystemTime, ca_validity: Duration) -> X509Minter {
        let td = TrustDomain::parse("example.org").unwrap();
        X509Minter::new(Arc::new(CertificateAuthority::generate(&td, now, ca_validity).unwrap()))
    }

    #[test]
    fn certificate_follows_the_svid_profile_and_ignores_csr_names() {
        let now = SystemTime::now();
        let m = minter(now, Duration::from_secs(86_400));
        let (_key, csr) = csr_with_extras();
        let csr = VerifiedCsr::parse(&csr).unwrap();
        let id = WorkloadId::parse("spiffe://example.org/api").unwrap();
        let grant = Grant::for_tests(id, Ttl::parse("30m").unwrap());
        let svid = m.mint_x509(&csr, grant, now).unwrap();
        let (_, cert) = x509_parser::parse_x509_certificate(&svid.cert_der).unwrap();

        let sans: Vec<_> = cert.subject_alternative_name().unwrap().unwrap().value.general_names.clone();
        assert_eq!(sans, vec![GeneralName::URI("spiffe://example.org/api")]);
        let bc = cert.basic_constraints().unwrap().unwrap();
        assert!(!bc.value.ca);
        let ku = cert.key_usage().unwrap().unwrap();
        assert!(ku.critical && ku.value.digital_signature() && !ku.value.key_cert_sign());
        let eku = cert.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.server_auth && eku.client_auth);
        assert!(cert.raw_serial().len() * 8 >= 64);
        assert_eq!(hex::encode(cert.raw_serial()), svid.serial);
        let lifetime = cert.validity().not_after.timestamp() - cert.validity().not_before.timestamp();
        assert_eq!(lifetime, 1800);
        assert!(!cert.extensions().iter().any(|e| matches!(e.parsed_extension(), ParsedExtension::NameConstraints(_))));
        // Signed by the CA.
        let bundle = m.x509_bundle();
        let (_, ca) = x509_parser::parse_x509_certificate(&bundle[0]).unwrap();
        cert.verify_signature(Some(ca.public_key())).unwrap();
    }

    #[test]
    fn not_after_never_passes_the_ca() {
        let now = SystemTime::now();
        let m = minter(now, Duration::from_secs(600));
        let (_key, csr) = csr_with_extras();
        let grant =
            || Grant::for_tests(WorkloadId::parse("spiffe://example.org/api").unwrap(), Ttl::parse("1h").unwrap());
        let svid = m.mint_x509(&VerifiedCsr::parse(&csr).unwrap(), grant(), now).unwrap();
        assert!(svid.not_after <= m.cas.load().active.not_after());
        assert!(m.mint_x509(&VerifiedCsr::parse(&csr).unwrap(), grant(), now + Duration::from_secs(601)).is_err());
    }

    #[test]
    fn garbage_and_tampered_csrs_are_refused() {
        assert!(matches!(VerifiedCsr::parse(b"not a csr"), Err(MintError::CsrEncoding(_))));
        let (_key, mut csr) = csr_with_extras();
        // Flip a byte inside the signed part (the subject public key sits near the middle).
        let mid = csr.len() / 2;
        csr[mid] ^= 0x01;
        assert!(VerifiedCsr::parse(&csr).is_err());
        let (_key, good) = csr_with_extras();
        let pem = pem::encode(&pem::Pem::new("CERTIFICATE REQUEST", good));
        assert!(VerifiedCsr::parse(pem.as_bytes()).is_ok());
    }

    #[test]
    fn a_rotated_ca_signs_at_once_and_the_old_one_stays_trusted_until_its_svids_expire() {
        let now = SystemTime::now();
        let m = minter(now, Duration::from_secs(30 * 86_400));
        let old = m.active_ca_der();
        let td = TrustDomain::parse("example.org").unwrap();
        let next = Arc::new(CertificateAuthority::generate(&td, now, Duration::from_secs(60 * 86_400)).unwrap());
        m.rotate(next.clone(), now, Duration::from_secs(86_400));
        assert_eq!(m.x509_bundle(), vec![next.cert_der().to_vec(), old.clone()]);
        let (_key, csr) = csr_with_extras();
        let grant = Grant::for_tests(WorkloadId::parse("spiffe://example.org/api").unwrap(), Ttl::parse("1h").unwrap());
        let svid = m.mint_x509(&VerifiedCsr::parse(&csr).unwrap(), grant, now).unwrap();
        let (_, cert) = x509_parser::parse_x509_certificate(&svid.cert_der).unwrap();
        let (_, new_ca) = x509_parser::parse_x509_certificate(next.cert_der()).unwrap();
        cert.verify_signature(Some(new_ca.public_key())).unwrap();
        assert!(!m.prune(now + Duration::from_secs(86_399)), "kept while its SVIDs may live");
        assert!(m.prune(now + Duration::from_secs(86_400)));
        assert_eq!(m.x509_bundle(), vec![next.cert_der().to_vec()]);
    }
}
