//! The bound handshake: a SYN MACed for the node the client expects to answer and for the
//! flow's source authorizes the client at the SYN, in two tokens; anything else about it falls
//! back to the three-token handshake and never authorizes by failing.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use common::*;
use identity::testing::SeededRng;
use identity::wire::{
    BINDING_LEN, MAX_SYN_BOUND_LEN, SynAckToken, SynToken, TYPE_SYN_ACK, TYPE_SYN_ACK_BOUND,
    TYPE_SYN_BOUND,
};
use identity::{
    BindingMiss, Claims, Config, FlowSource, HandshakeError, KeyId, MAX_TOKEN_LEN, Node,
    PeerIdentity, Psk, ServerSyn,
};

const SRC: FlowSource = FlowSource {
    addr: IpAddr::V4(Ipv4Addr::new(10, 1, 0, 5)),
    port: 40_000,
    protocol: 6,
};

/// What the client's agent remembers of a destination after a full handshake with it.
fn learn_server(client: &mut Node, server: &mut Node, rng: &mut SeededRng) -> PeerIdentity {
    handshake(client, server, rng, NOW, &NO_TAMPER).unwrap().1
}

fn bound_syn(
    client: &mut Node,
    server: &PeerIdentity,
    source: &FlowSource,
    rng: &mut SeededRng,
) -> (identity::ClientAwaitingSynAck, Vec<u8>) {
    client
        .client_syn_bound(
            &web_claims(),
            &server.node,
            server.key_id,
            source,
            rng.nonce(),
            NOW,
        )
        .unwrap()
}

fn two_tokens(mut a: Node, mut b: Node) {
    let mut rng = SeededRng::new(b"bound");
    let server = learn_server(&mut a, &mut b, &mut rng);
    assert_eq!(server.key_id, b.key_id());
    for source in [
        SRC,
        FlowSource {
            addr: IpAddr::V6(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 1, 5)),
            port: 53_000,
            protocol: 17,
        },
    ] {
        let (client, syn) = bound_syn(&mut a, &server, &source, &mut rng);
        assert!(client.is_bound());
        assert_eq!(syn[1], TYPE_SYN_BOUND);
        let ServerSyn::Bound(bound) = b.server_syn_bound(&syn, &source, NOW).unwrap() else {
            panic!("a bound SYN for this node from its own source is authenticated at the SYN");
        };
        assert_eq!(bound.peer().node, "node-a");
        assert_eq!(bound.peer().key_id, a.key_id());
        assert_eq!(bound.peer().claims, web_claims());
        let synack = bound
            .respond(&mut b, &db_claims(), "postgres", rng.nonce(), NOW)
            .unwrap();
        assert_eq!(synack[1], TYPE_SYN_ACK_BOUND);
        let proven = client.receive(&mut a, &synack, NOW).unwrap();
        assert_eq!(proven.ack, None, "the server expects no ACK token");
        assert_eq!(proven.peer.node, "node-b");
        assert_eq!(proven.peer.claims, db_claims());
        assert_eq!(proven.peer.port_name.as_deref(), Some("postgres"));
        // The plain-only entry point refuses it rather than invent an ACK.
        assert_eq!(
            client.receive_syn_ack(&mut a, &synack, NOW),
            Err(HandshakeError::WrongTokenType {
                expected: TYPE_SYN_ACK,
                found: TYPE_SYN_ACK_BOUND
            })
        );
    }
}

#[test]
fn a_bound_handshake_authenticates_both_workloads_in_two_tokens_psk() {
    let (a, b) = psk_nodes();
    two_tokens(a, b);
}

#[test]
fn a_bound_handshake_authenticates_both_workloads_in_two_tokens_pki() {
    let (_ca, a, b) = pki_nodes("bound-pki");
    two_tokens(a, b);
}

#[test]
fn a_bound_syn_authorizes_once() {
    let (mut a, mut b) = psk_nodes();
    let mut rng = SeededRng::new(b"once");
    let server = learn_server(&mut a, &mut b, &mut rng);
    let (_, syn) = bound_syn(&mut a, &server, &SRC, &mut rng);
    assert!(matches!(
        b.server_syn_bound(&syn, &SRC, NOW),
        Ok(ServerSyn::Bound(_))
    ));
    // Replayed, from the same source or another, bound or taken as plain: refused.
    let other = FlowSource {
        port: 40_001,
        ..SRC
    };
    for source in [SRC, other] {
        assert!(matches!(
            b.server_syn_bound(&syn, &source, NOW + 1),
            Err(HandshakeError::Replay)
        ));
    }
    assert!(matches!(
        b.server_syn(&syn, NOW + 1),
        Err(HandshakeError::Replay)
    ));
}

