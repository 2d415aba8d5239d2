//! The object store: one global resourceVersion, objects keyed by (resource, namespace, name),
//! and a bounded history of changes that watches replay from.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

use serde_json::{Value, json};
use tokio::sync::broadcast;

use crate::EmuError;
use crate::select::{FieldSelector, LabelSelector};

/// A resource type the emulator serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResourceType {
    /// Plural name as it appears in paths: `pods`. Unique among [`RESOURCES`].
    pub plural: &'static str,
    /// API group: `""` for core, `networking.k8s.io`.
    pub group: &'static str,
    /// API version within the group: `v1`, `v1alpha2`.
    pub version: &'static str,
    /// Kind: `Pod`.
    pub kind: &'static str,
    /// Whether objects live in a namespace.
    pub namespaced: bool,
    /// A custom resource: served only while its CustomResourceDefinition (named
    /// `<plural>.<group>`) exists; deleting the definition deletes its objects.
    pub crd: bool,
}

impl ResourceType {
    /// `v1` or `networking.k8s.io/v1`.
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.to_string()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    /// The name of its CustomResourceDefinition: `clusternetworkpolicies.policy.networking.k8s.io`.
    pub fn crd_name(&self) -> String {
        format!("{}.{}", self.plural, self.group)
    }
}

const fn resource(
    plural: &'static str,
    group: &'static str,
    version: &'static str,
    kind: &'static str,
    namespaced: bool,
    crd: bool,
) -> ResourceType {
    ResourceType {
        plural,
        group,
        version,
        kind,
        namespaced,
        crd,
    }
}

/// The group of the cluster-wide admin policies.
pub const POLICY_GROUP: &str = "policy.networking.k8s.io";

/// Every resource type known. Custom resources are served only while their definition exists.
pub static RESOURCES: [ResourceType; 10] = [
    resource("pods", "", "v1", "Pod", true, false),
    resource("namespaces", "", "v1", "Namespace", false, false),
    resource("nodes", "", "v1", "Node", false, false),
    resource("secrets", "", "v1", "Secret", true, false),
    resource("configmaps", "", "v1", "ConfigMap", true, false),
    resource(
        "networkpolicies",
        "networking.k8s.io",
        "v1",
        "NetworkPolicy",
        true,
        false,
    ),
    resource(
        "customresourcedefinitions",
        "apiextensions.k8s.io",
        "v1",
        "CustomResourceDefinition",
        false,
        false,
    ),
    resource(
        "clusternetworkpolicies",
        POLICY_GROUP,
        "v1alpha2",
        "ClusterNetworkPolicy",
        false,
        true,
    ),
    resource(
        "adminnetworkpolicies",
        POLICY_GROUP,
        "v1alpha1",
        "AdminNetworkPolicy",
        false,
        true,
    ),
    resource(
        "baselineadminnetworkpolicies",
        POLICY_GROUP,
        "v1alpha1",
        "BaselineAdminNetworkPolicy",
        false,
        true,
    ),
];

/// The CustomResourceDefinition type.
pub fn crd_type() -> &'static ResourceType {
    &RESOURCES[6]
}

/// Looks a resource type up by group, version and plural.
pub fn by_plural(group: &str, version: &str, plural: &str) -> Option<&'static ResourceType> {
    RESOURCES
        .iter()
        .find(|r| r.group == group && r.version == version && r.plural == plural)
}

/// Looks a resource type up by apiVersion and kind.
pub fn by_kind(api_version: &str, kind: &str) -> Option<&'static ResourceType> {
    RESOURCES
        .iter()
        .find(|r| r.api_version() == api_version && r.kind == kind)
}

type Key = (&'static str, String, String);

impl Store {
    /// Whether a resource type is served now: always, or for a custom resource while its
    /// definition exists.
    pub fn served(&self, res: &ResourceType) -> bool {
        !res.crd || self.get(crd_type(), None, &res.crd_name()).is_ok()
    }
}

/// What happened to an object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeKind {
    Added,
    Modified,
    Deleted,
}

