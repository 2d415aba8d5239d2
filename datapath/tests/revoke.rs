#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Cutting established flows after a change: two nodes in memory (client web on node-a, server
//! db on node-b), a full handshake, then a policy or label change and `Processor::recheck`.
//! Each test asserts what each kernel would see afterwards: the flow's next packets become
//! RSTs at their own sequence numbers, never pass marked again.

mod common;

use std::collections::HashSet;
use std::net::SocketAddr;

use common::*;
use datapath::{CutReason, Processor, ProcessorConfig, Verdict};
use policy::{Direction, Protocol};

/// db accepts web on 5432; web may reach db on its port named postgres.
const ALLOW: &str = "
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: db, namespace: shop}
spec:
  podSelector: {matchLabels: {app: db}}
  ingress:
  - from: [{podSelector: {matchLabels: {app: web}}}]
    ports: [{port: 5432}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: web, namespace: shop}
spec:
  podSelector: {matchLabels: {app: web}}
  policyTypes: [Egress]
  egress:
  - to: [{podSelector: {matchLabels: {app: db}}}]
    ports: [{port: postgres}]
";

/// The new version of db's policy that still admits web (and now api too, on any port).
const DB_WEB_AND_API: &str = "
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: db, namespace: shop}
spec:
  podSelector: {matchLabels: {app: db}}
  ingress:
  - from: [{podSelector: {matchLabels: {app: web}}}, {podSelector: {matchLabels: {app: api}}}]
";

/// The ipBlock narrowed so that the client's subnet is out.
const DB_OTHER_SUBNET: &str = "
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: db, namespace: shop}
spec:
  podSelector: {matchLabels: {app: db}}
  ingress:
  - from: [{ipBlock: {cidr: 10.0.9.0/24}}]
";

fn policy(p: &mut Processor, yaml: &str) {
    let parsed = policy::objects::parse("change.yaml", yaml);
    assert!(parsed.errors.is_empty(), "{:?}", parsed.errors);
    let report = policy::objects::load(p.engine_mut(), &parsed.objects);
    assert!(report.errors.is_empty(), "{:?}", report.errors);
}

/// The verdict turned the packet into a bare RST at the packet's own sequence number.
fn reset(v: &Verdict, before: &[u8], after: &[u8]) {
    assert!(v.accept && v.modified, "expected a rewrite into RST: {v:?}");
    assert!(!v.mark_authorized && !v.unmark && !v.requeue, "{v:?}");
    assert_eq!(v.reason.as_ref().map(|r| r.as_str()), Some("flow_cut"));
    assert_eq!(flags(after), RST_ACK);
    assert!(checksums_ok(after));
    assert_eq!(seq_of(after), seq_of(before), "the receiver accepts it");
    assert!(after.len() < before.len(), "the payload never passes");
}

/// The verdict turned the packet into a bare ACK (no payload, no other flag), which a kernel
/// whose socket is gone answers with a RST.
fn bare_ack(v: &Verdict, before: &[u8], after: &[u8]) {
    assert!(v.accept && v.modified, "expected a rewrite into ACK: {v:?}");
    assert!(!v.mark_authorized && !v.unmark && !v.requeue, "{v:?}");
    assert_eq!(v.reason.as_ref().map(|r| r.as_str()), Some("flow_cut"));
    assert_eq!(flags(after), ACK);
    assert!(checksums_ok(after));
    assert_eq!(seq_of(after), seq_of(before));
    assert_eq!(after.len(), 40, "IPv4 + TCP headers only: {after:?}");
}

fn seq_of(p: &[u8]) -> u32 {
    let ihl = usize::from(p[0] & 0x0f) * 4;
    u32::from_be_bytes([p[ihl + 4], p[ihl + 5], p[ihl + 6], p[ihl + 7]])
}

