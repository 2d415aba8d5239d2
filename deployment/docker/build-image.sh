#!/usr/bin/env bash
# Builds the container image tessera:<version> without any registry or base image: a root file
# system is assembled from this machine's files (the tessera binary; nsenter, ss, conntrack and
# iptables-nft with the shared libraries ldd lists, iptables' xtables modules, the few /etc
# files they read) and imported with `docker import`.
#
#   deployment/docker/build-image.sh [--binary PATH] [--tag NAME:TAG] [-H DOCKER_HOST]
#                                    [--save FILE] [--rootfs DIR]
#
#   --binary PATH   the tessera binary [default: cargo build --release -p tessera, then
#                   target/release/tessera]
#   --tag NAME:TAG  [default: tessera:<version printed by tessera --version>]
#   -H, --host URL  the Docker daemon to import into (e.g. unix:///run/private/docker.sock)
#                   [default: $DOCKER_HOST, else the client's default]
#   --save FILE     also write the image with `docker save` (to load it on nodes without a
#                   registry: docker load -i FILE, or ctr -n k8s.io images import FILE)
#   --rootfs DIR    keep the assembled root file system in DIR (must not exist) instead of a
#                   temporary directory
#
# iptables: the image ships the iptables variant of this machine, which must be nf_tables
# (`iptables -V` says "(nf_tables)", as on Debian 12 and later): the agent's rules then live
# in nftables' compatibility tables, like those of the node's own iptables-nft. The legacy
# variant is refused (it would need a writable /run/xtables.lock in a read-only container).
#
# Environment: DOCKER (the docker client to use) [default: docker].
set -Eeuo pipefail
trap 'echo "${BASH_SOURCE[0]}: line $LINENO: \"$BASH_COMMAND\" failed (status $?)" >&2' ERR

here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
export PATH="$PATH:/usr/sbin:/sbin"

binary=""
tag=""
save=""
keep_rootfs=""
docker_args=()
while (($#)); do
  case "$1" in
    --binary) binary="$2"; shift 2 ;;
    --tag) tag="$2"; shift 2 ;;
    -H|--host) docker_args+=(-H "$2"); shift 2 ;;
    --save) save="$2"; shift 2 ;;
    --rootfs) keep_rootfs="$2"; shift 2 ;;
    -h|--help) sed -n '2,/^set -Eeuo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "build-image.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
docker_cmd=("${DOCKER:-docker}" "${docker_args[@]}")

die() { echo "build-image.sh: $*" >&2; exit 1; }

if [ -z "$binary" ]; then
  (cd "$repo" && cargo build --release --locked -p tessera)
  binary="$repo/target/release/tessera"
fi
[ -x "$binary" ] || die "$binary: not an executable"
version="$("$binary" --version | awk '{print $2}')"
[ -n "$version" ] || die "$binary --version printed no version"
[ -n "$tag" ] || tag="tessera:$version"

# The programs the agent runs (datapath/src/shell/), by the names it runs them under.
command -v iptables >/dev/null || die "iptables is not installed (apt-get install iptables)"
iptables_version="$(iptables -V 2>&1)"
iptables_real="$(readlink -f "$(command -v iptables)")"
case "$iptables_version" in
  *nf_tables*) ;;
  *) die "iptables here is $iptables_version: the image ships iptables-nft only (apt-get install iptables; update-alternatives --set iptables /usr/sbin/iptables-nft)" ;;
esac
programs=(
  "$(command -v nsenter)"
  "$(command -v ss)"
  "$(command -v conntrack)"
  "$iptables_real"
)
for p in "${programs[@]}"; do
  [ -x "$p" ] || die "missing program $p (apt-get install util-linux iproute2 conntrack iptables)"
done
xtables_dir=/usr/lib/x86_64-linux-gnu/xtables
[ -d "$xtables_dir" ] || die "$xtables_dir: missing (iptables' match and target modules)"

if [ -n "$keep_rootfs" ]; then
  [ -e "$keep_rootfs" ] && die "--rootfs $keep_rootfs exists"
  rootfs="$keep_rootfs"
  mkdir -p "$rootfs"
else
  rootfs="$(mktemp -d "${TMPDIR:-/tmp}/tessera-rootfs.XXXXXX")"
  trap 'rm -rf "$rootfs"' EXIT
