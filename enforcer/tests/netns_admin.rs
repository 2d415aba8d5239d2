//! Cluster-wide admin policies on the real kernel, from the agents' policy directory (static
//! inventory, two nodes): a representative subset of the upstream admin conformance scenarios
//! (`tests/conformance/admin/`, which run offline through the engine) checked against real
//! connections, same node and across nodes, PSK and PKI: priority order between Admin policies,
//! port ranges, an AdminNetworkPolicy (v1alpha1) `namedPort` Allow over NetworkPolicy
//! isolation, `Pass` handing back to NetworkPolicy, an egress Deny to `networks` (a CIDR) that
//! beats an ingress Accept at the other end, and a Baseline Deny where no NetworkPolicy
//! isolates. The expected verdict of every cell is `tessera policy matrix` on the same files.
//! Needs root (tests/run.sh runs them in CI); without root they print a SKIP line locally and
//! fail under CI=true.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::time::{Duration, Instant};

use testbed::{AgentConfig, Mode, Testbed, WorkloadSpec};

const TESSERA: &str = env!("CARGO_BIN_EXE_tessera");
const DENIED_TIMEOUT: Duration = Duration::from_secs(2);
const OK_TIMEOUT: Duration = Duration::from_secs(10);

const NETWORK_POLICIES: &str = "\
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: default-deny-ingress, namespace: shop}
spec: {podSelector: {}, policyTypes: [Ingress]}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: svc, namespace: shop}
spec:
  podSelector: {matchLabels: {role: Svc}}
  ingress:
  - from: [{podSelector: {matchLabels: {role: Client}}}]
    ports: [{port: web}]
";

