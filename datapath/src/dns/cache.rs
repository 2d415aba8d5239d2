//! The bounded cache of what each workload resolved: per workload, address → names, each with
//! the time its TTL runs out. Pure: time is passed in (unix ms).

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::sync::Arc;

use crate::processor::WorkloadId;

/// Names kept per (workload, address) at most. Beyond it the name whose TTL runs out first
/// goes. (A CDN address serves many names; a workload rarely resolves more than a few of them
/// to one address within a TTL.)
pub const MAX_NAMES_PER_ADDRESS: usize = 16;

/// The bounds and the TTL clamp of the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheConfig {
    /// The shortest time an answer is kept, seconds: a smaller TTL (0 included) is raised to
    /// it. An answer with TTL 0 means "use it for this transaction only", and the transaction
    /// is the connection the workload opens right after it; a TCP connection's egress is
    /// decided at its SYN-ACK, a round trip (and, if the SYN is lost, retransmissions after 1
    /// and 3 s) later. 5 s covers that and little more. Raise it for clients that cache
    /// answers beyond their TTL (the JVM keeps them 30 s by default).
    pub min_ttl_s: u32,
    /// The longest time an answer is kept, seconds: a larger TTL is lowered to it (an address
    /// that once belonged to a name does not stay that name for days).
    pub max_ttl_s: u32,
    /// (workload, address, name) entries kept over all workloads.
    pub max_entries: usize,
    /// Entries kept per workload.
    pub max_entries_per_workload: usize,
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            min_ttl_s: 5,
            max_ttl_s: 86_400,
            max_entries: 65_536,
            max_entries_per_workload: 8_192,
        }
    }
}

/// One workload's names of one address, with when each runs out (unix ms).
type Names = Vec<(Arc<str>, u64)>;

/// What each workload resolved: address → names, until their TTL runs out.
///
/// Bounded three ways: [`MAX_NAMES_PER_ADDRESS`] names per (workload, address),
/// [`CacheConfig::max_entries_per_workload`] entries per workload and
/// [`CacheConfig::max_entries`] in all. When a bound is reached the entry that runs out first
/// goes (within the address, the workload, or the whole cache); a new entry that would run out
/// before all of those is not added. Each workload's entries are also kept in time order, so
/// expiry ([`NameCache::expire`]) and eviction take the earliest without walking the cache; a
/// lookup ([`NameCache::names`]) is one hash lookup (none when the cache is empty) and
/// ignores entries past their time that expiry has not removed yet.
#[derive(Debug, Default)]
pub struct NameCache {
    config: CacheConfig,
    entries: ahash::HashMap<(WorkloadId, IpAddr), Names>,
    /// Per workload, its entries in time order.
    timers: ahash::HashMap<WorkloadId, BTreeSet<(u64, IpAddr, Arc<str>)>>,
    len: usize,
    evicted: u64,
    expired: u64,
}

impl NameCache {
    /// An empty cache.
    pub fn new(config: CacheConfig) -> Self {
        NameCache {
            config,
            ..NameCache::default()
        }
    }

    /// The configuration.
    pub fn config(&self) -> &CacheConfig {
        &self.config
    }

    /// Entries (workload, address, name) held, expired or not.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the cache holds nothing.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Entries dropped to make room so far.
    pub fn evicted(&self) -> u64 {
        self.evicted
    }

    /// Entries removed because their TTL ran out, so far.
    pub fn expired(&self) -> u64 {
        self.expired
    }

    /// When an answer received at `now_ms` with `ttl_s` runs out, after the clamp.
    pub fn expiry(&self, ttl_s: u32, now_ms: u64) -> u64 {
        let ttl = ttl_s.clamp(
            self.config.min_ttl_s,
            self.config.max_ttl_s.max(self.config.min_ttl_s),
        );
        now_ms.saturating_add(u64::from(ttl) * 1000)
    }

