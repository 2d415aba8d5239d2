//! Walks: per workload and direction, every rule a decision may try, in evaluation order, each
//! with a small summary of what it can match. One walk for the NetworkPolicies that select the
//! workload (policy key, then rule), one per admin tier (policy precedence, then rule).
//!
//! A decision used to follow, for each policy of the workload's lists, the policy's slot and
//! then its rule array, and read each rule's ports: one or two cache misses per policy, most of
//! them for rules whose ports could not match the question. A walk is one contiguous array; a
//! decision reads a rule only when the rule's summary admits the question's protocol, port and
//! kind of peer, and when the summary is exact, only the rule's peers.
//!
//! The summary resolves ingress named ports on the local workload's container ports (the
//! workload is known when the walk is built), so it is exact for the common shapes: up to two
//! port ranges, named ports included on ingress. A rule that can match nothing for this
//! workload (every port a name it does not declare) is left out, and so are admin rules that
//! can never be the first match (see [`admin_walk`]).

use std::sync::Arc;

use smallvec::SmallVec;

use crate::compiled::{
    AdminPeer, AdminPeers, AdminPort, CompiledAdmin, PeerMatcher, PeerQuery, PeerSelector,
    PortMatcher, PortQuery, Rule,
};
use crate::model::{ContainerPort, Direction, Peer, Protocol};

use super::{AdminId, PolicyId};

/// The rule has no ports (every port and protocol), or its ports did not fit the summary:
/// the port check passes.
const EVERY_PORT: u8 = 1;
/// The summary holds exactly what the rule's ports match: a decision need not read them.
const PORTS_EXACT: u8 = 2;
/// The rule matches every peer (a NetworkPolicy rule without peers, a fail-closed admin
/// deny-all).
const PEER_EVERY: u8 = 4;
/// The rule has a peer that matches only peers with an identity (pod and namespace selectors).
const PEER_PODS: u8 = 8;
/// The rule has a peer that matches only peers with an address (ipBlock, networks, nodes).
const PEER_IPS: u8 = 16;
/// The rule has a peer that matches only peers with resolved names (domainNames).
const PEER_NAMES: u8 = 32;

/// The question's protocol bit for a protocol without ports, which no summary holds (an
/// unused range has bit 0).
const NO_PORTS: u8 = 0x80;

/// One bit per protocol with ports, for the summaries; `None` for the others, which no policy
/// port names.
fn exact_bit(p: Protocol) -> Option<u8> {
    match p {
        Protocol::Tcp => Some(1),
        Protocol::Udp => Some(2),
        Protocol::Sctp => Some(4),
        Protocol::Other(_) => None,
    }
}

/// What a decision checks a [`RuleStep`] against.
#[derive(Clone, Copy)]
pub(super) struct StepQuery {
    /// [`exact_bit`] of the question's protocol, or [`NO_PORTS`].
    bit: u8,
    port: u16,
    /// The kinds of rule peer that may match this peer: `PEER_EVERY`, with `PEER_PODS` for a
    /// peer with an identity, `PEER_IPS` for one with an address, `PEER_NAMES` for one with
    /// resolved names.
    peer: u8,
}

impl StepQuery {
    pub(super) fn new(q: &PortQuery<'_>, p: &PeerQuery<'_>) -> Self {
        let mut kinds = PEER_EVERY;
        if matches!(p.peer, Peer::Workload(_)) {
            kinds |= PEER_PODS;
        }
        if p.ip.is_some() {
            kinds |= PEER_IPS;
        }
        if !p.names.is_empty() {
            kinds |= PEER_NAMES;
        }
        Self {
            bit: exact_bit(q.protocol).unwrap_or(NO_PORTS),
            port: q.port,
            peer: kinds,
        }
    }
}

/// One rule of a walk and its summary.
#[derive(Clone, Copy, Debug)]
pub(super) struct RuleStep {
    /// The policy: a [`PolicyId`] in a NetworkPolicy walk, an [`AdminId`] in an admin walk.
    pub id: u32,
    /// The rule's index among the policy's rules of the walk's direction.
    pub index: u32,
    /// Protocol bits of up to two port ranges (0: unused).
    bits: [u8; 2],
    flags: u8,
    lo: [u16; 2],
    hi: [u16; 2],
}

