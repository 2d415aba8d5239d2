//! The sans-io handshake: no clock, no I/O, no OS randomness. Time (unix milliseconds) and
//! nonces are passed in; the caller keeps one small state per flow.
//!
//! ```text
//! client                                   server
//! Node::client_syn ──── SYN token ───────▶ Node::server_syn        (tentative identity)
//!                                          ServerSynReceived::respond
//! ClientAwaitingSynAck::receive_syn_ack ◀── SYN-ACK token ──
//!       (server identity, verified) ─────── ACK token ─────────▶ ServerAwaitingAck::receive_ack
//!                                                                 (client identity, authorized)
//! ```
//!
//! The SYN is not MACed (the client cannot know which node will answer: the destination may be
//! a Service VIP). It is bound retroactively: the SYN-ACK's MAC covers SHA-256(SYN), so the
//! client detects any change to its SYN; the ACK's MAC covers SHA-256(SYN) and SHA-256(SYN-ACK),
//! so the server learns that the SYN's claims really came from the named node. The server may
//! evaluate policy tentatively at the SYN; it authorizes only after a valid ACK.
//!
//! **The bound handshake: two tokens.** A client that expects a given node to answer (its
//! agent learnt the destination's node from an earlier SYN-ACK) can MAC its SYN for that node
//! and for the flow's source ([`Node::client_syn_bound`]). That node then authenticates the
//! client at the SYN itself ([`Node::server_syn_bound`]: MAC, timestamp, and the nonce recorded
//! in the replay cache at once), answers with a bound SYN-ACK, and expects no ACK:
//!
//! ```text
//! client                                   server
//! Node::client_syn_bound ── bound SYN ───▶ Node::server_syn_bound   (client identity, authorized)
//!                                          ServerSynBound::respond
//! ClientAwaitingSynAck::receive ◀───────── bound SYN-ACK
//!       (server identity, verified; no ACK token)
//! ```
//!
//! Any other node, a source that changed on the way (NAT) or a binding that does not verify
//! gives a *tentative* SYN, and the three-token handshake follows with the same SYN bytes: a
//! binding never authorizes anything by failing.

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::IpAddr;

use hmac::Mac;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

use crate::claims::{Claims, ClaimsCache, check_port_name, is_dns_subdomain};
use crate::error::{CertError, HandshakeError, PkiError};
use crate::keys::{PairKeys, pair_keys, pki_pair_secret, psk_pair_secret, psk_tunnel_secret};
use crate::pki::{NodeCertificate, NodeCredentials, TrustAnchor, check_validity};
use crate::psk::Psk;
use crate::replay::{ReplayCache, ReplayConfig};
use crate::wire::{
    AckToken, BINDING_LEN, Header, KeyId, MAC_LEN, Mode, NONCE_LEN, RECEIVER_NAME_TAG_LEN,
    SynAckToken, SynBinding, SynToken, TYPE_SYN, TYPE_SYN_ACK, TYPE_SYN_ACK_BOUND, TYPE_SYN_BOUND,
    encode_header,
};

/// Tunables. `Default` gives ±30 s skew and the default replay bounds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Config {
    /// Allowed clock skew either side of `now` for token timestamps.
    pub max_skew_ms: u64,
    /// Replay cache bounds.
    pub replay: ReplayConfig,
    /// Pair keys cached (one per peer node / certificate).
    pub max_cached_pairs: usize,
    /// Peer certificates held (PKI mode).
    pub max_peer_certs: usize,
    /// Revoked key ids remembered, to report `key_revoked` instead of `unknown_key`.
    pub max_revoked: usize,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            max_skew_ms: 30_000,
            replay: ReplayConfig::default(),
            max_cached_pairs: 4096,
            max_peer_certs: 8192,
            max_revoked: 4096,
        }
    }
}

/// An identity the handshake vouches for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerIdentity {
    /// The peer's node (authenticated by its key).
    pub node: String,
    /// The key id the peer's token carried (with `node`, what a client needs to bind a later
    /// SYN to this peer's node: [`Node::client_syn_bound`]).
    pub key_id: KeyId,
    /// The peer workload's claims.
    pub claims: Claims,
    /// Destination port name on the server pod (set only in the identity a client learns from a
    /// SYN-ACK; `None` if the port is unnamed or on the server side).
    pub port_name: Option<String>,
}

enum Keying {
    Pki {
        creds: Box<NodeCredentials>,
        trust: Box<TrustAnchor>,
        peers: HashMap<KeyId, NodeCertificate>,
        revoked: HashSet<KeyId>,
        revoked_order: VecDeque<KeyId>,
    },
    Psk {
        psk: Psk,
    },
}

/// A peer node as [`Node::peer_nodes`] reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerNode {
    /// The peer's node name.
    pub node: String,
    /// The key id its tokens carry.
    pub key_id: KeyId,
    /// PKI: when its certificate expires (ms since the Unix epoch).
    pub not_after_ms: Option<u64>,
    /// A pair key with it is cached: a handshake with it has happened.
    pub active: bool,
}

