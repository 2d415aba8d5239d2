//! `tessera run`: the node agent. Every flag can come from a `TESSERA_*` environment variable;
//! a flag on the command line wins over the environment.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use datapath::shell::busypoll::BusyPoll;

use anyhow::{Context, Result, bail};
use clap::{Args, ValueEnum};
use serde::Deserialize;

use crate::agent::{self, Options, RuntimeOptions, keys::KeySource};
use crate::runtime::docker::DockerConfig;
use crate::runtime::kubernetes::KubernetesConfig;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

/// Where workloads come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RuntimeKind {
    /// A static inventory file (`--inventory`), reloaded on change.
    Static,
    /// The containers of a Docker daemon (`--docker-host`), followed through its event stream.
    Docker,
    /// This node's pods, from the Kubernetes API (`--kubeconfig`, else in-cluster); policies
    /// from the API unless `--policies` is given; PKI peers from Node annotations.
    Kubernetes,
}

/// `tessera run`. Every setting comes, in this order of precedence, from the command line, the
/// environment (`TESSERA_*`), the config file (`--config`, keys in camelCase), or its default.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// YAML config file; its keys are the long flags in camelCase (`nodeName`, `pskFile`,
    /// `docker: {host, namespaceLabel, filters}`, ...). Flags and environment win over it.
    #[arg(long, env = "TESSERA_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Check the configuration (keys, inventory, policies) and exit without touching the kernel.
    #[arg(long, env = "TESSERA_CHECK")]
    pub check: bool,
    /// This node's name (PSK mode: the name in tokens; PKI mode: must match --node-cert).
    #[arg(long, env = "TESSERA_NODE_NAME", value_name = "NAME")]
    pub node_name: Option<String>,
    /// Where workloads come from [default: static with --inventory].
    #[arg(long, env = "TESSERA_RUNTIME", value_enum)]
    pub runtime: Option<RuntimeKind>,
    /// Static inventory of the workloads to enforce (YAML), reloaded when it changes. With
    /// `--runtime docker`: the node list only (`nodes:`, for admin `nodes` peers and
    /// `--encrypt`), the workloads being the daemon's.
    #[arg(long, env = "TESSERA_INVENTORY", value_name = "FILE")]
    pub inventory: Option<PathBuf>,
    /// Docker daemon to follow [default: unix:///var/run/docker.sock].
    #[arg(long, env = "TESSERA_DOCKER_HOST", value_name = "URL")]
    pub docker_host: Option<String>,
    /// Container label naming a container's namespace when it has no
    /// `io.kubernetes.pod.namespace` label [default: tessera.dev/namespace].
    #[arg(long, env = "TESSERA_DOCKER_NAMESPACE_LABEL", value_name = "LABEL")]
    pub docker_namespace_label: Option<String>,
    /// Enforce only containers with this label (`key` or `key=value`); repeatable
    /// (comma-separated in the environment) [default: every container].
    #[arg(
        long,
        env = "TESSERA_DOCKER_FILTER",
        value_name = "LABEL",
        value_delimiter = ','
    )]
    pub docker_filter: Vec<String>,
    /// Kubernetes runtime: kubeconfig file [default: KUBECONFIG, ~/.kube/config, else the pod's
    /// service account].
    #[arg(long, env = "TESSERA_KUBECONFIG", value_name = "FILE")]
    pub kubeconfig: Option<PathBuf>,
    /// Directory of NetworkPolicy YAML files, reloaded when a file changes.
    #[arg(long, env = "TESSERA_POLICIES", value_name = "DIR")]
    pub policies: Option<PathBuf>,
    /// Pre-shared key file (PSK mode); trailing whitespace is ignored.
    #[arg(long, env = "TESSERA_PSK_FILE", value_name = "FILE")]
    pub psk_file: Option<PathBuf>,
    /// CA certificate (PKI mode).
    #[arg(long, env = "TESSERA_CA_CERT", value_name = "FILE")]
    pub ca_cert: Option<PathBuf>,
    /// This node's certificate (PKI mode).
    #[arg(long, env = "TESSERA_NODE_CERT", value_name = "FILE")]
    pub node_cert: Option<PathBuf>,
    /// This node's private key (PKI mode).
    #[arg(long, env = "TESSERA_NODE_KEY", value_name = "FILE")]
    pub node_key: Option<PathBuf>,
    /// Directory of peer nodes' certificates, one PEM file (.crt/.pem) per node (PKI mode;
    /// optional with --runtime kubernetes, which learns peers from Node annotations).
    #[arg(long, env = "TESSERA_PEER_CERTS", value_name = "DIR")]
    pub peer_certs: Option<PathBuf>,
    /// Let traffic through while no agent reads the queue (default: fail closed).
    #[arg(long, env = "TESSERA_FAIL_OPEN")]
    pub fail_open: bool,
    /// NFQUEUE number used in every workload namespace [default: 7].
    #[arg(long, env = "TESSERA_QUEUE_NUM")]
    pub queue_num: Option<u16>,
    /// Kernel queue length per workload (packets awaiting a verdict) [default: 8192].
    #[arg(long, env = "TESSERA_QUEUE_MAX_LEN")]
    pub queue_max_len: Option<u32>,
    /// Mark bit of authorized flows (nfmark / connmark), hex or decimal: a single bit; the bit
    /// above it is used too (re-auth) [default: 0x10000000].
    #[arg(long, env = "TESSERA_AUTH_MARK", value_parser = parse_mark)]
    pub auth_mark: Option<u32>,
    /// NFQUEUE number for the DNS answers workloads receive (learnt for admin `domainNames`
    /// peers) in every workload namespace [default: --queue-num + 1].
    #[arg(long, env = "TESSERA_DNS_QUEUE_NUM")]
    pub dns_queue_num: Option<u16>,
    /// NFQUEUE number, in the node's own namespace, of the guard of workloads that require
    /// encryption (`tessera.dev/require-encryption`): their cross-node packets outside the
    /// tunnel are queued there to be dropped and recorded [default: 51871].
    #[arg(long, env = "TESSERA_GUARD_QUEUE_NUM")]
    pub guard_queue_num: Option<u16>,
    /// Do not learn names from DNS answers (one rule fewer per workload; admin `domainNames`
    /// peers then match nothing).
    #[arg(long, env = "TESSERA_NO_DNS_LEARNING")]
    pub no_dns_learning: bool,
    /// Send no bound SYNs: every TCP connection and UDP flow takes the three tokens (bound SYNs
    /// from other agents are still answered). For a cluster that still runs agents older than the bound
    /// handshake, which drop bound SYNs (docs/wire-format.md, "Bound handshake").
    #[arg(long, env = "TESSERA_NO_BOUND_HANDSHAKE")]
    pub no_bound_handshake: bool,
    /// Learn names only from answers sent from these addresses (CIDRs, comma-separated or
    /// repeated): the cluster's DNS Service and node-local caches. Without it, answers from any
    /// server the workload may query are learnt.
    #[arg(
        long,
        env = "TESSERA_DNS_SERVERS",
        value_delimiter = ',',
        value_name = "CIDR"
    )]
    pub dns_servers: Vec<ipnet::IpNet>,
    /// Address for /metrics, /healthz, /readyz and /status; "off" disables it; with port 0 the
    /// kernel picks a free port, which the start-up log gives [default: 127.0.0.1:9090].
    #[arg(long, env = "TESSERA_METRICS_ADDR")]
    pub metrics_addr: Option<String>,
    /// Log format [default: text].
    #[arg(long, env = "TESSERA_LOG_FORMAT", value_enum)]
    pub log_format: Option<LogFormat>,
    /// Audit mode: decide and record every flow (the flow log marks policy denials `audit`),
    /// drop nothing that policy denies (authentication still applies).
    #[arg(long, env = "TESSERA_AUDIT")]
    pub audit: bool,
    /// Debug/benchmark only: same rules, but the queue reader accepts everything (no tokens,
    /// no policy).
    #[arg(long, env = "TESSERA_ACCEPT_ALL")]
    pub accept_all: bool,
    /// Write flow records (docs/flow-log.md) as JSON lines to this file (appended), or to
    /// stdout with `-`. The last 10,000 are served at /flows (`tessera flows`) either way.
    #[arg(long, env = "TESSERA_FLOW_LOG", value_name = "PATH")]
    pub flow_log: Option<String>,
    /// Record allowed flows too: one in N (1: every one; 0 or "off": none) [default: off].
    #[arg(long, env = "TESSERA_FLOW_LOG_ALLOWED", value_name = "N", value_parser = parse_sample)]
    pub flow_log_allowed: Option<u32>,
    /// Denied flows are always recorded, at most this many a second per deciding policy (or
    /// rejection reason), after a burst of twice as many; the next record says how many were
    /// suppressed. 0: no limit [default: 10].
    #[arg(long, env = "TESSERA_FLOW_LOG_DENY_RATE", value_name = "N")]
    pub flow_log_deny_rate: Option<u32>,
    /// Before the agent's thread sleeps, look at the queues for up to this many microseconds,
    /// yielding the CPU between looks, while packets are coming (one in the last
    /// millisecond): it saves the wake-ups that make each handshake packet slow on virtual
    /// machines. Spins that keep finding nothing back off. 0: off [default: 0].
    #[arg(long, env = "TESSERA_BUSY_POLL_US", value_name = "MICROSECONDS")]
    pub busy_poll_us: Option<u32>,
    /// Encrypt pod traffic between nodes: a WireGuard tunnel to every known node (static
    /// inventory `nodes:` with `podCIDRs`, or Kubernetes Nodes) keyed by the node identities.
    /// If the tunnel cannot start, the agent does not run [default: off].
    #[arg(long, env = "TESSERA_ENCRYPT")]
    pub encrypt: bool,
    /// UDP port of the tunnel, the same on every node [default: 51871].
    #[arg(long, env = "TESSERA_TUNNEL_PORT", value_name = "PORT")]
    pub tunnel_port: Option<u16>,
    /// Name of the tunnel's TUN device [default: tsr-wg0].
    #[arg(long, env = "TESSERA_TUNNEL_DEVICE", value_name = "NAME")]
    pub tunnel_device: Option<String>,
    /// MTU of the tunnel's TUN device [default: 1420].
    #[arg(long, env = "TESSERA_TUNNEL_MTU", value_name = "BYTES")]
    pub tunnel_mtu: Option<u16>,
}

