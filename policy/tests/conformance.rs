//! The NetworkPolicy conformance corpus: every scenario under `<workspace>/tests/conformance`
//! (format: `tests/conformance/README.md`) is loaded, its cluster built, its steps applied to an
//! [`Engine`] one by one, and after each step the cells of [`Matrix`] and the single
//! [`Engine::decide`] checks are compared with the scenario's expectations. Expected tables are
//! written with `ns/pod` headers (readable at the corpus' 9 pods) and compared cell by cell with
//! the engine's verdicts, whatever `render_table` prints.
//!
//! All scenarios run; the test fails at the end listing every mismatch with the scenario, the step,
//! the probe, both tables and the reason of each differing cell.

// A test may stop on a corpus file it cannot read; input errors are reported, not unwrapped.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::net::IpAddr;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1::{
    Container, ContainerPort as K8sContainerPort, Namespace, Pod, PodIP, PodSpec, PodStatus,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use policy::matrix::{Matrix, Probe, Source};
use policy::objects::{self, Located, Object, Origin};
use policy::{
    AdminKind, AdminPolicyKey, Connection, Decision, Direction, Engine, Labels, Peer, PodKey,
    PolicyKey, Protocol, Reason, RuleRef, WorkloadIdentity,
};
use serde::Deserialize;

/// Where the corpus lives.
fn corpus_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("tests")
        .join("conformance")
}

/// The label Kubernetes puts on every namespace, which the engine adds too.
const NS_NAME_LABEL: &str = "kubernetes.io/metadata.name";

// ---------------------------------------------------------------------------------------------
// The scenario format.
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Scenario {
    name: String,
    /// The upstream e2e test this re-expresses (its `It(...)` text).
    #[serde(default)]
    upstream: Option<String>,
    /// The NetworkPolicy semantics point a custom scenario pins down.
    #[serde(default)]
    semantics: Option<String>,
    #[serde(default)]
    description: Option<String>,
    /// Engine features the scenario needs (see [`FEATURES`]). A scenario that needs one the
    /// engine does not have ([`ENGINE_FEATURES`]) is pending: it runs for information only and
    /// is counted and listed, neither passed nor failed.
    #[serde(default)]
    requires: Vec<String>,
    cluster: ClusterSpec,
    /// Files of Kubernetes documents (paths relative to `tests/conformance`) applied after the
    /// cluster is built, before `setup`: what the upstream test applies before its subtests.
    #[serde(default)]
    manifests: Vec<String>,
    /// Steps that bring the cluster to the state the scenario starts from (e.g. what earlier
    /// subtests of the same upstream test changed); they check nothing.
    #[serde(default)]
    setup: Vec<Step>,
    steps: Vec<Step>,
}

/// Features a scenario may require, with what the engine lacks while it does not have them.
const FEATURES: &[(&str, &str)] = &[("nodes", "needs node inventory")];

/// The features this engine has. `nodes`: the engine reads `kind: Node` objects through
/// `objects::parse` / `objects::load` and decides admin `nodes` peers; once it does, add it
/// here and the pending node scenarios run (the clusters' `nodes` are then loaded too).
const ENGINE_FEATURES: &[&str] = &["nodes"];

