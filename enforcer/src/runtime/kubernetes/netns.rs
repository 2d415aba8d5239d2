//! Finding a pod's network namespace without a container runtime API.
//!
//! Kubernetes nodes run containerd or CRI-O; neither is asked. Every process of the host PID
//! namespace is in some network namespace (`/proc/PID/ns/net`, named by its inode); a pod's
//! sandbox ("pause") process sits in the pod's. The addresses of a namespace are read without
//! entering it: `/proc/PID/net/fib_trie` lists its local IPv4 addresses (`/32 host LOCAL`
//! leaves), `/proc/PID/net/if_inet6` its IPv6 ones. One process per distinct namespace is read;
//! the host's own namespace (PID 1's, and ours) is never a pod's. A pod is found when exactly
//! one namespace holds one of its IPs; the process named for it is the oldest one there (the
//! sandbox, which lives as long as the pod).

use std::collections::{BTreeSet, HashMap};
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;

/// A network namespace found for a pod: a process in it and the namespace's inode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Found {
    pub pid: u32,
    pub ino: u64,
}

/// Why a pod's namespace was not found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Missing {
    /// No namespace holds any of its IPs (yet: the sandbox may still be being set up).
    NotFound,
    /// More than one namespace holds its IPs: enforcing either could enforce the wrong pod.
    Ambiguous(Vec<u64>),
    /// `/proc` could not be read at all.
    Proc(String),
}

impl std::fmt::Display for Missing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Missing::NotFound => f.write_str("no network namespace holds its IP"),
            Missing::Ambiguous(inos) => write!(
                f,
                "its IP is in {} network namespaces (inodes {inos:?}): not enforced",
                inos.len()
            ),
            Missing::Proc(e) => write!(f, "reading /proc: {e}"),
        }
    }
}

/// Looks pods' namespaces up by IP. Implementations do blocking I/O: call from a blocking
/// thread.
pub trait NetnsFinder: Send + Sync + 'static {
    /// For each pod (its IPs), its namespace.
    fn find(&self, pods: &[Vec<IpAddr>]) -> Vec<Result<Found, Missing>>;
    /// Whether `found.pid` still is in namespace `found.ino` (cheap: one readlink).
    fn still_there(&self, found: &Found) -> bool;
}

/// The real finder: scans `/proc` (the host PID namespace's: the agent runs with hostPID).
#[derive(Debug, Clone)]
pub struct ProcScanner {
    root: PathBuf,
}

impl Default for ProcScanner {
    fn default() -> Self {
        ProcScanner {
            root: PathBuf::from("/proc"),
        }
    }
}

/// The inode in a `net:[4026531992]` link.
pub fn parse_ns_link(link: &str) -> Option<u64> {
    link.strip_prefix("net:[")?.strip_suffix(']')?.parse().ok()
}

/// Local IPv4 addresses in a `/proc/PID/net/fib_trie` listing (loopback excluded). Streams the
/// file line by line: a namespace with a full routing table costs time, not memory.
pub fn parse_fib_trie(r: impl BufRead) -> BTreeSet<Ipv4Addr> {
    let mut out = BTreeSet::new();
    let mut leaf: Option<Ipv4Addr> = None;
    for line in r.lines() {
        let Ok(line) = line else { break };
        let t = line.trim_start();
        if let Some(rest) = t.strip_prefix("|--") {
            leaf = rest.trim().parse().ok();
        } else if t.starts_with("+--") || t.ends_with(':') {
            leaf = None;
        } else if t.starts_with("/32 host LOCAL")
            && let Some(ip) = leaf
            && !ip.is_loopback()
        {
            out.insert(ip);
        }
    }
    out
}

/// Addresses in a `/proc/PID/net/if_inet6` listing, without loopback and link-local ones (a
/// pod's IPv6 address is global or unique-local).
pub fn parse_if_inet6(r: impl BufRead) -> BTreeSet<Ipv6Addr> {
    let mut out = BTreeSet::new();
    for line in r.lines() {
        let Ok(line) = line else { break };
        let Some(hex) = line.split_whitespace().next() else {
            continue;
        };
        let Ok(bits) = u128::from_str_radix(hex, 16) else {
            continue;
        };
        if hex.len() != 32 {
            continue;
        }
        let ip = Ipv6Addr::from(bits);
        if ip.is_loopback() || ip.is_unicast_link_local() || ip.is_unspecified() {
            continue;
        }
        out.insert(ip);
    }
    out
}

