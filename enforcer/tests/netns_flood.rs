//! Floods that fill a node's handshake table do not lock the node out, on the real kernel.
//!
//! The agent's handshake table is shared by every workload of the node. Two floods fill it
//! several times over, and while they do, a backend of the same node still connects to a
//! database of the same node, with the labels proven, as often as it tries; nothing is refused
//! as `flow_table_full`:
//! - from the network: a workload whose port is open to every address (a public frontend)
//!   takes untokened SYNs with spoofed sources. Ingress admits each one, so each one opens a
//!   server-side flow; the agent evicts the flood's older flows instead of refusing new ones.
//! - from inside: the frontend, compromised, sends SYNs to addresses that never answer. Each
//!   one is a client flow of its own, which is not the network's to evict; the agent evicts the
//!   older half of the flows of the workload that holds the most, the frontend's.
//!
//! A flood that ingress denies holds no state; the packets of each read are dropped with one
//! verdict message, and the backend keeps connecting under it.
//!
//! Needs root (tests/run.sh runs it in CI); without root it prints a SKIP line locally and
//! fails under CI=true.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::{IpAddr, Ipv4Addr, SocketAddrV4};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use testbed::flood::{Flooder, Kind, Sent};
use testbed::{AgentConfig, Mode, Testbed, WorkloadSpec, echo_once};

const TESSERA: &str = env!("CARGO_BIN_EXE_tessera");

/// Default deny for ingress; the database accepts backends on 5432; the frontend accepts
/// anyone at all on 80.
const POLICIES: &str = "apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: default-deny-ingress, namespace: shop}
spec:
  podSelector: {}
  policyTypes: [Ingress]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: database, namespace: shop}
spec:
  podSelector: {matchLabels: {role: Database}}
  ingress:
  - from: [{podSelector: {matchLabels: {role: BusinessBackend}}}]
    ports: [{port: 5432}, {protocol: UDP, port: 5432}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: public-frontend, namespace: shop}
spec:
  podSelector: {matchLabels: {role: WebFrontend}}
  ingress:
  - from: [{ipBlock: {cidr: 0.0.0.0/0}}]
    ports: [{port: 80}]
";

/// The handshake table's bound (`ProcessorConfig::max_flows`' default).
const MAX_FLOWS: f64 = 65_536.0;
/// SYNs per second. Each flow the flood opens stays 10 s (the authorized linger after the
/// kernel's SYN-ACK) or 30 s (the handshake timeout): anything above 6,554/s fills the table.
/// The same rate from the frontend itself: its flows stay 30 s (nothing answers).
const FLOOD_PPS: f64 = 20_000.0;

fn metric(tb: &Testbed, name: &str) -> f64 {
    tb.agent(2).metrics().sum(name)
}

fn refused(tb: &Testbed, reason: &str) -> f64 {
    tb.agent(2).metrics().sum_with_label("reason", reason) + 0.0
}

/// Handshake flows node 2's agent evicted, of `whose` ("network" or "workload").
fn evicted(tb: &Testbed, whose: &str) -> f64 {
    tb.agent(2)
        .metrics()
        .sum_of("tessera_handshake_flows_evicted_total", "whose", whose)
}

/// Flows in node 2's larger handshake table, TCP or UDP.
fn largest_table(tb: &Testbed) -> f64 {
    let m = tb.agent(2).metrics();
    let of = |protocol| m.sum_of("tessera_handshake_flows", "protocol", protocol);
    of("tcp").max(of("udp"))
}

/// The flooder's netns, attached to node 2.
fn flooder(tb: &Testbed) -> Flooder {
    Flooder::attach(&tb.nodes[1], &format!("ts-{}-flooder", tb.id)).expect("flooder netns")
}

/// `workload`'s IPv4 address and `port`.
fn v4(tb: &Testbed, workload: &str, port: u16) -> SocketAddrV4 {
    let IpAddr::V4(ip) = tb.workload(workload).addr(port).ip() else {
        panic!("the testbed's workloads have IPv4 addresses");
    };
    SocketAddrV4::new(ip, port)
}