/// Complete a tentative SYN with the three-token handshake; the client's identity as the server
/// learns it at the ACK.
fn fall_back(
    client: &identity::ClientAwaitingSynAck,
    a: &mut Node,
    b: &mut Node,
    outcome: ServerSyn,
    rng: &mut SeededRng,
) -> Result<PeerIdentity, HandshakeError> {
    let ServerSyn::Tentative(received, _) = outcome else {
        panic!("expected a tentative SYN");
    };
    let (server, synack) = received.respond(b, &db_claims(), "postgres", rng.nonce(), NOW)?;
    assert_eq!(synack[1], TYPE_SYN_ACK);
    let proven = client.receive(a, &synack, NOW)?;
    let ack = proven.ack.expect("a plain SYN-ACK asks for the ACK");
    server.receive_ack(b, &ack, NOW)
}

#[test]
fn a_bound_syn_from_another_source_falls_back_to_three_tokens() {
    let (mut a, mut b) = psk_nodes();
    let mut rng = SeededRng::new(b"nat");
    let server = learn_server(&mut a, &mut b, &mut rng);
    let rewritten = [
        FlowSource {
            addr: IpAddr::V4(Ipv4Addr::new(192, 168, 0, 1)),
            ..SRC
        },
        FlowSource { port: 1, ..SRC },
        FlowSource {
            protocol: 17,
            ..SRC
        },
        FlowSource {
            addr: IpAddr::V6(Ipv4Addr::new(10, 1, 0, 5).to_ipv6_compatible()),
            ..SRC
        },
    ];
    for seen in rewritten {
        let (client, syn) = bound_syn(&mut a, &server, &SRC, &mut rng);
        let outcome = b.server_syn_bound(&syn, &seen, NOW).unwrap();
        assert!(
            matches!(outcome, ServerSyn::Tentative(_, Some(BindingMiss::BadMac))),
            "{seen:?}"
        );
        // Nothing was recorded: the three-token handshake on the same SYN completes.
        let peer = fall_back(&client, &mut a, &mut b, outcome, &mut rng).unwrap();
        assert_eq!(peer.claims, web_claims());
    }
    // An IPv4 source and its IPv4-mapped IPv6 form are the same source.
    let mapped = FlowSource {
        addr: IpAddr::V6(Ipv4Addr::new(10, 1, 0, 5).to_ipv6_mapped()),
        ..SRC
    };
    let (_, syn) = bound_syn(&mut a, &server, &SRC, &mut rng);
    assert!(matches!(
        b.server_syn_bound(&syn, &mapped, NOW),
        Ok(ServerSyn::Bound(_))
    ));
}

#[test]
fn a_bound_syn_for_another_node_falls_back_to_three_tokens() {
    let (mut a, mut b) = psk_nodes();
    let mut c = Node::new_psk("node-c", Psk::new(PSK).unwrap(), Config::default()).unwrap();
    let mut rng = SeededRng::new(b"moved");
    // The destination was on node-b; its address now leads to node-c.
    let server = learn_server(&mut a, &mut b, &mut rng);
    let (client, syn) = bound_syn(&mut a, &server, &SRC, &mut rng);
    let outcome = c.server_syn_bound(&syn, &SRC, NOW).unwrap();
    assert!(matches!(
        outcome,
        ServerSyn::Tentative(_, Some(BindingMiss::OtherReceiver))
    ));
    let ServerSyn::Tentative(received, _) = outcome else {
        unreachable!()
    };
    let (server_c, synack) = received
        .respond(&mut c, &db_claims(), "", rng.nonce(), NOW)
        .unwrap();
    let proven = client.receive(&mut a, &synack, NOW).unwrap();
    assert_eq!(proven.peer.node, "node-c");
    server_c
        .receive_ack(&mut c, &proven.ack.unwrap(), NOW)
        .unwrap();
    // PSK nodes all carry the PSK id: a client cannot bind for another key id.
    assert!(matches!(
        a.client_syn_bound(&web_claims(), "node-b", KeyId([9; 8]), &SRC, [1; 16], NOW),
        Err(HandshakeError::PskMismatch)
    ));
}

