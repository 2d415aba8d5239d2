//! The per-node packet processor: the handshake state machine of the design brief.
//!
//! One [`Processor`] serves every enforced workload of a node. The shell calls
//! [`Processor::process`] for each queued packet and applies the returned [`Verdict`]; it calls
//! [`Processor::expire`] periodically and records decision times in [`Processor::metrics_mut`].

use std::collections::HashMap;

use identity::rand_core::CryptoRng;
use identity::{Claims, HandshakeError, Node};
use policy::{Engine, PodKey};

use crate::flow::FlowTable;
use crate::metrics::Metrics;
use crate::packet::PacketError;

/// The netfilter hook a packet was queued from, as seen from the workload: `Output` for
/// packets the workload sends, `Input` for packets it is about to receive.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Hook {
    /// Sent by the workload (mangle OUTPUT in its netns): tokens are attached here.
    Output,
    /// Arriving at the workload (mangle INPUT in its netns): tokens are verified and stripped.
    Input,
}

impl Hook {
    /// Metric label: `output` / `input`.
    pub fn as_str(self) -> &'static str {
        match self {
            Hook::Output => "output",
            Hook::Input => "input",
        }
    }
}

/// An enforced workload (one network namespace), numbered by the agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct WorkloadId(pub u32);

/// Tunables of the processor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcessorConfig {
    /// Handshake flows held at most, over all workloads. A new SYN beyond it is dropped
    /// (reason `flow_table_full`).
    pub max_flows: usize,
    /// A flow in handshake is forgotten this long after its first packet. Equal to the token
    /// skew window (identity's `max_skew_ms`, 30 s by default): a stored token older than that
    /// would be refused as stale by the peer anyway, so re-sending it would be pointless; a SYN
    /// retransmitted later starts a fresh handshake with a fresh token.
    pub handshake_timeout_ms: u64,
    /// How long an authorized flow is remembered, so packets already queued behind the one that
    /// authorized it (before the connmark took effect) are accepted instead of dropped.
    pub authorized_linger_ms: u64,
    /// The mark bit the shell ORs into nfmark (and the rules save into the connmark) when a
    /// verdict has `mark_authorized`.
    pub auth_mark: u32,
}

impl Default for ProcessorConfig {
    fn default() -> Self {
        ProcessorConfig {
            max_flows: 65_536,
            handshake_timeout_ms: 30_000,
            authorized_linger_ms: 10_000,
            auth_mark: 0x1000_0000,
        }
    }
}

/// Why a packet was dropped (or, for [`Reason::PolicyEgress`], rewritten into a RST). Each
/// rejection is counted in [`Metrics`] under [`Reason::as_str`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Reason {
    /// The packet does not parse or cannot be rewritten.
    #[error("packet: {0}")]
    Packet(#[from] PacketError),
    /// The kernel said the TCP checksum was verified-ready, and it is wrong.
    #[error("bad TCP checksum")]
    BadChecksum,
    /// The peer's token was refused by the handshake.
    #[error("handshake: {0}")]
    Handshake(HandshakeError),
    /// Our own side could not make a token (e.g. invalid local port name).
    #[error("local handshake error: {0}")]
    LocalHandshake(HandshakeError),
    /// Ingress policy denies the (tentative) client at the SYN.
    #[error("ingress denied by policy")]
    PolicyIngress,
    /// Egress policy denies the verified server at the SYN-ACK (the SYN-ACK becomes a RST).
    #[error("egress denied by policy")]
    PolicyEgress,
    /// A non-SYN packet without ACK token while the server waits for it.
    #[error("ACK token missing")]
    AckMissing,
    /// A non-SYN, non-RST packet of a flow the processor does not know.
    #[error("no handshake state for this flow")]
    NoFlowState,
    /// The flow table is full: new handshakes are refused.
    #[error("flow table full")]
    FlowTableFull,
    /// The packet was queued for a workload id the processor does not know.
    #[error("unknown workload")]
    UnknownWorkload,
    /// The workload itself sent a packet carrying our option (it would forge tokens).
    #[error("workload sent a packet carrying the Tessera option")]
    OptionFromWorkload,
    /// A token on a packet where none belongs (e.g. data after the handshake, a pure ACK on the
    /// client side, a different ACK token on an authorized flow).
    #[error("unexpected token")]
    UnexpectedToken,
}

impl Reason {
    /// Stable metric label (lowercase snake case). Handshake errors use
    /// [`HandshakeError::as_str`]; packet errors [`PacketError::as_str`].
    pub fn as_str(&self) -> &'static str {
        match self {
            Reason::Packet(e) => e.as_str(),
            Reason::BadChecksum => "bad_checksum",
            Reason::Handshake(e) => e.as_str(),
            Reason::LocalHandshake(_) => "local_handshake",
            Reason::PolicyIngress => "policy_ingress",
            Reason::PolicyEgress => "policy_egress",
            Reason::AckMissing => "ack_missing",
            Reason::NoFlowState => "no_flow_state",
            Reason::FlowTableFull => "flow_table_full",
            Reason::UnknownWorkload => "unknown_workload",
            Reason::OptionFromWorkload => "option_from_workload",
            Reason::UnexpectedToken => "unexpected_token",
        }
    }
}

