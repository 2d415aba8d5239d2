//! Cutting flows in a workload netns, and listing its conntrack table.
//!
//! A cut flow's local socket is destroyed (`ss -K`, SOCK_DESTROY): the kernel sends the peer a
//! RST and the local application's next call fails with ECONNABORTED, idle or not. Then the
//! flow's conntrack entry is deleted: its AUTH connmark goes with it, so any later packet of
//! the flow (a straggler, a retransmission if that RST was lost, or every packet when the
//! socket could not be destroyed) reaches the queue, where the processor answers it with RSTs.
//! The TCP entries are listed so that remembered flows which are gone can be pruned.
//!
//! The tools run as children of a thread that joined the namespace ([`Netns::run`]): one
//! thread per namespace and batch, two processes per cut flow (neither tool deletes a batch of
//! exact tuples in one call).

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::process::Command;

use super::ShellError;
use super::netns::{Netns, run_command};
use crate::Cut;
use policy::Protocol;

/// What [`cut`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CutDone {
    /// Local sockets destroyed.
    pub sockets: usize,
    /// Conntrack entries deleted.
    pub deleted: usize,
    /// Tuples conntrack did not hold (the connection closed meanwhile).
    pub missing: usize,
}

/// `conntrack` arguments naming one entry: protocol, addresses and, for a protocol with ports,
/// the ports (ICMP entries are named by their addresses: every echo id between them).
fn tuple_args(cmd: &mut Command, protocol: Protocol, src: SocketAddr, dst: SocketAddr) {
    let name = match protocol {
        Protocol::Tcp => "tcp".to_owned(),
        Protocol::Udp => "udp".to_owned(),
        Protocol::Sctp => "sctp".to_owned(),
        Protocol::Other(1) => "icmp".to_owned(),
        Protocol::Other(58) => "icmpv6".to_owned(),
        Protocol::Other(n) => n.to_string(),
    };
    cmd.args(["-p", &name, "-s"])
        .arg(src.ip().to_string())
        .arg("-d")
        .arg(dst.ip().to_string());
    if protocol.has_ports() {
        cmd.arg("--sport")
            .arg(src.port().to_string())
            .arg("--dport")
            .arg(dst.port().to_string());
    }
    if src.is_ipv6() {
        cmd.args(["-f", "ipv6"]);
    }
}

/// `ss` filter arguments for the socket with local address `local` and peer `remote`.
fn socket_filter(local: SocketAddr, remote: SocketAddr) -> Vec<String> {
    let host = |a: SocketAddr| match a.ip() {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => format!("[{v6}]"),
    };
    [
        "src".to_owned(),
        host(local),
        "sport".to_owned(),
        "=".to_owned(),
        local.port().to_string(),
        "dst".to_owned(),
        host(remote),
        "dport".to_owned(),
        "=".to_owned(),
        remote.port().to_string(),
    ]
    .into()
}

/// Cut `flows` inside `ns`, in one batch: destroy each local socket, then delete each
/// conntrack entry. A socket already gone is not an error; a failing `ss` is reported only if
/// the conntrack deletion fails too (the processor's RSTs still cut the flow).
pub fn cut(ns: &Netns, flows: Vec<Cut>) -> Result<CutDone, ShellError> {
    ns.run(move || {
        let mut done = CutDone::default();
        for c in flows {
            let (src, dst) = c.conntrack_tuple();
            let mut cmd = Command::new("conntrack");
            cmd.arg("-D");
            tuple_args(&mut cmd, c.protocol, src, dst);
            if c.protocol != Protocol::Tcp {
                // No socket to destroy: once its entry is gone, the flow's next packet is new
                // to conntrack, reaches the queue and is decided afresh (and denied). The entry
                // may be oriented either way: a UDP server's agent opened it with its SYN-ACK
                // control, so its original direction is server -> client.
                let mut reverse = Command::new("conntrack");
                reverse.arg("-D");
                tuple_args(&mut reverse, c.protocol, dst, src);
                let mut found = false;
                for cmd in [cmd, reverse] {
                    match run_command(cmd, None) {
                        Ok(_) => found = true,
                        Err(ShellError::Command { stderr, .. }) if stderr.contains(DELETED) => {}
                        Err(e) => return Err(e),
                    }
                }
                if found {
                    done.deleted += 1;
                } else {
                    done.missing += 1;
                }
                continue;
            }
            let mut ss = Command::new("ss");
            ss.args(["-K", "-tnH"])
                .args(socket_filter(c.local, c.remote));
            match run_command(ss, None) {
                Ok((out, _)) => done.sockets += out.lines().filter(|l| !l.is_empty()).count(),
                Err(e) => tracing::debug!("ss -K {} {}: {e}", c.local, c.remote),
            }
            match run_command(cmd, None) {
                Ok(_) => done.deleted += 1,
                // Exit 1 with "0 flow entries have been deleted": already gone.
                Err(ShellError::Command { stderr, .. }) if stderr.contains(DELETED) => {
                    done.missing += 1
                }
                Err(e) => return Err(e),
            }
        }
        Ok(done)
    })?
}

const DELETED: &str = " flow entries have been deleted.";

