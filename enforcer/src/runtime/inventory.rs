//! The static inventory: the workloads this node enforces, from a YAML file. The file is
//! re-read when it changes; a bad version is reported by file and field and the last good one
//! stays in force.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use policy::{ContainerPort, PodKey, Protocol};
use serde::Deserialize;

use super::{Desired, Event, NetnsRef, NodeInfo, Sender};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    /// None is an empty list: a node with nothing enforced yet, or, beside `--runtime docker`,
    /// a file of nodes only.
    #[serde(default)]
    workloads: Vec<WorkloadSpec>,
    /// The cluster's nodes, for admin `nodes` peers (optional).
    #[serde(default)]
    nodes: Vec<NodeSpec>,
}

/// One node of the inventory: what admin policies' `nodes` peers select (by labels) and match
/// (by address), and, for the tunnel between nodes (`--encrypt`), where its agent is reached
/// (its first address of our family) and which pod ranges are behind it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct NodeSpec {
    pub name: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    pub addresses: Vec<IpAddr>,
    /// Its pods' ranges (CIDRs), checked by [`parse_inventory`].
    #[serde(default, rename = "podCIDRs")]
    pub pod_cidrs: Vec<String>,
}

impl NodeSpec {
    pub fn to_node(&self) -> policy::Node {
        policy::Node {
            name: self.name.clone(),
            labels: self.labels.clone(),
            addresses: self.addresses.clone(),
        }
    }

    /// The node for the agent; the pod ranges were checked by [`parse_inventory`] (one that
    /// does not parse is left out).
    pub fn to_info(&self) -> NodeInfo {
        NodeInfo {
            node: self.to_node(),
            tunnel_addresses: self.addresses.clone(),
            pod_cidrs: self
                .pod_cidrs
                .iter()
                .filter_map(|c| super::parse_pod_cidr(c).ok())
                .collect(),
        }
    }
}

/// A whole inventory file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inventory {
    pub workloads: Vec<WorkloadSpec>,
    pub nodes: Vec<NodeSpec>,
}

/// One workload of the inventory.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct WorkloadSpec {
    pub name: String,
    pub namespace: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub namespace_labels: BTreeMap<String, String>,
    #[serde(default)]
    pub ports: Vec<PortSpec>,
    #[serde(default)]
    pub ips: Vec<IpAddr>,
    #[serde(default)]
    pub netns: Option<PathBuf>,
    #[serde(default)]
    pub pid: Option<u32>,
    /// Its packets to and from other nodes' pods must go through the tunnel between nodes
    /// (else they are dropped and recorded), as the `tessera.dev/require-encryption`
    /// annotation says in Kubernetes.
    #[serde(default)]
    pub require_encryption: bool,
}

/// A container port.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PortSpec {
    #[serde(default)]
    pub name: Option<String>,
    pub port: u16,
    #[serde(default = "tcp")]
    pub protocol: String,
}

fn tcp() -> String {
    "TCP".into()
}

impl WorkloadSpec {
    pub fn netns_ref(&self) -> NetnsRef {
        match (&self.netns, self.pid) {
            (Some(p), _) => NetnsRef::Path(p.clone()),
            (None, Some(pid)) => NetnsRef::Pid(pid),
            // parse() refuses this case.
            (None, None) => NetnsRef::Pid(0),
        }
    }
}

fn protocol(p: &str) -> Protocol {
    match p {
        "UDP" => Protocol::Udp,
        "SCTP" => Protocol::Sctp,
        _ => Protocol::Tcp,
    }
}

/// The workloads as the agent wants them; `source` names the file in log lines.
pub fn desired(source: &str, specs: &[WorkloadSpec]) -> Vec<Desired> {
    specs
        .iter()
        .enumerate()
        .map(|(i, w)| Desired {
            key: PodKey {
                namespace: w.namespace.clone(),
                name: w.name.clone(),
            },
            labels: w.labels.clone(),
            namespace_labels: Some(w.namespace_labels.clone()),
            ports: w
                .ports
                .iter()
                .map(|p| ContainerPort {
                    name: p.name.clone(),
                    port: p.port,
                    protocol: protocol(&p.protocol),
                })
                .collect(),
            ips: w.ips.clone(),
            netns: w.netns_ref(),
            origin: format!("{source}: workloads[{i}]"),
            started_at: None,
            require_encryption: w.require_encryption,
        })
        .collect()
}

