//! The deployment files (deployment/, examples/three-tier/kubernetes/) against the real tools and
//! the real binary: the systemd unit passes `systemd-analyze verify`, its ExecStart line and the
//! example config are accepted by `tessera run --check`, install.sh is idempotent and keeps keys
//! private, the unit runs and enforces under a real systemd (booted in systemd-nspawn; root
//! only), the Kubernetes manifests agree with each other and with the agent's settings, and the
//! three-tier example's policies give the matrix its README shows.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

const TESSERA: &str = env!("CARGO_BIN_EXE_tessera");

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_owned()
}

fn text(out: &Output) -> String {
    format!(
        "status {}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The program's path, or a panic telling how to install it.
fn tool(name: &str, package: &str) -> PathBuf {
    for dir in ["/usr/bin", "/usr/sbin", "/bin", "/sbin", "/usr/local/bin"] {
        let p = Path::new(dir).join(name);
        if p.exists() {
            return p;
        }
    }
    panic!("{name} not found: apt-get install {package} (deployment/validate.sh installs it)")
}

/// 32 random bytes, hex: a PSK the agent accepts.
fn write_psk(path: &Path) {
    let mut key = [0u8; 32];
    getrandom::fill(&mut key).unwrap();
    let hex: String = key.iter().map(|b| format!("{b:02x}")).collect();
    std::fs::write(path, hex + "\n").unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

/// What /etc/tessera holds on a configured host, under `etc`: a PSK, an empty inventory and a
/// policy directory with the three-tier policies.
fn populate_etc(etc: &Path) {
    std::fs::create_dir_all(etc.join("policies")).unwrap();
    write_psk(&etc.join("psk"));
    std::fs::write(etc.join("inventory.yaml"), "workloads: []\n").unwrap();
    for entry in std::fs::read_dir(repo().join("examples/three-tier/policies")).unwrap() {
        let p = entry.unwrap().path();
        std::fs::copy(&p, etc.join("policies").join(p.file_name().unwrap())).unwrap();
    }
}

/// `config.yaml` with every `/etc/tessera/` path moved under `etc`.
fn relocated_config(config: &str, etc: &Path) -> String {
    config.replace("/etc/tessera/", &format!("{}/", etc.display()))
}

// ---- systemd -------------------------------------------------------------------------------

fn unit_text() -> String {
    std::fs::read_to_string(repo().join("deployment/systemd/tessera.service")).unwrap()
}

fn unit_value(unit: &str, key: &str) -> Vec<String> {
    unit.lines()
        .filter_map(|l| l.strip_prefix(&format!("{key}=")))
        .map(str::to_owned)
        .collect()
}

/// `systemd-analyze verify` accepts the unit without a single warning (an unknown or misspelt
/// directive is only a warning there, so any output fails the test), with the binary of this
/// build at /usr/local/bin/tessera's place (verify checks that ExecStart is executable). The
/// offline security review scores it below 4.0 ("OK"; 10 is an unhardened unit).
#[test]
fn systemd_unit_verifies_and_is_hardened() {
    let analyze = tool("systemd-analyze", "systemd");
    let dir = tempfile::tempdir().unwrap();
    let unit = dir.path().join("tessera.service");
    let text_in = unit_text();
    assert_eq!(
        unit_value(&text_in, "ExecStart"),
        ["/usr/local/bin/tessera run --config /etc/tessera/config.yaml"]
    );
    std::fs::write(&unit, text_in.replace("/usr/local/bin/tessera", TESSERA)).unwrap();
    let out = Command::new(&analyze)
        .arg("verify")
        .arg(&unit)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        out.stdout.is_empty() && out.stderr.is_empty(),
        "systemd-analyze verify printed warnings:\n{}",
        text(&out)
    );

    let out = Command::new(&analyze)
        .args(["security", "--offline=true", "--no-pager"])
        .arg(&unit)
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    let line = report
        .lines()
        .find(|l| l.contains("Overall exposure level"))
        .unwrap_or_else(|| panic!("no exposure level in:\n{}", text(&out)));
    let score: f64 = line
        .split(':')
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("cannot read the score in {line:?}"));
    assert!(score < 4.0, "exposure {score} (>= 4.0): {line}\n{report}");

    // What the agent needs and nothing more: four capabilities, no private network (it enters
    // the workloads' namespaces), setns allowed for network namespaces only.
    let caps = "CAP_NET_ADMIN CAP_NET_RAW CAP_SYS_ADMIN CAP_SYS_PTRACE";
    assert_eq!(unit_value(&text_in, "CapabilityBoundingSet"), [caps]);
    assert_eq!(unit_value(&text_in, "AmbientCapabilities"), [caps]);
    assert_eq!(unit_value(&text_in, "RestrictNamespaces"), ["net"]);
    assert_eq!(unit_value(&text_in, "Type"), ["exec"]);
    assert!(unit_value(&text_in, "PrivateNetwork").is_empty());
}

/// The unit's ExecStart command line, run as written (the binary and /etc/tessera moved into a
/// scratch directory) with `--check`, accepts the example config.yaml; a misspelt key in it is
/// refused with the file and the key named, so a broken config never reaches `systemctl start`.
#[test]
fn systemd_exec_start_and_example_config_pass_check() {
    let dir = tempfile::tempdir().unwrap();
    let etc = dir.path().join("etc-tessera");
    populate_etc(&etc);
    let example = std::fs::read_to_string(repo().join("deployment/systemd/config.yaml")).unwrap();
    std::fs::write(etc.join("config.yaml"), relocated_config(&example, &etc)).unwrap();

    let exec_start = unit_value(&unit_text(), "ExecStart").remove(0);
    let argv: Vec<String> = relocated_config(&exec_start, &etc)
        .split_whitespace()
        .map(str::to_owned)
        .collect();
    assert_eq!(argv[0], "/usr/local/bin/tessera");
    let out = Command::new(TESSERA)
        .args(&argv[1..])
        .arg("--check")
        .env_clear()
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));

    let typo = relocated_config(&example, &etc).replace("failOpen:", "failopen:");
    std::fs::write(etc.join("config.yaml"), typo).unwrap();
    let out = Command::new(TESSERA)
        .args(&argv[1..])
        .arg("--check")
        .env_clear()
        .output()
        .unwrap();
    assert!(!out.status.success(), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("config.yaml") && err.contains("failopen"),
        "the error must name the file and the key: {err}"
    );
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o7777
}

