//! Validation of the three admin policy kinds as their CRDs define it (field limits, one-of
//! fields, enums, CEL rules) and compilation into the one model, [`CompiledAdmin`].
//!
//! Peers the engine cannot decide fail closed, as the API requires of an implementation that
//! does not support a peer type: an Allow/Accept rule with such a peer matches no traffic; a
//! Deny or Pass rule with one becomes a deny-all rule (every peer, every port). Each such rule
//! leaves an [`AdminWarning`] naming the field. These are peers of an unknown type and
//! `domainNames` in a Deny or Pass rule (the API supports names only in Accept/Allow rules).

use ipnet::IpNet;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use smallvec::SmallVec;

use crate::PolicyError;
use crate::admin::{
    AdminNetworkPolicy, AdminNetworkPolicyPort, BaselineAdminNetworkPolicy, ClusterNetworkPolicy,
    ClusterNetworkPolicyProtocol, EgressPeer, IngressPeer, NamespacedPod, Subject,
};
use crate::compiled::{
    AdminPeer, AdminPeers, AdminPort, AdminRule, AdminSubject, CompiledAdmin, DomainPattern,
    PeerSelector,
};
use crate::model::{AdminAction, AdminKind, AdminPolicyKey, AdminWarning, Protocol, Tier};
use crate::selector::{Selector, is_dns1123_subdomain};
use crate::validate::{Ctx, compile_selector, parse_cidr, parse_protocol};

/// The limits and vocabulary of one kind.
struct Api {
    kind: AdminKind,
    /// Rules per direction, peers per rule, ports per rule.
    max_rules: usize,
    max_peers: usize,
    max_ports: usize,
    /// Accepted spellings of each action.
    actions: &'static [(&'static str, AdminAction)],
    /// `namespaceSelector` of `pods` is required (v1alpha1).
    namespace_selector_required: bool,
    /// Egress peers may have `domainNames`.
    domain_names: bool,
}

const CNP: Api = Api {
    kind: AdminKind::ClusterNetworkPolicy,
    max_rules: 25,
    max_peers: 25,
    max_ports: 25,
    actions: &[
        ("Accept", AdminAction::Allow),
        ("Deny", AdminAction::Deny),
        ("Pass", AdminAction::Pass),
    ],
    namespace_selector_required: false,
    domain_names: true,
};

const ANP: Api = Api {
    kind: AdminKind::AdminNetworkPolicy,
    max_rules: 100,
    max_peers: 100,
    max_ports: 100,
    actions: &[
        ("Allow", AdminAction::Allow),
        ("Deny", AdminAction::Deny),
        ("Pass", AdminAction::Pass),
    ],
    namespace_selector_required: true,
    domain_names: true,
};

const BANP: Api = Api {
    kind: AdminKind::BaselineAdminNetworkPolicy,
    max_rules: 100,
    max_peers: 100,
    max_ports: 100,
    actions: &[("Allow", AdminAction::Allow), ("Deny", AdminAction::Deny)],
    namespace_selector_required: true,
    domain_names: false,
};

const MAX_RULE_NAME: usize = 100;
const MAX_NETWORKS: usize = 25;
const MAX_CIDR_LEN: usize = 43;
const MAX_DOMAIN_NAMES: usize = 25;
const MAX_PRIORITY: i64 = 1000;

/// The object's name (cluster-scoped: no namespace) and the error builder.
fn cluster_name(kind: AdminKind, meta: &ObjectMeta) -> Result<(String, Ctx), PolicyError> {
    let kind_name = kind_str(kind);
    let Some(name) = meta.name.clone().filter(|n| !n.is_empty()) else {
        return Err(PolicyError {
            kind: kind_name,
            object: "<unnamed>".into(),
            field: "metadata.name".into(),
            message: "name is required".into(),
        });
    };
    let ctx = Ctx {
        kind: kind_name,
        object: name.clone(),
    };
    if !is_dns1123_subdomain(&name) {
        return Err(ctx.err(
            "metadata.name",
            format!("{name:?} is not a valid name (a lowercase DNS-1123 subdomain)"),
        ));
    }
    Ok((name, ctx))
}

