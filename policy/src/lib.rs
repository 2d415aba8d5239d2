//! Kubernetes `networking.k8s.io/v1` NetworkPolicy, evaluated exactly.
//!
//! Pure: no I/O, no async, no clock. Objects go in (k8s-openapi types, or [`Workload`]s built by
//! the agent), decisions come out. The [`Engine`] validates and compiles every policy once and
//! keeps an index from each workload to the policies that select it, so a decision looks only at
//! the policies that select the local workload, never at every policy.
//!
//! Vocabulary: the *local* workload is the one the agent enforces and the decision is about; the
//! *peer* is the other end. For [`Direction::Ingress`] the peer is the source and the local
//! workload the destination; for [`Direction::Egress`] the local workload is the source and the
//! peer the destination. A connection is allowed iff egress of its source AND ingress of its
//! destination allow it ([`matrix::evaluate`] combines both).
//!
//! On the packet path use [`Engine::decide_ref`] (or [`Engine::allows`]): it allocates nothing,
//! its reason borrows the policy keys from the engine; [`Engine::decide`] returns the owned
//! [`Decision`]. An unknown local workload is denied ([`Reason::UnknownWorkload`]).

pub mod admin;
mod compiled;
mod engine;
mod error;
pub mod matrix;
mod model;
mod nodes;
pub mod objects;
mod selector;
mod validate;
mod validate_admin;

pub use engine::Engine;
pub use engine::{AdminApplied, DecisionRef, IsolatingPolicies, ReasonRef, StagedKey};
pub use error::PolicyError;
pub use error::ProbeParseError;
pub use model::{
    AdminAction, AdminKind, AdminPolicyKey, AdminRuleRef, AdminWarning, Connection, ContainerPort,
    Decision, Direction, Labels, NamespaceKey, Node, Peer, PodKey, PolicyKey, Protocol, Reason,
    RuleRef, Tier, Workload, WorkloadIdentity,
};
pub use nodes::node_from_object;
