//! IPv4 / IPv6 + TCP parsing and rewriting, bounded by the packet's own length.
//!
//! Parse, don't validate: [`TcpSegment::parse`] reads every length field against the buffer and
//! returns either a segment whose offsets are all in bounds, `None` for a packet that is not
//! TCP, or a [`PacketError`]. Nothing here panics on any input, and the only allocation is the
//! growth of the packet by the 8 option bytes plus the token when a token is attached.
//!
//! Layout of an attached token: the TCP options area gets `NOP NOP` + our 6-byte option
//! (identity's `encode_tcp_option`) in front of the existing options (so 8 bytes, keeping the
//! 4-byte alignment), and the token becomes the first bytes of the TCP payload. Stripping
//! removes exactly that (a peer that placed the option elsewhere gets its padding fixed with
//! trailing NOPs), so attach-then-strip gives back the original packet byte for byte.

use std::net::IpAddr;
use std::ops::Range;

use identity::wire::{TCP_OPTION_EXID, TCP_OPTION_KIND, TCP_OPTION_LEN, TcpOptionError};
use identity::{MAX_TOKEN_LEN, encode_tcp_option, parse_tcp_option};
use pnet_packet::ip::{IpNextHeaderProtocol, IpNextHeaderProtocols};
use pnet_packet::ipv4::{self, Ipv4Packet, MutableIpv4Packet};
use pnet_packet::ipv6::{Ipv6Packet, MutableIpv6Packet};
use pnet_packet::tcp::{self, MutableTcpPacket, TcpFlags, TcpPacket};

/// IPv4 protocol / IPv6 next header number of TCP.
const PROTO_TCP: u8 = 6;
const PROTO_ICMP: u8 = 1;
const PROTO_ICMPV6: u8 = 58;
const PROTO_FRAGMENT: u8 = 44;
const PROTO_ESP: u8 = 50;
const PROTO_AH: u8 = 51;
/// IPv6 extension headers (and other headers before TCP) this datapath does not walk.
const IPV6_EXTENSION_HEADERS: [u8; 8] = [0, 43, 44, 50, 51, 60, 135, 139];
const TCP_HEADER_LEN: usize = 20;
const MAX_TCP_OPTIONS: usize = 40;
/// What an attached option occupies in the options area: two NOPs and the option.
const OPTION_BLOCK_LEN: usize = 2 + TCP_OPTION_LEN;
const NOP: u8 = 1;

