//! Established connections that a policy change now denies are cut, on the real kernel: two
//! agents (static inventories, a policy directory the test edits), a client and another
//! workload on node 1, a server on node 2. A change that keeps the flows allowed cuts nothing;
//! a change that denies the client cuts its live connection (its next exchange fails with a
//! reset) and its idle one (the first write after the cut fails), while the other workload's
//! connection keeps working. The time from the policy file's write to the client noticing is
//! measured and split (reload latency, recheck, socket and conntrack deletion). A second test
//! cuts on the client's node (egress); a third drops the RST of the destroyed socket on its
//! way, so that the processor's answers to the flow's later packets must tell the client.
//! Needs root (tests/run.sh runs it in CI); without root it prints a SKIP line locally and
//! fails under CI=true.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::ErrorKind;
use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use datapath::shell::Netns;
use testbed::{AgentConfig, Mode, Testbed, WorkloadSpec, echo_once};

const TESSERA: &str = env!("CARGO_BIN_EXE_tessera");
const TIMEOUT: Duration = Duration::from_secs(10);

const HEAD: &str = "apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: server, namespace: shop}
spec:
  podSelector: {matchLabels: {role: Server}}
  ingress:
";

/// Client and Other may reach the server on 8080.
fn both_by_number() -> String {
    format!(
        "{HEAD}  - from: [{{podSelector: {{matchLabels: {{role: Client}}}}}}, {{podSelector: {{matchLabels: {{role: Other}}}}}}]\n    ports: [{{port: 8080}}]\n"
    )
}

/// The same flows allowed, written differently: by the port's name, one rule per peer.
fn both_by_name() -> String {
    format!(
        "{HEAD}  - from: [{{podSelector: {{matchLabels: {{role: Client}}}}}}]\n    ports: [{{port: api}}]\n  - from: [{{podSelector: {{matchLabels: {{role: Other}}}}}}]\n    ports: [{{port: api}}]\n"
    )
}

/// Only Other may connect now.
fn only_other() -> String {
    format!(
        "{HEAD}  - from: [{{podSelector: {{matchLabels: {{role: Other}}}}}}]\n    ports: [{{port: 8080}}]\n"
    )
}

/// Writes the policy file so that its modification time changes (the agents poll the directory
/// every second, by modification time).
fn write_policy(path: &Path, text: &str) {
    let before = std::fs::metadata(path).and_then(|m| m.modified()).ok();
    std::fs::write(path, text).unwrap();
    while std::fs::metadata(path).and_then(|m| m.modified()).ok() == before {
        std::thread::sleep(Duration::from_millis(20));
        std::fs::write(path, text).unwrap();
    }
}

fn reloads(log: &str) -> usize {
    log.matches("policies in force").count()
}

fn log_of(tb: &Testbed, node: u8) -> String {
    std::fs::read_to_string(tb.dir().join(format!("agent-n{node}.log"))).unwrap_or_default()
}

