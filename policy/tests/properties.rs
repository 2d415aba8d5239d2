//! Properties of NetworkPolicy evaluation over generated clusters and policies.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::IpAddr;

use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use policy::matrix::{self, Cell, Probe};
use policy::{Connection, Direction, Engine, Peer, PodKey, Protocol, WorkloadIdentity};
use proptest::prelude::*;
use serde_json::{Value, json};

// ----------------------------------------------------------------------------------------------
// Generators
// ----------------------------------------------------------------------------------------------

const NAMESPACES: [&str; 2] = ["a", "b"];

fn label_pair() -> impl Strategy<Value = (String, String)> {
    prop_oneof![
        prop::sample::select(vec!["web", "db", "api"])
            .prop_map(|v| ("app".to_string(), v.to_string())),
        prop::sample::select(vec!["1", "2"]).prop_map(|v| ("tier".to_string(), v.to_string())),
    ]
}

fn selector() -> impl Strategy<Value = Value> {
    let expr = (
        prop::sample::select(vec!["app", "tier", "team"]),
        prop::sample::select(vec!["In", "NotIn", "Exists", "DoesNotExist"]),
        prop::sample::subsequence(vec!["web", "db", "1", "x", "y"], 1..3),
    )
        .prop_map(|(k, op, vals)| match op {
            "In" | "NotIn" => json!({"key": k, "operator": op, "values": vals}),
            _ => json!({"key": k, "operator": op}),
        });
    prop_oneof![
        Just(json!({})),
        prop::collection::btree_map(
            prop::sample::select(vec!["app", "tier", "team"]),
            prop::sample::select(vec!["web", "db", "1", "x", "y"]),
            1..3
        )
        .prop_map(|m| json!({"matchLabels": m})),
        prop::collection::vec(expr, 1..3).prop_map(|e| json!({"matchExpressions": e})),
    ]
}

fn peer() -> impl Strategy<Value = Value> {
    prop_oneof![
        selector().prop_map(|s| json!({"podSelector": s})),
        selector().prop_map(|s| json!({"namespaceSelector": s})),
        (selector(), selector())
            .prop_map(|(p, n)| json!({"podSelector": p, "namespaceSelector": n})),
        prop::sample::select(vec![
            json!({"ipBlock": {"cidr": "10.0.0.0/16"}}),
            json!({"ipBlock": {"cidr": "10.0.0.0/16", "except": ["10.0.1.0/24"]}}),
            json!({"ipBlock": {"cidr": "10.0.1.0/24", "except": ["10.0.1.2/32"]}}),
            json!({"ipBlock": {"cidr": "192.0.2.0/24"}}),
            json!({"ipBlock": {"cidr": "0.0.0.0/0", "except": ["10.0.2.0/24"]}}),
        ]),
    ]
}

fn port() -> impl Strategy<Value = Value> {
    prop::sample::select(vec![
        json!({"port": 80}),
        json!({"port": 8080, "protocol": "TCP"}),
        json!({"port": 8000, "endPort": 8080}),
        json!({"port": "http"}),
        json!({"port": "dns", "protocol": "UDP"}),
        json!({"protocol": "UDP"}),
        json!({"port": 53, "protocol": "UDP"}),
        json!({"protocol": "SCTP"}),
    ])
}

fn rule(peers_field: &'static str) -> impl Strategy<Value = Value> {
    (
        prop::option::of(prop::collection::vec(peer(), 0..3)),
        prop::option::of(prop::collection::vec(port(), 0..3)),
    )
        .prop_map(move |(peers, ports)| {
            let mut r = json!({});
            if let Some(p) = peers {
                r[peers_field] = json!(p);
            }
            if let Some(p) = ports {
                r["ports"] = json!(p);
            }
            r
        })
}

fn policy_spec() -> impl Strategy<Value = Value> {
    (
        selector(),
        prop::option::of(prop::sample::select(vec![
            vec!["Ingress"],
            vec!["Egress"],
            vec!["Ingress", "Egress"],
        ])),
        prop::option::of(prop::collection::vec(rule("from"), 0..3)),
        prop::option::of(prop::collection::vec(rule("to"), 0..3)),
    )
        .prop_map(|(sel, types, ingress, egress)| {
            let mut s = json!({"podSelector": sel});
            if let Some(t) = types {
                s["policyTypes"] = json!(t);
            }
            if let Some(i) = ingress {
                s["ingress"] = json!(i);
            }
            if let Some(e) = egress {
                s["egress"] = json!(e);
            }
            s
        })
}

