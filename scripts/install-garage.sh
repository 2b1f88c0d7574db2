#!/usr/bin/env bash
# Installs Garage, the S3-compatible server that the integration tests start
# (tests/it/support/garage.rs), into ${PGFERRY_TOOLS:-/opt/pgferry-tools}/bin/garage.
#
# Idempotent: does nothing when that binary already reports the wanted version.
# Otherwise builds it from crates.io with `cargo install --locked` (about 30 min
# on 2 cores; needs a C compiler, and cargo on PATH).
#
# Usage: scripts/install-garage.sh        (env: PGFERRY_TOOLS, GARAGE_VERSION)
set -euo pipefail

GARAGE_VERSION="${GARAGE_VERSION:-2.5.0}"
PGFERRY_TOOLS="${PGFERRY_TOOLS:-/opt/pgferry-tools}"
garage="$PGFERRY_TOOLS/bin/garage"

# `garage --version` prints e.g. "garage cargo:2.5.0 [features: ...]".
installed_version() {
    "$garage" --version 2>/dev/null | grep -oE '[0-9]+\.[0-9]+\.[0-9]+' | head -n 1 || true
}

if [ -x "$garage" ]; then
    have="$(installed_version)"
    if [ "$have" = "$GARAGE_VERSION" ]; then
        echo "install-garage: $garage is already Garage $GARAGE_VERSION; nothing to do."
        exit 0
    fi
    echo "install-garage: $garage reports version '${have:-unknown}', want $GARAGE_VERSION; reinstalling."
else
    echo "install-garage: no $garage; installing Garage $GARAGE_VERSION."
fi

if ! command -v cargo >/dev/null 2>&1; then
    echo "install-garage: cargo is not on PATH; install Rust (rustup) first." >&2
    exit 1
fi

mkdir -p "$PGFERRY_TOOLS"
echo "install-garage: running: cargo install garage --version $GARAGE_VERSION --locked --root $PGFERRY_TOOLS"
echo "install-garage: (a long build: about 30 minutes on 2 cores)"
cargo install garage --version "$GARAGE_VERSION" --locked --root "$PGFERRY_TOOLS"

have="$(installed_version)"
if [ "$have" != "$GARAGE_VERSION" ]; then
    echo "install-garage: after the install, $garage reports '${have:-nothing}', not $GARAGE_VERSION." >&2
    exit 1
fi
echo "install-garage: installed $("$garage" --version)"
