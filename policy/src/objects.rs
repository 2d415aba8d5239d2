//! Kubernetes objects from YAML text: multi-document streams and `kind: List`, as written by
//! `kubectl get ns,pods,netpol -A -o yaml`. Parsing text is pure; reading files is the caller's.
//!
//! [`parse`] turns one text (a file's content; the caller names its origin) into [`Object`]s, each
//! with the [`Origin`] it came from. Objects of other kinds (Service, Deployment, ...) are not
//! errors: they are returned as [`Skipped`]. Invalid objects are [`ObjectError`]s naming the
//! origin, the object and the field path, e.g.
//! `x.yaml: document 2 (NetworkPolicy demo/db): spec.ingress[0].ports[0].port: invalid type ...`.
//! Parsing continues after an invalid object; a YAML syntax error ends its stream.
//!
//! [`load`] feeds parsed objects into an [`Engine`]: namespaces and nodes first, then pods, then
//! NetworkPolicies, then the cluster-wide admin policies (ClusterNetworkPolicy
//! `policy.networking.k8s.io/v1alpha2`, AdminNetworkPolicy and BaselineAdminNetworkPolicy
//! `policy.networking.k8s.io/v1alpha1`), so that every object finds what it refers to. Nodes
//! (`v1`, as `kubectl get nodes -o yaml` prints them) are the inventory admin `nodes` peers
//! select from.
//!
//! ```
//! let text = "apiVersion: v1\nkind: List\nitems:\n- apiVersion: v1\n  kind: Namespace\n  metadata: {name: demo}\n- apiVersion: v1\n  kind: Service\n  metadata: {name: web, namespace: demo}\n";
//! let parsed = policy::objects::parse("cluster.yaml", text);
//! assert_eq!(parsed.objects.len(), 1);
//! assert_eq!(parsed.skipped[0].kind, "Service");
//! assert!(parsed.errors.is_empty());
//! ```

use std::collections::BTreeSet;
use std::fmt;

use k8s_openapi::api::core::v1::{Namespace, Node, Pod};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::de::DeserializeOwned;
use serde_norway::Value;
use thiserror::Error;

use crate::admin::{
    API_VERSION_V1ALPHA1, API_VERSION_V1ALPHA2, AdminNetworkPolicy, BaselineAdminNetworkPolicy,
    ClusterNetworkPolicy,
};
use crate::{AdminPolicyKey, AdminWarning, Engine, PolicyError};

/// An object the policy engine consumes.
// Objects are parsed once and applied once; boxing the pod would only add an allocation and
// change the contract's shape.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq)]
pub enum Object {
    Namespace(Namespace),
    /// `v1`, cluster-scoped: name, labels and `status.addresses`, for admin `nodes` peers.
    Node(Node),
    Pod(Pod),
    NetworkPolicy(NetworkPolicy),
    /// `policy.networking.k8s.io/v1alpha2`
    ClusterNetworkPolicy(ClusterNetworkPolicy),
    /// `policy.networking.k8s.io/v1alpha1`
    AdminNetworkPolicy(AdminNetworkPolicy),
    /// `policy.networking.k8s.io/v1alpha1`
    BaselineAdminNetworkPolicy(BaselineAdminNetworkPolicy),
}

/// The namespace given to namespaced objects that name none, as `kubectl apply` does in a
/// context without a namespace.
pub const DEFAULT_NAMESPACE: &str = "default";

/// Where an object came from: the source the caller named (a file path), the document in the
/// YAML stream and, for objects inside a list, the item.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Origin {
    /// What the caller named the text, usually a file path.
    pub source: String,
    /// 1-based index of the document in the stream (`---` separates documents).
    pub document: usize,
    /// 0-based index in the list's `items`, for objects inside a `List` / `PodList` / ...
    pub item: Option<usize>,
}

/// A value with the origin it was parsed from.
#[derive(Clone, Debug)]
pub struct Located<T> {
    pub origin: Origin,
    pub value: T,
}

/// An object of a kind the policy engine does not consume, left out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Skipped {
    pub origin: Origin,
    pub api_version: String,
    pub kind: String,
    /// `namespace/name`, `name`, or `<unnamed>`.
    pub name: String,
}

/// An object that could not be read, naming its origin, the object and the field.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
pub struct ObjectError {
    pub origin: Origin,
    /// `Kind namespace/name`, when the document tells that much.
    pub object: Option<String>,
    /// Path of the offending field, e.g. `spec.ingress[0].ports[0].port`; empty when the error
    /// is about the YAML text itself.
    pub field: String,
    pub message: String,
}

/// Everything read from one or more texts.
#[derive(Clone, Debug, Default)]
pub struct Parsed {
    pub objects: Vec<Located<Object>>,
    pub skipped: Vec<Skipped>,
    pub errors: Vec<ObjectError>,
}

