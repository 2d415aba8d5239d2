//! The compiled policy set and its index. (Contract only: the policy issue fills it in.)

use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::api::networking::v1::NetworkPolicy;

use crate::model::{Connection, Decision, PodKey, PolicyKey, Workload};
use crate::PolicyError;

/// Namespaces, workloads and compiled policies, indexed for decisions.
///
/// Every `apply_*` validates first: an invalid object returns an error naming the object and the
/// field, and the engine keeps the last good state (the previous version of that object stays in
/// force). Updates are incremental: applying one policy or one workload re-indexes only what it
/// touches.
#[derive(Default)]
pub struct Engine {}

impl Engine {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds or replaces a namespace (its labels; `kubernetes.io/metadata.name` is added).
    pub fn apply_namespace(&mut self, ns: &Namespace) -> Result<(), PolicyError> {
        let _ = ns;
        todo!()
    }

    pub fn remove_namespace(&mut self, name: &str) {
        let _ = name;
        todo!()
    }

    /// Adds or replaces a pod. Its IPs come from `status.podIPs` / `status.podIP`.
    pub fn apply_pod(&mut self, pod: &Pod) -> Result<PodKey, PolicyError> {
        let _ = pod;
        todo!()
    }

    /// Adds or replaces a workload known by other means (Docker, static inventory).
    pub fn apply_workload(&mut self, workload: Workload) -> Result<(), PolicyError> {
        let _ = workload;
        todo!()
    }

    pub fn remove_workload(&mut self, key: &PodKey) {
        let _ = key;
        todo!()
    }

    /// Validates (with the API server's defaulting), compiles and indexes one policy.
    pub fn apply_policy(&mut self, policy: &NetworkPolicy) -> Result<PolicyKey, PolicyError> {
        let _ = policy;
        todo!()
    }

    pub fn remove_policy(&mut self, key: &PolicyKey) {
        let _ = key;
        todo!()
    }

    /// One direction's verdict for one connection, with its reason.
    pub fn decide(&self, conn: &Connection<'_>) -> Decision {
        let _ = conn;
        todo!()
    }

    /// The workload, if known.
    pub fn workload(&self, key: &PodKey) -> Option<&Workload> {
        let _ = key;
        todo!()
    }

    /// All known workloads, in key order.
    pub fn workloads(&self) -> impl Iterator<Item = &Workload> {
        std::iter::empty()
    }
}
