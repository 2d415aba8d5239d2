//! Kubernetes objects from YAML text: multi-document streams and `kind: List`, as written by
//! `kubectl get ns,pods,netpol -A -o yaml`. Parsing text is pure; reading files is the caller's.
//! (Contract only: filled in with `tessera policy matrix`.)

use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::api::networking::v1::NetworkPolicy;

/// An object the policy engine consumes.
#[derive(Clone, Debug)]
pub enum Object {
    Namespace(Namespace),
    Pod(Pod),
    NetworkPolicy(NetworkPolicy),
}
