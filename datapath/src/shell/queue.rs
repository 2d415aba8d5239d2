//! NFQUEUE sockets: one per workload namespace, opened inside it, driven by the agent's single
//! tokio event loop.
//!
//! `nfq::Queue` does not expose its file descriptor, and we cannot borrow a raw fd without
//! `unsafe`. So the socket is found by listing the process's fds before and after
//! `Queue::open` (under a process-wide lock); each new fd is duplicated with `pidfd_getfd(2)`
//! into an owned fd, and the one whose `SO_DOMAIN`/`SO_PROTOCOL` say `AF_NETLINK` /
//! `NETLINK_NETFILTER` is kept. That owned duplicate (same socket) is what tokio polls for
//! readiness, readable only: a netlink socket signals "writable" each time a verdict sent on it
//! is consumed, which would return every sleep's `epoll_wait` once for nothing. The `Queue`
//! keeps doing the netlink I/O, but for the batch verdicts that drop a read's packets at once,
//! which the crate does not send: those go out on the duplicate.

use std::collections::{BTreeMap, VecDeque};
use std::fs::File;
use std::io::{Read, Seek};
use std::os::fd::{OwnedFd, RawFd};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rustix::net::sockopt;
use rustix::net::{AddressFamily, netlink};
use rustix::process::{PidfdFlags, PidfdGetfdFlags, getpid, pidfd_getfd, pidfd_open};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

use super::ShellError;
use super::netns::Netns;

/// netfilter hook numbers as reported in queued packets.
const NF_INET_LOCAL_IN: u8 = 1;
const NF_INET_LOCAL_OUT: u8 = 3;
const NF_INET_FORWARD: u8 = 2;
/// Messages handled per [`WorkloadQueue::serve_batch`] call at most. A caller that gets a full
/// batch should yield to its runtime's other tasks before the next call: tokio's cooperative
/// budget alone lets a queue that is never empty run 128 readiness waits (tens of thousands of
/// packets) before anything else on its thread.
pub const BATCH: usize = 256;

/// How long a packet whose verdict asks for a pause ([`Action::pause`]) waits, unanswered,
/// before it goes through the rules again: long enough for an answer from a peer on the same
/// or a near node (a round trip through two agents), short enough that the 31 pauses a UDP
/// datagram may take behind a lost ACK control (`MAX_DEFERRALS`) last about 60 ms.
pub const PAUSE: Duration = Duration::from_millis(2);

/// Packets one queue keeps paused at most; beyond, a pause is a requeue at once. Each holds a
/// place in the kernel's queue (`max_len`) until it is answered.
pub const MAX_PAUSED: usize = 128;

static OPEN_LOCK: Mutex<()> = Mutex::new(());

/// Queue knobs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueConfig {
    /// The queue number the rules send to.
    pub queue_num: u16,
    /// Kernel queue length (packets waiting for a verdict).
    pub max_len: u32,
    /// Socket receive buffer (SO_RCVBUFFORCE), bytes.
    pub rcvbuf_bytes: usize,
    /// Let the kernel accept packets when the queue is full instead of dropping them.
    pub fail_open: bool,
    /// The queue number the rules send DNS answers to
    /// ([`RuleConfig::dns_queue_num`](super::RuleConfig::dns_queue_num), the same value),
    /// bound by the same socket; its packets reach the handler as [`Direction::DnsAnswer`].
    /// That queue always fails open when full: its packets belong to authorized flows. The
    /// same number as `queue_num` is ignored (as the rules ignore it).
    pub dns_queue_num: Option<u16>,
}

impl Default for QueueConfig {
    fn default() -> Self {
        QueueConfig {
            queue_num: 7,
            max_len: 8192,
            rcvbuf_bytes: 16 << 20,
            fail_open: false,
            dns_queue_num: None,
        }
    }
}

/// A queue opened and bound inside a namespace, not yet attached to the event loop.
pub struct OpenedQueue {
    queue: nfq::Queue,
    socket: OwnedFd,
    stats: Option<File>,
    queue_num: u16,
    dns_queue_num: Option<u16>,
}

impl std::fmt::Debug for OpenedQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpenedQueue")
            .field("socket", &self.socket)
            .field("queue_num", &self.queue_num)
            .field("dns_queue_num", &self.dns_queue_num)
            .finish()
    }
}