    /// Learn that `workload` resolved `name` to `ip` at `now_ms`, valid `ttl_s` seconds
    /// (clamped). Learning it again keeps the later of the two times.
    pub fn insert(
        &mut self,
        workload: WorkloadId,
        ip: IpAddr,
        name: &Arc<str>,
        ttl_s: u32,
        now_ms: u64,
    ) {
        let until = self.expiry(ttl_s, now_ms);
        let key = (workload, ip);
        if let Some(names) = self.entries.get_mut(&key)
            && let Some(slot) = names.iter_mut().find(|(n, _)| **n == **name)
        {
            if slot.1 < until {
                let old = slot.1;
                slot.1 = until;
                if let Some(timers) = self.timers.get_mut(&workload) {
                    timers.remove(&(old, ip, name.clone()));
                    timers.insert((until, ip, name.clone()));
                }
            }
            return;
        }
        // Room in the address, the workload, the cache: the earliest entry goes, unless the
        // new one would run out first.
        let earliest_of_address = self.entries.get(&key).and_then(|names| {
            (names.len() >= MAX_NAMES_PER_ADDRESS)
                .then(|| names.iter().min_by_key(|(_, t)| *t).cloned())
                .flatten()
        });
        if let Some((old, t)) = earliest_of_address {
            if t >= until {
                self.evicted += 1;
                return;
            }
            self.remove(workload, t, ip, &old);
            self.evicted += 1;
        }
        while self.timers.get(&workload).map_or(0, BTreeSet::len)
            >= self.config.max_entries_per_workload.max(1)
        {
            let Some((t, old_ip, old)) =
                self.timers.get(&workload).and_then(|s| s.first()).cloned()
            else {
                break;
            };
            if t >= until {
                self.evicted += 1;
                return;
            }
            self.remove(workload, t, old_ip, &old);
            self.evicted += 1;
        }
        while self.len >= self.config.max_entries.max(1) {
            // The earliest over all workloads: the first of each workload's timers (a node has
            // at most a few hundred workloads, and this runs only when the cache is full).
            let Some((t, w, old_ip, old)) = self
                .timers
                .iter()
                .filter_map(|(w, s)| s.first().map(|(t, ip, n)| (*t, *w, *ip, n.clone())))
                .min_by_key(|(t, w, _, _)| (*t, *w))
            else {
                break;
            };
            if t >= until {
                self.evicted += 1;
                return;
            }
            self.remove(w, t, old_ip, &old);
            self.evicted += 1;
        }
        self.entries
            .entry(key)
            .or_default()
            .push((name.clone(), until));
        self.timers
            .entry(workload)
            .or_default()
            .insert((until, ip, name.clone()));
        self.len += 1;
    }

    /// Remove one entry (known to be in `timers` at `until`).
    fn remove(&mut self, workload: WorkloadId, until: u64, ip: IpAddr, name: &Arc<str>) {
        let Some(timers) = self.timers.get_mut(&workload) else {
            return;
        };
        if !timers.remove(&(until, ip, name.clone())) {
            return;
        }
        if timers.is_empty() {
            self.timers.remove(&workload);
        }
        if let Some(names) = self.entries.get_mut(&(workload, ip)) {
            names.retain(|(n, t)| !(*t == until && **n == **name));
            if names.is_empty() {
                self.entries.remove(&(workload, ip));
            }
        }
        self.len = self.len.saturating_sub(1);
    }

    /// The names `workload` resolved to `ip` whose time has not run out at `now_ms`, written
    /// into `out` (at most [`MAX_NAMES_PER_ADDRESS`]); returns how many. Allocates nothing.
    pub fn names<'c>(
        &'c self,
        workload: WorkloadId,
        ip: IpAddr,
        now_ms: u64,
        out: &mut [&'c str; MAX_NAMES_PER_ADDRESS],
    ) -> usize {
        if self.len == 0 {
            return 0;
        }
        let Some(names) = self.entries.get(&(workload, ip)) else {
            return 0;
        };
        let mut n = 0;
        for ((name, _), slot) in names
            .iter()
            .filter(|(_, until)| *until > now_ms)
            .zip(out.iter_mut())
        {
            *slot = name;
            n += 1;
        }
        n
    }

