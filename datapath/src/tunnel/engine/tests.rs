#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Two (or three) tunnels joined by an in-memory wire: handshakes, data both ways, and what
//! hostile datagrams and packets do to the counters (never a panic, never a delivery).

use std::net::{Ipv4Addr, SocketAddr};

use super::*;
use crate::tunnel::PeerConfig;

const A_EP: &str = "10.201.0.1:51871";
const B_EP: &str = "10.201.0.2:51871";
const C_EP: &str = "10.201.0.3:51871";
const STRANGER: &str = "192.0.2.66:40000";

/// What one tunnel emitted.
#[derive(Default)]
struct Wire {
    sent: Vec<(SocketAddr, Vec<u8>)>,
    delivered: Vec<Vec<u8>>,
    refuse: bool,
}

impl Outputs for Wire {
    fn send(&mut self, to: SocketAddr, datagram: &[u8]) -> bool {
        self.sent.push((to, datagram.to_vec()));
        !self.refuse
    }
    fn deliver(&mut self, packet: &[u8]) -> bool {
        self.delivered.push(packet.to_vec());
        !self.refuse
    }
}

fn secret(n: u8) -> StaticSecret {
    StaticSecret::from_bytes([n; 32])
}

fn ep(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn peer(name: &str, key: PublicKey, endpoint: &str, allowed: &[&str]) -> PeerConfig {
    PeerConfig {
        name: name.into(),
        public_key: key,
        endpoint: ep(endpoint),
        allowed_ips: allowed.iter().map(|a| a.parse().unwrap()).collect(),
    }
}

/// An IPv4 packet (UDP, no checksum needed by the tunnel) from `src` to `dst` with `payload`.
fn ipv4(src: &str, dst: &str, payload: &[u8]) -> Vec<u8> {
    let (s, d): (Ipv4Addr, Ipv4Addr) = (src.parse().unwrap(), dst.parse().unwrap());
    let len = 28 + payload.len();
    let mut p = vec![0u8; 20];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&(len as u16).to_be_bytes());
    p[8] = 64;
    p[9] = 17;
    p[12..16].copy_from_slice(&s.octets());
    p[16..20].copy_from_slice(&d.octets());
    p.extend_from_slice(&[0x9c, 0x40, 0x9c, 0x41]);
    p.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    p.extend_from_slice(&[0, 0]);
    p.extend_from_slice(payload);
    p
}

/// Nodes a (10.202.1.0/24) and b (10.202.2.0/24), each with the other as its only peer.
fn pair() -> (Tunnel, Tunnel) {
    let (sa, sb) = (secret(1), secret(2));
    let a = Tunnel::new(
        &sa,
        vec![peer("b", sb.public_key(), B_EP, &["10.202.2.0/24"])],
    )
    .unwrap();
    let b = Tunnel::new(
        &sb,
        vec![peer("a", sa.public_key(), A_EP, &["10.202.1.0/24"])],
    )
    .unwrap();
    (a, b)
}

/// Moves datagrams between the tunnels at the given endpoints until none is in flight; returns
/// what each delivered. Datagrams to other addresses are dropped (and returned in `lost`).
struct Net {
    now: u64,
    delivered: Vec<(SocketAddr, Vec<u8>)>,
    lost: Vec<(SocketAddr, Vec<u8>)>,
}

impl Net {
    fn new() -> Net {
        Net {
            now: 1_000,
            delivered: Vec::new(),
            lost: Vec::new(),
        }
    }

    fn run(
        &mut self,
        nodes: &mut [(SocketAddr, &mut Tunnel)],
        mut in_flight: Vec<(SocketAddr, SocketAddr, Vec<u8>)>,
    ) {
        let mut rounds = 0;
        while let Some((from, to, d)) = in_flight.pop() {
            rounds += 1;
            assert!(rounds < 1000, "the tunnels ping-pong forever");
            let Some((_, t)) = nodes.iter_mut().find(|(e, _)| *e == to) else {
                self.lost.push((to, d));
                continue;
            };
            let mut w = Wire::default();
            t.handle_datagram(self.now, from, &d, &mut w);
            in_flight.extend(w.sent.into_iter().map(|(dst, d)| (to, dst, d)));
            self.delivered
                .extend(w.delivered.into_iter().map(|p| (to, p)));
        }
    }

