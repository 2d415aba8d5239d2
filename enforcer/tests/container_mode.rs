//! The agent as a container, deployed as deployment/docker/README.md says: the image built by
//! deployment/docker/build-image.sh (no registry) into a private dockerd, run with the README's
//! `docker run` line (host PID and network namespaces, four capabilities, read-only root,
//! /etc/tessera and /run/netns mounted), configured by /etc/tessera/config.yaml with a static
//! inventory of testbed workloads and a PSK. It must enforce the three-tier policies in the
//! workloads' namespaces, and `docker stop` must take its rules out (SIGTERM handled).
//! Needs root and dockerd (tests/run.sh installs docker.io); SKIPs locally without root.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::ErrorKind;
use std::net::SocketAddr;
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

/// The `docker run` line of deployment/docker/README.md (the block under "## Run it"), as
/// arguments after `docker`, with this test's paths in place of the README's.
fn readme_docker_run(replace: &[(&str, &str)]) -> Vec<String> {
    let readme = std::fs::read_to_string(repo().join("deployment/docker/README.md")).unwrap();
    let block = readme
        .split("## Run it")
        .nth(1)
        .and_then(|r| r.split("```sh\n").nth(1))
        .and_then(|r| r.split("```").next())
        .expect("README has a docker run block under '## Run it'");
    let line = block.replace("\\\n", " ");
    let mut args: Vec<String> = line.split_whitespace().map(str::to_owned).collect();
    assert_eq!(args.remove(0), "docker", "{line}");
    for a in &mut args {
        if let Some((_, to)) = replace.iter().find(|(from, _)| a == from) {
            *a = (*to).to_owned();
        }
    }
    args
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

/// /etc/tessera for the container: a PSK (0600), the three-tier policies, the inventory if any,
/// and config.yaml with `runtime` (and what follows it) as given.
fn write_etc(etc: &Path, metrics: SocketAddr, inventory: Option<String>, runtime: &str) {
    std::fs::create_dir_all(etc.join("policies")).unwrap();
    let policies = repo().join("examples/three-tier/policies");
    for e in std::fs::read_dir(&policies).unwrap() {
        let p = e.unwrap().path();
        std::fs::copy(&p, etc.join("policies").join(p.file_name().unwrap())).unwrap();
    }
    if let Some(inventory) = inventory {
        std::fs::write(etc.join("inventory.yaml"), inventory).unwrap();
    }
    let mut key = [0u8; 32];
    testbed::topo::getrandom_fill(&mut key);
    let hex: String = key.iter().map(|b| format!("{b:02x}")).collect();
    std::fs::write(etc.join("psk"), hex).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(etc.join("psk"), std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::write(
        etc.join("config.yaml"),
        format!(
            "nodeName: node-n1\n{runtime}\npolicies: /etc/tessera/policies\n\
             pskFile: /etc/tessera/psk\nmetricsAddr: {metrics}\nlogFormat: text\n"
        ),
    )
    .unwrap();
}

/// The agent container, started with the `docker run` line of deployment/docker/README.md
/// itself (this test's paths), and its metrics address.
struct AgentContainer<'a> {
    daemon: &'a DockerDaemon,
    name: &'static str,
    metrics: SocketAddr,
}

impl<'a> AgentContainer<'a> {
    /// Builds the image with build-image.sh, writes /etc/tessera under `dir` and runs the agent.
    fn start(
        daemon: &'a DockerDaemon,
        dir: &Path,
        inventory: Option<String>,
        runtime: &str,
    ) -> AgentContainer<'a> {
        let tag = format!("tessera-test:{}", std::process::id());
        build_image(daemon, &tag);
        let etc = dir.join("etc-tessera");
        let metrics = testbed::agent::fresh_local_addr();
        write_etc(&etc, metrics, inventory, runtime);
        let sock = daemon.host().trim_start_matches("unix://").to_owned();
        let etc_mount = format!("{}:/etc/tessera:ro", etc.display());
        let sock_mount = format!("{sock}:/var/run/docker.sock");
        let name = "tessera";
        let run = readme_docker_run(&[
            ("/etc/tessera:/etc/tessera:ro", &etc_mount),
            ("/var/run/docker.sock:/var/run/docker.sock", &sock_mount),
            ("tessera:0.1.0", &tag),
        ]);
        assert_eq!(run[..4], ["run", "-d", "--name", name]);
        let run: Vec<&str> = run.iter().map(String::as_str).collect();
        daemon.docker(&run);
        AgentContainer {
            daemon,
            name,
            metrics,
        }
    }

    fn logs(&self) -> String {
        let out = self.daemon.docker_status(&["logs", self.name]);
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    }

    /// Waits until /healthz answers and `ready()` holds.
    fn wait_ready(&self, what: &str, ready: impl Fn() -> bool) {
        let start = Instant::now();
        loop {
            let healthy = testbed::agent::http_get(self.metrics, "/healthz").is_some();
            if healthy && ready() {
                return;
            }
            assert!(
                start.elapsed() < READY_TIMEOUT,
                "the agent container: {what} not reached within {READY_TIMEOUT:?}; \
                 healthz: {healthy}; logs:\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// `docker stop`: SIGTERM; the agent must exit 0 after removing its rules, and stay
    /// stopped (unless-stopped).
    fn stop(&self) {
        self.daemon.docker(&["stop", self.name]);
        let state = self.daemon.docker(&[
            "inspect",
            "-f",
            "{{.State.Status}} {{.State.ExitCode}}",
            self.name,
        ]);
        assert_eq!(state.trim(), "exited 0", "logs:\n{}", self.logs());
        assert!(self.logs().contains("stopped cleanly"), "{}", self.logs());
    }
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
    let agent = AgentContainer::start(
        &daemon,
        tb.dir(),
        Some(tb.inventory_yaml(1)),
        "runtime: static\ninventory: /etc/tessera/inventory.yaml",
    );
    let (name, metrics) = (agent.name, agent.metrics);
    let logs = || agent.logs();
    let namespaces: Vec<String> = tb.workloads.iter().map(|w| w.ns.clone()).collect();
    agent.wait_ready("rules in every workload", || {
        namespaces.iter().all(|ns| enforced(ns))
    });

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
    const NET_RAW: u64 = 1 << 13;
    const SYS_PTRACE: u64 = 1 << 19;
    const SYS_ADMIN: u64 = 1 << 21;
    assert_eq!(
        u64::from_str_radix(&field("CapEff"), 16).unwrap(),
        NET_ADMIN | NET_RAW | SYS_PTRACE | SYS_ADMIN
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
    // Denied by the frontend's ingress: its SYN is dropped, the client times out.
    match tb.connect("backend", "frontend", 80, DENIED_TIMEOUT) {
        Err(e) if e.kind() == ErrorKind::TimedOut => {}
        other => panic!(
            "backend -> frontend:80 must time out, got {other:?}\n{}",
            logs()
        ),
    }

    agent.stop();
    for ns in &namespaces {
        let rules = Testbed::mangle_rules(ns);
        assert!(
            !rules.contains("TESSERA"),
            "rules left in {ns} after docker stop:\n{rules}"
        );
    }
    // Nothing enforces any more: the connection denied before goes through.
    let mut s = tb
        .connect("backend", "frontend", 80, OK_TIMEOUT)
        .expect("without the agent, backend -> frontend connects");
    echo_once(&mut s, 9).unwrap();
}

/// `rules` of the netns of process `pid` contain our jump.
fn pid_enforced(pid: u32) -> bool {
    let net = format!("--net=/proc/{pid}/ns/net");
    testbed::run(&["nsenter", &net, "iptables-save", "-t", "mangle"]).contains("-j TESSERA-INPUT")
}

/// The Docker deployment proper: the agent container follows the daemon whose socket is
/// mounted at /var/run/docker.sock (`runtime: docker`, only containers labelled
/// `tessera.dev/enforce=true`), opens their namespaces as /proc/PID/ns/net (host PID namespace,
/// SYS_PTRACE), enforces the three-tier policies between them, leaves itself alone (host
/// network), and `docker stop` takes its rules out of the workload containers.
#[test]
fn agent_container_follows_docker_containers() {
    if !testbed::privileged("agent_container_follows_docker_containers") {
        return;
    }
    let mut tb = Testbed::builder()
        .policies(&repo().join("examples/three-tier/policies"))
        .build();
    let daemon = DockerDaemon::start();
    daemon.import_busybox("tsbox:1");
    let agent = AgentContainer::start(
        &daemon,
        tb.dir(),
        None,
        "runtime: docker\ndocker:\n  host: unix:///var/run/docker.sock\n  \
         namespaceLabel: tessera.dev/namespace\n  filters: [tessera.dev/enforce=true]",
    );
    agent.wait_ready("following the daemon", || true);

    let mut pids = Vec::new();
    for (name, role, ports, port) in [
        ("frontend", "WebFrontend", "http=80", 80),
        ("backend", "BusinessBackend", "api=8080", 8080),
    ] {
        let c = daemon.run(
            name,
            &[
                ("tessera.dev/enforce", "true"),
                ("tessera.dev/namespace", "shop"),
                ("role", role),
                ("tessera.dev/ports", ports),
            ],
            &["tsbox:1", "sleep", "1000000"],
        );
        tb.attach_netns(1, name, c.pid);
        tb.serve(name, port);
        pids.push(c.pid);
    }
    agent.wait_ready("rules in both containers", || {
        pids.iter().all(|p| pid_enforced(*p))
    });

    let mut s = tb
        .connect("frontend", "backend", 8080, OK_TIMEOUT)
        .unwrap_or_else(|e| panic!("frontend -> backend:8080: {e}\n{}", agent.logs()));
    echo_once(&mut s, 3).unwrap();
    drop(s);
    match tb.connect("backend", "frontend", 80, DENIED_TIMEOUT) {
        Err(e) if e.kind() == ErrorKind::TimedOut => {}
        other => panic!(
            "backend -> frontend:80 must time out (frontend ingress), got {other:?}\n{}",
            agent.logs()
        ),
    }

    agent.stop();
    for pid in &pids {
        assert!(
            !pid_enforced(*pid),
            "rules left in container pid {pid} after docker stop"
        );
    }
}

/// A YAML file of the repository (one or more documents) as JSON values.
fn yaml_docs(path: &str) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(repo().join(path)).unwrap();
    serde_norway::Deserializer::from_str(&text)
        .map(|d| serde::Deserialize::deserialize(d).unwrap())
        .filter(|v: &serde_json::Value| !v.is_null())
        .collect()
}

/// The DaemonSet of deployment/kubernetes/, run by Docker the way a kubelet would run its pod
/// (no cluster can run here): the image built by build-image.sh; host PID and network; the
/// container's securityContext (capabilities, read-only root, no privilege escalation), args
/// and environment (`spec.nodeName` for the downward API); the ConfigMap and a PSK Secret
/// written to files and mounted where its volumeMounts say. The only addition: a kubeconfig
/// (TESSERA_KUBECONFIG) for the loopback API emulator that stands in for the API server. The
/// API holds examples/three-tier/kubernetes/ (its pods given the testbed's IPs). The agent must
/// find the pods' namespaces by their IPs through /proc, take the policies from the API,
/// enforce the README's walk-through, answer the probe, and remove its rules on stop.
#[test]
fn daemonset_pod_spec_enforces_pods_from_the_api() {
    if !testbed::privileged("daemonset_pod_spec_enforces_pods_from_the_api") {
        return;
    }
    use serde_json::{Value, json};
    // The pods of examples/three-tier/kubernetes/, one testbed namespace each (same names and
    // ports), with echo servers on their ports.
    let tb = Testbed::builder()
        .workload(WorkloadSpec::new("external", 1, "External"))
        .workload(WorkloadSpec::new("frontend", 1, "WebFrontend").port(Some("http"), 80))
        .workload(WorkloadSpec::new("backend", 1, "BusinessBackend").port(Some("api"), 8080))
        .workload(WorkloadSpec::new("database", 1, "Database").port(None, 5432))
        .build();
    let node = tb.node_name("n1");
    // Each pod's "sandbox": a process in its namespace, which the agent finds through /proc.
    struct Sandboxes(Vec<std::process::Child>);
    impl Drop for Sandboxes {
        fn drop(&mut self) {
            for c in &mut self.0 {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
    let _sandboxes = Sandboxes(
        tb.workloads
            .iter()
            .map(|w| {
                Command::new("ip")
                    .args(["netns", "exec", &w.ns, "sleep", "3600"])
                    .stdin(std::process::Stdio::null())
                    .spawn()
                    .unwrap()
            })
            .collect(),
    );

    // The API server's view: the example's Namespace, Pods (scheduled on this node, with the
    // testbed's IPs as status), NetworkPolicies and admin policies (their CRDs installed), as
    // `kubectl apply -f` would send them (the Services play no part in the agent's decisions).
    let emu = kube_emulator::Emulator::start_blocking().unwrap();
    emu.install_admin_crds().unwrap();
    let mut example = Vec::new();
    let mut files: Vec<PathBuf> = std::fs::read_dir(repo().join("examples/three-tier/kubernetes"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    for f in files {
        let rel = f.strip_prefix(repo()).unwrap().to_str().unwrap().to_owned();
        example.extend(yaml_docs(&rel));
    }
    let mut pods = 0;
    for mut obj in example {
        match obj["kind"].as_str().unwrap() {
            "Service" => continue,
            "Pod" => {
                let w = tb.workload(obj["metadata"]["name"].as_str().unwrap());
                let ip = w.ip.to_string();
                obj["spec"]["nodeName"] = json!(node);
                obj["status"] = json!({"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]});
                pods += 1;
            }
            _ => {}
        }
        emu.apply(obj).unwrap();
    }
    assert_eq!(
        pods,
        tb.workloads.len(),
        "one testbed namespace per example pod"
    );

    // The pod spec, as deployment/kubernetes/ defines it.
    let objs: Vec<Value> = ["rbac.yaml", "configmap.yaml", "daemonset.yaml"]
        .iter()
        .flat_map(|f| yaml_docs(&format!("deployment/kubernetes/{f}")))
        .collect();
    let kind = |k: &str| objs.iter().find(|o| o["kind"] == k).unwrap();
    let pod = &kind("DaemonSet")["spec"]["template"]["spec"];
    assert_eq!(
        (pod["hostPID"].clone(), pod["hostNetwork"].clone()),
        (json!(true), json!(true))
    );
    let c = &pod["containers"][0];
    let sc = &c["securityContext"];
    let dir = tb.dir().join("daemonset");
    let tag = format!("tessera-test:{}", std::process::id());
    let daemon = DockerDaemon::start();
    build_image(&daemon, &tag);
    let name = "tessera-ds";
    let mut run: Vec<String> = [
        "run", "-d", "--name", name, "--pid", "host", "--net", "host",
    ]
    .map(str::to_owned)
    .to_vec();
    run.extend(["--cap-drop".into(), "ALL".into()]);
    for cap in sc["capabilities"]["add"].as_array().unwrap() {
        run.extend(["--cap-add".into(), cap.as_str().unwrap().to_owned()]);
    }
    assert_eq!(sc["capabilities"]["drop"], json!(["ALL"]));
    if sc["readOnlyRootFilesystem"] == true {
        run.push("--read-only".into());
    }
    if sc["allowPrivilegeEscalation"] == false {
        run.extend(["--security-opt".into(), "no-new-privileges".into()]);
    }
    let metrics = testbed::agent::fresh_local_addr();
    for e in c["env"].as_array().unwrap() {
        let value = match (&e["value"], &e["valueFrom"]["fieldRef"]["fieldPath"]) {
            (Value::String(v), _) => v.clone(),
            (_, Value::String(f)) if f == "spec.nodeName" => node.clone(),
            other => panic!("env {e}: unsupported {other:?}"),
        };
        run.extend([
            "-e".into(),
            format!("{}={value}", e["name"].as_str().unwrap()),
        ]);
    }
    // Additions: the emulator's kubeconfig, a free port instead of the ConfigMap's 9090
    // (the probes' port is checked against the ConfigMap by deployment.rs), and encryption
    // between nodes on (the ConfigMap's `encrypt: true`, here as its environment variable): the
    // tunnel must start inside the confined container, on the mounted TUN device.
    let kubeconfig = dir.join("kubeconfig");
    std::fs::create_dir_all(&dir).unwrap();
    emu.write_kubeconfig(&kubeconfig).unwrap();
    run.extend([
        "-v".into(),
        format!("{}:/etc/tessera/kubeconfig:ro", kubeconfig.display()),
        "-e".into(),
        "TESSERA_KUBECONFIG=/etc/tessera/kubeconfig".into(),
        "-e".into(),
        format!("TESSERA_METRICS_ADDR={metrics}"),
        "-e".into(),
        "TESSERA_ENCRYPT=true".into(),
    ]);
    for m in c["volumeMounts"].as_array().unwrap() {
        let vname = m["name"].as_str().unwrap();
        let vol = pod["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == vname)
            .unwrap();
        if let Some(host) = vol["hostPath"]["path"].as_str() {
            // The TUN device: the host's node, bind-mounted as a kubelet would.
            assert_eq!(vol["hostPath"]["type"], "CharDevice", "{vol}");
            run.extend([
                "-v".into(),
                format!("{host}:{}", m["mountPath"].as_str().unwrap()),
            ]);
            continue;
        }
        let src = dir.join(vname);
        std::fs::create_dir_all(&src).unwrap();
        if let Some(cm) = vol["configMap"]["name"].as_str() {
            let cm = objs
                .iter()
                .find(|o| o["kind"] == "ConfigMap" && o["metadata"]["name"] == cm)
                .unwrap();
            for (k, v) in cm["data"].as_object().unwrap() {
                std::fs::write(src.join(k), v.as_str().unwrap()).unwrap();
            }
        } else if vol["secret"]["secretName"].is_string() {
            // The PSK Secret, as README.md creates it: key `psk`, 32 random bytes in hex.
            let mut key = [0u8; 32];
            testbed::topo::getrandom_fill(&mut key);
            let hex: String = key.iter().map(|b| format!("{b:02x}")).collect();
            std::fs::write(src.join("psk"), hex).unwrap();
            let mode = vol["secret"]["defaultMode"].as_u64().unwrap() as u32;
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(src.join("psk"), std::fs::Permissions::from_mode(mode))
                .unwrap();
        } else {
            panic!("volume {vol}: not a ConfigMap or Secret");
        }
        let ro = if m["readOnly"] == true { ":ro" } else { "" };
        run.extend([
            "-v".into(),
            format!("{}:{}{ro}", src.display(), m["mountPath"].as_str().unwrap()),
        ]);
    }
    run.push(tag.clone());
    for a in c["args"].as_array().unwrap() {
        run.push(a.as_str().unwrap().to_owned());
    }
    let run: Vec<&str> = run.iter().map(String::as_str).collect();
    daemon.docker(&run);
    let agent = AgentContainer {
        daemon: &daemon,
        name,
        metrics,
    };

    let namespaces: Vec<String> = tb.workloads.iter().map(|w| w.ns.clone()).collect();
    agent.wait_ready("the pods' rules", || {
        namespaces.iter().all(|ns| enforced(ns))
    });
    let probe = &c["readinessProbe"]["httpGet"];
    let healthz = testbed::agent::http_get(metrics, probe["path"].as_str().unwrap());
    assert_eq!(healthz.as_deref(), Some("ok\n"));
    // The tunnel runs in the confined container (host network: the device is the node's).
    let status: Value =
        serde_json::from_str(&testbed::agent::http_get(metrics, "/status").unwrap()).unwrap();
    assert_eq!(status["tunnel"]["device"], "tsr-wg0", "{status:#}");
    assert!(
        testbed::run_status(&["ip", "link", "show", "tsr-wg0"])
            .status
            .success(),
        "no tunnel device on the node\n{}",
        agent.logs()
    );

    // The walk-through of examples/three-tier/kubernetes/README.md (external reaches the
    // backend through the Admin-tier uptime-probe policy).
    for (from, to, port, allowed) in [
        ("external", "frontend", 80, true),
        ("external", "backend", 8080, true),
        ("backend", "frontend", 80, false),
        ("frontend", "backend", 8080, true),
        ("frontend", "database", 5432, false),
        ("backend", "database", 5432, true),
        ("database", "backend", 8080, false),
    ] {
        let cell = format!("{from} -> {to}:{port}");
        if allowed {
            let mut s = tb
                .connect(from, to, port, OK_TIMEOUT)
                .unwrap_or_else(|e| panic!("{cell}: {e}\n{}", agent.logs()));
            echo_once(&mut s, 5).unwrap();
        } else {
            match tb.connect(from, to, port, DENIED_TIMEOUT) {
                Err(e) if e.kind() == ErrorKind::TimedOut => {}
                other => panic!("{cell} must time out, got {other:?}\n{}", agent.logs()),
            }
        }
    }

    agent.stop();
    for ns in &namespaces {
        assert!(!enforced(ns), "rules left in {ns} after the pod stopped");
    }
    assert!(
        !testbed::run_status(&["ip", "link", "show", "tsr-wg0"])
            .status
            .success(),
        "the tunnel device outlived the pod"
    );
}
