#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Flow records in memory (docs/flow-log.md): what each processor records at each decision of
//! each protocol, who it took the peer for and how it knew, which policy decided, the
//! refusals with their reason, the rate limit of denials, and the per-policy counts.

mod common;

use std::net::{IpAddr, SocketAddr};

use common::*;
use datapath::flowlog::{
    FlowLogConfig, FlowRecord, FlowVerdict, IdentitySource, PolicyKind, PolicyRef,
};
use datapath::{EmitMark, Outgoing, Processor, Verdict};
use policy::{Direction, Protocol};

/// db accepts web on 5432; web may reach db on 5432.
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
  - to: [{podSelector: {matchLabels: {app: api}}}]
  - to: [{podSelector: {matchLabels: {app: db}}}]
    ports: [{port: 5432}]
";

/// Record every allowed flow too.
fn sample_all(p: &mut Processor) {
    p.flow_log_mut().set_config(FlowLogConfig {
        allowed_sample: 1,
        ..FlowLogConfig::default()
    });
}

fn drain(p: &mut Processor) -> Vec<FlowRecord> {
    let mut out = Vec::new();
    p.drain_flow_records(&mut out);
    out
}

fn one(p: &mut Processor) -> FlowRecord {
    let mut r = drain(p);
    assert_eq!(r.len(), 1, "{r:#?}");
    r.remove(0)
}

fn rule(ns: &str, name: &str, index: usize) -> PolicyRef {
    PolicyRef {
        kind: PolicyKind::NetworkPolicy,
        namespace: Some(ns.into()),
        name: name.into(),
        tier: None,
        priority: None,
        rule: Some(index),
        action: None,
        fail_closed: false,
        isolated_by: vec![],
    }
}

fn isolated(ns: &str, name: &str) -> PolicyRef {
    PolicyRef {
        rule: None,
        isolated_by: vec![format!("{ns}/{name}")],
        ..rule(ns, name, 0)
    }
}

fn reason(v: &Verdict) -> Option<&'static str> {
    v.reason.as_ref().map(|r| r.as_str())
}

#[test]
fn tcp_records_name_the_rule_and_the_peer_its_token_proved() {
    for (mode, source) in [
        (Mode::Psk, IdentitySource::Psk),
        (Mode::Pki, IdentitySource::Pki),
    ] {
        let mut w = World::new(mode, ALLOW);
        sample_all(&mut w.a);
        sample_all(&mut w.b);
        w.connect();
        // The server: one record, at the ACK (not at the SYN's tentative decision).
        let r = one(&mut w.b);
        assert_eq!(
            (r.v, r.time, r.node.as_str(), r.direction, r.protocol),
            (1, NOW, "node-b", Direction::Ingress, Protocol::Tcp)
        );
        assert_eq!(r.verdict, FlowVerdict::Allowed);
        assert_eq!(r.policy, Some(rule("shop", "db", 0)));
        assert_eq!((r.reason, r.suppressed, r.sample_rate), (None, 0, None));
        let src = &r.source;
        assert_eq!(
            (src.ip, src.port, src.identity, src.node.as_deref()),
            (WEB.ip, Some(40000), source, Some("node-a"))
        );
        assert_eq!(src.pod().as_deref(), Some("shop/web-1"));
        assert_eq!(src.labels, map(&[("app", "web")]));
        let dst = &r.destination;
        assert_eq!(
            (dst.pod().as_deref(), dst.port, dst.identity),
            (Some("shop/db-0"), Some(5432), IdentitySource::Local)
        );
        assert_eq!(dst.labels, map(&[("app", "db")]));
        // The client: one record, at the SYN-ACK, on the server's proven identity (rule 1).
        let r = one(&mut w.a);
        assert_eq!(
            (r.node.as_str(), r.direction),
            ("node-a", Direction::Egress)
        );
        assert_eq!(r.policy, Some(rule("shop", "web", 1)));
        assert_eq!(r.source.identity, IdentitySource::Local);
        assert_eq!(
            (
                r.destination.pod().as_deref(),
                r.destination.identity,
                r.destination.node.as_deref()
            ),
            (Some("shop/db-0"), source, Some("node-b"))
        );
        // Counted once per flow and direction, by policy.
        let b = w.b.flow_log();
        assert_eq!(
            b.verdict_count("shop/db", FlowVerdict::Allowed, Direction::Ingress),
            1
        );
        assert_eq!(b.verdicts().len(), 1, "{:?}", b.verdicts());
        assert_eq!(
            w.a.flow_log()
                .verdict_count("shop/web", FlowVerdict::Allowed, Direction::Egress),
            1
        );
    }
}

