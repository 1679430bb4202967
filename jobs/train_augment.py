"""Ray job entrypoint for the few-pixel-change fine-tune (``pixelray train-augment`` on Ray Train).

    ray job submit --working-dir . -- python jobs/train_augment.py --config jobs/table10.toml --out /shared/table10
    python jobs/train_augment.py --smoke-test      # synthetic data and the tiny CNN, on any machine (in smoke-out/)

Inside a Ray job it joins the job's cluster (address "auto"); run by hand without a cluster
it starts an embedded local Ray. Rerunning the same command resumes every unfinished
fine-tune from its last checkpoint.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from pixelray.cli.demo import SMOKE_DIR
from pixelray.config.sweep import ConfigError
from pixelray.config.tomlcheck import refuse_lost_output
from pixelray.config.train import load_train_config, parse_train_config
from pixelray.errors import one_line
from pixelray.train.driver import TrainError, run_train_augment

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, rich_markup_mode=None)


def _smoke_config(root: Path):
    """A tiny CNN trained briefly on synthetic images, then fine-tuned with 384-pixel changes for 2 epochs."""
    from pixelray.datasets.synthetic import make_synthetic
    from pixelray.models import load_model, save_checkpoint
    from pixelray.train.fit import TrainConfig, fit

    data, held, base = root / "data", root / "heldout", root / "models" / "tiny.pt"
    if not (data / "manifest.json").exists():
        make_synthetic(data, classes=10, images=600, size=32, seed=0, rows_per_shard=200)
    if not (held / "manifest.json").exists():
        make_synthetic(held, classes=10, images=200, size=32, seed=1, rows_per_shard=200)
    if not base.exists():
        model = load_model("tiny", None, num_classes=10, init_seed=0)
        save_checkpoint(fit(model, str(data), TrainConfig(epochs=2)), base, base="tiny")
    return parse_train_config({
        "model": {"name": f"checkpoint:{base}"},
        "data": {"path": str(data), "eval_path": str(held)},
        "augment": {"count": 384},
        "train": {"epochs": 2, "lr": 0.01},
        "output": {"dir": str(root / "runs" / "tiny-aug384")},
    })


@app.command()
def main(
    config: Annotated[str, typer.Option("--config", help="Fine-tune config (TOML).")] = "jobs/table10.toml",
    out: Annotated[str | None, typer.Option(
        "--out", help="Output directory or s3://bucket/prefix (overrides [output] dir).")] = None,
    data: Annotated[str | None, typer.Option("--data", help="Training data (overrides [data] path).")] = None,
    eval_data: Annotated[
        str | None, typer.Option("--eval-data", help="Held-out data (overrides [data] eval_path).")
    ] = None,
    cpu: Annotated[
        bool, typer.Option("--cpu", help="Train on CPU even where the config says [run] use_gpu = true.")
    ] = False,
    smoke_test: Annotated[
        bool, typer.Option("--smoke-test", help="Fine-tune the tiny CNN on synthetic data for 2 epochs "
                           f"(in {SMOKE_DIR}/train-augment unless --out).")
    ] = False,
) -> None:
    """Run (or resume) the fine-tunes of a config as a Ray job."""
    in_job = os.environ.get("RAY_ADDRESS") or os.environ.get("RAY_JOB_ID")
    try:
        if smoke_test:
            root = Path(out or SMOKE_DIR) / "train-augment"
            refuse_lost_output(str(root), uri_ok=False)  # before the smoke test's data and model are written
            cfg = _smoke_config(root)
        else:
            cfg = load_train_config(config, {"output_dir": out, "data": data, "eval_data": eval_data,
                                             "use_gpu": False if cpu else None})
        refuse_lost_output(cfg.output_dir)
        results = run_train_augment(cfg, address="auto" if in_job else "local",
                                    log=lambda m: typer.echo(m, err=True))
    except (ConfigError, TrainError) as exc:
        typer.echo(f"error: {one_line(exc)}", err=True)
        raise typer.Exit(2) from None
    for result in results:
        typer.echo(f"checkpoint:{result.run_dir}")


if __name__ == "__main__":
    app()
