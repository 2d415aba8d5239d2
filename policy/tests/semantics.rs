//! NetworkPolicy semantics, one test per rule a Kubernetes user relies on. Objects are written
//! as JSON (as `kubectl get -o json` would show them) and evaluated through `matrix::evaluate`,
//! i.e. egress of the source AND ingress of the destination.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::IpAddr;

use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use policy::matrix::{self, Matrix, Probe, Source, Verdict};
use policy::{
    Connection, Direction, Engine, Peer, PodKey, PolicyKey, Protocol, Reason, RuleRef,
    WorkloadIdentity,
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

fn pkey(s: &str) -> PolicyKey {
    let k = key(s);
    PolicyKey {
        namespace: k.namespace,
        name: k.name,
    }
}

fn namespace(name: &str, labels: Value) -> Namespace {
    serde_json::from_value(json!({"metadata": {"name": name, "labels": labels}})).unwrap()
}

/// A pod `ns/name` with labels, one IP and container ports `[(name, port, protocol)]`.
fn pod(id: &str, labels: Value, ip: &str, ports: &[(&str, u16, &str)]) -> Pod {
    let k = key(id);
    let ports: Vec<Value> = ports
        .iter()
        .map(|(n, p, proto)| {
            let mut v = json!({"containerPort": p, "protocol": proto});
            if !n.is_empty() {
                v["name"] = json!(n);
            }
            v
        })
        .collect();
    serde_json::from_value(json!({
        "metadata": {"name": k.name, "namespace": k.namespace, "labels": labels},
        "spec": {"containers": [{"name": "c", "ports": ports}]},
        "status": {"podIP": ip, "podIPs": [{"ip": ip}]}
    }))
    .unwrap()
}

fn netpol(id: &str, spec: Value) -> NetworkPolicy {
    let k = key(id);
    serde_json::from_value(json!({
        "metadata": {"name": k.name, "namespace": k.namespace},
        "spec": spec
    }))
    .unwrap()
}

/// Two namespaces (`a` labelled team=x, `b` labelled team=y) with pods:
/// a/web (app=web, 10.0.1.1, http=80), a/db (app=db, 10.0.1.2, http=8080),
/// b/web (app=web, 10.0.2.1, http=80), b/client (app=client, 10.0.2.2).
fn cluster() -> Engine {
    let mut e = Engine::new();
    e.apply_namespace(&namespace("a", json!({"team": "x"})))
        .unwrap();
    e.apply_namespace(&namespace("b", json!({"team": "y"})))
        .unwrap();
    e.apply_pod(&pod(
        "a/web",
        json!({"app": "web"}),
        "10.0.1.1",
        &[("http", 80, "TCP")],
    ))
    .unwrap();
    e.apply_pod(&pod(
        "a/db",
        json!({"app": "db"}),
        "10.0.1.2",
        &[("http", 8080, "TCP")],
    ))
    .unwrap();
    e.apply_pod(&pod(
        "b/web",
        json!({"app": "web"}),
        "10.0.2.1",
        &[("http", 80, "TCP")],
    ))
    .unwrap();
    e.apply_pod(&pod("b/client", json!({"app": "client"}), "10.0.2.2", &[]))
        .unwrap();
    e
}

fn apply(e: &mut Engine, id: &str, spec: Value) {
    e.apply_policy(&netpol(id, spec)).unwrap();
}

fn probe(port: u16, protocol: Protocol) -> Probe {
    Probe { port, protocol }
}

fn verdict(e: &Engine, from: &str, to: &str, port: u16, protocol: Protocol) -> Verdict {
    matrix::evaluate(e, &Source::Pod(key(from)), &key(to), probe(port, protocol)).unwrap()
}

fn allowed(e: &Engine, from: &str, to: &str, port: u16) -> bool {
    verdict(e, from, to, port, Protocol::Tcp).allowed
}

fn allowed_from_ip(e: &Engine, ip: &str, to: &str, port: u16) -> bool {
    let ip: IpAddr = ip.parse().unwrap();
    matrix::evaluate(e, &Source::Ip(ip), &key(to), probe(port, Protocol::Tcp))
        .unwrap()
        .allowed
}

fn deny_all_ingress(e: &mut Engine, id: &str) {
    apply(e, id, json!({"podSelector": {}}));
}

// ----------------------------------------------------------------------------------------------
// Isolation and combination
// ----------------------------------------------------------------------------------------------

#[test]
fn isolation_is_per_direction() {
    let mut e = cluster();
    deny_all_ingress(&mut e, "a/deny");
    // a/web's ingress is isolated, its egress is not.
    assert!(!allowed(&e, "b/client", "a/web", 80));
    assert!(allowed(&e, "a/web", "b/web", 80));
}

#[test]
fn isolation_is_per_pod() {
    let mut e = cluster();
    apply(
        &mut e,
        "a/db-only",
        json!({"podSelector": {"matchLabels": {"app": "db"}}}),
    );
    assert!(!allowed(&e, "b/client", "a/db", 8080));
    assert!(allowed(&e, "b/client", "a/web", 80));
}

#[test]
fn rules_of_all_selecting_policies_are_unioned() {
    let mut e = cluster();
    apply(
        &mut e,
        "a/from-client",
        json!({
            "podSelector": {},
            "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"team": "y"}}, "podSelector": {"matchLabels": {"app": "client"}}}]}]
        }),
    );
    apply(
        &mut e,
        "a/from-b-web",
        json!({
            "podSelector": {"matchLabels": {"app": "web"}},
            "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"team": "y"}}, "podSelector": {"matchLabels": {"app": "web"}}}]}]
        }),
    );
    assert!(allowed(&e, "b/client", "a/web", 80));
    assert!(allowed(&e, "b/web", "a/web", 80));
    // a/db is selected only by the first policy.
    assert!(!allowed(&e, "b/web", "a/db", 8080));
}

#[test]
fn connection_needs_egress_of_source_and_ingress_of_destination() {
    let mut e = cluster();
    // b/client may not send anything.
    apply(
        &mut e,
        "b/no-egress",
        json!({
            "podSelector": {"matchLabels": {"app": "client"}},
            "policyTypes": ["Egress"]
        }),
    );
    let v = verdict(&e, "b/client", "a/web", 80, Protocol::Tcp);
    assert!(!v.allowed);
    assert!(v.ingress.allowed, "ingress of a/web is not isolated");
    assert!(!v.egress.as_ref().unwrap().allowed);
    // And the other way round: egress allowed, ingress denied.
    let mut e = cluster();
    deny_all_ingress(&mut e, "a/deny");
    let v = verdict(&e, "b/client", "a/web", 80, Protocol::Tcp);
    assert!(!v.allowed);
    assert!(v.egress.as_ref().unwrap().allowed);
    assert!(!v.ingress.allowed);
}

// ----------------------------------------------------------------------------------------------
// Empty lists and defaulting
// ----------------------------------------------------------------------------------------------

#[test]
fn absent_or_empty_ingress_denies_all() {
    for spec in [
        json!({"podSelector": {}}),
        json!({"podSelector": {}, "ingress": []}),
        json!({"podSelector": {}, "policyTypes": ["Ingress"], "ingress": []}),
    ] {
        let mut e = cluster();
        apply(&mut e, "a/p", spec.clone());
        assert!(!allowed(&e, "b/client", "a/web", 80), "{spec}");
        assert!(!allowed(&e, "a/db", "a/web", 80), "{spec}");
    }
}

#[test]
fn empty_egress_under_egress_policy_type_denies_all() {
    for spec in [
        json!({"podSelector": {}, "policyTypes": ["Egress"]}),
        json!({"podSelector": {}, "policyTypes": ["Egress"], "egress": []}),
    ] {
        let mut e = cluster();
        apply(&mut e, "b/p", spec.clone());
        assert!(!allowed(&e, "b/client", "a/web", 80), "{spec}");
    }
}

#[test]
fn a_single_empty_rule_allows_all() {
    let mut e = cluster();
    apply(
        &mut e,
        "a/all-in",
        json!({"podSelector": {}, "ingress": [{}]}),
    );
    apply(
        &mut e,
        "b/all-out",
        json!({"podSelector": {}, "egress": [{}]}),
    );
    assert!(allowed(&e, "b/client", "a/web", 80));
    assert!(allowed(&e, "b/client", "a/db", 12345));
    assert!(allowed_from_ip(&e, "192.0.2.1", "a/web", 80));
}

#[test]
fn rule_without_from_allows_all_sources_on_its_ports() {
    for rule in [
        json!({"ports": [{"port": 80}]}),
        json!({"from": [], "ports": [{"port": 80}]}),
    ] {
        let mut e = cluster();
        apply(
            &mut e,
            "a/p",
            json!({"podSelector": {}, "ingress": [rule.clone()]}),
        );
        assert!(allowed(&e, "b/client", "a/web", 80), "{rule}");
        assert!(allowed_from_ip(&e, "203.0.113.5", "a/web", 80), "{rule}");
        assert!(!allowed(&e, "b/client", "a/web", 81), "{rule}");
    }
}

#[test]
fn rule_without_ports_allows_all_ports_of_its_peers() {
    for rule in [
        json!({"from": [{"podSelector": {"matchLabels": {"app": "web"}}}]}),
        json!({"from": [{"podSelector": {"matchLabels": {"app": "web"}}}], "ports": []}),
    ] {
        let mut e = cluster();
        apply(
            &mut e,
            "a/p",
            json!({"podSelector": {"matchLabels": {"app": "db"}}, "ingress": [rule.clone()]}),
        );
        assert!(allowed(&e, "a/web", "a/db", 8080), "{rule}");
        assert!(allowed(&e, "a/web", "a/db", 5432), "{rule}");
        assert!(
            verdict(&e, "a/web", "a/db", 53, Protocol::Udp).allowed,
            "{rule}"
        );
    }
}

#[test]
fn policy_types_default_to_ingress_plus_egress_iff_egress_rules_exist() {
    // Egress rules present, no policyTypes: both directions isolated.
    let mut e = cluster();
    apply(
        &mut e,
        "b/p",
        json!({
            "podSelector": {"matchLabels": {"app": "client"}},
            "egress": [{"ports": [{"port": 53, "protocol": "UDP"}]}]
        }),
    );
    assert!(!allowed(&e, "b/client", "a/web", 80), "egress isolated");
    assert!(
        !allowed(&e, "a/web", "b/client", 80),
        "ingress isolated by default"
    );
    // `egress: []` and no policyTypes: only Ingress.
    let mut e = cluster();
    apply(
        &mut e,
        "b/p",
        json!({"podSelector": {"matchLabels": {"app": "client"}}, "egress": []}),
    );
    assert!(allowed(&e, "b/client", "a/web", 80), "egress not isolated");
    assert!(!allowed(&e, "a/web", "b/client", 80));
}

#[test]
fn explicit_policy_types_are_kept_as_given() {
    let mut e = cluster();
    // Ingress rules that deny nearly everything, but only Egress is a policy type: ingress is
    // not isolated by this policy.
    apply(
        &mut e,
        "a/p",
        json!({
            "podSelector": {},
            "policyTypes": ["Egress"],
            "ingress": [{"from": [{"ipBlock": {"cidr": "192.0.2.0/24"}}]}],
            "egress": [{}]
        }),
    );
    assert!(allowed(&e, "b/client", "a/web", 80));
    assert_eq!(e.selecting(&key("a/web"), Direction::Ingress).count(), 0);
    assert_eq!(e.selecting(&key("a/web"), Direction::Egress).count(), 1);
}

// ----------------------------------------------------------------------------------------------
// Peers
// ----------------------------------------------------------------------------------------------

#[test]
fn pod_selector_alone_means_the_policys_own_namespace() {
    let mut e = cluster();
    apply(
        &mut e,
        "a/p",
        json!({
            "podSelector": {"matchLabels": {"app": "db"}},
            "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "web"}}}]}]
        }),
    );
    assert!(allowed(&e, "a/web", "a/db", 8080));
    assert!(
        !allowed(&e, "b/web", "a/db", 8080),
        "b/web has app=web but lives in b"
    );
}

#[test]
fn namespace_selector_alone_means_all_pods_of_matching_namespaces() {
    let mut e = cluster();
    apply(
        &mut e,
        "a/p",
        json!({
            "podSelector": {},
            "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"team": "y"}}}]}]
        }),
    );
    assert!(allowed(&e, "b/web", "a/db", 8080));
    assert!(allowed(&e, "b/client", "a/db", 8080));
    assert!(
        !allowed(&e, "a/web", "a/db", 8080),
        "namespace a has team=x"
    );
}

#[test]
fn both_selectors_in_one_peer_are_anded_separate_peers_are_ored() {
    let mut e = cluster();
    apply(
        &mut e,
        "a/and",
        json!({
            "podSelector": {"matchLabels": {"app": "db"}},
            "ingress": [{"from": [{
                "namespaceSelector": {"matchLabels": {"team": "y"}},
                "podSelector": {"matchLabels": {"app": "client"}}
            }]}]
        }),
    );
    assert!(allowed(&e, "b/client", "a/db", 8080));
    assert!(!allowed(&e, "b/web", "a/db", 8080));
    assert!(!allowed(&e, "a/web", "a/db", 8080));

    let mut e = cluster();
    apply(
        &mut e,
        "a/or",
        json!({
            "podSelector": {"matchLabels": {"app": "db"}},
            "ingress": [{"from": [
                {"namespaceSelector": {"matchLabels": {"team": "y"}}},
                {"podSelector": {"matchLabels": {"app": "client"}}}
            ]}]
        }),
    );
    assert!(allowed(&e, "b/client", "a/db", 8080));
    assert!(allowed(&e, "b/web", "a/db", 8080), "any pod of b");
    assert!(
        !allowed(&e, "a/web", "a/db", 8080),
        "a/web is neither in b nor app=client"
    );
}

#[test]
fn empty_selectors_match_everything_in_their_scope() {
    let mut e = cluster();
    apply(
        &mut e,
        "a/own-ns",
        json!({
            "podSelector": {"matchLabels": {"app": "db"}},
            "ingress": [{"from": [{"podSelector": {}}]}]
        }),
    );
    assert!(allowed(&e, "a/web", "a/db", 8080));
    assert!(!allowed(&e, "b/web", "a/db", 8080));

    let mut e = cluster();
    apply(
        &mut e,
        "a/all-ns",
        json!({
            "podSelector": {"matchLabels": {"app": "db"}},
            "ingress": [{"from": [{"namespaceSelector": {}}]}]
        }),
    );
    assert!(allowed(&e, "a/web", "a/db", 8080));
    assert!(allowed(&e, "b/web", "a/db", 8080));
    assert!(
        !allowed_from_ip(&e, "10.0.2.1", "a/db", 8080),
        "an IP-only source is no pod"
    );
}

#[test]
fn match_expressions_in_not_in_exists_does_not_exist() {
    let mut e = cluster();
    e.apply_pod(&pod(
        "a/canary",
        json!({"app": "web", "track": "canary"}),
        "10.0.1.9",
        &[],
    ))
    .unwrap();
    let target = |e: &mut Engine, exprs: Value| {
        apply(
            e,
            "a/p",
            json!({
                "podSelector": {"matchLabels": {"app": "db"}},
                "ingress": [{"from": [{"podSelector": {"matchExpressions": exprs}}]}]
            }),
        );
    };
    target(
        &mut e,
        json!([{"key": "app", "operator": "In", "values": ["web", "api"]}]),
    );
    assert!(allowed(&e, "a/web", "a/db", 8080));
    assert!(allowed(&e, "a/canary", "a/db", 8080));

    target(
        &mut e,
        json!([{"key": "track", "operator": "NotIn", "values": ["canary"]}]),
    );
    assert!(
        allowed(&e, "a/web", "a/db", 8080),
        "NotIn matches a pod without the key"
    );
    assert!(!allowed(&e, "a/canary", "a/db", 8080));

    target(&mut e, json!([{"key": "track", "operator": "Exists"}]));
    assert!(!allowed(&e, "a/web", "a/db", 8080));
    assert!(allowed(&e, "a/canary", "a/db", 8080));

    target(
        &mut e,
        json!([{"key": "track", "operator": "DoesNotExist"}]),
    );
    assert!(allowed(&e, "a/web", "a/db", 8080));
    assert!(!allowed(&e, "a/canary", "a/db", 8080));
}

#[test]
fn namespaces_carry_their_metadata_name_label() {
    let mut e = cluster();
    // Namespace "c" has no Namespace object: its pods still carry kubernetes.io/metadata.name.
    e.apply_pod(&pod("c/tool", json!({}), "10.0.3.1", &[]))
        .unwrap();
    apply(
        &mut e,
        "a/p",
        json!({
            "podSelector": {},
            "ingress": [{"from": [{"namespaceSelector": {"matchExpressions": [
                {"key": "kubernetes.io/metadata.name", "operator": "In", "values": ["b", "c"]}
            ]}}]}]
        }),
    );
    assert!(allowed(&e, "b/client", "a/web", 80));
    assert!(allowed(&e, "c/tool", "a/web", 80));
    assert!(!allowed(&e, "a/db", "a/web", 80));
    assert_eq!(
        e.namespace_labels("b")
            .unwrap()
            .get("kubernetes.io/metadata.name")
            .map(String::as_str),
        Some("b")
    );
}

#[test]
fn namespace_label_change_applies_without_reindexing() {
    let mut e = cluster();
    apply(
        &mut e,
        "a/p",
        json!({
            "podSelector": {},
            "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"trusted": "yes"}}}]}]
        }),
    );
    assert!(!allowed(&e, "b/client", "a/web", 80));
    e.apply_namespace(&namespace("b", json!({"team": "y", "trusted": "yes"})))
        .unwrap();
    assert!(allowed(&e, "b/client", "a/web", 80));
    e.remove_namespace("b");
    assert!(!allowed(&e, "b/client", "a/web", 80));
}

// ----------------------------------------------------------------------------------------------
// ipBlock
// ----------------------------------------------------------------------------------------------

#[test]
fn ip_block_matches_pods_by_ip_with_except_holes() {
    let mut e = cluster();
    apply(
        &mut e,
        "a/p",
        json!({
            "podSelector": {"matchLabels": {"app": "db"}},
            "ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0.0/16", "except": ["10.0.2.0/24"]}}]}]
        }),
    );
    assert!(
        allowed(&e, "a/web", "a/db", 8080),
        "pod IP 10.0.1.1 is in the block"
    );
    assert!(
        !allowed(&e, "b/web", "a/db", 8080),
        "pod IP 10.0.2.1 is in the except hole"
    );
    assert!(allowed_from_ip(&e, "10.0.9.9", "a/db", 8080));
    assert!(!allowed_from_ip(&e, "10.0.2.200", "a/db", 8080));
    assert!(!allowed_from_ip(&e, "10.1.0.1", "a/db", 8080));
}