fn feature_missing(feature: &str) -> Option<&'static str> {
    if ENGINE_FEATURES.contains(&feature) {
        return None;
    }
    FEATURES
        .iter()
        .find(|(f, _)| *f == feature)
        .map(|(_, why)| *why)
        .or(Some("unknown feature"))
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum ClusterSpec {
    /// `standard`: namespaces x, y, z with pods a, b, c each.
    Named(String),
    Inline(InlineCluster),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct InlineCluster {
    /// `standard` to start from the standard model and add to it.
    #[serde(default)]
    base: Option<String>,
    /// Namespace name -> labels (`kubernetes.io/metadata.name` is implied).
    #[serde(default)]
    namespaces: BTreeMap<String, Labels>,
    #[serde(default)]
    pods: Vec<PodDecl>,
    /// Nodes (loaded only when the engine has the `nodes` feature).
    #[serde(default)]
    nodes: Vec<NodeDecl>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct NodeDecl {
    node: String,
    #[serde(default)]
    labels: Labels,
    /// Its `InternalIP` addresses.
    #[serde(default)]
    ips: Vec<IpAddr>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PodDecl {
    /// `namespace/name`.
    pod: String,
    #[serde(default)]
    labels: Labels,
    #[serde(default)]
    ip: Option<IpAddr>,
    /// `name:80/TCP`, or `80/TCP` for an unnamed port.
    #[serde(default)]
    ports: Vec<String>,
    #[serde(default)]
    host_network: bool,
    /// `spec.nodeName`.
    #[serde(default)]
    node: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Step {
    /// What the step does, for failure messages.
    #[serde(default)]
    note: Option<String>,
    /// Kubernetes YAML documents (NetworkPolicy, Pod, Namespace), applied in order.
    #[serde(default)]
    apply: Option<String>,
    /// Applying must fail with an error whose text contains this.
    #[serde(default)]
    apply_error: Option<String>,
    #[serde(default)]
    remove: Option<RemoveSpec>,
    /// Edits a document applied earlier and applies it again (an update).
    #[serde(default)]
    patch: Option<PatchSpec>,
    #[serde(default)]
    relabel: Option<Relabel>,
    #[serde(default)]
    expect: Vec<Expectation>,
    #[serde(default)]
    decide: Vec<DecideCheck>,
    #[serde(default)]
    connect: Vec<ConnectCheck>,
}

impl Step {
    fn checks_something(&self) -> bool {
        !self.expect.is_empty()
            || !self.decide.is_empty()
            || !self.connect.is_empty()
            || self.apply_error.is_some()
    }
}

/// `object: Kind/name` (cluster-scoped) or `Kind/namespace/name`, then edits in order.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PatchSpec {
    object: String,
    ops: Vec<PatchOp>,
}

/// Exactly one of the fields. Paths are `spec.egress[0].action`: mapping keys and sequence
/// indices.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PatchOp {
    /// Exchanges two values (two rules, say).
    #[serde(default)]
    swap: Option<[String; 2]>,
    /// Replaces (or adds) the value at `path`.
    #[serde(default)]
    set: Option<PathValue>,
    /// Inserts into a sequence before the index `path` ends with (the length appends).
    #[serde(default)]
    insert: Option<PathValue>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PathValue {
    path: String,
    value: serde_norway::Value,
}

/// One connection as upstream e2e tests probe it: from a pod (or an IP-only source) to a pod,
/// allowed iff the source's egress and the destination's ingress allow it
/// ([`policy::matrix::evaluate`]).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConnectCheck {
    /// `namespace/name`, or an IP (an IP-only source).
    from: String,
    /// `namespace/name`.
    to: String,
    probe: String,
    allowed: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RemoveSpec {
    kind: String,
    #[serde(default)]
    namespace: Option<String>,
    name: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Relabel {
    /// `namespace/name` of a pod (exclusive with `namespace`).
    #[serde(default)]
    pod: Option<String>,
    #[serde(default)]
    namespace: Option<String>,
    #[serde(default)]
    add: Labels,
    #[serde(default)]
    delete: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Expectation {
    /// `80/TCP`.
    probe: String,
    /// Extra IP-only sources (rows after the pods).
    #[serde(default)]
    from_ips: Vec<IpAddr>,
    /// A truth table: a header of `ns/pod` destinations, then one row per source (`ns/pod` or IP)
    /// of `.` allowed, `X` denied, `-` not probed.
    #[serde(default)]
    table: Option<String>,
    /// Shorthand: start with everything allowed, then apply `allow|deny|skip SRC -> DST` in order.
    #[serde(default)]
    reachability: Option<Vec<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DecideCheck {
    /// The workload the decision is about (`namespace/name`).
    local: String,
    /// `ingress` or `egress`.
    direction: String,
    /// A pod (`namespace/name`: its identity, IP and, for egress, port name) or an IP (IP-only).
    peer: String,
    probe: String,
    allowed: bool,
    /// Optional expected reason: `not-isolated`, `host-network`, `allowed-by ns/policy#rule`,
    /// `isolated-by ns/p1,ns/p2`.
    #[serde(default)]
    reason: Option<String>,
}

/// Parses the `reason` of a decide check into the engine's [`Reason`].
fn parse_reason(s: &str, direction: Direction) -> Result<Reason, String> {
    let policy = |p: &str| -> Result<PolicyKey, String> {
        let k = parse_pod_key(p.trim())?;
        Ok(PolicyKey {
            namespace: k.namespace,
            name: k.name,
        })
    };
    let s = s.trim();
    match s.split_once(char::is_whitespace) {
        None if s == "not-isolated" => Ok(Reason::NotIsolated),
        None if s == "host-network" => Ok(Reason::HostNetwork),
        Some(("allowed-by", rest)) => {
            let (p, index) = rest
                .trim()
                .split_once('#')
                .ok_or_else(|| format!("reason {s:?}: expected allowed-by ns/policy#rule"))?;
            let index = index
                .parse::<usize>()
                .map_err(|e| format!("reason {s:?}: rule index: {e}"))?;
            Ok(Reason::AllowedBy(RuleRef {
                policy: policy(p)?,
                direction,
                index,
            }))
        }
        Some(("isolated-by", rest)) => Ok(Reason::Isolated(
            rest.split(',').map(policy).collect::<Result<_, _>>()?,
        )),
        _ => Err(format!(
            "reason {s:?}: expected not-isolated, host-network, allowed-by ns/policy#rule or isolated-by ns/p1,ns/p2"
        )),
    }
}

// ---------------------------------------------------------------------------------------------
// Parsing helpers.
// ---------------------------------------------------------------------------------------------

fn parse_protocol(s: &str) -> Result<Protocol, String> {
    match s {
        "TCP" => Ok(Protocol::Tcp),
        "UDP" => Ok(Protocol::Udp),
        "SCTP" => Ok(Protocol::Sctp),
        other => Err(format!("unknown protocol {other:?} (TCP, UDP or SCTP)")),
    }
}

fn parse_probe(s: &str) -> Result<Probe, String> {
    let (port, proto) = s
        .split_once('/')
        .ok_or_else(|| format!("probe {s:?}: expected PORT/PROTOCOL"))?;
    let port = port
        .trim()
        .parse::<u16>()
        .map_err(|e| format!("probe {s:?}: port: {e}"))?;
    Ok(Probe {
        port,
        protocol: parse_protocol(proto.trim()).map_err(|e| format!("probe {s:?}: {e}"))?,
    })
}

fn parse_pod_key(s: &str) -> Result<PodKey, String> {
    match s.split_once('/') {
        Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {
            Ok(PodKey {
                namespace: ns.to_string(),
                name: name.to_string(),
            })
        }
        _ => Err(format!("{s:?}: expected namespace/name")),
    }
}

/// `serve-80-tcp:80/TCP` or `80/TCP`.
fn parse_port_decl(s: &str) -> Result<K8sContainerPort, String> {
    let (name, rest) = match s.split_once(':') {
        Some((n, r)) => (Some(n.trim().to_string()), r),
        None => (None, s),
    };
    let probe = parse_probe(rest).map_err(|e| format!("port {s:?}: {e}"))?;
    Ok(K8sContainerPort {
        container_port: i32::from(probe.port),
        name,
        protocol: Some(probe.protocol.to_string()),
        ..Default::default()
    })
}

fn proto_lower(p: Protocol) -> &'static str {
    match p {
        Protocol::Tcp => "tcp",
        Protocol::Udp => "udp",
        Protocol::Sctp => "sctp",
        Protocol::Other(_) => "ip",
    }
}

// ---------------------------------------------------------------------------------------------
// The cluster model the runner keeps next to the engine (for relabels, patterns, decide checks).
// ---------------------------------------------------------------------------------------------

#[derive(Default)]
struct Cluster {
    namespaces: BTreeMap<String, Namespace>,
    pods: BTreeMap<PodKey, Pod>,
    nodes: Vec<NodeDecl>,
    /// Every document applied by a step, as last applied, by `Kind/name` or
    /// `Kind/namespace/name`: what `patch` edits.
    documents: BTreeMap<String, serde_norway::Value>,
}

fn make_namespace(name: &str, labels: &Labels) -> Namespace {
    Namespace {
        metadata: ObjectMeta {
            name: Some(name.to_string()),
            labels: Some(labels.clone()),
            ..Default::default()
        },
        ..Default::default()
    }
}

fn make_pod(
    key: &PodKey,
    labels: &Labels,
    ip: Option<IpAddr>,
    ports: Vec<K8sContainerPort>,
    host_network: bool,
    node: Option<&str>,
) -> Pod {
    Pod {
        metadata: ObjectMeta {
            name: Some(key.name.clone()),
            namespace: Some(key.namespace.clone()),
            labels: Some(labels.clone()),
            ..Default::default()
        },
        spec: Some(PodSpec {
            containers: vec![Container {
                name: "serve".to_string(),
                ports: Some(ports),
                ..Default::default()
            }],
            host_network: host_network.then_some(true),
            node_name: node.map(str::to_string),
            ..Default::default()
        }),
        status: ip.map(|ip| PodStatus {
            pod_ip: Some(ip.to_string()),
            pod_ips: Some(vec![PodIP { ip: ip.to_string() }]),
            ..Default::default()
        }),
    }
}

/// The upstream model: namespaces x, y, z labelled `ns=<name>`; pods a, b, c in each labelled
/// `pod=<name>`, serving 80 and 81 on TCP, UDP and SCTP as `serve-<port>-<proto>`. Pod IPs are
/// 10.0.N.M: N = 1, 2, 3 for x, y, z and M = 1, 2, 3 for a, b, c.
fn standard_cluster() -> Cluster {
    let mut c = Cluster::default();
    for (ni, ns) in ["x", "y", "z"].into_iter().enumerate() {
        let labels = Labels::from([("ns".to_string(), ns.to_string())]);
        c.namespaces
            .insert(ns.to_string(), make_namespace(ns, &labels));
        for (pi, pod) in ["a", "b", "c"].into_iter().enumerate() {
            let key = PodKey {
                namespace: ns.to_string(),
                name: pod.to_string(),
            };
            let mut ports = Vec::new();
            for port in [80u16, 81] {
                for proto in [Protocol::Tcp, Protocol::Udp, Protocol::Sctp] {
                    ports.push(K8sContainerPort {
                        container_port: i32::from(port),
                        name: Some(format!("serve-{port}-{}", proto_lower(proto))),
                        protocol: Some(proto.to_string()),
                        ..Default::default()
                    });
                }
            }
            let ip: IpAddr = format!("10.0.{}.{}", ni + 1, pi + 1)
                .parse()
                .expect("literal IP");
            let labels = Labels::from([("pod".to_string(), pod.to_string())]);
            c.pods.insert(
                key.clone(),
                make_pod(&key, &labels, Some(ip), ports, false, None),
            );
        }
    }
    c
}

/// A named cluster: `standard`, or `tests/conformance/clusters/<name>.yaml` (an inline cluster).
fn named_cluster(name: &str) -> Result<Cluster, String> {
    if name == "standard" {
        return Ok(standard_cluster());
    }
    let path = corpus_dir().join("clusters").join(format!("{name}.yaml"));
    let text = std::fs::read_to_string(&path).map_err(|e| {
        format!(
            "cluster: unknown named cluster {name:?} (`standard` or a file {}): {e}",
            path.display()
        )
    })?;
    let inline: InlineCluster = serde_norway::from_str(&text)
        .map_err(|e| format!("cluster {name:?} ({}): {e}", path.display()))?;
    if inline.base.as_deref().is_some_and(|b| b != "standard") {
        return Err(format!(
            "cluster {name:?}: a named cluster may only build on `standard`"
        ));
    }
    inline_cluster(&inline)
}

fn inline_cluster(inline: &InlineCluster) -> Result<Cluster, String> {
    let mut c = match &inline.base {
        Some(b) => named_cluster(b)?,
        None => Cluster::default(),
    };
    for (name, labels) in &inline.namespaces {
        c.namespaces
            .insert(name.clone(), make_namespace(name, labels));
    }
    for n in &inline.nodes {
        if c.nodes.iter().any(|m| m.node == n.node) {
            return Err(format!("cluster.nodes: {} declared twice", n.node));
        }
        c.nodes.push(n.clone());
    }
    for p in &inline.pods {
        let key = parse_pod_key(&p.pod).map_err(|e| format!("cluster.pods: {e}"))?;
        if !c.namespaces.contains_key(&key.namespace) {
            return Err(format!(
                "cluster.pods: {}: namespace {:?} is not declared",
                p.pod, key.namespace
            ));
        }
        if let Some(node) = &p.node {
            let Some(n) = c.nodes.iter().find(|n| &n.node == node) else {
                return Err(format!(
                    "cluster.pods: {}: node {node:?} is not declared",
                    p.pod
                ));
            };
            if p.host_network && p.ip.is_some_and(|ip| !n.ips.contains(&ip)) {
                return Err(format!(
                    "cluster.pods: {}: a host network pod has its node's address, one of {:?}",
                    p.pod, n.ips
                ));
            }
        }
        let ports = p
            .ports
            .iter()
            .map(|s| parse_port_decl(s))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("cluster.pods: {}: {e}", p.pod))?;
        c.pods.insert(
            key.clone(),
            make_pod(
                &key,
                &p.labels,
                p.ip,
                ports,
                p.host_network,
                p.node.as_deref(),
            ),
        );
    }
    Ok(c)
}

fn build_cluster(spec: &ClusterSpec) -> Result<Cluster, String> {
    match spec {
        ClusterSpec::Named(n) => named_cluster(n),
        ClusterSpec::Inline(inline) => inline_cluster(inline),
    }
}

fn pod_labels(pod: &Pod) -> Labels {
    pod.metadata.labels.clone().unwrap_or_default()
}

fn pod_ip(pod: &Pod) -> Option<IpAddr> {
    pod.status
        .as_ref()
        .and_then(|s| s.pod_ip.as_deref())
        .and_then(|ip| ip.parse().ok())
}

fn pod_host_network(pod: &Pod) -> bool {
    pod.spec
        .as_ref()
        .and_then(|s| s.host_network)
        .unwrap_or(false)
}

fn pod_port_name(pod: &Pod, probe: Probe) -> Option<String> {
    let spec = pod.spec.as_ref()?;
    spec.containers
        .iter()
        .flat_map(|c| c.ports.iter().flatten())
        .find(|p| {
            p.container_port == i32::from(probe.port)
                && p.protocol.as_deref().unwrap_or("TCP") == probe.protocol.to_string()
        })
        .and_then(|p| p.name.clone())
}

impl Cluster {
    fn namespace_labels(&self, ns: &str) -> Labels {
        let mut labels = self
            .namespaces
            .get(ns)
            .and_then(|n| n.metadata.labels.clone())
            .unwrap_or_default();
        labels.insert(NS_NAME_LABEL.to_string(), ns.to_string());
        labels
    }

    fn load_into(&self, engine: &mut Engine) -> Result<(), String> {
        for (name, ns) in &self.namespaces {
            engine
                .apply_namespace(ns)
                .map_err(|e| format!("cluster: namespace {name}: {e}"))?;
        }
        for (key, pod) in &self.pods {
            engine
                .apply_pod(pod)
                .map_err(|e| format!("cluster: pod {key}: {e}"))?;
        }
        if feature_missing("nodes").is_none() && !self.nodes.is_empty() {
            let parsed = objects::parse("cluster nodes", &self.nodes_yaml());
            if let Some(s) = parsed.skipped.first() {
                return Err(format!(
                    "cluster: the engine has the `nodes` feature but objects::parse skips kind {}",
                    s.kind
                ));
            }
            if let Some(e) = parsed.errors.first() {
                return Err(format!("cluster: {e}"));
            }
            let report = objects::load(engine, &parsed.objects);
            if let Some(e) = report.errors.first() {
                return Err(format!("cluster: {e}"));
            }
        }
        Ok(())
    }

    /// The cluster's nodes as Kubernetes `v1` Node documents: labels, `InternalIP` and
    /// `Hostname` addresses.
    fn nodes_yaml(&self) -> String {
        let docs: Vec<String> = self
            .nodes
            .iter()
            .map(|n| {
                let mut addresses: Vec<serde_json::Value> = n
                    .ips
                    .iter()
                    .map(|ip| serde_json::json!({"type": "InternalIP", "address": ip.to_string()}))
                    .collect();
                addresses.push(serde_json::json!({"type": "Hostname", "address": n.node}));
                let node = serde_json::json!({
                    "apiVersion": "v1",
                    "kind": "Node",
                    "metadata": {"name": n.node, "labels": n.labels},
                    "status": {"addresses": addresses},
                });
                serde_norway::to_string(&node).expect("a Node serializes")
            })
            .collect();
        docs.join("---\n")
    }
}

// ---------------------------------------------------------------------------------------------
// Truth tables.
// ---------------------------------------------------------------------------------------------

/// A truth table: destinations (columns), sources (rows) and one mark per cell.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Table {
    columns: Vec<String>,
    rows: Vec<String>,
    cells: BTreeMap<(String, String), char>,
}

fn is_mark(t: &str) -> bool {
    matches!(t, "." | "X" | "-")
}

/// Parses a table by whitespace-separated tokens. The header row lists destinations (optionally
/// after a corner token); each row is a source then one mark per destination. Lines before the
/// header that do not fit (titles such as `80/TCP`) are skipped.
fn parse_table(text: &str) -> Result<Table, String> {
    let lines: Vec<Vec<&str>> = text
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .filter(|t| !t.is_empty())
        .collect();
    // The header is the first line followed by a row of the right shape.
    let fits = |header: &[&str], row: &[&str]| -> Option<usize> {
        let marks = row.len().checked_sub(1)?;
        if marks == 0 || !row[1..].iter().all(|t| is_mark(t)) {
            return None;
        }
        if header.len() == marks {
            Some(0)
        } else if header.len() == marks + 1 {
            Some(1)
        } else {
            None
        }
    };
    let (start, skip) = (0..lines.len().saturating_sub(1))
        .find_map(|i| fits(&lines[i], &lines[i + 1]).map(|skip| (i, skip)))
        .ok_or_else(|| "no header row followed by a row of marks".to_string())?;
    let columns: Vec<String> = lines[start][skip..].iter().map(|s| s.to_string()).collect();
    let mut table = Table {
        columns: columns.clone(),
        rows: Vec::new(),
        cells: BTreeMap::new(),
    };
    for row in &lines[start + 1..] {
        if row.len() != columns.len() + 1 || !row[1..].iter().all(|t| is_mark(t)) {
            return Err(format!(
                "row {:?}: expected a source and {} marks",
                row.join(" "),
                columns.len()
            ));
        }
        let src = row[0].to_string();
        if table.rows.contains(&src) {
            return Err(format!("row {src}: listed twice"));
        }
        for (col, mark) in columns.iter().zip(&row[1..]) {
            let c = mark.chars().next().unwrap_or('?');
            table.cells.insert((src.clone(), col.clone()), c);
        }
        table.rows.push(src);
    }
    Ok(table)
}

fn render(table: &Table) -> String {
    let label = table.rows.iter().map(|s| s.len()).max().unwrap_or(1);
    let cell = table.columns.iter().map(|s| s.len()).max().unwrap_or(1);
    let mut out = String::new();
    let _ = write!(out, "{:label$}", "");
    for c in &table.columns {
        let _ = write!(out, "  {c:<cell$}");
    }
    out.push('\n');
    for r in &table.rows {
        let _ = write!(out, "{r:label$}");
        for c in &table.columns {
            let m = table
                .cells
                .get(&(r.clone(), c.clone()))
                .copied()
                .unwrap_or('?');
            let _ = write!(out, "  {m:<cell$}");
        }
        out.push('\n');
    }
    out
}

/// `*`, `ns/*`, `*/name`, `ns/name`, or a literal (an IP source).
fn pattern_matches(pattern: &str, label: &str) -> bool {
    if pattern == "*" {
        return true;
    }
    match (pattern.split_once('/'), label.split_once('/')) {
        (Some((pn, pp)), Some((ln, lp))) if !label.contains(':') => {
            (pn == "*" || pn == ln) && (pp == "*" || pp == lp)
        }
        _ => pattern == label,
    }
}

/// Expands the reachability shorthand over the cluster's pods and the IP sources.
fn expand_reachability(
    rules: &[String],
    sources: &[String],
    destinations: &[String],
) -> Result<Table, String> {
    let mut table = Table {
        columns: destinations.to_vec(),
        rows: sources.to_vec(),
        cells: BTreeMap::new(),
    };
    for s in sources {
        for d in destinations {
            let mark = if s == d { '-' } else { '.' };
            table.cells.insert((s.clone(), d.clone()), mark);
        }
    }
    for rule in rules {
        let parse = || -> Option<(char, &str, &str)> {
            let (verb, rest) = rule.trim().split_once(char::is_whitespace)?;
            let (src, dst) = rest.split_once("->")?;
            let mark = match verb {
                "allow" => '.',
                "deny" => 'X',
                "skip" => '-',
                _ => return None,
            };
            Some((mark, src.trim(), dst.trim()))
        };
        let (mark, src_pat, dst_pat) = parse().ok_or_else(|| {
            format!("reachability rule {rule:?}: expected `allow|deny|skip SRC -> DST`")
        })?;
        let mut matched = false;
        for s in sources.iter().filter(|s| pattern_matches(src_pat, s)) {
            for d in destinations.iter().filter(|d| pattern_matches(dst_pat, d)) {
                matched = true;
                if s != d {
                    table.cells.insert((s.clone(), d.clone()), mark);
                }
            }
        }
        if !matched {
            return Err(format!(
                "reachability rule {rule:?} matches no cell of this cluster"
            ));
        }
    }
    Ok(table)
}

fn source_label(s: &Source) -> String {
    match s {
        Source::Pod(k) => k.to_string(),
        Source::Ip(ip) => ip.to_string(),
    }
}

fn describe_decision(d: &Decision) -> String {
    format!("{} ({d})", if d.allowed { "allow" } else { "deny" })
}

// ---------------------------------------------------------------------------------------------
// Running a scenario.
// ---------------------------------------------------------------------------------------------

fn kind_of(doc: &serde_norway::Value) -> Option<&str> {
    doc.get("kind").and_then(|k| k.as_str())
}

/// Kinds that live in a namespace (their documents default to `default`, as `objects::parse`
/// does).
fn namespaced(kind: &str) -> bool {
    matches!(kind, "Pod" | "NetworkPolicy")
}

/// The key a document is kept under for `patch`: `Kind/name` or `Kind/namespace/name`.
fn document_key(doc: &serde_norway::Value) -> Option<String> {
    let kind = kind_of(doc)?;
    let meta = doc.get("metadata");
    let field = |f: &str| meta.and_then(|m| m.get(f)).and_then(|v| v.as_str());
    let name = field("name")?;
    Some(if namespaced(kind) {
        format!("{kind}/{}/{name}", field("namespace").unwrap_or("default"))
    } else {
        format!("{kind}/{name}")
    })
}

/// Applies every document of `text` the way the CLI does, through `objects::parse` and
/// `objects::load` (namespaces, pods, NetworkPolicies and the three admin kinds, in that order),
/// and updates the runner's cluster model. Any parse error, skipped kind or refused object is an
/// error (the objects load refuses are left as they were; the others are applied).
fn apply_documents(text: &str, engine: &mut Engine, cluster: &mut Cluster) -> Result<(), String> {
    let parsed = objects::parse("apply", text);
    let mut errors: Vec<String> = parsed.errors.iter().map(ToString::to_string).collect();
    errors.extend(parsed.skipped.iter().map(|s| {
        format!(
            "{}: kind {} ({}) is not one the engine reads",
            s.origin, s.kind, s.api_version
        )
    }));
    if !errors.is_empty() {
        return Err(errors.join("; "));
    }
    // The namespaces the documents live in, as the cluster has them: `load` would otherwise
    // apply them anew with no labels.
    let defined: BTreeSet<String> = parsed
        .objects
        .iter()
        .filter(|o| matches!(o.value, Object::Namespace(_)))
        .filter_map(|o| o.value.metadata().name.clone())
        .collect();
    let mut batch: Vec<Located<Object>> = Vec::new();
    let mut context = BTreeSet::new();
    for o in &parsed.objects {
        if let Some(ns) = o.value.metadata().namespace.as_deref()
            && !defined.contains(ns)
            && context.insert(ns.to_string())
            && let Some(namespace) = cluster.namespaces.get(ns)
        {
            batch.push(Located {
                origin: Origin {
                    source: "cluster".to_string(),
                    document: 0,
                    item: None,
                },
                value: Object::Namespace(namespace.clone()),
            });
        }
    }
    batch.extend(parsed.objects.iter().cloned());
    let report = objects::load(engine, &batch);
    for ns in &report.implied_namespaces {
        cluster
            .namespaces
            .insert(ns.clone(), make_namespace(ns, &Labels::new()));
    }
    let refused: BTreeSet<&Origin> = report.errors.iter().map(|e| &e.origin).collect();
    for o in parsed
        .objects
        .iter()
        .filter(|o| !refused.contains(&o.origin))
    {
        match &o.value {
            Object::Pod(pod) => {
                if let (Some(ns), Some(name)) = (&pod.metadata.namespace, &pod.metadata.name) {
                    let key = PodKey {
                        namespace: ns.clone(),
                        name: name.clone(),
                    };
                    cluster.pods.insert(key, pod.clone());
                }
            }
            Object::Namespace(ns) => {
                if let Some(name) = &ns.metadata.name {
                    cluster.namespaces.insert(name.clone(), ns.clone());
                }
            }
            _ => {}
        }
    }
    // Keep each applied document (documents of a list are not kept: `patch` edits documents).
    for (i, de) in serde_norway::Deserializer::from_str(text).enumerate() {
        let doc = serde_norway::Value::deserialize(de).map_err(|e| format!("document {i}: {e}"))?;
        let applied = !refused.iter().any(|o| o.document == i + 1);
        if let Some(key) = document_key(&doc).filter(|_| applied) {
            cluster.documents.insert(key, doc);
        }
    }
    if report.errors.is_empty() {
        Ok(())
    } else {
        Err(report
            .errors
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("; "))
    }
}

/// The kind of an admin policy, by its `kind`.
fn admin_kind(kind: &str) -> Option<AdminKind> {
    match kind {
        "ClusterNetworkPolicy" => Some(AdminKind::ClusterNetworkPolicy),
        "AdminNetworkPolicy" => Some(AdminKind::AdminNetworkPolicy),
        "BaselineAdminNetworkPolicy" => Some(AdminKind::BaselineAdminNetworkPolicy),
        _ => None,
    }
}

fn remove(spec: &RemoveSpec, engine: &mut Engine, cluster: &mut Cluster) -> Result<(), String> {
    let ns = || {
        spec.namespace
            .clone()
            .ok_or_else(|| format!("remove: {} needs a namespace", spec.kind))
    };
    let doc_key = match &spec.namespace {
        Some(n) => format!("{}/{n}/{}", spec.kind, spec.name),
        None => format!("{}/{}", spec.kind, spec.name),
    };
    cluster.documents.remove(&doc_key);
    match spec.kind.as_str() {
        "NetworkPolicy" => engine.remove_policy(&PolicyKey {
            namespace: ns()?,
            name: spec.name.clone(),
        }),
        "Pod" => {
            let key = PodKey {
                namespace: ns()?,
                name: spec.name.clone(),
            };
            engine.remove_workload(&key);
            cluster.pods.remove(&key);
        }
        "Namespace" => {
            engine.remove_namespace(&spec.name);
            cluster.namespaces.remove(&spec.name);
        }
        other => match admin_kind(other) {
            Some(kind) if spec.namespace.is_none() => engine.remove_admin_policy(&AdminPolicyKey {
                kind,
                name: spec.name.clone(),
            }),
            Some(_) => return Err(format!("remove: {other} is cluster-scoped: no namespace")),
            None => return Err(format!("remove: unknown kind {other:?}")),
        },
    }
    Ok(())
}

/// One segment of a patch path: a mapping key, or an index into a sequence.
#[derive(Debug, Clone, PartialEq)]
enum Segment {
    Key(String),
    Index(usize),
}

/// `spec.egress[0].protocols` -> `spec`, `egress`, `0`, `protocols`.
fn parse_path(path: &str) -> Result<Vec<Segment>, String> {
    let mut out = Vec::new();
    for part in path.split('.') {
        let (key, mut rest) = part.split_once('[').map_or((part, ""), |(k, r)| (k, r));
        if key.is_empty() {
            return Err(format!("path {path:?}: empty key"));
        }
        out.push(Segment::Key(key.to_string()));
        while !rest.is_empty() {
            let (index, after) = rest
                .split_once(']')
                .ok_or_else(|| format!("path {path:?}: unclosed ["))?;
            let index = index
                .parse::<usize>()
                .map_err(|e| format!("path {path:?}: index {index:?}: {e}"))?;
            out.push(Segment::Index(index));
            rest = after
                .strip_prefix('[')
                .or_else(|| after.is_empty().then_some(""))
                .ok_or_else(|| format!("path {path:?}: expected [ or . after ]"))?;
        }
    }
    Ok(out)
}

/// The value at `path` (which must exist).
fn value_at<'v>(
    doc: &'v mut serde_norway::Value,
    path: &[Segment],
    whole: &str,
) -> Result<&'v mut serde_norway::Value, String> {
    let mut v = doc;
    for seg in path {
        v = match seg {
            Segment::Key(k) => v.get_mut(k.as_str()),
            Segment::Index(i) => v.get_mut(*i),
        }
        .ok_or_else(|| format!("path {whole:?}: no {seg:?} in the document"))?;
    }
    Ok(v)
}

/// Applies one patch operation to a document.
fn patch_document(doc: &mut serde_norway::Value, op: &PatchOp) -> Result<(), String> {
    match (&op.swap, &op.set, &op.insert) {
        (Some([a, b]), None, None) => {
            let (pa, pb) = (parse_path(a)?, parse_path(b)?);
            let va = value_at(doc, &pa, a)?.clone();
            let vb = std::mem::replace(value_at(doc, &pb, b)?, va);
            *value_at(doc, &pa, a)? = vb;
        }
        (None, Some(PathValue { path, value }), None) => {
            let segs = parse_path(path)?;
            let (last, parent) = segs.split_last().ok_or("set: empty path")?;
            let parent = value_at(doc, parent, path)?;
            match (last, parent) {
                (Segment::Key(k), serde_norway::Value::Mapping(m)) => {
                    m.insert(k.as_str().into(), value.clone());
                }
                (Segment::Index(i), serde_norway::Value::Sequence(s)) if *i < s.len() => {
                    s[*i] = value.clone();
                }
                _ => return Err(format!("set {path:?}: no such place in the document")),
            }
        }
        (None, None, Some(PathValue { path, value })) => {
            let segs = parse_path(path)?;
            let (Some(Segment::Index(i)), parent) = (segs.last(), &segs[..segs.len() - 1]) else {
                return Err(format!("insert {path:?}: the path must end with an index"));
            };
            match value_at(doc, parent, path)? {
                serde_norway::Value::Sequence(s) if *i <= s.len() => s.insert(*i, value.clone()),
                _ => return Err(format!("insert {path:?}: not a sequence of that length")),
            }
        }
        _ => return Err("patch op: give exactly one of swap, set and insert".to_string()),
    }
    Ok(())
}

/// Edits the document last applied under `spec.object` and applies it again.
fn patch(spec: &PatchSpec, engine: &mut Engine, cluster: &mut Cluster) -> Result<(), String> {
    let mut doc = cluster
        .documents
        .get(&spec.object)
        .cloned()
        .ok_or_else(|| {
            format!(
                "patch: no document {} was applied (known: {:?})",
                spec.object,
                cluster.documents.keys().collect::<Vec<_>>()
            )
        })?;
    for (i, op) in spec.ops.iter().enumerate() {
        patch_document(&mut doc, op).map_err(|e| format!("patch {} ops[{i}]: {e}", spec.object))?;
    }
    let text = serde_norway::to_string(&doc).map_err(|e| format!("patch: {e}"))?;
    apply_documents(&text, engine, cluster)
}

fn relabel(spec: &Relabel, engine: &mut Engine, cluster: &mut Cluster) -> Result<(), String> {
    let edit = |labels: &mut Option<Labels>| {
        let l = labels.get_or_insert_with(Labels::new);
        for k in &spec.delete {
            l.remove(k);
        }
        l.extend(spec.add.clone());
    };
    match (&spec.pod, &spec.namespace) {
        (Some(p), None) => {
            let key = parse_pod_key(p).map_err(|e| format!("relabel: {e}"))?;
            let pod = cluster
                .pods
                .get_mut(&key)
                .ok_or_else(|| format!("relabel: no pod {p}"))?;
            edit(&mut pod.metadata.labels);
            engine.apply_pod(pod).map_err(|e| e.to_string())?;
        }
        (None, Some(n)) => {
            let ns = cluster
                .namespaces
                .get_mut(n)
                .ok_or_else(|| format!("relabel: no namespace {n}"))?;
            edit(&mut ns.metadata.labels);
            engine.apply_namespace(ns).map_err(|e| e.to_string())?;
        }
        _ => return Err("relabel: give exactly one of `pod` and `namespace`".to_string()),
    }
    Ok(())
}

/// Checks one probe's table; returns a failure report, if any.
fn check_expectation(
    exp: &Expectation,
    engine: &Engine,
    cluster: &Cluster,
) -> Result<Option<String>, String> {
    let probe = parse_probe(&exp.probe)?;
    let pods: Vec<String> = cluster.pods.keys().map(|k| k.to_string()).collect();
    let mut sources = pods.clone();
    sources.extend(exp.from_ips.iter().map(|ip| ip.to_string()));
    let expected = match (&exp.table, &exp.reachability) {
        (Some(t), None) => {
            parse_table(t).map_err(|e| format!("expect {}: table: {e}", exp.probe))?
        }
        (None, Some(r)) => expand_reachability(r, &sources, &pods)
            .map_err(|e| format!("expect {}: {e}", exp.probe))?,
        _ => {
            return Err(format!(
                "expect {}: give exactly one of `table` and `reachability`",
                exp.probe
            ));
        }
    };
    // The engine's cells themselves, not a rendering of them: the corpus format is independent
    // of how `render_table` lays tables out.
    let plan = Matrix::new(engine, &[probe], &exp.from_ips);
    let mut observed = Table {
        columns: plan.destinations().map(|k| k.to_string()).collect(),
        rows: plan.sources().iter().map(source_label).collect(),
        cells: BTreeMap::new(),
    };
    let mut reasons: BTreeMap<(String, String), String> = BTreeMap::new();
    for cell in plan.cells() {
        let key = (source_label(cell.from), cell.to.to_string());
        let mark = if cell.verdict.allowed { '.' } else { 'X' };
        reasons.insert(key.clone(), cell.verdict.detailed().to_string());
        observed.cells.insert(key, mark);
    }
    // Cell by cell over both tables. A cell the engine does not compute counts as `-` (not
    // probed), so a row with nothing probed may be left out; a cell the expectation lacks is a
    // mismatch.
    let mut diffs = Vec::new();
    let keys: BTreeSet<&(String, String)> =
        expected.cells.keys().chain(observed.cells.keys()).collect();
    for key in keys {
        let e = expected.cells.get(key).copied().unwrap_or('?');
        let o = observed.cells.get(key).copied().unwrap_or('-');
        if o != e {
            diffs.push((key.clone(), e, o));
        }
    }
    if diffs.is_empty() {
        return Ok(None);
    }
    for row in &observed.rows {
        for column in &observed.columns {
            observed
                .cells
                .entry((row.clone(), column.clone()))
                .or_insert('-');
        }
    }
    let mut report = String::new();
    let _ = writeln!(report, "  probe {}", exp.probe);
    let _ = writeln!(report, "  expected:\n{}", indent(&render(&expected)));
    let _ = writeln!(
        report,
        "  observed (engine):\n{}",
        indent(&render(&observed))
    );
    for ((src, dst), e, o) in diffs {
        let why = reasons
            .get(&(src.clone(), dst.clone()))
            .map_or("no cell in the matrix", String::as_str);
        let _ = writeln!(
            report,
            "  {src} -> {dst}: expected {e}, observed {o}: {why}"
        );
    }
    Ok(Some(report))
}

fn indent(s: &str) -> String {
    s.lines()
        .map(|l| format!("    {l}"))
        .collect::<Vec<_>>()
        .join("\n")
}

fn check_decide(
    d: &DecideCheck,
    engine: &Engine,
    cluster: &Cluster,
) -> Result<Option<String>, String> {
    let local = parse_pod_key(&d.local).map_err(|e| format!("decide.local: {e}"))?;
    let direction = match d.direction.as_str() {
        "ingress" => Direction::Ingress,
        "egress" => Direction::Egress,
        other => return Err(format!("decide.direction: {other:?}: ingress or egress")),
    };
    let probe = parse_probe(&d.probe)?;
    let (peer, peer_ip, port_name) = if let Ok(ip) = d.peer.parse::<IpAddr>() {
        (Peer::IpOnly, Some(ip), None)
    } else {
        let key = parse_pod_key(&d.peer).map_err(|e| format!("decide.peer: {e}"))?;
        let pod = cluster
            .pods
            .get(&key)
            .ok_or_else(|| format!("decide.peer: no pod {}", d.peer))?;
        let peer = if pod_host_network(pod) {
            Peer::IpOnly
        } else {
            Peer::Workload(WorkloadIdentity {
                namespace: key.namespace.clone(),
                namespace_labels: cluster.namespace_labels(&key.namespace),
                labels: pod_labels(pod),
            })
        };
        (peer, pod_ip(pod), pod_port_name(pod, probe))
    };
    let dest_port_name = match direction {
        Direction::Egress => port_name.as_deref(),
        Direction::Ingress => None,
    };
    let decision = engine.decide(&Connection {
        local: &local,
        direction,
        peer: &peer,
        peer_ip,
        port: probe.port,
        protocol: probe.protocol,
        dest_port_name,
        resolved_names: &[],
    });
    let want_reason = d
        .reason
        .as_deref()
        .map(|r| parse_reason(r, direction))
        .transpose()?;
    let reason_ok = want_reason.as_ref().is_none_or(|r| *r == decision.reason);
    if decision.allowed == d.allowed && reason_ok {
        return Ok(None);
    }
    Ok(Some(format!(
        "  decide {} {} peer {} on {}: expected {}{}, observed {}",
        d.direction,
        d.local,
        d.peer,
        d.probe,
        if d.allowed { "allow" } else { "deny" },
        want_reason.map(|r| format!(" ({r})")).unwrap_or_default(),
        describe_decision(&decision)
    )))
}

/// Checks one connection; returns a failure report, if any.
fn check_connect(c: &ConnectCheck, engine: &Engine) -> Result<Option<String>, String> {
    let probe = parse_probe(&c.probe)?;
    let from = match c.from.parse::<IpAddr>() {
        Ok(ip) => Source::Ip(ip),
        Err(_) => Source::Pod(parse_pod_key(&c.from).map_err(|e| format!("connect.from: {e}"))?),
    };
    let to = parse_pod_key(&c.to).map_err(|e| format!("connect.to: {e}"))?;
    let verdict = policy::matrix::evaluate(engine, &from, &to, probe)
        .ok_or_else(|| format!("connect {} -> {}: no such pod", c.from, c.to))?;
    if std::env::var_os("CONFORMANCE_TRACE").is_some() {
        eprintln!(
            "connect {} -> {} on {}: {}",
            c.from,
            c.to,
            c.probe,
            verdict.detailed()
        );
    }
    if verdict.allowed == c.allowed {
        return Ok(None);
    }
    Ok(Some(format!(
        "  connect {} -> {} on {}: expected {}, observed {}: {}",
        c.from,
        c.to,
        c.probe,
        if c.allowed { "allow" } else { "deny" },
        if verdict.allowed { "allow" } else { "deny" },
        verdict.detailed()
    )))
}

/// Changes the cluster as a step says: `apply`, `patch`, `remove`, `relabel`, in that order.
fn change(step: &Step, engine: &mut Engine, cluster: &mut Cluster) -> Result<(), String> {
    if let Some(text) = &step.apply {
        apply_documents(text, engine, cluster)?;
    }
    if let Some(p) = &step.patch {
        patch(p, engine, cluster)?;
    }
    if let Some(r) = &step.remove {
        remove(r, engine, cluster)?;
    }
    if let Some(r) = &step.relabel {
        relabel(r, engine, cluster)?;
    }
    Ok(())
}

fn step_label(word: &str, i: usize, step: &Step) -> String {
    format!(
        "{word} {}{}",
        i + 1,
        step.note
            .as_ref()
            .map(|n| format!(" ({})", n.trim()))
            .unwrap_or_default()
    )
}

/// Runs one scenario; returns the failure reports of its steps.
fn run_scenario(sc: &Scenario) -> Result<Vec<String>, String> {
    let mut cluster = build_cluster(&sc.cluster)?;
    let mut engine = Engine::new();
    cluster.load_into(&mut engine)?;
    for m in &sc.manifests {
        let path = corpus_dir().join(m);
        let text = std::fs::read_to_string(&path)
            .map_err(|e| format!("manifests: {}: {e}", path.display()))?;
        apply_documents(&text, &mut engine, &mut cluster)
            .map_err(|e| format!("manifests: {m}: {e}"))?;
    }
    for (i, step) in sc.setup.iter().enumerate() {
        change(step, &mut engine, &mut cluster)
            .map_err(|e| format!("{}: {e}", step_label("setup", i, step)))?;
    }
    let mut failures = Vec::new();
    for (i, step) in sc.steps.iter().enumerate() {
        let label = step_label("step", i, step);
        let at = |e: String| format!("{label}: {e}");
        match (&step.apply_error, change(step, &mut engine, &mut cluster)) {
            (None, Err(e)) => {
                failures.push(format!("{label}: applying failed: {e}"));
                continue;
            }
            (Some(want), Ok(())) => {
                failures.push(format!(
                    "{label}: applying succeeded, expected an error containing {want:?}"
                ));
            }
            (Some(want), Err(e)) if !e.contains(want.as_str()) => {
                failures.push(format!("{label}: error {e:?} does not contain {want:?}"));
            }
            _ => {}
        }
        for exp in &step.expect {
            if let Some(r) = check_expectation(exp, &engine, &cluster).map_err(at)? {
                failures.push(format!("{label}:\n{r}"));
            }
        }
        for d in &step.decide {
            if let Some(r) = check_decide(d, &engine, &cluster).map_err(at)? {
                failures.push(format!("{label}:\n{r}"));
            }
        }
        for c in &step.connect {
            if let Some(r) = check_connect(c, &engine).map_err(at)? {
                failures.push(format!("{label}:\n{r}"));
            }
        }
    }
    Ok(failures)
}

fn validate_scenario(sc: &Scenario) -> Result<(), String> {
    if sc.name.trim().is_empty() {
        return Err("name: empty".to_string());
    }
    match (&sc.upstream, &sc.semantics) {
        (Some(_), None) | (None, Some(_)) => {}
        _ => return Err("give exactly one of `upstream` and `semantics`".to_string()),
    }
    if sc.steps.is_empty() {
        return Err("steps: empty".to_string());
    }
    for (i, s) in sc.steps.iter().enumerate() {
        if !s.checks_something() {
            return Err(format!(
                "steps[{i}]: checks nothing (no expect, decide, connect or apply_error)"
            ));
        }
    }
    for (i, s) in sc.setup.iter().enumerate() {
        if s.checks_something() {
            return Err(format!(
                "setup[{i}]: setup steps check nothing; move the checks to `steps`"
            ));
        }
    }
    for f in &sc.requires {
        if !FEATURES.iter().any(|(known, _)| known == f) {
            return Err(format!(
                "requires: unknown feature {f:?} (known: {:?})",
                FEATURES.iter().map(|(f, _)| f).collect::<Vec<_>>()
            ));
        }
    }
    Ok(())
}

/// Checks what can be checked without an engine: the cluster builds, probes parse, tables parse
/// with the cluster's pods as columns, and shorthand rules match cells of the initial cluster.
fn lint_scenario(sc: &Scenario) -> Result<(), String> {
    let cluster = build_cluster(&sc.cluster)?;
    let pods: Vec<String> = cluster.pods.keys().map(|k| k.to_string()).collect();
    let mut pods_changed = false;
    for (i, step) in sc.steps.iter().enumerate() {
        let at = |e: String| format!("steps[{i}]: {e}");
        pods_changed |= step
            .apply
            .as_deref()
            .is_some_and(|a| a.contains("kind: Pod"))
            || step.remove.as_ref().is_some_and(|r| r.kind == "Pod");
        for exp in &step.expect {
            parse_probe(&exp.probe).map_err(at)?;
            let mut sources = pods.clone();
            sources.extend(exp.from_ips.iter().map(|ip| ip.to_string()));
            match (&exp.table, &exp.reachability) {
                (Some(t), None) => {
                    let t = parse_table(t).map_err(|e| at(format!("table: {e}")))?;
                    let cols: BTreeSet<_> = t.columns.iter().collect();
                    let rows: BTreeSet<_> = t.rows.iter().collect();
                    if !pods_changed
                        && (cols != pods.iter().collect() || rows != sources.iter().collect())
                    {
                        return Err(at(format!(
                            "table: columns {:?} / rows {:?} are not the cluster's pods {pods:?} / sources {sources:?}",
                            t.columns, t.rows
                        )));
                    }
                }
                (None, Some(r)) => {
                    expand_reachability(r, &sources, &pods).map_err(at)?;
                }
                _ => return Err(at("give exactly one of `table` and `reachability`".into())),
            }
        }
        for d in &step.decide {
            parse_probe(&d.probe).map_err(at)?;
            parse_pod_key(&d.local).map_err(at)?;
            if let Some(r) = &d.reason {
                parse_reason(r, Direction::Ingress).map_err(at)?;
            }
        }
        for c in &step.connect {
            parse_probe(&c.probe).map_err(at)?;
            let known = |p: &str| pods_changed || pods.iter().any(|k| k == p);
            if c.from.parse::<IpAddr>().is_err() && !known(&c.from) {
                return Err(at(format!("connect.from: no pod {}", c.from)));
            }
            if !known(&c.to) {
                return Err(at(format!("connect.to: no pod {}", c.to)));
            }
        }
        if let Some(p) = &step.patch {
            for op in &p.ops {
                for path in op
                    .swap
                    .iter()
                    .flatten()
                    .chain(op.set.iter().chain(&op.insert).map(|pv| &pv.path))
                {
                    parse_path(path).map_err(at)?;
                }
            }
        }
    }
    for m in &sc.manifests {
        let path = corpus_dir().join(m);
        if !path.is_file() {
            return Err(format!("manifests: no file {}", path.display()));
        }
    }
    Ok(())
}

/// Every scenario of the corpus, with the file it came from.
fn load_corpus() -> (Vec<(PathBuf, Scenario)>, Vec<String>) {
    let mut files = Vec::new();
    let mut dirs = vec![corpus_dir()];
    while let Some(d) = dirs.pop() {
        let entries =
            std::fs::read_dir(&d).unwrap_or_else(|e| panic!("reading {}: {e}", d.display()));
        for entry in entries {
            let path = entry.unwrap().path();
            if path.is_dir() {
                // Named clusters and the documents scenarios apply are not scenarios.
                if !matches!(
                    path.file_name().and_then(|n| n.to_str()),
                    Some("clusters" | "manifests")
                ) {
                    dirs.push(path);
                }
            } else if matches!(
                path.extension().and_then(|e| e.to_str()),
                Some("yaml" | "yml")
            ) {
                files.push(path);
            }
        }
    }
    files.sort();
    let mut scenarios = Vec::new();
    let mut errors = Vec::new();
    for path in files {
        let text = std::fs::read_to_string(&path).unwrap();
        for (i, de) in serde_norway::Deserializer::from_str(&text).enumerate() {
            match Scenario::deserialize(de) {
                Ok(sc) => match validate_scenario(&sc).and_then(|()| lint_scenario(&sc)) {
                    Ok(()) => scenarios.push((path.clone(), sc)),
                    Err(e) => errors.push(format!("{} (document {i}): {e}", path.display())),
                },
                Err(e) => errors.push(format!("{} (document {i}): {e}", path.display())),
            }
        }
    }
    (scenarios, errors)
}

fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "non-string panic".to_string())
}