#[derive(Clone, Debug)]
struct PodSpec {
    ns: usize,
    labels: Vec<(String, String)>,
    http: u16,
    host_network: bool,
    has_ip: bool,
}

fn pod_spec() -> impl Strategy<Value = PodSpec> {
    (
        0..NAMESPACES.len(),
        prop::collection::vec(label_pair(), 0..3),
        prop::sample::select(vec![80u16, 8080]),
        prop::bool::weighted(0.1),
        prop::bool::weighted(0.9),
    )
        .prop_map(|(ns, labels, http, host_network, has_ip)| PodSpec {
            ns,
            labels,
            http,
            host_network,
            has_ip,
        })
}

#[derive(Clone, Debug)]
struct World {
    pods: Vec<PodSpec>,
    policies: Vec<(usize, Value)>,
}

fn world() -> impl Strategy<Value = World> {
    (
        prop::collection::vec(pod_spec(), 1..6),
        prop::collection::vec((0..NAMESPACES.len(), policy_spec()), 0..5),
    )
        .prop_map(|(pods, policies)| World { pods, policies })
}

fn namespace(i: usize) -> Namespace {
    let team = if i == 0 { "x" } else { "y" };
    serde_json::from_value(json!({"metadata": {"name": NAMESPACES[i], "labels": {"team": team}}}))
        .unwrap()
}

fn pod(i: usize, p: &PodSpec) -> Pod {
    let labels: serde_json::Map<String, Value> = p
        .labels
        .iter()
        .map(|(k, v)| (k.clone(), json!(v)))
        .collect();
    let mut v = json!({
        "metadata": {"name": format!("p{i}"), "namespace": NAMESPACES[p.ns], "labels": labels},
        "spec": {"hostNetwork": p.host_network, "containers": [{"name": "c", "ports": [
            {"name": "http", "containerPort": p.http},
            {"name": "dns", "containerPort": 53, "protocol": "UDP"}
        ]}]}
    });
    if p.has_ip {
        v["status"] = json!({"podIPs": [{"ip": format!("10.0.{}.{}", p.ns + 1, i + 1)}]});
    }
    serde_json::from_value(v).unwrap()
}

fn netpol(i: usize, ns: usize, spec: &Value) -> NetworkPolicy {
    serde_json::from_value(json!({
        "metadata": {"name": format!("np{i}"), "namespace": NAMESPACES[ns]},
        "spec": spec
    }))
    .unwrap()
}

fn build(w: &World) -> Engine {
    let mut e = Engine::new();
    for i in 0..NAMESPACES.len() {
        e.apply_namespace(&namespace(i)).unwrap();
    }
    for (i, p) in w.pods.iter().enumerate() {
        e.apply_pod(&pod(i, p)).unwrap();
    }
    for (i, (ns, spec)) in w.policies.iter().enumerate() {
        e.apply_policy(&netpol(i, *ns, spec)).unwrap();
    }
    e
}

const PROBES: [Probe; 4] = [
    Probe {
        port: 80,
        protocol: Protocol::Tcp,
    },
    Probe {
        port: 8080,
        protocol: Protocol::Tcp,
    },
    Probe {
        port: 53,
        protocol: Protocol::Udp,
    },
    Probe {
        port: 9,
        protocol: Protocol::Sctp,
    },
];

fn from_ips() -> Vec<IpAddr> {
    ["10.0.1.2", "192.0.2.7", "10.0.2.9"]
        .iter()
        .map(|s| s.parse().unwrap())
        .collect()
}

fn cells(e: &Engine) -> Vec<Cell> {
    matrix::matrix(e, &PROBES, &from_ips())
}

/// The ways of widening a policy: a rule added to a list of rules that stays in force, a peer
/// added to a non-empty peer list, a port added to a non-empty port list.
#[derive(Clone, Debug)]
enum Widen {
    Rule {
        policy: usize,
        ingress: bool,
        rule: Value,
    },
    Peer {
        policy: usize,
        ingress: bool,
        rule: usize,
        peer: Value,
    },
    Port {
        policy: usize,
        ingress: bool,
        rule: usize,
        port: Value,
    },
}

fn widen() -> impl Strategy<Value = Widen> {
    prop_oneof![
        (any::<usize>(), any::<bool>(), rule("from")).prop_map(|(policy, ingress, rule)| {
            Widen::Rule {
                policy,
                ingress,
                rule,
            }
        }),
        (any::<usize>(), any::<bool>(), any::<usize>(), peer()).prop_map(
            |(policy, ingress, rule, peer)| Widen::Peer {
                policy,
                ingress,
                rule,
                peer
            }
        ),
        (any::<usize>(), any::<bool>(), any::<usize>(), port()).prop_map(
            |(policy, ingress, rule, port)| Widen::Port {
                policy,
                ingress,
                rule,
                port
            }
        ),
    ]
}