/// An object the engine refused, with its origin.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
pub struct LoadError {
    pub origin: Origin,
    pub error: PolicyError,
}

/// What [`load`] did besides applying objects.
#[derive(Clone, Debug, Default)]
pub struct LoadReport {
    /// Objects the engine refused; the rest of the input was applied.
    pub errors: Vec<LoadError>,
    /// Namespaces that pods or policies live in but that the input did not contain. They were
    /// applied with no labels but `kubernetes.io/metadata.name`.
    pub implied_namespaces: Vec<String>,
    /// Admin policies applied with parts the engine cannot enforce as written (they fail
    /// closed): see [`crate::AdminApplied::warnings`].
    pub warnings: Vec<LoadWarning>,
}

/// A warning about an admin policy the engine applied, with its origin.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoadWarning {
    pub origin: Origin,
    pub policy: AdminPolicyKey,
    pub warning: AdminWarning,
}

impl fmt::Display for LoadWarning {
    /// `x.yaml: document 2 (ClusterNetworkPolicy/egress): spec.egress[0].to[0].nodes: ...`
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({}): {}", self.origin, self.policy, self.warning)
    }
}

/// The annotation that stages a NetworkPolicy or an admin policy: `"true"` means it is evaluated
/// beside the enforced policies (what it would change is shown: `tessera policy matrix
/// --staged`, the agent's flow log) but not enforced.
pub const STAGED_ANNOTATION: &str = "tessera.dev/staged";

/// Whether metadata carries [`STAGED_ANNOTATION`]`: "true"`.
pub fn is_staged_meta(meta: &ObjectMeta) -> bool {
    meta.annotations
        .as_ref()
        .and_then(|a| a.get(STAGED_ANNOTATION))
        .is_some_and(|v| v == "true")
}

impl Object {
    /// Whether this is a policy (NetworkPolicy or an admin kind) annotated
    /// [`STAGED_ANNOTATION`]`: "true"`.
    pub fn is_staged(&self) -> bool {
        let policy = matches!(
            self,
            Object::NetworkPolicy(_)
                | Object::ClusterNetworkPolicy(_)
                | Object::AdminNetworkPolicy(_)
                | Object::BaselineAdminNetworkPolicy(_)
        );
        policy && is_staged_meta(self.metadata())
    }

    /// `Namespace`, `Node`, `Pod`, `NetworkPolicy`, `ClusterNetworkPolicy`,
    /// `AdminNetworkPolicy` or `BaselineAdminNetworkPolicy`.
    pub fn kind(&self) -> &'static str {
        match self {
            Object::Namespace(_) => "Namespace",
            Object::Node(_) => "Node",
            Object::Pod(_) => "Pod",
            Object::NetworkPolicy(_) => "NetworkPolicy",
            Object::ClusterNetworkPolicy(_) => "ClusterNetworkPolicy",
            Object::AdminNetworkPolicy(_) => "AdminNetworkPolicy",
            Object::BaselineAdminNetworkPolicy(_) => "BaselineAdminNetworkPolicy",
        }
    }

    pub fn metadata(&self) -> &ObjectMeta {
        match self {
            Object::Namespace(o) => &o.metadata,
            Object::Node(o) => &o.metadata,
            Object::Pod(o) => &o.metadata,
            Object::NetworkPolicy(o) => &o.metadata,
            Object::ClusterNetworkPolicy(o) => &o.metadata,
            Object::AdminNetworkPolicy(o) => &o.metadata,
            Object::BaselineAdminNetworkPolicy(o) => &o.metadata,
        }
    }

    /// Whether objects of this kind are cluster-scoped (no namespace).
    fn cluster_scoped(&self) -> bool {
        matches!(
            self,
            Object::Namespace(_)
                | Object::Node(_)
                | Object::ClusterNetworkPolicy(_)
                | Object::AdminNetworkPolicy(_)
                | Object::BaselineAdminNetworkPolicy(_)
        )
    }

    /// `namespace/name` for pods and policies, `name` for namespaces, nodes and admin policies.
    pub fn name(&self) -> String {
        meta_name(self.metadata())
    }
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: document {}", self.source, self.document)?;
        if let Some(item) = self.item {
            write!(f, ", items[{item}]")?;
        }
        Ok(())
    }
}

impl fmt::Display for ObjectError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.origin)?;
        if let Some(object) = &self.object {
            write!(f, " ({object})")?;
        }
        if !self.field.is_empty() {
            write!(f, ": {}", self.field)?;
        }
        write!(f, ": {}", self.message)
    }
}

impl fmt::Display for LoadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let e = &self.error;
        write!(f, "{} ({} {})", self.origin, e.kind, e.object)?;
        if !e.field.is_empty() {
            write!(f, ": {}", e.field)?;
        }
        write!(f, ": {}", e.message)
    }
}

