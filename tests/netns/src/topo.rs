//! The two-node topology, its workloads, inventories and agents.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use crate::agent::{Agent, AgentConfig, Mode};
use crate::netns::{EchoServer, Serve};
use crate::{run, run_status};

/// Namespace of every workload (the three-tier example's).
pub const NAMESPACE: &str = "shop";

static NEXT: AtomicU32 = AtomicU32::new(0);

/// What a workload is: its name, node (1 or 2), pod labels, declared container ports and
/// whether its node's agent enforces it (listed in the node's inventory).
#[derive(Clone, Debug)]
pub struct WorkloadSpec {
    pub name: String,
    pub node: u8,
    pub labels: BTreeMap<String, String>,
    /// (port name, port number).
    pub ports: Vec<(Option<String>, u16)>,
    pub enforced: bool,
    /// Declared ports served by a sink (reads to EOF, answers one byte) instead of an echo.
    pub sinks: Vec<u16>,
    /// `requireEncryption: true` in its inventory entry.
    pub require_encryption: bool,
}

impl WorkloadSpec {
    /// An enforced workload with the label `role=ROLE`.
    pub fn new(name: &str, node: u8, role: &str) -> WorkloadSpec {
        WorkloadSpec {
            name: name.to_owned(),
            node,
            labels: BTreeMap::from([("role".to_owned(), role.to_owned())]),
            ports: Vec::new(),
            enforced: true,
            sinks: Vec::new(),
            require_encryption: false,
        }
    }

    /// Requires encryption (the inventory's `requireEncryption: true`).
    pub fn require_encryption(mut self) -> WorkloadSpec {
        self.require_encryption = true;
        self
    }

    /// Declares a container port (named or not).
    pub fn port(mut self, name: Option<&str>, port: u16) -> WorkloadSpec {
        self.ports.push((name.map(str::to_owned), port));
        self
    }

    /// Declares a container port served by a sink (throughput measurements).
    pub fn sink_port(mut self, name: Option<&str>, port: u16) -> WorkloadSpec {
        self.sinks.push(port);
        self.port(name, port)
    }

    /// Not listed in any inventory: no agent touches it (a peer without agent).
    pub fn unenforced(mut self) -> WorkloadSpec {
        self.enforced = false;
        self
    }
}

/// A workload as built: its spec, netns name and addresses.
#[derive(Clone, Debug)]
pub struct Workload {
    pub spec: WorkloadSpec,
    pub ns: String,
    pub ip: Ipv4Addr,
    /// Its IPv6 address when the testbed is dual-stack ([`TestbedBuilder::ipv6`]).
    pub ip6: Option<Ipv6Addr>,
}

impl Workload {
    /// `ip:port` of this workload.
    pub fn addr(&self, port: u16) -> SocketAddr {
        SocketAddr::V4(SocketAddrV4::new(self.ip, port))
    }

    /// `[ip6]:port` of this workload; panics if the testbed is not dual-stack.
    pub fn addr6(&self, port: u16) -> SocketAddr {
        let ip6 = self.ip6.unwrap_or_else(|| {
            panic!(
                "workload {} has no IPv6 address: build the testbed with .ipv6(true)",
                self.spec.name
            )
        });
        SocketAddr::V6(SocketAddrV6::new(ip6, port, 0, 0))
    }
}

/// Builds a [`Testbed`].
/// Runs after the keys and inventories are written, before the agents start.
type BeforeAgents = Box<dyn FnOnce(&Testbed)>;

pub struct TestbedBuilder {
    workloads: Vec<WorkloadSpec>,
    agent: Option<AgentConfig>,
    policies: Option<PathBuf>,
    serve: Serve,
    ipv6: bool,
    before_agents: Option<BeforeAgents>,
}

impl TestbedBuilder {
    pub fn workload(mut self, w: WorkloadSpec) -> Self {
        self.workloads.push(w);
        self
    }

    /// Agents to start (one per node) with this configuration; without it, no agent runs.
    pub fn agents(mut self, cfg: AgentConfig) -> Self {
        self.agent = Some(cfg);
        self
    }

    /// NetworkPolicy directory given to every agent and to `tessera policy matrix`.
    pub fn policies(mut self, dir: &Path) -> Self {
        self.policies = Some(dir.to_owned());
        self
    }

