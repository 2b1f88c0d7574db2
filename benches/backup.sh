#!/usr/bin/env bash
# End-to-end backup benchmark (run by hand, never in CI). Builds databases of about
# $SIZES GB of raw dump each (pgbench tables plus text/jsonb/bytea rows, half of the bytea
# random), then measures in one run, alternating the commands round by round:
#   source bound      pg_dump -Fc -Z0 > /dev/null
#   shell peer        pg_dump -Fc -Z0 | zstd -3 -T2 > file
#   pgferry 1/2/3 S3  pgferry backup to 1, 2 and 3 buckets of a local Garage
# and reports the median (min–max) wall time, the ratio to the source bound, and pgferry's
# peak RSS. Usage: benches/backup.sh [rounds]   (env: SIZES="1 3", WORK_DIR, ZSTD_LEVEL)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
ROUNDS="${1:-3}"
SIZES="${SIZES:-1 3}"
ZSTD_LEVEL="${ZSTD_LEVEL:-3}"
WORK_DIR="${WORK_DIR:-/var/tmp/pgferry-bench}"
PG_PORT="${PG_PORT:-54339}"
S3_PORT="${S3_PORT:-39100}"
export PGFERRY_TOOLS="${PGFERRY_TOOLS:-/opt/pgferry-tools}"

scripts/setup.sh >/dev/null
command -v /usr/bin/time >/dev/null || { apt-get install -y -qq time >/dev/null; }
cargo build --release --locked 2>/dev/null
PGFERRY="$ROOT/target/release/pgferry"
# shellcheck source=scripts/lib.sh
source scripts/lib.sh
trap stop_servers EXIT
start_servers bench-1 bench-2 bench-3
export PGFERRY_S3_KEY_ID="$S3_KEY_ID" PGFERRY_S3_SECRET="$S3_SECRET" BENCH_PG_PASSWORD="$PG_PASSWORD"

raw_size() { PGPASSWORD="$PG_PASSWORD" "$PG_BIN/pg_dump" -Fc -Z0 -h 127.0.0.1 -p "$PG_PORT" -U postgres "$1" | wc -c; }

config() { # $1 = number of targets
    {
        cat <<TOML
[pipeline]
zstd_level = $ZSTD_LEVEL
[[source]]
name = "bench"
url = "postgres://postgres:\${BENCH_PG_PASSWORD}@127.0.0.1:$PG_PORT/postgres"
TOML
        for i in $(seq 1 "$1"); do s3_target_toml "s3-$i" "bench-$i"; done
    } > "$WORK_DIR/pgferry-$1.toml"
}
config 1; config 2; config 3

declare -A TIMES RSS
measure() { # $1 = label, rest = command; records wall seconds (and max RSS KiB)
    local label=$1; shift
    local out
    /usr/bin/time -o "$WORK_DIR/time.out" -f '%e %M' "$@" >/dev/null 2>"$WORK_DIR/cmd.err" || {
        echo "FAILED: $label"; cat "$WORK_DIR/cmd.err"; exit 1; }
    out=$(tail -n 1 "$WORK_DIR/time.out")
    TIMES[$label]+="${out% *} "
    RSS[$label]+="${out#* } "
}

stats() { # median min max of the numbers given
    printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END {m=(NR%2)?a[(NR+1)/2]:(a[NR/2]+a[NR/2+1])/2; printf "%.2f %.2f %.2f", m, a[1], a[NR]}'
}

echo "# pgferry backup benchmark, $(date -u +%FT%TZ), $(nproc) cores, zstd level $ZSTD_LEVEL, $ROUNDS rounds"
echo "# load before: $(cut -d' ' -f1-3 /proc/loadavg)"
for gb in $SIZES; do
    db="bench_${gb}g"
    seed "$db" "$gb"
    raw=$(raw_size "$db")
    echo
    echo "## database $db: raw dump $((raw / 1024 / 1024)) MiB"
    for r in $(seq 1 "$ROUNDS"); do
        measure "pg_dump -Z0 > /dev/null" env PGPASSWORD="$PG_PASSWORD" "$PG_BIN/pg_dump" -Fc -Z0 --no-sync -h 127.0.0.1 -p "$PG_PORT" -U postgres -f /dev/null "$db"
        measure "pg_dump -Z0 | zstd -$ZSTD_LEVEL -T2 > file" bash -c "PGPASSWORD='$PG_PASSWORD' '$PG_BIN/pg_dump' -Fc -Z0 -h 127.0.0.1 -p $PG_PORT -U postgres '$db' | zstd -q -$ZSTD_LEVEL -T2 -o '$WORK_DIR/peer.zst' -f"
        for n in 1 2 3; do
            measure "pgferry backup, $n S3 target(s)" "$PGFERRY" --config "$WORK_DIR/pgferry-$n.toml" --log-format json backup --database "$db"
        done
        rm -f "$WORK_DIR/peer.zst"
    done
    base=$(stats ${TIMES["pg_dump -Z0 > /dev/null"]} | cut -d' ' -f1)
    printf '| %-40s | %9s | %13s | %8s | %12s |\n' command "median s" "min–max s" "× bound" "peak RSS MiB"
    printf '|%s|%s|%s|%s|%s|\n' ------------------------------------------ ----------- --------------- ---------- --------------
    for label in "pg_dump -Z0 > /dev/null" "pg_dump -Z0 | zstd -$ZSTD_LEVEL -T2 > file" "pgferry backup, 1 S3 target(s)" "pgferry backup, 2 S3 target(s)" "pgferry backup, 3 S3 target(s)"; do
        read -r med min max <<<"$(stats ${TIMES[$label]})"
        rss="-"
        if [[ $label == pgferry* ]]; then
            rss=$(stats ${RSS[$label]} | awk '{printf "%.0f", $3 / 1024}')
        fi
        printf '| %-40s | %9s | %13s | %8.2f | %12s |\n' "$label" "$med" "$min–$max" "$(echo "$med / $base" | bc -l)" "$rss"
    done
    unset TIMES RSS; declare -A TIMES RSS
    psql_ -d postgres -c "DROP DATABASE $db"
    garage_ bucket list >/dev/null
done
echo
echo "# load after: $(cut -d' ' -f1-3 /proc/loadavg)"
