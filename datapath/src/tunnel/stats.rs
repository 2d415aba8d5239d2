//! What the tunnel counts: per peer (bytes, packets, handshakes, drops by reason) and for the
//! tunnel as a whole (drops that belong to no known peer).

use std::net::SocketAddr;
use std::time::Duration;

use ipnet::IpNet;

use super::PublicKey;

/// Why a packet or datagram was dropped (metric label: [`Reason::as_str`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Reason {
    /// Not a WireGuard message (unknown type, wrong length), or a decrypted payload that is not
    /// an IP packet.
    Malformed,
    /// Longer than the tunnel's buffers (a datagram over 64 KiB, a TUN packet over the MTU
    /// the buffers were sized for).
    Oversize,
    /// A handshake message whose MAC1 is not keyed to this tunnel's public key.
    BadMac,
    /// A handshake initiation from a static key that is in no peer's entry (or that could not
    /// be decrypted at all).
    UnknownKey,
    /// A message for a session index this tunnel did not hand out (a forgery, or a stale
    /// session of a removed peer).
    UnknownIndex,
    /// Handshakes over the rate limit: answered with a cookie, not processed.
    UnderLoad,
    /// A data message that failed authentication (wrong key, altered bytes).
    Decrypt,
    /// A data message with a counter already seen or too old, or a handshake initiation with a
    /// timestamp not newer than the last one accepted from that key (a replay).
    Replay,
    /// A handshake message out of place (unexpected type or index, a response to no
    /// initiation).
    Handshake,
    /// Data for a session that no longer exists (expired or replaced).
    NoSession,
    /// A decrypted packet whose source address is not in the sending peer's allowed prefixes
    /// (cryptokey routing: a peer can only speak for its own addresses).
    DisallowedSource,
    /// A packet read from the TUN device whose destination is in no peer's allowed prefixes.
    NoPeer,
    /// The handshake with the peer was retried for 90 s without an answer; its queued
    /// packets were dropped.
    HandshakeTimeout,
    /// The UDP socket refused a datagram (buffer full, no route).
    SendFailed,
    /// The TUN device refused a decrypted packet.
    DeliverFailed,
    /// A state `boringtun` reports as its own error (lock or buffer size); never expected.
    Internal,
}

impl Reason {
    /// Every reason, in label order.
    pub const ALL: [Reason; 16] = [
        Reason::Malformed,
        Reason::Oversize,
        Reason::BadMac,
        Reason::UnknownKey,
        Reason::UnknownIndex,
        Reason::UnderLoad,
        Reason::Decrypt,
        Reason::Replay,
        Reason::Handshake,
        Reason::NoSession,
        Reason::DisallowedSource,
        Reason::NoPeer,
        Reason::HandshakeTimeout,
        Reason::SendFailed,
        Reason::DeliverFailed,
        Reason::Internal,
    ];

    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Malformed => "malformed",
            Reason::Oversize => "oversize",
            Reason::BadMac => "bad_mac",
            Reason::UnknownKey => "unknown_key",
            Reason::UnknownIndex => "unknown_index",
            Reason::UnderLoad => "under_load",
            Reason::Decrypt => "decrypt",
            Reason::Replay => "replay",
            Reason::Handshake => "handshake",
            Reason::NoSession => "no_session",
            Reason::DisallowedSource => "disallowed_source",
            Reason::NoPeer => "no_peer",
            Reason::HandshakeTimeout => "handshake_timeout",
            Reason::SendFailed => "send_failed",
            Reason::DeliverFailed => "deliver_failed",
            Reason::Internal => "internal",
        }
    }

    /// What a `boringtun` error means here.
    pub(super) fn of(e: &boringtun::noise::errors::WireGuardError) -> Reason {
        use boringtun::noise::errors::WireGuardError as E;
        match e {
            E::IncorrectPacketLength | E::InvalidPacket => Reason::Malformed,
            E::InvalidMac => Reason::BadMac,
            E::InvalidAeadTag | E::WrongKey => Reason::Decrypt,
            E::InvalidCounter
            | E::DuplicateCounter
            | E::InvalidTai64nTimestamp
            | E::WrongTai64nTimestamp => Reason::Replay,
            E::UnexpectedPacket | E::WrongPacketType | E::WrongIndex => Reason::Handshake,
            E::NoCurrentSession => Reason::NoSession,
            E::ConnectionExpired => Reason::HandshakeTimeout,
            E::UnderLoad => Reason::UnderLoad,
            E::DestinationBufferTooSmall | E::LockFailed => Reason::Internal,
        }
    }
}