#[test]
fn a_bound_syn_for_a_rotated_key_falls_back_to_three_tokens() {
    let (ca, mut a, mut b) = pki_nodes("rotated");
    let mut rng = SeededRng::new(b"rotated");
    let server = learn_server(&mut a, &mut b, &mut rng);
    let (client, syn) = bound_syn(&mut a, &server, &SRC, &mut rng);
    // node-b rotates its certificate; node-a learns the new one but binds for the old key.
    let new = issue(&ca, &mut rng, "node-b");
    let new_cert = new.certificate().clone();
    b.replace_credentials(new, NOW).unwrap();
    a.add_peer_certificate("node-b", new_cert, NOW).unwrap();
    let outcome = b.server_syn_bound(&syn, &SRC, NOW).unwrap();
    assert!(matches!(
        outcome,
        ServerSyn::Tentative(_, Some(BindingMiss::OtherReceiver))
    ));
    fall_back(&client, &mut a, &mut b, outcome, &mut rng).unwrap();
    // A client cannot bind for a node whose key it does not trust.
    assert!(matches!(
        a.client_syn_bound(&web_claims(), "node-b", KeyId([7; 8]), &SRC, [1; 16], NOW),
        Err(HandshakeError::UnknownKey(_))
    ));
}

fn every_byte_change_of_a_bound_syn_never_authorizes(mut a: Node, mut b: Node) {
    let mut rng = SeededRng::new(b"tamper-bound");
    let server = learn_server(&mut a, &mut b, &mut rng);
    let (client, syn) = bound_syn(&mut a, &server, &SRC, &mut rng);
    let mut tried = 0;
    for pos in 0..syn.len() {
        for mask in [0x01u8, 0x80, 0xFF] {
            let mut t = syn.clone();
            t[pos] ^= mask;
            match b.server_syn_bound(&t, &SRC, NOW) {
                Ok(ServerSyn::Bound(_)) => panic!("byte {pos} ^ {mask:#x} still authorized"),
                Ok(ServerSyn::Tentative(received, _)) => {
                    // The SYN-ACK answers the changed SYN: the client, who hashed its own,
                    // refuses it.
                    let (_, synack) = received
                        .respond(&mut b, &db_claims(), "postgres", rng.nonce(), NOW)
                        .unwrap();
                    assert!(
                        client.receive(&mut a, &synack, NOW).is_err(),
                        "byte {pos} ^ {mask:#x}"
                    );
                }
                Err(_) => {}
            }
            tried += 1;
        }
    }
    assert_eq!(tried, syn.len() * 3);
    // The untouched SYN still authorizes: no change above recorded its nonce.
    assert!(matches!(
        b.server_syn_bound(&syn, &SRC, NOW),
        Ok(ServerSyn::Bound(_))
    ));
}

#[test]
fn every_byte_change_of_a_bound_syn_never_authorizes_psk() {
    let (a, b) = psk_nodes();
    every_byte_change_of_a_bound_syn_never_authorizes(a, b);
}

#[test]
fn every_byte_change_of_a_bound_syn_never_authorizes_pki() {
    let (_ca, a, b) = pki_nodes("tamper-bound-pki");
    every_byte_change_of_a_bound_syn_never_authorizes(a, b);
}

#[test]
fn every_byte_change_of_a_bound_syn_ack_is_rejected() {
    let (mut a, mut b) = psk_nodes();
    let mut rng = SeededRng::new(b"tamper-synack");
    let server = learn_server(&mut a, &mut b, &mut rng);
    let (client, syn) = bound_syn(&mut a, &server, &SRC, &mut rng);
    let ServerSyn::Bound(bound) = b.server_syn_bound(&syn, &SRC, NOW).unwrap() else {
        panic!("bound");
    };
    let synack = bound
        .respond(&mut b, &db_claims(), "postgres", rng.nonce(), NOW)
        .unwrap();
    for pos in 0..synack.len() {
        for mask in [0x01u8, 0x80, 0xFF] {
            let mut t = synack.clone();
            t[pos] ^= mask;
            assert!(
                client.receive(&mut a, &t, NOW).is_err(),
                "byte {pos} ^ {mask:#x}"
            );
        }
    }
    assert!(client.receive(&mut a, &synack, NOW).is_ok());
}

