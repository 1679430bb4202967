"""A sweep config's ``[run]`` section: how it runs (device, workers, GPUs, threads, metrics), typed and checked.

Nothing here changes the results: none of it is in a config's hash.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from pixelray.config.tomlcheck import ConfigError, check_keys, get_value
from pixelray.core.check import is_int

__all__ = ["Throughput", "amp_setting", "check_run", "gpu_range", "parse_throughput", "run_fields"]


def amp_setting(value: bool | str) -> bool | str:
    """``[run] amp``: false, true (fp16 on CUDA, bf16 on CPU), 'bf16' or 'fp16'."""
    if isinstance(value, str) and value not in ("bf16", "fp16"):
        raise ConfigError(f"[run] amp = {value!r}: allowed: true, false, 'bf16', 'fp16'")
    return value


_RUN_KEYS = {"device", "workers", "gpus", "placement_timeout", "threads", "amp", "metrics_port", "metrics_host",
             "metrics_linger", "cells_per_pass", "cuda_graphs", "huge_pages", "max_cost", "throughput"}


def run_fields(raw: dict, source: str) -> dict[str, Any]:
    """``[run]``: device, workers and the rest, typed here; their ranges are :func:`check_run`'s."""
    run = get_value(raw, "run", source, dict, {})
    check_keys(run, _RUN_KEYS, "run")
    device = get_value(run, "device", "run", str, "auto")
    if device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"[run] device = {device!r}: allowed: 'auto', 'cpu', 'cuda'")
    return {
        "device": device,
        "workers": get_value(run, "workers", "run", int, None),
        "gpus": get_value(run, "gpus", "run", (int, str), None, fix="a number of GPUs, 'M..N' or 'all'"),
        "placement_timeout": get_value(run, "placement_timeout", "run", (int, float), 600.0, fix="seconds, e.g. 600"),
        "threads": get_value(run, "threads", "run", int, None),
        "amp": amp_setting(get_value(run, "amp", "run", (bool, str), False, fix="true, false, 'bf16' or 'fp16'")),
        "metrics_port": get_value(run, "metrics_port", "run", int, None),
        "metrics_host": get_value(run, "metrics_host", "run", str, "127.0.0.1"),
        "metrics_linger": get_value(run, "metrics_linger", "run", (int, float), 5.0),
        "cells_per_pass": _cells_per_pass(get_value(run, "cells_per_pass", "run", (int, str), "auto",
                                                    fix="'auto' or a number of cells per forward pass")),
        "cuda_graphs": get_value(run, "cuda_graphs", "run", bool, False),
        "huge_pages": get_value(run, "huge_pages", "run", bool, True),
        **_max_cost(get_value(run, "max_cost", "run", (int, str), None,
                              fix="the most images the sweep may forward, all models together, or 'H device-hours' "
                                  "(pixelray plan)")),
        "throughput": tuple(get_value(run, "throughput", "run", list, [],
                                      fix="a list of '[MODEL=]IMAGES_PER_S[:GRAD_IMAGES_PER_S]', e.g. ['900:300']")),
    }


_HOURS = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*(?:device|gpu)-hours?\s*$")


def _max_cost(value: int | str | None) -> dict[str, Any]:
    """``[run] max_cost``: images forwarded (an integer) or estimated device time ("2.5 device-hours")."""
    if not isinstance(value, str):
        return {"max_cost": value, "max_hours": None}
    match = _HOURS.match(value)
    if not match or float(match[1]) <= 0:
        raise ConfigError(f"[run] max_cost = {value!r}: expected a number of images forwarded (all models), e.g. "
                          "1000000, or device time, e.g. '2.5 device-hours'")
    return {"max_cost": None, "max_hours": float(match[1])}


def _cells_per_pass(value: int | str) -> int | None:
    """``[run] cells_per_pass``: "auto" (None: as many cells as fill ``batch_size`` images) or a fixed number."""
    if value == "auto":
        return None
    if isinstance(value, str):
        raise ConfigError(f"[run] cells_per_pass = {value!r}: allowed: 'auto' or an integer >= 1")
    return value


_GPU_RANGE = re.compile(r"^\s*(\d+)\s*\.\.\s*(\d+)\s*$")


