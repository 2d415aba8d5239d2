//! The tunnel's state machine: a `boringtun` session per peer, the dispatch of datagrams and
//! packets to them, cryptokey routing, and the counters.

use std::net::SocketAddr;

use boringtun::noise::handshake::parse_handshake_anon;
use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::noise::{Packet, Tunn, TunnResult};
use boringtun::x25519;

use super::stats::Drops;
use super::table::{MAX_PEERS, PeerTable};
use super::{ConfigError, PeerConfig, PeerStats, PublicKey, Reason, StaticSecret, TunnelStats};

/// The largest datagram or packet the tunnel handles (a UDP payload is at most 65,507 bytes,
/// a TUN packet at most 65,535), plus room for the 32 bytes a data message adds.
const BUF_LEN: usize = 65_536 + 64;
/// Data message overhead: type, receiver index, counter (16) and the AEAD tag (16).
const DATA_OVERHEAD: usize = 32;

/// WireGuard message types (the first byte; the next three are zero).
const MSG_INIT: u8 = 1;
const MSG_RESPONSE: u8 = 2;
const MSG_COOKIE: u8 = 3;
const MSG_DATA: u8 = 4;

/// Handshake messages per second, across all peers, before the tunnel answers with cookies
/// instead of doing the Diffie-Hellman work (the value `boringtun`'s own device uses).
const HANDSHAKE_RATE_LIMIT: u64 = 100;

/// Queued packets flushed after a handshake at most (`boringtun` queues 256 per peer).
const MAX_FLUSH: usize = 512;

/// How many names of peers removed with a session [`Tunnel`] remembers (see `ended`); more,
/// and it forgets them all (their peers, if added back, handshake at their next packet).
const MAX_ENDED: usize = 4096;

/// Where the tunnel's output goes: the shell's UDP socket and TUN device (or a test's wire).
pub trait Outputs {
    /// Send `datagram` to `to`; `false` if it could not be sent (counted as
    /// [`Reason::SendFailed`]).
    fn send(&mut self, to: SocketAddr, datagram: &[u8]) -> bool;
    /// Deliver one decrypted IP `packet` to the host; `false` if it could not be (counted as
    /// [`Reason::DeliverFailed`]).
    fn deliver(&mut self, packet: &[u8]) -> bool;
}

/// What [`Tunnel::set_peers`] did, by peer name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerChanges {
    /// Peers with a key that was not in the table: a new session (handshake on first use).
    pub added: Vec<String>,
    /// Peers whose key was in the table: their session, keys and counters are kept, whatever
    /// else changed (name, endpoint, prefixes).
    pub kept: Vec<String>,
    /// Peers whose key is no longer in the table: their session is gone.
    pub removed: Vec<String>,
}

/// One peer's session and counters.
struct Slot {
    /// The 24-bit index of its sessions (`boringtun` puts it in the top bits of each session
    /// index, so a message's receiver index finds the peer).
    index: u32,
    tunn: Box<Tunn>,
    tx_packets: u64,
    rx_packets: u64,
    handshakes: u64,
    last_handshake_ms: Option<u64>,
    /// An initiation was sent since the last completed handshake.
    initiating: bool,
    /// `boringtun` reported the session expired (reported once per expiry).
    expired: bool,
    /// A handshake is to start now, not at the next packet: our key or the peer's changed
    /// while a session was up (see [`Tunnel::start_handshakes`]).
    restart: bool,
    drops: Drops,
}

impl Slot {
    fn handshake_done(&mut self, now: u64) {
        self.handshakes = self.handshakes.saturating_add(1);
        self.last_handshake_ms = Some(now);
        self.initiating = false;
        self.expired = false;
    }

    /// Whether `boringtun` still holds a session with this peer (established, not yet
    /// expired), so that traffic may be flowing in it.
    fn has_session(&self) -> bool {
        self.tunn.time_since_last_handshake().is_some()
    }

    /// Sends a message `boringtun` produced for this peer, counting it.
    fn send(&mut self, out: &mut dyn Outputs, to: SocketAddr, datagram: &[u8]) {
        if !out.send(to, datagram) {
            self.drops.add(Reason::SendFailed);
            return;
        }
        match datagram.first() {
            Some(&MSG_DATA) => self.tx_packets = self.tx_packets.saturating_add(1),
            Some(&MSG_INIT) => self.initiating = true,
            _ => {}
        }
    }

    /// Sends the packets `boringtun` queued while it had no session (after a handshake).
    fn flush(&mut self, out: &mut dyn Outputs, to: SocketAddr, buf: &mut [u8]) {
        for _ in 0..MAX_FLUSH {
            match self.tunn.decapsulate(None, &[], buf) {
                TunnResult::WriteToNetwork(d) => self.send(out, to, d),
                _ => break,
            }
        }
    }
}

