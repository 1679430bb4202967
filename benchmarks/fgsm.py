"""FGSM's cost in forward passes, pixelray's beside torchattacks', on the same model and batch, one run.

Every time is a median over ``--iters`` runs after ``--warmup``, divided by the median time of
one forward pass of the batch (``inference_mode``): the cost "in forward passes". Measured:

* ``fgsm``: :func:`pixelray.attacks.fgsm`, uint8 in, uint8 examples out (one forward and one
  backward to the input);
* ``sweep_run``: what a sweep runs per batch, ``FGSM.run``: the examples and the verdict on
  the uint8 examples (one more forward pass); ``sweep_run_float``: the same with
  ``[attack] report_float = true`` (the unrounded examples judged too: one more);
* ``torchattacks``: ``torchattacks.FGSM`` on the float batch, rounded to uint8 like ours; and
  ``torchattacks_with_verdict``: plus a forward pass on its uint8 examples, the work of
  ``sweep_run``.

The model is a random-init ``pixelray.models.load_model`` Classifier (normalisation inside):
no weights are read or downloaded. Prints one JSON line.

Usage:
    python benchmarks/fgsm.py                                    # resnet18, batch 32, 224x224, CPU
    python benchmarks/fgsm.py --device cuda --batch 256 --amp    # GPU, fp16 autocast
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os

import torch
from timing import device_name, median_seconds

from pixelray.attacks import FGSM, fgsm, to_uint8
from pixelray.models import load_model


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18", help="a pixelray model spec (torchvision name, tiny)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=224, help="image side in pixels")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--amp", action="store_true", help="autocast: bfloat16 on CPU, float16 on CUDA")
    parser.add_argument("--eps", type=float, default=4 / 255)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--no-torchattacks", action="store_true", help="skip torchattacks (a dev dependency)")
    args = parser.parse_args(argv)
    if args.batch < 1 or args.size < 16 or args.iters < 1 or args.warmup < 0:
        parser.error("--batch and --iters must be >= 1, --size >= 16 and --warmup >= 0")
    if args.threads:
        torch.set_num_threads(args.threads)

    device = torch.device(args.device)
    model = load_model(args.model, weights=None).to(device)
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (args.batch, 3, args.size, args.size), generator=gen, dtype=torch.uint8)
    labels = torch.randint(0, model.num_classes, (args.batch,), generator=gen)
    images, labels = images.to(device), labels.to(device)
    ids = torch.arange(args.batch, device=device)

    amp_dtype = torch.float16 if device.type == "cuda" else torch.bfloat16

    def autocast() -> contextlib.AbstractContextManager:
        return torch.autocast(device.type, dtype=amp_dtype) if args.amp else contextlib.nullcontext()

    def forward() -> None:
        with torch.inference_mode(), autocast():
            model(images)

    def time(fn) -> float:
        def run() -> None:
            with autocast():
                fn()
        return median_seconds(run, args.iters, args.warmup, device)

    t_forward = median_seconds(forward, args.iters, args.warmup, device)
    timings = {
        "fgsm": time(lambda: fgsm(model, images, labels, args.eps)),
        "sweep_run": time(lambda: FGSM.run(model, images, labels, ids, args.eps, report_float=False)),
        "sweep_run_float": time(lambda: FGSM.run(model, images, labels, ids, args.eps, report_float=True)),
    }
    if not args.no_torchattacks:
        import torchattacks  # a dev dependency

        unit = images.float() / 255
        atk = torchattacks.FGSM(model, eps=args.eps)

        def with_verdict() -> None:
            adv = to_uint8(atk(unit, labels))
            with torch.inference_mode():
                model(adv).argmax(1)

        timings["torchattacks"] = time(lambda: to_uint8(atk(unit, labels)))
        timings["torchattacks_with_verdict"] = time(with_verdict)
    result = {
        "benchmark": "fgsm",
        "model": args.model,
        "device": str(device),
        "device_name": device_name(device),
        "batch": args.batch,
        "size": args.size,
        "amp": str(amp_dtype).removeprefix("torch.") if args.amp else None,
        "threads": torch.get_num_threads() if device.type == "cpu" else None,
        "eps": round(args.eps, 6),
        "forward_s": round(t_forward, 4),
        **{f"{name}_cost_in_forwards": round(seconds / t_forward, 3) for name, seconds in timings.items()},
    }
    if "torchattacks" in timings:
        result["speed_vs_torchattacks"] = round(timings["torchattacks"] / timings["fgsm"], 3)
        result["sweep_run_speed_vs_torchattacks_with_verdict"] = round(
            timings["torchattacks_with_verdict"] / timings["sweep_run"], 3)
    result["load_average"] = round(os.getloadavg()[0], 2)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
