#![allow(clippy::unwrap_used, clippy::expect_used)]
//! `shell::rules::install` on the real kernel, below the agent: a fresh namespace gets the rule
//! set in one transaction per family, a second install changes nothing (one jump each, the same
//! rules), a namespace with one family's rules already in place is completed, and connections
//! established before the first install keep working under fail-closed rules with no queue
//! reader, while new ones are held. Needs root (tests/run.sh runs it); without root it prints a
//! SKIP line, and fails under CI=true.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::Command;
use std::time::Duration;

use datapath::shell::rules::{self, CHAIN_INPUT, CHAIN_OUTPUT, RuleConfig};

mod kernel;

use kernel::{netns, privileged, run};

/// A workload namespace (10.198.`tag`.2, fd00:198:`tag`::2) and a peer namespace (.1, ::1)
/// joined by a veth, removed on drop.
struct Pair {
    ns: kernel::Pair,
    tag: u8,
}

impl Pair {
    /// `tag`: one digit telling the tests of one process apart (also the subnet's third byte).
    fn new(tag: u8) -> Pair {
        let ns = kernel::Pair::new(
            "trul",
            tag,
            &[
                &format!("10.198.{tag}.2/24"),
                &format!("fd00:198:{tag}::2/64"),
            ],
            &[
                &format!("10.198.{tag}.1/24"),
                &format!("fd00:198:{tag}::1/64"),
            ],
        );
        Pair { ns, tag }
    }

    fn workload(&self) -> &str {
        &self.ns.a
    }

    fn peer(&self) -> &str {
        &self.ns.b
    }

    fn addr(&self, host: u8, v6: bool, port: u16) -> SocketAddr {
        let tag = self.tag;
        let s = if v6 {
            format!("[fd00:198:{tag}::{host}]:{port}")
        } else {
            format!("10.198.{tag}.{host}:{port}")
        };
        s.parse().unwrap()
    }

    /// `iptables-save -t mangle` (or `ip6tables-save`) of the workload, comments and counters
    /// left out.
    fn mangle(&self, save: &str) -> Vec<String> {
        run(&["ip", "netns", "exec", self.workload(), save, "-t", "mangle"])
            .lines()
            .filter(|l| !l.starts_with('#'))
            .map(|l| match l.split_once(" [") {
                Some((chain, _)) if l.starts_with(':') => chain.to_owned(),
                _ => l.to_owned(),
            })
            .collect()
    }

    /// How many times each of our two jumps is in the workload's `save` dump.
    fn jumps(&self, save: &str) -> (usize, usize) {
        let dump = self.mangle(save);
        let count = |rule: String| dump.iter().filter(|l| **l == rule).count();
        (
            count(format!("-A OUTPUT -j {CHAIN_OUTPUT}")),
            count(format!("-A INPUT -j {CHAIN_INPUT}")),
        )
    }
}

/// A listener bound inside `ns`.
fn listen(ns: &str, addr: SocketAddr) -> TcpListener {
    netns(ns)
        .run(move || TcpListener::bind(addr))
        .unwrap()
        .unwrap()
}

/// A connection opened from inside `ns`.
fn connect(ns: &str, addr: SocketAddr, timeout: Duration) -> std::io::Result<TcpStream> {
    netns(ns)
        .run(move || TcpStream::connect_timeout(&addr, timeout))
        .unwrap()
}

/// Each side writes, the other reads it back, within 3 s.
fn exchange(a: &mut TcpStream, b: &mut TcpStream, what: &str) {
    send(a, b, b"ping", what);
    send(b, a, b"pong", what);
}

fn send(from: &mut TcpStream, to: &mut TcpStream, msg: &[u8; 4], what: &str) {
    to.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    from.write_all(msg).unwrap();
    let mut got = [0u8; 4];
    to.read_exact(&mut got)
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    assert_eq!(&got, msg, "{what}");
}

