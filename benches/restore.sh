#!/usr/bin/env bash
# End-to-end restore benchmark (run by hand, never in CI): one ~$SIZE GB database backed up
# once by pgferry to a local Garage bucket, then, alternating round by round:
#   baseline          pg_restore from a local uncompressed custom-format file
#   baseline -j 2     pg_restore -j 2 from that file (what parallel restore can gain here)
#   pgferry stream    pgferry restore (download → sha256 → zstd -d → pg_restore)
#   pgferry --jobs 2  pgferry restore --jobs 2 (spool, verify, pg_restore -j 2)
#   pgferry, again    the same plain snapshot, from a second bucket (same bytes): what two
#                     identical restores differ by here, the machine's noise
#   pgferry, age      pgferry restore of the same database backed up with [encryption] (age,
#                     two recipients) to a third bucket (download → sha256 → age -d → zstd -d
#                     → pg_restore)
# The three stream restores run in a rotated order (round 1: plain, again, age; round 2:
# again, age, plain; round 3: age, plain, again; …), each into the database of its position,
# so every kind takes every position equally often over a multiple of 3 rounds (the position
# matters here: in one run the third restore of a round took 24% longer than the first,
# whatever it restored).
# Reports the median (min–max) wall time and the ratio to the baseline, the CPU seconds
# (user+sys of the command and its children: pgferry and pg_restore, not the PostgreSQL
# backend) and peak RSS of each, and the encrypted/plain ratios of wall time, CPU and peak RSS
# (as benches/backup.sh's), and again/plain (the noise). ENCRYPTION_ONLY=1 measures only the
# three pgferry stream restores.
# Every restore goes into a second cluster on DEST_PORT (the source's is refused by the guard).
# Usage: benches/restore.sh [rounds]   (env: SIZE=2, WORK_DIR, ENCRYPTION_ONLY=1,
#        SKIP_SETUP=1: do not run scripts/setup.sh, everything is installed)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
ROUNDS="${1:-6}"
SIZE="${SIZE:-2}"
WORK_DIR="${WORK_DIR:-/var/tmp/pgferry-bench-restore}"
PG_PORT="${PG_PORT:-54349}"
DEST_PORT="${DEST_PORT:-54350}"
S3_PORT="${S3_PORT:-39200}"
export PGFERRY_TOOLS="${PGFERRY_TOOLS:-/opt/pgferry-tools}"

[ -n "${SKIP_SETUP:-}" ] || scripts/setup.sh >/dev/null
command -v /usr/bin/time >/dev/null || { apt-get install -y -qq time >/dev/null; }
command -v bc >/dev/null || { apt-get install -y -qq bc >/dev/null; }
cargo build --release --locked 2>/dev/null
PGFERRY="$ROOT/target/release/pgferry"
# shellcheck source=scripts/lib.sh
source scripts/lib.sh
trap stop_servers EXIT
start_servers bench-restore bench-restore-again bench-restore-age
# Every restore goes to a second cluster, as in production (restoring into the server a
# snapshot was taken from is what the identity guard refuses).
start_pg pg-dest "$DEST_PORT"
export PGFERRY_S3_KEY_ID="$S3_KEY_ID" PGFERRY_S3_SECRET="$S3_SECRET" BENCH_PG_PASSWORD="$PG_PASSWORD"
export PGPASSWORD="$PG_PASSWORD"

config() { # $1 = bucket
    cat <<TOML
[[source]]
name = "bench"
url = "postgres://postgres:\${BENCH_PG_PASSWORD}@127.0.0.1:$PG_PORT/postgres"
databases = ["bench_*"]
TOML
    s3_target_toml s3 "$1"
    cat <<TOML
[[restore_target]]
namespace = "bench"
url = "postgres://postgres:\${BENCH_PG_PASSWORD}@127.0.0.1:$DEST_PORT/postgres"
owner = "postgres"
[restore]
spool_dir = "$WORK_DIR/spool"
TOML
}
config bench-restore > "$WORK_DIR/pgferry.toml"
config bench-restore-again > "$WORK_DIR/pgferry-again.toml"
# One backup writes the plain snapshot to both plain buckets.
{ config bench-restore; s3_target_toml again bench-restore-again; } > "$WORK_DIR/pgferry-both.toml"
# The encrypted copy: two recipients (as backup.sh), restored with the first one's identity.
for k in 1 2; do age-keygen -o "$WORK_DIR/age-$k.txt" 2>/dev/null; done
{ config bench-restore-age
  printf '[encryption]\nrecipients = ["%s", "%s"]\nidentity_file = "%s"\n' "$(age-keygen -y "$WORK_DIR/age-1.txt")" \
      "$(age-keygen -y "$WORK_DIR/age-2.txt")" "$WORK_DIR/age-1.txt"
} > "$WORK_DIR/pgferry-age.toml"

