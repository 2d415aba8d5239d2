#!/usr/bin/env bash
# Offline validation of every Kubernetes manifest of the repository (deployment/kubernetes/,
# examples/three-tier/kubernetes/) against the API schemas of the Kubernetes versions below, in
# strict mode (an unknown or misspelt field is an error), with kubernetes-validate from PyPI,
# pinned, installed in a virtualenv under target/ on first use. No cluster is contacted.
#
#   deployment/validate.sh [FILE...]     default: every *.yaml of those directories
#
# Environment: TESSERA_VALIDATE_VENV (where the virtualenv goes).
set -euo pipefail
cd "$(dirname "$0")/.."

KV_VERSION=1.37.0
# The oldest Kubernetes the project builds against (k8s-openapi feature v1_33) and the newest the
# pinned package ships.
K8S_VERSIONS=(1.33.0 1.37.0)

venv="${TESSERA_VALIDATE_VENV:-target/kubernetes-validate-$KV_VERSION}"
kv="$venv/bin/kubernetes-validate"

if ! [ -x "$kv" ] || [ "$("$kv" --version 2>/dev/null)" != "$KV_VERSION" ]; then
  if ! python3 -m venv --help >/dev/null 2>&1 || ! python3 -c 'import ensurepip' 2>/dev/null; then
    if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null; then
      echo "validate.sh: installing python3-venv" >&2
      apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3 python3-venv >/dev/null
    else
      echo "validate.sh: python3 with venv is needed (apt-get install python3-venv)" >&2
      exit 1
    fi
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
for version in "${K8S_VERSIONS[@]}"; do
  if "$kv" --strict --quiet -k "$version" "${files[@]}"; then
    echo "validate.sh: ${#files[@]} files valid for Kubernetes $version (strict)"
  else
    status=1
  fi
done
exit "$status"
