#!/usr/bin/env bash
# README's test command: everything the project tests, from a fresh Debian machine, as root.
# Installs what it needs, then runs the whole suite. Exits non-zero on any failure.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '\n== %s\n' "$*"; }

need_apt=()
command -v cargo >/dev/null || need_apt+=(cargo)
if ((${#need_apt[@]})); then
  log "installing ${need_apt[*]}"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}"
fi

log "cargo fmt --check"
cargo fmt --all -- --check

log "unit, property, conformance tests and benchmarks (compiled and run once)"
cargo test --workspace --all-targets --locked
cargo test --workspace --doc --locked

log "clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
