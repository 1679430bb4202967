"""ModelWorker: a Ray actor that holds one model on one device and runs units.

A unit is (model, shard). The worker reads the shard itself, moves it to its
device once, and runs every cell of the plan over it, returning counts (never
images). Two units may be in flight per worker: the second one's shard is read
while the first one computes (the actor has two threads; compute is serialised
by a lock). The compute functions below are plain torch and usable without Ray.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from pixelray.perturb import apply_pixel_changes
from pixelray.spec import Cell

__all__ = ["ModelWorker", "Unit", "count_wrong", "pick_device", "predict"]


@dataclass(frozen=True)
class Unit:
    """One piece of work: a phase ("clean" or "cells"), a model and a shard.

    ``image_ids`` (cells phase) are the evaluation-set images of that shard.
    """

    phase: str
    model: str
    shard: str  # URI or path of the shard file
    shard_name: str  # its file name in the manifest, used for the unit file
    image_ids: tuple[int, ...] | None = None

    @property
    def key(self) -> str:
        stem = self.shard_name.rsplit(".", 1)[0]
        return f"{self.phase}/{model_slug(self.model)}/{stem}"


def model_slug(name: str) -> str:
    """A file-name-safe form of a model spec."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)[-120:]


def pick_device(device: str = "auto") -> torch.device:
    """'auto' -> cuda when available, else cpu."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _autocast(device: torch.device, amp: bool):
    if not amp:
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if device.type == "cpu" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def predict(model: torch.nn.Module, images: torch.Tensor, batch_size: int, amp: bool = False) -> torch.Tensor:
    """Top-1 predictions (int64, on the images' device) for a uint8 batch, in slices of ``batch_size``."""
    preds = []
    with torch.inference_mode(), _autocast(images.device, amp):
        for start in range(0, images.shape[0], batch_size):
            preds.append(model(images[start : start + batch_size]).argmax(dim=1))
    return torch.cat(preds) if preds else torch.empty(0, dtype=torch.int64, device=images.device)


def count_wrong(
    model: torch.nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    image_ids: torch.Tensor,
    cells: Sequence[Cell],
    batch_size: int,
    amp: bool = False,
) -> np.ndarray:
    """Misclassified counts per cell (int64 array, one per cell) over one set of images.

    Each slice of ``batch_size`` images is perturbed under every cell on the
    images' device; the counts stay on the device until the end (one sync).
    """
    wrong = torch.zeros(len(cells), dtype=torch.int64, device=images.device)
    with torch.inference_mode(), _autocast(images.device, amp):
        for start in range(0, images.shape[0], batch_size):
            batch = images[start : start + batch_size]
            ids = image_ids[start : start + batch_size]
            truth = labels[start : start + batch_size]
            for i, cell in enumerate(cells):
                logits = model(apply_pixel_changes(batch, cell, ids))
                wrong[i] += (logits.argmax(dim=1) != truth).sum()
    return wrong.cpu().numpy()


class ModelWorker:
    """Holds one model on one device; runs clean and cells units. Use as a Ray actor.

    Args:
        device: "auto", "cpu" or "cuda".
        threads: torch intra-op threads (CPU work); None leaves torch's default.
        batch_size: images per forward pass.
        amp: autocast (fp16 on CUDA, bf16 on CPU); agreement with fp32 is reported by the benchmark.
    """

    def __init__(self, device: str = "auto", threads: int | None = None, batch_size: int = 64, amp: bool = False):
        if threads:
            torch.set_num_threads(threads)
        self.device = pick_device(device)
        self.batch_size = batch_size
        self.amp = amp
        self._lock = threading.Lock()
        self._model: torch.nn.Module | None = None
        self._model_key: tuple | None = None
        self._metrics = _ActorMetrics()

    def ping(self) -> dict:
        """Where this worker runs (node, pid, device): for logs and tests."""
        return {"pid": os.getpid(), "device": str(self.device), "model": self._model_key}

    def preflight(self, models: Sequence[str], weights: str | None) -> None:
        """Fail fast, on the worker's machine, when a model's weights or checkpoint file is missing."""
        from pathlib import Path

        from pixelray.models import require_weights

        require_weights(list(models), weights or "none")
        for spec in models:
            if spec.startswith("checkpoint:") and not Path(spec.split(":", 1)[1]).is_file():
                raise FileNotFoundError(f"model {spec!r}: no such checkpoint file; check the path in [models] names")

    def _ensure_model(self, model: str, weights: str | None, num_classes: int) -> torch.nn.Module:
        from pixelray.models import load_model

        key = (model, weights, num_classes)
        if self._model_key != key:
            self._model = None
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            net = load_model(model, weights, num_classes=num_classes if weights is None else None)
            if net.num_classes != num_classes:
                raise ValueError(
                    f"model {model!r} predicts {net.num_classes} classes but the data set has {num_classes}; "
                    "use a model/checkpoint trained for this data set"
                )
            self._model = net.to(self.device, memory_format=torch.channels_last).eval()
            self._model_key = key
        return self._model

    def _read(self, shard: str, image_ids: Sequence[int] | None):
        from pixelray.shards import read_shard

        return read_shard(shard, image_ids)

    def run(self, unit: Unit, weights: str | None, num_classes: int, cells: Sequence[Cell] = ()) -> dict:
        """Run one unit. Clean: per-image predictions. Cells: per-cell wrong counts.

        Returns numpy arrays only, plus ``reads`` (shard reads, for the no-growth check)
        and timing.
        """
        t0 = time.perf_counter()
        batch = self._read(unit.shard, unit.image_ids)  # outside the lock: overlaps the other unit's compute
        t_read = time.perf_counter() - t0
        with self._lock:
            t1 = time.perf_counter()
            model = self._ensure_model(unit.model, weights, num_classes)
            images = batch.images.to(self.device, non_blocking=True)
            labels = batch.labels.to(self.device)
            ids = batch.image_ids.to(self.device)
            if unit.phase == "clean":
                preds = predict(model, images, self.batch_size, self.amp).cpu().numpy()
                out = {"image_id": batch.image_ids.numpy(), "label": batch.labels.numpy(), "prediction": preds}
                n_eval = len(preds)
            elif unit.phase == "cells":
                wrong = count_wrong(model, images, labels, ids, list(cells), self.batch_size, self.amp)
                out = {"cell_index": np.arange(len(cells)), "n_images": np.full(len(cells), len(ids)), "n_wrong": wrong}
                n_eval = len(ids) * len(cells)
            else:
                raise ValueError(f"unit phase {unit.phase!r}: expected 'clean' or 'cells'")
            t_compute = time.perf_counter() - t1
        self._metrics.record(unit.model, n_eval)
        return {**out, "reads": 1, "read_s": t_read, "compute_s": t_compute, "pid": os.getpid()}


class _ActorMetrics:
    """Counters exported through Ray's metrics agent (Prometheus service discovery)."""

    def __init__(self):
        try:
            from ray.util import metrics
        except ImportError:  # the worker's code used in-process on a machine without Ray
            self._images = self._units = None
            return
        self._images = metrics.Counter(
            "pixelray_worker_images", description="Images forwarded by workers (x cells).", tag_keys=("model",)
        )
        self._units = metrics.Counter("pixelray_worker_units", description="Units run by workers.", tag_keys=("model",))

    def record(self, model: str, images: int) -> None:
        if self._images is None:
            return
        self._images.inc(images, tags={"model": model})
        self._units.inc(1, tags={"model": model})
