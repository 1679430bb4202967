"""Worst-case pixels to failure and the sparse attack in a sweep: the search against a plain loop, rows that
rebuild from their columns, examples that are real, the worst case beside the random one, a killed worker."""

from __future__ import annotations

import json
import os
import threading

import numpy as np
import pandas as pd
import pytest
import torch
from exact_models import ExactNet
from helpers import unit_files, wait_for

from pixelray.attacks.sparse import sparse_search
from pixelray.core.ladder import Ladder
from pixelray.core.worst import WorstCase
from pixelray.engine.worst_case import worst_case_search


def _reference(model, images, labels, ids, points, budget, seed, search, init):
    """One image at a time, each search on that image alone: (n_fail, n_last_correct, n_passes) per image."""
    out = []
    for i in range(len(images)):
        def found(j, i=i):
            res = sparse_search(model, images[i:i + 1], labels[i:i + 1], points[j], budget, seed, ids[i:i + 1],
                                init=init)
            return bool(res.success[0]), int(res.queries[0])

        spent, ok_at, bad_at = 0, None, None
        if search == "scan":
            for j in range(len(points)):
                hit, q = found(j)
                spent += q
                if hit:
                    ok_at = j
                    break
                bad_at = j
        else:
            lo, hi = -1, len(points)
            hit, q = found(len(points) - 1)
            spent += q
            if hit:
                hi = len(points) - 1
                while hi - lo > 1:
                    mid = (lo + hi) // 2
                    hit, q = found(mid)
                    spent += q
                    lo, hi = (lo, mid) if hit else (mid, hi)
                ok_at, bad_at = hi, (lo if lo >= 0 else None)
            else:
                bad_at = len(points) - 1
        out.append((points[ok_at] if ok_at is not None else -1, points[bad_at] if bad_at is not None else 0, spent))
    return out


@pytest.mark.parametrize(("search", "init"), [("scan", "random"), ("bisect", "saliency")])
def test_the_worst_case_search_equals_a_plain_loop_one_image_at_a_time(search, init):
    """ExactNet (exact logits whatever the batch): the batched rounds, sliced by 5, against each image searched
    alone at each point, in order (scan) or by bisection written here."""
    model = ExactNet(3)
    gen = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (9, 32, 32, 3), generator=gen, dtype=torch.uint8)
    with torch.inference_mode():
        labels = model(images.permute(0, 3, 1, 2).double() / 255).argmax(1)  # every image classified correctly
    ids = torch.arange(40, 49)
    worst = WorstCase(Ladder(seed=4, steps_per_octave=2, max_count=45, search=search), budget=12, init=init)
    points = worst.points(32, 32)
    got = worst_case_search(model, images, labels, ids, worst, batch_size=5)
    want = _reference(model, images, labels, ids, points, 12, 4, search, init)
    assert [tuple(int(got[f][i]) for f in ("n_fail", "n_last_correct", "n_passes")) for i in range(9)] == want
    assert (got["n_fail"] > 0).any() and (got["n_fail"] == -1).any()  # both outcomes are exercised


def _config(data, models, out, **extra) -> dict:
    return {
        "data": {"path": str(data)}, "models": {"names": list(models), "weights": "none"},
        "eval": {"filter": "all", "size": 24, "batch_size": 64},
        "grid": {"counts": [16]},
        "experiment": [{"name": "failure", "family": "pixels_to_failure", "steps_per_octave": 2}],
        "attack": [{"kind": "sparse", "ladder": True, "budget": 40, "size": 16, "steps_per_octave": 2},
                   {"kind": "sparse", "k": [16, 64], "budget": 40, "size": 8}],
        "output": {"dir": str(out)}, "run": {"threads": 2}, **extra,
    }


@pytest.fixture(scope="module")
def worst_run(ray_local, synthetic_dataset, tiny_checkpoints, tmp_path_factory):
    from pixelray.config.sweep import parse_config
    from pixelray.sweep import run_sweep

    root = tmp_path_factory.mktemp("worst")
    raw = _config(synthetic_dataset, tiny_checkpoints[:1], root / "out")
    raw["output"]["save_adversarial"] = str(root / "adv")
    run_sweep(parse_config(raw), progress=False)
    return root


