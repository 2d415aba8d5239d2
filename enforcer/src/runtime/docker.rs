//! The Docker runtime: the running containers of a Docker daemon (bollard), followed through
//! its event stream.
//!
//! On start, and again after every reconnect, it subscribes to the daemon's container events
//! (with `since` just before the list, so that nothing between list and watch is lost), lists
//! and inspects the running containers and sends one [`Event::Sync`]; then `start` becomes an
//! [`Event::Upsert`] (a restarted container has a new PID, so a new netns) and `die`/`destroy`
//! an [`Event::Remove`]. Events replayed for what the list already showed are de-duplicated.
//! A dropped stream or a daemon restart is retried with exponential backoff (100 ms to 5 s).
//!
//! What is enforced, and as what, is decided by the pure [`map_container`]: key = (namespace,
//! container name); host-network containers, containers sharing another's netns and the app
//! containers of Kubernetes pods (dockershim / cri-dockerd: their sandbox is the pod) are not.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Result, bail};
use bollard::Docker;
use bollard::errors::Error as DockerError;
use bollard::models::{ContainerInspectResponse, EventMessage};
use bollard::query_parameters::{EventsOptionsBuilder, ListContainersOptionsBuilder};
use futures_util::StreamExt;
use futures_util::stream::FuturesOrdered;
use policy::{ContainerPort, PodKey, Protocol};
use tokio::sync::{mpsc, watch};
use tracing::{debug, error, info, warn};

use super::{Desired, Event, NetnsRef, REQUIRE_ENCRYPTION, Sender, requires_encryption};

/// Label naming a container's named ports: `http=80,api=8080/TCP,dns=53/UDP`.
pub const PORTS_LABEL: &str = "tessera.dev/ports";
/// Default label carrying a container's namespace.
pub const DEFAULT_NAMESPACE_LABEL: &str = "tessera.dev/namespace";
/// Namespace of containers that carry no namespace label.
pub const DEFAULT_NAMESPACE: &str = "default";

const K8S_NAMESPACE: &str = "io.kubernetes.pod.namespace";
const K8S_POD_NAME: &str = "io.kubernetes.pod.name";
const K8S_DOCKER_TYPE: &str = "io.kubernetes.docker.type";
/// Labels with these prefixes are the runtime's bookkeeping, not the workload's identity.
const HIDDEN_LABEL_PREFIXES: [&str; 4] = [
    "com.docker.",
    "org.opencontainers.",
    "io.kubernetes.",
    "tessera.dev/",
];

const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Events read ahead of their handling (while the list is inspected, or while the agent is
/// busy). More than this waiting: the session resyncs instead (the daemon drops events for a
/// subscriber that stops reading, so blocking here could lose some silently).
const EVENT_BUFFER: usize = 1024;
/// How often a silent event stream is checked by pinging the daemon (a TCP daemon that
/// vanished without closing the connection).
const PING_EVERY: Duration = Duration::from_secs(30);
const PING_TIMEOUT: Duration = Duration::from_secs(10);
/// `since` is taken this much before the list: event times are the daemon's clock.
const SINCE_MARGIN: Duration = Duration::from_millis(100);

/// Where the Docker daemon is and what of it to enforce.
#[derive(Debug, Clone)]
pub struct DockerConfig {
    /// `unix:///var/run/docker.sock`, `tcp://HOST:PORT` or `http://HOST:PORT`.
    pub host: String,
    /// The label carrying a container's namespace (when `io.kubernetes.pod.namespace` is absent).
    pub namespace_label: String,
    /// Docker `label=` filters restricting what is enforced (`KEY` or `KEY=VALUE`, all must
    /// hold), e.g. `tessera.dev/enforce=true`; empty: every container.
    pub filters: Vec<String>,
    /// `--inventory FILE` beside the daemon: the node list (`nodes:` only), reloaded on change,
    /// for admin `nodes` peers and the tunnel between nodes (`--encrypt`).
    pub nodes: Option<std::path::PathBuf>,
}

impl Default for DockerConfig {
    fn default() -> Self {
        DockerConfig {
            host: "unix:///var/run/docker.sock".to_owned(),
            namespace_label: DEFAULT_NAMESPACE_LABEL.to_owned(),
            filters: Vec::new(),
            nodes: None,
        }
    }
}

/// Why a container is not enforced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Skip {
    /// No running process (exited, or created and never started): no netns to enforce.
    NotRunning,
    /// `NetworkMode: host`: it shares the node's netns.
    HostNetwork,
    /// `NetworkMode: container:<id>`: it shares that container's netns, enforced as that one.
    SharedNetns(String),
    /// An app container of a Kubernetes pod (`io.kubernetes.docker.type=container`): the pod is
    /// its sandbox container, whose netns it shares.
    PodAppContainer,
    /// The inspect response has no id or name.
    Unnamed,
    /// The namespace label's value is not a namespace name (DNS-1123 label): enforcing it in
    /// another namespace would apply the wrong policies.
    InvalidNamespace {
        label: String,
        value: String,
        reason: String,
    },
}

impl fmt::Display for Skip {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Skip::NotRunning => f.write_str("not running (no PID)"),
            Skip::HostNetwork => f.write_str("host network: it shares the node's netns"),
            Skip::SharedNetns(mode) => write!(
                f,
                "NetworkMode {mode}: it shares that container's netns, enforced as that one"
            ),
            Skip::PodAppContainer => f.write_str(
                "app container of a Kubernetes pod: enforced as its pod's sandbox, whose netns it shares",
            ),
            Skip::Unnamed => f.write_str("inspect gave no id or name"),
            Skip::InvalidNamespace {
                label,
                value,
                reason,
            } => write!(f, "label {label}={value:?} is not a namespace name: {reason}"),
        }
    }
}

/// Something wrong with a container that is enforced all the same.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Note {
    /// A label that is not a valid Kubernetes label: dropped from the identity.
    InvalidLabel { key: String, reason: String },
    /// The ports label is malformed: none of its ports are used.
    BadPorts { item: String, reason: String },
    /// The container's name is not a valid workload name (Docker's generated names have '_'):
    /// the workload is named `name` instead (the name made valid, plus the short id, so it
    /// cannot collide with another container's).
    Renamed { name: String, reason: String },
    /// The [`REQUIRE_ENCRYPTION`] label's value is neither `true` nor `false`: taken as `true`.
    RequireEncryption(String),
}