/// The config file: the same settings as the flags, in camelCase.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct FileConfig {
    node_name: Option<String>,
    runtime: Option<RuntimeKind>,
    inventory: Option<PathBuf>,
    docker: Option<DockerFileConfig>,
    kubernetes: Option<KubernetesFileConfig>,
    policies: Option<PathBuf>,
    psk_file: Option<PathBuf>,
    ca_cert: Option<PathBuf>,
    node_cert: Option<PathBuf>,
    node_key: Option<PathBuf>,
    peer_certs: Option<PathBuf>,
    fail_open: Option<bool>,
    audit: Option<bool>,
    queue_num: Option<u16>,
    queue_max_len: Option<u32>,
    auth_mark: Option<MarkValue>,
    dns_queue_num: Option<u16>,
    guard_queue_num: Option<u16>,
    dns_learning: Option<bool>,
    bound_handshake: Option<bool>,
    dns_servers: Option<Vec<ipnet::IpNet>>,
    metrics_addr: Option<String>,
    log_format: Option<LogFormat>,
    flow_log: Option<String>,
    flow_log_allowed: Option<SampleValue>,
    busy_poll_us: Option<u32>,
    flow_log_deny_rate: Option<u32>,
    encrypt: Option<bool>,
    tunnel_port: Option<u16>,
    tunnel_device: Option<String>,
    tunnel_mtu: Option<u16>,
}