/// A WireGuard tunnel to the peer nodes, without I/O: the shell feeds it what the TUN device
/// and the UDP socket read, and a timer tick, and it answers through [`Outputs`].
pub struct Tunnel {
    secret: x25519::StaticSecret,
    public: x25519::PublicKey,
    /// Checks MAC1 (and, under load, the cookie MAC2) of handshake messages before a peer is
    /// looked up, so a flood of them costs a hash each, not a Diffie-Hellman.
    limiter: RateLimiter,
    table: PeerTable,
    /// One per entry of `table.peers()`, same order.
    slots: Vec<Slot>,
    /// Session index (24 bits) to position.
    by_index: ahash::HashMap<u32, usize>,
    /// Names of peers removed from the table while we had a session with them (a key change
    /// removes the old key's peer; a revocation removes it, and the new key adds it back in a
    /// later set): added back, they are handshaken with at once. At most `MAX_ENDED`.
    ended: ahash::HashSet<String>,
    next_index: u32,
    /// Drops that belong to no known peer.
    dropped: Drops,
    buf: Box<[u8]>,
}

impl std::fmt::Debug for Tunnel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tunnel")
            .field("public_key", &self.public_key())
            .field("peers", &self.table.peers())
            .finish_non_exhaustive()
    }
}

impl Tunnel {
    /// A tunnel with this node's `secret` and its first `peers`.
    pub fn new(secret: &StaticSecret, peers: Vec<PeerConfig>) -> Result<Tunnel, ConfigError> {
        let public = x25519::PublicKey::from(&secret.0);
        let mut t = Tunnel {
            secret: secret.0.clone(),
            limiter: RateLimiter::new(&public, HANDSHAKE_RATE_LIMIT),
            public,
            table: PeerTable::default(),
            slots: Vec::new(),
            by_index: ahash::HashMap::default(),
            ended: ahash::HashSet::default(),
            next_index: 0,
            dropped: Drops::default(),
            buf: vec![0u8; BUF_LEN].into_boxed_slice(),
        };
        t.set_peers(peers)?;
        Ok(t)
    }

    /// This tunnel's public key.
    pub fn public_key(&self) -> PublicKey {
        PublicKey(self.public.to_bytes())
    }

    /// The peers in force.
    pub fn table(&self) -> &PeerTable {
        &self.table
    }

    /// Replaces the peer set. A peer whose key was already in the table keeps its session
    /// (established keys, queued packets, counters): changing its endpoint or prefixes does not
    /// interrupt its traffic. A peer whose key changed while we had a session with it (it
    /// rotated its credentials; also in two steps, removed with the session and added back
    /// later) gets a handshake under its new key at once (at [`Tunnel::start_handshakes`]),
    /// rather than at our next packet to it: the packets it queued for us while we refused
    /// its new key then flow without waiting for its retry. An invalid set is refused and the
    /// table in force stays.
    pub fn set_peers(&mut self, peers: Vec<PeerConfig>) -> Result<PeerChanges, ConfigError> {
        let table = PeerTable::new(self.public_key(), peers)?;
        let mut old: ahash::HashMap<PublicKey, (String, Slot)> = self
            .table
            .peers()
            .iter()
            .map(|p| (p.public_key, p.name.clone()))
            .zip(std::mem::take(&mut self.slots))
            .map(|((key, name), slot)| (key, (name, slot)))
            .collect();
        // The slots of the keys that stay, in the new table's order; what is left of `old`
        // leaves the table.
        let kept: Vec<Option<Slot>> = table
            .peers()
            .iter()
            .map(|p| old.remove(&p.public_key).map(|(_, slot)| slot))
            .collect();
        let in_use: ahash::HashSet<u32> = kept.iter().flatten().map(|s| s.index).collect();
        let mut changes = PeerChanges::default();
        // A peer that leaves with a session is remembered, so that its name coming back (now,
        // with a new key, or in a later set) is handshaken with at once.
        for (name, slot) in old.values() {
            if slot.has_session() {
                if self.ended.len() >= MAX_ENDED {
                    self.ended.clear();
                }
                self.ended.insert(name.clone());
            }
        }
        changes.removed = old.into_values().map(|(name, _)| name).collect();
        changes.removed.sort();
        let mut slots = Vec::with_capacity(table.peers().len());
        for (p, kept) in table.peers().iter().zip(kept) {
            if let Some(slot) = kept {
                changes.kept.push(p.name.clone());
                slots.push(slot);
                continue;
            }
            let index = self.allocate_index(&in_use);
            let tunn = Tunn::new(
                self.secret.clone(),
                x25519::PublicKey::from(p.public_key.0),
                None,
                None,
                index,
                None,
            );
            changes.added.push(p.name.clone());
            slots.push(Slot {
                index,
                tunn: Box::new(tunn),
                tx_packets: 0,
                rx_packets: 0,
                handshakes: 0,
                last_handshake_ms: None,
                initiating: false,
                expired: false,
                restart: self.ended.remove(&p.name),
                drops: Drops::default(),
            });
        }
        self.by_index = slots
            .iter()
            .enumerate()
            .map(|(pos, s)| (s.index, pos))
            .collect();
        self.slots = slots;
        self.table = table;
        Ok(changes)
    }

