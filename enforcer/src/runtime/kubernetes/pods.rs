//! This node's pods: what of a Pod is enforced ([`map_pod`], pure), and the state that turns
//! the pod watcher's events into the agent's [`Event`]s ([`Pods`]): a relist is buffered and
//! sent whole as one [`Event::Sync`] at its end; single changes between relists become
//! [`Event::Upsert`] / [`Event::Remove`]. A pod whose IP is in no network namespace yet (its
//! sandbox is still being set up) is retried with a bounded backoff until it is found or gone.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Container, Pod};
use kube::runtime::watcher;
use policy::{ContainerPort, PodKey, Protocol};
use tokio::time::Instant;
use tracing::{debug, error, info, warn};

use super::netns::{Found, Missing, NetnsFinder};
use crate::runtime::{Desired, Event, NetnsRef, REQUIRE_ENCRYPTION, requires_encryption};

/// Why a pod is not enforced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PodSkip {
    /// `spec.hostNetwork`: it shares the node's netns (never enforced).
    HostNetwork,
    /// Phase Succeeded or Failed: its containers are gone.
    Finished(String),
    /// No `status.podIP` yet: not running; a later change brings the IP.
    NoIp,
    /// No name or namespace in its metadata.
    Unnamed,
}

impl std::fmt::Display for PodSkip {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PodSkip::HostNetwork => {
                f.write_str("hostNetwork pod: it shares the node's netns, not enforced")
            }
            PodSkip::Finished(phase) => write!(f, "phase {phase}: not running"),
            PodSkip::NoIp => f.write_str("no pod IP yet"),
            PodSkip::Unnamed => f.write_str("no name or namespace"),
        }
    }
}

/// What should be enforced of a pod, but for its network namespace (looked up by IP).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodWant {
    pub key: PodKey,
    pub labels: BTreeMap<String, String>,
    pub ports: Vec<ContainerPort>,
    pub ips: Vec<IpAddr>,
    /// Its [`REQUIRE_ENCRYPTION`] annotation asks for encryption.
    pub require_encryption: bool,
    /// Fields dropped as malformed (`spec.containers[0].ports[1].protocol: ...`): logged.
    pub notes: Vec<String>,
}

impl PodWant {
    fn desired(&self, found: Found) -> Desired {
        Desired {
            key: self.key.clone(),
            labels: self.labels.clone(),
            namespace_labels: None,
            ports: self.ports.clone(),
            ips: self.ips.clone(),
            netns: NetnsRef::Pid(found.pid),
            origin: format!("pod {}", pod_name(&self.key)),
            started_at: None,
            require_encryption: self.require_encryption,
        }
    }
}

/// What [`map_pod`] decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PodMapping {
    Enforce(PodWant),
    Skip(PodSkip),
}

pub(crate) fn pod_name(key: &PodKey) -> String {
    format!("{}/{}", key.namespace, key.name)
}

/// The pod's key, if it has a name and namespace.
pub fn pod_key(p: &Pod) -> Option<PodKey> {
    let namespace = p.metadata.namespace.as_deref().filter(|s| !s.is_empty())?;
    let name = p.metadata.name.as_deref().filter(|s| !s.is_empty())?;
    Some(PodKey {
        namespace: namespace.to_owned(),
        name: name.to_owned(),
    })
}

