#!/usr/bin/env bash
# The local three-tier demo with real enforcement, from a fresh Debian machine, as root:
#
#   sudo ./examples/three-tier/run.sh           # release build
#   sudo ./examples/three-tier/run.sh --debug   # dev build (what tests/run.sh has built already)
#   sudo ./examples/three-tier/run.sh --no-build  # the binaries already in target/ (or $CARGO_TARGET_DIR) as they are
#   sudo ./examples/three-tier/run.sh --hold    # keep it all up after the report, until Ctrl-C
#   sudo ./examples/three-tier/run.sh --encrypt # the agents with --encrypt (WireGuard between the
#                                               # nodes), proven by a capture on the nodes' link
#
# Installs what it needs (apt), builds `tessera` and the demo driver, then the driver builds two
# simulated nodes (network namespaces): node-n1 with real Docker containers of a PRIVATE dockerd
# (own roots and socket, no bridge, no iptables: the host's Docker and networking are untouched),
# node-n2 with plain network namespaces, one agent each. It prints the expected connectivity
# (`tessera policy matrix` over policies/) beside the observed one (real TCP connections), the
# handshake counters and `tessera status`, and removes everything it made on the way out, also
# when interrupted (Ctrl-C) or killed. Exit status: 0 all cells match; 1 a mismatch; 2 the demo
# could not run; 4 something was left behind; 130 interrupted. See README.md beside this file.
set -Eeuo pipefail
trap 'echo "${BASH_SOURCE[0]}: line $LINENO: \"$BASH_COMMAND\" failed (status $?)" >&2' ERR
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)

profile=release
no_build=0
hold=()
encrypt=()
for arg in "$@"; do
  case "$arg" in
    --debug) profile=debug ;;
    --no-build) no_build=1 ;;
    --hold) hold=(--hold) ;;
    --encrypt) encrypt=(--encrypt) ;;
    -h | --help) sed -n '2,18p' "$0"; exit 0 ;;
    *) echo "run.sh: unknown argument '$arg' (expected --debug, --no-build, --hold, --encrypt)" >&2; exit 2 ;;
  esac
done

log() { printf '== %s\n' "$*"; }
die() { printf 'run.sh: %s\n' "$*" >&2; exit 2; }

[ "$(id -u)" -eq 0 ] || die "needs root (network namespaces, iptables, a private dockerd): sudo $0"
export PATH="$PATH:/usr/sbin:/sbin"

# --- packages -------------------------------------------------------------------------------
# The fixture uses Debian's 20.10 client (API 1.41), not a newer docker that may be on PATH.
"$root/tests/need.sh" ip=iproute2 ss=iproute2 iptables=iptables iptables-save=iptables \
  ip6tables-save=iptables iptables-restore=iptables conntrack=conntrack nsenter=util-linux \
  dockerd=docker.io containerd=containerd /usr/bin/docker=docker.io tar=tar modprobe=kmod \
  tcpdump=tcpdump ||
  die "missing packages (above)"
# The containers' image is /bin/busybox copied into an empty rootfs: it must be the static one.
if ! [ -x /bin/busybox ] || ldd /bin/busybox >/dev/null 2>&1; then
  log "installing busybox-static (/bin/busybox is missing or dynamically linked)"
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq busybox-static >/dev/null; } ||
    die "apt-get install busybox-static failed"
fi
for m in nfnetlink_queue xt_NFQUEUE xt_connmark xt_mark xt_conntrack xt_u32 veth; do
  modprobe -q "$m" 2>/dev/null || true
done

