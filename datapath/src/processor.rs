//! The per-node packet processor: the handshake state machine of the design brief.
//!
//! One [`Processor`] serves every enforced workload of a node. The shell calls
//! [`Processor::process`] for each queued packet and applies the returned [`Verdict`]; it calls
//! [`Processor::expire`] periodically and records decision times in [`Processor::metrics_mut`].
//!
//! Flows are keyed by workload and 5-tuple (local = the workload's side). On OUTPUT of a SYN the
//! workload is the client; on INPUT of a SYN it is the server.
//!
//! | packet (hook)            | state before        | action                                   | state after       |
//! |--------------------------|---------------------|------------------------------------------|-------------------|
//! | SYN (OUTPUT)             | none / other ISN    | `client_syn`, attach; a *bound* SYN (`client_syn_bound`) when a verified SYN-ACK from the address named its node (and `bound_handshake`, and the node is not silent) | ClientSynSent |
//! | SYN (OUTPUT)             | ClientSynSent, same ISN | attach the same token; after a bound one: a new plain SYN (if a plain SYN-ACK answers it, the node is silent for `bound_silent_ms`) | = |
//! | SYN + token (INPUT)      | none                | `server_syn`, ingress on the tentative peer, strip | ServerSynReceived |
//! | SYN, no token (INPUT)    | none                | ingress on the IP only (`Peer::IpOnly`)  | ServerTokenless   |
//! | bound SYN (INPUT)        | none                | `server_syn_bound` verifies the binding: ingress on the proven client, strip (a binding that does not verify: as a plain SYN) | ServerBound |
//! | same SYN again (INPUT)   | ServerSyn* / ServerAwaitingAck / ServerBound* | strip, accept (no second `server_syn`); after ServerBoundAnswered, unmark | = |
//! | another SYN (INPUT)      | ServerBoundAnswered | as a new SYN, and unmark (the kernel's next SYN-ACK must be queued) | ServerSyn* |
//! | SYN-ACK (OUTPUT)         | ServerBound         | `respond` with the bound SYN-ACK, attach, mark (SYN-ACKs are queued even on a marked flow) | ServerBoundAnswered |
//! | SYN-ACK (OUTPUT)         | ServerBoundAnswered | attach the same token, mark              | =                 |
//! | bound SYN-ACK (INPUT)    | ClientSynSent (bound) | `receive`, egress on the server's identity; strip, mark (no ACK token) | Authorized |
//! | SYN-ACK, no token (INPUT)| ClientSynSent (bound) | drop `bound_syn_ack_without_token` (the SYN's retransmission goes plain) | = |
//! | SYN-ACK (OUTPUT)         | ServerSynReceived   | `respond` (local port name), attach      | ServerAwaitingAck |
//! | SYN-ACK (OUTPUT)         | ServerAwaitingAck   | attach the same token                    | =                 |
//! | SYN-ACK (OUTPUT)         | ServerTokenless     | accept, mark                             | Authorized        |
//! | SYN-ACK + token (INPUT)  | ClientSynSent       | ack must be ISN+1; `receive_syn_ack`, egress on the server's identity and port name; strip, or rewrite to RST if denied | ClientAckPending |
//! | SYN-ACK, no token (INPUT)| ClientSynSent       | egress on the IP only; accept + mark, or RST | Authorized    |
//! | pure ACK (OUTPUT)        | ClientAckPending    | attach the ACK token, mark               | ClientAckSent     |
//! | SYN-ACK + same token (INPUT) | ClientAckSent   | the ACK was lost: strip, accept, *unmark* (clear AUTH in the connmark) | = |
//! | pure ACK (OUTPUT)        | ClientAckSent       | the duplicate ACK: attach the same ACK token, mark again | =  |
//! | ACK + token (INPUT)      | ServerAwaitingAck   | `receive_ack`, ingress again on the proven identity, strip, mark | Authorized |
//! | non-SYN, no token (INPUT)| ServerAwaitingAck   | back to the queue's tail (it may have overtaken the token), at most `MAX_DEFERRALS` times; then drop `ack_missing` (the server kernel re-sends its SYN-ACK) | = |
//! | first server packet (INPUT) | ClientAckPending | seq must be the server's ISN+1; accept, mark | Authorized    |
//! | any (OUTPUT) / first server packet (INPUT) | ClientVerified (ClientAckPending past its deadline) | accept, mark | Authorized |
//! | RST (OUTPUT, or INPUT at the flow's sequence numbers) | any | accept, forget the flow  | none              |
//! | non-SYN, non-RST (any)   | none, flow cut by [`Processor::recheck`] | first packet each way: rewrite into a RST at its sequence numbers; later ones: into a bare ACK, which the socket-less receiver answers with a RST (`flow_cut`) | = |
//! | non-SYN, non-RST (INPUT) | none                | drop `no_flow_state`, and answer the sender with the RST its kernel would get from ours (this end restarted or lost the flow's conntrack entry; at most `UNKNOWN_FLOW_ANSWERS_PER_SECOND`) | none |
//! | SYN-ACK (INPUT)          | none                | drop `no_flow_state`, and answer the server with the RST its kernel would get from ours (no handshake of ours: the agent restarted, the table evicted it, the workload is gone; same budget) | none |
//! | non-SYN, non-RST (OUTPUT) | none               | drop `no_flow_state`, and answer the workload's own socket (through the loopback, only at one of its addresses) with the RST its peer would send (same budget) | none |
//!
//! The client marks its flow when its ACK token leaves, so neither its data nor the server's
//! answer comes back to userspace. Should that ACK be lost, the server kernel re-sends its
//! SYN-ACK, which carries our option and is therefore queued even on a marked flow: the verdict
//! strips it and sets [`reauth_mark`] (the rules then clear AUTH from the connmark), so the
//! duplicate ACK the client kernel answers with is queued again and gets the same ACK token.
//!
//! Every authorized flow is also remembered (server: at the valid ACK or the token-less
//! SYN-ACK; client: at the SYN-ACK's egress decision) with the peer as the engine saw it, so that
//! [`Processor::recheck`] can cut those a later change denies (see [`crate::established`]).
//!
//! Authorized flows linger ([`ProcessorConfig::authorized_linger_ms`]) so packets queued behind
//! the one that set the mark are accepted (and marked) instead of dropped. Every drop carries a
//! [`Reason`] and is counted under [`Reason::as_str`].

use std::collections::HashMap;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use identity::rand_core::CryptoRng;
use identity::{
    Claims, ClientAwaitingSynAck, FlowSource, HandshakeError, Node, PeerIdentity, ServerSyn,
};
use pnet_packet::ip::IpNextHeaderProtocols;
use policy::{Connection, Direction, Engine, Peer, PodKey, Protocol, WorkloadIdentity};

use crate::bound::{BoundPeers, SynBinding};
use crate::dns::{self, MAX_NAMES_PER_ADDRESS, NameCache};
use crate::established::{Authorized, Cut, CutReason, CutSet, EstablishedTable};
use crate::flow::{Flow, FlowKey, FlowState, FlowTable};
use crate::flowlog::{FlowLog, FlowLogConfig};
use crate::metrics::{Metrics, PacketKind};
use crate::packet::{self, IpDatagram, PacketError, TcpSegment};
use crate::udp::{
    EmitMark, Held, HeldLimits, Outgoing, PeerAgents, UdpFlow, UdpState, UdpTable, build_udp,
    set_udp_checksum, udp_payload,
};

mod flows;

use flows::Who;

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
    /// Audit mode: policy decisions are made and recorded (flow records marked `audit`,
    /// verdict counts) but a denial is not applied: the flow proceeds as if allowed, and a
    /// re-check cuts nothing. Authentication still applies (a forged, replayed or
    /// unverifiable token is refused: that is no policy question).
    pub audit: bool,
    /// Handshake flows held at most, over all workloads. A full table evicts the older half of
    /// its unproven server-side and lingering authorized flows (a flood that ingress admits
    /// cannot lock the node out), or, when those are under an eighth of it, the older half of
    /// the own flows of the workload holding the most (nor can a local workload that opens
    /// flows without end); a new SYN that still finds no room is dropped (reason
    /// `flow_table_full`).
    pub max_flows: usize,
    /// A flow in handshake is forgotten this long after its first packet. Equal to the token
    /// skew window (identity's `max_skew_ms`, 30 s by default): a stored token older than that
    /// would be refused as stale by the peer anyway, so re-sending it would be pointless; a SYN
    /// retransmitted later starts a fresh handshake with a fresh token.
    pub handshake_timeout_ms: u64,
    /// How long an authorized flow is remembered, so packets already queued behind the one that
    /// authorized it (before the connmark took effect) are accepted instead of dropped.
    pub authorized_linger_ms: u64,
    /// How long a client flow is remembered after its handshake deadline when the server has
    /// not sent anything yet (a connection opened ahead of use, e.g. by a pool): until the
    /// client's next packet or the server's first one marks it. Without it such a connection
    /// would lose its state after `handshake_timeout_ms` and break when first used.
    pub client_idle_ms: u64,
    /// The mark bit the shell ORs into nfmark (and the rules save into the connmark) when a
    /// verdict has `mark_authorized`.
    pub auth_mark: u32,
    /// Authorized flows remembered for [`Processor::recheck`], over all workloads; beyond it the
    /// oldest flow of the workload that holds the most is forgotten (it can then no longer be
    /// cut).
    pub max_established: usize,
    /// How long a cut flow's packets are answered with a RST (an idle connection is told at
    /// its first packet within this time; later its packets are dropped as of an unknown flow).
    /// The set of cut flows is bounded by `max_established` too.
    pub cut_remember_ms: u64,
    /// How often [`Processor::prune_due`] asks the shell for a conntrack listing per workload.
    pub prune_interval_ms: u64,
    /// Authenticated UDP: how long the client waits for the answer to its first SYN control
    /// datagram before sending it again (the wait doubles each time).
    pub udp_hello_rto_ms: u64,
    /// Authenticated UDP: SYN controls sent before the peer is taken as agentless and the flow
    /// is decided on its address (25 ms, 3 tries: the first flow to an agentless peer waits
    /// 175 ms; later ones to it do not wait, see `udp_agentless_ms`).
    pub udp_hello_tries: u8,
    /// How long a peer that never answered a SYN control is remembered as agentless.
    pub udp_agentless_ms: u64,
    /// How long a peer whose agent answered is remembered as having one (its plain datagrams
    /// are then refused as unauthenticated).
    pub udp_agent_ms: u64,
    /// Application datagrams held per UDP flow while its handshake runs (more are dropped,
    /// `udp_hold_full`).
    pub udp_held_per_flow: usize,
    /// Application datagrams held over all UDP flows, and over one workload's (a workload that
    /// opens flows without end, to peers that never answer, cannot take the others' room):
    /// counts and bytes. Beyond them, datagrams are dropped (`udp_hold_full`).
    pub udp_held: HeldLimits,
    /// UDP flows in handshake (or lingering after it) at most. A full table evicts as for
    /// `max_flows`: the older half of its server-side flows, or else of the client flows of
    /// the workload holding the most.
    pub udp_max_flows: usize,
    /// How long a UDP flow's proven state lingers after its handshake (to mark the flow at its
    /// first datagram, and answer a re-sent SYN-ACK or ACK of a lost control datagram).
    pub udp_linger_ms: u64,
    /// The names learnt from the DNS answers the workloads receive
    /// ([`Processor::learn_dns_answer`]): TTL clamp and bounds.
    pub dns: dns::CacheConfig,
    /// The bound handshake (docs/wire-format.md, "Bound handshake"): a TCP connection or UDP
    /// flow to an address whose node a verified SYN-ACK named sends a SYN MACed for that node,
    /// which authorizes at the SYN and answers with a bound SYN-ACK: two tokens, one queued
    /// packet fewer at each end. Bound SYNs are always *taken* (this switch only stops sending them,
    /// e.g. while agents older than the bound handshake still run: they drop bound SYNs, and
    /// each of them costs one connection a SYN retransmission per `bound_silent_ms`).
    pub bound_handshake: bool,
    /// How long an address's node, as a verified SYN-ACK named it, is used to bind SYNs.
    pub bound_peer_ms: u64,
    /// How long a node that ignored a bound SYN (and answered its plain retransmission) gets
    /// plain ones.
    pub bound_silent_ms: u64,
}

impl Default for ProcessorConfig {
    fn default() -> Self {
        ProcessorConfig {
            audit: false,
            max_flows: 65_536,
            handshake_timeout_ms: 30_000,
            authorized_linger_ms: 10_000,
            client_idle_ms: 300_000,
            auth_mark: 0x1000_0000,
            max_established: 65_536,
            cut_remember_ms: 3_600_000,
            prune_interval_ms: 30_000,
            udp_hello_rto_ms: 25,
            udp_hello_tries: 3,
            udp_agentless_ms: 60_000,
            udp_agent_ms: 600_000,
            udp_held_per_flow: 8,
            udp_held: HeldLimits::default(),
            udp_max_flows: 65_536,
            udp_linger_ms: 2_000,
            dns: dns::CacheConfig::default(),
            bound_handshake: true,
            bound_peer_ms: 600_000,
            bound_silent_ms: 600_000,
        }
    }
}

/// The mark bit that asks the rules to *clear* [`ProcessorConfig::auth_mark`] from the connmark
/// (see [`Verdict::unmark`]): the bit just above the AUTH mark's highest bit, or, when AUTH uses
/// bit 31, the bit just below its lowest.
pub fn reauth_mark(auth_mark: u32) -> u32 {
    let high = 31 - auth_mark.leading_zeros().min(31);
    if high < 31 {
        1 << (high + 1)
    } else {
        1 << auth_mark.trailing_zeros().saturating_sub(1)
    }
}

/// The mark bit our own control datagrams leave with (the rules let it pass without queueing
/// it): the bit above [`reauth_mark`], or below it when that is bit 31 or the AUTH bit.
pub fn control_mark(auth_mark: u32) -> u32 {
    let used = auth_mark | reauth_mark(auth_mark);
    let high = 31 - used.leading_zeros().min(31);
    if high < 31 {
        1 << (high + 1)
    } else {
        1 << used.trailing_zeros().saturating_sub(1)
    }
}