fn kind_str(kind: AdminKind) -> &'static str {
    match kind {
        AdminKind::ClusterNetworkPolicy => "ClusterNetworkPolicy",
        AdminKind::AdminNetworkPolicy => "AdminNetworkPolicy",
        AdminKind::BaselineAdminNetworkPolicy => "BaselineAdminNetworkPolicy",
    }
}

fn priority(ctx: &Ctx, p: Option<i64>) -> Result<u16, PolicyError> {
    let p = p.ok_or_else(|| ctx.err("spec.priority", "required value"))?;
    if !(0..=MAX_PRIORITY).contains(&p) {
        return Err(ctx.err(
            "spec.priority",
            format!("{p} is out of range: must be between 0 and {MAX_PRIORITY}, inclusive"),
        ));
    }
    u16::try_from(p).map_err(|_| ctx.err("spec.priority", format!("{p} is out of range")))
}

fn port(ctx: &Ctx, field: &str, n: Option<i64>) -> Result<u16, PolicyError> {
    let n = n.ok_or_else(|| ctx.err(field, "required value"))?;
    u16::try_from(n).ok().filter(|p| *p != 0).ok_or_else(|| {
        ctx.err(
            field,
            format!("{n} is not a valid port: must be between 1 and 65535, inclusive"),
        )
    })
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

/// A list that must hold between 1 and `max` items when present.
fn check_len<T>(ctx: &Ctx, field: &str, items: &[T], max: usize) -> Result<(), PolicyError> {
    if items.is_empty() {
        return Err(ctx.err(field, "must have at least 1 item"));
    }
    if items.len() > max {
        return Err(ctx.err(
            field,
            format!("must have at most {max} items, found {}", items.len()),
        ));
    }
    Ok(())
}

/// Names of the fields set, for one-of errors.
fn one_of(ctx: &Ctx, field: &str, set: &[(&str, bool)]) -> Result<usize, PolicyError> {
    let names: Vec<&str> = set.iter().filter(|(_, on)| *on).map(|(n, _)| *n).collect();
    let all: Vec<&str> = set.iter().map(|(n, _)| *n).collect();
    match names.as_slice() {
        [_] => Ok(set.iter().position(|(_, on)| *on).unwrap_or(0)),
        [] => Err(ctx.err(
            field,
            format!("exactly one of {} must be set", all.join(", ")),
        )),
        _ => Err(ctx.err(
            field,
            format!(
                "exactly one of {} must be set, found {}",
                all.join(", "),
                names.join(" and ")
            ),
        )),
    }
}

fn namespaced_pod(
    ctx: &Ctx,
    api: &Api,
    path: &str,
    p: &NamespacedPod,
) -> Result<(Selector, Selector), PolicyError> {
    let namespaces = match &p.namespace_selector {
        Some(s) => compile_selector(ctx, &format!("{path}.namespaceSelector"), s)?,
        None if api.namespace_selector_required => {
            return Err(ctx.err(format!("{path}.namespaceSelector"), "required value"));
        }
        None => Selector::everything(),
    };
    let Some(pods) = &p.pod_selector else {
        return Err(ctx.err(format!("{path}.podSelector"), "required value"));
    };
    let pods = compile_selector(ctx, &format!("{path}.podSelector"), pods)?;
    Ok((namespaces, pods))
}

fn subject(ctx: &Ctx, api: &Api, s: Option<&Subject>) -> Result<AdminSubject, PolicyError> {
    let s = s.ok_or_else(|| ctx.err("spec.subject", "required value"))?;
    one_of(
        ctx,
        "spec.subject",
        &[
            ("namespaces", s.namespaces.is_some()),
            ("pods", s.pods.is_some()),
        ],
    )?;
    if let Some(ns) = &s.namespaces {
        return Ok(AdminSubject {
            namespaces: compile_selector(ctx, "spec.subject.namespaces", ns)?,
            pods: None,
        });
    }
    let pods = s
        .pods
        .as_ref()
        .map_or_else(NamespacedPod::default, Clone::clone);
    let (namespaces, pods) = namespaced_pod(ctx, api, "spec.subject.pods", &pods)?;
    Ok(AdminSubject {
        namespaces,
        pods: Some(pods),
    })
}

/// A peer compiled, or the reason it cannot be decided (the rule fails closed).
#[allow(
    clippy::large_enum_variant,
    reason = "short-lived, at compile time; the peer moves into its rule"
)]
enum PeerOutcome {
    Peer(AdminPeer),
    Unsupported(AdminWarning),
}