def _images(data) -> tuple[np.ndarray, dict[int, int], dict[int, int]]:
    from pixelray.shards import read_shard, shard_uris

    parts = [read_shard(u) for u in shard_uris(str(data))]
    ids = np.concatenate([p.image_ids.numpy() for p in parts])
    images = np.concatenate([p.images.numpy() for p in parts])
    labels = np.concatenate([p.labels.numpy() for p in parts])
    where = {int(i): j for j, i in enumerate(ids)}
    return images, where, {int(i): int(lab) for i, lab in zip(ids, labels, strict=True)}


@pytest.mark.slow
def test_worst_case_rows_rebuild_from_their_columns_and_sit_beside_the_random_ones(worst_run, synthetic_dataset,
                                                                                  tiny_checkpoints):
    from pixelray.models import load_model

    fail = pd.read_parquet(worst_run / "out" / "failure.parquet")
    worst = fail[fail.kind == "worst_case"]
    random = fail[(fail.kind == "random") & (fail.target == "wrong")]
    assert len(worst) == 16 and (worst.experiment == "sparse").all() and (worst.budget == 40).all()
    params = {json.dumps({"budget": 40, "init": "saliency", "seed": 0})}
    assert set(worst.attack_params) == params and (worst.attack == "sparse").all()
    assert set(worst.image_id) <= set(random.image_id)  # the 16 lowest ids of the evaluated images
    assert sorted(worst.image_id) == sorted(random.image_id)[:16]
    # the worst case needs no more pixels than random changes for nearly every image both broke. Not all: the
    # search gives up after `budget` passes at a point, so it can miss an example the random ladder stumbled on
    both = worst.merge(random, on="image_id", suffixes=("_w", "_r")).dropna(subset=["n_fail_w", "n_fail_r"])
    share = (both.n_fail_w <= both.n_fail_r).mean()
    assert len(both) >= 8 and share >= 0.9, (share, both[["image_id", "n_fail_w", "n_fail_r"]])
    # a row rebuilt from its columns alone: the ladder's points, then the search at n_fail and n_last_correct
    model = load_model(tiny_checkpoints[0], None).eval()
    images, where, labels = _images(synthetic_dataset)
    rebuilt = 0
    for r in worst.dropna(subset=["n_fail"]).head(4).itertuples():
        points = Ladder.from_columns(r._asdict()).points(32, 32)
        params = json.loads(r.attack_params)
        assert r.n_fail in points and r.n_passes >= 1
        image = torch.from_numpy(images[where[r.image_id]][None])
        label = torch.tensor([labels[r.image_id]])

        def found(k, image=image, label=label, r=r, params=params):
            return bool(sparse_search(model, image, label, k, params["budget"], params["seed"],
                                      torch.tensor([r.image_id]), init=params["init"]).success[0])

        assert found(int(r.n_fail))
        if r.n_last_correct > 0:
            assert not found(int(r.n_last_correct))
        rebuilt += 1
    assert rebuilt >= 2


@pytest.mark.slow
def test_every_kept_sparse_example_changes_at_most_k_pixels_and_fools_the_model(worst_run, synthetic_dataset,
                                                                                tiny_checkpoints):
    """The saved examples, read back: each against its clean image (counted here with numpy), then the model."""
    from pixelray.models import load_model
    from pixelray.shards import read_shard, shard_uris

    attack = pd.read_parquet(worst_run / "out" / "attack.parquet")
    assert list(attack.eps) == [16.0, 64.0] and (attack.attack == "sparse").all()  # eps holds k for this attack
    model = load_model(tiny_checkpoints[0], None).eval()
    images, where, labels = _images(synthetic_dataset)
    seen = {}
    for k in (16, 64):
        folder = next((worst_run / "adv" / "sparse").glob(f"*/eps{k}"))
        for uri in shard_uris(str(folder)):
            batch = read_shard(uri)
            clean = images[[where[int(i)] for i in batch.image_ids]]
            changed = (batch.images.numpy() != clean).any(axis=-1).sum(axis=(1, 2))
            assert (changed <= k).all() and (changed >= 1).all(), changed
            with torch.inference_mode():
                pred = model(batch.images).argmax(1).numpy()
            assert (pred != batch.labels.numpy()).all()
            assert all(labels[int(i)] == int(y) for i, y in zip(batch.image_ids, batch.labels, strict=True))
            seen.setdefault(float(k), set()).update(int(i) for i in batch.image_ids)
    # every kept example was saved (the units save every example that fooled the model, kept or not)
    ids = pd.read_parquet(worst_run / "out" / "attack_ids.parquet")
    assert len(ids) == attack.n_kept.sum() > 0
    assert all(set(g.image_id) <= seen[eps] for eps, g in ids.groupby("eps"))
    # downstream as FGSM's: the grid's cells over the kept examples (Table 9) and pixels to restore each of them
    cells = pd.read_parquet(worst_run / "out" / "cells.parquet")
    assert set(cells[cells.attack == "sparse"].eps) == {16.0, 64.0}
    fail = pd.read_parquet(worst_run / "out" / "failure.parquet")
    restore = fail[(fail.target == "right") & (fail.attack == "sparse")]
    assert sorted(zip(restore.eps, restore.image_id, strict=True)) == sorted(zip(ids.eps, ids.image_id, strict=True))


