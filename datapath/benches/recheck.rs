//! Cost of `Processor::recheck` over a full table of remembered flows (65,536, the default
//! bound) with the three-tier policies plus 1,000 others: the time the processor's lock is held
//! after a policy change, during which no queued packet is decided.
//!
//! Run: cargo bench -p tessera-datapath --bench recheck -- --warm-up-time 1 --measurement-time 3
//!
//! The flows are real: 65,536 PSK handshakes between two in-memory nodes (about 1 s of setup).
//! The server's engine also knows the client pod, so every verified peer is judged twice (as it
//! proved itself, and with its current labels), as in a cluster-wide view. Criterion measures
//! a recheck that cuts nothing (repeatable); the bench then prints the one-shot time of the
//! recheck that cuts every flow after the database's policy is replaced.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "fixture/mod.rs"]
mod fixture;

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Instant;

use common::*;
use criterion::{Criterion, criterion_group, criterion_main};
use datapath::{Hook, Processor, ProcessorConfig, WorkloadId};
use fixture::{CLIENT, SERVER, policies};
use identity::testing::SeededRng;

const ID: WorkloadId = WorkloadId(1);
const FLOWS: usize = 65_536;

/// Client and server nodes with `FLOWS` authorized flows each.
fn world() -> (Processor, Processor) {
    let (na, nb) = nodes(Mode::Psk, "recheck");
    let yaml = policies();
    let mut a = processor(na, &yaml, &[&CLIENT], ProcessorConfig::default());
    // The client workload sends from two addresses (its own: the source check).
    let mut client = CLIENT.workload();
    client.ips.push(IpAddr::V4(Ipv4Addr::new(10, 0, 1, 3)));
    a.engine_mut().apply_workload(client).unwrap();
    let mut b = processor(nb, &yaml, &[&SERVER], ProcessorConfig::default());
    b.engine_mut().apply_workload(CLIENT.workload()).unwrap();
    let mut rng = SeededRng::new(b"recheck");
    let mut now = NOW;
    let s = SocketAddr::new(SERVER.ip, 5432);
    for i in 0..FLOWS {
        now += 1;
        // Two client addresses, 32,768 ports each.
        let ip = IpAddr::V4(Ipv4Addr::new(10, 0, 1, 2 + (i / 32_768) as u8));
        let c = SocketAddr::new(ip, 1024 + (i % 32_768) as u16);
        let mut step = |p: &mut Processor, hook, pkt: &mut Vec<u8>| {
            let v = p.process(ID, hook, pkt, true, now, &mut rng);
            assert!(v.accept && v.reason.is_none(), "{v:?}");
        };
        let mut p = tcp_packet(c, s, 1000, 0, SYN, &linux_syn_options(1, 0), &[]);
        step(&mut a, Hook::Output, &mut p);
        step(&mut b, Hook::Input, &mut p);
        let mut p = tcp_packet(s, c, 9000, 1001, SYN_ACK, &linux_syn_options(2, 1), &[]);
        step(&mut b, Hook::Output, &mut p);
        step(&mut a, Hook::Input, &mut p);
        let mut p = tcp_packet(c, s, 1001, 9001, ACK, &linux_ack_options(3, 2), &[]);
        step(&mut a, Hook::Output, &mut p);
        step(&mut b, Hook::Input, &mut p);
        if i % 4096 == 0 {
            a.expire(now);
            b.expire(now);
        }
    }
    assert_eq!(a.established_count(), FLOWS);
    assert_eq!(b.established_count(), FLOWS);
    (a, b)
}

fn bench(c: &mut Criterion) {
    let (mut a, mut b) = world();
    let mut g = c.benchmark_group(format!("recheck {FLOWS} flows"));
    g.sample_size(20);
    g.bench_function(
        "server side (ingress, peer judged twice), none denied",
        |bench| bench.iter(|| assert!(black_box(b.recheck(NOW)).is_empty())),
    );
    g.bench_function("client side (egress), none denied", |bench| {
        bench.iter(|| assert!(black_box(a.recheck(NOW)).is_empty()))
    });
    g.finish();

    // The database now admits only other databases: every flow is cut.
    let deny = "apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: database, namespace: shop}
spec:
  podSelector: {matchLabels: {role: Database}}
  ingress:
  - from: [{podSelector: {matchLabels: {role: Database}}}]
";
    let parsed = policy::objects::parse("deny.yaml", deny);
    let report = policy::objects::load(b.engine_mut(), &parsed.objects);
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    let t = Instant::now();
    let cuts = b.recheck(NOW);
    let d = t.elapsed();
    assert_eq!(cuts.len(), FLOWS);
    eprintln!("\nrecheck cutting all {FLOWS} flows (one shot): {d:.2?}");
}

criterion_group!(benches, bench);
criterion_main!(benches);
