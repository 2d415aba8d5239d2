//! Counters and the decision-time histogram, rendered in the Prometheus text format.

use policy::Protocol;
use std::collections::BTreeMap;
use std::fmt::Write;

use crate::processor::Hook;

/// Upper bounds (nanoseconds, inclusive) of the decision-time histogram buckets; a last `+Inf`
/// bucket is implied. Dense around the 10 us / 50 us targets.
pub const DECISION_BUCKETS_NS: [u64; 14] = [
    1_000,
    2_000,
    5_000,
    10_000,
    20_000,
    50_000,
    100_000,
    200_000,
    500_000,
    1_000_000,
    2_000_000,
    5_000_000,
    10_000_000,
    100_000_000,
];

/// Number of [`PacketKind`]s.
const KINDS: usize = 9;

/// What kind of packet was accepted (metric label).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PacketKind {
    /// SYN without ACK.
    Syn,
    /// SYN with ACK.
    SynAck,
    /// ACK without payload (the handshake's third packet, or a duplicate).
    Ack,
    /// Any other TCP packet (data, FIN).
    Other,
    /// RST.
    Rst,
    /// UDP (the first packet of a flow, decided on the peer's address).
    Udp,
    /// SCTP (likewise).
    Sctp,
    /// ICMP or ICMPv6 (likewise; neighbour discovery never reaches the queue).
    Icmp,
    /// Any other IP protocol (likewise).
    OtherProtocol,
}

impl PacketKind {
    /// All kinds, in label order.
    pub const ALL: [PacketKind; KINDS] = [
        PacketKind::Syn,
        PacketKind::SynAck,
        PacketKind::Ack,
        PacketKind::Other,
        PacketKind::Rst,
        PacketKind::Udp,
        PacketKind::Sctp,
        PacketKind::Icmp,
        PacketKind::OtherProtocol,
    ];
    /// The kind of a packet of a protocol other than TCP.
    pub fn of_protocol(protocol: Protocol) -> PacketKind {
        match protocol {
            Protocol::Udp => PacketKind::Udp,
            Protocol::Sctp => PacketKind::Sctp,
            Protocol::ICMP | Protocol::ICMPV6 => PacketKind::Icmp,
            Protocol::Tcp | Protocol::Other(_) => PacketKind::OtherProtocol,
        }
    }
    /// Metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            PacketKind::Syn => "syn",
            PacketKind::SynAck => "syn_ack",
            PacketKind::Ack => "ack",
            PacketKind::Other => "other",
            PacketKind::Rst => "rst",
            PacketKind::Udp => "udp",
            PacketKind::Sctp => "sctp",
            PacketKind::Icmp => "icmp",
            PacketKind::OtherProtocol => "other_protocol",
        }
    }
}

/// The datapath's counters. The processor updates packet counters; the shell records decision
/// times ([`Metrics::record_decision_time`]) and queue drops ([`Metrics::set_queue_drops`]).
#[derive(Debug, Clone, Default)]
pub struct Metrics {
    accepted: [[u64; KINDS]; 2],
    rejected: BTreeMap<&'static str, u64>,
    authorized_verified: u64,
    authorized_ip_only: u64,
    authorized_by_address: u64,
    requeued: u64,
    /// Flows in the TCP and in the UDP handshake table.
    flows: [usize; 2],
    /// Evicted from the network's flows, and from a workload's own.
    flows_evicted: [u64; 2],
    buckets: [u64; DECISION_BUCKETS_NS.len() + 1],
    decision_sum_ns: u64,
    decision_count: u64,
    queue_dropped: u64,
    user_dropped: u64,
    cut: BTreeMap<&'static str, u64>,
    established: usize,
    cut_remembered: usize,
    established_evicted: u64,
    established_pruned: u64,
    dns_answers: BTreeMap<&'static str, u64>,
    dns_decisions: u64,
    dns_cache_entries: usize,
    dns_cache_evicted: u64,
    dns_cache_expired: u64,
    /// By protocol (TCP, UDP), then event.
    bound: [[u64; BOUND_EVENTS.len()]; 2],
}