#[test]
fn ingress_change_cuts_the_server_side_and_its_packets_become_resets() {
    let mut w = World::new(Mode::Psk, ALLOW);
    w.connect();
    assert_eq!(w.b.established_count(), 1);
    assert_eq!(w.a.established_count(), 1);

    // Before any change a recheck cuts nothing.
    assert!(w.b.recheck(w.now).is_empty());
    assert!(w.a.recheck(w.now).is_empty());

    policy(&mut w.b, INGRESS_DENY);
    let cuts = w.b.recheck(w.now);
    assert_eq!(cuts.len(), 1, "{cuts:?}");
    let cut = &cuts[0];
    assert_eq!((cut.workload, cut.local, cut.remote), (ID, w.s, w.c));
    assert_eq!(cut.direction, Direction::Ingress);
    assert_eq!(cut.reason, CutReason::PolicyIngress);
    // The server netns's conntrack entry was created by the client's SYN.
    assert_eq!(cut.conntrack_tuple(), (w.c, w.s));
    assert_eq!(w.b.metrics().cut("policy_ingress"), 1);
    assert_eq!(w.b.established_count(), 0);
    assert_eq!(w.b.metrics().established(), (0, 1));
    let mut text = String::new();
    w.b.metrics().render_prometheus(&mut text);
    assert!(
        text.contains("tessera_flows_cut_total{reason=\"policy_ingress\"} 1"),
        "{text}"
    );
    // The client's node has no reason to cut (its egress is still allowed).
    assert!(w.a.recheck(w.now).is_empty());

    // Its conntrack entry deleted, the client's next data reaches the server's queue while the
    // flow would still be lingering as authorized: it is not re-authorized but reset.
    let d = w.data_c();
    let (v, rst) = w.in_b(&d);
    reset(&v, &d, &rst);
    // The client retransmits: the socket is gone, so the packet goes on as a bare ACK that the
    // server's kernel answers with a RST, which passes and tells the client.
    let (v, ack) = w.in_b(&d);
    bare_ack(&v, &d, &ack);
    let rst = tcp_packet(w.s, w.c, ISN_S + 1, 0, RST, &[], &[]);
    let (v, seen) = w.out_b(&rst);
    assert!(v.accept && !v.modified && v.reason.is_none(), "{v:?}");
    assert_eq!(seen, rst);
    // Had the server application written, the client would have got a RST instead, then the
    // server's kernel the client kernel's answer.
    let d = w.data_s();
    let (v, rst) = w.out_b(&d);
    reset(&v, &d, &rst);
    let (v, ack) = w.out_b(&d);
    bare_ack(&v, &d, &ack);
    // A second recheck has nothing more to cut.
    assert!(w.b.recheck(w.now).is_empty());
    assert_eq!(w.b.metrics().cut("policy_ingress"), 1);
    assert_eq!(w.b.metrics().rejected("flow_cut"), 4);
}

#[test]
fn egress_change_cuts_the_client_side() {
    let mut w = World::new(Mode::Psk, ALLOW);
    w.connect();
    policy(&mut w.a, EGRESS_DENY);
    let cuts = w.a.recheck(w.now);
    assert_eq!(cuts.len(), 1, "{cuts:?}");
    assert_eq!(cuts[0].reason, CutReason::PolicyEgress);
    assert_eq!(cuts[0].direction, Direction::Egress);
    assert_eq!(cuts[0].conntrack_tuple(), (w.c, w.s));
    assert_eq!(w.a.metrics().cut("policy_egress"), 1);
    // The client application writes: the server gets a RST; the server's answer to an older
    // write reaches the client as a RST.
    let d = w.data_c();
    let (v, rst) = w.out_a(&d);
    reset(&v, &d, &rst);
    let d = w.data_s();
    let (v, rst) = w.in_a(&d);
    reset(&v, &d, &rst);
}

#[test]
fn a_change_that_still_allows_the_flow_cuts_nothing() {
    let mut w = World::new(Mode::Psk, ALLOW);
    w.connect();
    policy(&mut w.b, DB_WEB_AND_API);
    assert!(w.b.recheck(w.now).is_empty());
    assert_eq!(w.b.established_count(), 1);
    // Still lingering as authorized: a queued packet is accepted and marked as before.
    let (v, _) = w.in_b(&w.data_c());
    assert!(v.accept && v.mark_authorized && v.reason.is_none(), "{v:?}");
    assert_eq!(w.b.metrics().cut("policy_ingress"), 0);
}

