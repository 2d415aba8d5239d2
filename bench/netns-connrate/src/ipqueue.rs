//! Case (k): what an IP-based NFQUEUE enforcer (the design of kubernetes-sigs/kube-network-policies)
//! costs on the same topology. No agent runs. In each receiving workload's netns, mangle INPUT
//! sends the first packet of every new flow (a TCP SYN, or a UDP datagram that conntrack sees as
//! NEW) to an NFQUEUE; a thread of this process, entered into that netns, reads the queue and
//! decides with the project's own policy engine on the packet's addresses alone: the peer is
//! whatever workload holds the source address (its labels as the engine knows them), or an
//! IP-only peer. Every later packet of the flow stays in the kernel (conntrack ESTABLISHED).
//!
//! One queue trip per flow has to answer both directions, so the decision is the destination's
//! ingress and, when the source is a known workload, the source's egress (an IP-based enforcer
//! that queues at each end would decide each direction at its own end, paying a trip at each).
//!
//! Case (q4): a floor, not an enforcer. The same readers accept every packet at once, doing
//! nothing, on the queue trips that any handshake must make in which each end adds its own proof
//! to what it sends and checks the peer's in what it receives: in every workload netns, TCP
//! packets with SYN set on OUTPUT and INPUT (the SYN leaving the client and reaching the server,
//! the SYN-ACK leaving the server and reaching the client: four trips per connection), and the
//! first UDP datagram each way (conntrack NEW, and the reply direction: the bench's UDP flows are
//! one datagram each way, so four trips per flow too). What (q4) reaches against (a) and (k) in
//! the same round bounds what a token design with fewer trips than Tessera's six could reach.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use policy::objects;
use policy::{Connection, Direction, Engine, Peer, Protocol, Workload, WorkloadIdentity};

/// The queue number of the (k) rules (no agent runs in this case, so no other user).
pub const QUEUE_NUM: u16 = 100;

/// What the readers counted, shared with the bench.
#[derive(Default)]
pub struct Stats {
    accepted: AtomicU64,
    dropped: AtomicU64,
    /// Time to decide on each queued packet (parse, lookups, engine), nanoseconds, in order.
    decisions_ns: Mutex<Vec<u64>>,
}

impl Stats {
    /// Packets handled so far (accepted or dropped).
    pub fn handled(&self) -> u64 {
        self.accepted.load(Ordering::Relaxed) + self.dropped.load(Ordering::Relaxed)
    }

    /// How many decisions have been recorded so far: a mark for [`Stats::decisions_since`].
    pub fn mark(&self) -> usize {
        self.decisions_ns.lock().map_or(0, |v| v.len())
    }

    /// The decision times recorded since `mark`, in nanoseconds, sorted.
    pub fn decisions_since(&self, mark: usize) -> Vec<u64> {
        let mut v = self
            .decisions_ns
            .lock()
            .map(|v| v.get(mark..).map(<[u64]>::to_vec).unwrap_or_default())
            .unwrap_or_default();
        v.sort_unstable();
        v
    }

    fn record(&self, allowed: bool, ns: Option<u64>) {
        if allowed {
            self.accepted.fetch_add(1, Ordering::Relaxed);
        } else {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
        if let Some(ns) = ns
            && let Ok(mut v) = self.decisions_ns.lock()
        {
            v.push(ns);
        }
    }
}

/// Builds the engine the way `tessera policy matrix` does: every policy file of `dir` (staged
/// ones left out, as the agents leave them out of enforcement) and `cluster_yaml`, the
/// workloads as pods with their addresses and labels.
pub fn engine(dir: &std::path::Path, cluster_yaml: &str) -> Result<Engine> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.extension()
                .and_then(|e| e.to_str())
                .is_some_and(|e| matches!(e, "yaml" | "yml" | "json"))
        })
        .collect();
    files.sort();
    let mut all = Vec::new();
    let mut problems = Vec::new();
    let mut sources = vec![("testbed workloads".to_owned(), cluster_yaml.to_owned())];
    for path in files {
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        sources.push((path.display().to_string(), text));
    }
    for (source, text) in &sources {
        let parsed = objects::parse(source, text);
        problems.extend(parsed.errors.iter().map(ToString::to_string));
        all.extend(parsed.objects.into_iter().filter(|o| !o.value.is_staged()));
    }
    let mut engine = Engine::new();
    let report = objects::load(&mut engine, &all);
    problems.extend(report.errors.iter().map(ToString::to_string));
    if !problems.is_empty() {
        bail!("case k: policies refused: {}", problems.join("; "));
    }
    Ok(engine)
}