    /// `t` (at `at`) reads `packet` from its TUN device; everything that follows is run.
    fn send(&mut self, at: SocketAddr, nodes: &mut [(SocketAddr, &mut Tunnel)], packet: &[u8]) {
        self.act(at, nodes, |t, w| t.handle_tun_packet(packet, w));
    }

    /// `t` (at `at`) starts the handshakes its last change left to start; everything that
    /// follows is run. Returns how many datagrams `t` sent.
    fn start(&mut self, at: SocketAddr, nodes: &mut [(SocketAddr, &mut Tunnel)]) -> usize {
        self.act(at, nodes, |t, w| t.start_handshakes(w))
    }

    fn act(
        &mut self,
        at: SocketAddr,
        nodes: &mut [(SocketAddr, &mut Tunnel)],
        f: impl FnOnce(&mut Tunnel, &mut Wire),
    ) -> usize {
        let mut w = Wire::default();
        let (_, t) = nodes.iter_mut().find(|(e, _)| *e == at).unwrap();
        f(t, &mut w);
        assert!(w.delivered.is_empty());
        let sent = w.sent.len();
        self.run(
            nodes,
            w.sent.into_iter().map(|(to, d)| (at, to, d)).collect(),
        );
        sent
    }
}

/// Makes the handshake (a sends first, one packet).
fn handshake(a: &mut Tunnel, b: &mut Tunnel, net: &mut Net) {
    let p = ipv4("10.202.1.5", "10.202.2.5", b"hello");
    net.send(ep(A_EP), &mut [(ep(A_EP), a), (ep(B_EP), b)], &p);
    assert_eq!(net.delivered, [(ep(B_EP), p)]);
    net.delivered.clear();
}

/// [`pair`] with a session (a sent first), and the wire that made it.
fn connected() -> (Tunnel, Tunnel, Net) {
    let (mut a, mut b) = pair();
    let mut net = Net::new();
    handshake(&mut a, &mut b, &mut net);
    (a, b, net)
}

/// The next data message `t` sends to the peer at `to` for `packet` (returned, not delivered).
fn data_message(t: &mut Tunnel, to: &str, packet: &[u8]) -> Vec<u8> {
    let mut w = Wire::default();
    t.handle_tun_packet(packet, &mut w);
    assert_eq!(w.sent.len(), 1);
    let (dst, d) = w.sent.pop().unwrap();
    assert_eq!(dst, ep(to));
    assert_eq!(d[0], MSG_DATA);
    d
}

/// Every drop the tunnel counted, with or without a peer.
fn drops(t: &Tunnel) -> u64 {
    let s = t.stats(0);
    s.dropped.iter().map(|(_, n)| n).sum::<u64>()
        + s.peers
            .iter()
            .flat_map(|p| &p.errors)
            .map(|(_, n)| n)
            .sum::<u64>()
}

#[test]
fn a_handshake_carries_the_queued_packet_and_data_flows_both_ways() {
    let (mut a, mut b) = pair();
    let mut net = Net::new();
    let first = ipv4("10.202.1.5", "10.202.2.5", b"queued during the handshake");
    let mut w = Wire::default();
    a.handle_tun_packet(&first, &mut w);
    assert_eq!(w.sent.len(), 1, "the initiation");
    assert_eq!(w.sent[0].0, ep(B_EP));
    assert_eq!(w.sent[0].1[0], MSG_INIT);
    assert_eq!(w.sent[0].1.len(), 148);
    net.now = 5_000;
    net.run(
        &mut [(ep(A_EP), &mut a), (ep(B_EP), &mut b)],
        vec![(ep(A_EP), ep(B_EP), w.sent[0].1.clone())],
    );
    assert_eq!(net.delivered, [(ep(B_EP), first.clone())]);
    assert!(net.lost.is_empty());

    let back = ipv4("10.202.2.5", "10.202.1.5", b"answer");
    net.delivered.clear();
    net.send(
        ep(B_EP),
        &mut [(ep(A_EP), &mut a), (ep(B_EP), &mut b)],
        &back,
    );
    assert_eq!(net.delivered, [(ep(A_EP), back.clone())]);

    let sa = a.stats(65_000);
    let pb = sa.peer("b").unwrap();
    assert_eq!(pb.handshakes, 1);
    assert_eq!(pb.last_handshake_ms, Some(5_000));
    assert_eq!(pb.handshake_age, Some(std::time::Duration::from_secs(60)));
    assert_eq!(pb.tx_bytes, first.len() as u64);
    assert_eq!(pb.rx_bytes, back.len() as u64);
    assert_eq!(pb.rx_packets, 1);
    // The keepalive that confirmed the session, then the queued packet.
    assert_eq!(pb.tx_packets, 2);
    assert!(pb.errors.is_empty(), "{:?}", pb.errors);
    assert!(sa.dropped.is_empty());
    let pa = b.stats(65_000);
    let pa = pa.peer("a").unwrap();
    assert_eq!(pa.handshakes, 1);
    assert_eq!(pa.rx_packets, 1);
    assert_eq!(pa.tx_packets, 1);
}