/// One node's handshake context: its name and keys, the peers it trusts, the pair-key cache and
/// the replay cache. One per node, shared by all flows (wrap it in a mutex if several threads
/// handle packets).
pub struct Node {
    name: String,
    key_id: KeyId,
    config: Config,
    keying: Keying,
    /// Pair keys by peer node name, then key id (a node has one or two certificates).
    pairs: ahash::HashMap<String, Vec<(KeyId, PairKeys)>>,
    pair_order: VecDeque<(String, KeyId)>,
    replay: ReplayCache,
    /// Decoded peer claims by their bytes (performance only).
    claims_cache: ClaimsCache,
    /// The first bytes of SHA-256 of this node's name: what a bound SYN for this node carries.
    name_tag: [u8; RECEIVER_NAME_TAG_LEN],
}

/// The first [`RECEIVER_NAME_TAG_LEN`] bytes of SHA-256 of a node name.
fn name_tag(node: &str) -> [u8; RECEIVER_NAME_TAG_LEN] {
    let mut tag = [0; RECEIVER_NAME_TAG_LEN];
    tag.copy_from_slice(&h(node.as_bytes())[..RECEIVER_NAME_TAG_LEN]);
    tag
}

/// The source of a flow as a bound SYN's MAC covers it: the client's address and port as the
/// client sends them and the server receives them, and the IP protocol (6 TCP, 17 UDP). A bound
/// SYN therefore authorizes only the flow it was made for; a source rewritten on the way (SNAT,
/// masquerade) makes the binding fail, and the three-token handshake follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FlowSource {
    /// The client's address.
    pub addr: IpAddr,
    /// The client's port.
    pub port: u16,
    /// The IP protocol number.
    pub protocol: u8,
}

impl FlowSource {
    /// The 19 bytes the MAC covers: the address as 16 bytes (IPv4 as an IPv4-mapped IPv6
    /// address), the port, the protocol.
    pub fn encode(&self) -> [u8; 19] {
        let addr = match self.addr {
            IpAddr::V4(a) => a.to_ipv6_mapped(),
            IpAddr::V6(a) => a,
        };
        let mut out = [0; 19];
        out[..16].copy_from_slice(&addr.octets());
        out[16..18].copy_from_slice(&self.port.to_be_bytes());
        out[18] = self.protocol;
        out
    }
}

/// Why a bound SYN was taken as a plain (tentative) one. Never an error: the three-token
/// handshake still proves the client. The datapath counts these by [`BindingMiss::as_str`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BindingMiss {
    /// Bound for another node, or for another key of this node (a rotated certificate): the
    /// destination's workload moved, or the client's memory of its node is stale.
    OtherReceiver,
    /// Bound for this node, but the MAC does not verify: the source was rewritten on the way
    /// (NAT), or the token was altered or forged.
    BadMac,
}

impl BindingMiss {
    /// Stable label for metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            BindingMiss::OtherReceiver => "binding_other_receiver",
            BindingMiss::BadMac => "binding_bad_mac",
        }
    }
}

/// What [`Node::server_syn_bound`] found.
#[derive(Debug)]
pub enum ServerSyn {
    /// A bound SYN for this node whose binding verified: the client is authenticated now and
    /// its nonce recorded. Answer with [`ServerSynBound::respond`]; no ACK follows.
    Bound(ServerSynBound),
    /// A plain SYN (`None`), or a bound one this node cannot use (why): tentative, exactly as
    /// from [`Node::server_syn`]; the three-token handshake follows.
    Tentative(ServerSynReceived, Option<BindingMiss>),
}

/// Constant-time comparison of a computed MAC with the received one.
fn check_tag(mac: crate::keys::HmacSha256, received: &[u8; MAC_LEN]) -> Result<(), HandshakeError> {
    let computed: [u8; MAC_LEN] = mac.finalize().into_bytes().into();
    if bool::from(computed.ct_eq(received)) {
        Ok(())
    } else {
        Err(HandshakeError::BadMac)
    }
}

