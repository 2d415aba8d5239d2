//! Admin `domainNames` egress peers on the real kernel, through the agent: the names come from
//! the DNS answers the workload itself receives (the agent snoops them in the workload's netns;
//! it never asks a resolver). A ClusterNetworkPolicy lets the client reach `*.example.com`
//! (and its resolver) and denies every other address; the test runs its own DNS server in a
//! netns without an agent. A site is refused before the client resolved its name, reached
//! after, and refused again once the answer's TTL (raised to the agent's 5 s floor) ran out; a
//! site the client never resolved stays refused; an answer for a name the policy does not
//! cover opens nothing. Needs root (tests/run.sh runs it in CI); without root it prints a SKIP
//! line locally and fails under CI=true.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use simple_dns::rdata::{A, RData};
use simple_dns::{CLASS, Name, Packet, ResourceRecord};
use testbed::{AgentConfig, Mode, Testbed, WorkloadSpec};

const TESSERA: &str = env!("CARGO_BIN_EXE_tessera");
const TIMEOUT: Duration = Duration::from_secs(2);

/// Answers A queries from `names` (name -> address, TTL 1 s); anything else (our agent's UDP
/// handshake attempt included) gets no answer.
fn dns_server(ns: &str, names: Vec<(String, Ipv4Addr)>, stop: Arc<AtomicBool>) {
    let names = Arc::new(names);
    testbed::spawn_in_netns(ns, move || {
        let s = UdpSocket::bind("0.0.0.0:53").unwrap();
        s.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let mut buf = [0u8; 1500];
        while !stop.load(Ordering::Relaxed) {
            let Ok((n, from)) = s.recv_from(&mut buf) else {
                continue;
            };
            let Ok(query) = Packet::parse(&buf[..n]) else {
                continue;
            };
            let Some(q) = query.questions.first() else {
                continue;
            };
            let asked = q.qname.to_string();
            let mut reply = Packet::new_reply(query.id());
            reply.questions.push(q.clone());
            for (name, addr) in names.iter().filter(|(name, _)| *name == asked) {
                reply.answers.push(ResourceRecord::new(
                    Name::new_unchecked(name),
                    CLASS::IN,
                    1,
                    RData::A(A {
                        address: u32::from(*addr),
                    }),
                ));
            }
            if let Ok(bytes) = reply.build_bytes_vec() {
                let _ = s.send_to(&bytes, from);
            }
        }
    });
}

/// Resolves `name` from inside the client's netns (one A query, up to 3 tries); the address.
fn resolve(tb: &Testbed, resolver: Ipv4Addr, name: &str) -> Option<Ipv4Addr> {
    let name = name.to_owned();
    testbed::in_netns(&tb.workload("client-1").ns, move || {
        let s = UdpSocket::bind("0.0.0.0:0").unwrap();
        s.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
        let mut query = Packet::new_query(0x4242);
        query.questions.push(simple_dns::Question::new(
            Name::new_unchecked(&name),
            simple_dns::TYPE::A.into(),
            simple_dns::CLASS::IN.into(),
            false,
        ));
        let bytes = query.build_bytes_vec().unwrap();
        let mut buf = [0u8; 1500];
        for _ in 0..3 {
            s.send_to(&bytes, SocketAddr::from((resolver, 53))).unwrap();
            if let Ok(n) = s.recv(&mut buf) {
                let answer = Packet::parse(&buf[..n]).ok()?;
                return answer.answers.iter().find_map(|r| match &r.rdata {
                    RData::A(a) => Some(Ipv4Addr::from(a.address)),
                    _ => None,
                });
            }
        }
        None
    })
}

fn reaches(tb: &Testbed, site: &str) -> bool {
    match tb.connect("client-1", site, 80, TIMEOUT) {
        Ok(mut s) => testbed::echo_once(&mut s, 7).is_ok(),
        Err(_) => false,
    }
}

