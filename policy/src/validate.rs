//! Validation and defaulting, as the API server does it
//! (`pkg/apis/networking/validation` and the v1 defaults), and compilation of what passes.

use std::net::IpAddr;

use ipnet::IpNet;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::api::networking::v1::{NetworkPolicy, NetworkPolicyPeer, NetworkPolicyPort};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use crate::PolicyError;
use crate::compiled::{CompiledPolicy, NsScope, PeerMatcher, PortMatcher, Rule};
use crate::model::{ContainerPort, Labels, PodKey, PolicyKey, Protocol, Workload};
use crate::selector::{Selector, check_key, check_value, is_dns1123_subdomain};

/// The label the API server puts on every namespace.
pub(crate) const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";

/// The namespace objects without one get (what `kubectl apply` would use).
const DEFAULT_NAMESPACE: &str = "default";

/// Builds errors for one object.
pub(crate) struct Ctx {
    pub(crate) kind: &'static str,
    pub(crate) object: String,
}

impl Ctx {
    pub(crate) fn err(&self, field: impl Into<String>, message: impl Into<String>) -> PolicyError {
        PolicyError {
            kind: self.kind,
            object: self.object.clone(),
            field: field.into(),
            message: message.into(),
        }
    }
}

/// The namespace and name of a namespaced object, or an error for a missing name.
fn namespaced_name(kind: &'static str, meta: &ObjectMeta) -> Result<(String, String), PolicyError> {
    let namespace = meta
        .namespace
        .clone()
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| DEFAULT_NAMESPACE.to_string());
    let Some(name) = meta.name.clone().filter(|n| !n.is_empty()) else {
        return Err(PolicyError {
            kind,
            object: format!("{namespace}/<unnamed>"),
            field: "metadata.name".into(),
            message: "name is required".into(),
        });
    };
    if !is_dns1123_subdomain(&namespace) || namespace.contains('.') || namespace.len() > 63 {
        return Err(PolicyError {
            kind,
            object: format!("{namespace}/{name}"),
            field: "metadata.namespace".into(),
            message: format!("{namespace:?} is not a valid namespace name (a DNS-1123 label)"),
        });
    }
    if !is_dns1123_subdomain(&name) {
        return Err(PolicyError {
            kind,
            object: format!("{namespace}/{name}"),
            field: "metadata.name".into(),
            message: format!("{name:?} is not a valid name (a lowercase DNS-1123 subdomain)"),
        });
    }
    Ok((namespace, name))
}

pub(crate) fn check_labels(ctx: &Ctx, field: &str, labels: &Labels) -> Result<(), PolicyError> {
    for (k, v) in labels {
        check_key(k).map_err(|m| ctx.err(format!("{field}[{k}]"), m))?;
        check_value(v).map_err(|m| ctx.err(format!("{field}[{k}]"), m))?;
    }
    Ok(())
}

/// Parses a protocol name as the API accepts it (exact case).
pub(crate) fn parse_protocol(s: &str) -> Option<Protocol> {
    match s {
        "TCP" => Some(Protocol::Tcp),
        "UDP" => Some(Protocol::Udp),
        "SCTP" => Some(Protocol::Sctp),
        _ => None,
    }
}

fn protocol_or_tcp(ctx: &Ctx, field: &str, p: Option<&str>) -> Result<Protocol, PolicyError> {
    match p {
        None => Ok(Protocol::Tcp),
        Some(s) => parse_protocol(s).ok_or_else(|| {
            ctx.err(
                field,
                format!("unsupported protocol {s:?}: must be one of TCP, UDP, SCTP"),
            )
        }),
    }
}

/// `IANA_SVC_NAME`: 1-15 characters of lowercase alphanumerics and '-', at least one letter, no
/// '-' at either end and no "--".
pub(crate) fn check_port_name(name: &str) -> Result<(), String> {
    let b = name.as_bytes();
    let ok = !b.is_empty()
        && b.len() <= 15
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b.iter().any(|c| c.is_ascii_lowercase())
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
        && !name.contains("--");
    if ok {
        Ok(())
    } else {
        Err(format!(
            "invalid port name {name:?}: must be 1-15 lowercase alphanumerics or '-', contain a letter, and not start, end or repeat '-'"
        ))
    }
}

