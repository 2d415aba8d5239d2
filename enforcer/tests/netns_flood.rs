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
    ports: [{port: 5432}]
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
    let _alone = ONE_FLOOD_AT_A_TIME
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    connect(tb, Duration::from_secs(5)).expect("backend-2 -> database-2 before the flood");
    let stop = Arc::new(AtomicBool::new(false));
    let sender = start(stop.clone());
    // Until the flood has filled the table once over, then on while it goes on.
    let begin = Instant::now();
    let (mut tries, mut failures) = (0, Vec::new());
    while begin.elapsed() < Duration::from_secs(9) {
        let full = metric(tb, "tessera_handshake_flows") >= MAX_FLOWS * 0.9
            || metric(tb, "tessera_handshake_flows_evicted_total") > 0.0;
        if full {
            tries += 1;
            if let Err(e) = connect(tb, Duration::from_secs(3)) {
                failures.push(format!("{:.1} s: {e}", begin.elapsed().as_secs_f64()));
            }
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    stop.store(true, Ordering::SeqCst);
    let sent = sender.join().expect("flood thread").expect("flood sender");

    let evicted = tb.agent(2).metrics().sum_with_label("whose", whose);
    let all_evicted = metric(tb, "tessera_handshake_flows_evicted_total");
    let table_full = refused(tb, "flow_table_full");
    let flows = metric(tb, "tessera_handshake_flows");
    let report = format!(
        "flood: {} SYNs at {:.0}/s; connections under it: {tries} tried, failed: {failures:?}; \
         evicted {all_evicted} ({evicted} {whose}), refused as flow_table_full {table_full}, \
         flows held {flows}\n{}",
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
    assert!(evicted > 0.0, "{report}");
    assert!(flows <= MAX_FLOWS, "{report}");
    // And after it, as before.
    connect(tb, Duration::from_secs(5)).expect("backend-2 -> database-2 after the flood");
}

#[test]
fn a_flood_that_ingress_admits_does_not_lock_the_node_out() {
    if !testbed::privileged("a_flood_that_ingress_admits_does_not_lock_the_node_out") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let tb = testbed(dir.path());
    let flooder =
        Flooder::attach(&tb.nodes[1], &format!("ts-{}-flooder", tb.id)).expect("flooder netns");
    let IpAddr::V4(frontend) = tb.workload("frontend-2").addr(80).ip() else {
        panic!("the testbed's workloads have IPv4 addresses");
    };
    connects_under(&tb, "network", |stop| {
        flooder.start(SocketAddrV4::new(frontend, 80), FLOOD_PPS, Kind::Syn, stop)
    });
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
        tb.agent(2).metrics().sum_with_label("whose", "network") == 0.0,
        "only the frontend's own flows were evicted"
    );
}
