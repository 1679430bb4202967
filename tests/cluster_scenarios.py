"""Sweeps on a multi-node local Ray cluster (``ray.cluster_utils.Cluster``), one scenario per run.

Run by ``tests/test_cluster.py`` in a fresh interpreter (a test session already holds a local
Ray), as ``python tests/cluster_scenarios.py SCENARIO[,SCENARIO] DATA OUT MODEL...``; prints a JSON
line per scenario.
GPUs are logical (``num_gpus`` of a node); the workers compute on CPU
(``PIXELRAY_DEVICE_OVERRIDE=cpu``), so the scheduling is the real one without a GPU.

- ``grow-then-stuck``: the cluster starts with no GPU; two 1-GPU nodes join by hand while the sweep
  waits (grow: no autoscaler, ``gpus = "all"`` follows the GPUs that appear); then, on the same
  cluster, ``gpus = 4`` on those two nodes that cannot grow: the sweep must stop in time (stuck).

A range larger than the cluster and a node lost mid-sweep run under Ray's own autoscaler
(``tests/autoscaler_scenarios.py``).
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ["PIXELRAY_DEVICE_OVERRIDE"] = "cpu"

import pandas as pd  # noqa: E402
import ray  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402

from pixelray.config.sweep import parse_config  # noqa: E402
from pixelray.sweep import SweepError, run_sweep  # noqa: E402

#: the scenario's cluster, shut down at the end: that also deletes <Ray's temp dir>/ray_current_cluster, which
#: Cluster() writes and which would otherwise point every later address-less Ray client of the machine (Ray
#: Train's placement-group cleaner among them: 12 s per fine-tune) at a dead GCS
CLUSTERS: list = [None]

GRID = {"counts": [4, 64, 200, 400], "amplitudes": ["full", 60]}
#: Eight times the work: the two workers that are placed must not finish it before the timeout.
LONG_GRID = {"counts": [4, 16, 64, 128, 200, 300, 400, 500], "amplitudes": ["full", 20, 60, 120]}


def config(data, models, out, grid=GRID, size=300, **run):
    return parse_config({
        "data": {"path": data},
        "models": {"names": models, "weights": "none"},
        "eval": {"filter": "all", "size": size, "batch_size": 100},
        "grid": grid,
        "output": {"dir": out},
        "run": {"threads": 1, **run},
    })


def in_thread(cfg):
    box: dict = {}

    def target():
        try:
            box["result"] = run_sweep(cfg, progress=False)
        except BaseException as exc:  # noqa: BLE001 - reported to the parent
            box["error"] = f"{type(exc).__name__}: {exc}"

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, box


def cells(out, drop=()) -> list[dict]:
    df = pd.read_parquet(Path(out) / "cells.parquet").drop(columns=["pixelray_version", "torch_version", *drop])
    return json.loads(df.to_json(orient="records"))


def grow_then_stuck(data, out, models):
    """``grow``, then ``stuck`` on the same cluster (one cluster start for both)."""
    cluster = CLUSTERS[0] = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
    ray.init(address=cluster.address, log_to_driver=False)
    thread, box = in_thread(config(data, models, out + "-grow", size=600, device="cuda", gpus="all",
                                   placement_timeout=120))
    time.sleep(4)  # the sweep has started and waits for a GPU
    started_waiting = "result" not in box and "error" not in box
    gpu_nodes = [cluster.add_node(num_cpus=1, num_gpus=1).node_id for _ in range(2)]
    thread.join(600)
    grown = {"started_waiting": started_waiting, "gpu_nodes": gpu_nodes, "error": box.get("error"),
             "stats": box["result"].stats if "result" in box else None}
    # the same two 1-GPU nodes, which cannot grow, asked for four GPUs
    start = time.monotonic()
    try:
        run_sweep(config(data, models, out + "-stuck", LONG_GRID, 600, device="cuda", gpus=4, placement_timeout=5),
                  progress=False)
        error = None
    except SweepError as exc:
        error = str(exc)
    stuck = {"error": error, "seconds": time.monotonic() - start}
    return {"grow": grown, "stuck": stuck}


def main(names, data, out, models):
    """Each named scenario on a cluster of its own, one after another; a ``RESULT {name: ...}`` line each."""
    for name in names:
        run = {"grow-then-stuck": grow_then_stuck}[name]
        try:
            print("RESULT " + json.dumps({name: run(data, f"{out}/{name}", models)}, default=str), flush=True)
        finally:
            ray.shutdown()
            if CLUSTERS[0] is not None:
                CLUSTERS[0].shutdown()
                CLUSTERS[0] = None


if __name__ == "__main__":
    names, data, out, *models = sys.argv[1:]
    main(names.split(","), data, out, models)
