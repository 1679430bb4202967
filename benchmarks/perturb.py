"""Perturbation throughput beside one ResNet-18 forward pass on the same batch.

The goal (DESIGN.md): applying a cell's pixel change costs under 2% of the forward pass it feeds.
Measures ``apply_pixel_changes`` on a uint8 batch in NHWC and in NCHW channels_last, its two parts
(the clone of the batch and ``draw_positions``), and ``torchvision.models.resnet18(weights=None)``
in eval mode, inference_mode, channels_last, on float input made from the same batch. Prints one
JSON line: median seconds per batch, images/s, and perturbation / forward ratios. The default run
takes under a minute on 2 CPU cores; on a loaded machine both sides slow down, the ratio less so.

    python benchmarks/perturb.py                       # CPU, batch 256, count 64, 224x224
    python benchmarks/perturb.py --device cuda --batch 512
"""

from __future__ import annotations

import argparse
import json
import platform
import sys

import torch
from timing import median_seconds

from pixelray.perturb import apply_pixel_changes, draw_positions
from pixelray.spec import Cell, PixelChange


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="torch device (cpu, cuda, cuda:1, ...)")
    parser.add_argument("--batch", type=int, default=256, help="images per batch")
    parser.add_argument("--count", type=int, default=64, help="changed pixels per image")
    parser.add_argument("--size", type=int, default=224, help="image side")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs of each perturbation")
    parser.add_argument("--forward-repeats", type=int, default=3, help="timed runs of the forward pass")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random images and the cell")
    args = parser.parse_args(argv)

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    gen = torch.Generator().manual_seed(args.seed)
    nhwc = torch.randint(0, 256, (args.batch, args.size, args.size, 3), generator=gen, dtype=torch.uint8).to(device)
    nchw_cl = nhwc.permute(0, 3, 1, 2)  # NCHW shape, channels_last memory
    assert nchw_cl.is_contiguous(memory_format=torch.channels_last)
    ids = torch.arange(args.batch, dtype=torch.int64, device=device) + 1_000_000
    cell = Cell(PixelChange(count=args.count), seed=args.seed)

    reps, warm = args.repeats, 1
    result: dict = {
        "benchmark": "perturb",
        "device": str(device),
        "threads": torch.get_num_threads(),
        "batch": args.batch,
        "count": args.count,
        "size": args.size,
        "perturb_nhwc_s": median_seconds(lambda: apply_pixel_changes(nhwc, cell, ids), reps, warm, device),
        "perturb_nchw_cl_s": median_seconds(lambda: apply_pixel_changes(nchw_cl, cell, ids), reps, warm, device),
        "clone_s": median_seconds(lambda: nhwc.clone(), reps, warm, device),
        "draw_positions_s": median_seconds(lambda: draw_positions(cell, ids, args.size, args.size), reps, warm, device),
    }

    import torchvision  # only the forward pass needs it

    model = torchvision.models.resnet18(weights=None).eval().to(device=device, memory_format=torch.channels_last)
    batch = nchw_cl.float().div_(255).contiguous(memory_format=torch.channels_last)

    def forward(x: torch.Tensor = batch) -> None:
        with torch.inference_mode():
            model(x)

    forward(batch[: max(1, args.batch // 8)])  # warm-up on a slice: a full extra pass would double the runtime
    result["resnet18_forward_s"] = median_seconds(forward, args.forward_repeats, 0, device)
    forward_s = result["resnet18_forward_s"]
    for name in ("nhwc", "nchw_cl"):
        seconds = result[f"perturb_{name}_s"]
        result[f"perturb_{name}_images_per_s"] = args.batch / seconds
        result[f"ratio_{name}"] = seconds / forward_s
    result["resnet18_images_per_s"] = args.batch / forward_s
    result["goal_ratio"] = 0.02
    result["goal_met"] = max(result["ratio_nhwc"], result["ratio_nchw_cl"]) < result["goal_ratio"]
    result["torch"] = torch.__version__
    result["python"] = platform.python_version()
    result = {k: round(v, 6) if isinstance(v, float) else v for k, v in result.items()}
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")
    return result


if __name__ == "__main__":
    main()