/// A corpus path as the reports show it: relative to `tests/conformance`.
fn shown(path: &Path) -> String {
    path.strip_prefix(corpus_dir())
        .unwrap_or(path)
        .display()
        .to_string()
}

/// Whether a scenario belongs to the admin-policy corpus (`tests/conformance/admin`).
fn is_admin(path: &Path) -> bool {
    path.starts_with(corpus_dir().join("admin"))
}

/// What running a set of scenarios gave.
#[derive(Default)]
struct Outcome {
    /// Scenarios run (not filtered out by `CONFORMANCE_ONLY`), pending ones included.
    run: usize,
    passed: usize,
    failures: Vec<String>,
    /// Scenarios that need a feature the engine lacks, with what they got today.
    pending: Vec<String>,
}

/// Runs every scenario (those `CONFORMANCE_ONLY` names, when set). A scenario that requires a
/// feature the engine does not have runs all the same, but only to report what it gets today:
/// it is pending, neither passed nor failed.
fn run_corpus(scenarios: &[(PathBuf, Scenario)]) -> Outcome {
    let only = std::env::var("CONFORMANCE_ONLY").ok();
    let mut out = Outcome::default();
    for (path, sc) in scenarios {
        if only.as_deref().is_some_and(|o| !sc.name.contains(o)) {
            continue;
        }
        out.run += 1;
        let origin = sc
            .upstream
            .as_deref()
            .map(|u| format!("upstream: {u}"))
            .or_else(|| sc.semantics.as_deref().map(|s| format!("semantics: {s}")))
            .unwrap_or_default();
        let mut head = format!("scenario {} ({}; {origin})", sc.name, shown(path));
        if let Some(d) = &sc.description {
            head.push_str(&format!("\n  {}", d.trim()));
        }
        let missing: Vec<&str> = sc
            .requires
            .iter()
            .filter_map(|f| feature_missing(f))
            .collect();
        let result = match catch_unwind(AssertUnwindSafe(|| run_scenario(sc))) {
            Ok(Ok(f)) if f.is_empty() => Ok(()),
            Ok(Ok(f)) => Err((f.len(), f.join("\n"))),
            Ok(Err(e)) => Err((1, format!("  scenario error: {e}"))),
            Err(p) => Err((
                1,
                format!("  engine panicked: {}", panic_message(p.as_ref())),
            )),
        };
        match (missing.is_empty(), result) {
            (true, Ok(())) => out.passed += 1,
            (true, Err((_, report))) => out.failures.push(format!("{head}\n{report}")),
            (false, today) => out.pending.push(format!(
                "pending: {}: {} ({}); today it {}",
                missing.join(", "),
                sc.name,
                shown(path),
                match today {
                    Ok(()) => "passes".to_string(),
                    Err((n, report)) => format!("fails {n} check(s):\n{report}"),
                }
            )),
        }
    }
    out
}

