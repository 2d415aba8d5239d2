#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The bound handshake through both processors: once a verified SYN-ACK taught node-a the node
//! behind the server's address, its next connection there takes two tokens, each end marks
//! the flow at the SYN-ACK, and the client's ACK bypasses both agents. Everything that can go
//! wrong with it falls back to the three tokens, never to less.

mod common;

use common::*;
use datapath::{PacketKind, ProcessorConfig};
use identity::wire::{TYPE_SYN, TYPE_SYN_ACK, TYPE_SYN_ACK_BOUND, TYPE_SYN_BOUND};

fn token_type(p: &[u8]) -> u8 {
    token_of(p).expect("a token")[1]
}

/// A first connection (three tokens) teaches node-a the server's node; then port 41000.
fn taught(mode: Mode, config: ProcessorConfig) -> World {
    let mut w = World::with(mode, ALLOW, &WEB, &DB, config);
    w.connect();
    assert_eq!(w.a.metrics().bound("sent"), 0);
    w.port(41000);
    w
}

fn two_tokens(mode: Mode, client: &Pod, server: &Pod) {
    let mut w = World::with(mode, ALLOW, client, server, ProcessorConfig::default());
    w.connect();
    w.port(41000);
    let syn0 = w.syn();
    let (v, syn) = w.out_a(&syn0);
    accepted(&v, true, false);
    assert_eq!(token_type(&syn), TYPE_SYN_BOUND);
    assert!(checksums_ok(&syn));
    let (v, seen) = w.in_b(&syn);
    // Authenticated at the SYN, but not marked yet: the SYN-ACK must still be queued to get
    // its token.
    accepted(&v, true, false);
    assert_eq!(
        seen, syn0,
        "the server kernel sees exactly the client's SYN"
    );
    let sa0 = w.syn_ack();
    let (v, syn_ack) = w.out_b(&sa0);
    accepted(&v, true, true);
    assert_eq!(token_type(&syn_ack), TYPE_SYN_ACK_BOUND);
    assert!(checksums_ok(&syn_ack));
    let (v, seen) = w.in_a(&syn_ack);
    accepted(&v, true, true);
    assert_eq!(
        seen, sa0,
        "the client kernel sees exactly the server's SYN-ACK"
    );
    // Both ends are marked: the client's ACK and everything after it bypass both agents. Both
    // counted the flow as authorized by a verified peer, and the bound handshake's events.
    assert_eq!(w.a.metrics().authorized(), (2, 0));
    assert_eq!(w.b.metrics().authorized(), (2, 0));
    assert_eq!(w.a.metrics().bound("sent"), 1);
    assert_eq!(w.a.metrics().bound("completed"), 1);
    assert_eq!(w.b.metrics().bound("authorized"), 1);
    // A queued packet fewer at each end than the three tokens: SYN and SYN-ACK only.
    assert_eq!(
        w.a.metrics()
            .accepted(datapath::Hook::Output, PacketKind::Ack),
        1,
        "only the first connection's ACK"
    );
    // Packets still queued behind the SYN-ACK pass, marked, at either end.
    accepted(&w.in_b(&w.ack()).0, false, true);
    accepted(&w.in_a(&w.data_s()).0, false, true);
}

#[test]
fn a_second_connection_takes_two_tokens_psk() {
    two_tokens(Mode::Psk, &WEB, &DB);
}

#[test]
fn a_second_connection_takes_two_tokens_pki() {
    two_tokens(Mode::Pki, &WEB, &DB);
}

#[test]
fn a_second_connection_takes_two_tokens_over_ipv6() {
    let web6 = Pod {
        ip: std::net::IpAddr::V6(std::net::Ipv6Addr::new(0xfd00, 1, 0, 0, 0, 0, 0, 2)),
        ..WEB
    };
    let db6 = Pod {
        ip: std::net::IpAddr::V6(std::net::Ipv6Addr::new(0xfd00, 2, 0, 0, 0, 0, 0, 2)),
        ..DB
    };
    two_tokens(Mode::Psk, &web6, &db6);
}

