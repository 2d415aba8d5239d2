//! Capturing IPv4/TCP and IPv6/TCP packets in a netns (an AF_PACKET socket, as tcpdump does) and
//! injecting raw IPv4 or IPv6 packets (an IPPROTO_RAW socket of the packet's family: on Linux the
//! caller writes the IP header, any source address).

use std::net::{IpAddr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::ops::Range;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use nix::sys::socket::{
    AddressFamily, LinkAddr, MsgFlags, SockFlag, SockProtocol, SockType, SockaddrIn, SockaddrIn6,
    recvfrom, sendto, setsockopt, socket, sockopt,
};
use nix::sys::time::TimeVal;

/// TCP option kind and ExID of Tessera's token marker (docs/wire-format.md).
pub const OPTION_KIND: u8 = 253;
pub const OPTION_EXID: u16 = 0x7E55;

pub const FIN: u8 = 0x01;
pub const SYN: u8 = 0x02;
pub const RST: u8 = 0x04;
pub const PSH: u8 = 0x08;
pub const ACK: u8 = 0x10;

/// An IPv4 or IPv6 packet carrying TCP (header, options, payload), with accessors and fix-ups.
/// IPv6: TCP directly after the 40-byte header (no extension headers).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IpTcp(pub Vec<u8>);

impl IpTcp {
    /// Checks that `b` is a whole IPv4/TCP or IPv6/TCP packet (trailing link padding cut off).
    pub fn parse(b: &[u8]) -> Option<IpTcp> {
        let (tcp, total) = match b.first()? >> 4 {
            4 => {
                if b.len() < 40 || b[9] != 6 {
                    return None;
                }
                let ihl = usize::from(b[0] & 0x0f) * 4;
                (ihl, usize::from(u16::from_be_bytes([b[2], b[3]])))
            }
            6 => {
                if b.len() < 60 || b[6] != 6 {
                    return None;
                }
                (40, 40 + usize::from(u16::from_be_bytes([b[4], b[5]])))
            }
            _ => return None,
        };
        if tcp < 20 || total > b.len() || total < tcp + 20 {
            return None;
        }
        let doff = usize::from(b[tcp + 12] >> 4) * 4;
        if doff < 20 || tcp + doff > total {
            return None;
        }
        Some(IpTcp(b[..total].to_vec()))
    }

    pub fn is_ipv6(&self) -> bool {
        self.0[0] >> 4 == 6
    }
    /// Offset of the TCP header: after the IPv4 header (IHL) or the 40-byte IPv6 header.
    fn tcp(&self) -> usize {
        if self.is_ipv6() {
            40
        } else {
            usize::from(self.0[0] & 0x0f) * 4
        }
    }
    fn doff(&self) -> usize {
        usize::from(self.0[self.tcp() + 12] >> 4) * 4
    }
    /// Byte range of the source and destination addresses (the pseudo-header's).
    fn addrs(&self) -> Range<usize> {
        if self.is_ipv6() { 8..40 } else { 12..20 }
    }
    pub fn src(&self) -> IpAddr {
        let a = self.addrs();
        addr(&self.0[a.start..a.start + a.len() / 2])
    }
    pub fn dst(&self) -> IpAddr {
        let a = self.addrs();
        addr(&self.0[a.start + a.len() / 2..a.end])
    }
    pub fn sport(&self) -> u16 {
        let t = self.tcp();
        u16::from_be_bytes([self.0[t], self.0[t + 1]])
    }
    pub fn dport(&self) -> u16 {
        let t = self.tcp();
        u16::from_be_bytes([self.0[t + 2], self.0[t + 3]])
    }
    /// TCP flags byte (FIN 0x01, SYN 0x02, RST 0x04, PSH 0x08, ACK 0x10).
    pub fn flags(&self) -> u8 {
        self.0[self.tcp() + 13]
    }
    /// Byte range of the TCP payload in the packet.
    pub fn payload(&self) -> Range<usize> {
        self.tcp() + self.doff()..self.0.len()
    }
    /// The token length announced by our TCP option, if present.
    pub fn token_len(&self) -> Option<usize> {
        let start = self.tcp() + 20;
        let end = self.tcp() + self.doff();
        let o = &self.0[start..end];
        let mut i = 0;
        while i < o.len() {
            match o[i] {
                0 => return None,
                1 => i += 1,
                kind => {
                    let len = usize::from(*o.get(i + 1)?);
                    if len < 2 || i + len > o.len() {
                        return None;
                    }
                    if kind == OPTION_KIND
                        && len == 6
                        && u16::from_be_bytes([o[i + 2], o[i + 3]]) == OPTION_EXID
                    {
                        return Some(usize::from(u16::from_be_bytes([o[i + 4], o[i + 5]])));
                    }
                    i += len;
                }
            }
        }
        None
    }
    /// Byte range of the token (start of the payload, announced length), if our option is there.
    pub fn token(&self) -> Option<Range<usize>> {
        let p = self.payload();
        let l = self.token_len()?;
        (p.start + l <= p.end).then(|| p.start..p.start + l)
    }
    pub fn set_sport(&mut self, port: u16) {
        let t = self.tcp();
        self.0[t..t + 2].copy_from_slice(&port.to_be_bytes());
    }
    /// Recomputes the IPv4 header checksum (IPv6 has none) and the full TCP checksum.
    pub fn fix_checksums(&mut self) {
        let t = self.tcp();
        if !self.is_ipv6() {
            self.0[10] = 0;
            self.0[11] = 0;
            let c = fold(sum16(&self.0[..t], 0));
            self.0[10..12].copy_from_slice(&c.to_be_bytes());
        }
        self.0[t + 16] = 0;
        self.0[t + 17] = 0;
        let c = fold(self.tcp_sum());
        self.0[t + 16..t + 18].copy_from_slice(&c.to_be_bytes());
    }
    /// Whether the TCP checksum verifies.
    pub fn tcp_checksum_ok(&self) -> bool {
        fold(self.tcp_sum()) == 0
    }
    /// One's-complement sum of the pseudo-header (addresses, protocol 6, TCP length: the same
    /// words for IPv4 and, with the length below 64 KiB, IPv6) and the TCP segment.
    fn tcp_sum(&self) -> u32 {
        let t = self.tcp();
        let mut s = sum16(&self.0[self.addrs()], 0);
        s += 6 + (self.0.len() - t) as u32;
        sum16(&self.0[t..], s)
    }
}

fn addr(b: &[u8]) -> IpAddr {
    match b.len() {
        4 => IpAddr::from([b[0], b[1], b[2], b[3]]),
        _ => {
            let mut o = [0u8; 16];
            o.copy_from_slice(b);
            IpAddr::from(o)
        }
    }
}

fn sum16(b: &[u8], mut s: u32) -> u32 {
    let mut chunks = b.chunks_exact(2);
    for c in &mut chunks {
        s += u32::from(u16::from_be_bytes([c[0], c[1]]));
    }
    if let [last] = chunks.remainder() {
        s += u32::from(*last) << 8;
    }
    s
}

fn fold(mut s: u32) -> u16 {
    while s >> 16 != 0 {
        s = (s & 0xffff) + (s >> 16);
    }
    !(s as u16)
}

/// Packets captured in a netns by a background thread; stopped on drop. `T`: what a captured
/// IP packet is parsed into ([`IpTcp`], or [`IpAny`] for every protocol).
pub struct Capture<T = IpTcp> {
    rx: mpsc::Receiver<T>,
    stop: Arc<AtomicBool>,
    seen: Vec<T>,
}

/// A whole IPv4 or IPv6 packet of any protocol, as captured.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IpAny(pub Vec<u8>);

impl IpAny {
    /// The packet up to its IP length (trailing link padding cut off), if it is a whole one.
    pub fn parse(b: &[u8]) -> Option<IpAny> {
        let total = match b.first()? >> 4 {
            4 if b.len() >= 20 => usize::from(u16::from_be_bytes([b[2], b[3]])),
            6 if b.len() >= 40 => 40 + usize::from(u16::from_be_bytes([b[4], b[5]])),
            _ => return None,
        };
        (total <= b.len()).then(|| IpAny(b[..total].to_vec()))
    }

    /// The UDP payload, for a UDP packet (IPv6: directly after the 40-byte header).
    pub fn udp_payload(&self) -> Option<&[u8]> {
        let l4 = match self.0.first()? >> 4 {
            4 if self.0[9] == 17 => usize::from(self.0[0] & 0x0f) * 4,
            6 if self.0[6] == 17 => 40,
            _ => return None,
        };
        self.0.get(l4 + 8..)
    }
}

impl Capture<IpTcp> {
    /// Starts capturing IPv4/TCP and IPv6/TCP packets (both directions, every interface of `ns`) for which
    /// `keep` holds. Capturing has begun when this returns.
    pub fn start(ns: &str, keep: impl Fn(&IpTcp) -> bool + Send + 'static) -> Capture {
        Capture::start_with(ns, IpTcp::parse, keep)
    }
}

impl Capture<IpAny> {
    /// Starts capturing IP packets of every protocol for which `keep` holds.
    pub fn start_any(ns: &str, keep: impl Fn(&IpAny) -> bool + Send + 'static) -> Capture<IpAny> {
        Capture::start_with(ns, IpAny::parse, keep)
    }
}

impl<T: Clone + Send + 'static> Capture<T> {
    /// Starts capturing the packets `parse` accepts and `keep` holds.
    pub fn start_with(
        ns: &str,
        parse: fn(&[u8]) -> Option<T>,
        keep: impl Fn(&T) -> bool + Send + 'static,
    ) -> Capture<T> {
        let (tx, rx) = mpsc::channel();
        let (ready_tx, ready_rx) = mpsc::channel();
        let stop = Arc::new(AtomicBool::new(false));
        let st = stop.clone();
        crate::netns::spawn_in_netns(ns, move || {
            let fd = socket(
                AddressFamily::Packet,
                SockType::Raw,
                SockFlag::empty(),
                SockProtocol::EthAll,
            )
            .expect("AF_PACKET socket");
            setsockopt(&fd, sockopt::ReceiveTimeout, &TimeVal::new(0, 100_000))
                .expect("SO_RCVTIMEO");
            let _ = ready_tx.send(());
            let mut buf = vec![0u8; 65_600];
            while !st.load(Ordering::SeqCst) {
                let Ok((n, _)) = recvfrom::<LinkAddr>(fd.as_raw_fd(), &mut buf) else {
                    continue;
                };
                // Ethernet (veth) frames: 14-byte header, IPv4 or IPv6 ethertype.
                if n < 14 || (buf[12..14] != [0x08, 0x00] && buf[12..14] != [0x86, 0xdd]) {
                    continue;
                }
                if let Some(p) = parse(&buf[14..n])
                    && keep(&p)
                    && tx.send(p).is_err()
                {
                    return;
                }
            }
        });
        ready_rx
            .recv_timeout(Duration::from_secs(5))
            .expect("capture thread did not start");
        Capture {
            rx,
            stop,
            seen: Vec::new(),
        }
    }

    /// Waits up to `timeout` for a captured packet matching `pred` (looking at what was
    /// captured before too) and returns it.
    pub fn wait_for(&mut self, timeout: Duration, pred: impl Fn(&T) -> bool) -> Option<T> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if let Some(p) = self.seen.iter().find(|p| pred(p)) {
                return Some(p.clone());
            }
            let left = deadline.checked_duration_since(std::time::Instant::now())?;
            match self.rx.recv_timeout(left) {
                Ok(p) => self.seen.push(p),
                Err(_) => return None,
            }
        }
    }

    /// Everything captured so far.
    pub fn drain(&mut self) -> &[T] {
        while let Ok(p) = self.rx.try_recv() {
            self.seen.push(p);
        }
        &self.seen
    }
}