# --- build ----------------------------------------------------------------------------------
build() {
  # Rust >= 1.90 (edition 2024): tests/ensure-rust.sh finds one (or installs it with rustup).
  # Under sudo, build as the invoking user so target/ stays theirs.
  local cargo user_home=""
  cargo=$("$root/tests/ensure-rust.sh") || die "no Rust toolchain to build with"
  if [ -n "${SUDO_USER:-}" ] && [ "$SUDO_USER" != root ]; then
    user_home=$(getent passwd "$SUDO_USER" | cut -d: -f6)
  fi
  local cmd=("$cargo" build --locked -p tessera -p tessera-three-tier)
  [ "$profile" = release ] && cmd+=(--release)
  if [ "$profile" = release ]; then
    log "building tessera and the demo driver (release: ~7.5 min on 2 cores the first time, seconds after)"
  else
    log "building tessera and the demo driver ($profile)"
  fi
  if [ -n "$user_home" ] && [ "$(stat -c %U "$root")" = "$SUDO_USER" ]; then
    (cd "$root" && runuser -u "$SUDO_USER" -- env "PATH=$(dirname "$cargo"):$PATH" "${cmd[@]}")
  else
    (cd "$root" && "${cmd[@]}")
  fi
}
[ "$no_build" -eq 1 ] || build || die "the build failed"
target=${CARGO_TARGET_DIR:-target}
[[ "$target" = /* ]] || target="$root/$target"
tessera="$target/$profile/tessera"
driver="$target/$profile/three-tier-demo"
for b in "$tessera" "$driver"; do [ -x "$b" ] || die "$b is missing: run without --no-build"; done

# --- host state before (to prove the demo leaves it as it was) ------------------------------
host_state() { "$here/host-state.sh"; }
before=$(mktemp /tmp/tessera-demo-host.XXXXXX)
host_state >"$before"

# --- run, always clean up -------------------------------------------------------------------
pid=""
signals=0
on_signal() {
  signals=$((signals + 1))
  if [ -z "$pid" ]; then exit 130; fi
  if [ "$signals" -ge 2 ]; then
    echo "run.sh: second interrupt: killing the driver; the sweep removes what it leaves" >&2
    kill -KILL "$pid" 2>/dev/null || true
  else
    echo "run.sh: interrupted: the driver is tearing down (press Ctrl-C again to kill it)" >&2
    kill -TERM "$pid" 2>/dev/null || true
  fi
}
finish() {
  local rc=$?
  trap - EXIT INT TERM HUP
  if [ -n "$pid" ]; then
    if kill -0 "$pid" 2>/dev/null; then
      kill -KILL "$pid" 2>/dev/null || true
      wait "$pid" 2>/dev/null || true
    fi
    # Namespaces, the private dockerd with its containers and mounts, agents and scratch
    # directories of this run: nothing, unless the driver was killed before its teardown.
    swept=0
    "$driver" sweep --pid "$pid" || swept=$?
    if [ "$swept" -eq 3 ] && [ "$signals" -eq 0 ] && [ "$rc" -le 128 ]; then
      echo "run.sh: LEFT BEHIND by the driver (removed now, see above): a teardown bug" >&2
      rc=4
    elif [ "$swept" -eq 3 ]; then
      echo "run.sh: the driver was killed before its teardown: the sweep removed what it left (above)" >&2
    elif [ "$swept" -ne 0 ] && [ "$swept" -ne 3 ]; then
      echo "run.sh: the sweep failed" >&2
      rc=4
    fi
  fi
  if [ -f "$before" ]; then
    after=$(mktemp /tmp/tessera-demo-host.XXXXXX)
    host_state >"$after"
    if ! diff -u "$before" "$after" >&2; then
      echo "run.sh: the host's iptables rules or namespaces changed during the demo (diff above)" >&2
      [ "$rc" -eq 0 ] && rc=4
    elif [ -n "$pid" ]; then
      echo "left behind: nothing (host iptables and namespaces as before; no dockerd, container, agent, mount or scratch directory of run $pid)"
    fi
    rm -f "$before" "$after"
  fi
  exit "$rc"
}
trap finish EXIT
trap on_signal INT TERM HUP

log "running the demo (driver: $driver)"
"$driver" run --tessera "$tessera" --policies "$here/policies" "${hold[@]}" "${encrypt[@]}" &
pid=$!
rc=""
while [ -z "$rc" ]; do
  st=0
  wait "$pid" || st=$?
  # A trapped signal interrupts `wait` (status > 128) while the driver still tears down.
  if [ "$st" -gt 128 ] && kill -0 "$pid" 2>/dev/null; then continue; fi
  rc=$st
done
exit "$rc"