/// One entry of the history: the object after the change (for a delete: its last state with
/// the delete's resourceVersion) and, for a modification, the object before it.
#[derive(Debug)]
pub struct Change {
    pub rv: u64,
    pub res: &'static ResourceType,
    pub kind: ChangeKind,
    pub obj: Arc<Value>,
    pub prev: Option<Arc<Value>>,
}

/// Which objects a list or watch sees.
#[derive(Debug, Clone)]
pub struct Filter {
    pub res: &'static ResourceType,
    pub namespace: Option<String>,
    pub name: Option<String>,
    pub labels: LabelSelector,
    pub fields: FieldSelector,
}

impl Filter {
    /// Everything of one resource type, optionally in one namespace.
    pub fn all(res: &'static ResourceType, namespace: Option<&str>) -> Self {
        Filter {
            res,
            namespace: namespace.map(str::to_string),
            name: None,
            labels: LabelSelector::default(),
            fields: FieldSelector::default(),
        }
    }

    fn matches(&self, obj: &Value) -> bool {
        let meta = |f: &str| {
            obj.pointer(&format!("/metadata/{f}"))
                .and_then(Value::as_str)
        };
        self.namespace
            .as_deref()
            .is_none_or(|ns| meta("namespace") == Some(ns))
            && self.name.as_deref().is_none_or(|n| meta("name") == Some(n))
            && self.labels.matches(obj)
            && self.fields.matches(obj)
    }

    /// How a change looks through this filter, as the real watch cache shows it: an object
    /// that starts matching is ADDED, one that stops matching is DELETED.
    pub fn event_for<'c>(&self, change: &'c Change) -> Option<(&'static str, &'c Arc<Value>)> {
        if change.res.plural != self.res.plural {
            return None;
        }
        let now = self.matches(&change.obj);
        let before = change.prev.as_ref().is_some_and(|p| self.matches(p));
        let kind = match (change.kind, before, now) {
            (ChangeKind::Added, _, true) => "ADDED",
            (ChangeKind::Deleted, _, true) => "DELETED",
            (ChangeKind::Modified, true, true) => "MODIFIED",
            (ChangeKind::Modified, false, true) => "ADDED",
            (ChangeKind::Modified, true, false) => "DELETED",
            _ => return None,
        };
        Some((kind, &change.obj))
    }
}

/// Where a new watch starts.
pub struct WatchStart {
    /// Events to send before live ones: synthetic ADDED for current objects, or a replay.
    pub backlog: Vec<(&'static str, Arc<Value>)>,
    /// Live changes after `rv`.
    pub live: broadcast::Receiver<Arc<Change>>,
    /// The store's resourceVersion when the watch started.
    pub rv: u64,
}

/// How a PATCH body is interpreted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PatchKind {
    /// `application/merge-patch+json` (RFC 7386); strategic merge patch is treated the same.
    Merge,
    /// `application/json-patch+json` (RFC 6902).
    Json,
    /// `application/apply-patch+yaml`: server-side apply, emulated as a merge that may create.
    Apply,
}

/// The emulated etcd + watch cache.
pub struct Store {
    rv: u64,
    objects: BTreeMap<Key, Arc<Value>>,
    history: VecDeque<Arc<Change>>,
    history_limit: usize,
    compacted: u64,
    tx: broadcast::Sender<Arc<Change>>,
}

impl Store {
    pub fn new(history_limit: usize) -> Self {
        Store {
            rv: 1,
            objects: BTreeMap::new(),
            history: VecDeque::new(),
            history_limit: history_limit.max(1),
            compacted: 1,
            tx: broadcast::channel(4096).0,
        }
    }

    /// The current global resourceVersion.
    pub fn rv(&self) -> u64 {
        self.rv
    }

    /// Drops every retained change: a watch from an older resourceVersion gets 410 Expired.
    pub fn compact(&mut self) {
        self.history.clear();
        self.compacted = self.rv;
    }

    pub fn get(
        &self,
        res: &'static ResourceType,
        ns: Option<&str>,
        name: &str,
    ) -> Result<Arc<Value>, EmuError> {
        self.objects
            .get(&key(res, ns, name))
            .cloned()
            .ok_or_else(|| not_found(res, name))
    }

