//! The compiled policy set and its index.

use std::collections::{BTreeMap, BTreeSet};

// aHash with per-process random keys (as the datapath's tables): SipHash of the pod and
// namespace keys was about a tenth of a decision's instructions.
use ahash::HashMap;
use smallvec::SmallVec;
use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Namespace, Node as NodeObject, Pod};
use k8s_openapi::api::networking::v1::NetworkPolicy;

use self::walk::{RuleStep, StepQuery};
use crate::PolicyError;
use crate::admin::{AdminNetworkPolicy, BaselineAdminNetworkPolicy, ClusterNetworkPolicy};
use crate::compiled::{
    AdminPeers, AdminPort, AdminRule, CompiledAdmin, CompiledPolicy, PeerQuery, PeerSelector,
    PortQuery, Rule, SelectorMemo,
};
use crate::model::{
    AdminAction, AdminPolicyKey, AdminRuleRef, AdminWarning, Connection, Decision, Direction,
    Labels, Node, PodKey, PolicyKey, Reason, RuleRef, Tier, Workload, WorkloadIdentity,
};
use crate::nodes::{NodeInventory, check_node, node_from_object};
use crate::selector::Selector;
use crate::validate::{
    NAMESPACE_NAME_LABEL, check_workload, compile_policy, namespace_labels, workload_from_pod,
};
use crate::validate_admin::{
    compile_admin_network_policy, compile_baseline_admin_network_policy,
    compile_cluster_network_policy,
};

#[cfg(test)]
mod reference_tests;
mod staged;
mod walk;

pub use staged::StagedKey;

/// Index of a compiled policy in the engine's slab.
type PolicyId = u32;

/// Index of a compiled admin policy in the engine's admin slab.
type AdminId = u32;

/// Per tier (Admin, Baseline) and direction (ingress, egress): the admin policies selecting a
/// workload that have rules for that direction, in evaluation order (priority, name, kind).
type AdminLists = [[Vec<AdminId>; 2]; 2];

/// [`AdminLists`] as decisions walk them: per tier and direction, the rules that may be the
/// first match, with their summaries (see [`walk::admin_walk`]).
type AdminWalks = [[Vec<RuleStep>; 2]; 2];

/// Engine-wide ids for equal values (selectors, rule conditions), counted by use, reused when
/// free. Ids run below [`PeerSelector::MAX_ID`]; past it, values get [`PeerSelector::NO_ID`].
#[derive(Clone)]
struct Interner<K> {
    ids: HashMap<K, (u32, usize)>,
    free: Vec<u32>,
    next: u32,
}

impl<K> Default for Interner<K> {
    fn default() -> Self {
        Self {
            ids: HashMap::default(),
            free: Vec::new(),
            next: 0,
        }
    }
}

impl<K: std::hash::Hash + Eq + Clone> Interner<K> {
    fn acquire(&mut self, key: &K) -> u32 {
        if let Some((id, uses)) = self.ids.get_mut(key) {
            *uses += 1;
            return *id;
        }
        let id = match self.free.pop() {
            Some(id) => id,
            None if self.next < PeerSelector::MAX_ID => {
                self.next += 1;
                self.next - 1
            }
            None => return PeerSelector::NO_ID,
        };
        self.ids.insert(key.clone(), (id, 1));
        id
    }

    fn release(&mut self, key: &K) {
        if let Some((id, uses)) = self.ids.get_mut(key) {
            *uses = uses.saturating_sub(1);
            if *uses == 0 {
                self.free.push(*id);
                self.ids.remove(key);
            }
        }
    }
}

fn tier_index(tier: Tier) -> usize {
    match tier {
        Tier::Admin => 0,
        Tier::Baseline => 1,
    }
}

fn direction_index(direction: Direction) -> usize {
    match direction {
        Direction::Ingress => 0,
        Direction::Egress => 1,
    }
}

/// A known workload and the policies selecting it, per direction, in policy key order.
#[derive(Clone)]
struct Entry {
    workload: Workload,
    ingress: Vec<PolicyId>,
    egress: Vec<PolicyId>,
    admin: AdminLists,
    /// The rules of `admin`, as [`Engine::decide_ref`] walks them.
    walks: AdminWalks,
    /// Per direction (ingress, egress): the rules of the policies of `ingress` / `egress`, as
    /// [`Engine::decide_ref`] walks them (see [`walk`]).
    np_walks: [Vec<RuleStep>; 2],
}

impl Entry {
    /// Rebuilds the NetworkPolicy walk of one direction from its list.
    fn rewalk(&mut self, policy_rules: &[[Option<Arc<[Rule]>>; 2]], direction: Direction) {
        let d = direction_index(direction);
        let local_ports = walk::local_ports(d, &self.workload.ports);
        let walk = walk::np_walk(policy_rules, self.list(direction), d, local_ports);
        if let Some(slot) = self.np_walks.get_mut(d) {
            *slot = walk;
        }
    }

    fn list(&self, direction: Direction) -> &[PolicyId] {
        match direction {
            Direction::Ingress => &self.ingress,
            Direction::Egress => &self.egress,
        }
    }

    fn list_mut(&mut self, direction: Direction) -> &mut Vec<PolicyId> {
        match direction {
            Direction::Ingress => &mut self.ingress,
            Direction::Egress => &mut self.egress,
        }
    }
}