/// Process start time (clock ticks since boot) from `/proc/PID/stat`: field 22, counted after
/// the command name's closing parenthesis (the name may hold spaces and parentheses).
pub fn parse_stat_start(stat: &str) -> Option<u64> {
    let after = &stat[stat.rfind(')')? + 1..];
    // After ")": field 3 (state) is the first; starttime is field 22.
    after.split_whitespace().nth(19)?.parse().ok()
}

/// One namespace seen in a scan.
struct Scanned {
    ino: u64,
    pids: Vec<u32>,
    addrs: BTreeSet<IpAddr>,
}

impl ProcScanner {
    fn ns_ino(&self, pid: &str) -> Option<u64> {
        let link = std::fs::read_link(self.root.join(pid).join("ns/net")).ok()?;
        parse_ns_link(link.to_str()?)
    }

    /// Every namespace but the host's, with its processes.
    fn namespaces(&self) -> std::io::Result<HashMap<u64, Vec<u32>>> {
        let host: Vec<u64> = ["1", "self"]
            .iter()
            .filter_map(|p| self.ns_ino(p))
            .collect();
        let mut by_ino: HashMap<u64, Vec<u32>> = HashMap::new();
        for entry in std::fs::read_dir(&self.root)? {
            let Ok(entry) = entry else { continue };
            let name = entry.file_name();
            let Some(pid) = name.to_str().and_then(|n| n.parse::<u32>().ok()) else {
                continue;
            };
            // A process that exited meanwhile, or a kernel thread we cannot see: skipped.
            let Some(ino) = self.ns_ino(&pid.to_string()) else {
                continue;
            };
            if !host.contains(&ino) {
                by_ino.entry(ino).or_default().push(pid);
            }
        }
        Ok(by_ino)
    }

    fn addresses(&self, pid: u32) -> Option<BTreeSet<IpAddr>> {
        let dir = self.root.join(pid.to_string()).join("net");
        let v4 = parse_fib_trie(BufReader::new(File::open(dir.join("fib_trie")).ok()?));
        let mut all: BTreeSet<IpAddr> = v4.into_iter().map(IpAddr::V4).collect();
        // No if_inet6 when IPv6 is disabled in that namespace.
        if let Ok(f) = File::open(dir.join("if_inet6")) {
            all.extend(
                parse_if_inet6(BufReader::new(f))
                    .into_iter()
                    .map(IpAddr::V6),
            );
        }
        Some(all)
    }

    fn start_time(&self, pid: u32) -> u64 {
        std::fs::read_to_string(self.root.join(pid.to_string()).join("stat"))
            .ok()
            .and_then(|s| parse_stat_start(&s))
            .unwrap_or(u64::MAX)
    }

    /// The namespaces of the node (but the host's) with their processes and addresses.
    fn scan(&self) -> std::io::Result<Vec<Scanned>> {
        let mut out = Vec::new();
        for (ino, mut pids) in self.namespaces()? {
            pids.sort_unstable();
            // The first process whose files can still be read speaks for the namespace.
            if let Some(addrs) = pids.iter().find_map(|p| self.addresses(*p)) {
                out.push(Scanned { ino, pids, addrs });
            }
        }
        Ok(out)
    }
}

