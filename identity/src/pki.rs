//! PKI mode: an Ed25519 cluster CA certifies one X25519 key per node.
//!
//! Design note (deviation from "an X.509 extension under 2.25.<uuid>"): a node certificate's
//! subject public key *is* the node's static X25519 key (RFC 8410 id-X25519, keyUsage
//! keyAgreement), signed by the CA's Ed25519 key. A private-extension OID under 2.25.<uuid>
//! has a 128-bit arc, which RustCrypto's `const-oid` (used by `x509-cert` to parse every
//! extension) deliberately rejects, as do other common X.509 stacks (Go's `encoding/asn1` caps
//! arcs at 64 bits): a certificate carrying it would not even parse. RFC 8410 is the standard
//! way to certify an X25519 key, needs no minted OID, and the node never signs anything, so a
//! separate Ed25519 node key would be unused. The node name is in the subject CN and in a SAN
//! dNSName; both must match.

use std::str::FromStr;

use der::asn1::{Ia5String, OctetString};
use der::pem::LineEnding;
use der::{Decode, DecodePem, Encode};
use ed25519_dalek::pkcs8::{DecodePrivateKey, EncodePrivateKey};
use ed25519_dalek::{Signature, SigningKey, VerifyingKey};
use rand_core::CryptoRng;
use sha2::{Digest, Sha256};
use spki::{AlgorithmIdentifierOwned, ObjectIdentifier, SubjectPublicKeyInfoOwned};
use x509_cert::builder::profile::BuilderProfile;
use x509_cert::builder::{Builder, CertificateBuilder};
use x509_cert::certificate::TbsCertificate;
use x509_cert::ext::Extension;
use x509_cert::ext::pkix::name::GeneralName;
use x509_cert::ext::pkix::{BasicConstraints, KeyUsage, KeyUsages, SubjectAltName};
use x509_cert::name::Name;
use x509_cert::serial_number::SerialNumber;
use x509_cert::time::{Time, Validity};
use x509_cert::{Certificate, spki::SubjectPublicKeyInfoRef};
use zeroize::Zeroizing;

use crate::claims::is_dns_subdomain;
use crate::error::{CertError, PkiError};
use crate::wire::KeyId;

/// id-Ed25519 (RFC 8410).
pub const OID_ED25519: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.101.112");
/// id-X25519 (RFC 8410).
pub const OID_X25519: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.101.110");

const OID_BASIC_CONSTRAINTS: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.5.29.19");
const OID_KEY_USAGE: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.5.29.15");
const OID_SAN: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.5.29.17");

fn ms_to_time(ms: u64) -> Result<Time, PkiError> {
    let dt = der::DateTime::from_unix_duration(std::time::Duration::from_millis(ms))
        .map_err(|e| PkiError::Validity(e.to_string()))?;
    Ok(Time::from(dt))
}

fn time_to_ms(t: &Time) -> u64 {
    u64::try_from(t.to_unix_duration().as_millis()).unwrap_or(u64::MAX)
}

fn ext<T: Encode>(oid: ObjectIdentifier, critical: bool, v: &T) -> Result<Extension, PkiError> {
    let der = v.to_der().map_err(|e| PkiError::Build(e.to_string()))?;
    Ok(Extension {
        extn_id: oid,
        critical,
        extn_value: OctetString::new(der).map_err(|e| PkiError::Build(e.to_string()))?,
    })
}

fn cn_name(cn: &str) -> Result<Name, PkiError> {
    if !is_dns_subdomain(cn) {
        return Err(PkiError::InvalidName(cn.to_owned()));
    }
    Name::from_str(&format!("CN={cn}")).map_err(|e| PkiError::Build(e.to_string()))
}

struct Profile {
    subject: Name,
    issuer: Name,
    extensions: Vec<Extension>,
}

