//! Per-packet cost of `Processor::process` for each handshake step, PSK and PKI, with the
//! three-tier policies plus 1,000 other policies loaded, and the baseline of parsing a packet
//! and checking its checksum without any handshake.
//!
//! Run: cargo bench -p tessera-datapath --bench processor -- --warm-up-time 1 --measurement-time 3
//!
//! Every iteration runs a whole handshake on a fresh flow (new client port, fresh nonces) on two
//! in-memory nodes and times only the step named by the benchmark, so each step sees the state
//! it has in real life. After criterion, the bench prints per-step p50 / p99 over 20,000
//! handshakes (individual calls timed with `Instant`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../tests/common/mod.rs"]
mod common;

use std::hint::black_box;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::*;
use criterion::{Criterion, criterion_group, criterion_main};
use datapath::{Hook, Processor, ProcessorConfig, TcpSegment, WorkloadId};
use identity::testing::SeededRng;

const ID: WorkloadId = WorkloadId(1);

/// Ten labels like real pods carry.
const BACKEND_LABELS: &[(&str, &str)] = &[
    ("role", "BusinessBackend"),
    ("app.kubernetes.io/name", "orders"),
    ("app.kubernetes.io/instance", "orders-prod"),
    ("app.kubernetes.io/version", "4.12.0"),
    ("app.kubernetes.io/component", "api"),
    ("app.kubernetes.io/part-of", "shop"),
    ("app.kubernetes.io/managed-by", "helm"),
    ("pod-template-hash", "7d9f8c6b5"),
    ("team", "payments"),
    ("tier", "backend"),
];
const DB_LABELS: &[(&str, &str)] = &[
    ("role", "Database"),
    ("app.kubernetes.io/name", "postgres"),
    ("app.kubernetes.io/instance", "orders-db"),
    ("app.kubernetes.io/version", "16.4"),
    ("app.kubernetes.io/component", "database"),
    ("app.kubernetes.io/part-of", "shop"),
    ("app.kubernetes.io/managed-by", "helm"),
    ("statefulset.kubernetes.io/pod-name", "orders-db-0"),
    ("team", "payments"),
    ("tier", "db"),
];

const CLIENT: Pod = Pod {
    namespace: "shop",
    name: "orders-7d9f8c6b5-x2x4q",
    labels: BACKEND_LABELS,
    ip: std::net::IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 1, 2)),
    ports: &[("api", 8080)],
};
const SERVER: Pod = Pod {
    namespace: "shop",
    name: "orders-db-0",
    labels: DB_LABELS,
    ip: std::net::IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 2, 2)),
    ports: &[("postgres", 5432)],
};

/// The three-tier example plus 1,000 other policies: 950 in 95 other namespaces and 50 in
/// `shop` that select other apps (so the engine's index, not luck, keeps decisions cheap).
fn policies() -> String {
    let mut y = String::from(
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop, labels: {env: prod, team: payments}}\n",
    );
    for f in [
        include_str!("../../examples/three-tier/policies/00-default-deny-ingress.yaml"),
        include_str!("../../examples/three-tier/policies/10-frontend.yaml"),
        include_str!("../../examples/three-tier/policies/20-backend.yaml"),
        include_str!("../../examples/three-tier/policies/30-database.yaml"),
    ] {
        y.push_str("---\n");
        y.push_str(f);
    }
    for k in 0..1000 {
        let ns = if k < 50 {
            "shop".to_string()
        } else {
            format!("ns-{}", k / 10)
        };
        y.push_str(&format!(
            "---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {{name: pol-{k}, namespace: {ns}}}
spec:
  podSelector: {{matchLabels: {{app: other-{k}}}}}
  policyTypes: [Ingress, Egress]
  ingress:
  - from:
    - podSelector: {{matchExpressions: [{{key: tier, operator: In, values: [web, api]}}]}}
    - namespaceSelector: {{matchLabels: {{team: t{t}}}}}
      podSelector: {{matchLabels: {{app: a{t}}}}}
    - ipBlock: {{cidr: 10.0.0.0/8, except: [10.{t}.0.0/24]}}
    ports: [{{port: 8080}}, {{port: metrics}}, {{port: 9000, endPort: 9100}}]
  egress:
  - to: [{{namespaceSelector: {{}}}}]
    ports: [{{port: 53, protocol: UDP}}, {{port: 443}}]
",
            t = k % 10
        ));
    }
    y
}

