"""An attack of the user's own, plugged in through the interface alone (no edit of worker or driver)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from pixelray.config.sweep import parse_config
from pixelray.models import load_model
from pixelray.shards import read_shard, shard_uris
from pixelray.sweep import run_sweep

TESTS = Path(__file__).resolve().parent


def expected_success(data, models, eps_k, shift):
    """A plain loop: candidates every model gets right, moved by numpy, judged by their model."""
    parts = [read_shard(u) for u in shard_uris(str(data))]
    ids = np.concatenate([p.image_ids.numpy() for p in parts])
    labels = np.concatenate([p.labels.numpy() for p in parts])
    images = np.concatenate([p.images.numpy() for p in parts]).astype(np.int32)
    nets = {m: load_model(m, None) for m in models}
    with torch.inference_mode():
        ok = np.all([nets[m](torch.from_numpy(images.astype(np.uint8))).argmax(1).numpy() == labels for m in models],
                    axis=0)
    out = {}
    for m in models:
        for k in eps_k:
            moved = images[ok] + np.where(ids[ok] % 2 == 0, 1, -1)[:, None, None, None] * shift * k
            adv = torch.from_numpy(np.clip(moved, 0, 255).astype(np.uint8))
            with torch.inference_mode():
                wrong = nets[m](adv).argmax(1).numpy() != labels[ok]
            out[(m, k)] = (int(ok.sum()), int(wrong.sum()))
    return out


@pytest.mark.slow
def test_a_toy_attack_runs_in_a_sweep_through_the_interface_alone(ray_local, synthetic_dataset, tiny_checkpoints,
                                                                   tmp_path):
    """The attack is named by ``module:SPEC`` and imported by the driver and by the session's Ray workers
    (tests/ is on their path: tests/conftest.py), never known to pixelray."""
    out = tmp_path / "out"
    raw = {
        "data": {"path": str(synthetic_dataset)},
        "models": {"names": list(tiny_checkpoints), "weights": "none"},
        "eval": {"filter": "all", "size": 50},
        "grid": {"counts": [4, 64]},
        "attack": {"kind": "toy_attack:TOY", "eps": [16, 64], "keep": "all", "shift": 2},
        "output": {"dir": str(out)},
        "run": {"threads": 2},
    }
    run_sweep(parse_config(raw), progress=False)
    attack = pd.read_parquet(out / "attack.parquet")
    assert (attack.attack == "toy").all() and set(attack.attack_params) == {json.dumps({"shift": 2})}
    got = {(r.model, round(r.eps * 255)): (r.n_attacked, r.n_success) for r in attack.itertuples()}
    assert got == expected_success(synthetic_dataset, tiny_checkpoints, [16, 64], 2)
    assert attack.n_success.sum() > 0
    cells = pd.read_parquet(out / "cells.parquet")
    assert len(cells[cells.attack == "toy"]) == 2 * 2 * 2  # models x eps x cells
    run = json.loads((out / "run.json").read_text())
    assert run["config"]["attack"]["params"] == {"shift": 2}


def test_an_attack_that_is_not_a_spec_is_refused():
    from pixelray.config.sweep import ConfigError, parse_config

    base = {"data": {"path": "d"}, "models": {"names": ["tiny"], "weights": "none"}, "grid": {"counts": [4]},
            "output": {"dir": "o"}}
    with pytest.raises(ConfigError, match=r"kind = 'os.path:join': 'join' in 'os.path' is not an AttackSpec"):
        parse_config({**base, "attack": {"kind": "os.path:join"}})
    with pytest.raises(ConfigError, match=r"kind = 'no_such_module_x:SPEC': cannot import 'no_such_module_x'"):
        parse_config({**base, "attack": {"kind": "no_such_module_x:SPEC"}})