/// Builds a [`RuleStep`]: the kinds of peer, then the ports.
struct Summary {
    flags: u8,
    /// The ranges the ports match; `None` once they do not fit the summary.
    ranges: Option<SmallVec<[(u8, u16, u16); 2]>>,
    /// Some port was seen (no port at all: every port and protocol).
    ports: bool,
}

impl Summary {
    fn new() -> Self {
        Self {
            flags: 0,
            ranges: Some(SmallVec::new()),
            ports: false,
        }
    }

    /// Ports `lo..=hi` of protocol `p`.
    fn range(&mut self, p: Protocol, lo: u16, hi: u16) {
        self.ports = true;
        match (self.ranges.as_mut(), exact_bit(p)) {
            (Some(list), Some(bit)) => list.push((bit, lo, hi)),
            _ => self.ranges = None,
        }
    }

    /// A port the summary cannot hold (decided with the question's own data).
    fn coarse(&mut self) {
        self.ports = true;
        self.ranges = None;
    }

    /// A port that matches nothing here (a name the local workload does not declare).
    fn nothing(&mut self) {
        self.ports = true;
    }

    /// The step, or `None` if the rule matches no port.
    fn step(self, id: u32, index: u32) -> Option<RuleStep> {
        let mut step = RuleStep {
            id,
            index,
            bits: [0; 2],
            flags: self.flags,
            lo: [0; 2],
            hi: [0; 2],
        };
        if !self.ports {
            step.flags |= EVERY_PORT | PORTS_EXACT;
            return Some(step);
        }
        match self.ranges {
            Some(list) if list.is_empty() => return None,
            Some(list) if list.len() <= 2 => {
                step.flags |= PORTS_EXACT;
                for (i, (bit, lo, hi)) in list.into_iter().enumerate() {
                    if let (Some(b), Some(l), Some(h)) =
                        (step.bits.get_mut(i), step.lo.get_mut(i), step.hi.get_mut(i))
                    {
                        (*b, *l, *h) = (bit, lo, hi);
                    }
                }
            }
            _ => step.flags |= EVERY_PORT,
        }
        Some(step)
    }
}

impl RuleStep {
    /// A NetworkPolicy rule, or `None` if it can match nothing. `local_ports`: the local
    /// workload's container ports on ingress (named ports are resolved on them), `None` on
    /// egress (the destination's name comes with each question).
    fn np(
        id: PolicyId,
        index: u32,
        rule: &Rule,
        local_ports: Option<&[ContainerPort]>,
    ) -> Option<Self> {
        let mut s = Summary::new();
        if rule.peers.is_empty() {
            s.flags |= PEER_EVERY;
        }
        for p in &rule.peers {
            s.flags |= match p {
                PeerMatcher::Pods { .. } => PEER_PODS,
                PeerMatcher::IpBlock { .. } => PEER_IPS,
            };
        }
        for port in &rule.ports {
            match port {
                PortMatcher::AnyPort(p) => s.range(*p, 0, u16::MAX),
                PortMatcher::Range(p, lo, hi) => s.range(*p, *lo, *hi),
                // What `PortMatcher::matches` looks for on ingress: a container port of this
                // name, protocol and number.
                PortMatcher::Named(p, name) => match local_ports {
                    Some(ports) => {
                        s.nothing();
                        for cp in ports {
                            if cp.protocol == *p && cp.name.as_deref() == Some(name.as_str()) {
                                s.range(*p, cp.port, cp.port);
                            }
                        }
                    }
                    None => s.coarse(),
                },
            }
        }
        s.step(id, index)
    }