const STEPS: [&str; 7] = [
    "1 client OUTPUT SYN (attach)",
    "2 server INPUT SYN (verify, ingress, strip)",
    "3 server OUTPUT SYN-ACK (respond, attach)",
    "4 client INPUT SYN-ACK (verify, egress, strip)",
    "5 client OUTPUT ACK (attach)",
    "6 server INPUT ACK (verify, authorize, strip)",
    "7 client INPUT first data (mark)",
];

struct World {
    a: Processor,
    b: Processor,
    rng: SeededRng,
    now: u64,
    port: u16,
}

impl World {
    fn new(mode: Mode) -> World {
        let (na, nb) = nodes(mode, "bench");
        let yaml = policies();
        World {
            a: processor(na, &yaml, &[&CLIENT], ProcessorConfig::default()),
            b: processor(nb, &yaml, &[&SERVER], ProcessorConfig::default()),
            rng: SeededRng::new(b"bench"),
            now: NOW,
            port: 1024,
        }
    }

    fn process(&mut self, on_a: bool, hook: Hook, p: &mut Vec<u8>) -> Duration {
        let proc = if on_a { &mut self.a } else { &mut self.b };
        let t = Instant::now();
        let v = proc.process(ID, hook, black_box(p), true, self.now, &mut self.rng);
        let d = t.elapsed();
        assert!(v.accept && v.reason.is_none(), "{v:?}");
        d
    }

    /// One full handshake on a fresh flow; returns the time of each step.
    fn handshake(&mut self) -> [Duration; 7] {
        self.now += 1;
        self.port = if self.port == u16::MAX {
            1024
        } else {
            self.port + 1
        };
        if self.port.is_multiple_of(1000) {
            self.a.expire(self.now);
            self.b.expire(self.now);
        }
        let c = SocketAddr::new(CLIENT.ip, self.port);
        let s = SocketAddr::new(SERVER.ip, 5432);
        let mut t = [Duration::ZERO; 7];
        let mut p = tcp_packet(c, s, 1000, 0, SYN, &linux_syn_options(1, 0), &[]);
        t[0] = self.process(true, Hook::Output, &mut p);
        t[1] = self.process(false, Hook::Input, &mut p);
        let mut p = tcp_packet(s, c, 9000, 1001, SYN_ACK, &linux_syn_options(2, 1), &[]);
        t[2] = self.process(false, Hook::Output, &mut p);
        t[3] = self.process(true, Hook::Input, &mut p);
        let mut p = tcp_packet(c, s, 1001, 9001, ACK, &linux_ack_options(3, 2), &[]);
        t[4] = self.process(true, Hook::Output, &mut p);
        t[5] = self.process(false, Hook::Input, &mut p);
        let mut p = tcp_packet(s, c, 9001, 1001, PSH_ACK, &linux_ack_options(4, 3), b"R");
        t[6] = self.process(true, Hook::Input, &mut p);
        t
    }
}

fn percentile(sorted: &[Duration], q: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * q) as usize]
}

fn bench(c: &mut Criterion) {
    // Baseline: parse + full checksum check of a Linux SYN, no handshake.
    let syn = tcp_packet(
        "10.0.1.2:40000".parse().unwrap(),
        "10.0.2.2:5432".parse().unwrap(),
        1000,
        0,
        SYN,
        &linux_syn_options(1, 0),
        &[],
    );
    c.bench_function("baseline parse+checksum (SYN, no handshake)", |b| {
        b.iter(|| {
            let seg = TcpSegment::parse(black_box(&syn)).unwrap().unwrap();
            black_box(seg.tcp_checksum_ok(&syn))
        })
    });

    for mode in [Mode::Psk, Mode::Pki] {
        let mut g = c.benchmark_group(format!("process {mode:?}"));
        let mut w = World::new(mode);
        for (i, name) in STEPS.iter().enumerate() {
            g.bench_function(*name, |b| {
                b.iter_custom(|iters| (0..iters).map(|_| w.handshake()[i]).sum())
            });
        }
        g.finish();

        // Distribution of single calls (criterion reports means of batches).
        let mut w = World::new(mode);
        let n = 20_000;
        let mut per_step: Vec<Vec<Duration>> = (0..7).map(|_| Vec::with_capacity(n)).collect();
        for _ in 0..n {
            for (i, d) in w.handshake().into_iter().enumerate() {
                per_step[i].push(d);
            }
        }
        eprintln!("\n{mode:?}: single-call distribution over {n} handshakes");
        for (i, name) in STEPS.iter().enumerate() {
            per_step[i].sort();
            eprintln!(
                "  {name:<50} p50 {:>8.2?}  p99 {:>8.2?}",
                percentile(&per_step[i], 0.5),
                percentile(&per_step[i], 0.99)
            );
        }
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
