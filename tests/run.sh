#!/usr/bin/env bash
# README's test command: everything the project tests, from a fresh Debian machine, as root.
#
#   sudo ./tests/run.sh
#
# 1. Installs what it needs (Debian packages; Rust >= 1.90 with rustup when none is found).
# 2. Checks its prerequisites and stops with a clear message when one is missing: root, the
#    iptables binaries, unshare, NFQUEUE (the kernel must accept an NFQUEUE rule).
# 3. fmt, offline validation of the deployment files, builds every test.
# 4. Runs every test -- unit, property, conformance, the real-kernel datapath tests (network
#    namespaces, iptables, NFQUEUE) and the Docker tests (each starts its own private dockerd) --
#    and then the three-tier demo (README's first command), both inside a FRESH network namespace
#    (`unshare --net`, loopback up): empty iptables/ip6tables/nft rulesets and no interface but
#    lo, whatever this machine's own network holds. Rules or routes left on a host by earlier
#    work can therefore never make a run pass that would fail on a pristine machine.
# 5. clippy.
# Exits non-zero on any failure, naming the step (and, for a script error, the line).
set -Eeuo pipefail
trap 'echo "${BASH_SOURCE[0]}: line $LINENO: \"$BASH_COMMAND\" failed (status $?)" >&2' ERR
cd "$(dirname "$0")/.."

log() { printf '\n== %s\n' "$*"; }
die() { printf '\ntests/run.sh: %s\n' "$*" >&2; exit 2; }

[ "$(id -u)" -eq 0 ] || die "needs root (network namespaces, iptables, NFQUEUE, private dockerd): sudo $0"
export PATH="$PATH:/usr/sbin:/sbin"

# --- packages -----------------------------------------------------------------------------------
# The Docker tests use Debian's 20.10 client (API 1.41), not a newer docker that may be on PATH.
# Graphviz and Chromium: the policy matrix pictures are read back by `dot` and screenshot in
# headless Chromium (enforcer/tests/cli_policy_picture.rs).
tests/need.sh ip=iproute2 ss=iproute2 iptables=iptables ip6tables=iptables \
  iptables-save=iptables iptables-restore=iptables conntrack=conntrack nsenter=util-linux \
  unshare=util-linux busybox=busybox-static sysctl=procps modprobe=kmod tcpdump=tcpdump \
  dockerd=docker.io /usr/bin/docker=docker.io dot=graphviz chromium=chromium ||
  die "missing packages (above)"
# Rust >= 1.90 (Debian's own cargo is too old for edition 2024).
cargo=$(tests/ensure-rust.sh) || die "no Rust toolchain >= 1.90 (tests/ensure-rust.sh, above)"
PATH="$(dirname "$cargo"):$PATH"
export PATH

# --- prerequisites ------------------------------------------------------------------------------
log "prerequisites"
# NFQUEUE, conntrack marks, statistic and length matches for the datapath tests. A module may be
# built in (no modprobe needed), so what counts is whether the kernel takes the rules below.
for m in nfnetlink_queue xt_NFQUEUE xt_connmark xt_mark xt_statistic xt_length xt_conntrack xt_u32 veth; do
  modprobe -q "$m" 2>/dev/null || true
done
# One probe in a throwaway network namespace: unshare works, lo comes up, and the kernel accepts
# the kinds of rule the agent installs (NFQUEUE, connmark) in both families.
probe='set -e
ip link set lo up
iptables -t mangle -A OUTPUT -p tcp -m connmark --mark 0x10000000/0x10000000 -j RETURN
iptables -t mangle -A OUTPUT -p tcp -j NFQUEUE --queue-num 1
iptables -t mangle -A INPUT -p udp -m u32 --u32 "0>>22&0x3C@8=0x7e555453" -j NFQUEUE --queue-num 1
ip6tables -t mangle -A OUTPUT -p tcp -j NFQUEUE --queue-num 1'
if ! out=$(unshare --net -- sh -c "$probe" 2>&1); then
  die "the kernel refused a rule the agent needs, in a fresh network namespace (unshare --net):
$out
  NFQUEUE needs nfnetlink_queue and xt_NFQUEUE, the connmark match xt_connmark, UDP control
  datagrams the u32 match xt_u32 (modprobe them, or use a kernel with CONFIG_NETFILTER_NETLINK_QUEUE,
  CONFIG_NETFILTER_XT_TARGET_NFQUEUE, CONFIG_NETFILTER_XT_MATCH_U32)"
fi
[ -e /proc/net/netfilter/nfnetlink_queue ] || die "nfnetlink_queue is not loaded (modprobe nfnetlink_queue)"
echo "root; $(iptables -V); unshare; NFQUEUE, connmark and u32 rules accepted in a fresh netns"

# Runs a command in a fresh network namespace with loopback up.
in_fresh_netns() {
  unshare --net -- sh -c 'ip link set lo up && exec "$@"' in_fresh_netns "$@"
}

# --- static checks and build ---------------------------------------------------------------------
log "cargo fmt --check"
cargo fmt --all -- --check || die "cargo fmt --check: run cargo fmt"

log "deployment files: offline validation (Kubernetes manifests, systemd unit)"
deployment/validate.sh || die "deployment/validate.sh failed (above)"

# Disk: a clean build of every test, the demo and clippy takes about 3 GB in target/ (line
# tables only, see [profile.dev] in Cargo.toml); incremental caches would double it and buy
# nothing on a one-shot run. Say so before the build rather than let the linker die half way
# with "No space left on device".
export CARGO_INCREMENTAL=${CARGO_INCREMENTAL:-0}
target_dir=${CARGO_TARGET_DIR:-target}
mkdir -p "$target_dir"
need_mb=4096
free_mb=$(df -Pm "$target_dir" | awk 'NR==2 {print $4}')
if [ -n "$free_mb" ] && [ "$free_mb" -lt "$need_mb" ]; then
  die "only ${free_mb} MB free on the disk of $target_dir; the build and the tests need about ${need_mb} MB (free some, or point CARGO_TARGET_DIR at a larger disk)"
fi
echo "disk: ${free_mb:-?} MB free on the disk of $target_dir (about ${need_mb} MB needed)"

log "building every test (the first build from scratch takes ~3 min on 2 cores)"
cargo test --workspace --all-targets --locked --no-run || die "the build failed"
cargo build --locked -p tessera -p tessera-three-tier || die "the demo's build failed"

# --- tests, in a fresh network namespace ---------------------------------------------------------
log "unit, property, conformance, real-kernel datapath and Docker tests, benchmarks compiled and run once (fresh netns)"
in_fresh_netns cargo test --workspace --all-targets --locked --offline || die "cargo test failed (above)"
in_fresh_netns cargo test --workspace --doc --locked --offline || die "the doc tests failed (above)"

log "the three-tier demo, README's first command (fresh netns)"
in_fresh_netns examples/three-tier/run.sh --debug --no-build || die "the three-tier demo failed (above)"
log "the three-tier demo with encryption between the nodes (--encrypt; fresh netns)"
in_fresh_netns examples/three-tier/run.sh --debug --no-build --encrypt ||
  die "the three-tier demo with --encrypt failed (above)"

log "clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings || die "clippy found warnings (above)"
log "all passed"
