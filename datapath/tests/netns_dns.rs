#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The DNS answer path on the real kernel, below the agent: the rule set with
//! `dns_queue_num`, one queue socket bound to both queue numbers, and a processor learning from
//! what arrives as `Direction::DnsAnswer`. A workload netns queries a resolver netns over a veth;
//! the query's flow is marked (as the processor's verdict would), the answer comes back on the
//! DNS queue and is learnt, and a datagram from port 53 that nobody asked for arrives on the
//! ordinary queue. Needs root (tests/run.sh runs it); without root it prints a SKIP line, and
//! fails under CI=true.

use std::net::{IpAddr, Ipv4Addr, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use datapath::shell::queue::{self, Action};
use datapath::shell::rules::{self, RuleConfig};
use datapath::shell::{Direction, QueueConfig};
use datapath::{Processor, ProcessorConfig, WorkloadId};
use simple_dns::rdata::{A, RData};
use simple_dns::{CLASS, Name, Packet, QCLASS, QTYPE, Question, ResourceRecord, TYPE};

mod kernel;

use kernel::{netns, privileged};

/// The workload namespace (10.199.0.2, fd00:199::2) and the resolver's (.53, ::53), joined by
/// a veth, removed on drop. `tag`: one digit telling the tests of one process apart.
fn pair(tag: u8) -> kernel::Pair {
    kernel::Pair::new(
        "tdns",
        tag,
        &["10.199.0.2/24", "fd00:199::2/64"],
        &["10.199.0.53/24", "fd00:199::53/64"],
    )
}

fn answer(id: u16) -> Vec<u8> {
    let mut p = Packet::new_reply(id);
    p.questions.push(Question::new(
        Name::new_unchecked("www.example.com"),
        QTYPE::TYPE(TYPE::A),
        QCLASS::CLASS(CLASS::IN),
        false,
    ));
    p.answers.push(ResourceRecord::new(
        Name::new_unchecked("www.example.com"),
        CLASS::IN,
        60,
        RData::A(A {
            address: u32::from(Ipv4Addr::new(203, 0, 113, 7)),
        }),
    ));
    p.build_bytes_vec_compressed().unwrap()
}

fn processor() -> Processor {
    let key = policy::PodKey {
        namespace: "shop".into(),
        name: "web-1".into(),
    };
    let mut engine = policy::Engine::new();
    engine
        .apply_workload(policy::Workload {
            key: key.clone(),
            labels: Default::default(),
            ports: vec![],
            ips: vec![
                IpAddr::V4(Ipv4Addr::new(10, 199, 0, 2)),
                "fd00:199::2".parse().unwrap(),
            ],
            host_network: false,
        })
        .unwrap();
    let claims = identity::Claims::new(
        "shop",
        "web-1",
        Default::default(),
        engine.namespace_labels_or_default("shop"),
    )
    .unwrap();
    let psk = identity::Psk::new(b"Zq3v9Lx2Rk7Wm1Tn5Yb8Hc4Jd6Gf0Ps_E").unwrap();
    let node = identity::Node::new_psk("node-a", psk, identity::Config::default()).unwrap();
    let mut p = Processor::new(node, engine, ProcessorConfig::default());
    p.add_workload(WorkloadId(1), key, claims);
    p
}

#[test]
fn netns_dns_answers_reach_the_dns_queue_and_are_learnt_ipv4() {
    if privileged("netns_dns_answers_reach_the_dns_queue_and_are_learnt_ipv4") {
        answers_are_learnt("10.199.0.2", "10.199.0.53");
    }
}

#[test]
fn netns_dns_answers_reach_the_dns_queue_and_are_learnt_ipv6() {
    if privileged("netns_dns_answers_reach_the_dns_queue_and_are_learnt_ipv6") {
        answers_are_learnt("fd00:199::2", "fd00:199::53");
    }
}

/// The workload at `wl_ip` queries the resolver at `res_ip` (one family).
fn answers_are_learnt(wl_ip: &str, res_ip: &str) {
    let wl_ip: IpAddr = wl_ip.parse().unwrap();
    let res_ip: IpAddr = res_ip.parse().unwrap();
    let at = |ip: IpAddr, port: u16| std::net::SocketAddr::new(ip, port);
    let pair = pair(if wl_ip.is_ipv4() { 4 } else { 6 });
    let (wl, res) = (netns(&pair.a), netns(&pair.b));
    let rule_cfg = RuleConfig {
        dns_queue_num: Some(8),
        ..RuleConfig::default()
    };
    rules::install(&wl, &rule_cfg).unwrap();
    let opened = queue::open(
        &wl,
        QueueConfig {
            dns_queue_num: Some(8),
            ..QueueConfig::default()
        },
    )
    .unwrap();
    // Sockets opened inside each namespace stay there.
    let client = wl
        .run(move || UdpSocket::bind(at(wl_ip, 40000)))
        .unwrap()
        .unwrap();
    let other = wl
        .run(move || UdpSocket::bind(at(wl_ip, 40001)))
        .unwrap()
        .unwrap();
    let server = res
        .run(move || UdpSocket::bind(at(res_ip, 53)))
        .unwrap()
        .unwrap();
    for s in [&client, &other, &server] {
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    }

    let done = Arc::new(AtomicBool::new(false));
    let peers = {
        let done = done.clone();
        std::thread::spawn(move || {
            client
                .send_to(b"\x42\x42\x01\x00query", at(res_ip, 53))
                .unwrap();
            let mut buf = [0u8; 1500];
            let (n, from) = server.recv_from(&mut buf).unwrap();
            assert_eq!(&buf[..2], b"\x42\x42", "{n}");
            server.send_to(&answer(0x4242), from).unwrap();
            let (n, _) = client.recv_from(&mut buf).unwrap();
            let got = buf[..n].to_vec();
            // From port 53, but no query asked for it: it opens a flow of its own.
            server.send_to(&answer(0x4343), at(wl_ip, 40001)).unwrap();
            let (m, _) = other.recv_from(&mut buf).unwrap();
            done.store(true, Ordering::SeqCst);
            (got, m)
        })
    };

    let mut p = processor();
    let auth = p.config().auth_mark;
    let mut seen: Vec<Direction> = Vec::new();
    let rt = kernel::event_loop();
    rt.block_on(async {
        let mut q = opened.attach().unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !done.load(Ordering::SeqCst) && std::time::Instant::now() < deadline {
            let mut decide = |direction: Direction, packet: &mut Vec<u8>, _| {
                seen.push(direction);
                match direction {
                    // As the processor would for flows it allows: accept and mark.
                    Direction::Output | Direction::Input => Action {
                        mark: auth,
                        ..Action::ACCEPT
                    },
                    Direction::DnsAnswer => {
                        let v = p.learn_dns_answer(WorkloadId(1), packet, queue::unix_ms());
                        assert!(v.accept && !v.mark_authorized && !v.modified);
                        Action::ACCEPT
                    }
                    Direction::Forward => {
                        panic!("a workload namespace queues nothing from FORWARD")
                    }
                }
            };
            let batch = q.serve_batch(&mut decide);
            let _ = tokio::time::timeout(Duration::from_millis(100), batch).await;
        }
        q.unbind().unwrap();
    });
    let (got, m) = peers.join().unwrap();
    assert_eq!(
        got,
        answer(0x4242),
        "the answer reached the workload unchanged"
    );
    assert!(m > 0);
    assert_eq!(
        seen,
        [Direction::Output, Direction::DnsAnswer, Direction::Input],
        "query (OUTPUT, first of its flow), answer (DNS queue), unsolicited datagram (INPUT)"
    );
    let ext = IpAddr::V4(Ipv4Addr::new(203, 0, 113, 7));
    assert_eq!(
        p.resolved_names(WorkloadId(1), ext, queue::unix_ms()),
        ["www.example.com"]
    );
    assert_eq!(p.metrics().dns_answers("learnt"), 1);
    rules::remove(&wl).unwrap();
    drop(pair);
}