    /// Dual-stack (default off): every link also gets an IPv6 address from a ULA plan
    /// mirroring the IPv4 one (`fd00:x:sub::/64` for `10.x.sub.0/24`, added `nodad`), the IPv6
    /// routes mirror the IPv4 ones, `net.ipv6.conf.all.forwarding=1` is set inside the node
    /// namespaces, echo servers listen on `[::]` (IPv4 too, v6only off) and the inventories
    /// list both addresses.
    pub fn ipv6(mut self, on: bool) -> Self {
        self.ipv6 = on;
        self
    }

    /// Runs `f` once the keys and inventories are written, before the agents start: to change
    /// a node's key material, e.g. give node 2 another CA. A node's agent takes its CA from
    /// `keys-n<N>/ca.crt` and its peer certificates from `peers-n<N>/` when `f` makes them
    /// (else the shared `ca/ca.crt` and `peers/`).
    pub fn before_agents(mut self, f: impl FnOnce(&Testbed) + 'static) -> Self {
        self.before_agents = Some(Box::new(f));
        self
    }

    /// How the echo servers on declared ports serve connections (default: thread each).
    pub fn serve(mut self, serve: Serve) -> Self {
        self.serve = serve;
        self
    }

    /// Creates the namespaces, links, routes, echo servers on every declared port, writes the
    /// inventories and key material, and starts the agents (waiting until each has installed
    /// its rules in every enforced workload).
    pub fn build(self) -> Testbed {
        crate::sweep_leftovers();
        let pid = std::process::id();
        let k = NEXT.fetch_add(1, Ordering::SeqCst);
        let id = format!("{pid}-{k}");
        let x = 64 + (pid % 128) as u8;
        let yb = ((k % 8) * 32) as u8;
        let dir = tempfile::Builder::new()
            .prefix(&format!("ts-{id}-"))
            .tempdir()
            .expect("temp dir");
        let mut tb = Testbed {
            id: id.clone(),
            dir,
            nodes: [format!("ts-{id}-n1"), format!("ts-{id}-n2")],
            workloads: Vec::new(),
            servers: Vec::new(),
            agents: Vec::new(),
            policies: self.policies.clone(),
            agent_cfg: self.agent.clone(),
            created: Vec::new(),
            x,
            yb,
            ipv6: self.ipv6,
        };
        let link = tb.link();
        for n in tb.nodes.clone() {
            tb.add_ns(&n);
            run(&[
                "ip",
                "netns",
                "exec",
                &n,
                "sysctl",
                "-qw",
                "net.ipv4.ip_forward=1",
            ]);
            if tb.ipv6 {
                run(&[
                    "ip",
                    "netns",
                    "exec",
                    &n,
                    "sysctl",
                    "-qw",
                    "net.ipv6.conf.all.forwarding=1",
                ]);
                no_dad(&n);
            }
        }
        let (n1, n2) = (tb.nodes[0].clone(), tb.nodes[1].clone());
        run(&[
            "ip", "link", "add", "name", "uplink", "netns", &n1, "type", "veth", "peer", "name",
            "uplink", "netns", &n2,
        ]);
        for (i, n) in [&n1, &n2].into_iter().enumerate() {
            run(&[
                "ip",
                "-n",
                n,
                "addr",
                "add",
                &format!("{}/24", link[i]),
                "dev",
                "uplink",
            ]);
            if tb.ipv6 {
                add_addr6(n, tb.link6()[i], "uplink");
            }
            run(&["ip", "-n", n, "link", "set", "uplink", "up"]);
        }
        for (j, spec) in self.workloads.into_iter().enumerate() {
            assert!(spec.node == 1 || spec.node == 2, "node must be 1 or 2");
            assert!(j < 30, "at most 30 workloads");
            let ns = format!("ts-{id}-{}", spec.name);
            tb.add_ns(&ns);
            let (ip, ip6) = tb.wire(j, spec.node, &ns);
            for &(_, port) in &spec.ports {
                let serve = if spec.sinks.contains(&port) {
                    Serve::Sink
                } else {
                    self.serve
                };
                let server = if tb.ipv6 {
                    EchoServer::start_dual(&ns, port, serve)
                } else {
                    EchoServer::start(&ns, port, serve)
                };
                tb.servers.push((spec.name.clone(), server));
            }
            tb.workloads.push(Workload { spec, ns, ip, ip6 });
        }
        if tb.ipv6 {
            for ns in tb.created.clone() {
                wait_links_up6(&ns);
            }
        }
        if let Some(cfg) = self.agent {
            tb.write_keys(cfg.mode);
            for node in 1..=2u8 {
                tb.write_inventory(node);
            }
            if let Some(f) = self.before_agents {
                f(&tb);
            }
            for node in 1..=2u8 {
                let agent = tb.spawn_agent(node, &cfg);
                tb.agents.push(agent);
            }
            for i in 0..tb.agents.len() {
                tb.wait_agent_ready(i);
            }
        }
        tb
    }
}

