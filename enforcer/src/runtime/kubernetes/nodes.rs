//! Node certificates in Node annotations (PKI mode).
//!
//! Every agent publishes its node's certificate (PEM: it carries the node's X25519 key, which is
//! all peers need) in the annotation [`CERT_ANNOTATION`] of its own Node, and watches every
//! Node: a certificate that appears becomes an [`Event::PeerCertificate`] (the agent verifies it
//! against the CA and the node name), a changed one replaces the old (the old key is revoked
//! first), and a removed annotation or a deleted Node revokes that node's key.
//!
//! Revocation is deliberate and sticky: a key revoked because its annotation went away stays
//! refused by this agent even if the same certificate is published again (the identity crate
//! keeps revoked key ids; otherwise a compromised node, which may patch its own Node, could undo
//! its own revocation). To re-admit a node, issue it a new certificate. For the same reason an
//! agent does not re-publish its certificate when its annotation is removed (it does when the
//! annotation holds another certificate, e.g. a previous one).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Node;
use kube::Api;
use kube::api::{Patch, PatchParams};
use kube::core::PartialObjectMeta;
use kube::runtime::watcher;
use tokio::sync::Notify;
use tracing::{debug, error, info, warn};

use crate::runtime::Event;

/// The annotation holding a node's certificate (deployment/kubernetes/README.md).
pub const CERT_ANNOTATION: &str = "tessera.dev/node-certificate";
/// Larger annotation values are not certificates: refused without being kept.
pub const MAX_PEM_LEN: usize = 16 * 1024;

const PUBLISH_RETRY_MIN: Duration = Duration::from_millis(200);
const PUBLISH_RETRY_MAX: Duration = Duration::from_secs(5);
const REPUBLISH_GAP_MIN: Duration = Duration::from_secs(1);
const REPUBLISH_GAP_MAX: Duration = Duration::from_secs(300);
const REPUBLISH_WARN_GAP: Duration = Duration::from_secs(16);

/// What one Node says: its name and certificate annotation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeCert {
    pub name: String,
    pub pem: Option<String>,
}

/// A Node's name and annotation (from metadata only).
pub fn node_cert(n: &PartialObjectMeta<Node>) -> Option<NodeCert> {
    let name = n.metadata.name.clone().filter(|s| !s.is_empty())?;
    let pem = n
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(CERT_ANNOTATION))
        .cloned();
    Some(NodeCert { name, pem })
}

/// Peer certificates as the agent was told them, and our own annotation's state.
pub struct Nodes {
    own: String,
    /// The certificate this node publishes.
    own_pem: String,
    /// Certificates sent to the agent, by node.
    known: HashMap<String, String>,
    /// The last certificate revoked per node (refused if it comes back).
    revoked: HashMap<String, String>,
    /// Whether our own annotation was seen holding our certificate.
    own_seen: bool,
    relist: Option<Vec<NodeCert>>,
    synced: bool,
}

impl Nodes {
    pub fn new(own: &str, own_pem: &str) -> Nodes {
        Nodes {
            own: own.to_owned(),
            own_pem: own_pem.to_owned(),
            known: HashMap::new(),
            revoked: HashMap::new(),
            own_seen: false,
            relist: None,
            synced: false,
        }
    }

    /// Our certificate changed (the node's credentials were rotated): our annotation must
    /// hold the new one from now on (the publisher puts it there).
    pub fn set_own_pem(&mut self, pem: &str) {
        if self.own_pem != pem {
            self.own_pem = pem.to_owned();
            self.own_seen = false;
        }
    }

    /// Whether a complete list of Nodes was applied.
    pub fn synced(&self) -> bool {
        self.synced
    }

