//! Floods: untokened TCP SYNs (or plain UDP datagrams, each a new flow) with spoofed sources,
//! paced, at a workload (the bench's flood cases and the real-kernel flood tests); or the same
//! sent by a workload itself, standing for a compromised one, to addresses that never answer
//! ([`start_from_workload`]).
//!
//! The flooder is a netns of the caller's own, by convention `ts-<testbed id>-flooder` (so a
//! crashed run's is swept like the testbed's), attached to a node's netns by a veth pair of its own on
//! 198.51.100.0/30 (TEST-NET-2: no clash with the testbed's 10.x plan). Its SYNs carry random
//! sources from 198.18.0.0/15 (the benchmarking range) and random ports; the node routes that
//! range back to the flooder, so reverse-path filtering passes them and they are forwarded to
//! the target like any other packet, into its workload netns and its agent's queue.

use std::io;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::ops::Range;
use std::os::fd::AsRawFd;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::sys::socket::{
    AddressFamily, MsgFlags, SockFlag, SockProtocol, SockType, SockaddrIn, sendto, socket,
};

/// The node's end of the flooder's link, the flooder's end, and the spoofed source range.
const NODE_SIDE: &str = "198.51.100.1";
const FLOODER_SIDE: &str = "198.51.100.2";
const SPOOFED: &str = "198.18.0.0/15";
/// The node's name for its end of the link (unique in the node netns: one flooder per testbed).
const NODE_DEV: &str = "flood0";

