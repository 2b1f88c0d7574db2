#!/usr/bin/env python3
"""Prints the Markdown table of benches/RESULTS.md from criterion's JSON in target/criterion:
per benchmark, the median throughput in MB/s (10^6 bytes of raw dump per second) with
criterion's 95% confidence interval of the median, and the slowest–fastest sample.
Usage: python3 benches/criterion_medians.py [target/criterion]"""
import json
import pathlib
import sys

ORDER = ["zstd_direct", "zstd_pipeline", "sha256", "stats_tap", "fanout", "pipeline_tap", "sealer"]
root = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else "target/criterion")
print("| benchmark | median MB/s | 95% CI of the median | slowest–fastest sample | median time |")
print("|---|---:|---:|---:|---:|")
for group in ORDER:
    if not (root / group).is_dir():  # a run of some groups only (`cargo bench -- sealer`)
        continue
    for bench in sorted((root / group).iterdir()):
        new = bench / "new"
        if not (new / "estimates.json").exists():
            continue
        raw = json.load(open(new / "benchmark.json"))["throughput"]["Bytes"]
        median = json.load(open(new / "estimates.json"))["median"]
        sample = json.load(open(new / "sample.json"))
        per_iter = [t / n for t, n in zip(sample["times"], sample["iters"])]
        mbps = lambda ns: raw / ns * 1e3  # bytes per ns * 1e9 / 1e6
        lo, hi = median["confidence_interval"]["upper_bound"], median["confidence_interval"]["lower_bound"]
        print(
            f"| {group}/{bench.name} | {mbps(median['point_estimate']):.0f} | {mbps(lo):.0f}–{mbps(hi):.0f} "
            f"| {mbps(max(per_iter)):.0f}–{mbps(min(per_iter)):.0f} | {median['point_estimate'] / 1e6:.0f} ms |"
        )
