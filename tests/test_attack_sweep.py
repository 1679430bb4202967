"""FGSM inside the sweep: config, exact counts against a plain loop, determinism, resume, saved examples."""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
import torchattacks
from helpers import ATTACK, attack_config, attack_tables, sweep_command, unit_files, wait_for
from reference_perturb import apply_pixel_changes

from pixelray.attacks.pgd import start_offsets
from pixelray.config.sweep import AttackConfig, ConfigError, Keep, parse_config
from pixelray.core.spec import Cell, PixelChange
from pixelray.engine.adversarial import attack_outcomes
from pixelray.engine.units import model_slug
from pixelray.models import load_model
from pixelray.shards import check_dataset, load_manifest, read_shard, shard_uris
from pixelray.sweep import run_sweep

VERSIONS = ["pixelray_version", "torch_version"]


# ---------------------------------------------------------------------------- config


BASE = {
    "data": {"path": "d"}, "models": {"names": ["tiny"], "weights": "none"}, "grid": {"counts": [4]},
    "output": {"dir": "o"},
}


def test_attack_section_parses_and_enters_the_config_hash():
    plain = parse_config(BASE)
    cfg = parse_config({**BASE, "attack": {"kind": "fgsm", "eps": [1, 2, 4, 8], "size": 10000}})
    assert plain.attacks == () and "attack" not in plain.identity()
    assert cfg.attacks == (AttackConfig("fgsm", (1, 2, 4, 8), Keep.SUCCESSFUL, 10000),)
    assert cfg.identity()["attack"] == {"kind": "fgsm", "eps": [1, 2, 4, 8], "keep": "successful", "size": 10000}
    assert cfg.config_hash != plain.config_hash
    other = parse_config({**BASE, "attack": {"kind": "fgsm", "eps": [1, 2, 4, 8], "size": 10000, "keep": "all"}})
    assert other.config_hash != cfg.config_hash
    # where the examples are saved is not part of the results' identity
    saved = parse_config({**BASE, "attack": {"kind": "fgsm", "eps": [1, 2, 4, 8], "size": 10000}},
                         overrides={"save_adversarial": "adv"})
    assert saved.save_adversarial == "adv" and saved.config_hash == cfg.config_hash


@pytest.mark.parametrize(("attack", "message"), [
    ({"kind": "cw"}, r"\[attack\] kind = 'cw': unknown attack; allowed: \['fgsm', 'pgd', 'sparse'\]"),
    ({"kind": "fgsm", "steps": 3}, r"\[attack\] unknown key\(s\) \['steps'\] for kind = 'fgsm'; allowed: \[\]"),
    ({"kind": "pgd", "steps": 0}, r"\[attack\] steps = 0: must be an integer >= 1"),
    ({"kind": "pgd", "random_start": 1}, r"\[attack\] random_start = 1: must be true or false"),
    ({"kind": "fgsm", "eps": [0, 2]}, r"\[attack\] eps = \[0, 2\]: \[0\] outside 1..255"),
    ({"kind": "fgsm", "eps": [8, 256]}, r"eps = \[8, 256\]: \[256\] outside 1..255; eps is in pixel units k"),
    ({"kind": "fgsm", "eps": [0.5]}, r"eps = \[0.5\]: expected a non-empty list of integers k"),
    ({"kind": "fgsm", "eps": []}, r"eps = \[\]: expected a non-empty list of integers"),
    ({"kind": "fgsm", "eps": [2, 2]}, r"eps = \[2, 2\]: each value may appear once"),
    ({"kind": "fgsm", "keep": "some"}, r"keep = 'some': allowed: \['successful', 'all'\]"),
    ({"kind": "fgsm", "size": 0}, r"\[attack\] size = 0: must be an integer >= 1"),
    ({"kind": "fgsm", "size": "many"}, r"\[attack\] size = 'many': expected int"),
    ({"eps": [1]}, r"\[attack\] kind: missing"),
])
def test_bad_attack_sections_are_refused(attack, message):
    with pytest.raises(ConfigError, match=message):
        parse_config({**BASE, "attack": attack})


def test_save_adversarial_needs_an_attack():
    with pytest.raises(ConfigError, match="no \\[attack\\] section"):
        parse_config({**BASE, "output": {"dir": "o", "save_adversarial": "adv"}})
    remote = parse_config({**BASE, "attack": {"kind": "fgsm"}, "output": {"dir": "o", "save_adversarial": "s3://b/adv"}})
    assert remote.save_adversarial == "s3://b/adv"  # any pyarrow filesystem, as the results


# ---------------------------------------------------------------------------- the worker's numerics


