//! Engine benchmarks on a synthetic cluster: 100 namespaces, 5,000 pods, 10,000 policies with a
//! realistic mix (podSelector matchLabels and matchExpressions, namespaceSelector, ipBlock with
//! except, port ranges, named ports, ingress and egress).
//!
//! Measures: one decision (mixed allow/deny, ingress and egress, with and without building the
//! owned reason), a full compile of the whole cluster, and the incremental re-index after one
//! policy change and after one pod label change.
//!
//! The same decisions are measured again, in the same run, on the same cluster plus 1,000
//! cluster-wide admin policies (ClusterNetworkPolicy Admin and Baseline, AdminNetworkPolicy,
//! one BaselineAdminNetworkPolicy; see `admin_spec`), so that the two figures compare as a
//! ratio; and the re-index after one admin policy change.
//!
//! And once more with a node inventory (one node per namespace) and admin policies with
//! `nodes` and `domainNames` peers (see `nodes_and_names`): the same questions, then a mix
//! that asks egress to node addresses and to external addresses with resolved names.
//!
//! Under `cargo test --benches` (criterion's test mode, no `--bench` argument) the cluster is
//! 10x smaller so that the debug build sets up in well under a second.
//!
//! Instruction counts: with `TESSERA_BENCH_CALLGRIND` set to `np`, `admin`, `nodes` or
//! `nodes-mix`, the bench builds that case, asks its 4,096 questions once each through
//! `decide_ref` and exits, for `valgrind --tool=callgrind --toggle-collect='*decide_ref*'`
//! (instructions in `decide_ref` / 4,096).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;
use std::net::IpAddr;

use criterion::{Criterion, criterion_group, criterion_main};
use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use policy::admin::{AdminNetworkPolicy, BaselineAdminNetworkPolicy, ClusterNetworkPolicy};
use policy::{Connection, Direction, Engine, Labels, Node, Peer, PodKey, Protocol, Tier};
use serde_json::{Value, json};

struct Size {
    namespaces: usize,
    pods_per_ns: usize,
    policies_per_ns: usize,
    /// Cluster-wide admin policies (all kinds), for the admin cases.
    admin_policies: usize,
}

const FULL: Size = Size {
    namespaces: 100,
    pods_per_ns: 50,
    policies_per_ns: 100,
    admin_policies: 1000,
};

const QUICK: Size = Size {
    namespaces: 10,
    pods_per_ns: 50,
    policies_per_ns: 100,
    admin_policies: 100,
};

/// A small deterministic generator (xorshift), so every run benchmarks the same cluster.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

const TIERS: [&str; 3] = ["web", "api", "db"];
const ENVS: [&str; 3] = ["prod", "staging", "dev"];

fn namespace(n: usize) -> Namespace {
    serde_json::from_value(json!({"metadata": {
        "name": format!("ns-{n}"),
        "labels": {"team": format!("t{}", n % 10), "env": ENVS[n % 3]}
    }}))
    .unwrap()
}

fn pod_ip(n: usize, j: usize) -> String {
    format!("10.{}.{}.{}", n % 250, j / 250, j % 250 + 1)
}

fn pod(n: usize, j: usize, app: usize) -> Pod {
    let mut labels =
        json!({"app": format!("app{app}"), "tier": TIERS[j % 3], "version": format!("v{}", j % 4)});
    if j.is_multiple_of(7) {
        labels["canary"] = json!("true");
    }
    let http = if j.is_multiple_of(2) { 80 } else { 8080 };
    serde_json::from_value(json!({
        "metadata": {"name": format!("pod-{j}"), "namespace": format!("ns-{n}"), "labels": labels},
        "spec": {"containers": [{"name": "main", "ports": [
            {"name": "http", "containerPort": http},
            {"name": "metrics", "containerPort": 9090},
            {"name": "dns", "containerPort": 53, "protocol": "UDP"}
        ]}]},
        "status": {"podIPs": [{"ip": pod_ip(n, j)}]}
    }))
    .unwrap()
}