/// The events of the bound handshake, as `tessera_bound_handshakes_total` labels them.
pub const BOUND_EVENTS: [&str; 8] = [
    "sent",
    "authorized",
    "completed",
    "answered_plain",
    "retransmitted_plain",
    "node_silenced",
    "binding_other_receiver",
    "binding_bad_mac",
];

fn hook_index(hook: Hook) -> usize {
    match hook {
        Hook::Output => 0,
        Hook::Input => 1,
    }
}

fn kind_index(kind: PacketKind) -> usize {
    match kind {
        PacketKind::Syn => 0,
        PacketKind::SynAck => 1,
        PacketKind::Ack => 2,
        PacketKind::Other => 3,
        PacketKind::Rst => 4,
        PacketKind::Udp => 5,
        PacketKind::Sctp => 6,
        PacketKind::Icmp => 7,
        PacketKind::OtherProtocol => 8,
    }
}

/// The protocols of the bound handshake, as `tessera_bound_handshakes_total` labels them.
const BOUND_PROTOCOLS: [&str; 2] = ["tcp", "udp"];

fn bound_protocol_index(protocol: Protocol) -> Option<usize> {
    match protocol {
        Protocol::Tcp => Some(0),
        Protocol::Udp => Some(1),
        _ => None,
    }
}