    /// Applies a watcher event; returns true when our own certificate should be published
    /// again.
    pub fn handle(
        &mut self,
        ev: watcher::Event<PartialObjectMeta<Node>>,
        out: &mut Vec<Event>,
    ) -> bool {
        match ev {
            watcher::Event::Init => {
                self.relist = Some(Vec::new());
                false
            }
            watcher::Event::InitApply(n) => {
                if let Some(c) = node_cert(&n) {
                    self.relist.get_or_insert_with(Vec::new).push(c);
                }
                false
            }
            watcher::Event::InitDone => {
                let listed = self.relist.take().unwrap_or_default();
                let mut republish = false;
                let names: std::collections::HashSet<String> =
                    listed.iter().map(|c| c.name.clone()).collect();
                for c in listed {
                    republish |= self.update(c, out);
                }
                let mut vanished: Vec<String> = self
                    .known
                    .keys()
                    .filter(|n| !names.contains(*n))
                    .cloned()
                    .collect();
                vanished.sort();
                for name in vanished {
                    republish |= self.update(NodeCert { name, pem: None }, out);
                }
                if !self.synced {
                    info!(peers = self.known.len(), "node certificates listed");
                }
                self.synced = true;
                republish
            }
            watcher::Event::Apply(n) => node_cert(&n).is_some_and(|c| self.update(c, out)),
            watcher::Event::Delete(n) => node_cert(&n).is_some_and(|c| {
                self.update(
                    NodeCert {
                        name: c.name,
                        pem: None,
                    },
                    out,
                )
            }),
        }
    }

    fn update(&mut self, c: NodeCert, out: &mut Vec<Event>) -> bool {
        let NodeCert { name, pem } = c;
        let pem = match pem {
            Some(p) if p.len() > MAX_PEM_LEN => {
                error!(
                    node = %name,
                    "Node {name}: annotation {CERT_ANNOTATION}: {} bytes, more than {MAX_PEM_LEN}: not a certificate, treated as absent",
                    p.len()
                );
                None
            }
            p => p,
        };
        if name == self.own {
            return self.own_update(pem);
        }
        let old = self.known.get(&name).cloned();
        if old == pem {
            return false;
        }
        if let Some(old) = old {
            info!(peer = %name, "node certificate {}: revoking its key", if pem.is_some() { "changed" } else { "removed (annotation or Node gone)" });
            out.push(Event::PeerCertificate {
                node: name.clone(),
                pem: None,
            });
            self.known.remove(&name);
            self.revoked.insert(name.clone(), old);
        }
        if let Some(pem) = pem {
            if self.revoked.get(&name) == Some(&pem) {
                warn!(
                    peer = %name,
                    "Node {name} publishes a certificate that was revoked when its annotation was removed: a deliberately removed key stays revoked; issue the node a new certificate (tessera pki issue-node) to re-admit it"
                );
                return false;
            }
            out.push(Event::PeerCertificate {
                node: name.clone(),
                pem: Some(pem.clone()),
            });
            self.known.insert(name, pem);
        }
        false
    }

    fn own_update(&mut self, pem: Option<String>) -> bool {
        match pem {
            Some(p) if p == self.own_pem => {
                self.own_seen = true;
                false
            }
            Some(_) => {
                info!(node = %self.own, "our Node's {CERT_ANNOTATION} holds another certificate: publishing ours again");
                true
            }
            None => {
                if self.own_seen {
                    warn!(node = %self.own, "our Node's {CERT_ANNOTATION} annotation was removed (or the Node deleted): peers revoke our key; not published again (a removed certificate is a revocation): restart the agent with a new certificate to rejoin");
                    self.own_seen = false;
                }
                false
            }
        }
    }

    /// Known peers' names (tests, logs).
    #[cfg(test)]
    fn peers(&self) -> std::collections::BTreeMap<String, String> {
        self.known
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }
}

/// When our certificate may be published again.
#[derive(Debug)]
struct Spacing {
    gap: Duration,
    last: Option<std::time::Instant>,
}

impl Default for Spacing {
    fn default() -> Self {
        Spacing {
            gap: REPUBLISH_GAP_MIN,
            last: None,
        }
    }
}

impl Spacing {
    /// Records a publication at `now`: the earliest next one, and the gap to it. The gap
    /// doubles with each publication, back to the minimum after a long quiet time.
    fn published(&mut self, now: std::time::Instant) -> (std::time::Instant, Duration) {
        if self
            .last
            .is_some_and(|l| now.duration_since(l) > REPUBLISH_GAP_MAX * 2)
        {
            self.gap = REPUBLISH_GAP_MIN;
        }
        self.last = Some(now);
        let gap = self.gap;
        self.gap = (self.gap * 2).min(REPUBLISH_GAP_MAX);
        (now + gap, gap)
    }
}