#[test]
fn an_except_hole_can_be_reopened_by_another_rule_or_policy() {
    let block = json!({"ipBlock": {"cidr": "10.0.0.0/16", "except": ["10.0.2.0/24"]}});
    let mut e = cluster();
    apply(
        &mut e,
        "a/p",
        json!({
            "podSelector": {},
            "ingress": [{"from": [block]}, {"from": [{"ipBlock": {"cidr": "10.0.2.2/32"}}]}]
        }),
    );
    assert!(
        allowed(&e, "b/client", "a/db", 8080),
        "rule 1 re-opens 10.0.2.2"
    );
    assert!(!allowed(&e, "b/web", "a/db", 8080));

    let mut e = cluster();
    apply(
        &mut e,
        "a/p",
        json!({"podSelector": {}, "ingress": [{"from": [block]}]}),
    );
    assert!(!allowed(&e, "b/client", "a/db", 8080));
    apply(
        &mut e,
        "a/q",
        json!({
            "podSelector": {},
            "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "client"}}, "namespaceSelector": {}}]}]
        }),
    );
    assert!(
        allowed(&e, "b/client", "a/db", 8080),
        "policy a/q re-opens b/client"
    );
}

#[test]
fn selectors_never_match_ip_only_endpoints() {
    let mut e = cluster();
    apply(
        &mut e,
        "a/p",
        json!({
            "podSelector": {},
            "ingress": [{"from": [{"namespaceSelector": {}, "podSelector": {}}]}]
        }),
    );
    // The IP of b/client, but presented without identity.
    assert!(!allowed_from_ip(&e, "10.0.2.2", "a/web", 80));
    assert!(allowed(&e, "b/client", "a/web", 80));
}

