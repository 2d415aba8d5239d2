//! `tessera run --runtime kubernetes` against the loopback API emulator
//! (`tests/kube-emulator`), one agent per testbed node. The testbed's workloads are the pods:
//! each is a netns with an IP and a sleeping process in it (its "sandbox"), and a Pod on the
//! emulator with that IP in `status.podIP` and its node in `spec.nodeName`. The agents find each
//! pod's netns by its IP, take policies from the API, and (PKI) learn peer certificates from
//! Node annotations. Needs root (tests/run.sh runs these in CI); without root they print a SKIP
//! line locally and fail under CI=true.
//!
//! The time from an API change to the verdict flip is printed (`flip:` lines), not asserted;
//! the polls that measure it try a connection every few hundred milliseconds, which bounds
//! their resolution.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kube_emulator::Emulator;
use serde_json::{Value, json};
use testbed::agent::http_get;
use testbed::{BoundAddr, Metrics, Testbed, WorkloadSpec, echo_once};

const TESSERA: &str = env!("CARGO_BIN_EXE_tessera");
const NS: &str = testbed::topo::NAMESPACE;
/// A denied SYN is dropped: connect() gives up after this.
const DENIED_TIMEOUT: Duration = Duration::from_millis(400);
const OK_TIMEOUT: Duration = Duration::from_secs(2);
/// Hang guard for anything the agents should do (publishing retries back off up to 5 s).
const WAIT: Duration = Duration::from_secs(30);
const CERT_ANNOTATION: &str = "tessera.dev/node-certificate";

/// One `tessera run --runtime kubernetes`; SIGTERM (rules removed) on drop.
struct K8sAgent {
    child: Child,
    metrics: BoundAddr,
    log: PathBuf,
    node: String,
    /// The netns it runs in (its node's), when not the test's.
    netns: Option<String>,
}

impl K8sAgent {
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// GET `path` from its HTTP endpoint (from inside its netns if it runs in one).
    fn get(&self, path: &str) -> Option<String> {
        let addr = self.metrics.get()?;
        match &self.netns {
            None => http_get(addr, path),
            Some(ns) => {
                let path = path.to_owned();
                testbed::in_netns(ns, move || http_get(addr, &path))
            }
        }
    }

    fn metrics(&self) -> Metrics {
        Metrics::parse(&self.get("/metrics").unwrap_or_default())
    }

    fn ready(&mut self) -> bool {
        if let Ok(Some(st)) = self.child.try_wait() {
            panic!("agent {} exited ({st}); log:\n{}", self.node, self.log());
        }
        self.get("/healthz").is_some_and(|b| b.starts_with("ok"))
    }
}

impl Drop for K8sAgent {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(15) {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The emulator, the testbed, a sandbox process per pod and the agents (dropped first).
struct Cluster {
    agents: Vec<K8sAgent>,
    sandboxes: Vec<Child>,
    tb: Testbed,
    emu: Emulator,
    kubeconfig: PathBuf,
    pki: bool,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.agents.clear();
        for c in &mut self.sandboxes {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn run(args: &[&str]) {
    let st = Command::new(TESSERA).args(args).output().unwrap();
    assert!(st.status.success(), "tessera {args:?}: {st:?}");
}

fn pod_json(tb: &Testbed, name: &str, labels: &Value) -> Value {
    let w = tb.workload(name);
    let ports: Vec<Value> = w
        .spec
        .ports
        .iter()
        .map(|(n, p)| match n {
            Some(n) => json!({"name": n, "containerPort": p}),
            None => json!({"containerPort": p}),
        })
        .collect();
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"namespace": NS, "name": name, "labels": labels},
        "spec": {"nodeName": tb.node_name(&format!("n{}", w.spec.node)),
                 "containers": [{"name": "app", "image": "busybox", "ports": ports}]},
        "status": {"phase": "Running", "podIP": w.ip.to_string(), "podIPs": [{"ip": w.ip.to_string()}]}
    })
}

fn node_json(name: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name}}})
}

/// `db` admits `from_role` on its named port `pg`.
fn db_policy(from_role: &str) -> Value {
    json!({
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"namespace": NS, "name": "db-ingress"},
        "spec": {"podSelector": {"matchLabels": {"role": "db"}}, "policyTypes": ["Ingress"],
                 "ingress": [{"from": [{"podSelector": {"matchLabels": {"role": from_role}}}],
                              "ports": [{"port": "pg"}]}]}
    })
}

