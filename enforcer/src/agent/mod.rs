//! `tessera run`: the node agent.
//!
//! One process, one current-thread tokio runtime. A runtime task (static inventory, Docker,
//! Kubernetes) and the policy-directory watcher send [`Event`]s; the agent loop alone applies
//! them: it updates the policy engine, issues claims, installs rules and opens a queue in each
//! workload's namespace, and removes them when the workload goes. A task per workload queue
//! serves packets; a 1 s tick expires flows and reads kernel queue counters; the HTTP endpoint
//! serves /metrics, /healthz and /status. The [`Processor`] is shared behind a mutex that is only
//! ever held synchronously, so it is never contended across an `await`.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fs::File;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result, bail};
use datapath::shell::inject::Injector;
use datapath::shell::queue::Handler as _;
use datapath::shell::{
    self, Action, Direction, Mode, Netns, QueueConfig, RuleConfig, WorkloadQueue,
};
use datapath::{Outgoing, Processor, ProcessorConfig, WorkloadId};
use identity::Claims;
use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use policy::{AdminPolicyKey, PodKey, PolicyKey, Workload};
use rand::SeedableRng;
use rand::rngs::StdRng;
use tokio::sync::{Notify, Semaphore, mpsc, watch};
use tokio::task::{JoinHandle, JoinSet};

use crate::runtime::{self, AdminPolicy, Desired, Event, NetnsRef, NodeInfo};

pub mod flows;
pub mod guard;
pub mod http;
pub mod keys;
pub mod policies;
pub mod tunnel;

use keys::KeySource;

/// Where workloads come from.
#[derive(Debug, Clone)]
pub enum RuntimeOptions {
    /// A static inventory file, reloaded on change.
    Static { inventory: PathBuf },
    /// Containers of a Docker daemon.
    Docker(runtime::docker::DockerConfig),
    /// This node's pods from the Kubernetes API.
    Kubernetes(runtime::kubernetes::KubernetesConfig),
}

impl RuntimeOptions {
    fn name(&self) -> &'static str {
        match self {
            RuntimeOptions::Static { .. } => "static",
            RuntimeOptions::Docker(_) => "docker",
            RuntimeOptions::Kubernetes(_) => "kubernetes",
        }
    }
}

/// Everything `tessera run` was told.
#[derive(Debug, Clone)]
pub struct Options {
    pub node_name: String,
    pub runtime: RuntimeOptions,
    pub policies: Option<PathBuf>,
    pub keys: KeySource,
    pub fail_open: bool,
    pub queue_num: u16,
    pub queue_max_len: u32,
    pub auth_mark: u32,
    /// The queue of DNS answers (names learnt for admin `domainNames` peers); `None`: off.
    pub dns_queue_num: Option<u16>,
    /// The queue, in the node's namespace, of the guard of workloads that require encryption.
    pub guard_queue_num: u16,
    /// Answers are learnt only from these servers (empty: from any).
    pub dns_servers: Vec<ipnet::IpNet>,
    pub metrics_addr: Option<SocketAddr>,
    pub accept_all: bool,
    /// Audit mode: policy denials are recorded, not applied.
    pub audit: bool,
    /// Send bound SYNs (`--no-bound-handshake` turns it off).
    pub bound_handshake: bool,
    /// Flow records: where to write them (`--flow-log`) and which to make.
    pub flow_log: FlowLogOptions,
    /// Busy polling of the queues before the agent's thread sleeps, while packets are coming
    /// (`--busy-poll-us`); `None`: off.
    pub busy_poll: Option<Arc<shell::busypoll::BusyPoll>>,
    /// Encryption between nodes (`--encrypt` and `--tunnel-*`); `None`: off.
    pub encrypt: Option<tunnel::TunnelOptions>,
}

/// `--flow-log*`: flow records (docs/flow-log.md).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlowLogOptions {
    /// JSON lines to this file or stdout; the ring of `GET /flows` is kept either way.
    pub sink: Option<flows::FlowSink>,
    /// Allowed flows: one in N recorded (0: none).
    pub allowed_sample: u32,
    /// Denials: records per second per deciding policy or rejection reason (burst: twice).
    pub deny_rate: u32,
}

impl Default for FlowLogOptions {
    fn default() -> Self {
        FlowLogOptions {
            sink: None,
            allowed_sample: 0,
            deny_rate: 10,
        }
    }
}

impl FlowLogOptions {
    /// The datapath recorder's configuration.
    pub fn config(&self) -> datapath::flowlog::FlowLogConfig {
        datapath::flowlog::FlowLogConfig {
            allowed_sample: self.allowed_sample,
            denied_per_second: self.deny_rate,
            denied_burst: self.deny_rate.saturating_mul(2),
            ..datapath::flowlog::FlowLogConfig::default()
        }
    }
}

/// Per-workload queue counters, written by its task and read by the tick and /metrics.
#[derive(Debug, Default)]
pub struct QueueStats {
    /// The reader runs (false once it stopped on an error: the workload stays fail-closed).
    pub serving: AtomicBool,
    pub queue_dropped: AtomicU64,
    pub user_dropped: AtomicU64,
    pub recv_errors: AtomicU64,
    /// Verdict messages sent, and packets they answered (the drops of a read batch share one
    /// message); stored every second, as the counters above.
    pub verdict_messages: AtomicU64,
    pub verdict_packets: AtomicU64,
}

/// What /status shows of one enforced workload.
#[derive(Debug, Clone)]
pub struct WorkloadStatus {
    pub origin: String,
    pub netns: String,
    pub labels: BTreeMap<String, String>,
    pub enforced_since: SystemTime,
    pub stats: Arc<QueueStats>,
}

/// Upper bounds (seconds) of the enforcement-latency histogram.
pub const ENFORCE_BUCKETS_S: [f64; 10] = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0];

/// Time from a workload's start (as its runtime saw it) to its rules and queue in place.
#[derive(Debug, Default)]
pub struct EnforceLatency {
    pub buckets: [u64; ENFORCE_BUCKETS_S.len() + 1],
    pub sum_s: f64,
    pub count: u64,
}

impl EnforceLatency {
    fn record(&mut self, seconds: f64) {
        let i = ENFORCE_BUCKETS_S
            .iter()
            .position(|b| seconds <= *b)
            .unwrap_or(ENFORCE_BUCKETS_S.len());
        self.buckets[i] += 1;
        self.sum_s += seconds;
        self.count += 1;
    }
}

/// What the HTTP endpoint reads.
pub struct Shared {
    pub node_name: String,
    pub runtime: &'static str,
    pub processor: Arc<Mutex<Processor>>,
    pub workloads: Mutex<BTreeMap<String, WorkloadStatus>>,
    pub policies: AtomicUsize,
    /// Cluster-wide admin policies in force.
    pub admin_policies: AtomicUsize,
    /// Staged policies: evaluated beside the enforced ones, not enforced.
    pub staged_policies: AtomicUsize,
    pub reload_failures: AtomicU64,
    /// Datagrams of the agent's own (UDP control, released) that could not be sent.
    pub udp_send_errors: Arc<AtomicU64>,
    /// Busy polling of the queues (`--busy-poll-us`): registered queues, and its counters.
    pub busy_poll: Option<Arc<shell::busypoll::BusyPoll>>,
    pub workload_failures: AtomicU64,
    pub enforce_latency: Mutex<EnforceLatency>,
    /// Workloads a runtime wants that could not be enforced, with the reason (by name).
    pub failing: Mutex<BTreeMap<String, String>>,
    /// The runtime's first complete list has been applied (/healthz answers 200 from then on).
    pub ready: AtomicBool,
    /// Flow records: the ring and followers of `GET /flows`, and `--flow-log`.
    pub flows: Arc<flows::FlowHub>,
    /// The tunnel between nodes (`--encrypt`).
    pub tunnel: Option<tunnel::TunnelShared>,
    /// The guard of workloads that require encryption; `None` until one does.
    pub guard: Arc<Mutex<Option<guard::GuardStatus>>>,
}

/// Lock the processor or one of the shared tables. A panic while holding a lock cannot leave
/// the state half-updated in a way that matters more than stopping enforcement would; keep
/// serving.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn now_ms() -> u64 {
    shell::queue::unix_ms()
}

fn pod_name(key: &PodKey) -> String {
    format!("{}/{}", key.namespace, key.name)
}

/// One enforced workload.
struct Enforced {
    id: WorkloadId,
    desired: Desired,
    /// The namespace, held open: rules are always removed from this very namespace, even if the
    /// PID it was found by is reused.
    _netns_file: File,
    netns_ino: (u64, u64),
    netns: Netns,
    stop: watch::Sender<bool>,
    task: JoinHandle<Option<WorkloadQueue>>,
}

