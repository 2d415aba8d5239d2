//! The tunnel keys between nodes (`Node::tunnel_secret`, `Node::peer_tunnel_key`): in PKI mode
//! the certified X25519 key, with the certificate's trust, revocation and validity; in PSK
//! mode derived from the PSK and the node name (docs/wire-format.md, "Tunnel keys").

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use identity::testing::SeededRng;
use identity::{Config, Node, Psk};

fn public(secret: &[u8; 32]) -> [u8; 32] {
    x25519_dalek::PublicKey::from(&x25519_dalek::StaticSecret::from(*secret)).to_bytes()
}

fn dh(secret: &[u8; 32], peer: [u8; 32]) -> [u8; 32] {
    x25519_dalek::StaticSecret::from(*secret)
        .diffie_hellman(&x25519_dalek::PublicKey::from(peer))
        .to_bytes()
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[test]
fn pki_tunnel_key_is_the_certified_key() {
    let mut rng = SeededRng::new(b"tunnel-pki");
    let ca = ca(&mut rng, "tessera-ca");
    let a = issue(&ca, &mut rng, "node-a");
    let b = issue(&ca, &mut rng, "node-b");
    let (a_cert, b_cert) = (a.certificate().clone(), b.certificate().clone());
    let mut na = Node::new_pki(a, ca.trust_anchor().clone(), Config::default(), NOW).unwrap();
    let mut nb = Node::new_pki(b, ca.trust_anchor().clone(), Config::default(), NOW).unwrap();
    assert_eq!(public(&na.tunnel_secret()), *a_cert.x25519_public());
    assert_eq!(public(&nb.tunnel_secret()), *b_cert.x25519_public());
    // Not trusted yet: no key.
    assert_eq!(na.peer_tunnel_key("node-b", NOW), None);
    na.add_peer_certificate("node-b", b_cert.clone(), NOW)
        .unwrap();
    nb.add_peer_certificate("node-a", a_cert.clone(), NOW)
        .unwrap();
    let kb = na.peer_tunnel_key("node-b", NOW).unwrap();
    let ka = nb.peer_tunnel_key("node-a", NOW).unwrap();
    assert_eq!(kb, *b_cert.x25519_public());
    assert_eq!(ka, *a_cert.x25519_public());
    assert_eq!(dh(&na.tunnel_secret(), kb), dh(&nb.tunnel_secret(), ka));
    assert_eq!(na.peer_tunnel_key("node-c", NOW), None);
}

#[test]
fn pki_untrusted_expired_and_revoked_peers_have_no_key() {
    let (_, mut na, _) = pki_nodes("tunnel-untrusted");
    assert!(na.peer_tunnel_key("node-b", NOW).is_some());
    // Certificates are valid from NOW - DAY to NOW + 90 days, the CA until NOW + 365 days.
    assert_eq!(
        na.peer_tunnel_key("node-b", NOW + 91 * DAY),
        None,
        "expired"
    );
    assert_eq!(
        na.peer_tunnel_key("node-b", NOW - 2 * DAY),
        None,
        "not yet valid"
    );
    assert_eq!(na.remove_peer("node-b"), 1);
    assert_eq!(na.peer_tunnel_key("node-b", NOW), None, "revoked");

    // A certificate from another CA is refused, so it never gives a key.
    let mut rng = SeededRng::new(b"tunnel-other-ca");
    let other = ca(&mut rng, "other-ca");
    let rogue = issue(&other, &mut rng, "node-c");
    assert!(
        na.add_peer_certificate("node-c", rogue.certificate().clone(), NOW)
            .is_err()
    );
    assert_eq!(na.peer_tunnel_key("node-c", NOW), None);
}

#[test]
fn pki_of_two_certificates_the_one_that_expires_last_is_used() {
    let mut rng = SeededRng::new(b"tunnel-rotation");
    let ca = ca(&mut rng, "tessera-ca");
    let a = issue(&ca, &mut rng, "node-a");
    let mut na = Node::new_pki(a, ca.trust_anchor().clone(), Config::default(), NOW).unwrap();
    let old = ca
        .issue_node(&mut rng, "node-b", NOW - DAY, NOW + 10 * DAY)
        .unwrap();
    let new = ca
        .issue_node(&mut rng, "node-b", NOW - DAY, NOW + 90 * DAY)
        .unwrap();
    // Learnt in either order, the later expiry wins.
    na.add_peer_certificate("node-b", new.certificate().clone(), NOW)
        .unwrap();
    na.add_peer_certificate("node-b", old.certificate().clone(), NOW)
        .unwrap();
    assert_eq!(
        na.peer_tunnel_key("node-b", NOW),
        Some(*new.certificate().x25519_public())
    );
    // Revoking the newer one falls back to the older one while it is valid.
    na.revoke_key(new.certificate().key_id());
    assert_eq!(
        na.peer_tunnel_key("node-b", NOW),
        Some(*old.certificate().x25519_public())
    );
    assert_eq!(na.peer_tunnel_key("node-b", NOW + 11 * DAY), None);
}

#[test]
fn psk_tunnel_keys_are_per_node_per_psk_stable_and_agree() {
    let (na, nb) = psk_nodes();
    let (sa, sb) = (na.tunnel_secret(), nb.tunnel_secret());
    assert_ne!(*sa, *sb, "per node");
    // Every holder of the PSK computes every node's key.
    assert_eq!(na.peer_tunnel_key("node-b", NOW), Some(public(&sb)));
    assert_eq!(nb.peer_tunnel_key("node-a", NOW), Some(public(&sa)));
    assert_eq!(
        na.peer_tunnel_key("node-a", 0),
        Some(public(&sa)),
        "no time"
    );
    let (ka, kb) = (public(&sa), public(&sb));
    assert_eq!(dh(&sa, kb), dh(&sb, ka));

    let other = Node::new_psk(
        "node-a",
        Psk::new(b"Another-PSK_9r2Lq8Wz3Kx7Vb1Nm4Tc6Hy0").unwrap(),
        Config::default(),
    )
    .unwrap();
    assert_ne!(*other.tunnel_secret(), *sa, "per PSK");
    assert_ne!(other.peer_tunnel_key("node-b", NOW), Some(kb));
    assert_eq!(na.peer_tunnel_key("Not_A_Node", NOW), None);
    assert_eq!(na.peer_tunnel_key("", NOW), None);

    // The derivation of docs/wire-format.md, computed here from its bytes.
    let hk = hkdf::Hkdf::<sha2::Sha256>::new(Some(b"tessera/v1/tunnel-salt"), PSK);
    let mut expected = [0u8; 32];
    hk.expand(b"tessera/v1/tunnel-key\x06node-a", &mut expected)
        .unwrap();
    assert_eq!(*sa, expected);
    // And pinned: a change is a wire change.
    assert_eq!(
        hex(&ka),
        "07f75c407a59ed8e7be83c1d9758c9a77893d1583840b27085532cd9503cb05e",
        "PSK tunnel key of node-a changed: a wire change (docs/wire-format.md)"
    );
}
