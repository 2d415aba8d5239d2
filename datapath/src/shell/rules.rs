//! The fixed mangle rules installed in each workload namespace (IPv4 and IPv6), in chains of our
//! own. Their number never grows with peers or policies. Nothing outside our chains is changed,
//! except one jump from `OUTPUT` and one from `INPUT`, each inserted once.

use std::net::{IpAddr, SocketAddr};

use super::ShellError;
use std::process::Command;

use super::netns::{Netns, run_command, run_commands};

/// Our chains in the mangle table.
pub const CHAIN_OUTPUT: &str = "TESSERA-OUTPUT";
/// See [`CHAIN_OUTPUT`].
pub const CHAIN_INPUT: &str = "TESSERA-INPUT";

/// The knobs of the rule set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RuleConfig {
    /// NFQUEUE number (queues are per namespace, so every workload uses the same one).
    pub queue_num: u16,
    /// The mark bit meaning "authorized flow" (nfmark set by our verdict, saved in the connmark).
    pub auth_mark: u32,
    /// `--queue-bypass`: let packets through while no reader listens.
    pub fail_open: bool,
    /// Learn the names workloads resolve (for admin `domainNames` peers): DNS answers (UDP
    /// from port 53, in the reply direction of a flow the workload opened, already
    /// authorized) are queued on this queue number, read by the same socket
    /// ([`QueueConfig::dns_queue_num`](super::QueueConfig::dns_queue_num) must say the same)
    /// and handed to [`Processor::learn_dns_answer`](crate::Processor::learn_dns_answer).
    /// `None` (or the same number as `queue_num`, which could not tell the answers apart):
    /// no such rule; answers pass unseen and no name is ever learnt (a `domainNames` peer then
    /// matches nothing).
    pub dns_queue_num: Option<u16>,
}

impl Default for RuleConfig {
    fn default() -> Self {
        RuleConfig {
            queue_num: 7,
            auth_mark: 0x1000_0000,
            fail_open: false,
            dns_queue_num: None,
        }
    }
}

/// IPv4 (`iptables`) or IPv6 (`ip6tables`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// `iptables`
    V4,
    /// `ip6tables`
    V6,
}

impl Family {
    /// Both families, in install order.
    pub const ALL: [Family; 2] = [Family::V4, Family::V6];

    pub(crate) fn iptables(self) -> &'static str {
        match self {
            Family::V4 => "iptables",
            Family::V6 => "ip6tables",
        }
    }

    pub(crate) fn restore(self) -> &'static str {
        match self {
            Family::V4 => "iptables-restore",
            Family::V6 => "ip6tables-restore",
        }
    }

    /// An `iptables-restore --noflush` (or `ip6tables-`) command, waiting for the xtables lock,
    /// with `input` for its stdin, as [`run_commands`] takes it.
    pub(crate) fn restore_noflush(self, input: String) -> (Command, Option<String>) {
        let mut cmd = Command::new(self.restore());
        cmd.args(["-w", "--noflush"]);
        (cmd, Some(input))
    }

    fn save(self) -> &'static str {
        match self {
            Family::V4 => "iptables-save",
            Family::V6 => "ip6tables-save",
        }
    }
}

/// Which jumps from the built-in chains are already in place.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Jumps {
    /// `-A OUTPUT -j TESSERA-OUTPUT` exists.
    pub output: bool,
    /// `-A INPUT -j TESSERA-INPUT` exists.
    pub input: bool,
}

/// The `iptables-restore --noflush` input for one family: declaring our chains resets them
/// atomically; missing jumps are inserted in the same transaction.
///
/// A SYN is always queued, whatever its conntrack entry says (so a pre-made entry cannot smuggle
/// one past us), except when our own verdict marked it (a `Repeat` with the AUTH bit re-runs the
/// hook: without the mark test it would be queued again for ever).
///
/// Every other protocol (UDP, SCTP, ICMP, anything) is queued whenever its flow lacks the AUTH
/// connmark: the processor decides the flow's first packet and marks it, so the rest of the
/// flow, both ways (and ICMP errors about it, which conntrack relates to it), bypasses
/// userspace. IPv6 neighbour discovery and multicast listener messages (ICMPv6 130-137, 143)
/// always pass: without them no IPv6 address works, and they never leave the link.
///
/// With [`RuleConfig::dns_queue_num`], one more rule on INPUT, before the connmark bypass,
/// queues DNS answers on authorized flows there (see [`dns_answer_rule`]).
pub fn render(cfg: &RuleConfig, family: Family, present: Jumps) -> String {
    render_as(cfg, family, present, false)
}

/// [`render`] for a namespace without any chain or jump of ours: the chains are created with
/// `-N`, so the transaction fails, and changes nothing, where one already exists.
fn render_fresh(cfg: &RuleConfig, family: Family) -> String {
    render_as(cfg, family, Jumps::default(), true)
}

