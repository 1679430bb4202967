"""Training augmentations: a pure function of (seed, epoch, image id), each family doing what it says."""

from __future__ import annotations

import math

import pytest
import torch

from pixelray.core.augment import Aug, Augmentation, augment_batch, epoch_seed
from pixelray.core.spec import PixelChange

FAMILIES = [
    Augmentation(Aug.PIXELS, PixelChange(6)),
    Augmentation(Aug.PIXELS, PixelChange(6, channels=(0,), positions="shared")),
    Augmentation(Aug.GAUSSIAN, sigma=10),
    Augmentation(Aug.STANDARD),
    Augmentation(Aug.PIXELS, PixelChange(6), fraction=0.5),
]


def _batch(n=48, size=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, size, size, 3), dtype=torch.uint8, generator=gen), torch.arange(n) * 7 + 1000


@pytest.mark.parametrize("aug", FAMILIES, ids=lambda a: a.label)
def test_draws_depend_on_seed_epoch_and_id_only(aug):
    images, ids = _batch()
    out, mask = augment_batch(images, ids, aug, seed=3, epoch=2)
    assert out.dtype == torch.uint8 and out.shape == images.shape
    perm = torch.randperm(len(ids), generator=torch.Generator().manual_seed(1))
    part = perm[:20]  # another batch: other neighbours, other order
    out2, mask2 = augment_batch(images[part], ids[part], aug, seed=3, epoch=2)
    assert torch.equal(out2, out[part]) and torch.equal(mask2, mask[part])
    assert not torch.equal(augment_batch(images, ids, aug, seed=3, epoch=3)[0], out)  # fresh per epoch
    assert not torch.equal(augment_batch(images, ids, aug, seed=4, epoch=2)[0], out)  # and per seed
    assert torch.equal(images, _batch()[0])  # the input is left alone


def test_pixel_changes_touch_at_most_count_pixels_and_only_the_chosen_channel():
    images, ids = _batch()
    aug = Augmentation(Aug.PIXELS, PixelChange(6, channels=(0,), positions="shared"))
    out, mask = augment_batch(images, ids, aug, seed=0, epoch=1)
    assert mask.all()
    diff = out != images
    assert not diff[..., 1:].any()  # Algorithm 1: channel 0 only
    where = diff[..., 0]
    assert (where.sum(dim=(1, 2)) <= 6).all() and where.sum() > 0
    union = where.any(0)
    assert union.sum() <= 6  # "shared": one position list for every image of the epoch


def test_gaussian_noise_has_the_stated_sigma():
    images = torch.full((64, 16, 16, 3), 128, dtype=torch.uint8)  # mid-grey: no clipping at sigma 10
    out, _ = augment_batch(images, torch.arange(64), Augmentation(Aug.GAUSSIAN, sigma=10), seed=0, epoch=1)
    noise = out.float() - 128
    assert abs(noise.mean().item()) < 0.2  # 49,152 draws: the mean's standard error is 0.05
    assert 9.8 < noise.std().item() < 10.2
    # rounded to integers: |noise| <= 10 exactly when |10 z| < 10.5, i.e. |z| < 1.05
    assert abs((noise.abs() <= 10).float().mean().item() - math.erf(1.05 / math.sqrt(2))) < 0.01


def test_standard_augmentation_crops_and_flips_per_image():
    flat = torch.full((20, 16, 16, 3), 77, dtype=torch.uint8)
    out, _ = augment_batch(flat, torch.arange(20), Augmentation(Aug.STANDARD), seed=0, epoch=1)
    assert torch.equal(out, flat)  # a crop of a flat image, resized and flipped, is the same flat image
    halves = torch.zeros(400, 16, 16, 3, dtype=torch.uint8)
    halves[:, :, 8:] = 255  # left black, right white
    out, _ = augment_batch(halves, torch.arange(400), Augmentation(Aug.STANDARD), seed=0, epoch=1)
    left, right = out[:, :, :8].float().mean(dim=(1, 2, 3)), out[:, :, 8:].float().mean(dim=(1, 2, 3))
    flipped = (left > right).float().mean().item()
    assert 0.42 < flipped < 0.58  # p = 0.5; 400 images: 3.2 standard errors either side
    assert len({tuple(o.flatten()[:64].tolist()) for o in out}) > 100  # crops differ from image to image


def test_fraction_augments_that_share_and_the_mask_says_which():
    images, ids = _batch(n=800, size=8)
    out, mask = augment_batch(images, ids, Augmentation(Aug.PIXELS, PixelChange(4), fraction=0.25), seed=0, epoch=1)
    assert 0.21 < mask.float().mean().item() < 0.29  # 800 images: 3.3 standard errors either side
    changed = (out != images).flatten(1).any(1)
    assert torch.equal(changed & ~mask, torch.zeros_like(mask))  # nothing outside the mask changed
    assert changed[mask].float().mean() > 0.95  # (a full change can redraw a pixel's own value)


def test_none_returns_the_images_and_an_empty_mask():
    images, ids = _batch()
    out, mask = augment_batch(images, ids, Augmentation(Aug.NONE), seed=0, epoch=1)
    assert torch.equal(out, images) and not mask.any()


def test_epoch_seeds_differ_for_every_pair():
    seeds = {epoch_seed(s, e) for s in range(20) for e in range(1, 21)}
    assert len(seeds) == 400 and all(0 <= s < 2**31 for s in seeds)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"kind": "mixup"}, r"aug: 'mixup' is unknown; allowed: \['pixels', 'none', 'gaussian', 'standard'\]"),
        ({"kind": "pixels"}, "count: missing"),
        ({"kind": "none", "fraction": 0}, r"fraction: 0 is invalid; it must be a number in \(0, 1\]"),
        ({"kind": "gaussian", "sigma": -1}, "sigma: -1 is invalid"),
    ],
)
def test_bad_augmentations_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Augmentation(**kwargs)
