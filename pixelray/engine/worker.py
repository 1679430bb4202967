"""ModelWorker: a Ray actor that holds one model on one device and runs units.

A unit is (model, shard). The worker reads the shard itself, moves it to its
device once, and runs every cell of the plan over it, returning counts (never
images). Two units may be in flight per worker: the second one's shard is read
(and on CUDA copied to the device, from pinned memory, on a copy stream) while
the first one computes (the actor has two threads; compute is serialised by a
lock).

The compute is plain torch, usable without Ray: :mod:`pixelray.engine.evaluate` (clean and
cells units; the hot path) and :mod:`pixelray.engine.adversarial` (attack units). The number of
reads is counted in the reader (``read_count``), not assumed. To judge attack examples,
the worker loads the sweep's other models beside its own and keeps them (a small LRU cache,
at most one entry per model of the sweep): on a GPU that is the sum of the models' weights
(about 1 GB for the paper's five ImageNet models).
"""

from __future__ import annotations

import os
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from pixelray.attacks import get_attack
from pixelray.core.ladder import Ladder
from pixelray.core.perturb import Perturber
from pixelray.core.spec import Cell
from pixelray.core.worst import WorstCase
from pixelray.engine.adversarial import AttackPlan, attack_images, attack_outcomes, save_examples
from pixelray.engine.evaluate import CellGraphs, count_wrong, image_size, pick_device, pixel_change_cells, predict
from pixelray.engine.ladder import ladder_outcomes
from pixelray.engine.units import Phase, Unit
from pixelray.engine.worst_case import worst_case_outcomes
from pixelray.shards import read_count

__all__ = ["ModelWorker"]





class ModelWorker:
    """Holds one model on one device; runs clean and cells units. Use as a Ray actor.

    Args:
        device: "auto", "cpu" or "cuda".
        threads: torch intra-op threads (CPU work); None leaves torch's default.
        batch_size: images per forward pass.
        amp: autocast: True (fp16 on CUDA, bf16 on CPU), "bf16" or "fp16"; agreement with fp32 is
            reported by the benchmark.
        cells_per_pass: cells per forward pass (the batch holds cells x images); None (the default) stacks
            as many as fill ``batch_size`` images (one when a slice holds ``batch_size`` images: the forward
            passes of earlier versions); a number fixes it.
        cuda_graphs: replay the cells' passes from CUDA graphs (:class:`CellGraphs`); CUDA only.

    On CUDA a unit's shard is read into pinned memory and copied to the device on a copy
    stream by the thread that reads it, outside the compute lock: the next unit's copy
    overlaps this unit's compute, which waits for its own copy with an event, not the host.
    """

    def __init__(self, device: str = "auto", threads: int | None = None, batch_size: int = 64, amp: bool | str = False,
                 cells_per_pass: int | None = None, cuda_graphs: bool = False):
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
        from pixelray.models import load_for_data

        key = (model, weights, num_classes)
        net = self._models.pop(key, None)
        while len(self._models) >= hold:  # free before loading: one model's memory at a time
            self._models.popitem(last=False)
        if net is None:
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            net = load_for_data(model, weights, num_classes).to(self.device, memory_format=torch.channels_last).eval()
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
        ladders: Sequence[Ladder] = (),
        worst: Sequence[tuple[WorstCase, int | None]] = (),
    ) -> dict:
        """Run one unit. Clean: per-image predictions. Cells: per-cell wrong counts.
        Attack: per-image bits of :func:`attack_outcomes` (with ``attack``). Failure: per (ladder, image)
        counts of :func:`~pixelray.engine.ladder.ladder_outcomes` (with ``ladders``), and per (worst-case
        ladder, image) those of :func:`~pixelray.engine.worst_case.worst_case_outcomes` (with ``worst``: each
        with the highest image id it searches), prefixed ``worst_``.

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
            n_grad = 0  # images through a forward and backward pass (an attack's gradient steps)
            if unit.phase is Phase.CLEAN:
                preds = predict(model, images, self.batch_size, self.amp).cpu().numpy()
                out = {"image_id": batch.image_ids.numpy(), "label": batch.labels.numpy(), "prediction": preds}
                n_eval = len(preds)
            elif unit.phase is Phase.CELLS:
                wrong = count_wrong(model, images, labels, ids, list(cells), self.batch_size, self.amp,
                                    **self._cell_options(cells, images))
                out = {"cell_index": np.arange(len(cells)), "n_images": np.full(len(cells), len(ids)), "n_wrong": wrong}
                n_eval = len(ids) * len(cells)
            elif unit.phase is Phase.FAILURE:
                out = {"image_id": batch.image_ids.numpy(), "label": batch.labels.numpy()}
                n_eval = 0
                if ladders:
                    out.update(ladder_outcomes(model, images, labels, ids, ladders, self.batch_size, self.amp))
                    n_eval += int(out["n_passes"].sum())
                if worst:
                    found = worst_case_outcomes(model, images, labels, ids, worst, self.batch_size)
                    out.update({f"worst_{name}": values for name, values in found.items()})
                    n_eval += int(np.maximum(found["n_passes"], 0).sum())
            elif unit.phase is Phase.ATTACK and attack is not None:
                out, (n_eval, n_grad) = self._attack(unit, model, images, labels, ids, cells, attack, weights,
                                                     num_classes)
            else:
                raise ValueError(f"unit phase {unit.phase!r}: expected 'clean', 'cells', 'failure' or 'attack' (with a "
                                 "plan)")
            t_compute = time.perf_counter() - t1
        self._metrics.record(unit.model, n_eval)
        return {**out, "reads": read_count() - reads_before, "images": n_eval, "grad_images": n_grad, "read_s": t_read,
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
            cell_options=self._cell_options(cells, images), ladders=attack.ladders, size=attack.size,
        )
        out = {"image_id": ids.cpu().numpy(), "label": labels.cpu().numpy(), **bits, "saved": saved}
        cost = get_attack(attack.kind).passes(attack.params, attack.report_float)
        return out, attack_images(bits, cost, attack.keep_all, len(cells), sum(j is not None for j in judges))


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
        if self._images is None or images <= 0:
            return
        self._images.inc(images, tags={"model": model})
        self._units.inc(1, tags={"model": model})
