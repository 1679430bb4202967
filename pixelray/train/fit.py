"""Training on shards: a plain torch loop, with optional few-pixel-change augmentation.

``fit`` trains a :class:`pixelray.models.Classifier` on a shard data set; the
augmentation uses the very perturbation code the sweep measures with, applied on
the device inside the loop. It is what the demo and the tests use to train a base
model in-process; the fine-tune on Ray Train (``pixelray train-augment``) is
``pixelray.train.driver`` (its driver) and ``pixelray.train.loop`` (its per-worker loop).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pixelray.core.check import check_int
from pixelray.core.perturb import apply_pixel_changes
from pixelray.core.spec import Cell, PixelChange

__all__ = ["TrainConfig", "fit", "load_all"]


@dataclass(frozen=True)
class TrainConfig:
    """Settings of :func:`fit`."""

    epochs: int = 3
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 1e-4
    seed: int = 0
    augment: PixelChange | None = None  # few-pixel-change augmentation, fresh draws per epoch
    device: str = "cpu"

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size"):
            check_int(getattr(self, name), name)
        if not self.lr > 0:
            raise ValueError(f"lr: {self.lr} must be > 0")


def load_all(root: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every (image_id, label, image) of a data set, concatenated (small data sets only)."""
    from pixelray.shards import read_shard, shard_uris

    parts = [read_shard(uri) for uri in shard_uris(root)]
    return (
        torch.cat([p.image_ids for p in parts]),
        torch.cat([p.labels for p in parts]),
        torch.cat([p.images for p in parts]),
    )


def fit(model: torch.nn.Module, root: str, config: TrainConfig = TrainConfig()) -> torch.nn.Module:
    """Train ``model`` (a Classifier taking uint8 images) on the data set at ``root``; returns it in eval mode.

    Deterministic for a given config on CPU: the shuffling generator is seeded from
    ``config.seed``, and augmentation draws are keyed by (seed + epoch, image id).
    """
    device = torch.device(config.device)
    ids, labels, images = load_all(root)
    ids, labels, images = ids.to(device), labels.to(device), images.to(device)
    model.to(device).train()
    params = [p for p in model.parameters()]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    steps = config.epochs * -(-len(ids) // config.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=config.lr, total_steps=steps)
    gen = torch.Generator().manual_seed(config.seed)
    loss_fn = torch.nn.CrossEntropyLoss()
    for epoch in range(config.epochs):
        order = torch.randperm(len(ids), generator=gen).to(device)
        cell = Cell(config.augment, seed=(config.seed + epoch) % 2**31) if config.augment else None
        for start in range(0, len(ids), config.batch_size):
            idx = order[start : start + config.batch_size]
            batch = images[idx]
            if cell is not None:
                batch = apply_pixel_changes(batch, cell, ids[idx])
            loss = loss_fn(model(batch), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    for p in params:
        p.requires_grad_(False)
    return model.eval()