#[test]
fn garbage_from_anywhere_is_counted_and_never_breaks_the_session() {
    let (mut a, mut b, mut net) = connected();

    // Every message type byte with a range of lengths (the real ones included), from a
    // stranger and from the peer's own endpoint; filled with xorshift noise.
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut noise = |n: usize| -> Vec<u8> {
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    };
    let mut sent = 0u64;
    for ty in 0..=5u8 {
        for len in [
            0, 1, 3, 4, 15, 16, 31, 32, 33, 63, 64, 65, 91, 92, 93, 147, 148, 149, 1500,
        ] {
            for from in [STRANGER, B_EP] {
                let mut d = noise(len);
                if let Some(first) = d.first_mut() {
                    *first = ty;
                }
                if len >= 4 {
                    d[1..4].fill(0);
                }
                let mut w = Wire::default();
                a.handle_datagram(net.now, ep(from), &d, &mut w);
                assert!(w.delivered.is_empty());
                assert!(w.sent.is_empty(), "answered garbage: type {ty} len {len}");
                sent += 1;
            }
        }
    }
    for len in [70_000, 65_536 + 65] {
        a.handle_datagram(net.now, ep(STRANGER), &vec![4u8; len], &mut Wire::default());
        sent += 1;
    }
    let s = a.stats(net.now);
    assert_eq!(drops(&a), sent, "every datagram is counted once: {s:?}");
    assert!(s.dropped_for(Reason::Malformed) > 0, "{s:?}");
    assert!(s.dropped_for(Reason::BadMac) > 0, "{s:?}");
    assert!(s.dropped_for(Reason::UnknownIndex) > 0, "{s:?}");
    assert_eq!(s.dropped_for(Reason::Oversize), 2);

    // The session is untouched: data still flows both ways without a new handshake.
    let p = ipv4("10.202.1.5", "10.202.2.5", b"after the garbage");
    net.send(ep(A_EP), &mut [(ep(A_EP), &mut a), (ep(B_EP), &mut b)], &p);
    assert_eq!(net.delivered, [(ep(B_EP), p)]);
    let q = ipv4("10.202.2.5", "10.202.1.5", b"and back");
    net.delivered.clear();
    net.send(ep(B_EP), &mut [(ep(A_EP), &mut a), (ep(B_EP), &mut b)], &q);
    assert_eq!(net.delivered, [(ep(A_EP), q)]);
    assert_eq!(a.stats(net.now).peer("b").unwrap().handshakes, 1);
}

#[test]
fn replayed_and_altered_data_is_counted_against_its_peer() {
    let (mut a, mut b, net) = connected();
    let p = ipv4("10.202.1.5", "10.202.2.5", b"once");
    let d = data_message(&mut a, B_EP, &p);
    let mut w = Wire::default();
    b.handle_datagram(net.now, ep(A_EP), &d, &mut w);
    assert_eq!(w.delivered, [p]);
    // The same datagram again, from a's address and from a stranger's: replays.
    for from in [A_EP, STRANGER] {
        let mut w = Wire::default();
        b.handle_datagram(net.now, ep(from), &d, &mut w);
        assert!(w.delivered.is_empty() && w.sent.is_empty());
    }
    // A fresh one with a flipped ciphertext byte, and one with a flipped tag byte.
    let fresh = data_message(&mut a, B_EP, &ipv4("10.202.1.5", "10.202.2.5", b"twice"));
    for at in [20, fresh.len() - 1] {
        let mut bad = fresh.clone();
        bad[at] ^= 0x01;
        let mut w = Wire::default();
        b.handle_datagram(net.now, ep(A_EP), &bad, &mut w);
        assert!(w.delivered.is_empty() && w.sent.is_empty());
    }
    let s = b.stats(net.now);
    let pa = s.peer("a").unwrap();
    assert_eq!(pa.errors_for(Reason::Replay), 2, "{pa:?}");
    assert_eq!(pa.errors_for(Reason::Decrypt), 2, "{pa:?}");
    assert!(s.dropped.is_empty());
    // The untouched one still decrypts (its counter was not burnt by the forgeries).
    let mut w = Wire::default();
    b.handle_datagram(net.now, ep(A_EP), &fresh, &mut w);
    assert_eq!(w.delivered.len(), 1);
}

