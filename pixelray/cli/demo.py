"""Assets for the demo and smoke tests: synthetic data, a base model, and its fine-tunes on Ray Train.

``prepare_demo(root)`` makes ``root/data`` (synthetic training shards), ``root/heldout``
(synthetic images the models never train on), the base model ``root/models/tiny.pt`` (the
tiny CNN trained plainly, in-process) and two fine-tunes of it made with
``pixelray train-augment`` (one worker, on the embedded local Ray): ``tiny-none`` (the
fine-tune alone, ``aug = "none"``: the control) and ``tiny-aug<count>`` (the same fine-tune
with ``count``-pixel-change augmentation: the paper's repair). The demo sweep then shows the
base, the control and the augmented model side by side on the held-out images. Existing
assets are reused.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["DEMO_CONFIG", "DEMO_COUNT", "SMOKE_DIR", "prepare_demo"]

#: Changed pixels per training image of the demo's augmented fine-tune (of 32 x 32 = 1,024): the
#: tiny CNN on the synthetic images shrugs off a few pixels, and breaks from a quarter of them up.
DEMO_COUNT = 384

#: The demo sweep's config, shipped in the package (``jobs/demo.toml`` is a link to it), so that
#: ``pixelray demo`` works from any directory.
DEMO_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.toml"

#: Where the job entry points' ``--smoke-test`` (jobs/sweep.py, jobs/train_augment.py) work without --out:
#: a folder of their own, never ``pixelray demo``'s demo-out/ (made with other sizes and epochs, whose
#: fine-tunes a smoke test would refuse as runs of another config).
SMOKE_DIR = "smoke-out"


def prepare_demo(
    root: str | Path,
    *,
    images: int = 2000,
    heldout: int = 500,
    size: int = 32,
    epochs: int = 6,
    finetune_epochs: int = 3,
    count: int = DEMO_COUNT,
    address: str | None = None,
    log=print,
) -> tuple[Path, list[Path]]:
    """Build (or reuse) the demo assets under ``root``; returns (held-out data dir, [base, control, augmented]).

    The base and fine-tunes are ``checkpoint:`` targets: a state_dict file and two run directories.
    """
    from pixelray.config.train import parse_train_config
    from pixelray.datasets.synthetic import make_synthetic
    from pixelray.models import load_model, save_checkpoint
    from pixelray.shards import load_manifest
    from pixelray.train.driver import run_train_augment
    from pixelray.train.fit import TrainConfig, fit

    root = Path(root)
    data, held = root / "data", root / "heldout"
    for folder, n, seed in ((data, images, 0), (held, heldout, 1)):
        if not (folder / "manifest.json").exists():
            log(f"making synthetic images in {folder} ({n} images, {size}x{size}) ...")
            make_synthetic(folder, classes=10, images=n, size=size, seed=seed, rows_per_shard=250)
    manifest = load_manifest(str(data))
    base = root / "models" / "tiny.pt"
    if not base.exists():
        log(f"training the base model {base.name} on the synthetic data ({epochs} epochs, in-process) ...")
        model = load_model("tiny", None, num_classes=manifest.num_classes, init_seed=0)
        fit(model, str(data), TrainConfig(epochs=epochs))
        save_checkpoint(model, base, base="tiny", metadata={"data": str(data)})
    runs = {"none": root / "models" / "tiny-none", "pixels": root / "models" / f"tiny-aug{count}"}
    for aug, out in runs.items():
        log(f"fine-tuning {base.name} with train-augment (aug = {aug!r}, {finetune_epochs} epochs) -> {out}")
        config = parse_train_config({
            "model": {"name": f"checkpoint:{base}"},
            "data": {"path": str(data), "eval_path": str(held)},
            "augment": {"aug": aug, "count": count},
            "train": {"epochs": finetune_epochs, "lr": 0.01, "batch_size": 32, "seed": 0},
            "run": {"workers": 1},
            "output": {"dir": str(out)},
        })
        run_train_augment(config, address=address, log=log)
    return held, [base, *runs.values()]