def _tiny(spec):
    return load_model(spec, None).to(memory_format=torch.channels_last).eval()


def test_attack_outcomes_do_not_depend_on_batch_size(synthetic_dataset, tiny_checkpoints):
    model, judge = (_tiny(m) for m in tiny_checkpoints)
    batch = read_shard(shard_uris(synthetic_dataset)[0])
    # the 384-pixel cell restores some examples whatever the machine: with few pixels alone, whether any of
    # ~80 is restored depends on the CPU's trained weights and torch's thread count
    cells = [Cell(PixelChange(4)), Cell(PixelChange(200, 60)), Cell(PixelChange(384))]
    runs = [
        attack_outcomes(model, batch.images, batch.labels, batch.image_ids, [4, 32], cells, [None, judge], bs)
        for bs in (100, 64, 7)
    ]
    for other in runs[1:]:
        assert other.keys() == runs[0].keys()
        for key in runs[0]:
            np.testing.assert_array_equal(other[key], runs[0][key], err_msg=key)
    success = runs[0]["success"]
    assert 0 < success[0].sum() < success[1].sum()  # a bigger step fools more
    # only the examples that fool the model go through the cells and the judges
    assert not (runs[0]["restored"] & ~success[:, None, :]).any() and runs[0]["restored"].any()
    np.testing.assert_array_equal(runs[0]["correct_by"][:, 0], np.zeros_like(success))


# ---------------------------------------------------------------------------- the reference


def _unit(images):
    """uint8 NHWC shard images as the attacks' model input: float NCHW in [0, 1] (contiguous)."""
    return images.permute(0, 3, 1, 2).float().div(255).contiguous()


def _pixels(unit):
    """[0, 1] float NCHW examples as images: rounded to the nearest uint8, NHWC like the shards."""
    return unit.mul(255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)


def _fgsm_float(net, images, labels, eps):
    """The unrounded FGSM examples, float NCHW, from torchattacks."""
    return torchattacks.FGSM(net, eps=eps)(_unit(images), labels)


def _fgsm(net, images, labels, ids, eps):
    return _pixels(_fgsm_float(net, images, labels, eps))


def plain_attack(data, models, cells, eps, size, attack=_fgsm, floats=True):
    """Independent reference: every candidate attacked in one batch, kept ids chosen globally, no Ray.

    ``attack(net, images, labels, image_ids, eps)`` makes the uint8 NHWC examples (by default
    torchattacks' FGSM, rounded to uint8 here); the pixel changes are drawn by tests/reference_perturb.py.
    pixelray only reads the shards and builds and runs the models. ``floats``: also FGSM's unrounded
    verdicts (``attack_float``: what an FGSM sweep with ``report_float`` reports)."""
    parts = [read_shard(uri) for uri in shard_uris(str(data))]
    ids = torch.cat([p.image_ids for p in parts])
    labels = torch.cat([p.labels for p in parts])
    images = torch.cat([p.images for p in parts])
    nets = {m: _tiny(m) for m in models}
    with torch.inference_mode():
        ok = torch.stack([nets[m](images).argmax(1) == labels for m in models]).all(0)
    order = torch.argsort(ids[ok])
    cand_ids, cand_labels, cand_images = ids[ok][order], labels[ok][order], images[ok][order]
    out = {"attack": {}, "attack_float": {}, "cells": {}, "transfer": {}, "examples": {}}
    for m in models:
        per_eps = {}
        for k in eps:
            adv = attack(nets[m], cand_images, cand_labels, cand_ids, k / 255)
            with torch.inference_mode():
                fooled = nets[m](adv).argmax(1) != cand_labels
            kept = torch.nonzero(fooled).flatten()[:size]
            per_eps[k] = (fooled, kept)
            out["examples"][(m, k)] = (cand_ids[kept], adv[kept])
            with torch.inference_mode():
                for cell in cells:
                    changed = apply_pixel_changes(adv[kept], cell, cand_ids[kept])
                    restored = int((nets[m](changed).argmax(1) == cand_labels[kept]).sum())
                    out["cells"][(m, k, cell.cell_id)] = (len(kept), restored)
                for target in models:
                    correct = int((nets[target](adv[kept]).argmax(1) == cand_labels[kept]).sum())
                    out["transfer"][(m, target, k)] = (len(kept), correct)
        # the success rates: over the candidates up to the highest kept id at any eps
        cutoff = max(int(cand_ids[kept[-1]]) for _, kept in per_eps.values())
        upto = cand_ids <= cutoff
        for k, (fooled, kept) in per_eps.items():
            out["attack"][(m, k)] = (int(upto.sum()), int(fooled[upto].sum()), len(kept))
            if not floats:
                continue
            # the unrounded examples, made and judged in one batch (as the rounded ones above)
            unrounded = _fgsm_float(nets[m], cand_images[upto], cand_labels[upto], k / 255)
            with torch.inference_mode():
                out["attack_float"][(m, k)] = int((nets[m](unrounded).argmax(1) != cand_labels[upto]).sum())
    return out


