//! The optimized admin evaluation (per-workload index, walks of rule summaries, per-decision
//! selector memo with interned selectors, node lookup by address) against a straightforward
//! reference: every admin policy in force, its subject matched directly, every rule matched as
//! written (`nodes` peers by a scan of every node, `domainNames` by a plain reading of the
//! API's examples), on random clusters with nodes and host-network pods, random admin policies
//! of the three kinds, updates and removals of policies, then of nodes.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::IpAddr;

use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use proptest::prelude::*;
use serde_json::{Value, json};

use super::*;
use crate::admin::{AdminNetworkPolicy, BaselineAdminNetworkPolicy, ClusterNetworkPolicy};
use crate::compiled::{LabelSet, PeerSelector, SelectorMemo};
use crate::model::{Node, Peer, Protocol};

impl Engine {
    /// The reference: no index for admin policies, no prefilter, no memo.
    fn decide_reference(&self, conn: &Connection<'_>) -> Decision {
        let Some(entry) = self.workloads.get(conn.local) else {
            return self.decide(conn);
        };
        if entry.workload.host_network {
            return self.decide(conn);
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
        let ns_labels = self.namespace_labels_or_default(&entry.workload.key.namespace);
        let peer = PeerQuery {
            peer: conn.peer,
            ip: conn.peer_ip,
            names: match conn.direction {
                Direction::Egress => conn.resolved_names,
                Direction::Ingress => &[],
            },
            nodes: &self.nodes,
        };
        let tier_hit = |tier: Tier| {
            let mut policies: Vec<&CompiledAdmin> = self
                .admin_policies
                .iter()
                .flatten()
                .filter(|p| {
                    p.tier == tier
                        && p.subject.matches(&ns_labels, &entry.workload.labels)
                        && !p.rules(conn.direction).is_empty()
                })
                .collect();
            policies.sort_by(|a, b| a.precedence().cmp(&b.precedence()));
            policies.into_iter().find_map(|policy| {
                policy
                    .rules(conn.direction)
                    .iter()
                    .enumerate()
                    .find(|(_, r)| r.matches_plain(&peer, &query))
                    .map(|(index, rule)| AdminHit {
                        policy,
                        index,
                        rule,
                    })
            })
        };
        if let Some(hit) = tier_hit(Tier::Admin)
            && hit.rule.action != AdminAction::Pass
        {
            return hit.decision(conn.direction).to_decision();
        }
        let ids = entry.list(conn.direction);
        if !ids.is_empty() {
            for id in ids {
                let policy = self.policy(*id).unwrap();
                let rules = policy.rules(conn.direction).unwrap_or(&[]);
                if let Some(index) = rules
                    .iter()
                    .position(|r| r.matches(conn.peer, conn.peer_ip, &query))
                {
                    return Decision {
                        allowed: true,
                        reason: Reason::AllowedBy(RuleRef {
                            policy: policy.key.clone(),
                            direction: conn.direction,
                            index,
                        }),
                    };
                }
            }
            return Decision {
                allowed: false,
                reason: Reason::Isolated(
                    ids.iter()
                        .map(|id| self.policy(*id).unwrap().key.clone())
                        .collect(),
                ),
            };
        }
        if let Some(hit) = tier_hit(Tier::Baseline) {
            return hit.decision(conn.direction).to_decision();
        }
        Decision {
            allowed: true,
            reason: Reason::NotIsolated,
        }
    }
}

const NAMESPACES: [&str; 3] = ["a", "b", "c"];

fn selector() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(json!({})),
        (
            prop::sample::select(vec!["app", "team", "env"]),
            prop::sample::select(vec!["web", "db", "x", "y", "prod"])
        )
            .prop_map(|(k, v)| json!({"matchLabels": {k: v}})),
        (
            prop::sample::select(vec!["app", "team"]),
            prop::sample::select(vec!["In", "NotIn"]),
            prop::sample::subsequence(vec!["web", "db", "x"], 1..3),
        )
            .prop_map(
                |(k, op, v)| json!({"matchExpressions": [{"key": k, "operator": op, "values": v}]})
            ),
        (
            prop::sample::select(vec!["app", "canary"]),
            prop::sample::select(vec!["Exists", "DoesNotExist"]),
        )
            .prop_map(|(k, op)| json!({"matchExpressions": [{"key": k, "operator": op}]})),
    ]
}

