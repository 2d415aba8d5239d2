#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Packet parsing and rewriting: attach / strip on IPv4 and IPv6, with and without options,
//! checksums checked against an independent computation, and hostile input never panicking.

mod common;

use std::net::SocketAddr;

use common::*;
use datapath::PacketError;
use datapath::TcpSegment;
use datapath::packet::{attach_token, fix_checksums, reset_reply, rewrite_to_rst, strip_token};
use proptest::prelude::*;

fn v4() -> (SocketAddr, SocketAddr) {
    (
        "10.0.1.2:40000".parse().unwrap(),
        "10.0.2.2:5432".parse().unwrap(),
    )
}
fn v6() -> (SocketAddr, SocketAddr) {
    (
        "[fd00:1::2]:40000".parse().unwrap(),
        "[fd00:2::2]:5432".parse().unwrap(),
    )
}

/// The handshake packets Linux sends, for one address family.
fn handshake_packets(c: SocketAddr, s: SocketAddr) -> Vec<(&'static str, Vec<u8>)> {
    vec![
        (
            "syn",
            tcp_packet(c, s, 1000, 0, SYN, &linux_syn_options(7, 0), &[]),
        ),
        (
            "syn_ack",
            tcp_packet(s, c, 5000, 1001, SYN_ACK, &linux_syn_options(9, 7), &[]),
        ),
        (
            "ack",
            tcp_packet(c, s, 1001, 5001, ACK, &linux_ack_options(8, 9), &[]),
        ),
        ("bare_syn", tcp_packet(c, s, 1000, 0, SYN, &[], &[])),
        ("bare_ack", tcp_packet(c, s, 1001, 5001, ACK, &[], &[])),
        (
            "data",
            tcp_packet(
                c,
                s,
                1001,
                5001,
                PSH_ACK,
                &linux_ack_options(8, 9),
                b"hello",
            ),
        ),
    ]
}

fn token(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 + 3) as u8).collect()
}

#[test]
fn attach_then_strip_gives_back_the_packet_v4_and_v6() {
    for (c, s) in [v4(), v6()] {
        for (name, original) in handshake_packets(c, s) {
            for len in [1, 36, 200, identity::MAX_TOKEN_LEN] {
                let tok = token(len);
                let mut p = original.clone();
                let seg = TcpSegment::parse(&p).unwrap().unwrap();
                attach_token(&mut p, &seg, &tok).unwrap();
                assert!(checksums_ok(&p), "{name}/{len}: checksums after attach");
                assert_eq!(p.len(), original.len() + 8 + len);
                let seg2 = TcpSegment::parse(&p).unwrap().unwrap();
                assert_eq!(seg2.token(&p), Some(&tok[..]), "{name}");
                assert_eq!(seg2.tcp_header_len(), seg.tcp_header_len() + 8);
                assert_eq!(seg2.data_len(), seg.data_len());
                assert_eq!(
                    (seg2.seq, seg2.ack, seg2.flags),
                    (seg.seq, seg.ack, seg.flags)
                );
                strip_token(&mut p, &seg2).unwrap();
                assert_eq!(p, original, "{name}/{len}: strip(attach(p)) != p");
            }
        }
    }
}

#[test]
fn attached_option_sits_in_front_of_linux_options_which_stay_intact() {
    let (c, s) = v4();
    let original = tcp_packet(c, s, 1000, 0, SYN, &linux_syn_options(7, 0), &[]);
    let mut p = original.clone();
    let seg = TcpSegment::parse(&p).unwrap().unwrap();
    attach_token(&mut p, &seg, &token(100)).unwrap();
    // 20 bytes of Linux options + NOP NOP + 6-byte option = 28: data offset 12.
    assert_eq!(p[20 + 12] >> 4, 12);
    assert_eq!(&p[40..48], &[1, 1, 253, 6, 0x7e, 0x55, 0, 100]);
    assert_eq!(&p[48..68], &linux_syn_options(7, 0)[..]);
    assert_eq!(&p[68..], &token(100)[..]);
    // IPv4 total length covers it all.
    assert_eq!(u16::from_be_bytes([p[2], p[3]]) as usize, p.len());
}