/// [`render`], our chains declared (`:`, which creates or resets them) or, with `create`,
/// created (`-N`, which fails where one exists).
fn render_as(cfg: &RuleConfig, family: Family, present: Jumps, create: bool) -> String {
    let auth = format!("{0:#x}/{0:#x}", cfg.auth_mark);
    let mask = format!("{:#x}", cfg.auth_mark);
    let bypass = if cfg.fail_open { " --queue-bypass" } else { "" };
    let q = cfg.queue_num;
    let reauth = crate::reauth_mark(cfg.auth_mark);
    let mut out = String::from("*mangle\n");
    if create {
        out.push_str(&format!("-N {CHAIN_OUTPUT}\n-N {CHAIN_INPUT}\n"));
    } else {
        out.push_str(&format!(
            ":{CHAIN_OUTPUT} - [0:0]\n:{CHAIN_INPUT} - [0:0]\n"
        ));
    }
    let control = crate::control_mark(cfg.auth_mark);
    for (chain, iface) in [(CHAIN_OUTPUT, "-o"), (CHAIN_INPUT, "-i")] {
        out.push_str(&format!("-A {chain} {iface} lo -j RETURN\n"));
        if chain == CHAIN_OUTPUT {
            // A bound UDP SYN-ACK control (control and AUTH bits): the bound SYN authorized the
            // client, so the flow is marked as the answer leaves, and the client's datagrams
            // bypass the agent here from the first one.
            let both = control | cfg.auth_mark;
            out.push_str(&format!(
                "-A {chain} -m mark --mark {both:#x}/{both:#x} -j CONNMARK --save-mark --nfmask {mask} --ctmask {mask}\n"
            ));
            // Our own UDP control datagrams (sent from the agent's raw socket in this netns).
            out.push_str(&format!(
                "-A {chain} -m mark --mark {control:#x}/{control:#x} -j RETURN\n"
            ));
        }
        if chain == CHAIN_INPUT {
            // A client flow is marked when its ACK token leaves; if that ACK was lost, the
            // server's re-sent SYN-ACK comes back (queued: it carries our option) and our verdict
            // sets the re-auth bit: clear AUTH from the connmark so the client's duplicate ACK is
            // queued and gets the token again.
            out.push_str(&format!(
                "-A {chain} -m mark --mark {reauth:#x}/{reauth:#x} -j CONNMARK --set-xmark 0x0/{mask}\n"
            ));
            out.push_str(&format!(
                "-A {chain} -m mark --mark {reauth:#x}/{reauth:#x} -j RETURN\n"
            ));
            // A UDP control datagram the agent consumed, repeated with the control bit: its
            // AUTH bit goes into the connmark (set: the server proved the client at its ACK;
            // clear: the client lost a handshake the server still waits on), and it is dropped,
            // never handed to the workload. Only our verdict sets a mark here: a packet from
            // another namespace arrives with none.
            out.push_str(&format!(
                "-A {chain} -m mark --mark {control:#x}/{control:#x} -j CONNMARK --save-mark --nfmask {mask} --ctmask {mask}\n"
            ));
            out.push_str(&format!(
                "-A {chain} -m mark --mark {control:#x}/{control:#x} -j DROP\n"
            ));
        }
        out.push_str(&format!(
            "-A {chain} -p tcp --syn -m mark ! --mark {auth} -j NFQUEUE --queue-num {q}{bypass}\n"
        ));
        if chain == CHAIN_OUTPUT {
            // A server's SYN-ACK is queued even on a marked flow: the bound handshake marks the
            // flow as its SYN-ACK leaves, and a retransmission of that SYN-ACK (the first was
            // lost) must carry the token again, never leave without one.
            out.push_str(&format!(
                "-A {chain} -p tcp --tcp-flags SYN,ACK SYN,ACK -m mark ! --mark {auth} -j NFQUEUE --queue-num {q}{bypass}\n"
            ));
        }
        if chain == CHAIN_INPUT {
            // A token can arrive again after the flow was authorized (the client answers a
            // retransmitted SYN-ACK with a second ACK token): it must be stripped, never handed
            // to the workload as data, so packets carrying our option kind skip the bypass.
            out.push_str(&format!(
                "-A {chain} -p tcp --tcp-option {kind} -m mark ! --mark {auth} -j NFQUEUE --queue-num {q}{bypass}\n",
                kind = identity::wire::TCP_OPTION_KIND
            ));
        }
        if chain == CHAIN_INPUT {
            // UDP control datagrams are queued even on a marked flow: the server re-sends its
            // SYN-ACK when the client's ACK was lost, and the client's agent must answer it.
            out.push_str(&format!(
                "-A {chain} -p udp -m u32 --u32 \"{}\" -m mark ! --mark {auth} -j NFQUEUE --queue-num {q}{bypass}\n",
                udp_control_u32(family)
            ));
            if let Some(dns) = cfg.dns_queue_num.filter(|d| *d != q) {
                out.push_str(&dns_answer_rule(chain, cfg.auth_mark, dns));
            }
        }
        out.push_str(&format!("-A {chain} -m connmark --mark {auth} -j RETURN\n"));
        out.push_str(&format!(
            "-A {chain} -m mark --mark {auth} -j CONNMARK --save-mark --nfmask {mask} --ctmask {mask}\n"
        ));
        out.push_str(&format!("-A {chain} -m mark --mark {auth} -j RETURN\n"));
        out.push_str(&format!(
            "-A {chain} -p tcp -j NFQUEUE --queue-num {q}{bypass}\n"
        ));
        if family == Family::V6 {
            for t in ICMPV6_LINK_TYPES {
                out.push_str(&format!(
                    "-A {chain} -p ipv6-icmp -m icmp6 --icmpv6-type {t} -j RETURN\n"
                ));
            }
        }
        out.push_str(&format!("-A {chain} -j NFQUEUE --queue-num {q}{bypass}\n"));
    }
    if !present.output {
        out.push_str(&format!("-I OUTPUT 1 -j {CHAIN_OUTPUT}\n"));
    }
    if !present.input {
        out.push_str(&format!("-I INPUT 1 -j {CHAIN_INPUT}\n"));
    }
    out.push_str("COMMIT\n");
    out
}