fn unknown_fields(
    ctx: &Ctx,
    path: &str,
    known_set: bool,
    unknown: &std::collections::BTreeMap<String, serde::de::IgnoredAny>,
) -> Result<Option<PeerOutcome>, PolicyError> {
    let names: Vec<&str> = unknown.keys().map(String::as_str).collect();
    match (known_set, names.is_empty()) {
        (true, true) => Ok(None),
        (true, false) => Err(ctx.err(
            format!("{path}.{}", names.join(",")),
            "unknown field (a peer has exactly one field)",
        )),
        (false, false) => Ok(Some(PeerOutcome::Unsupported(AdminWarning {
            field: format!("{path}.{}", names.join(",")),
            message: "a peer type this engine does not know (a newer API version?)".into(),
        }))),
        (false, true) => Ok(Some(PeerOutcome::Unsupported(AdminWarning {
            field: path.to_owned(),
            message: "a peer with no field set (a peer type of a newer API version, pruned?)"
                .into(),
        }))),
    }
}

fn ingress_peer(
    ctx: &Ctx,
    api: &Api,
    path: &str,
    p: &IngressPeer,
) -> Result<PeerOutcome, PolicyError> {
    let known = p.namespaces.is_some() || p.pods.is_some();
    if let Some(outcome) = unknown_fields(ctx, path, known, &p.unknown)? {
        return Ok(outcome);
    }
    one_of(
        ctx,
        path,
        &[
            ("namespaces", p.namespaces.is_some()),
            ("pods", p.pods.is_some()),
        ],
    )?;
    if let Some(ns) = &p.namespaces {
        return Ok(PeerOutcome::Peer(AdminPeer::Namespaces(PeerSelector::new(
            compile_selector(ctx, &format!("{path}.namespaces"), ns)?,
        ))));
    }
    let pods = p
        .pods
        .as_ref()
        .map_or_else(NamespacedPod::default, Clone::clone);
    let (namespaces, pods) = namespaced_pod(ctx, api, &format!("{path}.pods"), &pods)?;
    Ok(PeerOutcome::Peer(AdminPeer::Pods {
        namespaces: PeerSelector::new(namespaces),
        pods: PeerSelector::new(pods),
    }))
}

/// The API's pattern for `DomainName`, exactly as the CRDs (v1alpha1 and v1alpha2) have it:
/// `^(\*\.)?([a-zA-z0-9]([-a-zA-Z0-9_]*[a-zA-Z0-9])?\.)+[a-zA-z0-9]([-a-zA-Z0-9_]*[a-zA-Z0-9])?\.?$`.
/// Note `A-z` in a label's first character: the range from `A` to `z` also holds `[`, `\`,
/// `]`, `^`, `_` and `` ` ``, so the API server admits `_sip._tcp.example.com`; so does the
/// engine (a name the API server admits must not make the engine refuse the whole policy).
fn is_domain_name(s: &str) -> bool {
    let s = s.strip_prefix("*.").unwrap_or(s);
    let s = s.strip_suffix('.').unwrap_or(s);
    let mut labels = 0usize;
    let well_formed = s.split('.').all(|l| {
        labels += 1;
        let b = l.as_bytes();
        match (b.first(), b.last()) {
            (Some(first), Some(last)) => {
                (first.is_ascii_digit() || (b'A'..=b'z').contains(first))
                    && (b.len() == 1 || last.is_ascii_alphanumeric())
                    && b.iter()
                        .skip(1)
                        .all(|c| c.is_ascii_alphanumeric() || *c == b'-' || *c == b'_')
            }
            _ => false,
        }
    });
    well_formed && labels >= 2
}