    /// Objects passing the filter, in key order (namespace, name), as etcd returns them.
    pub fn list(&self, filter: &Filter) -> Vec<Arc<Value>> {
        self.objects
            .range((filter.res.plural, String::new(), String::new())..)
            .take_while(|((plural, _, _), _)| *plural == filter.res.plural)
            .filter(|(_, obj)| filter.matches(obj))
            .map(|(_, obj)| obj.clone())
            .collect()
    }

    /// Starts a watch: `from` None means "current state as ADDED events, then changes".
    pub fn watch(&self, filter: &Filter, from: Option<u64>) -> Result<WatchStart, EmuError> {
        let backlog = match from {
            None => self
                .list(filter)
                .into_iter()
                .map(|o| ("ADDED", o))
                .collect(),
            Some(rv) if rv < self.compacted => {
                return Err(EmuError::Expired(format!(
                    "too old resource version: {rv} ({})",
                    self.compacted
                )));
            }
            Some(rv) => self
                .history
                .iter()
                .filter(|c| c.rv > rv)
                .filter_map(|c| filter.event_for(c).map(|(t, o)| (t, o.clone())))
                .collect(),
        };
        Ok(WatchStart {
            backlog,
            live: self.tx.subscribe(),
            rv: self.rv,
        })
    }

    /// Creates an object. `ns` is the namespace of the request path, if any.
    pub fn create(
        &mut self,
        res: &'static ResourceType,
        ns: Option<&str>,
        mut obj: Value,
    ) -> Result<Arc<Value>, EmuError> {
        let name = self.normalize(res, ns, &mut obj, true)?;
        let k = key(res, ns, &name);
        if self.objects.contains_key(&k) {
            return Err(EmuError::AlreadyExists(format!(
                "{} \"{name}\" already exists",
                res.plural
            )));
        }
        let meta = metadata_mut(&mut obj);
        meta.insert("uid".into(), json!(uuid::Uuid::new_v4().to_string()));
        meta.insert("creationTimestamp".into(), json!(now_rfc3339()));
        meta.insert("generation".into(), json!(1));
        Ok(self.commit(res, k, ChangeKind::Added, obj, None))
    }

    /// Replaces an object (PUT). A resourceVersion in the body must be the stored one.
    pub fn replace(
        &mut self,
        res: &'static ResourceType,
        ns: Option<&str>,
        name: &str,
        mut obj: Value,
    ) -> Result<Arc<Value>, EmuError> {
        let k = key(res, ns, name);
        let old = self
            .objects
            .get(&k)
            .cloned()
            .ok_or_else(|| not_found(res, name))?;
        let body_name = self.normalize(res, ns, &mut obj, false)?;
        if body_name != name {
            return Err(EmuError::BadRequest(format!(
                "{} \"{name}\": metadata.name in the body is {body_name:?}",
                res.plural
            )));
        }
        let old_rv = old
            .pointer("/metadata/resourceVersion")
            .cloned()
            .unwrap_or(Value::Null);
        match obj.pointer("/metadata/resourceVersion") {
            Some(rv) if *rv != old_rv => {
                return Err(EmuError::Conflict(format!(
                    "Operation cannot be fulfilled on {} \"{name}\": the object has been modified; \
                     please apply your changes to the latest version and try again",
                    res.plural
                )));
            }
            _ => {}
        }
        let meta = metadata_mut(&mut obj);
        for field in ["uid", "creationTimestamp", "generation"] {
            match old.pointer(&format!("/metadata/{field}")) {
                Some(v) => meta.insert(field.into(), v.clone()),
                None => meta.remove(field),
            };
        }
        meta.insert("resourceVersion".into(), old_rv);
        if obj == *old {
            return Ok(old); // a no-op update changes nothing, not even the resourceVersion
        }
        if obj.get("spec") != old.get("spec") {
            let generation = old
                .pointer("/metadata/generation")
                .and_then(Value::as_u64)
                .unwrap_or(0);
            metadata_mut(&mut obj).insert("generation".into(), json!(generation + 1));
        }
        Ok(self.commit(res, k, ChangeKind::Modified, obj, Some(old)))
    }