impl Cluster {
    /// Workloads web (node 1), other (node 1), db (node 2, port `pg` 5432); their Pods, the
    /// namespace and `nodes` on the emulator; keys; no agent yet.
    fn new(pki: bool, nodes: &[&str]) -> Cluster {
        let tb = Testbed::builder()
            .workload(WorkloadSpec::new("web", 1, "web"))
            .workload(WorkloadSpec::new("other", 1, "other"))
            .workload(WorkloadSpec::new("db", 2, "db").port(Some("pg"), 5432))
            .build();
        let sandboxes = tb
            .workloads
            .iter()
            .map(|w| {
                Command::new("ip")
                    .args(["netns", "exec", &w.ns, "sleep", "3600"])
                    .stdin(Stdio::null())
                    .spawn()
                    .unwrap()
            })
            .collect();
        let emu = Emulator::start_blocking().unwrap();
        let kubeconfig = tb.dir().join("kubeconfig");
        emu.write_kubeconfig(&kubeconfig).unwrap();
        emu.apply(json!({"apiVersion": "v1", "kind": "Namespace",
                         "metadata": {"name": NS, "labels": {"kubernetes.io/metadata.name": NS}}}))
            .unwrap();
        for n in nodes {
            emu.apply(node_json(n)).unwrap();
        }
        for w in ["web", "other", "db"] {
            let role = tb.workload(w).spec.labels["role"].clone();
            emu.apply(pod_json(&tb, w, &json!({"role": role}))).unwrap();
        }
        let d = tb.dir().to_owned();
        if pki {
            let ca = d.join("ca");
            run(&["pki", "init-ca", "--out", ca.to_str().unwrap()]);
            for n in ["n1", "n2"] {
                run(&[
                    "pki",
                    "issue-node",
                    "--ca",
                    ca.to_str().unwrap(),
                    "--node",
                    &tb.node_name(n),
                    "--out",
                    d.join(format!("keys-{n}")).to_str().unwrap(),
                ]);
            }
        } else {
            let mut key = [0u8; 32];
            testbed::topo::getrandom_fill(&mut key);
            let hex: String = key.iter().map(|b| format!("{b:02x}")).collect();
            std::fs::write(d.join("psk"), hex + "\n").unwrap();
        }
        Cluster {
            agents: Vec::new(),
            sandboxes,
            tb,
            emu,
            kubeconfig,
            pki,
        }
    }

    /// Starts the agent of node `n` (1 or 2); waits until it is ready and its pods' rules are in.
    fn start_agent(&mut self, n: u8) {
        self.start_agent_with(n, false, &[]);
    }

