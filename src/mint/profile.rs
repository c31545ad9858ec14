//! mayfly's certificate profiles, checked on every certificate before the CA signs it.
//!
//! As Let's Encrypt's Boulder lints a pre-certificate signed with a throwaway key: the
//! minter first signs the certificate with the CA's lint twin (`CertificateAuthority::
//! lint_issuer`: the CA's name, key identifier and signature algorithm, a key that signs
//! nothing else), [`check`] parses that pre-certificate and holds it against the profile,
//! and only then does the CA key sign — after which [`same_tbs`] proves the signed
//! to-be-signed bytes are the ones checked. A violation is a bug in mayfly or a dependency
//! (rcgen choosing another encoding, a parameter set wrongly): nothing is signed and the
//! caller is told what broke. Pure: parsing and comparing only; no keys, no I/O.
//!
//! The X509-SVID profile (SPIFFE X509-SVID §4 and §5, RFC 5280): v3; a positive serial of at
//! most 20 octets, the one chosen; issued by the CA's subject; the requester's public key
//! and nothing else of the request; no subject name a TLS client could take for the peer
//! (commonName, emailAddress); exactly one SAN, the granted SPIFFE ID, in the CA's trust
//! domain; basicConstraints critical with cA false; keyUsage critical, digitalSignature
//! only; extKeyUsage serverAuth and clientAuth only; the CA's key identifier as AKI; no
//! other extension; not-before the issuance time, not-after within the grant and the CA's
//! life, and at least `issuance.min_ttl` between them.

use std::net::IpAddr;

use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::oid_registry::{
    OID_X509_EXT_AUTHORITY_KEY_IDENTIFIER, OID_X509_EXT_BASIC_CONSTRAINTS, OID_X509_EXT_EXTENDED_KEY_USAGE,
    OID_X509_EXT_KEY_USAGE, OID_X509_EXT_SUBJECT_ALT_NAME, OID_X509_EXT_SUBJECT_KEY_IDENTIFIER,
};
use x509_parser::x509::X509Version;

use crate::identity::WorkloadId;

/// Why a pre-certificate was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Violation {
    /// The profile was broken: a bug, nothing was signed.
    #[error("{0}")]
    Profile(String),
    /// The certificate would live shorter than `issuance.min_ttl` (the CA expires first).
    #[error(
        "the certificate would live {lifetime}s, under issuance.min_ttl {min}s: the CA expires at {ca_not_after} (rotate it)"
    )]
    TooShort { lifetime: i64, min: u64, ca_not_after: String },
}

/// What kind of leaf a certificate is, and the names it must carry (and only those).
#[derive(Clone, Copy, Debug)]
pub enum Leaf<'a> {
    /// An X509-SVID: one URI SAN, the granted SPIFFE ID; serverAuth + clientAuth.
    Svid(&'a WorkloadId),
    /// `mayfly dev`'s TLS listener certificate: these DNS names and IP addresses; serverAuth.
    TlsServer { dns: &'a [String], ips: &'a [IpAddr] },
}

/// What the certificate must say, decided before it was built.
#[derive(Clone, Copy, Debug)]
pub struct Expected<'a> {
    pub leaf: Leaf<'a>,
    /// The issuing CA's certificate (DER).
    pub ca_cert: &'a [u8],
    /// The subject public key info (DER) the certificate is for.
    pub spki: &'a [u8],
    /// The serial chosen, big-endian.
    pub serial: &'a [u8],
    /// Unix seconds.
    pub not_before: i64,
    /// The latest not-after the grant allows, Unix seconds.
    pub not_after_max: i64,
    /// `issuance.min_ttl`, seconds.
    pub min_lifetime: u64,
}