impl BuilderProfile for Profile {
    fn get_issuer(&self, _subject: &Name) -> Name {
        self.issuer.clone()
    }
    fn get_subject(&self) -> Name {
        self.subject.clone()
    }
    fn build_extensions(
        &self,
        _spk: SubjectPublicKeyInfoRef<'_>,
        _issuer_spk: SubjectPublicKeyInfoRef<'_>,
        _tbs: &TbsCertificate,
    ) -> x509_cert::builder::Result<Vec<Extension>> {
        Ok(self.extensions.clone())
    }
}

fn validity(not_before_ms: u64, not_after_ms: u64) -> Result<Validity, PkiError> {
    if not_before_ms >= not_after_ms {
        return Err(PkiError::Validity(
            "notBefore must be before notAfter".into(),
        ));
    }
    Ok(Validity::new(
        ms_to_time(not_before_ms)?,
        ms_to_time(not_after_ms)?,
    ))
}

fn sha256(b: &[u8]) -> [u8; 32] {
    Sha256::digest(b).into()
}

fn key_id_of(fingerprint: &[u8; 32]) -> KeyId {
    let mut id = [0u8; 8];
    id.copy_from_slice(&fingerprint[..8]);
    KeyId(id)
}

/// The cluster CA: an Ed25519 key and its self-signed certificate.
pub struct CertificateAuthority {
    key: SigningKey,
    anchor: TrustAnchor,
}

impl CertificateAuthority {
    /// Generate a CA named `name` (a DNS-1123 subdomain, e.g. `tessera-ca.example`), valid
    /// between the two unix-millisecond instants.
    pub fn generate<R: CryptoRng + ?Sized>(
        rng: &mut R,
        name: &str,
        not_before_ms: u64,
        not_after_ms: u64,
    ) -> Result<Self, PkiError> {
        let key = SigningKey::generate(rng);
        let subject = cn_name(name)?;
        let extensions = vec![
            ext(
                OID_BASIC_CONSTRAINTS,
                true,
                &BasicConstraints {
                    ca: true,
                    path_len_constraint: Some(0),
                },
            )?,
            ext(
                OID_KEY_USAGE,
                true,
                &KeyUsage(KeyUsages::KeyCertSign | KeyUsages::CRLSign),
            )?,
        ];
        let profile = Profile {
            subject: subject.clone(),
            issuer: subject,
            extensions,
        };
        let spki = SubjectPublicKeyInfoOwned::from_key(&key.verifying_key())
            .map_err(|e| PkiError::Build(e.to_string()))?;
        let builder = CertificateBuilder::new(
            profile,
            SerialNumber::generate(rng),
            validity(not_before_ms, not_after_ms)?,
            spki,
        )
        .map_err(|e| PkiError::Build(e.to_string()))?;
        let cert = builder
            .build::<_, Signature>(&key)
            .map_err(|e| PkiError::Build(e.to_string()))?;
        let der = cert.to_der().map_err(|e| PkiError::Build(e.to_string()))?;
        let anchor = TrustAnchor::from_der(&der)?;
        Ok(CertificateAuthority { key, anchor })
    }

