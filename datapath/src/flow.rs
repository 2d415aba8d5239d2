//! The per-flow handshake table: bounded, expiring, keyed by workload and 5-tuple.

use policy::Protocol;
use std::net::SocketAddr;

use identity::{ClientAwaitingSynAck, ServerAwaitingAck, ServerSynReceived};

use crate::processor::WorkloadId;

/// One TCP flow as seen from one workload: `local` is the workload's address and port,
/// `remote` the peer's (so both directions of a flow map to the same key).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FlowKey {
    /// The enforced workload.
    pub workload: WorkloadId,
    /// The transport protocol (ports are 0 for a protocol without them, e.g. ICMP).
    pub protocol: Protocol,
    /// The workload's side.
    pub local: SocketAddr,
    /// The peer's side.
    pub remote: SocketAddr,
}

/// Handshake state of one flow.
#[derive(Debug)]
pub(crate) enum FlowState {
    /// Client: SYN sent with `syn_token`; re-sent as is on retransmission.
    ClientSynSent {
        client: ClientAwaitingSynAck,
        isn: u32,
        syn_token: Box<[u8]>,
    },
    /// Client: the server's SYN-ACK was verified and egress allowed; the first ACK (and any
    /// duplicate of it) carries `ack_token`.
    ClientAckPending {
        client: ClientAwaitingSynAck,
        /// Our SYN's sequence number.
        isn: u32,
        /// The server's SYN-ACK sequence number: its first packet after the handshake starts
        /// at `server_isn + 1`.
        server_isn: u32,
        synack_token: Box<[u8]>,
        ack_token: Box<[u8]>,
    },
    /// Client: the ACK token left and the flow is marked. Kept for the authorized linger time:
    /// a SYN-ACK re-sent with `synack_token` (the ACK was lost) is stripped and unmarks the
    /// flow, and the duplicate ACK that answers it carries `ack_token` again.
    ClientAckSent {
        isn: u32,
        server_isn: u32,
        synack_token: Box<[u8]>,
        ack_token: Box<[u8]>,
    },
    /// Client: the handshake's own time is over (no SYN-ACK retransmission can still come) but
    /// the server has not sent anything yet, e.g. a pooled connection opened ahead of use. The
    /// client's next packet, or the server's first, marks the flow. Kept for
    /// `client_idle_ms` (see `ProcessorConfig`).
    ClientVerified { server_isn: u32 },
    /// Server: a tokened SYN passed checks and ingress; the SYN-ACK token is not made yet.
    /// `server` is `None` only transiently while the SYN-ACK is made.
    ServerSynReceived {
        server: Option<Box<ServerSynReceived>>,
        isn: u32,
        syn_token: Box<[u8]>,
    },
    /// Server: SYN-ACK sent with `synack_token`; waiting for the ACK token.
    ServerAwaitingAck {
        server: Box<ServerAwaitingAck>,
        isn: u32,
        syn_token: Box<[u8]>,
        synack_token: Box<[u8]>,
        /// Packets without the ACK token sent back to the tail of the queue so far (the
        /// client's data can overtake its ACK token between CPUs); bounded by `MAX_DEFERRALS`.
        deferred: u8,
    },
    /// Server: a token-less SYN from an IP-only peer passed ingress; its SYN-ACK authorizes.
    ServerTokenless { isn: u32 },
    /// Authorized (either side): packets still queued are accepted and marked. `peer_token` is
    /// the last token the peer sent (the ACK token on the server side, the SYN-ACK token on the
    /// client side): a duplicate of it is stripped again, any other token is refused.
    Authorized { peer_token: Option<Box<[u8]>> },
}

#[derive(Debug)]
pub(crate) struct Flow {
    pub(crate) state: FlowState,
    /// Forgotten after this time (unix ms).
    pub(crate) deadline_ms: u64,
    /// Insertion number, set by [`FlowTable::insert`]: a full table evicts the oldest first.
    seq: u64,
}

impl Flow {
    pub(crate) fn new(state: FlowState, deadline_ms: u64) -> Self {
        Flow {
            state,
            deadline_ms,
            seq: 0,
        }
    }
}

impl FlowState {
    /// Whether forgetting this flow before its deadline costs at most a retransmission: the
    /// server's side of a handshake that is not proven yet (anyone can open one: a SYN whose
    /// claims pass ingress, or a token-less SYN to a port open to its address), and an
    /// authorized flow kept only for the packets still queued behind its proof. The client's
    /// states are its own workload's, not the network's, and are never evicted.
    fn evictable(&self) -> bool {
        matches!(
            self,
            FlowState::ServerSynReceived { .. }
                | FlowState::ServerAwaitingAck { .. }
                | FlowState::ServerTokenless { .. }
                | FlowState::Authorized { .. }
        )
    }
}

/// The bounded table.
///
/// A full table first forgets expired flows (at most once a second). If it is still full, it
/// evicts the older half of its evictable flows ([`FlowState::evictable`]): so a flood of SYNs
/// that pass ingress (spoofed sources, forged claims, a public port), or more new flows than the
/// linger time allows, cannot lock the node's workloads out of new connections. A genuine
/// handshake needs its entry for a round trip; it is among the newest and outlives the flood's
/// for as long as the table takes to fill by half again.
#[derive(Debug)]
pub(crate) struct FlowTable {
    flows: ahash::HashMap<FlowKey, Flow>,
    max: usize,
    /// How long a `ClientAckPending` flow is kept as `ClientVerified` after its deadline.
    client_idle_ms: u64,
    /// The next flow's insertion number.
    next_seq: u64,
    /// Last time a full table swept itself (at most once a second, so a SYN flood against a
    /// full table costs no more than a lookup per packet).
    last_sweep_ms: u64,
    pub(crate) evictor: Evictor,
}

