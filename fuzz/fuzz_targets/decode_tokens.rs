//! Token decoding, the UDP control framing and the server's SYN (plain and bound) / client's
//! SYN-ACK (after a plain and after a bound SYN) / server's ACK checks on arbitrary bytes: must
//! never panic, hang or allocate without bound.
#![no_main]

use identity::wire::{AckToken, SynAckToken, SynToken};
use identity::{Config, Node, Psk, parse_tcp_option, parse_udp_control};
use libfuzzer_sys::fuzz_target;

const NOW: u64 = 1_780_000_000_000;
const PSK: &[u8] = b"Zq3v9Lx2Rk7Wm1Tn5Yb8Hc4Jd6Gf0Ps_E";

fuzz_target!(|data: &[u8]| {
    let _ = SynToken::decode(data);
    let _ = SynAckToken::decode(data);
    let _ = AckToken::decode(data);
    let _ = parse_tcp_option(data);
    if let Ok(Some((_, token))) = parse_udp_control(data) {
        assert!(token.len() <= identity::MAX_TOKEN_LEN && token.len() + 12 == data.len());
    }
    let (Ok(k1), Ok(k2)) = (Psk::new(PSK), Psk::new(PSK)) else { return };
    let (Ok(mut a), Ok(mut b)) = (
        Node::new_psk("node-a", k1, Config::default()),
        Node::new_psk("node-b", k2, Config::default()),
    ) else {
        return;
    };
    // As a SYN at the server, plain and bound.
    let _ = b.server_syn(data, NOW);
    let source = identity::FlowSource {
        addr: std::net::IpAddr::V4(std::net::Ipv4Addr::new(10, 1, 0, 5)),
        port: 40_000,
        protocol: 6,
    };
    let _ = b.server_syn_bound(data, &source, NOW);
    // As a SYN-ACK at a client that sent a real SYN, then as an ACK at a server that answered
    // a real SYN.
    let Ok(claims) = identity::Claims::new("ns", "w", Default::default(), Default::default()) else {
        return;
    };
    let (c, syn) = a.client_syn(&claims, [1; 16], NOW);
    let _ = c.receive_syn_ack(&mut a, data, NOW);
    if let Ok((bound, _)) = a.client_syn_bound(&claims, "node-b", b.key_id(), &source, [3; 16], NOW)
    {
        let _ = bound.receive(&mut a, data, NOW);
    }
    if let Ok(r) = b.server_syn(&syn, NOW)
        && let Ok((s, _)) = r.respond(&mut b, &claims, "", [2; 16], NOW)
    {
        let _ = s.receive_ack(&mut b, data, NOW);
    }
});
