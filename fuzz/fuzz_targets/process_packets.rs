//! Arbitrary bytes as a queued packet, at every hook of a client and a server node whose flow
//! state was first driven to a chosen handshake stage by genuine packets: a TCP connection and
//! a UDP flow, each to a stage of its own (both bound handshakes if byte 0 says so). The parser, the rewriters, `Processor::process`, the
//! UDP timers and `Processor::refuse_unencrypted` must never panic, a packet may grow by at most
//! the option block plus the largest token, what the agents send of their own (control
//! datagrams, released datagrams, resets) is bounded in number and size and parses as the
//! packet it claims to be, and the guard refuses everything.
#![no_main]

use datapath::packet::{attach_token, rewrite_to_rst, strip_token};
use datapath::{Hook, Outgoing, Processor, ProcessorConfig, TcpSegment, WorkloadId};
use identity::testing::SeededRng;
use identity::{Claims, Config, Node, Psk};
use libfuzzer_sys::fuzz_target;
use policy::{ContainerPort, Engine, PodKey, Protocol, Workload};

const NOW: u64 = 1_780_000_000_000;
const PSK: &[u8] = b"Zq3v9Lx2Rk7Wm1Tn5Yb8Hc4Jd6Gf0Ps_E";
const ID: WorkloadId = WorkloadId(1);
const C: ([u8; 4], u16) = ([10, 0, 1, 2], 40000);
const S: ([u8; 4], u16) = ([10, 0, 2, 2], 5432);

/// A bare IPv4 TCP packet (checksums are left to the datapath: `checksum_ready` is false).
fn packet(src: ([u8; 4], u16), dst: ([u8; 4], u16), seq: u32, ack: u32, flags: u8) -> Vec<u8> {
    let mut p = vec![0u8; 40];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&40u16.to_be_bytes());
    p[8] = 64;
    p[9] = 6;
    p[12..16].copy_from_slice(&src.0);
    p[16..20].copy_from_slice(&dst.0);
    p[20..22].copy_from_slice(&src.1.to_be_bytes());
    p[22..24].copy_from_slice(&dst.1.to_be_bytes());
    p[24..28].copy_from_slice(&seq.to_be_bytes());
    p[28..32].copy_from_slice(&ack.to_be_bytes());
    p[32] = 5 << 4;
    p[33] = flags;
    p
}

/// A bare IPv4 UDP datagram (UDP checksum 0: none, as IPv4 allows).
fn datagram(src: ([u8; 4], u16), dst: ([u8; 4], u16), payload: &[u8]) -> Vec<u8> {
    let len = 28 + payload.len();
    let mut p = vec![0u8; 28];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&(len as u16).to_be_bytes());
    p[8] = 64;
    p[9] = 17;
    p[12..16].copy_from_slice(&src.0);
    p[16..20].copy_from_slice(&dst.0);
    p[20..22].copy_from_slice(&src.1.to_be_bytes());
    p[22..24].copy_from_slice(&dst.1.to_be_bytes());
    p[24..26].copy_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    p.extend_from_slice(payload);
    p
}

/// What `p` sent of its own: at most a handful per packet processed, none larger than a
/// datagram the agent held (at most the input) or a control datagram, a reset or a released
/// datagram that parses as IP.
fn sent(p: &mut Processor, input_len: usize) -> Vec<Outgoing> {
    let out = p.take_outgoing();
    assert!(out.len() <= 16, "{} packets sent", out.len());
    for o in &out {
        assert!(
            o.packet.len() <= input_len.max(60) + 8 + identity::MAX_TOKEN_LEN + 64,
            "sent {} bytes for {} in",
            o.packet.len(),
            input_len
        );
        let protocol = match o.packet.first().map(|b| b >> 4) {
            Some(4) => o.packet.get(9),
            Some(6) => o.packet.get(6),
            v => panic!("sent IP version {v:?}"),
        };
        if protocol == Some(&6) {
            assert!(matches!(TcpSegment::parse(&o.packet), Ok(Some(_))));
        }
    }
    out
}

fn processor(node: &str, name: &str, app: &str, ip: [u8; 4]) -> Option<Processor> {
    let key = PodKey {
        namespace: "shop".into(),
        name: name.into(),
    };
    let labels: policy::Labels = [("app".to_string(), app.to_string())].into();
    let mut engine = Engine::new();
    engine
        .apply_workload(Workload {
            key: key.clone(),
            labels: labels.clone(),
            ports: vec![
                ContainerPort {
                    name: Some("postgres".into()),
                    port: 5432,
                    protocol: Protocol::Tcp,
                },
                ContainerPort {
                    name: Some("dns".into()),
                    port: 5432,
                    protocol: Protocol::Udp,
                },
            ],
            ips: vec![ip.into()],
            host_network: false,
        })
        .ok()?;
    let claims = Claims::new(
        "shop",
        name,
        labels,
        engine.namespace_labels_or_default("shop"),
    )
    .ok()?;
    let node = Node::new_psk(node, Psk::new(PSK).ok()?, Config::default()).ok()?;
    let mut p = Processor::new(node, engine, ProcessorConfig::default());
    p.add_workload(ID, key, claims);
    Some(p)
}

