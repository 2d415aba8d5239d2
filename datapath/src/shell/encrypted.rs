//! The guard of workloads that require encryption (`tessera.dev/require-encryption`): rules in
//! the node's namespace that queue, to the agent, every packet the node forwards between such
//! a workload and another node's pods that did not go through the tunnel device. The agent
//! drops each one and records it (`not_encrypted`, see
//! [`Processor::refuse_unencrypted`](crate::Processor::refuse_unencrypted)).
//!
//! Why the node's namespace: only there is it known whether a packet came out of (or goes
//! into) the tunnel device; a packet's mark does not survive the veth into the workload's
//! namespace. What it catches: a peer node, or anything on the path, sending a guarded
//! workload's traffic in clear (its agent runs without `--encrypt`, a route of the cluster's
//! network plugin wins over the tunnel's, a forged packet on the link), in both directions.
//!
//! In the mangle table, for each address family:
//!
//! ```text
//! -I FORWARD 1 -j TESSERA-ENCRYPTED
//! -A TESSERA-ENCRYPTED -i <device> -j RETURN          came out of the tunnel
//! -A TESSERA-ENCRYPTED -o <device> -j RETURN          goes into it
//! -A TESSERA-ENCRYPTED -d <workload address> -j TESSERA-ENCRYPTED-IN     (each)
//! -A TESSERA-ENCRYPTED -s <workload address> -j TESSERA-ENCRYPTED-OUT    (each)
//! -A TESSERA-ENCRYPTED-IN -s <other node's pod prefix> -j NFQUEUE --queue-num <q>  (each)
//! -A TESSERA-ENCRYPTED-OUT -d <other node's pod prefix> -j NFQUEUE --queue-num <q> (each)
//! ```
//!
//! **Fails closed:** the queue has no `--queue-bypass`, so while no agent reads it (killed,
//! restarting) those packets are dropped by the kernel. Every update replaces the three
//! chains in one `iptables-restore` transaction. [`remove`] takes everything out.
//!
//! A packet is checked against each guarded address and, for a guarded one, each prefix: the
//! cost is linear in both (one comparison each), paid only by forwarded packets; nothing is
//! installed until a workload requires encryption.

use std::net::IpAddr;
use std::process::Command;

use ipnet::IpNet;

use super::ShellError;
use super::netns::{Netns, run_command, run_commands};
use super::rules::Family;

/// The chain jumped to from `FORWARD`.
pub const CHAIN: &str = "TESSERA-ENCRYPTED";
/// Packets to a guarded workload: is the source another node's pod?
pub const CHAIN_IN: &str = "TESSERA-ENCRYPTED-IN";
/// Packets from a guarded workload: is the destination another node's pod?
pub const CHAIN_OUT: &str = "TESSERA-ENCRYPTED-OUT";
/// The queue the guard's packets go to (in the node's namespace; the workloads' queues are in
/// theirs).
pub const DEFAULT_QUEUE: u16 = 51871;

/// How the guard's rules are made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuardConfig {
    /// The tunnel's device: what comes out of it or goes into it is encrypted between nodes.
    /// When the agent runs without `--encrypt` there is no such device, and every cross-node
    /// packet of a guarded workload is refused.
    pub device: String,
    /// The queue the agent reads the refused packets from.
    pub queue_num: u16,
}

impl Default for GuardConfig {
    fn default() -> Self {
        GuardConfig {
            device: "tsr-wg0".into(),
            queue_num: DEFAULT_QUEUE,
        }
    }
}

/// What the guard covers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Guarded {
    /// The addresses of this node's workloads that require encryption.
    pub local: Vec<IpAddr>,
    /// The other nodes' pod prefixes.
    pub remote: Vec<IpNet>,
}

impl Guarded {
    /// Sorted, without duplicates, and without a remote prefix that holds a guarded address
    /// (a node list that gives another node a prefix of ours would otherwise refuse our own
    /// pods' traffic to each other).
    pub fn normalized(mut self) -> Guarded {
        self.local.sort();
        self.local.dedup();
        self.remote.sort();
        self.remote.dedup();
        let local = &self.local;
        self.remote
            .retain(|net| !local.iter().any(|ip| net.contains(ip)));
        self
    }
}

fn family_of(ip: &IpAddr) -> Family {
    if ip.is_ipv4() { Family::V4 } else { Family::V6 }
}

fn host_prefix(ip: &IpAddr) -> u8 {
    if ip.is_ipv4() { 32 } else { 128 }
}

/// The `iptables-restore --noflush` input that makes the guard's chains say `g` for `family`
/// (declaring a chain flushes it); with the jump from `FORWARD` unless it is `present`.
pub fn render(cfg: &GuardConfig, g: &Guarded, family: Family, present: bool) -> String {
    let q = cfg.queue_num;
    let dev = &cfg.device;
    let mut out = format!("*mangle\n:{CHAIN} - [0:0]\n:{CHAIN_IN} - [0:0]\n:{CHAIN_OUT} - [0:0]\n");
    out.push_str(&format!("-A {CHAIN} -i {dev} -j RETURN\n"));
    out.push_str(&format!("-A {CHAIN} -o {dev} -j RETURN\n"));
    let locals = g.local.iter().filter(|ip| family_of(ip) == family);
    for ip in locals.clone() {
        let p = host_prefix(ip);
        out.push_str(&format!("-A {CHAIN} -d {ip}/{p} -j {CHAIN_IN}\n"));
        out.push_str(&format!("-A {CHAIN} -s {ip}/{p} -j {CHAIN_OUT}\n"));
    }
    let remotes = g
        .remote
        .iter()
        .filter(|net| family_of(&net.network()) == family);
    for net in remotes.clone() {
        out.push_str(&format!(
            "-A {CHAIN_IN} -s {net} -j NFQUEUE --queue-num {q}\n"
        ));
    }
    for net in remotes {
        out.push_str(&format!(
            "-A {CHAIN_OUT} -d {net} -j NFQUEUE --queue-num {q}\n"
        ));
    }
    if !present {
        out.push_str(&format!("-I FORWARD 1 -j {CHAIN}\n"));
    }
    out.push_str("COMMIT\n");
    out
}

