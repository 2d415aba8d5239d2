//! The emulator driven by the real kube client and kube_runtime's watcher/reflector.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use futures_util::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{Namespace, Node, Pod};
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams, WatchEvent, WatchParams};
use kube::runtime::{WatchStreamExt, reflector, watcher};
use kube::{Client, Config, ResourceExt};
use kube_emulator::Emulator;
use serde_json::{Value, json};

fn client(emu: &Emulator) -> Client {
    let url = emu.url().parse().unwrap();
    Client::try_from(Config::new(url)).unwrap()
}

fn pod(ns: &str, name: &str, node: &str, app: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod",
           "metadata": {"namespace": ns, "name": name, "labels": {"app": app}},
           "spec": {"nodeName": node, "containers": [{"name": "c", "image": "busybox"}]}})
}

/// Polls `cond` until it holds; panics after 10 s (a hang guard, not a timing assertion).
async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    for _ in 0..1000 {
        if cond() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("never happened: {what}");
}

fn sorted_names(store: &reflector::Store<Pod>) -> Vec<String> {
    let mut names: Vec<String> = store.state().iter().map(|p| p.name_any()).collect();
    names.sort();
    names
}

/// The (watch, list) requests the emulator saw for pods across all namespaces.
fn pod_requests(emu: &Emulator) -> (Vec<String>, Vec<String>) {
    let paths: Vec<String> = emu
        .requests()
        .into_iter()
        .filter(|(m, p)| m == "GET" && p.starts_with("/api/v1/pods"))
        .map(|(_, p)| p)
        .collect();
    paths
        .into_iter()
        .partition(|p| p.contains("watch=true") || p.contains("watch=1"))
}

#[tokio::test]
async fn list_by_node_name_sees_only_that_nodes_pods() {
    let emu = Emulator::start().await.unwrap();
    emu.apply(pod("a", "web-1", "node-1", "web")).unwrap();
    emu.apply(pod("b", "db-1", "node-2", "db")).unwrap();
    emu.apply(pod("b", "web-2", "node-1", "web")).unwrap();
    let pods: Api<Pod> = Api::all(client(&emu));

    let on_node_1 = pods
        .list(&ListParams::default().fields("spec.nodeName=node-1"))
        .await
        .unwrap();
    let names: Vec<String> = on_node_1.items.iter().map(|p| p.name_any()).collect();
    assert_eq!(names, ["web-1", "web-2"]);
    assert_eq!(
        on_node_1.metadata.resource_version.as_deref(),
        Some(emu.resource_version().as_str())
    );

    let in_b: Api<Pod> = Api::namespaced(client(&emu), "b");
    let db = in_b
        .list(&ListParams::default().labels("app!=web"))
        .await
        .unwrap();
    assert_eq!(
        db.items.iter().map(|p| p.name_any()).collect::<Vec<_>>(),
        ["db-1"]
    );
    let none = pods
        .list(&ListParams::default().fields("spec.nodeName=node-3"))
        .await
        .unwrap();
    assert!(none.items.is_empty());
}

