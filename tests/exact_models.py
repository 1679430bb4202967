"""Models whose predictions are the same on every CPU: integer weights, integer pixels, exact sums.

A golden file of results (``tests/data/demo_golden_cells.csv``) must not depend on the
machine that made it. Trained float models do: kernels differ across CPUs (AVX2 against
AVX-512) and training amplifies the last bits. These models take the image back to its
integer pixels, multiply by small integer weights and sum in float64, where every partial
sum is an exact integer: the logits, and so the argmax (first index on ties), are exact.
Used as ``exact_models:make0`` and ``exact_models:make1`` (``module:factory`` specs).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


class ExactNet(nn.Module):
    """Logits = integer weights x integer pixels of a 4x4-pooled image, exactly."""

    def __init__(self, seed: int, num_classes: int = 10, side: int = 32):
        super().__init__()
        rng = np.random.default_rng(seed)
        weights = rng.integers(-7, 8, size=(num_classes, 3 * side * side))
        self.register_buffer("weights", torch.from_numpy(weights).to(torch.float64))
        self.num_classes = num_classes
        self.mean, self.std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pixels = torch.round(x.to(torch.float64) * 255)  # x = pixels / 255: back to exact integers
        return (pixels.flatten(1) @ self.weights.T).to(torch.float32)  # |logit| < 2**24: exact in float32


def make0(num_classes: int = 10) -> nn.Module:
    return ExactNet(0, num_classes)


def make1(num_classes: int = 10) -> nn.Module:
    return ExactNet(1, num_classes)


def make_data(root, images: int = 600, rows_per_shard: int = 100, seed: int = 0):
    """Integer-only random images, labelled by ``make0``'s prediction (every tenth label random)."""
    from pixelray.shards import ShardWriter

    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(images, 32, 32, 3), dtype=np.uint8)
    model = make0()
    with torch.inference_mode():
        labels = model(torch.from_numpy(pixels).permute(0, 3, 1, 2).double() / 255).argmax(1).numpy()
    noisy = np.arange(images) % 10 == 0
    labels[noisy] = rng.integers(0, 10, size=int(noisy.sum()))
    with ShardWriter(root, name="exact", height=32, width=32, class_names=[str(i) for i in range(10)],
                     source="test", rows_per_shard=rows_per_shard) as writer:
        writer.add(np.arange(images), labels, pixels, [""] * images)
    return root
