"""Phase "failure": every ladder over the evaluation-set images of each (model, shard); ``failure.parquet``.

A ladder (``[[experiment]] family = "pixels_to_failure"``) gives each image one nested sequence of
pixel changes; a unit searches the smallest ladder point at which the model misclassifies each image
(:mod:`pixelray.engine.ladder`). Pixels to failure is defined for images the model classifies correctly
unchanged: with ``[eval] filter = "none"`` the others are left out of this phase. The attack phase runs the
same ladders over its examples (pixels to restore); :func:`restore_rows` turns those into rows here too.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

from pixelray.core.ladder import FAMILY, Ladder
from pixelray.core.worst import KIND as WORST
from pixelray.core.worst import WorstCase
from pixelray.engine.ladder import LADDER_FIELDS
from pixelray.engine.units import Phase, Unit
from pixelray.sweep.clean import CleanPass
from pixelray.sweep.context import RunContext

__all__ = ["failure_rows", "failure_unit_table", "ladder_columns", "restore_rows", "run_failure"]


def failure_unit_table(res: dict, ladders: list[Ladder], worsts: list[WorstCase] = ()) -> pa.Table:
    """A worker's per (ladder, image) counts as one row each: ladder (its label), image_id, label, the fields;
    then its worst-case ladders' (``n_fail_refined`` -1), over the images each searched."""
    n = len(res["image_id"])
    parts = []
    if ladders:
        table = {
            "ladder": pa.array(np.repeat([ladder.label for ladder in ladders], n), pa.string()),
            "image_id": pa.array(np.tile(res["image_id"], len(ladders)), pa.int64()),
            "label": pa.array(np.tile(res["label"], len(ladders)), pa.int64()),
        }
        for name in LADDER_FIELDS:
            table[name] = pa.array(np.asarray(res[name]).reshape(-1), pa.int64())
        parts.append(pa.table(table))
    for j, worst in enumerate(worsts):
        searched = np.flatnonzero(np.asarray(res["worst_n_passes"])[j] >= 0)
        table = {"ladder": pa.array([worst.label] * len(searched), pa.string()),
                 "image_id": pa.array(res["image_id"][searched], pa.int64()),
                 "label": pa.array(res["label"][searched], pa.int64())}
        for name in LADDER_FIELDS:
            values = np.full(len(searched), -1) if name == "n_fail_refined" else res[f"worst_{name}"][j][searched]
            table[name] = pa.array(values, pa.int64())
        parts.append(pa.table(table))
    return pa.concat_tables(parts)


def run_failure(ctx: RunContext, clean: CleanPass, eval_ids: dict[str, np.ndarray], ladders: list[Ladder],
                worsts: list[WorstCase] = ()) -> pa.Table | None:
    """Run the phase over the images each model classifies correctly; the per-unit tables, concatenated. A
    worst-case ladder with a ``size`` searches that many of them per model, lowest ids first."""
    if not ladders and not worsts:
        return None
    units: list[Unit] = []
    cutoffs: dict[str, list[int | None]] = {}
    for model in ctx.config.models:
        correct = clean.correct[model]
        mine = np.asarray([i for i in eval_ids[model] if correct[int(i)]], dtype=np.int64)
        cutoffs[model] = [None if w.size is None or w.size >= len(mine) else int(np.sort(mine)[w.size - 1])
                          for w in worsts]
    for unit, (uri, info) in zip(clean.units, [s for _ in ctx.config.models for s in ctx.shards()], strict=True):
        correct = clean.correct[unit.model]
        wanted = [i for i in np.intersect1d(clean.shard_ids[(unit.model, unit.shard)], eval_ids[unit.model])
                  if correct[int(i)]]
        if wanted:
            units.append(ctx.unit(Phase.FAILURE, unit.model, uri, info, wanted))
    weights, classes = ctx.config.weights, ctx.num_classes

    def submit(handle, unit: Unit):
        return handle.run.remote(unit, weights, classes, (), None, ladders,
                                 tuple(zip(worsts, cutoffs[unit.model], strict=True)))

    def to_table(unit: Unit, res: dict) -> pa.Table:
        table = failure_unit_table(res, ladders, worsts)
        return table.append_column("model", pa.array([unit.model] * len(table), pa.string()))

    tables = ctx.run_units(Phase.FAILURE, units, submit, to_table)
    return pa.concat_tables([tables[u.key] for u in units]) if units else None


