#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The whole core in memory: two nodes (two Processors), a client workload on node-a and a
//! server workload on node-b, packets built like Linux builds them, driven through
//! client OUTPUT SYN -> server INPUT SYN -> server OUTPUT SYN-ACK -> client INPUT SYN-ACK ->
//! client OUTPUT ACK -> server INPUT ACK -> data. Each test asserts what each kernel would see.

mod common;

use std::net::SocketAddr;

use common::*;
use datapath::{Hook, PacketKind, ProcessorConfig, Reason, Verdict, WorkloadId};
use identity::testing::SeededRng;
use identity::{Config, HandshakeError, Node, Psk};

const DB_PGSQL: Pod = Pod {
    ports: &[("pgsql", 5432)],
    ..DB
};
const WEB6: Pod = Pod {
    ip: std::net::IpAddr::V6(std::net::Ipv6Addr::new(0xfd00, 1, 0, 0, 0, 0, 0, 2)),
    ..WEB
};
const DB6: Pod = Pod {
    ip: std::net::IpAddr::V6(std::net::Ipv6Addr::new(0xfd00, 2, 0, 0, 0, 0, 0, 2)),
    ..DB
};

/// web may reach db on the port named postgres.
const EGRESS_NAMED: &str = "
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

/// Accepted (stripped) with the flow's AUTH bit cleared from the connmark.
fn reopened(v: &Verdict) {
    assert!(
        v.accept && v.modified && v.unmark,
        "expected unmark, got {v:?}"
    );
    assert!(!v.mark_authorized);
    assert_eq!(v.reason, None);
}

/// The packets of one successful handshake as they travelled.
struct Wire {
    syn: Vec<u8>,
    syn_ack: Vec<u8>,
    ack: Vec<u8>,
}

/// Drive the full handshake and check every step.
fn complete(w: &mut World) -> Wire {
    let syn0 = w.syn();
    let (v, syn) = w.out_a(&syn0);
    accepted(&v, true, false);
    assert!(token_of(&syn).is_some(), "SYN leaves with a token");
    assert!(checksums_ok(&syn));
    let (v, seen) = w.in_b(&syn);
    accepted(&v, true, false);
    assert_eq!(
        seen, syn0,
        "the server kernel sees exactly the client kernel's SYN"
    );

    let sa0 = w.syn_ack();
    let (v, syn_ack) = w.out_b(&sa0);
    accepted(&v, true, false);
    assert!(token_of(&syn_ack).is_some());
    assert!(checksums_ok(&syn_ack));
    let (v, seen) = w.in_a(&syn_ack);
    accepted(&v, true, false);
    assert_eq!(
        seen, sa0,
        "the client kernel sees exactly the server kernel's SYN-ACK"
    );

    let ack0 = w.ack();
    let (v, ack) = w.out_a(&ack0);
    // The proof leaves: the client's flow is marked at once.
    accepted(&v, true, true);
    assert!(token_of(&ack).is_some());
    assert!(checksums_ok(&ack));
    let (v, seen) = w.in_b(&ack);
    accepted(&v, true, true);
    assert_eq!(
        seen, ack0,
        "the server kernel sees exactly the client kernel's ACK"
    );
    Wire { syn, syn_ack, ack }
}

fn allowed_case(mode: Mode, client: &Pod, server: &Pod) {
    let mut w = World::with(mode, ALLOW, client, server, ProcessorConfig::default());
    complete(&mut w);
    // The server answers: its packet passes (marked: it may still be queued behind the ACK),
    // and the client marks the flow at the server's first packet.
    let d = w.data_s();
    let (v, _) = w.out_b(&d);
    accepted(&v, false, true);
    let (v, seen) = w.in_a(&d);
    accepted(&v, false, true);
    assert_eq!(seen, d);
    let d = w.data_c();
    let (v, _) = w.out_a(&d);
    accepted(&v, false, true);
    let (v, _) = w.in_b(&d);
    accepted(&v, false, true);

    for p in [&w.a, &w.b] {
        assert_eq!(p.metrics().rejected_total(), 0);
        assert_eq!(p.metrics().authorized(), (1, 0));
    }
    let m = w.a.metrics();
    assert_eq!(m.accepted(Hook::Output, PacketKind::Syn), 1);
    assert_eq!(m.accepted(Hook::Input, PacketKind::SynAck), 1);
    assert_eq!(m.accepted(Hook::Output, PacketKind::Ack), 1);
    let m = w.b.metrics();
    assert_eq!(m.accepted(Hook::Input, PacketKind::Syn), 1);
    assert_eq!(m.accepted(Hook::Output, PacketKind::SynAck), 1);
    assert_eq!(m.accepted(Hook::Input, PacketKind::Ack), 1);
}

#[test]
fn allowed_psk_ipv4() {
    allowed_case(Mode::Psk, &WEB, &DB);
}
#[test]
fn allowed_pki_ipv4() {
    allowed_case(Mode::Pki, &WEB, &DB);
}
#[test]
fn allowed_psk_ipv6() {
    allowed_case(Mode::Psk, &WEB6, &DB6);
}
#[test]
fn allowed_pki_ipv6() {
    allowed_case(Mode::Pki, &WEB6, &DB6);
}

#[test]
fn not_isolated_workloads_connect_too() {
    let mut w = World::new(Mode::Psk, "");
    complete(&mut w);
}

#[test]
fn ingress_denied_syn_is_dropped_and_counted() {
    for mode in [Mode::Psk, Mode::Pki] {
        let mut w = World::new(mode, INGRESS_DENY);
        let (_, syn) = w.out_a(&w.syn());
        let (v, _) = w.in_b(&syn);
        assert_eq!(dropped(&v), "policy_ingress");
        assert_eq!(w.b.metrics().rejected("policy_ingress"), 1);
        assert_eq!(w.b.flow_count(), 0, "a denied SYN leaves no state");
        // The retransmitted SYN is denied again (and the same token is not a replay).
        let (_, syn2) = w.out_a(&w.syn());
        assert_eq!(syn2, syn);
        let (v, _) = w.in_b(&syn2);
        assert_eq!(dropped(&v), "policy_ingress");
        assert_eq!(w.b.metrics().rejected("policy_ingress"), 2);
    }
}