#[test]
fn netns_rules_a_fresh_install_is_one_transaction_and_a_second_changes_nothing() {
    if !privileged("netns_rules_a_fresh_install_is_one_transaction_and_a_second_changes_nothing") {
        return;
    }
    let p = Pair::new(1);
    let ns = netns(p.workload());
    let cfg = RuleConfig::default();
    let first = rules::install(&ns, &cfg).unwrap();
    assert!(!first.reapplied, "{first:?}");
    assert_eq!(first.grandfathered, 0);
    let (v4, v6) = (p.mangle("iptables-save"), p.mangle("ip6tables-save"));
    for save in ["iptables-save", "ip6tables-save"] {
        assert_eq!(p.jumps(save), (1, 1), "{save}: {:?}", p.mangle(save));
    }
    assert!(v4.contains(&format!(":{CHAIN_OUTPUT} -")), "{v4:?}");
    assert!(v6.iter().any(|l| l.contains("ipv6-icmp")), "{v6:?}");

    // An agent restart: the same rules, no jump twice.
    let second = rules::install(&ns, &cfg).unwrap();
    assert!(second.reapplied, "{second:?}");
    assert_eq!(p.mangle("iptables-save"), v4);
    assert_eq!(p.mangle("ip6tables-save"), v6);

    // Only IPv4 still holds our rules (IPv6's removed by hand): the install completes IPv6 and
    // leaves IPv4 as it was.
    let ip6 = |args: &[&str]| {
        let mut all = vec![
            "ip",
            "netns",
            "exec",
            p.workload(),
            "ip6tables",
            "-t",
            "mangle",
        ];
        all.extend_from_slice(args);
        run(&all);
    };
    ip6(&["-D", "OUTPUT", "-j", CHAIN_OUTPUT]);
    ip6(&["-D", "INPUT", "-j", CHAIN_INPUT]);
    for chain in [CHAIN_OUTPUT, CHAIN_INPUT] {
        ip6(&["-F", chain]);
        ip6(&["-X", chain]);
    }
    assert_eq!(p.jumps("ip6tables-save"), (0, 0));
    let third = rules::install(&ns, &cfg).unwrap();
    assert!(third.reapplied, "IPv4 held our rules: {third:?}");
    assert_eq!(p.mangle("iptables-save"), v4);
    assert_eq!(p.mangle("ip6tables-save"), v6);

    rules::remove(&ns).unwrap();
    for save in ["iptables-save", "ip6tables-save"] {
        assert_eq!(p.jumps(save), (0, 0), "{save}");
    }
}

#[test]
fn netns_rules_connections_established_before_the_first_install_keep_working() {
    if !privileged("netns_rules_connections_established_before_the_first_install_keep_working") {
        return;
    }
    let p = Pair::new(2);
    let t = Duration::from_secs(3);
    // The workload opens a connection over IPv4 and one over IPv6 to the peer, and accepts one.
    let peer_v4 = listen(p.peer(), p.addr(1, false, 7001));
    let peer_v6 = listen(p.peer(), p.addr(1, true, 7002));
    let own = listen(p.workload(), p.addr(2, false, 7003));
    let mut out_v4 = connect(p.workload(), p.addr(1, false, 7001), t).unwrap();
    let (mut out_v4_peer, _) = peer_v4.accept().unwrap();
    let mut out_v6 = connect(p.workload(), p.addr(1, true, 7002), t).unwrap();
    let (mut out_v6_peer, _) = peer_v6.accept().unwrap();
    let mut inbound_peer = connect(p.peer(), p.addr(2, false, 7003), t).unwrap();
    let (mut inbound, _) = own.accept().unwrap();

    // Fail-closed rules and nobody reading the queue: whatever is not authorized is dropped.
    let ns = netns(p.workload());
    let installed = rules::install(&ns, &RuleConfig::default()).unwrap();
    assert!(!installed.reapplied, "{installed:?}");
    assert_eq!(installed.grandfathered, 3, "{installed:?}");

    exchange(
        &mut out_v4,
        &mut out_v4_peer,
        "IPv4, opened by the workload",
    );
    exchange(
        &mut out_v6,
        &mut out_v6_peer,
        "IPv6, opened by the workload",
    );
    exchange(&mut inbound, &mut inbound_peer, "IPv4, opened by the peer");

    // New connections, either way, wait for a verdict that never comes.
    let short = Duration::from_millis(700);
    assert!(connect(p.workload(), p.addr(1, false, 7001), short).is_err());
    assert!(connect(p.peer(), p.addr(2, false, 7003), short).is_err());
    rules::remove(&ns).unwrap();
}

