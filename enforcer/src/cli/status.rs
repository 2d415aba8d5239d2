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

/// Bytes in binary units (`12.3 KiB`).
fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

fn reasons(m: &std::collections::BTreeMap<String, u64>) -> String {
    if m.is_empty() {
        return "none".into();
    }
    m.iter()
        .map(|(r, n)| format!("{r} {n}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn render_tunnel(t: &crate::agent::http::TunnelStatus, out: &mut String) {
    let key = t
        .public_key
        .as_deref()
        .map(|k| format!(", key {}…", &k[..k.len().min(16)]))
        .unwrap_or_default();
    let _ = writeln!(
        out,
        "\nTUNNEL {} on UDP {}{key}: {} peer{}, {} node{} not a peer",
        t.device,
        t.listen,
        t.peers.len(),
        if t.peers.len() == 1 { "" } else { "s" },
        t.not_peers.len(),
        if t.not_peers.len() == 1 { "" } else { "s" },
    );
    if let Some(e) = &t.error {
        let _ = writeln!(out, "  STOPPED: {e}");
    }
    let width = t
        .peers
        .iter()
        .map(|p| p.node.len())
        .chain(t.not_peers.keys().map(String::len))
        .max()
        .unwrap_or(0);
    for p in &t.peers {
        let handshake = match p.handshake_age_seconds {
            Some(age) => format!("handshake {:.0}s ago", age.floor()),
            None => "no handshake yet".into(),
        };
        let _ = writeln!(
            out,
            "  {:width$}  {}  {handshake}  rx {}  tx {}  drops: {}",
            p.node,
            p.endpoint,
            bytes(p.rx_bytes),
            bytes(p.tx_bytes),
            reasons(&p.drops)
        );
    }
    for (node, why) in &t.not_peers {
        let _ = writeln!(out, "  {node:width$}  NOT A PEER: {why}");
    }
    if !t.dropped.is_empty() {
        let _ = writeln!(out, "  dropped for no peer: {}", reasons(&t.dropped));
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
    if let Some(t) = &s.tunnel {
        render_tunnel(t, &mut out);
    }
    if let Some(g) = &s.encryption_guard {
        let _ = writeln!(
            out,
            "\nENCRYPTION REQUIRED ({} workload(s); cross-node packets outside the tunnel are dropped)",
            g.workloads.len()
        );
        for w in &g.workloads {
            let _ = writeln!(out, "  {w}");
        }
        let _ = writeln!(
            out,
            "  guarded addresses: {}; other nodes' pod prefixes: {}",
            g.addresses.len(),
            g.remote_prefixes.len()
        );
        if let Some(e) = &g.error {
            let _ = writeln!(out, "  LAST UPDATE REFUSED (previous rules stay): {e}");
        }
    }
    let c = &s.counters;
    let _ = writeln!(out, "\nCOUNTERS");
    let _ = writeln!(
        out,
        "  flows authorized: {} verified, {} IP-only peers; handshakes in progress: {}",
        c.authorized_verified, c.authorized_ip_only, c.flows
    );
    // The bound handshake (two tokens to a node this one already knows), per protocol: how
    // many this node sent and completed as a client, authorized as a server, and why any fell
    // back to the three tokens.
    for (protocol, events) in &c.bound {
        let list: Vec<String> = events.iter().map(|(e, n)| format!("{e} {n}")).collect();
        let _ = writeln!(out, "  bound handshakes, {protocol}: {}", list.join(", "));
    }
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

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn the_tunnel_section_shows_peers_and_the_nodes_that_are_not() {
        let json = r#"{
          "node": "node-a", "identity": "pki", "runtime": "static", "policies": 1,
          "workloads": [], "peers": [],
          "counters": {"authorizedVerified": 0, "authorizedIpOnly": 0, "rejected": {},
                       "flows": 0, "queueDropped": 0, "workloadFailures": 0,
                       "policyReloadFailures": 0},
          "tunnel": {"device": "tsr-wg0", "listen": "[::]:51871",
            "publicKey": "07f75c407a59ed8e7be83c1d9758c9a77893d1583840b27085532cd9503cb05e",
            "peers": [{"node": "node-b", "endpoint": "192.0.2.2:51871", "publicKey": "ab",
                       "allowedIps": ["10.2.0.0/24"], "handshakes": 2,
                       "handshakeAgeSeconds": 3.7, "rxBytes": 12600, "txBytes": 80,
                       "rxPackets": 9, "txPackets": 2, "drops": {"replay": 1}}],
            "notPeers": {"node-c": "no trusted tunnel key"},
            "dropped": {"no_peer": 4}}
        }"#;
        let s: Status = serde_json::from_str(json).unwrap();
        let text = render(&s, SystemTime::now());
        assert!(
            text.contains(
                "TUNNEL tsr-wg0 on UDP [::]:51871, key 07f75c407a59ed8e…: 1 peer, 1 node not a peer"
            ),
            "{text}"
        );
        assert!(
            text.contains(
                "  node-b  192.0.2.2:51871  handshake 3s ago  rx 12.3 KiB  tx 80 B  drops: replay 1"
            ),
            "{text}"
        );
        assert!(
            text.contains("  node-c  NOT A PEER: no trusted tunnel key"),
            "{text}"
        );
        assert!(text.contains("dropped for no peer: no_peer 4"), "{text}");
        // An agent without --encrypt has no section (and older agents' JSON still reads).
        let off = json
            .split(",\n          \"tunnel\"")
            .next()
            .unwrap()
            .to_owned()
            + "}";
        let s: Status = serde_json::from_str(&off).unwrap();
        assert!(!render(&s, SystemTime::now()).contains("TUNNEL"));
    }

    #[test]
    fn bound_handshakes_are_shown_per_protocol_and_older_agents_still_read() {
        let json = r#"{
          "node": "node-a", "identity": "psk", "runtime": "static", "policies": 1,
          "workloads": [], "peers": [],
          "counters": {"authorizedVerified": 9, "authorizedIpOnly": 0, "rejected": {},
                       "flows": 0, "queueDropped": 0, "workloadFailures": 0,
                       "policyReloadFailures": 0,
                       "bound": {"tcp": {"completed": 7, "sent": 8, "retransmitted_plain": 1},
                                 "udp": {"authorized": 2}}}
        }"#;
        let s: Status = serde_json::from_str(json).unwrap();
        let text = render(&s, SystemTime::now());
        assert!(
            text.contains("  bound handshakes, tcp: completed 7, retransmitted_plain 1, sent 8\n"),
            "{text}"
        );
        assert!(
            text.contains("  bound handshakes, udp: authorized 2\n"),
            "{text}"
        );
        let old = json.replace(
            ",\n                       \"bound\": {\"tcp\": {\"completed\": 7, \"sent\": 8, \"retransmitted_plain\": 1},\n                                 \"udp\": {\"authorized\": 2}}",
            "",
        );
        assert_ne!(old, json);
        let s: Status = serde_json::from_str(&old).unwrap();
        assert!(!render(&s, SystemTime::now()).contains("bound handshakes"));
    }
}
