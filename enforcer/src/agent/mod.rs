//! `tessera run`: the node agent over a static inventory.
//!
//! One process, one current-thread tokio runtime: a task per workload queue (each a socket
//! opened inside the workload's netns), a 1 s housekeeping tick (flow expiry, kernel queue
//! counters, policy reload), and the metrics endpoint. The [`Processor`] is shared behind a
//! mutex that is only ever held synchronously, so it is never contended across an `await`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use datapath::shell::{self, Mode, Netns, QueueConfig, RuleConfig, WorkloadQueue};
use datapath::{Processor, ProcessorConfig, WorkloadId};
use identity::Claims;
use identity::rand_core::UnwrapErr;
use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use policy::{ContainerPort, Engine, PodKey, PolicyKey, Protocol, Workload};
use tokio::sync::watch;
use tokio::task::JoinHandle;

pub mod http;
pub mod inventory;
pub mod keys;
pub mod policies;

use inventory::{NetnsRef, WorkloadSpec};
use keys::KeySource;

/// Everything `tessera run` was told.
#[derive(Debug, Clone)]
pub struct Options {
    pub node_name: String,
    pub inventory: PathBuf,
    pub policies: Option<PathBuf>,
    pub keys: KeySource,
    pub fail_open: bool,
    pub queue_num: u16,
    pub queue_max_len: u32,
    pub auth_mark: u32,
    pub metrics_addr: Option<SocketAddr>,
    pub accept_all: bool,
}

/// Per-workload queue counters, written by its task and read by the tick and /metrics.
#[derive(Debug, Default)]
pub struct QueueStats {
    /// The reader runs (false once it stopped on an error: the workload stays fail-closed).
    pub serving: AtomicBool,
    pub queue_dropped: AtomicU64,
    pub user_dropped: AtomicU64,
    pub recv_errors: AtomicU64,
}

/// What the metrics endpoint reads.
pub struct Shared {
    pub processor: Arc<Mutex<Processor>>,
    pub queues: Vec<(String, Arc<QueueStats>)>,
    pub policies: AtomicUsize,
    pub reload_failures: AtomicU64,
}

pub(crate) fn lock(p: &Mutex<Processor>) -> MutexGuard<'_, Processor> {
    // A panic while holding the lock cannot leave the processor half-updated in a way that
    // matters more than stopping enforcement would; keep serving.
    p.lock().unwrap_or_else(|e| e.into_inner())
}

fn now_ms() -> u64 {
    shell::queue::unix_ms()
}

fn protocol(p: &str) -> Protocol {
    match p {
        "UDP" => Protocol::Udp,
        "SCTP" => Protocol::Sctp,
        _ => Protocol::Tcp,
    }
}

/// Build the policy engine from the inventory: namespaces (with their labels) and workloads.
pub fn engine_from_inventory(source: &str, specs: &[WorkloadSpec]) -> Result<Engine> {
    let mut engine = Engine::new();
    let mut namespaces: BTreeMap<&str, &BTreeMap<String, String>> = BTreeMap::new();
    for w in specs {
        namespaces
            .entry(&w.namespace)
            .or_insert(&w.namespace_labels);
    }
    for (name, labels) in namespaces {
        let ns = Namespace {
            metadata: ObjectMeta {
                name: Some(name.to_owned()),
                labels: Some(labels.clone()),
                ..ObjectMeta::default()
            },
            ..Namespace::default()
        };
        engine.apply_namespace(&ns).map_err(|e| {
            anyhow::anyhow!("{source}: namespace {name}: {}: {}", e.field, e.message)
        })?;
    }
    for (i, w) in specs.iter().enumerate() {
        let workload = Workload {
            key: PodKey {
                namespace: w.namespace.clone(),
                name: w.name.clone(),
            },
            labels: w.labels.clone(),
            ports: w
                .ports
                .iter()
                .map(|p| ContainerPort {
                    name: p.name.clone(),
                    port: p.port,
                    protocol: protocol(&p.protocol),
                })
                .collect(),
            ips: w.ips.clone(),
            host_network: false,
        };
        engine.apply_workload(workload).map_err(|e| {
            let field = if e.field.is_empty() {
                String::new()
            } else {
                format!(".{}", e.field)
            };
            anyhow::anyhow!("{source}: workloads[{i}]{field}: {}", e.message)
        })?;
    }
    Ok(engine)
}