#[test]
fn a_pod_without_ip_matches_no_ip_block() {
    let mut e = cluster();
    let mut p = pod("b/pending", json!({"app": "client"}), "10.0.2.3", &[]);
    p.status = None;
    e.apply_pod(&p).unwrap();
    apply(
        &mut e,
        "a/p",
        json!({
            "podSelector": {},
            "ingress": [{"from": [{"ipBlock": {"cidr": "0.0.0.0/0"}}]}]
        }),
    );
    assert!(allowed(&e, "b/client", "a/web", 80));
    assert!(!allowed(&e, "b/pending", "a/web", 80));
}

#[test]
fn ipv6_blocks_match_only_ipv6_addresses() {
    let mut e = cluster();
    e.apply_pod(&pod("b/v6", json!({}), "fd00::2:5", &[]))
        .unwrap();
    apply(
        &mut e,
        "a/p",
        json!({
            "podSelector": {},
            "ingress": [{"from": [{"ipBlock": {"cidr": "fd00::/64", "except": ["fd00::2:0/112"]}}]}]
        }),
    );
    assert!(allowed_from_ip(&e, "fd00::1", "a/web", 80));
    assert!(!allowed_from_ip(&e, "fd00::2:1", "a/web", 80));
    assert!(!allowed_from_ip(&e, "10.0.0.1", "a/web", 80));
    assert!(!allowed(&e, "b/v6", "a/web", 80));
}