#[test]
fn a_bound_syn_ack_answers_only_a_bound_syn() {
    let (mut a, mut b) = psk_nodes();
    let mut rng = SeededRng::new(b"plain-client");
    let (client, syn) = a.client_syn(&web_claims(), rng.nonce(), NOW);
    assert!(!client.is_bound());
    let (_, mut synack) = b
        .server_syn(&syn, NOW)
        .unwrap()
        .respond(&mut b, &db_claims(), "postgres", rng.nonce(), NOW)
        .unwrap();
    synack[1] = TYPE_SYN_ACK_BOUND;
    assert_eq!(
        client.receive(&mut a, &synack, NOW),
        Err(HandshakeError::WrongTokenType {
            expected: TYPE_SYN_ACK,
            found: TYPE_SYN_ACK_BOUND
        })
    );
    // A plain SYN is tentative at server_syn_bound too, without a reason.
    let (_, syn) = a.client_syn(&web_claims(), rng.nonce(), NOW);
    assert!(matches!(
        b.server_syn_bound(&syn, &SRC, NOW),
        Ok(ServerSyn::Tentative(_, None))
    ));
}

#[test]
fn a_stale_bound_syn_is_refused_before_its_binding() {
    let (mut a, mut b) = psk_nodes();
    let mut rng = SeededRng::new(b"stale");
    let server = learn_server(&mut a, &mut b, &mut rng);
    let (_, syn) = bound_syn(&mut a, &server, &SRC, &mut rng);
    assert!(matches!(
        b.server_syn_bound(&syn, &SRC, NOW + 30_001),
        Err(HandshakeError::StaleTimestamp { .. })
    ));
}

#[test]
fn bound_tokens_decode_encode_and_refuse_every_truncation() {
    let (mut a, mut b) = psk_nodes();
    let mut rng = SeededRng::new(b"decode");
    let server = learn_server(&mut a, &mut b, &mut rng);
    let (_, syn) = bound_syn(&mut a, &server, &SRC, &mut rng);
    let tok = SynToken::decode(&syn).unwrap();
    let binding = tok.binding.unwrap();
    assert_eq!(binding.receiver_key, b.key_id());
    assert_eq!(tok.encode(), syn);
    assert_eq!(
        syn.len(),
        SynToken {
            binding: None,
            ..tok
        }
        .encode()
        .len()
            + BINDING_LEN
    );
    let ServerSyn::Bound(bound) = b.server_syn_bound(&syn, &SRC, NOW).unwrap() else {
        panic!("bound");
    };
    let synack = bound
        .respond(&mut b, &db_claims(), "", rng.nonce(), NOW)
        .unwrap();
    assert!(SynAckToken::decode(&synack).unwrap().bound);
    for n in 0..syn.len() {
        assert!(SynToken::decode(&syn[..n]).is_err(), "SYN cut at {n}");
    }
    for n in 0..synack.len() {
        assert!(
            SynAckToken::decode(&synack[..n]).is_err(),
            "SYN-ACK cut at {n}"
        );
    }
    let mut long = syn.clone();
    long.push(0);
    assert!(matches!(
        SynToken::decode(&long),
        Err(HandshakeError::Malformed(_))
    ));
}

#[test]
fn the_largest_bound_syn_is_exactly_the_maximum_token_size() {
    assert_eq!(MAX_SYN_BOUND_LEN, MAX_TOKEN_LEN);
    let claims = Claims::new("n", "w", largest_labels().0, Default::default()).unwrap();
    let long = longest_node_name();
    let psk = || Psk::new(PSK).unwrap();
    let mut a = Node::new_psk(&long, psk(), Config::default()).unwrap();
    let mut b = Node::new_psk(&long, psk(), Config::default()).unwrap();
    let (client, syn) = a
        .client_syn_bound(&claims, &long, b.key_id(), &SRC, [1; 16], NOW)
        .unwrap();
    assert_eq!(syn.len(), MAX_TOKEN_LEN);
    let ServerSyn::Bound(bound) = b.server_syn_bound(&syn, &SRC, NOW).unwrap() else {
        panic!("bound");
    };
    let synack = bound
        .respond(&mut b, &claims, "abcdefghijklmno", [2; 16], NOW)
        .unwrap();
    assert_eq!(synack.len(), MAX_TOKEN_LEN);
    assert_eq!(client.receive(&mut a, &synack, NOW).unwrap().ack, None);
}
