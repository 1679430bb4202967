"""Sweep throughput against forward-only, a naive per-cell loop, and Ray Data with one pipeline per cell.

All in one run, on the same images and the same model (random init is fine for timing):

* forward-only: the same number of images the sweep pushes through the model (clean
  pass + every cell), batched, in one plain process: the ceiling;
* the sweep (Ray, ModelWorker, unit files), split in two numbers:
  ``fixed_overhead_s`` = wall time - the workers' compute time (starting the actors,
  importing torch there, loading the model, checking the data, writing unit files and
  tables: costs that do not grow with the images), and
  ``steady_state_efficiency`` = forward-only time / the workers' compute time (what the
  device does per image, against the ceiling); ``efficiency`` = forward-only / wall;
  Ray start-up is reported separately (``ray_start_s``);
* naive: the clean pass (as the sweep makes it: the paper counts the images a model
  recognised before the change), then the paper's Algorithm 1 as it reads: re-read the data for every cell, change
  pixels image by image in Python, then predict;
* Ray Data: ``read_parquet(...).map_batches(Predictor, compute=ActorPoolStrategy(size=1))``,
  one pipeline per cell (the same vectorised perturbation inside).

The sweep and forward-only run at ``--images`` (default 128) and at ``--images-large``
(default 1024; 0 skips it); the baselines at ``--images`` only. At the default size forward-only
is timed before and after the sweep, and the faster counts (a conservative efficiency on a
machine whose load changes). Prints one JSON line.
CPU default (about 15 minutes on 2 quiet cores)::

    python benchmarks/sweep.py
    python benchmarks/sweep.py --device cuda --model resnet101 --images 4096 --images-large 0 --amp bf16
    python benchmarks/sweep.py --device cuda --model squeezenet1_1 --amp bf16 --cells-per-pass 8

The sweep's workers ask PyTorch for transparent huge pages (:mod:`pixelray.cpu_memory`);
forward-only and the naive loop run with torch's defaults, as a plain script does, unless
``--baselines-huge-pages`` gives them the same (like for like: what the fusion and the
pipeline alone are worth).

``--no-ray`` (for machines without Ray) replaces the Ray sweep by the worker's own
code path in-process (``ModelWorker.run`` with two units in flight, as in the actor),
and skips the Ray Data baseline; ``--amp`` also reports the prediction agreement of
AMP with fp32 on the perturbed images.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pixelray.core.perturb import apply_pixel_changes  # noqa: E402
from pixelray.core.spec import Cell, PixelChange  # noqa: E402
from pixelray.cpu_memory import HUGE_PAGES_ENV, use_huge_pages_here  # noqa: E402
from pixelray.datasets.synthetic import make_synthetic  # noqa: E402
from pixelray.engine.evaluate import pick_device  # noqa: E402
from pixelray.engine.units import Unit  # noqa: E402
from pixelray.engine.worker import ModelWorker  # noqa: E402
from pixelray.models import load_model  # noqa: E402
from pixelray.shards import load_manifest, read_shard, shard_uris  # noqa: E402

COUNTS = [4, 8, 16, 32, 64]
AMPLITUDES = ["full", 10, 40, 70, 127]


def grid_cells() -> list[Cell]:
    return [Cell(PixelChange(n, a)) for n in COUNTS for a in AMPLITUDES]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _amp_dtype(amp, device: torch.device) -> torch.dtype:
    if amp in ("bf16", "fp16"):
        return torch.bfloat16 if amp == "bf16" else torch.float16
    return torch.float16 if device.type == "cuda" else torch.bfloat16


def forward_only(model, images, passes, batch, device, amp) -> float:
    """Seconds for ``passes`` x len(images) images through the model, batched, data already in memory."""
    x = images.to(device)
    ctx = torch.autocast(device.type, dtype=_amp_dtype(amp, device), enabled=bool(amp))
    with torch.inference_mode(), ctx:
        model(x[:batch])  # warm-up
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(passes):
            for s in range(0, len(x), batch):
                model(x[s : s + batch]).argmax(1)
        _sync(device)
    return time.perf_counter() - t0


def _read_naive(uri: str) -> tuple[list[int], np.ndarray, np.ndarray]:
    """A shard as a plain script reads it: ids, a writable image array, labels."""
    table = pq.read_table(uri, columns=["image_id", "label", "image"])
    shape = (len(table), *load_manifest(str(Path(uri).parent)).image_shape)
    images = np.frombuffer(b"".join(table.column("image").to_pylist()), dtype=np.uint8).reshape(shape).copy()
    return table.column("image_id").to_pylist(), images, table.column("label").to_numpy().copy()


def _count_wrong_naive(model, images: np.ndarray, labels: np.ndarray, batch: int, device) -> int:
    x = torch.from_numpy(images).to(device)
    wrong = 0
    with torch.inference_mode():
        for s in range(0, len(x), batch):
            preds = model(x[s : s + batch]).argmax(1).cpu()
            wrong += int((preds != torch.from_numpy(labels[s : s + batch])).sum())
    return wrong


def naive_clean(model, uris, batch, device) -> tuple[float, int]:
    """The clean pass the sweep also makes (the paper counts the images a model recognised before the change)."""
    t0 = time.perf_counter()
    wrong = 0
    for uri in uris:
        _, images, labels = _read_naive(uri)
        wrong += _count_wrong_naive(model, images, labels, batch, device)
    _sync(device)
    return time.perf_counter() - t0, wrong


def naive_loop(model, uris, cells, batch, device) -> tuple[float, int]:
    """Algorithm 1 as read: per cell, re-read every shard, change pixels image by image in Python."""
    t0 = time.perf_counter()
    wrong = 0
    for cell in cells:
        change = cell.change
        for uri in uris:
            image_ids, images, labels = _read_naive(uri)
            for k, image_id in enumerate(image_ids):
                rng = random.Random(hash((cell.key, image_id)))
                h, w = images.shape[1:3]
                for pos in rng.sample(range(h * w), change.count):
                    y, x = divmod(pos, w)
                    for c in range(3):
                        if change.amplitude == "full":
                            images[k, y, x, c] = rng.randint(0, 255)
                        else:
                            a = int(change.amplitude)
                            images[k, y, x, c] = min(255, max(0, int(images[k, y, x, c]) + rng.randint(-a, a)))
            wrong += _count_wrong_naive(model, images, labels, batch, device)
    _sync(device)
    return time.perf_counter() - t0, wrong


class _Predictor:
    """Ray Data callable class: loads the model once, predicts a batch under one cell."""

    def __init__(self, model: str, num_classes: int, cell: Cell, shape, threads: int):
        torch.set_num_threads(threads)
        self.model = load_model(model, None, num_classes=num_classes).eval()
        self.cell, self.shape = cell, shape

    def __call__(self, table):
        n = len(table)
        col = table.column("image").combine_chunks()
        row = int(np.prod(self.shape))
        raw = np.frombuffer(col.buffers()[1], dtype=np.uint8, count=n * row, offset=col.offset * row)
        images = torch.from_numpy(raw.reshape(n, *self.shape).copy())
        ids = torch.from_numpy(table.column("image_id").to_numpy().astype(np.int64))
        labels = torch.from_numpy(table.column("label").to_numpy().astype(np.int64))
        with torch.inference_mode():
            preds = self.model(apply_pixel_changes(images, self.cell, ids)).argmax(1)
        return {"wrong": np.array([int((preds != labels).sum())])}


def ray_data_per_cell(model, uris, cells, manifest, batch, threads) -> tuple[float, int]:
    import ray

    t0 = time.perf_counter()
    wrong = 0
    for cell in cells:
        ds = ray.data.read_parquet(uris, columns=["image_id", "label", "image"])
        out = ds.map_batches(
            _Predictor,
            fn_constructor_kwargs=dict(model=model, num_classes=manifest.num_classes, cell=cell,
                                       shape=manifest.image_shape, threads=threads),
            compute=ray.data.ActorPoolStrategy(size=1),
            batch_size=batch, batch_format="pyarrow", num_cpus=1,
        )
        wrong += int(sum(r["wrong"] for r in out.iter_rows()))
    return time.perf_counter() - t0, wrong


def sweep_ray(data, model, out, batch, threads, amp, device, cells_per_pass=1, cuda_graphs=False):
    from pixelray.config.sweep import parse_config
    from pixelray.sweep import run_sweep

    run = {"threads": threads, "amp": amp, "device": device, "cells_per_pass": cells_per_pass}
    if cuda_graphs:
        run["cuda_graphs"] = True
    cfg = parse_config({
        "data": {"path": str(data)},
        "models": {"names": [model], "weights": "none"},
        "eval": {"filter": "none", "batch_size": batch},
        "grid": {"counts": COUNTS, "amplitudes": AMPLITUDES},
        "output": {"dir": str(out)},
        "run": run,
    })
    t0 = time.perf_counter()
    result = run_sweep(cfg, progress=False)
    return time.perf_counter() - t0, result.stats


def sweep_in_process(uris, manifest, model, cells, batch, threads, amp, device, cells_per_pass=1):
    """The worker's code path without Ray: each shard is one unit; two in flight (read overlaps compute)."""
    worker = ModelWorker(device=device, threads=threads, batch_size=batch, amp=amp, cells_per_pass=cells_per_pass)
    worker._ensure_model(model, None, manifest.num_classes)  # model load is not part of the steady state
    units = [Unit("cells", model, uri, Path(uri).name) for uri in uris]
    t0 = time.perf_counter()
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda u: worker.run(u, None, manifest.num_classes, cells), units))
    _sync(pick_device(device))
    return time.perf_counter() - t0, {"compute_s": {"cells": sum(r["compute_s"] for r in results)}}