impl NetnsFinder for ProcScanner {
    fn find(&self, pods: &[Vec<IpAddr>]) -> Vec<Result<Found, Missing>> {
        if pods.is_empty() {
            return Vec::new();
        }
        let scanned = match self.scan() {
            Ok(s) => s,
            Err(e) => {
                let why = Missing::Proc(format!("{}: {e}", self.root.display()));
                return pods.iter().map(|_| Err(why.clone())).collect();
            }
        };
        let mut by_ip: HashMap<IpAddr, Vec<usize>> = HashMap::new();
        for (i, ns) in scanned.iter().enumerate() {
            for ip in &ns.addrs {
                by_ip.entry(*ip).or_default().push(i);
            }
        }
        pods.iter()
            .map(|ips| {
                let mut hits: Vec<usize> = ips
                    .iter()
                    .filter_map(|ip| by_ip.get(ip))
                    .flatten()
                    .copied()
                    .collect();
                hits.sort_unstable();
                hits.dedup();
                match hits.as_slice() {
                    [] => Err(Missing::NotFound),
                    [i] => {
                        let ns = &scanned[*i];
                        let pid = ns
                            .pids
                            .iter()
                            .copied()
                            .min_by_key(|p| (self.start_time(*p), *p))
                            .unwrap_or_default();
                        Ok(Found { pid, ino: ns.ino })
                    }
                    many => Err(Missing::Ambiguous(
                        many.iter().map(|i| scanned[*i].ino).collect(),
                    )),
                }
            })
            .collect()
    }

