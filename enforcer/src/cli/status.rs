//! `tessera status`: what a running agent enforces, the peer nodes it knows and its counters,
//! read from its `/status` endpoint.

use std::fmt::Write as _;
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use clap::{Args, ValueEnum};

use crate::agent::http::Status;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Text,
    Json,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// The agent's metrics address (its --metrics-addr).
    #[arg(long, env = "TESSERA_METRICS_ADDR", default_value = "127.0.0.1:9090")]
    pub addr: String,
    /// Output format.
    #[arg(long, short, value_enum, default_value_t = Output::Text)]
    pub output: Output,
}

pub fn run(args: StatusArgs) -> Result<ExitCode> {
    let url = format!("http://{}/status", args.addr);
    let agent = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(5)))
        .build()
        .new_agent();
    let body = agent
        .get(&url)
        .call()
        .and_then(|mut r| r.body_mut().read_to_string())
        .with_context(|| {
            format!(
                "no agent answers at {url} (is `tessera run` running with --metrics-addr {}?)",
                args.addr
            )
        })?;
    match args.output {
        Output::Json => println!("{body}"),
        Output::Text => {
            let status: Status = serde_json::from_str(&body)
                .with_context(|| format!("{url}: not a tessera status document"))?;
            print!("{}", render(&status, SystemTime::now()));
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn ago(now: SystemTime, unix: u64) -> String {
    let now = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let s = now.saturating_sub(unix);
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m", s / 60),
        3600..86400 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86400),
    }
}

/// The human form.
pub fn render(s: &Status, now: SystemTime) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "node {} ({} identity, {} runtime), {} NetworkPolicies and {} admin policies in force",
        s.node, s.identity, s.runtime, s.policies, s.admin_policies
    );
    if s.staged_policies > 0 {
        let _ = writeln!(
            out,
            "{} staged polic{} evaluated beside, not enforced (tessera flows --staged)",
            s.staged_policies,
            if s.staged_policies == 1 { "y" } else { "ies" }
        );
    }
    let _ = writeln!(out, "\nWORKLOADS ({})", s.workloads.len());
    let width = s
        .workloads
        .iter()
        .map(|w| w.name.len())
        .max()
        .unwrap_or(0)
        .max(4);
    for w in &s.workloads {
        let labels: Vec<String> = w.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let state = if w.serving {
            "enforced"
        } else {
            "QUEUE STOPPED (fail-closed)"
        };
        let _ = writeln!(
            out,
            "  {:width$}  {state} {:>4}  drops {:<4} {}",
            w.name,
            ago(now, w.enforced_since),
            w.queue_dropped,
            labels.join(",")
        );
    }
    if !s.not_enforced.is_empty() {
        let _ = writeln!(out, "\nNOT ENFORCED ({})", s.not_enforced.len());
        for (name, why) in &s.not_enforced {
            let _ = writeln!(out, "  {name}: {why}");
        }
    }
    let _ = writeln!(out, "\nPEER NODES ({})", s.peers.len());
    for p in &s.peers {
        let expiry = p
            .not_after
            .map(|t| format!("certificate until {t} (unix)"))
            .unwrap_or_else(|| "pre-shared key".into());
        let seen = if p.active {
            "handshakes seen"
        } else {
            "no handshake yet"
        };
        let this = if p.node == s.node { " (this node)" } else { "" };
        let _ = writeln!(
            out,
            "  {}{this}  key {}  {expiry}  {seen}",
            p.node, p.key_id
        );
    }
    let c = &s.counters;
    let _ = writeln!(out, "\nCOUNTERS");
    let _ = writeln!(
        out,
        "  flows authorized: {} verified, {} IP-only peers; handshakes in progress: {}",
        c.authorized_verified, c.authorized_ip_only, c.flows
    );
    let total: u64 = c.rejected.values().sum();
    let _ = writeln!(out, "  rejected: {total}");
    for (reason, n) in &c.rejected {
        let _ = writeln!(out, "    {reason}: {n}");
    }
    let _ = writeln!(
        out,
        "  queue drops: {}; workloads not enforced: {}; policy reloads refused: {}",
        c.queue_dropped, c.workload_failures, c.policy_reload_failures
    );
    out
}