/// The claims a workload's tokens carry (namespace labels as the engine knows them, including
/// `kubernetes.io/metadata.name`).
pub fn claims_for(source: &str, i: usize, w: &WorkloadSpec, engine: &Engine) -> Result<Claims> {
    let ns_labels = engine.namespace_labels_or_default(&w.namespace);
    Claims::new(&w.namespace, &w.name, w.labels.clone(), ns_labels)
        .map_err(|e| anyhow::anyhow!("{source}: workloads[{i}]: {e}"))
}

struct Enforced {
    name: String,
    netns: Netns,
    task: JoinHandle<Option<WorkloadQueue>>,
}

fn netns_of(w: &WorkloadSpec) -> Netns {
    match w.netns_ref() {
        NetnsRef::Path(p) => Netns::from_path(p),
        NetnsRef::Pid(pid) => Netns::from_pid(pid),
    }
}

/// Run the agent until SIGTERM/SIGINT; then remove every rule it installed.
pub async fn run(opts: Options) -> Result<()> {
    let (node, peers) = keys::load(&opts.node_name, &opts.keys, now_ms())?;
    let source = opts.inventory.display().to_string();
    let specs = inventory::load(&opts.inventory)?;
    let mut engine = engine_from_inventory(&source, &specs)?;
    let mut policy_keys: Vec<PolicyKey> = Vec::new();
    let mut snapshot = policies::Snapshot::new();
    if let Some(dir) = &opts.policies {
        snapshot = policies::snapshot(dir)?;
        let set = policies::load_dir(dir)?;
        policy_keys = policies::replace(&mut engine, &set, &[])?.0;
    }
    let mut claims = Vec::with_capacity(specs.len());
    for (i, w) in specs.iter().enumerate() {
        claims.push(claims_for(&source, i, w, &engine)?);
    }
    let config = ProcessorConfig {
        auth_mark: opts.auth_mark,
        ..ProcessorConfig::default()
    };
    let mut processor = Processor::new(node, engine, config);
    for (i, (w, c)) in specs.iter().zip(claims).enumerate() {
        let key = PodKey {
            namespace: w.namespace.clone(),
            name: w.name.clone(),
        };
        processor.add_workload(WorkloadId(i as u32), key, c);
    }
    tracing::info!(
        node = %opts.node_name,
        peers,
        workloads = specs.len(),
        policies = policy_keys.len(),
        mode = if opts.accept_all { "accept-all" } else { "enforce" },
        "tessera agent starting"
    );
    let processor = Arc::new(Mutex::new(processor));
    let rules = RuleConfig {
        queue_num: opts.queue_num,
        auth_mark: opts.auth_mark,
        fail_open: opts.fail_open,
    };
    let qcfg = QueueConfig {
        queue_num: opts.queue_num,
        max_len: opts.queue_max_len,
        fail_open: opts.fail_open,
        ..QueueConfig::default()
    };
    let mode = if opts.accept_all {
        Mode::AcceptAll
    } else {
        Mode::Enforce
    };
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut enforced: Vec<Enforced> = Vec::new();
    let mut stats = Vec::new();
    for (i, w) in specs.iter().enumerate() {
        let name = format!("{}/{}", w.namespace, w.name);
        let netns = netns_of(w);
        let started = start_workload(&netns, qcfg, rules).await;
        let (queue, installed) = match started {
            Ok(ok) => ok,
            Err(e) => {
                stop_tx.send_replace(true);
                shutdown(enforced).await;
                return Err(e.context(format!("{source}: workloads[{i}] ({name})")));
            }
        };
        tracing::info!(
            workload = %name,
            netns = %netns.path().display(),
            queue = opts.queue_num,
            reapplied = installed.reapplied,
            grandfathered = installed.grandfathered,
            "workload enforced"
        );
        let qstats = Arc::new(QueueStats::default());
        qstats.serving.store(true, Ordering::Relaxed);
        stats.push((name.clone(), qstats.clone()));
        let task = tokio::spawn(serve(
            queue,
            WorkloadId(i as u32),
            name.clone(),
            processor.clone(),
            mode,
            qstats,
            stop_rx.clone(),
        ));
        enforced.push(Enforced { name, netns, task });
    }
    let shared = Arc::new(Shared {
        processor: processor.clone(),
        queues: stats,
        policies: AtomicUsize::new(policy_keys.len()),
        reload_failures: AtomicU64::new(0),
    });
    if let Some(addr) = opts.metrics_addr {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("--metrics-addr {addr}"))?;
        tracing::info!(%addr, "serving /metrics and /healthz");
        tokio::spawn(http::serve(listener, shared.clone()));
    }
    tokio::spawn(housekeeping(
        shared.clone(),
        opts.policies.clone(),
        snapshot,
        policy_keys,
        stop_rx.clone(),
    ));
    wait_for_signal().await?;
    tracing::info!("stopping: removing rules");
    stop_tx.send_replace(true);
    shutdown(enforced).await;
    tracing::info!("stopped cleanly");
    Ok(())
}

