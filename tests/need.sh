#!/usr/bin/env bash
# Installs, as root with apt-get, the Debian packages of the commands that are missing.
#
#   tests/need.sh COMMAND=PACKAGE...      e.g. tests/need.sh iptables=iptables unshare=util-linux
#
# A COMMAND that starts with / is a path that must be executable (e.g. /usr/bin/docker=docker.io).
# Checks again after installing and names any command still missing. Exit 0: all present.
# Used by tests/run.sh, examples/three-tier/run.sh and bench/run.sh.
set -Eeuo pipefail
trap 'echo "${BASH_SOURCE[0]}: line $LINENO: \"$BASH_COMMAND\" failed (status $?)" >&2' ERR
export PATH="$PATH:/usr/sbin:/sbin"

have() { if [[ "$1" = /* ]]; then [ -x "$1" ]; else command -v "$1" >/dev/null; fi; }

missing=()
for pair in "$@"; do
  [[ "$pair" = *=* ]] || { echo "need.sh: '$pair' is not COMMAND=PACKAGE" >&2; exit 2; }
  have "${pair%%=*}" || missing+=("${pair#*=}")
done
((${#missing[@]})) || exit 0

mapfile -t missing < <(printf '%s\n' "${missing[@]}" | sort -u)
if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null; then
  echo "need.sh: missing packages ${missing[*]}: install them (apt-get install ${missing[*]}) or run as root on Debian" >&2
  exit 2
fi
echo "== installing ${missing[*]} (apt-get)" >&2
apt-get update -qq || { echo "need.sh: apt-get update failed" >&2; exit 2; }
DEBIAN_FRONTEND=noninteractive NEEDRESTART_SUSPEND=1 apt-get install -y -qq "${missing[@]}" >/dev/null ||
  { echo "need.sh: apt-get install ${missing[*]} failed" >&2; exit 2; }
for pair in "$@"; do
  have "${pair%%=*}" || { echo "need.sh: ${pair%%=*} is still missing after installing ${pair#*=}" >&2; exit 2; }
done
