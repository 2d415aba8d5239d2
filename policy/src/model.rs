//! The vocabulary of decisions: workloads, peers, ports, verdicts and their reasons.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;

/// Labels as Kubernetes has them: sorted, unique keys.
pub type Labels = BTreeMap<String, String>;

/// The protocol of a connection. TCP, UDP and SCTP are the ones NetworkPolicy names in `ports`;
/// they never match each other.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
    /// Any other IP protocol, by its number (ICMP = 1, ICMPv6 = 58, GRE = 47, ...). NetworkPolicy
    /// has no way to name it in `ports`, so only a rule without `ports` (every port and
    /// protocol) matches it: a workload isolated for a direction receives (or sends) no ICMP
    /// unless such a rule allows the peer. Never built for 6, 17 or 132 (see [`Protocol::from_ip`]).
    Other(u8),
}

impl Protocol {
    /// ICMP (IPv4).
    pub const ICMP: Protocol = Protocol::Other(1);
    /// ICMPv6.
    pub const ICMPV6: Protocol = Protocol::Other(58);

    /// The protocol of an IP packet's protocol (IPv4) or final next-header (IPv6) number.
    pub fn from_ip(number: u8) -> Protocol {
        match number {
            6 => Protocol::Tcp,
            17 => Protocol::Udp,
            132 => Protocol::Sctp,
            n => Protocol::Other(n),
        }
    }

    /// The IP protocol number.
    pub fn ip_number(self) -> u8 {
        match self {
            Protocol::Tcp => 6,
            Protocol::Udp => 17,
            Protocol::Sctp => 132,
            Protocol::Other(n) => n,
        }
    }

    /// Whether connections of this protocol have ports (TCP, UDP, SCTP).
    pub fn has_ports(self) -> bool {
        !matches!(self, Protocol::Other(_))
    }
}

/// Which side of the connection the local workload is on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Direction {
    /// The peer connects to the local workload (the local workload is the destination).
    Ingress,
    /// The local workload connects to the peer (the local workload is the source).
    Egress,
}

/// `namespace/name` of a pod or workload.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PodKey {
    pub namespace: String,
    pub name: String,
}

/// `namespace/name` of a NetworkPolicy.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PolicyKey {
    pub namespace: String,
    pub name: String,
}

/// Name of a namespace.
pub type NamespaceKey = String;

/// A port a container declares (`spec.containers[].ports[]`): what named ports resolve against.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ContainerPort {
    pub name: Option<String>,
    pub port: u16,
    pub protocol: Protocol,
}

/// A workload the engine knows: a pod, a Docker container, or an entry of a static inventory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Workload {
    pub key: PodKey,
    pub labels: Labels,
    pub ports: Vec<ContainerPort>,
    pub ips: Vec<IpAddr>,
    /// hostNetwork workloads are never policy targets, and as peers they are IP-only endpoints.
    pub host_network: bool,
}

/// A cluster node as admin `nodes` peers see it: its name, its labels, and the addresses that
/// identify it as a peer. From a Kubernetes Node object: `metadata.name`, `metadata.labels` and
/// the `status.addresses` of type `InternalIP` and `ExternalIP` (see
/// [`crate::Engine::apply_node_object`]); in static mode, from the node inventory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Node {
    /// A DNS-1123 subdomain, as Kubernetes node names are.
    pub name: String,
    pub labels: Labels,
    /// Unicast addresses, IPv4 or IPv6 (a repeated one is kept once).
    pub addresses: Vec<IpAddr>,
}

/// A peer's identity as the handshake proved it (or as the engine knows it, offline).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkloadIdentity {
    pub namespace: String,
    /// The namespace's labels, including `kubernetes.io/metadata.name`.
    pub namespace_labels: Labels,
    pub labels: Labels,
}

/// The other end of a connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Peer {
    /// An enforced workload whose identity was verified. Pod/namespace selectors and ipBlocks
    /// (against its IP) can match it.
    Workload(WorkloadIdentity),
    /// Known only by its IP: external, host network, a node without agent. Only ipBlocks match
    /// it (and admin `networks` peers; `nodes` peers when its IP is a node's address,
    /// `domainNames` peers when the local workload resolved a name to it).
    IpOnly,
}

