//! The agent as a container, deployed as deployment/docker/README.md says: the image built by
//! deployment/docker/build-image.sh (no registry) into a private dockerd, run with the README's
//! `docker run` line (host PID and network namespaces, three capabilities, read-only root,
//! /etc/tessera and /run/netns mounted), configured by /etc/tessera/config.yaml with a static
//! inventory of testbed workloads and a PSK. It must enforce the three-tier policies in the
//! workloads' namespaces, and `docker stop` must take its rules out (SIGTERM handled).
//! Needs root and dockerd (tests/run.sh installs docker.io); SKIPs locally without root.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::ErrorKind;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use testbed::docker::{DOCKER, DockerDaemon};
use testbed::{Testbed, WorkloadSpec, echo_once};

const TESSERA: &str = env!("CARGO_BIN_EXE_tessera");
const DENIED_TIMEOUT: Duration = Duration::from_secs(2);
const OK_TIMEOUT: Duration = Duration::from_secs(10);
const READY_TIMEOUT: Duration = Duration::from_secs(30);

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_owned()
}

fn free_port() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// `build-image.sh --binary <this build's tessera> --tag TAG -H <daemon>`.
fn build_image(daemon: &DockerDaemon, tag: &str) {
    let out = Command::new("bash")
        .arg(repo().join("deployment/docker/build-image.sh"))
        .args(["--binary", TESSERA, "--tag", tag, "-H", &daemon.host()])
        .env("DOCKER", DOCKER)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "build-image.sh failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// /etc/tessera for the container: config.yaml (static runtime), the testbed's inventory of
/// node 1, a PSK (0600) and the three-tier policies.
fn write_etc(tb: &Testbed, etc: &Path, metrics: SocketAddr) {
    std::fs::create_dir_all(etc.join("policies")).unwrap();
    let policies = repo().join("examples/three-tier/policies");
    for e in std::fs::read_dir(&policies).unwrap() {
        let p = e.unwrap().path();
        std::fs::copy(&p, etc.join("policies").join(p.file_name().unwrap())).unwrap();
    }
    std::fs::write(etc.join("inventory.yaml"), tb.inventory_yaml(1)).unwrap();
    let mut key = [0u8; 32];
    testbed::topo::getrandom_fill(&mut key);
    let hex: String = key.iter().map(|b| format!("{b:02x}")).collect();
    std::fs::write(etc.join("psk"), hex).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(etc.join("psk"), std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::write(
        etc.join("config.yaml"),
        format!(
            "nodeName: node-n1\nruntime: static\ninventory: /etc/tessera/inventory.yaml\n\
             policies: /etc/tessera/policies\npskFile: /etc/tessera/psk\n\
             metricsAddr: {metrics}\nlogFormat: text\n"
        ),
    )
    .unwrap();
}

fn enforced(ns: &str) -> bool {
    Testbed::mangle_rules(ns).contains("-j TESSERA-INPUT")
}

#[test]
fn agent_container_enforces_and_cleans_up_on_docker_stop() {
    if !testbed::privileged("agent_container_enforces_and_cleans_up_on_docker_stop") {
        return;
    }
    let tb = Testbed::builder()
        .policies(&repo().join("examples/three-tier/policies"))
        .workload(WorkloadSpec::new("external", 1, "External"))
        .workload(WorkloadSpec::new("frontend", 1, "WebFrontend").port(Some("http"), 80))
        .workload(WorkloadSpec::new("backend", 1, "BusinessBackend").port(Some("api"), 8080))
        .build();
    let daemon = DockerDaemon::start();
    let tag = format!("tessera-test:{}", std::process::id());
    build_image(&daemon, &tag);

    let etc = tb.dir().join("etc-tessera");
    let metrics = free_port();
    write_etc(&tb, &etc, metrics);
    let sock = daemon.host().trim_start_matches("unix://").to_owned();
    let etc_mount = format!("{}:/etc/tessera:ro", etc.display());
    let sock_mount = format!("{sock}:/var/run/docker.sock");
    // deployment/docker/README.md's line, with this test's paths.
    let name = "tessera";
    #[rustfmt::skip]
    let run = [
        "run", "-d", "--name", name, "--restart", "unless-stopped",
        "--pid", "host", "--net", "host",
        "--cap-drop", "ALL", "--cap-add", "NET_ADMIN", "--cap-add", "SYS_ADMIN", "--cap-add", "SYS_PTRACE",
        "--read-only", "--security-opt", "no-new-privileges",
        "-v", &etc_mount,
        "-v", "/run/netns:/run/netns:ro,rslave",
        "-v", &sock_mount,
        &tag, "run", "--config", "/etc/tessera/config.yaml",
    ];
    daemon.docker(&run);
    let logs = || {
        let out = daemon.docker_status(&["logs", name]);
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    };

    let start = Instant::now();
    let namespaces: Vec<String> = tb.workloads.iter().map(|w| w.ns.clone()).collect();
    loop {
        let healthy = testbed::agent::http_get(metrics, "/healthz").is_some();
        if healthy && namespaces.iter().all(|ns| enforced(ns)) {
            break;
        }
        assert!(
            start.elapsed() < READY_TIMEOUT,
            "the agent container did not enforce every workload within {READY_TIMEOUT:?}; \
             healthz: {healthy}; logs:\n{}",
            logs()
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    // The agent really runs confined as the README (and the Kubernetes DaemonSet) say: exactly
    // three effective capabilities, no new privileges, Docker's default seccomp filter.
    let pid = daemon.docker(&["inspect", "-f", "{{.State.Pid}}", name]);
    let status = std::fs::read_to_string(format!("/proc/{}/status", pid.trim())).unwrap();
    let field = |k: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{k}:")))
            .map(|v| v.trim().to_owned())
            .unwrap_or_else(|| panic!("no {k} in {status}"))
    };
    const NET_ADMIN: u64 = 1 << 12;
    const SYS_PTRACE: u64 = 1 << 19;
    const SYS_ADMIN: u64 = 1 << 21;
    assert_eq!(
        u64::from_str_radix(&field("CapEff"), 16).unwrap(),
        NET_ADMIN | SYS_PTRACE | SYS_ADMIN
    );
    assert_eq!(field("NoNewPrivs"), "1");
    assert_eq!(field("Seccomp"), "2", "seccomp filter mode");

    // `tessera status` from inside the container lists the three workloads as enforced.
    let metrics_env = format!("TESSERA_METRICS_ADDR={metrics}");
    let status = daemon.docker(&["exec", "-e", &metrics_env, name, "tessera", "status"]);
    for w in ["shop/external", "shop/frontend", "shop/backend"] {
        assert!(
            status
                .lines()
                .any(|l| l.contains(w) && l.contains("enforced")),
            "{w} not enforced in `tessera status`:\n{status}"
        );
    }

    // Allowed: WebFrontend -> BusinessBackend on "api".
    let mut s = tb
        .connect("frontend", "backend", 8080, OK_TIMEOUT)
        .unwrap_or_else(|e| panic!("frontend -> backend:8080 must connect: {e}\n{}", logs()));
    echo_once(&mut s, 7).unwrap();
    drop(s);
    // Denied by the backend's ingress: its SYN is dropped, the client times out.
    match tb.connect("external", "backend", 8080, DENIED_TIMEOUT) {
        Err(e) if e.kind() == ErrorKind::TimedOut => {}
        other => panic!(
            "external -> backend:8080 must time out, got {other:?}\n{}",
            logs()
        ),
    }

    // `docker stop`: SIGTERM; the agent removes its rules and exits 0 (and stays stopped:
    // unless-stopped).
    daemon.docker(&["stop", "-t", "20", name]);
    let state = daemon.docker(&[
        "inspect",
        "-f",
        "{{.State.Status}} {{.State.ExitCode}}",
        name,
    ]);
    assert_eq!(state.trim(), "exited 0", "logs:\n{}", logs());
    assert!(logs().contains("stopped cleanly"), "{}", logs());
    for ns in &namespaces {
        let rules = Testbed::mangle_rules(ns);
        assert!(
            !rules.contains("TESSERA"),
            "rules left in {ns} after docker stop:\n{rules}"
        );
    }
    // Nothing enforces any more: the connection denied before goes through.
    let mut s = tb
        .connect("external", "backend", 8080, OK_TIMEOUT)
        .expect("without the agent, external -> backend connects");
    echo_once(&mut s, 9).unwrap();
}
