//! Byte layout of the three tokens and of the TCP option that marks them. Documented byte by
//! byte in docs/wire-format.md; pinned by tests/vectors/.

use crate::claims::{Claims, ClaimsCache, DecodeClaimsError, check_port_name, is_dns_subdomain};
use crate::error::HandshakeError;

/// The only token version this crate speaks.
pub const VERSION: u8 = 1;
/// Token type byte of the SYN token.
pub const TYPE_SYN: u8 = 1;
/// Token type byte of the SYN-ACK token.
pub const TYPE_SYN_ACK: u8 = 2;
/// Token type byte of the ACK token.
pub const TYPE_ACK: u8 = 3;
/// Token type byte of the bound SYN token: a SYN MACed for the node the client expects to
/// answer, so that node can authorize at the SYN (docs/wire-format.md, "Bound handshake").
pub const TYPE_SYN_BOUND: u8 = 6;
/// Token type byte of the bound SYN-ACK token: the answer of a node that authorized the client
/// at its bound SYN, which therefore expects no ACK token.
pub const TYPE_SYN_ACK_BOUND: u8 = 7;

/// Length of a key id.
pub const KEY_ID_LEN: usize = 8;
/// Length of a nonce.
pub const NONCE_LEN: usize = 16;
/// Length of a MAC (full HMAC-SHA256).
pub const MAC_LEN: usize = 32;
/// Maximum node name length (DNS-1123 subdomain).
pub const MAX_NODE_NAME_LEN: usize = 253;
/// Maximum port name length (IANA service name).
pub const MAX_PORT_NAME_LEN: usize = 15;
/// Fixed header of SYN and SYN-ACK: version, type, mode, name length, key id, timestamp, nonce.
pub const HEADER_LEN: usize = 4 + KEY_ID_LEN + 8 + NONCE_LEN;
/// Length of the ACK token.
pub const ACK_LEN: usize = 4 + MAC_LEN;
/// Largest SYN token: header + node name + claims.
pub const MAX_SYN_LEN: usize = HEADER_LEN + MAX_NODE_NAME_LEN + crate::claims::MAX_CLAIMS_LEN;
/// Length of the receiver tag's node part: the first 8 bytes of SHA-256 of the receiver's name.
pub const RECEIVER_NAME_TAG_LEN: usize = 8;
/// What a bound SYN adds to a SYN: the receiver's key id, its name tag and the MAC.
pub const BINDING_LEN: usize = KEY_ID_LEN + RECEIVER_NAME_TAG_LEN + MAC_LEN;
/// Largest bound SYN token: a SYN of the largest size and its binding: 1361 bytes, exactly
/// [`MAX_TOKEN_LEN`].
pub const MAX_SYN_BOUND_LEN: usize = MAX_SYN_LEN + BINDING_LEN;
/// Largest token of any type (a SYN-ACK with maximal node name, port name and claims): 1361
/// bytes. With an IPv6 header (40), a TCP header with the maximum 40 bytes of options (60) that
/// is 1461 bytes, under a 1500-byte MTU.
pub const MAX_TOKEN_LEN: usize = HEADER_LEN
    + MAX_NODE_NAME_LEN
    + 1
    + MAX_PORT_NAME_LEN
    + crate::claims::MAX_CLAIMS_LEN
    + MAC_LEN;

/// TCP option kind for RFC 6994 shared experimental options.
pub const TCP_OPTION_KIND: u8 = 253;
/// Our RFC 6994 ExID (0x7E55, unregistered with IANA; see docs/wire-format.md).
pub const TCP_OPTION_EXID: u16 = 0x7E55;
/// Length of our TCP option: kind, length, ExID (2), token length (2).
pub const TCP_OPTION_LEN: usize = 6;

/// Key mode byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Mode {
    /// Node certificates issued by a cluster CA (byte 1).
    Pki = 1,
    /// A cluster-wide pre-shared key (byte 2).
    Psk = 2,
}

impl Mode {
    pub(crate) fn from_byte(b: u8) -> Option<Mode> {
        match b {
            1 => Some(Mode::Pki),
            2 => Some(Mode::Psk),
            _ => None,
        }
    }
}