    /// Load a CA from its certificate PEM and PKCS#8 private key PEM; checks they match.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, PkiError> {
        let anchor = TrustAnchor::from_pem(cert_pem)?;
        let key = SigningKey::from_pkcs8_pem(key_pem)
            .map_err(|e| PkiError::Key(format!("CA key is not a PKCS#8 Ed25519 key: {e}")))?;
        if key.verifying_key() != anchor.key {
            return Err(CertError::KeyMismatch.into());
        }
        Ok(CertificateAuthority { key, anchor })
    }

    /// The CA certificate as PEM (public; distribute to every node).
    pub fn certificate_pem(&self) -> String {
        self.anchor.to_pem()
    }

    /// The CA private key as PKCS#8 PEM (secret).
    pub fn private_key_pem(&self) -> Result<Zeroizing<String>, PkiError> {
        self.key
            .to_pkcs8_pem(LineEnding::LF)
            .map_err(|e| PkiError::Key(e.to_string()))
    }

    /// The trust anchor for this CA.
    pub fn trust_anchor(&self) -> &TrustAnchor {
        &self.anchor
    }

    /// Issue a node certificate for `node` with a fresh X25519 key from `rng`.
    pub fn issue_node<R: CryptoRng + ?Sized>(
        &self,
        rng: &mut R,
        node: &str,
        not_before_ms: u64,
        not_after_ms: u64,
    ) -> Result<NodeCredentials, PkiError> {
        let mut secret_bytes = Zeroizing::new([0u8; 32]);
        rng.fill_bytes(secret_bytes.as_mut());
        let secret = x25519_dalek::StaticSecret::from(*secret_bytes);
        let public = x25519_dalek::PublicKey::from(&secret);
        let cert = self.issue_for_key(rng, node, public.as_bytes(), not_before_ms, not_after_ms)?;
        Ok(NodeCredentials { cert, secret })
    }

    /// Issue a certificate for an existing X25519 public key (e.g. key rotation without
    /// moving the private key).
    pub fn issue_for_key<R: CryptoRng + ?Sized>(
        &self,
        rng: &mut R,
        node: &str,
        x25519_public: &[u8; 32],
        not_before_ms: u64,
        not_after_ms: u64,
    ) -> Result<NodeCertificate, PkiError> {
        let subject = cn_name(node)?;
        let dns = Ia5String::new(node).map_err(|e| PkiError::Build(e.to_string()))?;
        let extensions = vec![
            ext(
                OID_BASIC_CONSTRAINTS,
                true,
                &BasicConstraints {
                    ca: false,
                    path_len_constraint: None,
                },
            )?,
            ext(
                OID_KEY_USAGE,
                true,
                &KeyUsage(KeyUsages::KeyAgreement.into()),
            )?,
            ext(
                OID_SAN,
                false,
                &SubjectAltName(vec![GeneralName::DnsName(dns)]),
            )?,
        ];
        let profile = Profile {
            subject,
            issuer: self.anchor.subject.clone(),
            extensions,
        };
        let spki = SubjectPublicKeyInfoOwned {
            algorithm: AlgorithmIdentifierOwned {
                oid: OID_X25519,
                parameters: None,
            },
            subject_public_key: der::asn1::BitString::from_bytes(x25519_public)
                .map_err(|e| PkiError::Build(e.to_string()))?,
        };
        let builder = CertificateBuilder::new(
            profile,
            SerialNumber::generate(rng),
            validity(not_before_ms, not_after_ms)?,
            spki,
        )
        .map_err(|e| PkiError::Build(e.to_string()))?;
        let cert = builder
            .build::<_, Signature>(&self.key)
            .map_err(|e| PkiError::Build(e.to_string()))?;
        let der = cert.to_der().map_err(|e| PkiError::Build(e.to_string()))?;
        Ok(NodeCertificate::from_der(&der)?)
    }
}

/// The configured cluster CA certificate: the only root of trust in PKI mode.
#[derive(Clone, Debug)]
pub struct TrustAnchor {
    der: Vec<u8>,
    subject: Name,
    key: VerifyingKey,
    fingerprint: [u8; 32],
    not_before_ms: u64,
    not_after_ms: u64,
}

impl TrustAnchor {
    /// Parse the CA certificate (PEM). Checks it is a self-signed Ed25519 CA certificate.
    pub fn from_pem(pem: &str) -> Result<Self, CertError> {
        let cert = Certificate::from_pem(pem.trim().as_bytes())
            .map_err(|e| CertError::Malformed(format!("CA certificate PEM: {e}")))?;
        let der = cert
            .to_der()
            .map_err(|e| CertError::Malformed(e.to_string()))?;
        Self::from_der(&der)
    }

