#!/usr/bin/env bash
# Real-kernel benchmark, one command, one run (as root): connection rate, connect latency,
# per-packet decision time and throughput for (a) no rules, (b) the same rules with
# `tessera run --accept-all`, (c) full enforcement (PSK and PKI), (k) an IP-based NFQUEUE
# enforcer of the bench's own, (q4) four empty queue trips (the floor of a handshake that proves
# both ends), (c) under a flood of spoofed SYNs, and (a-wg) the node-to-node WireGuard tunnel
# alone. Not part of the tests.
# Usage: sudo ./bench/run.sh [--duration SECONDS] [--bytes N] [--cases a,b,c-psk,c-pki,k,flood]
#        sudo ./bench/run.sh --all   # every case (one and four clients, flood, scale, Docker
#                                    # agent), then one table of each figure against its target
#        sudo ./bench/run.sh --halt-poll-ns 200000 ...   # with the guest's halt polling set to
#                                    # 200 us for the run (the haltpoll cpuidle driver's own
#                                    # default), restored afterwards; without it, left as it is
# Builds into (and runs from) $CARGO_TARGET_DIR when set, target/ otherwise.
set -Eeuo pipefail
trap 'echo "${BASH_SOURCE[0]}: line $LINENO: \"$BASH_COMMAND\" failed (status $?)" >&2' ERR
cd "$(dirname "$0")/.."
[ "$(id -u)" -eq 0 ] || { echo "bench/run.sh: needs root (network namespaces, iptables, NFQUEUE): sudo $0" >&2; exit 2; }
tests/need.sh ip=iproute2 ss=iproute2 iptables=iptables ip6tables=iptables iptables-restore=iptables \
  conntrack=conntrack nsenter=util-linux sysctl=procps