/// `flowLogAllowed` in the config file: a number, or `off`.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum SampleValue {
    Number(u32),
    Text(String),
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct DockerFileConfig {
    host: Option<String>,
    namespace_label: Option<String>,
    #[serde(default)]
    filters: Vec<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct KubernetesFileConfig {
    kubeconfig: Option<PathBuf>,
}

/// A mark in the config file: a number, or a string in hex or decimal.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum MarkValue {
    Number(u32),
    Text(String),
}

/// Read a config file; errors name the file and the field.
pub fn load_config(path: &Path) -> Result<FileConfig> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading config file {}", path.display()))?;
    let de = serde_norway::Deserializer::from_str(&text);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let field = e.path().to_string();
        let inner = e.into_inner().to_string();
        // The YAML parser sometimes names the field itself; say it once.
        let message = inner.strip_prefix(&format!("{field}: ")).unwrap_or(&inner);
        if field == "." {
            anyhow::anyhow!("{}: {message}", path.display())
        } else {
            anyhow::anyhow!("{}: {field}: {message}", path.display())
        }
    })
}

/// `--flow-log-allowed`: `off` (0) or N, one in N.
fn parse_sample(s: &str) -> Result<u32, String> {
    match s {
        "off" | "none" => Ok(0),
        n => n
            .parse()
            .map_err(|e| format!("{n:?}: {e} (expected a number N, one in N, or off)")),
    }
}

fn parse_mark(s: &str) -> Result<u32, String> {
    let parsed = match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => u32::from_str_radix(hex, 16),
        None => s.parse(),
    };
    match parsed {
        Ok(0) => Err("the mark must not be 0".into()),
        Ok(v) if v.count_ones() != 1 => Err(format!(
            "{s:?}: the mark must be a single bit (Tessera also uses the bit above it to re-open a flow)"
        )),
        Ok(v) => Ok(v),
        Err(e) => Err(format!("{s:?}: {e}")),
    }
}

