//! Cluster-wide what-if: every source against every destination, both directions combined.
//! (Contract only: the policy issue fills it in.)

use std::net::IpAddr;

use crate::model::{Decision, PodKey, Protocol};
use crate::Engine;

/// A port/protocol to probe, as in `--probe 80/TCP`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Probe {
    pub port: u16,
    pub protocol: Protocol,
}

/// A connection's source in the matrix.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Source {
    Pod(PodKey),
    /// An IP-only external source (`--from-ip`).
    Ip(IpAddr),
}

/// The verdict for one source, destination and probe.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verdict {
    pub allowed: bool,
    /// Egress of the source (`None` for an IP-only source: nothing enforces it).
    pub egress: Option<Decision>,
    pub ingress: Decision,
}

/// One cell of the matrix.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cell {
    pub from: Source,
    pub to: PodKey,
    pub probe: Probe,
    pub verdict: Verdict,
}

/// Evaluates one connection from `from` to pod `to` on `probe`: egress of the source (a
/// hostNetwork source pod is IP-only: no egress) AND ingress of the destination, with the
/// destination's port name resolved from its container ports.
pub fn evaluate(engine: &Engine, from: &Source, to: &PodKey, probe: Probe) -> Option<Verdict> {
    let _ = (engine, from, to, probe);
    todo!()
}

/// Every pod and every `from_ips` entry against every pod (a pod to itself left out), for each
/// probe; with no probes, each destination's own container ports. Cells are ordered by probe, then
/// source, then destination.
pub fn matrix(engine: &Engine, probes: &[Probe], from_ips: &[IpAddr]) -> Vec<Cell> {
    let _ = (engine, probes, from_ips);
    todo!()
}

/// Renders cells as one truth table per probe: a header row of destinations, then one row per
/// source; `.` allowed, `X` denied, `-` not probed (a pod to itself, or a port the destination
/// does not declare). Columns are aligned; readable at 30 pods.
pub fn render_table(cells: &[Cell]) -> String {
    let _ = cells;
    todo!()
}