/// Why a packet could not be parsed or rewritten. Metric labels: [`PacketError::as_str`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PacketError {
    /// Shorter than its headers or its own length fields say.
    #[error("truncated packet")]
    Truncated,
    /// The IP version nibble is neither 4 nor 6.
    #[error("IP version {0} is neither 4 nor 6")]
    BadIpVersion(u8),
    /// IPv4 header length below 20 bytes, or total length below it.
    #[error("bad IPv4 header: {0}")]
    BadIpHeader(&'static str),
    /// An IPv4 fragment (or a packet with more fragments to come): not handled.
    #[error("IP fragment")]
    Fragment,
    /// An IPv6 extension header (or ESP/AH) before the transport header: not handled.
    #[error("IPv6 extension header {0} not supported")]
    Ipv6ExtensionHeader(u8),
    /// TCP header shorter than 20 bytes or data offset out of range.
    #[error("bad TCP header: {0}")]
    BadTcpHeader(&'static str),
    /// The TCP options are malformed or our option is malformed.
    #[error("bad TCP options: {0}")]
    BadTcpOptions(TcpOptionError),
    /// Our option announces more token bytes than the payload holds.
    #[error("option announces a {announced}-byte token, payload has {payload}")]
    TokenTruncated {
        /// Token length in the option.
        announced: u16,
        /// Payload bytes present.
        payload: usize,
    },
    /// Adding our option would exceed the 40 bytes of TCP options.
    #[error("TCP options full: {0} bytes present, 8 more do not fit in 40")]
    OptionsFull(usize),
    /// The packet would exceed the maximum IP length with the token.
    #[error("packet would exceed the maximum IP length")]
    TooLarge,
    /// A token to attach is empty or longer than identity's `MAX_TOKEN_LEN`.
    #[error("token length {0} out of range")]
    TokenLength(usize),
    /// Attach on a packet that already carries our option, or strip on one that does not.
    #[error("{0}")]
    OptionState(&'static str),
}

impl PacketError {
    /// Stable metric label.
    pub fn as_str(&self) -> &'static str {
        match self {
            PacketError::Truncated => "truncated_packet",
            PacketError::BadIpVersion(_) => "bad_ip_version",
            PacketError::BadIpHeader(_) => "bad_ip_header",
            PacketError::Fragment => "ip_fragment",
            PacketError::Ipv6ExtensionHeader(_) => "ipv6_extension_header",
            PacketError::BadTcpHeader(_) => "bad_tcp_header",
            PacketError::BadTcpOptions(_) => "bad_tcp_options",
            PacketError::TokenTruncated { .. } => "token_truncated",
            PacketError::OptionsFull(_) => "tcp_options_full",
            PacketError::TooLarge => "packet_too_large",
            PacketError::TokenLength(_) => "token_length",
            PacketError::OptionState(_) => "option_state",
        }
    }
}

/// Most IPv6 extension headers walked before giving up (`ipv6_extension_header`).
pub const MAX_IPV6_EXTENSION_HEADERS: usize = 8;

/// A packet of any IP protocol, as far as a policy decision needs it: addresses, the transport
/// protocol (IPv6: the header after the extension headers) and, for the protocols that have
/// them (TCP, UDP, UDP-Lite, SCTP, DCCP), the ports; ICMP type and code. Nothing else of the
/// packet is trusted or kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpDatagram {
    /// Source address.
    pub src: IpAddr,
    /// Destination address.
    pub dst: IpAddr,
    /// IP protocol number (IPv4 protocol field, or the final IPv6 next header).
    pub protocol: u8,
    /// Source port (0 for a protocol without ports).
    pub src_port: u16,
    /// Destination port (0 for a protocol without ports).
    pub dst_port: u16,
    /// ICMP / ICMPv6 type and code.
    pub icmp: Option<(u8, u8)>,
    /// IPv6: extension headers were present before the transport header.
    pub extension_headers: bool,
    /// Offset of the transport header.
    pub l4_start: usize,
    /// Length of the IP packet per its header.
    pub ip_len: usize,
}

/// Protocols whose first four transport bytes are the source and destination ports.
const PORTED: [u8; 5] = [6, 17, 33, 132, 136];