/// An 8-byte key identifier: the first 8 bytes of a certificate's SHA-256 fingerprint (PKI) or
/// of the PSK id derivation (PSK).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KeyId(pub [u8; KEY_ID_LEN]);

impl std::fmt::Display for KeyId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

/// A bounds-checked reader over untrusted bytes. Every accessor returns `None` instead of
/// reading past the end, so lengths are always checked against the remaining input before any
/// allocation.
#[derive(Clone)]
pub(crate) struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(buf: &'a [u8]) -> Self {
        Reader { buf, pos: 0 }
    }
    pub(crate) fn position(&self) -> usize {
        self.pos
    }
    pub(crate) fn is_empty(&self) -> bool {
        self.pos >= self.buf.len()
    }
    pub(crate) fn bytes(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.pos.checked_add(n)?;
        let s = self.buf.get(self.pos..end)?;
        self.pos = end;
        Some(s)
    }
    pub(crate) fn array<const N: usize>(&mut self) -> Option<[u8; N]> {
        self.bytes(N).and_then(|s| s.try_into().ok())
    }
    pub(crate) fn u8(&mut self) -> Option<u8> {
        self.array::<1>().map(|a| a[0])
    }
    pub(crate) fn u16(&mut self) -> Option<u16> {
        self.array::<2>().map(u16::from_be_bytes)
    }
    pub(crate) fn u64(&mut self) -> Option<u64> {
        self.array::<8>().map(u64::from_be_bytes)
    }
    pub(crate) fn str_n(&mut self, n: usize) -> Option<&'a str> {
        self.bytes(n).and_then(|b| std::str::from_utf8(b).ok())
    }
    pub(crate) fn str_u8(&mut self) -> Option<&'a str> {
        let n = self.u8()? as usize;
        self.str_n(n)
    }
}

/// Fields common to the SYN and SYN-ACK headers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// Key mode.
    pub mode: Mode,
    /// Sender's key id.
    pub key_id: KeyId,
    /// Sender's clock, unix milliseconds.
    pub timestamp_ms: u64,
    /// Sender's fresh nonce.
    pub nonce: [u8; NONCE_LEN],
    /// Sender's node name.
    pub node: String,
}

/// A decoded SYN token (unauthenticated until the handshake completes, or until its binding's
/// MAC is checked).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SynToken {
    /// Header.
    pub header: Header,
    /// Client workload's claims.
    pub claims: Claims,
    /// The binding of a bound SYN ([`TYPE_SYN_BOUND`]); `None` for a plain SYN.
    pub binding: Option<SynBinding>,
}

/// What a bound SYN carries after the claims: the node it is MACed for and the MAC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SynBinding {
    /// The key id of the node the client expects to answer.
    pub receiver_key: KeyId,
    /// The first 8 bytes of SHA-256 of that node's name.
    pub receiver_tag: [u8; RECEIVER_NAME_TAG_LEN],
    /// HMAC-SHA256 over the client's address, port and protocol and the token before the MAC.
    pub mac: [u8; MAC_LEN],
}

/// A decoded SYN-ACK token (MAC not yet checked).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SynAckToken {
    /// A bound SYN-ACK ([`TYPE_SYN_ACK_BOUND`]): the server authorized at the bound SYN.
    pub bound: bool,
    /// Header.
    pub header: Header,
    /// Name of the destination port on the server pod; empty if unnamed.
    pub port_name: String,
    /// Server workload's claims.
    pub claims: Claims,
    /// HMAC-SHA256 over the transcript (see wire-format.md).
    pub mac: [u8; MAC_LEN],
}

/// A decoded ACK token (MAC not yet checked).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AckToken {
    /// Key mode.
    pub mode: Mode,
    /// HMAC-SHA256 over both previous tokens' hashes and the ACK header.
    pub mac: [u8; MAC_LEN],
}

/// Encode a header; `node` is the sender's node name (passed separately so callers need not
/// clone it into the header).
pub(crate) fn encode_header(out: &mut Vec<u8>, ty: u8, h: &Header, node: &str) {
    out.push(VERSION);
    out.push(ty);
    out.push(h.mode as u8);
    out.push(node.len() as u8);
    out.extend_from_slice(&h.key_id.0);
    out.extend_from_slice(&h.timestamp_ms.to_be_bytes());
    out.extend_from_slice(&h.nonce);
    out.extend_from_slice(node.as_bytes());
}

