//! Cluster-wide admin policies as the Kubernetes SIG Network `network-policy-api` (release
//! v0.2.0) defines them, in the `policy.networking.k8s.io` group:
//!
//! - [`ClusterNetworkPolicy`] (`v1alpha2`): `tier: Admin | Baseline`, `priority` 0-1000,
//!   actions `Accept | Deny | Pass`, ports under `protocols`;
//! - [`AdminNetworkPolicy`] (`v1alpha1`): the Admin tier, `priority` 0-1000, actions
//!   `Allow | Deny | Pass`, ports under `ports`;
//! - [`BaselineAdminNetworkPolicy`] (`v1alpha1`): the Baseline tier, a singleton named
//!   `default`, actions `Allow | Deny`.
//!
//! These are the objects as written (serde types of our own, field names as the API spells
//! them); [`crate::Engine`] validates them and compiles all three into one model. Where the API
//! is strict (the CRDs' closed schemas) unknown fields are errors naming the field. Peers are the
//! exception: the API asks an implementation that finds a peer with no field it knows (a newer
//! CRD) to fail closed, so peers keep their unknown fields for the engine to judge
//! (see `docs/admin-policies.md`).
//!
//! Required fields are `Option`s here so that the engine, not the parser, names them when they
//! are missing, the same way whether the object came from YAML or was built in code.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use serde::Deserialize;
use serde::de::IgnoredAny;

/// The API group of all three kinds.
pub const GROUP: &str = "policy.networking.k8s.io";
/// `apiVersion` of [`ClusterNetworkPolicy`].
pub const API_VERSION_V1ALPHA2: &str = "policy.networking.k8s.io/v1alpha2";
/// `apiVersion` of [`AdminNetworkPolicy`] and [`BaselineAdminNetworkPolicy`].
pub const API_VERSION_V1ALPHA1: &str = "policy.networking.k8s.io/v1alpha1";

// ----------------------------------------------------------------------------------------------
// Shared
// ----------------------------------------------------------------------------------------------

/// `spec.subject`: exactly one of `namespaces` (every pod of the matching namespaces) or `pods`
/// (namespace AND pod selectors). Host-network pods are never subjects.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Subject {
    pub namespaces: Option<LabelSelector>,
    pub pods: Option<NamespacedPod>,
}

/// Pods selected by namespace AND pod selectors.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct NamespacedPod {
    /// Optional in v1alpha2 (absent: every namespace), required in v1alpha1.
    pub namespace_selector: Option<LabelSelector>,
    /// Required.
    pub pod_selector: Option<LabelSelector>,
}

/// An ingress peer (`from[]`): exactly one of `namespaces` or `pods`.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IngressPeer {
    pub namespaces: Option<LabelSelector>,
    pub pods: Option<NamespacedPod>,
    /// Fields this version does not know: the peer fails closed.
    #[serde(flatten)]
    pub unknown: BTreeMap<String, IgnoredAny>,
}

/// An egress peer (`to[]`): exactly one of `namespaces`, `pods`, `nodes`, `networks` or
/// `domainNames` (BaselineAdminNetworkPolicy has no `domainNames`).
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EgressPeer {
    pub namespaces: Option<LabelSelector>,
    pub pods: Option<NamespacedPod>,
    /// Nodes by their labels: the engine has no node inventory, so this peer fails closed.
    pub nodes: Option<LabelSelector>,
    /// CIDRs, IPv4 or IPv6; pod addresses included.
    pub networks: Option<Vec<String>>,
    /// DNS names (`*.` prefix allowed): the engine sees addresses, not names, so this peer
    /// fails closed.
    pub domain_names: Option<Vec<String>>,
    /// Fields this version does not know: the peer fails closed.
    #[serde(flatten)]
    pub unknown: BTreeMap<String, IgnoredAny>,
}

// ----------------------------------------------------------------------------------------------
// v1alpha2: ClusterNetworkPolicy
// ----------------------------------------------------------------------------------------------

