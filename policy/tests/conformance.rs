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
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use policy::matrix::{Matrix, Probe, Source};
use policy::{
    Connection, Decision, Direction, Engine, Labels, Peer, PodKey, PolicyKey, Protocol, Reason,
    RuleRef, WorkloadIdentity,
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
    cluster: ClusterSpec,
    steps: Vec<Step>,
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
    #[serde(default)]
    relabel: Option<Relabel>,
    #[serde(default)]
    expect: Vec<Expectation>,
    #[serde(default)]
    decide: Vec<DecideCheck>,
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
            c.pods
                .insert(key.clone(), make_pod(&key, &labels, Some(ip), ports, false));
        }
    }
    c
}

fn build_cluster(spec: &ClusterSpec) -> Result<Cluster, String> {
    let named = |n: &str| match n {
        "standard" => Ok(standard_cluster()),
        other => Err(format!(
            "cluster: unknown named cluster {other:?} (only `standard`)"
        )),
    };
    match spec {
        ClusterSpec::Named(n) => named(n),
        ClusterSpec::Inline(inline) => {
            let mut c = match &inline.base {
                Some(b) => named(b)?,
                None => Cluster::default(),
            };
            for (name, labels) in &inline.namespaces {
                c.namespaces
                    .insert(name.clone(), make_namespace(name, labels));
            }
            for p in &inline.pods {
                let key = parse_pod_key(&p.pod).map_err(|e| format!("cluster.pods: {e}"))?;
                if !c.namespaces.contains_key(&key.namespace) {
                    return Err(format!(
                        "cluster.pods: {}: namespace {:?} is not declared",
                        p.pod, key.namespace
                    ));
                }
                let ports = p
                    .ports
                    .iter()
                    .map(|s| parse_port_decl(s))
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| format!("cluster.pods: {}: {e}", p.pod))?;
                c.pods.insert(
                    key.clone(),
                    make_pod(&key, &p.labels, p.ip, ports, p.host_network),
                );
            }
            Ok(c)
        }
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
        Ok(())
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

/// Applies every document of `text` to the engine (and to the runner's cluster model).
fn apply_documents(text: &str, engine: &mut Engine, cluster: &mut Cluster) -> Result<(), String> {
    for (i, de) in serde_norway::Deserializer::from_str(text).enumerate() {
        let doc = serde_norway::Value::deserialize(de).map_err(|e| format!("document {i}: {e}"))?;
        if doc.is_null() {
            continue;
        }
        match kind_of(&doc) {
            Some("NetworkPolicy") => {
                let np: NetworkPolicy = serde_norway::from_value(doc)
                    .map_err(|e| format!("document {i} (NetworkPolicy): {e}"))?;
                engine.apply_policy(&np).map_err(|e| e.to_string())?;
            }
            Some("Pod") => {
                let pod: Pod = serde_norway::from_value(doc)
                    .map_err(|e| format!("document {i} (Pod): {e}"))?;
                let key = engine.apply_pod(&pod).map_err(|e| e.to_string())?;
                cluster.pods.insert(key, pod);
            }
            Some("Namespace") => {
                let ns: Namespace = serde_norway::from_value(doc)
                    .map_err(|e| format!("document {i} (Namespace): {e}"))?;
                engine.apply_namespace(&ns).map_err(|e| e.to_string())?;
                let name = ns.metadata.name.clone().unwrap_or_default();
                cluster.namespaces.insert(name, ns);
            }
            other => {
                return Err(format!(
                    "document {i}: kind {other:?}: expected NetworkPolicy, Pod or Namespace"
                ));
            }
        }
    }
    Ok(())
}

fn remove(spec: &RemoveSpec, engine: &mut Engine, cluster: &mut Cluster) -> Result<(), String> {
    let ns = || {
        spec.namespace
            .clone()
            .ok_or_else(|| format!("remove: {} needs a namespace", spec.kind))
    };
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
        other => return Err(format!("remove: unknown kind {other:?}")),
    }
    Ok(())
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

/// Runs one scenario; returns the failure reports of its steps.
fn run_scenario(sc: &Scenario) -> Result<Vec<String>, String> {
    let mut cluster = build_cluster(&sc.cluster)?;
    let mut engine = Engine::new();
    cluster.load_into(&mut engine)?;
    let mut failures = Vec::new();
    for (i, step) in sc.steps.iter().enumerate() {
        let label = format!(
            "step {}{}",
            i + 1,
            step.note
                .as_ref()
                .map(|n| format!(" ({n})"))
                .unwrap_or_default()
        );
        let at = |e: String| format!("{label}: {e}");
        let mut applied = match &step.apply {
            Some(text) => apply_documents(text, &mut engine, &mut cluster),
            None => Ok(()),
        };
        if let Some(r) = &step.remove {
            applied = applied.and_then(|()| remove(r, &mut engine, &mut cluster));
        }
        if let Some(r) = &step.relabel {
            applied = applied.and_then(|()| relabel(r, &mut engine, &mut cluster));
        }
        match (&step.apply_error, applied) {
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
        if s.expect.is_empty() && s.decide.is_empty() && s.apply_error.is_none() {
            return Err(format!(
                "steps[{i}]: checks nothing (no expect, decide or apply_error)"
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
                dirs.push(path);
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

#[test]
fn conformance_corpus() {
    let (scenarios, mut failures) = load_corpus();
    let mut names = BTreeSet::new();
    let only = std::env::var("CONFORMANCE_ONLY").ok();
    let mut passed = 0;
    for (path, sc) in &scenarios {
        if !names.insert(sc.name.clone()) {
            failures.push(format!(
                "{}: scenario name {:?} used twice",
                path.display(),
                sc.name
            ));
        }
        if only.as_deref().is_some_and(|o| !sc.name.contains(o)) {
            continue;
        }
        let origin = sc
            .upstream
            .as_deref()
            .map(|u| format!("upstream: {u}"))
            .or_else(|| sc.semantics.as_deref().map(|s| format!("semantics: {s}")))
            .unwrap_or_default();
        let mut head = format!("scenario {} ({}; {origin})", sc.name, path.display());
        if let Some(d) = &sc.description {
            head.push_str(&format!("\n  {}", d.trim()));
        }
        match catch_unwind(AssertUnwindSafe(|| run_scenario(sc))) {
            Ok(Ok(f)) if f.is_empty() => passed += 1,
            Ok(Ok(f)) => failures.push(format!("{head}\n{}", f.join("\n"))),
            Ok(Err(e)) => failures.push(format!("{head}\n  scenario error: {e}")),
            Err(p) => failures.push(format!(
                "{head}\n  engine panicked: {}",
                panic_message(p.as_ref())
            )),
        }
    }
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
        .filter_map(|(_, s)| s.upstream.as_deref())
        .collect();
    assert!(
        upstream.len() >= 40,
        "only {} distinct upstream scenarios (need at least 40)",
        upstream.len()
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
