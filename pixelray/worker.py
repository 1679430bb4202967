"""ModelWorker: a Ray actor that holds one model on one device and runs units.

A unit is (model, shard). The worker reads the shard itself, moves it to its
device once, and runs every cell of the plan over it, returning counts (never
images). Two units may be in flight per worker: the second one's shard is read
(and on CUDA copied to the device, from pinned memory, on a copy stream) while
the first one computes (the actor has two threads; compute is serialised by a
lock). The compute functions below are plain torch and usable without Ray.

The hot path, per batch of a unit: the plan's :class:`~pixelray.perturb.Perturber`
draws every cell's changes in a few fused passes and writes them into a scratch
copy of the batch, one cell (or ``cells_per_pass`` cells) at a time, undoing them
after each forward pass; nothing waits for the device until the unit's counts are
read back. The number of reads is counted in the reader (``read_count``), not assumed.

An *attack* unit makes adversarial examples (the config's attack, through the
interface of :mod:`pixelray.attacks`) with the unit's model at every eps, runs
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
import tempfile
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pixelray.attacks import get_attack
from pixelray.corrupt import apply_cell
from pixelray.perturb import Perturber, image_layout
from pixelray.shards import ShardExpectation, read_count
from pixelray.spec import Cell, PixelChange

__all__ = [
    "AttackPlan", "ModelWorker", "Phase", "Unit", "attack_outcomes", "correct_under_cells", "count_wrong",
    "pick_device", "predict",
]


class Phase(str, Enum):
    """The phases of a sweep, in the order they run."""

    CLEAN = "clean"  # every model predicts every image once
    CELLS = "cells"  # every cell over the evaluation set
    ATTACK = "attack"  # adversarial examples, then every cell and every judge over them


@dataclass(frozen=True)
class Unit:
    """One piece of work: a phase, a model and a shard.

    ``image_ids`` (cells and attack phases) are the images of that shard to run:
    the evaluation set, or the attack's candidates.
    """

    phase: Phase
    model: str
    shard: str  # URI or path of the shard file
    shard_name: str  # its file name in the manifest, used for the unit file
    image_ids: tuple[int, ...] | None = None
    expect: ShardExpectation | None = None  # the manifest's entry; the read is checked against it
    attack: str | None = None  # the attack's name (attack phase)

    def __post_init__(self) -> None:
        object.__setattr__(self, "phase", Phase(self.phase))

    @property
    def key(self) -> str:
        stem = self.shard_name.rsplit(".", 1)[0]
        phase = self.phase.value if self.attack is None else f"{self.phase.value}/{self.attack}"
        return f"{phase}/{model_slug(self.model)}/{stem}"


def model_slug(name: str) -> str:
    """A file-name-safe, unique form of a model spec: its readable tail and a short hash of all of it."""
    readable = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)[-80:]
    return f"{readable}-{hashlib.sha256(name.encode()).hexdigest()[:8]}"


def pick_device(device: str = "auto") -> torch.device:
    """'auto' -> cuda when available, else cpu."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _autocast(device: torch.device, amp: bool | str):
    """Autocast for ``amp``: False (fp32), True (fp16 on CUDA, bf16 on CPU), "bf16" or "fp16"."""
    if not amp:
        return contextlib.nullcontext()
    if isinstance(amp, str):
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[amp]
    else:
        dtype = torch.bfloat16 if device.type == "cpu" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def predict(model: torch.nn.Module, images: torch.Tensor, batch_size: int, amp: bool = False) -> torch.Tensor:
    """Top-1 predictions (int64, on the images' device) for a uint8 batch, in slices of ``batch_size``."""
    preds = []
    with torch.inference_mode(), _autocast(images.device, amp):
        for start in range(0, images.shape[0], batch_size):
            preds.append(model(images[start : start + batch_size]).argmax(dim=1))
    return torch.cat(preds) if preds else torch.empty(0, dtype=torch.int64, device=images.device)


def pixel_change_cells(cells: Sequence[Cell]) -> tuple[Cell, ...]:
    """The paper's pixel-change cells of a plan, in order (corruptions run one at a time beside them)."""
    return tuple(cell for cell in cells if isinstance(cell.change, PixelChange))


def image_size(images: torch.Tensor) -> tuple[int, int]:
    """(height, width) of a uint8 batch in NHWC or NCHW."""
    return tuple(images.shape[1:3] if image_layout(images) == "NHWC" else images.shape[2:4])  # type: ignore