fn mtime(path: &Path) -> Option<std::time::SystemTime> {
    std::fs::metadata(path).ok().and_then(|m| m.modified().ok())
}

/// The static runtime: the inventory at start (an error here stops the agent), then again each
/// time the file changes (polled every second; an error is logged and the last good inventory
/// stays in force).
pub async fn run(
    path: PathBuf,
    tx: Sender,
    stop: tokio::sync::watch::Receiver<bool>,
) -> Result<()> {
    watch(path, tx, stop, Contents::All).await
}

/// Beside another runtime (`--runtime docker --inventory FILE`): the file's nodes only, for admin
/// `nodes` peers and the tunnel between nodes; workloads come from that runtime, and a file that
/// lists any is refused (at start: the agent stops; on reload: the last good list stays).
pub async fn run_nodes(
    path: PathBuf,
    tx: Sender,
    stop: tokio::sync::watch::Receiver<bool>,
) -> Result<()> {
    watch(path, tx, stop, Contents::NodesOnly).await
}

/// What a watched inventory file gives.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Contents {
    All,
    NodesOnly,
}

/// [`load_inventory`] for `--runtime docker --inventory FILE`: nodes only.
pub fn load_nodes(path: &Path) -> Result<Vec<NodeSpec>> {
    let inv = load_inventory(path)?;
    if !inv.workloads.is_empty() {
        bail!(
            "{}: workloads[0]: with --runtime docker the workloads come from the Docker daemon; this file may list nodes only",
            path.display()
        );
    }
    Ok(inv.nodes)
}

fn load_contents(path: &Path, contents: Contents) -> Result<Inventory> {
    match contents {
        Contents::All => load_inventory(path),
        Contents::NodesOnly => load_nodes(path).map(|nodes| Inventory {
            workloads: Vec::new(),
            nodes,
        }),
    }
}

async fn watch(
    path: PathBuf,
    tx: Sender,
    mut stop: tokio::sync::watch::Receiver<bool>,
    contents: Contents,
) -> Result<()> {
    let source = path.display().to_string();
    let mut seen = mtime(&path);
    let inv = load_contents(&path, contents)?;
    if send(&tx, &source, inv, contents).await.is_err() {
        return Ok(());
    }
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => return Ok(()),
        }
        let now = mtime(&path);
        if now == seen {
            continue;
        }
        seen = now;
        match load_contents(&path, contents) {
            Ok(inv) => {
                tracing::info!(
                    file = %source,
                    workloads = inv.workloads.len(),
                    nodes = inv.nodes.len(),
                    "inventory reloaded"
                );
                if send(&tx, &source, inv, contents).await.is_err() {
                    return Ok(());
                }
            }
            Err(e) => tracing::error!(
                "inventory reload refused, the previous inventory stays in force: {e:#}"
            ),
        }
    }
}

/// The node inventory, then the workloads (unless the workloads are another runtime's).
async fn send(tx: &Sender, source: &str, inv: Inventory, contents: Contents) -> Result<(), ()> {
    let nodes = Event::Nodes {
        origin: source.to_owned(),
        nodes: inv.nodes.iter().map(NodeSpec::to_info).collect(),
    };
    tx.send(nodes).await.map_err(|_| ())?;
    if contents == Contents::NodesOnly {
        return Ok(());
    }
    tx.send(Event::Sync(desired(source, &inv.workloads)))
        .await
        .map_err(|_| ())
}