    /// Parse the CA certificate (DER).
    pub fn from_der(der: &[u8]) -> Result<Self, CertError> {
        let cert = Certificate::from_der(der)
            .map_err(|e| CertError::Malformed(format!("CA certificate: {e}")))?;
        let tbs = cert.tbs_certificate();
        let spki = tbs.subject_public_key_info();
        if spki.algorithm.oid != OID_ED25519 {
            return Err(CertError::WrongKeyType("CA key must be Ed25519"));
        }
        let key_bytes: [u8; 32] = spki
            .subject_public_key
            .as_bytes()
            .and_then(|b| b.try_into().ok())
            .ok_or(CertError::Malformed("CA public key is not 32 bytes".into()))?;
        let key = VerifyingKey::from_bytes(&key_bytes)
            .map_err(|_| CertError::Malformed("CA public key is not a valid point".into()))?;
        let bc = tbs
            .get_extension::<BasicConstraints>()
            .map_err(|e| CertError::Malformed(e.to_string()))?;
        if !matches!(bc, Some((_, BasicConstraints { ca: true, .. }))) {
            return Err(CertError::WrongKeyType(
                "CA certificate lacks basicConstraints CA",
            ));
        }
        let anchor = TrustAnchor {
            der: der.to_vec(),
            subject: tbs.subject().clone(),
            key,
            fingerprint: sha256(der),
            not_before_ms: time_to_ms(&tbs.validity().not_before),
            not_after_ms: time_to_ms(&tbs.validity().not_after),
        };
        if tbs.issuer() != tbs.subject() {
            return Err(CertError::UntrustedIssuer(
                "CA certificate is not self-issued",
            ));
        }
        verify_signature(&cert, &anchor.key)?;
        Ok(anchor)
    }

    /// PEM of the CA certificate.
    pub fn to_pem(&self) -> String {
        pem_of("CERTIFICATE", &self.der)
    }

    /// (notBefore, notAfter) in unix ms.
    pub fn validity_ms(&self) -> (u64, u64) {
        (self.not_before_ms, self.not_after_ms)
    }

    /// SHA-256 of the CA certificate DER.
    pub fn fingerprint(&self) -> [u8; 32] {
        self.fingerprint
    }

    /// Check that `cert` chains to this CA and is valid at `now_ms`; when `expected_node` is
    /// given, that it names that node. Every check has its own [`CertError`].
    pub fn verify(
        &self,
        cert: &NodeCertificate,
        expected_node: Option<&str>,
        now_ms: u64,
    ) -> Result<(), CertError> {
        if cert.issuer != self.subject {
            return Err(CertError::UntrustedIssuer("issuer name is not the CA's"));
        }
        let parsed =
            Certificate::from_der(&cert.der).map_err(|e| CertError::Malformed(e.to_string()))?;
        verify_signature(&parsed, &self.key)?;
        if let Some(expected) = expected_node
            && expected != cert.node_name
        {
            return Err(CertError::NodeNameMismatch {
                expected: expected.to_owned(),
                found: cert.node_name.clone(),
            });
        }
        check_validity(cert.not_before_ms, cert.not_after_ms, now_ms)?;
        // A node certificate cannot outlive the CA that vouches for it.
        check_validity(self.not_before_ms, self.not_after_ms, now_ms)
    }
}

pub(crate) fn check_validity(
    not_before_ms: u64,
    not_after_ms: u64,
    now_ms: u64,
) -> Result<(), CertError> {
    if now_ms < not_before_ms {
        return Err(CertError::NotYetValid {
            not_before_ms,
            now_ms,
        });
    }
    if now_ms > not_after_ms {
        return Err(CertError::Expired {
            not_after_ms,
            now_ms,
        });
    }
    Ok(())
}

fn verify_signature(cert: &Certificate, key: &VerifyingKey) -> Result<(), CertError> {
    if cert.signature_algorithm().oid != OID_ED25519 {
        return Err(CertError::UntrustedIssuer("not signed with Ed25519"));
    }
    let tbs = cert
        .tbs_certificate()
        .to_der()
        .map_err(|e| CertError::Malformed(e.to_string()))?;
    let sig = cert
        .signature()
        .as_bytes()
        .and_then(|b| Signature::from_slice(b).ok())
        .ok_or(CertError::Malformed("signature is not 64 bytes".into()))?;
    key.verify_strict(&tbs, &sig)
        .map_err(|_| CertError::UntrustedIssuer("signature does not verify under the CA key"))
}