/// Maps a Pod to what should be enforced. Pure.
pub fn map_pod(p: &Pod) -> PodMapping {
    let Some(key) = pod_key(p) else {
        return PodMapping::Skip(PodSkip::Unnamed);
    };
    let spec = p.spec.as_ref();
    if spec.and_then(|s| s.host_network).unwrap_or(false) {
        return PodMapping::Skip(PodSkip::HostNetwork);
    }
    let status = p.status.as_ref();
    if let Some(phase) = status.and_then(|s| s.phase.as_deref())
        && matches!(phase, "Succeeded" | "Failed")
    {
        return PodMapping::Skip(PodSkip::Finished(phase.to_owned()));
    }
    let mut notes = Vec::new();
    let mut raw: Vec<(String, &str)> = Vec::new();
    if let Some(s) = status {
        for (i, ip) in s.pod_ips.iter().flatten().enumerate() {
            raw.push((format!("status.podIPs[{i}].ip"), ip.ip.as_str()));
        }
        if let Some(ip) = &s.pod_ip {
            raw.push(("status.podIP".to_owned(), ip.as_str()));
        }
    }
    let mut ips: Vec<IpAddr> = Vec::new();
    for (field, text) in raw {
        match text.parse::<IpAddr>() {
            Ok(ip) => {
                if !ips.contains(&ip) {
                    ips.push(ip);
                }
            }
            Err(_) => notes.push(format!("{field}: {text:?} is not an IP address")),
        }
    }
    if ips.is_empty() {
        return PodMapping::Skip(PodSkip::NoIp);
    }
    let mut ports: Vec<ContainerPort> = Vec::new();
    if let Some(spec) = spec {
        let sidecars = spec
            .init_containers
            .iter()
            .flatten()
            .enumerate()
            .filter(|(_, c)| c.restart_policy.as_deref() == Some("Always"))
            .map(|(i, c)| (format!("spec.initContainers[{i}]"), c));
        let containers = spec
            .containers
            .iter()
            .enumerate()
            .map(|(i, c)| (format!("spec.containers[{i}]"), c));
        for (path, c) in containers.chain(sidecars) {
            container_ports(&path, c, &mut ports, &mut notes);
        }
    }
    let annotation = p
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(REQUIRE_ENCRYPTION));
    let (require_encryption, note) = requires_encryption(annotation.map(String::as_str));
    notes.extend(note);
    PodMapping::Enforce(PodWant {
        key,
        labels: p.metadata.labels.clone().unwrap_or_default(),
        ports,
        ips,
        require_encryption,
        notes,
    })
}

fn container_ports(
    path: &str,
    c: &Container,
    ports: &mut Vec<ContainerPort>,
    notes: &mut Vec<String>,
) {
    for (j, p) in c.ports.iter().flatten().enumerate() {
        let field = format!("{path}.ports[{j}]");
        let Some(port) = u16::try_from(p.container_port).ok().filter(|p| *p > 0) else {
            notes.push(format!(
                "{field}.containerPort: {} is not a port from 1 to 65535",
                p.container_port
            ));
            continue;
        };
        let protocol = match p.protocol.as_deref() {
            None | Some("TCP") => Protocol::Tcp,
            Some("UDP") => Protocol::Udp,
            Some("SCTP") => Protocol::Sctp,
            Some(other) => {
                notes.push(format!(
                    "{field}.protocol: {other:?} is not TCP, UDP or SCTP"
                ));
                continue;
            }
        };
        let name = p.name.clone().filter(|n| !n.is_empty());
        let cp = ContainerPort {
            name,
            port,
            protocol,
        };
        if !ports.contains(&cp) {
            ports.push(cp);
        }
    }
}

/// Retry delays for a pod whose namespace is not found yet.
const RETRY_MIN: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(5);
/// A pod still not found after this long gets a warning (once).
const WARN_AFTER: Duration = Duration::from_secs(60);

#[derive(Debug)]
struct Pending {
    want: PodWant,
    since: Instant,
    next: Instant,
    delay: Duration,
    warned: bool,
    last: Missing,
}

/// The pods of this node as the agent was told them.
pub struct Pods {
    finder: Arc<dyn NetnsFinder>,
    enforced: HashMap<PodKey, (Desired, Found)>,
    pending: HashMap<PodKey, Pending>,
    /// Why a pod is skipped (logged when it changes).
    skipped: HashMap<PodKey, PodSkip>,
    /// A relist in progress: its pods so far.
    relist: Option<Vec<Pod>>,
    /// Whether the first complete list was sent.
    synced: bool,
}