// ----------------------------------------------------------------------------------------------
// Ports and protocols
// ----------------------------------------------------------------------------------------------

#[test]
fn protocol_only_port_entry_allows_every_port_of_that_protocol() {
    let mut e = cluster();
    apply(
        &mut e,
        "a/p",
        json!({"podSelector": {}, "ingress": [{"ports": [{"protocol": "UDP"}]}]}),
    );
    assert!(verdict(&e, "b/client", "a/web", 53, Protocol::Udp).allowed);
    assert!(verdict(&e, "b/client", "a/web", 9999, Protocol::Udp).allowed);
    assert!(!verdict(&e, "b/client", "a/web", 53, Protocol::Tcp).allowed);
}

#[test]
fn end_port_is_inclusive() {
    let mut e = cluster();
    apply(
        &mut e,
        "a/p",
        json!({"podSelector": {}, "ingress": [{"ports": [{"port": 8000, "endPort": 8080}]}]}),
    );
    assert!(!allowed(&e, "b/client", "a/db", 7999));
    assert!(allowed(&e, "b/client", "a/db", 8000));
    assert!(allowed(&e, "b/client", "a/db", 8080));
    assert!(!allowed(&e, "b/client", "a/db", 8081));
}

#[test]
fn tcp_udp_and_sctp_are_distinct() {
    let mut e = cluster();
    apply(
        &mut e,
        "a/p",
        json!({"podSelector": {}, "ingress": [{"ports": [{"port": 80}, {"port": 5000, "protocol": "SCTP"}]}]}),
    );
    assert!(
        verdict(&e, "b/client", "a/web", 80, Protocol::Tcp).allowed,
        "protocol defaults to TCP"
    );
    assert!(!verdict(&e, "b/client", "a/web", 80, Protocol::Udp).allowed);
    assert!(!verdict(&e, "b/client", "a/web", 80, Protocol::Sctp).allowed);
    assert!(verdict(&e, "b/client", "a/web", 5000, Protocol::Sctp).allowed);
    assert!(!verdict(&e, "b/client", "a/web", 5000, Protocol::Tcp).allowed);
}

#[test]
fn named_ingress_port_resolves_on_each_destination_pod() {
    let mut e = cluster();
    // "http" is 80 on a/web and 8080 on a/db.
    apply(
        &mut e,
        "a/p",
        json!({"podSelector": {}, "ingress": [{"ports": [{"port": "http"}]}]}),
    );
    assert!(allowed(&e, "b/client", "a/web", 80));
    assert!(!allowed(&e, "b/client", "a/web", 8080));
    assert!(allowed(&e, "b/client", "a/db", 8080));
    assert!(!allowed(&e, "b/client", "a/db", 80));
    // The name resolves with its protocol: http is TCP.
    assert!(!verdict(&e, "b/client", "a/web", 80, Protocol::Udp).allowed);
}

#[test]
fn named_egress_port_resolves_on_the_destination_and_never_on_an_ip() {
    let mut e = cluster();
    e.apply_pod(&{
        let mut p = pod(
            "b/node-agent",
            json!({}),
            "192.168.0.10",
            &[("http", 80, "TCP")],
        );
        p.spec.as_mut().unwrap().host_network = Some(true);
        p
    })
    .unwrap();
    apply(
        &mut e,
        "b/p",
        json!({
            "podSelector": {"matchLabels": {"app": "client"}},
            "egress": [{"ports": [{"port": "http"}]}]
        }),
    );
    assert!(allowed(&e, "b/client", "a/web", 80));
    assert!(allowed(&e, "b/client", "a/db", 8080));
    assert!(!allowed(&e, "b/client", "a/db", 80));
    assert!(
        !allowed(&e, "b/client", "b/node-agent", 80),
        "a host-network pod is IP-only"
    );

    // Through the engine directly: the name comes from the handshake.
    let peer = Peer::Workload(e.identity(&key("a/db")).unwrap());
    let mut conn = Connection {
        local: &key("b/client"),
        direction: Direction::Egress,
        peer: &peer,
        peer_ip: Some("10.0.1.2".parse().unwrap()),
        port: 8080,
        protocol: Protocol::Tcp,
        dest_port_name: Some("http"),
        resolved_names: &[],
    };
    assert!(e.decide(&conn).allowed);
    conn.dest_port_name = None;
    assert!(!e.decide(&conn).allowed);
    conn.dest_port_name = Some("http");
    conn.protocol = Protocol::Udp;
    assert!(!e.decide(&conn).allowed);
}

