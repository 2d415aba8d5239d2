#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Authenticated UDP in memory: two agents prove a UDP flow's ends to each other with control
//! datagrams on the flow's own 5-tuple, hold the application's datagrams meanwhile and release
//! them in order; losses are recovered; refusals, agentless peers, forgeries and replays are
//! handled. The packets the processors emit are fed to the other side as the network would.

mod common;

use std::net::SocketAddr;

use common::*;
use datapath::{EmitMark, Hook, Outgoing, PacketKind, Verdict};

fn payload(p: &[u8]) -> &[u8] {
    &p[28..]
}

fn consumed(v: &Verdict) -> bool {
    !v.accept && v.reason.is_none()
}

fn reason(v: &Verdict) -> Option<&'static str> {
    v.reason.as_ref().map(|r| r.as_str())
}

/// The control datagrams and released datagrams a processor emitted, checked for their mark.
fn take(p: &mut datapath::Processor) -> Vec<Outgoing> {
    p.take_outgoing()
}

/// A control datagram with the mark its type takes: the bound SYN-ACK marks its flow as it
/// leaves, every other control only passes.
fn is_control(o: &Outgoing) -> bool {
    let mark = match control_kind(o) {
        Some(identity::wire::TYPE_SYN_ACK_BOUND) => EmitMark::ControlAuthorized,
        Some(_) => EmitMark::Control,
        None => return false,
    };
    o.mark == mark
}

/// The type of a control datagram the processor emitted.
fn control_kind(o: &Outgoing) -> Option<u8> {
    identity::parse_udp_control(payload(&o.packet))
        .ok()
        .flatten()
        .map(|(kind, _)| kind)
}

/// Runs the handshake for the datagrams `data` (sent before any answer), returning what node
/// a released (in order) after the SYN-ACK.
fn handshake(w: &mut World, data: &[&[u8]]) -> Vec<Outgoing> {
    exchange(w, data).1
}

/// [`handshake`], also returning the SYN control datagram.
fn exchange(w: &mut World, data: &[&[u8]]) -> (Outgoing, Vec<Outgoing>) {
    for d in data {
        let (v, _) = w.out_a(&udp(w.c, w.s, d));
        assert!(consumed(&v), "held: {v:?}");
    }
    let mut out = take(&mut w.a);
    assert_eq!(out.len(), 1, "one SYN control: {out:?}");
    let syn = out.remove(0);
    assert!(is_control(&syn));
    let (v, _) = w.in_b(&syn.packet);
    assert!(consumed(&v), "SYN consumed: {v:?}");
    let out = take(&mut w.b);
    assert_eq!(out.len(), 1, "one SYN-ACK: {out:?}");
    assert!(is_control(&out[0]));
    let (v, _) = w.in_a(&out[0].packet);
    assert!(consumed(&v), "SYN-ACK consumed: {v:?}");
    (syn, take(&mut w.a))
}

/// One whole handshake for a one-datagram flow, the ACK consumed by the server: the SYN and ACK
/// control datagrams (what an attacker could capture).
fn prove(w: &mut World) -> (Outgoing, Outgoing) {
    let (syn, out) = exchange(w, &[b"x"]);
    let (v, _) = w.in_b(&out[0].packet);
    assert!(consumed(&v), "ACK consumed: {v:?}");
    (syn, out[0].clone())
}

#[test]
fn a_udp_flow_is_proven_both_ways_and_its_held_datagrams_leave_in_order() {
    for mode in [Mode::Psk, Mode::Pki] {
        let mut w = World::new(mode, DB_UDP_FROM_WEB);
        let out = handshake(&mut w, &[b"one", b"two", b"three"]);
        assert_eq!(out.len(), 4, "ACK then the three datagrams: {out:?}");
        assert!(is_control(&out[0]));
        let released: Vec<&[u8]> = out[1..].iter().map(|o| payload(&o.packet)).collect();
        assert_eq!(released, [&b"one"[..], b"two", b"three"]);
        assert!(out[1..].iter().all(|o| o.mark == EmitMark::Authorized));
        // The ACK proves the client; its datagrams are then accepted and marked.
        let (v, _) = w.in_b(&out[0].packet);
        assert!(consumed(&v), "{v:?}");
        for o in &out[1..] {
            let (v, p) = w.in_b(&o.packet);
            assert!(v.accept && v.mark_authorized, "{v:?}");
            assert_eq!(p, o.packet);
        }
        assert_eq!(w.a.metrics().authorized(), (1, 0));
        assert_eq!(w.b.metrics().authorized(), (1, 0));
        assert_eq!(w.a.metrics().rejected_total(), 0);
        assert_eq!(w.b.metrics().rejected_total(), 0);
        assert_eq!(w.b.metrics().accepted(Hook::Input, PacketKind::Udp), 3);
    }
}

#[test]
fn ingress_denial_is_refused_at_once_and_nothing_is_released() {
    let mut w = World::new(Mode::Psk, INGRESS_DENY);
    let (v, _) = w.out_a(&udp(w.c, w.s, b"x"));
    assert!(consumed(&v));
    let syn = take(&mut w.a).remove(0);
    let (v, _) = w.in_b(&syn.packet);
    assert_eq!(reason(&v), Some("policy_ingress"));
    let refused = take(&mut w.b);
    assert_eq!(refused.len(), 1, "a REFUSED control: {refused:?}");
    let (v, _) = w.in_a(&refused[0].packet);
    assert_eq!(reason(&v), Some("udp_refused"));
    assert!(take(&mut w.a).is_empty(), "nothing released");
    // The client's next datagram starts a new handshake (the policy may have changed).
    let (v, _) = w.out_a(&udp(w.c, w.s, b"y"));
    assert!(consumed(&v));
}

#[test]
fn egress_denial_at_the_client_drops_the_held_datagrams() {
    let mut w = World::new(Mode::Psk, EGRESS_DENY);
    let (v, _) = w.out_a(&udp(w.c, w.s, b"x"));
    assert!(consumed(&v));
    let syn = take(&mut w.a).remove(0);
    let (_, _) = w.in_b(&syn.packet);
    let synack = take(&mut w.b).remove(0);
    let (v, _) = w.in_a(&synack.packet);
    assert_eq!(reason(&v), Some("policy_egress"));
    assert!(take(&mut w.a).is_empty());
}