#[tokio::test]
async fn reflector_follows_changes_and_relists_after_compaction() {
    let emu = Emulator::start().await.unwrap();
    emu.apply(pod("demo", "web-1", "n1", "web")).unwrap();
    emu.apply(pod("demo", "web-2", "n1", "web")).unwrap();
    let (store, writer) = reflector::store();
    let stream = reflector(
        writer,
        watcher(Api::<Pod>::all(client(&emu)), watcher::Config::default()),
    )
    .applied_objects();
    tokio::spawn(stream.for_each(|_| async {}));
    store.wait_until_ready().await.unwrap();
    assert_eq!(sorted_names(&store), ["web-1", "web-2"]);

    // Live changes: create, label change, delete.
    emu.apply(pod("demo", "web-3", "n1", "web")).unwrap();
    eventually("web-3 appears", || sorted_names(&store).len() == 3).await;
    emu.merge_patch(
        "pods",
        Some("demo"),
        "web-1",
        &json!({"metadata": {"labels": {"app": "api"}}}),
    )
    .unwrap();
    let label = |s: &reflector::Store<Pod>| {
        s.state()
            .iter()
            .find(|p| p.name_any() == "web-1")
            .and_then(|p| p.labels().get("app").cloned())
    };
    eventually("web-1 relabelled", || {
        label(&store).as_deref() == Some("api")
    })
    .await;
    emu.delete("pods", Some("demo"), "web-2").unwrap();
    eventually("web-2 gone", || sorted_names(&store) == ["web-1", "web-3"]).await;
    let (_, lists_before) = pod_requests(&emu);
    assert_eq!(lists_before.len(), 1, "one initial list");

    // A dropped connection alone: the watcher resumes from its resourceVersion, no relist.
    eventually("watching", || emu.watch_count() == 1).await;
    emu.break_watches();
    emu.apply(pod("demo", "web-4", "n1", "web")).unwrap();
    eventually("web-4 appears after resume", || {
        sorted_names(&store).contains(&"web-4".to_string())
    })
    .await;
    let (watches, lists) = pod_requests(&emu);
    assert_eq!(lists.len(), 1, "resuming a watch needs no list: {lists:?}");
    assert!(
        watches.len() >= 2 && watches.iter().all(|w| w.contains("resourceVersion=")),
        "{watches:?}"
    );

    // Missed changes and compacted history: the resume gets 410, the watcher relists, and the
    // object deleted meanwhile does not linger in the store.
    eventually("watching again", || emu.watch_count() == 1).await;
    emu.pause_watches();
    emu.delete("pods", Some("demo"), "web-3").unwrap();
    emu.apply(pod("demo", "web-5", "n2", "web")).unwrap();
    emu.compact();
    emu.break_watches();
    emu.resume_watches();
    eventually("relisted state", || {
        sorted_names(&store) == ["web-1", "web-4", "web-5"]
    })
    .await;
    let (_, lists) = pod_requests(&emu);
    assert_eq!(
        lists.len(),
        2,
        "the 410 forced exactly one relist: {lists:?}"
    );
}