#[test]
fn a_key_not_in_the_table_gets_no_answer_and_no_packet_through() {
    let (mut a, _) = pair();
    // c knows a's key and claims b's prefixes, but a does not know c's key.
    let sc = secret(3);
    let mut c = Tunnel::new(
        &sc,
        vec![peer("a", a.public_key(), A_EP, &["10.202.1.0/24"])],
    )
    .unwrap();
    let mut net = Net::new();
    let p = ipv4("10.202.2.5", "10.202.1.5", b"let me in");
    for _ in 0..3 {
        net.send(ep(C_EP), &mut [(ep(A_EP), &mut a), (ep(C_EP), &mut c)], &p);
    }
    assert!(net.delivered.is_empty());
    assert!(net.lost.is_empty(), "a answered: {:?}", net.lost);
    let s = a.stats(net.now);
    // The first initiation; the others were queued behind it (no new one before 5 s).
    assert_eq!(s.dropped_for(Reason::UnknownKey), 1, "{s:?}");
    assert_eq!(s.peer("b").unwrap().handshakes, 0);
    // A replayed initiation of a real peer, sent by the stranger, is a replay for that peer.
    let (mut a, mut b) = pair();
    let mut w = Wire::default();
    b.handle_tun_packet(&ipv4("10.202.2.5", "10.202.1.5", b"x"), &mut w);
    let init = w.sent.pop().unwrap().1;
    a.handle_datagram(net.now, ep(B_EP), &init, &mut Wire::default());
    let mut w = Wire::default();
    a.handle_datagram(net.now, ep(STRANGER), &init, &mut w);
    assert!(w.sent.is_empty(), "answered a replayed initiation");
    assert_eq!(a.stats(0).peer("b").unwrap().errors_for(Reason::Replay), 1);
}

#[test]
fn a_peer_cannot_speak_for_addresses_outside_its_prefixes() {
    let (sa, sb, sc) = (secret(1), secret(2), secret(3));
    let mut a = Tunnel::new(
        &sa,
        vec![
            peer("b", sb.public_key(), B_EP, &["10.202.2.0/24"]),
            peer("c", sc.public_key(), C_EP, &["10.202.3.0/24"]),
        ],
    )
    .unwrap();
    // b routes everything of 10.202/16 to a, so it will send what it likes.
    let mut b = Tunnel::new(
        &sb,
        vec![peer("a", sa.public_key(), A_EP, &["10.202.0.0/16"])],
    )
    .unwrap();
    let mut net = Net::new();
    let ok = ipv4("10.202.2.5", "10.202.1.5", b"mine");
    net.send(ep(B_EP), &mut [(ep(A_EP), &mut a), (ep(B_EP), &mut b)], &ok);
    assert_eq!(net.delivered, [(ep(A_EP), ok)]);
    net.delivered.clear();
    for src in ["10.202.3.5", "10.202.9.9", "10.202.1.7"] {
        let spoofed = ipv4(src, "10.202.1.5", b"not mine");
        net.send(
            ep(B_EP),
            &mut [(ep(A_EP), &mut a), (ep(B_EP), &mut b)],
            &spoofed,
        );
    }
    assert!(net.delivered.is_empty(), "{:?}", net.delivered);
    let s = a.stats(net.now);
    assert_eq!(s.peer("b").unwrap().errors_for(Reason::DisallowedSource), 3);
    assert_eq!(s.peer("b").unwrap().rx_packets, 1);
}

#[test]
fn packets_for_no_peer_or_not_ip_or_too_long_are_counted() {
    let (mut a, _) = pair();
    let mut w = Wire::default();
    a.handle_tun_packet(&ipv4("10.202.1.5", "10.202.7.5", b"nobody"), &mut w);
    a.handle_tun_packet(&[], &mut w);
    a.handle_tun_packet(&[0x45, 0, 0], &mut w);
    a.handle_tun_packet(&[0x00; 40], &mut w);
    let mut huge = ipv4("10.202.1.5", "10.202.2.5", b"");
    huge.resize(BUF_LEN, 0);
    a.handle_tun_packet(&huge, &mut w);
    assert!(w.sent.is_empty() && w.delivered.is_empty());
    let s = a.stats(0);
    assert_eq!(s.dropped_for(Reason::NoPeer), 1);
    assert_eq!(s.dropped_for(Reason::Malformed), 3);
    assert_eq!(s.peer("b").unwrap().errors_for(Reason::Oversize), 1);
}

