//! Properties of admin policy evaluation over generated clusters (with nodes and a host-network
//! pod on a node address), NetworkPolicies and admin policies (ClusterNetworkPolicy, both tiers,
//! with `nodes` and `domainNames` peers), egress asked with and without resolved names.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::IpAddr;

use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use policy::admin::ClusterNetworkPolicy;
use policy::matrix::{Matrix, Probe};
use policy::{Connection, Direction, Engine, Labels, Node, Peer, PodKey, Protocol, Reason, Tier};
use proptest::prelude::*;
use serde_json::{Value, json};

const NAMESPACES: [&str; 3] = ["a", "b", "c"];

fn selector() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(json!({})),
        (
            prop::sample::select(vec!["app", "team"]),
            prop::sample::select(vec!["web", "db", "x", "y"])
        )
            .prop_map(|(k, v)| json!({"matchLabels": {k: v}})),
        prop::sample::select(vec!["web", "db"]).prop_map(
            |v| json!({"matchExpressions": [{"key": "app", "operator": "NotIn", "values": [v]}]})
        ),
    ]
}

fn np_spec() -> impl Strategy<Value = Value> {
    let peer = prop_oneof![
        selector().prop_map(|s| json!({"podSelector": s})),
        selector().prop_map(|s| json!({"namespaceSelector": s})),
        Just(json!({"ipBlock": {"cidr": "10.0.0.0/16"}})),
    ];
    let port = prop::sample::select(vec![
        json!({"port": 80}),
        json!({"port": "http"}),
        json!({"protocol": "UDP"}),
    ]);
    let rule = (
        prop::collection::vec(peer, 0..2),
        prop::collection::vec(port, 0..2),
    )
        .prop_map(|(peers, ports)| json!({"peers": peers, "ports": ports}));
    (
        selector(),
        prop::sample::select(vec![
            vec!["Ingress"],
            vec!["Egress"],
            vec!["Ingress", "Egress"],
        ]),
        prop::collection::vec(rule, 0..3),
    )
        .prop_map(|(sel, types, rules)| {
            let ingress: Vec<Value> = rules
                .iter()
                .map(|r| json!({"from": r["peers"], "ports": r["ports"]}))
                .collect();
            let egress: Vec<Value> = rules
                .iter()
                .map(|r| json!({"to": r["peers"], "ports": r["ports"]}))
                .collect();
            json!({"podSelector": sel, "policyTypes": types, "ingress": ingress, "egress": egress})
        })
}

fn admin_peer(egress: bool) -> impl Strategy<Value = Value> {
    let mut options = vec![
        selector().prop_map(|s| json!({"namespaces": s})).boxed(),
        (selector(), selector())
            .prop_map(|(n, p)| json!({"pods": {"namespaceSelector": n, "podSelector": p}}))
            .boxed(),
    ];
    if egress {
        options.push(
            prop::sample::select(vec![
                "10.0.0.0/16",
                "10.0.1.0/24",
                "0.0.0.0/0",
                "192.0.2.0/24",
            ])
            .prop_map(|n| json!({"networks": [n]}))
            .boxed(),
        );
        options.push(
            prop_oneof![
                Just(json!({})),
                prop::sample::select(vec!["control-plane", "worker"])
                    .prop_map(|r| json!({"matchLabels": {"role": r}})),
            ]
            .prop_map(|s| json!({"nodes": s}))
            .boxed(),
        );
        options.push(
            prop::sample::subsequence(
                vec![
                    "example.com",
                    "*.example.com",
                    "*.b.example.com",
                    "other.org",
                ],
                1..3,
            )
            .prop_map(|d| json!({"domainNames": d}))
            .boxed(),
        );
    }
    proptest::strategy::Union::new(options)
}