/// Applies a widening to `spec`; `false` if it does not apply (it would narrow or change
/// policyTypes).
fn apply_widen(spec: &mut Value, w: &Widen) -> bool {
    let has_explicit_types = spec.get("policyTypes").is_some();
    let (ingress, list_name, peers_name) = match w {
        Widen::Rule { ingress, .. } | Widen::Peer { ingress, .. } | Widen::Port { ingress, .. } => {
            if *ingress {
                (true, "ingress", "from")
            } else {
                (false, "egress", "to")
            }
        }
    };
    match w {
        Widen::Rule { rule, .. } => {
            let existing = spec
                .get(list_name)
                .and_then(Value::as_array)
                .map_or(0, Vec::len);
            // A first egress rule without explicit policyTypes would add Egress isolation.
            if !ingress && !has_explicit_types && existing == 0 {
                return false;
            }
            let mut rule = rule.clone();
            if let Some(from) = rule.get("from").cloned() {
                rule.as_object_mut().unwrap().remove("from");
                rule[peers_name] = from;
            }
            match spec.get_mut(list_name).and_then(Value::as_array_mut) {
                Some(list) => list.push(rule),
                None => spec[list_name] = json!([rule]),
            }
            true
        }
        Widen::Peer { rule, peer, .. } => {
            let Some(rules) = spec.get_mut(list_name).and_then(Value::as_array_mut) else {
                return false;
            };
            if rules.is_empty() {
                return false;
            }
            let n = rules.len();
            let r = &mut rules[rule % n];
            match r.get_mut(peers_name).and_then(Value::as_array_mut) {
                Some(peers) if !peers.is_empty() => {
                    peers.push(peer.clone());
                    true
                }
                _ => false,
            }
        }
        Widen::Port { rule, port, .. } => {
            let Some(rules) = spec.get_mut(list_name).and_then(Value::as_array_mut) else {
                return false;
            };
            if rules.is_empty() {
                return false;
            }
            let n = rules.len();
            let r = &mut rules[rule % n];
            match r.get_mut("ports").and_then(Value::as_array_mut) {
                Some(ports) if !ports.is_empty() => {
                    ports.push(port.clone());
                    true
                }
                _ => false,
            }
        }
    }
}

fn hostile_string() -> impl Strategy<Value = Value> {
    prop_oneof![
        ".{0,20}".prop_map(Value::String),
        prop::sample::select(vec![
            "",
            "http",
            "HTTP",
            "80",
            "-a",
            "a--b",
            "10.0.0.0/8",
            "10.0.0.1/33",
            "::/0",
            "fd00::/200",
            "In",
            "NotIn",
            "Exists",
            "Foo",
            "TCP",
            "tcp",
            "ICMP",
            "Ingress",
            "Egress",
        ])
        .prop_map(|s| json!(s)),
        any::<i32>().prop_map(|n| json!(n)),
        (-2i64..70000).prop_map(|n| json!(n)),
    ]
}

/// A policy with arbitrary values where the API has strings and numbers.
fn hostile_spec() -> impl Strategy<Value = Value> {
    (
        prop::collection::vec(hostile_string(), 12),
        prop::collection::vec(any::<bool>(), 8),
    )
        .prop_map(|(s, b)| {
            let mut port = json!({"port": s[0]});
            if b[0] { port["endPort"] = s[1].clone(); }
            if b[1] { port["protocol"] = s[2].clone(); }
            let mut peer = json!({});
            if b[2] { peer["ipBlock"] = json!({"cidr": s[3], "except": [s[4]]}); }
            if b[3] { peer["podSelector"] = json!({"matchExpressions": [{"key": s[5], "operator": s[6], "values": [s[7]]}]}); }
            if b[4] { peer["namespaceSelector"] = json!({"matchLabels": {"k": s[8]}}); }
            let mut spec = json!({"podSelector": {}, "ingress": [{"from": [peer], "ports": [port]}]});
            if b[5] { spec["policyTypes"] = json!([s[9], s[10]]); }
            if b[6] { spec["egress"] = json!([{"to": [{"ipBlock": {"cidr": s[11]}}]}]); }
            spec
        })
}