/// Namespaces, workloads and compiled policies, indexed for decisions.
///
/// Every `apply_*` validates first: an invalid object returns an error naming the object and the
/// field, and the engine keeps the last good state (the previous version of that object stays in
/// force). Updates are incremental: applying one policy or one workload re-indexes only what it
/// touches.
///
/// Index: each workload carries, per direction, the ids of the policies that select it (a
/// policy selects only pods of its own namespace, so these are ordered by policy name). Applying
/// or removing a policy re-evaluates its pod selector against the pods of its namespace only; a
/// workload's label change re-evaluates only the policies of its namespace; a namespace label
/// change re-indexes nothing for NetworkPolicies (peers carry their namespace labels).
///
/// From each list the engine builds the workload's walk ([`walk`]): the rules of those
/// policies in evaluation order, each with a summary of the ports (ingress named ports resolved
/// on the workload) and kinds of peer it can match, so that a decision reads only the rules
/// whose summary admits the question. A walk is rebuilt with its list, and for the pods that
/// hold a policy whose rules changed.
///
/// Cluster-wide admin policies (ClusterNetworkPolicy, AdminNetworkPolicy,
/// BaselineAdminNetworkPolicy) are indexed the same way: each workload carries, per tier and
/// direction, the ids of the admin policies whose subject selects it, in evaluation order
/// (priority, then name, then kind). Their subjects select by namespace labels too, so applying
/// or removing one re-evaluates its subject against every workload, and a namespace label change
/// re-evaluates every admin subject against that namespace's workloads. A decision walks only
/// these lists, as walks of rule summaries too (without the rules that can never be the first
/// match): Admin tier, then the NetworkPolicies, then the Baseline tier (see
/// [`Engine::decide_ref`]).
///
/// The node inventory ([`Engine::apply_node`]) is what admin `nodes` peers select from. No
/// index depends on it: a decision looks the peer's address up when it tries a `nodes` peer, so
/// node changes re-index nothing and count from the next decision. Admin `domainNames` peers
/// match [`Connection::resolved_names`].
#[derive(Default)]
pub struct Engine {
    namespaces: HashMap<String, Labels>,
    workloads: HashMap<PodKey, Entry>,
    /// Workload keys in key order, for listing.
    workload_order: BTreeSet<PodKey>,
    /// Pod names per namespace.
    pods_by_ns: HashMap<String, BTreeSet<String>>,
    /// Slab of compiled policies; `None` slots are free.
    policies: Vec<Option<CompiledPolicy>>,
    /// The rules of `policies[id]`, per direction (ingress, egress): what a decision reads, in
    /// a slab of its own. Its slots are 32 bytes, against a few hundred for a compiled policy,
    /// so a decision walking a workload's policies (mostly neighbouring ids: a namespace's
    /// policies are applied together) misses the cache less; the key is read only for the
    /// reason, once a rule matched or none did.
    policy_rules: Vec<[Option<Arc<[Rule]>>; 2]>,
    free: Vec<PolicyId>,
    /// Per namespace: policy name → id, in name order.
    policies_by_ns: HashMap<String, BTreeMap<String, PolicyId>>,
    /// Pod IP → workload, for peers known only by their address (hostNetwork workloads are
    /// not indexed: as peers they are IP-only). When two workloads claim one IP (a pod IP
    /// reused before the old pod's removal arrived), the last applied wins.
    by_ip: HashMap<IpAddr, PodKey>,
    /// Slab of compiled admin policies (all three kinds); `None` slots are free.
    admin_policies: Vec<Option<CompiledAdmin>>,
    /// The rules of `admin_policies[id]`, per direction (ingress, egress), in a slab of their
    /// own as `policy_rules` (32 bytes a slot against a few hundred): what a decision reads;
    /// the policy itself only for the reason, once a rule matched.
    admin_rules: Vec<[Arc<[AdminRule]>; 2]>,
    admin_free: Vec<AdminId>,
    /// Admin policy key → id, in key order.
    admin_by_key: BTreeMap<AdminPolicyKey, AdminId>,
    /// The distinct selectors of admin peers in force. Identical selectors share an id, which
    /// a decision's [`SelectorMemo`] is keyed by.
    admin_selectors: Interner<Selector>,
    /// The distinct conditions (peers and ports) of admin rules in force (`AdminRule::cond`).
    admin_conds: Interner<(SmallVec<[AdminPort; 2]>, AdminPeers)>,
    /// The nodes, for admin `nodes` peers. Nothing compiled or indexed depends on it: a
    /// decision looks the peer's address up when it tries a `nodes` peer.
    nodes: NodeInventory,
    /// Staged policies and the view that evaluates them (see [`Engine::staged_view`]);
    /// `None` while nothing is staged.
    staging: Option<Box<staged::Staging>>,
}

/// What the engine made of an admin policy it accepted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AdminApplied {
    pub key: AdminPolicyKey,
    /// Parts the engine cannot enforce as written, and the stricter reading it enforces
    /// instead (fail-closed rules). Empty for most policies.
    pub warnings: Vec<AdminWarning>,
}

/// A decision borrowed from the engine: computing it allocates nothing.
/// [`DecisionRef::to_decision`] gives the owned [`Decision`].
#[derive(Clone, Copy, Debug)]
pub struct DecisionRef<'a> {
    pub allowed: bool,
    pub reason: ReasonRef<'a>,
}

/// The borrowed form of [`Reason`].
#[derive(Clone, Copy, Debug)]
pub enum ReasonRef<'a> {
    NotIsolated,
    HostNetwork,
    AllowedBy {
        policy: &'a PolicyKey,
        direction: Direction,
        index: usize,
    },
    Isolated(IsolatingPolicies<'a>),
    UnknownWorkload(&'a PodKey),
    /// See [`Reason::Admin`].
    Admin {
        policy: &'a AdminPolicyKey,
        tier: Tier,
        priority: Option<u16>,
        direction: Direction,
        index: usize,
        action: AdminAction,
        fail_closed: bool,
    },
}

/// The policies isolating a workload in one direction, in key order.
#[derive(Clone, Copy)]
pub struct IsolatingPolicies<'a> {
    engine: &'a Engine,
    ids: &'a [PolicyId],
}