fn admin_rule(egress: bool) -> impl Strategy<Value = Value> {
    (
        prop::sample::select(vec!["Accept", "Deny", "Pass"]),
        prop::collection::vec(admin_peer(egress), 1..3),
        prop::option::of(prop::sample::subsequence(
            vec![
                json!({"tcp": {"destinationPort": {"number": 80}}}),
                json!({"tcp": {"destinationPort": {"range": {"start": 8000, "end": 8080}}}}),
                json!({"udp": {"destinationPort": {"number": 53}}}),
                json!({"destinationNamedPort": "http"}),
            ],
            1..3,
        )),
    )
        .prop_map(move |(action, peers, protocols)| {
            let mut r = json!({"action": action});
            r[if egress { "to" } else { "from" }] = json!(peers);
            if let Some(p) = protocols {
                // Named ports cannot go with networks, nodes or domainNames peers (the API's
                // rule).
                let networks = peers.iter().any(|p| {
                    p.get("networks").is_some()
                        || p.get("nodes").is_some()
                        || p.get("domainNames").is_some()
                });
                let p: Vec<Value> = p
                    .into_iter()
                    .filter(|p| !(networks && p.get("destinationNamedPort").is_some()))
                    .collect();
                if !p.is_empty() {
                    r["protocols"] = json!(p);
                }
            }
            r
        })
}

fn cnp_spec(tier: &'static str) -> impl Strategy<Value = Value> {
    (
        0..4i64,
        prop_oneof![
            selector().prop_map(|s| json!({"namespaces": s})),
            (selector(), selector())
                .prop_map(|(n, p)| json!({"pods": {"namespaceSelector": n, "podSelector": p}})),
        ],
        prop::collection::vec(admin_rule(false), 0..3),
        prop::collection::vec(admin_rule(true), 0..3),
    )
        .prop_map(move |(priority, subject, ingress, egress)| {
            json!({"tier": tier, "priority": priority, "subject": subject, "ingress": ingress, "egress": egress})
        })
}

#[derive(Clone, Debug)]
struct World {
    /// Per pod: namespace index, app label, container port 80 named http or not.
    pods: Vec<(usize, &'static str, bool)>,
    netpols: Vec<(usize, Value)>,
    /// Nodes `n0`, `n1`, ...: control plane or not, addresses (indexes into [`NODE_IPS`]).
    nodes: Vec<(bool, Vec<usize>)>,
}

/// Node addresses; the first is also the address of the host-network pod `c/agent`.
const NODE_IPS: [&str; 3] = ["172.16.0.1", "172.16.0.2", "fd00::1"];

fn world() -> impl Strategy<Value = World> {
    (
        prop::collection::vec(
            (
                0..NAMESPACES.len(),
                prop::sample::select(vec!["web", "db", "client"]),
                any::<bool>(),
            ),
            2..6,
        ),
        prop::collection::vec((0..NAMESPACES.len(), np_spec()), 0..4),
        prop::collection::vec(
            (
                any::<bool>(),
                prop::collection::vec(0..NODE_IPS.len(), 0..3),
            ),
            0..3,
        ),
    )
        .prop_map(|(pods, netpols, nodes)| World {
            pods,
            netpols,
            nodes,
        })
}

fn node(i: usize, control_plane: bool, ips: &[usize]) -> Node {
    let role = if control_plane {
        "control-plane"
    } else {
        "worker"
    };
    Node {
        name: format!("n{i}"),
        labels: Labels::from([("role".to_owned(), role.to_owned())]),
        addresses: ips.iter().map(|i| NODE_IPS[*i].parse().unwrap()).collect(),
    }
}

fn build(w: &World) -> Engine {
    let mut e = Engine::new();
    for (i, ns) in NAMESPACES.iter().enumerate() {
        let team = if i == 0 { "x" } else { "y" };
        let ns: Namespace =
            serde_json::from_value(json!({"metadata": {"name": ns, "labels": {"team": team}}}))
                .unwrap();
        e.apply_namespace(&ns).unwrap();
    }
    for (i, (ns, app, named)) in w.pods.iter().enumerate() {
        let port = if *named {
            json!({"name": "http", "containerPort": 80})
        } else {
            json!({"containerPort": 80})
        };
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": format!("p{i}"), "namespace": NAMESPACES[*ns], "labels": {"app": app}},
            "spec": {"containers": [{"name": "c", "ports": [port, {"containerPort": 53, "protocol": "UDP"}]}]},
            "status": {"podIP": format!("10.0.{}.{}", ns, i + 1)}
        }))
        .unwrap();
        e.apply_pod(&pod).unwrap();
    }
    let agent: Pod = serde_json::from_value(json!({
        "metadata": {"name": "agent", "namespace": "c", "labels": {"app": "agent"}},
        "spec": {"hostNetwork": true, "containers": [{"name": "c", "ports": [{"containerPort": 80}]}]},
        "status": {"podIP": NODE_IPS[0]}
    }))
    .unwrap();
    e.apply_pod(&agent).unwrap();
    for (i, (control_plane, ips)) in w.nodes.iter().enumerate() {
        e.apply_node(node(i, *control_plane, ips)).unwrap();
    }
    for (i, (ns, spec)) in w.netpols.iter().enumerate() {
        let np: NetworkPolicy = serde_json::from_value(json!({
            "metadata": {"name": format!("np{i}"), "namespace": NAMESPACES[*ns]},
            "spec": spec
        }))
        .unwrap();
        e.apply_policy(&np).unwrap();
    }
    e
}