fn pem_of(label: &'static str, der: &[u8]) -> String {
    // Encoding base64 into a String cannot fail for a label this short; fall back to an empty
    // string rather than panicking.
    der::pem::encode_string(label, LineEnding::LF, der).unwrap_or_default()
}

/// A node certificate: node name, X25519 public key, validity, fingerprint. Parsing checks its
/// structure only; [`TrustAnchor::verify`] checks the chain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeCertificate {
    der: Vec<u8>,
    issuer: Name,
    node_name: String,
    x25519: [u8; 32],
    fingerprint: [u8; 32],
    not_before_ms: u64,
    not_after_ms: u64,
    serial: Vec<u8>,
}

impl NodeCertificate {
    /// Parse the first certificate of a PEM bundle.
    pub fn from_pem(pem: &str) -> Result<Self, CertError> {
        let chain = Certificate::load_pem_chain(pem.trim().as_bytes())
            .map_err(|e| CertError::Malformed(format!("node certificate PEM: {e}")))?;
        let first = chain
            .first()
            .ok_or(CertError::Malformed("no certificate in PEM".into()))?;
        let der = first
            .to_der()
            .map_err(|e| CertError::Malformed(e.to_string()))?;
        Self::from_der(&der)
    }

    /// Parse a DER node certificate.
    pub fn from_der(der: &[u8]) -> Result<Self, CertError> {
        let cert = Certificate::from_der(der)
            .map_err(|e| CertError::Malformed(format!("node certificate: {e}")))?;
        let tbs = cert.tbs_certificate();
        let spki = tbs.subject_public_key_info();
        if spki.algorithm.oid != OID_X25519 {
            return Err(CertError::WrongKeyType(
                "node key must be X25519 (RFC 8410)",
            ));
        }
        let x25519: [u8; 32] = spki
            .subject_public_key
            .as_bytes()
            .and_then(|b| b.try_into().ok())
            .ok_or(CertError::Malformed("X25519 key is not 32 bytes".into()))?;
        let ku = tbs
            .get_extension::<KeyUsage>()
            .map_err(|e| CertError::Malformed(e.to_string()))?;
        if !matches!(ku, Some((_, ref k)) if k.key_agreement()) {
            return Err(CertError::WrongKeyType(
                "keyUsage must include keyAgreement",
            ));
        }
        let bc = tbs
            .get_extension::<BasicConstraints>()
            .map_err(|e| CertError::Malformed(e.to_string()))?;
        if matches!(bc, Some((_, BasicConstraints { ca: true, .. }))) {
            return Err(CertError::WrongKeyType(
                "a CA certificate is not a node certificate",
            ));
        }
        let cn: String = tbs
            .subject()
            .common_name()
            .map_err(|e| CertError::Malformed(e.to_string()))?
            .map(String::from)
            .ok_or(CertError::Malformed("subject has no CN".into()))?;
        let san = tbs
            .get_extension::<SubjectAltName>()
            .map_err(|e| CertError::Malformed(e.to_string()))?
            .ok_or(CertError::Malformed("no subjectAltName".into()))?;
        let dns: Vec<&str> = san
            .1
            .0
            .iter()
            .filter_map(|g| match g {
                GeneralName::DnsName(d) => Some(d.as_str()),
                _ => None,
            })
            .collect();
        if dns.len() != 1 || dns[0] != cn {
            return Err(CertError::NodeNameMismatch {
                expected: cn,
                found: dns.join(","),
            });
        }
        if !is_dns_subdomain(&cn) {
            return Err(CertError::Malformed(format!(
                "node name {cn:?} is not a DNS-1123 subdomain"
            )));
        }
        Ok(NodeCertificate {
            der: der.to_vec(),
            issuer: tbs.issuer().clone(),
            node_name: cn,
            x25519,
            fingerprint: sha256(der),
            not_before_ms: time_to_ms(&tbs.validity().not_before),
            not_after_ms: time_to_ms(&tbs.validity().not_after),
            serial: tbs.serial_number().as_bytes().to_vec(),
        })
    }

