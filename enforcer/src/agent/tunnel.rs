//! Encryption between nodes (`tessera run --encrypt`): the WireGuard tunnel's peers, made from
//! the nodes the agent knows (static inventory `nodes:`, Kubernetes Node objects) and the
//! tunnel keys its identity trusts (`identity::Node::peer_tunnel_key`); and the task that
//! owns the running tunnel (`datapath::shell::tunnel`).
//!
//! [`plan`] is pure: from the node list, our own name and a key lookup it says which nodes are
//! peers (name, key, endpoint, pod prefixes), which known pod prefixes must go into the tunnel
//! although no peer serves them (they are dropped there rather than sent in clear), and why
//! each other node is not a peer. The agent computes a plan after every node or certificate
//! change and hands it to [`run`], which applies the newest one.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use anyhow::{Context, Result};
use datapath::shell::tunnel::{self, TunnelConfig, TunnelHandle};
use datapath::shell::{NodeRoutes, TunnelStatsReader};
use datapath::tunnel::{PeerConfig, PublicKey, StaticSecret};
use ipnet::IpNet;
use tokio::sync::watch;

use crate::runtime::NodeInfo;

/// `--tunnel-*`: how to run the tunnel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TunnelOptions {
    /// UDP port of every node's tunnel (`--tunnel-port`).
    pub port: u16,
    /// TUN device name (`--tunnel-device`).
    pub device: String,
    /// TUN device MTU (`--tunnel-mtu`).
    pub mtu: u16,
}

impl Default for TunnelOptions {
    fn default() -> Self {
        TunnelOptions {
            port: datapath::tunnel::DEFAULT_PORT,
            device: "tsr-wg0".into(),
            mtu: datapath::tunnel::DEFAULT_MTU,
        }
    }
}

impl TunnelOptions {
    /// Refuses values the kernel or the protocol cannot use; `name("port")` names where each
    /// value came from (`--tunnel-port`, or the config file's `tunnelPort`).
    pub fn check_named(&self, name: impl Fn(&str) -> String) -> Result<()> {
        if self.port == 0 {
            anyhow::bail!(
                "{}: must not be 0: every node's tunnel listens on it",
                name("port")
            );
        }
        let d = &self.device;
        if d.is_empty()
            || d.len() > 15
            || d == "."
            || d == ".."
            || d.bytes()
                .any(|b| b == b'/' || b == b':' || !b.is_ascii_graphic())
        {
            anyhow::bail!(
                "{}: {d:?} is not a network device name (1 to 15 printable characters, no '/', ':' or space)",
                name("device")
            );
        }
        if !(576..=9000).contains(&self.mtu) {
            anyhow::bail!(
                "{}: {} is out of range (576 to 9000; 1420 leaves room for WireGuard over IPv6 on a 1500-byte link)",
                name("mtu"),
                self.mtu
            );
        }
        Ok(())
    }
}

/// What the tunnel should be: peers, the prefixes routed into it for no peer, our own pod
/// prefixes (where the routes' source address is found), and why each other known node is
/// not a peer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    pub peers: Vec<PeerConfig>,
    pub blocked: Vec<IpNet>,
    pub own_prefixes: Vec<IpNet>,
    /// Node name → why it is not a peer (our own node is not listed).
    pub not_peers: BTreeMap<String, String>,
}

impl Plan {
    /// Whether applying `other` would change the tunnel (the reasons are not the tunnel's).
    pub fn same_tunnel(&self, other: &Plan) -> bool {
        self.peers == other.peers
            && self.blocked == other.blocked
            && self.own_prefixes == other.own_prefixes
    }

    pub fn routes(&self) -> NodeRoutes {
        NodeRoutes {
            blocked: self.blocked.clone(),
            own_prefixes: self.own_prefixes.clone(),
        }
    }
}

fn overlaps(a: &IpNet, b: &IpNet) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

