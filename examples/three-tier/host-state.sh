#!/usr/bin/env bash
# Prints what the three-tier demo must leave as it found it, in a form two runs can diff: the
# network namespace's iptables and ip6tables rules (no comments, no packet counters) and the
# names of the network namespaces under /run/netns (the demo's own ts-* ones excepted).
# Prints nothing on a pristine host (empty rulesets, no namespace) and exits 0 there: an empty
# ruleset is a state like any other. Used by run.sh before and after the demo; tested on an
# empty ruleset by tests/netns/tests/scripts.rs.
set -Eeuo pipefail
trap 'echo "${BASH_SOURCE[0]}: line $LINENO: \"$BASH_COMMAND\" failed (status $?)" >&2' ERR
export PATH="$PATH:/usr/sbin:/sbin"

for save in iptables-save ip6tables-save; do
  command -v "$save" >/dev/null || { echo "host-state.sh: $save is missing (apt-get install iptables)" >&2; exit 2; }
  # sed, not grep: a filter that selects nothing is no error (grep -v exits 1 on empty input).
  "$save" | sed -e '/^#/d' -e 's/\[[0-9]*:[0-9]*\]//g'
done
# `ip netns list` prints "NAME" or "NAME (id: N)".
ip netns list | awk '$1 !~ /^ts-/ { print "netns " $1 }'
