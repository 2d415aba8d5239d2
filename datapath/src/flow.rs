//! The per-flow handshake table: bounded, expiring, keyed by workload and 5-tuple.

use policy::Protocol;
use std::net::SocketAddr;

use identity::{ClientAwaitingSynAck, ServerAwaitingAck, ServerSynBound, ServerSynReceived};

use crate::bound::SynBinding;
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
    /// Client: SYN sent with `syn_token`; re-sent as is on retransmission, unless it was bound
    /// (`binding`): then the retransmission carries a new, plain SYN, and if that one is
    /// answered, the node ignored the bound one and gets plain SYNs for a while.
    ClientSynSent {
        client: ClientAwaitingSynAck,
        isn: u32,
        syn_token: Box<[u8]>,
        binding: SynBinding,
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
    /// Server: a bound SYN authenticated the client and ingress allowed it; the bound SYN-ACK
    /// is not made yet (`server` is `None` only transiently while it is made).
    ServerBound {
        server: Option<Box<ServerSynBound>>,
        isn: u32,
        syn_token: Box<[u8]>,
    },
    /// Server: the bound SYN-ACK left and marked the flow; no ACK token will come. A SYN on the
    /// tuple again (its answer was lost, or the client starts over) unmarks the flow so the
    /// kernel's next SYN-ACK is queued: it gets `synack_token` again after the same SYN.
    ServerBoundAnswered {
        isn: u32,
        syn_token: Box<[u8]>,
        synack_token: Box<[u8]>,
    },
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
    /// states are its own workload's, not the network's: a full table takes them only from the
    /// workload that holds the most ([`Evictor::choose`]).
    fn evictable(&self) -> bool {
        matches!(
            self,
            FlowState::ServerSynReceived { .. }
                | FlowState::ServerAwaitingAck { .. }
                | FlowState::ServerTokenless { .. }
                | FlowState::ServerBound { .. }
                | FlowState::ServerBoundAnswered { .. }
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
/// for as long as the table takes to fill by half again. When too few flows are evictable, it
/// evicts the older half of the flows of the workload holding the most: a local workload's
/// flood of SYNs costs that workload its own oldest handshakes, not the node's others their
/// connections ([`Evictor::choose`]).
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

    /// Forget the older half of the evictable flows, or else of the flows of the workload that
    /// holds the most (see [`Evictor::choose`]).
    fn evict_older_half(&mut self) {
        let flows = self
            .flows
            .iter()
            .map(|(k, f)| (k, f.state.evictable(), f.seq));
        let Some(cut) = self.evictor.choose(self.max, flows) else {
            return;
        };
        let before = self.flows.len();
        self.flows
            .retain(|k, f| !cut.takes(k, f.state.evictable(), f.seq));
        self.evictor.count(cut, before - self.flows.len());
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

/// When a full table evicts, what, and how many it evicted so far. A pass that evicts frees at
/// least `max / 16`, so passes come at most once per `max / 16` new flows; after a pass that
/// found too little to evict, the next `max / 8` calls give up at once, so a table that cannot
/// make room costs a lookup per new flow, not a pass.
#[derive(Debug, Default)]
pub(crate) struct Evictor {
    holdoff: usize,
    /// Flows evicted so far, by whose they were (`tessera_handshake_flows_evicted_total`).
    pub(crate) evicted: Evicted,
}

/// Flows a full table evicted so far.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Evicted {
    /// The network's: unproven server-side handshakes and lingering authorized flows.
    pub(crate) network: u64,
    /// A workload's own, taken from the workload that held the most.
    pub(crate) workload: u64,
}

/// The flows one eviction pass forgets: those for which [`Cut::takes`] holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Cut {
    /// The evictable flows numbered up to this one.
    Network(u64),
    /// The workload's own (not evictable) flows numbered up to this one.
    Workload(WorkloadId, u64),
}

impl Cut {
    /// Whether the flow of `key`, evictable or not, with insertion number `seq`, goes.
    pub(crate) fn takes(self, key: &FlowKey, evictable: bool, seq: u64) -> bool {
        match self {
            Cut::Network(cut) => evictable && seq <= cut,
            Cut::Workload(w, cut) => !evictable && key.workload == w && seq <= cut,
        }
    }
}

impl Evictor {
    /// For a full table of `max` flows, given as (key, evictable, insertion number): what to
    /// evict, or `None` to refuse the new flow instead.
    ///
    /// First the older half of the evictable flows, which anyone on the network can open and
    /// whose loss costs at most a retransmission. When they are under an eighth of the table,
    /// the older half of the own flows of the workload that holds the most: a workload that
    /// opens more flows than the table holds (a compromised one, flooding SYNs at addresses
    /// that never answer) loses its own oldest handshakes, and the node's other workloads keep
    /// connecting. When no workload holds an eighth either (eight or more workloads busy at
    /// once), refuse. `flows` is not read while holding off.
    pub(crate) fn choose<'a, I>(&mut self, max: usize, flows: I) -> Option<Cut>
    where
        I: Iterator<Item = (&'a FlowKey, bool, u64)> + Clone,
    {
        if self.holdoff > 0 {
            self.holdoff -= 1;
            return None;
        }
        let enough = (max / 8).max(1);
        let network = flows.clone().filter(|f| f.1).map(|f| f.2);
        if let Some(cut) = older_half(network, enough) {
            return Some(Cut::Network(cut));
        }
        let mut held: ahash::HashMap<WorkloadId, usize> = Default::default();
        for (key, _, _) in flows.clone().filter(|f| !f.1) {
            *held.entry(key.workload).or_default() += 1;
        }
        // The one holding the most; of equals, the lowest id (so a pass is reproducible).
        let hog = held
            .into_iter()
            .max_by_key(|&(w, n)| (n, std::cmp::Reverse(w.0)))
            .map(|(w, _)| w);
        if let Some(hog) = hog {
            let own = flows.filter(|f| !f.1 && f.0.workload == hog).map(|f| f.2);
            if let Some(cut) = older_half(own, enough) {
                return Some(Cut::Workload(hog, cut));
            }
        }
        self.holdoff = max / 8;
        None
    }

    /// Count what a pass of `cut` evicted.
    pub(crate) fn count(&mut self, cut: Cut, evicted: usize) {
        match cut {
            Cut::Network(_) => self.evicted.network += evicted as u64,
            Cut::Workload(..) => self.evicted.workload += evicted as u64,
        }
    }
}

/// The median of the insertion numbers `seqs` (the older half is up to it), if there are at
/// least `enough` of them.
fn older_half(seqs: impl Iterator<Item = u64>, enough: usize) -> Option<u64> {
    let mut seqs: Vec<u64> = seqs.collect();
    if seqs.len() < enough {
        return None;
    }
    let middle = (seqs.len() - 1) / 2;
    let (_, &mut cut, _) = seqs.select_nth_unstable(middle);
    Some(cut)
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
    use super::{Cut, Evicted, Evictor, Flow, FlowKey, FlowState, FlowTable};
    use crate::processor::WorkloadId;
    use policy::Protocol;
    use std::net::SocketAddr;

    fn key(workload: u32, port: u16) -> FlowKey {
        FlowKey {
            workload: WorkloadId(workload),
            protocol: Protocol::Tcp,
            local: SocketAddr::from(([10, 0, 0, workload as u8], port)),
            remote: SocketAddr::from(([10, 9, 9, 9], 443)),
        }
    }

    #[test]
    fn the_older_half_goes_and_too_few_evictable_flows_hold_passes_off() {
        let mut e = Evictor::default();
        let k = key(1, 1);
        // 64 flows, 10 evictable (numbers 0..10, in any order): the cut is their median.
        let seqs = [7, 3, 9, 0, 5, 1, 8, 2, 6, 4];
        let flows = seqs.iter().map(|&s| (&k, true, s));
        assert_eq!(e.choose(64, flows), Some(Cut::Network(4)));
        // Under an eighth of the table, and no workload's own flows: no pass, and none for the
        // next 8 calls, which do not even read the flows.
        assert_eq!(
            e.choose(64, [(&k, true, 1), (&k, true, 2)].into_iter()),
            None
        );
        for _ in 0..8 {
            let unread = std::iter::from_fn(|| -> Option<(&FlowKey, bool, u64)> {
                panic!("read while holding off")
            });
            assert_eq!(e.choose(64, unread), None);
        }
        assert_eq!(
            e.choose(64, (0..8).rev().map(|s| (&k, true, s))),
            Some(Cut::Network(3))
        );
        // A table of one.
        assert_eq!(
            Evictor::default().choose(1, [(&k, true, 5)].into_iter()),
            Some(Cut::Network(5))
        );
    }

    /// A full table of client flows: the workload that opened the most loses the older half of
    /// its own, the others keep theirs; with no workload holding an eighth, a new flow is
    /// refused.
    #[test]
    fn a_workload_that_fills_the_table_loses_its_own_older_half() {
        let now = 1_000;
        let client = || Flow::new(FlowState::ClientVerified { server_isn: 1 }, now + 60_000);
        let mut t = FlowTable::new(64, 0);
        // Workload 1 opens 8 flows, workload 2 opens 56: the table is full.
        for port in 0..8 {
            assert!(t.insert(key(1, port), client(), now));
        }
        for port in 0..56 {
            assert!(t.insert(key(2, port), client(), now));
        }
        // One unproven server-side flow is too few to evict.
        t.remove(&key(2, 55));
        assert!(t.insert(
            key(3, 1),
            Flow::new(FlowState::ServerTokenless { isn: 1 }, now + 60_000),
            now
        ));
        // Workload 3's next flow takes room from workload 2's oldest 28 (of its 55).
        assert!(t.insert(key(3, 2), client(), now));
        assert_eq!(
            t.evictor.evicted,
            Evicted {
                network: 0,
                workload: 28
            }
        );
        assert_eq!(t.len(), 64 - 28 + 1);
        assert!((0..8).all(|p| t.live_mut(&key(1, p), now).is_some()));
        assert!((0..28).all(|p| t.live_mut(&key(2, p), now).is_none()));
        assert!((28..55).all(|p| t.live_mut(&key(2, p), now).is_some()));
        assert!(t.live_mut(&key(3, 1), now).is_some());

        // Nine workloads holding 7 flows each, and a tenth: nobody holds an eighth, refuse.
        let mut t = FlowTable::new(64, 0);
        for w in 0..10u32 {
            for port in 0..7 {
                if t.len() < 64 {
                    assert!(t.insert(key(w, port), client(), now));
                }
            }
        }
        assert!(!t.insert(key(11, 1), client(), now));
        assert_eq!(t.evictor.evicted, Evicted::default());
        assert_eq!(t.len(), 64);
    }

    proptest::proptest! {
        /// Any sequence of new flows into a full table of 64: it stays within its bound; a
        /// pass evicts either evictable flows only or one workload's own only, never a flow
        /// younger than one it keeps of the same kind; and it refuses only when both kinds are
        /// under an eighth of the table.
        #[test]
        fn a_full_table_makes_room_by_the_rules(
            flows in proptest::collection::vec((0..10u32, proptest::bool::weighted(0.3)), 1..600)
        ) {
            let now = 1_000;
            let mut t = FlowTable::new(64, 0);
            for (i, (w, evictable)) in flows.into_iter().enumerate() {
                let state = if evictable {
                    FlowState::ServerTokenless { isn: 1 }
                } else {
                    FlowState::ClientVerified { server_isn: 1 }
                };
                let before: Vec<(FlowKey, bool, u64)> =
                    t.flows.iter().map(|(k, f)| (*k, f.state.evictable(), f.seq)).collect();
                let inserted = t.insert(key(w, i as u16), Flow::new(state, now + 60_000), now);
                let gone: Vec<&(FlowKey, bool, u64)> =
                    before.iter().filter(|(k, _, _)| !t.flows.contains_key(k)).collect();
                proptest::prop_assert!(t.len() <= 64);
                if let Some(first) = gone.first() {
                    let (network, owner) = (first.1, first.0.workload);
                    for g in &gone {
                        proptest::prop_assert_eq!(g.1, network);
                        proptest::prop_assert!(network || g.0.workload == owner);
                    }
                    // The kept of the same kind are all younger than the evicted.
                    let newest_gone = gone.iter().map(|g| g.2).max().unwrap_or(0);
                    for (k, f) in &t.flows {
                        let same = f.state.evictable() == network
                            && (network || k.workload == owner);
                        proptest::prop_assert!(!same || f.seq > newest_gone);
                    }
                }
                if !inserted {
                    let evictable = before.iter().filter(|f| f.1).count();
                    let mut own = std::collections::HashMap::new();
                    for f in before.iter().filter(|f| !f.1) {
                        *own.entry(f.0.workload).or_insert(0usize) += 1;
                    }
                    proptest::prop_assert!(evictable < 8);
                    proptest::prop_assert!(own.values().all(|&n| n < 8), "{:?}", own);
                }
            }
        }
    }
}
