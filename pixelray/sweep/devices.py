"""Which device a sweep's workers compute on: what the Ray cluster has now and what it can get.

Nothing runs silently on the wrong device: GPUs present are used; where an autoscaler can add GPU
nodes, the workers wait for them; where none can ever come, ``cuda`` fails at once and ``auto``
computes on CPU, each saying so in one line.

What the autoscaler can add is read from the GCS: its node types where it publishes them (the cluster
config that Ray Data's autoscaling reads), else the report its monitor writes on every update
(``__autoscaling_status``), whose node types are the config's names (``gpu-group``) where it runs
from an autoscaling config and the nodes' own ids (``node_<id>``) where a head was started without
one (Ray's read-only provider, which adds nothing). The report does not say which types have GPUs:
there, the workers' pending demand is the question, and a GPU node, or the placement timeout, the
answer.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from pixelray.errors import SweepError

__all__ = ["GpuOutlook", "adds_nodes", "autoscaler_runs", "choose_device", "embedded_ray", "gpu_outlook"]


@dataclass(frozen=True)
class GpuOutlook:
    """What the cluster has and can get: GPUs now; the most its autoscaler can have (``None``: its node
    types are not published); whether it is this process's own embedded Ray (no autoscaler: what it has
    is all it gets); and whether an autoscaler that can add nodes runs (its report names node types)."""

    now: int
    most: int | None
    embedded: bool
    autoscaler: bool = False

    @property
    def can_come(self) -> bool:
        """GPU nodes can be added: the autoscaler's node types have GPUs beyond what is here, or an
        autoscaler that does not publish them runs (its answer is the pending workers' placement)."""
        if self.most is not None:
            return self.most > self.now
        return self.autoscaler and not self.embedded

    @property
    def never(self) -> bool:
        """No GPU is here and none can ever come."""
        return self.now == 0 and (self.embedded or self.most == 0)


def gpu_outlook() -> GpuOutlook:
    """The connected cluster's :class:`GpuOutlook` (the autoscaler's published config, as Ray Data reads it)."""
    import ray
    import ray._private.state as ray_state

    now = int(ray.cluster_resources().get("GPU", 0))
    try:
        most = (ray_state.state.get_max_resources_from_cluster_config() or {}).get("GPU")
    except Exception:  # an older or a remote GCS without the key: unknown, as without an autoscaler
        most = None
    embedded = embedded_ray()
    # without a GPU, what the autoscaler can do decides: on a head that has just started, its first report
    # (within one update, 5 s) is waited for
    autoscaler = not embedded and autoscaler_runs(wait=REPORT_WAIT if now == 0 else 0)
    return GpuOutlook(now, None if most is None else int(most), embedded, autoscaler)


def embedded_ray() -> bool:
    """The connected Ray is this process's own (it started the head): no autoscaler, only this machine."""
    import ray._private.worker as ray_worker

    node = getattr(ray_worker.global_worker, "node", None)
    return bool(node is not None and node.is_head())


#: seconds a driver without GPUs waits for the autoscaler's first report on a cluster that has just started
REPORT_WAIT = 15.0


def autoscaler_runs(wait: float = 0.0) -> bool:
    """An autoscaler that can add nodes runs here: autoscaler v2 is on, or the v1 monitor's report says so
    (:func:`adds_nodes`); waiting up to ``wait`` seconds for a first report."""
    import json

    from ray.experimental.internal_kv import _internal_kv_get

    deadline = time.monotonic() + wait
    try:
        while True:
            if _internal_kv_get("__autoscaler_v2_enabled", namespace="__autoscaler") == b"1":
                return True
            says = adds_nodes(json.loads(_internal_kv_get("__autoscaling_status") or b"{}"))
            if says is not None or time.monotonic() >= deadline:
                return bool(says)
            time.sleep(0.25)
    except Exception:  # a report of another Ray version's shape: no autoscaler known
        return False


def adds_nodes(status: dict) -> bool | None:
    """Whether a v1 autoscaler's status report (``__autoscaling_status``) is that of one that can add nodes:
    its nodes have the node types of an autoscaling config, not ``node_<their id>``, the names Ray's
    read-only provider gives the nodes of a head started without one. None: no report, or one that
    names no node yet (the first, on a head that has just started).

        >>> adds_nodes({"autoscaler_report": {"node_type_mapping": {"ab12": "node_ab12"}}})
        False
        >>> adds_nodes({"autoscaler_report": {"node_type_mapping": {"ab12": "headgroup", "cd34": "gpu-group"}}})
        True
        >>> adds_nodes({"autoscaler_report": {"node_type_mapping": {}}}) is None
        True
    """
    mapping = (status.get("autoscaler_report") or {}).get("node_type_mapping") or {}
    if not mapping:
        return None
    return any(name != f"node_{node}" for node, name in mapping.items())


def choose_device(device: str, gpus: int | str | None, outlook: GpuOutlook, timeout: float) -> tuple[str, str | None]:
    """The device the workers reserve, and the one line to say about it (None: nothing to say).

    GPUs present: ``auto`` and ``cuda`` take them. None present: where the autoscaler can add GPU
    nodes, ``auto`` and ``cuda`` wait for them (the pending actors are the request); where none can
    ever come (an embedded Ray, or an autoscaler without a GPU node type), ``cuda`` fails at once and
    ``auto`` computes on CPU, saying so (``[run] gpus`` sizes the pool only where it is on GPUs). A
    joined cluster without an autoscaler may still get GPUs (a node joined by hand): ``cuda`` waits up
    to the placement timeout, saying so; ``auto`` computes on CPU, saying so.

        >>> choose_device("auto", None, GpuOutlook(now=0, most=None, embedded=True), 600)[0]
        'cpu'
        >>> choose_device("auto", None, GpuOutlook(now=0, most=8, embedded=False), 600)[0]
        'cuda'
    """
    if device == "cpu":
        return "cpu", None
    if outlook.now:
        return "cuda", None
    what = f"[run] device = {device!r}" + (f", gpus = {gpus!r}" if gpus is not None else "")
    if outlook.can_come:
        most = f"up to {outlook.most} GPUs" if outlook.most is not None else "it does not say how many it can add"
        return "cuda", (f"{what}: no GPU in the cluster yet; waiting for the autoscaler to add GPU nodes ({most}; "
                        f"[run] placement_timeout = {timeout:g} s)"
                        + ("" if device == "cuda" else "; set device = 'cpu' to compute on CPU instead"))
    where = ("this embedded Ray (no cluster, no autoscaler) has no GPU" if outlook.embedded
             else "the Ray cluster has no GPU and its autoscaler has no GPU node type" if outlook.never
             else "the Ray cluster has no GPU now")
    if device == "auto":
        return "cpu", (f"{what}: {where}: computing on CPU (set device = 'cpu' to say so, or 'cuda' to wait for "
                       "GPUs)")
    if outlook.never:
        raise SweepError(f"{what}: {where} and cannot get one; set device = 'cpu' (or 'auto'), or join a cluster "
                         "with GPUs (--address ADDRESS)")
    return "cuda", (f"{what}: {where}; waiting up to {timeout:g} s ([run] placement_timeout) for an autoscaler "
                    "to add one")
