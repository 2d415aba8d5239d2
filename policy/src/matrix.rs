//! Cluster-wide what-if: every source against every destination, both directions combined.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::fmt::Write as _;
use std::net::IpAddr;
use std::str::FromStr;

use crate::model::{
    Connection, Decision, Direction, Peer, PodKey, Protocol, Workload, write_decision,
};
use crate::validate::parse_protocol;
use crate::{Engine, ProbeParseError};

/// A port/protocol to probe, as in `--probe 80/TCP`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Probe {
    pub port: u16,
    pub protocol: Protocol,
}

impl fmt::Display for Probe {
    /// `80/TCP`
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.port, self.protocol)
    }
}

impl FromStr for Probe {
    type Err = ProbeParseError;

    /// `80/TCP`, `53/udp`, or `80` (TCP).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |message: &str| ProbeParseError {
            input: s.to_string(),
            message: message.to_string(),
        };
        let (port, protocol) = match s.split_once('/') {
            Some((p, proto)) => (
                p,
                parse_protocol(&proto.to_ascii_uppercase())
                    .ok_or_else(|| err("protocol must be TCP, UDP or SCTP"))?,
            ),
            None => (s, Protocol::Tcp),
        };
        let port: u16 = port
            .trim()
            .parse()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| err("port must be a number between 1 and 65535"))?;
        Ok(Probe { port, protocol })
    }
}

/// A connection's source in the matrix.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Source {
    Pod(PodKey),
    /// An IP-only external source (`--from-ip`).
    Ip(IpAddr),
}

impl fmt::Display for Source {
    /// `ns/pod` or the IP.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Pod(k) => write!(f, "{k}"),
            Source::Ip(ip) => write!(f, "{ip}"),
        }
    }
}

/// The verdict for one source, destination and probe.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verdict {
    pub allowed: bool,
    /// Egress of the source (`None` for an IP-only source: nothing enforces it).
    pub egress: Option<Decision>,
    pub ingress: Decision,
}

impl fmt::Display for Verdict {
    /// Denied: the denying side(s), e.g. `denied: isolated for ingress by demo/default-deny,
    /// demo/db (no rule matches)`. Allowed: both sides, e.g. `allowed: egress not isolated (no
    /// policy selects it); ingress allowed by demo/backend-policy ingress rule 0`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.allowed {
            f.write_str("allowed: ")?;
            if let Some(e) = &self.egress {
                f.write_str("egress ")?;
                crate::model::write_reason(f, &e.reason, None)?;
                f.write_str("; ")?;
            }
            f.write_str("ingress ")?;
            crate::model::write_reason(f, &self.ingress.reason, None)
        } else {
            f.write_str("denied: ")?;
            let mut first = true;
            if let Some(e) = self.egress.as_ref().filter(|e| !e.allowed) {
                write_reason_only(f, e, Direction::Egress)?;
                first = false;
            }
            if !self.ingress.allowed {
                if !first {
                    f.write_str("; ")?;
                }
                write_reason_only(f, &self.ingress, Direction::Ingress)?;
            }
            Ok(())
        }
    }
}

fn write_reason_only(
    f: &mut fmt::Formatter<'_>,
    d: &Decision,
    direction: Direction,
) -> fmt::Result {
    crate::model::write_reason(f, &d.reason, Some(direction))
}

impl Verdict {
    /// Like `Display`, with each side's decision spelled out: `egress: ...; ingress: ...`.
    pub fn detailed(&self) -> String {
        struct D<'a>(&'a Decision, Direction);
        impl fmt::Display for D<'_> {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write_decision(f, self.0, Some(self.1))
            }
        }
        let egress = match &self.egress {
            Some(e) => D(e, Direction::Egress).to_string(),
            None => "not enforced (IP-only source)".to_string(),
        };
        format!(
            "{}: egress: {egress}; ingress: {}",
            if self.allowed { "allowed" } else { "denied" },
            D(&self.ingress, Direction::Ingress)
        )
    }
}

/// One cell of the matrix.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cell {
    pub from: Source,
    pub to: PodKey,
    pub probe: Probe,
    pub verdict: Verdict,
}

fn same_family(a: &IpAddr, b: &IpAddr) -> bool {
    a.is_ipv4() == b.is_ipv4()
}

/// Picks the address pair a connection between two endpoints would use: the first address of
/// `dst` whose family `src` also has, and the first address of `src` of that family.
fn pick_pair(src: &[IpAddr], dst: &[IpAddr]) -> (Option<IpAddr>, Option<IpAddr>) {
    for d in dst {
        if let Some(s) = src.iter().find(|s| same_family(s, d)) {
            return (Some(*s), Some(*d));
        }
    }
    (src.first().copied(), dst.first().copied())
}

/// The name of `probe` among a workload's container ports.
fn port_name(w: &Workload, probe: Probe) -> Option<&str> {
    w.ports
        .iter()
        .find(|p| p.port == probe.port && p.protocol == probe.protocol)
        .and_then(|p| p.name.as_deref())
}

