//! Authenticated UDP: the state of each UDP flow whose two ends are being (or were) proven to
//! each other, and the datagrams the processor sends itself.
//!
//! UDP has no handshake of its own, so the two agents make one beside the application's
//! datagrams, on the flow's own 5-tuple, with the three tokens of the TCP handshake carried in
//! *control datagrams* (`identity::wire::encode_udp_control`, docs/wire-format.md):
//!
//! ```text
//!  client workload   client agent                     server agent      server workload
//!  D1 (OUTPUT) ───►  hold D1, send SYN ───────────►  verify, ingress on the claims
//!                                        ◄───────────  SYN-ACK (server claims, port name)
//!                    verify, egress on the server's
//!                    proven identity; send ACK ──────► verify: ingress on the proven identity
//!                    release D1.. (AUTH mark) ───────► D1 (INPUT): accept, mark  ──► D1
//! ```
//!
//! When a verified SYN-ACK (of either protocol) already named the node behind the server's
//! address (`crate::bound`), the SYN is *bound* for that node and the flow's source, and two
//! control datagrams do it:
//!
//! ```text
//!  D1 (OUTPUT) ───►  hold D1, send bound SYN ─────►  verify, ingress on the proven client
//!                                        ◄───────────  bound SYN-ACK (AUTH mark: marks the flow)
//!                    verify, egress on the server's
//!                    proven identity
//!                    release D1.. (AUTH mark) ───────► D1 bypasses the agent ──────► D1
//! ```
//!
//! Held datagrams are bounded per flow and in total (overflow is dropped and counted, never
//! passed). A lost SYN or SYN-ACK is recovered by the client's retransmission of its SYN (a
//! bound one is re-sent plain, with a fresh nonce); a
//! lost ACK by the server re-sending its SYN-ACK when the client's data arrives first (the
//! rules queue control datagrams even on marked flows), which the client answers with the same
//! ACK. A peer that never answers has no agent: after a bounded wait the flow is decided on
//! the peer's address, and the peer is remembered as agentless for a while, so that only the
//! first flow to it waits.

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};

use identity::{ClientAwaitingSynAck, ServerAwaitingAck};
use pnet_packet::ip::IpNextHeaderProtocols;
use pnet_packet::udp::{self, MutableUdpPacket, UdpPacket};

use crate::bound::SynBinding;
use crate::flow::{Evictor, FlowKey};
use crate::packet::{IpDatagram, PacketError, write_ip_header};
use crate::processor::WorkloadId;

/// How a datagram the processor emits is marked (see [`Outgoing`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EmitMark {
    /// A control datagram: the rules let it leave without queueing it (the control mark).
    Control,
    /// A held application datagram released after its flow was authorized: the AUTH mark, which
    /// the rules save into the connmark (so the rest of the flow bypasses userspace).
    Authorized,
    /// A control datagram that also marks its flow: the server's bound SYN-ACK, sent once the
    /// bound SYN authorized the client. The control bit lets it leave unqueued, and the AUTH
    /// bit beside it is saved into the connmark on the way out, so the client's datagrams
    /// bypass the server's agent from the first one.
    ControlAuthorized,
}

/// A whole IP packet the processor asks the shell to send from a workload's netns, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outgoing {
    /// The workload (netns) to send it from.
    pub workload: WorkloadId,
    /// The packet, IP header included, checksums valid.
    pub packet: Vec<u8>,
    /// How to mark it.
    pub mark: EmitMark,
}