/// install.sh into a scratch root: binary, unit, config skeleton and key with the documented
/// modes (keys and config 0600, /etc/tessera 0700); a second run changes nothing and reports
/// nothing installed, keeps a config edited by hand, and refuses to replace a different key.
#[test]
fn install_sh_is_idempotent_and_keeps_keys_private() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    let psk = dir.path().join("psk");
    write_psk(&psk);
    let install = |psk: &Path| {
        Command::new("bash")
            .arg(repo().join("deployment/systemd/install.sh"))
            .args(["--binary", TESSERA, "--node-name", "node-7", "--root"])
            .arg(&root)
            .arg("--psk")
            .arg(psk)
            .output()
            .unwrap()
    };
    let first = install(&psk);
    assert!(first.status.success(), "{}", text(&first));
    let expected = [
        ("usr/local/bin/tessera", 0o755),
        ("etc/systemd/system/tessera.service", 0o644),
        ("usr/local/share/doc/tessera/README.md", 0o644),
        ("etc/modules-load.d/tessera.conf", 0o644),
        ("etc/tessera", 0o700),
        ("etc/tessera/config.yaml", 0o600),
        ("etc/tessera/inventory.yaml", 0o600),
        ("etc/tessera/policies", 0o700),
        ("etc/tessera/psk", 0o600),
    ];
    for (path, m) in expected {
        assert_eq!(mode(&root.join(path)), m, "{path}");
    }
    let config = root.join("etc/tessera/config.yaml");
    let written = std::fs::read_to_string(&config).unwrap();
    assert!(written.contains("\nnodeName: node-7\n"), "{written}");
    assert_eq!(
        std::fs::read(root.join("etc/tessera/psk")).unwrap(),
        std::fs::read(&psk).unwrap()
    );

    // The installed config, with the installed inventory and key, passes --check.
    let etc = root.join("etc/tessera");
    std::fs::write(&config, relocated_config(&written, &etc)).unwrap();
    let out = Command::new(root.join("usr/local/bin/tessera"))
        .args(["run", "--check", "--config"])
        .arg(&config)
        .env_clear()
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));

    std::fs::write(&config, "nodeName: edited-by-hand\n").unwrap();
    let second = install(&psk);
    assert!(second.status.success(), "{}", text(&second));
    let said = String::from_utf8_lossy(&second.stdout);
    assert!(
        !said.contains("installed /") && !said.contains("created /"),
        "a second run must change nothing: {said}"
    );
    assert_eq!(
        std::fs::read_to_string(&config).unwrap(),
        "nodeName: edited-by-hand\n"
    );
    for (path, m) in expected {
        assert_eq!(mode(&root.join(path)), m, "{path} after the second run");
    }

    let other = dir.path().join("other-psk");
    write_psk(&other);
    let third = install(&other);
    assert!(!third.status.success(), "{}", text(&third));
    assert!(String::from_utf8_lossy(&third.stderr).contains("exists with another key"));
}

