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
use std::path::PathBuf;
use std::time::SystemTime;

use k8s_openapi::api::networking::v1::NetworkPolicy;
use policy::{ContainerPort, PodKey, PolicyKey};

pub mod docker;
pub mod inventory;
pub mod kubernetes;

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
    },
    /// The complete set of NetworkPolicies from one source (the policy directory after a good
    /// reload, a Kubernetes relist). `origin` names the source in errors. An invalid policy is
    /// reported and refused; the rest applies.
    Policies {
        origin: String,
        policies: Vec<NetworkPolicy>,
    },
    /// One NetworkPolicy added or changed.
    PolicyUpsert(Box<NetworkPolicy>),
    /// One NetworkPolicy deleted.
    PolicyRemove(PolicyKey),
    /// A peer node's certificate (PEM) appeared or changed (PKI mode); `None` revokes it: its
    /// tokens are rejected from then on.
    PeerCertificate { node: String, pem: Option<String> },
}

/// The sending half a runtime gets.
pub type Sender = tokio::sync::mpsc::Sender<Event>;
