//! A flood of spoofed SYNs that ingress admits does not lock a node out, on the real kernel.
//!
//! A workload whose port is open to every address (a public frontend) takes a flood of
//! untokened SYNs with spoofed sources. Ingress admits each one, so each one opens a flow in
//! its agent's handshake table, and that table is shared by every workload of the node. While
//! the flood fills it several times over, a backend of the same node still connects to a
//! database of the same node, with the labels proven, as often as it tries. The agent evicts
//! the flood's older flows instead of refusing new ones, and nothing is refused as
//! `flow_table_full`. Needs root (tests/run.sh runs it in CI); without root it prints a SKIP
//! line locally and fails under CI=true.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::{IpAddr, SocketAddrV4};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use testbed::flood::{Flooder, Kind};
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
const FLOOD_PPS: f64 = 20_000.0;

fn metric(tb: &Testbed, name: &str) -> f64 {
    tb.agent(2).metrics().sum(name)
}

fn refused(tb: &Testbed, reason: &str) -> f64 {
    tb.agent(2).metrics().sum_with_label("reason", reason)
}

#[test]
fn a_flood_that_ingress_admits_does_not_lock_the_node_out() {
    if !testbed::privileged("a_flood_that_ingress_admits_does_not_lock_the_node_out") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("policies.yaml"), POLICIES).unwrap();
    let tb = Testbed::builder()
        .policies(dir.path())
        .workload(WorkloadSpec::new("frontend-2", 2, "WebFrontend").port(Some("http"), 80))
        .workload(WorkloadSpec::new("backend-2", 2, "BusinessBackend"))
        .workload(WorkloadSpec::new("database-2", 2, "Database").port(Some("postgres"), 5432))
        .agents(AgentConfig::new(Path::new(TESSERA), Mode::Psk))
        .build();
    let connect = |timeout: Duration| {
        let mut s = tb.connect("backend-2", "database-2", 5432, timeout)?;
        echo_once(&mut s, 7)
    };
    connect(Duration::from_secs(5)).expect("backend-2 -> database-2 before the flood");

    let flooder =
        Flooder::attach(&tb.nodes[1], &format!("ts-{}-flooder", tb.id)).expect("flooder netns");
    let IpAddr::V4(frontend) = tb.workload("frontend-2").addr(80).ip() else {
        panic!("the testbed's workloads have IPv4 addresses");
    };
    let stop = Arc::new(AtomicBool::new(false));
    let sender = flooder.start(
        SocketAddrV4::new(frontend, 80),
        FLOOD_PPS,
        Kind::Syn,
        stop.clone(),
    );

    // Until the flood has filled the table once over, then on while it goes on.
    let start = Instant::now();
    let (mut tries, mut failures) = (0, Vec::new());
    while start.elapsed() < Duration::from_secs(9) {
        let full = metric(&tb, "tessera_handshake_flows") >= MAX_FLOWS * 0.9
            || metric(&tb, "tessera_handshake_flows_evicted_total") > 0.0;
        if full {
            tries += 1;
            if let Err(e) = connect(Duration::from_secs(3)) {
                failures.push(format!("{:.1} s: {e}", start.elapsed().as_secs_f64()));
            }
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    stop.store(true, Ordering::SeqCst);
    let sent = sender.join().expect("flood thread").expect("flood sender");
    drop(flooder);

    let evicted = metric(&tb, "tessera_handshake_flows_evicted_total");
    let table_full = refused(&tb, "flow_table_full");
    let flows = metric(&tb, "tessera_handshake_flows");
    let report = format!(
        "flood: {} SYNs at {:.0}/s; connections under it: {tries} tried, failed: {failures:?}; \
         evicted {evicted}, refused as flow_table_full {table_full}, flows held {flows}\n{}",
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
    connect(Duration::from_secs(5)).expect("backend-2 -> database-2 after the flood");
}
