//! Handshake properties: authentication, binding, tampering, replay, keys, sizes.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use identity::testing::SeededRng;
use identity::wire::{HEADER_LEN, SynToken};
use identity::{
    CertError, Claims, ClaimsError, Config, HandshakeError, MAX_CLAIMS_LEN, MAX_TOKEN_LEN, Node,
    NodeCertificate, Psk, ReplayConfig,
};

#[test]
fn pki_handshake_authenticates_both_workloads() {
    let (_ca, mut a, mut b) = pki_nodes("pki-ok");
    let mut rng = SeededRng::new(b"n");
    let (client, server) = handshake(&mut a, &mut b, &mut rng, NOW, &NO_TAMPER).unwrap();
    assert_eq!(client.node, "node-a");
    assert_eq!(client.claims, web_claims());
    assert_eq!(client.port_name, None);
    assert_eq!(server.node, "node-b");
    assert_eq!(server.claims, db_claims());
    assert_eq!(server.port_name.as_deref(), Some("postgres"));
}

#[test]
fn psk_handshake_authenticates_both_workloads() {
    let (mut a, mut b) = psk_nodes();
    let mut rng = SeededRng::new(b"n");
    let (client, server) = handshake(&mut a, &mut b, &mut rng, NOW, &NO_TAMPER).unwrap();
    assert_eq!(
        (client.node.as_str(), server.node.as_str()),
        ("node-a", "node-b")
    );
    assert_eq!(server.claims, db_claims());
}

#[test]
fn a_node_can_handshake_with_itself() {
    let (_ca, mut a, _b) = pki_nodes("self");
    let mut a2 = {
        // Same node, second context (as if client and server pods share the node).
        let (_ca2, a2, _) = pki_nodes("self");
        a2
    };
    let mut rng = SeededRng::new(b"n");
    handshake(&mut a, &mut a2, &mut rng, NOW, &NO_TAMPER).unwrap();
}

/// Positions of a SYN the server can check on its own (version, type, mode, name length, key
/// id, node name): a change there must be caught at the server's SYN check.
/// In PSK mode the node name is bound only through the MACs, so it is caught at the SYN-ACK.
fn syn_server_checked(pos: usize, node_len: usize, pki: bool) -> bool {
    pos < 12 || (pki && (HEADER_LEN..HEADER_LEN + node_len).contains(&pos))
}

fn every_byte_change_is_rejected(mut a: Node, mut b: Node) {
    let pki = a.mode() == identity::Mode::Pki;
    let mut rng = SeededRng::new(b"tamper");
    let (_, syn) = a.client_syn(&web_claims(), rng.nonce(), NOW);
    let good = handshake(&mut a, &mut b, &mut rng, NOW, &NO_TAMPER);
    assert!(good.is_ok());
    let (_, sa) = {
        let (_, syn2) = a.client_syn(&web_claims(), rng.nonce(), NOW);
        let r = b.server_syn(&syn2, NOW).unwrap();
        r.respond(&mut b, &db_claims(), "postgres", rng.nonce(), NOW)
            .unwrap()
    };
    let lens = [syn.len(), sa.len(), 36];
    let mut checked = 0;
    for (ty, &len) in lens.iter().enumerate() {
        for pos in 0..len {
            for mask in [0x01u8, 0x80, 0xFF] {
                let flip = move |t: &mut Vec<u8>| t[pos] ^= mask;
                let tamper = match ty {
                    0 => Tamper {
                        syn: &flip,
                        synack: &none,
                        ack: &none,
                    },
                    1 => Tamper {
                        syn: &none,
                        synack: &flip,
                        ack: &none,
                    },
                    _ => Tamper {
                        syn: &none,
                        synack: &none,
                        ack: &flip,
                    },
                };
                let r = handshake(&mut a, &mut b, &mut rng, NOW, &tamper);
                let (stage, err) = match r {
                    Err(e) => e,
                    Ok(_) => panic!("token {ty} byte {pos} ^ {mask:#x} was accepted"),
                };
                assert!(!err.as_str().is_empty());
                let expected_latest = match ty {
                    0 if syn_server_checked(pos, "node-a".len(), pki) => Stage::ServerSyn,
                    0 => Stage::ClientSynAck,
                    1 => Stage::ClientSynAck,
                    _ => Stage::ServerAck,
                };
                assert!(
                    stage <= expected_latest,
                    "token {ty} byte {pos}: caught at {stage:?}, expected by {expected_latest:?} ({err})"
                );
                if ty == 1 {
                    assert_eq!(stage, Stage::ClientSynAck);
                }
                if ty == 2 {
                    assert_eq!(stage, Stage::ServerAck);
                }
                checked += 1;
            }
        }
    }
    assert_eq!(checked, 3 * lens.iter().sum::<usize>());
}