fn cnp(name: &str, spec: &Value) -> ClusterNetworkPolicy {
    serde_json::from_value(json!({"metadata": {"name": name}, "spec": spec})).unwrap()
}

const PROBES: [Probe; 4] = [
    Probe {
        port: 80,
        protocol: Protocol::Tcp,
    },
    Probe {
        port: 8050,
        protocol: Protocol::Tcp,
    },
    Probe {
        port: 53,
        protocol: Protocol::Udp,
    },
    Probe {
        port: 0,
        protocol: Protocol::ICMP,
    },
];

fn from_ips() -> Vec<IpAddr> {
    vec!["10.0.9.9".parse().unwrap(), "192.0.2.7".parse().unwrap()]
}

/// Names an egress question may carry.
const NAME_SETS: [&[&str]; 4] = [&[], &["example.com"], &["a.b.example.com"], &["other.org"]];

/// Every verdict of the matrix, as (from, to, probe, allowed, detailed text).
fn verdicts(e: &Engine) -> Vec<(String, String, String, bool, String)> {
    let m = Matrix::new(e, &PROBES, &from_ips());
    m.cells()
        .map(|c| {
            (
                c.from.to_string(),
                c.to.to_string(),
                c.probe.to_string(),
                c.verdict.allowed,
                c.verdict.detailed().to_string(),
            )
        })
        .collect()
}

