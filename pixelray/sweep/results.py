"""The results tables: their schemas, and rows built from unit tables (summed by ``metrics.aggregate``)."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import pyarrow as pa

from pixelray import __version__
from pixelray.config import ConfigError, SweepConfig
from pixelray.spec import Cell

__all__ = [
    "ATTACK_SCHEMA", "CELLS_SCHEMA", "IDS_SCHEMA", "TRANSFER_SCHEMA", "cell_columns", "cell_rows", "common_columns",
    "experiments_of",
]

CELLS_SCHEMA = pa.schema([
    ("experiment", pa.string()), ("model", pa.string()), ("weights", pa.string()),
    ("attack", pa.string()), ("eps", pa.float64()), ("count", pa.int64()), ("amplitude", pa.string()),
    ("area", pa.int64()), ("channels", pa.string()), ("positions", pa.string()), ("seed", pa.int64()),
    ("n_images", pa.int64()), ("n_wrong", pa.int64()), ("n_restored", pa.int64()), ("accuracy", pa.float64()),
    ("wrong_rate", pa.float64()), ("restored_rate", pa.float64()), ("ci_low", pa.float64()),
    ("ci_high", pa.float64()), ("pixel_index", pa.float64()), ("image_size", pa.int64()), ("dataset", pa.string()),
    ("config_hash", pa.string()), ("pixelray_version", pa.string()), ("torch_version", pa.string()),
])

_RUN_COLUMNS = [
    ("dataset", pa.string()), ("config_hash", pa.string()),
    ("pixelray_version", pa.string()), ("torch_version", pa.string()),
]

ATTACK_SCHEMA = pa.schema([
    ("model", pa.string()), ("weights", pa.string()), ("attack", pa.string()), ("eps", pa.float64()),
    ("keep", pa.string()), ("n_attacked", pa.int64()), ("n_success_float", pa.int64()), ("n_success", pa.int64()),
    ("success_rate_float", pa.float64()), ("success_rate", pa.float64()), ("ci_low", pa.float64()),
    ("ci_high", pa.float64()), ("n_kept", pa.int64()), ("image_size", pa.int64()), *_RUN_COLUMNS,
])

TRANSFER_SCHEMA = pa.schema([
    ("source_model", pa.string()), ("target_model", pa.string()), ("weights", pa.string()),
    ("attack", pa.string()), ("eps", pa.float64()), ("n_images", pa.int64()), ("n_correct", pa.int64()),
    ("n_fooled", pa.int64()), ("fooled_rate", pa.float64()), ("ci_low", pa.float64()), ("ci_high", pa.float64()),
    *_RUN_COLUMNS,
])

IDS_SCHEMA = pa.schema([("model", pa.string()), ("eps", pa.float64()), ("image_id", pa.int64())])


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
    for row in rows:
        del row["cell_id"]
    return rows
