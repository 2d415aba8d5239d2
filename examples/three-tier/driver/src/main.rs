//! Driver of the local three-tier demo; `examples/three-tier/run.sh` builds and runs it.
//!
//! Two simulated nodes (network namespaces linked by a veth pair and routed, from the
//! `tessera-testbed` fixture):
//! - node-n1: real Docker containers of a private dockerd (`--network none`, then a veth from
//!   each container's netns into the node's, as a CNI plugin does), enforced by an agent that
//!   follows the daemon (`tessera run --runtime docker`);
//! - node-n2: plain network namespaces, enforced by an agent with a static `--inventory`.
//!
//! Every tier has a workload on each node, so tokens cross between nodes both ways. The expected
//! connectivity comes from the policy engine (`tessera policy matrix -o json` over the same
//! workloads and `examples/three-tier/policies`); the observed one from a real TCP connection
//! (connect, one byte echoed) from each workload to each server port, all at once. Exit status:
//! 0 when every cell matches, 1 on a mismatch, 2 when the demo could not be set up, 130 when
//! interrupted. Everything is torn down on the way out, also on SIGINT/SIGTERM/SIGHUP;
//! `three-tier-demo sweep --pid PID` removes what a run that was killed outright left behind.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use clap::{Parser, Subcommand};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use testbed::docker::DockerDaemon;
use testbed::{AgentConfig, Metrics, Mode, Testbed, WorkloadSpec, echo_once};

/// The busybox image imported into the private daemon.
const IMAGE: &str = "tessera-demo/busybox:1";
/// Label of the demo's containers: the agent of node-n1 enforces these only.
const NAMESPACE_LABEL: &str = "tessera.dev/namespace";
const NAMESPACE: &str = "shop";
/// A denied SYN is dropped: the probe's connect() gives up after this.
const PROBE_TIMEOUT: Duration = Duration::from_secs(3);
/// How long the agents may take to enforce every workload.
const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// One workload of the demo.
struct Tier {
    name: &'static str,
    /// 1: a Docker container on node-n1; 2: a netns in node-n2's inventory.
    node: u8,
    role: &'static str,
    /// The named port it serves (the policies refer to `http` and `api` by name).
    port: Option<(&'static str, u16)>,
}

const fn tier(
    name: &'static str,
    node: u8,
    role: &'static str,
    port: Option<(&'static str, u16)>,
) -> Tier {
    Tier {
        name,
        node,
        role,
        port,
    }
}

const TIERS: [Tier; 8] = [
    tier("external-1", 1, "External", None),
    tier("frontend-1", 1, "WebFrontend", Some(("http", 80))),
    tier("backend-1", 1, "BusinessBackend", Some(("api", 8080))),
    tier("database-1", 1, "Database", Some(("postgres", 5432))),
    tier("external-2", 2, "External", None),
    tier("frontend-2", 2, "WebFrontend", Some(("http", 80))),
    tier("backend-2", 2, "BusinessBackend", Some(("api", 8080))),
    tier("database-2", 2, "Database", Some(("postgres", 5432))),
];

#[derive(Parser)]
#[command(
    name = "three-tier-demo",
    about = "The local three-tier demo (run it through examples/three-tier/run.sh)"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Build the two nodes, start the containers and agents, compare expected and observed
    /// connectivity, tear everything down.
    Run {
        /// The `tessera` binary.
        #[arg(long)]
        tessera: PathBuf,
        /// The NetworkPolicy directory (examples/three-tier/policies).
        #[arg(long)]
        policies: PathBuf,
        /// After the report, keep everything running until Ctrl-C (or SIGTERM), with commands
        /// to try by hand.
        #[arg(long)]
        hold: bool,
        /// Encryption between the nodes: both agents with `--encrypt` (in their nodes' netns,
        /// the node list in their inventories), and a capture on node-n1's uplink during the
        /// probes that must hold tunnel datagrams and no pod packet in clear.
        #[arg(long)]
        encrypt: bool,
    },
    /// Remove what a killed run (process PID, no longer running) left behind: its namespaces,
    /// its dockerd and containers, agents, mounts and scratch directories. Exits 3 when it found
    /// anything.
    Sweep {
        #[arg(long)]
        pid: u32,
    },
}

/// Why the demo stopped early.
#[derive(Debug)]
struct Interrupted;

impl std::fmt::Display for Interrupted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("interrupted")
    }
}

impl std::error::Error for Interrupted {}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Sweep { pid } => match sweep(pid) {
            Ok(0) => ExitCode::SUCCESS,
            Ok(_) => ExitCode::from(3),
            Err(e) => {
                eprintln!("three-tier-demo sweep: {e:#}");
                ExitCode::from(2)
            }
        },
        Cmd::Run {
            tessera,
            policies,
            hold,
            encrypt,
        } => demo(&tessera, &policies, hold, encrypt),
    }
}

fn demo(tessera: &Path, policies: &Path, hold: bool, encrypt: bool) -> ExitCode {
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGHUP,
    ] {
        if let Err(e) = signal_hook::flag::register(sig, stop.clone()) {
            eprintln!("three-tier-demo: cannot handle signal {sig}: {e}");
            return ExitCode::from(2);
        }
    }
    // The fixture reports setup failures by panicking (after which its Drops tear down what was
    // built). Once interrupted, such a panic is a consequence (e.g. the agents got the terminal's
    // SIGINT too): say "interrupted" instead of printing it.
    let default_hook = std::panic::take_hook();
    let quiet = stop.clone();
    std::panic::set_hook(Box::new(move |info| {
        if !quiet.load(Ordering::SeqCst) {
            default_hook(info);
        }
    }));
    let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| {
        run(tessera, policies, hold, encrypt, &stop)
    }));
    match outcome {
        Ok(Ok(true)) => ExitCode::SUCCESS,
        Ok(Ok(false)) => ExitCode::from(1),
        _ if stop.load(Ordering::SeqCst) => {
            eprintln!("\nthree-tier-demo: interrupted; everything it started has been removed");
            ExitCode::from(130)
        }
        Ok(Err(e)) => {
            eprintln!("\nthree-tier-demo: {e:#}");
            ExitCode::from(2)
        }
        Err(_) => {
            eprintln!(
                "\nthree-tier-demo: setup failed (see above); everything it started has been removed"
            );
            ExitCode::from(2)
        }
    }
}

