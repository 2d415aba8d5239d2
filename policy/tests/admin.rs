//! Cluster-wide admin policies (ClusterNetworkPolicy v1alpha2, AdminNetworkPolicy and
//! BaselineAdminNetworkPolicy v1alpha1): precedence against NetworkPolicy, ports, selectors,
//! fail-closed peers, validation by field, parsing. Connections are evaluated through
//! `matrix::evaluate` (egress of the source AND ingress of the destination) unless a test is
//! about one direction.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::IpAddr;

use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use policy::admin::{AdminNetworkPolicy, BaselineAdminNetworkPolicy, ClusterNetworkPolicy};
use policy::matrix::{self, Probe, Source, Verdict};
use policy::{
    AdminAction, AdminKind, AdminPolicyKey, Connection, Decision, Direction, Engine, Peer, PodKey,
    Protocol, Reason, Tier,
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

fn namespace(name: &str, labels: Value) -> Namespace {
    serde_json::from_value(json!({"metadata": {"name": name, "labels": labels}})).unwrap()
}

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

fn cnp(name: &str, spec: Value) -> ClusterNetworkPolicy {
    serde_json::from_value(json!({"metadata": {"name": name}, "spec": spec})).unwrap()
}

fn anp(name: &str, spec: Value) -> AdminNetworkPolicy {
    serde_json::from_value(json!({"metadata": {"name": name}, "spec": spec})).unwrap()
}

fn banp(name: &str, spec: Value) -> BaselineAdminNetworkPolicy {
    serde_json::from_value(json!({"metadata": {"name": name}, "spec": spec})).unwrap()
}

/// Namespaces `a` (team=x, env=prod) and `b` (team=y) with pods:
/// a/web (app=web, 10.0.1.1, http=80/TCP, dns=53/UDP), a/db (app=db, 10.0.1.2, pg=5432),
/// b/web (app=web, 10.0.2.1, http=8080), b/client (app=client, 10.0.2.2).
fn cluster() -> Engine {
    let mut e = Engine::new();
    e.apply_namespace(&namespace("a", json!({"team": "x", "env": "prod"})))
        .unwrap();
    e.apply_namespace(&namespace("b", json!({"team": "y"})))
        .unwrap();
    for p in [
        pod(
            "a/web",
            json!({"app": "web"}),
            "10.0.1.1",
            &[("http", 80, "TCP"), ("dns", 53, "UDP")],
        ),
        pod(
            "a/db",
            json!({"app": "db"}),
            "10.0.1.2",
            &[("pg", 5432, "TCP")],
        ),
        pod(
            "b/web",
            json!({"app": "web"}),
            "10.0.2.1",
            &[("http", 8080, "TCP")],
        ),
        pod("b/client", json!({"app": "client"}), "10.0.2.2", &[]),
    ] {
        e.apply_pod(&p).unwrap();
    }
    e
}

fn apply_cnp(e: &mut Engine, name: &str, spec: Value) {
    let applied = e.apply_cluster_network_policy(&cnp(name, spec)).unwrap();
    assert!(applied.warnings.is_empty(), "{:?}", applied.warnings);
}

fn apply_np(e: &mut Engine, id: &str, spec: Value) {
    e.apply_policy(&netpol(id, spec)).unwrap();
}

fn verdict(e: &Engine, from: &str, to: &str, port: u16, protocol: Protocol) -> Verdict {
    matrix::evaluate(
        e,
        &Source::Pod(key(from)),
        &key(to),
        Probe { port, protocol },
    )
    .unwrap()
}

fn allowed(e: &Engine, from: &str, to: &str, port: u16) -> bool {
    verdict(e, from, to, port, Protocol::Tcp).allowed
}

/// One direction, for a pod peer known to the engine.
fn decide(e: &Engine, local: &str, direction: Direction, peer: &str, port: u16) -> Decision {
    decide_proto(e, local, direction, peer, port, Protocol::Tcp)
}

fn decide_proto(
    e: &Engine,
    local: &str,
    direction: Direction,
    peer: &str,
    port: u16,
    protocol: Protocol,
) -> Decision {
    let peer_key = key(peer);
    let id = e.identity(&peer_key).unwrap();
    let peer_w = e.workload(&peer_key).unwrap();
    let ip = peer_w.ips.first().copied();
    let dest_port_name = match direction {
        Direction::Egress => peer_w
            .ports
            .iter()
            .find(|p| p.port == port && p.protocol == protocol)
            .and_then(|p| p.name.clone()),
        Direction::Ingress => None,
    };
    let local = key(local);
    let peer = Peer::Workload(id);
    let conn = Connection {
        local: &local,
        direction,
        peer: &peer,
        peer_ip: ip,
        port,
        protocol,
        dest_port_name: dest_port_name.as_deref(),
        resolved_names: &[],
    };
    let owned = e.decide(&conn);
    // The borrowed path says the same.
    let borrowed = e.decide_ref(&conn);
    assert_eq!(borrowed.allowed, owned.allowed);
    assert_eq!(borrowed.to_decision(), owned);
    owned
}

fn decide_ip(e: &Engine, local: &str, direction: Direction, ip: &str, port: u16) -> Decision {
    let local = key(local);
    let ip: IpAddr = ip.parse().unwrap();
    e.decide(&Connection {
        local: &local,
        direction,
        peer: &Peer::IpOnly,
        peer_ip: Some(ip),
        port,
        protocol: Protocol::Tcp,
        dest_port_name: None,
        resolved_names: &[],
    })
}

fn admin_reason(d: &Decision) -> &policy::AdminRuleRef {
    match &d.reason {
        Reason::Admin(r) => r,
        other => panic!("expected an admin reason, got {other:?}"),
    }
}

/// Subject: every pod of namespace `ns`.
fn ns_subject(ns: &str) -> Value {
    json!({"namespaces": {"matchLabels": {"kubernetes.io/metadata.name": ns}}})
}

fn all_namespaces() -> Value {
    json!({"namespaces": {}})
}

fn from_ns(ns: &str) -> Value {
    json!([{"namespaces": {"matchLabels": {"kubernetes.io/metadata.name": ns}}}])
}

// ----------------------------------------------------------------------------------------------
// Precedence
// ----------------------------------------------------------------------------------------------

#[test]
fn admin_deny_beats_a_networkpolicy_allow() {
    let mut e = cluster();
    apply_np(
        &mut e,
        "a/allow-all",
        json!({"podSelector": {}, "ingress": [{}]}),
    );
    assert!(allowed(&e, "b/client", "a/web", 80));
    apply_cnp(
        &mut e,
        "deny-b",
        json!({"tier": "Admin", "priority": 10, "subject": ns_subject("a"),
               "ingress": [{"action": "Deny", "from": from_ns("b")}]}),
    );
    let v = verdict(&e, "b/client", "a/web", 80, Protocol::Tcp);
    assert!(!v.allowed);
    let r = admin_reason(&v.ingress);
    assert_eq!(r.policy, cnp_key("deny-b"));
    assert_eq!(
        (r.tier, r.priority, r.index, r.action),
        (Tier::Admin, Some(10), 0, AdminAction::Deny)
    );
    assert!(!r.fail_closed);
    // Not matched: the NetworkPolicy still decides.
    assert!(allowed(&e, "a/db", "a/web", 80));
}

#[test]
fn admin_accept_beats_networkpolicy_isolation() {
    let mut e = cluster();
    apply_np(&mut e, "a/deny-all", json!({"podSelector": {}}));
    assert!(!allowed(&e, "b/client", "a/web", 80));
    apply_cnp(
        &mut e,
        "monitoring",
        json!({"tier": "Admin", "priority": 1, "subject": ns_subject("a"),
               "ingress": [{"action": "Accept", "from": [{"pods": {"namespaceSelector": {}, "podSelector": {"matchLabels": {"app": "client"}}}}]}]}),
    );
    let v = verdict(&e, "b/client", "a/web", 80, Protocol::Tcp);
    assert!(v.allowed, "{v}");
    assert_eq!(admin_reason(&v.ingress).action, AdminAction::Allow);
    assert_eq!(
        v.ingress.to_string(),
        "allowed by Admin ClusterNetworkPolicy/monitoring (priority 1) ingress rule 0 (Accept)"
    );
    // Others are still isolated by the NetworkPolicy.
    assert!(!allowed(&e, "b/web", "a/web", 80));
}

#[test]
fn admin_pass_defers_to_networkpolicy_and_skips_the_rest_of_the_tier() {
    let mut e = cluster();
    apply_cnp(
        &mut e,
        "pass-b",
        json!({"tier": "Admin", "priority": 5, "subject": ns_subject("a"),
               "ingress": [{"action": "Pass", "from": from_ns("b")}]}),
    );
    // A lower-precedence Admin deny that Pass skips.
    apply_cnp(
        &mut e,
        "deny-everyone",
        json!({"tier": "Admin", "priority": 50, "subject": ns_subject("a"),
               "ingress": [{"action": "Deny", "from": [{"namespaces": {}}]}]}),
    );
    // No NetworkPolicy: Pass leads to the default (allowed).
    let d = decide(&e, "a/web", Direction::Ingress, "b/client", 80);
    assert!(d.allowed);
    assert_eq!(d.reason, Reason::NotIsolated);
    // Not passed: the lower-precedence deny applies.
    let d = decide(&e, "a/web", Direction::Ingress, "a/db", 80);
    assert!(!d.allowed);
    assert_eq!(admin_reason(&d).policy, cnp_key("deny-everyone"));
    // A NetworkPolicy now decides what was passed.
    apply_np(
        &mut e,
        "a/web-only-from-client",
        json!({"podSelector": {"matchLabels": {"app": "web"}},
               "ingress": [{"from": [{"namespaceSelector": {}, "podSelector": {"matchLabels": {"app": "client"}}}]}]}),
    );
    assert!(allowed(&e, "b/client", "a/web", 80));
    let v = verdict(&e, "b/web", "a/web", 80, Protocol::Tcp);
    assert!(!v.allowed);
    assert!(matches!(v.ingress.reason, Reason::Isolated(_)));
}

#[test]
fn baseline_applies_only_where_no_networkpolicy_isolates() {
    let mut e = cluster();
    apply_cnp(
        &mut e,
        "default-deny",
        json!({"tier": "Baseline", "priority": 0, "subject": all_namespaces(),
               "ingress": [{"action": "Deny", "from": [{"namespaces": {}}]}]}),
    );
    let v = verdict(&e, "b/client", "a/web", 80, Protocol::Tcp);
    assert!(!v.allowed);
    let r = admin_reason(&v.ingress);
    assert_eq!((r.tier, r.action), (Tier::Baseline, AdminAction::Deny));
    // A NetworkPolicy isolating a/web for ingress overrides the baseline there.
    apply_np(
        &mut e,
        "a/web-from-b",
        json!({"podSelector": {"matchLabels": {"app": "web"}},
               "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"team": "y"}}}]}]}),
    );
    assert!(allowed(&e, "b/client", "a/web", 80));
    // ... and denies what it does not allow, as a NetworkPolicy, not the baseline.
    let d = decide(&e, "a/web", Direction::Ingress, "a/db", 80);
    assert!(!d.allowed);
    assert!(matches!(d.reason, Reason::Isolated(_)));
    // Where no NetworkPolicy isolates, the baseline still denies.
    assert!(!allowed(&e, "b/client", "a/db", 5432));
}

#[test]
fn baseline_is_per_direction() {
    let mut e = cluster();
    apply_cnp(
        &mut e,
        "no-egress-to-a",
        json!({"tier": "Baseline", "priority": 0, "subject": ns_subject("b"),
               "egress": [{"action": "Deny", "to": from_ns("a")}]}),
    );
    // An ingress-only NetworkPolicy on b/client leaves its egress to the baseline.
    apply_np(&mut e, "b/ingress-only", json!({"podSelector": {}}));
    let d = decide(&e, "b/client", Direction::Egress, "a/web", 80);
    assert!(!d.allowed);
    assert_eq!(admin_reason(&d).tier, Tier::Baseline);
    // An egress NetworkPolicy takes egress over.
    apply_np(
        &mut e,
        "b/egress-all",
        json!({"podSelector": {}, "policyTypes": ["Egress"], "egress": [{}]}),
    );
    let d = decide(&e, "b/client", Direction::Egress, "a/web", 80);
    assert!(d.allowed);
    assert!(matches!(d.reason, Reason::AllowedBy(_)));
}

#[test]
fn baseline_pass_goes_to_the_default_and_allow_overrides_later_denies() {
    let mut e = cluster();
    apply_cnp(
        &mut e,
        "b-deny",
        json!({"tier": "Baseline", "priority": 20, "subject": ns_subject("a"),
               "ingress": [{"action": "Deny", "from": [{"namespaces": {}}]}]}),
    );
    apply_cnp(
        &mut e,
        "b-pass-clients",
        json!({"tier": "Baseline", "priority": 10, "subject": ns_subject("a"),
               "ingress": [{"action": "Pass", "from": [{"pods": {"podSelector": {"matchLabels": {"app": "client"}}}}]}]}),
    );
    let d = decide(&e, "a/web", Direction::Ingress, "b/client", 80);
    assert!(d.allowed);
    let r = admin_reason(&d);
    assert_eq!(
        (r.tier, r.action, r.policy.name.as_str()),
        (Tier::Baseline, AdminAction::Pass, "b-pass-clients")
    );
    assert!(
        d.to_string()
            .starts_with("allowed: passed to the default by Baseline ClusterNetworkPolicy/b-pass-clients (priority 10) ingress rule 0"),
        "{d}"
    );
    assert!(!decide(&e, "a/web", Direction::Ingress, "b/web", 80).allowed);
}

#[test]
fn priorities_lower_first_then_name_and_updates_reorder() {
    let mut e = cluster();
    let spec = |priority: i64, action: &str| {
        json!({"tier": "Admin", "priority": priority, "subject": ns_subject("a"),
               "ingress": [{"action": action, "from": from_ns("b")}]})
    };
    apply_cnp(&mut e, "allow", spec(20, "Accept"));
    apply_cnp(&mut e, "deny", spec(10, "Deny"));
    assert!(!allowed(&e, "b/client", "a/web", 80));
    // Raise the deny's priority value past the allow's: the allow now comes first.
    apply_cnp(&mut e, "deny", spec(30, "Deny"));
    let d = decide(&e, "a/web", Direction::Ingress, "b/client", 80);
    assert!(d.allowed);
    assert_eq!(admin_reason(&d).priority, Some(20));
    // Equal priorities: name order (deterministic, the API leaves it open).
    apply_cnp(&mut e, "deny", spec(20, "Deny"));
    let d = decide(&e, "a/web", Direction::Ingress, "b/client", 80);
    assert_eq!(admin_reason(&d).policy, cnp_key("allow"));
    let order: Vec<String> = e
        .admin_selecting(&key("a/web"), Tier::Admin, Direction::Ingress)
        .map(|k| k.name.clone())
        .collect();
    assert_eq!(order, ["allow", "deny"]);
    // An AdminNetworkPolicy shares the Admin tier and its priorities.
    e.apply_admin_network_policy(&anp(
        "anp-deny",
        json!({"priority": 3, "subject": ns_subject("a"),
               "ingress": [{"action": "Deny", "from": from_ns("b")}]}),
    ))
    .unwrap();
    let d = decide(&e, "a/web", Direction::Ingress, "b/client", 80);
    assert!(!d.allowed);
    assert_eq!(admin_reason(&d).policy.kind, AdminKind::AdminNetworkPolicy);
    // Removal restores the previous order.
    e.remove_admin_policy(&AdminPolicyKey {
        kind: AdminKind::AdminNetworkPolicy,
        name: "anp-deny".into(),
    });
    assert!(decide(&e, "a/web", Direction::Ingress, "b/client", 80).allowed);
    assert_eq!(e.admin_policy_count(), 2);
}

#[test]
fn first_matching_rule_wins_within_a_policy() {
    let mut e = cluster();
    apply_cnp(
        &mut e,
        "rules",
        json!({"tier": "Admin", "priority": 1, "subject": ns_subject("a"),
        "ingress": [
            {"action": "Accept", "from": [{"pods": {"namespaceSelector": {}, "podSelector": {"matchLabels": {"app": "client"}}}}]},
            {"action": "Deny", "from": [{"namespaces": {}}]},
            {"action": "Accept", "from": [{"namespaces": {}}]}
        ]}),
    );
    let d = decide(&e, "a/web", Direction::Ingress, "b/client", 80);
    assert!(d.allowed);
    assert_eq!(admin_reason(&d).index, 0);
    let d = decide(&e, "a/web", Direction::Ingress, "b/web", 80);
    assert!(!d.allowed);
    assert_eq!(admin_reason(&d).index, 1);
}

#[test]
fn both_ends_egress_of_the_source_and_ingress_of_the_destination() {
    let mut e = cluster();
    apply_cnp(
        &mut e,
        "b-no-egress-to-db",
        json!({"tier": "Admin", "priority": 1, "subject": ns_subject("b"),
               "egress": [{"action": "Deny", "to": [{"pods": {"namespaceSelector": {}, "podSelector": {"matchLabels": {"app": "db"}}}}]}]}),
    );
    let v = verdict(&e, "b/client", "a/db", 5432, Protocol::Tcp);
    assert!(!v.allowed);
    let egress = v.egress.as_ref().unwrap();
    assert_eq!(admin_reason(egress).direction, Direction::Egress);
    assert!(v.ingress.allowed);
    // The other way round is not affected (a/db's egress, b/client's ingress).
    assert!(allowed(&e, "a/db", "b/client", 80));
    // An Admin accept on the source's egress does not override the destination's ingress.
    apply_cnp(
        &mut e,
        "a-egress-accept",
        json!({"tier": "Admin", "priority": 1, "subject": ns_subject("a"),
               "egress": [{"action": "Accept", "to": [{"namespaces": {}}]}]}),
    );
    apply_np(&mut e, "b/deny-all", json!({"podSelector": {}}));
    let v = verdict(&e, "a/web", "b/web", 8080, Protocol::Tcp);
    assert!(!v.allowed);
    assert!(v.egress.as_ref().unwrap().allowed);
    assert!(matches!(v.ingress.reason, Reason::Isolated(_)));
}

// ----------------------------------------------------------------------------------------------
// Ports
// ----------------------------------------------------------------------------------------------

#[test]
fn v1alpha2_ports_number_range_named_and_protocols() {
    let mut e = cluster();
    apply_cnp(
        &mut e,
        "ports",
        json!({"tier": "Admin", "priority": 1, "subject": ns_subject("a"),
        "ingress": [
            {"action": "Deny", "from": [{"namespaces": {}}], "protocols": [
                {"tcp": {"destinationPort": {"number": 80}}},
                {"udp": {"destinationPort": {"range": {"start": 50, "end": 60}}}},
                {"destinationNamedPort": "pg"}
            ]}
        ]}),
    );
    let d = |local: &str, port: u16, proto: Protocol| {
        decide_proto(&e, local, Direction::Ingress, "b/client", port, proto).allowed
    };
    assert!(!d("a/web", 80, Protocol::Tcp));
    assert!(d("a/web", 81, Protocol::Tcp));
    assert!(d("a/web", 80, Protocol::Udp));
    assert!(!d("a/web", 53, Protocol::Udp));
    assert!(d("a/web", 61, Protocol::Udp));
    assert!(d("a/web", 53, Protocol::Sctp));
    // Named port: resolved on the destination (ingress: the local pod's container ports).
    assert!(!d("a/db", 5432, Protocol::Tcp));
    assert!(d("a/web", 5432, Protocol::Tcp));
    // A rule with ports never matches a protocol without ports.
    assert!(d("a/web", 0, Protocol::ICMP));
}

#[test]
fn named_ports_in_egress_use_the_destination_name() {
    let mut e = cluster();
    apply_cnp(
        &mut e,
        "no-http-out",
        json!({"tier": "Admin", "priority": 1, "subject": ns_subject("b"),
               "egress": [{"action": "Deny", "to": [{"namespaces": {}}], "protocols": [{"destinationNamedPort": "http"}]}]}),
    );
    // a/web names 80/TCP "http"; a/db has no "http".
    assert!(!decide(&e, "b/client", Direction::Egress, "a/web", 80).allowed);
    assert!(decide(&e, "b/client", Direction::Egress, "a/web", 53).allowed);
    assert!(decide(&e, "b/client", Direction::Egress, "a/db", 5432).allowed);
    assert!(!allowed(&e, "b/client", "a/web", 80));
}

#[test]
fn no_ports_means_every_port_and_protocol_including_icmp() {
    let mut e = cluster();
    apply_cnp(
        &mut e,
        "deny-all-b",
        json!({"tier": "Admin", "priority": 1, "subject": ns_subject("a"),
               "ingress": [{"action": "Deny", "from": from_ns("b")}]}),
    );
    for proto in [
        Protocol::Tcp,
        Protocol::Udp,
        Protocol::Sctp,
        Protocol::ICMP,
        Protocol::Other(47),
    ] {
        let port = if proto.has_ports() { 1234 } else { 0 };
        assert!(
            !verdict(&e, "b/client", "a/web", port, proto).allowed,
            "{proto}"
        );
    }
}

#[test]
fn v1alpha1_ports_default_tcp_ranges_and_named() {
    let mut e = cluster();
    e.apply_admin_network_policy(&anp(
        "ports",
        json!({"priority": 1, "subject": ns_subject("a"),
        "ingress": [{"action": "Deny", "from": [{"namespaces": {}}], "ports": [
            {"portNumber": {"port": 80}},
            {"portNumber": {"protocol": "UDP", "port": 53}},
            {"portRange": {"start": 9000, "end": 9100}},
            {"portRange": {"protocol": "SCTP", "start": 7000, "end": 7000}},
            {"namedPort": "pg"}
        ]}]}),
    ))
    .unwrap();
    let d = |local: &str, port: u16, proto: Protocol| {
        decide_proto(&e, local, Direction::Ingress, "b/client", port, proto).allowed
    };
    assert!(!d("a/web", 80, Protocol::Tcp));
    assert!(d("a/web", 80, Protocol::Udp));
    assert!(!d("a/web", 53, Protocol::Udp));
    assert!(!d("a/web", 9050, Protocol::Tcp));
    assert!(d("a/web", 9050, Protocol::Udp));
    assert!(!d("a/web", 7000, Protocol::Sctp));
    assert!(!d("a/db", 5432, Protocol::Tcp));
    assert!(d("a/web", 0, Protocol::ICMP));
}

// ----------------------------------------------------------------------------------------------
// Selectors and peers
// ----------------------------------------------------------------------------------------------

#[test]
fn subjects_by_namespace_labels_follow_namespace_label_changes() {
    let mut e = cluster();
    apply_cnp(
        &mut e,
        "prod-deny",
        json!({"tier": "Admin", "priority": 1, "subject": {"namespaces": {"matchLabels": {"env": "prod"}}},
               "ingress": [{"action": "Deny", "from": [{"namespaces": {}}]}]}),
    );
    assert!(!allowed(&e, "b/client", "a/web", 80));
    assert!(allowed(&e, "a/web", "b/web", 8080));
    // b becomes prod, a stops being prod: the index follows.
    e.apply_namespace(&namespace("b", json!({"team": "y", "env": "prod"})))
        .unwrap();
    e.apply_namespace(&namespace("a", json!({"team": "x"})))
        .unwrap();
    assert!(allowed(&e, "b/client", "a/web", 80));
    assert!(!allowed(&e, "a/web", "b/web", 8080));
    // A pod applied later is indexed too.
    e.apply_pod(&pod("b/new", json!({}), "10.0.2.9", &[]))
        .unwrap();
    assert!(!allowed(&e, "a/web", "b/new", 80));
    // Removing the namespace object leaves only kubernetes.io/metadata.name.
    e.remove_namespace("b");
    assert!(allowed(&e, "a/web", "b/new", 80));
}

#[test]
fn subjects_by_pods_and_host_network_pods_are_never_subjects() {
    let mut e = cluster();
    let host: Pod = serde_json::from_value(json!({
        "metadata": {"name": "node-agent", "namespace": "a", "labels": {"app": "web"}},
        "spec": {"hostNetwork": true, "containers": [{"name": "c"}]},
        "status": {"podIP": "192.168.0.10"}
    }))
    .unwrap();
    e.apply_pod(&host).unwrap();
    apply_cnp(
        &mut e,
        "web-deny",
        json!({"tier": "Admin", "priority": 1,
               "subject": {"pods": {"namespaceSelector": {}, "podSelector": {"matchLabels": {"app": "web"}}}},
               "ingress": [{"action": "Deny", "from": [{"namespaces": {}}]}]}),
    );
    assert!(!allowed(&e, "b/client", "a/web", 80));
    assert!(!allowed(&e, "b/client", "b/web", 8080));
    assert!(allowed(&e, "b/client", "a/db", 5432));
    assert_eq!(
        e.admin_selecting(&key("a/node-agent"), Tier::Admin, Direction::Ingress)
            .count(),
        0
    );
    assert_eq!(
        decide(&e, "a/node-agent", Direction::Ingress, "b/client", 80).reason,
        Reason::HostNetwork
    );
    // Pod label change re-indexes.
    e.apply_pod(&pod(
        "a/web",
        json!({"app": "frontend"}),
        "10.0.1.1",
        &[("http", 80, "TCP")],
    ))
    .unwrap();
    assert!(allowed(&e, "b/client", "a/web", 80));
}

#[test]
fn pod_and_namespace_peers_match_only_workloads_networks_match_addresses() {
    let mut e = cluster();
    apply_cnp(
        &mut e,
        "peers",
        json!({"tier": "Admin", "priority": 1, "subject": ns_subject("a"),
        "ingress": [{"action": "Deny", "from": [{"namespaces": {}}]}],
        "egress": [
            {"action": "Deny", "to": [{"networks": ["10.0.2.0/24", "fd00::/8"]}]},
            {"action": "Accept", "to": [{"networks": ["0.0.0.0/0"]}]}
        ]}),
    );
    // An IP-only source is no namespace's pod.
    assert!(decide_ip(&e, "a/web", Direction::Ingress, "203.0.113.5", 80).allowed);
    // Networks match pod addresses too.
    let d = decide(&e, "a/web", Direction::Egress, "b/web", 8080);
    assert!(!d.allowed);
    assert_eq!(admin_reason(&d).index, 0);
    let d = decide_ip(&e, "a/web", Direction::Egress, "203.0.113.5", 443);
    assert!(d.allowed);
    assert_eq!(admin_reason(&d).index, 1);
    assert!(!decide_ip(&e, "a/web", Direction::Egress, "fd00::1", 443).allowed);
}

// ----------------------------------------------------------------------------------------------
// Fail closed
// ----------------------------------------------------------------------------------------------

#[test]
fn unsupported_peers_fail_closed_and_are_reported() {
    let mut e = cluster();
    // Deny with a domainNames peer (the API supports names only in Accept rules): a deny-all
    // rule, every peer and port.
    let applied = e
        .apply_cluster_network_policy(&cnp(
            "deny-by-name",
            json!({"tier": "Admin", "priority": 5, "subject": ns_subject("b"),
                   "egress": [{"action": "Deny", "to": [{"domainNames": ["evil.example.com"]}],
                               "protocols": [{"tcp": {"destinationPort": {"number": 443}}}]}]}),
        ))
        .unwrap();
    assert_eq!(applied.warnings.len(), 1, "{:?}", applied.warnings);
    assert_eq!(
        applied.warnings[0].field,
        "spec.egress[0].to[0].domainNames"
    );
    let message = &applied.warnings[0].message;
    assert!(message.contains("only in Accept rules"), "{message}");
    assert!(message.contains("denies all traffic"), "{message}");
    assert_eq!(e.admin_warnings(&cnp_key("deny-by-name")), applied.warnings);
    let d = decide(&e, "b/client", Direction::Egress, "a/web", 80);
    assert!(!d.allowed);
    assert!(admin_reason(&d).fail_closed);
    assert!(d.to_string().contains("fail-closed"), "{d}");
    assert!(!decide_ip(&e, "b/client", Direction::Egress, "8.8.8.8", 53).allowed);
    // Ingress of b is not affected.
    assert!(allowed(&e, "a/web", "b/web", 8080));

    // Accept with a peer of no known field (`{}`): matches nothing, its other peers included
    // (the lower-precedence deny still applies).
    let applied = e
        .apply_cluster_network_policy(&cnp(
            "future-allowlist",
            json!({"tier": "Admin", "priority": 1, "subject": ns_subject("a"),
                   "egress": [{"action": "Accept", "to": [{}, {"pods": {"podSelector": {}}}]}]}),
        ))
        .unwrap();
    assert_eq!(applied.warnings.len(), 1);
    assert_eq!(applied.warnings[0].field, "spec.egress[0].to[0]");
    assert!(applied.warnings[0].message.contains("matches no traffic"));
    apply_cnp(
        &mut e,
        "a-egress-deny",
        json!({"tier": "Admin", "priority": 2, "subject": ns_subject("a"),
               "egress": [{"action": "Deny", "to": [{"networks": ["0.0.0.0/0"]}]}]}),
    );
    let d = decide(&e, "a/web", Direction::Egress, "a/db", 5432);
    assert!(!d.allowed);
    assert_eq!(admin_reason(&d).policy, cnp_key("a-egress-deny"));
}

#[test]
fn pass_rules_and_unknown_peer_fields_fail_closed_too() {
    let mut e = cluster();
    // A peer of a newer API version (unknown field): the Pass rule becomes deny-all.
    let parsed = policy::objects::parse(
        "cnp.yaml",
        r#"
apiVersion: policy.networking.k8s.io/v1alpha2
kind: ClusterNetworkPolicy
metadata: {name: future}
spec:
  tier: Admin
  priority: 3
  subject: {namespaces: {matchLabels: {kubernetes.io/metadata.name: a}}}
  ingress:
  - action: Pass
    from: [{serviceAccounts: {name: x}}]
"#,
    );
    assert!(parsed.errors.is_empty(), "{:?}", parsed.errors);
    let report = policy::objects::load(&mut e, &parsed.objects);
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    assert_eq!(report.warnings.len(), 1);
    let w = report.warnings[0].to_string();
    assert!(
        w.starts_with("cnp.yaml: document 1 (ClusterNetworkPolicy/future): spec.ingress[0].from[0].serviceAccounts: "),
        "{w}"
    );
    let d = decide(&e, "a/web", Direction::Ingress, "b/client", 80);
    assert!(!d.allowed);
    let r = admin_reason(&d);
    assert!(r.fail_closed);
    assert_eq!(r.action, AdminAction::Deny);
    // BaselineAdminNetworkPolicy has no domainNames: for it that is an unknown peer field.
    let applied = e
        .apply_baseline_admin_network_policy(&banp(
            "default",
            json!({"subject": ns_subject("b"),
                   "egress": [{"action": "Allow", "to": [{"domainNames": ["example.com"]}]}]}),
        ))
        .unwrap();
    assert_eq!(applied.warnings.len(), 1);
    assert!(applied.warnings[0].field.ends_with("domainNames"));
}

// ----------------------------------------------------------------------------------------------
// BaselineAdminNetworkPolicy
// ----------------------------------------------------------------------------------------------

#[test]
fn banp_is_the_baseline_after_prioritized_baseline_policies() {
    let mut e = cluster();
    e.apply_baseline_admin_network_policy(&banp(
        "default",
        json!({"subject": {"namespaces": {}},
               "ingress": [{"action": "Deny", "from": [{"namespaces": {}}]}]}),
    ))
    .unwrap();
    assert!(!allowed(&e, "b/client", "a/web", 80));
    let d = decide(&e, "a/web", Direction::Ingress, "b/client", 80);
    let r = admin_reason(&d);
    assert_eq!(
        (r.policy.kind, r.priority, r.tier),
        (AdminKind::BaselineAdminNetworkPolicy, None, Tier::Baseline)
    );
    assert_eq!(
        d.to_string(),
        "denied by Baseline BaselineAdminNetworkPolicy/default ingress rule 0 (Deny)"
    );
    // A Baseline ClusterNetworkPolicy at the lowest precedence still comes first.
    apply_cnp(
        &mut e,
        "allow-b",
        json!({"tier": "Baseline", "priority": 1000, "subject": all_namespaces(),
               "ingress": [{"action": "Accept", "from": from_ns("b")}]}),
    );
    assert!(allowed(&e, "b/client", "a/web", 80));
    assert!(!allowed(&e, "a/db", "a/web", 80));
}

// ----------------------------------------------------------------------------------------------
// Validation
// ----------------------------------------------------------------------------------------------

#[test]
fn invalid_cluster_network_policies_name_the_field() {
    let subject = ns_subject("a");
    let cases: Vec<(Value, &str, &str)> = vec![
        (
            json!({"priority": 1, "subject": subject}),
            "spec.tier",
            "required",
        ),
        (
            json!({"tier": "Namespace", "priority": 1, "subject": subject}),
            "spec.tier",
            "Admin, Baseline",
        ),
        (
            json!({"tier": "Admin", "subject": subject}),
            "spec.priority",
            "required",
        ),
        (
            json!({"tier": "Admin", "priority": 1001, "subject": subject}),
            "spec.priority",
            "between 0 and 1000",
        ),
        (
            json!({"tier": "Admin", "priority": 1}),
            "spec.subject",
            "required",
        ),
        (
            json!({"tier": "Admin", "priority": 1, "subject": {"namespaces": {}, "pods": {"podSelector": {}}}}),
            "spec.subject",
            "found namespaces and pods",
        ),
        (
            json!({"tier": "Admin", "priority": 1, "subject": {"pods": {"namespaceSelector": {}}}}),
            "spec.subject.pods.podSelector",
            "required",
        ),
        (
            json!({"tier": "Admin", "priority": 1, "subject": {"namespaces": {"matchLabels": {"bad key": "x"}}}}),
            "spec.subject.namespaces.matchLabels[bad key]",
            "invalid label key",
        ),
        (
            json!({"tier": "Admin", "priority": 1, "subject": subject, "ingress": [{"action": "Allow", "from": [{"namespaces": {}}]}]}),
            "spec.ingress[0].action",
            "Accept, Deny, Pass",
        ),
        (
            json!({"tier": "Admin", "priority": 1, "subject": subject, "ingress": [{"action": "Deny"}]}),
            "spec.ingress[0].from",
            "required",
        ),
        (
            json!({"tier": "Admin", "priority": 1, "subject": subject, "ingress": [{"action": "Deny", "from": []}]}),
            "spec.ingress[0].from",
            "at least 1",
        ),
        (
            json!({"tier": "Admin", "priority": 1, "subject": subject, "ingress": [{"action": "Deny", "from": [{"namespaces": {}, "pods": {"podSelector": {}}}]}]}),
            "spec.ingress[0].from[0]",
            "exactly one",
        ),
        (
            json!({"tier": "Admin", "priority": 1, "subject": subject, "ingress": [{"action": "Deny", "from": [{"namespaces": {}}], "protocols": []}]}),
            "spec.ingress[0].protocols",
            "at least 1",
        ),
        (
            json!({"tier": "Admin", "priority": 1, "subject": subject, "ingress": [{"action": "Deny", "from": [{"namespaces": {}}], "protocols": [{"tcp": {}}]}]}),
            "spec.ingress[0].protocols[0].tcp.destinationPort",
            "required",
        ),
        (
            json!({"tier": "Admin", "priority": 1, "subject": subject, "ingress": [{"action": "Deny", "from": [{"namespaces": {}}], "protocols": [{"tcp": {"destinationPort": {"number": 0}}}]}]}),
            "spec.ingress[0].protocols[0].tcp.destinationPort.number",
            "between 1 and 65535",
        ),
        (
            json!({"tier": "Admin", "priority": 1, "subject": subject, "ingress": [{"action": "Deny", "from": [{"namespaces": {}}], "protocols": [{"udp": {"destinationPort": {"range": {"start": 90, "end": 90}}}}]}]}),
            "spec.ingress[0].protocols[0].udp.destinationPort.range",
            "Start port must be less than End port",
        ),
        (
            json!({"tier": "Admin", "priority": 1, "subject": subject, "ingress": [{"action": "Deny", "from": [{"namespaces": {}}], "protocols": [{"tcp": {"destinationPort": {"number": 80}}, "destinationNamedPort": "http"}]}]}),
            "spec.ingress[0].protocols[0]",
            "found tcp and destinationNamedPort",
        ),
        (
            json!({"tier": "Admin", "priority": 1, "subject": subject, "egress": [{"action": "Deny", "to": [{"networks": ["10.0.0.0/33"]}]}]}),
            "spec.egress[0].to[0].networks[0]",
            "Invalid CIDR",
        ),
        (
            json!({"tier": "Admin", "priority": 1, "subject": subject, "egress": [{"action": "Deny", "to": [{"networks": []}]}]}),
            "spec.egress[0].to[0].networks",
            "at least 1",
        ),
        (
            json!({"tier": "Admin", "priority": 1, "subject": subject, "egress": [{"action": "Accept", "to": [{"domainNames": ["*bad*.com"]}]}]}),
            "spec.egress[0].to[0].domainNames[0]",
            "not a domain name",
        ),
        (
            json!({"tier": "Admin", "priority": 1, "subject": subject, "egress": [{"action": "Deny", "to": [{"networks": ["10.0.0.0/8"]}], "protocols": [{"destinationNamedPort": "http"}]}]}),
            "spec.egress[0]",
            "cannot be set with namedPorts",
        ),
        (
            json!({"tier": "Admin", "priority": 1, "subject": subject, "egress": [{"name": "x".repeat(101), "action": "Deny", "to": [{"namespaces": {}}]}]}),
            "spec.egress[0].name",
            "at most 100",
        ),
        (
            json!({"tier": "Admin", "priority": 1, "subject": subject,
                   "ingress": vec![json!({"action": "Deny", "from": [{"namespaces": {}}]}); 26]}),
            "spec.ingress",
            "at most 25",
        ),
    ];
    for (spec, field, words) in cases {
        let mut e = cluster();
        let err = e
            .apply_cluster_network_policy(&cnp("bad", spec.clone()))
            .expect_err(&spec.to_string());
        assert_eq!(err.kind, "ClusterNetworkPolicy");
        assert_eq!(err.object, "bad");
        assert_eq!(err.field, field, "{spec}: {err}");
        assert!(err.message.contains(words), "{spec}: {err}");
        assert_eq!(e.admin_policy_count(), 0);
    }
}

#[test]
fn invalid_v1alpha1_policies_name_the_field() {
    let subject = ns_subject("a");
    let cases: Vec<(Value, &str, &str)> = vec![
        (
            json!({"priority": -1, "subject": subject}),
            "spec.priority",
            "between 0 and 1000",
        ),
        (
            json!({"priority": 1, "subject": {"pods": {"podSelector": {}}}}),
            "spec.subject.pods.namespaceSelector",
            "required",
        ),
        (
            json!({"priority": 1, "subject": subject, "ingress": [{"action": "Accept", "from": [{"namespaces": {}}]}]}),
            "spec.ingress[0].action",
            "Allow, Deny, Pass",
        ),
        (
            json!({"priority": 1, "subject": subject, "ingress": [{"action": "Deny", "from": [{"namespaces": {}}], "ports": [{"portNumber": {"protocol": "ICMP", "port": 1}}]}]}),
            "spec.ingress[0].ports[0].portNumber.protocol",
            "TCP, UDP, SCTP",
        ),
        (
            json!({"priority": 1, "subject": subject, "ingress": [{"action": "Deny", "from": [{"namespaces": {}}], "ports": [{"portNumber": {"protocol": "TCP"}}]}]}),
            "spec.ingress[0].ports[0].portNumber.port",
            "required",
        ),
        (
            json!({"priority": 1, "subject": subject, "ingress": [{"action": "Deny", "from": [{"namespaces": {}}], "ports": [{"portRange": {"start": 9000, "end": 8000}}]}]}),
            "spec.ingress[0].ports[0].portRange.end",
            "greater than or equal",
        ),
        (
            json!({"priority": 1, "subject": subject, "ingress": [{"action": "Deny", "from": [{"namespaces": {}}], "ports": [{"namedPort": "http", "portNumber": {"port": 80}}]}]}),
            "spec.ingress[0].ports[0]",
            "found portNumber and namedPort",
        ),
        (
            json!({"priority": 1, "subject": subject, "egress": [{"action": "Deny", "to": [{"nodes": {}}], "ports": [{"namedPort": "http"}]}]}),
            "spec.egress[0]",
            "cannot be set with namedPorts",
        ),
    ];
    for (spec, field, words) in cases {
        let mut e = cluster();
        let err = e
            .apply_admin_network_policy(&anp("bad", spec.clone()))
            .expect_err(&spec.to_string());
        assert_eq!(err.kind, "AdminNetworkPolicy");
        assert_eq!(err.field, field, "{spec}: {err}");
        assert!(err.message.contains(words), "{spec}: {err}");
    }
    let mut e = cluster();
    let err = e
        .apply_baseline_admin_network_policy(&banp("other", json!({"subject": subject})))
        .unwrap_err();
    assert_eq!(
        (err.kind, err.field.as_str()),
        ("BaselineAdminNetworkPolicy", "metadata.name")
    );
    let err = e
        .apply_baseline_admin_network_policy(&banp(
            "default",
            json!({"subject": subject, "ingress": [{"action": "Pass", "from": [{"namespaces": {}}]}]}),
        ))
        .unwrap_err();
    assert_eq!(err.field, "spec.ingress[0].action");
    assert!(err.message.contains("Allow, Deny"), "{err}");
}

#[test]
fn an_invalid_update_keeps_the_previous_version_in_force() {
    let mut e = cluster();
    apply_cnp(
        &mut e,
        "guard",
        json!({"tier": "Admin", "priority": 1, "subject": ns_subject("a"),
               "ingress": [{"action": "Deny", "from": from_ns("b")}]}),
    );
    let err = e
        .apply_cluster_network_policy(&cnp(
            "guard",
            json!({"tier": "Admin", "priority": 1, "subject": ns_subject("a"),
                   "ingress": [{"action": "Drop", "from": from_ns("b")}]}),
        ))
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "ClusterNetworkPolicy guard: spec.ingress[0].action: unsupported value \"Drop\": must be one of Accept, Deny, Pass"
    );
    assert!(!allowed(&e, "b/client", "a/web", 80));
    // A tier change moves it: Baseline does not apply under an isolating NetworkPolicy.
    apply_np(
        &mut e,
        "a/allow-all",
        json!({"podSelector": {}, "ingress": [{}]}),
    );
    assert!(!allowed(&e, "b/client", "a/web", 80));
    apply_cnp(
        &mut e,
        "guard",
        json!({"tier": "Baseline", "priority": 1, "subject": ns_subject("a"),
               "ingress": [{"action": "Deny", "from": from_ns("b")}]}),
    );
    assert!(allowed(&e, "b/client", "a/web", 80));
    assert_eq!(
        e.admin_selecting(&key("a/web"), Tier::Admin, Direction::Ingress)
            .count(),
        0
    );
    assert_eq!(
        e.admin_selecting(&key("a/web"), Tier::Baseline, Direction::Ingress)
            .count(),
        1
    );
}

// ----------------------------------------------------------------------------------------------
// Parsing
// ----------------------------------------------------------------------------------------------

#[test]
fn parse_and_load_all_three_kinds_beside_networkpolicies() {
    let text = r#"
apiVersion: v1
kind: List
items:
- apiVersion: v1
  kind: Namespace
  metadata: {name: a, labels: {team: x}}
- apiVersion: v1
  kind: Pod
  metadata: {name: web, namespace: a, labels: {app: web}}
  spec: {containers: [{name: c, ports: [{name: http, containerPort: 80}]}]}
  status: {podIP: 10.0.1.1}
- apiVersion: v1
  kind: Pod
  metadata: {name: client, namespace: b}
  spec: {containers: [{name: c}]}
  status: {podIP: 10.0.2.2}
- apiVersion: policy.networking.k8s.io/v1alpha2
  kind: ClusterNetworkPolicy
  metadata: {name: sensitive-ns-deny}
  spec:
    tier: Admin
    priority: 10
    subject:
      namespaces:
        matchLabels: {kubernetes.io/metadata.name: a}
    ingress:
    - name: select-all-deny-all
      action: Deny
      from:
      - namespaces: {}
      protocols:
      - tcp:
          destinationPort:
            number: 22
  status:
    conditions: []
- apiVersion: policy.networking.k8s.io/v1alpha1
  kind: AdminNetworkPolicy
  metadata: {name: pass-http}
  spec:
    priority: 20
    subject: {namespaces: {}}
    ingress:
    - action: Pass
      from: [{namespaces: {}}]
      ports: [{namedPort: http}]
---
apiVersion: policy.networking.k8s.io/v1alpha1
kind: BaselineAdminNetworkPolicy
metadata: {name: default}
spec:
  subject: {namespaces: {}}
  ingress:
  - action: Deny
    from: [{namespaces: {}}]
"#;
    let parsed = policy::objects::parse("cluster.yaml", text);
    assert!(parsed.errors.is_empty(), "{:?}", parsed.errors);
    let names: Vec<String> = parsed
        .objects
        .iter()
        .map(|o| format!("{} {}", o.value.kind(), o.value.name()))
        .collect();
    assert_eq!(
        names,
        [
            "Namespace a",
            "Pod a/web",
            "Pod b/client",
            "ClusterNetworkPolicy sensitive-ns-deny",
            "AdminNetworkPolicy pass-http",
            "BaselineAdminNetworkPolicy default"
        ]
    );
    let mut e = Engine::new();
    let report = policy::objects::load(&mut e, &parsed.objects);
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    assert!(report.warnings.is_empty());
    assert_eq!(report.implied_namespaces, ["b"]);
    assert_eq!(e.admin_policy_count(), 3);
    let probe = |port| {
        matrix::evaluate(
            &e,
            &Source::Pod(key("b/client")),
            &key("a/web"),
            Probe {
                port,
                protocol: Protocol::Tcp,
            },
        )
        .unwrap()
    };
    // 22: the Admin deny. 80 (named http): passed, no NetworkPolicy: the baseline denies.
    // 443: the baseline denies.
    let v = probe(22);
    assert!(!v.allowed);
    assert_eq!(admin_reason(&v.ingress).tier, Tier::Admin);
    for port in [80, 443] {
        let v = probe(port);
        assert!(!v.allowed);
        assert_eq!(admin_reason(&v.ingress).tier, Tier::Baseline);
    }
}

#[test]
fn parse_errors_name_the_field_of_strict_admin_objects() {
    let cases = [
        (
            "apiVersion: policy.networking.k8s.io/v1alpha2\nkind: ClusterNetworkPolicy\nmetadata: {name: x}\nspec: {tier: Admin, priority: 1, subject: {namespaces: {}}, ingres: []}\n",
            "spec.ingres",
            "unknown field `ingres`",
        ),
        (
            "apiVersion: policy.networking.k8s.io/v1alpha2\nkind: ClusterNetworkPolicy\nmetadata: {name: x}\nspec: {tier: Admin, priority: high}\n",
            "spec.priority",
            "invalid type",
        ),
        (
            "apiVersion: policy.networking.k8s.io/v1alpha1\nkind: ClusterNetworkPolicy\nmetadata: {name: x}\n",
            "apiVersion",
            "policy.networking.k8s.io/v1alpha2",
        ),
        (
            "apiVersion: policy.networking.k8s.io/v1alpha2\nkind: AdminNetworkPolicy\nmetadata: {name: x}\n",
            "apiVersion",
            "policy.networking.k8s.io/v1alpha1",
        ),
        (
            "apiVersion: policy.networking.k8s.io/v1alpha1\nkind: AdminNetworkPolicy\nmetadata: {name: x}\nspec: {priority: 1, subject: {namespaces: {}}, ingress: [{action: Deny, from: [{namespaces: {}}], ports: [{portNumber: {port: 80, protcol: TCP}}]}]}\n",
            "spec.ingress[0].ports[0].portNumber.protcol",
            "unknown field `protcol`",
        ),
    ];
    for (text, field, words) in cases {
        let parsed = policy::objects::parse("bad.yaml", text);
        assert_eq!(parsed.errors.len(), 1, "{text}");
        let err = &parsed.errors[0];
        assert_eq!(err.field, field, "{err}");
        assert!(err.message.contains(words), "{err}");
        assert!(
            err.to_string().starts_with("bad.yaml: document 1 ("),
            "{err}"
        );
    }
}
