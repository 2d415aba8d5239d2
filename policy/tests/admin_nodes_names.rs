//! Admin `nodes` and `domainNames` egress peers: the node inventory (relabels, address changes,
//! removals, unknown addresses, IPv6, host-network pods on node addresses) and the names a
//! workload resolved (exact names, wildcards as the API documents them, case, the trailing dot,
//! no names, Deny/Pass rules), one direction at a time and through `matrix`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::IpAddr;

use k8s_openapi::api::core::v1::{Namespace, Pod};
use policy::admin::{AdminNetworkPolicy, BaselineAdminNetworkPolicy, ClusterNetworkPolicy};
use policy::matrix::{self, Matrix, Probe, Source};
use policy::{
    AdminAction, AdminKind, AdminPolicyKey, Connection, Decision, Direction, Engine, Labels, Node,
    Peer, PodKey, Protocol, Reason, Tier,
};
use serde_json::{Value, json};

// ----------------------------------------------------------------------------------------------
// Helpers
// ----------------------------------------------------------------------------------------------

fn key(s: &str) -> PodKey {
    let (namespace, name) = s.split_once('/').unwrap();
    PodKey {
        namespace: namespace.into(),
        name: name.into(),
    }
}

fn cnp_key(name: &str) -> AdminPolicyKey {
    AdminPolicyKey {
        kind: AdminKind::ClusterNetworkPolicy,
        name: name.into(),
    }
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

fn node(name: &str, role: &str, addresses: &[&str]) -> Node {
    Node {
        name: name.into(),
        labels: labels(&[("node-role", role), ("kubernetes.io/hostname", name)]),
        addresses: addresses.iter().map(|a| ip(a)).collect(),
    }
}

fn pod(id: &str, labels: Value, ip: &str, host_network: bool, ports: Value) -> Pod {
    let k = key(id);
    serde_json::from_value(json!({
        "metadata": {"name": k.name, "namespace": k.namespace, "labels": labels},
        "spec": {"hostNetwork": host_network, "containers": [{"name": "c", "ports": ports}]},
        "status": {"podIP": ip, "podIPs": [{"ip": ip}]}
    }))
    .unwrap()
}

fn cnp(name: &str, spec: Value) -> ClusterNetworkPolicy {
    serde_json::from_value(json!({"metadata": {"name": name}, "spec": spec})).unwrap()
}

fn apply_cnp(e: &mut Engine, name: &str, spec: Value) {
    let applied = e.apply_cluster_network_policy(&cnp(name, spec)).unwrap();
    assert!(applied.warnings.is_empty(), "{:?}", applied.warnings);
}

/// Namespaces `a` and `kube-system`; pods a/web (10.0.1.1), a/db (10.0.1.2, pg=5432) and the
/// host-network kube-system/apiserver on cp-1's address 172.18.0.2 (https=6443); nodes cp-1
/// (control-plane: 172.18.0.2, fd00::2) and worker-1 (worker: 172.18.0.3).
fn cluster() -> Engine {
    let mut e = Engine::new();
    for ns in ["a", "kube-system"] {
        let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": ns}})).unwrap();
        e.apply_namespace(&ns).unwrap();
    }
    e.apply_pod(&pod(
        "a/web",
        json!({"app": "web"}),
        "10.0.1.1",
        false,
        json!([]),
    ))
    .unwrap();
    e.apply_pod(&pod(
        "a/db",
        json!({"app": "db"}),
        "10.0.1.2",
        false,
        json!([{"name": "pg", "containerPort": 5432}]),
    ))
    .unwrap();
    e.apply_pod(&pod(
        "kube-system/apiserver",
        json!({"component": "kube-apiserver"}),
        "172.18.0.2",
        true,
        json!([{"name": "https", "containerPort": 6443}]),
    ))
    .unwrap();
    e.apply_node(node("cp-1", "control-plane", &["172.18.0.2", "fd00::2"]))
        .unwrap();
    e.apply_node(node("worker-1", "worker", &["172.18.0.3"]))
        .unwrap();
    e
}

/// Egress of `local` to an IP-only peer, with resolved names.
fn egress_ip(e: &Engine, local: &str, to: &str, port: u16, names: &[&str]) -> Decision {
    let local = key(local);
    let conn = Connection {
        local: &local,
        direction: Direction::Egress,
        peer: &Peer::IpOnly,
        peer_ip: Some(ip(to)),
        port,
        protocol: Protocol::Tcp,
        dest_port_name: None,
        resolved_names: names,
    };
    let owned = e.decide(&conn);
    assert_eq!(e.decide_ref(&conn).to_decision(), owned);
    owned
}

/// Egress of `local` to a pod peer (its identity) at `at`, with resolved names.
fn egress_pod(e: &Engine, local: &str, peer: &str, at: &str, names: &[&str]) -> Decision {
    let local = key(local);
    let peer = Peer::Workload(e.identity(&key(peer)).unwrap());
    let conn = Connection {
        local: &local,
        direction: Direction::Egress,
        peer: &peer,
        peer_ip: Some(ip(at)),
        port: 443,
        protocol: Protocol::Tcp,
        dest_port_name: None,
        resolved_names: names,
    };
    let owned = e.decide(&conn);
    assert_eq!(e.decide_ref(&conn).to_decision(), owned);
    owned
}

/// The admin rule that decided, as (policy name, rule index, action, fail closed); `None` if
/// no admin rule did.
fn admin_rule(d: &Decision) -> Option<(String, usize, AdminAction, bool)> {
    match &d.reason {
        Reason::Admin(r) => Some((r.policy.name.clone(), r.index, r.action, r.fail_closed)),
        _ => None,
    }
}

fn ns_subject(ns: &str) -> Value {
    json!({"namespaces": {"matchLabels": {"kubernetes.io/metadata.name": ns}}})
}

/// Admin policy `nodes` for namespace a: deny the control plane's 6443, accept every node's
/// 10250.
fn nodes_policy(e: &mut Engine) {
    apply_cnp(
        e,
        "nodes",
        json!({"tier": "Admin", "priority": 1, "subject": ns_subject("a"),
        "egress": [
            {"action": "Deny", "to": [{"nodes": {"matchLabels": {"node-role": "control-plane"}}}],
             "protocols": [{"tcp": {"destinationPort": {"number": 6443}}}]},
            {"action": "Accept", "to": [{"nodes": {}}],
             "protocols": [{"tcp": {"destinationPort": {"number": 10250}}}]}
        ]}),
    );
}

// ----------------------------------------------------------------------------------------------
// nodes
// ----------------------------------------------------------------------------------------------

#[test]
fn nodes_peers_match_the_addresses_of_the_nodes_they_select() {
    let mut e = cluster();
    nodes_policy(&mut e);
    let denied = egress_ip(&e, "a/web", "172.18.0.2", 6443, &[]);
    assert!(!denied.allowed);
    assert_eq!(
        admin_rule(&denied),
        Some(("nodes".into(), 0, AdminAction::Deny, false))
    );
    assert_eq!(
        denied.to_string(),
        "denied by Admin ClusterNetworkPolicy/nodes (priority 1) egress rule 0 (Deny)"
    );
    // IPv6: every address of the node counts.
    assert!(!egress_ip(&e, "a/web", "fd00::2", 6443, &[]).allowed);
    // A worker is no control plane: no admin rule matches 6443 there.
    let d = egress_ip(&e, "a/web", "172.18.0.3", 6443, &[]);
    assert_eq!((d.allowed, d.reason), (true, Reason::NotIsolated));
    // `nodes: {}` selects every node.
    for to in ["172.18.0.2", "fd00::2", "172.18.0.3"] {
        let d = egress_ip(&e, "a/web", to, 10250, &[]);
        assert_eq!(
            admin_rule(&d),
            Some(("nodes".into(), 1, AdminAction::Allow, false)),
            "{to}"
        );
    }
    // An address no known node holds matches no nodes peer, even `{}`.
    for to in ["172.18.0.9", "fd00::3", "10.0.1.2"] {
        let d = egress_ip(&e, "a/web", to, 6443, &[]);
        assert_eq!(d.reason, Reason::NotIsolated, "{to}");
        let d = egress_ip(&e, "a/web", to, 10250, &[]);
        assert_eq!(d.reason, Reason::NotIsolated, "{to}");
    }
    // Ordinary pod addresses are no node's: a pod peer is not matched...
    assert_eq!(
        egress_pod(&e, "a/web", "a/db", "10.0.1.2", &[]).reason,
        Reason::NotIsolated
    );
    // ...unless it speaks from a node address (the peer's address is what counts).
    let d = egress_pod(&e, "a/web", "a/db", "172.18.0.3", &[]);
    assert_eq!(d.reason, Reason::NotIsolated);
    let local = key("a/web");
    let peer = Peer::Workload(e.identity(&key("a/db")).unwrap());
    let d = e.decide(&Connection {
        local: &local,
        direction: Direction::Egress,
        peer: &peer,
        peer_ip: Some(ip("172.18.0.3")),
        port: 10250,
        protocol: Protocol::Tcp,
        dest_port_name: None,
        resolved_names: &[],
    });
    assert_eq!(admin_rule(&d).map(|r| r.1), Some(1));
    // Without an address, no nodes peer can match.
    let d = e.decide(&Connection {
        local: &local,
        direction: Direction::Egress,
        peer: &Peer::IpOnly,
        peer_ip: None,
        port: 10250,
        protocol: Protocol::Tcp,
        dest_port_name: None,
        resolved_names: &[],
    });
    assert_eq!(d.reason, Reason::NotIsolated);
}

#[test]
fn relabels_address_changes_and_removals_count_from_the_next_decision() {
    let mut e = cluster();
    nodes_policy(&mut e);
    assert!(egress_ip(&e, "a/web", "172.18.0.3", 6443, &[]).allowed);
    // worker-1 becomes a control-plane node.
    e.apply_node(node("worker-1", "control-plane", &["172.18.0.3"]))
        .unwrap();
    assert!(!egress_ip(&e, "a/web", "172.18.0.3", 6443, &[]).allowed);
    // And back.
    e.apply_node(node("worker-1", "worker", &["172.18.0.3"]))
        .unwrap();
    assert!(egress_ip(&e, "a/web", "172.18.0.3", 6443, &[]).allowed);

    // cp-1 moves from 172.18.0.2 to 172.18.0.4 (and keeps its IPv6 address).
    e.apply_node(node("cp-1", "control-plane", &["172.18.0.4", "fd00::2"]))
        .unwrap();
    assert!(egress_ip(&e, "a/web", "172.18.0.2", 6443, &[]).allowed);
    assert!(!egress_ip(&e, "a/web", "172.18.0.4", 6443, &[]).allowed);
    assert!(!egress_ip(&e, "a/web", "fd00::2", 6443, &[]).allowed);
    let holders: Vec<&str> = e
        .nodes_by_ip(&ip("172.18.0.4"))
        .map(|n| n.name.as_str())
        .collect();
    assert_eq!(holders, ["cp-1"]);
    assert_eq!(e.nodes_by_ip(&ip("172.18.0.2")).count(), 0);

    // Removed: its addresses are nobody's.
    e.remove_node("cp-1");
    assert!(e.node("cp-1").is_none());
    assert_eq!(e.node_count(), 1);
    assert!(egress_ip(&e, "a/web", "172.18.0.4", 6443, &[]).allowed);
    assert_eq!(
        egress_ip(&e, "a/web", "fd00::2", 10250, &[]).reason,
        Reason::NotIsolated
    );
    // Removing an unknown node is nothing.
    e.remove_node("cp-1");
    e.remove_node("never-was");
    let names: Vec<&str> = e.nodes().map(|n| n.name.as_str()).collect();
    assert_eq!(names, ["worker-1"]);
}

#[test]
fn an_address_two_nodes_claim_matches_while_either_is_selected() {
    let mut e = cluster();
    nodes_policy(&mut e);
    // 172.18.0.3 moves to cp-2 before worker-1's update arrives.
    e.apply_node(node("cp-2", "control-plane", &["172.18.0.3"]))
        .unwrap();
    let holders: Vec<&str> = e
        .nodes_by_ip(&ip("172.18.0.3"))
        .map(|n| n.name.as_str())
        .collect();
    assert_eq!(holders, ["worker-1", "cp-2"]);
    assert!(!egress_ip(&e, "a/web", "172.18.0.3", 6443, &[]).allowed);
    // worker-1's update: the address is cp-2's alone, still a control plane's.
    e.apply_node(node("worker-1", "worker", &["172.18.0.5"]))
        .unwrap();
    assert!(!egress_ip(&e, "a/web", "172.18.0.3", 6443, &[]).allowed);
    e.remove_node("cp-2");
    assert!(egress_ip(&e, "a/web", "172.18.0.3", 6443, &[]).allowed);
}

#[test]
fn host_network_pods_on_node_addresses_are_nodes_peers_in_the_matrix() {
    let mut e = cluster();
    nodes_policy(&mut e);
    let probe = Probe {
        port: 6443,
        protocol: Protocol::Tcp,
    };
    // The apiserver is a host-network pod: IP-only, at cp-1's address.
    let v = matrix::evaluate(
        &e,
        &Source::Pod(key("a/web")),
        &key("kube-system/apiserver"),
        probe,
    )
    .unwrap();
    assert!(!v.allowed);
    let egress = v.egress.unwrap();
    assert_eq!(
        admin_rule(&egress),
        Some(("nodes".into(), 0, AdminAction::Deny, false))
    );
    assert_eq!(v.ingress.reason, Reason::HostNetwork);
    // The matrix says the same, and only for the sources the policy selects.
    let m = Matrix::new(&e, &[probe], &[ip("172.18.0.3")]);
    let cells: Vec<(String, bool)> = m
        .cells()
        .filter(|c| c.to == &key("kube-system/apiserver"))
        .map(|c| (c.from.to_string(), c.verdict.allowed))
        .collect();
    assert_eq!(
        cells,
        [
            ("a/db".to_owned(), false),
            ("a/web".to_owned(), false),
            // An IP-only source (here a node's address) has no egress for anything to enforce.
            ("172.18.0.3".to_owned(), true),
        ]
    );
    // The apiserver moves off the control plane (cp-1 relabelled): allowed.
    e.apply_node(node("cp-1", "worker", &["172.18.0.2", "fd00::2"]))
        .unwrap();
    let v = matrix::evaluate(
        &e,
        &Source::Pod(key("a/web")),
        &key("kube-system/apiserver"),
        probe,
    )
    .unwrap();
    assert!(v.allowed, "{v}");
    // evaluate_to_ip asks the same of a bare address.
    let d = matrix::evaluate_to_ip(&e, &key("a/web"), ip("172.18.0.3"), probe, &[]).unwrap();
    assert_eq!(d.reason, Reason::NotIsolated);
    let kubelet = Probe {
        port: 10250,
        protocol: Protocol::Tcp,
    };
    let d = matrix::evaluate_to_ip(&e, &key("a/web"), ip("fd00::2"), kubelet, &[]).unwrap();
    assert_eq!(admin_rule(&d).map(|r| r.1), Some(1));
    assert!(matrix::evaluate_to_ip(&e, &key("a/nope"), ip("fd00::2"), kubelet, &[]).is_none());
}

#[test]
fn baseline_and_v1alpha1_policies_have_nodes_peers_too() {
    let mut e = cluster();
    let anp: AdminNetworkPolicy = serde_json::from_value(json!({
        "metadata": {"name": "kubelet"},
        "spec": {"priority": 3,
                 "subject": {"pods": {"namespaceSelector": {}, "podSelector": {"matchLabels": {"app": "web"}}}},
                 "egress": [{"action": "Pass", "to": [{"nodes": {"matchLabels": {"node-role": "worker"}}}]}]}
    }))
    .unwrap();
    assert!(
        e.apply_admin_network_policy(&anp)
            .unwrap()
            .warnings
            .is_empty()
    );
    let banp: BaselineAdminNetworkPolicy = serde_json::from_value(json!({
        "metadata": {"name": "default"},
        "spec": {"subject": {"namespaces": {}},
                 "egress": [{"action": "Deny", "to": [{"nodes": {}}]}]}
    }))
    .unwrap();
    assert!(
        e.apply_baseline_admin_network_policy(&banp)
            .unwrap()
            .warnings
            .is_empty()
    );
    // a/web passes the worker to the Baseline tier, which denies every node.
    let d = egress_ip(&e, "a/web", "172.18.0.3", 80, &[]);
    assert!(!d.allowed);
    match &d.reason {
        Reason::Admin(r) => {
            assert_eq!(r.tier, Tier::Baseline);
            assert_eq!(r.policy.kind, AdminKind::BaselineAdminNetworkPolicy);
            assert!(!r.fail_closed);
        }
        other => panic!("{other:?}"),
    }
    // Not a node: the default.
    assert!(egress_ip(&e, "a/db", "192.0.2.1", 80, &[]).allowed);
}

#[test]
fn invalid_nodes_are_refused_naming_the_field_and_the_old_version_stays() {
    let mut e = cluster();
    nodes_policy(&mut e);
    let cases = [
        (node("", "worker", &[]), "name", "name is required"),
        (
            node("Worker_1", "worker", &[]),
            "name",
            "not a valid node name",
        ),
        (
            Node {
                labels: labels(&[("bad key!", "x")]),
                ..node("worker-1", "worker", &[])
            },
            "labels[bad key!]",
            "invalid label key",
        ),
        (
            node("worker-1", "worker", &["172.18.0.3", "0.0.0.0"]),
            "addresses[1]",
            "not a unicast address",
        ),
        (
            node("worker-1", "worker", &["ff02::1"]),
            "addresses[0]",
            "not a unicast address",
        ),
        (
            node("worker-1", "worker", &["255.255.255.255"]),
            "addresses[0]",
            "not a unicast address",
        ),
    ];
    for (n, field, words) in cases {
        let err = e.apply_node(n.clone()).unwrap_err();
        assert_eq!(err.kind, "Node");
        assert_eq!(err.field, field, "{err}");
        assert!(err.message.contains(words), "{err}");
    }
    // The last good worker-1 is still in force.
    assert_eq!(
        e.node("worker-1"),
        Some(&node("worker-1", "worker", &["172.18.0.3"]))
    );
    // A node may have no address (it matches nothing); a repeated address is kept once.
    e.apply_node(node("w2", "worker", &[])).unwrap();
    e.apply_node(node("w3", "worker", &["172.18.0.7", "172.18.0.7"]))
        .unwrap();
    assert_eq!(e.node("w3").unwrap().addresses, [ip("172.18.0.7")]);
    assert_eq!(
        e.apply_node(node("", "worker", &[]))
            .unwrap_err()
            .to_string(),
        "Node <unnamed>: name: name is required"
    );
}

// ----------------------------------------------------------------------------------------------
// domainNames
// ----------------------------------------------------------------------------------------------

/// Namespace a may reach api.example.com and anything under cdn.example.com on 443/TCP, and
/// nothing else outside (an allowlist, as the API suggests: Accept by name, then a deny).
fn allowlist(e: &mut Engine) {
    apply_cnp(
        e,
        "allowlist",
        json!({"tier": "Admin", "priority": 10, "subject": ns_subject("a"),
        "egress": [
            {"action": "Accept", "to": [{"domainNames": ["api.example.com", "*.cdn.example.com"]}],
             "protocols": [{"tcp": {"destinationPort": {"number": 443}}}]},
            {"action": "Deny", "to": [{"networks": ["0.0.0.0/0", "::/0"]}]}
        ]}),
    );
}

#[test]
fn domain_names_match_exactly_or_by_wildcard_as_the_api_documents() {
    let mut e = cluster();
    allowlist(&mut e);
    let out = "93.184.216.34";
    let allowed = |names: &[&str]| {
        let d = egress_ip(&e, "a/web", out, 443, names);
        if d.allowed {
            assert_eq!(
                admin_rule(&d),
                Some(("allowlist".into(), 0, AdminAction::Allow, false))
            );
        } else {
            assert_eq!(admin_rule(&d).map(|r| r.1), Some(1), "{names:?}");
        }
        d.allowed
    };
    assert!(allowed(&["api.example.com"]));
    // Exact: no subdomain, no parent, no lookalike.
    assert!(!allowed(&["www.api.example.com"]));
    assert!(!allowed(&["example.com"]));
    assert!(!allowed(&["my-api.example.com"]));
    // `*.` is one or more whole labels, never the domain itself.
    assert!(allowed(&["img.cdn.example.com"]));
    assert!(allowed(&["a.b.img.cdn.example.com"]));
    assert!(!allowed(&["cdn.example.com"]));
    assert!(!allowed(&["xcdn.example.com"]));
    // Any of the names resolved to the address.
    assert!(allowed(&["tracker.example.net", "img.cdn.example.com"]));
    // No names: nothing matches.
    assert!(!allowed(&[]));
    // The datapath gives lowercase names without the dot; other spellings match all the same.
    assert!(allowed(&["API.Example.COM"]));
    assert!(allowed(&["api.example.com."]));
    assert!(allowed(&["Img.CDN.example.com."]));
    // The rule's ports still count.
    let d = egress_ip(&e, "a/web", out, 80, &["api.example.com"]);
    assert_eq!(admin_rule(&d).map(|r| r.1), Some(1));
    // Names of another namespace's pod do not matter: the subject is a.
    assert!(egress_ip(&e, "kube-system/apiserver", out, 443, &[]).allowed);
}

#[test]
fn patterns_are_read_case_free_and_without_the_trailing_dot() {
    let mut e = cluster();
    apply_cnp(
        &mut e,
        "spelled",
        json!({"tier": "Admin", "priority": 1, "subject": ns_subject("a"),
               "egress": [{"action": "Accept", "to": [{"domainNames": ["Docs.Example.ORG.", "*.Registry.IO", "_ldap._tcp.corp.example"]}]}]}),
    );
    for (name, hit) in [
        ("docs.example.org", true),
        ("www.docs.example.org", false),
        ("ghcr.registry.io", true),
        ("registry.io", false),
        ("_ldap._tcp.corp.example", true),
    ] {
        let d = egress_ip(&e, "a/web", "198.51.100.1", 443, &[name]);
        assert_eq!(admin_rule(&d).is_some(), hit, "{name}");
    }
}

#[test]
fn domain_names_match_pods_too_and_only_on_egress() {
    let mut e = cluster();
    allowlist(&mut e);
    // A pod the workload reached by a name (a headless Service's record): the name matches.
    let d = egress_pod(&e, "a/web", "a/db", "10.0.1.2", &["db.cdn.example.com"]);
    assert_eq!(admin_rule(&d).map(|r| r.1), Some(0));
    // Ingress has no names: the engine ignores any given.
    let local = key("a/web");
    let d = e.decide(&Connection {
        local: &local,
        direction: Direction::Ingress,
        peer: &Peer::IpOnly,
        peer_ip: Some(ip("93.184.216.34")),
        port: 443,
        protocol: Protocol::Tcp,
        dest_port_name: None,
        resolved_names: &["api.example.com"],
    });
    assert_eq!(d.reason, Reason::NotIsolated);
    // evaluate_to_ip takes the names; a pod's address is that pod, by its identity.
    let probe = Probe {
        port: 443,
        protocol: Protocol::Tcp,
    };
    let d = matrix::evaluate_to_ip(
        &e,
        &key("a/web"),
        ip("93.184.216.34"),
        probe,
        &["api.example.com"],
    )
    .unwrap();
    assert!(d.allowed);
    let d = matrix::evaluate_to_ip(&e, &key("a/web"), ip("93.184.216.34"), probe, &[]).unwrap();
    assert!(!d.allowed);
}

#[test]
fn deny_and_pass_rules_with_domain_names_still_fail_closed() {
    for action in ["Deny", "Pass"] {
        let mut e = cluster();
        allowlist(&mut e);
        let applied = e
            .apply_cluster_network_policy(&cnp(
                "by-name",
                json!({"tier": "Admin", "priority": 1, "subject": ns_subject("a"),
                       "egress": [{"action": action, "to": [{"networks": ["192.0.2.0/24"]}, {"domainNames": ["evil.example.com"]}]}]}),
            ))
            .unwrap();
        assert_eq!(applied.warnings.len(), 1, "{:?}", applied.warnings);
        assert_eq!(
            applied.warnings[0].to_string(),
            "spec.egress[0].to[1].domainNames: the API supports domainNames only in Accept \
             rules; the rule fails closed: it denies all traffic (every peer, every port) \
             (spec.egress[0])"
        );
        // Whatever the names, every peer and port: the allowlist is never reached.
        for names in [&[][..], &["api.example.com"], &["evil.example.com"]] {
            let d = egress_ip(&e, "a/web", "93.184.216.34", 443, names);
            assert_eq!(
                admin_rule(&d),
                Some(("by-name".into(), 0, AdminAction::Deny, true)),
                "{action} {names:?}"
            );
        }
    }
    // A Deny after the Accept by name works as the API intends: the allowlist.
    let mut e = cluster();
    allowlist(&mut e);
    assert!(egress_ip(&e, "a/web", "93.184.216.34", 443, &["api.example.com"]).allowed);
}

#[test]
fn v1alpha1_allow_and_baseline_tier_accept_rules_take_names() {
    let mut e = cluster();
    let anp: AdminNetworkPolicy = serde_json::from_value(json!({
        "metadata": {"name": "names"},
        "spec": {"priority": 3, "subject": {"namespaces": {}},
                 "egress": [{"action": "Allow", "to": [{"domainNames": ["*.example.com"]}],
                             "ports": [{"portNumber": {"port": 443}}]}]}
    }))
    .unwrap();
    assert!(
        e.apply_admin_network_policy(&anp)
            .unwrap()
            .warnings
            .is_empty()
    );
    apply_cnp(
        &mut e,
        "baseline",
        json!({"tier": "Baseline", "priority": 1, "subject": {"namespaces": {}},
               "egress": [{"action": "Accept", "to": [{"domainNames": ["mirror.example.org"]}]},
                          {"action": "Deny", "to": [{"networks": ["0.0.0.0/0"]}]}]}),
    );
    let d = egress_ip(&e, "a/web", "203.0.113.7", 443, &["www.example.com"]);
    assert_eq!(
        admin_rule(&d),
        Some(("names".into(), 0, AdminAction::Allow, false))
    );
    assert_eq!(
        d.to_string(),
        "allowed by Admin AdminNetworkPolicy/names (priority 3) egress rule 0 (Allow)"
    );
    let d = egress_ip(&e, "a/web", "203.0.113.8", 80, &["mirror.example.org"]);
    assert_eq!(
        admin_rule(&d),
        Some(("baseline".into(), 0, AdminAction::Allow, false))
    );
    assert!(!egress_ip(&e, "a/web", "203.0.113.8", 80, &["www.example.com"]).allowed);
}

#[test]
fn domain_names_are_validated_as_the_crd_does() {
    let mut e = cluster();
    let try_names = |e: &mut Engine, names: Value| {
        e.apply_cluster_network_policy(&cnp(
            "v",
            json!({"tier": "Admin", "priority": 1, "subject": {"namespaces": {}},
                   "egress": [{"action": "Accept", "to": [{"domainNames": names}]}]}),
        ))
    };
    let err = try_names(
        &mut e,
        json!(["a.example.com", "b.example.com", "a.example.com"]),
    )
    .unwrap_err();
    assert_eq!(err.field, "spec.egress[0].to[0].domainNames[2]");
    assert!(err.message.contains("duplicate value"), "{err}");
    let err = try_names(&mut e, json!(["*.*.example.com"])).unwrap_err();
    assert!(err.message.contains("not a domain name"), "{err}");
    let err = try_names(&mut e, json!([])).unwrap_err();
    assert_eq!(err.field, "spec.egress[0].to[0].domainNames");
    // The CRD's pattern admits a label starting with `_` (its `A-z`): so does the engine.
    assert!(
        try_names(&mut e, json!(["_sip._tcp.example.com", "example.com."]))
            .unwrap()
            .warnings
            .is_empty()
    );
    // Different spellings of one name are different items to the API server.
    assert!(try_names(&mut e, json!(["example.com", "Example.com"])).is_ok());
    assert_eq!(e.admin_policies().collect::<Vec<_>>(), [&cnp_key("v")]);
}