/// The rule that queues DNS answers for learning: UDP from port 53, on a flow whose connmark
/// has the AUTH bit (answers on flows not authorized yet are queued anyway, to the main
/// queue), in conntrack's reply direction of an established flow, i.e. the answer to a query
/// the workload itself sent on that 5-tuple. A datagram from port 53 that opens a flow
/// (conntrack's original direction) is not an answer and never matches. Queued on a queue
/// number of its own so the reader knows the packet's flow is already authorized (its verdict
/// is a plain accept, as the connmark bypass would have given it), with `--queue-bypass`
/// whatever `fail_open` says: without a reader the answer passes as it did before the rule
/// (only the learning is lost, which fails closed: no name matches).
pub fn dns_answer_rule(chain: &str, auth_mark: u32, queue_num: u16) -> String {
    format!(
        "-A {chain} -p udp --sport 53 -m connmark --mark {auth_mark:#x}/{auth_mark:#x} -m conntrack --ctstate ESTABLISHED --ctdir REPLY -j NFQUEUE --queue-num {queue_num} --queue-bypass\n"
    )
}

/// The `u32` match of a UDP payload that starts with the control magic (IPv4: after the
/// header length the packet gives; IPv6: after a bare 40-byte header).
fn udp_control_u32(family: Family) -> String {
    let m = identity::wire::UDP_CONTROL_MAGIC;
    let w0 = u32::from_be_bytes([m[0], m[1], m[2], m[3]]);
    let w1 = u32::from_be_bytes([m[4], m[5], m[6], m[7]]);
    match family {
        Family::V4 => format!("0>>22&0x3C@8={w0:#x}&&0>>22&0x3C@12={w1:#x}"),
        Family::V6 => format!("48={w0:#x}&&52={w1:#x}"),
    }
}

/// ICMPv6 types that stay on the link and that IPv6 cannot work without: multicast listener
/// query, report and done (130-132), router solicitation and advertisement, neighbour
/// solicitation and advertisement, redirect (133-137), MLDv2 report (143).
pub const ICMPV6_LINK_TYPES: [u8; 9] = [130, 131, 132, 133, 134, 135, 136, 137, 143];

fn jump_exists(ns: &Netns, family: Family, hook: &str, chain: &str) -> bool {
    let mut cmd = ns.command(family.iptables());
    cmd.args(["-w", "-t", "mangle", "-C", hook, "-j", chain]);
    run_command(cmd, None).is_ok()
}

/// The jumps from `OUTPUT`/`INPUT` to our chains in an `iptables-save` dump.
pub fn jumps_in(dump: &str) -> Jumps {
    let has = |hook: &str, chain: &str| {
        dump.lines()
            .any(|l| l.split_whitespace().eq(["-A", hook, "-j", chain]))
    };
    Jumps {
        output: has("OUTPUT", CHAIN_OUTPUT),
        input: has("INPUT", CHAIN_INPUT),
    }
}

/// What [`install`] found and did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Installed {
    /// The rules were already there (an agent restart): existing flows were not grandfathered.
    pub reapplied: bool,
    /// Established connections marked authorized at first install (conntrack entries updated
    /// plus entries created for sockets conntrack had not seen).
    pub grandfathered: usize,
}

