//! The Kubernetes runtime: this node's pods, every Namespace, every NetworkPolicy and admin
//! policy (when policies come from the API) and every Node (the node inventory of admin `nodes`
//! peers; in PKI mode also the peers' certificates), followed with kube_runtime watchers.
//!
//! Each watcher lists, then watches from the list's resourceVersion; a watch that expired
//! (410 Gone) relists, a broken connection is retried with the watcher's default backoff. A
//! list is buffered and sent to the agent whole at its end (`InitDone`), so the agent never acts
//! on a half-listed view; and no pod is sent before Namespaces, NetworkPolicies and Nodes have
//! been listed once (the pod watcher is not even polled before). Changes between lists are
//! single events.
//!
//! Pods are those with `spec.nodeName` = this node; each pod's network namespace is found by
//! its IP among the host's namespaces ([`netns`]), with no container runtime API. PKI mode
//! publishes the node's certificate on its own Node and learns the peers' from theirs
//! ([`nodes`]).

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use futures_util::StreamExt;
use futures_util::stream::BoxStream;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::core::PartialObjectMeta;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client};
use tokio::sync::{Notify, watch};
use tracing::{debug, info, warn};

use super::{Event, Sender};

pub mod admin;
pub mod netns;
pub mod nodes;
pub mod objects;
pub mod pods;

/// What the Kubernetes runtime needs.
#[derive(Debug, Clone)]
pub struct KubernetesConfig {
    /// This node's name: pods with `spec.nodeName` equal to it are enforced; its Node object
    /// carries our certificate.
    pub node_name: String,
    /// A kubeconfig file; `None`: `KUBECONFIG`, `~/.kube/config`, else in-cluster.
    pub kubeconfig: Option<PathBuf>,
    /// PKI mode: our certificate (PEM), published on our Node; peers are learned from theirs.
    /// `None` (PSK mode): Nodes are not watched.
    pub publish_certificate: Option<String>,
    /// PKI: our certificate after a rotation of the node's credentials (the agent watches
    /// `--node-cert` / `--node-key`): each new value is published on our Node at once.
    /// `None`: the certificate never changes.
    pub certificate_updates: Option<watch::Receiver<String>>,
    /// Whether NetworkPolicies and the admin policies (ClusterNetworkPolicy, AdminNetworkPolicy,
    /// BaselineAdminNetworkPolicy, when their CRDs are installed) come from the API (no
    /// `--policies` directory).
    pub policies_from_api: bool,
    /// How often discovery is asked whether an admin policy CRD that is not installed is now
    /// ([`admin::DISCOVERY_EVERY`]).
    pub discovery_every: std::time::Duration,
}

impl Default for KubernetesConfig {
    fn default() -> Self {
        KubernetesConfig {
            node_name: String::new(),
            kubeconfig: None,
            publish_certificate: None,
            certificate_updates: None,
            policies_from_api: false,
            discovery_every: admin::DISCOVERY_EVERY,
        }
    }
}

/// A client from the kubeconfig given, else the inferred one (KUBECONFIG, ~/.kube/config,
/// in-cluster service account).
pub async fn client(cfg: &KubernetesConfig) -> Result<Client> {
    let config = match &cfg.kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
                .await
                .with_context(|| format!("kubeconfig {}", path.display()))?
        }
        None => kube::Config::infer().await.context(
            "no Kubernetes API configuration: give --kubeconfig, set KUBECONFIG, or run in a pod",
        )?,
    };
    Client::try_from(config).context("Kubernetes API client")
}

/// Runs the Kubernetes runtime until `stop` turns true (Ok), or fails on what retrying cannot
/// fix (no usable kubeconfig).
pub async fn run(cfg: KubernetesConfig, tx: Sender, stop: watch::Receiver<bool>) -> Result<()> {
    let client = client(&cfg).await?;
    run_with(
        client,
        cfg,
        Arc::new(netns::ProcScanner::default()),
        tx,
        stop,
    )
    .await
}

type Watch<K> = BoxStream<'static, Result<watcher::Event<K>, watcher::Error>>;

