//! Tessera datapath: packet parsing and rewriting, per-flow handshake state, and the shell over
//! NFQUEUE, network namespaces and iptables.
//!
//! The pure core (this crate minus `shell`) does no I/O and reads no clock: the shell hands it
//! one queued packet at a time with the time and a CSPRNG, and applies the [`Verdict`].
//!
//! - [`packet`]: parse IPv4/IPv6 + TCP without trusting any length field, attach / strip the
//!   Tessera TCP option and token, recompute checksums, rewrite a SYN-ACK into a RST.
//! - [`flow`]: the bounded, expiring per-flow handshake table (workload + 5-tuple).
//! - [`dns`]: the names each workload resolved, learnt from the DNS answers it receives
//!   (for admin `domainNames` egress peers): the answer parser and the bounded TTL cache.
//! - [`established`]: the authorized flows remembered for [`Processor::recheck`], which cuts
//!   those a policy or label change now denies.
//! - [`processor`]: the state machine from the design brief, one [`Processor`] per node.
//! - [`metrics`]: counters and the decision-time histogram, Prometheus text format.
//! - [`flowlog`]: flow records (docs/flow-log.md) and the bounded recorder the processor
//!   writes them into, with the per-policy verdict counts.
//! - [`tunnel`]: encryption between nodes, the WireGuard tunnel's peer table, cryptokey
//!   routing and counters (`boringtun` sessions); `shell::tunnel` runs it over TUN and UDP.

mod bound;
pub mod dns;
pub mod established;
pub mod flow;
pub mod flowlog;
pub mod metrics;
pub mod packet;
pub mod processor;
pub mod shell;
pub mod tunnel;
pub mod udp;

pub use established::{Cut, CutReason};
pub use flow::FlowKey;
pub use metrics::{DECISION_BUCKETS_NS, Metrics, PacketKind};
pub use packet::{IpDatagram, PacketError, TcpSegment};
pub use processor::{
    Hook, Processor, ProcessorConfig, Reason, Verdict, WorkloadId, control_mark, reauth_mark,
};
pub use udp::{EmitMark, Held, HeldLimits, Outgoing};

/// The `rand_core` the processor's `rng` parameter comes from (re-exported from `identity`).
pub use identity::rand_core;