/// Answers the agent sends for a workload to a peer about a flow the workload no longer knows,
/// at most per second in all: UDP RESTART controls and TCP RSTs. Each answers a packet that
/// anyone can send (a forged source), so a flood of them reflects no more than this.
pub const UNKNOWN_FLOW_ANSWERS_PER_SECOND: u32 = 1_000;

/// The budget of [`UNKNOWN_FLOW_ANSWERS_PER_SECOND`]: (second, answers sent in it).
#[derive(Debug, Default)]
struct Answers(u64, u32);

impl Answers {
    /// Whether an answer may leave now; counts it.
    fn take(&mut self, now_ms: u64) -> bool {
        let second = now_ms / 1_000;
        if self.0 != second {
            *self = Answers(second, 0);
        }
        if self.1 >= UNKNOWN_FLOW_ANSWERS_PER_SECOND {
            return false;
        }
        self.1 += 1;
        true
    }
}

/// How many times a server flow waiting for the ACK token sends a token-less packet back to
/// the queue before dropping it (`ack_missing`).
pub const MAX_DEFERRALS: u8 = 32;

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
    /// A packet of an established flow that a policy change cut ([`Processor::recheck`]): it
    /// is rewritten into a RST (to the local socket on INPUT, to the peer on OUTPUT), or, once
    /// that side was reset, into a bare ACK without payload.
    #[error("flow cut by a policy change")]
    FlowCut,
    /// The flow table is full: new handshakes are refused.
    #[error("flow table full")]
    FlowTableFull,
    /// The packet was queued for a workload id the processor does not know.
    #[error("unknown workload")]
    UnknownWorkload,
    /// The workload itself sent a packet carrying our option (it would forge tokens).
    #[error("workload sent a packet carrying the Tessera option")]
    OptionFromWorkload,
    /// A SYN-ACK that does not acknowledge our SYN.
    #[error("SYN-ACK does not acknowledge our SYN")]
    AckMismatch,
    /// The workload sent a packet whose source address is not one of its own.
    #[error("source address is not the workload's")]
    SpoofedSource,
    /// A datagram starting with the UDP control magic is not a well-formed control datagram.
    #[error("UDP control: {0}")]
    UdpControl(identity::UdpControlError),
    /// A plain UDP datagram from a peer that has an agent (so it must prove itself first).
    #[error("UDP datagram from an agent's workload without a handshake")]
    UdpUnauthenticated,
    /// A UDP flow's handshake holds as many datagrams as it may (per flow or in all).
    #[error("UDP hold full")]
    UdpHoldFull,
    /// A plain datagram from the peer while our SYN control awaits its answer.
    #[error("UDP datagram before the handshake completed")]
    UdpHandshakePending,
    /// Our SYN control got no answer from a peer whose agent answered recently (loss or load,
    /// not a peer without agent): the datagrams held for the flow are dropped, and the
    /// application's next datagram starts a new handshake.
    #[error("UDP handshake with a known agent unanswered")]
    UdpNoAnswer,
    /// The server agent refused our UDP flow (its ingress policy denies it).
    #[error("UDP flow refused by the peer's agent")]
    UdpRefused,
    /// The server's agent sent its SYN-ACK again for a UDP flow whose handshake our agent no
    /// longer holds: our ACK was lost, and our state of the flow lingered out before the
    /// server's next request for it got through. The flow's AUTH connmark is cleared, so the
    /// application's next datagram starts a new handshake instead of going, marked, to a
    /// server that waits for an ACK no one will send.
    #[error("UDP handshake's ACK lost, flow unmarked to start again")]
    UdpAckLost,
    /// The server's agent holds no handshake for a UDP flow that is marked here (the server
    /// workload restarted, or its conntrack entry of the flow expired before ours) and refused
    /// a datagram of it: the flow's AUTH connmark is cleared, so the next datagram starts a new
    /// handshake.
    #[error("UDP flow unknown to the peer's agent, unmarked to start again")]
    UdpRestart,
    /// A SYN-ACK without a token in answer to a bound SYN: the node the SYN was bound for has an
    /// agent, which answers with a token (a retransmitted SYN-ACK too: the rules queue SYN-ACKs
    /// even on a marked flow); a token-less SYN-ACK there comes from an agent that forgot the
    /// flow, or is a forgery, never a server without an agent to decide on its address. The client kernel
    /// re-sends its SYN, which then goes plain.
    #[error("token-less SYN-ACK in answer to a bound SYN")]
    BoundSynAckWithoutToken,
    /// A token on a packet where none belongs (e.g. data after the handshake, a pure ACK on the
    /// client side, a different ACK token on an authorized flow).
    #[error("unexpected token")]
    UnexpectedToken,
    /// A packet between a workload that requires encryption and another node's pod that did
    /// not go through the tunnel between nodes (queued by the node's guard rules, see
    /// [`crate::shell::encrypted`]; [`Processor::refuse_unencrypted`]).
    #[error(
        "a cross-node packet of a workload that requires encryption did not go through the tunnel"
    )]
    NotEncrypted,
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
            Reason::FlowCut => "flow_cut",
            Reason::FlowTableFull => "flow_table_full",
            Reason::UnknownWorkload => "unknown_workload",
            Reason::OptionFromWorkload => "option_from_workload",
            Reason::UnexpectedToken => "unexpected_token",
            Reason::BoundSynAckWithoutToken => "bound_syn_ack_without_token",
            Reason::AckMismatch => "ack_mismatch",
            Reason::SpoofedSource => "spoofed_source",
            Reason::UdpControl(_) => "udp_control_malformed",
            Reason::UdpUnauthenticated => "udp_unauthenticated",
            Reason::UdpHoldFull => "udp_hold_full",
            Reason::UdpHandshakePending => "udp_handshake_pending",
            Reason::UdpNoAnswer => "udp_no_answer",
            Reason::UdpRefused => "udp_refused",
            Reason::UdpAckLost => "udp_ack_lost",
            Reason::UdpRestart => "udp_restart",
            Reason::NotEncrypted => "not_encrypted",
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
    /// Clear the authorization mark from the connmark: the shell issues a Repeat verdict with
    /// nfmark |= [`reauth_mark`]`(auth_mark)`, and the rules clear AUTH, so the flow's next
    /// packets are queued again (the client's duplicate ACK after a lost ACK token). Only ever
    /// set together with `accept`, never with `mark_authorized`.
    pub unmark: bool,
    /// Decide later: the shell issues a Repeat verdict without changing the mark, so the
    /// packet goes through the rules again and comes back at the tail of the queue (or passes,
    /// if the flow was marked meanwhile). Only ever set together with `accept`.
    pub requeue: bool,
    /// With `requeue`: not at once but after a short pause (the shell keeps the packet,
    /// unanswered, about [`crate::shell::queue::PAUSE`]; at most
    /// [`crate::shell::queue::MAX_PAUSED`] per queue, beyond which it requeues at once). For a
    /// UDP datagram whose flow's ACK control was asked for again: the answer takes a round
    /// trip, which requeues at once would spin through in microseconds.
    pub pause: bool,
    /// Why the packet was dropped or rewritten (counted in the metrics); `None` for a plain accept.
    pub reason: Option<Reason>,
    /// A dropped packet (a UDP control datagram the processor consumed, at INPUT) that settles
    /// its flow's connmark on the way out: `Some(true)` sets AUTH (the server's agent proved the
    /// client at its ACK: the flow is marked there and then, whichever datagram comes next and
    /// however late), `Some(false)` clears it (the client's agent no longer knows a handshake
    /// the server still waits on: the flow's next datagram is queued and starts a new one). The
    /// shell issues a Repeat verdict with the control bit ([`control_mark`]) in the mark, plus
    /// AUTH for `Some(true)`; the rules copy the AUTH bit into the connmark and drop the packet.
    /// Only ever set with `accept == false`.
    pub connmark_on_drop: Option<bool>,
}

