"""A ladder's draws on a batch: each image's first k changes (see :mod:`pixelray.core.ladder` for the rule)."""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch

from pixelray.core.check import check_int
from pixelray.core.draws import (
    MASK63,
    STREAM_MUL,
    STREAM_POSITION,
    STREAM_VALUE,
    as_ids,
    channel_tensor,
    check_uint8,
    hash64,
    i64,
    image_layout,
    image_pixels,
    index_hashes,
    mix,
)
from pixelray.core.ladder import Ladder
from pixelray.core.perturb import ChangeRecord

__all__ = ["LadderDraws", "describe_ladder"]

@functools.lru_cache(maxsize=64)
def _score_table(size: int, device: torch.device) -> torch.Tensor:
    """``hash64(p + (1 << 40)) + GOLDEN`` for every area position (the image-independent half of the scores)."""
    return index_hashes(STREAM_POSITION, size, device)


class LadderDraws:
    """A ladder's changes on ``height`` x ``width`` images: :meth:`apply` writes each image's first k changes.

    The order and the values are drawn again per call (hashing every area position of the
    batch's images is cheap beside a forward pass), for the largest k of the call only.
    """

    def __init__(self, ladder: Ladder, height: int, width: int, device: torch.device | str = "cpu"):
        ladder.check_image(height, width)
        self.ladder, self.height, self.width = ladder, int(height), int(width)
        self.device = torch.device(device)
        self.top, self.left, self.rows, self.cols = ladder.change.region(self.height, self.width)
        self.size = self.rows * self.cols
        self.shift_bits = max(1, (self.size - 1).bit_length())
        self.channels = ladder.channel_indices

    def keys(self, image_ids: torch.Tensor) -> torch.Tensor:
        """(N, 1) int64 image keys."""
        return hash64(hash64(image_ids * STREAM_MUL + i64(self.ladder.key))).view(-1, 1)

    def order(self, image_ids: torch.Tensor | Sequence[int], k: int) -> torch.Tensor:
        """(N, k) int64: the first ``k`` area positions of each image's order (row-major in its area)."""
        ids = as_ids(image_ids, self.device)
        keys = self.keys(ids)
        scores = mix(keys + _score_table(self.size, self.device)).bitwise_and_(MASK63)
        scores.bitwise_right_shift_(self.shift_bits).bitwise_left_shift_(self.shift_bits)
        scores.add_(torch.arange(self.size, device=self.device))  # (h >> b, p): unique, so top-k is exact
        return torch.topk(scores, k, dim=1, largest=False, sorted=True).indices

    def raw_values(self, image_ids: torch.Tensor | Sequence[int], k: int) -> torch.Tensor:
        """(N, k, C) int64 value draws ``v % 256`` (full) or ``v % (2a + 1)`` (a shift, before subtracting a)."""
        ids = as_ids(image_ids, self.device)
        ch = channel_tensor(self.channels, self.device)
        index = (torch.arange(k, device=self.device).view(-1, 1) * 4 + ch.view(1, -1)).reshape(-1)
        bits = hash64(self.keys(ids) + hash64(index + (STREAM_VALUE << 40))).bitwise_and_(MASK63)
        amp = self.ladder.amplitude
        return bits.remainder_(256 if amp == "full" else 2 * int(amp) + 1).view(len(ids), k, len(self.channels))

    def pixels(self, area_pos: torch.Tensor) -> torch.Tensor:
        """Flat pixel indices ``y * width + x`` of area positions."""
        return (area_pos // self.cols + self.top) * self.width + (area_pos % self.cols + self.left)

    def apply(self, images: torch.Tensor, image_ids: torch.Tensor | Sequence[int],
              counts: torch.Tensor | Sequence[int]) -> torch.Tensor:
        """A new batch: image i with its first ``counts[i]`` changes (0 leaves it as it is); the input is kept."""
        check_uint8(images)
        return self.apply_(images.clone(), image_ids, counts)

    def apply_(self, images: torch.Tensor, image_ids: torch.Tensor | Sequence[int],
               counts: torch.Tensor | Sequence[int]) -> torch.Tensor:
        """:meth:`apply` in place, on a batch the caller owns (a search's own copy); returns it. No host sync
        beyond reading the largest count."""
        check_uint8(images)
        layout = image_layout(images)
        n = images.shape[0]
        counts = torch.as_tensor(counts, dtype=torch.int64, device=images.device).view(-1)
        if len(counts) != n:
            raise ValueError(f"counts: {len(counts)} counts for a batch of {n} images")
        k = int(counts.max()) if n else 0
        if k == 0:
            return images
        if k > self.size:
            raise ValueError(f"counts: {k} is larger than the {self.size} positions of the ladder's area")
        ids = as_ids(image_ids, images.device)
        pix = self.pixels(self.order(ids, k))  # (N, k)
        hw = self.height * self.width
        ch = channel_tensor(self.channels, images.device)
        rows = torch.arange(n, device=images.device).view(-1, 1, 1) * (hw * 3)
        if layout == "NHWC":
            entries = rows + pix.unsqueeze(-1) * 3 + ch.view(1, 1, -1)
        else:
            entries = rows + pix.unsqueeze(-1) + (ch * hw).view(1, 1, -1)
        old = torch.take(images, entries)
        raw = self.raw_values(ids, k)
        amp = self.ladder.amplitude
        new = raw if amp == "full" else (old.to(torch.int64) + raw - int(amp)).clamp_(0, 255)
        live = (torch.arange(k, device=images.device).view(1, -1) < counts.view(-1, 1)).unsqueeze(-1)
        return images.put_(entries, torch.where(live, new.to(torch.uint8), old))  # distinct entries: old is a no-op


def describe_ladder(ladder: Ladder, image_id: int, count: int, height: int, width: int,
                    image: torch.Tensor | None = None) -> ChangeRecord:
    """The first ``count`` changes of ``ladder`` in image ``image_id``, in ladder order (``pixelray cell show``).

    Args:
        ladder: e.g. ``Ladder.from_id(row.ladder_id)`` or ``Ladder.from_columns(row)``.
        count: how many of the image's changes (e.g. a failure.parquet row's ``n_fail``).
        image: the image's uint8 pixels (H, W, 3) or (3, H, W); needed for the new values of a shift.
    """
    draws = LadderDraws(ladder, height, width)
    check_int(count, "count", 1, draws.size, high_text=f"{draws.size} (the ladder's area)")
    pix = draws.pixels(draws.order([int(image_id)], count))[0]
    channels = draws.channels
    ys = [int(p) // width for p in pix for _ in channels]
    xs = [int(p) % width for p in pix for _ in channels]
    chs = [c for _ in pix for c in channels]
    raw = draws.raw_values([int(image_id)], count).flatten()
    old = None
    if image is not None:
        pixels = image_pixels(image, height, width)
        old = pixels[torch.tensor(ys), torch.tensor(xs), torch.tensor(chs)].to(torch.int64)
    shift = value = None
    if ladder.amplitude == "full":
        value = tuple(raw.tolist())
    else:
        shift = raw - int(ladder.amplitude)
        value = None if old is None else tuple((old + shift).clamp_(0, 255).tolist())
        shift = tuple(shift.tolist())
    return ChangeRecord(ladder.ladder_id, int(image_id), tuple(ys), tuple(xs), tuple(chs), value, shift,
                        None if old is None else tuple(old.tolist()))