/// Both directions of every pod pair and IP-only peer (node addresses included), egress with
/// every set of names, as `(local, direction, peer, probe)`.
fn each_decision(e: &Engine, mut f: impl FnMut(&PodKey, Direction, &Connection<'_>)) {
    let pods: Vec<_> = e.workloads().cloned().collect();
    // A host-network pod is a peer by its address only.
    let mut peers: Vec<(Peer, Option<IpAddr>, Option<&policy::Workload>)> = pods
        .iter()
        .map(|w| {
            let peer = if w.host_network {
                Peer::IpOnly
            } else {
                Peer::Workload(e.identity(&w.key).unwrap())
            };
            (peer, w.ips.first().copied(), Some(w))
        })
        .collect();
    peers.extend(
        from_ips()
            .into_iter()
            .chain(NODE_IPS.iter().map(|ip| ip.parse().unwrap()))
            .map(|ip| (Peer::IpOnly, Some(ip), None)),
    );
    for local in &pods {
        for (peer, ip, peer_w) in &peers {
            for probe in PROBES {
                for direction in [Direction::Ingress, Direction::Egress] {
                    let name = match (direction, peer_w) {
                        (Direction::Egress, Some(w)) if !w.host_network => w
                            .ports
                            .iter()
                            .find(|p| p.port == probe.port && p.protocol == probe.protocol)
                            .and_then(|p| p.name.as_deref()),
                        _ => None,
                    };
                    let name_sets = match direction {
                        Direction::Egress => &NAME_SETS[..],
                        Direction::Ingress => &NAME_SETS[..1],
                    };
                    for names in name_sets {
                        let conn = Connection {
                            local: &local.key,
                            direction,
                            peer,
                            peer_ip: *ip,
                            port: probe.port,
                            protocol: probe.protocol,
                            dest_port_name: name,
                            resolved_names: names,
                        };
                        f(&local.key, direction, &conn);
                    }
                }
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// An Admin policy that passes everything to the next tier changes no verdict, and no
    /// reason, whatever the NetworkPolicies.
    #[test]
    fn admin_pass_all_changes_nothing(w in world(), priority in 0..1001i64) {
        let mut e = build(&w);
        let before = verdicts(&e);
        let everyone = json!([{"namespaces": {}}]);
        let applied = e.apply_cluster_network_policy(&cnp("pass-all", &json!({
            "tier": "Admin", "priority": priority, "subject": {"namespaces": {}},
            "ingress": [{"action": "Pass", "from": everyone}],
            "egress": [{"action": "Pass", "to": [{"namespaces": {}}, {"networks": ["0.0.0.0/0", "::/0"]}]}]
        }))).unwrap();
        prop_assert!(applied.warnings.is_empty());
        prop_assert_eq!(before, verdicts(&e));
    }

    /// The Baseline tier never changes a decision where a NetworkPolicy isolates the local
    /// workload in that direction; where none does and no Admin rule decides, the decision is
    /// the Baseline's first match or the default.
    #[test]
    fn baseline_never_overrides_networkpolicy_isolation(
        w in world(),
        baselines in prop::collection::vec(cnp_spec("Baseline"), 1..4),
    ) {
        let plain = build(&w);
        let mut e = build(&w);
        for (i, spec) in baselines.iter().enumerate() {
            e.apply_cluster_network_policy(&cnp(&format!("b{i}"), spec)).unwrap();
        }
        each_decision(&e, |local, direction, conn| {
            let with = e.decide(conn);
            let without = plain.decide(conn);
            let isolated = e.selecting(local, direction).next().is_some();
            if isolated {
                // NetworkPolicy decides: the Baseline tier is never reached.
                assert_eq!(&with, &without, "{conn:?}");
            } else {
                // Not isolated: a Baseline rule decided, or none did and the default holds.
                match &with.reason {
                    Reason::Admin(r) => assert_eq!(r.tier, Tier::Baseline, "{conn:?}"),
                    _ => assert_eq!(&with, &without, "{conn:?}"),
                }
            }
            assert_eq!(e.decide_ref(conn).to_decision(), with);
        });
    }

    /// An Admin deny-all that comes first denies every connection from and to every pod,
    /// whatever the other admin policies and NetworkPolicies say.
    #[test]
    fn a_first_admin_deny_all_denies_everything(
        w in world(),
        admins in prop::collection::vec(cnp_spec("Admin"), 0..4),
        baselines in prop::collection::vec(cnp_spec("Baseline"), 0..3),
    ) {
        let mut e = build(&w);
        for (i, spec) in admins.iter().chain(&baselines).enumerate() {
            e.apply_cluster_network_policy(&cnp(&format!("p{i}"), spec)).unwrap();
        }
        e.apply_cluster_network_policy(&cnp("aaa-deny-all", &json!({
            "tier": "Admin", "priority": 0, "subject": {"namespaces": {}},
            "ingress": [{"action": "Deny", "from": [{"namespaces": {}}]}],
            "egress": [{"action": "Deny", "to": [{"namespaces": {}}, {"networks": ["0.0.0.0/0"]}]}]
        }))).unwrap();
        // Pod sources only: an IP-only source (the host-network c/agent too) is no namespace's
        // pod and has no egress here.
        for (from, to, probe, allowed, text) in verdicts(&e) {
            if from.contains('/') && from != "c/agent" {
                prop_assert!(!allowed, "{} -> {} {}: {}", from, to, probe, text);
            }
        }
    }

    /// Without resolved names a `domainNames` peer matches nothing: every decision is the one
    /// of the same policies with their Accept rules' `domainNames` peers taken out (and the
    /// rules left with no peer). Deny and Pass rules keep theirs: they fail closed either way.
    #[test]
    fn without_names_domain_peers_match_nothing(
        w in world(),
        specs in prop::collection::vec(
            prop_oneof![cnp_spec("Admin"), cnp_spec("Baseline")],
            1..4,
        ),
    ) {
        let mut with = build(&w);
        let mut without = build(&w);
        for (i, spec) in specs.iter().enumerate() {
            with.apply_cluster_network_policy(&cnp(&format!("p{i}"), spec)).unwrap();
            without
                .apply_cluster_network_policy(&cnp(&format!("p{i}"), &strip_names(spec)))
                .unwrap();
        }
        each_decision(&with, |_, _, conn| {
            if conn.resolved_names.is_empty() {
                assert_eq!(with.allows(conn), without.allows(conn), "{conn:?}");
            }
        });
    }

    /// Decisions depend on the inventory as it is, not on how it got there: the same nodes
    /// applied in another order, after a node that claimed every address and was removed and
    /// after versions with other labels and addresses, decide the same.
    #[test]
    fn the_node_inventory_history_does_not_matter(
        w in world(),
        specs in prop::collection::vec(
            prop_oneof![cnp_spec("Admin"), cnp_spec("Baseline")],
            1..4,
        ),
    ) {
        let mut direct = build(&w);
        let mut winding = build(&World { nodes: Vec::new(), ..w.clone() });
        winding.apply_node(node(99, true, &[0, 1, 2])).unwrap();
        for (i, (control_plane, _)) in w.nodes.iter().enumerate().rev() {
            winding.apply_node(node(i, !control_plane, &[0, 1, 2])).unwrap();
        }
        for (i, spec) in specs.iter().enumerate() {
            direct.apply_cluster_network_policy(&cnp(&format!("p{i}"), spec)).unwrap();
            winding.apply_cluster_network_policy(&cnp(&format!("p{i}"), spec)).unwrap();
        }
        for (i, (control_plane, ips)) in w.nodes.iter().enumerate().rev() {
            winding.apply_node(node(i, *control_plane, ips)).unwrap();
        }
        winding.remove_node("n99");
        prop_assert_eq!(
            direct.nodes().cloned().collect::<Vec<_>>(),
            winding.nodes().cloned().collect::<Vec<_>>()
        );
        each_decision(&direct, |_, _, conn| {
            assert_eq!(direct.decide(conn), winding.decide(conn), "{conn:?}");
        });
    }
}

/// `spec` with the `domainNames` peers of its Accept rules taken out, and the rules left
/// without peers.
fn strip_names(spec: &Value) -> Value {
    let mut spec = spec.clone();
    if let Some(rules) = spec.get_mut("egress").and_then(Value::as_array_mut) {
        for rule in rules.iter_mut() {
            if rule["action"] != "Accept" {
                continue;
            }
            if let Some(to) = rule.get_mut("to").and_then(Value::as_array_mut) {
                to.retain(|peer| peer.get("domainNames").is_none());
            }
        }
        rules.retain(|rule| rule["to"].as_array().is_none_or(|to| !to.is_empty()));
    }
    spec
}
