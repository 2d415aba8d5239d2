//! One `tessera run` process per node, in the host netns (or, with
//! [`AgentConfig::in_node_netns`], in its node's netns, as a host-network pod runs).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::metrics::Metrics;

/// Key mode of the agents.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// One pre-shared key for the cluster (`--psk-file`).
    Psk,
    /// A CA and node certificates from `tessera pki` (`--ca-cert`, `--node-cert`, ...).
    Pki,
}

/// How to run the agents.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    /// Path of the `tessera` binary.
    pub tessera: PathBuf,
    pub mode: Mode,
    /// `--accept-all`: same rules, every queued packet accepted untouched.
    pub accept_all: bool,
    /// `--fail-open`.
    pub fail_open: bool,
    /// Any further arguments.
    pub extra: Vec<String>,
    /// Run each agent inside its node's netns (`ip netns exec`), as a host-network pod runs in
    /// its node's: what the agent does to "its own" namespace (the tunnel of `--encrypt`)
    /// happens there. Its /metrics is then reached from inside that netns ([`Agent::get`]).
    pub in_node_netns: bool,
    /// Write both nodes into every inventory (`nodes:`, with their link address and, as
    /// `podCIDRs`, the /24 of each of their workloads), as `--encrypt` needs.
    pub list_nodes: bool,
}

impl AgentConfig {
    pub fn new(tessera: &Path, mode: Mode) -> AgentConfig {
        AgentConfig {
            tessera: tessera.to_owned(),
            mode,
            accept_all: false,
            fail_open: false,
            extra: Vec::new(),
            in_node_netns: false,
            list_nodes: false,
        }
    }

    /// Agents with `--encrypt` (and `extra` after it), in their nodes' netns, with the nodes
    /// listed in the inventories.
    pub fn encrypted(tessera: &Path, mode: Mode) -> AgentConfig {
        AgentConfig {
            extra: vec!["--encrypt".into()],
            in_node_netns: true,
            list_nodes: true,
            ..AgentConfig::new(tessera, mode)
        }
    }
}

/// A running (or stopped) agent.
pub struct Agent {
    child: Option<Child>,
    node: String,
    /// Where its HTTP endpoint listens, once its log has said ([`BoundAddr`]).
    metrics_addr: BoundAddr,
    log: PathBuf,
    /// The netns it runs in, when not the host's.
    netns: Option<String>,
}

const READY_TIMEOUT: Duration = Duration::from_secs(20);

