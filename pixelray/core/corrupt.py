"""Standard corruptions beside the paper's pixel changes, and the one entry point for any cell.

ImageNet-C's ``impulse_noise`` (Hendrycks & Dietterich 2019) is salt-and-pepper noise
over every channel value: at severity s a share ``amount(s)`` (0.03, 0.06, 0.09, 0.17,
0.27) of all values is replaced, each by 255 or 0 with equal odds (scikit-image's
``random_noise(mode="s&p")``, the reference implementation, draws the same way). It is
the nearest standard relative of the paper's sparse changes, which replace whole pixels.

Here every value's fate is a counter-based hash of (cell, image id, value index), on the
device, like every draw in pixelray: batch-independent and the same on every run. Values
are numbered in (H, W, C) order, so the layout does not change the draws either.

Example:
    >>> import torch
    >>> from pixelray.core.spec import Cell, Corruption
    >>> images = torch.full((1, 8, 8, 3), 100, dtype=torch.uint8)
    >>> out = apply_cell(images, Cell(Corruption("impulse_noise", 5)), [3])
    >>> set(out.unique().tolist()) <= {0, 100, 255}
    True
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from pixelray.core.draws import check_uint8, image_pixels, shr
from pixelray.core.perturb import ChangeRecord, apply_pixel_changes, describe_change, hash64, image_layout
from pixelray.core.spec import Cell, Corruption

__all__ = ["apply_cell", "describe_cell", "impulse_noise"]

_STREAM_NOISE = 3  # streams 1 and 2 are the pixel changes' positions and values
_KEY_MUL = -0x2917014799A6026D  # odd 64-bit multiplier (two's complement), as in perturb's keys


def impulse_noise(images: torch.Tensor, cell: Cell, image_ids: torch.Tensor | Sequence[int]) -> torch.Tensor:
    """Salt-and-pepper noise over every channel value: a new uint8 tensor of the input's shape and layout."""
    corruption = cell.change
    if not isinstance(corruption, Corruption) or corruption.family != "impulse_noise":
        raise ValueError(f"cell: {cell.cell_id!r} is not an impulse_noise cell")
    check_uint8(images)
    layout = image_layout(images)
    ids = torch.as_tensor(image_ids, dtype=torch.int64, device=images.device).view(-1, 1)
    if len(ids) != images.shape[0]:
        raise ValueError(f"image_ids: {len(ids)} ids for a batch of {images.shape[0]} images")
    nhwc = images if layout == "NHWC" else images.permute(0, 2, 3, 1)
    n, h, w, c = nhwc.shape
    keys = hash64(hash64(ids * _KEY_MUL + cell.key))
    index = torch.arange(h * w * c, device=images.device, dtype=torch.int64).view(1, -1)
    bits = hash64(keys + hash64(index + (_STREAM_NOISE << 40)))
    flipped = shr(bits, 11).to(torch.float64) < corruption.amount * 2.0**53  # P = amount, 53-bit uniform
    salt = (bits & 1).bool()
    values = torch.where(salt, 255, 0).to(torch.uint8)
    noisy = torch.where(flipped, values, nhwc.reshape(n, -1)).view(n, h, w, c)
    return noisy.permute(0, 3, 1, 2) if layout == "NCHW" else noisy  # NCHW out as a channels_last view


def apply_cell(images: torch.Tensor, cell: Cell, image_ids: torch.Tensor | Sequence[int]) -> torch.Tensor:
    """A cell's change on a uint8 batch: the paper's pixel change, or a corruption; returns a new tensor."""
    if isinstance(cell.change, Corruption):
        return impulse_noise(images, cell, image_ids)
    return apply_pixel_changes(images, cell, image_ids)


def describe_cell(cell: Cell, image_id: int, height: int, width: int,
                  image: torch.Tensor | None = None) -> ChangeRecord:
    """The entries a cell changes in image ``image_id``: :func:`pixelray.core.perturb.describe_change` for a
    pixel change; for a corruption, every (y, x, channel) it replaces, in (H, W, C) order, with the new value
    (its draws do not depend on the image; ``old`` is filled when ``image`` (H, W, 3) is given, a torch
    tensor or a NumPy array)."""
    if not isinstance(cell.change, Corruption):
        return describe_change(cell, image_id, height, width, image)
    probe = torch.full((1, height, width, 3), 7, dtype=torch.uint8)  # neither 0 nor 255: every change shows
    changed = apply_cell(probe, cell, [int(image_id)])[0]
    y, x, ch = (changed != 7).nonzero(as_tuple=True)
    old = None
    if image is not None:
        pixels = image_pixels(image, height, width)
        old = tuple(pixels[y, x, ch].tolist())
    return ChangeRecord(cell.cell_id, int(image_id), tuple(y.tolist()), tuple(x.tolist()), tuple(ch.tolist()),
                        tuple(changed[y, x, ch].tolist()), None, old)