#[test]
fn lost_control_datagrams_are_recovered() {
    let mut w = World::new(Mode::Psk, DB_UDP_FROM_WEB);
    let (v, _) = w.out_a(&udp(w.c, w.s, b"x"));
    assert!(consumed(&v));
    // The SYN is lost; 25 ms later it is sent again.
    let _lost = take(&mut w.a);
    let t0 = w.now;
    assert_eq!(w.a.next_udp_timer(), Some(t0 + 25));
    w.a.poll_udp(t0 + 10, &mut w.rng);
    assert!(take(&mut w.a).is_empty(), "not yet");
    w.now = t0 + 25;
    w.a.poll_udp(w.now, &mut w.rng);
    let syn = take(&mut w.a);
    assert_eq!(syn.len(), 1);
    // The SYN-ACK is lost: the client's next retransmission gets the same SYN-ACK.
    let (_, _) = w.in_b(&syn[0].packet);
    let first = take(&mut w.b);
    w.now = t0 + 75;
    w.a.poll_udp(w.now, &mut w.rng);
    let again = take(&mut w.a);
    assert_eq!(again[0].packet, syn[0].packet, "the same SYN");
    let (v, _) = w.in_b(&again[0].packet);
    assert!(consumed(&v));
    let second = take(&mut w.b);
    assert_eq!(second[0].packet, first[0].packet, "the same SYN-ACK");
    let (v, _) = w.in_a(&second[0].packet);
    assert!(consumed(&v));
    let out = take(&mut w.a);
    let (ack, data) = (&out[0], &out[1]);
    // The ACK is lost: the client's datagram reaches the server first. The server sends its
    // SYN-ACK again and requeues the datagram; the client's agent answers with the same ACK.
    w.now += 30;
    let (v, _) = w.in_b(&data.packet);
    assert!(v.requeue, "{v:?}");
    let synack_again = take(&mut w.b);
    assert_eq!(synack_again.len(), 1);
    let (v, _) = w.in_a(&synack_again[0].packet);
    assert!(consumed(&v));
    let ack_again = take(&mut w.a);
    assert_eq!(ack_again[0].packet, ack.packet, "the same ACK");
    let (v, _) = w.in_b(&ack_again[0].packet);
    assert!(consumed(&v));
    let (v, _) = w.in_b(&data.packet);
    assert!(v.accept && v.mark_authorized, "{v:?}");
}

/// The server's agent proves the client at its ACK and marks the flow there and then: the
/// consumed ACK settles the connmark (AUTH set) on its way out, so the flow's datagrams pass
/// however late they come (before, only the next datagram within the 2 s linger was marked: a
/// lost datagram and a retry 5 s later met no state and were refused as unauthenticated).
#[test]
fn the_servers_agent_marks_the_flow_at_the_ack() {
    let mut w = World::new(Mode::Psk, DB_UDP_FROM_WEB);
    let out = handshake(&mut w, &[b"query"]);
    let (v, _) = w.in_b(&out[0].packet);
    assert_eq!(
        v,
        Verdict::consume_marking(true, None),
        "the ACK marks the flow"
    );
    // A duplicate of it (the client answered a re-sent SYN-ACK) marks again, and is consumed.
    let (v, _) = w.in_b(&out[0].packet);
    assert_eq!(v, Verdict::consume_marking(true, None));
}

/// Lost ACK, recovered at once: the datagram right behind it asks for the SYN-ACK again at
/// the first deferral, even within 5 ms of the first SYN-ACK, while the client's agent still
/// holds the handshake. It goes back to the queue's tail once (an ACK right behind it would
/// be decided first), then waits in pauses for the answer, a round trip away: requeued at once
/// every time, it spun through its 32 deferrals within one batch and was dropped
/// (`ack_missing`) before the answer came.
#[test]
fn the_first_datagram_behind_a_lost_ack_asks_for_it_at_once() {
    let mut w = World::new(Mode::Psk, DB_UDP_FROM_WEB);
    let out = handshake(&mut w, &[b"query"]);
    let (ack, data) = (&out[0], &out[1]);
    let (v, _) = w.in_b(&data.packet);
    assert_eq!(v, Verdict::requeue(), "to the tail, at once");
    let synack = take(&mut w.b);
    assert_eq!(synack.len(), 1, "the SYN-ACK again, no wait");
    // Requeued, the same datagram does not ask again within 5 ms, and now waits in pauses.
    for _ in 2..=datapath::processor::MAX_DEFERRALS {
        let (v, _) = w.in_b(&data.packet);
        assert_eq!(v, Verdict::requeue_after_pause());
    }
    assert!(take(&mut w.b).is_empty());
    let (v, _) = w.in_a(&synack[0].packet);
    assert!(consumed(&v));
    let again = take(&mut w.a);
    assert_eq!(again[0].packet, ack.packet);
    let (v, _) = w.in_b(&again[0].packet);
    assert_eq!(v, Verdict::consume_marking(true, None));
    let (v, _) = w.in_b(&data.packet);
    assert!(v.accept && v.mark_authorized, "{v:?}");
}

/// The ACK is lost, and so is the SYN-ACK the server's agent sends again at the next
/// datagram; the application retries 5 s later (a resolver's pace), after the client's agent
/// forgot the handshake (2 s). The server's agent asks for the ACK again: the client's agent
/// cannot answer, so it clears the flow's mark (`udp_ack_lost`) and the next datagram starts a
/// new handshake, which the server's agent takes in place of the one it waited on. Before, the
/// SYN-ACK was dropped as unexpected: the client's flow stayed marked and every datagram was
/// dropped at the server (`ack_missing`) for as long as the application kept it busy.
#[test]
fn a_lost_ack_the_client_forgot_starts_a_new_handshake() {
    for mode in [Mode::Psk, Mode::Pki] {
        let mut w = World::new(mode, DB_UDP_FROM_WEB);
        let out = handshake(&mut w, &[b"query"]);
        let data = out[1].clone();
        let (v, _) = w.in_b(&data.packet);
        assert!(v.requeue);
        let _lost = take(&mut w.b);
        for _ in 1..datapath::processor::MAX_DEFERRALS {
            let (v, _) = w.in_b(&data.packet);
            assert!(v.requeue, "{v:?}");
        }
        let (v, _) = w.in_b(&data.packet);
        assert_eq!(reason(&v), Some("ack_missing"));
        // 5 s later the client's agent has forgotten the handshake.
        w.now += 5_000;
        w.a.expire(w.now);
        w.b.expire(w.now);
        // The application's retry (its flow marked, it bypasses the client's queue) reaches
        // the server, whose agent asks for the ACK again.
        let (v, _) = w.in_b(&data.packet);
        assert_eq!(reason(&v), Some("ack_missing"));
        let synack = take(&mut w.b);
        assert_eq!(synack.len(), 1, "{mode:?}: the SYN-ACK again");
        let (v, _) = w.in_a(&synack[0].packet);
        assert_eq!(
            v,
            Verdict::consume_marking(false, Some(datapath::Reason::UdpAckLost)),
            "{mode:?}: unmarked"
        );
        assert!(take(&mut w.a).is_empty(), "no ACK: nothing to answer with");
        assert_eq!(w.a.metrics().rejected("udp_ack_lost"), 1);
        // The next datagram is queued again: a new handshake (bound, as the first one taught
        // node-a the server's node), answered; the flow is proven, with no ACK.
        let out = handshake(&mut w, &[b"query again"]);
        assert_eq!(out.len(), 1, "the held datagram: {out:?}");
        assert_eq!(out[0].mark, EmitMark::Authorized);
        assert_eq!(payload(&out[0].packet), b"query again");
        assert_eq!(w.b.metrics().bound("authorized"), 1, "{mode:?}");
    }
}

