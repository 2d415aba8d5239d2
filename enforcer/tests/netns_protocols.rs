//! Every IP protocol under policy, on the real kernel: UDP, ICMP and a raw IP protocol are
//! delivered exactly when NetworkPolicy allows them (same node, where the agent knows both
//! workloads by address, and across nodes, where an ipBlock must allow the peer), a flow's first
//! packet is the only one that reaches userspace, replies pass, and a workload that sends with
//! another workload's address is stopped at its own netns. IPv4 and IPv6. Needs root
//! (tests/run.sh runs them in CI); without root they print a SKIP line locally and fail under
//! CI=true.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::path::Path;
use std::sync::mpsc;
use std::time::Duration;

use testbed::packet::{inject_bytes, ip_packet, udp_packet};
use testbed::{AgentConfig, Mode, Testbed, Workload, WorkloadSpec, run_in, run_status};

const TESSERA: &str = env!("CARGO_BIN_EXE_tessera");
/// How long a receiver waits for what must not come.
const QUIET: Duration = Duration::from_millis(1200);

/// Default deny for ingress; the databases accept UDP 5432 from backends, everything (ICMP and
/// raw protocols included) from frontends, and UDP 5433 from backend-1's address (an ipBlock:
/// across nodes, where the static agents do not know each other's workloads).
fn policies(dir: &Path, backend_1: &Workload) {
    let mut block = vec![format!("{{ipBlock: {{cidr: {}/32}}}}", backend_1.ip)];
    if let Some(ip6) = backend_1.ip6 {
        block.push(format!("{{ipBlock: {{cidr: \"{ip6}/128\"}}}}"));
    }
    let yaml = format!(
        "apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {{name: default-deny-ingress, namespace: shop}}
spec:
  podSelector: {{}}
  policyTypes: [Ingress]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {{name: database, namespace: shop}}
spec:
  podSelector: {{matchLabels: {{role: Database}}}}
  ingress:
  - from: [{{podSelector: {{matchLabels: {{role: BusinessBackend}}}}}}]
    ports: [{{port: 5432, protocol: UDP}}]
  - from: [{{podSelector: {{matchLabels: {{role: WebFrontend}}}}}}]
  - from: [{}]
    ports: [{{port: 5433, protocol: UDP}}]
",
        block.join(", ")
    );
    std::fs::write(dir.join("policies.yaml"), yaml).unwrap();
}

fn testbed(v6: bool) -> (Testbed, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    // The policy names backend-1's addresses, known once the testbed is wired: write a
    // placeholder (deny all) first, then the real file, which the agents reload within 1 s.
    std::fs::write(
        dir.path().join("policies.yaml"),
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: default-deny-ingress, namespace: shop}\nspec: {podSelector: {}, policyTypes: [Ingress]}\n",
    )
    .unwrap();
    let tb = Testbed::builder()
        .ipv6(v6)
        .policies(dir.path())
        .workload(WorkloadSpec::new("external-1", 1, "External"))
        .workload(WorkloadSpec::new("frontend-1", 1, "WebFrontend"))
        .workload(WorkloadSpec::new("backend-1", 1, "BusinessBackend"))
        .workload(WorkloadSpec::new("database-1", 1, "Database"))
        .workload(WorkloadSpec::new("database-2", 2, "Database"))
        .agents(AgentConfig::new(Path::new(TESSERA), Mode::Psk))
        .build();
    policies(dir.path(), tb.workload("backend-1"));
    // The agents poll the directory every second.
    std::thread::sleep(Duration::from_millis(2500));
    (tb, dir)
}

fn ip(w: &Workload, v6: bool) -> IpAddr {
    if v6 { w.addr6(0).ip() } else { w.addr(0).ip() }
}

/// `count` datagrams from `from` to `to:port`, one socket (one flow), each echoed by a
/// receiver bound in `to`. Returns (datagrams received, echoes received back).
fn udp_exchange(tb: &Testbed, from: &str, to: &str, port: u16, v6: bool, count: u8) -> (u8, u8) {
    let dst = SocketAddr::new(ip(tb.workload(to), v6), port);
    let (ready_tx, ready_rx) = mpsc::channel();
    let receiver = testbed::spawn_in_netns(&tb.workload(to).ns, move || {
        let bind: SocketAddr = if v6 {
            "[::]:0".parse().unwrap()
        } else {
            "0.0.0.0:0".parse().unwrap()
        };
        let s = UdpSocket::bind(SocketAddr::new(bind.ip(), port)).unwrap();
        s.set_read_timeout(Some(QUIET)).unwrap();
        ready_tx.send(()).unwrap();
        let mut got = 0u8;
        let mut buf = [0u8; 64];
        while let Ok((n, peer)) = s.recv_from(&mut buf) {
            got += 1;
            let _ = s.send_to(&buf[..n], peer);
        }
        got
    });
    ready_rx.recv().unwrap();
    let echoed = testbed::in_netns(&tb.workload(from).ns, move || {
        let bind: SocketAddr = if v6 {
            "[::]:0".parse().unwrap()
        } else {
            "0.0.0.0:0".parse().unwrap()
        };
        let s = UdpSocket::bind(bind).unwrap();
        s.set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        let mut echoed = 0u8;
        let mut buf = [0u8; 64];
        for i in 0..count {
            s.send_to(&[i; 16], dst).unwrap();
            if s.recv_from(&mut buf).is_ok() {
                echoed += 1;
            }
        }
        echoed
    });
    (receiver.join().unwrap(), echoed)
}