fn h(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

impl Node {
    /// PKI mode. The node's own certificate must chain to `trust` and be valid at `now_ms`.
    pub fn new_pki(
        creds: NodeCredentials,
        trust: TrustAnchor,
        config: Config,
        now_ms: u64,
    ) -> Result<Node, CertError> {
        trust.verify(creds.certificate(), None, now_ms)?;
        let name = creds.certificate().node_name().to_owned();
        let own_tag = name_tag(&name);
        let key_id = creds.certificate().key_id();
        let me = creds.certificate().clone();
        let mut peers = HashMap::new();
        peers.insert(key_id, me);
        Ok(Node {
            name,
            key_id,
            config,
            keying: Keying::Pki {
                creds: Box::new(creds),
                trust: Box::new(trust),
                peers,
                revoked: HashSet::new(),
                revoked_order: VecDeque::new(),
            },
            pairs: Default::default(),
            pair_order: VecDeque::new(),
            replay: ReplayCache::new(config.replay),
            claims_cache: ClaimsCache::default(),
            name_tag: own_tag,
        })
    }

    /// PSK mode.
    pub fn new_psk(node_name: &str, psk: Psk, config: Config) -> Result<Node, PkiError> {
        if !is_dns_subdomain(node_name) {
            return Err(PkiError::InvalidName(node_name.to_owned()));
        }
        Ok(Node {
            name: node_name.to_owned(),
            key_id: psk.id(),
            config,
            keying: Keying::Psk { psk },
            pairs: Default::default(),
            pair_order: VecDeque::new(),
            replay: ReplayCache::new(config.replay),
            claims_cache: ClaimsCache::default(),
            name_tag: name_tag(node_name),
        })
    }

    /// This node's name.
    pub fn name(&self) -> &str {
        &self.name
    }
    /// This node's key id (certificate fingerprint prefix or PSK id).
    pub fn key_id(&self) -> KeyId {
        self.key_id
    }
    /// Key mode.
    pub fn mode(&self) -> Mode {
        match self.keying {
            Keying::Pki { .. } => Mode::Pki,
            Keying::Psk { .. } => Mode::Psk,
        }
    }
    /// The replay cache (for metrics: size, peers).
    pub fn replay_cache(&self) -> &ReplayCache {
        &self.replay
    }

    /// Forget the replay cache's entries that the timestamp window at `now_ms` refuses anyway
    /// ([`ReplayCache::expire`]); call it periodically. Returns the entries dropped.
    pub fn expire_replay(&mut self, now_ms: u64) -> usize {
        self.replay
            .expire(now_ms.saturating_sub(self.config.max_skew_ms))
    }

    /// The peer nodes this node knows, sorted by name: in PKI mode every trusted certificate
    /// (node, key id, expiry); in both modes every peer whose pair key is cached (a handshake
    /// with it happened), with `not_after_ms` unknown in PSK mode.
    pub fn peer_nodes(&self) -> Vec<PeerNode> {
        let mut out: Vec<PeerNode> = Vec::new();
        if let Keying::Pki { peers, .. } = &self.keying {
            for (id, cert) in peers {
                out.push(PeerNode {
                    node: cert.node_name().to_owned(),
                    key_id: *id,
                    not_after_ms: Some(cert.not_after_ms()),
                    active: self
                        .pairs
                        .get(cert.node_name())
                        .is_some_and(|v| v.iter().any(|(k, _)| k == id)),
                });
            }
        }
        for (node, keys) in &self.pairs {
            for (id, _) in keys {
                if !out.iter().any(|p| p.node == *node && p.key_id == *id) {
                    out.push(PeerNode {
                        node: node.clone(),
                        key_id: *id,
                        not_after_ms: None,
                        active: true,
                    });
                }
            }
        }
        out.sort_by(|a, b| a.node.cmp(&b.node).then(a.key_id.0.cmp(&b.key_id.0)));
        out
    }

    /// This node's static X25519 secret for the WireGuard tunnel between nodes (see
    /// docs/wire-format.md, "Tunnel keys"). PKI: the certified key itself (the node
    /// certificate's subject key is the node's tunnel key: its binding, publication, rotation
    /// and revocation are the certificate's). PSK: derived from the PSK and this node's name,
    /// so every PSK holder can compute it, as it can make every node's tokens.
    pub fn tunnel_secret(&self) -> Zeroizing<[u8; 32]> {
        match &self.keying {
            Keying::Pki { creds, .. } => Zeroizing::new(creds.secret().to_bytes()),
            Keying::Psk { psk } => psk_tunnel_secret(psk, &self.name),
        }
    }

    /// The X25519 public key a peer node's tunnel must have, if this node trusts one for it at
    /// `now_ms`. PKI: the key of that node's trusted, unrevoked certificate valid at `now_ms`
    /// (of two, the one that expires last; the CA must be valid too); `None` without one. PSK:
    /// the public key of the secret derived for that name (`None` for a name that is not a
    /// DNS-1123 subdomain, which no node can have).
    pub fn peer_tunnel_key(&self, node: &str, now_ms: u64) -> Option<[u8; 32]> {
        match &self.keying {
            Keying::Pki {
                peers,
                revoked,
                trust,
                ..
            } => {
                trust.verify_validity_only(now_ms).ok()?;
                peers
                    .iter()
                    .filter(|(id, c)| {
                        c.node_name() == node
                            && !revoked.contains(*id)
                            && check_validity(c.not_before_ms(), c.not_after_ms(), now_ms).is_ok()
                    })
                    .max_by_key(|(id, c)| (c.not_after_ms(), id.0))
                    .map(|(_, c)| *c.x25519_public())
            }
            Keying::Psk { psk } => {
                if !is_dns_subdomain(node) {
                    return None;
                }
                let secret = x25519_dalek::StaticSecret::from(*psk_tunnel_secret(psk, node));
                Some(x25519_dalek::PublicKey::from(&secret).to_bytes())
            }
        }
    }

    /// PKI mode: replace this node's own credentials (certificate and key rotation) in place.
    /// The new certificate must chain to the CA, name this node and be valid at `now_ms`,
    /// and its key id must not be revoked; otherwise nothing changes. Peers, revocations and
    /// the replay cache are kept; the old own certificate is no longer trusted for this
    /// node's own tokens; every cached pair key is dropped (they depend on our key and
    /// certificate). From then on tokens are made and checked with the new key, and
    /// [`Node::tunnel_secret`] is the new key. Peers that still know only the old certificate
    /// refuse this node's tokens (`unknown_key`: the new key id) until they learn the new one. Returns the
    /// new key id (the same credentials again change nothing).
    pub fn replace_credentials(
        &mut self,
        creds: NodeCredentials,
        now_ms: u64,
    ) -> Result<KeyId, CertError> {
        let Keying::Pki {
            creds: own,
            trust,
            peers,
            revoked,
            ..
        } = &mut self.keying
        else {
            return Err(CertError::WrongKeyType("node is in PSK mode"));
        };
        trust.verify(creds.certificate(), Some(&self.name), now_ms)?;
        let new_id = creds.certificate().key_id();
        if new_id == self.key_id {
            return Ok(new_id);
        }
        if revoked.contains(&new_id) {
            return Err(CertError::Revoked(new_id.to_string()));
        }
        peers.remove(&self.key_id);
        peers.insert(new_id, creds.certificate().clone());
        **own = creds;
        self.key_id = new_id;
        self.clear_pair_cache();
        Ok(new_id)
    }

    /// PKI mode: this node's own certificate (`None` in PSK mode).
    pub fn own_certificate(&self) -> Option<&NodeCertificate> {
        match &self.keying {
            Keying::Pki { creds, .. } => Some(creds.certificate()),
            Keying::Psk { .. } => None,
        }
    }

    /// PKI mode: trust a peer node's certificate, learned e.g. from its node annotation. It
    /// must chain to the CA, name `expected_node` and be valid at `now_ms`. A PSK-mode node
    /// refuses certificates.
    pub fn add_peer_certificate(
        &mut self,
        expected_node: &str,
        cert: NodeCertificate,
        now_ms: u64,
    ) -> Result<KeyId, CertError> {
        let Keying::Pki {
            trust,
            peers,
            revoked,
            ..
        } = &mut self.keying
        else {
            return Err(CertError::WrongKeyType("node is in PSK mode"));
        };
        trust.verify(&cert, Some(expected_node), now_ms)?;
        let id = cert.key_id();
        if revoked.contains(&id) {
            return Err(CertError::Revoked(id.to_string()));
        }
        if peers.len() >= self.config.max_peer_certs && !peers.contains_key(&id) {
            // Drop expired certificates first; if none, refuse rather than evict a live one.
            peers.retain(|_, c| c.not_after_ms() >= now_ms);
            if peers.len() >= self.config.max_peer_certs {
                return Err(CertError::Malformed(
                    "peer certificate table is full".into(),
                ));
            }
        }
        peers.insert(id, cert);
        Ok(id)
    }

    /// PKI mode: remove (revoke) every certificate of `node`. Tokens under their key ids are
    /// then rejected with `key_revoked`, and cached pair keys are dropped. Returns how many
    /// certificates were removed.
    pub fn remove_peer(&mut self, node: &str) -> usize {
        let ids: Vec<KeyId> = match &self.keying {
            Keying::Pki { peers, .. } => peers
                .iter()
                .filter(|(_, c)| c.node_name() == node)
                .map(|(id, _)| *id)
                .collect(),
            Keying::Psk { .. } => Vec::new(),
        };
        for id in &ids {
            self.revoke_key(*id);
        }
        ids.len()
    }

    /// PKI mode: revoke one key id (the certificate is removed if present).
    pub fn revoke_key(&mut self, id: KeyId) {
        let max_revoked = self.config.max_revoked.max(1);
        if let Keying::Pki {
            peers,
            revoked,
            revoked_order,
            ..
        } = &mut self.keying
        {
            peers.remove(&id);
            if revoked.insert(id) {
                revoked_order.push_back(id);
                while revoked_order.len() > max_revoked {
                    if let Some(old) = revoked_order.pop_front() {
                        revoked.remove(&old);
                    }
                }
            }
        }
        for v in self.pairs.values_mut() {
            v.retain(|(k, _)| *k != id);
        }
        self.pairs.retain(|_, v| !v.is_empty());
        self.pair_order.retain(|(_, k)| *k != id);
    }

    /// Client side: make the SYN token for a connection from the local workload `claims`.
    /// `nonce` must be fresh random bytes from the caller's CSPRNG.
    pub fn client_syn(
        &self,
        claims: &Claims,
        nonce: [u8; NONCE_LEN],
        now_ms: u64,
    ) -> (ClientAwaitingSynAck, Vec<u8>) {
        let header = Header {
            mode: self.mode(),
            key_id: self.key_id,
            timestamp_ms: now_ms,
            nonce,
            node: String::new(),
        };
        let mut syn =
            Vec::with_capacity(crate::wire::HEADER_LEN + self.name.len() + claims.encoded_len());
        encode_header(&mut syn, TYPE_SYN, &header, &self.name);
        claims.encode(&mut syn);
        let state = ClientAwaitingSynAck {
            syn_hash: h(&syn),
            bound: false,
        };
        (state, syn)
    }

    /// Client side: make a *bound* SYN token, MACed for the node `server_node` whose key id is
    /// `server_key` (what an earlier SYN-ACK from the destination proved: [`PeerIdentity`]'s
    /// `node` and `key_id`) and for the flow's `source`. If that node answers, it authorizes the
    /// client at this SYN and answers with a bound SYN-ACK; any other node, or a rewritten
    /// source, answers with a plain SYN-ACK and the handshake needs the ACK as usual.
    /// [`ClientAwaitingSynAck::receive`] takes either. Fails only if no pair key can be had with
    /// that node (PKI: its certificate is unknown, revoked or expired); make a plain SYN then.
    pub fn client_syn_bound(
        &mut self,
        claims: &Claims,
        server_node: &str,
        server_key: KeyId,
        source: &FlowSource,
        nonce: [u8; NONCE_LEN],
        now_ms: u64,
    ) -> Result<(ClientAwaitingSynAck, Vec<u8>), HandshakeError> {
        self.resolve_peer(server_key, server_node, now_ms)?;
        let keys = self.pair(server_key, server_node)?;
        let header = Header {
            mode: self.mode(),
            key_id: self.key_id,
            timestamp_ms: now_ms,
            nonce,
            node: String::new(),
        };
        let mut syn = Vec::with_capacity(
            crate::wire::HEADER_LEN + self.name.len() + claims.encoded_len() + BINDING_LEN,
        );
        encode_header(&mut syn, TYPE_SYN_BOUND, &header, &self.name);
        claims.encode(&mut syn);
        syn.extend_from_slice(&server_key.0);
        syn.extend_from_slice(&name_tag(server_node));
        let mut mac = keys.syn_out;
        mac.update(&source.encode());
        mac.update(&syn);
        let tag: [u8; MAC_LEN] = mac.finalize().into_bytes().into();
        syn.extend_from_slice(&tag);
        let state = ClientAwaitingSynAck {
            syn_hash: h(&syn),
            bound: true,
        };
        Ok((state, syn))
    }

    /// Server side: check a SYN token. Everything checkable without the client's MAC is
    /// checked here (format, version, mode, key id, certificate, node name, timestamp, replay),
    /// so most forgeries are dropped at the SYN. The returned identity is *tentative*.
    ///
    /// A bound SYN is taken here as a plain one (its binding is not checked):
    /// [`Node::server_syn_bound`] checks it.
    pub fn server_syn(
        &mut self,
        syn: &[u8],
        now_ms: u64,
    ) -> Result<ServerSynReceived, HandshakeError> {
        self.check_syn(syn, now_ms).map(|(state, _)| state)
    }

    /// Server side: check a SYN token, plain or bound, that arrived from `source`. Every check
    /// of [`Node::server_syn`] comes first, with the same errors. Then, for a bound SYN for this
    /// node (its key id and name), the binding's MAC over `source` and the token: if it
    /// verifies, the client nonce is recorded in the replay cache (the same SYN is refused from
    /// then on, as after an ACK; the datapath answers a retransmission from its flow state) and
    /// the client is authenticated: [`ServerSyn::Bound`]. Otherwise the SYN is tentative, with
    /// the reason: [`ServerSyn::Tentative`].
    pub fn server_syn_bound(
        &mut self,
        syn: &[u8],
        source: &FlowSource,
        now_ms: u64,
    ) -> Result<ServerSyn, HandshakeError> {
        let (state, binding) = self.check_syn(syn, now_ms)?;
        let Some(binding) = binding else {
            return Ok(ServerSyn::Tentative(state, None));
        };
        if binding.receiver_key != self.key_id || binding.receiver_tag != self.name_tag {
            return Ok(ServerSyn::Tentative(
                state,
                Some(BindingMiss::OtherReceiver),
            ));
        }
        let keys = self.pair(state.client_key, &state.peer.node)?;
        let mut mac = keys.syn_in;
        mac.update(&source.encode());
        mac.update(&syn[..syn.len() - MAC_LEN]);
        if check_tag(mac, &binding.mac).is_err() {
            return Ok(ServerSyn::Tentative(state, Some(BindingMiss::BadMac)));
        }
        let oldest = now_ms.saturating_sub(self.config.max_skew_ms);
        self.replay
            .insert(
                &state.peer.node,
                state.client_nonce,
                state.client_ts,
                oldest,
            )
            .map_err(|_| HandshakeError::Replay)?;
        Ok(ServerSyn::Bound(ServerSynBound(state)))
    }

    /// The checks of a SYN that need no MAC, and its binding if it is a bound SYN.
    fn check_syn(
        &mut self,
        syn: &[u8],
        now_ms: u64,
    ) -> Result<(ServerSynReceived, Option<SynBinding>), HandshakeError> {
        let tok = SynToken::decode_with(syn, Some(&mut self.claims_cache))?;
        let hd = &tok.header;
        self.check_mode(hd.mode)?;
        self.resolve_peer(hd.key_id, &hd.node, now_ms)?;
        self.check_time(hd.timestamp_ms, now_ms)?;
        if self
            .replay
            .check(&hd.node, &hd.nonce, hd.timestamp_ms)
            .is_err()
        {
            return Err(HandshakeError::Replay);
        }
        let state = ServerSynReceived {
            syn_hash: h(syn),
            client_key: hd.key_id,
            client_nonce: hd.nonce,
            client_ts: hd.timestamp_ms,
            peer: PeerIdentity {
                key_id: hd.key_id,
                node: tok.header.node,
                claims: tok.claims,
                port_name: None,
            },
        };
        Ok((state, tok.binding))
    }

    fn check_mode(&self, mode: Mode) -> Result<(), HandshakeError> {
        if mode != self.mode() {
            return Err(HandshakeError::ModeMismatch(mode as u8));
        }
        Ok(())
    }

    fn check_time(&self, ts: u64, now_ms: u64) -> Result<(), HandshakeError> {
        if ts.abs_diff(now_ms) > self.config.max_skew_ms {
            return Err(HandshakeError::StaleTimestamp {
                timestamp_ms: ts,
                now_ms,
            });
        }
        Ok(())
    }

    /// Check the key id and node name of a peer token against what we trust.
    fn resolve_peer(&self, id: KeyId, node: &str, now_ms: u64) -> Result<(), HandshakeError> {
        match &self.keying {
            Keying::Psk { psk } => {
                if id != psk.id() {
                    return Err(HandshakeError::PskMismatch);
                }
                Ok(())
            }
            Keying::Pki {
                peers,
                revoked,
                trust,
                ..
            } => {
                if revoked.contains(&id) {
                    return Err(HandshakeError::KeyRevoked(id.to_string()));
                }
                let cert = peers
                    .get(&id)
                    .ok_or_else(|| HandshakeError::UnknownKey(id.to_string()))?;
                if cert.node_name() != node {
                    return Err(HandshakeError::NodeNameMismatch {
                        claimed: node.to_owned(),
                        certified: cert.node_name().to_owned(),
                    });
                }
                check_validity(cert.not_before_ms(), cert.not_after_ms(), now_ms)
                    .map_err(HandshakeError::Certificate)?;
                // The CA itself must still be valid too.
                trust
                    .verify_validity_only(now_ms)
                    .map_err(HandshakeError::Certificate)
            }
        }
    }

    /// Pair keys for (peer key id, peer node), derived once and cached (bounded).
    fn pair(&mut self, id: KeyId, node: &str) -> Result<PairKeys, HandshakeError> {
        if let Some(v) = self.pairs.get(node)
            && let Some((_, k)) = v.iter().find(|(i, _)| *i == id)
        {
            return Ok(k.clone());
        }
        let secret = match &self.keying {
            Keying::Psk { psk } => psk_pair_secret(psk, &self.name, node),
            Keying::Pki { creds, peers, .. } => {
                let cert = peers
                    .get(&id)
                    .ok_or_else(|| HandshakeError::UnknownKey(id.to_string()))?;
                pki_pair_secret(creds, cert)?
            }
        };
        let keys = pair_keys(&secret, &self.name, node);
        let cap = self.config.max_cached_pairs.max(1);
        while self.pair_order.len() >= cap {
            let Some((old_node, old_id)) = self.pair_order.pop_front() else {
                break;
            };
            if let Some(v) = self.pairs.get_mut(&old_node) {
                v.retain(|(i, _)| *i != old_id);
                if v.is_empty() {
                    self.pairs.remove(&old_node);
                }
            }
        }
        self.pairs
            .entry(node.to_owned())
            .or_default()
            .push((id, keys.clone()));
        self.pair_order.push_back((node.to_owned(), id));
        Ok(keys)
    }

    /// Forget all cached pair keys (they are derived again on next use), e.g. after rotating
    /// this node's key.
    pub fn clear_pair_cache(&mut self) {
        self.pairs.clear();
        self.pair_order.clear();
    }

    /// Derive (or fetch) the pair keys with a peer ahead of time, e.g. when its certificate
    /// arrives, so the first handshake does not pay the X25519 operation.
    pub fn prepare_peer(
        &mut self,
        id: KeyId,
        node: &str,
        now_ms: u64,
    ) -> Result<(), HandshakeError> {
        self.resolve_peer(id, node, now_ms)?;
        self.pair(id, node).map(|_| ())
    }
}

impl TrustAnchor {
    pub(crate) fn verify_validity_only(&self, now_ms: u64) -> Result<(), CertError> {
        let (nb, na) = self.validity_ms();
        check_validity(nb, na, now_ms)
    }
}

/// Client state after sending the SYN (one per flow; 33 bytes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientAwaitingSynAck {
    syn_hash: [u8; 32],
    /// The SYN was bound ([`Node::client_syn_bound`]): a bound SYN-ACK may answer it.
    bound: bool,
}

