//! Namespaces and NetworkPolicies: watcher events to the agent's events, a relist sent whole at
//! its end.

use std::collections::{BTreeMap, HashSet};

use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::core::PartialObjectMeta;
use kube::runtime::watcher;
use policy::objects::Object;
use policy::{PolicyKey, StagedKey};
use tracing::{info, warn};

use crate::runtime::{Event, NodeInfo, REQUIRE_ENCRYPTION, StagedScope, requires_encryption};

/// Where API policies come from, in the agent's log lines and errors.
pub const POLICY_ORIGIN: &str = "Kubernetes API (NetworkPolicies)";

type Labels = BTreeMap<String, String>;

/// Namespace labels, and whether the namespace requires encryption, as the agent was told.
#[derive(Default)]
pub struct Namespaces {
    known: BTreeMap<String, NsState>,
    relist: Option<Vec<(String, NsState)>>,
    synced: bool,
}

/// A namespace's labels and its [`REQUIRE_ENCRYPTION`] annotation.
type NsState = (Labels, bool);

fn ns_entry(n: &PartialObjectMeta<Namespace>) -> Option<(String, NsState)> {
    let name = n.metadata.name.clone().filter(|s| !s.is_empty())?;
    let annotation = n
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(REQUIRE_ENCRYPTION));
    let (require, note) = requires_encryption(annotation.map(String::as_str));
    if let Some(note) = note {
        warn!(namespace = %name, "{note}");
    }
    Some((
        name,
        (n.metadata.labels.clone().unwrap_or_default(), require),
    ))
}

impl Namespaces {
    pub fn synced(&self) -> bool {
        self.synced
    }

    fn set(&mut self, name: String, state: Option<NsState>, out: &mut Vec<Event>) {
        match state {
            Some(st) => {
                if self.known.get(&name) != Some(&st) {
                    self.known.insert(name.clone(), st.clone());
                    out.push(Event::Namespace {
                        name,
                        labels: Some(st.0),
                        require_encryption: st.1,
                    });
                }
            }
            None => {
                if self.known.remove(&name).is_some() {
                    out.push(Event::Namespace {
                        name,
                        labels: None,
                        require_encryption: false,
                    });
                }
            }
        }
    }

    pub fn handle(
        &mut self,
        ev: watcher::Event<PartialObjectMeta<Namespace>>,
        out: &mut Vec<Event>,
    ) {
        match ev {
            watcher::Event::Init => self.relist = Some(Vec::new()),
            watcher::Event::InitApply(n) => {
                if let Some(e) = ns_entry(&n) {
                    self.relist.get_or_insert_with(Vec::new).push(e);
                }
            }
            watcher::Event::InitDone => {
                let listed = self.relist.take().unwrap_or_default();
                let names: HashSet<String> = listed.iter().map(|(n, _)| n.clone()).collect();
                let gone: Vec<String> = self
                    .known
                    .keys()
                    .filter(|n| !names.contains(*n))
                    .cloned()
                    .collect();
                for name in gone {
                    self.set(name, None, out);
                }
                for (name, state) in listed {
                    self.set(name, Some(state), out);
                }
                if !self.synced {
                    info!(namespaces = self.known.len(), "namespaces listed");
                }
                self.synced = true;
            }
            watcher::Event::Apply(n) => {
                if let Some((name, state)) = ns_entry(&n) {
                    self.set(name, Some(state), out);
                }
            }
            watcher::Event::Delete(n) => {
                if let Some((name, _)) = ns_entry(&n) {
                    self.set(name, None, out);
                }
            }
        }
    }
}

/// NetworkPolicies: the whole set at each list's end, single changes between.
#[derive(Default)]
pub struct Policies {
    relist: Option<Vec<NetworkPolicy>>,
    /// The staged ones of the relist.
    staged: Vec<NetworkPolicy>,
    synced: bool,
}

impl Policies {
    pub fn synced(&self) -> bool {
        self.synced
    }