/// Parse a whole inventory (workloads and nodes); `source` names it in errors
/// (`FILE: workloads[2].netns: ...`, `FILE: nodes[1] (name): addresses[0]: ...`,
/// `FILE: nodes[1] (name): podCIDRs[0]: ...`).
pub fn parse_inventory(source: &str, text: &str) -> Result<Inventory> {
    let de = serde_norway::Deserializer::from_str(text);
    let file: File = serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if path == "." {
            anyhow::anyhow!("{source}: {inner}")
        } else {
            anyhow::anyhow!("{source}: {path}: {inner}")
        }
    })?;
    let mut seen = BTreeMap::new();
    let mut ns_labels: BTreeMap<&str, (usize, &BTreeMap<String, String>)> = BTreeMap::new();
    for (i, w) in file.workloads.iter().enumerate() {
        let at = |field: &str| format!("{source}: workloads[{i}].{field}");
        match (&w.netns, w.pid) {
            (Some(_), Some(_)) => bail!("{}: give netns or pid, not both", at("netns")),
            (None, None) => bail!("{}: missing (or give pid)", at("netns")),
            (Some(p), None) if !p.is_absolute() => {
                bail!("{}: {} is not an absolute path", at("netns"), p.display())
            }
            (None, Some(0)) => bail!("{}: 0 is not a process id", at("pid")),
            _ => {}
        }
        if let Some(j) = seen.insert((w.namespace.as_str(), w.name.as_str()), i) {
            bail!(
                "{}: {}/{} already defined by workloads[{j}]",
                at("name"),
                w.namespace,
                w.name
            );
        }
        for (k, port) in w.ports.iter().enumerate() {
            if port.port == 0 {
                bail!("{}: 0 is not a port", at(&format!("ports[{k}].port")));
            }
            if !matches!(port.protocol.as_str(), "TCP" | "UDP" | "SCTP") {
                bail!(
                    "{}: {:?} is not TCP, UDP or SCTP",
                    at(&format!("ports[{k}].protocol")),
                    port.protocol
                );
            }
        }
        match ns_labels.get(w.namespace.as_str()) {
            Some((j, labels)) if *labels != &w.namespace_labels => bail!(
                "{}: namespace {} has different labels in workloads[{j}]",
                at("namespaceLabels"),
                w.namespace
            ),
            Some(_) => {}
            None => {
                ns_labels.insert(&w.namespace, (i, &w.namespace_labels));
            }
        }
    }
    let mut scratch = policy::Engine::new();
    let mut names = BTreeMap::new();
    for (i, n) in file.nodes.iter().enumerate() {
        if let Some(j) = names.insert(n.name.as_str(), i) {
            bail!(
                "{source}: nodes[{i}].name: {} already defined by nodes[{j}]",
                n.name
            );
        }
        if let Err(e) = scratch.apply_node(n.to_node()) {
            let field = e.field.strip_prefix("spec.").unwrap_or(&e.field).to_owned();
            bail!("{source}: nodes[{i}] ({}): {field}: {}", n.name, e.message);
        }
    }
    // Pod ranges: each a network, none claimed twice (a range is behind one node).
    let mut ranges: Vec<(ipnet::IpNet, usize, usize)> = Vec::new();
    for (i, n) in file.nodes.iter().enumerate() {
        for (j, text) in n.pod_cidrs.iter().enumerate() {
            let at = format!("{source}: nodes[{i}] ({}): podCIDRs[{j}]", n.name);
            let net = super::parse_pod_cidr(text).map_err(|e| anyhow::anyhow!("{at}: {e}"))?;
            if let Some(&(other, k, m)) = ranges
                .iter()
                .find(|(o, _, _)| o.contains(&net.network()) || net.contains(&o.network()))
            {
                bail!(
                    "{at}: {net} overlaps {other} of nodes[{k}] ({}): podCIDRs[{m}]",
                    file.nodes[k].name
                );
            }
            ranges.push((net, i, j));
        }
    }
    Ok(Inventory {
        workloads: file.workloads,
        nodes: file.nodes,
    })
}

/// Read and parse an inventory file's workloads.
pub fn load(path: &Path) -> Result<Vec<WorkloadSpec>> {
    load_inventory(path).map(|i| i.workloads)
}