    /// PEM (public; publish this, e.g. in a node annotation).
    pub fn to_pem(&self) -> String {
        pem_of("CERTIFICATE", &self.der)
    }
    /// DER bytes.
    pub fn der(&self) -> &[u8] {
        &self.der
    }
    /// Node name (CN = SAN dNSName).
    pub fn node_name(&self) -> &str {
        &self.node_name
    }
    /// The node's static X25519 public key.
    pub fn x25519_public(&self) -> &[u8; 32] {
        &self.x25519
    }
    /// SHA-256 of the DER certificate.
    pub fn fingerprint(&self) -> [u8; 32] {
        self.fingerprint
    }
    /// Key id carried in tokens: first 8 bytes of the fingerprint.
    pub fn key_id(&self) -> KeyId {
        key_id_of(&self.fingerprint)
    }
    /// notBefore, unix ms.
    pub fn not_before_ms(&self) -> u64 {
        self.not_before_ms
    }
    /// notAfter, unix ms.
    pub fn not_after_ms(&self) -> u64 {
        self.not_after_ms
    }
    /// Serial number bytes.
    pub fn serial(&self) -> &[u8] {
        &self.serial
    }
}

/// A node's own credentials: its certificate and X25519 private key.
pub struct NodeCredentials {
    cert: NodeCertificate,
    secret: x25519_dalek::StaticSecret,
}

impl NodeCredentials {
    /// Build from parts; checks the key matches the certificate.
    pub fn new(cert: NodeCertificate, secret: [u8; 32]) -> Result<Self, PkiError> {
        let secret = x25519_dalek::StaticSecret::from(secret);
        if x25519_dalek::PublicKey::from(&secret).as_bytes() != cert.x25519_public() {
            return Err(CertError::KeyMismatch.into());
        }
        Ok(NodeCredentials { cert, secret })
    }

    /// Load from the node certificate PEM and the PKCS#8 X25519 private key PEM.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, PkiError> {
        let cert = NodeCertificate::from_pem(cert_pem)?;
        let (label, doc) = der::SecretDocument::from_pem(key_pem.trim())
            .map_err(|e| PkiError::Key(format!("node key PEM: {e}")))?;
        if label != "PRIVATE KEY" {
            return Err(PkiError::Key(format!(
                "node key PEM label is {label:?}, expected \"PRIVATE KEY\""
            )));
        }
        let info = pkcs8::PrivateKeyInfoRef::from_der(doc.as_bytes())
            .map_err(|e| PkiError::Key(format!("node key is not PKCS#8: {e}")))?;
        if info.algorithm.oid != OID_X25519 {
            return Err(PkiError::Key("node key is not an X25519 key".into()));
        }
        // RFC 8410: privateKey is an OCTET STRING wrapping CurvePrivateKey ::= OCTET STRING.
        let inner = <&der::asn1::OctetStringRef>::from_der(info.private_key.as_bytes())
            .map_err(|e| PkiError::Key(format!("X25519 private key: {e}")))?;
        let bytes: [u8; 32] = inner
            .as_bytes()
            .try_into()
            .map_err(|_| PkiError::Key("X25519 private key is not 32 bytes".into()))?;
        Self::new(cert, bytes)
    }

    /// The certificate.
    pub fn certificate(&self) -> &NodeCertificate {
        &self.cert
    }

    /// The private key as PKCS#8 PEM (RFC 8410), secret.
    pub fn private_key_pem(&self) -> Result<Zeroizing<String>, PkiError> {
        let inner = Zeroizing::new(
            der::asn1::OctetStringRef::new(self.secret.as_bytes())
                .and_then(|o| o.to_der())
                .map_err(|e| PkiError::Key(e.to_string()))?,
        );
        let os =
            der::asn1::OctetStringRef::new(&inner).map_err(|e| PkiError::Key(e.to_string()))?;
        let info = pkcs8::PrivateKeyInfoRef::new(
            spki::AlgorithmIdentifierRef {
                oid: OID_X25519,
                parameters: None,
            },
            os,
        );
        let doc =
            der::SecretDocument::encode_msg(&info).map_err(|e| PkiError::Key(e.to_string()))?;
        doc.to_pem("PRIVATE KEY", LineEnding::LF)
            .map_err(|e| PkiError::Key(e.to_string()))
    }

    pub(crate) fn secret(&self) -> &x25519_dalek::StaticSecret {
        &self.secret
    }
}