#[test]
fn allowed_flows_are_counted_but_not_recorded_unless_sampled() {
    let mut w = World::new(Mode::Psk, ALLOW);
    w.connect();
    assert!(drain(&mut w.a).is_empty() && drain(&mut w.b).is_empty());
    let mut text = String::new();
    w.b.flow_log().render_prometheus(&mut text);
    assert!(
        text.contains("tessera_policy_verdicts_total{policy=\"shop/db\",kind=\"NetworkPolicy\",verdict=\"allowed\",direction=\"ingress\"} 1"),
        "{text}"
    );
    assert!(text.contains("tessera_flow_records_total{result=\"unsampled\"} 0"));
}

#[test]
fn a_syn_denied_on_its_claims_is_recorded_with_the_isolating_policy() {
    let mut w = World::new(Mode::Pki, INGRESS_DENY);
    let (_, syn) = w.out_a(&w.syn());
    let (v, _) = w.in_b(&syn);
    assert_eq!(reason(&v), Some("policy_ingress"));
    let r = one(&mut w.b);
    assert_eq!(r.verdict, FlowVerdict::Denied);
    assert_eq!(r.policy, Some(isolated("shop", "db")));
    assert_eq!(r.reason.as_deref(), Some("policy_ingress"));
    assert_eq!(
        (r.source.pod().as_deref(), r.source.identity),
        (Some("shop/web-1"), IdentitySource::Pki)
    );
    assert!(drain(&mut w.a).is_empty(), "the client decided nothing yet");
    assert_eq!(
        w.b.flow_log()
            .verdict_count("shop/db", FlowVerdict::Denied, Direction::Ingress),
        1
    );
}

#[test]
fn a_client_without_agent_is_recorded_by_its_address() {
    let mut w = World::new(Mode::Psk, IPBLOCK);
    sample_all(&mut w.b);
    // The SYN as the client kernel sends it, without a token.
    let (v, _) = w.in_b(&w.syn());
    assert!(v.accept, "{v:?}");
    let r = one(&mut w.b);
    assert_eq!(r.verdict, FlowVerdict::Allowed);
    assert_eq!(r.policy, Some(rule("shop", "db", 0)));
    assert_eq!(
        (
            r.source.ip,
            r.source.identity,
            r.source.namespace.as_deref()
        ),
        (WEB.ip, IdentitySource::Ip, None)
    );
    let mut w = World::new(Mode::Psk, INGRESS_DENY);
    let (v, _) = w.in_b(&w.syn());
    assert_eq!(reason(&v), Some("policy_ingress"));
    let r = one(&mut w.b);
    assert_eq!(
        (r.verdict, r.source.identity),
        (FlowVerdict::Denied, IdentitySource::Ip)
    );
}

/// Flip the last byte of a packet's token, keeping checksums valid.
fn tamper(p: &[u8]) -> Vec<u8> {
    let seg = datapath::TcpSegment::parse(p).unwrap().unwrap();
    let at = seg.ip_len() - 1;
    let mut q = p.to_vec();
    q[at] ^= 0x01;
    let seg = datapath::TcpSegment::parse(&q).unwrap().unwrap();
    datapath::packet::fix_checksums(&mut q, &seg).unwrap();
    q
}