    /// [`NameCache::names`], shared with the cache (for what outlives the lookup: a flow
    /// remembered for re-checks). Allocates only when there is a name.
    pub fn names_shared(&self, workload: WorkloadId, ip: IpAddr, now_ms: u64) -> Box<[Arc<str>]> {
        if self.len == 0 {
            return Box::default();
        }
        self.entries
            .get(&(workload, ip))
            .map_or_else(Box::default, |names| {
                names
                    .iter()
                    .filter(|(_, until)| *until > now_ms)
                    .map(|(n, _)| n.clone())
                    .collect()
            })
    }

    /// [`NameCache::names`], owned and sorted (for status pages and tests).
    pub fn names_vec(&self, workload: WorkloadId, ip: IpAddr, now_ms: u64) -> Vec<String> {
        let mut out = [""; MAX_NAMES_PER_ADDRESS];
        let n = self.names(workload, ip, now_ms, &mut out);
        let mut v: Vec<String> = out[..n].iter().map(|s| (*s).to_owned()).collect();
        v.sort();
        v
    }

    /// Remove the entries whose time ran out at `now_ms` (each workload's earliest first;
    /// nothing else is visited). Returns how many.
    pub fn expire(&mut self, now_ms: u64) -> usize {
        let mut gone = Vec::new();
        for (w, timers) in &mut self.timers {
            while let Some(first) = timers.first()
                && first.0 <= now_ms
            {
                if let Some((t, ip, name)) = timers.pop_first() {
                    gone.push((*w, t, ip, name));
                }
            }
        }
        self.timers.retain(|_, t| !t.is_empty());
        for (w, t, ip, name) in &gone {
            if let Some(names) = self.entries.get_mut(&(*w, *ip)) {
                names.retain(|(n, until)| !(*until == *t && **n == **name));
                if names.is_empty() {
                    self.entries.remove(&(*w, *ip));
                }
            }
        }
        self.len = self.len.saturating_sub(gone.len());
        self.expired += gone.len() as u64;
        gone.len()
    }

