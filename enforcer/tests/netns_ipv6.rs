//! IPv6 through the agents on the real kernel: the dual-stack testbed (`.ipv6(true)`: ULA
//! addresses mirroring the IPv4 plan, IPv6 forwarding inside the node namespaces only), one
//! `tessera run` per node, in PSK and in PKI mode, every connection made to the workloads'
//! IPv6 addresses. Needs root (tests/run.sh runs them in CI); without root they print a SKIP
//! line locally and fail under CI=true.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use testbed::topo::Cell;
use testbed::{AgentConfig, Mode, Testbed, WorkloadSpec, echo_once, run_in};

const TESSERA: &str = env!("CARGO_BIN_EXE_tessera");
/// Connect timeout: a denied SYN is dropped, so the client's connect() times out after this.
const DENIED_TIMEOUT: Duration = Duration::from_secs(2);
/// Generous timeout for what must succeed.
const OK_TIMEOUT: Duration = Duration::from_secs(10);

fn policies() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/three-tier/policies")
}

/// The three tiers on both nodes, an External client with a port nobody isolates, and a
/// plain listener (no agent) on node 2; dual-stack.
fn three_tier6(mode: Mode) -> Testbed {
    Testbed::builder()
        .ipv6(true)
        .policies(&policies())
        .workload(WorkloadSpec::new("external-1", 1, "External").port(None, 9000))
        .workload(WorkloadSpec::new("frontend-1", 1, "WebFrontend").port(Some("http"), 80))
        .workload(WorkloadSpec::new("backend-1", 1, "BusinessBackend").port(Some("api"), 8080))
        .workload(WorkloadSpec::new("database-1", 1, "Database").port(Some("postgres"), 5432))
        .workload(WorkloadSpec::new("frontend-2", 2, "WebFrontend").port(Some("http"), 80))
        .workload(WorkloadSpec::new("backend-2", 2, "BusinessBackend").port(Some("api"), 8080))
        .workload(WorkloadSpec::new("database-2", 2, "Database").port(Some("postgres"), 5432))
        .workload(
            WorkloadSpec::new("plain-2", 2, "Plain")
                .port(None, 9100)
                .unenforced(),
        )
        .agents(AgentConfig::new(Path::new(TESSERA), mode))
        .build()
}

/// Sum of the samples labelled `key="value"` over both agents.
fn counted(tb: &Testbed, key: &str, value: &str) -> f64 {
    tb.agent(1).metrics().sum_with_label(key, value)
        + tb.agent(2).metrics().sum_with_label(key, value)
}

/// Counts (packets) the IPv6 SYNs to port 9100 carrying Tessera's option that cross node 2 (the
/// plain listener's node): installed in its FORWARD chain, accepts what it matches.
fn count_token_syns_to_plain(tb: &Testbed) {
    run_in(
        &tb.nodes[1],
        &[
            "ip6tables",
            "-A",
            "FORWARD",
            "-p",
            "tcp",
            "--dport",
            "9100",
            "--syn",
            "--tcp-option",
            "253",
            "-j",
            "ACCEPT",
        ],
    );
}

