"""The compute of clean and cells units: plain torch, usable without Ray.

Per batch, the plan's :class:`~pixelray.core.perturb.Perturber` draws every pixel-change cell's
changes in a few fused passes and writes them into a scratch copy of the batch, one cell (or
``cells_per_pass`` cells) at a time, undoing them after each forward pass; corruptions run one
at a time beside them. Nothing waits for the device until the unit's counts are read back.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from pixelray.core.corrupt import apply_cell
from pixelray.core.perturb import Perturber, image_layout
from pixelray.core.spec import Cell, PixelChange

__all__ = [
    "CellGraphs", "amp_autocast", "correct_under_cells", "count_wrong", "fill_step", "image_size", "pick_device",
    "pixel_change_cells", "predict",
]


def pick_device(device: str = "auto") -> torch.device:
    """'auto' -> cuda when available, else cpu."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def amp_autocast(device: torch.device, amp: bool | str):
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
    with torch.inference_mode(), amp_autocast(images.device, amp):
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
    cells_per_pass: int | None = 1,
    perturber: Perturber | None = None,
    graphs: CellGraphs | None = None,
) -> torch.Tensor:
    """bool (cells, images) on the images' device: does the model still predict the label under each cell?

    Each slice of ``batch_size`` images is perturbed under every cell on the device
    (:meth:`Perturber.passes`: one fused draw per group of cells, changes written into a
    scratch batch and undone), ``cells_per_pass`` cells per forward pass (the batch holds
    cells x images; 1 gives the forward passes of one cell at a time, the numerics of
    earlier versions; None stacks as many cells as fill ``batch_size`` images, so a shard of
    few images still gives full passes, and one cell at a time where a slice is full). Corruption cells
    (``pixelray.core.corrupt``) run one at a time beside them.
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
    with torch.inference_mode(), amp_autocast(images.device, amp):
        for start in range(0, n, batch_size):
            part = slice(start, start + batch_size)
            batch, ids, truth = images[part], image_ids[part], labels[part]
            step = min(fill_step(cells_per_pass, batch_size, len(batch)), max(1, len(changes)))
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


def fill_step(cells_per_pass: int | None, batch_size: int, n: int) -> int:
    """Cells per forward pass over a slice of ``n`` images: ``cells_per_pass``, or with None as many as fill
    ``batch_size`` images (at least one).

    >>> fill_step(None, 500, 5), fill_step(None, 500, 500), fill_step(None, 500, 180), fill_step(4, 500, 5)
    (100, 1, 2, 4)
    """
    if cells_per_pass is not None:
        return max(1, int(cells_per_pass))
    return max(1, batch_size // max(1, n))


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