fn egress_peer(
    ctx: &Ctx,
    api: &Api,
    (path, action): (&str, AdminAction),
    p: &EgressPeer,
) -> Result<PeerOutcome, PolicyError> {
    // BaselineAdminNetworkPolicy has no `domainNames`: to it, that is an unknown field.
    let mut unknown = p.unknown.clone();
    let domain_names = if api.domain_names {
        p.domain_names.as_ref()
    } else {
        if p.domain_names.is_some() {
            unknown.insert("domainNames".into(), serde::de::IgnoredAny);
        }
        None
    };
    let known = p.namespaces.is_some()
        || p.pods.is_some()
        || p.nodes.is_some()
        || p.networks.is_some()
        || domain_names.is_some();
    if let Some(outcome) = unknown_fields(ctx, path, known, &unknown)? {
        return Ok(outcome);
    }
    let mut fields = vec![
        ("namespaces", p.namespaces.is_some()),
        ("pods", p.pods.is_some()),
        ("nodes", p.nodes.is_some()),
        ("networks", p.networks.is_some()),
    ];
    if api.domain_names {
        fields.push(("domainNames", domain_names.is_some()));
    }
    one_of(ctx, path, &fields)?;
    if let Some(ns) = &p.namespaces {
        let sel = compile_selector(ctx, &format!("{path}.namespaces"), ns)?;
        return Ok(PeerOutcome::Peer(AdminPeer::Namespaces(PeerSelector::new(
            sel,
        ))));
    }
    if let Some(pods) = &p.pods {
        let (namespaces, pods) = namespaced_pod(ctx, api, &format!("{path}.pods"), pods)?;
        return Ok(PeerOutcome::Peer(AdminPeer::Pods {
            namespaces: PeerSelector::new(namespaces),
            pods: PeerSelector::new(pods),
        }));
    }
    if let Some(nodes) = &p.nodes {
        let sel = compile_selector(ctx, &format!("{path}.nodes"), nodes)?;
        return Ok(PeerOutcome::Peer(AdminPeer::Nodes(PeerSelector::new(sel))));
    }
    if let Some(networks) = &p.networks {
        let field = format!("{path}.networks");
        check_len(ctx, &field, networks, MAX_NETWORKS)?;
        let mut nets: Vec<IpNet> = Vec::with_capacity(networks.len());
        for (i, n) in networks.iter().enumerate() {
            let f = format!("{field}[{i}]");
            if n.len() > MAX_CIDR_LEN {
                return Err(ctx.err(f, format!("must be at most {MAX_CIDR_LEN} characters")));
            }
            let net = parse_cidr(n)
                .ok_or_else(|| ctx.err(&f, format!("{n:?}: Invalid CIDR format provided")))?;
            if nets.contains(&net) {
                return Err(ctx.err(f, format!("duplicate value {n:?}")));
            }
            nets.push(net);
        }
        return Ok(PeerOutcome::Peer(AdminPeer::Networks(nets)));
    }
    let names = domain_names.map_or(&[][..], Vec::as_slice);
    let field = format!("{path}.domainNames");
    check_len(ctx, &field, names, MAX_DOMAIN_NAMES)?;
    for (i, d) in names.iter().enumerate() {
        if !is_domain_name(d) {
            return Err(ctx.err(
                format!("{field}[{i}]"),
                format!("{d:?} is not a domain name (optionally prefixed by \"*.\")"),
            ));
        }
        // `listType=set`: the API server refuses a repeated item (as written).
        if names.iter().take(i).any(|earlier| earlier == d) {
            return Err(ctx.err(format!("{field}[{i}]"), format!("duplicate value {d:?}")));
        }
    }
    if action != AdminAction::Allow {
        // The API supports names only in Accept/Allow rules: a deny by name is unsafe (an
        // address of the name the workload did not resolve through DNS would get through).
        return Ok(PeerOutcome::Unsupported(AdminWarning {
            field,
            message: format!(
                "the API supports domainNames only in {} rules",
                api.kind.action_name(AdminAction::Allow)
            ),
        }));
    }
    Ok(PeerOutcome::Peer(AdminPeer::DomainNames(
        names.iter().map(|d| DomainPattern::parse(d)).collect(),
    )))
}

fn action(ctx: &Ctx, api: &Api, path: &str, a: Option<&str>) -> Result<AdminAction, PolicyError> {
    let field = format!("{path}.action");
    let a = a.ok_or_else(|| ctx.err(&field, "required value"))?;
    api.actions
        .iter()
        .find(|(name, _)| *name == a)
        .map(|(_, action)| *action)
        .ok_or_else(|| {
            let names: Vec<&str> = api.actions.iter().map(|(n, _)| *n).collect();
            ctx.err(
                field,
                format!(
                    "unsupported value {a:?}: must be one of {}",
                    names.join(", ")
                ),
            )
        })
}