#[tokio::test]
async fn merge_patch_of_node_annotations_reaches_a_watcher_as_modified() {
    let emu = Emulator::start().await.unwrap();
    let created = emu
        .apply(json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-1"}}))
        .unwrap();
    let old_rv = created["metadata"]["resourceVersion"]
        .as_str()
        .unwrap()
        .to_string();
    let nodes: Api<Node> = Api::all(client(&emu));
    let mut events = nodes
        .watch(&WatchParams::default(), &old_rv)
        .await
        .unwrap()
        .boxed();
    eventually("watching", || emu.watch_count() == 1).await;

    let patch = json!({"metadata": {"annotations": {"tessera.io/node-key": "abc"}}});
    let patched = nodes
        .patch("node-1", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    let new_rv = patched.resource_version().unwrap();
    assert!(new_rv.parse::<u64>().unwrap() > old_rv.parse::<u64>().unwrap());

    match events.try_next().await.unwrap() {
        Some(WatchEvent::Modified(node)) => {
            assert_eq!(
                node.annotations()
                    .get("tessera.io/node-key")
                    .map(String::as_str),
                Some("abc")
            );
            assert_eq!(node.resource_version().as_deref(), Some(new_rv.as_str()));
            assert_eq!(
                node.metadata.uid,
                created["metadata"]["uid"].as_str().map(str::to_string)
            );
        }
        other => panic!("expected MODIFIED, got {other:?}"),
    }
    // Strategic merge patch (treated as merge) also works for labels.
    let strategic = json!({"metadata": {"labels": {"zone": "a"}}});
    let node = nodes
        .patch(
            "node-1",
            &PatchParams::default(),
            &Patch::Strategic(&strategic),
        )
        .await
        .unwrap();
    assert_eq!(node.labels().get("zone").map(String::as_str), Some("a"));
    assert_eq!(node.annotations().len(), 1, "earlier annotation kept");
}

#[tokio::test]
async fn stale_put_conflicts_and_errors_are_statuses() {
    let emu = Emulator::start().await.unwrap();
    let pods: Api<Pod> = Api::namespaced(client(&emu), "demo");
    let created = pods
        .create(
            &PostParams::default(),
            &serde_json::from_value(pod("demo", "web-1", "n1", "web")).unwrap(),
        )
        .await
        .unwrap();
    assert!(created.metadata.uid.is_some() && created.metadata.creation_timestamp.is_some());

    let mut first = created.clone();
    first.labels_mut().insert("v".into(), "1".into());
    let updated = pods
        .replace("web-1", &PostParams::default(), &first)
        .await
        .unwrap();
    assert_ne!(updated.resource_version(), created.resource_version());

    let mut stale = created.clone();
    stale.labels_mut().insert("v".into(), "2".into());
    match pods.replace("web-1", &PostParams::default(), &stale).await {
        Err(kube::Error::Api(status)) => {
            assert_eq!((status.code, status.reason.as_str()), (409, "Conflict"))
        }
        other => panic!("expected 409 Conflict, got {other:?}"),
    }
    assert_eq!(
        emu.get("pods", Some("demo"), "web-1").unwrap()["metadata"]["labels"]["v"],
        "1"
    );

    match pods.create(&PostParams::default(), &created).await {
        Err(kube::Error::Api(status)) => assert_eq!(
            (status.code, status.reason.as_str()),
            (409, "AlreadyExists")
        ),
        other => panic!("expected 409 AlreadyExists, got {other:?}"),
    }
    match pods.get("missing").await {
        Err(kube::Error::Api(status)) => {
            assert_eq!((status.code, status.reason.as_str()), (404, "NotFound"))
        }
        other => panic!("expected 404, got {other:?}"),
    }
    assert!(pods.get_opt("missing").await.unwrap().is_none());
    match pods.list(&ListParams::default().labels("app in (x")).await {
        Err(kube::Error::Api(status)) => assert_eq!(status.code, 400),
        other => panic!("expected 400, got {other:?}"),
    }
    pods.delete("web-1", &Default::default()).await.unwrap();
    assert!(emu.get("pods", Some("demo"), "web-1").is_none());
}

#[tokio::test]
async fn watch_from_compacted_version_gets_410_expired() {
    let emu = Emulator::start().await.unwrap();
    let first = emu.apply(pod("demo", "web-1", "n1", "web")).unwrap();
    let rv = first["metadata"]["resourceVersion"]
        .as_str()
        .unwrap()
        .to_string();
    emu.apply(pod("demo", "web-2", "n1", "web")).unwrap();
    let pods: Api<Pod> = Api::all(client(&emu));

    // Before compaction the missed change is replayed.
    let mut replay = pods
        .watch(&WatchParams::default(), &rv)
        .await
        .unwrap()
        .boxed();
    match replay.try_next().await.unwrap() {
        Some(WatchEvent::Added(p)) => assert_eq!(p.name_any(), "web-2"),
        other => panic!("expected the replayed ADDED, got {other:?}"),
    }

    emu.compact();
    let mut expired = pods
        .watch(&WatchParams::default(), &rv)
        .await
        .unwrap()
        .boxed();
    match expired.try_next().await.unwrap() {
        Some(WatchEvent::Error(status)) => {
            assert_eq!((status.code, status.reason.as_str()), (410, "Expired"))
        }
        other => panic!("expected 410, got {other:?}"),
    }
    assert!(
        expired.try_next().await.unwrap().is_none(),
        "the stream ends after the error"
    );
}

#[tokio::test]
async fn selector_watch_sees_objects_leave_and_enter_and_bookmarks() {
    let emu = Emulator::builder()
        .bookmark_interval(Duration::from_millis(20))
        .start()
        .await
        .unwrap();
    emu.apply(pod("demo", "web-1", "n1", "web")).unwrap();
    let pods: Api<Pod> = Api::namespaced(client(&emu), "demo");
    let params = WatchParams::default().labels("app=web"); // bookmarks are asked for by default
    let mut events = pods.watch(&params, "0").await.unwrap().boxed();
    let mut next_change = async || loop {
        match events.try_next().await.unwrap() {
            Some(WatchEvent::Bookmark(_)) => continue,
            Some(event) => return event,
            None => panic!("stream ended"),
        }
    };
    assert!(matches!(next_change().await, WatchEvent::Added(p) if p.name_any() == "web-1"));
    emu.merge_patch(
        "pods",
        Some("demo"),
        "web-1",
        &json!({"metadata": {"labels": {"app": "db"}}}),
    )
    .unwrap();
    assert!(matches!(next_change().await, WatchEvent::Deleted(p) if p.name_any() == "web-1"));
    emu.apply(pod("demo", "db-1", "n1", "db")).unwrap(); // never matches: no event
    emu.merge_patch(
        "pods",
        Some("demo"),
        "web-1",
        &json!({"metadata": {"labels": {"app": "web"}}}),
    )
    .unwrap();
    assert!(matches!(next_change().await, WatchEvent::Added(p) if p.name_any() == "web-1"));

    let current = emu.resource_version();
    let mut bookmark_rv = String::new();
    for _ in 0..100 {
        if let Some(WatchEvent::Bookmark(b)) = events.try_next().await.unwrap() {
            bookmark_rv = b.metadata.resource_version;
            break;
        }
    }
    assert_eq!(
        bookmark_rv, current,
        "a bookmark carries the latest resourceVersion"
    );
}

#[tokio::test]
async fn streaming_list_watcher_fills_its_store() {
    let emu = Emulator::start().await.unwrap();
    emu.apply(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "a", "labels": {"team": "x"}}})).unwrap();
    emu.apply(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "b"}}))
        .unwrap();
    let (store, writer) = reflector::store::<Namespace>();
    let config = watcher::Config::default().streaming_lists();
    let stream = reflector(writer, watcher(Api::all(client(&emu)), config)).applied_objects();
    tokio::spawn(stream.for_each(|_| async {}));
    store.wait_until_ready().await.unwrap();
    assert_eq!(store.state().len(), 2);
    let (_, lists): (Vec<_>, Vec<_>) = emu
        .requests()
        .into_iter()
        .partition(|(_, p)| p.contains("watch="));
    assert!(lists.is_empty(), "streaming lists need no LIST: {lists:?}");
    emu.delete("namespaces", None, "b").unwrap();
    eventually("b gone", || store.state().len() == 1).await;
}