/// Scenario names used more than once, anywhere in the corpus.
fn duplicate_names(scenarios: &[(PathBuf, Scenario)]) -> Vec<String> {
    let mut names = BTreeSet::new();
    scenarios
        .iter()
        .filter(|(_, sc)| !names.insert(sc.name.clone()))
        .map(|(path, sc)| format!("{}: scenario name {:?} used twice", path.display(), sc.name))
        .collect()
}

#[test]
fn conformance_corpus() {
    let (all, mut failures) = load_corpus();
    failures.extend(duplicate_names(&all));
    let scenarios: Vec<_> = all.into_iter().filter(|(p, _)| !is_admin(p)).collect();
    let out = run_corpus(&scenarios);
    failures.extend(out.failures);
    for p in &out.pending {
        eprintln!("{p}");
    }
    let passed = out.passed;
    let steps: usize = scenarios.iter().map(|(_, s)| s.steps.len()).sum();
    let decisions: usize = scenarios
        .iter()
        .flat_map(|(_, s)| &s.steps)
        .map(|st| st.decide.len())
        .sum();
    let mut tables = 0;
    let mut cells = 0;
    for (_, sc) in &scenarios {
        let pods = build_cluster(&sc.cluster)
            .map(|c| c.pods.len())
            .unwrap_or(0);
        for exp in sc.steps.iter().flat_map(|st| &st.expect) {
            tables += 1;
            cells += pods * (pods.saturating_sub(1) + exp.from_ips.len());
        }
    }
    eprintln!(
        "conformance: {passed} of {} scenarios passed ({steps} steps, {tables} truth tables of ~{cells} cells, {decisions} single decisions)",
        scenarios.len()
    );
    assert!(
        failures.is_empty(),
        "{} conformance failure(s):\n\n{}",
        failures.len(),
        failures.join("\n\n")
    );
}