/// Open, bind and configure queue `cfg.queue_num` inside `ns` (on a short-lived thread).
pub fn open(ns: &Netns, cfg: QueueConfig) -> Result<OpenedQueue, ShellError> {
    ns.run(move || open_here(cfg))?
}

/// The process's sockets: inode → fd, from the `socket:[INODE]` links of
/// `/proc/thread-self/fd`. Other threads open and close fds at any time (a fd number seen
/// before may be the queue's after), but a live socket keeps its inode and sockfs never hands
/// an inode out twice, so "a socket whose inode was not there before" is exact.
fn sockets() -> Result<BTreeMap<u64, RawFd>, ShellError> {
    let mut out = BTreeMap::new();
    let dir = std::fs::read_dir("/proc/thread-self/fd").map_err(ShellError::Proc)?;
    for entry in dir {
        let entry = entry.map_err(ShellError::Proc)?;
        let Some(fd) = entry.file_name().to_str().and_then(|s| s.parse().ok()) else {
            continue;
        };
        let Ok(link) = std::fs::read_link(entry.path()) else {
            continue; // closed meanwhile (the listing's own fd, another thread's)
        };
        let inode = link
            .to_str()
            .and_then(|l| l.strip_prefix("socket:["))
            .and_then(|l| l.strip_suffix(']'))
            .and_then(|i| i.parse().ok());
        if let Some(inode) = inode {
            out.insert(inode, fd);
        }
    }
    Ok(out)
}

fn inode_of(fd: &OwnedFd) -> Option<u64> {
    rustix::fs::fstat(fd).ok().map(|st| st.st_ino)
}

fn is_netfilter_socket(fd: &OwnedFd) -> bool {
    sockopt::socket_domain(fd).is_ok_and(|d| d == AddressFamily::NETLINK)
        && sockopt::socket_protocol(fd).is_ok_and(|p| p == Some(netlink::NETFILTER))
}

/// How many times [`open_socket`] tries the cheap way before it lists every socket.
const CHEAP_TRIES: usize = 4;

/// Open an nfq queue and get our own duplicate of its socket, which the crate does not expose.
///
/// Only this function creates netfilter sockets in the process, under `OPEN_LOCK`, and a new
/// socket takes the lowest free fd number. The cheap way holds that number (a duplicate of a
/// fd we own), frees it, and lets the crate open its socket: if a netfilter socket is then under
/// that number, it is the queue's (every older netfilter socket was open, so elsewhere, while
/// we held the number). It misses when another thread opened or closed a fd in between; then
/// the queue is closed and opened again. After [`CHEAP_TRIES`] misses the exact way runs: every
/// socket's inode before and after, one link read per fd (milliseconds with a few hundred
/// workloads, where the cheap way takes microseconds whatever their number).
fn open_socket() -> Result<(nfq::Queue, OwnedFd), ShellError> {
    use std::os::fd::AsRawFd;
    let io = |e: rustix::io::Errno| ShellError::Queue(e.into());
    let me = pidfd_open(getpid(), PidfdFlags::empty()).map_err(io)?;
    // A poisoned lock only means another opener panicked; the fd listing is still valid.
    let _guard = OPEN_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    for _ in 0..CHEAP_TRIES {
        let held = rustix::io::dup(&me).map_err(io)?;
        let slot = held.as_raw_fd();
        drop(held);
        let queue = nfq::Queue::open().map_err(ShellError::Queue)?;
        match pidfd_getfd(&me, slot, PidfdGetfdFlags::empty()) {
            Ok(socket) if is_netfilter_socket(&socket) => return Ok((queue, socket)),
            _ => {}
        }
    }
    let before = sockets()?;
    let queue = nfq::Queue::open().map_err(ShellError::Queue)?;
    let after = sockets()?;
    let mut found = Vec::new();
    let mut notes = Vec::new();
    for (inode, fd) in after.iter().filter(|(i, _)| !before.contains_key(i)) {
        match pidfd_getfd(&me, *fd, PidfdGetfdFlags::empty()) {
            // The fd number may have been closed and reused since the listing: check the
            // duplicate is still that socket.
            Ok(dup) if is_netfilter_socket(&dup) && inode_of(&dup) == Some(*inode) => {
                found.push(dup)
            }
            Ok(_) => notes.push(format!("fd {fd}: not the netfilter socket")),
            Err(e) => notes.push(format!("fd {fd}: pidfd_getfd: {e}")),
        }
    }
    match (found.pop(), found.is_empty()) {
        (Some(socket), true) => Ok((queue, socket)),
        _ => Err(ShellError::QueueFd(notes.join("; "))),
    }
}

