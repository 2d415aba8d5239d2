//! `/metrics` (Prometheus text format) and `/healthz`.

use std::fmt::Write;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::Router;
use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;

use super::{Shared, lock};

/// Serve until the listener fails; errors are logged.
pub async fn serve(listener: tokio::net::TcpListener, shared: Arc<Shared>) {
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .with_state(shared);
    if let Err(e) = axum::serve(listener, app).await {
        tracing::error!("metrics server: {e}");
    }
}

async fn metrics(State(shared): State<Arc<Shared>>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        render(&shared),
    )
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
    writeln!(
        out,
        "# HELP tessera_workloads_enforced Workloads whose rules and queue are in place."
    )?;
    writeln!(out, "# TYPE tessera_workloads_enforced gauge")?;
    let serving = shared
        .queues
        .iter()
        .filter(|(_, s)| s.serving.load(Ordering::Relaxed))
        .count();
    writeln!(out, "tessera_workloads_enforced {serving}")?;
    writeln!(out, "# HELP tessera_policies NetworkPolicies in force.")?;
    writeln!(out, "# TYPE tessera_policies gauge")?;
    writeln!(
        out,
        "tessera_policies {}",
        shared.policies.load(Ordering::Relaxed)
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
    for (name, s) in &shared.queues {
        writeln!(
            out,
            "tessera_workload_queue_dropped_total{{workload=\"{name}\",reason=\"queue_full\"}} {}",
            s.queue_dropped.load(Ordering::Relaxed)
        )?;
        writeln!(
            out,
            "tessera_workload_queue_dropped_total{{workload=\"{name}\",reason=\"socket_full\"}} {}",
            s.user_dropped.load(Ordering::Relaxed)
        )?;
    }
    writeln!(
        out,
        "# HELP tessera_queue_recv_errors_total Queue socket receive errors survived (ENOBUFS, ENOSPC)."
    )?;
    writeln!(out, "# TYPE tessera_queue_recv_errors_total counter")?;
    let errors: u64 = shared
        .queues
        .iter()
        .map(|(_, s)| s.recv_errors.load(Ordering::Relaxed))
        .sum();
    writeln!(out, "tessera_queue_recv_errors_total {errors}")?;
    Ok(())
}