#[tokio::test]
async fn server_side_apply_and_json_patch() {
    let emu = Emulator::start().await.unwrap();
    let pods: Api<Pod> = Api::namespaced(client(&emu), "demo");
    let ssa = PatchParams::apply("tessera-test");
    let applied = pods
        .patch(
            "web-1",
            &ssa,
            &Patch::Apply(pod("demo", "web-1", "n1", "web")),
        )
        .await
        .unwrap();
    assert_eq!(applied.spec.unwrap().node_name.as_deref(), Some("n1"));
    let again = pods.patch("web-1", &ssa, &Patch::Apply(json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "web-1", "labels": {"tier": "front"}}}))).await.unwrap();
    assert_eq!(again.labels().len(), 2);

    // RFC 6902 JSON patch, sent raw (the workspace's kube has no `jsonpatch` feature).
    let body =
        serde_json::to_vec(&json!([{"op": "remove", "path": "/metadata/labels/tier"}])).unwrap();
    let request = axum::http::Request::patch("/api/v1/namespaces/demo/pods/web-1")
        .header("content-type", "application/json-patch+json")
        .body(body)
        .unwrap();
    let patched: Pod = client(&emu).request(request).await.unwrap();
    assert_eq!(patched.labels().keys().collect::<Vec<_>>(), ["app"]);
}

#[test]
fn blocking_emulator_serves_a_client_built_from_its_kubeconfig() {
    let emu = Emulator::start_blocking().unwrap();
    emu.apply(json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                     "metadata": {"name": "deny", "namespace": "demo"}, "spec": {"podSelector": {}}}))
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kubeconfig");
    emu.write_kubeconfig(&path).unwrap();

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let names = runtime.block_on(async {
        let kubeconfig = kube::config::Kubeconfig::read_from(&path).unwrap();
        let config = Config::from_custom_kubeconfig(kubeconfig, &Default::default())
            .await
            .unwrap();
        assert_eq!(config.default_namespace, "default");
        let client = Client::try_from(config).unwrap();
        let policies: Api<k8s_openapi::api::networking::v1::NetworkPolicy> =
            Api::all(client.clone());
        let version = client.apiserver_version().await.unwrap();
        assert_eq!(version.major, "1");
        policies
            .list(&Default::default())
            .await
            .unwrap()
            .items
            .into_iter()
            .map(|p| p.name_any())
            .collect::<Vec<_>>()
    });
    assert_eq!(names, ["deny"]);
    assert!(emu.requests().iter().any(|(m, p)| m == "GET" && p.starts_with("/apis/networking.k8s.io/v1/networkpolicies")));
}

