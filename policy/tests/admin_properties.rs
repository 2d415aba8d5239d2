//! Properties of admin policy evaluation over generated clusters, NetworkPolicies and admin
//! policies (ClusterNetworkPolicy, both tiers).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::IpAddr;

use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use policy::admin::ClusterNetworkPolicy;
use policy::matrix::{Matrix, Probe};
use policy::{Connection, Direction, Engine, Peer, PodKey, Protocol, Reason, Tier};
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
                // Named ports cannot go with networks peers (the API's rule).
                let networks = peers.iter().any(|p| p.get("networks").is_some());
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
}

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
    )
        .prop_map(|(pods, netpols)| World { pods, netpols })
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

/// Both directions of every pod pair and IP-only peer, as `(local, direction, peer, probe)`.
fn each_decision(e: &Engine, mut f: impl FnMut(&PodKey, Direction, &Connection<'_>)) {
    let pods: Vec<_> = e.workloads().cloned().collect();
    let mut peers: Vec<(Peer, Option<IpAddr>, Option<&policy::Workload>)> = pods
        .iter()
        .map(|w| {
            (
                Peer::Workload(e.identity(&w.key).unwrap()),
                w.ips.first().copied(),
                Some(w),
            )
        })
        .collect();
    peers.extend(
        from_ips()
            .into_iter()
            .map(|ip| (Peer::IpOnly, Some(ip), None)),
    );
    for local in &pods {
        for (peer, ip, peer_w) in &peers {
            for probe in PROBES {
                for direction in [Direction::Ingress, Direction::Egress] {
                    let name = match (direction, peer_w) {
                        (Direction::Egress, Some(w)) => w
                            .ports
                            .iter()
                            .find(|p| p.port == probe.port && p.protocol == probe.protocol)
                            .and_then(|p| p.name.as_deref()),
                        _ => None,
                    };
                    let conn = Connection {
                        local: &local.key,
                        direction,
                        peer,
                        peer_ip: *ip,
                        port: probe.port,
                        protocol: probe.protocol,
                        dest_port_name: name,
                        resolved_names: &[],
                    };
                    f(&local.key, direction, &conn);
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
        // Pod sources only: an IP-only source is no namespace's pod and has no egress here.
        for (from, to, probe, allowed, text) in verdicts(&e) {
            if from.contains('/') {
                prop_assert!(!allowed, "{} -> {} {}: {}", from, to, probe, text);
            }
        }
    }
}