#[test]
fn with_the_switch_off_connections_take_three_tokens_and_bound_syns_are_still_taken() {
    let off = ProcessorConfig {
        bound_handshake: false,
        ..ProcessorConfig::default()
    };
    let mut w = taught(Mode::Psk, off);
    let (_, syn) = w.out_a(&w.syn());
    assert_eq!(token_type(&syn), TYPE_SYN);
    // A node whose switch is off still answers a bound SYN from one whose switch is on.
    let mut w = taught(Mode::Psk, ProcessorConfig::default());
    w.b = processor(
        nodes(Mode::Psk, "world").1,
        &format!("{NS}\n---\n{ALLOW}"),
        &[&DB],
        off,
    );
    let (_, syn) = w.out_a(&w.syn());
    accepted(&w.in_b(&syn).0, true, false);
    let (v, syn_ack) = w.out_b(&w.syn_ack());
    accepted(&v, true, true);
    assert_eq!(token_type(&syn_ack), TYPE_SYN_ACK_BOUND);
}

/// The bound SYN-ACK is lost, and a token-less SYN-ACK arrives instead (a forgery, or the
/// kernel's retransmission after node-b's agent forgot the flow; a live agent re-sends the token,
/// since the rules queue SYN-ACKs even on a marked flow): the client refuses it (a bound SYN is
/// answered with a token, and a token-less SYN-ACK must not make the server agentless). The
/// client kernel re-sends its SYN, which goes plain with a fresh nonce; at the server it unmarks the flow, so the kernel's
/// answer is queued and gets a plain SYN-ACK; the three tokens follow. node-b is then silent:
/// plain SYNs until `bound_silent_ms` has passed.
#[test]
fn a_lost_bound_syn_ack_falls_back_to_three_tokens() {
    let config = ProcessorConfig {
        bound_peer_ms: 3_600_000,
        ..ProcessorConfig::default()
    };
    let mut w = taught(Mode::Psk, config);
    let (_, syn) = w.out_a(&w.syn());
    accepted(&w.in_b(&syn).0, true, false);
    let (v, _lost) = w.out_b(&w.syn_ack());
    accepted(&v, true, true);
    // A SYN-ACK without a token.
    let (v, _) = w.in_a(&w.syn_ack());
    assert_eq!(dropped(&v), "bound_syn_ack_without_token");
    // The client's SYN again: plain now.
    w.now += 1_000;
    let (v, syn) = w.out_a(&w.syn());
    accepted(&v, true, false);
    assert_eq!(token_type(&syn), TYPE_SYN);
    assert_eq!(w.a.metrics().bound("retransmitted_plain"), 1);
    let (v, _) = w.in_b(&syn);
    assert!(v.accept && v.modified && v.unmark, "unmarked: {v:?}");
    let (v, syn_ack) = w.out_b(&w.syn_ack());
    accepted(&v, true, false);
    assert_eq!(token_type(&syn_ack), TYPE_SYN_ACK);
    accepted(&w.in_a(&syn_ack).0, true, false);
    let (v, ack) = w.out_a(&w.ack());
    accepted(&v, true, true);
    accepted(&w.in_b(&ack).0, true, true);
    // node-b is silent for a while (the plain SYN was answered where the bound one was not),
    // then bound again.
    assert_eq!(w.a.metrics().bound("node_silenced"), 1);
    w.port(41001);
    let (_, syn) = w.out_a(&w.syn());
    assert_eq!(token_type(&syn), TYPE_SYN);
    w.now += config.bound_silent_ms;
    w.port(41002);
    let (_, syn) = w.out_a(&w.syn());
    assert_eq!(token_type(&syn), TYPE_SYN_BOUND);
}