/// A selector on node labels (`role`, `zone`).
fn node_selector() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(json!({})),
        (
            prop::sample::select(vec!["role", "zone"]),
            prop::sample::select(vec!["control-plane", "worker", "a", "b"])
        )
            .prop_map(|(k, v)| json!({"matchLabels": {k: v}})),
        prop::sample::select(vec!["control-plane", "worker"]).prop_map(
            |v| json!({"matchExpressions": [{"key": "role", "operator": "NotIn", "values": [v]}]})
        ),
        Just(json!({"matchExpressions": [{"key": "zone", "operator": "Exists"}]})),
    ]
}

/// `domainNames` patterns: exact, wildcard, uppercase and absolute spellings.
const PATTERNS: [&str; 6] = [
    "example.com",
    "*.example.com",
    "API.Example.COM.",
    "*.b.example.com",
    "other.org",
    "_svc._tcp.example.com",
];

/// Names resolved to the peer's address, as the datapath would give them (and two spellings it
/// would not: the matching does not rely on lowercase or on the dot being gone).
const NAME_SETS: [&[&str]; 7] = [
    &[],
    &[".example.com", "example.org"],
    &["example.com"],
    &["www.example.com"],
    &["a.b.example.com", "other.org"],
    &["api.example.com", "_svc._tcp.example.com"],
    &["WWW.Example.com."],
];

/// A peer of an admin rule; `{}` makes the rule fail closed, and so does `domainNames` in a
/// Deny or Pass rule or in a BaselineAdminNetworkPolicy.
fn admin_peer(egress: bool) -> impl Strategy<Value = Value> {
    let mut options = vec![
        (3, selector().prop_map(|s| json!({"namespaces": s})).boxed()),
        (
            3,
            (selector(), selector())
                .prop_map(|(n, p)| json!({"pods": {"namespaceSelector": n, "podSelector": p}}))
                .boxed(),
        ),
    ];
    if egress {
        options.push((
            2,
            prop::sample::select(vec![
                "10.0.0.0/16",
                "10.0.1.0/24",
                "0.0.0.0/0",
                "192.0.2.0/24",
            ])
            .prop_map(|n| json!({"networks": [n]}))
            .boxed(),
        ));
        options.push((2, node_selector().prop_map(|s| json!({"nodes": s})).boxed()));
        options.push((
            2,
            prop::sample::subsequence(PATTERNS.to_vec(), 1..4)
                .prop_map(|d| json!({"domainNames": d}))
                .boxed(),
        ));
    } else {
        options.push((1, Just(json!({})).boxed()));
    }
    proptest::strategy::Union::new_weighted(options)
}

/// v1alpha2 `protocols` entries.
fn v2_port() -> impl Strategy<Value = Value> {
    prop::sample::select(vec![
        json!({"tcp": {"destinationPort": {"number": 80}}}),
        json!({"tcp": {"destinationPort": {"range": {"start": 8000, "end": 8080}}}}),
        json!({"udp": {"destinationPort": {"number": 53}}}),
        json!({"sctp": {"destinationPort": {"number": 80}}}),
        json!({"destinationNamedPort": "http"}),
        json!({"destinationNamedPort": "dns"}),
    ])
}

/// v1alpha1 `ports` entries.
fn v1_port() -> impl Strategy<Value = Value> {
    prop::sample::select(vec![
        json!({"portNumber": {"port": 80}}),
        json!({"portNumber": {"protocol": "UDP", "port": 53}}),
        json!({"portRange": {"start": 8000, "end": 8080}}),
        json!({"portRange": {"protocol": "SCTP", "start": 79, "end": 81}}),
        json!({"namedPort": "http"}),
        json!({"namedPort": "dns"}),
    ])
}

