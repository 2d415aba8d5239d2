//! Key schedule: pair secrets (once per node pair, cached) and the per-direction,
//! per-message-type MAC keys derived from them. See docs/wire-format.md, "Key derivation".

use hkdf::Hkdf;
use hmac::{Hmac, KeyInit};
use sha2::Sha256;
use zeroize::Zeroizing;

use crate::error::HandshakeError;
use crate::pki::{NodeCertificate, NodeCredentials};
use crate::psk::Psk;

pub(crate) type HmacSha256 = Hmac<Sha256>;

/// Salt of the PKI pair-secret extraction.
pub const PKI_PAIR_SALT: &[u8] = b"tessera/v1/pki-pair";
/// Salt of the PSK pair-secret extraction.
pub const PSK_PAIR_SALT: &[u8] = b"tessera/v1/psk-pair";
/// Prefix of the MAC key info strings.
pub const MAC_KEY_INFO: &[u8] = b"tessera/v1/mac";
/// Salt of the PSK-mode tunnel key derivation.
pub const TUNNEL_SALT: &[u8] = b"tessera/v1/tunnel-salt";
/// Prefix of the PSK-mode tunnel key info string (followed by the length-prefixed node name).
pub const TUNNEL_KEY_INFO: &[u8] = b"tessera/v1/tunnel-key";

/// The six MAC keys of one node pair, seen from the local node, already keyed (the HMAC inner
/// and outer pads are precomputed once, so a token costs only its own blocks).
#[derive(Clone)]
pub(crate) struct PairKeys {
    pub syn_out: HmacSha256,
    pub syn_in: HmacSha256,
    pub synack_out: HmacSha256,
    pub synack_in: HmacSha256,
    pub ack_out: HmacSha256,
    pub ack_in: HmacSha256,
}

fn lp(out: &mut Vec<u8>, s: &[u8]) {
    out.push(s.len() as u8);
    out.extend_from_slice(s);
}

fn mac_key(prk: &Hkdf<Sha256>, msg: &[u8], sender: &str, receiver: &str) -> HmacSha256 {
    let mut info = Vec::with_capacity(MAC_KEY_INFO.len() + 16 + sender.len() + receiver.len());
    info.extend_from_slice(MAC_KEY_INFO);
    lp(&mut info, msg);
    lp(&mut info, sender.as_bytes());
    lp(&mut info, receiver.as_bytes());
    let mut okm = Zeroizing::new([0u8; 32]);
    // 32 bytes is far below HKDF-SHA256's 8160-byte limit: expand cannot fail.
    let _ = prk.expand(&info, okm.as_mut());
    // HMAC takes any key length: cannot fail.
    match <HmacSha256 as KeyInit>::new_from_slice(okm.as_ref()) {
        Ok(m) => m,
        Err(_) => unreachable_hmac(),
    }
}

#[cold]
fn unreachable_hmac() -> HmacSha256 {
    // HMAC-SHA256 accepts every key length, so this is never reached; keep a total function.
    <HmacSha256 as KeyInit>::new(&Default::default())
}

/// Derive the six MAC keys from a 32-byte pair secret.
pub(crate) fn pair_keys(pair_secret: &[u8; 32], local: &str, peer: &str) -> PairKeys {
    let prk = match Hkdf::<Sha256>::from_prk(pair_secret) {
        Ok(p) => p,
        Err(_) => Hkdf::<Sha256>::new(None, pair_secret),
    };
    PairKeys {
        syn_out: mac_key(&prk, b"syn", local, peer),
        syn_in: mac_key(&prk, b"syn", peer, local),
        synack_out: mac_key(&prk, b"syn-ack", local, peer),
        synack_in: mac_key(&prk, b"syn-ack", peer, local),
        ack_out: mac_key(&prk, b"ack", local, peer),
        ack_in: mac_key(&prk, b"ack", peer, local),
    }
}

/// PKI pair secret: HKDF-SHA256(salt = PKI_PAIR_SALT, ikm = X25519(local, peer),
/// info = "tessera/v1/pki-pair-info" || the two (node name, certificate fingerprint) pairs,
/// sorted, each name length-prefixed).
pub(crate) fn pki_pair_secret(
    local: &NodeCredentials,
    peer: &NodeCertificate,
) -> Result<Zeroizing<[u8; 32]>, HandshakeError> {
    let shared = local
        .secret()
        .diffie_hellman(&x25519_dalek::PublicKey::from(*peer.x25519_public()));
    if !shared.was_contributory() {
        return Err(HandshakeError::KeyAgreement);
    }
    let me = local.certificate();
    let mut parties = [
        (me.node_name().as_bytes(), me.fingerprint()),
        (peer.node_name().as_bytes(), peer.fingerprint()),
    ];
    parties.sort();
    let mut info = Vec::with_capacity(64 + 2 * 256 + 64);
    info.extend_from_slice(b"tessera/v1/pki-pair-info");
    for (name, fp) in &parties {
        lp(&mut info, name);
        info.extend_from_slice(fp);
    }
    let hk = Hkdf::<Sha256>::new(Some(PKI_PAIR_SALT), shared.as_bytes());
    let mut out = Zeroizing::new([0u8; 32]);
    let _ = hk.expand(&info, out.as_mut());
    Ok(out)
}

/// PSK pair secret: HKDF-SHA256(salt = PSK_PAIR_SALT, ikm = PSK,
/// info = "tessera/v1/psk-pair-info" || the two node names, sorted, length-prefixed).
pub(crate) fn psk_pair_secret(psk: &Psk, a: &str, b: &str) -> Zeroizing<[u8; 32]> {
    let (lo, hi) = if a <= b { (a, b) } else { (b, a) };
    let mut info = Vec::with_capacity(32 + lo.len() + hi.len());
    info.extend_from_slice(b"tessera/v1/psk-pair-info");
    lp(&mut info, lo.as_bytes());
    lp(&mut info, hi.as_bytes());
    let hk = Hkdf::<Sha256>::new(Some(PSK_PAIR_SALT), psk.bytes());
    let mut out = Zeroizing::new([0u8; 32]);
    let _ = hk.expand(&info, out.as_mut());
    out
}

/// PSK mode: a node's static X25519 secret for the tunnel between nodes,
/// HKDF-SHA256(salt = TUNNEL_SALT, IKM = PSK, info = TUNNEL_KEY_INFO || lp(node name), L = 32).
/// Every PSK holder can compute it for every node name (the PSK's trust, as for tokens).
pub(crate) fn psk_tunnel_secret(psk: &Psk, node: &str) -> Zeroizing<[u8; 32]> {
    let mut info = Vec::with_capacity(TUNNEL_KEY_INFO.len() + 1 + node.len());
    info.extend_from_slice(TUNNEL_KEY_INFO);
    lp(&mut info, node.as_bytes());
    let hk = Hkdf::<Sha256>::new(Some(TUNNEL_SALT), psk.bytes());
    let mut out = Zeroizing::new([0u8; 32]);
    let _ = hk.expand(&info, out.as_mut());
    out
}
