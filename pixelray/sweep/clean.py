"""Phase 1, clean: every model predicts every image once; then the evaluation set is chosen."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from pixelray.config.sweep import Filter
from pixelray.engine.units import Phase, Unit, model_slug
from pixelray.sweep.context import RunContext

__all__ = ["CleanPass", "run_clean", "select_eval_set", "write_eval_ids"]


@dataclass
class CleanPass:
    """What the clean phase leaves for the others.

    Attributes:
        units: one per (model, shard), models in config order.
        tables: unit key -> model, image_id, label, prediction, correct.
        correct: model -> {image_id: classified correctly}.
        shard_ids: (model, shard uri) -> the shard's image ids.
    """

    units: list[Unit]
    tables: dict[str, pa.Table]
    correct: dict[str, dict[int, bool]]
    shard_ids: dict[tuple[str, str], np.ndarray]

    def table(self) -> pa.Table:
        """Every prediction, sorted by model and image id (``clean.parquet``)."""
        table = pa.concat_tables([self.tables[u.key] for u in self.units])
        return table.sort_by([("model", "ascending"), ("image_id", "ascending")])


def _clean_table(unit: Unit, res: dict) -> pa.Table:
    n = len(res["image_id"])
    return pa.table({
        "model": pa.array([unit.model] * n, pa.string()),
        "image_id": pa.array(res["image_id"], pa.int64()),
        "label": pa.array(res["label"], pa.int64()),
        "prediction": pa.array(res["prediction"], pa.int64()),
        "correct": pa.array(res["prediction"] == res["label"], pa.bool_()),
    })


def run_clean(ctx: RunContext) -> CleanPass:
    config = ctx.config
    units = [ctx.unit(Phase.CLEAN, m, uri, info) for m in config.models for uri, info in ctx.shards()]
    weights, classes = config.weights, ctx.num_classes
    tables = ctx.run_units(Phase.CLEAN, units, lambda h, u: h.run.remote(u, weights, classes), _clean_table)
    correct: dict[str, dict[int, bool]] = {m: {} for m in config.models}
    shard_ids: dict[tuple[str, str], np.ndarray] = {}
    for unit in units:
        table = tables[unit.key]
        ids = table["image_id"].to_numpy()
        correct[unit.model].update(zip(ids.tolist(), table["correct"].to_pylist(), strict=True))
        shard_ids[(unit.model, unit.shard)] = ids
    return CleanPass(units, tables, correct, shard_ids)


def select_eval_set(
    clean: dict[str, dict[int, bool]], filt: Filter, size: int | None
) -> dict[str, np.ndarray]:
    """The evaluation-set image ids per model: filtered, then the ``size`` lowest ids.

    Args:
        clean: model -> {image_id: correct}.
        filt: ``all`` (correct for every model), ``per-model``, or ``none``.
        size: keep at most this many ids (lowest first); None keeps all.
    """
    models = list(clean)
    if filt is Filter.ALL:
        common = set.intersection(*(set(i for i, ok in clean[m].items() if ok) for m in models))
        ids = np.sort(np.fromiter(common, dtype=np.int64, count=len(common)))[:size]
        return {m: ids for m in models}
    out = {}
    for m in models:
        keep = [i for i, ok in clean[m].items() if ok] if filt is Filter.PER_MODEL else list(clean[m])
        out[m] = np.sort(np.asarray(keep, dtype=np.int64))[:size]
    return out


def write_eval_ids(ctx: RunContext, eval_ids: dict[str, np.ndarray]) -> None:
    """``image_ids.txt`` (or ``image_ids/<model>.txt`` with the per-model filter): the evaluated images."""
    run_dir = ctx.run_dir
    if ctx.config.filter is Filter.PER_MODEL:
        for m, ids in eval_ids.items():
            run_dir.file("image_ids", f"{model_slug(m)}.txt").write_text("".join(f"{i}\n" for i in ids))
    else:
        run_dir.file("image_ids.txt").write_text("".join(f"{i}\n" for i in eval_ids[ctx.config.models[0]]))
