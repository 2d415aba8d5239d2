//! The agent's workload lifecycle on the real kernel, with the static runtime: the inventory is
//! edited while the agent runs (a workload added, removed, a bad version refused), and
//! `tessera status` shows what is enforced. Needs root (tests/run.sh runs it in CI); without
//! root it prints a SKIP line locally and fails under CI=true.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use testbed::{AgentConfig, Mode, Testbed, WorkloadSpec, echo_once};

const TESSERA: &str = env!("CARGO_BIN_EXE_tessera");
const OK_TIMEOUT: Duration = Duration::from_secs(10);

fn enforced(ns: &str) -> bool {
    Testbed::mangle_rules(ns).contains("TESSERA-INPUT")
}

fn wait_until(what: &str, tb: &Testbed, f: impl Fn() -> bool) {
    let start = Instant::now();
    while !f() {
        if start.elapsed() > Duration::from_secs(15) {
            panic!("timed out waiting for: {what}\n{}", tb.agent_logs());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn status(tb: &Testbed, node: u8, json: bool) -> String {
    let addr = tb.agent(node).metrics_addr().to_string();
    let mut cmd = Command::new(TESSERA);
    cmd.args(["status", "--addr", &addr]);
    if json {
        cmd.args(["--output", "json"]);
    }
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "tessera status: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Rewrites node 1's inventory (the file the agent was started with) to the given text; the
/// agent polls it every second. The modification time must change even within one second.
fn write_inventory(tb: &Testbed, text: &str) {
    let path = tb.dir().join("inventory-n1.yaml");
    let before = std::fs::metadata(&path).and_then(|m| m.modified()).ok();
    std::fs::write(&path, text).unwrap();
    while std::fs::metadata(&path).and_then(|m| m.modified()).ok() == before {
        std::thread::sleep(Duration::from_millis(20));
        std::fs::write(&path, text).unwrap();
    }
}

fn inventory_is_followed(mode: Mode) {
    let tb = Testbed::builder()
        .policies(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/three-tier/policies"))
        .workload(WorkloadSpec::new("frontend-1", 1, "WebFrontend").port(Some("http"), 80))
        .workload(WorkloadSpec::new("backend-1", 1, "BusinessBackend").port(Some("api"), 8080))
        .workload(WorkloadSpec::new("database-2", 2, "Database").port(None, 5432))
        .agents(AgentConfig::new(Path::new(TESSERA), mode))
        .build();
    let full = tb.inventory_yaml(1);
    let frontend = tb.workload("frontend-1").ns.clone();
    let backend = tb.workload("backend-1").ns.clone();
    assert!(enforced(&frontend) && enforced(&backend));
    let text = status(&tb, 1, false);
    assert!(
        text.contains("shop/frontend-1") && text.contains("shop/backend-1"),
        "{text}"
    );
    assert!(text.contains("WORKLOADS (2)"), "{text}");

    // A database may not reach the backend (its egress, the backend's ingress): enforced.
    assert!(
        tb.connect("database-2", "backend-1", 8080, Duration::from_secs(2))
            .is_err(),
        "database -> backend got through"
    );

    // The backend leaves the inventory: its rules go, so nothing isolates it any more.
    let only_frontend: String = {
        let tb_text = full.clone();
        let start = tb_text.find("- name: backend-1").unwrap();
        let end = tb_text[start + 1..]
            .find("\n- name:")
            .map_or(tb_text.len(), |i| start + 1 + i + 1);
        format!("{}{}", &tb_text[..start], &tb_text[end..])
    };
    write_inventory(&tb, &only_frontend);
    wait_until("backend-1's rules removed", &tb, || !enforced(&backend));
    assert!(enforced(&frontend), "frontend-1 lost its rules");
    let json = status(&tb, 1, true);
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    let names: Vec<&str> = v["workloads"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["shop/frontend-1"]);

    // A bad inventory is refused; what is enforced stays.
    write_inventory(&tb, "workloads:\n  - {name: x, namespace: shop}\n");
    wait_until("the bad inventory reported", &tb, || {
        tb.agent_logs().contains("inventory reload refused")
    });
    assert!(enforced(&frontend), "a bad inventory removed rules");
    assert!(!enforced(&backend));

    // Back in the inventory: enforced again, and policy applies to it again.
    write_inventory(&tb, &full);
    wait_until("backend-1 enforced again", &tb, || enforced(&backend));
    wait_until("backend-1 in the status again", &tb, || {
        status(&tb, 1, false).contains("shop/backend-1")
    });
    assert!(
        tb.connect("database-2", "backend-1", 8080, Duration::from_secs(2))
            .is_err(),
        "database -> backend got through after re-enforcement"
    );
    let mut s = tb
        .connect("frontend-1", "backend-1", 8080, OK_TIMEOUT)
        .unwrap();
    echo_once(&mut s, 1).unwrap();
    let text = status(&tb, 1, false);
    assert!(
        text.contains("COUNTERS") && text.contains("rejected"),
        "{text}"
    );

    // A workload that cannot be enforced (its netns does not exist): the agent lives on
    // (/healthz), is not ready (/readyz names it), and says so in its status.
    let addr = tb.agent(1).metrics_addr();
    let ghost = format!(
        "{full}- name: ghost\n  namespace: shop\n  labels: {{role: Database}}\n  namespaceLabels: {{kubernetes.io/metadata.name: shop}}\n  netns: /run/netns/ts-no-such-netns-{}\n",
        std::process::id()
    );
    write_inventory(&tb, &ghost);
    wait_until("/readyz reports the ghost", &tb, || {
        ready_body(addr).is_some_and(|(code, body)| code == 503 && body.contains("shop/ghost"))
    });
    assert!(testbed::agent::http_get(addr, "/healthz").is_some());
    let text = status(&tb, 1, false);
    assert!(
        text.contains("NOT ENFORCED (1)") && text.contains("shop/ghost"),
        "{text}"
    );
    assert!(enforced(&frontend) && enforced(&backend));
    write_inventory(&tb, &full);
    wait_until("/readyz ok again", &tb, || {
        ready_body(addr).is_some_and(|(code, _)| code == 200)
    });
}

/// `/readyz`: status code and body.
fn ready_body(addr: std::net::SocketAddr) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET /readyz HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
    let mut resp = String::new();
    s.read_to_string(&mut resp).ok()?;
    let (head, body) = resp.split_once("\r\n\r\n")?;
    let code = head.split_whitespace().nth(1)?.parse().ok()?;
    Some((code, body.to_owned()))
}

#[test]
fn netns_agent_follows_inventory_edits_psk() {
    if testbed::privileged("netns_agent_follows_inventory_edits_psk") {
        inventory_is_followed(Mode::Psk);
    }
}

#[test]
fn netns_agent_follows_inventory_edits_pki() {
    if testbed::privileged("netns_agent_follows_inventory_edits_pki") {
        inventory_is_followed(Mode::Pki);
    }
}
