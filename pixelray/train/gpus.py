"""Where a fine-tune trains: GPUs checked before anything slow starts, never waited for silently.

An embedded local Ray can only have the GPUs torch sees on this machine; a cluster has what it has
plus what its autoscaler may add. ``use_gpu = true`` with neither fails at once in one line that
names ``--cpu`` (Ray Train would otherwise wait for a GPU forever).
"""

from __future__ import annotations

import math
from collections.abc import Callable

from pixelray.config.train import FineTune
from pixelray.errors import TrainError

__all__ = ["check_cluster_gpus", "check_local_gpus", "device_line", "embedded"]

_NO_GPU_FIX = "pass --cpu (or set [run] use_gpu = false) to train on CPU"


def device_line(runs: list[FineTune], gpus: int) -> str:
    """One line saying where the fine-tunes train: on CPU, or on GPUs (one per worker)."""
    workers = max(run.workers for run in runs)
    if not gpus:
        cpus = max(run.cpus_per_worker for run in runs)
        return f"training on CPU: {workers} worker(s), {cpus:g} CPU each ([run] use_gpu = true for GPUs)"
    return f"training on GPU: {workers} worker(s), one GPU each (--cpu for CPU)"


def embedded(address: str | None) -> bool:
    """Whether joining Ray at ``address`` starts an embedded local Ray (none connected yet)."""
    import ray

    return address in (None, "", "local") and not ray.is_initialized()


def check_local_gpus(needed: int) -> None:
    """TrainError, before an embedded local Ray starts, when this machine has fewer CUDA GPUs than ``needed``
    (Ray Train would otherwise wait for them forever, silently)."""
    import torch

    have = torch.cuda.device_count() if needed and torch.cuda.is_available() else 0
    if have >= needed:
        return
    if not have:
        raise TrainError("[run] use_gpu = true: torch sees no CUDA GPU on this machine, so none can come to the "
                         f"embedded local Ray (--address local); {_NO_GPU_FIX}, or join a GPU cluster (--address auto)")
    raise TrainError(f"[run] use_gpu = true with workers = {needed}: this machine has {have} CUDA GPU(s) for the "
                     f"embedded local Ray, one per worker is needed; lower [run] workers (--workers {have}), "
                     f"or {_NO_GPU_FIX}")


def _gpu_ceiling() -> int | None:
    """The most GPUs the connected cluster's autoscaler may grow to, from the node groups it publishes (the
    check Ray Train itself makes); None when none are published, -1 when that cannot be read."""
    try:
        from ray._private.state import state

        most = state.get_max_resources_from_cluster_config()
    except Exception:  # noqa: BLE001 - an internal API of Ray: if it moves, wait as Ray Train would
        return -1
    return None if most is None else int(most.get("GPU", 0))


def _adds_nodes() -> bool:
    """An autoscaler that can add nodes runs on the joined cluster, though it does not publish its node types
    (Ray's v1 autoscaler, the launcher's and KubeRay's default): :func:`pixelray.sweep.devices.autoscaler_runs`."""
    from pixelray.sweep.devices import REPORT_WAIT, autoscaler_runs, embedded_ray

    return not embedded_ray() and autoscaler_runs(wait=REPORT_WAIT)


def check_cluster_gpus(needed: int, say: Callable[[str], None]) -> float:
    """TrainError when the connected Ray has fewer GPUs than ``needed`` and no autoscaler that can add them;
    with one that can, a line saying that the fine-tune waits for it. Returns the GPUs the fine-tunes can
    reach: those present, else what the autoscaler can grow to (infinite where it does not say)."""
    import ray

    have = int(ray.cluster_resources().get("GPU", 0))
    if not needed or have >= needed:
        return have
    ceiling = _gpu_ceiling()
    if ceiling is None and _adds_nodes():
        say(f"[run] use_gpu = true: the Ray cluster has {have} of the {needed} GPU(s) the workers need; waiting "
            "for its autoscaler to add GPU nodes (it does not say how many it can add; Ctrl-C to stop; --cpu "
            "trains on CPU)")
        return math.inf
    if ceiling is not None and (ceiling < 0 or ceiling >= needed):
        say(f"[run] use_gpu = true: the Ray cluster has {have} of the {needed} GPU(s) the workers need; waiting "
            "for its autoscaler to add them (Ctrl-C to stop; --cpu trains on CPU)")
        return math.inf if ceiling < 0 else ceiling
    what = {k: v for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU")}
    grow = f"its autoscaler can reach only {ceiling}" if ceiling else "no autoscaler can add any"
    raise TrainError(f"[run] use_gpu = true: the Ray cluster has {have} of the {needed} GPU(s) the workers need "
                     f"(one each; it has {what}) and {grow}; {_NO_GPU_FIX}, add GPU nodes, or lower [run] workers")
