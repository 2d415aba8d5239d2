//! Workload sources ("runtimes"): a static inventory, Docker, Kubernetes. Each runs as its own
//! task and tells the agent what should be enforced through [`Event`]s on a channel; the agent
//! alone installs rules, opens queues and updates the policy engine, so a runtime never blocks
//! the datapath and a slow or broken runtime never leaves half-applied state.
//!
//! Contract for a runtime:
//! - It sends [`Event::Sync`] with the complete list whenever it has a complete view: at start
//!   (nothing is enforced from a half-listed view), and again after every reconnect/relist, so
//!   that whatever vanished while it was disconnected is forgotten.
//! - Between syncs it sends [`Event::Upsert`] / [`Event::Remove`] for single changes. An upsert
//!   of a key that is already enforced with the same netns only updates labels/ports/IPs (the
//!   rules and the queue stay); a different netns (a restarted container) re-installs.
//! - It never sends workloads that must not be enforced (host network, a container sharing
//!   another container's netns); it logs why it skipped them.

use std::collections::BTreeMap;
use std::net::IpAddr;

use ipnet::IpNet;
use std::path::PathBuf;
use std::time::SystemTime;

use k8s_openapi::api::networking::v1::NetworkPolicy;
use policy::admin::{AdminNetworkPolicy, BaselineAdminNetworkPolicy, ClusterNetworkPolicy};
use policy::{
    AdminApplied, AdminKind, AdminPolicyKey, ContainerPort, Engine, PodKey, PolicyError, PolicyKey,
};

pub mod docker;
pub mod inventory;
pub mod kubernetes;

/// Sleeps until `at`; without one, never returns (a `select!` branch with nothing to wait for).
pub(crate) async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Where a workload's network namespace is.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum NetnsRef {
    /// A bind-mounted namespace (`/var/run/netns/NAME`) or any path `setns(2)` accepts.
    Path(PathBuf),
    /// The namespace of a process in the host PID namespace (`/proc/PID/ns/net`).
    Pid(u32),
}

impl NetnsRef {
    /// The path to open: the bind mount, or `/proc/PID/ns/net`.
    pub fn path(&self) -> PathBuf {
        match self {
            NetnsRef::Path(p) => p.clone(),
            NetnsRef::Pid(pid) => datapath::shell::Netns::from_pid(*pid).path().to_owned(),
        }
    }
}

/// One workload as a runtime wants it enforced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Desired {
    /// Namespace and name: the identity's name, and the key of every later event about it.
    pub key: PodKey,
    /// The workload's labels (valid Kubernetes labels; a runtime drops or refuses the others).
    pub labels: BTreeMap<String, String>,
    /// The namespace's labels when the runtime knows them (static inventory). `None`: the agent
    /// uses what it knows of the namespace (Kubernetes Namespace objects), else the default
    /// `kubernetes.io/metadata.name` label alone.
    pub namespace_labels: Option<BTreeMap<String, String>>,
    /// Container ports (for named ports in policies).
    pub ports: Vec<ContainerPort>,
    /// The workload's addresses (for ipBlock rules evaluated by peers without tokens).
    pub ips: Vec<IpAddr>,
    /// Its network namespace.
    pub netns: NetnsRef,
    /// Where this came from, for log lines and errors ("docker container 3f2a9c… (web-1)",
    /// "inventory.yaml: workloads[2]").
    pub origin: String,
    /// When the runtime saw the workload start (the Docker event's time), if it knows: the agent
    /// records the time from there to enforcement in a histogram.
    pub started_at: Option<SystemTime>,
    /// The workload requires encryption ([`REQUIRE_ENCRYPTION`] on it): its packets to and from
    /// other nodes' pods that do not go through the tunnel between nodes are dropped and
    /// recorded. (Kubernetes: also when its namespace says so, see [`Event::Namespace`].)
    pub require_encryption: bool,
}

/// The annotation (Kubernetes pods and namespaces) or label (Docker containers) that makes a
/// workload require encryption; the static inventory's `requireEncryption: true` says the same.
pub const REQUIRE_ENCRYPTION: &str = "tessera.dev/require-encryption";

/// Whether a [`REQUIRE_ENCRYPTION`] value asks for encryption: `"true"` (any case) yes,
/// `"false"` or absent no. Any other value is taken as yes (whoever wrote it meant to require
/// something, and a typo must not leave the workload in clear), and the error says so.
pub fn requires_encryption(value: Option<&str>) -> (bool, Option<String>) {
    match value.map(str::trim) {
        None => (false, None),
        Some(v) if v.eq_ignore_ascii_case("true") => (true, None),
        Some(v) if v.eq_ignore_ascii_case("false") => (false, None),
        Some(v) => (
            true,
            Some(format!(
                "{REQUIRE_ENCRYPTION}: {v:?} is neither \"true\" nor \"false\": taken as \"true\""
            )),
        ),
    }
}

