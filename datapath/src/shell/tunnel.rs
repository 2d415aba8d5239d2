//! The node-to-node WireGuard tunnel's shell: a TUN device, one UDP socket, the routes that
//! send the peer nodes' pod prefixes into the device, and the tokio loop that feeds the
//! [`Tunnel`](crate::tunnel::Tunnel) state machine.
//!
//! Everything runs on one thread of its own (a current-thread tokio runtime), in the network
//! namespace given by [`TunnelConfig::netns`] (or the caller's): the device, the socket and
//! every `ip` command are made there. The [`TunnelHandle`] talks to it over a channel.
//!
//! Routing, all in that namespace and all removed on shutdown:
//! - one policy rule per address family in use, `pref <rule_priority> lookup <table>` (before
//!   the `main` table's rule, 32766), so the tunnel's routes win over the routes the cluster's
//!   network plugin has for the same prefixes, without touching those;
//! - in that table only, for each allowed prefix of a peer and each *blocked* prefix
//!   ([`NodeRoutes::blocked`]: the pod prefixes of known nodes that are not peers, whose
//!   packets the tunnel drops as `no_peer` rather than let them leave in clear), two routes:
//!   `PREFIX dev <device>`, with `src` when [`TunnelConfig::route_sources`] gives an address
//!   of the family, or else the namespace has one inside [`NodeRoutes::own_prefixes`]; and
//!   under it `blackhole PREFIX metric 4096`.
//!
//! Anything not in those prefixes finds no route in the table and falls through to `main`
//! as before. The device gets no address, not even an IPv6 link-local one (`addrgenmode
//! none`), so the kernel sends nothing of its own into it. A peer's endpoint can never be
//! inside the prefixes (the table refuses it), so the tunnel's own datagrams are never routed
//! into it.
//!
//! **Fails closed.** The device is not persistent: if the process dies (killed, crashed), the
//! kernel removes it and the routes through it, and what is left in the table is the rule and
//! the blackhole routes: traffic to the peers' pods is dropped, never sent in clear by the
//! plugin's routes, until a tunnel starts again. That start takes the leftover rule and
//! blackholes over (a table holding anything else is refused: another tunnel or program uses
//! it); a tunnel started without peers keeps the leftovers until its first peer set. Only a
//! deliberate shutdown removes them, and with them the encryption.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::Command;
use std::thread::JoinHandle;
use std::time::Duration;

use ipnet::IpNet;
use tokio::sync::{mpsc, oneshot};

use super::{Netns, ShellError};
use crate::tunnel::{
    DEFAULT_MTU, DEFAULT_PORT, Outputs, PeerChanges, PeerConfig, StaticSecret, Tunnel, TunnelStats,
};

/// The protocol timers' period (`boringtun` rounds its timers to a second; WireGuard's
/// retransmission jitter is a third of one).
const TICK: Duration = Duration::from_millis(250);

/// How often the route sources taken from [`NodeRoutes::own_prefixes`] are looked up again
/// (the address inside the node's pod prefix may come after the tunnel, with the first pod).
const SOURCES_EVERY: Duration = Duration::from_secs(5);

/// Packets read from the TUN device or datagrams from the socket in a row, at most, before
/// the loop looks at its other sources.
const BATCH: usize = 64;

/// The largest TUN packet or datagram read.
const READ_BUF: usize = 65_536;

/// A packet split from an offloaded TUN read: at most the largest MTU the tunnel takes (9000)
/// plus room.
const SEGMENT_BUF: usize = 9216;

/// How to run the tunnel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TunnelConfig {
    /// The TUN device's name (at most 15 bytes).
    pub device: String,
    /// Its MTU.
    pub mtu: u16,
    /// The UDP address the tunnel listens and sends on (port 0: any free port, see
    /// [`TunnelHandle::local_addr`]). Bind the node's own address when it has several, so that
    /// peers see datagrams come from the endpoint they know it by. `[::]` is dual-stack
    /// (`IPV6_V6ONLY` off): it serves IPv4 and IPv6 peers alike.
    pub listen: SocketAddr,
    /// The routing table the peers' prefixes are routed in.
    pub table: u32,
    /// The priority of the rule that looks that table up (before `main`, 32766).
    pub rule_priority: u32,
    /// Source addresses for the routes, at most one per family: the node's own address inside
    /// its pod prefix, so that traffic the node itself sends to a peer's pods leaves with a
    /// source the peer accepts (it is in this node's allowed prefixes there). Without one, the
    /// kernel picks the node's address, which the peer's cryptokey routing refuses.
    pub route_sources: Vec<IpAddr>,
    /// The network namespace to run in; `None`: the caller's.
    pub netns: Option<Netns>,
}

impl Default for TunnelConfig {
    fn default() -> TunnelConfig {
        TunnelConfig {
            device: "tsr-wg0".into(),
            mtu: DEFAULT_MTU,
            listen: SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), DEFAULT_PORT),
            table: u32::from(DEFAULT_PORT),
            rule_priority: 32000,
            route_sources: Vec::new(),
            netns: None,
        }
    }
}

/// Routes beside the peers' prefixes, and where their source address comes from (see
/// [`TunnelHandle::set_peers_and_routes`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeRoutes {
    /// Prefixes routed into the device although no peer allows them: their packets are
    /// dropped there (`no_peer`), never sent in clear by the namespace's other routes. For the
    /// pod prefixes of nodes that are known but not peers (no trusted key, no endpoint). None
    /// may hold a peer's endpoint.
    pub blocked: Vec<IpNet>,
    /// This node's own pod prefixes (not routed): the source of the routes of each family is
    /// the namespace's first address inside them, unless [`TunnelConfig::route_sources`] gives
    /// one; looked up again every few seconds.
    pub own_prefixes: Vec<IpNet>,
}

