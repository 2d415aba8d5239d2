//! `/metrics` (Prometheus text format), `/healthz` and `/status` (JSON, read by
//! `tessera status`).

use std::fmt::Write;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::UNIX_EPOCH;

use axum::Json;
use axum::Router;
use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use serde::{Deserialize, Serialize};

use super::{ENFORCE_BUCKETS_S, Shared, lock};

/// Serve until the listener fails; errors are logged.
pub async fn serve(listener: tokio::net::TcpListener, shared: Arc<Shared>) {
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/status", get(status))
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
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        render(&shared),
    )
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
    pub workloads: Vec<WorkloadInfo>,
    /// Workloads the runtime wants that could not be enforced, with the reason.
    #[serde(default)]
    pub not_enforced: std::collections::BTreeMap<String, String>,
    pub peers: Vec<PeerInfo>,
    pub counters: Counters,
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
}

pub fn status_of(shared: &Shared) -> Status {
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
        },
    }
}

async fn status(State(shared): State<Arc<Shared>>) -> Json<Status> {
    Json(status_of(&shared))
}

/// The processor's metrics plus the agent's own.
pub fn render(shared: &Shared) -> String {
    let mut out = String::with_capacity(4096);
    lock(&shared.processor)
        .metrics()
        .render_prometheus(&mut out);
    let _ = render_agent(shared, &mut out);
    out
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
        "# HELP tessera_udp_send_errors_total Datagrams of the agent's own (UDP control datagrams, released held datagrams) that could not be sent."
    )?;
    writeln!(out, "# TYPE tessera_udp_send_errors_total counter")?;
    writeln!(
        out,
        "tessera_udp_send_errors_total {}",
        shared.udp_send_errors.load(Ordering::Relaxed)
    )?;
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
    let errors: u64 = workloads
        .values()
        .map(|w| w.stats.recv_errors.load(Ordering::Relaxed))
        .sum();
    writeln!(out, "tessera_queue_recv_errors_total {errors}")?;
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