def correct_under_cells(
    model: torch.nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    image_ids: torch.Tensor,
    cells: Sequence[Cell],
    batch_size: int,
    amp: bool = False,
    *,
    cells_per_pass: int = 1,
    perturber: Perturber | None = None,
    graphs: CellGraphs | None = None,
) -> torch.Tensor:
    """bool (cells, images) on the images' device: does the model still predict the label under each cell?

    Each slice of ``batch_size`` images is perturbed under every cell on the device
    (:meth:`Perturber.passes`: one fused draw per group of cells, changes written into a
    scratch batch and undone), ``cells_per_pass`` cells per forward pass (the batch holds
    cells x images; 1 gives the forward passes of one cell at a time, the numerics of
    earlier versions). Corruption cells (``pixelray.corrupt``) run one at a time beside them.
    Nothing is synchronised with the host.

    Args:
        perturber: the plan's :class:`Perturber` for these cells and this image size (built
            here when None; a worker keeps one per plan).
        graphs: replay full batches from CUDA graphs (:class:`CellGraphs`); None runs eagerly.
    """
    n = images.shape[0]
    changes = [i for i, cell in enumerate(cells) if isinstance(cell.change, PixelChange)]
    others = [i for i, cell in enumerate(cells) if not isinstance(cell.change, PixelChange)]
    if perturber is None:
        perturber = Perturber(pixel_change_cells(cells), *image_size(images), images.device)
    correct = torch.empty((len(cells), n), dtype=torch.bool, device=images.device)
    step = max(1, int(cells_per_pass))
    with torch.inference_mode(), _autocast(images.device, amp):
        for start in range(0, n, batch_size):
            part = slice(start, start + batch_size)
            batch, ids, truth = images[part], image_ids[part], labels[part]
            if graphs is not None and len(batch) == batch_size:
                if others:  # the graphs write the pixel-change cells' rows, in the perturber's order
                    rows = torch.empty((len(changes), len(batch)), dtype=torch.bool, device=images.device)
                    graphs.run(model, perturber, batch, ids, truth, step, rows)
                    correct[changes, part] = rows
                else:
                    graphs.run(model, perturber, batch, ids, truth, step, correct[:, part])
            else:
                stacked = truth.repeat(step) if step > 1 else truth
                m = len(truth)
                for places, changed in perturber.passes(batch, ids, step):
                    same = model(changed).argmax(dim=1) == stacked[: len(places) * m]
                    for j, i in enumerate(places):
                        correct[changes[i], part] = same[j * m : (j + 1) * m]
            for i in others:  # corruptions: one cell at a time
                correct[i, part] = model(apply_cell(batch, cells[i], ids)).argmax(dim=1) == truth
    return correct


class CellGraphs:
    """CUDA graphs of (change a pass's cells, forward, compare) per (model, batch size, cells), replayed.

    Opt-in (``[run] cuda_graphs = true``): on a GPU, a small model's forward pass of a batch
    takes about as long as launching its kernels one by one; a graph launches them all at
    once. The first batch of each (model, batch size, cells) is captured after a warm-up on
    a side stream; later batches copy into the captured inputs and replay. Predictions equal
    the eager path's (a GPU test compares them); on a CPU this class is never built.
    """

    def __init__(self, device: torch.device):
        if device.type != "cuda":
            raise ValueError(f"cuda_graphs: needs a CUDA device, the worker runs on {device}")
        self.device = device
        self.pool = torch.cuda.graph_pool_handle()
        self._graphs: dict[tuple, tuple] = {}  # key -> (weakref to the model, graph, static inputs, output)
        self._plans: dict[tuple, Perturber] = {}

    def run(self, model, perturber: Perturber, batch, ids, truth, step: int, out: torch.Tensor) -> None:
        """Write (cells, N) bool into ``out``: the model's verdict under every cell of ``perturber``."""
        cells = perturber.cells
        for c0 in range(0, len(cells), step):
            chunk = tuple(cells[c0 : c0 + step])
            key = (id(model), tuple(batch.shape), batch.stride(), chunk, torch.is_autocast_enabled())
            found = self._graphs.get(key)
            if found is None or found[0]() is not model:  # a model at a freed one's address is another model
                self._forget_dead()
                found = self._graphs[key] = (weakref.ref(model), *self._capture(model, chunk, perturber, batch, ids,
                                                                                truth))
            _, graph, static_in, static_out = found
            for dst, src in zip(static_in, (batch, ids, truth), strict=True):
                dst.copy_(src, non_blocking=True)
            graph.replay()
            out[c0 : c0 + len(chunk)] = static_out

    def _forget_dead(self) -> None:
        """Drop the graphs of models that were freed (the worker's LRU let them go)."""
        for key in [k for k, (ref, *_) in self._graphs.items() if ref() is None]:
            del self._graphs[key]

    def _capture(self, model, chunk, perturber: Perturber, batch, ids, truth):
        plan_key = (chunk, perturber.height, perturber.width)
        plan = self._plans.setdefault(plan_key, Perturber(chunk, perturber.height, perturber.width, self.device))
        static_in = (batch.clone(), ids.clone(), truth.clone())

        def body():
            images, image_ids, labels = static_in
            changed = plan.apply(images, image_ids)
            same = model(changed).argmax(dim=1) == labels.repeat(len(chunk))
            return same.view(len(chunk), -1)

        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(2):  # fills every cache (tables, offsets) and lets the kernels pick their algorithms
                body()
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            static_out = body()
        return graph, static_in, static_out