/// A SYN-ACK control on a tuple where this agent is the server (a simultaneous start, or a
/// forgery) unmarks nothing, nor does a malformed one on a tuple without state: only a
/// well-formed SYN-ACK token on a tuple without any handshake state of ours unmarks.
#[test]
fn a_syn_ack_on_a_server_tuple_is_unexpected_not_an_unmark() {
    let mut w = World::new(Mode::Psk, DB_UDP_FROM_WEB);
    prove(&mut w);
    // The server side (node b) receiving a SYN-ACK on its proven tuple.
    let synack =
        identity::encode_udp_control(identity::wire::TYPE_SYN_ACK, b"\x01\x02forged").unwrap();
    let (v, _) = w.in_b(&udp(w.c, w.s, &synack));
    assert_eq!(reason(&v), Some("unexpected_token"), "{v:?}");
    assert_eq!(v.connmark_on_drop, None);
    let mut other = w.c;
    other.set_port(40009);
    let (v, _) = w.in_a(&udp(w.s, other, &synack));
    assert_eq!(reason(&v), Some("unexpected_token"), "{v:?}");
    assert_eq!(v.connmark_on_drop, None);
}

/// The server workload restarted (a fresh agent state and conntrack table; same address) while
/// the client's flow stays marked: the client's next datagram passes its own rules unqueued and
/// is refused at the server (`udp_unauthenticated`), whose agent answers with a RESTART. The
/// client's agent clears the flow's mark (`udp_restart`) and the datagram after starts a new
/// handshake, which proves the flow again. Before, every datagram was refused for as long as
/// the application kept the flow busy.
#[test]
fn a_flow_the_server_no_longer_knows_is_restarted_by_a_new_handshake() {
    let mut w = World::new(Mode::Psk, DB_UDP_FROM_WEB);
    prove(&mut w);
    w.now += 5_000;
    w.a.expire(w.now);
    w.b.expire(w.now);
    // The flow is marked at the client: its datagram reaches the server unqueued there.
    let data = udp(w.c, w.s, b"after the restart");
    let (v, _) = w.in_b(&data);
    assert_eq!(reason(&v), Some("udp_unauthenticated"));
    let restart = take(&mut w.b);
    assert_eq!(restart.len(), 1);
    assert!(is_control(&restart[0]));
    assert_eq!(
        identity::parse_udp_control(payload(&restart[0].packet)),
        Ok(Some((identity::wire::TYPE_UDP_RESTART, &[0u8][..])))
    );
    let (v, _) = w.in_a(&restart[0].packet);
    assert_eq!(
        v,
        Verdict::consume_marking(false, Some(datapath::Reason::UdpRestart))
    );
    assert_eq!(w.a.metrics().rejected("udp_restart"), 1);
    // Unmarked, the next datagram is queued at the client: a new handshake proves the flow,
    // bound (the first one taught node-a the server's node): the server's agent marked the flow
    // as its SYN-ACK left, and no ACK follows.
    let out = handshake(&mut w, &[b"again"]);
    assert_eq!(out.len(), 1, "{out:?}");
    assert_eq!(out[0].mark, EmitMark::Authorized);
    assert_eq!(payload(&out[0].packet), b"again");
    assert_eq!(w.b.metrics().bound("authorized"), 1);
}

/// A RESTART cannot interrupt a handshake under way (no datagram of it left the client to be
/// refused), nor touch a tuple where this agent is the server; and a flood of forged plain
/// datagrams gets at most `UNKNOWN_FLOW_ANSWERS_PER_SECOND` RESTARTs a second in answer.
#[test]
fn restarts_touch_only_settled_client_flows_and_are_bounded() {
    let mut w = World::new(Mode::Psk, DB_UDP_FROM_WEB);
    let restart = identity::encode_udp_control(identity::wire::TYPE_UDP_RESTART, &[0]).unwrap();
    let (v, _) = w.out_a(&udp(w.c, w.s, b"held"));
    assert!(consumed(&v));
    let syn = take(&mut w.a);
    let (v, _) = w.in_a(&udp(w.s, w.c, &restart));
    assert_eq!(reason(&v), Some("unexpected_token"), "{v:?}");
    // The handshake goes on.
    let (v, _) = w.in_b(&syn[0].packet);
    assert!(consumed(&v));
    let synack = take(&mut w.b);
    let (v, _) = w.in_b(&udp(w.c, w.s, &restart));
    assert_eq!(reason(&v), Some("unexpected_token"), "server side: {v:?}");
    let (v, _) = w.in_a(&synack[0].packet);
    assert!(consumed(&v));
    let out = take(&mut w.a);
    assert_eq!(out.len(), 2, "ACK and the held datagram");
    let (v, _) = w.in_b(&out[0].packet);
    assert_eq!(v, Verdict::consume_marking(true, None));

    // Forged plain datagrams claiming web's address (an agent: proven above), each on a tuple
    // of its own, within one second.
    let per_second = datapath::processor::UNKNOWN_FLOW_ANSWERS_PER_SECOND as u16;
    w.now = (w.now / 1_000 + 1) * 1_000;
    for port in 0..per_second + 10 {
        let (v, _) = w.in_b(&udp(SocketAddr::new(WEB.ip, 20_000 + port), w.s, b"f"));
        assert_eq!(reason(&v), Some("udp_unauthenticated"));
    }
    assert_eq!(take(&mut w.b).len(), usize::from(per_second));
    w.now += 1_000;
    let (_, _) = w.in_b(&udp(SocketAddr::new(WEB.ip, 19_999), w.s, b"f"));
    assert_eq!(take(&mut w.b).len(), 1, "the next second has room again");
}

#[test]
fn an_agentless_peer_costs_one_bounded_wait_then_none() {
    // The server node has no agent: nothing answers. Egress is not isolated.
    let mut w = World::new(Mode::Psk, INGRESS_DENY);
    let (v, _) = w.out_a(&udp(w.c, w.s, b"x"));
    assert!(consumed(&v));
    let t0 = w.now;
    let mut syns = take(&mut w.a).len();
    let mut released = Vec::new();
    while let Some(t) = w.a.next_udp_timer() {
        w.now = t;
        w.a.poll_udp(t, &mut w.rng);
        for o in take(&mut w.a) {
            if is_control(&o) {
                syns += 1;
            } else {
                released.push(o);
            }
        }
    }
    assert_eq!(syns, 3, "three SYN controls");
    assert_eq!(w.now - t0, 25 + 50 + 100, "given up after 175 ms");
    assert_eq!(released.len(), 1);
    assert_eq!(released[0].mark, EmitMark::Authorized);
    assert_eq!(payload(&released[0].packet), b"x");
    assert_eq!(w.a.metrics().authorized_by_address(), 1);
    // The next flow to that address is decided at once, on the address.
    let mut other = w.c;
    other.set_port(40001);
    let (v, _) = w.out_a(&udp(other, w.s, b"y"));
    assert!(v.accept && v.mark_authorized, "{v:?}");
    assert!(take(&mut w.a).is_empty());
}

