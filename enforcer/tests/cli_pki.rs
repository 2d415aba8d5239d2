//! `tessera pki`: init-ca, issue-node, show, as a user runs them.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};
use std::time::{SystemTime, UNIX_EPOCH};

use identity::{Config, Node, NodeCertificate, NodeCredentials, TrustAnchor};

fn tessera(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tessera"))
        .args(args)
        .output()
        .unwrap()
}

fn ok(args: &[&str]) -> String {
    let out = tessera(args);
    assert!(
        out.status.success(),
        "tessera {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

#[test]
fn init_ca_issue_node_and_show_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca");
    let nodes = dir.path().join("nodes");
    let (ca_s, nodes_s) = (ca.to_str().unwrap(), nodes.to_str().unwrap());
    ok(&["pki", "init-ca", "--out", ca_s]);
    ok(&[
        "pki",
        "issue-node",
        "--ca",
        ca_s,
        "--node",
        "worker-1",
        "--days",
        "30",
        "--out",
        nodes_s,
    ]);
    ok(&[
        "pki",
        "issue-node",
        "--ca",
        ca_s,
        "--node",
        "worker-2",
        "--out",
        nodes_s,
    ]);

    // Private keys are 0600.
    assert_eq!(mode(&ca.join("ca.key")), 0o600);
    assert_eq!(mode(&nodes.join("worker-1.key")), 0o600);
    assert_eq!(mode(&nodes.join("worker-2.key")), 0o600);

    // show prints the node name, validity and fingerprints, and verifies against the CA.
    let crt = nodes.join("worker-1.crt");
    let out = ok(&[
        "pki",
        "show",
        crt.to_str().unwrap(),
        "--ca",
        ca.join("ca.crt").to_str().unwrap(),
    ]);
    let pem = std::fs::read_to_string(&crt).unwrap();
    let cert = NodeCertificate::from_pem(&pem).unwrap();
    assert!(out.contains("node name:   worker-1"), "{out}");
    assert!(
        out.contains("not before:") && out.contains("not after:"),
        "{out}"
    );
    assert!(out.contains("status:      valid now"), "{out}");
    assert!(
        out.contains(&format!("key id:      {}", cert.key_id())),
        "{out}"
    );
    let fp: String = cert
        .fingerprint()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert!(out.contains(&format!("sha256:      {fp}")), "{out}");
    assert!(out.contains("verified:    yes"), "{out}");
    // About 30 days of validity.
    let days = (cert.not_after_ms() - cert.not_before_ms()) / 86_400_000;
    assert_eq!(days, 30);

    // The issued certificates verify in the crate's trust store and handshake with each other.
    let anchor =
        TrustAnchor::from_pem(&std::fs::read_to_string(ca.join("ca.crt")).unwrap()).unwrap();
    let load = |n: &str| {
        NodeCredentials::from_pem(
            &std::fs::read_to_string(nodes.join(format!("{n}.crt"))).unwrap(),
            &std::fs::read_to_string(nodes.join(format!("{n}.key"))).unwrap(),
        )
        .unwrap()
    };
    let (c1, c2) = (load("worker-1"), load("worker-2"));
    let now = now_ms();
    anchor
        .verify(c1.certificate(), Some("worker-1"), now)
        .unwrap();
    let (cert1, cert2) = (c1.certificate().clone(), c2.certificate().clone());
    let mut n1 = Node::new_pki(c1, anchor.clone(), Config::default(), now).unwrap();
    let mut n2 = Node::new_pki(c2, anchor, Config::default(), now).unwrap();
    n1.add_peer_certificate("worker-2", cert2, now).unwrap();
    n2.add_peer_certificate("worker-1", cert1, now).unwrap();
    let claims =
        identity::Claims::new("default", "app", Default::default(), Default::default()).unwrap();
    let (c, syn) = n1.client_syn(&claims, [1; 16], now);
    let (s, synack) = n2
        .server_syn(&syn, now)
        .unwrap()
        .respond(&mut n2, &claims, "", [2; 16], now)
        .unwrap();
    let (server, ack) = c.receive_syn_ack(&mut n1, &synack, now).unwrap();
    assert_eq!(server.node, "worker-2");
    assert_eq!(s.receive_ack(&mut n2, &ack, now).unwrap().node, "worker-1");

    // show on the CA certificate.
    let out = ok(&["pki", "show", ca.join("ca.crt").to_str().unwrap()]);
    assert!(
        out.contains("subject:     CN=tessera-ca") && out.contains("Ed25519 (cluster CA)"),
        "{out}"
    );
}

#[test]
fn existing_keys_are_not_overwritten_without_force() {
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().to_str().unwrap();
    ok(&["pki", "init-ca", "--out", ca]);
    let before = std::fs::read(dir.path().join("ca.key")).unwrap();
    let out = tessera(&["pki", "init-ca", "--out", ca]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("refusing to overwrite") && err.contains("--force"),
        "{err}"
    );
    assert_eq!(std::fs::read(dir.path().join("ca.key")).unwrap(), before);
    ok(&["pki", "init-ca", "--out", ca, "--force"]);
    assert_ne!(std::fs::read(dir.path().join("ca.key")).unwrap(), before);
    assert_eq!(mode(&dir.path().join("ca.key")), 0o600);

    ok(&["pki", "issue-node", "--ca", ca, "--node", "n1", "--out", ca]);
    let out = tessera(&["pki", "issue-node", "--ca", ca, "--node", "n1", "--out", ca]);
    assert!(!out.status.success());
}

#[test]
fn bad_input_names_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    ok(&["pki", "init-ca", "--out", d]);
    let out = tessera(&[
        "pki",
        "issue-node",
        "--ca",
        d,
        "--node",
        "Bad_Name",
        "--out",
        d,
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("Bad_Name"));
    let missing = dir.path().join("nope.crt");
    let out = tessera(&["pki", "show", missing.to_str().unwrap()]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("nope.crt"));
    // A node certificate checked against another CA is reported as not verified.
    let other = tempfile::tempdir().unwrap();
    let o = other.path().to_str().unwrap();
    ok(&["pki", "init-ca", "--out", o]);
    ok(&["pki", "issue-node", "--ca", d, "--node", "n1", "--out", d]);
    let out = tessera(&[
        "pki",
        "show",
        &format!("{d}/n1.crt"),
        "--ca",
        &format!("{o}/ca.crt"),
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stdout).contains("cert_untrusted_issuer"));
}
