#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]
//! Shared fixtures: packets built like Linux builds them (with pnet), two nodes with policy
//! engines and workloads, and an independent checksum.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};

use datapath::{Hook, Processor, ProcessorConfig, Verdict, WorkloadId};
use identity::testing::SeededRng;
use identity::{CertificateAuthority, Claims, Config, Node, Psk};
use pnet_packet::ip::IpNextHeaderProtocols;
use pnet_packet::ipv4::MutableIpv4Packet;
use pnet_packet::ipv6::MutableIpv6Packet;
use pnet_packet::tcp::{MutableTcpPacket, TcpFlags};
use policy::{ContainerPort, Engine, PodKey, Protocol, Workload};

pub const NOW: u64 = 1_780_000_000_000;
pub const DAY: u64 = 86_400_000;

pub const SYN: u8 = TcpFlags::SYN;
pub const SYN_ACK: u8 = TcpFlags::SYN | TcpFlags::ACK;
pub const ACK: u8 = TcpFlags::ACK;
pub const PSH_ACK: u8 = TcpFlags::PSH | TcpFlags::ACK;
pub const RST_ACK: u8 = TcpFlags::RST | TcpFlags::ACK;
pub const RST: u8 = TcpFlags::RST;

/// The 20 option bytes of a Linux SYN / SYN-ACK: MSS 1460, SACK permitted, timestamps,
/// NOP, window scale 7.
pub fn linux_syn_options(tsval: u32, tsecr: u32) -> Vec<u8> {
    let mut o = vec![2, 4, 0x05, 0xb4, 4, 2, 8, 10];
    o.extend_from_slice(&tsval.to_be_bytes());
    o.extend_from_slice(&tsecr.to_be_bytes());
    o.extend_from_slice(&[1, 3, 3, 7]);
    o
}

/// The 12 option bytes of a Linux ACK: NOP NOP timestamps.
pub fn linux_ack_options(tsval: u32, tsecr: u32) -> Vec<u8> {
    let mut o = vec![1, 1, 8, 10];
    o.extend_from_slice(&tsval.to_be_bytes());
    o.extend_from_slice(&tsecr.to_be_bytes());
    o
}

/// An IPv4 or IPv6 TCP packet (family of `src`) with valid checksums.
pub fn tcp_packet(
    src: SocketAddr,
    dst: SocketAddr,
    seq: u32,
    ack: u32,
    flags: u8,
    options: &[u8],
    payload: &[u8],
) -> Vec<u8> {
    assert_eq!(options.len() % 4, 0);
    let tcp_len = 20 + options.len() + payload.len();
    let ip_len = match src.ip() {
        IpAddr::V4(_) => 20,
        IpAddr::V6(_) => 40,
    };
    let mut buf = vec![0u8; ip_len + tcp_len];
    match (src.ip(), dst.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let mut ip = MutableIpv4Packet::new(&mut buf).unwrap();
            ip.set_version(4);
            ip.set_header_length(5);
            ip.set_total_length((20 + tcp_len) as u16);
            ip.set_identification(0x1234);
            ip.set_flags(0b010);
            ip.set_ttl(64);
            ip.set_next_level_protocol(IpNextHeaderProtocols::Tcp);
            ip.set_source(s);
            ip.set_destination(d);
            let c = pnet_packet::ipv4::checksum(&ip.to_immutable());
            ip.set_checksum(c);
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            let mut ip = MutableIpv6Packet::new(&mut buf).unwrap();
            ip.set_version(6);
            ip.set_payload_length(tcp_len as u16);
            ip.set_next_header(IpNextHeaderProtocols::Tcp);
            ip.set_hop_limit(64);
            ip.set_source(s);
            ip.set_destination(d);
        }
        _ => panic!("mixed families"),
    }
    {
        let mut tcp = MutableTcpPacket::new(&mut buf[ip_len..]).unwrap();
        tcp.set_source(src.port());
        tcp.set_destination(dst.port());
        tcp.set_sequence(seq);
        tcp.set_acknowledgement(ack);
        tcp.set_data_offset(((20 + options.len()) / 4) as u8);
        tcp.set_flags(flags);
        tcp.set_window(64240);
    }
    buf[ip_len + 20..ip_len + 20 + options.len()].copy_from_slice(options);
    buf[ip_len + 20 + options.len()..].copy_from_slice(payload);
    let sum = reference_tcp_checksum(&buf);
    buf[ip_len + 16..ip_len + 18].copy_from_slice(&sum.to_be_bytes());
    buf
}