#[test]
fn public_peers_are_decided_on_their_address_without_a_handshake() {
    let mut w = World::new(Mode::Psk, INGRESS_DENY);
    let resolver: SocketAddr = "9.9.9.9:53".parse().unwrap();
    let (v, _) = w.out_a(&udp(w.c, resolver, b"query"));
    assert!(v.accept && v.mark_authorized, "{v:?}");
    assert!(
        take(&mut w.a).is_empty(),
        "no control datagram to the internet"
    );
}

#[test]
fn plain_datagrams_from_a_peer_with_an_agent_are_refused() {
    let mut w = World::new(Mode::Psk, DB_UDP_FROM_WEB);
    let out = handshake(&mut w, &[b"x"]);
    let (v, _) = w.in_b(&out[0].packet);
    assert!(consumed(&v));
    // Node b now knows web's address has an agent: a datagram claiming to come from it on
    // another flow, without a handshake, is forged.
    let forged = udp(SocketAddr::new(WEB.ip, 41000), w.s, b"forged");
    let (v, _) = w.in_b(&forged);
    assert_eq!(reason(&v), Some("udp_unauthenticated"));
}

#[test]
fn workloads_cannot_send_control_datagrams_and_forgeries_fail() {
    let mut w = World::new(Mode::Psk, DB_UDP_FROM_WEB);
    let control = identity::encode_udp_control(identity::wire::TYPE_SYN, &[1; 40]).unwrap();
    let (v, _) = w.out_a(&udp(w.c, w.s, &control));
    assert_eq!(reason(&v), Some("option_from_workload"));
    // A malformed control datagram, a garbage SYN, an unexpected SYN-ACK or ACK.
    let mut bad = control.clone();
    bad.push(0);
    let (v, _) = w.in_b(&udp(w.c, w.s, &bad));
    assert_eq!(reason(&v), Some("udp_control_malformed"));
    let (v, _) = w.in_b(&udp(w.c, w.s, &control));
    assert!(!v.accept && v.reason.is_some(), "{v:?}");
    for kind in [identity::wire::TYPE_SYN_ACK, identity::wire::TYPE_ACK] {
        let c = identity::encode_udp_control(kind, &[kind; 36]).unwrap();
        let (v, _) = w.in_b(&udp(w.c, w.s, &c));
        assert_eq!(reason(&v), Some("unexpected_token"), "{v:?}");
    }
    // A REFUSED that does not echo our nonce changes nothing.
    let (v, _) = w.out_a(&udp(w.c, w.s, b"x"));
    assert!(consumed(&v));
    let syn = take(&mut w.a).remove(0);
    let fake = identity::encode_udp_control(identity::wire::TYPE_UDP_REFUSED, &[0; 16]).unwrap();
    let (v, _) = w.in_a(&udp(w.s, w.c, &fake));
    assert_eq!(reason(&v), Some("unexpected_token"));
    let (_, _) = w.in_b(&syn.packet);
    let synack = take(&mut w.b).remove(0);
    let (v, _) = w.in_a(&synack.packet);
    assert!(consumed(&v), "the handshake went on: {v:?}");
}

#[test]
fn a_replayed_handshake_authorizes_nothing() {
    let mut w = World::new(Mode::Psk, DB_UDP_FROM_WEB);
    let (syn, ack) = prove(&mut w);
    // An attacker replays SYN and ACK from another port (the packets' tuple rewritten): the
    // SYN's nonce is in the replay cache since the ACK proved it, the ACK fits no handshake,
    // and the data has none.
    let rewrite = |p: &[u8], port: u16| {
        let mut q = p.to_vec();
        q[20..22].copy_from_slice(&port.to_be_bytes());
        q
    };
    let (v, _) = w.in_b(&rewrite(&syn.packet, 41000));
    assert_eq!(reason(&v), Some("replay"), "{v:?}");
    assert!(take(&mut w.b).is_empty(), "no answer to a replay");
    let (v, _) = w.in_b(&rewrite(&ack.packet, 41000));
    assert_eq!(reason(&v), Some("unexpected_token"), "{v:?}");
    let (v, _) = w.in_b(&udp(SocketAddr::new(WEB.ip, 41000), w.s, b"data"));
    assert_eq!(reason(&v), Some("udp_unauthenticated"), "{v:?}");
}

#[test]
fn holding_is_bounded_per_flow() {
    let mut w = World::new(Mode::Psk, DB_UDP_FROM_WEB);
    for i in 0..8u8 {
        let (v, _) = w.out_a(&udp(w.c, w.s, &[i]));
        assert!(consumed(&v));
    }
    let (v, _) = w.out_a(&udp(w.c, w.s, b"ninth"));
    assert_eq!(reason(&v), Some("udp_hold_full"));
}

#[test]
fn an_agentless_peer_that_answers_is_known_without_waiting() {
    // A resolver without an agent answers our SYN control as it would a malformed query: the
    // flow is decided on its address at once, the held query leaves, the answer is dropped.
    let mut w = World::new(Mode::Psk, INGRESS_DENY);
    let (v, _) = w.out_a(&udp(w.c, w.s, b"query"));
    assert!(consumed(&v));
    let syn = take(&mut w.a);
    assert_eq!(syn.len(), 1);
    let (v, _) = w.in_a(&udp(w.s, w.c, b"FORMERR"));
    assert_eq!(reason(&v), Some("udp_handshake_pending"));
    let out = take(&mut w.a);
    assert_eq!(out.len(), 1, "{out:?}");
    assert_eq!(payload(&out[0].packet), b"query");
    assert_eq!(out[0].mark, EmitMark::Authorized);
    assert_eq!(w.a.next_udp_timer(), None, "nothing left to wait for");
}

#[test]
fn an_echo_service_reflecting_our_syn_is_agentless() {
    let mut w = World::new(Mode::Psk, INGRESS_DENY);
    let (v, _) = w.out_a(&udp(w.c, w.s, b"hello"));
    assert!(consumed(&v));
    let syn = take(&mut w.a).remove(0);
    // The echo service sends our SYN control back, addresses and ports swapped.
    let reflected = udp(w.s, w.c, payload(&syn.packet));
    let (v, _) = w.in_a(&reflected);
    assert_eq!(reason(&v), Some("udp_handshake_pending"));
    let out = take(&mut w.a);
    assert_eq!(out.len(), 1);
    assert_eq!(payload(&out[0].packet), b"hello");
}

