//! Flow records on the real kernel (docs/flow-log.md): two nodes, the three-tier policies, one
//! `tessera run --flow-log-allowed 1` per node, in PSK and in PKI mode. Connections are made
//! (allowed, denied by isolation, from a peer without agent), a forged token and a spoofed
//! packet are injected, and each node's records are read with `tessera flows`, as an operator
//! would: who the agent took each peer for and how it knew, which policy decided, and why a
//! packet was refused. Needs root (tests/run.sh runs it in CI); without root it prints a SKIP
//! line locally and fails under CI=true.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader};
use std::net::IpAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

mod flows_cli;

use datapath::flowlog::{FlowRecord, FlowVerdict, IdentitySource, PolicyKind};
use flows_cli::{flows, wait_record};
use policy::{Direction, Protocol};
use testbed::packet;
use testbed::{AgentConfig, Mode, Testbed, WorkloadSpec, echo_once};

const TESSERA: &str = env!("CARGO_BIN_EXE_tessera");
const DENIED_TIMEOUT: Duration = Duration::from_secs(2);
const OK_TIMEOUT: Duration = Duration::from_secs(10);

fn testbed(mode: Mode) -> Testbed {
    let mut agents = AgentConfig::new(Path::new(TESSERA), mode);
    agents.extra = vec!["--flow-log-allowed".into(), "1".into()];
    Testbed::builder()
        .policies(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/three-tier/policies"))
        .workload(WorkloadSpec::new("frontend-1", 1, "WebFrontend").port(Some("http"), 80))
        .workload(WorkloadSpec::new("external-1", 1, "External").unenforced())
        .workload(WorkloadSpec::new("backend-2", 2, "BusinessBackend").port(Some("api"), 8080))
        .workload(WorkloadSpec::new("db-2", 2, "Database").port(None, 5432))
        .agents(agents)
        .build()
}

fn ip(tb: &Testbed, w: &str) -> IpAddr {
    IpAddr::V4(tb.workload(w).ip)
}

fn records_are_made_on_the_kernel(mode: Mode) {
    let tb = testbed(mode);
    let token_identity = match mode {
        Mode::Psk => IdentitySource::Psk,
        Mode::Pki => IdentitySource::Pki,
    };
    let (frontend, external) = (ip(&tb, "frontend-1"), ip(&tb, "external-1"));
    let (backend, db) = (ip(&tb, "backend-2"), ip(&tb, "db-2"));

    // Following node 2 before anything happens: the live stream gets the records too.
    let (tx, rx) = mpsc::channel();
    let mut follower = Command::new(TESSERA)
        .args(["flows", "--follow", "--last", "0", "--output", "json"])
        .args(["--addr", &tb.agent(2).metrics_addr().to_string()])
        .args(["--pod", "backend-2", "--verdict", "allowed"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = follower.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });

    // `--last 0`: it gets only the records made once it follows. Wait for the agent to count
    // it (a debug binary on a loaded host can take a while to start and connect).
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while tb.agent(2).metrics().sum("tessera_flow_stream_followers") < 1.0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the follower never reached node 2's agent:\n{}",
            tb.agent(2).metrics().text
        );
        std::thread::sleep(Duration::from_millis(20));
    }

    // A token peer, allowed by a NetworkPolicy rule (node 2) and by the default (node 1).
    let mut s = tb
        .connect("frontend-1", "backend-2", 8080, OK_TIMEOUT)
        .unwrap();
    echo_once(&mut s, 1).unwrap();
    let r = wait_record(&tb, 2, "frontend-1 -> backend-2 allowed", |r| {
        r.verdict == FlowVerdict::Allowed && r.source.ip == frontend && r.port() == Some(8080)
    });
    assert_eq!(
        (r.node.as_str(), r.direction, r.protocol),
        ("node-n2", Direction::Ingress, Protocol::Tcp)
    );
    assert_eq!(
        (
            r.source.pod().as_deref(),
            r.source.identity,
            r.source.node.as_deref()
        ),
        (Some("shop/frontend-1"), token_identity, Some("node-n1"))
    );
    assert_eq!(
        r.source.labels.get("role").map(String::as_str),
        Some("WebFrontend")
    );
    assert_eq!(
        (r.destination.pod().as_deref(), r.destination.identity),
        (Some("shop/backend-2"), IdentitySource::Local)
    );
    let p = r.policy.clone().unwrap();
    assert_eq!(
        (p.kind, p.namespace.as_deref(), p.name.as_str(), p.rule),
        (PolicyKind::NetworkPolicy, Some("shop"), "backend", Some(0))
    );
    let line = rx
        .recv_timeout(Duration::from_secs(10))
        .expect("the follower got the record");
    let followed: FlowRecord = serde_json::from_str(&line).unwrap();
    assert_eq!(followed, r);
    let r = wait_record(&tb, 1, "frontend-1 -> backend-2 egress", |r| {
        r.direction == Direction::Egress && r.destination.ip == backend
    });
    assert_eq!(
        (
            r.verdict,
            r.destination.identity,
            r.destination.node.as_deref()
        ),
        (FlowVerdict::Allowed, token_identity, Some("node-n2"))
    );
    assert_eq!(
        r.policy.map(|p| (p.kind, p.name)),
        Some((PolicyKind::Default, "not_isolated".to_owned()))
    );

    // Denied by isolation: the database admits backends only.
    assert!(
        tb.connect("frontend-1", "db-2", 5432, DENIED_TIMEOUT)
            .is_err()
    );
    let r = wait_record(&tb, 2, "frontend-1 -> db-2 denied", |r| {
        r.verdict == FlowVerdict::Denied && r.destination.ip == db
    });
    assert_eq!(
        (r.reason.as_deref(), r.source.identity),
        (Some("policy_ingress"), token_identity)
    );
    let p = r.policy.unwrap();
    assert_eq!((p.kind, p.rule), (PolicyKind::NetworkPolicy, None));
    assert!(
        p.isolated_by.contains(&"shop/database".to_owned()),
        "{:?}",
        p.isolated_by
    );
    // The same, as text.
    let text = flows(&tb, 2, &["--verdict", "denied", "--pod", "db-2"]);
    assert!(
        text.lines().any(|l| l
            .contains("-> shop/db-2 [local] TCP 5432 ingress DENIED by NetworkPolicy")
            && l.contains("(policy_ingress)")),
        "{text}"
    );

    // A peer without agent: known by its address only; the uptime probe's admin rule wants
    // proven External pods, so the backend's isolation decides.
    assert!(
        tb.connect("external-1", "backend-2", 8080, DENIED_TIMEOUT)
            .is_err()
    );
    let r = wait_record(&tb, 2, "external-1 -> backend-2 denied", |r| {
        r.source.ip == external
    });
    assert_eq!(
        (r.verdict, r.source.identity, r.source.namespace.as_deref()),
        (FlowVerdict::Denied, IdentitySource::Ip, None)
    );
    assert!(
        r.policy
            .as_ref()
            .is_some_and(|p| p.isolated_by.contains(&"shop/backend".to_owned())),
        "{:?}",
        r.policy
    );

    // A forged token, injected from node 1 as if from frontend-1: refused with its reason.
    let key_reason = match mode {
        Mode::Psk => "psk_mismatch",
        Mode::Pki => "unknown_key",
    };
    let mode_byte = if mode == Mode::Pki { 1 } else { 2 };
    let forged = packet::syn_with_token(
        frontend,
        47_123,
        backend,
        8080,
        &packet::forged_syn_token(mode_byte, "shop", "WebFrontend"),
    );
    packet::inject(&tb.nodes[0], &forged);
    let r = wait_record(&tb, 2, "the forged token refused", |r| {
        r.reason.as_deref() == Some(key_reason)
    });
    assert_eq!(
        (
            r.direction,
            r.source.port,
            r.source.identity,
            r.policy.is_none()
        ),
        (Direction::Ingress, Some(47_123), IdentitySource::None, true)
    );
    assert!(r.detail.is_some(), "{r:?}");

    // A packet frontend-1 sends with another address: refused at its own node.
    let spoofed: IpAddr = "10.254.0.9".parse().unwrap();
    packet::inject_bytes(
        &tb.workload("frontend-1").ns,
        backend,
        packet::udp_packet((spoofed, 5000).into(), (backend, 8125).into(), b"x"),
    );
    let r = wait_record(&tb, 1, "the spoofed packet refused", |r| {
        r.reason.as_deref() == Some("spoofed_source")
    });
    assert_eq!(
        (r.direction, r.source.ip, r.source.pod().as_deref()),
        (Direction::Egress, spoofed, Some("shop/frontend-1"))
    );
    let text = flows(&tb, 1, &["--last", "1"]);
    assert!(
        text.contains("shop/frontend-1 (10.254.0.9) [local] -> ")
            && text.contains("UDP 8125 egress DENIED (spoofed_source)"),
        "{text}"
    );

    // The counts by policy.
    let m = tb.agent(2).metrics();
    assert!(
        m.text.contains(
            "tessera_policy_verdicts_total{policy=\"shop/backend\",kind=\"NetworkPolicy\",verdict=\"allowed\",direction=\"ingress\"} 1"
        ),
        "{}",
        m.text
    );
    assert!(
        m.text.lines().any(|l| l
            .starts_with("tessera_policy_verdicts_total{policy=\"shop/database,")
            && l.contains("verdict=\"denied\"")),
        "{}",
        m.text
    );
    eprintln!(
        "node 1:\n{}node 2:\n{}",
        flows(&tb, 1, &["--last", "50"]),
        flows(&tb, 2, &["--last", "50"])
    );
    let _ = follower.kill();
    let _ = follower.wait();
    drop(s);
}

#[test]
fn netns_flow_records_psk() {
    if testbed::privileged("netns_flow_records_psk") {
        records_are_made_on_the_kernel(Mode::Psk);
    }
}

#[test]
fn netns_flow_records_pki() {
    if testbed::privileged("netns_flow_records_pki") {
        records_are_made_on_the_kernel(Mode::Pki);
    }
}