/// Make the TCP checksum field what a CHECKSUM_PARTIAL packet carries: the folded pseudo-header
/// sum only (not complemented), as Linux leaves it for offload.
pub fn make_partial(buf: &mut [u8]) {
    let (ip_len, pseudo) = pseudo_header(buf);
    let mut sum = sum16(&pseudo);
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    buf[ip_len + 16..ip_len + 18].copy_from_slice(&(sum as u16).to_be_bytes());
}

fn pseudo_header(buf: &[u8]) -> (usize, Vec<u8>) {
    let mut p = Vec::new();
    let ip_len;
    let tcp_len;
    if buf[0] >> 4 == 4 {
        ip_len = ((buf[0] & 0xf) as usize) * 4;
        let total = u16::from_be_bytes([buf[2], buf[3]]) as usize;
        tcp_len = total - ip_len;
        p.extend_from_slice(&buf[12..20]);
        p.extend_from_slice(&[0, 6]);
        p.extend_from_slice(&(tcp_len as u16).to_be_bytes());
    } else {
        ip_len = 40;
        tcp_len = u16::from_be_bytes([buf[4], buf[5]]) as usize;
        p.extend_from_slice(&buf[8..40]);
        p.extend_from_slice(&(tcp_len as u32).to_be_bytes());
        p.extend_from_slice(&[0, 0, 0, 6]);
    }
    (ip_len, p)
}

fn sum16(bytes: &[u8]) -> u32 {
    let mut sum = 0u32;
    for c in bytes.chunks(2) {
        let w = if c.len() == 2 {
            u16::from_be_bytes([c[0], c[1]])
        } else {
            u16::from_be_bytes([c[0], 0])
        };
        sum += w as u32;
    }
    sum
}

/// RFC 1071 TCP checksum written here, independent of pnet and of the datapath.
pub fn reference_tcp_checksum(buf: &[u8]) -> u16 {
    let (ip_len, pseudo) = pseudo_header(buf);
    let total = ip_len + pseudo_tcp_len(buf, ip_len);
    let mut seg = buf[ip_len..total].to_vec();
    seg[16] = 0;
    seg[17] = 0;
    let mut sum = sum16(&pseudo) as u64 + sum16(&seg) as u64;
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn pseudo_tcp_len(buf: &[u8], ip_len: usize) -> usize {
    if buf[0] >> 4 == 4 {
        u16::from_be_bytes([buf[2], buf[3]]) as usize - ip_len
    } else {
        u16::from_be_bytes([buf[4], buf[5]]) as usize
    }
}

/// Both checksums of a packet are valid (computed independently).
pub fn checksums_ok(buf: &[u8]) -> bool {
    let tcp_ok = {
        let ip_len = if buf[0] >> 4 == 4 {
            ((buf[0] & 0xf) as usize) * 4
        } else {
            40
        };
        u16::from_be_bytes([buf[ip_len + 16], buf[ip_len + 17]]) == reference_tcp_checksum(buf)
    };
    let ip_ok = if buf[0] >> 4 == 4 {
        let ihl = ((buf[0] & 0xf) as usize) * 4;
        let mut s = sum16(&buf[..ihl]);
        while s > 0xffff {
            s = (s & 0xffff) + (s >> 16);
        }
        s == 0xffff
    } else {
        true
    };
    tcp_ok && ip_ok
}

/// TCP flags of a packet.
pub fn flags(buf: &[u8]) -> u8 {
    let ip_len = if buf[0] >> 4 == 4 {
        ((buf[0] & 0xf) as usize) * 4
    } else {
        40
    };
    buf[ip_len + 13]
}

/// Acknowledgement number of a packet.
pub fn ack_number(buf: &[u8]) -> u32 {
    let ip_len = if buf[0] >> 4 == 4 {
        ((buf[0] & 0xf) as usize) * 4
    } else {
        40
    };
    u32::from_be_bytes(buf[ip_len + 8..ip_len + 12].try_into().unwrap())
}

/// The token carried by a packet (its option's length, first payload bytes), if any.
pub fn token_of(buf: &[u8]) -> Option<Vec<u8>> {
    let seg = datapath::TcpSegment::parse(buf).unwrap().unwrap();
    seg.token(buf).map(<[u8]>::to_vec)
}

pub fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Psk,
    Pki,
}

