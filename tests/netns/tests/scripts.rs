#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The project's shell scripts: none may fail silently, and the demo's host-state snapshot works
//! on a pristine host (empty rulesets, no namespace), where it once died without a word because
//! `grep -v` selected nothing under `pipefail`.

use std::path::{Path, PathBuf};
use std::process::Command;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Every shell script of the repository (by `git ls-files`, plus .ci/run).
fn scripts() -> Vec<PathBuf> {
    let out = Command::new("git")
        .args([
            "ls-files",
            "--cached",
            "--others",
            "--exclude-standard",
            "*.sh",
        ])
        .current_dir(repo())
        .output()
        .expect("git ls-files");
    assert!(out.status.success(), "git ls-files failed");
    let mut all: Vec<PathBuf> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| repo().join(l))
        .collect();
    all.push(repo().join(".ci/run"));
    assert!(all.len() >= 10, "found only {all:?}");
    all
}

#[test]
fn every_script_stops_on_errors_and_says_where() {
    for path in scripts() {
        let text = std::fs::read_to_string(&path).unwrap();
        let name = path.display();
        assert!(
            text.lines().any(|l| l == "set -Eeuo pipefail"),
            "{name}: no `set -Eeuo pipefail` line"
        );
        assert!(
            text.lines()
                .any(|l| l.starts_with("trap '") && l.contains("$LINENO") && l.ends_with(" ERR")),
            "{name}: no ERR trap printing the line of the failing command"
        );
        let syntax = Command::new("bash").arg("-n").arg(&path).output().unwrap();
        assert!(
            syntax.status.success(),
            "{name}: bash -n: {}",
            String::from_utf8_lossy(&syntax.stderr)
        );
    }
}

/// Runs `setup` then host-state.sh in a fresh network namespace and a private mount namespace
/// with an empty /run/netns: a host as pristine as it gets.
fn host_state_on_pristine_host(setup: &str) -> (i32, String, String) {
    let script = repo().join("examples/three-tier/host-state.sh");
    let out = Command::new("unshare")
        .args(["--net", "--mount", "--", "sh", "-ec"])
        .arg(format!(
            "mkdir -p /run/netns; mount -t tmpfs tessera-test /run/netns; ip link set lo up; {setup}\nexec \"$0\"",
        ))
        .arg(&script)
        .output()
        .expect("unshare (util-linux) must be installed: see tests/run.sh");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn host_state_snapshot_of_an_empty_ruleset_is_empty_and_succeeds() {
    if !testbed::privileged("host_state_snapshot_of_an_empty_ruleset_is_empty_and_succeeds") {
        return;
    }
    let (code, stdout, stderr) = host_state_on_pristine_host(":");
    assert_eq!(code, 0, "exit {code}\nstdout:\n{stdout}\nstderr:\n{stderr}");
    assert_eq!(stdout, "", "a pristine host has no state to print");
    assert_eq!(stderr, "", "nothing to complain about on a pristine host");
}

#[test]
fn host_state_snapshot_shows_rules_without_counters_and_foreign_namespaces_only() {
    if !testbed::privileged(
        "host_state_snapshot_shows_rules_without_counters_and_foreign_namespaces_only",
    ) {
        return;
    }
    let (code, stdout, stderr) = host_state_on_pristine_host(
        "iptables -t mangle -A OUTPUT -p udp -j ACCEPT; ip6tables -A INPUT -p tcp --dport 22 -j DROP; \
         ping -c1 -W1 127.0.0.1 >/dev/null 2>&1 || true; \
         ip netns add someone-elses; ip netns add ts-1-0-demo-node",
    );
    assert_eq!(code, 0, "exit {code}\nstdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(stdout.contains("-A OUTPUT -p udp -j ACCEPT"), "{stdout}");
    assert!(
        stdout.contains("-A INPUT -p tcp -m tcp --dport 22 -j DROP"),
        "{stdout}"
    );
    assert!(
        !stdout.lines().any(|l| l.starts_with('#')),
        "comments (with timestamps) would make two snapshots differ: {stdout}"
    );
    assert!(
        !stdout.contains("[0:0]") && !stdout.contains(":0]"),
        "packet counters would make two snapshots differ: {stdout}"
    );
    assert!(stdout.contains("netns someone-elses"), "{stdout}");
    assert!(
        !stdout.contains("ts-1-0-demo-node"),
        "the demo's own namespaces are not host state: {stdout}"
    );
}