/// One decision's question.
#[derive(Clone, Debug)]
pub struct Connection<'a> {
    /// The local workload, which must be known to the engine.
    pub local: &'a PodKey,
    pub direction: Direction,
    pub peer: &'a Peer,
    /// The peer's IP, matched against ipBlocks. `None`: no ipBlock can match.
    pub peer_ip: Option<IpAddr>,
    /// Destination port number.
    pub port: u16,
    pub protocol: Protocol,
    /// Egress only: the name of `port`/`protocol` among the destination workload's container
    /// ports, as the destination's handshake carried it (or as known offline). Named ports in
    /// egress rules match only through this. Ignored for ingress, where the engine resolves names
    /// on the local workload.
    pub dest_port_name: Option<&'a str>,
    /// Egress only: the domain names (lowercase, without the trailing dot) that the local
    /// workload resolved to `peer_ip` through DNS and whose answer's TTL has not run out, as the
    /// datapath learnt them from the answers the workload received. Admin `domainNames` peers
    /// match only through this; empty: the address was never resolved, nothing matches.
    pub resolved_names: &'a [&'a str],
}

/// Where a rule lives: the policy, the direction and the index in `spec.ingress` / `spec.egress`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct RuleRef {
    pub policy: PolicyKey,
    pub direction: Direction,
    pub index: usize,
}

/// The tier of a cluster-wide admin policy: Admin rules come before NetworkPolicy, Baseline
/// rules after it (only where no NetworkPolicy isolates the workload in that direction).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Tier {
    Admin,
    Baseline,
}

/// The API kind of a cluster-wide admin policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum AdminKind {
    /// `policy.networking.k8s.io/v1alpha2`, either tier.
    ClusterNetworkPolicy,
    /// `policy.networking.k8s.io/v1alpha1`, the Admin tier.
    AdminNetworkPolicy,
    /// `policy.networking.k8s.io/v1alpha1`, the Baseline tier.
    BaselineAdminNetworkPolicy,
}

/// A cluster-scoped admin policy: its kind and name (two kinds may use one name).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AdminPolicyKey {
    pub kind: AdminKind,
    pub name: String,
}

/// What an admin rule does with the traffic it matches. `Allow` is v1alpha1's `Allow` and
/// v1alpha2's `Accept`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AdminAction {
    Allow,
    Deny,
    /// Skip the rest of the tier: to NetworkPolicy from the Admin tier, to the default from the
    /// Baseline tier.
    Pass,
}

/// The admin rule that decided: policy, tier, priority, direction, index in `spec.ingress` /
/// `spec.egress`, and its action.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct AdminRuleRef {
    pub policy: AdminPolicyKey,
    pub tier: Tier,
    /// `None` for BaselineAdminNetworkPolicy, which has no priority.
    pub priority: Option<u16>,
    pub direction: Direction,
    pub index: usize,
    /// The action applied (for a fail-closed rule, the one it was turned into: `Deny`).
    pub action: AdminAction,
    /// The rule has a peer the engine cannot decide (an unknown peer type, or `domainNames` in
    /// a Deny or Pass rule) and was turned into a deny-all rule as the API requires.
    pub fail_closed: bool,
}

/// Something the engine accepted in an admin policy but cannot enforce as written: the field
/// and what the engine does instead (always the stricter reading).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct AdminWarning {
    /// Path of the field, e.g. `spec.egress[1].to[0].domainNames`.
    pub field: String,
    pub message: String,
}

/// Why a decision came out as it did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reason {
    /// No policy selects the local workload for this direction.
    NotIsolated,
    /// The local workload uses the host network: never a policy target.
    HostNetwork,
    /// The first rule (in policy key order, then rule order) that allows the connection.
    AllowedBy(RuleRef),
    /// The policies that isolate the local workload in this direction; none of their rules allow it.
    Isolated(Vec<PolicyKey>),
    /// The local workload is not known to the engine.
    UnknownWorkload(PodKey),
    /// An Admin or Baseline tier rule decided: `Allow` and `Deny` rules by their action; a
    /// Baseline `Pass` rule sent the connection to the default (allowed; only where no
    /// NetworkPolicy isolates, or the Baseline tier would not have been reached).
    Admin(AdminRuleRef),
}

/// Verdict for one direction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    pub reason: Reason,
}