def count_wrong(
    model: torch.nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    image_ids: torch.Tensor,
    cells: Sequence[Cell],
    batch_size: int,
    amp: bool = False,
    **options: Any,
) -> np.ndarray:
    """Misclassified counts per cell (int64 array, one per cell) over one set of images (one host sync).

    ``options`` go to :func:`correct_under_cells` (``cells_per_pass``, ``perturber``, ``graphs``).
    """
    correct = correct_under_cells(model, images, labels, image_ids, cells, batch_size, amp, **options)
    return (~correct).sum(dim=1).cpu().numpy()

@dataclass(frozen=True)
class AttackPlan:
    """What an attack unit does: the attack, its steps, which examples go on, and who judges them.

    Args:
        eps: radii in pixel units k (eps is k/255).
        keep_all: run the cells and judges over every example (``keep = "all"``), not only
            over those that fool the model after rounding.
        judges: the sweep's models, in order; each judges every example (transfer).
        save_dir: write the examples that go through the cells as shards here (optional).
        kind: the attack (``[attack] kind``: a built-in name or ``module.path:SPEC``).
        params: its parameters, ``(key, value)`` pairs as the config checked them.
        report_float: also judge the unrounded examples (``[attack] report_float``).
    """

    eps: tuple[int, ...]
    keep_all: bool
    judges: tuple[str, ...]
    save_dir: str | None = None
    kind: str = "fgsm"
    params: tuple[tuple[str, Any], ...] = ()
    report_float: bool = False


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
    attack: str = "fgsm",
    params: Sequence[tuple[str, Any]] = (),
    report_float: bool = True,
    cell_options: dict | None = None,
) -> dict[str, np.ndarray | None]:
    """The attack with ``model`` at each eps, then every cell and every judge over the examples; per-image bits.

    The attack (``attack``, a kind for :func:`pixelray.attacks.get_attack`, with its
    ``params``) runs in fp32 (on CUDA without TF32) in slices of ``batch_size``; ``amp``
    applies to the cells and judges only. The cells and the judges see the uint8
    examples, and only the *eligible* ones: those the model misclassifies after
    rounding, or all with ``keep_all``. On CPU the bits of an image do not depend on
    the batch size for the tiny CNN; big torchvision models can differ in a few
    near-zero gradient signs across batch sizes (oneDNN, see ``attacks.py``).

    Host syncs: the labels' range is checked once, before the attack; the attack runs at
    every eps with its verdicts kept as masks on the device; then one copy of the (eps,
    images) mask tells which examples go on (running the cells over examples that cannot
    be kept would cost more than this one wait); the bits come back at the end.

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
        report_float: also judge the unrounded examples (``success_float``); without it
            ``success_float`` is None and, for attacks that allow it, a forward pass is saved.
        cell_options: options of :func:`correct_under_cells` (a worker's perturber, ...).

    Memory: the examples of every eps are kept until the cells run (E x the unit's images).

    Returns:
        ``success_float`` and ``success`` bool (E, N): the model misclassifies the
        unrounded / the uint8 example (``success_float`` None without ``report_float``);
        ``restored`` bool (E, C, N): under each cell the model predicts the true label;
        ``correct_by`` bool (E, J, N): each judge predicts the true label on the example.
        ``restored`` and ``correct_by`` are False for images that are not eligible.
    """
    from pixelray.attacks import check_labels

    n, n_eps = images.shape[0], len(eps)
    dev = images.device
    check_labels(labels, getattr(model, "num_classes", None))  # once per unit, not per batch
    success_float = torch.zeros(n_eps, n, dtype=torch.bool, device=dev) if report_float else None
    success = torch.zeros(n_eps, n, dtype=torch.bool, device=dev)
    restored = torch.zeros(n_eps, len(cells), n, dtype=torch.bool, device=dev)
    correct_by = torch.zeros(n_eps, len(judges), n, dtype=torch.bool, device=dev)
    examples = torch.empty((n_eps, *images.shape), dtype=images.dtype, device=dev)
    spec = get_attack(attack)
    kwargs = dict(params)
    if spec.optional_float:
        kwargs["report_float"] = report_float
    for e, k in enumerate(eps):
        for start in range(0, n, batch_size):
            stop = min(start + batch_size, n)
            with _exact_fp32(dev) if spec.needs_grad else contextlib.nullcontext():
                outcome = spec.run(model, images[start:stop], labels[start:stop], image_ids[start:stop], k / 255,
                                   **kwargs)
            examples[e, start:stop] = outcome.adv
            success[e, start:stop] = outcome.success
            if success_float is not None:
                success_float[e, start:stop] = outcome.success_float
    eligible = None if keep_all else success.cpu().numpy()  # the one wait: which examples go on
    options = dict(cell_options or {})
    for e in range(n_eps):
        if keep_all:
            chosen = torch.arange(n, device=dev)
        else:
            index = np.flatnonzero(eligible[e])
            if not len(index):
                continue
            chosen = torch.from_numpy(index).to(dev)
        adv, truth, ids = examples[e][chosen], labels[chosen], image_ids[chosen]
        if on_examples is not None:
            on_examples(e, ids, truth, adv)
        restored[e][:, chosen] = correct_under_cells(model, adv, truth, ids, cells, batch_size, amp, **options)
        for j, judge in enumerate(judges):
            verdict = ~success[e, chosen] if judge is None else predict(judge, adv, batch_size, amp) == truth
            correct_by[e, j, chosen] = verdict
    return {
        "success_float": None if success_float is None else success_float.cpu().numpy(),
        "success": success.cpu().numpy(),
        "restored": restored.cpu().numpy(),
        "correct_by": correct_by.cpu().numpy(),
    }