/// What to do with one queued packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    /// Accept (re-inject) the packet; `false` = drop.
    pub accept: bool,
    /// The packet buffer was changed: the shell must send it back with the verdict.
    pub modified: bool,
    /// Set the authorization mark: the shell issues a Repeat verdict with nfmark |=
    /// [`ProcessorConfig::auth_mark`], so the rules save it into the connmark and the rest of the
    /// flow bypasses userspace. Only ever set together with `accept`.
    pub mark_authorized: bool,
    /// Why the packet was dropped or rewritten (counted in the metrics); `None` for a plain accept.
    pub reason: Option<Reason>,
}

impl Verdict {
    /// Accept, optionally modified.
    pub fn accept(modified: bool) -> Self {
        Verdict {
            accept: true,
            modified,
            mark_authorized: false,
            reason: None,
        }
    }
    /// Accept and mark the flow authorized.
    pub fn authorize(modified: bool) -> Self {
        Verdict {
            accept: true,
            modified,
            mark_authorized: true,
            reason: None,
        }
    }
    /// Drop with a reason.
    pub fn drop(reason: Reason) -> Self {
        Verdict {
            accept: false,
            modified: false,
            mark_authorized: false,
            reason: Some(reason),
        }
    }
}

/// A workload as the processor knows it.
#[derive(Debug, Clone)]
struct WorkloadEntry {
    key: PodKey,
    claims: Claims,
}

/// The node's packet processor: identity node, policy engine, workloads, flow table, metrics.
pub struct Processor {
    node: Node,
    engine: Engine,
    config: ProcessorConfig,
    workloads: HashMap<WorkloadId, WorkloadEntry>,
    flows: FlowTable,
    metrics: Metrics,
}

impl Processor {
    /// A processor over a node's keys and a policy engine.
    pub fn new(node: Node, engine: Engine, config: ProcessorConfig) -> Self {
        Processor {
            node,
            engine,
            flows: FlowTable::new(config.max_flows),
            config,
            workloads: HashMap::new(),
            metrics: Metrics::default(),
        }
    }

    /// The configuration.
    pub fn config(&self) -> &ProcessorConfig {
        &self.config
    }
    /// The policy engine (workloads, namespaces, policies).
    pub fn engine(&self) -> &Engine {
        &self.engine
    }
    /// The policy engine, to apply or remove objects; decisions use the new state at once.
    pub fn engine_mut(&mut self) -> &mut Engine {
        &mut self.engine
    }
    /// The identity node (keys, peer certificates, replay cache).
    pub fn node(&self) -> &Node {
        &self.node
    }
    /// The identity node, e.g. to add peer certificates.
    pub fn node_mut(&mut self) -> &mut Node {
        &mut self.node
    }

    /// Enforce a workload under `id`, with the claims its tokens carry. The caller also applies
    /// the matching `policy::Workload` (labels, ports, IPs) to the engine with the same `key`:
    /// decisions about this workload are the engine's decisions for `key`, and named ports in
    /// its SYN-ACKs come from the engine's container ports. Re-adding an id replaces it (its
    /// flows are kept).
    pub fn add_workload(&mut self, id: WorkloadId, key: PodKey, claims: Claims) {
        self.workloads.insert(id, WorkloadEntry { key, claims });
    }

    /// Stop enforcing a workload: forget it and all its flows (the engine is left alone).
    pub fn remove_workload(&mut self, id: WorkloadId) {
        self.workloads.remove(&id);
        self.flows.remove_workload(id);
        self.metrics.set_flows(self.flows.len());
    }

    /// Whether `id` is enforced.
    pub fn has_workload(&self, id: WorkloadId) -> bool {
        self.workloads.contains_key(&id)
    }

    /// Decide on one queued packet of workload `id` (a full IPv4 or IPv6 packet, modified in
    /// place: it may grow by at most 8 + [`identity::MAX_TOKEN_LEN`] bytes, or shrink).
    /// `checksum_ready`: the kernel's "checksum ready" flag for the packet (nfq
    /// `is_checksum_ready`); when set on INPUT the TCP checksum is verified before anything else.
    /// `now_ms`: unix time in milliseconds; `rng`: the OS CSPRNG, for nonces.
    pub fn process<R: CryptoRng + ?Sized>(
        &mut self,
        id: WorkloadId,
        hook: Hook,
        packet: &mut Vec<u8>,
        checksum_ready: bool,
        now_ms: u64,
        rng: &mut R,
    ) -> Verdict {
        let _ = (id, hook, packet, checksum_ready, now_ms, rng);
        todo!()
    }

    /// Forget handshake flows past their deadline. Call it periodically (e.g. every second).
    pub fn expire(&mut self, now_ms: u64) {
        self.flows.expire(now_ms);
        self.metrics.set_flows(self.flows.len());
    }

    /// Handshake flows currently held.
    pub fn flow_count(&self) -> usize {
        self.flows.len()
    }

    /// The counters.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }
    /// The counters, for what the shell measures (decision time, queue drops).
    pub fn metrics_mut(&mut self) -> &mut Metrics {
        &mut self.metrics
    }
}