fn policy_spec(n: usize, k: usize, namespaces: usize) -> Value {
    let app = json!({"matchLabels": {"app": format!("app{}", (k / 10) % 10)}});
    match k % 10 {
        0 => json!({"podSelector": app}),
        1 => json!({"podSelector": app, "ingress": [{
            "from": [{"podSelector": {"matchExpressions": [{"key": "tier", "operator": "In", "values": ["web", "api"]}]}}],
            "ports": [{"port": 8080}, {"port": "metrics"}]
        }]}),
        2 => json!({"podSelector": app, "ingress": [{
            "from": [{"namespaceSelector": {"matchLabels": {"team": format!("t{}", (n + 1) % 10)}},
                      "podSelector": {"matchLabels": {"app": format!("app{}", k % 7)}}}],
            "ports": [{"port": 8000, "endPort": 8100}]
        }]}),
        3 => json!({"podSelector": app, "ingress": [{
            "from": [{"ipBlock": {"cidr": "10.0.0.0/8", "except": [format!("10.{}.0.0/24", n % 250)]}}],
            "ports": [{"protocol": "UDP"}]
        }]}),
        4 => json!({"podSelector": app, "policyTypes": ["Egress"], "egress": [
            {"to": [{"ipBlock": {"cidr": format!("10.{}.0.0/16", (n + 3) % namespaces)}}], "ports": [{"port": 53, "protocol": "UDP"}]},
            {"to": [{"podSelector": {}}], "ports": [{"port": "http"}]}
        ]}),
        5 => json!({"podSelector": {"matchExpressions": [
            {"key": "tier", "operator": "NotIn", "values": ["db"]},
            {"key": "version", "operator": "In", "values": [format!("v{}", k % 4)]}
        ]}, "ingress": [{"from": [{"namespaceSelector": {"matchExpressions": [{"key": "env", "operator": "In", "values": ["prod"]}]}}], "ports": [{"port": 443}]}]}),
        6 => json!({"podSelector": app, "egress": [{
            "to": [{"namespaceSelector": {"matchExpressions": [{"key": "team", "operator": "In", "values": ["t1", "t2", "t3"]}]},
                    "podSelector": {"matchLabels": {"tier": "db"}}}],
            "ports": [{"port": 5432}]
        }]}),
        7 => json!({"podSelector": app, "policyTypes": ["Ingress", "Egress"],
            "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": format!("app{}", k % 10)}}}]}],
            "egress": [{"to": [{"namespaceSelector": {}}], "ports": [{"port": 80}, {"port": 8080, "endPort": 8090}]}]
        }),
        8 => {
            json!({"podSelector": {"matchExpressions": [{"key": "version", "operator": "In", "values": [format!("v{}", k % 4)]}]},
                "ingress": [{"from": [{"podSelector": {"matchExpressions": [{"key": "canary", "operator": "DoesNotExist"}]}}], "ports": [{"port": "http"}]}]
            })
        }
        _ => json!({"podSelector": app, "ingress": [
            {"from": [{"ipBlock": {"cidr": "192.168.0.0/16", "except": ["192.168.1.0/24"]}}]},
            {"from": [{"namespaceSelector": {"matchLabels": {"env": "prod"}}}], "ports": [{"port": 80}, {"port": 8080}]}
        ]}),
    }
}

fn netpol(n: usize, k: usize, spec: Value) -> NetworkPolicy {
    serde_json::from_value(json!({
        "metadata": {"name": format!("pol-{k}"), "namespace": format!("ns-{n}")},
        "spec": spec
    }))
    .unwrap()
}

/// An admin policy of the synthetic cluster: what a platform team writes. Most are scoped to
/// one namespace (guardrails per tenant), some to an app across an environment or a team, a
/// few (1 %) select every pod. Rules mix Deny, Accept/Allow and Pass, namespace and pod peers,
/// networks, ports and ranges, so most questions walk several policies before one matches (or
/// none does).
enum AdminObject {
    Cluster(ClusterNetworkPolicy),
    Admin(AdminNetworkPolicy),
    Baseline(BaselineAdminNetworkPolicy),
}