/// What one UDP flow is waiting for.
#[derive(Debug)]
pub(crate) enum UdpState {
    /// Client: the SYN control left; the application's datagrams wait in `held`.
    ClientHello {
        client: ClientAwaitingSynAck,
        /// The SYN control datagram, re-sent as is (a bound one is re-sent plain, see
        /// `binding`).
        syn: Box<[u8]>,
        /// Whether the SYN is bound (`crate::bound`). A bound SYN that goes unanswered is
        /// re-sent as a plain one with a fresh nonce, as for TCP.
        binding: SynBinding,
        held: Vec<Vec<u8>>,
        /// SYN controls sent so far.
        tries: u8,
        /// When to re-send the SYN (or, after the last try, give up).
        next_ms: u64,
    },
    /// Client: authorized; the SYN-ACK it answered (a re-sent one is answered with `ack`, the
    /// ACK control datagram, again; `None` after a bound SYN-ACK, which no ACK answers).
    ClientDone {
        synack: Box<[u8]>,
        ack: Option<Box<[u8]>>,
    },
    /// Server: the SYN passed and ingress allowed the tentative peer; the SYN-ACK left.
    ServerAwaitingAck {
        /// Boxed: the handshake state is the largest part, and every bucket of the table is
        /// the size of the largest state.
        server: Box<ServerAwaitingAck>,
        /// The SYN token, to recognise a retransmission.
        syn_token: Box<[u8]>,
        /// The SYN-ACK control datagram, re-sent as is.
        synack: Box<[u8]>,
        last_sent_ms: u64,
        /// Times the client's data was sent back to the queue while the ACK was awaited.
        deferrals: u8,
    },
    /// Server: the ACK proved the client and marked the flow; lingers to answer a duplicate ACK
    /// and to accept the client's datagrams that were sent back to the queue before it.
    ServerAuthorized { ack_token: Box<[u8]> },
    /// Server: a bound SYN proved the client, ingress allowed it, and the bound SYN-ACK left
    /// with the AUTH mark (which marked the flow); lingers to answer a duplicate of that SYN
    /// with the same SYN-ACK.
    ServerBoundAnswered {
        syn_token: Box<[u8]>,
        synack: Box<[u8]>,
    },
}

impl UdpState {
    /// Held datagrams and their bytes.
    pub(crate) fn held_use(&self) -> Held {
        match self {
            UdpState::ClientHello { held, .. } => Held {
                count: held.len(),
                bytes: held.iter().map(Vec::len).sum(),
            },
            _ => Held::default(),
        }
    }

    /// Whether a full table may forget this flow early: the server's side, which anyone can
    /// open with a SYN control that ingress admits (as `FlowState::evictable` for TCP). The
    /// client's states are its own workload's doing, and hold its datagrams: a full table takes
    /// them only from the workload that holds the most.
    fn evictable(&self) -> bool {
        matches!(
            self,
            UdpState::ServerAwaitingAck { .. }
                | UdpState::ServerAuthorized { .. }
                | UdpState::ServerBoundAnswered { .. }
        )
    }
}

/// One UDP flow and when to forget it.
#[derive(Debug)]
pub(crate) struct UdpFlow {
    pub(crate) state: UdpState,
    pub(crate) deadline_ms: u64,
    /// Insertion number, set by [`UdpTable::insert`]: a full table evicts the oldest first.
    seq: u64,
}

impl UdpFlow {
    pub(crate) fn new(state: UdpState, deadline_ms: u64) -> Self {
        UdpFlow {
            state,
            deadline_ms,
            seq: 0,
        }
    }
}

/// Datagrams held, and their bytes.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Held {
    /// Datagrams.
    pub count: usize,
    /// Their bytes (whole IP packets).
    pub bytes: usize,
}

impl Held {
    fn add(&mut self, n: Held, sign: isize) {
        self.count = self.count.saturating_add_signed(sign * n.count as isize);
        self.bytes = self.bytes.saturating_add_signed(sign * n.bytes as isize);
    }
}

/// How much the agent holds while UDP handshakes run (see `ProcessorConfig::udp_held`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeldLimits {
    /// Over all workloads.
    pub total: Held,
    /// Of one workload.
    pub per_workload: Held,
}

impl Default for HeldLimits {
    /// 1,024 datagrams and 4 MiB in all, 256 datagrams and 1 MiB per workload: a datagram
    /// queued before fragmentation can be a 64 KiB packet, and 1,024 of those would be 64 MiB.
    fn default() -> Self {
        HeldLimits {
            total: Held {
                count: 1024,
                bytes: 4 << 20,
            },
            per_workload: Held {
                count: 256,
                bytes: 1 << 20,
            },
        }
    }
}

/// What the processor learned of peer addresses: where an agent proved itself (a verified
/// SYN-ACK or ACK token, or a REFUSED echoing our nonce), and where nothing but a plain
/// datagram answered, each until a deadline.
///
/// Two maps, because forgetting means opposite things. Forgetting an agentless address costs
/// a handshake attempt (175 ms) at most, so that map is small and starts over when full.
/// Forgetting an agent would let a plain datagram with its address be decided on the address
/// (`udp_unauthenticated` is how it is refused), so that map is large, and only proven agents
/// fill it: a workload talking to thousands of agentless addresses (or a compromised one doing
/// it on purpose) does not make the agent forget which peers have agents.
#[derive(Debug, Default)]
pub(crate) struct PeerAgents {
    agents: ahash::HashMap<IpAddr, u64>,
    agentless: ahash::HashMap<IpAddr, u64>,
}