@pytest.mark.slow
def test_a_killed_worker_changes_no_row(worst_run, ray_local, synthetic_dataset, tiny_checkpoints, tmp_path):
    """The same sweep, its worker killed once a failure or attack unit is written: the unit in flight is run again
    by a new worker, and every row (worst case, random, attack, restore) is the reference run's."""
    import ray

    from pixelray.config.sweep import parse_config
    from pixelray.sweep import run_sweep

    out = tmp_path / "out"
    cfg = parse_config(_config(synthetic_dataset, tiny_checkpoints[:1], out))
    box: dict = {}
    thread = threading.Thread(target=lambda: box.update(result=run_sweep(cfg, progress=False)), daemon=True)
    thread.start()
    assert wait_for(lambda: unit_files(out, "failure") or unit_files(out, "attack"), timeout=240)
    (name,) = [n for n in ray.util.list_named_actors() if n.startswith(f"pixelray-worker-{os.getpid()}")]
    ray.kill(ray.get_actor(name), no_restart=True)
    thread.join(300)
    assert "result" in box and box["result"].stats["workers"]["restarts"] == 1
    drop = ["config_hash"]
    for table in ("failure.parquet", "attack.parquet", "attack_ids.parquet"):
        ref = pd.read_parquet(worst_run / "out" / table).drop(columns=drop, errors="ignore")
        got = pd.read_parquet(out / table).drop(columns=drop, errors="ignore")
        pd.testing.assert_frame_equal(got, ref, check_like=False)


@pytest.mark.parametrize(("attack", "said"), [
    ({"kind": "sparse", "eps": [4]}, "eps = [4]: kind = 'sparse' takes a number of changed pixels k = [...]"),
    ({"kind": "fgsm", "k": [4]}, "k = [4]: kind = 'fgsm' takes a radius eps = [...] (k/255)"),
    ({"kind": "sparse", "k": [0, 4]}, "k = [0, 4]: each count must be >= 1"),
    ({"kind": "sparse", "ladder": True, "k": [4]}, "ladder = true with k = [4]: a ladder searches its own counts"),
    ({"kind": "fgsm", "ladder": True}, "ladder = true: kind = 'fgsm' is not an attack on pixel counts"),
    ({"kind": "sparse", "ladder": True, "search": "guess"}, "search: 'guess' is unknown"),
    ({"kind": "sparse", "ladder": True, "budget": 0}, "budget = 0: must be an integer >= 4"),
])
def test_bad_sparse_sections_are_refused_naming_the_key(attack, said, tmp_path):
    from pixelray.config.sweep import ConfigError, parse_config

    raw = {"data": {"path": str(tmp_path)}, "models": {"names": ["tiny"], "weights": "none"},
           "grid": {"counts": [1]}, "attack": attack, "output": {"dir": str(tmp_path / "out")}}
    with pytest.raises(ConfigError) as caught:
        parse_config(raw)
    assert said in str(caught.value) and str(caught.value).startswith("[attack] ")


def test_counts_and_ladders_larger_than_the_images_are_refused_before_anything_runs(synthetic_dataset, tmp_path):
    from pixelray.config.sweep import ConfigError, parse_config
    from pixelray.sweep.plan import plan_sweep

    base = {"data": {"path": str(synthetic_dataset)}, "models": {"names": ["tiny"], "weights": "none"},
            "grid": {"counts": [1]}, "output": {"dir": str(tmp_path / "out")}}
    for attack, said in (({"kind": "sparse", "k": [4, 2000]}, "2000 pixels is more than the 32x32 images hold"),
                         ({"kind": "sparse", "ladder": True, "max_count": 2000}, "max_count: 2000 is larger")):
        with pytest.raises(ConfigError, match=said):
            plan_sweep(parse_config({**base, "attack": attack}))