/// Two nodes' identity contexts that trust each other.
pub fn nodes(mode: Mode, seed: &str) -> (Node, Node) {
    match mode {
        Mode::Psk => {
            let psk = b"Zq3v9Lx2Rk7Wm1Tn5Yb8Hc4Jd6Gf0Ps_E";
            (
                Node::new_psk("node-a", Psk::new(psk).unwrap(), Config::default()).unwrap(),
                Node::new_psk("node-b", Psk::new(psk).unwrap(), Config::default()).unwrap(),
            )
        }
        Mode::Pki => {
            let mut rng = SeededRng::new(seed.as_bytes());
            let ca =
                CertificateAuthority::generate(&mut rng, "tessera-ca", NOW - DAY, NOW + 365 * DAY)
                    .unwrap();
            let a = ca
                .issue_node(&mut rng, "node-a", NOW - DAY, NOW + 90 * DAY)
                .unwrap();
            let b = ca
                .issue_node(&mut rng, "node-b", NOW - DAY, NOW + 90 * DAY)
                .unwrap();
            let (ca_cert, cb_cert) = (a.certificate().clone(), b.certificate().clone());
            let mut na =
                Node::new_pki(a, ca.trust_anchor().clone(), Config::default(), NOW).unwrap();
            let mut nb =
                Node::new_pki(b, ca.trust_anchor().clone(), Config::default(), NOW).unwrap();
            na.add_peer_certificate("node-b", cb_cert, NOW).unwrap();
            nb.add_peer_certificate("node-a", ca_cert, NOW).unwrap();
            (na, nb)
        }
    }
}

/// A second workload on the client's node (see [`World::with_neighbour`]), with the client's
/// labels.
pub const WEB_2: Pod = Pod {
    name: "web-2",
    ip: std::net::IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 1, 3)),
    ..WEB
};
/// The id node-a's processor gives [`WEB_2`] in [`World::with_neighbour`].
pub const ID_2: WorkloadId = WorkloadId(2);

/// A workload of the test cluster.
#[derive(Clone, Debug)]
pub struct Pod {
    pub namespace: &'static str,
    pub name: &'static str,
    pub labels: &'static [(&'static str, &'static str)],
    pub ip: IpAddr,
    pub ports: &'static [(&'static str, u16)],
}

/// The client workload of the two-node tests.
pub const WEB: Pod = Pod {
    namespace: "shop",
    name: "web-1",
    labels: &[("app", "web")],
    ip: std::net::IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 1, 2)),
    ports: &[],
};
/// The server workload (a named port).
pub const DB: Pod = Pod {
    namespace: "shop",
    name: "db-0",
    labels: &[("app", "db")],
    ip: std::net::IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 2, 2)),
    ports: &[("postgres", 5432)],
};

impl Pod {
    pub fn key(&self) -> PodKey {
        PodKey {
            namespace: self.namespace.into(),
            name: self.name.into(),
        }
    }
    pub fn workload(&self) -> Workload {
        Workload {
            key: self.key(),
            labels: map(self.labels),
            ports: self
                .ports
                .iter()
                .map(|(n, p)| ContainerPort {
                    name: (!n.is_empty()).then(|| n.to_string()),
                    port: *p,
                    protocol: Protocol::Tcp,
                })
                .collect(),
            ips: vec![self.ip],
            host_network: false,
        }
    }
    pub fn claims(&self, engine: &Engine) -> Claims {
        Claims::new(
            self.namespace,
            self.name,
            map(self.labels),
            engine.namespace_labels_or_default(self.namespace),
        )
        .unwrap()
    }
}

/// An engine with the namespaces and policies of `yaml` (and the given local workloads).
pub fn engine(yaml: &str, local: &[&Pod]) -> Engine {
    let mut e = Engine::new();
    let parsed = policy::objects::parse("test.yaml", yaml);
    assert!(parsed.errors.is_empty(), "{:?}", parsed.errors);
    let report = policy::objects::load(&mut e, &parsed.objects);
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    for p in local {
        e.apply_workload(p.workload()).unwrap();
    }
    e
}

