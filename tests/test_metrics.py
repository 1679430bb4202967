"""Pixel-index against the paper's printed values, Wilson intervals, aggregation of unit rows."""

from __future__ import annotations

import csv
import math
import random
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pixelray.core.metrics import (
    CELL_KEYS,
    Z95,
    aggregate,
    amplitude_range,
    pixel_index,
    pixel_index_interval,
    wilson_interval,
)

HERE = Path(__file__).resolve().parent


def paper_file(name: str) -> Path:
    """A file of the paper's printed tables: the copy in tests/data, always there (checked against the shared
    copy beside the repo, where there is one, and against the packaged tables)."""
    return HERE / "data" / name


def read_pixel_index_table() -> list[dict[str, str]]:
    with paper_file("pixel_index.csv").open(newline="") as f:
        rows = list(csv.DictReader(line for line in f if not line.startswith("#")))
    assert rows, "pixel_index.csv has no rows"
    return rows


def wilson_by_quadratic(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson bounds as the roots p of (k/n - p)^2 = z^2 p (1 - p) / n (an independent derivation)."""
    ph = k / n
    a = 1 + z * z / n
    b = -(2 * ph + z * z / n)
    c = ph * ph
    disc = math.sqrt(b * b - 4 * a * c)
    return (-b - disc) / (2 * a), (-b + disc) / (2 * a)


# --- Pixel-index: the paper's numbers --------------------------------------------------------------


def test_the_bundled_copy_matches_the_shared_table():
    bundled = HERE / "data" / "pixel_index.csv"
    assert bundled.is_file()
    shared = Path(__file__).resolve().parents[2] / "shared" / "paper" / "pixel_index.csv"
    if shared.is_file():
        assert bundled.read_text() == shared.read_text()
    # Always, whatever lies beside the checkout: the bundled Table 5 is the packaged one (the report's
    # reference file, pixelray/paper_tables.csv, read here with the csv module), row for row.
    packaged = Path(__file__).resolve().parents[1] / "pixelray" / "paper_tables.csv"
    with packaged.open(newline="") as f:
        table5 = [r for r in csv.DictReader(line for line in f if not line.startswith("#")) if r["table"] == "5"]
    fields = ("model", "wrong", "n_images", "count", "printed_pi")
    assert len(table5) == 5
    assert [tuple(r[k] for k in fields) for r in table5] == [
        tuple(r[k] for k in fields) for r in read_pixel_index_table()]


@pytest.mark.parametrize("row", read_pixel_index_table(), ids=lambda r: r["model"])
def test_pixel_index_reproduces_table_5(row):
    wrong, n, count, printed = int(row["wrong"]), int(row["n_images"]), int(row["count"]), float(row["printed_pi"])
    exact = pixel_index(wrong, n, count, "full", None, 224)
    assert exact == pytest.approx(printed, rel=1e-3)
    # the paper rounded p to 0.1276% before dividing, so the printed values are slightly low
    assert 0 < exact - printed < 1e-3 * printed
    assert exact == pytest.approx((wrong / n) / (count / 224**2), rel=1e-12)


def test_table_5_row_count():
    assert [r["model"] for r in read_pixel_index_table()] == ["DenseNet", "ResNet", "AlexNet", "VGG", "SqueezeNet"]


def test_section_5_worked_example():
    pi = pixel_index(1000, 10000, count=64, amplitude="full", area=200, image_size=224)
    assert pi == pytest.approx(98.30, rel=1e-3)  # printed
    assert round(pi, 2) == 98.34  # exact
    assert pi == pytest.approx(0.1 / ((64 / 224**2) * 1.0 * (200**2 / 224**2)), rel=1e-12)


@pytest.mark.parametrize(
    ("amplitude", "r"), [("full", 1.0), (1, 2 / 255), (10, 20 / 255), (127, 254 / 255), (128, 1.0), (255, 1.0)]
)
def test_amplitude_range(amplitude, r):
    assert amplitude_range(amplitude) == pytest.approx(r, rel=1e-15)


@pytest.mark.parametrize("amplitude", [0, 256, -1])
def test_amplitude_range_rejects(amplitude):
    with pytest.raises(ValueError, match=rf"amplitude: {amplitude} is outside 1\.\.255"):
        amplitude_range(amplitude)


def test_pixel_index_factors():
    # shift amplitude, area and a non-square image, each factor by hand
    pi = pixel_index(500, 10000, count=16, amplitude=40, area=50, image_size=(240, 320))
    p, r, a = 16 / (240 * 320), 80 / 255, 50**2 / (240 * 320)
    assert pi == pytest.approx(0.05 / (p * r * a), rel=1e-12)
    assert pixel_index(0, 10, count=4) == 0.0
    assert pixel_index(352, 10000, 64, image_size=224) == pixel_index(352, 10000, 64, image_size=(224, 224))


@pytest.mark.parametrize(
    ("args", "field"),
    [
        ((1, 0, 64), "n_wrong/n_images"),
        ((11, 10, 64), "n_wrong/n_images"),
        ((-1, 10, 64), "n_wrong/n_images"),
        ((1, 10, 0), "count"),
        ((1, 10, 224 * 224 + 1), "count"),
        ((1, 10, 64, "full", 225), "area"),
        ((1, 10, 64, "full", 0), "area"),
        ((1, 10, 64, 256), "amplitude"),
    ],
)
def test_pixel_index_rejects(args, field):
    with pytest.raises(ValueError, match=field):
        pixel_index(*args)
    with pytest.raises(ValueError, match="k/n" if field == "n_wrong/n_images" else field):
        pixel_index_interval(*args)


def test_pixel_index_interval_is_the_scaled_wilson_interval():
    low, high = pixel_index_interval(352, 10000, 64)
    w_low, w_high = wilson_interval(352, 10000)
    scale = 64 / 224**2
    assert (low, high) == pytest.approx((w_low / scale, w_high / scale), rel=1e-12)
    assert low < pixel_index(352, 10000, 64) < high
    assert f"{low:.2f} .. {high:.2f}" == "24.90 .. 30.57"


# --- Wilson interval -------------------------------------------------------------------------------


def test_wilson_known_values():
    low, high = wilson_interval(352, 10000)
    assert (low, high) == pytest.approx(wilson_by_quadratic(352, 10000), rel=1e-12)
    assert (round(low, 6), round(high, 6)) == (0.031763, 0.038994)
    # textbook case (Wilson 1927; Newcombe 1998 Table I): 81/263 -> 0.2553 .. 0.3662
    assert tuple(round(v, 4) for v in wilson_interval(81, 263)) == (0.2553, 0.3662)


@pytest.mark.parametrize(("k", "n"), [(0, 1), (1, 1), (0, 7), (3, 7), (7, 7), (1, 100), (50, 100), (99, 100),
                                    (352, 10000), (9999, 10000), (81, 263), (1, 1_000_000), (123_456, 1_000_000)])
def test_wilson_equals_scipy(k, n):
    # an independent implementation: scipy's binomial test, Wilson score interval without continuity correction
    from scipy.stats import binomtest

    ci = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    low, high = wilson_interval(k, n)
    assert low == pytest.approx(ci.low, rel=1e-9, abs=1e-15)
    assert high == pytest.approx(ci.high, rel=1e-9, abs=1e-15)


@pytest.mark.parametrize("n", [1, 10, 10000])
def test_wilson_edges(n):
    low, high = wilson_interval(0, n)
    assert low == 0.0  # exactly: the interval holds k/n
    assert high == pytest.approx(Z95**2 / (n + Z95**2), rel=1e-12)
    low, high = wilson_interval(n, n)
    assert high == 1.0
    assert low == pytest.approx(n / (n + Z95**2), rel=1e-12)


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 10**7).flatmap(lambda n: st.tuples(st.integers(0, n), st.just(n))))
def test_wilson_properties(kn):
    k, n = kn
    low, high = wilson_interval(k, n)
    assert 0.0 <= low <= k / n <= high <= 1.0
    assert (low, high) == pytest.approx(wilson_by_quadratic(k, n), rel=1e-9, abs=1e-12)
    mirror_low, mirror_high = wilson_interval(n - k, n)
    assert (low, high) == pytest.approx((1 - mirror_high, 1 - mirror_low), rel=1e-9, abs=1e-12)
    wide_low, wide_high = wilson_interval(k, n, z=2.576)
    assert wide_low <= low and high <= wide_high


@pytest.mark.parametrize(("k", "n"), [(0, 0), (-1, 10), (11, 10), (1, -5)])
def test_wilson_rejects(k, n):
    with pytest.raises(ValueError, match="k/n"):
        wilson_interval(k, n)


# --- aggregate -------------------------------------------------------------------------------------


def unit_row(**over) -> dict:
    row = {
        "experiment": "count", "model": "resnet18", "weights": "random", "attack": None, "eps": None,
        "count": 64, "amplitude": "full", "area": None, "channels": "all", "positions": "per-image",
        "seed": 0, "n_images": 0, "n_wrong": 0, "shard": "s0",
    }
    row.update(over)
    return row


def test_aggregate_sums_units_into_cells():
    rows = [
        unit_row(count=64, n_images=4000, n_wrong=150, shard="s0"),
        unit_row(count=64, n_images=6000, n_wrong=202, shard="s1"),
        unit_row(count=4, n_images=4000, n_wrong=10, shard="s0"),
        unit_row(count=4, n_images=6000, n_wrong=20, shard="s1"),
        unit_row(model="alexnet", count=64, n_images=10000, n_wrong=587),
        unit_row(experiment="area", count=64, area=200, n_images=10000, n_wrong=1000),
        unit_row(experiment="amplitude", count=16, amplitude=10, n_images=5000, n_wrong=5),
        unit_row(experiment="amplitude", count=16, amplitude=10, n_images=5000, n_wrong=7),
    ]
    before = [dict(r) for r in rows]
    out = aggregate(rows, image_size=224)
    assert rows == before, "aggregate modified its input"
    assert len(out) == 5
    by = {(r["experiment"], r["model"], r["count"], r["amplitude"], r["area"]): r for r in out}
    cell = by[("count", "resnet18", 64, "full", None)]
    assert (cell["n_images"], cell["n_wrong"]) == (10000, 352)
    assert cell["wrong_rate"] == pytest.approx(0.0352)
    assert cell["accuracy"] == pytest.approx(0.9648)
    assert (cell["ci_low"], cell["ci_high"]) == pytest.approx(wilson_interval(352, 10000))
    assert cell["pixel_index"] == pytest.approx(pixel_index(352, 10000, 64), rel=1e-12)
    assert round(cell["pixel_index"], 2) == 27.60
    assert cell["image_size"] == 224
    assert cell["shard"] == "s0"  # other keys pass through from the first row of the cell
    small = by[("count", "resnet18", 4, "full", None)]
    assert (small["n_images"], small["n_wrong"]) == (10000, 30)
    assert round(by[("count", "alexnet", 64, "full", None)]["pixel_index"], 2) == 46.02
    assert round(by[("area", "resnet18", 64, "full", 200)]["pixel_index"], 2) == 98.34
    amp = by[("amplitude", "resnet18", 16, 10, None)]
    assert (amp["n_images"], amp["n_wrong"]) == (10000, 12)
    assert amp["pixel_index"] == pytest.approx(pixel_index(12, 10000, 16, 10), rel=1e-12)


def test_aggregate_keeps_first_appearance_order_and_does_not_depend_on_row_order():
    rows = [
        unit_row(count=count, seed=seed, eps=eps, shard=shard, n_images=100, n_wrong=count % 7 + seed + len(shard))
        for shard in ("s0", "s10")
        for count in (64, 4, 16, 8, 32)
        for seed in (0, 1, 10, 2)
        for eps in (None, 2, 16)
    ]
    out = aggregate(rows, 224)
    keys = [tuple(r.get(k) for k in CELL_KEYS) for r in out]
    assert len(keys) == len(set(keys)) == 5 * 4 * 3
    assert keys == list(dict.fromkeys(tuple(r.get(k) for k in CELL_KEYS) for r in rows))
    assert [r["count"] for r in out][::12] == [64, 4, 16, 8, 32]
    assert all(r["n_images"] == 200 for r in out)

    shuffled = rows[:]
    random.Random(0).shuffle(shuffled)

    def by_key(table):
        return {tuple(r.get(k) for k in CELL_KEYS): {k: v for k, v in r.items() if k != "shard"} for r in table}

    assert by_key(aggregate(shuffled, 224)) == by_key(out)


def test_aggregate_mixed_amplitudes_and_empty_cells():
    rows = [
        unit_row(amplitude=127, n_images=10, n_wrong=1),
        unit_row(amplitude="full", n_images=10, n_wrong=2),
        unit_row(amplitude=10, n_images=10, n_wrong=3),
        unit_row(amplitude=40, n_images=0, n_wrong=0),
    ]
    out = aggregate(rows, (224, 224))
    assert [r["amplitude"] for r in out] == [127, "full", 10, 40]
    assert [round(r["pixel_index"], 2) for r in out[:3]] == [
        round(pixel_index(k, 10, 64, a), 2) for k, a in ((1, 127), (2, "full"), (3, 10))
    ]
    empty = out[3]
    assert math.isnan(empty["wrong_rate"]) and math.isnan(empty["pixel_index"]) and math.isnan(empty["ci_low"])
    assert aggregate([], 224) == []
