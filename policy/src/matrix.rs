//! Cluster-wide what-if: every source against every destination, both directions combined.

use std::fmt;
use std::fmt::Write as _;
use std::net::IpAddr;
use std::str::FromStr;

use crate::engine::{DecisionRef, ReasonRef};
use crate::model::{
    AdminWords, Connection, Decision, Direction, Peer, PodKey, PolicyKey, Protocol, ReasonWords,
    Workload, write_decision_words, write_words,
};
use crate::validate::parse_protocol;
use crate::{Engine, ProbeParseError};

/// A port/protocol to probe, as in `--probe 80/TCP`, or a protocol without ports
/// (`--probe ICMP`: `port` is 0).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Probe {
    pub port: u16,
    pub protocol: Protocol,
}

impl fmt::Display for Probe {
    /// `80/TCP`, or `ICMP` for a protocol without ports.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.protocol.has_ports() {
            write!(f, "{}/{}", self.port, self.protocol)
        } else {
            write!(f, "{}", self.protocol)
        }
    }
}

impl FromStr for Probe {
    type Err = ProbeParseError;

    /// `80/TCP`, `53/udp`, `80` (TCP), or a protocol without ports: `ICMP`, `ICMPv6`, `IP-47`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |message: &str| ProbeParseError {
            input: s.to_string(),
            message: message.to_string(),
        };
        let portless = match s.trim().to_ascii_uppercase().as_str() {
            "ICMP" => Some(Protocol::ICMP),
            "ICMPV6" => Some(Protocol::ICMPV6),
            other => match other.strip_prefix("IP-").map(str::parse::<u8>) {
                Some(Ok(n)) if !Protocol::from_ip(n).has_ports() => Some(Protocol::Other(n)),
                Some(_) => {
                    return Err(err(
                        "IP-N takes the number of a protocol without ports (TCP, UDP and SCTP have their own names)",
                    ));
                }
                None => None,
            },
        };
        if let Some(protocol) = portless {
            return Ok(Probe { port: 0, protocol });
        }
        let (port, protocol) = match s.split_once('/') {
            Some((p, proto)) => (
                p,
                parse_protocol(&proto.to_ascii_uppercase()).ok_or_else(|| {
                    err("protocol must be TCP, UDP or SCTP (or ICMP, ICMPv6, IP-N without a port)")
                })?,
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

/// [`Verdict`] borrowed from the engine: computing it allocates nothing.
#[derive(Clone, Copy, Debug)]
pub struct VerdictRef<'a> {
    pub allowed: bool,
    /// Egress of the source (`None` for an IP-only or host network source: nothing enforces it).
    pub egress: Option<DecisionRef<'a>>,
    pub ingress: DecisionRef<'a>,
}

impl VerdictRef<'_> {
    pub fn to_verdict(&self) -> Verdict {
        Verdict {
            allowed: self.allowed,
            egress: self.egress.as_ref().map(DecisionRef::to_decision),
            ingress: self.ingress.to_decision(),
        }
    }

    /// Like [`Verdict::detailed`], written without building the owned verdict.
    pub fn detailed(&self) -> impl fmt::Display + '_ {
        Detailed(self)
    }
}

/// One side of a verdict, owned or borrowed: its outcome and the words of its reason.
trait Side {
    fn allowed(&self) -> bool;
    /// The reason alone (`verdict`: prefixed with `allowed: ` / `denied: ` as a decision is).
    fn write(
        &self,
        f: &mut fmt::Formatter<'_>,
        direction: Option<Direction>,
        verdict: bool,
    ) -> fmt::Result;
}

impl Side for Decision {
    fn allowed(&self) -> bool {
        self.allowed
    }

    fn write(
        &self,
        f: &mut fmt::Formatter<'_>,
        direction: Option<Direction>,
        verdict: bool,
    ) -> fmt::Result {
        if verdict {
            write_decision_words(f, self.allowed, self.reason.words(), direction)
        } else {
            write_words(f, self.reason.words(), direction)
        }
    }
}

