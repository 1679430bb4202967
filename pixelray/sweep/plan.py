"""``pixelray plan``: what a sweep will do before it runs: units, images forwarded per model and phase, data read.

No model runs and no Ray starts: the config, the data (the manifest and every shard's footer, ids and
labels) and the checkpoints are checked exactly as :func:`~pixelray.sweep.run_sweep` checks them, so a
config the sweep would refuse is refused here with the same line. The images a model forwards depend on
its predictions where the ``[eval]`` filter or an attack's success decides which images go on: those
figures are upper bounds (marked ``<=``), reached when every image passes the filter and every attack
succeeds; the clean phase, and the cells phase under ``filter = "none"``, are exact. A finished run's
``stats.json`` holds the same counts (``images`` per phase, summed over models), so a plan can be checked
against what was done. "Images forwarded" counts an image once per inference pass it is in, times the cells
it is changed under; an attack's gradient passes (FGSM: one forward and backward per candidate and eps; PGD:
``steps`` of them: the attack's :class:`~pixelray.attacks.PassCost`) are counted apart, as "with gradients".
With a throughput per model (:mod:`pixelray.sweep.estimate`) the plan becomes a time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from pixelray.config.sweep import Filter, Keep, SweepConfig
from pixelray.core.spec import PixelChange

__all__ = ["PhasePlan", "SweepPlan", "check_cost", "format_plan", "plan_sweep"]


@dataclass(frozen=True)
class PhasePlan:
    """One phase of one model: its units and the images its worker forwards (x cells), exact or a bound."""

    phase: str
    units: int
    images: int
    exact: bool
    note: str = ""
    grad_images: int = 0  # images through a forward and backward pass (an attack's gradient steps)


@dataclass(frozen=True)
class SweepPlan:
    """A sweep's work per model (every model does the same work), and what it reads."""

    config: SweepConfig
    num_images: int
    shards: int
    image_size: tuple[int, int]
    num_classes: int
    cells: int
    pixel_cells: int
    ladders: tuple[tuple[str, int], ...]  # (ladder label, points)
    phases: tuple[PhasePlan, ...]
    shard_bytes: int | None  # the shards' total size on disk (None: not a local file)
    manifest: object = None  # the data set's Manifest, as checked
    uris: tuple[str, ...] = ()  # each shard's path or URI, in manifest order

    @property
    def models(self) -> int:
        return len(self.config.models)

    def images(self, phase: str | None = None) -> int:
        """Images forwarded (x cells) by every model together, in one phase or in all."""
        return self.models * sum(p.images for p in self.phases if phase in (None, p.phase))

    def grad_images(self, phase: str | None = None) -> int:
        """Images through a forward and backward pass, every model together, in one phase or in all."""
        return self.models * sum(p.grad_images for p in self.phases if phase in (None, p.phase))


def _eval_bound(config: SweepConfig, n: int) -> tuple[int, bool]:
    """The evaluation set's size: exact under filter "none", else an upper bound."""
    size = n if config.eval_size is None else min(config.eval_size, n)
    return size, config.filter is Filter.NONE


def _ladder_bound(points: tuple[int, ...], search: str, refine: bool) -> int:
    """The most forward passes one image can take on a ladder."""
    passes = len(points) if search == "scan" else 1 + math.ceil(math.log2(len(points)))
    if refine:
        gaps = [b - a for a, b in zip((0, *points), points, strict=False)]
        passes += math.ceil(math.log2(max(gaps))) if max(gaps) > 1 else 0
    return passes