#[test]
fn every_single_byte_change_of_every_token_is_rejected_pki() {
    let (_ca, a, b) = pki_nodes("tamper");
    every_byte_change_is_rejected(a, b);
}

#[test]
fn every_single_byte_change_of_every_token_is_rejected_psk() {
    let (a, b) = psk_nodes();
    every_byte_change_is_rejected(a, b);
}

#[test]
fn header_byte_changes_report_the_specific_reason() {
    let (_ca, mut a, mut b) = pki_nodes("reasons");
    let mut rng = SeededRng::new(b"r");
    let cases: [(usize, u8, &str); 5] = [
        (0, 0x02, "unsupported_version"),
        (1, 0x03, "wrong_token_type"),
        (2, 0x03, "mode_mismatch"),
        (4, 0x01, "unknown_key"),
        (3, 0x01, "malformed"),
    ];
    for (pos, mask, label) in cases {
        let flip = move |t: &mut Vec<u8>| t[pos] ^= mask;
        let t = Tamper {
            syn: &flip,
            synack: &none,
            ack: &none,
        };
        let (stage, err) = handshake(&mut a, &mut b, &mut rng, NOW, &t).unwrap_err();
        assert_eq!(
            (stage, err.as_str()),
            (Stage::ServerSyn, label),
            "byte {pos}"
        );
    }
    // A changed client nonce or claim passes the server's SYN check but the client sees that
    // the SYN-ACK answers another SYN.
    let nonce_pos = HEADER_LEN - 1;
    let flip = move |t: &mut Vec<u8>| t[nonce_pos] ^= 1;
    let t = Tamper {
        syn: &flip,
        synack: &none,
        ack: &none,
    };
    let (stage, err) = handshake(&mut a, &mut b, &mut rng, NOW, &t).unwrap_err();
    assert_eq!((stage, err), (Stage::ClientSynAck, HandshakeError::BadMac));
}

#[test]
fn truncated_or_extended_tokens_are_rejected() {
    let (mut a, mut b) = psk_nodes();
    let mut rng = SeededRng::new(b"t");
    let cut = |t: &mut Vec<u8>| {
        t.pop();
    };
    let grow = |t: &mut Vec<u8>| t.push(0);
    for f in [&cut as &dyn Fn(&mut Vec<u8>), &grow] {
        for t in [
            Tamper {
                syn: f,
                synack: &none,
                ack: &none,
            },
            Tamper {
                syn: &none,
                synack: f,
                ack: &none,
            },
            Tamper {
                syn: &none,
                synack: &none,
                ack: f,
            },
        ] {
            let (_, err) = handshake(&mut a, &mut b, &mut rng, NOW, &t).unwrap_err();
            assert!(
                matches!(err, HandshakeError::Malformed(_) | HandshakeError::BadMac),
                "{err}"
            );
        }
    }
}

#[test]
fn syn_ack_is_bound_to_the_client_nonce() {
    let (_ca, mut a, mut b) = pki_nodes("bind");
    let mut rng = SeededRng::new(b"b");
    let (c1, _syn1) = a.client_syn(&web_claims(), rng.nonce(), NOW);
    let (_c2, syn2) = a.client_syn(&web_claims(), rng.nonce(), NOW);
    // Same workload, same time, only the nonce differs: the answer to SYN 2 must not complete
    // flow 1.
    let r2 = b.server_syn(&syn2, NOW).unwrap();
    let (_s2, synack2) = r2
        .respond(&mut b, &db_claims(), "", rng.nonce(), NOW)
        .unwrap();
    assert_eq!(
        c1.receive_syn_ack(&mut a, &synack2, NOW).unwrap_err(),
        HandshakeError::BadMac
    );
}