enum Request {
    SetPeers(
        Vec<PeerConfig>,
        Option<NodeRoutes>,
        oneshot::Sender<Result<PeerChanges, ShellError>>,
    ),
    Stats(oneshot::Sender<TunnelStats>),
    /// Replace the tunnel's own static key.
    SetSecret(StaticSecret, oneshot::Sender<Result<(), ShellError>>),
    /// End the loop (the handle's shutdown; stats readers may still hold the channel).
    Stop,
}

/// Reads a running tunnel's counters from anywhere (a clone per reader); the tunnel is shut
/// down by its [`TunnelHandle`] alone.
#[derive(Debug, Clone)]
pub struct TunnelStatsReader {
    requests: mpsc::UnboundedSender<Request>,
}

impl TunnelStatsReader {
    /// Every peer's counters now; [`ShellError::TunnelStopped`] once the tunnel is gone.
    pub async fn stats(&self) -> Result<TunnelStats, ShellError> {
        let (tx, rx) = oneshot::channel();
        self.requests
            .send(Request::Stats(tx))
            .map_err(|_| ShellError::TunnelStopped)?;
        rx.await.map_err(|_| ShellError::TunnelStopped)
    }
}

/// A running tunnel. Dropping it shuts the tunnel down (as [`TunnelHandle::shutdown`], with
/// errors logged instead of returned).
#[derive(Debug)]
pub struct TunnelHandle {
    requests: Option<mpsc::UnboundedSender<Request>>,
    thread: Option<JoinHandle<Result<(), ShellError>>>,
    device: String,
    local_addr: SocketAddr,
}

/// Starts a tunnel with this node's `secret` and its first `peers`: the device, the socket,
/// the rule and routes are in place when this returns. On an error nothing is left behind.
pub fn start(
    config: TunnelConfig,
    secret: &StaticSecret,
    peers: Vec<PeerConfig>,
) -> Result<TunnelHandle, ShellError> {
    // Checked before anything is created.
    let tunnel = Tunnel::new(secret, peers)?;
    let (requests, receiver) = mpsc::unbounded_channel();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let device = config.device.clone();
    let thread = std::thread::Builder::new()
        .name("tessera-wg".into())
        .spawn(move || run_thread(config, tunnel, receiver, ready_tx))
        .map_err(ShellError::Thread)?;
    match ready_rx.recv() {
        Ok(Ok(local_addr)) => Ok(TunnelHandle {
            requests: Some(requests),
            thread: Some(thread),
            device,
            local_addr,
        }),
        Ok(Err(e)) => {
            let _ = thread.join();
            Err(e)
        }
        // The thread ended without a word: it panicked.
        Err(_) => Err(thread_result(thread.join())
            .err()
            .unwrap_or(ShellError::TunnelStopped)),
    }
}

impl TunnelHandle {
    /// The TUN device's name.
    pub fn device(&self) -> &str {
        &self.device
    }

    /// The UDP address the tunnel is bound to.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    fn request(&self, r: Request) -> Result<(), ShellError> {
        self.requests
            .as_ref()
            .and_then(|s| s.send(r).ok())
            .ok_or(ShellError::TunnelStopped)
    }

    /// Sends the request `make` builds around a reply channel; the reply's receiver.
    fn ask<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<T>) -> Request,
    ) -> Result<oneshot::Receiver<T>, ShellError> {
        let (tx, rx) = oneshot::channel();
        self.request(make(tx))?;
        Ok(rx)
    }

    /// Replaces the peer set (see [`Tunnel::set_peers`]: a peer whose key is unchanged keeps
    /// its session) and the routes to match; the [`NodeRoutes`] in force stay. An invalid set
    /// changes nothing.
    pub async fn set_peers(&self, peers: Vec<PeerConfig>) -> Result<PeerChanges, ShellError> {
        let rx = self.ask(|tx| Request::SetPeers(peers, None, tx))?;
        rx.await.map_err(|_| ShellError::TunnelStopped)?
    }

    /// [`TunnelHandle::set_peers`] for callers outside an async runtime.
    pub fn set_peers_blocking(&self, peers: Vec<PeerConfig>) -> Result<PeerChanges, ShellError> {
        let rx = self.ask(|tx| Request::SetPeers(peers, None, tx))?;
        rx.blocking_recv().map_err(|_| ShellError::TunnelStopped)?
    }

    /// Replaces the peer set and the [`NodeRoutes`] together: routes are added before the
    /// ones no longer wanted are removed, so a prefix that moves from blocked to a peer (or
    /// back) is never without a route into the device. An invalid set (a blocked prefix that
    /// holds a peer's endpoint included) changes nothing.
    pub async fn set_peers_and_routes(
        &self,
        peers: Vec<PeerConfig>,
        routes: NodeRoutes,
    ) -> Result<PeerChanges, ShellError> {
        let rx = self.ask(|tx| Request::SetPeers(peers, Some(routes), tx))?;
        rx.await.map_err(|_| ShellError::TunnelStopped)?
    }

    /// [`TunnelHandle::set_peers_and_routes`] for callers outside an async runtime.
    pub fn set_peers_and_routes_blocking(
        &self,
        peers: Vec<PeerConfig>,
        routes: NodeRoutes,
    ) -> Result<PeerChanges, ShellError> {
        let rx = self.ask(|tx| Request::SetPeers(peers, Some(routes), tx))?;
        rx.blocking_recv().map_err(|_| ShellError::TunnelStopped)?
    }

    /// Replaces this node's static key (its credentials were rotated; see
    /// [`Tunnel::set_static_secret`]): every peer's session ends; a peer we had a session with
    /// gets a handshake under the new key at once, any other at our next packet to it. Peers,
    /// routes and counters stay. Refused, changing nothing, when a peer has that key.
    pub async fn set_static_secret(&self, secret: StaticSecret) -> Result<(), ShellError> {
        let rx = self.ask(|tx| Request::SetSecret(secret, tx))?;
        rx.await.map_err(|_| ShellError::TunnelStopped)?
    }

    /// [`TunnelHandle::set_static_secret`] for callers outside an async runtime.
    pub fn set_static_secret_blocking(&self, secret: StaticSecret) -> Result<(), ShellError> {
        let rx = self.ask(|tx| Request::SetSecret(secret, tx))?;
        rx.blocking_recv().map_err(|_| ShellError::TunnelStopped)?
    }

    /// A reader of the counters, for tasks that do not own the handle.
    pub fn stats_reader(&self) -> Option<TunnelStatsReader> {
        self.requests.as_ref().map(|r| TunnelStatsReader {
            requests: r.clone(),
        })
    }

    /// Every peer's counters now.
    pub async fn stats(&self) -> Result<TunnelStats, ShellError> {
        let rx = self.ask(Request::Stats)?;
        rx.await.map_err(|_| ShellError::TunnelStopped)
    }

    /// [`TunnelHandle::stats`] for callers outside an async runtime.
    pub fn stats_blocking(&self) -> Result<TunnelStats, ShellError> {
        let rx = self.ask(Request::Stats)?;
        rx.blocking_recv().map_err(|_| ShellError::TunnelStopped)
    }

    /// Stops the loop, removes the routes and rules it added and the TUN device, and waits for
    /// that to be done. Blocks (briefly: a few `ip` commands).
    pub fn shutdown(mut self) -> Result<(), ShellError> {
        self.stop()
    }

    fn stop(&mut self) -> Result<(), ShellError> {
        // Readers may hold clones of the channel: ask the loop to end, then close our end.
        if let Some(r) = self.requests.take() {
            let _ = r.send(Request::Stop);
        }
        match self.thread.take() {
            Some(t) => thread_result(t.join()),
            None => Ok(()),
        }
    }
}