/// Whether `FORWARD` jumps to our chain (`iptables -C`).
fn jump_present(family: Family) -> bool {
    let mut cmd = Command::new(family.iptables());
    cmd.args(["-w", "-t", "mangle", "-C", "FORWARD", "-j", CHAIN]);
    run_command(cmd, None).is_ok()
}

/// Make the guard's rules in `ns` say `g` (installing them the first time), both families at
/// once, each in one transaction. Idempotent; an agent that restarts takes its predecessor's
/// rules over.
pub fn apply(ns: &Netns, cfg: &GuardConfig, g: &Guarded) -> Result<(), ShellError> {
    let (cfg, g) = (cfg.clone(), g.clone());
    ns.run(move || {
        let restores = Family::ALL
            .into_iter()
            .map(|family| family.restore_noflush(render(&cfg, &g, family, jump_present(family))))
            .collect();
        run_commands(restores)
            .into_iter()
            .try_for_each(|r| r.map(drop))
    })?
}

/// Remove the jump (every copy) and the chains from `ns`, both families. Missing pieces are
/// no error.
pub fn remove(ns: &Netns) -> Result<(), ShellError> {
    ns.run(|| {
        for family in Family::ALL {
            // Bounded: a foreign tool could have copied the jump, a few times at most.
            for _ in 0..16 {
                if !jump_present(family) {
                    break;
                }
                let mut cmd = Command::new(family.iptables());
                cmd.args(["-w", "-t", "mangle", "-D", "FORWARD", "-j", CHAIN]);
                run_command(cmd, None)?;
            }
            for chain in [CHAIN, CHAIN_IN, CHAIN_OUT] {
                let mut flush = Command::new(family.iptables());
                flush.args(["-w", "-t", "mangle", "-F", chain]);
                let _ = run_command(flush, None);
            }
            for chain in [CHAIN, CHAIN_IN, CHAIN_OUT] {
                let mut delete = Command::new(family.iptables());
                delete.args(["-w", "-t", "mangle", "-X", chain]);
                let _ = run_command(delete, None);
            }
        }
        Ok(())
    })?
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn guarded() -> Guarded {
        Guarded {
            local: vec![
                "10.1.2.3".parse().unwrap(),
                "fd00::3".parse().unwrap(),
                "10.1.2.3".parse().unwrap(),
            ],
            remote: vec![
                "10.2.0.0/24".parse().unwrap(),
                "fd00:2::/64".parse().unwrap(),
                // Holds a guarded address: left out.
                "10.1.0.0/16".parse().unwrap(),
            ],
        }
        .normalized()
    }

    #[test]
    fn ipv4_rules_queue_both_directions_outside_the_tunnel_and_jump_once() {
        let text = render(&GuardConfig::default(), &guarded(), Family::V4, false);
        let expected = "\
*mangle
:TESSERA-ENCRYPTED - [0:0]
:TESSERA-ENCRYPTED-IN - [0:0]
:TESSERA-ENCRYPTED-OUT - [0:0]
-A TESSERA-ENCRYPTED -i tsr-wg0 -j RETURN
-A TESSERA-ENCRYPTED -o tsr-wg0 -j RETURN
-A TESSERA-ENCRYPTED -d 10.1.2.3/32 -j TESSERA-ENCRYPTED-IN
-A TESSERA-ENCRYPTED -s 10.1.2.3/32 -j TESSERA-ENCRYPTED-OUT
-A TESSERA-ENCRYPTED-IN -s 10.2.0.0/24 -j NFQUEUE --queue-num 51871
-A TESSERA-ENCRYPTED-OUT -d 10.2.0.0/24 -j NFQUEUE --queue-num 51871
-I FORWARD 1 -j TESSERA-ENCRYPTED
COMMIT
";
        assert_eq!(text, expected);
        // Never a bypass: with no reader the kernel drops.
        assert!(!text.contains("bypass"));
        let again = render(&GuardConfig::default(), &guarded(), Family::V4, true);
        assert!(!again.contains("FORWARD"), "{again}");
    }

    #[test]
    fn ipv6_rules_take_the_ipv6_addresses_only() {
        let text = render(&GuardConfig::default(), &guarded(), Family::V6, true);
        assert!(text.contains("-A TESSERA-ENCRYPTED -d fd00::3/128 -j TESSERA-ENCRYPTED-IN\n"));
        assert!(text.contains("-A TESSERA-ENCRYPTED-IN -s fd00:2::/64 -j NFQUEUE"));
        assert!(!text.contains("10."), "{text}");
    }

    #[test]
    fn nothing_guarded_queues_nothing() {
        let text = render(
            &GuardConfig::default(),
            &Guarded::default(),
            Family::V4,
            true,
        );
        assert!(!text.contains("NFQUEUE"), "{text}");
    }
}