impl<T> Drop for Capture<T> {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// Sends a raw IPv4 or IPv6 packet (header included) from inside `ns`, routed by its
/// destination.
pub fn inject(ns: &str, packet: &IpTcp) {
    inject_bytes(ns, packet.dst(), packet.0.clone());
}

/// Sends `bytes`, a whole IPv4 or IPv6 packet of any protocol (header included, whatever its
/// source address says), from inside `ns` through a raw socket, routed to `dst`.
pub fn inject_bytes(ns: &str, dst: IpAddr, bytes: Vec<u8>) {
    crate::netns::in_netns(ns, move || {
        let family = match dst {
            IpAddr::V4(_) => AddressFamily::Inet,
            IpAddr::V6(_) => AddressFamily::Inet6,
        };
        // IPPROTO_RAW implies IP_HDRINCL (IPv4) / a caller-written header (IPv6, Linux).
        let fd = socket(family, SockType::Raw, SockFlag::empty(), SockProtocol::Raw)
            .expect("raw socket");
        let sent = match dst {
            IpAddr::V4(d) => sendto(
                fd.as_raw_fd(),
                &bytes,
                &SockaddrIn::from(SocketAddrV4::new(d, 0)),
                MsgFlags::empty(),
            ),
            IpAddr::V6(d) => sendto(
                fd.as_raw_fd(),
                &bytes,
                &SockaddrIn6::from(SocketAddrV6::new(d, 0, 0, 0)),
                MsgFlags::empty(),
            ),
        };
        let n = sent.expect("sendto raw");
        assert_eq!(n, bytes.len(), "raw send was short");
    });
}

/// An IPv4 or IPv6 packet (family of `src`) of IP protocol `protocol` carrying `l4` (its
/// transport header and data, checksums as given), with a valid IPv4 header checksum.
pub fn ip_packet(src: IpAddr, dst: IpAddr, protocol: u8, l4: &[u8]) -> Vec<u8> {
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let mut p = vec![0x45, 0, 0, 0, 0x12, 0x34, 0x40, 0, 64, protocol, 0, 0];
            p.extend_from_slice(&s.octets());
            p.extend_from_slice(&d.octets());
            let len = (20 + l4.len()) as u16;
            p[2..4].copy_from_slice(&len.to_be_bytes());
            let sum = fold(sum16(&p, 0));
            p[10..12].copy_from_slice(&sum.to_be_bytes());
            p.extend_from_slice(l4);
            p
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            let mut p = vec![0x60, 0, 0, 0];
            p.extend_from_slice(&(l4.len() as u16).to_be_bytes());
            p.extend_from_slice(&[protocol, 64]);
            p.extend_from_slice(&s.octets());
            p.extend_from_slice(&d.octets());
            p.extend_from_slice(l4);
            p
        }
        _ => panic!("ip_packet: mixed address families"),
    }
}

