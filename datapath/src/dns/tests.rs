use super::*;

use proptest::prelude::*;
use simple_dns::rdata::{A, AAAA, CNAME};
use simple_dns::{QTYPE, Question, ResourceRecord, TYPE};

/// What a record of a test answer holds.
#[derive(Clone, Copy)]
enum Rd {
    A(&'static str),
    Aaaa(&'static str),
    Cname(&'static str),
}

/// A DNS answer to `qname` (type A, class IN) with the given answer and additional records,
/// as a resolver would send it (names compressed).
fn answer_with(
    qname: &str,
    answers: &[(&str, u32, Rd)],
    additional: &[(&str, u32, Rd)],
) -> Vec<u8> {
    let mut p = Packet::new_reply(0x1234);
    p.questions.push(Question::new(
        Name::new_unchecked(qname),
        QTYPE::TYPE(TYPE::A),
        QCLASS::CLASS(CLASS::IN),
        false,
    ));
    let rr = |(owner, ttl, rd): &(&str, u32, Rd)| {
        let rdata = match *rd {
            Rd::A(a) => RData::A(A {
                address: a.parse::<Ipv4Addr>().unwrap().into(),
            }),
            Rd::Aaaa(a) => RData::AAAA(AAAA {
                address: a.parse::<Ipv6Addr>().unwrap().into(),
            }),
            Rd::Cname(t) => RData::CNAME(CNAME(Name::new_unchecked(t).into_owned())),
        };
        ResourceRecord::new(
            Name::new_unchecked(owner).into_owned(),
            CLASS::IN,
            *ttl,
            rdata,
        )
    };
    p.answers.extend(answers.iter().map(rr));
    p.additional_records.extend(additional.iter().map(rr));
    p.build_bytes_vec_compressed().unwrap()
}

fn answer(qname: &str, answers: &[(&str, u32, Rd)]) -> Vec<u8> {
    answer_with(qname, answers, &[])
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// (address, name, ttl) triples of an answer, sorted.
fn triples(a: &Answer) -> Vec<(IpAddr, String, u32)> {
    let mut v: Vec<_> = a
        .resolved
        .iter()
        .map(|r| (r.ip, a.names[r.name].clone(), r.ttl_s))
        .collect();
    v.sort();
    v
}

fn t(ipa: &str, name: &str, ttl: u32) -> (IpAddr, String, u32) {
    (ip(ipa), name.to_owned(), ttl)
}

#[test]
fn a_records_of_the_question_are_resolved() {
    let a = parse_answer(&answer(
        "www.example.com",
        &[
            ("www.example.com", 60, Rd::A("192.0.2.7")),
            ("www.example.com", 30, Rd::A("192.0.2.8")),
        ],
    ))
    .unwrap();
    assert_eq!(a.names, ["www.example.com"]);
    assert_eq!(
        triples(&a),
        [
            t("192.0.2.7", "www.example.com", 60),
            t("192.0.2.8", "www.example.com", 30)
        ]
    );
}

#[test]
fn aaaa_records_are_resolved() {
    let a = parse_answer(&answer(
        "v6.example.com",
        &[("v6.example.com", 120, Rd::Aaaa("2001:db8::7"))],
    ))
    .unwrap();
    assert_eq!(triples(&a), [t("2001:db8::7", "v6.example.com", 120)]);
}

#[test]
fn a_cname_chain_gives_the_address_to_every_name_with_the_smallest_ttl_on_the_way() {
    let a = parse_answer(&answer(
        "www.example.com",
        &[
            ("www.example.com", 300, Rd::Cname("edge.cdn.net")),
            ("edge.cdn.net", 60, Rd::A("192.0.2.7")),
        ],
    ))
    .unwrap();
    assert_eq!(a.names, ["www.example.com", "edge.cdn.net"]);
    assert_eq!(
        triples(&a),
        [
            t("192.0.2.7", "edge.cdn.net", 60),
            t("192.0.2.7", "www.example.com", 60)
        ]
    );

    // Three links, the middle one shortest; records in any order.
    let a = parse_answer(&answer(
        "api.example.com",
        &[
            ("c.cdn.net", 600, Rd::Aaaa("2001:db8::1")),
            ("b.example.net", 20, Rd::Cname("c.cdn.net")),
            ("api.example.com", 3600, Rd::Cname("b.example.net")),
        ],
    ))
    .unwrap();
    assert_eq!(a.names, ["api.example.com", "b.example.net", "c.cdn.net"]);
    assert_eq!(
        triples(&a),
        [
            t("2001:db8::1", "api.example.com", 20),
            t("2001:db8::1", "b.example.net", 20),
            t("2001:db8::1", "c.cdn.net", 600)
        ]
    );
}

#[test]
fn records_off_the_chain_are_ignored() {
    // The classic poisoning: records about other names in the answer and additional sections,
    // and a CNAME that does not start at the question.
    let a = parse_answer(&answer_with(
        "www.example.com",
        &[
            ("www.example.com", 60, Rd::Cname("edge.cdn.net")),
            ("edge.cdn.net", 60, Rd::A("192.0.2.7")),
            ("allowed.example.org", 86_400, Rd::A("203.0.113.66")),
            ("bank.example.org", 86_400, Rd::Cname("edge.cdn.net")),
        ],
        &[("allowed.example.org", 86_400, Rd::A("203.0.113.67"))],
    ))
    .unwrap();
    assert_eq!(a.names, ["www.example.com", "edge.cdn.net"]);
    assert_eq!(
        triples(&a),
        [
            t("192.0.2.7", "edge.cdn.net", 60),
            t("192.0.2.7", "www.example.com", 60)
        ]
    );
}

#[test]
fn names_are_lowercase_without_the_trailing_dot_and_match_case_insensitively() {
    let a = parse_answer(&answer(
        "WWW.Example.COM.",
        &[("www.EXAMPLE.com", 60, Rd::A("192.0.2.7"))],
    ))
    .unwrap();
    assert_eq!(triples(&a), [t("192.0.2.7", "www.example.com", 60)]);
}

#[test]
fn a_name_no_policy_could_spell_is_left_out_but_the_chain_is_followed() {
    // A label with a dot inside would read as another name ("evil.example.com").
    let mut p = Packet::new_reply(1);
    let weird = Name::new_with_labels(&[
        simple_dns::Label::new_unchecked(&b"evil.example"[..]),
        simple_dns::Label::new_unchecked(&b"com"[..]),
    ]);
    p.questions.push(Question::new(
        Name::new_unchecked("www.example.com"),
        QTYPE::TYPE(TYPE::A),
        QCLASS::CLASS(CLASS::IN),
        false,
    ));
    p.answers.push(ResourceRecord::new(
        Name::new_unchecked("www.example.com"),
        CLASS::IN,
        60,
        RData::CNAME(CNAME(weird.clone())),
    ));
    p.answers.push(ResourceRecord::new(
        weird,
        CLASS::IN,
        60,
        RData::A(A {
            address: 0xc000_0207,
        }),
    ));
    let a = parse_answer(&p.build_bytes_vec().unwrap()).unwrap();
    assert_eq!(a.names, ["www.example.com"]);
    assert_eq!(triples(&a), [t("192.0.2.7", "www.example.com", 60)]);
}

#[test]
fn a_ttl_with_the_top_bit_set_is_zero() {
    let a = parse_answer(&answer(
        "www.example.com",
        &[("www.example.com", 0x8000_0001, Rd::A("192.0.2.7"))],
    ))
    .unwrap();
    assert_eq!(triples(&a), [t("192.0.2.7", "www.example.com", 0)]);
}

#[test]
fn an_answer_without_addresses_resolves_nothing() {
    let a = parse_answer(&answer(
        "www.example.com",
        &[("www.example.com", 60, Rd::Cname("edge.cdn.net"))],
    ))
    .unwrap();
    assert_eq!(a.names, ["www.example.com", "edge.cdn.net"]);
    assert!(a.resolved.is_empty());
}

#[test]
fn cname_loops_and_long_chains_are_refused() {
    let looped = answer(
        "a.example.com",
        &[
            ("a.example.com", 60, Rd::Cname("b.example.com")),
            ("b.example.com", 60, Rd::Cname("a.example.com")),
            ("b.example.com", 60, Rd::A("192.0.2.7")),
        ],
    );
    assert_eq!(parse_answer(&looped), Err(DnsError::CnameLoop));
    let own = answer(
        "a.example.com",
        &[("a.example.com", 60, Rd::Cname("a.example.com"))],
    );
    assert_eq!(parse_answer(&own), Err(DnsError::CnameLoop));

    let names: Vec<String> = (0..=MAX_CNAME_CHAIN + 1)
        .map(|i| format!("n{i}.example.com"))
        .collect();
    let chain = |links: usize| {
        let mut records: Vec<(&str, u32, Rd)> = Vec::new();
        let leaked: Vec<&'static str> = names.iter().map(|n| &*n.clone().leak()).collect();
        for i in 0..links {
            records.push((leaked[i], 60, Rd::Cname(leaked[i + 1])));
        }
        records.push((leaked[links], 60, Rd::A("192.0.2.7")));
        answer(leaked[0], &records)
    };
    let ok = parse_answer(&chain(MAX_CNAME_CHAIN)).unwrap();
    assert_eq!(ok.resolved.len(), MAX_CNAME_CHAIN + 1);
    assert_eq!(
        parse_answer(&chain(MAX_CNAME_CHAIN + 1)),
        Err(DnsError::ChainTooLong)
    );
}

/// A 12-byte header: id 0x1234, the given flags word and counts.
fn header(flags: u16, counts: [u16; 4]) -> Vec<u8> {
    let mut h = vec![0x12, 0x34];
    h.extend_from_slice(&flags.to_be_bytes());
    for c in counts {
        h.extend_from_slice(&c.to_be_bytes());
    }
    h
}

const QR: u16 = 0x8000;

#[test]
fn only_complete_noerror_answers_to_one_in_question_are_learnt() {
    let good = answer(
        "www.example.com",
        &[("www.example.com", 60, Rd::A("192.0.2.7"))],
    );
    assert!(parse_answer(&good).is_ok());
    let with_flags = |set: u16, clear: u16| {
        let mut p = good.clone();
        let f = (u16::from_be_bytes([p[2], p[3]]) | set) & !clear;
        p[2..4].copy_from_slice(&f.to_be_bytes());
        p
    };
    assert_eq!(parse_answer(&with_flags(0, QR)), Err(DnsError::NotResponse));
    assert_eq!(
        parse_answer(&with_flags(0x0200, 0)),
        Err(DnsError::Truncated)
    );
    assert_eq!(parse_answer(&with_flags(0x0003, 0)), Err(DnsError::Rcode)); // NXDOMAIN
    assert_eq!(parse_answer(&with_flags(0x0002, 0)), Err(DnsError::Rcode)); // SERVFAIL
    assert_eq!(parse_answer(&with_flags(2 << 11, 0)), Err(DnsError::Opcode)); // STATUS

    // No question, two questions.
    let mut none = header(QR, [0, 0, 0, 0]);
    assert_eq!(parse_answer(&none), Err(DnsError::Question));
    none[5] = 2;
    assert_eq!(parse_answer(&none), Err(DnsError::Question));

    // A question of class CH.
    let mut ch = good.clone();
    let qend = 12 + "www.example.com".len() + 2;
    ch[qend + 2..qend + 4].copy_from_slice(&3u16.to_be_bytes());
    assert_eq!(parse_answer(&ch), Err(DnsError::Question));
}

#[test]
fn hostile_counts_and_sizes_are_refused_before_decoding() {
    // 65,535 answers announced in a 12-byte message: refused on the header, nothing decoded.
    let mut p = header(QR, [1, u16::MAX, 0, 0]);
    assert_eq!(parse_answer(&p), Err(DnsError::TooManyRecords));
    p = header(QR, [1, 10, u16::MAX, u16::MAX]);
    assert_eq!(parse_answer(&p), Err(DnsError::TooManyRecords));
    p = header(QR, [1, MAX_ANSWER_RECORDS + 1, 0, 0]);
    assert_eq!(parse_answer(&p), Err(DnsError::TooManyRecords));
    // Within the limits but not there: malformed.
    p = header(QR, [1, MAX_ANSWER_RECORDS, 0, 0]);
    assert_eq!(parse_answer(&p), Err(DnsError::Malformed));

    let big = vec![0u8; MAX_MESSAGE_LEN + 1];
    assert_eq!(parse_answer(&big), Err(DnsError::TooLarge));
    for short in [&[][..], &[0x12][..], &[0x12, 0x34, 0x80][..]] {
        assert_eq!(parse_answer(short), Err(DnsError::Malformed));
    }
}

#[test]
fn compression_pointers_only_point_backwards() {
    // The question's name is a pointer to itself (offset 12): a loop.
    let mut p = header(QR, [1, 0, 0, 0]);
    p.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1]);
    assert_eq!(parse_answer(&p), Err(DnsError::Malformed));
    // Two pointers to each other.
    let mut p = header(QR, [1, 1, 0, 0]);
    p.extend_from_slice(&[0xc0, 0x12, 0, 1, 0, 1]); // question name → offset 18 (forward)
    p.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4, 192, 0, 2, 7]);
    assert_eq!(parse_answer(&p), Err(DnsError::Malformed));
    // A pointer past the end.
    let mut p = header(QR, [1, 0, 0, 0]);
    p.extend_from_slice(&[0xff, 0xff, 0, 1, 0, 1]);
    assert_eq!(parse_answer(&p), Err(DnsError::Malformed));
    // A long backward chain of pointers is fine (each jump goes strictly back), here hidden in
    // the data of a record of an unknown type, and used by the next record's owner name.
    let mut p = header(QR, [1, 2, 0, 0]);
    p.extend_from_slice(b"\x03www\x07example\x03com\x00\x00\x01\x00\x01");
    p.extend_from_slice(&[0xc0, 0x0c, 0xff, 0x00, 0, 1, 0, 0, 0, 60]);
    let hops = 200u16;
    p.extend_from_slice(&(hops * 2).to_be_bytes());
    let mut target = 12u16;
    for _ in 0..hops {
        let at = p.len() as u16;
        p.extend_from_slice(&(0xc000 | target).to_be_bytes());
        target = at;
    }
    p.extend_from_slice(&(0xc000 | target).to_be_bytes());
    p.extend_from_slice(&[0, 1, 0, 1, 0, 0, 0, 60, 0, 4, 192, 0, 2, 7]);
    let a = parse_answer(&p).unwrap();
    assert_eq!(triples(&a), [t("192.0.2.7", "www.example.com", 60)]);
}

