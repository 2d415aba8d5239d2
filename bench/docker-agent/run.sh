#!/usr/bin/env bash
# Docker runtime at scale (a benchmark, not a test; as root): a private dockerd, the agent
# following it (`tessera run --runtime docker`), then N labelled busybox containers
# (--network none) started P at a time. Reports the agent's memory (VmRSS/VmHWM) with 0 and N
# containers, the time from each container's `start` event to its enforcement (p50/p99: exact
# from the agent's `since_start_ms` log fields, and as the histogram
# tessera_workload_enforce_seconds gives it), and how long the whole set took. Removes
# everything it created (containers, daemon, directories) on exit, even on failure.
# Usage: sudo ./bench/docker-agent/run.sh [--containers N] [--parallel P]
# Env: TESSERA=path/to/tessera skips the release build; RUST_LOG (default info) for the agent;
#      KEEP_LOG=FILE keeps a copy of the agent's log.
set -Eeuo pipefail
trap 'echo "${BASH_SOURCE[0]}: line $LINENO: \"$BASH_COMMAND\" failed (status $?)" >&2' ERR
cd "$(dirname "$0")/../.."

N=200
P=4
while (($#)); do
  case "$1" in
    --containers) N="$2"; shift 2 ;;
    --parallel) P="$2"; shift 2 ;;
    *) echo "usage: $0 [--containers N] [--parallel P]" >&2; exit 2 ;;
  esac
done
[ "$(id -u)" -eq 0 ] || { echo "run as root" >&2; exit 1; }
DOCKER=/usr/bin/docker # Debian's 20.10 client (apt package docker.io)
command -v dockerd >/dev/null || [ -x /usr/sbin/dockerd ] || { echo "dockerd missing: apt-get install docker.io" >&2; exit 1; }
[ -x /bin/busybox ] || { echo "/bin/busybox missing: apt-get install busybox-static" >&2; exit 1; }

if [ -z "${TESSERA:-}" ]; then
  cargo=$(tests/ensure-rust.sh)
  "$cargo" build --release --locked -p tessera
  TESSERA=target/release/tessera
fi
TESSERA=$(realpath "$TESSERA")
POLICIES=$(realpath examples/three-tier/policies)

# Named like the testbed's daemon directories (ts-<pid>-docker-<n>) so that the test
# fixture's sweep cleans up after a run that was killed.
DIR=/tmp/ts-$$-docker-0
SOCK=$DIR/docker.sock
HOST=unix://$SOCK
DOCKERD_PID=
AGENT_PID=

d() { "$DOCKER" -H "$HOST" "$@"; }

cleanup() {
  # Best effort: whatever is already gone is fine (no ERR report for it).
  trap - ERR
  set +e
  [ -n "$AGENT_PID" ] && kill "$AGENT_PID" 2>/dev/null && wait "$AGENT_PID" 2>/dev/null
  if [ -n "$DOCKERD_PID" ]; then
    ids=$(d ps -aq 2>/dev/null)
    [ -n "$ids" ] && echo "$ids" | xargs -r -n 50 "$DOCKER" -H "$HOST" rm -f >/dev/null 2>&1
    kill "$DOCKERD_PID" 2>/dev/null
    for _ in $(seq 1 100); do kill -0 "$DOCKERD_PID" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$DOCKERD_PID" 2>/dev/null
    wait "$DOCKERD_PID" 2>/dev/null
  fi
  [ -f "$DIR/exec/containerd/containerd.pid" ] && kill -9 "$(cat "$DIR/exec/containerd/containerd.pid")" 2>/dev/null
  # Anything still mounted under the roots, deepest first.
  awk -v d="$DIR" 'index($5, d) == 1 { print length($5), $5 }' /proc/self/mountinfo |
    sort -rn | cut -d' ' -f2- | while read -r m; do umount -l "$m"; done
  [ -n "${KEEP_LOG:-}" ] && cp "$DIR/agent.log" "$KEEP_LOG"
  rm -rf "$DIR"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

mkdir -p "$DIR"
dockerd --data-root "$DIR/data" --exec-root "$DIR/exec" -H "$HOST" --pidfile "$DIR/docker.pid" \
  --bridge=none --iptables=false --ip-masq=false --shutdown-timeout=2 >"$DIR/dockerd.log" 2>&1 &
DOCKERD_PID=$!
for _ in $(seq 1 300); do
  [ -S "$SOCK" ] && d version >/dev/null 2>&1 && break
  sleep 0.1
done
d version >/dev/null || { echo "docker-agent/run.sh: the private dockerd did not answer in 30 s; its log:" >&2; tail -20 "$DIR/dockerd.log"; exit 1; }

# The image: busybox-static and its applets, imported (nothing can be pulled).
mkdir -p "$DIR/rootfs/bin"
cp /bin/busybox "$DIR/rootfs/bin/"
for a in sh sleep; do ln -s busybox "$DIR/rootfs/bin/$a"; done
tar -C "$DIR/rootfs" -c . | d import - tsbox:1 >/dev/null

head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$DIR/psk"
METRICS=127.0.0.1:$((20000 + $$ % 20000))
RUST_LOG=${RUST_LOG:-info} "$TESSERA" run --runtime docker --docker-host "$HOST" \
  --docker-filter tessera.dev/enforce=true --node-name bench-node --psk-file "$DIR/psk" \
  --policies "$POLICIES" --metrics-addr "$METRICS" >"$DIR/agent.log" 2>&1 &
AGENT_PID=$!

# Empty output while the agent does not answer yet (never a failure: callers poll).
metrics() {
  curl -sf "http://$METRICS/metrics" 2>/dev/null || wget -qO- "http://$METRICS/metrics" 2>/dev/null ||
    busybox wget -qO- "http://$METRICS/metrics" 2>/dev/null || true
}
metric() { metrics | awk -v m="$1" '$1 == m { print $2 }'; }
for _ in $(seq 1 300); do
  [ -n "$(metric tessera_workloads_enforced)" ] && break
  kill -0 "$AGENT_PID" 2>/dev/null || { tail -20 "$DIR/agent.log"; exit 1; }
  sleep 0.1
done
[ -n "$(metric tessera_workloads_enforced)" ] || { echo "agent metrics never answered"; tail -20 "$DIR/agent.log"; exit 1; }
sleep 2 # settle after start-up
mem() { awk '/^(VmRSS|VmHWM)/ { printf "%s %d MiB  ", $1, $2 / 1024 }' "/proc/$AGENT_PID/status"; }
MEM0=$(mem)

start=$(date +%s.%N)
seq 1 "$N" | xargs -P "$P" -I{} sh -c '
  i={}; r=$((i % 3))
  case $r in 0) role=WebFrontend; ports=http=80 ;; 1) role=BusinessBackend; ports=api=8080 ;; *) role=Database; ports=postgres=5432 ;; esac
  '"$DOCKER"' -H '"$HOST"' run -d --name c$i --network none --stop-signal KILL \
    --label tessera.dev/enforce=true --label tessera.dev/namespace=shop \
    --label role=$role --label tessera.dev/ports=$ports tsbox:1 sleep 1000000 >/dev/null'
