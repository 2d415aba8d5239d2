//! Staged policies: NetworkPolicies and admin policies evaluated beside the enforced set and
//! never enforced (Calico's staged policies, a preview of a change).
//!
//! The engine keeps, while anything is staged, a second engine: the *staged view*. It is the
//! enforced state with the staged policies applied over it (a staged policy replaces an enforced
//! one of the same kind and name, or adds to the set). Every change to the enforced state
//! (namespaces, workloads, nodes, policies) is made to the view too, incrementally, except a
//! change to a policy the view holds a staged version of. A change to the staged set rebuilds
//! the view from the enforced state (a copy of the engine: staged changes are rare, decisions
//! and enforced changes are not). Nothing is staged: no view, no cost.
//!
//! The view only answers questions ([`Engine::staged_view`]); the enforced decisions
//! ([`Engine::decide_ref`]) never look at it.

use std::collections::BTreeMap;
use std::fmt;

use super::Engine;
use crate::PolicyError;
use crate::model::{AdminKind, AdminPolicyKey, PolicyKey};
use crate::objects::{DEFAULT_NAMESPACE, Object};

/// What a staged policy is known by: its kind and name.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum StagedKey {
    NetworkPolicy(PolicyKey),
    Admin(AdminPolicyKey),
}

impl StagedKey {
    /// The key of a policy object; `None` for the kinds that are not policies.
    pub fn of(object: &Object) -> Option<StagedKey> {
        let meta = object.metadata();
        let name = meta.name.clone().unwrap_or_default();
        let admin = |kind| {
            Some(StagedKey::Admin(AdminPolicyKey {
                kind,
                name: name.clone(),
            }))
        };
        match object {
            Object::NetworkPolicy(_) => Some(StagedKey::NetworkPolicy(PolicyKey {
                namespace: meta
                    .namespace
                    .clone()
                    .unwrap_or_else(|| DEFAULT_NAMESPACE.to_owned()),
                name: name.clone(),
            })),
            Object::ClusterNetworkPolicy(_) => admin(AdminKind::ClusterNetworkPolicy),
            Object::AdminNetworkPolicy(_) => admin(AdminKind::AdminNetworkPolicy),
            Object::BaselineAdminNetworkPolicy(_) => admin(AdminKind::BaselineAdminNetworkPolicy),
            Object::Namespace(_) | Object::Node(_) | Object::Pod(_) => None,
        }
    }

    /// `NetworkPolicy`, or the admin kind.
    pub fn kind(&self) -> &'static str {
        match self {
            StagedKey::NetworkPolicy(_) => "NetworkPolicy",
            StagedKey::Admin(k) => match k.kind {
                AdminKind::ClusterNetworkPolicy => "ClusterNetworkPolicy",
                AdminKind::AdminNetworkPolicy => "AdminNetworkPolicy",
                AdminKind::BaselineAdminNetworkPolicy => "BaselineAdminNetworkPolicy",
            },
        }
    }
}

impl fmt::Display for StagedKey {
    /// `NetworkPolicy default/web`, `AdminNetworkPolicy guard`
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StagedKey::NetworkPolicy(k) => write!(f, "NetworkPolicy {}/{}", k.namespace, k.name),
            StagedKey::Admin(k) => write!(f, "{} {}", self.kind(), k.name),
        }
    }
}

/// The staged policies and their view.
pub(super) struct Staging {
    /// The enforced state with the staged policies over it.
    pub(super) view: Engine,
    /// The staged objects as given, to rebuild the view.
    objects: BTreeMap<StagedKey, Object>,
}

/// Apply a policy object to an engine.
fn apply(engine: &mut Engine, object: &Object) -> Result<(), PolicyError> {
    match object {
        Object::NetworkPolicy(p) => engine.apply_policy(p).map(drop),
        Object::ClusterNetworkPolicy(p) => engine.apply_cluster_network_policy(p).map(drop),
        Object::AdminNetworkPolicy(p) => engine.apply_admin_network_policy(p).map(drop),
        Object::BaselineAdminNetworkPolicy(p) => {
            engine.apply_baseline_admin_network_policy(p).map(drop)
        }
        other => Err(not_a_policy(other)),
    }
}

fn not_a_policy(object: &Object) -> PolicyError {
    PolicyError {
        kind: object.kind(),
        object: object.name(),
        field: String::new(),
        message: format!("a {} cannot be staged: only policies are", object.kind()),
    }
}

impl Engine {
    /// The staged view, mutably, for forwarding a change of the enforced state.
    pub(super) fn staged_view_mut(&mut self) -> Option<&mut Engine> {
        self.staging.as_deref_mut().map(|s| &mut s.view)
    }