impl Drop for TunnelHandle {
    fn drop(&mut self) {
        if let Err(e) = self.stop() {
            tracing::warn!(device = %self.device, "tunnel shutdown: {e}");
        }
    }
}

fn thread_result(r: std::thread::Result<Result<(), ShellError>>) -> Result<(), ShellError> {
    r.map_err(|_| ShellError::Thread(std::io::Error::other("tunnel thread panicked")))?
}

/// The tunnel's thread: enter the namespace, set up, report, loop, clean up.
fn run_thread(
    config: TunnelConfig,
    tunnel: Tunnel,
    requests: mpsc::UnboundedReceiver<Request>,
    ready: std::sync::mpsc::Sender<Result<SocketAddr, ShellError>>,
) -> Result<(), ShellError> {
    if let Some(ns) = &config.netns
        && let Err(e) = ns.enter_current_thread()
    {
        let _ = ready.send(Err(e));
        return Ok(());
    }
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            let _ = ready.send(Err(ShellError::Thread(e)));
            return Ok(());
        }
    };
    runtime.block_on(async move {
        let mut routing = Routing::new(&config);
        let setup = async {
            let tun_err = |source| ShellError::TunDevice {
                name: config.device.clone(),
                source,
            };
            // Offload (IFF_VNET_HDR with TSO/GRO): the kernel hands the tunnel up to 64 KB TCP
            // segments in one read, split here into MTU-sized packets, and takes coalesced
            // ones in one write: a system call per batch rather than per packet.
            let tun = tun_rs::DeviceBuilder::new()
                .name(&config.device)
                .mtu(config.mtu)
                .offload(true)
                .enable(false)
                .build_async()
                .map_err(tun_err)?;
            // No IPv6 link-local address on the device: the kernel would send its router
            // solicitations and multicast listener reports into the tunnel, which has no peer
            // for them (counted as no_peer drops). Best effort: without IPv6 there is none.
            let mut nolocal = Command::new("ip");
            nolocal.args(["link", "set", "dev", &config.device, "addrgenmode", "none"]);
            if let Err(e) = super::netns::run_command(nolocal, None) {
                tracing::debug!(device = %config.device, "addrgenmode none: {e}");
            }
            tun.enabled(true).map_err(tun_err)?;
            let udp = bind(config.listen)?;
            let local = udp
                .local_addr()
                .map_err(|source| ShellError::TunnelSocket {
                    addr: config.listen,
                    source,
                })?;
            // Started without peers (an agent, which learns them a moment later): a killed
            // tunnel's blackholes stay until the first peer set says which are still wanted.
            routing.leftovers_kept = tunnel.table().peers().is_empty();
            routing.sync(&tunnel.table().prefixes())?;
            Ok::<_, ShellError>((tun, udp, local))
        };
        let (tun, udp, local) = match setup.await {
            Ok(x) => x,
            Err(e) => {
                // The device (if made) is gone with its fd; routes and rules are undone here.
                if let Err(undo) = routing.clear() {
                    tracing::warn!("tunnel setup failed ({e}); undoing it: {undo}");
                }
                let _ = ready.send(Err(e));
                return Ok(());
            }
        };
        let _ = ready.send(Ok(local));
        let result = run_loop(tunnel, &tun, &udp, &mut routing, requests).await;
        let cleared = routing.clear();
        drop(tun);
        result.and(cleared)
    })
}