/// A server that drops the bound SYN (an agent older than the bound handshake refuses its
/// type): the SYN's retransmission goes plain, and the connection completes with three tokens.
#[test]
fn a_bound_syn_nobody_answers_is_retransmitted_plain() {
    let mut w = taught(Mode::Pki, ProcessorConfig::default());
    let (_, syn) = w.out_a(&w.syn());
    assert_eq!(token_type(&syn), TYPE_SYN_BOUND);
    // Dropped on the way. The retransmission:
    w.now += 1_000;
    let (_, syn) = w.out_a(&w.syn());
    assert_eq!(token_type(&syn), TYPE_SYN);
    // Its own retransmission carries the same plain token.
    let (_, again) = w.out_a(&w.syn());
    assert_eq!(token_of(&again), token_of(&syn));
    accepted(&w.in_b(&syn).0, true, false);
    let (_, syn_ack) = w.out_b(&w.syn_ack());
    accepted(&w.in_a(&syn_ack).0, true, false);
    assert_eq!(
        w.a.metrics().bound("node_silenced"),
        1,
        "it answers plain SYNs"
    );
    let (v, ack) = w.out_a(&w.ack());
    accepted(&v, true, true);
    accepted(&w.in_b(&ack).0, true, true);
}

/// A bound SYN the server's ingress denies is dropped, as any denied SYN, and so is its plain
/// retransmission: that silence says nothing about the node, which is not silenced. Before,
/// every denied connection to a node turned the bound handshake off towards it for 10 minutes.
#[test]
fn a_denied_bound_syn_does_not_silence_the_node() {
    let mut w = taught(Mode::Psk, ProcessorConfig::default());
    // Port 5433 of db: ALLOW admits 5432 only.
    w.s.set_port(5433);
    let (_, syn) = w.out_a(&w.syn());
    assert_eq!(token_type(&syn), TYPE_SYN_BOUND);
    assert_eq!(dropped(&w.in_b(&syn).0), "policy_ingress");
    for _ in 0..3 {
        w.now += 1_000;
        let (_, syn) = w.out_a(&w.syn());
        assert_eq!(token_type(&syn), TYPE_SYN);
        assert_eq!(dropped(&w.in_b(&syn).0), "policy_ingress");
    }
    assert_eq!(w.a.metrics().bound("retransmitted_plain"), 1);
    assert_eq!(w.a.metrics().bound("node_silenced"), 0);
    // The next connection, to the allowed port, is bound and takes two tokens.
    w.s.set_port(5432);
    w.port(41001);
    let (_, syn) = w.out_a(&w.syn());
    assert_eq!(token_type(&syn), TYPE_SYN_BOUND);
    accepted(&w.in_b(&syn).0, true, false);
    let (v, syn_ack) = w.out_b(&w.syn_ack());
    accepted(&v, true, true);
    accepted(&w.in_a(&syn_ack).0, true, true);
    assert_eq!(w.a.metrics().bound("completed"), 1);
}

/// A bound SYN seen from another source (a NAT on the way, or a copy moved to another address
/// or port by someone who captured it) does not authorize: the server answers with a plain
/// SYN-ACK and waits for an ACK token that only the client's node can make.
#[test]
fn a_bound_syn_from_another_source_only_starts_three_tokens() {
    let mut w = taught(Mode::Psk, ProcessorConfig::default());
    let (_, syn) = w.out_a(&w.syn());
    let moved = to_port(&syn, 41999, true);
    w.port(41999);
    let (v, _) = w.in_b(&moved);
    accepted(&v, true, false);
    assert_eq!(w.b.metrics().bound("binding_bad_mac"), 1);
    let (v, syn_ack) = w.out_b(&w.syn_ack());
    accepted(&v, true, false);
    assert_eq!(token_type(&syn_ack), TYPE_SYN_ACK);
    // Data on that tuple without the ACK token is not let through.
    let (v, _) = w.in_b(&w.data_c());
    assert!(v.requeue || !v.accept, "{v:?}");
    assert_eq!(
        w.b.metrics().authorized(),
        (1, 0),
        "only the first connection"
    );
}