/// Checks a pre-certificate (DER) against mayfly's profile for `want.leaf`.
pub fn check(der: &[u8], want: &Expected<'_>) -> Result<(), Violation> {
    let bad = |what: String| Violation::Profile(what);
    let cert = parse(der).map_err(bad)?;
    let ca = parse(want.ca_cert).map_err(|e| bad(format!("the CA certificate: {e}")))?;
    let tbs = &cert.tbs_certificate;

    if tbs.version() != X509Version::V3 {
        return Err(bad(format!("version {} is not v3", tbs.version().0 + 1)));
    }
    check_serial(tbs.raw_serial(), want.serial).map_err(bad)?;
    if tbs.signature != cert.signature_algorithm {
        return Err(bad("the TBS signature algorithm differs from the outer one".into()));
    }
    if tbs.issuer().as_raw() != ca.subject().as_raw() {
        return Err(bad(format!("issuer `{}` is not the CA's subject `{}`", tbs.issuer(), ca.subject())));
    }
    if tbs.public_key().raw != want.spki {
        return Err(bad("the subject public key is not the requester's".into()));
    }
    if tbs.subject().iter_common_name().next().is_some() || tbs.subject().iter_email().next().is_some() {
        return Err(bad(format!("subject `{}` carries a commonName or emailAddress", tbs.subject())));
    }
    if tbs.issuer_uid.is_some() || tbs.subject_uid.is_some() {
        return Err(bad("unique identifiers are not allowed (RFC 5280 4.1.2.8)".into()));
    }

    let not_before = tbs.validity().not_before.timestamp();
    let not_after = tbs.validity().not_after.timestamp();
    let ca_not_after = ca.validity().not_after.timestamp();
    if not_before != want.not_before {
        return Err(bad(format!("not-before {not_before} is not the issuance time {}", want.not_before)));
    }
    if not_after > want.not_after_max {
        return Err(bad(format!("not-after {not_after} is past the grant's end {}", want.not_after_max)));
    }
    if not_after > ca_not_after {
        return Err(bad(format!("not-after {not_after} is past the CA's not-after {ca_not_after}")));
    }
    let lifetime = not_after - not_before;
    if lifetime < i64::try_from(want.min_lifetime).unwrap_or(i64::MAX) {
        return Err(Violation::TooShort {
            lifetime,
            min: want.min_lifetime,
            ca_not_after: ca.validity().not_after.to_string(),
        });
    }

    check_extensions(&cert, &ca, &want.leaf).map_err(bad)
}

/// The to-be-signed bytes of the signed certificate are exactly the ones checked.
pub fn same_tbs(checked: &[u8], signed: &[u8]) -> Result<(), Violation> {
    match (tbs_of(checked), tbs_of(signed)) {
        (Some(a), Some(b)) if a == b => Ok(()),
        _ => Err(Violation::Profile("the signed certificate differs from the checked pre-certificate".into())),
    }
}

/// The DER of the TBSCertificate: the first element of the outer SEQUENCE (no parse).
fn tbs_of(der: &[u8]) -> Option<&[u8]> {
    let (outer, _) = sequence_header(der)?;
    let inner = der.get(outer..)?;
    let (header, len) = sequence_header(inner)?;
    inner.get(..header.checked_add(len)?)
}

/// A DER SEQUENCE's header length and content length (definite lengths of up to 4 octets).
fn sequence_header(der: &[u8]) -> Option<(usize, usize)> {
    if *der.first()? != 0x30 {
        return None;
    }
    let first = *der.get(1)?;
    if first < 0x80 {
        return Some((2, usize::from(first)));
    }
    let octets = usize::from(first & 0x7f);
    if octets == 0 || octets > 4 {
        return None;
    }
    let len = der.get(2..2 + octets)?.iter().fold(0usize, |acc, b| (acc << 8) | usize::from(*b));
    Some((2 + octets, len))
}

fn parse(der: &[u8]) -> Result<X509Certificate<'_>, String> {
    match x509_parser::parse_x509_certificate(der) {
        Ok(([], cert)) => Ok(cert),
        Ok(_) => Err("trailing bytes after the certificate".into()),
        Err(e) => Err(format!("does not parse: {e}")),
    }
}

/// RFC 5280 4.1.2.2: a positive integer of at most 20 octets, minimally encoded.
fn check_serial(raw: &[u8], chosen: &[u8]) -> Result<(), String> {
    let Some(first) = raw.first() else { return Err("empty serial".into()) };
    if raw.len() > 20 {
        return Err(format!("serial of {} octets (at most 20)", raw.len()));
    }
    if first & 0x80 != 0 {
        return Err("negative serial".into());
    }
    if raw.iter().all(|b| *b == 0) {
        return Err("zero serial".into());
    }
    if raw.len() > 1 && *first == 0 && raw[1] & 0x80 == 0 {
        return Err("serial not minimally encoded".into());
    }
    if raw != chosen {
        return Err(format!("serial {} is not the one chosen, {}", hex::encode(raw), hex::encode(chosen)));
    }
    Ok(())
}