impl Pods {
    pub fn new(finder: Arc<dyn NetnsFinder>) -> Pods {
        Pods {
            finder,
            enforced: HashMap::new(),
            pending: HashMap::new(),
            skipped: HashMap::new(),
            relist: None,
            synced: false,
        }
    }

    /// Whether a complete list was sent to the agent.
    #[cfg(test)]
    pub fn synced(&self) -> bool {
        self.synced
    }

    /// The earliest retry of a pod whose namespace was not found.
    pub fn next_retry(&self) -> Option<Instant> {
        self.pending.values().map(|p| p.next).min()
    }

    async fn lookup(&self, ips: Vec<Vec<IpAddr>>) -> Vec<Result<Found, Missing>> {
        if ips.is_empty() {
            return Vec::new();
        }
        let finder = self.finder.clone();
        let n = ips.len();
        match tokio::task::spawn_blocking(move || finder.find(&ips)).await {
            Ok(r) if r.len() == n => r,
            Ok(_) => vec![Err(Missing::Proc("lookup returned a short answer".into())); n],
            Err(e) => vec![Err(Missing::Proc(format!("lookup thread: {e}"))); n],
        }
    }

    /// A pod's namespace that is already known and still valid for `want`.
    fn reusable(&self, want: &PodWant) -> Option<Found> {
        let (d, found) = self.enforced.get(&want.key)?;
        (d.ips == want.ips && self.finder.still_there(found)).then_some(*found)
    }

    fn note_skip(&mut self, key: &PodKey, why: PodSkip) {
        if self.skipped.get(key) != Some(&why) {
            match why {
                PodSkip::NoIp => debug!(pod = %pod_name(key), "pod not enforced yet: {why}"),
                _ => info!(pod = %pod_name(key), "pod not enforced: {why}"),
            }
            self.skipped.insert(key.clone(), why);
        }
    }

    fn note_pending(&mut self, want: PodWant, why: Missing, now: Instant) {
        let key = want.key.clone();
        match self.pending.get_mut(&key) {
            Some(p) => {
                p.want = want;
                p.last = why;
            }
            None => {
                match &why {
                    Missing::Ambiguous(_) => {
                        error!(pod = %pod_name(&key), ips = ?want.ips, "pod not enforced: {why}; retrying")
                    }
                    _ => {
                        info!(pod = %pod_name(&key), ips = ?want.ips, "pod's network namespace not found yet ({why}); retrying")
                    }
                }
                self.pending.insert(
                    key,
                    Pending {
                        want,
                        since: now,
                        next: now + RETRY_MIN,
                        delay: RETRY_MIN,
                        warned: false,
                        last: why,
                    },
                );
            }
        }
    }

    fn log_notes(want: &PodWant) {
        for n in &want.notes {
            warn!(pod = %pod_name(&want.key), "ignored: {n}");
        }
    }

    /// Applies one watcher event; the agent's events are appended to `out`.
    pub async fn handle(&mut self, ev: watcher::Event<Pod>, out: &mut Vec<Event>) {
        match ev {
            watcher::Event::Init => self.relist = Some(Vec::new()),
            watcher::Event::InitApply(p) => self.relist.get_or_insert_with(Vec::new).push(p),
            watcher::Event::InitDone => {
                let pods = self.relist.take().unwrap_or_default();
                self.resync(pods, out).await;
            }
            watcher::Event::Apply(p) => self.apply(&p, out).await,
            watcher::Event::Delete(p) => {
                if let Some(key) = pod_key(&p) {
                    self.forget(&key, out);
                    self.skipped.remove(&key);
                }
            }
        }
    }

    fn forget(&mut self, key: &PodKey, out: &mut Vec<Event>) {
        self.pending.remove(key);
        if self.enforced.remove(key).is_some() {
            out.push(Event::Remove(key.clone()));
        }
    }

