//! Flow records: one per decision of the datapath, for "which policy dropped it, and who did
//! the agent think the peer was?" (schema: docs/flow-log.md, version [`SCHEMA_VERSION`]).
//!
//! - [`FlowRecord`]: what was decided, when, on which node, about which two endpoints (each
//!   with the identity the agent had for it and how that identity was established), the
//!   deciding policy or default, and for a rejection its reason. Serialized as one JSON object.
//! - [`FlowLog`]: what the processor records into, pure and bounded. It counts every final
//!   policy decision per policy (`tessera_policy_verdicts_total`, at most
//!   [`FlowLogConfig::max_series`] series, the rest under `policy="other"`), and decides which
//!   decisions become records: denials and rejections through a token bucket per deciding
//!   policy (or rejection reason), a record that gets through carrying how many of its key
//!   were suppressed since the last; allowed flows only when sampling is on (one in N). Records
//!   wait in a fixed-capacity queue until the shell drains them ([`FlowLog::drain`]); when it
//!   is full, new records are dropped and counted, never waited for. Time is passed in; no
//!   clock is read here.

use std::borrow::Cow;
use std::collections::{BTreeMap, VecDeque};
use std::fmt::Write as _;
use std::net::IpAddr;

use policy::{AdminKind, DecisionRef, Direction, Protocol, ReasonRef, Tier};
use serde::{Deserialize, Serialize};

/// The `v` of every record this code writes. A consumer should skip records of a version it
/// does not know; fields are only ever added within a version.
pub const SCHEMA_VERSION: u32 = 1;

/// How the identity of an endpoint was established.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum IdentitySource {
    /// Proven by a handshake token, its node key certified by the cluster CA.
    Pki,
    /// Proven by a handshake token, keyed by the cluster's pre-shared key.
    Psk,
    /// Known only by its address: the workload the policy engine knows at that address (if
    /// any; `namespace`/`workload`/`labels` say which), else nothing but the address.
    Ip,
    /// The workload this agent enforces (its runtime's word).
    Local,
    /// None was established: the packet was refused before (see the record's `reason`).
    None,
}

impl IdentitySource {
    /// `pki`, `psk`, `ip`, `local`, `none`.
    pub fn as_str(self) -> &'static str {
        match self {
            IdentitySource::Pki => "pki",
            IdentitySource::Psk => "psk",
            IdentitySource::Ip => "ip",
            IdentitySource::Local => "local",
            IdentitySource::None => "none",
        }
    }
}

/// The outcome for the flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FlowVerdict {
    Allowed,
    Denied,
}

impl FlowVerdict {
    /// `allowed` / `denied`.
    pub fn as_str(self) -> &'static str {
        match self {
            FlowVerdict::Allowed => "allowed",
            FlowVerdict::Denied => "denied",
        }
    }

    pub fn of(allowed: bool) -> FlowVerdict {
        if allowed {
            FlowVerdict::Allowed
        } else {
            FlowVerdict::Denied
        }
    }
}

/// One end of a flow, as the agent saw it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Endpoint {
    pub ip: IpAddr,
    /// Absent for protocols without ports (ICMP, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// The pod / container / inventory entry name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workload: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// How `namespace`, `workload` and `labels` were established.
    pub identity: IdentitySource,
    /// The peer's node, as its handshake token proved it (`pki`/`psk` only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
}

impl Endpoint {
    /// An address and nothing else.
    pub fn address(ip: IpAddr, port: Option<u16>, identity: IdentitySource) -> Endpoint {
        Endpoint {
            ip,
            port,
            namespace: None,
            workload: None,
            labels: BTreeMap::new(),
            identity,
            node: None,
        }
    }

    /// `namespace/workload`, if both are known.
    pub fn pod(&self) -> Option<String> {
        match (&self.namespace, &self.workload) {
            (Some(ns), Some(w)) => Some(format!("{ns}/{w}")),
            _ => None,
        }
    }
}

/// What kind of thing decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum PolicyKind {
    NetworkPolicy,
    ClusterNetworkPolicy,
    AdminNetworkPolicy,
    BaselineAdminNetworkPolicy,
    /// No policy: the default (not isolated: allowed; host network; unknown workload: denied).
    #[serde(rename = "default")]
    Default,
}

impl PolicyKind {
    /// The label value: the API kind, or `default`.
    pub fn as_str(self) -> &'static str {
        match self {
            PolicyKind::NetworkPolicy => "NetworkPolicy",
            PolicyKind::ClusterNetworkPolicy => "ClusterNetworkPolicy",
            PolicyKind::AdminNetworkPolicy => "AdminNetworkPolicy",
            PolicyKind::BaselineAdminNetworkPolicy => "BaselineAdminNetworkPolicy",
            PolicyKind::Default => "default",
        }
    }

    fn of_admin(kind: AdminKind) -> PolicyKind {
        match kind {
            AdminKind::ClusterNetworkPolicy => PolicyKind::ClusterNetworkPolicy,
            AdminKind::AdminNetworkPolicy => PolicyKind::AdminNetworkPolicy,
            AdminKind::BaselineAdminNetworkPolicy => PolicyKind::BaselineAdminNetworkPolicy,
        }
    }

    fn of(reason: &ReasonRef<'_>) -> PolicyKind {
        match reason {
            ReasonRef::AllowedBy { .. } | ReasonRef::Isolated(_) => PolicyKind::NetworkPolicy,
            ReasonRef::Admin { policy, .. } => PolicyKind::of_admin(policy.kind),
            ReasonRef::NotIsolated | ReasonRef::HostNetwork | ReasonRef::UnknownWorkload(_) => {
                PolicyKind::Default
            }
        }
    }
}

/// The policy (or default) that decided, for the record's direction.
///
/// - A NetworkPolicy rule allowed: `kind`, `namespace`, `name`, `rule`.
/// - NetworkPolicies isolate the local workload and none of their rules matches (denied):
///   `kind: NetworkPolicy`, `namespace`/`name` of the first, every one in `isolatedBy`, no
///   `rule`.
/// - An admin rule decided: `kind` (the API kind), `name`, `tier`, `priority` (not for
///   BaselineAdminNetworkPolicy), `rule`, `action` as the kind spells it, `failClosed`.
/// - The default: `kind: default`, `name`: `not_isolated` (allowed), `host_network`
///   (allowed), `unknown_workload` (denied).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PolicyRef {
    pub kind: PolicyKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    pub name: String,
    /// `Admin` / `Baseline`, admin kinds only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tier: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<u16>,
    /// Index of the deciding rule in `spec.ingress` / `spec.egress` (the record's direction).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rule: Option<usize>,
    /// Admin rules: `Allow`/`Accept`, `Deny`, `Pass`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub action: Option<String>,
    /// Admin rules: a peer the engine cannot decide turned the rule into a deny-all.
    #[serde(default, skip_serializing_if = "is_false")]
    pub fail_closed: bool,
    /// Denied by isolation: the isolating NetworkPolicies (`namespace/name`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub isolated_by: Vec<String>,
}

