//! The HTTP side: path routing as the API server does it, CRUD, lists and watch streams.

use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use tokio::sync::{broadcast, mpsc};

use crate::select::{FieldSelector, LabelSelector};
use crate::store::{Filter, PatchKind, RESOURCES, ResourceType, Store, by_plural};
use crate::{EmuError, Shared, WatchGate};

/// What a path names.
enum Target {
    Collection(&'static ResourceType, Option<String>),
    Item(&'static ResourceType, Option<String>, String),
}

pub(crate) fn router(shared: Arc<Shared>) -> axum::Router {
    axum::Router::new().fallback(handle).with_state(shared)
}

async fn handle(
    State(shared): State<Arc<Shared>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let path_query = uri
        .path_and_query()
        .map_or_else(|| uri.path().to_string(), |pq| pq.as_str().to_string());
    shared.log_request(method.as_str(), &path_query);
    let query: Vec<(String, String)> =
        form_urlencoded::parse(uri.query().unwrap_or_default().as_bytes())
            .into_owned()
            .collect();
    let param = |k: &str| {
        query
            .iter()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.as_str())
    };
    let flag = |k: &str| matches!(param(k), Some("true" | "1"));

    let segments: Vec<&str> = uri.path().trim_matches('/').split('/').collect();
    let served = |r: &&'static ResourceType| shared.store().served(r);
    let (group, version, rest) = match segments.as_slice() {
        ["version"] => return json_response(StatusCode::OK, &version()),
        ["api"] => {
            return json_response(
                StatusCode::OK,
                &json!({"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": []}),
            );
        }
        ["apis"] => return json_response(StatusCode::OK, &api_groups(&shared.store())),
        ["api", "v1"] => {
            return json_response(StatusCode::OK, &resource_list(&shared.store(), "", "v1"));
        }
        ["apis", group, version] => {
            let list = resource_list(&shared.store(), group, version);
            if list["resources"].as_array().is_some_and(Vec::is_empty) {
                return no_route();
            }
            return json_response(StatusCode::OK, &list);
        }
        ["api", "v1", rest @ ..] => ("", "v1", rest),
        ["apis", group, version, rest @ ..] => (*group, *version, rest),
        _ => return no_route(),
    };
    let target = match rest {
        ["namespaces", ns, plural] => by_plural(group, version, plural)
            .filter(served)
            .filter(|r| r.namespaced)
            .map(|r| Target::Collection(r, Some(ns.to_string()))),
        ["namespaces", ns, plural, name] => by_plural(group, version, plural)
            .filter(served)
            .filter(|r| r.namespaced)
            .map(|r| Target::Item(r, Some(ns.to_string()), name.to_string())),
        [plural] => by_plural(group, version, plural)
            .filter(served)
            .map(|r| Target::Collection(r, None)),
        [plural, name] => by_plural(group, version, plural)
            .filter(served)
            .filter(|r| !r.namespaced)
            .map(|r| Target::Item(r, None, name.to_string())),
        _ => None,
    };
    let Some(target) = target else {
        return no_route();
    };

    let result = match (&method, target) {
        (&Method::GET, target) if flag("watch") => {
            let (res, ns, name) = match target {
                Target::Collection(res, ns) => (res, ns, None),
                Target::Item(res, ns, name) => (res, ns, Some(name)),
            };
            match filter_from(
                res,
                ns,
                name,
                param("labelSelector"),
                param("fieldSelector"),
            ) {
                Ok(filter) => {
                    return watch(
                        shared,
                        filter,
                        param("resourceVersion"),
                        param("timeoutSeconds"),
                        flag("allowWatchBookmarks"),
                        flag("sendInitialEvents"),
                    )
                    .await;
                }
                Err(e) => Err(e),
            }
        }
        (&Method::GET, Target::Collection(res, ns)) => filter_from(
            res,
            ns,
            None,
            param("labelSelector"),
            param("fieldSelector"),
        )
        .map(|filter| {
            let store = shared.store();
            let items: Vec<Value> = store.list(&filter).iter().map(|o| strip_type(o)).collect();
            let list = json!({
                "kind": format!("{}List", res.kind),
                "apiVersion": res.api_version(),
                "metadata": {"resourceVersion": store.rv().to_string()},
                "items": items,
            });
            (StatusCode::OK, list)
        }),
        (&Method::GET, Target::Item(res, ns, name)) => shared
            .store()
            .get(res, ns.as_deref(), &name)
            .map(|o| (StatusCode::OK, (*o).clone())),
        (&Method::POST, Target::Collection(res, ns)) => parse_body(&body, res)
            .and_then(|obj| shared.store().create(res, ns.as_deref(), obj))
            .map(|o| (StatusCode::CREATED, (*o).clone())),
        (&Method::PUT, Target::Item(res, ns, name)) => parse_body(&body, res)
            .and_then(|obj| shared.store().replace(res, ns.as_deref(), &name, obj))
            .map(|o| (StatusCode::OK, (*o).clone())),
        (&Method::PATCH, Target::Item(res, ns, name)) => {
            let content_type = headers
                .get(header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default();
            let kind = match content_type.split(';').next().unwrap_or_default().trim() {
                "application/merge-patch+json" | "application/strategic-merge-patch+json" => {
                    Ok(PatchKind::Merge)
                }
                "application/json-patch+json" => Ok(PatchKind::Json),
                "application/apply-patch+yaml" => Ok(PatchKind::Apply),
                other => Err(EmuError::UnsupportedMediaType(format!(
                    "the patch content type {other:?} is not supported"
                ))),
            };
            kind.and_then(|kind| shared.store().patch(res, ns.as_deref(), &name, kind, &body))
                .map(|o| (StatusCode::OK, (*o).clone()))
        }
        (&Method::DELETE, Target::Item(res, ns, name)) => shared
            .store()
            .delete(res, ns.as_deref(), &name)
            .map(|o| (StatusCode::OK, (*o).clone())),
        (method, _) => Err(EmuError::MethodNotAllowed(format!(
            "{method} is not supported on this path"
        ))),
    };
    match result {
        Ok((code, obj)) => json_response(code, &obj),
        Err(e) => json_response(e.http_code(), &e.status()),
    }
}

fn filter_from(
    res: &'static ResourceType,
    ns: Option<String>,
    name: Option<String>,
    labels: Option<&str>,
    fields: Option<&str>,
) -> Result<Filter, EmuError> {
    Ok(Filter {
        res,
        namespace: ns,
        name,
        labels: LabelSelector::parse(labels.unwrap_or_default())?,
        fields: FieldSelector::parse(fields.unwrap_or_default())?,
    })
}

fn parse_body(body: &[u8], res: &ResourceType) -> Result<Value, EmuError> {
    serde_json::from_slice(body).map_err(|e| {
        EmuError::BadRequest(format!("{}: the request body is not JSON: {e}", res.plural))
    })
}

/// A list item as the real server returns it: without kind and apiVersion.
fn strip_type(obj: &Value) -> Value {
    let mut obj = obj.clone();
    if let Some(map) = obj.as_object_mut() {
        map.remove("kind");
        map.remove("apiVersion");
    }
    obj
}

/// Serves a watch: backlog (initial state or replay from `resourceVersion`), then live changes,
/// as newline-delimited JSON in a chunked 200 response.
async fn watch(
    shared: Arc<Shared>,
    filter: Filter,
    rv: Option<&str>,
    timeout: Option<&str>,
    bookmarks: bool,
    initial_events: bool,
) -> Response {
    let from = match rv.unwrap_or_default() {
        "" | "0" => None,
        _ if initial_events => None,
        text => match text.parse::<u64>() {
            Ok(rv) => Some(rv),
            Err(_) => {
                let e = EmuError::BadRequest(format!(
                    "resourceVersion {text:?} is not a resource version this server issued"
                ));
                return json_response(e.http_code(), &e.status());
            }
        },
    };
    // timeoutSeconds=0 (or none) leaves the watch open until it is broken or the client leaves.
    let timeout = timeout
        .and_then(|t| t.parse::<u64>().ok())
        .filter(|t| *t > 0)
        .map(Duration::from_secs);
    let mut paused = shared.paused.subscribe();
    let gate = paused
        .wait_for(|g| *g != WatchGate::Held)
        .await
        .map(|g| *g)
        .ok();
    if gate != Some(WatchGate::Open) {
        return StatusCode::SERVICE_UNAVAILABLE.into_response();
    }
    let (tx, rx) = mpsc::channel::<Bytes>(64);
    let start = shared.store().watch(&filter, from);
    match start {
        Ok(start) => {
            tokio::spawn(run_watch(
                shared,
                filter,
                start,
                timeout,
                bookmarks,
                initial_events,
                tx,
            ));
        }
        Err(e) => {
            // The API server reports a too-old resourceVersion as an ERROR event in a 200 stream.
            let _ = tx.try_send(event_line("ERROR", &e.status()));
        }
    }
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|b| (Ok::<_, std::convert::Infallible>(b), rx))
    });
    Response::builder()
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from_stream(stream))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