impl IpDatagram {
    /// Parse a full IPv4 or IPv6 packet. IPv6 extension headers are walked (at most
    /// [`MAX_IPV6_EXTENSION_HEADERS`], each length checked against the packet); ESP ends the
    /// walk (its payload is encrypted: protocol 50). A non-first fragment is refused
    /// (`ip_fragment`): its transport header, if any, is in another packet.
    pub fn parse(packet: &[u8]) -> Result<IpDatagram, PacketError> {
        let first = *packet.first().ok_or(PacketError::Truncated)?;
        let (src, dst, mut protocol, mut l4_start, ip_len, mut extension_headers) = match first >> 4
        {
            4 => {
                let ip = Ipv4Packet::new(packet).ok_or(PacketError::Truncated)?;
                let ihl = ip.get_header_length() as usize * 4;
                if ihl < 20 {
                    return Err(PacketError::BadIpHeader("header length below 20 bytes"));
                }
                let total = ip.get_total_length() as usize;
                if total < ihl {
                    return Err(PacketError::BadIpHeader("total length below header length"));
                }
                if total > packet.len() {
                    return Err(PacketError::Truncated);
                }
                if ip.get_fragment_offset() != 0 {
                    return Err(PacketError::Fragment);
                }
                (
                    IpAddr::V4(ip.get_source()),
                    IpAddr::V4(ip.get_destination()),
                    ip.get_next_level_protocol().0,
                    ihl,
                    total,
                    false,
                )
            }
            6 => {
                let ip = Ipv6Packet::new(packet).ok_or(PacketError::Truncated)?;
                let total = 40 + ip.get_payload_length() as usize;
                if total > packet.len() {
                    return Err(PacketError::Truncated);
                }
                (
                    IpAddr::V6(ip.get_source()),
                    IpAddr::V6(ip.get_destination()),
                    ip.get_next_header().0,
                    40,
                    total,
                    false,
                )
            }
            v => return Err(PacketError::BadIpVersion(v)),
        };
        if src.is_ipv6() {
            let mut walked = 0;
            while IPV6_EXTENSION_HEADERS.contains(&protocol) && protocol != PROTO_ESP {
                walked += 1;
                if walked > MAX_IPV6_EXTENSION_HEADERS {
                    return Err(PacketError::Ipv6ExtensionHeader(protocol));
                }
                let header = packet
                    .get(l4_start..ip_len)
                    .and_then(|h| h.get(..8))
                    .ok_or(PacketError::Truncated)?;
                let len = match protocol {
                    PROTO_FRAGMENT => {
                        // Fragment offset: the high 13 bits of bytes 2-3.
                        if u16::from_be_bytes([header[2], header[3]]) >> 3 != 0 {
                            return Err(PacketError::Fragment);
                        }
                        8
                    }
                    PROTO_AH => (header[1] as usize + 2) * 4,
                    _ => (header[1] as usize + 1) * 8,
                };
                protocol = header[0];
                l4_start += len;
                extension_headers = true;
            }
        }
        let l4 = packet.get(l4_start..ip_len).ok_or(PacketError::Truncated)?;
        let (mut src_port, mut dst_port, mut icmp) = (0, 0, None);
        if PORTED.contains(&protocol) {
            let p = l4.get(..4).ok_or(PacketError::Truncated)?;
            src_port = u16::from_be_bytes([p[0], p[1]]);
            dst_port = u16::from_be_bytes([p[2], p[3]]);
        } else if protocol == PROTO_ICMP || protocol == PROTO_ICMPV6 {
            let p = l4.get(..2).ok_or(PacketError::Truncated)?;
            icmp = Some((p[0], p[1]));
        }
        Ok(IpDatagram {
            src,
            dst,
            protocol,
            src_port,
            dst_port,
            icmp,
            extension_headers,
            l4_start,
            ip_len,
        })
    }
}

/// A parsed TCP segment inside an IPv4 or IPv6 packet. All offsets are within the buffer it was
/// parsed from (as long as that buffer is not changed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TcpSegment {
    /// Source address.
    pub src: IpAddr,
    /// Destination address.
    pub dst: IpAddr,
    /// Source port.
    pub src_port: u16,
    /// Destination port.
    pub dst_port: u16,
    /// Sequence number.
    pub seq: u32,
    /// Acknowledgement number.
    pub ack: u32,
    /// TCP flags (low 8 bits: CWR ECE URG ACK PSH RST SYN FIN).
    pub flags: u8,
    /// Length of the IP packet per its header (bytes after it in the buffer are ignored).
    ip_len: usize,
    /// Offset of the TCP header.
    tcp_start: usize,
    /// TCP header length (data offset × 4).
    tcp_header_len: usize,
    /// Our option: offset in the options area and announced token length.
    option: Option<(usize, u16)>,
}