/// Read and parse a whole inventory file.
pub fn load_inventory(path: &Path) -> Result<Inventory> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    parse_inventory(&path.display().to_string(), &text)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    const GOOD: &str = "\
workloads:
  - name: web-1
    namespace: demo
    labels: {role: WebFrontend}
    namespaceLabels: {team: a}
    ports: [{name: http, port: 80, protocol: TCP}]
    ips: [10.1.1.2]
    netns: /var/run/netns/web-1
  - name: db-1
    namespace: demo
    namespaceLabels: {team: a}
    ports: [{port: 5432}]
    pid: 1234
";

    fn err(text: &str) -> String {
        format!("{:#}", parse_inventory("inv.yaml", text).unwrap_err())
    }

    #[test]
    fn nodes_are_read_and_bad_ones_named() {
        let text = format!(
            "{GOOD}nodes:\n  - name: node-a\n    labels: {{zone: a}}\n    addresses: [192.0.2.1, 2001:db8::1]\n"
        );
        let inv = parse_inventory("inv.yaml", &text).unwrap();
        assert_eq!(inv.nodes.len(), 1);
        assert_eq!(inv.nodes[0].to_node().addresses.len(), 2);
        let bad = text.replace("node-a", "Node_A");
        let e = format!("{:#}", parse_inventory("inv.yaml", &bad).unwrap_err());
        assert!(e.contains("inv.yaml: nodes[0] (Node_A)"), "{e}");
        let bad = text.replace("192.0.2.1", "224.0.0.1");
        let e = format!("{:#}", parse_inventory("inv.yaml", &bad).unwrap_err());
        assert!(e.contains("nodes[0]") && e.contains("addresses"), "{e}");
        let twice = format!("{text}  - name: node-a\n    addresses: [192.0.2.9]\n");
        let e = format!("{:#}", parse_inventory("inv.yaml", &twice).unwrap_err());
        assert!(e.contains("already defined by nodes[0]"), "{e}");
    }

    #[test]
    fn pod_cidrs_are_read_and_bad_ones_named() {
        let text = format!(
            "{GOOD}nodes:\n  - name: node-a\n    addresses: [192.0.2.1]\n    podCIDRs: [10.1.1.0/24, 'fd00:1::/64']\n  - name: node-b\n    addresses: [192.0.2.2]\n    podCIDRs: [10.1.2.0/24]\n"
        );
        let inv = parse_inventory("inv.yaml", &text).unwrap();
        let a = inv.nodes[0].to_info();
        assert_eq!(
            a.pod_cidrs,
            [
                "10.1.1.0/24".parse::<ipnet::IpNet>().unwrap(),
                "fd00:1::/64".parse().unwrap()
            ]
        );
        assert_eq!(a.tunnel_addresses, a.node.addresses);
        assert!(inv.nodes[1].to_info().pod_cidrs.len() == 1);
        for (bad, why) in [
            ("10.1.2.0/33", "not a CIDR"),
            ("10.1.2.7/24", "host bits"),
            ("0.0.0.0/0", "whole address space"),
            ("224.0.0.0/24", "not a unicast range"),
            (
                "10.1.1.128/25",
                "overlaps 10.1.1.0/24 of nodes[0] (node-a): podCIDRs[0]",
            ),
        ] {
            let e = err(&text.replace("[10.1.2.0/24]", &format!("[{bad}]")));
            assert!(
                e.starts_with("inv.yaml: nodes[1] (node-b): podCIDRs[0]: ") && e.contains(why),
                "{bad}: {e}"
            );
        }
        // Optional: a node without pod ranges is still a node.
        let plain = format!("{GOOD}nodes:\n  - name: node-a\n    addresses: [192.0.2.1]\n");
        let inv = parse_inventory("inv.yaml", &plain).unwrap();
        assert!(inv.nodes[0].to_info().pod_cidrs.is_empty());
    }

    #[test]
    fn beside_docker_the_file_gives_nodes_only_and_a_workload_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let nodes = dir.path().join("nodes.yaml");
        std::fs::write(
            &nodes,
            "nodes:\n  - name: node-a\n    addresses: [192.0.2.1]\n    podCIDRs: [10.1.1.0/24]\n",
        )
        .unwrap();
        let n = load_nodes(&nodes).unwrap();
        assert_eq!((n.len(), n[0].name.as_str()), (1, "node-a"));
        let both = dir.path().join("both.yaml");
        std::fs::write(&both, GOOD).unwrap();
        let e = format!("{:#}", load_nodes(&both).unwrap_err());
        assert!(
            e.contains("both.yaml: workloads[0]") && e.contains("nodes only"),
            "{e}"
        );
    }

    #[test]
    fn example_inventory_parses() {
        let w = parse_inventory("inv.yaml", GOOD).unwrap().workloads;
        assert_eq!(w.len(), 2);
        assert_eq!(w[0].labels["role"], "WebFrontend");
        assert_eq!(w[0].ips, ["10.1.1.2".parse::<IpAddr>().unwrap()]);
        assert_eq!(
            w[0].netns_ref(),
            NetnsRef::Path("/var/run/netns/web-1".into())
        );
        assert_eq!(w[1].netns_ref(), NetnsRef::Pid(1234));
        assert_eq!(w[1].ports[0].protocol, "TCP");
        assert_eq!(w[1].ports[0].name, None);
    }

    #[test]
    fn the_shipped_example_parses() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/static/inventory.yaml");
        let w = load(&path).unwrap();
        assert!(w.len() >= 2);
    }

    #[test]
    fn type_errors_name_file_and_field() {
        let e = err(
            "workloads:\n  - name: a\n    namespace: d\n    pid: 1\n    ports: [{port: http}]\n",
        );
        assert!(
            e.starts_with("inv.yaml: workloads[0].ports[0].port: "),
            "{e}"
        );
        let e =
            err("workloads:\n  - name: a\n    namespace: d\n    pid: 1\n    ips: [10.0.0.300]\n");
        assert!(e.starts_with("inv.yaml: workloads[0].ips[0]: "), "{e}");
    }

    #[test]
    fn unknown_and_missing_fields_are_named() {
        let e = err("workloads:\n  - name: a\n    namespace: d\n    pid: 1\n    label: {a: b}\n");
        assert!(e.contains("workloads[0]") && e.contains("label"), "{e}");
        let e = err("workloads:\n  - name: a\n    pid: 1\n");
        assert!(e.contains("namespace"), "{e}");
    }

    #[test]
    fn netns_or_pid_exactly_once() {
        let e = err("workloads:\n  - name: a\n    namespace: d\n");
        assert_eq!(e, "inv.yaml: workloads[0].netns: missing (or give pid)");
        let e = err("workloads:\n  - name: a\n    namespace: d\n    pid: 3\n    netns: /x\n");
        assert_eq!(
            e,
            "inv.yaml: workloads[0].netns: give netns or pid, not both"
        );
        let e = err("workloads:\n  - name: a\n    namespace: d\n    netns: rel/x\n");
        assert!(e.contains("not an absolute path"), "{e}");
    }

    #[test]
    fn duplicates_and_conflicting_namespace_labels_are_refused() {
        let e = err(
            "workloads:\n  - {name: a, namespace: d, pid: 1}\n  - {name: a, namespace: d, pid: 2}\n",
        );
        assert_eq!(
            e,
            "inv.yaml: workloads[1].name: d/a already defined by workloads[0]"
        );
        let e = err(
            "workloads:\n  - {name: a, namespace: d, pid: 1, namespaceLabels: {t: x}}\n  - {name: b, namespace: d, pid: 2}\n",
        );
        assert!(
            e.starts_with("inv.yaml: workloads[1].namespaceLabels: "),
            "{e}"
        );
    }

    #[test]
    fn bad_protocol_is_named() {
        let e = err(
            "workloads:\n  - {name: a, namespace: d, pid: 1, ports: [{port: 1, protocol: tcp}]}\n",
        );
        assert!(
            e.starts_with("inv.yaml: workloads[0].ports[0].protocol: "),
            "{e}"
        );
    }
}
