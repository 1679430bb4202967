"""FGSM throughput beside a forward pass on the same model and batch.

Prints one JSON line: images/s of ``pixelray.attacks.fgsm`` (uint8 in, uint8 out: one
forward and one backward to the input), of a forward pass under ``torch.inference_mode``,
their ratio (the cost of FGSM in forward passes, about 2-3), and with ``--torchattacks``
of ``torchattacks.FGSM`` on the same float batch (DESIGN: pixelray's FGSM must run at least
as fast).

The model is a random-init ``pixelray.models.load_model`` Classifier (normalisation inside,
parameters frozen): no weights are read or downloaded. The timings are medians over
``--iters`` runs after ``--warmup`` runs.

Usage:
    python benchmarks/fgsm.py                                  # resnet18, batch 32, 224x224, CPU
    python benchmarks/fgsm.py --device cuda --batch 256 --amp --torchattacks  # GPU, fp16 autocast
"""

from __future__ import annotations

import argparse
import contextlib
import json

import torch
from timing import median_seconds

from pixelray.attacks import fgsm, to_uint8
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
    parser.add_argument("--torchattacks", action="store_true", help="also time torchattacks.FGSM")
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

    amp_dtype = torch.float16 if device.type == "cuda" else torch.bfloat16

    def autocast() -> contextlib.AbstractContextManager:
        if not args.amp:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=amp_dtype)

    def forward() -> None:
        with torch.inference_mode(), autocast():
            model(images)

    def attack() -> None:
        with autocast():
            fgsm(model, images, labels, args.eps)

    t_forward = median_seconds(forward, args.iters, args.warmup, device)
    t_fgsm = median_seconds(attack, args.iters, args.warmup, device)
    result = {
        "model": args.model,
        "device": str(device),
        "batch": args.batch,
        "size": args.size,
        "amp": str(amp_dtype).removeprefix("torch.") if args.amp else None,
        "threads": torch.get_num_threads() if device.type == "cpu" else None,
        "eps": args.eps,
        "forward_images_per_s": round(args.batch / t_forward, 2),
        "fgsm_images_per_s": round(args.batch / t_fgsm, 2),
        "fgsm_cost_in_forwards": round(t_fgsm / t_forward, 3),
    }

    if args.torchattacks:
        import torchattacks  # a dev dependency

        unit = images.float() / 255
        atk = torchattacks.FGSM(model, eps=args.eps)

        def theirs() -> None:  # float in (ours converts uint8 inside its timing), rounded like ours
            with autocast():
                to_uint8(atk(unit, labels))

        t_theirs = median_seconds(theirs, args.iters, 0, device)  # the model's kernels are warm by now
        result["torchattacks_images_per_s"] = round(args.batch / t_theirs, 2)
        result["speed_vs_torchattacks"] = round(t_theirs / t_fgsm, 3)

    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