#[test]
fn a_refused_token_is_recorded_with_its_reason_and_no_identity() {
    let mut w = World::new(Mode::Psk, ALLOW);
    let (_, syn) = w.out_a(&w.syn());
    w.in_b(&syn);
    let (_, sa) = w.out_b(&w.syn_ack());
    // The server's answer, altered on the way: the client's agent refuses it.
    let (v, _) = w.in_a(&tamper(&sa));
    assert_eq!(reason(&v), Some("bad_mac"));
    let r = one(&mut w.a);
    // A refusal's ends are the refused packet's: here arriving at the client (ingress).
    assert_eq!(
        (r.verdict, r.direction, r.reason.as_deref()),
        (FlowVerdict::Denied, Direction::Ingress, Some("bad_mac"))
    );
    assert_eq!(r.policy, None, "no policy was asked");
    assert_eq!(
        (r.source.ip, r.source.port, r.source.identity),
        (DB.ip, Some(5432), IdentitySource::None)
    );
    assert_eq!(
        (r.destination.pod().as_deref(), r.destination.identity),
        (Some("shop/web-1"), IdentitySource::Local)
    );
    assert!(
        r.detail.as_deref().is_some_and(|d| d.contains("MAC")),
        "{:?}",
        r.detail
    );
}

/// Move a captured packet to another client port (fixing checksums), as a replayer would.
fn to_port(p: &[u8], port: u16) -> Vec<u8> {
    let mut q = p.to_vec();
    q[20..22].copy_from_slice(&port.to_be_bytes());
    let seg = datapath::TcpSegment::parse(&q).unwrap().unwrap();
    datapath::packet::fix_checksums(&mut q, &seg).unwrap();
    q
}

#[test]
fn a_replayed_token_is_recorded_as_a_replay() {
    let mut w = World::new(Mode::Psk, ALLOW);
    let (_, syn) = w.out_a(&w.syn());
    w.in_b(&syn);
    let (_, sa) = w.out_b(&w.syn_ack());
    w.in_a(&sa);
    let (_, ack) = w.out_a(&w.ack());
    let (v, _) = w.in_b(&ack);
    assert!(v.mark_authorized, "{v:?}");
    drain(&mut w.b);
    // The captured SYN, from another port, once the handshake completed.
    let (v, _) = w.in_b(&to_port(&syn, 40001));
    assert_eq!(reason(&v), Some("replay"));
    let r = one(&mut w.b);
    assert_eq!(r.reason.as_deref(), Some("replay"));
    assert_eq!(
        (r.source.port, r.source.identity),
        (Some(40001), IdentitySource::None)
    );
}

#[test]
fn denials_are_rate_limited_per_policy_and_the_next_record_counts_the_rest() {
    let mut w = World::new(Mode::Psk, INGRESS_DENY);
    w.b.flow_log_mut().set_config(FlowLogConfig {
        denied_per_second: 1,
        denied_burst: 1,
        ..FlowLogConfig::default()
    });
    for port in 40000..40006 {
        w.port(port);
        let (_, syn) = w.out_a(&w.syn());
        let (v, _) = w.in_b(&syn);
        assert_eq!(reason(&v), Some("policy_ingress"));
    }
    assert_eq!(one(&mut w.b).suppressed, 0);
    w.now += 1000;
    w.port(40010);
    let (_, syn) = w.out_a(&w.syn());
    w.in_b(&syn);
    let r = one(&mut w.b);
    assert_eq!((r.suppressed, r.source.port), (5, Some(40010)));
    // Counted, every one.
    assert_eq!(
        w.b.flow_log()
            .verdict_count("shop/db", FlowVerdict::Denied, Direction::Ingress),
        7
    );
    assert_eq!(w.b.flow_log().stats().suppressed, 5);
}

