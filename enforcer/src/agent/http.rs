//! `/metrics` (Prometheus text format), `/healthz`, `/status` (JSON, read by
//! `tessera status`) and `/flows` (flow records as JSON lines, read by `tessera flows`).

use std::fmt::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::UNIX_EPOCH;

use axum::Json;
use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{RawQuery, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde::{Deserialize, Serialize};

use datapath::tunnel::TunnelStats;

use super::flows::{self, Entry, FlowFilter, FlowQuery, HubStats};
use super::{ENFORCE_BUCKETS_S, QueueStats, Shared, lock};

/// Serve the HTTP endpoints on `addr` from a thread of their own, with a runtime of its own:
/// the probes and the metrics answer while the packet loops are saturated (a flood larger than
/// the agent can decide), which would otherwise hold the agent's one runtime thread between
/// batches, and the kubelet would restart a busy agent for failing its liveness probe.
/// Returns the address bound: with port 0 the kernel picks one, and the caller logs it.
pub fn start(
    addr: std::net::SocketAddr,
    shared: Arc<Shared>,
) -> anyhow::Result<std::net::SocketAddr> {
    use anyhow::Context;
    let listener =
        std::net::TcpListener::bind(addr).with_context(|| format!("--metrics-addr {addr}"))?;
    let bound = listener
        .local_addr()
        .with_context(|| format!("--metrics-addr {addr}"))?;
    listener
        .set_nonblocking(true)
        .with_context(|| format!("--metrics-addr {addr}"))?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the HTTP server's runtime")?;
    std::thread::Builder::new()
        .name("tessera-http".into())
        .spawn(move || {
            runtime.block_on(async move {
                match tokio::net::TcpListener::from_std(listener) {
                    Ok(listener) => serve(listener, shared).await,
                    Err(e) => tracing::error!("metrics server: {e}"),
                }
            })
        })
        .context("starting the HTTP server's thread")?;
    Ok(bound)
}

/// Serve until the listener fails; errors are logged.
pub async fn serve(listener: tokio::net::TcpListener, shared: Arc<Shared>) {
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/status", get(status))
        .route("/flows", get(flows))
        .with_state(shared);
    if let Err(e) = axum::serve(listener, app).await {
        tracing::error!("metrics server: {e}");
    }
}

/// 200 once the runtime's first complete list is enforced; 503 before (a readiness probe).
async fn healthz(State(shared): State<Arc<Shared>>) -> impl IntoResponse {
    if shared.ready.load(Ordering::Relaxed) {
        (axum::http::StatusCode::OK, "ok\n")
    } else {
        (axum::http::StatusCode::SERVICE_UNAVAILABLE, "starting\n")
    }
}

/// 200 once the runtime's first list is processed and every workload it wants is enforced;
/// 503 with the reasons otherwise (a readiness probe: a node whose workloads cannot be
/// enforced is not ready, though the process is alive).
async fn readyz(State(shared): State<Arc<Shared>>) -> impl IntoResponse {
    if !shared.ready.load(Ordering::Relaxed) {
        return (
            axum::http::StatusCode::SERVICE_UNAVAILABLE,
            "starting\n".to_owned(),
        );
    }
    let failing = lock(&shared.failing);
    if failing.is_empty() {
        return (axum::http::StatusCode::OK, "ok\n".to_owned());
    }
    let mut body = format!("{} workload(s) not enforced:\n", failing.len());
    for (name, why) in failing.iter() {
        let _ = writeln!(body, "{name}: {why}");
    }
    (axum::http::StatusCode::SERVICE_UNAVAILABLE, body)
}

async fn metrics(State(shared): State<Arc<Shared>>) -> impl IntoResponse {
    let tunnel = tunnel_stats(&shared).await;
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        render(&shared, tunnel.as_ref()),
    )
}

/// The tunnel's counters now (`--encrypt`): `None` without a tunnel, an error if it stopped.
pub async fn tunnel_stats(shared: &Shared) -> Option<Result<TunnelStats, String>> {
    let t = shared.tunnel.as_ref()?;
    Some(t.stats.stats().await.map_err(|e| e.to_string()))
}

/// What `/status` returns.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Status {
    pub node: String,
    pub identity: String,
    pub runtime: String,
    pub policies: usize,
    /// Cluster-wide admin policies in force (ClusterNetworkPolicy, AdminNetworkPolicy,
    /// BaselineAdminNetworkPolicy).
    #[serde(default)]
    pub admin_policies: usize,
    /// Staged policies: evaluated beside those in force (the flow log shows what they would
    /// decide), not enforced.
    #[serde(default)]
    pub staged_policies: usize,
    pub workloads: Vec<WorkloadInfo>,
    /// Workloads the runtime wants that could not be enforced, with the reason.
    #[serde(default)]
    pub not_enforced: std::collections::BTreeMap<String, String>,
    pub peers: Vec<PeerInfo>,
    pub counters: Counters,
    /// The tunnel between nodes (`--encrypt`); absent when off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tunnel: Option<TunnelStatus>,
    /// The guard of workloads that require encryption; absent until one does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encryption_guard: Option<GuardInfo>,
}

