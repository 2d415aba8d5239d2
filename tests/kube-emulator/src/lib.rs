//! A loopback Kubernetes API emulator for tests: real list/watch semantics, no apiserver.
//!
//! It serves plain HTTP on `127.0.0.1:<ephemeral>` with the API server's paths for core/v1
//! `pods`, `namespaces`, `nodes`, `secrets`, `configmaps`, networking.k8s.io/v1
//! `networkpolicies` and the custom resources below, so the real `kube` client (and `kube_runtime::watcher`) can be pointed at
//! it through a kubeconfig ([`Emulator::write_kubeconfig`]).
//!
//! # What is emulated
//! - One global `resourceVersion` counter, assigned on every create, update and delete;
//!   `uid`, `creationTimestamp` and `generation` (bumped when `spec` changes) are filled in.
//!   An update that changes nothing keeps the object's resourceVersion and emits no event.
//! - LIST with `labelSelector` (`a=b`, `a==b`, `a!=b`, `a`, `!a`, `a in (x,y)`, `a notin (x,y)`)
//!   and `fieldSelector` (`path=value`, `path!=value` for any dotted path such as
//!   `spec.nodeName`, `metadata.name`). List items carry no kind/apiVersion, as upstream.
//! - WATCH (`watch=true|1`): from `resourceVersion=N` it replays every retained change after N,
//!   then streams live ones; with no resourceVersion, `0`, or `sendInitialEvents=true` it first
//!   sends the current objects as ADDED (the latter followed by the
//!   `k8s.io/initial-events-end` BOOKMARK). Changes are filtered by the selectors the way the
//!   watch cache does it: an object that starts matching arrives as ADDED, one that stops
//!   matching as DELETED. A resourceVersion older than the retained history (a bounded ring, or
//!   emptied by [`Emulator::compact`]) gets an `ERROR` event with a 410 `Expired` Status and
//!   the stream ends. `allowWatchBookmarks` gets periodic BOOKMARKs; `timeoutSeconds` ends the
//!   stream cleanly.
//! - GET, POST (201; 409 AlreadyExists; `generateName`), PUT (409 Conflict on a stale
//!   resourceVersion; none means unconditional), DELETE (returns the object; deleting a
//!   namespace deletes its objects first), PATCH as `merge-patch+json`,
//!   `strategic-merge-patch+json` (treated as a JSON merge patch), `json-patch+json`, and
//!   `apply-patch+yaml` (server-side apply emulated as a merge that may create).
//! - Errors are `Status` objects with the upstream `reason` and `code`.
//! - `/version`, `/api`, `/apis`, `/api/v1`, `/apis/GROUP/VERSION` discovery.
//! - Custom resources: apiextensions.k8s.io/v1 `customresourcedefinitions` are stored as any
//!   object; the cluster-wide admin policies of policy.networking.k8s.io (v1alpha2
//!   `clusternetworkpolicies`, v1alpha1 `adminnetworkpolicies` and
//!   `baselineadminnetworkpolicies`) are served (paths, discovery, apply) only while their
//!   definition (`<plural>.policy.networking.k8s.io`) exists, as on a real cluster. Deleting a
//!   definition deletes its objects (DELETED events), then ends the watches of its kind; the
//!   definition's schema is not read. [`Emulator::install_admin_crds`] creates all three.
//!
//! # What is not
//! Authentication, authorization, admission, validation beyond names/namespaces, defaulting,
//! subresources (`/status`, `/log`, ...), `limit`/`continue` paging (everything is returned in
//! one page), list `resourceVersion` semantics (a list is always current), deletecollection,
//! graceful deletion (objects go at once, no `deletionTimestamp`), finalizers, owner-reference
//! garbage collection, managedFields, protobuf, and checking that a namespace exists before
//! objects are created in it.
//!
//! For manual use, the `kube-emulator` binary serves it until killed:
//! `kube-emulator [--addr 127.0.0.1:PORT] [--kubeconfig PATH] [MANIFEST.yaml ...]`.
//!
//! ```no_run
//! let emu = kube_emulator::Emulator::start_blocking().unwrap();
//! emu.apply(serde_json::json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "demo"}})).unwrap();
//! emu.write_kubeconfig(std::path::Path::new("/tmp/kubeconfig")).unwrap();
//! ```

use std::collections::VecDeque;
use std::future::IntoFuture;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::{Value, json};
use tokio::sync::{oneshot, watch};

mod select;
mod server;
mod store;

use store::{Filter, Store};
pub use store::{RESOURCES, ResourceType};

