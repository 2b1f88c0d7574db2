#!/usr/bin/env bash
# End-to-end backup benchmark (run by hand, never in CI). Builds databases of about
# $SIZES GB of raw dump each (pgbench tables plus text/jsonb/bytea rows, half of the bytea
# random), then measures in one run, alternating the commands round by round:
#   source bound      pg_dump -Fc -Z0 > /dev/null
#   pg_dump's gzip    pg_dump -Fc > file                         (what most backup scripts run)
#   shell peer        pg_dump -Fc -Z0 | zstd -L -T2 | aws s3 cp - s3://…   (awscli from PyPI)
#   pgferry 1/2/3 S3  pgferry backup to 1, 2 and 3 buckets of a local Garage, at each level
# and reports the median (min–max) wall time, the ratio to the source bound, the CPU seconds
# of the command and of the S3 server, pgferry's peak RSS, and the stored size per level. For $RSS_SIZES GB (a bigger
# database) it measures only the source bound and pgferry to 2 targets, for the memory figure.
# Encryption: each round also runs pgferry to 2 targets with [encryption] (age, two
# recipients) right after the same run without it, for the encrypted/plain ratios of wall
# time, CPU and peak RSS. ENCRYPTION_ONLY=1 measures only those two and the source bound.
# Usage: benches/backup.sh [rounds]
#   env: SIZES="2", RSS_SIZES="6", LEVELS="1 3", WORK_DIR, SKIP_GZIP=1, ENCRYPTION_ONLY=1,
#        MAX_PARTS="10000 1000 100" (the memory runs: 2 targets with each max_parts; 100 sizes
#        parts as a 60 GB database would at 1000), SKIP_SETUP=1 (do not run scripts/setup.sh:
#        everything is installed)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
ROUNDS="${1:-3}"
SIZES="${SIZES-2}"
RSS_SIZES="${RSS_SIZES-6}"
MAX_PARTS="${MAX_PARTS-10000 1000 100}"
LEVELS="${LEVELS:-1 3}"
WORK_DIR="${WORK_DIR:-/var/tmp/pgferry-bench}"
PG_PORT="${PG_PORT:-54339}"
S3_PORT="${S3_PORT:-39100}"
export PGFERRY_TOOLS="${PGFERRY_TOOLS:-/opt/pgferry-tools}"
AWSCLI_VERSION=1.46.3

[ -n "${SKIP_SETUP:-}" ] || scripts/setup.sh >/dev/null
command -v /usr/bin/time >/dev/null || { apt-get install -y -qq time >/dev/null; }
command -v bc >/dev/null || { apt-get install -y -qq bc >/dev/null; }
AWS="$PGFERRY_TOOLS/awscli/bin/aws"
if ! "$AWS" --version 2>/dev/null | grep -q "aws-cli/$AWSCLI_VERSION"; then
    python3 -m venv "$PGFERRY_TOOLS/awscli"
    "$PGFERRY_TOOLS/awscli/bin/pip" install -q "awscli==$AWSCLI_VERSION"
fi
cargo build --release --locked 2>/dev/null
PGFERRY="$ROOT/target/release/pgferry"
# shellcheck source=scripts/lib.sh
source scripts/lib.sh
trap stop_servers EXIT
start_servers bench-1 bench-2 bench-3
export PGFERRY_S3_KEY_ID="$S3_KEY_ID" PGFERRY_S3_SECRET="$S3_SECRET" BENCH_PG_PASSWORD="$PG_PASSWORD"
export AWS_ACCESS_KEY_ID="$S3_KEY_ID" AWS_SECRET_ACCESS_KEY="$S3_SECRET" AWS_DEFAULT_REGION=garage
export AWS_CONFIG_FILE="$WORK_DIR/aws-config"
printf '[default]\ns3 =\n    addressing_style = path\n' > "$AWS_CONFIG_FILE"

raw_size() { PGPASSWORD="$PG_PASSWORD" "$PG_BIN/pg_dump" -Fc -Z0 -h 127.0.0.1 -p "$PG_PORT" -U postgres "$1" | wc -c; }