fn admin_spec(k: usize, namespaces: usize) -> AdminObject {
    let name = format!("admin-{k}");
    let own_ns = json!({"namespaces": {"matchLabels": {"kubernetes.io/metadata.name": format!("ns-{}", k % namespaces)}}});
    let team = format!("t{}", k % 10);
    let app = format!("app{}", (k / 10) % 10);
    let priority = (k * 7) % 1000;
    let cnp = |tier: &str, subject: Value, ingress: Value, egress: Value| {
        AdminObject::Cluster(
            serde_json::from_value(json!({
                "metadata": {"name": name},
                "spec": {"tier": tier, "priority": priority, "subject": subject,
                         "ingress": ingress, "egress": egress}
            }))
            .unwrap(),
        )
    };
    match k % 100 {
        // 1 %: every pod. Rarely matching rules.
        0 => cnp(
            "Admin",
            json!({"namespaces": {}}),
            json!([{"action": "Deny", "from": [{"namespaces": {"matchLabels": {"quarantine": "true"}}}]}]),
            json!([{"action": "Deny", "to": [{"networks": ["169.254.169.254/32"]}]}]),
        ),
        // 60 %: one namespace, Admin tier.
        1..=60 => cnp(
            "Admin",
            own_ns,
            json!([
                {"action": "Deny", "from": [{"namespaces": {"matchLabels": {"team": team}}}],
                 "protocols": [{"tcp": {"destinationPort": {"number": 22}}}, {"tcp": {"destinationPort": {"range": {"start": 6000, "end": 6100}}}}]},
                {"action": "Pass", "from": [{"pods": {"namespaceSelector": {"matchLabels": {"env": ENVS[k % 3]}}, "podSelector": {"matchLabels": {"app": app}}}}]}
            ]),
            json!([
                {"action": "Deny", "to": [{"networks": [format!("192.168.{}.0/24", k % 4)]}],
                 "protocols": [{"udp": {"destinationPort": {"number": 53}}}]},
                {"action": "Accept", "to": [{"pods": {"namespaceSelector": {"matchLabels": {"team": team}}, "podSelector": {"matchLabels": {"tier": "db"}}}}],
                 "protocols": [{"destinationNamedPort": "metrics"}]}
            ]),
        ),
        // 20 %: one app across one environment, AdminNetworkPolicy.
        61..=80 => AdminObject::Admin(
            serde_json::from_value(json!({
                "metadata": {"name": name},
                "spec": {"priority": priority,
                    "subject": {"pods": {"namespaceSelector": {"matchLabels": {"env": ENVS[k % 3]}},
                                         "podSelector": {"matchLabels": {"app": app}}}},
                    "ingress": [
                        {"action": "Allow", "from": [{"namespaces": {"matchLabels": {"team": team}}}],
                         "ports": [{"portNumber": {"port": 9090}}]},
                        {"action": "Deny", "from": [{"pods": {"namespaceSelector": {}, "podSelector": {"matchLabels": {"canary": "true"}}}}],
                         "ports": [{"portRange": {"start": 8000, "end": 8100}}]}
                    ],
                    "egress": [
                        {"action": "Pass", "to": [{"namespaces": {"matchLabels": {"env": "dev"}}}]}
                    ]}
            }))
            .unwrap(),
        ),
        // 19 %: one app of one team, Baseline tier.
        _ => cnp(
            "Baseline",
            json!({"pods": {"namespaceSelector": {"matchLabels": {"team": team}}, "podSelector": {"matchLabels": {"app": app}}}}),
            json!([
                {"action": "Accept", "from": [{"namespaces": {"matchLabels": {"team": team}}}]},
                {"action": "Deny", "from": [{"namespaces": {}}]}
            ]),
            json!([
                {"action": "Deny", "to": [{"networks": ["0.0.0.0/0"]}], "protocols": [{"tcp": {"destinationPort": {"number": 25}}}]}
            ]),
        ),
    }
}