async fn start_workload(
    netns: &Netns,
    qcfg: QueueConfig,
    rules: RuleConfig,
) -> Result<(WorkloadQueue, shell::Installed)> {
    // The queue listens before the rules send anything to it.
    let ns = netns.clone();
    let opened = tokio::task::spawn_blocking(move || shell::queue::open(&ns, qcfg))
        .await
        .context("queue thread")??;
    let queue = opened.attach()?;
    let ns = netns.clone();
    let installed = tokio::task::spawn_blocking(move || {
        let result = shell::rules::install(&ns, &rules);
        if result.is_err() {
            // We hold the queue, so no other agent serves this netns: rules left half in
            // place (IPv4 without IPv6) are ours to take out.
            let _ = shell::rules::remove(&ns);
        }
        result
    })
    .await
    .context("rules thread")??;
    Ok((queue, installed))
}

/// Stop every queue task, remove the rules from every namespace, unbind the queues.
async fn shutdown(enforced: Vec<Enforced>) {
    // Rules go first, while the readers still answer what is queued.
    for e in &enforced {
        let ns = e.netns.clone();
        match tokio::task::spawn_blocking(move || shell::rules::remove(&ns)).await {
            Ok(Ok(())) => tracing::info!(workload = %e.name, "rules removed"),
            Ok(Err(err)) => tracing::error!(workload = %e.name, "removing rules: {err}"),
            Err(err) => tracing::error!(workload = %e.name, "removing rules: {err}"),
        }
    }
    for e in enforced {
        if let Ok(Some(mut queue)) = e.task.await
            && let Err(err) = queue.unbind()
        {
            tracing::warn!(workload = %e.name, "unbinding queue: {err}");
        }
    }
}

enum Event {
    Served(Result<usize, shell::ShellError>),
    Tick,
    Stop,
}

async fn serve(
    mut queue: WorkloadQueue,
    id: WorkloadId,
    name: String,
    processor: Arc<Mutex<Processor>>,
    mode: Mode,
    stats: Arc<QueueStats>,
    mut stop: watch::Receiver<bool>,
) -> Option<WorkloadQueue> {
    let mut rng = UnwrapErr(getrandom::SysRng);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        if *stop.borrow() {
            return Some(queue);
        }
        let event = tokio::select! {
            r = queue.serve_batch(|direction, packet, checksum_ready| {
                let mut p = lock(&processor);
                shell::decide(&mut p, mode, id, direction, packet, checksum_ready, &mut rng)
            }) => Event::Served(r),
            _ = tick.tick() => Event::Tick,
            _ = stop.changed() => Event::Stop,
        };
        match event {
            Event::Served(Ok(_)) => {}
            Event::Served(Err(e)) => {
                // Fail-closed: the rules stay and the kernel drops what it cannot queue.
                tracing::error!(workload = %name, "queue reader stopped: {e}");
                stats.serving.store(false, Ordering::Relaxed);
                return Some(queue);
            }
            Event::Tick => {
                if let Some((q, u)) = queue.kernel_drops() {
                    stats.queue_dropped.store(q, Ordering::Relaxed);
                    stats.user_dropped.store(u, Ordering::Relaxed);
                }
                stats
                    .recv_errors
                    .store(queue.recv_errors, Ordering::Relaxed);
            }
            Event::Stop => return Some(queue),
        }
    }
}