fn ref_words<'a>(
    reason: &ReasonRef<'a>,
) -> ReasonWords<'a, impl Iterator<Item = &'a PolicyKey> + use<'a>> {
    match *reason {
        ReasonRef::NotIsolated => ReasonWords::NotIsolated,
        ReasonRef::HostNetwork => ReasonWords::HostNetwork,
        ReasonRef::AllowedBy {
            policy,
            direction,
            index,
        } => ReasonWords::AllowedBy {
            policy,
            direction,
            index,
        },
        ReasonRef::Isolated(p) => ReasonWords::Isolated(p.iter()),
        ReasonRef::UnknownWorkload(k) => ReasonWords::UnknownWorkload(k),
        ReasonRef::Admin {
            policy,
            tier,
            priority,
            direction,
            index,
            action,
            fail_closed,
        } => ReasonWords::Admin(AdminWords {
            policy,
            tier,
            priority,
            direction,
            index,
            action,
            fail_closed,
        }),
    }
}

impl Side for DecisionRef<'_> {
    fn allowed(&self) -> bool {
        self.allowed
    }

    fn write(
        &self,
        f: &mut fmt::Formatter<'_>,
        direction: Option<Direction>,
        verdict: bool,
    ) -> fmt::Result {
        if verdict {
            write_decision_words(f, self.allowed, ref_words(&self.reason), direction)
        } else {
            write_words(f, ref_words(&self.reason), direction)
        }
    }
}

/// Denied: the denying side(s); allowed: both sides.
fn write_verdict(
    f: &mut fmt::Formatter<'_>,
    allowed: bool,
    egress: Option<&dyn Side>,
    ingress: &dyn Side,
) -> fmt::Result {
    if allowed {
        f.write_str("allowed: ")?;
        if let Some(e) = egress {
            f.write_str("egress ")?;
            e.write(f, None, false)?;
            f.write_str("; ")?;
        }
        f.write_str("ingress ")?;
        ingress.write(f, None, false)
    } else {
        f.write_str("denied: ")?;
        let mut first = true;
        if let Some(e) = egress.filter(|e| !e.allowed()) {
            e.write(f, Some(Direction::Egress), false)?;
            first = false;
        }
        if !ingress.allowed() {
            if !first {
                f.write_str("; ")?;
            }
            ingress.write(f, Some(Direction::Ingress), false)?;
        }
        Ok(())
    }
}

/// `allowed|denied: egress: ...; ingress: ...`.
fn write_detailed(
    f: &mut fmt::Formatter<'_>,
    allowed: bool,
    egress: Option<&dyn Side>,
    ingress: &dyn Side,
) -> fmt::Result {
    f.write_str(if allowed { "allowed" } else { "denied" })?;
    f.write_str(": egress: ")?;
    match egress {
        Some(e) => e.write(f, Some(Direction::Egress), true)?,
        None => f.write_str("not enforced (IP-only source)")?,
    }
    f.write_str("; ingress: ")?;
    ingress.write(f, Some(Direction::Ingress), true)
}

impl fmt::Display for Verdict {
    /// Denied: the denying side(s), e.g. `denied: isolated for ingress by demo/default-deny,
    /// demo/db (no rule matches)`. Allowed: both sides, e.g. `allowed: egress not isolated (no
    /// policy selects it); ingress allowed by demo/backend-policy ingress rule 0`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_verdict(
            f,
            self.allowed,
            self.egress.as_ref().map(|e| e as &dyn Side),
            &self.ingress,
        )
    }
}

impl fmt::Display for VerdictRef<'_> {
    /// As [`Verdict`]'s.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_verdict(
            f,
            self.allowed,
            self.egress.as_ref().map(|e| e as &dyn Side),
            &self.ingress,
        )
    }
}

struct Detailed<'a>(&'a VerdictRef<'a>);