#[test]
fn ack_is_bound_to_both_nonces_and_only_the_ack_authorizes() {
    let (mut a, mut b) = psk_nodes();
    let mut rng = SeededRng::new(b"b");
    let (c1, syn1) = a.client_syn(&web_claims(), rng.nonce(), NOW);
    // The server answers the same SYN twice with different server nonces (e.g. two states).
    let (s_first, synack_first) = b
        .server_syn(&syn1, NOW)
        .unwrap()
        .respond(&mut b, &db_claims(), "", rng.nonce(), NOW)
        .unwrap();
    let (s_second, _synack_second) = b
        .server_syn(&syn1, NOW)
        .unwrap()
        .respond(&mut b, &db_claims(), "", rng.nonce(), NOW)
        .unwrap();
    let (_, ack_first) = c1.receive_syn_ack(&mut a, &synack_first, NOW).unwrap();
    // The ACK answering server nonce 1 does not authorize the state holding server nonce 2.
    assert_eq!(
        s_second.receive_ack(&mut b, &ack_first, NOW).unwrap_err(),
        HandshakeError::BadMac
    );
    // A different client flow's ACK does not authorize it either.
    let (c3, syn3) = a.client_syn(&web_claims(), rng.nonce(), NOW);
    let (_s3, synack3) = b
        .server_syn(&syn3, NOW)
        .unwrap()
        .respond(&mut b, &db_claims(), "", rng.nonce(), NOW)
        .unwrap();
    let (_, ack3) = c3.receive_syn_ack(&mut a, &synack3, NOW).unwrap();
    assert_eq!(
        s_first.receive_ack(&mut b, &ack3, NOW).unwrap_err(),
        HandshakeError::BadMac
    );
    // The right ACK authorizes.
    assert_eq!(
        s_first.receive_ack(&mut b, &ack_first, NOW).unwrap().node,
        "node-a"
    );
}

#[test]
fn replayed_syn_and_ack_are_rejected() {
    let (_ca, mut a, mut b) = pki_nodes("replay");
    let mut rng = SeededRng::new(b"r");
    let (c, syn) = a.client_syn(&web_claims(), rng.nonce(), NOW);
    let (s, synack) = b
        .server_syn(&syn, NOW)
        .unwrap()
        .respond(&mut b, &db_claims(), "", rng.nonce(), NOW)
        .unwrap();
    let (_, ack) = c.receive_syn_ack(&mut a, &synack, NOW).unwrap();
    s.receive_ack(&mut b, &ack, NOW).unwrap();
    // The same ACK again (on the same state) and the same SYN again are replays.
    assert_eq!(
        s.receive_ack(&mut b, &ack, NOW + 10).unwrap_err(),
        HandshakeError::Replay
    );
    assert_eq!(
        b.server_syn(&syn, NOW + 10).unwrap_err(),
        HandshakeError::Replay
    );
    assert_eq!(b.replay_cache().len(), 1);
}

#[test]
fn a_retransmitted_syn_before_completion_is_accepted() {
    let (a, mut b) = psk_nodes();
    let mut rng = SeededRng::new(b"r");
    let (_c, syn) = a.client_syn(&web_claims(), rng.nonce(), NOW);
    b.server_syn(&syn, NOW).unwrap();
    b.server_syn(&syn, NOW + 1000).unwrap();
}