async fn run_watch(
    shared: Arc<Shared>,
    filter: Filter,
    start: crate::store::WatchStart,
    timeout: Option<Duration>,
    bookmarks: bool,
    initial_events: bool,
    tx: mpsc::Sender<Bytes>,
) {
    let _counted = shared.count_watch();
    let mut closed = shared.close.subscribe();
    let crate::store::WatchStart {
        backlog,
        mut live,
        rv,
    } = start;
    for (kind, obj) in &backlog {
        if tx.send(event_line(kind, obj)).await.is_err() {
            return;
        }
    }
    if initial_events {
        let mark = bookmark(filter.res, rv, true);
        if tx.send(mark).await.is_err() {
            return;
        }
    }
    let deadline = tokio::time::sleep(timeout.unwrap_or(Duration::from_secs(3600 * 24 * 365)));
    tokio::pin!(deadline);
    let period = shared.bookmark_interval;
    let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    let mut seen = rv;
    loop {
        // Biased: a watch broken by `break_watches` must not deliver changes made after it.
        let line = tokio::select! {
            biased;
            _ = &mut deadline => return,
            _ = closed.changed() => return,
            _ = tx.closed() => return,
            change = live.recv() => match change {
                Ok(change) => {
                    if closed.has_changed().unwrap_or(true) {
                        return;
                    }
                    seen = change.rv;
                    // The definition of this custom resource was deleted (after its objects,
                    // whose DELETED events this watch has sent): the watch ends.
                    if filter.res.crd
                        && change.res == crate::store::crd_type()
                        && change.kind == crate::store::ChangeKind::Deleted
                        && change.obj["metadata"]["name"] == filter.res.crd_name()
                    {
                        return;
                    }
                    match filter.event_for(&change) {
                        Some((kind, obj)) => event_line(kind, obj),
                        None => continue,
                    }
                }
                // A watcher too slow to keep up is closed, as the API server does; it resumes
                // from the last resourceVersion it saw.
                Err(broadcast::error::RecvError::Lagged(_) | broadcast::error::RecvError::Closed) => return,
            },
            _ = ticks.tick(), if bookmarks => {
                // Changes are published under the store lock: if none is queued for this watch
                // now, it has seen everything up to the store's resourceVersion.
                let store = shared.store();
                let at = if live.is_empty() { store.rv() } else { seen };
                bookmark(filter.res, at, false)
            }
        };
        if tx.send(line).await.is_err() {
            return;
        }
    }
}

