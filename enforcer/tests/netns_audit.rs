//! Audit mode on the real kernel (`tessera run --audit`): the three-tier policies are decided
//! and recorded as in enforce mode, but what they deny goes through. A database connecting to
//! a backend (denied by the backend's ingress and the database's egress; dropped in enforce
//! mode, see netns_agent.rs and netns_datapath.rs) connects and echoes, and both agents' flow
//! logs hold the denial with its policy, marked `audit`. Needs root (tests/run.sh runs it in
//! CI); without root it prints a SKIP line locally and fails under CI=true.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::time::Duration;

use testbed::agent::http_get;
use testbed::{AgentConfig, Mode, Testbed, WorkloadSpec, echo_once};

const TESSERA: &str = env!("CARGO_BIN_EXE_tessera");

#[test]
fn audit_mode_records_denials_and_drops_nothing() {
    if !testbed::privileged("audit_mode_records_denials_and_drops_nothing") {
        return;
    }
    let mut cfg = AgentConfig::new(Path::new(TESSERA), Mode::Psk);
    cfg.extra.push("--audit".into());
    let tb = Testbed::builder()
        .policies(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/three-tier/policies"))
        .workload(WorkloadSpec::new("backend-1", 1, "BusinessBackend").port(Some("api"), 8080))
        .workload(WorkloadSpec::new("database-2", 2, "Database").port(Some("postgres"), 5432))
        .agents(cfg)
        .build();
    let mut s = tb
        .connect("database-2", "backend-1", 8080, Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("audit mode dropped a denied flow: {e}\n{}", tb.agent_logs()));
    echo_once(&mut s, 3).unwrap();

    // Each end recorded its denial, marked audit (the agents drain every 100 ms).
    let (db, backend) = (
        tb.workload("database-2").ip.to_string(),
        tb.workload("backend-1").ip.to_string(),
    );
    for (node, direction, policy) in [(2, "egress", "database"), (1, "ingress", "backend")] {
        let mut found = None;
        for _ in 0..50 {
            let body = http_get(
                tb.agent(node).metrics_addr(),
                "/flows?verdict=denied&last=100",
            )
            .unwrap_or_default();
            found = body
                .lines()
                .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
                .find(|r| {
                    r["direction"] == direction
                        && r["source"]["ip"] == db.as_str()
                        && r["destination"]["ip"] == backend.as_str()
                });
            if found.is_some() {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let r = found.unwrap_or_else(|| {
            panic!(
                "node {node}: no {direction} denial recorded\n{}",
                tb.agent_logs()
            )
        });
        assert_eq!(r["audit"], true, "{r}");
        assert_eq!(r["policy"]["name"], policy, "{r}");
    }
    assert!(
        tb.agent_logs().contains("mode=\"audit\""),
        "{}",
        tb.agent_logs()
    );
}