    /// A packet read from the host that the shell could not take apart (a malformed offload
    /// segment): counted as `malformed`, to no peer.
    pub fn count_malformed_from_host(&mut self) {
        self.dropped.add(Reason::Malformed);
    }

    /// Datagrams handed to [`Outputs::send`] that the shell's batch send then could not
    /// send: counted as `send_failed`, to no peer.
    pub fn count_send_failed(&mut self, datagrams: u64) {
        for _ in 0..datagrams {
            self.dropped.add(Reason::SendFailed);
        }
    }

    /// Decrypted packets handed to [`Outputs::deliver`] that the shell's batch write to the
    /// host then failed to write: counted as `deliver_failed`, to no peer.
    pub fn count_deliver_failed(&mut self, packets: u64) {
        for _ in 0..packets {
            self.dropped.add(Reason::DeliverFailed);
        }
    }

    /// Replaces this tunnel's own static key (the node's credentials were rotated). Every
    /// peer's session ends (its keys came from a handshake under the old key). A peer we had a
    /// session with gets a handshake under the new key at once (at
    /// [`Tunnel::start_handshakes`]), which it accepts if it already has our new public key:
    /// its initiations under that key, which we dropped until now, are not retried before
    /// WireGuard's 5 s. Any other peer's handshake starts at our next packet to it. Counters
    /// and peers are kept. Refused, changing nothing, when a peer has the new key. The same
    /// key again changes nothing.
    pub fn set_static_secret(&mut self, secret: &StaticSecret) -> Result<(), ConfigError> {
        let public = x25519::PublicKey::from(&secret.0);
        if public == self.public {
            return Ok(());
        }
        if let Some(p) = self.table.by_key(&PublicKey(public.to_bytes())) {
            return Err(ConfigError::OwnKey(self.table.peers()[p].name.clone()));
        }
        for slot in &mut self.slots {
            slot.restart = slot.has_session();
            slot.tunn.set_static_private(secret.0.clone(), public, None);
            slot.initiating = false;
            slot.expired = false;
        }
        self.limiter = RateLimiter::new(&public, HANDSHAKE_RATE_LIMIT);
        self.secret = secret.0.clone();
        self.public = public;
        Ok(())
    }

    /// Sends the handshake initiations that [`Tunnel::set_peers`] and
    /// [`Tunnel::set_static_secret`] left to start (at most one per peer per change); the
    /// shell calls it after either, and [`Tunnel::tick`] does too.
    pub fn start_handshakes(&mut self, out: &mut dyn Outputs) {
        for (pos, slot) in self.slots.iter_mut().enumerate() {
            if !std::mem::take(&mut slot.restart) {
                continue;
            }
            let endpoint = self.table.peers()[pos].endpoint;
            // Forced: an initiation under the old key may be in progress.
            match slot.tunn.format_handshake_initiation(&mut self.buf, true) {
                TunnResult::WriteToNetwork(d) => slot.send(out, endpoint, d),
                TunnResult::Done => {}
                TunnResult::Err(e) => slot.drops.add(Reason::of(&e)),
                TunnResult::WriteToTunnelV4(..) | TunnResult::WriteToTunnelV6(..) => {
                    slot.drops.add(Reason::Internal)
                }
            }
        }
    }

    /// The next 24-bit index not in `in_use` (nor 0). Indices are not reused soon after a
    /// peer's removal, so a late datagram of its session finds no peer rather than another's.
    fn allocate_index(&mut self, in_use: &ahash::HashSet<u32>) -> u32 {
        // The table holds at most MAX_PEERS peers, so a free index exists.
        for _ in 0..=MAX_PEERS {
            self.next_index = self.next_index % MAX_PEERS as u32 + 1;
            if !in_use.contains(&self.next_index) && !self.by_index.contains_key(&self.next_index) {
                break;
            }
        }
        self.next_index
    }

