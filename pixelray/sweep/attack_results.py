"""The attack's tables, from the attack units' per-image bits.

Attack rows of ``cells.parquet`` have ``attack`` (e.g. ``"fgsm"``, ``"pgd"``), its
parameters as canonical JSON in ``attack_params`` (``{}`` for FGSM; e.g. PGD's steps,
step, random_start and seed), and ``eps`` = k/255 (the radius in [0, 1] pixel units, as
``attacks.fgsm`` takes it; ``[attack] eps`` gives k).
``n_images`` counts the kept examples, ``n_restored`` those the model classifies
correctly again after the pixel change, ``restored_rate = n_restored / n_images``;
``n_wrong = n_images - n_restored`` (still misclassified), so ``wrong_rate``, the
interval and ``pixel_index`` keep their meaning. ``n_restored`` and
``restored_rate`` are null in rows without an attack. The paper's Table 9 prints
``n_wrong`` as "Misclassification" and ``restored_rate`` as "Recognition rate".

``attack.parquet``: model, weights, attack, eps, keep, n_attacked, n_success_float,
n_success, success_rate_float, success_rate (misclassified before / after uint8
rounding; the ``_float`` ones only with ``[attack] report_float = true``, else null),
ci_low, ci_high (Wilson, on success_rate), n_kept, ... The rates are
over one deterministic set per model: the candidates up to the highest image id
kept at any eps (all candidates when some eps has fewer than ``size``).

``transfer.parquet``: source_model (attacked), target_model (judge), eps, n_images
(kept examples of the source), n_correct (the target predicts the true label),
n_fooled, fooled_rate, ci_low, ci_high, ... The diagonal (source = target) is the
source's own verdict. With ``filter = "all"`` every target classified the clean
images correctly, so ``fooled_rate`` is the rate at which the attack transfers.

Adversarial images never enter a results table. ``save_adversarial = DIR`` writes
every eligible example (a superset of the kept ones: see attack_ids.parquet) as a
pixelray data set per attack, model and eps, ``DIR/<attack>/<model>/eps<k>/`` (shards +
manifest.json), which a later sweep can name as its ``[data] path``. A resumed run adds the
examples of the units it runs; units finished by an earlier run without the option have none saved.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pyarrow as pa

from pixelray.config.sweep import Keep, SweepConfig
from pixelray.core.metrics import wilson_interval
from pixelray.engine.units import model_slug
from pixelray.errors import SweepError
from pixelray.shards import MANIFEST_NAME, Manifest, ShardInfo
from pixelray.store.storage import Location, join_uri
from pixelray.sweep.attack import META_SAVED, AttackPass, select_kept
from pixelray.sweep.failure import restore_rows
from pixelray.sweep.results import cell_columns, experiments_of

__all__ = ["attack_results", "write_adversarial_manifests"]


def _bits(table: pa.Table, column: str, width: int) -> np.ndarray:
    if width == 0:  # an attack with no cells: no column of bits (Arrow has no lists of size 0)
        return np.zeros((table.num_rows, 0), dtype=bool)
    values = table[column].combine_chunks().flatten().to_numpy(zero_copy_only=False)
    return values.reshape(-1, width)


def _empty_attack_table(n_cells: int, n_judges: int) -> pa.Table:
    empty = pa.array([], pa.bool_())
    return pa.table({
        "eps": pa.array([], pa.int64()), "image_id": pa.array([], pa.int64()), "label": pa.array([], pa.int64()),
        "success_float": empty, "success": empty,
        "restored": pa.FixedSizeListArray.from_arrays(empty, n_cells) if n_cells else pa.nulls(0, pa.bool_()),
        "correct_by": pa.FixedSizeListArray.from_arrays(empty, n_judges),
    })


def attack_results(config: SweepConfig, cell_pairs, done: AttackPass, size, common) -> dict[str, list[dict]]:
    """One attack's unit bits -> kept examples per (model, eps) -> rows of cells, attack, transfer and ids."""
    attack = done.attack
    keep_all = attack.keep is Keep.ALL
    names, by_id = experiments_of(cell_pairs)
    cell_ids, judges = list(by_id), list(config.models)
    exp_order = {e.name: i for i, e in enumerate(config.experiments)}
    name, params = attack.name, attack.params_label
    out: dict[str, list[dict]] = {"cells": [], "attack": [], "transfer": [], "ids": [], "failure": []}
    ladder_pairs = config.ladders(size)
    for model in config.models:
        mine = [u for u in done.units if u.model == model]
        parts = [done.tables[u.key].replace_schema_metadata(None) for u in mine if u.key in done.tables]
        table = pa.concat_tables(parts) if parts else _empty_attack_table(len(cell_ids), len(judges))
        t_eps = table["eps"].to_numpy()
        ids_all = table["image_id"].to_numpy()
        ok_all = table["success"].to_numpy(zero_copy_only=False)
        ok_float_all = table["success_float"].to_numpy(zero_copy_only=False) if attack.report_float else None
        restored_all = _bits(table, "restored", len(cell_ids))
        correct_all = _bits(table, "correct_by", len(judges))
        rows_of = [np.flatnonzero(t_eps == k) for k in attack.eps]
        chosen = [
            r[select_kept(ids_all[r], np.ones(len(r), bool) if keep_all else ok_all[r], attack.size)] for r in rows_of
        ]
        # One deterministic set for the success rates: candidates up to the highest kept id at any eps
        # (every unit below it has run), or every candidate when some eps kept fewer than ``size``.
        full = attack.size is not None and all(len(c) == attack.size for c in chosen)
        cutoff = max(int(ids_all[c[-1]]) for c in chosen) if full else None
        if cutoff is not None:
            missing = [u for u in mine if u.image_ids[0] <= cutoff and u.key not in done.tables]
            if missing:
                raise SweepError(f"attack units {[u.key for u in missing]} are missing below the kept ids; rerun")
        for e, k in enumerate(attack.eps):
            eps = attack.budget(k)
            r, c = rows_of[e], chosen[e]
            attacked = r if cutoff is None else r[ids_all[r] <= cutoff]
            n_att, n_ok = len(attacked), int(ok_all[attacked].sum())
            low, high = wilson_interval(n_ok, n_att) if n_att else (math.nan, math.nan)
            out["attack"].append({
                **common, "model": model, "attack": name, "attack_params": params, "eps": eps,
                "keep": attack.keep.value,
                "n_attacked": n_att, "n_success": n_ok,
                "n_success_float": None if ok_float_all is None else int(ok_float_all[attacked].sum()),
                "success_rate_float": None if ok_float_all is None else (
                    ok_float_all[attacked].mean() if n_att else math.nan),
                "success_rate": n_ok / n_att if n_att else math.nan, "ci_low": low, "ci_high": high,
                "n_kept": len(c), "image_size": size[0],
            })
            out["ids"] += [{"model": model, "attack": name, "attack_params": params, "eps": eps, "image_id": int(i)}
                           for i in ids_all[c]]
            out["failure"] += restore_rows(ladder_pairs, table, c, size, {
                **common, "model": model, "attack": name, "attack_params": params, "eps": eps})
            restored = restored_all[c].sum(axis=0)
            for cell_id, n_restored in zip(cell_ids, restored.tolist(), strict=True):
                for exp in names[cell_id]:
                    out["cells"].append({
                        **common, "experiment": exp, "model": model, "attack": name, "attack_params": params,
                        "eps": eps,
                        **cell_columns(by_id[cell_id], size), "cell_id": cell_id, "n_images": len(c),
                        "n_wrong": len(c) - n_restored, "n_restored": n_restored,
                        "_order": (exp_order[exp], config.models.index(model), e, cell_ids.index(cell_id)),
                    })
            correct = correct_all[c].sum(axis=0)
            for target, n_correct in zip(judges, correct.tolist(), strict=True):
                fooled = len(c) - n_correct
                low, high = wilson_interval(fooled, len(c)) if len(c) else (math.nan, math.nan)
                out["transfer"].append({
                    **common, "source_model": model, "target_model": target, "attack": name,
                    "attack_params": params, "eps": eps,
                    "n_images": len(c), "n_correct": n_correct, "n_fooled": fooled,
                    "fooled_rate": fooled / len(c) if len(c) else math.nan, "ci_low": low, "ci_high": high,
                })
    out["cells"].sort(key=lambda row: row["_order"])
    for row in out["cells"]:
        del row["_order"]
    return out