impl RunArgs {
    /// The agent's options: flags and environment over the config file over defaults, checked.
    pub fn options(&self) -> Result<Options> {
        let file = match &self.config {
            Some(path) => load_config(path)?,
            None => FileConfig::default(),
        };
        let origin = |key: &str| match &self.config {
            Some(p) => format!("{} ({key})", p.display()),
            None => key.to_owned(),
        };
        let pick = |flag: &Option<PathBuf>, file: &Option<PathBuf>| flag.clone().or(file.clone());
        let node_name = self
            .node_name
            .clone()
            .or(file.node_name.clone())
            .context("no node name: give --node-name (or nodeName in the config file)")?;
        let inventory = pick(&self.inventory, &file.inventory);
        let kind = match (self.runtime.or(file.runtime), &inventory) {
            (Some(k), _) => k,
            (None, Some(_)) => RuntimeKind::Static,
            (None, None) => bail!(
                "no runtime: give --runtime docker, or --inventory FILE for a static inventory"
            ),
        };
        let psk_file = pick(&self.psk_file, &file.psk_file);
        let pki = (
            pick(&self.ca_cert, &file.ca_cert),
            pick(&self.node_cert, &file.node_cert),
            pick(&self.node_key, &file.node_key),
            pick(&self.peer_certs, &file.peer_certs),
        );
        let keys = match (psk_file, pki) {
            (Some(psk), (None, None, None, None)) => KeySource::Psk(psk),
            (None, (Some(ca), Some(cert), Some(key), peers))
                if peers.is_some() || kind == RuntimeKind::Kubernetes =>
            {
                KeySource::Pki {
                    ca_cert: ca,
                    node_cert: cert,
                    node_key: key,
                    peer_certs: peers,
                }
            }
            (None, (None, None, None, None)) => bail!(
                "no identity: give --psk-file, or --ca-cert, --node-cert, --node-key and --peer-certs"
            ),
            (Some(_), _) => bail!(
                "--psk-file and the PKI settings (--ca-cert, --node-cert, --node-key, --peer-certs) exclude each other"
            ),
            _ => bail!("PKI mode needs all of --ca-cert, --node-cert, --node-key and --peer-certs"),
        };
        let docker_file = file.docker.unwrap_or_default();
        let runtime = match kind {
            RuntimeKind::Static => RuntimeOptions::Static {
                inventory: inventory.context("--runtime static needs --inventory FILE")?,
            },
            RuntimeKind::Docker => {
                let defaults = DockerConfig::default();
                let filters = if self.docker_filter.is_empty() {
                    docker_file.filters
                } else {
                    self.docker_filter.clone()
                };
                RuntimeOptions::Docker(DockerConfig {
                    host: self
                        .docker_host
                        .clone()
                        .or(docker_file.host)
                        .unwrap_or(defaults.host),
                    namespace_label: self
                        .docker_namespace_label
                        .clone()
                        .or(docker_file.namespace_label)
                        .unwrap_or(defaults.namespace_label),
                    filters,
                    nodes: inventory,
                })
            }
            RuntimeKind::Kubernetes if inventory.is_some() => bail!(
                "--inventory is for --runtime static (workloads and nodes) and --runtime docker (the node list); with --runtime kubernetes the nodes come from the API"
            ),
            RuntimeKind::Kubernetes => RuntimeOptions::Kubernetes(KubernetesConfig {
                node_name: node_name.clone(),
                kubeconfig: self
                    .kubeconfig
                    .clone()
                    .or(file.kubernetes.and_then(|k| k.kubeconfig)),
                // Filled in by the agent from the PKI node certificate.
                publish_certificate: None,
                policies_from_api: pick(&self.policies, &file.policies).is_none(),
                ..KubernetesConfig::default()
            }),
        };
        let metrics = self
            .metrics_addr
            .clone()
            .or(file.metrics_addr.clone())
            .unwrap_or_else(|| "127.0.0.1:9090".into());
        let metrics_addr = match metrics.as_str() {
            "off" | "" => None,
            addr => Some(
                addr.parse::<SocketAddr>()
                    .with_context(|| format!("{}: {addr:?}", origin("metricsAddr")))?,
            ),
        };
        let auth_mark = match (self.auth_mark, &file.auth_mark) {
            (Some(m), _) => m,
            (None, Some(MarkValue::Number(n))) => parse_mark(&n.to_string())
                .map_err(|e| anyhow::anyhow!("{}: {e}", origin("authMark")))?,
            (None, Some(MarkValue::Text(t))) => {
                parse_mark(t).map_err(|e| anyhow::anyhow!("{}: {e}", origin("authMark")))?
            }
            (None, None) => 0x1000_0000,
        };
        let queue_num = self.queue_num.or(file.queue_num).unwrap_or(7);
        let allowed_sample = match (self.flow_log_allowed, &file.flow_log_allowed) {
            (Some(n), _) => n,
            (None, Some(SampleValue::Number(n))) => *n,
            (None, Some(SampleValue::Text(t))) => {
                parse_sample(t).map_err(|e| anyhow::anyhow!("{}: {e}", origin("flowLogAllowed")))?
            }
            (None, None) => 0,
        };
        let flow_log = agent::FlowLogOptions {
            sink: self
                .flow_log
                .clone()
                .or(file.flow_log.clone())
                .filter(|s| !s.is_empty())
                .map(|s| agent::flows::FlowSink::parse(&s)),
            allowed_sample,
            deny_rate: self
                .flow_log_deny_rate
                .or(file.flow_log_deny_rate)
                .unwrap_or(agent::FlowLogOptions::default().deny_rate),
        };
        let encrypt = if self.encrypt || file.encrypt.unwrap_or(false) {
            let defaults = agent::tunnel::TunnelOptions::default();
            let t = agent::tunnel::TunnelOptions {
                port: self
                    .tunnel_port
                    .or(file.tunnel_port)
                    .unwrap_or(defaults.port),
                device: self
                    .tunnel_device
                    .clone()
                    .or(file.tunnel_device.clone())
                    .unwrap_or(defaults.device),
                mtu: self.tunnel_mtu.or(file.tunnel_mtu).unwrap_or(defaults.mtu),
            };
            let from_flag = |flag: &str| match flag {
                "port" => self.tunnel_port.is_some() || file.tunnel_port.is_none(),
                "device" => self.tunnel_device.is_some() || file.tunnel_device.is_none(),
                _ => self.tunnel_mtu.is_some() || file.tunnel_mtu.is_none(),
            };
            t.check_named(|flag| {
                if from_flag(flag) {
                    format!("--tunnel-{flag}")
                } else {
                    let mut key = flag.to_owned();
                    key[..1].make_ascii_uppercase();
                    origin(&format!("tunnel{key}"))
                }
            })?;
            Some(t)
        } else {
            None
        };
        let opts = Options {
            encrypt,
            node_name,
            runtime,
            policies: pick(&self.policies, &file.policies),
            keys,
            fail_open: self.fail_open || file.fail_open.unwrap_or(false),
            queue_num,
            queue_max_len: self.queue_max_len.or(file.queue_max_len).unwrap_or(8192),
            auth_mark,
            dns_queue_num: (!self.no_dns_learning && file.dns_learning != Some(false)).then(|| {
                self.dns_queue_num
                    .or(file.dns_queue_num)
                    .unwrap_or(queue_num.wrapping_add(1))
            }),
            guard_queue_num: self
                .guard_queue_num
                .or(file.guard_queue_num)
                .unwrap_or(datapath::shell::encrypted::DEFAULT_QUEUE),
            dns_servers: if self.dns_servers.is_empty() {
                file.dns_servers.clone().unwrap_or_default()
            } else {
                self.dns_servers.clone()
            },
            metrics_addr,
            accept_all: self.accept_all,
            audit: self.audit || file.audit.unwrap_or(false),
            bound_handshake: !self.no_bound_handshake && file.bound_handshake != Some(false),
            flow_log,
            busy_poll: match self.busy_poll_us.or(file.busy_poll_us).unwrap_or(0) {
                0 => None,
                us => Some(Arc::new(
                    BusyPoll::new(
                        Duration::from_micros(u64::from(us)),
                        Duration::from_millis(1),
                    )
                    .context("--busy-poll-us")?,
                )),
            },
        };
        agent::check(&opts)?;
        Ok(opts)
    }