pub(crate) fn port_number(ctx: &Ctx, field: &str, n: i32) -> Result<u16, PolicyError> {
    u16::try_from(n).ok().filter(|p| *p != 0).ok_or_else(|| {
        ctx.err(
            field,
            format!("{n} is not a valid port: must be between 1 and 65535, inclusive"),
        )
    })
}

fn compile_port(
    ctx: &Ctx,
    path: &str,
    port: &NetworkPolicyPort,
) -> Result<PortMatcher, PolicyError> {
    let protocol = protocol_or_tcp(ctx, &format!("{path}.protocol"), port.protocol.as_deref())?;
    let end_field = format!("{path}.endPort");
    match &port.port {
        None => {
            if port.end_port.is_some() {
                return Err(ctx.err(
                    end_field,
                    "may not be specified when `port` is not specified",
                ));
            }
            Ok(PortMatcher::AnyPort(protocol))
        }
        Some(IntOrString::Int(n)) => {
            let lo = port_number(ctx, &format!("{path}.port"), *n)?;
            let hi = match port.end_port {
                None => lo,
                Some(e) => {
                    let hi = port_number(ctx, &end_field, e)?;
                    if hi < lo {
                        return Err(ctx.err(
                            end_field,
                            format!("{e} must be greater than or equal to `port` ({lo})"),
                        ));
                    }
                    hi
                }
            };
            Ok(PortMatcher::Range(protocol, lo, hi))
        }
        Some(IntOrString::String(name)) => {
            if port.end_port.is_some() {
                return Err(ctx.err(end_field, "may not be specified when `port` is non-numeric"));
            }
            check_port_name(name).map_err(|m| ctx.err(format!("{path}.port"), m))?;
            Ok(PortMatcher::Named(protocol, name.as_str().into()))
        }
    }
}

pub(crate) fn compile_selector(
    ctx: &Ctx,
    path: &str,
    sel: &LabelSelector,
) -> Result<Selector, PolicyError> {
    Selector::compile(sel).map_err(|e| ctx.err(format!("{path}.{}", e.field), e.message))
}

/// Parses a CIDR the way the API server does (a host address with a prefix is accepted) and
/// normalizes it to its network address.
pub(crate) fn parse_cidr(s: &str) -> Option<IpNet> {
    s.parse::<IpNet>().ok().map(|n| n.trunc())
}

fn compile_peer(
    ctx: &Ctx,
    path: &str,
    own_ns: &str,
    peer: &NetworkPolicyPeer,
) -> Result<PeerMatcher, PolicyError> {
    if let Some(block) = &peer.ip_block {
        if peer.pod_selector.is_some() || peer.namespace_selector.is_some() {
            return Err(ctx.err(path, "may not specify both ipBlock and another peer"));
        }
        let cidr_field = format!("{path}.ipBlock.cidr");
        if block.cidr.is_empty() {
            return Err(ctx.err(cidr_field, "required value"));
        }
        let cidr = parse_cidr(&block.cidr)
            .ok_or_else(|| ctx.err(&cidr_field, format!("{:?} is not a valid CIDR", block.cidr)))?;
        let mut except = Vec::new();
        for (i, e) in block.except.iter().flatten().enumerate() {
            let field = format!("{path}.ipBlock.except[{i}]");
            let net = parse_cidr(e)
                .ok_or_else(|| ctx.err(&field, format!("{e:?} is not a valid CIDR")))?;
            let same_family = matches!(
                (cidr, net),
                (IpNet::V4(_), IpNet::V4(_)) | (IpNet::V6(_), IpNet::V6(_))
            );
            if !same_family
                || !cidr.contains(&net.network())
                || net.prefix_len() <= cidr.prefix_len()
            {
                return Err(ctx.err(
                    field,
                    format!("{e:?} must be a strict subset of `cidr` ({})", block.cidr),
                ));
            }
            except.push(net);
        }
        return Ok(PeerMatcher::IpBlock { cidr, except });
    }
    let pods = match &peer.pod_selector {
        Some(s) => compile_selector(ctx, &format!("{path}.podSelector"), s)?,
        None => Selector::everything(),
    };
    let namespaces = match &peer.namespace_selector {
        Some(s) => NsScope::Matching(compile_selector(
            ctx,
            &format!("{path}.namespaceSelector"),
            s,
        )?),
        None if peer.pod_selector.is_some() => NsScope::Own(own_ns.into()),
        None => return Err(ctx.err(path, "must specify a peer")),
    };
    Ok(PeerMatcher::Pods { namespaces, pods })
}

