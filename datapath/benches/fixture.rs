//! The benchmarks' cluster: a backend client and a database server with ten labels each, and
//! the three-tier policies plus 1,000 others.

use crate::common::Pod;

/// Ten labels like real pods carry.
pub const BACKEND_LABELS: &[(&str, &str)] = &[
    ("role", "BusinessBackend"),
    ("app.kubernetes.io/name", "orders"),
    ("app.kubernetes.io/instance", "orders-prod"),
    ("app.kubernetes.io/version", "4.12.0"),
    ("app.kubernetes.io/component", "api"),
    ("app.kubernetes.io/part-of", "shop"),
    ("app.kubernetes.io/managed-by", "helm"),
    ("pod-template-hash", "7d9f8c6b5"),
    ("team", "payments"),
    ("tier", "backend"),
];
pub const DB_LABELS: &[(&str, &str)] = &[
    ("role", "Database"),
    ("app.kubernetes.io/name", "postgres"),
    ("app.kubernetes.io/instance", "orders-db"),
    ("app.kubernetes.io/version", "16.4"),
    ("app.kubernetes.io/component", "database"),
    ("app.kubernetes.io/part-of", "shop"),
    ("app.kubernetes.io/managed-by", "helm"),
    ("statefulset.kubernetes.io/pod-name", "orders-db-0"),
    ("team", "payments"),
    ("tier", "db"),
];

pub const CLIENT: Pod = Pod {
    namespace: "shop",
    name: "orders-7d9f8c6b5-x2x4q",
    labels: BACKEND_LABELS,
    ip: std::net::IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 1, 2)),
    ports: &[("api", 8080)],
};
pub const SERVER: Pod = Pod {
    namespace: "shop",
    name: "orders-db-0",
    labels: DB_LABELS,
    ip: std::net::IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 2, 2)),
    ports: &[("postgres", 5432)],
};

/// The three-tier example plus 1,000 other policies: 950 in 95 other namespaces and 50 in
/// `shop` that select other apps (so the engine's index, not luck, keeps decisions cheap).
pub fn policies() -> String {
    let mut y = String::from(
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop, labels: {env: prod, team: payments}}\n",
    );
    for f in [
        include_str!("../../examples/three-tier/policies/00-default-deny-ingress.yaml"),
        include_str!("../../examples/three-tier/policies/10-frontend.yaml"),
        include_str!("../../examples/three-tier/policies/20-backend.yaml"),
        include_str!("../../examples/three-tier/policies/30-database.yaml"),
    ] {
        y.push_str("---\n");
        y.push_str(f);
    }
    for k in 0..1000 {
        let ns = if k < 50 {
            "shop".to_string()
        } else {
            format!("ns-{}", k / 10)
        };
        y.push_str(&format!(
            "---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {{name: pol-{k}, namespace: {ns}}}
spec:
  podSelector: {{matchLabels: {{app: other-{k}}}}}
  policyTypes: [Ingress, Egress]
  ingress:
  - from:
    - podSelector: {{matchExpressions: [{{key: tier, operator: In, values: [web, api]}}]}}
    - namespaceSelector: {{matchLabels: {{team: t{t}}}}}
      podSelector: {{matchLabels: {{app: a{t}}}}}
    - ipBlock: {{cidr: 10.0.0.0/8, except: [10.{t}.0.0/24]}}
    ports: [{{port: 8080}}, {{port: metrics}}, {{port: 9000, endPort: 9100}}]
  egress:
  - to: [{{namespaceSelector: {{}}}}]
    ports: [{{port: 53, protocol: UDP}}, {{port: 443}}]
",
            t = k % 10
        ));
    }
    y
}