/// The guard of workloads that require encryption, in `/status`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GuardInfo {
    /// `namespace/name` of each workload that requires encryption.
    pub workloads: Vec<String>,
    /// The addresses the rules in force guard (updated once a change is applied).
    pub addresses: Vec<String>,
    /// The other nodes' pod prefixes: what is cross-node.
    pub remote_prefixes: Vec<String>,
    /// Why the last change could not be applied (the previous rules stay).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The tunnel between nodes in `/status`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TunnelStatus {
    pub device: String,
    /// The UDP address it listens on.
    pub listen: String,
    /// This node's tunnel public key (hex); absent if the counters could not be read.
    #[serde(default)]
    pub public_key: Option<String>,
    /// Why the counters could not be read (the tunnel stopped).
    #[serde(default)]
    pub error: Option<String>,
    pub peers: Vec<TunnelPeerInfo>,
    /// Known nodes that are not peers, with why.
    pub not_peers: std::collections::BTreeMap<String, String>,
    /// Drops that belong to no peer, by reason (`no_peer`: a packet to the pods of a node that
    /// is not a peer; `unknown_key`: a handshake from a key no peer has; ...).
    pub dropped: std::collections::BTreeMap<String, u64>,
}

/// One peer node of the tunnel.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TunnelPeerInfo {
    pub node: String,
    pub endpoint: String,
    /// Its tunnel public key (hex).
    pub public_key: String,
    pub allowed_ips: Vec<String>,
    /// Handshakes completed with it (this session's key; a new key starts from 0).
    pub handshakes: u64,
    /// Seconds since the last completed handshake; absent before the first.
    pub handshake_age_seconds: Option<f64>,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    pub rx_packets: u64,
    pub tx_packets: u64,
    /// Its datagrams and packets dropped, by reason.
    pub drops: std::collections::BTreeMap<String, u64>,
}

