//! Cluster-wide admin policies from the API: ClusterNetworkPolicy
//! (`policy.networking.k8s.io/v1alpha2`), AdminNetworkPolicy and BaselineAdminNetworkPolicy
//! (`v1alpha1`). They are custom resources: a cluster may have none, some or all of their
//! definitions installed, and may install or remove them while the agent runs.
//!
//! One task per kind. It asks discovery whether the kind is served; while it is not, the kind
//! counts as settled with no policies and discovery is asked again every [`DISCOVERY_EVERY`].
//! Once served, the kind is listed and watched like the built-in kinds (a whole set at each
//! list's end, single changes between). When its definition goes (the watch ends and the next
//! list or watch gets 404), every policy of that kind is removed (its objects were deleted
//! with it) and the task goes back to asking discovery.

use std::time::Duration;

use futures_util::StreamExt;
use kube::Client;
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind};
use kube::runtime::{WatchStreamExt, watcher};
use policy::objects::Object;
use policy::{AdminKind, AdminPolicyKey, StagedKey};
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use crate::runtime::{AdminPolicy, Event, StagedScope};

/// How often discovery is asked whether a missing kind is served now.
pub const DISCOVERY_EVERY: Duration = Duration::from_secs(10);

/// The group of the admin policy kinds.
pub const GROUP: &str = "policy.networking.k8s.io";

/// One admin policy kind as the API serves it.
#[derive(Debug, Clone, Copy)]
pub struct AdminResource {
    pub kind: AdminKind,
    pub version: &'static str,
    pub plural: &'static str,
}

/// The three kinds, newest API first.
pub const KINDS: [AdminResource; 3] = [
    AdminResource {
        kind: AdminKind::ClusterNetworkPolicy,
        version: "v1alpha2",
        plural: "clusternetworkpolicies",
    },
    AdminResource {
        kind: AdminKind::AdminNetworkPolicy,
        version: "v1alpha1",
        plural: "adminnetworkpolicies",
    },
    AdminResource {
        kind: AdminKind::BaselineAdminNetworkPolicy,
        version: "v1alpha1",
        plural: "baselineadminnetworkpolicies",
    },
];

impl AdminResource {
    fn api_resource(&self) -> ApiResource {
        ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk(GROUP, self.version, &self.kind.to_string()),
            self.plural,
        )
    }

    fn origin(&self) -> String {
        format!("Kubernetes API ({}.{GROUP}/{})", self.plural, self.version)
    }
}

/// What a kind's task tells the runtime.
#[derive(Debug)]
pub enum Message {
    /// The kind's first state is known (not served, or listed once): pods may be enforced
    /// without waiting for it.
    Settled(AdminKind),
    Event(Box<Event>),
}

/// An API object as the engine's type. An object that does not parse is reported (naming it
/// and the error) and skipped: its previous version, if any, stays in force.
fn convert(res: &AdminResource, obj: &DynamicObject) -> Option<AdminPolicy> {
    let name = obj.metadata.name.clone().unwrap_or_default();
    let mut value = serde_json::Map::new();
    match serde_json::to_value(&obj.metadata) {
        Ok(meta) => value.insert("metadata".into(), meta),
        Err(e) => {
            warn!("{} {name}: metadata: {e}", res.kind);
            return None;
        }
    };
    if let Some(fields) = obj.data.as_object() {
        for (k, v) in fields {
            if k == "spec" || k == "status" {
                value.insert(k.clone(), v.clone());
            }
        }
    }
    let value = serde_json::Value::Object(value);
    let parsed = match res.kind {
        AdminKind::ClusterNetworkPolicy => serde_json::from_value(value).map(AdminPolicy::Cluster),
        AdminKind::AdminNetworkPolicy => serde_json::from_value(value).map(AdminPolicy::Admin),
        AdminKind::BaselineAdminNetworkPolicy => {
            serde_json::from_value(value).map(AdminPolicy::Baseline)
        }
    };
    match parsed {
        Ok(p) => Some(p),
        Err(e) => {
            tracing::error!(
                "{} {name}: {e} (refused; its previous version, if any, stays in force)",
                res.kind
            );
            None
        }
    }
}

fn is_not_found(e: &watcher::Error) -> bool {
    let api = match e {
        watcher::Error::InitialListFailed(e)
        | watcher::Error::WatchStartFailed(e)
        | watcher::Error::WatchFailed(e) => e,
        watcher::Error::WatchError(s) => return s.code == 404,
        watcher::Error::NoResourceVersion => return false,
    };
    matches!(api, kube::Error::Api(s) if s.code == 404)
}

/// Whether discovery lists the kind now. `Err`: the API could not be asked.
async fn served(client: &Client, res: &AdminResource) -> Result<bool, kube::Error> {
    match client
        .list_api_group_resources(&format!("{GROUP}/{}", res.version))
        .await
    {
        Ok(list) => Ok(list.resources.iter().any(|r| r.name == res.plural)),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(false),
        Err(e) => Err(e),
    }
}