/// Version, type and mode checks shared by all tokens, in that order, so the earliest byte that
/// is wrong gives the reason. `expected_ty` is the token's plain type; `bound_ty`, if any, the
/// bound variant of it also taken here. Returns the mode and the type found.
fn check_prefix(
    r: &mut Reader<'_>,
    total: usize,
    expected_ty: u8,
    bound_ty: Option<u8>,
) -> Result<(Mode, u8), HandshakeError> {
    if total > MAX_TOKEN_LEN {
        return Err(HandshakeError::Malformed("token longer than the maximum"));
    }
    let version = r.u8().ok_or(HandshakeError::Malformed("empty token"))?;
    if version != VERSION {
        return Err(HandshakeError::UnsupportedVersion(version));
    }
    let ty = r
        .u8()
        .ok_or(HandshakeError::Malformed("truncated at type"))?;
    if ty != expected_ty && Some(ty) != bound_ty {
        return Err(HandshakeError::WrongTokenType {
            expected: expected_ty,
            found: ty,
        });
    }
    let mode_byte = r
        .u8()
        .ok_or(HandshakeError::Malformed("truncated at mode"))?;
    let mode = Mode::from_byte(mode_byte).ok_or(HandshakeError::ModeMismatch(mode_byte))?;
    Ok((mode, ty))
}

fn decode_header(r: &mut Reader<'_>, mode: Mode) -> Result<Header, HandshakeError> {
    let name_len = r
        .u8()
        .ok_or(HandshakeError::Malformed("truncated at node name length"))?;
    let key_id = KeyId(
        r.array()
            .ok_or(HandshakeError::Malformed("truncated at key id"))?,
    );
    let timestamp_ms = r
        .u64()
        .ok_or(HandshakeError::Malformed("truncated at timestamp"))?;
    let nonce = r
        .array()
        .ok_or(HandshakeError::Malformed("truncated at nonce"))?;
    let node = r.str_n(name_len as usize).ok_or(HandshakeError::Malformed(
        "truncated or non-UTF-8 node name",
    ))?;
    if !is_dns_subdomain(node) {
        return Err(HandshakeError::Malformed(
            "node name is not a DNS-1123 subdomain",
        ));
    }
    Ok(Header {
        mode,
        key_id,
        timestamp_ms,
        nonce,
        node: node.to_owned(),
    })
}

fn decode_claims(
    r: &mut Reader<'_>,
    cache: Option<&mut ClaimsCache>,
) -> Result<Claims, HandshakeError> {
    match cache {
        Some(cache) => cache.decode(r),
        None => Claims::decode(r),
    }
    .map_err(|e| match e {
        DecodeClaimsError::Truncated => HandshakeError::Malformed("truncated claims"),
        DecodeClaimsError::Invalid(c) => HandshakeError::InvalidClaims(c),
    })
}

impl SynToken {
    /// Decode a SYN token. Never panics; allocation is bounded by the input length, which is
    /// itself checked against [`MAX_TOKEN_LEN`] first.
    pub fn decode(bytes: &[u8]) -> Result<SynToken, HandshakeError> {
        SynToken::decode_with(bytes, None)
    }

    /// [`SynToken::decode`], the claims through the node's cache.
    pub(crate) fn decode_with(
        bytes: &[u8],
        cache: Option<&mut ClaimsCache>,
    ) -> Result<SynToken, HandshakeError> {
        let mut r = Reader::new(bytes);
        let (mode, ty) = check_prefix(&mut r, bytes.len(), TYPE_SYN, Some(TYPE_SYN_BOUND))?;
        let header = decode_header(&mut r, mode)?;
        let claims = decode_claims(&mut r, cache)?;
        let binding = if ty == TYPE_SYN_BOUND {
            let receiver_key = KeyId(
                r.array()
                    .ok_or(HandshakeError::Malformed("truncated at receiver key id"))?,
            );
            let receiver_tag = r
                .array()
                .ok_or(HandshakeError::Malformed("truncated at receiver name tag"))?;
            let mac = r
                .array()
                .ok_or(HandshakeError::Malformed("truncated MAC"))?;
            Some(SynBinding {
                receiver_key,
                receiver_tag,
                mac,
            })
        } else {
            None
        };
        if !r.is_empty() {
            return Err(HandshakeError::Malformed("trailing bytes after SYN token"));
        }
        Ok(SynToken {
            header,
            claims,
            binding,
        })
    }