impl<'a> IsolatingPolicies<'a> {
    pub fn iter(&self) -> impl Iterator<Item = &'a PolicyKey> + use<'a> {
        let engine = self.engine;
        self.ids
            .iter()
            .filter_map(move |id| engine.policy(*id).map(|p| &p.key))
    }

    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }
}

impl fmt::Debug for IsolatingPolicies<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

impl ReasonRef<'_> {
    pub fn to_reason(&self) -> Reason {
        match *self {
            ReasonRef::NotIsolated => Reason::NotIsolated,
            ReasonRef::HostNetwork => Reason::HostNetwork,
            ReasonRef::AllowedBy {
                policy,
                direction,
                index,
            } => Reason::AllowedBy(RuleRef {
                policy: policy.clone(),
                direction,
                index,
            }),
            ReasonRef::Isolated(p) => Reason::Isolated(p.iter().cloned().collect()),
            ReasonRef::UnknownWorkload(k) => Reason::UnknownWorkload(k.clone()),
            ReasonRef::Admin {
                policy,
                tier,
                priority,
                direction,
                index,
                action,
                fail_closed,
            } => Reason::Admin(AdminRuleRef {
                policy: policy.clone(),
                tier,
                priority,
                direction,
                index,
                action,
                fail_closed,
            }),
        }
    }
}

impl DecisionRef<'_> {
    pub fn to_decision(&self) -> Decision {
        Decision {
            allowed: self.allowed,
            reason: self.reason.to_reason(),
        }
    }
}

impl Engine {
    pub fn new() -> Self {
        Self::default()
    }

    fn policy(&self, id: PolicyId) -> Option<&CompiledPolicy> {
        self.policies.get(id as usize).and_then(Option::as_ref)
    }

    /// Adds or replaces a namespace (its labels; `kubernetes.io/metadata.name` is added).
    pub fn apply_namespace(&mut self, ns: &Namespace) -> Result<(), PolicyError> {
        let (name, labels) = namespace_labels(ns)?;
        let old = self.namespaces.insert(name.clone(), labels);
        if old.as_ref() != self.namespaces.get(&name) {
            self.reindex_namespace_admin(&name);
        }
        if let Some(view) = self.staged_view_mut() {
            let _ = view.apply_namespace(ns);
        }
        Ok(())
    }

    pub fn remove_namespace(&mut self, name: &str) {
        if self.namespaces.remove(name).is_some() {
            self.reindex_namespace_admin(name);
        }
        if let Some(view) = self.staged_view_mut() {
            view.remove_namespace(name);
        }
    }

    /// Admin subjects select by namespace labels: re-evaluates them for the workloads of a
    /// namespace whose labels changed.
    fn reindex_namespace_admin(&mut self, namespace: &str) {
        if self.admin_by_key.is_empty() {
            return;
        }
        let Some(names) = self.pods_by_ns.get(namespace) else {
            return;
        };
        let ns_labels = self.namespace_labels_or_default(namespace);
        let mut pod_key = PodKey {
            namespace: namespace.to_owned(),
            name: String::new(),
        };
        for name in names {
            name.clone_into(&mut pod_key.name);
            if let Some(entry) = self.workloads.get_mut(&pod_key) {
                entry.admin = admin_lists(&self.admin_policies, &ns_labels, &entry.workload);
                entry.walks = admin_walks(&self.admin_policies, &entry.admin, &entry.workload);
            }
        }
    }

    /// The labels of a known namespace, including `kubernetes.io/metadata.name`.
    pub fn namespace_labels(&self, name: &str) -> Option<&Labels> {
        self.namespaces.get(name)
    }

    /// The labels a peer in namespace `name` carries: the namespace's, or only
    /// `kubernetes.io/metadata.name` when the namespace object is unknown.
    pub fn namespace_labels_or_default(&self, name: &str) -> Labels {
        self.namespaces
            .get(name)
            .cloned()
            .unwrap_or_else(|| Labels::from([(NAMESPACE_NAME_LABEL.to_string(), name.to_string())]))
    }

    /// Adds or replaces a pod. Its IPs come from `status.podIPs` / `status.podIP`.
    pub fn apply_pod(&mut self, pod: &Pod) -> Result<PodKey, PolicyError> {
        let workload = workload_from_pod(pod)?;
        let key = workload.key.clone();
        if let Some(view) = self.staged_view_mut() {
            view.index_workload(workload.clone());
        }
        self.index_workload(workload);
        Ok(key)
    }

    /// Adds or replaces a workload known by other means (Docker, static inventory).
    pub fn apply_workload(&mut self, workload: Workload) -> Result<(), PolicyError> {
        check_workload(&workload)?;
        if let Some(view) = self.staged_view_mut() {
            view.index_workload(workload.clone());
        }
        self.index_workload(workload);
        Ok(())
    }

