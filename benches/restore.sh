#!/usr/bin/env bash
# End-to-end restore benchmark (run by hand, never in CI): one ~$SIZE GB database backed up
# once by pgferry to a local Garage bucket, then, alternating round by round:
#   baseline          pg_restore from a local uncompressed custom-format file
#   baseline -j 2     pg_restore -j 2 from that file (what parallel restore can gain here)
#   pgferry stream    pgferry restore (download → sha256 → zstd -d → pg_restore)
#   pgferry --jobs 2  pgferry restore --jobs 2 (spool, verify, pg_restore -j 2)
# Reports the median (min–max) wall time and the ratio to the baseline.
# Usage: benches/restore.sh [rounds]   (env: SIZE=2, WORK_DIR)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
ROUNDS="${1:-3}"
SIZE="${SIZE:-2}"
WORK_DIR="${WORK_DIR:-/var/tmp/pgferry-bench-restore}"
PG_PORT="${PG_PORT:-54349}"
S3_PORT="${S3_PORT:-39200}"
export PGFERRY_TOOLS="${PGFERRY_TOOLS:-/opt/pgferry-tools}"

scripts/setup.sh >/dev/null
command -v /usr/bin/time >/dev/null || { apt-get install -y -qq time >/dev/null; }
cargo build --release --locked 2>/dev/null
PGFERRY="$ROOT/target/release/pgferry"
# shellcheck source=scripts/lib.sh
source scripts/lib.sh
trap stop_servers EXIT
start_servers bench-restore
export PGFERRY_S3_KEY_ID="$S3_KEY_ID" PGFERRY_S3_SECRET="$S3_SECRET" BENCH_PG_PASSWORD="$PG_PASSWORD"
export PGPASSWORD="$PG_PASSWORD"

{
    cat <<TOML
[[source]]
name = "bench"
url = "postgres://postgres:\${BENCH_PG_PASSWORD}@127.0.0.1:$PG_PORT/postgres"
databases = ["bench_*"]
TOML
    s3_target_toml s3 bench-restore
    cat <<TOML
[[restore_target]]
namespace = "bench"
url = "postgres://postgres:\${BENCH_PG_PASSWORD}@127.0.0.1:$PG_PORT/postgres"
owner = "postgres"
[restore]
spool_dir = "$WORK_DIR/spool"
TOML
} > "$WORK_DIR/pgferry.toml"

seed bench_src "$SIZE"
"$PGFERRY" --config "$WORK_DIR/pgferry.toml" --log-format json backup >/dev/null 2>&1
"$PG_BIN/pg_dump" -Fc -Z0 -h 127.0.0.1 -p "$PG_PORT" -U postgres -f "$WORK_DIR/local.dump" bench_src
echo "# pgferry restore benchmark, $(date -u +%FT%TZ), $(nproc) cores, $ROUNDS rounds"
echo "# raw dump $(( $(stat -c %s "$WORK_DIR/local.dump") / 1024 / 1024 )) MiB; load before: $(cut -d' ' -f1-3 /proc/loadavg)"

declare -A TIMES
timed() { # $1 = label, rest = command; records wall seconds
    local label=$1; shift
    /usr/bin/time -o "$WORK_DIR/time.out" -f '%e' "$@" >/dev/null 2>"$WORK_DIR/cmd.err" || {
        echo "FAILED: $label"; cat "$WORK_DIR/cmd.err"; exit 1; }
    TIMES[$label]+="$(tail -n 1 "$WORK_DIR/time.out") "
}
fresh() { psql_ -d postgres -c "DROP DATABASE IF EXISTS $1" -c "CREATE DATABASE $1"; }
for r in $(seq 1 "$ROUNDS"); do
    fresh restored_local
    timed "pg_restore local file" "$PG_BIN/pg_restore" --no-owner --exit-on-error -h 127.0.0.1 -p "$PG_PORT" -U postgres -d restored_local "$WORK_DIR/local.dump"
    fresh restored_local_j2
    timed "pg_restore -j 2 local file" "$PG_BIN/pg_restore" --no-owner --exit-on-error -j 2 -h 127.0.0.1 -p "$PG_PORT" -U postgres -d restored_local_j2 "$WORK_DIR/local.dump"
    # Like the baselines, into a database that does not exist yet (replacing one would add
    # its DROP DATABASE, and the checkpoint that forces, to pgferry's time only).
    psql_ -d postgres -c "DROP DATABASE IF EXISTS restored_stream" -c "DROP DATABASE IF EXISTS restored_jobs"
    timed "pgferry restore (stream)" "$PGFERRY" --config "$WORK_DIR/pgferry.toml" --log-format json restore --source bench --database bench_src --to bench --as restored_stream
    timed "pgferry restore --jobs 2" "$PGFERRY" --config "$WORK_DIR/pgferry.toml" --log-format json restore --source bench --database bench_src --to bench --as restored_jobs --jobs 2
done
stats() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END {m=(NR%2)?a[(NR+1)/2]:(a[NR/2]+a[NR/2+1])/2; printf "%.2f %.2f %.2f", m, a[1], a[NR]}'; }
base=$(stats ${TIMES["pg_restore local file"]} | cut -d' ' -f1)
printf '| %-28s | %9s | %13s | %10s |\n' command "median s" "min–max s" "× baseline"
printf '|%s|%s|%s|%s|\n' ------------------------------ ----------- --------------- ------------
for label in "pg_restore local file" "pg_restore -j 2 local file" "pgferry restore (stream)" "pgferry restore --jobs 2"; do
    read -r med min max <<<"$(stats ${TIMES[$label]})"
    printf '| %-28s | %9s | %13s | %10.2f |\n' "$label" "$med" "$min–$max" "$(echo "$med / $base" | bc -l)"
done
echo "# load after: $(cut -d' ' -f1-3 /proc/loadavg)"
