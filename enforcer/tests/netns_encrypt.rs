//! Encryption between nodes (`tessera run --encrypt`, issue 17) on the real kernel: the
//! two-node testbed with one agent per node, each running inside its node's netns (as a
//! host-network pod does) with both nodes and their pod ranges in its inventory, and the
//! three-tier policies. A tcpdump capture on the link between the nodes (`uplink`) shows:
//!
//! - with `--encrypt` (PSK and PKI): a TCP payload, a UDP datagram and an ICMP echo with known
//!   markers cross between the nodes' pods, and the capture holds none of the markers, only
//!   UDP between the two node addresses with the tunnel port on one side; NetworkPolicy still
//!   holds through the tunnel (an allowed cross-node cell connects, a denied one does not);
//!   the node's own traffic to the other node's pods goes through too; the agents' status
//!   shows the peer with a recent handshake and bytes both ways; SIGTERM removes the device,
//!   the routes and the rule;
//! - without `--encrypt`, the same exchange shows all three markers (the capture works);
//! - PKI: a node whose certificate comes from another CA gets no tunnel session, and neither
//!   node's pod traffic to the other crosses the link in clear (dropped, counted `no_peer` on
//!   the honest node, `unknown_key` for the rogue's handshakes).
//!
//! Needs root and tcpdump (tests/run.sh installs it); without them it prints a SKIP line
//! locally and fails under CI=true.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::Value;
use testbed::tcpdump::{Tcpdump, contains};
use testbed::{AgentConfig, Mode, Testbed, WorkloadSpec, run_status};

const TESSERA: &str = env!("CARGO_BIN_EXE_tessera");
const PORT: u16 = 51871;
const OK_TIMEOUT: Duration = Duration::from_secs(5);
const DENIED_TIMEOUT: Duration = Duration::from_secs(2);
const WAIT: Duration = Duration::from_secs(10);

const TCP_MARKER: &[u8] = b"TESSERA-TCP-MARKER-7f3a0c";
const UDP_MARKER: &[u8] = b"TESSERA-UDP-MARKER-91c2e4";
/// busybox ping fills its payload with one byte (`-p a7`): sixteen of them in a row.
const ICMP_MARKER: &[u8] = &[0xa7; 16];

fn skip(test: &str) -> bool {
    !(testbed::privileged(test) && testbed::have_command(test, "tcpdump", "tcpdump"))
}

fn policies() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/three-tier/policies")
}

/// frontend-1 on node 1; backend-2, db-2 and an agentless workload (external-2) on node 2.
fn builder(agents: AgentConfig) -> testbed::TestbedBuilder {
    Testbed::builder()
        .policies(&policies())
        .workload(WorkloadSpec::new("frontend-1", 1, "WebFrontend").port(Some("http"), 80))
        .workload(WorkloadSpec::new("backend-2", 2, "BusinessBackend").port(Some("api"), 8080))
        .workload(WorkloadSpec::new("db-2", 2, "Database").port(None, 5432))
        .workload(WorkloadSpec::new("external-2", 2, "External").unenforced())
        .agents(agents)
}

fn agents(mode: Mode, encrypt: bool) -> AgentConfig {
    let mut cfg = AgentConfig::encrypted(Path::new(TESSERA), mode);
    if !encrypt {
        cfg.extra.clear();
    }
    cfg
}

/// The agent's `/status` JSON.
fn status(tb: &Testbed, node: u8) -> Value {
    let body = tb
        .agent(node)
        .get("/status")
        .unwrap_or_else(|| panic!("node {node}: /status does not answer\n{}", tb.agent_logs()));
    serde_json::from_str(&body).unwrap()
}