#[test]
fn a_peer_relabelled_in_the_engine_is_judged_by_its_current_labels() {
    let mut w = World::new(Mode::Psk, ALLOW);
    w.connect();
    // The server's node learns the client pod (same node, or a cluster-wide view): still
    // app=web, nothing to cut.
    w.b.engine_mut().apply_workload(WEB.workload()).unwrap();
    assert!(w.b.recheck(w.now).is_empty());
    // The client pod is relabelled: its token still says app=web, but the server's node knows
    // better and cuts.
    let mut relabelled = WEB.workload();
    relabelled.labels = map(&[("app", "batch")]);
    w.b.engine_mut().apply_workload(relabelled).unwrap();
    let cuts = w.b.recheck(w.now);
    assert_eq!(cuts.len(), 1, "{cuts:?}");
    assert_eq!(cuts[0].reason, CutReason::PolicyIngress);
}

#[test]
fn the_local_workload_relabelled_is_rechecked_with_its_new_labels() {
    let mut w = World::new(Mode::Psk, ALLOW);
    w.connect();
    // db gains a label; a deny-all policy then selects it through that label.
    let mut db = DB.workload();
    db.labels = map(&[("app", "db"), ("tier", "vault")]);
    w.b.engine_mut().apply_workload(db).unwrap();
    assert!(w.b.recheck(w.now).is_empty(), "app=db still admits web");
    policy(
        &mut w.b,
        "
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: vault, namespace: shop}
spec:
  podSelector: {matchLabels: {tier: vault}}
  ingress: []
",
    );
    // A deny-all for tier=vault adds no allow and db's own policy still admits web: NetworkPolicy
    // is additive, so still allowed.
    assert!(w.b.recheck(w.now).is_empty());
    // The label that selected db's admitting policy goes: only the deny-all selects it now.
    let mut db = DB.workload();
    db.labels = map(&[("app", "db2"), ("tier", "vault")]);
    w.b.engine_mut().apply_workload(db).unwrap();
    let cuts = w.b.recheck(w.now);
    assert_eq!(cuts.len(), 1, "{cuts:?}");
}

#[test]
fn ip_only_flows_are_rechecked_on_their_ip() {
    let mut w = World::new(Mode::Psk, IPBLOCK);
    // The client has no agent: the server sees a token-less SYN.
    let syn = tcp_packet(w.c, w.s, ISN_C, 0, SYN, &linux_syn_options(1, 0), &[]);
    let (v, _) = w.in_b(&syn);
    assert!(v.accept, "{v:?}");
    let sa = tcp_packet(
        w.s,
        w.c,
        ISN_S,
        ISN_C + 1,
        SYN_ACK,
        &linux_syn_options(2, 1),
        &[],
    );
    let (v, _) = w.out_b(&sa);
    assert!(v.accept && v.mark_authorized, "{v:?}");
    assert_eq!(w.b.established_count(), 1);
    policy(&mut w.b, DB_OTHER_SUBNET);
    let cuts = w.b.recheck(w.now);
    assert_eq!(cuts.len(), 1, "{cuts:?}");
    assert_eq!(cuts[0].conntrack_tuple(), (w.c, w.s));
}

#[test]
fn a_new_connection_on_a_cut_tuple_starts_afresh() {
    let mut w = World::new(Mode::Psk, ALLOW);
    w.connect();
    policy(&mut w.b, INGRESS_DENY);
    assert_eq!(w.b.recheck(w.now).len(), 1);
    // Policy restored; the client reuses the same port for a new connection.
    policy(&mut w.b, ALLOW);
    w.now += 1_000;
    w.connect();
    assert_eq!(w.b.established_count(), 1);
    let (v, _) = w.in_b(&w.data_c());
    assert!(v.accept && v.mark_authorized && v.reason.is_none(), "{v:?}");
}