/// Install (or re-apply, idempotently) the rule set in `ns` for IPv4 and IPv6.
///
/// At first install (no jump of ours yet) the namespace's established TCP connections are
/// marked authorized *before* the rules go in, so deploying never breaks a live connection. On a
/// re-apply (after a crash) nothing is grandfathered: a connection that became established
/// while no agent listened did so without our check.
///
/// Everything runs from a thread inside the namespace (no `nsenter`), the two families side by
/// side: installs are on a container's start path. A namespace without any TCP socket (the
/// start path, read from its `sockstat` counters) takes one round of two processes,
/// `iptables-restore` and `ip6tables-restore`, whose input creates our chains with `-N`: where
/// a chain of ours exists already that transaction fails and changes nothing, and the install
/// falls back to the general path: the jumps in place (`iptables-save`, `ip6tables-save`) and
/// the established sockets (`ss`) first, then the restores.
pub fn install(ns: &Netns, cfg: &RuleConfig) -> Result<Installed, ShellError> {
    let cfg = *cfg;
    let path = ns.path().display().to_string();
    ns.run(move || install_here(&cfg))?
        .map_err(|e| in_netns(e, &path))
}

/// Name the namespace in an error of a command that ran inside it.
pub(crate) fn in_netns(e: ShellError, path: &str) -> ShellError {
    match e {
        ShellError::Command {
            command,
            status,
            stderr,
        } => ShellError::Command {
            command: format!("{command} (in netns {path})"),
            status,
            stderr,
        },
        ShellError::Spawn { command, source } => ShellError::Spawn {
            command: format!("{command} (in netns {path})"),
            source,
        },
        other => other,
    }
}

/// [`install`] from a thread already inside the namespace (errors do not name it).
pub fn install_here(cfg: &RuleConfig) -> Result<Installed, ShellError> {
    // Which families the fresh attempt installed (chains and jumps, one transaction each); a
    // family it did not install holds what it held before.
    let mut fresh = [false; 2];
    if tcp_sockets_here() == Some(0) {
        let restores = Family::ALL
            .map(|family| family.restore_noflush(render_fresh(cfg, family)))
            .into();
        for (slot, result) in fresh.iter_mut().zip(run_commands(restores)) {
            *slot = result.is_ok();
        }
        if fresh == [true; 2] {
            return Ok(Installed {
                reapplied: false,
                grandfathered: 0,
            });
        }
    }
    // Both families' jumps and the established sockets (needed only at a first install), at once.
    let mut probes: Vec<(Command, Option<String>)> = Family::ALL
        .map(|family| {
            let mut cmd = Command::new(family.save());
            cmd.args(["-t", "mangle"]);
            (cmd, None)
        })
        .into();
    let mut ss = Command::new("ss");
    ss.args(SS_ESTABLISHED);
    probes.push((ss, None));
    let mut results = run_commands(probes).into_iter();
    let mut present = [Jumps::default(); 2];
    for slot in &mut present {
        let dump = results.next().unwrap_or_else(|| Ok(Default::default()))?;
        *slot = jumps_in(&dump.0);
    }
    // First install: no family held a jump of ours before this call.
    let first = present
        .iter()
        .zip(fresh)
        .all(|(p, fresh)| fresh || (!p.output && !p.input));
    let grandfathered = if first {
        let (established, _) = results.next().unwrap_or_else(|| Ok(Default::default()))?;
        grandfather_sockets(&established, cfg.auth_mark)?
    } else {
        0
    };
    let restores = Family::ALL
        .into_iter()
        .zip(present)
        .map(|(family, present)| family.restore_noflush(render(cfg, family, present)))
        .collect();
    for result in run_commands(restores) {
        result?;
    }
    Ok(Installed {
        reapplied: !first,
        grandfathered,
    })
}

/// How many TCP sockets (IPv4 and IPv6, any state but time-wait) the calling thread's network
/// namespace has, from the `inuse` counters of `/proc/thread-self/net/sockstat{,6}` (the
/// namespace's own counters; `/proc/net` would give the process's namespace). `None` when a
/// file cannot be read or parsed. Reading the counters costs microseconds, where a listing of
/// sockets (`ss`, `/proc/net/tcp`) walks the host's whole connection table.
fn tcp_sockets_here() -> Option<u64> {
    let v4 = std::fs::read_to_string("/proc/thread-self/net/sockstat").ok()?;
    let v6 = std::fs::read_to_string("/proc/thread-self/net/sockstat6").ok()?;
    Some(sockstat_in_use(&v4, "TCP:")? + sockstat_in_use(&v6, "TCP6:")?)
}

