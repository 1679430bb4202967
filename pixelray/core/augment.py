"""Training-time augmentation on the device: a pure function of (seed, epoch, image id).

The fine-tune of ``pixelray train-augment`` changes its training images with the very
code the sweep measures with: :func:`pixelray.core.perturb.apply_pixel_changes`, under a
:class:`~pixelray.core.spec.Cell` whose seed is derived from (seed, epoch). The baselines go
through the same entry point (:func:`augment_batch`), so that a fine-tune and its control
differ only in what happens to the pixels:

- ``pixels``: the paper's few-pixel change (Algorithm 1 with ``positions = "shared"`` and
  ``channels = (0,)``);
- ``none``: the fine-tune alone, the control that shows what the augmentation adds;
- ``gaussian``: i.i.d. normal noise of ``sigma`` pixel units on every value, rounded and
  clipped to uint8;
- ``standard``: random resized crop (scale 0.08-1, ratio 3/4-4/3) and horizontal flip,
  torchvision's usual ImageNet training augmentation, with ``torchvision.transforms.v2``
  functionals on the device, one set of parameters per image.

``fraction`` augments a random part of each batch: image ``i`` is augmented in an epoch
when a hash of (seed, epoch, i) falls below it, so about that fraction of every batch is,
whatever the batch or the worker. Every draw is keyed by (seed, epoch, image id): a rerun,
a resumed run or another partition of the images across workers changes the same image in
the same way in the same epoch, and every epoch draws afresh.

Example:
    >>> import torch
    >>> from pixelray.core.spec import PixelChange
    >>> aug = Augmentation(Aug.PIXELS, PixelChange(4, channels=(0,), positions="shared"))
    >>> images = torch.zeros(2, 8, 8, 3, dtype=torch.uint8)
    >>> out, mask = augment_batch(images, torch.tensor([7, 9]), aug, seed=0, epoch=1)
    >>> mask.tolist(), int((out[..., 1:] != 0).sum())
    ([True, True], 0)
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from enum import Enum
from typing import Any

import numpy as np
import torch

from pixelray.core.perturb import apply_pixel_changes, hash64
from pixelray.core.spec import Cell, PixelChange

__all__ = ["Aug", "Augmentation", "augment_batch", "epoch_seed", "gaussian_noise", "standard_augment"]

_STREAM_EPOCH = 0x5EED_E90C
_STREAM_CHOSEN = 11
_STREAM_NOISE = 12
_STREAM_CROP = 13
_CROP_SCALE = (0.08, 1.0)
_CROP_RATIO = (3 / 4, 4 / 3)


class Aug(str, Enum):
    """What a fine-tune does to its training images."""

    PIXELS = "pixels"  # the paper's few-pixel change
    NONE = "none"  # nothing: the control
    GAUSSIAN = "gaussian"  # normal noise of sigma pixel units on every value
    STANDARD = "standard"  # random resized crop + horizontal flip


@dataclass(frozen=True)
class Augmentation:
    """A training augmentation.

    Args:
        kind: :class:`Aug` (or its value).
        change: the pixel change: what ``pixels`` applies, and for every kind the change the
            held-out images are probed with after each epoch (None: no probe).
        fraction: the part of each batch augmented, in (0, 1].
        sigma: the noise of ``gaussian``, in pixel units (0-255 scale).
    """

    kind: Aug = Aug.PIXELS
    change: PixelChange | None = None
    fraction: float = 1.0
    sigma: float = 8.0

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "kind", Aug(self.kind))
        except ValueError:
            raise ValueError(f"aug: {self.kind!r} is unknown; allowed: {[a.value for a in Aug]}") from None
        if self.change is not None and not isinstance(self.change, PixelChange):
            raise ValueError(f"change: {self.change!r} is not a PixelChange")
        if self.kind is Aug.PIXELS and self.change is None:
            raise ValueError("count: missing; aug = 'pixels' needs a pixel change (count = N)")
        if isinstance(self.fraction, bool) or not isinstance(self.fraction, (int, float)) \
                or not 0 < self.fraction <= 1:
            raise ValueError(f"fraction: {self.fraction!r} is invalid; it must be a number in (0, 1]")
        if isinstance(self.sigma, bool) or not isinstance(self.sigma, (int, float)) \
                or not math.isfinite(self.sigma) or self.sigma <= 0:
            raise ValueError(f"sigma: {self.sigma!r} is invalid; it must be a positive number of pixel units")
        object.__setattr__(self, "fraction", float(self.fraction))
        object.__setattr__(self, "sigma", float(self.sigma))

    @property
    def label(self) -> str:
        """A short id, e.g. ``pixels-n4-full-whole-c0-shared``, ``gaussian-sigma8``, ``none``."""
        part = "" if self.fraction == 1 else f"-f{self.fraction:g}"
        if self.kind is Aug.PIXELS:
            return f"pixels-{self.change.label}{part}"  # type: ignore[union-attr]
        if self.kind is Aug.GAUSSIAN:
            return f"gaussian-sigma{self.sigma:g}{part}"
        return f"{self.kind.value}{part}" if self.kind is Aug.STANDARD else "none"

    def identity(self) -> dict[str, Any]:
        """What determines the augmentation (and the probe), for config hashes and sidecars."""
        change = self.change
        return {
            "aug": self.kind.value,
            "fraction": self.fraction,
            "sigma": self.sigma if self.kind is Aug.GAUSSIAN else None,
            "change": None if change is None else {
                "count": change.count, "amplitude": change.amplitude, "area": change.area,
                "channels": change.channels if change.channels == "all" else list(change.channels),
                "positions": change.positions,
            },
        }


@functools.lru_cache(maxsize=1024)
def epoch_seed(seed: int, epoch: int) -> int:
    """The seed (0..2**31-1) of an epoch's draws: a hash of (seed, epoch), distinct for every pair."""
    key = hash64(torch.tensor([seed * 1_000_003 + epoch + _STREAM_EPOCH], dtype=torch.int64))
    return int(key.item()) & (2**31 - 1)


