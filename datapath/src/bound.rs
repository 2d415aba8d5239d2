//! What a client's agent remembers of the nodes behind its peers' addresses, so that its next
//! connection to one of them can use the bound handshake (two tokens, one queued packet fewer at
//! each end; docs/wire-format.md, "Bound handshake").
//!
//! Only a verified SYN-ACK teaches an address's node and key id. A wrong memory costs nothing
//! but the bound path: a bound SYN that reaches another node, or a node with another key, is
//! answered with a plain SYN-ACK and the three-token handshake follows. A node that does not
//! answer a bound SYN but answers the plain retransmission (an agent older than the bound
//! handshake drops its type) is remembered as *silent* for a while, so that only one
//! connection to it waits for a SYN retransmission; a bound SYN from that node proves it speaks
//! the bound handshake, and ends the wait at once. A retransmission nobody answers either (the
//! server's ingress drops a denied SYN; the server is gone) silences nothing.

use std::net::IpAddr;

use identity::wire::KeyId;

/// Where a client's SYN (TCP or UDP) stands with the bound handshake.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) enum SynBinding {
    /// A plain SYN.
    #[default]
    Plain,
    /// A SYN bound for this node, not answered yet.
    Bound(Box<str>),
    /// A SYN bound for this node that went unanswered and was re-sent plain: if the plain one
    /// is answered, the node ignored the bound one (it answers only plain SYNs).
    FellBack(Box<str>),
}

impl SynBinding {
    /// Whether the SYN now in flight is bound.
    pub(crate) fn is_bound(&self) -> bool {
        matches!(self, SynBinding::Bound(_))
    }

    /// The SYN is retransmitted: a bound one falls back to plain (`true`: make a plain SYN);
    /// any other stays as it is.
    pub(crate) fn fall_back(&mut self) -> bool {
        match std::mem::take(self) {
            SynBinding::Bound(node) => {
                *self = SynBinding::FellBack(node);
                true
            }
            other => {
                *self = other;
                false
            }
        }
    }

    /// The node a bound SYN fell back from, if any.
    pub(crate) fn fell_back_from(&self) -> Option<&str> {
        match self {
            SynBinding::FellBack(node) => Some(node),
            _ => None,
        }
    }
}

/// Addresses remembered at most. A full memory forgets its expired entries, then everything:
/// a forgotten address costs its next connection the three-token handshake, nothing more.
pub(crate) const BOUND_PEERS: usize = 8192;
/// Silent nodes remembered at most (the same policy when full).
pub(crate) const SILENT_NODES: usize = 1024;

struct Learnt {
    node: Box<str>,
    key: KeyId,
    until_ms: u64,
}

/// The memory of peers' nodes.
#[derive(Default)]
pub(crate) struct BoundPeers {
    by_addr: ahash::HashMap<IpAddr, Learnt>,
    silent: ahash::HashMap<Box<str>, u64>,
}

impl BoundPeers {
    /// A verified SYN-ACK from `ip` named `node` with key `key`.
    pub(crate) fn learn(&mut self, ip: IpAddr, node: &str, key: KeyId, until_ms: u64, now_ms: u64) {
        if let Some(l) = self.by_addr.get_mut(&ip)
            && *l.node == *node
        {
            l.key = key;
            l.until_ms = until_ms;
            return;
        }
        if self.by_addr.len() >= BOUND_PEERS {
            self.by_addr.retain(|_, l| l.until_ms > now_ms);
            if self.by_addr.len() >= BOUND_PEERS {
                self.by_addr.clear();
            }
        }
        self.by_addr.insert(
            ip,
            Learnt {
                node: node.into(),
                key,
                until_ms,
            },
        );
    }

    /// The node and key id to bind a SYN to `ip` for, unless none is known, it expired, or the
    /// node is silent.
    pub(crate) fn get(&self, ip: &IpAddr, now_ms: u64) -> Option<(&str, KeyId)> {
        let l = self.by_addr.get(ip).filter(|l| l.until_ms > now_ms)?;
        if self
            .silent
            .get(&*l.node)
            .is_some_and(|until| *until > now_ms)
        {
            return None;
        }
        Some((&l.node, l.key))
    }

    /// `node` did not answer a bound SYN: send it plain ones until `until_ms`.
    pub(crate) fn silent(&mut self, node: &str, until_ms: u64, now_ms: u64) {
        if self.silent.len() >= SILENT_NODES && !self.silent.contains_key(node) {
            self.silent.retain(|_, until| *until > now_ms);
            if self.silent.len() >= SILENT_NODES {
                self.silent.clear();
            }
        }
        self.silent.insert(node.into(), until_ms);
    }

    /// `node` sent a bound SYN: it speaks the bound handshake.
    pub(crate) fn heard(&mut self, node: &str) {
        if !self.silent.is_empty() {
            self.silent.remove(node);
        }
    }

    /// Addresses remembered.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.by_addr.len()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn ip(n: u32) -> IpAddr {
        IpAddr::V4(std::net::Ipv4Addr::from(0x0a00_0000 + n))
    }

    #[test]
    fn an_address_binds_to_the_node_its_last_syn_ack_proved_until_it_expires() {
        let mut p = BoundPeers::default();
        assert_eq!(p.get(&ip(1), 0), None);
        p.learn(ip(1), "node-b", KeyId([1; 8]), 100, 0);
        assert_eq!(p.get(&ip(1), 99), Some(("node-b", KeyId([1; 8]))));
        assert_eq!(p.get(&ip(1), 100), None);
        // The workload moved: the next verified SYN-ACK from the address names another node.
        p.learn(ip(1), "node-c", KeyId([2; 8]), 300, 150);
        assert_eq!(p.get(&ip(1), 200), Some(("node-c", KeyId([2; 8]))));
    }

    #[test]
    fn a_silent_node_gets_plain_syns_until_it_speaks_or_the_wait_ends() {
        let mut p = BoundPeers::default();
        p.learn(ip(1), "node-b", KeyId([1; 8]), 1_000, 0);
        p.learn(ip(2), "node-b", KeyId([1; 8]), 1_000, 0);
        p.learn(ip(3), "node-c", KeyId([3; 8]), 1_000, 0);
        p.silent("node-b", 500, 10);
        assert_eq!(p.get(&ip(1), 20), None);
        assert_eq!(p.get(&ip(2), 20), None);
        assert!(p.get(&ip(3), 20).is_some());
        assert!(p.get(&ip(1), 500).is_some(), "the wait ended");
        p.silent("node-b", 900, 600);
        p.heard("node-b");
        assert!(
            p.get(&ip(1), 601).is_some(),
            "a bound SYN from it ends the wait"
        );
    }

    #[test]
    fn the_memory_stays_bounded() {
        let mut p = BoundPeers::default();
        for n in 0..(BOUND_PEERS as u32 + 10) {
            p.learn(ip(n), "node-b", KeyId([1; 8]), 1_000, 0);
            assert!(p.len() <= BOUND_PEERS);
        }
        assert!(p.get(&ip(BOUND_PEERS as u32 + 9), 1).is_some());
        for n in 0..(SILENT_NODES + 10) {
            p.silent(&format!("node-{n}"), 1_000, 0);
            assert!(p.silent.len() <= SILENT_NODES);
        }
    }
}