    /// One IP packet read from the TUN device: encrypted for the peer whose prefixes hold its
    /// destination (or queued while a handshake with it is under way).
    pub fn handle_tun_packet(&mut self, packet: &[u8], out: &mut dyn Outputs) {
        let Some(dst) = Tunn::dst_address(packet) else {
            self.dropped.add(Reason::Malformed);
            return;
        };
        let Some(pos) = self.table.lookup(dst) else {
            self.dropped.add(Reason::NoPeer);
            return;
        };
        let endpoint = self.table.peers()[pos].endpoint;
        let slot = &mut self.slots[pos];
        // `encapsulate` panics on a destination shorter than this.
        if packet.len() + DATA_OVERHEAD > self.buf.len() {
            slot.drops.add(Reason::Oversize);
            return;
        }
        match slot.tunn.encapsulate(packet, &mut self.buf) {
            TunnResult::WriteToNetwork(d) => slot.send(out, endpoint, d),
            // Queued until the handshake completes.
            TunnResult::Done => {}
            TunnResult::Err(e) => slot.drops.add(Reason::of(&e)),
            TunnResult::WriteToTunnelV4(..) | TunnResult::WriteToTunnelV6(..) => {
                slot.drops.add(Reason::Internal)
            }
        }
    }

    /// One datagram read from the UDP socket, from `from`, at `now` (milliseconds, the clock
    /// of the handshake ages). Decrypted packets are delivered only when their source address
    /// belongs to the peer that sent them.
    pub fn handle_datagram(
        &mut self,
        now: u64,
        from: SocketAddr,
        datagram: &[u8],
        out: &mut dyn Outputs,
    ) {
        // `decapsulate` panics on a destination shorter than the datagram.
        if datagram.len() > self.buf.len() {
            self.dropped.add(Reason::Oversize);
            return;
        }
        let pos = match self
            .limiter
            .verify_packet(Some(from.ip()), datagram, &mut self.buf)
        {
            Ok(packet) => {
                match identify(
                    &self.secret,
                    &self.public,
                    &self.table,
                    &self.by_index,
                    &packet,
                ) {
                    Ok(pos) => pos,
                    Err(r) => {
                        self.dropped.add(r);
                        return;
                    }
                }
            }
            Err(TunnResult::WriteToNetwork(cookie)) => {
                self.dropped.add(Reason::UnderLoad);
                // Best effort: a cookie reply that cannot be sent is the sender's retry.
                let _ = out.send(from, cookie);
                return;
            }
            Err(TunnResult::Err(e)) => {
                self.dropped.add(Reason::of(&e));
                return;
            }
            Err(_) => {
                self.dropped.add(Reason::Internal);
                return;
            }
        };
        let kind = datagram.first().copied();
        let endpoint = self.table.peers()[pos].endpoint;
        let slot = &mut self.slots[pos];
        // A data message (or keepalive) that decrypted.
        let mut decrypted = false;
        match slot
            .tunn
            .decapsulate(Some(from.ip()), datagram, &mut self.buf)
        {
            // A keepalive (or a cookie reply).
            TunnResult::Done => decrypted = kind == Some(MSG_DATA),
            TunnResult::Err(e) => slot.drops.add(Reason::of(&e)),
            TunnResult::WriteToNetwork(reply) => {
                let answered = match (kind, reply.first().copied()) {
                    // We answered an initiation, or our initiation was answered (the reply is
                    // the keepalive that confirms the session).
                    (Some(MSG_INIT), Some(MSG_RESPONSE)) => {
                        slot.handshake_done(now);
                        true
                    }
                    (Some(MSG_RESPONSE), Some(MSG_DATA)) => {
                        slot.handshake_done(now);
                        false
                    }
                    (_, Some(MSG_COOKIE)) => {
                        slot.drops.add(Reason::UnderLoad);
                        false
                    }
                    _ => false,
                };
                slot.send(out, from, reply);
                // A session we answered carries nothing before the initiator's keepalive:
                // a queued packet tried now would only go back to the end of the queue.
                if !answered {
                    slot.flush(out, endpoint, &mut self.buf);
                }
            }
            TunnResult::WriteToTunnelV4(packet, src) => {
                deliver(slot, pos, &self.table, src.into(), packet, out);
                decrypted = true;
            }
            TunnResult::WriteToTunnelV6(packet, src) => {
                deliver(slot, pos, &self.table, src.into(), packet, out);
                decrypted = true;
            }
        }
        // The first data message (or keepalive) in a session we answered confirms it:
        // `boringtun` sends in that session only from then on, so the packets queued while
        // there was none go now, not at the next handshake. Otherwise the queue is empty and
        // this is one check.
        if decrypted {
            let slot = &mut self.slots[pos];
            slot.flush(out, endpoint, &mut self.buf);
        }
    }

