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

use testbed::packet::{Capture, inject_bytes, ip_packet, udp_packet};
use testbed::{AgentConfig, Mode, Testbed, Workload, WorkloadSpec, run_in, run_status};

const TESSERA: &str = env!("CARGO_BIN_EXE_tessera");
/// How long a receiver waits for what must not come.
const QUIET: Duration = Duration::from_millis(1200);

/// Default deny for ingress; the databases accept UDP 5432 from backends, everything (ICMP and
/// raw protocols included) from frontends, and UDP 5433 from backend-1's address (an ipBlock).
/// Backends may send to databases, and to the resolver (no agent: an ipBlock) on UDP 53 only.
fn policies(dir: &Path, backend_1: &Workload, resolver: &Workload) {
    let blocks = |w: &Workload| {
        let mut b = vec![format!("{{ipBlock: {{cidr: {}/32}}}}", w.ip)];
        if let Some(ip6) = w.ip6 {
            b.push(format!("{{ipBlock: {{cidr: \"{ip6}/128\"}}}}"));
        }
        b.join(", ")
    };
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
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {{name: backend-egress, namespace: shop}}
spec:
  podSelector: {{matchLabels: {{role: BusinessBackend}}}}
  policyTypes: [Egress]
  egress:
  - to: [{{podSelector: {{matchLabels: {{role: Database}}}}}}]
  - to: [{}]
    ports: [{{port: 53, protocol: UDP}}]
",
        blocks(backend_1),
        blocks(resolver)
    );
    std::fs::write(dir.join("policies.yaml"), yaml).unwrap();
}

fn testbed(v6: bool) -> (Testbed, tempfile::TempDir) {
    testbed_in(v6, Mode::Psk)
}

fn testbed_in(v6: bool, mode: Mode) -> (Testbed, tempfile::TempDir) {
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
        .workload(WorkloadSpec::new("resolver-2", 2, "Resolver").unenforced())
        .agents(AgentConfig::new(Path::new(TESSERA), mode))
        .build();
    policies(
        dir.path(),
        tb.workload("backend-1"),
        tb.workload("resolver-2"),
    );
    // The agents poll the directory every second.
    std::thread::sleep(Duration::from_millis(2500));
    (tb, dir)
}

fn ip(w: &Workload, v6: bool) -> IpAddr {
    if v6 { w.addr6(0).ip() } else { w.addr(0).ip() }
}

/// The unspecified address of the family (to bind sockets to).
fn any(v6: bool) -> IpAddr {
    if v6 {
        IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED)
    } else {
        IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED)
    }
}

/// A UDP echo on `port` in `workload`'s netns, listening when this returns. It stops after
/// `idle` without a datagram and returns how many it echoed (it answers everything, as a
/// resolver answers even a malformed query).
fn udp_echo(
    tb: &Testbed,
    workload: &str,
    port: u16,
    v6: bool,
    idle: Duration,
) -> std::thread::JoinHandle<u8> {
    let (ready_tx, ready_rx) = mpsc::channel();
    let echo = testbed::spawn_in_netns(&tb.workload(workload).ns, move || {
        let s = UdpSocket::bind(SocketAddr::new(any(v6), port)).unwrap();
        s.set_read_timeout(Some(idle)).unwrap();
        ready_tx.send(()).unwrap();
        let mut got = 0u8;
        let mut buf = [0u8; 2048];
        while let Ok((n, peer)) = s.recv_from(&mut buf) {
            got = got.saturating_add(1);
            let _ = s.send_to(&buf[..n], peer);
        }
        got
    });
    ready_rx.recv().unwrap();
    echo
}