seed bench_src "$SIZE"
"$PGFERRY" --config "$WORK_DIR/pgferry-both.toml" --log-format json backup >/dev/null 2>&1
"$PGFERRY" --config "$WORK_DIR/pgferry-age.toml" --log-format json backup >/dev/null 2>&1
raw_mib() { # the raw dump size of the last backup, from its manifest
    local bytes
    bytes=$("$PGFERRY" --config "$WORK_DIR/pgferry.toml" list --json --database bench_src 2>/dev/null | grep -o '"raw_size":[0-9]*' | head -n 1 | cut -d: -f2)
    [ -z "$bytes" ] || echo "raw dump $(( bytes / 1024 / 1024 )) MiB"
}
[ -n "${ENCRYPTION_ONLY:-}" ] || "$PG_BIN/pg_dump" -Fc -Z0 -h 127.0.0.1 -p "$PG_PORT" -U postgres -f "$WORK_DIR/local.dump" bench_src
echo "# pgferry restore benchmark, $(date -u +%FT%TZ), $(nproc) cores, $ROUNDS rounds, $(git rev-parse --short HEAD)${ENCRYPTION_ONLY:+, encryption only}"
if [ -f "$WORK_DIR/local.dump" ]; then raw="raw dump $(( $(stat -c %s "$WORK_DIR/local.dump") / 1024 / 1024 )) MiB"; else raw="$(raw_mib)"; fi
echo "# $raw; load before: $(cut -d' ' -f1-3 /proc/loadavg)"

declare -A TIMES RSS CPU
timed() { # $1 = label, rest = command; records wall s, max RSS KiB, CPU s (user+sys)
    local label=$1; shift
    /usr/bin/time -o "$WORK_DIR/time.out" -f '%e %M %U %S' "$@" >/dev/null 2>"$WORK_DIR/cmd.err" || {
        echo "FAILED: $label"; cat "$WORK_DIR/cmd.err"; exit 1; }
    read -r wall rss user sys <<<"$(tail -n 1 "$WORK_DIR/time.out")"
    TIMES[$label]+="$wall "
    RSS[$label]+="$rss "
    CPU[$label]+="$(echo "$user + $sys" | bc -l) "
}
dest_psql() { PG_PORT="$DEST_PORT" psql_ -d postgres "$@"; }
fresh() { dest_psql -c "DROP DATABASE IF EXISTS $1" -c "CREATE DATABASE $1"; }
restore_stream() { # $1 = plain|again|age, $2 = position: the stream restore of that copy, into a database that does not exist yet
    local label="pgferry restore (stream)" config="$WORK_DIR/pgferry.toml"
    case $1 in
        again) label="pgferry restore (stream), again"; config="$WORK_DIR/pgferry-again.toml" ;;
        age) label="pgferry restore (stream), age"; config="$WORK_DIR/pgferry-age.toml" ;;
    esac
    dest_psql -c "DROP DATABASE IF EXISTS restored_$2"
    timed "$label" env PGFERRY_LOG=info,pgferry::restore::load=debug "$PGFERRY" --config "$config" --log-format json restore --source bench --database bench_src --to bench --as "restored_$2"
    # Where the time went: snapshot chosen → loaded (download, decode, pg_restore) → swapped in.
    python3 - "$WORK_DIR/cmd.err" "$1" >> "$WORK_DIR/phases.txt" <<'PY'
import json, sys
from datetime import datetime
t = {}
pump = {}
for line in open(sys.argv[1]):
    try:
        e = json.loads(line)
    except ValueError:
        continue
    if e.get("message") == "Decoded stream copied.":
        pump = e
    t.setdefault(e.get("message"), datetime.fromisoformat(e["timestamp"].replace("Z", "+00:00")[:26] + "+00:00"))
c, l, s = (t.get(m) for m in ("Snapshot chosen.", "Snapshot loaded into the temporary database.", "Restore swapped in."))
if c and l and s:
    print(f"{sys.argv[2]} load {(l - c).total_seconds():.2f} after {(s - l).total_seconds():.2f} waiting for input {float(pump.get('waiting_for_input_seconds', 'nan')):.2f} for pg_restore {float(pump.get('waiting_for_output_seconds', 'nan')):.2f}")