#[test]
fn the_recorder_holds_a_bounded_number_of_records() {
    let mut w = World::new(Mode::Psk, INGRESS_DENY);
    w.b.flow_log_mut().set_config(FlowLogConfig {
        denied_per_second: 0,
        capacity: 3,
        ..FlowLogConfig::default()
    });
    for port in 40000..40010 {
        w.port(port);
        let (_, syn) = w.out_a(&w.syn());
        w.in_b(&syn);
    }
    assert_eq!(drain(&mut w.b).len(), 3);
    assert_eq!(w.b.flow_log().stats().dropped, 7);
}

#[test]
fn other_protocols_are_recorded_with_the_identity_of_the_address() {
    let mut w = World::new(Mode::Psk, INGRESS_DENY);
    // Node b knows web by its address (a cluster-wide view).
    w.b.engine_mut().apply_workload(WEB.workload()).unwrap();
    let ping = ip_packet(WEB.ip, DB.ip, 1, &[8, 0, 0, 0, 0, 7, 0, 1]);
    let (v, _) = w.in_b(&ping);
    assert_eq!(reason(&v), Some("policy_ingress"));
    let r = one(&mut w.b);
    assert_eq!(
        (r.protocol, r.source.port, r.destination.port),
        (Protocol::ICMP, None, None)
    );
    assert_eq!(
        (r.source.pod().as_deref(), r.source.identity),
        (Some("shop/web-1"), IdentitySource::Ip)
    );
    assert_eq!(r.source.labels, map(&[("app", "web")]));
    assert_eq!(r.policy, Some(isolated("shop", "db")));
    // An address the engine does not know: nothing but the address.
    sample_all(&mut w.a);
    let outside: IpAddr = "192.0.2.7".parse().unwrap();
    let (v, _) = w.out_a(&ip_packet(WEB.ip, outside, 1, &[8, 0, 0, 0, 0, 7, 0, 1]));
    assert!(v.accept && v.mark_authorized, "{v:?}");
    let r = one(&mut w.a);
    assert_eq!(
        (
            r.destination.ip,
            r.destination.identity,
            r.destination.workload.as_deref()
        ),
        (outside, IdentitySource::Ip, None)
    );
    assert_eq!(
        r.policy.map(|p| (p.kind, p.name)),
        Some((PolicyKind::Default, "not_isolated".into()))
    );
}

#[test]
fn a_spoofed_source_is_recorded_at_the_sender() {
    let mut w = World::new(Mode::Psk, ALLOW);
    let spoofed = SocketAddr::new("10.0.1.99".parse().unwrap(), 40000);
    let (v, _) = w.out_a(&udp(spoofed, w.s, b"x"));
    assert_eq!(reason(&v), Some("spoofed_source"));
    let r = one(&mut w.a);
    assert_eq!(
        (r.direction, r.reason.as_deref(), r.source.ip),
        (Direction::Egress, Some("spoofed_source"), spoofed.ip())
    );
    assert_eq!(
        (r.source.pod().as_deref(), r.source.identity),
        (Some("shop/web-1"), IdentitySource::Local)
    );
}

fn take(p: &mut Processor) -> Vec<Outgoing> {
    p.take_outgoing()
}

fn consumed(v: &Verdict) -> bool {
    !v.accept && v.reason.is_none()
}

