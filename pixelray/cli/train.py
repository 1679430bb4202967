"""``pixelray train-augment``: the few-pixel-change fine-tune on Ray Train, from flags or a TOML config.

A thin shell over :mod:`pixelray.train.driver`: it parses, calls the library, prints.
Exit codes: 0 done; 2 bad input or a failed run (one line on stderr, no traceback).
"""

from __future__ import annotations

from typing import Annotated

import typer

from pixelray.cli.common import fail

__all__ = ["train_augment_cmd"]


def train_augment_cmd(
    config: Annotated[
        str | None, typer.Argument(help="Fine-tune config (TOML), e.g. jobs/table10.toml; flags override it.")
    ] = None,
    model: Annotated[
        str | None, typer.Option("--model", help="resnet101, any torchvision name, tiny, or checkpoint:PATH.")
    ] = None,
    weights: Annotated[
        str | None, typer.Option("--weights", help="imagenet (IMAGENET1K_V1), default, or none (random init).")
    ] = None,
    data: Annotated[str | None, typer.Option("--data", help="Training data set (shards).")] = None,
    eval_data: Annotated[
        str | None, typer.Option("--eval-data", help="Held-out data set (default: a held-out split of --data).")
    ] = None,
    images: Annotated[int | None, typer.Option("--images", help="Training images (default: all).")] = None,
    count: Annotated[int | None, typer.Option("--count", help="Changed pixels per training image.")] = None,
    aug: Annotated[
        str | None, typer.Option("--aug", help="pixels (default), none (the control), gaussian, standard.")
    ] = None,
    head: Annotated[
        str | None, typer.Option("--head", help="keep the model's classes, or replace the last layer.")
    ] = None,
    epochs: Annotated[int | None, typer.Option("--epochs", help="Epochs (default 20).")] = None,
    lr: Annotated[float | None, typer.Option("--lr", help="Learning rate (default 0.001).")] = None,
    batch_size: Annotated[int | None, typer.Option("--batch-size", help="Images per step, all workers.")] = None,
    seed: Annotated[int | None, typer.Option("--seed", help="Seed of the order, the draws and a new head.")] = None,
    workers: Annotated[int | None, typer.Option("--workers", help="Ray Train workers (DDP).")] = None,
    cpu: Annotated[
        bool, typer.Option("--cpu", help="Train on CPU even where the config says [run] use_gpu = true.")
    ] = False,
    out: Annotated[str | None, typer.Option(
        "--out", help="Run directory, or s3://bucket/prefix (overrides the config's output dir).")] = None,
    address: Annotated[
        str, typer.Option("--address", help="'local' starts an embedded Ray; 'auto' or ray://... joins a cluster.")
    ] = "local",
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="A line per epoch.")] = True,
) -> None:
    """Fine-tune a classifier with few-pixel-change augmentation on Ray Train (or resume it).

    Example: pixelray train-augment --model tiny --weights none --data D --count 4 --epochs 2 --out R
    """
    from pixelray.config.sweep import ConfigError
    from pixelray.config.train import load_train_config
    from pixelray.train.driver import TrainError, run_train_augment

    flags = {
        "model": model, "weights": weights, "data": data, "eval_data": eval_data, "images": images,
        "count": count, "aug": aug, "head": head, "epochs": epochs, "lr": lr, "batch_size": batch_size,
        "seed": seed, "workers": workers, "use_gpu": False if cpu else None, "output_dir": out,
    }
    try:
        cfg = load_train_config(config, flags)
        results = run_train_augment(cfg, address=address, log=lambda m: typer.echo(m, err=True), progress=progress)
    except (ConfigError, TrainError) as exc:
        fail(str(exc))
    _summary(results)


def _summary(results) -> None:
    import pandas as pd

    frames = [pd.read_parquet(r.epochs_path).tail(1) for r in results]
    final = pd.concat(frames)[["run", "aug", "epoch", "train_accuracy", "heldout_accuracy", "heldout_wrong_rate"]]
    with pd.option_context("display.width", 120, "display.max_columns", 10):
        typer.echo(final.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    names = ", ".join(f"'checkpoint:{r.run_dir}'" for r in results)
    typer.echo(f"\nsweep them: [models] names = [{names}]")