#[test]
fn a_policy_change_cuts_an_authenticated_udp_flow_at_both_ends() {
    let mut w = World::new(Mode::Psk, DB_UDP_FROM_WEB);
    let out = handshake(&mut w, &[b"x"]);
    let (v, _) = w.in_b(&out[0].packet);
    assert!(consumed(&v));
    let (v, _) = w.in_b(&out[1].packet);
    assert!(v.accept && v.mark_authorized);
    // db now accepts UDP from nobody.
    let parsed = policy::objects::parse("change.yaml", &DB_UDP_FROM_WEB.replace("5432", "5499"));
    let report = policy::objects::load(w.b.engine_mut(), &parsed.objects);
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    let cuts = w.b.recheck(w.now);
    assert_eq!(cuts.len(), 1, "{cuts:?}");
    // The flow's conntrack entry is gone; its next datagram reaches the queue and is refused,
    // not authorized again by the handshake's lingering state.
    let (v, _) = w.in_b(&udp(w.c, w.s, b"after"));
    assert_eq!(reason(&v), Some("udp_unauthenticated"), "{v:?}");
}

#[test]
fn a_new_handshake_on_a_proven_tuple_is_answered_and_a_late_syn_copy_is_a_replay() {
    let mut w = World::new(Mode::Psk, DB_UDP_FROM_WEB);
    let (syn, _) = prove(&mut w);
    // A late copy of the first SYN: refused as a replay, nothing answered.
    let (v, _) = w.in_b(&syn.packet);
    assert_eq!(reason(&v), Some("replay"), "{v:?}");
    assert!(take(&mut w.b).is_empty());
    // The client forgot the flow (its conntrack entry was cut) and starts over on the tuple.
    w.a = processor(
        nodes(Mode::Psk, "world").0,
        &format!("{NS}\n---\n{DB_UDP_FROM_WEB}"),
        &[&WEB],
        Default::default(),
    );
    w.now += 1;
    let (v, _) = w.out_a(&udp(w.c, w.s, b"again"));
    assert!(consumed(&v));
    let syn2 = take(&mut w.a).remove(0);
    let (v, _) = w.in_b(&syn2.packet);
    assert!(consumed(&v), "{v:?}");
    assert_eq!(take(&mut w.b).len(), 1, "a SYN-ACK for the new handshake");
}

/// A peer whose agent answered before and now does not (loss, or a loaded node) is not taken
/// for agentless: the unanswered flow's held datagrams are dropped (`udp_no_answer`), nothing
/// is decided on the address, and the next flow to it is proven by a handshake again.
#[test]
fn a_known_agent_that_does_not_answer_is_not_taken_for_agentless() {
    let mut w = World::new(Mode::Psk, "");
    prove(&mut w);
    let by_address = w.a.metrics().authorized_by_address();
    let mut second = w.c;
    second.set_port(40001);
    let (v, _) = w.out_a(&udp(second, w.s, b"lost"));
    assert!(consumed(&v), "held: {v:?}");
    // Every SYN control of this flow is lost: the server never sees them.
    while let Some(t) = w.a.next_udp_timer() {
        w.now = t;
        w.a.poll_udp(t, &mut w.rng);
        assert!(
            take(&mut w.a).iter().all(is_control),
            "nothing released on the address"
        );
    }
    assert_eq!(w.a.metrics().rejected("udp_no_answer"), 1);
    assert_eq!(w.a.metrics().authorized_by_address(), by_address);
    // The next flow still gets a handshake (one SYN control, its datagram held).
    let mut third = w.c;
    third.set_port(40002);
    let (v, _) = w.out_a(&udp(third, w.s, b"next"));
    assert!(consumed(&v), "held for a handshake: {v:?}");
    let out = take(&mut w.a);
    assert_eq!(out.len(), 1);
    assert!(is_control(&out[0]));
}

#[test]
fn a_flood_of_syn_controls_that_pass_ingress_does_not_lock_udp_out() {
    const MAX: usize = 16;
    for mode in [Mode::Psk, Mode::Pki] {
        let config = datapath::ProcessorConfig {
            udp_max_flows: MAX,
            ..datapath::ProcessorConfig::default()
        };
        let mut w = World::with(mode, DB_UDP_FROM_WEB, &WEB, &DB, config);
        // SYN controls with genuine-looking tokens (claims of web, fresh nonces) that never
        // get their ACK: made by a node with the client's key, whose state is thrown away, and
        // sent from ports of the attacker's choosing. Each passes ingress and holds a flow.
        let mut source = World::new(mode, DB_UDP_FROM_WEB);
        let mut flood = |w: &mut World, n: u16| {
            source.port(20_000 + n);
            let (v, _) = source.out_a(&udp(source.c, source.s, b"x"));
            assert!(consumed(&v));
            let syn = take(&mut source.a).remove(0);
            let mut p = syn.packet;
            p[20..22].copy_from_slice(&(30_000 + n).to_be_bytes());
            let (v, _) = w.in_b(&p);
            assert!(consumed(&v), "the flood passes ingress: {v:?}");
            take(&mut w.b);
        };
        for n in 0..10 * MAX as u16 {
            flood(&mut w, n);
        }
        // A genuine flow still gets its handshake, with the flood going on between its steps.
        let (v, _) = w.out_a(&udp(w.c, w.s, b"one"));
        assert!(consumed(&v));
        let syn = take(&mut w.a).remove(0);
        let (v, _) = w.in_b(&syn.packet);
        assert!(consumed(&v), "{v:?}");
        let synack = take(&mut w.b).remove(0);
        for n in 0..MAX as u16 / 4 {
            flood(&mut w, 1000 + n);
        }
        let (v, _) = w.in_a(&synack.packet);
        assert!(consumed(&v), "{v:?}");
        let out = take(&mut w.a);
        assert_eq!(out.len(), 2, "the ACK and the held datagram: {out:?}");
        for n in 0..MAX as u16 / 4 {
            flood(&mut w, 2000 + n);
        }
        let (v, _) = w.in_b(&out[0].packet);
        assert!(consumed(&v), "ACK: {v:?}");
        let (v, _) = w.in_b(&out[1].packet);
        assert!(v.accept && v.mark_authorized, "{v:?}");
        assert_eq!(payload(&out[1].packet), b"one");
        assert_eq!(w.b.metrics().rejected("flow_table_full"), 0);
        assert!(w.b.metrics().flows_evicted() > 0);
    }
}