/// Two nodes, their workloads, echo servers and agents. Torn down on drop.
pub struct Testbed {
    pub id: String,
    dir: tempfile::TempDir,
    /// Node netns names.
    pub nodes: [String; 2],
    pub workloads: Vec<Workload>,
    servers: Vec<(String, EchoServer)>,
    agents: Vec<Agent>,
    policies: Option<PathBuf>,
    agent_cfg: Option<AgentConfig>,
    created: Vec<String>,
    /// Addressing: workloads get `10.x.(yb+1+j).0/24`, the nodes' link is `10.x.yb.0/24`.
    x: u8,
    yb: u8,
    /// Dual-stack: also `fd00:x:(yb+1+j)::/64` and `fd00:x:yb::/64`.
    ipv6: bool,
}

impl Testbed {
    pub fn builder() -> TestbedBuilder {
        TestbedBuilder {
            workloads: Vec::new(),
            agent: None,
            policies: None,
            serve: Serve::Threaded,
            ipv6: false,
            before_agents: None,
        }
    }

    /// Whether the testbed is dual-stack ([`TestbedBuilder::ipv6`]).
    pub fn is_ipv6(&self) -> bool {
        self.ipv6
    }

    /// The ULA mirroring `10.x.sub.0/24`: `fd00:x:sub::host`.
    fn ula(&self, sub: u8, host: u16) -> Ipv6Addr {
        Ipv6Addr::new(0xfd00, u16::from(self.x), u16::from(sub), 0, 0, 0, 0, host)
    }

    /// IPv6 addresses of the nodes on their link (dual-stack only).
    fn link6(&self) -> [Ipv6Addr; 2] {
        [self.ula(self.yb, 1), self.ula(self.yb, 2)]
    }

    /// Addresses of the nodes on their link.
    /// The nodes' addresses on their link (`uplink`), node 1 then node 2.
    pub fn link(&self) -> [Ipv4Addr; 2] {
        [
            Ipv4Addr::new(10, self.x, self.yb, 1),
            Ipv4Addr::new(10, self.x, self.yb, 2),
        ]
    }

    /// Links netns `ns` (workload number `j`) to its node: a veth `eth0` in `ns`, `w<j>` in the
    /// node, addresses from `10.x.(yb+1+j).0/24`, default route via the node, and a route to
    /// it on the other node; dual-stack, the same in IPv6 from `fd00:x:(yb+1+j)::/64`. Returns
    /// the workload's addresses.
    fn wire(&mut self, j: usize, node: u8, ns: &str) -> (Ipv4Addr, Option<Ipv6Addr>) {
        assert!(node == 1 || node == 2, "node must be 1 or 2");
        assert!(j < 30, "at most 30 workloads");
        let (x, yb) = (self.x, self.yb);
        let link = self.link();
        let other = self.nodes[usize::from(2 - node)].clone();
        let node_ns = self.nodes[usize::from(node - 1)].clone();
        let sub = yb + 1 + j as u8;
        let gw = Ipv4Addr::new(10, x, sub, 1);
        let ip = Ipv4Addr::new(10, x, sub, 2);
        let dev = format!("w{j}");
        if self.ipv6 {
            no_dad(ns);
        }
        run(&[
            "ip", "link", "add", "name", "eth0", "netns", ns, "type", "veth", "peer", "name", &dev,
            "netns", &node_ns,
        ]);
        run(&[
            "ip",
            "-n",
            &node_ns,
            "addr",
            "add",
            &format!("{gw}/24"),
            "dev",
            &dev,
        ]);
        run(&["ip", "-n", &node_ns, "link", "set", &dev, "up"]);
        run(&[
            "ip",
            "-n",
            ns,
            "addr",
            "add",
            &format!("{ip}/24"),
            "dev",
            "eth0",
        ]);
        run(&["ip", "-n", ns, "link", "set", "eth0", "up"]);
        run(&[
            "ip",
            "-n",
            ns,
            "route",
            "add",
            "default",
            "via",
            &gw.to_string(),
        ]);
        let via = link[usize::from(node - 1)].to_string();
        run(&[
            "ip",
            "-n",
            &other,
            "route",
            "add",
            &format!("10.{x}.{sub}.0/24"),
            "via",
            &via,
        ]);
        if !self.ipv6 {
            return (ip, None);
        }
        let (gw6, ip6) = (self.ula(sub, 1), self.ula(sub, 2));
        add_addr6(&node_ns, gw6, &dev);
        add_addr6(ns, ip6, "eth0");
        run(&[
            "ip",
            "-6",
            "-n",
            ns,
            "route",
            "add",
            "default",
            "via",
            &gw6.to_string(),
        ]);
        let via6 = self.link6()[usize::from(node - 1)].to_string();
        run(&[
            "ip",
            "-6",
            "-n",
            &other,
            "route",
            "add",
            &format!("{}/64", self.ula(sub, 0)),
            "via",
            &via6,
        ]);
        (ip, Some(ip6))
    }