/// What a verified SYN-ACK gives the client ([`ClientAwaitingSynAck::receive`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientProven {
    /// The server's identity, authenticated by its node key and bound to this SYN.
    pub peer: PeerIdentity,
    /// The ACK token to send; `None` after a bound SYN-ACK: the server authorized the client at
    /// its bound SYN and expects nothing more.
    pub ack: Option<Vec<u8>>,
}

impl ClientAwaitingSynAck {
    /// Whether this SYN was bound.
    pub fn is_bound(&self) -> bool {
        self.bound
    }

    /// Check the server's plain SYN-ACK and make the ACK token: [`ClientAwaitingSynAck::receive`]
    /// for callers that never send a bound SYN; a bound SYN-ACK is refused here
    /// (`wrong_token_type`).
    pub fn receive_syn_ack(
        &self,
        node: &mut Node,
        synack: &[u8],
        now_ms: u64,
    ) -> Result<(PeerIdentity, Vec<u8>), HandshakeError> {
        let proven = self.receive(node, synack, now_ms)?;
        match proven.ack {
            Some(ack) => Ok((proven.peer, ack)),
            None => Err(HandshakeError::WrongTokenType {
                expected: TYPE_SYN_ACK,
                found: TYPE_SYN_ACK_BOUND,
            }),
        }
    }

