"""The perturbation's cost: aten operations per (cell, batch) and its share of a forward pass.

Two ways to change pixels are measured on the same uint8 batch (NHWC, what shards give):

* the sweep's path: a :class:`~pixelray.core.perturb.Perturber` over a grid of cells (by default
  the sweep benchmark's 25: counts 4..64 x amplitudes full, 10, 40, 70, 127), every cell
  written into a scratch batch and undone (``passes``), per (cell, batch);
* one cell alone: :func:`~pixelray.core.perturb.apply_pixel_changes` (a copy of the batch plus
  the changes).

``aten_ops_per_cell_batch`` counts the top-level aten operations ``torch.profiler`` records
on CPU for the sweep's path over the grid, divided by the cells (views included, though they
launch no kernel); ``aten_ops_single_cell`` the same for one ``apply_pixel_changes`` call
(fbc5ed4 needed 162 there). On CUDA the count is the same but for the candidates' check (an
asynchronous assert instead of a host check). Times are medians; the forward passes are
torchvision's SqueezeNet-1.1 and ResNet-18 (random init, eval, inference_mode,
channels_last) on the same batch. Prints one JSON line.

    python benchmarks/perturb.py                            # CPU, batch 256, 224x224, 2 models
    python benchmarks/perturb.py --device cuda --batch 256  # the same on a GPU (op counts from CPU)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys

import torch
from timing import device_name, median_seconds
from torch.profiler import ProfilerActivity, profile

from pixelray.core.perturb import Perturber, apply_pixel_changes
from pixelray.core.spec import Cell, PixelChange

COUNTS = [4, 8, 16, 32, 64]
AMPLITUDES = ["full", 10, 40, 70, 127]


def top_level_aten_ops(fn) -> int:
    """aten operations ``fn`` calls, not counting those that run inside another aten operation."""
    fn()  # warm: caches are built once per plan, not per batch
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    count = 0
    for event in prof.events():
        if not event.name.startswith("aten::"):
            continue
        parent = event.cpu_parent
        while parent is not None and not parent.name.startswith("aten::"):
            parent = parent.cpu_parent
        count += parent is None
    return count


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="torch device for the timings (cpu, cuda, ...)")
    parser.add_argument("--batch", type=int, default=256, help="images per batch")
    parser.add_argument("--size", type=int, default=224, help="image side")
    parser.add_argument("--count", type=int, default=64, help="changed pixels of the one-cell measurement")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs of each perturbation")
    parser.add_argument("--forward-repeats", type=int, default=3, help="timed runs of each forward pass")
    parser.add_argument("--models", default="squeezenet1_1,resnet18", help="torchvision models to compare with")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random images and the cells")
    args = parser.parse_args(argv)

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    gen = torch.Generator().manual_seed(args.seed)
    cpu_images = torch.randint(0, 256, (args.batch, args.size, args.size, 3), generator=gen, dtype=torch.uint8)
    cpu_ids = torch.arange(args.batch, dtype=torch.int64) + 1_000_000
    cells = [Cell(PixelChange(n, a), args.seed) for n in COUNTS for a in AMPLITUDES]
    one = Cell(PixelChange(count=args.count), seed=args.seed)

    def sweep_path(engine: Perturber, images: torch.Tensor, ids: torch.Tensor) -> None:
        for _ in engine.passes(images, ids):
            pass

    # op counts: on CPU, whatever the timing device
    cpu_engine = Perturber(cells, args.size, args.size, "cpu")
    ops_grid = top_level_aten_ops(lambda: sweep_path(cpu_engine, cpu_images, cpu_ids))
    ops_one = top_level_aten_ops(lambda: apply_pixel_changes(cpu_images, one, cpu_ids))

    images, ids = cpu_images.to(device), cpu_ids.to(device)
    engine = Perturber(cells, args.size, args.size, device)
    reps = args.repeats
    per_cell = median_seconds(lambda: sweep_path(engine, images, ids), max(1, reps // 2), 1, device) / len(cells)
    single = median_seconds(lambda: apply_pixel_changes(images, one, ids), reps, 1, device)
    result: dict = {
        "benchmark": "perturb",
        "device": str(device),
        "device_name": device_name(device),
        "threads": torch.get_num_threads(),
        "batch": args.batch,
        "size": args.size,
        "cells": len(cells),
        "aten_ops_per_cell_batch": round(ops_grid / len(cells), 2),
        "aten_ops_goal": 30,
        "aten_ops_grid_batch": ops_grid,
        "aten_ops_single_cell": ops_one,
        "aten_ops_single_cell_fbc5ed4": 162,
        "perturb_per_cell_batch_s": per_cell,
        "perturb_single_cell_s": single,
        "clone_s": median_seconds(lambda: images.clone(), reps, 1, device),
    }

    import torchvision  # only the forward passes need it

    x = images.permute(0, 3, 1, 2).float().div_(255).contiguous(memory_format=torch.channels_last)
    for name in [m for m in args.models.split(",") if m]:
        model = getattr(torchvision.models, name)(weights=None).eval().to(device, memory_format=torch.channels_last)

        def forward(model=model) -> None:
            with torch.inference_mode():
                model(x)

        with torch.inference_mode():
            model(x[: max(1, args.batch // 8)])  # warm-up on a slice: a full extra pass would double the runtime
        seconds = median_seconds(forward, args.forward_repeats, 0, device)
        result[f"{name}_forward_s"] = seconds
        result[f"share_of_{name}"] = per_cell / seconds
        result[f"share_of_{name}_single_cell"] = single / seconds
    result["goal_met"] = result["aten_ops_per_cell_batch"] <= 30
    result["load_average"] = round(os.getloadavg()[0], 2)
    result["torch"] = torch.__version__
    result["python"] = platform.python_version()
    result = {k: round(v, 6) if isinstance(v, float) else v for k, v in result.items()}
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")
    return result


if __name__ == "__main__":
    main()