fn watch_all<K>(api: Api<K>, config: watcher::Config) -> Watch<K>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + 'static,
    K::DynamicType: Default,
{
    let what = K::plural(&Default::default()).into_owned();
    watcher(api, config)
        // An expired watch (410 Gone) is no failure to back off from: the watcher relists at
        // its next poll, so a change made meanwhile is not delayed by a backoff step.
        .filter(move |r| {
            let expired = matches!(r, Err(watcher::Error::WatchError(s)) if s.code == 410);
            if expired {
                info!("{what} watch expired (410 Gone): relisting");
            }
            std::future::ready(!expired)
        })
        .default_backoff()
        .boxed()
}

/// Metadata only (`PartialObjectMetadata`): labels are all we read of Namespaces.
fn watch_meta<K>(client: &Client) -> Watch<PartialObjectMeta<K>>
where
    K: kube::Resource<Scope = k8s_openapi::ClusterResourceScope>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
    K::DynamicType: Default,
{
    watch_all(
        Api::<PartialObjectMeta<K>>::all(client.clone()),
        watcher::Config::default(),
    )
}

/// Logs a watcher error: the first of a streak at warn, the rest at debug.
fn watch_error(what: &str, failing: &mut bool, e: &watcher::Error) {
    if *failing {
        debug!("{what} watch: {e}");
    } else {
        warn!("{what} watch: {e}; retrying with backoff");
        *failing = true;
    }
}