    /// An admin rule, or `None` if it can match nothing (as [`RuleStep::np`]).
    fn admin(
        id: AdminId,
        index: u32,
        rule: &crate::compiled::AdminRule,
        local_ports: Option<&[ContainerPort]>,
    ) -> Option<Self> {
        let mut s = Summary::new();
        match &rule.peers {
            AdminPeers::Nothing => return None,
            AdminPeers::Everything => s.flags |= PEER_EVERY,
            AdminPeers::Any(list) => {
                for p in list {
                    s.flags |= match p {
                        AdminPeer::Namespaces(_) | AdminPeer::Pods { .. } => PEER_PODS,
                        AdminPeer::Networks(_) | AdminPeer::Nodes(_) => PEER_IPS,
                        AdminPeer::DomainNames(_) => PEER_NAMES,
                    };
                }
            }
        }
        for port in &rule.ports {
            match port {
                AdminPort::Range(p, lo, hi) => s.range(*p, *lo, *hi),
                // What `AdminPort::matches` looks for on ingress: a container port of this
                // name, whatever its protocol.
                AdminPort::Named(name) => match local_ports {
                    Some(ports) => {
                        s.nothing();
                        for cp in ports {
                            if cp.name.as_deref() == Some(name.as_str()) {
                                s.range(cp.protocol, cp.port, cp.port);
                            }
                        }
                    }
                    None => s.coarse(),
                },
            }
        }
        s.step(id, index)
    }

    /// Whether the rule may match (false: it does not).
    #[inline]
    pub(super) fn admits(&self, q: StepQuery) -> bool {
        self.flags & q.peer != 0
            && (self.flags & EVERY_PORT != 0
                || (self.bits[0] == q.bit && self.lo[0] <= q.port && q.port <= self.hi[0])
                || (self.bits[1] == q.bit && self.lo[1] <= q.port && q.port <= self.hi[1]))
    }

    /// An admitted question matches the rule's ports without reading them.
    #[inline]
    pub(super) fn ports_exact(&self) -> bool {
        self.flags & PORTS_EXACT != 0
    }
}

/// The local workload's container ports as a walk of direction `d` resolves named ports on
/// them: on ingress only.
pub(super) fn local_ports(d: usize, ports: &[ContainerPort]) -> Option<&[ContainerPort]> {
    (d == 0).then_some(ports)
}

/// One direction's walk (`d`: 0 ingress, 1 egress) of the NetworkPolicies `ids`, from the
/// rule slab.
pub(super) fn np_walk(
    policy_rules: &[[Option<Arc<[Rule]>>; 2]],
    ids: &[PolicyId],
    d: usize,
    local_ports: Option<&[ContainerPort]>,
) -> Vec<RuleStep> {
    let mut walk = Vec::new();
    for id in ids {
        let Some(rules) = policy_rules
            .get(*id as usize)
            .and_then(|r| r.get(d))
            .and_then(Option::as_deref)
        else {
            continue;
        };
        for (index, rule) in rules.iter().enumerate() {
            let Ok(index) = u32::try_from(index) else {
                break;
            };
            if let Some(step) = RuleStep::np(*id, index, rule, local_ports) {
                walk.push(step);
            }
        }
    }
    walk.shrink_to_fit();
    walk
}

/// One admin walk (one tier, direction index `d`) from its admin list (policies in evaluation
/// order); `seen` is scratch.
///
/// Besides the rules that can match nothing here, a rule is left out when an earlier rule of
/// the walk has the same condition (`AdminRule::cond`: ports and peers): whenever it would
/// match, that earlier rule matched first and ended the walk (any action ends it: Pass ends
/// the tier).
pub(super) fn admin_walk(
    policies: &[Option<CompiledAdmin>],
    ids: &[AdminId],
    d: usize,
    local_ports: Option<&[ContainerPort]>,
    seen: &mut Vec<u32>,
) -> Vec<RuleStep> {
    let direction = if d == 0 {
        Direction::Ingress
    } else {
        Direction::Egress
    };
    seen.clear();
    let mut walk = Vec::new();
    for id in ids {
        let Some(policy) = policies.get(*id as usize).and_then(Option::as_ref) else {
            continue;
        };
        for (index, rule) in policy.rules(direction).iter().enumerate() {
            let Ok(index) = u32::try_from(index) else {
                break;
            };
            // NO_ID (out of ids): never deduplicated. A walk holds tens of conditions: a
            // linear scan beats hashing them.
            if rule.cond != PeerSelector::NO_ID {
                if seen.contains(&rule.cond) {
                    continue;
                }
                seen.push(rule.cond);
            }
            if let Some(step) = RuleStep::admin(*id, index, rule, local_ports) {
                walk.push(step);
            }
        }
    }
    walk.shrink_to_fit();
    walk
}