#[test]
fn failed_sends_and_deliveries_are_counted() {
    let (mut a, mut b, net) = connected();
    let d = data_message(&mut a, B_EP, &ipv4("10.202.1.5", "10.202.2.5", b"x"));
    let mut refusing = Wire {
        refuse: true,
        ..Wire::default()
    };
    b.handle_datagram(net.now, ep(A_EP), &d, &mut refusing);
    a.handle_tun_packet(&ipv4("10.202.1.5", "10.202.2.5", b"y"), &mut refusing);
    assert_eq!(
        b.stats(0)
            .peer("a")
            .unwrap()
            .errors_for(Reason::DeliverFailed),
        1
    );
    assert_eq!(
        a.stats(0).peer("b").unwrap().errors_for(Reason::SendFailed),
        1
    );
}

#[test]
fn set_peers_keeps_the_sessions_of_unchanged_keys() {
    let (mut a, mut b, net) = connected();
    let sb = secret(2);
    let sc = secret(3);
    // b moves to a new endpoint and gains a prefix; c appears.
    let changes = a
        .set_peers(vec![
            peer("c", sc.public_key(), C_EP, &["10.202.3.0/24"]),
            peer(
                "b",
                sb.public_key(),
                "10.201.0.12:51871",
                &["10.202.2.0/24", "10.202.22.0/24"],
            ),
        ])
        .unwrap();
    assert_eq!(
        changes,
        PeerChanges {
            added: vec!["c".into()],
            kept: vec!["b".into()],
            removed: vec![],
        }
    );
    // The next packet to b goes to its new endpoint at once, in the old session.
    let mut w = Wire::default();
    a.handle_tun_packet(&ipv4("10.202.1.5", "10.202.22.5", b"new prefix"), &mut w);
    assert_eq!(w.sent.len(), 1);
    assert_eq!(w.sent[0].0, ep("10.201.0.12:51871"));
    assert_eq!(w.sent[0].1[0], MSG_DATA);
    let mut wb = Wire::default();
    b.handle_datagram(net.now, ep(A_EP), &w.sent[0].1, &mut wb);
    assert_eq!(wb.delivered.len(), 1);
    let s = a.stats(net.now);
    assert_eq!(s.peer("b").unwrap().handshakes, 1, "no new handshake");
    assert_eq!(s.peers[0].name, "c", "table order is the order given");

    // An invalid set changes nothing.
    let before = a.stats(net.now);
    let err = a
        .set_peers(vec![
            peer("b", sb.public_key(), B_EP, &["10.202.2.0/24"]),
            peer("c", sc.public_key(), C_EP, &["10.202.2.0/24"]),
        ])
        .unwrap_err();
    assert!(matches!(err, ConfigError::DuplicatePrefix { .. }), "{err}");
    assert_eq!(a.stats(net.now), before);

    // b's key changes: a new session; the old session's datagrams find no peer.
    let old = data_message(&mut b, A_EP, &ipv4("10.202.2.5", "10.202.1.5", b"old"));
    let changes = a
        .set_peers(vec![peer(
            "b",
            secret(9).public_key(),
            B_EP,
            &["10.202.2.0/24"],
        )])
        .unwrap();
    assert_eq!(changes.added, ["b"]);
    assert_eq!(changes.removed, ["b", "c"]);
    a.handle_datagram(net.now, ep(B_EP), &old, &mut Wire::default());
    let s = a.stats(net.now);
    assert_eq!(s.dropped_for(Reason::UnknownIndex), 1, "{s:?}");
    assert_eq!(s.peer("b").unwrap().handshakes, 0);
}