def amp_agreement(model, images, ids, cells, batch, device, amp=True) -> float:
    x = images.to(device)
    ids = ids.to(device)
    same = total = 0
    with torch.inference_mode():
        for cell in cells[:: max(1, len(cells) // 5)]:
            for s in range(0, len(x), batch):
                xb = apply_pixel_changes(x[s : s + batch], cell, ids[s : s + batch])
                p32 = model(xb).argmax(1)
                with torch.autocast(device.type, dtype=_amp_dtype(amp, device)):
                    p16 = model(xb).argmax(1)
                same += int((p32 == p16).sum())
                total += len(p32)
    return same / total


def measure_sweep(args, size_images: int, tmp: Path, cells, forward_twice: bool = True):
    """The sweep and forward-only at one size: wall, compute, fixed overhead, efficiencies.

    Forward-only is timed before and after the sweep (``forward_twice``) and the faster one
    counts: on a machine whose load changes, that gives the lower, conservative efficiency.
    """
    data = tmp / f"data{size_images}"
    make_synthetic(data, classes=10, images=size_images, size=args.size, seed=0, rows_per_shard=args.rows_per_shard)
    manifest = load_manifest(str(data))
    uris = shard_uris(str(data))
    parts = [read_shard(u) for u in uris]
    images = torch.cat([p.images for p in parts])
    ids = torch.cat([p.image_ids for p in parts])
    device = torch.device(args.device)
    passes = len(cells) + (0 if args.no_ray else 1)  # the clean pass, then every cell
    model = load_model(args.model, None, num_classes=manifest.num_classes).to(device, memory_format=torch.channels_last)
    forward = [forward_only(model, images, passes, args.batch, device, args.amp)] if forward_twice else []
    if args.no_ray:
        t_sweep, stats = sweep_in_process(uris, manifest, args.model, cells, args.batch, args.threads, args.amp,
                                          args.device, args.cells_per_pass)
    else:
        t_sweep, stats = sweep_ray(data, args.model, tmp / f"out{size_images}", args.batch, args.threads, args.amp,
                                   args.device, args.cells_per_pass, args.cuda_graphs)
    compute = sum(stats["compute_s"].values())
    forward.append(forward_only(model, images, passes, args.batch, device, args.amp))
    t_fwd = min(forward)
    out = {
        "images": size_images,
        "sweep_s": round(t_sweep, 2),
        "compute_s": round(compute, 2),
        "forward_only_s": round(t_fwd, 2),
        "forward_only_runs_s": [round(t, 2) for t in forward],
        "fixed_overhead_s": round(t_sweep - compute, 2),
        "steady_state_efficiency": round(t_fwd / compute, 3),
        "efficiency": round(t_fwd / t_sweep, 3),
        "images_per_s_sweep": round(passes * size_images / t_sweep, 1),
        "images_per_s_sweep_steady": round(passes * size_images / compute, 1),
        "images_per_s_forward_only": round(passes * size_images / t_fwd, 1),
    }
    if "reads" in stats:
        out["reads"] = stats["reads"]
    return out, images, ids, uris, (model, manifest)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="squeezenet1_1")
    ap.add_argument("--images", type=int, default=128, help="images of the default size (baselines run here)")
    ap.add_argument("--images-large", type=int, default=1024, help="a second size for the sweep (0 skips it)")
    ap.add_argument("--rows-per-shard", type=int, default=64)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--amp", nargs="?", const=True, default=False, choices=[True, "bf16", "fp16"],
                    help="autocast in the sweep and forward-only (bare: fp16 on CUDA, bf16 on CPU); report agreement")
    ap.add_argument("--cells-per-pass", type=int, default=1, help="cells per forward pass in the sweep")
    ap.add_argument("--cuda-graphs", action="store_true", help="the sweep replays CUDA graphs (CUDA only)")
    ap.add_argument("--no-ray", action="store_true", help="worker code path in-process; no Ray Data baseline")
    ap.add_argument("--baselines-huge-pages", action="store_true",
                    help="forward-only and the naive loop with huge pages too, as the sweep's workers have them")
    ap.add_argument("--skip-naive", action="store_true")
    ap.add_argument("--skip-ray-data", action="store_true")
    ap.add_argument("--naive-cells", type=int, default=25, help="time the naive loop on this many cells, scaled")
    args = ap.parse_args()
    if args.baselines_huge_pages:
        use_huge_pages_here()  # before this process's first tensor
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cells = grid_cells()
    tmp = Path(tempfile.mkdtemp(prefix="pxbench"))
    report: dict = {"benchmark": "sweep", "model": args.model, "device": args.device,
                    "device_name": _device_name(device), "size": args.size, "cells": len(cells),
                    "batch": args.batch, "amp": args.amp, "threads": args.threads,
                    "cells_per_pass": args.cells_per_pass, "cuda_graphs": args.cuda_graphs,
                    "baselines_huge_pages": os.environ.get(HUGE_PAGES_ENV, "0") != "0",
                    "mode": "in-process worker (no Ray)" if args.no_ray else "ray sweep"}
    try:
        if not args.no_ray:
            from pixelray.sweep import connect

            t0 = time.perf_counter()
            connect("local")
            report["ray_start_s"] = round(time.perf_counter() - t0, 2)
        default, images, ids, uris, (model, manifest) = measure_sweep(args, args.images, tmp, cells)
        report["default"] = default
        if args.amp:
            report["amp_agreement"] = round(amp_agreement(model, images, ids, cells, args.batch, device, args.amp), 5)
        if not args.skip_naive:
            sub = cells[:: max(1, len(cells) // args.naive_cells)][: args.naive_cells]
            t_clean, _ = naive_clean(model, uris, args.batch, device)
            t_cells, _ = naive_loop(model, uris, sub, args.batch, device)
            t_naive = t_clean + t_cells * len(cells) / len(sub)
            report["naive_clean_s"] = round(t_clean, 2)
            report["naive_s"] = round(t_naive, 2)
            report["naive_cells_timed"] = len(sub)
            report["speedup_vs_naive"] = round(t_naive / default["sweep_s"], 2)
        if not args.no_ray and not args.skip_ray_data:
            t_rd, _ = ray_data_per_cell(args.model, uris, cells, manifest, args.batch, args.threads)
            report["ray_data_s"] = round(t_rd, 2)
            report["speedup_vs_ray_data"] = round(t_rd / default["sweep_s"], 2)
        if args.images_large:  # forward-only once here: it alone takes as long as the whole default size
            report["large"] = measure_sweep(args, args.images_large, tmp, cells, forward_twice=False)[0]
        report["goals"] = {
            "steady_state_efficiency>=0.9": all(report[k]["steady_state_efficiency"] >= 0.9
                                                for k in ("default", "large") if k in report),
            "sweep_as_fast_as_naive": report.get("speedup_vs_naive", 0) >= 1,
        }
        report["load_average"] = round(os.getloadavg()[0], 2)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(report))


def _device_name(device: torch.device) -> str:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from timing import device_name

    return device_name(device)


if __name__ == "__main__":
    main()
