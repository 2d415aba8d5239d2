//! Flow records at the processor's decision points (see [`crate::flowlog`]): each final policy
//! decision is counted per deciding policy and, when the recorder takes it, recorded with both
//! ends as the processor knew them; refusals made before any policy decision (a refused token,
//! a spoofed source, ...) and flows cut by a re-check are recorded too. Nothing here is built
//! unless the recorder admits the record: the cost of a decision that is not recorded is one
//! count.

use std::borrow::Cow;
use std::net::SocketAddr;

use identity::PeerIdentity;
use policy::{Connection, DecisionRef, Direction, Engine, Peer, PodKey, Protocol};

use super::{Hook, Processor, Reason, Step};
use crate::dns::MAX_NAMES_PER_ADDRESS;
use crate::established::Authorized;
use crate::flow::FlowKey;
use crate::flowlog::{
    Admit, Endpoint, FlowLog, FlowRecord, FlowVerdict, IdentitySource, PolicyRef, SCHEMA_VERSION,
    StagedVerdict,
};
use crate::packet::IpDatagram;

/// Who the peer of a decision is, and how the processor knows.
#[derive(Clone, Copy)]
pub(super) enum Who<'x> {
    /// A token's claims, checked but not proven yet (the server at a SYN): a denial is final,
    /// an allowance is not (the ACK decides again), so only a denial is counted and recorded.
    Tentative(&'x PeerIdentity),
    /// Proven by the handshake.
    Proven(&'x PeerIdentity),
    /// Known by its address: the engine's workload there, if any (else nothing but the
    /// address).
    Address(Option<&'x PodKey>),
}

impl Step<'_> {
    /// One direction's decision on `key`'s flow, counted and (when final and admitted)
    /// recorded. Egress carries the names the workload resolved to the peer's address whose
    /// TTL has not run out (for admin `domainNames` peers).
    pub(super) fn decide(
        &mut self,
        key: &FlowKey,
        direction: Direction,
        peer: &Peer,
        who: Who<'_>,
        dest_port_name: Option<&str>,
    ) -> bool {
        let (engine, dns, wl) = (self.engine, self.dns, self.wl);
        let peer_ip = key.remote.ip();
        let mut names = [""; MAX_NAMES_PER_ADDRESS];
        let n = if direction == Direction::Ingress || dns.is_empty() {
            0
        } else {
            dns.names(self.id, peer_ip, self.now, &mut names)
        };
        if n > 0 {
            self.metrics.count_dns_decision();
        }
        let conn = Connection {
            local: &wl.key,
            direction,
            peer,
            peer_ip: Some(peer_ip),
            port: match direction {
                Direction::Ingress => key.local.port(),
                Direction::Egress => key.remote.port(),
            },
            protocol: key.protocol,
            dest_port_name,
            resolved_names: &names[..n],
        };
        let d = engine.decide_ref(&conn);
        // A tentative allowance is no decision yet: the ACK decides again.
        if !(d.allowed && matches!(who, Who::Tentative(_))) {
            let admit = self.flowlog.decision(self.now, direction, &d);
            // Staged policies: what they would decide, beside; a flip is always recorded.
            let staged = engine.staged_view().map(|view| view.decide_ref(&conn));
            let flip = match &staged {
                Some(s) if s.allowed != d.allowed => {
                    self.flowlog.staged_flip(self.now, direction, s)
                }
                _ => None,
            };
            if let Some(admit) = admit.or(flip) {
                self.record_decision(key, direction, peer, who, &d, staged.as_ref(), admit);
            }
        }
        // Audit mode: a policy denial is recorded (above, marked `audit`) and not applied.
        d.allowed || self.config.audit
    }

    #[allow(clippy::too_many_arguments)]
    fn record_decision(
        &mut self,
        key: &FlowKey,
        direction: Direction,
        peer: &Peer,
        who: Who<'_>,
        d: &DecisionRef<'_>,
        staged: Option<&DecisionRef<'_>>,
        admit: Admit,
    ) {
        let mode = self.node.mode();
        let local = local_endpoint(self.engine, &self.wl.key, key.local, key.protocol);
        let mut remote = Endpoint::address(
            key.remote.ip(),
            port_of(key.remote, key.protocol),
            IdentitySource::Ip,
        );
        match who {
            Who::Tentative(p) | Who::Proven(p) => {
                remote.identity = match mode {
                    identity::Mode::Pki => IdentitySource::Pki,
                    identity::Mode::Psk => IdentitySource::Psk,
                };
                remote.namespace = Some(p.claims.namespace().to_owned());
                remote.workload = Some(p.claims.workload().to_owned());
                remote.labels = p.claims.labels().clone();
                remote.node = Some(p.node.clone());
            }
            Who::Address(pod) => {
                if let (Some(pod), Peer::Workload(id)) = (pod, peer) {
                    remote.namespace = Some(pod.namespace.clone());
                    remote.workload = Some(pod.name.clone());
                    remote.labels = id.labels.clone();
                }
            }
        }
        let reason = (!d.allowed).then_some(Cow::Borrowed(match direction {
            Direction::Ingress => Reason::PolicyIngress.as_str(),
            Direction::Egress => Reason::PolicyEgress.as_str(),
        }));
        let record = record(
            self.flowlog,
            self.now,
            direction,
            key.protocol,
            local,
            remote,
            d.allowed,
            Some(PolicyRef::from_reason(&d.reason)),
            reason,
            admit,
        );
        let audit = self.config.audit && !d.allowed;
        self.flowlog.push(FlowRecord {
            audit,
            staged: staged.map(StagedVerdict::of),
            ..record
        });
    }
}

impl Processor {
    /// The flow recorder: its counts, its configuration.
    pub fn flow_log(&self) -> &FlowLog {
        &self.flowlog
    }

    /// The flow recorder, to configure it ([`FlowLog::set_config`]).
    pub fn flow_log_mut(&mut self) -> &mut FlowLog {
        &mut self.flowlog
    }

    /// Move the flow records made since the last call, oldest first, to the end of `out`.
    pub fn drain_flow_records(&mut self, out: &mut Vec<FlowRecord>) {
        self.flowlog.drain(out);
    }

    /// A packet refused with `reason` (see [`recorded_rejection`]): recorded if admitted, with
    /// the local workload as its end and no identity for the peer's.
    pub(super) fn note_rejection(
        &mut self,
        id: super::WorkloadId,
        hook: Hook,
        packet: &[u8],
        reason: &Reason,
        now_ms: u64,
    ) {
        if !recorded_rejection(reason) {
            return;
        }
        let Some(admit) = self.flowlog.rejection(now_ms, reason.as_str()) else {
            return;
        };
        // A packet that does not parse has no addresses to show: counted, not recorded.
        let Ok(d) = IpDatagram::parse(packet) else {
            return;
        };
        let protocol = Protocol::from_ip(d.protocol);
        let src = SocketAddr::new(d.src, d.src_port);
        let dst = SocketAddr::new(d.dst, d.dst_port);
        let (direction, local, remote) = match hook {
            Hook::Output => (Direction::Egress, src, dst),
            Hook::Input => (Direction::Ingress, dst, src),
        };
        let local = match self.workloads.get(&id) {
            Some(w) => local_endpoint(&self.engine, &w.key, local, protocol),
            None => Endpoint::address(local.ip(), port_of(local, protocol), IdentitySource::None),
        };
        let remote =
            Endpoint::address(remote.ip(), port_of(remote, protocol), IdentitySource::None);
        self.push_rejection(now_ms, direction, protocol, local, remote, reason, admit);
    }

    /// Records a refusal made before any policy decision, with its label and words.
    #[allow(clippy::too_many_arguments)]
    fn push_rejection(
        &mut self,
        now_ms: u64,
        direction: Direction,
        protocol: Protocol,
        local: Endpoint,
        remote: Endpoint,
        reason: &Reason,
        admit: Admit,
    ) {
        let mut r = record(
            &self.flowlog,
            now_ms,
            direction,
            protocol,
            local,
            remote,
            false,
            None,
            Some(Cow::Borrowed(reason.as_str())),
            admit,
        );
        r.detail = detail(reason);
        self.flowlog.push(r);
    }

    /// A packet the node's guard queued (see [`crate::shell::encrypted`]): between a local
    /// workload that requires encryption and another node's pod, and not through the tunnel
    /// between nodes. Always refused: counted as `not_encrypted` and recorded (if admitted)
    /// with the local workload as its end (the destination when it is one of ours, else the
    /// source) and the peer as the engine knows its address. The peer's identity is never
    /// established: nothing outside the tunnel proves where the packet came from.
    pub fn refuse_unencrypted(&mut self, packet: &[u8], now_ms: u64) -> super::Verdict {
        let reason = Reason::NotEncrypted;
        self.metrics.count_rejected(reason.as_str());
        let verdict = super::Verdict::drop(reason);
        let Some(admit) = self
            .flowlog
            .rejection(now_ms, Reason::NotEncrypted.as_str())
        else {
            return verdict;
        };
        // A packet that does not parse has no addresses to show: counted, not recorded.
        let Ok(d) = IpDatagram::parse(packet) else {
            return verdict;
        };
        let protocol = Protocol::from_ip(d.protocol);
        let src = SocketAddr::new(d.src, d.src_port);
        let dst = SocketAddr::new(d.dst, d.dst_port);
        let ours = |ip: &std::net::IpAddr| {
            self.engine
                .workload_by_ip(ip)
                .map(|w| &w.key)
                .filter(|k| self.local_keys.contains(*k))
        };
        let (direction, local, remote, key) = match (ours(&d.dst), ours(&d.src)) {
            (Some(k), _) => (Direction::Ingress, dst, src, Some(k)),
            (None, Some(k)) => (Direction::Egress, src, dst, Some(k)),
            // The workload went meanwhile: shown as the destination, by address.
            (None, None) => (Direction::Ingress, dst, src, None),
        };
        let local = match key {
            Some(k) => local_endpoint(&self.engine, k, local, protocol),
            None => Endpoint::address(local.ip(), port_of(local, protocol), IdentitySource::None),
        };
        let mut peer =
            Endpoint::address(remote.ip(), port_of(remote, protocol), IdentitySource::Ip);
        if let Some(w) = self.engine.workload_by_ip(&remote.ip()) {
            peer.namespace = Some(w.key.namespace.clone());
            peer.workload = Some(w.key.name.clone());
            peer.labels = w.labels.clone();
        }
        self.push_rejection(
            now_ms,
            direction,
            protocol,
            local,
            peer,
            &Reason::NotEncrypted,
            admit,
        );
        verdict
    }

    /// An established flow [`Processor::recheck`] cuts: recorded (if admitted, under the
    /// deciding policy's rate limit) with the decision that cuts it, `reason: flow_cut`.
    /// Not counted in the verdicts: it is no new flow.
    pub(super) fn note_cut(&mut self, key: &FlowKey, f: &Authorized, now_ms: u64) {
        let Some(wl) = self.workloads.get(&key.workload) else {
            return;
        };
        let mut names = [""; MAX_NAMES_PER_ADDRESS];
        for (slot, name) in names.iter_mut().zip(f.resolved_names.iter()) {
            *slot = name;
        }
        let names = &names[..f.resolved_names.len().min(MAX_NAMES_PER_ADDRESS)];
        // As the re-check judged it: the peer as it proved itself, then its pod's current
        // identity if the engine knows it.
        let current = f
            .peer_pod
            .as_ref()
            .and_then(|pod| self.engine.identity(pod))
            .map(Peer::Workload);
        let first = cut_decision(&self.engine, &wl.key, key, f, &f.peer, names);
        let (peer, policy) = match (&current, first.allowed) {
            (Some(now), true) => (
                now,
                PolicyRef::from_reason(
                    &cut_decision(&self.engine, &wl.key, key, f, now, names).reason,
                ),
            ),
            _ => (&*f.peer, PolicyRef::from_reason(&first.reason)),
        };
        let mut key_text = String::from("cut:");
        key_text.push_str(&policy.label());
        let Some(admit) = self.flowlog.rejection(now_ms, &key_text) else {
            return;
        };
        let local = local_endpoint(&self.engine, &wl.key, key.local, key.protocol);
        let mut remote = Endpoint::address(
            key.remote.ip(),
            port_of(key.remote, key.protocol),
            IdentitySource::Ip,
        );
        if let (Some(pod), Peer::Workload(id)) = (&f.peer_pod, peer) {
            remote.namespace = Some(pod.namespace.clone());
            remote.workload = Some(pod.name.clone());
            remote.labels = id.labels.clone();
        }
        let mut r = record(
            &self.flowlog,
            now_ms,
            f.direction,
            key.protocol,
            local,
            remote,
            false,
            Some(policy),
            Some(Cow::Borrowed(Reason::FlowCut.as_str())),
            admit,
        );
        r.detail = Some(
            "an established flow, cut: a policy, label or namespace change denies it now".into(),
        );
        self.flowlog.push(r);
    }
}

/// The decision a re-check takes on an established flow with `peer`.
fn cut_decision<'e>(
    engine: &'e Engine,
    local: &'e PodKey,
    key: &FlowKey,
    f: &'e Authorized,
    peer: &'e Peer,
    names: &'e [&'e str],
) -> DecisionRef<'e> {
    engine.decide_ref(&Connection {
        local,
        direction: f.direction,
        peer,
        peer_ip: Some(key.remote.ip()),
        port: match f.direction {
            Direction::Ingress => key.local.port(),
            Direction::Egress => key.remote.port(),
        },
        protocol: key.protocol,
        dest_port_name: f.port_name.as_deref(),
        resolved_names: names,
    })
}