/// What [`map_container`] decided (short-lived: one per inspect, so not boxed).
#[derive(Debug, Clone, PartialEq, Eq)]
#[allow(clippy::large_enum_variant)]
pub enum Mapping {
    Enforce { desired: Desired, notes: Vec<Note> },
    Skip(Skip),
}

impl Mapping {
    /// The workload, when enforced.
    #[cfg(test)]
    pub fn desired(self) -> Option<Desired> {
        match self {
            Mapping::Enforce { desired, .. } => Some(desired),
            Mapping::Skip(_) => None,
        }
    }
}

/// Maps an inspected container to what should be enforced. Pure: `started_at` is the start
/// event's time (None for listed containers).
pub fn map_container(
    c: &ContainerInspectResponse,
    namespace_label: &str,
    started_at: Option<SystemTime>,
) -> Mapping {
    let (Some(id), Some(name)) = (c.id.as_deref(), c.name.as_deref()) else {
        return Mapping::Skip(Skip::Unnamed);
    };
    let name = name.trim_start_matches('/');
    if id.is_empty() || name.is_empty() {
        return Mapping::Skip(Skip::Unnamed);
    }
    let empty = HashMap::new();
    let labels = c
        .config
        .as_ref()
        .and_then(|cfg| cfg.labels.as_ref())
        .unwrap_or(&empty);
    let network_mode = c
        .host_config
        .as_ref()
        .and_then(|h| h.network_mode.as_deref())
        .unwrap_or_default();
    if network_mode == "host" {
        return Mapping::Skip(Skip::HostNetwork);
    }
    if network_mode.starts_with("container:") {
        return Mapping::Skip(Skip::SharedNetns(network_mode.to_owned()));
    }
    let docker_type = labels.get(K8S_DOCKER_TYPE).map(String::as_str);
    if docker_type == Some("container") {
        return Mapping::Skip(Skip::PodAppContainer);
    }
    let pid = c
        .state
        .as_ref()
        .and_then(|s| s.pid)
        .and_then(|p| u32::try_from(p).ok())
        .filter(|p| *p > 0);
    let Some(pid) = pid else {
        return Mapping::Skip(Skip::NotRunning);
    };

    let namespace = [K8S_NAMESPACE, namespace_label]
        .into_iter()
        .find_map(|l| labels.get(l).filter(|v| !v.is_empty()).map(|v| (l, v)));
    let namespace = match namespace {
        Some((label, value)) => {
            if let Err(e) =
                identity::Claims::new(value.as_str(), "x", BTreeMap::new(), BTreeMap::new())
            {
                return Mapping::Skip(Skip::InvalidNamespace {
                    label: label.to_owned(),
                    value: value.clone(),
                    reason: e.to_string(),
                });
            }
            value.as_str()
        }
        None => DEFAULT_NAMESPACE,
    };
    let mut notes = Vec::new();
    let workload = match (docker_type, labels.get(K8S_POD_NAME)) {
        (Some("podsandbox"), Some(pod)) if !pod.is_empty() => pod.clone(),
        _ => match identity::Claims::new(DEFAULT_NAMESPACE, name, BTreeMap::new(), BTreeMap::new())
        {
            Ok(_) => name.to_owned(),
            Err(e) => {
                let valid = valid_name(name, id);
                notes.push(Note::Renamed {
                    name: valid.clone(),
                    reason: e.to_string(),
                });
                valid
            }
        },
    };
    let key = PodKey {
        namespace: namespace.to_owned(),
        name: workload,
    };

    let mut sorted: Vec<(&String, &String)> = labels.iter().collect();
    sorted.sort();
    let mut kept = BTreeMap::new();
    for (k, v) in sorted {
        if HIDDEN_LABEL_PREFIXES.iter().any(|p| k.starts_with(p)) {
            continue;
        }
        match check_label(k, v) {
            Ok(()) => {
                kept.insert(k.clone(), v.clone());
            }
            Err(reason) => notes.push(Note::InvalidLabel {
                key: k.clone(),
                reason,
            }),
        }
    }

    let (require_encryption, note) =
        requires_encryption(labels.get(REQUIRE_ENCRYPTION).map(String::as_str));
    notes.extend(note.map(Note::RequireEncryption));

    let mut ports = match labels.get(PORTS_LABEL) {
        Some(value) => match parse_ports_label(value) {
            Ok(p) => p,
            Err(note) => {
                notes.push(note);
                Vec::new()
            }
        },
        None => Vec::new(),
    };
    let exposed = c
        .config
        .as_ref()
        .and_then(|cfg| cfg.exposed_ports.as_deref())
        .unwrap_or_default();
    let mut exposed: Vec<ContainerPort> = exposed.iter().filter_map(|e| exposed_port(e)).collect();
    exposed.sort_by_key(|p| (p.port, protocol_rank(p.protocol)));
    for p in exposed {
        if !ports
            .iter()
            .any(|q| q.port == p.port && q.protocol == p.protocol)
        {
            ports.push(p);
        }
    }

    let mut ips: Vec<IpAddr> = c
        .network_settings
        .as_ref()
        .and_then(|n| n.networks.as_ref())
        .into_iter()
        .flat_map(|nets| nets.values())
        .flat_map(|ep| [ep.ip_address.as_deref(), ep.global_ipv6_address.as_deref()])
        .flatten()
        .filter_map(|s| s.parse().ok())
        .collect();
    ips.sort();
    ips.dedup();

    let short = short_id(id);
    Mapping::Enforce {
        desired: Desired {
            key,
            labels: kept,
            namespace_labels: None,
            ports,
            ips,
            netns: NetnsRef::Pid(pid),
            origin: format!("docker container {short} ({name})"),
            started_at,
            require_encryption,
        },
        notes,
    }
}