/// A namespace with a veth pair of its own (10.197.`i`.1/24 on one end), removed on drop.
struct Lone(String);

impl Lone {
    fn new(i: u8) -> Lone {
        let name = format!("trul-q{}-{i}", std::process::id() % 100_000);
        run(&["ip", "netns", "add", &name]);
        let ns = Lone(name);
        let n = &ns.0;
        run(&[
            "ip", "-n", n, "link", "add", "v0", "type", "veth", "peer", "name", "v1",
        ]);
        let addr = format!("10.197.{i}.1/24");
        run(&["ip", "-n", n, "addr", "add", &addr, "dev", "v0"]);
        run(&["ip", "-n", n, "link", "set", "v0", "up"]);
        run(&["ip", "-n", n, "link", "set", "v1", "up"]);
        ns
    }
}

impl Drop for Lone {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// Queues opened side by side while other threads open and close fds (so fd numbers are
/// reused between an opener's listings) each get their own socket: the packet a namespace
/// queues is read from that namespace's queue, woken by its own socket's readiness.
#[test]
fn netns_rules_queues_opened_side_by_side_under_fd_churn_each_read_their_own_namespace() {
    if !privileged(
        "netns_rules_queues_opened_side_by_side_under_fd_churn_each_read_their_own_namespace",
    ) {
        return;
    }
    use datapath::shell::QueueConfig;
    use datapath::shell::queue::{self, Action, Direction};
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    const N: u8 = 6;
    let spaces: Vec<Lone> = (0..N).map(Lone::new).collect();
    let stop = Arc::new(AtomicBool::new(false));
    let churn: Vec<_> = (0..2)
        .map(|_| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let files: Vec<_> = (0..16)
                        .filter_map(|_| std::fs::File::open("/proc/self/stat").ok())
                        .collect();
                    drop(files);
                }
            })
        })
        .collect();
    let opened: Vec<_> = spaces
        .iter()
        .map(|s| {
            let ns = netns(&s.0);
            std::thread::spawn(move || {
                rules::install(&ns, &RuleConfig::default()).unwrap();
                queue::open(&ns, QueueConfig::default()).unwrap()
            })
        })
        .collect::<Vec<_>>()
        .into_iter()
        .map(|h| h.join().unwrap())
        .collect();
    stop.store(true, Ordering::Relaxed);
    for c in churn {
        c.join().unwrap();
    }

    let rt = kernel::event_loop();
    for (i, opened) in opened.into_iter().enumerate() {
        let ns = netns(&spaces[i].0);
        let dst: SocketAddr = format!("10.197.{i}.2:9").parse().unwrap();
        rt.block_on(async {
            let mut q = opened.attach().unwrap();
            ns.run(move || {
                let s = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
                s.send_to(b"which queue", dst).unwrap();
            })
            .unwrap();
            let mut seen = Vec::new();
            let mut read = |_: Direction, packet: &mut Vec<u8>, _| {
                seen.push(packet.clone());
                Action::DROP
            };
            let batch = q.serve_batch(&mut read);
            let got = tokio::time::timeout(Duration::from_secs(5), batch).await;
            assert!(
                matches!(got, Ok(Ok(n)) if n >= 1),
                "namespace {i}: its queue was not woken: {got:?}"
            );
            // The IPv4 destination of what was read: this namespace's.
            assert!(
                seen.iter()
                    .all(|p| p.get(16..20) == Some(&[10, 197, i as u8, 2][..])),
                "namespace {i} read another's packet"
            );
            q.unbind().unwrap();
        });
        rules::remove(&ns).unwrap();
    }
}