/// Notes a good watcher event: the end of an error streak is logged.
fn watch_ok(what: &str, failing: &mut bool) {
    if *failing {
        info!("{what} watch: working again");
        *failing = false;
    }
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// [`run`] with a given client and namespace finder (tests).
pub async fn run_with(
    client: Client,
    cfg: KubernetesConfig,
    finder: Arc<dyn netns::NetnsFinder>,
    tx: Sender,
    mut stop: watch::Receiver<bool>,
) -> Result<()> {
    let node = cfg.node_name.clone();
    let pki = cfg.publish_certificate.is_some();
    let mut pod_watch: Watch<Pod> = watch_all(
        Api::all(client.clone()),
        watcher::Config::default().fields(&format!("spec.nodeName={node}")),
    );
    let mut ns_watch: Watch<_> = watch_meta::<Namespace>(&client);
    let mut policy_watch: Watch<NetworkPolicy> = if cfg.policies_from_api {
        watch_all(Api::all(client.clone()), watcher::Config::default())
    } else {
        futures_util::stream::pending().boxed()
    };
    // One watch of the full Node objects serves both the node inventory of admin `nodes`
    // peers (labels and addresses) and, in PKI mode, the peer certificates (annotations).
    let mut node_watch: Watch<Node> =
        watch_all(Api::all(client.clone()), watcher::Config::default());
    let mut inventory = objects::NodeInventory::default();
    let republish = Arc::new(Notify::new());
    let mut node_state = None;
    // Our certificate as it changes (rotation); without updates, a channel that never does.
    let (_unchanging, own_pem) = match (&cfg.publish_certificate, &cfg.certificate_updates) {
        (_, Some(updates)) => (None, Some(updates.clone())),
        (Some(pem), None) => {
            let (tx, rx) = watch::channel(pem.clone());
            (Some(tx), Some(rx))
        }
        (None, None) => (None, None),
    };
    let mut own_pem_changes = own_pem.clone();
    let _publisher = cfg
        .publish_certificate
        .as_ref()
        .zip(own_pem)
        .map(|(pem, updates)| {
            node_state = Some(nodes::Nodes::new(&node, pem));
            AbortOnDrop(tokio::spawn(nodes::publish(
                Api::all(client.clone()),
                node.clone(),
                updates,
                republish.clone(),
            )))
        });
    // Admin policies (custom resources that may or may not be installed): a task per kind.
    let (admin_tx, mut admin_rx) = tokio::sync::mpsc::channel(64);
    let mut admin_tasks = Vec::new();
    let mut admin_pending: std::collections::BTreeSet<policy::AdminKind> = Default::default();
    if cfg.policies_from_api {
        for res in admin::KINDS {
            admin_pending.insert(res.kind);
            admin_tasks.push(AbortOnDrop(tokio::spawn(admin::follow(
                client.clone(),
                res,
                admin_tx.clone(),
                cfg.discovery_every,
            ))));
        }
    }
    drop(admin_tx);
    let mut namespaces = objects::Namespaces::default();
    let mut policies = objects::Policies::default();
    let mut pods = pods::Pods::new(finder);
    info!(node = %node, policies_from_api = cfg.policies_from_api, pki, "kubernetes runtime: watching");

    let mut failing = [false; 4];
    let mut out: Vec<Event> = Vec::new();
    loop {
        // The pods wait until everything they depend on was listed once.
        let ready = namespaces.synced()
            && inventory.synced()
            && (!cfg.policies_from_api || (policies.synced() && admin_pending.is_empty()))
            && node_state.as_ref().is_none_or(|n| n.synced());
        let retry_at = pods.next_retry();
        tokio::select! {
            () = stopped(&mut stop) => return Ok(()),
            Some(ev) = ns_watch.next() => match ev {
                Ok(ev) => { watch_ok("namespace", &mut failing[0]); namespaces.handle(ev, &mut out) }
                Err(e) => watch_error("namespace", &mut failing[0], &e),
            },
            Some(ev) = policy_watch.next() => match ev {
                Ok(ev) => { watch_ok("networkpolicy", &mut failing[1]); policies.handle(ev, &mut out) }
                Err(e) => watch_error("networkpolicy", &mut failing[1], &e),
            },
            Some(m) = admin_rx.recv() => match m {
                admin::Message::Settled(kind) => { admin_pending.remove(&kind); }
                admin::Message::Event(ev) => out.push(*ev),
            },
            Some(ev) = node_watch.next() => match ev {
                Ok(ev) => {
                    watch_ok("node", &mut failing[2]);
                    if let Some(n) = node_state.as_mut()
                        && n.handle(metadata_event(&ev), &mut out)
                    {
                        republish.notify_one();
                    }
                    inventory.handle(ev, &mut out);
                }
                Err(e) => watch_error("node", &mut failing[2], &e),
            },
            Some(ev) = pod_watch.next(), if ready => match ev {
                Ok(ev) => { watch_ok("pod", &mut failing[3]); pods.handle(ev, &mut out).await }
                Err(e) => watch_error("pod", &mut failing[3], &e),
            },
            () = crate::runtime::sleep_until(retry_at), if ready && retry_at.is_some() => pods.retry(&mut out).await,
            Some(pem) = pem_changed(&mut own_pem_changes) => {
                // Our credentials were rotated: our annotation must now hold the new one.
                if let Some(n) = node_state.as_mut() {
                    n.set_own_pem(&pem);
                }
            }
        }
        for ev in out.drain(..) {
            if tx.send(ev).await.is_err() {
                debug!("kubernetes runtime: the agent stopped listening");
                return Ok(());
            }
        }
    }
}

/// A Node watch event as its metadata alone, for the certificate handling (which reads
/// annotations only).
fn metadata_event(ev: &watcher::Event<Node>) -> watcher::Event<PartialObjectMeta<Node>> {
    let meta = |n: &Node| PartialObjectMeta {
        types: None,
        metadata: n.metadata.clone(),
        _phantom: std::marker::PhantomData,
    };
    match ev {
        watcher::Event::Apply(n) => watcher::Event::Apply(meta(n)),
        watcher::Event::Delete(n) => watcher::Event::Delete(meta(n)),
        watcher::Event::Init => watcher::Event::Init,
        watcher::Event::InitApply(n) => watcher::Event::InitApply(meta(n)),
        watcher::Event::InitDone => watcher::Event::InitDone,
    }
}

/// The next value of our certificate; never resolves without updates (or once their sender
/// is gone).
async fn pem_changed(updates: &mut Option<watch::Receiver<String>>) -> Option<String> {
    match updates {
        Some(rx) => match rx.changed().await {
            Ok(()) => Some(rx.borrow_and_update().clone()),
            Err(_) => {
                *updates = None;
                std::future::pending().await
            }
        },
        None => std::future::pending().await,
    }
}

/// Resolves when stop is true or its sender is gone.
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use kube_emulator::Emulator;
    use serde_json::json;
    use std::net::IpAddr;
    use std::time::Duration;

    /// Every IP is in the namespace of pid 7.
    struct Everywhere;

    impl netns::NetnsFinder for Everywhere {
        fn find(&self, pods: &[Vec<IpAddr>]) -> Vec<Result<netns::Found, netns::Missing>> {
            pods.iter()
                .map(|_| Ok(netns::Found { pid: 7, ino: 7 }))
                .collect()
        }
        fn still_there(&self, _: &netns::Found) -> bool {
            true
        }
    }

    fn client(emu: &Emulator) -> Client {
        Client::try_from(kube::Config::new(emu.url().parse().unwrap())).unwrap()
    }

    async fn next(rx: &mut tokio::sync::mpsc::Receiver<Event>) -> Event {
        tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .expect("an event within 10 s")
            .expect("the runtime is running")
    }

    /// A kubeconfig that cannot be read or parsed is refused naming the file; an https API
    /// server gets a TLS client (the crypto provider is built in: no panic, a connection error).
    #[tokio::test]
    async fn kubeconfig_errors_name_the_file_and_https_is_supported() {
        let dir = tempfile::tempdir().unwrap();
        let bad = dir.path().join("bad.yaml");
        std::fs::write(&bad, "clusters: [this is: not, a kubeconfig").unwrap();
        for path in [bad, dir.path().join("missing.yaml")] {
            let cfg = KubernetesConfig {
                kubeconfig: Some(path.clone()),
                ..KubernetesConfig::default()
            };
            let e = format!("{:#}", super::client(&cfg).await.err().unwrap());
            assert!(e.contains(&path.display().to_string()), "{e}");
        }
        let tls = dir.path().join("tls.yaml");
        std::fs::write(
            &tls,
            "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster: {server: 'https://127.0.0.1:9', insecure-skip-tls-verify: true}\ncontexts:\n- name: c\n  context: {cluster: c, user: u}\ncurrent-context: c\nusers:\n- name: u\n  user: {token: t}\n",
        )
        .unwrap();
        let cfg = KubernetesConfig {
            kubeconfig: Some(tls),
            ..KubernetesConfig::default()
        };
        let c = super::client(&cfg).await.unwrap();
        assert!(
            Api::<Namespace>::all(c)
                .list(&Default::default())
                .await
                .is_err()
        );
    }

    /// Against the emulator: namespaces, policies and peer certificates reach the agent before
    /// the first pod list, only this node's pods are listed, and our certificate is published
    /// on our Node (other annotations left alone).
    #[tokio::test]
    async fn pods_come_after_what_they_depend_on_and_our_certificate_is_published() {
        let emu = Emulator::start().await.unwrap();
        emu.apply(json!({"apiVersion": "v1", "kind": "Namespace",
                         "metadata": {"name": "shop", "labels": {"team": "a"}}}))
            .unwrap();
        for (node, ann) in [
            ("me", json!({"keep": "this"})),
            ("peer", json!({nodes::CERT_ANNOTATION: "PEER-PEM"})),
        ] {
            emu.apply(json!({"apiVersion": "v1", "kind": "Node",
                             "metadata": {"name": node, "annotations": ann}}))
                .unwrap();
        }
        emu.apply(
            json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                         "metadata": {"namespace": "shop", "name": "deny"},
                         "spec": {"podSelector": {}}}),
        )
        .unwrap();
        for (name, node) in [("mine", "me"), ("theirs", "peer")] {
            emu.apply(json!({"apiVersion": "v1", "kind": "Pod",
                             "metadata": {"namespace": "shop", "name": name, "labels": {"app": name}},
                             "spec": {"nodeName": node, "containers": [{"name": "c"}]},
                             "status": {"phase": "Running", "podIP": "10.9.0.1"}}))
                .unwrap();
        }
        let (cert_tx, cert_rx) = watch::channel("MY-PEM".to_owned());
        let cfg = KubernetesConfig {
            node_name: "me".into(),
            kubeconfig: None,
            publish_certificate: Some("MY-PEM".into()),
            certificate_updates: Some(cert_rx),
            policies_from_api: true,
            ..KubernetesConfig::default()
        };
        let (tx, mut rx) = tokio::sync::mpsc::channel(64);
        let (stop_tx, stop_rx) = watch::channel(false);
        let task = tokio::spawn(run_with(
            client(&emu),
            cfg,
            Arc::new(Everywhere),
            tx,
            stop_rx,
        ));
        let mut before = Vec::new();
        let synced = loop {
            match next(&mut rx).await {
                Event::Sync(list) => break list,
                e => before.push(e),
            }
        };
        assert!(
            before.contains(&Event::Namespace {
                name: "shop".into(),
                labels: Some(std::collections::BTreeMap::from([(
                    "team".into(),
                    "a".into()
                )])),
                require_encryption: false,
            }),
            "{before:?}"
        );
        assert!(
            before
                .iter()
                .any(|e| matches!(e, Event::Policies { policies, .. } if policies.len() == 1)),
            "{before:?}"
        );
        assert!(
            before.contains(&Event::PeerCertificate {
                node: "peer".into(),
                pem: Some("PEER-PEM".into())
            }),
            "{before:?}"
        );
        let names: Vec<&str> = synced.iter().map(|d| d.key.name.as_str()).collect();
        assert_eq!(names, ["mine"]);
        assert_eq!(synced[0].origin, "pod shop/mine");

        // Published on our Node, merged with what was there.
        for _ in 0..500 {
            let ann = emu
                .get("nodes", None, "me")
                .and_then(|n| n["metadata"]["annotations"].as_object().cloned())
                .unwrap_or_default();
            if ann.get(nodes::CERT_ANNOTATION).and_then(|v| v.as_str()) == Some("MY-PEM") {
                assert_eq!(ann["keep"], "this");
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(
            emu.get("nodes", None, "me").unwrap()["metadata"]["annotations"]
                [nodes::CERT_ANNOTATION],
            "MY-PEM"
        );

        // Our credentials are rotated: the new certificate is published at once.
        cert_tx.send_replace("MY-NEW-PEM".into());
        let mut published = false;
        for _ in 0..500 {
            let ann = emu
                .get("nodes", None, "me")
                .and_then(|n| n["metadata"]["annotations"].as_object().cloned())
                .unwrap_or_default();
            if ann.get(nodes::CERT_ANNOTATION).and_then(|v| v.as_str()) == Some("MY-NEW-PEM") {
                assert_eq!(ann["keep"], "this");
                published = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(published, "the rotated certificate was not published");

        // A live change: the policy goes.
        emu.delete("networkpolicies", Some("shop"), "deny").unwrap();
        loop {
            if let Event::PolicyRemove(k) = next(&mut rx).await {
                assert_eq!((k.namespace.as_str(), k.name.as_str()), ("shop", "deny"));
                break;
            }
        }
        stop_tx.send_replace(true);
        task.await.unwrap().unwrap();
    }

    fn cnp(name: &str, priority: i64) -> serde_json::Value {
        json!({"apiVersion": "policy.networking.k8s.io/v1alpha2", "kind": "ClusterNetworkPolicy",
               "metadata": {"name": name},
               "spec": {"tier": "Admin", "priority": priority,
                        "subject": {"namespaces": {}},
                        "ingress": [{"name": "no-one", "action": "Deny",
                                     "from": [{"namespaces": {}}]}]}})
    }

    fn start_runtime(
        emu: &Emulator,
    ) -> (
        tokio::sync::mpsc::Receiver<Event>,
        watch::Sender<bool>,
        tokio::task::JoinHandle<Result<()>>,
    ) {
        let cfg = KubernetesConfig {
            node_name: "me".into(),
            policies_from_api: true,
            discovery_every: Duration::from_millis(50),
            ..KubernetesConfig::default()
        };
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        let (stop_tx, stop_rx) = watch::channel(false);
        let task = tokio::spawn(run_with(
            client(emu),
            cfg,
            Arc::new(Everywhere),
            tx,
            stop_rx,
        ));
        (rx, stop_tx, task)
    }

    /// Admin policies whose CRDs are installed are listed before the first pod list; a
    /// relabel-free update and a delete arrive as single events.
    #[tokio::test]
    async fn admin_policies_are_listed_before_pods_and_followed() {
        let emu = Emulator::start().await.unwrap();
        emu.install_admin_crds().unwrap();
        emu.apply(cnp("guard", 10)).unwrap();
        emu.apply(json!({"apiVersion": "policy.networking.k8s.io/v1alpha1",
                         "kind": "BaselineAdminNetworkPolicy", "metadata": {"name": "default"},
                         "spec": {"subject": {"namespaces": {}},
                                  "ingress": [{"name": "deny", "action": "Deny",
                                               "from": [{"namespaces": {}}]}]}}))
            .unwrap();
        let (mut rx, stop, task) = start_runtime(&emu);
        let mut before = Vec::new();
        loop {
            match next(&mut rx).await {
                Event::Sync(_) => break,
                e => before.push(e),
            }
        }
        let listed = |kind: policy::AdminKind, n: usize| {
            before.iter().any(|e| {
                matches!(e, Event::AdminPolicies { kind: k, policies, .. }
                         if *k == kind && policies.len() == n)
            })
        };
        assert!(
            listed(policy::AdminKind::ClusterNetworkPolicy, 1),
            "{before:?}"
        );
        assert!(
            listed(policy::AdminKind::BaselineAdminNetworkPolicy, 1),
            "{before:?}"
        );
        assert!(
            listed(policy::AdminKind::AdminNetworkPolicy, 0),
            "{before:?}"
        );

        emu.apply(cnp("guard", 20)).unwrap();
        loop {
            if let Event::AdminUpsert(p) = next(&mut rx).await {
                let crate::runtime::AdminPolicy::Cluster(c) = *p else {
                    panic!("a ClusterNetworkPolicy")
                };
                assert_eq!(c.spec.unwrap().priority, Some(20));
                break;
            }
        }
        emu.delete("clusternetworkpolicies", None, "guard").unwrap();
        loop {
            if let Event::AdminRemove(k) = next(&mut rx).await {
                assert_eq!(k.to_string(), "ClusterNetworkPolicy/guard");
                break;
            }
        }
        stop.send_replace(true);
        task.await.unwrap().unwrap();
    }

    /// Without the CRDs the runtime works as before (pods are not held back); CRDs installed
    /// later are picked up, and removing one removes its policies.
    #[tokio::test]
    async fn admin_crds_installed_later_are_picked_up_and_removal_removes_policies() {
        let emu = Emulator::start().await.unwrap();
        let (mut rx, stop, task) = start_runtime(&emu);
        loop {
            if let Event::Sync(_) = next(&mut rx).await {
                break;
            }
        }
        emu.install_admin_crds().unwrap();
        emu.apply(cnp("late", 5)).unwrap();
        loop {
            match next(&mut rx).await {
                Event::AdminPolicies { kind, policies, .. }
                    if kind == policy::AdminKind::ClusterNetworkPolicy && policies.len() == 1 =>
                {
                    break;
                }
                Event::AdminUpsert(p) if p.key().name == "late" => break,
                _ => {}
            }
        }
        emu.delete(
            "customresourcedefinitions",
            None,
            "clusternetworkpolicies.policy.networking.k8s.io",
        )
        .unwrap();
        loop {
            match next(&mut rx).await {
                Event::AdminRemove(k) if k.name == "late" => break,
                Event::AdminPolicies { kind, policies, .. }
                    if kind == policy::AdminKind::ClusterNetworkPolicy && policies.is_empty() =>
                {
                    break;
                }
                _ => {}
            }
        }
        stop.send_replace(true);
        task.await.unwrap().unwrap();
    }
}