#[test]
fn egress_denied_syn_ack_becomes_rst() {
    for mode in [Mode::Psk, Mode::Pki] {
        let mut w = World::new(mode, EGRESS_DENY);
        let (_, syn) = w.out_a(&w.syn());
        let (v, _) = w.in_b(&syn);
        accepted(&v, true, false);
        let (_, sa) = w.out_b(&w.syn_ack());
        let (v, rst) = w.in_a(&sa);
        assert!(v.accept && v.modified && !v.mark_authorized);
        assert_eq!(v.reason, Some(Reason::PolicyEgress));
        assert_eq!(flags(&rst), RST_ACK, "the client kernel gets a RST");
        assert_eq!(ack_number(&rst), ISN_C + 1, "that acknowledges its SYN");
        assert!(checksums_ok(&rst));
        assert!(token_of(&rst).is_none());
        assert_eq!(w.a.metrics().rejected("policy_egress"), 1);
        assert_eq!(w.a.flow_count(), 0);
        // A SYN-ACK retransmitted by the server now finds no flow.
        let (v, _) = w.in_a(&sa);
        assert_eq!(dropped(&v), "no_flow_state");
    }
}

#[test]
fn named_egress_port_matches_the_servers_port_name() {
    // db's 5432 is named postgres: allowed.
    let mut w = World::with(
        Mode::Psk,
        EGRESS_NAMED,
        &WEB,
        &DB,
        ProcessorConfig::default(),
    );
    complete(&mut w);
    // db's 5432 is named pgsql: the name carried in the SYN-ACK does not match.
    let mut w = World::with(
        Mode::Psk,
        EGRESS_NAMED,
        &WEB,
        &DB_PGSQL,
        ProcessorConfig::default(),
    );
    let (_, syn) = w.out_a(&w.syn());
    w.in_b(&syn);
    let (_, sa) = w.out_b(&w.syn_ack());
    let (v, rst) = w.in_a(&sa);
    assert_eq!(v.reason, Some(Reason::PolicyEgress));
    assert_eq!(flags(&rst), RST_ACK);
}

#[test]
fn lost_syn_is_retransmitted_with_the_same_token() {
    let mut w = World::new(Mode::Pki, ALLOW);
    let (_, lost) = w.out_a(&w.syn());
    w.now += 1_000;
    let (v, syn) = w.out_a(&w.syn());
    accepted(&v, true, false);
    assert_eq!(syn, lost, "same token bytes on retransmission");
    assert_eq!(w.a.flow_count(), 1);
    let (v, _) = w.in_b(&syn);
    accepted(&v, true, false);
    let (_, sa) = w.out_b(&w.syn_ack());
    accepted(&w.in_a(&sa).0, true, false);
    let (_, ack) = w.out_a(&w.ack());
    let (v, _) = w.in_b(&ack);
    accepted(&v, true, true);
}

#[test]
fn lost_syn_ack_recovers_through_retransmissions() {
    for mode in [Mode::Psk, Mode::Pki] {
        let mut w = World::new(mode, ALLOW);
        let syn0 = w.syn();
        let (_, syn) = w.out_a(&syn0);
        accepted(&w.in_b(&syn).0, true, false);
        let (_, lost) = w.out_b(&w.syn_ack());
        // The client retransmits its SYN: same token; the server strips and accepts it again
        // without a second verification (which the replay check would not refuse, but would
        // cost), and its kernel answers with the SYN-ACK again: same token.
        w.now += 1_000;
        let (_, syn2) = w.out_a(&syn0);
        assert_eq!(syn2, syn);
        let (v, seen) = w.in_b(&syn2);
        accepted(&v, true, false);
        assert_eq!(seen, syn0);
        let (v, sa) = w.out_b(&w.syn_ack());
        accepted(&v, true, false);
        assert_eq!(sa, lost, "same SYN-ACK token on retransmission");
        accepted(&w.in_a(&sa).0, true, false);
        let (_, ack) = w.out_a(&w.ack());
        accepted(&w.in_b(&ack).0, true, true);
        assert_eq!(w.b.metrics().rejected_total(), 0);
    }
}

#[test]
fn lost_ack_recovers_via_dup_ack_after_syn_ack_retransmission() {
    for mode in [Mode::Psk, Mode::Pki] {
        let mut w = World::new(mode, ALLOW);
        let (_, syn) = w.out_a(&w.syn());
        w.in_b(&syn);
        let (_, sa) = w.out_b(&w.syn_ack());
        w.in_a(&sa);
        let (v, lost_ack) = w.out_a(&w.ack());
        // The client's flow is marked as the proof leaves: its data bypasses userspace (were
        // it queued, it would pass untouched); the server refuses it without the proof.
        accepted(&v, true, true);
        let d = w.data_c();
        let (v, out) = w.out_a(&d);
        accepted(&v, false, true);
        assert_eq!(out, d);
        // It may have overtaken the ACK token on another CPU: it goes back to the queue's tail
        // a bounded number of times, then it is dropped.
        for _ in 0..datapath::processor::MAX_DEFERRALS {
            let (v, _) = w.in_b(&out);
            assert!(
                v.accept && v.requeue && !v.modified && !v.mark_authorized,
                "{v:?}"
            );
        }
        let (v, _) = w.in_b(&out);
        assert_eq!(dropped(&v), "ack_missing");
        assert_eq!(
            w.b.metrics().requeued(),
            u64::from(datapath::processor::MAX_DEFERRALS)
        );
        // The server kernel retransmits the SYN-ACK: same bytes (queued on the client's marked
        // flow: it carries our option); the client strips it again and unmarks its flow.
        w.now += 1_000;
        let sa0 = w.syn_ack();
        let (_, sa2) = w.out_b(&sa0);
        assert_eq!(sa2, sa);
        let (v, seen) = w.in_a(&sa2);
        reopened(&v);
        assert_eq!(seen, sa0);
        // The client kernel answers with a duplicate ACK, queued again: it carries the same
        // ACK token and marks the flow again.
        let ack0 = w.ack();
        let (v, dup) = w.out_a(&ack0);
        accepted(&v, true, true);
        assert_eq!(dup, lost_ack);
        let (v, seen) = w.in_b(&dup);
        accepted(&v, true, true);
        assert_eq!(seen, ack0);
        // The data retransmitted now passes.
        let (v, _) = w.in_b(&d);
        accepted(&v, false, true);
        assert_eq!(w.b.metrics().rejected("ack_missing"), 1);
        assert_eq!(w.b.metrics().authorized(), (1, 0));
    }
}

