#!/usr/bin/env bash
# Installs everything pgferry's demo and test suite need on a fresh Debian machine, as root:
# PostgreSQL server and client tools, zstd, promtool and the Pushgateway (Debian packages),
# and Garage, the S3-compatible server (built once from crates.io into $PGFERRY_TOOLS).
# Idempotent: what is already installed is left alone, and apt is not touched then.
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(postgresql postgresql-client zstd prometheus prometheus-pushgateway ca-certificates)
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