/// A compromised workload (web-2) sends datagrams without end to private addresses that never
/// answer: each is a new flow in handshake, with its datagram held. It cannot take the node's
/// UDP table (a full one evicts web-2's own older flows) nor all the room for held datagrams
/// (a workload holds at most its share of `udp_held`), so web-1's next flow is proven and its
/// datagram released.
#[test]
fn a_local_workload_opening_udp_flows_without_end_does_not_lock_its_neighbours_out() {
    const MAX: usize = 16;
    for mode in [Mode::Psk, Mode::Pki] {
        let config = datapath::ProcessorConfig {
            udp_max_flows: MAX,
            udp_held: held_limits(8, 1 << 20, 4, 1 << 20),
            ..datapath::ProcessorConfig::default()
        };
        let mut n = 0u16;
        let mut flood = |w: &mut World, count: usize| {
            for _ in 0..count {
                let src = SocketAddr::new(WEB_2.ip, 20_000 + n);
                let dst = SocketAddr::new(
                    std::net::Ipv4Addr::new(10, 9, (n / 250) as u8, (n % 250) as u8 + 1).into(),
                    53,
                );
                let (v, _) = w.out_a2(&udp(src, dst, b"flood"));
                assert!(
                    consumed(&v) || reason(&v) == Some("udp_hold_full"),
                    "a new flow of web-2's: {v:?}"
                );
                assert!(take(&mut w.a).iter().all(is_control), "SYN controls only");
                n += 1;
            }
        };
        // The room for held datagrams first, in a table with room for every flow: web-2 holds
        // its share, and web-1 still holds its datagram (without the share, web-2 would hold
        // all 8 and web-1's would be dropped as udp_hold_full).
        let roomy = datapath::ProcessorConfig {
            udp_max_flows: 64,
            ..config
        };
        let mut w = World::with_neighbour(mode, DB_UDP_FROM_WEB, roomy);
        flood(&mut w, 10);
        assert_eq!(w.a.metrics().rejected("udp_hold_full"), 6);
        let (v, _) = w.out_a(&udp(w.c, w.s, b"held"));
        assert!(consumed(&v), "held: {v:?}");
        // Then a full table.
        let mut w = World::with_neighbour(mode, DB_UDP_FROM_WEB, config);
        flood(&mut w, 10 * MAX);
        // web-1's flow gets its handshake, with the flood going on between its steps.
        let (v, _) = w.out_a(&udp(w.c, w.s, b"one"));
        assert!(consumed(&v), "held: {v:?}");
        let syn = take(&mut w.a).remove(0);
        flood(&mut w, MAX / 4);
        let (v, _) = w.in_b(&syn.packet);
        assert!(consumed(&v), "{v:?}");
        let synack = take(&mut w.b).remove(0);
        flood(&mut w, MAX / 4);
        let (v, _) = w.in_a(&synack.packet);
        assert!(consumed(&v), "{v:?}");
        let out = take(&mut w.a);
        assert_eq!(out.len(), 2, "the ACK and the held datagram: {out:?}");
        let (v, _) = w.in_b(&out[0].packet);
        assert!(consumed(&v), "ACK: {v:?}");
        let (v, _) = w.in_b(&out[1].packet);
        assert!(v.accept && v.mark_authorized, "{v:?}");
        assert_eq!(payload(&out[1].packet), b"one");
        assert_eq!(w.a.metrics().rejected("flow_table_full"), 0);
        assert!(w.a.metrics().flows_evicted_from_workloads() > 0);
        assert!(
            w.a.metrics().rejected("udp_hold_full") > 0,
            "web-2 hit its share"
        );
    }
}

/// The agent remembers which peer addresses have an agent, so that a plain datagram with such
/// an address is refused rather than decided on the address. A workload that talks to
/// thousands of agentless addresses (each answers with a plain datagram, as a resolver would)
/// does not make it forget them: the agentless ones are remembered apart.
#[test]
fn many_agentless_peers_do_not_make_the_agent_forget_the_peers_with_agents() {
    let mut w = World::new(Mode::Psk, DB_UDP_FROM_WEB);
    prove(&mut w);
    // A plain datagram with db's address, on a tuple of its own (web has no ingress policy,
    // so only db's proven agent stands in its way).
    let spoof = |w: &mut World| {
        let mut local = w.c;
        local.set_port(7000);
        let (v, _) = w.in_a(&udp(SocketAddr::new(w.s.ip(), 6000), local, b"spoofed"));
        reason(&v)
    };
    assert_eq!(spoof(&mut w), Some("udp_unauthenticated"));
    for n in 0..10_000u32 {
        let peer = SocketAddr::new(
            std::net::Ipv4Addr::new(10, 9, (n / 250) as u8, (n % 250) as u8 + 1).into(),
            53,
        );
        let mut local = w.c;
        local.set_port(20_000 + (n % 40_000) as u16);
        let (v, _) = w.out_a(&udp(local, peer, b"query"));
        assert!(consumed(&v), "held for a handshake: {v:?}");
        let (v, _) = w.in_a(&udp(peer, local, b"answer"));
        assert_eq!(reason(&v), Some("udp_handshake_pending"), "{v:?}");
        take(&mut w.a);
    }
    assert_eq!(spoof(&mut w), Some("udp_unauthenticated"));
}

/// The room for held datagrams is counted in bytes too: large datagrams (a 64 KiB packet
/// queued before fragmentation) fill a workload's share long before its count.
#[test]
fn held_datagrams_are_bounded_in_bytes() {
    let config = datapath::ProcessorConfig {
        udp_held: held_limits(1024, 64 << 10, 256, 32 << 10),
        ..datapath::ProcessorConfig::default()
    };
    let mut w = World::with_neighbour(Mode::Psk, DB_UDP_FROM_WEB, config);
    let big = vec![7u8; 8 << 10];
    // web-2 holds four 8 KiB datagrams (its 32 KiB), the fifth is dropped.
    for n in 0..5u16 {
        let src = SocketAddr::new(WEB_2.ip, 20_000 + n);
        let (v, _) = w.out_a2(&udp(src, w.s, &big));
        if n < 3 {
            assert!(consumed(&v), "held: {v:?}");
        } else if n == 4 {
            assert_eq!(reason(&v), Some("udp_hold_full"), "{v:?}");
        }
    }
    // web-1 still holds its own.
    let (v, _) = w.out_a(&udp(w.c, w.s, &big));
    assert!(consumed(&v), "held: {v:?}");
}

// The bound handshake for UDP: once a verified SYN-ACK (of either protocol) taught node-a the
// node behind the server's address, a new flow there takes two control datagrams. The server's
// agent authorizes the client at its bound SYN and marks the flow as its bound SYN-ACK leaves;
// the client's agent releases the held datagrams at that SYN-ACK, and no ACK follows.

use identity::wire::{TYPE_SYN, TYPE_SYN_ACK, TYPE_SYN_ACK_BOUND, TYPE_SYN_BOUND};

/// A first flow (three tokens) taught node-a the server's node; the client then uses `port`.
fn taught_udp(mode: Mode, port: u16) -> World {
    let mut w = World::new(mode, DB_UDP_FROM_WEB);
    prove(&mut w);
    assert_eq!(w.a.metrics().bound("sent"), 0);
    w.port(port);
    w
}