fn tunnel_status(
    t: &super::tunnel::TunnelShared,
    stats: &Result<TunnelStats, String>,
) -> TunnelStatus {
    let reasons = |v: &[(datapath::tunnel::Reason, u64)]| {
        v.iter().map(|(r, n)| (r.as_str().to_owned(), *n)).collect()
    };
    let not_peers = lock(&t.not_peers).clone();
    let mut out = TunnelStatus {
        device: t.device.clone(),
        listen: t.listen.to_string(),
        public_key: None,
        error: None,
        peers: Vec::new(),
        not_peers,
        dropped: Default::default(),
    };
    match stats {
        Err(e) => out.error = Some(e.clone()),
        Ok(s) => {
            out.public_key = Some(s.public_key.to_string());
            out.dropped = reasons(&s.dropped);
            out.peers = s
                .peers
                .iter()
                .map(|p| TunnelPeerInfo {
                    node: p.name.clone(),
                    endpoint: p.endpoint.to_string(),
                    public_key: p.public_key.to_string(),
                    allowed_ips: p.allowed_ips.iter().map(ToString::to_string).collect(),
                    handshakes: p.handshakes,
                    handshake_age_seconds: p.handshake_age.map(|d| d.as_secs_f64()),
                    rx_bytes: p.rx_bytes,
                    tx_bytes: p.tx_bytes,
                    rx_packets: p.rx_packets,
                    tx_packets: p.tx_packets,
                    drops: reasons(&p.errors),
                })
                .collect();
        }
    }
    out
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadInfo {
    pub name: String,
    pub origin: String,
    pub netns: String,
    pub labels: std::collections::BTreeMap<String, String>,
    /// Seconds since the Unix epoch.
    pub enforced_since: u64,
    pub serving: bool,
    pub queue_dropped: u64,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PeerInfo {
    pub node: String,
    pub key_id: String,
    /// PKI: certificate expiry, seconds since the Unix epoch.
    pub not_after: Option<u64>,
    pub active: bool,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Counters {
    pub authorized_verified: u64,
    pub authorized_ip_only: u64,
    pub rejected: std::collections::BTreeMap<String, u64>,
    pub flows: usize,
    pub queue_dropped: u64,
    pub workload_failures: u64,
    pub policy_reload_failures: u64,
    /// The bound handshake's events that happened, by protocol (`tcp`, `udp`), then event
    /// (`tessera_bound_handshakes_total`). Absent from agents older than it.
    #[serde(default)]
    pub bound: std::collections::BTreeMap<String, std::collections::BTreeMap<String, u64>>,
}

pub fn status_of(shared: &Shared, tunnel: Option<&Result<TunnelStats, String>>) -> Status {
    let workloads = lock(&shared.workloads)
        .iter()
        .map(|(name, w)| WorkloadInfo {
            name: name.clone(),
            origin: w.origin.clone(),
            netns: w.netns.clone(),
            labels: w.labels.clone(),
            enforced_since: w
                .enforced_since
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            serving: w.stats.serving.load(Ordering::Relaxed),
            queue_dropped: w.stats.queue_dropped.load(Ordering::Relaxed)
                + w.stats.user_dropped.load(Ordering::Relaxed),
        })
        .collect();
    let p = lock(&shared.processor);
    let m = p.metrics();
    let (verified, ip_only) = m.authorized();
    let (qd, ud) = m.queue_drops();
    Status {
        node: shared.node_name.clone(),
        identity: match p.node().mode() {
            identity::Mode::Pki => "pki".into(),
            identity::Mode::Psk => "psk".into(),
        },
        runtime: shared.runtime.into(),
        policies: shared.policies.load(Ordering::Relaxed),
        admin_policies: shared.admin_policies.load(Ordering::Relaxed),
        staged_policies: shared.staged_policies.load(Ordering::Relaxed),
        workloads,
        not_enforced: lock(&shared.failing).clone(),
        peers: p
            .node()
            .peer_nodes()
            .into_iter()
            .map(|n| PeerInfo {
                node: n.node,
                key_id: n.key_id.to_string(),
                not_after: n.not_after_ms.map(|ms| ms / 1000),
                active: n.active,
            })
            .collect(),
        counters: Counters {
            authorized_verified: verified,
            authorized_ip_only: ip_only,
            rejected: m.rejected_all().map(|(r, n)| (r.to_owned(), n)).collect(),
            flows: m.flows(),
            queue_dropped: qd + ud,
            workload_failures: shared.workload_failures.load(Ordering::Relaxed),
            policy_reload_failures: shared.reload_failures.load(Ordering::Relaxed),
            bound: m
                .bound_all()
                .fold(Default::default(), |mut by, (protocol, event, n)| {
                    by.entry(protocol.to_owned())
                        .or_insert_with(std::collections::BTreeMap::new)
                        .insert(event.to_owned(), n);
                    by
                }),
        },
        tunnel: shared
            .tunnel
            .as_ref()
            .zip(tunnel)
            .map(|(t, stats)| tunnel_status(t, stats)),
        encryption_guard: lock(&shared.guard).as_ref().map(|g| GuardInfo {
            workloads: g.workloads.clone(),
            addresses: g.guarded.local.iter().map(|a| a.to_string()).collect(),
            remote_prefixes: g.guarded.remote.iter().map(|n| n.to_string()).collect(),
            error: g.error.clone(),
        }),
    }
}

async fn status(State(shared): State<Arc<Shared>>) -> Json<Status> {
    let tunnel = tunnel_stats(&shared).await;
    Json(status_of(&shared, tunnel.as_ref()))
}

/// How long a follower of `/flows` may go without a byte: then it gets a blank line, so a
/// client that went away is noticed (and its slot freed) even while no record comes.
const FOLLOW_KEEPALIVE: std::time::Duration = std::time::Duration::from_secs(15);

/// Lines of the backlog per chunk of a `/flows` stream.
const BACKLOG_CHUNK: usize = 64;

/// Bytes a chunk of live records gathers at most.
const LIVE_CHUNK_BYTES: usize = 64 * 1024;

/// `GET /flows`: the ring's records that the query selects, as JSON lines; with `follow=1`,
/// then the live records too. Each follower has a buffer of [`flows::CLIENT_BUFFER`] lines
/// between the hub and its connection: a client that lets it fill up (it reads too slowly, or
/// not at all) is dropped and counted, gets what its buffer holds and then the end of the
/// stream. Blank lines are keep-alives. Query: see [`FlowQuery`].
async fn flows(State(shared): State<Arc<Shared>>, RawQuery(query): RawQuery) -> Response {
    let q = match FlowQuery::parse(query.as_deref().unwrap_or("")) {
        Ok(q) => q,
        Err(e) => return (StatusCode::BAD_REQUEST, format!("{e:#}\n")).into_response(),
    };
    let ndjson = [(header::CONTENT_TYPE, "application/x-ndjson")];
    let hub = &shared.flows;
    let now = super::now_ms();
    if !q.follow {
        let body: String = hub
            .recent(&q, now)
            .iter()
            .map(|e| e.line.as_str())
            .collect();
        return (ndjson, body).into_response();
    }
    let Some(slot) = Follower::take(&hub.stats) else {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "{} clients already follow the flow records\n",
                flows::MAX_FOLLOWERS
            ),
        )
            .into_response();
    };
    let (backlog, live) = hub.follow(&q, now);
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(flows::CLIENT_BUFFER);
    tokio::spawn(forward(backlog, live, q.filter, tx, slot));
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        let first = rx.recv().await?;
        if first.len() >= LIVE_CHUNK_BYTES {
            return Some((Ok::<_, std::convert::Infallible>(first), rx));
        }
        // Whatever else is already there goes in the same chunk.
        let mut chunk = Vec::from(first);
        while chunk.len() < LIVE_CHUNK_BYTES {
            match rx.try_recv() {
                Ok(b) => chunk.extend_from_slice(&b),
                Err(_) => break,
            }
        }
        Some((Ok(Bytes::from(chunk)), rx))
    });
    (ndjson, Body::from_stream(stream)).into_response()
}