/// A processor enforcing the given workloads (ids 1, 2, ... in order).
pub fn processor(node: Node, yaml: &str, local: &[&Pod], config: ProcessorConfig) -> Processor {
    let e = engine(yaml, local);
    let claims: Vec<Claims> = local.iter().map(|p| p.claims(&e)).collect();
    let mut proc = Processor::new(node, e, config);
    for (i, (p, c)) in local.iter().zip(claims).enumerate() {
        proc.add_workload(WorkloadId(i as u32 + 1), p.key(), c);
    }
    proc
}

/// Run one packet through a processor, returning the verdict and the packet as it leaves.
pub fn run(
    proc: &mut Processor,
    id: WorkloadId,
    hook: Hook,
    packet: &[u8],
    now: u64,
    rng: &mut SeededRng,
) -> (Verdict, Vec<u8>) {
    let mut p = packet.to_vec();
    let v = proc.process(id, hook, &mut p, true, now, rng);
    if !v.modified {
        assert_eq!(p, packet, "unmodified verdict but the packet changed");
    }
    (v, p)
}

/// The workload id both test processors give their one workload.
pub const ID: WorkloadId = WorkloadId(1);
/// The client's and the server's initial sequence numbers.
pub const ISN_C: u32 = 0x1111_0000;
pub const ISN_S: u32 = 0x2222_0000;

/// The namespace of WEB and DB.
pub const NS: &str = "
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {team: payments}}
";

/// Two nodes in memory: a client workload on node-a, a server workload on node-b.
pub struct World {
    pub a: Processor,
    pub b: Processor,
    pub rng: SeededRng,
    pub now: u64,
    pub c: SocketAddr,
    pub s: SocketAddr,
}

impl World {
    pub fn with(
        mode: Mode,
        policies: &str,
        client: &Pod,
        server: &Pod,
        config: ProcessorConfig,
    ) -> Self {
        let (na, nb) = nodes(mode, "world");
        let yaml = format!("{NS}\n---\n{policies}");
        World {
            a: processor(na, &yaml, &[client], config),
            b: processor(nb, &yaml, &[server], config),
            rng: SeededRng::new(b"nonces"),
            now: NOW,
            c: SocketAddr::new(client.ip, 40000),
            s: SocketAddr::new(server.ip, 5432),
        }
    }
    pub fn new(mode: Mode, policies: &str) -> Self {
        World::with(mode, policies, &WEB, &DB, ProcessorConfig::default())
    }
    /// As [`World::with`] for WEB and DB, with [`WEB_2`] enforced on node-a too, as [`ID_2`].
    pub fn with_neighbour(mode: Mode, policies: &str, config: ProcessorConfig) -> Self {
        let mut w = World::with(mode, policies, &WEB, &DB, config);
        let (na, _) = nodes(mode, "world");
        let yaml = format!("{NS}\n---\n{policies}");
        w.a = processor(na, &yaml, &[&WEB, &WEB_2], config);
        w
    }
    /// The neighbour workload sends (OUTPUT on node-a).
    pub fn out_a2(&mut self, p: &[u8]) -> (Verdict, Vec<u8>) {
        run(&mut self.a, ID_2, Hook::Output, p, self.now, &mut self.rng)
    }
    /// [`World::connect`] from the neighbour's port `port`.
    pub fn connect_from_neighbour(&mut self, port: u16) {
        let client = self.c;
        self.c = SocketAddr::new(WEB_2.ip, port);
        self.connect_as(ID_2);
        self.c = client;
    }

    /// Client workload sends (OUTPUT on node-a).
    pub fn out_a(&mut self, p: &[u8]) -> (Verdict, Vec<u8>) {
        run(&mut self.a, ID, Hook::Output, p, self.now, &mut self.rng)
    }
    /// Arrives at the server workload (INPUT on node-b).
    pub fn in_b(&mut self, p: &[u8]) -> (Verdict, Vec<u8>) {
        run(&mut self.b, ID, Hook::Input, p, self.now, &mut self.rng)
    }
    /// Server workload sends (OUTPUT on node-b).
    pub fn out_b(&mut self, p: &[u8]) -> (Verdict, Vec<u8>) {
        run(&mut self.b, ID, Hook::Output, p, self.now, &mut self.rng)
    }
    /// Arrives at the client workload (INPUT on node-a).
    pub fn in_a(&mut self, p: &[u8]) -> (Verdict, Vec<u8>) {
        run(&mut self.a, ID, Hook::Input, p, self.now, &mut self.rng)
    }

