//! A NetworkPolicy after validation and defaulting, in the shape decisions need: selectors
//! pre-parsed, CIDRs as `ipnet`, port ranges as numbers, named ports with their protocol.

use std::net::IpAddr;
use std::sync::Arc;

use compact_str::CompactString;
use ipnet::IpNet;
use smallvec::SmallVec;

use crate::model::{
    AdminAction, AdminKind, AdminPolicyKey, AdminWarning, ContainerPort, Direction, Labels, Peer,
    PolicyKey, Protocol, Tier,
};
use crate::nodes::NodeInventory;
use crate::selector::Selector;

/// Which namespaces a pod peer looks in.
#[derive(Clone, Debug)]
pub(crate) enum NsScope {
    /// `podSelector` alone: the policy's own namespace.
    Own(CompactString),
    /// `namespaceSelector` (alone or with `podSelector`): namespaces whose labels match.
    Matching(Selector),
}

/// One entry of `from` / `to`.
#[derive(Clone, Debug)]
#[allow(
    clippy::large_enum_variant,
    reason = "inline on purpose: a decision reads the selectors without following a pointer"
)]
pub(crate) enum PeerMatcher {
    Pods { namespaces: NsScope, pods: Selector },
    IpBlock { cidr: IpNet, except: Vec<IpNet> },
}

impl PeerMatcher {
    #[inline]
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
    Named(Protocol, CompactString),
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
    #[inline]
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
///
/// The common shapes (one peer, up to two ports) are stored inline, so that the rules of a
/// policy are one contiguous array a decision reads without following pointers.
#[derive(Clone, Debug, Default)]
pub(crate) struct Rule {
    pub peers: SmallVec<[PeerMatcher; 1]>,
    pub ports: SmallVec<[PortMatcher; 2]>,
}

impl Rule {
    #[inline]
    pub(crate) fn matches(&self, peer: &Peer, peer_ip: Option<IpAddr>, q: &PortQuery<'_>) -> bool {
        (self.ports.is_empty() || self.ports.iter().any(|p| p.matches(q)))
            && self.peers_match(peer, peer_ip)
    }

    /// The peer half of [`Rule::matches`].
    #[inline]
    pub(crate) fn peers_match(&self, peer: &Peer, peer_ip: Option<IpAddr>) -> bool {
        self.peers.is_empty() || self.peers.iter().any(|m| m.matches(peer, peer_ip))
    }
}

/// A validated, defaulted and compiled NetworkPolicy.
#[derive(Clone, Debug)]
pub(crate) struct CompiledPolicy {
    pub key: PolicyKey,
    pub pod_selector: Selector,
    /// `None`: the policy does not apply to ingress (`Ingress` not in policyTypes).
    /// `Some(empty)`: isolates and allows nothing. Shared with the engine's dense rule slab
    /// (`Engine::policy_rules`), which is what decisions read.
    pub ingress: Option<Arc<[Rule]>>,
    pub egress: Option<Arc<[Rule]>>,
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

/// The label selector of an admin peer, and the engine-wide id of its content: identical
/// selectors (in any rule of any admin policy) share one id, so that one decision evaluates each
/// at most once per label set (see [`SelectorMemo`]). [`PeerSelector::NO_ID`] (never memoized)
/// until the engine interns it.
#[derive(Clone, Debug)]
pub(crate) struct PeerSelector {
    pub selector: Selector,
    pub id: u32,
}

/// Equal when the selectors are: the id is where the engine keeps it, not what it matches.
impl PartialEq for PeerSelector {
    fn eq(&self, other: &Self) -> bool {
        self.selector == other.selector
    }
}

impl Eq for PeerSelector {}

impl std::hash::Hash for PeerSelector {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.selector.hash(state);
    }
}

impl PeerSelector {
    /// Not interned: evaluated every time.
    pub(crate) const NO_ID: u32 = u32::MAX;
    /// Ids at or above this are not memoized (the memo key needs two more bits).
    pub(crate) const MAX_ID: u32 = u32::MAX >> 2;

