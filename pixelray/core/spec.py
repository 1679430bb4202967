"""Pixel-change specifications: what changes, where, and with which seed.

A :class:`PixelChange` says how many pixels change, by how much and where; a
:class:`Cell` adds the seed. Both are frozen, validate themselves on
construction, and have a stable identity (``Cell.cell_id`` and ``Cell.key``)
that keys every random draw and every result row.

Example:
    >>> cell = Cell(PixelChange(count=64, area=200), seed=0)
    >>> cell.cell_id
    'n64-full-s200-all-per-image-seed0'
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any, Literal

from pixelray.core.check import check_int, is_int

__all__ = [
    "CHANNEL_NAMES", "CORRUPTIONS", "PIXEL_CHANGE", "Cell", "Corruption", "PixelChange", "Positions", "parse_channels",
]

#: Channel names accepted in specs, mapped to RGB channel indices.
CHANNEL_NAMES = {"r": 0, "red": 0, "g": 1, "green": 1, "b": 2, "blue": 2}

Amplitude = int | Literal["full"]


class Positions(str, Enum):
    """How changed positions are drawn."""

    PER_IMAGE = "per-image"  # afresh for every image (the experiments)
    SHARED = "shared"  # one list per (seed, cell), as in the paper's Algorithm 1


def parse_channels(value: object) -> Literal["all"] | tuple[int, ...]:
    """Normalise a channel selection to ``"all"`` or a sorted tuple of indices 0..2.

    Accepts ``"all"``, an index, a name (``"R"``, ``"green"``), or a sequence of those.

    >>> parse_channels(["R", 2])
    (0, 2)
    """
    if isinstance(value, str) and value.lower() == "all":
        return "all"
    items = [value] if isinstance(value, (str, int)) else value
    try:
        items = list(items)  # type: ignore[arg-type]
    except TypeError:
        raise ValueError(
            f"channels: {value!r} is not a channel selection; use 'all', an index 0..2 or R/G/B"
        ) from None
    out: set[int] = set()
    for item in items:
        if isinstance(item, bool):
            idx = None
        elif isinstance(item, int):
            idx = item if 0 <= item <= 2 else None
        elif isinstance(item, str):
            idx = CHANNEL_NAMES.get(item.lower())
            if idx is None and item.isdigit():
                idx = int(item) if int(item) <= 2 else None
        else:
            idx = None
        if idx is None:
            raise ValueError(
                f"channels: unknown channel {item!r}; allowed: 'all', 0, 1, 2, R, G, B"
            )
        out.add(idx)
    if not out:
        raise ValueError("channels: empty selection; use 'all' or at least one of R, G, B")
    if out == {0, 1, 2}:
        return "all"
    return tuple(sorted(out))


@dataclass(frozen=True)
class PixelChange:
    """A random pixel change: ``count`` distinct positions per image.

    Args:
        count: number of distinct pixel positions changed per image (>= 1).
        amplitude: ``"full"`` replaces each changed value with a uniform value in
            [0, 255]; an integer ``a`` in 1..255 adds a uniform integer in [-a, a]
            and clips to [0, 255].
        area: side of the centred square the positions are drawn from; ``None``
            means the whole image.
        channels: ``"all"`` (R, G and B each drawn independently) or a tuple of
            channel indices/names such as ``(0,)``.
        positions: ``"per-image"`` draws positions afresh per image;
            ``"shared"`` draws one list per (seed, cell) for every image.
    """

    count: int
    amplitude: Amplitude = "full"
    area: int | None = None
    channels: Literal["all"] | tuple[int, ...] = "all"
    positions: Literal["per-image", "shared"] = "per-image"

    def __post_init__(self) -> None:
        check_int(self.count, "count")
        amp = self.amplitude
        if isinstance(amp, str):
            if amp.lower() != "full" and not amp.isdigit():
                raise ValueError(
                    f"amplitude: {amp!r} is invalid; use 'full' or an integer shift 1..255"
                )
            amp = "full" if amp.lower() == "full" else int(amp)
        if amp != "full" and not (is_int(amp) and 1 <= amp <= 255):
            raise ValueError(
                f"amplitude: {self.amplitude!r} is outside 1..255; use 'full' or an integer shift 1..255"
            )
        object.__setattr__(self, "amplitude", amp)
        if self.area is not None:
            if not is_int(self.area) or self.area < 1:
                raise ValueError(
                    f"area: {self.area!r} is invalid; it must be a square side >= 1 (pixels) or None"
                )
            if self.count > self.area * self.area:
                raise ValueError(
                    f"count: {self.count} is larger than area {self.area}x{self.area} "
                    f"= {self.area * self.area} pixels; use count <= {self.area * self.area} or a larger area"
                )
        object.__setattr__(self, "channels", parse_channels(self.channels))
        try:
            pos = Positions(self.positions).value
        except ValueError:
            raise ValueError(
                f"positions: {self.positions!r} is unknown; allowed: 'per-image', 'shared'"
            ) from None
        object.__setattr__(self, "positions", pos)

    def check_image(self, height: int, width: int) -> None:
        """Raise ValueError when this change does not fit an ``height`` x ``width`` image."""
        if self.area is not None and self.area > min(height, width):
            raise ValueError(
                f"area: {self.area} is larger than the image ({height}x{width}); "
                f"use area <= {min(height, width)} or None for the whole image"
            )
        side_h, side_w = self.region(height, width)[2:]
        if self.count > side_h * side_w:
            raise ValueError(
                f"count: {self.count} is larger than the {side_h}x{side_w} = {side_h * side_w} "
                f"pixels it may change; use count <= {side_h * side_w}"
            )

    def region(self, height: int, width: int) -> tuple[int, int, int, int]:
        """(top, left, rows, cols) of the area positions are drawn from, on a given image size."""
        if self.area is None:
            return 0, 0, height, width
        return (height - self.area) // 2, (width - self.area) // 2, self.area, self.area

    @property
    def channel_indices(self) -> tuple[int, ...]:
        """The changed channels as indices."""
        return (0, 1, 2) if self.channels == "all" else self.channels  # type: ignore[return-value]

    @property
    def label(self) -> str:
        """A short, stable, human-readable id, e.g. ``n64-a10-s200-all-per-image``."""
        amp = "full" if self.amplitude == "full" else f"a{self.amplitude}"
        area = "whole" if self.area is None else f"s{self.area}"
        ch = "all" if self.channels == "all" else "c" + "".join(map(str, self.channels))
        return f"n{self.count}-{amp}-{area}-{ch}-{self.positions}"


#: Corruption families and each severity's amount (ImageNet-C, Hendrycks & Dietterich 2019:
#: ``impulse_noise`` replaces that share of all channel values by 0 or 255, half each).
CORRUPTIONS: dict[str, dict[int, float]] = {
    "impulse_noise": {1: 0.03, 2: 0.06, 3: 0.09, 4: 0.17, 5: 0.27},
}

#: The ``family`` of pixel changes in results (beside the corruption families).
PIXEL_CHANGE = "pixel_change"


@dataclass(frozen=True)
class Corruption:
    """A standard corruption at one severity, e.g. ImageNet-C's impulse noise at severity 3.

    Args:
        family: a key of :data:`CORRUPTIONS`.
        severity: 1..5.
    """

    family: str
    severity: int

    def __post_init__(self) -> None:
        if self.family not in CORRUPTIONS:
            raise ValueError(f"family: {self.family!r} is unknown; allowed: {[PIXEL_CHANGE, *sorted(CORRUPTIONS)]}")
        levels = CORRUPTIONS[self.family]
        if isinstance(self.severity, bool) or self.severity not in levels:
            raise ValueError(f"severity: {self.severity!r} is invalid; allowed: {sorted(levels)}")

    @property
    def amount(self) -> float:
        """The share of channel values replaced."""
        return CORRUPTIONS[self.family][self.severity]

    @property
    def label(self) -> str:
        """A short, stable id, e.g. ``impulse_noise-sev3``."""
        return f"{self.family}-sev{self.severity}"

    def check_image(self, height: int, width: int) -> None:
        """Every image size fits (nothing to check)."""


@dataclass(frozen=True)
class Cell:
    """One point of a sweep grid: a pixel change (or a corruption) and the seed of its random draws."""

    change: PixelChange | Corruption
    seed: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.change, (PixelChange, Corruption)):
            raise ValueError(f"change: {self.change!r} is not a PixelChange or a Corruption")
        check_int(self.seed, "seed", 0, 2**31 - 1, high_text="2**31-1")

    @property
    def family(self) -> str:
        """``pixel_change``, or the corruption's family."""
        return self.change.family if isinstance(self.change, Corruption) else PIXEL_CHANGE

    @property
    def cell_id(self) -> str:
        """Stable string id of this cell, used as a result key."""
        return f"{self.change.label}-seed{self.seed}"

    def for_image(self, height: int, width: int) -> Cell:
        """This cell as a sweep keys it on ``height`` x ``width`` images: an area equal to the side of a
        square image is the whole image (``area=None``, label ``whole``), the one key of a whole-image cell."""
        change = self.change
        if isinstance(change, PixelChange) and change.area is not None and change.area == height == width:
            change = PixelChange(change.count, change.amplitude, None, change.channels, change.positions)
            return Cell(change, self.seed)
        return self

    @classmethod
    def from_id(cls, cell_id: str, image_size: tuple[int, int] | int | None = None) -> Cell:
        """The cell a :attr:`cell_id` names (e.g. a ``cells.parquet`` row's ``cell_id``).

        With ``image_size`` (a side, or (height, width)) an area equal to the side of a square
        image is read as the whole image (see :meth:`for_image`).

        >>> Cell.from_id("n64-a10-s200-c0-per-image-seed3").change
        PixelChange(count=64, amplitude=10, area=200, channels=(0,), positions='per-image')
        >>> Cell.from_id("n4-full-s32-all-per-image-seed0", 32).cell_id
        'n4-full-whole-all-per-image-seed0'
        """
        corruption = _CORRUPTION_ID.match(cell_id) if isinstance(cell_id, str) else None
        if corruption is not None and corruption.group(1) in CORRUPTIONS:
            family, severity, seed = corruption.groups()
            cell = cls(Corruption(family, int(severity)), int(seed))
            if cell.cell_id != cell_id:  # e.g. 'seed07'
                raise ValueError(f"cell_id: {cell_id!r} is not in canonical form; it reads as {cell.cell_id!r}")
            return cell
        match = _CELL_ID.match(cell_id) if isinstance(cell_id, str) else None
        if match is None:
            raise ValueError(f"cell_id: {cell_id!r} is not a cell id; expected e.g. "
                             "'n64-full-whole-all-per-image-seed0' (count, amplitude, area, channels, positions, seed) "
                             "or 'impulse_noise-sev3-seed0' (a corruption)")
        count, amp, area, channels, positions, seed = match.groups()
        change = PixelChange(
            int(count), "full" if amp == "full" else int(amp[1:]), None if area == "whole" else int(area[1:]),
            "all" if channels == "all" else tuple(int(c) for c in channels[1:]), positions,
        )
        cell = cls(change, int(seed))
        if cell.cell_id != cell_id:  # e.g. 'c10' for 'c01', or 'a010'
            raise ValueError(f"cell_id: {cell_id!r} is not in canonical form; it reads as {cell.cell_id!r}")
        return cell if image_size is None else cell.for_image(*_size(image_size))

    @classmethod
    def from_columns(cls, row: Mapping[str, Any], width: int | None = None) -> Cell:
        """The cell of a ``cells.parquet`` row, from its columns ``count``, ``amplitude``, ``area``,
        ``channels``, ``positions``, ``seed`` and ``image_size`` (the height) alone; a corruption's row
        (``family`` other than ``pixel_change``) from ``family``, ``severity`` and ``seed``.

        ``area`` null, or equal to the side of a square image, is the whole image. ``width``
        defaults to ``image_size`` (square images, as the results say no more); pass it for
        other data sets. The result's :attr:`cell_id` equals the row's ``cell_id``.
        """
        def value(key: str) -> Any:
            v = row[key]
            return None if v is None or (isinstance(v, float) and v != v) else v  # pandas gives NaN for null

        family = value("family") if "family" in row else None  # results before corruptions: pixel changes
        if family not in (None, PIXEL_CHANGE):
            return cls(Corruption(str(value("family")), int(value("severity"))), int(value("seed")))
        amplitude = str(value("amplitude"))
        channels = str(value("channels"))
        area = value("area")
        height = int(value("image_size"))
        change = PixelChange(
            int(value("count")), "full" if amplitude == "full" else int(amplitude),
            None if area is None else int(area),
            "all" if channels == "all" else tuple(int(c) for c in channels.split(",")),
            str(value("positions")),
        )
        return cls(change, int(value("seed"))).for_image(height, height if width is None else int(width))

    @property
    def key(self) -> int:
        """Stable 63-bit integer derived from :attr:`cell_id`; keys the random draws."""
        digest = hashlib.sha256(self.cell_id.encode()).digest()
        return int.from_bytes(digest[:8], "little") & (2**63 - 1)


_CORRUPTION_ID = re.compile(r"^([a-z_]+)-sev(\d)-seed(\d+)$")
_CELL_ID = re.compile(r"^n(\d+)-(full|a\d+)-(whole|s\d+)-(all|c[0-2]+)-(per-image|shared)-seed(\d+)$")


def _size(image_size: tuple[int, int] | int) -> tuple[int, int]:
    if is_int(image_size):
        return image_size, image_size
    height, width = image_size  # type: ignore[misc]
    return int(height), int(width)