    /// Gives an existing netns (a container's: that of process `pid`) connectivity as a new
    /// workload `name` behind `node`: the netns is attached as `ts-<id>-<name>`
    /// (`ip netns attach`, so every helper that takes a netns name works on it) and wired
    /// like the built workloads. The workload is not in any inventory (`enforced: false`: a
    /// runtime such as Docker tells the agent about it); deleted (detached) on drop.
    pub fn attach_netns(&mut self, node: u8, name: &str, pid: u32) -> Workload {
        let ns = format!("ts-{}-{name}", self.id);
        run(&["ip", "netns", "attach", &ns, &pid.to_string()]);
        self.created.push(ns.clone());
        run(&["ip", "-n", &ns, "link", "set", "lo", "up"]);
        let j = self.workloads.len();
        let (ip, ip6) = self.wire(j, node, &ns);
        let mut spec = WorkloadSpec::new(name, node, "").unenforced();
        spec.labels.clear();
        if self.ipv6 {
            let node_ns = self.nodes[usize::from(node - 1)].clone();
            wait_links_up6(&node_ns);
            wait_links_up6(&ns);
        }
        let w = Workload { spec, ns, ip, ip6 };
        self.workloads.push(w.clone());
        w
    }

    /// Starts an echo server (thread per connection) on `port` inside workload `name` (on
    /// IPv6 too when dual-stack).
    pub fn serve(&mut self, name: &str, port: u16) {
        let ns = self.workload(name).ns.clone();
        let server = if self.ipv6 {
            EchoServer::start_dual(&ns, port, Serve::Threaded)
        } else {
            EchoServer::start(&ns, port, Serve::Threaded)
        };
        self.servers.push((name.to_owned(), server));
    }

    /// Starts the agent of `node` (1 first, then 2) with `runtime_args` in place of an
    /// inventory (e.g. `--runtime docker --docker-host URL`), the keys of `cfg.mode` (written
    /// on first use) and the testbed's policies; waits until its /metrics answers.
    pub fn start_agent_with(&mut self, node: u8, cfg: &AgentConfig, runtime_args: &[&str]) {
        assert_eq!(
            self.agents.len(),
            usize::from(node - 1),
            "start the agent of node 1 before that of node 2"
        );
        if self.agent_cfg.is_none() {
            self.agent_cfg = Some(cfg.clone());
            self.write_keys(cfg.mode);
        }
        let args = runtime_args.iter().map(|a| a.to_string()).collect();
        let agent = self.spawn_agent_args(node, cfg, args);
        self.agents.push(agent);
        self.agents[usize::from(node - 1)].wait_ready(|| true);
    }

    fn add_ns(&mut self, ns: &str) {
        run(&["ip", "netns", "add", ns]);
        self.created.push(ns.to_owned());
        run(&["ip", "-n", ns, "link", "set", "lo", "up"]);
    }

    /// The scratch directory (inventories, keys, agent logs).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Every netns of the testbed (nodes and workloads).
    pub fn all_netns(&self) -> Vec<String> {
        self.created.clone()
    }

    pub fn workload(&self, name: &str) -> &Workload {
        self.workloads
            .iter()
            .find(|w| w.spec.name == name)
            .unwrap_or_else(|| panic!("no workload {name}"))
    }

