"""Results of the existing configs do not change when the code is reorganised, and a row says how to redo it.

``tests/data/demo_golden_cells.csv`` holds the pixel-change rows of a sweep of
``jobs/demo.toml`` made by the code before the driver was split into a package
(commit de2aede), over models and data that give the same predictions on every CPU
(``exact_models.py``: integer images, integer weights, exact sums). The same sweep by
today's code must give the same rows, row by row.

The same sweep's rows are then recounted from their columns alone: the cell rebuilt from
``count`` .. ``seed`` and ``image_size``, the evaluated images (``image_ids.txt``) read
with pyarrow, the model loaded by its name, the pixels changed by the perturbation code
of fbc5ed4 (``reference_perturb``), the misclassified ones counted.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import reference_perturb
import tomllib
import torch
from exact_models import make_data

from pixelray.config.sweep import parse_config
from pixelray.core.spec import Cell
from pixelray.models import load_model
from pixelray.sweep import run_sweep

TESTS = Path(__file__).resolve().parent
GOLDEN = TESTS / "data" / "demo_golden_cells.csv"


@pytest.fixture(scope="module")
def demo_run(ray_local, tmp_path_factory) -> Path:
    """A sweep of jobs/demo.toml over the exact models and data; returns its directory (data/, out/)."""
    tmp_path = tmp_path_factory.mktemp("demo")
    make_data(tmp_path / "data")
    # on the session's Ray, whose workers import exact_models from tests/ (tests/conftest.py)
    run_sweep(parse_config(_demo_raw(tmp_path)), progress=False)
    return tmp_path


def _demo_raw(tmp_path: Path) -> dict:
    """jobs/demo.toml over the exact models and data of ``tmp_path``."""
    raw = tomllib.loads((TESTS.parent / "jobs" / "demo.toml").read_text())
    raw["data"]["path"] = str(tmp_path / "data")
    raw["models"]["names"] = ["exact_models:make0", "exact_models:make1"]
    raw["output"]["dir"] = str(tmp_path / "out")
    return raw


@pytest.mark.slow
def test_a_demo_sweep_gives_the_rows_it_gave_before_the_split(demo_run):
    golden = pd.read_csv(GOLDEN, dtype={"amplitude": str})
    cells = pd.read_parquet(demo_run / "out" / "cells.parquet")
    plain = cells[cells.attack.isna()]
    if "family" in plain.columns:
        plain = plain[plain.family == "pixel_change"]
    assert (golden.n_wrong > 0).any() and len(golden) == 24
    pd.testing.assert_frame_equal(plain[golden.columns].reset_index(drop=True), golden, check_dtype=False)


def _evaluated_images(run: Path) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids, labels, images NHWC uint8) of the run's evaluated images, read with pyarrow only."""
    wanted = [int(line) for line in (run / "out" / "image_ids.txt").read_text().split()]
    table = pa.concat_tables([pq.read_table(path, columns=["image_id", "label", "image"])
                              for path in sorted((run / "data").glob("*.parquet"))])
    ids = table.column("image_id").to_numpy()
    order = {int(i): k for k, i in enumerate(ids)}
    rows = [order[i] for i in wanted]
    pixels = np.frombuffer(b"".join(table.column("image").to_pylist()), dtype=np.uint8).reshape(len(ids), 32, 32, 3)
    labels = table.column("label").to_numpy().astype(np.int64)
    return torch.tensor(wanted), torch.from_numpy(labels[rows]), torch.from_numpy(pixels[rows].copy())


@pytest.mark.slow
def test_five_random_rows_recount_from_their_columns_alone(demo_run):
    cells = pd.read_parquet(demo_run / "out" / "cells.parquet")
    plain = cells[cells.attack.isna() & (cells.family == "pixel_change")].reset_index(drop=True)
    assert (cells.family == "impulse_noise").any()  # their rows rebuild too (their draws: test_corrupt.py)
    # every row's columns rebuild the cell that its cell_id names (whole-image rows say area = 32)
    for _, row in cells.iterrows():
        assert Cell.from_columns(row).cell_id == row.cell_id
        assert Cell.from_id(row.cell_id) == Cell.from_columns(row)
    assert (plain.area == 32).any() and plain.cell_id.str.contains("-whole-").any()
    chosen = plain.sample(5, random_state=np.random.default_rng(11))
    assert (chosen.area == 32).any() and (chosen.area < 32).any(), "the sample should hold both kinds of rows"
    ids, labels, images = _evaluated_images(demo_run)
    for _, row in chosen.iterrows():
        cell = Cell.from_columns(row)  # no cell_id: count, amplitude, area, channels, positions, seed, image_size
        model = load_model(row.model, None, num_classes=10)
        changed = reference_perturb.apply_pixel_changes(images, cell, ids)
        with torch.inference_mode():
            wrong = int((model(changed).argmax(1) != labels).sum())
        assert (len(ids), wrong) == (row.n_images, row.n_wrong), row.cell_id