fn is_false(b: &bool) -> bool {
    !*b
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

impl PolicyRef {
    /// The owned form of an engine decision's reason.
    pub fn from_reason(reason: &ReasonRef<'_>) -> PolicyRef {
        let mut r = PolicyRef {
            kind: PolicyKind::of(reason),
            namespace: None,
            name: String::new(),
            tier: None,
            priority: None,
            rule: None,
            action: None,
            fail_closed: false,
            isolated_by: Vec::new(),
        };
        match *reason {
            ReasonRef::NotIsolated => r.name = "not_isolated".into(),
            ReasonRef::HostNetwork => r.name = "host_network".into(),
            ReasonRef::UnknownWorkload(_) => r.name = "unknown_workload".into(),
            ReasonRef::AllowedBy { policy, index, .. } => {
                r.namespace = Some(policy.namespace.clone());
                r.name = policy.name.clone();
                r.rule = Some(index);
            }
            ReasonRef::Isolated(policies) => {
                r.isolated_by = policies.iter().map(|p| p.to_string()).collect();
                if let Some(first) = policies.iter().next() {
                    r.namespace = Some(first.namespace.clone());
                    r.name = first.name.clone();
                }
            }
            ReasonRef::Admin {
                policy,
                tier,
                priority,
                index,
                action,
                fail_closed,
                ..
            } => {
                r.name = policy.name.clone();
                r.tier = Some(
                    match tier {
                        Tier::Admin => "Admin",
                        Tier::Baseline => "Baseline",
                    }
                    .into(),
                );
                r.priority = priority;
                r.rule = Some(index);
                r.action = Some(policy.kind.action_name(action).into());
                r.fail_closed = fail_closed;
            }
        }
        r
    }

    /// The `policy` label of `tessera_policy_verdicts_total`: `namespace/name` of a
    /// NetworkPolicy (isolation: every isolating one, comma-separated), `Kind/name` of an admin
    /// policy, `default`.
    pub fn label(&self) -> String {
        match self.kind {
            PolicyKind::Default => "default".into(),
            PolicyKind::NetworkPolicy if !self.isolated_by.is_empty() => self.isolated_by.join(","),
            PolicyKind::NetworkPolicy => format!(
                "{}/{}",
                self.namespace.as_deref().unwrap_or_default(),
                self.name
            ),
            kind => format!("{}/{}", kind.as_str(), self.name),
        }
    }
}

/// One decision about one flow. See docs/flow-log.md.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FlowRecord {
    /// Schema version ([`SCHEMA_VERSION`]).
    pub v: u32,
    /// When it was decided: unix milliseconds, written as RFC 3339 UTC (`2026-03-01T12:00:00.123Z`).
    #[serde(with = "rfc3339")]
    pub time: u64,
    /// The node whose agent decided.
    pub node: String,
    /// `ingress`: the local workload is the destination; `egress`: the source.
    #[serde(with = "direction_serde")]
    pub direction: Direction,
    /// `TCP`, `UDP`, `SCTP`, `ICMP`, `ICMPv6`, `IP-47`.
    #[serde(with = "protocol_serde")]
    pub protocol: Protocol,
    pub source: Endpoint,
    pub destination: Endpoint,
    pub verdict: FlowVerdict,
    /// The deciding policy or default, for policy decisions (absent for rejections made
    /// before any policy was asked, e.g. a refused token).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<PolicyRef>,
    /// Denied: the datapath's rejection label (`policy_ingress`, `policy_egress`, `bad_mac`,
    /// `replay`, `cert_expired`, `spoofed_source`, ...), as in
    /// `tessera_packets_rejected_total{reason}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<Cow<'static, str>>,
    /// Denied: the rejection in words, when it says more than `reason`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// Records of the same deciding policy (or rejection reason) the rate limit suppressed
    /// since the last one that got through.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub suppressed: u64,
    /// Allowed flows are sampled: this record stands for about this many.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sample_rate: Option<u32>,
    /// Audit mode: this policy denial was recorded, not applied (the flow went through).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub audit: bool,
    /// While policies are staged: the verdict the enforced set with the staged policies over
    /// it would give, and what would decide it (policy decisions only). A decision the staged
    /// set would flip is always recorded (under the staged policy's rate limit), whatever the
    /// sampling.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub staged: Option<StagedVerdict>,
}

/// What the staged policies would decide (see [`FlowRecord::staged`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StagedVerdict {
    pub verdict: FlowVerdict,
    pub policy: PolicyRef,
}

impl StagedVerdict {
    pub fn of(decision: &DecisionRef<'_>) -> StagedVerdict {
        StagedVerdict {
            verdict: FlowVerdict::of(decision.allowed),
            policy: PolicyRef::from_reason(&decision.reason),
        }
    }
}

impl FlowRecord {
    /// The local workload's end (destination for ingress, source for egress).
    pub fn local(&self) -> &Endpoint {
        match self.direction {
            Direction::Ingress => &self.destination,
            Direction::Egress => &self.source,
        }
    }
    /// The peer's end.
    pub fn peer(&self) -> &Endpoint {
        match self.direction {
            Direction::Ingress => &self.source,
            Direction::Egress => &self.destination,
        }
    }
    /// The destination port, if the protocol has ports.
    pub fn port(&self) -> Option<u16> {
        self.destination.port
    }
}

/// Tunables of the [`FlowLog`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlowLogConfig {
    /// Make records at all (off: only `tessera_policy_verdicts_total` is counted).
    pub records: bool,
    /// Allowed flows: 0 records none, N records one in N (1: every one).
    pub allowed_sample: u32,
    /// Denials and rejections: records per second let through per deciding policy (or
    /// rejection reason), after a burst of [`FlowLogConfig::denied_burst`]. 0: no limit.
    pub denied_per_second: u32,
    /// See [`FlowLogConfig::denied_per_second`].
    pub denied_burst: u32,
    /// Records held until drained; more are dropped and counted.
    pub capacity: usize,
    /// Distinct (policy, kind, verdict, direction) series of `tessera_policy_verdicts_total`;
    /// decisions of policies beyond it are counted under `policy="other"`.
    pub max_series: usize,
}

impl Default for FlowLogConfig {
    fn default() -> Self {
        FlowLogConfig {
            records: true,
            allowed_sample: 0,
            denied_per_second: 10,
            denied_burst: 20,
            capacity: 8192,
            max_series: 1000,
        }
    }
}

/// Rate-limit buckets at most: one per key, and one that the keys beyond share.
pub const MAX_LIMITER_KEYS: usize = 4096;

