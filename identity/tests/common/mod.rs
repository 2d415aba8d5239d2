#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]
//! Shared fixtures: deterministic CA, nodes, claims and a handshake driver.

use std::collections::BTreeMap;

use identity::testing::SeededRng;
use identity::{
    CertificateAuthority, Claims, Config, HandshakeError, Node, NodeCredentials, PeerIdentity, Psk,
};

pub const NOW: u64 = 1_780_000_000_000;
pub const DAY: u64 = 86_400_000;

pub fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

pub fn web_claims() -> Claims {
    Claims::new(
        "shop",
        "web-7d9f8-x2x4q",
        map(&[("app", "web"), ("tier", "frontend")]),
        map(&[("kubernetes.io/metadata.name", "shop")]),
    )
    .unwrap()
}

pub fn db_claims() -> Claims {
    Claims::new(
        "shop",
        "db-0",
        map(&[("app", "db"), ("tier", "backend")]),
        map(&[
            ("kubernetes.io/metadata.name", "shop"),
            ("team", "payments"),
        ]),
    )
    .unwrap()
}

pub fn ca(rng: &mut SeededRng, name: &str) -> CertificateAuthority {
    CertificateAuthority::generate(rng, name, NOW - DAY, NOW + 365 * DAY).unwrap()
}

pub fn issue(ca: &CertificateAuthority, rng: &mut SeededRng, node: &str) -> NodeCredentials {
    ca.issue_node(rng, node, NOW - DAY, NOW + 90 * DAY).unwrap()
}

/// Two PKI nodes that trust each other.
pub fn pki_nodes(seed: &str) -> (CertificateAuthority, Node, Node) {
    let mut rng = SeededRng::new(seed.as_bytes());
    let ca = ca(&mut rng, "tessera-ca");
    let a = issue(&ca, &mut rng, "node-a");
    let b = issue(&ca, &mut rng, "node-b");
    let (ca_cert, cb_cert) = (a.certificate().clone(), b.certificate().clone());
    let mut na = Node::new_pki(a, ca.trust_anchor().clone(), Config::default(), NOW).unwrap();
    let mut nb = Node::new_pki(b, ca.trust_anchor().clone(), Config::default(), NOW).unwrap();
    na.add_peer_certificate("node-b", cb_cert, NOW).unwrap();
    nb.add_peer_certificate("node-a", ca_cert, NOW).unwrap();
    (ca, na, nb)
}

pub const PSK: &[u8] = b"Zq3v9Lx2Rk7Wm1Tn5Yb8Hc4Jd6Gf0Ps_E";

pub fn psk_nodes() -> (Node, Node) {
    (
        Node::new_psk("node-a", Psk::new(PSK).unwrap(), Config::default()).unwrap(),
        Node::new_psk("node-b", Psk::new(PSK).unwrap(), Config::default()).unwrap(),
    )
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Stage {
    ServerSyn,
    ClientSynAck,
    ServerAck,
}

pub struct Tamper<'a> {
    pub syn: &'a dyn Fn(&mut Vec<u8>),
    pub synack: &'a dyn Fn(&mut Vec<u8>),
    pub ack: &'a dyn Fn(&mut Vec<u8>),
}

pub fn none(_: &mut Vec<u8>) {}

pub const NO_TAMPER: Tamper<'static> = Tamper {
    syn: &none,
    synack: &none,
    ack: &none,
};

/// Run a full handshake client -> server at `now`; return (server's view of the client,
/// client's view of the server), or the stage and reason of the first failure.
pub fn handshake(
    client: &mut Node,
    server: &mut Node,
    rng: &mut SeededRng,
    now: u64,
    t: &Tamper<'_>,
) -> Result<(PeerIdentity, PeerIdentity), (Stage, HandshakeError)> {
    let (cstate, mut syn) = client.client_syn(&web_claims(), rng.nonce(), now);
    (t.syn)(&mut syn);
    let received = server
        .server_syn(&syn, now)
        .map_err(|e| (Stage::ServerSyn, e))?;
    let (sstate, mut synack) = received
        .respond(server, &db_claims(), "postgres", rng.nonce(), now)
        .map_err(|e| (Stage::ServerSyn, e))?;
    (t.synack)(&mut synack);
    let (server_id, mut ack) = cstate
        .receive_syn_ack(client, &synack, now)
        .map_err(|e| (Stage::ClientSynAck, e))?;
    (t.ack)(&mut ack);
    let client_id = sstate
        .receive_ack(server, &ack, now)
        .map_err(|e| (Stage::ServerAck, e))?;
    Ok((client_id, server_id))
}

/// Pod labels that fill the claims of namespace "n", workload "w" to exactly
/// `MAX_CLAIMS_LEN`, and the length of the last key (`"z"` repeated, with an empty value).
pub fn largest_labels() -> (BTreeMap<String, String>, usize) {
    let mut labels = BTreeMap::new();
    let base = Claims::new("n", "w", Default::default(), Default::default()).unwrap();
    let mut size = base.encoded_len();
    let mut i = 0;
    while size + 2 + 10 + 1 + 63 <= identity::MAX_CLAIMS_LEN {
        labels.insert(format!("key-{i:06}"), "v".repeat(63));
        size += 2 + 10 + 1 + 63;
        i += 1;
    }
    let pad = identity::MAX_CLAIMS_LEN - size - 2 - 1;
    labels.insert("z".repeat(pad), String::new());
    (labels, pad)
}

/// The longest node name: a DNS-1123 subdomain of 253 bytes.
pub fn longest_node_name() -> String {
    format!(
        "{}.{}.{}.{}",
        "a".repeat(63),
        "b".repeat(63),
        "c".repeat(63),
        "d".repeat(61)
    )
}