/// The admin corpus must keep at least this many upstream scenarios passing (pending ones do
/// not count): a scenario marked pending, or broken, without reason shows here.
const MIN_ADMIN_PASSED: usize = 184;

#[test]
fn admin_conformance_corpus() {
    let (all, errors) = load_corpus();
    assert!(
        errors.is_empty(),
        "corpus does not load:\n{}",
        errors.join("\n")
    );
    let (upstream, ours): (Vec<_>, Vec<_>) = all
        .into_iter()
        .filter(|(p, _)| is_admin(p))
        .partition(|(_, sc)| sc.upstream.is_some());
    let up = run_corpus(&upstream);
    let sem = run_corpus(&ours);
    eprintln!(
        "admin conformance: {}/{} upstream scenarios passed ({} pending)",
        up.passed,
        up.run,
        up.pending.len()
    );
    eprintln!(
        "admin semantics: {}/{} scenarios passed ({} pending)",
        sem.passed,
        sem.run,
        sem.pending.len()
    );
    for p in up.pending.iter().chain(&sem.pending) {
        eprintln!("  {}", p.replace('\n', "\n    "));
    }
    let failures: Vec<_> = up.failures.iter().chain(&sem.failures).collect();
    assert!(
        failures.is_empty(),
        "{} admin conformance failure(s):\n\n{}",
        failures.len(),
        failures
            .iter()
            .map(|f| f.as_str())
            .collect::<Vec<_>>()
            .join("\n\n")
    );
    if std::env::var("CONFORMANCE_ONLY").is_err() {
        assert!(
            up.passed >= MIN_ADMIN_PASSED,
            "only {} admin upstream scenarios passed (need at least {MIN_ADMIN_PASSED}; {} pending)",
            up.passed,
            up.pending.len()
        );
    }
}