    /// Check the server's SYN-ACK, plain or (after a bound SYN) bound. On success the returned
    /// identity is the server's, authenticated by its node key and bound to this SYN (so to the
    /// client nonce), with the ACK token to send after a plain SYN-ACK. The state is not
    /// consumed, so a forged SYN-ACK does not kill the flow.
    pub fn receive(
        &self,
        node: &mut Node,
        synack: &[u8],
        now_ms: u64,
    ) -> Result<ClientProven, HandshakeError> {
        let tok = SynAckToken::decode_with(synack, Some(&mut node.claims_cache))?;
        if tok.bound && !self.bound {
            return Err(HandshakeError::WrongTokenType {
                expected: TYPE_SYN_ACK,
                found: TYPE_SYN_ACK_BOUND,
            });
        }
        let hd = &tok.header;
        node.check_mode(hd.mode)?;
        node.resolve_peer(hd.key_id, &hd.node, now_ms)?;
        node.check_time(hd.timestamp_ms, now_ms)?;
        let keys = node.pair(hd.key_id, &hd.node)?;
        let body = &synack[..synack.len() - MAC_LEN];
        let mut mac = keys.synack_in;
        mac.update(&self.syn_hash);
        mac.update(body);
        check_tag(mac, &tok.mac)?;
        let ack = (!tok.bound).then(|| {
            let ack_header = AckToken::header(node.mode());
            let mut mac = keys.ack_out;
            mac.update(&self.syn_hash);
            mac.update(&tok.mac);
            mac.update(&ack_header);
            let tag = mac.finalize().into_bytes();
            let mut ack = Vec::with_capacity(ack_header.len() + MAC_LEN);
            ack.extend_from_slice(&ack_header);
            ack.extend_from_slice(&tag);
            ack
        });
        let port_name = (!tok.port_name.is_empty()).then_some(tok.port_name);
        Ok(ClientProven {
            peer: PeerIdentity {
                key_id: tok.header.key_id,
                node: tok.header.node,
                claims: tok.claims,
                port_name,
            },
            ack,
        })
    }
}