fn event_line(kind: &str, obj: &Value) -> Bytes {
    let mut line = serde_json::to_vec(&json!({"type": kind, "object": obj})).unwrap_or_default();
    line.push(b'\n');
    Bytes::from(line)
}

fn bookmark(res: &ResourceType, rv: u64, initial_end: bool) -> Bytes {
    let mut meta = json!({"resourceVersion": rv.to_string()});
    if initial_end {
        meta["annotations"] = json!({"k8s.io/initial-events-end": "true"});
    }
    event_line(
        "BOOKMARK",
        &json!({"kind": res.kind, "apiVersion": res.api_version(), "metadata": meta}),
    )
}

fn json_response(code: StatusCode, body: &Value) -> Response {
    (
        code,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

fn no_route() -> Response {
    let e = EmuError::NotFound("the server could not find the requested resource".into());
    json_response(e.http_code(), &e.status())
}

fn version() -> Value {
    json!({
        "major": "1", "minor": "33", "gitVersion": "v1.33.0-tessera-emulator",
        "gitCommit": "", "gitTreeState": "clean", "buildDate": "2026-01-01T00:00:00Z",
        "goVersion": "none", "compiler": "none", "platform": "linux/amd64"
    })
}

fn api_groups(store: &Store) -> Value {
    let mut groups: Vec<(&str, Vec<&str>)> = Vec::new();
    for r in RESOURCES
        .iter()
        .filter(|r| !r.group.is_empty() && store.served(r))
    {
        match groups.iter_mut().find(|(g, _)| *g == r.group) {
            Some((_, versions)) => {
                if !versions.contains(&r.version) {
                    versions.push(r.version);
                }
            }
            None => groups.push((r.group, vec![r.version])),
        }
    }
    let groups: Vec<Value> = groups
        .into_iter()
        .map(|(name, versions)| {
            let versions: Vec<Value> = versions
                .iter()
                .map(|v| json!({"groupVersion": format!("{name}/{v}"), "version": v}))
                .collect();
            // Newest first, as the apiserver orders them (v1alpha2 before v1alpha1).
            let mut versions = versions;
            versions.sort_by(|a, b| b["version"].as_str().cmp(&a["version"].as_str()));
            json!({"name": name, "versions": versions.clone(), "preferredVersion": versions[0]})
        })
        .collect();
    json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
}

fn resource_list(store: &Store, group: &str, version: &str) -> Value {
    let verbs = [
        "create", "delete", "get", "list", "patch", "update", "watch",
    ];
    let resources: Vec<Value> = RESOURCES
        .iter()
        .filter(|r| r.group == group && r.version == version && store.served(r))
        .map(|r| json!({"name": r.plural, "singularName": r.kind.to_lowercase(), "namespaced": r.namespaced, "kind": r.kind, "verbs": verbs}))
        .collect();
    let group_version = if group.is_empty() {
        version.to_string()
    } else {
        format!("{group}/{version}")
    };
    json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": group_version, "resources": resources})
}