/// Addresses with a proven agent remembered at most (expired ones go first, then all).
const AGENT_ENTRIES: usize = 65_536;
/// Agentless addresses remembered before that map starts over.
const AGENTLESS_ENTRIES: usize = 4096;

impl PeerAgents {
    /// Whether an agent answers at `ip` (`Some(true)`), does not (`Some(false)`), or nothing
    /// is known at `now_ms`.
    pub(crate) fn get(&self, ip: &IpAddr, now_ms: u64) -> Option<bool> {
        if self.agents.get(ip).is_some_and(|until| *until > now_ms) {
            Some(true)
        } else if self.agentless.get(ip).is_some_and(|until| *until > now_ms) {
            Some(false)
        } else {
            None
        }
    }

    /// Remember whether an agent answers at `ip`, until `until_ms` (what was known before of
    /// `ip` goes).
    pub(crate) fn learn(&mut self, ip: IpAddr, agent: bool, now_ms: u64, until_ms: u64) {
        let (into, other, bound) = if agent {
            (&mut self.agents, &mut self.agentless, AGENT_ENTRIES)
        } else {
            (&mut self.agentless, &mut self.agents, AGENTLESS_ENTRIES)
        };
        other.remove(&ip);
        if into.len() >= bound && !into.contains_key(&ip) {
            into.retain(|_, until| *until > now_ms);
            if into.len() >= bound {
                into.clear();
            }
        }
        into.insert(ip, until_ms);
    }

    /// Forget what expired by `now_ms`.
    pub(crate) fn expire(&mut self, now_ms: u64) {
        self.agents.retain(|_, until| *until > now_ms);
        self.agentless.retain(|_, until| *until > now_ms);
    }
}

/// The bounded table of UDP flows in handshake (or just authorized), with the count of held
/// datagrams over all of them and the client handshakes' timers in time order (so the next one
/// is found without walking the table, which holds thousands of flows under load).
#[derive(Debug, Default)]
pub(crate) struct UdpTable {
    flows: ahash::HashMap<FlowKey, UdpFlow>,
    timers: BTreeSet<(u64, FlowKey)>,
    held: Held,
    /// Of `held`, each workload's (no entry for none).
    held_by: ahash::HashMap<WorkloadId, Held>,
    next_seq: u64,
    pub(crate) evictor: Evictor,
}

impl UdpTable {
    pub(crate) fn len(&self) -> usize {
        self.flows.len()
    }

    pub(crate) fn get(&self, key: &FlowKey) -> Option<&UdpFlow> {
        self.flows.get(key)
    }

    /// The flow, to change its state in place; a client handshake's `next_ms` must then be
    /// changed through [`UdpTable::reschedule`] only.
    pub(crate) fn get_mut(&mut self, key: &FlowKey) -> Option<&mut UdpFlow> {
        self.flows.get_mut(key)
    }

    /// Whether a new flow fits under `max`. A full table first evicts the older half of its
    /// server-side flows, or else of the client flows of the workload holding the most (see
    /// [`Evictor::choose`]), so neither a flood of SYN controls that ingress admits nor a local
    /// workload opening flows without end can lock the node out of new UDP flows.
    pub(crate) fn has_room(&mut self, max: usize) -> bool {
        if self.flows.len() < max {
            return true;
        }
        let flows = self
            .flows
            .iter()
            .map(|(k, f)| (k, f.state.evictable(), f.seq));
        if let Some(cut) = self.evictor.choose(max, flows) {
            let before = self.flows.len();
            self.retain(|k, f| !cut.takes(k, f.state.evictable(), f.seq));
            self.evictor.count(cut, before - self.flows.len());
        }
        self.flows.len() < max
    }

    /// Whether workload `w` may hold one more datagram of `len` bytes: within `limits` over
    /// all flows, and within their per-workload share for `w` (so one workload opening flows
    /// without end cannot take the room of the node's others).
    pub(crate) fn may_hold(&self, w: WorkloadId, len: usize, limits: &HeldLimits) -> bool {
        let mine = self.held_by.get(&w).copied().unwrap_or_default();
        self.held.count < limits.total.count
            && self.held.bytes + len <= limits.total.bytes
            && mine.count < limits.per_workload.count
            && mine.bytes + len <= limits.per_workload.bytes
    }

