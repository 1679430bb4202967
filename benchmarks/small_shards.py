"""The same images in large and in small shards: what a sweep costs in each, with the default settings.

A forward pass never holds more than one shard's images per cell, so small shards (a data set another
tool prepared) would leave the device nearly idle; by default (``[run] cells_per_pass = "auto"``) a worker
stacks as many cells into a pass as fill ``batch_size`` images. Builds ``--images`` synthetic 32x32 images
twice, in shards of ``--large`` and of ``--small`` images (the same pixels, ids and labels), and sweeps a
100-cell grid over every image with the tiny CNN (random init, ``filter = "none"``), one worker with 2
threads, ``batch_size = --batch``, on an embedded Ray:

* ``large``, ``small``: the default settings; ``small_one_cell``: ``cells_per_pass = 1`` (one cell per pass,
  the behaviour before "auto").

Reported: the workers' compute seconds of the cells phase (``stats.json``, the time a worker holds its
device), wall seconds, and the ratios small / large; the rows of the three runs must be equal (checked).
Prints one JSON line.

    python benchmarks/small_shards.py                     # 2,000 images: 4 shards of 500 vs 400 of 5
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import pandas as pd

from pixelray.config.sweep import parse_config
from pixelray.datasets.synthetic import make_synthetic
from pixelray.sweep import run_sweep

GRID = {"counts": [1, 2, 4, 8, 16, 32, 64, 128, 256, 512], "amplitudes": ["full", 10, 40, 70, 127],
        "areas": ["whole", 24]}


def sweep(data: str, out: str, batch: int, cells_per_pass: int | None) -> tuple[dict, pd.DataFrame, float]:
    run = {"workers": 1, "threads": 2, "device": "cpu"}
    if cells_per_pass is not None:
        run["cells_per_pass"] = cells_per_pass
    config = parse_config({
        "data": {"path": data}, "models": {"names": ["tiny"], "weights": "none"},
        "eval": {"filter": "none", "batch_size": batch}, "grid": GRID, "output": {"dir": out}, "run": run,
    })
    start = time.perf_counter()
    result = run_sweep(config, progress=False)
    wall = time.perf_counter() - start
    rows = pd.read_parquet(result.cells_path).drop(columns=["config_hash", "dataset"])
    return result.stats, rows, wall


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--large", type=int, default=500)
    parser.add_argument("--small", type=int, default=5)
    parser.add_argument("--batch", type=int, default=500)
    args = parser.parse_args(argv)
    from pixelray.sweep.pool import connect

    connect(None, num_cpus=2)
    out: dict = {"images": args.images, "batch": args.batch, "cells": 100}
    with tempfile.TemporaryDirectory(prefix="pixelray-bench-") as tmp:
        runs = {}
        for name, per_shard in (("large", args.large), ("small", args.small)):
            make_synthetic(os.path.join(tmp, name), classes=10, images=args.images, size=32, seed=0,
                           rows_per_shard=per_shard)
        for name, data, per_pass in (("large", "large", None), ("small", "small", None),
                                     ("small_one_cell", "small", 1)):
            stats, rows, wall = sweep(os.path.join(tmp, data), os.path.join(tmp, f"out-{name}"), args.batch, per_pass)
            runs[name] = rows
            out[name] = {"shards": stats["shards"], "compute_s": round(stats["compute_s"]["cells"], 2),
                         "read_s": round(stats["read_s"]["cells"], 2), "wall_s": round(wall, 1)}
        for name in ("small", "small_one_cell"):
            pd.testing.assert_frame_equal(runs[name], runs["large"])  # the same rows, whatever the shards
            out[f"compute_ratio_{name}_vs_large"] = round(out[name]["compute_s"] / out["large"]["compute_s"], 3)
        out["rows_equal"] = True
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