    /// The protocol timers, to call every ~250 ms: handshake retransmission and rekeying,
    /// keepalives, session expiry; and the handshake rate limit's reset (each second).
    pub fn tick(&mut self, out: &mut dyn Outputs) {
        self.limiter.reset_count();
        self.start_handshakes(out);
        for (pos, slot) in self.slots.iter_mut().enumerate() {
            let endpoint = self.table.peers()[pos].endpoint;
            match slot.tunn.update_timers(&mut self.buf) {
                TunnResult::Done => slot.expired = false,
                TunnResult::WriteToNetwork(d) => {
                    slot.expired = false;
                    slot.send(out, endpoint, d);
                }
                TunnResult::Err(boringtun::noise::errors::WireGuardError::ConnectionExpired) => {
                    // Expiry after idleness is normal; after unanswered initiations it is the
                    // handshake timing out (and its queued packets are dropped).
                    if !slot.expired && slot.initiating {
                        slot.drops.add(Reason::HandshakeTimeout);
                    }
                    slot.expired = true;
                    slot.initiating = false;
                }
                TunnResult::Err(e) => slot.drops.add(Reason::of(&e)),
                TunnResult::WriteToTunnelV4(..) | TunnResult::WriteToTunnelV6(..) => {
                    slot.drops.add(Reason::Internal)
                }
            }
        }
    }

    /// Every peer's counters and the tunnel's own drops; handshake ages at `now` (milliseconds,
    /// the clock given to [`Tunnel::handle_datagram`]).
    pub fn stats(&self, now: u64) -> TunnelStats {
        let peers = self
            .table
            .peers()
            .iter()
            .zip(&self.slots)
            .map(|(p, s)| {
                let (_, tx_bytes, rx_bytes, _, _) = s.tunn.stats();
                PeerStats {
                    name: p.name.clone(),
                    public_key: p.public_key,
                    endpoint: p.endpoint,
                    allowed_ips: p.allowed_ips.clone(),
                    tx_bytes: tx_bytes as u64,
                    rx_bytes: rx_bytes as u64,
                    tx_packets: s.tx_packets,
                    rx_packets: s.rx_packets,
                    handshakes: s.handshakes,
                    last_handshake_ms: s.last_handshake_ms,
                    handshake_age: s
                        .last_handshake_ms
                        .map(|t| std::time::Duration::from_millis(now.saturating_sub(t))),
                    errors: s.drops.nonzero(),
                }
            })
            .collect();
        TunnelStats {
            public_key: self.public_key(),
            peers,
            dropped: self.dropped.nonzero(),
        }
    }
}

/// The position of the peer a verified message belongs to: an initiation by the static key
/// it carries (which costs a Diffie-Hellman: MAC1 was checked first), anything else by the
/// peer index in its receiver index.
fn identify(
    secret: &x25519::StaticSecret,
    public: &x25519::PublicKey,
    table: &PeerTable,
    by_index: &ahash::HashMap<u32, usize>,
    packet: &Packet<'_>,
) -> Result<usize, Reason> {
    let receiver = match packet {
        Packet::HandshakeInit(p) => {
            let half = parse_handshake_anon(secret, public, p).map_err(|_| Reason::UnknownKey)?;
            return table
                .by_key(&PublicKey(half.peer_static_public))
                .ok_or(Reason::UnknownKey);
        }
        Packet::HandshakeResponse(p) => p.receiver_idx,
        Packet::PacketCookieReply(p) => p.receiver_idx,
        Packet::PacketData(p) => p.receiver_idx,
    };
    by_index
        .get(&(receiver >> 8))
        .copied()
        .ok_or(Reason::UnknownIndex)
}

/// Cryptokey routing: a packet decrypted from the peer at `pos` is delivered only if its
/// source address is in that peer's prefixes (the lookup of the source gives the same peer).
fn deliver(
    slot: &mut Slot,
    pos: usize,
    table: &PeerTable,
    src: std::net::IpAddr,
    packet: &[u8],
    out: &mut dyn Outputs,
) {
    if table.lookup(src) != Some(pos) {
        slot.drops.add(Reason::DisallowedSource);
    } else if out.deliver(packet) {
        slot.rx_packets = slot.rx_packets.saturating_add(1);
    } else {
        slot.drops.add(Reason::DeliverFailed);
    }
}

#[cfg(test)]
mod tests;