/// What went wrong, with the upstream reason each maps to.
#[derive(Debug, thiserror::Error)]
pub enum EmuError {
    #[error("NotFound: {0}")]
    NotFound(String),
    #[error("AlreadyExists: {0}")]
    AlreadyExists(String),
    #[error("Conflict: {0}")]
    Conflict(String),
    #[error("BadRequest: {0}")]
    BadRequest(String),
    #[error("Expired: {0}")]
    Expired(String),
    #[error("MethodNotAllowed: {0}")]
    MethodNotAllowed(String),
    #[error("UnsupportedMediaType: {0}")]
    UnsupportedMediaType(String),
    #[error("emulator I/O: {0}")]
    Io(#[from] std::io::Error),
}

impl EmuError {
    fn reason_code(&self) -> (&'static str, u16) {
        match self {
            EmuError::NotFound(_) => ("NotFound", 404),
            EmuError::AlreadyExists(_) => ("AlreadyExists", 409),
            EmuError::Conflict(_) => ("Conflict", 409),
            EmuError::BadRequest(_) => ("BadRequest", 400),
            EmuError::Expired(_) => ("Expired", 410),
            EmuError::MethodNotAllowed(_) => ("MethodNotAllowed", 405),
            EmuError::UnsupportedMediaType(_) => ("UnsupportedMediaType", 415),
            EmuError::Io(_) => ("InternalError", 500),
        }
    }

    fn http_code(&self) -> axum::http::StatusCode {
        axum::http::StatusCode::from_u16(self.reason_code().1)
            .unwrap_or(axum::http::StatusCode::INTERNAL_SERVER_ERROR)
    }

    /// The `Status` object the API server would send.
    pub fn status(&self) -> Value {
        let (reason, code) = self.reason_code();
        let message = match self {
            EmuError::Io(e) => e.to_string(),
            EmuError::NotFound(m)
            | EmuError::AlreadyExists(m)
            | EmuError::Conflict(m)
            | EmuError::BadRequest(m)
            | EmuError::Expired(m)
            | EmuError::MethodNotAllowed(m)
            | EmuError::UnsupportedMediaType(m) => m.clone(),
        };
        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
               "message": message, "reason": reason, "code": code})
    }
}

/// State shared by the HTTP handlers and the control API.
pub(crate) struct Shared {
    store: Mutex<Store>,
    requests: Mutex<VecDeque<(String, String)>>,
    watches: AtomicUsize,
    close: watch::Sender<u64>,
    paused: watch::Sender<WatchGate>,
    bookmark_interval: Duration,
}

/// Requests kept in the log (oldest dropped first).
const REQUEST_LOG_LIMIT: usize = 10_000;

impl Shared {
    fn store(&self) -> MutexGuard<'_, Store> {
        self.store.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn log_request(&self, method: &str, path_query: &str) {
        let mut log = self.requests.lock().unwrap_or_else(PoisonError::into_inner);
        if log.len() >= REQUEST_LOG_LIMIT {
            log.pop_front();
        }
        log.push_back((method.to_string(), path_query.to_string()));
    }

    fn count_watch(&self) -> WatchCounted<'_> {
        self.watches.fetch_add(1, Ordering::SeqCst);
        WatchCounted(&self.watches)
    }

    fn break_watches(&self) {
        self.close.send_modify(|generation| *generation += 1);
    }
}

/// Whether new watch requests are served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum WatchGate {
    Open,
    Held,
    Stopped,
}

/// Keeps a watch counted in [`Emulator::watch_count`] while it lives.
struct WatchCounted<'a>(&'a AtomicUsize);

impl Drop for WatchCounted<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Settings for an [`Emulator`]; [`Emulator::builder`] gives the defaults.
#[derive(Debug, Clone)]
pub struct Builder {
    addr: SocketAddr,
    history_limit: usize,
    bookmark_interval: Duration,
}

impl Builder {
    /// Address to listen on (default `127.0.0.1:0`, an ephemeral port).
    pub fn bind(mut self, addr: SocketAddr) -> Self {
        self.addr = addr;
        self
    }

    /// Changes kept for watches to resume from (default 1000); older resourceVersions get 410.
    pub fn history_limit(mut self, changes: usize) -> Self {
        self.history_limit = changes;
        self
    }

    /// How often a watch that asked for bookmarks gets one (default 5 s).
    pub fn bookmark_interval(mut self, every: Duration) -> Self {
        self.bookmark_interval = every.max(Duration::from_millis(10));
        self
    }

    fn shared(&self) -> Arc<Shared> {
        Arc::new(Shared {
            store: Mutex::new(Store::new(self.history_limit)),
            requests: Mutex::new(VecDeque::new()),
            watches: AtomicUsize::new(0),
            close: watch::channel(0).0,
            paused: watch::channel(WatchGate::Open).0,
            bookmark_interval: self.bookmark_interval,
        })
    }

