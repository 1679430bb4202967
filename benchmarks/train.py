"""Fine-tune throughput: train-augment on Ray Train against a plain loop, and the augmentation's share of a step.

On the same model, data and settings (one worker, the same torch threads, batches, augmentation
and optimiser):

* plain loop: the fine-tune in one process, data already in memory: the ceiling (run before Ray starts
  and again after train-augment; the faster run counts);
* train-augment (Ray Train, one worker, ``run_train_augment``): images/s over the epochs' training
  time, from its ``epochs.parquet``; ``ratio`` = train-augment / plain loop (goal >= 0.85). Ray's
  start-up is reported apart: ``ray_init_s`` (joining or starting Ray), ``trainer_startup_s`` (from
  ``fit()`` to the first step: controller, worker, process group, data, model), and the whole
  ``end_to_end_s``; the per-epoch evaluation and checkpoint (``eval_s``) are not training time;
* augmentation share: in an extra epoch of the plain loop timed step by step (with a device sync
  around each part), the time of ``augment_batch`` over the time of the whole step (goal <= 3%).

Prints one JSON line. CPU default: the tiny CNN on 32x32 synthetic images (about 2 minutes on 2 cores)::

    python benchmarks/train.py
    python benchmarks/train.py --model resnet18 --size 224 --images 256 --batch 32      # a real network on CPU
    python benchmarks/train.py --device cuda --model resnet101 --size 224 --images 2048 --batch 64 --amp  # GPU, bf16
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pixelray.core.augment import Aug, Augmentation, augment_batch, epoch_seed  # noqa: E402
from pixelray.core.spec import PixelChange  # noqa: E402
from pixelray.cpu_memory import use_huge_pages_here  # noqa: E402
from pixelray.datasets.synthetic import make_synthetic  # noqa: E402
from pixelray.models import load_model  # noqa: E402
from pixelray.train.fit import load_all  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def plain_loop(args, data: str, device: torch.device) -> dict:
    """The fine-tune as one plain loop: images/s over the epochs, then the augmentation's share of a step."""
    ids, labels, images = (t.to(device) for t in load_all(data))
    model = load_model(args.model, None, num_classes=10, init_seed=0).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    model.requires_grad_(True)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    aug = Augmentation(Aug.PIXELS, PixelChange(args.count))
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp)

    def step(pick, epoch, timed=False):
        x, i = images[pick], ids[pick]  # the batch (not augmentation)
        t0 = time.perf_counter()
        batch, _ = augment_batch(x, i, aug, 0, epoch)
        if timed:
            _sync(device)
        t1 = time.perf_counter()
        with autocast:
            logits = model(batch)
        loss = torch.nn.functional.cross_entropy(logits.float(), labels[pick])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if timed:
            _sync(device)
        return t1 - t0, time.perf_counter() - t0

    def order(epoch):
        return torch.randperm(len(ids), generator=torch.Generator().manual_seed(epoch_seed(0, epoch) * 64)).to(device)

    _sync(device)
    seconds = 0.0
    for epoch in range(1, args.epochs + 1):
        perm = order(epoch)
        start = time.perf_counter()
        for s in range(0, len(ids), args.batch):
            step(perm[s:s + args.batch], epoch)
        _sync(device)
        seconds += time.perf_counter() - start
    perm = order(args.epochs + 1)
    parts = [step(perm[s:s + args.batch], args.epochs + 1, timed=True) for s in range(0, len(ids), args.batch)]
    aug_s, step_s = sum(p[0] for p in parts), sum(p[1] for p in parts)
    return {"images_per_s": args.epochs * len(ids) / seconds, "seconds": seconds, "aug_share": aug_s / step_s,
            "aug_ms_per_step": 1000 * aug_s / len(parts), "step_ms": 1000 * step_s / len(parts)}


def train_augment(args, data: str, held: str, out: Path) -> dict:
    from pixelray.config.train import parse_train_config
    from pixelray.sweep import connect
    from pixelray.train.driver import run_train_augment

    t0 = time.perf_counter()
    connect(None if args.address == "local" else args.address)
    ray_init_s = time.perf_counter() - t0
    cfg = parse_train_config({
        "model": {"name": args.model, "weights": "none"},
        "data": {"path": data, "eval_path": held},
        "augment": {"count": args.count},
        "train": {"epochs": args.epochs, "lr": args.lr, "batch_size": args.batch, "seed": 0},
        "run": {"workers": 1, "threads": args.threads, "use_gpu": args.device == "cuda", "amp": args.amp},
        "output": {"dir": str(out)},
    })
    t1 = time.perf_counter()
    (result,) = run_train_augment(cfg, progress=False)
    end_to_end = time.perf_counter() - t1
    epochs = pd.read_parquet(result.epochs_path)
    return {
        "images_per_s": epochs.n_train.sum() / epochs.seconds.sum(), "seconds": epochs.seconds.sum(),
        "ray_init_s": ray_init_s, "trainer_startup_s": epochs.started.iloc[0] - result.timing["fit_started"],
        "eval_s": epochs.eval_seconds.sum(), "end_to_end_s": end_to_end, "n_train": int(epochs.n_train.iloc[0]),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny", help="tiny or a torchvision name (random init)")
    ap.add_argument("--images", type=int, default=2000, help="synthetic training images")
    ap.add_argument("--eval-images", type=int, default=100, help="held-out images scored after each epoch")
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--count", type=int, default=4, help="changed pixels per training image")
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--threads", type=int, default=1, help="torch threads, in the plain loop and the worker")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--amp", action="store_true", help="bf16 autocast")
    ap.add_argument("--address", default="local", help="'local' (embedded Ray), 'auto' or an address")
    args = ap.parse_args()
    use_huge_pages_here()  # like for like: the plain loop gets the memory the Ray Train workers ask for
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    tmp = Path(tempfile.mkdtemp(prefix="pxtrain"))
    report: dict = {"benchmark": "train", "model": args.model, "device": args.device, "size": args.size,
                    "epochs": args.epochs, "batch": args.batch, "count": args.count, "threads": args.threads,
                    "amp": args.amp}
    if device.type == "cuda":
        report["gpu"] = torch.cuda.get_device_name(device)
    try:
        data, held = tmp / "data", tmp / "heldout"
        make_synthetic(data, classes=10, images=args.images, size=args.size, seed=0, rows_per_shard=500)
        make_synthetic(held, classes=10, images=args.eval_images, size=args.size, seed=1, rows_per_shard=500)
        # the same images (train-augment trains on all of them); the plain loop runs before Ray starts and
        # again after it, and the faster of the two is the ceiling
        first = plain_loop(args, str(data), device)
        ray = train_augment(args, str(data), str(held), tmp / "run")
        plain = max(first, plain_loop(args, str(data), device), key=lambda p: p["images_per_s"])
        report.update({
            "images": ray["n_train"],
            "images_per_s_plain": round(plain["images_per_s"], 1),
            "images_per_s_train_augment": round(ray["images_per_s"], 1),
            "ratio": round(ray["images_per_s"] / plain["images_per_s"], 3),
            "ray_init_s": round(ray["ray_init_s"], 2), "trainer_startup_s": round(ray["trainer_startup_s"], 2),
            "eval_and_checkpoint_s": round(ray["eval_s"], 2), "end_to_end_s": round(ray["end_to_end_s"], 2),
            "aug_share": round(plain["aug_share"], 4), "aug_ms_per_step": round(plain["aug_ms_per_step"], 3),
            "step_ms": round(plain["step_ms"], 2),
        })
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