    pub fn handle(&mut self, ev: watcher::Event<NetworkPolicy>, out: &mut Vec<Event>) {
        match ev {
            watcher::Event::Init => {
                self.relist = Some(Vec::new());
                self.staged.clear();
            }
            watcher::Event::InitApply(p) => {
                // Staged (tessera.dev/staged: "true"): evaluated beside, never enforced.
                if policy::objects::is_staged_meta(&p.metadata) {
                    self.staged.push(p);
                } else {
                    self.relist.get_or_insert_with(Vec::new).push(p);
                }
            }
            watcher::Event::InitDone => {
                let mut policies = self.relist.take().unwrap_or_default();
                policies.sort_by(|a, b| {
                    (&a.metadata.namespace, &a.metadata.name)
                        .cmp(&(&b.metadata.namespace, &b.metadata.name))
                });
                self.synced = true;
                out.push(Event::Policies {
                    origin: POLICY_ORIGIN.to_owned(),
                    policies,
                    admin: None,
                });
                out.push(Event::Staged {
                    origin: POLICY_ORIGIN.to_owned(),
                    scope: StagedScope::NetworkPolicies,
                    objects: std::mem::take(&mut self.staged)
                        .into_iter()
                        .map(Object::NetworkPolicy)
                        .collect(),
                });
            }
            watcher::Event::Apply(p) if policy::objects::is_staged_meta(&p.metadata) => {
                // Staged now: no longer enforced (if it was), evaluated beside.
                if let Some(key) = policy_key(&p) {
                    out.push(Event::PolicyRemove(key));
                }
                out.push(Event::StagedUpsert(Box::new(Object::NetworkPolicy(p))));
            }
            watcher::Event::Apply(p) => {
                if let Some(key) = policy_key(&p) {
                    out.push(Event::StagedRemove(StagedKey::NetworkPolicy(key)));
                }
                out.push(Event::PolicyUpsert(Box::new(p)));
            }
            watcher::Event::Delete(p) => {
                if let Some(key) = policy_key(&p) {
                    out.push(Event::PolicyRemove(key.clone()));
                    out.push(Event::StagedRemove(StagedKey::NetworkPolicy(key)));
                }
            }
        }
    }
}

fn policy_key(p: &NetworkPolicy) -> Option<PolicyKey> {
    Some(PolicyKey {
        namespace: p.metadata.namespace.clone()?,
        name: p.metadata.name.clone()?,
    })
}

/// Where node inventory events come from, in the agent's log lines.
pub const NODE_ORIGIN: &str = "Kubernetes API (Nodes)";

/// Nodes as the engine's inventory (name, labels, InternalIP/ExternalIP addresses) for admin
/// `nodes` peers, with what the tunnel between nodes needs (InternalIP addresses, pod ranges).
/// Only changes of those are sent: a Node's status changes every few seconds (heartbeats) and
/// each event sent re-checks the established flows.
#[derive(Default)]
pub struct NodeInventory {
    known: BTreeMap<String, NodeInfo>,
    relist: Option<Vec<NodeInfo>>,
    synced: bool,
}

/// A Node's name, labels and addresses, its `InternalIP` addresses (where its agent's tunnel
/// listens) and its pod ranges (`spec.podCIDRs`, else `spec.podCIDR`). Errors name the field.
fn node_info(n: &k8s_openapi::api::core::v1::Node) -> Result<NodeInfo, (String, String)> {
    let node = policy::node_from_object(n).map_err(|e| (e.field, e.message))?;
    let tunnel_addresses = n
        .status
        .as_ref()
        .and_then(|s| s.addresses.as_ref())
        .into_iter()
        .flatten()
        .filter(|a| a.type_ == "InternalIP")
        .filter_map(|a| a.address.parse().ok())
        .filter(|ip| node.addresses.contains(ip))
        .collect();
    let spec = n.spec.as_ref();
    let listed: Vec<(String, &String)> = match spec.and_then(|s| s.pod_cidrs.as_ref()) {
        Some(cidrs) if !cidrs.is_empty() => cidrs
            .iter()
            .enumerate()
            .map(|(i, c)| (format!("spec.podCIDRs[{i}]"), c))
            .collect(),
        _ => spec
            .and_then(|s| s.pod_cidr.as_ref())
            .map(|c| ("spec.podCIDR".to_owned(), c))
            .into_iter()
            .collect(),
    };
    let mut pod_cidrs = Vec::new();
    for (field, text) in listed {
        let net = crate::runtime::parse_pod_cidr(text).map_err(|e| (field, e))?;
        if !pod_cidrs.contains(&net) {
            pod_cidrs.push(net);
        }
    }
    Ok(NodeInfo {
        node,
        tunnel_addresses,
        pod_cidrs,
    })
}