/// The agent's state; only the event loop touches it.
struct Agent {
    shared: Arc<Shared>,
    processor: Arc<Mutex<Processor>>,
    /// Each workload's raw sockets, for the datagrams the processor sends itself.
    udp: Arc<UdpSender>,
    workloads: HashMap<PodKey, Enforced>,
    next_id: u32,
    /// Namespace labels learned from Namespace events (Kubernetes).
    namespaces: BTreeMap<String, BTreeMap<String, String>>,
    policy_keys: Vec<PolicyKey>,
    /// The admin policies in force (every kind).
    admin_keys: BTreeSet<AdminPolicyKey>,
    qcfg: QueueConfig,
    rules: RuleConfig,
    mode: Mode,
    /// Installations under way, by task.
    tasks: JoinSet<Started>,
    inflight: HashMap<tokio::task::Id, PodKey>,
    /// What arrived for a workload while its installation was under way (`None`: remove it).
    queued: HashMap<PodKey, Option<Desired>>,
    /// At most this many installations at once.
    permits: Arc<Semaphore>,
    synced_once: bool,
    /// Workloads of the first list still being installed (`/healthz` is 503 until they are).
    awaiting_ready: Option<HashSet<PodKey>>,
    /// The nodes as the engine accepted them, with their pod ranges (for the tunnel).
    nodes: BTreeMap<String, NodeInfo>,
    /// The tunnel between nodes (`--encrypt`).
    tunnel: Option<AgentTunnel>,
    /// Ticks since the tunnel's plan was last computed.
    ticks: u32,
    /// Kubernetes, PKI: our certificate as published on our Node (a new one after rotation).
    own_pem: Option<watch::Sender<String>>,
    /// Namespaces whose every workload requires encryption (Kubernetes annotation).
    encrypted_namespaces: BTreeSet<String>,
    /// The guard of workloads that require encryption.
    guard: AgentGuard,
}

/// The event loop's side of the guard: started with the first workload that requires
/// encryption, then told every change.
struct AgentGuard {
    cfg: datapath::shell::encrypted::GuardConfig,
    stop: watch::Receiver<bool>,
    want: Option<watch::Sender<datapath::shell::encrypted::Guarded>>,
    task: Option<JoinHandle<Result<()>>>,
}

/// The event loop's side of the tunnel: where plans go, and the last one.
struct AgentTunnel {
    port: u16,
    own_key: datapath::tunnel::PublicKey,
    plans: watch::Sender<tunnel::Plan>,
    last: tunnel::Plan,
    /// PSK mode: each node's tunnel key (derived once: it depends on the name alone).
    psk_keys: HashMap<String, Option<[u8; 32]>>,
    /// Our tunnel's static key after a rotation of the node's credentials.
    secrets: watch::Sender<Option<datapath::tunnel::StaticSecret>>,
}

/// Open a runtime's netns reference and name it by our own fd, so every later entry (setns,
/// nsenter) reaches the same namespace.
fn open_netns(r: &NetnsRef) -> Result<(File, (u64, u64), Netns)> {
    let path = r.path();
    let file = File::open(&path).with_context(|| format!("opening {}", path.display()))?;
    let meta = file
        .metadata()
        .with_context(|| format!("stat {}", path.display()))?;
    let fd_path = format!("/proc/{}/fd/{}", std::process::id(), file.as_raw_fd());
    Ok((file, (meta.dev(), meta.ino()), Netns::from_path(fd_path)))
}

fn netns_ino(r: &NetnsRef) -> Option<(u64, u64)> {
    let meta = std::fs::metadata(r.path()).ok()?;
    Some((meta.dev(), meta.ino()))
}

fn netns_display(r: &NetnsRef) -> String {
    r.path().display().to_string()
}

impl Agent {
    fn namespace_labels(&self, d: &Desired) -> BTreeMap<String, String> {
        match &d.namespace_labels {
            Some(labels) => labels.clone(),
            None => self
                .namespaces
                .get(&d.key.namespace)
                .cloned()
                .unwrap_or_default(),
        }
    }

    /// Make the engine's namespace match what we know; true if its labels changed.
    fn ensure_namespace(
        &self,
        engine: &mut policy::Engine,
        name: &str,
        labels: &BTreeMap<String, String>,
    ) -> Result<bool> {
        let before = engine.namespace_labels(name).cloned();
        let ns = Namespace {
            metadata: ObjectMeta {
                name: Some(name.to_owned()),
                labels: Some(labels.clone()),
                ..ObjectMeta::default()
            },
            ..Namespace::default()
        };
        engine
            .apply_namespace(&ns)
            .map_err(|e| anyhow::anyhow!("namespace {name}: {}: {}", e.field, e.message))?;
        Ok(before.as_ref() != engine.namespace_labels(name))
    }

    /// Re-issue the claims of every enforced workload of `namespace` (its labels changed).
    fn reissue_claims(&self, p: &mut Processor, namespace: &str) {
        let ns_labels = p.engine().namespace_labels_or_default(namespace);
        for e in self
            .workloads
            .values()
            .filter(|e| e.desired.key.namespace == namespace)
        {
            match Claims::new(
                namespace,
                &e.desired.key.name,
                e.desired.labels.clone(),
                ns_labels.clone(),
            ) {
                Ok(c) => p.add_workload(e.id, e.desired.key.clone(), c),
                Err(err) => tracing::error!(
                    workload = %pod_name(&e.desired.key),
                    "namespace labels changed but the new identity is refused, the old one stays: {err}"
                ),
            }
        }
    }

    /// Put a workload's identity into the engine and the processor. On error nothing changed.
    fn apply_identity(&self, id: WorkloadId, d: &Desired) -> Result<()> {
        let ns_labels = self.namespace_labels(d);
        let mut guard = lock(&self.processor);
        let p = &mut *guard;
        let ns_changed = self.ensure_namespace(p.engine_mut(), &d.key.namespace, &ns_labels)?;
        let full_ns_labels = p.engine().namespace_labels_or_default(&d.key.namespace);
        let claims = Claims::new(
            &d.key.namespace,
            &d.key.name,
            d.labels.clone(),
            full_ns_labels,
        )
        .map_err(|e| anyhow::anyhow!("identity: {e}"))?;
        let workload = Workload {
            key: d.key.clone(),
            labels: d.labels.clone(),
            ports: d.ports.clone(),
            ips: d.ips.clone(),
            host_network: false,
        };
        p.engine_mut().apply_workload(workload).map_err(|e| {
            let field = if e.field.is_empty() {
                String::new()
            } else {
                format!("{}: ", e.field)
            };
            anyhow::anyhow!("{field}{}", e.message)
        })?;
        p.add_workload(id, d.key.clone(), claims);
        if ns_changed {
            self.reissue_claims(p, &d.key.namespace);
        }
        Ok(())
    }

    fn refuse(&self, d: &Desired, e: &anyhow::Error) {
        self.shared
            .workload_failures
            .fetch_add(1, Ordering::Relaxed);
        if !self.workloads.contains_key(&d.key) {
            // Not enforced at all (an enforced one keeps its previous identity): /readyz says so.
            lock(&self.shared.failing).insert(pod_name(&d.key), format!("{e:#}"));
        }
        tracing::error!(workload = %pod_name(&d.key), origin = %d.origin, "workload not enforced: {e:#}");
    }