    /// (Re-)evaluates the policies of the workload's namespace against it.
    fn index_workload(&mut self, workload: Workload) {
        let admin = if self.admin_by_key.is_empty() {
            AdminLists::default()
        } else {
            let ns_labels = self.namespace_labels_or_default(&workload.key.namespace);
            admin_lists(&self.admin_policies, &ns_labels, &workload)
        };
        let walks = admin_walks(&self.admin_policies, &admin, &workload);
        let mut entry = Entry {
            workload,
            ingress: Vec::new(),
            egress: Vec::new(),
            admin,
            walks,
            np_walks: Default::default(),
        };
        if !entry.workload.host_network
            && let Some(by_name) = self.policies_by_ns.get(&entry.workload.key.namespace)
        {
            for id in by_name.values() {
                let Some(p) = self.policies.get(*id as usize).and_then(Option::as_ref) else {
                    continue;
                };
                if p.pod_selector.matches(&entry.workload.labels) {
                    if p.ingress.is_some() {
                        entry.ingress.push(*id);
                    }
                    if p.egress.is_some() {
                        entry.egress.push(*id);
                    }
                }
            }
            for direction in [Direction::Ingress, Direction::Egress] {
                entry.rewalk(&self.policy_rules, direction);
            }
        }
        self.pods_by_ns
            .entry(entry.workload.key.namespace.clone())
            .or_default()
            .insert(entry.workload.key.name.clone());
        if !self.workloads.contains_key(&entry.workload.key) {
            self.workload_order.insert(entry.workload.key.clone());
        }
        self.unindex_ips(&entry.workload.key);
        if !entry.workload.host_network {
            for ip in &entry.workload.ips {
                self.by_ip.insert(*ip, entry.workload.key.clone());
            }
        }
        self.workloads.insert(entry.workload.key.clone(), entry);
    }

    /// Forgets the IPs the engine's current version of `key` holds in the IP index.
    fn unindex_ips(&mut self, key: &PodKey) {
        if let Some(old) = self.workloads.get(key) {
            for ip in &old.workload.ips {
                if self.by_ip.get(ip) == Some(key) {
                    self.by_ip.remove(ip);
                }
            }
        }
    }

    /// The (non-hostNetwork) workload that holds `ip`, if the engine knows one.
    pub fn workload_by_ip(&self, ip: &IpAddr) -> Option<&Workload> {
        self.by_ip.get(ip).and_then(|k| self.workload(k))
    }

    pub fn remove_workload(&mut self, key: &PodKey) {
        if let Some(view) = self.staged_view_mut() {
            view.remove_workload(key);
        }
        self.unindex_ips(key);
        if self.workloads.remove(key).is_some()
            && self.workload_order.remove(key)
            && let Some(names) = self.pods_by_ns.get_mut(&key.namespace)
        {
            names.remove(&key.name);
            if names.is_empty() {
                self.pods_by_ns.remove(&key.namespace);
            }
        }
    }

    /// Adds or replaces a node of the inventory that admin `nodes` peers select from (static
    /// mode: the agent's inventory; see [`Engine::apply_node_object`] for Kubernetes Node
    /// objects). An invalid node (a name that is not a DNS-1123 subdomain, an invalid label, an
    /// address no connection can have: unspecified, multicast, broadcast) is an error naming
    /// the field, and the previous version stays in force. A repeated address is kept once.
    ///
    /// Takes effect from the next decision: a `nodes` peer matches a connection whose peer
    /// address is an address of a node it selects, as the inventory holds it at that moment
    /// (relabelled, readdressed or removed nodes included). Nothing is re-indexed.
    pub fn apply_node(&mut self, node: Node) -> Result<(), PolicyError> {
        let node = check_node(node)?;
        if let Some(view) = self.staged_view_mut() {
            view.nodes.apply(node.clone());
        }
        self.nodes.apply(node);
        Ok(())
    }

    /// Adds or replaces a node from a Kubernetes Node object (`v1`, cluster-scoped): its name,
    /// `metadata.labels`, and the `InternalIP` and `ExternalIP` entries of `status.addresses`
    /// (the other types are names). Returns the node's name. Errors as
    /// [`Engine::apply_node`], naming the object's fields (`status.addresses[1].address`).
    pub fn apply_node_object(&mut self, node: &NodeObject) -> Result<String, PolicyError> {
        let node = node_from_object(node)?;
        let name = node.name.clone();
        if let Some(view) = self.staged_view_mut() {
            view.nodes.apply(node.clone());
        }
        self.nodes.apply(node);
        Ok(name)
    }

    /// Forgets a node (nothing if unknown): its addresses match no `nodes` peer any more.
    pub fn remove_node(&mut self, name: &str) {
        if let Some(view) = self.staged_view_mut() {
            view.nodes.remove(name);
        }
        self.nodes.remove(name);
    }

    /// A node of the inventory, if known.
    pub fn node(&self, name: &str) -> Option<&Node> {
        self.nodes.get(name)
    }

    /// Every node of the inventory, in name order.
    pub fn nodes(&self) -> impl Iterator<Item = &Node> {
        self.nodes.iter()
    }

    /// Number of nodes in the inventory.
    pub fn node_count(&self) -> usize {
        self.nodes.len()
    }

    /// The nodes that hold `ip` (normally one; two while an address moves between nodes), in
    /// the order they claimed it.
    pub fn nodes_by_ip(&self, ip: &IpAddr) -> impl Iterator<Item = &Node> {
        self.nodes.at(ip)
    }

    /// Validates (with the API server's defaulting), compiles and indexes one policy.
    pub fn apply_policy(&mut self, policy: &NetworkPolicy) -> Result<PolicyKey, PolicyError> {
        let compiled = compile_policy(policy)?;
        let key = compiled.key.clone();
        if let Some(view) = self.staged_view_for(&StagedKey::NetworkPolicy(key.clone())) {
            view.index_policy(compiled.clone());
        }
        self.index_policy(compiled);
        Ok(key)
    }

