//! `tessera flows`: a running agent's flow records (docs/flow-log.md), read from its `/flows`
//! endpoint, filtered there; `--follow` keeps the stream open, like `hubble observe`.

use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Read, Write};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Args;
use datapath::flowlog::{
    self, Endpoint, FlowRecord, FlowVerdict, IdentitySource, PolicyKind, PolicyRef,
};

use super::status::Output;
use crate::agent::flows::{FlowFilter, FlowQuery, Since, parse_label, parse_verdict};

/// Records shown without `--since` or `--last` (as `tail`).
const DEFAULT_LAST: usize = 20;

/// Longest line read from the agent; a longer one is an error, not an allocation.
const MAX_LINE: usize = 1 << 20;

#[derive(Debug, Args)]
pub struct FlowsArgs {
    /// The agent's metrics address (its --metrics-addr).
    #[arg(long, env = "TESSERA_METRICS_ADDR", default_value = "127.0.0.1:9090")]
    pub addr: String,
    /// Keep following: print new records as the agent makes them.
    #[arg(long, short)]
    pub follow: bool,
    /// Records from this long ago (`30s`, `5m`, `1h30m`), or since an RFC 3339 time.
    #[arg(long, value_name = "DURATION|TIME", value_parser = parse_since)]
    pub since: Option<Since>,
    /// Only the last N matching records the agent holds [default: 20 without --since].
    #[arg(long, value_name = "N")]
    pub last: Option<usize>,
    /// Either end in this namespace (repeatable: any of them).
    #[arg(long, value_name = "NAMESPACE")]
    pub namespace: Vec<String>,
    /// Either end is this workload: `namespace/name`, or `name` in any namespace (repeatable).
    #[arg(long, value_name = "[NAMESPACE/]NAME")]
    pub pod: Vec<String>,
    /// Either end has this label (`key=value`, or `key`); repeatable: all of them.
    #[arg(long, value_name = "KEY[=VALUE]", value_parser = parse_label_arg)]
    pub label: Vec<(String, Option<String>)>,
    /// Only allowed or only denied flows.
    #[arg(long, value_name = "allowed|denied", value_parser = parse_verdict_arg)]
    pub verdict: Option<FlowVerdict>,
    /// Only this protocol: TCP, UDP, SCTP, ICMP, ICMPv6, or a protocol number.
    #[arg(long, value_name = "PROTOCOL", value_parser = parse_protocol_arg)]
    pub protocol: Option<policy::Protocol>,
    /// Either end's port.
    #[arg(long)]
    pub port: Option<u16>,
    /// Only the decisions that the staged policies (annotated `tessera.dev/staged: "true"`)
    /// would flip.
    #[arg(long)]
    pub staged: bool,
    /// Output format: text (one line per record) or json (the records as the agent wrote them,
    /// one per line).
    #[arg(long, short, value_enum, default_value_t = Output::Text)]
    pub output: Output,
}

fn parse_since(s: &str) -> Result<Since, String> {
    Since::parse(s).map_err(|e| format!("{e:#}"))
}

fn parse_label_arg(s: &str) -> Result<(String, Option<String>), String> {
    parse_label(s).map_err(|e| format!("{e:#}"))
}

fn parse_verdict_arg(s: &str) -> Result<FlowVerdict, String> {
    parse_verdict(s).map_err(|e| format!("{e:#}"))
}

fn parse_protocol_arg(s: &str) -> Result<policy::Protocol, String> {
    flowlog::parse_protocol(s)
        .ok_or_else(|| format!("{s:?}: TCP, UDP, SCTP, ICMP, ICMPv6 or a protocol number"))
}

impl FlowsArgs {
    /// What to ask the agent for.
    pub fn query(&self) -> FlowQuery {
        FlowQuery {
            filter: FlowFilter {
                namespaces: self.namespace.clone(),
                pods: self.pod.clone(),
                labels: self.label.clone(),
                verdict: self.verdict,
                protocol: self.protocol,
                port: self.port,
                staged: self.staged,
            },
            follow: self.follow,
            since: self.since,
            last: match (self.last, self.since) {
                (Some(n), _) => Some(n),
                (None, Some(_)) => None,
                (None, None) => Some(DEFAULT_LAST),
            },
        }
    }
}