    fn apply(&mut self, event: Event) {
        let recheck = changes_decisions(&event, &self.workloads);
        match event {
            Event::Sync(list) => {
                self.sync(list);
                if !self.synced_once {
                    self.synced_once = true;
                    self.awaiting_ready = Some(self.inflight.values().cloned().collect());
                    self.check_ready();
                }
            }
            Event::Upsert(d) => self.upsert(d),
            Event::Remove(key) => self.remove(&key),
            Event::Namespace {
                name,
                labels,
                require_encryption,
            } => {
                if require_encryption {
                    self.encrypted_namespaces.insert(name.clone());
                } else {
                    self.encrypted_namespaces.remove(&name);
                }
                self.namespace(name, labels);
            }
            Event::Policies {
                origin,
                policies,
                admin,
            } => {
                self.replace_policies(&origin, &policies);
                if let Some(admin) = admin {
                    self.replace_admin(&origin, &admin, |_| true);
                }
            }
            Event::AdminPolicies {
                origin,
                kind,
                policies,
                unparsed,
            } => self.replace_admin(&origin, &policies, |k| {
                k.kind == kind && !unparsed.contains(&k.name)
            }),
            Event::AdminUpsert(p) => self.replace_admin("Kubernetes API", &[*p], |_| false),
            Event::AdminRemove(key) => {
                lock(&self.processor).engine_mut().remove_admin_policy(&key);
                self.admin_keys.remove(&key);
                self.shared
                    .admin_policies
                    .store(self.admin_keys.len(), Ordering::Relaxed);
                tracing::info!(policy = %key, "admin policy removed");
            }
            Event::PolicyUpsert(p) => self.policy_upsert(&p),
            Event::PolicyRemove(key) => {
                lock(&self.processor).engine_mut().remove_policy(&key);
                self.policy_keys.retain(|k| *k != key);
                self.shared
                    .policies
                    .store(self.policy_keys.len(), Ordering::Relaxed);
                tracing::info!(policy = %format!("{}/{}", key.namespace, key.name), "policy removed");
            }
            Event::PeerCertificate { node, pem } => {
                self.peer_certificate(&node, pem.as_deref());
                self.plan_tunnel();
            }
            Event::Nodes { origin, nodes } => {
                self.replace_nodes(&origin, nodes);
                self.plan_tunnel();
            }
            Event::NodeUpsert(node) => {
                let name = node.name().to_owned();
                if apply_node(
                    &self.shared,
                    lock(&self.processor).engine_mut(),
                    crate::runtime::kubernetes::objects::NODE_ORIGIN,
                    &node,
                ) {
                    self.nodes.insert(name, node);
                }
                self.plan_tunnel();
            }
            Event::NodeRemove(name) => {
                lock(&self.processor).engine_mut().remove_node(&name);
                self.nodes.remove(&name);
                self.plan_tunnel();
            }
            Event::Staged {
                origin,
                scope,
                objects,
            } => {
                let refused = lock(&self.processor)
                    .engine_mut()
                    .replace_staged(objects, |k| scope.covers(k));
                for e in &refused {
                    self.shared.reload_failures.fetch_add(1, Ordering::Relaxed);
                    tracing::error!(
                        "{origin}: {e} (staged; refused, its previous staged version, if any, stays)"
                    );
                }
                self.staged_changed(&origin);
            }
            Event::StagedUpsert(object) => {
                let staged = lock(&self.processor).engine_mut().stage(*object);
                match staged {
                    Ok(key) => {
                        tracing::info!(policy = %key, "staged: evaluated beside the enforced policies, not enforced")
                    }
                    Err(e) => {
                        self.shared.reload_failures.fetch_add(1, Ordering::Relaxed);
                        tracing::error!(
                            "Kubernetes API: {e} (staged; refused, its previous staged version, if any, stays)"
                        );
                    }
                }
                self.staged_changed("Kubernetes API");
            }
            Event::StagedRemove(key) => {
                let unstaged = lock(&self.processor).engine_mut().unstage(&key);
                if unstaged {
                    tracing::info!(policy = %key, "no longer staged");
                    self.staged_changed("Kubernetes API");
                }
            }
        }
        if recheck {
            self.cut_denied_flows();
        }
        self.update_guard();
    }

    /// Whether a workload requires encryption: its own annotation or label, or its namespace's.
    fn requires_encryption(&self, d: &Desired) -> bool {
        d.require_encryption || self.encrypted_namespaces.contains(&d.key.namespace)
    }

    /// Tell the guard what it covers now; started with the first workload that requires
    /// encryption (nothing is installed in the node's namespace before).
    fn update_guard(&mut self) {
        let mut names = Vec::new();
        let mut addresses = Vec::new();
        for e in self.workloads.values() {
            if self.requires_encryption(&e.desired) {
                names.push(pod_name(&e.desired.key));
                addresses.push(e.desired.ips.as_slice());
            }
        }
        // Nothing to guard and no guard: nothing to compute (the node list can be long).
        if names.is_empty() && self.guard.want.is_none() {
            return;
        }
        names.sort();
        let want = guard::want(addresses.into_iter(), &self.nodes, &self.shared.node_name);
        if let Some(st) = lock(&self.shared.guard).as_mut() {
            st.workloads = names.clone();
        }
        match &self.guard.want {
            Some(tx) => {
                tx.send_if_modified(|g| {
                    let changed = *g != want;
                    *g = want;
                    changed
                });
            }
            None => {
                tracing::info!(
                    workloads = ?names,
                    "a workload requires encryption: starting the guard in the node's namespace"
                );
                *lock(&self.shared.guard) = Some(guard::GuardStatus {
                    workloads: names,
                    ..Default::default()
                });
                let (tx, rx) = watch::channel(want);
                self.guard.task = Some(tokio::spawn(guard::run(
                    Netns::from_pid(std::process::id()),
                    self.guard.cfg.clone(),
                    rx,
                    self.processor.clone(),
                    self.shared.guard.clone(),
                    self.guard.stop.clone(),
                )));
                self.guard.want = Some(tx);
            }
        }
    }

    /// Enforce exactly `list`: what is not in it is removed (also when its installation is still
    /// under way), what is in it is upserted.
    fn sync(&mut self, list: Vec<Desired>) {
        let wanted: HashSet<PodKey> = list.iter().map(|d| d.key.clone()).collect();
        let gone: Vec<PodKey> = self
            .workloads
            .keys()
            .chain(self.inflight.values())
            .filter(|k| !wanted.contains(*k))
            .cloned()
            .collect();
        for key in gone {
            self.remove(&key);
        }
        let wanted_names: HashSet<String> = wanted.iter().map(pod_name).collect();
        lock(&self.shared.failing).retain(|name, _| wanted_names.contains(name));
        for d in list {
            self.upsert(d);
        }
    }

    fn upsert(&mut self, d: Desired) {
        if self.is_inflight(&d.key) {
            // Applied once the installation under way has finished.
            self.queued.insert(d.key.clone(), Some(d));
            return;
        }
        if let Prepared::Start(s) = self.prepare(d) {
            self.launch(s);
        }
    }

    fn is_inflight(&self, key: &PodKey) -> bool {
        self.inflight.values().any(|k| k == key)
    }

    /// Install a workload's queue and rules on a task of its own (a few at a time), so that
    /// one slow namespace never delays the others or the event loop.
    fn launch(&mut self, s: Box<Start>) {
        let key = s.desired.key.clone();
        let (qcfg, rules, permits) = (self.qcfg, self.rules, self.permits.clone());
        let handle = self.tasks.spawn(async move {
            let launched = Instant::now();
            let _permit = permits.acquire_owned().await;
            let mut timings = InstallTimings {
                waited: launched.elapsed(),
                ..InstallTimings::default()
            };
            let result = async {
                let (file, ino, netns) = open_netns(&s.desired.netns)?;
                let (queue, installed, injector) =
                    start_workload(&netns, qcfg, rules, &mut timings).await?;
                Ok((file, ino, netns, queue, installed, injector))
            }
            .await;
            Started {
                start: *s,
                result,
                timings,
                ended: Instant::now(),
            }
        });
        self.inflight.insert(handle.id(), key);
    }

    /// An installation finished (or failed, or its task panicked).
    fn completed(&mut self, joined: Result<(tokio::task::Id, Started), tokio::task::JoinError>) {
        let (key, started) = match joined {
            Ok((id, started)) => (self.inflight.remove(&id), Some(started)),
            Err(e) => {
                tracing::error!("workload installation task failed: {e}");
                (self.inflight.remove(&e.id()), None)
            }
        };
        if let Some(started) = started {
            self.finish(started);
            self.update_guard();
        }
        let Some(key) = key else { return };
        if let Some(waiting) = &mut self.awaiting_ready {
            waiting.remove(&key);
        }
        match self.queued.remove(&key) {
            Some(Some(d)) => self.upsert(d),
            Some(None) => self.remove(&key),
            None => {}
        }
        self.check_ready();
    }

    /// Ready once every workload of the runtime's first list has been tried.
    fn check_ready(&mut self) {
        if self.awaiting_ready.as_ref().is_some_and(|w| w.is_empty()) {
            self.awaiting_ready = None;
            self.shared.ready.store(true, Ordering::Relaxed);
            tracing::info!(
                workloads = self.workloads.len(),
                "ready: the runtime's workloads are enforced"
            );
        }
    }

    /// Apply what needs no I/O: identity updates of an enforced workload, or the identity of
    /// a new one (then it needs starting).
    fn prepare(&mut self, d: Desired) -> Prepared {
        if let Some(e) = self.workloads.get(&d.key) {
            let same_ns = netns_ino(&d.netns) == Some(e.netns_ino);
            if same_ns {
                let same_identity = e.desired.labels == d.labels
                    && e.desired.namespace_labels == d.namespace_labels
                    && e.desired.ports == d.ports
                    && e.desired.ips == d.ips;
                if !same_identity {
                    let id = e.id;
                    match self.apply_identity(id, &d) {
                        Ok(()) => {
                            tracing::info!(workload = %pod_name(&d.key), "workload updated");
                            if let Some(st) =
                                lock(&self.shared.workloads).get_mut(&pod_name(&d.key))
                            {
                                st.labels = d.labels.clone();
                            }
                            if let Some(e) = self.workloads.get_mut(&d.key) {
                                e.desired = d;
                            }
                        }
                        Err(err) => self.refuse(&d, &err),
                    }
                } else if e.desired.require_encryption != d.require_encryption {
                    tracing::info!(
                        workload = %pod_name(&d.key),
                        require_encryption = d.require_encryption,
                        "workload updated"
                    );
                    if let Some(e) = self.workloads.get_mut(&d.key) {
                        e.desired.require_encryption = d.require_encryption;
                    }
                }
                return Prepared::Done;
            }
        }
        // New, or a new netns under the same name (a restarted container): installed under a
        // new id; `finish` drops the old one.
        self.next_id = self.next_id.wrapping_add(1);
        Prepared::Start(Box::new(Start {
            id: WorkloadId(self.next_id),
            desired: d,
        }))
    }