fn checkpoint(stop: &AtomicBool) -> Result<()> {
    if stop.load(Ordering::SeqCst) {
        return Err(Interrupted.into());
    }
    Ok(())
}

fn step(what: &str) {
    println!("-- {what}");
}

/// The whole demo; `Ok(true)` when observed matches expected everywhere. Whatever it built is
/// torn down when it returns or unwinds: the testbed (agents, namespaces) first, then the
/// daemon (containers, mounts, directories).
fn run(
    tessera: &Path,
    policies: &Path,
    hold: bool,
    encrypt: bool,
    stop: &AtomicBool,
) -> Result<bool> {
    if !nix::unistd::Uid::effective().is_root() {
        bail!(
            "needs root (network namespaces, iptables, a private dockerd): sudo ./examples/three-tier/run.sh"
        );
    }
    let tessera = tessera
        .canonicalize()
        .with_context(|| format!("--tessera {}", tessera.display()))?;
    let policies = policies
        .canonicalize()
        .with_context(|| format!("--policies {}", policies.display()))?;
    let started = Instant::now();

    step(
        "private dockerd: own data root, exec root and socket; no bridge, no iptables, no masquerade",
    );
    let daemon = DockerDaemon::start();
    daemon.import_busybox(IMAGE);
    println!(
        "   {} (image {IMAGE} imported from busybox-static)",
        daemon.host()
    );
    checkpoint(stop)?;

    step("node-n1 and node-n2: two network namespaces, a veth link, routes; node-n2's workloads");
    let mut builder = Testbed::builder().policies(&policies);
    for t in TIERS.iter().filter(|t| t.node == 2) {
        let mut spec = WorkloadSpec::new(t.name, 2, t.role);
        if let Some((name, port)) = t.port {
            spec = spec.port(Some(name), port);
        }
        builder = builder.workload(spec);
    }
    let mut tb = builder.build();
    checkpoint(stop)?;

    step("node-n1's workloads: docker run --network none, plumbed into node-n1 like a CNI plugin");
    for t in TIERS.iter().filter(|t| t.node == 1) {
        let ports_label = t.port.map(|(n, p)| format!("{n}={p}"));
        let mut labels = vec![("role", t.role), (NAMESPACE_LABEL, NAMESPACE)];
        if let Some(l) = &ports_label {
            labels.push(("tessera.dev/ports", l));
        }
        let port = t.port.map(|(_, p)| p.to_string());
        let cmd: Vec<&str> = match &port {
            // A persistent busybox server: each connection gets a `cat` (an echo).
            Some(p) => vec![IMAGE, "nc", "-ll", "-p", p, "-e", "cat"],
            None => vec![IMAGE, "sleep", "1000000"],
        };
        let c = daemon.run(t.name, &labels, &cmd);
        let w = tb.attach_netns(1, t.name, c.pid);
        println!(
            "   {:<11} container {} pid {:<7} {} labels {}",
            t.name,
            &c.id[..c.id.len().min(12)],
            c.pid,
            w.ip,
            labels
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(",")
        );
        checkpoint(stop)?;
    }
    for t in TIERS.iter().filter(|t| t.node == 2) {
        let w = tb.workload(t.name);
        println!(
            "   {:<11} netns {} {} role={}{}",
            t.name,
            w.ns,
            w.ip,
            t.role,
            t.port
                .map(|(n, p)| format!(" ports {n}={p}"))
                .unwrap_or_default()
        );
    }

    let cfg = if encrypt {
        step(
            "agents, --encrypt: node-n1 follows the dockerd, node-n2 reads an inventory; one PSK; each agent in its node's netns with a WireGuard tunnel to the other (the node list: both nodes, their link addresses, their pods' /24s)",
        );
        AgentConfig::encrypted(&tessera, Mode::Psk)
    } else {
        step("agents: node-n1 follows the dockerd, node-n2 reads an inventory; one PSK");
        AgentConfig::new(&tessera, Mode::Psk)
    };
    let host = daemon.host();
    let agents_started = Instant::now();
    let mut n1_args = vec![
        "--runtime".to_owned(),
        "docker".to_owned(),
        "--docker-host".to_owned(),
        host.clone(),
        "--docker-filter".to_owned(),
        format!("{NAMESPACE_LABEL}={NAMESPACE}"),
    ];
    if encrypt {
        // Beside the Docker runtime, --inventory is the node list alone.
        let nodes = tb.dir().join("nodes-n1.yaml");
        std::fs::write(&nodes, tb.nodes_yaml())
            .with_context(|| format!("write {}", nodes.display()))?;
        n1_args.extend(["--inventory".to_owned(), nodes.display().to_string()]);
    }
    let n1_args: Vec<&str> = n1_args.iter().map(String::as_str).collect();
    tb.start_agent_with(1, &cfg, &n1_args);
    checkpoint(stop)?;
    let inventory = tb.dir().join("inventory-n2.yaml");
    std::fs::write(&inventory, tb.inventory_yaml(2))
        .with_context(|| format!("write {}", inventory.display()))?;
    let inventory = inventory.display().to_string();
    tb.start_agent_with(2, &cfg, &["--inventory", &inventory]);
    wait_enforced(&tb, stop, agents_started)?;
    for node in 1..=2u8 {
        println!(
            "   agent node-n{node}: pid {}, metrics on {}",
            tb.agent(node).pid().unwrap_or_default(),
            tb.agent(node).metrics_addr()
        );
    }

    step("expected: tessera policy matrix -f cluster.yaml -f policies/ -o json");
    let cells = expected(&tb, &tessera, &policies)?;
    checkpoint(stop)?;

    step(&format!(
        "observed: {} real TCP connections (connect + 1 byte echoed), all at once; denied = no handshake within {PROBE_TIMEOUT:?}",
        cells.len()
    ));
    let capture = encrypt.then(|| UplinkCapture::start(&tb));
    let observed = probe_all(&tb, &cells)?;
    checkpoint(stop)?;

    let mut ok = report(&cells, &observed);

    step(
        "UDP, expected: tessera policy matrix --probe 5432/UDP --probe 8125/UDP (databases and backends)",
    );
    let udp_cells = expected_udp(&tb, &tessera, &policies)?;
    step(&format!(
        "UDP, observed: {} real datagrams (sent, echoed back), all at once; the agents prove both ends with control datagrams first",
        udp_cells.len()
    ));
    let udp_observed = probe_udp_all(&tb, &udp_cells)?;
    ok &= report(&udp_cells, &udp_observed);
    checkpoint(stop)?;
    if let Some(capture) = capture {
        ok &= capture.finish(&tb, &cells, &udp_cells);
    }
    ok &= flows_logged(&tb, &cells, &udp_cells);
    counters(&tb);
    println!(
        "\n-- tessera status --addr {} (node-n1)",
        tb.agent(1).metrics_addr()
    );
    let addr = tb.agent(1).metrics_addr().to_string();
    let status = match tb.agent(1).netns() {
        Some(ns) => Command::new("ip")
            .args(["netns", "exec", ns])
            .arg(&tessera)
            .args(["status", "--addr", &addr])
            .output(),
        None => Command::new(&tessera)
            .args(["status", "--addr", &addr])
            .output(),
    }
    .context("tessera status")?;
    print!("{}", String::from_utf8_lossy(&status.stdout));
    eprint!("{}", String::from_utf8_lossy(&status.stderr));

    println!(
        "\n{} in {:.1} s",
        if ok {
            "PASS: observed == expected in every cell"
        } else {
            "FAIL: observed differs from expected"
        },
        started.elapsed().as_secs_f64()
    );
    if hold {
        print_hints(&tb, &daemon, &tessera, &policies);
        while !stop.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    println!("tearing down: agents, namespaces, containers, dockerd");
    drop(tb);
    drop(daemon);
    Ok(ok)
}

/// The denied cells' flow records: each denied cell (TCP and UDP) must appear in the flow log
/// (`GET /flows`) of the node that denied it, as a denied record of that client address, server
/// address and port naming the policy or default that decided. Prints
/// `flows: N/N denied cells logged` and the cells missing, if any.
fn flows_logged(tb: &Testbed, tcp: &[Cell], udp: &[Cell]) -> bool {
    let mut records: Vec<(u8, serde_json::Value)> = Vec::new();
    for node in 1..=2u8 {
        let body = tb
            .agent(node)
            .get("/flows?verdict=denied&last=10000")
            .unwrap_or_default();
        records.extend(
            body.lines()
                .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
                .map(|r| (node, r)),
        );
    }
    let denied: Vec<(&Cell, &str)> = tcp
        .iter()
        .map(|c| (c, "TCP"))
        .chain(udp.iter().map(|c| (c, "UDP")))
        .filter(|(c, _)| !c.allowed)
        .collect();
    let mut missing = Vec::new();
    let mut by: BTreeMap<String, usize> = BTreeMap::new();
    for (c, proto) in &denied {
        let (from, to) = (
            tb.workload(&c.from).ip.to_string(),
            tb.workload(&c.to).ip.to_string(),
        );
        let found = records.iter().find(|(_, r)| {
            r["protocol"] == *proto
                && r["source"]["ip"] == from.as_str()
                && r["destination"]["ip"] == to.as_str()
                && r["destination"]["port"] == c.port
                && r["policy"].is_object()
        });
        match found {
            Some((node, r)) => {
                let p = &r["policy"];
                let name = match p["namespace"].as_str() {
                    Some(ns) => format!("{ns}/{}", p["name"].as_str().unwrap_or_default()),
                    None => format!(
                        "{}/{}",
                        p["kind"].as_str().unwrap_or_default(),
                        p["name"].as_str().unwrap_or_default()
                    ),
                };
                *by.entry(format!(
                    "node-n{node} {} by {name}",
                    r["direction"].as_str().unwrap_or_default()
                ))
                .or_default() += 1;
            }
            None => missing.push(format!("{} -> {}:{}/{proto}", c.from, c.to, c.port)),
        }
    }
    println!(
        "\nflows: {}/{} denied cells logged (GET /flows of the node that denied each)",
        denied.len() - missing.len(),
        denied.len()
    );
    for (what, n) in &by {
        println!("   {n:>3}  {what}");
    }
    for m in &missing {
        println!("   MISSING  {m}");
    }
    missing.is_empty()
}

/// `--hold`: what to try while the demo stays up.
fn print_hints(tb: &Testbed, daemon: &DockerDaemon, tessera: &Path, policies: &Path) {
    let ip = |n: &str| tb.workload(n).ip;
    let ns = |n: &str| tb.workload(n).ns.clone();
    let docker = format!("{} -H {}", testbed::docker::DOCKER, daemon.host());
    let t = tessera.display();
    let (m1, m2) = (tb.agent(1).metrics_addr(), tb.agent(2).metrics_addr());
    println!(
        "\n-- holding: everything stays up until Ctrl-C. In another shell, as root:
   {docker} ps                       # the node-n1 containers
   echo hi | {docker} exec -i external-1 nc -w 2 {f2} 80      # allowed: prints hi
   echo hi | {docker} exec -i external-1 nc -w 2 {b2} 8080    # denied: nothing, after 2 s
   echo hi | ip netns exec {fe2} busybox nc -w 2 {b1} 8080    # node-n2 -> a container: allowed
   ip netns exec {db1} iptables-save -t mangle                # the agent's rules in a container's netns
   {t} status --addr {m1}       # agent node-n1 (docker); node-n2: --addr {m2}
   {t} policy explain --from shop/database-2 --to shop/backend-1 --probe 8080/TCP -f {cluster} -f {pol}
   busybox wget -qO- http://{m2}/metrics | grep -E 'tessera_(flows_authorized|packets_rejected)_total'",
        f2 = ip("frontend-2"),
        b2 = ip("backend-2"),
        b1 = ip("backend-1"),
        fe2 = ns("frontend-2"),
        db1 = ns("database-1"),
        cluster = tb.dir().join("cluster.yaml").display(),
        pol = policies.display(),
    );
}

/// Waits until each agent enforces its four workloads and each workload's netns holds the
/// rules.
fn wait_enforced(tb: &Testbed, stop: &AtomicBool, start: Instant) -> Result<()> {
    loop {
        checkpoint(stop)?;
        let counts: Vec<f64> = (1..=2u8)
            .map(|n| {
                tb.agent(n)
                    .try_metrics()
                    .map_or(-1.0, |m| m.sum("tessera_workloads_enforced"))
            })
            .collect();
        let missing: Vec<&str> = TIERS
            .iter()
            .filter(|t| !has_rules(&tb.workload(t.name).ns))
            .map(|t| t.name)
            .collect();
        if counts == [4.0, 4.0] && missing.is_empty() {
            println!(
                "   4 + 4 workloads enforced {:.1} s after the first agent started",
                start.elapsed().as_secs_f64()
            );
            return Ok(());
        }
        if start.elapsed() > READY_TIMEOUT {
            bail!(
                "after {READY_TIMEOUT:?}: workloads enforced per agent {counts:?} (want 4 and 4), no rules yet in {missing:?}\n{}",
                tb.agent_logs()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn has_rules(ns: &str) -> bool {
    Command::new("ip")
        .args(["netns", "exec", ns, "iptables-save", "-t", "mangle"])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("-j TESSERA-INPUT"))
}

/// One (client, server, port) of the matrix, with the policy engine's verdict.
#[derive(Debug)]
struct Cell {
    from: String,
    to: String,
    port: u16,
    allowed: bool,
    reason: String,
}

/// The demo's workloads as Kubernetes objects (a Namespace, one Pod each with its labels, named
/// port and address): what `tessera policy matrix` reads beside the policies.
fn cluster_yaml(tb: &Testbed) -> String {
    cluster_objects(|t| tb.workload(t.name).ip.to_string())
}

fn cluster_objects(ip: impl Fn(&Tier) -> String) -> String {
    let mut y = format!(
        "apiVersion: v1\nkind: Namespace\nmetadata: {{name: {NAMESPACE}, labels: {{kubernetes.io/metadata.name: {NAMESPACE}}}}}\n"
    );
    for t in &TIERS {
        let ports = t
            .port
            .map(|(n, p)| format!("{{name: {n}, containerPort: {p}, protocol: TCP}}"))
            .unwrap_or_default();
        let _ = write!(
            y,
            "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {}, namespace: {NAMESPACE}, labels: {{role: {}}}}}\nspec:\n  nodeName: node-n{}\n  containers: [{{name: app, image: busybox, ports: [{ports}]}}]\nstatus: {{podIP: {}}}\n",
            t.name,
            t.role,
            t.node,
            ip(t)
        );
    }
    y
}

fn expected(tb: &Testbed, tessera: &Path, policies: &Path) -> Result<Vec<Cell>> {
    let cluster = tb.dir().join("cluster.yaml");
    std::fs::write(&cluster, cluster_yaml(tb))
        .with_context(|| format!("write {}", cluster.display()))?;
    let mut cells = parse_matrix(&matrix_json(tb, tessera, policies, &[])?)?;
    // Clients in tier order, then servers in tier order.
    let rank = |n: &str| TIERS.iter().position(|t| t.name == n).unwrap_or(usize::MAX);
    cells.sort_by_key(|c| (rank(&c.from), rank(&c.to), c.port));
    if cells.len() != 42 {
        bail!(
            "tessera policy matrix gave {} cells; 8 clients x 6 servers less themselves is 42",
            cells.len()
        );
    }
    Ok(cells)
}

/// `tessera policy matrix -f cluster.yaml -f POLICIES [ARGS] -o json` (cluster.yaml as
/// [`expected`] wrote it).
fn matrix_json(tb: &Testbed, tessera: &Path, policies: &Path, args: &[&str]) -> Result<Vec<u8>> {
    let out = Command::new(tessera)
        .arg("policy")
        .arg("matrix")
        .arg("-f")
        .arg(tb.dir().join("cluster.yaml"))
        .arg("-f")
        .arg(policies)
        .args(args)
        .args(["-o", "json"])
        .output()
        .context("run tessera policy matrix")?;
    if !out.status.success() {
        bail!(
            "tessera policy matrix {} failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(out.stdout)
}

/// The UDP cells: every workload to each database on 5432/UDP (TCP only in the policies: every
/// cell denied, the hole the all-protocol enforcement closed) and to each backend on 8125/UDP
/// (allowed from frontends by the backend policy), as the policy engine computes them.
fn expected_udp(tb: &Testbed, tessera: &Path, policies: &Path) -> Result<Vec<Cell>> {
    let json = matrix_json(
        tb,
        tessera,
        policies,
        &["--probe", "5432/UDP", "--probe", "8125/UDP"],
    )?;
    let role = |n: &str| TIERS.iter().find(|t| t.name == n).map_or("", |t| t.role);
    let mut cells: Vec<Cell> = parse_matrix_of(&json, "UDP")?
        .into_iter()
        .filter(|c| match c.port {
            5432 => role(&c.to) == "Database",
            8125 => role(&c.to) == "BusinessBackend",
            _ => false,
        })
        .collect();
    let rank = |n: &str| TIERS.iter().position(|t| t.name == n).unwrap_or(usize::MAX);
    cells.sort_by_key(|c| (rank(&c.from), rank(&c.to), c.port));
    if cells.len() != 28 {
        bail!(
            "tessera policy matrix gave {} UDP cells; 8 clients x (2 databases + 2 backends) less themselves is 28",
            cells.len()
        );
    }
    Ok(cells)
}

/// One datagram from each cell's client to its server, echoed back by a UDP socket of the
/// driver's in the server's netns (as the server application would), all at once. A datagram
/// that gets no echo within [`PROBE_TIMEOUT`] (two more tries on the way) is a denial.
fn probe_udp_all(tb: &Testbed, cells: &[Cell]) -> Result<Vec<Observed>> {
    let done = Arc::new(AtomicBool::new(false));
    let mut servers: Vec<(String, u16)> = cells.iter().map(|c| (c.to.clone(), c.port)).collect();
    servers.sort();
    servers.dedup();
    let mut echoes = Vec::new();
    for (to, port) in servers {
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let done = done.clone();
        echoes.push(testbed::spawn_in_netns(&tb.workload(&to).ns, move || {
            let socket = std::net::UdpSocket::bind(("0.0.0.0", port));
            let socket = match socket {
                Ok(s) => s,
                Err(e) => {
                    let _ = ready_tx.send(Err(format!("bind UDP {port}: {e}")));
                    return;
                }
            };
            let _ = socket.set_read_timeout(Some(Duration::from_millis(100)));
            let _ = ready_tx.send(Ok(()));
            let mut buf = [0u8; 64];
            while !done.load(Ordering::SeqCst) {
                if let Ok((n, peer)) = socket.recv_from(&mut buf) {
                    let _ = socket.send_to(&buf[..n], peer);
                }
            }
        }));
        ready_rx
            .recv()
            .map_err(|_| anyhow!("UDP echo in {to} did not start"))?
            .map_err(|e| anyhow!("{to}: {e}"))?;
    }
    let jobs: Vec<(String, SocketAddr)> = cells
        .iter()
        .map(|c| {
            (
                tb.workload(&c.from).ns.clone(),
                tb.workload(&c.to).addr(c.port),
            )
        })
        .collect();
    let observed = std::thread::scope(|s| {
        let handles: Vec<_> = jobs
            .into_iter()
            .map(|(ns, addr)| s.spawn(move || testbed::in_netns(&ns, move || probe_udp(addr))))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().map_err(|_| anyhow!("a UDP probe thread panicked")))
            .collect()
    });
    done.store(true, Ordering::SeqCst);
    for e in echoes {
        let _ = e.join();
    }
    observed
}

fn probe_udp(addr: SocketAddr) -> Observed {
    let socket = match std::net::UdpSocket::bind(("0.0.0.0", 0)) {
        Ok(s) => s,
        Err(e) => return Observed::Failed(format!("bind: {e}")),
    };
    let _ = socket.set_read_timeout(Some(PROBE_TIMEOUT / 3));
    let mut buf = [0u8; 64];
    for _ in 0..3 {
        if let Err(e) = socket.send_to(b"x", addr) {
            return Observed::Failed(format!("send: {e}"));
        }
        if let Ok((n, _)) = socket.recv_from(&mut buf)
            && &buf[..n] == b"x"
        {
            return Observed::Echoed;
        }
    }
    Observed::Failed("no echo".to_owned())
}

/// The cells of `tessera policy matrix -o json` (`{"probes":[{from,to,port,protocol,allowed,
/// reason}]}`), checked against the demo's workloads.
fn parse_matrix(json: &[u8]) -> Result<Vec<Cell>> {
    parse_matrix_of(json, "TCP")
}

/// [`parse_matrix`] for probes of `protocol`.
fn parse_matrix_of(json: &[u8], protocol: &str) -> Result<Vec<Cell>> {
    let v: serde_json::Value =
        serde_json::from_slice(json).context("tessera policy matrix: output is not JSON")?;
    let probes = v["probes"]
        .as_array()
        .ok_or_else(|| anyhow!("tessera policy matrix: no `probes` array"))?;
    let strip = |field: &str, p: &serde_json::Value| -> Result<String> {
        let s = p[field]
            .as_str()
            .ok_or_else(|| anyhow!("tessera policy matrix: probe without `{field}`"))?;
        let name = s.strip_prefix("shop/").unwrap_or(s);
        if !TIERS.iter().any(|t| t.name == name) {
            bail!("tessera policy matrix: unknown workload {s:?} in `{field}`");
        }
        Ok(name.to_owned())
    };
    let mut cells = Vec::new();
    for p in probes {
        if p["protocol"].as_str() != Some(protocol) {
            bail!("tessera policy matrix: unexpected protocol in {p}");
        }
        cells.push(Cell {
            from: strip("from", p)?,
            to: strip("to", p)?,
            port: p["port"]
                .as_u64()
                .and_then(|n| u16::try_from(n).ok())
                .ok_or_else(|| anyhow!("tessera policy matrix: bad `port` in {p}"))?,
            allowed: p["allowed"]
                .as_bool()
                .ok_or_else(|| anyhow!("tessera policy matrix: bad `allowed` in {p}"))?,
            reason: p["reason"].as_str().unwrap_or_default().to_owned(),
        });
    }
    Ok(cells)
}

/// What a probe saw.
enum Observed {
    /// Connected and the byte came back.
    Echoed,
    /// Connected, but no echo (a half-broken flow: always a mismatch).
    NoEcho(String),
    /// No connection: timed out (SYN or SYN-ACK dropped), refused (RST), ...
    Failed(String),
}

impl Observed {
    fn connected(&self) -> bool {
        !matches!(self, Observed::Failed(_))
    }
    fn text(&self) -> String {
        match self {
            Observed::Echoed => "allow (echo)".to_owned(),
            Observed::NoEcho(e) => format!("allow, NO ECHO: {e}"),
            Observed::Failed(e) => format!("deny ({e})"),
        }
    }
}

/// Whether an observation agrees with the policy engine: allowed means connected and echoed;
/// denied means no connection at all (a handshake that completes is not a denial, echo or not).
fn matches(allowed: bool, o: &Observed) -> bool {
    if allowed {
        matches!(o, Observed::Echoed)
    } else {
        !o.connected()
    }
}

fn probe(ns: &str, addr: SocketAddr) -> Observed {
    match testbed::connect(ns, addr, PROBE_TIMEOUT) {
        Ok(mut s) => match echo_once(&mut s, b'x') {
            Ok(()) => Observed::Echoed,
            Err(e) => Observed::NoEcho(e.to_string()),
        },
        Err(e) => Observed::Failed(match e.kind() {
            std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock => "timeout".to_owned(),
            std::io::ErrorKind::ConnectionRefused => "refused".to_owned(),
            std::io::ErrorKind::ConnectionReset => "reset".to_owned(),
            _ => e.to_string(),
        }),
    }
}

fn probe_all(tb: &Testbed, cells: &[Cell]) -> Result<Vec<Observed>> {
    let jobs: Vec<(String, SocketAddr)> = cells
        .iter()
        .map(|c| {
            (
                tb.workload(&c.from).ns.clone(),
                tb.workload(&c.to).addr(c.port),
            )
        })
        .collect();
    std::thread::scope(|s| {
        let handles: Vec<_> = jobs
            .into_iter()
            .map(|(ns, addr)| s.spawn(move || probe(&ns, addr)))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().map_err(|_| anyhow!("a probe thread panicked")))
            .collect()
    })
}

fn node_of(name: &str) -> u8 {
    TIERS.iter().find(|t| t.name == name).map_or(0, |t| t.node)
}

/// `allowed by shop/backend` / `denied: ingress` / `denied: egress+ingress`, from the engine's
/// reason (`tessera policy explain` gives it in full); a cluster-wide admin policy that decided
/// is named with its tier (`allowed by Admin uptime-probe`, `denied: egress by Baseline
/// frontends-baseline`).
fn why(c: &Cell) -> String {
    if c.allowed {
        let by = c
            .reason
            .split("ingress: allowed by ")
            .nth(1)
            .map(|r| {
                admin_name(r)
                    .unwrap_or_else(|| r.split(" ingress rule").next().unwrap_or(r).to_owned())
            })
            .unwrap_or_else(|| "no policy".to_owned());
        return format!("allowed by {by}");
    }
    let egress = c.reason.contains("egress: denied");
    let ingress = c.reason.contains("ingress: denied");
    let by = c
        .reason
        .split("denied by ")
        .nth(1)
        .and_then(admin_name)
        .map(|a| format!(" by {a}"))
        .unwrap_or_default();
    match (egress, ingress) {
        (true, true) => format!("denied: egress+ingress{by}"),
        (true, false) => format!("denied: egress{by}"),
        _ => format!("denied: ingress{by}"),
    }
}

/// `Admin ClusterNetworkPolicy/uptime-probe (priority 10) ...` -> `Admin uptime-probe`.
fn admin_name(reason: &str) -> Option<String> {
    let (tier, rest) = reason.split_once(' ')?;
    if tier != "Admin" && tier != "Baseline" {
        return None;
    }
    let name = rest.split_once('/')?.1.split([' ', ';']).next()?;
    Some(format!("{tier} {name}"))
}

/// The side-by-side table; true when every cell matches.
fn report(cells: &[Cell], observed: &[Observed]) -> bool {
    println!(
        "\n{:<11} {:<20} {:<8} {:<42} {:<20} result",
        "client", "server:port", "nodes", "expected (policy)", "observed"
    );
    println!("{}", "-".repeat(114));
    let mut mismatches = 0;
    let mut cross = 0;
    let mut allowed = 0;
    for (c, o) in cells.iter().zip(observed) {
        let (a, b) = (node_of(&c.from), node_of(&c.to));
        if a != b {
            cross += 1;
        }
        if c.allowed {
            allowed += 1;
        }
        let ok = matches(c.allowed, o);
        if !ok {
            mismatches += 1;
        }
        println!(
            "{:<11} {:<20} {:<8} {:<42} {:<20} {}",
            c.from,
            format!("{}:{}", c.to, c.port),
            format!("n{a}->n{b}"),
            format!(
                "{} {}",
                if c.allowed { "allow" } else { "deny " },
                why(c)
                    .trim_start_matches("allowed ")
                    .trim_start_matches("denied: ")
            ),
            o.text(),
            if ok { "ok" } else { "MISMATCH" }
        );
    }
    println!("{}", "-".repeat(114));
    println!(
        "{} cells ({} allowed, {} denied; {} across nodes): {} match, {} MISMATCH",
        cells.len(),
        allowed,
        cells.len() - allowed,
        cross,
        cells.len() - mismatches,
        mismatches
    );
    mismatches == 0
}

fn sample(m: &Metrics, name: &str, label: (&str, &str)) -> f64 {
    m.samples
        .iter()
        .filter(|s| s.name == name)
        .filter(|s| s.labels.iter().any(|(k, v)| k == label.0 && v == label.1))
        .map(|s| s.value)
        .sum()
}

/// Handshake counters of both agents, side by side.
fn counters(tb: &Testbed) {
    let m: Vec<Metrics> = (1..=2u8)
        .map(|n| tb.agent(n).try_metrics().unwrap_or_default())
        .collect();
    let mut rows: Vec<(String, [f64; 2])> = vec![
        (
            "workloads enforced".to_owned(),
            [0, 1].map(|i| m[i].sum("tessera_workloads_enforced")),
        ),
        (
            "flows authorized, verified peer".to_owned(),
            [0, 1].map(|i| {
                sample(
                    &m[i],
                    "tessera_flows_authorized_total",
                    ("peer", "verified"),
                )
            }),
        ),
        (
            "flows authorized, IP-only peer".to_owned(),
            [0, 1].map(|i| sample(&m[i], "tessera_flows_authorized_total", ("peer", "ip_only"))),
        ),
        (
            "SYN packets accepted".to_owned(),
            [0, 1].map(|i| sample(&m[i], "tessera_packets_accepted_total", ("kind", "syn"))),
        ),
    ];
    let mut reasons: Vec<String> = m
        .iter()
        .flat_map(|mm| mm.samples.iter())
        .filter(|s| s.name == "tessera_packets_rejected_total")
        .filter_map(|s| s.labels.iter().find(|(k, _)| k == "reason"))
        .map(|(_, v)| v.clone())
        .collect();
    reasons.sort();
    reasons.dedup();
    for r in reasons {
        let v = [0, 1].map(|i| sample(&m[i], "tessera_packets_rejected_total", ("reason", &r)));
        rows.push((format!("packets rejected: {r}"), v));
    }
    println!(
        "\n{:<36} {:>16} {:>18}",
        "handshake counters (/metrics)", "node-n1 (docker)", "node-n2 (inventory)"
    );
    for (name, v) in rows {
        println!("{name:<36} {:>16} {:>18}", v[0], v[1]);
    }
}

/// Cleans up after a run `pid` that was killed before its own teardown; returns how many
/// things it found.
fn sweep(pid: u32) -> Result<usize> {
    if Path::new(&format!("/proc/{pid}")).exists() {
        bail!("process {pid} still runs: stop it first");
    }
    let prefix = format!("ts-{pid}-");
    let marker = format!("/tmp/{prefix}");
    let mut found = Vec::new();
    let netns = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .context("ip netns list")?;
    for line in String::from_utf8_lossy(&netns.stdout).lines() {
        if let Some(n) = line
            .split_whitespace()
            .next()
            .filter(|n| n.starts_with(&prefix))
        {
            found.push(format!("netns {n}"));
        }
    }
    let dirs: Vec<PathBuf> = std::fs::read_dir("/tmp")
        .context("read /tmp")?
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
        .map(|e| e.path())
        .collect();
    found.extend(dirs.iter().map(|d| format!("directory {}", d.display())));
    // What the run started names its scratch directories on its command line: the agents, the
    // dockerd, containerd and its shims.
    let me = std::process::id().to_string();
    let mut procs = Vec::new();
    for p in std::fs::read_dir("/proc").context("read /proc")?.flatten() {
        let name = p.file_name().to_string_lossy().into_owned();
        let Ok(other) = name.parse::<i32>() else {
            continue;
        };
        if name == me {
            continue;
        }
        let cmdline = std::fs::read(p.path().join("cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if cmdline.contains(&marker) {
            found.push(format!("process {other}: {}", cmdline.trim()));
            procs.push(other);
        }
    }
    // The fixture's own sweep first: namespaces of dead test processes (and what runs in them),
    // their private dockerd with containerd, shims, containers (found as the shims' children)
    // and mounts. Then whatever of ours still runs.
    testbed::sweep_leftovers();
    for p in procs {
        let _ = kill(Pid::from_raw(p), Signal::SIGKILL);
    }
    for d in dirs {
        let _ = std::fs::remove_dir_all(&d);
    }
    for f in &found {
        println!("three-tier-demo sweep: removed {f}");
    }
    Ok(found.len())
}

/// `--encrypt`: tcpdump on node-n1's uplink (the only link between the nodes) while the
/// probes run. Afterwards no packet from or to a pod may be on it outside the tunnel (UDP
/// between the nodes' tunnel ports), and some must be in it: a pod packet in clear is a FAIL.
struct UplinkCapture(testbed::tcpdump::Tcpdump);

/// The nodes' tunnel port (`tessera run --tunnel-port`'s default).
const TUNNEL_PORT: u16 = 51871;

impl UplinkCapture {
    fn start(tb: &Testbed) -> UplinkCapture {
        let file = tb.dir().join("uplink-n1.pcap");
        UplinkCapture(testbed::tcpdump::Tcpdump::start(
            &tb.nodes[0],
            "uplink",
            &file,
        ))
    }

    /// Stops the capture and prints what crossed between the nodes.
    fn finish(self, tb: &Testbed, tcp: &[Cell], udp: &[Cell]) -> bool {
        let frames = self.0.stop();
        // Pod packets: from or to a workload's /24. (The nodes' own link-local IPv6 chatter,
        // router solicitations and listener reports, is not pod traffic.)
        let nets: Vec<[u8; 3]> = tb
            .workloads
            .iter()
            .map(|w| {
                let [a, b, c, _] = w.ip.octets();
                [a, b, c]
            })
            .collect();
        let in_pods = |ip: &[u8]| nets.iter().any(|n| ip.get(..3) == Some(&n[..]));
        let mut tunnel = 0;
        let mut outside = Vec::new();
        for f in &frames {
            // Ethernet, IPv4: the header length, protocol and addresses.
            if f.len() < 34 || f[12..14] != [0x08, 0x00] {
                continue;
            }
            let ip = &f[14..];
            let l4 = usize::from(ip[0] & 0x0f) * 4;
            let ports = (ip[9] == 17 && ip.len() >= l4 + 4).then(|| {
                (
                    u16::from_be_bytes([ip[l4], ip[l4 + 1]]),
                    u16::from_be_bytes([ip[l4 + 2], ip[l4 + 3]]),
                )
            });
            let (src, dst) = (&ip[12..16], &ip[16..20]);
            if ports == Some((TUNNEL_PORT, TUNNEL_PORT)) {
                tunnel += 1;
            } else if in_pods(src) || in_pods(dst) {
                outside.push(format!(
                    "protocol {} {}.{}.{}.{} > {}.{}.{}.{}",
                    ip[9], src[0], src[1], src[2], src[3], dst[0], dst[1], dst[2], dst[3]
                ));
            }
        }
        let clear = outside.len();
        let cross = |cells: &[Cell]| {
            cells
                .iter()
                .filter(|c| tb.workload(&c.from).spec.node != tb.workload(&c.to).spec.node)
                .count()
        };
        println!(
            "\n-- encryption: tcpdump on node-n1's uplink while the {} cross-node TCP and {} UDP cells were probed",
            cross(tcp),
            cross(udp)
        );
        println!(
            "   {tunnel} WireGuard frames (UDP {TUNNEL_PORT} between the nodes; a GSO batch of datagrams is one frame), {clear} pod packets outside the tunnel"
        );
        for line in outside.iter().take(5) {
            println!("   outside the tunnel: {line}");
        }
        let ok = tunnel > 0 && clear == 0;
        println!(
            "   {}",
            if ok {
                "encrypted: no pod packet crossed between the nodes in clear"
            } else {
                "NOT ENCRYPTED: packets crossed outside the tunnel (or none through it)"
            }
        );
        ok
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn cell(allowed: bool, reason: &str) -> Cell {
        Cell {
            from: "backend-1".into(),
            to: "database-2".into(),
            port: 5432,
            allowed,
            reason: reason.into(),
        }
    }

    #[test]
    fn matrix_json_becomes_cells_of_the_demo_workloads() {
        let json = br#"{"probes":[
            {"from":"shop/backend-1","to":"shop/database-2","port":5432,"protocol":"TCP",
             "allowed":true,"reason":"allowed: ..."},
            {"from":"shop/database-2","to":"shop/frontend-1","port":80,"protocol":"TCP",
             "allowed":false,"reason":"denied: ..."}]}"#;
        let cells = parse_matrix(json).unwrap();
        assert_eq!(cells.len(), 2);
        assert_eq!(
            (cells[0].from.as_str(), cells[0].to.as_str(), cells[0].port),
            ("backend-1", "database-2", 5432)
        );
        assert!(cells[0].allowed);
        assert!(!cells[1].allowed);
    }

    #[test]
    fn a_matrix_naming_something_else_is_refused_with_the_field() {
        let other = br#"{"probes":[{"from":"default/web","to":"shop/frontend-1","port":80,
            "protocol":"TCP","allowed":true}]}"#;
        let e = parse_matrix(other).unwrap_err().to_string();
        assert!(e.contains("default/web") && e.contains("`from`"), "{e}");
        let no_port = br#"{"probes":[{"from":"shop/backend-1","to":"shop/frontend-1",
            "protocol":"TCP","allowed":true}]}"#;
        let e = parse_matrix(no_port).unwrap_err().to_string();
        assert!(e.contains("`port`"), "{e}");
        let e = parse_matrix(b"rows: 3").unwrap_err().to_string();
        assert!(e.contains("not JSON"), "{e}");
        let e = parse_matrix(br#"{"cells":[]}"#).unwrap_err().to_string();
        assert!(e.contains("`probes`"), "{e}");
    }

    #[test]
    fn a_denial_is_no_connection_and_an_allowance_is_a_working_one() {
        assert!(matches(true, &Observed::Echoed));
        assert!(!matches(true, &Observed::Failed("timeout".into())));
        assert!(!matches(true, &Observed::NoEcho("reset".into())));
        assert!(matches(false, &Observed::Failed("timeout".into())));
        assert!(matches(false, &Observed::Failed("refused".into())));
        // A handshake that completed was not denied, even if no data came back.
        assert!(!matches(false, &Observed::NoEcho("timed out".into())));
        assert!(!matches(false, &Observed::Echoed));
    }

    #[test]
    fn the_engines_reason_is_shortened_to_who_decided() {
        let allowed = cell(
            true,
            "allowed: egress: allowed by shop/database egress rule 0; ingress: allowed by shop/database ingress rule 0",
        );
        assert_eq!(why(&allowed), "allowed by shop/database");
        let ingress = cell(
            false,
            "denied: egress: allowed: not isolated for egress (no policy selects it); ingress: denied: isolated for ingress by shop/default-deny-ingress, shop/frontend (no rule matches)",
        );
        assert_eq!(why(&ingress), "denied: ingress");
        let both = cell(
            false,
            "denied: egress: denied: isolated for egress by shop/database (no rule matches); ingress: denied: isolated for ingress by shop/default-deny-ingress (no rule matches)",
        );
        assert_eq!(why(&both), "denied: egress+ingress");
        let admin = cell(
            true,
            "allowed: egress: allowed: not isolated for egress (no policy selects it); ingress: allowed by Admin ClusterNetworkPolicy/uptime-probe (priority 10) ingress rule 0 (Accept)",
        );
        assert_eq!(why(&admin), "allowed by Admin uptime-probe");
        let baseline = cell(
            false,
            "denied: egress: denied by Baseline ClusterNetworkPolicy/frontends-baseline (priority 10) egress rule 0 (Deny); ingress: allowed by shop/frontend ingress rule 0",
        );
        assert_eq!(
            why(&baseline),
            "denied: egress by Baseline frontends-baseline"
        );
    }

    #[test]
    fn the_cluster_for_the_policy_engine_has_every_workload_with_its_named_port() {
        // What `tessera policy matrix` reads: one Namespace and a Pod per tier, the named ports
        // the policies refer to (`http`, `api`) declared on the destinations.
        let y = cluster_objects(|t| format!("10.0.0.{}", t.node));
        assert_eq!(y.matches("kind: Pod").count(), TIERS.len());
        assert_eq!(y.matches("kind: Namespace").count(), 1);
        assert!(y.contains(
            "metadata: {name: frontend-1, namespace: shop, labels: {role: WebFrontend}}"
        ));
        assert!(y.contains("{name: http, containerPort: 80, protocol: TCP}"));
        assert!(y.contains("{name: api, containerPort: 8080, protocol: TCP}"));
        assert!(y.contains("metadata: {name: external-2, namespace: shop, labels: {role: External}}\nspec:\n  nodeName: node-n2\n  containers: [{name: app, image: busybox, ports: []}]"));
    }
}
