//! NetworkPolicy walks: per workload and direction, every rule of the policies that select it,
//! in evaluation order (policy key, then rule), each with a small summary of what it can match.
//!
//! A decision used to follow, for each policy of the workload's list, the policy's slot in the
//! rule slab and then its rule array, and read each rule's ports: one or two cache misses per
//! policy, most of them for rules whose ports could not match the question. The walk is one
//! contiguous array per workload and direction; a decision reads a rule only when the rule's
//! summary admits the question's protocol, port and kind of peer.
//!
//! The summary resolves ingress named ports on the local workload's container ports (the
//! workload is known when the walk is built), so it is exact for the common shapes: up to two
//! port ranges, named ports included on ingress. A rule that can match nothing (every port a
//! name the workload does not declare) is left out.

use std::sync::Arc;

use smallvec::SmallVec;

use crate::compiled::{PeerMatcher, PortMatcher, PortQuery, Rule};
use crate::model::{ContainerPort, Peer, Protocol};

use super::PolicyId;

/// The rule has no ports (every port and protocol), or its ports did not fit the summary:
/// the port check passes.
const EVERY_PORT: u8 = 1;
/// The summary holds exactly what the rule's ports match: a decision need not read them.
const PORTS_EXACT: u8 = 2;
/// The rule has no peers: every peer.
pub(super) const PEER_EVERY: u8 = 4;
/// The rule has a pod peer (matches only peers with an identity).
pub(super) const PEER_PODS: u8 = 8;
/// The rule has an ipBlock peer (matches only peers with an address).
pub(super) const PEER_IPS: u8 = 16;

/// The question's protocol bit for a protocol without ports.
const NO_PORTS: u8 = 0x80;

/// One bit per protocol with ports, for the summaries; `None` for the others, which no
/// NetworkPolicy port names.
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
    /// [`exact_bit`] of the question's protocol; [`NO_PORTS`] for a protocol without ports,
    /// which no summary holds (an unused range has bit 0).
    bit: u8,
    port: u16,
    /// `PEER_EVERY`, with `PEER_PODS` for a peer with an identity and `PEER_IPS` for one
    /// with an address.
    peer: u8,
}

impl StepQuery {
    pub(super) fn new(q: &PortQuery<'_>, peer: &Peer, has_ip: bool) -> Self {
        let mut kinds = PEER_EVERY;
        if matches!(peer, Peer::Workload(_)) {
            kinds |= PEER_PODS;
        }
        if has_ip {
            kinds |= PEER_IPS;
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
    pub id: PolicyId,
    /// The rule's index among the policy's rules of the walk's direction.
    pub index: u32,
    /// Protocol bits of up to two port ranges (0: unused).
    bits: [u8; 2],
    flags: u8,
    lo: [u16; 2],
    hi: [u16; 2],
}

impl RuleStep {
    /// The summary of `rule`, or `None` if it can match nothing. `local_ports`: the local
    /// workload's container ports on ingress (named ports are resolved on them), `None` on
    /// egress (the destination's name comes with each question).
    fn new(
        id: PolicyId,
        index: u32,
        rule: &Rule,
        local_ports: Option<&[ContainerPort]>,
    ) -> Option<Self> {
        let mut step = RuleStep {
            id,
            index,
            bits: [0; 2],
            flags: 0,
            lo: [0; 2],
            hi: [0; 2],
        };
        if rule.peers.is_empty() {
            step.flags |= PEER_EVERY;
        }
        for p in &rule.peers {
            step.flags |= match p {
                PeerMatcher::Pods { .. } => PEER_PODS,
                PeerMatcher::IpBlock { .. } => PEER_IPS,
            };
        }
        if rule.ports.is_empty() {
            step.flags |= EVERY_PORT | PORTS_EXACT;
            return Some(step);
        }
        // The ranges the ports match; `None` once they do not fit the summary.
        let mut ranges: Option<SmallVec<[(u8, u16, u16); 2]>> = Some(SmallVec::new());
        let push = |ranges: &mut Option<SmallVec<[(u8, u16, u16); 2]>>, p: Protocol, lo, hi| match (
            ranges.as_mut(),
            exact_bit(p),
        ) {
            (Some(list), Some(bit)) => list.push((bit, lo, hi)),
            _ => *ranges = None,
        };
        for port in &rule.ports {
            match port {
                PortMatcher::AnyPort(p) => push(&mut ranges, *p, 0, u16::MAX),
                PortMatcher::Range(p, lo, hi) => push(&mut ranges, *p, *lo, *hi),
                PortMatcher::Named(p, name) => match local_ports {
                    // What `PortMatcher::matches` looks for on ingress: a container port of
                    // this name, protocol and number.
                    Some(ports) => {
                        for cp in ports {
                            if cp.protocol == *p && cp.name.as_deref() == Some(name.as_str()) {
                                push(&mut ranges, *p, cp.port, cp.port);
                            }
                        }
                    }
                    None => ranges = None,
                },
            }
        }
        match ranges {
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

/// One direction's walk (`d`: 0 ingress, 1 egress) of the policies `ids`, from the rule slab.
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
            if let Some(step) = RuleStep::new(*id, index, rule, local_ports) {
                walk.push(step);
            }
        }
    }
    walk.shrink_to_fit();
    walk
}