impl Parsed {
    /// Appends everything `other` holds, keeping order.
    pub fn extend(&mut self, other: Parsed) {
        self.objects.extend(other.objects);
        self.skipped.extend(other.skipped);
        self.errors.extend(other.errors);
    }
}

/// Parses one YAML (or JSON) text: every document of the stream, and every item of the lists in
/// it. `source` names the text in origins and errors. Never panics.
pub fn parse(source: &str, text: &str) -> Parsed {
    let mut parsed = Parsed::default();
    for (index, document) in serde_norway::Deserializer::from_str(text).enumerate() {
        let origin = Origin {
            source: source.to_owned(),
            document: index + 1,
            item: None,
        };
        let value = match <Value as serde::Deserialize>::deserialize(document) {
            Ok(value) => value,
            Err(err) => {
                // The text itself is broken: nothing after it can be trusted (and the stream
                // iterator would repeat the error forever).
                parsed.errors.push(ObjectError {
                    origin,
                    object: None,
                    field: String::new(),
                    message: format!("invalid YAML: {err}"),
                });
                break;
            }
        };
        parse_document(&mut parsed, origin, value);
    }
    parsed
}

fn parse_document(parsed: &mut Parsed, origin: Origin, value: Value) {
    let value = match value {
        // An empty document (a stray `---`, a file of comments).
        Value::Null => return,
        Value::Mapping(_) => value,
        other => {
            parsed.errors.push(ObjectError {
                origin,
                object: None,
                field: String::new(),
                message: format!(
                    "expected a Kubernetes object (a mapping), found {}",
                    value_type(&other)
                ),
            });
            return;
        }
    };
    let header = match Header::read(&value, None) {
        Ok(header) => header,
        Err((field, message)) => {
            parsed.errors.push(ObjectError {
                origin,
                object: None,
                field,
                message,
            });
            return;
        }
    };
    if header.kind == "List" || header.kind.ends_with("List") && value.get("items").is_some() {
        parse_list(parsed, origin, &header, value);
    } else {
        parse_object(parsed, origin, header, value);
    }
}

fn parse_list(parsed: &mut Parsed, origin: Origin, header: &Header, mut value: Value) {
    // `PodList` items carry no kind of their own when they come from the API server.
    let item_kind = header.kind.strip_suffix("List").filter(|k| !k.is_empty());
    let items = match value.get_mut("items").map(std::mem::take) {
        None | Some(Value::Null) => return,
        Some(Value::Sequence(items)) => items,
        Some(other) => {
            parsed.errors.push(ObjectError {
                origin,
                object: Some(header.kind.clone()),
                field: "items".to_owned(),
                message: format!(
                    "expected a sequence of objects, found {}",
                    value_type(&other)
                ),
            });
            return;
        }
    };
    for (index, item) in items.into_iter().enumerate() {
        let origin = Origin {
            item: Some(index),
            ..origin.clone()
        };
        if !item.is_mapping() {
            parsed.errors.push(ObjectError {
                origin,
                object: None,
                field: String::new(),
                message: format!(
                    "expected a Kubernetes object (a mapping), found {}",
                    value_type(&item)
                ),
            });
            continue;
        }
        let default = item_kind.map(|kind| (header.api_version.as_str(), kind));
        match Header::read(&item, default) {
            Ok(item_header) => parse_object(parsed, origin, item_header, item),
            Err((field, message)) => parsed.errors.push(ObjectError {
                origin,
                object: None,
                field,
                message,
            }),
        }
    }
}

fn parse_object(parsed: &mut Parsed, origin: Origin, header: Header, value: Value) {
    let expected_api_version = match header.kind.as_str() {
        "Namespace" | "Node" | "Pod" => "v1",
        "NetworkPolicy" => "networking.k8s.io/v1",
        "ClusterNetworkPolicy" => API_VERSION_V1ALPHA2,
        "AdminNetworkPolicy" | "BaselineAdminNetworkPolicy" => API_VERSION_V1ALPHA1,
        _ => {
            parsed.skipped.push(Skipped {
                origin,
                api_version: header.api_version,
                name: header.name,
                kind: header.kind,
            });
            return;
        }
    };
    let object_name = format!("{} {}", header.kind, header.name);
    if header.api_version != expected_api_version {
        parsed.errors.push(ObjectError {
            origin,
            object: Some(object_name),
            field: "apiVersion".to_owned(),
            message: format!(
                "{:?} is not supported for {}; expected {expected_api_version}",
                header.api_version, header.kind
            ),
        });
        return;
    }
    // The typed deserializers check `apiVersion` and `kind` when present: list items of a
    // `PodList` may have none, and only the header's (checked above) count.
    let mut value = value;
    if let Some(map) = value.as_mapping_mut() {
        map.remove("apiVersion");
        map.remove("kind");
    }
    let object = match header.kind.as_str() {
        "Namespace" => typed(value).map(Object::Namespace),
        "Node" => typed(value).map(Object::Node),
        "Pod" => typed(value).map(Object::Pod),
        "ClusterNetworkPolicy" => typed(value).map(Object::ClusterNetworkPolicy),
        "AdminNetworkPolicy" => typed(value).map(Object::AdminNetworkPolicy),
        "BaselineAdminNetworkPolicy" => typed(value).map(Object::BaselineAdminNetworkPolicy),
        _ => typed(value).map(Object::NetworkPolicy),
    };
    match object {
        Ok(mut object) => {
            let meta = match &mut object {
                Object::Pod(o) => Some(&mut o.metadata),
                Object::NetworkPolicy(o) => Some(&mut o.metadata),
                _ => None,
            };
            if let Some(meta) = meta
                && meta.namespace.as_deref().is_none_or(str::is_empty)
            {
                meta.namespace = Some(DEFAULT_NAMESPACE.to_owned());
            }
            parsed.objects.push(Located {
                origin,
                value: object,
            });
        }
        Err((field, message)) => parsed.errors.push(ObjectError {
            origin,
            object: Some(object_name),
            field,
            message,
        }),
    }
}