@pytest.fixture(scope="module")
def expected_fgsm(synthetic_dataset, tiny_checkpoints):
    """(the cells, what the plain loop gives) for attack_run's config: computed once for the tests that use it."""
    cells = parse_config(attack_config(synthetic_dataset, tiny_checkpoints, "unused")).unique_cells((32, 32))
    return cells, plain_attack(synthetic_dataset, tiny_checkpoints, cells, ATTACK["eps"], ATTACK["size"])


def cell_of(row):
    amp = row.amplitude if row.amplitude == "full" else int(row.amplitude)
    return Cell(PixelChange(int(row["count"]), amp, None), int(row.seed))


def _k(eps):
    return round(eps * 255)


# ---------------------------------------------------------------------------- integration


@pytest.mark.slow
def test_attack_counts_equal_an_independent_plain_loop(attack_run, expected_fgsm, synthetic_dataset, tiny_checkpoints):
    cells, expected = expected_fgsm
    tables = attack_tables(attack_run.out_dir, VERSIONS)

    attack = tables["attack"]
    assert len(attack) == 2 * 4 and (attack.attack == "fgsm").all() and (attack.keep == "successful").all()
    got = {(r.model, _k(r.eps)): (r.n_attacked, r.n_success, r.n_kept) for r in attack.itertuples()}
    assert got == expected["attack"]
    assert (attack.n_kept == ATTACK["size"]).all()
    # the unrounded examples' verdicts (report_float = true), against a loop of its own
    got = {(r.model, _k(r.eps)): r.n_success_float for r in attack.itertuples()}
    assert got == expected["attack_float"]
    assert np.allclose(attack.success_rate_float, attack.n_success_float / attack.n_attacked)
    for _, per_model in attack.groupby("model"):  # the success rate rises with eps
        assert per_model.sort_values("eps").success_rate.is_monotonic_increasing
        assert per_model.success_rate.iloc[-1] > 2 * per_model.success_rate.iloc[0]

    df = tables["cells"]
    plain, adv = df[df.attack.isna()], df[df.attack == "fgsm"]
    assert len(plain) == 2 * len(cells) and plain.n_restored.isna().all() and plain.eps.isna().all()
    assert len(adv) == 2 * 4 * len(cells)  # every (model, eps, cell): the restored count is reported
    assert adv.n_restored.notna().all() and adv.restored_rate.notna().all()
    got = {(r.model, _k(r.eps), cell_of(r).cell_id): (r.n_images, int(r.n_restored)) for _, r in adv.iterrows()}
    assert got == expected["cells"]
    assert (adv.n_wrong == adv.n_images - adv.n_restored).all()
    assert np.allclose(adv.restored_rate, adv.accuracy) and adv.n_restored.sum() > 0
    assert adv.pixel_index.notna().all()

    transfer = tables["transfer"]
    assert len(transfer) == 2 * 2 * 4
    got = {(r.source_model, r.target_model, _k(r.eps)): (r.n_images, r.n_correct) for r in transfer.itertuples()}
    assert got == expected["transfer"]
    diagonal = transfer[transfer.source_model == transfer.target_model]
    assert (diagonal.n_fooled == diagonal.n_images).all()  # kept = successful on its own model
    assert (transfer.n_fooled + transfer.n_correct == transfer.n_images).all()

    ids = tables["attack_ids"]
    assert set(ids.attack) == {"fgsm"} and ids.attack_params.notna().all()  # the attack that kept them
    for (model, k), (kept_ids, _) in expected["examples"].items():
        assert ids[(ids.model == model) & (ids.eps.mul(255).round() == k)].image_id.tolist() == kept_ids.tolist()
    # the images never enter a results table
    for name, table in tables.items():
        assert not {"image", "adv", "pixels"} & set(table.columns), name
    # the counters against the plan, from sources the sweep does not compute: shard files on disk,
    # this test's models, the unit files written
    stats = attack_run.stats
    shard_ids = [set(pq.read_table(p, columns=["image_id"]).column(0).to_pylist())
                 for p in sorted(Path(synthetic_dataset).glob("*.parquet"))]
    evaluated = {int(i) for i in (attack_run.out_dir / "image_ids.txt").read_text().split()}
    n_shards, n_models = len(shard_ids), len(tiny_checkpoints)
    plan = {"clean": n_shards * n_models, "cells": sum(bool(ids & evaluated) for ids in shard_ids) * n_models}
    assert 0 < plan["cells"] < plan["clean"]  # eval size 100: only the first shards hold evaluated images
    for phase in ("clean", "cells"):
        assert stats["reads"][phase] == stats["units_run"][phase] == plan[phase], phase
    written = len(unit_files(attack_run.out_dir, "attack"))
    assert stats["reads"]["attack"] == stats["units_run"]["attack"] == written
    assert stats["attack_units"]["fgsm"] == {"planned": n_shards * n_models, "done": written,
                                             "skipped": n_shards * n_models - written}
    assert stats["attack_units"]["fgsm"]["skipped"] >= 1  # the examples were found before the last shards


