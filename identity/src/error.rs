//! Typed errors. Every rejection of a token or certificate has its own variant and a stable
//! `as_str()` label, so the datapath can count rejections by reason.

use thiserror::Error;

/// Why a workload's claims cannot be turned into a token.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ClaimsError {
    /// A field does not follow Kubernetes syntax.
    #[error("claims field {field}: {value:?} is not valid ({rule})")]
    InvalidSyntax {
        /// Which field (`namespace`, `workload`, `label key`, `label value`, `port name`, ...).
        field: &'static str,
        /// The offending value (truncated to 80 characters).
        value: String,
        /// The rule it breaks.
        rule: &'static str,
    },
    /// The encoded claims exceed [`crate::MAX_CLAIMS_LEN`]; the identity is refused rather than
    /// truncated.
    #[error("claims encode to {size} bytes, over the maximum of {max} bytes")]
    TooLarge {
        /// Encoded size.
        size: usize,
        /// The maximum.
        max: usize,
    },
    /// More than 255 labels in one map.
    #[error("{field}: {count} labels, over the maximum of 255")]
    TooManyLabels {
        /// `labels` or `namespace_labels`.
        field: &'static str,
        /// How many were given.
        count: usize,
    },
}

impl ClaimsError {
    pub(crate) fn syntax(field: &'static str, value: &str, rule: &'static str) -> Self {
        let value: String = value.chars().take(80).collect();
        ClaimsError::InvalidSyntax { field, value, rule }
    }
}

/// Why a pre-shared key was refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum PskError {
    /// Shorter than [`crate::psk::MIN_PSK_LEN`] bytes.
    #[error("pre-shared key is {len} bytes; at least {min} bytes are required")]
    TooShort {
        /// Length given.
        len: usize,
        /// Minimum.
        min: usize,
    },
    /// The key is visibly not random (few distinct bytes, a repeated pattern, or text from a
    /// tiny alphabet). Generate one with e.g. `head -c 32 /dev/urandom | base64`.
    #[error("pre-shared key has low entropy: {0}")]
    LowEntropy(&'static str),
}

/// Why a certificate (the CA's or a node's) was refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum CertError {
    /// Not PEM / DER we can parse, or a required part is missing.
    #[error("certificate is malformed: {0}")]
    Malformed(String),
    /// `now` is after notAfter.
    #[error("certificate expired (notAfter {not_after_ms} ms, now {now_ms} ms)")]
    Expired {
        /// notAfter in unix milliseconds.
        not_after_ms: u64,
        /// The time checked against.
        now_ms: u64,
    },
    /// `now` is before notBefore.
    #[error("certificate not yet valid (notBefore {not_before_ms} ms, now {now_ms} ms)")]
    NotYetValid {
        /// notBefore in unix milliseconds.
        not_before_ms: u64,
        /// The time checked against.
        now_ms: u64,
    },
    /// Issued by someone other than the configured cluster CA (issuer name differs or the
    /// signature does not verify under the CA's key).
    #[error("certificate is not issued by the configured cluster CA: {0}")]
    UntrustedIssuer(&'static str),
    /// The certificate names another node than expected (CN and SAN dNSName are checked).
    #[error("certificate is for node {found:?}, expected {expected:?}")]
    NodeNameMismatch {
        /// Name expected by the caller.
        expected: String,
        /// Name found in the certificate.
        found: String,
    },
    /// The subject key is not what the role needs (X25519 for a node, Ed25519 for the CA), or a
    /// required extension is missing or wrong.
    #[error("certificate has the wrong key or usage: {0}")]
    WrongKeyType(&'static str),
    /// The private key does not belong to the certificate.
    #[error("private key does not match the certificate")]
    KeyMismatch,
    /// The bounded table of peer certificates is full of unexpired certificates.
    #[error("peer certificate table is full ({0} certificates)")]
    TableFull(usize),
    /// The certificate's key id was revoked on this node.
    #[error("certificate {0} was revoked")]
    Revoked(String),
}

impl CertError {
    /// Stable label for metrics.
    pub fn as_str(&self) -> &'static str {
        match self {
            CertError::Malformed(_) => "cert_malformed",
            CertError::Expired { .. } => "cert_expired",
            CertError::NotYetValid { .. } => "cert_not_yet_valid",
            CertError::UntrustedIssuer(_) => "cert_untrusted_issuer",
            CertError::NodeNameMismatch { .. } => "cert_node_name_mismatch",
            CertError::WrongKeyType(_) => "cert_wrong_key_type",
            CertError::KeyMismatch => "cert_key_mismatch",
            CertError::TableFull(_) => "cert_table_full",
            CertError::Revoked(_) => "cert_revoked",
        }
    }
}