#[tokio::test]
async fn watch_ends_at_its_timeout_and_is_uncounted_when_the_client_leaves() {
    let emu = Emulator::builder()
        .bookmark_interval(Duration::from_millis(50))
        .start()
        .await
        .unwrap();
    emu.apply(pod("demo", "web-1", "n1", "web")).unwrap();
    let pods: Api<Pod> = Api::all(client(&emu));

    let mut timed = pods
        .watch(&WatchParams::default().timeout(1).disable_bookmarks(), "0")
        .await
        .unwrap()
        .boxed();
    assert!(matches!(
        timed.try_next().await.unwrap(),
        Some(WatchEvent::Added(_))
    ));
    assert!(
        timed.try_next().await.unwrap().is_none(),
        "timeoutSeconds ends the stream cleanly"
    );
    eventually("timed-out watch uncounted", || emu.watch_count() == 0).await;

    let open = pods
        .watch(&WatchParams::default(), "0")
        .await
        .unwrap()
        .boxed();
    eventually("counted", || emu.watch_count() == 1).await;
    drop(open);
    eventually("uncounted after the client left", || emu.watch_count() == 0).await;
    assert!(
        emu.requests()
            .iter()
            .any(|(_, p)| p.contains("timeoutSeconds=1"))
    );
}

/// Admin policy kinds are served only while their CustomResourceDefinition exists, as on a real
/// cluster: before, discovery and paths are 404 and apply is refused; after, they list and
/// watch like any kind; deleting the definition deletes the objects and ends the watches.
#[tokio::test]
async fn admin_policy_kinds_are_served_while_their_definition_exists() {
    use kube::api::{ApiResource, DynamicObject, GroupVersionKind};
    let emu = Emulator::start().await.unwrap();
    let c = client(&emu);
    let cnp = json!({"apiVersion": "policy.networking.k8s.io/v1alpha2",
                     "kind": "ClusterNetworkPolicy", "metadata": {"name": "guard"},
                     "spec": {"tier": "Admin", "priority": 1, "subject": {"namespaces": {}}}});
    assert!(emu.apply(cnp.clone()).is_err());
    assert!(
        c.list_api_group_resources("policy.networking.k8s.io/v1alpha2")
            .await
            .is_err()
    );
    let ar = ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk(
            "policy.networking.k8s.io",
            "v1alpha2",
            "ClusterNetworkPolicy",
        ),
        "clusternetworkpolicies",
    );
    let api: Api<DynamicObject> = Api::all_with(c.clone(), &ar);
    assert!(api.list(&ListParams::default()).await.is_err());

    emu.install_admin_crds().unwrap();
    let groups = c.list_api_groups().await.unwrap();
    let policy = groups
        .groups
        .iter()
        .find(|g| g.name == "policy.networking.k8s.io")
        .unwrap();
    let versions: Vec<&str> = policy.versions.iter().map(|v| v.version.as_str()).collect();
    assert_eq!(versions, ["v1alpha2", "v1alpha1"]);
    let v1 = c
        .list_api_group_resources("policy.networking.k8s.io/v1alpha1")
        .await
        .unwrap();
    let mut names: Vec<&str> = v1.resources.iter().map(|r| r.name.as_str()).collect();
    names.sort();
    assert_eq!(
        names,
        ["adminnetworkpolicies", "baselineadminnetworkpolicies"]
    );

    emu.apply(cnp).unwrap();
    let listed = api.list(&ListParams::default()).await.unwrap();
    assert_eq!(listed.items.len(), 1);
    assert_eq!(listed.items[0].data["spec"]["tier"], "Admin");

    let mut events = watcher(api.clone(), watcher::Config::default()).boxed();
    loop {
        if let Ok(watcher::Event::InitDone) = events.next().await.unwrap() {
            break;
        }
    }
    // Poll the stream until its watch request is open.
    let _ = tokio::time::timeout(Duration::from_millis(300), events.next()).await;
    assert!(emu.wait_for_watches(1, Duration::from_secs(10)));
    emu.delete(
        "customresourcedefinitions",
        None,
        "clusternetworkpolicies.policy.networking.k8s.io",
    )
    .unwrap();
    assert!(emu.list("clusternetworkpolicies", None).is_empty());
    // The watch sees the object go, then cannot list the kind any more.
    let mut deleted = false;
    loop {
        match events.next().await.unwrap() {
            Ok(watcher::Event::Delete(o)) => deleted = o.metadata.name.as_deref() == Some("guard"),
            Err(
                watcher::Error::InitialListFailed(kube::Error::Api(s))
                | watcher::Error::WatchStartFailed(kube::Error::Api(s)),
            ) => {
                assert_eq!(s.code, 404);
                break;
            }
            _ => {}
        }
    }
    assert!(deleted);
}