#[test]
fn late_duplicate_syn_ack_after_authorization_is_stripped_again() {
    let mut w = World::new(Mode::Psk, ALLOW);
    let wire = complete(&mut w);
    accepted(&w.in_a(&w.data_s()).0, false, true);
    // The client cannot tell whether its ACK arrived: it strips the SYN-ACK, unmarks, and its
    // duplicate ACK carries the same token, which the server strips again.
    let (v, seen) = w.in_a(&wire.syn_ack);
    reopened(&v);
    assert_eq!(seen, w.syn_ack());
    let (v, dup) = w.out_a(&w.ack());
    accepted(&v, true, true);
    assert_eq!(dup, wire.ack);
    let (v, seen) = w.in_b(&dup);
    accepted(&v, true, true);
    assert_eq!(seen, w.ack());
    // Any other token on that flow is refused.
    let (v, _) = w.in_a(&tamper(&wire.syn_ack, 40));
    assert_eq!(dropped(&v), "unexpected_token");
}

#[test]
fn duplicate_ack_token_after_authorization_is_stripped_again() {
    let mut w = World::new(Mode::Psk, ALLOW);
    let wire = complete(&mut w);
    let (v, seen) = w.in_b(&wire.ack);
    accepted(&v, true, true);
    assert_eq!(seen, w.ack());
}

/// Flip one token byte of a packet, keeping checksums valid (an attacker on the path would).
fn tamper(p: &[u8], i: usize) -> Vec<u8> {
    let seg = datapath::TcpSegment::parse(p).unwrap().unwrap();
    let len = seg.token_len().unwrap() as usize;
    let at = seg.ip_len() - seg.payload_len() + (i % len);
    let mut q = p.to_vec();
    q[at] ^= 0x01;
    let seg = datapath::TcpSegment::parse(&q).unwrap().unwrap();
    datapath::packet::fix_checksums(&mut q, &seg).unwrap();
    q
}

#[test]
fn tampered_syn_token_never_completes() {
    for mode in [Mode::Psk, Mode::Pki] {
        let probe = {
            let mut w = World::new(mode, ALLOW);
            w.out_a(&w.syn()).1
        };
        let len = token_of(&probe).unwrap().len();
        let step = if mode == Mode::Pki { 7 } else { 1 };
        for i in (0..len).step_by(step) {
            let mut w = World::new(mode, ALLOW);
            let (_, syn) = w.out_a(&w.syn());
            assert_eq!(syn, probe, "deterministic nonces");
            let (v, _) = w.in_b(&tamper(&syn, i));
            if !v.accept {
                // Refused at the SYN already (format, key, time, or policy on altered labels).
                dropped(&v);
                continue;
            }
            // Accepted tentatively: the SYN-ACK's MAC covers the SYN, so the client refuses it.
            let (_, sa) = w.out_b(&w.syn_ack());
            let (v, _) = w.in_a(&sa);
            assert_eq!(dropped(&v), "bad_mac", "byte {i}");
            assert_eq!(w.b.metrics().authorized(), (0, 0));
        }
    }
}

#[test]
fn tampered_syn_ack_token_is_dropped_and_the_genuine_one_still_works() {
    for mode in [Mode::Psk, Mode::Pki] {
        let mut w = World::new(mode, ALLOW);
        let (_, syn) = w.out_a(&w.syn());
        w.in_b(&syn);
        let (_, sa) = w.out_b(&w.syn_ack());
        let len = token_of(&sa).unwrap().len();
        let step = if mode == Mode::Pki { 5 } else { 1 };
        for i in (0..len).step_by(step) {
            let (v, _) = w.in_a(&tamper(&sa, i));
            dropped(&v);
        }
        assert!(w.a.metrics().rejected_total() > 0);
        accepted(&w.in_a(&sa).0, true, false);
        let (_, ack) = w.out_a(&w.ack());
        accepted(&w.in_b(&ack).0, true, true);
    }
}

#[test]
fn tampered_ack_token_is_dropped_and_the_genuine_one_still_works() {
    for mode in [Mode::Psk, Mode::Pki] {
        let mut w = World::new(mode, ALLOW);
        let (_, syn) = w.out_a(&w.syn());
        w.in_b(&syn);
        let (_, sa) = w.out_b(&w.syn_ack());
        w.in_a(&sa);
        let (_, ack) = w.out_a(&w.ack());
        let len = token_of(&ack).unwrap().len();
        for i in 0..len {
            let (v, _) = w.in_b(&tamper(&ack, i));
            let reason = dropped(&v);
            if i >= 4 {
                assert_eq!(reason, "bad_mac", "byte {i}");
            }
        }
        assert_eq!(w.b.metrics().authorized(), (0, 0));
        accepted(&w.in_b(&ack).0, true, true);
    }
}

#[test]
fn replayed_syn_is_refused() {
    for mode in [Mode::Psk, Mode::Pki] {
        let mut w = World::new(mode, ALLOW);
        let wire = complete(&mut w);
        // Same flow, same bytes, after the handshake completed.
        let (v, _) = w.in_b(&wire.syn);
        assert_eq!(dropped(&v), "replay");
        // Another source port.
        let (v, _) = w.in_b(&to_port(&wire.syn, 40001, true));
        assert_eq!(dropped(&v), "replay");
        // After every flow expired.
        w.now += 60_000;
        w.b.expire(w.now);
        assert_eq!(w.b.flow_count(), 0);
        let (v, _) = w.in_b(&wire.syn);
        assert_ne!(dropped(&v), "", "still refused");
        assert_eq!(w.b.metrics().authorized(), (1, 0));
    }
}

#[test]
fn replayed_ack_is_refused() {
    for mode in [Mode::Psk, Mode::Pki] {
        // The second connection must take the three tokens too.
        let plain = ProcessorConfig {
            bound_handshake: false,
            ..ProcessorConfig::default()
        };
        let mut w = World::with(mode, ALLOW, &WEB, &DB, plain);
        let wire = complete(&mut w);
        // A second connection from another port reaches "awaiting ACK" on the server.
        w.port(40001);
        let (_, syn) = w.out_a(&w.syn());
        accepted(&w.in_b(&syn).0, true, false);
        let (_, sa) = w.out_b(&w.syn_ack());
        accepted(&w.in_a(&sa).0, true, false);
        // The first connection's ACK, moved onto it, does not prove anything.
        let (v, _) = w.in_b(&to_port(&wire.ack, 40001, true));
        assert_eq!(dropped(&v), "bad_mac");
        // The genuine one does.
        let (_, ack) = w.out_a(&w.ack());
        accepted(&w.in_b(&ack).0, true, true);
        // Once the first flow is forgotten, its ACK finds no state.
        w.now += 60_000;
        w.b.expire(w.now);
        let (v, _) = w.in_b(&wire.ack);
        assert_eq!(dropped(&v), "no_flow_state");
        assert_eq!(w.b.metrics().authorized(), (2, 0));
    }
}