    fn finish(&mut self, started: Started) {
        let Started {
            start,
            result,
            timings,
            ended,
        } = started;
        let d = start.desired;
        let (file, ino, netns, queue, installed, injector) = match result {
            Ok(x) => x,
            Err(e) => {
                self.refuse(&d, &e);
                return;
            }
        };
        // A re-installed workload (new netns): drop the old one's state first.
        if let Some(old) = self.workloads.remove(&d.key) {
            self.forget(old);
        }
        if let Err(e) = self.apply_identity(start.id, &d) {
            self.refuse(&d, &e);
            let ns = netns.clone();
            tokio::task::spawn_blocking(move || {
                let _ = shell::rules::remove(&ns);
                drop(queue);
                drop(file);
            });
            return;
        }
        let name = pod_name(&d.key);
        let latency = d
            .started_at
            .and_then(|t| SystemTime::now().duration_since(t).ok());
        if let Some(l) = latency {
            lock(&self.shared.enforce_latency).record(l.as_secs_f64());
        }
        tracing::info!(
            workload = %name,
            origin = %d.origin,
            netns = %netns_display(&d.netns),
            reapplied = installed.reapplied,
            grandfathered = installed.grandfathered,
            since_start_ms = latency.map(|l| l.as_millis() as u64),
            slot_wait_ms = timings.waited.as_millis() as u64,
            sockets_ms = timings.sockets.as_millis() as u64,
            rules_ms = timings.rules.as_millis() as u64,
            loop_wait_ms = ended.elapsed().as_millis() as u64,
            "workload enforced"
        );
        let stats = Arc::new(QueueStats::default());
        stats.serving.store(true, Ordering::Relaxed);
        lock(&self.shared.failing).remove(&name);
        lock(&self.shared.workloads).insert(
            name.clone(),
            WorkloadStatus {
                origin: d.origin.clone(),
                netns: netns_display(&d.netns),
                labels: d.labels.clone(),
                enforced_since: SystemTime::now(),
                stats: stats.clone(),
            },
        );
        let (stop, stop_rx) = watch::channel(false);
        lock(&self.udp.injectors).insert(start.id, Arc::new(injector));
        let task = tokio::spawn(serve(
            queue,
            start.id,
            name,
            self.processor.clone(),
            self.udp.clone(),
            self.mode,
            stats,
            self.shared.busy_poll.clone(),
            stop_rx,
        ));
        self.workloads.insert(
            d.key.clone(),
            Enforced {
                id: start.id,
                desired: d,
                _netns_file: file,
                netns_ino: ino,
                netns,
                stop,
                task,
            },
        );
    }

    /// Drop a workload from the processor and the status table; its task is stopped and its
    /// rules removed in the background (the namespace is held open until then).
    fn forget(&mut self, e: Enforced) {
        let name = pod_name(&e.desired.key);
        lock(&self.shared.workloads).remove(&name);
        lock(&self.udp.injectors).remove(&e.id);
        {
            let mut p = lock(&self.processor);
            p.remove_workload(e.id);
            if !self.workloads.contains_key(&e.desired.key) {
                p.engine_mut().remove_workload(&e.desired.key);
            }
        }
        e.stop.send_replace(true);
        tokio::spawn(async move {
            let ns = e.netns.clone();
            let removed = tokio::task::spawn_blocking(move || shell::rules::remove(&ns)).await;
            if let Ok(Err(err)) = removed {
                tracing::debug!(workload = %name, "removing rules (the namespace may be gone): {err}");
            }
            if let Ok(Some(mut queue)) = e.task.await {
                let _ = queue.unbind();
            }
            drop(e._netns_file);
            tracing::info!(workload = %name, "workload forgotten");
        });
    }

    fn remove(&mut self, key: &PodKey) {
        if self.is_inflight(key) {
            self.queued.insert(key.clone(), None);
            return;
        }
        lock(&self.shared.failing).remove(&pod_name(key));
        self.queued.remove(key);
        if let Some(e) = self.workloads.remove(key) {
            self.forget(e);
        }
    }

    fn namespace(&mut self, name: String, labels: Option<BTreeMap<String, String>>) {
        let mut guard = lock(&self.processor);
        let p = &mut *guard;
        let labels = match labels {
            Some(l) => {
                self.namespaces.insert(name.clone(), l.clone());
                l
            }
            None => {
                self.namespaces.remove(&name);
                BTreeMap::new()
            }
        };
        match self.ensure_namespace(p.engine_mut(), &name, &labels) {
            Ok(true) => {
                tracing::info!(namespace = %name, "namespace labels changed");
                self.reissue_claims(p, &name);
            }
            Ok(false) => {}
            Err(e) => tracing::error!("{e:#}"),
        }
    }

    fn replace_policies(&mut self, origin: &str, set: &[NetworkPolicy]) {
        let result = {
            let mut p = lock(&self.processor);
            policies::replace(p.engine_mut(), set, &self.policy_keys)
        };
        match result {
            Ok((keys, removed)) => {
                tracing::info!(source = %origin, policies = keys.len(), removed, "policies in force");
                self.shared.policies.store(keys.len(), Ordering::Relaxed);
                self.policy_keys = keys;
            }
            Err(e) => {
                self.shared.reload_failures.fetch_add(1, Ordering::Relaxed);
                tracing::error!(
                    "{origin}: policies refused, the previous set stays in force: {e:#}"
                );
            }
        }
    }

    /// Apply admin policies; those in force that `scope` covers and that are not in `set` go.
    fn replace_admin(
        &mut self,
        origin: &str,
        set: &[AdminPolicy],
        scope: impl Fn(&AdminPolicyKey) -> bool,
    ) {
        let r = {
            let mut p = lock(&self.processor);
            policies::replace_admin(p.engine_mut(), set, &mut self.admin_keys, scope)
        };
        self.shared
            .admin_policies
            .store(self.admin_keys.len(), Ordering::Relaxed);
        for e in &r.refused {
            self.shared.reload_failures.fetch_add(1, Ordering::Relaxed);
            tracing::error!(
                "{origin}: {e} (refused; its previous version, if any, stays in force)"
            );
        }
        tracing::info!(
            source = %origin,
            applied = r.applied,
            removed = r.removed,
            refused = r.refused.len(),
            in_force = self.admin_keys.len(),
            "admin policies"
        );
    }

    /// The staged set changed: counted for `/status` and the metrics.
    fn staged_changed(&self, origin: &str) {
        let staged: Vec<String> = lock(&self.processor)
            .engine()
            .staged()
            .map(ToString::to_string)
            .collect();
        self.shared
            .staged_policies
            .store(staged.len(), Ordering::Relaxed);
        tracing::info!(source = %origin, staged = ?staged, "staged policies (evaluated, not enforced)");
    }

    /// Make `nodes` the node inventory; a refused node keeps its previous version.
    fn replace_nodes(&mut self, origin: &str, nodes: Vec<NodeInfo>) {
        let mut p = lock(&self.processor);
        let engine = p.engine_mut();
        let wanted: HashSet<String> = nodes.iter().map(|n| n.name().to_owned()).collect();
        let gone: Vec<String> = engine
            .nodes()
            .filter(|n| !wanted.contains(&n.name))
            .map(|n| n.name.clone())
            .collect();
        for name in &gone {
            engine.remove_node(name);
        }
        self.nodes.retain(|name, _| wanted.contains(name));
        for node in nodes {
            if apply_node(&self.shared, engine, origin, &node) {
                self.nodes.insert(node.name().to_owned(), node);
            }
        }
        tracing::info!(source = %origin, nodes = engine.node_count(), removed = gone.len(), "node inventory");
    }