// ----------------------------------------------------------------------------------------------
// Properties
// ----------------------------------------------------------------------------------------------

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// Widening a policy (a rule, a peer in a non-empty peer list, a port in a non-empty port
    /// list) never turns an allowed cell into a denied one.
    #[test]
    fn widening_a_policy_never_denies_what_was_allowed(w in world(), widen in widen()) {
        prop_assume!(!w.policies.is_empty());
        let before = build(&w);
        let target = match &widen {
            Widen::Rule { policy, .. } | Widen::Peer { policy, .. } | Widen::Port { policy, .. } => policy % w.policies.len(),
        };
        let mut wider = w.clone();
        prop_assume!(apply_widen(&mut wider.policies[target].1, &widen));
        let after = build(&wider);
        for (b, a) in cells(&before).iter().zip(cells(&after).iter()) {
            prop_assert_eq!((&b.from, &b.to, b.probe), (&a.from, &a.to, a.probe));
            prop_assert!(!b.verdict.allowed || a.verdict.allowed,
                "{} -> {} {}: allowed before ({}), denied after ({})", b.from, b.to, b.probe, b.verdict, a.verdict);
        }
    }

    /// A pod no policy isolates for ingress is reachable by every source whose egress allows
    /// it; a pod no policy isolates for egress reaches everything whose ingress allows it.
    #[test]
    fn unselected_pods_depend_only_on_the_other_side(w in world()) {
        let e = build(&w);
        for c in cells(&e) {
            if e.selecting(&c.to, Direction::Ingress).next().is_none() {
                let egress_ok = c.verdict.egress.as_ref().is_none_or(|d| d.allowed);
                prop_assert_eq!(c.verdict.allowed, egress_ok, "{} -> {}: {}", c.from, c.to, c.verdict);
            }
            if let matrix::Source::Pod(src) = &c.from
                && e.selecting(src, Direction::Egress).next().is_none()
            {
                prop_assert_eq!(c.verdict.allowed, c.verdict.ingress.allowed, "{} -> {}: {}", c.from, c.to, c.verdict);
            }
        }
    }

    /// Decisions never panic, whatever the connection, and agree with their borrowed form.
    #[test]
    fn decide_never_panics(
        w in world(),
        local in 0usize..8,
        ingress in any::<bool>(),
        ip_only in any::<bool>(),
        peer_labels in prop::collection::btree_map("[a-z]{1,4}", "[a-z0-9]{0,3}", 0..3),
        peer_ns in "[a-z]{1,3}",
        ip in any::<[u8; 4]>(),
        port in any::<u16>(),
        proto in prop::sample::select(vec![Protocol::Tcp, Protocol::Udp, Protocol::Sctp]),
        name in prop::option::of("[a-z]{1,5}"),
    ) {
        let e = build(&w);
        let local = PodKey { namespace: NAMESPACES[local % 2].into(), name: format!("p{local}") };
        let peer = if ip_only {
            Peer::IpOnly
        } else {
            Peer::Workload(WorkloadIdentity {
                namespace: peer_ns.clone(),
                namespace_labels: [("kubernetes.io/metadata.name".to_string(), peer_ns)].into(),
                labels: peer_labels,
            })
        };
        let conn = Connection {
            local: &local,
            direction: if ingress { Direction::Ingress } else { Direction::Egress },
            peer: &peer,
            peer_ip: Some(IpAddr::from(ip)),
            port,
            protocol: proto,
            dest_port_name: name.as_deref(),
            resolved_names: &[],
        };
        let d = e.decide(&conn);
        prop_assert_eq!(d.allowed, e.allows(&conn));
        prop_assert_eq!(d.clone(), e.decide_ref(&conn).to_decision());
        prop_assert!(!d.to_string().is_empty());
    }

    /// Invalid policies are errors (naming the object), never panics, and leave the engine's
    /// decisions as they were.
    #[test]
    fn hostile_policies_are_errors_not_panics(w in world(), spec in hostile_spec()) {
        let mut e = build(&w);
        let before = cells(&e);
        // Same name as the first generated policy, if any, so a rejected update must keep it.
        let ns = w.policies.first().map_or(0, |p| p.0);
        // A spec that is not even the right shape is the YAML loader's to report.
        if let Ok(np) = serde_json::from_value::<NetworkPolicy>(json!({
            "metadata": {"name": "np0", "namespace": NAMESPACES[ns]},
            "spec": spec
        }))
            && let Err(err) = e.apply_policy(&np)
        {
            prop_assert_eq!(err.kind, "NetworkPolicy");
            prop_assert_eq!(err.object, format!("{}/np0", NAMESPACES[ns]));
            prop_assert!(err.field.starts_with("spec."), "{}", err.field);
            prop_assert_eq!(before, cells(&e));
        }
    }
}
