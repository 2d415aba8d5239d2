//! NetworkPolicies and cluster-wide admin policies (ClusterNetworkPolicy, AdminNetworkPolicy,
//! BaselineAdminNetworkPolicy) from a directory of YAML files, reloaded when a file changes. A
//! bad file is reported by name and the last good set stays in force.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use anyhow::{Context, Result, bail};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use policy::objects::{self, Object};
use policy::{AdminPolicyKey, Engine, PolicyKey, StagedKey};

use crate::runtime::AdminPolicy;

/// What a policy directory holds.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PolicySet {
    pub network: Vec<NetworkPolicy>,
    pub admin: Vec<AdminPolicy>,
    /// Policies annotated `tessera.dev/staged: "true"`: validated, evaluated beside the
    /// enforced ones, not enforced.
    pub staged: Vec<Object>,
}

/// The `.yaml` / `.yml` / `.json` files of a directory with their modification times: a change
/// in this map (a file added, removed, touched) triggers a reload.
pub type Snapshot = BTreeMap<PathBuf, Option<SystemTime>>;

pub fn snapshot(dir: &Path) -> Result<Snapshot> {
    let mut out = Snapshot::new();
    let entries = std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))?;
    for entry in entries {
        let entry = entry.with_context(|| format!("reading {}", dir.display()))?;
        let path = entry.path();
        let is_policy_file = path
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| matches!(e, "yaml" | "yml" | "json"));
        if is_policy_file && path.is_file() {
            let mtime = entry.metadata().ok().and_then(|m| m.modified().ok());
            out.insert(path, mtime);
        }
    }
    Ok(out)
}

/// Read every policy file of `dir`; every NetworkPolicy and admin policy is validated against a
/// scratch engine. Any error (naming file, object and field) refuses the whole set. Two admin
/// policies of one kind and name in the directory are an error too (which one would win?).
pub fn load_dir(dir: &Path) -> Result<PolicySet> {
    let snap = snapshot(dir)?;
    let mut set = PolicySet::default();
    let mut problems = Vec::new();
    let mut scratch = Engine::new();
    let mut staged_scratch = Engine::new();
    let mut admin_origin: BTreeMap<AdminPolicyKey, String> = BTreeMap::new();
    let mut staged_origin: BTreeMap<StagedKey, String> = BTreeMap::new();
    for path in snap.keys() {
        let source = path.display().to_string();
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {source}"))?;
        let parsed = objects::parse(&source, &text);
        problems.extend(parsed.errors.iter().map(ToString::to_string));
        for skipped in &parsed.skipped {
            tracing::warn!(
                "{}: {} {} ignored: the policy directory holds NetworkPolicy and admin policy \
                 objects only",
                skipped.origin,
                skipped.kind,
                skipped.name
            );
        }
        for located in parsed.objects {
            let origin = located.origin.to_string();
            if located.value.is_staged() {
                // Validated like the others (in an engine of their own: a staged policy may
                // share its kind and name with an enforced one, which it replaces in the
                // staged view), never enforced.
                let what = format!("{} {}", located.value.kind(), located.value.name());
                let checked = match &located.value {
                    Object::NetworkPolicy(p) => staged_scratch.apply_policy(p).map(drop),
                    Object::ClusterNetworkPolicy(p) => {
                        staged_scratch.apply_cluster_network_policy(p).map(drop)
                    }
                    Object::AdminNetworkPolicy(p) => {
                        staged_scratch.apply_admin_network_policy(p).map(drop)
                    }
                    Object::BaselineAdminNetworkPolicy(p) => staged_scratch
                        .apply_baseline_admin_network_policy(p)
                        .map(drop),
                    // `is_staged` holds for policies only.
                    Object::Namespace(_) | Object::Node(_) | Object::Pod(_) => Ok(()),
                };
                match checked {
                    Ok(()) => {
                        if let Some(key) = StagedKey::of(&located.value)
                            && let Some(first) = staged_origin.insert(key, origin.clone())
                        {
                            problems.push(format!(
                                "{origin} ({what}, staged): defined twice, first in {first}"
                            ));
                        }
                        tracing::info!(
                            "{origin}: {what} is staged: evaluated beside the enforced \
                             policies (flow log), not enforced"
                        );
                        set.staged.push(located.value);
                    }
                    Err(e) => problems.push(format!(
                        "{origin} ({what}, staged): {}: {}",
                        e.field, e.message
                    )),
                }
                continue;
            }
            match located.value {
                Object::NetworkPolicy(p) => match scratch.apply_policy(&p) {
                    Ok(_) => set.network.push(p),
                    Err(e) => problems.push(format!(
                        "{origin} (NetworkPolicy {}): {}: {}",
                        e.object, e.field, e.message
                    )),
                },
                other => match AdminPolicy::from_object(other) {
                    Ok(admin) => {
                        let key = admin.key();
                        match admin.apply(&mut scratch) {
                            Ok(applied) => {
                                for w in &applied.warnings {
                                    tracing::warn!("{origin} ({key}): {w}");
                                }
                                if let Some(first) =
                                    admin_origin.insert(key.clone(), origin.clone())
                                {
                                    problems.push(format!(
                                        "{origin} ({key}): defined twice, first in {first}"
                                    ));
                                }
                                set.admin.push(admin);
                            }
                            Err(e) => problems.push(format!(
                                "{origin} ({} {}): {}: {}",
                                key.kind, e.object, e.field, e.message
                            )),
                        }
                    }
                    Err(other) => tracing::warn!(
                        "{origin}: {} {} ignored: the policy directory holds NetworkPolicy and \
                         admin policy objects only",
                        other.kind(),
                        other.name()
                    ),
                },
            }
        }
    }
    if !problems.is_empty() {
        bail!("{}", problems.join("\n"));
    }
    Ok(set)
}