#[test]
fn a_new_static_key_ends_the_sessions_and_a_peer_that_learns_it_handshakes_again() {
    let (mut a, mut b, mut net) = connected();
    let (sa, new) = (secret(1), secret(9));
    // A peer's key is refused as our own, and nothing changes.
    let err = b.set_static_secret(&sa).unwrap_err();
    assert!(
        matches!(err, ConfigError::OwnKey(ref p) if p == "a"),
        "{err}"
    );
    assert_eq!(b.public_key(), secret(2).public_key());

    b.set_static_secret(&new).unwrap();
    assert_eq!(b.public_key(), new.public_key());
    assert_eq!(b.stats(net.now).public_key, new.public_key());
    // The same key again changes nothing.
    b.set_static_secret(&new).unwrap();
    // a still sends in the old session: b has none any more, nothing is delivered.
    let old = data_message(
        &mut a,
        B_EP,
        &ipv4("10.202.1.5", "10.202.2.5", b"old session"),
    );
    let before = drops(&b);
    let mut wb = Wire::default();
    b.handle_datagram(net.now, ep(A_EP), &old, &mut wb);
    assert!(wb.delivered.is_empty());
    assert_eq!(drops(&b), before + 1);
    // b's next packet starts a handshake under its new key, which a does not know yet.
    let mut wb = Wire::default();
    b.handle_tun_packet(&ipv4("10.202.2.5", "10.202.1.5", b"queued"), &mut wb);
    assert_eq!(wb.sent.len(), 1);
    assert_eq!(wb.sent[0].1[0], MSG_INIT);
    let mut wa = Wire::default();
    a.handle_datagram(net.now, ep(B_EP), &wb.sent[0].1, &mut wa);
    assert!(wa.sent.is_empty() && wa.delivered.is_empty());
    assert!(drops(&a) >= 1, "{:?}", a.stats(net.now));

    // a learns b's new key: a new session, data both ways again.
    let changes = a
        .set_peers(vec![peer("b", new.public_key(), B_EP, &["10.202.2.0/24"])])
        .unwrap();
    assert_eq!(changes.added, ["b"]);
    net.now += 1_000;
    net.delivered.clear();
    let hello = ipv4("10.202.1.5", "10.202.2.5", b"hello under the new key");
    net.send(
        ep(A_EP),
        &mut [(ep(A_EP), &mut a), (ep(B_EP), &mut b)],
        &hello,
    );
    assert!(
        net.delivered.contains(&(ep(B_EP), hello)),
        "{:?}",
        net.delivered
    );
    let back = ipv4("10.202.2.5", "10.202.1.5", b"answer under the new key");
    net.send(
        ep(B_EP),
        &mut [(ep(A_EP), &mut a), (ep(B_EP), &mut b)],
        &back,
    );
    assert!(
        net.delivered.contains(&(ep(A_EP), back)),
        "{:?}",
        net.delivered
    );
    let s = b.stats(net.now);
    let pa = s.peer("a").unwrap();
    assert!(
        pa.handshakes >= 2,
        "one before, at least one after the new key"
    );
    assert_eq!(pa.last_handshake_ms, Some(net.now));
}

/// A packet `t` reads while it has no session with its peer: queued, nothing sent (a
/// handshake is already under way).
fn queue(t: &mut Tunnel, packet: &[u8]) {
    let mut w = Wire::default();
    t.handle_tun_packet(packet, &mut w);
    assert!(w.sent.is_empty() && w.delivered.is_empty());
}

/// b's credentials rotate while a and b have a session, and a learns b's new key *before* b
/// uses it: a's initiation under the new key reaches b while b still has its old one, and b
/// drops it. When b's key changes, b starts a handshake at once; a answers, and the packet a
/// queued meanwhile reaches b, without a's retry (WireGuard's 5 s, which never comes here).
#[test]
fn a_rotated_node_whose_peer_learnt_its_key_first_handshakes_at_once() {
    let (mut a, mut b, mut net) = connected();
    let new = secret(9);
    a.set_peers(vec![peer("b", new.public_key(), B_EP, &["10.202.2.0/24"])])
        .unwrap();
    let before = drops(&b);
    assert_eq!(
        net.start(ep(A_EP), &mut [(ep(A_EP), &mut a), (ep(B_EP), &mut b)]),
        1,
        "a starts a handshake with b's new key at once: it had a session with b"
    );
    assert_eq!(
        drops(&b),
        before + 1,
        "b, still under its old key, drops it"
    );
    let queued = ipv4("10.202.1.5", "10.202.2.5", b"queued at a before b rotated");
    queue(&mut a, &queued);

    b.set_static_secret(&new).unwrap();
    assert!(net.delivered.is_empty());
    assert_eq!(
        net.start(ep(B_EP), &mut [(ep(A_EP), &mut a), (ep(B_EP), &mut b)]),
        1
    );
    assert_eq!(net.delivered, [(ep(B_EP), queued)]);
    assert!(net.lost.is_empty());
    // Nothing is left to start; data flows both ways in the new session.
    let mut w = Wire::default();
    a.start_handshakes(&mut w);
    b.start_handshakes(&mut w);
    assert!(w.sent.is_empty());
    net.delivered.clear();
    let back = ipv4("10.202.2.5", "10.202.1.5", b"answer");
    net.send(
        ep(B_EP),
        &mut [(ep(A_EP), &mut a), (ep(B_EP), &mut b)],
        &back,
    );
    assert_eq!(net.delivered, [(ep(A_EP), back)]);
    assert_eq!(b.stats(net.now).peer("a").unwrap().handshakes, 2);
}