/// The drops of one read share one verdict message, and it drops them and nothing else: 30
/// denied datagrams around 2 allowed ones take 3 messages, leave nothing held in the kernel's
/// queue (its own count, `queue_total`), and the allowed ones arrive. A packet paused for an
/// answer is older than the drops read after it, and a batch would take it too: it survives
/// them, goes back through the rules and arrives.
#[test]
fn netns_rules_a_reads_drops_take_one_verdict_and_spare_a_paused_packet() {
    if !privileged("netns_rules_a_reads_drops_take_one_verdict_and_spare_a_paused_packet") {
        return;
    }
    use datapath::shell::QueueConfig;
    use datapath::shell::queue::{self, Action, Direction, PAUSE};
    use std::net::UdpSocket;

    let pair = Pair::new(5);
    let ns = netns(pair.workload());
    rules::install(&ns, &RuleConfig::default()).unwrap();
    let opened = queue::open(&ns, QueueConfig::default()).unwrap();
    let to = pair.addr(2, false, 7000);
    let receiver = ns
        .run(move || {
            let s = UdpSocket::bind(to).unwrap();
            s.set_read_timeout(Some(Duration::from_millis(300)))
                .unwrap();
            s
        })
        .unwrap();
    // Each datagram from a socket of its own: a new flow, queued at the workload's INPUT.
    let peer = netns(pair.peer());
    let send = |payloads: Vec<&'static [u8]>| {
        peer.run(move || {
            for p in payloads {
                UdpSocket::bind("0.0.0.0:0")
                    .unwrap()
                    .send_to(p, to)
                    .unwrap();
            }
        })
        .unwrap()
    };
    let received = || {
        let mut got = Vec::new();
        let mut buf = [0u8; 64];
        while let Ok(n) = receiver.recv(&mut buf) {
            got.push(buf[..n].to_vec());
        }
        got
    };
    let mut paused_once = false;
    let mut decide = |_: Direction, packet: &mut Vec<u8>, _: bool| {
        if packet.ends_with(b"pass") {
            Action::ACCEPT
        } else if packet.ends_with(b"pause") && !paused_once {
            paused_once = true;
            Action {
                requeue: true,
                pause: true,
                ..Action::ACCEPT
            }
        } else if packet.ends_with(b"pause") {
            Action::ACCEPT
        } else {
            Action::DROP
        }
    };
    let rt = kernel::event_loop();
    rt.block_on(async {
        let mut q = opened.attach().unwrap();
        // Serve until `n` packets were handled (5 s at most).
        async fn serve(
            q: &mut queue::WorkloadQueue,
            decide: &mut impl FnMut(Direction, &mut Vec<u8>, bool) -> Action,
            n: usize,
        ) {
            let mut handled = 0;
            while handled < n {
                let got = tokio::time::timeout(Duration::from_secs(5), q.serve_batch(decide)).await;
                match got {
                    Ok(Ok(k)) => handled += k,
                    other => panic!("after {handled} of {n} packets: {other:?}"),
                }
            }
            assert_eq!(handled, n, "more packets queued than sent");
        }

        let mut burst: Vec<&'static [u8]> = vec![b"drop"; 10];
        burst.push(b"pass");
        burst.extend([b"drop" as &[u8]; 10]);
        burst.push(b"pass");
        burst.extend([b"drop" as &[u8]; 10]);
        send(burst);
        // All in the queue before the first read (a busy host may deliver them late), so that
        // one read finds them all: the message count below is then exact.
        let begin = std::time::Instant::now();
        while q.held().unwrap() < 32 {
            assert!(
                begin.elapsed() < Duration::from_secs(5),
                "32 datagrams never queued"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        serve(&mut q, &mut decide, 32).await;
        assert_eq!(
            received(),
            vec![b"pass".to_vec(); 2],
            "the allowed datagrams"
        );
        assert_eq!(q.held().unwrap(), 0, "held after the drops");
        let v = q.verdicts;
        assert_eq!(v.packets, 32, "every packet answered: {v:?}");
        // The two accepts, and one message for the 30 drops.
        assert_eq!(v.messages, 3, "the drops share a message: {v:?}");

        // Paused, then five drops read while it waits: they are answered one by one.
        let mut burst: Vec<&'static [u8]> = vec![b"pause"];
        burst.extend([b"drop" as &[u8]; 5]);
        send(burst);
        serve(&mut q, &mut decide, 6).await;
        assert_eq!(q.held().unwrap(), 1, "the paused datagram");
        tokio::time::sleep(PAUSE * 2).await;
        assert_eq!(q.release_paused().unwrap(), 1);
        // Through the rules again: queued again (nothing marked its flow), and accepted.
        serve(&mut q, &mut decide, 1).await;
        assert_eq!(received(), vec![b"pause".to_vec()], "the paused datagram");
        assert_eq!(q.held().unwrap(), 0, "held at the end");
        q.unbind().unwrap();
    });
    rules::remove(&ns).unwrap();
}