#[test]
fn a_record_of_another_class_is_ignored() {
    let mut p = answer(
        "www.example.com",
        &[("www.example.com", 60, Rd::A("192.0.2.7"))],
    );
    // The record's class: after the question (17 + 4 bytes), the owner pointer (2) and type (2).
    let at = 12 + 17 + 4 + 2 + 2;
    assert_eq!(&p[at..at + 2], &[0, 1]);
    p[at..at + 2].copy_from_slice(&3u16.to_be_bytes());
    let a = parse_answer(&p).unwrap();
    assert!(a.resolved.is_empty());
}

#[test]
fn every_error_has_its_own_label() {
    let labels: std::collections::BTreeSet<_> = DnsError::ALL.iter().map(|e| e.as_str()).collect();
    assert_eq!(labels.len(), DnsError::ALL.len());
}

/// Upper bound of the (address, name) pairs one answer can give.
const MAX_RESOLVED: usize = MAX_ANSWER_RECORDS as usize * (MAX_CNAME_CHAIN + 1);

proptest! {
    #![proptest_config(ProptestConfig::with_cases(4096))]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
        if let Ok(a) = parse_answer(&bytes) {
            prop_assert!(a.resolved.len() <= MAX_RESOLVED);
            prop_assert!(a.resolved.iter().all(|r| r.name < a.names.len()));
        }
    }

    #[test]
    fn arbitrary_bytes_behind_a_plausible_header_never_panic(
        counts in proptest::array::uniform4(0u16..6),
        flags in any::<u16>(),
        body in proptest::collection::vec(any::<u8>(), 0..400),
    ) {
        let mut p = header(flags | QR, counts);
        p.extend_from_slice(&body);
        if let Ok(a) = parse_answer(&p) {
            prop_assert!(a.resolved.len() <= MAX_RESOLVED);
        }
    }

    #[test]
    fn mutated_answers_never_panic(
        edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
        cut in any::<prop::sample::Index>(),
    ) {
        let mut p = answer_with(
            "www.example.com",
            &[
                ("www.example.com", 300, Rd::Cname("edge.cdn.net")),
                ("edge.cdn.net", 60, Rd::A("192.0.2.7")),
                ("edge.cdn.net", 60, Rd::Aaaa("2001:db8::7")),
            ],
            &[("ns.cdn.net", 60, Rd::A("192.0.2.53"))],
        );
        for (i, b) in edits {
            let i = i.index(p.len());
            p[i] = b;
        }
        let keep = cut.index(p.len() + 1);
        p.truncate(keep.max(12));
        if let Ok(a) = parse_answer(&p) {
            prop_assert!(a.resolved.len() <= MAX_RESOLVED);
            prop_assert!(a.resolved.iter().all(|r| r.name < a.names.len()));
            prop_assert!(a.names.iter().all(|n| n.bytes().all(|c| c.is_ascii_lowercase()
                || c.is_ascii_digit() || c == b'-' || c == b'_' || c == b'.')));
        }
    }
}