fn admin_rule(egress: bool, v2: bool, actions: Vec<&'static str>) -> impl Strategy<Value = Value> {
    let port = if v2 {
        v2_port().boxed()
    } else {
        v1_port().boxed()
    };
    (
        prop::sample::select(actions),
        prop::collection::vec(admin_peer(egress), 1..3),
        prop::option::of(prop::collection::vec(port, 1..3)),
    )
        .prop_map(move |(action, peers, ports)| {
            let mut r = json!({"action": action});
            r[if egress { "to" } else { "from" }] = json!(peers);
            if let Some(p) = ports {
                // Named ports cannot go with networks, nodes or domainNames peers (the API's
                // rule).
                let ip_peers = peers.iter().any(|p| {
                    p.get("networks").is_some()
                        || p.get("nodes").is_some()
                        || p.get("domainNames").is_some()
                });
                let p: Vec<Value> = p
                    .into_iter()
                    .filter(|p| {
                        !(ip_peers
                            && (p.get("destinationNamedPort").is_some()
                                || p.get("namedPort").is_some()))
                    })
                    .collect();
                if !p.is_empty() {
                    r[if v2 { "protocols" } else { "ports" }] = json!(p);
                }
            }
            r
        })
}

fn subject() -> impl Strategy<Value = Value> {
    prop_oneof![
        selector().prop_map(|s| json!({"namespaces": s})),
        (selector(), selector())
            .prop_map(|(n, p)| json!({"pods": {"namespaceSelector": n, "podSelector": p}})),
    ]
}

/// An admin object of one of the three kinds: (kind 0-2, name index, spec).
fn admin_object() -> impl Strategy<Value = (usize, usize, Value)> {
    let cnp = (
        prop::sample::select(vec!["Admin", "Baseline"]),
        0..4i64,
        subject(),
        prop::collection::vec(admin_rule(false, true, vec!["Accept", "Deny", "Pass"]), 0..3),
        prop::collection::vec(admin_rule(true, true, vec!["Accept", "Deny", "Pass"]), 0..3),
    )
        .prop_map(|(tier, priority, subject, ingress, egress)| {
            (0, json!({"tier": tier, "priority": priority, "subject": subject, "ingress": ingress, "egress": egress}))
        });
    let anp = (
        0..4i64,
        subject(),
        prop::collection::vec(admin_rule(false, false, vec!["Allow", "Deny", "Pass"]), 0..3),
        prop::collection::vec(admin_rule(true, false, vec!["Allow", "Deny", "Pass"]), 0..3),
    )
        .prop_map(|(priority, subject, ingress, egress)| {
            (1, json!({"priority": priority, "subject": subject, "ingress": ingress, "egress": egress}))
        });
    let banp = (
        subject(),
        prop::collection::vec(admin_rule(false, false, vec!["Allow", "Deny"]), 0..3),
        prop::collection::vec(admin_rule(true, false, vec!["Allow", "Deny"]), 0..3),
    )
        .prop_map(|(subject, ingress, egress)| {
            (
                2,
                json!({"subject": subject, "ingress": ingress, "egress": egress}),
            )
        });
    (prop_oneof![4 => cnp, 3 => anp, 1 => banp], 0..4usize)
        .prop_map(|((kind, spec), name)| (kind, name, spec))
}

fn np_spec() -> impl Strategy<Value = Value> {
    let peer = prop_oneof![
        selector().prop_map(|s| json!({"podSelector": s})),
        selector().prop_map(|s| json!({"namespaceSelector": s})),
        Just(json!({"ipBlock": {"cidr": "10.0.0.0/16"}})),
    ];
    let port = prop::sample::select(vec![json!({"port": 80}), json!({"protocol": "UDP"})]);
    (
        selector(),
        prop::sample::select(vec![
            vec!["Ingress"],
            vec!["Egress"],
            vec!["Ingress", "Egress"],
        ]),
        prop::collection::vec(peer, 0..2),
        prop::collection::vec(port, 0..2),
    )
        .prop_map(|(sel, types, peers, ports)| {
            json!({"podSelector": sel, "policyTypes": types,
                   "ingress": [{"from": peers, "ports": ports}],
                   "egress": [{"to": peers, "ports": ports}]})
        })
}