#[test]
fn cut_flows_are_reset_only_for_a_bounded_time() {
    let config = ProcessorConfig {
        cut_remember_ms: 60_000,
        ..ProcessorConfig::default()
    };
    let mut w = World::with(Mode::Psk, ALLOW, &WEB, &DB, config);
    w.connect();
    policy(&mut w.b, INGRESS_DENY);
    assert_eq!(w.b.recheck(w.now).len(), 1);
    w.now += 60_001;
    w.b.expire(w.now);
    assert_eq!(w.b.metrics().established(), (0, 0));
    // Much later, an idle connection's first write is dropped as of an unknown flow.
    let (v, _) = w.in_b(&w.data_c());
    assert!(!v.accept);
    assert_eq!(v.reason.as_ref().map(|r| r.as_str()), Some("no_flow_state"));
}

#[test]
fn remembered_flows_are_bounded_oldest_first() {
    let config = ProcessorConfig {
        max_established: 2,
        ..ProcessorConfig::default()
    };
    let mut w = World::with(Mode::Psk, ALLOW, &WEB, &DB, config);
    for port in [40000, 40001, 40002] {
        w.c.set_port(port);
        w.connect();
    }
    assert_eq!(w.b.established_count(), 2);
    assert_eq!(w.b.metrics().established_dropped(), (1, 0));
    policy(&mut w.b, INGRESS_DENY);
    let mut ports: Vec<u16> = w.b.recheck(w.now).iter().map(|c| c.remote.port()).collect();
    ports.sort();
    assert_eq!(
        ports,
        [40001, 40002],
        "the oldest was forgotten and cannot be cut"
    );
    let mut text = String::new();
    w.b.metrics().render_prometheus(&mut text);
    assert!(
        text.contains("tessera_established_evicted_total 1"),
        "{text}"
    );
}

/// web-2, on web's node, keeps opening connections to db, far more than the node remembers.
/// web's one long-lived connection stays remembered (a full table evicts from the workload
/// holding the most), so the egress change that denies web -> db still cuts it.
#[test]
fn a_workload_churning_connections_does_not_take_its_neighbours_flows_out_of_rechecks() {
    let config = ProcessorConfig {
        max_established: 8,
        ..ProcessorConfig::default()
    };
    let mut w = World::with_neighbour(Mode::Psk, ALLOW, config);
    w.connect();
    for port in 41_000..41_100 {
        w.connect_from_neighbour(port);
    }
    assert_eq!(w.a.established_count(), 8);
    assert_eq!(w.a.metrics().established_dropped().0, 100 - 7);
    policy(&mut w.a, EGRESS_DENY);
    let cuts = w.a.recheck(w.now);
    assert_eq!(cuts.len(), 8, "{cuts:?}");
    assert!(
        cuts.iter().any(|c| c.local == w.c && c.remote == w.s),
        "web's own connection is cut: {cuts:?}"
    );
}

#[test]
fn flows_gone_from_conntrack_are_pruned() {
    let mut w = World::new(Mode::Psk, ALLOW);
    for port in [40000, 40001] {
        w.c.set_port(port);
        w.connect();
    }
    assert_eq!(w.b.prune_due(w.now), Some(vec![ID]));
    assert_eq!(
        w.b.prune_due(w.now + 1_000),
        None,
        "not again before the interval"
    );
    // The listing starts after both were authorized and shows only the first.
    let alive = HashSet::from([(Protocol::Tcp, SocketAddr::new(WEB.ip, 40000), w.s)]);
    assert_eq!(w.b.prune(ID, w.now + 1, &alive), 1);
    assert_eq!(w.b.established_count(), 1);
    assert_eq!(w.b.metrics().established_dropped(), (0, 1));
    // A listing that began before a flow was authorized cannot prove it gone.
    w.c.set_port(40002);
    w.now += 5;
    w.connect();
    assert_eq!(w.b.prune(ID, w.now - 1, &HashSet::new()), 1);
    assert_eq!(w.b.established_count(), 1);
    // Removing the workload forgets its flows.
    w.b.remove_workload(ID);
    assert_eq!(w.b.established_count(), 0);
    assert_eq!(w.b.prune_due(w.now + 60_000), None);
}