pub fn run(args: FlowsArgs) -> Result<ExitCode> {
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    match stream(&args, &mut out) {
        Ok(()) => Ok(ExitCode::SUCCESS),
        // `tessera flows | head`: the reader went away; that is the end, not an error.
        Err(e)
            if e.downcast_ref::<std::io::Error>()
                .is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe) =>
        {
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => Err(e),
    }
}

/// Ask the agent and write what it sends to `out`, as `args.output` says.
pub fn stream(args: &FlowsArgs, out: &mut impl Write) -> Result<()> {
    let url = format!("http://{}/flows?{}", args.addr, args.query().to_query());
    let agent = ureq::Agent::config_builder()
        .timeout_connect(Some(Duration::from_secs(5)))
        .timeout_recv_response(Some(Duration::from_secs(10)))
        .http_status_as_error(false)
        .build()
        .new_agent();
    let mut response = agent.get(&url).call().with_context(|| {
        format!(
            "no agent answers at {url} (is `tessera run` running with --metrics-addr {}?)",
            args.addr
        )
    })?;
    if !response.status().is_success() {
        let status = response.status();
        let body = response
            .body_mut()
            .with_config()
            .limit(64 * 1024)
            .read_to_string()
            .unwrap_or_default();
        bail!("{url}: {status}: {}", body.trim());
    }
    let mut reader = BufReader::new(response.into_body().into_reader());
    let mut line = Vec::new();
    let mut unknown_version = false;
    loop {
        line.clear();
        let n = read_line(&mut reader, &mut line)?;
        if n == 0 {
            break;
        }
        let text = std::str::from_utf8(&line).context("the agent sent a line that is not UTF-8")?;
        let text = text.trim_end_matches(['\n', '\r']);
        if text.trim().is_empty() {
            // A keep-alive.
            continue;
        }
        match args.output {
            Output::Json => writeln!(out, "{text}")?,
            Output::Text => match serde_json::from_str::<FlowRecord>(text) {
                Ok(r) if r.v == flowlog::SCHEMA_VERSION => writeln!(out, "{}", render(&r))?,
                Ok(_) | Err(_) => {
                    if !unknown_version {
                        eprintln!(
                            "tessera flows: skipping records this version cannot read (try --output json)"
                        );
                        unknown_version = true;
                    }
                }
            },
        }
        out.flush()?;
    }
    if args.follow {
        bail!(
            "the agent ended the stream: it stopped, or this client fell more than {} records behind (tessera_flow_stream_followers_dropped_total)",
            crate::agent::flows::CLIENT_BUFFER
        );
    }
    Ok(())
}

/// One line (newline included) into `buf`, at most [`MAX_LINE`] bytes; 0 at the end.
fn read_line(reader: &mut impl BufRead, buf: &mut Vec<u8>) -> Result<usize> {
    let n = reader
        .take(MAX_LINE as u64 + 1)
        .read_until(b'\n', buf)
        .context("reading from the agent")?;
    if buf.len() > MAX_LINE {
        bail!("the agent sent a line longer than {MAX_LINE} bytes");
    }
    Ok(n)
}

/// The text form: `TIME NODE SRC [identity] -> DST [identity] PROTO PORT DIRECTION VERDICT
/// by POLICY (reason)`.
pub fn render(r: &FlowRecord) -> String {
    let mut s = String::new();
    let _ = write!(
        s,
        "{} {} {} -> {} {} {} {} {}",
        flowlog::rfc3339::format(r.time),
        r.node,
        endpoint(&r.source, r.policy.is_none()),
        endpoint(&r.destination, r.policy.is_none()),
        r.protocol,
        r.destination
            .port
            .map_or_else(|| "-".to_owned(), |p| p.to_string()),
        r.direction,
        match r.verdict {
            FlowVerdict::Allowed => "ALLOWED",
            FlowVerdict::Denied => "DENIED",
        }
    );
    if let Some(p) = &r.policy {
        let _ = write!(s, " by {}", policy(p));
    }
    if let Some(reason) = &r.reason {
        let _ = write!(s, " ({reason})");
    }
    if let Some(detail) = &r.detail {
        let _ = write!(s, ": {detail}");
    }
    if r.suppressed > 0 {
        let _ = write!(s, " [+{} suppressed]", r.suppressed);
    }
    if let Some(n) = r.sample_rate {
        let _ = write!(s, " [1 in {n}]");
    }
    if r.audit {
        s.push_str(" [audit: not applied]");
    }
    if let Some(staged) = &r.staged {
        let flips = if staged.verdict == r.verdict {
            "same"
        } else {
            "FLIPS"
        };
        let _ = write!(
            s,
            " [staged, {flips}: {} by {}]",
            match staged.verdict {
                FlowVerdict::Allowed => "ALLOWED",
                FlowVerdict::Denied => "DENIED",
            },
            policy(&staged.policy)
        );
    }
    s
}