@pytest.mark.slow
def test_saved_examples_are_a_dataset_holding_the_kept_examples(attack_run, expected_fgsm, synthetic_dataset):
    adv_root = attack_run.out_dir.parent / "adv" / "fgsm"
    _, expected = expected_fgsm
    dirs = sorted(p.parent for p in adv_root.glob("*/eps*/manifest.json"))
    assert len(dirs) == 2 * 4
    for (model, k), (kept_ids, kept_images) in expected["examples"].items():
        folder = next(d for d in dirs if d.name == f"eps{k}" and d.parent.name == model_slug(model))
        assert check_dataset(str(folder)) == []
        assert load_manifest(str(folder)).num_classes == load_manifest(synthetic_dataset).num_classes
        saved = [read_shard(uri, kept_ids.tolist()) for uri in shard_uris(str(folder))]
        got_ids = torch.cat([s.image_ids for s in saved])
        got_images = torch.cat([s.images for s in saved])
        assert sorted(got_ids.tolist()) == kept_ids.tolist()
        order = torch.argsort(got_ids)
        assert torch.equal(got_images[order], kept_images)  # pixel for pixel the examples of the plain loop


@pytest.mark.slow
def test_a_killed_driver_resumes_only_missing_units_and_the_counts_do_not_depend_on_how_it_ran(
        ray_local, attack_run, synthetic_dataset, tiny_checkpoints, tmp_path):
    """attack_run's sweep again, run otherwise: two workers of one thread, batches of 17, three cells per forward
    pass, no unrounded verdicts (report_float = false). Its driver, a process of its own on the session's Ray
    (the cluster outlives it), is stopped twice: SIGKILLed once units are written (early: among the clean ones),
    and, run again, sent SIGTERM (what ``ray job stop`` sends) once attack units are; the third run finishes.
    SIGTERM ends the driver within seconds, in one line, exit 143, its output directory released (a SIGKILLed
    driver leaves its lock behind). A finished unit is never redone (its file keeps its inode and mtime), each
    run computes exactly the units missing, and the counts are attack_run's."""
    import tomli_w

    out = tmp_path / "out"
    config = tmp_path / "sweep.toml"
    raw = attack_config(synthetic_dataset, tiny_checkpoints, out, batch_size=17, workers=2, threads=1,
                     attack={**ATTACK, "report_float": False})
    raw["run"]["cells_per_pass"] = 3  # three cells per forward pass: the tiny CNN gives the same verdicts
    config.write_text(tomli_w.dumps(raw))
    cmd = sweep_command(config, ray_local)  # a driver of its own on the session's Ray (the cluster outlives it)
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    phases = ("clean", "cells", "attack")

    def units() -> dict:
        return {p: (p.stat().st_ino, p.stat().st_mtime_ns) for phase in phases for p in unit_files(out, phase)}

    def ready(kept: dict, attack: bool) -> bool:
        return len(units()) > max(len(kept), 2) and (not attack or bool(unit_files(out, "attack")))

    kept: dict = {}
    for attack in (False, True):  # the first driver: SIGKILL once units exist; the second: SIGTERM once attack units do
        until = functools.partial(ready, kept, attack)
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
        try:
            assert wait_for(until, timeout=240), proc.stderr.read()[-3000:]
        finally:
            os.killpg(proc.pid, signal.SIGTERM if attack else signal.SIGKILL)  # SIGKILL: Ray ends its workers
            stopped_at = time.monotonic()
            _, err = proc.communicate(timeout=60)
        if attack:  # stopped as by `ray job stop`: quickly, in one line, its directory released
            took = time.monotonic() - stopped_at
            assert took < 30 and proc.returncode == 128 + signal.SIGTERM, (took, proc.returncode, err[-3000:])
            assert err.strip().splitlines()[-1].startswith("error: stopped by SIGTERM: the finished units are kept")
            assert "Traceback" not in err and not (out / "run.lock").exists(), err[-3000:]
        else:
            assert (out / "run.lock").exists()  # SIGKILL: nothing could run; the next driver takes the lock over
        assert not (out / "attack.parquet").exists(), "the sweep finished before the kill; make it longer"
        now = units()
        assert all(now[p] == kept[p] for p in kept), "finished units were redone"
        assert len(now) > len(kept)
        kept = now
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    final = units()
    assert all(final[p] == kept[p] for p in kept), "finished units were redone"
    stats = json.loads((out / "stats.json").read_text())
    for phase in phases:  # the last run computed what the killed ones left, and nothing else
        n_final, n_kept = (sum(f"/units/{phase}/" in str(p) for p in files) for files in (final, kept))
        assert stats["units_run"][phase] == n_final - n_kept, phase
    assert stats["units_run"]["attack"] > 0
    n_models = len(tiny_checkpoints)
    assert sum("/units/clean/" in str(p) for p in final) == len(shard_uris(synthetic_dataset)) * n_models
    assert not list(out.rglob(".*.tmp-*")), "temp files of the killed runs were left behind"
    first, second = attack_tables(attack_run.out_dir, VERSIONS), attack_tables(out, VERSIONS)
    floats = ["n_success_float", "success_rate_float"]
    assert second["attack"][floats].isna().all().all()  # not asked for: null, the columns kept
    assert first["attack"][floats].notna().all().all()
    for name in first:  # the config hash differs (the batch size is part of the config): all else is the same
        drop = floats + ["config_hash"] if name == "attack" else ["config_hash"]
        pd.testing.assert_frame_equal(first[name].drop(columns=drop, errors="ignore"),
                                      second[name].drop(columns=drop, errors="ignore"), obj=name)