    /// Forget everything `workload` resolved.
    pub fn remove_workload(&mut self, workload: WorkloadId) {
        let Some(timers) = self.timers.remove(&workload) else {
            return;
        };
        self.len = self.len.saturating_sub(timers.len());
        for (_, ip, _) in timers {
            self.entries.remove(&(workload, ip));
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    const NOW: u64 = 1_780_000_000_000;
    const W1: WorkloadId = WorkloadId(1);
    const W2: WorkloadId = WorkloadId(2);

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn name(s: &str) -> Arc<str> {
        Arc::from(s)
    }

    fn small(per_workload: usize, total: usize) -> NameCache {
        NameCache::new(CacheConfig {
            max_entries: total,
            max_entries_per_workload: per_workload,
            ..CacheConfig::default()
        })
    }

    #[test]
    fn an_empty_cache_finds_nothing() {
        let c = NameCache::default();
        let mut out = [""; MAX_NAMES_PER_ADDRESS];
        assert_eq!(c.names(W1, ip("192.0.2.7"), NOW, &mut out), 0);
        assert!(c.is_empty());
    }

    #[test]
    fn names_are_found_until_their_ttl_runs_out() {
        let mut c = NameCache::new(CacheConfig::default());
        c.insert(W1, ip("192.0.2.7"), &name("www.example.com"), 60, NOW);
        c.insert(W1, ip("192.0.2.7"), &name("edge.cdn.net"), 30, NOW);
        assert_eq!(
            c.names_vec(W1, ip("192.0.2.7"), NOW),
            ["edge.cdn.net", "www.example.com"]
        );
        assert_eq!(
            c.names_vec(W1, ip("192.0.2.7"), NOW + 29_999),
            ["edge.cdn.net", "www.example.com"]
        );
        // Past its time a name is not found, even before expiry removes it.
        assert_eq!(
            c.names_vec(W1, ip("192.0.2.7"), NOW + 30_000),
            ["www.example.com"]
        );
        assert_eq!(c.len(), 2);
        assert_eq!(c.expire(NOW + 30_000), 1);
        assert_eq!(c.len(), 1);
        assert_eq!(c.expire(NOW + 60_000), 1);
        assert!(c.is_empty());
        assert_eq!(c.names_vec(W1, ip("192.0.2.7"), NOW), Vec::<String>::new());
        assert_eq!(c.expired(), 2);
        assert!(c.entries.is_empty() && c.timers.is_empty());
    }

    #[test]
    fn ttls_are_clamped_to_the_floor_and_the_ceiling() {
        let mut c = NameCache::new(CacheConfig::default());
        // TTL 0: still there for the connection that follows (5 s).
        c.insert(W1, ip("192.0.2.1"), &name("zero.example.com"), 0, NOW);
        c.insert(W1, ip("192.0.2.2"), &name("week.example.com"), 604_800, NOW);
        assert_eq!(
            c.names_vec(W1, ip("192.0.2.1"), NOW + 4_999),
            ["zero.example.com"]
        );
        assert!(c.names_vec(W1, ip("192.0.2.1"), NOW + 5_000).is_empty());
        assert_eq!(
            c.names_vec(W1, ip("192.0.2.2"), NOW + 86_399_999),
            ["week.example.com"]
        );
        assert!(
            c.names_vec(W1, ip("192.0.2.2"), NOW + 86_400_000)
                .is_empty()
        );
    }

    #[test]
    fn learning_again_keeps_the_later_time() {
        let mut c = NameCache::new(CacheConfig::default());
        let n = name("www.example.com");
        c.insert(W1, ip("192.0.2.7"), &n, 300, NOW);
        // The same record, aged in the resolver's cache: runs out at the same time or earlier.
        c.insert(W1, ip("192.0.2.7"), &n, 100, NOW + 200_000);
        c.insert(W1, ip("192.0.2.7"), &n, 10, NOW + 1_000);
        assert_eq!(c.len(), 1);
        assert_eq!(
            c.names_vec(W1, ip("192.0.2.7"), NOW + 299_999),
            ["www.example.com"]
        );
        // A fresh answer extends it.
        c.insert(W1, ip("192.0.2.7"), &n, 300, NOW + 250_000);
        assert_eq!(c.len(), 1);
        assert_eq!(c.expire(NOW + 549_999), 0);
        assert_eq!(c.expire(NOW + 550_000), 1);
    }

    #[test]
    fn workloads_do_not_see_each_others_names() {
        let mut c = NameCache::new(CacheConfig::default());
        c.insert(W1, ip("192.0.2.7"), &name("www.example.com"), 60, NOW);
        assert!(c.names_vec(W2, ip("192.0.2.7"), NOW).is_empty());
        c.insert(W2, ip("192.0.2.7"), &name("other.example.org"), 60, NOW);
        assert_eq!(c.names_vec(W1, ip("192.0.2.7"), NOW), ["www.example.com"]);
        c.remove_workload(W1);
        assert!(c.names_vec(W1, ip("192.0.2.7"), NOW).is_empty());
        assert_eq!(c.names_vec(W2, ip("192.0.2.7"), NOW), ["other.example.org"]);
        assert_eq!(c.len(), 1);
    }

    #[test]
    fn an_address_keeps_at_most_sixteen_names_earliest_out_first() {
        let mut c = NameCache::new(CacheConfig::default());
        let a = ip("192.0.2.7");
        for i in 0..MAX_NAMES_PER_ADDRESS {
            c.insert(
                W1,
                a,
                &name(&format!("n{i}.example.com")),
                100 + i as u32,
                NOW,
            );
        }
        assert_eq!(c.names_vec(W1, a, NOW).len(), MAX_NAMES_PER_ADDRESS);
        // A name that runs out later evicts n0 (the earliest).
        c.insert(W1, a, &name("late.example.com"), 1000, NOW);
        let names = c.names_vec(W1, a, NOW);
        assert_eq!(names.len(), MAX_NAMES_PER_ADDRESS);
        assert!(names.contains(&"late.example.com".to_owned()));
        assert!(!names.contains(&"n0.example.com".to_owned()));
        // One that would run out before all of them is not added.
        c.insert(W1, a, &name("early.example.com"), 5, NOW);
        assert!(
            !c.names_vec(W1, a, NOW)
                .contains(&"early.example.com".to_owned())
        );
        assert_eq!(c.evicted(), 2);
        assert_eq!(c.len(), MAX_NAMES_PER_ADDRESS);
    }

    #[test]
    fn the_per_workload_bound_evicts_that_workloads_earliest() {
        let mut c = small(3, 100);
        c.insert(W2, ip("192.0.2.100"), &name("w2.example.com"), 1, NOW);
        for (i, ttl) in [(1, 50u32), (2, 20), (3, 80)] {
            c.insert(
                W1,
                ip(&format!("192.0.2.{i}")),
                &name("a.example.com"),
                ttl,
                NOW,
            );
        }
        c.insert(W1, ip("192.0.2.4"), &name("a.example.com"), 60, NOW);
        assert!(
            c.names_vec(W1, ip("192.0.2.2"), NOW).is_empty(),
            "TTL 20 went"
        );
        for i in [1, 3, 4] {
            assert_eq!(c.names_vec(W1, ip(&format!("192.0.2.{i}")), NOW).len(), 1);
        }
        // The other workload's entry, earlier still, stays.
        assert_eq!(c.names_vec(W2, ip("192.0.2.100"), NOW).len(), 1);
        assert_eq!(c.len(), 4);
        assert_eq!(c.evicted(), 1);
    }

    #[test]
    fn the_total_bound_evicts_the_earliest_of_all() {
        let mut c = small(100, 3);
        c.insert(W1, ip("192.0.2.1"), &name("a.example.com"), 50, NOW);
        c.insert(W2, ip("192.0.2.2"), &name("b.example.com"), 20, NOW);
        c.insert(W1, ip("192.0.2.3"), &name("c.example.com"), 80, NOW);
        c.insert(
            WorkloadId(3),
            ip("192.0.2.4"),
            &name("d.example.com"),
            60,
            NOW,
        );
        assert!(c.names_vec(W2, ip("192.0.2.2"), NOW).is_empty());
        assert_eq!(c.len(), 3);
        // Shorter than all: not added.
        c.insert(W2, ip("192.0.2.5"), &name("e.example.com"), 10, NOW);
        assert!(c.names_vec(W2, ip("192.0.2.5"), NOW).is_empty());
        assert_eq!(c.len(), 3);
        assert_eq!(c.evicted(), 2);
    }

    #[test]
    fn a_flood_stays_within_the_bounds_and_expires_completely() {
        let mut c = small(1000, 4000);
        for i in 0u32..50_000 {
            let w = WorkloadId(i % 7);
            let a = IpAddr::from([10, (i >> 16) as u8, (i >> 8) as u8, i as u8]);
            c.insert(
                w,
                a,
                &name(&format!("h{}.example.com", i % 37)),
                i % 600,
                NOW + u64::from(i),
            );
            assert!(c.len() <= 4000);
            assert!(c.timers.values().all(|t| t.len() <= 1000));
        }
        let held: usize = c.entries.values().map(Vec::len).sum();
        assert_eq!(held, c.len());
        assert_eq!(c.timers.values().map(BTreeSet::len).sum::<usize>(), c.len());
        c.expire(NOW + 50_000 + 600_000);
        assert!(c.is_empty() && c.entries.is_empty() && c.timers.is_empty());
    }
}