/// `shop/web-1 [pki@node-a]`, `10.0.0.7 [ip]`; with `address` (a refused packet, whose
/// addresses are the point: a spoofed source, say) `shop/web-1 (10.0.1.2) [local]`.
fn endpoint(e: &Endpoint, address: bool) -> String {
    let who = match e.pod() {
        Some(pod) if address => format!("{pod} ({})", e.ip),
        Some(pod) => pod,
        None => e.ip.to_string(),
    };
    match (&e.node, e.identity) {
        (Some(node), IdentitySource::Pki | IdentitySource::Psk) => {
            format!("{who} [{}@{node}]", e.identity.as_str())
        }
        _ => format!("{who} [{}]", e.identity.as_str()),
    }
}

/// `NetworkPolicy shop/web rule 0`, `NetworkPolicy shop/db (isolated: no rule matches)`,
/// `ClusterNetworkPolicy deny-all (Admin tier, priority 10, rule 1: Deny)`, `default (not
/// isolated)`.
fn policy(p: &PolicyRef) -> String {
    match p.kind {
        PolicyKind::Default => format!("default ({})", p.name.replace('_', " ")),
        PolicyKind::NetworkPolicy if p.rule.is_none() => {
            let names = if p.isolated_by.is_empty() {
                format!("{}/{}", p.namespace.as_deref().unwrap_or_default(), p.name)
            } else {
                p.isolated_by.join(", ")
            };
            format!("NetworkPolicy {names} (isolated: no rule matches)")
        }
        PolicyKind::NetworkPolicy => format!(
            "NetworkPolicy {}/{} rule {}",
            p.namespace.as_deref().unwrap_or_default(),
            p.name,
            p.rule.unwrap_or_default()
        ),
        kind => {
            let mut s = format!("{} {} (", kind.as_str(), p.name);
            if let Some(t) = &p.tier {
                let _ = write!(s, "{t} tier, ");
            }
            if let Some(pr) = p.priority {
                let _ = write!(s, "priority {pr}, ");
            }
            let _ = write!(s, "rule {}", p.rule.unwrap_or_default());
            if let Some(a) = &p.action {
                let _ = write!(s, ": {a}");
            }
            if p.fail_closed {
                s.push_str(", fail-closed");
            }
            s.push(')');
            s
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::agent::flows::tests::record;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        flows: FlowsArgs,
    }

    fn args(a: &[&str]) -> FlowsArgs {
        let mut v = vec!["tessera"];
        v.extend_from_slice(a);
        Cli::try_parse_from(v).unwrap().flows
    }

    #[test]
    fn flags_become_the_endpoint_query() {
        let a = args(&[]);
        assert_eq!(a.query().to_query(), "last=20");
        let a = args(&[
            "--follow",
            "--since",
            "5m",
            "--namespace",
            "shop",
            "--pod",
            "shop/db-0",
            "--label",
            "app=web",
            "--verdict",
            "denied",
            "--protocol",
            "tcp",
            "--port",
            "5432",
        ]);
        let q = a.query();
        assert_eq!(
            q.to_query(),
            "follow=1&since=300000ms&namespace=shop&pod=shop/db-0&label=app%3Dweb&verdict=denied&protocol=TCP&port=5432"
        );
        assert_eq!(FlowQuery::parse(&q.to_query()).unwrap(), q);
        assert!(q.filter.matches(&record(1)));
        assert_eq!(args(&["-f", "--last", "5"]).query().last, Some(5));
        let mut cmd = <Cli as clap::CommandFactory>::command();
        for bad in [
            &["--verdict", "maybe"][..],
            &["--since", "soon"],
            &["--protocol", "tcpx"],
            &["--label", "=x"],
            &["--port", "99999"],
        ] {
            let mut v = vec!["tessera"];
            v.extend_from_slice(bad);
            assert!(cmd.try_get_matches_from_mut(v).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn text_lines_say_who_what_and_why() {
        let mut r = record(1_780_000_000_123);
        assert_eq!(
            render(&r),
            "2026-05-28T20:26:40.123Z node-b shop/web-1 [pki@node-a] -> shop/db-0 [local] TCP 5432 ingress DENIED by NetworkPolicy shop/db (isolated: no rule matches) (policy_ingress)"
        );
        r.suppressed = 3;
        assert!(render(&r).ends_with("(policy_ingress) [+3 suppressed]"));
        // Allowed by a rule, sampled.
        r.verdict = FlowVerdict::Allowed;
        r.reason = None;
        r.suppressed = 0;
        r.sample_rate = Some(10);
        r.policy = Some(PolicyRef {
            rule: Some(0),
            isolated_by: vec![],
            ..r.policy.clone().unwrap()
        });
        assert!(
            render(&r).ends_with("ALLOWED by NetworkPolicy shop/db rule 0 [1 in 10]"),
            "{}",
            render(&r)
        );
        // An admin rule, egress ICMP to an address.
        r.direction = policy::Direction::Egress;
        r.protocol = policy::Protocol::ICMP;
        r.source.port = None;
        r.destination = Endpoint::address("192.0.2.9".parse().unwrap(), None, IdentitySource::Ip);
        r.verdict = FlowVerdict::Denied;
        r.sample_rate = None;
        r.reason = Some("policy_egress".into());
        r.policy = Some(PolicyRef {
            kind: PolicyKind::ClusterNetworkPolicy,
            namespace: None,
            name: "no-ping".into(),
            tier: Some("Admin".into()),
            priority: Some(10),
            rule: Some(1),
            action: Some("Deny".into()),
            fail_closed: false,
            isolated_by: vec![],
        });
        assert!(
            render(&r).contains(
                "-> 192.0.2.9 [ip] ICMP - egress DENIED by ClusterNetworkPolicy no-ping (Admin tier, priority 10, rule 1: Deny) (policy_egress)"
            ),
            "{}",
            render(&r)
        );
        // A refused token: no policy, the reason and its words.
        r.policy = None;
        r.source.identity = IdentitySource::None;
        r.source.node = None;
        r.reason = Some("bad_mac".into());
        r.detail = Some("handshake: MAC verification failed".into());
        assert!(
            render(&r).ends_with("DENIED (bad_mac): handshake: MAC verification failed"),
            "{}",
            render(&r)
        );
        // A refusal shows the packet's addresses beside the names.
        assert!(
            render(&r).contains(" shop/web-1 (10.0.1.2) [none] -> 192.0.2.9 [ip] "),
            "{}",
            render(&r)
        );
        r.source = r.destination.clone();
        r.destination.namespace = Some("shop".into());
        r.destination.workload = Some("web-1".into());
        r.destination.identity = IdentitySource::Local;
        assert!(
            render(&r).contains(" 192.0.2.9 [ip] -> shop/web-1 (192.0.2.9) [local] "),
            "{}",
            render(&r)
        );
        // The default.
        r.policy = Some(PolicyRef {
            kind: PolicyKind::Default,
            name: "not_isolated".into(),
            namespace: None,
            tier: None,
            priority: None,
            rule: None,
            action: None,
            fail_closed: false,
            isolated_by: vec![],
        });
        r.verdict = FlowVerdict::Allowed;
        r.reason = None;
        r.detail = None;
        assert!(render(&r).ends_with("ALLOWED by default (not isolated)"));
    }

    #[test]
    fn long_lines_are_refused_not_buffered() {
        let long = vec![b'x'; MAX_LINE + 10];
        let mut r = BufReader::new(&long[..]);
        let mut buf = Vec::new();
        assert!(read_line(&mut r, &mut buf).is_err());
        let mut r = BufReader::new(&b"a\nb"[..]);
        buf.clear();
        assert_eq!(read_line(&mut r, &mut buf).unwrap(), 2);
        buf.clear();
        assert_eq!(read_line(&mut r, &mut buf).unwrap(), 1);
        buf.clear();
        assert_eq!(read_line(&mut r, &mut buf).unwrap(), 0);
    }
}