/// A UDP datagram from `src` to `dst` with a valid checksum (required over IPv6).
pub fn udp_packet(src: SocketAddr, dst: SocketAddr, payload: &[u8]) -> Vec<u8> {
    let len = (8 + payload.len()) as u16;
    let mut l4 = Vec::new();
    l4.extend_from_slice(&src.port().to_be_bytes());
    l4.extend_from_slice(&dst.port().to_be_bytes());
    l4.extend_from_slice(&len.to_be_bytes());
    l4.extend_from_slice(&[0, 0]);
    l4.extend_from_slice(payload);
    // Pseudo-header: addresses, protocol, length.
    let mut pseudo = Vec::new();
    match (src.ip(), dst.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            pseudo.extend_from_slice(&s.octets());
            pseudo.extend_from_slice(&d.octets());
            pseudo.extend_from_slice(&[0, 17]);
            pseudo.extend_from_slice(&len.to_be_bytes());
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            pseudo.extend_from_slice(&s.octets());
            pseudo.extend_from_slice(&d.octets());
            pseudo.extend_from_slice(&u32::from(len).to_be_bytes());
            pseudo.extend_from_slice(&[0, 0, 0, 17]);
        }
        _ => panic!("udp_packet: mixed address families"),
    }
    pseudo.extend_from_slice(&l4);
    let c = fold(sum16(&pseudo, 0));
    l4[6..8].copy_from_slice(&(if c == 0 { 0xffff } else { c }).to_be_bytes());
    ip_packet(src.ip(), dst.ip(), 17, &l4)
}