fn token_syns_to_plain(tb: &Testbed) -> u64 {
    let rules = run_in(&tb.nodes[1], &["ip6tables", "-nvxL", "FORWARD"]);
    rules
        .lines()
        .find(|l| l.contains("dpt:9100"))
        .and_then(|l| l.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no counting rule in node 2's FORWARD:\n{rules}"))
}

/// Over IPv6, every pair of workloads (same node and across nodes) on each port the destination
/// declares connects exactly when `tessera policy matrix` says allowed (ingress denials time
/// out, egress-only denials are refused at once), as the IPv4 matrix test asserts; the agents
/// count the verified handshakes and every rejection by reason; a token-carrying IPv6 SYN
/// reaches the plain listener (no agent) and its connection works.
fn matrix6_matches_the_policy_engine(mode: Mode) {
    let tb = three_tier6(mode);
    let mut cells = tb.policy_matrix(Path::new(TESSERA));
    assert!(cells.len() >= 40, "matrix too small: {cells:?}");
    let pod_cells_allowed = cells.iter().filter(|c| c.allowed).count();
    // The plain listener: an IP-only peer, decided on its IPv6 address at the SYN-ACK by the
    // source's egress (the databases' egress allows databases only).
    for w in tb.workloads.iter().filter(|w| w.spec.enforced) {
        let db = w.spec.labels.get("role").is_some_and(|r| r == "Database");
        cells.push(Cell {
            from: w.spec.name.clone(),
            to: "plain-2".into(),
            port: 9100,
            allowed: !db,
            reason: if db {
                "denied: egress (IP-only peer)".into()
            } else {
                "allowed: IP-only peer, egress not isolated".into()
            },
        });
    }
    count_token_syns_to_plain(&tb);
    let verified_before = counted(&tb, "peer", "verified");
    let ip_only_before = counted(&tb, "peer", "ip_only");
    let outcomes = tb.probe(&cells, true, OK_TIMEOUT, DENIED_TIMEOUT);
    let mut wrong = Vec::new();
    let (mut ingress_denied, mut egress_denied) = (0, 0);
    for (c, got) in cells.iter().zip(&outcomes) {
        let cell = format!(
            "{} -> {} ({})",
            c.from,
            c.to,
            tb.workload(&c.to).addr6(c.port)
        );
        match (got, c.allowed) {
            (Ok(()), true) => {}
            (Err(e), false) if c.reason.contains("ingress: denied") => {
                ingress_denied += 1;
                if e.kind() != ErrorKind::TimedOut {
                    wrong.push(format!(
                        "{cell}: ingress-denied, expected a timeout, got {e}"
                    ));
                }
            }
            (Err(e), false) => {
                egress_denied += 1;
                if e.kind() != ErrorKind::ConnectionRefused {
                    wrong.push(format!(
                        "{cell}: egress-denied, expected connection refused (RST), got {e} ({})",
                        c.reason
                    ));
                }
            }
            _ => wrong.push(format!(
                "{cell}: engine says {}, datapath gave {got:?} ({})",
                if c.allowed { "allowed" } else { "denied" },
                c.reason
            )),
        }
    }
    assert!(
        wrong.is_empty(),
        "{} of {} IPv6 cells wrong:\n{}\nnode 1 /metrics:\n{}\nnode 2 /metrics:\n{}\n{}",
        wrong.len(),
        cells.len(),
        wrong.join("\n"),
        tb.agent(1).metrics().text,
        tb.agent(2).metrics().text,
        tb.agent_logs()
    );
    assert!(
        ingress_denied > 0 && egress_denied > 0,
        "{ingress_denied} {egress_denied}"
    );
    // Every allowed pod-to-pod connection was authorized as a verified peer twice: by the
    // server's agent (SYN and ACK tokens) and by the client's (SYN-ACK token); the connections
    // to the plain listener as IP-only peers by the client's.
    let verified = counted(&tb, "peer", "verified") - verified_before;
    assert!(
        verified >= 2.0 * pod_cells_allowed as f64,
        "{verified} verified flows for {pod_cells_allowed} allowed IPv6 pod-to-pod connections\n{}\n{}",
        tb.agent(1).metrics().text,
        tb.agent(2).metrics().text
    );
    let ip_only = counted(&tb, "peer", "ip_only") - ip_only_before;
    assert!(ip_only >= 5.0, "{ip_only} IP-only flows authorized");
    for (reason, n) in [
        ("policy_ingress", ingress_denied),
        ("policy_egress", egress_denied),
    ] {
        assert!(
            counted(&tb, "reason", reason) >= f64::from(n),
            "{reason} counted {} < {n}",
            counted(&tb, "reason", reason)
        );
    }
    // The plain listener (no agent) was reached, by SYNs that carried a token: the enforced
    // clients not denied by their egress (the databases') are 5 of the 7.
    assert!(tb.server("plain-2", 9100).accepted() >= 5);
    let syns = token_syns_to_plain(&tb);
    assert!(
        syns >= 5,
        "{syns} token-carrying IPv6 SYNs to the plain listener crossed node 2"
    );
}

#[test]
fn netns_ipv6_matrix_matches_the_policy_engine_psk() {
    if testbed::privileged("netns_ipv6_matrix_matches_the_policy_engine_psk") {
        matrix6_matches_the_policy_engine(Mode::Psk);
    }
}

#[test]
fn netns_ipv6_matrix_matches_the_policy_engine_pki() {
    if testbed::privileged("netns_ipv6_matrix_matches_the_policy_engine_pki") {
        matrix6_matches_the_policy_engine(Mode::Pki);
    }
}

/// A known payload, not a repeating byte: a shifted or inserted token would show.
fn payload(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 + i / 251) as u8).collect()
}