/// Deserializes a typed object, naming the field path of the first error.
fn typed<T: DeserializeOwned>(value: Value) -> Result<T, (String, String)> {
    serde_path_to_error::deserialize(value).map_err(|err| {
        let field = err.path().to_string();
        let field = if field == "." { String::new() } else { field };
        (field, err.into_inner().to_string())
    })
}

/// `apiVersion`, `kind` and name of a document, read leniently from the untyped value.
struct Header {
    api_version: String,
    kind: String,
    /// `namespace/name`, `name` or `<unnamed>`.
    name: String,
}

impl Header {
    /// `default`: the `apiVersion` and `kind` of items of a typed list, which may omit theirs.
    fn read(value: &Value, default: Option<(&str, &str)>) -> Result<Header, (String, String)> {
        let kind = match (value.get("kind"), default) {
            (Some(Value::String(kind)), _) if !kind.is_empty() => kind.clone(),
            (None | Some(Value::Null), Some((_, kind))) => kind.to_owned(),
            (None | Some(Value::Null), None) => {
                return Err((
                    "kind".to_owned(),
                    "missing: every object needs a kind".to_owned(),
                ));
            }
            (Some(other), _) => {
                return Err((
                    "kind".to_owned(),
                    format!("expected a non-empty string, found {}", value_type(other)),
                ));
            }
        };
        let api_version = match (value.get("apiVersion"), default) {
            (Some(Value::String(v)), _) if !v.is_empty() => v.clone(),
            (None | Some(Value::Null), Some((api_version, _))) => api_version.to_owned(),
            (None | Some(Value::Null), None) => {
                return Err((
                    "apiVersion".to_owned(),
                    format!("missing: every object needs an apiVersion (kind {kind})"),
                ));
            }
            (Some(other), _) => {
                return Err((
                    "apiVersion".to_owned(),
                    format!("expected a non-empty string, found {}", value_type(other)),
                ));
            }
        };
        let meta = value.get("metadata");
        let field = |name: &str| {
            meta.and_then(|m| m.get(name))
                .and_then(Value::as_str)
                .filter(|s| !s.is_empty())
        };
        let name = match (field("namespace"), field("name")) {
            (_, None) => "<unnamed>".to_owned(),
            (Some(ns), Some(name)) => format!("{ns}/{name}"),
            (None, Some(name))
                if kind == "Namespace"
                    || kind == "Node"
                    || kind.starts_with("Cluster")
                    || kind.ends_with("AdminNetworkPolicy") =>
            {
                name.to_owned()
            }
            (None, Some(name)) => format!("{DEFAULT_NAMESPACE}/{name}"),
        };
        Ok(Header {
            api_version,
            kind,
            name,
        })
    }
}

fn value_type(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Sequence(_) => "a sequence",
        Value::Mapping(_) => "a mapping",
        Value::Tagged(_) => "a tagged value",
    }
}

fn meta_name(meta: &ObjectMeta) -> String {
    match (meta.namespace.as_deref(), meta.name.as_deref()) {
        (_, None) => "<unnamed>".to_owned(),
        (Some(ns), Some(name)) if !ns.is_empty() => format!("{ns}/{name}"),
        (_, Some(name)) => name.to_owned(),
    }
}