/// Builds a SYN from `src:sport` to `dst:dport` (both IPv4 or both IPv6) carrying our option
/// and `token` as payload.
pub fn syn_with_token(src: IpAddr, sport: u16, dst: IpAddr, dport: u16, token: &[u8]) -> IpTcp {
    // Options: MSS 1460, our 6-byte option, 2 NOPs: 12 bytes, TCP header 32.
    let mut opts = vec![2, 4, 0x05, 0xb4, OPTION_KIND, 6];
    opts.extend_from_slice(&OPTION_EXID.to_be_bytes());
    opts.extend_from_slice(&(token.len() as u16).to_be_bytes());
    opts.extend_from_slice(&[1, 1]);
    let tcp_len = 20 + opts.len() + token.len();
    let mut b = Vec::with_capacity(40 + tcp_len);
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            b.extend_from_slice(&[0x45, 0]);
            b.extend_from_slice(&((20 + tcp_len) as u16).to_be_bytes());
            b.extend_from_slice(&[0x12, 0x34, 0x40, 0, 64, 6, 0, 0]);
            b.extend_from_slice(&s.octets());
            b.extend_from_slice(&d.octets());
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            b.extend_from_slice(&[0x60, 0, 0, 0]);
            b.extend_from_slice(&(tcp_len as u16).to_be_bytes());
            b.extend_from_slice(&[6, 64]);
            b.extend_from_slice(&s.octets());
            b.extend_from_slice(&d.octets());
        }
        _ => panic!("syn_with_token: {src} and {dst} are of different families"),
    }
    b.extend_from_slice(&sport.to_be_bytes());
    b.extend_from_slice(&dport.to_be_bytes());
    let mut seq = [0u8; 4];
    crate::topo::getrandom_fill(&mut seq);
    b.extend_from_slice(&seq);
    b.extend_from_slice(&[0, 0, 0, 0]);
    b.push(((20 + opts.len()) / 4) as u8 * 16);
    b.push(SYN);
    b.extend_from_slice(&64240u16.to_be_bytes());
    b.extend_from_slice(&[0, 0, 0, 0]);
    b.extend_from_slice(&opts);
    b.extend_from_slice(token);
    let mut p = IpTcp(b);
    p.fix_checksums();
    p
}