impl fmt::Display for Protocol {
    /// `TCP`, `UDP`, `SCTP`, `ICMP`, `ICMPv6`, or `IP-47` for another protocol number.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Protocol::Tcp => f.write_str("TCP"),
            Protocol::Udp => f.write_str("UDP"),
            Protocol::Sctp => f.write_str("SCTP"),
            Protocol::Other(1) => f.write_str("ICMP"),
            Protocol::Other(58) => f.write_str("ICMPv6"),
            Protocol::Other(n) => write!(f, "IP-{n}"),
        }
    }
}

impl fmt::Display for PodKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

impl fmt::Display for PolicyKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

impl fmt::Display for Direction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Direction::Ingress => "ingress",
            Direction::Egress => "egress",
        })
    }
}

impl fmt::Display for Tier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Tier::Admin => "Admin",
            Tier::Baseline => "Baseline",
        })
    }
}

impl fmt::Display for AdminKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            AdminKind::ClusterNetworkPolicy => "ClusterNetworkPolicy",
            AdminKind::AdminNetworkPolicy => "AdminNetworkPolicy",
            AdminKind::BaselineAdminNetworkPolicy => "BaselineAdminNetworkPolicy",
        })
    }
}

impl AdminKind {
    /// The action as this kind's API spells it (`Accept` in v1alpha2, `Allow` in v1alpha1).
    pub fn action_name(self, action: AdminAction) -> &'static str {
        match (self, action) {
            (AdminKind::ClusterNetworkPolicy, AdminAction::Allow) => "Accept",
            (_, AdminAction::Allow) => "Allow",
            (_, AdminAction::Deny) => "Deny",
            (_, AdminAction::Pass) => "Pass",
        }
    }
}

impl fmt::Display for AdminPolicyKey {
    /// `ClusterNetworkPolicy/deny-egress`
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.kind, self.name)
    }
}

impl fmt::Display for AdminWarning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

impl fmt::Display for RuleRef {
    /// `demo/backend-policy ingress rule 0`
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {} rule {}", self.policy, self.direction, self.index)
    }
}

/// A reason's parts, borrowed: what [`Reason`] and the engine's borrowed reason both say, so
/// that both are worded by the same code.
pub(crate) enum ReasonWords<'a, P> {
    NotIsolated,
    HostNetwork,
    AllowedBy {
        policy: &'a PolicyKey,
        direction: Direction,
        index: usize,
    },
    /// The isolating policies.
    Isolated(P),
    UnknownWorkload(&'a PodKey),
    Admin(AdminWords<'a>),
}

/// The parts of an admin rule reason, borrowed.
#[derive(Clone, Copy, Debug)]
pub(crate) struct AdminWords<'a> {
    pub policy: &'a AdminPolicyKey,
    pub tier: Tier,
    pub priority: Option<u16>,
    pub direction: Direction,
    pub index: usize,
    pub action: AdminAction,
    pub fail_closed: bool,
}

impl AdminRuleRef {
    pub(crate) fn words(&self) -> AdminWords<'_> {
        AdminWords {
            policy: &self.policy,
            tier: self.tier,
            priority: self.priority,
            direction: self.direction,
            index: self.index,
            action: self.action,
            fail_closed: self.fail_closed,
        }
    }
}

impl AdminWords<'_> {
    /// `denied by Admin ClusterNetworkPolicy/x (priority 10) ingress rule 0 (Deny)`
    fn write(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let verb = match self.action {
            AdminAction::Allow => "allowed by",
            AdminAction::Deny => "denied by",
            AdminAction::Pass => "passed to the default by",
        };
        write!(f, "{verb} {} {}", self.tier, self.policy)?;
        if let Some(p) = self.priority {
            write!(f, " (priority {p})")?;
        }
        write!(
            f,
            " {} rule {} ({}",
            self.direction,
            self.index,
            self.policy.kind.action_name(self.action)
        )?;
        if self.fail_closed {
            f.write_str(", fail-closed: a peer the engine cannot decide")?;
        }
        f.write_str(")")
    }
}