/// A container id as Docker shows it: its first 12 characters (all of it if shorter).
fn short_id(id: &str) -> &str {
    id.get(..12).unwrap_or(id)
}

/// A valid workload name for a container whose name is not one: lower case, every run of
/// other characters than `[a-z0-9]` made one '-', at most 40 characters, then '-' and the
/// short id (unique: no two containers share it).
fn valid_name(name: &str, id: &str) -> String {
    let mut out = String::with_capacity(name.len().min(40) + 13);
    for c in name.chars().flat_map(char::to_lowercase) {
        if out.len() >= 40 {
            break;
        }
        if c.is_ascii_lowercase() || c.is_ascii_digit() {
            out.push(c);
        } else if !out.is_empty() && !out.ends_with('-') {
            out.push('-');
        }
    }
    let out = out.trim_end_matches('-');
    let short: String = id
        .chars()
        .filter(|c| c.is_ascii_hexdigit())
        .flat_map(char::to_lowercase)
        .take(12)
        .collect();
    match (out.is_empty(), short.is_empty()) {
        (true, true) => "container".to_owned(),
        (true, false) => format!("container-{short}"),
        (false, true) => out.to_owned(),
        (false, false) => format!("{out}-{short}"),
    }
}

/// The policy crate's label rules, through the only public door it has: a one-label workload
/// offered to a scratch engine (its error names the rule that failed).
fn check_label(key: &str, value: &str) -> std::result::Result<(), String> {
    let w = policy::Workload {
        key: PodKey {
            namespace: "x".to_owned(),
            name: "x".to_owned(),
        },
        labels: BTreeMap::from([(key.to_owned(), value.to_owned())]),
        ports: Vec::new(),
        ips: Vec::new(),
        host_network: false,
    };
    policy::Engine::new()
        .apply_workload(w)
        .map_err(|e| e.message)
}

/// Port names checked by the policy crate's rules, the same way.
fn check_port_names(ports: &[ContainerPort]) -> std::result::Result<(), (usize, String)> {
    let w = policy::Workload {
        key: PodKey {
            namespace: "x".to_owned(),
            name: "x".to_owned(),
        },
        labels: BTreeMap::new(),
        ports: ports.to_vec(),
        ips: Vec::new(),
        host_network: false,
    };
    policy::Engine::new().apply_workload(w).map_err(|e| {
        // field is `ports[i].name`
        let i = e
            .field
            .strip_prefix("ports[")
            .and_then(|r| r.split(']').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0);
        (i, e.message)
    })
}

/// Parses the ports label: comma-separated `name=port[/protocol]` (protocol TCP, UDP or SCTP,
/// any case; TCP when absent). Names must be unique IANA service names.
pub fn parse_ports_label(value: &str) -> std::result::Result<Vec<ContainerPort>, Note> {
    let bad = |item: &str, reason: &str| Note::BadPorts {
        item: item.to_owned(),
        reason: reason.to_owned(),
    };
    let mut ports: Vec<ContainerPort> = Vec::new();
    let items: Vec<&str> = value
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect();
    for item in &items {
        let Some((name, rest)) = item.split_once('=') else {
            return Err(bad(item, "expected name=port[/protocol]"));
        };
        let name = name.trim();
        let (port, proto) = match rest.trim().split_once('/') {
            Some((p, proto)) => (p, Some(proto)),
            None => (rest.trim(), None),
        };
        let port: u16 = match port.parse() {
            Ok(p) if p > 0 => p,
            _ => return Err(bad(item, "port must be a number from 1 to 65535")),
        };
        let protocol = match proto.map(str::to_ascii_uppercase).as_deref() {
            None | Some("TCP") => Protocol::Tcp,
            Some("UDP") => Protocol::Udp,
            Some("SCTP") => Protocol::Sctp,
            Some(_) => return Err(bad(item, "protocol must be TCP, UDP or SCTP")),
        };
        if ports.iter().any(|p| p.name.as_deref() == Some(name)) {
            return Err(bad(item, "duplicate port name"));
        }
        ports.push(ContainerPort {
            name: Some(name.to_owned()),
            port,
            protocol,
        });
    }
    if let Err((i, reason)) = check_port_names(&ports) {
        let item = items.get(i).copied().unwrap_or(value);
        return Err(bad(item, &reason));
    }
    Ok(ports)
}

/// `80/tcp` from Config.ExposedPorts.
fn exposed_port(s: &str) -> Option<ContainerPort> {
    let (port, proto) = s.split_once('/').unwrap_or((s, "tcp"));
    let protocol = match proto {
        "tcp" => Protocol::Tcp,
        "udp" => Protocol::Udp,
        "sctp" => Protocol::Sctp,
        _ => return None,
    };
    // A range ("8000-8010/tcp") names no single port: not a container port.
    let port: u16 = port.parse().ok().filter(|p| *p > 0)?;
    Some(ContainerPort {
        name: None,
        port,
        protocol,
    })
}

fn protocol_rank(p: Protocol) -> u8 {
    match p {
        Protocol::Tcp => 0,
        Protocol::Udp => 1,
        Protocol::Sctp => 2,
        Protocol::Other(n) => 3u8.saturating_add(n),
    }
}

/// An event's action without its suffix (`exec_start: /bin/true` → `exec_start`).
pub fn event_action(e: &EventMessage) -> &str {
    e.action
        .as_deref()
        .and_then(|a| a.split(':').next())
        .unwrap_or_default()
        .trim()
}

/// When the daemon says the event happened (`timeNano`, else `time`).
pub fn event_time(e: &EventMessage) -> Option<SystemTime> {
    if let Some(n) = e.time_nano.and_then(|n| u64::try_from(n).ok())
        && n > 0
    {
        return UNIX_EPOCH.checked_add(Duration::from_nanos(n));
    }
    let s = e
        .time
        .and_then(|s| u64::try_from(s).ok())
        .filter(|s| *s > 0)?;
    UNIX_EPOCH.checked_add(Duration::from_secs(s))
}

