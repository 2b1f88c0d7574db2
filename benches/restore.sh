#!/usr/bin/env bash
# End-to-end restore benchmark (run by hand, never in CI). Builds a database of about $GB GB
# of raw dump (same seed as benches/backup.sh), backs it up once to a local Garage bucket,
# then measures in one run, alternating the commands round by round:
#   local bound         pg_restore from a local uncompressed custom-format file
#   pgferry streaming   pgferry restore (S3 → sha256 → zstd -d → pg_restore stdin)
#   pgferry --jobs 2    pgferry restore --jobs 2 (S3 → spool file → pg_restore -j 2)
# Every restore goes into a fresh database of the same server (the source only backs up
# bench_*, so restore's production guard allows restored_*). Reports median (min–max) wall
# time and the ratio to the local bound. Usage: benches/restore.sh [rounds]   (env: GB,
# WORK_DIR, ZSTD_LEVEL, PROFILE=release|debug)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
ROUNDS="${1:-3}"
GB="${GB:-1}"
ZSTD_LEVEL="${ZSTD_LEVEL:-3}"
PROFILE="${PROFILE:-release}"
WORK_DIR="${WORK_DIR:-/var/tmp/pgferry-bench-restore}"
PG_PORT="${PG_PORT:-54349}"
S3_PORT="${S3_PORT:-39200}"
export PGFERRY_TOOLS="${PGFERRY_TOOLS:-/opt/pgferry-tools}"

scripts/setup.sh >/dev/null
command -v /usr/bin/time >/dev/null || { apt-get install -y -qq time >/dev/null; }
if [ "$PROFILE" = release ]; then cargo build --release --locked 2>/dev/null; else cargo build --locked 2>/dev/null; fi
PGFERRY="$ROOT/target/$PROFILE/pgferry"
# shellcheck source=scripts/lib.sh
source scripts/lib.sh
trap stop_servers EXIT
start_servers bench-restore
export PGFERRY_S3_KEY_ID="$S3_KEY_ID" PGFERRY_S3_SECRET="$S3_SECRET" BENCH_PG_PASSWORD="$PG_PASSWORD"

db="bench_${GB}g"
psql_ -d postgres -c "CREATE DATABASE $db"
PGPASSWORD="$PG_PASSWORD" "$PG_BIN/pgbench" -q -i -s $((40 * GB)) -h 127.0.0.1 -p "$PG_PORT" -U postgres "$db" >/dev/null 2>&1
psql_ -d "$db" <<SQL
CREATE TABLE docs (id bigint PRIMARY KEY, body text, meta jsonb, blob bytea);
INSERT INTO docs
SELECT g,
       repeat('Lorem ipsum dolor sit amet, invoice ' || g || ' for partner ' || (g % 977) || '. ', 12),
       jsonb_build_object('partner', g % 977, 'lines', jsonb_build_array(g, g * 2, g * 3), 'state', 'posted', 'note', md5(g::text)),
       decode(repeat(md5((g % 100)::text), 16), 'hex') ||
           decode((SELECT string_agg(md5(random()::text || s), '') FROM generate_series(1, 16) s), 'hex')
FROM generate_series(1, $((110000 * GB))) g;
SQL

cat > "$WORK_DIR/pgferry.toml" <<TOML
[pipeline]
zstd_level = $ZSTD_LEVEL
[[source]]
name = "bench"
url = "postgres://postgres:\${BENCH_PG_PASSWORD}@127.0.0.1:$PG_PORT/postgres"
databases = ["bench_*"]
$(s3_target_toml s3-1 bench-restore)
[[restore_target]]
namespace = "bench"
url = "postgres://postgres:\${BENCH_PG_PASSWORD}@127.0.0.1:$PG_PORT/postgres"
owner = "postgres"
[restore]
spool_dir = "$WORK_DIR/spool"
TOML
"$PGFERRY" --config "$WORK_DIR/pgferry.toml" --log-format json backup --database "$db" 2>/dev/null
PGPASSWORD="$PG_PASSWORD" "$PG_BIN/pg_dump" -Fc -Z0 -h 127.0.0.1 -p "$PG_PORT" -U postgres -f "$WORK_DIR/plain.dump" "$db"
raw=$(stat -c %s "$WORK_DIR/plain.dump")

declare -A TIMES
measure() { # $1 = label, rest = command; records wall seconds
    local label=$1; shift
    /usr/bin/time -o "$WORK_DIR/time.out" -f '%e' "$@" >/dev/null 2>"$WORK_DIR/cmd.err" || {
        echo "FAILED: $label"; cat "$WORK_DIR/cmd.err"; exit 1; }
    TIMES[$label]+="$(tail -n 1 "$WORK_DIR/time.out") "
}
stats() {
    printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END {m=(NR%2)?a[(NR+1)/2]:(a[NR/2]+a[NR/2+1])/2; printf "%.2f %.2f %.2f", m, a[1], a[NR]}'
}

echo "# pgferry restore benchmark, $(date -u +%FT%TZ), $(nproc) cores, $PROFILE build, zstd level $ZSTD_LEVEL, $ROUNDS rounds"
echo "# database $db: raw dump $((raw / 1024 / 1024)) MiB; load before: $(cut -d' ' -f1-3 /proc/loadavg)"
LOCAL="pg_restore local uncompressed file"
STREAM="pgferry restore (streaming)"
JOBS="pgferry restore --jobs 2"
for r in $(seq 1 "$ROUNDS"); do
    psql_ -d postgres -c "SET client_min_messages = warning" -c "DROP DATABASE IF EXISTS restored_local" -c "CREATE DATABASE restored_local"
    measure "$LOCAL" env PGPASSWORD="$PG_PASSWORD" "$PG_BIN/pg_restore" --no-owner --exit-on-error -h 127.0.0.1 -p "$PG_PORT" -U postgres -d restored_local "$WORK_DIR/plain.dump"
    measure "$STREAM" "$PGFERRY" --config "$WORK_DIR/pgferry.toml" --log-format json restore --source bench --database "$db" --to bench --as restored_stream
    measure "$JOBS" "$PGFERRY" --config "$WORK_DIR/pgferry.toml" --log-format json restore --source bench --database "$db" --to bench --as restored_jobs --jobs 2
done
base=$(stats ${TIMES[$LOCAL]} | cut -d' ' -f1)
printf '| %-36s | %9s | %13s | %8s |\n' command "median s" "min–max s" "× local"
printf '|%s|%s|%s|%s|\n' -------------------------------------- ----------- --------------- ----------
for label in "$LOCAL" "$STREAM" "$JOBS"; do
    read -r med min max <<<"$(stats ${TIMES[$label]})"
    printf '| %-36s | %9s | %13s | %8.2f |\n' "$label" "$med" "$min–$max" "$(echo "$med / $base" | bc -l)"
done
echo "# load after: $(cut -d' ' -f1-3 /proc/loadavg)"