/// Server state after a SYN passed the checks (before the SYN-ACK is made).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerSynReceived {
    syn_hash: [u8; 32],
    client_key: KeyId,
    client_nonce: [u8; NONCE_LEN],
    client_ts: u64,
    peer: PeerIdentity,
}

impl ServerSynReceived {
    /// The client's identity as the SYN states it. NOT authenticated yet: use it only to drop
    /// SYNs that policy would deny anyway; authorize at [`ServerAwaitingAck::receive_ack`].
    pub fn tentative_peer(&self) -> &PeerIdentity {
        &self.peer
    }

    /// Make the SYN-ACK token for the local server workload `claims`, `port_name` being the
    /// name of the destination port on the server pod ("" if unnamed).
    pub fn respond(
        self,
        node: &mut Node,
        claims: &Claims,
        port_name: &str,
        nonce: [u8; NONCE_LEN],
        now_ms: u64,
    ) -> Result<(ServerAwaitingAck, Vec<u8>), HandshakeError> {
        let (tag, out) = self.synack(node, TYPE_SYN_ACK, claims, port_name, nonce, now_ms)?;
        let state = ServerAwaitingAck {
            syn_hash: self.syn_hash,
            synack_mac: tag,
            client_key: self.client_key,
            client_nonce: self.client_nonce,
            client_ts: self.client_ts,
            peer: self.peer,
        };
        Ok((state, out))
    }