/// Waits until `pred` holds on node `node`'s tunnel status; returns it.
fn wait_tunnel(tb: &Testbed, node: u8, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
    let start = Instant::now();
    loop {
        let s = status(tb, node);
        if pred(&s["tunnel"]) {
            return s["tunnel"].clone();
        }
        assert!(
            start.elapsed() < WAIT,
            "node {node}: {what} not seen within {WAIT:?}; tunnel status: {:#}\n{}",
            s["tunnel"],
            tb.agent_logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn peer<'a>(tunnel: &'a Value, node: &str) -> Option<&'a Value> {
    tunnel["peers"]
        .as_array()?
        .iter()
        .find(|p| p["node"] == node)
}

// --- traffic ------------------------------------------------------------------------------------

/// TCP: `from` sends the marker to `to:port` (an echo server) and reads it back, connecting
/// within `timeout`.
fn tcp_marker(
    tb: &Testbed,
    from: &str,
    to: &str,
    port: u16,
    timeout: Duration,
) -> std::io::Result<()> {
    let mut s = tb.connect(from, to, port, timeout)?;
    s.write_all(TCP_MARKER)?;
    let mut back = vec![0u8; TCP_MARKER.len()];
    s.read_exact(&mut back)?;
    assert_eq!(back, TCP_MARKER);
    Ok(())
}

/// UDP: `from` sends the marker to `to:port`, where an echo answers it (a few tries: the
/// first datagram of a flow waits for the agents' handshake, and the tunnel's). Whether the
/// echo came back.
fn udp_marker(tb: &Testbed, from: &str, to: &str, port: u16) -> bool {
    let dst = SocketAddr::new(tb.workload(to).ip.into(), port);
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let echo = testbed::spawn_in_netns(&tb.workload(to).ns, move || {
        let s = UdpSocket::bind(("0.0.0.0", port)).unwrap();
        s.set_read_timeout(Some(Duration::from_millis(2500)))
            .unwrap();
        ready_tx.send(()).unwrap();
        let mut buf = [0u8; 2048];
        while let Ok((n, peer)) = s.recv_from(&mut buf) {
            let _ = s.send_to(&buf[..n], peer);
            // Once answered, only a repeat (a lost echo) is waited for.
            s.set_read_timeout(Some(Duration::from_millis(300)))
                .unwrap();
        }
    });
    ready_rx.recv().unwrap();
    let echoed = testbed::in_netns(&tb.workload(from).ns, move || {
        let s = UdpSocket::bind(("0.0.0.0", 0)).unwrap();
        s.set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        let mut buf = [0u8; 2048];
        for _ in 0..4 {
            s.send_to(UDP_MARKER, dst).unwrap();
            if let Ok(n) = s.recv(&mut buf) {
                return &buf[..n] == UDP_MARKER;
            }
        }
        false
    });
    echo.join().unwrap();
    echoed
}

/// ICMP: one echo from netns `ns` to `to` carrying the marker byte; answered?
fn ping_marker(ns: &str, to: Ipv4Addr) -> bool {
    run_status(&[
        "ip",
        "netns",
        "exec",
        ns,
        "busybox",
        "ping",
        "-c",
        "1",
        "-W",
        "2",
        "-s",
        "64",
        "-p",
        "a7",
        &to.to_string(),
    ])
    .status
    .success()
}

// --- capture ------------------------------------------------------------------------------------

/// None of the three markers is in the captured frames.
fn assert_no_marker(frames: &[Vec<u8>]) {
    for (name, m) in [
        ("TCP", TCP_MARKER),
        ("UDP", UDP_MARKER),
        ("ICMP", ICMP_MARKER),
    ] {
        assert!(
            !contains(frames, m),
            "the {name} marker crossed the link in clear"
        );
    }
}

/// tcpdump on `iface` of `ns`, its file in `dir`.
fn capture(ns: &str, iface: &str, dir: &Path) -> Tcpdump {
    Tcpdump::start(ns, iface, &dir.join(format!("{iface}.pcap")))
}

/// Every IPv4 frame is UDP between the two node addresses with the tunnel port on one side;
/// the other frames are ARP, or the link's own IPv6 (link-local neighbour discovery). Returns
/// how many tunnel datagrams there were.
fn only_tunnel_datagrams(frames: &[Vec<u8>], nodes: [Ipv4Addr; 2]) -> usize {
    let mut tunnel = 0;
    for f in frames {
        let ethertype = u16::from_be_bytes([f[12], f[13]]);
        match ethertype {
            0x0800 => {
                let ip = &f[14..];
                let src = Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]);
                let dst = Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]);
                let l4 = &ip[usize::from(ip[0] & 0x0f) * 4..];
                let (sport, dport) = (
                    u16::from_be_bytes([l4[0], l4[1]]),
                    u16::from_be_bytes([l4[2], l4[3]]),
                );
                assert!(
                    ip[9] == 17
                        && nodes.contains(&src)
                        && nodes.contains(&dst)
                        && src != dst
                        && (sport == PORT || dport == PORT),
                    "an IPv4 packet on the link that is not a tunnel datagram: proto {} {src}:{sport} -> {dst}:{dport}",
                    ip[9]
                );
                tunnel += 1;
            }
            0x0806 => {}
            0x86dd => {
                let src = &f[22..38];
                assert!(
                    src[0] == 0xfe && src[1] & 0xc0 == 0x80 || src.iter().all(|b| *b == 0),
                    "an IPv6 packet on the link from a routable address"
                );
            }
            other => panic!("a frame of ethertype {other:#06x} on the link"),
        }
    }
    tunnel
}

/// The three markers, from node 1's pods to node 2's: (TCP echoed, UDP echoed, ICMP answered);
/// the TCP connection is given `timeout`.
fn exchange(tb: &Testbed, timeout: Duration) -> (bool, bool, bool) {
    let tcp = tcp_marker(tb, "frontend-1", "backend-2", 8080, timeout).is_ok();
    let udp = udp_marker(tb, "frontend-1", "backend-2", 8125);
    let icmp = ping_marker(&tb.workload("frontend-1").ns, tb.workload("external-2").ip);
    (tcp, udp, icmp)
}

// --- the tests ----------------------------------------------------------------------------------

