//! Staged policies: the staged view answers as an engine built from scratch with the staged
//! policies enforced would, whatever the order of the changes that led there (enforced changes
//! to namespaces, pods, nodes and policies, stage and unstage), and the enforced decisions do
//! not move.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use policy::admin::ClusterNetworkPolicy;
use policy::matrix::{Cell, Matrix, Probe};
use policy::objects::Object;
use policy::{AdminKind, AdminPolicyKey, Engine, Node, PolicyKey, Protocol, StagedKey};
use proptest::prelude::*;
use serde_json::{Value, json};

const NAMESPACES: [&str; 2] = ["a", "b"];

fn selector() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(json!({})),
        prop::sample::select(vec!["web", "db"]).prop_map(|v| json!({"matchLabels": {"app": v}})),
        prop::sample::select(vec!["x", "y"]).prop_map(|v| json!({"matchLabels": {"team": v}})),
    ]
}

fn np_spec() -> impl Strategy<Value = Value> {
    (
        selector(),
        prop::collection::vec(selector(), 0..2),
        prop::collection::vec(selector(), 0..2),
        prop::option::of(prop::sample::select(vec![json!(80), json!("http")])),
    )
        .prop_map(|(sel, from, to, port)| {
            let ports = port.map_or(json!([]), |p| json!([{"port": p}]));
            let from: Vec<Value> = from
                .into_iter()
                .map(|s| json!({"namespaceSelector": s}))
                .collect();
            let to: Vec<Value> = to.into_iter().map(|s| json!({"podSelector": s})).collect();
            json!({
                "podSelector": sel,
                "policyTypes": ["Ingress", "Egress"],
                "ingress": [{"from": from, "ports": ports}],
                "egress": [{"to": to}],
            })
        })
}

fn cnp_spec() -> impl Strategy<Value = Value> {
    (
        prop::sample::select(vec!["Admin", "Baseline"]),
        0..3i64,
        selector(),
        prop::sample::select(vec!["Accept", "Deny", "Pass"]),
        prop_oneof![
            selector().prop_map(|s| json!({"namespaces": s})),
            prop::sample::select(vec!["control-plane", "worker"])
                .prop_map(|r| json!({"nodes": {"matchLabels": {"role": r}}})),
        ],
    )
        .prop_map(|(tier, priority, subject, action, peer)| {
            let ingress = if peer.get("nodes").is_some() {
                json!([])
            } else {
                json!([{"action": action, "from": [peer.clone()]}])
            };
            let action = if tier == "Baseline" && action == "Pass" {
                "Deny"
            } else {
                action
            };
            json!({
                "tier": tier,
                "priority": priority,
                "subject": {"namespaces": subject},
                "ingress": ingress,
                "egress": [{"action": action, "to": [peer]}],
            })
        })
}

