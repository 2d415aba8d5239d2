//! The node inventory: what admin `nodes` peers select. A node is a name, labels and addresses;
//! a `nodes` peer (a label selector on node labels) matches a connection whose peer address is
//! an address of a node whose labels it selects.
//!
//! Nothing compiled depends on the inventory: admin rules keep their node selectors, and a
//! decision looks the peer's address up here when (and only when) it tries a `nodes` peer. A
//! node relabelled, readdressed or removed changes the next decision, with no re-indexing.

use std::collections::BTreeMap;

use ahash::HashMap;
use std::net::IpAddr;

use k8s_openapi::api::core::v1::Node as NodeObject;

use crate::PolicyError;
use crate::model::Node;
use crate::selector::{Selector, is_dns1123_subdomain};
use crate::validate::{Ctx, check_labels};

/// Index of a node in the inventory's slab.
pub(crate) type NodeId = u32;

/// The nodes the engine knows, by name and by address.
#[derive(Clone, Default)]
pub(crate) struct NodeInventory {
    /// `None` slots are free.
    slab: Vec<Option<Node>>,
    free: Vec<NodeId>,
    /// Name → id, in name order (for listing).
    by_name: BTreeMap<String, NodeId>,
    /// Address → the nodes that claim it. Normally one; two while an address moves from a node
    /// to another and the old node's update has not arrived yet. A `nodes` peer matches if it
    /// selects any of them, whichever update came first.
    by_ip: HashMap<IpAddr, Vec<NodeId>>,
}

impl NodeInventory {
    /// Adds or replaces a node (already checked).
    pub(crate) fn apply(&mut self, node: Node) {
        let id = match self.by_name.get(&node.name) {
            Some(id) => {
                let id = *id;
                self.unindex(id);
                id
            }
            None => {
                let id = match self.free.pop() {
                    Some(id) => id,
                    None => {
                        self.slab.push(None);
                        // More than u32::MAX nodes cannot be held in memory anyway.
                        NodeId::try_from(self.slab.len() - 1).unwrap_or(NodeId::MAX)
                    }
                };
                self.by_name.insert(node.name.clone(), id);
                id
            }
        };
        for ip in &node.addresses {
            let holders = self.by_ip.entry(*ip).or_default();
            if !holders.contains(&id) {
                holders.push(id);
            }
        }
        if let Some(slot) = self.slab.get_mut(id as usize) {
            *slot = Some(node);
        }
    }

    /// Forgets a node; `None` if unknown.
    pub(crate) fn remove(&mut self, name: &str) -> Option<Node> {
        let id = self.by_name.remove(name)?;
        self.unindex(id);
        self.free.push(id);
        self.slab.get_mut(id as usize).and_then(Option::take)
    }

    /// Takes node `id`'s addresses out of the address index.
    fn unindex(&mut self, id: NodeId) {
        let Some(node) = self.slab.get(id as usize).and_then(Option::as_ref) else {
            return;
        };
        for ip in &node.addresses {
            if let Some(holders) = self.by_ip.get_mut(ip) {
                holders.retain(|h| *h != id);
                if holders.is_empty() {
                    self.by_ip.remove(ip);
                }
            }
        }
    }

    pub(crate) fn get(&self, name: &str) -> Option<&Node> {
        self.by_name.get(name).and_then(|id| self.node(*id))
    }

    fn node(&self, id: NodeId) -> Option<&Node> {
        self.slab.get(id as usize).and_then(Option::as_ref)
    }

    /// Every node, in name order.
    pub(crate) fn iter(&self) -> impl Iterator<Item = &Node> {
        self.by_name.values().filter_map(|id| self.node(*id))
    }

    pub(crate) fn len(&self) -> usize {
        self.by_name.len()
    }

    /// The nodes that hold `ip`, in the order they claimed it.
    pub(crate) fn at(&self, ip: &IpAddr) -> impl Iterator<Item = &Node> {
        self.by_ip
            .get(ip)
            .map_or(&[][..], Vec::as_slice)
            .iter()
            .filter_map(|id| self.node(*id))
    }