/// The server's end forgot an established connection (its workload restarted with the same
/// address, or the flow's conntrack entry and AUTH mark went after our state's linger): the
/// client's next segment reaches the server's agent, which passes none of it and answers with
/// the RST the client's kernel takes at once (at the sequence number the client acknowledged),
/// instead of leaving the client to retransmit into silence. When the client's end forgot it,
/// its own socket gets the RST. Forged segments get the same answer, at most
/// `UNKNOWN_FLOW_ANSWERS_PER_SECOND` a second.
#[test]
fn a_segment_of_a_connection_the_server_forgot_is_answered_with_a_reset() {
    let mut w = World::new(Mode::Psk, ALLOW);
    w.connect();
    w.now += 60_000;
    w.a.expire(w.now);
    w.b.expire(w.now);
    let (v, _) = w.in_b(&w.data_c());
    assert_eq!(dropped(&v), "no_flow_state");
    let out = w.b.take_outgoing();
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].mark, datapath::EmitMark::Control);
    let rst = &out[0].packet;
    let r = datapath::TcpSegment::parse(rst).unwrap().unwrap();
    assert_eq!((r.src_port, r.dst_port), (w.s.port(), w.c.port()));
    assert_eq!((r.flags, r.seq), (RST, ISN_S + 1));
    assert!(checksums_ok(rst));
    // The client's kernel takes it: a RST, which the client's agent lets in.
    let (v, _) = w.in_a(rst);
    assert!(v.accept, "{v:?}");

    // The client's end forgot it too: its next segment is not passed, and its own socket gets
    // the RST (to its address, through the loopback).
    let (v, _) = w.out_a(&w.data_c());
    assert_eq!(dropped(&v), "no_flow_state");
    let out = w.a.take_outgoing();
    assert_eq!(out.len(), 1);
    let r = datapath::TcpSegment::parse(&out[0].packet)
        .unwrap()
        .unwrap();
    assert_eq!((r.src, r.dst), (w.s.ip(), w.c.ip()));
    assert_eq!((r.src_port, r.dst_port), (w.s.port(), w.c.port()));
    assert_eq!((r.flags, r.seq), (RST, ISN_S + 1));
    // Never to an address that is not the workload's: an IPv6 link-local source passes the
    // source check, and the answer would go to that host.
    let link_local: SocketAddr = "[fe80::1]:40000".parse().unwrap();
    let server6: SocketAddr = "[fd00:2::2]:5432".parse().unwrap();
    let p = tcp_packet(link_local, server6, 7, 9, ACK, &[], &[]);
    let (v, _) = w.out_a(&p);
    assert_eq!(dropped(&v), "no_flow_state");
    assert!(w.a.take_outgoing().is_empty());

    // A flood of forged segments: answered up to the budget of the second, then not.
    let budget = datapath::processor::UNKNOWN_FLOW_ANSWERS_PER_SECOND;
    w.now = (w.now / 1_000 + 1) * 1_000;
    for port in 0..budget + 10 {
        let mut c = w.c;
        c.set_port(10_000 + port as u16);
        let p = tcp_packet(c, w.s, 7, 9, ACK, &[], &[]);
        let (v, _) = w.in_b(&p);
        assert_eq!(dropped(&v), "no_flow_state");
    }
    assert_eq!(w.b.take_outgoing().len(), budget as usize);
}

/// A SYN-ACK on a tuple the client's agent holds no handshake for (the agent restarted with
/// the handshake in flight, a full table evicted it, or the client workload is gone) is
/// dropped and answered with the RST the client's kernel sends for a SYN-ACK no socket of it
/// waits for, so the server drops its half-open connection at once. Dropped silently, the
/// server's kernel re-sent its SYN-ACK into silence for about a minute when nobody would
/// take it. A client kernel that still waits re-sends its SYN, which makes a new handshake
/// either way.
#[test]
fn a_syn_ack_the_client_does_not_know_is_answered_with_a_reset() {
    let mut w = World::new(Mode::Psk, ALLOW);
    let (v, syn) = w.out_a(&w.syn());
    assert!(v.accept, "{v:?}");
    let (v, _) = w.in_b(&syn);
    assert!(v.accept, "{v:?}");
    let (v, syn_ack) = w.out_b(&w.syn_ack());
    assert!(v.accept, "{v:?}");
    // The client's agent restarts: it holds nothing of the handshake.
    w.a = World::new(Mode::Psk, ALLOW).a;
    let (v, _) = w.in_a(&syn_ack);
    assert_eq!(dropped(&v), "no_flow_state");
    let out = w.a.take_outgoing();
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].mark, datapath::EmitMark::Control);
    let rst = &out[0].packet;
    let r = datapath::TcpSegment::parse(rst).unwrap().unwrap();
    assert_eq!((r.src, r.dst), (w.c.ip(), w.s.ip()));
    assert_eq!((r.src_port, r.dst_port), (w.c.port(), w.s.port()));
    // At the sequence number the SYN-ACK acknowledged, as the kernel answers it.
    assert_eq!((r.flags, r.seq), (RST, ISN_C + 1));
    assert!(checksums_ok(rst));
    // The server's agent lets it in (its kernel drops the half-open connection) and forgets
    // the flow.
    let (v, _) = w.in_b(rst);
    assert!(v.accept, "{v:?}");
    // The client kernel's next SYN: a new handshake, which completes.
    w.connect();
    assert_eq!(w.b.metrics().authorized(), (1, 0));
}

