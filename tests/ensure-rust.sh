#!/usr/bin/env bash
# Prints the path of a cargo that can build Tessera (Rust >= 1.90: edition 2024). Looks on PATH,
# in ~/.cargo/bin of root and of the sudo-invoking user; when none is recent enough and we are
# root, installs a minimal stable toolchain with rustup (Debian's own cargo is too old).
# Used by tests/run.sh and examples/three-tier/run.sh.
set -Eeuo pipefail
trap 'echo "${BASH_SOURCE[0]}: line $LINENO: \"$BASH_COMMAND\" failed (status $?)" >&2' ERR

recent() { # cargo 1.95.0 (...) -> minor >= 90
  local v
  v=$("$1" --version 2>/dev/null | awk '{print $2}') || return 1
  [ "${v%%.*}" -gt 1 ] 2>/dev/null && return 0
  local minor=${v#1.}; minor=${minor%%.*}
  [ "${minor:-0}" -ge 90 ] 2>/dev/null
}

candidates=("$(command -v cargo || true)" "$HOME/.cargo/bin/cargo" /root/.cargo/bin/cargo)
if [ -n "${SUDO_USER:-}" ] && [ "$SUDO_USER" != root ]; then
  home=$(getent passwd "$SUDO_USER" | cut -d: -f6) || home=""
  [ -z "$home" ] || candidates+=("$home/.cargo/bin/cargo")
fi
for c in "${candidates[@]}"; do
  if [ -n "$c" ] && [ -x "$c" ] && recent "$c"; then
    echo "$c"
    exit 0
  fi
done

if [ "$(id -u)" -ne 0 ]; then
  echo "no cargo >= 1.90 found: install Rust with https://rustup.rs, then run this again" >&2
  exit 2
fi
echo "no cargo >= 1.90 found: installing stable Rust with rustup (minimal profile)" >&2
if ! command -v curl >/dev/null; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq curl ca-certificates >/dev/null
fi
installer=$(mktemp)
trap 'rm -f "$installer"' EXIT
curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs -o "$installer" ||
  { echo "ensure-rust.sh: could not download rustup's installer" >&2; exit 2; }
sh "$installer" -y --profile minimal --component rustfmt,clippy >&2 ||
  { echo "ensure-rust.sh: rustup's installer failed (above)" >&2; exit 2; }
recent "$HOME/.cargo/bin/cargo" || { echo "ensure-rust.sh: rustup installed no usable cargo in $HOME/.cargo/bin" >&2; exit 2; }
echo "$HOME/.cargo/bin/cargo"