// ---- Kubernetes ----------------------------------------------------------------------------

/// Every object of the YAML files of `dir` (multi-document), as JSON values.
fn objects(dir: &str) -> Vec<Value> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(repo().join(dir))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    let mut out = Vec::new();
    for f in files {
        let t = std::fs::read_to_string(&f).unwrap();
        for doc in serde_norway::Deserializer::from_str(&t) {
            let v: Value = serde::Deserialize::deserialize(doc)
                .unwrap_or_else(|e| panic!("{}: {e}", f.display()));
            if !v.is_null() {
                out.push(v);
            }
        }
    }
    out
}

fn find<'a>(objs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    objs.iter()
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name}"))
}

/// The ClusterRole grants exactly get/list/watch on pods, namespaces, networkpolicies and nodes,
/// list/watch on the three admin policy kinds, plus patch on nodes, and is bound to the ServiceAccount the DaemonSet runs as.
#[test]
fn kubernetes_rbac_is_exactly_what_the_agent_needs() {
    let objs = objects("deployment/kubernetes");
    let role = find(&objs, "ClusterRole", "tessera");
    let mut granted: BTreeMap<(String, String), Vec<String>> = BTreeMap::new();
    for rule in role["rules"].as_array().unwrap() {
        let keys: Vec<&str> = rule
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        assert_eq!(keys, ["apiGroups", "resources", "verbs"], "{rule}");
        for g in rule["apiGroups"].as_array().unwrap() {
            for r in rule["resources"].as_array().unwrap() {
                for v in rule["verbs"].as_array().unwrap() {
                    granted
                        .entry((g.as_str().unwrap().into(), r.as_str().unwrap().into()))
                        .or_default()
                        .push(v.as_str().unwrap().into());
                }
            }
        }
    }
    for verbs in granted.values_mut() {
        verbs.sort();
    }
    let read = || vec!["get".to_owned(), "list".into(), "watch".into()];
    let expected = BTreeMap::from([
        (("".into(), "pods".into()), read()),
        (("".into(), "namespaces".into()), read()),
        (
            ("".into(), "nodes".into()),
            vec!["get".into(), "list".into(), "patch".into(), "watch".into()],
        ),
        (
            ("networking.k8s.io".into(), "networkpolicies".into()),
            read(),
        ),
        (
            (
                "policy.networking.k8s.io".into(),
                "clusternetworkpolicies".into(),
            ),
            vec!["list".to_owned(), "watch".into()],
        ),
        (
            (
                "policy.networking.k8s.io".into(),
                "adminnetworkpolicies".into(),
            ),
            vec!["list".to_owned(), "watch".into()],
        ),
        (
            (
                "policy.networking.k8s.io".into(),
                "baselineadminnetworkpolicies".into(),
            ),
            vec!["list".to_owned(), "watch".into()],
        ),
    ]);
    assert_eq!(granted, expected);

    let binding = find(&objs, "ClusterRoleBinding", "tessera");
    assert_eq!(binding["roleRef"]["name"], "tessera");
    let ds = find(&objs, "DaemonSet", "tessera");
    let sa = &ds["spec"]["template"]["spec"]["serviceAccountName"];
    assert_eq!(binding["subjects"][0]["name"], *sa);
    assert_eq!(
        binding["subjects"][0]["namespace"],
        ds["metadata"]["namespace"]
    );
    find(&objs, "ServiceAccount", sa.as_str().unwrap());
}