#[test]
fn forged_packets_are_refused_and_counted() {
    let mut w = World::new(Mode::Psk, ALLOW);
    // A SYN-ACK for a connection the client never opened.
    let (v, _) = w.in_a(&w.syn_ack());
    assert_eq!(dropped(&v), "no_flow_state");
    // An ACK carrying some token, for a flow the server never saw.
    let mut forged_ack = w.ack();
    let seg = datapath::TcpSegment::parse(&forged_ack).unwrap().unwrap();
    datapath::packet::attach_token(&mut forged_ack, &seg, &[1u8; 36]).unwrap();
    let (v, _) = w.in_b(&forged_ack);
    assert_eq!(dropped(&v), "no_flow_state");
    // A SYN whose token is garbage.
    let mut forged_syn = w.syn();
    let seg = datapath::TcpSegment::parse(&forged_syn).unwrap().unwrap();
    datapath::packet::attach_token(&mut forged_syn, &seg, &[0x5a; 120]).unwrap();
    let (v, _) = w.in_b(&forged_syn);
    assert!(matches!(v.reason, Some(Reason::Handshake(_))), "{v:?}");
    // A SYN from a node with another pre-shared key.
    let rogue = Node::new_psk(
        "node-x",
        Psk::new(b"another-key-0123456789-abcdefghij").unwrap(),
        Config::default(),
    )
    .unwrap();
    let mut r = processor(rogue, NS, &[&WEB], ProcessorConfig::default());
    let (_, rogue_syn) = run(&mut r, ID, Hook::Output, &w.syn(), w.now, &mut w.rng);
    let (v, _) = w.in_b(&rogue_syn);
    assert_eq!(
        v.reason,
        Some(Reason::Handshake(HandshakeError::PskMismatch))
    );
    // The workload itself trying to send our option.
    let (v, _) = w.out_a(&forged_syn);
    assert_eq!(dropped(&v), "option_from_workload");
    // A corrupted packet the kernel marked checksum-ready.
    let (_, syn) = w.out_a(&w.syn());
    let mut bad = syn.clone();
    let n = bad.len();
    bad[n - 1] ^= 0xff;
    let (v, _) = w.in_b(&bad);
    assert_eq!(dropped(&v), "bad_checksum");
    // Unknown workload id.
    let mut p = w.syn();
    let v =
        w.b.process(WorkloadId(99), Hook::Input, &mut p, true, w.now, &mut w.rng);
    assert_eq!(dropped(&v), "unknown_workload");
    // Not a packet at all.
    let mut junk = vec![0x45, 0, 0];
    let v =
        w.b.process(ID, Hook::Input, &mut junk, true, w.now, &mut w.rng);
    assert_eq!(dropped(&v), "truncated_packet");
    let m = w.b.metrics();
    for reason in [
        "no_flow_state",
        "psk_mismatch",
        "bad_checksum",
        "unknown_workload",
        "truncated_packet",
    ] {
        assert_eq!(m.rejected(reason), 1, "{reason}");
    }
    assert_eq!(m.authorized(), (0, 0));
}

#[test]
fn pki_token_from_an_untrusted_ca_is_refused() {
    let mut w = World::new(Mode::Pki, ALLOW);
    let (rogue, _) = nodes(Mode::Pki, "another-ca");
    let mut r = processor(rogue, NS, &[&WEB], ProcessorConfig::default());
    let (_, rogue_syn) = run(&mut r, ID, Hook::Output, &w.syn(), w.now, &mut w.rng);
    let (v, _) = w.in_b(&rogue_syn);
    assert!(
        matches!(
            v.reason,
            Some(Reason::Handshake(HandshakeError::UnknownKey(_)))
        ),
        "{v:?}"
    );
}

#[test]
fn syn_ack_answering_another_flow_is_refused() {
    let mut w = World::new(Mode::Psk, ALLOW);
    let (_, syn1) = w.out_a(&w.syn());
    w.port(40001);
    let (_, syn2) = w.out_a(&w.syn());
    w.in_b(&syn2);
    let (_, sa2) = w.out_b(&w.syn_ack());
    // The server's genuine SYN-ACK for flow 2, moved onto flow 1.
    w.port(40000);
    let _ = syn1;
    let (v, _) = w.in_a(&to_port(&sa2, 40000, false));
    assert_eq!(dropped(&v), "bad_mac");
}

#[test]
fn tokenless_syn_is_an_ip_only_peer() {
    // A client without agent inside the ipBlock: accepted, authorized when the SYN-ACK leaves.
    let mut w = World::new(Mode::Psk, IPBLOCK);
    let syn0 = w.syn();
    let (v, seen) = w.in_b(&syn0);
    accepted(&v, false, false);
    assert_eq!(seen, syn0);
    let (v, sa) = w.out_b(&w.syn_ack());
    accepted(&v, false, true);
    assert!(token_of(&sa).is_none(), "no token for a peer without agent");
    let (v, _) = w.in_b(&w.ack());
    accepted(&v, false, true);
    assert_eq!(w.b.metrics().authorized(), (0, 1));
    // Pod selectors never match an IP-only peer.
    let mut w = World::new(Mode::Psk, ALLOW);
    let (v, _) = w.in_b(&w.syn());
    assert_eq!(dropped(&v), "policy_ingress");
}

#[test]
fn token_carrying_syn_to_a_server_without_agent() {
    // The plain server ignores option and SYN payload and answers without token.
    let mut w = World::new(Mode::Psk, IPBLOCK);
    let (_, syn) = w.out_a(&w.syn());
    assert!(token_of(&syn).is_some());
    let sa0 = w.syn_ack();
    let (v, seen) = w.in_a(&sa0);
    accepted(&v, false, true);
    assert_eq!(seen, sa0);
    assert_eq!(w.a.metrics().authorized(), (0, 1));
    // Outside the ipBlock (only pod selectors allowed): refused with a RST.
    let mut w = World::new(Mode::Psk, ALLOW);
    w.out_a(&w.syn());
    let (v, rst) = w.in_a(&w.syn_ack());
    assert_eq!(v.reason, Some(Reason::PolicyEgress));
    assert_eq!(flags(&rst), RST_ACK);
}

/// With ALLOW: db also accepts anyone at all on 80, a public port, which a flood of spoofed,
/// token-less SYNs passes.
const PUBLIC_80: &str = "
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: db-public, namespace: shop}
spec:
  podSelector: {matchLabels: {app: db}}
  ingress:
  - from: [{ipBlock: {cidr: 0.0.0.0/0}}]
    ports: [{port: 80}]
";

/// Rewrite an IPv4 TCP packet's addresses and ports, with valid checksums again.
fn set_addresses(p: &mut Vec<u8>, src: SocketAddr, dst: SocketAddr) {
    let (SocketAddr::V4(src), SocketAddr::V4(dst)) = (src, dst) else {
        panic!("IPv4 only");
    };
    p[12..16].copy_from_slice(&src.ip().octets());
    p[16..20].copy_from_slice(&dst.ip().octets());
    let ihl = usize::from(p[0] & 0xf) * 4;
    p[ihl..ihl + 2].copy_from_slice(&src.port().to_be_bytes());
    p[ihl + 2..ihl + 4].copy_from_slice(&dst.port().to_be_bytes());
    let seg = datapath::TcpSegment::parse(p).unwrap().unwrap();
    datapath::packet::fix_checksums(p, &seg).unwrap();
    assert!(checksums_ok(p));
}

