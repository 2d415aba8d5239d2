//! Cost of making and verifying each token, PKI and PSK mode, the one-off pair key derivation,
//! and a raw HMAC-SHA256 of the same size as the baseline.
//!
//! Run: cargo bench -p tessera-identity --bench token -- --warm-up-time 1 --measurement-time 3

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::cell::Cell;
use std::collections::BTreeMap;
use std::hint::black_box;

use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use hmac::{Hmac, KeyInit, Mac};
use identity::testing::SeededRng;
use identity::{CertificateAuthority, Claims, Config, Node, Psk};
use sha2::Sha256;

const NOW: u64 = 1_780_000_000_000;
const DAY: u64 = 86_400_000;

/// 10 pod labels of about 30 bytes and 3 namespace labels: a realistic workload.
fn claims(app: &str) -> Claims {
    let labels: BTreeMap<String, String> = (0..10)
        .map(|i| {
            (
                format!("example.com/k-{i:02}"),
                format!("{app}-value-{i:02}"),
            )
        })
        .collect();
    let ns: BTreeMap<String, String> = [
        ("kubernetes.io/metadata.name", "payments-prod"),
        ("team", "payments"),
        ("environment", "production"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    Claims::new(
        "payments-prod",
        format!("{app}-6b7c9d8f5-q2w3e"),
        labels,
        ns,
    )
    .unwrap()
}

fn pki_nodes() -> (Node, Node) {
    let mut rng = SeededRng::new(b"bench");
    let ca = CertificateAuthority::generate(&mut rng, "tessera-ca", NOW - DAY, NOW + DAY).unwrap();
    let a = ca
        .issue_node(&mut rng, "node-a", NOW - DAY, NOW + DAY)
        .unwrap();
    let b = ca
        .issue_node(&mut rng, "node-b", NOW - DAY, NOW + DAY)
        .unwrap();
    let (ac, bc) = (a.certificate().clone(), b.certificate().clone());
    let mut na = Node::new_pki(a, ca.trust_anchor().clone(), Config::default(), NOW).unwrap();
    let mut nb = Node::new_pki(b, ca.trust_anchor().clone(), Config::default(), NOW).unwrap();
    na.add_peer_certificate("node-b", bc, NOW).unwrap();
    nb.add_peer_certificate("node-a", ac, NOW).unwrap();
    (na, nb)
}

fn psk_nodes() -> (Node, Node) {
    let k = b"Zq3v9Lx2Rk7Wm1Tn5Yb8Hc4Jd6Gf0Ps_E";
    (
        Node::new_psk("node-a", Psk::new(k).unwrap(), Config::default()).unwrap(),
        Node::new_psk("node-b", Psk::new(k).unwrap(), Config::default()).unwrap(),
    )
}

/// Run `iters` iterations in chunks of at most 1000 (setup outside the timed part).
fn timed_in_chunks(iters: u64, mut chunk: impl FnMut(u64) -> Duration) -> Duration {
    let mut total = Duration::ZERO;
    let mut left = iters;
    while left > 0 {
        let n = left.min(1000);
        total += chunk(n);
        left -= n;
    }
    total
}

fn bench_mode(c: &mut Criterion, mode: &str, (mut a, mut b): (Node, Node)) {
    let (web, api) = (claims("web"), claims("api"));
    let mut rng = SeededRng::new(b"nonces");
    // Simulated clock: 16 handshakes per millisecond, so the replay cache sees a realistic
    // spread of timestamps (it is exercised, and bounded, in every ACK measurement).
    let clock = Cell::new(0u64);
    let tick = || {
        clock.set(clock.get() + 1);
        NOW + clock.get() / 16
    };
    // Warm the pair caches (the one-off derivation is measured separately).
    {
        let now = tick();
        let (cs, syn) = a.client_syn(&web, rng.nonce(), now);
        let (ss, sa) = b
            .server_syn(&syn, now)
            .unwrap()
            .respond(&mut b, &api, "http", rng.nonce(), now)
            .unwrap();
        let (_, ack) = cs.receive_syn_ack(&mut a, &sa, now).unwrap();
        ss.receive_ack(&mut b, &ack, now).unwrap();
    }
    c.bench_function(&format!("{mode}/syn make+verify"), |bch| {
        bch.iter(|| {
            let now = tick();
            let (_, syn) = a.client_syn(&web, rng.nonce(), now);
            black_box(b.server_syn(&syn, now).unwrap());
        })
    });
    c.bench_function(&format!("{mode}/syn-ack make+verify (+ack make)"), |bch| {
        bch.iter_custom(|iters| {
            timed_in_chunks(iters, |n| {
                let setup: Vec<_> = (0..n)
                    .map(|_| {
                        let now = tick();
                        let (cs, syn) = a.client_syn(&web, rng.nonce(), now);
                        (cs, b.server_syn(&syn, now).unwrap(), rng.nonce(), now)
                    })
                    .collect();
                let start = Instant::now();
                for (cs, recv, nonce, now) in setup {
                    let (_, sa) = recv.respond(&mut b, &api, "http", nonce, now).unwrap();
                    black_box(cs.receive_syn_ack(&mut a, &sa, now).unwrap());
                }
                start.elapsed()
            })
        })
    });
    c.bench_function(&format!("{mode}/ack verify (+replay record)"), |bch| {
        bch.iter_custom(|iters| {
            timed_in_chunks(iters, |n| {
                let setup: Vec<_> = (0..n)
                    .map(|_| {
                        let now = tick();
                        let (cs, syn) = a.client_syn(&web, rng.nonce(), now);
                        let (ss, sa) = b
                            .server_syn(&syn, now)
                            .unwrap()
                            .respond(&mut b, &api, "http", rng.nonce(), now)
                            .unwrap();
                        let (_, ack) = cs.receive_syn_ack(&mut a, &sa, now).unwrap();
                        (ss, ack, now)
                    })
                    .collect();
                let start = Instant::now();
                for (ss, ack, now) in setup {
                    black_box(ss.receive_ack(&mut b, &ack, now).unwrap());
                }
                start.elapsed()
            })
        })
    });
    c.bench_function(&format!("{mode}/full handshake, both sides"), |bch| {
        bch.iter(|| {
            let now = tick();
            let (cs, syn) = a.client_syn(&web, rng.nonce(), now);
            let (ss, sa) = b
                .server_syn(&syn, now)
                .unwrap()
                .respond(&mut b, &api, "http", rng.nonce(), now)
                .unwrap();
            let (_, ack) = cs.receive_syn_ack(&mut a, &sa, now).unwrap();
            black_box(ss.receive_ack(&mut b, &ack, now).unwrap());
        })
    });
    let peer = b.key_id();
    c.bench_function(
        &format!("{mode}/pair key derivation (one-off per peer)"),
        |bch| {
            bch.iter(|| {
                a.clear_pair_cache();
                a.prepare_peer(peer, "node-b", NOW).unwrap();
            })
        },
    );
    let (_, syn) = a.client_syn(&web, rng.nonce(), NOW);
    println!("{mode}: SYN token {} bytes", syn.len());
}

fn tokens(c: &mut Criterion) {
    bench_mode(c, "pki", pki_nodes());
    bench_mode(c, "psk", psk_nodes());
    // Baseline: one keyed HMAC-SHA256 over a SYN-ACK-sized message (pads precomputed, as the
    // handshake does), and the same with keying per call.
    let (mut a, mut b) = psk_nodes();
    let (_, syn) = a.client_syn(&claims("web"), [1; 16], NOW);
    let (_, sa) = b
        .server_syn(&syn, NOW)
        .unwrap()
        .respond(&mut b, &claims("api"), "http", [2; 16], NOW)
        .unwrap();
    let msg = vec![0x5au8; sa.len()];
    let keyed = <Hmac<Sha256> as KeyInit>::new_from_slice(&[7u8; 32]).unwrap();
    c.bench_function(
        &format!("baseline/raw HMAC-SHA256 of {} bytes", msg.len()),
        |bch| {
            bch.iter(|| {
                let mut m = keyed.clone();
                m.update(black_box(&msg));
                black_box(m.finalize().into_bytes())
            })
        },
    );
    c.bench_function(
        &format!(
            "baseline/raw HMAC-SHA256 of {} bytes, keyed per call",
            msg.len()
        ),
        |bch| {
            bch.iter(|| {
                let mut m = <Hmac<Sha256> as KeyInit>::new_from_slice(&[7u8; 32]).unwrap();
                m.update(black_box(&msg));
                black_box(m.finalize().into_bytes())
            })
        },
    );
    let _ = &mut a;
}

criterion_group!(benches, tokens);
criterion_main!(benches);