/// [`open`] from a thread already inside the namespace.
pub fn open_here(cfg: QueueConfig) -> Result<OpenedQueue, ShellError> {
    let io = |e: rustix::io::Errno| ShellError::Queue(e.into());
    let (mut queue, socket) = open_socket()?;
    let q = cfg.queue_num;
    queue.bind(q).map_err(|e| {
        if matches!(e.raw_os_error(), Some(nix::libc::EBUSY | nix::libc::EPERM)) {
            ShellError::QueueBusy(q)
        } else {
            ShellError::Queue(e)
        }
    })?;
    queue
        .set_queue_max_len(q, cfg.max_len)
        .map_err(ShellError::Queue)?;
    queue
        .set_fail_open(q, cfg.fail_open)
        .map_err(ShellError::Queue)?;
    if let Some(d) = cfg.dns_queue_num.filter(|d| *d != q) {
        queue.bind(d).map_err(|e| {
            if matches!(e.raw_os_error(), Some(nix::libc::EBUSY | nix::libc::EPERM)) {
                ShellError::QueueBusy(d)
            } else {
                ShellError::Queue(e)
            }
        })?;
        queue
            .set_queue_max_len(d, cfg.max_len)
            .map_err(ShellError::Queue)?;
        queue.set_fail_open(d, true).map_err(ShellError::Queue)?;
    }
    queue.set_nonblocking(true);
    sockopt::set_socket_recv_buffer_size_force(&socket, cfg.rcvbuf_bytes).map_err(io)?;
    // Opened here, the file reads this namespace's counters for as long as it stays open.
    let stats = File::open("/proc/thread-self/net/netfilter/nfnetlink_queue").ok();
    Ok(OpenedQueue {
        queue,
        socket,
        stats,
        queue_num: q,
        dns_queue_num: cfg.dns_queue_num.filter(|d| *d != q),
    })
}

/// A queue attached to the event loop.
pub struct WorkloadQueue {
    /// Our duplicate of the queue's socket, registered for readability only; the only I/O on it
    /// is sending batch drop verdicts.
    ready: AsyncFd<OwnedFd>,
    queue: nfq::Queue,
    stats: Option<File>,
    queue_num: u16,
    dns_queue_num: Option<u16>,
    /// Socket-level receive errors (ENOBUFS: the socket buffer overflowed; ENOSPC: a message
    /// larger than the buffer), counted and survived.
    pub recv_errors: u64,
    /// Packets kept unanswered for a pause ([`Action::pause`]), oldest first, with the time
    /// their pause ends; at most [`MAX_PAUSED`].
    paused: VecDeque<(Instant, nfq::Message)>,
    /// Verdict messages sent, and packets they answered: the drops of a read batch share one
    /// message (see [`WorkloadQueue::serve_batch`]).
    pub verdicts: VerdictCounts,
}

/// What a queue's verdicts cost in messages.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VerdictCounts {
    /// Netlink verdict messages sent.
    pub messages: u64,
    /// Packets those messages answered.
    pub packets: u64,
}

impl OpenedQueue {
    /// Register with the current tokio runtime.
    pub fn attach(self) -> Result<WorkloadQueue, ShellError> {
        rustix::io::ioctl_fionbio(&self.socket, true).map_err(|e| ShellError::Queue(e.into()))?;
        // `with_interest` is deprecated because it cannot check that an arbitrary `AsRawFd`
        // keeps one open fd for as long as it is registered (tokio#8587); an `OwnedFd` does by
        // construction. Its replacement is `unsafe`, which this workspace denies.
        #[allow(deprecated)]
        let ready =
            AsyncFd::with_interest(self.socket, Interest::READABLE).map_err(ShellError::Queue)?;
        Ok(WorkloadQueue {
            ready,
            queue: self.queue,
            stats: self.stats,
            queue_num: self.queue_num,
            dns_queue_num: self.dns_queue_num,
            recv_errors: 0,
            paused: VecDeque::new(),
            verdicts: VerdictCounts::default(),
        })
    }
}

