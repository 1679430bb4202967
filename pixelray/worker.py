"""ModelWorker: a Ray actor that holds one model on one device and runs units.

A unit is (model, shard). The worker reads the shard itself, moves it to its
device once, and runs every cell of the plan over it, returning counts (never
images). Two units may be in flight per worker: the second one's shard is read
while the first one computes (the actor has two threads; compute is serialised
by a lock). The compute functions below are plain torch and usable without Ray.

An *attack* unit makes FGSM examples with the unit's model at every eps, runs
every cell over them, and has every model of the sweep judge them (the transfer
matrix). It returns per-image bits, not counts, so that the driver can pick the
kept examples exactly across shards (see ``sweep.py``). To judge, the worker
loads the sweep's other models beside its own and keeps them (a small LRU cache,
at most one entry per model of the sweep): on a GPU that is the sum of the
models' weights (about 1 GB for the paper's five ImageNet models).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pixelray.attacks import fgsm_with_success
from pixelray.perturb import apply_pixel_changes
from pixelray.spec import Cell

__all__ = [
    "AttackPlan", "ModelWorker", "Unit", "attack_outcomes", "correct_under_cells", "count_wrong", "pick_device",
    "predict",
]


@dataclass(frozen=True)
class Unit:
    """One piece of work: a phase ("clean", "cells" or "attack"), a model and a shard.

    ``image_ids`` (cells and attack phases) are the images of that shard to run:
    the evaluation set, or the attack's candidates.
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
    """A file-name-safe, unique form of a model spec: its readable tail and a short hash of all of it."""
    readable = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)[-80:]
    return f"{readable}-{hashlib.sha256(name.encode()).hexdigest()[:8]}"


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


def correct_under_cells(
    model: torch.nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    image_ids: torch.Tensor,
    cells: Sequence[Cell],
    batch_size: int,
    amp: bool = False,
) -> torch.Tensor:
    """bool (cells, images) on the images' device: does the model still predict the label under each cell?

    Each slice of ``batch_size`` images is perturbed under every cell on the device;
    nothing is synchronised with the host.
    """
    correct = torch.empty((len(cells), images.shape[0]), dtype=torch.bool, device=images.device)
    with torch.inference_mode(), _autocast(images.device, amp):
        for start in range(0, images.shape[0], batch_size):
            part = slice(start, start + batch_size)
            batch, ids, truth = images[part], image_ids[part], labels[part]
            for i, cell in enumerate(cells):
                correct[i, part] = model(apply_pixel_changes(batch, cell, ids)).argmax(dim=1) == truth
    return correct


def count_wrong(
    model: torch.nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    image_ids: torch.Tensor,
    cells: Sequence[Cell],
    batch_size: int,
    amp: bool = False,
) -> np.ndarray:
    """Misclassified counts per cell (int64 array, one per cell) over one set of images (one host sync)."""
    correct = correct_under_cells(model, images, labels, image_ids, cells, batch_size, amp)
    return (~correct).sum(dim=1).cpu().numpy()

@dataclass(frozen=True)
class AttackPlan:
    """What an attack unit does besides the cells: the attack and who judges it.

    Args:
        eps: FGSM steps in pixel units k (the step is k/255).
        keep_all: run the cells and judges over every example (``keep = "all"``), not only
            over those that fool the model after rounding.
        judges: the sweep's models, in order; each judges every example (transfer).
        save_dir: write the examples that go through the cells as shards here (optional).
    """

    eps: tuple[int, ...]
    keep_all: bool
    judges: tuple[str, ...]
    save_dir: str | None = None


@contextlib.contextmanager
def _exact_fp32(device: torch.device):
    """cuDNN without TF32 for the attack: with TF32 a few gradient signs change from run to run
    (see ``attacks.py``); without it the examples repeat exactly."""
    if device.type != "cuda":
        yield
        return
    before = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = before