#[test]
fn attach_fails_cleanly_when_options_are_full() {
    let (c, s) = v4();
    // 36 bytes of options: 8 more do not fit in 40.
    let mut opts = linux_syn_options(1, 2);
    opts.extend_from_slice(&[1; 16]);
    let original = tcp_packet(c, s, 1000, 0, SYN, &opts, &[]);
    let mut p = original.clone();
    let seg = TcpSegment::parse(&p).unwrap().unwrap();
    let err = attach_token(&mut p, &seg, &token(50)).unwrap_err();
    assert_eq!(err, PacketError::OptionsFull(36));
    assert_eq!(err.as_str(), "tcp_options_full");
    assert_eq!(p, original, "a failed attach leaves the packet alone");
    // 32 bytes still fit (exactly 40).
    let mut opts = linux_syn_options(1, 2);
    opts.extend_from_slice(&[1; 12]);
    let mut p = tcp_packet(c, s, 1000, 0, SYN, &opts, &[]);
    let seg = TcpSegment::parse(&p).unwrap().unwrap();
    attach_token(&mut p, &seg, &token(50)).unwrap();
    assert!(checksums_ok(&p));
}

#[test]
fn attach_refuses_empty_or_oversized_tokens_and_double_options() {
    let (c, s) = v4();
    let mut p = tcp_packet(c, s, 1, 0, SYN, &[], &[]);
    let seg = TcpSegment::parse(&p).unwrap().unwrap();
    assert!(matches!(
        attach_token(&mut p, &seg, &[]),
        Err(PacketError::TokenLength(0))
    ));
    assert!(matches!(
        attach_token(&mut p, &seg, &token(identity::MAX_TOKEN_LEN + 1)),
        Err(PacketError::TokenLength(_))
    ));
    attach_token(&mut p, &seg, &token(10)).unwrap();
    let seg = TcpSegment::parse(&p).unwrap().unwrap();
    assert!(matches!(
        attach_token(&mut p, &seg, &token(10)),
        Err(PacketError::OptionState(_))
    ));
}

#[test]
fn partial_checksum_from_offload_leaves_as_a_full_valid_checksum() {
    for (c, s) in [v4(), v6()] {
        for (name, original) in handshake_packets(c, s) {
            let mut partial = original.clone();
            make_partial(&mut partial);
            assert!(
                !checksums_ok(&partial),
                "{name}: partial is not a valid full checksum"
            );
            let seg = TcpSegment::parse(&partial).unwrap().unwrap();
            assert!(!seg.tcp_checksum_ok(&partial));
            let mut p = partial.clone();
            attach_token(&mut p, &seg, &token(64)).unwrap();
            assert!(checksums_ok(&p), "{name}: attach completes the checksum");
            let seg2 = TcpSegment::parse(&p).unwrap().unwrap();
            assert!(seg2.tcp_checksum_ok(&p));
            strip_token(&mut p, &seg2).unwrap();
            assert_eq!(p, original, "{name}: stripped packet has the full checksum");
            // A packet that is not modified otherwise can still be completed.
            let mut q = partial.clone();
            fix_checksums(&mut q, &seg).unwrap();
            assert_eq!(q, original);
        }
    }
}

#[test]
fn checksum_check_agrees_with_the_independent_one() {
    for (c, s) in [v4(), v6()] {
        for (_, mut p) in handshake_packets(c, s) {
            let seg = TcpSegment::parse(&p).unwrap().unwrap();
            assert!(seg.tcp_checksum_ok(&p));
            let last = p.len() - 1;
            p[last] ^= 0x40;
            assert!(!seg.tcp_checksum_ok(&p));
            assert!(!checksums_ok(&p));
        }
    }
}

