#!/usr/bin/env bash
# Real-kernel benchmark, one command, one run (as root): connection rate, connect latency,
# per-packet decision time and throughput for (a) no rules, (b) the same rules with
# `tessera run --accept-all`, (c) full enforcement (PSK and PKI), (k) an IP-based NFQUEUE
# enforcer of the bench's own, and (c) under a flood of spoofed SYNs. Not part of the tests.
# Usage: sudo ./bench/run.sh [--duration SECONDS] [--bytes N] [--cases a,b,c-psk,c-pki,k,flood]
# Builds into (and runs from) $CARGO_TARGET_DIR when set, target/ otherwise.
set -Eeuo pipefail
trap 'echo "${BASH_SOURCE[0]}: line $LINENO: \"$BASH_COMMAND\" failed (status $?)" >&2' ERR
cd "$(dirname "$0")/.."
[ "$(id -u)" -eq 0 ] || { echo "bench/run.sh: needs root (network namespaces, iptables, NFQUEUE): sudo $0" >&2; exit 2; }
tests/need.sh ip=iproute2 ss=iproute2 iptables=iptables ip6tables=iptables iptables-restore=iptables \
  conntrack=conntrack nsenter=util-linux sysctl=procps
cargo=$(tests/ensure-rust.sh)
"$cargo" build --release --locked -p tessera -p tessera-bench-netns
target="${CARGO_TARGET_DIR:-target}"
exec "$target/release/netns-connrate" --tessera "$target/release/tessera" \
  --policies examples/three-tier/policies "$@"