/// Node addresses: a pool small enough that nodes share some (an address moving between
/// nodes) and that host-network pods sit on them.
const NODE_IPS: [&str; 5] = [
    "172.16.0.1",
    "172.16.0.2",
    "172.16.0.3",
    "fd00::1",
    "fd00::2",
];

/// A node: role, zone (if any), addresses (indexes into [`NODE_IPS`]).
type NodeSpec = (&'static str, Option<&'static str>, Vec<usize>);

fn node_spec() -> impl Strategy<Value = NodeSpec> {
    (
        prop::sample::select(vec!["control-plane", "worker"]),
        prop::option::of(prop::sample::select(vec!["a", "b"])),
        prop::collection::vec(0..NODE_IPS.len(), 0..3),
    )
}

/// A change to the inventory after the policies: node `i` (of 3) replaced, or removed.
#[derive(Clone, Debug)]
enum NodeOp {
    Apply(usize, NodeSpec),
    Remove(usize),
}

#[derive(Clone, Debug)]
struct World {
    /// Per pod: namespace, app label, canary label, container port 80 named `http`, and
    /// host network on a node address (an index into [`NODE_IPS`]).
    pods: Vec<(usize, &'static str, bool, bool, Option<usize>)>,
    netpols: Vec<(usize, Value)>,
    /// Nodes `n0`, `n1`, ... applied before the pods.
    nodes: Vec<NodeSpec>,
    /// Applied in order (a repeated name replaces the earlier version).
    admin: Vec<(usize, usize, Value)>,
    /// Then removed: (kind, name index).
    removed: Vec<(usize, usize)>,
    /// Then the inventory changes: relabels, readdresses, removals, new nodes.
    node_ops: Vec<NodeOp>,
}

fn world() -> impl Strategy<Value = World> {
    let node_op = prop_oneof![
        3 => (0..3usize, node_spec()).prop_map(|(i, n)| NodeOp::Apply(i, n)),
        1 => (0..3usize).prop_map(NodeOp::Remove),
    ];
    (
        prop::collection::vec(
            (
                0..NAMESPACES.len(),
                prop::sample::select(vec!["web", "db", "client"]),
                any::<bool>(),
                any::<bool>(),
                prop::option::weighted(0.2, 0..NODE_IPS.len()),
            ),
            2..5,
        ),
        prop::collection::vec((0..NAMESPACES.len(), np_spec()), 0..3),
        prop::collection::vec(node_spec(), 0..3),
        prop::collection::vec(admin_object(), 1..8),
        prop::collection::vec((0..3usize, 0..4usize), 0..2),
        prop::collection::vec(node_op, 0..3),
    )
        .prop_map(|(pods, netpols, nodes, admin, removed, node_ops)| World {
            pods,
            netpols,
            nodes,
            admin,
            removed,
            node_ops,
        })
}

fn node(i: usize, (role, zone, ips): &NodeSpec) -> Node {
    let mut labels = Labels::from([("role".to_owned(), (*role).to_owned())]);
    if let Some(z) = zone {
        labels.insert("zone".to_owned(), (*z).to_owned());
    }
    Node {
        name: format!("n{i}"),
        labels,
        addresses: ips.iter().map(|i| NODE_IPS[*i].parse().unwrap()).collect(),
    }
}

/// The inventory changes of `w`, after [`build`].
fn change_nodes(e: &mut Engine, w: &World) {
    for op in &w.node_ops {
        match op {
            NodeOp::Apply(i, spec) => e.apply_node(node(*i, spec)).unwrap(),
            NodeOp::Remove(i) => e.remove_node(&format!("n{i}")),
        }
    }
}

fn admin_key(kind: usize, name: usize) -> AdminPolicyKey {
    let (kind, name) = match kind {
        0 => (crate::AdminKind::ClusterNetworkPolicy, format!("cnp{name}")),
        1 => (crate::AdminKind::AdminNetworkPolicy, format!("anp{name}")),
        _ => (
            crate::AdminKind::BaselineAdminNetworkPolicy,
            "default".into(),
        ),
    };
    AdminPolicyKey { kind, name }
}

fn build(w: &World) -> Engine {
    let mut e = Engine::new();
    for (i, ns) in NAMESPACES.iter().enumerate() {
        let labels = match i {
            0 => json!({"team": "x", "env": "prod"}),
            1 => json!({"team": "y"}),
            _ => json!({"team": "x", "app": "db"}),
        };
        let ns: Namespace =
            serde_json::from_value(json!({"metadata": {"name": ns, "labels": labels}})).unwrap();
        e.apply_namespace(&ns).unwrap();
    }
    for (i, spec) in w.nodes.iter().enumerate() {
        e.apply_node(node(i, spec)).unwrap();
    }
    for (i, (ns, app, canary, named, host)) in w.pods.iter().enumerate() {
        let mut labels = json!({"app": app});
        if *canary {
            labels["canary"] = json!("true");
        }
        let http = if *named {
            json!({"name": "http", "containerPort": 80})
        } else {
            json!({"containerPort": 80})
        };
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": format!("p{i}"), "namespace": NAMESPACES[*ns], "labels": labels},
            "spec": {"hostNetwork": host.is_some(), "containers": [{"name": "c", "ports": [
                http,
                {"name": "dns", "containerPort": 53, "protocol": "UDP"},
                {"name": "http", "containerPort": 80, "protocol": "SCTP"}
            ]}]},
            "status": {"podIP": match host {
                Some(n) => NODE_IPS[*n].to_owned(),
                None => format!("10.0.{}.{}", ns, i + 1),
            }}
        }))
        .unwrap();
        e.apply_pod(&pod).unwrap();
    }
    for (i, (ns, spec)) in w.netpols.iter().enumerate() {
        let np: NetworkPolicy = serde_json::from_value(json!({
            "metadata": {"name": format!("np{i}"), "namespace": NAMESPACES[*ns]},
            "spec": spec
        }))
        .unwrap();
        e.apply_policy(&np).unwrap();
    }
    for (kind, name, spec) in &w.admin {
        let key = admin_key(*kind, *name);
        let object = json!({"metadata": {"name": key.name}, "spec": spec});
        match kind {
            0 => e
                .apply_cluster_network_policy(
                    &serde_json::from_value::<ClusterNetworkPolicy>(object).unwrap(),
                )
                .unwrap(),
            1 => e
                .apply_admin_network_policy(
                    &serde_json::from_value::<AdminNetworkPolicy>(object).unwrap(),
                )
                .unwrap(),
            _ => e
                .apply_baseline_admin_network_policy(
                    &serde_json::from_value::<BaselineAdminNetworkPolicy>(object).unwrap(),
                )
                .unwrap(),
        };
    }
    for (kind, name) in &w.removed {
        e.remove_admin_policy(&admin_key(*kind, *name));
    }
    e
}