    /// Patches an object. A resourceVersion set by the patch must be the stored one.
    pub fn patch(
        &mut self,
        res: &'static ResourceType,
        ns: Option<&str>,
        name: &str,
        kind: PatchKind,
        body: &[u8],
    ) -> Result<Arc<Value>, EmuError> {
        let parse_err = |e: &dyn std::fmt::Display| {
            EmuError::BadRequest(format!("{} \"{name}\": patch body: {e}", res.plural))
        };
        let current = match self.get(res, ns, name) {
            Err(e) if kind != PatchKind::Apply => return Err(e),
            found => found.ok(),
        };
        let patch: Value = match kind {
            PatchKind::Apply => serde_norway::from_slice(body).map_err(|e| parse_err(&e))?,
            PatchKind::Merge | PatchKind::Json => {
                serde_json::from_slice(body).map_err(|e| parse_err(&e))?
            }
        };
        let Some(current) = current else {
            // Server-side apply creates what does not exist.
            let mut obj = patch;
            metadata_mut(&mut obj).insert("name".into(), json!(name));
            return self.create(res, ns, obj);
        };
        let mut obj = (*current).clone();
        match kind {
            PatchKind::Merge | PatchKind::Apply => json_patch::merge(&mut obj, &patch),
            PatchKind::Json => {
                let ops: json_patch::Patch =
                    serde_json::from_value(patch).map_err(|e| parse_err(&e))?;
                json_patch::patch(&mut obj, &ops).map_err(|e| parse_err(&e))?;
            }
        }
        self.replace(res, ns, name, obj)
    }

    /// Deletes an object; deleting a namespace deletes everything in it first.
    pub fn delete(
        &mut self,
        res: &'static ResourceType,
        ns: Option<&str>,
        name: &str,
    ) -> Result<Arc<Value>, EmuError> {
        let k = key(res, ns, name);
        let old = self
            .objects
            .get(&k)
            .cloned()
            .ok_or_else(|| not_found(res, name))?;
        if res.plural == crd_type().plural
            && let Some(custom) = RESOURCES.iter().find(|r| r.crd && r.crd_name() == name)
        {
            let inside: Vec<Key> = self
                .objects
                .keys()
                .filter(|(plural, _, _)| *plural == custom.plural)
                .cloned()
                .collect();
            for (_, _, member) in inside {
                self.delete(custom, None, &member)?;
            }
        }
        if res.plural == "namespaces" {
            let inside: Vec<Key> = self
                .objects
                .keys()
                .filter(|(_, n, _)| n == name)
                .cloned()
                .collect();
            for (plural, n, member) in inside {
                if let Some(r) = RESOURCES.iter().find(|r| r.plural == plural) {
                    self.delete(r, Some(&n), &member)?;
                }
            }
        }
        self.objects.remove(&k);
        Ok(self.commit(res, k, ChangeKind::Deleted, (*old).clone(), None))
    }

    /// Assigns the next resourceVersion, stores (or forgets) the object and publishes the change.
    fn commit(
        &mut self,
        res: &'static ResourceType,
        k: Key,
        kind: ChangeKind,
        mut obj: Value,
        prev: Option<Arc<Value>>,
    ) -> Arc<Value> {
        self.rv += 1;
        metadata_mut(&mut obj).insert("resourceVersion".into(), json!(self.rv.to_string()));
        let obj = Arc::new(obj);
        if kind != ChangeKind::Deleted {
            self.objects.insert(k, obj.clone());
        }
        let change = Arc::new(Change {
            rv: self.rv,
            res,
            kind,
            obj: obj.clone(),
            prev,
        });
        if self.history.len() >= self.history_limit
            && let Some(dropped) = self.history.pop_front()
        {
            self.compacted = dropped.rv;
        }
        self.history.push_back(change.clone());
        let _ = self.tx.send(change); // no receivers is fine
        obj
    }