@pytest.mark.slow
def test_failure_rows_rebuild_from_their_columns_alone_and_every_count_below_is_classified_correctly(demo_run):
    """A few failure.parquet rows of the demo's ladder, rebuilt from their columns with the reference draws
    (tests/reference_perturb.py, written from the README), and scanned count by count with the model."""
    rows = pd.read_parquet(demo_run / "out" / "failure.parquet")
    wrong = rows[(rows.target == "wrong") & (rows.kind == "random")]
    ids, labels, images = _evaluated_images(demo_run)
    assert set(wrong.model) == {"exact_models:make0", "exact_models:make1"}
    assert len(wrong) == 2 * len(ids) and wrong.n_fail.notna().any() and wrong.n_fail.isna().any()
    rng = np.random.default_rng(5)
    chosen = pd.concat([wrong[wrong.n_fail.notna()].sample(4, random_state=rng),
                        wrong[wrong.n_fail.isna()].sample(1, random_state=rng)])
    place = {int(i): k for k, i in enumerate(ids.tolist())}
    for _, row in chosen.iterrows():
        the_id = reference_perturb.ladder_id(row.amplitude, row.area, row.channels, row.seed, row.image_size)
        assert the_id == row.ladder_id
        side = row.image_size if row.area is None else row.area
        points = reference_perturb.ladder_points(side * side, row.steps_per_octave, row.max_count)
        image, label = images[place[row.image_id]], int(labels[place[row.image_id]])
        assert label == row.label
        top = int(row.max_count if pd.isna(row.n_fail) else row.n_fail)
        changes = reference_perturb.ladder_changes(image, row.image_id, top, the_id, row.amplitude, row.area,
                                                   row.channels)
        per, changed = len(changes) // top, image.clone()
        model = load_model(row.model, None, num_classes=10)
        verdicts = []
        for k in range(1, top + 1):
            for y, x, c, new in changes[(k - 1) * per : k * per]:
                changed[y, x, c] = new
            with torch.inference_mode():
                verdicts.append(int(model(changed.permute(2, 0, 1)[None]).argmax()) == label)
        failing = [k for k in points if k <= top and not verdicts[k - 1]]
        assert (failing[0] if failing else None) == (None if pd.isna(row.n_fail) else int(row.n_fail)), row.image_id
        assert all(verdicts[k - 1] for k in points if k < top or pd.isna(row.n_fail))  # correct below n_fail
        if not pd.isna(row.n_fail):  # refine = true: correct just below the refined count, wrong at it
            r = int(row.n_fail_refined)
            assert row.n_last_correct < r <= row.n_fail and not verdicts[r - 1] and (r == 1 or verdicts[r - 2])


@pytest.mark.slow
def test_the_plan_counts_what_the_sweep_then_does(demo_run):
    """pixelray plan's figures, from the config and the data alone, against the workers' own counts."""
    import json

    from pixelray.sweep.plan import plan_sweep

    plan = plan_sweep(parse_config(_demo_raw(demo_run)))
    stats = json.loads((demo_run / "out" / "stats.json").read_text())
    done, units = stats["images"], stats["units_run"]
    evaluated = len((demo_run / "out" / "image_ids.txt").read_text().split())  # filter "all": known after clean
    assert (plan.models, plan.num_images, plan.shards, plan.cells) == (2, 600, 6, 16)
    assert done["clean"] == plan.images("clean") == 2 * 600  # exact
    assert done["cells"] == 2 * evaluated * plan.cells <= plan.images("cells") == 2 * 500 * 16
    assert units["clean"] == units["cells"] == units["failure"] == 2 * 6 == plan.models * plan.phases[0].units
    assert done["failure"] == stats["failure"]["passes"] <= plan.images("failure")  # the rows' n_passes agree
    assert done["attack"] <= plan.images("attack:fgsm") + plan.images("attack:pgd")
    # the gradient passes: every candidate (every image both models get right: not cut to the eval size), at
    # every eps, once for FGSM and `steps` times for PGD: from clean.parquet, by hand
    clean = pd.read_parquet(demo_run / "out" / "clean.parquet")
    candidates = int(clean.groupby("image_id").correct.all().sum())
    assert stats["grad_images"]["attack"] == 2 * 3 * candidates * (1 + 10) <= plan.grad_images()
    assert plan.grad_images() == 2 * 3 * 600 * 11  # the bound: every image a candidate
    assert sum(p["attack"]["grad_images"] for p in stats["by_model"].values()) == stats["grad_images"]["attack"]
    # rates read back from this run, over the plan's figures (bounds): at least the compute the run measured,
    # which those rates reproduce exactly over the images it did forward
    from pixelray.sweep.estimate import estimate, throughput_from_stats

    rates = throughput_from_stats(stats, plan.config.models, "stats.json")
    assert estimate(plan, rates).compute_s >= sum(stats["compute_s"].values()) * 0.999
    assert sum(stats["reads"].values()) <= len(plan.phases) * plan.models * plan.shards
