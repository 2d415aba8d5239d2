#!/usr/bin/env bash
# README's test command: everything the project tests, from a fresh Debian machine, as root.
# Installs what it needs, then runs the whole suite, including the real-kernel datapath tests
# (network namespaces, iptables, NFQUEUE: enforcer/tests/netns_*.rs, tests/netns/tests/) and the
# Docker tests (each starts its own private dockerd: the host's Docker and networking are left
# alone), which run when root and fail under CI=true when not root. Exits non-zero on any failure.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '\n== %s\n' "$*"; }

# command -> Debian package
declare -A pkg=(
  [ip]=iproute2
  [iptables]=iptables
  [ip6tables]=iptables
  [iptables-save]=iptables
  [conntrack]=conntrack
  [nsenter]=util-linux
  [busybox]=busybox-static
  [sysctl]=procps
  [tcpdump]=tcpdump
  [dockerd]=docker.io
)
need_apt=()
for cmd in "${!pkg[@]}"; do
  if ! command -v "$cmd" >/dev/null && ! [ -x "/usr/sbin/$cmd" ] && ! [ -x "/sbin/$cmd" ]; then
    need_apt+=("${pkg[$cmd]}")
  fi
done
if ((${#need_apt[@]})); then
  if [ "$(id -u)" -ne 0 ]; then
    echo "missing: ${need_apt[*]} (run as root to install them)" >&2
    exit 1
  fi
  mapfile -t need_apt < <(printf '%s\n' "${need_apt[@]}" | sort -u)
  log "installing ${need_apt[*]}"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}"
fi
export PATH="$PATH:/usr/sbin:/sbin"
# Rust >= 1.90 (Debian's own cargo is too old for edition 2024).
cargo=$(tests/ensure-rust.sh)
export PATH="$(dirname "$cargo"):$PATH"

if [ "$(id -u)" -eq 0 ]; then
  # NFQUEUE, conntrack marks, statistic and length matches for the datapath tests.
  for m in nfnetlink_queue xt_NFQUEUE xt_connmark xt_mark xt_statistic xt_length xt_conntrack veth; do
    modprobe -q "$m" 2>/dev/null || true
  done
else
  log "not root: the real-kernel datapath tests will SKIP (or fail under CI=true)"
fi

log "cargo fmt --check"
cargo fmt --all -- --check

log "deployment files: offline validation (Kubernetes manifests, systemd unit)"; deployment/validate.sh

log "unit, property, conformance, real-kernel datapath tests and benchmarks (compiled and run once)"
cargo test --workspace --all-targets --locked
cargo test --workspace --doc --locked
if [ "$(id -u)" -eq 0 ] || [ "${CI:-}" = true ]; then log "the three-tier demo (README's first command)"; examples/three-tier/run.sh --debug; else log "SKIP the three-tier demo: it needs root"; fi

log "clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
