//! `tessera flows` against a testbed's agents, for the real-kernel flow-log tests.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;
use std::time::{Duration, Instant};

use datapath::flowlog::FlowRecord;
use testbed::Testbed;

const TESSERA: &str = env!("CARGO_BIN_EXE_tessera");

/// `tessera flows` against node `node`'s agent with `args`; its stdout.
pub fn flows(tb: &Testbed, node: u8, args: &[&str]) -> String {
    let addr = tb.agent(node).metrics_addr().to_string();
    let out = Command::new(TESSERA)
        .args(["flows", "--addr", &addr])
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "tessera flows: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Every record node `node` holds, parsed.
pub fn records(tb: &Testbed, node: u8) -> Vec<FlowRecord> {
    flows(tb, node, &["--output", "json", "--last", "10000"])
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

/// Waits (records are drained every 100 ms) for a record of node `node` that `f` accepts.
pub fn wait_record(
    tb: &Testbed,
    node: u8,
    what: &str,
    f: impl Fn(&FlowRecord) -> bool,
) -> FlowRecord {
    let start = Instant::now();
    loop {
        let all = records(tb, node);
        if let Some(r) = all.iter().find(|r| f(r)) {
            return r.clone();
        }
        if start.elapsed() > Duration::from_secs(10) {
            panic!(
                "node {node}: no record of {what}; it holds:\n{}\n{}",
                all.iter()
                    .map(|r| serde_json::to_string(r).unwrap())
                    .collect::<Vec<_>>()
                    .join("\n"),
                tb.agent_logs()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}
