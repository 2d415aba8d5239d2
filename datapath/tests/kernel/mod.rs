#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]
//! Shared by the real-kernel tests (`netns_*`): the root gate, running a command, and two
//! network namespaces joined by a veth.

use std::process::Command;

use datapath::shell::Netns;

/// Whether the test can run: root. Without root it prints a SKIP line, and under CI=true it
/// fails instead (a real-kernel test must never pass silently there).
pub fn privileged(test: &str) -> bool {
    if rustix::process::geteuid().is_root() {
        return true;
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{test}: the real-kernel tests need root and CI=true: refusing to skip them");
    }
    eprintln!("\n**** SKIP {test}: real-kernel test needs root ****\n");
    false
}

/// Run a command, panicking with its stderr if it fails; its stdout.
pub fn run(args: &[&str]) -> String {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(
        out.status.success(),
        "{}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A runtime like the agent's: one thread, with I/O and timers.
pub fn event_loop() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// The namespace `/run/netns/NAME`.
pub fn netns(name: &str) -> Netns {
    Netns::from_path(format!("/run/netns/{name}"))
}

/// Two namespaces joined by a veth, loopback up in both, removed on drop.
pub struct Pair {
    /// The first namespace's name.
    pub a: String,
    /// The second's.
    pub b: String,
}

impl Pair {
    /// Namespaces `{prefix}a{pid}-{tag}` and `{prefix}b{pid}-{tag}` (`tag` tells the tests of one
    /// process apart), with `a_addrs` on a's end of the veth and `b_addrs` on b's (IPv6 without
    /// duplicate address detection).
    pub fn new(prefix: &str, tag: u8, a_addrs: &[&str], b_addrs: &[&str]) -> Pair {
        let id = std::process::id() % 100_000;
        let p = Pair {
            a: format!("{prefix}a{id}-{tag}"),
            b: format!("{prefix}b{id}-{tag}"),
        };
        let (dev_a, dev_b) = (format!("{prefix}{id}{tag}a"), format!("{prefix}{id}{tag}b"));
        run(&["ip", "netns", "add", &p.a]);
        run(&["ip", "netns", "add", &p.b]);
        run(&[
            "ip", "link", "add", &dev_a, "type", "veth", "peer", "name", &dev_b,
        ]);
        run(&["ip", "link", "set", &dev_a, "netns", &p.a]);
        run(&["ip", "link", "set", &dev_b, "netns", &p.b]);
        for (ns, dev, addrs) in [(&p.a, &dev_a, a_addrs), (&p.b, &dev_b, b_addrs)] {
            for addr in addrs {
                let mut cmd = vec!["ip", "-n", ns, "addr", "add", addr, "dev", dev];
                if addr.contains(':') {
                    cmd.push("nodad");
                }
                run(&cmd);
            }
            run(&["ip", "-n", ns, "link", "set", dev, "up"]);
            run(&["ip", "-n", ns, "link", "set", "lo", "up"]);
        }
        p
    }
}

impl Drop for Pair {
    fn drop(&mut self) {
        for ns in [&self.a, &self.b] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}
