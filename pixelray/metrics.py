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
from collections.abc import Iterable, Mapping
from typing import Any

__all__ = [
    "CELL_KEYS",
    "aggregate",
    "amplitude_range",
    "pixel_index",
    "pixel_index_interval",
    "wilson_interval",
]

Z95 = 1.959963984540054

#: Columns that identify a cell row (per model, experiment and attack).
CELL_KEYS = (
    "experiment", "model", "weights", "attack", "eps", "count", "amplitude", "area",
    "channels", "positions", "seed",
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
        key = tuple(row[k] for k in CELL_KEYS)
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
        row["pixel_index"] = (
            pixel_index(k, n, row["count"], row["amplitude"], area, (height, width)) if n else math.nan
        )
        restored = row.get("n_restored")
        row["n_restored"] = None if restored is None else int(restored)
        row["restored_rate"] = None if restored is None else (restored / n if n else math.nan)
        row["image_size"] = height
        out.append(row)
    return out