    /// [`Cluster::start_agent`], inside its node's netns if `in_node_netns` (as a
    /// host-network pod runs: its tunnel and routes are the node's; the API is reached
    /// through a proxy on the node's loopback), with `extra` arguments.
    fn start_agent_with(&mut self, n: u8, in_node_netns: bool, extra: &[&str]) {
        let d = self.tb.dir().to_owned();
        let node = self.tb.node_name(&format!("n{n}"));
        let node_ns = self.tb.nodes[usize::from(n - 1)].clone();
        let kubeconfig = if in_node_netns {
            let proxy = api_proxy(&node_ns, self.emu.url());
            let path = d.join(format!("kubeconfig-n{n}"));
            let text = self
                .emu
                .kubeconfig()
                .replace(&self.emu.url(), &format!("http://{proxy}"));
            std::fs::write(&path, text).unwrap();
            path
        } else {
            self.kubeconfig.clone()
        };
        let log = d.join(format!("agent-n{n}.log"));
        let mut args: Vec<String> = [
            "run",
            "--node-name",
            &node,
            "--runtime",
            "kubernetes",
            "--kubeconfig",
            kubeconfig.to_str().unwrap(),
            "--metrics-addr",
            BoundAddr::ANY_PORT,
        ]
        .map(str::to_owned)
        .to_vec();
        args.extend(extra.iter().map(|a| a.to_string()));
        if self.pki {
            let keys = d.join(format!("keys-n{n}"));
            for (flag, path) in [
                ("--ca-cert", d.join("ca/ca.crt")),
                ("--node-cert", keys.join(format!("{node}.crt"))),
                ("--node-key", keys.join(format!("{node}.key"))),
            ] {
                args.push(flag.into());
                args.push(path.display().to_string());
            }
        } else {
            args.push("--psk-file".into());
            args.push(d.join("psk").display().to_string());
        }
        let logf = std::fs::File::create(&log).unwrap();
        let metrics = BoundAddr::after(&log);
        let mut cmd = if in_node_netns {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", &node_ns, TESSERA]);
            c
        } else {
            Command::new(TESSERA)
        };
        let child = cmd
            .args(&args)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(logf.try_clone().unwrap())
            .stderr(logf)
            .spawn()
            .unwrap();
        let mut agent = K8sAgent {
            child,
            metrics,
            log,
            node,
            netns: in_node_netns.then_some(node_ns),
        };
        let pods: Vec<String> = self
            .tb
            .workloads
            .iter()
            .filter(|w| w.spec.node == n)
            .map(|w| w.ns.clone())
            .collect();
        let start = Instant::now();
        loop {
            if agent.ready() && pods.iter().all(|ns| rules_in(ns)) {
                break;
            }
            assert!(
                start.elapsed() < WAIT,
                "agent {} not ready; log:\n{}",
                agent.node,
                agent.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        self.agents.push(agent);
    }

    fn agent(&self, n: u8) -> &K8sAgent {
        &self.agents[usize::from(n - 1)]
    }

    fn logs(&self) -> String {
        self.agents
            .iter()
            .map(|a| format!("---- {}\n{}", a.node, a.log()))
            .collect()
    }

    /// Whether a new connection from `from` to db:5432 carries an echo.
    fn allowed(&self, from: &str) -> bool {
        self.allowed_within(from, DENIED_TIMEOUT)
    }

    /// The same, giving up connecting after `timeout`.
    fn allowed_within(&self, from: &str, timeout: Duration) -> bool {
        match self.tb.connect(from, "db", 5432, timeout) {
            Ok(mut s) => {
                s.set_read_timeout(Some(OK_TIMEOUT)).unwrap();
                echo_once(&mut s, b'k').is_ok()
            }
            Err(_) => false,
        }
    }

    /// Polls until a new connection from `from` to db is `allowed`; prints when the change
    /// took effect: after the start of the last attempt that still saw the old verdict, no later
    /// than the start of the first that saw the new one.
    fn until(&self, what: &str, from: &str, allowed: bool) {
        let start = Instant::now();
        let mut last_old: Option<Duration> = None;
        loop {
            let attempt = start.elapsed();
            // Waiting for "allowed", a short connect timeout sharpens the measure (a slow
            // success is only retried); waiting for "denied", a slow success must not count.
            let timeout = if allowed {
                Duration::from_millis(50)
            } else {
                DENIED_TIMEOUT
            };
            if self.allowed_within(from, timeout) == allowed {
                let lo = last_old.map_or(0, |d| d.as_millis());
                eprintln!("flip: {what}: between {lo} and {} ms", attempt.as_millis());
                return;
            }
            last_old = Some(attempt);
            assert!(
                start.elapsed() < WAIT,
                "{what}: {from} -> db never became {}; logs:\n{}",
                if allowed { "allowed" } else { "denied" },
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Asserts the verdict holds for a while (several attempts).
    fn stays(&self, from: &str, allowed: bool) {
        for _ in 0..3 {
            assert_eq!(
                self.allowed(from),
                allowed,
                "{from} -> db; logs:\n{}",
                self.logs()
            );
        }
    }
}

/// A TCP proxy listening on `ns`'s loopback (an ephemeral port, returned) to `upstream` (the
/// emulator, in the test's netns): each accepted connection is handed to a thread of the
/// test's netns, which connects upstream and copies both ways. Its threads end with the
/// process.
fn api_proxy(ns: &str, upstream: String) -> SocketAddr {
    let upstream: SocketAddr = upstream
        .trim_start_matches("http://")
        .parse()
        .expect("the emulator's URL is http://ADDR");
    let (conns_tx, conns_rx) = std::sync::mpsc::channel::<std::net::TcpStream>();
    std::thread::spawn(move || {
        for down in conns_rx {
            let Ok(up) = std::net::TcpStream::connect(upstream) else {
                continue;
            };
            for (mut from, mut to) in [
                (down.try_clone().unwrap(), up.try_clone().unwrap()),
                (up, down),
            ] {
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut from, &mut to);
                    let _ = to.shutdown(std::net::Shutdown::Write);
                });
            }
        }
    });
    let (addr_tx, addr_rx) = std::sync::mpsc::channel();
    let _listener = testbed::spawn_in_netns(ns, move || {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        addr_tx.send(l.local_addr().unwrap()).unwrap();
        for c in l.incoming().flatten() {
            if conns_tx.send(c).is_err() {
                break;
            }
        }
    });
    addr_rx.recv().unwrap()
}

fn rules_in(ns: &str) -> bool {
    let out = Command::new("ip")
        .args(["netns", "exec", ns, "iptables-save", "-t", "mangle"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).contains("-j TESSERA-INPUT")
}

fn list_requests(emu: &Emulator, path: &str) -> usize {
    emu.requests()
        .into_iter()
        .filter(|(m, p)| {
            m == "GET" && p.starts_with(path) && !p.contains("watch=true") && !p.contains("watch=1")
        })
        .count()
}

/// PSK: pods are enforced from the API (policies too, with a named port); a pod label change,
/// a policy change and a namespace label change flip the verdict of new connections (and the
/// policy change cuts the established connection it now denies); a watch that expired (410 Gone)
/// is relisted and a change made while it was down is applied; a deleted pod's rules go.
#[test]
fn pods_and_policies_from_the_api_are_enforced_and_followed() {
    if !testbed::privileged("pods_and_policies_from_the_api_are_enforced_and_followed") {
        return;
    }
    let mut c = Cluster::new(false, &["node-n1", "node-n2"]);
    c.emu.apply(db_policy("web")).unwrap();
    c.start_agent(1);
    c.start_agent(2);
    c.stays("web", true);
    c.stays("other", false);

    // A pod label change (client side): `other` becomes a web.
    c.emu
        .merge_patch(
            "pods",
            Some(NS),
            "other",
            &json!({"metadata": {"labels": {"role": "web"}}}),
        )
        .unwrap();
    c.until("pod label change (other -> role=web)", "other", true);
    c.emu
        .merge_patch(
            "pods",
            Some(NS),
            "other",
            &json!({"metadata": {"labels": {"role": "other"}}}),
        )
        .unwrap();
    c.until("pod label change back", "other", false);

    // A policy change: db admits nobody. The established connection it now denies is cut.
    let mut live = c.tb.connect("web", "db", 5432, OK_TIMEOUT).unwrap();
    live.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    echo_once(&mut live, b'a').unwrap();
    let changed = Instant::now();
    c.emu.apply(db_policy("nobody")).unwrap();
    while echo_once(&mut live, b'b').is_ok() {
        assert!(
            changed.elapsed() < WAIT,
            "the established web -> db connection survived the policy change; logs:\n{}",
            c.logs()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    eprintln!(
        "flip: policy change -> established connection cut: {} ms",
        changed.elapsed().as_millis()
    );
    c.until("policy change (from role=nobody)", "web", false);

    // The watches break while the history is compacted: the agents' watchers get 410 Gone and
    // relist; the policy change made meanwhile is applied.
    let lists_before = list_requests(&c.emu, "/apis/networking.k8s.io/v1/networkpolicies");
    c.emu.pause_watches();
    c.emu.break_watches();
    c.emu.apply(db_policy("web")).unwrap();
    c.emu.compact();
    c.emu.resume_watches();
    c.until("policy change made during a 410 relist", "web", true);
    assert!(
        list_requests(&c.emu, "/apis/networking.k8s.io/v1/networkpolicies") > lists_before,
        "the policy watcher relisted"
    );
    c.stays("other", false);

    // A namespace label change: db admits web only from namespaces labelled env=prod.
    let mut p = db_policy("web");
    p["spec"]["ingress"][0]["from"][0]["namespaceSelector"] =
        json!({"matchLabels": {"env": "prod"}});
    c.emu.apply(p).unwrap();
    c.until("policy change (namespaceSelector env=prod)", "web", false);
    c.emu
        .merge_patch(
            "namespaces",
            None,
            NS,
            &json!({"metadata": {"labels": {"env": "prod"}}}),
        )
        .unwrap();
    c.until("namespace label change (env=prod)", "web", true);

    // The db pod goes: its rules are removed.
    c.emu.delete("pods", Some(NS), "db").unwrap();
    let db_ns = c.tb.workload("db").ns.clone();
    let start = Instant::now();
    while rules_in(&db_ns) {
        assert!(
            start.elapsed() < WAIT,
            "db's rules stayed; logs:\n{}",
            c.logs()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    eprintln!(
        "flip: pod deleted -> rules removed: {} ms",
        start.elapsed().as_millis()
    );
}

fn annotation(emu: &Emulator, node: &str) -> Option<String> {
    emu.get("nodes", None, node)?
        .pointer(&format!(
            "/metadata/annotations/{}",
            CERT_ANNOTATION.replace('/', "~1")
        ))?
        .as_str()
        .map(str::to_owned)
}

/// PKI without --peer-certs: each agent publishes its certificate on its Node. A node whose
/// Node (so its annotation) appears later becomes a trusted peer; its annotation removed, its
/// tokens are rejected as revoked; the same certificate published again stays revoked.
#[test]
fn pki_peers_come_from_node_annotations() {
    if !testbed::privileged("pki_peers_come_from_node_annotations") {
        return;
    }
    // node-n2 is not registered yet: its agent cannot publish.
    let mut c = Cluster::new(true, &["node-n1"]);
    c.start_agent(1);
    c.start_agent(2);
    let start = Instant::now();
    while annotation(&c.emu, "node-n1").is_none() {
        assert!(
            start.elapsed() < WAIT,
            "node-n1 never published; logs:\n{}",
            c.logs()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let own = std::fs::read_to_string(c.tb.dir().join("keys-n1/node-n1.crt")).unwrap();
    assert_eq!(annotation(&c.emu, "node-n1").as_deref(), Some(own.as_str()));
    // No policy: everything is allowed once both sides trust each other; n1 does not know
    // n2's key yet, so db's SYN-ACK is refused.
    c.stays("web", false);

    c.emu.apply(node_json("node-n2")).unwrap();
    c.until(
        "node registered -> its certificate published and trusted",
        "web",
        true,
    );
    assert!(annotation(&c.emu, "node-n2").is_some());

    let revoked_before = c.agent(1).metrics().sum_with_label("reason", "key_revoked");
    let pem = annotation(&c.emu, "node-n2").unwrap();
    c.emu
        .merge_patch(
            "nodes",
            None,
            "node-n2",
            &json!({"metadata": {"annotations": {CERT_ANNOTATION: null}}}),
        )
        .unwrap();
    c.until("annotation removed -> peer revoked", "web", false);
    let revoked = c.agent(1).metrics().sum_with_label("reason", "key_revoked");
    assert!(
        revoked > revoked_before,
        "n1 counts db's tokens as key_revoked ({revoked_before} -> {revoked}); logs:\n{}",
        c.logs()
    );

    // The same certificate back: a deliberately removed key stays revoked.
    c.emu
        .merge_patch(
            "nodes",
            None,
            "node-n2",
            &json!({"metadata": {"annotations": {CERT_ANNOTATION: pem}}}),
        )
        .unwrap();
    let start = Instant::now();
    while !c.agent(1).log().contains("stays revoked") {
        assert!(start.elapsed() < WAIT, "no log line; logs:\n{}", c.logs());
        std::thread::sleep(Duration::from_millis(50));
    }
    c.stays("web", false);
    // The agent of n2 does not fight the removal either.
    assert!(
        c.agent(2).log().contains("not published again"),
        "logs:\n{}",
        c.logs()
    );
}

fn admin_db_rule(kind: &str, name: &str, priority: Option<i64>, action: &str, role: &str) -> Value {
    let (api, tier) = if kind == "ClusterNetworkPolicy" {
        ("policy.networking.k8s.io/v1alpha2", Some("Admin"))
    } else {
        ("policy.networking.k8s.io/v1alpha1", None)
    };
    let mut spec = json!({
        "subject": {"pods": {"namespaceSelector": {}, "podSelector": {"matchLabels": {"role": "db"}}}},
        "ingress": [{"name": format!("{action}-{role}"), "action": action,
                     "from": [{"pods": {"namespaceSelector": {},
                                        "podSelector": {"matchLabels": {"role": role}}}}]}]
    });
    if let Some(t) = tier {
        spec["tier"] = json!(t);
    }
    if let Some(p) = priority {
        spec["priority"] = json!(p);
    }
    json!({"apiVersion": api, "kind": kind, "metadata": {"name": name}, "spec": spec})
}

/// Admin policies from the API, on the real kernel: the agents start on a cluster without the
/// admin CRDs (NetworkPolicy alone decides), pick the CRDs up once installed, and then an
/// Admin Deny overrides a NetworkPolicy allow (cutting the established connection), an Admin
/// Allow (v1alpha1) overrides NetworkPolicy isolation, a Pass hands back to NetworkPolicy, a
/// Baseline Deny applies where no NetworkPolicy isolates, and removing a CRD removes its
/// policies.
#[test]
fn admin_policies_from_the_api_are_enforced_and_followed() {
    if !testbed::privileged("admin_policies_from_the_api_are_enforced_and_followed") {
        return;
    }
    let mut c = Cluster::new(false, &["node-n1", "node-n2"]);
    c.emu.apply(db_policy("web")).unwrap();
    c.start_agent(1);
    c.start_agent(2);
    c.stays("web", true);
    c.stays("other", false);

    // The CRDs appear; an Admin Deny from web to db (priority 10) beats the NetworkPolicy
    // allow, and the established connection is cut.
    let mut live = c.tb.connect("web", "db", 5432, OK_TIMEOUT).unwrap();
    live.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    echo_once(&mut live, b'a').unwrap();
    c.emu.install_admin_crds().unwrap();
    let changed = Instant::now();
    c.emu
        .apply(admin_db_rule(
            "ClusterNetworkPolicy",
            "guard",
            Some(10),
            "Deny",
            "web",
        ))
        .unwrap();
    while echo_once(&mut live, b'b').is_ok() {
        assert!(
            changed.elapsed() < WAIT,
            "the established web -> db connection survived the admin Deny; logs:\n{}",
            c.logs()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    eprintln!(
        "flip: CRDs installed + admin Deny -> established connection cut: {} ms",
        changed.elapsed().as_millis()
    );
    c.until("admin Deny (ClusterNetworkPolicy)", "web", false);

    // An AdminNetworkPolicy (v1alpha1) Allow beats NetworkPolicy isolation for `other`.
    c.emu
        .apply(admin_db_rule(
            "AdminNetworkPolicy",
            "let-other",
            Some(5),
            "Allow",
            "other",
        ))
        .unwrap();
    c.until("admin Allow (AdminNetworkPolicy)", "other", true);
    c.stays("web", false);

    // Pass hands web back to the NetworkPolicy, which allows it.
    c.emu
        .apply(admin_db_rule(
            "ClusterNetworkPolicy",
            "guard",
            Some(10),
            "Pass",
            "web",
        ))
        .unwrap();
    c.until("admin Pass", "web", true);

    // A Baseline Deny for web applies once no NetworkPolicy isolates db.
    c.emu
        .apply(json!({"apiVersion": "policy.networking.k8s.io/v1alpha1",
                      "kind": "BaselineAdminNetworkPolicy", "metadata": {"name": "default"},
                      "spec": {"subject": {"namespaces": {}},
                               "ingress": [{"name": "no-web", "action": "Deny",
                                            "from": [{"pods": {"namespaceSelector": {},
                                                      "podSelector": {"matchLabels": {"role": "web"}}}}]}]}}))
        .unwrap();
    c.stays("web", true);
    c.emu
        .delete("networkpolicies", Some(NS), "db-ingress")
        .unwrap();
    c.until("NetworkPolicy gone: Baseline Deny", "web", false);

    // Its CRD removed, the Baseline policy goes with it.
    c.emu
        .delete(
            "customresourcedefinitions",
            None,
            "baselineadminnetworkpolicies.policy.networking.k8s.io",
        )
        .unwrap();
    c.until("Baseline CRD removed", "web", true);
    let m = c.agent(2).metrics();
    assert_eq!(m.sum("tessera_admin_policies"), 2.0, "{}", c.logs());

    // `nodes` peers come from Node objects: a Node whose InternalIP is db's address (as for a
    // host-network pod) and an Admin egress Deny from web to nodes labelled tier=storage.
    let db_ip = c.tb.workload("db").ip.to_string();
    c.emu
        .apply(json!({"apiVersion": "v1", "kind": "Node",
                      "metadata": {"name": "storage-1", "labels": {"tier": "storage"}},
                      "status": {"addresses": [{"type": "InternalIP", "address": db_ip},
                                               {"type": "Hostname", "address": "storage-1"}]}}))
        .unwrap();
    c.emu
        .apply(json!({"apiVersion": "policy.networking.k8s.io/v1alpha2",
                      "kind": "ClusterNetworkPolicy", "metadata": {"name": "no-storage"},
                      "spec": {"tier": "Admin", "priority": 1,
                               "subject": {"pods": {"namespaceSelector": {},
                                           "podSelector": {"matchLabels": {"role": "web"}}}},
                               "egress": [{"name": "storage", "action": "Deny",
                                           "to": [{"nodes": {"matchLabels": {"tier": "storage"}}}]}]}}))
        .unwrap();
    c.until("admin egress Deny to nodes tier=storage", "web", false);
    c.emu
        .merge_patch(
            "nodes",
            None,
            "storage-1",
            &json!({"metadata": {"labels": {"tier": "compute"}}}),
        )
        .unwrap();
    c.until("node relabelled out of the nodes peer", "web", true);

    // A staged Admin Deny (annotated tessera.dev/staged: "true"): nothing changes on the wire,
    // db's agent records web's flows with the verdict the staged policy would give. Removing
    // the annotation enforces it.
    let mut trial = admin_db_rule("ClusterNetworkPolicy", "trial", Some(2), "Deny", "web");
    trial["metadata"]["annotations"] = json!({"tessera.dev/staged": "true"});
    c.emu.apply(trial).unwrap();
    let start = Instant::now();
    while c.agent(2).metrics().sum("tessera_staged_policies") != 1.0 {
        assert!(start.elapsed() < WAIT, "not staged; logs:\n{}", c.logs());
        std::thread::sleep(Duration::from_millis(20));
    }
    c.stays("web", true);
    let start = Instant::now();
    loop {
        let body = c
            .agent(2)
            .get("/flows?staged=1&last=100")
            .unwrap_or_default();
        let flip = body
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .find(|r| r["verdict"] == "allowed" && r["staged"]["policy"]["name"] == "trial");
        if let Some(r) = flip {
            assert_eq!(r["staged"]["verdict"], "denied", "{r}");
            assert_eq!(r["source"]["workload"], "web", "{r}");
            break;
        }
        assert!(
            start.elapsed() < WAIT,
            "no staged verdict recorded: {body}\nlogs:\n{}",
            c.logs()
        );
        c.stays("web", true);
    }
    c.emu
        .merge_patch(
            "clusternetworkpolicies",
            None,
            "trial",
            &json!({"metadata": {"annotations": {"tessera.dev/staged": null}}}),
        )
        .unwrap();
    c.until("staged Deny promoted (annotation removed)", "web", false);
    assert_eq!(c.agent(2).metrics().sum("tessera_staged_policies"), 0.0);
}

/// `--encrypt` in Kubernetes mode, PKI: each agent runs in its node's netns (as the
/// host-network DaemonSet does) and takes its tunnel peers from the Node objects (`InternalIP`,
/// `spec.podCIDRs`) and their keys from the certificates the agents publish in the Node
/// annotations. A payload between the nodes' pods crosses the link only inside the tunnel.
/// Annotating the namespace `tessera.dev/require-encryption: "true"` guards its pods: with a
/// route around the tunnel on node 1, node 2 refuses web -> db and records it; removing the
/// annotation lets the same clear path through.
#[test]
fn encrypt_peers_from_node_objects_and_a_namespace_that_requires_encryption() {
    let test = "encrypt_peers_from_node_objects_and_a_namespace_that_requires_encryption";
    if !testbed::privileged(test) || !testbed::have_command(test, "tcpdump", "tcpdump") {
        return;
    }
    const MARKER: &[u8] = b"TESSERA-K8S-MARKER-5be0d1";
    let mut c = Cluster::new(true, &[]);
    for n in [1u8, 2] {
        let name = c.tb.node_name(&format!("n{n}"));
        c.emu
            .apply(json!({"apiVersion": "v1", "kind": "Node",
                "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name}},
                "spec": {"podCIDRs": c.tb.pod_cidrs(n)},
                "status": {"addresses": [{"type": "InternalIP", "address": c.tb.node_addr(n).to_string()}]}}))
            .unwrap();
    }
    c.start_agent_with(1, true, &["--encrypt"]);
    c.start_agent_with(2, true, &["--encrypt"]);
    let status = |n: u8| -> Value {
        serde_json::from_str(&c.agent(n).get("/status").unwrap_or_default()).unwrap_or(Value::Null)
    };
    for (n, other) in [(1, "node-n2"), (2, "node-n1")] {
        let start = Instant::now();
        while !status(n)["tunnel"]["peers"]
            .as_array()
            .is_some_and(|p| p.iter().any(|p| p["node"] == other))
        {
            assert!(
                start.elapsed() < WAIT,
                "node {n}: no tunnel peer {other}: {:#}\n{}",
                status(n)["tunnel"],
                c.logs()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    let node1 = c.tb.nodes[0].clone();
    let capture =
        testbed::tcpdump::Tcpdump::start(&node1, "uplink", &c.tb.dir().join("uplink.pcap"));
    let marker = |timeout: Duration| -> bool {
        let Ok(mut s) = c.tb.connect("web", "db", 5432, timeout) else {
            return false;
        };
        s.set_read_timeout(Some(OK_TIMEOUT)).unwrap();
        let mut back = vec![0u8; MARKER.len()];
        use std::io::{Read, Write};
        s.write_all(MARKER).is_ok() && s.read_exact(&mut back).is_ok() && back == MARKER
    };
    // The first connection also waits for the tunnel's handshake.
    assert!(
        marker(Duration::from_secs(5)),
        "web -> db through the tunnel\n{}",
        c.logs()
    );
    let frames = capture.stop();
    assert!(
        !testbed::tcpdump::contains(&frames, MARKER),
        "the marker crossed the link in clear"
    );
    let peer = status(1)["tunnel"]["peers"][0].clone();
    assert!(
        peer["txBytes"].as_u64() > Some(0) && peer["rxBytes"].as_u64() > Some(0),
        "{peer:#}"
    );

    // The namespace requires encryption; node 1 routes around the tunnel.
    let ns_object = |annotations: Value| {
        json!({"apiVersion": "v1", "kind": "Namespace",
               "metadata": {"name": NS, "labels": {"kubernetes.io/metadata.name": NS},
                            "annotations": annotations}})
    };
    c.emu
        .apply(ns_object(json!({"tessera.dev/require-encryption": "true"})))
        .unwrap();
    // Guarded once the rules are in: the addresses are shown after they are applied.
    let db_ip = c.tb.workload("db").ip.to_string();
    let start = Instant::now();
    while status(2)["encryptionGuard"]["workloads"] != json!([format!("{NS}/db")])
        || status(2)["encryptionGuard"]["addresses"] != json!([db_ip])
        || status(1)["encryptionGuard"]["addresses"]
            .as_array()
            .map(Vec::len)
            != Some(2)
    {
        assert!(
            start.elapsed() < WAIT,
            "the namespace's pods are not guarded: {:#} {:#}\n{}",
            status(1)["encryptionGuard"],
            status(2)["encryptionGuard"],
            c.logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let o = c.tb.workload("db").ip.octets();
    let db_prefix = format!("{}.{}.{}.0/24", o[0], o[1], o[2]);
    let rule = |verb: &str| {
        run_ip(&[
            "-n", &node1, "rule", verb, "pref", "100", "to", &db_prefix, "lookup", "main",
        ])
    };
    rule("add");
    assert!(
        !marker(DENIED_TIMEOUT),
        "db reached in clear although its namespace requires encryption"
    );
    // Both pods are in the namespace: node 1 refuses web's packet on its way out.
    let start = Instant::now();
    loop {
        let body = c.agent(1).get("/flows?last=200").unwrap_or_default();
        if body.lines().any(|l| {
            l.contains("\"not_encrypted\"") && l.contains("\"egress\"") && l.contains("\"web\"")
        }) {
            break;
        }
        assert!(
            start.elapsed() < WAIT,
            "no not_encrypted record on node 1:\n{body}\n{}",
            c.logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    c.emu.apply(ns_object(json!({}))).unwrap();
    let start = Instant::now();
    while !marker(DENIED_TIMEOUT) {
        assert!(
            start.elapsed() < WAIT,
            "the annotation removed, db is still refused\n{}",
            c.logs()
        );
    }
    rule("del");
}

fn run_ip(args: &[&str]) {
    let st = Command::new("ip").args(args).output().unwrap();
    assert!(st.status.success(), "ip {args:?}: {st:?}");
}