/// The (protocol, source, destination) of every entry of the conntrack table inside `ns`, in
/// the original direction, IPv4 and IPv6 (ports 0 for a protocol without them).
pub fn list(ns: &Netns) -> Result<HashSet<(Protocol, SocketAddr, SocketAddr)>, ShellError> {
    ns.run(|| {
        let mut all = HashSet::new();
        for family in ["ipv4", "ipv6"] {
            let mut cmd = Command::new("conntrack");
            cmd.args(["-L", "-f", family]);
            let (out, _) = run_command(cmd, None)?;
            all.extend(parse_list(&out));
        }
        Ok(all)
    })?
}

/// `conntrack -L` lines → the protocol and the original direction's (source, destination).
/// Lines that do not parse are skipped.
pub fn parse_list(text: &str) -> impl Iterator<Item = (Protocol, SocketAddr, SocketAddr)> + '_ {
    text.lines().filter_map(parse_line)
}

fn parse_line(line: &str) -> Option<(Protocol, SocketAddr, SocketAddr)> {
    // "tcp      6 431999 ESTABLISHED src=...": the name, then the protocol number.
    let protocol = Protocol::from_ip(line.split_whitespace().nth(1)?.parse().ok()?);
    let (mut src, mut dst, mut sport, mut dport) = (None, None, None, None);
    // The first occurrence of each key is the original direction; the reply's come after.
    for field in line.split_whitespace() {
        let Some((k, v)) = field.split_once('=') else {
            continue;
        };
        match k {
            "src" if src.is_none() => src = v.parse::<IpAddr>().ok(),
            "dst" if dst.is_none() => dst = v.parse::<IpAddr>().ok(),
            "sport" if sport.is_none() => sport = v.parse::<u16>().ok(),
            "dport" if dport.is_none() => dport = v.parse::<u16>().ok(),
            _ => {}
        }
        if src.is_some() && dst.is_some() && sport.is_some() && dport.is_some() {
            break;
        }
    }
    if !protocol.has_ports() {
        (sport, dport) = (Some(0), Some(0));
    }
    Some((
        protocol,
        SocketAddr::new(src?, sport?),
        SocketAddr::new(dst?, dport?),
    ))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn listing_gives_the_original_direction() {
        let text = "\
tcp      6 431995 ESTABLISHED src=10.66.1.2 dst=10.66.2.2 sport=41000 dport=8080 src=10.66.2.2 dst=10.66.1.2 sport=8080 dport=41000 [ASSURED] mark=268435456 use=1
tcp      6 118 TIME_WAIT src=fd00::2 dst=fd00::1 sport=5000 dport=80 src=fd00::1 dst=fd00::2 sport=80 dport=5000 [ASSURED] mark=0 use=1
garbage line
tcp      6 10 SYN_SENT src=10.0.0.1 dst=10.0.0.2 sport=1 [UNREPLIED]
udp      17 28 src=10.66.1.2 dst=10.66.2.3 sport=39000 dport=53 src=10.66.2.3 dst=10.66.1.2 sport=53 dport=39000 mark=268435456 use=1
icmp     1 29 src=10.66.2.2 dst=10.66.1.2 type=8 code=0 id=77 src=10.66.1.2 dst=10.66.2.2 type=0 code=0 id=77 mark=268435456 use=1
";
        let got: Vec<_> = parse_list(text).collect();
        let s = |a: &str| a.parse::<SocketAddr>().unwrap();
        assert_eq!(
            got,
            [
                (Protocol::Tcp, s("10.66.1.2:41000"), s("10.66.2.2:8080")),
                (Protocol::Tcp, s("[fd00::2]:5000"), s("[fd00::1]:80")),
                (Protocol::Udp, s("10.66.1.2:39000"), s("10.66.2.3:53")),
                (Protocol::ICMP, s("10.66.2.2:0"), s("10.66.1.2:0")),
            ]
        );
    }

    #[test]
    fn socket_filter_names_both_ends() {
        let f = socket_filter(
            "10.0.0.1:8080".parse().unwrap(),
            "[fd00::2]:41000".parse().unwrap(),
        );
        assert_eq!(
            f.join(" "),
            "src 10.0.0.1 sport = 8080 dst [fd00::2] dport = 41000"
        );
    }

    #[test]
    fn delete_command_names_the_exact_tuple() {
        let mut cmd = Command::new("conntrack");
        tuple_args(
            &mut cmd,
            Protocol::Tcp,
            "[fd00::2]:5000".parse().unwrap(),
            "[fd00::1]:80".parse().unwrap(),
        );
        let args: Vec<_> = cmd.get_args().map(|a| a.to_str().unwrap()).collect();
        assert_eq!(
            args,
            [
                "-p", "tcp", "-s", "fd00::2", "-d", "fd00::1", "--sport", "5000", "--dport", "80",
                "-f", "ipv6"
            ]
        );
        let mut cmd = Command::new("conntrack");
        tuple_args(
            &mut cmd,
            Protocol::ICMP,
            "10.0.0.1:0".parse().unwrap(),
            "10.0.0.2:0".parse().unwrap(),
        );
        let args: Vec<_> = cmd.get_args().map(|a| a.to_str().unwrap()).collect();
        assert_eq!(args, ["-p", "icmp", "-s", "10.0.0.1", "-d", "10.0.0.2"]);
    }
}