/// Waits until both agents have applied one more policy reload than `before`.
fn wait_reloaded(tb: &Testbed, before: [usize; 2]) {
    let start = Instant::now();
    while [1, 2]
        .iter()
        .any(|n| reloads(&log_of(tb, *n)) <= before[usize::from(*n - 1)])
    {
        assert!(
            start.elapsed() < TIMEOUT,
            "policy reload not applied\n{}",
            tb.agent_logs()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits until the agent of `node` has logged a cut (conntrack entries deleted) after byte
/// `from` of its log.
fn wait_cut_logged(tb: &Testbed, node: u8, from: usize) {
    let start = Instant::now();
    while !log_of(tb, node)[from..].contains("conntrack entries deleted") {
        assert!(
            start.elapsed() < TIMEOUT,
            "no cut logged\n{}",
            tb.agent_logs()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn reload_counts(tb: &Testbed) -> [usize; 2] {
    [reloads(&log_of(tb, 1)), reloads(&log_of(tb, 2))]
}

fn cut_total(tb: &Testbed, node: u8) -> f64 {
    tb.agent(node).metrics().sum("tessera_flows_cut_total")
}

/// Seconds since midnight UTC of a log line's RFC 3339 timestamp (`...THH:MM:SS.ffffffZ`).
fn log_time(line: &str) -> Option<f64> {
    let ts = line.split_whitespace().next()?;
    let t = ts.split_once('T')?.1.trim_end_matches('Z');
    let mut parts = t.split(':');
    let h: f64 = parts.next()?.parse().ok()?;
    let m: f64 = parts.next()?.parse().ok()?;
    let s: f64 = parts.next()?.parse().ok()?;
    Some(h * 3600.0 + m * 60.0 + s)
}

fn seconds_of_day(t: SystemTime) -> f64 {
    let d = t.duration_since(UNIX_EPOCH).unwrap();
    (d.as_secs() % 86_400) as f64 + f64::from(d.subsec_nanos()) / 1e9
}

/// A field `key=value` of a log line, as a number.
fn field(line: &str, key: &str) -> Option<f64> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(&format!("{key}=")))
        .and_then(|v| v.parse().ok())
}

fn cut_on_policy_change(mode: Mode) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("server.yaml");
    write_policy(&file, &both_by_number());
    let tb = Testbed::builder()
        .policies(dir.path())
        .workload(WorkloadSpec::new("client-1", 1, "Client"))
        .workload(WorkloadSpec::new("other-1", 1, "Other"))
        .workload(WorkloadSpec::new("server-2", 2, "Server").port(Some("api"), 8080))
        .agents(AgentConfig::new(Path::new(TESSERA), mode))
        .build();

    let mut live = tb.connect("client-1", "server-2", 8080, TIMEOUT).unwrap();
    let mut idle = tb.connect("client-1", "server-2", 8080, TIMEOUT).unwrap();
    let mut other = tb.connect("other-1", "server-2", 8080, TIMEOUT).unwrap();
    let tuple = |s: &std::net::TcpStream| (s.local_addr().unwrap(), s.peer_addr().unwrap());
    let (live_t, idle_t, other_t) = (tuple(&live), tuple(&idle), tuple(&other));
    let server_ns = Netns::from_path(format!("/run/netns/{}", tb.workload("server-2").ns));
    for s in [&mut live, &mut idle, &mut other] {
        echo_once(s, 1).unwrap();
    }

    // A change that keeps every flow allowed cuts nothing.
    let before = reload_counts(&tb);
    write_policy(&file, &both_by_name());
    wait_reloaded(&tb, before);
    for s in [&mut live, &mut idle, &mut other] {
        echo_once(s, 2).unwrap();
    }
    assert_eq!(cut_total(&tb, 2), 0.0, "{}", tb.agent_logs());
    assert_eq!(cut_total(&tb, 1), 0.0);

    // A change that denies the client: its live connection is probed every 10 ms from the
    // moment the file is written until an exchange fails.
    let log_len = log_of(&tb, 2).len();
    let before = reload_counts(&tb);
    let written_at = SystemTime::now();
    let t0 = Instant::now();
    write_policy(&file, &only_other());
    let probe = std::thread::spawn(move || {
        let mut b = 3u8;
        loop {
            if let Err(e) = echo_once(&mut live, b) {
                return (t0.elapsed(), e);
            }
            b = b.wrapping_add(1);
            assert!(t0.elapsed() < TIMEOUT, "the connection was never cut");
            std::thread::sleep(Duration::from_millis(10));
        }
    });
    let (noticed, err) = probe.join().unwrap();
    assert!(
        matches!(
            err.kind(),
            ErrorKind::ConnectionReset | ErrorKind::UnexpectedEof | ErrorKind::BrokenPipe
        ),
        "the cut connection must fail with a reset or EOF, not a timeout: {err:?}"
    );
    wait_reloaded(&tb, before);
    wait_cut_logged(&tb, 2, log_len);
    // The idle connection: the first exchange after the cut fails too.
    let err = echo_once(&mut idle, 9).unwrap_err();
    assert!(
        matches!(
            err.kind(),
            ErrorKind::ConnectionReset | ErrorKind::UnexpectedEof | ErrorKind::BrokenPipe
        ),
        "idle connection: {err:?}"
    );
    // The other workload's connection is not affected.
    echo_once(&mut other, 10).unwrap();
    echo_once(&mut other, 11).unwrap();
    // Only node 2 (ingress) cuts: the client's egress is not isolated.
    assert_eq!(cut_total(&tb, 2), 2.0, "{}", tb.agent_logs());
    assert_eq!(cut_total(&tb, 1), 0.0);
    assert_eq!(tb.agent(2).metrics().sum("tessera_cut_flows"), 2.0);
    // In the server's netns the cut flows' conntrack entries are gone, the other one is there
    // (what pruning lists).
    let listed: std::collections::HashSet<_> = datapath::shell::conntrack::list(&server_ns)
        .unwrap()
        .into_iter()
        .filter(|(p, _, _)| *p == policy::Protocol::Tcp)
        .map(|(_, src, dst)| (src, dst))
        .collect();
    assert!(listed.contains(&other_t), "{listed:?}");
    assert!(
        !listed.contains(&live_t) && !listed.contains(&idle_t),
        "{listed:?}"
    );
    // New connections from the client are refused as before.
    assert!(
        tb.connect("client-1", "server-2", 8080, Duration::from_secs(2))
            .is_err()
    );
    let mut again = tb.connect("other-1", "server-2", 8080, TIMEOUT).unwrap();
    echo_once(&mut again, 12).unwrap();

    // The split, from node 2's log.
    let log = log_of(&tb, 2)[log_len..].to_owned();
    let line = |needle: &str| {
        log.lines()
            .find(|l| l.contains(needle))
            .unwrap_or_else(|| panic!("no '{needle}' in node 2's log:\n{log}"))
            .to_owned()
    };
    let reload_line = line("policies in force");
    let reload_s = log_time(&reload_line).unwrap() - seconds_of_day(written_at);
    let recheck_us = field(&line("established flows now denied"), "recheck_us").unwrap();
    let cut_ms = field(&line("conntrack entries deleted"), "cut_ms").unwrap();
    eprintln!(
        "REVOKE {mode:?}: policy write -> client reset {:.1} ms = reload {:.1} ms (1 s directory poll) + recheck {:.3} ms + ss -K and conntrack -D {:.1} ms + the probe's next exchange",
        noticed.as_secs_f64() * 1e3,
        reload_s * 1e3,
        recheck_us / 1e3,
        cut_ms
    );
    assert!(
        (0.0..3.0).contains(&reload_s),
        "reload {reload_s} s\n{reload_line}"
    );
}

/// Client may reach the server on 8080 and the cache on 6379.
const EGRESS_BOTH: &str = "apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: client, namespace: shop}
spec:
  podSelector: {matchLabels: {role: Client}}
  policyTypes: [Egress]
  egress:
  - to: [{podSelector: {matchLabels: {role: Server}}}, {podSelector: {matchLabels: {role: Cache}}}]
";

/// Client may reach only the cache.
const EGRESS_CACHE: &str = "apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: client, namespace: shop}
spec:
  podSelector: {matchLabels: {role: Client}}
  policyTypes: [Egress]
  egress:
  - to: [{podSelector: {matchLabels: {role: Cache}}}]
";

/// The client's node cuts on its side (egress), decided at the SYN-ACK on the server's
/// verified identity; the connection to the still-allowed peer keeps working.
fn egress_cut(mode: Mode) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("client.yaml");
    write_policy(&file, EGRESS_BOTH);
    let tb = Testbed::builder()
        .policies(dir.path())
        .workload(WorkloadSpec::new("client-1", 1, "Client"))
        .workload(WorkloadSpec::new("server-2", 2, "Server").port(Some("api"), 8080))
        .workload(WorkloadSpec::new("cache-2", 2, "Cache").port(Some("redis"), 6379))
        .agents(AgentConfig::new(Path::new(TESSERA), mode))
        .build();
    let mut server = tb.connect("client-1", "server-2", 8080, TIMEOUT).unwrap();
    let mut cache = tb.connect("client-1", "cache-2", 6379, TIMEOUT).unwrap();
    echo_once(&mut server, 1).unwrap();
    echo_once(&mut cache, 1).unwrap();

    let log_len = log_of(&tb, 1).len();
    let before = reload_counts(&tb);
    write_policy(&file, EGRESS_CACHE);
    wait_reloaded(&tb, before);
    wait_cut_logged(&tb, 1, log_len);
    let err = echo_once(&mut server, 2).unwrap_err();
    assert!(
        matches!(
            err.kind(),
            ErrorKind::ConnectionReset
                | ErrorKind::ConnectionAborted
                | ErrorKind::UnexpectedEof
                | ErrorKind::BrokenPipe
        ),
        "{err:?}"
    );
    echo_once(&mut cache, 2).unwrap();
    let m = tb.agent(1).metrics();
    assert_eq!(m.sum_with_label("reason", "policy_egress"), 1.0, "{m:?}");
    assert_eq!(
        cut_total(&tb, 2),
        0.0,
        "the server's node has nothing to cut"
    );
    assert!(
        tb.connect("client-1", "server-2", 8080, Duration::from_secs(2))
            .is_err()
    );
}

#[test]
fn netns_egress_change_cuts_the_client_side_psk() {
    if testbed::privileged("netns_egress_change_cuts_the_client_side_psk") {
        egress_cut(Mode::Psk);
    }
}

/// When the RST sent as the server's socket is destroyed never reaches the client (dropped on
/// the way here), the processor's answers to the flow's later packets still tell the client:
/// the flow's conntrack entry is gone, so the client's data reaches the server's queue, and the
/// data never reaches a server application.
fn lost_reset(mode: Mode) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("server.yaml");
    write_policy(&file, &both_by_number());
    let tb = Testbed::builder()
        .policies(dir.path())
        .workload(WorkloadSpec::new("client-1", 1, "Client"))
        .workload(WorkloadSpec::new("server-2", 2, "Server").port(Some("api"), 8080))
        .agents(AgentConfig::new(Path::new(TESSERA), mode))
        .build();
    let mut s = tb.connect("client-1", "server-2", 8080, TIMEOUT).unwrap();
    echo_once(&mut s, 1).unwrap();

    let node2 = tb.nodes[1].clone();
    let drop_rst = [
        "FORWARD",
        "-p",
        "tcp",
        "--tcp-flags",
        "RST",
        "RST",
        "-j",
        "DROP",
    ];
    let iptables = |op: &str| {
        let mut args = vec!["iptables", "-w", op];
        args.extend(drop_rst);
        testbed::run_in(&node2, &args);
    };
    iptables("-I");
    let log_len = log_of(&tb, 2).len();
    let before = reload_counts(&tb);
    write_policy(&file, &only_other());
    wait_reloaded(&tb, before);
    wait_cut_logged(&tb, 2, log_len);
    iptables("-D");
    let err = echo_once(&mut s, 2).unwrap_err();
    assert!(
        matches!(
            err.kind(),
            ErrorKind::ConnectionReset | ErrorKind::UnexpectedEof | ErrorKind::BrokenPipe
        ),
        "the client must learn of the cut from the processor's answers: {err:?}"
    );
    let m = tb.agent(2).metrics();
    assert!(m.sum_with_label("reason", "flow_cut") >= 1.0, "{m:?}");
}

#[test]
fn netns_cut_flow_with_lost_reset_is_told_by_the_processor_psk() {
    if testbed::privileged("netns_cut_flow_with_lost_reset_is_told_by_the_processor_psk") {
        lost_reset(Mode::Psk);
    }
}

#[test]
fn netns_policy_change_cuts_denied_established_connections_psk() {
    if testbed::privileged("netns_policy_change_cuts_denied_established_connections_psk") {
        cut_on_policy_change(Mode::Psk);
    }
}

#[test]
fn netns_policy_change_cuts_denied_established_connections_pki() {
    if testbed::privileged("netns_policy_change_cuts_denied_established_connections_pki") {
        cut_on_policy_change(Mode::Pki);
    }
}