    pub fn port(&mut self, port: u16) {
        self.c.set_port(port);
    }

    // What the kernels would emit, Linux-style.
    pub fn syn(&self) -> Vec<u8> {
        tcp_packet(
            self.c,
            self.s,
            ISN_C,
            0,
            SYN,
            &linux_syn_options(100, 0),
            &[],
        )
    }
    pub fn syn_ack(&self) -> Vec<u8> {
        tcp_packet(
            self.s,
            self.c,
            ISN_S,
            ISN_C + 1,
            SYN_ACK,
            &linux_syn_options(200, 100),
            &[],
        )
    }
    pub fn ack(&self) -> Vec<u8> {
        tcp_packet(
            self.c,
            self.s,
            ISN_C + 1,
            ISN_S + 1,
            ACK,
            &linux_ack_options(101, 200),
            &[],
        )
    }
    pub fn data_c(&self) -> Vec<u8> {
        tcp_packet(
            self.c,
            self.s,
            ISN_C + 1,
            ISN_S + 1,
            PSH_ACK,
            &linux_ack_options(102, 200),
            b"SELECT 1",
        )
    }
    pub fn data_s(&self) -> Vec<u8> {
        tcp_packet(
            self.s,
            self.c,
            ISN_S + 1,
            ISN_C + 9,
            PSH_ACK,
            &linux_ack_options(201, 102),
            b"1 row",
        )
    }

    /// SYN, SYN-ACK, ACK through both processors; both flows end authorized.
    pub fn connect(&mut self) {
        self.connect_as(ID);
    }

    /// [`World::connect`] from node-a's workload `id`, at the client address `self.c`.
    fn connect_as(&mut self, id: WorkloadId) {
        let (now, syn, ack) = (self.now, self.syn(), self.ack());
        let (v, syn) = run(&mut self.a, id, Hook::Output, &syn, now, &mut self.rng);
        assert!(v.accept, "{v:?}");
        let (v, _) = self.in_b(&syn);
        assert!(v.accept, "{v:?}");
        let (v, sa) = self.out_b(&self.syn_ack());
        assert!(v.accept, "{v:?}");
        let (v, _) = run(&mut self.a, id, Hook::Input, &sa, now, &mut self.rng);
        assert!(v.accept, "{v:?}");
        if v.mark_authorized {
            // A bound handshake: both ends are marked, the client's ACK bypasses both agents.
            return;
        }
        let (v, ack) = run(&mut self.a, id, Hook::Output, &ack, now, &mut self.rng);
        assert!(v.accept && v.mark_authorized, "{v:?}");
        let (v, _) = self.in_b(&ack);
        assert!(v.accept && v.mark_authorized, "{v:?}");
    }
}

/// An IPv4 or IPv6 packet of `protocol` with `l4` as its payload (the transport header and
/// data), as the kernel queues it.
pub fn ip_packet(src: IpAddr, dst: IpAddr, protocol: u8, l4: &[u8]) -> Vec<u8> {
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let mut p = vec![0x45, 0, 0, 0, 0x12, 0x34, 0x40, 0, 64, protocol, 0, 0];
            p.extend_from_slice(&s.octets());
            p.extend_from_slice(&d.octets());
            p.extend_from_slice(l4);
            let len = p.len() as u16;
            p[2..4].copy_from_slice(&len.to_be_bytes());
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
        _ => panic!("mixed families"),
    }
}

/// A UDP datagram (IPv4 or IPv6) with a zero checksum.
pub fn udp(src: SocketAddr, dst: SocketAddr, payload: &[u8]) -> Vec<u8> {
    let mut l4 = Vec::new();
    l4.extend_from_slice(&src.port().to_be_bytes());
    l4.extend_from_slice(&dst.port().to_be_bytes());
    l4.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    l4.extend_from_slice(&[0, 0]);
    l4.extend_from_slice(payload);
    ip_packet(src.ip(), dst.ip(), 17, &l4)
}