/// The singleton BaselineAdminNetworkPolicy: a cluster default that allows DNS egress and
/// denies ingress from dev namespaces.
fn banp() -> AdminObject {
    AdminObject::Baseline(
        serde_json::from_value(json!({
            "metadata": {"name": "default"},
            "spec": {"subject": {"namespaces": {}},
                "ingress": [{"action": "Deny", "from": [{"namespaces": {"matchLabels": {"env": "dev"}}}]}],
                "egress": [{"action": "Allow", "to": [{"namespaces": {}}], "ports": [{"portNumber": {"protocol": "UDP", "port": 53}}]}]}
        }))
        .unwrap(),
    )
}

fn apply_admin(e: &mut Engine, a: &AdminObject) {
    let applied = match a {
        AdminObject::Cluster(p) => e.apply_cluster_network_policy(p),
        AdminObject::Admin(p) => e.apply_admin_network_policy(p),
        AdminObject::Baseline(p) => e.apply_baseline_admin_network_policy(p),
    }
    .unwrap();
    assert!(applied.warnings.is_empty());
}

/// Node `k` of the inventory: the first three are the control plane; addresses 172.20.0.k+1
/// and fd00:20::k+1.
fn node(k: usize) -> Node {
    let role = if k < 3 { "control-plane" } else { "worker" };
    Node {
        name: format!("node-{k}"),
        labels: Labels::from([
            ("node-role".to_owned(), role.to_owned()),
            ("zone".to_owned(), format!("z{}", k % 3)),
        ]),
        addresses: vec![
            format!("172.20.{}.{}", k / 250, k % 250 + 1)
                .parse()
                .unwrap(),
            format!("fd00:20::{:x}", k + 1).parse().unwrap(),
        ],
    }
}

/// Names the synthetic workloads resolve; the first four are in the allowlists below.
const NAMES: [&str; 6] = [
    "api.partner.io",
    "img.cdn.example.com",
    "a.b.cdn.example.com",
    "registry.example.com",
    "tracker.example.net",
    "cdn.example.com",
];

/// Admin policies with `nodes` and `domainNames` peers, added to the 1,000: one cluster-wide
/// guardrail (no pod reaches the control plane's API and etcd ports; every pod reaches every
/// kubelet), and per tenth namespace an egress allowlist by name on 443/TCP.
fn nodes_and_names(namespaces: usize) -> Vec<AdminObject> {
    let mut out = vec![AdminObject::Cluster(
        serde_json::from_value(json!({
            "metadata": {"name": "nodes-guardrail"},
            "spec": {"tier": "Admin", "priority": 5, "subject": {"namespaces": {}},
                "egress": [
                    {"action": "Deny", "to": [{"nodes": {"matchLabels": {"node-role": "control-plane"}}}],
                     "protocols": [{"tcp": {"destinationPort": {"number": 6443}}},
                                   {"tcp": {"destinationPort": {"range": {"start": 2379, "end": 2380}}}}]},
                    {"action": "Accept", "to": [{"nodes": {}}],
                     "protocols": [{"tcp": {"destinationPort": {"number": 10250}}}]}
                ]}
        }))
        .unwrap(),
    )];
    for n in (0..namespaces).step_by(10) {
        out.push(AdminObject::Cluster(
            serde_json::from_value(json!({
                "metadata": {"name": format!("allowlist-{n}")},
                "spec": {"tier": "Admin", "priority": 600 + n,
                    "subject": {"namespaces": {"matchLabels": {"kubernetes.io/metadata.name": format!("ns-{n}")}}},
                    "egress": [
                        {"action": "Accept", "to": [{"domainNames": ["api.partner.io", "*.cdn.example.com", "registry.example.com"]}],
                         "protocols": [{"tcp": {"destinationPort": {"number": 443}}}]},
                        {"action": "Deny", "to": [{"networks": ["0.0.0.0/0", "::/0"]}],
                         "protocols": [{"tcp": {"destinationPort": {"number": 443}}}]}
                    ]}
            }))
            .unwrap(),
        ));
    }
    out
}

