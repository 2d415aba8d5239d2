//! The kernel shell around the pure core: network namespaces, the fixed iptables rule set, and
//! NFQUEUE sockets driven by one tokio event loop; and the node-to-node tunnel's TUN device,
//! socket and routes ([`tunnel`]). Everything here does I/O; the decisions are the
//! [`Processor`](crate::Processor)'s (and the [`Tunnel`](crate::tunnel::Tunnel)'s).

use std::path::PathBuf;
use std::time::Instant;

use identity::rand_core::CryptoRng;

use crate::{Hook, Processor, WorkloadId};

pub mod busypoll;
pub mod conntrack;
pub mod encrypted;
pub mod inject;
pub mod netns;
pub mod queue;
pub mod rules;
pub mod tunnel;

pub use netns::Netns;
pub use queue::{Action, Direction, OpenedQueue, QueueConfig, WorkloadQueue};
pub use rules::{Installed, RuleConfig};
pub use tunnel::{NodeRoutes, TunnelConfig, TunnelHandle, TunnelStatsReader};

/// A workload's sockets and rules, as [`start_workload`] made them.
pub struct StartedWorkload {
    /// The raw sockets for the agent's own datagrams.
    pub injector: inject::Injector,
    /// The queue, listening before the rules send anything to it.
    pub queue: OpenedQueue,
    /// What the rules' installation found and did.
    pub installed: Installed,
    /// How long the sockets took to open.
    pub sockets: std::time::Duration,
    /// How long the rules took.
    pub rules: std::time::Duration,
}

/// Everything a new workload needs in its namespace, from one thread inside it: the raw
/// sockets ([`inject::Injector::open_here`]), the queue ([`queue::open`]), then the rules
/// ([`rules::install`]). One entry into the namespace instead of three: on a container's start
/// path, under load, every hand-off between threads waits for a CPU.
pub fn start_workload(
    ns: &Netns,
    auth_mark: u32,
    queue: QueueConfig,
    rules: RuleConfig,
) -> Result<StartedWorkload, ShellError> {
    let path = ns.path().display().to_string();
    ns.run(move || {
        let begun = std::time::Instant::now();
        let injector = inject::Injector::open_here(auth_mark)?;
        let queue = queue::open_here(queue)?;
        let sockets = begun.elapsed();
        let begun = std::time::Instant::now();
        let installed = rules::install_here(&rules)?;
        Ok(StartedWorkload {
            injector,
            queue,
            installed,
            sockets,
            rules: begun.elapsed(),
        })
    })?
    .map_err(|e| rules::in_netns(e, &path))
}

/// Errors of the shell; each names what it was doing.
#[derive(Debug, thiserror::Error)]
pub enum ShellError {
    /// The namespace could not be opened or entered.
    #[error("network namespace {path}: {source}")]
    Netns {
        /// The namespace path.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// A helper thread could not be spawned or panicked.
    #[error("netns thread: {0}")]
    Thread(std::io::Error),
    /// An external command could not be started.
    #[error("running {command}: {source}")]
    Spawn {
        /// The command line.
        command: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// An external command failed.
    #[error("{command} failed (exit {status:?}): {stderr}")]
    Command {
        /// The command line.
        command: String,
        /// Its exit code.
        status: Option<i32>,
        /// What it printed on stderr.
        stderr: String,
    },
    /// Reading /proc failed.
    #[error("/proc: {0}")]
    Proc(std::io::Error),
    /// A queue socket operation failed.
    #[error("nfqueue: {0}")]
    Queue(std::io::Error),
    /// The raw sockets the agent sends its own datagrams with could not be opened.
    #[error(
        "opening a raw socket (the agent needs CAP_NET_RAW for its UDP control datagrams): {0}"
    )]
    RawOpen(std::io::Error),
    /// Sending through a raw socket failed.
    #[error("raw socket: {0}")]
    Raw(std::io::Error),
    /// The queue's socket could not be told apart from other new file descriptors.
    #[error(
        "nfqueue: could not identify the queue's netlink socket among new file descriptors ({0})"
    )]
    QueueFd(String),
    /// The kernel refused the bind (EBUSY/EPERM): another process holds the queue in this
    /// namespace, or we lack CAP_NET_ADMIN.
    #[error(
        "nfqueue {0}: bind refused: another process (agent?) holds this queue in the namespace, or we lack CAP_NET_ADMIN"
    )]
    QueueBusy(u16),
    /// The tunnel's peer set was refused (nothing changed).
    #[error("tunnel peers: {0}")]
    TunnelPeers(#[from] crate::tunnel::ConfigError),
    /// The tunnel's TUN device could not be made or configured.
    #[error(
        "TUN device {name}: {source} (needs CAP_NET_ADMIN and /dev/net/tun; is a device of that name already there?)"
    )]
    TunDevice {
        /// The device name.
        name: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// The tunnel's UDP socket could not be opened.
    #[error("tunnel UDP socket {addr}: {source}")]
    TunnelSocket {
        /// The address it was to be bound to.
        addr: std::net::SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// The tunnel's loop stopped on an I/O error.
    #[error("tunnel: {what}: {source}")]
    TunnelIo {
        /// What it was doing.
        what: &'static str,
        /// The OS error.
        source: std::io::Error,
    },
    /// The tunnel's routing table already holds routes (another tunnel or program uses it).
    #[error(
        "tunnel: routing table {table} already has routes (another tunnel or program uses it; choose another table): {routes}"
    )]
    TunnelTableInUse {
        /// The table.
        table: String,
        /// What `ip route show table` listed.
        routes: String,
    },
    /// A blocked prefix (routed into the tunnel for no peer) holds a peer's endpoint: the
    /// tunnel's own datagrams to it would be routed into the device.
    #[error(
        "tunnel: blocked prefix {prefix} holds the endpoint {endpoint} of peer {peer} (a routing loop)"
    )]
    TunnelBlockedEndpoint {
        /// The blocked prefix.
        prefix: ipnet::IpNet,
        /// The peer.
        peer: String,
        /// Its endpoint.
        endpoint: std::net::SocketAddr,
    },
    /// The tunnel's thread is no longer running (shut down, or stopped on an error).
    #[error("the tunnel has stopped")]
    TunnelStopped,
}