/// The tunnel plan. `own`: this node's name. `key`: the tunnel key this node trusts for a
/// node now (`None`: none; `no_key` says why, in the node's status). `own_key`: our own
/// tunnel key. Endpoints are each node's first tunnel address of the family of ours (our
/// own first tunnel address; IPv4 while our own node is not in the list) and `port`.
///
/// A node is a peer when it has pod prefixes, an address of our family and a trusted key. A
/// node that is not is listed with the reason; its pod prefixes are *blocked* (routed into
/// the tunnel, dropped there as `no_peer`), so that traffic to its pods is not sent in clear
/// while it lacks a session. Except prefixes that cannot be routed into the tunnel without
/// breaking the cluster: one that overlaps our own pod prefixes, or holds a node's address
/// (the tunnel's own datagrams, and node traffic, would go into it); such a node is not a
/// peer either, and its prefixes are left to the cluster's routing (and said so). A prefix
/// that another node (earlier by name) already claims is that node's.
pub fn plan(
    own: &str,
    nodes: &BTreeMap<String, NodeInfo>,
    port: u16,
    own_key: PublicKey,
    key: impl Fn(&str) -> Option<[u8; 32]>,
    no_key: &str,
) -> Plan {
    let me = nodes.get(own);
    let own_prefixes: Vec<IpNet> = me.map(|n| n.pod_cidrs.clone()).unwrap_or_default();
    let v4 = me
        .and_then(|n| n.tunnel_addresses.first())
        .is_none_or(IpAddr::is_ipv4);
    // Every node address: no routed prefix may hold one.
    let addresses: Vec<(&str, IpAddr)> = nodes
        .values()
        .flat_map(|n| {
            n.node
                .addresses
                .iter()
                .chain(&n.tunnel_addresses)
                .map(move |a| (n.name(), *a))
        })
        .collect();
    let mut plan = Plan {
        own_prefixes: own_prefixes.clone(),
        ..Plan::default()
    };
    let mut claimed: BTreeMap<IpNet, &str> = BTreeMap::new();
    let mut keys: BTreeMap<PublicKey, &str> = BTreeMap::new();
    for (name, n) in nodes {
        if name == own {
            continue;
        }
        if n.pod_cidrs.is_empty() {
            plan.not_peers.insert(
                name.clone(),
                "no pod CIDRs known (nothing to route to it)".into(),
            );
            continue;
        }
        let mut unroutable = None;
        for p in &n.pod_cidrs {
            if let Some(o) = own_prefixes.iter().find(|o| overlaps(p, o)) {
                unroutable = Some(format!("pod CIDR {p} overlaps this node's own {o}"));
            } else if let Some((holder, a)) = addresses.iter().find(|(_, a)| p.contains(a)) {
                unroutable = Some(format!(
                    "pod CIDR {p} holds the address {a} of node {holder}"
                ));
            } else if let Some(first) = claimed.get(p) {
                unroutable = Some(format!("pod CIDR {p} is also node {first}'s"));
            }
            if unroutable.is_some() {
                break;
            }
        }
        if let Some(why) = unroutable {
            plan.not_peers.insert(
                name.clone(),
                format!("{why}: left to the cluster's routing"),
            );
            continue;
        }
        for p in &n.pod_cidrs {
            claimed.insert(*p, name);
        }
        let endpoint = n
            .tunnel_addresses
            .iter()
            .find(|a| a.is_ipv4() == v4)
            .map(|a| SocketAddr::new(*a, port));
        let refused = match (endpoint, key(name).map(PublicKey)) {
            (None, _) => Err(format!(
                "no {} address to reach its tunnel at",
                if v4 { "IPv4" } else { "IPv6" }
            )),
            (_, None) => Err(no_key.to_owned()),
            (_, Some(k)) if k == own_key => Err("has this node's own tunnel key".to_owned()),
            (_, Some(k)) if keys.contains_key(&k) => Err(format!(
                "same tunnel key as node {}",
                keys.get(&k).copied().unwrap_or_default()
            )),
            (Some(endpoint), Some(k)) => Ok((endpoint, k)),
        };
        match refused {
            Ok((endpoint, public_key)) => {
                keys.insert(public_key, name);
                plan.peers.push(PeerConfig {
                    name: name.clone(),
                    public_key,
                    endpoint,
                    allowed_ips: n.pod_cidrs.clone(),
                });
            }
            Err(why) => {
                plan.blocked.extend(n.pod_cidrs.iter().copied());
                plan.not_peers.insert(
                    name.clone(),
                    format!(
                        "{why}: its pods are unreachable from here (dropped, not sent in clear)"
                    ),
                );
            }
        }
    }
    plan.blocked.sort();
    plan.blocked.dedup();
    plan
}

/// What the agent shares about the tunnel with `/status` and `/metrics`.
#[derive(Debug)]
pub struct TunnelShared {
    pub device: String,
    pub listen: SocketAddr,
    pub stats: TunnelStatsReader,
    /// Known nodes that are not peers, with why (from the newest plan).
    pub not_peers: std::sync::Mutex<BTreeMap<String, String>>,
}