/// The `inuse` count of the line that starts with `proto` in a `sockstat` file.
fn sockstat_in_use(sockstat: &str, proto: &str) -> Option<u64> {
    let line = sockstat
        .lines()
        .find(|l| l.split_whitespace().next() == Some(proto))?;
    let mut words = line.split_whitespace().skip(1);
    while let Some(word) = words.next() {
        if word == "inuse" {
            return words.next()?.parse().ok();
        }
        words.next()?;
    }
    None
}

/// One established TCP connection of the namespace, in conntrack's original direction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Established {
    /// The side that opened the connection.
    pub src: SocketAddr,
    /// The side that accepted it.
    pub dst: SocketAddr,
}

fn parse_sock_addr(s: &str) -> Option<SocketAddr> {
    let (host, port) = s.rsplit_once(':')?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.contains('%') {
        return None; // link-local with scope: not ours to grandfather
    }
    let ip: IpAddr = host.parse().ok()?;
    let ip = match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    };
    Some(SocketAddr::new(ip, port.parse().ok()?))
}

/// `ss -Htn state established` + `ss -Htln` output → connections, oriented: a connection whose
/// local port is a listening port was accepted (the peer opened it). Loopback is skipped (our
/// rules never queue it).
pub fn parse_established(established: &str, listening: &str) -> Vec<Established> {
    let listen_ports: std::collections::BTreeSet<u16> = listening
        .lines()
        .filter_map(|l| parse_sock_addr(l.split_whitespace().nth(3)?))
        .map(|a| a.port())
        .collect();
    established
        .lines()
        .filter_map(|l| {
            let mut cols = l.split_whitespace().skip(2);
            let local = parse_sock_addr(cols.next()?)?;
            let peer = parse_sock_addr(cols.next()?)?;
            if local.ip().is_loopback() || local.is_ipv4() != peer.is_ipv4() {
                return None;
            }
            Some(if listen_ports.contains(&local.port()) {
                Established {
                    src: peer,
                    dst: local,
                }
            } else {
                Established {
                    src: local,
                    dst: peer,
                }
            })
        })
        .collect()
}

/// Mark the namespace's established TCP connections authorized: create a marked conntrack
/// entry for every established socket (conntrack may never have seen them: a namespace without
/// rules does not track connections), then set the mark on existing established entries.
pub fn grandfather(ns: &Netns, auth_mark: u32) -> Result<usize, ShellError> {
    ns.run(move || grandfather_here(auth_mark))?
}

const SS_ESTABLISHED: [&str; 3] = ["-Htn", "state", "established"];

/// [`grandfather`] from a thread already inside the namespace.
fn grandfather_here(auth_mark: u32) -> Result<usize, ShellError> {
    let mut ss = Command::new("ss");
    ss.args(SS_ESTABLISHED);
    let (established, _) = run_command(ss, None)?;
    grandfather_sockets(&established, auth_mark)
}

/// Mark the connections of an `ss -Htn state established` listing.
fn grandfather_sockets(established: &str, auth_mark: u32) -> Result<usize, ShellError> {
    if established.trim().is_empty() {
        // A fresh workload (the common case on a container's start path): nothing to mark.
        return Ok(0);
    }
    let mut ss = Command::new("ss");
    ss.args(["-Htln"]);
    let (listening, _) = run_command(ss, None)?;
    let mut count = 0;
    for conn in parse_established(established, &listening) {
        match mark_connection(&conn, auth_mark) {
            Ok(()) => count += 1,
            // Best effort: the connection may have closed meanwhile.
            Err(e) => tracing::warn!("could not grandfather {} -> {}: {e}", conn.src, conn.dst),
        }
    }
    Ok(count)
}

/// Create an AUTH-marked conntrack entry for `conn`, or set the bit on the existing one. The
/// family follows from the addresses. One connection at a time: a filtered update of the whole
/// table is a dump, which overruns the netlink buffer when the table is large.
fn mark_connection(conn: &Established, auth_mark: u32) -> Result<(), ShellError> {
    let tuple = [
        "-p".to_owned(),
        "tcp".to_owned(),
        "-s".to_owned(),
        conn.src.ip().to_string(),
        "-d".to_owned(),
        conn.dst.ip().to_string(),
        "--sport".to_owned(),
        conn.src.port().to_string(),
        "--dport".to_owned(),
        conn.dst.port().to_string(),
    ];
    let mut insert = Command::new("conntrack");
    insert
        .arg("-I")
        .args(&tuple)
        .args(["--state", "ESTABLISHED", "-u", "ASSURED", "-t", "432000"])
        .args(["-m", &format!("{auth_mark:#x}")]);
    if run_command(insert, None).is_ok() {
        return Ok(());
    }
    // It exists (EEXIST): set the bit on it.
    let mut update = Command::new("conntrack");
    update
        .arg("-U")
        .args(&tuple)
        .args(["-m", &format!("{auth_mark:#x}/{auth_mark:#x}")]);
    match run_command(update, None) {
        Ok(_) => Ok(()),
        // Exit 1 with "0 flow entries have been updated": the bit was already set.
        Err(ShellError::Command { stderr, .. }) if stderr.contains(UPDATED) => Ok(()),
        Err(e) => Err(e),
    }
}

