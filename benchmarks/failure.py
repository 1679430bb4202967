"""Pixels to failure against the grid, on the same images and model: forward passes per image, and time.

The model is the tiny CNN trained for ``--epochs`` on synthetic images (the demo's base model: images
break from a few hundred changed pixels on 32x32), or with ``--model NAME`` a random-init torchvision
model on ``--size`` x ``--size`` synthetic images labelled by its own clean predictions (the ladder's
cost at ImageNet's size: 59 points at 224x224). Measured, on the same held-out images (those the model
classifies correctly):

* ``grid``: the grid sweep's work, :func:`~pixelray.engine.evaluate.count_wrong` over ``--counts`` x
  ``--amplitudes`` (default: the paper grid's 25 cells, 4..64 x full, 10, 40, 70, 127; the counts
  scaled by ``--scale``), one forward pass per image and cell;
* ``scan``, ``bisect``, ``scan_refine``: :func:`~pixelray.engine.ladder.search_ladder` with each search,
  4 steps per octave up to the whole image.

Forward passes per image are counted twice: by a forward hook on the model (images it saw, divided by
the images), and by the search's own ``n_passes``; both are reported. Times per image follow a warm-up
on 16 images. Prints one JSON line.

    python benchmarks/failure.py                               # tiny CNN, 32x32, 500 images, CPU
    python benchmarks/failure.py --model resnet18 --size 224 --images 64 --scale 1
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import numpy as np
import torch
from timing import device_name

from pixelray.core.ladder import Ladder
from pixelray.core.spec import Cell, PixelChange
from pixelray.engine.evaluate import count_wrong, predict
from pixelray.engine.ladder import search_ladder
from pixelray.models import load_model


def _tiny(images: int, epochs: int, size: int) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The tiny CNN trained on synthetic images, and ``images`` held-out ones (NHWC uint8)."""
    from pixelray.datasets.synthetic import make_synthetic
    from pixelray.train.fit import TrainConfig, fit, load_all

    with tempfile.TemporaryDirectory(prefix="pixelray-bench-") as tmp:
        make_synthetic(os.path.join(tmp, "train"), classes=10, images=2000, size=size, seed=0, rows_per_shard=500)
        make_synthetic(os.path.join(tmp, "held"), classes=10, images=images, size=size, seed=1, rows_per_shard=500)
        model = load_model("tiny", None, num_classes=10, init_seed=0)
        fit(model, os.path.join(tmp, "train"), TrainConfig(epochs=epochs))
        ids, labels, pixels = load_all(os.path.join(tmp, "held"))
    return model, ids, labels, pixels


def _random(name: str, images: int, size: int) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A random-init model and synthetic images labelled by its own predictions."""
    from pixelray.datasets.synthetic import render_synthetic

    model = load_model(name, None, num_classes=1000).eval()
    rng = np.random.default_rng(1)
    pixels = torch.from_numpy(render_synthetic(rng.integers(0, 10, images), classes=10, size=size, rng=rng))
    labels = predict(model, pixels.permute(0, 3, 1, 2), 32)
    return model, torch.arange(images, dtype=torch.int64), labels, pixels


class _Seen:
    """A forward hook counting the images the model is given (an independent count of forward passes)."""

    def __init__(self, model: torch.nn.Module):
        self.images = 0
        model.register_forward_hook(lambda _m, args, _out: self.add(args[0].shape[0]))

    def add(self, n: int) -> None:
        self.images += n


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny", help="'tiny' (trained here) or a torchvision name (random init)")
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=6, help="the tiny CNN's training epochs")
    parser.add_argument("--batch", type=int, default=250)
    parser.add_argument("--counts", default="4,8,16,32,64")
    parser.add_argument("--amplitudes", default="full,10,40,70,127")
    parser.add_argument("--scale", type=int, default=8, help="grid counts x this (32x32 images break later)")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.model == "tiny":
        model, ids, labels, pixels = _tiny(args.images, args.epochs, args.size)
    else:
        model, ids, labels, pixels = _random(args.model, args.images, args.size)
    model = model.eval().to(memory_format=torch.channels_last)
    images = pixels.permute(0, 3, 1, 2)  # NCHW view of NHWC memory, as workers get shards
    keep = predict(model, images, args.batch) == labels  # pixels to failure: images correct unchanged
    images, labels, ids = images[keep], labels[keep], ids[keep]
    n = len(ids)
    seen = _Seen(model)
    out: dict = {"model": args.model, "size": args.size, "images": n, "device": device_name(torch.device("cpu")),
                 "threads": torch.get_num_threads()}
    amplitudes = [a if a == "full" else int(a) for a in args.amplitudes.split(",")]
    cells = [Cell(PixelChange(int(c) * args.scale, a)) for c in args.counts.split(",") for a in amplitudes]
    warm = slice(0, min(n, 16))  # first calls build caches and thread pools: not timed
    count_wrong(model, images[warm], labels[warm], ids[warm], cells, args.batch)
    search_ladder(model, images[warm], labels[warm], ids[warm], Ladder(search="bisect"), args.batch)
    start, seen.images = time.perf_counter(), 0
    wrong = count_wrong(model, images, labels, ids, cells, args.batch)
    out["grid"] = {"cells": len(cells), "passes_per_image": seen.images / n,
                   "s_per_image": (time.perf_counter() - start) / n, "wrong_rate_max": float(wrong.max() / n)}
    for name, ladder in (("scan", Ladder()), ("bisect", Ladder(search="bisect")), ("scan_refine", Ladder(refine=True))):
        start, seen.images = time.perf_counter(), 0
        found = search_ladder(model, images, labels, ids, ladder, args.batch)
        broke = found["n_fail"] >= 0
        out[name] = {
            "points": len(ladder.points(args.size, args.size)),
            "passes_per_image": seen.images / n, "n_passes_mean": float(found["n_passes"].mean()),
            "s_per_image": (time.perf_counter() - start) / n, "broken_share": float(broke.mean()),
            "median_n_fail": float(np.median(np.where(broke, found["n_fail"], np.inf))),
        }
    out["ratio_scan_vs_grid"] = out["scan"]["passes_per_image"] / out["grid"]["passes_per_image"]
    out["ratio_bisect_vs_grid"] = out["bisect"]["passes_per_image"] / out["grid"]["passes_per_image"]
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