impl fmt::Display for Detailed<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let v = self.0;
        write_detailed(
            f,
            v.allowed,
            v.egress.as_ref().map(|e| e as &dyn Side),
            &v.ingress,
        )
    }
}

impl Verdict {
    /// Like `Display`, with each side's decision spelled out: `egress: ...; ingress: ...`.
    pub fn detailed(&self) -> String {
        struct D<'a>(&'a Verdict);
        impl fmt::Display for D<'_> {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                let v = self.0;
                write_detailed(
                    f,
                    v.allowed,
                    v.egress.as_ref().map(|e| e as &dyn Side),
                    &v.ingress,
                )
            }
        }
        D(self).to_string()
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

/// One cell of a [`Matrix`], borrowed: no allocation per cell.
#[derive(Clone, Copy, Debug)]
pub struct CellRef<'a> {
    pub from: &'a Source,
    pub to: &'a PodKey,
    pub probe: Probe,
    /// Position of `from` in [`Matrix::sources`].
    pub row: usize,
    /// Position of `to` in [`Matrix::destinations`].
    pub column: usize,
    pub verdict: VerdictRef<'a>,
}

impl CellRef<'_> {
    pub fn to_cell(&self) -> Cell {
        Cell {
            from: self.from.clone(),
            to: self.to.clone(),
            probe: self.probe,
            verdict: self.verdict.to_verdict(),
        }
    }
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

/// Whether a workload declares `probe` among its container ports.
fn declares(w: &Workload, probe: Probe) -> bool {
    w.ports
        .iter()
        .any(|p| p.port == probe.port && p.protocol == probe.protocol)
}

/// The name of `probe` among a workload's container ports.
fn port_name(w: &Workload, probe: Probe) -> Option<&str> {
    w.ports
        .iter()
        .find(|p| p.port == probe.port && p.protocol == probe.protocol)
        .and_then(|p| p.name.as_deref())
}

/// What a pod is as a peer: its identity, or IP-only for a hostNetwork pod.
fn peer_of(engine: &Engine, w: &Workload) -> Peer {
    if w.host_network {
        return Peer::IpOnly;
    }
    engine.identity(&w.key).map_or(Peer::IpOnly, Peer::Workload)
}

/// The source side of a connection, prepared once.
struct SourceSide<'e> {
    /// `None` for an IP-only source.
    workload: Option<&'e Workload>,
    peer: &'e Peer,
    ip: Option<IpAddr>,
}

/// The destination side of a connection, prepared once.
struct DestSide<'e> {
    workload: &'e Workload,
    peer: &'e Peer,
}

/// Egress of the source (unless IP-only or host network) AND ingress of the destination.
fn decide<'e>(
    engine: &'e Engine,
    from: &SourceSide<'e>,
    to: &DestSide<'e>,
    probe: Probe,
) -> VerdictRef<'e> {
    let dest = to.workload;
    let (src_ip, egress) = match from.workload {
        None => (from.ip, None),
        Some(src) => {
            let (src_ip, dest_ip) = pick_pair(&src.ips, &dest.ips);
            if src.host_network {
                (src_ip, None)
            } else {
                let dest_port_name = if dest.host_network {
                    None
                } else {
                    port_name(dest, probe)
                };
                let egress = engine.decide_ref(&Connection {
                    local: &src.key,
                    direction: Direction::Egress,
                    peer: to.peer,
                    peer_ip: dest_ip,
                    port: probe.port,
                    protocol: probe.protocol,
                    dest_port_name,
                    resolved_names: &[],
                });
                (src_ip, Some(egress))
            }
        }
    };
    let ingress = engine.decide_ref(&Connection {
        local: &dest.key,
        direction: Direction::Ingress,
        peer: from.peer,
        peer_ip: src_ip,
        port: probe.port,
        protocol: probe.protocol,
        dest_port_name: None,
        resolved_names: &[],
    });
    let allowed = egress.as_ref().is_none_or(|e| e.allowed) && ingress.allowed;
    VerdictRef {
        allowed,
        egress,
        ingress,
    }
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
    let dest_peer = peer_of(engine, dest);
    let (src_workload, src_peer, ip) = match from {
        Source::Ip(ip) => (None, Peer::IpOnly, Some(*ip)),
        Source::Pod(k) => {
            let w = engine.workload(k)?;
            (Some(w), peer_of(engine, w), None)
        }
    };
    let from = SourceSide {
        workload: src_workload,
        peer: &src_peer,
        ip,
    };
    let to = DestSide {
        workload: dest,
        peer: &dest_peer,
    };
    Some(decide(engine, &from, &to, probe).to_verdict())
}

