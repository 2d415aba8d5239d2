//! Real-kernel test fixture for Tessera's datapath.
//!
//! [`Testbed`] builds two "nodes" (network namespaces `ts-<id>-n1`, `ts-<id>-n2` linked by a
//! veth pair and routed, `ip_forward=1` inside them only) and workloads behind each node (one
//! netns each, a veth into its node's netns), with addresses from `10.<x>.<y>.0/24` ranges that
//! exist inside these namespaces only; dual-stack on request ([`TestbedBuilder::ipv6`]: also
//! `fd00:<x>:<y>::/64`, IPv6 forwarding inside the nodes only). It writes one inventory per
//! node, starts one `tessera run` per node in the host netns, echo servers inside workloads,
//! and connects clients from inside workloads. [`packet`] captures frames in a netns (AF_PACKET) and injects
//! raw IPv4 or IPv6 packets (IPPROTO_RAW). Everything is torn down in `Drop` (agents killed, netns
//! deleted, which removes veths and rules), even when a test panics; [`sweep_leftovers`] removes
//! what crashed runs left (names `ts-<pid>-...` whose pid is dead).
//!
//! This is test support: it panics with a message on setup failures instead of returning
//! errors, so a broken environment fails the test with the command and its output.
// Test support: a failed setup step is a failed test, with the reason in the panic message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

pub mod agent;
pub mod docker;
pub mod flood;
pub mod metrics;
pub mod netns;
pub mod packet;
pub mod tcpdump;
pub mod topo;

pub use agent::{Agent, AgentConfig, BoundAddr, Mode};
pub use metrics::Metrics;
pub use netns::{EchoServer, Serve, connect, echo_once, in_netns, spawn_in_netns};
pub use topo::{Testbed, TestbedBuilder, Workload, WorkloadSpec};

use std::process::{Command, Output};

/// Whether the privileged tests may run. Root: yes. Not root and `CI=true`: panics (CI must run
/// them). Not root locally: prints a loud SKIP line and returns `false`.
pub fn privileged(test: &str) -> bool {
    if nix::unistd::Uid::effective().is_root() {
        return true;
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{test}: the real-kernel tests need root and CI=true: refusing to skip them");
    }
    eprintln!(
        "\n**************** SKIP {test}: real-kernel test needs root (run tests/run.sh as root) ****************\n"
    );
    false
}

/// Whether a test's program is installed: `command` (a name looked up on `PATH`, or an absolute
/// path) from the Debian package `package`, which tests/run.sh installs with tests/need.sh.
/// Missing and `CI=true`: panics (CI must run the test). Missing locally: prints a loud SKIP
/// line naming the install command and returns `false`.
pub fn have_command(test: &str, command: &str, package: &str) -> bool {
    let found = if command.starts_with('/') {
        std::path::Path::new(command).is_file()
    } else {
        std::env::var_os("PATH")
            .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(command).is_file()))
    };
    if found {
        return true;
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!(
            "{test}: {command} is missing and CI=true: refusing to skip (tests/run.sh installs it: tests/need.sh {command}={package})"
        );
    }
    eprintln!(
        "\n**************** SKIP {test}: needs {command} (as root: tests/need.sh {command}={package}) ****************\n"
    );
    false
}

/// Runs a command, panicking with its output if it cannot start or exits non-zero.
pub fn run(args: &[&str]) -> String {
    let out = run_status(args);
    if !out.status.success() {
        panic!(
            "command failed ({}): {}\nstdout: {}\nstderr: {}",
            out.status,
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs a command and returns its output whatever its exit status (panics only if it cannot
/// be started at all).
pub fn run_status(args: &[&str]) -> Output {
    let (prog, rest) = args.split_first().expect("empty command");
    Command::new(prog)
        .args(rest)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {prog}: {e} (is it installed? see tests/run.sh)"))
}

/// Runs a command inside a named netns (`ip netns exec NS ...`).
pub fn run_in(ns: &str, args: &[&str]) -> String {
    let mut all = vec!["ip", "netns", "exec", ns];
    all.extend_from_slice(args);
    run(&all)
}

/// Deletes the namespaces (and kills the processes in them) left by earlier runs that crashed:
/// names `ts-<pid>-...` whose pid no longer exists. Namespaces of live processes (parallel test
/// binaries) are left alone.
pub fn sweep_leftovers() {
    let out = run_status(&["ip", "netns", "list"]);
    let text = String::from_utf8_lossy(&out.stdout);
    for line in text.lines() {
        let Some(name) = line.split_whitespace().next() else {
            continue;
        };
        let Some(pid) = owner_pid(name) else {
            continue;
        };
        if std::path::Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        let pids = run_status(&["ip", "netns", "pids", name]);
        for p in String::from_utf8_lossy(&pids.stdout).split_whitespace() {
            if let Ok(p) = p.parse::<i32>() {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(p),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
        let _ = run_status(&["ip", "netns", "del", name]);
    }
    docker::sweep_leftovers();
}

/// `ts-<pid>-<k>-...` → pid.
fn owner_pid(name: &str) -> Option<u32> {
    let rest = name.strip_prefix("ts-")?;
    let mut parts = rest.split('-');
    let pid = parts.next()?.parse().ok()?;
    parts.next()?.parse::<u32>().ok()?;
    Some(pid)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leftover_names_are_recognised_by_their_pid() {
        assert_eq!(owner_pid("ts-1234-0-n1"), Some(1234));
        assert_eq!(owner_pid("ts-1234-2-n2-w0"), Some(1234));
        assert_eq!(owner_pid("ts-abc-0-n1"), None);
        assert_eq!(owner_pid("tsx-1-0"), None);
        assert_eq!(owner_pid("ts-12"), None);
    }
}