/// The DaemonSet and the ConfigMap agree: the probes reach the address the config binds
/// /healthz to; the config is mounted where TESSERA_CONFIG points; the PSK Secret is mounted
/// where TESSERA_PSK_FILE points; the node name comes from the downward API; host PID and
/// network namespaces, exactly three added capabilities, every taint tolerated.
#[test]
fn kubernetes_daemonset_agrees_with_its_config() {
    let objs = objects("deployment/kubernetes");
    let ds = find(&objs, "DaemonSet", "tessera");
    let pod = &ds["spec"]["template"]["spec"];
    assert_eq!(pod["hostPID"], true);
    assert_eq!(pod["hostNetwork"], true);
    assert_eq!(pod["priorityClassName"], "system-node-critical");
    assert_eq!(
        pod["tolerations"],
        serde_json::json!([{"operator": "Exists"}])
    );
    assert_eq!(
        ds["spec"]["updateStrategy"]["rollingUpdate"]["maxUnavailable"],
        1
    );
    // One host path, the TUN device for --encrypt: pods' namespaces are found through /proc
    // (hostPID).
    let host_paths: Vec<&Value> = pod["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|v| v.get("hostPath"))
        .collect();
    assert_eq!(
        host_paths,
        [&serde_json::json!({"path": "/dev/net/tun", "type": "CharDevice"})]
    );
    let c = &pod["containers"][0];
    let sc = &c["securityContext"];
    assert_eq!(sc["privileged"], false);
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(sc["seccompProfile"]["type"], "RuntimeDefault");
    assert_eq!(sc["capabilities"]["drop"], serde_json::json!(["ALL"]));
    assert_eq!(
        sc["capabilities"]["add"],
        serde_json::json!(["NET_ADMIN", "NET_RAW", "SYS_ADMIN", "SYS_PTRACE"])
    );

    let env: BTreeMap<&str, &Value> = c["env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["name"].as_str().unwrap(), e))
        .collect();
    assert_eq!(
        env["TESSERA_NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"],
        "spec.nodeName"
    );
    let mounts: Vec<(&str, &str)> = c["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["name"].as_str().unwrap(),
                m["mountPath"].as_str().unwrap(),
            )
        })
        .collect();
    let volume = |name: &str| {
        pod["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == name)
            .unwrap_or_else(|| panic!("no volume {name}"))
    };
    let mounted_at = |path: &str| -> &Value {
        let (name, dir) = mounts
            .iter()
            .find(|(_, dir)| Path::new(path).starts_with(dir))
            .unwrap_or_else(|| panic!("{path} is on no mount"));
        let v = volume(name);
        let key = Path::new(path).strip_prefix(dir).unwrap().to_str().unwrap();
        let items = v["configMap"]["name"]
            .as_str()
            .map(|cm| find(&objs, "ConfigMap", cm))
            .map(|cm| cm["data"].clone());
        if let Some(data) = items {
            assert!(data.get(key).is_some(), "ConfigMap has no key {key}");
        } else {
            assert!(v["secret"]["secretName"].is_string(), "{path}: {v}");
        }
        v
    };
    let config_path = env["TESSERA_CONFIG"]["value"].as_str().unwrap();
    let cm = mounted_at(config_path)["configMap"]["name"]
        .as_str()
        .unwrap();
    let psk_path = env["TESSERA_PSK_FILE"]["value"].as_str().unwrap();
    let secret = &mounted_at(psk_path)["secret"];
    assert_eq!(secret["defaultMode"], 0o400, "owner read only");
    let secrets = objects("deployment/kubernetes/examples");
    let example = find(&secrets, "Secret", secret["secretName"].as_str().unwrap());
    let key = Path::new(psk_path).file_name().unwrap().to_str().unwrap();
    assert!(example["stringData"][key].is_string());

    let config_text = find(&objs, "ConfigMap", cm)["data"]["config.yaml"]
        .as_str()
        .unwrap()
        .to_owned();
    let config: Value = serde_norway::from_str(&config_text).unwrap();
    let metrics: std::net::SocketAddr = config["metricsAddr"].as_str().unwrap().parse().unwrap();
    for probe in ["startupProbe", "readinessProbe", "livenessProbe"] {
        let get = &c[probe]["httpGet"];
        assert_eq!(get["host"], metrics.ip().to_string(), "{probe}");
        assert_eq!(get["port"], metrics.port(), "{probe}");
        let path = if probe == "readinessProbe" {
            "/readyz"
        } else {
            "/healthz"
        };
        assert_eq!(get["path"], path, "{probe}");
    }
    // The ConfigMap's config is accepted by the agent, given as the DaemonSet gives it (node
    // name and key from the environment).
    assert_eq!(config["runtime"], "kubernetes");
    let dir = tempfile::tempdir().unwrap();
    let etc = dir.path();
    populate_etc(etc);
    std::fs::write(etc.join("config.yaml"), &config_text).unwrap();
    let out = Command::new(TESSERA)
        .args(["run", "--check"])
        .env_clear()
        .env("TESSERA_CONFIG", etc.join("config.yaml"))
        .env("TESSERA_NODE_NAME", "node-1")
        .env("TESSERA_PSK_FILE", etc.join("psk"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));

    // The agent answers the probe path.
    let http = std::fs::read_to_string(repo().join("enforcer/src/agent/http.rs")).unwrap();
    assert!(http.contains("\"/healthz\"") && http.contains("\"/readyz\""));
}

/// The probes `tessera policy matrix -f examples/three-tier/kubernetes/` makes (every pod
/// against every pod on each declared port) and their verdicts; the README of that directory
/// shows the command's real output.
#[test]
fn kubernetes_three_tier_example_matrix() {
    let dir = repo().join("examples/three-tier/kubernetes");
    let table = Command::new(TESSERA)
        .args(["policy", "matrix", "-f", "examples/three-tier/kubernetes/"])
        .current_dir(repo())
        .output()
        .unwrap();
    assert!(table.status.success(), "{}", text(&table));
    let readme = std::fs::read_to_string(dir.join("README.md")).unwrap();
    let shown: String = readme
        .split("$ tessera policy matrix -f examples/three-tier/kubernetes/\n")
        .nth(1)
        .and_then(|rest| rest.split("```").next())
        .expect("README shows the matrix command and its output")
        .lines()
        .filter(|l| !l.starts_with("tessera: skipped"))
        .map(|l| format!("{l}\n"))
        .collect();
    assert_eq!(
        String::from_utf8_lossy(&table.stdout),
        shown,
        "README is stale"
    );

    let out = Command::new(TESSERA)
        .args(["policy", "matrix", "-o", "json", "-f"])
        .arg(repo().join("examples/three-tier/kubernetes"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let mut got: Vec<(String, String, u64, bool)> = v["probes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["from"]
                    .as_str()
                    .unwrap()
                    .trim_start_matches("demo/")
                    .into(),
                p["to"].as_str().unwrap().trim_start_matches("demo/").into(),
                p["port"].as_u64().unwrap(),
                p["allowed"].as_bool().unwrap(),
            )
        })
        .collect();
    got.sort();
    let cell = |from: &str, to: &str, port, allowed| (from.into(), to.into(), port, allowed);
    let mut expected = vec![
        // frontend (http, 80): from External and WebFrontend only.
        cell("external", "frontend", 80, true),
        cell("backend", "frontend", 80, false),
        cell("database", "frontend", 80, false),
        // backend (api, 8080): from WebFrontend and BusinessBackend (its NetworkPolicy), and
        // from External (the uptime probe: the Admin tier ClusterNetworkPolicy 34-*.yaml).
        cell("frontend", "backend", 8080, true),
        cell("external", "backend", 8080, true),
        cell("database", "backend", 8080, false),
        // database (5432): from BusinessBackend and Database only.
        cell("backend", "database", 5432, true),
        cell("frontend", "database", 5432, false),
        cell("external", "database", 5432, false),
    ];
    expected.sort();
    assert_eq!(got, expected);
}

// ---- the unit under a real systemd ----------------------------------------------------------

/// A systemd booted as PID 1 by systemd-nspawn: a private network namespace, this host's /usr
/// (with install.sh's /usr/local/bin/tessera in an overlay on top), a copy of /etc with
/// install.sh's files, booted to basic.target (no service of the host starts). Powered off
/// and removed on drop.
struct BootedSystemd {
    root: tempfile::TempDir,
    nspawn: Option<std::process::Child>,
    init: u32,
}

impl BootedSystemd {
    fn boot(root: tempfile::TempDir) -> BootedSystemd {
        let nspawn = tool("systemd-nspawn", "systemd-container");
        let r = root.path();
        let log = std::fs::File::create(r.join("nspawn.log")).unwrap();
        let child = Command::new(nspawn)
            .args([
                "--quiet",
                "--register=no",
                "--keep-unit",
                "--private-network",
            ])
            .arg("--directory")
            .arg(r.join("root"))
            .arg(format!(
                "--overlay=/usr:{}:/usr",
                r.join("usr-upper").display()
            ))
            // nspawn's own seccomp filter refuses pidfd_getfd, which a real host does not:
            // the unit's filter is the one under test.
            .arg("--system-call-filter=pidfd_getfd")
            .args(["--boot", "--", "systemd.unit=basic.target"])
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let mut booted = BootedSystemd {
            root,
            nspawn: Some(child),
            init: 0,
        };
        let start = std::time::Instant::now();
        loop {
            let pid = booted.nspawn.as_ref().unwrap().id();
            let children = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
                .unwrap_or_default();
            if let Some(init) = children.split_whitespace().next() {
                booted.init = init.parse().unwrap();
                let state = booted.sh("systemctl is-system-running 2>/dev/null || true");
                if ["running", "degraded"].contains(&state.trim()) {
                    return booted;
                }
            }
            assert!(
                start.elapsed() < std::time::Duration::from_secs(60),
                "systemd did not boot in 60 s:\n{}",
                booted.log()
            );
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.root.path().join("nspawn.log")).unwrap_or_default()
    }

    /// `sh -c SCRIPT` inside the container (all its namespaces); stdout and stderr together.
    fn sh(&self, script: &str) -> String {
        let out = Command::new("nsenter")
            .args(["-t", &self.init.to_string(), "-a", "--", "sh", "-c", script])
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap();
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    }
}

impl Drop for BootedSystemd {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "---- journal of tessera.service:\n{}",
                self.sh("journalctl -u tessera --no-pager | tail -40")
            );
        }
        if let Some(mut child) = self.nspawn.take() {
            self.sh("systemctl poweroff");
            let start = std::time::Instant::now();
            while child.try_wait().ok().flatten().is_none() {
                if start.elapsed() > std::time::Duration::from_secs(20) {
                    // Killing the container's init ends its PID namespace.
                    let _ = Command::new("kill")
                        .args(["-9", &self.init.to_string()])
                        .status();
                    let _ = child.kill();
                    let _ = child.wait();
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
        }
    }
}