    /// Recompute the tunnel's peers from the nodes and the keys trusted now; a plan that
    /// differs is handed to the tunnel's task, and what changed for each node is logged once.
    fn plan_tunnel(&mut self) {
        self.ticks = 0;
        let Some(t) = &mut self.tunnel else { return };
        let plan = {
            let p = lock(&self.processor);
            let node = p.node();
            let now = now_ms();
            let pki = node.mode() == identity::Mode::Pki;
            if !pki {
                t.psk_keys.retain(|name, _| self.nodes.contains_key(name));
                for name in self.nodes.keys() {
                    if !t.psk_keys.contains_key(name) {
                        t.psk_keys
                            .insert(name.clone(), node.peer_tunnel_key(name, now));
                    }
                }
            }
            let no_key = if pki {
                "no trusted tunnel key (no certificate of it from the cluster CA, valid and unrevoked)"
            } else {
                "no tunnel key for its name"
            };
            let psk_keys = &t.psk_keys;
            tunnel::plan(
                &self.shared.node_name,
                &self.nodes,
                t.port,
                t.own_key,
                |name| {
                    if pki {
                        node.peer_tunnel_key(name, now)
                    } else {
                        psk_keys.get(name).copied().flatten()
                    }
                },
                no_key,
            )
        };
        if plan == t.last {
            return;
        }
        tunnel::log_changes(&t.last, &plan);
        if let Some(shared) = &self.shared.tunnel {
            *lock(&shared.not_peers) = plan.not_peers.clone();
        }
        t.last = plan.clone();
        t.plans.send_replace(plan);
    }

    fn policy_upsert(&mut self, policy: &NetworkPolicy) {
        let applied = lock(&self.processor).engine_mut().apply_policy(policy);
        match applied {
            Ok(key) => {
                if !self.policy_keys.contains(&key) {
                    self.policy_keys.push(key.clone());
                }
                self.shared
                    .policies
                    .store(self.policy_keys.len(), Ordering::Relaxed);
                tracing::info!(policy = %format!("{}/{}", key.namespace, key.name), "policy applied");
            }
            Err(e) => {
                self.shared.reload_failures.fetch_add(1, Ordering::Relaxed);
                tracing::error!(
                    "NetworkPolicy {}: {}: {} (refused; its previous version, if any, stays in force)",
                    e.object,
                    e.field,
                    e.message
                );
            }
        }
    }

    fn peer_certificate(&mut self, node: &str, pem: Option<&str>) {
        let mut p = lock(&self.processor);
        match pem {
            None => {
                let n = p.node_mut().remove_peer(node);
                tracing::info!(peer = node, certificates = n, "peer node revoked");
            }
            Some(pem) => {
                let cert = match identity::NodeCertificate::from_pem(pem) {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::error!(peer = node, "peer certificate refused: {e}");
                        return;
                    }
                };
                match p.node_mut().add_peer_certificate(node, cert, now_ms()) {
                    Ok(id) => tracing::info!(peer = node, key = %id, "peer node trusted"),
                    Err(e) => tracing::error!(peer = node, "peer certificate refused: {e}"),
                }
            }
        }
    }

    /// Our own credentials changed to a valid pair (`--node-cert` / `--node-key` rewritten):
    /// replaced in place. New tokens are signed with the new key, the tunnel's static key is
    /// replaced (its sessions restart under it), and in Kubernetes mode the new certificate is
    /// published on our Node. Until each peer has the new certificate, new connections with it
    /// are refused and the tunnel to it has no session (established TCP retransmits through
    /// the gap). Refused (logged, the old credentials stay) if the identity refuses them.
    fn own_credentials(&mut self, new: keys::OwnCredentials, files: &str) {
        let keys::OwnCredentials { creds, cert_pem } = new;
        let (old_id, rotated, secret) = {
            let mut p = lock(&self.processor);
            let old_id = p.node().key_id();
            match p.node_mut().replace_credentials(creds, now_ms()) {
                Ok(id) => (
                    old_id,
                    id,
                    datapath::tunnel::StaticSecret::from_bytes(*p.node().tunnel_secret()),
                ),
                Err(e) => {
                    self.shared.reload_failures.fetch_add(1, Ordering::Relaxed);
                    tracing::error!(
                        "{files}: new node credentials refused, the credentials in force stay: {e}"
                    );
                    return;
                }
            }
        };
        if rotated == old_id {
            return;
        }
        tracing::info!(
            old_key = %old_id,
            key = %rotated,
            "node credentials rotated: new tokens are signed with the new key; peers accept them once they have the new certificate"
        );
        if let Some(t) = &mut self.tunnel {
            t.own_key = secret.public_key();
            t.secrets.send_replace(Some(secret));
        }
        if let Some(own_pem) = &self.own_pem {
            own_pem.send_replace(cert_pem);
        }
        self.plan_tunnel();
    }

    fn housekeeping(&mut self) {
        // Certificates expire and become valid with time alone (PKI): the tunnel's peers are
        // recomputed every 10 s too (PSK keys depend on names alone).
        self.ticks = self.ticks.saturating_add(1);
        if self.ticks >= 10 && lock(&self.processor).node().mode() == identity::Mode::Pki {
            self.plan_tunnel();
        }
        let (mut qd, mut ud) = (0, 0);
        for s in lock(&self.shared.workloads).values() {
            qd += s.stats.queue_dropped.load(Ordering::Relaxed);
            ud += s.stats.user_dropped.load(Ordering::Relaxed);
        }
        let mut p = lock(&self.processor);
        p.expire(now_ms());
        p.metrics_mut().set_queue_drops(qd, ud);
        let due = p.prune_due(now_ms());
        drop(p);
        if let Some(ids) = due {
            self.prune_established(&ids);
        }
    }

    /// Re-check every remembered established flow against the engine (after a change that can
    /// change decisions) and cut those now denied: the processor forgets them and answers their
    /// next packets with RSTs; here, off the event loop and one batch per netns, their local
    /// sockets are destroyed (the peer gets a RST at once) and their conntrack entries, which
    /// carry the AUTH connmark that lets them bypass the queue, deleted.
    fn cut_denied_flows(&self) {
        let start = std::time::Instant::now();
        let cuts = lock(&self.processor).recheck(now_ms());
        let recheck_us = start.elapsed().as_micros() as u64;
        if cuts.is_empty() {
            tracing::debug!(recheck_us, "established flows re-checked: none denied");
            return;
        }
        let flows = cuts.len();
        let mut by_id: HashMap<WorkloadId, Vec<datapath::Cut>> = HashMap::new();
        for c in cuts {
            by_id.entry(c.workload).or_default().push(c);
        }
        tracing::info!(flows, recheck_us, "established flows now denied: cutting");
        for e in self.workloads.values() {
            let Some(cuts) = by_id.remove(&e.id) else {
                continue;
            };
            let (ns, name) = (e.netns.clone(), pod_name(&e.desired.key));
            tokio::spawn(async move {
                let start = std::time::Instant::now();
                let done =
                    tokio::task::spawn_blocking(move || shell::conntrack::cut(&ns, cuts)).await;
                let cut_ms = start.elapsed().as_secs_f64() * 1e3;
                match done {
                    Ok(Ok(d)) => tracing::info!(
                        workload = %name,
                        sockets = d.sockets,
                        deleted = d.deleted,
                        missing = d.missing,
                        cut_ms,
                        "cut flows' sockets destroyed and conntrack entries deleted"
                    ),
                    Ok(Err(err)) => {
                        tracing::error!(workload = %name, "cutting flows: {err}")
                    }
                    Err(err) => {
                        tracing::error!(workload = %name, "cutting flows: {err}")
                    }
                }
            });
        }
    }

    /// Forget remembered flows that conntrack no longer lists, per workload netns, off the
    /// event loop.
    fn prune_established(&self, ids: &[WorkloadId]) {
        for e in self.workloads.values().filter(|e| ids.contains(&e.id)) {
            let (id, ns, processor) = (e.id, e.netns.clone(), self.processor.clone());
            tokio::spawn(async move {
                let listed_from = now_ms();
                let listed = tokio::task::spawn_blocking(move || shell::conntrack::list(&ns)).await;
                match listed {
                    Ok(Ok(alive)) => {
                        let n = lock(&processor).prune(id, listed_from, &alive);
                        tracing::debug!(pruned = n, "remembered flows gone from conntrack");
                    }
                    Ok(Err(err)) => tracing::debug!("listing conntrack: {err}"),
                    Err(err) => tracing::debug!("listing conntrack: {err}"),
                }
            });
        }
    }

    /// Remove every rule, stop every queue task, unbind the queues.
    async fn shutdown(&mut self) {
        // Installations under way finish first, so their rules are removed too.
        while let Some(joined) = self.tasks.join_next_with_id().await {
            if let Ok((id, started)) = joined {
                self.inflight.remove(&id);
                self.finish(started);
            }
        }
        let all: Vec<Enforced> = self.workloads.drain().map(|(_, e)| e).collect();
        // Rules go first, while the readers still answer what is queued.
        for e in &all {
            let ns = e.netns.clone();
            let name = pod_name(&e.desired.key);
            match tokio::task::spawn_blocking(move || shell::rules::remove(&ns)).await {
                Ok(Ok(())) => tracing::info!(workload = %name, "rules removed"),
                Ok(Err(err)) => tracing::error!(workload = %name, "removing rules: {err}"),
                Err(err) => tracing::error!(workload = %name, "removing rules: {err}"),
            }
        }
        for e in all {
            e.stop.send_replace(true);
            if let Ok(Some(mut queue)) = e.task.await
                && let Err(err) = queue.unbind()
            {
                tracing::warn!(workload = %pod_name(&e.desired.key), "unbinding queue: {err}");
            }
        }
    }
}