/// Applies objects to `engine`: namespaces and nodes first, then pods, then NetworkPolicies, then
/// admin policies, each in input order.
/// Namespaces that pods or policies live in but that `objects` lacks are applied first with no
/// labels but their name (reported in [`LoadReport::implied_namespaces`]). Every refused object
/// is reported with its origin; the others are applied all the same.
pub fn load(engine: &mut Engine, objects: &[Located<Object>]) -> LoadReport {
    let mut report = LoadReport::default();
    let given: BTreeSet<&str> = objects
        .iter()
        .filter_map(|o| match &o.value {
            Object::Namespace(ns) => ns.metadata.name.as_deref(),
            _ => None,
        })
        .collect();
    let implied: BTreeSet<&str> = objects
        .iter()
        .filter(|o| !o.value.cluster_scoped())
        .filter_map(|o| o.value.metadata().namespace.as_deref())
        .filter(|ns| !ns.is_empty() && !given.contains(ns))
        .collect();
    for ns in implied {
        let namespace = Namespace {
            metadata: ObjectMeta {
                name: Some(ns.to_owned()),
                ..ObjectMeta::default()
            },
            ..Namespace::default()
        };
        // Its name was valid enough to name a pod's or a policy's namespace; should the engine
        // refuse it all the same, the objects in it report their own errors.
        if engine.apply_namespace(&namespace).is_ok() {
            report.implied_namespaces.push(ns.to_owned());
        }
    }
    for rank in 0..4 {
        for located in objects {
            let result = match (&located.value, rank) {
                (Object::Namespace(ns), 0) => engine.apply_namespace(ns),
                (Object::Node(node), 0) => engine.apply_node_object(node).map(drop),
                (Object::Pod(pod), 1) => engine.apply_pod(pod).map(drop),
                (Object::NetworkPolicy(policy), 2) => engine.apply_policy(policy).map(drop),
                (Object::ClusterNetworkPolicy(p), 3) => engine
                    .apply_cluster_network_policy(p)
                    .map(|a| warn(&mut report, &located.origin, a)),
                (Object::AdminNetworkPolicy(p), 3) => engine
                    .apply_admin_network_policy(p)
                    .map(|a| warn(&mut report, &located.origin, a)),
                (Object::BaselineAdminNetworkPolicy(p), 3) => engine
                    .apply_baseline_admin_network_policy(p)
                    .map(|a| warn(&mut report, &located.origin, a)),
                _ => continue,
            };
            if let Err(error) = result {
                report.errors.push(LoadError {
                    origin: located.origin.clone(),
                    error,
                });
            }
        }
    }
    report
}

