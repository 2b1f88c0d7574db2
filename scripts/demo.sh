#!/usr/bin/env bash
# The main job, on one machine: a local PostgreSQL with two seeded client databases, a local
# Garage S3 server with two buckets plus a plain directory as targets, then `pgferry backup`,
# `pgferry list`, and `pgferry daemon` in the foreground (every minute; Ctrl-C stops it
# gracefully). Installs what it needs (scripts/setup.sh). Everything lives in $DEMO_DIR and
# is started fresh on each run; the servers are stopped when the script ends.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"

DEMO_DIR="${DEMO_DIR:-/var/tmp/pgferry-demo}"
PG_PORT="${PG_PORT:-54329}"
S3_PORT="${S3_PORT:-39000}"
LISTEN="${LISTEN:-127.0.0.1:9187}"
export PGFERRY_TOOLS="${PGFERRY_TOOLS:-/opt/pgferry-tools}"

scripts/setup.sh
cargo build --release --locked
PGFERRY="$ROOT/target/release/pgferry"

WORK_DIR="$DEMO_DIR"
# shellcheck source=scripts/lib.sh
source scripts/lib.sh
trap stop_servers EXIT
start_servers demo-a demo-b
psql_ -d postgres -c "CREATE DATABASE acme" -c "CREATE DATABASE globex"
PGPASSWORD="$PG_PASSWORD" "$PG_BIN/pgbench" -q -i -s 5 -h 127.0.0.1 -p "$PG_PORT" -U postgres acme >/dev/null 2>&1
psql_ -d globex -c "CREATE TABLE res_partner (id serial PRIMARY KEY, name text, data jsonb)" \
    -c "INSERT INTO res_partner (name, data) SELECT 'partner ' || g, jsonb_build_object('n', g) FROM generate_series(1, 50000) g"
echo "demo: PostgreSQL on 127.0.0.1:$PG_PORT with databases acme, globex"
echo "demo: Garage S3 on http://127.0.0.1:$S3_PORT with buckets demo-a, demo-b"

# --- pgferry ----------------------------------------------------------------------------
cat > "$DEMO_DIR/pgferry.toml" <<TOML
[daemon]
listen = "$LISTEN"
api_token_file = "api-token"
shutdown_grace = "20s"

[[source]]
name = "local"
url = "postgres://postgres:\${DEMO_PG_PASSWORD}@127.0.0.1:$PG_PORT/postgres"
schedule = "* * * * *"
retention = { keep_last = 5, hourly = 24, daily = 7, weekly = 4, monthly = 3 }

$(s3_target_toml s3-a demo-a)

$(s3_target_toml s3-b demo-b)

[[target]]
name = "dir"
url = "file://$DEMO_DIR/backups"
TOML
randhex 24 > "$DEMO_DIR/api-token"
export DEMO_PG_PASSWORD="$PG_PASSWORD" PGFERRY_S3_KEY_ID="$S3_KEY_ID" PGFERRY_S3_SECRET="$S3_SECRET"
export PGFERRY_CONFIG="$DEMO_DIR/pgferry.toml"

"$PGFERRY" config check >/dev/null
echo "demo: pgferry backup"
"$PGFERRY" --log-format text backup
echo "demo: pgferry list"
"$PGFERRY" list
if "$PGFERRY" daemon --help >/dev/null 2>&1; then
    echo "demo: pgferry daemon on http://$LISTEN (metrics at /metrics); Ctrl-C to stop"
    "$PGFERRY" --log-format text daemon
fi
