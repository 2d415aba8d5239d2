//! `tessera policy matrix|explain`. (Arrives with the policy issue.)

use std::process::ExitCode;

use clap::Subcommand;

#[derive(Subcommand)]
pub enum PolicyCommand {}

pub fn run(cmd: PolicyCommand) -> anyhow::Result<ExitCode> {
    match cmd {}
}
