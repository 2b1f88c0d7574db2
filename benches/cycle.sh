#!/usr/bin/env bash
# The hourly cycle at fleet scale, shortened (run by hand, never in CI): N small real databases
# on one PostgreSQL, one `pgferry daemon` with a short schedule and `[[source]] spread`, one
# Garage S3 target (retention keep_last = 2, so each commit also prunes, as in production).
# The daemon is started one second after a slot begins, so that slot runs as a normal one, and
# runs for $SLOTS slots. For each slot it reports how many of the N databases committed a
# snapshot with the slot's id, when their dumps started (offset from the slot's start: the
# spread) and when the last one finished (within the slot or not), and over the whole run the
# daemon's peak RSS (VmHWM) and the largest RSS sampled every second.
# Usage: benches/cycle.sh [N]
#   env: SLOT_SECONDS=300 (the schedule is every SLOT_SECONDS, a divisor of 3600),
#        SPREAD="4m" ("none": no spread, every dump due at the slot's start), MAX_CONCURRENT=2, SLOTS=2, ROWS=2000 (rows of the one table per database),
#        PGFERRY=target/release/pgferry (else target/debug/pgferry), WORK_DIR, PG_PORT, S3_PORT
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
N="${1:-50}"
SLOT_SECONDS="${SLOT_SECONDS:-300}"
SPREAD="${SPREAD:-4m}"
MAX_CONCURRENT="${MAX_CONCURRENT:-2}"
SLOTS="${SLOTS:-2}"
ROWS="${ROWS:-2000}"
WORK_DIR="${WORK_DIR:-/var/tmp/pgferry-cycle}"
PG_PORT="${PG_PORT:-54349}"
S3_PORT="${S3_PORT:-39200}"
HTTP_PORT="${HTTP_PORT:-39287}"
export PGFERRY_TOOLS="${PGFERRY_TOOLS:-/opt/pgferry-tools}"
PGFERRY="${PGFERRY:-$ROOT/target/release/pgferry}"
[ -x "$PGFERRY" ] || PGFERRY="$ROOT/target/debug/pgferry"
[ -x "$PGFERRY" ] || { echo "build pgferry first (cargo build --release)" >&2; exit 2; }
[ $((3600 % SLOT_SECONDS)) -eq 0 ] || { echo "SLOT_SECONDS must divide 3600" >&2; exit 2; }
[ -x "$PGFERRY_TOOLS/bin/garage" ] || { echo "no $PGFERRY_TOOLS/bin/garage: run scripts/setup.sh" >&2; exit 2; }

# shellcheck source=scripts/lib.sh
source scripts/lib.sh
DAEMON_PID=""
cleanup() {
    if [ -n "$DAEMON_PID" ]; then kill "$DAEMON_PID" 2>/dev/null || true; fi
    stop_servers
}
trap cleanup EXIT
start_servers cycle
export PGFERRY_S3_KEY_ID="$S3_KEY_ID" PGFERRY_S3_SECRET="$S3_SECRET" CYCLE_PG_PASSWORD="$PG_PASSWORD"

echo "creating $N databases of $ROWS rows each..."
psql_ -d postgres -c "CREATE DATABASE cycle_template"
psql_ -d cycle_template -c "CREATE TABLE t AS SELECT g AS id, md5(g::text) AS v FROM generate_series(1, $ROWS) g"
for i in $(seq -f "%03g" 1 "$N"); do
    echo "CREATE DATABASE cycle_$i TEMPLATE cycle_template;"
done | psql_ -d postgres

# Every SLOT_SECONDS, as a 6-field cron expression (seconds first).
if [ "$SLOT_SECONDS" -lt 60 ]; then
    SCHEDULE="*/$SLOT_SECONDS * * * * *"
else
    SCHEDULE="0 */$((SLOT_SECONDS / 60)) * * * *"