/// The tunnel's socket; `[::]` dual-stack (IPv4 peers are then reached at their IPv4-mapped
/// address, see [`Io::send`]).
fn bind(addr: SocketAddr) -> Result<tokio::net::UdpSocket, ShellError> {
    let err = |source| ShellError::TunnelSocket { addr, source };
    let socket = if addr.is_ipv6() && addr.ip().is_unspecified() {
        use rustix::net::{AddressFamily, SocketFlags, SocketType};
        let fd = rustix::net::socket_with(
            AddressFamily::INET6,
            SocketType::DGRAM,
            SocketFlags::CLOEXEC,
            None,
        )
        .map_err(|e| err(e.into()))?;
        rustix::net::sockopt::set_ipv6_v6only(&fd, false).map_err(|e| err(e.into()))?;
        rustix::net::bind(&fd, &addr).map_err(|e| err(e.into()))?;
        std::net::UdpSocket::from(fd)
    } else {
        std::net::UdpSocket::bind(addr).map_err(err)?
    };
    socket.set_nonblocking(true).map_err(err)?;
    // UDP GRO: a peer's GSO batch (see TxBatch) is read back in one call. Without it (an old
    // kernel) each datagram is read on its own.
    if let Err(e) =
        nix::sys::socket::setsockopt(&socket, nix::sys::socket::sockopt::UdpGroSegment, &true)
    {
        tracing::info!("tunnel: no UDP GRO on the socket ({e}); datagrams are read one by one");
    }
    tokio::net::UdpSocket::from_std(socket).map_err(err)
}

/// The shell's side of [`Outputs`]: non-blocking sends (a full buffer drops, and is counted);
/// decrypted packets are collected into `rx` and written to the device in one batch
/// ([`RxBatch::flush`]).
struct Io<'a> {
    udp: &'a tokio::net::UdpSocket,
    rx: &'a mut RxBatch,
    tx: &'a mut TxBatch,
    /// The socket is IPv6 (dual-stack): IPv4 destinations are given IPv4-mapped.
    v6: bool,
    /// Datagrams of batches sent meanwhile that the socket refused.
    failed_sends: u64,
}

/// Encrypted datagrams waiting to be sent. Consecutive ones to the same peer of one size (the
/// last may be shorter) leave in one system call with UDP GSO (`UDP_SEGMENT`): the kernel
/// segments them, and over a veth or a NIC with offloads they stay one buffer until the
/// peer's socket, which takes them back in one read with UDP GRO.
struct TxBatch {
    buf: Vec<u8>,
    to: Option<SocketAddr>,
    /// The size of each datagram in `buf` (the last may be shorter).
    seg: usize,
    count: usize,
    /// The last datagram was shorter than `seg`: nothing may follow it in this batch.
    closed: bool,
    /// UDP GSO works on this socket (turned off, for good, when the kernel refuses it).
    gso: bool,
}

/// At most this many datagrams in one GSO send (the kernel's limit is 64), and bytes (an IP
/// packet's payload).
const TX_SEGMENTS: usize = 64;
const TX_BYTES: usize = 65_000;

impl TxBatch {
    fn new() -> TxBatch {
        TxBatch {
            buf: Vec::with_capacity(TX_BYTES),
            to: None,
            seg: 0,
            count: 0,
            closed: false,
            gso: true,
        }
    }

    /// Adds a datagram (sending the batch first when it cannot join it); returns how many
    /// datagrams of that earlier batch could not be sent.
    fn push(&mut self, udp: &tokio::net::UdpSocket, to: SocketAddr, datagram: &[u8]) -> u64 {
        let mut failed = 0;
        if self.count > 0
            && (self.to != Some(to)
                || self.closed
                || datagram.len() > self.seg
                || self.count == TX_SEGMENTS
                || self.buf.len() + datagram.len() > TX_BYTES)
        {
            failed = self.flush(udp);
        }
        if self.count == 0 {
            self.to = Some(to);
            self.seg = datagram.len();
        } else if datagram.len() < self.seg {
            self.closed = true;
        }
        self.buf.extend_from_slice(datagram);
        self.count += 1;
        failed
    }

    /// Sends the batch; returns how many datagrams could not be sent (a full socket buffer).
    fn flush(&mut self, udp: &tokio::net::UdpSocket) -> u64 {
        let (count, to) = (self.count, self.to);
        self.count = 0;
        self.closed = false;
        let Some(to) = to.filter(|_| count > 0) else {
            self.buf.clear();
            return 0;
        };
        let mut failed = 0;
        let mut sent = false;
        if count > 1 && self.gso {
            match send_gso(udp, to, &self.buf, self.seg) {
                Ok(()) => sent = true,
                Err(e) if would_block(&e) => {
                    failed = count as u64;
                    sent = true;
                }
                // No UDP GSO here (an old kernel, a device without checksum offload): every
                // datagram on its own from now on.
                Err(e) => {
                    tracing::info!("tunnel: UDP GSO refused ({e}); sending datagrams one by one");
                    self.gso = false;
                }
            }
        }
        if !sent {
            for d in self.buf.chunks(self.seg.max(1)) {
                if udp.try_send_to(d, to).is_err() {
                    failed += 1;
                }
            }
        }
        self.buf.clear();
        failed
    }
}

/// One `sendmsg` of `buf`, datagrams of `seg` bytes (the last may be shorter), to `to`.
fn send_gso(
    udp: &tokio::net::UdpSocket,
    to: SocketAddr,
    buf: &[u8],
    seg: usize,
) -> std::io::Result<()> {
    use nix::sys::socket::{ControlMessage, MsgFlags, SockaddrStorage, sendmsg};
    use std::os::fd::AsRawFd;
    let seg = u16::try_from(seg).map_err(|_| std::io::Error::other("segment over 64 KiB"))?;
    let addr = SockaddrStorage::from(to);
    let iov = [std::io::IoSlice::new(buf)];
    let cmsg = [ControlMessage::UdpGsoSegments(&seg)];
    udp.try_io(tokio::io::Interest::WRITABLE, || {
        sendmsg(udp.as_raw_fd(), &iov, &cmsg, MsgFlags::empty(), Some(&addr))
            .map(drop)
            .map_err(std::io::Error::from)
    })
}