/// The parts of a rule, whatever its kind and direction.
struct RuleParts {
    action: AdminAction,
    peers: Vec<PeerOutcome>,
    ports: Vec<AdminPort>,
}

/// Assembles a rule: fails closed when a peer cannot be decided.
fn assemble(path: &str, parts: RuleParts, warnings: &mut Vec<AdminWarning>) -> AdminRule {
    let mut decided = Vec::with_capacity(parts.peers.len());
    let mut unsupported = Vec::new();
    for p in parts.peers {
        match p {
            PeerOutcome::Peer(p) => decided.push(p),
            PeerOutcome::Unsupported(w) => unsupported.push(w),
        }
    }
    if unsupported.is_empty() {
        return AdminRule {
            action: parts.action,
            peers: AdminPeers::Any(decided.into()),
            ports: parts.ports.into(),
            fail_closed: false,
            cond: PeerSelector::NO_ID,
        };
    }
    let (rule, consequence) = match parts.action {
        AdminAction::Allow => (
            AdminRule {
                action: AdminAction::Allow,
                peers: AdminPeers::Nothing,
                ports: parts.ports.into(),
                fail_closed: true,
                cond: PeerSelector::NO_ID,
            },
            "the rule fails closed: it matches no traffic",
        ),
        AdminAction::Deny | AdminAction::Pass => (
            AdminRule {
                action: AdminAction::Deny,
                peers: AdminPeers::Everything,
                ports: SmallVec::new(),
                fail_closed: true,
                cond: PeerSelector::NO_ID,
            },
            "the rule fails closed: it denies all traffic (every peer, every port)",
        ),
    };
    for w in unsupported {
        warnings.push(AdminWarning {
            field: w.field,
            message: format!("{}; {consequence} ({path})", w.message),
        });
    }
    rule
}

fn rule_name(ctx: &Ctx, path: &str, name: Option<&str>) -> Result<(), PolicyError> {
    match name {
        Some(n) if n.chars().count() > MAX_RULE_NAME => Err(ctx.err(
            format!("{path}.name"),
            format!("must be at most {MAX_RULE_NAME} characters"),
        )),
        _ => Ok(()),
    }
}

fn v2_ports(
    ctx: &Ctx,
    path: &str,
    protocols: Option<&[ClusterNetworkPolicyProtocol]>,
) -> Result<(Vec<AdminPort>, bool), PolicyError> {
    let Some(protocols) = protocols else {
        return Ok((Vec::new(), false));
    };
    let field = format!("{path}.protocols");
    check_len(ctx, &field, protocols, CNP.max_ports)?;
    let mut out = Vec::with_capacity(protocols.len());
    let mut named = false;
    for (i, p) in protocols.iter().enumerate() {
        let at = format!("{field}[{i}]");
        let which = one_of(
            ctx,
            &at,
            &[
                ("tcp", p.tcp.is_some()),
                ("udp", p.udp.is_some()),
                ("sctp", p.sctp.is_some()),
                ("destinationNamedPort", p.destination_named_port.is_some()),
            ],
        )?;
        let (proto, name, holder) = match which {
            0 => (Protocol::Tcp, "tcp", p.tcp.as_ref()),
            1 => (Protocol::Udp, "udp", p.udp.as_ref()),
            2 => (Protocol::Sctp, "sctp", p.sctp.as_ref()),
            _ => {
                let n = p.destination_named_port.as_deref().unwrap_or("");
                if n.is_empty() {
                    return Err(ctx.err(format!("{at}.destinationNamedPort"), "must not be empty"));
                }
                named = true;
                out.push(AdminPort::Named(n.into()));
                continue;
            }
        };
        let dp_field = format!("{at}.{name}.destinationPort");
        let Some(dp) = holder.and_then(|h| h.destination_port.as_ref()) else {
            return Err(ctx.err(dp_field, "required value"));
        };
        one_of(
            ctx,
            &dp_field,
            &[
                ("number", dp.number.is_some()),
                ("range", dp.range.is_some()),
            ],
        )?;
        if let Some(n) = dp.number {
            let n = port(ctx, &format!("{dp_field}.number"), Some(n))?;
            out.push(AdminPort::Range(proto, n, n));
        } else if let Some(r) = &dp.range {
            let start = port(ctx, &format!("{dp_field}.range.start"), r.start)?;
            let end = port(ctx, &format!("{dp_field}.range.end"), r.end)?;
            if start >= end {
                return Err(ctx.err(
                    format!("{dp_field}.range"),
                    format!("Start port must be less than End port ({start} >= {end})"),
                ));
            }
            out.push(AdminPort::Range(proto, start, end));
        }
    }
    Ok((out, named))
}