fn check_extensions(cert: &X509Certificate<'_>, ca: &X509Certificate<'_>, leaf: &Leaf<'_>) -> Result<(), String> {
    let tbs = &cert.tbs_certificate;
    let map = tbs.extensions_map().map_err(|e| format!("extensions: {e}"))?;
    let allowed = [
        OID_X509_EXT_SUBJECT_ALT_NAME,
        OID_X509_EXT_BASIC_CONSTRAINTS,
        OID_X509_EXT_KEY_USAGE,
        OID_X509_EXT_EXTENDED_KEY_USAGE,
        OID_X509_EXT_AUTHORITY_KEY_IDENTIFIER,
        OID_X509_EXT_SUBJECT_KEY_IDENTIFIER,
    ];
    if let Some(other) = map.keys().find(|oid| !allowed.contains(oid)) {
        return Err(format!("extension {other} is not in the profile"));
    }
    for e in tbs.extensions() {
        if let ParsedExtension::UnsupportedExtension { .. } | ParsedExtension::ParseError { .. } = e.parsed_extension()
        {
            return Err(format!("extension {} does not parse", e.oid));
        }
    }

    let san = tbs.subject_alternative_name().map_err(|e| format!("subjectAltName: {e}"))?;
    let names = &san.ok_or("no subjectAltName")?.value.general_names;
    match leaf {
        Leaf::Svid(id) => {
            let [GeneralName::URI(uri)] = names.as_slice() else {
                return Err(format!("{} subjectAltNames; an X509-SVID has exactly one, a URI", names.len()));
            };
            let parsed = WorkloadId::parse(uri).map_err(|e| e.to_string())?;
            if parsed != **id {
                return Err(format!("the URI SAN `{uri}` is not the granted SPIFFE ID `{id}`"));
            }
            if let Some(td) = trust_domain_of(ca).filter(|td| *td != id.trust_domain()) {
                return Err(format!("`{id}` is not in the CA's trust domain `{td}`"));
            }
        }
        Leaf::TlsServer { dns, ips } => {
            let mut want: Vec<String> = dns.iter().map(|d| format!("dns:{d}")).collect();
            want.extend(ips.iter().map(|ip| format!("ip:{ip}")));
            let mut got = names
                .iter()
                .map(|n| match n {
                    GeneralName::DNSName(d) => Ok(format!("dns:{d}")),
                    GeneralName::IPAddress(b) => ip_of(b).map(|ip| format!("ip:{ip}")),
                    other => Err(format!("subjectAltName {other:?} is not a DNS name or IP address")),
                })
                .collect::<Result<Vec<_>, _>>()?;
            want.sort();
            got.sort();
            if want != got {
                return Err(format!("subjectAltNames {got:?} are not the listener's {want:?}"));
            }
        }
    }

    let bc = tbs.basic_constraints().map_err(|e| format!("basicConstraints: {e}"))?.ok_or("no basicConstraints")?;
    if !bc.critical || bc.value.ca || bc.value.path_len_constraint.is_some() {
        return Err("basicConstraints must be critical with cA false and no path length".into());
    }
    let ku = tbs.key_usage().map_err(|e| format!("keyUsage: {e}"))?.ok_or("no keyUsage")?;
    // x509-parser keeps the bits in reverse order: 1 is digitalSignature alone.
    if !ku.critical || ku.value.flags != 1 {
        return Err(format!("keyUsage must be critical and digitalSignature only, not `{}`", ku.value));
    }
    let eku = tbs.extended_key_usage().map_err(|e| format!("extKeyUsage: {e}"))?.ok_or("no extKeyUsage")?.value;
    let client_auth = matches!(leaf, Leaf::Svid(_));
    let others = eku.any
        || eku.code_signing
        || eku.email_protection
        || eku.time_stamping
        || eku.ocsp_signing
        || !eku.other.is_empty();
    if !eku.server_auth || eku.client_auth != client_auth || others {
        return Err(format!("extKeyUsage must be serverAuth{} only", if client_auth { " and clientAuth" } else { "" }));
    }

    let aki = tbs.iter_extensions().find_map(|e| match e.parsed_extension() {
        ParsedExtension::AuthorityKeyIdentifier(aki) => aki.key_identifier.as_ref().map(|k| k.0),
        _ => None,
    });
    let ca_ski = ca.iter_extensions().find_map(|e| match e.parsed_extension() {
        ParsedExtension::SubjectKeyIdentifier(k) => Some(k.0),
        _ => None,
    });
    match (aki, ca_ski) {
        (Some(a), Some(s)) if a == s => Ok(()),
        (None, _) => Err("no authorityKeyIdentifier".into()),
        _ => Err("the authorityKeyIdentifier is not the CA's subjectKeyIdentifier".into()),
    }
}

