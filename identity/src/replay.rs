//! Bounded replay cache: per peer node, the client nonces of handshakes that completed, with a
//! low-water mark so that forgetting old entries never lets a replay through.
//!
//! Soundness: a nonce is rejected if it is in the peer's set, or if its timestamp is at or
//! below the peer's floor (or the global floor). Whenever an entry is dropped (the per-peer
//! cap is reached, or it aged out of the skew window), the floor is raised to that entry's
//! timestamp; whenever a whole peer is dropped (the peer cap is reached), the global floor is
//! raised to that peer's newest timestamp. So memory is bounded by
//! `max_peers × per_peer_capacity` entries, and every nonce ever accepted stays rejected.

use std::collections::VecDeque;

use crate::wire::NONCE_LEN;

/// Bounds of the replay cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplayConfig {
    /// Nonces remembered per peer node.
    pub per_peer_capacity: usize,
    /// Peer nodes tracked.
    pub max_peers: usize,
}

impl Default for ReplayConfig {
    /// 16,384 nonces per peer (546 handshakes a second from one node over a 30 s window), and
    /// 5,000 peers: the largest cluster Kubernetes supports. Dropping a peer that is still
    /// active raises the global floor to its newest timestamp, which refuses every node's
    /// handshakes stamped at or before it, so with fewer peers tracked than nodes talk to this
    /// one within the window, a node whose clock lags (within the allowed skew) would be
    /// refused. Memory follows the handshakes of the window, not these bounds, as long as
    /// [`ReplayCache::expire`] runs: a peer costs a few hundred bytes once its entries left.
    fn default() -> Self {
        ReplayConfig {
            per_peer_capacity: 16_384,
            max_peers: 5_000,
        }
    }
}

#[derive(Default)]
struct PeerNonces {
    seen: ahash::HashSet<[u8; NONCE_LEN]>,
    order: VecDeque<([u8; NONCE_LEN], u64)>,
    floor_ms: u64,
    newest_ms: u64,
    last_used: u64,
}

impl PeerNonces {
    /// Drop the oldest entries until those left are all at or after `oldest_valid_ms` and at
    /// most `keep`, raising the floor to each one dropped. Returns how many went.
    fn drop_oldest(&mut self, oldest_valid_ms: u64, keep: usize) -> usize {
        let mut dropped = 0;
        while let Some(&(old, ts)) = self.order.front() {
            if ts >= oldest_valid_ms && self.order.len() <= keep {
                break;
            }
            self.order.pop_front();
            self.seen.remove(&old);
            self.floor_ms = self.floor_ms.max(ts);
            dropped += 1;
        }
        dropped
    }
}

/// The cache. One per node; the handshake consults it at the SYN and records at the ACK.
pub struct ReplayCache {
    config: ReplayConfig,
    peers: ahash::HashMap<String, PeerNonces>,
    global_floor_ms: u64,
    tick: u64,
}

/// A replayed (or too old to tell) nonce.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Replayed;

impl ReplayCache {
    /// Empty cache with the given bounds (each at least 1).
    pub fn new(config: ReplayConfig) -> Self {
        ReplayCache {
            config: ReplayConfig {
                per_peer_capacity: config.per_peer_capacity.max(1),
                max_peers: config.max_peers.max(1),
            },
            peers: Default::default(),
            global_floor_ms: 0,
            tick: 0,
        }
    }

    /// Would this nonce be accepted? (Does not record it.)
    pub fn check(&self, peer: &str, nonce: &[u8; NONCE_LEN], ts_ms: u64) -> Result<(), Replayed> {
        if ts_ms <= self.global_floor_ms {
            return Err(Replayed);
        }
        match self.peers.get(peer) {
            Some(p) if ts_ms <= p.floor_ms || p.seen.contains(nonce) => Err(Replayed),
            _ => Ok(()),
        }
    }

    /// Check and record. `oldest_valid_ms` is the lower edge of the timestamp window at the
    /// current time: entries older than that are dropped (raising the floor), since the window
    /// check rejects them anyway.
    pub fn insert(
        &mut self,
        peer: &str,
        nonce: [u8; NONCE_LEN],
        ts_ms: u64,
        oldest_valid_ms: u64,
    ) -> Result<(), Replayed> {
        self.check(peer, &nonce, ts_ms)?;
        self.tick += 1;
        let tick = self.tick;
        if !self.peers.contains_key(peer) && self.peers.len() >= self.config.max_peers {
            self.evict_peer();
            // The eviction may have raised the global floor above this timestamp.
            if ts_ms <= self.global_floor_ms {
                return Err(Replayed);
            }
        }
        let cap = self.config.per_peer_capacity;
        if !self.peers.contains_key(peer) {
            self.peers.insert(peer.to_owned(), PeerNonces::default());
        }
        let Some(p) = self.peers.get_mut(peer) else {
            return Err(Replayed);
        };
        p.last_used = tick;
        // Room for one more, within the cap.
        p.drop_oldest(oldest_valid_ms, cap - 1);
        if ts_ms <= p.floor_ms {
            return Err(Replayed);
        }
        p.seen.insert(nonce);
        p.order.push_back((nonce, ts_ms));
        p.newest_ms = p.newest_ms.max(ts_ms);
        Ok(())
    }

    fn evict_peer(&mut self) {
        let victim = self
            .peers
            .iter()
            .min_by_key(|(_, p)| p.last_used)
            .map(|(k, p)| (k.clone(), p.newest_ms));
        if let Some((name, newest)) = victim {
            self.peers.remove(&name);
            self.global_floor_ms = self.global_floor_ms.max(newest);
        }
    }