/// What the readers do with a queued packet, and which packets the rules queue.
pub enum Kind {
    /// (k): the first packet of each new flow at the receiving end, decided on its addresses.
    Policy(Box<Engine>),
    /// (q4): SYN and SYN-ACK, and the first UDP datagram each way, at both ends; accepted at
    /// once, nothing decided (no decision time is recorded).
    Floor,
}

impl Kind {
    fn name(&self) -> &'static str {
        match self {
            Kind::Policy(_) => "k",
            Kind::Floor => "q4",
        }
    }

    /// The iptables rules of this kind (mangle table, each followed by `-j NFQUEUE`), in each
    /// netns.
    fn rules(&self) -> &'static [&'static str] {
        match self {
            Kind::Policy(_) => &[
                "-A INPUT -p tcp --syn -m conntrack --ctstate NEW",
                "-A INPUT -p udp -m conntrack --ctstate NEW",
            ],
            Kind::Floor => &[
                "-A OUTPUT -p tcp --tcp-flags SYN SYN",
                "-A INPUT -p tcp --tcp-flags SYN SYN",
                "-A OUTPUT -p udp -m conntrack --ctstate NEW",
                "-A INPUT -p udp -m conntrack --ctstate NEW",
                "-A OUTPUT -p udp -m conntrack --ctstate ESTABLISHED --ctdir REPLY",
                "-A INPUT -p udp -m conntrack --ctstate ESTABLISHED --ctdir REPLY",
            ],
        }
    }
}

/// The readers of case (k) or (q4), one per workload netns. Stopped on drop.
pub struct IpEnforcer {
    /// The case's name, for errors.
    name: &'static str,
    stop: Arc<AtomicBool>,
    readers: Vec<(String, JoinHandle<Result<()>>)>,
    stats: Arc<Stats>,
}

impl IpEnforcer {
    /// Opens and binds [`QUEUE_NUM`] in each netns of `namespaces`, then installs the rules of
    /// `kind` there.
    pub fn start(kind: Kind, namespaces: &[String]) -> Result<IpEnforcer> {
        let name = kind.name();
        let rules = kind.rules();
        let kind = Arc::new(kind);
        let mut me = IpEnforcer {
            name,
            stop: Arc::new(AtomicBool::new(false)),
            readers: Vec::new(),
            stats: Arc::new(Stats::default()),
        };
        for ns in namespaces {
            let (ready_tx, ready_rx) = mpsc::channel();
            let (kind, stop, stats) = (kind.clone(), me.stop.clone(), me.stats.clone());
            let handle = testbed::spawn_in_netns(ns, move || {
                let queue = open_queue();
                let failed = queue.as_ref().err().map(|e| format!("{e:#}"));
                let _ = ready_tx.send(failed);
                serve(queue?, &kind, &stop, &stats)
            });
            me.readers.push((ns.clone(), handle));
            match ready_rx.recv_timeout(Duration::from_secs(5)) {
                Ok(None) => {}
                Ok(Some(e)) => bail!("case {name}: queue {QUEUE_NUM} in {ns}: {e}"),
                Err(_) => bail!("case {name}: queue {QUEUE_NUM} in {ns} not open after 5 s"),
            }
            // Only now: a rule queueing to a queue nobody has bound drops the packet.
            let num = QUEUE_NUM.to_string();
            for matches in rules {
                let mut rule = vec!["iptables", "-t", "mangle"];
                rule.extend(matches.split_whitespace());
                rule.extend_from_slice(&["-j", "NFQUEUE", "--queue-num", &num]);
                crate::cmd_in(ns, &rule)?;
            }
        }
        Ok(me)
    }

    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// Stops every reader and returns the first error one of them ended with.
    pub fn finish(mut self) -> Result<()> {
        self.stop_all()
    }