/// What the packet handler decided for one packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Action {
    /// Accept (`false`: drop).
    pub accept: bool,
    /// The buffer was changed and must be sent back.
    pub modified: bool,
    /// Repeat with nfmark |= this mark (0: none): the AUTH bit is saved into the connmark by the
    /// rules; the re-auth bit ([`crate::reauth_mark`]) makes them clear AUTH from it; on INPUT,
    /// the control bit ([`crate::control_mark`]) makes them copy the AUTH bit (set or clear)
    /// into the connmark and drop the packet.
    pub mark: u32,
    /// Repeat without a mark: the packet goes through the rules again (back to the queue's
    /// tail unless its flow was marked meanwhile).
    pub requeue: bool,
    /// With `requeue`: after a pause of [`PAUSE`], not at once; the caller releases it with
    /// [`WorkloadQueue::release_paused`] once [`WorkloadQueue::pause_ends`] has passed.
    pub pause: bool,
}

impl Action {
    /// Drop, nothing else.
    pub const DROP: Action = Action {
        accept: false,
        modified: false,
        mark: 0,
        requeue: false,
        pause: false,
    };
    /// Accept untouched, nothing else.
    pub const ACCEPT: Action = Action {
        accept: true,
        ..Action::DROP
    };
}

/// `NFQNL_MSG_VERDICT_BATCH` to queue `queue_num`: `verdict` for every packet the queue still
/// holds whose id is `max_id` or below (the kernel walks its list in id order and stops at the
/// first later id). One netlink header (host order), the nfnetlink header (queue number, big
/// endian) and one `NFQA_VERDICT_HDR` attribute (verdict and id, big endian): 32 bytes. The `nfq`
/// crate sends verdicts one packet at a time only.
fn batch_verdict_message(queue_num: u16, verdict: u32, max_id: u32) -> [u8; 32] {
    use nix::libc;
    const LEN: u32 = 32;
    const ATTR_LEN: u16 = 4 + 8;
    let msg_type = (libc::NFNL_SUBSYS_QUEUE as u16) << 8 | libc::NFQNL_MSG_VERDICT_BATCH as u16;
    let mut m = [0u8; 32];
    m[0..4].copy_from_slice(&LEN.to_ne_bytes());
    m[4..6].copy_from_slice(&msg_type.to_ne_bytes());
    m[6..8].copy_from_slice(&(libc::NLM_F_REQUEST as u16).to_ne_bytes());
    // 8..16: sequence number and port id, 0 (to the kernel).
    m[16] = libc::AF_UNSPEC as u8;
    m[17] = libc::NFNETLINK_V0 as u8;
    m[18..20].copy_from_slice(&queue_num.to_be_bytes());
    m[20..22].copy_from_slice(&ATTR_LEN.to_ne_bytes());
    m[22..24].copy_from_slice(&(libc::NFQA_VERDICT_HDR as u16).to_ne_bytes());
    m[24..28].copy_from_slice(&verdict.to_be_bytes());
    m[28..32].copy_from_slice(&max_id.to_be_bytes());
    m
}

/// Drop every packet of queue `queue_num` whose verdict is still owed up to id `max_id`, in one
/// message on `socket` (the queue's own socket): `true` when sent; a full socket buffer
/// (ENOBUFS) is counted in `errors` and survived, as in [`send_verdict`].
fn send_batch_drop(
    socket: &OwnedFd,
    queue_num: u16,
    max_id: u32,
    errors: &mut u64,
) -> Result<bool, ShellError> {
    let msg = batch_verdict_message(queue_num, nix::libc::NF_DROP as u32, max_id);
    match rustix::net::send(socket, &msg, rustix::net::SendFlags::empty()) {
        Ok(_) => Ok(true),
        Err(rustix::io::Errno::NOBUFS) => {
            *errors += 1;
            Ok(false)
        }
        Err(e) => Err(ShellError::Queue(e.into())),
    }
}

