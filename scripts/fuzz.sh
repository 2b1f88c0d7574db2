#!/usr/bin/env bash
# Fuzzes pgferry's parsers of hostile input for a bounded time: the config parser, the
# manifest parser and the pg_dump custom-format stats tap (targets in fuzz/fuzz_targets/).
#
#   scripts/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]     default: 60 s, every target
#
# Installs cargo-fuzz into $PGFERRY_TOOLS (default /opt/pgferry-tools) if missing. Each
# target starts from its committed corpus fuzz/corpus/<target>/ (seeds and past crashes);
# what the fuzzer finds is kept in fuzz/target/corpus-work/<target>/ (not committed), crash
# inputs land in fuzz/artifacts/<target>/. Exits non-zero if any target crashed: copy the
# crash input into fuzz/corpus/<target>/ and fix the parser (cargo test then runs it too).
#
# Only the stable toolchain is needed: cargo-fuzz passes nightly-only rustc flags
# (-Zsanitizer, and -Cpasses=sancov-module for coverage), which RUSTC_BOOTSTRAP=1 allows on
# stable. The sanitizer is "none" (no AddressSanitizer: pgferry has no unsafe code of its
# own, and panics, not memory errors, are what we look for); debug assertions are on, so an
# arithmetic overflow is a crash too. Memory is bounded by libFuzzer's -rss_limit_mb and
# -malloc_limit_mb: a parser that allocates more than that on any input counts as a crash.
set -euo pipefail
cd "$(dirname "$0")/.."

SECONDS_PER_TARGET="${1:-60}"
shift || true
TARGETS=("$@")
if [ "${#TARGETS[@]}" -eq 0 ]; then TARGETS=(config manifest dumpstats); fi

# Bounds: the biggest input the fuzzer builds, and the memory any one input may use.
MAX_LEN=65536        # bytes; the real dump fixtures are ~64 KiB
RSS_LIMIT_MB=2048
MALLOC_LIMIT_MB=512  # one allocation; the tap keeps at most 64 KiB of any string

export PGFERRY_TOOLS="${PGFERRY_TOOLS:-/opt/pgferry-tools}"
export PATH="$PGFERRY_TOOLS/bin:$HOME/.cargo/bin:$PATH"
export RUSTC_BOOTSTRAP=1

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "Installing cargo-fuzz into $PGFERRY_TOOLS ..."
    cargo install cargo-fuzz --locked --root "$PGFERRY_TOOLS"
fi

FUZZ_FLAGS=(--sanitizer none -O --debug-assertions)
# Extra read-only seeds per target, besides fuzz/corpus/<target>/.
extra_seeds() {
    case "$1" in
        dumpstats) echo "tests/fixtures/dumpstats" ;;
        *) ;;
    esac
}

cd fuzz
cargo fuzz build "${FUZZ_FLAGS[@]}"

failed=()
for target in "${TARGETS[@]}"; do
    work="target/corpus-work/$target"
    mkdir -p "$work" "artifacts/$target"
    seeds=("corpus/$target")
    extra="$(extra_seeds "$target")"
    if [ -n "$extra" ]; then seeds+=("../$extra"); fi
    echo "=== fuzzing $target for ${SECONDS_PER_TARGET}s (seeds: ${seeds[*]})"
    if ! cargo fuzz run "${FUZZ_FLAGS[@]}" "$target" "$work" "${seeds[@]}" -- \
        -max_total_time="$SECONDS_PER_TARGET" -max_len="$MAX_LEN" \
        -rss_limit_mb="$RSS_LIMIT_MB" -malloc_limit_mb="$MALLOC_LIMIT_MB" \
        -print_final_stats=1; then
        failed+=("$target")
    fi
done

if [ "${#failed[@]}" -ne 0 ]; then
    echo "FUZZING FOUND CRASHES in: ${failed[*]} (inputs in fuzz/artifacts/<target>/)" >&2
    exit 1
fi
echo "fuzzing: no crash in ${TARGETS[*]} (${SECONDS_PER_TARGET}s each)"