/// A node as a runtime reports it: what the policy engine matches (admin `nodes` peers) and
/// what the tunnel between nodes needs. The pod prefixes and tunnel addresses stay out of
/// `policy::Node`: no decision reads them, and the engine stays about policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeInfo {
    pub node: policy::Node,
    /// Where its agent's tunnel is reached, in order: Kubernetes, its `InternalIP` addresses;
    /// the inventory, its `addresses`.
    pub tunnel_addresses: Vec<IpAddr>,
    /// Its pods' address ranges (Kubernetes `spec.podCIDRs`, else `spec.podCIDR`; the
    /// inventory's `podCIDRs`), host bits clear.
    pub pod_cidrs: Vec<IpNet>,
}

impl NodeInfo {
    pub fn name(&self) -> &str {
        &self.node.name
    }
}

/// A pod range as a node states it: a network (host bits clear), not the whole address
/// space; the error says what is wrong with it.
pub fn parse_pod_cidr(text: &str) -> Result<IpNet, String> {
    let net: IpNet = text
        .trim()
        .parse()
        .map_err(|_| format!("{text:?} is not a CIDR (address/length)"))?;
    if net.trunc() != net {
        return Err(format!(
            "{text:?} has host bits set (the network is {})",
            net.trunc()
        ));
    }
    if net.prefix_len() == 0 {
        return Err(format!("{text:?} is the whole address space"));
    }
    let addr = net.network();
    if addr.is_loopback() || addr.is_multicast() || addr.is_unspecified() {
        return Err(format!(
            "{text:?} is not a unicast range (loopback, multicast or unspecified)"
        ));
    }
    Ok(net)
}

/// What a runtime tells the agent.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// The complete set of workloads: enforce these, forget every other one.
    Sync(Vec<Desired>),
    /// Enforce (or update) one workload.
    Upsert(Desired),
    /// Forget one workload: its rules are removed (when its netns still exists) and its queue
    /// closed.
    Remove(PodKey),
    /// A namespace's labels (Kubernetes). `None`: the namespace is gone (its workloads fall back
    /// to the default labels until they go too). Claims of its workloads are re-issued.
    Namespace {
        name: String,
        labels: Option<BTreeMap<String, String>>,
        /// Its [`REQUIRE_ENCRYPTION`] annotation asks for encryption: every workload in it
        /// requires it.
        require_encryption: bool,
    },
    /// The complete set of NetworkPolicies from one source (the policy directory after a good
    /// reload, a Kubernetes relist). `origin` names the source in errors. An invalid policy is
    /// reported and refused; the rest applies.
    ///
    /// `admin`: `Some`: the complete set of cluster-wide admin policies too, replacing every
    /// admin policy in force (the policy directory, which holds both); `None`: admin policies
    /// are left as they are (a Kubernetes NetworkPolicy relist; they have watches of their own).
    Policies {
        origin: String,
        policies: Vec<NetworkPolicy>,
        admin: Option<Vec<AdminPolicy>>,
    },
    /// The complete set of admin policies of one kind (a Kubernetes relist of that CRD; empty
    /// when the CRD was removed): those of that kind not in it are removed, except those named
    /// in `unparsed` (listed, but not readable as that kind: their previous version, if any,
    /// stays in force).
    AdminPolicies {
        origin: String,
        kind: AdminKind,
        policies: Vec<AdminPolicy>,
        unparsed: Vec<String>,
    },
    /// One admin policy added or changed.
    AdminUpsert(Box<AdminPolicy>),
    /// One admin policy deleted.
    AdminRemove(AdminPolicyKey),
    /// One NetworkPolicy added or changed.
    PolicyUpsert(Box<NetworkPolicy>),
    /// One NetworkPolicy deleted.
    PolicyRemove(PolicyKey),
    /// The complete node inventory (`nodes` peers of admin policies match node addresses):
    /// nodes not in it are forgotten. From Kubernetes Node objects, or the static inventory.
    Nodes {
        origin: String,
        nodes: Vec<NodeInfo>,
    },
    /// The complete set of staged policies (annotated `tessera.dev/staged: "true"`) that
    /// `scope` covers, from one source: evaluated beside the enforced set (the flow log shows
    /// what they would decide), never enforced. Staged policies in scope and not in `objects`
    /// are unstaged; a refused one keeps its previous staged version.
    Staged {
        origin: String,
        scope: StagedScope,
        objects: Vec<policy::objects::Object>,
    },
    /// One staged policy added or changed.
    StagedUpsert(Box<policy::objects::Object>),
    /// One policy no longer staged (deleted, or no longer annotated); nothing if it was not.
    StagedRemove(policy::StagedKey),
    /// One node added or changed.
    NodeUpsert(NodeInfo),
    /// One node gone.
    NodeRemove(String),
    /// A peer node's certificate (PEM) appeared or changed (PKI mode); `None` revokes it: its
    /// tokens are rejected from then on.
    PeerCertificate { node: String, pem: Option<String> },
}