#[test]
fn a_udp_handshake_is_recorded_by_both_agents_once() {
    let mut w = World::new(Mode::Pki, DB_UDP_FROM_WEB);
    sample_all(&mut w.a);
    sample_all(&mut w.b);
    let (v, _) = w.out_a(&udp(w.c, w.s, b"x"));
    assert!(consumed(&v));
    let syn = take(&mut w.a).remove(0);
    let (v, _) = w.in_b(&syn.packet);
    assert!(consumed(&v));
    assert!(
        drain(&mut w.b).is_empty(),
        "the SYN's decision is tentative"
    );
    let synack = take(&mut w.b).remove(0);
    let (v, _) = w.in_a(&synack.packet);
    assert!(consumed(&v));
    let r = one(&mut w.a);
    assert_eq!(
        (
            r.direction,
            r.protocol,
            r.destination.port,
            r.destination.identity
        ),
        (
            Direction::Egress,
            Protocol::Udp,
            Some(5432),
            IdentitySource::Pki
        )
    );
    assert_eq!(r.policy.map(|p| p.name), Some("not_isolated".into()));
    let ack = take(&mut w.a).remove(0);
    assert_eq!(ack.mark, EmitMark::Control);
    let (v, _) = w.in_b(&ack.packet);
    assert!(consumed(&v));
    let r = one(&mut w.b);
    assert_eq!(
        (
            r.direction,
            r.verdict,
            r.source.identity,
            r.source.node.as_deref()
        ),
        (
            Direction::Ingress,
            FlowVerdict::Allowed,
            IdentitySource::Pki,
            Some("node-a")
        )
    );
    assert_eq!(r.policy, Some(rule("shop", "db", 0)));
}

#[test]
fn a_udp_refusal_is_recorded_by_the_server_with_its_policy_and_by_the_client_as_refused() {
    let mut w = World::new(Mode::Psk, INGRESS_DENY);
    w.out_a(&udp(w.c, w.s, b"x"));
    let syn = take(&mut w.a).remove(0);
    let (v, _) = w.in_b(&syn.packet);
    assert_eq!(reason(&v), Some("policy_ingress"));
    let r = one(&mut w.b);
    assert_eq!(
        (r.protocol, r.policy.clone(), r.source.identity),
        (
            Protocol::Udp,
            Some(isolated("shop", "db")),
            IdentitySource::Psk
        )
    );
    let refused = take(&mut w.b).remove(0);
    let (v, _) = w.in_a(&refused.packet);
    assert_eq!(reason(&v), Some("udp_refused"));
    let r = one(&mut w.a);
    assert_eq!(
        (r.direction, r.reason.as_deref(), r.policy),
        (Direction::Ingress, Some("udp_refused"), None)
    );
}

#[test]
fn a_cut_flow_is_recorded_with_the_policy_that_cuts_it() {
    let mut w = World::new(Mode::Psk, ALLOW);
    w.connect();
    let parsed = policy::objects::parse("change.yaml", INGRESS_DENY);
    assert!(
        policy::objects::load(w.b.engine_mut(), &parsed.objects)
            .errors
            .is_empty()
    );
    w.now += 5;
    assert_eq!(w.b.recheck(w.now).len(), 1);
    let r = one(&mut w.b);
    assert_eq!(
        (r.time, r.verdict, r.reason.as_deref()),
        (w.now, FlowVerdict::Denied, Some("flow_cut"))
    );
    assert_eq!(r.policy, Some(isolated("shop", "db")));
    assert_eq!(r.source.pod().as_deref(), Some("shop/web-1"));
    // A re-check is no new flow: not counted as a verdict.
    assert_eq!(
        w.b.flow_log()
            .verdict_count("shop/db", FlowVerdict::Denied, Direction::Ingress),
        0
    );
}

#[test]
fn recording_can_be_turned_off_and_counting_stays() {
    let mut w = World::new(Mode::Psk, INGRESS_DENY);
    for p in [&mut w.a, &mut w.b] {
        p.flow_log_mut().set_config(FlowLogConfig {
            records: false,
            ..FlowLogConfig::default()
        });
    }
    for port in [40000, 40001] {
        w.port(port);
        let (_, syn) = w.out_a(&w.syn());
        w.in_b(&syn);
    }
    let spoofed = SocketAddr::new("10.0.1.99".parse().unwrap(), 40000);
    let (v, _) = w.out_a(&udp(spoofed, w.s, b"x"));
    assert_eq!(reason(&v), Some("spoofed_source"));
    assert!(drain(&mut w.a).is_empty() && drain(&mut w.b).is_empty());
    assert_eq!(
        w.b.flow_log()
            .verdict_count("shop/db", FlowVerdict::Denied, Direction::Ingress),
        2
    );
}

