"""Which of a config's fine-tunes train at once: as many as the cluster has (or can add) room for, each a
Ray Train run of its own in a thread of the driver."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from pixelray.config.train import FineTune

__all__ = ["run_all", "side_by_side"]


def side_by_side(runs: list[FineTune], gpus_reach: float = 0) -> int:
    """How many of these fine-tunes can train at once (from one): the cluster's CPUs over what one fine-tune's
    workers reserve (the most any of them does), and for GPU fine-tunes the GPUs they can reach (those present,
    or what the autoscaler can add: their pending workers are its demand) over the GPUs one needs."""
    import ray

    have = ray.cluster_resources()
    cpus = max(run.workers * run.cpus_per_worker for run in runs)
    gpus = max(run.workers if run.use_gpu else 0 for run in runs)
    if gpus:  # (CPUs come with the GPU nodes)
        room = len(runs) if math.isinf(gpus_reach) else gpus_reach // gpus
    else:
        room = have.get("CPU", 0) // cpus
    return int(max(1, min(room, len(runs))))


def run_all(items: list[Any], at_once: int, run_one: Callable[[Any], Any]) -> dict:
    """Each fine-tune's result by ``id(item)``, ``at_once`` at a time (threads; each a Ray Train run of its
    own). A fine-tune that fails does not stop the others; the first failure (config order) is raised."""
    if at_once <= 1:
        return {id(item): run_one(item) for item in items}
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=at_once, thread_name_prefix="pixelray-finetune") as pool:
        futures = [(item, pool.submit(run_one, item)) for item in items]
        errors = [f.exception() for _, f in futures]  # waits for every one
    for error in errors:
        if error is not None:
            raise error
    return {id(item): f.result() for item, f in futures}
