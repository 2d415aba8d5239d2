//! What the processor remembers of the flows it authorized, so that a later policy, label or
//! namespace change can cut the ones it now denies ([`Processor::recheck`]), and the flows it
//! cut, so that their next packets are answered with a RST instead of passing or being dropped
//! in silence.
//!
//! Once authorized, a flow's packets bypass userspace (connmark), so nothing here learns that a
//! connection ended. Two mechanisms keep the table honest:
//! - a bound ([`ProcessorConfig::max_established`]): the oldest entry is evicted first (counted
//!   in `tessera_established_evicted_total`);
//! - pruning ([`Processor::prune`]): the shell lists the conntrack table of each workload netns
//!   every [`ProcessorConfig::prune_interval_ms`]; an entry older than the listing whose tuple
//!   is absent from it belongs to a connection that is gone (closed connections leave conntrack
//!   after their TIME_WAIT/CLOSE timeouts, at most a few minutes).
//!
//! [`Processor::recheck`]: crate::Processor::recheck
//! [`Processor::prune`]: crate::Processor::prune
//! [`ProcessorConfig::max_established`]: crate::ProcessorConfig::max_established
//! [`ProcessorConfig::prune_interval_ms`]: crate::ProcessorConfig::prune_interval_ms

use std::collections::{HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;

use policy::{Direction, Peer, PodKey, Protocol};

use crate::flow::FlowKey;
use crate::processor::WorkloadId;

/// Why an established flow was cut (metric label of `tessera_flows_cut_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum CutReason {
    /// The local workload is the server and ingress policy now denies the client.
    PolicyIngress,
    /// The local workload is the client and egress policy now denies the server.
    PolicyEgress,
}

impl CutReason {
    /// Metric label: `policy_ingress` / `policy_egress`.
    pub fn as_str(self) -> &'static str {
        match self {
            CutReason::PolicyIngress => "policy_ingress",
            CutReason::PolicyEgress => "policy_egress",
        }
    }
}

/// An established flow that the current policy denies: the processor has forgotten it and
/// answers its next packets with a RST; the shell deletes its conntrack entry in the
/// workload's netns (see [`Cut::conntrack_tuple`]) so those packets reach the queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cut {
    /// The workload (netns) the flow belongs to.
    pub workload: WorkloadId,
    /// The flow's protocol (ports are 0 for a protocol without them).
    pub protocol: Protocol,
    /// The workload's side.
    pub local: SocketAddr,
    /// The peer's side.
    pub remote: SocketAddr,
    /// Ingress: the workload accepted the connection; egress: it opened it.
    pub direction: Direction,
    /// Which policy direction now denies it.
    pub reason: CutReason,
}

impl Cut {
    /// (source, destination) of the flow's conntrack entry in the workload's netns, in the
    /// original direction: the side that opened the connection first.
    pub fn conntrack_tuple(&self) -> (SocketAddr, SocketAddr) {
        match self.direction {
            Direction::Egress => (self.local, self.remote),
            Direction::Ingress => (self.remote, self.local),
        }
    }
}

/// One authorized flow, as the decision saw it.
#[derive(Debug, Clone)]
pub(crate) struct Authorized {
    pub(crate) direction: Direction,
    /// The peer as the policy engine saw it at the handshake (verified claims, or IP-only).
    pub(crate) peer: Arc<Peer>,
    /// The peer's pod (namespace/name from its claims), to re-evaluate it with its current
    /// labels too when the engine knows it.
    pub(crate) peer_pod: Option<Arc<PodKey>>,
    /// Egress only: the destination port's name as the server's SYN-ACK carried it.
    pub(crate) port_name: Option<Box<str>>,
    /// When it was authorized (unix ms).
    pub(crate) since_ms: u64,
    /// Egress only: the names the workload had resolved to the peer's address (DNS, TTL
    /// valid) when the flow was authorized. Re-checks use these: a flow is not cut because
    /// the TTL ran out since, only when policy no longer allows the names.
    pub(crate) resolved_names: Box<[Arc<str>]>,
    /// Insertion number (eviction order).
    seq: u64,
}