/// Checks what retrying cannot fix: the URL's scheme and the filters.
fn check_config(cfg: &DockerConfig) -> Result<()> {
    let supported = ["unix://", "tcp://", "http://"];
    if !supported.iter().any(|s| cfg.host.starts_with(s)) {
        bail!(
            "docker host {:?}: unsupported scheme (expected unix://PATH, tcp://HOST:PORT or http://HOST:PORT)",
            cfg.host
        );
    }
    if cfg.host.starts_with("unix://") && cfg.host.len() == "unix://".len() {
        bail!("docker host {:?}: no socket path", cfg.host);
    }
    for (i, f) in cfg.filters.iter().enumerate() {
        let key = f.split_once('=').map_or(f.as_str(), |(k, _)| k);
        if key.trim().is_empty() {
            bail!("docker filters[{i}] {f:?}: expected KEY or KEY=VALUE (a label filter)");
        }
    }
    if cfg.namespace_label.is_empty() {
        bail!("docker namespace label: must not be empty");
    }
    Ok(())
}

/// Connects (a Unix socket that is not there yet is retried) and negotiates the API version.
async fn connect(host: &str) -> std::result::Result<Docker, Lost> {
    let docker = match Docker::connect_with_host(host) {
        Ok(d) => d,
        Err(e @ DockerError::SocketNotFoundError(_)) => return Err(Lost::retry(e)),
        Err(e) => return Err(Lost::Fatal(anyhow::anyhow!("docker host {host:?}: {e}"))),
    };
    docker.negotiate_version().await.map_err(Lost::retry)
}

/// Why a session with the daemon ended.
#[derive(Debug)]
enum Lost {
    /// The daemon is unreachable or the stream broke: reconnect.
    Retry(String),
    /// The agent dropped its receiver: nothing to do any more.
    AgentGone,
    /// Retrying cannot fix this.
    Fatal(anyhow::Error),
}

impl Lost {
    fn retry(e: impl fmt::Display) -> Lost {
        Lost::Retry(e.to_string())
    }
}

/// What the session knows is enforced: container id → (key, pid).
type Known = HashMap<String, (PodKey, u32)>;

