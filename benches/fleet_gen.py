#!/usr/bin/env python3
"""Builds a synthetic pgferry fleet on a directory target, in the real object layout.

    fleet_gen.py ROOT DATABASES SNAPSHOTS TABLES [SOURCE]

ROOT is the directory target's root (`url = "file://ROOT"`). For each of DATABASES databases
(`odoo_0001`, ...) of SOURCE (default `prod`) it writes SNAPSHOTS committed snapshots spread
like a grandfather-father-son retention keeps them (hourly for 48 h, then daily, weekly,
monthly), each as pgferry writes it: `<id>-<run>.dump.zst` (a small real zstd frame, the
same bytes for every snapshot, its sha256 and size in the manifest), then
`<id>.manifest.json` (format 3, `serde_json` pretty-printed like `Manifest::to_json`, with
TABLES table entries), and a `<id>.verify.json` for the newest snapshot. Deterministic: the
same arguments give the same fleet (ids are relative to the hour the script runs in).
"""

import datetime as dt
import hashlib
import json
import os
import subprocess
import sys


def dump_bytes():
    """A real zstd frame (checksummed) of a tiny stand-in archive."""
    return subprocess.run(
        ["zstd", "-q", "-c", "--check", "-"],
        input=b"PGDMP" + bytes(range(256)) * 4,
        capture_output=True,
        check=True,
    ).stdout


def slot_times(now, count):
    """`count` slot starts, newest first: 48 hourly, 14 daily, 8 weekly, then monthly."""
    hour = now.replace(minute=0, second=0, microsecond=0)
    times = []
    t = hour
    for _ in range(48):
        times.append(t)
        t -= dt.timedelta(hours=1)
    day = hour.replace(hour=0)
    for i in range(14):
        times.append(day - dt.timedelta(days=2 + i))
    for i in range(8):
        times.append(day - dt.timedelta(days=17 + 7 * i))
    m = 0
    while len(times) < count:
        m += 1
        times.append(day - dt.timedelta(days=80 + 30 * m))
    return sorted(set(times[:count]), reverse=True)


def sid(t):
    return t.strftime("%Y%m%dT%H%M%SZ")


def rfc3339(t):
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


def main():
    root, dbs, snaps, tables = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    source = sys.argv[5] if len(sys.argv) > 5 else "prod"
    body = dump_bytes()
    sha = hashlib.sha256(body).hexdigest()
    now = dt.datetime.now(dt.timezone.utc)
    times = slot_times(now, snaps)
    table_entries = [
        {
            "schema": "public",
            "name": f"odoo_model_{i:04d}_line",
            "rows": (i * 7919) % 250000,
            "raw_bytes": (i * 104729) % 90000000,
        }
        for i in range(tables)
    ]
    for d in range(1, dbs + 1):
        database = f"odoo_{d:04d}"
        folder = os.path.join(root, source, database)
        os.makedirs(folder, exist_ok=True)
        for n, t in enumerate(times):
            run = hashlib.sha256(f"{database}{n}".encode()).hexdigest()[:12]
            ident = sid(t)
            object_key = f"{source}/{database}/{ident}-{run}.dump.zst"
            with open(os.path.join(root, object_key), "wb") as f:
                f.write(body)
            started = t + dt.timedelta(seconds=5 + d % 50)
            manifest = {
                "format_version": 3,
                "snapshot_id": ident,
                "source": source,
                "database": database,
                "started_at": rfc3339(started),
                "finished_at": rfc3339(started + dt.timedelta(seconds=40)),
                "server_version": "15.18",
                "pg_dump_version": "15.18",
                "compression": {"algorithm": "zstd", "level": 1},
                "object_key": object_key,
                "stored_size": len(body),
                "raw_size": 1029,
                "sha256": sha,
                "part_size": 10485760,
                "targets": ["local"],
                "tables": table_entries,
                "large_objects": 0,
                "pgferry_version": "0.1.0",
                "system_identifier": "7300000000000000001",
            }
            with open(os.path.join(folder, f"{ident}.manifest.json"), "w") as f:
                f.write(json.dumps(manifest, indent=2) + "\n")
            if n == 0:
                report = {
                    "result": "success",
                    "finished_at": rfc3339(started + dt.timedelta(hours=1)),
                    "snapshot_id": ident,
                    "source": source,
                    "database": database,
                }
                with open(os.path.join(folder, f"{ident}.verify.json"), "w") as f:
                    json.dump(report, f)


if __name__ == "__main__":
    main()