fn encrypted_between_nodes(mode: Mode) {
    let tb = builder(agents(mode, true)).build();
    // The plans reach the tunnels shortly after the node lists: wait for the sessions' peers.
    for (node, other) in [(1, "node-n2"), (2, "node-n1")] {
        wait_tunnel(&tb, node, "the peer", |t| peer(t, other).is_some());
    }
    // No address on the device, not even IPv6 link-local: the kernel sends nothing into it.
    let dev = testbed::run(&["ip", "-n", &tb.nodes[0], "addr", "show", "dev", "tsr-wg0"]);
    assert!(!dev.contains("inet"), "{dev}");
    let capture = capture(&tb.nodes[0], "uplink", tb.dir());
    let started = Instant::now();
    let (tcp, udp, icmp) = exchange(&tb, OK_TIMEOUT);
    assert!(
        tcp && udp && icmp,
        "tcp {tcp} udp {udp} icmp {icmp}\n{}",
        tb.agent_logs()
    );
    // NetworkPolicy through the tunnel: the database admits backends only (its SYN is dropped
    // by node 2's agent); the frontend reached the backend above.
    let denied = tb.connect("frontend-1", "db-2", 5432, DENIED_TIMEOUT);
    assert!(denied.is_err(), "frontend-1 -> db-2:5432 must be refused");
    // The node's own traffic to the other node's pods (source: its address in its own pod
    // range, which the peer accepts).
    assert!(
        ping_marker(&tb.nodes[0], tb.workload("external-2").ip),
        "node 1 itself reaches a pod of node 2\n{}",
        tb.agent_logs()
    );
    let frames = capture.stop();
    let nodes = [tb.node_addr(1), tb.node_addr(2)];
    assert_no_marker(&frames);
    let tunnel = only_tunnel_datagrams(&frames, nodes);
    assert!(tunnel >= 6, "{tunnel} tunnel datagrams on the link");
    eprintln!(
        "{mode:?}: {} frames on the link, {tunnel} tunnel datagrams, no marker; exchange {:?}",
        frames.len(),
        started.elapsed()
    );

    // Status: the peer, a recent handshake, bytes both ways; no node left out.
    for (node, other) in [(1, "node-n2"), (2, "node-n1")] {
        let t = wait_tunnel(&tb, node, "bytes both ways", |t| {
            peer(t, other)
                .is_some_and(|p| p["rxBytes"].as_u64() > Some(0) && p["txBytes"].as_u64() > Some(0))
        });
        let p = peer(&t, other).unwrap();
        let age = p["handshakeAgeSeconds"].as_f64().expect("a handshake");
        assert!(age < 30.0, "handshake {age} s ago");
        assert!(p["handshakes"].as_u64() >= Some(1));
        assert_eq!(
            p["endpoint"],
            format!("{}:{PORT}", tb.node_addr(if node == 1 { 2 } else { 1 }))
        );
        assert!(t["notPeers"].as_object().unwrap().is_empty(), "{t:#}");
        // Nothing dropped for want of a peer: the kernel sends nothing of its own into the
        // device (no IPv6 link-local address on it).
        assert!(t["dropped"].as_object().unwrap().is_empty(), "{t:#}");
        assert_eq!(t["device"], "tsr-wg0");
    }
    let m = tb.agent(1).metrics();
    let bytes = m.sum_with_label("peer", "node-n2");
    assert!(
        bytes > 0.0,
        "tessera_tunnel_*{{peer=\"node-n2\"}}:\n{}",
        m.text
    );
    assert!(m.text.contains("tessera_tunnel_up 1"), "{}", m.text);
    // The operator's view.
    let out = Command::new("ip")
        .args(["netns", "exec", &tb.nodes[0], TESSERA, "status"])
        .args(["--addr", &tb.agent(1).metrics_addr().to_string()])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "tessera status: {out:?}");
    assert!(
        text.contains("TUNNEL tsr-wg0") && text.contains("node-n2") && text.contains("s ago"),
        "{text}"
    );
    eprintln!("{text}");

    // SIGTERM: the device, its routes and the rule are gone.
    let mut tb = tb;
    let st = tb.agent_mut(1).terminate();
    assert!(st.success(), "agent 1 exit: {st}\n{}", tb.agent_logs());
    let n1 = tb.nodes[0].clone();
    assert!(
        !run_status(&["ip", "-n", &n1, "link", "show", "tsr-wg0"])
            .status
            .success()
    );
    let rules = testbed::run(&["ip", "-n", &n1, "rule", "show"]);
    assert!(!rules.contains("51871"), "{rules}");
    let routes = run_status(&["ip", "-n", &n1, "route", "show", "table", "51871"]);
    assert!(String::from_utf8_lossy(&routes.stdout).trim().is_empty());
}

#[test]
fn netns_encrypt_psk_payloads_cross_encrypted_and_policy_holds() {
    if skip("netns_encrypt_psk_payloads_cross_encrypted_and_policy_holds") {
        return;
    }
    encrypted_between_nodes(Mode::Psk);
}

#[test]
fn netns_encrypt_pki_payloads_cross_encrypted_and_policy_holds() {
    if skip("netns_encrypt_pki_payloads_cross_encrypted_and_policy_holds") {
        return;
    }
    encrypted_between_nodes(Mode::Pki);
}

