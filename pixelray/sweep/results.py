"""Rows of the results tables, built from unit tables (summed by ``metrics.aggregate``).

The schemas live in :mod:`pixelray.store.schemas`, which the report reads without the sweep's imports.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any

import pyarrow as pa

from pixelray import __version__
from pixelray.config.sweep import ConfigError, SweepConfig
from pixelray.core.metrics import equivalent_count
from pixelray.core.spec import PIXEL_CHANGE, Cell, Corruption
from pixelray.store.schemas import ATTACK_SCHEMA, CELLS_SCHEMA, FAILURE_SCHEMA, IDS_SCHEMA, TRANSFER_SCHEMA

__all__ = [
    "ATTACK_SCHEMA", "CELLS_SCHEMA", "FAILURE_SCHEMA", "IDS_SCHEMA", "TRANSFER_SCHEMA", "add_equivalent_pixels",
    "cell_columns", "cell_rows", "common_columns", "experiments_of",
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


def _channels_label(cell: Cell) -> str | None:
    ch = cell.change.channels
    return "all" if ch == "all" else ",".join(map(str, ch))


def cell_columns(cell: Cell, size: tuple[int, int]) -> dict[str, Any]:
    """The columns that name a cell: its family, then the change's or the corruption's parameters;
    ``Cell.from_columns`` rebuilds a pixel-change cell from them (and ``image_size``): a whole-image cell
    says ``area`` = the side of square images (null otherwise)."""
    change = cell.change
    if isinstance(change, Corruption):
        return {
            "family": change.family, "severity": change.severity, "count": None, "amplitude": None, "area": None,
            "channels": None, "positions": None, "seed": cell.seed,
        }
    height, width = size
    area = change.area if change.area is not None else (height if height == width else None)
    return {
        "family": PIXEL_CHANGE, "severity": None, "count": change.count, "amplitude": str(change.amplitude),
        "area": area, "channels": _channels_label(cell), "positions": change.positions, "seed": cell.seed,
    }


def add_equivalent_pixels(rows: list[dict[str, Any]], size: tuple[int, int]) -> list[dict[str, Any]]:
    """Set ``equivalent_pixels`` (and its interval) on corruption rows without an attack.

    The reference curve is the same model's pixel-change rows of full amplitude, over the
    whole image and every channel, drawn per image, with the same seed: wrong rate against
    count (see :func:`pixelray.core.metrics.equivalent_count`). Other rows get nulls.
    """
    curves: dict[tuple, dict[int, float]] = defaultdict(dict)
    whole = {None, size[0]} if size[0] == size[1] else {None}
    for r in rows:
        if (r["family"] == PIXEL_CHANGE and r["attack"] is None and r["amplitude"] == "full" and r["area"] in whole
                and r["channels"] == "all" and r["positions"] == "per-image" and r["n_images"]):
            curves[(r["model"], r["weights"], r["seed"])].setdefault(r["count"], r["wrong_rate"])
    for r in rows:
        r["equivalent_pixels"] = r["equivalent_pixels_low"] = r["equivalent_pixels_high"] = None
        curve = curves.get((r["model"], r["weights"], r["seed"]), {})
        if r["family"] == PIXEL_CHANGE or r["attack"] is not None or len(curve) < 2 or not r["n_images"]:
            continue
        counts, rates = list(curve), list(curve.values())
        for key, target in (("equivalent_pixels", "wrong_rate"), ("equivalent_pixels_low", "ci_low"),
                            ("equivalent_pixels_high", "ci_high")):
            value = equivalent_count(counts, rates, r[target])
            r[key] = None if math.isnan(value) else value
    return rows


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