fn compile_rule(
    ctx: &Ctx,
    path: &str,
    peers_name: &str,
    own_ns: &str,
    peers: Option<&[NetworkPolicyPeer]>,
    ports: Option<&[NetworkPolicyPort]>,
) -> Result<Rule, PolicyError> {
    let mut rule = Rule::default();
    for (i, p) in ports.unwrap_or(&[]).iter().enumerate() {
        rule.ports
            .push(compile_port(ctx, &format!("{path}.ports[{i}]"), p)?);
    }
    for (i, p) in peers.unwrap_or(&[]).iter().enumerate() {
        rule.peers.push(compile_peer(
            ctx,
            &format!("{path}.{peers_name}[{i}]"),
            own_ns,
            p,
        )?);
    }
    Ok(rule)
}

/// Validates a NetworkPolicy with the API server's defaulting and compiles it.
pub(crate) fn compile_policy(policy: &NetworkPolicy) -> Result<CompiledPolicy, PolicyError> {
    let (namespace, name) = namespaced_name("NetworkPolicy", &policy.metadata)?;
    let ctx = Ctx {
        kind: "NetworkPolicy",
        object: format!("{namespace}/{name}"),
    };
    let Some(spec) = &policy.spec else {
        return Err(ctx.err("spec", "required value"));
    };
    let pod_selector = match &spec.pod_selector {
        Some(s) => compile_selector(&ctx, "spec.podSelector", s)?,
        None => Selector::everything(),
    };

    // policyTypes: explicit values kept as given; empty or absent defaults to Ingress, plus
    // Egress iff there is at least one egress rule.
    let (mut want_ingress, mut want_egress) = (false, false);
    match spec.policy_types.as_deref() {
        Some(types) if !types.is_empty() => {
            if types.len() > 2 {
                return Err(ctx.err(
                    "spec.policyTypes",
                    "may not specify more than two policyTypes",
                ));
            }
            for (i, t) in types.iter().enumerate() {
                let slot = match t.as_str() {
                    "Ingress" => &mut want_ingress,
                    "Egress" => &mut want_egress,
                    other => {
                        return Err(ctx.err(
                            format!("spec.policyTypes[{i}]"),
                            format!("unsupported value {other:?}: must be Ingress or Egress"),
                        ));
                    }
                };
                if *slot {
                    return Err(ctx.err(
                        format!("spec.policyTypes[{i}]"),
                        format!("duplicate value {t:?}"),
                    ));
                }
                *slot = true;
            }
        }
        _ => {
            want_ingress = true;
            want_egress = spec.egress.as_ref().is_some_and(|e| !e.is_empty());
        }
    }

    // Every rule is validated, even those of a direction the policy does not apply to.
    let mut ingress = Vec::new();
    for (i, r) in spec.ingress.iter().flatten().enumerate() {
        ingress.push(compile_rule(
            &ctx,
            &format!("spec.ingress[{i}]"),
            "from",
            &namespace,
            r.from.as_deref(),
            r.ports.as_deref(),
        )?);
    }
    let mut egress = Vec::new();
    for (i, r) in spec.egress.iter().flatten().enumerate() {
        egress.push(compile_rule(
            &ctx,
            &format!("spec.egress[{i}]"),
            "to",
            &namespace,
            r.to.as_deref(),
            r.ports.as_deref(),
        )?);
    }
    Ok(CompiledPolicy {
        key: PolicyKey { namespace, name },
        pod_selector,
        ingress: want_ingress.then(|| ingress.into()),
        egress: want_egress.then(|| egress.into()),
    })
}