/// A record may be made: what to put in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Admit {
    /// Records of this key suppressed since the last admitted.
    pub suppressed: u64,
    /// Allowed flows: the sampling rate (one in N).
    pub sample_rate: Option<u32>,
}

/// A token bucket, in thousandths of a record.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    milli: u64,
    last_ms: u64,
    suppressed: u64,
}

/// One series of `tessera_policy_verdicts_total` (or, `staged`,
/// `tessera_staged_verdict_flips_total`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerdictSeries {
    /// A flip the staged policies would make: `verdict` is the staged one, `policy` what in
    /// the staged set decides it.
    pub staged: bool,
    /// `ns/name`, `Kind/name`, `default`, or `other` (past the series cap).
    pub policy: String,
    pub kind: PolicyKind,
    pub verdict: FlowVerdict,
    pub direction: Direction,
    pub count: u64,
}

/// The counters of a [`FlowLog`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FlowLogStats {
    /// Records queued for the shell.
    pub recorded: u64,
    /// Records the rate limit suppressed.
    pub suppressed: u64,
    /// Records dropped because the queue was full.
    pub dropped: u64,
    /// Allowed decisions not recorded by sampling.
    pub unsampled: u64,
    /// Decisions counted under `policy="other"` because the series cap was reached.
    pub overflow: u64,
}

/// The bounded recorder the processor writes into (see the module documentation).
#[derive(Debug)]
pub struct FlowLog {
    config: FlowLogConfig,
    node: String,
    pending: VecDeque<FlowRecord>,
    stats: FlowLogStats,
    allowed_seen: u64,
    buckets: ahash::HashMap<Box<str>, Bucket>,
    series: ahash::HashMap<Box<str>, usize>,
    series_list: Vec<VerdictSeries>,
    /// Where in `series_list` the `other` series of each kind, verdict and direction is
    /// (enforced, then staged flips).
    others: [Option<usize>; 2 * OTHER_SLOTS],
    /// Scratch for series and bucket keys (no allocation once warm).
    key: String,
}

/// Kinds × verdicts × directions.
const OTHER_SLOTS: usize = 5 * 2 * 2;

fn other_slot(kind: PolicyKind, verdict: FlowVerdict, direction: Direction) -> usize {
    let k = match kind {
        PolicyKind::NetworkPolicy => 0,
        PolicyKind::ClusterNetworkPolicy => 1,
        PolicyKind::AdminNetworkPolicy => 2,
        PolicyKind::BaselineAdminNetworkPolicy => 3,
        PolicyKind::Default => 4,
    };
    let v = match verdict {
        FlowVerdict::Allowed => 0,
        FlowVerdict::Denied => 1,
    };
    let d = match direction {
        Direction::Ingress => 0,
        Direction::Egress => 1,
    };
    k * 4 + v * 2 + d
}

/// The key of the rate-limit bucket every key beyond [`MAX_LIMITER_KEYS`] shares.
const OVERFLOW_BUCKET: &str = "";

impl FlowLog {
    /// A recorder for node `node`.
    pub fn new(node: &str, config: FlowLogConfig) -> FlowLog {
        FlowLog {
            config,
            node: node.to_owned(),
            pending: VecDeque::new(),
            stats: FlowLogStats::default(),
            allowed_seen: 0,
            buckets: Default::default(),
            series: Default::default(),
            series_list: Vec::new(),
            others: [None; 2 * OTHER_SLOTS],
            key: String::with_capacity(128),
        }
    }

    /// The configuration.
    pub fn config(&self) -> &FlowLogConfig {
        &self.config
    }

    /// Change the configuration; counts and pending records stay (a smaller capacity drops the
    /// newest pending records beyond it, counted).
    pub fn set_config(&mut self, config: FlowLogConfig) {
        self.config = config;
        while self.pending.len() > config.capacity {
            self.pending.pop_back();
            self.stats.dropped += 1;
        }
    }

    /// The node name records carry.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// A final policy decision (the one that lets a flow through, or a denial): counted in its
    /// series; `Some` when a record is to be made of it ([`FlowLog::push`]).
    pub fn decision(
        &mut self,
        now_ms: u64,
        direction: Direction,
        decision: &DecisionRef<'_>,
    ) -> Option<Admit> {
        let (kind, verdict) = (
            PolicyKind::of(&decision.reason),
            FlowVerdict::of(decision.allowed),
        );
        let (mut key, label_start) = self.series_key("", verdict, direction, &decision.reason);
        self.count(&key, label_start, kind, verdict, direction, false);
        let admit = if !self.config.records {
            None
        } else if decision.allowed {
            self.sample()
        } else {
            // Rate limit per deciding policy, both directions together.
            key.replace_range(..label_start, "p");
            self.limit(now_ms, &key)
        };
        self.key = key;
        admit
    }

    /// A final policy decision that the staged policies would flip (`staged` is the staged
    /// view's decision, its verdict the opposite of the enforced one): counted in
    /// `tessera_staged_verdict_flips_total`; `Some` when a record is to be made of it (rate
    /// limited per staged deciding policy, never sampled).
    pub fn staged_flip(
        &mut self,
        now_ms: u64,
        direction: Direction,
        staged: &DecisionRef<'_>,
    ) -> Option<Admit> {
        let (kind, verdict) = (
            PolicyKind::of(&staged.reason),
            FlowVerdict::of(staged.allowed),
        );
        let (mut key, label_start) = self.series_key("s", verdict, direction, &staged.reason);
        self.count(&key, label_start, kind, verdict, direction, true);
        let admit = if self.config.records {
            key.replace_range(..label_start, "S");
            self.limit(now_ms, &key)
        } else {
            None
        };
        self.key = key;
        admit
    }

    /// The series key of a decision in the reused scratch buffer (give it back to `self.key`):
    /// `prefix`, the verdict's and the direction's letters, then the deciding policy's label,
    /// which starts at the returned index.
    fn series_key(
        &mut self,
        prefix: &str,
        verdict: FlowVerdict,
        direction: Direction,
        reason: &ReasonRef<'_>,
    ) -> (String, usize) {
        let mut key = std::mem::take(&mut self.key);
        key.clear();
        key.push_str(prefix);
        key.push(match verdict {
            FlowVerdict::Allowed => 'a',
            FlowVerdict::Denied => 'd',
        });
        key.push(match direction {
            Direction::Ingress => 'i',
            Direction::Egress => 'e',
        });
        let label_start = key.len();
        write_label(&mut key, reason);
        (key, label_start)
    }

    /// A rejection the datapath made before (or without) a policy decision, under its label
    /// (`bad_mac`, `spoofed_source`, ...): `Some` when a record is to be made of it.
    pub fn rejection(&mut self, now_ms: u64, reason: &str) -> Option<Admit> {
        if !self.config.records {
            return None;
        }
        let mut key = std::mem::take(&mut self.key);
        key.clear();
        key.push('r');
        key.push_str(reason);
        let admit = self.limit(now_ms, &key);
        self.key = key;
        admit
    }