def plan_sweep(config: SweepConfig, checked: tuple | None = None) -> SweepPlan:
    """The plan of ``config``'s sweep (see the module docstring); ConfigError / SweepError as the sweep gives.

    ``checked``: the (manifest, shard URIs) the sweep has already checked (the config's and checkpoints' checks
    done too); None checks them here.
    """
    import os

    from pixelray.attacks import get_attack

    if checked is None:
        from pixelray.sweep.driver import check_checkpoints, check_data

        config.check_placeholders()
        checked = check_data(config)
        check_checkpoints(config, checked[0].num_classes)
    manifest, uris = checked
    size = (manifest.height, manifest.width)
    cells = config.unique_cells(size)
    ladders = list(dict.fromkeys(lad for _, lad in config.ladders(size)))
    n, shards = manifest.num_images, len(manifest.shards)
    evaluated, exact = _eval_bound(config, n)
    phases = [PhasePlan("clean", shards, n, True)]
    if cells:
        phases.append(PhasePlan("cells", shards, evaluated * len(cells), exact,
                                f"{evaluated} images x {len(cells)} cells"))
    per_ladder = [_ladder_bound(lad.points(*size), lad.search, lad.refine) for lad in ladders]
    worsts = list(dict.fromkeys(w for _, w in config.worst_cases()))
    per_worst = [(evaluated if w.size is None else min(w.size, evaluated)) * w.budget
                 * _ladder_bound(w.points(*size), w.ladder.search, False) for w in worsts]
    if ladders or worsts:
        note = "every image walks every point: those that break leave sooner"
        if worsts:
            note += "; worst-case searches spend their whole budget at every point they try"
        phases.append(PhasePlan("failure", shards, evaluated * sum(per_ladder) + sum(per_worst), False, note))
    judges = len(config.models) - 1  # the other models' verdicts on each example (the attacked one's is its own)
    config.check_attacks(size)
    for attack in config.attack_runs:
        cost = get_attack(attack.kind).passes(dict(attack.params), attack.report_float)
        candidates = n if attack.keep is Keep.SUCCESSFUL or attack.size is None else min(attack.size, n)
        restore = min(candidates, shards * attack.size) if attack.size is not None else candidates
        per_eps = candidates * (cost.forward + len(cells) + judges) + restore * sum(per_ladder)
        phases.append(PhasePlan(f"attack:{attack.name}", shards, len(attack.eps) * per_eps, False,
                                f"{candidates} candidates x {len(attack.eps)} eps, {cost.forward} verdict pass(es) "
                                f"and {cost.grad} gradient pass(es) each; cells and judges over the examples "
                                "that fool the model", len(attack.eps) * candidates * cost.grad))
    local = "://" not in config.data or config.data.startswith("file://")
    shard_bytes = sum(os.path.getsize(u.removeprefix("file://")) for u in uris) if local else None
    ladder_info = tuple((lad.label, len(lad.points(*size))) for lad in ladders)
    pixel = sum(isinstance(c.change, PixelChange) for c in cells)
    return SweepPlan(config, n, shards, size, manifest.num_classes, len(cells), pixel, ladder_info, tuple(phases),
                     shard_bytes, manifest, tuple(uris))


def format_plan(plan: SweepPlan) -> str:
    """The plan as a person reads it: one table per model (every model does the same), then the totals."""
    c = plan.config
    h, w = plan.image_size
    lines = [
        f"config {c.config_hash}: {plan.models} model(s), {plan.num_images:,} images ({h}x{w}) in {plan.shards} "
        f"shard(s), {plan.cells} cell(s) ({plan.pixel_cells} pixel changes), {len(plan.ladders)} ladder(s), "
        f"{len(c.attacks)} attack(s); [eval] filter = {c.filter.value!r}, size = {c.eval_size}, "
        f"batch_size = {c.batch_size}",
    ]
    lines += [f"ladder {label}: {points} points" for label, points in plan.ladders]
    for _, worst in c.worst_cases():
        images = "every evaluated image" if worst.size is None else f"at most {worst.size} images per model"
        lines.append(f"worst case {worst.label}: {len(worst.points(h, w))} points, budget {worst.budget} forward "
                     f"passes per image and point, {images}")
    lines.append("per model:")
    lines.append(f"  {'phase':<16} {'units':>6} {'images forwarded':>18} {'with gradients':>15}  "
                 f"{'passes of <= batch_size':>24}")
    for p in plan.phases:
        mark = "" if p.exact else "<= "
        batches = math.ceil(p.images / c.batch_size) + math.ceil(p.grad_images / c.batch_size)
        grad = (mark if p.grad_images else "") + f"{p.grad_images:,}"
        lines.append(f"  {p.phase:<16} {p.units:>6} {mark + f'{p.images:,}':>18} {grad:>15}  "
                     f"{mark + f'{batches:,}':>24}" + (f"  ({p.note})" if p.note else ""))
    reads = len(plan.phases) * plan.models
    read = "" if plan.shard_bytes is None else f", {reads * plan.shard_bytes / 1e6:,.1f} MB"
    lines.append(f"all models: <= {plan.images():,} images forwarded, <= {plan.grad_images():,} with gradients; "
                 f"the shards read {reads} time(s){read}")
    if c.max_cost is not None:
        verdict = "within it" if plan.images() + plan.grad_images() <= c.max_cost else \
            "above it: the sweep refuses to start"
        lines.append(f"[run] max_cost = {c.max_cost:,} images: {verdict}")
    return "\n".join(lines)


def check_cost(plan: SweepPlan) -> None:
    """SweepError when the plan may cost more than ``[run] max_cost`` allows: images forwarded (all models, with
    gradients or not), or device-hours estimated under ``[run] throughput``; no limit: nothing to check."""
    from pixelray.errors import SweepError

    c = plan.config
    cost = plan.images() + plan.grad_images()
    if c.max_cost is not None and cost > c.max_cost:
        raise SweepError(f"[run] max_cost = {c.max_cost:,}: this sweep forwards up to {cost:,} images (all models; "
                         "`pixelray plan` shows where); raise max_cost, or shrink the grid, the models or [eval] size")
    if c.max_hours is not None:
        from pixelray.config.run import parse_throughput
        from pixelray.sweep.estimate import estimate

        hours = estimate(plan, parse_throughput(c.throughput, c.models)).device_hours()
        if hours > c.max_hours:
            raise SweepError(f"[run] max_cost = '{c.max_hours:g} device-hours': this sweep may take {hours:,.2f} "
                             "device-hours under [run] throughput (`pixelray plan` shows where); raise max_cost, or "
                             "shrink the grid, the models or [eval] size")