/// Send `msg`'s verdict: `true` when sent. A full socket buffer (ENOBUFS) is counted in
/// `errors` and survived (`false`: the kernel still holds the packet, fail-closed); any other
/// error ends the queue.
fn send_verdict(
    queue: &mut nfq::Queue,
    msg: nfq::Message,
    errors: &mut u64,
) -> Result<bool, ShellError> {
    match queue.verdict(msg) {
        Ok(()) => Ok(true),
        Err(e) if e.raw_os_error() == Some(nix::libc::ENOBUFS) => {
            *errors += 1;
            Ok(false)
        }
        Err(e) => Err(ShellError::Queue(e)),
    }
}

/// What [`WorkloadQueue::serve_batch`] calls for each packet. Any `FnMut(Direction, &mut
/// Vec<u8>, bool) -> Action` closure is one (deciding only).
pub trait Handler {
    /// Decide one packet (`packet` may be rewritten: then say so in [`Action::modified`]);
    /// `checksum_ready` is the kernel's "checksum complete" flag.
    fn packet(
        &mut self,
        direction: Direction,
        packet: &mut Vec<u8>,
        checksum_ready: bool,
    ) -> Action;
    /// The packet just decided has its verdict (or is paused), before the next packet is
    /// read: the time to send what deciding it asked for, so that it leaves behind that
    /// verdict and ahead of the batch's later ones.
    fn decided(&mut self) {}
}

impl<F> Handler for F
where
    F: FnMut(Direction, &mut Vec<u8>, bool) -> Action,
{
    fn packet(
        &mut self,
        direction: Direction,
        packet: &mut Vec<u8>,
        checksum_ready: bool,
    ) -> Action {
        self(direction, packet, checksum_ready)
    }
}

/// Where a queued packet was queued from, seen from the workload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// mangle OUTPUT: the workload sends it.
    Output,
    /// mangle INPUT: the workload receives it.
    Input,
    /// mangle INPUT, from the DNS answer queue: an answer on a flow the workload opened and
    /// its agent authorized, to learn from and accept.
    DnsAnswer,
    /// mangle FORWARD of the node's namespace: a packet the node routes (only the guard of
    /// workloads that require encryption queues there, see [`super::encrypted`]).
    Forward,
}