PGD = {"kind": "pgd", "eps": [4, 16], "keep": "successful", "size": 20, "steps": 3, "step": 2, "seed": 1}


@pytest.mark.slow
def test_a_pgd_sweep_equals_an_independent_plain_loop(ray_local, synthetic_dataset, tiny_checkpoints, tmp_path):
    raw = attack_config(synthetic_dataset, tiny_checkpoints, tmp_path / "out", attack=PGD)
    result = run_sweep(parse_config(raw), progress=False)
    cfg = parse_config(raw)

    def attack(net, images, labels, ids, eps, step=PGD["step"] / 255, steps=PGD["steps"], seed=PGD["seed"]):
        """PGD written out here, in torchattacks.PGD's arithmetic (mean loss, signed step, projection onto the
        eps-ball and [0, 1]), from pixelray's random start: torchattacks draws its start from torch's global
        generator, pixelray per (seed, image id), so torchattacks.PGD can only be compared without a start
        (test_pgd.py does, bit for bit). The start's offsets are the one part taken from pixelray
        (``start_offsets``; test_pgd.py checks they are uniform in the ball and keyed by image id)."""
        x0 = _unit(images)
        adv = (x0 + start_offsets(ids, x0.shape, eps, seed)).clamp(0, 1)
        for _ in range(steps):
            adv.requires_grad_(True)
            (grad,) = torch.autograd.grad(torch.nn.functional.cross_entropy(net(adv), labels), adv)
            adv = adv.detach() + step * grad.sign()
            adv = (x0 + (adv - x0).clamp(-eps, eps)).clamp(0, 1).detach()
        return _pixels(adv)

    expected = plain_attack(synthetic_dataset, tiny_checkpoints, cfg.unique_cells((32, 32)), PGD["eps"], 20, attack,
                            floats=False)
    tables = attack_tables(result.out_dir, VERSIONS)
    attack_rows = tables["attack"]
    assert (attack_rows.attack == "pgd").all()
    assert set(attack_rows.attack_params) == {'{"random_start": true, "seed": 1, "step": 2.0, "steps": 3}'}
    got = {(r.model, _k(r.eps)): (r.n_attacked, r.n_success, r.n_kept) for r in attack_rows.itertuples()}
    assert got == expected["attack"]
    adv = tables["cells"][tables["cells"].attack == "pgd"]
    got = {(r.model, _k(r.eps), cell_of(r).cell_id): (r.n_images, int(r.n_restored)) for _, r in adv.iterrows()}
    assert got == expected["cells"]
    transfer = tables["transfer"]
    got = {(r.source_model, r.target_model, _k(r.eps)): (r.n_images, r.n_correct) for r in transfer.itertuples()}
    assert got == expected["transfer"]
    assert attack_rows.n_success.sum() > 0 and (adv.n_restored.sum() > 0)
