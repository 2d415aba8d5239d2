//! The validated peer table and its longest-prefix lookup.

use std::collections::BTreeSet;
use std::net::IpAddr;

use ipnet::IpNet;

use super::{ConfigError, PeerConfig, PublicKey};

/// WireGuard session indices are 24 bits (the low 8 bits count sessions); index 0 is unused.
pub(super) const MAX_PEERS: usize = (1 << 24) - 1;

/// The peers of one tunnel, checked as a whole: unique names and keys, none with the tunnel's
/// own key, unicast endpoints, no prefix allowed for two peers, no prefix holding an endpoint.
/// Positions (`usize`) index [`PeerTable::peers`].
#[derive(Debug, Clone, Default)]
pub struct PeerTable {
    peers: Vec<PeerConfig>,
    by_key: ahash::HashMap<PublicKey, usize>,
    by_name: ahash::HashMap<String, usize>,
    v4: Family,
    v6: Family,
}

/// The prefixes of one address family: for each prefix length in use (longest first), a hash
/// map from the masked address to the peer's position. A lookup costs one hash probe per
/// distinct length (typically one or two: every node's pod prefix has the same length).
#[derive(Debug, Clone, Default)]
struct Family {
    lens: Vec<u8>,
    map: ahash::HashMap<(u8, u128), usize>,
}

impl Family {
    fn insert(&mut self, len: u8, bits: u128, width: u8, pos: usize) -> Option<usize> {
        if let Err(i) = self.lens.binary_search_by(|l| len.cmp(l)) {
            self.lens.insert(i, len);
        }
        self.map.insert((len, mask(bits, len, width)), pos)
    }

    fn lookup(&self, bits: u128, width: u8) -> Option<usize> {
        self.lens
            .iter()
            .find_map(|&len| self.map.get(&(len, mask(bits, len, width))).copied())
    }
}

/// `bits` (an address of `width` bits, right-aligned) with all but its first `len` bits cleared.
fn mask(bits: u128, len: u8, width: u8) -> u128 {
    if len == 0 {
        return 0;
    }
    let all = u128::MAX >> (128 - u32::from(width));
    let keep = all & (all << u32::from(width.saturating_sub(len)));
    bits & keep
}

fn addr_bits(addr: IpAddr) -> (u128, u8) {
    match addr {
        IpAddr::V4(a) => (u128::from(u32::from(a)), 32),
        IpAddr::V6(a) => (u128::from(a), 128),
    }
}

impl PeerTable {
    /// Checks `peers` (for a tunnel whose own public key is `own`) and indexes them. Prefixes
    /// are normalized (host bits cleared); the order of `peers` is kept.
    pub fn new(own: PublicKey, mut peers: Vec<PeerConfig>) -> Result<PeerTable, ConfigError> {
        if peers.len() > MAX_PEERS {
            return Err(ConfigError::TooManyPeers(peers.len()));
        }
        let mut t = PeerTable::default();
        for pos in 0..peers.len() {
            let p = &peers[pos];
            if p.name.is_empty() {
                return Err(ConfigError::EmptyName(p.public_key));
            }
            if p.public_key == own {
                return Err(ConfigError::OwnKey(p.name.clone()));
            }
            let ip = p.endpoint.ip();
            if p.endpoint.port() == 0
                || ip.is_unspecified()
                || ip.is_multicast()
                || is_broadcast(ip)
            {
                return Err(ConfigError::BadEndpoint {
                    peer: p.name.clone(),
                    endpoint: p.endpoint,
                });
            }
            if t.by_name.insert(p.name.clone(), pos).is_some() {
                return Err(ConfigError::DuplicateName(p.name.clone()));
            }
            if let Some(first) = t.by_key.insert(p.public_key, pos) {
                return Err(ConfigError::DuplicateKey {
                    first: peers[first].name.clone(),
                    second: p.name.clone(),
                    key: p.public_key,
                });
            }
            let allowed = &mut peers[pos].allowed_ips;
            for prefix in allowed.iter_mut() {
                *prefix = prefix.trunc();
            }
            allowed.sort();
            allowed.dedup();
        }
        for (pos, p) in peers.iter().enumerate() {
            for prefix in &p.allowed_ips {
                let (bits, width) = addr_bits(prefix.network());
                let family = if width == 32 { &mut t.v4 } else { &mut t.v6 };
                if let Some(first) = family.insert(prefix.prefix_len(), bits, width, pos) {
                    return Err(ConfigError::DuplicatePrefix {
                        prefix: *prefix,
                        first: peers[first].name.clone(),
                        second: p.name.clone(),
                    });
                }
                if let Some(owner) = peers.iter().find(|o| prefix.contains(&o.endpoint.ip())) {
                    return Err(ConfigError::EndpointInPrefix {
                        peer: p.name.clone(),
                        prefix: *prefix,
                        endpoint: owner.endpoint,
                        owner: owner.name.clone(),
                    });
                }
            }
        }
        t.peers = peers;
        Ok(t)
    }