#[test]
fn timestamps_outside_the_skew_window_are_rejected() {
    let (mut a, mut b) = psk_nodes();
    let mut rng = SeededRng::new(b"t");
    for (skew, ok) in [
        (29_999i64, true),
        (-30_000, true),
        (30_001, false),
        (-31_000, false),
    ] {
        let client_now = (NOW as i64 + skew) as u64;
        let (_, syn) = a.client_syn(&web_claims(), rng.nonce(), client_now);
        let r = b.server_syn(&syn, NOW);
        assert_eq!(r.is_ok(), ok, "skew {skew}");
        if !ok {
            assert_eq!(r.unwrap_err().as_str(), "stale_timestamp");
        }
    }
    // The window is configurable.
    let cfg = Config {
        max_skew_ms: 5_000,
        ..Config::default()
    };
    let mut strict = Node::new_psk("node-b", Psk::new(PSK).unwrap(), cfg).unwrap();
    let (_, syn) = a.client_syn(&web_claims(), rng.nonce(), NOW - 6_000);
    assert_eq!(
        strict.server_syn(&syn, NOW).unwrap_err().as_str(),
        "stale_timestamp"
    );
    // The client checks the server's timestamp too.
    let (c, syn) = a.client_syn(&web_claims(), rng.nonce(), NOW);
    let (_, synack) = b
        .server_syn(&syn, NOW)
        .unwrap()
        .respond(&mut b, &db_claims(), "", rng.nonce(), NOW)
        .unwrap();
    assert_eq!(
        c.receive_syn_ack(&mut a, &synack, NOW + 31_000)
            .unwrap_err()
            .as_str(),
        "stale_timestamp"
    );
}

#[test]
fn the_replay_cache_stays_bounded_under_a_flood_of_handshakes() {
    let cfg = Config {
        replay: ReplayConfig {
            per_peer_capacity: 64,
            max_peers: 2,
        },
        ..Config::default()
    };
    let psk = || Psk::new(PSK).unwrap();
    let mut a = Node::new_psk("node-a", psk(), cfg).unwrap();
    let mut b = Node::new_psk("node-b", psk(), cfg).unwrap();
    let mut c = Node::new_psk("node-c", psk(), cfg).unwrap();
    let mut d = Node::new_psk("node-d", psk(), cfg).unwrap();
    let mut rng = SeededRng::new(b"flood");
    for i in 0..1000u64 {
        let now = NOW + 3 * i;
        handshake(&mut a, &mut b, &mut rng, now, &NO_TAMPER).unwrap();
        if i % 10 == 0 {
            // A third peer forces the least recently used one out of the table.
            handshake(&mut c, &mut b, &mut rng, now + 1, &NO_TAMPER).unwrap();
            handshake(&mut d, &mut b, &mut rng, now + 2, &NO_TAMPER).unwrap();
        }
        assert!(b.replay_cache().len() <= 2 * 64);
        assert!(b.replay_cache().peer_count() <= 2);
    }
}

fn pki_with_validity(seed: &str, nb: u64, na: u64) -> (Node, Node) {
    let mut rng = SeededRng::new(seed.as_bytes());
    let ca = ca(&mut rng, "tessera-ca");
    let a = issue(&ca, &mut rng, "node-a");
    let b = ca.issue_node(&mut rng, "node-b", nb, na).unwrap();
    let (acert, bcert) = (a.certificate().clone(), b.certificate().clone());
    let mut na_ = Node::new_pki(a, ca.trust_anchor().clone(), Config::default(), NOW).unwrap();
    let mut nb_ = Node::new_pki(b, ca.trust_anchor().clone(), Config::default(), nb).unwrap();
    na_.add_peer_certificate("node-b", bcert, nb).unwrap();
    nb_.add_peer_certificate("node-a", acert, nb).unwrap();
    (na_, nb_)
}

#[test]
fn an_expired_peer_certificate_is_rejected() {
    // node-b's certificate expired one second before NOW.
    let (mut a, mut b) = pki_with_validity("exp", NOW - DAY / 2, NOW - 1000);
    let mut rng = SeededRng::new(b"e");
    let (stage, err) = handshake(&mut b, &mut a, &mut rng, NOW, &NO_TAMPER).unwrap_err();
    assert_eq!((stage, err.as_str()), (Stage::ServerSyn, "cert_expired"));
    // And adding it now is refused with the same reason.
    let mut rng = SeededRng::new(b"exp2");
    let ca = ca(&mut rng, "tessera-ca");
    let old = ca
        .issue_node(&mut rng, "node-b", NOW - DAY / 2, NOW - 1000)
        .unwrap();
    let me = issue(&ca, &mut rng, "node-a");
    let mut n = Node::new_pki(me, ca.trust_anchor().clone(), Config::default(), NOW).unwrap();
    let err = n
        .add_peer_certificate("node-b", old.certificate().clone(), NOW)
        .unwrap_err();
    assert!(matches!(err, CertError::Expired { .. }), "{err}");
}

