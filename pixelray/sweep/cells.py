"""Phase 2, cells: every cell of the plan over the evaluation-set images of each (model, shard)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from pixelray.core.spec import Cell
from pixelray.engine.units import Phase, Unit
from pixelray.sweep.clean import CleanPass
from pixelray.sweep.context import RunContext

__all__ = ["run_cells"]


def _cells_table(unit: Unit, res: dict, cells: list[Cell]) -> pa.Table:
    n = len(cells)
    return pa.table({
        "model": pa.array([unit.model] * n, pa.string()),
        "cell_id": pa.array([c.cell_id for c in cells], pa.string()),
        "n_images": pa.array(res["n_images"], pa.int64()),
        "n_wrong": pa.array(res["n_wrong"], pa.int64()),
    })


def run_cells(ctx: RunContext, clean: CleanPass, eval_ids: dict[str, np.ndarray]) -> pa.Table | None:
    """Run the phase; returns the per-unit counts of every cell (model, cell_id, n_images, n_wrong)."""
    cells = ctx.cells
    units = []
    for unit, (uri, info) in zip(clean.units, [s for _ in ctx.config.models for s in ctx.shards()], strict=True):
        wanted = np.intersect1d(clean.shard_ids[(unit.model, unit.shard)], eval_ids[unit.model])
        if len(wanted):
            units.append(ctx.unit(Phase.CELLS, unit.model, uri, info, wanted))
    weights, classes = ctx.config.weights, ctx.num_classes
    tables = ctx.run_units(
        Phase.CELLS, units, lambda h, u: h.run.remote(u, weights, classes, cells),
        lambda unit, res: _cells_table(unit, res, cells),
    )
    return pa.concat_tables([tables[u.key] for u in units]) if units else None
