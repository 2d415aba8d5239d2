//! `tessera run --runtime docker` against a private dockerd (one per test): containers are
//! enforced as they start, forgotten as they stop, followed across daemon restarts, and
//! host-network containers are left alone. Containers run with `--network none`; the tests
//! that connect plumb their netns into a testbed node. Needs root (tests/run.sh runs them in
//! CI); without root they print a SKIP line locally and fail under CI=true.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use testbed::docker::{Container, DockerDaemon};
use testbed::{AgentConfig, Mode, Testbed, echo_once};

const TESSERA: &str = env!("CARGO_BIN_EXE_tessera");
const IMAGE: &str = "tsbox:1";
/// A denied SYN is dropped: connect() times out after this.
const DENIED_TIMEOUT: Duration = Duration::from_secs(2);
const OK_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the agent may take to act on a Docker event or a reconnect (backoff is ≤ 5 s).
const WAIT: Duration = Duration::from_secs(30);
const ENFORCE: (&str, &str) = ("tessera.dev/enforce", "true");
const SHOP: (&str, &str) = ("tessera.dev/namespace", "shop");

fn policies() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/three-tier/policies")
}

/// A daemon with the busybox image, an empty testbed (two nodes, no workloads) and the agent
/// of node 1 following the daemon (only containers labelled `tessera.dev/enforce=true`).
fn setup(daemon: DockerDaemon) -> (DockerDaemon, Testbed) {
    daemon.import_busybox(IMAGE);
    let tb = agent_for(&daemon);
    (daemon, tb)
}

/// An empty testbed and the agent of node 1 following `daemon`.
fn agent_for(daemon: &DockerDaemon) -> Testbed {
    let mut tb = Testbed::builder().policies(&policies()).build();
    let host = daemon.host();
    tb.start_agent_with(
        1,
        &AgentConfig::new(Path::new(TESSERA), Mode::Psk),
        &[
            "--runtime",
            "docker",
            "--docker-host",
            &host,
            "--docker-filter",
            "tessera.dev/enforce=true",
        ],
    );
    tb
}

fn sleeper(d: &DockerDaemon, name: &str, labels: &[(&str, &str)]) -> Container {
    d.run(name, labels, &[IMAGE, "sleep", "1000000"])
}

fn enforced(tb: &Testbed) -> f64 {
    tb.agent(1).metrics().sum("tessera_workloads_enforced")
}

