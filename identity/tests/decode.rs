//! Decoders take arbitrary bytes without panicking; the TCP option encodes and parses.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use identity::wire::{AckToken, SynAckToken, SynToken, TcpOptionError};
use identity::{MAX_TOKEN_LEN, encode_tcp_option, parse_tcp_option};
use proptest::prelude::*;

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn token_decoders_never_panic_on_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..1500)) {
        let _ = SynToken::decode(&bytes);
        let _ = SynAckToken::decode(&bytes);
        let _ = AckToken::decode(&bytes);
        let _ = parse_tcp_option(&bytes);
    }

    #[test]
    fn the_server_never_panics_on_mutated_syns(pos in 0usize..200, val in any::<u8>(), cut in 0usize..4) {
        let (a, mut b) = psk_nodes();
        let (_, mut syn) = a.client_syn(&web_claims(), [7; 16], NOW);
        let p = pos % syn.len();
        syn[p] = val;
        syn.truncate(syn.len() - cut);
        let _ = b.server_syn(&syn, NOW);
    }

    #[test]
    fn valid_syns_round_trip(seed in any::<u64>()) {
        let (a, _) = psk_nodes();
        let (_, syn) = a.client_syn(&web_claims(), seed_nonce(seed), NOW + seed % 1000);
        let tok = SynToken::decode(&syn).unwrap();
        prop_assert_eq!(tok.encode(), syn);
    }
}

fn seed_nonce(s: u64) -> [u8; 16] {
    let mut n = [0u8; 16];
    n[..8].copy_from_slice(&s.to_le_bytes());
    n
}

#[test]
fn oversized_input_is_rejected_before_parsing() {
    let big = vec![1u8; MAX_TOKEN_LEN + 1];
    assert_eq!(SynToken::decode(&big).unwrap_err().as_str(), "malformed");
}

#[test]
fn tcp_option_round_trips_among_other_options() {
    let ours = encode_tcp_option(512);
    assert_eq!(ours, [253, 6, 0x7E, 0x55, 0x02, 0x00]);
    // MSS, NOP, NOP, SACK-permitted, another RFC 6994 user (ExID 0x1234), ours, NOPs, EOL.
    let mut opts = vec![2, 4, 0x05, 0xb4, 1, 1, 4, 2, 253, 4, 0x12, 0x34];
    opts.extend_from_slice(&ours);
    opts.extend_from_slice(&[1, 1, 0, 0]);
    assert_eq!(parse_tcp_option(&opts), Ok(Some(512)));
    assert_eq!(parse_tcp_option(&[2, 4, 0x05, 0xb4]), Ok(None));
    assert_eq!(parse_tcp_option(&[]), Ok(None));
}

#[test]
fn malformed_tcp_options_are_reported() {
    assert_eq!(parse_tcp_option(&[2]), Err(TcpOptionError::Malformed(0)));
    assert_eq!(parse_tcp_option(&[2, 1]), Err(TcpOptionError::Malformed(0)));
    assert_eq!(
        parse_tcp_option(&[1, 2, 10, 0]),
        Err(TcpOptionError::Malformed(1))
    );
    assert_eq!(
        parse_tcp_option(&[253, 8, 0x7E, 0x55, 0, 1, 0, 0]),
        Err(TcpOptionError::BadLength(8))
    );
    assert_eq!(
        parse_tcp_option(&encode_tcp_option(0)),
        Err(TcpOptionError::BadTokenLength(0))
    );
    let too_long = encode_tcp_option(MAX_TOKEN_LEN as u16 + 1);
    assert!(matches!(
        parse_tcp_option(&too_long),
        Err(TcpOptionError::BadTokenLength(_))
    ));
    let mut twice = encode_tcp_option(40).to_vec();
    twice.extend_from_slice(&encode_tcp_option(40));
    assert_eq!(parse_tcp_option(&twice), Err(TcpOptionError::Duplicate));
}
