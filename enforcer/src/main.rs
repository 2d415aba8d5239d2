//! `tessera`: the node agent and its command line.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod agent;
mod cli;
mod runtime;

#[derive(Parser)]
#[command(
    name = "tessera",
    version,
    about = "Zero-trust NetworkPolicy enforcement for containers"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Offline what-if analysis of NetworkPolicies.
    #[command(subcommand)]
    Policy(cli::policy::PolicyCommand),
    /// Certificates and keys for PKI mode, without openssl.
    #[command(subcommand)]
    Pki(cli::pki::PkiCommand),
    /// Run the node agent: enforce the workloads of a runtime (static inventory, Docker).
    Run(Box<cli::run::RunArgs>),
    /// Show a running agent's workloads, peer nodes and counters.
    Status(cli::status::StatusArgs),
    /// Show a running agent's flow records: what it decided, about whom, by which policy.
    Flows(cli::flows::FlowsArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Policy(cmd) => cli::policy::run(cmd),
        Command::Pki(cmd) => cli::pki::run(cmd),
        Command::Run(args) => cli::run::run(*args),
        Command::Status(args) => cli::status::run(args),
        Command::Flows(args) => cli::flows::run(args),
    };
    match result {
        Ok(code) => code,
        Err(err) => {
            eprintln!("tessera: {err:#}");
            ExitCode::from(2)
        }
    }
}
