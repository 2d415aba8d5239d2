//! `tessera run`: the node agent. Every flag can come from a `TESSERA_*` environment variable;
//! a flag on the command line wins over the environment.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::{Args, ValueEnum};

use crate::agent::{self, Options, keys::KeySource};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// This node's name (PSK mode: the name in tokens; PKI mode: must match --node-cert).
    #[arg(long, env = "TESSERA_NODE_NAME", value_name = "NAME")]
    pub node_name: String,
    /// Static inventory of the workloads to enforce (YAML).
    #[arg(long, env = "TESSERA_INVENTORY", value_name = "FILE")]
    pub inventory: PathBuf,
    /// Directory of NetworkPolicy YAML files, reloaded when a file changes.
    #[arg(long, env = "TESSERA_POLICIES", value_name = "DIR")]
    pub policies: Option<PathBuf>,
    /// Pre-shared key file (PSK mode); trailing whitespace is ignored.
    #[arg(long, env = "TESSERA_PSK_FILE", value_name = "FILE",
          conflicts_with_all = ["ca_cert", "node_cert", "node_key", "peer_certs"])]
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
    /// Directory of peer nodes' certificates, one PEM file (.crt/.pem) per node (PKI mode).
    #[arg(long, env = "TESSERA_PEER_CERTS", value_name = "DIR")]
    pub peer_certs: Option<PathBuf>,
    /// Let traffic through while no agent reads the queue (default: fail closed).
    #[arg(long, env = "TESSERA_FAIL_OPEN")]
    pub fail_open: bool,
    /// NFQUEUE number used in every workload namespace.
    #[arg(long, env = "TESSERA_QUEUE_NUM", default_value_t = 7)]
    pub queue_num: u16,
    /// Kernel queue length per workload (packets awaiting a verdict).
    #[arg(long, env = "TESSERA_QUEUE_MAX_LEN", default_value_t = 8192)]
    pub queue_max_len: u32,
    /// Mark bit of authorized flows (nfmark / connmark), hex or decimal: a single bit; the bit
    /// above it is used too (re-auth).
    #[arg(long, env = "TESSERA_AUTH_MARK", default_value = "0x10000000", value_parser = parse_mark)]
    pub auth_mark: u32,
    /// Address for /metrics and /healthz; "off" disables the endpoint.
    #[arg(long, env = "TESSERA_METRICS_ADDR", default_value = "127.0.0.1:9090")]
    pub metrics_addr: String,
    /// Log format.
    #[arg(long, env = "TESSERA_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Debug/benchmark only: same rules, but the queue reader accepts everything (no tokens,
    /// no policy).
    #[arg(long, env = "TESSERA_ACCEPT_ALL")]
    pub accept_all: bool,
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
    /// The agent's options, checked.
    pub fn options(&self) -> Result<Options> {
        let keys = match (
            &self.psk_file,
            &self.ca_cert,
            &self.node_cert,
            &self.node_key,
            &self.peer_certs,
        ) {
            (Some(psk), None, None, None, None) => KeySource::Psk(psk.clone()),
            (None, Some(ca), Some(cert), Some(key), Some(peers)) => KeySource::Pki {
                ca_cert: ca.clone(),
                node_cert: cert.clone(),
                node_key: key.clone(),
                peer_certs: peers.clone(),
            },
            (None, None, None, None, None) => bail!(
                "no identity: give --psk-file, or --ca-cert, --node-cert, --node-key and --peer-certs"
            ),
            _ => bail!("PKI mode needs all of --ca-cert, --node-cert, --node-key and --peer-certs"),
        };
        let metrics_addr = match self.metrics_addr.as_str() {
            "off" | "" => None,
            addr => Some(
                addr.parse::<SocketAddr>()
                    .with_context(|| format!("--metrics-addr {addr:?}"))?,
            ),
        };
        let opts = Options {
            node_name: self.node_name.clone(),
            inventory: self.inventory.clone(),
            policies: self.policies.clone(),
            keys,
            fail_open: self.fail_open,
            queue_num: self.queue_num,
            queue_max_len: self.queue_max_len,
            auth_mark: self.auth_mark,
            metrics_addr,
            accept_all: self.accept_all,
        };
        agent::check(&opts)?;
        Ok(opts)
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
    init_logging(args.log_format);
    let opts = args.options()?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
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
            assert_eq!(a.node_name, "from-env");
            assert_eq!(a.queue_num, 12);
            assert_eq!(a.auth_mark, 0x20);
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
        assert!(parse(&[&BASE[..], &["--ca-cert", "ca"]].concat()).is_err());
    }
}