    /// The SYN-ACK of type `ty` answering this SYN, and its MAC.
    fn synack(
        &self,
        node: &mut Node,
        ty: u8,
        claims: &Claims,
        port_name: &str,
        nonce: [u8; NONCE_LEN],
        now_ms: u64,
    ) -> Result<([u8; MAC_LEN], Vec<u8>), HandshakeError> {
        check_port_name(port_name).map_err(HandshakeError::LocalClaims)?;
        let keys = node.pair(self.client_key, &self.peer.node)?;
        let header = Header {
            mode: node.mode(),
            key_id: node.key_id,
            timestamp_ms: now_ms,
            nonce,
            node: String::new(),
        };
        let mut out = Vec::with_capacity(
            crate::wire::HEADER_LEN
                + node.name.len()
                + 1
                + port_name.len()
                + claims.encoded_len()
                + MAC_LEN,
        );
        encode_header(&mut out, ty, &header, &node.name);
        out.push(port_name.len() as u8);
        out.extend_from_slice(port_name.as_bytes());
        claims.encode(&mut out);
        let mut mac = keys.synack_out;
        mac.update(&self.syn_hash);
        mac.update(&out);
        let tag: [u8; MAC_LEN] = mac.finalize().into_bytes().into();
        out.extend_from_slice(&tag);
        Ok((tag, out))
    }
}