PY
}
for r in $(seq 1 "$ROUNDS"); do
    if [ -z "${ENCRYPTION_ONLY:-}" ]; then
        fresh restored_local
        timed "pg_restore local file" "$PG_BIN/pg_restore" --no-owner --exit-on-error -h 127.0.0.1 -p "$DEST_PORT" -U postgres -d restored_local "$WORK_DIR/local.dump"
        fresh restored_local_j2
        timed "pg_restore -j 2 local file" "$PG_BIN/pg_restore" --no-owner --exit-on-error -j 2 -h 127.0.0.1 -p "$DEST_PORT" -U postgres -d restored_local_j2 "$WORK_DIR/local.dump"
    fi
    # Like the baselines, into a database that does not exist yet (replacing one would add
    # its DROP DATABASE, and the checkpoint that forces, to pgferry's time only).
    case $(( r % 3 )) in 1) order="plain again age" ;; 2) order="again age plain" ;; 0) order="age plain again" ;; esac
    pos=0
    for kind in $order; do pos=$((pos + 1)); restore_stream "$kind" "p$pos"; done
    if [ -z "${ENCRYPTION_ONLY:-}" ]; then
        dest_psql -c "DROP DATABASE IF EXISTS restored_jobs"
        timed "pgferry restore --jobs 2" "$PGFERRY" --config "$WORK_DIR/pgferry.toml" --log-format json restore --source bench --database bench_src --to bench --as restored_jobs --jobs 2
    fi
done
stats() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END {m=(NR%2)?a[(NR+1)/2]:(a[NR/2]+a[NR/2+1])/2; printf "%.2f %.2f %.2f", m, a[1], a[NR]}'; }
base_label="pg_restore local file"; [ -z "${ENCRYPTION_ONLY:-}" ] || base_label="pgferry restore (stream)"
base=$(stats ${TIMES[$base_label]} | cut -d' ' -f1)
printf '| %-30s | %9s | %13s | %10s | %7s | %12s |\n' command "median s" "min–max s" "× baseline" "CPU s" "peak RSS MiB"
printf '|%s|%s|%s|%s|%s|%s|\n' -------------------------------- ----------- --------------- ------------ --------- --------------
for label in "pg_restore local file" "pg_restore -j 2 local file" "pgferry restore (stream)" "pgferry restore (stream), again" "pgferry restore (stream), age" "pgferry restore --jobs 2"; do
    [ -n "${TIMES[$label]:-}" ] || continue
    read -r med min max <<<"$(stats ${TIMES[$label]})"
    printf '| %-30s | %9s | %13s | %10.2f | %7s | %12s |\n' "$label" "$med" "$min–$max" "$(echo "$med / $base" | bc -l)" \
        "$(stats ${CPU[$label]} | cut -d' ' -f1)" "$(stats ${RSS[$label]} | awk '{printf "%.0f", $3 / 1024}')"
done
echo "(× baseline: to ${base_label}. CPU s: user+sys of the command and its children (pg_restore),"
echo " medians; not the PostgreSQL backend's. Peak RSS: max over rounds.)"
plain="pgferry restore (stream)"; enc="pgferry restore (stream), age"; again="pgferry restore (stream), again"
ratio() { echo "$(stats ${TIMES[$1]} | cut -d' ' -f1) / $(stats ${TIMES[$2]} | cut -d' ' -f1)" | bc -l; }
printf 'restore, again/plain (same bytes: the noise): wall %.3f (rounds: again wall %s)\n' "$(ratio "$again" "$plain")" "${TIMES[$again]}"
printf 'restore, age/plain: wall %.3f, CPU %.3f, peak RSS %.3f (rounds: plain wall %s; age wall %s; plain CPU %s; age CPU %s)\n' \
    "$(echo "$(stats ${TIMES[$enc]} | cut -d' ' -f1) / $(stats ${TIMES[$plain]} | cut -d' ' -f1)" | bc -l)" \
    "$(echo "$(stats ${CPU[$enc]} | cut -d' ' -f1) / $(stats ${CPU[$plain]} | cut -d' ' -f1)" | bc -l)" \
    "$(echo "$(stats ${RSS[$enc]} | cut -d' ' -f3) / $(stats ${RSS[$plain]} | cut -d' ' -f3)" | bc -l)" \
    "${TIMES[$plain]}" "${TIMES[$enc]}" "${CPU[$plain]}" "${CPU[$enc]}"
echo "# phases (s): chosen → loaded, loaded → swapped in, per restore in run order:"
sed 's/^/#   /' "$WORK_DIR/phases.txt" 2>/dev/null || true
echo "# load after: $(cut -d' ' -f1-3 /proc/loadavg)"
