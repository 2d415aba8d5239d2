//! `tessera run` start-up failures, as a user meets them: no kernel state is touched before the
//! keys, the inventory and the policies have loaded, and each error names its file and field.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::{Command, Output};

const PSK: &str = "0123456789abcdef0123456789abcdef-cli-run\n";

fn run(dir: &Path, extra: &[&str]) -> Output {
    let mut args = vec![
        "run".to_owned(),
        "--node-name".into(),
        "node-1".into(),
        "--metrics-addr".into(),
        "off".into(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    Command::new(env!("CARGO_BIN_EXE_tessera"))
        .args(&args)
        .current_dir(dir)
        .env_remove("TESSERA_LOG")
        .output()
        .unwrap()
}

fn failure(out: &Output) -> String {
    assert!(!out.status.success(), "expected failure");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn setup() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("psk"), PSK).unwrap();
    std::fs::create_dir(dir.path().join("pol")).unwrap();
    dir
}

#[test]
fn inventory_errors_name_file_and_field() {
    let dir = setup();
    std::fs::write(
        dir.path().join("inv.yaml"),
        "workloads:\n  - {name: a, namespace: d, netns: /run/netns/a, ports: [{port: http}]}\n",
    )
    .unwrap();
    let err = failure(&run(
        dir.path(),
        &["--inventory", "inv.yaml", "--psk-file", "psk"],
    ));
    assert!(
        err.contains("inv.yaml: workloads[0].ports[0].port"),
        "{err}"
    );
}

#[test]
fn a_weak_psk_is_refused_before_anything_else() {
    let dir = setup();
    std::fs::write(dir.path().join("weak"), "PSK\n").unwrap();
    std::fs::write(dir.path().join("inv.yaml"), "workloads: []\n").unwrap();
    let err = failure(&run(
        dir.path(),
        &["--inventory", "inv.yaml", "--psk-file", "weak"],
    ));
    assert!(err.contains("weak"), "{err}");
}

#[test]
fn a_bad_policy_file_fails_the_start_naming_file_and_field() {
    let dir = setup();
    std::fs::write(dir.path().join("inv.yaml"), "workloads: []\n").unwrap();
    std::fs::write(
        dir.path().join("pol/bad.yaml"),
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: bad, namespace: d}\nspec:\n  podSelector: {}\n  ingress: [{ports: [{port: 0}]}]\n",
    )
    .unwrap();
    let err = failure(&run(
        dir.path(),
        &[
            "--inventory",
            "inv.yaml",
            "--psk-file",
            "psk",
            "--policies",
            "pol",
        ],
    ));
    assert!(err.contains("pol/bad.yaml"), "{err}");
    assert!(err.contains("spec.ingress[0].ports[0].port"), "{err}");
}

#[test]
fn missing_identity_is_explained() {
    let dir = setup();
    let err = failure(&run(dir.path(), &["--inventory", "inv.yaml"]));
    assert!(err.contains("--psk-file"), "{err}");
}