/// Egress of pod `from` to an address, on `probe`, with the names `from` resolved to that
/// address (`resolved_names`: lowercase, no trailing dot; empty if none): what admin `nodes`
/// and `domainNames` peers need, and what [`evaluate`] cannot ask since its destinations are
/// pods. The address may be a node's (see [`Engine::apply_node`]), an external service's, or
/// a pod's: a known non-host-network pod at `to` is the peer with its identity and its port
/// names, as its handshake would prove it; anything else is IP-only.
///
/// Only the source's egress is decided: nothing enforces ingress at an address that is no
/// enforced pod (for a pod destination, [`evaluate`] gives both sides). `None` if `from` is
/// unknown. A host-network `from` is never a policy target ([`crate::Reason::HostNetwork`]).
pub fn evaluate_to_ip(
    engine: &Engine,
    from: &PodKey,
    to: IpAddr,
    probe: Probe,
    resolved_names: &[&str],
) -> Option<Decision> {
    engine.workload(from)?;
    let dest = engine.workload_by_ip(&to).filter(|w| !w.host_network);
    let peer = dest.map_or(Peer::IpOnly, |w| peer_of(engine, w));
    let dest_port_name = dest.and_then(|w| port_name(w, probe));
    Some(engine.decide(&Connection {
        local: from,
        direction: Direction::Egress,
        peer: &peer,
        peer_ip: Some(to),
        port: probe.port,
        protocol: probe.protocol,
        dest_port_name,
        resolved_names,
    }))
}

/// Every pod and every `from_ips` entry against every pod (a pod to itself left out), for each
/// probe; with no probes, each destination's own container ports.
///
/// Each pod's peer identity is built once, and every cell is computed on demand from
/// [`Engine::decide_ref`]: [`Matrix::cells`] streams them without holding them, so a 1,000-pod
/// matrix costs the pods' identities, not a million cells.
pub struct Matrix<'e> {
    engine: &'e Engine,
    /// The pods (in key order), then the IP-only sources (sorted, deduplicated).
    sources: Vec<Source>,
    /// The pods, in key order: the destinations, and the first rows.
    pods: Vec<&'e Workload>,
    /// Each pod as a peer (same positions as `pods`), then `Peer::IpOnly` for the IP sources.
    peers: Vec<Peer>,
    ips: Vec<IpAddr>,
    probes: Vec<Probe>,
    /// Per probe: the positions in `pods` of the destinations probed on it.
    columns: Vec<Vec<usize>>,
}

impl<'e> Matrix<'e> {
    /// Plans the matrix: see [`Matrix`]. Nothing is decided yet.
    pub fn new(engine: &'e Engine, probes: &[Probe], from_ips: &[IpAddr]) -> Self {
        let pods: Vec<&Workload> = engine.workloads().collect();
        let mut ips = from_ips.to_vec();
        ips.sort();
        ips.dedup();
        let mut sources: Vec<Source> = pods.iter().map(|w| Source::Pod(w.key.clone())).collect();
        sources.extend(ips.iter().copied().map(Source::Ip));
        let mut peers: Vec<Peer> = pods.iter().map(|w| peer_of(engine, w)).collect();
        peers.extend(ips.iter().map(|_| Peer::IpOnly));
        let own_ports = probes.is_empty();
        let mut probes: Vec<Probe> = if own_ports {
            pods.iter()
                .flat_map(|w| w.ports.iter())
                .map(|p| Probe {
                    port: p.port,
                    protocol: p.protocol,
                })
                .collect()
        } else {
            probes.to_vec()
        };
        probes.sort();
        probes.dedup();
        let columns = probes
            .iter()
            .map(|probe| {
                (0..pods.len())
                    .filter(|d| !own_ports || pods.get(*d).is_some_and(|w| declares(w, *probe)))
                    .collect()
            })
            .collect();
        Matrix {
            engine,
            sources,
            pods,
            peers,
            ips,
            probes,
            columns,
        }
    }