    /// Queue a record for the shell; dropped (and counted) when the queue is full.
    pub fn push(&mut self, record: FlowRecord) {
        if self.pending.len() >= self.config.capacity {
            self.stats.dropped += 1;
            return;
        }
        self.stats.recorded += 1;
        self.pending.push_back(record);
    }

    /// Move the queued records, oldest first, to the end of `out`.
    pub fn drain(&mut self, out: &mut Vec<FlowRecord>) {
        out.extend(self.pending.drain(..));
    }

    /// Records waiting to be drained.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// The counters.
    pub fn stats(&self) -> FlowLogStats {
        self.stats
    }

    /// The series of `tessera_policy_verdicts_total`, in first-seen order.
    pub fn verdicts(&self) -> &[VerdictSeries] {
        &self.series_list
    }

    /// The count of one series (0 if never seen).
    pub fn verdict_count(&self, policy: &str, verdict: FlowVerdict, direction: Direction) -> u64 {
        self.series_list
            .iter()
            .filter(|s| s.policy == policy && s.verdict == verdict && s.direction == direction)
            .map(|s| s.count)
            .sum()
    }

    fn count(
        &mut self,
        key: &str,
        label_start: usize,
        kind: PolicyKind,
        verdict: FlowVerdict,
        direction: Direction,
        staged: bool,
    ) {
        if let Some(i) = self.series.get(key) {
            if let Some(s) = self.series_list.get_mut(*i) {
                s.count += 1;
            }
            return;
        }
        if self.series.len() < self.config.max_series {
            self.series.insert(key.into(), self.series_list.len());
            self.series_list.push(VerdictSeries {
                staged,
                policy: key.get(label_start..).unwrap_or_default().to_owned(),
                kind,
                verdict,
                direction,
                count: 1,
            });
            return;
        }
        // Past the cap: one "other" series per kind, verdict and direction (20 at most).
        self.stats.overflow += 1;
        let slot = other_slot(kind, verdict, direction) + if staged { OTHER_SLOTS } else { 0 };
        match self.others.get(slot).copied().flatten() {
            Some(i) => {
                if let Some(s) = self.series_list.get_mut(i) {
                    s.count += 1;
                }
            }
            None => {
                if let Some(o) = self.others.get_mut(slot) {
                    *o = Some(self.series_list.len());
                }
                self.series_list.push(VerdictSeries {
                    staged,
                    policy: "other".to_owned(),
                    kind,
                    verdict,
                    direction,
                    count: 1,
                });
            }
        }
    }

    fn sample(&mut self) -> Option<Admit> {
        let n = self.config.allowed_sample;
        if n == 0 {
            return None;
        }
        self.allowed_seen += 1;
        if (self.allowed_seen - 1).is_multiple_of(u64::from(n)) {
            Some(Admit {
                suppressed: 0,
                sample_rate: (n > 1).then_some(n),
            })
        } else {
            self.stats.unsampled += 1;
            None
        }
    }

    fn limit(&mut self, now_ms: u64, key: &str) -> Option<Admit> {
        let rate = u64::from(self.config.denied_per_second);
        if rate == 0 {
            return Some(Admit {
                suppressed: 0,
                sample_rate: None,
            });
        }
        let burst = u64::from(self.config.denied_burst.max(1)) * 1000;
        // The shared bucket counts in the bound.
        let key = if self.buckets.contains_key(key) || self.buckets.len() + 1 < MAX_LIMITER_KEYS {
            key
        } else {
            OVERFLOW_BUCKET
        };
        let bucket = match self.buckets.get_mut(key) {
            Some(b) => b,
            None => self.buckets.entry(key.into()).or_insert(Bucket {
                milli: burst,
                last_ms: now_ms,
                suppressed: 0,
            }),
        };
        // `rate` records per second = `rate` thousandths per millisecond.
        let elapsed = now_ms.saturating_sub(bucket.last_ms);
        bucket.milli = bucket
            .milli
            .saturating_add(elapsed.saturating_mul(rate))
            .min(burst);
        bucket.last_ms = bucket.last_ms.max(now_ms);
        if bucket.milli >= 1000 {
            bucket.milli -= 1000;
            let suppressed = std::mem::take(&mut bucket.suppressed);
            Some(Admit {
                suppressed,
                sample_rate: None,
            })
        } else {
            bucket.suppressed += 1;
            self.stats.suppressed += 1;
            None
        }
    }

    /// Append `tessera_policy_verdicts_total` and the recorder's counters in the Prometheus
    /// text format.
    pub fn render_prometheus(&self, out: &mut String) {
        self.metrics().render_prometheus(out);
    }

    /// A copy of the counters the Prometheus text shows, to render (and sort) without holding
    /// whatever guards the log: the agent takes it under the processor's lock, which every
    /// packet decision needs, and renders after letting go.
    pub fn metrics(&self) -> FlowLogMetrics {
        FlowLogMetrics {
            max_series: self.config.max_series,
            stats: self.stats,
            series: self.series_list.clone(),
        }
    }
}

/// The counters of a [`FlowLog`] that its Prometheus text shows ([`FlowLog::metrics`]).
#[derive(Debug, Clone)]
pub struct FlowLogMetrics {
    max_series: usize,
    stats: FlowLogStats,
    series: Vec<VerdictSeries>,
}

impl FlowLogMetrics {
    /// Append `tessera_policy_verdicts_total` and the recorder's counters in the Prometheus
    /// text format.
    pub fn render_prometheus(&self, out: &mut String) {
        // Writing to a String cannot fail.
        let _ = self.render(out);
    }

    fn render(&self, out: &mut String) -> std::fmt::Result {
        writeln!(
            out,
            "# HELP tessera_policy_verdicts_total Flow decisions by deciding policy (namespace/name of a NetworkPolicy, Kind/name of an admin policy, default), kind, verdict and direction. At most {} series: decisions of further policies are counted under policy=\"other\" (see tessera_policy_verdict_series_overflow_total).",
            self.max_series
        )?;
        writeln!(out, "# TYPE tessera_policy_verdicts_total counter")?;
        self.render_series(out, "tessera_policy_verdicts_total", false)?;
        writeln!(
            out,
            "# HELP tessera_staged_verdict_flips_total Flow decisions the staged policies would flip, by what would decide them in the staged set (policy, kind), the verdict they would give, and direction. Shares the series cap of tessera_policy_verdicts_total."
        )?;
        writeln!(out, "# TYPE tessera_staged_verdict_flips_total counter")?;
        self.render_series(out, "tessera_staged_verdict_flips_total", true)?;
        writeln!(
            out,
            "# HELP tessera_policy_verdict_series_overflow_total Decisions counted under policy=\"other\" because tessera_policy_verdicts_total reached its series cap."
        )?;
        writeln!(
            out,
            "# TYPE tessera_policy_verdict_series_overflow_total counter"
        )?;
        writeln!(
            out,
            "tessera_policy_verdict_series_overflow_total {}",
            self.stats.overflow
        )?;
        writeln!(
            out,
            "# HELP tessera_flow_records_total Flow records by outcome: recorded (queued for the flow log), suppressed (rate limit of denials), dropped (queue full), unsampled (allowed flows skipped by sampling)."
        )?;
        writeln!(out, "# TYPE tessera_flow_records_total counter")?;
        for (what, n) in [
            ("recorded", self.stats.recorded),
            ("suppressed", self.stats.suppressed),
            ("dropped", self.stats.dropped),
            ("unsampled", self.stats.unsampled),
        ] {
            writeln!(out, "tessera_flow_records_total{{result=\"{what}\"}} {n}")?;
        }
        Ok(())
    }