    /// Encode (deterministic; the exact bytes are what the SYN-ACK's MAC binds).
    pub fn encode(&self) -> Vec<u8> {
        let bound = self.binding.map_or(0, |_| BINDING_LEN);
        let mut out = Vec::with_capacity(
            HEADER_LEN + self.header.node.len() + self.claims.encoded_len() + bound,
        );
        let ty = match self.binding {
            Some(_) => TYPE_SYN_BOUND,
            None => TYPE_SYN,
        };
        encode_header(&mut out, ty, &self.header, &self.header.node);
        self.claims.encode(&mut out);
        if let Some(b) = &self.binding {
            out.extend_from_slice(&b.receiver_key.0);
            out.extend_from_slice(&b.receiver_tag);
            out.extend_from_slice(&b.mac);
        }
        out
    }
}

impl SynAckToken {
    /// Decode a SYN-ACK token (the MAC is checked by the handshake, not here).
    pub fn decode(bytes: &[u8]) -> Result<SynAckToken, HandshakeError> {
        SynAckToken::decode_with(bytes, None)
    }

    /// [`SynAckToken::decode`], the claims through the node's cache.
    pub(crate) fn decode_with(
        bytes: &[u8],
        cache: Option<&mut ClaimsCache>,
    ) -> Result<SynAckToken, HandshakeError> {
        let mut r = Reader::new(bytes);
        let (mode, ty) = check_prefix(&mut r, bytes.len(), TYPE_SYN_ACK, Some(TYPE_SYN_ACK_BOUND))?;
        let header = decode_header(&mut r, mode)?;
        let port_name = r
            .str_u8()
            .ok_or(HandshakeError::Malformed("truncated port name"))?;
        check_port_name(port_name).map_err(HandshakeError::InvalidClaims)?;
        let claims = decode_claims(&mut r, cache)?;
        let mac = r
            .array()
            .ok_or(HandshakeError::Malformed("truncated MAC"))?;
        if !r.is_empty() {
            return Err(HandshakeError::Malformed(
                "trailing bytes after SYN-ACK token",
            ));
        }
        Ok(SynAckToken {
            bound: ty == TYPE_SYN_ACK_BOUND,
            header,
            port_name: port_name.to_owned(),
            claims,
            mac,
        })
    }
}

impl AckToken {
    /// Decode an ACK token.
    pub fn decode(bytes: &[u8]) -> Result<AckToken, HandshakeError> {
        let mut r = Reader::new(bytes);
        let (mode, _) = check_prefix(&mut r, bytes.len(), TYPE_ACK, None)?;
        let reserved = r
            .u8()
            .ok_or(HandshakeError::Malformed("truncated at reserved byte"))?;
        if reserved != 0 {
            return Err(HandshakeError::Malformed("reserved byte is not zero"));
        }
        let mac = r
            .array()
            .ok_or(HandshakeError::Malformed("truncated MAC"))?;
        if !r.is_empty() {
            return Err(HandshakeError::Malformed("trailing bytes after ACK token"));
        }
        Ok(AckToken { mode, mac })
    }

    pub(crate) fn header(mode: Mode) -> [u8; 4] {
        [VERSION, TYPE_ACK, mode as u8, 0]
    }
}

/// Errors from [`parse_tcp_option`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TcpOptionError {
    /// An option's length byte is missing, below 2, or runs past the options area.
    #[error("malformed TCP options at offset {0}")]
    Malformed(usize),
    /// Our option (kind 253 with our ExID) has the wrong length.
    #[error("Tessera option has length {0}, expected 6")]
    BadLength(u8),
    /// The token length in the option is 0 or over [`MAX_TOKEN_LEN`].
    #[error("token length {0} out of range")]
    BadTokenLength(u16),
    /// Our option appears twice.
    #[error("Tessera option appears more than once")]
    Duplicate,
}