def ladder_columns(ladder: Ladder, size: tuple[int, int]) -> dict[str, Any]:
    """The columns that name a ladder; ``Ladder.from_columns`` rebuilds it from them (and ``image_size``).
    A whole-image ladder says ``area`` = the side of square images; ``max_count`` is always the last point."""
    height, width = size
    area = ladder.area if ladder.area is not None else (height if height == width else None)
    return {
        "family": FAMILY, "kind": "random", "ladder_id": ladder.ladder_id, "amplitude": str(ladder.amplitude),
        "area": area, "channels": "all" if ladder.channels == "all" else ",".join(map(str, ladder.channels)),
        "seed": ladder.seed, "steps_per_octave": ladder.steps_per_octave,
        "max_count": ladder.points(height, width)[-1], "search": ladder.search, "refine": ladder.refine,
    }


def _fields(values: dict[str, int], refine: bool) -> dict[str, Any]:
    """The unit table's integers as row values: -1 is null (no flip; no refinement)."""
    n_fail = values["n_fail"]
    return {
        "n_fail": None if n_fail < 0 else n_fail,
        "n_fail_refined": values["n_fail_refined"] if refine and values["n_fail_refined"] >= 0 else None,
        "n_last_correct": None if values["n_last_correct"] < 0 else values["n_last_correct"],
        "n_passes": values["n_passes"],
    }


def failure_rows(config, ladder_pairs: list[tuple[str, Ladder]], table: pa.Table | None, size, common,
                 worst_pairs: list[tuple[str, WorstCase]] = ()) -> list[dict[str, Any]]:
    """Unit rows -> failure.parquet rows per (experiment, model, ladder, image), in config and id order; then the
    worst-case ladders' (``experiment`` = the attack's name, ``kind = "worst_case"``)."""
    if table is None:
        return []
    by_label: dict[str, Ladder | WorstCase] = {ladder.label: ladder for _, ladder in ladder_pairs}
    by_label.update({worst.label: worst for _, worst in worst_pairs})
    experiments: dict[str, list[str]] = {}
    for exp, found in [*ladder_pairs, *worst_pairs]:
        experiments.setdefault(found.label, []).append(exp)
    exp_order = {e.name: i for i, e in enumerate(config.experiments)}
    exp_order.update({name: len(exp_order) + i for i, (name, _) in enumerate(worst_pairs)})
    model_order = {m: i for i, m in enumerate(config.models)}
    rows = []
    for r in table.to_pylist():
        found = by_label[r["ladder"]]
        if isinstance(found, WorstCase):
            columns = {**ladder_columns(found.ladder, size), "kind": WORST, "attack": found.attack,
                       "attack_params": found.params_label, "budget": found.budget}
            fields = _fields(r, False)
        else:
            columns = {**ladder_columns(found, size), "attack": None, "attack_params": None}
            fields = _fields(r, found.refine)
        for exp in experiments[r["ladder"]]:
            rows.append({**common, "experiment": exp, "model": r["model"], "eps": None, "target": "wrong",
                         "image_id": r["image_id"], "label": r["label"], **columns, **fields,
                         "image_size": size[0]})
    rows.sort(key=lambda r: (exp_order[r["experiment"]], model_order[r["model"]], r["ladder_id"], r["image_id"]))
    return rows


def restore_rows(ladder_pairs: list[tuple[str, Ladder]], table: pa.Table, kept: np.ndarray, size,
                 base: dict[str, Any]) -> list[dict[str, Any]]:
    """failure.parquet rows (``target = "right"``) of the kept examples ``kept`` (row indices into an attack
    unit table with the ladder columns); ``base`` holds the model, attack, parameters and eps."""
    if "n_fail" not in table.column_names or not ladder_pairs:
        return []
    unique = list(dict.fromkeys(ladder for _, ladder in ladder_pairs))  # the attack unit's ladders, in order
    width = len(unique)
    values = {name: table[name].combine_chunks().flatten().to_numpy().reshape(-1, width)[kept]
              for name in LADDER_FIELDS}
    ids, labels = table["image_id"].to_numpy()[kept], table["label"].to_numpy()[kept]
    if (values["n_passes"] < 0).any():  # the unit searched only the examples that could be kept: these were
        raise ValueError("a kept adversarial example has no pixels to restore: its unit did not search it")
    rows = []
    for exp, ladder in ladder_pairs:
        j, columns = unique.index(ladder), ladder_columns(ladder, size)
        for i in range(len(kept)):
            found = {name: int(values[name][i, j]) for name in LADDER_FIELDS}
            rows.append({**base, "experiment": exp, "target": "right", "image_id": int(ids[i]),
                         "label": int(labels[i]), **columns, **_fields(found, ladder.refine), "image_size": size[0]})
    return rows