// ----------------------------------------------------------------------------------------------
// Targets
// ----------------------------------------------------------------------------------------------

#[test]
fn host_network_pods_are_never_targets_and_are_ip_only_sources() {
    let mut e = cluster();
    let mut p = pod(
        "a/agent",
        json!({"app": "web"}),
        "192.168.0.5",
        &[("http", 80, "TCP")],
    );
    p.spec.as_mut().unwrap().host_network = Some(true);
    e.apply_pod(&p).unwrap();
    deny_all_ingress(&mut e, "a/deny");
    apply(
        &mut e,
        "a/deny-egress",
        json!({"podSelector": {}, "policyTypes": ["Egress"]}),
    );
    let v = verdict(&e, "b/client", "a/agent", 80, Protocol::Tcp);
    assert!(v.allowed);
    assert_eq!(v.ingress.reason, Reason::HostNetwork);
    // As a source: no egress check, and only ipBlocks match it.
    let mut e = cluster();
    e.apply_pod(&p).unwrap();
    apply(
        &mut e,
        "b/p",
        json!({
            "podSelector": {},
            "ingress": [{"from": [{"namespaceSelector": {}}]}, {"from": [{"ipBlock": {"cidr": "192.168.0.0/24"}}], "ports": [{"port": 80}]}]
        }),
    );
    let v = verdict(&e, "a/agent", "b/web", 80, Protocol::Tcp);
    assert!(v.egress.is_none());
    assert!(v.allowed);
    assert_eq!(
        v.ingress.reason,
        Reason::AllowedBy(RuleRef {
            policy: pkey("b/p"),
            direction: Direction::Ingress,
            index: 1
        })
    );
    assert!(
        !allowed(&e, "a/agent", "b/web", 81),
        "namespaceSelector does not match it"
    );
}

#[test]
fn a_policy_selects_pods_of_its_own_namespace_only() {
    let mut e = cluster();
    deny_all_ingress(&mut e, "a/deny");
    assert!(!allowed(&e, "b/client", "a/web", 80));
    assert!(
        allowed(&e, "a/web", "b/web", 80),
        "b/web is not selected by a/deny"
    );
    assert_eq!(e.selecting(&key("b/web"), Direction::Ingress).count(), 0);
}

#[test]
fn a_pod_selected_by_nothing_is_reachable() {
    let mut e = cluster();
    apply(
        &mut e,
        "a/p",
        json!({"podSelector": {"matchLabels": {"app": "db"}}}),
    );
    let v = verdict(&e, "b/client", "a/web", 80, Protocol::Tcp);
    assert!(v.allowed);
    assert_eq!(v.ingress.reason, Reason::NotIsolated);
    assert_eq!(v.egress.unwrap().reason, Reason::NotIsolated);
}

// ----------------------------------------------------------------------------------------------
// Reasons
// ----------------------------------------------------------------------------------------------

#[test]
fn allowed_by_names_the_first_rule_in_policy_key_order() {
    let mut e = cluster();
    apply(&mut e, "a/zz", json!({"podSelector": {}, "ingress": [{}]}));
    apply(
        &mut e,
        "a/mm",
        json!({"podSelector": {}, "ingress": [{"ports": [{"port": 1}]}, {"ports": [{"port": 80}]}, {}]}),
    );
    let v = verdict(&e, "b/client", "a/web", 80, Protocol::Tcp);
    assert_eq!(
        v.ingress.reason,
        Reason::AllowedBy(RuleRef {
            policy: pkey("a/mm"),
            direction: Direction::Ingress,
            index: 1
        })
    );
    assert_eq!(v.ingress.to_string(), "allowed by a/mm ingress rule 1");
}

#[test]
fn isolated_lists_the_isolating_policies_in_key_order() {
    let mut e = cluster();
    apply(
        &mut e,
        "a/db",
        json!({"podSelector": {}, "ingress": [{"ports": [{"port": 5432}]}]}),
    );
    deny_all_ingress(&mut e, "a/default-deny");
    apply(
        &mut e,
        "a/egress-only",
        json!({"podSelector": {}, "policyTypes": ["Egress"], "egress": [{}]}),
    );
    let v = verdict(&e, "b/client", "a/web", 80, Protocol::Tcp);
    assert_eq!(
        v.ingress.reason,
        Reason::Isolated(vec![pkey("a/db"), pkey("a/default-deny")])
    );
    assert_eq!(
        v.to_string(),
        "denied: isolated for ingress by a/db, a/default-deny (no rule matches)"
    );
    assert_eq!(
        v.ingress.to_string(),
        "denied: isolated by a/db, a/default-deny (no rule matches)"
    );
}

#[test]
fn verdicts_explain_both_sides_in_words() {
    let mut e = cluster();
    apply(
        &mut e,
        "a/web",
        json!({"podSelector": {"matchLabels": {"app": "web"}}, "ingress": [{"ports": [{"port": 80}]}]}),
    );
    let v = verdict(&e, "b/client", "a/web", 80, Protocol::Tcp);
    assert_eq!(
        v.to_string(),
        "allowed: egress not isolated (no policy selects it); ingress allowed by a/web ingress rule 0"
    );
    assert!(
        v.detailed()
            .starts_with("allowed: egress: allowed: not isolated")
    );
    let ip = matrix::evaluate(
        &e,
        &Source::Ip("192.0.2.1".parse().unwrap()),
        &key("a/web"),
        probe(80, Protocol::Tcp),
    )
    .unwrap();
    assert_eq!(
        ip.to_string(),
        "allowed: ingress allowed by a/web ingress rule 0"
    );
}

