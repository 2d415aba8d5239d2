#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Hostile input into `Processor::process` at every hook and handshake stage: random bytes and
//! genuine handshake packets with random bytes changed. Nothing panics, nothing grows beyond
//! the option block plus the largest token, a rejected packet always has a reason, and a
//! mutated token never authorizes a flow.

mod common;

use std::net::SocketAddr;

use common::*;
use datapath::{Hook, Processor, ProcessorConfig, WorkloadId};
use identity::testing::SeededRng;
use proptest::prelude::*;

const ID: WorkloadId = WorkloadId(1);

struct Stage {
    a: Processor,
    b: Processor,
    rng: SeededRng,
    /// Genuine packets as they travelled: SYN, SYN-ACK, ACK (with tokens), then data.
    wire: Vec<Vec<u8>>,
}

/// Two nodes driven through the first `stage` steps of a genuine handshake.
fn stage(stage: u8) -> Stage {
    let (na, nb) = nodes(Mode::Psk, "robust");
    let mut a = processor(na, "", &[&WEB], ProcessorConfig::default());
    let mut b = processor(nb, "", &[&DB], ProcessorConfig::default());
    let mut rng = SeededRng::new(b"robust");
    let c = SocketAddr::new(WEB.ip, 40000);
    let s = SocketAddr::new(DB.ip, 5432);
    let mut wire = Vec::new();
    let mut p = tcp_packet(c, s, 1, 0, SYN, &linux_syn_options(1, 0), &[]);
    a.process(ID, Hook::Output, &mut p, true, NOW, &mut rng);
    wire.push(p.clone());
    if stage >= 1 {
        b.process(ID, Hook::Input, &mut p, true, NOW, &mut rng);
        let mut p = tcp_packet(s, c, 9, 2, SYN_ACK, &linux_syn_options(2, 1), &[]);
        b.process(ID, Hook::Output, &mut p, true, NOW, &mut rng);
        wire.push(p.clone());
        if stage >= 2 {
            a.process(ID, Hook::Input, &mut p, true, NOW, &mut rng);
            let mut p = tcp_packet(c, s, 2, 10, ACK, &linux_ack_options(3, 2), &[]);
            a.process(ID, Hook::Output, &mut p, true, NOW, &mut rng);
            wire.push(p.clone());
            if stage >= 3 {
                b.process(ID, Hook::Input, &mut p, true, NOW, &mut rng);
                wire.push(tcp_packet(s, c, 10, 2, PSH_ACK, &[], b"x"));
            }
        }
    }
    Stage { a, b, rng, wire }
}

fn feed(st: &mut Stage, packet: &[u8], checksum_ready: bool, may_authorize: bool) {
    let before = (st.a.metrics().authorized(), st.b.metrics().authorized());
    for (on_a, hook) in [
        (true, Hook::Input),
        (false, Hook::Input),
        (true, Hook::Output),
        (false, Hook::Output),
    ] {
        let proc = if on_a { &mut st.a } else { &mut st.b };
        let mut p = packet.to_vec();
        let v = proc.process(ID, hook, &mut p, checksum_ready, NOW, &mut st.rng);
        assert!(p.len() <= packet.len() + 8 + identity::MAX_TOKEN_LEN);
        if !v.accept {
            assert!(v.reason.is_some() && !v.mark_authorized && !v.modified);
        }
    }
    // The encryption guard's packets: whatever the bytes, refused, never authorized.
    for proc in [&mut st.a, &mut st.b] {
        let v = proc.refuse_unencrypted(packet, NOW);
        assert!(!v.accept && !v.mark_authorized && !v.modified && v.reason.is_some());
    }
    if !may_authorize {
        // Altered tokens never authorize a flow with a verified identity.
        assert_eq!(st.a.metrics().authorized().0, before.0.0);
        assert_eq!(st.b.metrics().authorized().0, before.1.0);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn random_bytes_at_every_stage(s in 0u8..4, bytes in proptest::collection::vec(any::<u8>(), 0..300), ready in any::<bool>()) {
        let mut st = stage(s);
        feed(&mut st, &bytes, ready, false);
    }

    #[test]
    fn mutated_genuine_packets_at_every_stage(
        s in 0u8..4,
        which in any::<usize>(),
        muts in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..4),
        ready in any::<bool>(),
    ) {
        let mut st = stage(s);
        let mut p = st.wire[which % st.wire.len()].clone();
        let original = p.clone();
        for (i, b) in muts {
            let n = p.len();
            p[i % n] = b;
        }
        prop_assume!(p != original);
        // A genuine token with, say, a changed TTL still proves what it proves.
        feed(&mut st, &p, ready, true);
    }

    #[test]
    fn mutated_tokens_never_authorize(
        s in 0u8..4,
        which in any::<usize>(),
        muts in proptest::collection::vec((any::<usize>(), 1u8..), 1..4),
        ready in any::<bool>(),
    ) {
        let mut st = stage(s);
        let tokened: Vec<Vec<u8>> = st.wire.iter().filter(|p| token_of(p).is_some()).cloned().collect();
        let mut p = tokened[which % tokened.len()].clone();
        let seg = datapath::TcpSegment::parse(&p).unwrap().unwrap();
        let start = seg.ip_len() - seg.payload_len();
        let len = seg.token_len().unwrap() as usize;
        for (i, x) in muts {
            p[start + i % len] ^= x;
        }
        let seg = datapath::TcpSegment::parse(&p).unwrap().unwrap();
        datapath::packet::fix_checksums(&mut p, &seg).unwrap();
        feed(&mut st, &p, ready, false);
    }
}