#[test]
fn a_not_yet_valid_peer_certificate_is_rejected() {
    // node-b's certificate starts being valid one minute after NOW.
    let (mut a, mut b) = pki_with_validity("nyv", NOW + 60_000, NOW + 10 * DAY);
    let mut rng = SeededRng::new(b"e");
    // node-b's SYN-ACK (its clock is ahead) reaches node-a at NOW: node-a refuses it.
    let (stage, err) = handshake(&mut a, &mut b, &mut rng, NOW, &NO_TAMPER).unwrap_err();
    assert_eq!(
        (stage, err.as_str()),
        (Stage::ClientSynAck, "cert_not_yet_valid")
    );
}

#[test]
fn a_certificate_from_another_ca_is_rejected() {
    let (_ca, mut a, _b) = pki_nodes("ca1");
    let mut rng = SeededRng::new(b"other");
    // Same CA name, different key: the signature check catches it.
    let evil_ca = ca(&mut rng, "tessera-ca");
    let evil = issue(&evil_ca, &mut rng, "node-c");
    let err = a
        .add_peer_certificate("node-c", evil.certificate().clone(), NOW)
        .unwrap_err();
    assert_eq!(err.as_str(), "cert_untrusted_issuer");
    // Another CA name: the issuer check catches it.
    let other_ca = ca(&mut rng, "other-ca");
    let other = issue(&other_ca, &mut rng, "node-c");
    let err = a
        .add_peer_certificate("node-c", other.certificate().clone(), NOW)
        .unwrap_err();
    assert_eq!(err.as_str(), "cert_untrusted_issuer");
    // A node holding such a certificate cannot handshake: its key id is unknown.
    let mut c =
        Node::new_pki(evil, evil_ca.trust_anchor().clone(), Config::default(), NOW).unwrap();
    let (stage, err) = handshake(&mut c, &mut a, &mut rng, NOW, &NO_TAMPER).unwrap_err();
    assert_eq!((stage, err.as_str()), (Stage::ServerSyn, "unknown_key"));
}

#[test]
fn a_node_name_that_does_not_match_is_rejected() {
    let (ca, mut a, b) = pki_nodes("names");
    let mut rng = SeededRng::new(b"n");
    // Certificate published under another node's name.
    let c = issue(&ca, &mut rng, "node-c");
    let err = a
        .add_peer_certificate("node-d", c.certificate().clone(), NOW)
        .unwrap_err();
    assert_eq!(err.as_str(), "cert_node_name_mismatch");
    // A SYN whose node name differs from the name certified for its key id.
    let (_, syn) = b.client_syn(&web_claims(), rng.nonce(), NOW);
    let mut tok = SynToken::decode(&syn).unwrap();
    tok.header.node = "node-c".into();
    let err = a.server_syn(&tok.encode(), NOW).unwrap_err();
    assert_eq!(err.as_str(), "node_name_mismatch");
}

