#![allow(clippy::unwrap_used, clippy::expect_used)]
//! What an agent's processor holds when its tables are full, measured on the heap (dhat).
//!
//! Each table is filled with its largest state (the one holding the most tokens) up to a
//! sample of entries, through real packets; the heap grown per entry, times the table's bound,
//! is what the table costs full (hash tables grow by doubling, so the sample's share of its
//! table's buckets is that of the full one). The sum, with the held UDP datagrams at their
//! largest, must stay under half the DaemonSet's memory limit
//! (deployment/kubernetes/daemonset.yaml): a flood fills the tables, and an agent killed for
//! its memory would drop every handshake in flight and leave its node's queues unserved.

mod common;

use std::net::SocketAddr;

use common::*;
use datapath::ProcessorConfig;

#[global_allocator]
static ALLOC: dhat::Alloc = dhat::Alloc;

/// Entries made per table.
const SAMPLE: usize = 4096;
/// The DaemonSet's memory limit, read from its manifest (`limits: {..., memory: NMi}`).
fn limit() -> usize {
    let manifest = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deployment/kubernetes/daemonset.yaml"
    );
    let text = std::fs::read_to_string(manifest).expect("the DaemonSet manifest");
    let line = text
        .lines()
        .find(|l| l.trim_start().starts_with("limits:"))
        .expect("a limits line");
    let mib = line
        .split("memory:")
        .nth(1)
        .and_then(|m| m.trim().trim_end_matches('}').trim().strip_suffix("Mi"))
        .and_then(|n| n.parse::<usize>().ok())
        .unwrap_or_else(|| panic!("a memory limit in Mi on {line:?}"));
    mib << 20
}

fn heap() -> usize {
    dhat::HeapStats::get().curr_bytes
}

/// The heap grown by the calls made through [`Grown::of`], less what they return (the packet
/// a step emits, used for the next step and then dropped).
#[derive(Default)]
struct Grown(isize);

impl Grown {
    fn of<T: 'static>(&mut self, f: impl FnOnce() -> T) -> T {
        let before = heap() as isize;
        let out = f();
        self.0 += heap() as isize - before - returned(&out) as isize;
        out
    }

    /// Per entry of `SAMPLE`.
    fn per_entry(&self) -> usize {
        self.0.max(0) as usize / SAMPLE
    }
}

/// Heap bytes a step's result holds: the packet it emitted.
fn returned<T: 'static>(out: &T) -> usize {
    let any: &dyn std::any::Any = out;
    any.downcast_ref::<(datapath::Verdict, Vec<u8>)>()
        .map_or(0, |(_, p)| p.capacity())
}

/// A client port of its own for entry `i`.
fn client(w: &World, i: usize) -> SocketAddr {
    SocketAddr::new(w.c.ip(), 10_000 + i as u16)
}

#[test]
fn every_table_full_fits_the_daemonsets_memory_limit() {
    let _profiler = dhat::Profiler::builder().testing().build();
    let config = ProcessorConfig::default();

    // TCP, server side: SYN received and SYN-ACK sent, waiting for the ACK (the SYN's and the
    // SYN-ACK's tokens, and the handshake state). Only node-b's calls are measured.
    let mut w = World::new(Mode::Psk, DB_TCP_AND_UDP_FROM_WEB);
    let mut tcp_server = Grown::default();
    for i in 0..SAMPLE {
        w.c = client(&w, i);
        let (_, syn) = w.out_a(&w.syn());
        let (v, _) = tcp_server.of(|| w.in_b(&syn));
        assert!(v.accept);
        let (v, _) = tcp_server.of(|| w.out_b(&w.syn_ack()));
        assert!(v.accept);
    }
    assert_eq!(w.b.flow_count(), SAMPLE);
    // TCP, client side: the SYN-ACK verified, the ACK token made (three tokens). Only
    // node-a's calls are measured.
    let mut w = World::new(Mode::Psk, DB_TCP_AND_UDP_FROM_WEB);
    let mut tcp_client = Grown::default();
    for i in 0..SAMPLE {
        w.c = client(&w, i);
        let (_, syn) = tcp_client.of(|| w.out_a(&w.syn()));
        w.in_b(&syn);
        let (_, syn_ack) = w.out_b(&w.syn_ack());
        let (v, _) = tcp_client.of(|| w.in_a(&syn_ack));
        assert!(v.accept);
    }
    assert_eq!(w.a.flow_count(), SAMPLE);

    // Remembered flows (for re-checks): whole handshakes on both processors, halved. Each
    // side's handshake entry lingers too and is counted with it (an upper bound).
    let mut w = World::new(Mode::Psk, DB_TCP_AND_UDP_FROM_WEB);
    let mut both = Grown::default();
    for i in 0..SAMPLE {
        w.c = client(&w, i);
        both.of(|| w.connect());
    }
    assert_eq!(w.b.established_count(), SAMPLE);
    let established = both.per_entry() / 2;

    // UDP, server side: a SYN control answered, waiting for the ACK. Only node-b's calls.
    let mut w = World::new(Mode::Psk, DB_TCP_AND_UDP_FROM_WEB);
    let mut udp_server = Grown::default();
    for i in 0..SAMPLE {
        let c = client(&w, i);
        w.out_a(&udp(c, w.s, b"x"));
        let syn = w.a.take_outgoing().remove(0);
        udp_server.of(|| {
            w.in_b(&syn.packet);
            w.b.take_outgoing();
        });
    }
    assert_eq!(w.b.metrics().flows(), SAMPLE);
    // UDP, client side: the SYN control sent and kept, the datagram held (its bytes are
    // counted with the held datagrams below, not here).
    let mut w = World::new(Mode::Psk, DB_TCP_AND_UDP_FROM_WEB);
    let mut udp_client = Grown::default();
    for i in 0..SAMPLE {
        let c = client(&w, i);
        udp_client.of(|| {
            w.out_a(&udp(c, w.s, b""));
            w.a.take_outgoing();
        });
    }
    assert_eq!(w.a.metrics().flows(), SAMPLE);
    let (tcp_server, tcp_client) = (tcp_server.per_entry(), tcp_client.per_entry());
    let (udp_server, udp_client) = (udp_server.per_entry(), udp_client.per_entry());

    let max = config.max_flows;
    let udp_max = config.udp_max_flows;
    let tcp = tcp_server.max(tcp_client);
    let udp = udp_server.max(udp_client);
    // Held datagrams at their largest: the bytes bound, and a vector (24 B) and its
    // allocation's overhead (16 B, say) for each of the most datagrams.
    let held = config.udp_held.total.bytes + config.udp_held.total.count * 40;
    let total = tcp * max + udp * udp_max + established * config.max_established + held;
    let limit = limit();
    let report = format!(
        "per entry: TCP handshake {tcp_server} B (server), {tcp_client} B (client); UDP \
         handshake {udp_server} B (server), {udp_client} B (client); remembered flow \
         {established} B. Full: TCP {} MiB, UDP {} MiB, remembered {} MiB, held datagrams {} \
         MiB; total {} MiB of the {} MiB limit",
        (tcp * max) >> 20,
        (udp * udp_max) >> 20,
        (established * config.max_established) >> 20,
        held >> 20,
        total >> 20,
        limit >> 20
    );
    eprintln!("{report}");
    // Half: the rest of the agent (the DNS names, cut flows, replay nonces of the last minute,
    // the runtime, the allocator's own overhead) must fit beside it.
    assert!(total < limit / 2, "{report}");
}
