"""Ray job entrypoint for a grid sweep.

    ray job submit --working-dir . -- python jobs/sweep.py --config jobs/paper.toml
    python jobs/sweep.py --smoke-test          # synthetic data and tiny models, on any machine

Inside a Ray job the sweep joins the job's cluster (address "auto"); run by hand
without a cluster it starts an embedded local Ray.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from pixelray.config.sweep import ConfigError, load_config
from pixelray.sweep import SweepError, run_sweep
from pixelray.train.driver import TrainError

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


@app.command()
def main(
    config: Annotated[str, typer.Option("--config", help="Sweep config (TOML).")] = "jobs/paper.toml",
    out: Annotated[str | None, typer.Option("--out", help="Output directory (overrides [output] dir).")] = None,
    data: Annotated[str | None, typer.Option("--data", help="Data path (overrides [data] path).")] = None,
    smoke_test: Annotated[
        bool, typer.Option("--smoke-test", help="Run jobs/demo.toml on synthetic data and tiny models.")
    ] = False,
    metrics_port: Annotated[int | None, typer.Option("--metrics-port", help="Prometheus port on 127.0.0.1.")] = None,
) -> None:
    """Run (or resume) a sweep as a Ray job."""
    overrides = {"output_dir": out, "data": data, "metrics_port": metrics_port}
    in_job = os.environ.get("RAY_ADDRESS") or os.environ.get("RAY_JOB_ID")
    try:
        if smoke_test:
            from pixelray.cli.demo import DEMO_CONFIG, prepare_demo

            root = Path(out or "demo-out")
            data_dir, checkpoints = prepare_demo(root, images=600, heldout=300, epochs=3, finetune_epochs=2,
                                                 address="auto" if in_job else "local")
            config = str(DEMO_CONFIG)  # the package's copy (jobs/demo.toml links to it)
            overrides.update(
                data=str(data_dir),
                models=tuple(f"checkpoint:{p}" for p in checkpoints),
                output_dir=str(root / "results"),
            )
        cfg = load_config(config, overrides)
        _refuse_lost_output(cfg.output_dir)
        result = run_sweep(cfg, progress=True, log=lambda m: typer.echo(m, err=True),
                           address="auto" if in_job else "local")
    except (ConfigError, SweepError, TrainError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    typer.echo(f"results: {result.cells_path}")


def _refuse_lost_output(output_dir: str) -> None:
    """A relative output inside an uploaded working directory (``--working-dir``) is deleted with it by Ray."""
    uploaded = "runtime_resources" in Path.cwd().parts or "working_dir_files" in str(Path.cwd())
    if uploaded and "://" not in output_dir and not Path(output_dir).is_absolute():
        raise ConfigError(f"[output] dir = {output_dir!r} is relative, and this job runs in the copy of its "
                          f"working directory that Ray deletes after the job ({Path.cwd()}); give an absolute "
                          "path on storage every node shares, or an s3:// URI (--out)")


if __name__ == "__main__":
    app()