    fn stop_all(&mut self) -> Result<()> {
        self.stop.store(true, Ordering::SeqCst);
        let mut first_error = None;
        for (ns, handle) in self.readers.drain(..) {
            // A reader blocks in recv: a new UDP flow to this netns's own loopback goes
            // through the same INPUT rule and wakes it (it then sees the stop flag).
            let deadline = Instant::now() + Duration::from_secs(2);
            while !handle.is_finished() && Instant::now() < deadline {
                let _ = testbed::in_netns(&ns, || {
                    UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))
                        .and_then(|s| s.send_to(&[0], (Ipv4Addr::LOCALHOST, 9)))
                });
                std::thread::sleep(Duration::from_millis(20));
            }
            if !handle.is_finished() {
                // Left blocked; its netns goes with the testbed, the thread with the process.
                first_error.get_or_insert_with(|| {
                    anyhow::anyhow!("case {}: reader in {ns} did not stop", self.name)
                });
                continue;
            }
            match handle.join() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    first_error
                        .get_or_insert(e.context(format!("case {}: reader in {ns}", self.name)));
                }
                Err(_) => {
                    first_error.get_or_insert_with(|| {
                        anyhow::anyhow!("case {}: reader in {ns} panicked", self.name)
                    });
                }
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}

impl Drop for IpEnforcer {
    fn drop(&mut self) {
        let _ = self.stop_all();
    }
}

fn open_queue() -> Result<nfq::Queue> {
    let mut q = nfq::Queue::open().context("open NFQUEUE socket")?;
    q.bind(QUEUE_NUM).context("bind")?;
    // Headers are all the decision reads.
    q.set_copy_range(QUEUE_NUM, 128).context("copy range")?;
    q.set_queue_max_len(QUEUE_NUM, 8192)
        .context("queue length")?;
    q.set_fail_open(QUEUE_NUM, false).context("fail closed")?;
    q.set_nonblocking(false);
    Ok(q)
}

fn serve(mut queue: nfq::Queue, kind: &Kind, stop: &AtomicBool, stats: &Stats) -> Result<()> {
    while !stop.load(Ordering::SeqCst) {
        let mut msg = match queue.recv() {
            Ok(m) => m,
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(nix::libc::EINTR | nix::libc::ENOBUFS | nix::libc::ENOSPC)
                ) =>
            {
                continue;
            }
            Err(e) => return Err(e).context("recv"),
        };
        let allowed = match kind {
            Kind::Policy(engine) => {
                let t = Instant::now();
                let allowed = decide(engine, msg.get_payload());
                let ns = u64::try_from(t.elapsed().as_nanos()).unwrap_or(u64::MAX);
                stats.record(allowed, Some(ns));
                allowed
            }
            Kind::Floor => {
                stats.record(true, None);
                true
            }
        };
        msg.set_verdict(if allowed {
            nfq::Verdict::Accept
        } else {
            nfq::Verdict::Drop
        });
        match queue.verdict(msg) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(nix::libc::ENOBUFS) => {}
            Err(e) => return Err(e).context("verdict"),
        }
    }
    Ok(())
}

/// The addresses, protocol and destination port of an IPv4 or IPv6 packet (IPv6: the first
/// header's next header only; anything behind extension headers is decided without a port).
struct Flow {
    src: IpAddr,
    dst: IpAddr,
    protocol: Protocol,
    dport: u16,
}

fn parse(b: &[u8]) -> Option<Flow> {
    let (src, dst, proto, l4) = match b.first()? >> 4 {
        4 => {
            let ihl = usize::from(b.first()? & 0x0f) * 4;
            let src: [u8; 4] = b.get(12..16)?.try_into().ok()?;
            let dst: [u8; 4] = b.get(16..20)?.try_into().ok()?;
            (
                IpAddr::from(src),
                IpAddr::from(dst),
                *b.get(9)?,
                b.get(ihl..)?,
            )
        }
        6 => {
            let src: [u8; 16] = b.get(8..24)?.try_into().ok()?;
            let dst: [u8; 16] = b.get(24..40)?.try_into().ok()?;
            (
                IpAddr::from(Ipv6Addr::from(src)),
                IpAddr::from(Ipv6Addr::from(dst)),
                *b.get(6)?,
                b.get(40..)?,
            )
        }
        _ => return None,
    };
    let protocol = Protocol::from_ip(proto);
    let dport = if protocol.has_ports() {
        u16::from_be_bytes(l4.get(2..4)?.try_into().ok()?)
    } else {
        0
    };
    Some(Flow {
        src,
        dst,
        protocol,
        dport,
    })
}