/// A namespace's name and labels, with `kubernetes.io/metadata.name` set as the API server does.
pub(crate) fn namespace_labels(ns: &Namespace) -> Result<(String, Labels), PolicyError> {
    let Some(name) = ns.metadata.name.clone().filter(|n| !n.is_empty()) else {
        return Err(PolicyError {
            kind: "Namespace",
            object: "<unnamed>".into(),
            field: "metadata.name".into(),
            message: "name is required".into(),
        });
    };
    let ctx = Ctx {
        kind: "Namespace",
        object: name.clone(),
    };
    if name.len() > 63 || !is_dns1123_subdomain(&name) || name.contains('.') {
        return Err(ctx.err(
            "metadata.name",
            format!("{name:?} is not a valid namespace name (a DNS-1123 label)"),
        ));
    }
    let mut labels = ns.metadata.labels.clone().unwrap_or_default();
    check_labels(&ctx, "metadata.labels", &labels)?;
    labels.insert(NAMESPACE_NAME_LABEL.to_string(), name.clone());
    Ok((name, labels))
}

/// A pod as a workload: labels, container ports, IPs from `status.podIPs` (or `status.podIP`).
pub(crate) fn workload_from_pod(pod: &Pod) -> Result<Workload, PolicyError> {
    let (namespace, name) = namespaced_name("Pod", &pod.metadata)?;
    let ctx = Ctx {
        kind: "Pod",
        object: format!("{namespace}/{name}"),
    };
    let labels = pod.metadata.labels.clone().unwrap_or_default();
    check_labels(&ctx, "metadata.labels", &labels)?;
    let mut ports = Vec::new();
    let mut host_network = false;
    if let Some(spec) = &pod.spec {
        host_network = spec.host_network.unwrap_or(false);
        for (ci, c) in spec.containers.iter().enumerate() {
            for (pi, p) in c.ports.iter().flatten().enumerate() {
                let path = format!("spec.containers[{ci}].ports[{pi}]");
                let port = port_number(&ctx, &format!("{path}.containerPort"), p.container_port)?;
                let protocol =
                    protocol_or_tcp(&ctx, &format!("{path}.protocol"), p.protocol.as_deref())?;
                if let Some(n) = &p.name {
                    check_port_name(n).map_err(|m| ctx.err(format!("{path}.name"), m))?;
                }
                ports.push(ContainerPort {
                    name: p.name.clone(),
                    port,
                    protocol,
                });
            }
        }
    }
    let mut ips = Vec::new();
    if let Some(status) = &pod.status {
        for (i, ip) in status.pod_ips.iter().flatten().enumerate() {
            let parsed: IpAddr = ip.ip.parse().map_err(|_| {
                ctx.err(
                    format!("status.podIPs[{i}].ip"),
                    format!("{:?} is not a valid IP address", ip.ip),
                )
            })?;
            if !ips.contains(&parsed) {
                ips.push(parsed);
            }
        }
        if ips.is_empty()
            && let Some(ip) = status.pod_ip.as_deref().filter(|s| !s.is_empty())
        {
            let parsed: IpAddr = ip.parse().map_err(|_| {
                ctx.err("status.podIP", format!("{ip:?} is not a valid IP address"))
            })?;
            ips.push(parsed);
        }
    }
    Ok(Workload {
        key: PodKey { namespace, name },
        labels,
        ports,
        ips,
        host_network,
    })
}

/// Checks a workload built by other means than a pod.
pub(crate) fn check_workload(w: &Workload) -> Result<(), PolicyError> {
    let ctx = Ctx {
        kind: "Workload",
        object: w.key.to_string(),
    };
    if w.key.namespace.is_empty() {
        return Err(ctx.err("namespace", "required value"));
    }
    if w.key.name.is_empty() {
        return Err(ctx.err("name", "required value"));
    }
    check_labels(&ctx, "labels", &w.labels)?;
    for (i, p) in w.ports.iter().enumerate() {
        if p.port == 0 {
            return Err(ctx.err(
                format!("ports[{i}].port"),
                "0 is not a valid port: must be between 1 and 65535, inclusive",
            ));
        }
        if let Some(n) = &p.name {
            check_port_name(n).map_err(|m| ctx.err(format!("ports[{i}].name"), m))?;
        }
    }
    Ok(())
}