/// Without `--encrypt` the same exchange shows every marker on the link: the capture sees
/// what crosses it.
#[test]
fn netns_encrypt_off_the_payloads_cross_in_clear() {
    if skip("netns_encrypt_off_the_payloads_cross_in_clear") {
        return;
    }
    let tb = builder(agents(Mode::Psk, false)).build();
    let capture = capture(&tb.nodes[0], "uplink", tb.dir());
    let (tcp, udp, icmp) = exchange(&tb, OK_TIMEOUT);
    assert!(
        tcp && udp && icmp,
        "tcp {tcp} udp {udp} icmp {icmp}\n{}",
        tb.agent_logs()
    );
    let frames = capture.stop();
    for (name, m) in [
        ("TCP", TCP_MARKER),
        ("UDP", UDP_MARKER),
        ("ICMP", ICMP_MARKER),
    ] {
        assert!(contains(&frames, m), "the {name} marker not seen in clear");
    }
    assert!(
        status(&tb, 1).get("tunnel").is_none(),
        "no tunnel without --encrypt"
    );
    assert!(
        !run_status(&["ip", "-n", &tb.nodes[0], "link", "show", "tsr-wg0"])
            .status
            .success()
    );
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// Node 2 gets its certificate from another CA (written before the agents start): node 1
/// trusts no key for it, and node 2, which believes in node 1's real public key (public, from
/// its annotation) through a certificate of its own CA, tries handshakes that node 1 refuses.
fn rogue_node_2(tb: &Testbed) {
    use identity::testing::SeededRng;
    use identity::{CertificateAuthority, NodeCertificate};
    let d = tb.dir();
    let n1_cert =
        NodeCertificate::from_pem(&std::fs::read_to_string(d.join("keys-n1/node-n1.crt")).unwrap())
            .unwrap();
    let mut rng = SeededRng::new(b"netns-encrypt-rogue-ca");
    let now = unix_ms();
    let (from, to) = (now - 3_600_000, now + 86_400_000);
    let rogue_ca = CertificateAuthority::generate(&mut rng, "rogue-ca", from, to).unwrap();
    let n2 = rogue_ca.issue_node(&mut rng, "node-n2", from, to).unwrap();
    std::fs::write(d.join("keys-n2/ca.crt"), rogue_ca.certificate_pem()).unwrap();
    std::fs::write(d.join("keys-n2/node-n2.crt"), n2.certificate().to_pem()).unwrap();
    std::fs::write(
        d.join("keys-n2/node-n2.key"),
        n2.private_key_pem().unwrap().as_bytes(),
    )
    .unwrap();
    let n1_by_rogue = rogue_ca
        .issue_for_key(&mut rng, "node-n1", n1_cert.x25519_public(), from, to)
        .unwrap();
    std::fs::create_dir_all(d.join("peers-n2")).unwrap();
    std::fs::write(d.join("peers-n2/node-n1.crt"), n1_by_rogue.to_pem()).unwrap();
    // Node 1 knows no certificate of node 2.
    std::fs::create_dir_all(d.join("peers-n1")).unwrap();
}

#[test]
fn netns_encrypt_pki_a_node_of_another_ca_gets_no_session_and_nothing_in_clear() {
    let test = "netns_encrypt_pki_a_node_of_another_ca_gets_no_session_and_nothing_in_clear";
    if skip(test) {
        return;
    }
    let tb = builder(agents(Mode::Pki, true))
        .before_agents(rogue_node_2)
        .build();
    let t1 = wait_tunnel(&tb, 1, "node-n2 refused", |t| {
        t["notPeers"]["node-n2"].is_string()
    });
    assert!(
        t1["notPeers"]["node-n2"]
            .as_str()
            .unwrap()
            .contains("no trusted tunnel key"),
        "{t1:#}"
    );
    assert!(t1["peers"].as_array().unwrap().is_empty(), "{t1:#}");
    wait_tunnel(&tb, 2, "node-n1 as the rogue's peer", |t| {
        peer(t, "node-n1").is_some()
    });

    let capture = capture(&tb.nodes[0], "uplink", tb.dir());
    // Node 1 -> node 2: the pod range of a node without a trusted key is routed into the
    // tunnel and dropped there.
    let (tcp, udp, icmp) = exchange(&tb, DENIED_TIMEOUT);
    assert!(!tcp && !udp && !icmp, "tcp {tcp} udp {udp} icmp {icmp}");
    // Node 2 -> node 1: the rogue encrypts for node 1's real key, node 1 refuses its
    // handshakes. (frontend-1 admits External pods on its http port.)
    let dst = SocketAddr::new(tb.workload("frontend-1").ip.into(), 80);
    testbed::in_netns(&tb.workload("external-2").ns, move || {
        let s = UdpSocket::bind(("0.0.0.0", 0)).unwrap();
        for _ in 0..3 {
            s.send_to(UDP_MARKER, dst).unwrap();
            std::thread::sleep(Duration::from_millis(300));
        }
    });
    assert!(tcp_marker(&tb, "external-2", "frontend-1", 80, DENIED_TIMEOUT).is_err());
    let frames = capture.stop();
    assert_no_marker(&frames);
    let tunnel = only_tunnel_datagrams(&frames, [tb.node_addr(1), tb.node_addr(2)]);
    assert!(
        tunnel >= 1,
        "the rogue's handshake initiations are on the link"
    );

    // Node 1 counted both: packets to the rogue's pods (no peer), its handshakes (unknown key).
    let start = Instant::now();
    loop {
        let m = tb.agent(1).metrics();
        let value = |reason: &str| {
            m.samples
                .iter()
                .find(|s| {
                    s.name == "tessera_tunnel_dropped_total"
                        && s.labels.iter().any(|(k, v)| k == "reason" && v == reason)
                })
                .map_or(0.0, |s| s.value)
        };
        let (no_peer, unknown_key) = (value("no_peer"), value("unknown_key"));
        if no_peer >= 1.0 && unknown_key >= 1.0 {
            eprintln!("node 1 dropped: no_peer {no_peer}, unknown_key {unknown_key}");
            break;
        }
        assert!(
            start.elapsed() < WAIT,
            "node 1 dropped no_peer {no_peer}, unknown_key {unknown_key}\n{}",
            tb.agent_logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // No session on either side.
    let t2 = status(&tb, 2)["tunnel"].clone();
    let p = peer(&t2, "node-n1").unwrap();
    assert_eq!(p["handshakes"], 0, "{t2:#}");
    assert!(p["handshakeAgeSeconds"].is_null(), "{t2:#}");
}

/// `--encrypt` whose tunnel cannot start (its UDP port taken; a device name that is not a
/// TUN device's): the agent exits at once, naming the flag and the cause, and leaves nothing.
#[test]
fn netns_encrypt_the_agent_refuses_to_run_without_its_tunnel() {
    let test = "netns_encrypt_the_agent_refuses_to_run_without_its_tunnel";
    if !testbed::privileged(test) {
        return;
    }
    // Two bare node namespaces; nothing else.
    let tb = Testbed::builder().build();
    let ns = tb.nodes[0].clone();
    let d = tb.dir();
    std::fs::write(d.join("inventory.yaml"), "workloads: []\n").unwrap();
    std::fs::write(
        d.join("psk"),
        "c1a3f0e2d9b85764a0b1c2d3e4f5a6b7-tessera-test\n",
    )
    .unwrap();
    let agent = |extra: &[&str]| {
        let started = Instant::now();
        let out = Command::new("ip")
            .args([
                "netns",
                "exec",
                &ns,
                TESSERA,
                "run",
                "--node-name",
                "node-n1",
            ])
            .arg("--inventory")
            .arg(d.join("inventory.yaml"))
            .arg("--psk-file")
            .arg(d.join("psk"))
            .args(["--metrics-addr", "off", "--encrypt"])
            .args(extra)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "the agent took {:?} to give up",
            started.elapsed()
        );
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };

    // The tunnel's port is taken (an IPv4 socket: the tunnel's [::] is dual-stack).
    let (held_tx, held_rx) = std::sync::mpsc::channel();
    let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
    let holder = testbed::spawn_in_netns(&ns, move || {
        let s = UdpSocket::bind(("0.0.0.0", PORT)).unwrap();
        held_tx.send(()).unwrap();
        let _ = release_rx.recv();
        drop(s);
    });
    held_rx.recv().unwrap();
    let (code, stderr) = agent(&[]);
    release_tx.send(()).unwrap();
    holder.join().unwrap();
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains("--encrypt: the tunnel cannot start")
            && stderr.contains(&format!("UDP port {PORT}"))
            && stderr.contains("Address already in use"),
        "{stderr}"
    );

    // A device name taken by a device that is not a TUN device.
    let (code, stderr) = agent(&["--tunnel-device", "lo"]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains("--encrypt: the tunnel cannot start") && stderr.contains("TUN device lo"),
        "{stderr}"
    );
    eprintln!("{stderr}");

    // Nothing left behind: no device, no rule.
    let links = testbed::run(&["ip", "-n", &ns, "link", "show"]);
    assert!(!links.contains("tsr-wg0"), "{links}");
    let rules = testbed::run(&["ip", "-n", &ns, "rule", "show"]);
    assert!(!rules.contains("51871"), "{rules}");
}

/// The agent of node 1 killed with SIGKILL under an established cross-node connection: while
/// it is down nothing of that connection crosses the link in clear (its tunnel's blackhole
/// routes outlive it), and once it is restarted (same key) the connection carries on.
#[test]
fn netns_encrypt_agent_killed_with_sigkill_fails_closed_and_the_established_flow_survives() {
    let test =
        "netns_encrypt_agent_killed_with_sigkill_fails_closed_and_the_established_flow_survives";
    if skip(test) {
        return;
    }
    let mut tb = builder(agents(Mode::Psk, true)).build();
    for (node, other) in [(1, "node-n2"), (2, "node-n1")] {
        wait_tunnel(&tb, node, "the peer", |t| peer(t, other).is_some());
    }
    let mut s = tb
        .connect("frontend-1", "backend-2", 8080, OK_TIMEOUT)
        .unwrap_or_else(|e| panic!("frontend-1 -> backend-2:8080: {e}\n{}", tb.agent_logs()));
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let round_trip = |s: &mut std::net::TcpStream, msg: &[u8]| {
        s.write_all(msg).unwrap();
        let mut back = vec![0u8; msg.len()];
        s.read_exact(&mut back).unwrap();
        assert_eq!(back, msg);
    };
    round_trip(&mut s, b"before the kill");

    tb.agent_mut(1).kill9();
    let routes = testbed::run(&[
        "ip",
        "-n",
        &tb.nodes[0],
        "-4",
        "route",
        "show",
        "table",
        "51871",
    ]);
    assert!(
        !routes.is_empty() && routes.lines().all(|l| l.starts_with("blackhole ")),
        "after the kill, table 51871 must hold the blackholes only:\n{routes}"
    );
    let capture = capture(&tb.nodes[0], "uplink", tb.dir());
    s.write_all(TCP_MARKER).unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    let frames = capture.stop();
    assert!(
        !contains(&frames, TCP_MARKER),
        "the marker crossed in clear with the agent dead"
    );

    let down = Instant::now();
    tb.restart_agent(1);
    let mut back = vec![0u8; TCP_MARKER.len()];
    s.read_exact(&mut back).unwrap_or_else(|e| {
        panic!(
            "the connection did not survive the restart: {e}\n{}",
            tb.agent_logs()
        )
    });
    assert_eq!(back, TCP_MARKER);
    eprintln!(
        "{test}: the write made while the agent was dead echoed {:?} after the restart began",
        down.elapsed()
    );
    round_trip(&mut s, b"after the restart");
}

// --- workloads that require encryption ----------------------------------------------------------

/// Node `node`'s flow records with `reason` (waits up to 5 s for at least `at_least`).
fn records_with_reason(tb: &Testbed, node: u8, reason: &str, at_least: usize) -> Vec<Value> {
    let start = Instant::now();
    loop {
        let body = tb.agent(node).get("/flows?last=500").unwrap_or_default();
        let found: Vec<Value> = body
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|r| r["reason"] == reason)
            .collect();
        if found.len() >= at_least || start.elapsed() > Duration::from_secs(5) {
            return found;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `ip rule` in `ns` that sends traffic to `workload`'s /24 through the `main` table, before
/// the tunnel's rule: as a network plugin's own rule, or a tampered node, would; the traffic
/// then leaves in clear over the plugin's routes.
fn bypass_tunnel(tb: &Testbed, ns: &str, workload: &str, verb: &str) {
    let o = tb.workload(workload).ip.octets();
    let prefix = format!("{}.{}.{}.0/24", o[0], o[1], o[2]);
    testbed::run(&[
        "ip", "-n", ns, "rule", verb, "pref", "100", "to", &prefix, "lookup", "main",
    ]);
}

/// backend-2 requires encryption. Through the tunnel it is reached as before. When node 1
/// sends its traffic in clear (a rule before the tunnel's), node 2 drops TCP, UDP and ICMP to
/// backend-2 and records each as `not_encrypted`, while the same clear path still reaches a
/// workload that does not require encryption; when node 2's own route to node 1's pods skips
/// the tunnel, backend-2's answers are refused on their way out (egress). Lifting the
/// requirement (the inventory reloaded) lets the clear path through again. SIGTERM removes the
/// guard's rules.
#[test]
fn netns_encrypt_a_workload_that_requires_encryption_refuses_what_bypasses_the_tunnel() {
    let test = "netns_encrypt_a_workload_that_requires_encryption_refuses_what_bypasses_the_tunnel";
    if skip(test) {
        return;
    }
    let mut tb = Testbed::builder()
        .policies(&policies())
        .workload(WorkloadSpec::new("frontend-1", 1, "WebFrontend").port(Some("http"), 80))
        .workload(
            WorkloadSpec::new("backend-2", 2, "BusinessBackend")
                .port(Some("api"), 8080)
                .require_encryption(),
        )
        .workload(WorkloadSpec::new("db-2", 2, "Database").port(None, 5432))
        .workload(WorkloadSpec::new("external-2", 2, "External").unenforced())
        .agents(agents(Mode::Psk, true))
        .build();
    for (node, other) in [(1, "node-n2"), (2, "node-n1")] {
        wait_tunnel(&tb, node, "the peer", |t| peer(t, other).is_some());
    }
    // The addresses are shown once the rules guarding them are in.
    let backend = tb.workload("backend-2").ip;
    let start = Instant::now();
    while status(&tb, 2)["encryptionGuard"]["addresses"] != serde_json::json!([backend.to_string()])
    {
        assert!(start.elapsed() < WAIT, "{:#}", status(&tb, 2));
        std::thread::sleep(Duration::from_millis(50));
    }
    let guard = status(&tb, 2)["encryptionGuard"].clone();
    assert_eq!(
        guard["workloads"],
        serde_json::json!(["shop/backend-2"]),
        "{guard:#}"
    );
    let n1 = tb.pod_cidrs(1);
    assert_eq!(guard["remotePrefixes"], serde_json::json!(n1), "{guard:#}");
    assert!(
        status(&tb, 1).get("encryptionGuard").is_none(),
        "node 1 guards nothing: nothing installed"
    );

    // Through the tunnel: all three as before.
    assert_eq!(
        exchange(&tb, OK_TIMEOUT),
        (true, true, true),
        "{}",
        tb.agent_logs()
    );

    // Node 1 sends to node 2's pods in clear.
    let (node1, node2) = (tb.nodes[0].clone(), tb.nodes[1].clone());
    bypass_tunnel(&tb, &node1, "backend-2", "add");
    bypass_tunnel(&tb, &node1, "external-2", "add");
    let capture = capture(&node1, "uplink", tb.dir());
    let frontend = tb.workload("frontend-1").ns.clone();
    let tcp = tcp_marker(&tb, "frontend-1", "backend-2", 8080, DENIED_TIMEOUT);
    let udp = udp_marker(&tb, "frontend-1", "backend-2", 8125);
    let icmp = ping_marker(&frontend, backend);
    let control = ping_marker(&frontend, tb.workload("external-2").ip);
    let frames = capture.stop();
    assert!(
        contains(&frames, ICMP_MARKER),
        "the bypass did send in clear (else this test proves nothing)"
    );
    assert!(
        control,
        "in clear, a workload that does not require encryption is reached\n{}",
        tb.agent_logs()
    );
    assert!(
        tcp.is_err() && !udp && !icmp,
        "tcp {tcp:?}, udp {udp}, icmp {icmp}"
    );
    let records = records_with_reason(&tb, 2, "not_encrypted", 3);
    for protocol in ["TCP", "UDP", "ICMP"] {
        let r = records
            .iter()
            .find(|r| r["protocol"] == protocol)
            .unwrap_or_else(|| panic!("no not_encrypted {protocol} record: {records:#?}"));
        assert_eq!(r["direction"], "ingress", "{r}");
        assert_eq!(r["destination"]["workload"], "backend-2", "{r}");
        assert_eq!(
            r["source"]["ip"],
            tb.workload("frontend-1").ip.to_string(),
            "{r}"
        );
        assert_eq!(r["verdict"], "denied", "{r}");
    }
    let m = tb.agent(2).metrics();
    assert!(
        m.sum_with_label("reason", "not_encrypted") >= 3.0,
        "tessera_packets_rejected_total{{reason=\"not_encrypted\"}}"
    );

    // Node 1 back on the tunnel; node 2's way back to node 1's pods skips it: backend-2's
    // SYN-ACK is refused on its way out.
    bypass_tunnel(&tb, &node1, "backend-2", "del");
    bypass_tunnel(&tb, &node1, "external-2", "del");
    bypass_tunnel(&tb, &node2, "frontend-1", "add");
    let before = records_with_reason(&tb, 2, "not_encrypted", 0).len();
    assert!(
        tcp_marker(&tb, "frontend-1", "backend-2", 8080, DENIED_TIMEOUT).is_err(),
        "backend-2 answered in clear"
    );
    let records = records_with_reason(&tb, 2, "not_encrypted", before + 1);
    let egress = records
        .iter()
        .find(|r| r["direction"] == "egress")
        .unwrap_or_else(|| panic!("no egress not_encrypted record: {records:#?}"));
    assert_eq!(egress["source"]["workload"], "backend-2", "{egress}");
    assert_eq!(
        egress["destination"]["ip"],
        tb.workload("frontend-1").ip.to_string()
    );

    // The requirement lifted: the clear way back works again.
    tb.set_require_encryption("backend-2", false);
    let start = Instant::now();
    while tcp_marker(&tb, "frontend-1", "backend-2", 8080, DENIED_TIMEOUT).is_err() {
        assert!(
            start.elapsed() < WAIT,
            "the requirement lifted, backend-2 is still refused\n{}",
            tb.agent_logs()
        );
    }
    assert_eq!(
        status(&tb, 2)["encryptionGuard"]["addresses"],
        serde_json::json!([])
    );
    bypass_tunnel(&tb, &node2, "frontend-1", "del");

    let st = tb.agent_mut(2).terminate();
    assert!(st.success(), "agent 2 exit: {st}\n{}", tb.agent_logs());
    for save in ["iptables-save", "ip6tables-save"] {
        let rules = testbed::run(&["ip", "netns", "exec", &node2, save, "-t", "mangle"]);
        assert!(!rules.contains("TESSERA-ENCRYPTED"), "{save}: {rules}");
    }
}

/// Without `--encrypt` nothing crosses between nodes encrypted: a workload that requires
/// encryption is reached from its own node only (and records the refusals), while the others
/// talk across nodes as before.
#[test]
fn netns_encrypt_off_a_workload_that_requires_encryption_is_reached_from_its_own_node_only() {
    let test =
        "netns_encrypt_off_a_workload_that_requires_encryption_is_reached_from_its_own_node_only";
    if skip(test) {
        return;
    }
    let tb = Testbed::builder()
        .policies(&policies())
        .workload(WorkloadSpec::new("frontend-1", 1, "WebFrontend").port(Some("http"), 80))
        .workload(
            WorkloadSpec::new("backend-2", 2, "BusinessBackend")
                .port(Some("api"), 8080)
                .require_encryption(),
        )
        .workload(WorkloadSpec::new("db-2", 2, "Database").port(None, 5432))
        .workload(WorkloadSpec::new("external-2", 2, "External").unenforced())
        .agents(agents(Mode::Psk, false))
        .build();
    // The guard is up once node 2 knows node 1's pods.
    let start = Instant::now();
    while status(&tb, 2)["encryptionGuard"]["remotePrefixes"] != serde_json::json!(tb.pod_cidrs(1))
    {
        assert!(start.elapsed() < WAIT, "{:#}", status(&tb, 2));
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        tcp_marker(&tb, "frontend-1", "backend-2", 8080, DENIED_TIMEOUT).is_err(),
        "backend-2 was reached in clear from node 1"
    );
    let records = records_with_reason(&tb, 2, "not_encrypted", 1);
    assert!(
        records
            .iter()
            .any(|r| r["protocol"] == "TCP" && r["direction"] == "ingress"),
        "{records:#?}"
    );
    tcp_marker(&tb, "backend-2", "db-2", 5432, OK_TIMEOUT).unwrap_or_else(|e| {
        panic!(
            "backend-2 -> db-2 on the same node: {e}\n{}",
            tb.agent_logs()
        )
    });
    assert!(
        ping_marker(&tb.workload("frontend-1").ns, tb.workload("external-2").ip),
        "a workload that does not require encryption is reached across nodes"
    );
}

/// Byte `i` of the long transfer: period 251, so a lost, repeated or reordered chunk shows.
fn pattern(i: u64) -> u8 {
    (i % 251) as u8
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Node 2's credentials rotated in the middle of a long transfer between a pod of node 1 and a
/// pod of node 2 (through the tunnel, both ways: the echo server sends everything back): a
/// fresh `tessera pki issue-node` certificate and key written over node 2's `--node-cert` /
/// `--node-key`, and the certificate into the peer certificate directory node 1 reads. The
/// transfer completes with every byte right; node 1's tunnel then has node 2's new key; a new
/// connection works (tokens under node 2's new key accepted). The longest gap in the echoed
/// stream around the rotation is printed.
#[test]
fn netns_encrypt_pki_key_rotation_keeps_a_long_transfer_alive() {
    let test = "netns_encrypt_pki_key_rotation_keeps_a_long_transfer_alive";
    if skip(test) {
        return;
    }
    rotation_under_transfer(test, PeerCopy::After(Duration::ZERO));
}

/// The same with node 1's copy of the new certificate written 1 s after node 2's files (the
/// largest offset between two agents' once-a-second polls): the gap node 1 is without node
/// 2's new key.
#[test]
fn netns_encrypt_pki_key_rotation_with_the_peer_a_second_late_keeps_the_transfer_alive() {
    let test =
        "netns_encrypt_pki_key_rotation_with_the_peer_a_second_late_keeps_the_transfer_alive";
    if skip(test) {
        return;
    }
    rotation_under_transfer(test, PeerCopy::After(Duration::from_secs(1)));
}

/// The other order: node 1's copy of the new certificate written 1 s before node 2's files.
/// Node 1 has node 2's new key first, and its initiation under it reaches node 2 while node 2
/// still has its old key (dropped there). The tunnel must not wait for node 1's retry
/// (WireGuard's 5 s): node 2 starts a handshake as soon as its key is replaced.
#[test]
fn netns_encrypt_pki_key_rotation_with_the_peer_a_second_early_keeps_the_transfer_alive() {
    let test =
        "netns_encrypt_pki_key_rotation_with_the_peer_a_second_early_keeps_the_transfer_alive";
    if skip(test) {
        return;
    }
    rotation_under_transfer(test, PeerCopy::Before(Duration::from_secs(1)));
}

/// When node 1's peer directory gets node 2's new certificate, against node 2's own files.
#[derive(Debug, Clone, Copy)]
enum PeerCopy {
    After(Duration),
    Before(Duration),
}

fn rotation_under_transfer(test: &str, peer_copy: PeerCopy) {
    use identity::NodeCertificate;
    let tb = builder(agents(Mode::Pki, true)).build();
    for (node, other) in [(1, "node-n2"), (2, "node-n1")] {
        wait_tunnel(&tb, node, "the peer", |t| peer(t, other).is_some());
    }
    let d = tb.dir().to_owned();
    let old_cert =
        NodeCertificate::from_pem(&std::fs::read_to_string(d.join("keys-n2/node-n2.crt")).unwrap())
            .unwrap();
    let old_key = hex(old_cert.x25519_public());

    const CHUNK: usize = 4096;
    const STREAM: Duration = Duration::from_secs(8);
    const ROTATE_AT: Duration = Duration::from_millis(2500);
    let mut s = tb
        .connect("frontend-1", "backend-2", 8080, OK_TIMEOUT)
        .unwrap_or_else(|e| panic!("frontend-1 -> backend-2:8080: {e}\n{}", tb.agent_logs()));
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let mut w = s.try_clone().unwrap();
    let start = Instant::now();
    // The writer: CHUNK bytes every 5 ms (about 800 KB/s) for STREAM. A write blocked for
    // OK_TIMEOUT (the connection's write timeout) ends the transfer both ways, so that the
    // reader stops at once and the writer's error is the one reported.
    let writer = std::thread::spawn(move || -> Result<u64, String> {
        let mut sent: u64 = 0;
        let mut buf = vec![0u8; CHUNK];
        while start.elapsed() < STREAM {
            for (j, b) in buf.iter_mut().enumerate() {
                *b = pattern(sent + j as u64);
            }
            if let Err(e) = w.write_all(&buf) {
                let _ = w.shutdown(std::net::Shutdown::Both);
                return Err(format!(
                    "a write was blocked for {OK_TIMEOUT:?} (no room in the send buffer: \
                     nothing acknowledged) after {sent} bytes, at {:?}: {e}",
                    start.elapsed()
                ));
            }
            sent += CHUNK as u64;
            std::thread::sleep(Duration::from_millis(5));
        }
        w.shutdown(std::net::Shutdown::Write)
            .map_err(|e| format!("shutdown: {e}"))?;
        Ok(sent)
    });
    // The rotation, on its own thread at ROTATE_AT.
    let rotation = {
        let d = d.clone();
        std::thread::spawn(move || {
            let rot = d.join("rotated-n2");
            let rot_s = rot.to_str().unwrap().to_owned();
            let ca = d.join("ca");
            testbed::run(&[
                TESSERA,
                "pki",
                "issue-node",
                "--ca",
                ca.to_str().unwrap(),
                "--node",
                "node-n2",
                "--out",
                &rot_s,
            ]);
            let cert = std::fs::read(rot.join("node-n2.crt")).unwrap();
            let key = std::fs::read(rot.join("node-n2.key")).unwrap();
            std::thread::sleep(ROTATE_AT.saturating_sub(start.elapsed()));
            let at = start.elapsed();
            // Written in place, one file after the other, as `cp` would.
            let write_own = || {
                std::fs::write(d.join("keys-n2/node-n2.crt"), &cert).unwrap();
                std::fs::write(d.join("keys-n2/node-n2.key"), &key).unwrap();
            };
            let write_peer_copy = || std::fs::write(d.join("peers/node-n2.crt"), &cert).unwrap();
            match peer_copy {
                PeerCopy::After(delay) => {
                    write_own();
                    std::thread::sleep(delay);
                    write_peer_copy();
                }
                PeerCopy::Before(delay) => {
                    write_peer_copy();
                    std::thread::sleep(delay);
                    write_own();
                }
            }
            (
                at,
                NodeCertificate::from_pem(&String::from_utf8(cert).unwrap()).unwrap(),
            )
        })
    };
    // The reader: every echoed byte checked, and the longest time between two reads.
    let mut received: u64 = 0;
    let mut buf = vec![0u8; 65536];
    let mut last = Instant::now();
    let (mut gap, mut gap_at) = (Duration::ZERO, Duration::ZERO);
    let read_error = loop {
        let n = match s.read(&mut buf) {
            Ok(0) => break None,
            Ok(n) => n,
            Err(e) => break Some((e, start.elapsed())),
        };
        let now = Instant::now();
        if now - last > gap {
            gap = now - last;
            gap_at = last - start;
        }
        last = now;
        for (j, b) in buf[..n].iter().enumerate() {
            let i = received + j as u64;
            assert_eq!(*b, pattern(i), "byte {i} of the transfer is wrong");
        }
        received += n as u64;
    };
    let sent = writer.join().unwrap().unwrap_or_else(|e| {
        panic!(
            "the transfer broke: {e}; {received} bytes came back\n{}",
            tb.agent_logs()
        )
    });
    if let Some((e, at)) = read_error {
        panic!(
            "the transfer broke after {received} bytes came back ({at:?}): {e}\n{}",
            tb.agent_logs()
        );
    }
    let (rotated_at, new_cert) = rotation.join().unwrap();
    let took = start.elapsed();
    assert_eq!(received, sent, "every byte sent came back");
    let new_key = hex(new_cert.x25519_public());
    assert_ne!(new_key, old_key);
    eprintln!(
        "{test}: {sent} bytes each way in {took:?}, every byte right; rotation written at {rotated_at:?}; \
         node 1's copy: {peer_copy:?}; longest gap in the echoed stream {gap:?} (from {gap_at:?})"
    );
    assert!(
        gap_at + gap >= rotated_at || gap < Duration::from_millis(500),
        "the longest gap ({gap:?} at {gap_at:?}) is not around the rotation ({rotated_at:?})"
    );

    // Node 1's tunnel has node 2's new key, node 2's its own new one.
    let t1 = wait_tunnel(&tb, 1, "node-n2's new key", |t| {
        peer(t, "node-n2").is_some_and(|p| p["publicKey"] == new_key.as_str())
    });
    wait_tunnel(&tb, 2, "its own new key", |t| {
        t["publicKey"] == new_key.as_str()
    });
    let p = peer(&t1, "node-n2").unwrap();
    eprintln!("node 1's peer node-n2 after the rotation: {p:#}");
    // A new connection: tokens under node 2's new key, and node 1's checked with it.
    tcp_marker(&tb, "frontend-1", "backend-2", 8080, OK_TIMEOUT).unwrap_or_else(|e| {
        panic!(
            "a new connection after the rotation: {e}\n{}",
            tb.agent_logs()
        )
    });
    let t1 = wait_tunnel(&tb, 1, "a handshake with node 2's new key", |t| {
        peer(t, "node-n2").is_some_and(|p| p["handshakes"].as_u64() >= Some(1))
    });
    assert_eq!(peer(&t1, "node-n2").unwrap()["publicKey"], new_key.as_str());
    let logs = tb.agent_logs();
    assert!(logs.contains("node credentials rotated"), "{logs}");
}