#[derive(Clone, Debug)]
enum Op {
    Namespace(usize, &'static str),
    Pod(usize, usize, &'static str, bool),
    RemovePod(usize),
    Node(usize, &'static str),
    RemoveNode(usize),
    Np(usize, usize, Value),
    RemoveNp(usize, usize),
    Cnp(usize, Value),
    RemoveCnp(usize),
    StageNp(usize, usize, Value),
    StageCnp(usize, Value),
    UnstageNp(usize, usize),
    UnstageCnp(usize),
}

fn op() -> impl Strategy<Value = Op> {
    let ns = 0..NAMESPACES.len();
    prop_oneof![
        (ns.clone(), prop::sample::select(vec!["x", "y"])).prop_map(|(n, t)| Op::Namespace(n, t)),
        (
            0..4usize,
            ns.clone(),
            prop::sample::select(vec!["web", "db"]),
            any::<bool>()
        )
            .prop_map(|(i, n, app, named)| Op::Pod(i, n, app, named)),
        (0..4usize).prop_map(Op::RemovePod),
        (
            0..2usize,
            prop::sample::select(vec!["control-plane", "worker"])
        )
            .prop_map(|(i, r)| Op::Node(i, r)),
        (0..2usize).prop_map(Op::RemoveNode),
        (0..2usize, ns.clone(), np_spec()).prop_map(|(i, n, s)| Op::Np(i, n, s)),
        (0..2usize, ns.clone()).prop_map(|(i, n)| Op::RemoveNp(i, n)),
        (0..2usize, cnp_spec()).prop_map(|(i, s)| Op::Cnp(i, s)),
        (0..2usize).prop_map(Op::RemoveCnp),
        (0..2usize, ns.clone(), np_spec()).prop_map(|(i, n, s)| Op::StageNp(i, n, s)),
        (0..2usize, cnp_spec()).prop_map(|(i, s)| Op::StageCnp(i, s)),
        (0..2usize, ns).prop_map(|(i, n)| Op::UnstageNp(i, n)),
        (0..2usize).prop_map(Op::UnstageCnp),
    ]
}

fn namespace(name: &str, team: &str) -> Namespace {
    serde_json::from_value(json!({"metadata": {"name": name, "labels": {"team": team}}})).unwrap()
}

/// Pod `p{i}` at 10.0.0.{i+1} (one address per pod index, wherever it lives).
fn pod(i: usize, ns: usize, app: &str, named: bool) -> Pod {
    let ports = if named {
        json!([{"containerPort": 80, "name": "http"}])
    } else {
        json!([{"containerPort": 80}])
    };
    let ip = format!("10.0.0.{}", i + 1);
    serde_json::from_value(json!({
        "metadata": {"name": format!("p{i}"), "namespace": NAMESPACES[ns], "labels": {"app": app}},
        "spec": {"containers": [{"name": "c", "ports": ports}]},
        "status": {"podIP": ip, "podIPs": [{"ip": ip}]}
    }))
    .unwrap()
}

fn node(i: usize, role: &str) -> Node {
    Node {
        name: format!("n{i}"),
        labels: [("role".to_owned(), role.to_owned())].into(),
        addresses: vec![format!("10.0.0.{}", i + 1).parse().unwrap()],
    }
}

fn np(i: usize, ns: usize, spec: &Value) -> NetworkPolicy {
    serde_json::from_value(json!({
        "metadata": {"name": format!("np{i}"), "namespace": NAMESPACES[ns]},
        "spec": spec,
    }))
    .unwrap()
}

fn cnp(i: usize, spec: &Value) -> ClusterNetworkPolicy {
    serde_json::from_value(json!({"metadata": {"name": format!("cnp{i}")}, "spec": spec})).unwrap()
}

fn np_key(i: usize, ns: usize) -> StagedKey {
    StagedKey::NetworkPolicy(PolicyKey {
        namespace: NAMESPACES[ns].into(),
        name: format!("np{i}"),
    })
}

fn cnp_key(i: usize) -> StagedKey {
    StagedKey::Admin(AdminPolicyKey {
        kind: AdminKind::ClusterNetworkPolicy,
        name: format!("cnp{i}"),
    })
}

/// What the engine should hold: the enforced objects and the staged ones.
#[derive(Default)]
struct Model {
    namespaces: BTreeMap<usize, &'static str>,
    pods: BTreeMap<usize, (usize, &'static str, bool)>,
    nodes: BTreeMap<usize, &'static str>,
    nps: BTreeMap<(usize, usize), Value>,
    cnps: BTreeMap<usize, Value>,
    staged_nps: BTreeMap<(usize, usize), Value>,
    staged_cnps: BTreeMap<usize, Value>,
}

impl Model {
    /// An engine built from scratch: the enforced state, and with `staged` the staged
    /// policies enforced over it.
    fn build(&self, staged: bool) -> Engine {
        let mut e = Engine::new();
        for (n, team) in &self.namespaces {
            e.apply_namespace(&namespace(NAMESPACES[*n], team)).unwrap();
        }
        for (i, role) in &self.nodes {
            e.apply_node(node(*i, role)).unwrap();
        }
        for (i, (n, app, named)) in &self.pods {
            e.apply_pod(&pod(*i, *n, app, *named)).unwrap();
        }
        let mut nps = self.nps.clone();
        let mut cnps = self.cnps.clone();
        if staged {
            nps.extend(self.staged_nps.clone());
            cnps.extend(self.staged_cnps.clone());
        }
        for ((i, n), spec) in &nps {
            e.apply_policy(&np(*i, *n, spec)).unwrap();
        }
        for (i, spec) in &cnps {
            e.apply_cluster_network_policy(&cnp(*i, spec)).unwrap();
        }
        e
    }
}

fn apply(e: &mut Engine, m: &mut Model, op: Op) {
    match op {
        Op::Namespace(n, team) => {
            e.apply_namespace(&namespace(NAMESPACES[n], team)).unwrap();
            m.namespaces.insert(n, team);
        }
        Op::Pod(i, n, app, named) => {
            // A pod that moves namespace is a new pod: the old one goes first.
            if let Some((old, _, _)) = m.pods.get(&i)
                && *old != n
            {
                e.remove_workload(&policy::PodKey {
                    namespace: NAMESPACES[*old].into(),
                    name: format!("p{i}"),
                });
            }
            e.apply_pod(&pod(i, n, app, named)).unwrap();
            m.pods.insert(i, (n, app, named));
        }
        Op::RemovePod(i) => {
            if let Some((n, _, _)) = m.pods.remove(&i) {
                e.remove_workload(&policy::PodKey {
                    namespace: NAMESPACES[n].into(),
                    name: format!("p{i}"),
                });
            }
        }
        Op::Node(i, role) => {
            e.apply_node(node(i, role)).unwrap();
            m.nodes.insert(i, role);
        }
        Op::RemoveNode(i) => {
            e.remove_node(&format!("n{i}"));
            m.nodes.remove(&i);
        }
        Op::Np(i, n, spec) => {
            e.apply_policy(&np(i, n, &spec)).unwrap();
            m.nps.insert((i, n), spec);
        }
        Op::RemoveNp(i, n) => {
            e.remove_policy(&PolicyKey {
                namespace: NAMESPACES[n].into(),
                name: format!("np{i}"),
            });
            m.nps.remove(&(i, n));
        }
        Op::Cnp(i, spec) => {
            e.apply_cluster_network_policy(&cnp(i, &spec)).unwrap();
            m.cnps.insert(i, spec);
        }
        Op::RemoveCnp(i) => {
            e.remove_admin_policy(&AdminPolicyKey {
                kind: AdminKind::ClusterNetworkPolicy,
                name: format!("cnp{i}"),
            });
            m.cnps.remove(&i);
        }
        Op::StageNp(i, n, spec) => {
            let key = e.stage(Object::NetworkPolicy(np(i, n, &spec))).unwrap();
            assert_eq!(key, np_key(i, n));
            m.staged_nps.insert((i, n), spec);
        }
        Op::StageCnp(i, spec) => {
            let key = e
                .stage(Object::ClusterNetworkPolicy(cnp(i, &spec)))
                .unwrap();
            assert_eq!(key, cnp_key(i));
            m.staged_cnps.insert(i, spec);
        }
        Op::UnstageNp(i, n) => {
            e.unstage(&np_key(i, n));
            m.staged_nps.remove(&(i, n));
        }
        Op::UnstageCnp(i) => {
            e.unstage(&cnp_key(i));
            m.staged_cnps.remove(&i);
        }
    }
}

fn cells(e: &Engine) -> Vec<Cell> {
    let probes = [
        Probe {
            port: 80,
            protocol: Protocol::Tcp,
        },
        Probe {
            port: 81,
            protocol: Protocol::Udp,
        },
    ];
    let from = ["10.0.0.1".parse().unwrap(), "192.0.2.1".parse().unwrap()];
    Matrix::new(e, &probes, &from)
        .cells()
        .map(|c| c.to_cell())
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Whatever the order: enforced decisions are those of the enforced objects alone; the
    /// staged view's are those of the enforced objects with the staged ones over them.
    #[test]
    fn the_staged_view_follows_every_change(ops in prop::collection::vec(op(), 1..40)) {
        let mut e = Engine::new();
        let mut m = Model::default();
        for op in ops {
            apply(&mut e, &mut m, op);
        }
        prop_assert_eq!(cells(&e), cells(&m.build(false)));
        let staged = m.staged_nps.len() + m.staged_cnps.len();
        prop_assert_eq!(e.staged_count(), staged);
        match e.staged_view() {
            None => prop_assert_eq!(staged, 0),
            Some(view) => {
                prop_assert!(staged > 0);
                prop_assert_eq!(cells(view), cells(&m.build(true)));
            }
        }
    }
}

/// A refused staged object keeps its previous staged version; a non-policy is refused; a
/// replacement in scope unstages what it does not name.
#[test]
fn refusals_keep_the_previous_staged_version() {
    let mut e = Engine::new();
    e.apply_namespace(&namespace("a", "x")).unwrap();
    e.apply_pod(&pod(0, 0, "web", true)).unwrap();
    let deny_all = json!({"podSelector": {}, "policyTypes": ["Ingress"]});
    e.stage(Object::NetworkPolicy(np(0, 0, &deny_all))).unwrap();
    let bad = json!({"podSelector": {}, "policyTypes": ["Sideways"]});
    let err = e.stage(Object::NetworkPolicy(np(0, 0, &bad))).unwrap_err();
    assert!(err.field.contains("policyTypes"), "{err}");
    assert_eq!(e.staged().collect::<Vec<_>>(), [&np_key(0, 0)]);
    let mut m = Model::default();
    m.namespaces.insert(0, "x");
    m.pods.insert(0, (0, "web", true));
    m.staged_nps.insert((0, 0), deny_all.clone());
    assert_eq!(cells(e.staged_view().unwrap()), cells(&m.build(true)));

    let err = e.stage(Object::Namespace(namespace("b", "y"))).unwrap_err();
    assert!(err.message.contains("only policies"), "{err}");

    // A full replacement of the NetworkPolicies staged: np1 in, np0 out.
    let refused = e.replace_staged(vec![Object::NetworkPolicy(np(1, 0, &deny_all))], |k| {
        matches!(k, StagedKey::NetworkPolicy(_))
    });
    assert!(refused.is_empty());
    assert_eq!(e.staged().collect::<Vec<_>>(), [&np_key(1, 0)]);
    e.unstage(&np_key(1, 0));
    assert!(e.staged_view().is_none() && e.staged_count() == 0);
}