#[test]
fn strip_repairs_padding_of_an_option_placed_elsewhere() {
    // A peer that put our option after the timestamps, with its own padding at the end.
    let (c, s) = v4();
    let mut opts = linux_ack_options(1, 2); // 12 bytes
    opts.extend_from_slice(&[253, 6, 0x7e, 0x55, 0, 4, 0, 0]); // option + EOL padding
    let p0 = tcp_packet(c, s, 1, 2, ACK, &opts, &[9, 9, 9, 9, b'x']);
    let mut p = p0.clone();
    let seg = TcpSegment::parse(&p).unwrap().unwrap();
    assert_eq!(seg.token(&p), Some(&[9u8, 9, 9, 9][..]));
    strip_token(&mut p, &seg).unwrap();
    let seg2 = TcpSegment::parse(&p).unwrap().unwrap();
    assert!(!seg2.has_option());
    assert_eq!(seg2.tcp_header_len() % 4, 0);
    assert_eq!(seg2.data_len(), 1);
    assert_eq!(*p.last().unwrap(), b'x');
    assert!(checksums_ok(&p));
}

#[test]
fn token_longer_than_the_payload_is_refused() {
    let (c, s) = v4();
    let opts = [1, 1, 253, 6, 0x7e, 0x55, 0, 10];
    let p = tcp_packet(c, s, 1, 0, SYN, &opts, &[1, 2, 3]);
    assert_eq!(
        TcpSegment::parse(&p).unwrap_err(),
        PacketError::TokenTruncated {
            announced: 10,
            payload: 3
        }
    );
}

#[test]
fn malformed_headers_are_errors_not_panics() {
    let (c, s) = v4();
    let good = tcp_packet(c, s, 1, 0, SYN, &linux_syn_options(1, 0), &[]);
    // Truncated anywhere.
    for n in 0..good.len() {
        assert!(TcpSegment::parse(&good[..n]).is_err(), "prefix {n}");
    }
    // IHL below 5.
    let mut p = good.clone();
    p[0] = 0x44;
    assert!(matches!(
        TcpSegment::parse(&p),
        Err(PacketError::BadIpHeader(_))
    ));
    // Fragment.
    let mut p = good.clone();
    p[6] = 0x20; // more fragments
    assert_eq!(TcpSegment::parse(&p), Err(PacketError::Fragment));
    let mut p = good.clone();
    p[7] = 1; // offset 8
    p[6] = 0;
    assert_eq!(TcpSegment::parse(&p), Err(PacketError::Fragment));
    // Data offset below 5 and beyond the segment.
    let mut p = good.clone();
    p[32] = 0x40;
    assert!(matches!(
        TcpSegment::parse(&p),
        Err(PacketError::BadTcpHeader(_))
    ));
    let mut p = good.clone();
    p[32] = 0xf0;
    assert!(matches!(
        TcpSegment::parse(&p),
        Err(PacketError::BadTcpHeader(_))
    ));
    // Bad IP version.
    let mut p = good.clone();
    p[0] = 0x55;
    assert_eq!(TcpSegment::parse(&p), Err(PacketError::BadIpVersion(5)));
    // Malformed options (length 1).
    let p = tcp_packet(c, s, 1, 0, SYN, &[2, 1, 0, 0], &[]);
    assert!(matches!(
        TcpSegment::parse(&p),
        Err(PacketError::BadTcpOptions(_))
    ));
    // IPv6 with a hop-by-hop header.
    let (c6, s6) = v6();
    let mut p = tcp_packet(c6, s6, 1, 0, SYN, &[], &[]);
    p[6] = 0;
    assert_eq!(
        TcpSegment::parse(&p),
        Err(PacketError::Ipv6ExtensionHeader(0))
    );
    // UDP is not TCP: parsed as "not TCP".
    let mut p = good.clone();
    p[9] = 17;
    assert_eq!(TcpSegment::parse(&p), Ok(None));
}