/// NetworkPolicy fixtures shared by the handshake and revoke tests (namespace shop, pods web
/// and db of [`WEB`] / [`DB`]).
/// db accepts only api.
pub const INGRESS_DENY: &str = "
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: db, namespace: shop}
spec:
  podSelector: {matchLabels: {app: db}}
  ingress:
  - from: [{podSelector: {matchLabels: {app: api}}}]
";

/// web may reach only cache.
pub const EGRESS_DENY: &str = "
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: web, namespace: shop}
spec:
  podSelector: {matchLabels: {app: web}}
  policyTypes: [Egress]
  egress:
  - to: [{podSelector: {matchLabels: {app: cache}}}]
";

/// IP-only peers: db accepts the client subnet; web may reach the server subnet.
pub const IPBLOCK: &str = "
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: db, namespace: shop}
spec:
  podSelector: {matchLabels: {app: db}}
  ingress:
  - from: [{ipBlock: {cidr: 10.0.1.0/24}}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: web, namespace: shop}
spec:
  podSelector: {matchLabels: {app: web}}
  policyTypes: [Egress]
  egress:
  - to: [{ipBlock: {cidr: 10.0.2.0/24}}]
";

/// db accepts web on TCP and UDP 5432.
pub const DB_TCP_AND_UDP_FROM_WEB: &str = "
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: db, namespace: shop}
spec:
  podSelector: {matchLabels: {app: db}}
  ingress:
  - from: [{podSelector: {matchLabels: {app: web}}}]
    ports: [{port: 5432}, {protocol: UDP, port: 5432}]
";

/// Room for held UDP datagrams: `count` and `bytes` in all, `count_each` and `bytes_each`
/// per workload.
pub fn held_limits(
    count: usize,
    bytes: usize,
    count_each: usize,
    bytes_each: usize,
) -> datapath::HeldLimits {
    datapath::HeldLimits {
        total: datapath::Held { count, bytes },
        per_workload: datapath::Held {
            count: count_each,
            bytes: bytes_each,
        },
    }
}

/// db accepts web on UDP 5432 only.
pub const DB_UDP_FROM_WEB: &str = "
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: db, namespace: shop}
spec:
  podSelector: {matchLabels: {app: db}}
  ingress:
  - from: [{podSelector: {matchLabels: {app: web}}}]
    ports: [{protocol: UDP, port: 5432}]
";

/// Move a captured packet to another client port (fixing checksums), as a replayer would.
pub fn to_port(p: &[u8], port: u16, client_is_src: bool) -> Vec<u8> {
    let mut q = p.to_vec();
    let ip_len = if q[0] >> 4 == 4 { 20 } else { 40 };
    let at = if client_is_src { ip_len } else { ip_len + 2 };
    q[at..at + 2].copy_from_slice(&port.to_be_bytes());
    let seg = datapath::TcpSegment::parse(&q).unwrap().unwrap();
    datapath::packet::fix_checksums(&mut q, &seg).unwrap();
    q
}

/// db accepts web on 5432; web may reach db on 5432.
pub const ALLOW: &str = "
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: db, namespace: shop}
spec:
  podSelector: {matchLabels: {app: db}}
  ingress:
  - from: [{podSelector: {matchLabels: {app: web}}}]
    ports: [{port: 5432}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: web, namespace: shop}
spec:
  podSelector: {matchLabels: {app: web}}
  policyTypes: [Egress]
  egress:
  - to: [{podSelector: {matchLabels: {app: db}}}]
    ports: [{port: 5432}]
";

/// Accepted, `modified` or not, marking the flow authorized or not (never unmarking it),
/// without a reason.
pub fn accepted(v: &Verdict, modified: bool, mark: bool) {
    assert!(v.accept, "expected accept, got {v:?}");
    assert_eq!(v.modified, modified, "modified: {v:?}");
    assert_eq!(v.mark_authorized, mark, "mark: {v:?}");
    assert!(!v.unmark, "unmark: {v:?}");
    assert_eq!(v.reason, None);
}

/// Dropped, with a reason: its label.
pub fn dropped(v: &Verdict) -> &'static str {
    assert!(!v.accept, "expected drop, got {v:?}");
    assert!(!v.mark_authorized);
    v.reason.as_ref().expect("a drop has a reason").as_str()
}