fn v1_ports(
    ctx: &Ctx,
    path: &str,
    ports: Option<&[AdminNetworkPolicyPort]>,
) -> Result<(Vec<AdminPort>, bool), PolicyError> {
    let Some(ports) = ports else {
        return Ok((Vec::new(), false));
    };
    let field = format!("{path}.ports");
    check_len(ctx, &field, ports, ANP.max_ports)?;
    let mut out = Vec::with_capacity(ports.len());
    let mut named = false;
    for (i, p) in ports.iter().enumerate() {
        let at = format!("{field}[{i}]");
        one_of(
            ctx,
            &at,
            &[
                ("portNumber", p.port_number.is_some()),
                ("namedPort", p.named_port.is_some()),
                ("portRange", p.port_range.is_some()),
            ],
        )?;
        if let Some(n) = &p.port_number {
            let proto = protocol_or_tcp(
                ctx,
                &format!("{at}.portNumber.protocol"),
                n.protocol.as_deref(),
            )?;
            let n = port(ctx, &format!("{at}.portNumber.port"), n.port)?;
            out.push(AdminPort::Range(proto, n, n));
        } else if let Some(r) = &p.port_range {
            let proto = protocol_or_tcp(
                ctx,
                &format!("{at}.portRange.protocol"),
                r.protocol.as_deref(),
            )?;
            let start = port(ctx, &format!("{at}.portRange.start"), r.start)?;
            let end = port(ctx, &format!("{at}.portRange.end"), r.end)?;
            if start > end {
                return Err(ctx.err(
                    format!("{at}.portRange.end"),
                    format!("{end} must be greater than or equal to `start` ({start})"),
                ));
            }
            out.push(AdminPort::Range(proto, start, end));
        } else {
            let n = p.named_port.as_deref().unwrap_or("");
            if n.is_empty() {
                return Err(ctx.err(format!("{at}.namedPort"), "must not be empty"));
            }
            named = true;
            out.push(AdminPort::Named(n.into()));
        }
    }
    Ok((out, named))
}

/// Named ports with peers that have none (the API's CEL rule on egress rules).
fn check_named_with_ip_peers(
    ctx: &Ctx,
    api: &Api,
    path: &str,
    named: bool,
    to: &[EgressPeer],
) -> Result<(), PolicyError> {
    let ip_peer = to.iter().any(|p| {
        p.networks.is_some() || p.nodes.is_some() || (api.domain_names && p.domain_names.is_some())
    });
    if named && ip_peer {
        let what = if api.domain_names {
            "networks/nodes/domainNames"
        } else {
            "networks/nodes"
        };
        return Err(ctx.err(
            path,
            format!(
                "{what} peer cannot be set with namedPorts since there are no namedPorts for {what}"
            ),
        ));
    }
    Ok(())
}

fn ingress_rule(
    ctx: &Ctx,
    api: &Api,
    path: &str,
    (name, act, from): (Option<&str>, Option<&str>, Option<&[IngressPeer]>),
    ports: Vec<AdminPort>,
    warnings: &mut Vec<AdminWarning>,
) -> Result<AdminRule, PolicyError> {
    rule_name(ctx, path, name)?;
    let action = action(ctx, api, path, act)?;
    let field = format!("{path}.from");
    let from = from.ok_or_else(|| ctx.err(&field, "required value"))?;
    check_len(ctx, &field, from, api.max_peers)?;
    let peers = from
        .iter()
        .enumerate()
        .map(|(i, p)| ingress_peer(ctx, api, &format!("{field}[{i}]"), p))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(assemble(
        path,
        RuleParts {
            action,
            peers,
            ports,
        },
        warnings,
    ))
}