/// One read from the socket: the datagrams (several when UDP GRO coalesced them: each of the
/// returned segment size, the last maybe shorter) are in `buf[..len]`. Returns (len, segment
/// size, source).
fn recv_gro(
    udp: &tokio::net::UdpSocket,
    buf: &mut [u8],
) -> std::io::Result<(usize, usize, SocketAddr)> {
    use nix::sys::socket::{
        AddressFamily, ControlMessageOwned, MsgFlags, SockaddrLike, SockaddrStorage, recvmsg,
    };
    use std::os::fd::AsRawFd;
    udp.try_io(tokio::io::Interest::READABLE, || {
        let mut cmsg = nix::cmsg_space!(i32);
        let mut iov = [std::io::IoSliceMut::new(&mut *buf)];
        let msg = recvmsg::<SockaddrStorage>(
            udp.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::empty(),
        )
        .map_err(std::io::Error::from)?;
        let len = msg.bytes;
        let mut seg = len;
        if let Ok(cmsgs) = msg.cmsgs() {
            for c in cmsgs {
                if let ControlMessageOwned::UdpGroSegments(s) = c {
                    seg = usize::try_from(s).unwrap_or(len);
                }
            }
        }
        let from = msg
            .address
            .and_then(|a| match a.family() {
                Some(AddressFamily::Inet) => a
                    .as_sockaddr_in()
                    .map(|v4| SocketAddr::V4(std::net::SocketAddrV4::from(*v4))),
                Some(AddressFamily::Inet6) => a
                    .as_sockaddr_in6()
                    .map(|v6| SocketAddr::V6(std::net::SocketAddrV6::from(*v6))),
                _ => None,
            })
            .ok_or_else(|| std::io::Error::other("a datagram without a source address"))?;
        Ok((len, seg.max(1), from))
    })
}

/// Headroom before each packet written to the device: its virtio-net header (offload).
const VNET: usize = tun_rs::VIRTIO_NET_HDR_LEN;

/// Decrypted packets waiting to be written to the TUN device, each after [`VNET`] bytes of
/// headroom. At most [`RX_BATCH`]; the buffers are kept from batch to batch (one a coalesced
/// TCP segment grew to 64 KB stays that large: at most `RX_BATCH` × 64 KB).
struct RxBatch {
    bufs: Vec<Vec<u8>>,
    len: usize,
    gro: tun_rs::GROTable,
}

/// Datagrams one UDP GRO read returns at most (the kernel's `UDP_GRO_CNT_MAX`).
const UDP_GRO_MAX: usize = 64;

/// Decrypted packets written to the device in one batch, at most. The socket loop stops
/// reading while the batch has no room for one more read's datagrams, so a burst waits in the
/// socket for the next turn instead of overflowing the batch (dropped as `deliver_failed`).
const RX_BATCH: usize = 2 * UDP_GRO_MAX;

impl RxBatch {
    fn new() -> RxBatch {
        RxBatch {
            bufs: Vec::new(),
            len: 0,
            gro: tun_rs::GROTable::default(),
        }
    }

    fn push(&mut self, packet: &[u8]) -> bool {
        if self.len == self.bufs.len() {
            if self.len == RX_BATCH {
                return false;
            }
            self.bufs.push(Vec::with_capacity(VNET + packet.len()));
        }
        let buf = &mut self.bufs[self.len];
        buf.clear();
        buf.resize(VNET, 0);
        buf.extend_from_slice(packet);
        self.len += 1;
        true
    }

    /// Writes the batch (TCP and UDP packets of one flow coalesced); returns how many packets
    /// could not be written (the whole batch when the write failed).
    async fn flush(&mut self, tun: &tun_rs::AsyncDevice) -> u64 {
        if self.len == 0 {
            return 0;
        }
        let n = self.len;
        self.len = 0;
        // One packet: written as it is, behind an empty virtio-net header (no offload), without
        // the coalescing pass.
        let written = if n == 1 {
            tun.send(&self.bufs[0]).await.map(drop)
        } else {
            tun.send_multiple(&mut self.gro, &mut self.bufs[..n], VNET)
                .await
                .map(drop)
        };
        match written {
            Ok(_) => 0,
            Err(e) => {
                tracing::debug!("tunnel: writing {n} packets to the device: {e}");
                n as u64
            }
        }
    }
}

impl Outputs for Io<'_> {
    /// Sends to `to`; an IPv4 `to` on the dual-stack socket goes to its IPv4-mapped address.
    fn send(&mut self, to: SocketAddr, datagram: &[u8]) -> bool {
        let to = match to {
            SocketAddr::V4(v4) if self.v6 => {
                SocketAddr::new(IpAddr::V6(v4.ip().to_ipv6_mapped()), v4.port())
            }
            other => other,
        };
        self.failed_sends += self.tx.push(self.udp, to, datagram);
        true
    }

    fn deliver(&mut self, packet: &[u8]) -> bool {
        self.rx.push(packet)
    }
}

fn would_block(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted
    )
}

