//! Tessera identity: workload claims, node keys and the authenticated TCP handshake.
//!
//! Pure: no I/O, no clock (time is passed in as unix milliseconds), no OS randomness (callers
//! pass a `CryptoRng` or nonce bytes). See docs/wire-format.md and docs/threat-model.md.
//!
//! * [`Claims`]: a workload's canonical, bounded identity.
//! * [`pki`]: the cluster CA, node certificates (X25519 keys certified by an Ed25519 CA).
//! * [`Psk`]: the pre-shared-key alternative, with entropy checks.
//! * [`Node`] and the per-flow states: the three-token handshake, and the two-token bound
//!   handshake for a client that knows which node will answer.
//! * [`wire`]: token layouts and the RFC 6994 TCP option.

pub mod claims;
pub mod error;
pub mod handshake;
mod keys;
pub mod pki;
pub mod psk;
pub mod replay;
pub mod testing;
pub mod wire;

pub use claims::{Claims, MAX_CLAIMS_LEN};
pub use error::{CertError, ClaimsError, HandshakeError, PkiError, PskError};
pub use handshake::{
    BindingMiss, ClientAwaitingSynAck, ClientProven, Config, FlowSource, Node, PeerIdentity,
    PeerNode, ServerAwaitingAck, ServerSyn, ServerSynBound, ServerSynReceived,
};
pub use pki::{CertificateAuthority, NodeCertificate, NodeCredentials, TrustAnchor};
pub use psk::Psk;
pub use replay::{ReplayCache, ReplayConfig};
pub use wire::{
    KeyId, MAX_TOKEN_LEN, Mode, UdpControlError, encode_tcp_option, encode_udp_control,
    parse_tcp_option, parse_udp_control,
};

/// Re-exported so callers name the same `rand_core` version.
pub use rand_core;