fi

# Merged /usr, as Debian: /bin, /sbin, /lib, /lib64 are links into /usr.
mkdir -p "$rootfs"/usr/{bin,sbin,lib,lib64,local/bin} "$rootfs"/etc/tessera \
  "$rootfs"/run/netns "$rootfs"/var "$rootfs"/proc "$rootfs"/sys "$rootfs"/dev
for d in bin sbin lib lib64; do ln -s "usr/$d" "$rootfs/$d"; done
ln -s ../run "$rootfs/var/run"
install -d -m 1777 "$rootfs/tmp"

# Copies FILE (following links) to the same path in the root file system.
copy() {
  local dest="$rootfs$1"
  mkdir -p "$(dirname "$dest")"
  cp -L "$1" "$dest"
}
# The shared libraries of each file given, as ldd resolves them here (and the loader).
libs_of() {
  ldd "$@" 2>/dev/null | awk '/=> \//{print $3} /^[ \t]*\/[^ ]+ \(/{print $1}' | sort -u
}

install -m 0755 "$binary" "$rootfs/usr/local/bin/tessera"
# Debug info off (the release profile keeps it for perf): symbols stay for backtraces.
if command -v strip >/dev/null; then strip --strip-debug "$rootfs/usr/local/bin/tessera"; fi
for p in "${programs[@]}"; do copy "$p"; done
for name in iptables iptables-restore iptables-save ip6tables ip6tables-restore ip6tables-save; do
  ln -sf "$(basename "$iptables_real")" "$rootfs/usr/sbin/$name"
done
mkdir -p "$rootfs$xtables_dir"
cp -L "$xtables_dir"/*.so "$rootfs$xtables_dir/"
while read -r lib; do copy "$lib"; done < <(libs_of "$binary" "${programs[@]}" "$xtables_dir"/*.so)

# What iptables, ss and the resolver read from /etc; root's account for tools that ask.
for f in /etc/ethertypes /etc/protocols /etc/services; do
  if [ -e "$f" ]; then copy "$f"; fi
done
# The system's CA bundle: the Kubernetes client loads it (an API server with a public CA, or
# none given in the kubeconfig) and fails without any.
if [ -e /etc/ssl/certs/ca-certificates.crt ]; then
  copy /etc/ssl/certs/ca-certificates.crt
else
  die "/etc/ssl/certs/ca-certificates.crt is missing (apt-get install ca-certificates)"
fi
printf 'root:x:0:0:root:/root:/usr/sbin/nologin\n' >"$rootfs/etc/passwd"
printf 'root:x:0:\n' >"$rootfs/etc/group"
printf 'passwd: files\ngroup: files\nhosts: files dns\n' >"$rootfs/etc/nsswitch.conf"

# The image must run here before it is imported: every program finds its libraries.
if command -v chroot >/dev/null && [ "$(id -u)" -eq 0 ]; then
  chroot "$rootfs" /usr/local/bin/tessera --version >/dev/null || die "tessera does not run in the root file system"
  chroot "$rootfs" /usr/sbin/iptables -V >/dev/null || die "iptables does not run in the root file system"
  chroot "$rootfs" /usr/bin/nsenter --version >/dev/null || die "nsenter does not run in the root file system"
  chroot "$rootfs" /usr/sbin/conntrack --version >/dev/null || die "conntrack does not run in the root file system"
  chroot "$rootfs" /usr/bin/ss -V >/dev/null || die "ss does not run in the root file system"
fi

tar -C "$rootfs" --numeric-owner --owner=0 --group=0 -c . |
  "${docker_cmd[@]}" import \
    -c 'ENTRYPOINT ["/usr/local/bin/tessera"]' \
    -c 'CMD ["run"]' \
    -c 'ENV PATH=/usr/local/bin:/usr/sbin:/usr/bin' \
    -c "LABEL org.opencontainers.image.title=tessera org.opencontainers.image.version=$version" \
    - "$tag" >/dev/null
echo "build-image.sh: built $tag ($(du -sh "$rootfs" | cut -f1) root file system; $iptables_version)"

if [ -n "$save" ]; then
  "${docker_cmd[@]}" save -o "$save" "$tag"
  echo "build-image.sh: saved $tag to $save"
fi
