"""Throughput of `score-catalog`: every pair × operator setting of 100 and 1000 synthetic checkpoints.

The predictor is trained on synthetic labels (its size — trees, leaves — is the shipped default), and
pair features come from the synthetic catalog (vectorised, near free), so the time is the selector's:
building the feature blocks and predicting mean and both quantiles. Goal: 1000 checkpoints (499,500
pairs × 10 settings ≈ 5M candidates) in under 60 s. Writes the `score-catalog` section of BENCHMARKS.md.

    python -m bench.bench_score_catalog [--sizes 100 1000]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

from bench.report import write_section
from models.dataset import build_dataset
from models.plans import DEFAULT_SETTINGS
from models.predictor import LightGBMSelector
from models.score_catalog import write_table
from models.selection import Selection
from models.synthetic import make_catalog, make_labels


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 1000])
    parser.add_argument(
        "--threads", type=int, default=os.cpu_count() or 1, help="LightGBM prediction threads."
    )
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)

    train = make_catalog(n_tasks=4, per_task=3, seed=0)
    data = build_dataset(make_labels(train, seed=0, triples=10), train)
    selector = LightGBMSelector(seed=0).fit(data.X, data.y, data.feature_names)
    selector.params["num_threads"] = args.threads
    trees = {k: b.num_trees() for k, b in selector.boosters.items()}
    lines = [
        f"Predictor: LightGBM mean + 0.1/0.9 quantile boosters ({trees} trees), {len(data.feature_names)} features; "
        f"{len(DEFAULT_SETTINGS)} operator settings; prediction threads: {args.threads}; synthetic pair features.\n",
        "| checkpoints | candidates | score, wall (s) | score, CPU (s) | candidates/s (wall) | write Parquet (s) | Parquet size |",
        "|---|---|---|---|---|---|---|",
    ]
    for size in args.sizes:
        catalog = make_catalog(n_tasks=max(1, size // 10), per_task=10, seed=3)
        names = catalog.names[:size]
        started, cpu_started = time.perf_counter(), time.process_time()
        meta = {
            "input_feature_names": data.feature_names,
            "settings": [x.to_dict() for x in DEFAULT_SETTINGS],
        }
        table = Selection(selector, meta, catalog).score_pairs(names)
        scored, cpu = time.perf_counter() - started, time.process_time() - cpu_started
        with tempfile.TemporaryDirectory() as tmp:
            started = time.perf_counter()
            path = write_table(table, Path(tmp) / "scores.parquet")
            written = time.perf_counter() - started
            size_mb = path.stat().st_size / 2**20
        lines.append(
            f"| {size} | {len(table):,} | {scored:.1f} | {cpu:.1f} | {len(table) / scored:,.0f} | {written:.1f} "
            f"| {size_mb:.1f} MiB |"
        )
        print(lines[-1], flush=True)
    load = os.getloadavg()[0]
    lines += [
        "",
        f"Load average when finished: {load:.1f} on {os.cpu_count()} cores. Wall time follows the machine's "
        "load (on a day the machine was shared, 59 s to 141 s for 1000 checkpoints under load averages up to 9); "
        "CPU seconds (all threads) are the steadier figure. Goal: 1000 checkpoints in under 60 s.",
    ]
    text = "\n".join(lines)
    print(text)
    if not args.no_write:
        write_section(
            "score-catalog",
            "Catalog scoring throughput",
            " ".join(["python -m bench.bench_score_catalog", *(argv or sys.argv[1:])]),
            text,
        )


if __name__ == "__main__":
    main()