#[test]
fn corpus_covers_the_upstream_suite() {
    let (scenarios, errors) = load_corpus();
    assert!(
        errors.is_empty(),
        "corpus does not load:\n{}",
        errors.join("\n")
    );
    let upstream: BTreeSet<&str> = scenarios
        .iter()
        .filter(|(p, _)| !is_admin(p))
        .filter_map(|(_, s)| s.upstream.as_deref())
        .collect();
    assert!(
        upstream.len() >= 40,
        "only {} distinct upstream scenarios (need at least 40)",
        upstream.len()
    );
    // network-policy-api's conformance suite: 92 subtests at v0.1.8 (AdminNetworkPolicy and
    // BaselineAdminNetworkPolicy) and 92 at 0eec1b0 (ClusterNetworkPolicy), one scenario each.
    let admin: BTreeSet<&str> = scenarios
        .iter()
        .filter(|(p, _)| is_admin(p))
        .filter_map(|(_, s)| s.upstream.as_deref())
        .collect();
    assert!(
        admin.len() >= 184,
        "only {} distinct admin upstream scenarios (need at least 184)",
        admin.len()
    );
    let semantics = scenarios
        .iter()
        .filter(|(_, s)| s.semantics.is_some())
        .count();
    assert!(semantics >= 15, "only {semantics} semantics scenarios");
}