/// Which staged policies an [`Event::Staged`] replaces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StagedScope {
    /// Every one (the policy directory holds all kinds).
    All,
    /// The NetworkPolicies (a Kubernetes relist).
    NetworkPolicies,
    /// Those of one admin kind (a Kubernetes relist of that kind).
    Admin(AdminKind),
}

impl StagedScope {
    pub fn covers(self, key: &policy::StagedKey) -> bool {
        match (self, key) {
            (StagedScope::All, _) => true,
            (StagedScope::NetworkPolicies, policy::StagedKey::NetworkPolicy(_)) => true,
            (StagedScope::Admin(kind), policy::StagedKey::Admin(k)) => k.kind == kind,
            _ => false,
        }
    }
}

/// A cluster-wide admin policy of any of the kinds the engine evaluates.
#[derive(Debug, Clone, PartialEq)]
pub enum AdminPolicy {
    /// `policy.networking.k8s.io/v1alpha2`, Admin or Baseline tier.
    Cluster(ClusterNetworkPolicy),
    /// `policy.networking.k8s.io/v1alpha1`, Admin tier.
    Admin(AdminNetworkPolicy),
    /// `policy.networking.k8s.io/v1alpha1`, Baseline tier (the singleton `default`).
    Baseline(BaselineAdminNetworkPolicy),
}

impl AdminPolicy {
    pub fn kind(&self) -> AdminKind {
        match self {
            AdminPolicy::Cluster(_) => AdminKind::ClusterNetworkPolicy,
            AdminPolicy::Admin(_) => AdminKind::AdminNetworkPolicy,
            AdminPolicy::Baseline(_) => AdminKind::BaselineAdminNetworkPolicy,
        }
    }

    /// The engine's key: kind and name (empty if the object has none; the engine refuses it).
    pub fn key(&self) -> AdminPolicyKey {
        let meta = match self {
            AdminPolicy::Cluster(p) => &p.metadata,
            AdminPolicy::Admin(p) => &p.metadata,
            AdminPolicy::Baseline(p) => &p.metadata,
        };
        AdminPolicyKey {
            kind: self.kind(),
            name: meta.name.clone().unwrap_or_default(),
        }
    }

    /// Validate, compile and index it (the previous version stays in force on error).
    pub fn apply(&self, engine: &mut Engine) -> Result<AdminApplied, PolicyError> {
        match self {
            AdminPolicy::Cluster(p) => engine.apply_cluster_network_policy(p),
            AdminPolicy::Admin(p) => engine.apply_admin_network_policy(p),
            AdminPolicy::Baseline(p) => engine.apply_baseline_admin_network_policy(p),
        }
    }

    /// The object this policy is.
    pub fn into_object(self) -> policy::objects::Object {
        use policy::objects::Object;
        match self {
            AdminPolicy::Cluster(p) => Object::ClusterNetworkPolicy(p),
            AdminPolicy::Admin(p) => Object::AdminNetworkPolicy(p),
            AdminPolicy::Baseline(p) => Object::BaselineAdminNetworkPolicy(p),
        }
    }

    /// The admin policy an object of the policy files is, if it is one (else the object back).
    pub fn from_object(
        object: policy::objects::Object,
    ) -> Result<Self, Box<policy::objects::Object>> {
        use policy::objects::Object;
        match object {
            Object::ClusterNetworkPolicy(p) => Ok(AdminPolicy::Cluster(p)),
            Object::AdminNetworkPolicy(p) => Ok(AdminPolicy::Admin(p)),
            Object::BaselineAdminNetworkPolicy(p) => Ok(AdminPolicy::Baseline(p)),
            other => Err(Box::new(other)),
        }
    }
}

/// The sending half a runtime gets.
pub type Sender = tokio::sync::mpsc::Sender<Event>;

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn require_encryption_values() {
        assert_eq!(requires_encryption(None), (false, None));
        assert_eq!(requires_encryption(Some("true")), (true, None));
        assert_eq!(requires_encryption(Some(" TRUE ")), (true, None));
        assert_eq!(requires_encryption(Some("false")), (false, None));
        // A typo requires encryption, and says so.
        let (on, note) = requires_encryption(Some("yes"));
        assert!(on);
        assert!(
            note.is_some_and(|n| n.contains(REQUIRE_ENCRYPTION) && n.contains("\"yes\"")),
            "names the annotation and the value"
        );
    }
}