/// `count` datagrams from `from` to `to:port`, one socket (one flow), each echoed by a
/// receiver bound in `to`. Returns (datagrams received, echoes received back).
fn udp_exchange(tb: &Testbed, from: &str, to: &str, port: u16, v6: bool, count: u8) -> (u8, u8) {
    let dst = SocketAddr::new(ip(tb.workload(to), v6), port);
    let receiver = udp_echo(tb, to, port, v6, QUIET);
    let echoed = testbed::in_netns(&tb.workload(from).ns, move || {
        let s = UdpSocket::bind(SocketAddr::new(any(v6), 0)).unwrap();
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

    // UDP, same node, authenticated (the agent proves both ends to itself with control
    // datagrams, as across nodes).
    let udp_before = metric(&tb, 1, "kind", "udp");
    let verified_before = metric(&tb, 1, "peer", "verified");
    assert_eq!(
        udp_exchange(&tb, "backend-1", "database-1", 5432, v6, 20),
        (20, 20),
        "allowed UDP flow, and its replies\n{}",
        tb.agent_logs()
    );
    // One flow: after the handshake only its first (released) datagram reached userspace at
    // the receiver; the other 19 and every reply bypassed it by connmark.
    assert_eq!(metric(&tb, 1, "kind", "udp") - udp_before, 1.0);
    assert_eq!(metric(&tb, 1, "peer", "verified") - verified_before, 2.0);
    assert_eq!(
        udp_exchange(&tb, "external-1", "database-1", 5432, v6, 3),
        (0, 0),
        "External is not allowed to reach the database over UDP"
    );
    assert!(metric(&tb, 1, "reason", "udp_refused") >= 1.0);
    assert_eq!(
        udp_exchange(&tb, "frontend-1", "database-1", 5440, v6, 3),
        (3, 3),
        "frontends may send anything"
    );

    // UDP across nodes: the agents prove the labels to each other, so the podSelector rule
    // allows backend-1 on 5432 as on its own node; the ipBlock rule on 5433.
    assert_eq!(
        udp_exchange(&tb, "backend-1", "database-2", 5432, v6, 5),
        (5, 5),
        "{}",
        tb.agent_logs()
    );
    assert_eq!(
        udp_exchange(&tb, "backend-1", "database-2", 5433, v6, 3),
        (3, 3)
    );
    assert_eq!(
        udp_exchange(&tb, "external-1", "database-2", 5432, v6, 3),
        (0, 0)
    );
    assert!(metric(&tb, 2, "peer", "verified") >= 2.0);

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

    // Forged from outside the workloads: node 1 itself (no agent rules there) sends UDP to
    // database-1:5432 with backend-1's address. backend-1 is a workload of this agent, so a
    // datagram from it without a handshake is forged.
    let before = udp_in();
    let unauth_before = metric(&tb, 1, "reason", "udp_unauthenticated");
    for port in [42000, 42001] {
        inject_bytes(
            &tb.nodes[0],
            db1,
            udp_packet(SocketAddr::new(spoofed.ip(), port), dst, b"forged"),
        );
    }
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(udp_in() - before, 0, "forged datagrams never arrive");
    assert_eq!(
        metric(&tb, 1, "reason", "udp_unauthenticated") - unauth_before,
        2.0
    );

    // Every denial above was counted by reason.
    assert!(metric(&tb, 1, "reason", "policy_ingress") >= 6.0);
    assert!(metric(&tb, 2, "reason", "policy_ingress") >= 3.0);
}

/// Authenticated UDP flows across nodes establish under 2% random loss on the link (both
/// directions, control datagrams and data alike): 40 flows, each a new socket that sends until
/// an echo comes back (at most 6 tries, as an application over UDP would). IPv4 in PSK mode,
/// IPv6 in PKI mode.
fn udp_flows_establish_under_loss(v6: bool) {
    let (tb, _dir) = testbed_in(v6, if v6 { Mode::Pki } else { Mode::Psk });
    let iptables = if v6 { "ip6tables" } else { "iptables" };
    let loss = [
        "-m",
        "statistic",
        "--mode",
        "random",
        "--probability",
        "0.02",
    ];
    for node in &tb.nodes {
        forward_drop(node, iptables, "-I", &loss);
    }
    let dst = SocketAddr::new(ip(tb.workload("database-2"), v6), 5432);
    let echo = udp_echo(&tb, "database-2", 5432, v6, Duration::from_secs(3));
    let (established, tries) = testbed::in_netns(&tb.workload("backend-1").ns, move || {
        let (mut ok, mut tries) = (0, 0);
        for _ in 0..40 {
            let s = UdpSocket::bind(SocketAddr::new(any(v6), 0)).unwrap();
            match echo_within(&s, dst, 6, Duration::from_millis(400)) {
                Some(t) => (ok, tries) = (ok + 1, tries + t),
                None => tries += 6,
            }
        }
        (ok, tries)
    });
    echo.join().unwrap();
    eprintln!(
        "udp under 2% loss ({}): {established}/40 flows established in {tries} sends",
        if v6 { "IPv6, PKI" } else { "IPv4, PSK" }
    );
    assert_eq!(established, 40, "{}", tb.agent_logs());
    // Proven, never decided on the address: the client never took the server for agentless
    // (a flow whose ephemeral port repeats an earlier flow's within conntrack's timeout is that
    // flow again, so verified handshakes may be fewer than 40).
    assert!(metric(&tb, 2, "peer", "verified") >= 1.0);
    assert_eq!(
        metric(&tb, 1, "peer", "address"),
        0.0,
        "{}",
        tb.agent_logs()
    );
}

/// One datagram on `s` to `dst`, up to `tries` times (`wait` each): the try that got the echo back.
fn echo_within(s: &UdpSocket, dst: SocketAddr, tries: u32, wait: Duration) -> Option<u32> {
    s.set_read_timeout(Some(wait)).unwrap();
    let mut buf = [0u8; 64];
    (1..=tries).find(|_| {
        s.send_to(b"query", dst).unwrap();
        s.recv_from(&mut buf).is_ok()
    })
}

/// An `xt_u32` match (IPv4) for the agents' UDP control datagrams: their magic.
fn control_u32() -> String {
    let m = identity::wire::UDP_CONTROL_MAGIC;
    let word = |i: usize| u32::from_be_bytes([m[i], m[i + 1], m[i + 2], m[i + 3]]);
    format!("0>>22&0x3C@8={:#x}&&0>>22&0x3C@12={:#x}", word(0), word(4))
}

/// [`control_u32`] for the ACK controls only (the type byte after the magic).
fn ack_control_u32() -> String {
    format!(
        "{}&&0>>22&0x3C@16>>24={:#x}",
        control_u32(),
        identity::wire::TYPE_ACK
    )
}

/// `node`'s FORWARD drops (`-I`) or lets through again (`-D`) the UDP that `rule` matches
/// (`iptables` or `ip6tables`).
fn forward_drop(node: &str, iptables: &str, op: &str, rule: &[&str]) {
    let mut args = vec![iptables, op, "FORWARD", "-p", "udp"];
    args.extend_from_slice(rule);
    args.extend_from_slice(&["-j", "DROP"]);
    run_in(node, &args);
}

/// A UDP flow whose handshake lost the wrong datagrams recovers when the application retries
/// after a pause longer than the agents' 2 s linger (a resolver retries after 5 s), on the
/// real kernel, IPv4, across nodes:
/// - the client's ACK controls are lost (node 1's FORWARD drops them) while the first query
///   waits at the server; 3.5 s later the query is sent again. The client's agent has forgotten
///   the handshake, so the server's request for the ACK clears the client's mark
///   (`udp_ack_lost`) and a new handshake proves the flow. Before, the client's flow stayed
///   marked, the server dropped every query (`ack_missing`) and none was answered.
/// - on a second flow the ACK gets through but the query behind it is lost; the retry 3.5 s
///   later passes at once: the server's agent marked the flow at the ACK. Before, only the
///   next datagram within 2 s was marked, and the retry was refused (`udp_unauthenticated`).
#[test]
fn udp_flows_recover_from_a_lost_ack_or_datagram_after_a_pause() {
    if !testbed::privileged("udp_flows_recover_from_a_lost_ack_or_datagram_after_a_pause") {
        return;
    }
    let (tb, _dir) = testbed_in(false, Mode::Psk);
    let dst = SocketAddr::new(ip(tb.workload("database-2"), false), 5432);
    let echo = udp_echo(&tb, "database-2", 5432, false, Duration::from_secs(8));
    let (magic, ack) = (control_u32(), ack_control_u32());
    let lost_ack: [&str; 4] = ["-m", "u32", "--u32", &ack];
    let lost_data: [&str; 7] = ["--dport", "5432", "-m", "u32", "!", "--u32", &magic];
    let pause = Duration::from_millis(3500);

    let client = tb.workload("backend-1").ns.clone();
    let s = testbed::in_netns(&client, || UdpSocket::bind("0.0.0.0:0").unwrap());
    forward_drop(&tb.nodes[0], "iptables", "-I", &lost_ack);
    let first = echo_within(&s, dst, 1, Duration::from_millis(1000));
    forward_drop(&tb.nodes[0], "iptables", "-D", &lost_ack);
    assert_eq!(first, None, "the ACK controls were dropped");
    std::thread::sleep(pause);
    let retry = echo_within(&s, dst, 4, Duration::from_millis(1000));
    eprintln!("lost ACK, retry after {pause:?}: answered at try {retry:?}");
    assert!(retry.is_some(), "{}", tb.agent_logs());
    assert!(metric(&tb, 1, "reason", "udp_ack_lost") >= 1.0);

    let s = testbed::in_netns(&client, || UdpSocket::bind("0.0.0.0:0").unwrap());
    forward_drop(&tb.nodes[0], "iptables", "-I", &lost_data);
    let first = echo_within(&s, dst, 1, Duration::from_millis(1000));
    forward_drop(&tb.nodes[0], "iptables", "-D", &lost_data);
    assert_eq!(first, None, "the query was dropped");
    std::thread::sleep(pause);
    let retry = echo_within(&s, dst, 4, Duration::from_millis(1000));
    eprintln!("lost query behind the ACK, retry after {pause:?}: answered at try {retry:?}");
    assert_eq!(retry, Some(1), "{}", tb.agent_logs());
    assert_eq!(metric(&tb, 2, "reason", "udp_unauthenticated"), 0.0);
    drop(s);
    echo.join().unwrap();
}

/// The query right behind a lost ACK control is answered, not dropped, on the real kernel,
/// IPv4, across nodes: node 1's FORWARD drops the flow's first ACK control only (an nth
/// match). The query, released right behind it, reaches the server's agent first, which asks
/// for the ACK again (a re-sent SYN-ACK) and keeps the query in pauses until the client's
/// agent's answer has marked the flow. Before, the query was requeued 32 times within one
/// batch and dropped (`ack_missing`) before the answer came, and the application waited for
/// its own retry (5 s for a resolver).
#[test]
fn the_query_behind_a_lost_ack_is_answered_at_once() {
    if !testbed::privileged("the_query_behind_a_lost_ack_is_answered_at_once") {
        return;
    }
    let (tb, _dir) = testbed_in(false, Mode::Psk);
    let dst = SocketAddr::new(ip(tb.workload("database-2"), false), 5432);
    let echo = udp_echo(&tb, "database-2", 5432, false, Duration::from_secs(4));
    let ack = ack_control_u32();
    // The first ACK, then every 1000th (there is no second).
    let first_ack = [
        "-m",
        "u32",
        "--u32",
        &ack,
        "-m",
        "statistic",
        "--mode",
        "nth",
        "--every",
        "1000",
        "--packet",
        "0",
    ];
    let client = tb.workload("backend-1").ns.clone();
    let s = testbed::in_netns(&client, || UdpSocket::bind("0.0.0.0:0").unwrap());
    forward_drop(&tb.nodes[0], "iptables", "-I", &first_ack);
    let answered = echo_within(&s, dst, 1, Duration::from_millis(1500));
    let counters = run_in(&tb.nodes[0], &["iptables", "-vnxL", "FORWARD"]);
    forward_drop(&tb.nodes[0], "iptables", "-D", &first_ack);
    let dropped = counters
        .lines()
        .find(|l| l.contains("statistic"))
        .and_then(|l| l.split_whitespace().next()?.parse::<u64>().ok());
    eprintln!("first ACK lost ({dropped:?} dropped): answered at try {answered:?}");
    assert_eq!(dropped, Some(1), "{counters}");
    assert_eq!(answered, Some(1), "{}", tb.agent_logs());
    assert_eq!(metric(&tb, 2, "reason", "ack_missing"), 0.0);
    assert!(
        tb.agent(2).metrics().sum("tessera_packets_requeued_total") >= 2.0,
        "the query waited at the server"
    );
    drop(s);
    echo.join().unwrap();
}

/// A UDP flow the server's end forgot recovers, on the real kernel, IPv4 and IPv6, across
/// nodes: a proven flow, then the server workload's conntrack table is flushed (as when it
/// restarts with the same address) while the client's flow stays marked. The client's next
/// datagram is refused at the server (`udp_unauthenticated`), whose agent answers with a
/// RESTART control; the client's agent clears its mark (`udp_restart`) and the following
/// datagram is proven by a new handshake. Before, every datagram of the flow was refused for
/// as long as the application kept sending (a client's conntrack entry lives on while it does).
fn a_udp_flow_the_server_forgot_recovers(v6: bool) {
    let (tb, _dir) = testbed_in(v6, if v6 { Mode::Pki } else { Mode::Psk });
    let dst = SocketAddr::new(ip(tb.workload("database-2"), v6), 5432);
    let echo = udp_echo(&tb, "database-2", 5432, v6, Duration::from_secs(8));
    let client = tb.workload("backend-1").ns.clone();
    let s = testbed::in_netns(&client, move || {
        UdpSocket::bind(SocketAddr::new(any(v6), 0)).unwrap()
    });
    let first = echo_within(&s, dst, 3, Duration::from_millis(500));
    assert_eq!(first, Some(1), "{}", tb.agent_logs());
    // Past the agents' 2 s linger: neither holds the handshake any more, only the marks.
    std::thread::sleep(Duration::from_millis(3000));
    run_in(&tb.workload("database-2").ns, &["conntrack", "-F"]);
    let retry = echo_within(&s, dst, 4, Duration::from_millis(1000));
    eprintln!(
        "udp flow the server forgot ({}): answered at try {retry:?}",
        if v6 { "IPv6" } else { "IPv4" }
    );
    assert_eq!(retry, Some(2), "{}", tb.agent_logs());
    assert_eq!(metric(&tb, 1, "reason", "udp_restart"), 1.0);
    assert!(metric(&tb, 2, "reason", "udp_unauthenticated") >= 1.0);
    drop(s);
    echo.join().unwrap();
}

#[test]
fn a_udp_flow_the_server_forgot_recovers_ipv4() {
    if testbed::privileged("a_udp_flow_the_server_forgot_recovers_ipv4") {
        a_udp_flow_the_server_forgot_recovers(false);
    }
}

#[test]
fn a_udp_flow_the_server_forgot_recovers_ipv6() {
    if testbed::privileged("a_udp_flow_the_server_forgot_recovers_ipv6") {
        a_udp_flow_the_server_forgot_recovers(true);
    }
}

/// A TCP connection the server's end forgot is reset at the client, on the real kernel, IPv4,
/// across nodes: frontend-1 talks to database-2, then, once the agents' state of the
/// connection lingered out (10 s), the server's conntrack table is flushed (as when the
/// connection's entry expires, or the workload restarts with the same address). The client's
/// next segment is not passed at the server (`no_flow_state`) and its agent answers with a RST,
/// so the client's read fails at once with ECONNRESET. Before, the client retransmitted into
/// silence (minutes, until its kernel gave up). A new connection is proven as usual; when the
/// client's own end forgets it the same way, its agent resets the client's socket itself.
#[test]
fn a_tcp_connection_one_end_forgot_is_reset_at_the_client() {
    if !testbed::privileged("a_tcp_connection_one_end_forgot_is_reset_at_the_client") {
        return;
    }
    let (tb, _dir) = testbed(false);
    let port = 7000;
    let dst = SocketAddr::new(ip(tb.workload("database-2"), false), port);
    let _server = testbed::EchoServer::start(
        &tb.workload("database-2").ns,
        port,
        testbed::Serve::Threaded,
    );
    let frontend = tb.workload("frontend-1").ns.clone();
    let wait = Duration::from_secs(3);
    let mut c = testbed::connect(&frontend, dst, wait).unwrap();
    testbed::echo_once(&mut c, 1).expect("the connection works");
    std::thread::sleep(Duration::from_millis(11_500));
    run_in(&tb.workload("database-2").ns, &["conntrack", "-F"]);
    let start = std::time::Instant::now();
    let err = testbed::echo_once(&mut c, 2).expect_err("nothing passes at the server");
    eprintln!(
        "tcp connection the server forgot: {:?} after {:.0} ms",
        err.kind(),
        start.elapsed().as_secs_f64() * 1e3
    );
    assert_eq!(
        err.kind(),
        std::io::ErrorKind::ConnectionReset,
        "{}",
        tb.agent_logs()
    );
    assert!(metric(&tb, 2, "reason", "no_flow_state") >= 1.0);
    let mut again = testbed::connect(&frontend, dst, wait).unwrap();
    testbed::echo_once(&mut again, 3).expect("a new connection is proven");

    // The client's end forgets the new one: its own next segment is not passed, and its socket
    // gets the RST through the loopback.
    std::thread::sleep(Duration::from_millis(11_500));
    run_in(&frontend, &["conntrack", "-F"]);
    let start = std::time::Instant::now();
    let err = testbed::echo_once(&mut again, 4).expect_err("nothing passes at the client");
    eprintln!(
        "tcp connection the client forgot: {:?} after {:.0} ms",
        err.kind(),
        start.elapsed().as_secs_f64() * 1e3
    );
    assert_eq!(
        err.kind(),
        std::io::ErrorKind::ConnectionReset,
        "{}",
        tb.agent_logs()
    );
    drop((c, again));
}

/// A SYN-ACK on a tuple the client's agent holds no handshake for is answered with a RST, on
/// the real kernel, IPv4, across nodes: node 2 sends, with database-2's address and port, a
/// SYN-ACK to a port of frontend-1 that no socket and no handshake of node 1's agent knows
/// (what reaches a client whose agent restarted with the handshake in flight, or whose
/// workload is gone). Node 1's agent passes none of it (`no_flow_state`) and answers, from
/// frontend-1's netns, with the RST a kernel sends for a SYN-ACK no socket waits for (at the
/// sequence number it acknowledged), so a genuine server drops its half-open connection at
/// once. Before, the SYN-ACK was dropped silently and the server re-sent it into silence for
/// about a minute.
#[test]
fn a_syn_ack_the_client_does_not_know_is_answered_with_a_reset() {
    if !testbed::privileged("a_syn_ack_the_client_does_not_know_is_answered_with_a_reset") {
        return;
    }
    let (tb, _dir) = testbed(false);
    let server = ip(tb.workload("database-2"), false);
    let client = ip(tb.workload("frontend-1"), false);
    let (sport, cport, ack) = (5432u16, 45678u16, 0x0bad_cafeu32);
    let mut l4 = vec![0u8; 20];
    l4[0..2].copy_from_slice(&sport.to_be_bytes());
    l4[2..4].copy_from_slice(&cport.to_be_bytes());
    l4[4..8].copy_from_slice(&0x5eed_0000u32.to_be_bytes());
    l4[8..12].copy_from_slice(&ack.to_be_bytes());
    l4[12] = 5 << 4;
    l4[13] = testbed::packet::SYN | testbed::packet::ACK;
    l4[14..16].copy_from_slice(&64240u16.to_be_bytes());
    let mut syn_ack = testbed::packet::IpTcp(ip_packet(server, client, 6, &l4));
    syn_ack.fix_checksums();
    let mut cap = Capture::start(&tb.workload("database-2").ns, move |p| {
        p.src() == client && p.sport() == cport && p.dport() == sport
    });
    let before = metric(&tb, 1, "reason", "no_flow_state");
    testbed::packet::inject(&tb.nodes[1], &syn_ack);
    let rst = cap
        .wait_for(Duration::from_secs(3), |p| {
            p.flags() & testbed::packet::RST != 0
        })
        .unwrap_or_else(|| panic!("no RST reached the server\n{}", tb.agent_logs()));
    let seq = u32::from_be_bytes([rst.0[24], rst.0[25], rst.0[26], rst.0[27]]);
    assert_eq!(
        seq, ack,
        "the RST's sequence number is the SYN-ACK's acknowledgement"
    );
    assert!(rst.tcp_checksum_ok());
    assert!(metric(&tb, 1, "reason", "no_flow_state") > before);
}

/// A resolver without an agent, under default-deny egress plus a rule allowing UDP 53 to its
/// ipBlock: queries are answered, other ports are not. Prints how long the first query to it
/// took (the agent first tries a handshake; the resolver's answer to that shows it has no
/// agent) and a later one (decided on the address at once).
fn dns_to_an_agentless_resolver(v6: bool) {
    let (tb, _dir) = testbed(v6);
    let resolver = ip(tb.workload("resolver-2"), v6);
    let server = udp_echo(&tb, "resolver-2", 53, v6, Duration::from_secs(2));
    let query = move |port: u16| {
        let s = UdpSocket::bind(SocketAddr::new(any(v6), 0)).unwrap();
        s.set_read_timeout(Some(Duration::from_millis(800)))
            .unwrap();
        let start = std::time::Instant::now();
        s.send_to(b"\x12\x34 query", SocketAddr::new(resolver, port))
            .unwrap();
        let mut buf = [0u8; 64];
        match s.recv_from(&mut buf) {
            Ok((n, _)) if &buf[..n] == b"\x12\x34 query" => Some(start.elapsed()),
            _ => None,
        }
    };
    let ns = tb.workload("backend-1").ns.clone();
    let (first, second, other_port) =
        testbed::in_netns(&ns, move || (query(53), query(53), query(54)));
    server.join().unwrap();
    let first = first.unwrap_or_else(|| panic!("first query unanswered\n{}", tb.agent_logs()));
    let second = second.expect("second query unanswered");
    eprintln!(
        "dns to an agentless resolver ({}): first query {:.2} ms, second {:.2} ms",
        if v6 { "IPv6" } else { "IPv4" },
        first.as_secs_f64() * 1e3,
        second.as_secs_f64() * 1e3
    );
    assert!(other_port.is_none(), "egress allows UDP 53 only");
    assert!(metric(&tb, 1, "reason", "policy_egress") >= 1.0);
}

#[test]
fn dns_to_an_agentless_resolver_ipv4() {
    if testbed::privileged("dns_to_an_agentless_resolver_ipv4") {
        dns_to_an_agentless_resolver(false);
    }
}

#[test]
fn dns_to_an_agentless_resolver_ipv6() {
    if testbed::privileged("dns_to_an_agentless_resolver_ipv6") {
        dns_to_an_agentless_resolver(true);
    }
}

/// Replay on the real kernel: the control datagrams of an authorized cross-node UDP flow are
/// captured at the server and sent again from the client's node, with backend-1's address and
/// another port, followed by data: nothing reaches the server application, and the server's
/// agent counts why (the SYN's nonce is spent, the ACK fits no handshake, the data is not
/// proven).
fn replayed_udp_handshake_authorizes_nothing(v6: bool) {
    let (tb, _dir) = testbed(v6);
    let magic = identity::wire::UDP_CONTROL_MAGIC;
    let mut capture = Capture::start_any(&tb.workload("database-2").ns, move |p| {
        p.udp_payload().is_some_and(|u| u.starts_with(&magic))
    });
    assert_eq!(
        udp_exchange(&tb, "backend-1", "database-2", 5432, v6, 2),
        (2, 2),
        "{}",
        tb.agent_logs()
    );
    let kind = |t: u8| move |p: &testbed::packet::IpAny| p.udp_payload().is_some_and(|u| u[8] == t);
    let syn = capture
        .wait_for(Duration::from_secs(2), kind(identity::wire::TYPE_SYN))
        .expect("the SYN control was captured");
    let ack = capture
        .wait_for(Duration::from_secs(2), kind(identity::wire::TYPE_ACK))
        .expect("the ACK control was captured");
    let backend = ip(tb.workload("backend-1"), v6);
    let db2 = ip(tb.workload("database-2"), v6);
    let (from, to) = (SocketAddr::new(backend, 43000), SocketAddr::new(db2, 5432));
    let udp_in = count_delivered(&tb, "database-2", "17", v6);
    let before = udp_in();
    let metric2 = |r: &str| metric(&tb, 2, "reason", r);
    let (replay0, unexpected0, unauth0) = (
        metric2("replay"),
        metric2("unexpected_token"),
        metric2("udp_unauthenticated"),
    );
    for p in [&syn, &ack] {
        let payload = p.udp_payload().unwrap().to_vec();
        inject_bytes(&tb.nodes[0], db2, udp_packet(from, to, &payload));
        std::thread::sleep(Duration::from_millis(50));
    }
    inject_bytes(&tb.nodes[0], db2, udp_packet(from, to, b"replayed data"));
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(udp_in() - before, 0, "nothing reaches database-2");
    assert_eq!(metric2("replay") - replay0, 1.0, "{}", tb.agent_logs());
    assert_eq!(metric2("unexpected_token") - unexpected0, 1.0);
    assert_eq!(metric2("udp_unauthenticated") - unauth0, 1.0);
}

#[test]
fn replayed_udp_handshake_authorizes_nothing_ipv4() {
    if testbed::privileged("replayed_udp_handshake_authorizes_nothing_ipv4") {
        replayed_udp_handshake_authorizes_nothing(false);
    }
}

#[test]
fn replayed_udp_handshake_authorizes_nothing_ipv6() {
    if testbed::privileged("replayed_udp_handshake_authorizes_nothing_ipv6") {
        replayed_udp_handshake_authorizes_nothing(true);
    }
}

/// An authenticated UDP flow that a policy change now denies is cut: its next datagrams get no
/// answer, on the client's node as on the server's (the server's agent deletes the flow's
/// conntrack entry, which its own SYN-ACK control opened in the reverse orientation).
fn udp_flow_is_cut_by_a_policy_change(v6: bool) {
    let (tb, dir) = testbed(v6);
    let dst = SocketAddr::new(ip(tb.workload("database-2"), v6), 5432);
    let echo = udp_echo(&tb, "database-2", 5432, v6, Duration::from_secs(6));
    let client = testbed::in_netns(&tb.workload("backend-1").ns, move || {
        let s = UdpSocket::bind(SocketAddr::new(any(v6), 0)).unwrap();
        s.set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        s.connect(dst).unwrap();
        s
    });
    let echoes = |n: u8| {
        let mut got = 0;
        let mut buf = [0u8; 64];
        for i in 0..n {
            client.send(&[i; 8]).unwrap();
            if client.recv(&mut buf).is_ok() {
                got += 1;
            }
        }
        got
    };
    assert_eq!(echoes(3), 3, "{}", tb.agent_logs());
    // The database now accepts UDP 5432 from nobody.
    let file = dir.path().join("policies.yaml");
    let text = std::fs::read_to_string(&file).unwrap();
    let changed = text.replace("{port: 5432, protocol: UDP}", "{port: 5499, protocol: UDP}");
    assert_ne!(changed, text);
    std::fs::write(&file, changed).unwrap();
    // The agents poll the directory every second; node 2 (ingress) cuts the flow: counted at
    // once, its conntrack entry deleted off the event loop right after (logged).
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while tb.agent(2).metrics().sum("tessera_flows_cut_total") < 1.0
        || !tb.agent_logs().contains("conntrack entries deleted")
    {
        assert!(
            std::time::Instant::now() < deadline,
            "no cut within 5 s\n{}",
            tb.agent_logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        echoes(3),
        0,
        "the cut flow carries nothing\n{}",
        tb.agent_logs()
    );
    drop(client);
    echo.join().unwrap();
}

#[test]
fn udp_flow_is_cut_by_a_policy_change_ipv4() {
    if testbed::privileged("udp_flow_is_cut_by_a_policy_change_ipv4") {
        udp_flow_is_cut_by_a_policy_change(false);
    }
}

#[test]
fn udp_flows_establish_under_loss_ipv4() {
    if testbed::privileged("udp_flows_establish_under_loss_ipv4") {
        udp_flows_establish_under_loss(false);
    }
}

#[test]
fn udp_flows_establish_under_loss_ipv6() {
    if testbed::privileged("udp_flows_establish_under_loss_ipv6") {
        udp_flows_establish_under_loss(true);
    }
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

/// The bound handshake for UDP on the real kernel. The first flow from backend-1 to database-2
/// takes the three tokens and teaches node 1 database-2's node. The second flow (a new socket)
/// takes two control datagrams, a bound SYN (type 6) and a bound SYN-ACK (type 7), and no ACK;
/// its datagrams and their echoes bypass the server's agent, which marked the flow as its bound
/// SYN-ACK left. That bound SYN, sent again from another port with backend-1's address or from
/// its own once the server's agent has forgotten the flow, is a `replay`, and the data behind
/// it reaches nothing. A bound SYN kept from the server and sent first from another port is a
/// plain SYN there (`binding_bad_mac`: its MAC covers the source).
fn bound_udp_handshake(v6: bool, mode: Mode) {
    let (tb, _dir) = testbed_in(v6, mode);
    let magic = identity::wire::UDP_CONTROL_MAGIC;
    let mut capture = Capture::start_any(&tb.workload("database-2").ns, move |p| {
        p.udp_payload().is_some_and(|u| u.starts_with(&magic))
    });
    let kind = |t: u8| move |p: &testbed::packet::IpAny| p.udp_payload().is_some_and(|u| u[8] == t);
    // The bound handshake's UDP events (TCP has its own under the same name).
    let bound = |m: &testbed::Metrics, e: &str| {
        m.sum_of_labels(
            "tessera_bound_handshakes_total",
            &[("protocol", "udp"), ("event", e)],
        )
    };
    // Application datagrams the agent let through, or sent back to the queue.
    let udp_seen = |m: &testbed::Metrics| {
        m.sum_of("tessera_packets_accepted_total", "kind", "udp")
            + m.sum("tessera_packets_requeued_total")
    };
    assert_eq!(
        udp_exchange(&tb, "backend-1", "database-2", 5432, v6, 2),
        (2, 2),
        "first flow\n{}",
        tb.agent_logs()
    );
    let (m1, m2) = (tb.agent(1).metrics(), tb.agent(2).metrics());
    assert_eq!(bound(&m1, "sent"), 0.0, "the first flow is plain");
    assert_eq!(
        udp_exchange(&tb, "backend-1", "database-2", 5432, v6, 3),
        (3, 3),
        "bound flow\n{}",
        tb.agent_logs()
    );
    let (n1, n2) = (tb.agent(1).metrics(), tb.agent(2).metrics());
    assert_eq!(bound(&n1, "sent") - bound(&m1, "sent"), 1.0, "{}", n1.text);
    assert_eq!(bound(&n1, "completed") - bound(&m1, "completed"), 1.0);
    assert_eq!(bound(&n2, "authorized") - bound(&m2, "authorized"), 1.0);
    // `tessera status` sees them too (the agents' /status, which it renders).
    for (node, event) in [(1, "completed"), (2, "authorized")] {
        let status = testbed::agent::http_get(tb.agent(node).metrics_addr(), "/status")
            .expect("the agent's /status");
        let status: serde_json::Value = serde_json::from_str(&status).unwrap();
        assert!(
            status["counters"]["bound"]["udp"][event].as_u64() >= Some(1),
            "node {node}'s /status: {status}"
        );
    }
    assert_eq!(
        udp_seen(&n2) - udp_seen(&m2),
        0.0,
        "the bound flow's datagrams bypassed the server's agent:\n{}",
        n2.text
    );
    let syn = capture
        .wait_for(Duration::from_secs(2), kind(identity::wire::TYPE_SYN_BOUND))
        .expect("the bound SYN control was captured");
    assert!(
        capture
            .wait_for(
                Duration::from_secs(2),
                kind(identity::wire::TYPE_SYN_ACK_BOUND)
            )
            .is_some(),
        "the bound SYN-ACK control was captured"
    );
    let acks = capture
        .drain()
        .iter()
        .filter(|p| kind(identity::wire::TYPE_ACK)(p))
        .count();
    assert_eq!(acks, 1, "only the first flow sent an ACK control");

    // The bound SYN from another port: no authorization, nothing delivered.
    let backend = ip(tb.workload("backend-1"), v6);
    let db2 = ip(tb.workload("database-2"), v6);
    let (moved, to) = (SocketAddr::new(backend, 43001), SocketAddr::new(db2, 5432));
    let udp_in = count_delivered(&tb, "database-2", "17", v6);
    let before = udp_in();
    let metric2 = |r: &str| metric(&tb, 2, "reason", r);
    let replay0 = metric2("replay");
    let payload = syn.udp_payload().unwrap().to_vec();
    inject_bytes(&tb.nodes[0], db2, udp_packet(moved, to, &payload));
    std::thread::sleep(Duration::from_millis(50));
    inject_bytes(&tb.nodes[0], db2, udp_packet(moved, to, b"moved data"));
    std::thread::sleep(Duration::from_millis(300));
    // Its nonce was recorded when it authorized the genuine flow.
    assert_eq!(
        metric2("replay") - replay0,
        1.0,
        "the moved bound SYN is a replay:\n{}",
        tb.agent_logs()
    );
    assert_eq!(
        bound(&tb.agent(2).metrics(), "authorized"),
        bound(&n2, "authorized")
    );
    let replay0 = metric2("replay");
    // The same bound SYN from its own source, once the server's agent forgot the flow (a
    // lingering state would answer it again, authorizing nothing new).
    let replayed = (0..10).any(|_| {
        std::thread::sleep(Duration::from_millis(500));
        inject_bytes(&tb.nodes[0], db2, syn.0.clone());
        std::thread::sleep(Duration::from_millis(100));
        metric2("replay") > replay0
    });
    assert!(
        replayed,
        "the bound SYN replayed from its source:\n{}",
        tb.agent_logs()
    );
    assert_eq!(udp_in() - before, 0, "nothing reaches database-2");
    assert_eq!(
        bound(&tb.agent(2).metrics(), "authorized"),
        bound(&n2, "authorized")
    );

    // A bound SYN kept from the server (node 1's FORWARD drops bound SYNs) and sent first from
    // another port: the binding's MAC covers the source, so it is a plain SYN there
    // (`binding_bad_mac`), and the data behind it reaches nothing. The genuine flow connects
    // with the plain SYN its agent re-sends 25 ms later, and node 2 is remembered as silent.
    let (iptables, u32) = if v6 {
        ("ip6tables", bound_syn_u32_v6())
    } else {
        (
            "iptables",
            format!(
                "{}&&0>>22&0x3C@16>>24={:#x}",
                control_u32(),
                identity::wire::TYPE_SYN_BOUND
            ),
        )
    };
    let rule = ["-m", "u32", "--u32", u32.as_str()];
    forward_drop(&tb.nodes[0], iptables, "-I", &rule);
    let mut at_client = Capture::start_any(&tb.workload("backend-1").ns, move |p| {
        p.udp_payload()
            .is_some_and(|u| u.starts_with(&magic) && u[8] == identity::wire::TYPE_SYN_BOUND)
    });
    let (m1, m2) = (tb.agent(1).metrics(), tb.agent(2).metrics());
    let exchanged = udp_exchange(&tb, "backend-1", "database-2", 5432, v6, 2);
    forward_drop(&tb.nodes[0], iptables, "-D", &rule);
    assert_eq!(exchanged, (2, 2), "kept-away flow\n{}", tb.agent_logs());
    let kept = at_client
        .wait_for(Duration::from_secs(2), |_| true)
        .expect("the kept-away bound SYN was captured");
    assert_eq!(
        bound(&tb.agent(1).metrics(), "retransmitted_plain") - bound(&m1, "retransmitted_plain"),
        1.0
    );
    let moved = SocketAddr::new(backend, 43002);
    let before = udp_in();
    let payload = kept.udp_payload().unwrap().to_vec();
    inject_bytes(&tb.nodes[0], db2, udp_packet(moved, to, &payload));
    std::thread::sleep(Duration::from_millis(50));
    inject_bytes(&tb.nodes[0], db2, udp_packet(moved, to, b"moved data"));
    std::thread::sleep(Duration::from_millis(300));
    let n2 = tb.agent(2).metrics();
    assert_eq!(
        bound(&n2, "binding_bad_mac") - bound(&m2, "binding_bad_mac"),
        1.0,
        "the moved bound SYN was taken as a plain one:\n{}",
        tb.agent_logs()
    );
    assert_eq!(bound(&n2, "authorized"), bound(&m2, "authorized"));
    assert_eq!(udp_in() - before, 0, "nothing reaches database-2");
}

/// The IPv6 twin of the IPv4 `u32` match for bound SYN controls: a bare 40-byte header, so the
/// UDP payload starts at byte 48.
fn bound_syn_u32_v6() -> String {
    let m = identity::wire::UDP_CONTROL_MAGIC;
    let word = |i: usize| u32::from_be_bytes([m[i], m[i + 1], m[i + 2], m[i + 3]]);
    format!(
        "48={:#x}&&52={:#x}&&56>>24={:#x}",
        word(0),
        word(4),
        identity::wire::TYPE_SYN_BOUND
    )
}

#[test]
fn bound_udp_handshake_ipv4() {
    if testbed::privileged("bound_udp_handshake_ipv4") {
        bound_udp_handshake(false, Mode::Psk);
    }
}

#[test]
fn bound_udp_handshake_ipv6() {
    if testbed::privileged("bound_udp_handshake_ipv6") {
        bound_udp_handshake(true, Mode::Psk);
    }
}

#[test]
fn bound_udp_handshake_pki() {
    if testbed::privileged("bound_udp_handshake_pki") {
        bound_udp_handshake(false, Mode::Pki);
    }
}