impl WorkloadQueue {
    /// The queue's socket, to watch it (readable: a packet waits), e.g. with
    /// [`super::busypoll::BusyPoll`].
    pub fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        use std::os::fd::AsFd;
        self.ready.get_ref().as_fd()
    }

    /// Wait for packets and hand each to `handler`; returns after one batch so the caller can
    /// interleave other work. Errors other than the counted socket overflows end the queue.
    ///
    /// A batch's drops are answered together: a dropped packet's verdict waits for the end of
    /// the batch, and one `NFQNL_MSG_VERDICT_BATCH` then drops every packet the queue still
    /// holds up to the last of them, which are the batch's drops: the packets accepted or
    /// requeued between them had their verdicts at once. A flood of denied packets costs one
    /// verdict message per read batch, not one per packet. Only while no packet of this queue is
    /// paused: the kernel's batch takes every packet it holds up to that id, and a paused packet
    /// is older than the drops read after it, which are answered one by one. Drops owed from
    /// before the pause stay owed: their batch stops short of it. A packet whose verdict could
    /// not be sent (ENOBUFS, counted) is held too, and the next batch drops it: it stays
    /// unanswered, fail-closed, either way.
    pub async fn serve_batch<H>(&mut self, handler: &mut H) -> Result<usize, ShellError>
    where
        H: Handler + ?Sized,
    {
        let mut readable = self.ready.readable().await.map_err(ShellError::Queue)?;
        let WorkloadQueue {
            queue,
            recv_errors,
            queue_num,
            dns_queue_num,
            paused,
            verdicts,
            ..
        } = self;
        let socket = readable.get_inner();
        // The id of the last of the drops whose verdict is owed, and how many they are.
        let mut owed: Option<(u32, u64)> = None;
        let pay = |owed: &mut Option<(u32, u64)>,
                   errors: &mut u64,
                   verdicts: &mut VerdictCounts|
         -> Result<(), ShellError> {
            if let Some((last, n)) = owed.take()
                && send_batch_drop(socket, *queue_num, last, errors)?
            {
                verdicts.messages += 1;
                verdicts.packets += n;
            }
            Ok(())
        };
        let mut handled = 0;
        while handled < BATCH {
            // try_io clears tokio's readiness when the receive would block.
            let mut msg = match readable.try_io(|_| queue.recv()) {
                Err(_would_block) => {
                    pay(&mut owed, recv_errors, verdicts)?;
                    return Ok(handled);
                }
                Ok(Ok(msg)) => msg,
                Ok(Err(e))
                    if matches!(
                        e.raw_os_error(),
                        Some(nix::libc::ENOBUFS | nix::libc::ENOSPC | nix::libc::EINTR)
                    ) =>
                {
                    *recv_errors += 1;
                    continue;
                }
                Ok(Err(e)) => {
                    // The queue ends; what was decided is still sent, if it can be.
                    let _ = pay(&mut owed, recv_errors, verdicts);
                    return Err(ShellError::Queue(e));
                }
            };
            handled += 1;
            let direction = match msg.get_hook() {
                NF_INET_LOCAL_IN if Some(msg.get_queue_num()) == *dns_queue_num => {
                    Some(Direction::DnsAnswer)
                }
                NF_INET_LOCAL_OUT => Some(Direction::Output),
                NF_INET_LOCAL_IN => Some(Direction::Input),
                NF_INET_FORWARD => Some(Direction::Forward),
                _ => None,
            };
            let action = match direction {
                Some(direction) => {
                    let mut packet = msg.get_payload().to_vec();
                    let action = handler.packet(direction, &mut packet, msg.is_checksum_ready());
                    if action.modified {
                        msg.set_payload(packet);
                    }
                    action
                }
                // Only our INPUT/OUTPUT/FORWARD rules queue here; anything else is not ours to
                // pass.
                None => Action::DROP,
            };
            if action.accept
                && action.requeue
                && action.pause
                && action.mark == 0
                && !action.modified
                && paused.len() < MAX_PAUSED
            {
                // Drops owed before it stay owed: they are older, and their batch stops short
                // of it.
                paused.push_back((Instant::now() + PAUSE, msg));
                handler.decided();
                continue;
            }
            if !action.accept && paused.is_empty() && msg.get_queue_num() == *queue_num {
                let n = owed.map_or(0, |(_, n)| n);
                owed = Some((msg.get_packet_id(), n + 1));
                handler.decided();
                continue;
            }
            let verdict = if !action.accept {
                nfq::Verdict::Drop
            } else if action.mark != 0 {
                msg.set_nfmark(msg.get_nfmark() | action.mark);
                nfq::Verdict::Repeat
            } else if action.requeue {
                nfq::Verdict::Repeat
            } else {
                nfq::Verdict::Accept
            };
            msg.set_verdict(verdict);
            if send_verdict(queue, msg, recv_errors)? {
                verdicts.messages += 1;
                verdicts.packets += 1;
            }
            handler.decided();
        }
        pay(&mut owed, recv_errors, verdicts)?;
        Ok(handled)
    }

    /// When the oldest paused packet's pause ends, if one is paused.
    pub fn pause_ends(&self) -> Option<Instant> {
        self.paused.front().map(|(end, _)| *end)
    }

    /// Sends every packet whose pause has ended back through the rules (a Repeat verdict: to
    /// the queue's tail, or on, if its flow was marked meanwhile); returns how many.
    pub fn release_paused(&mut self) -> Result<usize, ShellError> {
        if self.paused.is_empty() {
            return Ok(0);
        }
        let now = Instant::now();
        let mut released = 0;
        while self.paused.front().is_some_and(|(end, _)| *end <= now) {
            let Some((_, mut msg)) = self.paused.pop_front() else {
                break;
            };
            msg.set_verdict(nfq::Verdict::Repeat);
            if send_verdict(&mut self.queue, msg, &mut self.recv_errors)? {
                released += 1;
            }
        }
        Ok(released)
    }

    /// The kernel's counters for this queue (and its DNS answer queue, summed):
    /// (queue_dropped, user_dropped).
    pub fn kernel_drops(&mut self) -> Option<(u64, u64)> {
        self.kernel_stats()
            .map(|s| (s.queue_dropped, s.user_dropped))
    }

    /// Packets the kernel holds for this queue (and its DNS answer queue), waiting for a
    /// verdict: read, paused, or not read yet.
    pub fn held(&mut self) -> Option<u64> {
        self.kernel_stats().map(|s| s.held)
    }

    /// This queue's line of the kernel's statistics, plus its DNS answer queue's.
    fn kernel_stats(&mut self) -> Option<KernelQueueStats> {
        let file = self.stats.as_mut()?;
        file.rewind().ok()?;
        let mut text = String::new();
        file.read_to_string(&mut text).ok()?;
        let main = parse_queue_stats(&text, self.queue_num)?;
        let dns = self
            .dns_queue_num
            .and_then(|d| parse_queue_stats(&text, d))
            .unwrap_or_default();
        Some(KernelQueueStats {
            held: main.held + dns.held,
            queue_dropped: main.queue_dropped + dns.queue_dropped,
            user_dropped: main.user_dropped + dns.user_dropped,
        })
    }

    /// Unbind the queue (the kernel drops, or with `--queue-bypass` accepts, what it held),
    /// and the DNS answer queue.
    pub fn unbind(&mut self) -> Result<(), ShellError> {
        if let Some(d) = self.dns_queue_num {
            self.queue.unbind(d).map_err(ShellError::Queue)?;
        }
        self.queue.unbind(self.queue_num).map_err(ShellError::Queue)
    }
}