/// Why a handshake token was rejected (or could not be made). The datapath counts these by
/// [`HandshakeError::as_str`].
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum HandshakeError {
    /// The token is not well formed: truncated, trailing bytes, a length field that does not
    /// fit, or over [`crate::MAX_TOKEN_LEN`].
    #[error("malformed token: {0}")]
    Malformed(&'static str),
    /// The version byte is not one we speak.
    #[error("unsupported token version {0}")]
    UnsupportedVersion(u8),
    /// A token of another type arrived where this one was expected.
    #[error("unexpected token type {found} (expected {expected})")]
    WrongTokenType {
        /// Expected type byte.
        expected: u8,
        /// Type byte found.
        found: u8,
    },
    /// The peer uses the other key mode (PKI vs PSK) or an unknown mode byte.
    #[error("key mode mismatch (token mode byte {0})")]
    ModeMismatch(u8),
    /// Claims or node name in the token break Kubernetes syntax or canonical order.
    #[error("invalid claims in token: {0}")]
    InvalidClaims(ClaimsError),
    /// The token's timestamp is outside the allowed clock skew.
    #[error("timestamp {timestamp_ms} ms outside the window around {now_ms} ms")]
    StaleTimestamp {
        /// Timestamp carried.
        timestamp_ms: u64,
        /// Local time.
        now_ms: u64,
    },
    /// The nonce was seen before (or is older than what the bounded cache still remembers).
    #[error("replayed token")]
    Replay,
    /// No certificate is known for the key id in the token.
    #[error("unknown key id {0}")]
    UnknownKey(String),
    /// The key id belonged to a certificate that was removed (revoked).
    #[error("key id {0} was revoked")]
    KeyRevoked(String),
    /// The token's node name does not match the node named in the certificate of its key id.
    #[error("token claims node {claimed:?} but key belongs to {certified:?}")]
    NodeNameMismatch {
        /// Node named in the token.
        claimed: String,
        /// Node named in the certificate.
        certified: String,
    },
    /// The peer's (or our own) certificate is not valid at `now`.
    #[error("peer certificate: {0}")]
    Certificate(CertError),
    /// PSK mode: the peer's PSK id differs from ours (different pre-shared key).
    #[error("pre-shared key id differs (peer uses another key)")]
    PskMismatch,
    /// The MAC does not verify: the token (or the one it answers) was altered or forged.
    #[error("MAC verification failed")]
    BadMac,
    /// The key exchange gave an all-zero shared secret (a low-order peer key).
    #[error("key agreement with the peer failed")]
    KeyAgreement,
    /// Our own claims could not be encoded (this is a local error, not a peer's).
    #[error("local claims: {0}")]
    LocalClaims(ClaimsError),
}

impl HandshakeError {
    /// Stable label for metrics (lowercase snake case; never changes once released).
    pub fn as_str(&self) -> &'static str {
        match self {
            HandshakeError::Malformed(_) => "malformed",
            HandshakeError::UnsupportedVersion(_) => "unsupported_version",
            HandshakeError::WrongTokenType { .. } => "wrong_token_type",
            HandshakeError::ModeMismatch(_) => "mode_mismatch",
            HandshakeError::InvalidClaims(_) => "invalid_claims",
            HandshakeError::StaleTimestamp { .. } => "stale_timestamp",
            HandshakeError::Replay => "replay",
            HandshakeError::UnknownKey(_) => "unknown_key",
            HandshakeError::KeyRevoked(_) => "key_revoked",
            HandshakeError::NodeNameMismatch { .. } => "node_name_mismatch",
            HandshakeError::Certificate(e) => e.as_str(),
            HandshakeError::PskMismatch => "psk_mismatch",
            HandshakeError::BadMac => "bad_mac",
            HandshakeError::KeyAgreement => "key_agreement",
            HandshakeError::LocalClaims(_) => "local_claims",
        }
    }
}

/// Errors of the PKI helpers (CA creation, issuing, loading keys).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum PkiError {
    /// A certificate problem.
    #[error(transparent)]
    Cert(#[from] CertError),
    /// A private key could not be parsed or has the wrong algorithm.
    #[error("private key: {0}")]
    Key(String),
    /// A node name or CA name is not a valid DNS-1123 subdomain.
    #[error(
        "invalid name {0:?}: must be a DNS-1123 subdomain (lowercase, digits, '-', '.'; at most 253)"
    )]
    InvalidName(String),
    /// notBefore >= notAfter or out of the representable range.
    #[error("invalid validity period: {0}")]
    Validity(String),
    /// The X.509 builder failed.
    #[error("building certificate: {0}")]
    Build(String),
}