#[test]
fn trailing_bytes_beyond_the_ip_length_are_ignored_and_dropped_on_rewrite() {
    let (c, s) = v4();
    let original = tcp_packet(c, s, 1, 0, SYN, &linux_syn_options(1, 0), &[]);
    let mut p = original.clone();
    p.extend_from_slice(&[0xee; 6]);
    let seg = TcpSegment::parse(&p).unwrap().unwrap();
    assert_eq!(seg.ip_len(), original.len());
    attach_token(&mut p, &seg, &token(20)).unwrap();
    let seg = TcpSegment::parse(&p).unwrap().unwrap();
    strip_token(&mut p, &seg).unwrap();
    assert_eq!(p, original);
}

#[test]
fn rst_rewrite_makes_a_bare_valid_rst_ack() {
    for (c, s) in [v4(), v6()] {
        let mut p = tcp_packet(s, c, 5000, 1001, SYN_ACK, &linux_syn_options(9, 7), &[]);
        let seg = TcpSegment::parse(&p).unwrap().unwrap();
        attach_token(&mut p, &seg, &token(300)).unwrap();
        let seg = TcpSegment::parse(&p).unwrap().unwrap();
        rewrite_to_rst(&mut p, &seg).unwrap();
        let r = TcpSegment::parse(&p).unwrap().unwrap();
        assert_eq!(r.flags, RST_ACK);
        assert_eq!((r.seq, r.ack), (5000, 1001));
        assert_eq!(r.payload_len(), 0);
        assert_eq!(r.tcp_header_len(), 20);
        assert!(checksums_ok(&p));
    }
}

/// The RST a kernel without the connection answers with: back to the sender, at the sequence
/// number the sender acknowledged (so its kernel takes the reset at once), or, for a segment
/// without ACK, acknowledging all it sent (our token not counted: it takes no sequence space).
#[test]
fn reset_reply_answers_the_sender_as_its_kernel_expects() {
    for (c, s) in [v4(), v6()] {
        let data = tcp_packet(
            c,
            s,
            1001,
            5001,
            PSH_ACK,
            &linux_ack_options(1, 2),
            b"query",
        );
        let seg = TcpSegment::parse(&data).unwrap().unwrap();
        let rst = reset_reply(&seg).unwrap();
        let r = TcpSegment::parse(&rst).unwrap().unwrap();
        assert_eq!(
            (r.src, r.src_port, r.dst, r.dst_port),
            (s.ip(), s.port(), c.ip(), c.port())
        );
        assert_eq!((r.flags, r.seq), (RST, 5001));
        assert_eq!((r.payload_len(), r.tcp_header_len()), (0, 20));
        assert!(checksums_ok(&rst), "{c}");

        let mut fin = tcp_packet(c, s, 1001, 0, pnet_packet::tcp::TcpFlags::FIN, &[], b"bye");
        let seg = TcpSegment::parse(&fin).unwrap().unwrap();
        attach_token(&mut fin, &seg, &token(40)).unwrap();
        let seg = TcpSegment::parse(&fin).unwrap().unwrap();
        let r = reset_reply(&seg).unwrap();
        let r = TcpSegment::parse(&r).unwrap().unwrap();
        assert_eq!((r.flags, r.seq, r.ack), (RST_ACK, 0, 1001 + 3 + 1));
    }
}

fn arbitrary_packet() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..200),
        // Mostly-valid packets with random mutations.
        (
            any::<bool>(),
            proptest::collection::vec(any::<u8>(), 0..40),
            proptest::collection::vec(any::<u8>(), 0..100),
            proptest::collection::vec((any::<usize>(), any::<u8>()), 0..6),
        )
            .prop_map(|(v6_, mut opts, payload, muts)| {
                opts.truncate(opts.len() / 4 * 4);
                let (c, s) = if v6_ { v6() } else { v4() };
                let mut p = tcp_packet(c, s, 1, 2, SYN, &opts, &payload);
                for (i, b) in muts {
                    let n = p.len();
                    p[i % n] = b;
                }
                p
            }),
    ]
}