def _keys(ids: torch.Tensor, key: int, stream: int) -> torch.Tensor:
    """One int64 hash per image of (epoch key, stream, image id)."""
    return hash64(hash64(ids + (stream << 40)) + key)


def _unit(bits: torch.Tensor) -> torch.Tensor:
    """Floats in [0, 1) (float64) from int64 hash bits (53 of them)."""
    return ((bits & ((1 << 63) - 1)) >> 10).to(torch.float64) / float(1 << 53)


def _chosen(ids: torch.Tensor, key: int, fraction: float) -> torch.Tensor:
    """bool (N,): which images are augmented this epoch (about ``fraction`` of them)."""
    if fraction >= 1:
        return torch.ones(ids.shape, dtype=torch.bool, device=ids.device)
    return _unit(_keys(ids, key, _STREAM_CHOSEN)) < fraction


def gaussian_noise(images: torch.Tensor, image_ids: torch.Tensor, sigma: float, key: int) -> torch.Tensor:
    """uint8 images plus normal noise of ``sigma`` pixel units on every value, rounded and clipped.

    The noise of an image is a pure function of (key, its id): Box-Muller over hash bits,
    vectorised on the images' device.
    """
    n = images.shape[0]
    per_image = images[0].numel() if n else 0
    index = torch.arange(2 * per_image, device=images.device, dtype=torch.int64)
    bits = hash64(_keys(image_ids, key, _STREAM_NOISE).unsqueeze(1) + hash64(index).unsqueeze(0))
    u1, u2 = _unit(bits[:, :per_image]).float(), _unit(bits[:, per_image:]).float()
    normal = torch.sqrt(-2 * torch.log1p(-u1)) * torch.cos(2 * math.pi * u2)  # log1p(-u): u1 < 1 always
    noisy = images.float() + sigma * normal.view_as(images)
    return noisy.round_().clamp_(0, 255).to(torch.uint8)


def _crop_params(rng: np.random.Generator, height: int, width: int) -> tuple[int, int, int, int, bool]:
    """(top, left, h, w, flip) as torchvision's RandomResizedCrop + RandomHorizontalFlip draw them."""
    area = height * width
    log_ratio = (math.log(_CROP_RATIO[0]), math.log(_CROP_RATIO[1]))
    for _ in range(10):
        target = area * rng.uniform(*_CROP_SCALE)
        ratio = math.exp(rng.uniform(*log_ratio))
        w = round(math.sqrt(target * ratio))
        h = round(math.sqrt(target / ratio))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w, rng.random() < 0.5
    ratio = width / height  # the fallback: a centre crop of the whole image at a legal ratio
    if ratio < _CROP_RATIO[0]:
        w, h = width, round(width / _CROP_RATIO[0])
    elif ratio > _CROP_RATIO[1]:
        h, w = height, round(height * _CROP_RATIO[1])
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w, rng.random() < 0.5


def standard_augment(images: torch.Tensor, image_ids: torch.Tensor, key: int) -> torch.Tensor:
    """Random resized crop (back to the input size) and horizontal flip, per image, on the device.

    uint8 (N, H, W, 3) in and out; each image's parameters are a pure function of (key, its id).
    """
    from torchvision.transforms.v2 import functional as F

    height, width = images.shape[1:3]
    out = torch.empty_like(images)
    seeds = _keys(image_ids, key, _STREAM_CROP).cpu().tolist()
    for k, bits in enumerate(seeds):
        top, left, h, w, flip = _crop_params(np.random.default_rng(bits & (2**63 - 1)), height, width)
        image = F.resized_crop(images[k].permute(2, 0, 1), top, left, h, w, [height, width], antialias=True)
        out[k] = (F.horizontal_flip(image) if flip else image).permute(1, 2, 0)
    return out


def augment_batch(
    images: torch.Tensor, image_ids: torch.Tensor, aug: Augmentation, seed: int, epoch: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Augment a uint8 NHWC batch for one epoch; returns (images, bool mask of the augmented ones).

    The input is not modified. With ``aug = "none"`` the images come back as they are and
    the mask is all False.
    """
    ids = image_ids.to(device=images.device, dtype=torch.int64)
    if aug.kind is Aug.NONE:
        return images, torch.zeros(ids.shape, dtype=torch.bool, device=images.device)
    key = epoch_seed(seed, epoch)
    if aug.kind is Aug.PIXELS:
        changed = apply_pixel_changes(images, Cell(aug.change, seed=key), ids)  # type: ignore[arg-type]
    elif aug.kind is Aug.GAUSSIAN:
        changed = gaussian_noise(images, ids, aug.sigma, key)
    else:
        changed = standard_augment(images, ids, key)
    mask = _chosen(ids, key, aug.fraction)
    if aug.fraction >= 1:
        return changed, mask
    return torch.where(mask.view(-1, 1, 1, 1), changed, images), mask
