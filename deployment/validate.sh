#!/usr/bin/env bash
# Offline validation of the deployment files, installing the tools it needs on first use:
# - every Kubernetes manifest of the repository (deployment/kubernetes/,
#   examples/three-tier/kubernetes/) against the API schemas of the Kubernetes versions below,
#   in strict mode (an unknown or misspelt field is an error), with kubernetes-validate from
#   PyPI, pinned, in a virtualenv under target/. No cluster is contacted.
# - the systemd unit with `systemd-analyze verify` (any warning is an error). The Rust tests
#   (enforcer/tests/deployment.rs) check it again with the real binary.
#
#   deployment/validate.sh [FILE...]     default: every *.yaml of those directories, and the unit
#
# Environment: TESSERA_VALIDATE_VENV (where the virtualenv goes).
set -Eeuo pipefail
trap 'echo "${BASH_SOURCE[0]}: line $LINENO: \"$BASH_COMMAND\" failed (status $?)" >&2' ERR
cd "$(dirname "$0")/.."

KV_VERSION=1.37.0
# The oldest Kubernetes the project builds against (k8s-openapi feature v1_33) and the newest the
# pinned package ships.
K8S_VERSIONS=(1.33.0 1.37.0)

# apt-get install, as root, of the packages given.
apt_install() {
  if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null; then
    echo "validate.sh: installing $*" >&2
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
  else
    echo "validate.sh: missing $* (apt-get install $*)" >&2
    exit 1
  fi
}

venv="${TESSERA_VALIDATE_VENV:-target/kubernetes-validate-$KV_VERSION}"
kv="$venv/bin/kubernetes-validate"

if ! [ -x "$kv" ] || [ "$("$kv" --version 2>/dev/null)" != "$KV_VERSION" ]; then
  if ! python3 -m venv --help >/dev/null 2>&1 || ! python3 -c 'import ensurepip' 2>/dev/null; then
    apt_install python3 python3-venv
  fi
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check "kubernetes-validate==$KV_VERSION"
fi

if (($#)); then
  files=("$@")
else
  mapfile -t files < <(find deployment/kubernetes examples/three-tier/kubernetes \
    -type f \( -name '*.yaml' -o -name '*.yml' \) | sort)
fi
if ((${#files[@]} == 0)); then
  echo "validate.sh: no manifest found" >&2
  exit 1
fi

status=0
if (($# == 0)); then
  command -v systemd-analyze >/dev/null || apt_install systemd
  # For enforcer/tests/deployment.rs, which boots systemd in a container to run the unit.
  command -v systemd-nspawn >/dev/null || apt_install systemd-container
  scratch="$(mktemp -d)"
  trap 'rm -rf "$scratch"' EXIT
  # verify checks that ExecStart's program exists: any executable stands in for the binary.
  sed 's#^ExecStart=/usr/local/bin/tessera #ExecStart=/bin/true #' \
    deployment/systemd/tessera.service >"$scratch/tessera.service"
  if out="$(systemd-analyze verify "$scratch/tessera.service" 2>&1)" && [ -z "$out" ]; then
    echo "validate.sh: deployment/systemd/tessera.service verified (systemd-analyze)"
  else
    echo "validate.sh: deployment/systemd/tessera.service: ${out:-systemd-analyze verify failed}" >&2
    status=1
  fi
fi

for version in "${K8S_VERSIONS[@]}"; do
  if "$kv" --strict --quiet -k "$version" "${files[@]}"; then
    echo "validate.sh: ${#files[@]} files valid for Kubernetes $version (strict)"
  else
    status=1
  fi
done
exit "$status"