/// Whether a refusal is recorded by [`Processor::note_rejection`]: every one but the policy
/// denials (recorded at their decision, with the policy) and a plain datagram answering our
/// own UDP control datagram (how an agentless peer shows itself, not a decision on a flow).
pub(super) fn recorded_rejection(reason: &Reason) -> bool {
    !matches!(
        reason,
        Reason::PolicyIngress | Reason::PolicyEgress | Reason::UdpHandshakePending
    )
}

/// The words of a refusal, where they say more than its label.
fn detail(reason: &Reason) -> Option<String> {
    match reason {
        Reason::Handshake(_)
        | Reason::LocalHandshake(_)
        | Reason::Packet(_)
        | Reason::UdpControl(_) => Some(reason.to_string()),
        Reason::NotEncrypted => Some(
            "a cross-node packet outside the tunnel between nodes: the workload requires encryption"
                .into(),
        ),
        _ => None,
    }
}

fn port_of(addr: SocketAddr, protocol: Protocol) -> Option<u16> {
    protocol.has_ports().then_some(addr.port())
}

/// The local workload's end: its name, its labels as the engine has them.
fn local_endpoint(engine: &Engine, key: &PodKey, addr: SocketAddr, protocol: Protocol) -> Endpoint {
    Endpoint {
        ip: addr.ip(),
        port: port_of(addr, protocol),
        namespace: Some(key.namespace.clone()),
        workload: Some(key.name.clone()),
        labels: engine
            .workload(key)
            .map(|w| w.labels.clone())
            .unwrap_or_default(),
        identity: IdentitySource::Local,
        node: None,
    }
}

#[allow(clippy::too_many_arguments)]
fn record(
    log: &FlowLog,
    now_ms: u64,
    direction: Direction,
    protocol: Protocol,
    local: Endpoint,
    remote: Endpoint,
    allowed: bool,
    policy: Option<PolicyRef>,
    reason: Option<Cow<'static, str>>,
    admit: Admit,
) -> FlowRecord {
    let (source, destination) = match direction {
        Direction::Ingress => (remote, local),
        Direction::Egress => (local, remote),
    };
    FlowRecord {
        v: SCHEMA_VERSION,
        time: now_ms,
        node: log.node().to_owned(),
        direction,
        protocol,
        source,
        destination,
        verdict: if allowed {
            FlowVerdict::Allowed
        } else {
            FlowVerdict::Denied
        },
        policy,
        reason,
        detail: None,
        suppressed: admit.suppressed,
        sample_rate: admit.sample_rate,
        audit: false,
        staged: None,
    }
}