/// How the queue reader decides.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Full enforcement through the [`Processor`].
    Enforce,
    /// Debug/benchmark: accept everything without tokens, marking a flow authorized at its first
    /// packet without SYN flag, so the same packets reach userspace as under enforcement.
    AcceptAll,
}

/// Decide on one queued packet of workload `id`: run the processor (timed into its decision
/// histogram) or, in [`Mode::AcceptAll`], accept.
pub fn decide<R: CryptoRng + ?Sized>(
    processor: &mut Processor,
    mode: Mode,
    id: WorkloadId,
    direction: Direction,
    packet: &mut Vec<u8>,
    checksum_ready: bool,
    rng: &mut R,
) -> Action {
    let auth_mark = processor.config().auth_mark;
    let start = Instant::now();
    let action = match mode {
        // Workload rules never queue from FORWARD (only the node's encryption guard does, to a
        // queue of its own): nothing to pass.
        _ if direction == Direction::Forward => Action::DROP,
        // A DNS answer on an authorized flow: accepted as the connmark bypass would have (no
        // mark: the flow has it).
        Mode::AcceptAll if direction == Direction::DnsAnswer => Action::ACCEPT,
        Mode::AcceptAll => Action {
            // Every flow is marked at its first packet that is not a TCP SYN (for a SYN the
            // connection does not exist yet): non-TCP flows at their first packet.
            mark: if tcp_flags(packet).is_none_or(|f| f & TCP_SYN == 0) {
                auth_mark
            } else {
                0
            },
            ..Action::ACCEPT
        },
        Mode::Enforce => {
            let now = queue::unix_ms();
            let verdict = match direction {
                Direction::Output => {
                    processor.process(id, Hook::Output, packet, checksum_ready, now, rng)
                }
                Direction::Input => {
                    processor.process(id, Hook::Input, packet, checksum_ready, now, rng)
                }
                // Learnt from, then accepted as the connmark bypass would have.
                Direction::DnsAnswer => processor.learn_dns_answer(id, packet, now),
                // Answered above; a drop all the same.
                Direction::Forward => crate::Verdict::drop(crate::Reason::UnknownWorkload),
            };
            // A consumed control datagram that settles its flow's connmark: repeated through the
            // rules with the control bit, which copy its AUTH bit into the connmark and drop it
            // (INPUT only: on OUTPUT the control bit lets our own datagrams leave).
            let settle = verdict
                .connmark_on_drop
                .filter(|_| !verdict.accept && direction == Direction::Input);
            Action {
                accept: verdict.accept || settle.is_some(),
                modified: verdict.modified,
                mark: match settle {
                    Some(true) => crate::control_mark(auth_mark) | auth_mark,
                    Some(false) => crate::control_mark(auth_mark),
                    None if !verdict.accept => 0,
                    None if verdict.mark_authorized => auth_mark,
                    None if verdict.unmark => crate::reauth_mark(auth_mark),
                    None => 0,
                },
                requeue: verdict.accept && verdict.requeue,
                pause: verdict.accept && verdict.requeue && verdict.pause,
            }
        }
    };
    processor
        .metrics_mut()
        .record_decision_time(queue::elapsed_ns(start));
    action
}