impl TcpSegment {
    /// Parse a full IP packet. `Ok(None)`: a well-formed packet that is not TCP.
    pub fn parse(packet: &[u8]) -> Result<Option<TcpSegment>, PacketError> {
        // IPv6: the token rewriting moves the TCP header, so it handles a bare IPv6 header
        // only (an extension header is refused before it is walked).
        if packet.first().is_some_and(|b| b >> 4 == 6)
            && packet.len() >= 40
            && IPV6_EXTENSION_HEADERS.contains(&packet[6])
        {
            return Err(PacketError::Ipv6ExtensionHeader(packet[6]));
        }
        let ip = IpDatagram::parse(packet)?;
        // IPv4 more-fragments flag (a first fragment: later ones IpDatagram refused).
        if ip.src.is_ipv4() && packet.get(6).is_some_and(|b| b & 0x20 != 0) {
            return Err(PacketError::Fragment);
        }
        if ip.protocol != PROTO_TCP {
            return Ok(None);
        }
        let (src, dst, tcp_start, ip_len) = (ip.src, ip.dst, ip.l4_start, ip.ip_len);
        let seg = &packet[tcp_start..ip_len];
        let tcp = TcpPacket::new(seg).ok_or(PacketError::BadTcpHeader("shorter than 20 bytes"))?;
        let tcp_header_len = tcp.get_data_offset() as usize * 4;
        if tcp_header_len < TCP_HEADER_LEN {
            return Err(PacketError::BadTcpHeader("data offset below 5"));
        }
        if tcp_header_len > seg.len() {
            return Err(PacketError::BadTcpHeader("data offset beyond the segment"));
        }
        let options = &seg[TCP_HEADER_LEN..tcp_header_len];
        let option = match parse_tcp_option(options).map_err(PacketError::BadTcpOptions)? {
            None => None,
            Some(token_len) => {
                let payload = seg.len() - tcp_header_len;
                if token_len as usize > payload {
                    return Err(PacketError::TokenTruncated {
                        announced: token_len,
                        payload,
                    });
                }
                let at = find_option(options)
                    .ok_or(PacketError::OptionState("option parsed but not located"))?;
                Some((at, token_len))
            }
        };
        Ok(Some(TcpSegment {
            src,
            dst,
            src_port: tcp.get_source(),
            dst_port: tcp.get_destination(),
            seq: tcp.get_sequence(),
            ack: tcp.get_acknowledgement(),
            flags: tcp.get_flags(),
            ip_len,
            tcp_start,
            tcp_header_len,
            option,
        }))
    }

    /// SYN set.
    pub fn is_syn(&self) -> bool {
        self.flags & TcpFlags::SYN != 0
    }
    /// ACK set.
    pub fn has_ack(&self) -> bool {
        self.flags & TcpFlags::ACK != 0
    }
    /// RST set.
    pub fn is_rst(&self) -> bool {
        self.flags & TcpFlags::RST != 0
    }
    /// FIN set.
    pub fn is_fin(&self) -> bool {
        self.flags & TcpFlags::FIN != 0
    }
    /// Length of the IP packet per its header.
    pub fn ip_len(&self) -> usize {
        self.ip_len
    }
    /// TCP header length including options.
    pub fn tcp_header_len(&self) -> usize {
        self.tcp_header_len
    }
    /// TCP payload length (token included, if any).
    pub fn payload_len(&self) -> usize {
        self.ip_len - self.tcp_start - self.tcp_header_len
    }
    /// TCP payload length without the token.
    pub fn data_len(&self) -> usize {
        self.payload_len() - self.token_len().map_or(0, usize::from)
    }
    /// Whether our option is present.
    pub fn has_option(&self) -> bool {
        self.option.is_some()
    }
    /// Announced token length, if our option is present.
    pub fn token_len(&self) -> Option<u16> {
        self.option.map(|(_, l)| l)
    }
    fn token_range(&self) -> Option<Range<usize>> {
        let (_, len) = self.option?;
        let start = self.tcp_start + self.tcp_header_len;
        Some(start..start + len as usize)
    }
    /// The token bytes, if our option is present (`packet` is the buffer this was parsed from).
    pub fn token<'p>(&self, packet: &'p [u8]) -> Option<&'p [u8]> {
        packet.get(self.token_range()?)
    }

    /// Whether the TCP checksum in the packet is correct (full checksum over the pseudo header,
    /// header and payload).
    pub fn tcp_checksum_ok(&self, packet: &[u8]) -> bool {
        let Some(seg) = packet.get(self.tcp_start..self.ip_len) else {
            return false;
        };
        let Some(tcp) = TcpPacket::new(seg) else {
            return false;
        };
        tcp.get_checksum() == self.compute_tcp_checksum(&tcp)
    }

    fn compute_tcp_checksum(&self, tcp: &TcpPacket) -> u16 {
        match (self.src, self.dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => tcp::ipv4_checksum(tcp, &s, &d),
            (IpAddr::V6(s), IpAddr::V6(d)) => tcp::ipv6_checksum(tcp, &s, &d),
            // Parse never mixes families.
            (IpAddr::V4(s), IpAddr::V6(d)) | (IpAddr::V6(d), IpAddr::V4(s)) => {
                tcp::ipv6_checksum(tcp, &s.to_ipv6_mapped(), &d)
            }
        }
    }
}