    /// Stores a compiled policy (replacing its previous version) and re-indexes the pods of
    /// its namespace for it.
    fn index_policy(&mut self, compiled: CompiledPolicy) {
        let key = compiled.key.clone();
        let existing = self
            .policies_by_ns
            .get(&key.namespace)
            .and_then(|m| m.get(&key.name))
            .copied();
        let id = match existing {
            Some(id) => id,
            None => {
                let id = match self.free.pop() {
                    Some(id) => id,
                    None => {
                        self.policies.push(None);
                        // More than u32::MAX policies cannot be held in memory anyway.
                        PolicyId::try_from(self.policies.len() - 1).unwrap_or(PolicyId::MAX)
                    }
                };
                self.policies_by_ns
                    .entry(key.namespace.clone())
                    .or_default()
                    .insert(key.name.clone(), id);
                id
            }
        };
        let rules = [compiled.ingress.clone(), compiled.egress.clone()];
        if self.policy_rules.len() < self.policies.len() {
            self.policy_rules.resize(self.policies.len(), [None, None]);
        }
        if let Some(slot) = self.policy_rules.get_mut(id as usize) {
            *slot = rules;
        }
        if let Some(slot) = self.policies.get_mut(id as usize) {
            *slot = Some(compiled);
        }
        self.reindex_policy(&key, id, true);
    }

    pub fn remove_policy(&mut self, key: &PolicyKey) {
        if let Some(view) = self.staged_view_for(&StagedKey::NetworkPolicy(key.clone())) {
            view.remove_policy(key);
        }
        let Some(by_name) = self.policies_by_ns.get_mut(&key.namespace) else {
            return;
        };
        let Some(id) = by_name.remove(&key.name) else {
            return;
        };
        if by_name.is_empty() {
            self.policies_by_ns.remove(&key.namespace);
        }
        self.reindex_policy(key, id, false);
        if let Some(slot) = self.policies.get_mut(id as usize) {
            *slot = None;
        }
        if let Some(slot) = self.policy_rules.get_mut(id as usize) {
            *slot = [None, None];
        }
        self.free.push(id);
    }

    /// Brings the index lists of the pods in the policy's namespace up to date with policy `id`
    /// (`present`: the policy is in force; otherwise it is being removed).
    fn reindex_policy(&mut self, key: &PolicyKey, id: PolicyId, present: bool) {
        let Some(names) = self.pods_by_ns.get(&key.namespace) else {
            return;
        };
        let policies = &self.policies;
        let policy_rules = &self.policy_rules;
        let Some(policy) = policies.get(id as usize).and_then(Option::as_ref) else {
            return;
        };
        let mut pod_key = PodKey {
            namespace: key.namespace.clone(),
            name: String::new(),
        };
        for name in names {
            name.clone_into(&mut pod_key.name);
            let Some(entry) = self.workloads.get_mut(&pod_key) else {
                continue;
            };
            let selected = present
                && !entry.workload.host_network
                && policy.pod_selector.matches(&entry.workload.labels);
            for direction in [Direction::Ingress, Direction::Egress] {
                let wanted = selected && policy.rules(direction).is_some();
                let list = entry.list_mut(direction);
                let pos = list.binary_search_by(|other| {
                    let other_name = policies
                        .get(*other as usize)
                        .and_then(Option::as_ref)
                        .map_or("", |p| p.key.name.as_str());
                    other_name.cmp(key.name.as_str())
                });
                // The walk changes when the policy enters or leaves the list, and when it stays
                // (its rules may have changed).
                match (pos, wanted) {
                    (Ok(i), false) => {
                        list.remove(i);
                    }
                    (Err(i), true) => list.insert(i, id),
                    (Err(_), false) => continue,
                    (Ok(_), true) => {}
                }
                entry.rewalk(policy_rules, direction);
            }
        }
    }

    /// One direction's verdict for one connection, with its reason.
    pub fn decide(&self, conn: &Connection<'_>) -> Decision {
        self.decide_ref(conn).to_decision()
    }

    /// Whether one direction allows the connection; allocates nothing.
    pub fn allows(&self, conn: &Connection<'_>) -> bool {
        self.decide_ref(conn).allowed
    }

