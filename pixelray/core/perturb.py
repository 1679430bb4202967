"""Random pixel changes on a batch of uint8 images, vectorised, fused across cells, deterministic per image.

Every random draw is a counter-based hash of (cell key, image_id, stream, index)
computed with torch int64 ops on the batch's device. So an image gets the same
change whatever batch it sits in, its position there, the device, or a retry.

Positions: the hash gives a stream of candidate positions per image, uniform over
the centred area; the first ``count`` distinct ones in stream order form a uniform
``count``-subset. When the area holds few more positions than ``count`` (at most
``perturber._TOPK_FACTOR`` times as many), every position gets a hash instead and the
``count`` smallest are taken: also a uniform subset, without a long tail of
repeated candidates.

How it runs (the launch count matters on a GPU, where each op is a kernel launch of a
few microseconds and a small model's forward pass of a batch takes about a millisecond):
a :class:`Perturber` is built once per plan (cells, image size, device) and holds every
constant: the hashes of the stream indices (which depend on no image), the per-cell
parameters as small tensors, the shared position lists. Per batch, the keys of every
(cell, image) are hashed in one pass; then each group of cells that draws the same way
(candidates, top-k over an area, or shared positions) gets its positions and values from
one fused hash pass over a (cells, images, draws) tensor, and the changed entries are
written with one ``put_``. The draws are bit for bit those of a cell run alone (the
candidate stream's first ``count`` distinct values do not depend on how long the stream
is; a shorter count takes a prefix of the top-k). :func:`apply_pixel_changes` and
:func:`draw_positions` are a one-cell plan.

Example:
    >>> import torch
    >>> from pixelray.core.spec import Cell, PixelChange
    >>> images = torch.zeros(2, 8, 8, 3, dtype=torch.uint8)
    >>> out = apply_pixel_changes(images, Cell(PixelChange(count=4)), [10, 11])
    >>> int((out != images).any(dim=-1).sum(dim=(1, 2)).max()) <= 4
    True
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from pixelray.core import perturber as _engine
from pixelray.core.draws import (
    STREAM_VALUE,
    as_ids,
    channel_tensor,
    check_uint8,
    hash64,
    image_keys,
    image_layout,
    image_pixels,
    stream_bits,
    uniform,
)
from pixelray.core.perturber import Perturber
from pixelray.core.spec import Cell

__all__ = [
    "ChangeRecord", "Perturber", "apply_pixel_changes", "describe_change", "draw_positions", "draw_values", "hash64",
    "image_layout",
]


@functools.lru_cache(maxsize=64)
def _one_cell(cell: Cell, height: int, width: int, device: torch.device, topk_factor: int) -> Perturber:
    """A cached one-cell plan (``topk_factor`` keys the cache: tests change the module's factor)."""
    return Perturber([cell], height, width, device)


def _plan(cell: Cell, height: int, width: int, device: torch.device) -> Perturber:
    return _one_cell(cell, height, width, device, _engine._TOPK_FACTOR)


def draw_positions(
    cell: Cell, image_ids: torch.Tensor | Sequence[int], height: int, width: int
) -> torch.Tensor:
    """Flat pixel indices ``y * width + x`` changed in each image, shape (N, count), int64.

    Positions are distinct within an image and uniform over the centred area of
    ``cell.change``. With ``positions="shared"`` every row is the same list.
    The result is on ``image_ids``' device (CPU for a sequence).
    """
    cell.change.check_image(height, width)
    device = image_ids.device if isinstance(image_ids, torch.Tensor) else torch.device("cpu")
    ids = as_ids(image_ids, device)
    if len(ids) == 0:
        return torch.empty((0, cell.change.count), dtype=torch.int64, device=device)
    return _plan(cell, height, width, device).positions(ids)[0]


def draw_values(
    cell: Cell, image_ids: torch.Tensor | Sequence[int], original: torch.Tensor
) -> torch.Tensor:
    """New uint8 values for the changed entries.

    Args:
        cell: the cell.
        image_ids: (N,) ids, any integer dtype (hashed as int64, like every draw).
        original: (N, count, C) uint8, the current values at the drawn positions
            for the C changed channels.
    """
    change = cell.change
    keys = image_keys(cell, as_ids(image_ids, original.device)).view(-1, 1, 1)
    n, count, n_ch = original.shape
    k = torch.arange(count, device=original.device).view(1, -1, 1)
    ch = channel_tensor(change.channel_indices, original.device).view(1, 1, -1)
    bits = stream_bits(keys, STREAM_VALUE, k * 4 + ch)
    if change.amplitude == "full":
        return uniform(bits, 256).to(torch.uint8)
    a = int(change.amplitude)
    shift = uniform(bits, 2 * a + 1) - a
    return (original.to(torch.int64) + shift).clamp_(0, 255).to(torch.uint8)


def apply_pixel_changes(
    images: torch.Tensor, cell: Cell, image_ids: torch.Tensor | Sequence[int]
) -> torch.Tensor:
    """Apply ``cell``'s pixel change to a uint8 batch; returns a new tensor.

    Args:
        images: uint8, (N, H, W, 3) or (N, 3, H, W), any memory format, any device.
        cell: what to change, and the seed.
        image_ids: one int64 id per image; the draws for an image depend only on
            (cell, its id).

    Returns:
        A new tensor of the same shape, dtype, memory format and device; the input
        is not modified.
    """
    check_uint8(images)
    layout = image_layout(images)
    ids = as_ids(image_ids, images.device)
    if len(ids) != images.shape[0]:
        raise ValueError(f"image_ids: {len(ids)} ids for a batch of {images.shape[0]} images")
    height, width = images.shape[1:3] if layout == "NHWC" else images.shape[2:4]
    cell.change.check_image(height, width)
    out = images.clone()
    if images.shape[0] == 0:
        return out
    plan = _plan(cell, height, width, images.device)
    for _, entries, new, _ in plan._each(images, ids, layout, need_orig=False):
        out.put_(entries, new)
    return out


@dataclass(frozen=True)
class ChangeRecord:
    """What a cell does to one image: the changed entries, in draw order.

    Attributes:
        cell_id: the cell (its id keys every draw).
        image_id: the image.
        y, x, channel: one entry per changed (position, channel), position-major.
        value: the new value of each entry (uint8); for a shift, known only with the image.
        shift: for a shift amplitude, the drawn shift of each entry before clipping; None for full.
        old: the image's value of each entry, when the image was given.
    """

    cell_id: str
    image_id: int
    y: tuple[int, ...]
    x: tuple[int, ...]
    channel: tuple[int, ...]
    value: tuple[int, ...] | None
    shift: tuple[int, ...] | None
    old: tuple[int, ...] | None = None


def describe_change(cell: Cell, image_id: int, height: int, width: int,
                    image: torch.Tensor | None = None) -> ChangeRecord:
    """The positions and values ``cell`` changes in image ``image_id`` (reproduces one image of a sweep).

    Args:
        cell: the cell (e.g. ``Cell.from_id(row.cell_id)`` or ``Cell.from_columns(row)``).
        image_id: the image's id.
        height, width: the image size.
        image: the image's uint8 pixels (H, W, 3) or (3, H, W), a torch tensor or a NumPy array;
            needed for the new values of a shift amplitude, optional for full.
    """
    pos = draw_positions(cell, [int(image_id)], height, width)[0]
    channels = cell.change.channel_indices
    ys = [int(p) // width for p in pos for _ in channels]
    xs = [int(p) % width for p in pos for _ in channels]
    chs = [c for _ in pos for c in channels]
    old = None
    if image is not None:
        pixels = image_pixels(image, height, width)
        old = pixels[torch.tensor(ys), torch.tensor(xs), torch.tensor(chs)].view(1, len(pos), len(channels))
    probe = torch.zeros(1, len(pos), len(channels), dtype=torch.uint8) if old is None else old
    shift = None
    if cell.change.amplitude != "full":
        a = int(cell.change.amplitude)
        keys = image_keys(cell, torch.tensor([int(image_id)])).view(-1, 1, 1)
        k = torch.arange(len(pos)).view(1, -1, 1)
        bits = stream_bits(keys, STREAM_VALUE, k * 4 + channel_tensor(channels, torch.device("cpu")).view(1, 1, -1))
        shift = tuple((uniform(bits, 2 * a + 1) - a).flatten().tolist())
    value = None if cell.change.amplitude != "full" and old is None else tuple(
        draw_values(cell, [int(image_id)], probe).flatten().tolist())
    return ChangeRecord(cell.cell_id, int(image_id), tuple(ys), tuple(xs), tuple(chs), value, shift,
                        None if old is None else tuple(old.flatten().tolist()))