/// A follower's pump: its backlog, then the live records its filter selects, into its
/// connection's buffer, until the client goes (the buffer's receiver is dropped), the buffer
/// is full or the hub's records overtake it (the client is too slow: dropped, counted).
async fn forward(
    backlog: Vec<Arc<Entry>>,
    mut live: tokio::sync::broadcast::Receiver<Arc<Entry>>,
    filter: FlowFilter,
    tx: tokio::sync::mpsc::Sender<Bytes>,
    slot: Follower,
) {
    use tokio::sync::broadcast::error::RecvError;
    use tokio::sync::mpsc::error::TrySendError;
    for chunk in backlog.chunks(BACKLOG_CHUNK) {
        let bytes: String = chunk.iter().map(|e| e.line.as_str()).collect();
        // The backlog is bounded (the ring): waiting for the client here is fine; meanwhile
        // the live records queue up for it in the hub, where it may be overtaken.
        if tx.send(Bytes::from(bytes)).await.is_err() {
            return;
        }
    }
    let mut quiet_until = tokio::time::Instant::now() + FOLLOW_KEEPALIVE;
    let slow = loop {
        let e = tokio::select! {
            r = live.recv() => r,
            () = tx.closed() => break false,
            () = tokio::time::sleep_until(quiet_until) => {
                quiet_until = tokio::time::Instant::now() + FOLLOW_KEEPALIVE;
                match tx.try_send(Bytes::from_static(b"\n")) {
                    Ok(()) => continue,
                    Err(TrySendError::Full(_)) => break true,
                    Err(TrySendError::Closed(_)) => break false,
                }
            }
        };
        match e {
            Ok(e) if filter.matches(&e.record) => {
                quiet_until = tokio::time::Instant::now() + FOLLOW_KEEPALIVE;
                match tx.try_send(Bytes::from(e.line.clone())) {
                    Ok(()) => {}
                    Err(TrySendError::Full(_)) => break true,
                    Err(TrySendError::Closed(_)) => break false,
                }
            }
            Ok(_) => {}
            Err(RecvError::Lagged(_)) => break true,
            Err(RecvError::Closed) => break false,
        }
    };
    if slow {
        slot.0.followers_dropped.fetch_add(1, Ordering::Relaxed);
        tracing::info!(
            buffer = flows::CLIENT_BUFFER,
            "a /flows follower fell behind and was dropped"
        );
    }
}

/// A follower's slot among [`flows::MAX_FOLLOWERS`]; freed when its pump ends.
struct Follower(Arc<HubStats>);

impl Follower {
    fn take(stats: &Arc<HubStats>) -> Option<Follower> {
        let taken = stats
            .followers
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n < flows::MAX_FOLLOWERS).then_some(n + 1)
            })
            .is_ok();
        if !taken {
            stats.followers_refused.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        Some(Follower(stats.clone()))
    }
}

