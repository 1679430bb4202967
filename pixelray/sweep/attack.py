"""Phase 3, attack: adversarial examples per (model, shard), every cell and every judge over them.

The attack runs on the images the ``[eval]`` filter admits (its ``size`` does not apply:
the attack keeps ``[attack] size`` examples of its own). A worker reads the shard once,
makes the examples at every eps with the unit's model, runs every cell over the eligible
ones (those that fool the model after uint8 rounding; every one with ``keep = "all"``) and
has every model of the sweep judge them. It returns per-image bits, which become the unit
file (:func:`attack_unit_table`). The driver then keeps, per (model, eps), the ``size``
eligible examples with the lowest image ids and sums the bits over them
(:mod:`pixelray.sweep.attack_results`): the selection is exact and global, whatever the
shard layout, batch size or order in which units finish. Units run in image-id order,
and a unit whose lowest candidate id lies above ``size`` eligible examples at every eps
(among finished units) is skipped: its images could not be kept.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict

import numpy as np
import pyarrow as pa

from pixelray.config.sweep import AttackConfig, Keep
from pixelray.core.spec import Cell
from pixelray.engine.adversarial import AttackPlan
from pixelray.engine.ladder import LADDER_FIELDS
from pixelray.engine.units import Phase, Unit
from pixelray.store.storage import is_remote, join_uri
from pixelray.sweep.clean import CleanPass, select_eval_set
from pixelray.sweep.context import RunContext

__all__ = ["META_CELLS", "META_JUDGES", "META_SAVED", "AttackPass", "attack_unit_table", "run_attack", "select_kept"]

META_CELLS, META_JUDGES, META_SAVED = b"pixelray.cells", b"pixelray.judges", b"pixelray.saved"


def attack_unit_table(res: dict, eps: tuple[int, ...], cells: list[Cell], judges: tuple[str, ...]) -> pa.Table:
    """A worker's bits as one row per (eps, image): eps (k), image_id, label, success_float (null without
    ``report_float``), success,
    restored (one bool per cell, in the plan's order) and correct_by (one per judge, in the sweep's model
    order), and with ladders the pixels to restore (:data:`~pixelray.engine.ladder.LADDER_FIELDS`, one int per
    ladder); the cell ids, the judges and any saved shards are in the file's metadata."""
    n_eps, n = res["success"].shape

    def per_row(bits: np.ndarray) -> pa.Array:  # (E, K, N) -> (E * N) lists of K
        k = bits.shape[1]
        if k == 0:  # no cells: Arrow has no lists of size 0, and nothing is lost
            return pa.nulls(bits.shape[0] * bits.shape[2], pa.bool_())
        flat = np.ascontiguousarray(bits.transpose(0, 2, 1)).reshape(-1)
        return pa.FixedSizeListArray.from_arrays(pa.array(flat, pa.bool_()), k)

    columns = {
        "eps": pa.array(np.repeat(np.asarray(eps, dtype=np.int64), n), pa.int64()),
        "image_id": pa.array(np.tile(res["image_id"], n_eps), pa.int64()),
        "label": pa.array(np.tile(res["label"], n_eps), pa.int64()),
        "success_float": pa.nulls(n_eps * n, pa.bool_()) if res["success_float"] is None
        else pa.array(res["success_float"].reshape(-1), pa.bool_()),
        "success": pa.array(res["success"].reshape(-1), pa.bool_()),
        "restored": per_row(res["restored"]),
        "correct_by": per_row(res["correct_by"]),
    }
    for name in LADDER_FIELDS if "n_fail" in res else ():  # pixels to restore, one per ladder (-1: none)
        values = np.ascontiguousarray(res[name].transpose(0, 2, 1)).reshape(-1)
        columns[name] = pa.FixedSizeListArray.from_arrays(pa.array(values, pa.int64()), res[name].shape[1])
    return pa.table(columns).replace_schema_metadata({
        META_CELLS: json.dumps([c.cell_id for c in cells]),
        META_JUDGES: json.dumps(list(judges)),
        META_SAVED: json.dumps(res.get("saved") or [None] * n_eps),
    })


