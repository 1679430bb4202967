"""Rows of the results tables, built from unit tables (summed by ``metrics.aggregate``).

The schemas live in :mod:`pixelray.results`, which the report reads without the sweep's imports.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import pyarrow as pa

from pixelray import __version__
from pixelray.config import ConfigError, SweepConfig
from pixelray.results import ATTACK_SCHEMA, CELLS_SCHEMA, IDS_SCHEMA, TRANSFER_SCHEMA
from pixelray.spec import Cell

__all__ = [
    "ATTACK_SCHEMA", "CELLS_SCHEMA", "IDS_SCHEMA", "TRANSFER_SCHEMA", "cell_columns", "cell_rows", "common_columns",
    "experiments_of",
]

def versions() -> dict[str, str]:
    import torch

    return {"pixelray_version": __version__, "torch_version": torch.__version__}


def common_columns(config: SweepConfig, dataset: str) -> dict[str, Any]:
    """The columns every row of a run shares."""
    return {"weights": config.weights or "none", "dataset": dataset, "config_hash": config.config_hash, **versions()}


def experiments_of(cell_pairs) -> tuple[dict[str, list[str]], dict[str, Cell]]:
    """cell_id -> the experiments naming it (config order), and cell_id -> Cell (plan order)."""
    names: dict[str, list[str]] = defaultdict(list)
    by_id: dict[str, Cell] = {}
    for exp, cell in cell_pairs:
        if exp not in names[cell.cell_id]:
            names[cell.cell_id].append(exp)
        by_id[cell.cell_id] = cell
    return names, by_id


def _channels_label(cell: Cell) -> str:
    ch = cell.change.channels
    return "all" if ch == "all" else ",".join(map(str, ch))


def cell_columns(cell: Cell, size: tuple[int, int]) -> dict[str, Any]:
    """The columns that describe a cell; ``Cell.from_columns`` rebuilds the cell from them (and
    ``image_size``): a whole-image cell says ``area`` = the side of square images (null otherwise)."""
    change = cell.change
    height, width = size
    area = change.area if change.area is not None else (height if height == width else None)
    return {
        "count": change.count, "amplitude": str(change.amplitude), "area": area, "channels": _channels_label(cell),
        "positions": change.positions, "seed": cell.seed,
    }


def cell_rows(config: SweepConfig, cell_pairs, table: pa.Table | None, size, common) -> list[dict[str, Any]]:
    """Per-unit counts (model, cell_id, n_images, n_wrong) -> rows per (experiment, model, cell), to be summed."""
    names, by_id = experiments_of(cell_pairs)
    unit_rows = table.to_pylist() if table is not None else []
    exp_order = {e.name: i for i, e in enumerate(config.experiments)}
    model_order = {m: i for i, m in enumerate(config.models)}
    cell_order = {cell_id: i for i, cell_id in enumerate(by_id)}
    rows = []
    for r in unit_rows:
        cell = by_id.get(r["cell_id"])
        if cell is None:
            raise ConfigError(f"unit result names cell {r['cell_id']!r}, which is not in this config's plan")
        for exp in names[r["cell_id"]]:
            rows.append({
                **common, "attack": None, "eps": None, "experiment": exp, "model": r["model"],
                **cell_columns(cell, size), "cell_id": r["cell_id"],
                "n_images": r["n_images"], "n_wrong": r["n_wrong"], "n_restored": None,
            })
    rows.sort(key=lambda r: (exp_order[r["experiment"]], model_order[r["model"]], cell_order[r["cell_id"]]))
    return rows