/// The table's bound in the flood tests below.
const FLOOD_MAX_FLOWS: usize = 64;

/// One flood SYN reaching the server's node, answered by its kernel (SYN cookies answer every
/// SYN): the flow that the agent then holds is the flood's. `tokened`: the SYN carries a
/// genuine-looking token (claims `app: web`, a fresh nonce) that never gets its ACK, which
/// anyone who has seen one SYN on the wire can make (the SYN is not MACed); otherwise a bare
/// SYN to the public port 80. Both pass ingress.
fn flood_syn(w: &mut World, source: &mut World, n: u32) {
    let c = SocketAddr::new(
        std::net::Ipv4Addr::new(203, 0, 113, (n % 250) as u8 + 1).into(),
        1024 + (n % 60_000) as u16,
    );
    let tokened = n.is_multiple_of(2);
    let s = if tokened {
        w.s
    } else {
        SocketAddr::new(w.s.ip(), 80)
    };
    let syn = if tokened {
        // Made by a node with the client's key, whose state is thrown away.
        source.port(c.port());
        let (v, mut p) = source.out_a(&source.syn());
        assert!(v.accept, "{v:?}");
        // Moved to the flood's own addresses (tokens do not bind them).
        set_addresses(&mut p, c, s);
        p
    } else {
        tcp_packet(c, s, ISN_C, 0, SYN, &linux_syn_options(1, 0), &[])
    };
    let (v, _) = w.in_b(&syn);
    assert!(v.accept, "the flood passes ingress: {v:?}");
    let syn_ack = tcp_packet(
        s,
        c,
        ISN_S,
        ISN_C + 1,
        SYN_ACK,
        &linux_syn_options(2, 1),
        &[],
    );
    let (v, _) = w.out_b(&syn_ack);
    assert!(v.accept, "{v:?}");
}

#[test]
fn a_flood_of_syns_that_pass_ingress_does_not_lock_the_node_out() {
    for mode in [Mode::Psk, Mode::Pki] {
        let config = ProcessorConfig {
            max_flows: FLOOD_MAX_FLOWS,
            ..ProcessorConfig::default()
        };
        let policies = format!("{ALLOW}{PUBLIC_80}");
        let mut w = World::with(mode, &policies, &WEB, &DB, config);
        let mut source = World::with(mode, &policies, &WEB, &DB, ProcessorConfig::default());
        // Nonces of its own: the flood's SYNs must not repeat the genuine client's.
        source.rng = SeededRng::new(b"flood source");
        // Ten times the table's bound, within a second: nothing has expired.
        let mut n = 0;
        for _ in 0..10 * FLOOD_MAX_FLOWS {
            flood_syn(&mut w, &mut source, n);
            n += 1;
        }
        assert!(w.b.flow_count() <= FLOOD_MAX_FLOWS);
        // A genuine client still connects, while the flood goes on between its packets: with
        // the three tokens, then bound (the first connection taught node-a the server's node).
        for port in [41000, 41001, 41002] {
            let bound = port != 41000;
            w.port(port);
            let (v, syn) = w.out_a(&w.syn());
            accepted(&v, true, false);
            let (v, _) = w.in_b(&syn);
            accepted(&v, true, false);
            for _ in 0..FLOOD_MAX_FLOWS / 4 {
                flood_syn(&mut w, &mut source, n);
                n += 1;
            }
            let (v, syn_ack) = w.out_b(&w.syn_ack());
            accepted(&v, true, bound);
            let (v, _) = w.in_a(&syn_ack);
            accepted(&v, true, bound);
            if bound {
                continue;
            }
            let (v, ack) = w.out_a(&w.ack());
            accepted(&v, true, true);
            for _ in 0..FLOOD_MAX_FLOWS / 4 {
                flood_syn(&mut w, &mut source, n);
                n += 1;
            }
            let (v, _) = w.in_b(&ack);
            accepted(&v, true, true);
        }
        assert_eq!(w.b.metrics().rejected("flow_table_full"), 0);
        assert!(w.b.metrics().flows_evicted() > 0);
        assert!(w.b.flow_count() <= FLOOD_MAX_FLOWS);
    }
}

/// A full table makes room rather than refuse: from the flows of the workload that filled it
/// (here the client's own, on node-a), and from the unproven server-side flows (on node-b).
/// Which flows go when is `flow::Evictor`'s (its unit tests cover the refusal, when eight or
/// more workloads hold the table between them); the floods below show it under load.
/// A compromised workload (web-2) sends SYNs without end to private addresses that never
/// answer. Each one is a client flow of its own in the table that web-1, on the same node,
/// shares, and a client's flows are not the network's to evict. A full table evicts web-2's
/// own older half, so web-1 keeps connecting.
#[test]
fn a_local_workload_flooding_syns_does_not_lock_its_neighbours_out() {
    for mode in [Mode::Psk, Mode::Pki] {
        let config = ProcessorConfig {
            max_flows: FLOOD_MAX_FLOWS,
            ..ProcessorConfig::default()
        };
        let mut w = World::with_neighbour(mode, ALLOW, config);
        let mut n = 0u32;
        let mut flood = |w: &mut World, count: usize| {
            for _ in 0..count {
                let src = SocketAddr::new(WEB_2.ip, 1024 + (n % 60_000) as u16);
                let dst = SocketAddr::new(
                    std::net::Ipv4Addr::new(10, 9, (n / 250 % 250) as u8, (n % 250) as u8 + 1)
                        .into(),
                    443,
                );
                let syn = tcp_packet(src, dst, ISN_C, 0, SYN, &linux_syn_options(1, 0), &[]);
                let (v, out) = w.out_a2(&syn);
                accepted(&v, true, false);
                assert!(token_of(&out).is_some(), "a SYN of web-2's, with its token");
                n += 1;
            }
        };
        flood(&mut w, 10 * FLOOD_MAX_FLOWS);
        assert!(w.a.flow_count() <= FLOOD_MAX_FLOWS);
        // web-1 connects, while the flood goes on between its packets: with the three tokens,
        // then bound.
        for port in [41000, 41001, 41002] {
            let bound = port != 41000;
            w.port(port);
            let (v, syn) = w.out_a(&w.syn());
            accepted(&v, true, false);
            flood(&mut w, FLOOD_MAX_FLOWS / 4);
            let (v, _) = w.in_b(&syn);
            accepted(&v, true, false);
            let (v, syn_ack) = w.out_b(&w.syn_ack());
            accepted(&v, true, bound);
            flood(&mut w, FLOOD_MAX_FLOWS / 4);
            let (v, _) = w.in_a(&syn_ack);
            accepted(&v, true, bound);
            if bound {
                continue;
            }
            let (v, ack) = w.out_a(&w.ack());
            accepted(&v, true, true);
            let (v, _) = w.in_b(&ack);
            accepted(&v, true, true);
        }
        assert_eq!(w.a.metrics().rejected("flow_table_full"), 0);
        assert!(w.a.metrics().flows_evicted_from_workloads() > 0);
        assert!(w.a.flow_count() <= FLOOD_MAX_FLOWS);
    }
}