/// Offset of our option (kind 253, our ExID) in an options area that `parse_tcp_option`
/// accepted.
fn find_option(options: &[u8]) -> Option<usize> {
    let mut i = 0;
    while i < options.len() {
        match options[i] {
            0 => return None,
            1 => i += 1,
            kind => {
                let len = *options.get(i + 1)? as usize;
                if len < 2 {
                    return None;
                }
                let body = options.get(i + 2..i + len)?;
                if kind == TCP_OPTION_KIND
                    && body.len() >= 2
                    && u16::from_be_bytes([body[0], body[1]]) == TCP_OPTION_EXID
                {
                    return Some(i);
                }
                i += len;
            }
        }
    }
    None
}

/// Attach `token`: our option goes in front of the TCP options, the token in front of the
/// payload; lengths, data offset and both checksums are recomputed (so a packet that arrived
/// with a partial, offloaded checksum leaves with a full, valid one).
pub fn attach_token(
    packet: &mut Vec<u8>,
    seg: &TcpSegment,
    token: &[u8],
) -> Result<(), PacketError> {
    if seg.option.is_some() {
        return Err(PacketError::OptionState(
            "packet already carries the option",
        ));
    }
    if token.is_empty() || token.len() > MAX_TOKEN_LEN {
        return Err(PacketError::TokenLength(token.len()));
    }
    let options_len = seg.tcp_header_len - TCP_HEADER_LEN;
    if options_len + OPTION_BLOCK_LEN > MAX_TCP_OPTIONS {
        return Err(PacketError::OptionsFull(options_len));
    }
    let new_len = seg.ip_len + OPTION_BLOCK_LEN + token.len();
    let limit = match seg.src {
        IpAddr::V4(_) => 65_535,
        IpAddr::V6(_) => 40 + 65_535,
    };
    if new_len > limit {
        return Err(PacketError::TooLarge);
    }
    packet.truncate(seg.ip_len);
    packet.reserve_exact(OPTION_BLOCK_LEN + token.len());
    let payload_at = seg.tcp_start + seg.tcp_header_len;
    // Token first (higher offset), then the option block, so offsets stay valid.
    packet.splice(payload_at..payload_at, token.iter().copied());
    let mut block = [NOP; OPTION_BLOCK_LEN];
    block[2..].copy_from_slice(&encode_tcp_option(token.len() as u16));
    let options_at = seg.tcp_start + TCP_HEADER_LEN;
    packet.splice(options_at..options_at, block);
    finish(packet, seg, seg.tcp_header_len + OPTION_BLOCK_LEN)
}

/// Remove our option and the token it announces; fix lengths, data offset and checksums.
/// Returns the packet exactly as it was before [`attach_token`].
pub fn strip_token(packet: &mut Vec<u8>, seg: &TcpSegment) -> Result<(), PacketError> {
    let (at, _) = seg
        .option
        .ok_or(PacketError::OptionState("packet carries no option"))?;
    let token = seg
        .token_range()
        .ok_or(PacketError::OptionState("packet carries no option"))?;
    if token.end > seg.ip_len || seg.ip_len > packet.len() {
        return Err(PacketError::Truncated);
    }
    packet.truncate(seg.ip_len);
    packet.drain(token);
    let options_at = seg.tcp_start + TCP_HEADER_LEN;
    let opt_abs = options_at + at;
    // Our own layout: NOP NOP before the option. Otherwise remove the option alone and pad the
    // end of the options with two NOPs to keep the 4-byte multiple.
    let preceded_by_nops = at >= 2 && packet[opt_abs - 2] == NOP && packet[opt_abs - 1] == NOP;
    let new_header_len = if preceded_by_nops {
        packet.drain(opt_abs - 2..opt_abs + TCP_OPTION_LEN);
        seg.tcp_header_len - OPTION_BLOCK_LEN
    } else {
        packet.drain(opt_abs..opt_abs + TCP_OPTION_LEN);
        let end = seg.tcp_start + seg.tcp_header_len - TCP_OPTION_LEN;
        packet.splice(end..end, [NOP, NOP]);
        seg.tcp_header_len - TCP_OPTION_LEN + 2
    };
    finish(packet, seg, new_header_len)
}