impl FlowTable {
    pub(crate) fn new(max: usize, client_idle_ms: u64) -> Self {
        FlowTable {
            flows: Default::default(),
            max,
            client_idle_ms,
            next_seq: 0,
            last_sweep_ms: 0,
            evictor: Evictor::default(),
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.flows.len()
    }

    /// The flow if it exists and has not expired (an expired one is removed).
    pub(crate) fn live_mut(&mut self, key: &FlowKey, now_ms: u64) -> Option<&mut Flow> {
        let idle = self.client_idle_ms;
        let flow = self.flows.get_mut(key)?;
        if lapse(flow, now_ms, idle) {
            return self.flows.get_mut(key);
        }
        self.flows.remove(key);
        None
    }

    /// Whether `key` can be inserted: it exists already, or the table has room (a full table
    /// first sweeps expired flows, at most once a second).
    pub(crate) fn has_room(&mut self, key: &FlowKey, now_ms: u64) -> bool {
        if self.flows.len() < self.max || self.flows.contains_key(key) {
            return true;
        }
        if now_ms >= self.last_sweep_ms.saturating_add(1_000) {
            self.last_sweep_ms = now_ms;
            self.expire(now_ms);
        }
        if self.flows.len() >= self.max {
            self.evict_older_half();
        }
        self.flows.len() < self.max
    }

    /// Forget the older half of the evictable flows (see [`Evictor`]).
    fn evict_older_half(&mut self) {
        let evictable = self.flows.values().filter(|f| f.state.evictable());
        let Some(cut) = self.evictor.cut(self.max, evictable.map(|f| f.seq)) else {
            return;
        };
        let before = self.flows.len();
        self.flows
            .retain(|_, f| !f.state.evictable() || f.seq > cut);
        self.evictor.evicted += (before - self.flows.len()) as u64;
    }

    /// Insert or replace. A new key beyond the bound is refused: returns `false`.
    pub(crate) fn insert(&mut self, key: FlowKey, mut flow: Flow, now_ms: u64) -> bool {
        if !self.has_room(&key, now_ms) {
            return false;
        }
        flow.seq = self.next_seq;
        self.next_seq += 1;
        self.flows.insert(key, flow);
        true
    }

    pub(crate) fn remove(&mut self, key: &FlowKey) -> Option<Flow> {
        self.flows.remove(key)
    }

    pub(crate) fn expire(&mut self, now_ms: u64) {
        let idle = self.client_idle_ms;
        self.flows.retain(|_, f| lapse(f, now_ms, idle));
    }

    pub(crate) fn remove_workload(&mut self, id: WorkloadId) {
        self.flows.retain(|k, _| k.workload != id);
    }
}

/// When a full table evicts, and how many it evicted: the older half of its evictable flows
/// (by insertion number), or nothing when they are under an eighth of the table. After such a
/// pass that found too little, the next `max / 8` calls give up at once: a table full of flows
/// that cannot be evicted costs a lookup per new flow, not a pass. A pass that evicts frees at
/// least `max / 16`, so passes come at most once per `max / 16` new flows.
#[derive(Debug, Default)]
pub(crate) struct Evictor {
    holdoff: usize,
    /// Flows evicted so far (`tessera_handshake_flows_evicted_total`).
    pub(crate) evicted: u64,
}

impl Evictor {
    /// For a full table of `max` flows whose evictable ones have the insertion numbers `seqs`:
    /// the number up to which to evict (their median), or `None` to refuse instead. `seqs` is
    /// not read while holding off.
    pub(crate) fn cut(&mut self, max: usize, seqs: impl Iterator<Item = u64>) -> Option<u64> {
        if self.holdoff > 0 {
            self.holdoff -= 1;
            return None;
        }
        let mut seqs: Vec<u64> = seqs.collect();
        if seqs.len() < (max / 8).max(1) {
            self.holdoff = max / 8;
            return None;
        }
        let middle = (seqs.len() - 1) / 2;
        let (_, &mut cut, _) = seqs.select_nth_unstable(middle);
        Some(cut)
    }
}

/// Apply the passing of time to a flow: `false` if it is to be forgotten. A client flow whose
/// handshake deadline passed while waiting for the server's first packet becomes
/// `ClientVerified` for `client_idle_ms` more.
fn lapse(flow: &mut Flow, now_ms: u64, client_idle_ms: u64) -> bool {
    if flow.deadline_ms >= now_ms {
        return true;
    }
    if let FlowState::ClientAckPending { server_isn, .. } = flow.state {
        flow.state = FlowState::ClientVerified { server_isn };
        flow.deadline_ms = flow.deadline_ms.saturating_add(client_idle_ms);
        return flow.deadline_ms >= now_ms;
    }
    false
}

#[cfg(test)]
mod tests {
    use super::Evictor;

    #[test]
    fn the_older_half_goes_and_too_few_evictable_flows_hold_passes_off() {
        let mut e = Evictor::default();
        // 64 flows, 10 evictable (numbers 0..10, in any order): the cut is their median.
        let seqs = [7, 3, 9, 0, 5, 1, 8, 2, 6, 4];
        assert_eq!(e.cut(64, seqs.iter().copied()), Some(4));
        // Under an eighth of the table: no pass, and none for the next 8 calls, which do not
        // even read the numbers.
        assert_eq!(e.cut(64, [1, 2].into_iter()), None);
        for _ in 0..8 {
            assert_eq!(
                e.cut(64, std::iter::from_fn(|| panic!("read while holding off"))),
                None
            );
        }
        assert_eq!(e.cut(64, (0..8).rev()), Some(3));
        // A table of one.
        assert_eq!(Evictor::default().cut(1, [5].into_iter()), Some(5));
    }
}