started=$(date +%s.%N)
got=0
for _ in $(seq 1 1200); do
  got=$(metric tessera_workloads_enforced)
  got=${got:-0}
  [ "${got%.*}" -ge "$N" ] && break
  sleep 0.25
done
done_at=$(date +%s.%N)
[ "${got%.*}" -ge "$N" ] || { echo "only $got of $N enforced after 300 s"; tail -20 "$DIR/agent.log"; exit 1; }
sleep 1
MEMN=$(mem)

echo "== docker runtime scale: $N containers, $P docker run at a time ($(nproc) cores, $(uname -r), $($DOCKER -H "$HOST" version -f '{{.Server.Version}}'))"
echo "agent memory with 0 containers:   $MEM0"
echo "agent memory with $N containers: $MEMN"
awk -v n="$N" -v a="$start" -v b="$started" -v c="$done_at" 'BEGIN {
  printf "docker run of %d containers: %.1f s; all enforced %.1f s after the first docker run\n", n, b - a, c - a }'
# The values of FIELD=N in the agent's log lines: "count p50 p99 max" (nothing if none).
log_pcts() {
  { grep -o "$1=[0-9]*" "$DIR/agent.log" || true; } | cut -d= -f2 | sort -n | awk '
    { v[NR] = $1 }
    END { if (NR) print NR, v[int((NR - 1) * 0.50) + 1], v[int((NR - 1) * 0.99) + 1], v[NR] }'
}
# Exact, from the agent's log: start event -> rules and queue in place.
read -r n p50 p99 max <<<"$(log_pcts since_start_ms)" || true
if [ -n "${n:-}" ]; then
  printf "start event -> enforced (agent log, %d workloads): p50 %d ms, p99 %d ms, max %d ms\n" "$n" "$p50" "$p99" "$max"
else
  echo "no since_start_ms in the agent log"
fi
# Where the agent's part of it went (the same log lines): waiting for an installation slot, the
# raw and queue sockets in the netns, the rules, and the event loop taking the result up.
for phase in slot_wait_ms sockets_ms rules_ms loop_wait_ms; do
  read -r n p50 p99 max <<<"$(log_pcts "$phase")" || true
  if [ -n "${n:-}" ]; then
    printf "  of which %-13s p50 %d ms, p99 %d ms, max %d ms\n" "$phase:" "$p50" "$p99" "$max"
  fi
done
# The histogram, interpolated within buckets.
metrics | awk '
  /^tessera_workload_enforce_seconds_bucket/ {
    match($0, /le="[^"]*"/); le = substr($0, RSTART + 4, RLENGTH - 5)
    n++; les[n] = le; cum[n] = $2
  }
  /^tessera_workload_enforce_seconds_sum/ { sum = $2 }
  /^tessera_workload_enforce_seconds_count/ { count = $2 }
  function q(p,   t, i, lo, prev) {
    t = p * count; lo = 0; prev = 0
    for (i = 1; i <= n; i++) {
      if (cum[i] >= t) {
        if (les[i] == "+Inf") return les[i - 1] "+"
        return sprintf("%.0f", 1000 * (lo + (les[i] - lo) * (t - prev) / (cum[i] - prev)))
      }
      lo = les[i]; prev = cum[i]
    }
  }
  END {
    if (count == 0) { print "histogram tessera_workload_enforce_seconds: empty"; exit }
    printf "histogram tessera_workload_enforce_seconds (%d): mean %.0f ms, p50 ~%s ms, p99 ~%s ms\n", count, 1000 * sum / count, q(0.5), q(0.99)
  }'
