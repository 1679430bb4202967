"""ImageNet-C impulse noise as a family of cells, and the "equivalent pixels" that relate it to the paper's changes."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from pixelray.config.sweep import ConfigError, load_config, parse_config
from pixelray.core.corrupt import apply_cell, impulse_noise
from pixelray.core.metrics import equivalent_count
from pixelray.core.spec import CORRUPTIONS, Cell, Corruption, PixelChange
from pixelray.sweep import run_sweep

AMOUNTS = {1: 0.03, 2: 0.06, 3: 0.09, 4: 0.17, 5: 0.27}  # Hendrycks & Dietterich (2019), impulse_noise


def noise(severity, seed=0):
    return Cell(Corruption("impulse_noise", severity), seed)


def test_the_amounts_are_imagenet_c_s():
    assert CORRUPTIONS["impulse_noise"] == AMOUNTS


@settings(max_examples=25, deadline=None)
@given(severity=st.integers(1, 5), seed=st.integers(0, 2**31 - 1), n=st.integers(1, 4), side=st.integers(8, 40))
def test_the_share_of_changed_values_is_the_severity_s_amount(severity, seed, n, side):
    images = torch.full((n, side, side, 3), 128, dtype=torch.uint8)  # every flip changes the value
    ids = torch.arange(n) * 7 + seed % 1000
    out = impulse_noise(images, noise(severity, seed), ids)
    changed = out != images
    k, total = int(changed.sum()), changed.numel()
    # inside the binomial 99.9% interval of the amount (a fixed-n exact test, two-sided)
    assert stats.binomtest(k, total, AMOUNTS[severity]).pvalue > 1e-3
    assert set(out[changed].unique().tolist()) <= {0, 255}  # only salt or pepper
    salt = int((out[changed] == 255).sum())
    if k:
        assert stats.binomtest(salt, k, 0.5).pvalue > 1e-3  # halves
    assert torch.equal(out[~changed], images[~changed])


@settings(max_examples=15, deadline=None)
@given(severity=st.integers(1, 5), seed=st.integers(0, 2**31 - 1))
def test_draws_are_a_function_of_seed_cell_and_image_id(severity, seed):
    gen = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (6, 16, 16, 3), generator=gen, dtype=torch.uint8)
    ids = torch.tensor([5, 9, 2, 11, 40, 3])
    cell = noise(severity, seed)
    whole = apply_cell(images, cell, ids)
    assert torch.equal(whole, apply_cell(images, cell, ids))  # a rerun
    parts = torch.cat([apply_cell(images[s:s + 4], cell, ids[s:s + 4]) for s in (0, 4)])
    assert torch.equal(parts, whole)  # the batch does not matter
    order = torch.tensor([3, 0, 5, 1, 4, 2])
    assert torch.equal(apply_cell(images[order], cell, ids[order]), whole[order])  # nor the position in it
    nchw = apply_cell(images.permute(0, 3, 1, 2).contiguous(), cell, ids)
    assert torch.equal(nchw.permute(0, 2, 3, 1), whole)  # nor the layout
    other = apply_cell(images, noise(severity, (seed + 1) % 2**31), ids)
    assert not torch.equal(other, whole)


def test_the_cell_id_names_the_family_and_bad_values_are_refused():
    assert noise(3, 7).cell_id == "impulse_noise-sev3-seed7" and noise(3).family == "impulse_noise"
    assert Cell(PixelChange(4)).family == "pixel_change"
    row = {"family": "impulse_noise", "severity": 3, "seed": 7, "count": None, "amplitude": None}
    assert Cell.from_id("impulse_noise-sev3-seed7") == Cell.from_columns(row) == noise(3, 7)
    assert noise(3, 7).for_image(32, 32) == noise(3, 7)
    with pytest.raises(ValueError, match="not in canonical form; it reads as 'impulse_noise-sev3-seed7'"):
        Cell.from_id("impulse_noise-sev3-seed07")
    with pytest.raises(ValueError, match="severity: 6 is invalid; allowed: \\[1, 2, 3, 4, 5\\]"):
        Corruption("impulse_noise", 6)
    with pytest.raises(ValueError, match="family: 'fog' is unknown"):
        Corruption("fog", 1)


# ---------------------------------------------------------------------------- equivalent pixels


@pytest.mark.parametrize(("counts", "rates", "target", "expected"), [
    ([4, 16, 64], [0.01, 0.03, 0.07], 0.05, 32.0),  # halfway in log2 between 16 and 64
    ([4, 16, 64], [0.01, 0.03, 0.07], 0.03, 16.0),
    ([4, 16, 64], [0.01, 0.03, 0.07], 0.01, 4.0),  # exactly the smallest count's rate
    ([4, 16, 64], [0.01, 0.03, 0.07], 0.07, 64.0),
    ([4, 16, 64], [0.01, 0.03, 0.07], 0.02, 8.0),  # 2 ** (2 + 0.5 * 2)
    ([16, 4, 64], [0.03, 0.01, 0.07], 0.05, 32.0),  # any order
    ([4, 16, 64], [0.01, 0.005, 0.07], 0.03, 2 ** (4 + (0.03 - 0.01) / 0.06 * 2)),  # a dip: the running maximum
    ([4, 16, 64], [0.01, 0.03, 0.07], 0.005, math.nan),  # below the measured rates
    ([4, 16, 64], [0.01, 0.03, 0.07], 0.08, math.nan),  # above
    ([4, 16, 64], [0.0, 0.0, 0.07], 0.0, math.nan),  # a flat start: no count is singled out
    ([4], [0.01], 0.01, math.nan),  # one count is no curve
])
def test_equivalent_count_by_hand(counts, rates, target, expected):
    got = equivalent_count(counts, rates, target)
    assert (math.isnan(got) and math.isnan(expected)) or got == pytest.approx(expected, rel=1e-12)


# ---------------------------------------------------------------------------- config


BASE = {"data": {"path": "d"}, "models": {"names": ["tiny"], "weights": "none"}, "output": {"dir": "o"}}


def test_a_noise_experiment_parses_and_plans_its_cells():
    cfg = parse_config({**BASE, "experiment": [
        {"name": "count", "counts": [4, 8]},
        {"name": "noise", "family": "impulse_noise", "severities": [1, 3]},
    ]})
    assert [c.cell_id for c in cfg.unique_cells((32, 32))] == [
        "n4-full-whole-all-per-image-seed0", "n8-full-whole-all-per-image-seed0",
        "impulse_noise-sev1-seed0", "impulse_noise-sev3-seed0",
    ]
    default = parse_config({**BASE, "experiment": [{"name": "noise", "family": "impulse_noise"}]})
    assert [c.change.severity for c in default.unique_cells()] == [1, 2, 3, 4, 5]


@pytest.mark.parametrize(("experiment", "message"), [
    ({"family": "fog"}, r"family = 'fog': unknown; allowed: \['pixel_change', 'pixels_to_failure', 'impulse_noise'\]"),
    ({"family": "impulse_noise", "severities": [0, 2]}, r"severities = \[0, 2\]: distinct values from \[1, 2, 3"),
    ({"family": "impulse_noise", "severities": [2, 2]}, r"severities = \[2, 2\]: distinct values"),
    ({"family": "impulse_noise", "counts": [4]}, r"unknown key\(s\) \['counts'\]"),
])
def test_bad_noise_experiments_are_refused(experiment, message):
    with pytest.raises(ConfigError, match=message):
        parse_config({**BASE, "experiment": [{"name": "noise", **experiment}]})


def test_the_paper_config_keeps_the_hash_it_had_before_families_and_plugins():
    # computed by the code of commit de2aede, before corruption families and attack plug-ins
    assert load_config("jobs/paper.toml").config_hash == "f74dd8255b7bd3cb"


# ---------------------------------------------------------------------------- in a sweep


def equivalent_by_hand(counts, rates, target):
    """What ``equivalent_count``'s docstring says, computed here with numpy: the wrong rates made a running
    maximum over increasing counts, then ``np.interp`` of log2(count) at ``target`` between the first count
    whose rate reaches it and the count below it; NaN outside the measured rates or on a flat start."""
    order = np.argsort(counts)
    sides = np.asarray(counts, dtype=float)[order]
    envelope = np.maximum.accumulate(np.asarray(rates, dtype=float)[order])
    if len(sides) < 2 or math.isnan(target) or not envelope[0] <= target <= envelope[-1]:
        return math.nan
    i = int(np.searchsorted(envelope, target, side="left"))  # the first count reaching target
    if i == 0:  # the smallest count's own rate: that count, unless the next one has it too
        return float(sides[0]) if envelope[1] > envelope[0] else math.nan
    return float(2 ** np.interp(target, envelope[i - 1 : i + 1], np.log2(sides[i - 1 : i + 1])))


@pytest.mark.slow
def test_noise_in_a_sweep_rises_with_severity_and_gets_equivalent_pixels(
    ray_local, synthetic_dataset, tiny_checkpoints, tmp_path
):
    cfg = parse_config({
        "data": {"path": str(synthetic_dataset)},
        "models": {"names": list(tiny_checkpoints), "weights": "none"},
        "eval": {"filter": "all", "size": 200, "batch_size": 100},
        "experiment": [
            {"name": "count", "counts": [16, 64, 256, 512, 768]},
            {"name": "noise", "family": "impulse_noise", "severities": [1, 2, 3, 4, 5]},
        ],
        "output": {"dir": str(tmp_path / "out")},
        "run": {"threads": 2},
    })
    df = pd.read_parquet(run_sweep(cfg, progress=False).cells_path)
    rows = df[df.family == "impulse_noise"]
    assert len(rows) == 2 * 5 and rows[["count", "amplitude", "area", "pixel_index"]].isna().all().all()
    assert (df[df.family == "pixel_change"].severity.isna()).all()
    for model, g in rows.groupby("model"):
        rates = g.sort_values("severity").wrong_rate.to_numpy()
        assert rates[-1] > rates[0], (model, rates)
        assert stats.spearmanr(np.arange(5), rates).statistic > 0.8, (model, rates)
        curve = df[(df.model == model) & (df.family == "pixel_change")].sort_values("count")
        for r in g.itertuples():  # the interpolation, recomputed here by hand from the rows themselves
            expected = equivalent_by_hand(curve["count"].tolist(), curve.wrong_rate.tolist(), r.wrong_rate)
            # approx: np.interp orders the arithmetic its own way
            assert (math.isnan(expected) and pd.isna(r.equivalent_pixels)) or r.equivalent_pixels == pytest.approx(
                expected, rel=1e-12)
        assert g.equivalent_pixels.notna().any()
