"""Ladders: one nested sequence of pixel changes per image, so that "the first k changes" is defined for every k.

A :class:`Ladder` is a pixel change without a count (amplitude, area, channels) and a seed,
plus the points it is evaluated at (:mod:`pixelray.core.ladder_draws` draws it; this module
has no torch: the report reads ladders). Each image gets one random order of the positions in its
area and one value draw per place in that order, a pure function of (ladder key, image id):
the image with its first k+1 changes is the image with its first k changes plus one more
changed pixel, whatever the batch, the device or k.

The draws (the README's "Ladders" section says the same in words):

- ``key`` = the first 8 bytes (little-endian) of sha256(:attr:`Ladder.ladder_id`), top bit cleared;
  the image's key ``K = hash64(hash64(image_id * STREAM_MUL + key))`` (:func:`pixelray.core.draws.image_keys`).
- Position ``p`` of the area (row-major in the centred ``side x side`` square, ``0 <= p < P``) gets the score
  ``h(p) = hash64(K + hash64(p + (1 << 40))) & (2**63 - 1)``; the order sorts positions by
  ``(h(p) >> b, p)`` ascending, with ``b`` the bit length of ``P - 1`` (no two positions tie).
- The j-th place of the order (from 0) changes channel c (0, 1, 2 = R, G, B) with the draw
  ``v = hash64(K + hash64(j * 4 + c + (2 << 40))) & (2**63 - 1)``: ``full`` writes ``v % 256``;
  a shift ``a`` writes ``clip(old + v % (2a + 1) - a, 0, 255)``.
- Ladder points: ``floor(2 ** (i / steps_per_octave) + 0.5)`` for i = 0, 1, ... up to ``max_count``,
  duplicates dropped, and ``max_count`` itself last (default: the area's size).

Example:
    >>> ladder = Ladder(area=8, seed=0)
    >>> ladder.ladder_id
    'ladder-full-s8-all-seed0'
    >>> ladder.points(32, 32)[:8], ladder.points(32, 32)[-1]
    ((1, 2, 3, 4, 5, 6, 7, 8), 64)
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from pixelray.core.check import check_int
from pixelray.core.spec import PixelChange

__all__ = ["FAMILY", "SEARCHES", "Ladder", "ladder_points"]

#: The ``family`` of ladder experiments and of ``failure.parquet`` rows.
FAMILY = "pixels_to_failure"
#: ``scan`` evaluates every ladder point up to failure; ``bisect`` assumes that an image, once broken, stays broken.
SEARCHES = ("scan", "bisect")


def ladder_points(size: int, steps_per_octave: int = 4, max_count: int | None = None) -> tuple[int, ...]:
    """The counts a ladder evaluates: ``floor(2**(i/steps) + 0.5)`` up to ``max_count`` (default ``size``),
    each once, then ``max_count`` itself.

    >>> ladder_points(1024, 2, 64)
    (1, 2, 3, 4, 6, 8, 11, 16, 23, 32, 45, 64)
    """
    top = size if max_count is None else max_count
    out: list[int] = []
    i = 0
    while (k := math.floor(2 ** (i / steps_per_octave) + 0.5)) <= top:
        if not out or k != out[-1]:
            out.append(k)
        i += 1
    if out[-1] != top:
        out.append(top)
    return tuple(out)


@dataclass(frozen=True)
class Ladder:
    """A ladder of nested pixel changes (see the module docstring) and how to search it.

    Args:
        amplitude, area, channels: as in :class:`~pixelray.core.spec.PixelChange` (no count).
        seed: the draws' seed.
        steps_per_octave: ladder points per doubling of k (4: steps of about 19%).
        max_count: the last point (default: every position of the area).
        search: ``"scan"`` (every point up to failure, exact) or ``"bisect"`` (assumes monotone breakage).
        refine: bisect over the integers between the last correct and the first wrong point (same assumption).
    """

    amplitude: int | Literal["full"] = "full"
    area: int | None = None
    channels: Literal["all"] | tuple[int, ...] = "all"
    seed: int = 0
    steps_per_octave: int = 4
    max_count: int | None = None
    search: str = "scan"
    refine: bool = False

    def __post_init__(self) -> None:
        probe = PixelChange(1, self.amplitude, self.area, self.channels)  # the same checks and normal forms
        object.__setattr__(self, "amplitude", probe.amplitude)
        object.__setattr__(self, "channels", probe.channels)
        check_int(self.seed, "seed", 0, 2**31 - 1, high_text="2**31-1")
        check_int(self.steps_per_octave, "steps_per_octave", 1, 64)
        check_int(self.max_count, "max_count", none_ok=True)
        if self.area is not None and self.max_count is not None and self.max_count > self.area**2:
            raise ValueError(f"max_count: {self.max_count} is larger than area {self.area}x{self.area} = "
                             f"{self.area**2} pixels; use max_count <= {self.area**2} or omit it")
        if self.search not in SEARCHES:
            raise ValueError(f"search: {self.search!r} is unknown; allowed: {list(SEARCHES)}")
        if not isinstance(self.refine, bool):
            raise ValueError(f"refine: {self.refine!r} is invalid; use true or false")

    @property
    def change(self) -> PixelChange:
        """The pixel change at one count (the ladder's first point), for its region and checks."""
        return PixelChange(1, self.amplitude, self.area, self.channels)

    @property
    def channel_indices(self) -> tuple[int, ...]:
        return (0, 1, 2) if self.channels == "all" else self.channels  # type: ignore[return-value]

    @property
    def ladder_id(self) -> str:
        """What keys the draws: amplitude, area, channels and seed (not the points or the search)."""
        amp = "full" if self.amplitude == "full" else f"a{self.amplitude}"
        area = "whole" if self.area is None else f"s{self.area}"
        ch = "all" if self.channels == "all" else "c" + "".join(map(str, self.channels))
        return f"ladder-{amp}-{area}-{ch}-seed{self.seed}"

    @property
    def key(self) -> int:
        """63-bit integer from :attr:`ladder_id` (as ``Cell.key`` from a cell id); keys every draw."""
        return int.from_bytes(hashlib.sha256(self.ladder_id.encode()).digest()[:8], "little") & (2**63 - 1)

    @property
    def label(self) -> str:
        """Everything that determines a ladder's rows: the draws, the points and the search."""
        top = "area" if self.max_count is None else str(self.max_count)
        return f"{self.ladder_id}-o{self.steps_per_octave}-m{top}-{self.search}{'-refine' if self.refine else ''}"

    def check_image(self, height: int, width: int) -> None:
        """ValueError when the area or ``max_count`` does not fit a ``height`` x ``width`` image."""
        self.change.check_image(height, width)
        size = self.size(height, width)
        if self.max_count is not None and self.max_count > size:
            raise ValueError(f"max_count: {self.max_count} is larger than the {size} pixels the ladder may change "
                             f"on {height}x{width} images; use max_count <= {size} or omit it")

    def size(self, height: int, width: int) -> int:
        """Positions in the area on a ``height`` x ``width`` image."""
        _, _, rows, cols = self.change.region(height, width)
        return rows * cols

    def points(self, height: int, width: int) -> tuple[int, ...]:
        """The ladder's counts on ``height`` x ``width`` images (:func:`ladder_points`)."""
        return ladder_points(self.size(height, width), self.steps_per_octave, self.max_count)

    def for_image(self, height: int, width: int) -> Ladder:
        """An area equal to the side of a square image is the whole image (one key per ladder, as cells)."""
        if self.area is not None and self.area == height == width:
            return Ladder(self.amplitude, None, self.channels, self.seed, self.steps_per_octave, self.max_count,
                          self.search, self.refine)
        return self

    @classmethod
    def from_columns(cls, row: Mapping[str, Any], width: int | None = None) -> Ladder:
        """The ladder of a ``failure.parquet`` row, from ``amplitude``, ``area``, ``channels``, ``seed``,
        ``steps_per_octave``, ``max_count``, ``search``, ``refine`` and ``image_size`` alone (as
        ``Cell.from_columns``); its :attr:`ladder_id` equals the row's. ``max_count`` equal to the area's
        size reads as the default."""
        def value(key: str) -> Any:
            v = row[key]
            return None if v is None or (isinstance(v, float) and v != v) else v

        amplitude, channels, area = str(value("amplitude")), str(value("channels")), value("area")
        height = int(value("image_size"))
        ladder = cls(
            "full" if amplitude == "full" else int(amplitude), None if area is None else int(area),
            "all" if channels == "all" else tuple(int(c) for c in channels.split(",")), int(value("seed")),
            int(value("steps_per_octave")), None, str(value("search")), bool(value("refine")),
        ).for_image(height, height if width is None else int(width))
        top = value("max_count")
        if top is not None and int(top) != ladder.size(height, height if width is None else int(width)):
            ladder = Ladder(ladder.amplitude, ladder.area, ladder.channels, ladder.seed, ladder.steps_per_octave,
                            int(top), ladder.search, ladder.refine)
        return ladder

    @classmethod
    def from_id(cls, ladder_id: str) -> Ladder:
        """The draws a :attr:`ladder_id` names (default points and search).

        >>> Ladder.from_id("ladder-a40-s16-c0-seed3")
        Ladder(amplitude=40, area=16, channels=(0,), seed=3, steps_per_octave=4, max_count=None, search='scan', \
refine=False)
        """
        match = _LADDER_ID.match(ladder_id) if isinstance(ladder_id, str) else None
        if match is None:
            raise ValueError(f"ladder_id: {ladder_id!r} is not a ladder id; expected e.g. "
                             "'ladder-full-whole-all-seed0' (amplitude, area, channels, seed)")
        amp, area, channels, seed = match.groups()
        ladder = cls("full" if amp == "full" else int(amp[1:]), None if area == "whole" else int(area[1:]),
                     "all" if channels == "all" else tuple(int(c) for c in channels[1:]), int(seed))
        if ladder.ladder_id != ladder_id:
            raise ValueError(f"ladder_id: {ladder_id!r} is not in canonical form; it reads as {ladder.ladder_id!r}")
        return ladder


_LADDER_ID = re.compile(r"^ladder-(full|a\d+)-(whole|s\d+)-(all|c[0-2]+)-seed(\d+)$")