/// Records an applied admin policy's warnings.
fn warn(report: &mut LoadReport, origin: &Origin, applied: crate::AdminApplied) {
    for warning in applied.warnings {
        report.warnings.push(LoadWarning {
            origin: origin.clone(),
            policy: applied.key.clone(),
            warning,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn names(parsed: &Parsed) -> Vec<String> {
        parsed
            .objects
            .iter()
            .map(|o| format!("{} {}", o.value.kind(), o.value.name()))
            .collect()
    }

    #[test]
    fn multi_document_stream_with_empty_documents() {
        let text = "\
---
apiVersion: v1
kind: Namespace
metadata:
  name: demo
  labels: {team: a}
---
# only a comment
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: deny, namespace: demo}
spec:
  podSelector: {}
---
apiVersion: v1
kind: Pod
metadata: {name: web}
spec:
  containers: [{name: web, image: nginx, ports: [{containerPort: 80}]}]
status: {podIP: 10.0.0.5}
";
        let parsed = parse("a.yaml", text);
        assert!(parsed.errors.is_empty(), "{:?}", parsed.errors);
        assert_eq!(
            names(&parsed),
            [
                "Namespace demo",
                "NetworkPolicy demo/deny",
                "Pod default/web"
            ]
        );
        assert_eq!(parsed.objects[1].origin.document, 3);
        assert_eq!(parsed.objects[2].origin.to_string(), "a.yaml: document 4");
    }

    #[test]
    fn kubectl_list_is_flattened_and_other_kinds_are_skipped() {
        let text = r#"
apiVersion: v1
kind: List
metadata:
  resourceVersion: ""
items:
- apiVersion: v1
  kind: Service
  metadata: {name: web, namespace: demo}
- apiVersion: apps/v1
  kind: Deployment
  metadata: {name: web, namespace: demo}
- apiVersion: v1
  kind: Pod
  metadata: {name: web-1, namespace: demo, labels: {role: WebFrontend}}
"#;
        let parsed = parse("list.yaml", text);
        assert!(parsed.errors.is_empty(), "{:?}", parsed.errors);
        assert_eq!(names(&parsed), ["Pod demo/web-1"]);
        assert_eq!(parsed.objects[0].origin.item, Some(2));
        let skipped: Vec<_> = parsed
            .skipped
            .iter()
            .map(|s| format!("{} {}", s.kind, s.name))
            .collect();
        assert_eq!(skipped, ["Service demo/web", "Deployment demo/web"]);
    }

    #[test]
    fn typed_lists_whose_items_have_no_kind() {
        let text = r#"
apiVersion: v1
kind: PodList
items:
- metadata: {name: a, namespace: x}
- metadata: {name: b, namespace: x}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicyList
items:
- metadata: {name: p, namespace: x}
  spec: {podSelector: {}}
---
apiVersion: v1
kind: NamespaceList
items:
- metadata: {name: x}
---
apiVersion: v1
kind: ServiceList
items:
- metadata: {name: s, namespace: x}
"#;
        let parsed = parse("typed.yaml", text);
        assert!(parsed.errors.is_empty(), "{:?}", parsed.errors);
        assert_eq!(
            names(&parsed),
            ["Pod x/a", "Pod x/b", "NetworkPolicy x/p", "Namespace x"]
        );
        assert_eq!(parsed.skipped[0].kind, "Service");
    }

    #[test]
    fn json_documents_parse_too() {
        let text = r#"{
  "apiVersion": "v1",
  "kind": "List",
  "items": [
    {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "demo"}}
  ]
}"#;
        let parsed = parse("ns.json", text);
        assert!(parsed.errors.is_empty(), "{:?}", parsed.errors);
        assert_eq!(names(&parsed), ["Namespace demo"]);
    }

    #[test]
    fn field_errors_name_origin_object_and_path() {
        let text = r#"
apiVersion: v1
kind: Namespace
metadata: {name: demo}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: db, namespace: demo}
spec:
  podSelector: {}
  ingress:
  - ports:
    - port: [80]
---
apiVersion: v1
kind: Namespace
metadata: {name: after}
"#;
        let parsed = parse("examples/x.yaml", text);
        assert_eq!(parsed.errors.len(), 1);
        let msg = parsed.errors[0].to_string();
        assert!(
            msg.starts_with(
                "examples/x.yaml: document 2 (NetworkPolicy demo/db): spec.ingress[0].ports[0].port: "
            ),
            "{msg}"
        );
        // An invalid object does not hide the valid ones around it.
        assert_eq!(names(&parsed), ["Namespace demo", "Namespace after"]);
    }

    #[test]
    fn errors_inside_lists_name_the_item() {
        let text = r#"
apiVersion: v1
kind: List
items:
- apiVersion: v1
  kind: Pod
  metadata: {name: ok, namespace: demo}
- apiVersion: v1
  kind: Pod
  metadata: {name: bad, namespace: demo}
  spec:
    containers:
    - name: c
      ports: [{containerPort: eighty}]
"#;
        let parsed = parse("l.yaml", text);
        assert_eq!(parsed.errors.len(), 1);
        let msg = parsed.errors[0].to_string();
        assert!(
            msg.starts_with(
                "l.yaml: document 1, items[1] (Pod demo/bad): spec.containers[0].ports[0].containerPort: "
            ),
            "{msg}"
        );
        assert_eq!(names(&parsed), ["Pod demo/ok"]);
    }

    #[test]
    fn wrong_or_missing_headers() {
        let cases = [
            ("metadata: {name: x}\n", "kind", "missing"),
            ("kind: Pod\nmetadata: {name: x}\n", "apiVersion", "missing"),
            ("kind: [Pod]\napiVersion: v1\n", "kind", "expected"),
            (
                "apiVersion: extensions/v1beta1\nkind: NetworkPolicy\nmetadata: {name: p}\n",
                "apiVersion",
                "networking.k8s.io/v1",
            ),
        ];
        for (text, field, words) in cases {
            let parsed = parse("h.yaml", text);
            assert_eq!(parsed.errors.len(), 1, "{text}");
            assert_eq!(parsed.errors[0].field, field, "{text}");
            assert!(parsed.errors[0].message.contains(words), "{text}");
        }
    }

    #[test]
    fn syntax_error_names_document_and_line_and_stops() {
        let text = "apiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n---\nkind: Pod\n  bad: [\n---\napiVersion: v1\nkind: Namespace\nmetadata: {name: b}\n";
        let parsed = parse("s.yaml", text);
        assert_eq!(names(&parsed), ["Namespace a"]);
        assert_eq!(parsed.errors.len(), 1);
        let msg = parsed.errors[0].to_string();
        assert!(
            msg.starts_with("s.yaml: document 2: invalid YAML: "),
            "{msg}"
        );
        assert!(msg.contains("line 6"), "{msg}");
    }

    #[test]
    fn hostile_inputs_do_not_panic() {
        let deep = "[".repeat(10_000);
        let deep_map = "a: ".repeat(5_000);
        let laughs = "a: &a [x,x,x,x,x,x,x,x,x]\nb: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]\nc: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]\nd: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]\ne: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]\nf: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]\ng: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f]\nh: &h [*g,*g,*g,*g,*g,*g,*g,*g,*g]\n";
        let inputs = [
            "",
            "---",
            "\u{feff}",
            "- 1\n- 2",
            "42",
            "!!binary aGVsbG8=",
            "kind: !Pod x\napiVersion: v1",
            "apiVersion: v1\nkind: List\nitems: 3",
            "apiVersion: v1\nkind: List\nitems: [1, [2], null]",
            "apiVersion: v1\nkind: PodList\nitems: [{kind: 7}]",
            "apiVersion: v1\nkind: List\nitems: [{apiVersion: v1, kind: List, items: []}]",
            "apiVersion: v1\nkind: Pod\nmetadata: {name: x}\nspec: {containers: [{name: c, ports: [{containerPort: 99999999999}]}]}",
            "apiVersion: v1\nkind: Pod\nmetadata: {name: x, creationTimestamp: not-a-time}",
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: x, labels: {a: {b: c}}}",
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: x}\nmetadata: {name: y}",
            "&a [*a]",
            "? [a]\n: b",
            &deep,
            &deep_map,
            laughs,
        ];
        for input in inputs {
            let _ = parse("hostile.yaml", input);
        }
    }

    #[test]
    fn load_applies_namespaces_then_pods_then_policies_and_reports_origins() {
        // Written in the "wrong" order: the policy first, the namespace last.
        let text = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: bad, namespace: demo}