/// Adds or replaces one node of the inventory; a refused one is reported (naming `origin`, the
/// node and the field) and its previous version, if any, stays in force. True if applied.
fn apply_node(shared: &Shared, engine: &mut policy::Engine, origin: &str, node: &NodeInfo) -> bool {
    let name = node.name();
    match engine.apply_node(node.node.clone()) {
        Ok(()) => true,
        Err(e) => {
            shared.reload_failures.fetch_add(1, Ordering::Relaxed);
            tracing::error!(
                "{origin}: node {name}: {}: {} (refused; its previous version, if any, stays in force)",
                e.field,
                e.message
            );
            false
        }
    }
}

/// Whether an event can turn an allowed established flow into a denied one: policies,
/// namespace labels, a workload list, or an enforced workload whose identity changed.
fn changes_decisions(event: &Event, enforced: &HashMap<PodKey, Enforced>) -> bool {
    match event {
        Event::Policies { .. }
        | Event::AdminPolicies { .. }
        | Event::AdminUpsert(_)
        | Event::AdminRemove(_)
        | Event::PolicyUpsert(_)
        | Event::PolicyRemove(_)
        | Event::Namespace { .. }
        | Event::Nodes { .. }
        | Event::NodeUpsert(_)
        | Event::NodeRemove(_)
        | Event::Sync(_) => true,
        Event::Upsert(d) => enforced.get(&d.key).is_some_and(|e| e.desired != *d),
        // Staged policies are never enforced: nothing established is judged by them.
        Event::Remove(_)
        | Event::PeerCertificate { .. }
        | Event::Staged { .. }
        | Event::StagedUpsert(_)
        | Event::StagedRemove(_) => false,
    }
}

struct Start {
    id: WorkloadId,
    desired: Desired,
}

enum Prepared {
    Done,
    Start(Box<Start>),
}

type StartedParts = (
    File,
    (u64, u64),
    Netns,
    WorkloadQueue,
    shell::Installed,
    Injector,
);

struct Started {
    start: Start,
    result: Result<StartedParts>,
    timings: InstallTimings,
    /// When the installation task ended (the event loop takes it up later).
    ended: Instant,
}

/// Where a workload's installation spent its time (logged with "workload enforced").
#[derive(Debug, Default, Clone, Copy)]
struct InstallTimings {
    /// Waiting for one of the installation slots.
    waited: Duration,
    /// The raw socket and the queue socket in the workload's netns.
    sockets: Duration,
    /// The rules (`shell::rules::install`).
    rules: Duration,
}

/// Run the agent until SIGTERM/SIGINT; then remove every rule it installed.
pub async fn run(opts: Options) -> Result<()> {
    let (node, peers, key_watch) = keys::load_watched(&opts.node_name, &opts.keys, now_ms())?;
    match &opts.runtime {
        // Refuse a bad inventory before touching the kernel.
        RuntimeOptions::Static { inventory } => {
            runtime::inventory::load(inventory)?;
        }
        RuntimeOptions::Docker(runtime::docker::DockerConfig {
            nodes: Some(nodes), ..
        }) => {
            runtime::inventory::load_nodes(nodes)?;
        }
        _ => {}
    }
    let mut runtime_opts = opts.runtime.clone();
    let mut own_pem = None;
    if let (RuntimeOptions::Kubernetes(k), Some(cert)) = (&mut runtime_opts, node.own_certificate())
    {
        // PKI: our certificate is published on our Node for the peers (again after a
        // rotation of our credentials).
        let pem = cert.to_pem();
        let (tx, rx) = watch::channel(pem.clone());
        k.publish_certificate = Some(pem);
        k.certificate_updates = Some(rx);
        own_pem = Some(tx);
    }
    let mut engine = policy::Engine::new();
    let mut policy_keys = Vec::new();
    let mut admin_keys = BTreeSet::new();
    let mut snapshot = policies::Snapshot::new();
    if let Some(dir) = &opts.policies {
        snapshot = policies::snapshot(dir)?;
        let set = policies::load_dir(dir)?;
        policy_keys = policies::replace(&mut engine, &set.network, &[])?.0;
        let r = policies::replace_admin(&mut engine, &set.admin, &mut admin_keys, |_| true);
        if let Some(e) = r.refused.first() {
            // load_dir validated them all: this is a bug, not an input error.
            bail!("{}: {e}", dir.display());
        }
        if let Some(e) = engine.replace_staged(set.staged, |_| true).first() {
            bail!("{}: {e} (staged)", dir.display());
        }
    }
    let config = ProcessorConfig {
        auth_mark: opts.auth_mark,
        audit: opts.audit,
        bound_handshake: opts.bound_handshake,
        ..ProcessorConfig::default()
    };
    // The tunnel starts before anything else touches the kernel: if it cannot, the agent
    // stops here rather than run without the encryption asked for.
    let mut tunnel_parts = None;
    if let Some(t) = &opts.encrypt {
        let secret = datapath::tunnel::StaticSecret::from_bytes(*node.tunnel_secret());
        let own_key = secret.public_key();
        let handle = tunnel::start(t, &secret)?;
        tracing::info!(
            device = %handle.device(),
            listen = %handle.local_addr(),
            key = %own_key,
            "tunnel between nodes started (--encrypt)"
        );
        tunnel_parts = Some((t.clone(), own_key, handle));
    }
    let mut processor = Processor::new(node, engine, config);
    processor.set_dns_servers(opts.dns_servers.clone());
    processor.flow_log_mut().set_config(opts.flow_log.config());
    let processor = Arc::new(Mutex::new(processor));
    tracing::info!(
        node = %opts.node_name,
        peers,
        runtime = opts.runtime.name(),
        policies = policy_keys.len(),
        admin_policies = admin_keys.len(),
        mode = if opts.accept_all {
            "accept-all"
        } else if opts.audit {
            "audit"
        } else {
            "enforce"
        },
        "tessera agent starting"
    );
    let shared = Arc::new(Shared {
        node_name: opts.node_name.clone(),
        runtime: opts.runtime.name(),
        processor: processor.clone(),
        workloads: Mutex::new(BTreeMap::new()),
        policies: AtomicUsize::new(policy_keys.len()),
        admin_policies: AtomicUsize::new(admin_keys.len()),
        staged_policies: AtomicUsize::new(lock(&processor).engine().staged_count()),
        reload_failures: AtomicU64::new(0),
        udp_send_errors: Arc::new(AtomicU64::new(0)),
        busy_poll: opts.busy_poll.clone(),
        workload_failures: AtomicU64::new(0),
        enforce_latency: Mutex::new(EnforceLatency::default()),
        ready: AtomicBool::new(false),
        failing: Mutex::new(BTreeMap::new()),
        flows: Arc::new(flows::FlowHub::new(
            flows::RING_RECORDS,
            flows::CLIENT_BUFFER,
            opts.flow_log.sink.as_ref(),
        )?),
        tunnel: tunnel_parts.as_ref().and_then(|(_, _, h)| {
            h.stats_reader().map(|stats| tunnel::TunnelShared {
                device: h.device().to_owned(),
                listen: h.local_addr(),
                stats,
                not_peers: Mutex::new(BTreeMap::new()),
            })
        }),
        guard: Arc::new(Mutex::new(None)),
    });
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut tunnel_task = None;
    let mut agent_tunnel = None;
    if let Some((t, own_key, handle)) = tunnel_parts {
        let (plans, plans_rx) = watch::channel(tunnel::Plan::default());
        let (secrets, secrets_rx) = watch::channel(None);
        tunnel_task = Some(tokio::spawn(tunnel::run(
            handle,
            plans_rx,
            secrets_rx,
            stop_rx.clone(),
        )));
        agent_tunnel = Some(AgentTunnel {
            port: t.port,
            own_key,
            plans,
            last: tunnel::Plan::default(),
            psk_keys: HashMap::new(),
            secrets,
        });
    }
    let udp = Arc::new(UdpSender {
        errors: shared.udp_send_errors.clone(),
        ..UdpSender::default()
    });
    let mut agent = Agent {
        shared: shared.clone(),
        processor,
        udp: udp.clone(),
        workloads: HashMap::new(),
        next_id: 0,
        namespaces: BTreeMap::new(),
        policy_keys,
        admin_keys,
        qcfg: QueueConfig {
            queue_num: opts.queue_num,
            max_len: opts.queue_max_len,
            fail_open: opts.fail_open,
            dns_queue_num: opts.dns_queue_num,
            ..QueueConfig::default()
        },
        rules: RuleConfig {
            queue_num: opts.queue_num,
            auth_mark: opts.auth_mark,
            fail_open: opts.fail_open,
            // DNS answers to the workloads' own queries are learnt (admin `domainNames`).
            dns_queue_num: opts.dns_queue_num,
        },
        mode: if opts.accept_all {
            Mode::AcceptAll
        } else {
            Mode::Enforce
        },
        tasks: JoinSet::new(),
        inflight: HashMap::new(),
        queued: HashMap::new(),
        permits: Arc::new(Semaphore::new(8)),
        synced_once: false,
        awaiting_ready: None,
        nodes: BTreeMap::new(),
        tunnel: agent_tunnel,
        ticks: 0,
        encrypted_namespaces: BTreeSet::new(),
        guard: AgentGuard {
            cfg: datapath::shell::encrypted::GuardConfig {
                device: opts.encrypt.as_ref().map_or_else(
                    || tunnel::TunnelOptions::default().device,
                    |t| t.device.clone(),
                ),
                queue_num: opts.guard_queue_num,
            },
            stop: stop_rx.clone(),
            want: None,
            task: None,
        },
        own_pem,
    };
    if let Some(addr) = opts.metrics_addr {
        let addr = http::start(addr, shared.clone())?;
        tracing::info!(%addr, "serving /metrics, /healthz and /status");
    }
    tokio::spawn(udp_timers(
        agent.processor.clone(),
        udp.clone(),
        stop_rx.clone(),
    ));
    tokio::spawn(flows::drain(
        agent.processor.clone(),
        shared.flows.clone(),
        stop_rx.clone(),
    ));
    let (tx, mut rx) = mpsc::channel::<Event>(1024);
    let mut runtime_task = tokio::spawn(run_runtime(runtime_opts, tx.clone(), stop_rx.clone()));
    if let Some(dir) = opts.policies.clone() {
        tokio::spawn(policies::watch(
            dir,
            snapshot,
            shared.clone(),
            tx.clone(),
            stop_rx.clone(),
        ));
    }
    // PKI: our credentials and the peer certificate directory are watched.
    let (own_tx, mut own_rx) = mpsc::channel::<keys::OwnCredentials>(4);
    let own_files = match &opts.keys {
        KeySource::Pki {
            node_cert,
            node_key,
            ..
        } => format!("{} / {}", node_cert.display(), node_key.display()),
        KeySource::Psk(_) => String::new(),
    };
    if let Some(kw) = key_watch {
        tokio::spawn(keys::watch(kw, tx.clone(), own_tx, stop_rx.clone()));
    }
    drop(tx);
    let signal = wait_for_signal();
    tokio::pin!(signal);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut runtime_done = false;
    let mut events_closed = false;
    let outcome: Result<()> = loop {
        tokio::select! {
            ev = rx.recv(), if !events_closed => match ev {
                Some(ev) => agent.apply(ev),
                // Every sender is gone: the runtime ended. An error stops the agent; otherwise
                // what is enforced stays enforced until a signal.
                None => {
                    events_closed = true;
                    if !runtime_done {
                        runtime_done = true;
                        if let Err(e) = runtime_result(&opts, (&mut runtime_task).await) {
                            break Err(e);
                        }
                    }
                }
            },
            r = &mut runtime_task, if !runtime_done => {
                runtime_done = true;
                if let Err(e) = runtime_result(&opts, r) {
                    break Err(e);
                }
            }
            Some(joined) = agent.tasks.join_next_with_id(), if !agent.tasks.is_empty() => agent.completed(joined),
            Some(own) = own_rx.recv() => agent.own_credentials(own, &own_files),
            _ = tick.tick() => agent.housekeeping(),
            // The tunnel stopped on its own: the agent does not go on unencrypted.
            r = task_end(&mut tunnel_task), if tunnel_task.is_some() => {
                tunnel_task = None;
                break match r {
                    Ok(Ok(())) => Err(anyhow::anyhow!("--encrypt: the tunnel ended")),
                    Ok(Err(e)) => Err(e.context("--encrypt")),
                    Err(e) => Err(anyhow::anyhow!("--encrypt: tunnel task: {e}")),
                };
            }
            // The guard's queue failed: packets it should refuse would wait there for ever.
            r = task_end(&mut agent.guard.task), if agent.guard.task.is_some() => {
                agent.guard.task = None;
                break match r {
                    Ok(Ok(())) => Err(anyhow::anyhow!("the encryption guard ended")),
                    Ok(Err(e)) => Err(e),
                    Err(e) => Err(anyhow::anyhow!("encryption guard task: {e}")),
                };
            }
            s = &mut signal => break s,
        }
    };
    tracing::info!("stopping: removing rules");
    stop_tx.send_replace(true);
    agent.shutdown().await;
    log_task_end("encryption guard", agent.guard.task.take()).await;
    log_task_end("tunnel", tunnel_task).await;
    if outcome.is_ok() {
        tracing::info!("stopped cleanly");
    }
    outcome
}