/// Turn a SYN-ACK (or any segment) into a bare RST+ACK with the same ports, sequence and
/// acknowledgement numbers: the client kernel in SYN-SENT accepts it (it acknowledges the SYN)
/// and connect() fails at once with ECONNREFUSED.
pub fn rewrite_to_rst(packet: &mut Vec<u8>, seg: &TcpSegment) -> Result<(), PacketError> {
    if seg.ip_len > packet.len() {
        return Err(PacketError::Truncated);
    }
    packet.truncate(seg.tcp_start + TCP_HEADER_LEN);
    {
        let mut tcp =
            MutableTcpPacket::new(&mut packet[seg.tcp_start..]).ok_or(PacketError::Truncated)?;
        tcp.set_flags(TcpFlags::RST | TcpFlags::ACK);
        tcp.set_window(0);
        tcp.set_urgent_ptr(0);
    }
    finish(packet, seg, TCP_HEADER_LEN)
}

/// The RST a kernel answers `seg` with when it has no connection for it (RFC 9293, 3.10.7.1),
/// from the segment's destination back to its source: `SEQ = SEG.ACK` when the segment
/// acknowledges something (what the sender expects next from us, so its kernel takes the reset
/// at once), else `SEQ = 0, ACK = SEG.SEQ + SEG.LEN` with ACK set (`SEG.LEN` without our token,
/// which never takes sequence space; SYN and FIN count one). No options, no payload.
pub fn reset_reply(seg: &TcpSegment) -> Result<Vec<u8>, PacketError> {
    let ip_len = if seg.src.is_ipv4() { 20 } else { 40 };
    let mut buf = vec![0u8; ip_len + TCP_HEADER_LEN];
    let (seq, ack, flags) = if seg.has_ack() {
        (seg.ack, 0, TcpFlags::RST)
    } else {
        let len = u32::try_from(seg.data_len()).map_err(|_| PacketError::TooLarge)?
            + u32::from(seg.is_syn())
            + u32::from(seg.is_fin());
        (0, seg.seq.wrapping_add(len), TcpFlags::RST | TcpFlags::ACK)
    };
    {
        let mut tcp = MutableTcpPacket::new(&mut buf[ip_len..]).ok_or(PacketError::Truncated)?;
        tcp.set_source(seg.dst_port);
        tcp.set_destination(seg.src_port);
        tcp.set_sequence(seq);
        tcp.set_acknowledgement(ack);
        tcp.set_data_offset((TCP_HEADER_LEN / 4) as u8);
        tcp.set_flags(flags);
    }
    write_ip_header(&mut buf, seg.dst, seg.src, IpNextHeaderProtocols::Tcp)?;
    let sum = {
        let tcp = TcpPacket::new(&buf[ip_len..]).ok_or(PacketError::Truncated)?;
        match (seg.dst, seg.src) {
            (IpAddr::V4(s), IpAddr::V4(d)) => tcp::ipv4_checksum(&tcp, &s, &d),
            (IpAddr::V6(s), IpAddr::V6(d)) => tcp::ipv6_checksum(&tcp, &s, &d),
            _ => return Err(PacketError::OptionState("mixed address families")),
        }
    };
    MutableTcpPacket::new(&mut buf[ip_len..])
        .ok_or(PacketError::Truncated)?
        .set_checksum(sum);
    Ok(buf)
}