    /// Serves on the current tokio runtime until the [`Emulator`] is dropped.
    pub async fn start(self) -> Result<Emulator, EmuError> {
        let listener = tokio::net::TcpListener::bind(self.addr).await?;
        let addr = listener.local_addr()?;
        let shared = self.shared();
        let (stop, stopped) = oneshot::channel::<()>();
        tokio::spawn(serve(listener, shared.clone(), stopped));
        Ok(Emulator {
            shared,
            addr,
            stop: Some(stop),
            thread: None,
        })
    }

    /// Serves from a thread of its own with its own runtime, for plain `#[test]` functions.
    pub fn start_blocking(self) -> Result<Emulator, EmuError> {
        let listener = std::net::TcpListener::bind(self.addr)?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let shared = self.shared();
        let (stop, stopped) = oneshot::channel::<()>();
        let served = shared.clone();
        let thread = std::thread::Builder::new()
            .name("kube-emulator".into())
            .spawn(move || {
                runtime.block_on(async move {
                    match tokio::net::TcpListener::from_std(listener) {
                        Ok(listener) => serve(listener, served, stopped).await,
                        Err(e) => eprintln!("kube-emulator: cannot serve on {addr}: {e}"),
                    }
                });
                // Dropping the runtime here ends every connection still open.
            })?;
        Ok(Emulator {
            shared,
            addr,
            stop: Some(stop),
            thread: Some(thread),
        })
    }
}

async fn serve(
    listener: tokio::net::TcpListener,
    shared: Arc<Shared>,
    stopped: oneshot::Receiver<()>,
) {
    let app = server::router(shared);
    tokio::select! {
        served = axum::serve(listener, app).into_future() => {
            if let Err(e) = served {
                eprintln!("kube-emulator: server error: {e}");
            }
        }
        _ = stopped => {}
    }
}

/// A running emulator. Dropping it stops the server and closes every watch.
pub struct Emulator {
    shared: Arc<Shared>,
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Emulator {
    /// Default settings, to adjust before starting.
    pub fn builder() -> Builder {
        Builder {
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            history_limit: 1000,
            bookmark_interval: Duration::from_secs(5),
        }
    }

    /// Starts with default settings on the current tokio runtime.
    pub async fn start() -> Result<Emulator, EmuError> {
        Self::builder().start().await
    }

    /// Starts with default settings on a thread and runtime of its own.
    pub fn start_blocking() -> Result<Emulator, EmuError> {
        Self::builder().start_blocking()
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The listening address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// A kubeconfig (YAML) pointing at the emulator, without credentials, namespace `default`.
    pub fn kubeconfig(&self) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: emulator\n  cluster:\n    server: {url}\n\
             contexts:\n- name: emulator\n  context:\n    cluster: emulator\n    user: emulator\n    namespace: default\n\
             current-context: emulator\nusers:\n- name: emulator\n  user: {{}}\n",
            url = self.url()
        )
    }

    /// Writes [`Emulator::kubeconfig`] to `path`, for a process started with `KUBECONFIG=path`.
    pub fn write_kubeconfig(&self, path: &Path) -> Result<(), EmuError> {
        std::fs::write(path, self.kubeconfig())?;
        Ok(())
    }

    /// Creates the object, or replaces it if it exists (any resourceVersion in it is ignored);
    /// returns it as stored. A namespaced object without a namespace goes to `default`.
    /// Takes a `serde_json::Value` or any typed object that serializes with kind and apiVersion.
    pub fn apply(&self, obj: impl Serialize) -> Result<Value, EmuError> {
        let mut obj =
            serde_json::to_value(obj).map_err(|e| EmuError::BadRequest(format!("apply: {e}")))?;
        let text = |p: &str| {
            obj.pointer(p)
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string()
        };
        let (api_version, kind, name, ns) = (
            text("/apiVersion"),
            text("/kind"),
            text("/metadata/name"),
            text("/metadata/namespace"),
        );
        let res = store::by_kind(&api_version, &kind)
            .filter(|r| self.shared.store().served(r))
            .ok_or_else(|| {
                EmuError::BadRequest(format!(
                    "apply: apiVersion {api_version:?} kind {kind:?} is not served"
                ))
            })?;
        let ns = (res.namespaced).then(|| {
            if ns.is_empty() {
                "default".to_string()
            } else {
                ns
            }
        });
        if let Some(meta) = obj.get_mut("metadata").and_then(Value::as_object_mut) {
            meta.remove("resourceVersion");
        }
        let mut store = self.shared.store();
        let stored = if store.get(res, ns.as_deref(), &name).is_ok() {
            store.replace(res, ns.as_deref(), &name, obj)?
        } else {
            store.create(res, ns.as_deref(), obj)?
        };
        Ok((*stored).clone())
    }