/// The end of a task the agent cannot run without (the tunnel, the encryption guard); never,
/// while there is none.
async fn task_end(
    task: &mut Option<JoinHandle<Result<()>>>,
) -> Result<Result<()>, tokio::task::JoinError> {
    match task.as_mut() {
        Some(t) => t.await,
        None => std::future::pending().await,
    }
}

/// Waits for such a task to end after the stop signal; logs how it ended if not cleanly.
async fn log_task_end(what: &str, task: Option<JoinHandle<Result<()>>>) {
    let Some(task) = task else { return };
    match task.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::error!("{e:#}"),
        Err(e) => tracing::error!("{what} task: {e}"),
    }
}

fn runtime_result(opts: &Options, r: Result<Result<()>, tokio::task::JoinError>) -> Result<()> {
    match r {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(e.context(format!("{} runtime", opts.runtime.name()))),
        Err(e) => Err(anyhow::anyhow!("{} runtime task: {e}", opts.runtime.name())),
    }
}

async fn run_runtime(
    r: RuntimeOptions,
    tx: runtime::Sender,
    stop: watch::Receiver<bool>,
) -> Result<()> {
    match r {
        RuntimeOptions::Static { inventory } => runtime::inventory::run(inventory, tx, stop).await,
        RuntimeOptions::Docker(cfg) => match cfg.nodes.clone() {
            // The daemon's containers, and the node list beside them.
            Some(nodes) => tokio::try_join!(
                runtime::docker::run(cfg, tx.clone(), stop.clone()),
                runtime::inventory::run_nodes(nodes, tx, stop),
            )
            .map(|_| ()),
            None => runtime::docker::run(cfg, tx, stop).await,
        },
        RuntimeOptions::Kubernetes(cfg) => runtime::kubernetes::run(cfg, tx, stop).await,
    }
}

async fn start_workload(
    netns: &Netns,
    qcfg: QueueConfig,
    rules: RuleConfig,
    timings: &mut InstallTimings,
) -> Result<(WorkloadQueue, shell::Installed, Injector)> {
    let ns = netns.clone();
    let started = tokio::task::spawn_blocking(move || {
        let result = shell::start_workload(&ns, rules.auth_mark, qcfg, rules);
        if let Err(shell::ShellError::Command { .. } | shell::ShellError::Spawn { .. }) = &result {
            // The rules failed after our queue was bound, so no other agent serves this netns:
            // rules left half in place (IPv4 without IPv6) are ours to take out.
            let _ = shell::rules::remove(&ns);
        }
        result
    })
    .await
    .context("workload setup thread")??;
    timings.sockets = started.sockets;
    timings.rules = started.rules;
    // The queue listens before the rules send anything to it.
    let queue = started.queue.attach()?;
    Ok((queue, started.installed, started.injector))
}

enum Served {
    Batch(Result<usize, shell::ShellError>),
    /// The pause of a paused packet ended.
    Paused,
    Tick,
    Stop,
}

#[allow(clippy::too_many_arguments)]
async fn serve(
    queue: WorkloadQueue,
    id: WorkloadId,
    name: String,
    processor: Arc<Mutex<Processor>>,
    udp: Arc<UdpSender>,
    mode: Mode,
    stats: Arc<QueueStats>,
    busy_poll: Option<Arc<shell::busypoll::BusyPoll>>,
    stop: watch::Receiver<bool>,
) -> Option<WorkloadQueue> {
    if let Some(bp) = &busy_poll
        && let Err(e) = bp.add(queue.as_fd())
    {
        tracing::warn!(workload = %name, "busy polling off for this queue: {e}");
    }
    let mut queue = serve_queue(
        queue,
        id,
        &name,
        processor,
        udp,
        mode,
        stats,
        busy_poll.as_deref(),
        stop,
    )
    .await;
    if let (Some(bp), Some(q)) = (&busy_poll, &mut queue) {
        bp.remove(q.as_fd());
    }
    queue
}

