"""The report's "Pixels to failure" section on a hand-made run: survival counted by hand, medians and their
intervals against scipy's binomial, agreement with the grid on cases built to overlap and not to, the section
and plots/survival.png present with failure.parquet and absent without it."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from PIL import Image
from report_fixtures import (
    EPS,
    cell,
    checkpoint,
    control_checkpoint,
    failure_row,
    write_base_run,
    write_failure_run,
)
from scipy.stats import binom, binomtest

from pixelray.report import ReportError, build_document, load_runs, write_report
from pixelray.report.render import format_cell
from pixelray.report.survival import agreement, median_interval, median_ranks, survival_curves

POINTS = (1, 2, 4, 8, 16)  # steps_per_octave = 1, max_count = 16
N = None  # no point up to 16 flips the image
FAILS = {  # per model: n_fail of images 0, 1, ...
    "resnet101": [1, 2, 2, 4, 8, N, N, 16, 4, 1],
    "control": [2, 4, 4, 8, 8, 16, N, N, N, 8],
    "aug": [4, 8, 8, 16, N, N, N, N, 16, 8],
    "mynet": [1, 1, 2, 16, N],
}
AUG_REFINED = [3, 6, 5, 11, N, N, N, N, 13, 7]  # the augmented model's ladder refines
RESTORE = [1, 1, 2, 4, N, 2, 1, 8]  # resnet101's FGSM examples at eps 2/255
SECTION = "## Pixels to failure"


def wilson(k: int, n: int) -> tuple[float, float]:
    ci = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    return ci.low, ci.high


def scipy_ranks(n: int) -> tuple[int, int]:
    """(j, k): j the smallest i with P(B <= i) >= 2.5% for B ~ Binomial(n, 1/2), as scipy's ppf finds it."""
    j = int(binom.ppf(0.025, n, 0.5))
    return j, n + 1 - j