impl Authorized {
    pub(crate) fn new(
        direction: Direction,
        peer: Arc<Peer>,
        peer_pod: Option<Arc<PodKey>>,
        port_name: Option<&str>,
        since_ms: u64,
    ) -> Self {
        Authorized {
            direction,
            peer,
            peer_pod,
            port_name: port_name.map(Box::from),
            since_ms,
            resolved_names: Box::default(),
            seq: 0,
        }
    }

    /// With the names the workload had resolved to the peer (see `resolved_names`).
    pub(crate) fn with_names(mut self, names: Box<[Arc<str>]>) -> Self {
        self.resolved_names = names;
        self
    }
}

/// The bounded table of authorized flows. A full table evicts the oldest flow of the workload
/// that holds the most: a workload that opens connections without end (a compromised one, or
/// a busy proxy) takes its own oldest flows out of re-checks, not its neighbours' long-lived
/// ones (which, once forgotten, a policy change could no longer cut).
#[derive(Debug)]
pub(crate) struct EstablishedTable {
    flows: ahash::HashMap<FlowKey, Authorized>,
    /// Per workload: its live entries and their insertion order. Order entries whose `seq` no
    /// longer matches the map are stale (the flow was removed or re-inserted) and skipped;
    /// compacted when they outgrow the live ones.
    shares: ahash::HashMap<WorkloadId, Share>,
    next_seq: u64,
    max: usize,
    pub(crate) evicted: u64,
    pub(crate) pruned: u64,
}

#[derive(Debug, Default)]
struct Share {
    live: usize,
    order: VecDeque<(u64, FlowKey)>,
}

