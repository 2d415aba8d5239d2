#!/usr/bin/env bash
# Real-kernel benchmark, one command, one run (as root): connection rate, connect latency,
# per-packet decision time and throughput for (a) no rules, (b) the same rules with
# `tessera run --accept-all`, (c) full enforcement (PSK and PKI). Not part of the tests.
# Usage: sudo ./bench/run.sh [--duration SECONDS] [--bytes N] [--cases a,b,c-psk,c-pki]
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --locked -p tessera -p tessera-bench-netns
exec target/release/netns-connrate --tessera target/release/tessera \
  --policies examples/three-tier/policies "$@"