    pub(crate) fn new(selector: Selector) -> Self {
        Self {
            selector,
            id: Self::NO_ID,
        }
    }
}

/// Which label set of the peer a selector is matched against (part of the memo key).
#[derive(Clone, Copy)]
pub(crate) enum LabelSet {
    Namespace = 0,
    Pod = 1,
    /// The labels of the nodes that hold the peer's address (a `nodes` peer).
    Node = 2,
}

/// The peer of one decision, as admin peers see it.
#[derive(Clone, Copy)]
pub(crate) struct PeerQuery<'a> {
    pub peer: &'a Peer,
    /// The peer's address: `networks` and `nodes` peers match it.
    pub ip: Option<IpAddr>,
    /// Egress: the names the local workload resolved to `ip` (`domainNames` peers match them).
    pub names: &'a [&'a str],
    /// Where `nodes` peers look `ip` up.
    pub nodes: &'a NodeInventory,
}

/// Per decision: the results of the interned peer selectors already evaluated against this
/// peer's labels (or, for `nodes` peers, the labels of the nodes holding its address). A small
/// direct-mapped cache on the stack (no allocation); a collision only costs a re-evaluation.
/// Valid for one peer only.
pub(crate) struct SelectorMemo {
    keys: [u32; Self::SLOTS],
    results: u64,
}

impl SelectorMemo {
    const SLOTS: usize = 64;

    pub(crate) fn new() -> Self {
        Self {
            keys: [u32::MAX; Self::SLOTS],
            results: 0,
        }
    }

    pub(crate) fn matches(&mut self, s: &PeerSelector, set: LabelSet, labels: &Labels) -> bool {
        self.cached(s, set, || s.selector.matches(labels))
    }

    /// Whether `ip` is an address of a node whose labels `s` selects.
    pub(crate) fn matches_node(
        &mut self,
        s: &PeerSelector,
        ip: &IpAddr,
        nodes: &NodeInventory,
    ) -> bool {
        self.cached(s, LabelSet::Node, || nodes.selects(ip, &s.selector))
    }

    fn cached(&mut self, s: &PeerSelector, set: LabelSet, eval: impl FnOnce() -> bool) -> bool {
        if s.id >= PeerSelector::MAX_ID {
            return eval();
        }
        // Below u32::MAX (the empty slot) since id < MAX_ID.
        let key = (s.id << 2) | set as u32;
        // Consecutive ids of one label set take every other slot, as they did before nodes
        // peers: a node selector shares the slot of the next id's namespace selector.
        let slot = ((s.id << 1) as usize + set as usize) % Self::SLOTS;
        if self.keys.get(slot) == Some(&key) {
            return self.results & (1 << slot) != 0;
        }
        let result = eval();
        if let Some(k) = self.keys.get_mut(slot) {
            *k = key;
            if result {
                self.results |= 1 << slot;
            } else {
                self.results &= !(1 << slot);
            }
        }
        result
    }
}

/// One entry of `from` / `to` that the engine can decide.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) enum AdminPeer {
    /// Every (non-host-network) pod of the matching namespaces.
    Namespaces(PeerSelector),
    /// Pods matching both selectors.
    Pods {
        namespaces: PeerSelector,
        pods: PeerSelector,
    },
    /// Any peer whose address is in one of the CIDRs (pods included).
    Networks(Vec<IpNet>),
    /// Any peer whose address is an address of a node whose labels match (whatever the peer:
    /// a host-network pod, a node, or anything else at that address).
    Nodes(PeerSelector),
    /// Any peer one of whose resolved names matches one of the patterns (never empty).
    DomainNames(Vec<DomainPattern>),
}

