#!/usr/bin/env bash
# Shared by scripts/demo.sh and benches/backup.sh: start a throwaway PostgreSQL cluster and a
# single-node Garage S3 server under a directory, on loopback, and stop them again.
# Source it after setting: WORK_DIR, PG_PORT, S3_PORT, PGFERRY_TOOLS.

PG_BIN="$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)"
GARAGE="$PGFERRY_TOOLS/bin/garage"

as_postgres() {
    if [ "$(id -u)" -eq 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

randhex() { head -c "$1" /dev/urandom | od -An -tx1 | tr -d ' \n'; }

# Stops what a previous start_servers under WORK_DIR left running.
stop_servers() {
    if [ -f "$WORK_DIR/garage.pid" ]; then
        kill "$(cat "$WORK_DIR/garage.pid")" 2>/dev/null || true
        rm -f "$WORK_DIR/garage.pid"
    fi
    local pid
    for pid in "$WORK_DIR"/pg*/postmaster.pid; do
        [ -f "$pid" ] || continue
        as_postgres "$PG_BIN/pg_ctl" -D "$(dirname "$pid")" -m fast stop >/dev/null 2>&1 || true
    done
}

# Starts a PostgreSQL cluster in $WORK_DIR/$1 on port $2, on loopback, superuser postgres with
# password PG_PASSWORD (a second one, e.g. a restore destination, shares the password).
start_pg() {
    local dir="$WORK_DIR/$1" port=$2
    mkdir -p "$dir" "$dir-sock"
    printf '%s\n' "$PG_PASSWORD" > "$dir.pw"
    # The server (run as postgres when we are root) writes its log into WORK_DIR, owned by root.
    touch "$dir.log"
    if [ "$(id -u)" -eq 0 ]; then chown postgres "$dir" "$dir-sock" "$dir.pw" "$dir.log"; fi
    as_postgres "$PG_BIN/initdb" -D "$dir" -U postgres -A scram-sha-256 \
        --pwfile="$dir.pw" -E UTF8 --locale=C.UTF-8 >/dev/null
    rm -f "$dir.pw"
    as_postgres "$PG_BIN/pg_ctl" -D "$dir" -l "$dir.log" -w \
        -o "-p $port -c listen_addresses=127.0.0.1 -c unix_socket_directories=$dir-sock -c shared_buffers=512MB" \
        start >/dev/null
}

# Starts PostgreSQL (superuser postgres, password in PG_PASSWORD) and Garage (key in
# S3_KEY_ID / S3_SECRET, buckets named in $@) under a fresh WORK_DIR.
start_servers() {
    stop_servers
    rm -rf "$WORK_DIR"
    mkdir -p "$WORK_DIR/garage"
    chmod 755 "$WORK_DIR"
    PG_PASSWORD="$(randhex 16)"
    start_pg pg "$PG_PORT"

    S3_KEY_ID="GK$(randhex 12)"
    S3_SECRET="$(randhex 32)"
    cat > "$WORK_DIR/garage/garage.toml" <<TOML
metadata_dir = "$WORK_DIR/garage/meta"
data_dir = "$WORK_DIR/garage/data"
db_engine = "sqlite"
replication_factor = 1
rpc_bind_addr = "127.0.0.1:$((S3_PORT + 1))"
rpc_public_addr = "127.0.0.1:$((S3_PORT + 1))"
rpc_secret = "$(randhex 32)"
[s3_api]
s3_region = "garage"
api_bind_addr = "127.0.0.1:$S3_PORT"
root_domain = ".s3.garage.localhost"
[admin]
api_bind_addr = "127.0.0.1:$((S3_PORT + 3))"
TOML
    GARAGE_DEFAULT_ACCESS_KEY="$S3_KEY_ID" GARAGE_DEFAULT_SECRET_KEY="$S3_SECRET" RUST_LOG=warn \
        "$GARAGE" -c "$WORK_DIR/garage/garage.toml" server --single-node --default-access-key \
        >"$WORK_DIR/garage.log" 2>&1 &
    echo $! > "$WORK_DIR/garage.pid"
    local ok=""
    for _ in $(seq 1 150); do
        if garage_ status >/dev/null 2>&1; then ok=1; break; fi
        sleep 0.2
    done
    [ -n "$ok" ] || { echo "Garage did not start; see $WORK_DIR/garage.log" >&2; return 1; }
    local b
    for b in "$@"; do
        for _ in $(seq 1 50); do garage_ bucket create "$b" >/dev/null 2>&1 && break; sleep 0.2; done
        garage_ bucket allow --read --write --owner "$b" --key "$S3_KEY_ID" >/dev/null
    done
}

garage_() { "$GARAGE" -c "$WORK_DIR/garage/garage.toml" "$@"; }

psql_() {
    PGPASSWORD="$PG_PASSWORD" "$PG_BIN/psql" -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$PG_PORT" -U postgres "$@"
}

# Writes an S3 [[target]] for bucket $2 named $1 (credentials from ${S3_KEY_VAR}/${S3_SECRET_VAR}).
s3_target_toml() {
    cat <<TOML
[[target]]
name = "$1"
url = "s3://$2/pg"
endpoint = "http://127.0.0.1:$S3_PORT"
region = "garage"
access_key_id = "\${PGFERRY_S3_KEY_ID}"
secret_access_key = "\${PGFERRY_S3_SECRET}"
TOML
}

# Creates database $1 with about $2 GB of raw dump: pgbench tables plus text/jsonb/bytea rows
# (half of the bytea random, so incompressible).
seed() {
    local db=$1 gb=$2
    psql_ -d postgres -c "CREATE DATABASE $db"
    PGPASSWORD="$PG_PASSWORD" "$PG_BIN/pgbench" -q -i -s $((40 * gb)) -h 127.0.0.1 -p "$PG_PORT" -U postgres "$db" >/dev/null 2>&1
    # ~1.8 KB of COPY text per row: ~0.7 KB text, ~0.1 KB jsonb, 0.5 KB bytea (half random) shown as 1 KB hex;
    # with pgbench at scale 40 per GB this makes about 1 GB of raw dump per GB asked.
    psql_ -d "$db" <<SQL
CREATE TABLE docs (id bigint PRIMARY KEY, body text, meta jsonb, blob bytea);
INSERT INTO docs
SELECT g,
       repeat('Lorem ipsum dolor sit amet, invoice ' || g || ' for partner ' || (g % 977) || '. ', 12),
       jsonb_build_object('partner', g % 977, 'lines', jsonb_build_array(g, g * 2, g * 3), 'state', 'posted', 'note', md5(g::text)),
       decode(repeat(md5((g % 100)::text), 16), 'hex') ||
           decode((SELECT string_agg(md5(random()::text || s || g), '') FROM generate_series(1, 16) s), 'hex')
FROM generate_series(1, $((300000 * gb))) g;
SQL
}