/// The client's agent holds `data` and sends its SYN control: that control.
fn hello(w: &mut World, data: &[u8]) -> Outgoing {
    let (v, _) = w.out_a(&udp(w.c, w.s, data));
    assert!(consumed(&v), "held: {v:?}");
    let mut out = take(&mut w.a);
    assert_eq!(out.len(), 1, "one SYN control: {out:?}");
    assert!(is_control(&out[0]));
    out.remove(0)
}

#[test]
fn a_udp_flow_to_a_known_node_takes_two_control_datagrams() {
    for mode in [Mode::Psk, Mode::Pki] {
        let mut w = taught_udp(mode, 41000);
        let syn = hello(&mut w, b"one");
        assert_eq!(control_kind(&syn), Some(TYPE_SYN_BOUND), "{mode:?}");
        let (v, _) = w.out_a(&udp(w.c, w.s, b"two"));
        assert!(consumed(&v), "held too: {v:?}");
        let (v, _) = w.in_b(&syn.packet);
        assert!(consumed(&v), "{mode:?}: {v:?}");
        let answer = take(&mut w.b);
        assert_eq!(answer.len(), 1, "{answer:?}");
        assert_eq!(control_kind(&answer[0]), Some(TYPE_SYN_ACK_BOUND));
        assert_eq!(
            answer[0].mark,
            EmitMark::ControlAuthorized,
            "the answer marks the flow at the server as it leaves"
        );
        assert_eq!(w.b.metrics().authorized(), (2, 0), "{mode:?}");
        assert_eq!(w.b.metrics().bound("authorized"), 1);
        let (v, _) = w.in_a(&answer[0].packet);
        assert!(consumed(&v), "{v:?}");
        let out = take(&mut w.a);
        let released: Vec<&[u8]> = out.iter().map(|o| payload(&o.packet)).collect();
        assert_eq!(released, [&b"one"[..], b"two"], "no ACK, the data in order");
        assert!(out.iter().all(|o| o.mark == EmitMark::Authorized));
        assert_eq!(w.a.metrics().authorized(), (2, 0));
        assert_eq!(w.a.metrics().bound("sent"), 1);
        assert_eq!(w.a.metrics().bound("completed"), 1);
        // Counted as UDP's, none as TCP's.
        let (udp, tcp) = (policy::Protocol::Udp, policy::Protocol::Tcp);
        assert_eq!(w.a.metrics().bound_of(udp, "completed"), 1);
        assert_eq!(w.b.metrics().bound_of(udp, "authorized"), 1);
        assert_eq!(w.a.metrics().bound_of(tcp, "sent"), 0);
        let mut text = String::new();
        w.b.metrics().render_prometheus(&mut text);
        assert!(
            text.contains(
                "tessera_bound_handshakes_total{protocol=\"udp\",event=\"authorized\"} 1\n"
            ),
            "{text}"
        );
        // Were a datagram still queued at the server (marked there, it is not), it passes.
        let (v, _) = w.in_b(&out[0].packet);
        assert!(v.accept && v.mark_authorized, "{v:?}");
        // A duplicate of the bound SYN gets the same answer, which authorizes nothing new; the
        // client takes a duplicate answer silently.
        let (v, _) = w.in_b(&syn.packet);
        assert!(consumed(&v), "{v:?}");
        let again = take(&mut w.b);
        assert_eq!(again, answer);
        assert_eq!(w.b.metrics().authorized(), (2, 0));
        let (v, _) = w.in_a(&again[0].packet);
        assert!(consumed(&v), "{v:?}");
        assert!(take(&mut w.a).is_empty(), "nothing answers a bound SYN-ACK");
        assert_eq!(w.a.metrics().rejected_total(), 0);
        assert_eq!(w.b.metrics().rejected_total(), 0);
    }
}

#[test]
fn a_tcp_syn_ack_teaches_the_node_for_udp_and_a_bound_syn_can_be_refused() {
    // ALLOW lets web reach db on TCP 5432, not UDP: the TCP connection's verified SYN-ACK
    // teaches node-a db's node; the UDP flow's SYN is bound, proven, and refused by ingress.
    let mut w = World::new(Mode::Psk, ALLOW);
    w.connect();
    w.port(41000);
    let syn = hello(&mut w, b"x");
    assert_eq!(control_kind(&syn), Some(TYPE_SYN_BOUND));
    let (v, _) = w.in_b(&syn.packet);
    assert_eq!(reason(&v), Some("policy_ingress"));
    let refused = take(&mut w.b);
    assert_eq!(refused.len(), 1, "{refused:?}");
    assert_eq!(
        control_kind(&refused[0]),
        Some(identity::wire::TYPE_UDP_REFUSED)
    );
    let (v, _) = w.in_a(&refused[0].packet);
    assert_eq!(reason(&v), Some("udp_refused"));
    assert!(take(&mut w.a).is_empty(), "nothing released");
    assert_eq!(w.b.metrics().bound("authorized"), 0);
}

#[test]
fn a_lost_bound_syn_ack_is_recovered_by_a_plain_syn() {
    let mut w = taught_udp(Mode::Psk, 41000);
    let syn = hello(&mut w, b"x");
    let (v, _) = w.in_b(&syn.packet);
    assert!(consumed(&v));
    let _lost = take(&mut w.b);
    // The timer re-sends the SYN plain, with a fresh nonce: the server's agent starts a
    // three-token handshake on the tuple, which completes.
    w.now += 25;
    w.a.poll_udp(w.now, &mut w.rng);
    let out = take(&mut w.a);
    assert_eq!(out.len(), 1, "{out:?}");
    assert_eq!(control_kind(&out[0]), Some(TYPE_SYN));
    assert_eq!(w.a.metrics().bound("retransmitted_plain"), 1);
    let (v, _) = w.in_b(&out[0].packet);
    assert!(consumed(&v), "{v:?}");
    let synack = take(&mut w.b);
    assert_eq!(control_kind(&synack[0]), Some(TYPE_SYN_ACK));
    let (v, _) = w.in_a(&synack[0].packet);
    assert!(consumed(&v), "{v:?}");
    let out = take(&mut w.a);
    assert_eq!(out.len(), 2, "ACK and the datagram: {out:?}");
    assert_eq!(payload(&out[1].packet), b"x");
    let (v, _) = w.in_b(&out[0].packet);
    assert_eq!(v, Verdict::consume_marking(true, None));
    // The plain SYN was answered where the bound one was not: that node gets plain SYNs for a
    // while, and the next flow to it is plain.
    assert_eq!(
        w.a.metrics()
            .bound_of(policy::Protocol::Udp, "node_silenced"),
        1
    );
    w.port(41001);
    let next = hello(&mut w, b"y");
    assert_eq!(control_kind(&next), Some(TYPE_SYN));
}