/// An `ip` command that must succeed; its stderr is in the error.
fn ip(args: &[&str]) -> io::Result<()> {
    let out = Command::new("ip").args(args).output()?;
    if out.status.success() {
        Ok(())
    } else {
        Err(io::Error::other(format!(
            "ip {} failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

/// The flooder's netns and link. Deleted on drop (which removes both ends of the veth pair and
/// the node's route through it).
pub struct Flooder {
    ns: String,
}

impl Flooder {
    /// Creates netns `ns`, links it to `node_ns` and routes the spoofed range back to it.
    pub fn attach(node_ns: &str, ns: &str) -> io::Result<Flooder> {
        ip(&["netns", "add", ns])?;
        // From here on, Drop deletes what was made even if a later step fails.
        let me = Flooder { ns: ns.to_owned() };
        ip(&["-n", ns, "link", "set", "lo", "up"])?;
        ip(&[
            "link", "add", "name", "eth0", "netns", ns, "type", "veth", "peer", "name", NODE_DEV,
            "netns", node_ns,
        ])?;
        ip(&[
            "-n",
            node_ns,
            "addr",
            "add",
            &format!("{NODE_SIDE}/30"),
            "dev",
            NODE_DEV,
        ])?;
        ip(&["-n", node_ns, "link", "set", NODE_DEV, "up"])?;
        ip(&[
            "-n",
            ns,
            "addr",
            "add",
            &format!("{FLOODER_SIDE}/30"),
            "dev",
            "eth0",
        ])?;
        ip(&["-n", ns, "link", "set", "eth0", "up"])?;
        ip(&["-n", ns, "route", "add", "default", "via", NODE_SIDE])?;
        ip(&["-n", node_ns, "route", "add", SPOOFED, "via", FLOODER_SIDE])?;
        Ok(me)
    }

    /// Starts sending `kind` packets to `dst` at `pps` packets per second until `stop`.
    pub fn start(
        &self,
        dst: SocketAddrV4,
        pps: f64,
        kind: Kind,
        stop: Arc<AtomicBool>,
    ) -> JoinHandle<io::Result<Sent>> {
        let spread = Spread::FromSpoofed(dst);
        crate::netns::spawn_in_netns(&self.ns, move || {
            flood(spread, pps, kind, (UDP_PAYLOAD, 0..0), &stop)
        })
    }

    /// As [`Flooder::start`] with UDP datagrams that carry `payload` (say a control datagram
    /// captured on the wire), its bytes `fresh` random in each (say a nonce).
    pub fn start_udp_with(
        &self,
        dst: SocketAddrV4,
        pps: f64,
        payload: Vec<u8>,
        fresh: Range<usize>,
        stop: Arc<AtomicBool>,
    ) -> JoinHandle<io::Result<Sent>> {
        let spread = Spread::FromSpoofed(dst);
        crate::netns::spawn_in_netns(&self.ns, move || {
            flood(spread, pps, Kind::Udp, (&payload, fresh), &stop)
        })
    }
}

/// Starts sending `kind` packets from inside netns `ns` (a workload's: the packets are its own
/// outgoing ones, as its agent sees them) at `pps` packets per second until `stop`: from `src`
/// (the workload's address) and random ports, to port `port` of random addresses of the /16 of
/// `net` (which should route nowhere: nothing answers).
pub fn start_from_workload(
    ns: &str,
    src: Ipv4Addr,
    net: Ipv4Addr,
    port: u16,
    pps: f64,
    kind: Kind,
    stop: Arc<AtomicBool>,
) -> JoinHandle<io::Result<Sent>> {
    let spread = Spread::ToNet { src, net, port };
    crate::netns::spawn_in_netns(ns, move || {
        flood(spread, pps, kind, (UDP_PAYLOAD, 0..0), &stop)
    })
}

/// Where a flood's packets come from and go.
#[derive(Clone, Copy, Debug)]
enum Spread {
    /// To one address, from random addresses of 198.18.0.0/15 and random ports.
    FromSpoofed(SocketAddrV4),
    /// From one address's random ports to one port of random addresses of a /16.
    ToNet {
        src: Ipv4Addr,
        net: Ipv4Addr,
        port: u16,
    },
}

impl Spread {
    /// One packet's source and destination, from one random draw.
    fn draw(self, r: u64) -> (SocketAddrV4, SocketAddrV4) {
        let port = 1024 + ((r >> 32) as u16 % (65535 - 1024));
        match self {
            Spread::FromSpoofed(dst) => {
                let host = (r as u32) & 0x1_ffff;
                let src = Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 18, 0, 0)) | host.max(1));
                (SocketAddrV4::new(src, port), dst)
            }
            Spread::ToNet { src, net, port: to } => {
                let host = (r as u32) & 0xffff;
                let dst = Ipv4Addr::from(u32::from(net) & 0xffff_0000 | host.clamp(1, 0xfffe));
                (SocketAddrV4::new(src, port), SocketAddrV4::new(dst, to))
            }
        }
    }
}

impl Drop for Flooder {
    fn drop(&mut self) {
        let _ = ip(&["netns", "del", &self.ns]);
    }
}

/// What a flood sends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// TCP SYNs without a token.
    Syn,
    /// Plain UDP datagrams (8 bytes of payload), each from a new source address and port: a
    /// new flow each, as an agent sees them.
    Udp,
}

/// What a flood sent.
#[derive(Clone, Copy, Debug, Default)]
pub struct Sent {
    /// Packets the raw socket took.
    pub packets: u64,
    /// Sends refused (ENOBUFS and the like), not counted in `packets`.
    pub errors: u64,
    /// From the first send to the stop.
    pub elapsed: Duration,
}

impl Sent {
    /// Packets per second achieved.
    pub fn rate(&self) -> f64 {
        self.packets as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// Most packets sent back to back before the pacing looks at the clock again.
const BURST: u64 = 32;

/// Sends until `stop`; UDP datagrams carry `payload.0` with its bytes `payload.1` random in each.
fn flood(
    spread: Spread,
    pps: f64,
    kind: Kind,
    payload: (&[u8], Range<usize>),
    stop: &AtomicBool,
) -> io::Result<Sent> {
    let (mut body, fresh) = (payload.0.to_vec(), payload.1);
    if fresh.end > body.len() {
        return Err(io::Error::other(format!(
            "random bytes {fresh:?} past a payload of {}",
            body.len()
        )));
    }
    // IPPROTO_RAW implies IP_HDRINCL: the header below goes out as written (the kernel fills
    // in the header checksum and the total length).
    let fd = socket(
        AddressFamily::Inet,
        SockType::Raw,
        SockFlag::empty(),
        SockProtocol::Raw,
    )
    .map_err(|e| io::Error::other(format!("raw socket (needs CAP_NET_RAW): {e}")))?;
    let mut rng = Rng::seeded();
    let mut packet = Vec::with_capacity(44 + body.len());
    let start = Instant::now();
    let (mut attempts, mut sent) = (0u64, Sent::default());
    while !stop.load(Ordering::Relaxed) {
        // Pace by the clock: whatever is due since the start, at most a burst at a time (a
        // starved sender catches up, but never floods the node's backlog in one go).
        let due = (start.elapsed().as_secs_f64() * pps) as u64;
        if due <= attempts {
            std::thread::sleep(Duration::from_micros(100));
            continue;
        }
        for _ in 0..(due - attempts).min(BURST) {
            let r = rng.next();
            let (src, dst) = spread.draw(r);
            match kind {
                Kind::Syn => syn(&mut packet, r, src, dst),
                Kind::Udp => {
                    for chunk in body[fresh.clone()].chunks_mut(8) {
                        chunk.copy_from_slice(&rng.next().to_le_bytes()[..chunk.len()]);
                    }
                    udp(&mut packet, r, src, dst, &body)
                }
            }
            attempts += 1;
            let to = SockaddrIn::from(dst);
            match sendto(fd.as_raw_fd(), &packet, &to, MsgFlags::empty()) {
                Ok(_) => sent.packets += 1,
                Err(nix::errno::Errno::ENOBUFS | nix::errno::Errno::EAGAIN) => sent.errors += 1,
                Err(e) => return Err(io::Error::other(format!("sendto {dst}: {e}"))),
            }
        }
    }
    sent.elapsed = start.elapsed();
    Ok(sent)
}

/// The pseudo-header sum of `src`, `dst`, `protocol` and the transport length.
fn pseudo_sum(src: Ipv4Addr, dst: Ipv4Addr, protocol: u8, len: u16) -> u32 {
    let mut sum = u32::from(protocol) + u32::from(len);
    for pair in src.octets().chunks(2).chain(dst.octets().chunks(2)) {
        sum += u32::from(u16::from_be_bytes([pair[0], pair[1]]));
    }
    sum
}

/// The payload of [`Kind::Udp`]'s datagrams.
const UDP_PAYLOAD: &[u8] = b"flooding";

/// Writes into `p` (cleared first) an IPv4 UDP datagram carrying `payload` from `src` to
/// `dst`, IP id from the random draw `r`, valid checksums.
fn udp(p: &mut Vec<u8>, r: u64, src: SocketAddrV4, dst: SocketAddrV4, payload: &[u8]) {
    let (src, sport) = (*src.ip(), src.port());
    let id = (r >> 48) as u16;
    let udp_len = 8 + payload.len() as u16;
    p.clear();
    p.extend_from_slice(&[0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, 17, 0, 0]);
    p[2..4].copy_from_slice(&(20 + udp_len).to_be_bytes());
    p[4..6].copy_from_slice(&id.to_be_bytes());
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.ip().octets());
    let ip_sum = checksum(&p[..20], 0);
    p[10..12].copy_from_slice(&ip_sum.to_be_bytes());
    p.extend_from_slice(&sport.to_be_bytes());
    p.extend_from_slice(&dst.port().to_be_bytes());
    p.extend_from_slice(&udp_len.to_be_bytes());
    p.extend_from_slice(&[0, 0]);
    p.extend_from_slice(payload);
    let sum = match checksum(&p[20..], pseudo_sum(src, *dst.ip(), 17, udp_len)) {
        // UDP sends a computed 0 as all ones (0 means "no checksum").
        0 => 0xffff,
        s => s,
    };
    p[26..28].copy_from_slice(&sum.to_be_bytes());
}

/// Writes into `p` a 44-byte IPv4 TCP SYN (MSS option) from `src` to `dst`, sequence number
/// and IP id from the random draw `r`, with a valid TCP checksum (conntrack drops a bad one as
/// INVALID before the queue would see it).
fn syn(p: &mut Vec<u8>, r: u64, src: SocketAddrV4, dst: SocketAddrV4) {
    let (src, sport) = (*src.ip(), src.port());
    p.clear();
    p.resize(44, 0);
    let seq = (r >> 17) as u32;
    let id = (r >> 48) as u16;
    p[..20].copy_from_slice(&[
        0x45, 0, 0, 44, 0, 0, 0x40, 0, 64, 6, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    ]);
    p[4..6].copy_from_slice(&id.to_be_bytes());
    p[12..16].copy_from_slice(&src.octets());
    p[16..20].copy_from_slice(&dst.ip().octets());
    let ip_sum = checksum(&p[..20], 0);
    p[10..12].copy_from_slice(&ip_sum.to_be_bytes());
    let tcp = &mut p[20..];
    tcp[0..2].copy_from_slice(&sport.to_be_bytes());
    tcp[2..4].copy_from_slice(&dst.port().to_be_bytes());
    tcp[4..8].copy_from_slice(&seq.to_be_bytes());
    tcp[8..12].copy_from_slice(&[0; 4]);
    // Data offset 6 words, SYN, window 64240, checksum 0 for now, no urgent pointer, MSS 1460.
    tcp[12..24].copy_from_slice(&[0x60, 0x02, 0xfa, 0xf0, 0, 0, 0, 0, 2, 4, 0x05, 0xb4]);
    let sum = checksum(&p[20..], pseudo_sum(src, *dst.ip(), 6, 24));
    p[36..38].copy_from_slice(&sum.to_be_bytes());
}

/// The Internet checksum of `bytes` (even length) with `initial` already summed in.
fn checksum(bytes: &[u8], initial: u32) -> u16 {
    let mut sum = initial;
    for pair in bytes.chunks(2) {
        sum += u32::from(u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// xorshift64*: fast, good enough for spoofed addresses and ports (nothing secret).
struct Rng(u64);

impl Rng {
    fn seeded() -> Rng {
        let mut seed = [0u8; 8];
        let from_urandom = std::fs::File::open("/dev/urandom")
            .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut seed));
        let s = match from_urandom {
            Ok(()) => u64::from_le_bytes(seed),
            Err(_) => std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0x9e37_79b9_7f4a_7c15, |d| d.as_nanos() as u64),
        };
        Rng(s | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn syn_checksums_verify() {
        let mut rng = Rng::seeded();
        let mut p = Vec::new();
        let dst = SocketAddrV4::new(Ipv4Addr::new(10, 70, 3, 2), 5432);
        for _ in 0..1000 {
            let r = rng.next();
            let (src, dst) = Spread::FromSpoofed(dst).draw(r);
            syn(&mut p, r, src, dst);
            assert_eq!(p.len(), 44);
            // A header with its checksum in sums to 0xffff: checksum() of it is 0.
            assert_eq!(checksum(&p[..20], 0), 0);
            let mut pseudo = 0u32;
            for pair in p[12..20].chunks(2) {
                pseudo += u32::from(u16::from_be_bytes([pair[0], pair[1]]));
            }
            assert_eq!(checksum(&p[20..], pseudo + 6 + 24), 0);
            assert_eq!(p[12..14], [198, 18 | (p[13] & 1)]);
            assert_eq!(u16::from_be_bytes([p[22], p[23]]), 5432);
            assert_eq!(p[33], 0x02, "SYN only");
            let sport = u16::from_be_bytes([p[20], p[21]]);
            assert!(sport >= 1024);
        }
    }

    #[test]
    fn udp_checksums_verify() {
        let mut rng = Rng::seeded();
        let mut p = Vec::new();
        let dst = SocketAddrV4::new(Ipv4Addr::new(10, 70, 3, 2), 5432);
        // The default payload, an odd-length one (the checksum pads it), and a longer one.
        for payload in [UDP_PAYLOAD, b"odd", &[0x7e; 301]] {
            let udp_len = 8 + payload.len();
            for _ in 0..1000 {
                let r = rng.next();
                let (src, dst) = Spread::FromSpoofed(dst).draw(r);
                udp(&mut p, r, src, dst, payload);
                assert_eq!(p.len(), 20 + udp_len);
                assert_eq!(usize::from(u16::from_be_bytes([p[2], p[3]])), 20 + udp_len);
                assert_eq!(checksum(&p[..20], 0), 0);
                let src = Ipv4Addr::new(p[12], p[13], p[14], p[15]);
                let pseudo = pseudo_sum(src, *dst.ip(), 17, udp_len as u16);
                assert_eq!(checksum(&p[20..], pseudo), 0);
                assert_eq!(p[9], 17);
                assert_eq!(u16::from_be_bytes([p[22], p[23]]), 5432);
                assert_eq!(&p[28..], payload);
            }
        }
    }

    #[test]
    fn a_workload_flood_goes_from_its_address_to_random_hosts_of_the_net() {
        let mut rng = Rng::seeded();
        let spread = Spread::ToNet {
            src: Ipv4Addr::new(10, 70, 2, 3),
            net: Ipv4Addr::new(10, 250, 0, 0),
            port: 443,
        };
        let mut hosts = std::collections::HashSet::new();
        for _ in 0..1000 {
            let (src, dst) = spread.draw(rng.next());
            assert_eq!(*src.ip(), Ipv4Addr::new(10, 70, 2, 3));
            assert!(src.port() >= 1024);
            assert_eq!(dst.ip().octets()[..2], [10, 250]);
            assert!(!matches!(dst.ip().octets()[2..], [0, 0] | [255, 255]));
            assert_eq!(dst.port(), 443);
            hosts.insert(*dst.ip());
        }
        assert!(hosts.len() > 900, "{} hosts of 1000", hosts.len());
    }
}