/// Publishes `pem` in our Node's annotation (JSON merge patch: other annotations are left
/// alone), at start and whenever `again` is notified; failures (the Node not registered yet, the
/// API down, RBAC) are retried with backoff. Re-publishing is spaced out, the gap doubling from
/// 1 s to 5 min while our annotation keeps being replaced (two agents under one node name would
/// otherwise patch each other's certificate away in a tight loop).
///
/// `pem` is our certificate as it changes: a new value (the node's credentials were rotated)
/// is published at once, without waiting for the spacing.
pub async fn publish(
    api: Api<Node>,
    node: String,
    mut pem: tokio::sync::watch::Receiver<String>,
    again: Arc<Notify>,
) {
    let mut delay = PUBLISH_RETRY_MIN;
    let mut failing = false;
    let mut spacing = Spacing::default();
    loop {
        let current = pem.borrow_and_update().clone();
        let patch = serde_json::json!({"metadata": {"annotations": {CERT_ANNOTATION: current}}});
        match api
            .patch(&node, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => {
                info!(node = %node, "node certificate published in annotation {CERT_ANNOTATION}");
                delay = PUBLISH_RETRY_MIN;
                failing = false;
                let (next, gap) = spacing.published(std::time::Instant::now());
                let rotated = tokio::select! {
                    () = again.notified() => false,
                    Ok(()) = pem.changed() => true,
                };
                if rotated {
                    info!(node = %node, "node credentials rotated: publishing the new certificate");
                    continue;
                }
                if gap >= REPUBLISH_WARN_GAP {
                    warn!(node = %node, "our Node's {CERT_ANNOTATION} keeps being replaced (another agent with node name {node}?); publishing ours again in {}s steps", gap.as_secs());
                }
                tokio::time::sleep_until(tokio::time::Instant::from_std(next)).await;
            }
            Err(e) => {
                if failing {
                    debug!(node = %node, "publishing the node certificate: {e}");
                } else {
                    warn!(node = %node, "cannot publish the node certificate on Node {node} ({e}); retrying");
                    failing = true;
                }
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(PUBLISH_RETRY_MAX);
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn node(name: &str, pem: Option<&str>) -> PartialObjectMeta<Node> {
        let mut n: PartialObjectMeta<Node> = PartialObjectMeta::default();
        n.metadata.name = Some(name.into());
        if let Some(p) = pem {
            n.metadata.annotations = Some(BTreeMap::from([
                (CERT_ANNOTATION.to_owned(), p.to_owned()),
                ("other".to_owned(), "x".to_owned()),
            ]));
        }
        n
    }

    fn cert(node: &str, pem: Option<&str>) -> Event {
        Event::PeerCertificate {
            node: node.into(),
            pem: pem.map(str::to_owned),
        }
    }

    fn feed(n: &mut Nodes, evs: Vec<watcher::Event<PartialObjectMeta<Node>>>) -> Vec<Event> {
        let mut out = Vec::new();
        for e in evs {
            n.handle(e, &mut out);
        }
        out
    }

    #[test]
    fn the_first_list_is_applied_at_its_end_without_our_own_node() {
        let mut n = Nodes::new("me", "MINE");
        let out = feed(
            &mut n,
            vec![
                watcher::Event::Init,
                watcher::Event::InitApply(node("me", Some("MINE"))),
                watcher::Event::InitApply(node("b", Some("B1"))),
                watcher::Event::InitApply(node("c", None)),
            ],
        );
        assert!(out.is_empty() && !n.synced());
        let out = feed(&mut n, vec![watcher::Event::InitDone]);
        assert_eq!(out, [cert("b", Some("B1"))]);
        assert!(n.synced());
    }

    #[test]
    fn a_peer_is_learned_live_replaced_and_revoked() {
        let mut n = Nodes::new("me", "MINE");
        feed(&mut n, vec![watcher::Event::Init, watcher::Event::InitDone]);
        // A node that joins later, then publishes.
        let out = feed(
            &mut n,
            vec![
                watcher::Event::Apply(node("late", None)),
                watcher::Event::Apply(node("late", Some("L1"))),
                // Unrelated Node updates (status) change nothing.
                watcher::Event::Apply(node("late", Some("L1"))),
            ],
        );
        assert_eq!(out, [cert("late", Some("L1"))]);
        // Rotation: the old key is revoked, the new one trusted.
        let out = feed(
            &mut n,
            vec![watcher::Event::Apply(node("late", Some("L2")))],
        );
        assert_eq!(out, [cert("late", None), cert("late", Some("L2"))]);
        // Annotation removed: revoked.
        let out = feed(&mut n, vec![watcher::Event::Apply(node("late", None))]);
        assert_eq!(out, [cert("late", None)]);
        assert!(n.peers().is_empty());
        // The same certificate back: stays refused (deliberate revocation), nothing sent.
        let out = feed(
            &mut n,
            vec![watcher::Event::Apply(node("late", Some("L2")))],
        );
        assert!(out.is_empty(), "{out:?}");
        // A new certificate is accepted.
        let out = feed(
            &mut n,
            vec![watcher::Event::Apply(node("late", Some("L3")))],
        );
        assert_eq!(out, [cert("late", Some("L3"))]);
        // The Node deleted: revoked.
        let out = feed(
            &mut n,
            vec![watcher::Event::Delete(node("late", Some("L3")))],
        );
        assert_eq!(out, [cert("late", None)]);
    }

    #[test]
    fn a_relist_revokes_vanished_nodes_and_keeps_unchanged_ones_quiet() {
        let mut n = Nodes::new("me", "MINE");
        feed(
            &mut n,
            vec![
                watcher::Event::Init,
                watcher::Event::InitApply(node("a", Some("A"))),
                watcher::Event::InitApply(node("b", Some("B"))),
                watcher::Event::InitDone,
            ],
        );
        let out = feed(
            &mut n,
            vec![
                watcher::Event::Init,
                watcher::Event::InitApply(node("a", Some("A"))),
                watcher::Event::InitDone,
            ],
        );
        assert_eq!(out, [cert("b", None)]);
    }

    #[test]
    fn our_own_annotation_is_republished_only_when_it_holds_another_certificate() {
        let mut n = Nodes::new("me", "MINE");
        let mut out = Vec::new();
        assert!(!n.handle(watcher::Event::Apply(node("me", None)), &mut out));
        assert!(!n.handle(watcher::Event::Apply(node("me", Some("MINE"))), &mut out));
        assert!(n.handle(watcher::Event::Apply(node("me", Some("OLD"))), &mut out));
        assert!(!n.handle(watcher::Event::Apply(node("me", Some("MINE"))), &mut out));
        // Removed by an operator: respected.
        assert!(!n.handle(watcher::Event::Apply(node("me", None)), &mut out));
        assert!(
            out.is_empty(),
            "our own certificate is never a peer's: {out:?}"
        );
    }

    #[test]
    fn after_a_rotation_our_annotation_must_hold_the_new_certificate() {
        let mut n = Nodes::new("me", "MINE");
        let mut out = Vec::new();
        assert!(!n.handle(watcher::Event::Apply(node("me", Some("MINE"))), &mut out));
        n.set_own_pem("MINE-2");
        // The previous certificate is now another one: ours is published again.
        assert!(n.handle(watcher::Event::Apply(node("me", Some("MINE"))), &mut out));
        assert!(!n.handle(watcher::Event::Apply(node("me", Some("MINE-2"))), &mut out));
        assert!(out.is_empty(), "{out:?}");
    }

    #[test]
    fn republishing_is_spaced_out_while_our_annotation_keeps_being_replaced() {
        let mut s = Spacing::default();
        let t0 = std::time::Instant::now();
        let mut t = t0;
        let mut gaps = Vec::new();
        for _ in 0..11 {
            let (next, gap) = s.published(t);
            assert_eq!(next, t + gap);
            gaps.push(gap.as_secs());
            t = next;
        }
        assert_eq!(gaps, [1, 2, 4, 8, 16, 32, 64, 128, 256, 300, 300]);
        // After a long quiet time, back to the start.
        let (_, gap) = s.published(t + REPUBLISH_GAP_MAX * 3);
        assert_eq!(gap, REPUBLISH_GAP_MIN);
    }

    #[test]
    fn an_oversized_annotation_is_not_kept() {
        let mut n = Nodes::new("me", "MINE");
        feed(&mut n, vec![watcher::Event::Init, watcher::Event::InitDone]);
        let big = "x".repeat(MAX_PEM_LEN + 1);
        let out = feed(&mut n, vec![watcher::Event::Apply(node("b", Some(&big)))]);
        assert!(out.is_empty());
        assert!(n.peers().is_empty());
    }
}
