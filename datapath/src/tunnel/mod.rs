//! Encryption between nodes: a userspace WireGuard tunnel's logic, without I/O.
//!
//! The shell (`shell::tunnel`) owns a TUN device and one UDP socket and moves bytes; everything
//! it decides with is here:
//!
//! - [`PeerTable`]: the peer nodes (name, WireGuard public key, UDP endpoint, allowed IP
//!   prefixes), validated as a whole, and the longest-prefix lookup from an address to a peer
//!   that both directions use: a packet read from the TUN device goes to the peer whose prefixes
//!   hold its destination; a packet decrypted from a peer is delivered only if the peer whose
//!   prefixes hold its *source* is that same peer (WireGuard's cryptokey routing).
//! - [`Tunnel`]: one `boringtun` [`Tunn`](boringtun::noise::Tunn) (the Noise handshake and the
//!   session keys) per peer, the dispatch of each datagram to its peer (a handshake initiation by
//!   the sender's static key, anything else by the receiver index), and the counters.
//! - [`TunnelStats`] / [`PeerStats`]: bytes, packets, handshakes and their age, and every
//!   dropped packet counted by [`Reason`].
//!
//! Pure as far as this crate goes: no sockets, no files, and the time our own counters use is
//! passed in (milliseconds). `boringtun` itself reads the monotonic clock for its protocol
//! timers (rekey, retransmission, expiry) and OS randomness for ephemeral keys and indices.
//!
//! Hostile input never panics: every length is checked before `boringtun` sees a buffer (its
//! `encapsulate`/`decapsulate` panic on a too small destination), and every datagram that does
//! not end in a delivered packet is counted, against its peer when the peer is known, else in
//! the tunnel's own counters.

mod engine;
mod stats;
mod table;

pub use engine::{Outputs, PeerChanges, Tunnel};
pub use stats::{PeerStats, Reason, TunnelStats};
pub use table::PeerTable;

use std::fmt;
use std::net::SocketAddr;

use ipnet::IpNet;

/// The UDP port the tunnel listens on unless configured otherwise.
pub const DEFAULT_PORT: u16 = 51871;

/// The TUN device's MTU unless configured otherwise: 1500 minus the largest encapsulation
/// overhead (IPv6 40 + UDP 8 + WireGuard data header 16 + tag 16 = 80), as wg-quick uses.
pub const DEFAULT_MTU: u16 = 1420;

/// A WireGuard (X25519) public key.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PublicKey(pub [u8; 32]);

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({self})")
    }
}

impl fmt::Display for PublicKey {
    /// Lowercase hex.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

/// The tunnel's own static X25519 secret (zeroed on drop by `x25519-dalek`).
#[derive(Clone)]
pub struct StaticSecret(boringtun::x25519::StaticSecret);

impl StaticSecret {
    /// The secret from its 32 bytes (clamped as X25519 requires when used).
    pub fn from_bytes(bytes: [u8; 32]) -> StaticSecret {
        StaticSecret(boringtun::x25519::StaticSecret::from(bytes))
    }

    /// The public key that peers configure for this secret.
    pub fn public_key(&self) -> PublicKey {
        PublicKey(boringtun::x25519::PublicKey::from(&self.0).to_bytes())
    }
}

impl fmt::Debug for StaticSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "StaticSecret(public {})", self.public_key())
    }
}

/// One peer node as the control plane describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerConfig {
    /// The peer node's name (unique in the table; for counters and errors).
    pub name: String,
    /// Its WireGuard public key (unique in the table): what the handshake proves.
    pub public_key: PublicKey,
    /// Where its tunnel listens (the node's address and the tunnel port). Datagrams are sent
    /// there; the peer's datagrams are accepted from any address, as WireGuard does, since
    /// only the key can make them decrypt, and the endpoint is not changed by them (the table
    /// is the only source of endpoints).
    pub endpoint: SocketAddr,
    /// The addresses the peer may send from and that are routed to it (its pod prefixes).
    /// Host bits are cleared (`10.1.2.3/24` is `10.1.2.0/24`).
    pub allowed_ips: Vec<IpNet>,
}

/// Why a peer set was refused; the table in force is left as it was.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// A peer without a name.
    #[error("tunnel peer with public key {0}: empty name")]
    EmptyName(PublicKey),
    /// Two peers with the same name.
    #[error("tunnel peer {0}: name given twice")]
    DuplicateName(String),
    /// Two peers with the same key (a key is a node: which would a handshake belong to?).
    #[error("tunnel peers {first} and {second}: same public key {key}")]
    DuplicateKey {
        /// The first peer with the key.
        first: String,
        /// The second one.
        second: String,
        /// The key.
        key: PublicKey,
    },
    /// A peer with this tunnel's own public key.
    #[error("tunnel peer {0}: has this node's own public key")]
    OwnKey(String),
    /// An endpoint that cannot be sent to.
    #[error("tunnel peer {peer}: endpoint {endpoint} is not a unicast address and port")]
    BadEndpoint {
        /// The peer.
        peer: String,
        /// Its endpoint.
        endpoint: SocketAddr,
    },
    /// The same prefix allowed for two peers (which one would a packet to it go to?).
    #[error("tunnel peers {first} and {second}: both allow {prefix}")]
    DuplicatePrefix {
        /// The prefix.
        prefix: IpNet,
        /// The first peer allowing it.
        first: String,
        /// The second one.
        second: String,
    },
    /// A prefix that holds a peer's endpoint: the tunnel's own datagrams to that peer would be
    /// routed into the tunnel.
    #[error(
        "tunnel peer {peer}: allowed prefix {prefix} holds the endpoint {endpoint} of peer {owner} (a routing loop)"
    )]
    EndpointInPrefix {
        /// The peer allowing the prefix.
        peer: String,
        /// The prefix.
        prefix: IpNet,
        /// The endpoint inside it.
        endpoint: SocketAddr,
        /// The peer with that endpoint.
        owner: String,
    },
    /// More peers than the 24-bit index space of the WireGuard sessions.
    #[error("tunnel: {0} peers, more than the 16,777,215 a tunnel can index")]
    TooManyPeers(usize),
}