struct Cluster {
    namespaces: Vec<Namespace>,
    pods: Vec<Pod>,
    policies: Vec<NetworkPolicy>,
    admin: Vec<AdminObject>,
}

fn generate(size: &Size) -> Cluster {
    let mut c = Cluster {
        namespaces: Vec::new(),
        pods: Vec::new(),
        policies: Vec::new(),
        admin: Vec::new(),
    };
    for k in 0..size.admin_policies.saturating_sub(1) {
        c.admin.push(admin_spec(k, size.namespaces));
    }
    if size.admin_policies > 0 {
        c.admin.push(banp());
    }
    for n in 0..size.namespaces {
        c.namespaces.push(namespace(n));
        for j in 0..size.pods_per_ns {
            c.pods.push(pod(n, j, j % 10));
        }
        for k in 0..size.policies_per_ns {
            c.policies
                .push(netpol(n, k, policy_spec(n, k, size.namespaces)));
        }
    }
    c
}

fn build(c: &Cluster) -> Engine {
    let mut e = Engine::new();
    for ns in &c.namespaces {
        e.apply_namespace(ns).unwrap();
    }
    for p in &c.pods {
        e.apply_pod(p).unwrap();
    }
    for p in &c.policies {
        e.apply_policy(p).unwrap();
    }
    e
}

/// The cluster with its admin policies.
fn build_with_admin(c: &Cluster) -> Engine {
    let mut e = build(c);
    for a in &c.admin {
        apply_admin(&mut e, a);
    }
    e
}

/// The cluster with its admin policies, its nodes, and the admin policies with nodes and names
/// peers.
fn build_with_nodes(c: &Cluster) -> Engine {
    let mut e = build_with_admin(c);
    for k in 0..c.namespaces.len() {
        e.apply_node(node(k)).unwrap();
    }
    for a in &nodes_and_names(c.namespaces.len()) {
        apply_admin(&mut e, a);
    }
    e
}

/// One decision's question, owned.
struct Question {
    local: PodKey,
    direction: Direction,
    peer: Peer,
    peer_ip: Option<IpAddr>,
    port: u16,
    protocol: Protocol,
    dest_port_name: Option<String>,
    names: Vec<&'static str>,
}

impl Question {
    fn conn(&self) -> Connection<'_> {
        Connection {
            local: &self.local,
            direction: self.direction,
            peer: &self.peer,
            peer_ip: self.peer_ip,
            port: self.port,
            protocol: self.protocol,
            dest_port_name: self.dest_port_name.as_deref(),
            resolved_names: &self.names,
        }
    }
}

fn questions(e: &Engine, count: usize) -> Vec<Question> {
    let pods: Vec<_> = e.workloads().collect();
    let probes = [
        (80, Protocol::Tcp),
        (8080, Protocol::Tcp),
        (8050, Protocol::Tcp),
        (9090, Protocol::Tcp),
        (443, Protocol::Tcp),
        (5432, Protocol::Tcp),
        (53, Protocol::Udp),
    ];
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    (0..count)
        .map(|i| {
            let local = pods[rng.below(pods.len())];
            let other = pods[rng.below(pods.len())];
            let (port, protocol) = probes[rng.below(probes.len())];
            let direction = if i.is_multiple_of(2) {
                Direction::Ingress
            } else {
                Direction::Egress
            };
            let ip_only = rng.below(5) == 0;
            let (peer, peer_ip) = if ip_only {
                let ip: IpAddr = if rng.below(2) == 0 {
                    format!("192.168.{}.{}", rng.below(4), rng.below(250) + 1)
                } else {
                    format!("10.{}.0.{}", rng.below(250), rng.below(250) + 1)
                }
                .parse()
                .unwrap();
                (Peer::IpOnly, Some(ip))
            } else {
                (
                    Peer::Workload(e.identity(&other.key).unwrap()),
                    other.ips.first().copied(),
                )
            };
            let dest_port_name = match (direction, &peer) {
                (Direction::Egress, Peer::Workload(_)) => other
                    .ports
                    .iter()
                    .find(|p| p.port == port && p.protocol == protocol)
                    .and_then(|p| p.name.clone()),
                _ => None,
            };
            Question {
                local: local.key.clone(),
                direction,
                peer,
                peer_ip,
                port,
                protocol,
                dest_port_name,
                names: Vec::new(),
            }
        })
        .collect()
}