impl Reason {
    pub(crate) fn words(&self) -> ReasonWords<'_, std::slice::Iter<'_, PolicyKey>> {
        match self {
            Reason::NotIsolated => ReasonWords::NotIsolated,
            Reason::HostNetwork => ReasonWords::HostNetwork,
            Reason::AllowedBy(r) => ReasonWords::AllowedBy {
                policy: &r.policy,
                direction: r.direction,
                index: r.index,
            },
            Reason::Isolated(p) => ReasonWords::Isolated(p.iter()),
            Reason::UnknownWorkload(k) => ReasonWords::UnknownWorkload(k),
            Reason::Admin(r) => ReasonWords::Admin(r.words()),
        }
    }
}

/// Writes a reason in words; `direction` (when known) is named for isolation.
pub(crate) fn write_words<'a>(
    f: &mut fmt::Formatter<'_>,
    words: ReasonWords<'a, impl Iterator<Item = &'a PolicyKey>>,
    direction: Option<Direction>,
) -> fmt::Result {
    match words {
        ReasonWords::NotIsolated => match direction {
            Some(d) => write!(f, "not isolated for {d} (no policy selects it)"),
            None => f.write_str("not isolated (no policy selects it)"),
        },
        ReasonWords::HostNetwork => f.write_str("host network workload (never a policy target)"),
        ReasonWords::AllowedBy {
            policy,
            direction,
            index,
        } => write!(f, "allowed by {policy} {direction} rule {index}"),
        ReasonWords::Isolated(policies) => {
            f.write_str("isolated ")?;
            if let Some(d) = direction {
                write!(f, "for {d} ")?;
            }
            f.write_str("by ")?;
            for (i, p) in policies.enumerate() {
                if i > 0 {
                    f.write_str(", ")?;
                }
                write!(f, "{p}")?;
            }
            f.write_str(" (no rule matches)")
        }
        ReasonWords::UnknownWorkload(k) => write!(f, "unknown workload {k}"),
        ReasonWords::Admin(a) => a.write(f),
    }
}

/// Writes a reason in words; `direction` (when known) is named for isolation.
pub(crate) fn write_reason(
    f: &mut fmt::Formatter<'_>,
    reason: &Reason,
    direction: Option<Direction>,
) -> fmt::Result {
    write_words(f, reason.words(), direction)
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_reason(f, self, None)
    }
}

/// Writes a decision: `allowed by demo/web ingress rule 0`, `allowed: not isolated ...`,
/// `denied: isolated for ingress by demo/default-deny (no rule matches)`.
pub(crate) fn write_decision_words<'a>(
    f: &mut fmt::Formatter<'_>,
    allowed: bool,
    words: ReasonWords<'a, impl Iterator<Item = &'a PolicyKey>>,
    direction: Option<Direction>,
) -> fmt::Result {
    match (&words, allowed) {
        (ReasonWords::AllowedBy { .. }, true) => {}
        (ReasonWords::Admin(a), _) if a.action != AdminAction::Pass => {}
        (_, true) => f.write_str("allowed: ")?,
        (_, false) => f.write_str("denied: ")?,
    }
    write_words(f, words, direction)
}

/// [`write_decision_words`] for an owned decision.
pub(crate) fn write_decision(
    f: &mut fmt::Formatter<'_>,
    d: &Decision,
    direction: Option<Direction>,
) -> fmt::Result {
    write_decision_words(f, d.allowed, d.reason.words(), direction)
}

impl fmt::Display for Decision {
    /// `allowed by demo/web ingress rule 0`, `allowed: not isolated (no policy selects it)`,
    /// `denied: isolated by demo/db (no rule matches)`. A decision does not record its direction
    /// unless a rule allowed it: [`Decision::in_direction`] names it for the other reasons too.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let direction = match &self.reason {
            Reason::AllowedBy(r) => Some(r.direction),
            Reason::Admin(r) => Some(r.direction),
            _ => None,
        };
        write_decision(f, self, direction)
    }
}

/// A decision worded with its direction: see [`Decision::in_direction`].
pub struct DecisionIn<'a> {
    decision: &'a Decision,
    direction: Direction,
}

impl Decision {
    /// Displays the decision naming the direction it was taken for: `denied: isolated for
    /// ingress by demo/db (no rule matches)`, `allowed: not isolated for egress (no policy
    /// selects it)`.
    pub fn in_direction(&self, direction: Direction) -> DecisionIn<'_> {
        DecisionIn {
            decision: self,
            direction,
        }
    }
}

impl fmt::Display for DecisionIn<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_decision(f, self.decision, Some(self.direction))
    }
}
