"""Pixel-index, Wilson intervals, and aggregation of per-unit counts into per-cell rows.

Pixel-index (Zhang & Cai 2021, section 5): ``Pi = w / (p * r * a)`` with
``w`` the misclassified fraction, ``p = n / (H * W)``, ``r`` the amplitude range
over 255 (``full`` -> 1, shift ``a`` -> ``min(2a, 255) / 255``) and
``a = s**2 / (H * W)``.

Example (the paper's worked example, printed as 98.30 after rounding p):
    >>> round(pixel_index(1000, 10000, count=64, amplitude="full", area=200, image_size=224), 2)
    98.34
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

__all__ = [
    "CELL_KEYS",
    "aggregate",
    "amplitude_range",
    "equivalent_count",
    "pixel_index",
    "pixel_index_interval",
    "wilson_interval",
]

Z95 = 1.959963984540054

#: Columns that identify a cell row (per model, experiment and attack).
CELL_KEYS = (
    "experiment", "model", "weights", "attack", "eps", "family", "count", "amplitude", "area",
    "channels", "positions", "severity", "seed",
)


def _size(image_size: int | tuple[int, int]) -> tuple[int, int]:
    if isinstance(image_size, int):
        return image_size, image_size
    height, width = image_size
    return int(height), int(width)


def amplitude_range(amplitude: int | str) -> float:
    """``r`` of the Pixel-index: the changed value range over 255."""
    if amplitude == "full":
        return 1.0
    a = int(amplitude)
    if not 1 <= a <= 255:
        raise ValueError(f"amplitude: {amplitude!r} is outside 1..255; use 'full' or an integer shift 1..255")
    return min(2 * a, 255) / 255


def _pi_scale(count: int, amplitude: int | str, area: int | None, image_size: int | tuple[int, int]) -> float:
    height, width = _size(image_size)
    pixels = height * width
    if count < 1 or count > pixels:
        raise ValueError(f"count: {count} is outside 1..{pixels} for a {height}x{width} image")
    if area is not None and not 1 <= area <= min(height, width):
        raise ValueError(f"area: {area} is outside 1..{min(height, width)} for a {height}x{width} image")
    p = count / pixels
    a = 1.0 if area is None else area * area / pixels
    return p * amplitude_range(amplitude) * a


def pixel_index(
    n_wrong: int,
    n_images: int,
    count: int,
    amplitude: int | str = "full",
    area: int | None = None,
    image_size: int | tuple[int, int] = 224,
) -> float:
    """Pixel-index Pi, computed exactly (no intermediate rounding)."""
    if n_images < 1 or not 0 <= n_wrong <= n_images:
        raise ValueError(f"n_wrong/n_images: {n_wrong}/{n_images} is invalid; need 0 <= wrong <= images, images >= 1")
    return (n_wrong / n_images) / _pi_scale(count, amplitude, area, image_size)


def wilson_interval(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion k/n (95% by default)."""
    if n < 1 or not 0 <= k <= n:
        raise ValueError(f"k/n: {k}/{n} is invalid; need 0 <= k <= n, n >= 1")
    p = k / n
    z2 = z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    # exact at the edges (rounding would leave e.g. 5e-17 > 0 = k/n at k = 0)
    low = 0.0 if k == 0 else max(0.0, centre - half)
    high = 1.0 if k == n else min(1.0, centre + half)
    return low, high


def pixel_index_interval(
    n_wrong: int,
    n_images: int,
    count: int,
    amplitude: int | str = "full",
    area: int | None = None,
    image_size: int | tuple[int, int] = 224,
) -> tuple[float, float]:
    """95% interval of Pi: the Wilson interval on w, scaled (Pi is linear in w)."""
    low, high = wilson_interval(n_wrong, n_images)
    scale = _pi_scale(count, amplitude, area, image_size)
    return low / scale, high / scale


def aggregate(rows: Iterable[Mapping[str, Any]], image_size: int | tuple[int, int]) -> list[dict[str, Any]]:
    """Sum per-unit counts into one row per cell, with rates, Wilson interval and Pi.

    Each input row carries the :data:`CELL_KEYS` plus ``n_images`` and ``n_wrong``
    (other keys pass through from the first row of a cell). ``area`` None means
    the whole image. Output rows keep the order in which each cell first appears.

    Rows over adversarial examples also carry ``n_restored`` (examples classified
    correctly again after the change); it is summed too and gives ``restored_rate``.
    Rows without it (or with None) get ``n_restored`` and ``restored_rate`` None.
    """
    cells: dict[tuple, dict[str, Any]] = {}
    for row in rows:
        key = tuple(row.get(k) for k in CELL_KEYS)
        into = cells.get(key)
        if into is None:
            cells[key] = dict(row)
        else:
            into["n_images"] += row["n_images"]
            into["n_wrong"] += row["n_wrong"]
            if into.get("n_restored") is not None:
                into["n_restored"] += row["n_restored"]
    height, width = _size(image_size)
    out = []
    for row in cells.values():
        n, k = int(row["n_images"]), int(row["n_wrong"])
        area = row["area"]
        row["wrong_rate"] = k / n if n else math.nan
        row["accuracy"] = 1 - row["wrong_rate"]
        row["ci_low"], row["ci_high"] = wilson_interval(k, n) if n else (math.nan, math.nan)
        if row.get("count") is None:  # a corruption: no Pixel-index
            row["pixel_index"] = None
        else:
            row["pixel_index"] = pixel_index(k, n, row["count"], row["amplitude"], area, (height, width)) if n \
                else math.nan
        restored = row.get("n_restored")
        row["n_restored"] = None if restored is None else int(restored)
        row["restored_rate"] = None if restored is None else (restored / n if n else math.nan)
        row["image_size"] = height
        out.append(row)
    return out


def equivalent_count(counts: Sequence[int], rates: Sequence[float], target: float) -> float:
    """The changed-pixel count whose wrong rate equals ``target``, interpolated on the count axis.

    ``rates[i]`` is the wrong rate at ``counts[i]``. Rates are made non-decreasing in count
    (each the highest so far: more changed pixels never do less damage, sampling noise
    aside), then the first count reaching ``target`` is found and interpolated linearly
    in log2(count) with the count below it. NaN when ``target`` lies outside the measured
    rates (below the smallest count's, above the largest's), or equals the smallest count's
    rate when the next count has it too (a flat start: no count is singled out).

    >>> equivalent_count([4, 16, 64], [0.01, 0.03, 0.07], 0.05)
    32.0
    """
    if target is None or (isinstance(target, float) and math.isnan(target)) or len(counts) < 2:
        return math.nan
    pairs = sorted(zip(counts, rates, strict=True))
    logs = [math.log2(c) for c, _ in pairs]
    envelope = []
    for _, rate in pairs:
        envelope.append(max(rate, envelope[-1]) if envelope else rate)
    if not envelope[0] <= target <= envelope[-1]:
        return math.nan
    i = next(j for j, rate in enumerate(envelope) if rate >= target)
    if i == 0:  # the smallest count's rate; on a flat start (the next count's too) no count is singled out
        return float(pairs[0][0]) if envelope[1] > envelope[0] else math.nan
    frac = (target - envelope[i - 1]) / (envelope[i] - envelope[i - 1])
    return float(2 ** (logs[i - 1] + frac * (logs[i] - logs[i - 1])))