/// Encode our TCP option: `[253, 6, ExID hi, ExID lo, token length hi, token length lo]`. The
/// token itself is the first `token_len` bytes of the TCP payload. The caller pads the options
/// area to a multiple of 4 with NOPs.
pub fn encode_tcp_option(token_len: u16) -> [u8; TCP_OPTION_LEN] {
    let e = TCP_OPTION_EXID.to_be_bytes();
    let l = token_len.to_be_bytes();
    [
        TCP_OPTION_KIND,
        TCP_OPTION_LEN as u8,
        e[0],
        e[1],
        l[0],
        l[1],
    ]
}

/// Walk a TCP options area (the bytes after the 20-byte TCP header, up to the data offset) and
/// return the token length if our option is present. Other options, including other users of
/// kind 253 with another ExID, are skipped.
pub fn parse_tcp_option(options: &[u8]) -> Result<Option<u16>, TcpOptionError> {
    let mut i = 0;
    let mut found = None;
    while i < options.len() {
        match options[i] {
            0 => break,  // End of option list.
            1 => i += 1, // NOP.
            kind => {
                let len = *options.get(i + 1).ok_or(TcpOptionError::Malformed(i))? as usize;
                if len < 2 || i + len > options.len() {
                    return Err(TcpOptionError::Malformed(i));
                }
                let body = &options[i + 2..i + len];
                if kind == TCP_OPTION_KIND
                    && body.len() >= 2
                    && u16::from_be_bytes([body[0], body[1]]) == TCP_OPTION_EXID
                {
                    if len != TCP_OPTION_LEN {
                        return Err(TcpOptionError::BadLength(len as u8));
                    }
                    if found.is_some() {
                        return Err(TcpOptionError::Duplicate);
                    }
                    let tl = u16::from_be_bytes([body[2], body[3]]);
                    if tl == 0 || tl as usize > MAX_TOKEN_LEN {
                        return Err(TcpOptionError::BadTokenLength(tl));
                    }
                    found = Some(tl);
                }
                i += len;
            }
        }
    }
    Ok(found)
}

/// UDP control only: the server agent refuses the client's SYN (ingress denied); the "token" is
/// the 16-byte client nonce of that SYN, so that only someone who saw the SYN can refuse it.
pub const TYPE_UDP_REFUSED: u8 = 4;
/// UDP control only: the server agent holds no handshake for the tuple of a plain datagram
/// from a peer with an agent (the server workload restarted, or its conntrack entry of the
/// flow expired, while the client's stayed marked): the client's agent clears the flow's mark
/// so its next datagram starts a new handshake. The "token" is one zero byte: it carries
/// nothing (see docs/threat-model.md).
pub const TYPE_UDP_RESTART: u8 = 5;
/// The token of a [`TYPE_UDP_RESTART`] control datagram.
pub const UDP_RESTART_TOKEN: [u8; 1] = [0];
/// The first 8 bytes of every UDP control datagram: our ExID, "TSUDP", and the framing version.
pub const UDP_CONTROL_MAGIC: [u8; 8] = [0x7E, 0x55, b'T', b'S', b'U', b'D', b'P', 0x01];
/// Bytes before the token in a UDP control datagram: magic, type, reserved, token length.
pub const UDP_CONTROL_HEADER_LEN: usize = 12;
/// The largest UDP control payload.
pub const MAX_UDP_CONTROL_LEN: usize = UDP_CONTROL_HEADER_LEN + MAX_TOKEN_LEN;