const TCP_SYN: u8 = 0x02;

/// The TCP flags byte of an IPv4 or IPv6 packet (IPv6 without extension headers), if TCP.
fn tcp_flags(packet: &[u8]) -> Option<u8> {
    let version = packet.first()? >> 4;
    let (proto, offset) = match version {
        4 => (*packet.get(9)?, usize::from(packet.first()? & 0x0f) * 4),
        6 => (*packet.get(6)?, 40),
        _ => return None,
    };
    if proto != 6 {
        return None;
    }
    packet.get(offset + 13).copied()
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn v4_tcp(flags: u8) -> Vec<u8> {
        let mut p = vec![0u8; 40];
        p[0] = 0x45;
        p[9] = 6;
        p[20 + 13] = flags;
        p
    }

    fn processor() -> Processor {
        let psk = identity::Psk::new(b"0123456789abcdef0123456789abcdef-shell-test").unwrap();
        let node = identity::Node::new_psk("node-a", psk, identity::Config::default()).unwrap();
        Processor::new(
            node,
            policy::Engine::new(),
            crate::ProcessorConfig::default(),
        )
    }

    #[test]
    fn accept_all_marks_a_flow_at_its_first_packet_without_syn() {
        let mut p = processor();
        let mut rng = identity::testing::SeededRng::new(b"shell");
        let auth = p.config().auth_mark;
        for (flags, mark) in [(0x02, 0), (0x12, 0), (0x10, auth), (0x18, auth)] {
            let mut pkt = v4_tcp(flags);
            let a = decide(
                &mut p,
                Mode::AcceptAll,
                WorkloadId(9),
                Direction::Input,
                &mut pkt,
                false,
                &mut rng,
            );
            assert_eq!(
                a,
                Action {
                    mark,
                    ..Action::ACCEPT
                },
                "flags {flags:#x}"
            );
        }
        assert_eq!(p.metrics().decision_count(), 4);
    }

    #[test]
    fn enforcement_drops_packets_of_unknown_workloads_and_times_them() {
        let mut p = processor();
        let mut rng = identity::testing::SeededRng::new(b"shell");
        let mut pkt = v4_tcp(0x02);
        let a = decide(
            &mut p,
            Mode::Enforce,
            WorkloadId(1),
            Direction::Output,
            &mut pkt,
            false,
            &mut rng,
        );
        assert!(!a.accept);
        assert_eq!(a.mark, 0);
        assert_eq!(p.metrics().decision_count(), 1);
    }

    #[test]
    fn dns_answers_are_accepted_unmarked_in_both_modes() {
        let mut p = processor();
        let mut rng = identity::testing::SeededRng::new(b"shell");
        let mut udp = v4_tcp(0);
        udp[9] = 17;
        for mode in [Mode::Enforce, Mode::AcceptAll] {
            // Even for a workload the processor does not know, and a packet that is no answer.
            let a = decide(
                &mut p,
                mode,
                WorkloadId(1),
                Direction::DnsAnswer,
                &mut udp,
                false,
                &mut rng,
            );
            assert_eq!(a, Action::ACCEPT, "{mode:?}");
        }
        assert_eq!(p.metrics().dns_answers("unknown_workload"), 1);
        assert_eq!(p.metrics().rejected_total(), 0);
        assert_eq!(p.metrics().decision_count(), 2);
    }

    #[test]
    fn tcp_flags_are_read_for_v4_and_v6() {
        assert_eq!(tcp_flags(&v4_tcp(0x12)), Some(0x12));
        let mut v6 = vec![0u8; 60];
        v6[0] = 0x60;
        v6[6] = 6;
        v6[40 + 13] = 0x10;
        assert_eq!(tcp_flags(&v6), Some(0x10));
        let mut udp = v4_tcp(0);
        udp[9] = 17;
        assert_eq!(tcp_flags(&udp), None);
        assert_eq!(tcp_flags(&[0x45, 0, 0]), None);
        assert_eq!(tcp_flags(&[]), None);
    }
}