impl Agent {
    /// Starts `tessera ARGS` (inside `netns` when given).
    pub(crate) fn spawn(
        cfg: &AgentConfig,
        node: &str,
        mut args: Vec<String>,
        log: &Path,
        netns: Option<&str>,
    ) -> Agent {
        args.push("--metrics-addr".into());
        args.push(BoundAddr::ANY_PORT.into());
        if cfg.accept_all {
            args.push("--accept-all".into());
        }
        if cfg.fail_open {
            args.push("--fail-open".into());
        }
        args.extend(cfg.extra.iter().cloned());
        let mut logf = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .expect("agent log");
        let metrics_addr = BoundAddr::after(log);
        let _ = writeln!(logf, "==== {} {}", cfg.tessera.display(), args.join(" "));
        let mut cmd = match netns {
            // `ip netns exec` execs the program: the child's pid is the agent's.
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(&cfg.tessera);
                c
            }
            None => Command::new(&cfg.tessera),
        };
        let child = cmd
            .args(&args)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(logf.try_clone().expect("log fd"))
            .stderr(logf)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", cfg.tessera.display()));
        Agent {
            child: Some(child),
            node: node.to_owned(),
            metrics_addr,
            log: log.to_owned(),
            netns: netns.map(str::to_owned),
        }
    }

    /// GET `path` from the agent's HTTP endpoint (from inside its netns if it runs in one);
    /// `None` on any failure or a non-200 answer.
    pub fn get(&self, path: &str) -> Option<String> {
        let addr = self.metrics_addr.get()?;
        match &self.netns {
            None => http_get(addr, path),
            Some(ns) => {
                let path = path.to_owned();
                crate::netns::in_netns(ns, move || http_get(addr, &path))
            }
        }
    }

    /// The netns the agent runs in, when not the host's.
    pub fn netns(&self) -> Option<&str> {
        self.netns.as_deref()
    }

    /// Waits until /readyz says ready (every workload enforced) and `rules_installed()` holds; panics with the log if the
    /// agent exits or this takes longer than 20 s.
    pub(crate) fn wait_ready(&mut self, rules_installed: impl Fn() -> bool) {
        let start = Instant::now();
        loop {
            if let Some(st) = self.try_exit_status() {
                panic!(
                    "agent {} exited during start-up ({st}); log:\n{}",
                    self.node,
                    self.log_tail()
                );
            }
            let ready = self.get("/readyz").is_some_and(|b| b.starts_with("ok"));
            if ready && rules_installed() {
                return;
            }
            if start.elapsed() > READY_TIMEOUT {
                panic!(
                    "agent {} not ready (metrics on {:?} and rules in every workload) after {READY_TIMEOUT:?}; log:\n{}",
                    self.node,
                    self.metrics_addr.get(),
                    self.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The agent's pid, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Where /metrics is served; panics (with the log) if the agent has not said yet, which
    /// it has once [`Testbed`](crate::Testbed) found it ready.
    pub fn metrics_addr(&self) -> SocketAddr {
        self.metrics_addr.get().unwrap_or_else(|| {
            panic!(
                "agent {}: no metrics address in its log yet; log:\n{}",
                self.node,
                self.log_tail()
            )
        })
    }

    /// Scrapes /metrics; panics (with the log) if it does not answer.
    pub fn metrics(&self) -> Metrics {
        self.try_metrics().unwrap_or_else(|| {
            panic!(
                "agent {}: /metrics on {:?} does not answer; log:\n{}",
                self.node,
                self.metrics_addr.get(),
                self.log_tail()
            )
        })
    }

    /// Scrapes /metrics, `None` if it does not answer.
    pub fn try_metrics(&self) -> Option<Metrics> {
        self.get("/metrics").map(|t| Metrics::parse(&t))
    }

    /// Waits (up to `timeout`) until the sum of every sample labelled `reason="REASON"`
    /// reaches `at_least`; returns the last value seen.
    pub fn wait_reason(&self, reason: &str, at_least: f64, timeout: Duration) -> f64 {
        let start = Instant::now();
        loop {
            let v = self.metrics().sum_with_label("reason", reason);
            if v >= at_least || start.elapsed() > timeout {
                return v;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops the agent (SIGSTOP) for `how_long`, then lets it go on (SIGCONT): its queues fill
    /// meanwhile, as behind a long scheduling delay.
    pub fn freeze_for(&self, how_long: Duration) {
        let pid = Pid::from_raw(self.pid().expect("agent not running") as i32);
        kill(pid, Signal::SIGSTOP).expect("SIGSTOP the agent");
        std::thread::sleep(how_long);
        kill(pid, Signal::SIGCONT).expect("SIGCONT the agent");
    }

    /// SIGKILL, and reap.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, then waits for a clean exit (up to 10 s, then SIGKILL and panic).
    pub fn terminate(&mut self) -> ExitStatus {
        let mut c = self.child.take().expect("agent not running");
        let _ = kill(Pid::from_raw(c.id() as i32), Signal::SIGTERM);
        let start = Instant::now();
        loop {
            if let Ok(Some(st)) = c.try_wait() {
                return st;
            }
            if start.elapsed() > Duration::from_secs(10) {
                let _ = c.kill();
                let _ = c.wait();
                panic!(
                    "agent {} did not exit within 10 s of SIGTERM; log:\n{}",
                    self.node,
                    self.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub(crate) fn kill(&mut self) {
        self.kill9();
    }

    fn try_exit_status(&mut self) -> Option<ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    /// The last 60 lines of the agent's log.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let from = lines.len().saturating_sub(60);
        format!(
            "[agent {} log {}]\n{}",
            self.node,
            self.log.display(),
            lines[from..].join("\n")
        )
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A port on 127.0.0.1 that was free a moment ago, and that this process has not handed out
/// before, for an agent that cannot report what it bound (one in a container whose log the
/// test does not read); prefer [`BoundAddr`]. Two calls in a row may otherwise get the same
/// port back from the kernel once the probe's socket is closed.
pub fn fresh_local_addr() -> SocketAddr {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut given = GIVEN
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    loop {
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("bind 127.0.0.1:0");
        if !given.contains(&addr.port()) {
            given.push(addr.port());
            return addr;
        }
    }
}

/// The address an agent started with `--metrics-addr 127.0.0.1:0` listens on, read from the
/// line its log gives at start-up. The agent binds the port itself: a port found free by the
/// test and passed on could be taken by anyone (another agent of the same test included)
/// before the agent binds it.
pub struct BoundAddr {
    log: PathBuf,
    /// The log's length when the agent started: an earlier run's lines in an appended log
    /// are not this one's.
    from: u64,
    addr: OnceLock<SocketAddr>,
}

impl BoundAddr {
    /// The `--metrics-addr` that lets the agent's kernel pick the port.
    pub const ANY_PORT: &str = "127.0.0.1:0";

    /// For an agent about to start writing to `log`.
    pub fn after(log: &Path) -> BoundAddr {
        BoundAddr {
            log: log.to_owned(),
            from: std::fs::metadata(log).map_or(0, |m| m.len()),
            addr: OnceLock::new(),
        }
    }

    /// The address, once the log has said; `None` before.
    pub fn get(&self) -> Option<SocketAddr> {
        if let Some(a) = self.addr.get() {
            return Some(*a);
        }
        let text = std::fs::read(&self.log).ok()?;
        let start = usize::try_from(self.from).ok()?.min(text.len());
        let found = String::from_utf8_lossy(&text[start..])
            .lines()
            .filter(|l| l.contains("serving /metrics"))
            .find_map(|l| {
                l.split_whitespace()
                    .find_map(|w| w.strip_prefix("addr="))
                    .and_then(|a| a.parse().ok())
            })?;
        Some(*self.addr.get_or_init(|| found))
    }
}

/// Minimal HTTP/1.0 GET; `None` on any failure or a non-200 answer.
pub fn http_get(addr: SocketAddr, path: &str) -> Option<String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(500)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
    let mut resp = String::new();
    s.read_to_string(&mut resp).ok()?;
    let (head, body) = resp.split_once("\r\n\r\n")?;
    let status = head.lines().next()?;
    status.split_whitespace().nth(1).filter(|c| *c == "200")?;
    Some(body.to_owned())
}