def attack_outcomes(
    model: torch.nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    image_ids: torch.Tensor,
    eps: Sequence[int],
    cells: Sequence[Cell],
    judges: Sequence[torch.nn.Module | None],
    batch_size: int,
    *,
    keep_all: bool = False,
    amp: bool = False,
    on_examples: Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], None] | None = None,
) -> dict[str, np.ndarray]:
    """FGSM with ``model`` at each eps, then every cell and every judge over the examples; per-image bits.

    The attack runs in fp32 (on CUDA without TF32) in slices of ``batch_size``; ``amp``
    applies to the cells and judges only. The cells and the judges see the uint8
    examples, and only the *eligible* ones: those the model misclassifies after
    rounding, or all with ``keep_all``. On CPU the bits of an image do not depend on
    the batch size for the tiny CNN; big torchvision models can differ in a few
    near-zero gradient signs across batch sizes (oneDNN, see ``attacks.py``).

    Args:
        model: the attacked classifier (uint8 or [0, 1] input, normalisation inside).
        images: uint8 (N, H, W, 3) or (N, 3, H, W), on the model's device.
        labels, image_ids: int64 (N,), on the same device.
        eps: steps in pixel units k (k/255).
        cells: the pixel changes applied to the examples.
        judges: models that judge the unchanged examples; ``None`` stands for ``model``
            itself, whose verdict is the attack's own (``not success``).
        on_examples: called as ``on_examples(eps_index, image_ids, labels, examples)`` with
            the eligible uint8 examples of each eps (to save them).

    Returns:
        ``success_float`` and ``success`` bool (E, N): the model misclassifies the
        unrounded / the uint8 example; ``restored`` bool (E, C, N): under each cell the
        model predicts the true label; ``correct_by`` bool (E, J, N): each judge predicts the
        true label on the example. ``restored`` and ``correct_by`` are False for images
        that are not eligible.
    """
    n, n_eps = images.shape[0], len(eps)
    dev = images.device
    success_float = torch.zeros(n_eps, n, dtype=torch.bool, device=dev)
    success = torch.zeros(n_eps, n, dtype=torch.bool, device=dev)
    restored = torch.zeros(n_eps, len(cells), n, dtype=torch.bool, device=dev)
    correct_by = torch.zeros(n_eps, len(judges), n, dtype=torch.bool, device=dev)
    examples = torch.empty_like(images)
    for e, k in enumerate(eps):
        for start in range(0, n, batch_size):
            stop = min(start + batch_size, n)
            with _exact_fp32(dev):
                outcome = fgsm_with_success(model, images[start:stop], labels[start:stop], k / 255)
            examples[start:stop] = outcome.adv
            success_float[e, start:stop] = outcome.success_float
            success[e, start:stop] = outcome.success
        chosen = torch.arange(n, device=dev) if keep_all else torch.nonzero(success[e]).flatten()
        if not len(chosen):
            continue
        adv, truth, ids = examples[chosen], labels[chosen], image_ids[chosen]
        if on_examples is not None:
            on_examples(e, ids, truth, adv)
        restored[e][:, chosen] = correct_under_cells(model, adv, truth, ids, cells, batch_size, amp)
        for j, judge in enumerate(judges):
            verdict = ~success[e, chosen] if judge is None else predict(judge, adv, batch_size, amp) == truth
            correct_by[e, j, chosen] = verdict
    return {
        "success_float": success_float.cpu().numpy(),
        "success": success.cpu().numpy(),
        "restored": restored.cpu().numpy(),
        "correct_by": correct_by.cpu().numpy(),
    }