impl AdminPeer {
    fn matches(&self, p: &PeerQuery<'_>, memo: &mut SelectorMemo) -> bool {
        match self {
            AdminPeer::Namespaces(ns) => matches!(
                p.peer,
                Peer::Workload(id) if memo.matches(ns, LabelSet::Namespace, &id.namespace_labels)
            ),
            AdminPeer::Pods { namespaces, pods } => matches!(
                p.peer,
                Peer::Workload(id)
                    if memo.matches(namespaces, LabelSet::Namespace, &id.namespace_labels)
                        && memo.matches(pods, LabelSet::Pod, &id.labels)
            ),
            AdminPeer::Networks(nets) => {
                p.ip.is_some_and(|ip| nets.iter().any(|n| n.contains(&ip)))
            }
            AdminPeer::Nodes(sel) => p.ip.is_some_and(|ip| memo.matches_node(sel, &ip, p.nodes)),
            AdminPeer::DomainNames(patterns) => DomainPattern::any_matches(patterns, p.names),
        }
    }

    /// Without the memo: the reference evaluation the optimized one must agree with (nodes by
    /// a scan of every node, names by a plain reading of the API's examples).
    #[cfg(test)]
    fn matches_plain(&self, p: &PeerQuery<'_>) -> bool {
        match self {
            AdminPeer::Namespaces(ns) => {
                matches!(p.peer, Peer::Workload(id) if ns.selector.matches(&id.namespace_labels))
            }
            AdminPeer::Pods { namespaces, pods } => matches!(
                p.peer,
                Peer::Workload(id) if namespaces.selector.matches(&id.namespace_labels)
                    && pods.selector.matches(&id.labels)
            ),
            AdminPeer::Networks(nets) => {
                p.ip.is_some_and(|ip| nets.iter().any(|n| n.contains(&ip)))
            }
            AdminPeer::Nodes(sel) => p.ip.is_some_and(|ip| {
                p.nodes
                    .iter()
                    .any(|n| n.addresses.contains(&ip) && sel.selector.matches(&n.labels))
            }),
            AdminPeer::DomainNames(patterns) => p.names.iter().any(|name| {
                let name = name.to_ascii_lowercase();
                let name = name.strip_suffix('.').unwrap_or(&name);
                patterns.iter().any(|pat| match pat.wildcard {
                    false => name == &*pat.domain,
                    true => {
                        name.split_once('.')
                            .is_some_and(|(first, _)| !first.is_empty())
                            && name.ends_with(&format!(".{}", pat.domain))
                    }
                })
            }),
        }
    }

    fn selectors(&self) -> impl Iterator<Item = &PeerSelector> {
        let (a, b) = match self {
            AdminPeer::Namespaces(ns) | AdminPeer::Nodes(ns) => (Some(ns), None),
            AdminPeer::Pods { namespaces, pods } => (Some(namespaces), Some(pods)),
            AdminPeer::Networks(_) | AdminPeer::DomainNames(_) => (None, None),
        };
        a.into_iter().chain(b)
    }

    fn selectors_mut(&mut self) -> impl Iterator<Item = &mut PeerSelector> {
        let (a, b) = match self {
            AdminPeer::Namespaces(ns) | AdminPeer::Nodes(ns) => (Some(ns), None),
            AdminPeer::Pods { namespaces, pods } => (Some(namespaces), Some(pods)),
            AdminPeer::Networks(_) | AdminPeer::DomainNames(_) => (None, None),
        };
        a.into_iter().chain(b)
    }
}

/// One entry of `domainNames`, normalized: lowercase, without the trailing dot, and for a
/// wildcard without its `*.`.
///
/// The API (`DomainName` in `policy.networking.k8s.io` v1alpha1 and v1alpha2): a name matches
/// exactly; `*.` matches one or more entire labels in front of the rest, so `*.kubernetes.io`
/// matches `www.kubernetes.io` and `latest.blog.kubernetes.io` but not `kubernetes.io`. DNS
/// names compare case-insensitively and a trailing dot only says the name is absolute, so
/// neither changes what matches.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) struct DomainPattern {
    /// The exact name, or the domain under which a wildcard matches.
    pub domain: Box<str>,
    /// `*.` prefix: one or more labels in front of `domain`.
    pub wildcard: bool,
}