    /// Rows: the pods in key order (the same positions as [`Matrix::destinations`]), then the
    /// IP-only sources.
    pub fn sources(&self) -> &[Source] {
        &self.sources
    }

    /// Columns: every pod, in key order (a block shows those probed on its port).
    pub fn destinations(&self) -> impl ExactSizeIterator<Item = &'e PodKey> + '_ {
        self.pods.iter().map(|w| &w.key)
    }

    /// The destination pods as workloads (labels, host network), in the same positions as
    /// [`Matrix::destinations`]: what a picture of the matrix draws them with.
    pub fn workloads(&self) -> impl ExactSizeIterator<Item = &'e Workload> + '_ {
        self.pods.iter().copied()
    }

    /// The probes, in order: one block each.
    pub fn probes(&self) -> &[Probe] {
        &self.probes
    }

    /// The positions (in [`Matrix::destinations`]) of the destinations probed on the `i`th probe.
    pub fn columns(&self, probe_index: usize) -> &[usize] {
        self.columns.get(probe_index).map_or(&[], Vec::as_slice)
    }

    /// How many cells [`Matrix::cells`] yields.
    pub fn len(&self) -> usize {
        // Each destination is probed from every source but itself.
        let sources = self.pods.len().saturating_sub(1) + self.ips.len();
        self.columns.iter().map(|c| c.len() * sources).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// One cell, if `row` is a source other than the destination `column` and the destination
    /// is probed on the probe.
    fn cell(&self, probe_index: usize, row: usize, column: usize) -> Option<CellRef<'_>> {
        let probe = *self.probes.get(probe_index)?;
        if row == column {
            return None;
        }
        let dest = *self.pods.get(column)?;
        let from = self.sources.get(row)?;
        let src = SourceSide {
            workload: self.pods.get(row).copied(),
            peer: self.peers.get(row)?,
            ip: match from {
                Source::Ip(ip) => Some(*ip),
                Source::Pod(_) => None,
            },
        };
        let to = DestSide {
            workload: dest,
            peer: self.peers.get(column)?,
        };
        Some(CellRef {
            from,
            to: &dest.key,
            probe,
            row,
            column,
            verdict: decide(self.engine, &src, &to, probe),
        })
    }

    /// The cells of the `i`th probe, by source, then destination.
    pub fn probe_cells(&self, probe_index: usize) -> impl Iterator<Item = CellRef<'_>> + '_ {
        let columns = self.columns(probe_index);
        (0..self.sources.len()).flat_map(move |row| {
            columns
                .iter()
                .filter_map(move |column| self.cell(probe_index, row, *column))
        })
    }

    /// Every cell, computed as it is yielded: by probe, then source, then destination.
    pub fn cells(&self) -> impl Iterator<Item = CellRef<'_>> + '_ {
        (0..self.probes.len()).flat_map(move |p| self.probe_cells(p))
    }