/// Evaluates one connection from `from` to pod `to` on `probe`: egress of the source (a
/// hostNetwork source pod is IP-only: no egress) AND ingress of the destination, with the
/// destination's port name resolved from its container ports.
///
/// Peers are built from the engine's workloads and namespaces (a pod whose namespace object is
/// unknown carries only the `kubernetes.io/metadata.name` label); a hostNetwork destination is
/// an IP-only peer for the source's egress; a workload without IP matches no ipBlock. `None` if
/// `to` or a pod source is unknown.
pub fn evaluate(engine: &Engine, from: &Source, to: &PodKey, probe: Probe) -> Option<Verdict> {
    let dest = engine.workload(to)?;
    let (src_peer, src_ip, egress) = match from {
        Source::Ip(ip) => (Peer::IpOnly, Some(*ip), None),
        Source::Pod(k) => {
            let src = engine.workload(k)?;
            let (src_ip, dest_ip) = pick_pair(&src.ips, &dest.ips);
            if src.host_network {
                (Peer::IpOnly, src_ip, None)
            } else {
                let (dest_peer, dest_port_name) = if dest.host_network {
                    (Peer::IpOnly, None)
                } else {
                    (Peer::Workload(engine.identity(to)?), port_name(dest, probe))
                };
                let egress = engine.decide(&Connection {
                    local: k,
                    direction: Direction::Egress,
                    peer: &dest_peer,
                    peer_ip: dest_ip,
                    port: probe.port,
                    protocol: probe.protocol,
                    dest_port_name,
                });
                (Peer::Workload(engine.identity(k)?), src_ip, Some(egress))
            }
        }
    };
    let ingress = engine.decide(&Connection {
        local: to,
        direction: Direction::Ingress,
        peer: &src_peer,
        peer_ip: src_ip,
        port: probe.port,
        protocol: probe.protocol,
        dest_port_name: None,
    });
    let allowed = egress.as_ref().is_none_or(|e| e.allowed) && ingress.allowed;
    Some(Verdict {
        allowed,
        egress,
        ingress,
    })
}

/// Every pod and every `from_ips` entry against every pod (a pod to itself left out), for each
/// probe; with no probes, each destination's own container ports. Cells are ordered by probe, then
/// source, then destination.
pub fn matrix(engine: &Engine, probes: &[Probe], from_ips: &[IpAddr]) -> Vec<Cell> {
    let pods: Vec<&Workload> = engine.workloads().collect();
    let mut sources: Vec<Source> = pods.iter().map(|w| Source::Pod(w.key.clone())).collect();
    sources.extend(from_ips.iter().copied().map(Source::Ip));
    sources.sort();
    sources.dedup();
    let own_ports = probes.is_empty();
    let probe_set: BTreeSet<Probe> = if own_ports {
        pods.iter()
            .flat_map(|w| w.ports.iter())
            .map(|p| Probe {
                port: p.port,
                protocol: p.protocol,
            })
            .collect()
    } else {
        probes.iter().copied().collect()
    };
    let mut cells = Vec::new();
    for probe in probe_set {
        for from in &sources {
            for dest in &pods {
                if matches!(from, Source::Pod(k) if *k == dest.key) {
                    continue;
                }
                if own_ports
                    && !dest
                        .ports
                        .iter()
                        .any(|p| p.port == probe.port && p.protocol == probe.protocol)
                {
                    continue;
                }
                if let Some(verdict) = evaluate(engine, from, &dest.key, probe) {
                    cells.push(Cell {
                        from: from.clone(),
                        to: dest.key.clone(),
                        probe,
                        verdict,
                    });
                }
            }
        }
    }
    cells
}

/// Renders cells as one truth table per probe: a header row of destinations, then one row per
/// source; `.` allowed, `X` denied, `-` not probed (a pod to itself, or a port the destination
/// does not declare). Columns are aligned; readable at 30 pods.
///
/// Shape (whitespace-separated tokens, so a test corpus can hold the same text):
///
/// ```text
/// probe 80/TCP
///             demo/a  demo/b
/// demo/a      -       .
/// demo/b      X       -
/// 10.0.0.9    .       X
/// ```
///
/// Headers are the full `ns/pod` (no legend needed); every column is as wide as its header.
/// Rows and columns are the union of the sources and destinations of all cells, so each probe's
/// table has the same shape; tables are separated by a blank line.
pub fn render_table(cells: &[Cell]) -> String {
    let mut by_probe: BTreeMap<Probe, BTreeMap<(&Source, &PodKey), bool>> = BTreeMap::new();
    let mut sources: BTreeSet<&Source> = BTreeSet::new();
    let mut dests: BTreeSet<&PodKey> = BTreeSet::new();
    for c in cells {
        by_probe
            .entry(c.probe)
            .or_default()
            .insert((&c.from, &c.to), c.verdict.allowed);
        sources.insert(&c.from);
        dests.insert(&c.to);
    }
    let src_names: Vec<String> = sources.iter().map(|s| s.to_string()).collect();
    let dst_names: Vec<String> = dests.iter().map(|d| d.to_string()).collect();
    let label_width = src_names.iter().map(String::len).max().unwrap_or(0);
    let mut out = String::new();
    for (i, (probe, verdicts)) in by_probe.iter().enumerate() {
        if i > 0 {
            out.push('\n');
        }
        let _ = writeln!(out, "probe {probe}");
        let mut line = " ".repeat(label_width);
        for name in &dst_names {
            line.push_str("  ");
            line.push_str(name);
        }
        out.push_str(line.trim_end());
        out.push('\n');
        for (src, src_name) in sources.iter().zip(&src_names) {
            let mut line = format!("{src_name:<label_width$}");
            for (dst, dst_name) in dests.iter().zip(&dst_names) {
                let mark = match verdicts.get(&(*src, *dst)) {
                    Some(true) => ".",
                    Some(false) => "X",
                    None => "-",
                };
                let _ = write!(line, "  {mark:<w$}", w = dst_name.len());
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
    }
    out
}