/// Writes `data` at once (the first segment rides with or right after the ACK token) and
/// reads back exactly as many bytes.
fn echo_all(s: &mut TcpStream, data: &[u8]) -> std::io::Result<Vec<u8>> {
    s.write_all(data)?;
    let mut back = vec![0u8; data.len()];
    s.read_exact(&mut back)?;
    Ok(back)
}

/// The applications see no token bytes over IPv6: a known payload echoed by the server comes
/// back exactly, on a same-node and a cross-node connection between enforced workloads and to
/// the plain listener (token-carrying SYN, no agent to strip it: the kernel ignores the
/// option); the server application accepted each connection once.
fn ipv6_payload_arrives_intact(mode: Mode) {
    let tb = Testbed::builder()
        .ipv6(true)
        .policies(&policies())
        .workload(WorkloadSpec::new("frontend-1", 1, "WebFrontend").port(Some("http"), 80))
        .workload(WorkloadSpec::new("backend-1", 1, "BusinessBackend").port(Some("api"), 8080))
        .workload(WorkloadSpec::new("backend-2", 2, "BusinessBackend").port(Some("api"), 8080))
        .workload(
            WorkloadSpec::new("plain-2", 2, "Plain")
                .port(None, 9100)
                .unenforced(),
        )
        .agents(AgentConfig::new(Path::new(TESSERA), mode))
        .build();
    count_token_syns_to_plain(&tb);
    let data = payload(5000);
    for (to, port) in [("backend-1", 8080), ("backend-2", 8080), ("plain-2", 9100)] {
        let mut s = tb
            .connect6("frontend-1", to, port, OK_TIMEOUT)
            .unwrap_or_else(|e| panic!("frontend-1 -> {to} over IPv6: {e}\n{}", tb.agent_logs()));
        assert!(s.peer_addr().unwrap().is_ipv6());
        let back = echo_all(&mut s, &data)
            .unwrap_or_else(|e| panic!("frontend-1 -> {to}: echo: {e}\n{}", tb.agent_logs()));
        let first_diff = back.iter().zip(&data).position(|(a, b)| a != b);
        assert!(
            first_diff.is_none(),
            "frontend-1 -> {to}: echo differs from byte {first_diff:?}: the application saw other bytes than were sent"
        );
        // And the stream stays in step afterwards.
        echo_once(&mut s, 0xA5).unwrap();
        assert_eq!(tb.server(to, port).accepted(), 1, "{to}");
    }
    assert_eq!(
        token_syns_to_plain(&tb),
        1,
        "the IPv6 SYN to the plain listener carried a token"
    );
    // The agents verified the enforced handshakes, each side: node 1 both sides of the
    // same-node connection and the client side of the cross-node one, node 2 its server side;
    // node 1 let the plain listener's tokenless SYN-ACK in as an IP-only peer.
    let (m1, m2) = (tb.agent(1).metrics(), tb.agent(2).metrics());
    assert!(m1.sum_with_label("peer", "verified") >= 3.0, "{}", m1.text);
    assert!(m2.sum_with_label("peer", "verified") >= 1.0, "{}", m2.text);
    assert!(m1.sum_with_label("peer", "ip_only") >= 1.0, "{}", m1.text);
}

#[test]
fn netns_ipv6_payload_arrives_intact_psk() {
    if testbed::privileged("netns_ipv6_payload_arrives_intact_psk") {
        ipv6_payload_arrives_intact(Mode::Psk);
    }
}

#[test]
fn netns_ipv6_payload_arrives_intact_pki() {
    if testbed::privileged("netns_ipv6_payload_arrives_intact_pki") {
        ipv6_payload_arrives_intact(Mode::Pki);
    }
}

/// frontend-1 (node 1) and backend-2 (node 2), dual-stack.
fn pair6(mode: Mode) -> Testbed {
    Testbed::builder()
        .ipv6(true)
        .policies(&policies())
        .workload(WorkloadSpec::new("frontend-1", 1, "WebFrontend").port(Some("http"), 80))
        .workload(WorkloadSpec::new("backend-2", 2, "BusinessBackend").port(Some("api"), 8080))
        .agents(AgentConfig::new(Path::new(TESSERA), mode))
        .build()
}

