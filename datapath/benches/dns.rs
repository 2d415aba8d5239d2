//! Cost of the DNS name cache on the decision path and of learning one answer.
//!
//! Run: cargo bench -p tessera-datapath --bench dns -- --warm-up-time 1 --measurement-time 3
//!
//! - `lookup, empty cache`: what every egress decision pays while no answer was learnt.
//! - `lookup, hit` / `lookup, miss`: in a full cache (65,536 entries over 64 workloads).
//! - `parse answer`: decoding a CDN answer (a CNAME and four A records).
//! - `learn answer`: `Processor::learn_dns_answer` on that answer (packet parse, decode,
//!   five cache inserts of names already there: the steady state of repeated lookups).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

use criterion::{Criterion, criterion_group, criterion_main};
use datapath::dns::{self, CacheConfig, MAX_NAMES_PER_ADDRESS, NameCache};
use datapath::{Processor, ProcessorConfig, WorkloadId};
use simple_dns::rdata::{A, CNAME, RData};
use simple_dns::{CLASS, Name, Packet, QCLASS, QTYPE, Question, ResourceRecord, TYPE};

const NOW: u64 = 1_780_000_000_000;

fn cdn_answer() -> Vec<u8> {
    let mut p = Packet::new_reply(7);
    p.questions.push(Question::new(
        Name::new_unchecked("www.example.com"),
        QTYPE::TYPE(TYPE::A),
        QCLASS::CLASS(CLASS::IN),
        false,
    ));
    p.answers.push(ResourceRecord::new(
        Name::new_unchecked("www.example.com"),
        CLASS::IN,
        300,
        RData::CNAME(CNAME(Name::new_unchecked("edge.cdn.example.net"))),
    ));
    for i in 0..4u8 {
        p.answers.push(ResourceRecord::new(
            Name::new_unchecked("edge.cdn.example.net"),
            CLASS::IN,
            60,
            RData::A(A {
                address: u32::from(Ipv4Addr::new(203, 0, 113, i)),
            }),
        ));
    }
    p.build_bytes_vec_compressed().unwrap()
}

fn udp(payload: &[u8]) -> Vec<u8> {
    let mut p = vec![
        0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, 17, 0, 0, 10, 96, 0, 10, 10, 0, 1, 2,
    ];
    p.extend_from_slice(&53u16.to_be_bytes());
    p.extend_from_slice(&40000u16.to_be_bytes());
    p.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    p.extend_from_slice(&[0, 0]);
    p.extend_from_slice(payload);
    let len = p.len() as u16;
    p[2..4].copy_from_slice(&len.to_be_bytes());
    p
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("dns");
    let empty = NameCache::new(CacheConfig::default());
    let ip = IpAddr::V4(Ipv4Addr::new(203, 0, 113, 7));
    g.bench_function("lookup, empty cache", |b| {
        b.iter(|| {
            let mut out = [""; MAX_NAMES_PER_ADDRESS];
            black_box(empty.names(WorkloadId(1), black_box(ip), NOW, &mut out))
        })
    });
    let mut full = NameCache::new(CacheConfig::default());
    let names: Vec<Arc<str>> = (0..1024)
        .map(|i| Arc::from(format!("host-{i}.example.com").as_str()))
        .collect();
    for i in 0u32..65_536 {
        let a = IpAddr::V4(Ipv4Addr::from(0xcb00_0000 | (i / 64)));
        full.insert(
            WorkloadId(i % 64),
            a,
            &names[i as usize % 1024],
            60 + i % 600,
            NOW,
        );
    }
    assert_eq!(full.len(), 65_536);
    let hit = IpAddr::V4(Ipv4Addr::from(0xcb00_0000 | 5));
    let miss = IpAddr::V4(Ipv4Addr::new(198, 51, 100, 1));
    g.bench_function("lookup, hit (65,536 entries)", |b| {
        b.iter(|| {
            let mut out = [""; MAX_NAMES_PER_ADDRESS];
            let n = full.names(WorkloadId(5), black_box(hit), NOW, &mut out);
            assert_eq!(n, 1);
            black_box(out[0].len())
        })
    });
    g.bench_function("lookup, miss (65,536 entries)", |b| {
        b.iter(|| {
            let mut out = [""; MAX_NAMES_PER_ADDRESS];
            black_box(full.names(WorkloadId(5), black_box(miss), NOW, &mut out))
        })
    });
    let answer = cdn_answer();
    g.bench_function("parse answer (CNAME + 4 A)", |b| {
        b.iter(|| {
            black_box(
                dns::parse_answer(black_box(&answer))
                    .unwrap()
                    .resolved
                    .len(),
            )
        })
    });
    let psk = identity::Psk::new(b"Zq3v9Lx2Rk7Wm1Tn5Yb8Hc4Jd6Gf0Ps_E").unwrap();
    let node = identity::Node::new_psk("node-a", psk, identity::Config::default()).unwrap();
    let mut p = Processor::new(node, policy::Engine::new(), ProcessorConfig::default());
    let claims =
        identity::Claims::new("shop", "web-1", Default::default(), Default::default()).unwrap();
    p.add_workload(
        WorkloadId(1),
        policy::PodKey {
            namespace: "shop".into(),
            name: "web-1".into(),
        },
        claims,
    );
    let packet = udp(&answer);
    g.bench_function("learn answer (processor)", |b| {
        b.iter(|| black_box(p.learn_dns_answer(WorkloadId(1), black_box(&packet), NOW)))
    });
    assert!(p.metrics().dns_answers("learnt") > 0);
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