/// Waits until the agent enforces exactly `n` workloads.
fn wait_enforced(tb: &Testbed, n: f64, what: &str) {
    let start = Instant::now();
    loop {
        let got = enforced(tb);
        if got == n {
            return;
        }
        if start.elapsed() > WAIT {
            panic!(
                "{what}: tessera_workloads_enforced is {got}, expected {n} after {WAIT:?}\n{}",
                tb.agent_logs()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `iptables-save -t mangle` in the netns of process `pid`.
fn rules_of(pid: u32) -> String {
    let net = format!("--net=/proc/{pid}/ns/net");
    testbed::run(&["nsenter", &net, "iptables-save", "-t", "mangle"])
}

fn has_rules(pid: u32) -> bool {
    rules_of(pid).contains("-j TESSERA-INPUT")
}

fn wait_rules(tb: &Testbed, c: &Container) {
    let start = Instant::now();
    while !has_rules(c.pid) {
        if start.elapsed() > WAIT {
            panic!(
                "no rules in container {} (pid {}) after {WAIT:?}:\n{}\n{}",
                c.name,
                c.pid,
                rules_of(c.pid),
                tb.agent_logs()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn labelled_containers_started_after_the_agent_are_enforced_and_policed() {
    if !testbed::privileged("labelled_containers_started_after_the_agent_are_enforced") {
        return;
    }
    let (d, mut tb) = setup(DockerDaemon::start());
    wait_enforced(&tb, 0.0, "no containers yet");
    let specs = [
        ("frontend", "WebFrontend", "http=80", 80),
        ("backend", "BusinessBackend", "api=8080", 8080),
        ("database", "Database", "postgres=5432", 5432),
    ];
    let mut containers = Vec::new();
    for (name, role, ports, port) in specs {
        let c = sleeper(
            &d,
            name,
            &[ENFORCE, SHOP, ("role", role), ("tessera.dev/ports", ports)],
        );
        tb.attach_netns(1, name, c.pid);
        tb.serve(name, port);
        containers.push(c);
    }
    // Not labelled for enforcement: the agent's filter leaves it alone.
    let bystander = sleeper(&d, "bystander", &[SHOP, ("role", "WebFrontend")]);
    for c in &containers {
        wait_rules(&tb, c);
    }
    wait_enforced(&tb, 3.0, "three labelled containers");
    assert!(
        !has_rules(bystander.pid),
        "a container without the filter label got rules"
    );

    // frontend -> backend:api is allowed by the backend policy.
    let mut s = tb
        .connect("frontend", "backend", 8080, OK_TIMEOUT)
        .unwrap_or_else(|e| panic!("frontend -> backend:8080: {e}\n{}", tb.agent_logs()));
    echo_once(&mut s, 7).unwrap();
    // backend -> frontend:http: the frontend admits External and WebFrontend only (its
    // ingress drops the SYN: a timeout).
    let denied = tb.connect("backend", "frontend", 80, DENIED_TIMEOUT);
    assert!(
        denied.is_err(),
        "backend -> frontend:80 must be denied by the frontend's ingress"
    );
    // database -> backend:api: the database's egress allows databases only (refused at the
    // SYN-ACK).
    let denied = tb.connect("database", "backend", 8080, DENIED_TIMEOUT);
    assert!(
        denied.is_err(),
        "database -> backend:8080 must be denied by the database's egress"
    );
    assert_eq!(
        tb.server("backend", 8080).accepted(),
        1,
        "only the allowed connection reached the backend"
    );
}

#[test]
fn a_stopped_container_is_forgotten_and_its_name_enforced_again_in_its_new_netns() {
    if !testbed::privileged("a_stopped_container_is_forgotten") {
        return;
    }
    let (d, tb) = setup(DockerDaemon::start());
    let web = sleeper(&d, "web", &[ENFORCE, SHOP, ("role", "WebFrontend")]);
    let db = sleeper(&d, "db", &[ENFORCE, SHOP, ("role", "Database")]);
    wait_rules(&tb, &web);
    wait_rules(&tb, &db);
    wait_enforced(&tb, 2.0, "web and db running");

    // Paused: the netns stays, so does enforcement. (A container started after the pause is
    // enforced only once the pause event has been handled.)
    d.docker(&["pause", "web"]);
    let probe = sleeper(&d, "probe", &[ENFORCE, SHOP, ("role", "Database")]);
    wait_rules(&tb, &probe);
    wait_enforced(&tb, 3.0, "web paused, probe started");
    assert!(has_rules(web.pid), "a paused container lost its rules");
    d.docker(&["unpause", "web"]);
    d.rm("probe");
    wait_enforced(&tb, 2.0, "web unpaused, probe removed");
    assert!(has_rules(web.pid), "an unpaused container lost its rules");

    d.stop("web");
    wait_enforced(&tb, 1.0, "web stopped");
    assert!(has_rules(db.pid), "db lost its rules when web stopped");

    // The same container started again: a new process, so a new netns.
    let web2 = d.start_container("web");
    assert_ne!(web2.pid, web.pid);
    wait_rules(&tb, &web2);
    wait_enforced(&tb, 2.0, "web started again");

    // Removed, and a new container under the same name.
    d.rm("web");
    wait_enforced(&tb, 1.0, "web removed");
    let web3 = sleeper(&d, "web", &[ENFORCE, SHOP, ("role", "WebFrontend")]);
    wait_rules(&tb, &web3);
    wait_enforced(&tb, 2.0, "a new web");
}

#[test]
fn a_daemon_restart_forgets_the_containers_that_died_with_it() {
    if !testbed::privileged("a_daemon_restart_forgets_the_containers_that_died_with_it") {
        return;
    }
    let (mut d, tb) = setup(DockerDaemon::start());
    let old = sleeper(&d, "old", &[ENFORCE, SHOP, ("role", "Database")]);
    wait_rules(&tb, &old);
    wait_enforced(&tb, 1.0, "before the restart");

    d.restart_daemon();
    wait_enforced(&tb, 0.0, "old died with the daemon");
    let new = sleeper(&d, "new", &[ENFORCE, SHOP, ("role", "Database")]);
    wait_rules(&tb, &new);
    wait_enforced(&tb, 1.0, "a container started after the restart");
    assert!(
        tb.agent(1).pid().is_some(),
        "the agent must survive the daemon restart"
    );
}

#[test]
fn with_live_restore_containers_survive_a_daemon_restart_and_stay_enforced() {
    if !testbed::privileged("with_live_restore_containers_survive_a_daemon_restart") {
        return;
    }
    let (mut d, tb) = setup(DockerDaemon::start_live_restore());
    let kept = sleeper(&d, "kept", &[ENFORCE, SHOP, ("role", "Database")]);
    wait_rules(&tb, &kept);
    wait_enforced(&tb, 1.0, "before the restart");

    // Paused across the restart: the resync must list it too (its netns is still there).
    d.docker(&["pause", "kept"]);
    d.restart_daemon();
    assert_eq!(d.container_pid("kept"), kept.pid, "live-restore kept it");
    // A container started after the restart proves the agent reconnected (and resynced).
    let new = sleeper(&d, "new", &[ENFORCE, SHOP, ("role", "Database")]);
    wait_rules(&tb, &new);
    wait_enforced(&tb, 2.0, "kept (paused) and new");
    assert!(
        has_rules(kept.pid),
        "the surviving container lost its rules"
    );
    d.docker(&["unpause", "kept"]);
}

#[test]
fn host_network_containers_are_not_enforced() {
    if !testbed::privileged("host_network_containers_are_not_enforced") {
        return;
    }
    let (d, tb) = setup(DockerDaemon::start());
    let host_rules_before = testbed::run(&["iptables-save", "-t", "mangle"]);
    d.run_with(
        "on-host",
        &[ENFORCE, SHOP, ("role", "WebFrontend")],
        &["--network", "host"],
        &[IMAGE, "sleep", "1000000"],
    );
    // Started after it: once this one is enforced, the host one has been seen and skipped.
    let web = sleeper(&d, "web", &[ENFORCE, SHOP, ("role", "WebFrontend")]);
    wait_rules(&tb, &web);
    wait_enforced(&tb, 1.0, "only the container with its own netns");
    let host_rules = testbed::run(&["iptables-save", "-t", "mangle"]);
    assert_eq!(
        host_rules.contains("TESSERA"),
        host_rules_before.contains("TESSERA"),
        "the agent touched the host's rules for a host-network container"
    );
}

#[test]
fn containers_running_before_the_agent_are_enforced_from_its_first_sync() {
    if !testbed::privileged("containers_running_before_the_agent_are_enforced") {
        return;
    }
    let d = DockerDaemon::start();
    d.import_busybox(IMAGE);
    let early = sleeper(&d, "early", &[ENFORCE, SHOP, ("role", "Database")]);
    // Created, never started: no process, nothing to enforce.
    d.docker(&[
        "create",
        "--name",
        "idle",
        "--label",
        "tessera.dev/enforce=true",
        "--stop-signal",
        "KILL",
        IMAGE,
        "sleep",
        "1000000",
    ]);
    let tb = agent_for(&d);
    wait_rules(&tb, &early);
    wait_enforced(&tb, 1.0, "the running container only");
    // Started now: enforced from its start event.
    let idle = d.start_container("idle");
    wait_rules(&tb, &idle);
    wait_enforced(&tb, 2.0, "early and idle");
    // No --name: Docker's generated name ("adjective_name") is not a valid workload name; the
    // container is enforced all the same (as the name made valid plus its short id).
    let id = d.docker(&[
        "run",
        "-d",
        "--network",
        "none",
        "--stop-signal",
        "KILL",
        "--label",
        "tessera.dev/enforce=true",
        IMAGE,
        "sleep",
        "1000000",
    ]);
    let unnamed = Container {
        name: id.trim().to_owned(),
        id: id.trim().to_owned(),
        pid: d.container_pid(id.trim()),
    };
    wait_rules(&tb, &unnamed);
    wait_enforced(&tb, 3.0, "a container with a generated name");
}