fi
CONFIG="$WORK_DIR/cycle.toml"
{
    cat <<TOML
[daemon]
listen = "127.0.0.1:$HTTP_PORT"
api_token_file = "$WORK_DIR/no-token"
max_concurrent_backups = $MAX_CONCURRENT

[[source]]
name = "fleet"
url = "postgres://postgres:\${CYCLE_PG_PASSWORD}@127.0.0.1:$PG_PORT/postgres"
databases = ["cycle_*"]
exclude = ["cycle_template"]
schedule = "$SCHEDULE"
$([ "$SPREAD" = none ] || echo "spread = \"$SPREAD\"")
retention = { keep_last = 2, hourly = 0, daily = 0, weekly = 0, monthly = 0 }
TOML
    s3_target_toml s3 cycle
} > "$CONFIG"
"$PGFERRY" --config "$CONFIG" config check >/dev/null

# Start one second into a slot.
now=$(date +%s)
first_slot=$(( (now / SLOT_SECONDS + 1) * SLOT_SECONDS ))
echo "waiting $((first_slot + 1 - now)) s for the slot starting $(date -u -d "@$first_slot" +%H:%M:%S)..."
sleep $((first_slot + 1 - now))
PGFERRY_LOG=info "$PGFERRY" --config "$CONFIG" --log-format json daemon >"$WORK_DIR/daemon.log" 2>&1 &
DAEMON_PID=$!
end=$((first_slot + SLOTS * SLOT_SECONDS))
max_rss=0
while [ "$(date +%s)" -lt "$end" ]; do
    rss=$(awk '/^VmRSS:/ {print $2}' "/proc/$DAEMON_PID/status")
    [ "$rss" -gt "$max_rss" ] && max_rss=$rss
    sleep 1
done
hwm=$(awk '/^VmHWM:/ {print $2}' "/proc/$DAEMON_PID/status")
kill -TERM "$DAEMON_PID"
wait "$DAEMON_PID" || true
DAEMON_PID=""

"$PGFERRY" --config "$CONFIG" list --json > "$WORK_DIR/list.json" 2>/dev/null
skipped=$(grep -c 'previous backup is still running' "$WORK_DIR/daemon.log" || true)
failed=$(grep -c '"level":"ERROR"' "$WORK_DIR/daemon.log" || true)
echo "pgferry: $PGFERRY ($("$PGFERRY" --version))"
echo "databases: $N, schedule \"$SCHEDULE\", spread $SPREAD, max_concurrent_backups $MAX_CONCURRENT"
echo "daemon: peak RSS (VmHWM) $((hwm / 1024)) MiB, largest sampled RSS $((max_rss / 1024)) MiB; skipped runs: $skipped; ERROR lines: $failed"
python3 - "$WORK_DIR/list.json" "$first_slot" "$SLOT_SECONDS" "$SLOTS" "$N" <<'PY'
import json, sys
from datetime import datetime, timezone
path, first, slot_len, slots, n = sys.argv[1], *map(int, sys.argv[2:])
doc = json.loads(open(path).read().strip().splitlines()[-1])
def ts(s):
    return datetime.fromisoformat(s.replace("Z", "+00:00")).timestamp()
for k in range(slots):
    start = first + k * slot_len
    sid = datetime.fromtimestamp(start, timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    ms = [s.get("manifest", s) for s in doc["snapshots"]]
    ms = [m for m in ms if m["snapshot_id"] == sid]
    if not ms:
        print(f"slot {sid}: no snapshot"); continue
    starts = sorted(ts(m["started_at"]) - start for m in ms)
    last = max(ts(m["finished_at"]) for m in ms) - start
    within = len(ms) == n and last < slot_len
    q = lambda f: starts[min(len(starts) - 1, int(f * len(starts)))]
    print(f"slot {sid}: {len(ms)}/{n} committed; dumps started at +{starts[0]:.0f}s..+{starts[-1]:.0f}s "
          f"(quartiles +{q(.25):.0f}/+{q(.5):.0f}/+{q(.75):.0f}s); last finished at +{last:.0f}s of {slot_len}s: "
          f"{'ALL WITHIN THE SLOT' if within else 'NOT all within the slot'}")
PY
