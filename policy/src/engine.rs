//! The compiled policy set and its index.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::net::IpAddr;

use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::api::networking::v1::NetworkPolicy;

use crate::PolicyError;
use crate::compiled::{CompiledPolicy, PortQuery};
use crate::model::{
    Connection, Decision, Direction, Labels, PodKey, PolicyKey, Reason, RuleRef, Workload,
    WorkloadIdentity,
};
use crate::validate::{
    NAMESPACE_NAME_LABEL, check_workload, compile_policy, namespace_labels, workload_from_pod,
};

/// Index of a compiled policy in the engine's slab.
type PolicyId = u32;

/// A known workload and the policies selecting it, per direction, in policy key order.
struct Entry {
    workload: Workload,
    ingress: Vec<PolicyId>,
    egress: Vec<PolicyId>,
}

impl Entry {
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
/// change re-indexes nothing (peers carry their namespace labels).
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
    free: Vec<PolicyId>,
    /// Per namespace: policy name → id, in name order.
    policies_by_ns: HashMap<String, BTreeMap<String, PolicyId>>,
    /// Pod IP → workload, for peers known only by their address (hostNetwork workloads are
    /// not indexed: as peers they are IP-only). When two workloads claim one IP (a pod IP
    /// reused before the old pod's removal arrived), the last applied wins.
    by_ip: HashMap<IpAddr, PodKey>,
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
        self.namespaces.insert(name, labels);
        Ok(())
    }

    pub fn remove_namespace(&mut self, name: &str) {
        self.namespaces.remove(name);
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
        self.index_workload(workload);
        Ok(key)
    }

    /// Adds or replaces a workload known by other means (Docker, static inventory).
    pub fn apply_workload(&mut self, workload: Workload) -> Result<(), PolicyError> {
        check_workload(&workload)?;
        self.index_workload(workload);
        Ok(())
    }

    /// (Re-)evaluates the policies of the workload's namespace against it.
    fn index_workload(&mut self, workload: Workload) {
        let mut entry = Entry {
            workload,
            ingress: Vec::new(),
            egress: Vec::new(),
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

    /// Validates (with the API server's defaulting), compiles and indexes one policy.
    pub fn apply_policy(&mut self, policy: &NetworkPolicy) -> Result<PolicyKey, PolicyError> {
        let compiled = compile_policy(policy)?;
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
        if let Some(slot) = self.policies.get_mut(id as usize) {
            *slot = Some(compiled);
        }
        self.reindex_policy(&key, id, true);
        Ok(key)
    }

    pub fn remove_policy(&mut self, key: &PolicyKey) {
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
        self.free.push(id);
    }

    /// Brings the index lists of the pods in the policy's namespace up to date with policy `id`
    /// (`present`: the policy is in force; otherwise it is being removed).
    fn reindex_policy(&mut self, key: &PolicyKey, id: PolicyId, present: bool) {
        let Some(names) = self.pods_by_ns.get(&key.namespace) else {
            return;
        };
        let policies = &self.policies;
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
                match (pos, wanted) {
                    (Ok(i), false) => {
                        list.remove(i);
                    }
                    (Err(i), true) => list.insert(i, id),
                    _ => {}
                }
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
        let ids = entry.list(conn.direction);
        if ids.is_empty() {
            return DecisionRef {
                allowed: true,
                reason: ReasonRef::NotIsolated,
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
        for id in ids {
            let Some(policy) = self.policy(*id) else {
                continue;
            };
            let rules = policy.rules(conn.direction).unwrap_or(&[]);
            if let Some(index) = rules
                .iter()
                .position(|r| r.matches(conn.peer, conn.peer_ip, &query))
            {
                return DecisionRef {
                    allowed: true,
                    reason: ReasonRef::AllowedBy {
                        policy: &policy.key,
                        direction: conn.direction,
                        index,
                    },
                };
            }
        }
        DecisionRef {
            allowed: false,
            reason: ReasonRef::Isolated(IsolatingPolicies { engine: self, ids }),
        }
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