/// The trust domain a CA certificate names in its `spiffe://` URI SAN, if it names one.
fn trust_domain_of<'a>(ca: &'a X509Certificate<'_>) -> Option<&'a str> {
    let san = ca.tbs_certificate.subject_alternative_name().ok()??;
    san.value.general_names.iter().find_map(|n| match n {
        GeneralName::URI(u) => u.strip_prefix("spiffe://").map(|rest| rest.split('/').next().unwrap_or(rest)),
        _ => None,
    })
}

fn ip_of(bytes: &[u8]) -> Result<IpAddr, String> {
    match bytes.len() {
        4 => Ok(IpAddr::from(<[u8; 4]>::try_from(bytes).map_err(|e| e.to_string())?)),
        16 => Ok(IpAddr::from(<[u8; 16]>::try_from(bytes).map_err(|e| e.to_string())?)),
        n => Err(format!("an IP address SAN of {n} octets")),
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime};

    use rcgen::{
        CertificateParams, CustomExtension, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
        KeyUsagePurpose, SanType,
    };

    use super::*;
    use crate::identity::TrustDomain;
    use crate::keys::CertificateAuthority;

    const ID: &str = "spiffe://example.org/api";
    const NOW: i64 = 1_800_000_000;

    struct Fixture {
        ca: CertificateAuthority,
        key: KeyPair,
        id: WorkloadId,
        serial: Vec<u8>,
    }

    fn fixture() -> Fixture {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(NOW as u64 - 60);
        let ca = CertificateAuthority::generate(
            &TrustDomain::parse("example.org").unwrap(),
            t0,
            Duration::from_secs(86_400),
        )
        .unwrap();
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        Fixture { ca, key, id: WorkloadId::parse(ID).unwrap(), serial: vec![0x40, 1, 2, 3, 4, 5, 6, 7] }
    }

    impl Fixture {
        /// The parameters mint_x509 sets, for a 30-minute SVID.
        fn svid_params(&self) -> CertificateParams {
            let mut p = CertificateParams::default();
            let mut dn = DistinguishedName::new();
            dn.push(DnType::OrganizationName, "mayfly");
            p.distinguished_name = dn;
            p.subject_alt_names = vec![SanType::URI(ID.to_owned().try_into().unwrap())];
            p.is_ca = IsCa::ExplicitNoCa;
            p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
            p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
            p.use_authority_key_identifier_extension = true;
            p.serial_number = Some(self.serial.clone().into());
            p.not_before = time::OffsetDateTime::from_unix_timestamp(NOW).unwrap();
            p.not_after = time::OffsetDateTime::from_unix_timestamp(NOW + 1800).unwrap();
            p
        }

        fn check(&self, params: &CertificateParams) -> Result<(), Violation> {
            let pre = params.signed_by(&self.key, self.ca.lint_issuer()).unwrap();
            let spki = rcgen::PublicKeyData::subject_public_key_info(&self.key);
            check(
                pre.der(),
                &Expected {
                    leaf: Leaf::Svid(&self.id),
                    ca_cert: self.ca.cert_der(),
                    spki: &spki,
                    serial: &self.serial,
                    not_before: NOW,
                    not_after_max: NOW + 1800,
                    min_lifetime: 300,
                },
            )
        }

        fn refused(&self, change: impl FnOnce(&mut CertificateParams), why: &str) {
            let mut p = self.svid_params();
            change(&mut p);
            match self.check(&p) {
                Err(Violation::Profile(what)) => assert!(what.contains(why), "{why}: {what}"),
                other => panic!("{why}: {other:?}"),
            }
        }
    }

    #[test]
    fn the_svid_mint_x509_builds_passes() {
        let f = fixture();
        f.check(&f.svid_params()).unwrap();
    }

    #[test]
    fn each_break_of_the_svid_profile_is_named() {
        let f = fixture();
        f.refused(
            |p| p.subject_alt_names.push(SanType::DnsName("evil.example.com".try_into().unwrap())),
            "exactly one, a URI",
        );
        f.refused(
            |p| p.subject_alt_names = vec![SanType::URI("spiffe://example.org/other".try_into().unwrap())],
            "is not the granted SPIFFE ID",
        );
        f.refused(|p| p.is_ca = IsCa::Ca(rcgen::BasicConstraints::Unconstrained), "cA false");
        f.refused(|p| p.is_ca = IsCa::NoCa, "no basicConstraints");
        f.refused(|p| p.key_usages.push(KeyUsagePurpose::KeyCertSign), "digitalSignature only");
        f.refused(|p| p.key_usages.push(KeyUsagePurpose::KeyEncipherment), "digitalSignature only");
        f.refused(|p| drop(p.extended_key_usages.pop()), "serverAuth and clientAuth only");
        f.refused(|p| p.extended_key_usages.push(ExtendedKeyUsagePurpose::CodeSigning), "serverAuth and clientAuth");
        f.refused(|p| p.use_authority_key_identifier_extension = false, "no authorityKeyIdentifier");
        f.refused(|p| p.distinguished_name.push(DnType::CommonName, "api.example.org"), "commonName");
        f.refused(|p| p.serial_number = Some(vec![0x40, 9].into()), "not the one chosen");
        f.refused(
            |p| p.not_after = time::OffsetDateTime::from_unix_timestamp(NOW + 1801).unwrap(),
            "past the grant's end",
        );
        f.refused(
            |p| p.not_before = time::OffsetDateTime::from_unix_timestamp(NOW - 1).unwrap(),
            "is not the issuance time",
        );
        f.refused(
            |p| p.custom_extensions.push(CustomExtension::from_oid_content(&[1, 3, 6, 1, 4, 1, 99999, 1], vec![5, 0])),
            "is not in the profile",
        );
    }

    #[test]
    fn a_certificate_under_the_floor_is_too_short_not_a_bug() {
        let f = fixture();
        let mut p = f.svid_params();
        p.not_after = time::OffsetDateTime::from_unix_timestamp(NOW + 299).unwrap();
        let err = f.check(&p).unwrap_err();
        assert!(matches!(err, Violation::TooShort { lifetime: 299, min: 300, .. }), "{err:?}");
        assert!(err.to_string().contains("issuance.min_ttl"), "{err}");
    }

    #[test]
    fn what_is_signed_must_be_what_was_checked() {
        let f = fixture();
        let p = f.svid_params();
        let pre = p.signed_by(&f.key, f.ca.lint_issuer()).unwrap();
        let real = p.signed_by(&f.key, f.ca.issuer()).unwrap();
        same_tbs(pre.der(), real.der()).unwrap();
        let (_, parsed) = x509_parser::parse_x509_certificate(real.der()).unwrap();
        assert_eq!(tbs_of(real.der()).unwrap(), parsed.tbs_certificate.as_ref(), "the TBS as x509-parser reads it");
        assert_ne!(pre.der(), real.der(), "the signatures differ: another key signed the pre-certificate");
        let mut other = f.svid_params();
        other.serial_number = Some(vec![0x41].into());
        let changed = other.signed_by(&f.key, f.ca.issuer()).unwrap();
        assert!(same_tbs(pre.der(), changed.der()).is_err());
    }

    #[test]
    fn serials_must_be_positive_short_minimal_and_the_chosen_one() {
        assert!(check_serial(&[0x40, 1, 2], &[0x40, 1, 2]).is_ok());
        assert!(check_serial(&[0x00, 0x80], &[0x00, 0x80]).is_ok(), "a leading zero keeps 0x80.. positive");
        assert_eq!(check_serial(&[0x80], &[0x80]).unwrap_err(), "negative serial");
        assert_eq!(check_serial(&[0], &[0]).unwrap_err(), "zero serial");
        assert_eq!(check_serial(&[0, 0x01], &[0, 0x01]).unwrap_err(), "serial not minimally encoded");
        assert!(check_serial(&[0x40; 21], &[0x40; 21]).unwrap_err().contains("21 octets"));
        assert!(check_serial(&[0x41], &[0x40]).unwrap_err().contains("not the one chosen"));
    }
}