    /// Count `n` more datagrams held for workload `w` (or fewer: `sign` -1).
    pub(crate) fn count_held(&mut self, w: WorkloadId, n: Held, sign: isize) {
        if n.count == 0 {
            return;
        }
        self.held.add(n, sign);
        let mine = self.held_by.entry(w).or_default();
        mine.add(n, sign);
        if mine.count == 0 {
            self.held_by.remove(&w);
        }
    }

    /// Add (or replace) a flow. Held datagrams of the replaced one, if any, are dropped.
    pub(crate) fn insert(&mut self, key: FlowKey, mut flow: UdpFlow) {
        self.remove(&key);
        flow.seq = self.next_seq;
        self.next_seq += 1;
        if let UdpState::ClientHello { next_ms, .. } = flow.state {
            self.timers.insert((next_ms, key));
        }
        self.count_held(key.workload, flow.state.held_use(), 1);
        self.flows.insert(key, flow);
    }

    /// Move a client handshake's timer to `next_ms`.
    pub(crate) fn reschedule(&mut self, key: &FlowKey, next_ms: u64) {
        if let Some(UdpFlow {
            state: UdpState::ClientHello { next_ms: at, .. },
            ..
        }) = self.flows.get_mut(key)
        {
            self.timers.remove(&(*at, *key));
            *at = next_ms;
            self.timers.insert((next_ms, *key));
        }
    }

    /// When the first client handshake timer is due.
    pub(crate) fn next_timer(&self) -> Option<u64> {
        self.timers.first().map(|(t, _)| *t)
    }

    /// The client handshakes whose timer is due at `now_ms`.
    pub(crate) fn due(&self, now_ms: u64) -> Vec<FlowKey> {
        self.timers
            .iter()
            .take_while(|(t, _)| *t <= now_ms)
            .map(|(_, k)| *k)
            .collect()
    }

    pub(crate) fn remove(&mut self, key: &FlowKey) -> Option<UdpFlow> {
        let f = self.flows.remove(key)?;
        if let UdpState::ClientHello { next_ms, .. } = f.state {
            self.timers.remove(&(next_ms, *key));
        }
        self.count_held(key.workload, f.state.held_use(), -1);
        Some(f)
    }

    /// Forget flows past their deadline (held datagrams go with them: they were never passed);
    /// returns how many held datagrams were dropped.
    pub(crate) fn expire(&mut self, now_ms: u64) -> usize {
        self.retain(|_, f| f.deadline_ms > now_ms)
    }

    pub(crate) fn remove_workload(&mut self, id: WorkloadId) {
        self.retain(|k, _| k.workload != id);
    }

    fn retain(&mut self, keep: impl Fn(&FlowKey, &UdpFlow) -> bool) -> usize {
        let gone: Vec<FlowKey> = self
            .flows
            .iter()
            .filter(|(k, f)| !keep(k, f))
            .map(|(k, _)| *k)
            .collect();
        let mut dropped = 0;
        for k in gone {
            if let Some(f) = self.remove(&k) {
                dropped += f.state.held_use().count;
            }
        }
        dropped
    }
}

/// The UDP payload of a parsed UDP packet (bounded by the UDP length field and the IP length).
pub(crate) fn udp_payload<'p>(packet: &'p [u8], d: &IpDatagram) -> Result<&'p [u8], PacketError> {
    let seg = packet
        .get(d.l4_start..d.ip_len)
        .ok_or(PacketError::Truncated)?;
    let udp = UdpPacket::new(seg).ok_or(PacketError::Truncated)?;
    let len = udp.get_length() as usize;
    if len < 8 || len > seg.len() {
        return Err(PacketError::Truncated);
    }
    Ok(&seg[8..len])
}

/// A UDP datagram from `src` to `dst` carrying `payload`, with valid IPv4 header and UDP
/// checksums (hop limit 64).
pub(crate) fn build_udp(
    src: SocketAddr,
    dst: SocketAddr,
    payload: &[u8],
) -> Result<Vec<u8>, PacketError> {
    let udp_len = u16::try_from(8 + payload.len()).map_err(|_| PacketError::TooLarge)?;
    let ip_len = if src.is_ipv4() { 20 } else { 40 };
    let mut buf = vec![0u8; ip_len + udp_len as usize];
    {
        let mut u = MutableUdpPacket::new(&mut buf[ip_len..]).ok_or(PacketError::Truncated)?;
        u.set_source(src.port());
        u.set_destination(dst.port());
        u.set_length(udp_len);
        u.set_payload(payload);
    }
    write_ip_header(&mut buf, src.ip(), dst.ip(), IpNextHeaderProtocols::Udp)?;
    set_udp_checksum(&mut buf, ip_len)?;
    Ok(buf)
}

