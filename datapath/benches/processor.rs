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
//!
//! The `denied SYN` group times the server's INPUT SYN of a connection its ingress denies
//! (port 9999: isolated, no rule), with flow records off, on for denials as the agent runs
//! them (rate limited: after the burst nearly every one is suppressed), and with every
//! denial recorded (no limit: the cost of building a record).
//!
//! Cold caches: `TESSERA_BENCH_COLD=4194304` evicts the caches before every timed call (see
//! [`cold_bytes`]). A running agent wakes up for each packet after the kernel has run the
//! network stack for other processes, so its decisions are closer to this than to the warm
//! figures (bench/README.md).

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "fixture/mod.rs"]
mod fixture;

use std::hint::black_box;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::*;
use criterion::{Criterion, criterion_group};
use datapath::flowlog::FlowLogConfig;
use datapath::{Hook, Processor, ProcessorConfig, TcpSegment, WorkloadId};
use fixture::{CLIENT, SERVER, policies};
use identity::testing::SeededRng;

const ID: WorkloadId = WorkloadId(1);

/// `TESSERA_BENCH_COLD=BYTES`: before every timed call, write one byte in every cache line of a
/// buffer this large (4194304 is twice this VM's L2), so each step starts with the caches an
/// agent has when it wakes up after the kernel's work, not warm from the previous step.
fn cold_bytes() -> Option<usize> {
    static N: std::sync::OnceLock<Option<usize>> = std::sync::OnceLock::new();
    *N.get_or_init(|| {
        std::env::var("TESSERA_BENCH_COLD")
            .ok()
            .and_then(|v| v.parse().ok())
            .filter(|&n| n > 0)
    })
}

/// Evict the caches: touch every cache line of an `n`-byte buffer (kept between calls).
fn evict(n: usize) {
    thread_local!(static BUF: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) });
    BUF.with(|b| {
        let mut b = b.borrow_mut();
        if b.len() != n {
            *b = vec![1u8; n];
        }
        for byte in b.iter_mut().step_by(64) {
            *byte = byte.wrapping_add(1);
        }
        black_box(&*b);
    });
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
        if let Some(n) = cold_bytes() {
            evict(n);
        }
        let proc = if on_a { &mut self.a } else { &mut self.b };
        let t = Instant::now();
        let v = proc.process(ID, hook, black_box(p), true, self.now, &mut self.rng);
        let d = t.elapsed();
        assert!(v.accept && v.reason.is_none(), "{v:?}");
        d
    }

    /// A millisecond later and the next client port (1024.. again after 65535); whether it is
    /// time to expire the flow tables (every 1000 ports).
    fn next_flow(&mut self) -> bool {
        self.now += 1;
        self.port = if self.port == u16::MAX {
            1024
        } else {
            self.port + 1
        };
        self.port.is_multiple_of(1000)
    }

    /// One full handshake on a fresh flow; returns the time of each step.
    fn handshake(&mut self) -> [Duration; 7] {
        if self.next_flow() {
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

impl World {
    /// A client SYN to a port the server's ingress denies; returns the server's INPUT time.
    fn denied_syn(&mut self) -> Duration {
        if self.next_flow() {
            self.a.expire(self.now);
        }
        let c = SocketAddr::new(CLIENT.ip, self.port);
        let s = SocketAddr::new(SERVER.ip, 9999);
        let mut p = tcp_packet(c, s, 1000, 0, SYN, &linux_syn_options(1, 0), &[]);
        let v = self
            .a
            .process(ID, Hook::Output, &mut p, true, self.now, &mut self.rng);
        assert!(v.accept, "{v:?}");
        if let Some(n) = cold_bytes() {
            evict(n);
        }
        let t = Instant::now();
        let v = self.b.process(
            ID,
            Hook::Input,
            black_box(&mut p),
            true,
            self.now,
            &mut self.rng,
        );
        let d = t.elapsed();
        assert_eq!(
            v.reason.as_ref().map(|r| r.as_str()),
            Some("policy_ingress")
        );
        d
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

fn denied(c: &mut Criterion) {
    let mut g = c.benchmark_group("denied SYN (server INPUT: verify, ingress denied)");
    for (name, config) in [
        (
            "records off",
            FlowLogConfig {
                records: false,
                ..FlowLogConfig::default()
            },
        ),
        (
            "records of denials, rate limited (default)",
            FlowLogConfig::default(),
        ),
        (
            "every denial recorded",
            FlowLogConfig {
                denied_per_second: 0,
                ..FlowLogConfig::default()
            },
        ),
    ] {
        let mut w = World::new(Mode::Psk);
        w.b.flow_log_mut().set_config(config);
        let mut drained = Vec::new();
        g.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    total += w.denied_syn();
                    // The shell drains them on another task: not timed here.
                    w.b.drain_flow_records(&mut drained);
                    drained.clear();
                }
                total
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench, denied);

/// `TESSERA_BENCH_ONCE=N`: N handshakes, then N denied SYNs (PSK), nothing timed, for
/// `valgrind --tool=callgrind --toggle-collect='*Processor::process*'` (instructions per
/// handshake and per denied SYN; `TESSERA_BENCH_ONLY=handshake|denied`: only one of them;
/// `TESSERA_BENCH_RECORD_ALL=1`: every denial recorded).
fn once(n: usize) {
    let only = std::env::var("TESSERA_BENCH_ONLY").unwrap_or_default();
    let mut w = World::new(Mode::Psk);
    for _ in 0..if only == "denied" { 0 } else { n } {
        w.handshake();
    }
    let n = if only == "handshake" { 0 } else { n };
    let mut w = World::new(Mode::Psk);
    if std::env::var_os("TESSERA_BENCH_RECORD_ALL").is_some() {
        w.b.flow_log_mut().set_config(FlowLogConfig {
            denied_per_second: 0,
            ..FlowLogConfig::default()
        });
    }
    let mut drained = Vec::new();
    for _ in 0..n {
        w.denied_syn();
        w.b.drain_flow_records(&mut drained);
        drained.clear();
    }
}

fn main() {
    if let Some(n) = std::env::var("TESSERA_BENCH_ONCE")
        .ok()
        .and_then(|n| n.parse().ok())
    {
        once(n);
        return;
    }
    benches();
    Criterion::default().configure_from_args().final_summary();
}
