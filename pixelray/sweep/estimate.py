"""How long a planned sweep will compute.

Two ways. ``pixelray plan --calibrate`` runs a pilot (:mod:`pixelray.sweep.pilot`): the sweep's own units on a
sample, timed on this machine's device, scaled to the plan; it sees what the config alone cannot (the filter's
rate, the attacks' success, where images break) and every cost beside the model's passes. Or rates per model:
images per second through an inference pass (``forward``) and through a forward and backward pass (``grad``: an
attack's gradient steps), over the plan's figures (bounds where the plan has bounds, so an upper bound):

* :func:`~pixelray.config.run.parse_throughput`: rates a person gives, ``[MODEL=]FORWARD[:GRAD]`` images per
  second (``--throughput``, or ``[run] throughput`` in the config);
* :func:`throughput_from_stats`: a finished run's ``stats.json`` (``by_model``: images, gradient images and
  compute seconds per model and phase), for a cluster whose device is not this machine's.

The units spread over the sweep's workers, so the wall time is about the compute time over the workers.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from pixelray.config.run import GRAD_COST, Throughput, gpu_range, parse_throughput
from pixelray.config.tomlcheck import ConfigError

__all__ = ["Estimate", "Throughput", "estimate", "estimate_for", "format_estimate", "parse_throughput",
           "throughput_from_stats"]

@dataclass(frozen=True)
class Estimate:
    """Compute seconds per model (all its phases), and the sweep's over ``workers`` workers."""

    seconds: dict[str, float]
    by_phase: dict[str, float]  # all models together
    workers: int

    @property
    def compute_s(self) -> float:
        return sum(self.seconds.values())

    @property
    def wall_s(self) -> float:
        return self.compute_s / self.workers

    def device_hours(self) -> float:
        return self.compute_s / 3600


def estimate(plan, rates: Mapping[str, Throughput], workers: int = 1) -> Estimate:
    """The plan's compute time under ``rates`` (one per model of the plan), spread over ``workers``."""
    missing = [m for m in plan.config.models if m not in rates]
    if missing:
        raise ConfigError(f"no throughput for model(s) {missing}; give --throughput MODEL=IMAGES_PER_S (or one "
                          "rate for every model), --stats of a run of the same models, or --calibrate")
    by_phase: dict[str, float] = {}
    seconds = {}
    for model in plan.config.models:
        rate = rates[model]
        seconds[model] = 0.0
        for p in plan.phases:
            t = rate.seconds(p.images, p.grad_images)
            seconds[model] += t
            by_phase[p.phase] = by_phase.get(p.phase, 0.0) + t
    return Estimate(seconds, by_phase, max(1, workers))


def throughput_from_stats(stats: Mapping, models: Iterable[str], source: str) -> dict[str, Throughput]:
    """Each model's rates as a finished run measured them (``stats.json``'s ``by_model``).

    ``forward``: the images of its phases without gradients over their compute seconds; ``grad``: from the
    attack phase, what its seconds leave after its inference images at that rate (``forward / 3`` when the run
    had no gradient passes, or too few to measure). ConfigError when the run lacks a model of the plan.
    """
    by_model = stats.get("by_model") or {}
    rates = {}
    for model in models:
        phases = by_model.get(model)
        if not phases:
            raise ConfigError(f"{source}: no figures for model {model!r} (a run of another config, or of a pixelray "
                              "before stats.json had by_model); give --throughput or --calibrate")
        plain = [p for p in phases.values() if not p["grad_images"] and p["images"]]
        images, seconds = sum(p["images"] for p in plain), sum(p["compute_s"] for p in plain)
        if not images or seconds <= 0:
            raise ConfigError(f"{source}: model {model!r} forwarded no images without gradients there; give "
                              "--throughput or --calibrate")
        forward = images / seconds
        grad_images = sum(p["grad_images"] for p in phases.values())
        grad_s = sum(p["compute_s"] - p["images"] / forward for p in phases.values() if p["grad_images"])
        grad = grad_images / grad_s if grad_images and grad_s > 0 else forward / GRAD_COST
        rates[model] = Throughput(forward, grad, source)
    return rates


def format_estimate(est: Estimate, rates: Mapping[str, Throughput] | None) -> str:
    """The estimate as a person reads it: each model's rates (None: a pilot's) and seconds, then the total."""
    if rates is None:
        lines = ["estimated compute (a pilot of the sweep's units, scaled to the plan):"]
        lines += [f"  {model}: {_duration(seconds)}" for model, seconds in est.seconds.items()]
    else:
        lines = ["estimated compute (the model's passes only, over the plan's figures: at most):"]
        for model, seconds in est.seconds.items():
            r = rates[model]
            lines.append(f"  {model}: {r.forward:,.0f} images/s forward, {r.grad:,.0f} with gradients ({r.source}): "
                         f"{_duration(seconds)}")
        entries = ", ".join(f"'{m}={r.forward:.4g}:{r.grad:.4g}'" for m, r in rates.items())
        lines.append(f"  as a config's rates: [run] throughput = [{entries}]")
    phases = ", ".join(f"{phase} {_duration(s)}" for phase, s in est.by_phase.items())
    lines.append(f"  by phase: {phases}")
    lines.append(f"  total {_duration(est.compute_s)} of device time ({est.device_hours():,.2f} device-hours); "
                 f"over {est.workers} worker(s): about {_duration(est.wall_s)}")
    return "\n".join(lines)


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def estimate_for(plan, *, measure: bool = False, given=(), stats: str | None = None, workers: int | None = None,
                 sample: int = 64, say=lambda line: None) -> tuple[Estimate, dict[str, Throughput] | None] | None:
    """The estimate from the one source asked for (``--calibrate``: a pilot of ``sample`` images per model, see
    :mod:`pixelray.sweep.pilot`; ``--throughput``; ``--stats``; else the config's ``[run] throughput``) and the
    rates it used (None for a pilot), or None without any; ConfigError for two sources or a bad one."""
    import json

    config = plan.config
    asked = [name for name, on in (("--calibrate", measure), ("--throughput", given), ("--stats", stats)) if on]
    if len(asked) > 1:
        raise ConfigError(f"{' and '.join(asked)}: give one source of the models' speed")
    if workers is None:
        workers = config.workers or (gpu_range(config.gpus)[1] if config.gpus is not None else None) or 1
    if measure:
        from pixelray.sweep.pilot import pilot

        return pilot(plan, sample, workers, say), None
    elif stats:
        from pixelray.store.storage import Location

        try:
            figures = json.loads(Location(stats).read_bytes())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"--stats {stats!r}: cannot read it as a run's stats.json ({exc})") from None
        rates = throughput_from_stats(figures, config.models, f"--stats {stats}")
    elif given or config.throughput:
        rates = parse_throughput(given or config.throughput, config.models)
    else:
        return None
    return estimate(plan, rates, workers), rates