fn egress_rule(
    ctx: &Ctx,
    api: &Api,
    path: &str,
    (name, act, to): (Option<&str>, Option<&str>, Option<&[EgressPeer]>),
    ports: Vec<AdminPort>,
    named: bool,
    warnings: &mut Vec<AdminWarning>,
) -> Result<AdminRule, PolicyError> {
    rule_name(ctx, path, name)?;
    let action = action(ctx, api, path, act)?;
    let field = format!("{path}.to");
    let to = to.ok_or_else(|| ctx.err(&field, "required value"))?;
    check_len(ctx, &field, to, api.max_peers)?;
    let peers = to
        .iter()
        .enumerate()
        .map(|(i, p)| egress_peer(ctx, api, (&format!("{field}[{i}]"), action), p))
        .collect::<Result<Vec<_>, _>>()?;
    check_named_with_ip_peers(ctx, api, path, named, to)?;
    Ok(assemble(
        path,
        RuleParts {
            action,
            peers,
            ports,
        },
        warnings,
    ))
}

fn check_rule_count<T>(ctx: &Ctx, field: &str, rules: &[T], max: usize) -> Result<(), PolicyError> {
    if rules.len() > max {
        return Err(ctx.err(
            field,
            format!("must have at most {max} items, found {}", rules.len()),
        ));
    }
    Ok(())
}

/// Validates and compiles a `v1alpha2` ClusterNetworkPolicy.
pub(crate) fn compile_cluster_network_policy(
    p: &ClusterNetworkPolicy,
) -> Result<CompiledAdmin, PolicyError> {
    let api = &CNP;
    let (name, ctx) = cluster_name(api.kind, &p.metadata)?;
    let spec = p
        .spec
        .as_ref()
        .ok_or_else(|| ctx.err("spec", "required value"))?;
    let tier = match spec.tier.as_deref() {
        Some("Admin") => Tier::Admin,
        Some("Baseline") => Tier::Baseline,
        Some(other) => {
            return Err(ctx.err(
                "spec.tier",
                format!("unsupported value {other:?}: must be one of Admin, Baseline"),
            ));
        }
        None => return Err(ctx.err("spec.tier", "required value")),
    };
    let priority = priority(&ctx, spec.priority)?;
    let subject = subject(&ctx, api, spec.subject.as_ref())?;
    let mut warnings = Vec::new();
    let ingress_rules = spec.ingress.as_deref().unwrap_or(&[]);
    check_rule_count(&ctx, "spec.ingress", ingress_rules, api.max_rules)?;
    let mut ingress = Vec::with_capacity(ingress_rules.len());
    for (i, r) in ingress_rules.iter().enumerate() {
        let path = format!("spec.ingress[{i}]");
        let (ports, _) = v2_ports(&ctx, &path, r.protocols.as_deref())?;
        ingress.push(ingress_rule(
            &ctx,
            api,
            &path,
            (r.name.as_deref(), r.action.as_deref(), r.from.as_deref()),
            ports,
            &mut warnings,
        )?);
    }
    let egress_rules = spec.egress.as_deref().unwrap_or(&[]);
    check_rule_count(&ctx, "spec.egress", egress_rules, api.max_rules)?;
    let mut egress = Vec::with_capacity(egress_rules.len());
    for (i, r) in egress_rules.iter().enumerate() {
        let path = format!("spec.egress[{i}]");
        let (ports, named) = v2_ports(&ctx, &path, r.protocols.as_deref())?;
        egress.push(egress_rule(
            &ctx,
            api,
            &path,
            (r.name.as_deref(), r.action.as_deref(), r.to.as_deref()),
            ports,
            named,
            &mut warnings,
        )?);
    }
    Ok(CompiledAdmin {
        key: AdminPolicyKey {
            kind: api.kind,
            name,
        },
        tier,
        priority: Some(priority),
        subject,
        ingress: ingress.into(),
        egress: egress.into(),
        warnings,
    })
}

/// The v1alpha1 spec parts both kinds share.
struct V1Spec<'a> {
    subject: Option<&'a Subject>,
    ingress: &'a [crate::admin::AdminNetworkPolicyIngressRule],
    egress: &'a [crate::admin::AdminNetworkPolicyEgressRule],
}