#[test]
fn an_unanswered_bound_syn_goes_plain_and_a_plain_answer_to_it_proves_nothing() {
    // A server agent older than the bound handshake drops the bound SYN's type.
    let mut w = taught_udp(Mode::Psk, 41000);
    let syn = hello(&mut w, b"x");
    let old = identity::parse_udp_control(payload(&syn.packet));
    assert!(old.is_ok());
    // A plain datagram answering it (forged, or the address moved) is dropped: the peer is
    // not taken as agentless, nothing is released.
    let (v, _) = w.in_a(&udp(w.s, w.c, b"FORMERR"));
    assert_eq!(reason(&v), Some("bound_syn_ack_without_token"));
    assert!(take(&mut w.a).is_empty());
    // Reflected, it is no SYN of a peer either.
    let (v, _) = w.in_a(&udp(w.s, w.c, payload(&syn.packet)));
    assert_eq!(reason(&v), Some("unexpected_token"));
    assert!(take(&mut w.a).is_empty());
    w.now += 25;
    w.a.poll_udp(w.now, &mut w.rng);
    let plain = take(&mut w.a);
    assert_eq!(control_kind(&plain[0]), Some(TYPE_SYN));
    let out = exchange_from(&mut w, &plain[0]);
    assert_eq!(out.len(), 2, "ACK and the datagram: {out:?}");
    assert_eq!(payload(&out[1].packet), b"x");
}

/// The server's answer to `syn`, fed back to the client: what the client emitted then.
fn exchange_from(w: &mut World, syn: &Outgoing) -> Vec<Outgoing> {
    let (v, _) = w.in_b(&syn.packet);
    assert!(consumed(&v), "{v:?}");
    let answer = take(&mut w.b);
    assert_eq!(answer.len(), 1, "{answer:?}");
    let (v, _) = w.in_a(&answer[0].packet);
    assert!(consumed(&v), "{v:?}");
    take(&mut w.a)
}

#[test]
fn a_bound_syn_moved_or_replayed_authorizes_nothing() {
    let mut w = taught_udp(Mode::Psk, 41000);
    let syn = hello(&mut w, b"x");
    // Kept from the server and sent from another port first: the binding's MAC covers the
    // source, so it is a plain SYN there, answered with a plain SYN-ACK that only the genuine
    // client's agent could answer.
    let moved = udp(SocketAddr::new(WEB.ip, 41500), w.s, payload(&syn.packet));
    let (v, _) = w.in_b(&moved);
    assert!(consumed(&v), "{v:?}");
    assert_eq!(w.b.metrics().bound("binding_bad_mac"), 1);
    let answer = take(&mut w.b);
    assert_eq!(control_kind(&answer[0]), Some(TYPE_SYN_ACK));
    assert_eq!(w.b.metrics().authorized(), (1, 0), "only the first flow");
    let (v, _) = w.in_b(&udp(SocketAddr::new(WEB.ip, 41500), w.s, b"data"));
    assert!(v.requeue && !v.mark_authorized, "waits for an ACK: {v:?}");
    let asked = take(&mut w.b);
    assert_eq!(
        control_kind(&asked[0]),
        Some(TYPE_SYN_ACK),
        "the ACK asked for"
    );
    // The genuine bound SYN still works from its own source.
    let out = exchange_from(&mut w, &syn);
    assert_eq!(out.len(), 1, "the datagram, no ACK: {out:?}");
    assert_eq!(w.b.metrics().bound("authorized"), 1);
    // After the linger, a replay from its own source is a replay.
    w.now += 5_000;
    w.b.expire(w.now);
    let (v, _) = w.in_b(&syn.packet);
    assert_eq!(reason(&v), Some("replay"), "{v:?}");
    assert!(take(&mut w.b).is_empty());
    assert_eq!(w.b.metrics().authorized(), (2, 0));
}

#[test]
fn without_the_bound_handshake_every_udp_flow_takes_three_tokens() {
    let config = datapath::ProcessorConfig {
        bound_handshake: false,
        ..datapath::ProcessorConfig::default()
    };
    let mut w = World::with(Mode::Psk, DB_UDP_FROM_WEB, &WEB, &DB, config);
    prove(&mut w);
    w.port(41000);
    let syn = hello(&mut w, b"x");
    assert_eq!(control_kind(&syn), Some(TYPE_SYN));
    assert_eq!(w.a.metrics().bound("sent"), 0);
}

#[test]
fn a_bound_syn_whose_source_is_rewritten_on_the_way_takes_the_three_tokens() {
    // Port 41000 leaves the client's node as 41500 (SNAT) and comes back as 41000: the binding
    // does not verify at the server (`binding_bad_mac`), which answers plainly; the client's
    // agent takes the plain SYN-ACK (`answered_plain`) and the ACK proves the flow.
    let mut w = taught_udp(Mode::Psk, 41000);
    let natted = SocketAddr::new(w.c.ip(), 41500);
    let syn = hello(&mut w, b"behind NAT");
    let (v, _) = w.in_b(&udp(natted, w.s, payload(&syn.packet)));
    assert!(consumed(&v), "{v:?}");
    assert_eq!(w.b.metrics().bound("binding_bad_mac"), 1);
    let answer = take(&mut w.b);
    assert_eq!(control_kind(&answer[0]), Some(TYPE_SYN_ACK));
    let (v, _) = w.in_a(&udp(w.s, w.c, payload(&answer[0].packet)));
    assert!(consumed(&v), "{v:?}");
    assert_eq!(w.a.metrics().bound("answered_plain"), 1);
    let out = take(&mut w.a);
    assert_eq!(out.len(), 2, "ACK and the datagram: {out:?}");
    assert_eq!(control_kind(&out[0]), Some(identity::wire::TYPE_ACK));
    let (v, _) = w.in_b(&udp(natted, w.s, payload(&out[0].packet)));
    assert_eq!(v, Verdict::consume_marking(true, None));
    assert_eq!(w.b.metrics().authorized(), (2, 0));
    assert_eq!(w.b.metrics().bound("authorized"), 0);
}

#[test]
fn a_bound_syn_and_its_plain_retransmissions_unanswered_silence_nothing() {
    // The server is gone (nothing answers at all): the handshake gives up, and the node is not
    // taken as one that ignores bound SYNs; the next flow to it is bound.
    let mut w = taught_udp(Mode::Psk, 41000);
    let syn = hello(&mut w, b"x");
    assert_eq!(control_kind(&syn), Some(TYPE_SYN_BOUND));
    for later in [25, 75, 175, 400, 1_000] {
        w.a.poll_udp(w.now + later, &mut w.rng);
        for o in take(&mut w.a) {
            assert_ne!(control_kind(&o), Some(TYPE_SYN_BOUND), "re-sent plain");
        }
    }
    assert_eq!(w.a.metrics().bound("retransmitted_plain"), 1);
    assert_eq!(w.a.metrics().bound("node_silenced"), 0);
    w.now += 1_000;
    w.port(41001);
    let next = hello(&mut w, b"y");
    assert_eq!(control_kind(&next), Some(TYPE_SYN_BOUND));
}