    /// [`Engine::decide`] without allocating: the reason borrows from the engine.
    ///
    /// An unknown local workload is denied (`UnknownWorkload`): the engine cannot tell which
    /// policies would isolate it.
    ///
    /// Order: the Admin tier's rules (policies in priority order, rules in order; the first that
    /// matches decides: Allow/Accept allows, Deny denies, Pass skips the rest of the tier); then
    /// NetworkPolicy exactly as without admin policies (a workload isolated in this direction is
    /// decided there); then the Baseline tier (first match: Allow, Deny, or Pass to the
    /// default); then the default, allowed ([`ReasonRef::NotIsolated`]).
    pub fn decide_ref<'a>(&'a self, conn: &Connection<'a>) -> DecisionRef<'a> {
        let Some(entry) = self.workloads.get(conn.local) else {
            return DecisionRef {
                allowed: false,
                reason: ReasonRef::UnknownWorkload(conn.local),
            };
        };
        if entry.workload.host_network {
            return DecisionRef {
                allowed: true,
                reason: ReasonRef::HostNetwork,
            };
        }
        let query = match conn.direction {
            Direction::Ingress => PortQuery {
                port: conn.port,
                protocol: conn.protocol,
                dest_ports: Some(&entry.workload.ports),
                dest_port_name: None,
            },
            Direction::Egress => PortQuery {
                port: conn.port,
                protocol: conn.protocol,
                dest_ports: None,
                dest_port_name: conn.dest_port_name,
            },
        };
        let d = direction_index(conn.direction);
        let peer = PeerQuery {
            peer: conn.peer,
            ip: conn.peer_ip,
            // Names are resolved by the local workload for the addresses it connects to.
            names: match conn.direction {
                Direction::Egress => conn.resolved_names,
                Direction::Ingress => &[],
            },
            nodes: &self.nodes,
        };
        // One peer per decision: selector results are shared by both tiers. Set up on the
        // first policy a walk tries (most workloads have none).
        let mut memo = None;
        let sq = StepQuery::new(&query, &peer);
        // 1. The Admin tier: the first matching rule decides, unless it passes.
        if let Some(hit) = self.first_admin_match(
            &entry.walks[0][d],
            (conn.direction, &peer, sq),
            &query,
            &mut memo,
        ) && hit.rule.action != AdminAction::Pass
        {
            return hit.decision(conn.direction);
        }
        // 2. NetworkPolicy: a workload isolated in this direction is decided here.
        // Its rules in order, each read only if its summary admits the question.
        let ids = entry.list(conn.direction);
        if !ids.is_empty() {
            for step in entry.np_walks.get(d).map_or(&[][..], Vec::as_slice) {
                if !step.admits(sq) {
                    continue;
                }
                let Some(rule) = self
                    .policy_rules
                    .get(step.id as usize)
                    .and_then(|r| r.get(d))
                    .and_then(Option::as_deref)
                    .and_then(|rules| rules.get(step.index as usize))
                else {
                    continue;
                };
                let matched = if step.ports_exact() {
                    rule.peers_match(conn.peer, conn.peer_ip)
                } else {
                    rule.matches(conn.peer, conn.peer_ip, &query)
                };
                if matched && let Some(policy) = self.policy(step.id) {
                    return DecisionRef {
                        allowed: true,
                        reason: ReasonRef::AllowedBy {
                            policy: &policy.key,
                            direction: conn.direction,
                            index: step.index as usize,
                        },
                    };
                }
            }
            return DecisionRef {
                allowed: false,
                reason: ReasonRef::Isolated(IsolatingPolicies { engine: self, ids }),
            };
        }
        // 3. The Baseline tier: the first matching rule decides; Pass goes to the default.
        if let Some(hit) = self.first_admin_match(
            &entry.walks[1][d],
            (conn.direction, &peer, sq),
            &query,
            &mut memo,
        ) {
            return hit.decision(conn.direction);
        }
        // 4. The default: not isolated.
        DecisionRef {
            allowed: true,
            reason: ReasonRef::NotIsolated,
        }
    }

