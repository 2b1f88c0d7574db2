#!/usr/bin/env bash
# The whole test suite: installs what it needs (scripts/setup.sh), then runs the unit and
# integration tests against real PostgreSQL and Garage servers that the tests start on
# loopback ports. Used as-is by CI (.ci/run).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
export PGFERRY_TOOLS="${PGFERRY_TOOLS:-/opt/pgferry-tools}"
cargo test --all-targets --locked "$@"
