"""Pixels to failure as numbers: survival curves, medians with exact intervals, agreement with the grid.

A ladder gives each image one nested sequence of random pixel changes (``pixelray.core.ladder``): the image
with its first k+1 changes is the image with its first k changes and one more. ``failure.parquet`` holds, per
(model, ladder, image), ``n_fail``: the first ladder point at which the model's verdict flips (null: no point
up to ``max_count`` flips it). Everything here is a pure function of such rows (and of cells.parquet's):

- :func:`survival_curves`: at each ladder point k, S(k) = the share of images with ``n_fail > k`` (a null
  counts as beyond every point), with a 95% Wilson interval;
- :func:`median_interval`: the median pixels to failure, with a distribution-free interval from order
  statistics, [x_(j), x_(k)] with ranks from Binomial(n, 1/2) (:func:`median_ranks`), coverage >= 95%;
- :func:`agreement`: S(k) beside the grid's correct rate at the same count. Both estimate the probability
  that k random changed pixels leave the image correctly classified, provided that an image, once broken,
  stays broken (the ladder counts an image broken from its first failing point on); non-overlapping
  intervals say that assumption, or the runs, differ.

A curve is one (model, weights, target, attack, ladder and its points) of one run; the same ladder named by
two experiments is one measurement (:func:`measurements`), as a grid cell two experiments share is.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import numpy as np
import pandas as pd

from pixelray.core.ladder import Ladder
from pixelray.core.metrics import wilson_interval

__all__ = ["AGREEMENT_COLUMNS", "CURVE_KEYS", "WORST_COLUMNS", "agreement", "failure_medians", "ladder_points_of",
           "measurements", "median_interval", "median_ranks", "pixels_to_failure", "random_rows", "survival_curves",
           "worst_vs_random"]

#: The columns that name a curve (those a frame has): a run's model, target and ladder with its points.
CURVE_KEYS = ("run", "model", "weights", "target", "kind", "attack", "attack_params", "eps", "ladder_id", "amplitude",
              "area", "channels", "seed", "steps_per_octave", "max_count", "search", "refine", "image_size")
#: The columns of :func:`worst_vs_random`'s frame, in order.
WORST_COLUMNS = ("run", "model", "weights", "attack_params", "random_ladder", "n_random", "random_median",
                 "random_low", "random_high", "random_top", "n_worst", "worst_median", "worst_low", "worst_high",
                 "worst_top", "n_both", "n_worst_le_random")
#: The columns of :func:`agreement`'s frame, in order.
AGREEMENT_COLUMNS = ("model", "weights", "ladder_id", "count", "survival", "survival_low", "survival_high",
                     "n_ladder", "grid_correct", "grid_low", "grid_high", "n_grid", "agree")
#: What a grid cell and a ladder must share to be compared (besides the count).
_MATCH = ("model", "weights", "amplitude", "side", "channels", "seed", "image_size")


def _keys(df: pd.DataFrame) -> list[str]:
    return [c for c in CURVE_KEYS if c in df.columns]


def _curves(df: pd.DataFrame) -> Iterable[tuple[dict[str, Any], pd.DataFrame]]:
    """(the curve's key columns, its rows) per curve, in the order curves first appear."""
    keys = _keys(df)
    if df.empty:
        return
    for values, group in df.groupby(keys, sort=False, dropna=False):
        yield dict(zip(keys, values, strict=True)), group


def _as_float(values: pd.Series) -> np.ndarray:
    """An integer column (nulls included, whatever its dtype) as floats with NaN for null."""
    return pd.to_numeric(values, errors="coerce").to_numpy(dtype="float64", na_value=np.nan)


def measurements(df: pd.DataFrame) -> pd.DataFrame:
    """One row per (curve, image): a ladder that several experiments name is measured once."""
    return df.drop_duplicates(subset=[*_keys(df), "image_id"]).reset_index(drop=True)


def pixels_to_failure(df: pd.DataFrame) -> np.ndarray:
    """Per row, its pixels to failure as a float: ``n_fail_refined`` where the ladder refines (and holds one),
    else ``n_fail``; +infinity where no point up to ``max_count`` flips the image."""
    refined = _as_float(df["n_fail_refined"])
    use = df["refine"].fillna(False).to_numpy(dtype=bool) & ~np.isnan(refined)
    values = np.where(use, refined, _as_float(df["n_fail"]))
    return np.where(np.isnan(values), math.inf, values)


def ladder_points_of(row: Any) -> tuple[int, ...]:
    """The ladder points of a failure.parquet row (``Ladder.from_columns``, on square images)."""
    size = int(row["image_size"])
    return Ladder.from_columns(row).points(size, size)


def median_ranks(n: int, level: float = 0.95) -> tuple[int, int]:
    """1-based ranks (j, k) of the order statistics bounding the median: [x_(j), x_(k)] covers it with
    probability 1 - 2 F(j - 1) >= ``level`` for any distribution, F the CDF of Binomial(n, 1/2), j the largest
    such rank and k = n + 1 - j. j = 0 (k = n + 1): no order statistic will do (n < 6 at 95%).

    >>> median_ranks(10), median_ranks(100), median_ranks(5)
    ((2, 9), (40, 61), (0, 6))
    """
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n: {n!r} is invalid; need an integer >= 1 (images in the curve)")
    if not 0 < level < 1:
        raise ValueError(f"level: {level!r} is invalid; need 0 < level < 1")
    tail, j, cdf = (1 - level) / 2, 0, 0.0
    for i in range(n):
        cdf += _half_binomial_pmf(i, n)
        if cdf > tail:  # F(i) > tail: rank i + 1 would cover less than level
            break
        j = i + 1
    return j, n + 1 - j


def _half_binomial_pmf(i: int, n: int) -> float:
    """P(B = i) for B ~ Binomial(n, 1/2), through lgamma (no overflow for any n)."""
    return math.exp(math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) - n * math.log(2))