/// Starts the tunnel in the agent's own network namespace with this node's `secret`, no
/// peers yet (the first plan follows the first node list). Errors name the flag and cause.
pub fn start(opts: &TunnelOptions, secret: &StaticSecret) -> Result<TunnelHandle> {
    let config = |listen: IpAddr| TunnelConfig {
        device: opts.device.clone(),
        mtu: opts.mtu,
        listen: SocketAddr::new(listen, opts.port),
        ..TunnelConfig::default()
    };
    // Dual-stack [::] serves IPv4 and IPv6 peers; a namespace without IPv6 gets IPv4 only.
    let ipv6 = std::net::UdpSocket::bind((std::net::Ipv6Addr::UNSPECIFIED, 0)).is_ok();
    let listen = if ipv6 {
        IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED)
    } else {
        IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED)
    };
    // The shell's error already says its cause (its source would be printed twice).
    tunnel::start(config(listen), secret, Vec::new())
        .map_err(|e| anyhow::anyhow!("{e}"))
        .with_context(|| {
        format!(
            "--encrypt: the tunnel cannot start (device {}, UDP port {}); refusing to run without the encryption asked for",
            opts.device, opts.port
        )
    })
}

/// Owns the running tunnel: applies the newest plan whenever one comes, checks every second
/// that the tunnel still runs, and shuts it down (routes, rule and device removed) when `stop`
/// turns true. Returns an error if the tunnel stopped on its own (the agent then stops too:
/// it never runs unencrypted when encryption was asked for).
///
/// `secrets`: our static key after a rotation of the node's credentials; applied before any
/// plan that came with it (a plan may need the new key: a peer cannot have our own).
pub async fn run(
    handle: TunnelHandle,
    mut plans: watch::Receiver<Plan>,
    mut secrets: watch::Receiver<Option<StaticSecret>>,
    mut stop: watch::Receiver<bool>,
) -> Result<()> {
    let reader = handle.stats_reader();
    let mut applied: Option<Plan> = None;
    let mut check = tokio::time::interval(Duration::from_secs(1));
    let outcome = loop {
        tokio::select! {
            biased;
            Ok(()) = secrets.changed() => {
                let Some(secret) = secrets.borrow_and_update().clone() else {
                    continue;
                };
                let key = secret.public_key();
                match handle.set_static_secret(secret).await {
                    Ok(()) => tracing::info!(
                        %key,
                        "tunnel static key replaced (node credentials rotated): sessions restart under it"
                    ),
                    Err(datapath::shell::ShellError::TunnelStopped) => {
                        break Err(anyhow::anyhow!("the tunnel stopped"));
                    }
                    Err(e) => tracing::error!(
                        "the tunnel's new static key was refused, the old one stays: {e}"
                    ),
                }
            }
            changed = plans.changed() => {
                if changed.is_err() {
                    break Ok(());
                }
                let plan = plans.borrow_and_update().clone();
                if applied.as_ref().is_some_and(|a| a.same_tunnel(&plan)) {
                    continue;
                }
                match handle
                    .set_peers_and_routes(plan.peers.clone(), plan.routes())
                    .await
                {
                    Ok(changes) => {
                        tracing::info!(
                            peers = plan.peers.len(),
                            blocked = plan.blocked.len(),
                            added = ?changes.added,
                            removed = ?changes.removed,
                            "tunnel peers in force"
                        );
                        applied = Some(plan);
                    }
                    Err(datapath::shell::ShellError::TunnelStopped) => {
                        break Err(anyhow::anyhow!("the tunnel stopped"));
                    }
                    Err(e) => tracing::error!(
                        "tunnel peers refused, the previous set stays in force: {e}"
                    ),
                }
            }
            _ = check.tick() => {
                if let Some(r) = &reader
                    && r.stats().await.is_err()
                {
                    break Err(anyhow::anyhow!("the tunnel stopped"));
                }
            }
            _ = stop.changed() => break Ok(()),
        }
    };
    // Shutting down joins the tunnel's thread (a few `ip` commands): off the event loop.
    let shutdown = tokio::task::spawn_blocking(move || handle.shutdown()).await;
    match (outcome, shutdown) {
        (Ok(()), Ok(Ok(()))) => {
            tracing::info!("tunnel removed (device, routes and rule)");
            Ok(())
        }
        (Ok(()), Ok(Err(e))) => Err(anyhow::anyhow!("removing the tunnel: {e}")),
        (Err(e), Ok(Err(cause))) => Err(e.context(format!("{cause}"))),
        (Err(e), _) => Err(e),
        (Ok(()), Err(e)) => Err(anyhow::anyhow!("removing the tunnel: {e}")),
    }
}