    /// The staged view, for forwarding a change to the enforced policy `key`: `None` when
    /// nothing is staged or when the view holds a staged version of `key` (which stays).
    pub(super) fn staged_view_for(&mut self, key: &StagedKey) -> Option<&mut Engine> {
        self.staging
            .as_deref_mut()
            .filter(|s| !s.objects.contains_key(key))
            .map(|s| &mut s.view)
    }

    /// The engine as it would be with the staged policies enforced, if any is staged: ask it
    /// for decisions ([`Engine::decide_ref`]) beside the enforced ones. It follows every change
    /// to the enforced state.
    pub fn staged_view(&self) -> Option<&Engine> {
        self.staging.as_deref().map(|s| &s.view)
    }

    /// The staged policies, in key order.
    pub fn staged(&self) -> impl Iterator<Item = &StagedKey> {
        self.staging.iter().flat_map(|s| s.objects.keys())
    }

    /// Number of staged policies.
    pub fn staged_count(&self) -> usize {
        self.staging.as_ref().map_or(0, |s| s.objects.len())
    }

    /// Whether `key` is staged.
    pub fn is_staged(&self, key: &StagedKey) -> bool {
        self.staging
            .as_ref()
            .is_some_and(|s| s.objects.contains_key(key))
    }

    /// Stage policies: each object (a NetworkPolicy or an admin policy, staged or not: the
    /// annotation is the caller's business) is validated as `apply_*` would and evaluated in
    /// the staged view from now on, replacing a staged version of the same kind and name.
    /// Staged policies covered by `scope` and not in `objects` are unstaged. A refused object
    /// is returned and its previous staged version (if any) stays.
    ///
    /// Rebuilds the view from the enforced state: O(size of the engine).
    pub fn replace_staged(
        &mut self,
        objects: Vec<Object>,
        scope: impl Fn(&StagedKey) -> bool,
    ) -> Vec<PolicyError> {
        // In scope: replaced, and the fallbacks of refused objects. Out of scope: kept.
        let (mut fallbacks, mut held): (BTreeMap<_, _>, BTreeMap<_, _>) = self
            .staging
            .take()
            .map(|s| s.objects)
            .unwrap_or_default()
            .into_iter()
            .partition(|(k, _)| scope(k));
        if held.is_empty() && objects.is_empty() {
            return Vec::new();
        }
        // Each object is validated by applying it to the view: a refused one leaves the
        // view's version of its key as it was.
        let mut view = self.clone_enforced();
        held.retain(|_, o| apply(&mut view, o).is_ok());
        let mut refused = Vec::new();
        for object in objects {
            let key = StagedKey::of(&object);
            match (key, apply(&mut view, &object)) {
                (Some(key), Ok(())) => {
                    held.insert(key, object);
                }
                (key, Err(error)) => {
                    if let Some((k, previous)) = key.and_then(|k| fallbacks.remove_entry(&k))
                        && apply(&mut view, &previous).is_ok()
                    {
                        held.insert(k, previous);
                    }
                    refused.push(error);
                }
                // `apply` refuses what is not a policy.
                (None, Ok(())) => {}
            }
        }
        self.staging = (!held.is_empty()).then(|| {
            Box::new(Staging {
                view,
                objects: held,
            })
        });
        refused
    }

    /// Stage one policy (see [`Engine::replace_staged`]); `Err` leaves the staged set as it was.
    pub fn stage(&mut self, object: Object) -> Result<StagedKey, PolicyError> {
        let Some(key) = StagedKey::of(&object) else {
            return Err(not_a_policy(&object));
        };
        match self.replace_staged(vec![object], |_| false).pop() {
            Some(refusal) => Err(refusal),
            None => Ok(key),
        }
    }

    /// Unstage one policy: the view has the enforced version back, if there is one. Whether it
    /// was staged (if not, nothing changes).
    pub fn unstage(&mut self, key: &StagedKey) -> bool {
        let staged = self.is_staged(key);
        if staged {
            self.replace_staged(Vec::new(), |k| k == key);
        }
        staged
    }

    /// A copy of the enforced state (nothing staged).
    fn clone_enforced(&self) -> Engine {
        Engine {
            namespaces: self.namespaces.clone(),
            workloads: self.workloads.clone(),
            workload_order: self.workload_order.clone(),
            pods_by_ns: self.pods_by_ns.clone(),
            policies: self.policies.clone(),
            policy_rules: self.policy_rules.clone(),
            free: self.free.clone(),
            policies_by_ns: self.policies_by_ns.clone(),
            by_ip: self.by_ip.clone(),
            admin_policies: self.admin_policies.clone(),
            admin_rules: self.admin_rules.clone(),
            admin_free: self.admin_free.clone(),
            admin_by_key: self.admin_by_key.clone(),
            admin_selectors: self.admin_selectors.clone(),
            admin_conds: self.admin_conds.clone(),
            nodes: self.nodes.clone(),
            staging: None,
        }
    }
}