/// Recompute the UDP checksum of a UDP packet whose transport header is at `l4_start` (a held
/// datagram may carry only the pseudo-header sum of checksum offload).
pub(crate) fn set_udp_checksum(packet: &mut [u8], l4_start: usize) -> Result<(), PacketError> {
    let (src, dst) = match IpDatagram::parse(packet)? {
        d if d.l4_start == l4_start => (d.src, d.dst),
        _ => return Err(PacketError::OptionState("UDP header not where expected")),
    };
    let seg = packet.get_mut(l4_start..).ok_or(PacketError::Truncated)?;
    let mut u = MutableUdpPacket::new(seg).ok_or(PacketError::Truncated)?;
    u.set_checksum(0);
    let sum = match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => udp::ipv4_checksum(&u.to_immutable(), &s, &d),
        (IpAddr::V6(s), IpAddr::V6(d)) => udp::ipv6_checksum(&u.to_immutable(), &s, &d),
        _ => return Err(PacketError::OptionState("mixed address families")),
    };
    // 0 means "no checksum" in IPv4 and is forbidden in IPv6: a computed 0 is sent as 0xffff.
    u.set_checksum(if sum == 0 { 0xffff } else { sum });
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn agents_are_remembered_apart_from_agentless_addresses() {
        let ip = |n: u32| IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + n));
        let mut p = PeerAgents::default();
        p.learn(ip(1), true, 0, 100);
        // Far more agentless addresses than that map holds: it starts over, the agent stays.
        for n in 2..3 * AGENTLESS_ENTRIES as u32 {
            p.learn(ip(n), false, 0, 100);
        }
        assert_eq!(p.get(&ip(1), 50), Some(true));
        assert!(p.agentless.len() <= AGENTLESS_ENTRIES);
        // What is learnt of an address replaces what was known of it.
        p.learn(ip(1), false, 50, 100);
        assert_eq!(p.get(&ip(1), 60), Some(false));
        p.learn(ip(1), true, 60, 100);
        assert_eq!(p.get(&ip(1), 70), Some(true));
        // Deadlines.
        assert_eq!(p.get(&ip(1), 100), None);
        p.expire(100);
        assert!(p.agents.is_empty() && p.agentless.is_empty());
        // A full map of agents drops its expired ones first.
        for n in 0..AGENT_ENTRIES as u32 {
            p.learn(ip(n), true, 0, if n == 7 { 10 } else { 1000 });
        }
        p.learn(ip(AGENT_ENTRIES as u32), true, 20, 1000);
        assert_eq!(p.agents.len(), AGENT_ENTRIES);
        assert_eq!(p.get(&ip(0), 30), Some(true));
    }

    #[test]
    fn built_datagrams_parse_back_with_their_payload() {
        for (s, d) in [
            ("10.0.1.2:40000", "10.0.2.2:53"),
            ("[fd00::1:2]:40000", "[fd00::2:2]:53"),
        ] {
            let (s, d): (SocketAddr, SocketAddr) = (s.parse().unwrap(), d.parse().unwrap());
            let p = build_udp(s, d, b"hello").unwrap();
            let parsed = IpDatagram::parse(&p).unwrap();
            assert_eq!((parsed.src, parsed.dst), (s.ip(), d.ip()));
            assert_eq!(
                (parsed.src_port, parsed.dst_port, parsed.protocol),
                (40000, 53, 17)
            );
            assert_eq!(udp_payload(&p, &parsed).unwrap(), b"hello");
            // The checksum verifies: recomputing it changes nothing.
            let mut q = p.clone();
            set_udp_checksum(&mut q, parsed.l4_start).unwrap();
            assert_eq!(p, q);
        }
    }

    #[test]
    fn a_udp_length_past_the_packet_is_an_error() {
        let s: SocketAddr = "10.0.1.2:1".parse().unwrap();
        let d: SocketAddr = "10.0.2.2:2".parse().unwrap();
        let mut p = build_udp(s, d, b"abc").unwrap();
        p[24..26].copy_from_slice(&200u16.to_be_bytes());
        let parsed = IpDatagram::parse(&p).unwrap();
        assert_eq!(udp_payload(&p, &parsed), Err(PacketError::Truncated));
        p[24..26].copy_from_slice(&4u16.to_be_bytes());
        assert_eq!(udp_payload(&p, &parsed), Err(PacketError::Truncated));
    }
}