#[test]
fn table_parser_accepts_render_layouts() {
    let plain = "x/a x/b\nx/a - X\nx/b . -\n";
    let cornered = "80/TCP\n- x/a x/b\nx/a - X\nx/b . -\n";
    let a = parse_table(plain).unwrap();
    let b = parse_table(cornered).unwrap();
    assert_eq!(a, b);
    assert_eq!(a.cells[&("x/a".to_string(), "x/b".to_string())], 'X');
    assert!(parse_table("x/a x/b\nx/a - X .\n").is_err());
}

#[test]
fn reachability_shorthand_follows_upstream_expect_peer() {
    let pods: Vec<String> = ["x/a", "x/b", "y/a"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let mut sources = pods.clone();
    sources.push("192.0.2.1".to_string());
    let rules = vec!["deny * -> x/*".to_string(), "allow x/b -> x/a".to_string()];
    let t = expand_reachability(&rules, &sources, &pods).unwrap();
    let get = |s: &str, d: &str| t.cells[&(s.to_string(), d.to_string())];
    assert_eq!(get("x/b", "x/a"), '.');
    assert_eq!(get("y/a", "x/a"), 'X');
    assert_eq!(get("192.0.2.1", "x/b"), 'X');
    assert_eq!(get("x/a", "x/a"), '-');
    assert_eq!(get("x/a", "y/a"), '.');
    assert!(expand_reachability(&["deny q/* -> x/a".to_string()], &sources, &pods).is_err());
}

#[test]
fn runner_reports_each_wrong_cell_with_its_reason() {
    let text = r#"
name: deliberately-wrong
semantics: "the runner's own check"
cluster:
  namespaces: {x: {ns: x}}
  pods:
    - {pod: x/a, labels: {pod: a}, ip: 10.1.0.1, ports: ["http:80/TCP"]}
    - {pod: x/b, labels: {pod: b}, ip: 10.1.0.2, ports: ["http:80/TCP"]}
steps:
  - apply: |
      apiVersion: networking.k8s.io/v1
      kind: NetworkPolicy
      metadata: {name: deny, namespace: x}
      spec:
        podSelector: {matchLabels: {pod: a}}
        policyTypes: [Ingress]
    expect:
      - probe: 80/TCP
        reachability: []
    decide:
      - {local: x/a, direction: ingress, peer: x/b, probe: 80/TCP, allowed: true}
  - note: a second step still runs
    remove: {kind: NetworkPolicy, namespace: x, name: deny}
    expect:
      - probe: 80/TCP
        reachability: [deny x/a -> x/b]
"#;
    let sc: Scenario = serde_norway::from_str(text).unwrap();
    validate_scenario(&sc).unwrap();
    lint_scenario(&sc).unwrap();
    let failures = run_scenario(&sc).unwrap();
    assert_eq!(failures.len(), 3, "{failures:#?}");
    assert!(failures[0].contains("x/b -> x/a: expected ., observed X"));
    assert!(failures[0].contains("isolated for ingress by x/deny"));
    assert!(failures[1].contains("decide ingress x/a peer x/b on 80/TCP: expected allow"));
    assert!(failures[2].starts_with("step 2 (a second step still runs)"));
    assert!(failures[2].contains("x/a -> x/b: expected X, observed ."));
}

#[test]
fn corpus_errors_name_the_field() {
    let bad_rule = r#"
name: bad
semantics: "s"
cluster: standard
steps:
  - expect:
      - probe: 80/TCP
        reachability: [block * -> x/a]
"#;
    let sc: Scenario = serde_norway::from_str(bad_rule).unwrap();
    let err = lint_scenario(&sc).unwrap_err();
    assert!(
        err.contains("steps[0]") && err.contains("block * -> x/a"),
        "{err}"
    );
    let unknown_field = "name: bad\nsemantics: s\ncluster: standard\nsteps: []\nexpectt: 1\n";
    let err = serde_norway::from_str::<Scenario>(unknown_field).unwrap_err();
    assert!(err.to_string().contains("expectt"), "{err}");
    let bad_probe = parse_probe("80/ICMP").unwrap_err();
    assert!(bad_probe.contains("ICMP"), "{bad_probe}");
}

#[test]
fn patch_ops_edit_documents() {
    let mut doc: serde_norway::Value = serde_norway::from_str(
        "spec:\n  priority: 60\n  egress:\n    - {name: a}\n    - {name: b}\n    - {name: c}\n",
    )
    .unwrap();
    let op = |yaml: &str| -> PatchOp { serde_norway::from_str(yaml).unwrap() };
    patch_document(
        &mut doc,
        &op("swap: [\"spec.egress[0]\", \"spec.egress[2]\"]"),
    )
    .unwrap();
    patch_document(&mut doc, &op("set: {path: spec.priority, value: 40}")).unwrap();
    patch_document(
        &mut doc,
        &op("set: {path: \"spec.egress[1].action\", value: Pass}"),
    )
    .unwrap();
    patch_document(
        &mut doc,
        &op("insert: {path: \"spec.egress[0]\", value: {name: new}}"),
    )
    .unwrap();
    let want: serde_norway::Value = serde_norway::from_str(
        "spec:\n  priority: 40\n  egress:\n    - {name: new}\n    - {name: c}\n    - {name: b, action: Pass}\n    - {name: a}\n",
    )
    .unwrap();
    assert_eq!(doc, want);
    let err = patch_document(
        &mut doc,
        &op("swap: [\"spec.egress[0]\", \"spec.egress[9]\"]"),
    )
    .unwrap_err();
    assert!(err.contains("spec.egress[9]"), "{err}");
    let err = patch_document(&mut doc, &op("insert: {path: spec.priority, value: 1}")).unwrap_err();
    assert!(err.contains("must end with an index"), "{err}");
    assert!(parse_path("spec.egress[x]").is_err());
    assert_eq!(
        parse_path("a[1][2].b").unwrap(),
        vec![
            Segment::Key("a".into()),
            Segment::Index(1),
            Segment::Index(2),
            Segment::Key("b".into())
        ]
    );
}

/// A small Admin-tier scenario: a ClusterNetworkPolicy applied, patched (its rules swapped) and
/// removed, checked with `connect`, one check deliberately wrong.
const ADMIN_SCENARIO: &str = r#"
name: admin-runner
semantics: "the runner's own check"
cluster:
  namespaces: {x: {ns: x}, y: {ns: y}}
  pods:
    - {pod: x/a, labels: {pod: a}, ip: 10.1.0.1, ports: ["http:80/TCP"]}
    - {pod: y/b, labels: {pod: b}, ip: 10.1.0.2, ports: ["http:80/TCP"]}
setup:
  - note: the policy, Accept before Deny
    apply: |
      apiVersion: policy.networking.k8s.io/v1alpha2
      kind: ClusterNetworkPolicy
      metadata: {name: guard}
      spec:
        tier: Admin
        priority: 1
        subject: {namespaces: {matchLabels: {ns: x}}}
        egress:
          - {name: accept, action: Accept, to: [{namespaces: {matchLabels: {ns: y}}}]}
          - {name: deny, action: Deny, to: [{namespaces: {matchLabels: {ns: y}}}]}
steps:
  - connect:
      - {from: x/a, to: y/b, probe: 80/TCP, allowed: true}
  - note: Deny first
    patch:
      object: ClusterNetworkPolicy/guard
      ops:
        - swap: ["spec.egress[0]", "spec.egress[1]"]
    connect:
      - {from: x/a, to: y/b, probe: 80/TCP, allowed: true}
      - {from: y/b, to: x/a, probe: 80/TCP, allowed: true}
  - remove: {kind: ClusterNetworkPolicy, name: guard}
    connect:
      - {from: x/a, to: y/b, probe: 80/TCP, allowed: true}
"#;

#[test]
fn admin_runner_patches_and_connects() {
    let sc: Scenario = serde_norway::from_str(ADMIN_SCENARIO).unwrap();
    validate_scenario(&sc).unwrap();
    lint_scenario(&sc).unwrap();
    let failures = run_scenario(&sc).unwrap();
    assert_eq!(failures.len(), 1, "{failures:#?}");
    assert!(
        failures[0].starts_with("step 2 (Deny first)"),
        "{failures:#?}"
    );
    assert!(
        failures[0].contains("connect x/a -> y/b on 80/TCP: expected allow, observed deny")
            && failures[0].contains("ClusterNetworkPolicy/guard (priority 1) egress rule 0 (Deny)"),
        "{failures:#?}"
    );
}

#[test]
fn scenarios_needing_a_missing_feature_are_pending() {
    let mut sc: Scenario = serde_norway::from_str(ADMIN_SCENARIO).unwrap();
    sc.requires = vec!["nodes".to_string()];
    validate_scenario(&sc).unwrap();
    let out = run_corpus(&[(corpus_dir().join("admin").join("x.yaml"), sc)]);
    if ENGINE_FEATURES.contains(&"nodes") {
        assert_eq!(out.failures.len(), 1);
    } else {
        assert_eq!((out.run, out.passed, out.failures.len()), (1, 0, 0));
        assert_eq!(out.pending.len(), 1);
        assert!(
            out.pending[0].starts_with("pending: needs node inventory: admin-runner")
                && out.pending[0].contains("today it fails 1 check(s)"),
            "{:?}",
            out.pending
        );
    }
    let mut sc: Scenario = serde_norway::from_str(ADMIN_SCENARIO).unwrap();
    sc.requires = vec!["dns".to_string()];
    let err = validate_scenario(&sc).unwrap_err();
    assert!(err.contains("unknown feature \"dns\""), "{err}");
    let checking_setup = ADMIN_SCENARIO.replace(
        "  - note: the policy, Accept before Deny\n",
        "  - note: the policy, Accept before Deny\n    connect: [{from: x/a, to: y/b, probe: 80/TCP, allowed: true}]\n",
    );
    let sc: Scenario = serde_norway::from_str(&checking_setup).unwrap();
    let err = validate_scenario(&sc).unwrap_err();
    assert!(err.contains("setup[0]"), "{err}");
}

#[test]
fn cluster_nodes_become_node_documents() {
    let cluster = named_cluster("harry-potter").unwrap();
    assert_eq!(cluster.pods.len(), 10);
    let text = cluster.nodes_yaml();
    let parsed = objects::parse("nodes", &text);
    assert!(parsed.errors.is_empty(), "{:?}", parsed.errors);
    // Today `objects::parse` skips them; with the `nodes` feature it reads them.
    assert_eq!(parsed.objects.len() + parsed.skipped.len(), 3, "{text}");
    let docs: Vec<serde_norway::Value> = serde_norway::Deserializer::from_str(&text)
        .map(|d| serde_norway::Value::deserialize(d).unwrap())
        .collect();
    assert_eq!(docs[1]["metadata"]["name"].as_str(), Some("kind-worker"));
    assert_eq!(
        docs[1]["metadata"]["labels"]["kubernetes.io/os"].as_str(),
        Some("linux")
    );
    assert_eq!(
        docs[1]["status"]["addresses"][0]["address"].as_str(),
        Some("172.18.0.3")
    );
    // The host network centaur on kind-worker has its node's address.
    let centaur = &cluster.pods
        [&parse_pod_key("network-policy-conformance-forbidden-forrest/centaur-0").unwrap()];
    assert_eq!(pod_ip(centaur), Some("172.18.0.3".parse().unwrap()));
    assert!(pod_host_network(centaur));
}