/// Watch the directory (polled every second) and send the whole set after every change that
/// loads cleanly; a bad file is reported by name and nothing is sent, so the last good set stays
/// in force.
pub async fn watch(
    dir: PathBuf,
    mut seen: Snapshot,
    shared: std::sync::Arc<super::Shared>,
    tx: crate::runtime::Sender,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let origin = dir.display().to_string();
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => return,
        }
        let now = match snapshot(&dir) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!("policy directory: {e:#}");
                continue;
            }
        };
        if now == seen {
            continue;
        }
        seen = now;
        match load_dir(&dir) {
            Ok(set) => {
                let event = crate::runtime::Event::Policies {
                    origin: origin.clone(),
                    policies: set.network,
                    admin: Some(set.admin),
                };
                let staged = crate::runtime::Event::Staged {
                    origin: origin.clone(),
                    scope: crate::runtime::StagedScope::All,
                    objects: set.staged,
                };
                if tx.send(event).await.is_err() || tx.send(staged).await.is_err() {
                    return;
                }
            }
            Err(e) => {
                shared
                    .reload_failures
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tracing::error!(
                    "policy reload refused, the previous policies stay in force:\n{e:#}"
                );
            }
        }
    }
}

/// Replace the engine's policies by `policies`: apply each (a replacement is atomic per policy)
/// and remove those that are gone. Returns (applied, removed).
pub fn replace(
    engine: &mut Engine,
    policies: &[NetworkPolicy],
    previous: &[PolicyKey],
) -> Result<(Vec<PolicyKey>, usize)> {
    let mut keys = Vec::with_capacity(policies.len());
    for p in policies {
        let key = engine.apply_policy(p).map_err(|e| {
            anyhow::anyhow!("NetworkPolicy {}: {}: {}", e.object, e.field, e.message)
        })?;
        keys.push(key);
    }
    let mut removed = 0;
    for old in previous {
        if !keys.contains(old) {
            engine.remove_policy(old);
            removed += 1;
        }
    }
    Ok((keys, removed))
}