def select_kept(image_ids: np.ndarray, eligible: np.ndarray, size: int | None) -> np.ndarray:
    """Indices of the kept examples: the ``size`` eligible ones with the lowest ids (all with None), id order."""
    index = np.flatnonzero(eligible)
    return index[np.argsort(image_ids[index], kind="stable")][:size]


class _KeptSoFar:
    """Eligible image ids per (model, eps) from the attack units finished so far; decides which units to skip."""

    def __init__(self, eps: tuple[int, ...], size: int | None, keep_all: bool):
        self.eps, self.size, self.keep_all = eps, size, keep_all
        self.ids: dict[str, list[list[np.ndarray]]] = defaultdict(lambda: [[] for _ in eps])

    def add(self, unit: Unit, table: pa.Table) -> None:
        t_eps = table["eps"].to_numpy()
        ids = table["image_id"].to_numpy()
        ok = table["success"].to_numpy(zero_copy_only=False)
        for e, k in enumerate(self.eps):
            mine = t_eps == k
            self.ids[unit.model][e].append(ids[mine] if self.keep_all else ids[mine & ok])

    def covers(self, unit: Unit) -> bool:
        """True when ``size`` eligible examples below the unit's lowest candidate id exist at every eps."""
        if self.size is None or self.keep_all or not unit.image_ids:
            return False
        low = unit.image_ids[0]
        per_eps = self.ids[unit.model]
        return all(sum(int((a < low).sum()) for a in parts) >= self.size for parts in per_eps)


class AttackPass:
    """One attack's units (run, resumed or skipped) and the tables of those that ran."""

    def __init__(self, attack: AttackConfig, units: list[Unit], tables: dict[str, pa.Table]):
        self.attack, self.units, self.tables = attack, units, tables

    def stats(self) -> dict:
        done = sum(u.key in self.tables for u in self.units)
        return {"planned": len(self.units), "done": done, "skipped": len(self.units) - done}


def run_attack(ctx: RunContext, clean: CleanPass, attack: AttackConfig) -> AttackPass:
    """Plan one attack's units in image-id order, resume what is done, run the rest (skipping the unneeded)."""
    config, name = ctx.config, attack.name
    keep_all = attack.keep is Keep.ALL
    # keep = "all" knows its examples now: the ``size`` lowest candidate ids.
    candidates = select_eval_set(clean.correct, config.filter, attack.size if keep_all else None)
    info_of = {info.file: info for info in ctx.manifest.shards}
    units = []
    for unit in clean.units:
        wanted = np.intersect1d(clean.shard_ids[(unit.model, unit.shard)], candidates[unit.model])
        if len(wanted):
            units.append(ctx.unit(Phase.ATTACK, unit.model, unit.shard, info_of[unit.shard_name], wanted, name))
    units.sort(key=lambda u: u.image_ids[0])  # lowest ids first: later units may prove unneeded
    # DIR/<attack>/<model>/eps<k>; absolute, as the workers' cwd differs
    save_dir, where = None, config.save_adversarial
    if where:
        save_dir = join_uri(where if is_remote(where) else os.path.abspath(where), name)
    ladders = tuple(dict.fromkeys(ladder for _, ladder in config.ladders(ctx.size)))
    plan = AttackPlan(attack.eps, keep_all, tuple(config.models), save_dir, attack.kind, attack.params,
                      attack.report_float, ladders, attack.size)
    kept = _KeptSoFar(attack.eps, attack.size, keep_all)
    cells = ctx.cells
    weights, classes = config.weights, ctx.num_classes
    tables = ctx.run_units(
        Phase.ATTACK, units, lambda h, u: h.run.remote(u, weights, classes, cells, plan),
        lambda unit, res: attack_unit_table(res, attack.eps, cells, plan.judges),
        on_table=kept.add, skip=kept.covers, label=f"attack:{name}",
    )
    return AttackPass(attack, units, tables)