fn identity(engine: &Engine, w: &Workload) -> WorkloadIdentity {
    WorkloadIdentity {
        namespace: w.key.namespace.clone(),
        namespace_labels: engine.namespace_labels_or_default(&w.key.namespace),
        labels: w.labels.clone(),
    }
}

/// Accept or drop the first packet of a flow, on its addresses: the destination's ingress, and
/// the source's egress when the source is a workload the engine knows.
fn decide(engine: &Engine, packet: &[u8]) -> bool {
    let Some(f) = parse(packet) else {
        return false;
    };
    let Some(local) = engine.workload_by_ip(&f.dst) else {
        return false;
    };
    let source = engine.workload_by_ip(&f.src);
    let peer = source.map_or(Peer::IpOnly, |w| Peer::Workload(identity(engine, w)));
    let ingress = Connection {
        local: &local.key,
        direction: Direction::Ingress,
        peer: &peer,
        peer_ip: Some(f.src),
        port: f.dport,
        protocol: f.protocol,
        dest_port_name: None,
        resolved_names: &[],
    };
    if !engine.decide_ref(&ingress).allowed {
        return false;
    }
    let Some(source) = source else {
        return true;
    };
    let dest = Peer::Workload(identity(engine, local));
    let port_name = local
        .ports
        .iter()
        .find(|p| p.port == f.dport && p.protocol == f.protocol)
        .and_then(|p| p.name.as_deref());
    let egress = Connection {
        local: &source.key,
        direction: Direction::Egress,
        peer: &dest,
        peer_ip: Some(f.dst),
        port: f.dport,
        protocol: f.protocol,
        dest_port_name: port_name,
        resolved_names: &[],
    };
    engine.decide_ref(&egress).allowed
}

#[cfg(test)]
mod tests {
    use super::*;

    const CLUSTER: &str = "\
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {kubernetes.io/metadata.name: shop}}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: shop, labels: {role: WebFrontend}}
spec:
  containers: [{name: app, image: app:1}]
status: {podIP: 10.1.1.2}
---
apiVersion: v1
kind: Pod
metadata: {name: server, namespace: shop, labels: {role: BusinessBackend}}
spec:
  containers: [{name: app, image: app:1, ports: [{name: api, containerPort: 8080}]}]
status: {podIP: 10.1.2.2}
---
apiVersion: v1
kind: Pod
metadata: {name: db, namespace: shop, labels: {role: Database}}
spec:
  containers: [{name: app, image: app:1, ports: [{containerPort: 5432}]}]
status: {podIP: 10.1.3.2}
";

    fn three_tier() -> Engine {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../examples/three-tier/policies");
        match engine(&dir, CLUSTER) {
            Ok(e) => e,
            Err(e) => panic!("{e:#}"),
        }
    }

    fn v4(src: [u8; 4], dst: [u8; 4], proto: u8, dport: u16) -> Vec<u8> {
        let mut p = vec![0x45, 0, 0, 40, 0, 0, 0x40, 0, 64, proto, 0, 0];
        p.extend_from_slice(&src);
        p.extend_from_slice(&dst);
        p.extend_from_slice(&40000u16.to_be_bytes());
        p.extend_from_slice(&dport.to_be_bytes());
        p.extend_from_slice(&[0; 16]);
        p
    }

    #[test]
    fn decides_on_addresses_like_the_policies_say() {
        let e = three_tier();
        let (client, server, db) = ([10, 1, 1, 2], [10, 1, 2, 2], [10, 1, 3, 2]);
        assert!(decide(&e, &v4(client, server, 6, 8080)));
        assert!(decide(&e, &v4(client, server, 17, 8125)));
        assert!(!decide(&e, &v4(client, server, 6, 9999)));
        assert!(!decide(&e, &v4(client, db, 6, 5432)));
        assert!(decide(&e, &v4(server, db, 6, 5432)));
        // An address no workload holds is an IP-only peer: the database admits none.
        assert!(!decide(&e, &v4([198, 18, 0, 7], db, 6, 5432)));
        // Nothing the engine enforces, or not a packet at all.
        assert!(!decide(&e, &v4(client, [10, 9, 9, 9], 6, 80)));
        assert!(!decide(&e, &[0x45, 0, 0]));
        assert!(!decide(&e, &[]));
    }
}