/// One queue's counters in `/proc/net/netfilter/nfnetlink_queue`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct KernelQueueStats {
    /// `queue_total`: packets waiting for a verdict.
    held: u64,
    /// Packets dropped because the queue was full.
    queue_dropped: u64,
    /// Packets dropped because the socket's buffer was full.
    user_dropped: u64,
}

/// `queue_number peer_portid queue_total copy_mode copy_range queue_dropped user_dropped id_sequence 1`
fn parse_queue_stats(text: &str, queue_num: u16) -> Option<KernelQueueStats> {
    text.lines().find_map(|line| {
        let cols: Vec<&str> = line.split_whitespace().collect();
        let col = |i: usize| cols.get(i)?.parse().ok();
        (cols.first()?.parse::<u16>().ok()? == queue_num).then(|| {
            Some(KernelQueueStats {
                held: col(2)?,
                queue_dropped: col(5)?,
                user_dropped: col(6)?,
            })
        })?
    })
}

/// Unix time in milliseconds (0 if the clock is before 1970).
pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Nanoseconds since `start`, saturating.
pub fn elapsed_ns(start: Instant) -> u64 {
    u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_drop_is_one_netlink_message_for_the_queue_up_to_the_id() {
        let m = batch_verdict_message(7, 0, 0x0102_0304);
        assert_eq!(m[0..4], 32u32.to_ne_bytes(), "length");
        // NFNL_SUBSYS_QUEUE (3) << 8 | NFQNL_MSG_VERDICT_BATCH (3), a request, no ack.
        assert_eq!(m[4..6], 0x0303u16.to_ne_bytes(), "type");
        assert_eq!(m[6..8], 1u16.to_ne_bytes(), "flags");
        assert_eq!(m[8..16], [0; 8], "sequence and port id");
        assert_eq!(m[16..20], [0, 0, 0, 7], "family, version, queue number");
        assert_eq!(m[20..22], 12u16.to_ne_bytes(), "attribute length");
        assert_eq!(m[22..24], 2u16.to_ne_bytes(), "NFQA_VERDICT_HDR");
        assert_eq!(m[24..32], [0, 0, 0, 0, 1, 2, 3, 4], "NF_DROP, up to id");
        assert_eq!(batch_verdict_message(0x1234, 1, 9)[16..32], {
            let mut tail = [0u8; 16];
            tail[2..4].copy_from_slice(&[0x12, 0x34]);
            tail[4..6].copy_from_slice(&12u16.to_ne_bytes());
            tail[6..8].copy_from_slice(&2u16.to_ne_bytes());
            tail[8..16].copy_from_slice(&[0, 0, 0, 1, 0, 0, 0, 9]);
            tail
        });
    }

    #[test]
    fn queue_overflow_counters_are_read_for_our_queue() {
        let text = "    3  4138     0 2 65531     1     0   12  1\n    7  4139     5 2 65535    42    17  900  1\n";
        assert_eq!(
            parse_queue_stats(text, 7),
            Some(KernelQueueStats {
                held: 5,
                queue_dropped: 42,
                user_dropped: 17
            })
        );
        assert_eq!(parse_queue_stats(text, 9), None);
        assert_eq!(parse_queue_stats("7 x", 7), None);
    }
}