    /// Creates the CustomResourceDefinitions of the three admin policy kinds (names, group,
    /// versions and scope as upstream's; no schema), so that they are served.
    pub fn install_admin_crds(&self) -> Result<(), EmuError> {
        for r in store::RESOURCES.iter().filter(|r| r.crd) {
            self.apply(json!({
                "apiVersion": "apiextensions.k8s.io/v1",
                "kind": "CustomResourceDefinition",
                "metadata": {"name": r.crd_name()},
                "spec": {
                    "group": r.group,
                    "scope": if r.namespaced { "Namespaced" } else { "Cluster" },
                    "names": {"plural": r.plural, "kind": r.kind,
                              "singular": r.kind.to_lowercase(),
                              "listKind": format!("{}List", r.kind)},
                    "versions": [{"name": r.version, "served": true, "storage": true}],
                },
            }))?;
        }
        Ok(())
    }

    /// Applies a JSON merge patch to an object, as `kubectl patch --type merge` does.
    pub fn merge_patch(
        &self,
        plural: &str,
        namespace: Option<&str>,
        name: &str,
        patch: &Value,
    ) -> Result<Value, EmuError> {
        let res = resource(plural)?;
        let body = serde_json::to_vec(patch)
            .map_err(|e| EmuError::BadRequest(format!("merge_patch: {e}")))?;
        let stored =
            self.shared
                .store()
                .patch(res, namespace, name, store::PatchKind::Merge, &body)?;
        Ok((*stored).clone())
    }

    /// Deletes an object (`plural` as in the path: `pods`, `networkpolicies`, ...).
    pub fn delete(
        &self,
        plural: &str,
        namespace: Option<&str>,
        name: &str,
    ) -> Result<Value, EmuError> {
        let res = resource(plural)?;
        Ok((*self.shared.store().delete(res, namespace, name)?).clone())
    }

    /// One object, if it exists.
    pub fn get(&self, plural: &str, namespace: Option<&str>, name: &str) -> Option<Value> {
        let res = resource(plural).ok()?;
        self.shared
            .store()
            .get(res, namespace, name)
            .ok()
            .map(|o| (*o).clone())
    }

    /// Every object of a type, optionally only in one namespace, ordered by namespace and name.
    pub fn list(&self, plural: &str, namespace: Option<&str>) -> Vec<Value> {
        let Ok(res) = resource(plural) else {
            return Vec::new();
        };
        self.shared
            .store()
            .list(&Filter::all(res, namespace))
            .iter()
            .map(|o| (**o).clone())
            .collect()
    }

    /// The current global resourceVersion.
    pub fn resource_version(&self) -> String {
        self.shared.store().rv().to_string()
    }

    /// Drops all history: a watch resuming from an older resourceVersion gets 410 Expired.
    pub fn compact(&self) {
        self.shared.store().compact();
    }

    /// Closes every open watch stream, as a dropped connection would.
    pub fn break_watches(&self) {
        self.shared.break_watches();
    }

    /// Closes every open watch and holds new watch requests unanswered until
    /// [`Emulator::resume_watches`]: changes made meanwhile reach clients only by resuming.
    pub fn pause_watches(&self) {
        self.shared.paused.send_replace(WatchGate::Held);
        self.shared.break_watches();
    }

    /// Lets held and new watch requests through again.
    pub fn resume_watches(&self) {
        self.shared.paused.send_if_modified(|gate| {
            let held = *gate == WatchGate::Held;
            if held {
                *gate = WatchGate::Open;
            }
            held
        });
    }

    /// Watch streams open now.
    pub fn watch_count(&self) -> usize {
        self.shared.watches.load(Ordering::SeqCst)
    }

    /// Blocks (polling) until at least `n` watches are open; false if `timeout` passed first.
    /// For plain `#[test]` functions; async code should poll [`Emulator::watch_count`] itself.
    pub fn wait_for_watches(&self, n: usize, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while self.watch_count() < n {
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        true
    }

    /// Every request served so far (the latest 10 000): (method, path and query).
    pub fn requests(&self) -> Vec<(String, String)> {
        self.shared
            .requests
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .cloned()
            .collect()
    }
}

impl Drop for Emulator {
    fn drop(&mut self) {
        self.shared.paused.send_replace(WatchGate::Stopped);
        self.shared.break_watches();
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn resource(plural: &str) -> Result<&'static ResourceType, EmuError> {
    RESOURCES
        .iter()
        .find(|r| r.plural == plural)
        .ok_or_else(|| EmuError::BadRequest(format!("resource {plural:?} is not served")))
}