impl Drop for Follower {
    fn drop(&mut self) {
        self.0.followers.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The processor's metrics plus the agent's own, and the tunnel's when it runs.
pub fn render(shared: &Shared, tunnel: Option<&Result<TunnelStats, String>>) -> String {
    let mut out = String::with_capacity(4096);
    // Copies under the processor's lock (every packet decision waits for it), rendered after.
    let (metrics, flow_log) = {
        let p = lock(&shared.processor);
        (p.metrics().clone(), p.flow_log().metrics())
    };
    metrics.render_prometheus(&mut out);
    flow_log.render_prometheus(&mut out);
    let _ = render_agent(shared, &mut out);
    shared.flows.render_prometheus(&mut out);
    if let Some(t) = &shared.tunnel {
        let not_peers = lock(&t.not_peers).len();
        let stats = tunnel.and_then(|s| s.as_ref().ok());
        let _ = render_tunnel(stats, not_peers, &mut out);
    }
    out
}

/// `tessera_tunnel_*`: label values are node names and drop reasons only.
fn render_tunnel(
    stats: Option<&TunnelStats>,
    not_peers: usize,
    out: &mut String,
) -> std::fmt::Result {
    use datapath::tunnel::Reason;
    writeln!(
        out,
        "# HELP tessera_tunnel_up Whether the tunnel between nodes runs (--encrypt; 0: it stopped)."
    )?;
    writeln!(out, "# TYPE tessera_tunnel_up gauge")?;
    writeln!(out, "tessera_tunnel_up {}", u8::from(stats.is_some()))?;
    writeln!(
        out,
        "# HELP tessera_tunnel_nodes Known nodes by tunnel state: peer, or not a peer (no pod CIDRs, address or trusted key; see tessera status)."
    )?;
    writeln!(out, "# TYPE tessera_tunnel_nodes gauge")?;
    let peers = stats.map_or(0, |s| s.peers.len());
    writeln!(out, "tessera_tunnel_nodes{{state=\"peer\"}} {peers}")?;
    writeln!(
        out,
        "tessera_tunnel_nodes{{state=\"not_peer\"}} {not_peers}"
    )?;
    let Some(s) = stats else { return Ok(()) };
    writeln!(
        out,
        "# HELP tessera_tunnel_bytes_total IP bytes through the tunnel per peer node, before encryption (tx) and after decryption (rx); restarts from 0 when the peer's key changes."
    )?;
    writeln!(out, "# TYPE tessera_tunnel_bytes_total counter")?;
    for p in &s.peers {
        writeln!(
            out,
            "tessera_tunnel_bytes_total{{peer=\"{}\",direction=\"rx\"}} {}",
            p.name, p.rx_bytes
        )?;
        writeln!(
            out,
            "tessera_tunnel_bytes_total{{peer=\"{}\",direction=\"tx\"}} {}",
            p.name, p.tx_bytes
        )?;
    }
    writeln!(
        out,
        "# HELP tessera_tunnel_packets_total Packets through the tunnel per peer node (tx: data messages sent, keepalives included; rx: packets delivered)."
    )?;
    writeln!(out, "# TYPE tessera_tunnel_packets_total counter")?;
    for p in &s.peers {
        writeln!(
            out,
            "tessera_tunnel_packets_total{{peer=\"{}\",direction=\"rx\"}} {}",
            p.name, p.rx_packets
        )?;
        writeln!(
            out,
            "tessera_tunnel_packets_total{{peer=\"{}\",direction=\"tx\"}} {}",
            p.name, p.tx_packets
        )?;
    }
    writeln!(
        out,
        "# HELP tessera_tunnel_handshakes_total WireGuard handshakes completed per peer node (either side initiating)."
    )?;
    writeln!(out, "# TYPE tessera_tunnel_handshakes_total counter")?;
    for p in &s.peers {
        writeln!(
            out,
            "tessera_tunnel_handshakes_total{{peer=\"{}\"}} {}",
            p.name, p.handshakes
        )?;
    }
    writeln!(
        out,
        "# HELP tessera_tunnel_handshake_age_seconds Time since the last completed handshake per peer node (absent before the first; sessions are renewed every 2 minutes while in use)."
    )?;
    writeln!(out, "# TYPE tessera_tunnel_handshake_age_seconds gauge")?;
    for p in &s.peers {
        if let Some(age) = p.handshake_age {
            writeln!(
                out,
                "tessera_tunnel_handshake_age_seconds{{peer=\"{}\"}} {}",
                p.name,
                age.as_secs_f64()
            )?;
        }
    }
    writeln!(
        out,
        "# HELP tessera_tunnel_dropped_total Datagrams and packets the tunnel dropped, by reason (no_peer: to the pods of a node that is not a peer; unknown_key: a handshake from a key of no peer; disallowed_source: a peer speaking for addresses not its own; ...)."
    )?;
    writeln!(out, "# TYPE tessera_tunnel_dropped_total counter")?;
    for r in Reason::ALL {
        let n = s.dropped_for(r) + s.peers.iter().map(|p| p.errors_for(r)).sum::<u64>();
        writeln!(
            out,
            "tessera_tunnel_dropped_total{{reason=\"{}\"}} {n}",
            r.as_str()
        )?;
    }
    Ok(())
}

fn render_agent(shared: &Shared, out: &mut String) -> std::fmt::Result {
    let workloads = lock(&shared.workloads);
    writeln!(
        out,
        "# HELP tessera_workloads_enforced Workloads whose rules and queue are in place."
    )?;
    writeln!(out, "# TYPE tessera_workloads_enforced gauge")?;
    let serving = workloads
        .values()
        .filter(|w| w.stats.serving.load(Ordering::Relaxed))
        .count();
    writeln!(out, "tessera_workloads_enforced {serving}")?;
    writeln!(
        out,
        "# HELP tessera_workload_failures_total Workloads a runtime asked for that could not be enforced (bad identity, namespace gone, rules refused)."
    )?;
    writeln!(out, "# TYPE tessera_workload_failures_total counter")?;
    writeln!(
        out,
        "tessera_workload_failures_total {}",
        shared.workload_failures.load(Ordering::Relaxed)
    )?;
    writeln!(out, "# HELP tessera_policies NetworkPolicies in force.")?;
    writeln!(out, "# TYPE tessera_policies gauge")?;
    writeln!(
        out,
        "tessera_policies {}",
        shared.policies.load(Ordering::Relaxed)
    )?;
    writeln!(
        out,
        "# HELP tessera_admin_policies Cluster-wide admin policies in force (ClusterNetworkPolicy, AdminNetworkPolicy, BaselineAdminNetworkPolicy)."
    )?;
    writeln!(out, "# TYPE tessera_admin_policies gauge")?;
    writeln!(
        out,
        "tessera_admin_policies {}",
        shared.admin_policies.load(Ordering::Relaxed)
    )?;
    writeln!(
        out,
        "# HELP tessera_staged_policies Staged policies (annotated tessera.dev/staged: \"true\"): evaluated beside those in force, not enforced (see tessera_staged_verdict_flips_total)."
    )?;
    writeln!(out, "# TYPE tessera_staged_policies gauge")?;
    writeln!(
        out,
        "tessera_staged_policies {}",
        shared.staged_policies.load(Ordering::Relaxed)
    )?;
    writeln!(
        out,
        "# HELP tessera_udp_send_errors_total Datagrams of the agent's own (UDP control datagrams, released held datagrams) that could not be sent."
    )?;
    writeln!(out, "# TYPE tessera_udp_send_errors_total counter")?;
    writeln!(
        out,
        "tessera_udp_send_errors_total {}",
        shared.udp_send_errors.load(Ordering::Relaxed)
    )?;
    if let Some(bp) = &shared.busy_poll {
        let st = bp.stats();
        writeln!(
            out,
            "# HELP tessera_busy_poll_spins_total Looks at the queues before the agent's thread slept (--busy-poll-us), by whether a packet came before the budget ran out (hit: a sleep and its wake-up saved)."
        )?;
        writeln!(out, "# TYPE tessera_busy_poll_spins_total counter")?;
        writeln!(
            out,
            "tessera_busy_poll_spins_total{{result=\"hit\"}} {}",
            st.hits
        )?;
        writeln!(
            out,
            "tessera_busy_poll_spins_total{{result=\"miss\"}} {}",
            st.spins.saturating_sub(st.hits)
        )?;
    }
    writeln!(
        out,
        "# HELP tessera_policy_reload_failures_total Policy reloads refused (the previous set stayed in force)."
    )?;
    writeln!(out, "# TYPE tessera_policy_reload_failures_total counter")?;
    writeln!(
        out,
        "tessera_policy_reload_failures_total {}",
        shared.reload_failures.load(Ordering::Relaxed)
    )?;
    writeln!(
        out,
        "# HELP tessera_workload_queue_dropped_total Packets the kernel dropped for a workload's queue: queue full (reason=queue_full) or socket buffer full (reason=socket_full)."
    )?;
    writeln!(out, "# TYPE tessera_workload_queue_dropped_total counter")?;
    for (name, w) in workloads.iter() {
        writeln!(
            out,
            "tessera_workload_queue_dropped_total{{workload=\"{name}\",reason=\"queue_full\"}} {}",
            w.stats.queue_dropped.load(Ordering::Relaxed)
        )?;
        writeln!(
            out,
            "tessera_workload_queue_dropped_total{{workload=\"{name}\",reason=\"socket_full\"}} {}",
            w.stats.user_dropped.load(Ordering::Relaxed)
        )?;
    }
    writeln!(
        out,
        "# HELP tessera_queue_recv_errors_total Queue socket receive errors survived (ENOBUFS, ENOSPC)."
    )?;
    writeln!(out, "# TYPE tessera_queue_recv_errors_total counter")?;
    // A counter of every workload's queue, summed.
    let sum = |f: fn(&QueueStats) -> &AtomicU64| -> u64 {
        workloads
            .values()
            .map(|w| f(&w.stats).load(Ordering::Relaxed))
            .sum()
    };
    writeln!(
        out,
        "tessera_queue_recv_errors_total {}",
        sum(|s| &s.recv_errors)
    )?;
    writeln!(
        out,
        "# HELP tessera_queue_verdict_messages_total Verdict messages the queues were sent; the drops of a read batch share one."
    )?;
    writeln!(out, "# TYPE tessera_queue_verdict_messages_total counter")?;
    writeln!(
        out,
        "tessera_queue_verdict_messages_total {}",
        sum(|s| &s.verdict_messages)
    )?;
    writeln!(
        out,
        "# HELP tessera_queue_verdicts_total Queued packets answered by those messages."
    )?;
    writeln!(out, "# TYPE tessera_queue_verdicts_total counter")?;
    writeln!(
        out,
        "tessera_queue_verdicts_total {}",
        sum(|s| &s.verdict_packets)
    )?;
    drop(workloads);
    let h = lock(&shared.enforce_latency);
    writeln!(
        out,
        "# HELP tessera_workload_enforce_seconds Time from a workload's start (as its runtime reported it) to its rules and queue in place."
    )?;
    writeln!(out, "# TYPE tessera_workload_enforce_seconds histogram")?;
    let mut cumulative = 0;
    for (i, le) in ENFORCE_BUCKETS_S.iter().enumerate() {
        cumulative += h.buckets[i];
        writeln!(
            out,
            "tessera_workload_enforce_seconds_bucket{{le=\"{le}\"}} {cumulative}"
        )?;
    }
    cumulative += h.buckets[ENFORCE_BUCKETS_S.len()];
    writeln!(
        out,
        "tessera_workload_enforce_seconds_bucket{{le=\"+Inf\"}} {cumulative}"
    )?;
    writeln!(out, "tessera_workload_enforce_seconds_sum {}", h.sum_s)?;
    writeln!(out, "tessera_workload_enforce_seconds_count {}", h.count)?;
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::agent::flows::tests::record;
    use crate::agent::flows::{CLIENT_BUFFER, FlowHub, RING_RECORDS};
    use crate::cli::flows::FlowsArgs;
    use crate::cli::status::Output;
    use datapath::flowlog::{FlowRecord, FlowVerdict};
    use std::collections::BTreeMap;
    use std::io::{BufRead, BufReader, Read, Write};
    use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize};
    use std::sync::{Arc, Mutex};

    /// An agent's shared state over a PSK node without workloads, serving on a local port.
    async fn agent() -> (Arc<Shared>, String) {
        let psk = identity::Psk::new(b"flows test key, 32 bytes or more!!").unwrap();
        let node = identity::Node::new_psk("node-b", psk, identity::Config::default()).unwrap();
        let processor = datapath::Processor::new(
            node,
            policy::Engine::new(),
            datapath::ProcessorConfig::default(),
        );
        let shared = Arc::new(Shared {
            node_name: "node-b".into(),
            runtime: "static",
            processor: Arc::new(Mutex::new(processor)),
            workloads: Mutex::new(BTreeMap::new()),
            policies: AtomicUsize::new(0),
            admin_policies: AtomicUsize::new(0),
            staged_policies: AtomicUsize::new(0),
            reload_failures: AtomicU64::new(0),
            udp_send_errors: Arc::new(AtomicU64::new(0)),
            busy_poll: None,
            workload_failures: AtomicU64::new(0),
            enforce_latency: Mutex::new(Default::default()),
            failing: Mutex::new(BTreeMap::new()),
            ready: AtomicBool::new(true),
            flows: Arc::new(FlowHub::new(RING_RECORDS, CLIENT_BUFFER, None).unwrap()),
            tunnel: None,
            guard: Default::default(),
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        tokio::spawn(serve(listener, shared.clone()));
        (shared, addr)
    }

    fn args(addr: &str, output: Output) -> FlowsArgs {
        FlowsArgs {
            addr: addr.into(),
            follow: false,
            since: None,
            last: None,
            namespace: vec![],
            pod: vec![],
            label: vec![],
            verdict: None,
            protocol: None,
            port: None,
            staged: false,
            output,
        }
    }

    /// Run `tessera flows` (its code, on a blocking thread) and return what it printed.
    async fn flows_cli(a: FlowsArgs) -> (anyhow::Result<()>, String) {
        tokio::task::spawn_blocking(move || {
            let mut out = Vec::new();
            let r = crate::cli::flows::stream(&a, &mut out);
            (r, String::from_utf8(out).unwrap())
        })
        .await
        .unwrap()
    }

    fn allowed(time: u64) -> FlowRecord {
        let mut r = record(time);
        r.verdict = FlowVerdict::Allowed;
        r.reason = None;
        r
    }

    #[tokio::test]
    async fn flows_cli_reads_the_endpoint_with_its_filters() {
        let (shared, addr) = agent().await;
        let records: Vec<FlowRecord> = (1..=30)
            .map(|t| if t % 3 == 0 { allowed(t) } else { record(t) })
            .collect();
        shared.flows.publish(records.clone());

        // JSON: the last 20 by default, exactly as published.
        let (r, out) = flows_cli(args(&addr, Output::Json)).await;
        r.unwrap();
        let got: Vec<FlowRecord> = out
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(got, records[10..]);

        // Filters are applied by the agent.
        let mut a = args(&addr, Output::Json);
        a.verdict = Some(FlowVerdict::Allowed);
        a.last = Some(1000);
        let (r, out) = flows_cli(a).await;
        r.unwrap();
        let times: Vec<u64> = out
            .lines()
            .map(|l| serde_json::from_str::<FlowRecord>(l).unwrap().time)
            .collect();
        assert_eq!(times, [3, 6, 9, 12, 15, 18, 21, 24, 27, 30]);
        let mut a = args(&addr, Output::Text);
        a.pod = vec!["shop/db-0".into()];
        a.port = Some(5432);
        a.last = Some(2);
        let (r, out) = flows_cli(a).await;
        r.unwrap();
        assert_eq!(out.lines().count(), 2, "{out}");
        assert!(
            out.lines()
                .all(|l| l.contains("shop/web-1 [pki@node-a] -> shop/db-0 [local] TCP 5432")),
            "{out}"
        );
        let mut a = args(&addr, Output::Json);
        a.namespace = vec!["elsewhere".into()];
        let (r, out) = flows_cli(a).await;
        r.unwrap();
        assert_eq!(out, "");

        // A bad query is the agent's 400, shown with its reason.
        let url = format!("http://{addr}/flows?port=none");
        let resp = tokio::task::spawn_blocking(move || {
            ureq::Agent::config_builder()
                .http_status_as_error(false)
                .build()
                .new_agent()
                .get(&url)
                .call()
                .unwrap()
                .status()
        })
        .await
        .unwrap();
        assert_eq!(resp, 400);
    }

    /// A writer that takes `n` lines, then says the pipe is broken (as `| head -n` would).
    struct Head {
        text: Arc<Mutex<String>>,
        n: usize,
    }

    impl Write for Head {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            let mut text = self.text.lock().unwrap();
            if text.matches('\n').count() >= self.n {
                return Err(std::io::ErrorKind::BrokenPipe.into());
            }
            text.push_str(&String::from_utf8_lossy(buf));
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[tokio::test]
    async fn flows_cli_follows_new_records() {
        let (shared, addr) = agent().await;
        shared.flows.publish(vec![record(1), record(2)]);
        let text = Arc::new(Mutex::new(String::new()));
        let mut a = args(&addr, Output::Json);
        a.follow = true;
        a.last = Some(1);
        a.verdict = Some(FlowVerdict::Denied);
        let mut head = Head {
            text: text.clone(),
            n: 3,
        };
        let cli = tokio::task::spawn_blocking(move || crate::cli::flows::stream(&a, &mut head));
        // The backlog (the last one), then live records, the allowed one filtered out.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while shared.flows.stats.followers.load(Ordering::Relaxed) == 0 {
            assert!(std::time::Instant::now() < deadline, "no follower");
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        shared.flows.publish(vec![allowed(3), record(4)]);
        shared.flows.publish(vec![record(5), record(6)]);
        let err = cli.await.unwrap().unwrap_err();
        assert!(
            err.downcast_ref::<std::io::Error>()
                .is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe),
            "{err:#}"
        );
        let times: Vec<u64> = text
            .lock()
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str::<FlowRecord>(l).unwrap().time)
            .collect();
        assert_eq!(times, [2, 4, 5]);
        // The follower's slot is given back once its connection is gone.
        while shared.flows.stats.followers.load(Ordering::Relaxed) != 0 {
            assert!(std::time::Instant::now() < deadline, "slot kept");
            shared.flows.publish(vec![record(7)]);
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }

    #[tokio::test]
    async fn a_follower_that_does_not_read_is_dropped_and_counted() {
        let (shared, addr) = agent().await;
        // A raw client: asks to follow, reads the headers, then stops reading.
        let mut conn = std::net::TcpStream::connect(&addr).unwrap();
        write!(
            conn,
            "GET /flows?follow=1 HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while shared.flows.stats.followers.load(Ordering::Relaxed) == 0 {
            assert!(std::time::Instant::now() < deadline, "no follower");
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        // Far more than the socket buffers and the client buffer hold.
        let mut big = record(1);
        big.detail = Some("x".repeat(2000));
        while shared.flows.stats.followers_dropped.load(Ordering::Relaxed) == 0 {
            assert!(std::time::Instant::now() < deadline, "never dropped");
            shared.flows.publish(vec![big.clone(); 512]);
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
        while shared.flows.stats.followers.load(Ordering::Relaxed) != 0 {
            assert!(std::time::Instant::now() < deadline, "slot kept");
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        // It got what fit, then the end of the stream.
        let reader = tokio::task::spawn_blocking(move || {
            let mut r = BufReader::new(conn);
            let mut status = String::new();
            r.read_line(&mut status).unwrap();
            let mut rest = Vec::new();
            let _ = r.read_to_end(&mut rest);
            (status, rest.len())
        });
        let (status, body) = reader.await.unwrap();
        assert!(status.starts_with("HTTP/1.1 200"), "{status}");
        assert!(body > 0);
        let mut text = String::new();
        crate::agent::flows::FlowHub::render_prometheus(&shared.flows, &mut text);
        assert!(
            text.contains("tessera_flow_stream_followers_dropped_total{reason=\"slow\"} 1"),
            "{text}"
        );
    }

    #[test]
    fn tunnel_metrics_are_labelled_by_peer_node_and_reason_only() {
        use datapath::tunnel::{PeerStats, PublicKey, Reason, TunnelStats};
        let stats = TunnelStats {
            public_key: PublicKey([1; 32]),
            peers: vec![PeerStats {
                name: "node-b".into(),
                public_key: PublicKey([2; 32]),
                endpoint: "192.0.2.2:51871".parse().unwrap(),
                allowed_ips: vec!["10.2.0.0/24".parse().unwrap()],
                tx_bytes: 100,
                rx_bytes: 200,
                tx_packets: 3,
                rx_packets: 4,
                handshakes: 1,
                last_handshake_ms: Some(1),
                handshake_age: Some(std::time::Duration::from_millis(1500)),
                errors: vec![(Reason::Replay, 2)],
            }],
            dropped: vec![(Reason::NoPeer, 5), (Reason::Replay, 1)],
        };
        let mut out = String::new();
        render_tunnel(Some(&stats), 1, &mut out).unwrap();
        for line in [
            "tessera_tunnel_up 1",
            "tessera_tunnel_nodes{state=\"peer\"} 1",
            "tessera_tunnel_nodes{state=\"not_peer\"} 1",
            "tessera_tunnel_bytes_total{peer=\"node-b\",direction=\"rx\"} 200",
            "tessera_tunnel_bytes_total{peer=\"node-b\",direction=\"tx\"} 100",
            "tessera_tunnel_handshakes_total{peer=\"node-b\"} 1",
            "tessera_tunnel_handshake_age_seconds{peer=\"node-b\"} 1.5",
            "tessera_tunnel_dropped_total{reason=\"no_peer\"} 5",
            "tessera_tunnel_dropped_total{reason=\"replay\"} 3",
            "tessera_tunnel_dropped_total{reason=\"decrypt\"} 0",
        ] {
            assert!(out.lines().any(|l| l == line), "{line} missing:\n{out}");
        }
        // Every series' labels are peer (a node name), direction, state or reason.
        for l in out.lines().filter(|l| !l.starts_with('#')) {
            if let Some((_, labels)) = l.split_once('{') {
                for kv in labels.split('}').next().unwrap().split(',') {
                    let k = kv.split('=').next().unwrap();
                    assert!(["peer", "direction", "state", "reason"].contains(&k), "{l}");
                }
            }
        }
        let mut out = String::new();
        render_tunnel(None, 0, &mut out).unwrap();
        assert!(out.contains("tessera_tunnel_up 0"), "{out}");
        assert!(!out.contains("bytes_total{"), "{out}");
    }
}