fn inventory_node(n: &k8s_openapi::api::core::v1::Node) -> Option<NodeInfo> {
    match node_info(n) {
        Ok(node) => Some(node),
        Err((field, message)) => {
            tracing::error!(
                "Node {}: {field}: {message} (refused; its previous version, if any, stays in force)",
                n.metadata.name.as_deref().unwrap_or_default(),
            );
            None
        }
    }
}

impl NodeInventory {
    pub fn synced(&self) -> bool {
        self.synced
    }

    pub fn handle(
        &mut self,
        ev: watcher::Event<k8s_openapi::api::core::v1::Node>,
        out: &mut Vec<Event>,
    ) {
        match ev {
            watcher::Event::Init => self.relist = Some(Vec::new()),
            watcher::Event::InitApply(n) => {
                if let Some(node) = inventory_node(&n) {
                    self.relist.get_or_insert_with(Vec::new).push(node);
                } else if let Some(old) = n.metadata.name.as_ref().and_then(|k| self.known.get(k)) {
                    // Refused: its previous version stays.
                    let old = old.clone();
                    self.relist.get_or_insert_with(Vec::new).push(old);
                }
            }
            watcher::Event::InitDone => {
                let nodes = self.relist.take().unwrap_or_default();
                let now: BTreeMap<String, NodeInfo> = nodes
                    .iter()
                    .map(|n| (n.name().to_owned(), n.clone()))
                    .collect();
                if !self.synced || now != self.known {
                    out.push(Event::Nodes {
                        origin: NODE_ORIGIN.to_owned(),
                        nodes,
                    });
                }
                self.known = now;
                self.synced = true;
            }
            watcher::Event::Apply(n) => {
                if let Some(node) = inventory_node(&n)
                    && self.known.get(node.name()) != Some(&node)
                {
                    self.known.insert(node.name().to_owned(), node.clone());
                    out.push(Event::NodeUpsert(node));
                }
            }
            watcher::Event::Delete(n) => {
                if let Some(name) = n.metadata.name
                    && self.known.remove(&name).is_some()
                {
                    out.push(Event::NodeRemove(name));
                }
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn ns(name: &str, labels: &[(&str, &str)]) -> PartialObjectMeta<Namespace> {
        let mut n: PartialObjectMeta<Namespace> = PartialObjectMeta::default();
        n.metadata.name = Some(name.into());
        n.metadata.labels = Some(
            labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        );
        n
    }

    fn np(ns: &str, name: &str) -> NetworkPolicy {
        serde_json::from_value(serde_json::json!({
            "metadata": {"namespace": ns, "name": name}, "spec": {"podSelector": {}}
        }))
        .unwrap()
    }

    fn k8s_node(v: serde_json::Value) -> k8s_openapi::api::core::v1::Node {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn nodes_carry_their_internal_addresses_and_pod_cidrs() {
        let n = k8s_node(serde_json::json!({
            "metadata": {"name": "node-b", "labels": {"zone": "b"}},
            "spec": {"podCIDR": "10.2.0.0/24", "podCIDRs": ["10.2.0.0/24", "fd00:2::/64"]},
            "status": {"addresses": [
                {"type": "Hostname", "address": "node-b"},
                {"type": "ExternalIP", "address": "203.0.113.2"},
                {"type": "InternalIP", "address": "192.0.2.2"}]}
        }));
        let info = node_info(&n).unwrap();
        assert_eq!(info.node.addresses.len(), 2);
        assert_eq!(
            info.tunnel_addresses,
            ["192.0.2.2".parse::<std::net::IpAddr>().unwrap()]
        );
        assert_eq!(info.pod_cidrs.len(), 2);
        // Only the singular field (older clusters).
        let n = k8s_node(serde_json::json!({
            "metadata": {"name": "node-c"}, "spec": {"podCIDR": "10.3.0.0/24"}
        }));
        let info = node_info(&n).unwrap();
        assert_eq!(
            info.pod_cidrs,
            ["10.3.0.0/24".parse::<ipnet::IpNet>().unwrap()]
        );
        assert!(info.tunnel_addresses.is_empty());
        // A bad one names the field, and the watcher keeps the node's previous version.
        let bad = k8s_node(serde_json::json!({
            "metadata": {"name": "node-c"}, "spec": {"podCIDRs": ["10.3.0.0/24", "10.4.0.9/24"]}
        }));
        let (field, message) = node_info(&bad).unwrap_err();
        assert_eq!(field, "spec.podCIDRs[1]");
        assert!(message.contains("host bits"), "{message}");
        let mut inv = NodeInventory::default();
        let mut out = Vec::new();
        inv.handle(watcher::Event::Init, &mut out);
        inv.handle(watcher::Event::InitApply(n.clone()), &mut out);
        inv.handle(watcher::Event::InitDone, &mut out);
        assert!(matches!(&out[..], [Event::Nodes { nodes, .. }] if nodes[0].pod_cidrs.len() == 1));
        out.clear();
        inv.handle(watcher::Event::Apply(bad), &mut out);
        assert!(out.is_empty(), "{out:?}");
        // A change of pod ranges alone is a change.
        let wider = k8s_node(serde_json::json!({
            "metadata": {"name": "node-c"}, "spec": {"podCIDR": "10.3.0.0/23"}
        }));
        inv.handle(watcher::Event::Apply(wider), &mut out);
        assert!(matches!(&out[..], [Event::NodeUpsert(n)] if n.pod_cidrs[0].prefix_len() == 23));
    }

    #[test]
    fn namespaces_relist_sends_changes_and_removals_only() {
        let mut n = Namespaces::default();
        let mut out = Vec::new();
        n.handle(watcher::Event::Init, &mut out);
        n.handle(
            watcher::Event::InitApply(ns("a", &[("team", "x")])),
            &mut out,
        );
        n.handle(watcher::Event::InitApply(ns("b", &[])), &mut out);
        assert!(out.is_empty() && !n.synced());
        n.handle(watcher::Event::InitDone, &mut out);
        assert_eq!(out.len(), 2);
        assert!(n.synced());
        out.clear();
        // Relist: a changed, b gone, c new.
        for e in [
            watcher::Event::Init,
            watcher::Event::InitApply(ns("a", &[("team", "y")])),
            watcher::Event::InitApply(ns("c", &[])),
            watcher::Event::InitDone,
        ] {
            n.handle(e, &mut out);
        }
        assert_eq!(
            out,
            [
                Event::Namespace {
                    name: "b".into(),
                    labels: None,
                    require_encryption: false
                },
                Event::Namespace {
                    name: "a".into(),
                    labels: Some(BTreeMap::from([("team".into(), "y".into())])),
                    require_encryption: false
                },
                Event::Namespace {
                    name: "c".into(),
                    labels: Some(BTreeMap::new()),
                    require_encryption: false
                },
            ]
        );
        out.clear();
        n.handle(watcher::Event::Apply(ns("c", &[])), &mut out);
        assert!(out.is_empty(), "unchanged labels say nothing");
        n.handle(watcher::Event::Delete(ns("c", &[])), &mut out);
        assert_eq!(
            out,
            [Event::Namespace {
                name: "c".into(),
                labels: None,
                require_encryption: false
            }]
        );
    }

    #[test]
    fn a_namespace_annotated_to_require_encryption_says_so_and_its_removal_too() {
        let mut n = Namespaces::default();
        let mut out = Vec::new();
        let mut annotated = ns("shop", &[]);
        annotated.metadata.annotations = Some(BTreeMap::from([(
            REQUIRE_ENCRYPTION.to_owned(),
            "true".to_owned(),
        )]));
        n.handle(watcher::Event::Apply(annotated), &mut out);
        n.handle(watcher::Event::Apply(ns("shop", &[])), &mut out);
        assert_eq!(
            out.iter()
                .map(|e| match e {
                    Event::Namespace {
                        require_encryption, ..
                    } => *require_encryption,
                    other => panic!("{other:?}"),
                })
                .collect::<Vec<_>>(),
            [true, false],
            "the annotation alone changing is a change"
        );
    }

    #[test]
    fn policies_relist_is_one_set_and_changes_single_events() {
        let mut p = Policies::default();
        let mut out = Vec::new();
        for e in [
            watcher::Event::Init,
            watcher::Event::InitApply(np("b", "deny")),
            watcher::Event::InitApply(np("a", "allow")),
        ] {
            p.handle(e, &mut out);
        }
        assert!(out.is_empty());
        p.handle(watcher::Event::InitDone, &mut out);
        let [
            Event::Policies {
                policies,
                origin,
                admin: None,
            },
            Event::Staged {
                scope: StagedScope::NetworkPolicies,
                objects: staged,
                ..
            },
        ] = out.as_slice()
        else {
            panic!("{out:?}")
        };
        assert_eq!(origin, POLICY_ORIGIN);
        assert!(staged.is_empty());
        let names: Vec<_> = policies
            .iter()
            .map(|p| p.metadata.name.clone().unwrap())
            .collect();
        assert_eq!(names, ["allow", "deny"]);
        out.clear();
        p.handle(watcher::Event::Apply(np("a", "new")), &mut out);
        p.handle(watcher::Event::Delete(np("b", "deny")), &mut out);
        let key = |ns: &str, name: &str| PolicyKey {
            namespace: ns.into(),
            name: name.into(),
        };
        // An enforced policy is not staged (any more); a deleted one neither.
        assert_eq!(
            out[0],
            Event::StagedRemove(StagedKey::NetworkPolicy(key("a", "new")))
        );
        assert!(
            matches!(&out[1], Event::PolicyUpsert(x) if x.metadata.name.as_deref() == Some("new"))
        );
        assert_eq!(
            out[2..],
            [
                Event::PolicyRemove(key("b", "deny")),
                Event::StagedRemove(StagedKey::NetworkPolicy(key("b", "deny")))
            ]
        );
    }

    /// A staged NetworkPolicy is never enforced but staged: left out of a relist's enforced
    /// set and in its staged set, and a policy that becomes staged is removed and staged.
    #[test]
    fn staged_policies_are_not_enforced() {
        let staged = |mut p: NetworkPolicy| {
            p.metadata.annotations = Some(BTreeMap::from([(
                policy::objects::STAGED_ANNOTATION.to_owned(),
                "true".to_owned(),
            )]));
            p
        };
        let mut p = Policies::default();
        let mut out = Vec::new();
        p.handle(watcher::Event::Init, &mut out);
        p.handle(watcher::Event::InitApply(np("a", "kept")), &mut out);
        p.handle(
            watcher::Event::InitApply(staged(np("a", "trial"))),
            &mut out,
        );
        p.handle(watcher::Event::InitDone, &mut out);
        let [
            Event::Policies { policies, .. },
            Event::Staged { objects: trial, .. },
        ] = out.as_slice()
        else {
            panic!("{out:?}")
        };
        assert_eq!(policies.len(), 1);
        assert_eq!(*trial, [Object::NetworkPolicy(staged(np("a", "trial")))]);
        out.clear();
        p.handle(watcher::Event::Apply(staged(np("a", "kept"))), &mut out);
        assert_eq!(
            out,
            [
                Event::PolicyRemove(PolicyKey {
                    namespace: "a".into(),
                    name: "kept".into()
                }),
                Event::StagedUpsert(Box::new(Object::NetworkPolicy(staged(np("a", "kept")))))
            ]
        );
    }
}