async fn run_loop(
    mut tunnel: Tunnel,
    tun: &tun_rs::AsyncDevice,
    udp: &tokio::net::UdpSocket,
    routing: &mut Routing,
    mut requests: mpsc::UnboundedReceiver<Request>,
) -> Result<(), ShellError> {
    // One read: a virtio-net header and a packet of up to 64 KB, split into `segments`.
    let mut tun_buf = vec![0u8; VNET + READ_BUF];
    let mut segments = vec![vec![0u8; usize::from(u16::MAX)]; 1];
    segments.extend(
        std::iter::repeat_with(|| vec![0u8; SEGMENT_BUF]).take(tun_rs::IDEAL_BATCH_SIZE - 1),
    );
    let mut sizes = vec![0usize; tun_rs::IDEAL_BATCH_SIZE];
    let mut rx = RxBatch::new();
    let mut tx = TxBatch::new();
    let mut udp_buf = vec![0u8; READ_BUF];
    let mut ticker = tokio::time::interval(TICK);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut sources_checked = tokio::time::Instant::now();
    let v6 = udp.local_addr().is_ok_and(|a| a.is_ipv6());
    loop {
        let mut io = Io {
            udp,
            rx: &mut rx,
            tx: &mut tx,
            v6,
            failed_sends: 0,
        };
        tokio::select! {
            r = tun.readable() => {
                r.map_err(|source| ShellError::TunnelIo { what: "reading the TUN device", source })?;
                for _ in 0..BATCH {
                    match tun.try_recv_multiple(&mut tun_buf, &mut segments, &mut sizes, 0) {
                        Ok(n) => {
                            for (seg, size) in segments.iter().zip(&sizes).take(n) {
                                tunnel.handle_tun_packet(&seg[..*size], &mut io);
                            }
                        }
                        Err(e) if would_block(&e) => break,
                        // The device is gone (or worse): the tunnel ends.
                        Err(source) if source.raw_os_error().is_some() => {
                            return Err(ShellError::TunnelIo { what: "reading the TUN device", source });
                        }
                        // A packet the offload could not split (a malformed virtio-net header
                        // or segment): dropped, counted.
                        Err(e) => {
                            tracing::debug!("tunnel: a packet from the device dropped: {e}");
                            tunnel.count_malformed_from_host();
                        }
                    }
                }
            }
            r = udp.readable() => {
                r.map_err(|source| ShellError::TunnelIo { what: "reading the UDP socket", source })?;
                let now = super::queue::unix_ms();
                for _ in 0..BATCH {
                    if io.rx.len > RX_BATCH - UDP_GRO_MAX {
                        break;
                    }
                    match recv_gro(udp, &mut udp_buf) {
                        // An empty datagram is one too (malformed, counted).
                        Ok((0, _, from)) => tunnel.handle_datagram(now, from, &[], &mut io),
                        Ok((n, seg, from)) => {
                            for d in udp_buf[..n].chunks(seg) {
                                tunnel.handle_datagram(now, from, d, &mut io);
                            }
                        }
                        Err(e) if would_block(&e) => break,
                        // An ICMP error queued on the socket (with IP_RECVERR only); the next
                        // read goes on.
                        Err(e) => {
                            tracing::debug!("tunnel UDP socket: {e}");
                            break;
                        }
                    }
                }
            }
            _ = ticker.tick() => {
                tunnel.tick(&mut io);
                if sources_checked.elapsed() >= SOURCES_EVERY {
                    sources_checked = tokio::time::Instant::now();
                    // An address inside our pod prefixes may have come (or gone).
                    if let Err(e) = routing.refresh_sources(&tunnel) {
                        tracing::warn!("tunnel routes: new source address: {e}");
                    }
                }
            }
            request = requests.recv() => match request {
                Some(Request::SetPeers(peers, routes, reply)) => {
                    let _ = reply.send(set_peers(&mut tunnel, routing, peers, routes));
                    // A peer with a new key that we had a session with: its handshake now.
                    tunnel.start_handshakes(&mut io);
                }
                Some(Request::Stats(reply)) => {
                    let _ = reply.send(tunnel.stats(super::queue::unix_ms()));
                }
                Some(Request::SetSecret(secret, reply)) => {
                    let _ = reply.send(tunnel.set_static_secret(&secret).map_err(ShellError::from));
                    // The peers we had a session with: a handshake under the new key now.
                    tunnel.start_handshakes(&mut io);
                }
                // The handle is shut down, or gone with every reader.
                Some(Request::Stop) | None => return Ok(()),
            },
        }
        let failed_sends = io.failed_sends + tx.flush(udp);
        if failed_sends > 0 {
            tunnel.count_send_failed(failed_sends);
        }
        let failed = rx.flush(tun).await;
        if failed > 0 {
            tunnel.count_deliver_failed(failed);
        }
    }
}

/// New peers first (a packet routed to a new prefix finds its peer), then the routes.
fn set_peers(
    tunnel: &mut Tunnel,
    routing: &mut Routing,
    peers: Vec<PeerConfig>,
    routes: Option<NodeRoutes>,
) -> Result<PeerChanges, ShellError> {
    let (blocked, own) = match routes {
        Some(r) => (
            r.blocked.iter().map(IpNet::trunc).collect(),
            r.own_prefixes.iter().map(IpNet::trunc).collect(),
        ),
        None => (routing.blocked.clone(), routing.own_prefixes.clone()),
    };
    // Checked before anything changes: a blocked prefix holding a peer's endpoint would route
    // the tunnel's own datagrams to that peer into the device.
    for p in &peers {
        if let Some(prefix) = blocked.iter().find(|b| b.contains(&p.endpoint.ip())) {
            return Err(ShellError::TunnelBlockedEndpoint {
                prefix: *prefix,
                peer: p.name.clone(),
                endpoint: p.endpoint,
            });
        }
    }
    let changes = tunnel.set_peers(peers)?;
    routing.blocked = blocked;
    routing.own_prefixes = own;
    routing.sources = routing.wanted_sources();
    routing.leftovers_kept = false;
    routing.sync(&routing.wanted(tunnel))?;
    Ok(changes)
}