def write_adversarial_manifests(config: SweepConfig, manifest: Manifest, done: AttackPass) -> None:
    """One pixelray data set per (attack, model, eps) under ``save_adversarial``: the saved shards + manifest.json."""
    name = done.attack.name
    for model in config.models:
        saved: list[list[dict]] = [[] for _ in done.attack.eps]
        for unit in done.units:
            if unit.model != model or unit.key not in done.tables:
                continue
            meta = done.tables[unit.key].schema.metadata or {}
            for e, info in enumerate(json.loads(meta.get(META_SAVED, b"[]"))):
                if info:
                    saved[e].append(info)
        for e, k in enumerate(done.attack.eps):
            if not saved[e]:
                continue
            shards = tuple(ShardInfo(**s) for s in sorted(saved[e], key=lambda s: s["min_id"]))
            adv = Manifest(
                name=f"{manifest.name}-{name}-eps{k}-{model_slug(model)}",
                height=manifest.height, width=manifest.width, num_images=sum(s.rows for s in shards),
                num_classes=manifest.num_classes, class_names=manifest.class_names, class_ids=manifest.class_ids,
                shards=shards, source=name,
            )
            Location(join_uri(config.save_adversarial, name, model_slug(model), f"eps{k}", MANIFEST_NAME)).write_text(
                adv.to_json())