    /// The first rule of an admin walk that matches.
    fn first_admin_match<'a>(
        &'a self,
        steps: &[RuleStep],
        (direction, peer, sq): (Direction, &PeerQuery<'_>, StepQuery),
        query: &PortQuery<'_>,
        memo: &mut Option<SelectorMemo>,
    ) -> Option<AdminHit<'a>> {
        for step in steps {
            if !step.admits(sq) {
                continue;
            }
            let index = step.index as usize;
            let Some(rule) = self
                .admin_rules
                .get(step.id as usize)
                .and_then(|r| r.get(direction_index(direction)))
                .and_then(|rules| rules.get(index))
            else {
                continue;
            };
            let memo = memo.get_or_insert_with(SelectorMemo::new);
            let matched = if step.ports_exact() {
                rule.peers_match(peer, memo)
            } else {
                rule.matches(peer, query, memo)
            };
            if matched && let Some(policy) = self.admin_policy(step.id) {
                return Some(AdminHit {
                    policy,
                    index,
                    rule,
                });
            }
        }
        None
    }

    fn admin_policy(&self, id: AdminId) -> Option<&CompiledAdmin> {
        self.admin_policies
            .get(id as usize)
            .and_then(Option::as_ref)
    }

    /// Validates and compiles a `policy.networking.k8s.io/v1alpha2` ClusterNetworkPolicy (Admin
    /// or Baseline tier) and indexes it. An invalid object is an error naming the field, and
    /// the previous version (if any) stays in force.
    pub fn apply_cluster_network_policy(
        &mut self,
        policy: &ClusterNetworkPolicy,
    ) -> Result<AdminApplied, PolicyError> {
        let compiled = compile_cluster_network_policy(policy)?;
        Ok(self.index_admin_and_view(compiled))
    }

    /// Validates and compiles a `policy.networking.k8s.io/v1alpha1` AdminNetworkPolicy (the
    /// Admin tier) and indexes it.
    pub fn apply_admin_network_policy(
        &mut self,
        policy: &AdminNetworkPolicy,
    ) -> Result<AdminApplied, PolicyError> {
        let compiled = compile_admin_network_policy(policy)?;
        Ok(self.index_admin_and_view(compiled))
    }

    /// Validates and compiles a `policy.networking.k8s.io/v1alpha1` BaselineAdminNetworkPolicy
    /// (the Baseline tier, after every prioritized Baseline ClusterNetworkPolicy) and indexes it.
    pub fn apply_baseline_admin_network_policy(
        &mut self,
        policy: &BaselineAdminNetworkPolicy,
    ) -> Result<AdminApplied, PolicyError> {
        let compiled = compile_baseline_admin_network_policy(policy)?;
        Ok(self.index_admin_and_view(compiled))
    }

    /// Removes an admin policy of any kind (nothing if unknown).
    pub fn remove_admin_policy(&mut self, key: &AdminPolicyKey) {
        if let Some(view) = self.staged_view_for(&StagedKey::Admin(key.clone())) {
            view.remove_admin_policy(key);
        }
        let Some(id) = self.admin_by_key.remove(key) else {
            return;
        };
        self.reindex_admin(id, false);
        let old = self
            .admin_policies
            .get_mut(id as usize)
            .and_then(Option::take);
        if let Some(slot) = self.admin_rules.get_mut(id as usize) {
            *slot = Default::default();
        }
        if let Some(old) = old {
            self.release_ids(&old);
        }
        self.admin_free.push(id);
    }

    /// Gives the peer selectors and rule conditions of a policy about to be stored their
    /// shared ids (selectors first: they are part of the conditions).
    fn intern_ids(&mut self, policy: &mut CompiledAdmin) {
        for s in policy.peer_selectors_mut() {
            s.id = self.admin_selectors.acquire(&s.selector);
        }
        for r in policy.rules_mut() {
            r.cond = self
                .admin_conds
                .acquire(&(r.ports.clone(), r.peers.clone()));
        }
    }

    /// Releases the ids of a policy no longer stored (dropped right after).
    fn release_ids(&mut self, policy: &CompiledAdmin) {
        for r in policy.all_rules() {
            if r.cond != PeerSelector::NO_ID {
                self.admin_conds
                    .release(&(r.ports.clone(), r.peers.clone()));
            }
        }
        for s in policy.peer_selectors() {
            if s.id != PeerSelector::NO_ID {
                self.admin_selectors.release(&s.selector);
            }
        }
    }

    /// [`Engine::index_admin`], in the staged view too unless it holds a staged version.
    fn index_admin_and_view(&mut self, compiled: CompiledAdmin) -> AdminApplied {
        if let Some(view) = self.staged_view_for(&StagedKey::Admin(compiled.key.clone())) {
            view.index_admin(compiled.clone());
        }
        self.index_admin(compiled)
    }

    /// Stores a compiled admin policy (replacing its previous version) and re-indexes every
    /// workload for it: its subject may select pods of any namespace.
    fn index_admin(&mut self, mut compiled: CompiledAdmin) -> AdminApplied {
        let applied = AdminApplied {
            key: compiled.key.clone(),
            warnings: compiled.warnings.clone(),
        };
        let id = match self.admin_by_key.get(&compiled.key) {
            Some(id) => *id,
            None => {
                let id = match self.admin_free.pop() {
                    Some(id) => id,
                    None => {
                        self.admin_policies.push(None);
                        AdminId::try_from(self.admin_policies.len() - 1).unwrap_or(AdminId::MAX)
                    }
                };
                self.admin_by_key.insert(compiled.key.clone(), id);
                id
            }
        };
        self.intern_ids(&mut compiled);
        if self.admin_rules.len() < self.admin_policies.len() {
            self.admin_rules
                .resize_with(self.admin_policies.len(), Default::default);
        }
        if let Some(slot) = self.admin_rules.get_mut(id as usize) {
            *slot = [compiled.ingress.clone(), compiled.egress.clone()];
        }
        let old = self
            .admin_policies
            .get_mut(id as usize)
            .and_then(|slot| slot.replace(compiled));
        if let Some(old) = old {
            self.release_ids(&old);
        }
        self.reindex_admin(id, true);
        applied
    }

    /// Brings every workload's admin lists up to date with admin policy `id` (`present`: in
    /// force, as the slab holds it; otherwise being removed).
    fn reindex_admin(&mut self, id: AdminId, present: bool) {
        let policies = &self.admin_policies;
        let Some(policy) = policies.get(id as usize).and_then(Option::as_ref) else {
            return;
        };
        let default_labels =
            |ns: &str| Labels::from([(NAMESPACE_NAME_LABEL.to_string(), ns.to_string())]);
        let t = tier_index(policy.tier);
        let precedence = policy.precedence();
        let mut seen = Vec::new();
        for entry in self.workloads.values_mut() {
            // Take out any previous version first: its place may differ (tier or priority
            // changed).
            // Bit 2 * tier + direction: the lists that changed, whose walks to recompute.
            let mut touched = 0u8;
            for (n, list) in entry.admin.iter_mut().flatten().enumerate() {
                if let Some(i) = list.iter().position(|x| *x == id) {
                    list.remove(i);
                    touched |= 1 << n;
                }
            }
            if present && !entry.workload.host_network {
                let ns = entry.workload.key.namespace.as_str();
                let selected = match self.namespaces.get(ns) {
                    Some(labels) => policy.subject.matches(labels, &entry.workload.labels),
                    None => policy
                        .subject
                        .matches(&default_labels(ns), &entry.workload.labels),
                };
                if selected {
                    for direction in [Direction::Ingress, Direction::Egress] {
                        if policy.rules(direction).is_empty() {
                            continue;
                        }
                        let d = direction_index(direction);
                        let list = &mut entry.admin[t][d];
                        let pos = list.partition_point(|other| {
                            policies
                                .get(*other as usize)
                                .and_then(Option::as_ref)
                                .is_some_and(|p| p.precedence() < precedence)
                        });
                        list.insert(pos, id);
                        touched |= 1 << (2 * t + d);
                    }
                }
            }
            for (n, (ids, walk)) in entry
                .admin
                .iter()
                .flatten()
                .zip(entry.walks.iter_mut().flatten())
                .enumerate()
            {
                if touched & (1 << n) != 0 {
                    let local_ports = walk::local_ports(n % 2, &entry.workload.ports);
                    *walk = walk::admin_walk(policies, ids, n % 2, local_ports, &mut seen);
                }
            }
        }
    }

    /// Keys of all admin policies in force (every kind), in key order.
    pub fn admin_policies(&self) -> impl Iterator<Item = &AdminPolicyKey> {
        self.admin_by_key.keys()
    }

    /// Number of admin policies in force (every kind).
    pub fn admin_policy_count(&self) -> usize {
        self.admin_by_key.len()
    }

    /// The warnings of an admin policy in force (see [`AdminApplied::warnings`]).
    pub fn admin_warnings(&self, key: &AdminPolicyKey) -> &[AdminWarning] {
        self.admin_by_key
            .get(key)
            .and_then(|id| self.admin_policy(*id))
            .map_or(&[], |p| p.warnings.as_slice())
    }

    /// The admin policies of one tier that select a workload and have rules for one direction,
    /// in evaluation order (empty if unknown or hostNetwork).
    pub fn admin_selecting(
        &self,
        key: &PodKey,
        tier: Tier,
        direction: Direction,
    ) -> impl Iterator<Item = &AdminPolicyKey> {
        self.workloads
            .get(key)
            .map_or(&[][..], |e| {
                e.admin[tier_index(tier)][direction_index(direction)].as_slice()
            })
            .iter()
            .filter_map(|id| self.admin_policy(*id).map(|p| &p.key))
    }

    /// The workload, if known.
    pub fn workload(&self, key: &PodKey) -> Option<&Workload> {
        self.workloads.get(key).map(|e| &e.workload)
    }

    /// All known workloads, in key order.
    pub fn workloads(&self) -> impl Iterator<Item = &Workload> {
        self.workload_order
            .iter()
            .filter_map(|k| self.workloads.get(k).map(|e| &e.workload))
    }

    /// The identity a known workload presents as a peer: its namespace, the namespace's labels
    /// (just `kubernetes.io/metadata.name` if the namespace object is unknown) and its labels.
    pub fn identity(&self, key: &PodKey) -> Option<WorkloadIdentity> {
        let w = self.workload(key)?;
        Some(WorkloadIdentity {
            namespace: w.key.namespace.clone(),
            namespace_labels: self.namespace_labels_or_default(&w.key.namespace),
            labels: w.labels.clone(),
        })
    }

    /// The policies that select a workload for one direction, in key order (empty if unknown,
    /// hostNetwork, or not isolated).
    pub fn selecting(
        &self,
        key: &PodKey,
        direction: Direction,
    ) -> impl Iterator<Item = &PolicyKey> {
        self.workloads
            .get(key)
            .map_or(&[][..], |e| e.list(direction))
            .iter()
            .filter_map(|id| self.policy(*id).map(|p| &p.key))
    }

    /// Keys of all policies in force, in key order.
    pub fn policies(&self) -> impl Iterator<Item = &PolicyKey> {
        let mut keys: Vec<&PolicyKey> = self.policies.iter().flatten().map(|p| &p.key).collect();
        keys.sort();
        keys.into_iter()
    }

    /// Number of policies in force.
    pub fn policy_count(&self) -> usize {
        self.policies.len() - self.free.len()
    }
}