/// The rules and routes this tunnel added, exactly: each is recorded once its command
/// succeeded, and only those are removed.
#[derive(Debug)]
struct Routing {
    device: String,
    table: String,
    priority: String,
    /// Sources given by the configuration (win over those found in `own_prefixes`).
    fixed_sources: Vec<IpAddr>,
    /// The sources of the routes to add, at most one per family.
    sources: Vec<IpAddr>,
    /// Routed into the device for no peer (see [`NodeRoutes::blocked`]).
    blocked: BTreeSet<IpNet>,
    /// Where the sources are looked for (see [`NodeRoutes::own_prefixes`]).
    own_prefixes: BTreeSet<IpNet>,
    rules: BTreeSet<Family>,
    /// Each route through the device added, with the source it was added with.
    routes: BTreeMap<IpNet, Option<IpAddr>>,
    /// The blackhole route under each route through the device (and, after a start that took
    /// a killed tunnel's table over, its leftovers until the first peer set).
    blackholes: BTreeSet<IpNet>,
    /// Blackholes not wanted are kept (from the start to the first peer set).
    leftovers_kept: bool,
}

/// The metric of the blackhole routes: any route through the device (metric 0) wins while the
/// device exists.
const BLACKHOLE_METRIC: &str = "4096";

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Family {
    V4,
    V6,
}

impl Family {
    fn of(prefix: &IpNet) -> Family {
        match prefix {
            IpNet::V4(_) => Family::V4,
            IpNet::V6(_) => Family::V6,
        }
    }

    fn flag(self) -> &'static str {
        match self {
            Family::V4 => "-4",
            Family::V6 => "-6",
        }
    }
}

impl Routing {
    fn new(config: &TunnelConfig) -> Routing {
        Routing {
            device: config.device.clone(),
            table: config.table.to_string(),
            priority: config.rule_priority.to_string(),
            fixed_sources: config.route_sources.clone(),
            sources: config.route_sources.clone(),
            blocked: BTreeSet::new(),
            own_prefixes: BTreeSet::new(),
            rules: BTreeSet::new(),
            routes: BTreeMap::new(),
            blackholes: BTreeSet::new(),
            leftovers_kept: false,
        }
    }

    /// Every prefix routed into the device: the peers' and the blocked ones.
    fn wanted(&self, tunnel: &Tunnel) -> BTreeSet<IpNet> {
        let mut all = tunnel.table().prefixes();
        all.extend(self.blocked.iter().copied());
        all
    }

    /// One source per family: the configured one, else the namespace's first address inside
    /// our own pod prefixes (none if it has none, or its addresses cannot be listed).
    fn wanted_sources(&self) -> Vec<IpAddr> {
        let mut out: Vec<IpAddr> = Vec::new();
        for v4 in [true, false] {
            if let Some(s) = self.fixed_sources.iter().find(|s| s.is_ipv4() == v4) {
                out.push(*s);
            }
        }
        if self.own_prefixes.is_empty() {
            return out;
        }
        let local = match local_addresses() {
            Ok(l) => l,
            Err(e) => {
                tracing::debug!("tunnel: listing this namespace's addresses: {e}");
                return out;
            }
        };
        for v4 in [true, false] {
            if out.iter().any(|s| s.is_ipv4() == v4) {
                continue;
            }
            if let Some(a) = local
                .iter()
                .find(|a| a.is_ipv4() == v4 && self.own_prefixes.iter().any(|p| p.contains(*a)))
            {
                out.push(*a);
            }
        }
        out
    }

    /// Looks the sources up again; the routes get the new ones (`ip route replace`).
    fn refresh_sources(&mut self, tunnel: &Tunnel) -> Result<(), ShellError> {
        let sources = self.wanted_sources();
        if sources == self.sources {
            return Ok(());
        }
        tracing::info!(?sources, "tunnel routes: source addresses");
        self.sources = sources;
        self.sync(&self.wanted(tunnel))
    }

    fn source_for(&self, prefix: &IpNet) -> Option<IpAddr> {
        self.sources
            .iter()
            .find(|s| s.is_ipv4() == matches!(prefix, IpNet::V4(_)))
            .copied()
    }

    fn ip(family: Family, args: &[&str]) -> Command {
        let mut cmd = Command::new("ip");
        cmd.arg(family.flag()).args(args);
        cmd
    }

    /// Makes the routes exactly `wanted` (adding first, then removing), each with the source
    /// of its family (a route whose source changed is replaced in place), with the rule of each
    /// family that has a route.
    fn sync(&mut self, wanted: &BTreeSet<IpNet>) -> Result<(), ShellError> {
        for family in wanted.iter().map(Family::of).collect::<BTreeSet<_>>() {
            if !self.rules.contains(&family) {
                self.add_rule(family)?;
            }
        }
        for prefix in wanted.difference(&self.blackholes.clone()) {
            self.blackhole("add", prefix)?;
            self.blackholes.insert(*prefix);
        }
        for prefix in wanted {
            let src = self.source_for(prefix);
            let verb = match self.routes.get(prefix) {
                None => "add",
                Some(had) if *had != src => "replace",
                Some(_) => continue,
            };
            let p = prefix.to_string();
            let mut args = vec!["route", verb, &p, "dev", &self.device, "table", &self.table];
            let src_text = src.map(|s| s.to_string());
            if let Some(s) = &src_text {
                args.extend(["src", s]);
            }
            super::netns::run_command(Self::ip(Family::of(prefix), &args), None)?;
            self.routes.insert(*prefix, src);
        }
        let gone: Vec<IpNet> = self
            .routes
            .keys()
            .filter(|p| !wanted.contains(*p))
            .copied()
            .collect();
        for prefix in &gone {
            self.del_route(prefix)?;
        }
        if !self.leftovers_kept {
            for prefix in self.blackholes.clone().difference(wanted) {
                self.del_blackhole(prefix)?;
            }
        }
        Ok(())
    }

