"""Which device a sweep's workers compute on: what the Ray cluster has now and what it can get.

Nothing runs silently on the wrong device: GPUs present are used; where the autoscaler can add GPU
nodes (its node types, as it publishes them to the GCS, which Ray Data's autoscaling reads too), the
workers wait for them; where none can ever come, ``cuda`` fails at once and ``auto`` computes on CPU,
each saying so in one line.
"""

from __future__ import annotations

from dataclasses import dataclass

from pixelray.errors import SweepError

__all__ = ["GpuOutlook", "choose_device", "gpu_outlook"]


@dataclass(frozen=True)
class GpuOutlook:
    """What the cluster has and can get: GPUs now; the most its autoscaler can have (``None``: no
    autoscaler config is published, as on an embedded Ray or a cluster without autoscaler v2); and
    whether it is this process's own embedded Ray (no autoscaler: what it has is all it gets)."""

    now: int
    most: int | None
    embedded: bool

    @property
    def can_come(self) -> bool:
        """GPU nodes can be added (the autoscaler's node types have GPUs beyond what is here)."""
        return self.most is not None and self.most > self.now

    @property
    def never(self) -> bool:
        """No GPU is here and none can ever come."""
        return self.now == 0 and (self.embedded or self.most == 0)


def gpu_outlook() -> GpuOutlook:
    """The connected cluster's :class:`GpuOutlook` (the autoscaler's published config, as Ray Data reads it)."""
    import ray
    import ray._private.state as ray_state
    import ray._private.worker as ray_worker

    now = int(ray.cluster_resources().get("GPU", 0))
    try:
        most = (ray_state.state.get_max_resources_from_cluster_config() or {}).get("GPU")
    except Exception:  # an older or a remote GCS without the key: unknown, as without an autoscaler
        most = None
    node = getattr(ray_worker.global_worker, "node", None)
    return GpuOutlook(now, None if most is None else int(most), bool(node is not None and node.is_head()))


def choose_device(device: str, gpus: int | str | None, outlook: GpuOutlook, timeout: float) -> tuple[str, str | None]:
    """The device the workers reserve, and the one line to say about it (None: nothing to say).

    GPUs present: ``auto`` and ``cuda`` take them. None present: where the autoscaler can add GPU
    nodes, ``auto`` and ``cuda`` wait for them (the pending actors are the request); where none can
    ever come (an embedded Ray, or an autoscaler without a GPU node type), ``cuda`` (or ``[run] gpus``)
    fails at once and ``auto`` computes on CPU, saying so. A joined cluster that publishes no
    autoscaler config may still get GPUs: ``cuda`` waits up to the placement timeout, saying so.

        >>> choose_device("auto", None, GpuOutlook(now=0, most=None, embedded=True), 600)[0]
        'cpu'
        >>> choose_device("auto", None, GpuOutlook(now=0, most=8, embedded=False), 600)[0]
        'cuda'
    """
    if device == "cpu":
        return "cpu", None
    if outlook.now:
        return "cuda", None
    wants_gpu = device == "cuda" or gpus is not None
    what = "[run] device = 'cuda'" if device == "cuda" else f"[run] gpus = {gpus!r}"
    if outlook.can_come:
        setting = what if wants_gpu else "[run] device = 'auto'"
        return "cuda", (f"{setting}: no GPU in the cluster yet; waiting for the autoscaler to add GPU nodes (up to "
                        f"{outlook.most} GPUs; [run] placement_timeout = {timeout:g} s)"
                        + ("" if wants_gpu else "; set device = 'cpu' to compute on CPU instead"))
    where = ("this embedded Ray (no cluster, no autoscaler) has no GPU" if outlook.embedded
             else "the Ray cluster has no GPU and its autoscaler has no GPU node type" if outlook.never
             else "the Ray cluster has no GPU now")
    if not wants_gpu:
        return "cpu", (f"[run] device = 'auto': {where}: computing on CPU (set device = 'cpu' to say so, or "
                       "'cuda' to wait for GPUs)")
    if outlook.never:
        raise SweepError(f"{what}: {where} and cannot get one; set device = 'cpu' (or 'auto'), or join a cluster "
                         "with GPUs (--address ADDRESS)")
    return "cuda", (f"{what}: {where}; waiting up to {timeout:g} s ([run] placement_timeout) for an autoscaler "
                    "to add one")