config() { # $1 = number of targets, $2 = zstd level
    {
        cat <<TOML
[pipeline]
zstd_level = $2
[[source]]
name = "bench"
url = "postgres://postgres:\${BENCH_PG_PASSWORD}@127.0.0.1:$PG_PORT/postgres"
TOML
        for i in $(seq 1 "$1"); do s3_target_toml "s3-$i" "bench-$i"; done
    } > "$WORK_DIR/pgferry-$1-$2.toml"
}
for level in $LEVELS; do for n in 1 2 3; do config "$n" "$level"; done; done
config_parts() { # $1 = max_parts, $2 = zstd level: 2 targets, each allowing $1 parts
    sed "s/^\(url = \"s3:.*\)$/\1\nmax_parts = $1/" "$WORK_DIR/pgferry-2-$2.toml" > "$WORK_DIR/pgferry-2-$2-mp$1.toml"
}
for level in $LEVELS; do for mp in $MAX_PARTS; do config_parts "$mp" "$level"; done; done
# Two recipients (as production would have: ops and an offline key); the keys stay in WORK_DIR.
for k in 1 2; do [ -s "$WORK_DIR/age-$k.txt" ] || age-keygen -o "$WORK_DIR/age-$k.txt" 2>/dev/null; done
config_age() { # $1 = zstd level: 2 targets, encrypted
    { cat "$WORK_DIR/pgferry-2-$1.toml"
      printf '[encryption]\nrecipients = ["%s", "%s"]\n' "$(age-keygen -y "$WORK_DIR/age-1.txt")" "$(age-keygen -y "$WORK_DIR/age-2.txt")"
    } > "$WORK_DIR/pgferry-2-$1-age.toml"
}
for level in $LEVELS; do config_age "$level"; done

TICKS=$(getconf CLK_TCK)
garage_cpu() { # CPU seconds (user+sys) the S3 server has used so far
    awk -v t="$TICKS" '{print ($14 + $15) / t}' "/proc/$(cat "$WORK_DIR/garage.pid")/stat"
}

declare -A TIMES RSS CPU S3CPU STORED
measure() { # $1 = label, rest = command; records wall s, max RSS KiB, CPU s, S3 server CPU s
    local label=$1; shift
    local s3_before
    s3_before=$(garage_cpu)
    /usr/bin/time -o "$WORK_DIR/time.out" -f '%e %M %U %S' "$@" >"$WORK_DIR/cmd.out" 2>"$WORK_DIR/cmd.err" || {
        echo "FAILED: $label"; cat "$WORK_DIR/cmd.err"; exit 1; }
    read -r wall rss user sys <<<"$(tail -n 1 "$WORK_DIR/time.out")"
    TIMES[$label]+="$wall "
    RSS[$label]+="$rss "
    CPU[$label]+="$(echo "$user + $sys" | bc -l) "
    S3CPU[$label]+="$(echo "$(garage_cpu) - $s3_before" | bc -l) "
}

stats() { # median min max of the numbers given
    printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END {m=(NR%2)?a[(NR+1)/2]:(a[NR/2]+a[NR/2+1])/2; printf "%.2f %.2f %.2f", m, a[1], a[NR]}'
}

pgferry_backup() { # $1 = targets, $2 = level, $3 = database
    measure "pgferry backup, zstd -$2, $1 S3 target(s)" "$PGFERRY" --config "$WORK_DIR/pgferry-$1-$2.toml" --log-format json backup --force --database "$3"
    STORED[$2]=$(grep -o 'stored [0-9.]* [KMG]iB' "$WORK_DIR/cmd.out" | head -n 1)
}

pgferry_backup_age() { # $1 = level, $2 = database: 2 targets, encrypted
    measure "pgferry backup, zstd -$1, 2 S3 targets, age" "$PGFERRY" --config "$WORK_DIR/pgferry-2-$1-age.toml" --log-format json backup --force --database "$2"
}

