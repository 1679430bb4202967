"""What a sweep costs before it runs: ``pixelray plan`` at the paper's size, and its estimate against a real run.

1. ``paper``: a data set of the paper's size (``--images`` 50,000 ImageNet-validation-sized images, 224x224, in
   shards of 1,000; the pixels are zeros, which compress to nothing: the plan reads the footers, ids and labels,
   never the pixels) and ``pixelray plan`` on ``jobs/paper.toml`` and ``jobs/full_grid.toml`` over it, each timed
   as a user runs it (a new process: imports included). It must take under 10 s.
2. ``demo``: the demo's assets (``pixelray demo``'s data and three tiny CNNs), then ``pixelray plan
   jobs/demo.toml --calibrate`` (a pilot of the sweep's own units on 64 images per model) and the sweep itself
   (one worker, embedded Ray): the estimate against the workers' compute seconds in ``stats.json``.

Prints one JSON line.

    python benchmarks/plan.py                       # both
    python benchmarks/plan.py --skip-demo           # the plan's speed only
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
PIXELRAY = [sys.executable, "-m", "pixelray"]


def paper_sized(root: Path, images: int, per_shard: int = 1000) -> Path:
    """A data set of ``images`` 224x224 images (zero pixels, 1,000 classes, ids 0..images-1)."""
    from pixelray.shards import ShardWriter

    data = root / "imagenet-sized"
    zeros = np.zeros((per_shard, 224, 224, 3), dtype=np.uint8)
    with ShardWriter(data, name="imagenet-sized", height=224, width=224, class_names=[f"c{i}" for i in range(1000)],
                     source="benchmarks/plan.py", rows_per_shard=per_shard) as writer:
        for start in range(0, images, per_shard):
            n = min(per_shard, images - start)
            ids = np.arange(start, start + n)
            writer.add(ids, ids % 1000, zeros[:n], [""] * n)
    return data


def timed_plan(*args: str) -> tuple[float, str]:
    start = time.perf_counter()
    done = subprocess.run([*PIXELRAY, "plan", *args], capture_output=True, text=True, cwd=ROOT)
    took = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"pixelray plan {' '.join(args)} failed: {done.stderr}")
    return took, done.stdout


def demo(root: Path) -> dict:
    from pixelray.cli.demo import DEMO_CONFIG, prepare_demo
    from pixelray.config.sweep import load_config
    from pixelray.sweep import run_sweep
    from pixelray.sweep.estimate import estimate_for
    from pixelray.sweep.plan import plan_sweep
    from pixelray.sweep.pool import connect

    connect(None)  # one embedded Ray for the fine-tunes and the sweep
    held, checkpoints = prepare_demo(root, log=lambda line: None)
    os.chdir(root.parent)
    models = [f"checkpoint:{p}" for p in checkpoints]
    overrides = {"data": str(held), "models": tuple(models), "output_dir": str(root / "results")}
    config = load_config(str(DEMO_CONFIG), overrides)

    start = time.perf_counter()
    est, _ = estimate_for(plan_sweep(config), measure=True)
    pilot_s = time.perf_counter() - start
    stats = run_sweep(config, progress=False).stats
    measured = sum(stats["compute_s"].values())
    by_phase = {}
    for phase, seconds in stats["compute_s"].items():
        guess = sum(s for name, s in est.by_phase.items() if name.split(":")[0] == phase)
        by_phase[phase] = {"estimated_s": round(guess, 1), "measured_s": round(seconds, 1)}
    return {"estimated_s": round(est.compute_s, 1), "measured_s": round(measured, 1),
            "ratio": round(est.compute_s / measured, 3), "pilot_s": round(pilot_s, 1), "by_phase": by_phase}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=50_000)
    parser.add_argument("--skip-demo", action="store_true")
    args = parser.parse_args(argv)
    out: dict = {}
    with tempfile.TemporaryDirectory(prefix="pxr-plan-bench-") as tmp:
        tmp = Path(tmp)
        start = time.perf_counter()
        data = paper_sized(tmp, args.images)
        out["data_build_s"] = round(time.perf_counter() - start, 1)
        for config in ("jobs/paper.toml", "jobs/full_grid.toml"):
            took, text = timed_plan(config, "--data", str(data), "--out", str(tmp / "out"))
            first = text.splitlines()[0]
            total = re.search(r"^all models: .*$", text, flags=re.M)[0]
            out[Path(config).stem] = {"plan_s": round(took, 2), "under_10_s": took < 10, "plan": first, "total": total}
            print(f"{config}: {took:.2f} s\n{text}", file=sys.stderr)
        if not args.skip_demo:
            out["demo"] = demo(tmp / "demo-out")
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