/// A well-formed SYN token (docs/wire-format.md) from a node nobody knows: node name
/// `attacker`, a random key id, the current time, claims of a pod `intruder` with
/// `role=<role>` in namespace `ns`. `mode`: 1 PKI, 2 PSK. No MAC protects a SYN, so only the
/// key id can betray it: `unknown_key` (PKI) or `psk_mismatch` (PSK).
pub fn forged_syn_token(mode: u8, ns: &str, role: &str) -> Vec<u8> {
    let node = b"attacker";
    let mut t = vec![1, 1, mode, node.len() as u8];
    let mut rnd = [0u8; 24];
    crate::topo::getrandom_fill(&mut rnd);
    t.extend_from_slice(&rnd[..8]);
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    t.extend_from_slice(&now.to_be_bytes());
    t.extend_from_slice(&rnd[8..24]);
    t.extend_from_slice(node);
    t.push(ns.len() as u8);
    t.extend_from_slice(ns.as_bytes());
    let name = b"intruder";
    t.push(name.len() as u8);
    t.extend_from_slice(name);
    t.push(1);
    t.extend_from_slice(&4u16.to_be_bytes());
    t.extend_from_slice(b"role");
    t.push(role.len() as u8);
    t.extend_from_slice(role.as_bytes());
    t.push(0);
    t
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    fn v4() -> (IpAddr, IpAddr) {
        (
            Ipv4Addr::new(10, 1, 2, 3).into(),
            Ipv4Addr::new(10, 1, 3, 2).into(),
        )
    }

    fn v6() -> (IpAddr, IpAddr) {
        (
            "fd00:1:2::3".parse::<Ipv6Addr>().unwrap().into(),
            "fd00:1:3::2".parse::<Ipv6Addr>().unwrap().into(),
        )
    }

    #[test]
    fn built_syn_parses_back_with_its_token_and_valid_checksums() {
        for (src, dst) in [v4(), v6()] {
            let token = forged_syn_token(2, "shop", "Database");
            let p = syn_with_token(src, 40000, dst, 5432, &token);
            let q = IpTcp::parse(&p.0).unwrap();
            assert_eq!(q.is_ipv6(), src.is_ipv6());
            assert_eq!((q.src(), q.dst()), (src, dst));
            assert_eq!(q.flags(), SYN);
            assert_eq!((q.sport(), q.dport()), (40000, 5432));
            assert_eq!(&q.0[q.token().unwrap()], &token[..]);
            assert!(q.tcp_checksum_ok());
            let mut r = q.clone();
            r.set_sport(40001);
            assert!(!r.tcp_checksum_ok());
            r.fix_checksums();
            assert!(r.tcp_checksum_ok());
        }
    }

    #[test]
    fn ipv6_tcp_checksum_covers_the_addresses() {
        let (src, dst) = v6();
        let mut p = syn_with_token(src, 1, dst, 2, b"tok");
        p.0[39] ^= 1; // last byte of the destination address
        assert!(!p.tcp_checksum_ok());
    }

    #[test]
    fn ipv6_checksum_matches_a_known_segment() {
        // A SYN fd00::1:40000 -> fd00::2:80, no options, seq 1, window 64240, computed by hand:
        // pseudo-header words fd00+1+fd00+2+6+20, TCP header words 9c40+0050+0001+5002+faf0.
        let mut b = vec![0x60, 0, 0, 0, 0, 20, 6, 64];
        b.extend_from_slice(&"fd00::1".parse::<Ipv6Addr>().unwrap().octets());
        b.extend_from_slice(&"fd00::2".parse::<Ipv6Addr>().unwrap().octets());
        b.extend_from_slice(&[0x9c, 0x40, 0, 80, 0, 0, 0, 1, 0, 0, 0, 0, 0x50, SYN]);
        b.extend_from_slice(&[0xfa, 0xf0, 0, 0, 0, 0]);
        let mut p = IpTcp::parse(&b).unwrap();
        p.fix_checksums();
        let mut sum: u32 = [
            0xfd00u32, 1, 0xfd00, 2, 6, 20, 0x9c40, 0x0050, 0x0001, 0x5002, 0xfaf0,
        ]
        .iter()
        .sum();
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        let want = !(sum as u16);
        assert_eq!(u16::from_be_bytes([p.0[56], p.0[57]]), want);
    }

    #[test]
    fn truncated_or_non_tcp_ipv6_is_not_parsed() {
        let (src, dst) = v6();
        let p = syn_with_token(src, 1, dst, 2, b"tok");
        assert!(IpTcp::parse(&p.0[..p.0.len() - 1]).is_none());
        let mut udp = p.0.clone();
        udp[6] = 17;
        assert!(IpTcp::parse(&udp).is_none());
        // Link padding after the announced payload length is cut off.
        let mut padded = p.0.clone();
        padded.extend_from_slice(&[0; 6]);
        assert_eq!(IpTcp::parse(&padded).unwrap(), p);
    }

    #[test]
    fn token_is_absent_without_our_option() {
        for (src, dst) in [v4(), v6()] {
            let mut p = syn_with_token(src, 1, dst, 2, b"x");
            let exid = p.payload().start - 8; // our option starts 8 bytes before the payload
            p.0[exid + 2] = 0x12; // another ExID
            assert_eq!(p.token(), None);
        }
    }
}