#[test]
fn an_unknown_local_workload_is_denied_with_its_reason() {
    let e = cluster();
    let peer = Peer::IpOnly;
    let who = key("a/ghost");
    let d = e.decide(&Connection {
        local: &who,
        direction: Direction::Ingress,
        peer: &peer,
        peer_ip: None,
        port: 80,
        protocol: Protocol::Tcp,
        dest_port_name: None,
        resolved_names: &[],
    });
    assert!(!d.allowed);
    assert_eq!(d.reason, Reason::UnknownWorkload(who));
    assert!(
        matrix::evaluate(
            &e,
            &Source::Pod(key("a/web")),
            &key("a/ghost"),
            probe(80, Protocol::Tcp)
        )
        .is_none()
    );
}

#[test]
fn a_verified_identity_decides_without_the_engine_knowing_the_peer() {
    let mut e = cluster();
    apply(
        &mut e,
        "a/p",
        json!({
            "podSelector": {},
            "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"env": "prod"}}, "podSelector": {"matchLabels": {"role": "api"}}}]}]
        }),
    );
    let id = WorkloadIdentity {
        namespace: "remote".into(),
        namespace_labels: [("env".to_string(), "prod".to_string())].into(),
        labels: [("role".to_string(), "api".to_string())].into(),
    };
    let peer = Peer::Workload(id);
    let local = key("a/web");
    let conn = Connection {
        local: &local,
        direction: Direction::Ingress,
        peer: &peer,
        peer_ip: None,
        port: 80,
        protocol: Protocol::Tcp,
        dest_port_name: None,
        resolved_names: &[],
    };
    assert!(e.decide(&conn).allowed);
    assert!(e.allows(&conn));
    assert!(e.decide_ref(&conn).allowed);
}

// ----------------------------------------------------------------------------------------------
// Updates
// ----------------------------------------------------------------------------------------------

#[test]
fn a_pod_label_change_moves_it_in_and_out_of_policies() {
    let mut e = cluster();
    apply(
        &mut e,
        "a/p",
        json!({"podSelector": {"matchLabels": {"locked": "true"}}}),
    );
    assert!(allowed(&e, "b/client", "a/web", 80));
    e.apply_pod(&pod(
        "a/web",
        json!({"app": "web", "locked": "true"}),
        "10.0.1.1",
        &[("http", 80, "TCP")],
    ))
    .unwrap();
    assert!(!allowed(&e, "b/client", "a/web", 80));
    e.apply_pod(&pod(
        "a/web",
        json!({"app": "web"}),
        "10.0.1.1",
        &[("http", 80, "TCP")],
    ))
    .unwrap();
    assert!(allowed(&e, "b/client", "a/web", 80));
}

#[test]
fn replacing_and_removing_a_policy_updates_decisions() {
    let mut e = cluster();
    deny_all_ingress(&mut e, "a/p");
    assert!(!allowed(&e, "b/client", "a/web", 80));
    apply(
        &mut e,
        "a/p",
        json!({"podSelector": {"matchLabels": {"app": "db"}}}),
    );
    assert!(allowed(&e, "b/client", "a/web", 80));
    assert!(!allowed(&e, "b/client", "a/db", 8080));
    e.remove_policy(&pkey("a/p"));
    assert!(allowed(&e, "b/client", "a/db", 8080));
    assert_eq!(e.policy_count(), 0);
    // A pod created after the policy is selected too.
    deny_all_ingress(&mut e, "a/p");
    e.apply_pod(&pod("a/late", json!({}), "10.0.1.7", &[]))
        .unwrap();
    assert!(!allowed(&e, "b/client", "a/late", 80));
    e.remove_workload(&key("a/late"));
    assert!(e.workload(&key("a/late")).is_none());
}

// ----------------------------------------------------------------------------------------------
// Validation
// ----------------------------------------------------------------------------------------------

fn rejected(spec: Value) -> policy::PolicyError {
    let mut e = Engine::new();
    e.apply_policy(&netpol("demo/bad", spec))
        .expect_err("must be rejected")
}

#[test]
fn invalid_policies_are_rejected_naming_object_and_field() {
    let cases = [
        (
            json!({"ingress": [{"ports": [{"port": 80, "protocol": "ICMP"}]}]}),
            "spec.ingress[0].ports[0].protocol",
        ),
        (
            json!({"ingress": [{"ports": [{"port": 0}]}]}),
            "spec.ingress[0].ports[0].port",
        ),
        (
            json!({"ingress": [{"ports": [{"port": 65536}]}]}),
            "spec.ingress[0].ports[0].port",
        ),
        (
            json!({"ingress": [{"ports": [{}, {"port": 90, "endPort": 80}]}]}),
            "spec.ingress[0].ports[1].endPort",
        ),
        (
            json!({"ingress": [{"ports": [{"port": "http", "endPort": 80}]}]}),
            "spec.ingress[0].ports[0].endPort",
        ),
        (
            json!({"ingress": [{"ports": [{"endPort": 80}]}]}),
            "spec.ingress[0].ports[0].endPort",
        ),
        (
            json!({"ingress": [{"ports": [{"port": "Http"}]}]}),
            "spec.ingress[0].ports[0].port",
        ),
        (
            json!({"ingress": [{"ports": [{"port": "80"}]}]}),
            "spec.ingress[0].ports[0].port",
        ),
        (
            json!({"ingress": [{"ports": [{"port": "a--b"}]}]}),
            "spec.ingress[0].ports[0].port",
        ),
        (
            json!({"ingress": [{"ports": [{"port": "sixteen-chars-xx"}]}]}),
            "spec.ingress[0].ports[0].port",
        ),
        (
            json!({"egress": [{"to": [{"ipBlock": {"cidr": "10.0.0.0/33"}}]}]}),
            "spec.egress[0].to[0].ipBlock.cidr",
        ),
        (
            json!({"egress": [{"to": [{"ipBlock": {"cidr": ""}}]}]}),
            "spec.egress[0].to[0].ipBlock.cidr",
        ),
        (
            json!({"egress": [{"to": [{"ipBlock": {"cidr": "10.0.0.0/16", "except": ["10.1.0.0/24"]}}]}]}),
            "spec.egress[0].to[0].ipBlock.except[0]",
        ),
        (
            json!({"egress": [{"to": [{"ipBlock": {"cidr": "10.0.0.0/16", "except": ["10.0.0.0/16"]}}]}]}),
            "spec.egress[0].to[0].ipBlock.except[0]",
        ),
        (
            json!({"egress": [{"to": [{"ipBlock": {"cidr": "10.0.0.0/16", "except": ["fd00::/120"]}}]}]}),
            "spec.egress[0].to[0].ipBlock.except[0]",
        ),
        (
            json!({"egress": [{"to": [{"ipBlock": {"cidr": "10.0.0.0/8"}, "podSelector": {}}]}]}),
            "spec.egress[0].to[0]",
        ),
        (
            json!({"ingress": [{"from": [{}]}]}),
            "spec.ingress[0].from[0]",
        ),
        (
            json!({"ingress": [{"from": [{"podSelector": {"matchExpressions": [{"key": "a", "operator": "In", "values": []}]}}]}]}),
            "spec.ingress[0].from[0].podSelector.matchExpressions[0].values",
        ),
        (
            json!({"ingress": [{"from": [{"namespaceSelector": {"matchExpressions": [{"key": "a", "operator": "DoesNotExist", "values": ["x"]}]}}]}]}),
            "spec.ingress[0].from[0].namespaceSelector.matchExpressions[0].values",
        ),
        (
            json!({"podSelector": {"matchLabels": {"bad key": "x"}}}),
            "spec.podSelector.matchLabels[bad key]",
        ),
        (
            json!({"policyTypes": ["Ingress", "Ingress"]}),
            "spec.policyTypes[1]",
        ),
        (
            json!({"egress": [{"to": [{"ipBlock": {"cidr": "10.0.0.1"}}]}]}),
            "spec.egress[0].to[0].ipBlock.cidr",
        ),
        (json!({"policyTypes": ["ingress"]}), "spec.policyTypes[0]"),
    ];
    for (spec, field) in cases {
        let err = rejected(spec.clone());
        assert_eq!(err.kind, "NetworkPolicy", "{spec}");
        assert_eq!(err.object, "demo/bad", "{spec}");
        assert_eq!(err.field, field, "{spec}: {err}");
        assert!(
            err.to_string()
                .starts_with(&format!("NetworkPolicy demo/bad: {field}: ")),
            "{err}"
        );
    }
}