encryption_ratios() { # per level: encrypted / plain medians of wall, CPU and peak RSS
    local plain enc
    for level in $LEVELS; do
        plain="pgferry backup, zstd -$level, 2 S3 target(s)"; enc="pgferry backup, zstd -$level, 2 S3 targets, age"
        [ -n "${TIMES[$enc]:-}" ] || continue
        printf 'zstd -%s, age/plain: wall %.3f, CPU %.3f, peak RSS %.3f (rounds: plain wall %s; age wall %s)\n' "$level" \
            "$(echo "$(stats ${TIMES[$enc]} | cut -d' ' -f1) / $(stats ${TIMES[$plain]} | cut -d' ' -f1)" | bc -l)" \
            "$(echo "$(stats ${CPU[$enc]} | cut -d' ' -f1) / $(stats ${CPU[$plain]} | cut -d' ' -f1)" | bc -l)" \
            "$(echo "$(stats ${RSS[$enc]} | cut -d' ' -f3) / $(stats ${RSS[$plain]} | cut -d' ' -f3)" | bc -l)" \
            "${TIMES[$plain]}" "${TIMES[$enc]}"
    done
}

table() { # the labels to print, in order
    local base label med min max rss cpu s3cpu
    base=$(stats ${TIMES["pg_dump -Z0 > /dev/null"]} | cut -d' ' -f1)
    printf '| %-44s | %9s | %13s | %8s | %7s | %7s | %8s |\n' command "median s" "min–max s" "× bound" "CPU s" "S3 CPU s" "peak RSS MiB"
    printf '|%s|%s|%s|%s|%s|%s|%s|\n' ---------------------------------------------- ----------- --------------- ---------- --------- --------- ----------
    for label in "$@"; do
        [ -n "${TIMES[$label]:-}" ] || continue
        read -r med min max <<<"$(stats ${TIMES[$label]})"
        cpu=$(stats ${CPU[$label]} | cut -d' ' -f1)
        s3cpu=$(stats ${S3CPU[$label]} | cut -d' ' -f1)
        rss="-"
        if [[ $label == pgferry* ]]; then
            rss=$(stats ${RSS[$label]} | awk '{printf "%.0f", $3 / 1024}')
        fi
        printf '| %-44s | %9s | %13s | %8.2f | %7s | %7s | %8s |\n' "$label" "$med" "$min–$max" "$(echo "$med / $base" | bc -l)" "$cpu" "$s3cpu" "$rss"
    done
    echo "(CPU s: user+sys of the command and its children — pg_dump, zstd, aws — medians; not the"
    echo " PostgreSQL backend's. S3 CPU s: what Garage used meanwhile. Peak RSS: max over rounds.)"
}