/// Errors from [`parse_udp_control`]: a datagram that starts with [`UDP_CONTROL_MAGIC`] but is
/// not a well-formed control datagram.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UdpControlError {
    /// Shorter than the header, or than the token length it announces.
    #[error("UDP control datagram truncated")]
    Truncated,
    /// Bytes after the announced token.
    #[error("trailing bytes after the UDP control token")]
    Trailing,
    /// The type is not SYN, SYN-ACK, ACK, bound SYN, bound SYN-ACK, REFUSED or RESTART, or the
    /// reserved byte is not 0.
    #[error("UDP control type {0:#04x} or reserved byte not understood")]
    BadType(u8),
    /// A control datagram of a handshake type (SYN, SYN-ACK, ACK and their bound variants)
    /// whose token is of another type (the token's second byte): the framing and the token must
    /// agree, so a datagram is handled as what its token is.
    #[error("UDP control type {kind:#04x} carries a token of type {token:#04x}")]
    TypeMismatch {
        /// The control datagram's type.
        kind: u8,
        /// The token's type byte.
        token: u8,
    },
    /// The token length is 0 or over [`MAX_TOKEN_LEN`].
    #[error("UDP control token length {0} out of range")]
    BadTokenLength(u16),
}

/// The payload of a UDP control datagram carrying `token` of type `kind` ([`TYPE_SYN`],
/// [`TYPE_SYN_ACK`], [`TYPE_ACK`], [`TYPE_SYN_BOUND`], [`TYPE_SYN_ACK_BOUND`] with a token of
/// that type, [`TYPE_UDP_REFUSED`] with the client nonce, or
/// [`TYPE_UDP_RESTART`] with [`UDP_RESTART_TOKEN`]): the magic,
/// the type, a zero byte, the token length, the token. `None` if the token is empty or longer than [`MAX_TOKEN_LEN`].
pub fn encode_udp_control(kind: u8, token: &[u8]) -> Option<Vec<u8>> {
    if token.is_empty() || token.len() > MAX_TOKEN_LEN {
        return None;
    }
    let mut out = Vec::with_capacity(UDP_CONTROL_HEADER_LEN + token.len());
    out.extend_from_slice(&UDP_CONTROL_MAGIC);
    out.push(kind);
    out.push(0);
    out.extend_from_slice(&(token.len() as u16).to_be_bytes());
    out.extend_from_slice(token);
    Some(out)
}