#[test]
fn a_full_flow_table_evicts_the_older_half_of_the_flows_that_fill_it() {
    let config = ProcessorConfig {
        max_flows: 2,
        ..ProcessorConfig::default()
    };
    let mut w = World::with(Mode::Psk, ALLOW, &WEB, &DB, config);
    for port in [40000, 40001] {
        w.port(port);
        accepted(&w.out_a(&w.syn()).0, true, false);
    }
    // The client's workload holds the whole table: its next SYN costs it its oldest handshake.
    w.port(40002);
    accepted(&w.out_a(&w.syn()).0, true, false);
    assert_eq!(w.a.flow_count(), 2);
    assert_eq!(w.a.metrics().flows_evicted_from_workloads(), 1);
    // A retransmission of a held flow still works, with the token it had.
    w.port(40001);
    let (_, first) = w.out_a(&w.syn());
    let (v, again) = w.out_a(&w.syn());
    accepted(&v, true, false);
    assert_eq!(token_of(&first), token_of(&again));
    // The server's side of unproven handshakes is the network's to open, so a full table makes
    // room by forgetting the older half of them (see
    // `a_flood_of_syns_that_pass_ingress_does_not_lock_the_node_out`): the next SYN is decided
    // (here: a token-less one, which ingress denies).
    for port in [40001, 40002] {
        w.port(port);
        let (_, syn) = w.out_a(&w.syn());
        accepted(&w.in_b(&syn).0, true, false);
    }
    w.port(40003);
    let syn = tcp_packet(w.c, w.s, ISN_C, 0, SYN, &[], &[]);
    let (v, _) = w.in_b(&syn);
    assert_eq!(dropped(&v), "policy_ingress");
    assert_eq!(w.b.metrics().flows_evicted(), 1);
    assert_eq!(w.b.metrics().flows_evicted_from_workloads(), 0);
    assert_eq!(w.b.flow_count(), 1);
    // After the handshake timeout, expired flows make the room (even without an explicit
    // expire call), and nothing more is evicted.
    w.now += ProcessorConfig::default().handshake_timeout_ms + 2_000;
    accepted(&w.out_a(&w.syn()).0, true, false);
    assert_eq!(w.a.metrics().flows_evicted(), 1);
    assert_eq!(w.a.metrics().rejected("flow_table_full"), 0);
    assert_eq!(w.b.metrics().rejected("flow_table_full"), 0);
}

#[test]
fn handshake_state_expires() {
    let mut w = World::new(Mode::Psk, ALLOW);
    let (_, syn) = w.out_a(&w.syn());
    w.in_b(&syn);
    let (_, sa) = w.out_b(&w.syn_ack());
    w.in_a(&sa);
    let (_, ack) = w.out_a(&w.ack());
    // A second client flow whose SYN is never answered.
    w.port(40001);
    let (_, lonely_syn) = w.out_a(&w.syn());
    assert_eq!((w.a.flow_count(), w.b.flow_count()), (2, 1));
    w.now += ProcessorConfig::default().handshake_timeout_ms + 1;
    w.a.expire(w.now);
    w.b.expire(w.now);
    // The server forgets its half-open flow and the client its unanswered SYN and its flow
    // marked when the ACK left (after the authorized linger time).
    assert_eq!((w.a.flow_count(), w.b.flow_count()), (0, 0));
    assert_eq!(w.b.metrics().flows(), 0);
    let (v, _) = w.in_b(&ack);
    assert_eq!(dropped(&v), "no_flow_state");
    // A SYN retransmitted after the timeout starts afresh with a new token.
    let (v, syn2) = w.out_a(&w.syn());
    accepted(&v, true, false);
    assert_ne!(token_of(&syn2), token_of(&lonely_syn));
}

#[test]
fn connection_opened_ahead_of_use_works_when_first_used_later() {
    // A pool opens a connection and sends nothing for a minute: both ends were marked during
    // the handshake (the client as its ACK token left, the server at that token), so neither
    // agent needs state for its first use; both forgot the flow.
    let mut w = World::new(Mode::Psk, ALLOW);
    complete(&mut w);
    w.now += 60_000;
    w.a.expire(w.now);
    w.b.expire(w.now);
    assert_eq!((w.a.flow_count(), w.b.flow_count()), (0, 0));
    for p in [&w.a, &w.b] {
        assert_eq!(p.metrics().authorized(), (1, 0));
        assert_eq!(p.metrics().rejected_total(), 0);
    }
}

#[test]
fn authorized_flows_are_forgotten_after_the_linger_time() {
    let mut w = World::new(Mode::Psk, ALLOW);
    complete(&mut w);
    assert_eq!(w.b.flow_count(), 1);
    w.now += ProcessorConfig::default().authorized_linger_ms + 1;
    w.b.expire(w.now);
    assert_eq!(w.b.flow_count(), 0);
}

#[test]
fn workload_removal_forgets_its_flows() {
    let mut w = World::new(Mode::Psk, ALLOW);
    let (_, syn) = w.out_a(&w.syn());
    w.in_b(&syn);
    assert_eq!(w.b.flow_count(), 1);
    w.b.remove_workload(ID);
    assert!(!w.b.has_workload(ID));
    assert_eq!(w.b.flow_count(), 0);
    assert_eq!(w.b.metrics().flows(), 0);
    let (v, _) = w.in_b(&syn);
    assert_eq!(dropped(&v), "unknown_workload");
}