#[test]
fn a_host_address_cidr_is_accepted_and_normalized() {
    let mut e = cluster();
    apply(
        &mut e,
        "a/p",
        json!({
            "podSelector": {},
            "ingress": [{"from": [{"ipBlock": {"cidr": "10.0.2.7/24", "except": ["10.0.2.2/32"]}}]}]
        }),
    );
    assert!(
        allowed(&e, "b/web", "a/web", 80),
        "10.0.2.1 is in 10.0.2.0/24"
    );
    assert!(
        !allowed(&e, "b/client", "a/web", 80),
        "10.0.2.2 is excepted"
    );
}

#[test]
fn an_invalid_update_keeps_the_previous_version_in_force() {
    let mut e = cluster();
    apply(
        &mut e,
        "a/p",
        json!({"podSelector": {}, "ingress": [{"ports": [{"port": 80}]}]}),
    );
    let bad = netpol(
        "a/p",
        json!({"podSelector": {}, "ingress": [{"ports": [{"port": 80, "endPort": 79}]}]}),
    );
    let err = e.apply_policy(&bad).unwrap_err();
    assert_eq!(err.field, "spec.ingress[0].ports[0].endPort");
    assert!(allowed(&e, "b/client", "a/web", 80));
    assert!(!allowed(&e, "b/client", "a/web", 81));
}

#[test]
fn invalid_pods_and_namespaces_are_rejected_naming_the_field() {
    let mut e = Engine::new();
    let mut p = pod("a/x", json!({}), "10.0.0.1", &[("HTTP", 80, "TCP")]);
    let err = e.apply_pod(&p).unwrap_err();
    assert_eq!(
        (err.kind, err.object.as_str(), err.field.as_str()),
        ("Pod", "a/x", "spec.containers[0].ports[0].name")
    );
    p = pod("a/x", json!({}), "not-an-ip", &[]);
    let err = e.apply_pod(&p).unwrap_err();
    assert_eq!(err.field, "status.podIPs[0].ip");
    let err = e
        .apply_namespace(&namespace("Bad_Name", json!({})))
        .unwrap_err();
    assert_eq!(
        (err.kind, err.field.as_str()),
        ("Namespace", "metadata.name")
    );
    let err = e
        .apply_policy(
            &serde_json::from_value(json!({"metadata": {"namespace": "a"}, "spec": {}})).unwrap(),
        )
        .unwrap_err();
    assert_eq!(err.field, "metadata.name");
    let err = e
        .apply_policy(&netpol("a/Not_A_Name", json!({})))
        .unwrap_err();
    assert_eq!(
        (err.object.as_str(), err.field.as_str()),
        ("a/Not_A_Name", "metadata.name")
    );
    assert!(e.workloads().next().is_none());
}

// ----------------------------------------------------------------------------------------------
// Matrix and table
// ----------------------------------------------------------------------------------------------

#[test]
fn matrix_renders_one_truth_table_per_probe() {
    let mut e = cluster();
    apply(
        &mut e,
        "a/p",
        json!({
            "podSelector": {"matchLabels": {"app": "db"}},
            "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "web"}}}]}]
        }),
    );
    let from_ip: IpAddr = "192.0.2.1".parse().unwrap();
    let cells = matrix::matrix(&e, &[probe(80, Protocol::Tcp)], &[from_ip]);
    // 4 pods * 3 other pods + 1 IP * 4 pods.
    assert_eq!(cells.len(), 16);
    let m = Matrix::new(&e, &[probe(80, Protocol::Tcp)], &[from_ip]);
    assert_eq!(m.len(), 16);
    // Pods numbered in key order; a column is headed by its pod's number.
    assert_eq!(
        matrix::render_table(&m),
        "probe 80/TCP\n\
         \x20            1 2 3 4\n\
         1 a/db       - . . .\n\
         2 a/web      . - . .\n\
         3 b/client   X . - .\n\
         4 b/web      X . . -\n\
         \x20 192.0.2.1  X . . .\n"
    );
}

#[test]
fn matrix_without_probes_uses_each_destinations_ports() {
    let e = cluster();
    let cells = matrix::matrix(&e, &[], &[]);
    assert!(
        cells
            .iter()
            .all(|c| c.probe.port == 80 || c.probe.port == 8080)
    );
    assert!(
        cells
            .iter()
            .filter(|c| c.probe.port == 8080)
            .all(|c| c.to == key("a/db"))
    );
    // Each block has a column only for the pods that declare its port (b/client declares
    // none, only a/db declares 8080); the numbers stay those of the rows.
    let table = matrix::render_table(&Matrix::new(&e, &[], &[]));
    assert_eq!(
        table,
        "probe 80/TCP\n\
         \x20           2 4\n\
         1 a/db      . .\n\
         2 a/web     - .\n\
         3 b/client  . .\n\
         4 b/web     . -\n\
         \n\
         probe 8080/TCP\n\
         \x20           1\n\
         1 a/db      -\n\
         2 a/web     .\n\
         3 b/client  .\n\
         4 b/web     .\n"
    );
}