/// Audit mode: the SYN the policy denies goes through, the handshake completes, and the flow
/// record says denied, by which policy, marked `audit`; the verdict counts say denied too.
/// Authentication still applies: a tampered token is refused as in enforce mode.
#[test]
fn audit_mode_records_denials_and_applies_none() {
    let audit = datapath::ProcessorConfig {
        audit: true,
        ..datapath::ProcessorConfig::default()
    };
    let mut w = World::with(Mode::Pki, INGRESS_DENY, &WEB, &DB, audit);
    w.connect();
    let records = drain(&mut w.b);
    let denied: Vec<&FlowRecord> = records
        .iter()
        .filter(|r| r.verdict == FlowVerdict::Denied)
        .collect();
    assert!(!denied.is_empty(), "{records:#?}");
    for r in &denied {
        assert!(r.audit, "{r:#?}");
        assert_eq!(r.policy, Some(isolated("shop", "db")));
    }
    let line = serde_json::to_string(denied[0]).unwrap();
    assert!(line.contains("\"audit\":true"), "{line}");
    assert!(
        w.b.flow_log()
            .verdict_count("shop/db", FlowVerdict::Denied, Direction::Ingress)
            >= 1
    );
    // Nothing to cut: a re-check in audit mode applies no denial.
    assert!(w.b.recheck(NOW).is_empty());

    let mut w = World::with(Mode::Psk, ALLOW, &WEB, &DB, audit);
    let (_, syn) = w.out_a(&w.syn());
    w.in_b(&syn);
    let (_, sa) = w.out_b(&w.syn_ack());
    let (v, _) = w.in_a(&tamper(&sa));
    assert_eq!(
        reason(&v),
        Some("bad_mac"),
        "a tampered token passed in audit mode"
    );
    assert!(!v.accept);
}

/// One NetworkPolicy object of YAML (`metadata` and `spec` lines).
fn np_object(body: &str) -> policy::objects::Object {
    let text = format!("apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\n{body}");
    let mut parsed = policy::objects::parse("test", &text);
    assert!(parsed.errors.is_empty(), "{:?}", parsed.errors);
    parsed.objects.remove(0).value
}

/// Staged policies: a staged deny of an allowed flow changes nothing on the wire, and the flow
/// is recorded (allowed flows are not sampled here: the flip alone makes the record) with the
/// verdict the staged set would give; the flips are counted per staged policy; a flow the
/// staged set decides alike is not recorded for it. A staged allow of a denied flow shows on
/// the denial's record.
#[test]
fn staged_policies_show_their_verdict_and_enforce_nothing() {
    let mut w = World::new(Mode::Psk, ALLOW);
    let staged_deny = np_object(
        "metadata: {name: db, namespace: shop, annotations: {tessera.dev/staged: \"true\"}}
spec: {podSelector: {matchLabels: {app: db}}, policyTypes: [Ingress]}",
    );
    w.b.engine_mut().stage(staged_deny).unwrap();
    w.connect();
    let r = one(&mut w.b);
    assert_eq!(r.verdict, FlowVerdict::Allowed);
    assert_eq!(r.policy, Some(rule("shop", "db", 0)));
    let staged = r.staged.as_ref().unwrap();
    assert_eq!(
        (staged.verdict, &staged.policy),
        (FlowVerdict::Denied, &isolated("shop", "db"))
    );
    let line = serde_json::to_string(&r).unwrap();
    assert!(
        line.contains("\"staged\":{\"verdict\":\"denied\",\"policy\":{\"kind\":\"NetworkPolicy\""),
        "{line}"
    );
    assert!(drain(&mut w.a).is_empty(), "the client stages nothing");
    let mut text = String::new();
    w.b.flow_log().render_prometheus(&mut text);
    assert!(
        text.contains("tessera_staged_verdict_flips_total{policy=\"shop/db\",kind=\"NetworkPolicy\",verdict=\"denied\",direction=\"ingress\"} 1"),
        "{text}"
    );

    // Decided alike by both: nothing recorded (not sampled), nothing counted as a flip.
    let mut w = World::new(Mode::Psk, ALLOW);
    let same = np_object(
        "metadata: {name: db, namespace: shop}
spec: {podSelector: {matchLabels: {app: db}}, ingress: [{from: [{podSelector: {}}]}]}",
    );
    w.b.engine_mut().stage(same).unwrap();
    w.connect();
    assert!(drain(&mut w.b).is_empty());
    let mut text = String::new();
    w.b.flow_log().render_prometheus(&mut text);
    assert!(
        !text.contains("tessera_staged_verdict_flips_total{"),
        "{text}"
    );

    // A staged allow of a denied SYN: the denial's record carries it; the SYN is dropped.
    let mut w = World::new(Mode::Pki, INGRESS_DENY);
    let staged_allow = np_object(
        "metadata: {name: db, namespace: shop}
spec: {podSelector: {matchLabels: {app: db}}, ingress: [{from: [{podSelector: {matchLabels: {app: web}}}]}]}",
    );
    w.b.engine_mut().stage(staged_allow).unwrap();
    let (_, syn) = w.out_a(&w.syn());
    let (v, _) = w.in_b(&syn);
    assert!(!v.accept, "a staged allow was enforced");
    let r = one(&mut w.b);
    assert_eq!(r.verdict, FlowVerdict::Denied);
    let staged = r.staged.as_ref().unwrap();
    assert_eq!(
        (staged.verdict, &staged.policy),
        (FlowVerdict::Allowed, &rule("shop", "db", 0))
    );
}

