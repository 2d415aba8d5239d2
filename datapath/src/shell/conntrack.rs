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

fn tuple_args(cmd: &mut Command, src: SocketAddr, dst: SocketAddr) {
    cmd.args(["-p", "tcp", "-s"])
        .arg(src.ip().to_string())
        .arg("-d")
        .arg(dst.ip().to_string())
        .arg("--sport")
        .arg(src.port().to_string())
        .arg("--dport")
        .arg(dst.port().to_string());
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
            let mut ss = Command::new("ss");
            ss.args(["-K", "-tnH"])
                .args(socket_filter(c.local, c.remote));
            match run_command(ss, None) {
                Ok((out, _)) => done.sockets += out.lines().filter(|l| !l.is_empty()).count(),
                Err(e) => tracing::debug!("ss -K {} {}: {e}", c.local, c.remote),
            }
            let (src, dst) = c.conntrack_tuple();
            let mut cmd = Command::new("conntrack");
            cmd.arg("-D");
            tuple_args(&mut cmd, src, dst);
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

/// The (source, destination) pairs, original direction, of every TCP entry of the conntrack
/// table inside `ns`, IPv4 and IPv6.
pub fn list_tcp(ns: &Netns) -> Result<HashSet<(SocketAddr, SocketAddr)>, ShellError> {
    ns.run(|| {
        let mut all = HashSet::new();
        for family in ["ipv4", "ipv6"] {
            let mut cmd = Command::new("conntrack");
            cmd.args(["-L", "-p", "tcp", "-f", family]);
            let (out, _) = run_command(cmd, None)?;
            all.extend(parse_list(&out));
        }
        Ok(all)
    })?
}

/// `conntrack -L` lines → the original direction's (source, destination). Lines that do not
/// parse are skipped.
pub fn parse_list(text: &str) -> impl Iterator<Item = (SocketAddr, SocketAddr)> + '_ {
    text.lines().filter_map(parse_line)
}

fn parse_line(line: &str) -> Option<(SocketAddr, SocketAddr)> {
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
    Some((SocketAddr::new(src?, sport?), SocketAddr::new(dst?, dport?)))
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
";
        let got: Vec<_> = parse_list(text).collect();
        let s = |a: &str| a.parse::<SocketAddr>().unwrap();
        assert_eq!(
            got,
            [
                (s("10.66.1.2:41000"), s("10.66.2.2:8080")),
                (s("[fd00::2]:5000"), s("[fd00::1]:80")),
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
    }
}