/// Follows one kind until the receiver goes.
pub async fn follow(
    client: Client,
    res: AdminResource,
    tx: mpsc::Sender<Message>,
    every: Duration,
) {
    let mut settled = false;
    let mut in_force = false;
    loop {
        match served(&client, &res).await {
            Ok(true) => {}
            Ok(false) => {
                if in_force {
                    in_force = false;
                    info!(kind = %res.kind, "definition removed: its policies are removed");
                    let gone = Event::AdminPolicies {
                        origin: res.origin(),
                        kind: res.kind,
                        policies: Vec::new(),
                        unparsed: Vec::new(),
                    };
                    let unstaged = Event::Staged {
                        origin: res.origin(),
                        scope: StagedScope::Admin(res.kind),
                        objects: Vec::new(),
                    };
                    if tx.send(Message::Event(Box::new(gone))).await.is_err()
                        || tx.send(Message::Event(Box::new(unstaged))).await.is_err()
                    {
                        return;
                    }
                }
                if !settled {
                    settled = true;
                    info!(
                        kind = %res.kind,
                        "not served by this cluster (no CustomResourceDefinition); asking again every {}s",
                        every.as_secs()
                    );
                    if tx.send(Message::Settled(res.kind)).await.is_err() {
                        return;
                    }
                }
                tokio::time::sleep(every).await;
                continue;
            }
            Err(e) => {
                debug!(kind = %res.kind, "discovery: {e}");
                tokio::time::sleep(every.min(Duration::from_secs(2))).await;
                continue;
            }
        }
        info!(kind = %res.kind, version = res.version, "served: watching");
        let api: Api<DynamicObject> = Api::all_with(client.clone(), &res.api_resource());
        let mut stream = watcher(api, watcher::Config::default())
            .default_backoff()
            .boxed();
        let mut relist: Option<(Vec<AdminPolicy>, Vec<String>)> = None;
        let mut staged: Vec<Object> = Vec::new();
        let mut failing = false;
        while let Some(ev) = stream.next().await {
            let out = match ev {
                Ok(watcher::Event::Init) => {
                    relist = Some((Vec::new(), Vec::new()));
                    staged.clear();
                    continue;
                }
                Ok(watcher::Event::InitApply(o)) => {
                    let (good, bad) = relist.get_or_insert_with(Default::default);
                    if policy::objects::is_staged_meta(&o.metadata) {
                        // Staged: evaluated beside, never enforced. One that does not parse
                        // as its kind keeps its previous staged version, if any.
                        staged.extend(convert(&res, &o).map(AdminPolicy::into_object));
                        continue;
                    }
                    match convert(&res, &o) {
                        Some(p) => good.push(p),
                        None => bad.extend(o.metadata.name.clone()),
                    }
                    continue;
                }
                Ok(watcher::Event::InitDone) => {
                    let (policies, unparsed) = relist.take().unwrap_or_default();
                    info!(kind = %res.kind, policies = policies.len(), "listed");
                    in_force = true;
                    let mut out = vec![
                        Message::Event(Box::new(Event::AdminPolicies {
                            origin: res.origin(),
                            kind: res.kind,
                            policies,
                            unparsed,
                        })),
                        Message::Event(Box::new(Event::Staged {
                            origin: res.origin(),
                            scope: StagedScope::Admin(res.kind),
                            objects: std::mem::take(&mut staged),
                        })),
                    ];
                    if !settled {
                        settled = true;
                        out.push(Message::Settled(res.kind));
                    }
                    out
                }
                Ok(watcher::Event::Apply(o)) if policy::objects::is_staged_meta(&o.metadata) => {
                    // Staged now: no longer enforced (if it was), evaluated beside.
                    let Some(name) = o.metadata.name.clone() else {
                        continue;
                    };
                    let mut out = vec![Message::Event(Box::new(Event::AdminRemove(
                        AdminPolicyKey {
                            kind: res.kind,
                            name,
                        },
                    )))];
                    if let Some(p) = convert(&res, &o) {
                        out.push(Message::Event(Box::new(Event::StagedUpsert(Box::new(
                            p.into_object(),
                        )))));
                    }
                    out
                }
                Ok(watcher::Event::Apply(o)) => {
                    let Some(p) = convert(&res, &o) else {
                        continue;
                    };
                    let unstaged = Event::StagedRemove(StagedKey::Admin(p.key()));
                    vec![
                        Message::Event(Box::new(unstaged)),
                        Message::Event(Box::new(Event::AdminUpsert(Box::new(p)))),
                    ]
                }
                Ok(watcher::Event::Delete(o)) => match o.metadata.name.clone() {
                    Some(name) => {
                        let key = AdminPolicyKey {
                            kind: res.kind,
                            name,
                        };
                        vec![
                            Message::Event(Box::new(Event::AdminRemove(key.clone()))),
                            Message::Event(Box::new(Event::StagedRemove(StagedKey::Admin(key)))),
                        ]
                    }
                    None => continue,
                },
                Err(e) if is_not_found(&e) => break,
                Err(e) => {
                    if !failing {
                        warn!(kind = %res.kind, "watch: {e}; retrying with backoff");
                        failing = true;
                    }
                    continue;
                }
            };
            failing = false;
            for m in out {
                if tx.send(m).await.is_err() {
                    return;
                }
            }
        }
        // 404: the definition is gone (or going); discovery decides.
    }
}