impl Verdict {
    /// Accept, optionally modified.
    pub fn accept(modified: bool) -> Self {
        Verdict {
            accept: true,
            modified,
            ..Verdict::consumed()
        }
    }
    /// Accept and mark the flow authorized.
    pub fn authorize(modified: bool) -> Self {
        Verdict {
            mark_authorized: true,
            ..Verdict::accept(modified)
        }
    }
    /// Accept and clear the authorization mark (see [`Verdict::unmark`]).
    pub fn reopen(modified: bool) -> Self {
        Verdict {
            unmark: true,
            ..Verdict::accept(modified)
        }
    }
    /// Send the packet back to the tail of the queue (see [`Verdict::requeue`]).
    pub fn requeue() -> Self {
        Verdict {
            requeue: true,
            ..Verdict::accept(false)
        }
    }
    /// Send the packet back to the queue after a pause (see [`Verdict::pause`]).
    pub fn requeue_after_pause() -> Self {
        Verdict {
            pause: true,
            ..Verdict::requeue()
        }
    }
    /// Drop without a reason: the processor took the packet (a control datagram it consumed,
    /// or an application datagram it holds and will send itself, see [`Processor::take_outgoing`]).
    pub fn consumed() -> Self {
        Verdict {
            accept: false,
            modified: false,
            mark_authorized: false,
            unmark: false,
            requeue: false,
            pause: false,
            reason: None,
            connmark_on_drop: None,
        }
    }
    /// Drop with a reason.
    pub fn drop(reason: Reason) -> Self {
        Verdict {
            reason: Some(reason),
            ..Verdict::consumed()
        }
    }
    /// Consume a control datagram and set (`true`) or clear the flow's AUTH connmark bit on the
    /// way (see [`Verdict::connmark_on_drop`]); with a reason, the drop is counted.
    pub fn consume_marking(authorized: bool, reason: Option<Reason>) -> Self {
        Verdict {
            reason,
            connmark_on_drop: Some(authorized),
            ..Verdict::consumed()
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
    workloads: ahash::HashMap<WorkloadId, WorkloadEntry>,
    flows: FlowTable,
    metrics: Metrics,
    /// Policy views of peer claims already seen, with the peer's pod (performance only;
    /// bounded, cleared when full).
    peers: ahash::HashMap<Claims, PeerView>,
    /// Authorized flows, for [`Processor::recheck`].
    established: EstablishedTable,
    /// Flows cut by [`Processor::recheck`]: their packets become RSTs.
    cut: CutSet,
    /// The shared view of every IP-only peer.
    ip_only: Arc<Peer>,
    /// Last time [`Processor::prune_due`] said yes.
    last_prune_ms: u64,
    /// UDP flows in handshake, and what they hold.
    udp: UdpTable,
    answers: Answers,
    /// Datagrams to send, in order (see [`Processor::take_outgoing`]).
    outgoing: Vec<Outgoing>,
    /// What the processor learned of peer addresses: whether an agent answers there, until when.
    peer_agents: PeerAgents,
    /// The keys of the enforced workloads (to know a same-node peer by its address).
    local_keys: ahash::HashSet<PodKey>,
    /// What each workload resolved through DNS (for admin `domainNames` peers).
    dns: NameCache,
    /// The resolvers whose answers are learnt (empty: any).
    dns_servers: Vec<ipnet::IpNet>,
    /// Flow records and the per-policy verdict counts (see [`crate::flowlog`]).
    flowlog: FlowLog,
    /// The nodes behind peers' addresses, for bound SYNs.
    bound: BoundPeers,
}

/// A peer's policy view and pod, shared by every flow with it.
type PeerView = (Arc<Peer>, Arc<PodKey>);

/// Entries of the processor's peer view cache before it starts over.
const PEER_CACHE_ENTRIES: usize = 4096;

impl Processor {
    /// A processor over a node's keys and a policy engine.
    pub fn new(node: Node, engine: Engine, config: ProcessorConfig) -> Self {
        let flowlog = FlowLog::new(node.name(), FlowLogConfig::default());
        Processor {
            node,
            engine,
            flows: FlowTable::new(config.max_flows, config.client_idle_ms),
            config,
            workloads: Default::default(),
            metrics: Metrics::default(),
            peers: Default::default(),
            established: EstablishedTable::new(config.max_established),
            cut: CutSet::new(config.max_established),
            ip_only: Arc::new(Peer::IpOnly),
            last_prune_ms: 0,
            udp: UdpTable::default(),
            answers: Answers::default(),
            outgoing: Vec::new(),
            peer_agents: Default::default(),
            local_keys: Default::default(),
            dns: NameCache::new(config.dns),
            dns_servers: Vec::new(),
            flowlog,
            bound: BoundPeers::default(),
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
        self.local_keys.insert(key.clone());
        if let Some(old) = self.workloads.insert(id, WorkloadEntry { key, claims })
            && !self.workloads.values().any(|w| w.key == old.key)
        {
            self.local_keys.remove(&old.key);
        }
    }

    /// Stop enforcing a workload: forget it and all its flows (the engine is left alone).
    pub fn remove_workload(&mut self, id: WorkloadId) {
        if let Some(old) = self.workloads.remove(&id)
            && !self.workloads.values().any(|w| w.key == old.key)
        {
            self.local_keys.remove(&old.key);
        }
        self.udp.remove_workload(id);
        self.flows.remove_workload(id);
        self.established.remove_workload(id);
        self.cut.remove_workload(id);
        self.dns.remove_workload(id);
        self.update_flow_metrics();
        self.update_established_metrics();
        self.update_dns_metrics();
    }

    /// Whether `id` is enforced.
    pub fn has_workload(&self, id: WorkloadId) -> bool {
        self.workloads.contains_key(&id)
    }

    /// A DNS answer that arrives at workload `id` on a UDP flow the workload opened to port 53
    /// and that its agent already authorized (the rules queue those on a queue of their own,
    /// [`RuleConfig::dns_queue_num`](crate::shell::RuleConfig::dns_queue_num)): learn which
    /// addresses it resolved for which names, until their TTL runs out, for the workload's
    /// later egress decisions (admin `domainNames` peers). The verdict is always a plain
    /// accept: the answer belongs to an authorized flow and passes as it would have without
    /// being looked at. Counted in `tessera_dns_answers_total{result}`: `learnt`,
    /// `no_address` (a valid answer without A/AAAA records for the question), or why nothing
    /// was learnt ([`crate::dns::DnsError::as_str`], `untrusted_server`, `unknown_workload`,
    /// `not_dns`, a packet error).
    pub fn learn_dns_answer(&mut self, id: WorkloadId, packet: &[u8], now_ms: u64) -> Verdict {
        let result = match self.learn_dns(id, packet, now_ms) {
            Ok(0) => "no_address",
            Ok(_) => "learnt",
            Err(reason) => reason,
        };
        self.metrics.count_dns_answer(result);
        self.update_dns_metrics();
        Verdict::accept(false)
    }

    fn learn_dns(
        &mut self,
        id: WorkloadId,
        packet: &[u8],
        now_ms: u64,
    ) -> Result<usize, &'static str> {
        if !self.workloads.contains_key(&id) {
            return Err(Reason::UnknownWorkload.as_str());
        }
        let d = IpDatagram::parse(packet).map_err(|e| e.as_str())?;
        if d.protocol != Protocol::Udp.ip_number() || d.src_port != 53 {
            return Err("not_dns");
        }
        if !self.dns_servers.is_empty() && !self.dns_servers.iter().any(|n| n.contains(&d.src)) {
            return Err("untrusted_server");
        }
        let payload = udp_payload(packet, &d).map_err(|e| e.as_str())?;
        let answer = dns::parse_answer(payload).map_err(dns::DnsError::as_str)?;
        let names: Vec<Arc<str>> = answer.names.iter().map(|n| Arc::from(n.as_str())).collect();
        for r in &answer.resolved {
            if let Some(name) = names.get(r.name) {
                self.dns.insert(id, r.ip, name, r.ttl_s, now_ms);
            }
        }
        Ok(answer.resolved.len())
    }

    /// Learn only the answers of these resolvers (addresses or ranges, as the workloads see
    /// the answer's source: the cluster DNS Service address, a node-local cache, or, where
    /// Services are translated at the socket, the resolver pods' range). Empty (the default):
    /// answers from any address are learnt, so a workload allowed to query a DNS server of its
    /// choosing can make any address stand for any name in its own egress decisions
    /// (docs/threat-model.md).
    pub fn set_dns_servers(&mut self, servers: Vec<ipnet::IpNet>) {
        self.dns_servers = servers;
    }

    /// The resolvers whose answers are learnt (empty: any).
    pub fn dns_servers(&self) -> &[ipnet::IpNet] {
        &self.dns_servers
    }

    /// The names workload `id` resolved to `ip` whose TTL has not run out at `now_ms`, sorted:
    /// what its egress decisions to `ip` carry (for status pages and tests).
    pub fn resolved_names(&self, id: WorkloadId, ip: IpAddr, now_ms: u64) -> Vec<String> {
        self.dns.names_vec(id, ip, now_ms)
    }

    /// (workload, address, name) entries in the DNS name cache.
    pub fn dns_cache_len(&self) -> usize {
        self.dns.len()
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
        let (verdict, kind) = self
            .with_step(id, now_ms, |step| {
                step.run(hook, packet, checksum_ready, rng)
            })
            .unwrap_or((Verdict::drop(Reason::UnknownWorkload), None));
        if let Some(reason) = &verdict.reason {
            self.metrics.count_rejected(reason.as_str());
            self.note_rejection(id, hook, packet, reason, now_ms);
        }
        if verdict.requeue {
            self.metrics.count_requeued();
        }
        if verdict.accept
            && !verdict.requeue
            && let Some(kind) = kind
        {
            self.metrics.count_accepted(hook, kind);
        }
        self.update_flow_metrics();
        self.update_established_metrics();
        verdict
    }

    /// The datagrams the processor wants sent, in order, since the last call: UDP control
    /// datagrams and released application datagrams. The shell sends each from its
    /// workload's netns with the mark [`Outgoing::mark`] asks for ([`control_mark`] or the
    /// AUTH mark), right after the verdicts of the batch that made them.
    pub fn take_outgoing(&mut self) -> Vec<Outgoing> {
        std::mem::take(&mut self.outgoing)
    }

    /// When [`Processor::poll_udp`] has something to do next (a UDP handshake to retry or to
    /// give up), if anything.
    pub fn next_udp_timer(&self) -> Option<u64> {
        self.udp.next_timer()
    }

    /// UDP handshakes whose time has come: re-send the SYN control (its wait doubles), or,
    /// after `udp_hello_tries`, take the peer as agentless (remembered for
    /// `udp_agentless_ms`) and decide the flow on its address: the held datagrams are
    /// released or dropped. Then call [`Processor::take_outgoing`].
    pub fn poll_udp<R: CryptoRng + ?Sized>(&mut self, now_ms: u64, rng: &mut R) {
        let due = self.udp.due(now_ms);
        for key in due {
            if self
                .with_step(key.workload, now_ms, |step| step.udp_timer(key, rng))
                .is_none()
            {
                self.udp.remove(&key);
            }
        }
    }

    /// Run `f` on the step of workload `id` at time `now_ms` (`None`: unknown workload).
    fn with_step<T>(
        &mut self,
        id: WorkloadId,
        now_ms: u64,
        f: impl FnOnce(&mut Step<'_>) -> T,
    ) -> Option<T> {
        let Processor {
            node,
            engine,
            config,
            workloads,
            flows,
            metrics,
            peers,
            established,
            cut,
            ip_only,
            last_prune_ms: _,
            udp,
            answers,
            outgoing,
            peer_agents,
            local_keys,
            dns,
            dns_servers: _,
            flowlog,
            bound,
        } = self;
        let wl = workloads.get(&id)?;
        let mut step = Step {
            node,
            engine,
            config,
            flows,
            metrics,
            wl,
            peers,
            established,
            cut,
            ip_only,
            udp,
            answers,
            outgoing,
            peer_agents,
            local_keys,
            dns,
            flowlog,
            bound,
            id,
            now: now_ms,
        };
        Some(f(&mut step))
    }

    /// Forget handshake flows past their deadline, cut flows past
    /// [`ProcessorConfig::cut_remember_ms`], and replay-cache entries the timestamp window
    /// refuses anyway. Call it periodically (e.g. every second).
    pub fn expire(&mut self, now_ms: u64) {
        self.node.expire_replay(now_ms);
        self.flows.expire(now_ms);
        self.cut.expire(now_ms);
        let dropped = self.udp.expire(now_ms);
        for _ in 0..dropped {
            self.metrics.count_rejected(Reason::UdpHoldFull.as_str());
        }
        self.peer_agents.expire(now_ms);
        self.dns.expire(now_ms);
        self.update_flow_metrics();
        self.update_established_metrics();
        self.update_dns_metrics();
    }

    fn update_flow_metrics(&mut self) {
        let (tcp, udp) = (self.flows.evictor.evicted, self.udp.evictor.evicted);
        self.metrics.set_flows(
            (self.flows.len(), self.udp.len()),
            tcp.network + udp.network,
            tcp.workload + udp.workload,
        );
    }

    fn update_dns_metrics(&mut self) {
        self.metrics
            .set_dns_cache(self.dns.len(), self.dns.evicted(), self.dns.expired());
    }

    fn update_established_metrics(&mut self) {
        self.metrics
            .set_established(self.established.len(), self.cut.len());
        self.metrics
            .set_established_dropped(self.established.evicted, self.established.pruned);
    }

    /// Re-evaluate every remembered authorized flow against the current engine (call it after
    /// a change of policies, namespace labels or workload labels) and return the ones it now
    /// denies. They are forgotten (handshake state included, so nothing can re-authorize them)
    /// and remembered as cut for [`ProcessorConfig::cut_remember_ms`]: their next packet, once
    /// the shell has deleted the flow's conntrack entry (and with it the AUTH connmark), reaches
    /// the queue and is rewritten into a RST ([`Reason::FlowCut`]). Counted in
    /// `tessera_flows_cut_total{reason}`.
    ///
    /// A peer with a verified identity is judged as it proved itself at the handshake and, if
    /// the engine knows its pod (same node, or a cluster-wide view), also with the pod's
    /// current labels: the flow is cut if either is denied (fresher knowledge only ever cuts).
    pub fn recheck(&mut self, now_ms: u64) -> Vec<Cut> {
        let mut cuts = Vec::new();
        if self.config.audit {
            // Audit mode applies no denial, to new flows or established ones.
            return cuts;
        }
        // The current identity of each peer pod, built once per recheck (flows with the same
        // peer share its `Arc<PodKey>` from the peer cache; keyed by address).
        let mut current: HashMap<usize, Option<Peer>> = HashMap::new();
        for (key, f) in self.established.iter() {
            let Some(wl) = self.workloads.get(&key.workload) else {
                continue;
            };
            let port = match f.direction {
                Direction::Ingress => key.local.port(),
                Direction::Egress => key.remote.port(),
            };
            let protocol = key.protocol;
            // The names the workload had resolved to the peer when the flow was authorized: a
            // flow is not cut because their TTL ran out since, only if policy now denies them.
            let mut names = [""; MAX_NAMES_PER_ADDRESS];
            for (slot, name) in names.iter_mut().zip(f.resolved_names.iter()) {
                *slot = name;
            }
            let resolved_names = &names[..f.resolved_names.len().min(MAX_NAMES_PER_ADDRESS)];
            let allows = |peer: &Peer| {
                self.engine.allows(&Connection {
                    local: &wl.key,
                    direction: f.direction,
                    peer,
                    peer_ip: Some(key.remote.ip()),
                    port,
                    protocol,
                    dest_port_name: f.port_name.as_deref(),
                    resolved_names,
                })
            };
            let mut allowed = allows(&f.peer);
            if allowed && let Some(pod) = &f.peer_pod {
                let now = current
                    .entry(Arc::as_ptr(pod) as usize)
                    .or_insert_with(|| self.engine.identity(pod).map(Peer::Workload));
                if let Some(peer) = now {
                    allowed = allows(peer);
                }
            }
            if !allowed {
                cuts.push(Cut {
                    workload: key.workload,
                    protocol: key.protocol,
                    local: key.local,
                    remote: key.remote,
                    direction: f.direction,
                    reason: match f.direction {
                        Direction::Ingress => CutReason::PolicyIngress,
                        Direction::Egress => CutReason::PolicyEgress,
                    },
                });
            }
        }
        let until = now_ms.saturating_add(self.config.cut_remember_ms);
        for c in &cuts {
            let key = FlowKey {
                workload: c.workload,
                protocol: c.protocol,
                local: c.local,
                remote: c.remote,
            };
            if let Some(f) = self.established.remove(&key) {
                self.note_cut(&key, &f, now_ms);
            }
            self.flows.remove(&key);
            // A UDP flow's lingering handshake state would authorize its next datagram again.
            self.udp.remove(&key);
            self.cut.insert(key, until, now_ms);
            self.metrics.count_cut(c.reason.as_str());
        }
        self.update_flow_metrics();
        self.update_established_metrics();
        cuts
    }

    /// The workloads whose conntrack table the shell should list now, for [`Processor::prune`]
    /// (`None` until [`ProcessorConfig::prune_interval_ms`] has passed since the last time, or
    /// when no flow is remembered).
    pub fn prune_due(&mut self, now_ms: u64) -> Option<Vec<WorkloadId>> {
        if now_ms
            < self
                .last_prune_ms
                .saturating_add(self.config.prune_interval_ms)
        {
            return None;
        }
        self.last_prune_ms = now_ms;
        let ids = self.established.workloads();
        (!ids.is_empty()).then_some(ids)
    }

    /// Forget the remembered flows of workload `id` that are gone: authorized before
    /// `listed_from_ms` (when the listing began) and absent from `alive`, the (source,
    /// destination) pairs of the entries of the workload netns's conntrack table, by protocol. Returns
    /// how many were forgotten (`tessera_established_pruned_total`).
    pub fn prune(
        &mut self,
        id: WorkloadId,
        listed_from_ms: u64,
        alive: &std::collections::HashSet<(Protocol, SocketAddr, SocketAddr)>,
    ) -> usize {
        let n = self.established.prune(id, listed_from_ms, alive);
        self.update_established_metrics();
        n
    }

    /// Authorized flows currently remembered for [`Processor::recheck`].
    pub fn established_count(&self) -> usize {
        self.established.len()
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

/// The borrows one `process` call works with.
struct Step<'a> {
    node: &'a mut Node,
    engine: &'a Engine,
    config: &'a ProcessorConfig,
    flows: &'a mut FlowTable,
    metrics: &'a mut Metrics,
    wl: &'a WorkloadEntry,
    peers: &'a mut ahash::HashMap<Claims, PeerView>,
    established: &'a mut EstablishedTable,
    cut: &'a mut CutSet,
    ip_only: &'a Arc<Peer>,
    udp: &'a mut UdpTable,
    answers: &'a mut Answers,
    outgoing: &'a mut Vec<Outgoing>,
    peer_agents: &'a mut PeerAgents,
    local_keys: &'a ahash::HashSet<PodKey>,
    dns: &'a NameCache,
    flowlog: &'a mut FlowLog,
    bound: &'a mut BoundPeers,
    id: WorkloadId,
    now: u64,
}

fn kind_of(seg: &TcpSegment) -> PacketKind {
    if seg.is_rst() {
        PacketKind::Rst
    } else if seg.is_syn() {
        if seg.has_ack() {
            PacketKind::SynAck
        } else {
            PacketKind::Syn
        }
    } else if seg.has_ack() && !seg.is_fin() && seg.data_len() == 0 {
        PacketKind::Ack
    } else {
        PacketKind::Other
    }
}

/// Whether a RST from the peer plausibly belongs to the flow in `state`: it acknowledges our
/// SYN (client, before the SYN-ACK), or sits at the peer's next sequence number.
fn rst_fits(state: &FlowState, seg: &TcpSegment) -> bool {
    match state {
        FlowState::ClientSynSent { isn, .. } => seg.has_ack() && seg.ack == isn.wrapping_add(1),
        FlowState::ClientAckPending { server_isn, .. }
        | FlowState::ClientAckSent { server_isn, .. }
        | FlowState::ClientVerified { server_isn } => seg.seq == server_isn.wrapping_add(1),
        FlowState::ServerSynReceived { isn, .. }
        | FlowState::ServerAwaitingAck { isn, .. }
        | FlowState::ServerBound { isn, .. }
        | FlowState::ServerBoundAnswered { isn, .. }
        | FlowState::ServerTokenless { isn } => seg.seq == isn.wrapping_add(1),
        FlowState::Authorized { .. } => true,
    }
}

/// The source of a TCP segment as a bound SYN's MAC covers it (the client's side: the segment
/// is a SYN).
fn tcp_source(seg: &TcpSegment) -> FlowSource {
    FlowSource {
        addr: seg.src,
        port: seg.src_port,
        protocol: IpNextHeaderProtocols::Tcp.0,
    }
}

/// The source of a UDP flow as a bound SYN's MAC covers it: the client's address and port.
fn udp_source(client: SocketAddr) -> FlowSource {
    FlowSource {
        addr: client.ip(),
        port: client.port(),
        protocol: IpNextHeaderProtocols::Udp.0,
    }
}

/// The protocol of a flow whose source a bound SYN covers (TCP or UDP).
fn protocol_of(source: &FlowSource) -> Protocol {
    if source.protocol == IpNextHeaderProtocols::Udp.0 {
        Protocol::Udp
    } else {
        Protocol::Tcp
    }
}

/// The policy view of a handshake identity.
fn peer_of(p: &PeerIdentity) -> Peer {
    Peer::Workload(WorkloadIdentity {
        namespace: p.claims.namespace().to_owned(),
        namespace_labels: p.claims.namespace_labels().clone(),
        labels: p.claims.labels().clone(),
    })
}

/// An error making our own token: local (our claims / port name) or about the peer's key.
fn local_error(e: HandshakeError) -> Reason {
    match e {
        HandshakeError::LocalClaims(_) => Reason::LocalHandshake(e),
        other => Reason::Handshake(other),
    }
}

fn modified_or(result: Result<(), PacketError>, ok: Verdict) -> Verdict {
    match result {
        Ok(()) => ok,
        Err(e) => Verdict::drop(Reason::Packet(e)),
    }
}

impl Step<'_> {
    fn run<R: CryptoRng + ?Sized>(
        &mut self,
        hook: Hook,
        packet: &mut Vec<u8>,
        checksum_ready: bool,
        rng: &mut R,
    ) -> (Verdict, Option<PacketKind>) {
        let datagram = match IpDatagram::parse(packet) {
            Err(e) => return (Verdict::drop(Reason::Packet(e)), None),
            Ok(d) => d,
        };
        let protocol = Protocol::from_ip(datagram.protocol);
        let kind = PacketKind::of_protocol(protocol);
        if hook == Hook::Output && !self.own_source(datagram.src) {
            // The workload sends with an address that is not its own (a raw socket): it would
            // borrow another workload's identity wherever peers are judged by address.
            return (Verdict::drop(Reason::SpoofedSource), Some(kind));
        }
        if protocol == Protocol::Udp {
            return (self.udp(hook, &datagram, packet, rng), Some(kind));
        }
        if protocol != Protocol::Tcp {
            return (self.datagram(hook, protocol, &datagram), Some(kind));
        }
        let seg = match TcpSegment::parse(packet) {
            Err(e) => return (Verdict::drop(Reason::Packet(e)), None),
            Ok(None) => {
                return (
                    Verdict::drop(Reason::Packet(PacketError::OptionState("not TCP"))),
                    None,
                );
            }
            Ok(Some(seg)) => seg,
        };
        let kind = kind_of(&seg);
        if hook == Hook::Input && checksum_ready && !seg.tcp_checksum_ok(packet) {
            return (Verdict::drop(Reason::BadChecksum), Some(kind));
        }
        let src = SocketAddr::new(seg.src, seg.src_port);
        let dst = SocketAddr::new(seg.dst, seg.dst_port);
        let key = match hook {
            Hook::Output => FlowKey {
                workload: self.id,
                protocol: Protocol::Tcp,
                local: src,
                remote: dst,
            },
            Hook::Input => FlowKey {
                workload: self.id,
                protocol: Protocol::Tcp,
                local: dst,
                remote: src,
            },
        };
        if hook == Hook::Output && seg.has_option() {
            // Only we attach tokens; a workload sending our option tries to forge one.
            return (Verdict::drop(Reason::OptionFromWorkload), Some(kind));
        }
        if seg.is_syn() && !seg.has_ack() {
            // A new connection on the tuple of a cut one (port reuse) starts afresh.
            self.cut.remove(&key);
        } else if !seg.is_rst()
            && self.flows.live_mut(&key, self.now).is_none()
            && let Some(state) = self.cut.get_mut(&key, self.now)
        {
            // A flow cut by a policy change (its conntrack entry, and with it the AUTH
            // connmark, was deleted): its payload never passes. The first packet each way
            // becomes a RST at the packet's own sequence numbers, which the receiving socket
            // accepts (INPUT: the local socket; OUTPUT: the peer's). Later packets that way
            // become bare ACKs, so the receiving kernel, whose socket is gone, answers the
            // sender with a RST: both applications learn of the cut.
            let sent = match hook {
                Hook::Input => &mut state.local_reset,
                Hook::Output => &mut state.remote_reset,
            };
            let rewrite = if *sent {
                packet::rewrite_to_ack(packet, &seg)
            } else {
                *sent = true;
                packet::rewrite_to_rst(packet, &seg)
            };
            let verdict = match rewrite {
                Ok(()) => Verdict {
                    reason: Some(Reason::FlowCut),
                    ..Verdict::accept(true)
                },
                Err(_) => Verdict::drop(Reason::FlowCut),
            };
            return (verdict, Some(kind));
        }
        let verdict = if seg.is_rst() {
            // A RST ends the handshake: our own kernel's always, the peer's if it fits the
            // flow's sequence numbers (a blind RST must not wipe the state of a handshake the
            // kernel will go on with). The kernel decides whether it is valid.
            let forget = hook == Hook::Output
                || self
                    .flows
                    .live_mut(&key, self.now)
                    .is_none_or(|f| rst_fits(&f.state, &seg));
            if forget {
                self.flows.remove(&key);
            }
            Verdict::accept(false)
        } else {
            match (hook, seg.is_syn(), seg.has_ack()) {
                (Hook::Output, true, false) => self.client_syn(key, &seg, packet, rng),
                (Hook::Input, true, false) => self.server_syn(key, &seg, packet),
                (Hook::Output, true, true) => self.server_syn_ack(key, &seg, packet, rng),
                (Hook::Input, true, true) => self.client_syn_ack(key, &seg, packet),
                (Hook::Output, false, _) => self.output_other(key, &seg, packet),
                (Hook::Input, false, _) => self.input_other(key, &seg, packet),
            }
        };
        (verdict, Some(kind))
    }

    /// Whether `src` may be the source of a packet the workload sends: one of its addresses
    /// (any address of a family the engine knows none of for it: an inventory may list only
    /// IPv4), or an address that is never routed beyond the link (IPv6 link-local,
    /// unspecified).
    fn own_source(&self, src: IpAddr) -> bool {
        let Some(w) = self.engine.workload(&self.wl.key) else {
            return true;
        };
        let mut same_family = w.ips.iter().filter(|ip| ip.is_ipv4() == src.is_ipv4());
        if same_family.clone().next().is_none()
            || same_family.any(|ip| *ip == src)
            || src.is_unspecified()
        {
            return true;
        }
        match src {
            IpAddr::V6(v6) => v6.is_unicast_link_local(),
            IpAddr::V4(_) => false,
        }
    }

    /// Whether the peer at `ip` is to be proven by a UDP handshake: an agent answered there
    /// recently, or it is a workload of this node; or we do not know yet and the address is a
    /// private one (where cluster workloads live). Public addresses and peers that did not
    /// answer recently are decided on their address at once, without a wait.
    fn udp_authenticate(&self, ip: IpAddr) -> bool {
        if let Some(agent) = self.peer_agents.get(&ip, self.now) {
            return agent;
        }
        if self.is_local_workload(ip) {
            return true;
        }
        match ip {
            IpAddr::V4(v4) => {
                v4.is_private() || (v4.octets()[0] == 100 && v4.octets()[1] & 0xC0 == 64)
            }
            IpAddr::V6(v6) => v6.is_unique_local(),
        }
    }

    /// Whether a plain datagram from `ip` must be refused: its sender has an agent (a workload
    /// of this node, or an address whose agent answered recently), which would have proven it.
    fn udp_requires_handshake(&self, ip: IpAddr) -> bool {
        self.is_local_workload(ip) || self.peer_agents.get(&ip, self.now) == Some(true)
    }

    fn is_local_workload(&self, ip: IpAddr) -> bool {
        self.engine
            .workload_by_ip(&ip)
            .is_some_and(|w| self.local_keys.contains(&w.key))
    }

    fn learn_agent(&mut self, ip: IpAddr, agent: bool) {
        let ttl = if agent {
            self.config.udp_agent_ms
        } else {
            self.config.udp_agentless_ms
        };
        self.peer_agents
            .learn(ip, agent, self.now, self.now.saturating_add(ttl));
    }

    /// Queue a UDP datagram from `from` to `to` for the shell to send from this workload.
    fn emit_udp(&mut self, from: SocketAddr, to: SocketAddr, payload: &[u8], mark: EmitMark) {
        match build_udp(from, to, payload) {
            Ok(packet) => self.outgoing.push(Outgoing {
                workload: self.id,
                packet,
                mark,
            }),
            Err(e) => self.metrics.count_rejected(Reason::Packet(e).as_str()),
        }
    }

    /// A control datagram of `kind` carrying `token` from this workload's side of `key`.
    fn emit_control(&mut self, key: &FlowKey, kind: u8, token: &[u8]) -> Option<Box<[u8]>> {
        let control = identity::encode_udp_control(kind, token)?;
        self.emit_udp(key.local, key.remote, &control, EmitMark::Control);
        Some(control.into_boxed_slice())
    }

    /// A UDP packet of the workload (OUTPUT) or to it (INPUT). Control datagrams (the magic
    /// at the start of the payload) are the agents' handshake; the others are the
    /// application's, held while their flow's handshake runs.
    fn udp<R: CryptoRng + ?Sized>(
        &mut self,
        hook: Hook,
        d: &IpDatagram,
        packet: &[u8],
        rng: &mut R,
    ) -> Verdict {
        let (local, remote) = match hook {
            Hook::Output => (
                SocketAddr::new(d.src, d.src_port),
                SocketAddr::new(d.dst, d.dst_port),
            ),
            Hook::Input => (
                SocketAddr::new(d.dst, d.dst_port),
                SocketAddr::new(d.src, d.src_port),
            ),
        };
        let key = FlowKey {
            workload: self.id,
            protocol: Protocol::Udp,
            local,
            remote,
        };
        let control = match udp_payload(packet, d) {
            Err(e) => return Verdict::drop(Reason::Packet(e)),
            Ok(payload) => match identity::parse_udp_control(payload) {
                Err(e) => return Verdict::drop(Reason::UdpControl(e)),
                Ok(c) => c.map(|(kind, token)| (kind, token.to_vec())),
            },
        };
        match (hook, control) {
            // Only agents send control datagrams, and ours leave without being queued.
            (Hook::Output, Some(_)) => Verdict::drop(Reason::OptionFromWorkload),
            (
                Hook::Input,
                Some((identity::wire::TYPE_SYN | identity::wire::TYPE_SYN_BOUND, token)),
            ) => self.udp_server_syn(key, &token, rng),
            (
                Hook::Input,
                Some((identity::wire::TYPE_SYN_ACK | identity::wire::TYPE_SYN_ACK_BOUND, token)),
            ) => self.udp_client_syn_ack(key, &token),
            (Hook::Input, Some((identity::wire::TYPE_ACK, token))) => {
                self.udp_server_ack(key, &token)
            }
            (Hook::Input, Some((identity::wire::TYPE_UDP_RESTART, _))) => self.udp_restart(key),
            (Hook::Input, Some((_, token))) => self.udp_refused(key, &token),
            (Hook::Output, None) => self.udp_output(key, d, packet, rng),
            (Hook::Input, None) => self.udp_input(key, d),
        }
    }

    /// Hold an application datagram of a flow in handshake (a copy: the queued packet is
    /// dropped, the shell sends the copy once the flow is authorized).
    fn udp_hold(&mut self, key: &FlowKey, packet: &[u8]) -> Verdict {
        let max_flow = self.config.udp_held_per_flow;
        let room = self
            .udp
            .may_hold(key.workload, packet.len(), &self.config.udp_held);
        match self.udp.get_mut(key) {
            Some(UdpFlow {
                state: UdpState::ClientHello { held, .. },
                ..
            }) if room && held.len() < max_flow => {
                held.push(packet.to_vec());
                let one = Held {
                    count: 1,
                    bytes: packet.len(),
                };
                self.udp.count_held(key.workload, one, 1);
                Verdict::consumed()
            }
            _ => Verdict::drop(Reason::UdpHoldFull),
        }
    }

    /// An application datagram the local workload sends on a flow not marked yet.
    fn udp_output<R: CryptoRng + ?Sized>(
        &mut self,
        key: FlowKey,
        d: &IpDatagram,
        packet: &[u8],
        rng: &mut R,
    ) -> Verdict {
        match self.udp.get(&key).map(|f| &f.state) {
            Some(UdpState::ClientHello { .. }) => return self.udp_hold(&key, packet),
            Some(UdpState::ClientDone { .. }) => {
                // Authorized; its held datagrams may not have left yet: this one goes after them.
                self.outgoing.push(Outgoing {
                    workload: self.id,
                    packet: packet.to_vec(),
                    mark: EmitMark::Authorized,
                });
                return Verdict::consumed();
            }
            Some(UdpState::ServerAuthorized { .. } | UdpState::ServerBoundAnswered { .. }) => {
                return Verdict::authorize(false);
            }
            Some(UdpState::ServerAwaitingAck { .. }) => return Verdict::drop(Reason::AckMissing),
            None => {}
        }
        if !self.udp_authenticate(key.remote.ip()) {
            return self.datagram(Hook::Output, Protocol::Udp, d);
        }
        if !self.udp.has_room(self.config.udp_max_flows) {
            return Verdict::drop(Reason::FlowTableFull);
        }
        let mut nonce = [0u8; identity::wire::NONCE_LEN];
        rng.fill_bytes(&mut nonce);
        // Bound when a verified SYN-ACK from this address named its node, as for TCP.
        let (client, token, binding) =
            self.make_syn(key.remote.ip(), &udp_source(key.local), nonce);
        let kind = if binding.is_bound() {
            identity::wire::TYPE_SYN_BOUND
        } else {
            identity::wire::TYPE_SYN
        };
        let Some(syn) = self.emit_control(&key, kind, &token) else {
            return Verdict::drop(Reason::LocalHandshake(HandshakeError::Malformed(
                "SYN token too long for a control datagram",
            )));
        };
        self.udp.insert(
            key,
            UdpFlow::new(
                UdpState::ClientHello {
                    client,
                    syn,
                    binding,
                    held: Vec::new(),
                    tries: 1,
                    next_ms: self.now.saturating_add(self.config.udp_hello_rto_ms),
                },
                self.handshake_deadline(),
            ),
        );
        self.udp_hold(&key, packet)
    }

    /// An application datagram from the peer on a flow not marked yet.
    fn udp_input(&mut self, key: FlowKey, d: &IpDatagram) -> Verdict {
        let rto = self.config.udp_hello_rto_ms;
        let now = self.now;
        let mut resend = None;
        let verdict = match self.udp.get_mut(&key).map(|f| &mut f.state) {
            Some(
                UdpState::ServerAuthorized { .. }
                | UdpState::ServerBoundAnswered { .. }
                | UdpState::ClientDone { .. },
            ) => {
                return Verdict::authorize(false);
            }
            Some(UdpState::ServerAwaitingAck {
                synack,
                last_sent_ms,
                deferrals,
                ..
            }) => {
                // The client's data overtook its ACK, or the ACK was lost: send the SYN-ACK
                // again at once (the client's agent answers it with the same ACK; at the first
                // datagram, then at most every fifth of the SYN's retransmission time), and
                // look at this datagram again later: at most MAX_DEFERRALS times (bounded work
                // per datagram, even for a flood of data behind forged SYNs), then it is
                // dropped. The first datagram asks at once, even right behind the SYN-ACK: it
                // usually follows the ACK within microseconds, so the ACK is lost, and the
                // client's agent answers only while it still holds the handshake. Once at the
                // queue's tail (an ACK right behind it is decided first), then after pauses:
                // the answer to the SYN-ACK takes a round trip, which requeues at once would
                // spin through within one batch, dropping the datagram before it came.
                if *deferrals == 0 || now.saturating_sub(*last_sent_ms) >= (rto / 5).max(1) {
                    *last_sent_ms = now;
                    resend = Some(synack.clone());
                }
                *deferrals = deferrals.saturating_add(1);
                if *deferrals > MAX_DEFERRALS {
                    Verdict::drop(Reason::AckMissing)
                } else if *deferrals == 1 {
                    Verdict::requeue()
                } else {
                    Verdict::requeue_after_pause()
                }
            }
            Some(UdpState::ClientHello { binding, .. }) => {
                if binding.is_bound() {
                    // A plain answer to a bound SYN: its address's node was proven to have an
                    // agent, so this proves nothing about the peer (it is forged, or the
                    // address moved). Never taken as agentless here: the SYN's retransmission
                    // is plain, and a plain SYN's silence can lead there.
                    return Verdict::drop(Reason::BoundSynAckWithoutToken);
                }
                // A plain answer to our SYN control: the peer has no agent (an agent consumes
                // control datagrams), e.g. a resolver answering what it took for a malformed
                // query. Decide on its address now rather than after the retries; the answer
                // was to our control datagram, not to the application, so it is dropped.
                self.udp_give_up(key);
                return Verdict::drop(Reason::UdpHandshakePending);
            }
            None => {
                if self.udp_requires_handshake(key.remote.ip()) {
                    // Forged, or its flow is marked at the client while we hold nothing of it:
                    // this workload restarted (a fresh conntrack table), or its conntrack
                    // entry expired before the client's. Either way it is refused; the RESTART
                    // tells a genuine client's agent to clear its mark, so the next datagram
                    // starts a new handshake instead of being refused here for as long as the
                    // application keeps the flow busy.
                    if self.answers.take(self.now) {
                        self.emit_control(
                            &key,
                            identity::wire::TYPE_UDP_RESTART,
                            &identity::wire::UDP_RESTART_TOKEN,
                        );
                    }
                    return Verdict::drop(Reason::UdpUnauthenticated);
                }
                return self.datagram(Hook::Input, Protocol::Udp, d);
            }
        };
        if let Some(control) = resend {
            self.emit_udp(key.local, key.remote, &control, EmitMark::Control);
        }
        verdict
    }

    /// Server: a SYN control datagram. Checked like a TCP SYN token, ingress evaluated on the
    /// tentative claims; answered with a SYN-ACK control, or with REFUSED when ingress denies.
    fn udp_server_syn<R: CryptoRng + ?Sized>(
        &mut self,
        key: FlowKey,
        token: &[u8],
        rng: &mut R,
    ) -> Verdict {
        match self.udp.get_mut(&key).map(|f| &mut f.state) {
            Some(UdpState::ServerAwaitingAck {
                syn_token,
                synack,
                last_sent_ms,
                ..
            }) if **syn_token == *token => {
                // A retransmitted SYN: our SYN-ACK was lost (or is late). Same answer.
                *last_sent_ms = self.now;
                let control = synack.clone();
                self.emit_udp(key.local, key.remote, &control, EmitMark::Control);
                return Verdict::consumed();
            }
            Some(UdpState::ServerBoundAnswered { syn_token, synack }) if **syn_token == *token => {
                // A duplicate of the bound SYN we answered (its nonce is recorded, so only the
                // flow state knows it): the same answer, marking as before.
                let control = synack.clone();
                self.emit_udp(key.local, key.remote, &control, EmitMark::ControlAuthorized);
                return Verdict::consumed();
            }
            Some(UdpState::ClientHello { binding, .. }) => {
                if binding.is_bound() {
                    // Our bound SYN reflected, or forged: its address's node has an agent.
                    return Verdict::drop(Reason::UnexpectedToken);
                }
                // We are the client on this tuple: a SYN coming back is our own reflected by
                // an agentless peer (an echo service), or a simultaneous start; either way no
                // agent answered ours. Decide on the address, like any plain answer.
                self.udp_give_up(key);
                return Verdict::drop(Reason::UdpHandshakePending);
            }
            Some(_) => {
                // A new handshake on the tuple (the client forgot the old one, e.g. its
                // conntrack entry was cut). A late copy of the SYN of a flow already proven is
                // refused below as a replay: its nonce was recorded at the ACK.
                self.udp.remove(&key);
            }
            None => {}
        }
        if !self.udp.has_room(self.config.udp_max_flows) {
            return Verdict::drop(Reason::FlowTableFull);
        }
        let syn = match self
            .node
            .server_syn_bound(token, &udp_source(key.remote), self.now)
        {
            Ok(s) => s,
            Err(e) => return Verdict::drop(Reason::Handshake(e)),
        };
        let (peer, who) = self.syn_peer(Protocol::Udp, &syn);
        let view = self.peer_of(peer);
        let port = key.local.port();
        if !self.decide(&key, Direction::Ingress, &view.0, who, None) {
            // Tell the client's agent at once (it would otherwise wait, then take us as
            // agentless); the client nonce shows the refusal answers its SYN.
            if let Some(nonce) = token.get(20..36) {
                self.emit_control(&key, identity::wire::TYPE_UDP_REFUSED, nonce);
            }
            return Verdict::drop(Reason::PolicyIngress);
        }
        let port_name = self.local_port_name_of(port, Protocol::Udp).to_owned();
        let mut nonce = [0u8; identity::wire::NONCE_LEN];
        rng.fill_bytes(&mut nonce);
        let server = match syn {
            ServerSyn::Tentative(received, _) => received,
            ServerSyn::Bound(bound) => {
                let synack_token =
                    match bound.respond(self.node, &self.wl.claims, &port_name, nonce, self.now) {
                        Ok(t) => t,
                        Err(e) => return Verdict::drop(Reason::LocalHandshake(e)),
                    };
                let Some(control) =
                    identity::encode_udp_control(identity::wire::TYPE_SYN_ACK_BOUND, &synack_token)
                else {
                    return Verdict::drop(Reason::LocalHandshake(HandshakeError::Malformed(
                        "SYN-ACK token too long for a control datagram",
                    )));
                };
                // The answer marks the flow as it leaves: the client is authorized from here,
                // and its datagrams bypass this agent from the first one.
                self.emit_udp(key.local, key.remote, &control, EmitMark::ControlAuthorized);
                self.metrics.count_authorized(true);
                self.metrics.count_bound(Protocol::Udp, "authorized");
                self.remember(key, Direction::Ingress, Some(view), None);
                self.udp.insert(
                    key,
                    UdpFlow::new(
                        UdpState::ServerBoundAnswered {
                            syn_token: token.into(),
                            synack: control.into_boxed_slice(),
                        },
                        self.now.saturating_add(self.config.udp_linger_ms),
                    ),
                );
                return Verdict::consumed();
            }
        };
        let (awaiting, synack_token) =
            match server.respond(self.node, &self.wl.claims, &port_name, nonce, self.now) {
                Ok(r) => r,
                Err(e) => return Verdict::drop(Reason::LocalHandshake(e)),
            };
        let Some(synack) = self.emit_control(&key, identity::wire::TYPE_SYN_ACK, &synack_token)
        else {
            return Verdict::drop(Reason::LocalHandshake(HandshakeError::Malformed(
                "SYN-ACK token too long for a control datagram",
            )));
        };
        self.udp.insert(
            key,
            UdpFlow::new(
                UdpState::ServerAwaitingAck {
                    server: Box::new(awaiting),
                    syn_token: token.into(),
                    synack,
                    last_sent_ms: self.now,
                    deferrals: 0,
                },
                self.handshake_deadline(),
            ),
        );
        Verdict::consumed()
    }

    /// Client: the server's SYN-ACK control. Verified like a TCP SYN-ACK token; egress on the
    /// server's proven identity; then the ACK control and the held datagrams leave.
    fn udp_client_syn_ack(&mut self, key: FlowKey, token: &[u8]) -> Verdict {
        let result = match self.udp.get(&key).map(|f| &f.state) {
            Some(UdpState::ClientHello { client, .. }) => {
                client.receive(self.node, token, self.now)
            }
            Some(UdpState::ClientDone { synack, ack }) if **synack == *token => {
                // The server did not get our ACK: the same ACK again (none after a bound
                // SYN-ACK: the server expects none).
                if let Some(ack) = ack.clone() {
                    self.emit_udp(key.local, key.remote, &ack, EmitMark::Control);
                }
                return Verdict::consumed();
            }
            None if identity::wire::SynAckToken::decode(token).is_ok() => {
                // No handshake of ours on the tuple, yet the server's agent asks for the ACK:
                // ours was lost and our state lingered out (the application sent nothing for
                // a while). Our flow is marked and would go on to a server that drops its
                // datagrams (`ack_missing`) for ever: clear the mark so the next datagram
                // starts a new handshake. The token's MAC cannot be checked without the
                // handshake we no longer hold, so a forged SYN-ACK (well-formed) can do the
                // same, and no more: the new handshake proves both ends again.
                return Verdict::consume_marking(false, Some(Reason::UdpAckLost));
            }
            _ => return Verdict::drop(Reason::UnexpectedToken),
        };
        let (server, ack_token) = match result {
            Ok(r) => (r.peer, r.ack),
            // The state stays: a forged SYN-ACK does not kill the handshake.
            Err(e) => return Verdict::drop(Reason::Handshake(e)),
        };
        self.learn_agent(key.remote.ip(), true);
        self.learn_node(key.remote.ip(), &server);
        let view = self.peer_of(&server);
        let allowed = self.decide(
            &key,
            Direction::Egress,
            &view.0,
            Who::Proven(&server),
            server.port_name.as_deref(),
        );
        let Some(UdpFlow {
            state: UdpState::ClientHello { held, binding, .. },
            ..
        }) = self.udp.remove(&key)
        else {
            return Verdict::drop(Reason::UnexpectedToken);
        };
        if let (Some(node), Some(_)) = (binding.fell_back_from(), &ack_token) {
            self.silence(Protocol::Udp, node);
        }
        if !allowed {
            for _ in 1..held.len() {
                self.metrics.count_rejected(Reason::PolicyEgress.as_str());
            }
            return Verdict::drop(Reason::PolicyEgress);
        }
        let ack = match ack_token {
            Some(ack_token) => {
                if binding.is_bound() {
                    // The bound SYN reached another node, a rotated key, or a rewritten source.
                    self.metrics.count_bound(Protocol::Udp, "answered_plain");
                }
                let Some(ack) = self.emit_control(&key, identity::wire::TYPE_ACK, &ack_token)
                else {
                    return Verdict::drop(Reason::UnexpectedToken);
                };
                Some(ack)
            }
            None => {
                // A bound SYN-ACK: the server authorized us at our bound SYN and marked the
                // flow; no ACK follows.
                self.metrics.count_bound(Protocol::Udp, "completed");
                None
            }
        };
        self.release(&key, held);
        self.metrics.count_authorized(true);
        self.remember(
            key,
            Direction::Egress,
            Some(view),
            server.port_name.as_deref(),
        );
        self.udp.insert(
            key,
            UdpFlow::new(
                UdpState::ClientDone {
                    synack: token.into(),
                    ack,
                },
                self.now.saturating_add(self.config.udp_linger_ms),
            ),
        );
        Verdict::consumed()
    }

    /// A UDP handshake's timer: re-send the SYN, or give up on the peer.
    fn udp_timer<R: CryptoRng + ?Sized>(&mut self, key: FlowKey, rng: &mut R) {
        let rto = self.config.udp_hello_rto_ms;
        let max_tries = self.config.udp_hello_tries.max(1);
        let now = self.now;
        let mut resend = None;
        if let Some(UdpFlow {
            state:
                UdpState::ClientHello {
                    syn,
                    tries,
                    binding,
                    ..
                },
            ..
        }) = self.udp.get_mut(&key)
        {
            if *tries < max_tries {
                *tries += 1;
                let next_ms = now.saturating_add(rto << (*tries - 1).min(16));
                resend = Some((syn.clone(), binding.fall_back(), next_ms));
            }
        } else {
            return;
        }
        if let Some((mut syn, fell_back, next_ms)) = resend {
            if fell_back {
                // The bound SYN went unanswered: re-sent plain, as for TCP.
                let (plain, token) = self.plain_retransmission(Protocol::Udp, rng);
                let Some(control) = identity::encode_udp_control(identity::wire::TYPE_SYN, &token)
                else {
                    return;
                };
                syn = control.into_boxed_slice();
                if let Some(UdpFlow {
                    state:
                        UdpState::ClientHello {
                            client, syn: kept, ..
                        },
                    ..
                }) = self.udp.get_mut(&key)
                {
                    *client = plain;
                    *kept = syn.clone();
                }
            }
            self.udp.reschedule(&key, next_ms);
            self.emit_udp(key.local, key.remote, &syn, EmitMark::Control);
            return;
        }
        if self.udp_requires_handshake(key.remote.ip()) {
            // An agent answered at this address recently (or it is a workload of this node):
            // its silence now is loss or load, not evidence that it has none. Taking it as
            // agentless would decide this flow, and every flow to it for `udp_agentless_ms`,
            // on the address instead of the proven identity.
            if let Some(UdpFlow {
                state: UdpState::ClientHello { held, .. },
                ..
            }) = self.udp.remove(&key)
            {
                for _ in 0..held.len() {
                    self.metrics.count_rejected(Reason::UdpNoAnswer.as_str());
                }
            }
            return;
        }
        self.udp_give_up(key);
    }

    /// No agent answers at the peer: decide the flow on the peer's address, as for a peer known
    /// to have none (and remember it as agentless for `udp_agentless_ms`); the held datagrams
    /// are released or dropped.
    fn udp_give_up(&mut self, key: FlowKey) {
        self.learn_agent(key.remote.ip(), false);
        let Some(UdpFlow {
            state: UdpState::ClientHello { held, .. },
            ..
        }) = self.udp.remove(&key)
        else {
            return;
        };
        let Some(first) = held.first() else { return };
        let Ok(d) = IpDatagram::parse(first) else {
            return;
        };
        let verdict = self.datagram(Hook::Output, Protocol::Udp, &d);
        if verdict.accept {
            self.release(&key, held);
        } else {
            for _ in 0..held.len() {
                self.metrics.count_rejected(Reason::PolicyEgress.as_str());
            }
        }
    }

    /// Send the held datagrams of an authorized flow, in order, with the AUTH mark.
    fn release(&mut self, key: &FlowKey, held: Vec<Vec<u8>>) {
        for mut p in held {
            let fixed = IpDatagram::parse(&p).and_then(|d| set_udp_checksum(&mut p, d.l4_start));
            match fixed {
                Ok(()) => self.outgoing.push(Outgoing {
                    workload: key.workload,
                    packet: p,
                    mark: EmitMark::Authorized,
                }),
                Err(e) => self.metrics.count_rejected(Reason::Packet(e).as_str()),
            }
        }
    }

    /// Server: the client's ACK control proves it; ingress again on the proven identity.
    fn udp_server_ack(&mut self, key: FlowKey, token: &[u8]) -> Verdict {
        let result = match self.udp.get(&key).map(|f| &f.state) {
            Some(UdpState::ServerAwaitingAck { server, .. }) => {
                server.receive_ack(self.node, token, self.now)
            }
            Some(UdpState::ServerAuthorized { ack_token }) if **ack_token == *token => {
                return Verdict::consume_marking(true, None);
            }
            _ => return Verdict::drop(Reason::UnexpectedToken),
        };
        let client = match result {
            Ok(c) => c,
            Err(e) => return Verdict::drop(Reason::Handshake(e)),
        };
        self.learn_agent(key.remote.ip(), true);
        let view = self.peer_of(&client);
        if !self.decide(
            &key,
            Direction::Ingress,
            &view.0,
            Who::Proven(&client),
            None,
        ) {
            self.udp.remove(&key);
            return Verdict::drop(Reason::PolicyIngress);
        }
        self.metrics.count_authorized(true);
        self.remember(key, Direction::Ingress, Some(view), None);
        self.udp.insert(
            key,
            UdpFlow::new(
                UdpState::ServerAuthorized {
                    ack_token: token.into(),
                },
                self.now.saturating_add(self.config.udp_linger_ms),
            ),
        );
        // Marked now, at the ACK: were the flow marked only by its next datagram, a datagram
        // lost or sent after the linger would meet no state here and be refused as
        // unauthenticated, while the client's side stays marked.
        Verdict::consume_marking(true, None)
    }

    /// Client: the server's agent holds no handshake for our flow and refused a datagram of it
    /// (the server workload restarted, or its conntrack entry expired first). Unless a
    /// handshake of ours is under way on the tuple (its datagrams are held, none could have
    /// been refused), the flow's mark is cleared so its next datagram starts a new handshake.
    fn udp_restart(&mut self, key: FlowKey) -> Verdict {
        match self.udp.get(&key).map(|f| &f.state) {
            None => {}
            Some(UdpState::ClientDone { .. }) => {
                self.udp.remove(&key);
            }
            Some(_) => return Verdict::drop(Reason::UnexpectedToken),
        }
        Verdict::consume_marking(false, Some(Reason::UdpRestart))
    }

    /// Client: the server's agent refused our SYN (its ingress denies the flow).
    fn udp_refused(&mut self, key: FlowKey, nonce: &[u8]) -> Verdict {
        let ours = match self.udp.get(&key).map(|f| &f.state) {
            Some(UdpState::ClientHello { syn, .. }) => {
                // The SYN token's client nonce: bytes 20..36 of the token, after the 12-byte
                // control header.
                syn.get(
                    identity::wire::UDP_CONTROL_HEADER_LEN + 20
                        ..identity::wire::UDP_CONTROL_HEADER_LEN + 36,
                ) == Some(nonce)
            }
            _ => false,
        };
        if !ours {
            return Verdict::drop(Reason::UnexpectedToken);
        }
        self.learn_agent(key.remote.ip(), true);
        if let Some(f) = self.udp.remove(&key) {
            for _ in 1..f.state.held_use().count {
                self.metrics.count_rejected(Reason::UdpRefused.as_str());
            }
        }
        Verdict::drop(Reason::UdpRefused)
    }

    /// The first packet of a flow of a protocol without a handshake of ours (UDP, SCTP, ICMP,
    /// any other): conntrack saw it as new (or untracked), so it is decided here on the
    /// identity the peer's *address* has: the workload the engine knows at that address (same
    /// node, or the cluster-wide view), else an IP-only peer (only ipBlocks match). Allowed:
    /// accept and mark, so the rest of the flow, both ways, bypasses userspace; the flow is
    /// remembered for [`Processor::recheck`]. Denied: drop, counted.
    fn datagram(&mut self, hook: Hook, protocol: Protocol, d: &IpDatagram) -> Verdict {
        let (direction, local, remote) = match hook {
            Hook::Output => (
                Direction::Egress,
                SocketAddr::new(d.src, d.src_port),
                SocketAddr::new(d.dst, d.dst_port),
            ),
            Hook::Input => (
                Direction::Ingress,
                SocketAddr::new(d.dst, d.dst_port),
                SocketAddr::new(d.src, d.src_port),
            ),
        };
        let key = FlowKey {
            workload: self.id,
            protocol,
            local,
            remote,
        };
        let peer_workload = self.engine.workload_by_ip(&remote.ip());
        // Egress named ports resolve on the destination, as the engine knows it.
        let port_name = match (direction, peer_workload) {
            (Direction::Egress, Some(w)) => w
                .ports
                .iter()
                .find(|p| p.port == d.dst_port && p.protocol == protocol)
                .and_then(|p| p.name.clone()),
            _ => None,
        };
        let view = peer_workload.and_then(|w| {
            let pod = w.key.clone();
            self.engine
                .identity(&pod)
                .map(|id| (Arc::new(Peer::Workload(id)), Arc::new(pod)))
        });
        let peer: &Peer = match &view {
            Some((p, _)) => p,
            None => self.ip_only,
        };
        let allowed = self.decide(
            &key,
            direction,
            peer,
            Who::Address(view.as_ref().map(|(_, pod)| &**pod)),
            port_name.as_deref(),
        );
        if !allowed {
            return Verdict::drop(match direction {
                Direction::Ingress => Reason::PolicyIngress,
                Direction::Egress => Reason::PolicyEgress,
            });
        }
        self.metrics.count_authorized_by_address();
        self.remember(key, direction, view, port_name.as_deref());
        Verdict::authorize(false)
    }

    /// The policy view of a handshake identity and its pod, from the cache when its claims
    /// were seen.
    fn peer_of(&mut self, p: &PeerIdentity) -> PeerView {
        if let Some(view) = self.peers.get(&p.claims) {
            return view.clone();
        }
        if self.peers.len() >= PEER_CACHE_ENTRIES {
            self.peers.clear();
        }
        let pod = PodKey {
            namespace: p.claims.namespace().to_owned(),
            name: p.claims.workload().to_owned(),
        };
        let view = (Arc::new(peer_of(p)), Arc::new(pod));
        self.peers.insert(p.claims.clone(), view.clone());
        view
    }

    /// Remember an authorized flow for [`Processor::recheck`].
    fn remember(
        &mut self,
        key: FlowKey,
        direction: Direction,
        peer: Option<PeerView>,
        port_name: Option<&str>,
    ) {
        let (peer, pod) = match peer {
            Some((peer, pod)) => (peer, Some(pod)),
            None => (self.ip_only.clone(), None),
        };
        let names = match direction {
            Direction::Egress => self.dns.names_shared(self.id, key.remote.ip(), self.now),
            Direction::Ingress => Box::default(),
        };
        self.established.insert(
            key,
            Authorized::new(direction, peer, pod, port_name, self.now).with_names(names),
        );
    }

    fn handshake_deadline(&self) -> u64 {
        self.now.saturating_add(self.config.handshake_timeout_ms)
    }

    fn linger_deadline(&self) -> u64 {
        self.now.saturating_add(self.config.authorized_linger_ms)
    }

    /// The name of a local TCP port among the workload's container ports ("" if unnamed).
    fn local_port_name(&self, port: u16) -> &str {
        self.local_port_name_of(port, Protocol::Tcp)
    }

    /// The name of a local port of `protocol` among the workload's container ports ("" if
    /// unnamed).
    fn local_port_name_of(&self, port: u16, protocol: Protocol) -> &str {
        self.engine
            .workload(&self.wl.key)
            .and_then(|w| {
                w.ports
                    .iter()
                    .find(|p| p.port == port && p.protocol == protocol)
            })
            .and_then(|p| p.name.as_deref())
            .unwrap_or("")
    }

    /// Client OUTPUT SYN: attach a new SYN token, or the same one on retransmission.
    fn client_syn<R: CryptoRng + ?Sized>(
        &mut self,
        key: FlowKey,
        seg: &TcpSegment,
        packet: &mut Vec<u8>,
        rng: &mut R,
    ) -> Verdict {
        // A retransmission of our SYN (same sequence number): the same token, unless it was
        // bound, which the kernel's retransmission says went unanswered.
        let retransmitted = match self.flows.live_mut(&key, self.now) {
            Some(Flow {
                state:
                    FlowState::ClientSynSent {
                        isn,
                        syn_token,
                        binding,
                        ..
                    },
                ..
            }) if *isn == seg.seq => Some((syn_token.clone(), binding.fall_back())),
            _ => None,
        };
        if let Some((mut token, fell_back)) = retransmitted {
            if fell_back {
                let (plain, plain_token) = self.plain_retransmission(Protocol::Tcp, rng);
                token = plain_token.into_boxed_slice();
                if let Some(Flow {
                    state:
                        FlowState::ClientSynSent {
                            client, syn_token, ..
                        },
                    ..
                }) = self.flows.live_mut(&key, self.now)
                {
                    *client = plain;
                    *syn_token = token.clone();
                }
            }
            return modified_or(
                packet::attach_token(packet, seg, &token),
                Verdict::accept(true),
            );
        }
        if !self.flows.has_room(&key, self.now) {
            return Verdict::drop(Reason::FlowTableFull);
        }
        let mut nonce = [0u8; identity::wire::NONCE_LEN];
        rng.fill_bytes(&mut nonce);
        let (client, token, binding) = self.make_syn(seg.dst, &tcp_source(seg), nonce);
        if let Err(e) = packet::attach_token(packet, seg, &token) {
            return Verdict::drop(Reason::Packet(e));
        }
        let flow = Flow::new(
            FlowState::ClientSynSent {
                client,
                isn: seg.seq,
                syn_token: token.into_boxed_slice(),
                binding,
            },
            self.handshake_deadline(),
        );
        if !self.flows.insert(key, flow, self.now) {
            return Verdict::drop(Reason::FlowTableFull);
        }
        Verdict::accept(true)
    }

    /// The SYN token of a new flow from `source` to `dst`, TCP or UDP: bound (with the node it
    /// is bound for) when a verified SYN-ACK from `dst` named its node and that node is not
    /// silent; otherwise, or if no pair key can be had with that node, plain.
    fn make_syn(
        &mut self,
        dst: IpAddr,
        source: &FlowSource,
        nonce: [u8; identity::wire::NONCE_LEN],
    ) -> (ClientAwaitingSynAck, Vec<u8>, SynBinding) {
        let bound = match self.bound.get(&dst, self.now) {
            Some((node, server_key)) if self.config.bound_handshake => self
                .node
                .client_syn_bound(&self.wl.claims, node, server_key, source, nonce, self.now)
                .ok()
                .map(|(client, token)| (client, token, SynBinding::Bound(node.into()))),
            _ => None,
        };
        match bound {
            Some(b) => {
                self.metrics.count_bound(protocol_of(source), "sent");
                b
            }
            None => {
                let (client, token) = self.node.client_syn(&self.wl.claims, nonce, self.now);
                (client, token, SynBinding::Plain)
            }
        }
    }

    /// Who sent a SYN (TCP or UDP), for the ingress decision at it. A plain SYN (or a bound one
    /// this node cannot use, counted by why) is tentative: ingress drops what it denies, and the
    /// ACK decides. A bound SYN authenticated the client: ingress decides on the proven
    /// identity, and the bound SYN-ACK will authorize the flow (and its node, heard, is no
    /// longer silent).
    fn syn_peer<'s>(
        &mut self,
        protocol: Protocol,
        syn: &'s ServerSyn,
    ) -> (&'s PeerIdentity, Who<'s>) {
        match syn {
            ServerSyn::Tentative(received, miss) => {
                if let Some(miss) = miss {
                    self.metrics.count_bound(protocol, miss.as_str());
                }
                let peer = received.tentative_peer();
                (peer, Who::Tentative(peer))
            }
            ServerSyn::Bound(bound) => {
                self.bound.heard(&bound.peer().node);
                (bound.peer(), Who::Proven(bound.peer()))
            }
        }
    }

    /// A verified SYN-ACK (TCP or UDP) from `ip` proved `server`'s node: the next connection or
    /// flow to that address, of either protocol, can be bound.
    fn learn_node(&mut self, ip: IpAddr, server: &PeerIdentity) {
        let until = self.now.saturating_add(self.config.bound_peer_ms);
        self.bound
            .learn(ip, &server.node, server.key_id, until, self.now);
    }

    /// A bound SYN went unanswered for a retransmission timeout: an agent older than the bound
    /// handshake drops its type, or the SYN or its answer was lost, or the server's ingress
    /// denied it (a denied SYN is dropped, not answered). The retransmission is a plain SYN
    /// with a fresh nonce. Returns it.
    fn plain_retransmission<R: CryptoRng + ?Sized>(
        &mut self,
        protocol: Protocol,
        rng: &mut R,
    ) -> (ClientAwaitingSynAck, Vec<u8>) {
        self.metrics.count_bound(protocol, "retransmitted_plain");
        let mut nonce = [0u8; identity::wire::NONCE_LEN];
        rng.fill_bytes(&mut nonce);
        self.node.client_syn(&self.wl.claims, nonce, self.now)
    }

    /// A plain SYN-ACK answered the plain retransmission of a bound SYN to `node`: the node
    /// answers plain SYNs and ignored the bound one (an agent older than the bound handshake),
    /// so it gets plain SYNs for `bound_silent_ms` (a bound SYN from it ends the wait). A
    /// retransmission that nobody answers either (a denied SYN, a server gone) says nothing
    /// about the node, and silences nothing.
    fn silence(&mut self, protocol: Protocol, node: &str) {
        let until = self.now.saturating_add(self.config.bound_silent_ms);
        self.bound.silent(node, until, self.now);
        self.metrics.count_bound(protocol, "node_silenced");
    }

    /// Server INPUT SYN: verify the token (or take the peer as IP-only), decide ingress, strip.
    fn server_syn(&mut self, key: FlowKey, seg: &TcpSegment, packet: &mut Vec<u8>) -> Verdict {
        let token = seg.token(packet);
        // A SYN on a tuple whose bound SYN-ACK marked the flow: that answer was lost, or the
        // client starts over. The flow is unmarked, so the kernel's next SYN-ACK is queued and
        // gets its token.
        let (mut reopen, mut same) = (false, false);
        // A retransmission of the SYN we already accepted: same sequence number, same token.
        if let Some(flow) = self.flows.live_mut(&key, self.now) {
            reopen = matches!(flow.state, FlowState::ServerBoundAnswered { .. });
            same = match (&flow.state, token) {
                (
                    FlowState::ServerSynReceived { isn, syn_token, .. }
                    | FlowState::ServerAwaitingAck { isn, syn_token, .. }
                    | FlowState::ServerBound { isn, syn_token, .. }
                    | FlowState::ServerBoundAnswered { isn, syn_token, .. },
                    Some(t),
                ) => *isn == seg.seq && **syn_token == *t,
                (FlowState::ServerTokenless { isn }, None) => *isn == seg.seq,
                _ => false,
            };
        }
        let accepted = |modified| {
            if reopen {
                Verdict::reopen(modified)
            } else {
                Verdict::accept(modified)
            }
        };
        if same {
            return if seg.has_option() {
                modified_or(packet::strip_token(packet, seg), accepted(true))
            } else {
                // A token-less retransmission: only a ServerTokenless flow, never reopened.
                accepted(false)
            };
        }
        if !self.flows.has_room(&key, self.now) {
            return Verdict::drop(Reason::FlowTableFull);
        }
        let Some(token) = token else {
            // No token: a peer without agent, known only by its IP.
            if !self.decide(
                &key,
                Direction::Ingress,
                &Peer::IpOnly,
                Who::Address(None),
                None,
            ) {
                return Verdict::drop(Reason::PolicyIngress);
            }
            let flow = Flow::new(
                FlowState::ServerTokenless { isn: seg.seq },
                self.handshake_deadline(),
            );
            if !self.flows.insert(key, flow, self.now) {
                return Verdict::drop(Reason::FlowTableFull);
            }
            return accepted(false);
        };
        let syn = match self
            .node
            .server_syn_bound(token, &tcp_source(seg), self.now)
        {
            Ok(syn) => syn,
            Err(e) => return Verdict::drop(Reason::Handshake(e)),
        };
        let (peer, who) = self.syn_peer(Protocol::Tcp, &syn);
        let (view, _) = self.peer_of(peer);
        if !self.decide(&key, Direction::Ingress, &view, who, None) {
            return Verdict::drop(Reason::PolicyIngress);
        }
        let syn_token: Box<[u8]> = token.into();
        if let Err(e) = packet::strip_token(packet, seg) {
            return Verdict::drop(Reason::Packet(e));
        }
        let state = match syn {
            ServerSyn::Tentative(received, _) => FlowState::ServerSynReceived {
                server: Some(Box::new(received)),
                isn: seg.seq,
                syn_token,
            },
            ServerSyn::Bound(bound) => FlowState::ServerBound {
                server: Some(Box::new(bound)),
                isn: seg.seq,
                syn_token,
            },
        };
        if !self
            .flows
            .insert(key, Flow::new(state, self.handshake_deadline()), self.now)
        {
            return Verdict::drop(Reason::FlowTableFull);
        }
        accepted(true)
    }

    /// Server OUTPUT SYN-ACK: answer the SYN's token (once), re-send it on retransmission.
    fn server_syn_ack<R: CryptoRng + ?Sized>(
        &mut self,
        key: FlowKey,
        seg: &TcpSegment,
        packet: &mut Vec<u8>,
        rng: &mut R,
    ) -> Verdict {
        let linger = self.linger_deadline();
        let Some(flow) = self.flows.live_mut(&key, self.now) else {
            return Verdict::drop(Reason::NoFlowState);
        };
        match &mut flow.state {
            FlowState::ServerAwaitingAck { synack_token, .. } => {
                let token = synack_token.clone();
                modified_or(
                    packet::attach_token(packet, seg, &token),
                    Verdict::accept(true),
                )
            }
            FlowState::ServerTokenless { .. } => {
                flow.state = FlowState::Authorized { peer_token: None };
                flow.deadline_ms = linger;
                self.metrics.count_authorized(false);
                self.remember(key, Direction::Ingress, None, None);
                Verdict::authorize(false)
            }
            FlowState::Authorized { .. } => Verdict::authorize(false),
            FlowState::ServerBoundAnswered { synack_token, .. } => {
                let token = synack_token.clone();
                modified_or(
                    packet::attach_token(packet, seg, &token),
                    Verdict::authorize(true),
                )
            }
            FlowState::ServerBound {
                server,
                isn,
                syn_token,
            } => {
                let Some(bound) = server.take() else {
                    self.flows.remove(&key);
                    return Verdict::drop(Reason::NoFlowState);
                };
                let (isn, syn_token) = (*isn, std::mem::take(syn_token));
                let view = self.peer_of(bound.peer());
                let port_name = self.local_port_name(seg.src_port).to_owned();
                let mut nonce = [0u8; identity::wire::NONCE_LEN];
                rng.fill_bytes(&mut nonce);
                let token =
                    match bound.respond(self.node, &self.wl.claims, &port_name, nonce, self.now) {
                        Ok(t) => t,
                        Err(e) => {
                            self.flows.remove(&key);
                            return Verdict::drop(local_error(e));
                        }
                    };
                if let Err(e) = packet::attach_token(packet, seg, &token) {
                    self.flows.remove(&key);
                    return Verdict::drop(Reason::Packet(e));
                }
                // The answer leaves: the flow is authorized, and marked, so the client's ACK
                // and everything after it bypass userspace here.
                if let Some(flow) = self.flows.live_mut(&key, self.now) {
                    flow.state = FlowState::ServerBoundAnswered {
                        isn,
                        syn_token,
                        synack_token: token.into_boxed_slice(),
                    };
                    flow.deadline_ms = linger;
                }
                self.metrics.count_authorized(true);
                self.metrics.count_bound(Protocol::Tcp, "authorized");
                self.remember(key, Direction::Ingress, Some(view), None);
                Verdict::authorize(true)
            }
            FlowState::ServerSynReceived {
                server,
                isn,
                syn_token,
            } => {
                let Some(received) = server.take() else {
                    self.flows.remove(&key);
                    return Verdict::drop(Reason::NoFlowState);
                };
                let (isn, syn_token) = (*isn, std::mem::take(syn_token));
                let port_name = self.local_port_name(seg.src_port).to_owned();
                let mut nonce = [0u8; identity::wire::NONCE_LEN];
                rng.fill_bytes(&mut nonce);
                let answer =
                    received.respond(self.node, &self.wl.claims, &port_name, nonce, self.now);
                let (awaiting, token) = match answer {
                    Ok(a) => a,
                    Err(e) => {
                        self.flows.remove(&key);
                        return Verdict::drop(local_error(e));
                    }
                };
                let verdict = modified_or(
                    packet::attach_token(packet, seg, &token),
                    Verdict::accept(true),
                );
                if let Some(flow) = self.flows.live_mut(&key, self.now) {
                    flow.state = FlowState::ServerAwaitingAck {
                        server: Box::new(awaiting),
                        isn,
                        syn_token,
                        synack_token: token.into_boxed_slice(),
                        deferred: 0,
                    };
                }
                verdict
            }
            FlowState::ClientSynSent { .. }
            | FlowState::ClientAckPending { .. }
            | FlowState::ClientAckSent { .. }
            | FlowState::ClientVerified { .. } => {
                // Simultaneous open: not supported by the handshake.
                Verdict::drop(Reason::NoFlowState)
            }
        }
    }

    /// Client INPUT SYN-ACK: verify the server, decide egress, strip (or answer with a RST).
    fn client_syn_ack(&mut self, key: FlowKey, seg: &TcpSegment, packet: &mut Vec<u8>) -> Verdict {
        let token = seg.token(packet);
        let linger = self.linger_deadline();
        let Some(flow) = self.flows.live_mut(&key, self.now) else {
            // No handshake of ours on this tuple (this agent restarted with it in flight, a
            // full table evicted it, the workload is gone): nothing of it passes, and the
            // server is told at once with the RST a kernel sends for a SYN-ACK no socket
            // waits for, instead of re-sending its SYN-ACK into silence. A client socket that
            // still waits re-sends its SYN, which starts a new handshake.
            if self.answers.take(self.now) {
                self.answer_with_reset(seg);
            }
            return Verdict::drop(Reason::NoFlowState);
        };
        // `fell_back`: the node a bound SYN fell back from, silenced below if a plain SYN-ACK
        // answers its plain retransmission.
        let (client, isn, fell_back) = match &flow.state {
            FlowState::ClientSynSent {
                client,
                isn,
                binding,
                ..
            } => (
                client.clone(),
                *isn,
                binding.fell_back_from().map(Box::<str>::from),
            ),
            FlowState::ClientAckPending {
                client,
                isn,
                synack_token,
                ..
            } => {
                if seg.ack != isn.wrapping_add(1) {
                    return Verdict::drop(Reason::AckMismatch);
                }
                if token.is_some_and(|t| t == &**synack_token) {
                    // The server re-sent its SYN-ACK (our ACK was lost): same answer again.
                    return modified_or(packet::strip_token(packet, seg), Verdict::accept(true));
                }
                (client.clone(), *isn, None)
            }
            FlowState::ClientAckSent {
                isn, synack_token, ..
            } => {
                if seg.ack != isn.wrapping_add(1) {
                    return Verdict::drop(Reason::AckMismatch);
                }
                return match token {
                    // The server re-sent its SYN-ACK: our ACK token was lost. Strip it and
                    // unmark the flow so the client kernel's duplicate ACK is queued and gets
                    // the token again.
                    Some(t) if t == &**synack_token => {
                        flow.deadline_ms = linger;
                        modified_or(packet::strip_token(packet, seg), Verdict::reopen(true))
                    }
                    Some(_) => Verdict::drop(Reason::UnexpectedToken),
                    None => Verdict::accept(false),
                };
            }
            FlowState::Authorized { peer_token } => {
                return match (token, peer_token) {
                    (None, None) => Verdict::authorize(false),
                    (Some(t), Some(p)) if t == &**p => {
                        modified_or(packet::strip_token(packet, seg), Verdict::authorize(true))
                    }
                    _ => Verdict::drop(Reason::UnexpectedToken),
                };
            }
            _ => return Verdict::drop(Reason::NoFlowState),
        };
        if seg.ack != isn.wrapping_add(1) {
            // Not an answer to our SYN (the kernel would refuse it too): never let it decide
            // the flow, or a blind injection could authorize or reset it.
            return Verdict::drop(Reason::AckMismatch);
        }
        let Some(token) = token else {
            if client.is_bound() {
                return Verdict::drop(Reason::BoundSynAckWithoutToken);
            }
            // No token: a server without agent; egress on its IP only.
            if !self.decide(
                &key,
                Direction::Egress,
                &Peer::IpOnly,
                Who::Address(None),
                None,
            ) {
                self.flows.remove(&key);
                return self.refuse(packet, seg);
            }
            if let Some(flow) = self.flows.live_mut(&key, self.now) {
                flow.state = FlowState::Authorized { peer_token: None };
                flow.deadline_ms = linger;
            }
            self.metrics.count_authorized(false);
            self.remember(key, Direction::Egress, None, None);
            return Verdict::authorize(false);
        };
        let (server, ack_token) = match client.receive(self.node, token, self.now) {
            Ok(r) => (r.peer, r.ack),
            Err(e) => return Verdict::drop(Reason::Handshake(e)),
        };
        self.learn_node(key.remote.ip(), &server);
        if let (Some(node), Some(_)) = (&fell_back, &ack_token) {
            self.silence(Protocol::Tcp, node);
        }
        let view = self.peer_of(&server);
        if !self.decide(
            &key,
            Direction::Egress,
            &view.0,
            Who::Proven(&server),
            server.port_name.as_deref(),
        ) {
            self.flows.remove(&key);
            return self.refuse(packet, seg);
        }
        // Egress is decided here, on the server's proven identity: remember the flow now (the
        // client marks it when its ACK token leaves).
        self.remember(
            key,
            Direction::Egress,
            Some(view),
            server.port_name.as_deref(),
        );
        let synack_token: Box<[u8]> = token.into();
        if let Err(e) = packet::strip_token(packet, seg) {
            return Verdict::drop(Reason::Packet(e));
        }
        let Some(ack_token) = ack_token else {
            // A bound SYN-ACK: the server authorized us at our bound SYN and marked the flow;
            // no ACK token follows. Marked here too, so the client's ACK bypasses both agents.
            if let Some(flow) = self.flows.live_mut(&key, self.now) {
                flow.state = FlowState::Authorized {
                    peer_token: Some(synack_token),
                };
                flow.deadline_ms = linger;
            }
            self.metrics.count_authorized(true);
            self.metrics.count_bound(Protocol::Tcp, "completed");
            return Verdict::authorize(true);
        };
        if client.is_bound() {
            // The bound SYN reached another node, a rotated key, or a rewritten source.
            self.metrics.count_bound(Protocol::Tcp, "answered_plain");
        }
        if let Some(flow) = self.flows.live_mut(&key, self.now) {
            flow.state = FlowState::ClientAckPending {
                client,
                isn,
                server_isn: seg.seq,
                synack_token,
                ack_token: ack_token.into_boxed_slice(),
            };
        }
        Verdict::accept(true)
    }

    /// Egress denied at the SYN-ACK: hand the client a RST so connect() fails at once.
    fn refuse(&mut self, packet: &mut Vec<u8>, seg: &TcpSegment) -> Verdict {
        match packet::rewrite_to_rst(packet, seg) {
            Ok(()) => Verdict {
                reason: Some(Reason::PolicyEgress),
                ..Verdict::accept(true)
            },
            Err(_) => Verdict::drop(Reason::PolicyEgress),
        }
    }

    /// Send, from the workload's netns, the RST that answers `seg` on a connection its end no
    /// longer knows ([`packet::reset_reply`]): to the peer for a segment that arrived, to the
    /// workload's own socket (through the loopback) for one it sent.
    fn answer_with_reset(&mut self, seg: &TcpSegment) {
        match packet::reset_reply(seg) {
            Ok(rst) => self.outgoing.push(Outgoing {
                workload: self.id,
                packet: rst,
                mark: EmitMark::Control,
            }),
            Err(e) => self.metrics.count_rejected(Reason::Packet(e).as_str()),
        }
    }

    /// OUTPUT, not a SYN: the client's first ACK gets the ACK token.
    fn output_other(&mut self, key: FlowKey, seg: &TcpSegment, packet: &mut Vec<u8>) -> Verdict {
        let linger = self.linger_deadline();
        let Some(flow) = self.flows.live_mut(&key, self.now) else {
            // The workload sends on a connection its own end no longer has marked (the
            // flow's conntrack entry expired or was flushed after our state lingered out, or
            // it was established while no agent listened): nothing of it passes, so the
            // socket is told at once with the RST its peer's kernel would send, delivered to
            // it through the loopback, instead of retransmitting into silence. Only to one of
            // the workload's own addresses: the answer goes to the segment's source, which a
            // raw socket could set to another host's link-local or unlisted address.
            let own = self
                .engine
                .workload(&self.wl.key)
                .is_some_and(|w| w.ips.contains(&seg.src));
            if own && self.answers.take(self.now) {
                self.answer_with_reset(seg);
            }
            return Verdict::drop(Reason::NoFlowState);
        };
        match &mut flow.state {
            FlowState::ClientAckPending {
                isn,
                server_isn,
                synack_token,
                ack_token,
                ..
            } => {
                if kind_of(seg) != PacketKind::Ack {
                    // Data before the first ACK: the server refuses it until the proof comes.
                    return Verdict::accept(false);
                }
                if let Err(e) = packet::attach_token(packet, seg, ack_token) {
                    return Verdict::drop(Reason::Packet(e));
                }
                // The proof leaves: mark the flow now, so neither the client's data nor the
                // server's answer comes back to userspace. A lost ACK brings the server's
                // SYN-ACK back, which unmarks the flow (client_syn_ack).
                flow.state = FlowState::ClientAckSent {
                    isn: *isn,
                    server_isn: *server_isn,
                    synack_token: std::mem::take(synack_token),
                    ack_token: std::mem::take(ack_token),
                };
                flow.deadline_ms = linger;
                self.metrics.count_authorized(true);
                Verdict::authorize(true)
            }
            FlowState::ClientAckSent { ack_token, .. } => {
                // Queued again only after a re-sent SYN-ACK unmarked the flow.
                if kind_of(seg) != PacketKind::Ack {
                    return Verdict::authorize(false);
                }
                modified_or(
                    packet::attach_token(packet, seg, ack_token),
                    Verdict::authorize(true),
                )
            }
            FlowState::Authorized { .. } => Verdict::authorize(false),
            FlowState::ClientVerified { .. } => {
                // Long after the handshake: the first use of a connection opened ahead of time.
                flow.state = FlowState::Authorized { peer_token: None };
                flow.deadline_ms = linger;
                self.metrics.count_authorized(true);
                Verdict::authorize(false)
            }
            _ => Verdict::accept(false),
        }
    }

    /// INPUT, not a SYN: the server's proof (ACK token), or the client's first answer.
    fn input_other(&mut self, key: FlowKey, seg: &TcpSegment, packet: &mut Vec<u8>) -> Verdict {
        let token = seg.token(packet);
        let linger = self.linger_deadline();
        let Some(flow) = self.flows.live_mut(&key, self.now) else {
            // Established flows bypass userspace: the peer sends on a flow this end does not
            // know (the workload restarted with the same address, or the flow's conntrack
            // entry and with it the AUTH mark went, past our state's linger). Nothing of it
            // passes; answered with the RST the kernel would send for a socket it does not
            // have, so the peer's application learns at once instead of retransmitting into
            // silence for minutes. Built by us, not the kernel: a token-less segment must not
            // reach a socket (it could complete a handshake the kernel still holds).
            if self.answers.take(self.now) {
                self.answer_with_reset(seg);
            }
            return Verdict::drop(Reason::NoFlowState);
        };
        match &mut flow.state {
            FlowState::ServerAwaitingAck {
                server, deferred, ..
            } => {
                let Some(token) = token else {
                    // The client marks its flow as its ACK token leaves, so its next packets
                    // bypass its agent and may overtake the token on another CPU: send such a
                    // packet back to the tail of the queue, behind the token, a bounded number
                    // of times; then drop it (the server kernel re-sends its SYN-ACK).
                    if *deferred < MAX_DEFERRALS {
                        *deferred += 1;
                        return Verdict::requeue();
                    }
                    return Verdict::drop(Reason::AckMissing);
                };
                let peer = match server.receive_ack(self.node, token, self.now) {
                    Ok(p) => p,
                    Err(e) => return Verdict::drop(Reason::Handshake(e)),
                };
                let peer_token: Box<[u8]> = token.into();
                // Policy may have changed since the SYN: decide again on the proven identity.
                let view = self.peer_of(&peer);
                let allowed =
                    self.decide(&key, Direction::Ingress, &view.0, Who::Proven(&peer), None);
                if !allowed {
                    self.flows.remove(&key);
                    return Verdict::drop(Reason::PolicyIngress);
                }
                if let Err(e) = packet::strip_token(packet, seg) {
                    return Verdict::drop(Reason::Packet(e));
                }
                if let Some(flow) = self.flows.live_mut(&key, self.now) {
                    flow.state = FlowState::Authorized {
                        peer_token: Some(peer_token),
                    };
                    flow.deadline_ms = linger;
                }
                self.metrics.count_authorized(true);
                self.remember(key, Direction::Ingress, Some(view), None);
                Verdict::authorize(true)
            }
            FlowState::ServerSynReceived { .. } | FlowState::ServerBound { .. } => {
                Verdict::drop(Reason::AckMissing)
            }
            FlowState::ServerBoundAnswered { .. } => {
                // Queued only while unmarked (a SYN came again); the client sends no ACK token.
                if token.is_some() {
                    return Verdict::drop(Reason::UnexpectedToken);
                }
                Verdict::authorize(false)
            }
            FlowState::ServerTokenless { .. } => {
                if token.is_some() {
                    return Verdict::drop(Reason::UnexpectedToken);
                }
                Verdict::authorize(false)
            }
            FlowState::ClientAckPending {
                synack_token,
                server_isn,
                ..
            } => {
                if token.is_some() {
                    return Verdict::drop(Reason::UnexpectedToken);
                }
                if seg.seq != server_isn.wrapping_add(1) {
                    // Not the server's first packet after the handshake: let the kernel judge
                    // it, but it does not mark the flow.
                    return Verdict::accept(false);
                }
                // The server talks: it accepted our ACK token.
                flow.state = FlowState::Authorized {
                    peer_token: Some(synack_token.clone()),
                };
                flow.deadline_ms = linger;
                self.metrics.count_authorized(true);
                Verdict::authorize(false)
            }
            FlowState::Authorized { peer_token } => match (token, peer_token) {
                (None, _) => Verdict::authorize(false),
                (Some(t), Some(p)) if t == &**p => {
                    modified_or(packet::strip_token(packet, seg), Verdict::authorize(true))
                }
                _ => Verdict::drop(Reason::UnexpectedToken),
            },
            FlowState::ClientAckSent { .. } => {
                // Queued again only while unmarked (after a re-sent SYN-ACK), or carrying our
                // option: the server talks, so it took our ACK token; any token is foreign.
                if token.is_some() {
                    return Verdict::drop(Reason::UnexpectedToken);
                }
                Verdict::authorize(false)
            }
            FlowState::ClientVerified { server_isn } => {
                if token.is_some() {
                    return Verdict::drop(Reason::UnexpectedToken);
                }
                if seg.seq != server_isn.wrapping_add(1) {
                    return Verdict::accept(false);
                }
                flow.state = FlowState::Authorized { peer_token: None };
                flow.deadline_ms = linger;
                self.metrics.count_authorized(true);
                Verdict::authorize(false)
            }
            FlowState::ClientSynSent { .. } => Verdict::drop(Reason::NoFlowState),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{control_mark, reauth_mark};

    #[test]
    fn reauth_mark_is_a_neighbouring_bit_of_the_auth_mark() {
        assert_eq!(reauth_mark(0x1000_0000), 0x2000_0000);
        assert_eq!(reauth_mark(0x4), 0x8);
        assert_eq!(reauth_mark(0x8000_0000), 0x4000_0000);
        assert_eq!(reauth_mark(0x1), 0x2);
        for auth in [0x1u32, 0x20, 0x1000_0000, 0x8000_0000, 0xc000_0000] {
            assert_eq!(reauth_mark(auth) & auth, 0, "{auth:#x}");
            assert_eq!(reauth_mark(auth).count_ones(), 1, "{auth:#x}");
        }
    }

    #[test]
    fn control_mark_is_a_third_bit() {
        assert_eq!(control_mark(0x1000_0000), 0x4000_0000);
        assert_eq!(control_mark(0x8000_0000), 0x2000_0000);
        for auth in [0x1u32, 0x4, 0x20, 0x1000_0000, 0x4000_0000, 0x8000_0000] {
            let c = control_mark(auth);
            assert_eq!(c.count_ones(), 1, "{auth:#x}");
            assert_eq!(c & (auth | reauth_mark(auth)), 0, "{auth:#x}");
        }
    }
}