const UPDATED: &str = " flow entries have been updated.";

/// Remove our jumps (every copy) and our chains from `ns`, both families. Missing pieces are not
/// an error, so removal is idempotent.
pub fn remove(ns: &Netns) -> Result<(), ShellError> {
    for family in Family::ALL {
        for (hook, chain) in [("OUTPUT", CHAIN_OUTPUT), ("INPUT", CHAIN_INPUT)] {
            // Bounded: at most a few duplicates can exist (from a foreign tool).
            for _ in 0..16 {
                if !jump_exists(ns, family, hook, chain) {
                    break;
                }
                let mut cmd = ns.command(family.iptables());
                cmd.args(["-w", "-t", "mangle", "-D", hook, "-j", chain]);
                run_command(cmd, None)?;
            }
        }
        for chain in [CHAIN_OUTPUT, CHAIN_INPUT] {
            let mut flush = ns.command(family.iptables());
            flush.args(["-w", "-t", "mangle", "-F", chain]);
            if run_command(flush, None).is_ok() {
                let mut delete = ns.command(family.iptables());
                delete.args(["-w", "-t", "mangle", "-X", chain]);
                run_command(delete, None)?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn fixed_rule_set_fail_closed() {
        let text = render(&RuleConfig::default(), Family::V4, Jumps::default());
        let expected = "\
*mangle
:TESSERA-OUTPUT - [0:0]
:TESSERA-INPUT - [0:0]
-A TESSERA-OUTPUT -o lo -j RETURN
-A TESSERA-OUTPUT -m mark --mark 0x50000000/0x50000000 -j CONNMARK --save-mark --nfmask 0x10000000 --ctmask 0x10000000
-A TESSERA-OUTPUT -m mark --mark 0x40000000/0x40000000 -j RETURN
-A TESSERA-OUTPUT -p tcp --syn -m mark ! --mark 0x10000000/0x10000000 -j NFQUEUE --queue-num 7
-A TESSERA-OUTPUT -p tcp --tcp-flags SYN,ACK SYN,ACK -m mark ! --mark 0x10000000/0x10000000 -j NFQUEUE --queue-num 7
-A TESSERA-OUTPUT -m connmark --mark 0x10000000/0x10000000 -j RETURN
-A TESSERA-OUTPUT -m mark --mark 0x10000000/0x10000000 -j CONNMARK --save-mark --nfmask 0x10000000 --ctmask 0x10000000
-A TESSERA-OUTPUT -m mark --mark 0x10000000/0x10000000 -j RETURN
-A TESSERA-OUTPUT -p tcp -j NFQUEUE --queue-num 7
-A TESSERA-OUTPUT -j NFQUEUE --queue-num 7
-A TESSERA-INPUT -i lo -j RETURN
-A TESSERA-INPUT -m mark --mark 0x20000000/0x20000000 -j CONNMARK --set-xmark 0x0/0x10000000
-A TESSERA-INPUT -m mark --mark 0x20000000/0x20000000 -j RETURN
-A TESSERA-INPUT -m mark --mark 0x40000000/0x40000000 -j CONNMARK --save-mark --nfmask 0x10000000 --ctmask 0x10000000
-A TESSERA-INPUT -m mark --mark 0x40000000/0x40000000 -j DROP
-A TESSERA-INPUT -p tcp --syn -m mark ! --mark 0x10000000/0x10000000 -j NFQUEUE --queue-num 7
-A TESSERA-INPUT -p tcp --tcp-option 253 -m mark ! --mark 0x10000000/0x10000000 -j NFQUEUE --queue-num 7
-A TESSERA-INPUT -p udp -m u32 --u32 \"0>>22&0x3C@8=0x7e555453&&0>>22&0x3C@12=0x55445001\" -m mark ! --mark 0x10000000/0x10000000 -j NFQUEUE --queue-num 7
-A TESSERA-INPUT -m connmark --mark 0x10000000/0x10000000 -j RETURN
-A TESSERA-INPUT -m mark --mark 0x10000000/0x10000000 -j CONNMARK --save-mark --nfmask 0x10000000 --ctmask 0x10000000
-A TESSERA-INPUT -m mark --mark 0x10000000/0x10000000 -j RETURN
-A TESSERA-INPUT -p tcp -j NFQUEUE --queue-num 7
-A TESSERA-INPUT -j NFQUEUE --queue-num 7
-I OUTPUT 1 -j TESSERA-OUTPUT
-I INPUT 1 -j TESSERA-INPUT
COMMIT
";
        assert_eq!(text, expected);
    }

    #[test]
    fn fail_open_adds_queue_bypass_to_every_queue_rule() {
        let cfg = RuleConfig {
            fail_open: true,
            queue_num: 9,
            auth_mark: 0x4,
            dns_queue_num: None,
        };
        let text = render(&cfg, Family::V6, Jumps::default());
        let queue_rules: Vec<_> = text.lines().filter(|l| l.contains("NFQUEUE")).collect();
        assert_eq!(queue_rules.len(), 9);
        assert!(
            queue_rules
                .iter()
                .all(|l| l.ends_with("--queue-num 9 --queue-bypass"))
        );
        assert!(text.contains("--mark 0x4/0x4"));
    }

    #[test]
    fn existing_jumps_are_not_inserted_again() {
        let text = render(
            &RuleConfig::default(),
            Family::V4,
            Jumps {
                output: true,
                input: true,
            },
        );
        assert!(!text.contains("-I OUTPUT"));
        assert!(!text.contains("-I INPUT"));
        // Our chains are still declared, which resets them: re-applying never duplicates rules.
        assert!(text.starts_with("*mangle\n:TESSERA-OUTPUT - [0:0]\n:TESSERA-INPUT - [0:0]\n"));
        let half = render(
            &RuleConfig::default(),
            Family::V6,
            Jumps {
                output: true,
                input: false,
            },
        );
        assert!(!half.contains("-I OUTPUT"));
        assert!(half.contains("-I INPUT 1 -j TESSERA-INPUT\n"));
    }

    #[test]
    fn rule_count_is_fixed() {
        let v4 = render(&RuleConfig::default(), Family::V4, Jumps::default());
        assert_eq!(v4.lines().filter(|l| l.starts_with("-A ")).count(), 23);
        let v6 = render(&RuleConfig::default(), Family::V6, Jumps::default());
        assert_eq!(v6.lines().filter(|l| l.starts_with("-A ")).count(), 41);
        // Learning DNS answers adds one rule per family, whatever the peers and policies.
        let dns = RuleConfig {
            dns_queue_num: Some(8),
            ..RuleConfig::default()
        };
        let v4 = render(&dns, Family::V4, Jumps::default());
        assert_eq!(v4.lines().filter(|l| l.starts_with("-A ")).count(), 24);
        let v6 = render(&dns, Family::V6, Jumps::default());
        assert_eq!(v6.lines().filter(|l| l.starts_with("-A ")).count(), 42);
    }

    #[test]
    fn dns_answers_on_authorized_flows_are_queued_before_the_connmark_bypass() {
        let cfg = RuleConfig {
            dns_queue_num: Some(8),
            ..RuleConfig::default()
        };
        let rule = "-A TESSERA-INPUT -p udp --sport 53 -m connmark --mark 0x10000000/0x10000000 -m conntrack --ctstate ESTABLISHED --ctdir REPLY -j NFQUEUE --queue-num 8 --queue-bypass";
        for family in Family::ALL {
            let text = render(&cfg, family, Jumps::default());
            let input: Vec<&str> = text
                .lines()
                .filter(|l| l.starts_with("-A TESSERA-INPUT "))
                .collect();
            let at = input.iter().position(|l| *l == rule).expect("the DNS rule");
            let bypass = input
                .iter()
                .position(|l| l.contains("-m connmark --mark") && l.ends_with("-j RETURN"))
                .unwrap();
            assert!(at < bypass, "{family:?}: {text}");
            // After the loopback return and the UDP control rule.
            assert!(input[..at].iter().any(|l| l.contains(" -i lo ")));
            assert!(input[at - 1].contains("-m u32"), "{family:?}");
            // Only on INPUT: a query the workload sends is never queued for it.
            assert!(!text.contains("-A TESSERA-OUTPUT -p udp --sport 53"));
            assert!(!text.contains("--dport 53"));
        }
        // The main queue's number cannot serve: no rule (the queue ignores it the same way).
        let same = RuleConfig {
            dns_queue_num: Some(7),
            ..RuleConfig::default()
        };
        assert_eq!(
            render(&same, Family::V4, Jumps::default()),
            render(&RuleConfig::default(), Family::V4, Jumps::default())
        );
        // Without it, the rule set is exactly the one without DNS learning.
        let off = render(&RuleConfig::default(), Family::V4, Jumps::default());
        let on = render(&cfg, Family::V4, Jumps::default());
        assert_eq!(on.replace(&format!("{rule}\n"), ""), off);
        // The bypass holds even for a fail-closed rule set: without a reader the answer passes
        // as the connmark bypass let it pass before.
        assert!(!off.contains("--queue-bypass"));
    }

    #[test]
    fn ipv6_link_messages_pass_and_everything_else_is_queued_last() {
        let v6 = render(&RuleConfig::default(), Family::V6, Jumps::default());
        for chain in [CHAIN_OUTPUT, CHAIN_INPUT] {
            let rules: Vec<_> = v6
                .lines()
                .filter(|l| l.starts_with(&format!("-A {chain} ")))
                .collect();
            assert_eq!(
                rules.last().copied(),
                Some(format!("-A {chain} -j NFQUEUE --queue-num 7").as_str())
            );
            assert!(rules.contains(
                &format!("-A {chain} -p ipv6-icmp -m icmp6 --icmpv6-type 135 -j RETURN").as_str()
            ));
        }
        let v4 = render(&RuleConfig::default(), Family::V4, Jumps::default());
        assert!(!v4.contains("icmp"), "{v4}");
    }

    #[test]
    fn established_sockets_are_oriented_by_listening_ports() {
        let established = "\
0      0      10.99.0.1:35730 10.99.0.2:6000
0      0      10.99.0.1:80 10.99.0.9:41000
0      0      127.0.0.1:5000 127.0.0.1:41001
0      0      [::ffff:10.99.0.1]:80 [::ffff:10.99.0.7]:42000
0      0      [fd00::1]:80 [fd00::2]:43000
0      0      [fe80::1%eth0]:22 [fe80::2%eth0]:44000
garbage
";
        let listening = "LISTEN 0 128 0.0.0.0:80 0.0.0.0:*\nLISTEN 0 128 [::]:80 [::]:*\n";
        let got = parse_established(established, listening);
        let s = |a: &str| a.parse::<SocketAddr>().unwrap();
        assert_eq!(
            got,
            [
                Established {
                    src: s("10.99.0.1:35730"),
                    dst: s("10.99.0.2:6000")
                },
                Established {
                    src: s("10.99.0.9:41000"),
                    dst: s("10.99.0.1:80")
                },
                Established {
                    src: s("10.99.0.7:42000"),
                    dst: s("10.99.0.1:80")
                },
                Established {
                    src: s("[fd00::2]:43000"),
                    dst: s("[fd00::1]:80")
                },
            ]
        );
    }

    #[test]
    fn tcp_sockets_in_use_are_read_from_sockstat() {
        let v4 =
            "sockets: used 12\nTCP: inuse 3 orphan 0 tw 7 alloc 40 mem 93\nUDP: inuse 1 mem 26\n";
        let v6 = "TCP6: inuse 2\nUDP6: inuse 0\n";
        assert_eq!(sockstat_in_use(v4, "TCP:"), Some(3));
        assert_eq!(sockstat_in_use(v4, "UDP:"), Some(1));
        assert_eq!(sockstat_in_use(v6, "TCP6:"), Some(2));
        assert_eq!(sockstat_in_use(v6, "TCP:"), None);
        for bad in [
            "",
            "TCP:",
            "TCP: inuse",
            "TCP: inuse x",
            "TCP: orphan 0",
            "TCP: orphan",
        ] {
            assert_eq!(sockstat_in_use(bad, "TCP:"), None, "{bad}");
        }
    }

    #[test]
    fn a_fresh_install_creates_the_chains_and_is_otherwise_the_same_rule_set() {
        let cfg = RuleConfig::default();
        for family in Family::ALL {
            let fresh = render_fresh(&cfg, family);
            let full = render(&cfg, family, Jumps::default());
            assert!(
                fresh.starts_with(&format!("*mangle\n-N {CHAIN_OUTPUT}\n-N {CHAIN_INPUT}\n")),
                "{fresh}"
            );
            assert!(!fresh.contains(&format!(":{CHAIN_OUTPUT}")), "{fresh}");
            assert_eq!(
                fresh.lines().skip(3).collect::<Vec<_>>(),
                full.lines().skip(3).collect::<Vec<_>>()
            );
        }
    }

    #[test]
    fn jumps_are_read_from_a_save_dump() {
        let dump = "# Generated by iptables-nft-save\n*mangle\n:PREROUTING ACCEPT [0:0]\n:TESSERA-INPUT - [0:0]\n-A INPUT -j TESSERA-INPUT\n-A OUTPUT -p tcp -j TESSERA-OUTPUT\n-A FORWARD -j TESSERA-OUTPUT\nCOMMIT\n";
        assert_eq!(
            jumps_in(dump),
            Jumps {
                output: false,
                input: true
            }
        );
        let both = format!("{dump}-A OUTPUT -j TESSERA-OUTPUT\n");
        assert_eq!(
            jumps_in(&both),
            Jumps {
                output: true,
                input: true
            }
        );
        assert_eq!(jumps_in(""), Jumps::default());
    }
}