/// The other order: b rotates first, and its initiation under the new key reaches a, which
/// does not know that key yet and drops it. When a learns it, a starts a handshake at once
/// (it had a session with b), and the packet b queued reaches a without b's retry. The same
/// when a learns it in two steps, as the agent does: b's old key revoked (b leaves the
/// table), then b's new key trusted (b is added back).
#[test]
fn a_node_that_learns_a_peers_new_key_handshakes_at_once() {
    for two_steps in [false, true] {
        learns_a_peers_new_key(two_steps);
    }
}

fn learns_a_peers_new_key(two_steps: bool) {
    let (mut a, mut b, mut net) = connected();
    let new = secret(9);
    b.set_static_secret(&new).unwrap();
    let before = drops(&a);
    assert_eq!(
        net.start(ep(B_EP), &mut [(ep(A_EP), &mut a), (ep(B_EP), &mut b)]),
        1
    );
    assert_eq!(drops(&a), before + 1, "a does not know b's new key yet");
    let queued = ipv4(
        "10.202.2.5",
        "10.202.1.5",
        b"queued at b before a learnt its key",
    );
    queue(&mut b, &queued);

    let new_b = || vec![peer("b", new.public_key(), B_EP, &["10.202.2.0/24"])];
    if two_steps {
        assert_eq!(a.set_peers(vec![]).unwrap().removed, ["b"]);
        let mut w = Wire::default();
        a.start_handshakes(&mut w);
        assert!(w.sent.is_empty());
        assert_eq!(a.set_peers(new_b()).unwrap().added, ["b"]);
    } else {
        let changes = a.set_peers(new_b()).unwrap();
        assert_eq!(
            (changes.added, changes.removed),
            (vec!["b".into()], vec!["b".into()])
        );
    }
    assert_eq!(
        net.start(ep(A_EP), &mut [(ep(A_EP), &mut a), (ep(B_EP), &mut b)]),
        1
    );
    assert_eq!(net.delivered, [(ep(A_EP), queued)]);
    assert!(net.lost.is_empty());
}

/// The packets queued at the end that answered a handshake go at the first message that
/// confirms the session, a data packet too when the initiator's keepalive was lost.
#[test]
fn an_answered_session_sends_its_queue_at_the_first_data_even_without_the_keepalive() {
    let (mut a, mut b) = pair();
    // b's packet: queued, and b's initiation is lost.
    let queued = ipv4("10.202.2.5", "10.202.1.5", b"queued at b");
    let mut wb = Wire::default();
    b.handle_tun_packet(&queued, &mut wb);
    assert_eq!(wb.sent.len(), 1);
    // a's packet: a's initiation reaches b, which answers (its own packet stays queued).
    let hello = ipv4("10.202.1.5", "10.202.2.5", b"hello");
    let mut wa = Wire::default();
    a.handle_tun_packet(&hello, &mut wa);
    let (_, init) = wa.sent.pop().unwrap();
    let mut wb = Wire::default();
    b.handle_datagram(0, ep(A_EP), &init, &mut wb);
    assert_eq!(wb.sent.len(), 1, "the response only");
    assert_eq!(wb.sent[0].1[0], MSG_RESPONSE);
    // a takes the response and sends its keepalive and queued packet: only the packet
    // arrives (the keepalive is lost).
    let mut wa = Wire::default();
    a.handle_datagram(0, ep(B_EP), &wb.sent[0].1, &mut wa);
    assert_eq!(wa.sent.len(), 2, "keepalive and hello");
    let mut wb = Wire::default();
    b.handle_datagram(0, ep(A_EP), &wa.sent[1].1, &mut wb);
    assert_eq!(wb.delivered, [hello]);
    assert_eq!(wb.sent.len(), 1, "b's queued packet, now");
    let mut wa = Wire::default();
    a.handle_datagram(0, ep(B_EP), &wb.sent[0].1, &mut wa);
    assert_eq!(wa.delivered, [queued]);
    assert_eq!(drops(&a) + drops(&b), 0);
}