    /// Whether `ip` is an address of a node whose labels `selector` matches: what a `nodes`
    /// peer asks. No allocation; one hash lookup.
    pub(crate) fn selects(&self, ip: &IpAddr, selector: &Selector) -> bool {
        if self.by_ip.is_empty() {
            return false;
        }
        self.at(ip).any(|n| selector.matches(&n.labels))
    }
}

/// Checks a node given by other means (static inventory): a valid name, valid labels, unicast
/// addresses. A repeated address is kept once.
pub(crate) fn check_node(mut node: Node) -> Result<Node, PolicyError> {
    let ctx = Ctx {
        kind: "Node",
        object: if node.name.is_empty() {
            "<unnamed>".to_owned()
        } else {
            node.name.clone()
        },
    };
    check_name(&ctx, "name", &node.name)?;
    check_labels(&ctx, "labels", &node.labels)?;
    let mut addresses: Vec<IpAddr> = Vec::with_capacity(node.addresses.len());
    for (i, ip) in node.addresses.iter().enumerate() {
        check_address(&ctx, &format!("addresses[{i}]"), ip)?;
        if !addresses.contains(ip) {
            addresses.push(*ip);
        }
    }
    node.addresses = addresses;
    Ok(node)
}

fn check_name(ctx: &Ctx, field: &str, name: &str) -> Result<(), PolicyError> {
    if name.is_empty() {
        return Err(ctx.err(field, "name is required"));
    }
    if !is_dns1123_subdomain(name) {
        return Err(ctx.err(
            field,
            format!("{name:?} is not a valid node name (a lowercase DNS-1123 subdomain)"),
        ));
    }
    Ok(())
}

/// A node address must be one a connection can come from or go to.
fn check_address(ctx: &Ctx, field: &str, ip: &IpAddr) -> Result<(), PolicyError> {
    let broadcast = matches!(ip, IpAddr::V4(v4) if v4.is_broadcast());
    if ip.is_unspecified() || ip.is_multicast() || broadcast {
        return Err(ctx.err(
            field,
            format!("{ip} is not a unicast address: no connection has it as its peer"),
        ));
    }
    Ok(())
}

/// The address types of `status.addresses` that are IP addresses; `Hostname`, `InternalDNS`
/// and `ExternalDNS` are names.
const IP_ADDRESS_TYPES: [&str; 2] = ["InternalIP", "ExternalIP"];

/// A Kubernetes Node object (`v1`, cluster-scoped) as the engine sees it: `metadata.name`,
/// `metadata.labels`, and the `InternalIP` / `ExternalIP` entries of `status.addresses`.
pub fn node_from_object(object: &NodeObject) -> Result<Node, PolicyError> {
    let name = object.metadata.name.clone().unwrap_or_default();
    let ctx = Ctx {
        kind: "Node",
        object: if name.is_empty() {
            "<unnamed>".to_owned()
        } else {
            name.clone()
        },
    };
    check_name(&ctx, "metadata.name", &name)?;
    let labels = object.metadata.labels.clone().unwrap_or_default();
    check_labels(&ctx, "metadata.labels", &labels)?;
    let mut addresses = Vec::new();
    let listed = object.status.as_ref().and_then(|s| s.addresses.as_ref());
    for (i, a) in listed.into_iter().flatten().enumerate() {
        if !IP_ADDRESS_TYPES.contains(&a.type_.as_str()) {
            continue;
        }
        let field = format!("status.addresses[{i}].address");
        let ip: IpAddr = a.address.parse().map_err(|_| {
            ctx.err(
                &field,
                format!(
                    "{:?} is not a valid IP address (type {})",
                    a.address, a.type_
                ),
            )
        })?;
        check_address(&ctx, &field, &ip)?;
        if !addresses.contains(&ip) {
            addresses.push(ip);
        }
    }
    Ok(Node {
        name,
        labels,
        addresses,
    })
}