/// Which nodes stopped or started being peers, or changed why not: logged once per change.
pub fn log_changes(before: &Plan, after: &Plan) {
    let peers = |p: &Plan| -> BTreeMap<String, (SocketAddr, PublicKey)> {
        p.peers
            .iter()
            .map(|x| (x.name.clone(), (x.endpoint, x.public_key)))
            .collect()
    };
    let (old, new) = (peers(before), peers(after));
    for (name, (endpoint, key)) in &new {
        if old.get(name) != Some(&(*endpoint, *key)) {
            tracing::info!(peer = %name, %endpoint, key = %key, "tunnel peer");
        }
    }
    let names: BTreeSet<&String> = old.keys().chain(before.not_peers.keys()).collect();
    for (name, why) in &after.not_peers {
        if before.not_peers.get(name) != Some(why) {
            tracing::warn!(node = %name, "not a tunnel peer: {why}");
        }
    }
    for name in names {
        if !new.contains_key(name) && !after.not_peers.contains_key(name) {
            tracing::info!(node = %name, "node gone: no longer a tunnel peer");
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn node(name: &str, addrs: &[&str], cidrs: &[&str]) -> NodeInfo {
        let addresses: Vec<IpAddr> = addrs.iter().map(|a| a.parse().unwrap()).collect();
        NodeInfo {
            node: policy::Node {
                name: name.into(),
                labels: Default::default(),
                addresses: addresses.clone(),
            },
            tunnel_addresses: addresses,
            pod_cidrs: cidrs.iter().map(|c| c.parse().unwrap()).collect(),
        }
    }

    fn nodes(list: Vec<NodeInfo>) -> BTreeMap<String, NodeInfo> {
        list.into_iter().map(|n| (n.name().to_owned(), n)).collect()
    }

    fn key_of(name: &str) -> Option<[u8; 32]> {
        let mut k = [0u8; 32];
        k[..name.len().min(32)].copy_from_slice(&name.as_bytes()[..name.len().min(32)]);
        Some(k)
    }

    const OWN: PublicKey = PublicKey([0xee; 32]);

    #[test]
    fn peers_are_the_other_nodes_with_pod_cidrs_an_address_and_a_key() {
        let list = nodes(vec![
            node("a", &["192.0.2.1"], &["10.1.0.0/24"]),
            node(
                "b",
                &["192.0.2.2", "2001:db8::2"],
                &["10.2.0.0/24", "fd00:2::/64"],
            ),
            node("c", &["2001:db8::3"], &["10.3.0.0/24"]),
            node("d", &["192.0.2.4"], &[]),
            node("e", &["192.0.2.5"], &["10.5.0.0/24"]),
        ]);
        let key = |n: &str| if n == "e" { None } else { key_of(n) };
        let p = plan("a", &list, 51871, OWN, key, "no trusted key");
        assert_eq!(p.own_prefixes, ["10.1.0.0/24".parse::<IpNet>().unwrap()]);
        assert_eq!(p.peers.len(), 1);
        let b = &p.peers[0];
        assert_eq!(b.name, "b");
        assert_eq!(b.endpoint, "192.0.2.2:51871".parse().unwrap());
        assert_eq!(b.public_key, PublicKey(key_of("b").unwrap()));
        assert_eq!(b.allowed_ips.len(), 2);
        // c: no IPv4 address (ours is IPv4); e: no key. Both blocked; d has nothing to block.
        assert!(p.not_peers["c"].contains("no IPv4 address"), "{p:?}");
        assert!(p.not_peers["d"].contains("no pod CIDRs"), "{p:?}");
        assert!(p.not_peers["e"].starts_with("no trusted key"), "{p:?}");
        assert!(!p.not_peers.contains_key("a"), "own node is not listed");
        let blocked: Vec<String> = p.blocked.iter().map(ToString::to_string).collect();
        assert_eq!(blocked, ["10.3.0.0/24", "10.5.0.0/24"]);
        // Our own IPv6 address first: IPv6 endpoints.
        let list6 = nodes(vec![
            node("a", &["2001:db8::1"], &["10.1.0.0/24"]),
            node("b", &["192.0.2.2", "2001:db8::2"], &["10.2.0.0/24"]),
        ]);
        let p = plan("a", &list6, 7, OWN, key_of, "no key");
        assert_eq!(p.peers[0].endpoint, "[2001:db8::2]:7".parse().unwrap());
    }

    #[test]
    fn prefixes_that_would_break_routing_are_neither_peers_nor_blocked() {
        let list = nodes(vec![
            node("a", &["192.0.2.1"], &["10.1.0.0/24"]),
            // Overlaps our own pods.
            node("b", &["192.0.2.2"], &["10.1.0.0/16"]),
            // Holds a node's address (the tunnel's datagrams to it would loop).
            node("c", &["192.0.2.3"], &["192.0.2.0/24"]),
            node("d", &["192.0.2.4"], &["10.4.0.0/24"]),
            // The same range as d.
            node("e", &["192.0.2.5"], &["10.4.0.0/24"]),
        ]);
        let p = plan("a", &list, 51871, OWN, key_of, "no key");
        assert_eq!(
            p.peers.iter().map(|x| x.name.as_str()).collect::<Vec<_>>(),
            ["d"]
        );
        assert!(p.not_peers["b"].contains("overlaps this node's own 10.1.0.0/24"));
        assert!(p.not_peers["c"].contains("holds the address 192.0.2."));
        assert!(p.not_peers["e"].contains("also node d's"));
        assert!(p.blocked.is_empty(), "{p:?}");
        // The plan is a valid tunnel table.
        datapath::tunnel::PeerTable::new(OWN, p.peers.clone()).unwrap();
    }

    #[test]
    fn own_and_shared_keys_are_refused_and_the_rest_is_a_valid_table() {
        let list = nodes(vec![
            node("a", &["192.0.2.1"], &["10.1.0.0/24"]),
            node("b", &["192.0.2.2"], &["10.2.0.0/24"]),
            node("c", &["192.0.2.3"], &["10.3.0.0/24"]),
            node("d", &["192.0.2.4"], &["10.4.0.0/24"]),
        ]);
        let key = |n: &str| match n {
            "b" => Some(OWN.0),
            "c" | "d" => Some([7; 32]),
            _ => None,
        };
        let p = plan("a", &list, 51871, OWN, key, "no key");
        assert_eq!(p.peers.len(), 1);
        assert_eq!(p.peers[0].name, "c");
        assert!(p.not_peers["b"].contains("own tunnel key"));
        assert!(p.not_peers["d"].contains("same tunnel key as node c"));
        assert_eq!(p.blocked.len(), 2);
        datapath::tunnel::PeerTable::new(OWN, p.peers.clone()).unwrap();
        // Without our own node in the list: IPv4, no own prefixes, the others still peers.
        let mut list = list;
        list.remove("a");
        let p = plan("a", &list, 51871, OWN, key_of, "no key");
        assert_eq!(p.peers.len(), 3);
        assert!(p.own_prefixes.is_empty());
    }

    #[test]
    fn same_tunnel_ignores_reasons() {
        let mut a = Plan::default();
        let mut b = Plan::default();
        b.not_peers.insert("x".into(), "why".into());
        assert!(a.same_tunnel(&b));
        a.blocked.push("10.0.0.0/24".parse().unwrap());
        assert!(!a.same_tunnel(&b));
    }

    #[test]
    fn options_are_checked_naming_the_flag() {
        let name = |f: &str| format!("--tunnel-{f}");
        assert!(TunnelOptions::default().check_named(name).is_ok());
        for (o, flag) in [
            (
                TunnelOptions {
                    port: 0,
                    ..Default::default()
                },
                "--tunnel-port",
            ),
            (
                TunnelOptions {
                    device: "a-very-long-device-name".into(),
                    ..Default::default()
                },
                "--tunnel-device",
            ),
            (
                TunnelOptions {
                    device: "a/b".into(),
                    ..Default::default()
                },
                "--tunnel-device",
            ),
            (
                TunnelOptions {
                    mtu: 100,
                    ..Default::default()
                },
                "--tunnel-mtu",
            ),
        ] {
            let e = o.check_named(name).unwrap_err().to_string();
            assert!(e.starts_with(flag), "{e}");
        }
    }
}