/// Parse a UDP payload: `Ok(None)` for an application datagram (it does not start with
/// [`UDP_CONTROL_MAGIC`]); `Ok(Some((type, token)))` for a well-formed control datagram. Every
/// length is checked against the input before use; nothing is allocated.
pub fn parse_udp_control(payload: &[u8]) -> Result<Option<(u8, &[u8])>, UdpControlError> {
    if !payload.starts_with(&UDP_CONTROL_MAGIC) {
        return Ok(None);
    }
    let header = payload
        .get(..UDP_CONTROL_HEADER_LEN)
        .ok_or(UdpControlError::Truncated)?;
    let (kind, reserved) = (header[8], header[9]);
    let handshake = matches!(
        kind,
        TYPE_SYN | TYPE_SYN_ACK | TYPE_ACK | TYPE_SYN_BOUND | TYPE_SYN_ACK_BOUND
    );
    if !(handshake || matches!(kind, TYPE_UDP_REFUSED | TYPE_UDP_RESTART)) || reserved != 0 {
        return Err(UdpControlError::BadType(kind));
    }
    let len = u16::from_be_bytes([header[10], header[11]]);
    if len == 0 || len as usize > MAX_TOKEN_LEN {
        return Err(UdpControlError::BadTokenLength(len));
    }
    let rest = &payload[UDP_CONTROL_HEADER_LEN..];
    let token = rest.get(..len as usize).ok_or(UdpControlError::Truncated)?;
    if rest.len() > token.len() {
        return Err(UdpControlError::Trailing);
    }
    if handshake && token.get(1) != Some(&kind) {
        return Err(UdpControlError::TypeMismatch {
            kind,
            token: token.get(1).copied().unwrap_or(0),
        });
    }
    Ok(Some((kind, token)))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod udp_control_tests {
    use super::*;

    #[test]
    fn control_datagrams_round_trip_and_are_byte_exact() {
        let mut token = [0xAB; 36];
        token[1] = TYPE_ACK;
        let p = encode_udp_control(TYPE_ACK, &token).unwrap();
        assert_eq!(
            &p[..12],
            &[
                0x7E, 0x55, 0x54, 0x53, 0x55, 0x44, 0x50, 0x01, 0x03, 0x00, 0x00, 0x24
            ]
        );
        assert_eq!(p.len(), 48);
        assert_eq!(parse_udp_control(&p), Ok(Some((TYPE_ACK, &token[..]))));
        assert_eq!(encode_udp_control(TYPE_SYN, &[]), None);
        assert_eq!(encode_udp_control(TYPE_SYN, &[0; MAX_TOKEN_LEN + 1]), None);
        let big = encode_udp_control(TYPE_SYN_ACK, &[TYPE_SYN_ACK; MAX_TOKEN_LEN]).unwrap();
        assert_eq!(big.len(), MAX_UDP_CONTROL_LEN);
        assert!(parse_udp_control(&big).unwrap().is_some());
    }

    #[test]
    fn application_datagrams_and_malformed_control_are_told_apart() {
        assert_eq!(parse_udp_control(b""), Ok(None));
        assert_eq!(parse_udp_control(b"\x7eU dns query"), Ok(None));
        let good = encode_udp_control(TYPE_SYN, &[7; 10]).unwrap();
        assert_eq!(
            parse_udp_control(&good[..11]),
            Err(UdpControlError::Truncated)
        );
        assert_eq!(
            parse_udp_control(&good[..21]),
            Err(UdpControlError::Truncated)
        );
        let mut long = good.clone();
        long.push(0);
        assert_eq!(parse_udp_control(&long), Err(UdpControlError::Trailing));
        let mut bad = good.clone();
        bad[8] = 4;
        assert!(parse_udp_control(&bad).unwrap().is_some(), "REFUSED");
        bad[8] = 5;
        assert!(parse_udp_control(&bad).unwrap().is_some(), "RESTART");
        bad[8] = 8;
        assert_eq!(parse_udp_control(&bad), Err(UdpControlError::BadType(8)));
        bad[8] = 9;
        assert_eq!(parse_udp_control(&bad), Err(UdpControlError::BadType(9)));
        let mut bad = good.clone();
        bad[9] = 1;
        assert_eq!(parse_udp_control(&bad), Err(UdpControlError::BadType(1)));
        let mut bad = good;
        bad[10..12].copy_from_slice(&0u16.to_be_bytes());
        assert_eq!(
            parse_udp_control(&bad),
            Err(UdpControlError::BadTokenLength(0))
        );
    }

    #[test]
    fn a_handshake_control_carries_a_token_of_its_own_type() {
        for kind in [
            TYPE_SYN,
            TYPE_SYN_ACK,
            TYPE_ACK,
            TYPE_SYN_BOUND,
            TYPE_SYN_ACK_BOUND,
        ] {
            let ok = encode_udp_control(kind, &[VERSION, kind, 0, 0]).unwrap();
            assert_eq!(parse_udp_control(&ok), Ok(Some((kind, &ok[12..]))));
            // A bound SYN framed as a plain one (or any other pair) is refused, as is a token
            // too short to have a type.
            let other = if kind == TYPE_SYN_BOUND {
                TYPE_SYN
            } else {
                TYPE_SYN_BOUND
            };
            let mixed = encode_udp_control(kind, &[VERSION, other, 0, 0]).unwrap();
            assert_eq!(
                parse_udp_control(&mixed),
                Err(UdpControlError::TypeMismatch { kind, token: other })
            );
            let short = encode_udp_control(kind, &[VERSION]).unwrap();
            assert_eq!(
                parse_udp_control(&short),
                Err(UdpControlError::TypeMismatch { kind, token: 0 })
            );
        }
        // REFUSED and RESTART carry no token type.
        assert!(
            parse_udp_control(&encode_udp_control(TYPE_UDP_REFUSED, &[9; 16]).unwrap()).is_ok()
        );
    }

    #[test]
    fn arbitrary_payloads_never_panic() {
        // Every prefix of a valid datagram with every value of the bytes that matter.
        let good = encode_udp_control(TYPE_SYN_ACK, &[TYPE_SYN_ACK; 40]).unwrap();
        for n in 0..=good.len() {
            let _ = parse_udp_control(&good[..n]);
        }
        for i in 8..12 {
            for v in 0..=255u8 {
                let mut p = good.clone();
                p[i] = v;
                let _ = parse_udp_control(&p);
            }
        }
    }
}