async fn housekeeping(
    shared: Arc<Shared>,
    dir: Option<PathBuf>,
    mut snapshot: policies::Snapshot,
    mut keys: Vec<PolicyKey>,
    mut stop: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => return,
        }
        let (mut qd, mut ud) = (0, 0);
        for (_, s) in &shared.queues {
            qd += s.queue_dropped.load(Ordering::Relaxed);
            ud += s.user_dropped.load(Ordering::Relaxed);
        }
        {
            let mut p = lock(&shared.processor);
            p.expire(now_ms());
            p.metrics_mut().set_queue_drops(qd, ud);
        }
        let Some(dir) = &dir else { continue };
        let now = match policies::snapshot(dir) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!("policy directory: {e:#}");
                continue;
            }
        };
        if now == snapshot {
            continue;
        }
        snapshot = now;
        match reload(&shared, dir, &keys) {
            Ok(new_keys) => {
                tracing::info!(policies = new_keys.len(), "policies reloaded");
                shared.policies.store(new_keys.len(), Ordering::Relaxed);
                keys = new_keys;
            }
            Err(e) => {
                shared.reload_failures.fetch_add(1, Ordering::Relaxed);
                tracing::error!(
                    "policy reload refused, the previous policies stay in force:\n{e:#}"
                );
            }
        }
    }
}

fn reload(shared: &Shared, dir: &std::path::Path, keys: &[PolicyKey]) -> Result<Vec<PolicyKey>> {
    let set = policies::load_dir(dir)?;
    let mut p = lock(&shared.processor);
    Ok(policies::replace(p.engine_mut(), &set, keys)?.0)
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

/// Refuse options that cannot work together.
pub fn check(opts: &Options) -> Result<()> {
    if opts.auth_mark == 0 {
        bail!("--auth-mark must not be 0");
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn inventory_becomes_engine_workloads_with_namespace_labels() {
        let specs = inventory::parse(
            "inv.yaml",
            "workloads:\n  - {name: web-1, namespace: demo, labels: {role: web}, namespaceLabels: {team: a}, pid: 1, ports: [{name: http, port: 80}]}\n",
        )
        .unwrap();
        let engine = engine_from_inventory("inv.yaml", &specs).unwrap();
        let labels = engine.namespace_labels("demo").unwrap();
        assert_eq!(labels["team"], "a");
        assert_eq!(labels["kubernetes.io/metadata.name"], "demo");
        let claims = claims_for("inv.yaml", 0, &specs[0], &engine).unwrap();
        assert_eq!(
            claims.namespace_labels()["kubernetes.io/metadata.name"],
            "demo"
        );
        assert_eq!(claims.labels()["role"], "web");
        assert_eq!(engine.workloads().count(), 1);
    }

    #[test]
    fn invalid_labels_name_the_workload() {
        let specs = inventory::parse(
            "inv.yaml",
            "workloads:\n  - {name: web-1, namespace: demo, pid: 1}\n  - {name: w, namespace: demo, labels: {'bad key!': x}, pid: 2}\n",
        )
        .unwrap();
        let e = format!(
            "{:#}",
            engine_from_inventory("inv.yaml", &specs).err().unwrap()
        );
        assert!(e.starts_with("inv.yaml: workloads[1]"), "{e}");
    }
}