fuzz_target!(|data: &[u8]| {
    let Some((&control, bytes)) = data.split_first() else {
        return;
    };

    if let Ok(Some(seg)) = TcpSegment::parse(bytes) {
        let _ = seg.tcp_checksum_ok(bytes);
        let mut p = bytes.to_vec();
        let _ = strip_token(&mut p, &seg);
        let mut p = bytes.to_vec();
        let _ = attach_token(&mut p, &seg, &bytes[..bytes.len().min(100)]);
        let mut p = bytes.to_vec();
        let _ = rewrite_to_rst(&mut p, &seg);
    }

    let (Some(mut a), Some(mut b)) = (
        processor("node-a", "web-1", "web", C.0),
        processor("node-b", "db-0", "db", S.0),
    ) else {
        return;
    };
    let mut rng = SeededRng::new(b"fuzz");
    // Bit 5 of byte 0: a first connection from another port completes before, so the one
    // driven below is a bound handshake (two tokens; stage 2 is then authorized at both ends).
    let bound = control & 0x20 != 0;
    if bound {
        let c0 = (C.0, C.1 - 1);
        let mut syn = packet(c0, S, 500, 0, 0x02);
        a.process(ID, Hook::Output, &mut syn, false, NOW, &mut rng);
        b.process(ID, Hook::Input, &mut syn, false, NOW, &mut rng);
        let mut sa = packet(S, c0, 7000, 501, 0x12);
        b.process(ID, Hook::Output, &mut sa, false, NOW, &mut rng);
        a.process(ID, Hook::Input, &mut sa, false, NOW, &mut rng);
        let mut ack = packet(c0, S, 501, 7001, 0x10);
        a.process(ID, Hook::Output, &mut ack, false, NOW, &mut rng);
        b.process(ID, Hook::Input, &mut ack, false, NOW, &mut rng);
    }
    // Drive the genuine handshake to stage 0..=3.
    let stage = control & 0x03;
    let mut syn = packet(C, S, 1000, 0, 0x02);
    a.process(ID, Hook::Output, &mut syn, false, NOW, &mut rng);
    if stage >= 1 {
        b.process(ID, Hook::Input, &mut syn, false, NOW, &mut rng);
        let mut sa = packet(S, C, 9000, 1001, 0x12);
        b.process(ID, Hook::Output, &mut sa, false, NOW, &mut rng);
        if stage >= 2 {
            a.process(ID, Hook::Input, &mut sa, false, NOW, &mut rng);
            let mut ack = packet(C, S, 1001, 9001, 0x10);
            a.process(ID, Hook::Output, &mut ack, false, NOW, &mut rng);
            if stage >= 3 {
                b.process(ID, Hook::Input, &mut ack, false, NOW, &mut rng);
            }
        }
    }
    // Drive a UDP flow C -> S to stage 0..=4: nothing, the client's SYN control sent, the
    // server's SYN-ACK sent, the client's ACK sent (and its datagram released), the ACK
    // consumed by the server. Bits 2-4 of byte 0. Once a TCP SYN-ACK was verified (bit 5, or
    // the TCP stage from 2), the flow is bound: no ACK, and stage 4 gives the server the
    // released datagram.
    let udp_stage = (control >> 2) & 0x07;
    // A verified SYN-ACK taught node-a the server's node: the first connection's (bit 5), or
    // the staged one's, from stage 2.
    let udp_bound = bound || stage >= 2;
    let mut d = datagram(C, S, b"query");
    if udp_stage >= 1 {
        a.process(ID, Hook::Output, &mut d, false, NOW, &mut rng);
        let mut next = a.take_outgoing();
        assert_eq!(next.len(), 1, "a SYN control");
        for stage in 2..=4u8 {
            if udp_stage < stage {
                break;
            }
            let (to, hook) = if stage % 2 == 0 {
                (&mut b, Hook::Input)
            } else {
                (&mut a, Hook::Input)
            };
            let mut answers = Vec::new();
            for mut o in next {
                to.process(ID, hook, &mut o.packet, false, NOW, &mut rng);
                answers.extend(to.take_outgoing());
            }
            // The genuine handshake goes on: a SYN-ACK, then the ACK and the released datagram
            // (bound, after the first TCP connection taught node-a the server's node: the
            // datagram alone).
            match stage {
                2 => assert_eq!(answers.len(), 1, "a SYN-ACK"),
                3 if udp_bound => assert_eq!(answers.len(), 1, "the datagram"),
                3 => assert_eq!(answers.len(), 2, "the ACK and the datagram"),
                _ => {}
            }
            next = answers;
        }
    }
    let checksum_ready = control & 0x80 != 0;
    for (on_a, hook) in [
        (true, Hook::Input),
        (false, Hook::Input),
        (true, Hook::Output),
        (false, Hook::Output),
    ] {
        let proc = if on_a { &mut a } else { &mut b };
        let mut p = bytes.to_vec();
        proc.process(ID, hook, &mut p, checksum_ready, NOW, &mut rng);
        assert!(p.len() <= bytes.len() + 8 + identity::MAX_TOKEN_LEN);
        sent(proc, bytes.len());
    }
    // The UDP timers (re-sent controls, held datagrams given up) and expiry, later on.
    for proc in [&mut a, &mut b] {
        for later in [30, 200, 3_000] {
            proc.poll_udp(NOW + later, &mut rng);
            sent(proc, bytes.len());
        }
        proc.expire(NOW + 600_000);
    }
    // The encryption guard's packets: always refused, whatever the bytes.
    for proc in [&mut a, &mut b] {
        let v = proc.refuse_unencrypted(bytes, NOW);
        assert!(!v.accept && !v.mark_authorized && !v.modified);
    }
});