/// Only peers with a session are restarted: a new key with no session anywhere sends nothing
/// until there is a packet; a peer's key that changes before any session neither.
#[test]
fn without_a_session_a_new_key_waits_for_a_packet() {
    let (mut a, mut b) = pair();
    let mut w = Wire::default();
    b.set_static_secret(&secret(9)).unwrap();
    b.start_handshakes(&mut w);
    a.set_peers(vec![peer(
        "b",
        secret(9).public_key(),
        B_EP,
        &["10.202.2.0/24"],
    )])
    .unwrap();
    a.start_handshakes(&mut w);
    a.tick(&mut w);
    b.tick(&mut w);
    assert!(w.sent.is_empty(), "{} datagrams", w.sent.len());
    // The first packet makes the handshake.
    handshake(&mut a, &mut b, &mut Net::new());
}

/// The tick starts what a change left, for a shell that did not call `start_handshakes`.
#[test]
fn the_tick_starts_the_handshakes_a_change_left() {
    let (mut a, mut b) = pair();
    handshake(&mut a, &mut b, &mut Net::new());
    b.set_static_secret(&secret(9)).unwrap();
    let mut w = Wire::default();
    b.tick(&mut w);
    assert_eq!(w.sent.len(), 1);
    assert_eq!((w.sent[0].0, w.sent[0].1[0]), (ep(A_EP), MSG_INIT));
    let mut w = Wire::default();
    b.tick(&mut w);
    assert!(w.sent.is_empty(), "one initiation per change");
}

#[test]
fn secrets_and_keys_print_without_the_secret() {
    let s = secret(7);
    let printed = format!("{s:?}");
    assert!(printed.contains(&s.public_key().to_string()), "{printed}");
    assert_eq!(s.public_key().to_string().len(), 64);
}

use proptest::prelude::*;

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn arbitrary_datagrams_are_dropped_and_counted_once(
        ty in 0u8..6,
        reserved_zero in any::<bool>(),
        body in proptest::collection::vec(any::<u8>(), 0..300),
        from_peer in any::<bool>(),
    ) {
        let (mut a, mut b) = pair();
        handshake(&mut a, &mut b, &mut Net::new());
        let mut d = vec![ty, 0, 0, 0];
        if !reserved_zero {
            d[1] = 1;
        }
        d.extend_from_slice(&body);
        let mut w = Wire::default();
        a.handle_datagram(0, ep(if from_peer { B_EP } else { STRANGER }), &d, &mut w);
        prop_assert!(w.sent.is_empty() && w.delivered.is_empty());
        prop_assert_eq!(drops(&a), 1);
    }

    /// A real initiation, response or data message with some bytes changed (not the
    /// handshake's MAC2, which is only checked under load).
    #[test]
    fn altered_messages_are_dropped_and_counted_once(
        which in 0usize..3,
        edits in proptest::collection::vec((any::<prop::sample::Index>(), 1u8..=255), 1..6),
    ) {
        let (mut a, mut b) = pair();
        let p = ipv4("10.202.1.5", "10.202.2.5", b"payload");
        let init = |a: &mut Tunnel| {
            let mut w = Wire::default();
            a.handle_tun_packet(&p, &mut w);
            w.sent.pop().unwrap().1
        };
        let (target, message, macs) = match which {
            0 => (&mut b, init(&mut a), 16),
            1 => {
                let mut w = Wire::default();
                b.handle_datagram(0, ep(A_EP), &init(&mut a), &mut w);
                (&mut a, w.sent.pop().unwrap().1, 16)
            }
            _ => {
                handshake(&mut a, &mut b, &mut Net::new());
                (&mut b, data_message(&mut a, B_EP, &p), 0)
            }
        };
        let before = drops(target);
        let mut bad = message.clone();
        let span = bad.len() - macs;
        for (at, x) in edits {
            bad[at.index(span)] ^= x;
        }
        prop_assume!(bad != message);
        let mut w = Wire::default();
        target.handle_datagram(0, ep(A_EP), &bad, &mut w);
        prop_assert!(w.sent.is_empty() && w.delivered.is_empty(), "{:?}", w.sent);
        prop_assert_eq!(drops(target), before + 1);
    }
}