    /// The echo server of `workload` on `port`.
    pub fn server(&self, workload: &str, port: u16) -> &EchoServer {
        self.servers
            .iter()
            .find(|(w, s)| w == workload && s.port() == port)
            .map(|(_, s)| s)
            .unwrap_or_else(|| panic!("no server {workload}:{port}"))
    }

    /// Connects from workload `from` to workload `to` on `port`.
    pub fn connect(
        &self,
        from: &str,
        to: &str,
        port: u16,
        timeout: Duration,
    ) -> std::io::Result<TcpStream> {
        let dst = self.workload(to).addr(port);
        crate::netns::connect(&self.workload(from).ns, dst, timeout)
    }

    /// Tries every cell at once (a thread each): connects from `from` to `to` on `port`, over
    /// IPv6 if `ipv6` (dual-stack only) or IPv4, with `ok_timeout` if the cell is allowed and
    /// `denied_timeout` if not, and echoes one byte. The outcomes, in the order of `cells`.
    pub fn probe(
        &self,
        cells: &[Cell],
        ipv6: bool,
        ok_timeout: Duration,
        denied_timeout: Duration,
    ) -> Vec<std::io::Result<()>> {
        let handles: Vec<_> = cells
            .iter()
            .map(|c| {
                let ns = self.workload(&c.from).ns.clone();
                let to = self.workload(&c.to);
                let addr = if ipv6 {
                    to.addr6(c.port)
                } else {
                    to.addr(c.port)
                };
                let timeout = if c.allowed {
                    ok_timeout
                } else {
                    denied_timeout
                };
                std::thread::spawn(move || {
                    let mut s = crate::netns::connect(&ns, addr, timeout)?;
                    crate::netns::echo_once(&mut s, 42)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("probe thread"))
            .collect()
    }

    /// The agent of node 1 or 2.
    pub fn agent(&self, node: u8) -> &Agent {
        &self.agents[usize::from(node - 1)]
    }

    /// The agent of node 1 or 2, to kill or stop it.
    pub fn agent_mut(&mut self, node: u8) -> &mut Agent {
        &mut self.agents[usize::from(node - 1)]
    }

    /// Restarts the agent of `node` (after a kill or stop) with the same configuration and
    /// waits until it is ready.
    pub fn restart_agent(&mut self, node: u8) {
        let cfg = self
            .agent_cfg
            .clone()
            .expect("testbed built without agents");
        let i = usize::from(node - 1);
        let agent = self.spawn_agent(node, &cfg);
        self.agents[i] = agent;
        self.wait_agent_ready(i);
    }

    fn write_keys(&self, mode: Mode) {
        let d = self.dir();
        match mode {
            Mode::Psk => {
                // 32 random bytes, hex: the agent's --psk-file.
                let mut key = [0u8; 32];
                getrandom_fill(&mut key);
                let hex: String = key.iter().map(|b| format!("{b:02x}")).collect();
                std::fs::write(d.join("psk"), hex + "\n").expect("write psk");
            }
            Mode::Pki => {
                let tessera = &self.agent_cfg.as_ref().expect("agents").tessera;
                let t = tessera.to_str().expect("utf-8 path");
                let ca = d.join("ca");
                let ca = ca.to_str().expect("utf-8 path");
                run(&[t, "pki", "init-ca", "--out", ca]);
                let peers = d.join("peers");
                std::fs::create_dir_all(&peers).expect("peers dir");
                for n in ["n1", "n2"] {
                    let out = d.join(format!("keys-{n}"));
                    let out = out.to_str().expect("utf-8 path");
                    run(&[
                        t,
                        "pki",
                        "issue-node",
                        "--ca",
                        ca,
                        "--node",
                        &self.node_name(n),
                        "--out",
                        out,
                    ]);
                    let name = self.node_name(n);
                    std::fs::copy(
                        d.join(format!("keys-{n}/{name}.crt")),
                        peers.join(format!("{name}.crt")),
                    )
                    .expect("copy node cert");
                }
            }
        }
    }

    /// The Kubernetes node name of node `n1`/`n2` (also the agent's --node-name).
    pub fn node_name(&self, n: &str) -> String {
        format!("node-{n}")
    }

    /// The pod ranges behind `node` (1 or 2): the /24 (and /64 when dual-stack) of each of its
    /// workloads, enforced or not.
    pub fn pod_cidrs(&self, node: u8) -> Vec<String> {
        let mut out = Vec::new();
        for w in self.workloads.iter().filter(|w| w.spec.node == node) {
            let o = w.ip.octets();
            out.push(format!("{}.{}.{}.0/24", o[0], o[1], o[2]));
            if let Some(ip6) = w.ip6 {
                let s = ip6.segments();
                out.push(format!(
                    "{}/64",
                    Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0)
                ));
            }
        }
        out
    }

    /// The address of node 1 or 2 on the link between them (where its tunnel is reached).
    pub fn node_addr(&self, node: u8) -> Ipv4Addr {
        self.link()[usize::from(node - 1)]
    }

    /// Both nodes as inventory `nodes:` entries (link addresses, pod ranges), YAML.
    pub fn nodes_yaml(&self) -> String {
        let mut y = String::from("nodes:\n");
        for node in 1..=2u8 {
            let _ = writeln!(y, "- name: {}", self.node_name(&format!("n{node}")));
            let mut addrs = vec![self.link()[usize::from(node - 1)].to_string()];
            if self.ipv6 {
                addrs.push(format!("\"{}\"", self.link6()[usize::from(node - 1)]));
            }
            let _ = writeln!(y, "  addresses: [{}]", addrs.join(", "));
            let cidrs: Vec<String> = self
                .pod_cidrs(node)
                .into_iter()
                .map(|c| format!("\"{c}\""))
                .collect();
            let _ = writeln!(y, "  podCIDRs: [{}]", cidrs.join(", "));
        }
        y
    }

    /// The inventory of `node` (1 or 2): its enforced workloads, YAML (and both nodes, with
    /// [`AgentConfig::list_nodes`]).
    pub fn inventory_yaml(&self, node: u8) -> String {
        let mut y = String::from("workloads:\n");
        for w in self
            .workloads
            .iter()
            .filter(|w| w.spec.node == node && w.spec.enforced)
        {
            let _ = writeln!(y, "- name: {}", w.spec.name);
            let _ = writeln!(y, "  namespace: {NAMESPACE}");
            let _ = writeln!(y, "  labels: {}", flow_map(&w.spec.labels));
            let _ = writeln!(
                y,
                "  namespaceLabels: {{kubernetes.io/metadata.name: {NAMESPACE}}}"
            );
            match w.ip6 {
                Some(ip6) => {
                    let _ = writeln!(y, "  ips: [{}, \"{ip6}\"]", w.ip);
                }
                None => {
                    let _ = writeln!(y, "  ips: [{}]", w.ip);
                }
            }
            let _ = writeln!(y, "  netns: /run/netns/{}", w.ns);
            if w.spec.require_encryption {
                y.push_str("  requireEncryption: true\n");
            }
            y.push_str("  ports:");
            if w.spec.ports.is_empty() {
                y.push_str(" []");
            }
            y.push('\n');
            for (name, port) in &w.spec.ports {
                match name {
                    Some(n) => {
                        let _ = writeln!(y, "  - {{name: {n}, port: {port}, protocol: TCP}}");
                    }
                    None => {
                        let _ = writeln!(y, "  - {{port: {port}, protocol: TCP}}");
                    }
                }
            }
        }
        if self.agent_cfg.as_ref().is_some_and(|c| c.list_nodes) {
            y.push_str(&self.nodes_yaml());
        }
        y
    }

    /// Makes workload `name` require encryption or not, and rewrites its node's inventory
    /// (the agent reloads it).
    pub fn set_require_encryption(&mut self, name: &str, on: bool) {
        let w = self
            .workloads
            .iter_mut()
            .find(|w| w.spec.name == name)
            .unwrap_or_else(|| panic!("no workload {name}"));
        w.spec.require_encryption = on;
        let node = w.spec.node;
        self.write_inventory(node);
    }

    fn write_inventory(&self, node: u8) {
        std::fs::write(
            self.dir().join(format!("inventory-n{node}.yaml")),
            self.inventory_yaml(node),
        )
        .expect("write inventory");
    }

    /// The enforced workloads as Kubernetes objects (Namespace, Pods with IPs and ports), for
    /// `tessera policy matrix`. Workloads without agent are not pods of the policy world (to
    /// the agents they are IP-only peers), so they are left out.
    pub fn cluster_yaml(&self) -> String {
        let mut y = format!(
            "apiVersion: v1\nkind: Namespace\nmetadata: {{name: {NAMESPACE}, labels: {{kubernetes.io/metadata.name: {NAMESPACE}}}}}\n"
        );
        for w in self.workloads.iter().filter(|w| w.spec.enforced) {
            let ports: Vec<String> = w
                .spec
                .ports
                .iter()
                .map(|(n, p)| match n {
                    Some(n) => format!("{{name: {n}, containerPort: {p}}}"),
                    None => format!("{{containerPort: {p}}}"),
                })
                .collect();
            let _ = write!(
                y,
                "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {}, namespace: {NAMESPACE}, labels: {}}}\nspec:\n  containers: [{{name: app, image: app:1, ports: [{}]}}]\nstatus: {{podIP: {}}}\n",
                w.spec.name,
                flow_map(&w.spec.labels),
                ports.join(", "),
                w.ip
            );
        }
        y
    }

    /// `tessera policy matrix -o json` over the workloads and the policies: every probed
    /// (from, to, port) with the engine's verdict.
    pub fn policy_matrix(&self, tessera: &Path) -> Vec<Cell> {
        let policies = self
            .policies
            .as_ref()
            .expect("testbed built without policies");
        let cluster = self.dir().join("cluster.yaml");
        std::fs::write(&cluster, self.cluster_yaml()).expect("write cluster.yaml");
        let json = run(&[
            tessera.to_str().expect("utf-8"),
            "policy",
            "matrix",
            "-f",
            cluster.to_str().expect("utf-8"),
            "-f",
            policies.to_str().expect("utf-8"),
            "-o",
            "json",
        ]);
        let v: serde_json::Value = serde_json::from_str(&json).expect("matrix JSON");
        let strip = |s: &str| s.trim_start_matches(&format!("{NAMESPACE}/")).to_owned();
        v["probes"]
            .as_array()
            .expect("probes array")
            .iter()
            .map(|p| Cell {
                from: strip(p["from"].as_str().expect("from")),
                to: strip(p["to"].as_str().expect("to")),
                port: p["port"].as_u64().expect("port") as u16,
                allowed: p["allowed"].as_bool().expect("allowed"),
                reason: p["reason"].as_str().unwrap_or_default().to_owned(),
            })
            .collect()
    }

    fn spawn_agent(&self, node: u8, cfg: &AgentConfig) -> Agent {
        let inventory = self.dir().join(format!("inventory-n{node}.yaml"));
        let args = vec!["--inventory".into(), inventory.display().to_string()];
        self.spawn_agent_args(node, cfg, args)
    }

    fn spawn_agent_args(&self, node: u8, cfg: &AgentConfig, runtime: Vec<String>) -> Agent {
        let n = format!("n{node}");
        let d = self.dir();
        let mut args: Vec<String> = vec!["run".into(), "--node-name".into(), self.node_name(&n)];
        args.extend(runtime);
        args.extend([
            "--policies".into(),
            self.policies
                .as_ref()
                .expect("agents need a policies dir")
                .display()
                .to_string(),
        ]);
        match cfg.mode {
            Mode::Psk => {
                args.push("--psk-file".into());
                args.push(d.join("psk").display().to_string());
            }
            Mode::Pki => {
                let name = self.node_name(&n);
                // A node's own CA or peer set, when a test made one (before_agents).
                let own_or = |own: PathBuf, shared: &str| {
                    if own.exists() { own } else { d.join(shared) }
                };
                for (flag, path) in [
                    (
                        "--ca-cert",
                        own_or(d.join(format!("keys-{n}/ca.crt")), "ca/ca.crt"),
                    ),
                    ("--node-cert", d.join(format!("keys-{n}/{name}.crt"))),
                    ("--node-key", d.join(format!("keys-{n}/{name}.key"))),
                    (
                        "--peer-certs",
                        own_or(d.join(format!("peers-{n}")), "peers"),
                    ),
                ] {
                    args.push(flag.into());
                    args.push(path.display().to_string());
                }
            }
        }
        let netns = cfg
            .in_node_netns
            .then(|| self.nodes[usize::from(node - 1)].clone());
        Agent::spawn(
            cfg,
            &n,
            args,
            &d.join(format!("agent-{n}.log")),
            netns.as_deref(),
        )
    }

    fn wait_agent_ready(&mut self, i: usize) {
        let node = i as u8 + 1;
        let nss: Vec<String> = self
            .workloads
            .iter()
            .filter(|w| w.spec.node == node && w.spec.enforced)
            .map(|w| w.ns.clone())
            .collect();
        let agent = &mut self.agents[i];
        agent.wait_ready(|| {
            nss.iter().all(|ns| {
                let out = run_status(&["ip", "netns", "exec", ns, "iptables-save", "-t", "mangle"]);
                String::from_utf8_lossy(&out.stdout).contains("-j TESSERA-INPUT")
            })
        });
    }

    /// `iptables-save -t mangle` (IPv4) inside `ns`.
    pub fn mangle_rules(ns: &str) -> String {
        run(&["ip", "netns", "exec", ns, "iptables-save", "-t", "mangle"])
    }

    /// `ip6tables-save -t mangle` inside `ns`.
    pub fn mangle_rules6(ns: &str) -> String {
        run(&["ip", "netns", "exec", ns, "ip6tables-save", "-t", "mangle"])
    }

    /// Every agent's log, for failure messages.
    pub fn agent_logs(&self) -> String {
        self.agents
            .iter()
            .map(Agent::log_tail)
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl Drop for Testbed {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "---- testbed {} failed; agent logs:\n{}",
                self.id,
                self.agent_logs()
            );
        }
        for a in &mut self.agents {
            a.kill();
        }
        self.servers.clear();
        for ns in self.created.iter().rev() {
            let pids = run_status(&["ip", "netns", "pids", ns]);
            for p in String::from_utf8_lossy(&pids.stdout).split_whitespace() {
                if let Ok(p) = p.parse::<i32>() {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(p),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
            }
            let _ = run_status(&["ip", "netns", "del", ns]);
        }
    }
}

/// One cell of `tessera policy matrix`.
#[derive(Clone, Debug)]
pub struct Cell {
    pub from: String,
    pub to: String,
    pub port: u16,
    pub allowed: bool,
    pub reason: String,
}

/// No duplicate address detection on the links created in `ns` from now on: their link-local
/// addresses are usable at once too. Without it a node's neighbour solicitations wait for its
/// link-local address to leave the tentative state, which holds the first packets forwarded
/// to a workload for seconds (a denied connection would then time out instead of being
/// refused at once).
fn no_dad(ns: &str) {
    for key in [
        "net.ipv6.conf.all.accept_dad=0",
        "net.ipv6.conf.default.accept_dad=0",
    ] {
        run(&["ip", "netns", "exec", ns, "sysctl", "-qw", key]);
    }
}

/// Waits (up to 10 s) until every link in `ns` other than `lo` has a link-local IPv6 address
/// that is not tentative: the kernel has seen its carrier come up (linkwatch, which can lag by
/// a second) and activated its queueing discipline. Until then packets sent on it are dropped,
/// so the first IPv6 connections right after the build would lose their SYNs.
fn wait_links_up6(ns: &str) {
    let start = std::time::Instant::now();
    loop {
        let links = run(&["ip", "-n", ns, "-o", "link", "show"]);
        let want = links
            .lines()
            .filter(|l| l.split(':').nth(1).is_some_and(|n| n.trim() != "lo"))
            .count();
        let addrs = run(&["ip", "-n", ns, "-6", "-o", "addr", "show", "scope", "link"]);
        let ready = addrs.lines().filter(|l| !l.contains("tentative")).count();
        if ready >= want {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "{ns}: {ready} of {want} links have a usable IPv6 link-local address after 10 s:\n{links}\n{addrs}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Adds `ip/64` to `dev` in `ns`, usable at once (no duplicate address detection).
fn add_addr6(ns: &str, ip: Ipv6Addr, dev: &str) {
    run(&[
        "ip",
        "-6",
        "-n",
        ns,
        "addr",
        "add",
        &format!("{ip}/64"),
        "dev",
        dev,
        "nodad",
    ]);
}

fn flow_map(m: &BTreeMap<String, String>) -> String {
    let items: Vec<String> = m.iter().map(|(k, v)| format!("{k}: {v}")).collect();
    format!("{{{}}}", items.join(", "))
}

/// Non-cryptographic filler for test keys and forged bytes: /dev/urandom.
pub fn getrandom_fill(buf: &mut [u8]) {
    use std::io::Read;
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(buf))
        .expect("read /dev/urandom");
}