    /// The peers, in the order given.
    pub fn peers(&self) -> &[PeerConfig] {
        &self.peers
    }

    /// The position of the peer whose allowed prefixes hold `addr` most specifically.
    pub fn lookup(&self, addr: IpAddr) -> Option<usize> {
        let (bits, width) = addr_bits(addr);
        if width == 32 {
            self.v4.lookup(bits, width)
        } else {
            self.v6.lookup(bits, width)
        }
    }

    /// The position of the peer with this public key.
    pub fn by_key(&self, key: &PublicKey) -> Option<usize> {
        self.by_key.get(key).copied()
    }

    /// The position of the peer with this name.
    pub fn by_name(&self, name: &str) -> Option<usize> {
        self.by_name.get(name).copied()
    }

    /// Every allowed prefix of every peer: what is routed into the tunnel.
    pub fn prefixes(&self) -> BTreeSet<IpNet> {
        self.peers
            .iter()
            .flat_map(|p| p.allowed_ips.iter().copied())
            .collect()
    }
}

fn is_broadcast(ip: IpAddr) -> bool {
    matches!(ip, IpAddr::V4(a) if a.is_broadcast())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn key(n: u8) -> PublicKey {
        PublicKey([n; 32])
    }

    fn peer(name: &str, k: u8, endpoint: &str, allowed: &[&str]) -> PeerConfig {
        PeerConfig {
            name: name.into(),
            public_key: key(k),
            endpoint: endpoint.parse().unwrap(),
            allowed_ips: allowed.iter().map(|a| a.parse().unwrap()).collect(),
        }
    }

    fn table(peers: Vec<PeerConfig>) -> Result<PeerTable, ConfigError> {
        PeerTable::new(key(0), peers)
    }

    #[test]
    fn longest_prefix_wins_in_both_families() {
        let t = table(vec![
            peer(
                "b",
                2,
                "10.201.0.2:51871",
                &["10.202.0.0/16", "fd00:202::/48"],
            ),
            peer(
                "c",
                3,
                "10.201.0.3:51871",
                &["10.202.3.0/24", "fd00:202:0:3::/64"],
            ),
            peer(
                "d",
                4,
                "10.201.0.4:51871",
                &["10.202.3.7/32", "10.202.0.0/15"],
            ),
        ])
        .unwrap();
        let at = |a: &str| {
            t.lookup(a.parse().unwrap())
                .map(|p| t.peers()[p].name.as_str())
        };
        assert_eq!(at("10.202.1.9"), Some("b"));
        assert_eq!(at("10.202.3.9"), Some("c"));
        assert_eq!(at("10.202.3.7"), Some("d"));
        assert_eq!(
            at("10.203.1.1"),
            Some("d"),
            "only the shortest prefix holds it"
        );
        assert_eq!(at("10.201.0.2"), None);
        assert_eq!(at("fd00:202:0:3::9"), Some("c"));
        assert_eq!(at("fd00:202:0:4::9"), Some("b"));
        assert_eq!(at("fd00:203::1"), None, "no IPv6 default");
        assert_eq!(t.by_name("c"), Some(1));
        assert_eq!(t.by_key(&key(4)), Some(2));
        assert_eq!(t.by_key(&key(9)), None);
    }

    #[test]
    fn prefixes_are_normalized_and_listed_once() {
        let t = table(vec![peer(
            "b",
            2,
            "10.201.0.2:51871",
            &["10.202.2.77/24", "10.202.2.0/24"],
        )])
        .unwrap();
        assert_eq!(t.peers()[0].allowed_ips, ["10.202.2.0/24".parse().unwrap()]);
        assert_eq!(
            t.prefixes().into_iter().collect::<Vec<_>>(),
            ["10.202.2.0/24".parse::<IpNet>().unwrap()]
        );
        assert_eq!(t.lookup("10.202.2.1".parse().unwrap()), Some(0));
        assert_eq!(t.lookup("10.202.3.1".parse().unwrap()), None);
    }

    #[test]
    fn mask_handles_every_length() {
        assert_eq!(mask(0xffff_ffff, 0, 32), 0);
        assert_eq!(mask(0xffff_ffff, 32, 32), 0xffff_ffff);
        assert_eq!(mask(0xffff_ffff, 8, 32), 0xff00_0000);
        assert_eq!(mask(u128::MAX, 128, 128), u128::MAX);
        assert_eq!(mask(u128::MAX, 1, 128), 1 << 127);
    }

    #[test]
    fn bad_sets_are_refused_naming_the_peers() {
        let ok = || peer("b", 2, "10.201.0.2:51871", &["10.202.2.0/24"]);
        let cases: Vec<(Vec<PeerConfig>, ConfigError)> = vec![
            (
                vec![peer("", 2, "10.201.0.2:1", &[])],
                ConfigError::EmptyName(key(2)),
            ),
            (
                vec![ok(), peer("b", 3, "10.201.0.3:1", &[])],
                ConfigError::DuplicateName("b".into()),
            ),
            (
                vec![ok(), peer("c", 2, "10.201.0.3:1", &[])],
                ConfigError::DuplicateKey {
                    first: "b".into(),
                    second: "c".into(),
                    key: key(2),
                },
            ),
            (
                vec![peer("me", 0, "10.201.0.3:1", &[])],
                ConfigError::OwnKey("me".into()),
            ),
            (
                vec![peer("c", 3, "10.201.0.3:0", &[])],
                ConfigError::BadEndpoint {
                    peer: "c".into(),
                    endpoint: "10.201.0.3:0".parse().unwrap(),
                },
            ),
            (
                vec![peer("c", 3, "0.0.0.0:51871", &[])],
                ConfigError::BadEndpoint {
                    peer: "c".into(),
                    endpoint: "0.0.0.0:51871".parse().unwrap(),
                },
            ),
            (
                vec![ok(), peer("c", 3, "10.201.0.3:1", &["10.202.2.9/24"])],
                ConfigError::DuplicatePrefix {
                    prefix: "10.202.2.0/24".parse().unwrap(),
                    first: "b".into(),
                    second: "c".into(),
                },
            ),
            (
                vec![ok(), peer("c", 3, "10.201.0.3:1", &["10.201.0.0/24"])],
                ConfigError::EndpointInPrefix {
                    peer: "c".into(),
                    prefix: "10.201.0.0/24".parse().unwrap(),
                    endpoint: "10.201.0.2:51871".parse().unwrap(),
                    owner: "b".into(),
                },
            ),
        ];
        for (peers, want) in cases {
            assert_eq!(table(peers).unwrap_err(), want);
        }
    }
}