spec:
  podSelector: {}
  ingress: [{ports: [{port: 9000, endPort: 8000}]}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: from-monitoring, namespace: demo}
spec:
  podSelector: {}
  ingress: [{from: [{namespaceSelector: {matchLabels: {team: ops}}}]}]
---
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: demo}
spec: {containers: [{name: c, ports: [{containerPort: 80}]}]}
status: {podIP: 10.0.0.1}
---
apiVersion: v1
kind: Pod
metadata: {name: prom, namespace: monitoring}
spec: {containers: [{name: c}]}
status: {podIP: 10.0.0.2}
---
apiVersion: v1
kind: Namespace
metadata: {name: monitoring, labels: {team: ops}}
"#;
        let parsed = parse("order.yaml", text);
        assert!(parsed.errors.is_empty(), "{:?}", parsed.errors);
        let mut engine = Engine::new();
        let report = load(&mut engine, &parsed.objects);
        assert_eq!(report.implied_namespaces, ["demo"]);
        assert_eq!(report.errors.len(), 1, "{:?}", report.errors);
        let msg = report.errors[0].to_string();
        assert!(
            msg.starts_with("order.yaml: document 1 (NetworkPolicy demo/bad): spec.ingress[0].ports[0].endPort: "),
            "{msg}"
        );
        let key = |ns: &str, name: &str| crate::PodKey {
            namespace: ns.into(),
            name: name.into(),
        };
        let from = crate::matrix::Source::Pod(key("monitoring", "prom"));
        let probe = crate::matrix::Probe {
            port: 80,
            protocol: crate::Protocol::Tcp,
        };
        // The namespace's labels were known when the policy was compiled.
        let verdict = crate::matrix::evaluate(&engine, &from, &key("demo", "web"), probe);
        assert_eq!(verdict.map(|v| v.allowed), Some(true));
    }

    /// `kubectl get nodes -o yaml`, trimmed of nothing the parser should choke on.
    const KUBECTL_NODES: &str = r#"
apiVersion: v1
items:
- apiVersion: v1
  kind: Node
  metadata:
    annotations:
      node.alpha.kubernetes.io/ttl: "0"
      volumes.kubernetes.io/controller-managed-attach-detach: "true"
    creationTimestamp: "2024-05-02T09:12:44Z"
    labels:
      beta.kubernetes.io/arch: amd64
      kubernetes.io/hostname: cp-1
      node-role.kubernetes.io/control-plane: ""
      topology.kubernetes.io/zone: eu-1a
    name: cp-1
    resourceVersion: "123456"
    uid: 0b8e2a52-5b6a-4c1e-9a7e-3c1f3c2d9d11
  spec:
    podCIDR: 10.244.0.0/24
    podCIDRs: [10.244.0.0/24, fd00:10:244::/64]
    taints:
    - effect: NoSchedule
      key: node-role.kubernetes.io/control-plane
  status:
    addresses:
    - address: 172.18.0.2
      type: InternalIP
    - address: fc00:f853:ccd:e793::2
      type: InternalIP
    - address: 203.0.113.10
      type: ExternalIP
    - address: cp-1
      type: Hostname
    - address: cp-1.eu-1a.internal
      type: InternalDNS
    allocatable: {cpu: "8", memory: 32817052Ki, pods: "110"}
    capacity: {cpu: "8", memory: 32817052Ki, pods: "110"}
    conditions:
    - lastHeartbeatTime: "2024-05-02T10:00:00Z"
      lastTransitionTime: "2024-05-02T09:13:10Z"
      message: kubelet is posting ready status
      reason: KubeletReady
      status: "True"
      type: Ready
    daemonEndpoints:
      kubeletEndpoint: {Port: 10250}
    nodeInfo:
      architecture: amd64
      bootID: 6c2d
      containerRuntimeVersion: containerd://1.7.15
      kernelVersion: 6.8.0
      kubeProxyVersion: v1.30.0
      kubeletVersion: v1.30.0
      machineID: 9f1e
      operatingSystem: linux
      osImage: Debian GNU/Linux 12 (bookworm)
      systemUUID: 9f1e