#[test]
fn a_removed_peer_key_is_rejected_as_revoked() {
    let (_ca, mut a, mut b) = pki_nodes("revoke");
    let b_cert = {
        let mut rng = SeededRng::new(b"revoke");
        let ca = ca(&mut rng, "tessera-ca");
        let _a = issue(&ca, &mut rng, "node-a");
        issue(&ca, &mut rng, "node-b").certificate().clone()
    };
    let mut rng = SeededRng::new(b"r");
    handshake(&mut b, &mut a, &mut rng, NOW, &NO_TAMPER).unwrap();
    // Revoked between SYN and ACK: the ACK is refused.
    let (c, syn) = b.client_syn(&web_claims(), rng.nonce(), NOW);
    let (s, synack) = a
        .server_syn(&syn, NOW)
        .unwrap()
        .respond(&mut a, &db_claims(), "", rng.nonce(), NOW)
        .unwrap();
    let (_, ack) = c.receive_syn_ack(&mut b, &synack, NOW).unwrap();
    assert_eq!(a.remove_peer("node-b"), 1);
    assert_eq!(
        s.receive_ack(&mut a, &ack, NOW).unwrap_err().as_str(),
        "key_revoked"
    );
    // And new SYNs are refused at once.
    let (stage, err) = handshake(&mut b, &mut a, &mut rng, NOW, &NO_TAMPER).unwrap_err();
    assert_eq!((stage, err.as_str()), (Stage::ServerSyn, "key_revoked"));
    // The revoked certificate cannot simply be added back.
    let err = a.add_peer_certificate("node-b", b_cert, NOW).unwrap_err();
    assert_eq!(err.as_str(), "cert_revoked");
}

#[test]
fn a_wrong_psk_is_rejected() {
    let (mut a, _) = psk_nodes();
    let other = Psk::new(b"another-cluster-key:Vp7Qm2Xr9Ls4Kd1Wz").unwrap();
    let mut b = Node::new_psk("node-b", other, Config::default()).unwrap();
    let mut rng = SeededRng::new(b"w");
    let (stage, err) = handshake(&mut a, &mut b, &mut rng, NOW, &NO_TAMPER).unwrap_err();
    assert_eq!(
        (stage, err),
        (Stage::ServerSyn, HandshakeError::PskMismatch)
    );
}

#[test]
fn pki_and_psk_nodes_do_not_interoperate() {
    let (_ca, mut a, _) = pki_nodes("modes");
    let (_, mut b) = psk_nodes();
    let mut rng = SeededRng::new(b"m");
    let (_, err) = handshake(&mut a, &mut b, &mut rng, NOW, &NO_TAMPER).unwrap_err();
    assert_eq!(err.as_str(), "mode_mismatch");
}

#[test]
fn ten_labels_of_thirty_bytes_give_a_syn_under_600_bytes() {
    let labels: Vec<(String, String)> = (0..10)
        .map(|i| {
            (
                format!("example.com/k-{i:02}"),
                format!("value-number-{i:02}"),
            )
        })
        .collect();
    let labels = labels.into_iter().collect();
    let ns = map(&[
        ("kubernetes.io/metadata.name", "payments-prod"),
        ("team", "payments"),
        ("environment", "production"),
    ]);
    let claims = Claims::new("payments-prod", "checkout-api-6b7c9d8f5-q2w3e", labels, ns).unwrap();
    for (k, v) in claims.labels() {
        assert!((28..=34).contains(&(k.len() + v.len())), "{k}={v}");
    }
    let (_ca, a, _b) = pki_nodes("size");
    let (_, syn) = a.client_syn(&claims, [0; 16], NOW);
    assert!(syn.len() <= 600, "SYN token is {} bytes", syn.len());
}

#[test]
fn the_largest_claims_give_a_token_of_exactly_the_maximum_size() {
    // Fill the claims to exactly MAX_CLAIMS_LEN.
    let (labels, pad) = largest_labels();
    let claims = Claims::new("n", "w", labels.clone(), Default::default()).unwrap();
    assert_eq!(claims.encoded_len(), MAX_CLAIMS_LEN);
    // One byte more is refused, not truncated.
    let mut more = labels;
    more.insert("z".repeat(pad), "x".into());
    assert!(matches!(
        Claims::new("n", "w", more, Default::default()),
        Err(ClaimsError::TooLarge { .. })
    ));
    // Longest node name and port name: the SYN-ACK hits MAX_TOKEN_LEN exactly.
    let long = longest_node_name();
    assert_eq!(long.len(), 253);
    let psk = || Psk::new(PSK).unwrap();
    let mut a = Node::new_psk(&long, psk(), Config::default()).unwrap();
    let mut b = Node::new_psk(&long, psk(), Config::default()).unwrap();
    let (c, syn) = a.client_syn(&claims, [1; 16], NOW);
    let (_, synack) = b
        .server_syn(&syn, NOW)
        .unwrap()
        .respond(&mut b, &claims, "abcdefghijklmno", [2; 16], NOW)
        .unwrap();
    assert_eq!(synack.len(), MAX_TOKEN_LEN);
    assert_eq!(MAX_TOKEN_LEN, 1361);
    c.receive_syn_ack(&mut a, &synack, NOW).unwrap();
}