    /// One metric's series (enforced verdicts, or staged flips), sorted.
    fn render_series(&self, out: &mut String, name: &str, staged: bool) -> std::fmt::Result {
        let mut series: Vec<&VerdictSeries> =
            self.series.iter().filter(|s| s.staged == staged).collect();
        series.sort_by(|a, b| {
            (
                &a.policy,
                a.kind,
                a.verdict.as_str(),
                a.direction.to_string(),
            )
                .cmp(&(
                    &b.policy,
                    b.kind,
                    b.verdict.as_str(),
                    b.direction.to_string(),
                ))
        });
        for s in series {
            writeln!(
                out,
                "{name}{{policy=\"{}\",kind=\"{}\",verdict=\"{}\",direction=\"{}\"}} {}",
                escape_label(&s.policy),
                s.kind.as_str(),
                s.verdict.as_str(),
                s.direction,
                s.count
            )?;
        }
        Ok(())
    }
}

/// A label value as the Prometheus text format wants it (`\`, `"` and newlines escaped).
/// Policy names are DNS labels, so this never changes one; it is here for safety.
fn escape_label(s: &str) -> Cow<'_, str> {
    if !s.contains(['\\', '"', '\n']) {
        return Cow::Borrowed(s);
    }
    Cow::Owned(
        s.replace('\\', "\\\\")
            .replace('"', "\\\"")
            .replace('\n', "\\n"),
    )
}

/// The series label of a reason, written without allocating (see [`PolicyRef::label`]).
fn write_label(out: &mut String, reason: &ReasonRef<'_>) {
    match reason {
        ReasonRef::NotIsolated | ReasonRef::HostNetwork | ReasonRef::UnknownWorkload(_) => {
            out.push_str("default")
        }
        ReasonRef::AllowedBy { policy, .. } => {
            out.push_str(&policy.namespace);
            out.push('/');
            out.push_str(&policy.name);
        }
        ReasonRef::Isolated(policies) => {
            for (i, p) in policies.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&p.namespace);
                out.push('/');
                out.push_str(&p.name);
            }
        }
        ReasonRef::Admin { policy, .. } => {
            out.push_str(PolicyKind::of_admin(policy.kind).as_str());
            out.push('/');
            out.push_str(&policy.name);
        }
    }
}

/// `Direction` as `ingress` / `egress`.
pub mod direction_serde {
    use policy::Direction;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Direction, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(d)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Direction, D::Error> {
        let s = Cow::<str>::deserialize(d)?;
        match &*s {
            "ingress" => Ok(Direction::Ingress),
            "egress" => Ok(Direction::Egress),
            other => Err(serde::de::Error::custom(format!(
                "direction {other:?}: expected ingress or egress"
            ))),
        }
    }

    use std::borrow::Cow;
}

/// Parse a protocol as [`Protocol`]'s `Display` writes it (`TCP`, `ICMPv6`, `IP-47`), in any
/// case, or an IP protocol number.
pub fn parse_protocol(s: &str) -> Option<Protocol> {
    let upper = s.to_ascii_uppercase();
    match upper.as_str() {
        "TCP" => Some(Protocol::Tcp),
        "UDP" => Some(Protocol::Udp),
        "SCTP" => Some(Protocol::Sctp),
        "ICMP" => Some(Protocol::ICMP),
        "ICMPV6" => Some(Protocol::ICMPV6),
        _ => upper
            .strip_prefix("IP-")
            .unwrap_or(&upper)
            .parse::<u8>()
            .ok()
            .map(Protocol::from_ip),
    }
}

/// `Protocol` as `TCP`, `UDP`, `SCTP`, `ICMP`, `ICMPv6`, `IP-<number>`.
pub mod protocol_serde {
    use policy::Protocol;
    use serde::{Deserialize, Deserializer, Serializer};
    use std::borrow::Cow;

    pub fn serialize<S: Serializer>(p: &Protocol, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(p)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Protocol, D::Error> {
        let s = Cow::<str>::deserialize(d)?;
        super::parse_protocol(&s)
            .ok_or_else(|| serde::de::Error::custom(format!("unknown protocol {s:?}")))
    }
}

/// Unix milliseconds as RFC 3339 in UTC with milliseconds (`2026-03-01T12:00:00.123Z`); read
/// back from any RFC 3339 timestamp (offset, fraction of any length).
pub mod rfc3339 {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::borrow::Cow;

    pub fn serialize<S: Serializer>(ms: &u64, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&format(*ms))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        let s = Cow::<str>::deserialize(d)?;
        parse(&s).ok_or_else(|| serde::de::Error::custom(format!("not an RFC 3339 time: {s:?}")))
    }