    /// Drop the entries whose timestamps are below `oldest_valid_ms`, the lower edge of the
    /// timestamp window (the window check refuses them anyway; each peer's floor is raised to
    /// what it drops), and the peers left with nothing a floor still guards. Call it
    /// periodically: otherwise a peer that went quiet keeps its last entries (up to the per-peer
    /// capacity) until it is heard from again or evicted. Returns the entries dropped.
    pub fn expire(&mut self, oldest_valid_ms: u64) -> usize {
        let mut dropped = 0;
        self.peers.retain(|_, p| {
            dropped += p.drop_oldest(oldest_valid_ms, usize::MAX);
            if p.order.len() < p.seen.capacity() / 4 {
                p.seen.shrink_to_fit();
                p.order.shrink_to_fit();
            }
            // An empty peer whose floor is below the window guards nothing the window does not.
            !(p.order.is_empty() && p.floor_ms < oldest_valid_ms)
        });
        dropped
    }

    /// Nonces currently stored (all peers).
    pub fn len(&self) -> usize {
        self.peers.values().map(|p| p.order.len()).sum()
    }

    /// True if nothing is stored.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Peers currently tracked.
    pub fn peer_count(&self) -> usize {
        self.peers.len()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn nonce(i: u64) -> [u8; 16] {
        let mut n = [0u8; 16];
        n[..8].copy_from_slice(&i.to_be_bytes());
        n[8..].copy_from_slice(&(!i).to_be_bytes());
        n
    }

    #[test]
    fn a_million_distinct_nonces_stay_within_the_bound_and_none_replays() {
        let cfg = ReplayConfig {
            per_peer_capacity: 1000,
            max_peers: 4,
        };
        let mut c = ReplayCache::new(cfg);
        let base = 1_700_000_000_000u64;
        for i in 0..1_000_000u64 {
            // Timestamps advance 1 ms per nonce, all inside a 30 s window of "now".
            let ts = base + i;
            c.insert("node-a", nonce(i), ts, ts.saturating_sub(30_000))
                .unwrap();
            assert!(c.len() <= 1000);
        }
        assert_eq!(c.len(), 1000);
        assert_eq!(c.peer_count(), 1);
        // Recent nonces are rejected by the set, old ones by the floor.
        assert_eq!(
            c.check("node-a", &nonce(999_999), base + 999_999),
            Err(Replayed)
        );
        assert_eq!(c.check("node-a", &nonce(0), base), Err(Replayed));
        assert_eq!(
            c.check("node-a", &nonce(500_000), base + 500_000),
            Err(Replayed)
        );
        // A fresh nonce with a current timestamp is still accepted.
        assert_eq!(
            c.check("node-a", &nonce(2_000_000), base + 1_000_000),
            Ok(())
        );
    }

    #[test]
    fn peer_count_is_bounded_and_evicted_peers_cannot_replay() {
        let mut c = ReplayCache::new(ReplayConfig {
            per_peer_capacity: 8,
            max_peers: 16,
        });
        let t = 1_000_000u64;
        for i in 0..10_000u64 {
            let name = format!("node-{i}");
            let _ = c.insert(&name, nonce(i), t + i, 0);
            assert!(c.peer_count() <= 16);
        }
        assert_eq!(c.peer_count(), 16);
        // node-0 was evicted long ago: its nonce is still refused (global floor).
        assert_eq!(c.check("node-0", &nonce(0), t), Err(Replayed));
    }

    #[test]
    fn entries_leaving_the_window_are_dropped_but_stay_rejected() {
        let mut c = ReplayCache::new(ReplayConfig::default());
        c.insert("a", nonce(1), 1_000, 0).unwrap();
        c.insert("a", nonce(2), 100_000, 70_000).unwrap();
        assert_eq!(c.len(), 1);
        assert_eq!(c.check("a", &nonce(1), 1_000), Err(Replayed));
        assert_eq!(c.insert("a", nonce(2), 100_000, 70_000), Err(Replayed));
    }

    /// A thousand nodes each complete a handshake within the window; then one whose clock lags
    /// by 20 s (within the 30 s skew). With fewer peers tracked than that, dropping a recent
    /// one raised the global floor above the lagging timestamp and refused it.
    #[test]
    fn a_thousand_busy_peers_do_not_refuse_a_lagging_clock() {
        let mut c = ReplayCache::new(ReplayConfig::default());
        let now = 1_000_000_000u64;
        for i in 0..1000u64 {
            let ts = now - 1000 + i;
            c.insert(&format!("node-{i}"), nonce(i), ts, now - 30_000)
                .unwrap();
        }
        assert_eq!(
            c.insert("node-late", nonce(5000), now - 20_000, now - 30_000),
            Ok(())
        );
    }

    /// Entries that left the window go at the periodic expiry, with the peers they leave
    /// empty, and none of their nonces is accepted again within the window.
    #[test]
    fn expiry_frees_what_the_window_refuses_anyway() {
        let mut c = ReplayCache::new(ReplayConfig::default());
        let t = 1_000_000u64;
        for i in 0..16_384u64 {
            c.insert("busy", nonce(i), t + i, t - 30_000).unwrap();
        }
        c.insert("quiet", nonce(1 << 40), t, t - 30_000).unwrap();
        assert_eq!(c.len(), 16_385);
        // Half of busy's entries are older than the window's edge at t + 8192.
        assert_eq!(c.expire(t + 8192), 8192 + 1);
        assert_eq!(c.len(), 8192);
        assert_eq!(
            c.peer_count(),
            1,
            "quiet is gone: nothing of it is in the window"
        );
        assert_eq!(c.check("busy", &nonce(100), t + 100), Err(Replayed));
        assert_eq!(c.check("busy", &nonce(9000), t + 9000), Err(Replayed));
        assert_eq!(c.expire(t + 100_000), 8192);
        assert!(c.is_empty());
        assert_eq!(c.peer_count(), 0);
    }
}