    /// Checks and completes kind, apiVersion, name and namespace; returns the name.
    fn normalize(
        &self,
        res: &'static ResourceType,
        ns: Option<&str>,
        obj: &mut Value,
        allow_generate: bool,
    ) -> Result<String, EmuError> {
        let what = res.plural;
        let Some(map) = obj.as_object_mut() else {
            return Err(EmuError::BadRequest(format!(
                "{what}: the body is not a JSON object"
            )));
        };
        for (field, want) in [
            ("kind", res.kind),
            ("apiVersion", res.api_version().as_str()),
        ] {
            match map.get(field).and_then(Value::as_str) {
                Some(got) if got != want => {
                    return Err(EmuError::BadRequest(format!(
                        "{what}: {field} is {got:?}, expected {want:?}"
                    )));
                }
                _ => {
                    map.insert(field.into(), json!(want));
                }
            }
        }
        let meta = metadata_mut(obj);
        let name = match (
            meta.get("name").and_then(Value::as_str),
            meta.get("generateName").and_then(Value::as_str),
        ) {
            (Some(n), _) if !n.is_empty() => n.to_string(),
            (_, Some(prefix)) if allow_generate => {
                let suffix: String = uuid::Uuid::new_v4()
                    .simple()
                    .to_string()
                    .chars()
                    .take(5)
                    .collect();
                format!("{prefix}{suffix}")
            }
            _ => {
                return Err(EmuError::BadRequest(format!(
                    "{what}: metadata.name is required"
                )));
            }
        };
        if name.contains('/') || name.len() > 253 {
            return Err(EmuError::BadRequest(format!(
                "{what} {name:?}: metadata.name is not a valid name"
            )));
        }
        meta.insert("name".into(), json!(name));
        match (
            res.namespaced,
            ns,
            meta.get("namespace").and_then(Value::as_str),
        ) {
            (true, Some(path_ns), Some(body_ns)) if path_ns != body_ns => {
                return Err(EmuError::BadRequest(format!(
                    "{what} \"{name}\": metadata.namespace {body_ns:?} does not match the request namespace {path_ns:?}"
                )));
            }
            (true, Some(path_ns), _) => {
                meta.insert("namespace".into(), json!(path_ns));
            }
            (true, None, _) => {
                return Err(EmuError::BadRequest(format!(
                    "{what} \"{name}\": a namespace is required"
                )));
            }
            (false, _, _) => {
                meta.remove("namespace");
            }
        }
        Ok(name)
    }
}

fn key(res: &'static ResourceType, ns: Option<&str>, name: &str) -> Key {
    let ns = if res.namespaced {
        ns.unwrap_or_default()
    } else {
        ""
    };
    (res.plural, ns.to_string(), name.to_string())
}

fn not_found(res: &ResourceType, name: &str) -> EmuError {
    EmuError::NotFound(format!("{} \"{name}\" not found", res.plural))
}

/// `metadata` as a map, created (or replaced, if it was not an object) when needed.
fn metadata_mut(obj: &mut Value) -> &mut serde_json::Map<String, Value> {
    if !obj.is_object() {
        *obj = json!({});
    }
    let meta = &mut obj["metadata"];
    if !meta.is_object() {
        *meta = json!({});
    }
    match meta {
        Value::Object(map) => map,
        _ => unreachable!("metadata was just made an object"),
    }
}

