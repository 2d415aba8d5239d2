//! Workloads that require encryption (`tessera.dev/require-encryption`, the inventory's
//! `requireEncryption`): the guard in the node's namespace (`datapath::shell::encrypted`) and
//! the task that reads what it queues.
//!
//! The event loop computes what the guard covers ([`want`]: the guarded workloads' addresses,
//! the other nodes' pod prefixes) after every change and hands it to [`run`], which applies the
//! newest one and refuses (drops, counts, records) every packet the rules queue. Nothing is
//! installed until a workload requires encryption; once installed, the rules stay until the
//! agent stops (an empty set queues nothing). While no agent reads the queue (killed,
//! restarting) the kernel drops those packets: the guard fails closed.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};
use datapath::Processor;
use datapath::shell::encrypted::{self, GuardConfig, Guarded};
use datapath::shell::{Action, Direction, Netns, QueueConfig, queue};
use tokio::sync::watch;

use super::lock;
use crate::runtime::NodeInfo;

/// The guard as `/status` shows it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GuardStatus {
    /// `namespace/name` of each guarded workload.
    pub workloads: Vec<String>,
    pub guarded: Guarded,
    /// Why the last change could not be applied (the previous rules stay).
    pub error: Option<String>,
}

/// What the guard covers: the addresses of `guarded` workloads, and the pod prefixes of every
/// node but `own`.
pub fn want<'a>(
    guarded: impl Iterator<Item = &'a [std::net::IpAddr]>,
    nodes: &BTreeMap<String, NodeInfo>,
    own: &str,
) -> Guarded {
    Guarded {
        local: guarded.flat_map(|ips| ips.iter().copied()).collect(),
        remote: nodes
            .iter()
            .filter(|(name, _)| name.as_str() != own)
            .flat_map(|(_, n)| n.pod_cidrs.iter().copied())
            .collect(),
    }
    .normalized()
}

/// The queue's length: a flood of packets in clear waits here, the rest is dropped by the
/// kernel (the queue never bypasses).
const QUEUE_LEN: u32 = 1024;

/// Owns the guard: opens its queue in `ns`, applies each [`Guarded`] that arrives (a failed
/// update is logged and kept in `status`, the previous rules stay), refuses every packet
/// queued, and on `stop` removes the rules. Ends with an error only if its queue fails.
pub async fn run(
    ns: Netns,
    cfg: GuardConfig,
    mut want: watch::Receiver<Guarded>,
    processor: Arc<Mutex<Processor>>,
    status: Arc<Mutex<Option<GuardStatus>>>,
    mut stop: watch::Receiver<bool>,
) -> Result<()> {
    let qcfg = QueueConfig {
        queue_num: cfg.queue_num,
        max_len: QUEUE_LEN,
        rcvbuf_bytes: 1 << 20,
        fail_open: false,
        dns_queue_num: None,
    };
    let open_ns = ns.clone();
    let opened = tokio::task::spawn_blocking(move || queue::open(&open_ns, qcfg))
        .await
        .context("guard queue")?
        .with_context(|| format!("opening queue {} for the encryption guard", cfg.queue_num))?;
    let mut q = opened.attach().context("guard queue")?;
    // Apply at start, then after each change.
    let mut apply = true;
    let result = loop {
        if apply {
            apply = false;
            let g = want.borrow_and_update().clone();
            let (ns2, cfg2, g2) = (ns.clone(), cfg.clone(), g.clone());
            let applied = tokio::task::spawn_blocking(move || encrypted::apply(&ns2, &cfg2, &g2))
                .await
                .map_err(|e| e.to_string())
                .and_then(|r| r.map_err(|e| e.to_string()));
            let mut st = lock(&status);
            let st = st.get_or_insert_with(GuardStatus::default);
            match applied {
                Ok(()) => {
                    tracing::info!(
                        addresses = g.local.len(),
                        remote_prefixes = g.remote.len(),
                        "encryption guard updated"
                    );
                    st.guarded = g;
                    st.error = None;
                }
                Err(e) => {
                    tracing::error!(
                        "encryption guard: update refused, the previous rules stay: {e}"
                    );
                    st.error = Some(e);
                }
            }
        }
        let mut refuse = |direction, packet: &mut Vec<u8>, _| {
            if direction == Direction::Forward {
                lock(&processor).refuse_unencrypted(packet, queue::unix_ms());
            }
            Action::DROP
        };
        tokio::select! {
            r = want.changed() => match r {
                Ok(()) => apply = true,
                Err(_) => break Ok(()),
            },
            r = q.serve_batch(&mut refuse) => if let Err(e) = r {
                break Err(anyhow::Error::new(e).context("encryption guard queue"));
            },
            _ = stop.changed() => break Ok(()),
        }
    };
    let _ = q.unbind();
    let rm = tokio::task::spawn_blocking(move || encrypted::remove(&ns)).await;
    match rm {
        Ok(Ok(())) => tracing::info!("encryption guard removed"),
        Ok(Err(e)) => tracing::error!("removing the encryption guard: {e}"),
        Err(e) => tracing::error!("removing the encryption guard: {e}"),
    }
    result
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn node(name: &str, cidrs: &[&str]) -> (String, NodeInfo) {
        (
            name.to_owned(),
            NodeInfo {
                node: policy::Node {
                    name: name.to_owned(),
                    labels: BTreeMap::new(),
                    addresses: Vec::new(),
                },
                tunnel_addresses: Vec::new(),
                pod_cidrs: cidrs.iter().filter_map(|c| c.parse().ok()).collect(),
            },
        )
    }

    #[test]
    fn the_other_nodes_prefixes_and_the_guarded_addresses() {
        let nodes = BTreeMap::from([
            node("n1", &["10.1.0.0/24"]),
            node("n2", &["10.2.0.0/24", "fd00:2::/64"]),
            node("n3", &["10.3.0.0/24"]),
        ]);
        let a = ["10.1.0.5".parse().unwrap()];
        let b = ["10.1.0.6".parse().unwrap(), "10.1.0.5".parse().unwrap()];
        let g = want([&a[..], &b[..]].into_iter(), &nodes, "n1");
        assert_eq!(
            g.local,
            [
                "10.1.0.5".parse::<std::net::IpAddr>().unwrap(),
                "10.1.0.6".parse().unwrap()
            ]
        );
        let remote: Vec<String> = g.remote.iter().map(|n| n.to_string()).collect();
        assert_eq!(remote, ["10.2.0.0/24", "10.3.0.0/24", "fd00:2::/64"]);
    }
}