def save_examples(
    root: str, model: str, k: int, shard_name: str, ids: torch.Tensor, labels: torch.Tensor, images: torch.Tensor,
    num_classes: int, source: str = "fgsm",
) -> dict:
    """Write uint8 NHWC examples as one pixelray shard ``ROOT/<model>/eps<k>/<shard stem>.parquet``, atomically.

    ``ROOT`` is a local directory or any pyarrow filesystem URI (``s3://...``). Returns the
    shard's manifest entry (file relative to ``ROOT/<model>/eps<k>``, rows, sha256, id range);
    the driver writes the manifest over all of them at the end.
    """
    from pixelray.shards import ShardWriter
    from pixelray.storage import Location, join_uri

    name = shard_name.rsplit(".", 1)[0] + ".parquet"
    with tempfile.TemporaryDirectory(prefix="pixelray-adv-") as tmp:
        with ShardWriter(
            os.path.join(tmp, "set"), name="adversarial", height=images.shape[1], width=images.shape[2],
            class_names=[str(i) for i in range(num_classes)], source=source, rows_per_shard=max(1, len(ids)),
        ) as writer:
            writer.add(ids.cpu().numpy(), labels.cpu().numpy(), images.cpu().numpy(), [""] * len(ids))
        info = writer.close().shards[0]
        data = Path(tmp, "set", info.file).read_bytes()
    Location(join_uri(root, model_slug(model), f"eps{k}", name)).write_bytes(data)
    return {"file": name, "rows": info.rows, "sha256": info.sha256, "min_id": info.min_id, "max_id": info.max_id}