const PROBES: [(u16, Protocol); 6] = [
    (80, Protocol::Tcp),
    (8050, Protocol::Tcp),
    (53, Protocol::Udp),
    (80, Protocol::Sctp),
    (443, Protocol::Tcp),
    (0, Protocol::ICMP),
];

/// Every pod, in both directions, against every pod (with and without its address; a
/// host-network pod by its address only), two IP-only peers and every node address, on every
/// probe, egress with every set of resolved names: the optimized decision equals the reference.
fn check_all(e: &Engine) -> Result<(), TestCaseError> {
    let pods: Vec<Workload> = e.workloads().cloned().collect();
    let mut peers: Vec<(Peer, Option<IpAddr>, Option<&Workload>)> = Vec::new();
    for w in &pods {
        if w.host_network {
            peers.push((Peer::IpOnly, w.ips.first().copied(), Some(w)));
            continue;
        }
        let id = Peer::Workload(e.identity(&w.key).unwrap());
        peers.push((id.clone(), w.ips.first().copied(), Some(w)));
        peers.push((id, None, Some(w)));
    }
    for ip in ["10.0.9.9", "192.0.2.7"].iter().chain(&NODE_IPS) {
        peers.push((Peer::IpOnly, Some(ip.parse().unwrap()), None));
    }
    for local in &pods {
        for (peer, ip, peer_w) in &peers {
            for (port, protocol) in PROBES {
                for direction in [Direction::Ingress, Direction::Egress] {
                    let name = match (direction, peer_w) {
                        (Direction::Egress, Some(w)) if !w.host_network => w
                            .ports
                            .iter()
                            .find(|p| p.port == port && p.protocol == protocol)
                            .and_then(|p| p.name.as_deref()),
                        _ => None,
                    };
                    // Ingress ignores names: one set is enough there.
                    let name_sets = match direction {
                        Direction::Egress => &NAME_SETS[..],
                        Direction::Ingress => &NAME_SETS[4..5],
                    };
                    for names in name_sets {
                        let conn = Connection {
                            local: &local.key,
                            direction,
                            peer,
                            peer_ip: *ip,
                            port,
                            protocol,
                            dest_port_name: name,
                            resolved_names: names,
                        };
                        prop_assert_eq!(e.decide(&conn), e.decide_reference(&conn), "{:?}", conn);
                    }
                }
            }
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn optimized_admin_evaluation_equals_the_reference(w in world()) {
        let mut e = build(&w);
        check_all(&e)?;
        // The inventory changes under the compiled policies: decisions follow at once.
        if !w.node_ops.is_empty() {
            change_nodes(&mut e, &w);
            check_all(&e)?;
        }
        // Every selector id in use is held by exactly the selectors the policies in force use.
        let mut uses: HashMap<u32, usize> = HashMap::default();
        let mut policies: Vec<CompiledAdmin> = e.admin_policies.iter().flatten().cloned().collect();
        for p in &mut policies {
            for s in p.peer_selectors_mut() {
                prop_assert!(s.id != PeerSelector::NO_ID);
                *uses.entry(s.id).or_default() += 1;
            }
        }
        prop_assert_eq!(uses.len(), e.admin_selectors.ids.len());
        for (id, n) in e.admin_selectors.ids.values() {
            prop_assert_eq!(uses.get(id), Some(n));
        }
        let mut conds: HashMap<u32, usize> = HashMap::default();
        for p in &mut policies {
            for r in p.rules_mut() {
                prop_assert!(r.cond != PeerSelector::NO_ID);
                *conds.entry(r.cond).or_default() += 1;
            }
        }
        prop_assert_eq!(conds.len(), e.admin_conds.ids.len());
        for (id, n) in e.admin_conds.ids.values() {
            prop_assert_eq!(conds.get(id), Some(n));
        }
    }
}

/// Two selectors in one memo slot: each keeps its own result.
#[test]
fn memo_collisions_re_evaluate() {
    let compile = |k: &str, v: &str| {
        PeerSelector::new(
            Selector::compile(
                &k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector {
                    match_labels: Some([(k.to_owned(), v.to_owned())].into()),
                    match_expressions: None,
                },
            )
            .unwrap(),
        )
    };
    let mut a = compile("app", "web");
    a.id = 0;
    let mut b = compile("app", "db");
    b.id = 32; // (32 << 1) % 64 == 0: the slot of id 0
    let labels = Labels::from([("app".to_owned(), "web".to_owned())]);
    let mut memo = SelectorMemo::new();
    for _ in 0..3 {
        assert!(memo.matches(&a, LabelSet::Pod, &labels));
        assert!(!memo.matches(&b, LabelSet::Pod, &labels));
        assert!(memo.matches(&a, LabelSet::Pod, &labels));
    }
    let empty = Labels::new();
    assert!(!memo.matches(&a, LabelSet::Namespace, &empty));
    assert!(memo.matches(&a, LabelSet::Pod, &labels));
}

// ----------------------------------------------------------------------------------------------
// NetworkPolicy walks (`walk.rs`) against the policies' rule lists, under changes.
// ----------------------------------------------------------------------------------------------

/// A NetworkPolicy port: numbers, ranges, protocols alone and named ports, some of which the
/// pods declare and some not.
fn np_port() -> impl Strategy<Value = Value> {
    prop::sample::select(vec![
        json!({"port": 80}),
        json!({"port": 8080}),
        json!({"port": 8000, "endPort": 8100}),
        json!({"protocol": "UDP"}),
        json!({"port": 53, "protocol": "UDP"}),
        json!({"port": "http"}),
        json!({"port": "http", "protocol": "SCTP"}),
        json!({"port": "dns", "protocol": "UDP"}),
        json!({"port": "metrics"}),
        json!({"port": "none"}),
    ])
}

fn np_peer() -> impl Strategy<Value = Value> {
    prop_oneof![
        selector().prop_map(|s| json!({"podSelector": s})),
        selector().prop_map(|s| json!({"namespaceSelector": s})),
        (selector(), selector())
            .prop_map(|(n, p)| json!({"namespaceSelector": n, "podSelector": p})),
        Just(json!({"ipBlock": {"cidr": "10.0.0.0/16", "except": ["10.0.1.0/24"]}})),
        Just(json!({"ipBlock": {"cidr": "192.0.2.0/24"}})),
    ]
}

/// A NetworkPolicy with up to three rules a direction, each with up to two peers and up to
/// four ports (more than a rule summary holds).
fn np_spec_rich() -> impl Strategy<Value = Value> {
    let rule = || {
        (
            prop::collection::vec(np_peer(), 0..3),
            prop::collection::vec(np_port(), 0..5),
        )
    };
    (
        selector(),
        prop::sample::select(vec![
            vec!["Ingress"],
            vec!["Egress"],
            vec!["Ingress", "Egress"],
        ]),
        prop::collection::vec(rule(), 0..4),
        prop::collection::vec(rule(), 0..4),
    )
        .prop_map(|(sel, types, ingress, egress)| {
            let ingress: Vec<Value> = ingress
                .into_iter()
                .map(|(from, ports)| json!({"from": from, "ports": ports}))
                .collect();
            let egress: Vec<Value> = egress
                .into_iter()
                .map(|(to, ports)| json!({"to": to, "ports": ports}))
                .collect();
            json!({"podSelector": sel, "policyTypes": types, "ingress": ingress, "egress": egress})
        })
}

/// The container ports a pod may declare.
const POD_PORTS: [(&str, u16, &str); 6] = [
    ("http", 80, "TCP"),
    ("", 80, "TCP"),
    ("http", 8080, "TCP"),
    ("dns", 53, "UDP"),
    ("http", 80, "SCTP"),
    ("metrics", 9090, "TCP"),
];

#[derive(Clone, Debug)]
enum NpOp {
    /// Policy `np{name}` in a namespace, (re)applied.
    Apply(usize, usize, Value),
    Remove(usize, usize),
    /// Pod `p{name}` in a namespace, (re)applied: app label, canary, which container ports.
    Pod(usize, usize, &'static str, bool, Vec<usize>),
    RemovePod(usize, usize),
}

fn np_op() -> impl Strategy<Value = NpOp> {
    prop_oneof![
        4 => (0..4usize, 0..2usize, np_spec_rich()).prop_map(|(n, ns, s)| NpOp::Apply(n, ns, s)),
        1 => (0..4usize, 0..2usize).prop_map(|(n, ns)| NpOp::Remove(n, ns)),
        2 => (
            0..4usize,
            0..2usize,
            prop::sample::select(vec!["web", "db", "client"]),
            any::<bool>(),
            prop::sample::subsequence((0..POD_PORTS.len()).collect::<Vec<_>>(), 0..4),
        )
            .prop_map(|(n, ns, app, canary, ports)| NpOp::Pod(n, ns, app, canary, ports)),
        1 => (0..4usize, 0..2usize).prop_map(|(n, ns)| NpOp::RemovePod(n, ns)),
    ]
}

fn apply_np_op(e: &mut Engine, op: &NpOp) {
    match op {
        NpOp::Apply(n, ns, spec) => {
            let np: NetworkPolicy = serde_json::from_value(json!({
                "metadata": {"name": format!("np{n}"), "namespace": NAMESPACES[*ns]},
                "spec": spec
            }))
            .unwrap();
            e.apply_policy(&np).unwrap();
        }
        NpOp::Remove(n, ns) => e.remove_policy(&PolicyKey {
            namespace: NAMESPACES[*ns].to_owned(),
            name: format!("np{n}"),
        }),
        NpOp::Pod(n, ns, app, canary, ports) => {
            let mut labels = json!({"app": app});
            if *canary {
                labels["canary"] = json!("true");
            }
            let ports: Vec<Value> = ports
                .iter()
                .map(|i| {
                    let (name, port, protocol) = POD_PORTS[*i];
                    if name.is_empty() {
                        json!({"containerPort": port, "protocol": protocol})
                    } else {
                        json!({"name": name, "containerPort": port, "protocol": protocol})
                    }
                })
                .collect();
            let pod: Pod = serde_json::from_value(json!({
                "metadata": {"name": format!("p{n}"), "namespace": NAMESPACES[*ns], "labels": labels},
                "spec": {"containers": [{"name": "c", "ports": ports}]},
                "status": {"podIP": format!("10.0.{}.{}", ns, n + 1)}
            }))
            .unwrap();
            e.apply_pod(&pod).unwrap();
        }
        NpOp::RemovePod(n, ns) => e.remove_workload(&PodKey {
            namespace: NAMESPACES[*ns].to_owned(),
            name: format!("p{n}"),
        }),
    }
}

const NP_PROBES: [(u16, Protocol); 9] = [
    (80, Protocol::Tcp),
    (8080, Protocol::Tcp),
    (8050, Protocol::Tcp),
    (9090, Protocol::Tcp),
    (53, Protocol::Udp),
    (5353, Protocol::Udp),
    (80, Protocol::Sctp),
    (0, Protocol::ICMP),
    (53, Protocol::Tcp),
];

/// Every pod, both directions, against every pod (with and without its address, with and
/// without the name of the port) and two IP-only peers, on every probe.
fn check_np(e: &Engine) -> Result<(), TestCaseError> {
    let pods: Vec<Workload> = e.workloads().cloned().collect();
    let mut peers: Vec<(Peer, Option<IpAddr>)> = Vec::new();
    for w in &pods {
        let id = Peer::Workload(e.identity(&w.key).unwrap());
        peers.push((id.clone(), w.ips.first().copied()));
        peers.push((id, None));
    }
    for ip in ["10.0.1.9", "192.0.2.7"] {
        peers.push((Peer::IpOnly, Some(ip.parse().unwrap())));
    }
    for local in &pods {
        for (peer, ip) in &peers {
            for (port, protocol) in NP_PROBES {
                for direction in [Direction::Ingress, Direction::Egress] {
                    for name in [None, Some("http"), Some("dns"), Some("metrics")] {
                        let conn = Connection {
                            local: &local.key,
                            direction,
                            peer,
                            peer_ip: *ip,
                            port,
                            protocol,
                            dest_port_name: name,
                            resolved_names: &[],
                        };
                        prop_assert_eq!(e.decide(&conn), e.decide_reference(&conn), "{:?}", conn);
                    }
                }
            }
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    /// The walks (one array of rule summaries per workload and direction, built when a policy
    /// or a pod changes) decide as the policies' rule lists do, after every change.
    #[test]
    fn np_walks_equal_the_rule_lists_under_changes(
        ops in prop::collection::vec(np_op(), 1..12)
    ) {
        let mut e = Engine::new();
        for (n, ns) in NAMESPACES.iter().enumerate() {
            let labels = if n == 0 { json!({"team": "x"}) } else { json!({"team": "y"}) };
            let ns: Namespace =
                serde_json::from_value(json!({"metadata": {"name": ns, "labels": labels}})).unwrap();
            e.apply_namespace(&ns).unwrap();
        }
        for op in &ops {
            apply_np_op(&mut e, op);
            check_np(&e)?;
        }
    }
}