/// Admin policies now in force, for [`replace_admin`]: what was applied, what was removed, and
/// the objects refused (their previous version, if any, stays in force).
#[derive(Debug, Default)]
pub struct AdminReplaced {
    pub applied: usize,
    pub removed: usize,
    pub refused: Vec<String>,
}

/// Make `policies` the admin policies in force among those `scope` accepts (their kinds):
/// apply each, remove the previous ones in scope that are not in the set. `keys` is the set
/// of admin policies in force, updated. One refused object does not refuse the others: its
/// previous version stays in force (and is not removed).
pub fn replace_admin(
    engine: &mut Engine,
    policies: &[AdminPolicy],
    keys: &mut std::collections::BTreeSet<AdminPolicyKey>,
    scope: impl Fn(&AdminPolicyKey) -> bool,
) -> AdminReplaced {
    let mut out = AdminReplaced::default();
    let mut wanted = std::collections::BTreeSet::new();
    for p in policies {
        let key = p.key();
        wanted.insert(key.clone());
        match p.apply(engine) {
            Ok(applied) => {
                for w in &applied.warnings {
                    tracing::warn!(policy = %applied.key, "{w}");
                }
                keys.insert(applied.key);
                out.applied += 1;
            }
            Err(e) => out.refused.push(format!(
                "{} {}: {}: {}",
                key.kind, e.object, e.field, e.message
            )),
        }
    }
    let gone: Vec<AdminPolicyKey> = keys
        .iter()
        .filter(|k| scope(k) && !wanted.contains(*k))
        .cloned()
        .collect();
    for k in gone {
        engine.remove_admin_policy(&k);
        keys.remove(&k);
        out.removed += 1;
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    const ALLOW: &str = "\
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: allow-web, namespace: demo}
spec:
  podSelector: {matchLabels: {role: db}}
  ingress:
    - from: [{podSelector: {matchLabels: {role: web}}}]
";

    const GUARD: &str = "\
apiVersion: policy.networking.k8s.io/v1alpha1
kind: AdminNetworkPolicy
metadata: {name: guard}
spec:
  priority: 10
  subject: {namespaces: {}}
  ingress:
  - name: no-one
    action: Deny
    from: [{namespaces: {}}]
";

    #[test]
    fn a_directory_of_policies_loads() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.yaml"), ALLOW).unwrap();
        std::fs::write(dir.path().join("guard.yaml"), GUARD).unwrap();
        std::fs::write(dir.path().join("notes.txt"), "not yaml").unwrap();
        let p = load_dir(dir.path()).unwrap();
        assert_eq!((p.network.len(), p.admin.len()), (1, 1));
        assert_eq!(p.admin[0].key().to_string(), "AdminNetworkPolicy/guard");
        assert_eq!(snapshot(dir.path()).unwrap().len(), 2);
    }

    /// A staged policy is validated and set aside, never enforced.
    #[test]
    fn a_staged_policy_is_not_enforced() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.yaml"), ALLOW).unwrap();
        let staged = GUARD.replace(
            "metadata: {name: guard}",
            "metadata: {name: guard, annotations: {tessera.dev/staged: \"true\"}}",
        );
        std::fs::write(dir.path().join("guard.yaml"), &staged).unwrap();
        let p = load_dir(dir.path()).unwrap();
        assert_eq!((p.network.len(), p.admin.len()), (1, 0));
        let names: Vec<String> = p
            .staged
            .iter()
            .map(|o| format!("{} {}", o.kind(), o.name()))
            .collect();
        assert_eq!(names, ["AdminNetworkPolicy guard"]);
        std::fs::write(
            dir.path().join("guard.yaml"),
            staged.replace("action: Deny", "action: Drop"),
        )
        .unwrap();
        let e = format!("{:#}", load_dir(dir.path()).unwrap_err());
        assert!(e.contains("guard.yaml") && e.contains("staged"), "{e}");
    }

    #[test]
    fn a_bad_file_is_named_with_its_field() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("good.yaml"), ALLOW).unwrap();
        let bad = ALLOW
            .replace("allow-web", "bad")
            .replace("ingress:", "ingress:\n    - ports: [{port: 0}]");
        std::fs::write(dir.path().join("bad.yaml"), bad).unwrap();
        let e = format!("{:#}", load_dir(dir.path()).unwrap_err());
        assert!(e.contains("bad.yaml"), "{e}");
        assert!(e.contains("spec.ingress[0].ports[0].port"), "{e}");
        assert!(!e.contains("good.yaml"), "{e}");
    }

    /// An invalid admin policy refuses the set naming file, kind, object and field; so does
    /// one defined twice.
    #[test]
    fn a_bad_admin_policy_is_named_with_its_field() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.yaml"), ALLOW).unwrap();
        std::fs::write(
            dir.path().join("guard.yaml"),
            GUARD.replace("action: Deny", "action: Drop"),
        )
        .unwrap();
        let e = format!("{:#}", load_dir(dir.path()).unwrap_err());
        assert!(e.contains("guard.yaml"), "{e}");
        assert!(e.contains("AdminNetworkPolicy guard"), "{e}");
        assert!(e.contains("spec.ingress[0].action"), "{e}");

        std::fs::write(dir.path().join("guard.yaml"), GUARD).unwrap();
        std::fs::write(dir.path().join("guard-again.yaml"), GUARD).unwrap();
        let e = format!("{:#}", load_dir(dir.path()).unwrap_err());
        assert!(e.contains("defined twice"), "{e}");
    }

    #[test]
    fn replacing_admin_policies_keeps_other_kinds_and_refused_ones() {
        let mut engine = Engine::new();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("guard.yaml"), GUARD).unwrap();
        let set = load_dir(dir.path()).unwrap();
        let mut keys = std::collections::BTreeSet::new();
        let r = replace_admin(&mut engine, &set.admin, &mut keys, |_| true);
        assert_eq!((r.applied, r.removed, r.refused.len()), (1, 0, 0));
        assert_eq!(engine.admin_policy_count(), 1);
        // A relist of another kind leaves it alone.
        let r = replace_admin(&mut engine, &[], &mut keys, |k| {
            k.kind == policy::AdminKind::ClusterNetworkPolicy
        });
        assert_eq!(r.removed, 0);
        assert_eq!(engine.admin_policy_count(), 1);
        // An invalid new version is refused; the old one stays.
        let AdminPolicy::Admin(mut bad) = set.admin[0].clone() else {
            panic!("an AdminNetworkPolicy")
        };
        if let Some(spec) = bad.spec.as_mut() {
            spec.priority = Some(5000);
        }
        let r = replace_admin(&mut engine, &[AdminPolicy::Admin(bad)], &mut keys, |k| {
            k.kind == policy::AdminKind::AdminNetworkPolicy
        });
        assert_eq!((r.applied, r.removed, r.refused.len()), (0, 0, 1));
        assert!(r.refused[0].contains("spec.priority"), "{:?}", r.refused);
        assert_eq!(engine.admin_policy_count(), 1);
        // Its relist without it removes it.
        let r = replace_admin(&mut engine, &[], &mut keys, |k| {
            k.kind == policy::AdminKind::AdminNetworkPolicy
        });
        assert_eq!(r.removed, 1);
        assert_eq!(engine.admin_policy_count(), 0);
        assert!(keys.is_empty());
    }

    #[test]
    fn replacing_removes_policies_that_are_gone() {
        let mut engine = Engine::new();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.yaml"), ALLOW).unwrap();
        let first = load_dir(dir.path()).unwrap();
        let (keys, removed) = replace(&mut engine, &first.network, &[]).unwrap();
        assert_eq!((keys.len(), removed), (1, 0));
        assert_eq!(engine.policy_count(), 1);
        let (keys, removed) = replace(&mut engine, &[], &keys).unwrap();
        assert_eq!((keys.len(), removed), (0, 1));
        assert_eq!(engine.policy_count(), 0);
    }
}