/// The admin policies; `svc_2` is svc-2's address as a CIDR.
fn admin_policies(svc_2: &str) -> String {
    format!(
        "\
# Priority 10 before 20: the Accept of 9005 wins over the Deny of 9000-9010.
apiVersion: policy.networking.k8s.io/v1alpha2
kind: ClusterNetworkPolicy
metadata: {{name: client-range-deny}}
spec:
  tier: Admin
  priority: 20
  subject: {{pods: {{namespaceSelector: {{}}, podSelector: {{matchLabels: {{role: Svc}}}}}}}}
  ingress:
  - name: range
    action: Deny
    from: [{{pods: {{namespaceSelector: {{}}, podSelector: {{matchLabels: {{role: Client}}}}}}}}]
    protocols: [{{tcp: {{destinationPort: {{range: {{start: 9000, end: 9010}}}}}}}}]
---
apiVersion: policy.networking.k8s.io/v1alpha2
kind: ClusterNetworkPolicy
metadata: {{name: client-9005-accept}}
spec:
  tier: Admin
  priority: 10
  subject: {{pods: {{namespaceSelector: {{}}, podSelector: {{matchLabels: {{role: Svc}}}}}}}}
  ingress:
  - name: one-port
    action: Accept
    from: [{{pods: {{namespaceSelector: {{}}, podSelector: {{matchLabels: {{role: Client}}}}}}}}]
    protocols: [{{tcp: {{destinationPort: {{number: 9005}}}}}}]
---
# v1alpha1, a named port: the probe reaches `web` although NetworkPolicy isolates svc.
apiVersion: policy.networking.k8s.io/v1alpha1
kind: AdminNetworkPolicy
metadata: {{name: probe-web}}
spec:
  priority: 5
  subject: {{pods: {{namespaceSelector: {{}}, podSelector: {{matchLabels: {{role: Svc}}}}}}}}
  ingress:
  - name: web
    action: Allow
    from: [{{pods: {{namespaceSelector: {{}}, podSelector: {{matchLabels: {{role: Probe}}}}}}}}]
    ports: [{{namedPort: web}}]
---
# Pass: the client's traffic to svc on anything else goes to NetworkPolicy (which allows web).
apiVersion: policy.networking.k8s.io/v1alpha2
kind: ClusterNetworkPolicy
metadata: {{name: client-pass}}
spec:
  tier: Admin
  priority: 30
  subject: {{pods: {{namespaceSelector: {{}}, podSelector: {{matchLabels: {{role: Svc}}}}}}}}
  ingress:
  - name: rest
    action: Pass
    from: [{{pods: {{namespaceSelector: {{}}, podSelector: {{matchLabels: {{role: Client}}}}}}}}]
---
# An egress Deny to a network beats the Accept of 9005 at svc-2's end.
apiVersion: policy.networking.k8s.io/v1alpha2
kind: ClusterNetworkPolicy
metadata: {{name: client-not-to-svc-2}}
spec:
  tier: Admin
  priority: 1
  subject: {{pods: {{namespaceSelector: {{}}, podSelector: {{matchLabels: {{role: Client}}}}}}}}
  egress:
  - name: svc-2
    action: Deny
    to: [{{networks: [\"{svc_2}\"]}}]
    protocols: [{{tcp: {{destinationPort: {{number: 9005}}}}}}]
---
# Baseline: nothing isolates the probe's egress; it may not reach clients' 7000.
apiVersion: policy.networking.k8s.io/v1alpha1
kind: BaselineAdminNetworkPolicy
metadata: {{name: default}}
spec:
  subject: {{pods: {{namespaceSelector: {{}}, podSelector: {{matchLabels: {{role: Probe}}}}}}}}
  egress:
  - name: no-clients
    action: Deny
    to: [{{pods: {{namespaceSelector: {{}}, podSelector: {{matchLabels: {{role: Client}}}}}}}}]
"
    )
}

fn svc(name: &str, node: u8) -> WorkloadSpec {
    WorkloadSpec::new(name, node, "Svc")
        .port(Some("web"), 8080)
        .port(None, 9000)
        .port(None, 9005)
}

fn admin_matrix(mode: Mode) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("00-network.yaml"), NETWORK_POLICIES).unwrap();
    let tb = Testbed::builder()
        .policies(dir.path())
        .workload(WorkloadSpec::new("client-1", 1, "Client").port(None, 7000))
        .workload(WorkloadSpec::new("probe-2", 2, "Probe"))
        .workload(svc("svc-1", 1))
        .workload(svc("svc-2", 2))
        .agents(AgentConfig::new(Path::new(TESSERA), mode))
        .build();
    let svc_2 = format!("{}/32", tb.workload("svc-2").ip);
    std::fs::write(dir.path().join("10-admin.yaml"), admin_policies(&svc_2)).unwrap();
    // The agents poll the directory every second: wait until both enforce the six.
    let start = Instant::now();
    while [1, 2]
        .iter()
        .any(|n| tb.agent(*n).metrics().sum("tessera_admin_policies") != 6.0)
    {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "admin policies not loaded:\n{}",
            tb.agent_logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    let cells = tb.policy_matrix(Path::new(TESSERA));
    let why = |from: &str, to: &str, port: u16| {
        let c = cells
            .iter()
            .find(|c| c.from == from && c.to == to && c.port == port)
            .unwrap_or_else(|| panic!("no cell {from} -> {to}:{port}: {cells:?}"));
        (c.allowed, c.reason.clone())
    };
    // The engine says what the scenario means (checked here, so that a test of the datapath
    // is not silently a test of nothing).
    for (from, to, port, allowed, by) in [
        (
            "client-1",
            "svc-1",
            9005,
            true,
            "ClusterNetworkPolicy/client-9005-accept",
        ),
        (
            "client-1",
            "svc-2",
            9005,
            false,
            "ClusterNetworkPolicy/client-not-to-svc-2",
        ),
        (
            "client-1",
            "svc-2",
            9000,
            false,
            "ClusterNetworkPolicy/client-range-deny",
        ),
        ("client-1", "svc-2", 8080, true, "shop/svc"),
        (
            "probe-2",
            "svc-1",
            8080,
            true,
            "AdminNetworkPolicy/probe-web",
        ),
        ("probe-2", "svc-1", 9000, false, "shop/default-deny-ingress"),
        (
            "probe-2",
            "client-1",
            7000,
            false,
            "BaselineAdminNetworkPolicy/default",
        ),
        (
            "svc-1",
            "client-1",
            7000,
            false,
            "shop/default-deny-ingress",
        ),
    ] {
        let (got, reason) = why(from, to, port);
        assert_eq!(got, allowed, "{from} -> {to}:{port}: {reason}");
        assert!(reason.contains(by), "{from} -> {to}:{port}: {reason}");
    }

    let outcomes = tb.probe(&cells, false, OK_TIMEOUT, DENIED_TIMEOUT);
    let wrong: Vec<String> = cells
        .iter()
        .zip(&outcomes)
        .filter(|(c, got)| got.is_ok() != c.allowed)
        .map(|(c, got)| {
            format!(
                "{} -> {}:{}: engine {} ({}), datapath {got:?}",
                c.from,
                c.to,
                c.port,
                if c.allowed { "allowed" } else { "denied" },
                c.reason
            )
        })
        .collect();
    assert!(
        wrong.is_empty(),
        "{} of {} cells wrong:\n{}\n{}",
        wrong.len(),
        cells.len(),
        wrong.join("\n"),
        tb.agent_logs()
    );
    eprintln!(
        "admin on the kernel ({mode:?}): {} cells, {} allowed, all as the engine says",
        cells.len(),
        cells.iter().filter(|c| c.allowed).count()
    );
}

#[test]
fn admin_policies_on_the_kernel_psk() {
    if testbed::privileged("admin_policies_on_the_kernel_psk") {
        admin_matrix(Mode::Psk);
    }
}

#[test]
fn admin_policies_on_the_kernel_pki() {
    if testbed::privileged("admin_policies_on_the_kernel_pki") {
        admin_matrix(Mode::Pki);
    }
}