/// Node 2 with a public frontend, a backend and a database, and its agent (PSK).
fn testbed(dir: &Path) -> Testbed {
    std::fs::write(dir.join("policies.yaml"), POLICIES).unwrap();
    Testbed::builder()
        .policies(dir)
        .workload(WorkloadSpec::new("frontend-2", 2, "WebFrontend").port(Some("http"), 80))
        .workload(WorkloadSpec::new("backend-2", 2, "BusinessBackend"))
        .workload(WorkloadSpec::new("database-2", 2, "Database").port(Some("postgres"), 5432))
        .agents(AgentConfig::new(Path::new(TESSERA), Mode::Psk))
        .build()
}

fn connect(tb: &Testbed, timeout: Duration) -> std::io::Result<()> {
    let mut s = tb.connect("backend-2", "database-2", 5432, timeout)?;
    echo_once(&mut s, 7)
}

/// The floods take the machine's CPUs: one at a time (the harness runs a file's tests in
/// parallel).
static ONE_FLOOD_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Runs the flood that `start` starts for 9 s: once it has filled the table (or made it evict),
/// backend-2 connects to database-2 every 300 ms. Then checks that every connection
/// succeeded, that nothing was refused as `flow_table_full`, that the flood outnumbered the
/// table and made it evict flows `whose` they were ("network" or "workload"), and that the
/// table held to its bound.
fn connects_under(
    tb: &Testbed,
    whose: &str,
    start: impl FnOnce(Arc<AtomicBool>) -> std::thread::JoinHandle<std::io::Result<Sent>>,
) {
    let probe = |tb: &Testbed| connect(tb, Duration::from_secs(3));
    probes_under(tb, whose, Duration::from_secs(9), probe, start);
}