/// A human-readable summary of any certificate PEM (CA or node), for `tessera pki show`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertificateSummary {
    /// Subject common name.
    pub subject_cn: String,
    /// Issuer common name.
    pub issuer_cn: String,
    /// SAN dNSNames.
    pub dns_names: Vec<String>,
    /// Serial number (hex).
    pub serial_hex: String,
    /// notBefore, unix ms.
    pub not_before_ms: u64,
    /// notAfter, unix ms.
    pub not_after_ms: u64,
    /// `Ed25519` or `X25519` or the OID.
    pub key_algorithm: String,
    /// Is a CA certificate.
    pub is_ca: bool,
    /// SHA-256 of the DER certificate (hex).
    pub fingerprint_hex: String,
    /// Key id as carried in tokens (hex).
    pub key_id_hex: String,
}

/// Summarise the first certificate in a PEM file.
pub fn summarize_pem(pem: &str) -> Result<CertificateSummary, CertError> {
    let chain = Certificate::load_pem_chain(pem.trim().as_bytes())
        .map_err(|e| CertError::Malformed(format!("PEM: {e}")))?;
    let cert = chain
        .first()
        .ok_or(CertError::Malformed("no certificate in PEM".into()))?;
    let der = cert
        .to_der()
        .map_err(|e| CertError::Malformed(e.to_string()))?;
    let tbs = cert.tbs_certificate();
    let cn = |n: &Name| -> String {
        n.common_name()
            .ok()
            .flatten()
            .map(String::from)
            .unwrap_or_default()
    };
    let dns_names = tbs
        .get_extension::<SubjectAltName>()
        .ok()
        .flatten()
        .map(|(_, san)| {
            san.0
                .iter()
                .filter_map(|g| match g {
                    GeneralName::DnsName(d) => Some(d.as_str().to_owned()),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    let oid = tbs.subject_public_key_info().algorithm.oid;
    let key_algorithm = if oid == OID_ED25519 {
        "Ed25519".to_owned()
    } else if oid == OID_X25519 {
        "X25519".to_owned()
    } else {
        oid.to_string()
    };
    let is_ca = matches!(
        tbs.get_extension::<BasicConstraints>().ok().flatten(),
        Some((_, BasicConstraints { ca: true, .. }))
    );
    let fp = sha256(&der);
    Ok(CertificateSummary {
        subject_cn: cn(tbs.subject()),
        issuer_cn: cn(tbs.issuer()),
        dns_names,
        serial_hex: hex(tbs.serial_number().as_bytes()),
        not_before_ms: time_to_ms(&tbs.validity().not_before),
        not_after_ms: time_to_ms(&tbs.validity().not_after),
        key_algorithm,
        is_ca,
        fingerprint_hex: hex(&fp),
        key_id_hex: key_id_of(&fp).to_string(),
    })
}

/// Format unix milliseconds as RFC 3339 UTC (second precision), e.g. for `tessera pki show`.
pub fn format_time(ms: u64) -> String {
    match der::DateTime::from_unix_duration(std::time::Duration::from_millis(ms)) {
        Ok(dt) => dt.to_string(),
        Err(_) => format!("{ms} ms since the epoch"),
    }
}

pub(crate) fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}