impl DomainPattern {
    /// `s` as written in a policy, already validated against the API's pattern.
    pub(crate) fn parse(s: &str) -> Self {
        let (wildcard, rest) = match s.strip_prefix("*.") {
            Some(rest) => (true, rest),
            None => (false, s),
        };
        let rest = rest.strip_suffix('.').unwrap_or(rest);
        Self {
            domain: rest.to_ascii_lowercase().into(),
            wildcard,
        }
    }

    /// Whether `name` (a resolved name: lowercase, no trailing dot, though neither is relied
    /// upon) matches. No allocation.
    pub(crate) fn matches(&self, name: &str) -> bool {
        let name = name.strip_suffix('.').unwrap_or(name).as_bytes();
        let domain = self.domain.as_bytes();
        if !self.wildcard {
            return name.eq_ignore_ascii_case(domain);
        }
        // `<one or more labels>.<domain>`: at least one byte, then a dot, then the domain.
        let Some(split) = name.len().checked_sub(domain.len() + 1) else {
            return false;
        };
        split > 0
            && name.get(split) == Some(&b'.')
            && name
                .get(split + 1..)
                .is_some_and(|tail| tail.eq_ignore_ascii_case(domain))
    }

    fn any_matches(patterns: &[DomainPattern], names: &[&str]) -> bool {
        names
            .iter()
            .any(|name| patterns.iter().any(|p| p.matches(name)))
    }
}

/// Which peers a rule matches.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
#[allow(
    clippy::large_enum_variant,
    reason = "inline on purpose: a decision reads the first peer without following a pointer"
)]
pub(crate) enum AdminPeers {
    /// Any of these (never empty; one is stored inline).
    Any(SmallVec<[AdminPeer; 1]>),
    /// No peer: an Allow rule with a peer the engine cannot decide (fails closed).
    Nothing,
    /// Every peer: a Deny or Pass rule with a peer the engine cannot decide, turned into a
    /// deny-all rule (fails closed).
    Everything,
}

/// One entry of `ports` (v1alpha1) / `protocols` (v1alpha2).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) enum AdminPort {
    /// Inclusive range (a single port is `lo == hi`).
    Range(Protocol, u16, u16),
    /// A container port name of the destination, whatever protocol it is declared with.
    Named(CompactString),
}

impl AdminPort {
    #[inline]
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
    /// Up to two inline, as [`Rule`]'s.
    pub ports: SmallVec<[AdminPort; 2]>,
    /// The rule was rewritten to fail closed.
    pub fail_closed: bool,
    /// The engine-wide id of what the rule matches (`peers` and `ports`; rules that match
    /// the same traffic share it), [`PeerSelector::NO_ID`] until the engine interns it. In one
    /// walk, a rule whose condition an earlier rule had can never be the first match.
    pub cond: u32,
}

impl AdminRule {
    /// Ports first: integer comparisons rule most rules out before any label lookup.
    pub(crate) fn matches(
        &self,
        p: &PeerQuery<'_>,
        q: &PortQuery<'_>,
        memo: &mut SelectorMemo,
    ) -> bool {
        (self.ports.is_empty() || self.ports.iter().any(|port| port.matches(q)))
            && self.peers_match(p, memo)
    }

    /// The peer half of [`AdminRule::matches`].
    pub(crate) fn peers_match(&self, p: &PeerQuery<'_>, memo: &mut SelectorMemo) -> bool {
        match &self.peers {
            AdminPeers::Any(list) => list.iter().any(|m| m.matches(p, memo)),
            AdminPeers::Nothing => false,
            AdminPeers::Everything => true,
        }
    }