/// `policy.networking.k8s.io/v1alpha2` ClusterNetworkPolicy (cluster-scoped).
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ClusterNetworkPolicy {
    #[serde(default)]
    pub metadata: ObjectMeta,
    pub spec: Option<ClusterNetworkPolicySpec>,
    /// Written by implementations; not read.
    pub status: Option<IgnoredAny>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ClusterNetworkPolicySpec {
    /// `Admin` or `Baseline`.
    pub tier: Option<String>,
    /// 0-1000; lower values are evaluated first within the tier.
    pub priority: Option<i64>,
    pub subject: Option<Subject>,
    /// At most 25 rules; absent or empty: the policy does not affect ingress.
    pub ingress: Option<Vec<ClusterNetworkPolicyIngressRule>>,
    /// At most 25 rules; absent or empty: the policy does not affect egress.
    pub egress: Option<Vec<ClusterNetworkPolicyEgressRule>>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ClusterNetworkPolicyIngressRule {
    /// At most 100 characters; for people, not for matching.
    pub name: Option<String>,
    /// `Accept`, `Deny` or `Pass`.
    pub action: Option<String>,
    /// 1-25 peers.
    pub from: Option<Vec<IngressPeer>>,
    /// 1-25 entries when present; absent: every port and protocol.
    pub protocols: Option<Vec<ClusterNetworkPolicyProtocol>>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ClusterNetworkPolicyEgressRule {
    pub name: Option<String>,
    pub action: Option<String>,
    /// 1-25 peers.
    pub to: Option<Vec<EgressPeer>>,
    pub protocols: Option<Vec<ClusterNetworkPolicyProtocol>>,
}

/// Exactly one of `tcp`, `udp`, `sctp` or `destinationNamedPort`.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ClusterNetworkPolicyProtocol {
    pub tcp: Option<ProtocolPort>,
    pub udp: Option<ProtocolPort>,
    pub sctp: Option<ProtocolPort>,
    /// A container port name of the destination pod (any protocol it is declared with).
    pub destination_named_port: Option<String>,
}

/// `tcp` / `udp` / `sctp`: `destinationPort` is required (the API's `MinProperties=1`).
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ProtocolPort {
    pub destination_port: Option<DestinationPort>,
}

/// Exactly one of `number` or `range`.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct DestinationPort {
    pub number: Option<i64>,
    pub range: Option<PortRangeV2>,
}

/// Inclusive; `start < end` (the API's CEL rule).
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PortRangeV2 {
    pub start: Option<i64>,
    pub end: Option<i64>,
}

// ----------------------------------------------------------------------------------------------
// v1alpha1: AdminNetworkPolicy and BaselineAdminNetworkPolicy
// ----------------------------------------------------------------------------------------------

/// `policy.networking.k8s.io/v1alpha1` AdminNetworkPolicy (cluster-scoped): the Admin tier.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct AdminNetworkPolicy {
    #[serde(default)]
    pub metadata: ObjectMeta,
    pub spec: Option<AdminNetworkPolicySpec>,
    pub status: Option<IgnoredAny>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct AdminNetworkPolicySpec {
    /// 0-1000.
    pub priority: Option<i64>,
    pub subject: Option<Subject>,
    /// At most 100 rules.
    pub ingress: Option<Vec<AdminNetworkPolicyIngressRule>>,
    /// At most 100 rules.
    pub egress: Option<Vec<AdminNetworkPolicyEgressRule>>,
}

/// An ingress rule of AdminNetworkPolicy (actions `Allow | Deny | Pass`) and of
/// BaselineAdminNetworkPolicy (actions `Allow | Deny`).
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct AdminNetworkPolicyIngressRule {
    pub name: Option<String>,
    pub action: Option<String>,
    /// 1-100 peers.
    pub from: Option<Vec<IngressPeer>>,
    /// 1-100 entries when present; absent: every port and protocol.
    pub ports: Option<Vec<AdminNetworkPolicyPort>>,
}

/// An egress rule of AdminNetworkPolicy and BaselineAdminNetworkPolicy.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct AdminNetworkPolicyEgressRule {
    pub name: Option<String>,
    pub action: Option<String>,
    /// 1-100 peers.
    pub to: Option<Vec<EgressPeer>>,
    pub ports: Option<Vec<AdminNetworkPolicyPort>>,
}

/// Exactly one of `portNumber`, `namedPort` or `portRange`.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct AdminNetworkPolicyPort {
    pub port_number: Option<PortNumberV1>,
    /// A container port name of the destination pod (any protocol it is declared with).
    pub named_port: Option<String>,
    pub port_range: Option<PortRangeV1>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PortNumberV1 {
    /// `TCP` (the default), `UDP` or `SCTP`.
    pub protocol: Option<String>,
    /// 1-65535, required.
    pub port: Option<i64>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PortRangeV1 {
    /// `TCP` (the default), `UDP` or `SCTP`.
    pub protocol: Option<String>,
    pub start: Option<i64>,
    pub end: Option<i64>,
}

/// `policy.networking.k8s.io/v1alpha1` BaselineAdminNetworkPolicy (cluster-scoped): the
/// Baseline tier; the API allows only one, named `default`.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct BaselineAdminNetworkPolicy {
    #[serde(default)]
    pub metadata: ObjectMeta,
    pub spec: Option<BaselineAdminNetworkPolicySpec>,
    pub status: Option<IgnoredAny>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct BaselineAdminNetworkPolicySpec {
    pub subject: Option<Subject>,
    /// At most 100 rules; actions `Allow | Deny`.
    pub ingress: Option<Vec<AdminNetworkPolicyIngressRule>>,
    /// At most 100 rules; actions `Allow | Deny`; peers without `domainNames`.
    pub egress: Option<Vec<AdminNetworkPolicyEgressRule>>,
}