#[test]
fn matrix_table_at_thirty_pods_fits_a_terminal() {
    let mut e = Engine::new();
    for i in 0..30 {
        e.apply_pod(&pod(
            &format!("demo/frontend-7d9f8b6c5d-x{i:02}4k"),
            json!({"app": "web"}),
            &format!("10.0.0.{}", i + 1),
            &[("http", 80, "TCP")],
        ))
        .unwrap();
    }
    e.apply_pod(&pod(
        "a-rather-long-namespace/a-statefulset-with-a-very-long-name-0",
        json!({"app": "web"}),
        "10.0.1.1",
        &[("http", 80, "TCP")],
    ))
    .unwrap();
    let table = matrix::render_table(&Matrix::new(&e, &[probe(80, Protocol::Tcp)], &[]));
    let lines: Vec<&str> = table.lines().collect();
    // Title, two header lines (numbers up to 31, written vertically), 31 rows.
    assert_eq!(lines.len(), 1 + 2 + 31, "{table}");
    assert!(
        lines.iter().all(|l| l.chars().count() <= 110),
        "too wide:\n{table}"
    );
    let row: Vec<char> = lines[3].chars().collect();
    let first_mark = row.windows(2).position(|w| w == [' ', '-']).unwrap() + 1;
    assert_eq!(
        lines[1].chars().nth(first_mark + 2 * 9),
        Some('1'),
        "{table}"
    );
    assert_eq!(
        lines[2].chars().nth(first_mark + 2 * 9),
        Some('0'),
        "{table}"
    );
    assert_eq!(lines[2].chars().nth(first_mark), Some('1'), "{table}");
    // A long name keeps its start and its end around an ellipsis.
    assert!(
        lines[3].starts_with(" 1 a-rather-long-namespace/a…ry-long-name-0  - . ."),
        "{table}"
    );
    assert!(lines[4].starts_with(" 2 demo/frontend-7d9f8b6c5d-x004k"));
    for line in &lines[3..] {
        let marks: Vec<&str> = line.split_whitespace().skip(2).collect();
        assert_eq!(marks.len(), 31, "{line}");
        assert_eq!(marks.iter().filter(|m| **m == "-").count(), 1, "{line}");
    }
}

#[test]
fn streamed_cells_are_the_cells_evaluated_one_by_one() {
    let mut e = cluster();
    apply(
        &mut e,
        "a/p",
        json!({
            "podSelector": {"matchLabels": {"app": "db"}},
            "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "web"}}}]}],
            "egress": [{"to": [{"ipBlock": {"cidr": "10.0.2.0/24"}}]}]
        }),
    );
    let from_ip: IpAddr = "10.0.1.1".parse().unwrap();
    let probes = [probe(80, Protocol::Tcp), probe(8080, Protocol::Tcp)];
    let m = Matrix::new(&e, &probes, &[from_ip]);
    let mut count = 0;
    for cell in m.cells() {
        let alone = matrix::evaluate(&e, cell.from, cell.to, cell.probe).unwrap();
        assert_eq!(
            cell.verdict.to_verdict(),
            alone,
            "{} -> {}",
            cell.from,
            cell.to
        );
        assert_eq!(cell.verdict.to_string(), alone.to_string());
        assert_eq!(cell.verdict.detailed().to_string(), alone.detailed());
        assert_eq!(m.sources()[cell.row], *cell.from);
        assert_eq!(m.destinations().nth(cell.column), Some(cell.to));
        count += 1;
    }
    assert_eq!(count, m.len());
    assert_eq!(count, 2 * (4 * 3 + 4));
}

#[test]
fn a_decision_names_its_direction_when_asked() {
    let mut e = cluster();
    apply(
        &mut e,
        "a/deny",
        json!({"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}),
    );
    let v = verdict(&e, "a/web", "a/db", 8080, Protocol::Tcp);
    let egress = v.egress.unwrap();
    assert_eq!(
        egress.in_direction(Direction::Egress).to_string(),
        "denied: isolated for egress by a/deny (no rule matches)"
    );
    assert_eq!(
        v.ingress.in_direction(Direction::Ingress).to_string(),
        "denied: isolated for ingress by a/deny (no rule matches)"
    );
    let open = verdict(&e, "b/client", "b/web", 80, Protocol::Tcp);
    assert_eq!(
        open.ingress.in_direction(Direction::Ingress).to_string(),
        "allowed: not isolated for ingress (no policy selects it)"
    );
}

#[test]
fn probes_parse_from_the_command_line_form() {
    assert_eq!("80/TCP".parse::<Probe>().unwrap(), probe(80, Protocol::Tcp));
    assert_eq!("53/udp".parse::<Probe>().unwrap(), probe(53, Protocol::Udp));
    assert_eq!("9000".parse::<Probe>().unwrap(), probe(9000, Protocol::Tcp));
    assert!("0/TCP".parse::<Probe>().is_err());
    assert!("80/ICMP".parse::<Probe>().is_err());
    assert_eq!(probe(132, Protocol::Sctp).to_string(), "132/SCTP");
}

#[test]
fn dual_stack_pods_connect_over_a_family_both_ends_have() {
    let mut e = cluster();
    let mut ds = pod("b/dual", json!({}), "10.0.2.50", &[]);
    ds.status = Some(
        serde_json::from_value(
            json!({"podIP": "10.0.2.50", "podIPs": [{"ip": "10.0.2.50"}, {"ip": "fd00::2:50"}]}),
        )
        .unwrap(),
    );
    e.apply_pod(&ds).unwrap();
    e.apply_pod(&pod("a/v6", json!({}), "fd00::1:1", &[]))
        .unwrap();
    apply(
        &mut e,
        "a/p",
        json!({
            "podSelector": {},
            "ingress": [{"from": [{"ipBlock": {"cidr": "fd00::/48"}}]}]
        }),
    );
    assert_eq!(e.workload(&key("b/dual")).unwrap().ips.len(), 2);
    assert!(
        allowed(&e, "b/dual", "a/v6", 80),
        "IPv6 to an IPv6-only pod"
    );
    assert!(
        !allowed(&e, "b/dual", "a/web", 80),
        "IPv4 to an IPv4-only pod"
    );
}