/// A bound SYN that verified ([`ServerSyn::Bound`]): the client is authenticated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerSynBound(ServerSynReceived);

impl ServerSynBound {
    /// The client's identity, authenticated by its node's MAC over the SYN and the flow's
    /// source: authorize on it.
    pub fn peer(&self) -> &PeerIdentity {
        &self.0.peer
    }

    /// Make the bound SYN-ACK token for the local server workload `claims` (as
    /// [`ServerSynReceived::respond`], with the bound type): it tells the client that it is
    /// authorized and that no ACK token is expected.
    pub fn respond(
        self,
        node: &mut Node,
        claims: &Claims,
        port_name: &str,
        nonce: [u8; NONCE_LEN],
        now_ms: u64,
    ) -> Result<Vec<u8>, HandshakeError> {
        self.0
            .synack(node, TYPE_SYN_ACK_BOUND, claims, port_name, nonce, now_ms)
            .map(|(_, out)| out)
    }
}

/// Server state after sending the SYN-ACK (one per flow).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerAwaitingAck {
    syn_hash: [u8; 32],
    synack_mac: [u8; MAC_LEN],
    client_key: KeyId,
    client_nonce: [u8; NONCE_LEN],
    client_ts: u64,
    peer: PeerIdentity,
}

impl ServerAwaitingAck {
    /// The tentative client identity (same as at the SYN).
    pub fn tentative_peer(&self) -> &PeerIdentity {
        &self.peer
    }

    /// Check the ACK. On success the client identity is authenticated: its node's key proves
    /// it sent this SYN (claims included) and saw this SYN-ACK (so the server nonce). The
    /// client nonce is recorded in the replay cache; the same ACK (or SYN) is then refused.
    /// The state is not consumed, so a forged ACK does not kill the flow.
    pub fn receive_ack(
        &self,
        node: &mut Node,
        ack: &[u8],
        now_ms: u64,
    ) -> Result<PeerIdentity, HandshakeError> {
        let tok = AckToken::decode(ack)?;
        node.check_mode(tok.mode)?;
        // Re-check the client's key: it may have been revoked or expired since the SYN.
        node.resolve_peer(self.client_key, &self.peer.node, now_ms)?;
        let keys = node.pair(self.client_key, &self.peer.node)?;
        let mut mac = keys.ack_in;
        mac.update(&self.syn_hash);
        mac.update(&self.synack_mac);
        mac.update(&ack[..ack.len() - MAC_LEN]);
        check_tag(mac, &tok.mac)?;
        let oldest = now_ms.saturating_sub(node.config.max_skew_ms);
        node.replay
            .insert(&self.peer.node, self.client_nonce, self.client_ts, oldest)
            .map_err(|_| HandshakeError::Replay)?;
        Ok(self.peer.clone())
    }
}
