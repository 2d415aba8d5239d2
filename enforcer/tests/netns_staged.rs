//! Staged policies on the real kernel: the three-tier policies in force, plus two staged
//! policies (annotated `tessera.dev/staged: "true"`) in the agents' policy directory:
//! - a staged version of the backend's NetworkPolicy that admits backends only (it would deny
//!   frontend -> backend, allowed today);
//! - a staged ClusterNetworkPolicy that lets databases call the backend api (it would allow
//!   database -> backend, denied today by the backend's ingress policy).
//!
//! Nothing changes on the wire: the frontend still connects, the database still does not. The
//! flow logs show what the staged set would do: the frontend's flow is recorded (though allowed
//! flows are not sampled) with `staged: denied by shop/backend`, the database's denial with
//! `staged: allowed by ClusterNetworkPolicy db-reads-api`; `tessera flows --staged` lists the
//! flips and the metrics count them. Then the staged backend policy is promoted (the annotation
//! removed): the kernel does what the preview said, the frontend is refused. Needs root
//! (tests/run.sh runs it in CI); without root it prints a SKIP line locally and fails under
//! CI=true.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::time::{Duration, Instant};

use datapath::flowlog::{FlowVerdict, PolicyKind};
use policy::Direction;
use testbed::{AgentConfig, Mode, Testbed, WorkloadSpec, echo_once};

mod flows_cli;

use flows_cli::{flows, wait_record};

const TESSERA: &str = env!("CARGO_BIN_EXE_tessera");
const DENIED_TIMEOUT: Duration = Duration::from_secs(2);
const OK_TIMEOUT: Duration = Duration::from_secs(10);

const STAGED_BACKEND: &str = r#"# Staged: the backend api for backends only (frontends would lose it).
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: backend
  namespace: shop
  annotations: {tessera.dev/staged: "true"}
spec:
  podSelector: {matchLabels: {role: BusinessBackend}}
  ingress:
  - from:
    - podSelector: {matchLabels: {role: BusinessBackend}}
    ports: [{port: api}]
"#;

const STAGED_DB_READS_API: &str = r#"# Staged: databases may call the backend api.
apiVersion: policy.networking.k8s.io/v1alpha2
kind: ClusterNetworkPolicy
metadata:
  name: db-reads-api
  annotations: {tessera.dev/staged: "true"}
spec:
  tier: Admin
  priority: 20
  subject:
    pods:
      namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: shop}}
      podSelector: {matchLabels: {role: BusinessBackend}}
  ingress:
  - action: Accept
    from:
    - pods:
        namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: shop}}
        podSelector: {matchLabels: {role: Database}}
    protocols:
    - tcp: {destinationPort: {number: 8080}}
"#;

fn log_of(tb: &Testbed, node: u8) -> String {
    std::fs::read_to_string(tb.dir().join(format!("agent-n{node}.log"))).unwrap_or_default()
}