- apiVersion: v1
  kind: Node
  metadata:
    labels: {kubernetes.io/hostname: worker-1, topology.kubernetes.io/zone: eu-1b}
    name: worker-1
  status:
    addresses:
    - {address: 172.18.0.3, type: InternalIP}
    - {address: 172.18.0.3, type: ExternalIP}
kind: List
metadata:
  resourceVersion: ""
"#;

    #[test]
    fn nodes_as_kubectl_prints_them_feed_the_inventory() {
        let parsed = parse("nodes.yaml", KUBECTL_NODES);
        assert!(parsed.errors.is_empty(), "{:?}", parsed.errors);
        assert_eq!(names(&parsed), ["Node cp-1", "Node worker-1"]);
        let mut engine = Engine::new();
        let report = load(&mut engine, &parsed.objects);
        assert!(report.errors.is_empty(), "{:?}", report.errors);
        assert!(report.implied_namespaces.is_empty());
        let Some(cp) = engine.node("cp-1") else {
            panic!("cp-1 was not loaded");
        };
        let ips: Vec<String> = cp.addresses.iter().map(ToString::to_string).collect();
        // InternalIP and ExternalIP, in order; Hostname and InternalDNS are names.
        assert_eq!(ips, ["172.18.0.2", "fc00:f853:ccd:e793::2", "203.0.113.10"]);
        assert_eq!(
            cp.labels.get("node-role.kubernetes.io/control-plane"),
            Some(&String::new())
        );
        // One address listed as both types is one address.
        let Some(worker) = engine.node("worker-1") else {
            panic!("worker-1 was not loaded");
        };
        assert_eq!(worker.addresses.len(), 1);
        let names: Vec<&str> = engine.nodes().map(|n| n.name.as_str()).collect();
        assert_eq!(names, ["cp-1", "worker-1"]);
    }

    #[test]
    fn node_errors_name_the_field() {
        let text = r#"
apiVersion: v1
kind: Node
metadata: {name: bad}
status:
  addresses:
  - {address: cp-1, type: Hostname}
  - {address: 10.0.0.300, type: InternalIP}
---
apiVersion: v1
kind: Node
metadata: {name: multicast}
status: {addresses: [{address: "224.0.0.1", type: ExternalIP}]}
---
apiVersion: v1
kind: Node
metadata: {name: Upper}
---
apiVersion: v1beta1
kind: Node
metadata: {name: old}
"#;
        let parsed = parse("n.yaml", text);
        assert_eq!(parsed.errors.len(), 1, "{:?}", parsed.errors);
        assert_eq!(parsed.errors[0].field, "apiVersion");
        let mut engine = Engine::new();
        let report = load(&mut engine, &parsed.objects);
        let errors: Vec<String> = report.errors.iter().map(ToString::to_string).collect();
        assert_eq!(errors.len(), 3, "{errors:?}");
        assert!(
            errors[0].starts_with(
                "n.yaml: document 1 (Node bad): status.addresses[1].address: \"10.0.0.300\" is not a valid IP address"
            ),
            "{}",
            errors[0]
        );
        assert!(
            errors[1].contains(
                "(Node multicast): status.addresses[0].address: 224.0.0.1 is not a unicast address"
            ),
            "{}",
            errors[1]
        );
        assert!(
            errors[2].contains("(Node Upper): metadata.name: "),
            "{}",
            errors[2]
        );
        assert_eq!(engine.node_count(), 0);
    }

    proptest! {
        #[test]
        fn arbitrary_text_never_panics(text in "\\PC{0,200}") {
            let _ = parse("p.yaml", &text);
        }

        #[test]
        fn yamlish_text_never_panics(
            lines in proptest::collection::vec(
                prop_oneof![
                    Just("apiVersion: v1".to_owned()),
                    Just("apiVersion: networking.k8s.io/v1".to_owned()),
                    Just("kind: List".to_owned()),
                    Just("kind: Pod".to_owned()),
                    Just("kind: NetworkPolicy".to_owned()),
                    Just("items:".to_owned()),
                    Just("- ".to_owned()),
                    Just("---".to_owned()),
                    Just("metadata: {name: a, namespace: b}".to_owned()),
                    Just("spec:".to_owned()),
                    Just("  podSelector: {}".to_owned()),
                    Just("  ingress: [{ports: [{port: 80, endPort: 70}]}]".to_owned()),
                    "[ a-z:\\-\\[\\]{}0-9]{0,20}",
                ],
                0..30,
            )
        ) {
            let _ = parse("p.yaml", &lines.join("\n"));
        }
    }
}