    /// The log format: flag/env, else the config file's, else text.
    pub fn log_format(&self) -> LogFormat {
        if let Some(f) = self.log_format {
            return f;
        }
        self.config
            .as_deref()
            .and_then(|p| load_config(p).ok())
            .and_then(|c| c.log_format)
            .unwrap_or(LogFormat::Text)
    }
}

fn init_logging(format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("TESSERA_LOG")
        .or_else(|_| EnvFilter::try_from_env("RUST_LOG"))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

pub fn run(args: RunArgs) -> Result<ExitCode> {
    init_logging(args.log_format());
    let opts = args.options()?;
    if args.check {
        agent::check_only(&opts)?;
        println!("configuration OK");
        return Ok(ExitCode::SUCCESS);
    }
    let mut builder = tokio::runtime::Builder::new_current_thread();
    builder.enable_all();
    if let Some(bp) = opts.busy_poll.clone() {
        builder.on_thread_park(move || bp.spin());
    }
    let runtime = builder.build().context("starting the tokio runtime")?;
    runtime.block_on(agent::run(opts))?;
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        run: RunArgs,
    }

    fn parse(args: &[&str]) -> Result<RunArgs, clap::Error> {
        let mut v = vec!["tessera"];
        v.extend_from_slice(args);
        Cli::try_parse_from(v).map(|c| c.run)
    }

    const BASE: [&str; 6] = [
        "--node-name",
        "n1",
        "--inventory",
        "inv.yaml",
        "--psk-file",
        "psk",
    ];

    #[test]
    fn defaults_match_the_documented_surface() {
        let a = parse(&BASE).unwrap();
        let o = a.options().unwrap();
        assert_eq!(o.queue_num, 7);
        assert_eq!(o.auth_mark, 0x1000_0000);
        assert_eq!(o.metrics_addr, Some("127.0.0.1:9090".parse().unwrap()));
        assert!(!o.fail_open && !o.accept_all);
        assert!(matches!(o.keys, KeySource::Psk(_)));
        assert_eq!(o.flow_log, agent::FlowLogOptions::default());
        assert_eq!(
            (
                o.flow_log.sink,
                o.flow_log.allowed_sample,
                o.flow_log.deny_rate
            ),
            (None, 0, 10)
        );
    }

    #[test]
    fn flow_log_flags_and_config_keys() {
        let mut args = BASE.to_vec();
        args.extend([
            "--flow-log",
            "-",
            "--flow-log-allowed",
            "100",
            "--flow-log-deny-rate",
            "5",
        ]);
        let o = parse(&args).unwrap().options().unwrap();
        assert_eq!(o.flow_log.sink, Some(agent::flows::FlowSink::Stdout));
        assert_eq!((o.flow_log.allowed_sample, o.flow_log.deny_rate), (100, 5));
        let c = o.flow_log.config();
        assert_eq!((c.denied_per_second, c.denied_burst), (5, 10));
        let o = parse(&[&BASE[..], &["--flow-log-allowed", "off"]].concat())
            .unwrap()
            .options()
            .unwrap();
        assert_eq!(o.flow_log.allowed_sample, 0);
        assert!(parse(&[&BASE[..], &["--flow-log-allowed", "some"]].concat()).is_err());
        let f = config_file(
            "nodeName: n\npskFile: p\ninventory: i\nflowLog: /var/log/flows.jsonl\nflowLogAllowed: 'off'\nflowLogDenyRate: 0\n",
        );
        let o = parse(&["--config", f.path().to_str().unwrap()])
            .unwrap()
            .options()
            .unwrap();
        assert_eq!(
            o.flow_log.sink,
            Some(agent::flows::FlowSink::File("/var/log/flows.jsonl".into()))
        );
        assert_eq!((o.flow_log.allowed_sample, o.flow_log.deny_rate), (0, 0));
        let f = config_file("nodeName: n\npskFile: p\ninventory: i\nflowLogAllowed: sometimes\n");
        let e = format!(
            "{:#}",
            parse(&["--config", f.path().to_str().unwrap()])
                .unwrap()
                .options()
                .unwrap_err()
        );
        assert!(e.contains("flowLogAllowed"), "{e}");
    }

    #[test]
    fn flags_parse() {
        let mut args = BASE.to_vec();
        args.extend([
            "--auth-mark",
            "0x4",
            "--queue-num",
            "9",
            "--metrics-addr",
            "off",
            "--fail-open",
        ]);
        let o = parse(&args).unwrap().options().unwrap();
        assert_eq!(
            (o.auth_mark, o.queue_num, o.metrics_addr, o.fail_open),
            (4, 9, None, true)
        );
        assert!(parse(&[&BASE[..], &["--auth-mark", "0"]].concat()).is_err());
        assert!(parse(&[&BASE[..], &["--auth-mark", "0xzz"]].concat()).is_err());
        assert!(parse(&[&BASE[..], &["--auth-mark", "0x30"]].concat()).is_err());
    }

    #[test]
    fn every_flag_has_a_tessera_environment_variable() {
        let cmd = <Cli as clap::CommandFactory>::command();
        for arg in cmd.get_arguments().filter(|a| a.get_long().is_some()) {
            let env = arg.get_env().map(|e| e.to_string_lossy().into_owned());
            let expected = format!(
                "TESSERA_{}",
                arg.get_long().unwrap().replace('-', "_").to_uppercase()
            );
            assert_eq!(env.as_deref(), Some(expected.as_str()));
        }
    }

    /// The environment fills what the command line leaves out; a flag wins over it. Setting
    /// variables in-process would need `unsafe`, so the check runs in a child test process.
    #[test]
    fn environment_is_used_and_flags_win_over_it() {
        if std::env::var_os("TESSERA_RUN_ENV_CHILD").is_some() {
            let a = parse(&["--queue-num", "12"]).unwrap();
            assert_eq!(a.node_name.as_deref(), Some("from-env"));
            assert_eq!(a.queue_num, Some(12));
            assert_eq!(a.auth_mark, Some(0x20));
            return;
        }
        let status = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "cli::run::tests::environment_is_used_and_flags_win_over_it",
            ])
            .env("TESSERA_RUN_ENV_CHILD", "1")
            .env("TESSERA_NODE_NAME", "from-env")
            .env("TESSERA_INVENTORY", "inv.yaml")
            .env("TESSERA_QUEUE_NUM", "11")
            .env("TESSERA_AUTH_MARK", "0x20")
            .output()
            .unwrap();
        let out = String::from_utf8_lossy(&status.stdout);
        assert!(status.status.success(), "{out}");
        assert!(out.contains("1 passed"), "{out}");
    }

    #[test]
    fn identity_modes_are_exclusive_and_complete() {
        let e = parse(&["--node-name", "n", "--inventory", "i"])
            .unwrap()
            .options()
            .unwrap_err();
        assert!(e.to_string().contains("no identity"), "{e}");
        let e = parse(&["--node-name", "n", "--inventory", "i", "--ca-cert", "ca"])
            .unwrap()
            .options()
            .unwrap_err();
        assert!(e.to_string().contains("--peer-certs"), "{e}");
        let e = parse(&[&BASE[..], &["--ca-cert", "ca"]].concat())
            .unwrap()
            .options()
            .unwrap_err();
        assert!(e.to_string().contains("exclude each other"), "{e}");
    }

    fn config_file(text: &str) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        std::io::Write::write_all(&mut f, text.as_bytes()).unwrap();
        f
    }

    #[test]
    fn config_file_fills_in_and_flags_win() {
        let f = config_file(
            "nodeName: from-file\nruntime: docker\npskFile: /etc/tessera/psk\nqueueNum: 9\nauthMark: '0x4'\nmetricsAddr: off\ndocker: {host: 'unix:///run/d.sock', filters: [a=b]}\n",
        );
        let path = f.path().to_str().unwrap();
        let o = parse(&["--config", path]).unwrap().options().unwrap();
        assert_eq!(o.node_name, "from-file");
        assert_eq!((o.queue_num, o.auth_mark, o.metrics_addr), (9, 4, None));
        let RuntimeOptions::Docker(d) = &o.runtime else {
            panic!("{:?}", o.runtime)
        };
        assert_eq!(d.host, "unix:///run/d.sock");
        assert_eq!(d.filters, ["a=b"]);
        assert_eq!(d.namespace_label, DockerConfig::default().namespace_label);
        let o = parse(&[
            "--config",
            path,
            "--node-name",
            "flag",
            "--queue-num",
            "3",
            "--docker-host",
            "tcp://127.0.0.1:2375",
        ])
        .unwrap()
        .options()
        .unwrap();
        assert_eq!((o.node_name.as_str(), o.queue_num), ("flag", 3));
        let RuntimeOptions::Docker(d) = &o.runtime else {
            panic!("{:?}", o.runtime)
        };
        assert_eq!(d.host, "tcp://127.0.0.1:2375");
    }

    #[test]
    fn inventory_beside_docker_is_the_node_list_and_refused_beside_kubernetes() {
        let o = parse(&[&BASE[..], &["--runtime", "docker"]].concat())
            .unwrap()
            .options()
            .unwrap();
        let RuntimeOptions::Docker(d) = &o.runtime else {
            panic!("{:?}", o.runtime)
        };
        assert_eq!(d.nodes.as_deref(), Some(Path::new("inv.yaml")));
        let e = parse(&[&BASE[..], &["--runtime", "kubernetes"]].concat())
            .unwrap()
            .options()
            .unwrap_err();
        assert!(e.to_string().contains("--inventory"), "{e}");
    }

    #[test]
    fn config_file_errors_name_file_and_key() {
        let f = config_file("nodeName: n\npskFile: p\nqueueNumber: 3\n");
        let path = f.path().to_str().unwrap();
        let e = format!(
            "{:#}",
            parse(&["--config", path]).unwrap().options().unwrap_err()
        );
        assert!(e.starts_with(path) && e.contains("queueNumber"), "{e}");
        let f = config_file("nodeName: n\npskFile: p\ninventory: i\nauthMark: '0x30'\n");
        let path = f.path().to_str().unwrap();
        let e = format!(
            "{:#}",
            parse(&["--config", path]).unwrap().options().unwrap_err()
        );
        assert!(
            e.contains(path) && e.contains("authMark") && e.contains("single bit"),
            "{e}"
        );
        let f = config_file("nodeName: n\npskFile: p\nfailOpen: maybe\n");
        let path = f.path().to_str().unwrap();
        let e = format!(
            "{:#}",
            parse(&["--config", path]).unwrap().options().unwrap_err()
        );
        assert_eq!(e.matches("failOpen").count(), 1, "{e}");
        let f = config_file("nodeName: n\npskFile: p\ndocker: {host: x, sockett: y}\n");
        let path = f.path().to_str().unwrap();
        let e = format!(
            "{:#}",
            parse(&["--config", path]).unwrap().options().unwrap_err()
        );
        assert!(e.contains("docker") && e.contains("sockett"), "{e}");
    }

    #[test]
    fn a_runtime_is_required_and_static_needs_an_inventory() {
        let e = parse(&["--node-name", "n", "--psk-file", "p"])
            .unwrap()
            .options()
            .unwrap_err();
        assert!(e.to_string().contains("no runtime"), "{e}");
        let e = parse(&["--node-name", "n", "--psk-file", "p", "--runtime", "static"])
            .unwrap()
            .options()
            .unwrap_err();
        assert!(e.to_string().contains("--inventory"), "{e}");
    }

    #[test]
    fn kubernetes_runtime_takes_peers_from_the_api_and_policies_unless_a_directory_is_given() {
        let pki = [
            "--node-name",
            "n1",
            "--runtime",
            "kubernetes",
            "--ca-cert",
            "ca",
            "--node-cert",
            "c",
            "--node-key",
            "k",
        ];
        let o = parse(&pki).unwrap().options().unwrap();
        let RuntimeOptions::Kubernetes(k) = &o.runtime else {
            panic!("{:?}", o.runtime)
        };
        assert_eq!(k.node_name, "n1");
        assert!(k.policies_from_api && k.kubeconfig.is_none());
        assert!(matches!(
            o.keys,
            KeySource::Pki {
                peer_certs: None,
                ..
            }
        ));
        // Other runtimes still need --peer-certs in PKI mode.
        let mut docker = pki;
        docker[3] = "docker";
        let e = parse(&docker).unwrap().options().unwrap_err();
        assert!(e.to_string().contains("--peer-certs"), "{e}");
        // A policy directory wins over the API; the kubeconfig from the config file.
        let f = config_file("kubernetes: {kubeconfig: /etc/k.conf}\npolicies: /p\n");
        let mut args = pki.to_vec();
        args.extend(["--config", f.path().to_str().unwrap()]);
        let o = parse(&args).unwrap().options().unwrap();
        let RuntimeOptions::Kubernetes(k) = &o.runtime else {
            panic!("{:?}", o.runtime)
        };
        assert!(!k.policies_from_api);
        assert_eq!(k.kubeconfig.as_deref(), Some(Path::new("/etc/k.conf")));
        let f = config_file("kubernetes: {kubeconfg: x}\n");
        let mut args = pki.to_vec();
        args.extend(["--config", f.path().to_str().unwrap()]);
        let e = format!("{:#}", parse(&args).unwrap().options().unwrap_err());
        assert!(e.contains("kubernetes") && e.contains("kubeconfg"), "{e}");
    }

    #[test]
    fn encrypt_is_off_by_default_and_its_settings_come_from_flags_or_the_file() {
        let o = parse(&BASE).unwrap().options().unwrap();
        assert_eq!(o.encrypt, None);
        let mut args = BASE.to_vec();
        args.push("--encrypt");
        let o = parse(&args).unwrap().options().unwrap();
        assert_eq!(o.encrypt, Some(agent::tunnel::TunnelOptions::default()));
        let t = o.encrypt.unwrap();
        assert_eq!((t.port, t.device.as_str(), t.mtu), (51871, "tsr-wg0", 1420));
        args.extend(["--tunnel-port", "5000", "--tunnel-mtu", "1380"]);
        let t = parse(&args).unwrap().options().unwrap().encrypt.unwrap();
        assert_eq!((t.port, t.mtu), (5000, 1380));
        let e = format!(
            "{:#}",
            parse(&[&BASE[..], &["--encrypt", "--tunnel-port", "0"]].concat())
                .unwrap()
                .options()
                .unwrap_err()
        );
        assert!(e.starts_with("--tunnel-port: must not be 0"), "{e}");
        // Without --encrypt the tunnel settings are not used.
        let o = parse(&[&BASE[..], &["--tunnel-port", "0"]].concat())
            .unwrap()
            .options()
            .unwrap();
        assert_eq!(o.encrypt, None);
        let f = config_file(
            "nodeName: n\npskFile: p\ninventory: i\nencrypt: true\ntunnelDevice: wg-x\ntunnelMtu: 100\n",
        );
        let path = f.path().to_str().unwrap();
        let e = format!(
            "{:#}",
            parse(&["--config", path]).unwrap().options().unwrap_err()
        );
        assert!(
            e.starts_with(&format!("{path} (tunnelMtu): 100 is out of range")),
            "{e}"
        );
        let t = parse(&["--config", path, "--tunnel-mtu", "1400"])
            .unwrap()
            .options()
            .unwrap()
            .encrypt
            .unwrap();
        assert_eq!((t.device.as_str(), t.mtu), ("wg-x", 1400));
    }

    /// The documented surface (examples/static/README.md) names every flag.
    #[test]
    fn every_flag_is_documented() {
        let readme = std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/static/README.md"),
        )
        .unwrap();
        let cmd = <Cli as clap::CommandFactory>::command();
        for arg in cmd.get_arguments() {
            if let Some(long) = arg.get_long() {
                assert!(
                    readme.contains(&format!("`--{long}")),
                    "--{long} is missing from examples/static/README.md"
                );
            }
        }
    }
}