#[test]
fn a_packet_outside_the_tunnel_is_refused_and_recorded_in_both_directions() {
    let mut w = World::new(Mode::Psk, ALLOW);
    // Node b knows web (another node's pod) by its address.
    w.b.engine_mut().apply_workload(WEB.workload()).unwrap();
    let to_db = udp(
        SocketAddr::new(WEB.ip, 40000),
        SocketAddr::new(DB.ip, 5432),
        b"in clear",
    );
    let v = w.b.refuse_unencrypted(&to_db, w.now);
    assert!(!v.accept, "{v:?}");
    assert_eq!(reason(&v), Some("not_encrypted"));
    let r = one(&mut w.b);
    assert_eq!(
        (
            r.direction,
            r.verdict,
            r.reason.as_deref(),
            r.policy.is_none()
        ),
        (
            Direction::Ingress,
            FlowVerdict::Denied,
            Some("not_encrypted"),
            true
        )
    );
    assert_eq!(
        (r.destination.pod().as_deref(), r.destination.identity),
        (Some("shop/db-0"), IdentitySource::Local)
    );
    assert_eq!(
        (
            r.source.pod().as_deref(),
            r.source.identity,
            r.source.port,
            r.destination.port
        ),
        (
            Some("shop/web-1"),
            IdentitySource::Ip,
            Some(40000),
            Some(5432)
        )
    );
    assert!(
        r.detail.as_deref().unwrap_or("").contains("tunnel"),
        "{r:?}"
    );
    // From our workload: egress, ours is the source.
    let from_db = ip_packet(DB.ip, WEB.ip, 1, &[8, 0, 0, 0, 0, 7, 0, 1]);
    let v = w.b.refuse_unencrypted(&from_db, w.now);
    assert_eq!(reason(&v), Some("not_encrypted"));
    let r = one(&mut w.b);
    assert_eq!(
        (r.direction, r.protocol, r.source.pod().as_deref()),
        (Direction::Egress, Protocol::ICMP, Some("shop/db-0"))
    );
    // Garbage is counted, never recorded, never a panic.
    let v = w.b.refuse_unencrypted(&[0x45, 0, 1], w.now);
    assert!(!v.accept);
    assert!(drain(&mut w.b).is_empty());
    assert_eq!(w.b.metrics().rejected("not_encrypted"), 3);
}