/// A count per [`Reason`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct Drops([u64; Reason::ALL.len()]);

impl Drops {
    pub(super) fn add(&mut self, r: Reason) {
        let slot = &mut self.0[r as usize];
        *slot = slot.saturating_add(1);
    }

    pub(super) fn get(&self, r: Reason) -> u64 {
        self.0[r as usize]
    }

    /// The non-zero counts, in label order.
    pub(super) fn nonzero(&self) -> Vec<(Reason, u64)> {
        Reason::ALL
            .into_iter()
            .map(|r| (r, self.get(r)))
            .filter(|&(_, n)| n > 0)
            .collect()
    }
}

/// One peer's state and counters at the time of [`Tunnel::stats`](super::Tunnel::stats).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerStats {
    /// The peer node's name.
    pub name: String,
    /// Its public key.
    pub public_key: PublicKey,
    /// Where datagrams to it are sent.
    pub endpoint: SocketAddr,
    /// Its allowed prefixes (normalized).
    pub allowed_ips: Vec<IpNet>,
    /// IP bytes sent to it through the tunnel (before encryption; keepalives are 0).
    pub tx_bytes: u64,
    /// IP bytes received from it and decrypted.
    pub rx_bytes: u64,
    /// Data messages sent to it (IP packets and keepalives).
    pub tx_packets: u64,
    /// Packets from it delivered to the TUN device.
    pub rx_packets: u64,
    /// Handshakes completed with it (either side initiating).
    pub handshakes: u64,
    /// When the last one completed (the caller's clock, milliseconds).
    pub last_handshake_ms: Option<u64>,
    /// How long ago that was, at the `now` given to `stats`.
    pub handshake_age: Option<Duration>,
    /// Its datagrams and packets dropped, by reason (non-zero counts only, in label order).
    pub errors: Vec<(Reason, u64)>,
}

impl PeerStats {
    /// The count of one drop reason.
    pub fn errors_for(&self, r: Reason) -> u64 {
        self.errors
            .iter()
            .find_map(|&(x, n)| (x == r).then_some(n))
            .unwrap_or(0)
    }
}

/// The whole tunnel at the time of [`Tunnel::stats`](super::Tunnel::stats).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TunnelStats {
    /// This tunnel's public key.
    pub public_key: PublicKey,
    /// Each peer, in table order.
    pub peers: Vec<PeerStats>,
    /// Drops that belong to no known peer (garbage, unknown keys and indices, TUN packets for
    /// no peer), by reason (non-zero counts only).
    pub dropped: Vec<(Reason, u64)>,
}

impl TunnelStats {
    /// The peer with this name.
    pub fn peer(&self, name: &str) -> Option<&PeerStats> {
        self.peers.iter().find(|p| p.name == name)
    }

    /// The count of one reason among the drops that belong to no peer.
    pub fn dropped_for(&self, r: Reason) -> u64 {
        self.dropped
            .iter()
            .find_map(|&(x, n)| (x == r).then_some(n))
            .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_index_their_own_slot_and_have_distinct_labels() {
        for (i, r) in Reason::ALL.into_iter().enumerate() {
            assert_eq!(r as usize, i, "{r:?}");
        }
        let labels: std::collections::BTreeSet<_> =
            Reason::ALL.into_iter().map(Reason::as_str).collect();
        assert_eq!(labels.len(), Reason::ALL.len());
        let mut d = Drops::default();
        d.add(Reason::Replay);
        d.add(Reason::Replay);
        d.add(Reason::Internal);
        assert_eq!(d.nonzero(), [(Reason::Replay, 2), (Reason::Internal, 1)]);
    }
}
