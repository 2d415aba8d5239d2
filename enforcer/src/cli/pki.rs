//! `tessera pki init-ca|issue-node|show`. (Arrives with the identity issue.)

use std::process::ExitCode;

use clap::Subcommand;

#[derive(Subcommand)]
pub enum PkiCommand {}

pub fn run(cmd: PkiCommand) -> anyhow::Result<ExitCode> {
    match cmd {}
}