def save_examples(
    root: str, model: str, k: int, shard_name: str, ids: torch.Tensor, labels: torch.Tensor, images: torch.Tensor,
    num_classes: int,
) -> dict:
    """Write uint8 NHWC examples as one pixelray shard ``ROOT/<model>/eps<k>/<shard stem>.parquet``, atomically.

    Returns the shard's manifest entry (file relative to ``ROOT/<model>/eps<k>``, rows,
    sha256, id range); the driver writes the manifest over all of them at the end.
    """
    from pixelray.shards import ShardWriter

    folder = os.path.join(root, model_slug(model), f"eps{k}")
    os.makedirs(folder, exist_ok=True)
    name = shard_name.rsplit(".", 1)[0] + ".parquet"
    for stale in Path(folder).glob(f".{name}.*"):  # left by a killed attempt at this unit
        shutil.rmtree(stale, ignore_errors=True)
    tmp = tempfile.mkdtemp(prefix=f".{name}.", dir=folder)
    try:
        with ShardWriter(
            os.path.join(tmp, "set"), name="adversarial", height=images.shape[1], width=images.shape[2],
            class_names=[str(i) for i in range(num_classes)], source="fgsm", rows_per_shard=max(1, len(ids)),
        ) as writer:
            writer.add(ids.cpu().numpy(), labels.cpu().numpy(), images.cpu().numpy(), [""] * len(ids))
        info = writer.close().shards[0]
        os.replace(os.path.join(tmp, "set", info.file), os.path.join(folder, name))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"file": name, "rows": info.rows, "sha256": info.sha256, "min_id": info.min_id, "max_id": info.max_id}


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
        self._models: OrderedDict[tuple, torch.nn.Module] = OrderedDict()  # LRU, most recent last
        self._model_key: tuple | None = None  # the model of the last unit
        self._metrics = _ActorMetrics()

    def ping(self) -> dict:
        """Where this worker runs (node, pid, device): for logs and tests."""
        return {"pid": os.getpid(), "device": str(self.device), "model": self._model_key}

    def preflight(self, models: Sequence[str], weights: str | None) -> None:
        """Fail fast, on the worker's machine, when a model's weights or checkpoint file is missing."""
        from pixelray.models import checkpoint_file, require_weights

        require_weights(list(models), weights or "none")
        for spec in models:
            if spec.startswith("checkpoint:") and not checkpoint_file(spec.split(":", 1)[1]).is_file():
                raise FileNotFoundError(f"model {spec!r}: no such checkpoint file or run directory; check the path "
                                        "in [models] names")

    def _ensure_model(self, model: str, weights: str | None, num_classes: int, hold: int = 1) -> torch.nn.Module:
        """The model on this worker's device, loaded once; at most ``hold`` models stay loaded (LRU)."""
        from pixelray.models import load_model

        key = (model, weights, num_classes)
        net = self._models.pop(key, None)
        while len(self._models) >= hold:  # free before loading: one model's memory at a time
            self._models.popitem(last=False)
        if net is None:
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            net = load_model(model, weights, num_classes=num_classes if weights is None else None)
            if net.num_classes != num_classes:
                raise ValueError(
                    f"model {model!r} predicts {net.num_classes} classes but the data set has {num_classes}; "
                    "use a model/checkpoint trained for this data set"
                )
            net = net.to(self.device, memory_format=torch.channels_last).eval()
        self._models[key] = net
        return net

    def _read(self, shard: str, image_ids: Sequence[int] | None):
        from pixelray.shards import read_shard

        return read_shard(shard, image_ids)

    def run(
        self,
        unit: Unit,
        weights: str | None,
        num_classes: int,
        cells: Sequence[Cell] = (),
        attack: AttackPlan | None = None,
    ) -> dict:
        """Run one unit. Clean: per-image predictions. Cells: per-cell wrong counts.
        Attack: per-image bits of :func:`attack_outcomes` (with ``attack``).

        Returns numpy arrays only, plus ``reads`` (shard reads, for the no-growth check)
        and timing.
        """
        t0 = time.perf_counter()
        batch = self._read(unit.shard, unit.image_ids)  # outside the lock: overlaps the other unit's compute
        t_read = time.perf_counter() - t0
        with self._lock:
            t1 = time.perf_counter()
            hold = 1 if attack is None else max(1, len(attack.judges))
            model = self._ensure_model(unit.model, weights, num_classes, hold)
            self._model_key = (unit.model, weights, num_classes)
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
            elif unit.phase == "attack" and attack is not None:
                out, n_eval = self._attack(unit, model, images, labels, ids, cells, attack, weights, num_classes)
            else:
                raise ValueError(f"unit phase {unit.phase!r}: expected 'clean', 'cells' or 'attack' (with a plan)")
            t_compute = time.perf_counter() - t1
        self._metrics.record(unit.model, n_eval)
        return {**out, "reads": 1, "read_s": t_read, "compute_s": t_compute, "pid": os.getpid()}

    def _attack(self, unit, model, images, labels, ids, cells, attack: AttackPlan, weights, num_classes):
        hold = max(1, len(attack.judges))
        judges = [
            None if name == unit.model else self._ensure_model(name, weights, num_classes, hold)
            for name in attack.judges
        ]
        self._ensure_model(unit.model, weights, num_classes, hold)  # the unit's model stays the most recent
        saved: list[dict | None] = [None] * len(attack.eps)

        def save(e: int, ex_ids: torch.Tensor, ex_labels: torch.Tensor, examples: torch.Tensor) -> None:
            saved[e] = save_examples(
                attack.save_dir, unit.model, attack.eps[e], unit.shard_name, ex_ids, ex_labels, examples, num_classes
            )

        bits = attack_outcomes(
            model, images, labels, ids, attack.eps, list(cells), judges, self.batch_size,
            keep_all=attack.keep_all, amp=self.amp, on_examples=save if attack.save_dir else None,
        )
        out = {"image_id": ids.cpu().numpy(), "label": labels.cpu().numpy(), **bits, "saved": saved}
        eligible = bits["success"].size if attack.keep_all else int(bits["success"].sum())
        n_eval = bits["success"].size + eligible * (len(cells) + len(judges))
        return out, n_eval


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
