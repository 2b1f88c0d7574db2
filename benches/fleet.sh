#!/usr/bin/env bash
# Fleet-scale listing: whole-fleet `list`, `list --json`, `prune --dry-run` and a daemon's
# snapshot API on a synthetic fleet (benches/fleet_gen.py: real manifests, small real dumps)
# in a directory target, for two pgferry binaries side by side (before/after).
#
#   benches/fleet.sh OLD_BINARY NEW_BINARY [DATABASES] [SNAPSHOTS] [TABLES] [RUNS]
#
# OLD_BINARY `none` measures the new one alone (today's main needs ~6.5 GiB per 100 databases
# for `list --json`: at 300 it would take the machine down).
# Defaults: 100 databases × 80 snapshots × 800 tables, 3 runs. Each operation runs RUNS times
# per binary under /usr/bin/time -v (wall time, peak RSS); the table gives the median. The
# daemon runs: 100 paginated GETs of /api/v1/snapshots (limit 100, cursor chained, restarting
# at the first page at the end) — each page timed with curl — then its VmRSS and VmHWM. A
# binary without pagination (today's main) gets ONE unpaginated GET instead (it reads the
# whole fleet per call). The new binary's first `list` builds the folders' indexes: it is
# reported on its own line ("cold"); the medians are of the runs after it.
# Work dir: $FLEET_DIR (default /tmp/pgferry-fleet-bench); the fleet is reused if it exists
# with the same shape.
set -euo pipefail

OLD=$1
[ "$OLD" = none ] || OLD=$(realpath "$OLD")
NEW=$(realpath "$2")
DBS=${3:-100}
SNAPS=${4:-80}
TABLES=${5:-800}
RUNS=${6:-3}
DIR=${FLEET_DIR:-/tmp/pgferry-fleet-bench}
HERE=$(cd "$(dirname "$0")" && pwd)
PORT=${FLEET_PORT:-19287}

mkdir -p "$DIR"
SHAPE="$DBS x $SNAPS x $TABLES"
if [ "$(cat "$DIR/shape" 2>/dev/null)" != "$SHAPE" ]; then
    rm -rf "$DIR/store"
    echo "generating $SHAPE in $DIR/store ..." >&2
    python3 "$HERE/fleet_gen.py" "$DIR/store" "$DBS" "$SNAPS" "$TABLES"
    echo "$SHAPE" > "$DIR/shape"
fi
# Start each comparison without indexes (the new binary builds them on its first run).
find "$DIR/store" -name pgferry-index.json -delete

cat > "$DIR/pgferry.toml" <<EOF
[daemon]
listen = "127.0.0.1:$PORT"
api_token_file = "$DIR/no-token"

[[source]]
name = "prod"
url = "postgres://pgferry@127.0.0.1:1/postgres"
schedule = "0 0 1 1 *"
retention = { keep_last = 3, hourly = 48, daily = 14, weekly = 8, monthly = 12 }

[[target]]
name = "local"
url = "file://$DIR/store"
EOF

manifest_mb=$(find "$DIR/store" -name '*.manifest.json' -printf '%s\n' | awk '{s+=$1} END {printf "%.0f\n", s/1000000}')
echo "fleet: $SHAPE, $(find "$DIR/store" -name '*.manifest.json' | wc -l) manifests, $manifest_mb MB of manifests" >&2

# Runs one operation under /usr/bin/time -v; prints "seconds MiB".
measure() {
    /usr/bin/time -v "$@" >/dev/null 2>"$DIR/time.txt" || true
    awk '/Elapsed \(wall clock\)/ {n=split($NF,a,":"); s=(n==3)?a[1]*3600+a[2]*60+a[3]:a[1]*60+a[2]}
         /Maximum resident set size/ {kb=$NF}
         END {printf "%.2f %.0f\n", s, kb/1024}' "$DIR/time.txt"
}

median() { sort -n | awk '{v[NR]=$1} END {print v[int((NR+1)/2)]}'; }

# One operation, RUNS times: "median_seconds median_MiB".
runs() {
    local secs=() mibs=() r
    for _ in $(seq "$RUNS"); do
        r=$(measure "$@")
        secs+=("${r% *}")
        mibs+=("${r#* }")
    done
    echo "$(printf '%s\n' "${secs[@]}" | median) $(printf '%s\n' "${mibs[@]}" | median)"
}

daemon_pages() {
    local bin=$1 paged=$2 pid times=() t cursor="" i code
    "$bin" --config "$DIR/pgferry.toml" daemon >"$DIR/daemon.log" 2>&1 &
    pid=$!
    for _ in $(seq 600); do
        curl -sf "localhost:$PORT/healthz" >/dev/null && break
        sleep 0.1
    done
    # Let the start-up catalog refresh finish (it runs once at start) before measuring.
    sleep 5
    if [ "$paged" = yes ]; then
        for i in $(seq 100); do
            t=$(curl -s -o "$DIR/page.json" -w '%{time_total}' \
                "localhost:$PORT/api/v1/snapshots?limit=100${cursor:+&cursor=$cursor}")
            times+=("$t")
            cursor=$(jq -r '.next_cursor // empty' "$DIR/page.json")
        done
    else
        t=$(curl -s -o "$DIR/page.json" -w '%{time_total}' "localhost:$PORT/api/v1/snapshots")
        times+=("$t")
    fi
    local rss hwm
    rss=$(awk '/VmRSS/ {print int($2/1024)}' "/proc/$pid/status")
    hwm=$(awk '/VmHWM/ {print int($2/1024)}' "/proc/$pid/status")
    kill "$pid"
    wait "$pid" 2>/dev/null || true
    echo "${#times[@]} $(printf '%s\n' "${times[@]}" | median) $(printf '%s\n' "${times[@]}" | sort -n | tail -1) $rss $hwm"
}

# Whether a binary serves paginated snapshots (it knows the `next_cursor` field).
paged() { grep -q "next_cursor" <(strings "$1") && echo yes || echo no; }

row() { printf '| %s | %s | %s | %s |\n' "$1" "$2" "$3" "$4"; }

echo "| operation | binary | seconds (median of $RUNS) | peak RSS MiB (median) |"
echo "|---|---|---|---|"
whiches="old new"
[ "$OLD" = none ] && whiches=new
for which in $whiches; do
    bin=$OLD
    [ "$which" = new ] && bin=$NEW
    if [ "$which" = new ]; then
        r=$(measure "$bin" --config "$DIR/pgferry.toml" list)
        row "\`list\` (cold: builds the indexes)" "$which" "${r% *}" "${r#* }"
    fi
    r=$(runs "$bin" --config "$DIR/pgferry.toml" list)
    row "\`list\`" "$which" "${r% *}" "${r#* }"
    r=$(runs "$bin" --config "$DIR/pgferry.toml" list --json)
    row "\`list --json\`" "$which" "${r% *}" "${r#* }"
    r=$(runs "$bin" --config "$DIR/pgferry.toml" prune --dry-run)
    row "\`prune --dry-run\`" "$which" "${r% *}" "${r#* }"
    p=$(paged "$bin")
    read -r calls med max rss hwm < <(daemon_pages "$bin" "$p")
    row "daemon: $calls GET /api/v1/snapshots ($([ "$p" = yes ] && echo 'limit=100, cursor chained' || echo 'whole catalog, no pagination')): page median / max s" "$which" "$med / $max" "RSS after $rss, peak $hwm"
done