/// Write a bare IP header for `protocol` from `src` to `dst` at the start of `buf`, which holds
/// the whole packet (its length sets the header's): IPv4 of 20 bytes (don't fragment, TTL 64,
/// header checksum), or IPv6 of 40 (hop limit 64). The transport checksum is the caller's.
pub(crate) fn write_ip_header(
    buf: &mut [u8],
    src: IpAddr,
    dst: IpAddr,
    protocol: IpNextHeaderProtocol,
) -> Result<(), PacketError> {
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let total = u16::try_from(buf.len()).map_err(|_| PacketError::TooLarge)?;
            let mut ip = MutableIpv4Packet::new(buf).ok_or(PacketError::Truncated)?;
            ip.set_version(4);
            ip.set_header_length(5);
            ip.set_total_length(total);
            ip.set_flags(0b010);
            ip.set_ttl(64);
            ip.set_next_level_protocol(protocol);
            ip.set_source(s);
            ip.set_destination(d);
            let c = ipv4::checksum(&ip.to_immutable());
            ip.set_checksum(c);
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            let payload =
                u16::try_from(buf.len().saturating_sub(40)).map_err(|_| PacketError::TooLarge)?;
            let mut ip = MutableIpv6Packet::new(buf).ok_or(PacketError::Truncated)?;
            ip.set_version(6);
            ip.set_payload_length(payload);
            ip.set_next_header(protocol);
            ip.set_hop_limit(64);
            ip.set_source(s);
            ip.set_destination(d);
        }
        _ => return Err(PacketError::OptionState("mixed address families")),
    }
    Ok(())
}

/// Turn any segment into a bare ACK (no payload, no options, other flags cleared) with the same
/// ports, sequence and acknowledgement numbers and window: nothing reaches the receiving
/// application, and a kernel without a socket for it answers with a RST.
pub fn rewrite_to_ack(packet: &mut Vec<u8>, seg: &TcpSegment) -> Result<(), PacketError> {
    if seg.ip_len > packet.len() {
        return Err(PacketError::Truncated);
    }
    packet.truncate(seg.tcp_start + TCP_HEADER_LEN);
    {
        let mut tcp =
            MutableTcpPacket::new(&mut packet[seg.tcp_start..]).ok_or(PacketError::Truncated)?;
        tcp.set_flags(TcpFlags::ACK);
        tcp.set_urgent_ptr(0);
    }
    finish(packet, seg, TCP_HEADER_LEN)
}

/// Recompute the checksums of an unmodified-length packet in place (IPv4 header checksum and
/// the full TCP checksum), e.g. to complete a partial checksum.
pub fn fix_checksums(packet: &mut Vec<u8>, seg: &TcpSegment) -> Result<(), PacketError> {
    if seg.ip_len > packet.len() {
        return Err(PacketError::Truncated);
    }
    packet.truncate(seg.ip_len);
    finish(packet, seg, seg.tcp_header_len)
}

/// After a rewrite: `packet` holds exactly the new IP packet; set the IP length, TCP data offset
/// and both checksums.
fn finish(packet: &mut [u8], seg: &TcpSegment, tcp_header_len: usize) -> Result<(), PacketError> {
    let total = packet.len();
    match seg.src {
        IpAddr::V4(_) => {
            let len = u16::try_from(total).map_err(|_| PacketError::TooLarge)?;
            let mut ip = MutableIpv4Packet::new(packet).ok_or(PacketError::Truncated)?;
            ip.set_total_length(len);
            ip.set_checksum(0);
            let sum = ipv4::checksum(&ip.to_immutable());
            ip.set_checksum(sum);
        }
        IpAddr::V6(_) => {
            let len = u16::try_from(total - 40).map_err(|_| PacketError::TooLarge)?;
            let mut ip = MutableIpv6Packet::new(packet).ok_or(PacketError::Truncated)?;
            ip.set_payload_length(len);
        }
    }
    let seg_bytes = packet
        .get_mut(seg.tcp_start..)
        .ok_or(PacketError::Truncated)?;
    let mut tcp = MutableTcpPacket::new(seg_bytes).ok_or(PacketError::Truncated)?;
    tcp.set_data_offset((tcp_header_len / 4) as u8);
    tcp.set_checksum(0);
    let sum = seg.compute_tcp_checksum(&tcp.to_immutable());
    tcp.set_checksum(sum);
    Ok(())
}