impl Metrics {
    /// Count an event of the bound handshake of a TCP connection or a UDP flow (one of
    /// [`BOUND_EVENTS`]; others, and other protocols, are ignored).
    pub fn count_bound(&mut self, protocol: Protocol, event: &str) {
        debug_assert!(BOUND_EVENTS.contains(&event), "unknown bound event {event}");
        debug_assert!(bound_protocol_index(protocol).is_some(), "{protocol:?}");
        if let (Some(p), Some(i)) = (
            bound_protocol_index(protocol),
            BOUND_EVENTS.iter().position(|e| *e == event),
        ) {
            self.bound[p][i] += 1;
        }
    }
    /// How many times an event of the bound handshake happened, both protocols.
    pub fn bound(&self, event: &str) -> u64 {
        self.bound_of(Protocol::Tcp, event) + self.bound_of(Protocol::Udp, event)
    }
    /// How many times an event of the bound handshake happened for `protocol`.
    pub fn bound_of(&self, protocol: Protocol, event: &str) -> u64 {
        bound_protocol_index(protocol)
            .zip(BOUND_EVENTS.iter().position(|e| *e == event))
            .map_or(0, |(p, i)| self.bound[p][i])
    }
    /// Every event of the bound handshake that happened, as (protocol, event, count), in the
    /// exposition's order; events that never happened are left out.
    pub fn bound_all(&self) -> impl Iterator<Item = (&'static str, &'static str, u64)> + '_ {
        BOUND_PROTOCOLS
            .iter()
            .zip(self.bound.iter())
            .flat_map(|(p, counts)| {
                BOUND_EVENTS
                    .iter()
                    .zip(counts.iter())
                    .map(move |(e, n)| (*p, *e, *n))
            })
            .filter(|(_, _, n)| *n > 0)
    }
    /// Count an accepted packet.
    pub fn count_accepted(&mut self, hook: Hook, kind: PacketKind) {
        self.accepted[hook_index(hook)][kind_index(kind)] += 1;
    }
    /// Count a rejection (drop, or SYN-ACK rewritten to RST) under its reason label.
    pub fn count_rejected(&mut self, reason: &'static str) {
        *self.rejected.entry(reason).or_insert(0) += 1;
    }
    /// Count a flow authorized, with a verified peer identity or as an IP-only peer.
    pub fn count_authorized(&mut self, verified: bool) {
        if verified {
            self.authorized_verified += 1;
        } else {
            self.authorized_ip_only += 1;
        }
    }
    /// Count a flow of a protocol without a handshake (UDP, ICMP, ...) authorized on the
    /// identity its peer's address has.
    pub fn count_authorized_by_address(&mut self) {
        self.authorized_by_address += 1;
    }
    /// Flows of protocols without a handshake authorized on their peer's address.
    pub fn authorized_by_address(&self) -> u64 {
        self.authorized_by_address
    }
    /// Count a packet sent back to the queue's tail (see `Verdict::requeue`).
    pub fn count_requeued(&mut self) {
        self.requeued += 1;
    }
    /// Packets sent back to the queue's tail so far.
    pub fn requeued(&self) -> u64 {
        self.requeued
    }
    /// Set the number of flows in the TCP and UDP handshake tables, and how many a full table
    /// evicted so far: of the network's (unproven server-side and lingering authorized flows),
    /// and of a workload's own (taken from the workload that held the most).
    pub fn set_flows(
        &mut self,
        (tcp, udp): (usize, usize),
        evicted_network: u64,
        evicted_workload: u64,
    ) {
        self.flows = [tcp, udp];
        self.flows_evicted = [evicted_network, evicted_workload];
    }
    /// Flows a full handshake table evicted so far, at the last update: the network's, and
    /// workloads' own.
    pub fn flows_evicted(&self) -> u64 {
        self.flows_evicted[0] + self.flows_evicted[1]
    }
    /// Of [`Metrics::flows_evicted`], those that were a workload's own.
    pub fn flows_evicted_from_workloads(&self) -> u64 {
        self.flows_evicted[1]
    }
    /// Record one `process` call's duration.
    pub fn record_decision_time(&mut self, ns: u64) {
        let i = DECISION_BUCKETS_NS
            .iter()
            .position(|b| ns <= *b)
            .unwrap_or(DECISION_BUCKETS_NS.len());
        self.buckets[i] += 1;
        self.decision_sum_ns = self.decision_sum_ns.saturating_add(ns);
        self.decision_count += 1;
    }
    /// Set the kernel's queue overflow counters, summed over every workload's queue:
    /// `queue_dropped` (queue full) and `user_dropped` (socket buffer full), as read from
    /// `/proc/net/netfilter/nfnetlink_queue` of each netns.
    pub fn set_queue_drops(&mut self, queue_dropped: u64, user_dropped: u64) {
        self.queue_dropped = queue_dropped;
        self.user_dropped = user_dropped;
    }

    /// Count an established flow cut by a policy change, under its reason label.
    pub fn count_cut(&mut self, reason: &'static str) {
        *self.cut.entry(reason).or_insert(0) += 1;
    }
    /// Flows cut under one reason label (0 if never).
    pub fn cut(&self, reason: &str) -> u64 {
        self.cut.get(reason).copied().unwrap_or(0)
    }
    /// Set the number of authorized flows remembered for re-checks, and of cut flows whose
    /// packets are answered with a RST.
    pub fn set_established(&mut self, established: usize, cut: usize) {
        self.established = established;
        self.cut_remembered = cut;
    }
    /// Set how many remembered flows were evicted (table full) and pruned (gone from
    /// conntrack) so far.
    pub fn set_established_dropped(&mut self, evicted: u64, pruned: u64) {
        self.established_evicted = evicted;
        self.established_pruned = pruned;
    }
    /// Remembered authorized flows and cut flows, at the last update.
    pub fn established(&self) -> (usize, usize) {
        (self.established, self.cut_remembered)
    }
    /// Remembered flows evicted and pruned so far.
    pub fn established_dropped(&self) -> (u64, u64) {
        (self.established_evicted, self.established_pruned)
    }

    /// Count a DNS answer the rules queued for learning, under its result: `learnt`,
    /// `no_address`, or why nothing was learnt.
    pub fn count_dns_answer(&mut self, result: &'static str) {
        *self.dns_answers.entry(result).or_insert(0) += 1;
    }
    /// DNS answers under one result label (0 if never).
    pub fn dns_answers(&self, result: &str) -> u64 {
        self.dns_answers.get(result).copied().unwrap_or(0)
    }
    /// Count an egress decision that carried names the workload resolved to the peer.
    pub fn count_dns_decision(&mut self) {
        self.dns_decisions += 1;
    }
    /// Egress decisions that carried resolved names, so far.
    pub fn dns_decisions(&self) -> u64 {
        self.dns_decisions
    }
    /// Set the DNS name cache's size and how many entries it evicted (full) and expired so far.
    pub fn set_dns_cache(&mut self, entries: usize, evicted: u64, expired: u64) {
        self.dns_cache_entries = entries;
        self.dns_cache_evicted = evicted;
        self.dns_cache_expired = expired;
    }
    /// DNS name cache: (entries, evicted, expired) at the last update.
    pub fn dns_cache(&self) -> (usize, u64, u64) {
        (
            self.dns_cache_entries,
            self.dns_cache_evicted,
            self.dns_cache_expired,
        )
    }

    /// Accepted packets of one hook and kind.
    pub fn accepted(&self, hook: Hook, kind: PacketKind) -> u64 {
        self.accepted[hook_index(hook)][kind_index(kind)]
    }
    /// Rejections under one reason label (0 if never seen).
    pub fn rejected(&self, reason: &str) -> u64 {
        self.rejected.get(reason).copied().unwrap_or(0)
    }
    /// All rejection counters, by reason label.
    pub fn rejected_all(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        self.rejected.iter().map(|(k, v)| (*k, *v))
    }
    /// Total rejections.
    pub fn rejected_total(&self) -> u64 {
        self.rejected.values().sum()
    }
    /// Flows authorized: (with a verified identity, IP-only).
    pub fn authorized(&self) -> (u64, u64) {
        (self.authorized_verified, self.authorized_ip_only)
    }
    /// Flows in the TCP and UDP handshake tables at the last update.
    pub fn flows(&self) -> usize {
        self.flows[0] + self.flows[1]
    }
    /// Decision times recorded.
    pub fn decision_count(&self) -> u64 {
        self.decision_count
    }
    /// Kernel queue drops: (queue_dropped, user_dropped).
    pub fn queue_drops(&self) -> (u64, u64) {
        (self.queue_dropped, self.user_dropped)
    }

    /// Append the metrics in the Prometheus text exposition format (version 0.0.4).
    pub fn render_prometheus(&self, out: &mut String) {
        // Writing to a String cannot fail.
        let _ = self.render(out);
    }

    fn render(&self, out: &mut String) -> std::fmt::Result {
        writeln!(
            out,
            "# HELP tessera_packets_accepted_total Queued packets accepted, by hook and TCP packet kind."
        )?;
        writeln!(out, "# TYPE tessera_packets_accepted_total counter")?;
        for hook in [Hook::Output, Hook::Input] {
            for kind in PacketKind::ALL {
                writeln!(
                    out,
                    "tessera_packets_accepted_total{{hook=\"{}\",kind=\"{}\"}} {}",
                    hook.as_str(),
                    kind.as_str(),
                    self.accepted(hook, kind)
                )?;
            }
        }
        writeln!(
            out,
            "# HELP tessera_packets_rejected_total Queued packets dropped (or SYN-ACKs rewritten to RST), by reason."
        )?;
        writeln!(out, "# TYPE tessera_packets_rejected_total counter")?;
        for (reason, n) in &self.rejected {
            writeln!(
                out,
                "tessera_packets_rejected_total{{reason=\"{reason}\"}} {n}"
            )?;
        }
        writeln!(
            out,
            "# HELP tessera_flows_authorized_total Connections authorized, by peer kind: verified (TCP handshake tokens), ip_only (TCP peer without an agent), address (other protocols: decided on the identity of the peer's address)."
        )?;
        writeln!(out, "# TYPE tessera_flows_authorized_total counter")?;
        writeln!(
            out,
            "tessera_flows_authorized_total{{peer=\"verified\"}} {}",
            self.authorized_verified
        )?;
        writeln!(
            out,
            "tessera_flows_authorized_total{{peer=\"ip_only\"}} {}",
            self.authorized_ip_only
        )?;
        writeln!(
            out,
            "tessera_flows_authorized_total{{peer=\"address\"}} {}",
            self.authorized_by_address
        )?;
        writeln!(
            out,
            "# HELP tessera_bound_handshakes_total The bound handshake (two tokens, for a TCP connection or UDP flow to an address whose node a verified SYN-ACK named), by protocol (tcp, udp) and event: sent (a client sent a bound SYN), authorized (a server authorized at one and answered with a bound SYN-ACK), completed (a client took a bound SYN-ACK), answered_plain (a bound SYN got a plain SYN-ACK: the three tokens followed), retransmitted_plain (a bound SYN went unanswered and its retransmission went plain), node_silenced (that plain SYN was answered: the node ignores bound SYNs and gets plain ones for a while), binding_other_receiver and binding_bad_mac (why a server took a bound SYN as a plain one: bound for another node or key; a source rewritten on the way, or an altered token)."
        )?;
        writeln!(out, "# TYPE tessera_bound_handshakes_total counter")?;
        for (protocol, counts) in BOUND_PROTOCOLS.iter().zip(self.bound) {
            for (event, n) in BOUND_EVENTS.iter().zip(counts) {
                writeln!(
                    out,
                    "tessera_bound_handshakes_total{{protocol=\"{protocol}\",event=\"{event}\"}} {n}"
                )?;
            }
        }
        writeln!(
            out,
            "# HELP tessera_packets_requeued_total Packets without the ACK token sent back to the queue (they overtook the token), before it came or they were dropped."
        )?;
        writeln!(out, "# TYPE tessera_packets_requeued_total counter")?;
        writeln!(out, "tessera_packets_requeued_total {}", self.requeued)?;
        writeln!(
            out,
            "# HELP tessera_handshake_flows Flows in the TCP and the UDP handshake table (each bounded, 65,536 by default)."
        )?;
        writeln!(out, "# TYPE tessera_handshake_flows gauge")?;
        for (protocol, n) in ["tcp", "udp"].iter().zip(self.flows) {
            writeln!(
                out,
                "tessera_handshake_flows{{protocol=\"{protocol}\"}} {n}"
            )?;
        }
        writeln!(
            out,
            "# HELP tessera_handshake_flows_evicted_total Flows a full TCP or UDP handshake table forgot before their time, by whose they were: network (the older half of the unproven server-side and lingering authorized ones: a flood that ingress admits, or more new flows than the linger time allows) or workload (when those are too few, the older half of the own flows of the workload holding the most: a local workload opening flows without end)."
        )?;
        writeln!(out, "# TYPE tessera_handshake_flows_evicted_total counter")?;
        for (whose, n) in ["network", "workload"].iter().zip(self.flows_evicted) {
            writeln!(
                out,
                "tessera_handshake_flows_evicted_total{{whose=\"{whose}\"}} {n}"
            )?;
        }
        writeln!(
            out,
            "# HELP tessera_decision_seconds Time to decide on one queued packet."
        )?;
        writeln!(out, "# TYPE tessera_decision_seconds histogram")?;
        let mut cumulative = 0u64;
        for (i, le) in DECISION_BUCKETS_NS.iter().enumerate() {
            cumulative += self.buckets[i];
            writeln!(
                out,
                "tessera_decision_seconds_bucket{{le=\"{}\"}} {cumulative}",
                seconds(*le)
            )?;
        }
        cumulative += self.buckets[DECISION_BUCKETS_NS.len()];
        writeln!(
            out,
            "tessera_decision_seconds_bucket{{le=\"+Inf\"}} {cumulative}"
        )?;
        writeln!(
            out,
            "tessera_decision_seconds_sum {}",
            seconds(self.decision_sum_ns)
        )?;
        writeln!(
            out,
            "tessera_decision_seconds_count {}",
            self.decision_count
        )?;
        writeln!(
            out,
            "# HELP tessera_queue_dropped_total Packets the kernel dropped because a queue was full."
        )?;
        writeln!(out, "# TYPE tessera_queue_dropped_total counter")?;
        writeln!(out, "tessera_queue_dropped_total {}", self.queue_dropped)?;
        writeln!(
            out,
            "# HELP tessera_queue_user_dropped_total Packets the kernel dropped because a queue socket's buffer was full."
        )?;
        writeln!(out, "# TYPE tessera_queue_user_dropped_total counter")?;
        writeln!(
            out,
            "tessera_queue_user_dropped_total {}",
            self.user_dropped
        )?;
        writeln!(
            out,
            "# HELP tessera_flows_cut_total Established flows cut because a policy, label or namespace change now denies them, by reason."
        )?;
        writeln!(out, "# TYPE tessera_flows_cut_total counter")?;
        for reason in ["policy_ingress", "policy_egress"] {
            writeln!(
                out,
                "tessera_flows_cut_total{{reason=\"{reason}\"}} {}",
                self.cut(reason)
            )?;
        }
        writeln!(
            out,
            "# HELP tessera_established_flows Authorized flows remembered for re-checks after policy changes."
        )?;
        writeln!(out, "# TYPE tessera_established_flows gauge")?;
        writeln!(out, "tessera_established_flows {}", self.established)?;
        writeln!(
            out,
            "# HELP tessera_cut_flows Cut flows whose packets are answered with a RST."
        )?;
        writeln!(out, "# TYPE tessera_cut_flows gauge")?;
        writeln!(out, "tessera_cut_flows {}", self.cut_remembered)?;
        writeln!(
            out,
            "# HELP tessera_established_evicted_total Remembered flows forgotten because the table was full (they can no longer be cut)."
        )?;
        writeln!(out, "# TYPE tessera_established_evicted_total counter")?;
        writeln!(
            out,
            "tessera_established_evicted_total {}",
            self.established_evicted
        )?;
        writeln!(
            out,
            "# HELP tessera_established_pruned_total Remembered flows forgotten because conntrack no longer lists them."
        )?;
        writeln!(out, "# TYPE tessera_established_pruned_total counter")?;
        writeln!(
            out,
            "tessera_established_pruned_total {}",
            self.established_pruned
        )?;
        writeln!(
            out,
            "# HELP tessera_dns_answers_total DNS answers to workloads looked at for domainNames peers, by result: learnt, no_address, or why nothing was learnt (the answer passes either way)."
        )?;
        writeln!(out, "# TYPE tessera_dns_answers_total counter")?;
        for (result, n) in &self.dns_answers {
            writeln!(out, "tessera_dns_answers_total{{result=\"{result}\"}} {n}")?;
        }
        writeln!(
            out,
            "# HELP tessera_dns_egress_decisions_total Egress decisions that carried names the workload resolved to the peer's address."
        )?;
        writeln!(out, "# TYPE tessera_dns_egress_decisions_total counter")?;
        writeln!(
            out,
            "tessera_dns_egress_decisions_total {}",
            self.dns_decisions
        )?;
        writeln!(
            out,
            "# HELP tessera_dns_cache_entries (workload, address, name) entries learnt from DNS answers and held."
        )?;
        writeln!(out, "# TYPE tessera_dns_cache_entries gauge")?;
        writeln!(out, "tessera_dns_cache_entries {}", self.dns_cache_entries)?;
        writeln!(
            out,
            "# HELP tessera_dns_cache_evicted_total DNS cache entries dropped (or not added) because a bound was reached; the earliest to run out goes first."
        )?;
        writeln!(out, "# TYPE tessera_dns_cache_evicted_total counter")?;
        writeln!(
            out,
            "tessera_dns_cache_evicted_total {}",
            self.dns_cache_evicted
        )?;
        writeln!(
            out,
            "# HELP tessera_dns_cache_expired_total DNS cache entries removed because their TTL ran out."
        )?;
        writeln!(out, "# TYPE tessera_dns_cache_expired_total counter")?;
        writeln!(
            out,
            "tessera_dns_cache_expired_total {}",
            self.dns_cache_expired
        )
    }
}

/// Nanoseconds as a decimal number of seconds, exactly (no float rounding).
fn seconds(ns: u64) -> String {
    let s = ns / 1_000_000_000;
    let frac = ns % 1_000_000_000;
    if frac == 0 {
        return s.to_string();
    }
    let f = format!("{frac:09}");
    format!("{s}.{}", f.trim_end_matches('0'))
}
