//! NetworkPolicies from a directory of YAML files, reloaded when a file changes. A bad file is
//! reported by name and the last good set stays in force.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use anyhow::{Context, Result, bail};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use policy::objects::{self, Object};
use policy::{Engine, PolicyKey};

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

/// Read every policy file of `dir`; every NetworkPolicy is validated against a scratch engine.
/// Any error (naming file, object and field) refuses the whole set.
pub fn load_dir(dir: &Path) -> Result<Vec<NetworkPolicy>> {
    let snap = snapshot(dir)?;
    let mut policies = Vec::new();
    let mut problems = Vec::new();
    let mut scratch = Engine::new();
    for path in snap.keys() {
        let source = path.display().to_string();
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {source}"))?;
        let parsed = objects::parse(&source, &text);
        problems.extend(parsed.errors.iter().map(ToString::to_string));
        for skipped in &parsed.skipped {
            tracing::warn!(
                "{}: {} {} ignored: only NetworkPolicy objects are read from the policy directory",
                skipped.origin,
                skipped.kind,
                skipped.name
            );
        }
        for located in parsed.objects {
            match located.value {
                Object::NetworkPolicy(p) => match scratch.apply_policy(&p) {
                    Ok(_) => policies.push(p),
                    Err(e) => problems.push(format!(
                        "{} (NetworkPolicy {}): {}: {}",
                        located.origin, e.object, e.field, e.message
                    )),
                },
                // An admin Deny that the agent skipped would be a silent hole: refuse the set.
                admin @ (Object::ClusterNetworkPolicy(_)
                | Object::AdminNetworkPolicy(_)
                | Object::BaselineAdminNetworkPolicy(_)) => problems.push(format!(
                    "{} ({} {}): admin policies are evaluated by `tessera policy matrix/explain` \
                     but not enforced by the agent yet; the policy directory is refused rather \
                     than enforced without them",
                    located.origin,
                    admin.kind(),
                    admin.name()
                )),
                other => tracing::warn!(
                    "{}: {} {} ignored: only NetworkPolicy objects are read from the policy directory",
                    located.origin,
                    other.kind(),
                    other.name()
                ),
            }
        }
    }
    if !problems.is_empty() {
        bail!("{}", problems.join("\n"));
    }
    Ok(policies)
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
            Ok(policies) => {
                let event = crate::runtime::Event::Policies {
                    origin: origin.clone(),
                    policies,
                };
                if tx.send(event).await.is_err() {
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

    #[test]
    fn a_directory_of_policies_loads() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.yaml"), ALLOW).unwrap();
        std::fs::write(dir.path().join("notes.txt"), "not yaml").unwrap();
        let p = load_dir(dir.path()).unwrap();
        assert_eq!(p.len(), 1);
        assert_eq!(snapshot(dir.path()).unwrap().len(), 1);
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

    #[test]
    fn an_admin_policy_refuses_the_directory_rather_than_being_skipped() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.yaml"), ALLOW).unwrap();
        std::fs::write(
            dir.path().join("guard.yaml"),
            "\
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
",
        )
        .unwrap();
        let e = format!("{:#}", load_dir(dir.path()).unwrap_err());
        assert!(e.contains("guard.yaml") && e.contains("guard"), "{e}");
        assert!(e.contains("not enforced by the agent"), "{e}");
    }

    #[test]
    fn replacing_removes_policies_that_are_gone() {
        let mut engine = Engine::new();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.yaml"), ALLOW).unwrap();
        let first = load_dir(dir.path()).unwrap();
        let (keys, removed) = replace(&mut engine, &first, &[]).unwrap();
        assert_eq!((keys.len(), removed), (1, 0));
        assert_eq!(engine.policy_count(), 1);
        let (keys, removed) = replace(&mut engine, &[], &keys).unwrap();
        assert_eq!((keys.len(), removed), (0, 1));
        assert_eq!(engine.policy_count(), 0);
    }
}