def by_hand(values, level_ranks) -> tuple[float, float, float]:
    """Median (the ceil(n/2)-th smallest) and [x_(j), x_(k)], None as +infinity, 0 / inf where out of range."""
    x = sorted(math.inf if v is None else v for v in values)
    j, k = level_ranks
    return x[(len(x) + 1) // 2 - 1], (x[j - 1] if j >= 1 else 0.0), (x[k - 1] if k <= len(x) else math.inf)


def _failure_rows(specs: dict[str, str]) -> list[dict]:
    rows = []
    for key, fails in FAILS.items():
        for i, n_fail in enumerate(fails):
            refined = {"n_fail_refined": AUG_REFINED[i], "refine": True} if key == "aug" else {}
            rows.append(failure_row(specs[key], i, n_fail, **refined))
    # the same ladder named by a second experiment: one measurement, never counted twice
    rows += [failure_row(specs["resnet101"], i, n, experiment="ladder-again") for i, n in enumerate(FAILS["resnet101"])]
    rows += [failure_row(specs["resnet101"], 100 + i, n, target="right", attack="fgsm", eps=EPS,
                         attack_params='{"rounding": true}') for i, n in enumerate(RESTORE)]
    return rows


def _cells(specs: dict[str, str]) -> list[dict]:
    grid = dict(area=32, image_size=32, experiment="grid")
    r101 = specs["resnet101"]
    return [
        cell(r101, 4, 10, 6, **grid),  # correct 4/10 = the ladder's S(4): overlap
        cell(r101, 8, 1000, 950, **grid),  # correct 5% against S(8) = 3/10: no overlap
        cell(r101, 3, 10, 5, **grid),  # not a ladder point
        cell(r101, 4, 10, 1, seed=1, **grid),  # another seed
        cell(r101, 4, 10, 1, **{**grid, "area": 16}),  # another area
        cell(r101, 4, 10, 7, attack="fgsm", eps=EPS, n_restored=3, **grid),  # adversarial examples
        cell(specs["mynet"], 2, 5, 2, **grid),  # correct 3/5 against S(2) = 2/5: overlap
    ]


@pytest.fixture(scope="module")
def ladder_run(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    root = tmp_path_factory.mktemp("survival")
    specs = {"resnet101": "resnet101", "mynet": "mynet",
             "control": control_checkpoint(root, "r101-none", "resnet101", "resnet101"),
             "aug": checkpoint(root, "r101-aug4", "resnet101", 4)}
    return write_failure_run(root, _cells(specs), _failure_rows(specs)), specs


@pytest.fixture(scope="module")
def document(ladder_run):
    return build_document(load_runs([ladder_run[0]]))


def _table(document, key):
    (section,) = document.sections
    return next(t for t in section.tables if t.key == key)


def test_survival_at_each_ladder_point_by_hand(ladder_run):
    run, specs = ladder_run
    curves = survival_curves(load_runs([run])[0].failure)
    for key, fails in FAILS.items():
        mine = curves[curves["model"] == specs[key]]
        assert list(mine["count"]) == list(POINTS), key
        for k, r in zip(POINTS, mine.itertuples(), strict=True):
            alive = sum(1 for v in fails if v is None or v > k)  # null: beyond every point
            assert (r.n, r.n_surviving) == (len(fails), alive), (key, k)
            assert r.survival == alive / len(fails)
            assert (r.low, r.high) == pytest.approx(wilson(alive, len(fails)), abs=1e-9)


@pytest.mark.parametrize("n", [1, 5, 6, 7, 10, 37, 100, 1000, 10_000])
def test_median_ranks_against_scipy(n):
    j, k = median_ranks(n)
    assert (j, k) == scipy_ranks(n)
    if j >= 1:  # coverage P(j <= B <= k - 1) at least 95%, and one rank further in it would not be
        assert binom.cdf(k - 1, n, 0.5) - binom.cdf(j - 1, n, 0.5) >= 0.95
        assert binom.cdf(k - 2, n, 0.5) - binom.cdf(j, n, 0.5) < 0.95


@pytest.mark.parametrize("n", [3, 8, 25, 301])
def test_median_interval_is_the_order_statistics(n):
    rng = np.random.default_rng(n)
    values = [None if v > 200 else int(v) for v in rng.integers(1, 260, n)]
    assert median_interval(values) == by_hand(values, scipy_ranks(n))
    assert median_interval([float("nan") if v is None else v for v in values]) == by_hand(values, scipy_ranks(n))


def test_median_table_families_side_by_side(document, ladder_run):
    table = _table(document, "failure-median")
    ladder = "ladder-full-whole-all-seed0, 1/octave to 16, scan"
    assert table.rows() == [("resnet101", "base", ladder), ("r101-none", "control (aug = none)", ladder),
                            ("r101-aug4", "augmented (4 pixels)", ladder + ", refined"), ("mynet", "—", ladder)]
    for row in table.rows():
        key = {"resnet101": "resnet101", "r101-none": "control", "r101-aug4": "aug", "mynet": "mynet"}[row[0]]
        used = AUG_REFINED if key == "aug" else FAILS[key]  # the refined counts where the ladder refines
        n = len(used)
        median, low, high = by_hand(used, scipy_ranks(n))
        entry = table.cell(row, "median pixels to failure [95% CI]")
        assert (entry["value"], entry["low"], entry["high"], entry["n"]) == (median, low, high, n), key
        assert format_cell(table.cell(row, "n images"), "ours") == str(n)
        survived = table.cell(row, "survived every point")
        assert (survived["k"], survived["n"]) == (FAILS[key].count(None), n)
    # integers as integers, beyond the ladder as "> 16"
    assert format_cell(table.cell(table.rows()[0], "median pixels to failure [95% CI]"), "ours") == "4 [1, > 16]"
    assert format_cell(table.cell(table.rows()[2], "median pixels to failure [95% CI]"), "ours") == "11 [5, > 16]"
    assert format_cell(table.cell(table.rows()[3], "median pixels to failure [95% CI]"), "ours") == "2 [0, > 16]"


def test_pixels_to_restore(document):
    table = _table(document, "failure-restore")
    row = ("resnet101", "FGSM ε = 2/255", "ladder-full-whole-all-seed0, 1/octave to 16, scan")
    assert table.rows() == [row]
    median, low, high = by_hand(RESTORE, scipy_ranks(len(RESTORE)))
    entry = table.cell(row, "median pixels to restore [95% CI]")
    assert (entry["value"], entry["low"], entry["high"]) == (median, low, high) == (2, 1, math.inf)
    assert format_cell(entry, "ours") == "2 [1, > 16]"
    never = table.cell(row, "never restored")
    assert (never["k"], never["n"]) == (1, 8)


def test_agreement_where_the_intervals_overlap_and_where_not(ladder_run):
    run, specs = ladder_run
    failure, cells = (pq.read_table(run / f).to_pandas() for f in ("failure.parquet", "cells.parquet"))
    out = agreement(failure, cells)
    assert list(out.columns) == ["model", "weights", "ladder_id", "count", "survival", "survival_low",
                                 "survival_high", "n_ladder", "grid_correct", "grid_low", "grid_high", "n_grid",
                                 "agree"]
    got = {(r.model, r.count): r for r in out.itertuples()}
    expected = {(specs["resnet101"], 4): (4, 10, 4, 10, True), (specs["resnet101"], 8): (3, 10, 50, 1000, False),
                (specs["mynet"], 2): (2, 5, 3, 5, True)}
    assert set(got) == set(expected)
    for key, (alive, n_ladder, correct, n_grid, agree) in expected.items():
        r = got[key]
        assert (r.n_ladder, r.n_grid, r.agree, r.ladder_id) == (n_ladder, n_grid, agree, "ladder-full-whole-all-seed0")
        assert r.survival == alive / n_ladder and r.grid_correct == pytest.approx(correct / n_grid)
        assert (r.survival_low, r.survival_high) == pytest.approx(wilson(alive, n_ladder), abs=1e-9)
        wrong_low, wrong_high = wilson(n_grid - correct, n_grid)
        assert (r.grid_low, r.grid_high) == pytest.approx((1 - wrong_high, 1 - wrong_low), abs=1e-9)
        assert agree == (r.survival_low <= r.grid_high and r.grid_low <= r.survival_high)


def test_agreement_table(document):
    table = _table(document, "failure-agreement")
    assert [(r[0], r[2]) for r in table.rows()] == [("resnet101", "n = 4"), ("resnet101", "n = 8"),
                                                    ("mynet", "n = 2")]
    texts = [format_cell(table.cell(r, "intervals overlap"), "ours") for r in table.rows()]
    assert texts == ["yes", "NO", "yes"]
    grid = table.cell(table.rows()[1], "grid: correct rate")
    assert (grid["k"], grid["n"]) == (50, 1000)


def test_the_section_and_its_plot_in_a_written_report(ladder_run, tmp_path):
    written = write_report([ladder_run[0]], tmp_path / "report")
    md, html = written["md"].read_text(), written["html"].read_text()
    assert SECTION in md and 'id="pixels-to-failure"' in html and 'href="#pixels-to-failure"' in html
    assert "smallest number of randomly changed pixels" in md and "once broken, stays broken" in md
    section = md[md.index(SECTION):md.index("## Plots")]
    assert "| resnet101 | base | ladder-full-whole-all-seed0, 1/octave to 16, scan | pixelray | 10 | 4 [1, > 16] |" \
        in section
    assert "![Pixels to failure" in section and "(plots/survival.png)" in section
    assert not any(f"| {n}.0 " in section for n in range(1001))  # counts print as integers
    with Image.open(written["plot:survival"]) as im:
        im.load()
        assert written["plot:survival"] == tmp_path / "report" / "plots" / "survival.png" and im.format == "PNG"
    plots = [k for k in written if k.startswith("plot:")]
    assert html.count('<img src="data:image/png;base64,') == len(plots)  # the section's plot inline too


def test_the_plot_draws_every_curve(document, ladder_run):
    (section,) = document.sections
    (plot,) = section.plots
    ax = plot.figure.axes[0]
    assert ax.get_xscale() == "log"
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert set(lines) == {"resnet101", "r101-none", "r101-aug4", "mynet"}
    for label, key in (("resnet101", "resnet101"), ("mynet", "mynet")):
        x, y = lines[label].get_data()
        assert list(x) == list(POINTS)
        assert list(y) == [sum(1 for v in FAILS[key] if v is None or v > k) / len(FAILS[key]) for k in POINTS]


def test_runs_without_failure_parquet_have_no_section(tmp_path):
    base, _ = write_base_run(tmp_path)
    runs = load_runs([base])
    assert runs[0].failure is None
    doc = build_document(runs)
    assert doc.sections == [] and "survival" not in {p.key for p in doc.every_plot}
    written = write_report([base], tmp_path / "report")
    assert "plot:survival" not in written and not (tmp_path / "report" / "plots" / "survival.png").exists()
    assert SECTION not in written["md"].read_text() and "pixels-to-failure" not in written["html"].read_text()


@pytest.mark.parametrize("damage, words", [
    ({"target": "maybe"}, "column target holds 'maybe'"),
    ({"n_fail": 17}, "n_fail = 17 is outside 0 .. max_count = 16"),
    ({"ladder_id": "ladder-full-whole-all-seed3"}, "does not match its columns"),
    ({"steps_per_octave": 0}, "has invalid columns"),
    ({"model": None}, "column model has missing values"),
    ({"target": "right"}, "need attack and eps"),
])
def test_a_damaged_failure_parquet_is_refused(tmp_path, damage, words):
    rows = [failure_row("resnet101", 0, 4), {**failure_row("resnet101", 1, 2), **damage}]
    run = write_failure_run(tmp_path, [cell("resnet101", 4, 10, 1, area=32, image_size=32)], rows)
    with pytest.raises(ReportError, match="failure.parquet") as err:
        load_runs([run])
    assert words in str(err.value)


def test_the_section_imports_neither_ray_nor_torch(ladder_run, tmp_path):
    code = ("import sys; from pixelray.report import write_report; "
            f"w = write_report([{str(ladder_run[0])!r}], {str(tmp_path / 'r')!r}); assert 'plot:survival' in w; "
            "print([m for m in ('ray', 'torch', 'torchvision', 'pixelray.sweep') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_curves_and_medians_of_an_empty_frame():
    frame = pd.DataFrame({c: [] for c in ("model", "target", "n_fail", "image_id")})
    assert survival_curves(frame).empty
    with pytest.raises(ValueError, match="n: 0"):
        median_ranks(0)