    async fn apply(&mut self, p: &Pod, out: &mut Vec<Event>) {
        let Some(key) = pod_key(p) else { return };
        let want = match map_pod(p) {
            PodMapping::Skip(why) => {
                self.forget(&key, out);
                self.note_skip(&key, why);
                return;
            }
            PodMapping::Enforce(w) => w,
        };
        self.skipped.remove(&key);
        if self
            .enforced
            .get(&key)
            .is_none_or(|(d, _)| d.ips != want.ips)
        {
            Self::log_notes(&want);
        }
        let found = match self.reusable(&want) {
            Some(f) => Ok(f),
            None => self
                .lookup(vec![want.ips.clone()])
                .await
                .pop()
                .unwrap_or(Err(Missing::NotFound)),
        };
        self.settle(want, found, Instant::now(), out);
    }

    /// Records a lookup's result for one pod.
    fn settle(
        &mut self,
        want: PodWant,
        found: Result<Found, Missing>,
        now: Instant,
        out: &mut Vec<Event>,
    ) {
        let key = want.key.clone();
        match found {
            Ok(f) => {
                if let Some(p) = self.pending.remove(&key) {
                    info!(pod = %pod_name(&key), pid = f.pid, after_ms = now.duration_since(p.since).as_millis() as u64, "pod's network namespace found");
                }
                let d = want.desired(f);
                if self.enforced.get(&key).is_none_or(|(old, _)| *old != d) {
                    out.push(Event::Upsert(d.clone()));
                    self.enforced.insert(key, (d, f));
                }
            }
            Err(why) => {
                // Its old namespace (a previous IP) is no longer the pod's.
                if self.enforced.remove(&key).is_some() {
                    out.push(Event::Remove(key));
                }
                self.note_pending(want, why, now);
            }
        }
    }

    /// A complete list: enforce exactly these (one [`Event::Sync`]).
    async fn resync(&mut self, pods: Vec<Pod>, out: &mut Vec<Event>) {
        let mut wants = Vec::new();
        let mut skipped = HashMap::new();
        for p in &pods {
            let Some(key) = pod_key(p) else { continue };
            match map_pod(p) {
                PodMapping::Enforce(w) => wants.push(w),
                PodMapping::Skip(why) => {
                    skipped.insert(key, why);
                }
            }
        }
        for (key, why) in skipped {
            self.note_skip(&key, why);
        }
        let listed: std::collections::HashSet<PodKey> =
            wants.iter().map(|w| w.key.clone()).collect();
        self.skipped.retain(|k, _| !listed.contains(k));
        let mut results: Vec<Option<Result<Found, Missing>>> = Vec::new();
        let mut ask = Vec::new();
        for w in &wants {
            if !self.enforced.contains_key(&w.key) && !self.pending.contains_key(&w.key) {
                Self::log_notes(w);
            }
            match self.reusable(w) {
                Some(f) => results.push(Some(Ok(f))),
                None => {
                    results.push(None);
                    ask.push(w.ips.clone());
                }
            }
        }
        let mut answers = self.lookup(ask).await.into_iter();
        let now = Instant::now();
        let old_pending = std::mem::take(&mut self.pending);
        let mut enforced = HashMap::new();
        let mut list = Vec::new();
        for (w, r) in wants.into_iter().zip(results) {
            let r = r
                .or_else(|| answers.next())
                .unwrap_or(Err(Missing::NotFound));
            match r {
                Ok(f) => {
                    let d = w.desired(f);
                    list.push(d.clone());
                    enforced.insert(w.key, (d, f));
                }
                Err(why) => {
                    let key = w.key.clone();
                    match old_pending.get(&key) {
                        Some(p) => {
                            self.pending.insert(
                                key,
                                Pending {
                                    want: w,
                                    since: p.since,
                                    next: p.next,
                                    delay: p.delay,
                                    warned: p.warned,
                                    last: why,
                                },
                            );
                        }
                        None => self.note_pending(w, why, now),
                    }
                }
            }
        }
        list.sort_by(|a, b| a.key.cmp(&b.key));
        info!(
            enforced = list.len(),
            pending = self.pending.len(),
            skipped = self.skipped.len(),
            first = !self.synced,
            "pods of this node listed"
        );
        self.enforced = enforced;
        self.synced = true;
        out.push(Event::Sync(list));
    }