impl EstablishedTable {
    pub(crate) fn new(max: usize) -> Self {
        EstablishedTable {
            flows: Default::default(),
            shares: Default::default(),
            next_seq: 0,
            max,
            evicted: 0,
            pruned: 0,
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.flows.len()
    }

    /// Remember `key`. A key already remembered keeps its entry (and place): a duplicate
    /// authorization (a re-sent SYN-ACK or ACK) is the same connection.
    pub(crate) fn insert(&mut self, key: FlowKey, mut flow: Authorized) {
        if self.max == 0 || self.flows.contains_key(&key) {
            return;
        }
        while self.flows.len() >= self.max {
            if !self.evict_one() {
                break;
            }
        }
        flow.seq = self.next_seq;
        self.next_seq += 1;
        let seq = flow.seq;
        self.flows.insert(key, flow);
        let share = self.shares.entry(key.workload).or_default();
        share.live += 1;
        share.order.push_back((seq, key));
        if share.order.len() > 2 * share.live + 64 {
            let flows = &self.flows;
            share
                .order
                .retain(|(seq, k)| flows.get(k).is_some_and(|f| f.seq == *seq));
        }
    }

    /// Evict the oldest flow of the workload holding the most (of equals, the lowest id).
    fn evict_one(&mut self) -> bool {
        let Some(hog) = self
            .shares
            .iter()
            .max_by_key(|(w, s)| (s.live, std::cmp::Reverse(w.0)))
            .map(|(w, _)| *w)
        else {
            return false;
        };
        let Some(share) = self.shares.get_mut(&hog) else {
            return false;
        };
        let flows = &self.flows;
        let oldest = std::iter::from_fn(|| share.order.pop_front())
            .find(|(seq, k)| flows.get(k).is_some_and(|f| f.seq == *seq));
        match oldest {
            Some((_, key)) => {
                self.flows.remove(&key);
                self.evicted += 1;
                self.forget(hog, 1);
            }
            // Its order held no live entry (cannot happen while `live` counts right).
            None => {
                self.shares.remove(&hog);
            }
        }
        true
    }

    pub(crate) fn remove(&mut self, key: &FlowKey) -> Option<Authorized> {
        let flow = self.flows.remove(key)?;
        self.forget(key.workload, 1);
        Some(flow)
    }

    /// `n` of `id`'s live entries are gone from the map.
    fn forget(&mut self, id: WorkloadId, n: usize) {
        if let Some(share) = self.shares.get_mut(&id) {
            share.live = share.live.saturating_sub(n);
            if share.live == 0 {
                self.shares.remove(&id);
            }
        }
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = (&FlowKey, &Authorized)> {
        self.flows.iter()
    }

    pub(crate) fn remove_workload(&mut self, id: WorkloadId) {
        self.flows.retain(|k, _| k.workload != id);
        self.shares.remove(&id);
    }

    /// Workloads with at least one remembered flow.
    pub(crate) fn workloads(&self) -> Vec<WorkloadId> {
        let mut ids: Vec<WorkloadId> = self.shares.keys().copied().collect();
        ids.sort();
        ids
    }

    /// Forget the flows of `id` authorized before `listed_from_ms` whose tuple is not in
    /// `alive` ((source, destination) pairs of the netns's conntrack entries, either
    /// orientation). Returns how many were forgotten.
    pub(crate) fn prune(
        &mut self,
        id: WorkloadId,
        listed_from_ms: u64,
        alive: &HashSet<(Protocol, SocketAddr, SocketAddr)>,
    ) -> usize {
        let before = self.flows.len();
        self.flows.retain(|k, f| {
            k.workload != id
                || f.since_ms >= listed_from_ms
                || alive.contains(&(k.protocol, k.local, k.remote))
                || alive.contains(&(k.protocol, k.remote, k.local))
        });
        let n = before - self.flows.len();
        self.forget(id, n);
        self.pruned += n as u64;
        n
    }
}

/// What was already sent to each side of a cut flow.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct CutState {
    /// A RST went to the local socket (an INPUT packet was rewritten).
    pub(crate) local_reset: bool,
    /// A RST went to the peer (an OUTPUT packet was rewritten).
    pub(crate) remote_reset: bool,
}

/// Flows cut recently: their next packets become RSTs. Bounded; entries expire.
#[derive(Debug)]
pub(crate) struct CutSet {
    flows: ahash::HashMap<FlowKey, (u64, CutState)>,
    max: usize,
    last_sweep_ms: u64,
}

impl CutSet {
    pub(crate) fn new(max: usize) -> Self {
        CutSet {
            flows: Default::default(),
            max,
            last_sweep_ms: 0,
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.flows.len()
    }

    /// Remember `key` as cut until `deadline_ms`. A full set first drops expired entries; if
    /// it is still full the key is not remembered (returns `false`): its next packets are then
    /// dropped as of an unknown flow instead of being answered with a RST.
    pub(crate) fn insert(&mut self, key: FlowKey, deadline_ms: u64, now_ms: u64) -> bool {
        if self.flows.len() >= self.max && !self.flows.contains_key(&key) {
            self.expire(now_ms);
            if self.flows.len() >= self.max {
                return false;
            }
        }
        self.flows.insert(key, (deadline_ms, CutState::default()));
        true
    }

    /// The state of `key` if it was cut and the mark has not expired.
    pub(crate) fn get_mut(&mut self, key: &FlowKey, now_ms: u64) -> Option<&mut CutState> {
        if self.flows.get(key).is_some_and(|(d, _)| *d < now_ms) {
            self.flows.remove(key);
        }
        self.flows.get_mut(key).map(|(_, s)| s)
    }

    /// Whether `key` was cut and the mark has not expired.
    #[cfg(test)]
    fn contains(&mut self, key: &FlowKey, now_ms: u64) -> bool {
        self.get_mut(key, now_ms).is_some()
    }

    pub(crate) fn remove(&mut self, key: &FlowKey) {
        self.flows.remove(key);
    }

    pub(crate) fn remove_workload(&mut self, id: WorkloadId) {
        self.flows.retain(|k, _| k.workload != id);
    }

    pub(crate) fn expire(&mut self, now_ms: u64) {
        // At most once a second, or once per distinct time when full (a mass cut while full
        // costs one sweep, not one per flow).
        let due = now_ms >= self.last_sweep_ms.saturating_add(1_000)
            || (self.flows.len() >= self.max && now_ms != self.last_sweep_ms);
        if !due {
            return;
        }
        self.last_sweep_ms = now_ms;
        self.flows.retain(|_, (d, _)| *d >= now_ms);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn key(port: u16) -> FlowKey {
        FlowKey {
            protocol: Protocol::Tcp,
            workload: WorkloadId(1),
            local: SocketAddr::from(([10, 0, 0, 1], port)),
            remote: SocketAddr::from(([10, 0, 0, 2], 80)),
        }
    }

    fn entry(since: u64) -> Authorized {
        Authorized::new(Direction::Egress, Arc::new(Peer::IpOnly), None, None, since)
    }

    #[test]
    fn oldest_is_evicted_first_and_counted() {
        let mut t = EstablishedTable::new(3);
        for p in 1..=3 {
            t.insert(key(p), entry(0));
        }
        // A removed entry leaves a stale slot in the order: it must not count as an eviction.
        t.remove(&key(1));
        t.insert(key(4), entry(0));
        assert_eq!(t.evicted, 0);
        t.insert(key(5), entry(0));
        assert_eq!(t.evicted, 1);
        assert!(
            t.remove(&key(2)).is_none(),
            "the oldest live entry goes first"
        );
        assert!(t.remove(&key(3)).is_some());
        assert_eq!(t.len(), 2);
    }

    #[test]
    fn order_queue_stays_bounded_under_churn() {
        let mut t = EstablishedTable::new(4);
        t.insert(key(0), entry(0));
        for p in 1..10_000u16 {
            t.insert(key(p), entry(0));
            t.remove(&key(p));
        }
        let order = t.shares.get(&WorkloadId(1)).map_or(0, |s| s.order.len());
        assert!(order <= 2 + 64 + 1, "{order}");
        t.remove(&key(0));
        assert!(
            t.shares.is_empty(),
            "no share is kept for a workload with nothing left"
        );
    }

    /// A workload that keeps opening connections evicts its own oldest flows, never another's.
    #[test]
    fn a_full_table_evicts_from_the_workload_holding_the_most() {
        let of = |w: u32, port: u16| FlowKey {
            workload: WorkloadId(w),
            ..key(port)
        };
        let mut t = EstablishedTable::new(8);
        t.insert(of(1, 1), entry(0));
        t.insert(of(1, 2), entry(0));
        for p in 0..1000 {
            t.insert(of(2, p), entry(0));
        }
        assert_eq!(t.len(), 8);
        assert_eq!(t.evicted, 1000 - 6);
        assert!(t.remove(&of(1, 1)).is_some() && t.remove(&of(1, 2)).is_some());
        assert!(
            (994..1000).all(|p| t.remove(&of(2, p)).is_some()),
            "its newest"
        );
        // Of equal shares, the lower id gives first.
        let mut t = EstablishedTable::new(2);
        t.insert(of(2, 1), entry(0));
        t.insert(of(1, 1), entry(0));
        t.insert(of(3, 1), entry(0));
        assert!(t.remove(&of(1, 1)).is_none());
        assert!(t.remove(&of(2, 1)).is_some());
    }

    #[test]
    fn prune_keeps_listed_and_recent_flows() {
        let mut t = EstablishedTable::new(16);
        t.insert(key(1), entry(100));
        t.insert(key(2), entry(100));
        t.insert(key(3), entry(500));
        let k1 = key(1);
        // Conntrack lists the server side's orientation: remote -> local.
        let alive = HashSet::from([(k1.protocol, k1.remote, k1.local)]);
        assert_eq!(t.prune(WorkloadId(1), 400, &alive), 1);
        assert!(t.remove(&key(1)).is_some());
        assert!(t.remove(&key(2)).is_none(), "unlisted and older: pruned");
        assert!(
            t.remove(&key(3)).is_some(),
            "authorized after the listing began"
        );
        assert_eq!(t.pruned, 1);
    }

    #[test]
    fn cut_set_is_bounded_and_expires() {
        let mut c = CutSet::new(2);
        assert!(c.insert(key(1), 1_000, 0));
        assert!(c.insert(key(2), 2_000, 0));
        assert!(!c.insert(key(3), 3_000, 0), "full: not remembered");
        assert_eq!(c.len(), 2);
        assert!(c.contains(&key(2), 1_500));
        // Once the first has expired, a full set makes room by sweeping.
        assert!(c.insert(key(3), 3_000, 1_500));
        assert!(!c.contains(&key(1), 1_500));
        assert!(!c.contains(&key(2), 2_001), "expired");
        assert!(c.contains(&key(3), 2_001));
    }

    #[derive(Debug, Clone)]
    enum Op {
        Insert(u32, u16),
        Remove(u32, u16),
        Prune(u32),
    }

    fn op() -> impl proptest::strategy::Strategy<Value = Op> {
        use proptest::prelude::*;
        prop_oneof![
            6 => (0..4u32, 0..32u16).prop_map(|(w, p)| Op::Insert(w, p)),
            2 => (0..4u32, 0..32u16).prop_map(|(w, p)| Op::Remove(w, p)),
            1 => (0..4u32).prop_map(Op::Prune),
        ]
    }

    proptest::proptest! {
        /// Any sequence of inserts, removals and prunes: the table stays within its bound, each
        /// workload's share counts exactly its entries (none kept for a workload without any),
        /// and an insert into a full table takes its room from a workload that held the most.
        #[test]
        fn shares_count_right_and_the_largest_gives_way(ops in proptest::collection::vec(op(), 1..400)) {
            let of = |w: u32, port: u16| FlowKey {
                workload: WorkloadId(w),
                ..key(port)
            };
            let mut t = EstablishedTable::new(8);
            for op in ops {
                let held = |t: &EstablishedTable, w: u32| {
                    t.flows.keys().filter(|k| k.workload == WorkloadId(w)).count()
                };
                match op {
                    Op::Insert(w, p) => {
                        let before: Vec<usize> = (0..4).map(|w| held(&t, w)).collect();
                        let (full, fresh) = (t.len() >= 8, !t.flows.contains_key(&of(w, p)));
                        t.insert(of(w, p), entry(0));
                        if full && fresh {
                            let most = before.iter().copied().max().unwrap_or(0);
                            // What each workload gave: it had `before`, plus the new
                            // entry if it is the inserter's.
                            let gave: Vec<u32> = (0..4u32)
                                .filter(|&v| {
                                    before[v as usize] + usize::from(v == w) == held(&t, v) + 1
                                })
                                .collect();
                            proptest::prop_assert_eq!(gave.len(), 1, "{:?} -> {:?}", before, gave);
                            proptest::prop_assert_eq!(before[gave[0] as usize], most);
                        }
                    }
                    Op::Remove(w, p) => {
                        t.remove(&of(w, p));
                    }
                    Op::Prune(w) => {
                        t.prune(WorkloadId(w), 1, &HashSet::new());
                    }
                }
                proptest::prop_assert!(t.len() <= 8);
                for w in 0..4u32 {
                    let live = t.shares.get(&WorkloadId(w)).map(|s| s.live);
                    let n = held(&t, w);
                    proptest::prop_assert_eq!(live, (n > 0).then_some(n), "workload {}", w);
                }
            }
        }
    }
}