/// Compiles the shared v1alpha1 parts into a policy of `api.kind` named `name`.
fn compile_v1(
    api: &Api,
    ctx: &Ctx,
    name: String,
    (tier, priority): (Tier, Option<u16>),
    spec: V1Spec<'_>,
) -> Result<CompiledAdmin, PolicyError> {
    let subject = subject(ctx, api, spec.subject)?;
    let mut warnings = Vec::new();
    check_rule_count(ctx, "spec.ingress", spec.ingress, api.max_rules)?;
    let mut ingress = Vec::with_capacity(spec.ingress.len());
    for (i, r) in spec.ingress.iter().enumerate() {
        let path = format!("spec.ingress[{i}]");
        let (ports, _) = v1_ports(ctx, &path, r.ports.as_deref())?;
        ingress.push(ingress_rule(
            ctx,
            api,
            &path,
            (r.name.as_deref(), r.action.as_deref(), r.from.as_deref()),
            ports,
            &mut warnings,
        )?);
    }
    check_rule_count(ctx, "spec.egress", spec.egress, api.max_rules)?;
    let mut egress = Vec::with_capacity(spec.egress.len());
    for (i, r) in spec.egress.iter().enumerate() {
        let path = format!("spec.egress[{i}]");
        let (ports, named) = v1_ports(ctx, &path, r.ports.as_deref())?;
        egress.push(egress_rule(
            ctx,
            api,
            &path,
            (r.name.as_deref(), r.action.as_deref(), r.to.as_deref()),
            ports,
            named,
            &mut warnings,
        )?);
    }
    Ok(CompiledAdmin {
        key: AdminPolicyKey {
            kind: api.kind,
            name,
        },
        tier,
        priority,
        subject,
        ingress: ingress.into(),
        egress: egress.into(),
        warnings,
    })
}

/// Validates and compiles a `v1alpha1` AdminNetworkPolicy (the Admin tier).
pub(crate) fn compile_admin_network_policy(
    p: &AdminNetworkPolicy,
) -> Result<CompiledAdmin, PolicyError> {
    let api = &ANP;
    let (name, ctx) = cluster_name(api.kind, &p.metadata)?;
    let spec = p
        .spec
        .as_ref()
        .ok_or_else(|| ctx.err("spec", "required value"))?;
    let priority = priority(&ctx, spec.priority)?;
    compile_v1(
        api,
        &ctx,
        name,
        (Tier::Admin, Some(priority)),
        V1Spec {
            subject: spec.subject.as_ref(),
            ingress: spec.ingress.as_deref().unwrap_or(&[]),
            egress: spec.egress.as_deref().unwrap_or(&[]),
        },
    )
}

/// Validates and compiles a `v1alpha1` BaselineAdminNetworkPolicy (the Baseline tier; the API
/// admits only one, named `default`).
pub(crate) fn compile_baseline_admin_network_policy(
    p: &BaselineAdminNetworkPolicy,
) -> Result<CompiledAdmin, PolicyError> {
    let api = &BANP;
    let (name, ctx) = cluster_name(api.kind, &p.metadata)?;
    if name != "default" {
        return Err(ctx.err(
            "metadata.name",
            "Only one baseline admin network policy with metadata.name=\"default\" can be created in the cluster",
        ));
    }
    let spec = p
        .spec
        .as_ref()
        .ok_or_else(|| ctx.err("spec", "required value"))?;
    compile_v1(
        api,
        &ctx,
        name,
        (Tier::Baseline, None),
        V1Spec {
            subject: spec.subject.as_ref(),
            ingress: spec.ingress.as_deref().unwrap_or(&[]),
            egress: spec.egress.as_deref().unwrap_or(&[]),
        },
    )
}

#[cfg(test)]
mod tests {
    use super::is_domain_name;

    /// The API's pattern, `A-z` in the first character of a label included.
    #[test]
    fn domain_names_follow_the_api_pattern() {
        for ok in [
            "example.com",
            "*.example.com",
            "example.com.",
            "*.a.b.example.com.",
            "Example.COM",
            "_sip._tcp.example.com",
            "x.y",
            "1.2",
            "a-b_c.example.com",
        ] {
            assert!(is_domain_name(ok), "{ok}");
        }
        for bad in [
            "",
            "com",
            "*.com",
            "*example.com",
            "**.example.com",
            "*.*.example.com",
            "example..com",
            ".example.com",
            "example.com..",
            "-a.example.com",
            "a-.example.com",
            "a_.example.com",
            "ex ample.com",
            "exämple.com",
            "example.*",
        ] {
            assert!(!is_domain_name(bad), "{bad}");
        }
    }
}