/// The admin rule that matched a connection first.
struct AdminHit<'a> {
    policy: &'a CompiledAdmin,
    index: usize,
    rule: &'a AdminRule,
}

impl<'a> AdminHit<'a> {
    /// The decision of this rule: Allow allows, Deny denies, Pass (reached only in the Baseline
    /// tier) leaves the default, which allows.
    fn decision(&self, direction: Direction) -> DecisionRef<'a> {
        DecisionRef {
            allowed: self.rule.action != AdminAction::Deny,
            reason: ReasonRef::Admin {
                policy: &self.policy.key,
                tier: self.policy.tier,
                priority: self.policy.priority,
                direction,
                index: self.index,
                action: self.rule.action,
                fail_closed: self.rule.fail_closed,
            },
        }
    }
}

/// A workload's admin lists, computed from scratch: every admin policy whose subject selects it
/// (hostNetwork workloads: none).
fn admin_lists(
    policies: &[Option<CompiledAdmin>],
    ns_labels: &Labels,
    workload: &Workload,
) -> AdminLists {
    let mut lists = AdminLists::default();
    if workload.host_network {
        return lists;
    }
    for (id, policy) in policies.iter().enumerate() {
        let Some(policy) = policy else { continue };
        if !policy.subject.matches(ns_labels, &workload.labels) {
            continue;
        }
        let Ok(id) = AdminId::try_from(id) else {
            continue;
        };
        for direction in [Direction::Ingress, Direction::Egress] {
            if !policy.rules(direction).is_empty() {
                lists[tier_index(policy.tier)][direction_index(direction)].push(id);
            }
        }
    }
    for list in lists.iter_mut().flatten() {
        list.sort_by(|a, b| {
            let key = |id: &AdminId| {
                policies
                    .get(*id as usize)
                    .and_then(Option::as_ref)
                    .map(CompiledAdmin::precedence)
            };
            key(a).cmp(&key(b))
        });
    }
    lists
}

/// A workload's walks from its admin lists: per tier and direction, the rules that may be the
/// first match (see [`walk::admin_walk`]).
fn admin_walks(
    policies: &[Option<CompiledAdmin>],
    lists: &AdminLists,
    workload: &Workload,
) -> AdminWalks {
    let mut walks = AdminWalks::default();
    let mut seen = Vec::new();
    for (t, per_direction) in lists.iter().enumerate() {
        for (d, ids) in per_direction.iter().enumerate() {
            if let Some(walk) = walks.get_mut(t).and_then(|w| w.get_mut(d)) {
                let local_ports = walk::local_ports(d, &workload.ports);
                *walk = walk::admin_walk(policies, ids, d, local_ports, &mut seen);
            }
        }
    }
    walks
}