proptest! {
    #[test]
    fn parsers_and_rewriters_never_panic(p in arbitrary_packet(), tok in proptest::collection::vec(any::<u8>(), 0..1400)) {
        if let Ok(d) = datapath::IpDatagram::parse(&p) {
            prop_assert!(d.l4_start <= d.ip_len && d.ip_len <= p.len());
        }
        if let Ok(Some(seg)) = TcpSegment::parse(&p) {
            let _ = seg.tcp_checksum_ok(&p);
            let _ = seg.token(&p);
            let mut q = p.clone();
            let _ = strip_token(&mut q, &seg);
            let mut q = p.clone();
            if attach_token(&mut q, &seg, &tok).is_ok() {
                prop_assert!(q.len() <= seg.ip_len() + 8 + tok.len());
            }
            let mut q = p.clone();
            let _ = rewrite_to_rst(&mut q, &seg);
            let mut q = p.clone();
            let _ = fix_checksums(&mut q, &seg);
        }
    }

    #[test]
    fn attach_then_strip_is_identity(
        v6_ in any::<bool>(),
        opt_words in 0usize..9,
        payload in proptest::collection::vec(any::<u8>(), 0..300),
        tok in proptest::collection::vec(any::<u8>(), 1..=identity::MAX_TOKEN_LEN),
        flags_ in any::<u8>(),
    ) {
        let (c, s) = if v6_ { v6() } else { v4() };
        // Options: NOPs and timestamps, as many words as chosen (valid option lists).
        let mut opts = Vec::new();
        for i in 0..opt_words {
            if i % 3 == 0 { opts.extend_from_slice(&[1, 1, 1, 1]); } else { opts.extend_from_slice(&[2, 4, 5, 0xb4]); }
        }
        let original = tcp_packet(c, s, 77, 88, flags_, &opts, &payload);
        let mut p = original.clone();
        let seg = TcpSegment::parse(&p).unwrap().unwrap();
        match attach_token(&mut p, &seg, &tok) {
            Ok(()) => {
                prop_assert!(checksums_ok(&p));
                let seg2 = TcpSegment::parse(&p).unwrap().unwrap();
                prop_assert_eq!(seg2.token(&p), Some(&tok[..]));
                strip_token(&mut p, &seg2).unwrap();
                prop_assert_eq!(p, original);
            }
            Err(PacketError::OptionsFull(_)) => prop_assert!(opts.len() > 32),
            Err(e) => prop_assert!(false, "unexpected {e}"),
        }
    }
}

#[test]
fn ipv4_header_options_are_kept_and_skipped() {
    let (c, s) = v4();
    let mut original = tcp_packet(c, s, 1000, 0, SYN, &linux_syn_options(7, 0), &[]);
    // Insert 4 bytes of IP options (NOP NOP NOP EOL): IHL 6.
    original.splice(20..20, [1, 1, 1, 0]);
    original[0] = 0x46;
    let total = original.len() as u16;
    original[2..4].copy_from_slice(&total.to_be_bytes());
    original[10] = 0;
    original[11] = 0;
    let c_ip = pnet_packet::ipv4::checksum(&pnet_packet::ipv4::Ipv4Packet::new(&original).unwrap());
    original[10..12].copy_from_slice(&c_ip.to_be_bytes());
    assert!(checksums_ok(&original));
    let mut p = original.clone();
    let seg = TcpSegment::parse(&p).unwrap().unwrap();
    assert_eq!((seg.src_port, seg.dst_port), (40000, 5432));
    attach_token(&mut p, &seg, &token(99)).unwrap();
    assert!(checksums_ok(&p));
    assert_eq!(&p[20..24], &[1, 1, 1, 0], "IP options untouched");
    let seg = TcpSegment::parse(&p).unwrap().unwrap();
    strip_token(&mut p, &seg).unwrap();
    assert_eq!(p, original);
}
