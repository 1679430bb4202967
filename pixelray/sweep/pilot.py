"""``pixelray plan --calibrate``: the sweep's own units on a sample of its data, timed here and scaled to the plan.

A plan's figures are exact where the config alone decides them and bounds elsewhere: how many images the
``[eval]`` filter admits, how many examples an attack finds, where an image breaks on a ladder. A pilot
measures those too. Every model runs the sweep's worker code (:class:`~pixelray.engine.worker.ModelWorker`,
in this process, on ``[run] device``) over the ``sample`` lowest ids of the first shard: the clean pass, then
the cells, the ladders and each attack over the sample's images that the filter admits. Each phase's compute
seconds are scaled to the whole run:

* clean: by the images over the sample;
* cells and failure: by the evaluation set the filter would admit at the sample's rate (cut to ``[eval]
  size``) over the sample's admitted images (a worst-case ladder: by the ``size`` images it searches);
* an attack: likewise over its candidates, and where ``keep = "successful"`` with a ``size`` the sweep skips
  the units it no longer needs, so only the units that find ``size`` examples at the sample's success rate
  (the lowest rate of its eps decides) count; its restore ladders search at most ``size`` examples per unit,
  which the pilot's own ``size`` mirrors.

What the sample does not show (an image set whose first shard is unlike the rest) the pilot cannot know.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from pixelray.config.sweep import Keep
from pixelray.sweep.estimate import Estimate

__all__ = ["pilot"]


def pilot(plan, sample: int = 64, workers: int = 1, say: Callable[[str], None] = lambda line: None) -> Estimate:
    """The plan's compute time from the sweep's units on ``sample`` images per model (see the module docstring)."""
    from pixelray.engine.units import Phase, Unit
    from pixelray.engine.worker import ModelWorker
    from pixelray.shards import read_labels
    from pixelray.sweep.clean import select_eval_set

    c, n = plan.config, plan.num_images
    uri, info = plan.uris[0], plan.manifest.shards[0]
    ids = np.sort(read_labels(uri)[0])[:sample]
    worker = ModelWorker(c.device, c.threads, c.batch_size, c.amp, c.cells_per_pass)
    weights, classes, size = c.weights, plan.num_classes, plan.image_size
    cells = c.unique_cells(size)
    ladders = tuple(dict.fromkeys(lad for _, lad in c.ladders(size)))
    worsts = tuple(dict.fromkeys(w for _, w in c.worst_cases()))

    def run(phase: Phase, model: str, image_ids, *args, attack: str | None = None) -> dict:
        unit = Unit(phase, model, uri, info.file, tuple(int(i) for i in image_ids), None, attack)
        return worker.run(unit, weights, classes, *args)

    say(f"calibrating: the sweep's units over {len(ids)} image(s) of {info.file}, per model, on {worker.device}")
    seconds = {m: {} for m in c.models}
    correct = {}
    for m in c.models:
        done = run(Phase.CLEAN, m, ids)
        correct[m] = dict(zip(done["image_id"].tolist(), (done["prediction"] == done["label"]).tolist(), strict=True))
        seconds[m]["clean"] = done["compute_s"] * n / len(ids)
    admitted = select_eval_set(correct, c.filter, None)
    for m in c.models:
        mine = admitted[m]
        if not len(mine):
            raise ValueError(f"--calibrate: none of the sample's {len(ids)} images passes [eval] filter = "
                             f"{c.filter.value!r} for {m!r}; sample more (--sample) or give --throughput")
        share = len(mine) / len(ids)
        evaluated = n * share if c.eval_size is None else min(c.eval_size, n * share)
        scale = evaluated / len(mine)
        if cells:
            seconds[m]["cells"] = run(Phase.CELLS, m, mine, cells)["compute_s"] * scale
        if ladders:
            seconds[m]["failure"] = run(Phase.FAILURE, m, mine, (), None, ladders)["compute_s"] * scale
        for worst in worsts:  # each over the sample's images, scaled to the `size` it searches in the run
            searched = evaluated if worst.size is None else min(worst.size, evaluated)
            took = run(Phase.FAILURE, m, mine, (), None, (), ((worst, None),))["compute_s"]
            seconds[m]["failure"] = seconds[m].get("failure", 0.0) + took * searched / len(mine)
        for attack in c.attack_runs:
            seconds[m][f"attack:{attack.name}"] = _attack_seconds(plan, attack, m, mine, n * share, run, cells,
                                                                  ladders)
        say(f"  {m}: " + ", ".join(f"{phase} {s:.1f} s" for phase, s in seconds[m].items()))
    by_phase: dict[str, float] = {}
    for per in seconds.values():
        for phase, s in per.items():
            by_phase[phase] = by_phase.get(phase, 0.0) + s
    return Estimate({m: sum(per.values()) for m, per in seconds.items()}, by_phase, max(1, workers))


def _attack_seconds(plan, attack, model: str, mine: np.ndarray, admitted: float, run, cells, ladders) -> float:
    """One attack's compute seconds for ``model`` in the whole run, from its unit over the sample's candidates."""
    from pixelray.engine.adversarial import AttackPlan
    from pixelray.engine.units import Phase

    keep_all = attack.keep is Keep.ALL
    candidates = min(attack.size, admitted) if keep_all and attack.size is not None else admitted
    size = attack.size
    if size is not None:  # the restore ladders search at most `size` examples per unit: as many per image here
        size = max(1, round(size * len(mine) * plan.shards / max(candidates, 1)))
    job = AttackPlan(attack.eps, keep_all, tuple(plan.config.models), None, attack.kind, attack.params,
                     attack.report_float, ladders, size)
    done = run(Phase.ATTACK, model, mine, cells, job, attack=attack.name)
    if attack.size is not None and not keep_all:  # the sweep skips the units it no longer needs
        rate = float(np.asarray(done["success"]).mean(axis=1).min())
        if rate > 0:
            per_unit = candidates / plan.shards
            candidates = min(candidates, math.ceil(attack.size / (per_unit * rate)) * per_unit)
    return done["compute_s"] * candidates / len(mine)