#[test]
fn an_invalid_local_port_name_is_a_local_error() {
    let (a, mut b) = psk_nodes();
    let (_, syn) = a.client_syn(&web_claims(), [1; 16], NOW);
    let r = b.server_syn(&syn, NOW).unwrap();
    let err = r
        .respond(&mut b, &db_claims(), "Not_A_Port", [2; 16], NOW)
        .unwrap_err();
    assert_eq!(err.as_str(), "local_claims");
}

#[test]
fn certificates_round_trip_through_pem() {
    let mut rng = SeededRng::new(b"pem");
    let ca = ca(&mut rng, "tessera-ca");
    let creds = issue(&ca, &mut rng, "node-a");
    let cert_pem = creds.certificate().to_pem();
    let key_pem = creds.private_key_pem().unwrap();
    assert!(key_pem.starts_with("-----BEGIN PRIVATE KEY-----"));
    let back = identity::NodeCredentials::from_pem(&cert_pem, &key_pem).unwrap();
    assert_eq!(back.certificate(), creds.certificate());
    let ca2 = identity::CertificateAuthority::from_pem(
        &ca.certificate_pem(),
        &ca.private_key_pem().unwrap(),
    )
    .unwrap();
    assert_eq!(
        ca2.trust_anchor().fingerprint(),
        ca.trust_anchor().fingerprint()
    );
    let parsed = NodeCertificate::from_pem(&cert_pem).unwrap();
    ca.trust_anchor()
        .verify(&parsed, Some("node-a"), NOW)
        .unwrap();
    // A key that does not belong to the certificate is refused.
    let other = issue(&ca, &mut rng, "node-b");
    assert!(
        identity::NodeCredentials::from_pem(&cert_pem, &other.private_key_pem().unwrap()).is_err()
    );
}

#[test]
fn reject_labels_are_distinct() {
    use identity::CertError as C;
    use identity::HandshakeError as H;
    let all = [
        H::Malformed("x"),
        H::UnsupportedVersion(2),
        H::WrongTokenType {
            expected: 1,
            found: 2,
        },
        H::ModeMismatch(3),
        H::InvalidClaims(ClaimsError::TooLarge { size: 1, max: 0 }),
        H::StaleTimestamp {
            timestamp_ms: 0,
            now_ms: 0,
        },
        H::Replay,
        H::UnknownKey(String::new()),
        H::KeyRevoked(String::new()),
        H::NodeNameMismatch {
            claimed: String::new(),
            certified: String::new(),
        },
        H::Certificate(C::Expired {
            not_after_ms: 0,
            now_ms: 0,
        }),
        H::Certificate(C::NotYetValid {
            not_before_ms: 0,
            now_ms: 0,
        }),
        H::Certificate(C::UntrustedIssuer("x")),
        H::PskMismatch,
        H::BadMac,
        H::KeyAgreement,
        H::LocalClaims(ClaimsError::TooLarge { size: 1, max: 0 }),
    ];
    let labels: std::collections::HashSet<&str> = all.iter().map(|e| e.as_str()).collect();
    assert_eq!(labels.len(), all.len());
    assert!(
        labels
            .iter()
            .all(|l| l.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'))
    );
}

#[test]
fn handshake_types_can_move_between_threads() {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<Node>();
    send_sync::<identity::ClientAwaitingSynAck>();
    send_sync::<identity::ServerSynReceived>();
    send_sync::<identity::ServerAwaitingAck>();
    send_sync::<identity::PeerIdentity>();
}
