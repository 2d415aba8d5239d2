#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Names learnt from the DNS answers a workload receives, in memory: an answer handed to
//! `Processor::learn_dns_answer` (what the rules' DNS queue delivers) is learnt and accepted
//! unchanged; the workload's later egress decisions to the resolved addresses carry the names
//! until their TTL runs out; answers that reach the processor any other way, answers about
//! other names, answers from resolvers not trusted and malformed answers teach nothing and
//! still pass; with an admin `domainNames` policy, what was resolved is what is allowed.

mod common;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use common::*;
use datapath::{ProcessorConfig, Verdict, WorkloadId};
use simple_dns::rdata::{A, AAAA, CNAME, RData};
use simple_dns::{CLASS, Name, Packet, QCLASS, QTYPE, Question, ResourceRecord, TYPE};

/// The cluster resolver as the workload sees it.
const RESOLVER: &str = "10.96.0.10:53";
/// An external server, known only by its address.
const EXT: &str = "203.0.113.7:443";
/// Another one.
const EXT2: &str = "203.0.113.66:443";

fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

enum Rd {
    A(&'static str),
    Aaaa(&'static str),
    Cname(&'static str),
}

/// A resolver's answer to an A question for `qname`.
fn answer(qname: &str, records: &[(&str, u32, Rd)]) -> Vec<u8> {
    let mut p = Packet::new_reply(0x4242);
    p.questions.push(Question::new(
        Name::new_unchecked(qname),
        QTYPE::TYPE(TYPE::A),
        QCLASS::CLASS(CLASS::IN),
        false,
    ));
    for (owner, ttl, rd) in records {
        let rdata = match rd {
            Rd::A(a) => RData::A(A {
                address: a.parse::<Ipv4Addr>().unwrap().into(),
            }),
            Rd::Aaaa(a) => RData::AAAA(AAAA {
                address: a.parse::<std::net::Ipv6Addr>().unwrap().into(),
            }),
            Rd::Cname(t) => RData::CNAME(CNAME(Name::new_unchecked(t))),
        };
        p.answers.push(ResourceRecord::new(
            Name::new_unchecked(owner),
            CLASS::IN,
            *ttl,
            rdata,
        ));
    }
    p.build_bytes_vec_compressed().unwrap()
}

/// The answer to `www.example.com` through a CDN: 203.0.113.7 for 60 s.
fn cdn_answer() -> Vec<u8> {
    answer(
        "www.example.com",
        &[
            ("www.example.com", 300, Rd::Cname("edge.cdn.example.net")),
            ("edge.cdn.example.net", 60, Rd::A("203.0.113.7")),
        ],
    )
}

/// The web workload (WEB, on node a) with no policy: every egress is allowed, so what the
/// tests look at is what the decisions carried.
fn world() -> World {
    World::new(Mode::Psk, "")
}

/// The resolver's answer reaching the web workload on the DNS queue.
fn learn(w: &mut World, payload: &[u8]) -> Verdict {
    let p = udp(sa(RESOLVER), SocketAddr::new(WEB.ip, 40000), payload);
    w.a.learn_dns_answer(ID, &p, w.now)
}

fn names(w: &World, ip: &str) -> Vec<String> {
    w.a.resolved_names(ID, ip.parse().unwrap(), w.now)
}

/// A TCP connection from web to `server` (known only by its address): SYN out, the server's
/// token-less SYN-ACK in, which is where the client's egress is decided.
fn connect_out(w: &mut World, server: SocketAddr, port: u16) -> Verdict {
    let c = SocketAddr::new(WEB.ip, port);
    let (v, _) = w.out_a(&tcp_packet(
        c,
        server,
        ISN_C,
        0,
        SYN,
        &linux_syn_options(1, 0),
        &[],
    ));
    assert!(v.accept, "{v:?}");
    let (v, _) = w.in_a(&tcp_packet(
        server,
        c,
        ISN_S,
        ISN_C + 1,
        SYN_ACK,
        &linux_syn_options(2, 1),
        &[],
    ));
    v
}

fn passed_unchanged(v: &Verdict) -> bool {
    *v == Verdict::accept(false)
}

#[test]
fn an_answer_is_learnt_and_passes_unchanged() {
    let mut w = world();
    let v = learn(&mut w, &cdn_answer());
    assert!(passed_unchanged(&v), "{v:?}");
    assert_eq!(
        names(&w, "203.0.113.7"),
        ["edge.cdn.example.net", "www.example.com"]
    );
    assert_eq!(w.a.metrics().dns_answers("learnt"), 1);
    assert_eq!(w.a.dns_cache_len(), 2);
    assert_eq!(w.a.metrics().dns_cache().0, 2);
    // Nothing counted as a rejection, nothing else changed.
    assert_eq!(w.a.metrics().rejected_total(), 0);
    assert_eq!(w.a.flow_count(), 0);
    let mut text = String::new();
    w.a.metrics().render_prometheus(&mut text);
    assert!(
        text.contains("tessera_dns_answers_total{result=\"learnt\"} 1\n"),
        "{text}"
    );
    assert!(text.contains("tessera_dns_cache_entries 2\n"), "{text}");
}

#[test]
fn egress_decisions_to_a_resolved_address_carry_its_names() {
    let mut w = world();
    // Before any answer: nothing to carry.
    let v = connect_out(&mut w, sa(EXT), 40001);
    assert!(v.accept && v.mark_authorized, "{v:?}");
    assert_eq!(w.a.metrics().dns_decisions(), 0);

    learn(&mut w, &cdn_answer());
    let v = connect_out(&mut w, sa(EXT), 40002);
    assert!(v.accept && v.mark_authorized, "{v:?}");
    assert_eq!(
        w.a.metrics().dns_decisions(),
        1,
        "the SYN-ACK's egress decision"
    );

    // UDP to the same address (a public one: decided on its address at the first datagram).
    let (v, _) = w.out_a(&udp(
        SocketAddr::new(WEB.ip, 40003),
        sa("203.0.113.7:443"),
        b"quic",
    ));
    assert!(v.accept && v.mark_authorized, "{v:?}");
    assert_eq!(w.a.metrics().dns_decisions(), 2);

    // Another address the answer did not resolve: no names.
    let v = connect_out(&mut w, sa(EXT2), 40004);
    assert!(v.accept, "{v:?}");
    assert_eq!(w.a.metrics().dns_decisions(), 2);
    // Ingress from the resolved address carries none either (names are for egress).
    let (v, _) = w.in_a(&udp(
        sa("203.0.113.7:5000"),
        SocketAddr::new(WEB.ip, 9),
        b"x",
    ));
    assert!(v.accept, "{v:?}");
    assert_eq!(w.a.metrics().dns_decisions(), 2);
    let mut text = String::new();
    w.a.metrics().render_prometheus(&mut text);
    assert!(
        text.contains("tessera_dns_egress_decisions_total 2\n"),
        "{text}"
    );
}

#[test]
fn ipv6_answers_are_learnt_too() {
    let mut w = world();
    let p = answer(
        "v6.example.com",
        &[("v6.example.com", 60, Rd::Aaaa("2001:db8::7"))],
    );
    // Over IPv6, from an IPv6 resolver.
    let d = udp(sa("[fd00::53]:53"), sa("[fd00::1:2]:40000"), &p);
    assert!(passed_unchanged(&w.a.learn_dns_answer(ID, &d, w.now)));
    assert_eq!(names(&w, "2001:db8::7"), ["v6.example.com"]);
}

#[test]
fn names_run_out_with_their_ttl_and_new_connections_then_carry_none() {
    let mut w = world();
    let p = answer(
        "short.example.com",
        &[("short.example.com", 10, Rd::A("203.0.113.7"))],
    );
    learn(&mut w, &p);
    let start = w.now;
    w.now = start + 9_999;
    assert_eq!(names(&w, "203.0.113.7"), ["short.example.com"]);
    connect_out(&mut w, sa(EXT), 40001);
    assert_eq!(w.a.metrics().dns_decisions(), 1);
    w.now = start + 10_000;
    assert!(names(&w, "203.0.113.7").is_empty());
    connect_out(&mut w, sa(EXT), 40002);
    assert_eq!(w.a.metrics().dns_decisions(), 1, "expired: not carried");
    // Expiry removes it (the agent calls `expire` every second).
    assert_eq!(w.a.dns_cache_len(), 1);
    w.a.expire(w.now);
    assert_eq!(w.a.dns_cache_len(), 0);
    assert_eq!(w.a.metrics().dns_cache(), (0, 0, 1));
}

#[test]
fn a_zero_ttl_answer_serves_the_connection_that_follows() {
    let mut w = world();
    let p = answer(
        "zero.example.com",
        &[("zero.example.com", 0, Rd::A("203.0.113.7"))],
    );
    learn(&mut w, &p);
    let start = w.now;
    // The SYN-ACK comes a round trip later (here: after a lost SYN's retransmission, 1 s).
    w.now = start + 1_200;
    connect_out(&mut w, sa(EXT), 40001);
    assert_eq!(w.a.metrics().dns_decisions(), 1);
    // The floor is 5 s.
    w.now = start + 5_000;
    assert!(names(&w, "203.0.113.7").is_empty());
}

#[test]
fn an_answer_on_the_ordinary_queue_is_not_learnt() {
    // A datagram from port 53 that the DNS rule did not queue (it is not the reply of a flow
    // the workload opened, e.g. a spoofed "answer" opening a flow): decided as any ingress
    // datagram, never learnt.
    let mut w = world();
    let p = udp(sa(RESOLVER), SocketAddr::new(WEB.ip, 40000), &cdn_answer());
    let (v, _) = w.in_a(&p);
    assert!(v.accept, "{v:?}"); // web is not isolated for ingress
    assert!(names(&w, "203.0.113.7").is_empty());
    assert_eq!(w.a.dns_cache_len(), 0);
}

#[test]
fn records_about_other_names_are_not_learnt() {
    let mut w = world();
    let p = answer(
        "www.example.com",
        &[
            ("www.example.com", 60, Rd::A("203.0.113.7")),
            ("allowed.example.org", 86_400, Rd::A("203.0.113.66")),
            ("bank.example.org", 86_400, Rd::Cname("www.example.com")),
        ],
    );
    assert!(passed_unchanged(&learn(&mut w, &p)));
    assert_eq!(names(&w, "203.0.113.7"), ["www.example.com"]);
    assert!(names(&w, "203.0.113.66").is_empty());
}

#[test]
fn only_trusted_resolvers_are_learnt_from_when_they_are_set() {
    let mut w = world();
    w.a.set_dns_servers(vec!["10.96.0.10/32".parse().unwrap()]);
    // From another server (one the workload may query directly): passes, not learnt.
    let p = udp(
        sa("198.51.100.53:53"),
        SocketAddr::new(WEB.ip, 40000),
        &cdn_answer(),
    );
    assert!(passed_unchanged(&w.a.learn_dns_answer(ID, &p, w.now)));
    assert!(names(&w, "203.0.113.7").is_empty());
    assert_eq!(w.a.metrics().dns_answers("untrusted_server"), 1);
    // From the cluster resolver: learnt.
    learn(&mut w, &cdn_answer());
    assert_eq!(names(&w, "203.0.113.7").len(), 2);
}

#[test]
fn workloads_learn_only_for_themselves() {
    let (na, _) = nodes(Mode::Psk, "dns");
    let api = Pod {
        name: "api-1",
        labels: &[("app", "api")],
        ip: IpAddr::V4(Ipv4Addr::new(10, 0, 1, 3)),
        ..WEB
    };
    let mut p = processor(na, NS, &[&WEB, &api], ProcessorConfig::default());
    let d = udp(sa(RESOLVER), SocketAddr::new(WEB.ip, 40000), &cdn_answer());
    p.learn_dns_answer(WorkloadId(1), &d, NOW);
    let ext: IpAddr = "203.0.113.7".parse().unwrap();
    assert_eq!(p.resolved_names(WorkloadId(1), ext, NOW).len(), 2);
    assert!(p.resolved_names(WorkloadId(2), ext, NOW).is_empty());
    // A removed workload's names go with it.
    p.remove_workload(WorkloadId(1));
    assert_eq!(p.dns_cache_len(), 0);
    // An unknown workload learns nothing; its answer still passes.
    let v = p.learn_dns_answer(WorkloadId(9), &d, NOW);
    assert!(passed_unchanged(&v));
    assert_eq!(p.metrics().dns_answers("unknown_workload"), 1);
}

#[test]
fn what_cannot_be_learnt_from_still_passes_and_is_counted() {
    let mut w = world();
    let good = cdn_answer();
    let mut nxdomain = good.clone();
    nxdomain[3] = (nxdomain[3] & 0xf0) | 3;
    let mut truncated = good.clone();
    truncated[2] |= 0x02;
    let mut query = good.clone();
    query[2] &= 0x7f;
    let nodata = answer(
        "www.example.com",
        &[("www.example.com", 60, Rd::Cname("edge.cdn.example.net"))],
    );
    let cases: [(&[u8], &str); 6] = [
        (&nxdomain, "rcode"),
        (&truncated, "truncated"),
        (&query, "not_response"),
        (b"\x12\x34\x81\x80garbage", "malformed"),
        (&[0u8; 5000], "too_large"),
        (&nodata, "no_address"),
    ];
    for (payload, result) in cases {
        let v = learn(&mut w, payload);
        assert!(passed_unchanged(&v), "{result}: {v:?}");
        assert_eq!(w.a.metrics().dns_answers(result), 1, "{result}");
    }
    // Not UDP from port 53 (the rule never queues it; defensive), a broken packet.
    let other = udp(sa("10.96.0.10:5353"), SocketAddr::new(WEB.ip, 40000), &good);
    assert!(passed_unchanged(&w.a.learn_dns_answer(ID, &other, w.now)));
    assert_eq!(w.a.metrics().dns_answers("not_dns"), 1);
    assert!(passed_unchanged(&w.a.learn_dns_answer(
        ID,
        &[0x45, 0],
        w.now
    )));
    assert_eq!(w.a.dns_cache_len(), 0);
    assert_eq!(w.a.metrics().rejected_total(), 0, "no packet was dropped");
}

#[test]
fn arbitrary_bytes_as_a_dns_answer_always_pass() {
    use proptest::prelude::*;
    let w = std::cell::RefCell::new(world());
    let c = SocketAddr::new(WEB.ip, 40000);
    let mut runner = proptest::test_runner::TestRunner::new(proptest::test_runner::Config {
        cases: 2048,
        ..Default::default()
    });
    runner
        .run(&proptest::collection::vec(any::<u8>(), 0..700), |payload| {
            let mut w = w.borrow_mut();
            let now = w.now;
            let p = udp(sa(RESOLVER), c, &payload);
            let v = w.a.learn_dns_answer(ID, &p, now);
            prop_assert!(passed_unchanged(&v));
            // Raw packets too.
            let v = w.a.learn_dns_answer(ID, &payload, now);
            prop_assert!(passed_unchanged(&v));
            Ok(())
        })
        .unwrap();
    let w = w.borrow();
    assert!(w.a.dns_cache_len() <= ProcessorConfig::default().dns.max_entries);
}

/// An admin policy that allows `*.example.com` and denies the rest: a connection is allowed
/// only to an address the workload resolved for such a name, until the TTL runs out; an
/// established connection is not cut when it does (only when policy changes deny the names it
/// was allowed with).
#[test]
fn a_domain_names_policy_allows_only_what_was_resolved() {
    let policy = |pattern: &str| {
        format!(
            "
apiVersion: policy.networking.k8s.io/v1alpha2
kind: ClusterNetworkPolicy
metadata: {{name: egress-allowlist}}
spec:
  tier: Admin
  priority: 10
  subject: {{namespaces: {{matchLabels: {{kubernetes.io/metadata.name: shop}}}}}}
  egress:
  - action: Accept
    to: [{{domainNames: ['{pattern}']}}]
  - action: Deny
    to: [{{networks: ['0.0.0.0/0']}}]
"
        )
    };
    let refused = |v: &Verdict| v.reason.as_ref().map(|r| r.as_str()) == Some("policy_egress");
    let mut w = World::new(Mode::Psk, &policy("*.example.com"));
    let v = connect_out(&mut w, sa(EXT), 40001);
    assert!(refused(&v), "not resolved: denied, {v:?}");
    learn(
        &mut w,
        &answer(
            "api.example.com",
            &[("api.example.com", 30, Rd::A("203.0.113.7"))],
        ),
    );
    let v = connect_out(&mut w, sa(EXT), 40002);
    assert!(v.accept && v.mark_authorized && v.reason.is_none(), "{v:?}");
    // UDP to the resolved address too; to another one, not.
    let (v, _) = w.out_a(&udp(SocketAddr::new(WEB.ip, 40010), sa(EXT), b"quic"));
    assert!(v.accept && v.mark_authorized, "{v:?}");
    let (v, _) = w.out_a(&udp(SocketAddr::new(WEB.ip, 40011), sa(EXT2), b"quic"));
    assert!(refused(&v), "{v:?}");
    // A name the pattern does not match, resolved to another address, does not allow it.
    learn(
        &mut w,
        &answer(
            "evil.example.org",
            &[("evil.example.org", 30, Rd::A("203.0.113.66"))],
        ),
    );
    let v = connect_out(&mut w, sa(EXT2), 40003);
    assert!(refused(&v), "{v:?}");
    // The TTL runs out: new connections are refused; the established ones are not cut by a
    // re-check (they keep the names they were allowed with).
    w.now += 31_000;
    let v = connect_out(&mut w, sa(EXT), 40004);
    assert!(refused(&v), "{v:?}");
    assert!(w.a.recheck(w.now).is_empty());
    // A policy change that no longer allows those names cuts them.
    let parsed = policy::objects::parse("p.yaml", &policy("*.example.net"));
    assert!(parsed.errors.is_empty(), "{:?}", parsed.errors);
    let report = policy::objects::load(w.a.engine_mut(), &parsed.objects);
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    let cuts = w.a.recheck(w.now);
    let mut cut: Vec<u16> = cuts.iter().map(|c| c.local.port()).collect();
    cut.sort();
    assert_eq!(cut, [40002, 40010], "{cuts:?}");
}