/// [`connects_under`] with `probe` for the connection, the flood lasting `lasting`.
fn probes_under(
    tb: &Testbed,
    whose: &str,
    lasting: Duration,
    probe: impl Fn(&Testbed) -> std::io::Result<()>,
    start: impl FnOnce(Arc<AtomicBool>) -> std::thread::JoinHandle<std::io::Result<Sent>>,
) {
    let _alone = ONE_FLOOD_AT_A_TIME
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    probe(tb).expect("backend-2 -> database-2 before the flood");
    let stop = Arc::new(AtomicBool::new(false));
    let sender = start(stop.clone());
    // Until the flood has filled the table once over, then on while it goes on.
    let begin = Instant::now();
    let (mut tries, mut failures) = (0, Vec::new());
    if std::env::var("DEBUG_FLOOD").is_ok() {
        std::thread::sleep(Duration::from_secs(20));
    }
    while begin.elapsed() < lasting {
        let full = largest_table(tb) >= MAX_FLOWS * 0.9
            || metric(tb, "tessera_handshake_flows_evicted_total") > 0.0;
        if full {
            tries += 1;
            if let Err(e) = probe(tb) {
                failures.push(format!("{:.1} s: {e}", begin.elapsed().as_secs_f64()));
            }
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    stop.store(true, Ordering::SeqCst);
    let sent = sender.join().expect("flood thread").expect("flood sender");

    let theirs = evicted(tb, whose);
    let all_evicted = metric(tb, "tessera_handshake_flows_evicted_total");
    let table_full = refused(tb, "flow_table_full");
    let flows = largest_table(tb);
    // Read by the agent every second from the kernel: a probe lost at a full queue is a flood
    // beyond the agent's capacity, not a table that locked the node out.
    let queue_drops = metric(tb, "tessera_workload_queue_dropped_total");
    let rejected = tb
        .agent(2)
        .get("/metrics")
        .unwrap_or_default()
        .lines()
        .filter(|l| l.starts_with("tessera_packets_rejected_total"))
        .collect::<Vec<_>>()
        .join(", ");
    let report = format!(
        "flood: {} packets at {:.0}/s; connections under it: {tries} tried, failed: {failures:?}; \
         evicted {all_evicted} ({theirs} {whose}), refused as flow_table_full {table_full}, \
         flows held {flows}; dropped at a full queue {queue_drops}; rejected: {rejected}\n{}",
        sent.packets,
        sent.rate(),
        tb.agent_logs()
    );
    eprintln!("{}", report.lines().next().unwrap_or_default());
    assert!(
        failures.is_empty(),
        "a workload of the flooded node could not connect: {report}"
    );
    assert_eq!(table_full, 0.0, "new flows refused: {report}");
    assert!(
        sent.packets as f64 > 1.5 * MAX_FLOWS,
        "the flood must outnumber the table: {report}"
    );
    assert!(tries >= 5, "the table never filled: {report}");
    assert!(theirs > 0.0, "{report}");
    assert!(flows <= MAX_FLOWS, "{report}");
    // And after it, as before.
    probe(tb).expect("backend-2 -> database-2 after the flood");
}

#[test]
fn a_flood_that_ingress_admits_does_not_lock_the_node_out() {
    if !testbed::privileged("a_flood_that_ingress_admits_does_not_lock_the_node_out") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let tb = testbed(dir.path());
    let flooder = flooder(&tb);
    let frontend = v4(&tb, "frontend-2", 80);
    connects_under(&tb, "network", |stop| {
        flooder.start(frontend, FLOOD_PPS, Kind::Syn, stop)
    });
}

/// A flood that ingress denies (untokened SYNs from spoofed sources to the database, which admits
/// backends only) is dropped a read at a time: one verdict message answers many of its packets
/// (`NFQNL_MSG_VERDICT_BATCH`), every packet is answered or counted (nothing left in the
/// queue), and the backend keeps connecting to the database under it. How many packets one
/// read finds depends on the agent's speed; so the agent is also stopped for 150 ms in the
/// middle of the flood, and the 3,000 SYNs that pile up in its queue then must take far fewer
/// messages than packets, however fast it is.
#[test]
fn a_flood_that_ingress_denies_is_dropped_a_read_at_a_time() {
    if !testbed::privileged("a_flood_that_ingress_denies_is_dropped_a_read_at_a_time") {
        return;
    }
    let _alone = ONE_FLOOD_AT_A_TIME
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let dir = tempfile::tempdir().unwrap();
    let tb = testbed(dir.path());
    let flooder = flooder(&tb);
    let database = v4(&tb, "database-2", 5432);
    connect(&tb, Duration::from_secs(3)).expect("backend-2 -> database-2 before the flood");
    let counts = |tb: &Testbed| {
        let m = tb.agent(2).metrics();
        (
            m.sum("tessera_queue_verdict_messages_total"),
            m.sum("tessera_queue_verdicts_total"),
            m.sum_of("tessera_packets_rejected_total", "reason", "policy_ingress"),
        )
    };
    let before = counts(&tb);
    let stop = Arc::new(AtomicBool::new(false));
    let sender = flooder.start(database, FLOOD_PPS, Kind::Syn, stop.clone());
    let begin = Instant::now();
    let mut failures = Vec::new();
    let mut tries = 0;
    let mut paused = false;
    while begin.elapsed() < Duration::from_secs(4) {
        if !paused && begin.elapsed() > Duration::from_secs(2) {
            tb.agent(2).freeze_for(Duration::from_millis(150));
            paused = true;
        }
        tries += 1;
        if let Err(e) = connect(&tb, Duration::from_secs(3)) {
            failures.push(format!("{:.1} s: {e}", begin.elapsed().as_secs_f64()));
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    stop.store(true, Ordering::SeqCst);
    let sent = sender.join().expect("flood thread").expect("flood sender");
    // The kernel's queue counters are read once a second.
    std::thread::sleep(Duration::from_millis(1500));
    let after = counts(&tb);
    let (messages, answered, denied) = (after.0 - before.0, after.1 - before.1, after.2 - before.2);
    let queue_drops = metric(&tb, "tessera_workload_queue_dropped_total");
    let report = format!(
        "flood: {} SYNs at {:.0}/s; {messages} verdict messages answered {answered} packets; \
         denied {denied}; dropped at a full queue {queue_drops}; connections: {tries} tried, \
         failed: {failures:?}\n{}",
        sent.packets,
        sent.rate(),
        tb.agent_logs()
    );
    eprintln!("{}", report.lines().next().unwrap_or_default());
    assert!(
        failures.is_empty(),
        "the backend could not connect: {report}"
    );
    assert!(
        denied + queue_drops >= 0.99 * sent.packets as f64,
        "every SYN denied or dropped by the kernel: {report}"
    );
    assert!(answered >= denied, "every denial answered: {report}");
    // The 150 ms stop alone piles up about 3,000 SYNs, read 256 at a time.
    assert!(
        answered - messages >= 1500.0,
        "the drops of a read share a message: {report}"
    );
    connect(&tb, Duration::from_secs(3)).expect("backend-2 -> database-2 after the flood");
}

/// Where the compromised frontend sends its SYNs: a /16 that routes nowhere in the testbed
/// (its addresses are 10.64-191.x.x).
const NOWHERE: Ipv4Addr = Ipv4Addr::new(10, 250, 0, 0);

#[test]
fn a_workload_flooding_syns_does_not_lock_its_neighbours_out() {
    if !testbed::privileged("a_workload_flooding_syns_does_not_lock_its_neighbours_out") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let tb = testbed(dir.path());
    let frontend = tb.workload("frontend-2");
    connects_under(&tb, "workload", |stop| {
        testbed::flood::start_from_workload(
            &frontend.ns,
            frontend.ip,
            NOWHERE,
            443,
            FLOOD_PPS,
            Kind::Syn,
            stop,
        )
    });
    assert!(
        evicted(&tb, "network") == 0.0,
        "only the frontend's own flows were evicted"
    );
}

/// UDP datagrams per second from the compromised frontend: each opens a flow whose handshake
/// holds the datagram for up to 175 ms (three unanswered SYN controls), so about 1,750 would be
/// held at once, more than the 1,024 the agent holds over all workloads.
const UDP_FLOOD_PPS: f64 = 10_000.0;

/// A UDP echo on database-2's port 5432, until dropped.
struct UdpEcho {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl UdpEcho {
    fn start(tb: &Testbed) -> UdpEcho {
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread = {
            let stop = stop.clone();
            testbed::spawn_in_netns(&tb.workload("database-2").ns, move || {
                let s = std::net::UdpSocket::bind("0.0.0.0:5432").unwrap();
                s.set_read_timeout(Some(Duration::from_millis(100)))
                    .unwrap();
                ready_tx.send(()).unwrap();
                let mut buf = [0u8; 64];
                while !stop.load(Ordering::SeqCst) {
                    if let Ok((n, peer)) = s.recv_from(&mut buf) {
                        let _ = s.send_to(&buf[..n], peer);
                    }
                }
            })
        };
        ready_rx.recv().expect("the UDP echo listens");
        UdpEcho {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for UdpEcho {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// One datagram from backend-2 to database-2's UDP echo on 5432, from a socket of its own (a
/// new flow, so a new handshake and a held datagram): echoed within 3 s?
fn udp_exchange(tb: &Testbed) -> std::io::Result<()> {
    let dst = tb.workload("database-2").addr(5432);
    testbed::in_netns(&tb.workload("backend-2").ns, move || {
        let s = std::net::UdpSocket::bind("0.0.0.0:0")?;
        s.set_read_timeout(Some(Duration::from_secs(3)))?;
        s.send_to(b"ping", dst)?;
        let mut buf = [0u8; 16];
        let (n, _) = s.recv_from(&mut buf)?;
        if &buf[..n] == b"ping" {
            Ok(())
        } else {
            Err(std::io::Error::other("a wrong echo"))
        }
    })
}

#[test]
fn a_workload_flooding_udp_does_not_take_its_neighbours_room() {
    if !testbed::privileged("a_workload_flooding_udp_does_not_take_its_neighbours_room") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let tb = testbed(dir.path());
    let _alone = ONE_FLOOD_AT_A_TIME
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let echo = UdpEcho::start(&tb);
    udp_exchange(&tb).expect("backend-2 -> database-2 over UDP before the flood");

    let frontend = tb.workload("frontend-2");
    let flood_stop = Arc::new(AtomicBool::new(false));
    let sender = testbed::flood::start_from_workload(
        &frontend.ns,
        frontend.ip,
        NOWHERE,
        53,
        UDP_FLOOD_PPS,
        Kind::Udp,
        flood_stop.clone(),
    );
    let begin = Instant::now();
    let (mut tries, mut failures) = (0, Vec::new());
    std::thread::sleep(Duration::from_secs(1));
    while begin.elapsed() < Duration::from_secs(8) {
        tries += 1;
        if let Err(e) = udp_exchange(&tb) {
            failures.push(format!("{:.1} s: {e}", begin.elapsed().as_secs_f64()));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    flood_stop.store(true, Ordering::SeqCst);
    let sent = sender.join().expect("flood thread").expect("flood sender");
    let hold_full = refused(&tb, "udp_hold_full");
    let report = format!(
        "UDP flood: {} datagrams at {:.0}/s; exchanges under it: {tries} tried, failed: \
         {failures:?}; refused as udp_hold_full {hold_full}\n{}",
        sent.packets,
        sent.rate(),
        tb.agent_logs()
    );
    eprintln!("{}", report.lines().next().unwrap_or_default());
    assert!(
        failures.is_empty(),
        "a workload of the flooded node lost its datagrams: {report}"
    );
    assert!(
        hold_full > 0.0,
        "the flood never filled its share: {report}"
    );
    udp_exchange(&tb).expect("backend-2 -> database-2 over UDP after the flood");
    drop(echo);
}

/// The payload of the SYN control datagram of a UDP handshake from backend-2 to database-2,
/// captured in database-2's netns.
fn captured_syn_control(tb: &Testbed) -> Vec<u8> {
    let magic = identity::wire::UDP_CONTROL_MAGIC;
    let mut capture =
        testbed::packet::Capture::start_any(&tb.workload("database-2").ns, move |p| {
            p.udp_payload().is_some_and(|u| u.starts_with(&magic))
        });
    udp_exchange(tb).expect("backend-2 -> database-2 over UDP, captured");
    let syn = capture
        .wait_for(Duration::from_secs(2), |p| {
            p.udp_payload()
                .is_some_and(|u| u.get(8) == Some(&identity::wire::TYPE_SYN))
        })
        .expect("the SYN control was captured");
    syn.udp_payload().expect("a UDP payload").to_vec()
}

/// Forged SYN controls per second, and for how long. Each costs the agent a SYN-ACK token (a
/// MAC) and a datagram sent: the rate stays under what a debug build decides on a 2-core
/// machine beside the flooder, so that what is tested is the table, not the agent's capacity
/// (a flood beyond it drops packets in the kernel's queue, the flood's and the genuine alike,
/// as for TCP). 10k/s was too close to it: in 1 run in 4 to 6 the queue of database-2 filled
/// (8,192 packets, `nf_queue: full` in the kernel log) and a probe was lost there. Each flow
/// stays 30 s: the table is full after 11 s, and 20 s send 1.8 times what it holds.
const CONTROL_FLOOD_PPS: f64 = 6_000.0;
const CONTROL_FLOOD_FOR: Duration = Duration::from_secs(20);

/// Where the client nonce lies in a SYN control datagram: after the control header, at byte 20
/// of the token (docs/wire-format.md).
const NONCE: std::ops::Range<usize> = {
    let at = identity::wire::UDP_CONTROL_HEADER_LEN + 20;
    at..at + identity::wire::NONCE_LEN
};

/// The UDP twin of the first test: SYN control datagrams from spoofed sources, each a copy of
/// one captured on the wire with a fresh nonce (the SYN carries no MAC; a copy with its own
/// nonce would be refused as a replay once its handshake completed), so each passes as a new
/// handshake. Ingress admits each (its claims are a backend's), so each holds a server-side
/// flow in the UDP table for the handshake time; the table evicts the flood's older half, and
/// backend-2's UDP flows to the database keep getting proven.
#[test]
fn a_flood_of_syn_controls_that_ingress_admits_does_not_lock_udp_out() {
    if !testbed::privileged("a_flood_of_syn_controls_that_ingress_admits_does_not_lock_udp_out") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let tb = testbed(dir.path());
    let _echo = UdpEcho::start(&tb);
    let syn = captured_syn_control(&tb);

    let flooder = flooder(&tb);
    let database = v4(&tb, "database-2", 5432);
    probes_under(&tb, "network", CONTROL_FLOOD_FOR, udp_exchange, |stop| {
        flooder.start_udp_with(database, CONTROL_FLOOD_PPS, syn, NONCE, stop)
    });
}

/// SYN controls per second in the saturating flood: more than the agent decides (a debug build
/// on a 2-core machine decides about 18k/s), so its queues stay full.
const SATURATING_PPS: f64 = 40_000.0;

/// A flood beyond what the agent can decide keeps its packet loops busy without end. Its HTTP
/// endpoints still answer within the liveness probe's timeout (5 s, deployment/kubernetes), so
/// the kubelet does not restart an agent for being busy: they are served from a thread of
/// their own, and the packet loops yield after each full batch.
#[test]
fn the_agent_answers_its_probes_while_a_flood_saturates_it() {
    if !testbed::privileged("the_agent_answers_its_probes_while_a_flood_saturates_it") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let tb = testbed(dir.path());
    let _echo = UdpEcho::start(&tb);
    let syn = captured_syn_control(&tb);
    let _alone = ONE_FLOOD_AT_A_TIME
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let flooder = flooder(&tb);
    let database = v4(&tb, "database-2", 5432);
    let dropped = || metric(&tb, "tessera_queue_dropped_total");
    let dropped_before = dropped();
    let stop = Arc::new(AtomicBool::new(false));
    let sender = flooder.start_udp_with(database, SATURATING_PPS, syn, NONCE, stop.clone());
    let begin = Instant::now();
    let (mut probes, mut slowest, mut failures) = (0, Duration::ZERO, Vec::new());
    while begin.elapsed() < Duration::from_secs(8) {
        for path in ["/healthz", "/metrics"] {
            let asked = Instant::now();
            // Five seconds at most, as the liveness probe (testbed::agent::http_get).
            let answered = tb.agent(2).get(path).is_some();
            slowest = slowest.max(asked.elapsed());
            probes += 1;
            if !answered {
                failures.push(format!("{path} at {:.1} s", begin.elapsed().as_secs_f64()));
            }
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    stop.store(true, Ordering::SeqCst);
    let sent = sender.join().expect("flood thread").expect("flood sender");
    let saturated = dropped() - dropped_before;
    let report = format!(
        "saturating flood: {} SYN controls at {:.0}/s, {saturated} dropped by the kernel's \
         full queues; {probes} probes, slowest {slowest:?}, unanswered: {failures:?}\n{}",
        sent.packets,
        sent.rate(),
        tb.agent_logs()
    );
    eprintln!("{}", report.lines().next().unwrap_or_default());
    assert!(failures.is_empty(), "{report}");
    assert!(
        saturated > 0.0,
        "the flood did not saturate the agent (raise SATURATING_PPS): {report}"
    );
}