def gpu_range(gpus: int | str) -> tuple[int, int | None]:
    """``[run] gpus`` as (the fewest GPU workers the sweep goes on with, the most it runs; None: as many as
    the cluster gives). ``N``: exactly N; ``"M..N"``: at least M, up to N; ``"all"``: at least one.

        >>> gpu_range(4), gpu_range("1..3"), gpu_range("all")
        ((4, 4), (1, 3), (1, None))
    """
    if gpus == "all":
        return 1, None
    if is_int(gpus):
        if gpus >= 1:
            return gpus, gpus
    elif isinstance(gpus, str) and (m := _GPU_RANGE.match(gpus)) and 1 <= int(m[1]) <= int(m[2]):
        return int(m[1]), int(m[2])
    raise ConfigError(f"[run] gpus = {gpus!r}: must be a number of GPU workers >= 1, a range 'M..N' with "
                      "1 <= M <= N (at least M, up to N), or 'all' (as many as the cluster gives)")


def check_run(fields: dict[str, Any]) -> None:
    """The ``[run]`` values (from the file or the command line): positive counts, a real port."""
    for key in ("workers", "threads", "cells_per_pass", "max_cost"):
        value = fields[key]
        if value is not None and (not is_int(value) or value < 1):
            raise ConfigError(f"[run] {key} = {value!r}: must be an integer >= 1, or omit it for the default")
    gpus = fields["gpus"]
    if gpus is not None:
        gpu_range(gpus)
    if gpus is not None and fields["device"] == "cpu":
        raise ConfigError(f"[run] gpus = {gpus!r} with device = 'cpu': GPU workers need device 'cuda' or 'auto'")
    timeout = fields["placement_timeout"]
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout < float("inf"):
        raise ConfigError(f"[run] placement_timeout = {timeout!r}: must be a number of seconds > 0")
    if fields["cuda_graphs"] and fields["device"] == "cpu":
        raise ConfigError("[run] cuda_graphs = true needs a CUDA device, but device = 'cpu'; drop cuda_graphs "
                          "(with device = 'auto' it applies only where the workers have a GPU)")
    if fields["max_hours"] is not None and not fields["throughput"]:
        raise ConfigError(f"[run] max_cost = '{fields['max_hours']:g} device-hours' needs the models' speed: add "
                          "[run] throughput = ['MODEL=IMAGES_PER_S', ...] (measure it with `pixelray plan CONFIG "
                          "--calibrate` on the cluster's device) or give max_cost in images")
    if any(not isinstance(t, str) for t in fields["throughput"]):
        raise ConfigError(f"[run] throughput = {list(fields['throughput'])!r}: each entry must be a string "
                          "'[MODEL=]IMAGES_PER_S[:GRAD_IMAGES_PER_S]', e.g. 'resnet101=900:300'")
    port = fields["metrics_port"]
    if port is not None and (not is_int(port) or not 0 <= port <= 65535):
        raise ConfigError(f"[run] metrics_port = {port!r}: must be in 0..65535 (0 = any free port)")
    linger = fields["metrics_linger"]
    if isinstance(linger, bool) or not isinstance(linger, (int, float)) or not 0 <= linger < float("inf"):
        raise ConfigError(f"[run] metrics_linger = {linger!r}: must be a number of seconds >= 0 "
                          "(--metrics-linger)")


#: A gradient pass (forward and backward) costs about three forward passes (the backward: about two).
GRAD_COST = 3.0


@dataclass(frozen=True)
class Throughput:
    """One model's images per second through an inference pass and through a forward and backward pass."""

    forward: float
    grad: float
    source: str

    def seconds(self, images: int, grad_images: int) -> float:
        return images / self.forward + grad_images / self.grad


def parse_throughput(items: Iterable[str], models: Iterable[str]) -> dict[str, Throughput]:
    """``[MODEL=]FORWARD[:GRAD]`` images per second, one item per model or one for all (``GRAD`` defaults to
    ``FORWARD / 3``: a backward pass costs about two forward passes); ConfigError names a bad item."""
    models = list(models)
    rates: dict[str, Throughput] = {}
    every: Throughput | None = None
    for item in items:
        name, _, value = item.rpartition("=")
        try:
            forward, _, grad = value.partition(":")
            f = float(forward)
            g = float(grad) if grad else f / GRAD_COST
            if not (math.isfinite(f) and math.isfinite(g) and f > 0 and g > 0):
                raise ValueError
        except ValueError:
            raise ConfigError(f"throughput {item!r}: expected [MODEL=]IMAGES_PER_S[:GRAD_IMAGES_PER_S], positive "
                              "numbers, e.g. resnet101=900:300") from None
        rate = Throughput(f, g, "given")
        if not name:
            every = rate
        elif name in models:
            rates[name] = rate
        else:
            raise ConfigError(f"throughput {item!r}: {name!r} is not a model of this config; its models: {models}")
    return {m: rates.get(m, every) for m in models if m in rates or every is not None}