/// tessera.service as install.sh installs it, started by a real systemd (PID 1 of an nspawn
/// container) with every hardening option of the unit: it enforces a static inventory of three
/// workload namespaces (three-tier policies: WebFrontend -> BusinessBackend:8080 connects,
/// External -> it times out), runs with exactly its four capabilities and no new privileges,
/// and `systemctl stop` removes its rules and ends with status 0.
#[test]
fn systemd_unit_runs_under_systemd() {
    if !testbed::privileged("systemd_unit_runs_under_systemd") {
        return;
    }
    let tmp = tempfile::Builder::new()
        .prefix("tessera-systemd-")
        .tempdir_in("/var/tmp")
        .unwrap();
    let r = tmp.path().join("root");
    for d in [
        "dev", "proc", "sys", "run", "tmp", "var", "root", "home", "usr",
    ] {
        std::fs::create_dir_all(r.join(d)).unwrap();
    }
    for d in ["bin", "sbin", "lib", "lib64"] {
        std::os::unix::fs::symlink(format!("usr/{d}"), r.join(d)).unwrap();
    }
    let cp = Command::new("cp")
        .args(["-a", "/etc/."])
        .arg(r.join("etc"))
        .output()
        .unwrap();
    assert!(cp.status.success(), "{}", text(&cp));
    std::fs::remove_file(r.join("etc/os-release")).unwrap();
    std::fs::copy("/usr/lib/os-release", r.join("etc/os-release")).unwrap();
    std::fs::write(r.join("etc/machine-id"), "").unwrap();
    for stale in ["etc/tessera", "etc/systemd/system/tessera.service"] {
        let _ = std::fs::remove_dir_all(r.join(stale));
        let _ = std::fs::remove_file(r.join(stale));
    }

    let psk = tmp.path().join("psk");
    write_psk(&psk);
    let install = Command::new("bash")
        .arg(repo().join("deployment/systemd/install.sh"))
        .args(["--binary", TESSERA, "--node-name", "node-1", "--psk"])
        .arg(&psk)
        .arg("--root")
        .arg(&r)
        .output()
        .unwrap();
    assert!(install.status.success(), "{}", text(&install));
    // install.sh's /usr goes into the overlay over the host's /usr.
    std::fs::rename(r.join("usr"), tmp.path().join("usr-upper")).unwrap();
    std::fs::create_dir(r.join("usr")).unwrap();
    let etc = r.join("etc/tessera");
    for e in std::fs::read_dir(repo().join("examples/three-tier/policies")).unwrap() {
        let p = e.unwrap().path();
        std::fs::copy(&p, etc.join("policies").join(p.file_name().unwrap())).unwrap();
    }
    let mut inventory = String::from("workloads:\n");
    for (i, (name, role, port)) in [
        ("frontend", "WebFrontend", "[{name: http, port: 80}]"),
        ("backend", "BusinessBackend", "[{name: api, port: 8080}]"),
        // A database may only connect to databases (its egress) and the backend admits
        // frontends and backends (External would get in: the demo's admin uptime probe).
        ("database", "Database", "[]"),
    ]
    .iter()
    .enumerate()
    {
        inventory.push_str(&format!(
            "- {{name: {name}, namespace: shop, labels: {{role: {role}}}, ports: {port}, \
             ips: [10.251.0.{}], netns: /run/netns/{name}}}\n",
            i + 1
        ));
    }
    let inventory_path = etc.join("inventory.yaml");
    std::fs::write(&inventory_path, &inventory).unwrap();

    let sd = BootedSystemd::boot(tmp);
    let setup = sd.sh(
        "set -e; ip link add br0 type bridge; ip link set br0 up; i=1; \
         for n in frontend backend database; do \
           ip netns add $n; ip -n $n link set lo up; \
           ip link add v-$n type veth peer name eth0 netns $n; ip link set v-$n master br0 up; \
           ip -n $n addr add 10.251.0.$i/24 dev eth0; ip -n $n link set eth0 up; i=$((i+1)); \
         done; \
         setsid ip netns exec backend busybox nc -ll -p 8080 -e /bin/echo hi \
           </dev/null >/dev/null 2>&1 & \
         echo ok",
    );
    assert!(setup.trim_end().ends_with("ok"), "{setup}");
    sd.sh("systemctl start tessera");

    let rules = |n: &str| sd.sh(&format!("ip netns exec {n} iptables-save -t mangle"));
    let start = std::time::Instant::now();
    while !["frontend", "backend", "database"]
        .iter()
        .all(|n| rules(n).contains("-j TESSERA-INPUT"))
    {
        assert!(
            start.elapsed() < std::time::Duration::from_secs(30),
            "no rules after 30 s: {}",
            sd.sh("systemctl status tessera --no-pager")
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    let pid = sd.sh("systemctl show tessera -p MainPID --value");
    let status = sd.sh(&format!("cat /proc/{}/status", pid.trim()));
    assert!(
        status.contains("CapEff:\t0000000000283000"),
        "NET_ADMIN, NET_RAW, SYS_PTRACE, SYS_ADMIN only:\n{status}"
    );
    assert!(status.contains("NoNewPrivs:\t1"), "{status}");

    let nc = |from: &str| {
        sd.sh(&format!(
            "ip netns exec {from} busybox nc -w 3 10.251.0.2 8080 </dev/null"
        ))
    };
    assert_eq!(nc("frontend").trim(), "hi", "frontend -> backend:8080");
    let denied = nc("database");
    assert!(
        !denied.contains("hi"),
        "database -> backend:8080 must be refused: {denied}"
    );

    // A namespace mounted under /run/netns after the service started (and added to the
    // inventory) reaches the service's own mount namespace: it is enforced too.
    let late = sd.sh("ip netns add late && ip -n late link set lo up && echo ok");
    assert_eq!(late.trim(), "ok", "{late}");
    std::fs::write(
        &inventory_path,
        format!(
            "{inventory}- {{name: late, namespace: shop, labels: {{role: External}}, \
             ports: [], netns: /run/netns/late}}\n"
        ),
    )
    .unwrap();
    let start = std::time::Instant::now();
    while !rules("late").contains("-j TESSERA-INPUT") {
        assert!(
            start.elapsed() < std::time::Duration::from_secs(30),
            "the late namespace was not enforced: {}",
            sd.sh("journalctl -u tessera --no-pager | tail -5")
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }

    sd.sh("systemctl stop tessera");
    let shown = sd.sh("systemctl show tessera -p ActiveState -p Result -p ExecMainStatus");
    for expected in ["ActiveState=inactive", "Result=success", "ExecMainStatus=0"] {
        assert!(shown.contains(expected), "{shown}");
    }
    assert!(
        sd.sh("journalctl -u tessera --no-pager")
            .contains("stopped cleanly")
    );
    for n in ["frontend", "backend", "database", "late"] {
        assert!(!rules(n).contains("TESSERA"), "rules left in {n}");
    }
    assert_eq!(nc("database").trim(), "hi", "no enforcement after stop");
}