/// A third of [`questions`], a third egress to node addresses (API, etcd, kubelet, SSH ports),
/// a third egress to external addresses with one or two resolved names (HTTPS mostly).
fn node_questions(e: &Engine, count: usize) -> Vec<Question> {
    let base = questions(e, count);
    let pods: Vec<_> = e.workloads().collect();
    let nodes: Vec<_> = e.nodes().collect();
    let mut rng = Rng(0x2545_f491_4f6c_dd1d);
    base.into_iter()
        .enumerate()
        .map(|(i, q)| {
            let local = pods[rng.below(pods.len())].key.clone();
            match i % 3 {
                0 => q,
                1 => {
                    let n = nodes[rng.below(nodes.len())];
                    let ports = [6443, 2379, 10250, 22];
                    Question {
                        local,
                        direction: Direction::Egress,
                        peer: Peer::IpOnly,
                        peer_ip: Some(n.addresses[rng.below(n.addresses.len())]),
                        port: ports[rng.below(ports.len())],
                        protocol: Protocol::Tcp,
                        dest_port_name: None,
                        names: Vec::new(),
                    }
                }
                _ => {
                    let mut names = vec![NAMES[rng.below(NAMES.len())]];
                    if rng.below(4) == 0 {
                        names.push(NAMES[rng.below(NAMES.len())]);
                    }
                    Question {
                        local,
                        direction: Direction::Egress,
                        peer: Peer::IpOnly,
                        peer_ip: Some(format!("203.0.113.{}", rng.below(250) + 1).parse().unwrap()),
                        port: if rng.below(5) == 0 { 80 } else { 443 },
                        protocol: Protocol::Tcp,
                        dest_port_name: None,
                        names,
                    }
                }
            }
        })
        .collect()
}

/// The distribution of single decisions over the question mix (criterion gives means): 8
/// passes over `qs`, each decision timed alone (so the clock read is in every sample).
fn decision_percentiles(engine: &Engine, qs: &[Question]) -> (u128, u128) {
    let mut ns: Vec<u128> = Vec::with_capacity(qs.len() * 8);
    for _ in 0..8 {
        for q in qs {
            let t = std::time::Instant::now();
            black_box(engine.decide_ref(&q.conn()).allowed);
            ns.push(t.elapsed().as_nanos());
        }
    }
    ns.sort_unstable();
    let at = |f: f64| {
        ns.get(((ns.len() as f64 - 1.0) * f) as usize)
            .copied()
            .unwrap_or(0)
    };
    (at(0.5), at(0.99))
}

/// `TESSERA_BENCH_CALLGRIND`: one case's 4,096 questions once each, nothing else measured.
fn callgrind_run(case: &str, cluster: &Cluster) {
    let engine = match case {
        "np" => build(cluster),
        "admin" => build_with_admin(cluster),
        _ => build_with_nodes(cluster),
    };
    let qs = if case == "nodes-mix" {
        node_questions(&engine, 4096)
    } else {
        questions(&engine, 4096)
    };
    let allowed = qs
        .iter()
        .filter(|q| black_box(engine.decide_ref(&q.conn()).allowed))
        .count();
    eprintln!(
        "callgrind case {case}: {} questions, {allowed} allowed",
        qs.len()
    );
}