/// The IPv6 re-authorization path (ip6tables' CONNMARK rules): the first ACK token that
/// crosses node 1 is dropped; the client's data is refused by the server's agent
/// (`ack_missing`) until the server re-sends its SYN-ACK, the client's agent clears the flow's
/// mark and the duplicate ACK carries the token again: the echo completes.
fn ipv6_lost_ack_token_recovers(mode: Mode) {
    let tb = pair6(mode);
    run_in(
        &tb.nodes[0],
        &[
            "ip6tables",
            "-A",
            "FORWARD",
            "-p",
            "tcp",
            "--dport",
            "8080",
            "--tcp-flags",
            "ALL",
            "ACK",
            "--tcp-option",
            "253",
            "-m",
            "statistic",
            "--mode",
            "nth",
            "--every",
            "100000",
            "--packet",
            "0",
            "-j",
            "DROP",
        ],
    );
    let mut s = tb
        .connect6("frontend-1", "backend-2", 8080, OK_TIMEOUT)
        .unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let r = echo_once(&mut s, 7);
    assert!(
        r.is_ok(),
        "echo over IPv6 after a lost ACK token: {r:?}\n{}\n{}",
        tb.agent(1).metrics().text,
        tb.agent(2).metrics().text
    );
    let rules = run_in(&tb.nodes[0], &["ip6tables", "-nvxL", "FORWARD"]);
    let dropped: u64 = rules
        .lines()
        .find(|l| l.contains("statistic"))
        .and_then(|l| l.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    assert_eq!(dropped, 1, "the first ACK token was dropped once:\n{rules}");
    assert!(
        tb.agent(2)
            .metrics()
            .sum_with_label("reason", "ack_missing")
            >= 1.0,
        "the client's data was refused until the proof came again\n{}",
        tb.agent(2).metrics().text
    );
    echo_once(&mut s, 8).unwrap();
}

#[test]
fn netns_ipv6_lost_ack_token_recovers_psk() {
    if testbed::privileged("netns_ipv6_lost_ack_token_recovers_psk") {
        ipv6_lost_ack_token_recovers(Mode::Psk);
    }
}

#[test]
fn netns_ipv6_lost_ack_token_recovers_pki() {
    if testbed::privileged("netns_ipv6_lost_ack_token_recovers_pki") {
        ipv6_lost_ack_token_recovers(Mode::Pki);
    }
}

/// 2% random loss on the inter-node link over IPv6 (node 1's FORWARD, both directions): every
/// one of 200 connections completes and echoes (retransmitted SYN, SYN-ACK and ACK carry the
/// same tokens), and the server application accepted each once.
fn ipv6_connections_complete_under_loss(mode: Mode) {
    let tb = pair6(mode);
    run_in(
        &tb.nodes[0],
        &[
            "ip6tables",
            "-A",
            "FORWARD",
            "-p",
            "tcp",
            "-m",
            "statistic",
            "--mode",
            "random",
            "--probability",
            "0.02",
            "-j",
            "DROP",
        ],
    );
    const N: usize = 200;
    const THREADS: usize = 10;
    let ns = tb.workload("frontend-1").ns.clone();
    let addr = tb.workload("backend-2").addr6(8080);
    let handles: Vec<_> = (0..THREADS)
        .map(|t| {
            let ns = ns.clone();
            std::thread::spawn(move || {
                let mut failures = Vec::new();
                for i in 0..N / THREADS {
                    let r = testbed::connect(&ns, addr, Duration::from_secs(20))
                        .and_then(|mut s| echo_once(&mut s, (t * 31 + i) as u8));
                    if let Err(e) = r {
                        failures.push(format!("connection {t}/{i}: {e}"));
                    }
                }
                failures
            })
        })
        .collect();
    let failures: Vec<String> = handles
        .into_iter()
        .flat_map(|h| h.join().unwrap())
        .collect();
    assert!(
        failures.is_empty(),
        "{} of {N} IPv6 connections failed under 2% loss:\n{}\n{}\nnode 1 /metrics:\n{}\nnode 2 /metrics:\n{}",
        failures.len(),
        failures.join("\n"),
        run_in(&tb.nodes[0], &["ip6tables", "-nvL", "FORWARD"]),
        tb.agent(1).metrics().text,
        tb.agent(2).metrics().text,
    );
    assert_eq!(tb.server("backend-2", 8080).accepted(), N);
}

#[test]
fn netns_ipv6_connections_complete_under_two_percent_loss_psk() {
    if testbed::privileged("netns_ipv6_connections_complete_under_two_percent_loss_psk") {
        ipv6_connections_complete_under_loss(Mode::Psk);
    }
}

#[test]
fn netns_ipv6_connections_complete_under_two_percent_loss_pki() {
    if testbed::privileged("netns_ipv6_connections_complete_under_two_percent_loss_pki") {
        ipv6_connections_complete_under_loss(Mode::Pki);
    }
}