#[allow(clippy::too_many_arguments)]
async fn serve_queue(
    mut queue: WorkloadQueue,
    id: WorkloadId,
    name: &str,
    processor: Arc<Mutex<Processor>>,
    udp: Arc<UdpSender>,
    mode: Mode,
    stats: Arc<QueueStats>,
    busy_poll: Option<&shell::busypoll::BusyPoll>,
    mut stop: watch::Receiver<bool>,
) -> Option<WorkloadQueue> {
    // Nonces (two per handshake) come from ChaCha12 seeded from the OS and re-seeded every
    // second, not from one getrandom(2) call each.
    let mut rng = match StdRng::try_from_rng(&mut getrandom::SysRng) {
        Ok(rng) => rng,
        Err(e) => {
            tracing::error!(workload = %name, "no OS randomness for nonces: {e}");
            stats.serving.store(false, Ordering::Relaxed);
            return Some(queue);
        }
    };
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        if *stop.borrow() {
            return Some(queue);
        }
        let mut decider = Decider {
            processor: &processor,
            udp: &udp,
            mode,
            id,
            rng: &mut rng,
            outgoing: Vec::new(),
            sent: false,
        };
        let pause_ends = queue.pause_ends().map(tokio::time::Instant::from_std);
        let event = tokio::select! {
            r = queue.serve_batch(&mut decider) => Served::Batch(r),
            // A packet paused for an answer (a UDP datagram behind a lost ACK control) goes
            // through the rules again.
            _ = runtime::sleep_until(pause_ends), if pause_ends.is_some() => Served::Paused,
            _ = tick.tick() => Served::Tick,
            _ = stop.changed() => Served::Stop,
        };
        // What a batch that ended in an error left unsent.
        decider.decided();
        if decider.sent {
            // A new UDP handshake may need the timer sooner. (Waking the task only when the
            // processor's next timer came before its own was tried: the admitted UDP flood
            // test, then at the edge of a debug agent's capacity, failed 4 runs in 6 with it
            // against 1 in 6 without; not understood, reverted: 7e4797d.)
            udp.timer.notify_one();
        }
        // Paused packets whose pause ended go back through the rules; a queue error there
        // stops the reader as one in a batch does.
        let event = match queue.release_paused() {
            Ok(_) => event,
            Err(e) => Served::Batch(Err(e)),
        };
        match event {
            Served::Paused => {}
            Served::Batch(Ok(n)) => {
                if n > 0
                    && let Some(bp) = busy_poll
                {
                    bp.touch();
                }
                if n >= shell::queue::BATCH {
                    // More is waiting (a flood, say): let the other workloads' queues, the UDP
                    // timers and the runtime's events (new workloads, policy changes) have
                    // their turn before the next batch.
                    tokio::task::yield_now().await;
                }
            }
            Served::Batch(Err(e)) => {
                // Fail-closed: the rules stay and the kernel drops what it cannot queue.
                tracing::error!(workload = %name, "queue reader stopped: {e}");
                stats.serving.store(false, Ordering::Relaxed);
                return Some(queue);
            }
            Served::Tick => {
                match StdRng::try_from_rng(&mut getrandom::SysRng) {
                    Ok(fresh) => rng = fresh,
                    Err(e) => tracing::warn!(workload = %name, "nonce re-seed failed: {e}"),
                }
                if let Some((q, u)) = queue.kernel_drops() {
                    stats.queue_dropped.store(q, Ordering::Relaxed);
                    stats.user_dropped.store(u, Ordering::Relaxed);
                }
                stats
                    .recv_errors
                    .store(queue.recv_errors, Ordering::Relaxed);
                let v = queue.verdicts;
                stats.verdict_messages.store(v.messages, Ordering::Relaxed);
                stats.verdict_packets.store(v.packets, Ordering::Relaxed);
            }
            Served::Stop => return Some(queue),
        }
    }
}

/// Decides a workload's queued packets, and sends the datagrams a decision asks for (UDP
/// control datagrams, released datagrams) right after that packet's verdict: not after the
/// batch's last verdict and the read that finds the queue empty, which only delayed them.
struct Decider<'a> {
    processor: &'a Mutex<Processor>,
    udp: &'a UdpSender,
    mode: Mode,
    id: WorkloadId,
    rng: &'a mut StdRng,
    outgoing: Vec<Outgoing>,
    /// Something was sent.
    sent: bool,
}

impl shell::queue::Handler for Decider<'_> {
    fn packet(
        &mut self,
        direction: Direction,
        packet: &mut Vec<u8>,
        checksum_ready: bool,
    ) -> Action {
        let mut p = lock(self.processor);
        let action = shell::decide(
            &mut p,
            self.mode,
            self.id,
            direction,
            packet,
            checksum_ready,
            self.rng,
        );
        self.outgoing.extend(p.take_outgoing());
        action
    }

    fn decided(&mut self) {
        if !self.outgoing.is_empty() {
            self.udp.send(self.outgoing.drain(..));
            self.sent = true;
        }
    }
}

/// The raw sockets of every enforced workload, and the wake-up of the UDP timer task.
#[derive(Default)]
struct UdpSender {
    injectors: Mutex<HashMap<WorkloadId, Arc<Injector>>>,
    /// Rung when a batch emitted datagrams (a UDP handshake may have started).
    timer: Notify,
    /// Datagrams that could not be sent (workload gone, socket buffer full): counted, and the
    /// handshake's retransmissions recover.
    errors: Arc<AtomicU64>,
}

impl UdpSender {
    /// Send what the processor emitted, in order, each from its workload's netns.
    fn send(&self, outgoing: impl IntoIterator<Item = Outgoing>) {
        for o in outgoing {
            let injector = lock(&self.injectors).get(&o.workload).cloned();
            let sent = match injector {
                Some(i) => i.send(&o.packet, o.mark).map_err(|e| e.to_string()),
                None => Err("workload no longer enforced".to_owned()),
            };
            if let Err(e) = sent {
                self.errors.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(workload = o.workload.0, "sending an agent datagram: {e}");
            }
        }
    }
}

/// Re-sends UDP SYN controls and gives up on agentless peers when their time comes.
async fn udp_timers(
    processor: Arc<Mutex<Processor>>,
    udp: Arc<UdpSender>,
    mut stop: watch::Receiver<bool>,
) {
    let mut rng = match StdRng::try_from_rng(&mut getrandom::SysRng) {
        Ok(rng) => rng,
        Err(e) => {
            tracing::error!("no OS randomness for the UDP timers: {e}");
            return;
        }
    };
    loop {
        let next = lock(&processor).next_udp_timer();
        let wait = next.map_or(Duration::from_secs(3600), |t| {
            Duration::from_millis(t.saturating_sub(now_ms()))
        });
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = udp.timer.notified() => continue,
            _ = stop.changed() => return,
        }
        let out = {
            let mut p = lock(&processor);
            p.poll_udp(now_ms(), &mut rng);
            p.take_outgoing()
        };
        udp.send(out);
    }
}

async fn wait_for_signal() -> Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    Ok(())
}

/// `tessera run --check`: load keys, the inventory and the policies as a start would, touch
/// nothing in the kernel.
pub fn check_only(opts: &Options) -> Result<()> {
    let (_, peers) = keys::load(&opts.node_name, &opts.keys, now_ms())?;
    let mut workloads = None;
    match &opts.runtime {
        RuntimeOptions::Static { inventory } => {
            workloads = Some(runtime::inventory::load(inventory)?.len());
        }
        RuntimeOptions::Docker(runtime::docker::DockerConfig {
            nodes: Some(nodes), ..
        }) => {
            runtime::inventory::load_nodes(nodes)?;
        }
        _ => {}
    }
    let (mut n_policies, mut n_admin) = (None, None);
    if let Some(dir) = &opts.policies {
        let set = policies::load_dir(dir)?;
        n_policies = Some(set.network.len());
        n_admin = Some(set.admin.len());
    }
    tracing::info!(
        node = %opts.node_name,
        peers,
        runtime = opts.runtime.name(),
        workloads,
        policies = n_policies,
        admin_policies = n_admin,
        "configuration checked"
    );
    Ok(())
}

/// Refuse options that cannot work together.
pub fn check(opts: &Options) -> Result<()> {
    if opts.auth_mark == 0 {
        bail!("--auth-mark must not be 0");
    }
    if opts.dns_queue_num == Some(opts.queue_num) {
        bail!(
            "--dns-queue-num must differ from --queue-num ({}): the agent tells DNS answers \
             apart by their queue",
            opts.queue_num
        );
    }
    Ok(())
}