fn benches(c: &mut Criterion) {
    let quick = !std::env::args().any(|a| a == "--bench");
    let size = if quick { &QUICK } else { &FULL };
    let cluster = generate(size);
    if let Ok(case) = std::env::var("TESSERA_BENCH_CALLGRIND") {
        callgrind_run(&case, &cluster);
        return;
    }
    let engine = build(&cluster);
    let qs = questions(&engine, 4096);
    let allowed = qs.iter().filter(|q| engine.allows(&q.conn())).count();
    let selected: usize = engine
        .workloads()
        .map(|w| {
            engine.selecting(&w.key, Direction::Ingress).count()
                + engine.selecting(&w.key, Direction::Egress).count()
        })
        .sum();
    eprintln!(
        "cluster: {} namespaces, {} pods, {} policies; {:.1} selecting policies per pod (both directions); questions: {} of {} allowed",
        cluster.namespaces.len(),
        cluster.pods.len(),
        engine.policy_count(),
        selected as f64 / cluster.pods.len() as f64,
        allowed,
        qs.len()
    );

    let admin_engine = build_with_admin(&cluster);
    let admin_allowed = qs.iter().filter(|q| admin_engine.allows(&q.conn())).count();
    let admin_decided = qs
        .iter()
        .filter(|q| {
            matches!(
                admin_engine.decide(&q.conn()).reason,
                policy::Reason::Admin(_)
            )
        })
        .count();
    let admin_selected: usize = admin_engine
        .workloads()
        .map(|w| {
            [Tier::Admin, Tier::Baseline]
                .into_iter()
                .flat_map(|t| [(t, Direction::Ingress), (t, Direction::Egress)])
                .map(|(t, d)| admin_engine.admin_selecting(&w.key, t, d).count())
                .sum::<usize>()
        })
        .sum();
    eprintln!(
        "with {} admin policies: {:.1} selecting admin policies per pod (both tiers and directions); questions: {} of {} allowed, {} decided by an admin rule",
        admin_engine.admin_policy_count(),
        admin_selected as f64 / cluster.pods.len() as f64,
        admin_allowed,
        qs.len(),
        admin_decided
    );

    for (name, e) in [
        ("NetworkPolicies only", &engine),
        ("1k admin policies", &admin_engine),
    ] {
        let (p50, p99) = decision_percentiles(e, &qs);
        eprintln!(
            "decision latency, {name}: p50 {p50} ns, p99 {p99} ns (each of 8 x {} decisions timed \
             alone, the clock's cost included)",
            qs.len()
        );
    }

    let mut g = c.benchmark_group("decision");
    let mut i = 0usize;
    g.bench_function("decide_ref (no allocation)", |b| {
        b.iter(|| {
            let q = &qs[i % qs.len()];
            i = i.wrapping_add(1);
            black_box(engine.decide_ref(&q.conn()).allowed)
        })
    });
    let mut i = 0usize;
    g.bench_function("decide (owned reason)", |b| {
        b.iter(|| {
            let q = &qs[i % qs.len()];
            i = i.wrapping_add(1);
            black_box(engine.decide(&q.conn()))
        })
    });
    let mut i = 0usize;
    g.bench_function("decide_ref, 1k admin policies", |b| {
        b.iter(|| {
            let q = &qs[i % qs.len()];
            i = i.wrapping_add(1);
            black_box(admin_engine.decide_ref(&q.conn()).allowed)
        })
    });
    let mut i = 0usize;
    g.bench_function("decide, 1k admin policies", |b| {
        b.iter(|| {
            let q = &qs[i % qs.len()];
            i = i.wrapping_add(1);
            black_box(admin_engine.decide(&q.conn()))
        })
    });
    let nodes_engine = build_with_nodes(&cluster);
    let node_qs = node_questions(&nodes_engine, 4096);
    let decided_by = |qs: &[Question], pick: fn(&policy::AdminRuleRef) -> bool| {
        qs.iter()
            .filter(|q| {
                matches!(nodes_engine.decide(&q.conn()).reason, policy::Reason::Admin(ref r) if pick(r))
            })
            .count()
    };
    eprintln!(
        "with {} nodes and {} more admin policies (nodes, domainNames): the questions: {} decided by an admin rule; the nodes and names mix: {} of {} allowed, {} decided by the nodes guardrail, {} by an allowlist",
        nodes_engine.node_count(),
        nodes_engine.admin_policy_count() - admin_engine.admin_policy_count(),
        decided_by(&qs, |_| true),
        node_qs
            .iter()
            .filter(|q| nodes_engine.allows(&q.conn()))
            .count(),
        node_qs.len(),
        decided_by(&node_qs, |r| r.policy.name == "nodes-guardrail"),
        decided_by(&node_qs, |r| r.policy.name.starts_with("allowlist-")),
    );
    let mut i = 0usize;
    g.bench_function("decide_ref, 1k admin policies, nodes and names", |b| {
        b.iter(|| {
            let q = &qs[i % qs.len()];
            i = i.wrapping_add(1);
            black_box(nodes_engine.decide_ref(&q.conn()).allowed)
        })
    });
    let mut i = 0usize;
    g.bench_function("decide_ref, nodes and names questions", |b| {
        b.iter(|| {
            let q = &node_qs[i % node_qs.len()];
            i = i.wrapping_add(1);
            black_box(nodes_engine.decide_ref(&q.conn()).allowed)
        })
    });
    g.finish();

    let mut g = c.benchmark_group("compile");
    g.sample_size(10);
    g.bench_function("full cluster", |b| b.iter(|| black_box(build(&cluster))));

    // One policy alternates between two versions selecting different pods.
    let mid = size.namespaces / 2;
    let versions = [
        netpol(mid, 11, policy_spec(mid, 11, size.namespaces)),
        netpol(mid, 11, policy_spec(mid, 27, size.namespaces)),
    ];
    let mut e = build(&cluster);
    let mut t = 0usize;
    g.sample_size(50);
    g.bench_function("one policy changed", |b| {
        b.iter(|| {
            t += 1;
            e.apply_policy(&versions[t % 2]).unwrap()
        })
    });
    // One pod alternates between two label sets.
    let pods = [pod(mid, 7, 7), pod(mid, 7, 3)];
    g.bench_function("one pod's labels changed", |b| {
        b.iter(|| {
            t += 1;
            e.apply_pod(&pods[t % 2]).unwrap()
        })
    });
    g.bench_function("one policy removed and re-added", |b| {
        b.iter(|| {
            let k = e.apply_policy(&versions[0]).unwrap();
            e.remove_policy(&k);
        })
    });
    // One admin policy alternates between two versions (subjects in different namespaces):
    // every workload is re-evaluated against its subject.
    let mut e = build_with_admin(&cluster);
    let admin_versions = [
        admin_spec(11, size.namespaces),
        admin_spec(11 + size.namespaces + 1, size.namespaces),
    ];
    g.bench_function("one admin policy changed", |b| {
        b.iter(|| {
            t += 1;
            apply_admin(&mut e, &admin_versions[t % 2])
        })
    });
    g.sample_size(10);
    g.bench_function("full cluster with 1k admin policies", |b| {
        b.iter(|| black_box(build_with_admin(&cluster)))
    });
    // Staged policies: a staged change rebuilds the staged view (a copy of the engine); an
    // enforced change is made in both views.
    let staged = policy::objects::Object::NetworkPolicy(netpol(
        mid,
        12,
        policy_spec(mid, 27, size.namespaces),
    ));
    g.bench_function("stage one policy, 1k admin policies", |b| {
        b.iter(|| e.stage(staged.clone()).unwrap())
    });
    g.sample_size(50);
    g.bench_function("one policy changed, 1 staged", |b| {
        b.iter(|| {
            t += 1;
            e.apply_policy(&versions[t % 2]).unwrap()
        })
    });
    g.finish();
}

criterion_group!(engine_benches, benches);
criterion_main!(engine_benches);