    /// Looks again for the pods whose namespace was not found and whose retry is due.
    pub async fn retry(&mut self, out: &mut Vec<Event>) {
        let now = Instant::now();
        let due: Vec<PodKey> = self
            .pending
            .iter()
            .filter(|(_, p)| p.next <= now)
            .map(|(k, _)| k.clone())
            .collect();
        if due.is_empty() {
            return;
        }
        let ips = due
            .iter()
            .filter_map(|k| self.pending.get(k).map(|p| p.want.ips.clone()))
            .collect();
        let answers = self.lookup(ips).await;
        let now = Instant::now();
        for (key, r) in due.into_iter().zip(answers) {
            match r {
                Ok(f) => {
                    if let Some(p) = self.pending.get(&key) {
                        let want = p.want.clone();
                        self.settle(want, Ok(f), now, out);
                    }
                }
                Err(why) => {
                    if let Some(p) = self.pending.get_mut(&key) {
                        p.delay = (p.delay * 2).min(RETRY_MAX);
                        p.next = now + p.delay;
                        if !p.warned && now.duration_since(p.since) >= WARN_AFTER {
                            p.warned = true;
                            warn!(pod = %pod_name(&key), ips = ?p.want.ips, "pod still not enforced after {}s: {why}", WARN_AFTER.as_secs());
                        }
                        p.last = why;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::sync::Mutex;

    fn pod(v: serde_json::Value) -> Pod {
        serde_json::from_value(v).unwrap()
    }

    fn web(name: &str, ip: &str) -> Pod {
        pod(json!({
            "metadata": {"namespace": "shop", "name": name, "labels": {"role": "web"}},
            "spec": {"nodeName": "node-1", "containers": [
                {"name": "c", "ports": [{"name": "http", "containerPort": 8080}, {"containerPort": 53, "protocol": "UDP"}]}
            ]},
            "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}
        }))
    }

    fn key(name: &str) -> PodKey {
        PodKey {
            namespace: "shop".into(),
            name: name.into(),
        }
    }

    #[test]
    fn running_pod_maps_to_labels_named_ports_and_ips() {
        let mut p = web("web-1", "10.1.0.5");
        p.status.as_mut().unwrap().pod_ips = Some(vec![
            serde_json::from_value(json!({"ip": "10.1.0.5"})).unwrap(),
            serde_json::from_value(json!({"ip": "fd00::5"})).unwrap(),
        ]);
        let PodMapping::Enforce(w) = map_pod(&p) else {
            panic!()
        };
        assert_eq!(w.key, key("web-1"));
        assert_eq!(w.labels, BTreeMap::from([("role".into(), "web".into())]));
        assert_eq!(
            w.ips,
            [
                "10.1.0.5".parse::<IpAddr>().unwrap(),
                "fd00::5".parse().unwrap()
            ]
        );
        assert_eq!(
            w.ports,
            [
                ContainerPort {
                    name: Some("http".into()),
                    port: 8080,
                    protocol: Protocol::Tcp
                },
                ContainerPort {
                    name: None,
                    port: 53,
                    protocol: Protocol::Udp
                }
            ]
        );
        assert!(w.notes.is_empty());
        let d = w.desired(Found { pid: 42, ino: 7 });
        assert_eq!(d.netns, NetnsRef::Pid(42));
        assert_eq!(d.origin, "pod shop/web-1");
        assert_eq!(d.namespace_labels, None);
        assert!(!d.require_encryption);
    }

    #[test]
    fn the_require_encryption_annotation_is_read_and_a_typo_requires_it() {
        for (value, want, noted) in [
            ("true", true, false),
            ("false", false, false),
            ("yes", true, true),
        ] {
            let mut p = web("web-1", "10.1.0.5");
            p.metadata.annotations = Some(BTreeMap::from([(
                REQUIRE_ENCRYPTION.to_owned(),
                value.to_owned(),
            )]));
            let PodMapping::Enforce(w) = map_pod(&p) else {
                panic!()
            };
            assert_eq!(w.require_encryption, want, "{value}");
            assert_eq!(!w.notes.is_empty(), noted, "{value}: {:?}", w.notes);
            assert_eq!(w.desired(Found { pid: 1, ino: 1 }).require_encryption, want);
        }
    }

    #[test]
    fn sidecar_ports_count_and_bad_ports_are_noted_not_fatal() {
        let p = pod(json!({
            "metadata": {"namespace": "shop", "name": "x"},
            "spec": {
                "containers": [{"name": "c", "ports": [
                    {"containerPort": 70000}, {"containerPort": 9, "protocol": "ICMP"}, {"name": "metrics", "containerPort": 9090}
                ]}],
                "initContainers": [
                    {"name": "once", "ports": [{"name": "init", "containerPort": 1}]},
                    {"name": "proxy", "restartPolicy": "Always", "ports": [{"name": "proxy", "containerPort": 15001}]}
                ]
            },
            "status": {"podIP": "10.1.0.9", "podIPs": [{"ip": "not-an-ip"}]}
        }));
        let PodMapping::Enforce(w) = map_pod(&p) else {
            panic!()
        };
        let names: Vec<_> = w.ports.iter().map(|p| (p.name.clone(), p.port)).collect();
        assert_eq!(
            names,
            [
                (Some("metrics".into()), 9090),
                (Some("proxy".into()), 15001)
            ]
        );
        assert_eq!(w.ips, ["10.1.0.9".parse::<IpAddr>().unwrap()]);
        assert_eq!(w.notes.len(), 3, "{:?}", w.notes);
        assert!(w.notes[0].contains("status.podIPs") && w.notes[0].contains("not-an-ip"));
        assert!(w.notes[1].contains("spec.containers[0].ports[0].containerPort"));
        assert!(w.notes[2].contains("spec.containers[0].ports[1].protocol"));
    }

    #[test]
    fn host_network_finished_and_ipless_pods_are_skipped() {
        let mut p = web("w", "10.1.0.5");
        p.spec.as_mut().unwrap().host_network = Some(true);
        assert_eq!(map_pod(&p), PodMapping::Skip(PodSkip::HostNetwork));
        for phase in ["Succeeded", "Failed"] {
            let mut p = web("w", "10.1.0.5");
            p.status.as_mut().unwrap().phase = Some(phase.into());
            assert_eq!(
                map_pod(&p),
                PodMapping::Skip(PodSkip::Finished(phase.into()))
            );
        }
        let p = pod(
            json!({"metadata": {"namespace": "shop", "name": "w"}, "spec": {"containers": []},
                           "status": {"phase": "Pending"}}),
        );
        assert_eq!(map_pod(&p), PodMapping::Skip(PodSkip::NoIp));
        let p = pod(json!({"metadata": {"name": "w"}}));
        assert_eq!(map_pod(&p), PodMapping::Skip(PodSkip::Unnamed));
    }

    /// A finder answering from a table the test edits: ip → (pid, ino).
    #[derive(Default)]
    struct Fake(Mutex<HashMap<IpAddr, Found>>);

    impl Fake {
        fn set(&self, ip: &str, pid: u32) {
            self.0.lock().unwrap().insert(
                ip.parse().unwrap(),
                Found {
                    pid,
                    ino: 1000 + u64::from(pid),
                },
            );
        }
    }

    impl NetnsFinder for Fake {
        fn find(&self, pods: &[Vec<IpAddr>]) -> Vec<Result<Found, Missing>> {
            let t = self.0.lock().unwrap();
            pods.iter()
                .map(|ips| {
                    ips.iter()
                        .find_map(|ip| t.get(ip).copied())
                        .ok_or(Missing::NotFound)
                })
                .collect()
        }
        fn still_there(&self, f: &Found) -> bool {
            self.0.lock().unwrap().values().any(|g| g == f)
        }
    }

    fn synced_keys(ev: &Event) -> Vec<String> {
        match ev {
            Event::Sync(l) => l.iter().map(|d| d.key.name.clone()).collect(),
            e => panic!("expected a sync, got {e:?}"),
        }
    }

    async fn feed(pods: &mut Pods, evs: Vec<watcher::Event<Pod>>) -> Vec<Event> {
        let mut out = Vec::new();
        for e in evs {
            pods.handle(e, &mut out).await;
        }
        out
    }

    #[tokio::test]
    async fn a_relist_is_sent_whole_at_its_end_and_drops_what_vanished() {
        let fake = Arc::new(Fake::default());
        fake.set("10.1.0.1", 11);
        fake.set("10.1.0.2", 12);
        let mut pods = Pods::new(fake.clone());
        let out = feed(
            &mut pods,
            vec![
                watcher::Event::Init,
                watcher::Event::InitApply(web("a", "10.1.0.1")),
                watcher::Event::InitApply(web("b", "10.1.0.2")),
            ],
        )
        .await;
        assert!(out.is_empty(), "nothing before InitDone: {out:?}");
        assert!(!pods.synced());
        let out = feed(&mut pods, vec![watcher::Event::InitDone]).await;
        assert_eq!(out.len(), 1);
        assert_eq!(synced_keys(&out[0]), ["a", "b"]);
        assert!(pods.synced());
        // A relist (after 410 Gone) without b: the sync leaves it out, so the agent forgets it.
        let out = feed(
            &mut pods,
            vec![
                watcher::Event::Init,
                watcher::Event::InitApply(web("a", "10.1.0.1")),
                watcher::Event::InitDone,
            ],
        )
        .await;
        assert_eq!(out.len(), 1);
        assert_eq!(synced_keys(&out[0]), ["a"]);
    }

    #[tokio::test]
    async fn changes_between_relists_are_single_events() {
        let fake = Arc::new(Fake::default());
        fake.set("10.1.0.1", 11);
        let mut pods = Pods::new(fake.clone());
        feed(
            &mut pods,
            vec![watcher::Event::Init, watcher::Event::InitDone],
        )
        .await;
        let out = feed(&mut pods, vec![watcher::Event::Apply(web("a", "10.1.0.1"))]).await;
        let [Event::Upsert(d)] = out.as_slice() else {
            panic!("{out:?}")
        };
        assert_eq!(d.netns, NetnsRef::Pid(11));
        // The same pod again (a status update): nothing to tell.
        let out = feed(&mut pods, vec![watcher::Event::Apply(web("a", "10.1.0.1"))]).await;
        assert!(out.is_empty(), "{out:?}");
        // A label change: an upsert with the new labels, same netns.
        let mut relabeled = web("a", "10.1.0.1");
        relabeled.metadata.labels = Some(BTreeMap::from([("role".into(), "db".into())]));
        let out = feed(&mut pods, vec![watcher::Event::Apply(relabeled)]).await;
        let [Event::Upsert(d)] = out.as_slice() else {
            panic!("{out:?}")
        };
        assert_eq!(d.labels["role"], "db");
        assert_eq!(d.netns, NetnsRef::Pid(11));
        // It finishes: removed.
        let mut done = web("a", "10.1.0.1");
        done.status.as_mut().unwrap().phase = Some("Succeeded".into());
        let out = feed(&mut pods, vec![watcher::Event::Apply(done)]).await;
        assert_eq!(out, [Event::Remove(key("a"))]);
        // Deleting what is not enforced says nothing.
        let out = feed(
            &mut pods,
            vec![watcher::Event::Delete(web("a", "10.1.0.1"))],
        )
        .await;
        assert!(out.is_empty(), "{out:?}");
    }

    #[tokio::test]
    async fn host_network_and_ipless_pods_are_never_sent() {
        let fake = Arc::new(Fake::default());
        let mut pods = Pods::new(fake.clone());
        let mut host = web("h", "192.168.1.1");
        host.spec.as_mut().unwrap().host_network = Some(true);
        fake.set("192.168.1.1", 1);
        let mut starting = web("s", "10.1.0.3");
        starting.status = None;
        let out = feed(
            &mut pods,
            vec![
                watcher::Event::Init,
                watcher::Event::InitApply(host.clone()),
                watcher::Event::InitApply(starting),
                watcher::Event::InitDone,
                watcher::Event::Apply(host),
            ],
        )
        .await;
        assert_eq!(out.len(), 1);
        assert!(synced_keys(&out[0]).is_empty());
        assert_eq!(pods.next_retry(), None, "nothing to retry");
    }

    #[tokio::test(start_paused = true)]
    async fn a_pod_whose_netns_is_not_up_yet_is_retried_until_found() {
        let fake = Arc::new(Fake::default());
        let mut pods = Pods::new(fake.clone());
        let out = feed(
            &mut pods,
            vec![
                watcher::Event::Init,
                watcher::Event::InitApply(web("late", "10.1.0.7")),
                watcher::Event::InitDone,
            ],
        )
        .await;
        assert!(synced_keys(&out[0]).is_empty());
        let first = pods.next_retry().unwrap();
        let mut out = Vec::new();
        tokio::time::sleep_until(first).await;
        pods.retry(&mut out).await;
        assert!(out.is_empty());
        // The backoff grows (bounded).
        let second = pods.next_retry().unwrap();
        assert!(second - first >= RETRY_MIN * 2);
        fake.set("10.1.0.7", 77);
        tokio::time::sleep_until(second).await;
        pods.retry(&mut out).await;
        let [Event::Upsert(d)] = out.as_slice() else {
            panic!("{out:?}")
        };
        assert_eq!(d.netns, NetnsRef::Pid(77));
        assert_eq!(pods.next_retry(), None);
        // A deleted pending pod is not retried.
        let mut out = Vec::new();
        pods.handle(watcher::Event::Apply(web("gone", "10.1.0.8")), &mut out)
            .await;
        assert!(pods.next_retry().is_some());
        pods.handle(watcher::Event::Delete(web("gone", "10.1.0.8")), &mut out)
            .await;
        assert_eq!(pods.next_retry(), None);
        assert!(out.is_empty(), "{out:?}");
    }

    #[tokio::test]
    async fn a_new_sandbox_under_the_same_pod_is_looked_up_again() {
        let fake = Arc::new(Fake::default());
        fake.set("10.1.0.1", 11);
        let mut pods = Pods::new(fake.clone());
        feed(
            &mut pods,
            vec![watcher::Event::Init, watcher::Event::InitDone],
        )
        .await;
        feed(&mut pods, vec![watcher::Event::Apply(web("a", "10.1.0.1"))]).await;
        // The sandbox died and came back with the same IP in a new namespace.
        fake.0.lock().unwrap().clear();
        fake.set("10.1.0.1", 21);
        let mut p = web("a", "10.1.0.1");
        p.metadata.resource_version = Some("2".into());
        let out = feed(&mut pods, vec![watcher::Event::Apply(p)]).await;
        let [Event::Upsert(d)] = out.as_slice() else {
            panic!("{out:?}")
        };
        assert_eq!(d.netns, NetnsRef::Pid(21));
        // A new IP that no namespace holds yet: the old enforcement goes, the pod waits.
        let out = feed(
            &mut pods,
            vec![watcher::Event::Apply(web("a", "10.1.0.99"))],
        )
        .await;
        assert_eq!(out, [Event::Remove(key("a"))]);
        assert!(pods.next_retry().is_some());
    }
}