/// One ICMP echo from `from` to `to`: answered?
fn ping(tb: &Testbed, from: &str, to: &str, v6: bool) -> bool {
    let dst = ip(tb.workload(to), v6).to_string();
    let ns = tb.workload(from).ns.clone();
    run_status(&[
        "ip", "netns", "exec", &ns, "busybox", "ping", "-c", "1", "-W", "1", &dst,
    ])
    .status
    .success()
}

/// Counts, in `to`'s netns, the packets of IP protocol `protocol` that our mangle INPUT chain
/// let through (the filter table's INPUT runs after it): returns a reader of the count.
fn count_delivered(tb: &Testbed, to: &str, protocol: &str, v6: bool) -> impl Fn() -> u64 {
    let ns = tb.workload(to).ns.clone();
    let protocol = protocol.to_owned();
    let iptables = if v6 { "ip6tables" } else { "iptables" };
    run_in(
        &ns,
        &[iptables, "-A", "INPUT", "-p", &protocol, "-j", "ACCEPT"],
    );
    move || {
        let out = run_in(&ns, &[iptables, "-nvxL", "INPUT"]);
        // "pkts bytes target prot ...": the ACCEPT rule of this protocol.
        out.lines()
            .map(|l| l.split_whitespace().collect::<Vec<_>>())
            .find(|f| f.len() > 3 && f[2] == "ACCEPT" && f[3] == protocol)
            .and_then(|f| f[0].parse().ok())
            .unwrap_or_else(|| panic!("no counting rule in {ns}'s INPUT:\n{out}"))
    }
}

fn metric(tb: &Testbed, node: u8, key: &str, value: &str) -> f64 {
    tb.agent(node).metrics().sum_with_label(key, value)
}

fn every_protocol_is_under_policy(v6: bool) {
    let (tb, _dir) = testbed(v6);

    // UDP, same node: the agent knows both ends by address.
    let udp_before = metric(&tb, 1, "kind", "udp");
    assert_eq!(
        udp_exchange(&tb, "backend-1", "database-1", 5432, v6, 20),
        (20, 20),
        "allowed UDP flow, and its replies\n{}",
        tb.agent_logs()
    );
    // One flow: only its first packet at each end reached userspace (the sender's OUTPUT,
    // the receiver's INPUT); the other 19 and every reply bypassed it by connmark.
    assert_eq!(metric(&tb, 1, "kind", "udp") - udp_before, 2.0);
    assert_eq!(
        udp_exchange(&tb, "external-1", "database-1", 5432, v6, 3),
        (0, 0),
        "External is not allowed to reach the database over UDP"
    );
    assert_eq!(
        udp_exchange(&tb, "frontend-1", "database-1", 5440, v6, 3),
        (3, 3),
        "frontends may send anything"
    );

    // UDP across nodes: node 2 does not know backend-1 (static inventories): the ipBlock rule
    // allows it on 5433, and nothing allows an IP-only peer on 5432.
    assert_eq!(
        udp_exchange(&tb, "backend-1", "database-2", 5433, v6, 5),
        (5, 5),
        "{}",
        tb.agent_logs()
    );
    assert_eq!(
        udp_exchange(&tb, "backend-1", "database-2", 5432, v6, 3),
        (0, 0)
    );
    assert_eq!(
        udp_exchange(&tb, "external-1", "database-2", 5432, v6, 3),
        (0, 0)
    );

    // ICMP: only a rule without ports allows it.
    assert!(
        ping(&tb, "frontend-1", "database-1", v6),
        "{}",
        tb.agent_logs()
    );
    assert!(!ping(&tb, "backend-1", "database-1", v6));
    assert!(!ping(&tb, "external-1", "database-1", v6));
    assert!(!ping(&tb, "external-1", "database-2", v6));

    // A raw IP protocol (253, experimentation): likewise.
    let raw = count_delivered(&tb, "database-1", "253", v6);
    let db1 = ip(tb.workload("database-1"), v6);
    for from in ["frontend-1", "external-1", "backend-1"] {
        let src = ip(tb.workload(from), v6);
        inject_bytes(
            &tb.workload(from).ns,
            db1,
            ip_packet(src, db1, 253, b"raw protocol"),
        );
    }
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(raw(), 1, "only frontend-1's packet passes");

    // Spoofed source: external-1 sends UDP to database-1:5432 with backend-1's address (which
    // that port allows). Its own netns stops it.
    let udp_in = count_delivered(&tb, "database-1", "17", v6);
    let before = udp_in();
    let spoofed = SocketAddr::new(ip(tb.workload("backend-1"), v6), 41000);
    let dst = SocketAddr::new(db1, 5432);
    let spoofed_before = metric(&tb, 1, "reason", "spoofed_source");
    for _ in 0..3 {
        inject_bytes(
            &tb.workload("external-1").ns,
            db1,
            udp_packet(spoofed, dst, b"spoofed"),
        );
    }
    // The same packet from backend-1 itself passes (it is backend-1's address).
    inject_bytes(
        &tb.workload("backend-1").ns,
        db1,
        udp_packet(spoofed, dst, b"genuine"),
    );
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(udp_in() - before, 1, "only the genuine datagram arrives");
    assert_eq!(
        metric(&tb, 1, "reason", "spoofed_source") - spoofed_before,
        3.0
    );

    // Every denial above was counted by reason.
    assert!(metric(&tb, 1, "reason", "policy_ingress") >= 6.0);
    assert!(metric(&tb, 2, "reason", "policy_ingress") >= 3.0);
}

#[test]
fn every_protocol_is_under_policy_ipv4() {
    if testbed::privileged("every_protocol_is_under_policy_ipv4") {
        every_protocol_is_under_policy(false);
    }
}

#[test]
fn every_protocol_is_under_policy_ipv6() {
    if testbed::privileged("every_protocol_is_under_policy_ipv6") {
        every_protocol_is_under_policy(true);
    }
}