/// Runs the Docker runtime until `stop` turns true (Ok) or an error that retrying cannot fix
/// (bad host URL or filters).
pub async fn run(cfg: DockerConfig, tx: Sender, mut stop: watch::Receiver<bool>) -> Result<()> {
    check_config(&cfg)?;
    let mut backoff = BACKOFF_MIN;
    // Whether the last attempt failed (to log a state change once, not every retry).
    let mut down = false;
    loop {
        if *stop.borrow() {
            return Ok(());
        }
        let mut up = false;
        let ended = tokio::select! {
            e = session(&cfg, &tx, &mut up, down) => e,
            () = stopped(&mut stop) => return Ok(()),
        };
        match ended {
            Lost::AgentGone => {
                debug!("docker runtime: the agent stopped listening");
                return Ok(());
            }
            Lost::Fatal(e) => return Err(e),
            Lost::Retry(why) => {
                if up {
                    backoff = BACKOFF_MIN;
                    warn!(host = %cfg.host, "docker: lost the daemon ({why}); reconnecting");
                } else if !down {
                    warn!(host = %cfg.host, "docker: cannot reach the daemon ({why}); retrying");
                } else {
                    debug!(host = %cfg.host, backoff_ms = backoff.as_millis() as u64, "docker: still unreachable ({why})");
                }
                down = true;
            }
        }
        tokio::select! {
            () = tokio::time::sleep(backoff) => {}
            () = stopped(&mut stop) => return Ok(()),
        }
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

/// Resolves when stop is true or its sender is gone.
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// Aborts the event pump when the session ends.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// One connection: subscribe, list, sync, then follow events until something breaks.
async fn session(cfg: &DockerConfig, tx: &Sender, up: &mut bool, was_down: bool) -> Lost {
    let docker = match connect(&cfg.host).await {
        Ok(d) => d,
        Err(e) => return e,
    };
    let since = SystemTime::now()
        .checked_sub(SINCE_MARGIN)
        .unwrap_or(UNIX_EPOCH)
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let since = format!("{}.{:09}", since.as_secs(), since.subsec_nanos());
    let mut event_filters: HashMap<String, Vec<String>> = HashMap::from([
        ("type".to_owned(), vec!["container".to_owned()]),
        (
            "event".to_owned(),
            ["start", "die", "destroy", "pause", "unpause"]
                .map(str::to_owned)
                .to_vec(),
        ),
    ]);
    // Paused containers keep their netns: they stay enforced (values of one filter are ORed).
    let mut list_filters: HashMap<String, Vec<String>> = HashMap::from([(
        "status".to_owned(),
        vec!["running".to_owned(), "paused".to_owned()],
    )]);
    if !cfg.filters.is_empty() {
        event_filters.insert("label".to_owned(), cfg.filters.clone());
        list_filters.insert("label".to_owned(), cfg.filters.clone());
    }

    // Subscribe first: the pump reads events into a buffer while the list is inspected.
    let (etx, mut erx) = mpsc::channel(EVENT_BUFFER);
    let events = docker.events(Some(
        EventsOptionsBuilder::new()
            .since(&since)
            .filters(&event_filters)
            .build(),
    ));
    let overflow = Arc::new(AtomicBool::new(false));
    let overflowed = overflow.clone();
    let _pump = AbortOnDrop(tokio::spawn(async move {
        let mut events = std::pin::pin!(events);
        while let Some(item) = events.next().await {
            let end = item.is_err();
            match etx.try_send(item) {
                Ok(()) if !end => {}
                Ok(()) | Err(mpsc::error::TrySendError::Closed(_)) => break,
                Err(mpsc::error::TrySendError::Full(_)) => {
                    overflowed.store(true, Ordering::Relaxed);
                    break;
                }
            }
        }
    }));

    let listed = match docker
        .list_containers(Some(
            ListContainersOptionsBuilder::new()
                .filters(&list_filters)
                .build(),
        ))
        .await
    {
        Ok(l) => l,
        Err(e) => return Lost::retry(format!("listing containers: {e}")),
    };
    let mut known = Known::new();
    let mut all = Vec::new();
    for summary in listed {
        let Some(id) = summary.id else { continue };
        match inspect(&docker, &id, &cfg.namespace_label, None).await {
            Ok(Some(d)) => {
                if let NetnsRef::Pid(pid) = d.netns {
                    known.insert(id, (d.key.clone(), pid));
                }
                all.push(d);
            }
            Ok(None) => {}
            Err(e) => return e,
        }
    }
    let count = all.len();
    if tx.send(Event::Sync(all)).await.is_err() {
        return Lost::AgentGone;
    }
    *up = true;
    let version = docker.client_version();
    if was_down {
        info!(host = %cfg.host, api = %version, containers = count, "docker: reconnected and resynced");
    } else {
        info!(host = %cfg.host, api = %version, containers = count, "docker: connected and synced");
    }

    let mut ping = tokio::time::interval(PING_EVERY);
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ping.tick().await;
    // Events are taken in order, and their effects applied in that order, but the inspections
    // of the containers they name run side by side: when several containers start at once,
    // the last one's `start` does not wait for the daemon to answer about each before it.
    let mut pending = FuturesOrdered::new();
    loop {
        let next = tokio::select! {
            next = erx.recv(), if pending.len() < INSPECTS_IN_FLIGHT => next,
            Some(step) = pending.next(), if !pending.is_empty() => {
                match step {
                    Ok(step) => {
                        if let Err(e) = apply_step(tx, &mut known, step).await {
                            return e;
                        }
                    }
                    Err(e) => return e,
                }
                continue;
            }
            _ = ping.tick() => {
                match tokio::time::timeout(PING_TIMEOUT, docker.ping()).await {
                    Ok(Ok(_)) => continue,
                    Ok(Err(e)) => return Lost::retry(format!("ping: {e}")),
                    Err(_) => return Lost::retry(format!("ping: no answer within {PING_TIMEOUT:?}")),
                }
            }
        };
        let ev = match next {
            Some(Ok(ev)) => ev,
            Some(Err(e)) => return Lost::retry(format!("event stream: {e}")),
            None if overflow.load(Ordering::Relaxed) => {
                return Lost::retry(format!(
                    "more than {EVENT_BUFFER} events waiting: resyncing from a fresh list"
                ));
            }
            None => return Lost::retry("event stream ended"),
        };
        pending.push_back(prepare_step(
            docker.clone(),
            cfg.namespace_label.clone(),
            ev,
        ));
    }
}

/// How many containers the event loop inspects at once.
const INSPECTS_IN_FLIGHT: usize = 16;

/// Inspects one container and maps it, logging why it is skipped and what was dropped.
/// `Ok(None)`: not enforced, or gone already (its die/destroy follows).
async fn inspect(
    docker: &Docker,
    id: &str,
    namespace_label: &str,
    started_at: Option<SystemTime>,
) -> std::result::Result<Option<Desired>, Lost> {
    let c = match docker.inspect_container(id, None).await {
        Ok(c) => c,
        Err(DockerError::DockerResponseServerError {
            status_code: 404, ..
        }) => {
            debug!(
                container = id,
                "docker: container gone before it was inspected"
            );
            return Ok(None);
        }
        Err(e) => return Err(Lost::retry(format!("inspecting container {id}: {e}"))),
    };
    let name = c
        .name
        .as_deref()
        .unwrap_or_default()
        .trim_start_matches('/');
    let short = short_id(id);
    match map_container(&c, namespace_label, started_at) {
        Mapping::Skip(why @ Skip::InvalidNamespace { .. }) => {
            error!(container = short, name, "docker: not enforced: {why}");
            Ok(None)
        }
        Mapping::Skip(Skip::HostNetwork) => {
            info!(
                container = short,
                name,
                "docker: not enforced: {}",
                Skip::HostNetwork
            );
            Ok(None)
        }
        Mapping::Skip(why) => {
            debug!(container = short, name, "docker: not enforced: {why}");
            Ok(None)
        }
        Mapping::Enforce { desired, notes } => {
            for n in notes {
                match n {
                    Note::InvalidLabel { key, reason } => warn!(
                        container = short,
                        name,
                        label = key,
                        "docker: label dropped (not a valid Kubernetes label): {reason}"
                    ),
                    Note::Renamed {
                        name: valid,
                        reason,
                    } => warn!(
                        container = short,
                        name,
                        workload = valid,
                        "docker: the container's name is not a valid workload name ({reason}): enforced as {valid}"
                    ),
                    Note::BadPorts { item, reason } => error!(
                        container = short,
                        name,
                        label = PORTS_LABEL,
                        item,
                        "docker: ports label ignored (the container is enforced without its named ports): {reason}"
                    ),
                    Note::RequireEncryption(note) => {
                        warn!(container = short, name, "docker: {note}")
                    }
                }
            }
            Ok(Some(desired))
        }
    }
}

/// What a start (or unpause) of container `id`, inspected and mapped as `mapped`, changes:
/// nothing for what is already enforced with the same key and netns (events replayed after a
/// list), an upsert for a new or restarted container (after a remove of its old key if it
/// was renamed), a remove for a known container that is not to be enforced any more.
fn on_start(known: &mut Known, id: &str, mapped: Option<Desired>) -> Vec<Event> {
    let Some(d) = mapped else {
        return known
            .remove(id)
            .map(|(key, _)| Event::Remove(key))
            .into_iter()
            .collect();
    };
    let NetnsRef::Pid(pid) = d.netns else {
        return Vec::new();
    };
    let entry = (d.key.clone(), pid);
    let mut events = Vec::new();
    match known.get(id) {
        Some(k) if *k == entry => return events,
        Some((old, _)) if *old != d.key => events.push(Event::Remove(old.clone())),
        _ => {}
    }
    known.insert(id.to_owned(), entry);
    events.push(Event::Upsert(d));
    events
}

/// A die or destroy: forget the container if it was enforced (once: destroy follows die).
fn on_gone(known: &mut Known, id: &str) -> Option<Event> {
    known.remove(id).map(|(key, _)| Event::Remove(key))
}

/// One event, with what the daemon said about its container: applied to the session's state in
/// the events' order by [`apply_step`].
enum Step {
    /// A start or unpause, inspected and mapped.
    Started {
        id: String,
        action: String,
        mapped: Option<Box<Desired>>,
    },
    /// A die or destroy.
    Gone { id: String, action: String },
    /// Nothing to do.
    Ignored,
}

/// What an event needs from the daemon (the inspection of a started container), without
/// touching the session's state.
async fn prepare_step(
    docker: Docker,
    namespace_label: String,
    ev: EventMessage,
) -> std::result::Result<Step, Lost> {
    let Some(id) = ev.actor.as_ref().and_then(|a| a.id.clone()) else {
        return Ok(Step::Ignored);
    };
    let short = short_id(&id);
    Ok(match event_action(&ev) {
        // An unpause changes nothing in enforcement (the netns stays); it is checked like a
        // start only in case the container was missed (paused across a resync).
        action @ ("start" | "unpause") => {
            let started_at = if action == "start" {
                event_time(&ev)
            } else {
                None
            };
            let mapped = inspect(&docker, &id, &namespace_label, started_at)
                .await?
                .map(Box::new);
            Step::Started {
                action: action.to_owned(),
                id,
                mapped,
            }
        }
        action @ ("die" | "destroy") => Step::Gone {
            action: action.to_owned(),
            id,
        },
        "pause" => {
            debug!(
                container = short,
                "docker: pause: nothing changes (the netns stays)"
            );
            Step::Ignored
        }
        other => {
            debug!(container = short, action = other, "docker: event ignored");
            Step::Ignored
        }
    })
}

/// Apply one [`Step`] to what the session knows, and send the agent what changed.
async fn apply_step(tx: &Sender, known: &mut Known, step: Step) -> std::result::Result<(), Lost> {
    let send = |e: Event| async move { tx.send(e).await.map_err(|_| Lost::AgentGone) };
    match step {
        Step::Started { id, action, mapped } => {
            let short = short_id(&id);
            let events = on_start(known, &id, mapped.map(|d| *d));
            if events.is_empty() {
                debug!(container = short, "docker: {action}: nothing new");
            }
            for e in events {
                if let Event::Upsert(d) = &e {
                    debug!(container = short, key = %d.key, "docker: {action}: enforce");
                }
                send(e).await?;
            }
        }
        Step::Gone { id, action } => {
            if let Some(e) = on_gone(known, &id) {
                debug!(container = short_id(&id), "docker: {action}: forget");
                send(e).await?;
            }
        }
        Step::Ignored => {}
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use bollard::models::{
        ContainerConfig, ContainerState, EndpointSettings, HostConfig, NetworkSettings,
    };

    fn container(name: &str, labels: &[(&str, &str)]) -> ContainerInspectResponse {
        ContainerInspectResponse {
            id: Some("3f2a9c0d1e2b3f2a9c0d1e2b".to_owned()),
            name: Some(format!("/{name}")),
            state: Some(ContainerState {
                pid: Some(4242),
                running: Some(true),
                ..Default::default()
            }),
            config: Some(ContainerConfig {
                labels: Some(
                    labels
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect(),
                ),
                ..Default::default()
            }),
            host_config: Some(HostConfig {
                network_mode: Some("bridge".to_owned()),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn enforce(c: &ContainerInspectResponse) -> (Desired, Vec<Note>) {
        match map_container(c, DEFAULT_NAMESPACE_LABEL, None) {
            Mapping::Enforce { desired, notes } => (desired, notes),
            Mapping::Skip(s) => panic!("skipped: {s}"),
        }
    }

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn a_plain_container_is_keyed_by_its_name_in_the_default_namespace() {
        let (d, notes) = enforce(&container("web-1", &[("app", "web")]));
        assert_eq!(
            d.key,
            PodKey {
                namespace: "default".into(),
                name: "web-1".into()
            }
        );
        assert_eq!(d.labels, labels(&[("app", "web")]));
        assert_eq!(d.netns, NetnsRef::Pid(4242));
        assert_eq!(d.origin, "docker container 3f2a9c0d1e2b (web-1)");
        assert_eq!(d.namespace_labels, None);
        assert!(notes.is_empty());
    }

    #[test]
    fn runtime_labels_are_not_part_of_the_identity() {
        let (d, _) = enforce(&container(
            "web",
            &[
                ("app", "web"),
                ("com.docker.compose.project", "shop"),
                ("org.opencontainers.image.version", "1.2"),
                ("io.kubernetes.container.name", "web"),
                ("tessera.dev/enforce", "true"),
                ("tessera.dev/ports", "http=80"),
            ],
        ));
        assert_eq!(d.labels, labels(&[("app", "web")]));
    }

    #[test]
    fn invalid_labels_are_dropped_and_named() {
        let (d, notes) = enforce(&container(
            "web",
            &[
                ("app", "web"),
                ("tier", "has space"),
                ("Bad_Prefix.com/x", "1"),
                ("maintainer", "me@example.com"),
                ("empty", ""),
            ],
        ));
        assert_eq!(d.labels, labels(&[("app", "web"), ("empty", "")]));
        let dropped: Vec<&str> = notes
            .iter()
            .map(|n| match n {
                Note::InvalidLabel { key, .. } => key.as_str(),
                Note::BadPorts { .. } | Note::Renamed { .. } | Note::RequireEncryption(_) => {
                    panic!("{n:?}")
                }
            })
            .collect();
        assert_eq!(dropped, ["Bad_Prefix.com/x", "maintainer", "tier"]);
    }

    #[test]
    fn namespace_comes_from_kubernetes_then_the_configured_label() {
        let (d, _) = enforce(&container(
            "web",
            &[
                ("io.kubernetes.pod.namespace", "shop"),
                ("tessera.dev/namespace", "other"),
            ],
        ));
        assert_eq!(d.key.namespace, "shop");
        let (d, _) = enforce(&container("web", &[("tessera.dev/namespace", "other")]));
        assert_eq!(d.key.namespace, "other");
        let c = container("web", &[("team", "blue")]);
        let d = map_container(&c, "team", None).desired().unwrap();
        assert_eq!(d.key.namespace, "blue");
    }

    #[test]
    fn an_invalid_name_is_made_valid_and_unique_with_the_short_id() {
        let (d, notes) = enforce(&container("festive_hopper", &[("app", "web")]));
        assert_eq!(d.key.name, "festive-hopper-3f2a9c0d1e2b");
        assert!(
            matches!(notes.as_slice(), [Note::Renamed { name, .. }] if name == "festive-hopper-3f2a9c0d1e2b"),
            "{notes:?}"
        );
        assert_eq!(
            valid_name("Web.__x_", "ABCDEF0123456789"),
            "web-x-abcdef012345"
        );
        assert_eq!(valid_name("__", "abc"), "container-abc");
        let long = "a".repeat(100);
        let n = valid_name(&long, "0123456789abcdef");
        assert_eq!(n, format!("{}-0123456789ab", "a".repeat(40)));
        // A valid name is kept as it is.
        let (d, notes) = enforce(&container("web.v2-1", &[]));
        assert_eq!(d.key.name, "web.v2-1");
        assert!(notes.is_empty());
    }

    #[test]
    fn an_invalid_namespace_label_is_not_enforced_elsewhere() {
        let c = container("web", &[("tessera.dev/namespace", "Shop_1")]);
        match map_container(&c, DEFAULT_NAMESPACE_LABEL, None) {
            Mapping::Skip(Skip::InvalidNamespace { label, value, .. }) => {
                assert_eq!(label, "tessera.dev/namespace");
                assert_eq!(value, "Shop_1");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_kubernetes_sandbox_is_the_pod_and_its_app_containers_are_skipped() {
        let (d, _) = enforce(&container(
            "k8s_POD_web-7d9_shop_0a1b_0",
            &[
                ("io.kubernetes.docker.type", "podsandbox"),
                ("io.kubernetes.pod.name", "web-7d9"),
                ("io.kubernetes.pod.namespace", "shop"),
                ("app", "web"),
            ],
        ));
        assert_eq!(d.key.to_string(), "shop/web-7d9");
        assert_eq!(d.labels, labels(&[("app", "web")]));
        let app = container(
            "k8s_web_web-7d9_shop_0a1b_0",
            &[
                ("io.kubernetes.docker.type", "container"),
                ("io.kubernetes.pod.name", "web-7d9"),
            ],
        );
        assert_eq!(
            map_container(&app, DEFAULT_NAMESPACE_LABEL, None),
            Mapping::Skip(Skip::PodAppContainer)
        );
    }

    #[test]
    fn host_and_shared_netns_containers_are_skipped() {
        let mut c = container("web", &[]);
        c.host_config = Some(HostConfig {
            network_mode: Some("host".into()),
            ..Default::default()
        });
        assert_eq!(
            map_container(&c, DEFAULT_NAMESPACE_LABEL, None),
            Mapping::Skip(Skip::HostNetwork)
        );
        c.host_config = Some(HostConfig {
            network_mode: Some("container:3f2a9c".into()),
            ..Default::default()
        });
        assert_eq!(
            map_container(&c, DEFAULT_NAMESPACE_LABEL, None),
            Mapping::Skip(Skip::SharedNetns("container:3f2a9c".into()))
        );
    }

    #[test]
    fn a_container_without_a_process_is_skipped() {
        let mut c = container("web", &[]);
        c.state = Some(ContainerState {
            pid: Some(0),
            ..Default::default()
        });
        assert_eq!(
            map_container(&c, DEFAULT_NAMESPACE_LABEL, None),
            Mapping::Skip(Skip::NotRunning)
        );
        c.state = None;
        assert_eq!(
            map_container(&c, DEFAULT_NAMESPACE_LABEL, None),
            Mapping::Skip(Skip::NotRunning)
        );
        c.name = None;
        assert_eq!(
            map_container(&c, DEFAULT_NAMESPACE_LABEL, None),
            Mapping::Skip(Skip::Unnamed)
        );
    }

    fn port(name: Option<&str>, port: u16, protocol: Protocol) -> ContainerPort {
        ContainerPort {
            name: name.map(str::to_owned),
            port,
            protocol,
        }
    }

    #[test]
    fn named_ports_come_from_the_label_and_unnamed_ones_from_exposed_ports() {
        let mut c = container(
            "web",
            &[("tessera.dev/ports", "http=80, api=8080/TCP,dns=53/udp,")],
        );
        if let Some(cfg) = c.config.as_mut() {
            cfg.exposed_ports = Some(vec![
                "80/tcp".into(),
                "9090/tcp".into(),
                "53/udp".into(),
                "7000-7001/tcp".into(),
            ]);
        }
        let (d, notes) = enforce(&c);
        assert!(notes.is_empty(), "{notes:?}");
        assert_eq!(
            d.ports,
            vec![
                port(Some("http"), 80, Protocol::Tcp),
                port(Some("api"), 8080, Protocol::Tcp),
                port(Some("dns"), 53, Protocol::Udp),
                port(None, 9090, Protocol::Tcp),
            ]
        );
    }

    #[test]
    fn a_bad_ports_label_is_named_and_the_container_still_enforced() {
        for (value, item) in [
            ("http=80,api", "api"),
            ("http=eighty", "http=eighty"),
            ("http=0", "http=0"),
            ("http=70000", "http=70000"),
            ("http=80/ICMP", "http=80/ICMP"),
            ("http=80,http=81", "http=81"),
            ("http=80,Not_A_Name=81", "Not_A_Name=81"),
            ("=80", "=80"),
        ] {
            let c = container("web", &[("app", "web"), ("tessera.dev/ports", value)]);
            let (d, notes) = enforce(&c);
            assert!(d.ports.is_empty(), "{value}: {:?}", d.ports);
            assert_eq!(d.labels, labels(&[("app", "web")]));
            match notes.as_slice() {
                [Note::BadPorts { item: i, .. }] => assert_eq!(i, item, "{value}"),
                other => panic!("{value}: {other:?}"),
            }
        }
    }

    #[test]
    fn addresses_come_from_every_network() {
        let mut c = container("web", &[]);
        c.network_settings = Some(NetworkSettings {
            networks: Some(HashMap::from([
                (
                    "bridge".to_owned(),
                    EndpointSettings {
                        ip_address: Some("172.17.0.2".into()),
                        global_ipv6_address: Some("fd00::2".into()),
                        ..Default::default()
                    },
                ),
                (
                    "back".to_owned(),
                    EndpointSettings {
                        ip_address: Some("10.1.0.5".into()),
                        global_ipv6_address: Some(String::new()),
                        ..Default::default()
                    },
                ),
                ("none".to_owned(), EndpointSettings::default()),
            ])),
            ..Default::default()
        });
        let (d, _) = enforce(&c);
        let want: Vec<IpAddr> = ["10.1.0.5", "172.17.0.2", "fd00::2"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        assert_eq!(d.ips, want);
    }

    #[test]
    fn start_time_and_action_come_from_the_event() {
        let ev = EventMessage {
            action: Some("exec_start: /bin/true ".into()),
            time: Some(1_700_000_000),
            time_nano: Some(1_700_000_000_123_456_789),
            ..Default::default()
        };
        assert_eq!(event_action(&ev), "exec_start");
        assert_eq!(
            event_time(&ev),
            Some(UNIX_EPOCH + Duration::from_nanos(1_700_000_000_123_456_789))
        );
        let ev = EventMessage {
            action: Some("start".into()),
            time: Some(1_700_000_000),
            ..Default::default()
        };
        assert_eq!(event_action(&ev), "start");
        assert_eq!(
            event_time(&ev),
            Some(UNIX_EPOCH + Duration::from_secs(1_700_000_000))
        );
        let c = container("web", &[]);
        let t = UNIX_EPOCH + Duration::from_secs(5);
        let d = map_container(&c, DEFAULT_NAMESPACE_LABEL, Some(t))
            .desired()
            .unwrap();
        assert_eq!(d.started_at, Some(t));
    }

    #[test]
    fn the_require_encryption_label_is_read_and_kept_out_of_the_identity() {
        let c = container("web", &[("app", "web"), (REQUIRE_ENCRYPTION, "true")]);
        let d = map_container(&c, DEFAULT_NAMESPACE_LABEL, None)
            .desired()
            .unwrap();
        assert!(d.require_encryption);
        assert_eq!(d.labels, labels(&[("app", "web")]));
        let plain = map_container(&container("web", &[]), DEFAULT_NAMESPACE_LABEL, None)
            .desired()
            .unwrap();
        assert!(!plain.require_encryption);
    }

    fn desired(name: &str, pid: i64) -> Desired {
        let mut c = container(name, &[("app", "web")]);
        if let Some(st) = c.state.as_mut() {
            st.pid = Some(pid);
        }
        map_container(&c, DEFAULT_NAMESPACE_LABEL, None)
            .desired()
            .unwrap()
    }

    fn key(name: &str) -> PodKey {
        PodKey {
            namespace: "default".into(),
            name: name.into(),
        }
    }

    #[test]
    fn replayed_starts_are_dropped_and_restarts_re_enforced() {
        let mut known = Known::new();
        // Listed at sync time.
        known.insert("c1".into(), (key("web"), 100));
        // Its start event, replayed after the list (same netns): nothing to send.
        assert_eq!(on_start(&mut known, "c1", Some(desired("web", 100))), []);
        // Restarted: a new process, so a new netns.
        let events = on_start(&mut known, "c1", Some(desired("web", 200)));
        assert_eq!(events, [Event::Upsert(desired("web", 200))]);
        // Renamed while we did not look: the old key goes first.
        let events = on_start(&mut known, "c1", Some(desired("front", 200)));
        assert_eq!(
            events,
            [
                Event::Remove(key("web")),
                Event::Upsert(desired("front", 200))
            ]
        );
        // Started again but not to be enforced any more (or gone before inspect): forgotten.
        assert_eq!(
            on_start(&mut known, "c1", None),
            [Event::Remove(key("front"))]
        );
        assert_eq!(on_start(&mut known, "c1", None), []);
    }

    #[test]
    fn die_then_destroy_removes_once_and_unknown_containers_not_at_all() {
        let mut known = Known::new();
        known.insert("c1".into(), (key("web"), 100));
        assert_eq!(on_gone(&mut known, "c1"), Some(Event::Remove(key("web"))));
        assert_eq!(on_gone(&mut known, "c1"), None);
        assert_eq!(on_gone(&mut known, "other"), None);
        assert!(known.is_empty());
    }

    #[test]
    fn bad_hosts_and_filters_are_refused_before_any_retry() {
        let cfg = |host: &str, filters: &[&str]| DockerConfig {
            host: host.into(),
            filters: filters.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        };
        assert!(check_config(&DockerConfig::default()).is_ok());
        assert!(check_config(&cfg("tcp://127.0.0.1:2375", &["tessera.dev/enforce=true"])).is_ok());
        let e = check_config(&cfg("ftp://x", &[])).unwrap_err().to_string();
        assert!(e.contains("ftp://x") && e.contains("scheme"), "{e}");
        assert!(check_config(&cfg("unix://", &[])).is_err());
        let e = check_config(&cfg("unix:///run/d.sock", &["a=b", "=x"]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("filters[1]"), "{e}");
    }

    #[tokio::test]
    async fn run_returns_an_error_for_a_bad_host_and_ok_on_stop() {
        let (tx, _rx) = mpsc::channel(4);
        let (_stop_tx, stop) = watch::channel(false);
        let cfg = DockerConfig {
            host: "ssh://nowhere".into(),
            ..Default::default()
        };
        assert!(run(cfg, tx.clone(), stop).await.is_err());

        // A socket that never appears: retried until stopped.
        let (stop_tx, stop) = watch::channel(false);
        let cfg = DockerConfig {
            host: "unix:///nonexistent/tessera-test/docker.sock".into(),
            ..Default::default()
        };
        let task = tokio::spawn(run(cfg, tx, stop));
        tokio::task::yield_now().await;
        stop_tx.send(true).unwrap();
        assert!(task.await.unwrap().is_ok());
    }
}