    /// Days since 1970-01-01 of a proleptic Gregorian date.
    fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
        // Years start in March, so the leap day is the last day of the year.
        let y = if m <= 2 { y - 1 } else { y };
        let era = y.div_euclid(400);
        let yoe = y.rem_euclid(400);
        let mp = (i64::from(m) + 9) % 12;
        let doy = (153 * mp + 2) / 5 + i64::from(d) - 1;
        let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
        era * 146_097 + doe - 719_468
    }

    /// The date of a day number ([`days_from_civil`]'s inverse).
    fn civil_from_days(days: i64) -> (i64, u32, u32) {
        let z = days + 719_468;
        let era = z.div_euclid(146_097);
        let doe = z.rem_euclid(146_097);
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
        let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
        let y = yoe + era * 400 + i64::from(m <= 2);
        (y, m, d)
    }

    /// `2026-03-01T12:00:00.123Z`.
    pub fn format(ms: u64) -> String {
        let secs = (ms / 1000) as i64;
        let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
        let (y, m, d) = civil_from_days(days);
        format!(
            "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
            rem / 3600,
            rem % 3600 / 60,
            rem % 60,
            ms % 1000
        )
    }

    fn num(s: &str) -> Option<u32> {
        if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        s.parse().ok()
    }

    /// Unix milliseconds of an RFC 3339 timestamp (`None` if it is not one, or before 1970).
    pub fn parse(s: &str) -> Option<u64> {
        let s = s.trim();
        let (date, rest) = s.split_at_checked(10)?;
        let mut parts = date.split('-');
        let (y, m, d) = (
            num(parts.next()?)?,
            num(parts.next()?)?,
            num(parts.next()?)?,
        );
        if !(1..=12).contains(&m) || !(1..=31).contains(&d) || date.len() != 10 {
            return None;
        }
        let rest = rest.strip_prefix(['T', 't', ' '])?;
        let (time, rest) = rest.split_at_checked(8)?;
        let mut hms = time.split(':');
        let (hh, mm, ss) = (num(hms.next()?)?, num(hms.next()?)?, num(hms.next()?)?);
        if hh > 23 || mm > 59 || ss > 60 {
            return None;
        }
        let (frac_ms, zone) = match rest.strip_prefix('.') {
            Some(f) => {
                let digits = f.bytes().take_while(u8::is_ascii_digit).count();
                if digits == 0 {
                    return None;
                }
                let (frac, zone) = f.split_at(digits);
                let mut ms = 0u32;
                for (i, c) in frac.bytes().take(3).enumerate() {
                    ms += u32::from(c - b'0') * [100, 10, 1][i];
                }
                (ms, zone)
            }
            None => (0, rest),
        };
        let offset_s: i64 = match zone {
            "Z" | "z" => 0,
            z => {
                let sign = match z.as_bytes().first()? {
                    b'+' => 1,
                    b'-' => -1,
                    _ => return None,
                };
                let (oh, om) = z.get(1..)?.split_once(':')?;
                if oh.len() != 2 || om.len() != 2 {
                    return None;
                }
                sign * (i64::from(num(oh)?) * 3600 + i64::from(num(om)?) * 60)
            }
        };
        let days = days_from_civil(i64::from(y), m, d);
        let secs =
            days * 86_400 + i64::from(hh) * 3600 + i64::from(mm) * 60 + i64::from(ss) - offset_s;
        let ms = secs.checked_mul(1000)?.checked_add(i64::from(frac_ms))?;
        u64::try_from(ms).ok()
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn formats_and_parses_back() {
            assert_eq!(format(0), "1970-01-01T00:00:00.000Z");
            assert_eq!(format(951_782_400_000), "2000-02-29T00:00:00.000Z");
            assert_eq!(format(1_780_000_000_123), "2026-05-28T20:26:40.123Z");
            for ms in [
                0u64,
                86_399_999,
                951_782_400_000,
                1_780_000_000_123,
                4_102_444_800_000,
            ] {
                assert_eq!(parse(&format(ms)), Some(ms), "{ms}");
            }
            // Every day for 3 centuries round-trips.
            for day in 0..(300 * 366) {
                let ms = day as u64 * 86_400_000 + 1234;
                assert_eq!(parse(&format(ms)), Some(ms));
            }
        }

        #[test]
        fn parses_offsets_and_fractions() {
            assert_eq!(parse("1970-01-01T01:00:00+01:00"), Some(0));
            assert_eq!(parse("1970-01-01T00:00:00.5Z"), Some(500));
            assert_eq!(parse("1970-01-01T00:00:01.123456789Z"), Some(1123));
            assert_eq!(parse("1969-12-31T23:00:00-01:00"), Some(0));
            for bad in [
                "",
                "1970-01-01",
                "1970-13-01T00:00:00Z",
                "1970-01-01T24:00:00Z",
                "1970-01-01T00:00:00",
                "1970-01-01T00:00:00.Z",
                "1969-12-31T23:59:59Z",
                "1970-01-01T00:00:00+0100",
                "x970-01-01T00:00:00Z",
            ] {
                assert_eq!(parse(bad), None, "{bad:?}");
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use policy::{AdminAction, AdminPolicyKey, PolicyKey};

    fn np(ns: &str, name: &str) -> PolicyKey {
        PolicyKey {
            namespace: ns.into(),
            name: name.into(),
        }
    }

    fn allowed_by(p: &PolicyKey) -> DecisionRef<'_> {
        DecisionRef {
            allowed: true,
            reason: ReasonRef::AllowedBy {
                policy: p,
                direction: Direction::Ingress,
                index: 2,
            },
        }
    }

    fn admin_deny(p: &AdminPolicyKey) -> DecisionRef<'_> {
        DecisionRef {
            allowed: false,
            reason: ReasonRef::Admin {
                policy: p,
                tier: Tier::Admin,
                priority: Some(10),
                direction: Direction::Egress,
                index: 1,
                action: AdminAction::Deny,
                fail_closed: false,
            },
        }
    }

    const DEFAULT_ALLOW: DecisionRef<'static> = DecisionRef {
        allowed: true,
        reason: ReasonRef::NotIsolated,
    };

    fn cnp(name: &str) -> AdminPolicyKey {
        AdminPolicyKey {
            kind: AdminKind::ClusterNetworkPolicy,
            name: name.into(),
        }
    }

    fn config(f: impl FnOnce(&mut FlowLogConfig)) -> FlowLogConfig {
        let mut c = FlowLogConfig::default();
        f(&mut c);
        c
    }

    #[test]
    fn denials_are_rate_limited_per_policy_and_carry_the_suppressed_count() {
        let mut log = FlowLog::new(
            "n1",
            config(|c| {
                c.denied_per_second = 2;
                c.denied_burst = 3;
            }),
        );
        let (a, b) = (cnp("a"), cnp("b"));
        let t = 1_000_000;
        // The burst passes, then the bucket is empty.
        for _ in 0..3 {
            assert_eq!(
                log.decision(t, Direction::Egress, &admin_deny(&a)),
                Some(Admit {
                    suppressed: 0,
                    sample_rate: None
                })
            );
        }
        for _ in 0..5 {
            assert_eq!(log.decision(t, Direction::Egress, &admin_deny(&a)), None);
        }
        // Another policy has its own bucket; so has a rejection reason.
        assert!(
            log.decision(t, Direction::Egress, &admin_deny(&b))
                .is_some()
        );
        assert!(log.rejection(t, "bad_mac").is_some());
        // Half a second later at 2/s: one token; the record says what it stood for.
        assert_eq!(
            log.decision(t + 499, Direction::Egress, &admin_deny(&a)),
            None
        );
        assert_eq!(
            log.decision(t + 999, Direction::Ingress, &admin_deny(&a)),
            Some(Admit {
                suppressed: 6,
                sample_rate: None
            })
        );
        assert_eq!(
            log.decision(t + 999, Direction::Egress, &admin_deny(&a)),
            None
        );
        assert_eq!(log.stats().suppressed, 7);
        // Counting is never limited.
        assert_eq!(
            log.verdict_count(
                "ClusterNetworkPolicy/a",
                FlowVerdict::Denied,
                Direction::Egress
            ),
            10
        );
        assert_eq!(
            log.verdict_count(
                "ClusterNetworkPolicy/a",
                FlowVerdict::Denied,
                Direction::Ingress
            ),
            1
        );
        // A long pause refills no more than the burst.
        let later = t + 3_600_000;
        let passed = (0..10)
            .filter(|_| {
                log.decision(later, Direction::Egress, &admin_deny(&a))
                    .is_some()
            })
            .count();
        assert_eq!(passed, 3);
    }

    #[test]
    fn time_going_backwards_neither_panics_nor_refills() {
        let mut log = FlowLog::new(
            "n1",
            config(|c| {
                c.denied_per_second = 1;
                c.denied_burst = 1;
            }),
        );
        assert!(log.rejection(10_000, "replay").is_some());
        assert!(log.rejection(5_000, "replay").is_none());
        assert!(log.rejection(10_500, "replay").is_none());
        assert_eq!(
            log.rejection(11_000, "replay").map(|a| a.suppressed),
            Some(2)
        );
    }

    #[test]
    fn rate_zero_means_unlimited_and_records_off_means_none() {
        let mut log = FlowLog::new("n1", config(|c| c.denied_per_second = 0));
        assert!((0..10_000).all(|_| log.rejection(1, "replay").is_some()));
        let mut off = FlowLog::new("n1", config(|c| c.records = false));
        assert!(off.rejection(1, "replay").is_none());
        assert!(
            off.decision(1, Direction::Ingress, &admin_deny(&cnp("a")))
                .is_none()
        );
        assert_eq!(off.verdicts().len(), 1, "still counted");
    }

    #[test]
    fn limiter_keys_are_bounded() {
        let mut log = FlowLog::new(
            "n1",
            config(|c| {
                c.denied_per_second = 1;
                c.denied_burst = 1;
            }),
        );
        for i in 0..MAX_LIMITER_KEYS - 1 {
            assert!(log.rejection(1, &format!("r{i}")).is_some());
        }
        assert_eq!(log.buckets.len(), MAX_LIMITER_KEYS - 1);
        // Beyond the cap, new keys share one bucket.
        assert!(log.rejection(1, "new-1").is_some());
        assert!(log.rejection(1, "new-2").is_none());
        assert_eq!(log.buckets.len(), MAX_LIMITER_KEYS);
    }

    #[test]
    fn allowed_flows_are_sampled_one_in_n() {
        let p = np("demo", "web");
        let mut off = FlowLog::new("n1", FlowLogConfig::default());
        assert!((0..100).all(|_| {
            off.decision(1, Direction::Ingress, &allowed_by(&p))
                .is_none()
        }));
        let mut every = FlowLog::new("n1", config(|c| c.allowed_sample = 1));
        assert!((0..100).all(|_| {
            every.decision(1, Direction::Ingress, &allowed_by(&p))
                == Some(Admit {
                    suppressed: 0,
                    sample_rate: None,
                })
        }));
        let mut tenth = FlowLog::new("n1", config(|c| c.allowed_sample = 10));
        let admitted: Vec<usize> = (0..35)
            .filter(|_| {
                tenth
                    .decision(1, Direction::Ingress, &DEFAULT_ALLOW)
                    .is_some()
            })
            .collect();
        assert_eq!(admitted, [0, 10, 20, 30]);
        assert_eq!(
            tenth
                .decision(1, Direction::Ingress, &DEFAULT_ALLOW)
                .and(None::<()>),
            None
        );
        assert_eq!(tenth.stats().unsampled, 32);
        let mut t = FlowLog::new("n1", config(|c| c.allowed_sample = 10));
        assert_eq!(
            t.decision(1, Direction::Ingress, &DEFAULT_ALLOW)
                .and_then(|a| a.sample_rate),
            Some(10)
        );
        // Sampled allowed flows are never rate limited.
        let mut all = FlowLog::new(
            "n1",
            config(|c| {
                c.allowed_sample = 1;
                c.denied_per_second = 1;
                c.denied_burst = 1;
            }),
        );
        assert!((0..100).all(|_| {
            all.decision(1, Direction::Ingress, &DEFAULT_ALLOW)
                .is_some()
        }));
    }

    #[test]
    fn pending_records_are_bounded_and_drained_in_order() {
        let mut log = FlowLog::new("n1", config(|c| c.capacity = 3));
        for i in 0..5 {
            log.push(record(i));
        }
        assert_eq!(log.pending(), 3);
        assert_eq!((log.stats().recorded, log.stats().dropped), (3, 2));
        let mut out = Vec::new();
        log.drain(&mut out);
        assert_eq!(out.iter().map(|r| r.time).collect::<Vec<_>>(), [0, 1, 2]);
        assert_eq!(log.pending(), 0);
        log.push(record(9));
        log.set_config(config(|c| c.capacity = 0));
        assert_eq!((log.pending(), log.stats().dropped), (0, 3));
    }

    #[test]
    fn series_are_capped_and_the_rest_counted_as_other() {
        let mut log = FlowLog::new("n1", config(|c| c.max_series = 3));
        let keys: Vec<PolicyKey> = (0..10).map(|i| np("ns", &format!("p{i}"))).collect();
        for k in &keys {
            log.decision(1, Direction::Ingress, &allowed_by(k));
            log.decision(1, Direction::Ingress, &allowed_by(k));
        }
        log.decision(1, Direction::Ingress, &DEFAULT_ALLOW);
        let names: Vec<&str> = log.verdicts().iter().map(|s| s.policy.as_str()).collect();
        assert_eq!(names, ["ns/p0", "ns/p1", "ns/p2", "other", "other"]);
        assert_eq!(
            log.verdict_count("other", FlowVerdict::Allowed, Direction::Ingress),
            15
        );
        assert_eq!(log.stats().overflow, 15);
        // Known series keep counting.
        log.decision(1, Direction::Ingress, &allowed_by(&keys[0]));
        assert_eq!(
            log.verdict_count("ns/p0", FlowVerdict::Allowed, Direction::Ingress),
            3
        );
        let mut text = String::new();
        log.render_prometheus(&mut text);
        assert!(text.contains(
            "tessera_policy_verdicts_total{policy=\"other\",kind=\"NetworkPolicy\",verdict=\"allowed\",direction=\"ingress\"} 14"
        ), "{text}");
        assert!(text.contains(
            "tessera_policy_verdicts_total{policy=\"other\",kind=\"default\",verdict=\"allowed\",direction=\"ingress\"} 1"
        ), "{text}");
        assert!(text.contains("tessera_policy_verdict_series_overflow_total 15"));
    }

    /// A real engine's denial by isolation: two NetworkPolicies isolate `demo/db-0` for ingress.
    fn isolated_decision(log: &mut FlowLog) -> PolicyRef {
        let yaml = ["db", "default-deny"]
            .map(|name| {
                format!(
                    "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: {name}, namespace: demo}}\nspec: {{podSelector: {{}}, policyTypes: [Ingress]}}\n"
                )
            })
            .join("---\n");
        let mut e = policy::Engine::new();
        let parsed = policy::objects::parse("t.yaml", &yaml);
        assert!(parsed.errors.is_empty(), "{:?}", parsed.errors);
        assert!(
            policy::objects::load(&mut e, &parsed.objects)
                .errors
                .is_empty()
        );
        let local = policy::PodKey {
            namespace: "demo".into(),
            name: "db-0".into(),
        };
        e.apply_workload(policy::Workload {
            key: local.clone(),
            labels: Default::default(),
            ports: vec![],
            ips: vec![],
            host_network: false,
        })
        .unwrap();
        let d = e.decide_ref(&policy::Connection {
            local: &local,
            direction: Direction::Ingress,
            peer: &policy::Peer::IpOnly,
            peer_ip: None,
            port: 5432,
            protocol: Protocol::Tcp,
            dest_port_name: None,
            resolved_names: &[],
        });
        assert!(!d.allowed);
        log.decision(1, Direction::Ingress, &d);
        PolicyRef::from_reason(&d.reason)
    }

    #[test]
    fn labels_name_the_deciding_policy() {
        let mut log = FlowLog::new("n1", FlowLogConfig::default());
        let iso = isolated_decision(&mut log);
        assert_eq!(iso.label(), "demo/db,demo/default-deny");
        assert_eq!(
            (
                iso.kind,
                iso.namespace.as_deref(),
                iso.name.as_str(),
                iso.rule
            ),
            (PolicyKind::NetworkPolicy, Some("demo"), "db", None)
        );
        assert_eq!(iso.isolated_by, ["demo/db", "demo/default-deny"]);
        let a = np("demo", "db");
        log.decision(1, Direction::Ingress, &allowed_by(&a));
        log.decision(1, Direction::Egress, &admin_deny(&cnp("x")));
        log.decision(1, Direction::Egress, &DEFAULT_ALLOW);
        let got: Vec<(&str, PolicyKind, FlowVerdict)> = log
            .verdicts()
            .iter()
            .map(|s| (s.policy.as_str(), s.kind, s.verdict))
            .collect();
        assert_eq!(
            got,
            [
                (
                    "demo/db,demo/default-deny",
                    PolicyKind::NetworkPolicy,
                    FlowVerdict::Denied
                ),
                ("demo/db", PolicyKind::NetworkPolicy, FlowVerdict::Allowed),
                (
                    "ClusterNetworkPolicy/x",
                    PolicyKind::ClusterNetworkPolicy,
                    FlowVerdict::Denied
                ),
                ("default", PolicyKind::Default, FlowVerdict::Allowed),
            ]
        );
        for (d, label) in [
            (allowed_by(&a), "demo/db"),
            (admin_deny(&cnp("x")), "ClusterNetworkPolicy/x"),
            (DEFAULT_ALLOW, "default"),
        ] {
            assert_eq!(PolicyRef::from_reason(&d.reason).label(), label);
        }
    }

    fn record(time: u64) -> FlowRecord {
        FlowRecord {
            v: SCHEMA_VERSION,
            time,
            node: "n1".into(),
            direction: Direction::Ingress,
            protocol: Protocol::Tcp,
            source: Endpoint::address("10.0.0.1".parse().unwrap(), Some(40000), IdentitySource::Ip),
            destination: Endpoint::address(
                "10.0.0.2".parse().unwrap(),
                Some(80),
                IdentitySource::Local,
            ),
            verdict: FlowVerdict::Allowed,
            policy: None,
            reason: None,
            detail: None,
            suppressed: 0,
            sample_rate: None,
            audit: false,
            staged: None,
        }
    }

    #[test]
    fn schema_round_trips_and_matches_the_documented_example() {
        let mut r = record(1_780_000_000_123);
        r.direction = Direction::Egress;
        r.protocol = Protocol::ICMPV6;
        r.source.port = None;
        r.source.identity = IdentitySource::Local;
        r.source.namespace = Some("shop".into());
        r.source.workload = Some("web-1".into());
        r.source.labels.insert("app".into(), "web".into());
        r.destination.port = None;
        r.destination.identity = IdentitySource::Pki;
        r.destination.node = Some("node-b".into());
        r.verdict = FlowVerdict::Denied;
        r.policy = Some(PolicyRef::from_reason(&admin_deny(&cnp("no-ping")).reason));
        r.reason = Some("policy_egress".into());
        r.suppressed = 4;
        let json = serde_json::to_string(&r).unwrap();
        assert_eq!(
            json,
            r#"{"v":1,"time":"2026-05-28T20:26:40.123Z","node":"n1","direction":"egress","protocol":"ICMPv6","source":{"ip":"10.0.0.1","namespace":"shop","workload":"web-1","labels":{"app":"web"},"identity":"local"},"destination":{"ip":"10.0.0.2","identity":"pki","node":"node-b"},"verdict":"denied","policy":{"kind":"ClusterNetworkPolicy","name":"no-ping","tier":"Admin","priority":10,"rule":1,"action":"Deny"},"reason":"policy_egress","suppressed":4}"#
        );
        let back: FlowRecord = serde_json::from_str(&json).unwrap();
        assert_eq!(back, r);
        for p in [
            Protocol::Tcp,
            Protocol::Udp,
            Protocol::Sctp,
            Protocol::ICMP,
            Protocol::Other(47),
        ] {
            let mut r = record(5);
            r.protocol = p;
            r.sample_rate = Some(7);
            r.detail = Some("d".into());
            let back: FlowRecord =
                serde_json::from_str(&serde_json::to_string(&r).unwrap()).unwrap();
            assert_eq!(back, r);
        }
        // Unknown fields (a later minor addition) are ignored.
        let extra = json.replacen("{\"v\":1,", "{\"v\":1,\"future\":[1],", 1);
        assert_eq!(serde_json::from_str::<FlowRecord>(&extra).unwrap(), r);
    }

    #[test]
    fn protocols_parse_as_displayed() {
        for p in [
            Protocol::Tcp,
            Protocol::Udp,
            Protocol::Sctp,
            Protocol::ICMP,
            Protocol::ICMPV6,
            Protocol::Other(47),
        ] {
            assert_eq!(parse_protocol(&p.to_string()), Some(p));
            assert_eq!(parse_protocol(&p.to_string().to_lowercase()), Some(p));
        }
        assert_eq!(parse_protocol("6"), Some(Protocol::Tcp));
        assert_eq!(parse_protocol("tcpx"), None);
    }
}
