//! A NetworkPolicy after validation and defaulting, in the shape decisions need: selectors
//! pre-parsed, CIDRs as `ipnet`, port ranges as numbers, named ports with their protocol.

use std::net::IpAddr;

use ipnet::IpNet;

use crate::model::{ContainerPort, Direction, Peer, PolicyKey, Protocol};
use crate::selector::Selector;

/// Which namespaces a pod peer looks in.
#[derive(Clone, Debug)]
pub(crate) enum NsScope {
    /// `podSelector` alone: the policy's own namespace.
    Own(String),
    /// `namespaceSelector` (alone or with `podSelector`): namespaces whose labels match.
    Matching(Selector),
}

/// One entry of `from` / `to`.
#[derive(Clone, Debug)]
pub(crate) enum PeerMatcher {
    Pods { namespaces: NsScope, pods: Selector },
    IpBlock { cidr: IpNet, except: Vec<IpNet> },
}

impl PeerMatcher {
    fn matches(&self, peer: &Peer, peer_ip: Option<IpAddr>) -> bool {
        match self {
            PeerMatcher::Pods { namespaces, pods } => {
                let Peer::Workload(id) = peer else {
                    return false;
                };
                let ns_ok = match namespaces {
                    NsScope::Own(ns) => *ns == id.namespace,
                    NsScope::Matching(sel) => sel.matches(&id.namespace_labels),
                };
                ns_ok && pods.matches(&id.labels)
            }
            PeerMatcher::IpBlock { cidr, except } => match peer_ip {
                Some(ip) => cidr.contains(&ip) && !except.iter().any(|e| e.contains(&ip)),
                None => false,
            },
        }
    }
}

/// One entry of `ports`.
#[derive(Clone, Debug)]
pub(crate) enum PortMatcher {
    /// `protocol` only: every port of that protocol.
    AnyPort(Protocol),
    /// `port` (and `endPort`), inclusive.
    Range(Protocol, u16, u16),
    /// A named port, resolved on the destination workload.
    Named(Protocol, String),
}

/// What a port matcher is checked against.
pub(crate) struct PortQuery<'a> {
    pub port: u16,
    pub protocol: Protocol,
    /// Ingress: the local (destination) workload's container ports.
    pub dest_ports: Option<&'a [ContainerPort]>,
    /// Egress: the destination's name for `port`/`protocol`, as the handshake carried it.
    pub dest_port_name: Option<&'a str>,
}

impl PortMatcher {
    fn matches(&self, q: &PortQuery<'_>) -> bool {
        match self {
            PortMatcher::AnyPort(p) => *p == q.protocol,
            PortMatcher::Range(p, lo, hi) => *p == q.protocol && (*lo..=*hi).contains(&q.port),
            PortMatcher::Named(p, name) => {
                if *p != q.protocol {
                    return false;
                }
                if let Some(ports) = q.dest_ports {
                    ports.iter().any(|cp| {
                        cp.port == q.port
                            && cp.protocol == q.protocol
                            && cp.name.as_deref() == Some(name.as_str())
                    })
                } else {
                    q.dest_port_name == Some(name.as_str())
                }
            }
        }
    }
}

/// One ingress or egress rule. Empty `peers` = every peer; empty `ports` = every port.
#[derive(Clone, Debug, Default)]
pub(crate) struct Rule {
    pub peers: Vec<PeerMatcher>,
    pub ports: Vec<PortMatcher>,
}

impl Rule {
    pub(crate) fn matches(&self, peer: &Peer, peer_ip: Option<IpAddr>, q: &PortQuery<'_>) -> bool {
        (self.ports.is_empty() || self.ports.iter().any(|p| p.matches(q)))
            && (self.peers.is_empty() || self.peers.iter().any(|m| m.matches(peer, peer_ip)))
    }
}

/// A validated, defaulted and compiled NetworkPolicy.
#[derive(Clone, Debug)]
pub(crate) struct CompiledPolicy {
    pub key: PolicyKey,
    pub pod_selector: Selector,
    /// `None`: the policy does not apply to ingress (`Ingress` not in policyTypes).
    /// `Some(empty)`: isolates and allows nothing.
    pub ingress: Option<Vec<Rule>>,
    pub egress: Option<Vec<Rule>>,
}

impl CompiledPolicy {
    pub(crate) fn rules(&self, direction: Direction) -> Option<&[Rule]> {
        match direction {
            Direction::Ingress => self.ingress.as_deref(),
            Direction::Egress => self.egress.as_deref(),
        }
    }
}