def median_interval(values: Iterable[float | None], level: float = 0.95) -> tuple[float, float, float]:
    """(median, low, high) of pixel counts; None, NaN and +infinity mean "beyond the ladder" (+infinity).

    The median is the ceil(n/2)-th smallest value (the first count by which half the images broke, as a
    survival curve's median); [low, high] = [x_(j), x_(k)] with :func:`median_ranks`: low is 0 (the least
    pixel count) and high +infinity where no order statistic will do.

    >>> median_interval([1, 2, 3, None, 5, 6, 7, 8, 9, 10])
    (6.0, 2.0, 10.0)
    """
    x = sorted(math.inf if v is None or math.isnan(v) else float(v) for v in values)
    if not x:
        raise ValueError("values: empty; a median needs at least one image")
    j, k = median_ranks(len(x), level)
    low = x[j - 1] if j >= 1 else 0.0
    high = x[k - 1] if k <= len(x) else math.inf
    return x[(len(x) + 1) // 2 - 1], low, high


def survival_curves(df: pd.DataFrame, target: str = "wrong") -> pd.DataFrame:
    """Per curve of failure.parquet rows with ``target`` and per ladder point k: n images, how many survive
    (``n_fail > k``; null survives every point), S(k) and its 95% Wilson interval (``low``, ``high``)."""
    rows = []
    for key, group in _curves(measurements(df[df["target"] == target])):
        fail = _as_float(group["n_fail"])
        fail = np.where(np.isnan(fail), math.inf, fail)
        n = len(fail)
        for k in ladder_points_of(group.iloc[0]):
            alive = int((fail > k).sum())
            low, high = wilson_interval(alive, n)
            rows.append({**key, "count": k, "n": n, "n_surviving": alive, "survival": alive / n,
                         "low": low, "high": high})
    columns = [*_keys(df), "count", "n", "n_surviving", "survival", "low", "high"]
    return pd.DataFrame(rows, columns=columns)


def failure_medians(df: pd.DataFrame, target: str = "wrong") -> pd.DataFrame:
    """Per curve of rows with ``target``: n images, the median pixels to failure (:func:`pixels_to_failure`)
    and its 95% interval (:func:`median_interval`), ``n_survived`` (no point flips them: ``n_fail`` null),
    ``top`` (the last point) and ``refined`` (whether the medians are of ``n_fail_refined``)."""
    rows = []
    for key, group in _curves(measurements(df[df["target"] == target])):
        median, low, high = median_interval(pixels_to_failure(group))
        rows.append({**key, "n": len(group), "median": median, "low": low, "high": high,
                     "n_survived": int(group["n_fail"].isna().sum()), "top": ladder_points_of(group.iloc[0])[-1],
                     "refined": bool(group["refine"].iloc[0])})
    columns = [*_keys(df), "n", "median", "low", "high", "n_survived", "top", "refined"]
    return pd.DataFrame(rows, columns=columns)


def _side(df: pd.DataFrame) -> pd.Series:
    """The side of a change's square area, the image's side for the whole image (null area or area = size)."""
    return pd.to_numeric(df["area"], errors="coerce").fillna(df["image_size"]).astype("int64")


def _grid_cells(cells: pd.DataFrame) -> pd.DataFrame:
    """cells.parquet's plain pixel-change rows with per-image positions, one per setting and count."""
    family = cells["family"].fillna("pixel_change") if "family" in cells else "pixel_change"
    grid = cells[(family == "pixel_change") & cells["attack"].isna() & (cells["positions"] == "per-image")
                 & cells["count"].notna() & (cells["n_images"] > 0)]
    grid = grid.assign(side=_side(grid), count=grid["count"].astype("int64"))
    return grid.drop_duplicates(subset=[*_MATCH, "count"])  # a cell two experiments share: one measurement


def agreement(failure_df: pd.DataFrame, cells_df: pd.DataFrame) -> pd.DataFrame:
    """The ladders' survival S(count) beside the grid's correct rate, where the grid measured a ladder point.

    A grid cell matches a ladder of rows with ``target = "wrong"`` when it is a plain pixel change (no attack,
    per-image positions) with the ladder's model, weights, amplitude, area (the whole image: a null area or
    the image's side), channels, seed and image size, and its count is one of the ladder's points. The
    grid's correct rate is 1 - n_wrong / n_images with the interval (1 - high, 1 - low) of the Wilson interval
    on n_wrong (from the counts: the report never relies on the stored rates). ``agree``: the two 95%
    intervals overlap. Columns: :data:`AGREEMENT_COLUMNS`.
    """
    curves = survival_curves(random_rows(failure_df), "wrong")
    if curves.empty or cells_df.empty:
        return pd.DataFrame(columns=list(AGREEMENT_COLUMNS))
    curves = curves.assign(side=_side(curves))
    grid = _grid_cells(cells_df)
    both = curves.merge(grid[[*_MATCH, "count", "n_images", "n_wrong"]], on=[*_MATCH, "count"], how="inner")
    rows = []
    for r in both.itertuples(index=False):
        wrong_low, wrong_high = wilson_interval(int(r.n_wrong), int(r.n_images))
        grid_low, grid_high = 1 - wrong_high, 1 - wrong_low
        rows.append({"model": r.model, "weights": r.weights, "ladder_id": r.ladder_id, "count": int(r.count),
                     "survival": r.survival, "survival_low": r.low, "survival_high": r.high, "n_ladder": int(r.n),
                     "grid_correct": 1 - r.n_wrong / r.n_images, "grid_low": grid_low, "grid_high": grid_high,
                     "n_grid": int(r.n_images), "agree": bool(r.low <= grid_high and grid_low <= r.high)})
    out = pd.DataFrame(rows, columns=list(AGREEMENT_COLUMNS))
    return out.drop_duplicates(subset=["model", "weights", "ladder_id", "count"]).reset_index(drop=True)


def random_rows(df: pd.DataFrame) -> pd.DataFrame:
    """The rows of random ladders (``kind`` "random"; every row of a run written before worst-case ladders)."""
    return df if "kind" not in df.columns else df[df["kind"] != "worst_case"]


def worst_vs_random(df: pd.DataFrame) -> pd.DataFrame:
    """Per worst-case ladder (``kind = "worst_case"``) and each random ladder of the same run, model and weights
    that changes whole pixels at random anywhere (full range, whole image, every channel): both medians with
    their 95% intervals, and over the images both broke, in how many the search needed no more pixels than the
    random changes. Columns: :data:`WORST_COLUMNS`."""
    if "kind" not in df.columns:
        return pd.DataFrame(columns=list(WORST_COLUMNS))
    wrong = measurements(df[df["target"] == "wrong"])
    worst = wrong[wrong["kind"] == "worst_case"]
    plain = random_rows(wrong)
    whole = (_side(plain) == plain["image_size"]) & (plain["amplitude"] == "full") & (plain["channels"] == "all")
    plain = plain[whole]
    rows = []
    for key, w in _curves(worst):
        mine = plain[(plain["run"] == key["run"]) & (plain["model"] == key["model"])
                     & (plain["weights"].fillna("") == ("" if pd.isna(key["weights"]) else key["weights"]))]
        for rkey, r in _curves(mine[mine["image_id"].isin(w["image_id"])]):  # the same images
            w_med, w_low, w_high = median_interval(pixels_to_failure(w))
            r_med, r_low, r_high = median_interval(pixels_to_failure(r))
            both = w.merge(r, on="image_id", suffixes=("_w", "_r"))
            found = both["n_fail_w"].notna() & both["n_fail_r"].notna()
            le = (_as_float(both["n_fail_w"][found]) <= _as_float(both["n_fail_r"][found])).sum()
            rows.append({"run": key["run"], "model": key["model"], "weights": key["weights"],
                         "attack_params": key["attack_params"], "random_ladder": rkey["ladder_id"],
                         "n_random": len(r), "random_median": r_med, "random_low": r_low, "random_high": r_high,
                         "random_top": ladder_points_of(r.iloc[0])[-1], "n_worst": len(w), "worst_median": w_med,
                         "worst_low": w_low, "worst_high": w_high, "worst_top": ladder_points_of(w.iloc[0])[-1],
                         "n_both": int(found.sum()), "n_worst_le_random": int(le)})
    return pd.DataFrame(rows, columns=list(WORST_COLUMNS))
