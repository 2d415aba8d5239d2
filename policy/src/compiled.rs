//! A NetworkPolicy after validation and defaulting, in the shape decisions need: selectors
//! pre-parsed, CIDRs as `ipnet`, port ranges as numbers, named ports with their protocol.

use std::net::IpAddr;

use ipnet::IpNet;

use crate::model::{
    AdminAction, AdminKind, AdminPolicyKey, AdminWarning, ContainerPort, Direction, Labels, Peer,
    PolicyKey, Protocol, Tier,
};
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

// ----------------------------------------------------------------------------------------------
// Cluster-wide admin policies: one compiled form for ClusterNetworkPolicy (v1alpha2),
// AdminNetworkPolicy and BaselineAdminNetworkPolicy (v1alpha1).
// ----------------------------------------------------------------------------------------------

/// Which pods an admin policy applies to (host-network pods never).
#[derive(Clone, Debug)]
pub(crate) struct AdminSubject {
    pub namespaces: Selector,
    /// `None`: every pod of the matching namespaces.
    pub pods: Option<Selector>,
}

impl AdminSubject {
    pub(crate) fn matches(&self, namespace_labels: &Labels, pod_labels: &Labels) -> bool {
        self.namespaces.matches(namespace_labels)
            && self.pods.as_ref().is_none_or(|p| p.matches(pod_labels))
    }
}

/// One entry of `from` / `to` that the engine can decide.
#[derive(Clone, Debug)]
pub(crate) enum AdminPeer {
    /// Every (non-host-network) pod of the matching namespaces.
    Namespaces(Selector),
    /// Pods matching both selectors.
    Pods {
        namespaces: Selector,
        pods: Selector,
    },
    /// Any peer whose address is in one of the CIDRs (pods included).
    Networks(Vec<IpNet>),
}

impl AdminPeer {
    fn matches(&self, peer: &Peer, peer_ip: Option<IpAddr>) -> bool {
        match self {
            AdminPeer::Namespaces(ns) => {
                matches!(peer, Peer::Workload(id) if ns.matches(&id.namespace_labels))
            }
            AdminPeer::Pods { namespaces, pods } => matches!(
                peer,
                Peer::Workload(id) if namespaces.matches(&id.namespace_labels) && pods.matches(&id.labels)
            ),
            AdminPeer::Networks(nets) => {
                peer_ip.is_some_and(|ip| nets.iter().any(|n| n.contains(&ip)))
            }
        }
    }
}

/// Which peers a rule matches.
#[derive(Clone, Debug)]
pub(crate) enum AdminPeers {
    /// Any of these (never empty).
    Any(Vec<AdminPeer>),
    /// No peer: an Allow rule with a peer the engine cannot decide (fails closed).
    Nothing,
    /// Every peer: a Deny or Pass rule with a peer the engine cannot decide, turned into a
    /// deny-all rule (fails closed).
    Everything,
}

/// One entry of `ports` (v1alpha1) / `protocols` (v1alpha2).
#[derive(Clone, Debug)]
pub(crate) enum AdminPort {
    /// Inclusive range (a single port is `lo == hi`).
    Range(Protocol, u16, u16),
    /// A container port name of the destination, whatever protocol it is declared with.
    Named(String),
}

impl AdminPort {
    fn matches(&self, q: &PortQuery<'_>) -> bool {
        match self {
            AdminPort::Range(p, lo, hi) => *p == q.protocol && (*lo..=*hi).contains(&q.port),
            AdminPort::Named(name) => match q.dest_ports {
                Some(ports) => ports.iter().any(|cp| {
                    cp.port == q.port
                        && cp.protocol == q.protocol
                        && cp.name.as_deref() == Some(name.as_str())
                }),
                None => q.protocol.has_ports() && q.dest_port_name == Some(name.as_str()),
            },
        }
    }
}

/// One admin rule, compiled. `ports` empty: every port and protocol (ICMP and other
/// protocols included).
#[derive(Clone, Debug)]
pub(crate) struct AdminRule {
    pub action: AdminAction,
    pub peers: AdminPeers,
    pub ports: Vec<AdminPort>,
    /// The rule was rewritten to fail closed.
    pub fail_closed: bool,
}

impl AdminRule {
    /// Ports first: integer comparisons rule most rules out before any label lookup.
    pub(crate) fn matches(&self, peer: &Peer, peer_ip: Option<IpAddr>, q: &PortQuery<'_>) -> bool {
        (self.ports.is_empty() || self.ports.iter().any(|p| p.matches(q)))
            && match &self.peers {
                AdminPeers::Any(list) => list.iter().any(|m| m.matches(peer, peer_ip)),
                AdminPeers::Nothing => false,
                AdminPeers::Everything => true,
            }
    }
}

/// A validated and compiled admin policy of any of the three kinds.
#[derive(Clone, Debug)]
pub(crate) struct CompiledAdmin {
    pub key: AdminPolicyKey,
    pub tier: Tier,
    /// `None`: BaselineAdminNetworkPolicy (evaluated after every prioritized Baseline policy).
    pub priority: Option<u16>,
    pub subject: AdminSubject,
    /// Empty: the policy does not affect ingress.
    pub ingress: Vec<AdminRule>,
    pub egress: Vec<AdminRule>,
    pub warnings: Vec<AdminWarning>,
}

impl CompiledAdmin {
    pub(crate) fn rules(&self, direction: Direction) -> &[AdminRule] {
        match direction {
            Direction::Ingress => &self.ingress,
            Direction::Egress => &self.egress,
        }
    }

    /// Evaluation order within a tier: priority (none last), then name, then kind. The API
    /// leaves equal priorities to the implementation; this makes them deterministic.
    pub(crate) fn precedence(&self) -> (u16, &str, AdminKind) {
        (
            self.priority.unwrap_or(u16::MAX),
            self.key.name.as_str(),
            self.key.kind,
        )
    }
}
