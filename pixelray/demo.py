"""Assets for the demo and smoke tests: a synthetic data set and two small models trained on it.

``prepare_demo(root)`` makes ``root/data`` (synthetic shards) and two checkpoints
of the tiny CNN: ``tiny.pt`` (plain training) and ``tiny-aug4.pt`` (trained with
4-pixel-change augmentation, the paper's repair), so the demo sweep shows both
the damage and the repair. Existing assets are reused.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["DEMO_CONFIG", "DEMO_MODELS", "prepare_demo"]

#: checkpoint file -> augmentation count (None = plain training)
DEMO_MODELS = {"tiny.pt": None, "tiny-aug4.pt": 4}

#: The demo sweep's config, shipped in the package (``jobs/demo.toml`` is a link to it), so that
#: ``pixelray demo`` works from any directory.
DEMO_CONFIG = Path(__file__).resolve().parent / "configs" / "demo.toml"


def prepare_demo(
    root: str | Path, *, images: int = 2000, size: int = 32, epochs: int = 6, log=print
) -> tuple[Path, list[Path]]:
    """Build (or reuse) the demo data set and checkpoints under ``root``; returns (data dir, checkpoints)."""
    from pixelray.datasets.synthetic import make_synthetic
    from pixelray.models import load_model, save_checkpoint
    from pixelray.shards import load_manifest
    from pixelray.spec import PixelChange
    from pixelray.train import TrainConfig, fit

    root = Path(root)
    data = root / "data"
    if not (data / "manifest.json").exists():
        log(f"making the synthetic data set in {data} ({images} images, {size}x{size}) ...")
        make_synthetic(data, classes=10, images=images, size=size, seed=0, rows_per_shard=250)
    manifest = load_manifest(str(data))
    checkpoints = []
    for name, aug in DEMO_MODELS.items():
        path = root / "models" / name
        if not path.exists():
            how = f"{epochs} epochs" + (f", {aug}-pixel-change augmentation" if aug else "")
            log(f"training {name} on the synthetic data ({how}) ...")
            model = load_model("tiny", None, num_classes=manifest.num_classes, init_seed=0)
            config = TrainConfig(epochs=epochs, augment=PixelChange(aug) if aug else None)
            fit(model, str(data), config)
            save_checkpoint(model, path, base="tiny", metadata={"data": str(data), "augment_count": aug})
        checkpoints.append(path)
    return data, checkpoints