fn now_rfc3339() -> String {
    let now = jiff::Timestamp::now();
    jiff::Timestamp::from_second(now.as_second())
        .unwrap_or(now)
        .to_string()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn res(plural: &str) -> &'static ResourceType {
        RESOURCES.iter().find(|r| r.plural == plural).unwrap()
    }

    fn cm(name: &str, data: &str) -> Value {
        json!({"metadata": {"name": name}, "data": {"k": data}})
    }

    fn rv_of(obj: &Value) -> u64 {
        obj["metadata"]["resourceVersion"]
            .as_str()
            .unwrap()
            .parse()
            .unwrap()
    }

    #[test]
    fn history_ring_overflow_expires_old_versions() {
        let mut store = Store::new(2);
        let first = store
            .create(res("configmaps"), Some("a"), cm("c", "0"))
            .unwrap();
        for i in 1..=3 {
            store
                .replace(res("configmaps"), Some("a"), "c", cm("c", &i.to_string()))
                .unwrap();
        }
        let filter = Filter::all(res("configmaps"), None);
        assert!(matches!(
            store.watch(&filter, Some(rv_of(&first))),
            Err(EmuError::Expired(_))
        ));
        let recent = store.watch(&filter, Some(store.rv() - 2)).unwrap();
        let kinds: Vec<_> = recent
            .backlog
            .iter()
            .map(|(k, o)| (*k, o["data"]["k"].clone()))
            .collect();
        assert_eq!(kinds, [("MODIFIED", json!("2")), ("MODIFIED", json!("3"))]);
    }

    #[test]
    fn noop_update_keeps_version_and_spec_change_bumps_generation() {
        let mut store = Store::new(10);
        let nodes = res("nodes");
        let created = store
            .create(
                nodes,
                None,
                json!({"metadata": {"name": "n"}, "spec": {"podCIDR": "a"}}),
            )
            .unwrap();
        let same = store.replace(nodes, None, "n", (*created).clone()).unwrap();
        assert_eq!(rv_of(&same), rv_of(&created));
        let changed = store
            .replace(
                nodes,
                None,
                "n",
                json!({"metadata": {"name": "n"}, "spec": {"podCIDR": "b"}}),
            )
            .unwrap();
        assert_eq!(changed["metadata"]["generation"], 2);
        assert_eq!(changed["metadata"]["uid"], created["metadata"]["uid"]);
        assert!(rv_of(&changed) > rv_of(&created));
    }

    #[test]
    fn deleting_a_namespace_deletes_its_objects() {
        let mut store = Store::new(10);
        store
            .create(res("namespaces"), None, json!({"metadata": {"name": "a"}}))
            .unwrap();
        store
            .create(res("pods"), Some("a"), json!({"metadata": {"name": "p"}}))
            .unwrap();
        store
            .create(res("pods"), Some("b"), json!({"metadata": {"name": "p"}}))
            .unwrap();
        store.delete(res("namespaces"), None, "a").unwrap();
        let left: Vec<_> = store
            .list(&Filter::all(res("pods"), None))
            .iter()
            .map(|p| p["metadata"]["namespace"].clone())
            .collect();
        assert_eq!(left, [json!("b")]);
    }

    #[test]
    fn bad_objects_are_refused_naming_the_field() {
        let mut store = Store::new(10);
        let pods = res("pods");
        let err = |r: Result<Arc<Value>, EmuError>| r.unwrap_err().to_string();
        assert!(
            err(store.create(pods, Some("a"), json!({"metadata": {}}))).contains("metadata.name")
        );
        assert!(
            err(store.create(
                pods,
                Some("a"),
                json!({"metadata": {"name": "p", "namespace": "b"}})
            ))
            .contains("metadata.namespace")
        );
        assert!(
            err(store.create(
                pods,
                Some("a"),
                json!({"kind": "Node", "metadata": {"name": "p"}})
            ))
            .contains("kind")
        );
        assert!(err(store.create(pods, Some("a"), json!([1]))).contains("not a JSON object"));
        assert!(
            err(store.patch(pods, Some("a"), "p", PatchKind::Merge, b"{")).contains("not found")
        );
        store
            .create(pods, Some("a"), json!({"metadata": {"name": "p"}}))
            .unwrap();
        assert!(
            err(store.patch(pods, Some("a"), "p", PatchKind::Merge, b"{")).contains("patch body")
        );
        let stale = json!({"metadata": {"resourceVersion": "1"}}).to_string();
        assert!(
            err(store.patch(pods, Some("a"), "p", PatchKind::Merge, stale.as_bytes()))
                .contains("modified")
        );
        let rename = json!({"metadata": {"name": "q"}}).to_string();
        assert!(
            err(store.patch(pods, Some("a"), "p", PatchKind::Merge, rename.as_bytes()))
                .contains("metadata.name")
        );
    }
}