    /// The `i`th probe's truth table (see [`render_table`]).
    pub fn render_block(&self, probe_index: usize) -> String {
        let mut out = String::new();
        let Some(probe) = self.probes.get(probe_index) else {
            return out;
        };
        let columns = self.columns(probe_index);
        // Marks by position: row-major, one byte per (source, column).
        let mut marks = vec![b'-'; self.sources.len() * columns.len()];
        let mut slot_of = vec![usize::MAX; self.pods.len()];
        for (slot, column) in columns.iter().enumerate() {
            if let Some(s) = slot_of.get_mut(*column) {
                *s = slot;
            }
        }
        for cell in self.probe_cells(probe_index) {
            let slot = slot_of.get(cell.column).copied().unwrap_or(usize::MAX);
            if let Some(m) = marks.get_mut(cell.row * columns.len() + slot) {
                *m = if cell.verdict.allowed { b'.' } else { b'X' };
            }
        }
        let numbers = self.pods.len();
        let number_width = numbers.max(1).to_string().len();
        let labels: Vec<String> = self.sources.iter().map(row_label).collect();
        let label_width = labels.iter().map(|l| l.chars().count()).max().unwrap_or(0);
        // `NNN label  ` before the first mark.
        let indent = number_width + 1 + label_width + 1;
        let _ = writeln!(out, "probe {probe}");
        // Column numbers, written top to bottom (one digit a line, right-aligned).
        for digit in (0..number_width).rev() {
            let mut line = " ".repeat(indent);
            for column in columns {
                let n = column + 1;
                line.push(' ');
                if n.ilog10() as usize >= digit {
                    let d = (n / 10usize.pow(digit as u32)) % 10;
                    line.push(char::from_digit(d as u32, 10).unwrap_or('?'));
                } else {
                    line.push(' ');
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        for (row, label) in labels.iter().enumerate() {
            let number = if row < self.pods.len() {
                (row + 1).to_string()
            } else {
                String::new()
            };
            let _ = write!(out, "{number:>number_width$} {label:<label_width$} ");
            for slot in 0..columns.len() {
                out.push(' ');
                let m = marks
                    .get(row * columns.len() + slot)
                    .copied()
                    .unwrap_or(b'-');
                out.push(char::from(m));
            }
            let trimmed = out.trim_end_matches(' ').len();
            out.truncate(trimmed);
            out.push('\n');
        }
        out
    }
}

/// The longest row label: a longer `ns/pod` keeps its start and its end (where replicas differ)
/// around an ellipsis; the row number identifies it anyway.
const MAX_LABEL: usize = 40;

fn row_label(source: &Source) -> String {
    let text = source.to_string();
    let chars: Vec<char> = text.chars().collect();
    if chars.len() <= MAX_LABEL {
        return text;
    }
    let tail = 14;
    let head = MAX_LABEL - tail - 1;
    let mut label: String = chars[..head].iter().collect();
    label.push('…');
    label.extend(&chars[chars.len() - tail..]);
    label
}

/// Every cell of [`Matrix::new`], owned. For large clusters stream [`Matrix::cells`] instead.
pub fn matrix(engine: &Engine, probes: &[Probe], from_ips: &[IpAddr]) -> Vec<Cell> {
    Matrix::new(engine, probes, from_ips)
        .cells()
        .map(|c| c.to_cell())
        .collect()
}

/// Renders the matrix as one truth table per probe, separated by a blank line: `.` allowed,
/// `X` denied, `-` not probed (a pod to itself). Pods are numbered in key order; each row is a
/// source, carrying its number and name; each column a destination, headed by its number
/// written vertically (one digit a line). IP-only sources come last, unnumbered. Without
/// explicit probes, a probe's block has a column only for the pods that declare its port.
///
/// ```text
/// probe 80/TCP
///                           1
///            1 2 3 4 5 6 7 8 9 0
///  1 demo/a  - . X . . . . . . .
///  ...
///    10.0.0.9 . X . . . . . . . .
/// ```
///
/// At 30 pods a row is 60 characters plus its label (at most 44): it fits a terminal.
pub fn render_table(matrix: &Matrix<'_>) -> String {
    let mut out = String::new();
    for i in 0..matrix.probes().len() {
        if i > 0 {
            out.push('\n');
        }
        out.push_str(&matrix.render_block(i));
    }
    out
}