PEER_LEVELS="3"; [[ " $LEVELS " == *" 1 "* ]] && PEER_LEVELS="1 3"
echo "# pgferry backup benchmark, $(date -u +%FT%TZ), $(nproc) cores, levels $LEVELS, $ROUNDS rounds, $(git rev-parse --short HEAD)"
echo "# load before: $(cut -d' ' -f1-3 /proc/loadavg)"
for gb in $SIZES; do
    db="bench_${gb}g"
    seed "$db" "$gb"
    raw=$(raw_size "$db")
    echo
    echo "## database $db: raw dump $((raw / 1024 / 1024)) MiB; load before: $(cut -d' ' -f1-3 /proc/loadavg)"
    labels=("pg_dump -Z0 > /dev/null")
    [ -n "${SKIP_GZIP:-}${ENCRYPTION_ONLY:-}" ] || labels+=("pg_dump -Fc (gzip) > file")
    [ -n "${ENCRYPTION_ONLY:-}" ] || for l in $PEER_LEVELS; do labels+=("pg_dump -Z0 | zstd -$l -T2 | aws s3 cp -"); done
    for level in $LEVELS; do for n in 1 2 3; do labels+=("pgferry backup, zstd -$level, $n S3 target(s)"); done; labels+=("pgferry backup, zstd -$level, 2 S3 targets, age"); done
    for r in $(seq 1 "$ROUNDS"); do
        measure "pg_dump -Z0 > /dev/null" env PGPASSWORD="$PG_PASSWORD" "$PG_BIN/pg_dump" -Fc -Z0 --no-sync -h 127.0.0.1 -p "$PG_PORT" -U postgres -f /dev/null "$db"
        if [ -n "${ENCRYPTION_ONLY:-}" ]; then
            # Alternated within the round, plain first in odd rounds and last in even ones.
            for level in $LEVELS; do
                if (( r % 2 )); then pgferry_backup 2 "$level" "$db"; pgferry_backup_age "$level" "$db"
                else pgferry_backup_age "$level" "$db"; pgferry_backup 2 "$level" "$db"; fi
            done
            continue
        fi
        if [ -z "${SKIP_GZIP:-}" ]; then
            measure "pg_dump -Fc (gzip) > file" env PGPASSWORD="$PG_PASSWORD" "$PG_BIN/pg_dump" -Fc --no-sync -h 127.0.0.1 -p "$PG_PORT" -U postgres -f "$WORK_DIR/gzip.dump" "$db"
            GZIP_SIZE=$(stat -c %s "$WORK_DIR/gzip.dump"); rm -f "$WORK_DIR/gzip.dump"
        fi
        for l in $PEER_LEVELS; do
            measure "pg_dump -Z0 | zstd -$l -T2 | aws s3 cp -" bash -c "set -o pipefail; PGPASSWORD='$PG_PASSWORD' '$PG_BIN/pg_dump' -Fc -Z0 -h 127.0.0.1 -p $PG_PORT -U postgres '$db' | zstd -q -$l -T2 -c | '$AWS' --endpoint-url http://127.0.0.1:$S3_PORT s3 cp --only-show-errors - s3://bench-1/peer/$db.dump.zst"
        done
        for level in $LEVELS; do
            for n in 1 2 3; do pgferry_backup "$n" "$level" "$db"; done
            pgferry_backup_age "$level" "$db"
        done
    done
    table "${labels[@]}"
    encryption_ratios
    for level in $LEVELS; do echo "stored at zstd -$level: ${STORED[$level]#stored }"; done
    [ -z "${GZIP_SIZE:-}" ] || echo "stored by pg_dump -Fc (gzip): $(echo "$GZIP_SIZE / 1048576" | bc) MiB"
    unset TIMES RSS CPU S3CPU; declare -A TIMES RSS CPU S3CPU
    psql_ -d postgres -c "DROP DATABASE $db"
done
for gb in $RSS_SIZES; do
    db="bench_${gb}g"
    seed "$db" "$gb"
    raw=$(raw_size "$db")
    echo
    echo "## database $db (memory): raw dump $((raw / 1024 / 1024)) MiB; load before: $(cut -d' ' -f1-3 /proc/loadavg)"
    labels=("pg_dump -Z0 > /dev/null")
    for level in $LEVELS; do for mp in $MAX_PARTS; do labels+=("pgferry backup, zstd -$level, 2 S3 targets, max_parts $mp"); done; done
    measure "pg_dump -Z0 > /dev/null" env PGPASSWORD="$PG_PASSWORD" "$PG_BIN/pg_dump" -Fc -Z0 --no-sync -h 127.0.0.1 -p "$PG_PORT" -U postgres -f /dev/null "$db"
    for level in $LEVELS; do for mp in $MAX_PARTS; do
        measure "pgferry backup, zstd -$level, 2 S3 targets, max_parts $mp" "$PGFERRY" --config "$WORK_DIR/pgferry-2-$level-mp$mp.toml" --log-format json backup --force --database "$db"
    done; done
    table "${labels[@]}"
    unset TIMES RSS CPU S3CPU; declare -A TIMES RSS CPU S3CPU
    psql_ -d postgres -c "DROP DATABASE $db"
done
echo
echo "# load after: $(cut -d' ' -f1-3 /proc/loadavg)"