    /// The rule as written, without memo or prefilter: the reference evaluation.
    #[cfg(test)]
    pub(crate) fn matches_plain(&self, p: &PeerQuery<'_>, q: &PortQuery<'_>) -> bool {
        (self.ports.is_empty() || self.ports.iter().any(|port| port.matches(q)))
            && match &self.peers {
                AdminPeers::Any(list) => list.iter().any(|m| m.matches_plain(p)),
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
    /// Shared with the engine's dense admin rule slab (`Engine::admin_rules`), which is what
    /// decisions read.
    pub ingress: Arc<[AdminRule]>,
    pub egress: Arc<[AdminRule]>,
    pub warnings: Vec<AdminWarning>,
}

impl CompiledAdmin {
    pub(crate) fn rules(&self, direction: Direction) -> &[AdminRule] {
        match direction {
            Direction::Ingress => &self.ingress,
            Direction::Egress => &self.egress,
        }
    }

    /// The rules of both directions, for writing (copied first if shared).
    pub(crate) fn rules_mut(&mut self) -> impl Iterator<Item = &mut AdminRule> {
        Arc::make_mut(&mut self.ingress)
            .iter_mut()
            .chain(Arc::make_mut(&mut self.egress).iter_mut())
    }

    /// The rules of both directions.
    pub(crate) fn all_rules(&self) -> impl Iterator<Item = &AdminRule> {
        self.ingress.iter().chain(self.egress.iter())
    }

    /// Every selector of every peer of every rule (not the subject's).
    pub(crate) fn peer_selectors(&self) -> impl Iterator<Item = &PeerSelector> {
        self.all_rules()
            .flat_map(|r| match &r.peers {
                AdminPeers::Any(list) => list.as_slice(),
                AdminPeers::Nothing | AdminPeers::Everything => &[],
            })
            .flat_map(AdminPeer::selectors)
    }

    /// Every selector of every peer of every rule (not the subject's), for writing.
    pub(crate) fn peer_selectors_mut(&mut self) -> impl Iterator<Item = &mut PeerSelector> {
        self.rules_mut()
            .flat_map(|r| match &mut r.peers {
                AdminPeers::Any(list) => list.as_mut_slice(),
                AdminPeers::Nothing | AdminPeers::Everything => &mut [],
            })
            .flat_map(AdminPeer::selectors_mut)
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

#[cfg(test)]
mod tests {
    use super::DomainPattern;

    fn matches(pattern: &str, name: &str) -> bool {
        DomainPattern::parse(pattern).matches(name)
    }

    /// The examples of the API's `DomainName` documentation (v1alpha1 and v1alpha2).
    #[test]
    fn domain_names_as_the_api_documents_them() {
        assert!(matches("kubernetes.io", "kubernetes.io"));
        for other in [
            "www.kubernetes.io",
            "blog.kubernetes.io",
            "my-kubernetes.io",
            "wikipedia.org",
        ] {
            assert!(!matches("kubernetes.io", other), "{other}");
        }
        assert!(matches("blog.kubernetes.io", "blog.kubernetes.io"));
        assert!(!matches("blog.kubernetes.io", "www.kubernetes.io"));
        assert!(!matches("blog.kubernetes.io", "kubernetes.io"));
        for sub in [
            "www.kubernetes.io",
            "blog.kubernetes.io",
            "latest.blog.kubernetes.io",
        ] {
            assert!(matches("*.kubernetes.io", sub), "{sub}");
        }
        for other in ["kubernetes.io", "wikipedia.org", "my-kubernetes.io"] {
            assert!(!matches("*.kubernetes.io", other), "{other}");
        }
    }

    #[test]
    fn case_and_the_trailing_dot_do_not_matter() {
        assert!(matches("Kubernetes.IO.", "kubernetes.io"));
        assert!(matches("*.Kubernetes.io", "www.kubernetes.io"));
        assert!(matches("kubernetes.io", "KUBERNETES.io."));
        assert!(matches("*.kubernetes.io.", "Www.Kubernetes.Io."));
        // Only one trailing dot is the root; the wildcard needs a whole label.
        assert!(!matches("kubernetes.io", "kubernetes.io.."));
        assert!(!matches("*.kubernetes.io", ".kubernetes.io"));
        assert!(!matches("*.kubernetes.io", "xkubernetes.io"));
        assert!(!matches("*.kubernetes.io", ""));
        assert!(!matches("kubernetes.io", ""));
        // Not a byte-boundary surprise: non-ASCII names match nothing they should not.
        assert!(!matches("*.kubernetes.io", "é.kubernetes.ioé"));
        assert!(matches("*.kubernetes.io", "é.kubernetes.io"));
    }
}