/// A bound SYN captured on the wire and sent again, on its own tuple or another: refused as a
/// replay once it authorized its flow, even after that flow's state is gone.
#[test]
fn a_replayed_bound_syn_authorizes_nothing() {
    let mut w = taught(Mode::Psk, ProcessorConfig::default());
    let (_, syn) = w.out_a(&w.syn());
    accepted(&w.in_b(&syn).0, true, false);
    accepted(&w.out_b(&w.syn_ack()).0, true, true);
    w.now += 15_000;
    w.b.expire(w.now);
    let (v, _) = w.in_b(&syn);
    assert_eq!(dropped(&v), "replay");
    w.port(41999);
    let (v, _) = w.in_b(&to_port(&syn, 41999, true));
    assert_eq!(dropped(&v), "replay");
    // Past the skew window it is stale.
    w.now += 30_000;
    let (v, _) = w.in_b(&syn);
    assert_eq!(dropped(&v), "stale_timestamp");
}

/// Policy decides at the bound handshake as at the three tokens: the server's ingress at the
/// bound SYN, on the proven client; the client's egress at the bound SYN-ACK, on the proven
/// server (a SYN-ACK denied becomes a RST for the client, as always).
#[test]
fn policy_decides_both_ends_of_a_bound_handshake() {
    let mut w = taught(Mode::Psk, ProcessorConfig::default());
    let load = |e: &mut policy::Engine, yaml: &str| {
        let parsed = policy::objects::parse("change.yaml", yaml);
        let report = policy::objects::load(e, &parsed.objects);
        assert!(report.errors.is_empty(), "{:?}", report.errors);
    };
    load(w.b.engine_mut(), INGRESS_DENY);
    let (_, syn) = w.out_a(&w.syn());
    assert_eq!(token_type(&syn), TYPE_SYN_BOUND);
    let (v, _) = w.in_b(&syn);
    assert_eq!(dropped(&v), "policy_ingress");
    // Ingress allows again; egress now denies.
    load(w.b.engine_mut(), ALLOW);
    load(w.a.engine_mut(), EGRESS_DENY);
    w.port(41001);
    let (_, syn) = w.out_a(&w.syn());
    accepted(&w.in_b(&syn).0, true, false);
    let (_, syn_ack) = w.out_b(&w.syn_ack());
    let (v, rst) = w.in_a(&syn_ack);
    assert!(v.accept && !v.mark_authorized, "{v:?}");
    assert_eq!(v.reason.as_ref().map(|r| r.as_str()), Some("policy_egress"));
    assert_eq!(flags(&rst) & RST, RST, "the client kernel gets a RST");
}

/// A bound SYN-ACK for a SYN that was not bound, and a bound SYN-ACK's token on another flow,
/// are refused.
#[test]
fn a_bound_syn_ack_is_taken_only_for_its_own_bound_syn() {
    let mut w = taught(Mode::Psk, ProcessorConfig::default());
    let (_, syn) = w.out_a(&w.syn());
    accepted(&w.in_b(&syn).0, true, false);
    let (_, syn_ack) = w.out_b(&w.syn_ack());
    // Moved to a plain handshake on another port.
    let plain = ProcessorConfig {
        bound_handshake: false,
        ..ProcessorConfig::default()
    };
    let mut p = taught(Mode::Psk, plain);
    let (_, syn) = p.out_a(&p.syn());
    assert_eq!(token_type(&syn), TYPE_SYN);
    let (v, _) = p.in_a(&syn_ack);
    assert_eq!(dropped(&v), "wrong_token_type");
    // On another bound flow of the same client: its MAC covers another SYN.
    w.port(41001);
    let (_, syn2) = w.out_a(&w.syn());
    assert_eq!(token_type(&syn2), TYPE_SYN_BOUND);
    let moved = to_port(&syn_ack, 41001, false);
    let (v, _) = w.in_a(&moved);
    assert_eq!(dropped(&v), "bad_mac");
}