fn policy(resolver: Ipv4Addr) -> String {
    format!(
        "\
apiVersion: policy.networking.k8s.io/v1alpha2
kind: ClusterNetworkPolicy
metadata: {{name: client-egress}}
spec:
  tier: Admin
  priority: 10
  subject: {{pods: {{namespaceSelector: {{}}, podSelector: {{matchLabels: {{role: Client}}}}}}}}
  egress:
  - name: dns
    action: Accept
    to: [{{networks: [\"{resolver}/32\"]}}]
    protocols: [{{udp: {{destinationPort: {{number: 53}}}}}}]
  - name: example-com
    action: Accept
    to: [{{domainNames: [\"*.example.com\"]}}]
  - name: nothing-else
    action: Deny
    to: [{{networks: [\"0.0.0.0/0\"]}}]
"
    )
}

fn domain_names(mode: Mode) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("00-placeholder.yaml"),
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: none, namespace: shop}\nspec: {podSelector: {matchLabels: {role: Nobody}}}\n",
    )
    .unwrap();
    let tb = Testbed::builder()
        .policies(dir.path())
        .workload(WorkloadSpec::new("client-1", 1, "Client"))
        .workload(WorkloadSpec::new("resolver-2", 2, "Resolver").unenforced())
        .workload(
            WorkloadSpec::new("site-a-2", 2, "Site")
                .port(None, 80)
                .unenforced(),
        )
        .workload(
            WorkloadSpec::new("site-b-2", 2, "Site")
                .port(None, 80)
                .unenforced(),
        )
        .agents(AgentConfig::new(Path::new(TESSERA), mode))
        .build();
    let resolver = tb.workload("resolver-2").ip;
    let (a, b) = (tb.workload("site-a-2").ip, tb.workload("site-b-2").ip);
    std::fs::write(dir.path().join("10-admin.yaml"), policy(resolver)).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    dns_server(
        &tb.workload("resolver-2").ns,
        vec![
            ("api.example.com".into(), a),
            ("www.elsewhere.org".into(), b),
        ],
        stop.clone(),
    );
    let start = Instant::now();
    while tb.agent(1).metrics().sum("tessera_admin_policies") != 1.0 {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "admin policy not loaded:\n{}",
            tb.agent_logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // Not resolved yet: refused, as is the never-resolved site.
    assert!(
        !reaches(&tb, "site-a-2"),
        "site-a reached before it was resolved"
    );
    assert!(!reaches(&tb, "site-b-2"));
    // A name the policy does not cover opens nothing.
    assert_eq!(resolve(&tb, resolver, "www.elsewhere.org"), Some(b));
    assert!(
        !reaches(&tb, "site-b-2"),
        "www.elsewhere.org is not *.example.com"
    );
    // Resolved through DNS: reached.
    assert_eq!(resolve(&tb, resolver, "api.example.com"), Some(a));
    assert!(
        reaches(&tb, "site-a-2"),
        "api.example.com resolved but refused\n{}\n{}",
        tb.agent(1).metrics().text,
        tb.agent_logs()
    );
    let m = tb.agent(1).metrics();
    assert!(
        m.sum_with_label("result", "learnt") >= 2.0,
        "answers not learnt:\n{}",
        m.text
    );
    assert!(!reaches(&tb, "site-b-2"));
    // The answer's TTL (1 s, raised to the 5 s floor) runs out: refused again.
    let resolved = Instant::now();
    while resolved.elapsed() < Duration::from_secs(15) && reaches(&tb, "site-a-2") {
        std::thread::sleep(Duration::from_millis(500));
    }
    assert!(
        !reaches(&tb, "site-a-2"),
        "still reached 15 s after a 1 s answer"
    );
    eprintln!(
        "domainNames ({mode:?}): reached until {:.1} s after the answer (TTL 1 s, floor 5 s)",
        resolved.elapsed().as_secs_f64()
    );
    stop.store(true, Ordering::Relaxed);
}

#[test]
fn domain_names_follow_the_workloads_dns_answers_psk() {
    if testbed::privileged("domain_names_follow_the_workloads_dns_answers_psk") {
        domain_names(Mode::Psk);
    }
}

#[test]
fn domain_names_follow_the_workloads_dns_answers_pki() {
    if testbed::privileged("domain_names_follow_the_workloads_dns_answers_pki") {
        domain_names(Mode::Pki);
    }
}