#[test]
fn staged_policies_show_their_verdicts_and_change_nothing() {
    if !testbed::privileged("staged_policies_show_their_verdicts_and_change_nothing") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let demo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/three-tier/policies");
    for entry in std::fs::read_dir(&demo).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, dir.path().join(path.file_name().unwrap())).unwrap();
    }
    let staged_backend = dir.path().join("60-staged-backend.yaml");
    std::fs::write(&staged_backend, STAGED_BACKEND).unwrap();
    std::fs::write(dir.path().join("61-staged-db.yaml"), STAGED_DB_READS_API).unwrap();

    let tb = Testbed::builder()
        .policies(dir.path())
        .workload(WorkloadSpec::new("frontend-1", 1, "WebFrontend").port(Some("http"), 80))
        .workload(WorkloadSpec::new("db-1", 1, "Database").port(None, 5432))
        .workload(WorkloadSpec::new("backend-2", 2, "BusinessBackend").port(Some("api"), 8080))
        .agents(AgentConfig::new(Path::new(TESSERA), Mode::Psk))
        .build();
    let (frontend, db, backend) = (
        tb.workload("frontend-1").ip,
        tb.workload("db-1").ip,
        tb.workload("backend-2").ip,
    );

    // Enforcement is that of the policies in force.
    let mut s = tb
        .connect("frontend-1", "backend-2", 8080, OK_TIMEOUT)
        .unwrap_or_else(|e| panic!("staged policy enforced: {e}\n{}", tb.agent_logs()));
    echo_once(&mut s, 1).unwrap();
    assert!(
        tb.connect("db-1", "backend-2", 8080, DENIED_TIMEOUT)
            .is_err(),
        "a staged Accept was enforced"
    );

    // The frontend's flow: allowed, recorded at the backend's ingress (allowed flows are not
    // sampled: the flip alone makes the record) with the staged verdict.
    let r = wait_record(&tb, 2, "frontend -> backend with its staged verdict", |r| {
        r.direction == Direction::Ingress
            && r.source.ip == frontend
            && r.destination.ip == backend
            && r.staged.is_some()
    });
    assert_eq!(r.verdict, FlowVerdict::Allowed, "{r:?}");
    let staged = r.staged.as_ref().unwrap();
    assert_eq!(staged.verdict, FlowVerdict::Denied, "{r:?}");
    assert_eq!(staged.policy.kind, PolicyKind::NetworkPolicy, "{r:?}");
    assert_eq!(
        staged.policy.isolated_by,
        ["shop/backend", "shop/default-deny-ingress"],
        "{r:?}"
    );
    assert_eq!(r.policy.as_ref().unwrap().name, "backend", "{r:?}");
    assert_eq!(r.policy.as_ref().unwrap().rule, Some(0), "enforced: rule 0");

    // The database's: denied at the backend's ingress, the staged Accept would allow it.
    let r = wait_record(&tb, 2, "db -> backend with its staged verdict", |r| {
        r.direction == Direction::Ingress
            && r.source.ip == db
            && r.destination.ip == backend
            && r.staged.is_some()
    });
    assert_eq!(r.verdict, FlowVerdict::Denied, "{r:?}");
    let staged = r.staged.as_ref().unwrap();
    assert_eq!(staged.verdict, FlowVerdict::Allowed, "{r:?}");
    assert_eq!(
        staged.policy.kind,
        PolicyKind::ClusterNetworkPolicy,
        "{r:?}"
    );
    assert_eq!(staged.policy.name, "db-reads-api", "{r:?}");
    assert_eq!(staged.policy.action.as_deref(), Some("Accept"), "{r:?}");

    // As an operator reads them.
    let text = flows(&tb, 2, &["--staged", "--last", "10000"]);
    assert!(
        text.lines().any(|l| l.contains("frontend-1")
            && l.contains("ALLOWED")
            && l.contains("[staged, FLIPS: DENIED by NetworkPolicy shop/backend, ")),
        "{text}"
    );
    let text = flows(&tb, 2, &["--staged", "--last", "10000"]);
    assert!(
        text.lines().any(|l| l.contains("db-1")
            && l.contains("DENIED")
            && l.contains("[staged, FLIPS: ALLOWED by ClusterNetworkPolicy db-reads-api")),
        "{text}"
    );
    let m = tb.agent(2).metrics();
    assert_eq!(m.sum("tessera_staged_policies"), 2.0);
    assert!(
        m.sum("tessera_staged_verdict_flips_total") >= 1.0,
        "{:?}",
        m.names()
    );

    // Promote the staged backend policy: the kernel now does what the preview said.
    let promoted = STAGED_BACKEND.replace("  annotations: {tessera.dev/staged: \"true\"}\n", "");
    std::fs::write(&staged_backend, &promoted).unwrap();
    std::fs::remove_file(dir.path().join("20-backend.yaml")).unwrap();
    let start = Instant::now();
    while tb.agent(2).metrics().sum("tessera_staged_policies") != 1.0 {
        assert!(
            start.elapsed() < OK_TIMEOUT,
            "not reloaded\n{}",
            log_of(&tb, 2)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        tb.connect("frontend-1", "backend-2", 8080, DENIED_TIMEOUT)
            .is_err(),
        "the promoted policy is not enforced\n{}",
        tb.agent_logs()
    );
}
