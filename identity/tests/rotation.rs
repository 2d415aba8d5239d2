//! Rotating a node's own credentials in place (`Node::replace_credentials`): new tokens and
//! the tunnel key use the new key, peers and revocations are kept, and a pair that is not
//! valid for this node changes nothing.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use identity::testing::SeededRng;
use identity::{Config, Node, NodeCredentials, Psk};

/// A copy of credentials (they are not `Clone`: the secret is copied on purpose only).
fn copy(c: &NodeCredentials) -> NodeCredentials {
    NodeCredentials::from_pem(&c.certificate().to_pem(), &c.private_key_pem().unwrap()).unwrap()
}

fn public(secret: &[u8; 32]) -> [u8; 32] {
    x25519_dalek::PublicKey::from(&x25519_dalek::StaticSecret::from(*secret)).to_bytes()
}

#[test]
fn new_credentials_replace_the_old_and_keep_peers_and_revocations() {
    let mut rng = SeededRng::new(b"rotation");
    let ca = ca(&mut rng, "tessera-ca");
    let a = issue(&ca, &mut rng, "node-a");
    let b = issue(&ca, &mut rng, "node-b");
    let c = issue(&ca, &mut rng, "node-c");
    let (a_cert, b_cert) = (a.certificate().clone(), b.certificate().clone());
    let b_copy = copy(&b);
    let mut na = Node::new_pki(a, ca.trust_anchor().clone(), Config::default(), NOW).unwrap();
    let mut nb = Node::new_pki(b, ca.trust_anchor().clone(), Config::default(), NOW).unwrap();
    let mut nb_self =
        Node::new_pki(b_copy, ca.trust_anchor().clone(), Config::default(), NOW).unwrap();
    na.add_peer_certificate("node-b", b_cert.clone(), NOW)
        .unwrap();
    nb.add_peer_certificate("node-a", a_cert.clone(), NOW)
        .unwrap();
    // b revoked node-c's certificate before rotating.
    nb.add_peer_certificate("node-c", c.certificate().clone(), NOW)
        .unwrap();
    assert_eq!(nb.remove_peer("node-c"), 1);
    handshake(&mut nb, &mut na, &mut rng, NOW, &NO_TAMPER).unwrap();
    handshake(&mut na, &mut nb, &mut rng, NOW, &NO_TAMPER).unwrap();

    let b2 = issue(&ca, &mut rng, "node-b");
    let b2_cert = b2.certificate().clone();
    let b2_copy = copy(&b2);
    let old_id = nb.key_id();
    let id = nb.replace_credentials(b2, NOW + 1).unwrap();
    assert_eq!(id, b2_cert.key_id());
    assert_ne!(id, old_id);
    assert_eq!(nb.key_id(), id);
    assert_eq!(nb.own_certificate(), Some(&b2_cert));
    assert_eq!(public(&nb.tunnel_secret()), *b2_cert.x25519_public());
    // The same credentials again change nothing.
    assert_eq!(nb.replace_credentials(b2_copy, NOW + 1).unwrap(), id);

    // Until a learns the new certificate, handshakes between them fail both ways.
    let (stage, err) = handshake(&mut nb, &mut na, &mut rng, NOW, &NO_TAMPER).unwrap_err();
    assert_eq!((stage, err.as_str()), (Stage::ServerSyn, "unknown_key"));
    // b's SYN-ACK carries the new key id, which a does not know.
    let (stage, err) = handshake(&mut na, &mut nb, &mut rng, NOW, &NO_TAMPER).unwrap_err();
    assert_eq!((stage, err.as_str()), (Stage::ClientSynAck, "unknown_key"));
    // a learns it (the old one revoked, as the agent does with a changed certificate): both
    // ways work again, and b kept its peer a without being told again.
    assert_eq!(na.remove_peer("node-b"), 1);
    na.add_peer_certificate("node-b", b2_cert.clone(), NOW)
        .unwrap();
    handshake(&mut nb, &mut na, &mut rng, NOW, &NO_TAMPER).unwrap();
    handshake(&mut na, &mut nb, &mut rng, NOW, &NO_TAMPER).unwrap();
    assert_eq!(
        na.peer_tunnel_key("node-b", NOW),
        Some(*b2_cert.x25519_public())
    );

    // b's revocation of node-c is still in force.
    let err = nb
        .add_peer_certificate("node-c", c.certificate().clone(), NOW)
        .unwrap_err();
    assert_eq!(err.as_str(), "cert_revoked");
    // b's own old certificate is no longer what its own tokens are checked with: a second
    // context of b that still has the old credentials gets no handshake with it.
    assert!(handshake(&mut nb_self, &mut nb, &mut rng, NOW, &NO_TAMPER).is_err());
    // While a context with the new credentials does (pods of the same node).
    let mut nb2 = Node::new_pki(
        NodeCredentials::new(b2_cert.clone(), *nb.tunnel_secret()).unwrap(),
        ca.trust_anchor().clone(),
        Config::default(),
        NOW,
    )
    .unwrap();
    handshake(&mut nb2, &mut nb, &mut rng, NOW, &NO_TAMPER).unwrap();
}

#[test]
fn credentials_that_are_not_this_nodes_change_nothing() {
    let (_ca, mut a, mut b) = pki_nodes("rotation-refused");
    let mut rng = SeededRng::new(b"rotation-refused-2");
    let ca = {
        // The same CA as pki_nodes("rotation-refused") made (deterministic).
        let mut r = SeededRng::new(b"rotation-refused");
        common::ca(&mut r, "tessera-ca")
    };
    let before = b.key_id();
    // Another node's name.
    let other = issue(&ca, &mut rng, "node-c");
    let err = b.replace_credentials(other, NOW).unwrap_err();
    assert_eq!(err.as_str(), "cert_node_name_mismatch");
    // Another CA.
    let rogue_ca = common::ca(&mut rng, "tessera-ca");
    let rogue = issue(&rogue_ca, &mut rng, "node-b");
    let err = b.replace_credentials(rogue, NOW).unwrap_err();
    assert_eq!(err.as_str(), "cert_untrusted_issuer");
    // Expired at `now`.
    let late = ca
        .issue_node(&mut rng, "node-b", NOW - 3 * DAY, NOW - DAY)
        .unwrap();
    let err = b.replace_credentials(late, NOW).unwrap_err();
    assert_eq!(err.as_str(), "cert_expired");
    // Nothing changed: the old credentials still work both ways.
    assert_eq!(b.key_id(), before);
    handshake(&mut a, &mut b, &mut rng, NOW, &NO_TAMPER).unwrap();
    handshake(&mut b, &mut a, &mut rng, NOW, &NO_TAMPER).unwrap();

    // A PSK node has no credentials to replace.
    let mut p = Node::new_psk("node-b", Psk::new(PSK).unwrap(), Config::default()).unwrap();
    let creds = issue(&ca, &mut rng, "node-b");
    assert!(p.replace_credentials(creds, NOW).is_err());
    assert!(p.own_certificate().is_none());
}