#[test]
fn rst_during_the_handshake_forgets_the_flow() {
    let mut w = World::new(Mode::Psk, ALLOW);
    let (_, syn) = w.out_a(&w.syn());
    w.in_b(&syn);
    // The server kernel refuses (nothing listens): RST+ACK goes back.
    let rst = tcp_packet(w.s, w.c, 0, ISN_C + 1, RST_ACK, &[], &[]);
    accepted(&w.out_b(&rst).0, false, false);
    assert_eq!(w.b.flow_count(), 0);
    accepted(&w.in_a(&rst).0, false, false);
    assert_eq!(w.a.flow_count(), 0);
}

#[test]
fn policy_change_between_syn_and_ack_is_enforced_at_the_ack() {
    let mut w = World::new(Mode::Psk, ALLOW);
    let (_, syn) = w.out_a(&w.syn());
    accepted(&w.in_b(&syn).0, true, false);
    let (_, sa) = w.out_b(&w.syn_ack());
    w.in_a(&sa);
    // db's policy now admits only api.
    let parsed = policy::objects::parse("new.yaml", INGRESS_DENY);
    policy::objects::load(w.b.engine_mut(), &parsed.objects);
    let (_, ack) = w.out_a(&w.ack());
    let (v, _) = w.in_b(&ack);
    assert_eq!(dropped(&v), "policy_ingress");
}

#[test]
fn same_tuple_in_two_workloads_is_two_flows() {
    let (na, nb) = nodes(Mode::Psk, "x");
    let yaml = format!("{NS}\n---\n{ALLOW}");
    let mut a = processor(na, &yaml, &[&WEB, &WEB], ProcessorConfig::default());
    let _ = nb;
    let mut rng = SeededRng::new(b"x");
    let c: SocketAddr = "10.0.1.2:40000".parse().unwrap();
    let s: SocketAddr = "10.0.2.2:5432".parse().unwrap();
    let syn = tcp_packet(c, s, ISN_C, 0, SYN, &[], &[]);
    let (_, t1) = run(&mut a, WorkloadId(1), Hook::Output, &syn, NOW, &mut rng);
    let (_, t2) = run(&mut a, WorkloadId(2), Hook::Output, &syn, NOW, &mut rng);
    assert_eq!(a.flow_count(), 2);
    assert_ne!(token_of(&t1), token_of(&t2));
}

#[test]
fn prometheus_rendering_shows_counters_and_histogram() {
    let mut w = World::new(Mode::Psk, INGRESS_DENY);
    let (_, syn) = w.out_a(&w.syn());
    w.in_b(&syn);
    w.b.metrics_mut().record_decision_time(3_000);
    w.b.metrics_mut().record_decision_time(70_000);
    w.b.metrics_mut().set_queue_drops(2, 5);
    let mut out = String::new();
    w.b.metrics().render_prometheus(&mut out);
    for line in [
        "tessera_packets_rejected_total{reason=\"policy_ingress\"} 1",
        "tessera_decision_seconds_bucket{le=\"0.000005\"} 1",
        "tessera_decision_seconds_bucket{le=\"0.0001\"} 2",
        "tessera_decision_seconds_bucket{le=\"+Inf\"} 2",
        "tessera_decision_seconds_sum 0.000073",
        "tessera_decision_seconds_count 2",
        "tessera_queue_dropped_total 2",
        "tessera_queue_user_dropped_total 5",
        "tessera_handshake_flows{protocol=\"tcp\"} 0",
        "tessera_handshake_flows{protocol=\"udp\"} 0",
        "# TYPE tessera_decision_seconds histogram",
    ] {
        assert!(out.lines().any(|l| l == line), "missing {line:?} in\n{out}");
    }
}

#[test]
fn blind_injections_neither_decide_nor_mark_the_clients_flow() {
    // A token-less SYN-ACK that does not acknowledge the client's SYN (a blind injection)
    // neither authorizes as IP-only nor triggers the egress RST.
    for policies in [IPBLOCK, ALLOW] {
        let mut w = World::new(Mode::Psk, policies);
        w.out_a(&w.syn());
        let forged = tcp_packet(w.s, w.c, 777, 12345, SYN_ACK, &[], &[]);
        let (v, _) = w.in_a(&forged);
        assert_eq!(dropped(&v), "ack_mismatch");
        assert_eq!(w.a.metrics().authorized(), (0, 0));
        assert_eq!(w.a.metrics().rejected("policy_egress"), 0);
    }
    // The genuine handshake then works, and a packet "from the server" at the wrong sequence
    // number is left to the kernel without marking the flow.
    let mut w = World::new(Mode::Psk, ALLOW);
    w.out_a(&w.syn());
    let (_, syn) = w.out_a(&w.syn());
    w.in_b(&syn);
    let (_, sa) = w.out_b(&w.syn_ack());
    accepted(&w.in_a(&sa).0, true, false);
    let stray = tcp_packet(w.s, w.c, 4242, ISN_C + 1, ACK, &[], &[]);
    accepted(&w.in_a(&stray).0, false, false);
    // The ACK still carries the proof.
    let (_, ack) = w.out_a(&w.ack());
    assert!(token_of(&ack).is_some());
    accepted(&w.in_b(&ack).0, true, true);
    accepted(&w.in_a(&w.data_s()).0, false, true);
}

#[test]
fn blind_rst_does_not_wipe_a_handshake() {
    let mut w = World::new(Mode::Psk, ALLOW);
    let (_, syn) = w.out_a(&w.syn());
    accepted(&w.in_b(&syn).0, true, false);
    // RSTs at made-up sequence numbers, towards both ends.
    let blind = tcp_packet(w.c, w.s, 0xdead, 0, RST, &[], &[]);
    accepted(&w.in_b(&blind).0, false, false);
    let blind = tcp_packet(w.s, w.c, 0xbeef, 0xbeef, RST_ACK, &[], &[]);
    accepted(&w.in_a(&blind).0, false, false);
    assert_eq!((w.a.flow_count(), w.b.flow_count()), (1, 1));
    // The handshake goes on.
    let (_, sa) = w.out_b(&w.syn_ack());
    accepted(&w.in_a(&sa).0, true, false);
    let (_, ack) = w.out_a(&w.ack());
    accepted(&w.in_b(&ack).0, true, true);
    // A RST that fits (the client's next sequence number) ends the server's flow.
    let rst = tcp_packet(w.c, w.s, ISN_C + 1, 0, RST, &[], &[]);
    accepted(&w.in_b(&rst).0, false, false);
    assert_eq!(w.b.flow_count(), 0);
}