    fn still_there(&self, found: &Found) -> bool {
        self.ns_ino(&found.pid.to_string()) == Some(found.ino)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    const FIB_TRIE: &str = "Main:
  +-- 0.0.0.0/0 3 0 5
     |-- 0.0.0.0
        /0 universe UNICAST
     +-- 10.64.33.0/24 2 0 2
        |-- 10.64.33.0
           /24 link UNICAST
Local:
  +-- 0.0.0.0/0 3 0 5
     +-- 10.64.33.0/24 2 0 2
        |-- 10.64.33.2
           /32 host LOCAL
        |-- 10.64.33.255
           /32 link BROADCAST
     +-- 127.0.0.0/8 2 0 2
        +-- 127.0.0.0/31 1 0 0
           |-- 127.0.0.0
              /8 host LOCAL
           |-- 127.0.0.1
              /32 host LOCAL
        |-- 127.255.255.255
           /32 link BROADCAST
     |-- 192.168.7.9
        /32 host LOCAL
";

    #[test]
    fn fib_trie_gives_the_local_addresses_only() {
        let got = parse_fib_trie(FIB_TRIE.as_bytes());
        let want: BTreeSet<Ipv4Addr> = ["10.64.33.2", "192.168.7.9"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        assert_eq!(got, want);
    }

    #[test]
    fn fib_trie_garbage_gives_nothing_and_does_not_panic() {
        for text in [
            "",
            "|--\n/32 host LOCAL\n",
            "|-- 300.1.1.1\n /32 host LOCAL",
            "\u{0}\u{ff}",
        ] {
            assert!(parse_fib_trie(text.as_bytes()).is_empty(), "{text:?}");
        }
        // A LOCAL line right after an internal node is not an address.
        let t = "Local:\n  +-- 10.0.0.0/8 2 0 2\n     /32 host LOCAL\n";
        assert!(parse_fib_trie(t.as_bytes()).is_empty());
    }

    #[test]
    fn if_inet6_skips_loopback_and_link_local() {
        let text = "00000000000000000000000000000001 01 80 10 80       lo
fe800000000000004c1bd0fffe1e4a5b 02 40 20 80     eth0
fd000000000000000000000000000a02 02 40 00 80     eth0
2001db80000000000000000000000001 02 40 00 80     eth0
zz 02 40 00 80 eth0
0001 02 40 00 80 eth0
";
        let got: Vec<String> = parse_if_inet6(text.as_bytes())
            .iter()
            .map(|i| i.to_string())
            .collect();
        assert_eq!(got, ["2001:db80::1", "fd00::a02"]);
    }

    #[test]
    fn ns_link_and_stat_parse() {
        assert_eq!(parse_ns_link("net:[4026531992]"), Some(4026531992));
        assert_eq!(parse_ns_link("mnt:[4026531992]"), None);
        assert_eq!(parse_ns_link("net:[x]"), None);
        let stat = "4242 (pause (x) y) S 1 4242 4242 0 -1 4194560 100 0 0 0 0 0 0 0 20 0 1 0 987654 1024 0";
        assert_eq!(parse_stat_start(stat), Some(987654));
        assert_eq!(parse_stat_start("garbage"), None);
    }

    struct Ns {
        name: String,
        child: std::process::Child,
    }

    impl Drop for Ns {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
            let _ = std::process::Command::new("ip")
                .args(["netns", "del", &self.name])
                .status();
        }
    }

    /// A netns with a sleeping process in it (a pod sandbox).
    fn pod_netns(suffix: &str) -> Ns {
        let name = format!("ts-{}-{suffix}", std::process::id());
        testbed::run(&["ip", "netns", "add", &name]);
        let child = std::process::Command::new("ip")
            .args(["netns", "exec", &name, "sleep", "600"])
            .spawn()
            .unwrap();
        testbed::run(&["ip", "-n", &name, "link", "set", "lo", "up"]);
        Ns { name, child }
    }

    fn address(ns: &Ns, v4: &str, v6: &str) {
        testbed::run(&["ip", "-n", &ns.name, "addr", "add", v4, "dev", "eth0"]);
        testbed::run(&[
            "ip", "-n", &ns.name, "addr", "add", v6, "dev", "eth0", "nodad",
        ]);
        testbed::run(&["ip", "-n", &ns.name, "link", "set", "eth0", "up"]);
    }

    /// Two real namespaces with known addresses: each is found by its IPv4 or IPv6 address
    /// (through the sleeping process in it), an unknown IP is not found, and the host's
    /// addresses never name a pod.
    #[test]
    fn finds_real_namespaces_by_ip() {
        if !testbed::privileged("finds_real_namespaces_by_ip") {
            return;
        }
        testbed::sweep_leftovers();
        let a = pod_netns("kns-a");
        let b = pod_netns("kns-b");
        testbed::run(&[
            "ip", "link", "add", "eth0", "netns", &a.name, "type", "veth", "peer", "name", "eth0",
            "netns", &b.name,
        ]);
        address(&a, "10.251.7.2/24", "fd51:7::2/64");
        address(&b, "10.251.8.2/24", "fd51:8::2/64");
        let ino = |ns: &Ns| {
            std::fs::metadata(format!("/var/run/netns/{}", ns.name))
                .map(|m| std::os::unix::fs::MetadataExt::ino(&m))
                .unwrap()
        };
        let ip = |s: &str| -> IpAddr { s.parse().unwrap() };
        let scanner = ProcScanner::default();
        let t = std::time::Instant::now();
        scanner.find(&[vec![ip("10.251.7.2")]]);
        let procs = std::fs::read_dir("/proc")
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .is_ok_and(|e| e.file_name().to_string_lossy().parse::<u32>().is_ok())
            })
            .count();
        // A figure for the record, not an assertion.
        eprintln!("one lookup scanned {procs} processes in {:?}", t.elapsed());
        // The process may take a moment to enter its namespace after the fork.
        let mut got = Vec::new();
        for _ in 0..100 {
            got = scanner.find(&[
                vec![ip("10.251.7.2")],
                vec![ip("fd51:8::2")],
                vec![ip("10.251.8.2"), ip("fd51:8::2")],
                vec![ip("10.251.9.2")],
                vec![ip("127.0.0.1")],
            ]);
            if got[0].is_ok() && got[1].is_ok() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let fa = got[0].clone().unwrap();
        let fb = got[1].clone().unwrap();
        assert_eq!(fa.ino, ino(&a));
        assert_eq!(fb.ino, ino(&b));
        assert_eq!(got[2], Ok(fb));
        assert_eq!(got[3], Err(Missing::NotFound));
        assert_eq!(got[4], Err(Missing::NotFound));
        // The process named is one in that very namespace, and stays valid while it lives.
        assert!(scanner.still_there(&fa) && scanner.still_there(&fb));
        let gone = Found {
            pid: fa.pid,
            ino: fb.ino,
        };
        assert!(!scanner.still_there(&gone));
        drop(a);
        assert!(!scanner.still_there(&fa));
        let _ = &b.name;
    }
}
