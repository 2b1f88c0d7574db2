#!/usr/bin/env bash
# Installs everything pgferry's demo and test suite need on a fresh Debian machine, as root:
# PostgreSQL server and client tools, zstd, age (the encryption tests open objects with it),
# promtool and the Pushgateway (Debian packages),
# and Garage, the S3-compatible server (built once from crates.io into $PGFERRY_TOOLS).
# Also the deploy checks' tools: kubernetes-validate (PyPI, in a venv) and the Prometheus
# Operator schemas (npm), both into $PGFERRY_TOOLS.
# Idempotent: what is already installed is left alone, and apt is not touched then.
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(postgresql postgresql-client zstd age prometheus prometheus-pushgateway ca-certificates python3-venv)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" -ne 0 ]; then
        echo "setup: missing Debian packages: ${missing[*]}; run this script as root" >&2
        exit 1
    fi
    echo "setup: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # The packages' own services are not used: tests and the demo start their own servers.
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# Debian's packaging may start a default cluster and a Prometheus: not ours, leave them be.

scripts/install-garage.sh

# The deploy checks (tests/it/deploy.rs): kubernetes-validate (the Kubernetes API schemas,
# offline) and PyYAML in a venv, and the Prometheus Operator's schemas for ServiceMonitor and
# PrometheusRule (compiled into an npm package, pinned by tests/it/deploy/package-lock.json).
tools="${PGFERRY_TOOLS:-/opt/pgferry-tools}"
venv="$tools/venv"
if [ "$("$venv/bin/kubernetes-validate" --version 2>/dev/null)" != "1.37.0" ] \
    || ! "$venv/bin/python" -c 'import yaml' 2>/dev/null; then
    echo "setup: installing kubernetes-validate into $venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q --disable-pip-version-check kubernetes-validate==1.37.0 PyYAML==6.0.4
fi
if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
    echo "setup: installing nodejs and npm"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends nodejs npm >/dev/null
fi
node_dir="$tools/node"
if ! cmp -s tests/it/deploy/package-lock.json "$node_dir/installed-lock.json"; then
    echo "setup: installing the Prometheus Operator schemas into $node_dir"
    mkdir -p "$node_dir"
    cp tests/it/deploy/package.json tests/it/deploy/package-lock.json "$node_dir/"
    (cd "$node_dir" && npm ci --no-audit --no-fund --silent)
    cp tests/it/deploy/package-lock.json "$node_dir/installed-lock.json"
fi