class ModelWorker:
    """Holds one model on one device; runs clean and cells units. Use as a Ray actor.

    Args:
        device: "auto", "cpu" or "cuda".
        threads: torch intra-op threads (CPU work); None leaves torch's default.
        batch_size: images per forward pass.
        amp: autocast: True (fp16 on CUDA, bf16 on CPU), "bf16" or "fp16"; agreement with fp32 is
            reported by the benchmark.
        cells_per_pass: cells per forward pass (the batch holds cells x images); 1 keeps the
            forward passes of earlier versions, more gives small models larger batches.
        cuda_graphs: replay the cells' passes from CUDA graphs (:class:`CellGraphs`); CUDA only.

    On CUDA a unit's shard is read into pinned memory and copied to the device on a copy
    stream by the thread that reads it, outside the compute lock: the next unit's copy
    overlaps this unit's compute, which waits for its own copy with an event, not the host.
    """

    def __init__(self, device: str = "auto", threads: int | None = None, batch_size: int = 64, amp: bool | str = False,
                 cells_per_pass: int = 1, cuda_graphs: bool = False):
        if threads:
            torch.set_num_threads(threads)
        self.device = pick_device(device)
        self.batch_size = batch_size
        self.amp = amp
        self.cells_per_pass = cells_per_pass
        self._graphs = CellGraphs(self.device) if cuda_graphs and self.device.type == "cuda" else None
        self._copy_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self._lock = threading.Lock()
        self._models: OrderedDict[tuple, torch.nn.Module] = OrderedDict()  # LRU, most recent last
        self._model_key: tuple | None = None  # the model of the last unit
        self._verified: set[tuple] = set()  # (path, size, mtime) of shards whose sha256 matched
        self._perturbers: OrderedDict[tuple, Perturber] = OrderedDict()  # per (cells, image size), LRU
        self._metrics = _ActorMetrics()

    def ping(self) -> dict:
        """Where this worker runs (node, pid, device): for logs and tests; its answer means "placed"."""
        try:
            import ray

            node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
        except ImportError:  # the worker's code used in-process on a machine without Ray
            node = None
        return {"pid": os.getpid(), "node": node, "device": str(self.device), "model": self._model_key}

    def preflight(self, models: Sequence[str], weights: str | None, num_classes: int) -> None:
        """Load every model once, on the worker's machine, before the sweep writes anything.

        Fails with the first model that cannot load (missing weights, a bad checkpoint) or
        that predicts another number of classes than the data set has. Missing weights of
        several models are reported together first, without loading anything.
        """
        from pixelray.models import require_weights

        require_weights(list(models), weights or "none")
        with self._lock:
            for spec in models:
                self._ensure_model(spec, weights, num_classes)

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
            # a checkpoint brings its own head (checked below); a random init is built for the data set
            fit_head = weights is None and not model.startswith("checkpoint:")
            net = load_model(model, weights, num_classes=num_classes if fit_head else None)
            if net.num_classes != num_classes:
                raise ValueError(
                    f"model {model!r} predicts {net.num_classes} classes but the data set has {num_classes}; "
                    "use a model/checkpoint trained for this data set"
                )
            net = net.to(self.device, memory_format=torch.channels_last).eval()
        self._models[key] = net
        return net

    def _read(self, unit: Unit):
        """Read the unit's images, checked against the manifest; each file's sha256 once per worker."""
        from pixelray.shards import read_shard

        expect = unit.expect
        stamp = None
        if expect is not None and expect.sha256 is not None:
            stamp = _file_stamp(unit.shard)
            if stamp is not None and stamp in self._verified:
                expect = expect.replace(sha256=None)
        batch = read_shard(unit.shard, unit.image_ids, expect, pin_memory=self.device.type == "cuda")
        if stamp is not None:
            self._verified.add(stamp)
        return batch

    def _stage(self, batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Any]:
        """(images, labels, ids) on the device, and what the compute stream must wait for (CUDA: an event).

        On CUDA the copy runs on the worker's copy stream, from pinned memory, without
        blocking the host; on a CPU the tensors are used where they are.
        """
        if self._copy_stream is None:
            return batch.images, batch.labels, batch.image_ids, None
        with torch.cuda.stream(self._copy_stream):
            moved = [t.to(self.device, non_blocking=True) for t in (batch.images, batch.labels, batch.image_ids)]
            done = torch.cuda.Event()
            done.record(self._copy_stream)
        return (*moved, done)  # type: ignore[return-value]

    def _arrive(self, staged) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The staged tensors, usable on the current (compute) stream."""
        *tensors, done = staged
        if done is not None:
            stream = torch.cuda.current_stream(self.device)
            stream.wait_event(done)
            for t in tensors:
                t.record_stream(stream)  # the allocator must not reuse them before this stream is done
        return tuple(tensors)  # type: ignore[return-value]

    def _perturber(self, cells: Sequence[Cell], images: torch.Tensor) -> Perturber:
        """The plan's fused perturbation for this image size, built once per worker (a few kept)."""
        key = (tuple(cells), image_size(images))
        plan = self._perturbers.pop(key, None) or Perturber(pixel_change_cells(cells), *key[1], self.device)
        self._perturbers[key] = plan
        while len(self._perturbers) > 4:
            self._perturbers.popitem(last=False)
        return plan

    def _cell_options(self, cells: Sequence[Cell], images: torch.Tensor) -> dict:
        return {"cells_per_pass": self.cells_per_pass, "perturber": self._perturber(cells, images),
                "graphs": self._graphs}

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

        Returns numpy arrays only, plus ``reads`` (the :func:`~pixelray.shards.read_shard`
        calls this unit made, counted in the reader) and timing (``read_s``: reading and
        staging the shard; ``compute_s``: the time holding the device).
        """
        t0 = time.perf_counter()
        reads_before = read_count()  # a unit runs in one thread: the difference is this unit's
        batch = self._read(unit)  # outside the lock: overlaps the other unit's compute
        staged = self._stage(batch)  # likewise the host-to-device copy (CUDA)
        t_read = time.perf_counter() - t0
        with self._lock:
            t1 = time.perf_counter()
            hold = 1 if attack is None else max(1, len(attack.judges))
            model = self._ensure_model(unit.model, weights, num_classes, hold)
            self._model_key = (unit.model, weights, num_classes)
            images, labels, ids = self._arrive(staged)
            if unit.phase is Phase.CLEAN:
                preds = predict(model, images, self.batch_size, self.amp).cpu().numpy()
                out = {"image_id": batch.image_ids.numpy(), "label": batch.labels.numpy(), "prediction": preds}
                n_eval = len(preds)
            elif unit.phase is Phase.CELLS:
                wrong = count_wrong(model, images, labels, ids, list(cells), self.batch_size, self.amp,
                                    **self._cell_options(cells, images))
                out = {"cell_index": np.arange(len(cells)), "n_images": np.full(len(cells), len(ids)), "n_wrong": wrong}
                n_eval = len(ids) * len(cells)
            elif unit.phase is Phase.ATTACK and attack is not None:
                out, n_eval = self._attack(unit, model, images, labels, ids, cells, attack, weights, num_classes)
            else:
                raise ValueError(f"unit phase {unit.phase!r}: expected 'clean', 'cells' or 'attack' (with a plan)")
            t_compute = time.perf_counter() - t1
        self._metrics.record(unit.model, n_eval)
        return {**out, "reads": read_count() - reads_before, "images": n_eval, "read_s": t_read,
                "compute_s": t_compute, "pid": os.getpid()}

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
                attack.save_dir, unit.model, attack.eps[e], unit.shard_name, ex_ids, ex_labels, examples, num_classes,
                source=get_attack(attack.kind).name,
            )

        bits = attack_outcomes(
            model, images, labels, ids, attack.eps, list(cells), judges, self.batch_size,
            keep_all=attack.keep_all, amp=self.amp, on_examples=save if attack.save_dir else None,
            attack=attack.kind, params=attack.params, report_float=attack.report_float,
            cell_options=self._cell_options(cells, images),
        )
        out = {"image_id": ids.cpu().numpy(), "label": labels.cpu().numpy(), **bits, "saved": saved}
        eligible = bits["success"].size if attack.keep_all else int(bits["success"].sum())
        n_eval = bits["success"].size + eligible * (len(cells) + len(judges))
        return out, n_eval


def _file_stamp(uri: str) -> tuple | None:
    """(path, size, mtime) of a local shard file, to remember that its hash was checked; None elsewhere."""
    path = uri[len("file://"):] if uri.startswith("file://") else uri
    if "://" in path:
        return None
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (os.path.abspath(path), st.st_size, st.st_mtime_ns)


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