# --halt-poll-ns N: taken out of the arguments wherever it is.
halt_poll=
args=()
while [ $# -gt 0 ]; do
  if [ "$1" = --halt-poll-ns ]; then
    [ $# -ge 2 ] && [[ "$2" =~ ^[0-9]+$ ]] || { echo "bench/run.sh: --halt-poll-ns needs a number of nanoseconds" >&2; exit 2; }
    halt_poll=$2
    shift 2
  else
    args+=("$1")
    shift
  fi
done
set -- ${args[@]+"${args[@]}"}
# Every wake-up of an agent, a reader or a workload is a VM exit when the guest halts at once
# (haltpoll driver, guest_halt_poll_ns 0): that setting moves the connection-rate ratios
# (bench/README, "The host's idle setting"), so every run says which it had.
hp_param=/sys/module/haltpoll/parameters/guest_halt_poll_ns
idle_setting() {
  echo "cpuidle driver $(cat /sys/devices/system/cpu/cpuidle/current_driver 2>/dev/null || echo unknown)," \
    "guest_halt_poll_ns $(cat "$hp_param" 2>/dev/null || echo "- (no haltpoll driver)")"
}
if [ -n "$halt_poll" ]; then
  [ -w "$hp_param" ] || { echo "bench/run.sh: --halt-poll-ns: $hp_param is not there to set (this host does not run the haltpoll cpuidle driver)" >&2; exit 2; }
  hp_before=$(cat "$hp_param")
  trap 'echo "$hp_before" > "$hp_param"; echo "bench/run.sh: guest_halt_poll_ns restored to $hp_before"' EXIT
  echo "$halt_poll" > "$hp_param"
fi
echo "bench/run.sh: host idle setting: $(idle_setting)"
cargo=$(tests/ensure-rust.sh)
"$cargo" build --release --locked -p tessera -p tessera-bench-netns
target="${CARGO_TARGET_DIR:-target}"
bench() {
  "$target/release/netns-connrate" --tessera "$target/release/tessera" \
    --policies examples/three-tier/policies "$@"
}
[ "${1:-}" = "--all" ] || { bench "$@"; exit; }
shift

# --all: each part's output is kept in $out; the table at the end is read from it.
out=$(mktemp -d /tmp/tessera-bench-all.XXXXXX)
echo "bench/run.sh --all: outputs in $out (about 25 minutes on 2 cores)"
ROUNDS=${ROUNDS:-5}
echo "== 1/4 connection, UDP, throughput, reference and flood cases, one client, $ROUNDS interleaved rounds"
bench --rounds "$ROUNDS" --duration 3 --transfers 3 --bytes 268435456 \
  --cases a,a-wg,b,c-psk,c-pki,c-enc,k,q4,flood,flood-pki,flood-udp --summary "$out/one.txt" "$@" | tee "$out/one.log"
echo "== 2/4 the same with four clients at once (CPU-bound), $ROUNDS interleaved rounds, no flood"
bench --rounds "$ROUNDS" --clients 4 --duration 3 --transfers 1 --bytes 67108864 \
  --cases a,b,c-psk,c-pki,k --summary "$out/four.txt" "$@" | tee "$out/four.log"
# This host's speed moves by up to 2x from one minute to the next (the same binary gave a
# decision p50 of 0.41-1.2 us within ten minutes): the table gives the median of the runs.
ENGINE_RUNS=${ENGINE_RUNS:-3}
echo "== 3/4 scale: the policy engine with 10k NetworkPolicies, 1k admin policies, 5k pods (criterion), $ENGINE_RUNS runs"
for _ in $(seq "$ENGINE_RUNS"); do
  "$cargo" bench --locked -p tessera-policy --bench engine -- --warm-up-time 1 --measurement-time 3 \
    '^(decision/decide_ref, 1k admin policies|compile/one policy changed|compile/one admin policy changed)$' \
    2>&1 | tee -a "$out/engine.log"
done
echo "== 4/4 the Docker agent with 200 containers, 4 started at a time"
tests/need.sh dockerd=docker.io docker=docker.io busybox=busybox-static
TESSERA="$target/release/tessera" bench/docker-agent/run.sh --containers 200 --parallel 4 \
  | tee "$out/docker.log"

# The table: figure, measured (median over rounds, min..max), target, met.
fig() { awk -v c="$2" -v f="$3" '$1 == c && $2 == f { printf "%.2f (%.2f..%.2f)", $3, $4, $5; found = 1 }
  END { if (!found) printf "-" }' "$1"; }
val() { awk -v c="$2" -v f="$3" '$1 == c && $2 == f { print $3; found = 1 } END { if (!found) print "" }' "$1"; }
# Criterion's middle estimate of one bench, in microseconds, one line per run.
crit() { awk -v name="$1" '
  $0 == name { want = 1; next }
  want && /time:/ { gsub(/[\[\]]/, ""); v = $4; u = $5
    if (u == "ns") v /= 1000; else if (u == "ms") v *= 1000; else if (u == "s") v *= 1e6
    print v; want = 0 }' "$out/engine.log"; }
# Numbers on stdin, one per line: "median min max" (nothing if none).
mid() { sort -g | awk '{ v[NR] = $1 } END { if (NR) print (NR % 2 ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2), v[1], v[NR] }'; }
# "median (min..max)" of `mid`'s output, printed with 3 decimals ("-" if none).
span() { awk '{ printf "%.3f (%.3f..%.3f)", $1, $2, $3; n = 1 } END { if (!n) printf "-" }'; }
row() { # figure measured target op value
  local met="-"
  if [ -n "$5" ]; then
    met=$(awk -v x="$5" -v t="$4" -v op="$3" 'BEGIN { ok = (op == ">=") ? x >= t : x <= t; print ok ? "yes" : "NO" }')
  fi
  printf "%-58s %-24s %-10s %s\n" "$1" "$2" "$3 $4" "$met"
}
{
  echo
  echo "== bench/run.sh --all: each figure against its target (issue 16; medians of same-round ratios)"
  echo "   host idle setting: $(idle_setting)"
  printf "%-58s %-24s %-10s %s\n" figure measured target met
  for c in c-psk c-pki; do
    row "TCP conn/s ($c)/(b), 1 client" "$(fig "$out/one.txt" $c conn/b)" ">=" 0.95 "$(val "$out/one.txt" $c conn/b)"
    row "TCP conn/s ($c)/(b), 4 clients" "$(fig "$out/four.txt" $c conn/b)" ">=" 0.95 "$(val "$out/four.txt" $c conn/b)"
    row "TCP conn/s ($c)/(a), 1 client" "$(fig "$out/one.txt" $c conn/a)" ">=" 0.5 "$(val "$out/one.txt" $c conn/a)"
    row "TCP conn/s ($c)/(k), 1 client" "$(fig "$out/one.txt" $c conn/k)" ">=" 0.75 "$(val "$out/one.txt" $c conn/k)"
    row "UDP new flows/s ($c)/(b), 1 client" "$(fig "$out/one.txt" $c udp/b)" ">=" 0.95 "$(val "$out/one.txt" $c udp/b)"
    row "UDP new flows/s ($c)/(a), 1 client" "$(fig "$out/one.txt" $c udp/a)" ">=" 0.5 "$(val "$out/one.txt" $c udp/a)"
    row "throughput ($c)/(a)" "$(fig "$out/one.txt" $c gbit/a)" ">=" 0.98 "$(val "$out/one.txt" $c gbit/a)"
    row "agents' decision p50, us ($c)" "$(fig "$out/one.txt" $c decide_p50_us)" "<=" 10 "$(val "$out/one.txt" $c decide_p50_us)"
    row "agents' decision p99, us ($c)" "$(fig "$out/one.txt" $c decide_p99_us)" "<=" 50 "$(val "$out/one.txt" $c decide_p99_us)"
    row "agents' CPU per connection, us ($c, no target)" "$(fig "$out/one.txt" $c agent_cpu_us)" "" "" ""
    # Against the floor of the same rounds (no target): what the handshake's own work costs,
    # apart from the wake-ups that this host charges every design with a proof at each end.
    row "TCP conn/s ($c)/(q4), 1 client, no target" "$(fig "$out/one.txt" $c conn/q4)" "" "" ""
    row "UDP new flows/s ($c)/(q4), 1 client, no target" "$(fig "$out/one.txt" $c udp/q4)" "" "" ""
  done
  # What no handshake code could beat on this host (no target): the six trips of (c) with
  # nothing done in them (b), and the four of any handshake that proves both ends (q4).
  row "floor: TCP conn/s (b)/(a), 1 client, 6 empty trips" "$(fig "$out/one.txt" b conn/a)" "" "" ""
  row "floor: TCP conn/s (q4)/(a), 1 client, 4 empty trips" "$(fig "$out/one.txt" q4 conn/a)" "" "" ""
  row "floor: TCP conn/s (q4)/(k), 1 client, 4 empty trips" "$(fig "$out/one.txt" q4 conn/k)" "" "" ""
  row "floor: UDP new flows/s (q4)/(b), 1 client, 4 empty trips" "$(fig "$out/one.txt" q4 udp/b)" "" "" ""
  # Issue 17: what the node-to-node tunnel costs (no target).
  row "encryption: TCP conn/s (a-wg)/(a), tunnel alone" "$(fig "$out/one.txt" a-wg conn/a)" "" "" ""
  row "encryption: throughput (a-wg)/(a), tunnel alone" "$(fig "$out/one.txt" a-wg gbit/a)" "" "" ""
  row "encryption: TCP conn/s (c-enc)/(c-psk), same agents" "$(fig "$out/one.txt" c-enc conn/c)" "" "" ""
  row "encryption: throughput (c-enc)/(c-psk), same agents" "$(fig "$out/one.txt" c-enc gbit/c)" "" "" ""
  for c in flood flood-pki flood-udp; do
    row "conn/s under a flood (>= 10x) / unloaded ($c)" "$(fig "$out/one.txt" $c flood)" ">=" 0.5 "$(val "$out/one.txt" $c flood)"
    rss=$(val "$out/one.txt" $c flood_rss_kib)
    row "agent RSS during the flood, MiB ($c)" "${rss:+$(awk -v k="$rss" 'BEGIN { printf "%.1f", k / 1024 }')}" "<=" 40 \
      "${rss:+$(awk -v k="$rss" 'BEGIN { print k / 1024 }')}"
  done
  # The engine's figures: median (min..max) over its runs; the rebuilds in ms.
  ms() { awk '{ print $1 / 1000 }'; }
  d50=$(awk '/^decision latency, 1k admin policies:/ { print $7 / 1000 }' "$out/engine.log" | mid)
  row "engine decision p50, 10k NP + 1k admin + 5k pods, us" "$(printf %s "$d50" | span)" "<=" 1 "${d50%% *}"
  d=$(crit "decision/decide_ref, 1k admin policies" | mid)
  row "engine decision mean (criterion), same cluster, us" "$(printf %s "$d" | span)" "<=" 1 "${d%% *}"
  p=$(crit "compile/one policy changed" | ms | mid); a=$(crit "compile/one admin policy changed" | ms | mid)
  row "incremental rebuild, one NetworkPolicy, ms" "$(printf %s "$p" | span)" "<=" 50 "${p%% *}"
  row "incremental rebuild, one admin policy, ms" "$(printf %s "$a" | span)" "<=" 50 "${a%% *}"
  m=$(awk '/agent memory with [1-9][0-9]* containers/ { for (i = 1; i <= NF; i++) if ($i == "VmRSS:") print $(i + 1) }' "$out/docker.log")
  row "agent RSS with 200 enforced containers, MiB" "${m:--}" "<=" 40 "$m"
  e=$(awk '/start event -> enforced \(agent log/ { for (i = 1; i <= NF; i++) if ($i == "p99") print $(i + 1) }' "$out/docker.log")
  row "start -> enforced p99, 4 containers at a time, ms" "${e:--}" "<=" 100 "$e"
} | tee "$out/table.txt"
