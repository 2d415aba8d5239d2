#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The fixture itself on the real kernel, without agents: routed reachability between
//! workloads on the same node and across nodes, and a teardown that leaves nothing behind.

use std::time::Duration;

use testbed::{Testbed, WorkloadSpec, echo_once, run};

#[test]
fn workloads_reach_each_other_and_teardown_removes_every_namespace() {
    if !testbed::privileged("workloads_reach_each_other_and_teardown_removes_every_namespace") {
        return;
    }
    let tb = Testbed::builder()
        .workload(WorkloadSpec::new("a1", 1, "x").port(None, 7000))
        .workload(WorkloadSpec::new("a2", 1, "x").port(None, 7000))
        .workload(WorkloadSpec::new("b1", 2, "x").port(None, 7000))
        .build();
    for (from, to) in [("a1", "a2"), ("a1", "b1"), ("b1", "a2")] {
        let mut s = tb
            .connect(from, to, 7000, Duration::from_secs(3))
            .unwrap_or_else(|e| panic!("{from} -> {to}: {e}"));
        echo_once(&mut s, 7).unwrap();
    }
    assert_eq!(tb.server("b1", 7000).accepted(), 1);
    // Addresses live inside the namespaces only: the host has no route to them.
    let host_routes = run(&["ip", "route", "show"]);
    assert!(
        !host_routes.contains(&tb.workload("b1").ip.to_string()),
        "{host_routes}"
    );
    let names = tb.all_netns();
    drop(tb);
    let left = run(&["ip", "netns", "list"]);
    for n in names {
        assert!(
            !left
                .lines()
                .any(|l| l.split_whitespace().next() == Some(n.as_str())),
            "{n} left behind"
        );
    }
}
