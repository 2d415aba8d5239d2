//! Capturing IPv4/TCP packets in a netns (an AF_PACKET socket, as tcpdump does) and injecting
//! raw IPv4 packets (an IPPROTO_RAW socket: the caller writes the IP header, any source address).

use std::net::{Ipv4Addr, SocketAddrV4};
use std::ops::Range;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use nix::sys::socket::{
    AddressFamily, LinkAddr, MsgFlags, SockFlag, SockProtocol, SockType, SockaddrIn, recvfrom,
    sendto, setsockopt, socket, sockopt,
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

/// An IPv4 packet carrying TCP (header, options, payload), with accessors and fix-ups.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ipv4Tcp(pub Vec<u8>);

impl Ipv4Tcp {
    /// Checks that `b` is a whole IPv4/TCP packet (trailing link padding cut off).
    pub fn parse(b: &[u8]) -> Option<Ipv4Tcp> {
        if b.len() < 40 || b[0] >> 4 != 4 || b[9] != 6 {
            return None;
        }
        let ihl = usize::from(b[0] & 0x0f) * 4;
        let total = usize::from(u16::from_be_bytes([b[2], b[3]]));
        if ihl < 20 || total > b.len() || total < ihl + 20 {
            return None;
        }
        let doff = usize::from(b[ihl + 12] >> 4) * 4;
        if doff < 20 || ihl + doff > total {
            return None;
        }
        Some(Ipv4Tcp(b[..total].to_vec()))
    }

    fn ihl(&self) -> usize {
        usize::from(self.0[0] & 0x0f) * 4
    }
    fn doff(&self) -> usize {
        usize::from(self.0[self.ihl() + 12] >> 4) * 4
    }
    pub fn src(&self) -> Ipv4Addr {
        Ipv4Addr::new(self.0[12], self.0[13], self.0[14], self.0[15])
    }
    pub fn dst(&self) -> Ipv4Addr {
        Ipv4Addr::new(self.0[16], self.0[17], self.0[18], self.0[19])
    }
    pub fn sport(&self) -> u16 {
        let t = self.ihl();
        u16::from_be_bytes([self.0[t], self.0[t + 1]])
    }
    pub fn dport(&self) -> u16 {
        let t = self.ihl();
        u16::from_be_bytes([self.0[t + 2], self.0[t + 3]])
    }
    /// TCP flags byte (FIN 0x01, SYN 0x02, RST 0x04, PSH 0x08, ACK 0x10).
    pub fn flags(&self) -> u8 {
        self.0[self.ihl() + 13]
    }
    /// Byte range of the TCP payload in the packet.
    pub fn payload(&self) -> Range<usize> {
        self.ihl() + self.doff()..self.0.len()
    }
    /// The token length announced by our TCP option, if present.
    pub fn token_len(&self) -> Option<usize> {
        let start = self.ihl() + 20;
        let end = self.ihl() + self.doff();
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
        let t = self.ihl();
        self.0[t..t + 2].copy_from_slice(&port.to_be_bytes());
    }
    /// Recomputes the IPv4 header checksum and the full TCP checksum.
    pub fn fix_checksums(&mut self) {
        let ihl = self.ihl();
        self.0[10] = 0;
        self.0[11] = 0;
        let c = fold(sum16(&self.0[..ihl], 0));
        self.0[10..12].copy_from_slice(&c.to_be_bytes());
        let tcp_len = self.0.len() - ihl;
        self.0[ihl + 16] = 0;
        self.0[ihl + 17] = 0;
        let mut s = sum16(&self.0[12..20], 0);
        s += 6 + tcp_len as u32;
        s = sum16(&self.0[ihl..], s);
        let c = fold(s);
        self.0[ihl + 16..ihl + 18].copy_from_slice(&c.to_be_bytes());
    }
    /// Whether the TCP checksum verifies.
    pub fn tcp_checksum_ok(&self) -> bool {
        let ihl = self.ihl();
        let mut s = sum16(&self.0[12..20], 0);
        s += 6 + (self.0.len() - ihl) as u32;
        s = sum16(&self.0[ihl..], s);
        fold(s) == 0
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

/// Packets captured in a netns by a background thread; stopped on drop.
pub struct Capture {
    rx: mpsc::Receiver<Ipv4Tcp>,
    stop: Arc<AtomicBool>,
    seen: Vec<Ipv4Tcp>,
}

impl Capture {
    /// Starts capturing IPv4/TCP packets (both directions, every interface of `ns`) for which
    /// `keep` holds. Capturing has begun when this returns.
    pub fn start(ns: &str, keep: impl Fn(&Ipv4Tcp) -> bool + Send + 'static) -> Capture {
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
                // Ethernet (veth) frames: 14-byte header, IPv4 ethertype.
                if n < 14 || buf[12..14] != [0x08, 0x00] {
                    continue;
                }
                if let Some(p) = Ipv4Tcp::parse(&buf[14..n])
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
    pub fn wait_for(
        &mut self,
        timeout: Duration,
        pred: impl Fn(&Ipv4Tcp) -> bool,
    ) -> Option<Ipv4Tcp> {
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
    pub fn drain(&mut self) -> &[Ipv4Tcp] {
        while let Ok(p) = self.rx.try_recv() {
            self.seen.push(p);
        }
        &self.seen
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// Sends a raw IPv4 packet (header included) from inside `ns`, routed by its destination.
pub fn inject(ns: &str, packet: &Ipv4Tcp) {
    let pkt = packet.clone();
    crate::netns::in_netns(ns, move || {
        let fd = socket(
            AddressFamily::Inet,
            SockType::Raw,
            SockFlag::empty(),
            SockProtocol::Raw,
        )
        .expect("raw socket");
        let to = SockaddrIn::from(SocketAddrV4::new(pkt.dst(), 0));
        sendto(fd.as_raw_fd(), &pkt.0, &to, MsgFlags::empty()).expect("sendto raw");
    });
}

/// Builds a SYN from `src:sport` to `dst:dport` carrying our option and `token` as payload.
pub fn syn_with_token(
    src: Ipv4Addr,
    sport: u16,
    dst: Ipv4Addr,
    dport: u16,
    token: &[u8],
) -> Ipv4Tcp {
    // Options: MSS 1460, our 6-byte option, 2 NOPs: 12 bytes, TCP header 32.
    let mut opts = vec![2, 4, 0x05, 0xb4, OPTION_KIND, 6];
    opts.extend_from_slice(&OPTION_EXID.to_be_bytes());
    opts.extend_from_slice(&(token.len() as u16).to_be_bytes());
    opts.extend_from_slice(&[1, 1]);
    let tcp_len = 20 + opts.len() + token.len();
    let total = 20 + tcp_len;
    let mut b = Vec::with_capacity(total);
    b.extend_from_slice(&[0x45, 0]);
    b.extend_from_slice(&(total as u16).to_be_bytes());
    b.extend_from_slice(&[0x12, 0x34, 0x40, 0, 64, 6, 0, 0]);
    b.extend_from_slice(&src.octets());
    b.extend_from_slice(&dst.octets());
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
    let mut p = Ipv4Tcp(b);
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

    #[test]
    fn built_syn_parses_back_with_its_token_and_valid_checksums() {
        let token = forged_syn_token(2, "shop", "Database");
        let p = syn_with_token(
            Ipv4Addr::new(10, 1, 2, 3),
            40000,
            Ipv4Addr::new(10, 1, 3, 2),
            5432,
            &token,
        );
        let q = Ipv4Tcp::parse(&p.0).unwrap();
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

    #[test]
    fn token_is_absent_without_our_option() {
        let mut p = syn_with_token(
            Ipv4Addr::new(10, 1, 2, 3),
            1,
            Ipv4Addr::new(10, 1, 3, 2),
            2,
            b"x",
        );
        let exid = p.payload().start - 8; // our option starts 8 bytes before the payload
        p.0[exid + 2] = 0x12; // another ExID
        assert_eq!(p.token(), None);
    }
}