    fn add_rule(&mut self, family: Family) -> Result<(), ShellError> {
        // The table must be this tunnel's alone: a route already in it belongs to a running
        // tunnel with the same table, or to another program.
        let show = ["route", "show", "table", &self.table];
        let routes = match super::netns::run_command(Self::ip(family, &show), None) {
            Ok((out, _)) => out,
            Err(ShellError::Command { stderr, .. }) if stderr.contains("does not exist") => {
                String::new()
            }
            Err(e) => return Err(e),
        };
        // Only blackholes: left by a tunnel that was killed (they kept its peers' traffic from
        // going out in clear). Taken over: replaced by this tunnel's routes at its first sync.
        let mut leftovers = BTreeSet::new();
        for line in routes.lines().filter(|l| !l.trim().is_empty()) {
            let mut words = line.split_whitespace();
            let kind = words.next();
            // `ip` prints a host route without its length (`blackhole 10.1.2.3`).
            let prefix = words.next().and_then(|w| {
                w.parse::<IpNet>()
                    .ok()
                    .or_else(|| w.parse::<IpAddr>().ok().map(IpNet::from))
            });
            match (kind, prefix) {
                (Some("blackhole"), Some(prefix)) => {
                    leftovers.insert(prefix);
                }
                _ => {
                    return Err(ShellError::TunnelTableInUse {
                        table: self.table.clone(),
                        routes: routes.trim().to_owned(),
                    });
                }
            }
        }
        self.blackholes.extend(leftovers);
        let args = ["rule", "add", "pref", &self.priority, "lookup", &self.table];
        match super::netns::run_command(Self::ip(family, &args), None) {
            Ok(_) => {}
            // The same rule, before an empty table: left by a tunnel that was killed (its
            // routes went with its device). Taken over, and removed on shutdown.
            Err(ShellError::Command { stderr, .. }) if stderr.contains("File exists") => {}
            Err(e) => return Err(e),
        }
        self.rules.insert(family);
        Ok(())
    }

    fn del_route(&mut self, prefix: &IpNet) -> Result<(), ShellError> {
        let p = prefix.to_string();
        let args = [
            "route",
            "del",
            &p,
            "dev",
            &self.device,
            "table",
            &self.table,
        ];
        super::netns::run_command(Self::ip(Family::of(prefix), &args), None)?;
        self.routes.remove(prefix);
        Ok(())
    }

    fn del_blackhole(&mut self, prefix: &IpNet) -> Result<(), ShellError> {
        self.blackhole("del", prefix)?;
        self.blackholes.remove(prefix);
        Ok(())
    }

    /// `ip route VERB blackhole PREFIX table TABLE metric 4096`.
    fn blackhole(&self, verb: &str, prefix: &IpNet) -> Result<(), ShellError> {
        let p = prefix.to_string();
        let args = [
            "route",
            verb,
            "blackhole",
            &p,
            "table",
            &self.table,
            "metric",
            BLACKHOLE_METRIC,
        ];
        super::netns::run_command(Self::ip(Family::of(prefix), &args), None).map(|_| ())
    }

    /// Removes every route and rule added; goes on after an error and returns the first.
    fn clear(&mut self) -> Result<(), ShellError> {
        let mut first = Ok(());
        let added: Vec<IpNet> = self.routes.keys().copied().collect();
        for prefix in added {
            if let Err(e) = self.del_route(&prefix) {
                first = first.and(Err(e));
                self.routes.remove(&prefix);
            }
        }
        for prefix in self.blackholes.clone() {
            if let Err(e) = self.del_blackhole(&prefix) {
                first = first.and(Err(e));
                self.blackholes.remove(&prefix);
            }
        }
        for family in std::mem::take(&mut self.rules) {
            let args = ["rule", "del", "pref", &self.priority, "lookup", &self.table];
            if let Err(e) = super::netns::run_command(Self::ip(family, &args), None) {
                first = first.and(Err(e));
            }
        }
        first
    }
}

/// The addresses of the calling thread's network namespace (every interface).
pub fn local_addresses() -> Result<Vec<IpAddr>, ShellError> {
    let addrs = nix::ifaddrs::getifaddrs().map_err(|e| ShellError::TunnelIo {
        what: "listing the namespace's addresses",
        source: e.into(),
    })?;
    Ok(addrs
        .filter_map(|a| {
            let sa = a.address?;
            if let Some(v4) = sa.as_sockaddr_in() {
                return Some(IpAddr::V4(v4.ip()));
            }
            sa.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip()))
        })
        .collect())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_the_documented_ones() {
        let c = TunnelConfig::default();
        assert_eq!(c.device, "tsr-wg0");
        assert_eq!(c.mtu, 1420);
        assert_eq!(c.listen, "0.0.0.0:51871".parse().unwrap());
        assert!(c.rule_priority < 32766, "before main");
    }

    #[test]
    fn an_invalid_peer_set_fails_before_anything_is_made() {
        let s = StaticSecret::from_bytes([1; 32]);
        let own = PeerConfig {
            name: "me".into(),
            public_key: s.public_key(),
            endpoint: "10.0.0.1:51871".parse().unwrap(),
            allowed_ips: vec![],
        };
        let err = start(
            TunnelConfig {
                device: "never-made".into(),
                ..TunnelConfig::default()
            },
            &s,
            vec![own],
        )
        .unwrap_err();
        assert!(err.to_string().contains("own public key"), "{err}");
    }
}
