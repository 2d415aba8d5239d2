#!/usr/bin/env bash
# Installs the Tessera agent as a systemd service. Idempotent: run it again to upgrade the binary
# and the unit; an existing /etc/tessera/config.yaml, inventory, policies or key is never
# overwritten.
#
#   deployment/systemd/install.sh [--binary PATH] [--psk FILE] [--node-name NAME]
#                                 [--root DIR] [--enable]
#
#   --binary PATH     the tessera binary [default: target/release/tessera]
#   --psk FILE        copy this pre-shared key to /etc/tessera/psk (0600); every node needs the
#                     same one (create it once: head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')
#   --node-name NAME  nodeName written into a new config.yaml [default: hostname -s]
#   --root DIR        install under DIR instead of / (packaging, tests); no systemctl then
#   --enable          systemctl enable --now tessera (after daemon-reload)
#
# Layout:
#   /usr/local/bin/tessera                    0755
#   /etc/systemd/system/tessera.service       0644
#   /usr/local/share/doc/tessera/README.md    0644  deployment/README.md (the unit's Documentation=)
#   /etc/modules-load.d/tessera.conf          0644  netfilter modules the agent needs at boot
#   /etc/tessera/                             0700
#   /etc/tessera/config.yaml                  0600  (from deployment/systemd/config.yaml)
#   /etc/tessera/inventory.yaml               0600  static runtime: no workload yet
#   /etc/tessera/policies/                    0700  NetworkPolicy manifests
#   /etc/tessera/psk                          0600  with --psk
set -Eeuo pipefail
trap 'echo "${BASH_SOURCE[0]}: line $LINENO: \"$BASH_COMMAND\" failed (status $?)" >&2' ERR

here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"

binary="$repo/target/release/tessera"
psk=""
node_name=""
root=""
enable=0
while (($#)); do
  case "$1" in
    --binary) binary="$2"; shift 2 ;;
    --psk) psk="$2"; shift 2 ;;
    --node-name) node_name="$2"; shift 2 ;;
    --root) root="${2%/}"; shift 2 ;;
    --enable) enable=1; shift ;;
    -h|--help) sed -n '2,/^set -Eeuo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "install.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done

die() { echo "install.sh: $*" >&2; exit 1; }
say() { echo "install.sh: $*"; }

[ -x "$binary" ] || die "$binary: not an executable (build it: cargo build --release -p tessera, or pass --binary)"
if [ -n "$psk" ]; then
  [ -r "$psk" ] || die "--psk $psk: cannot read it"
fi
if [ -z "$root" ] && [ "$(id -u)" -ne 0 ]; then
  die "run as root (or with --root DIR)"
fi
[ -n "$node_name" ] || node_name="$(hostname -s 2>/dev/null || cat /proc/sys/kernel/hostname)"
# DNS-1123 label/subdomain: what the agent accepts as a node name.
[[ "$node_name" =~ ^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$ ]] || die "node name $node_name is not a DNS-1123 name: pass --node-name"

umask 077

# Copies SRC to DST with MODE when the contents differ (or DST is missing); always fixes the mode.
install_file() {
  local src="$1" dst="$2" mode="$3"
  if [ -e "$dst" ] && cmp -s "$src" "$dst"; then
    chmod "$mode" "$dst"
    return
  fi
  local tmp
  tmp="$(mktemp "$dst.XXXXXX")"
  cat "$src" >"$tmp"
  chmod "$mode" "$tmp"
  mv -f "$tmp" "$dst"
  say "installed $dst"
}

# Writes STDIN to DST with MODE only when DST does not exist yet.
create_once() {
  local dst="$1" mode="$2"
  if [ -e "$dst" ]; then
    cat >/dev/null
    chmod "$mode" "$dst"
    return
  fi
  local tmp
  tmp="$(mktemp "$dst.XXXXXX")"
  cat >"$tmp"
  chmod "$mode" "$tmp"
  mv -f "$tmp" "$dst"
  say "created $dst"
}

install -d -m 0755 "$root/usr/local/bin" "$root/etc/systemd/system" "$root/etc/modules-load.d" \
  "$root/usr/local/share/doc/tessera"
install -d -m 0700 "$root/etc/tessera" "$root/etc/tessera/policies"
chmod 0700 "$root/etc/tessera" "$root/etc/tessera/policies"

install_file "$binary" "$root/usr/local/bin/tessera" 0755
install_file "$here/tessera.service" "$root/etc/systemd/system/tessera.service" 0644
install_file "$here/../README.md" "$root/usr/local/share/doc/tessera/README.md" 0644

create_once "$root/etc/modules-load.d/tessera.conf" 0644 <<'EOF'
# Netfilter modules used by the Tessera agent (the unit may not load modules itself).
nfnetlink_queue
xt_NFQUEUE
xt_connmark
xt_CONNMARK
xt_mark
xt_tcpudp
xt_u32
xt_conntrack
nf_conntrack
nf_conntrack_netlink
EOF

sed "s/^nodeName: .*/nodeName: $node_name/" "$here/config.yaml" |
  create_once "$root/etc/tessera/config.yaml" 0600

create_once "$root/etc/tessera/inventory.yaml" 0600 <<'EOF'
# Workloads enforced by the static runtime (see examples/static/README.md for the fields).
workloads: []
EOF

if [ -n "$psk" ]; then
  if [ -e "$root/etc/tessera/psk" ] && ! cmp -s "$psk" "$root/etc/tessera/psk"; then
    die "$root/etc/tessera/psk exists with another key: remove it first to replace it"
  fi
  install_file "$psk" "$root/etc/tessera/psk" 0600
fi
# Whatever was put there by hand: keys readable by root only.
for f in "$root"/etc/tessera/psk "$root"/etc/tessera/pki/*.key; do
  if [ -e "$f" ]; then chmod 0600 "$f"; fi
done

"$root/usr/local/bin/tessera" --version >/dev/null || die "the installed binary does not run"

if [ -n "$root" ]; then
  say "installed under $root (systemctl not called)"
  exit 0
fi
if [ -d /run/systemd/system ]; then
  systemctl daemon-reload
  if ((enable)); then
    systemctl enable --now tessera.service
    say "tessera.service enabled and started"
  fi
else
  say "systemd is not running here: the unit is installed but not loaded"
fi
if [ ! -e /etc/tessera/psk ] && grep -q '^pskFile:' /etc/tessera/config.yaml; then
  say "next: put the cluster's pre-shared key in /etc/tessera/psk (0600), or switch config.yaml to PKI"
fi
say "check the configuration with: tessera run --config /etc/tessera/config.yaml --check"
