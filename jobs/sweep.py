"""Ray job entrypoint for a grid sweep.

    ray job submit --working-dir . -- python jobs/sweep.py --config jobs/paper.toml --out s3://bucket/paper
    python jobs/sweep.py --smoke-test          # synthetic data and tiny models, on any machine (in smoke-out/)
    python jobs/sweep.py --config jobs/paper.toml --plan   # what it would do (pixelray plan), no model runs

Inside a Ray job the sweep joins the job's cluster (address "auto"); run by hand
without a cluster it starts an embedded local Ray. It takes the run options of
``pixelray sweep`` (the same definitions), plus ``--config``, ``--smoke-test`` and ``--plan``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from pixelray.cli.demo import DEMO_CONFIG, SMOKE_DIR, prepare_demo
from pixelray.cli.main import (
    SweepAddress,
    SweepData,
    SweepMetricsLinger,
    SweepMetricsPort,
    SweepOut,
    SweepProgress,
    SweepSaveAdversarial,
    sweep_overrides,
)
from pixelray.config.sweep import ConfigError, load_config
from pixelray.config.tomlcheck import refuse_lost_output
from pixelray.errors import one_line
from pixelray.sweep import SweepError, run_sweep
from pixelray.train.driver import TrainError

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, rich_markup_mode=None)



@app.command()
def main(
    config: Annotated[str, typer.Option("--config", help="Sweep config (TOML).")] = "jobs/paper.toml",
    out: SweepOut = None,
    data: SweepData = None,
    address: SweepAddress = None,
    metrics_port: SweepMetricsPort = None,
    metrics_linger: SweepMetricsLinger = None,
    progress: SweepProgress = True,
    save_adversarial: SweepSaveAdversarial = None,
    smoke_test: Annotated[
        bool, typer.Option("--smoke-test", help=f"Run jobs/demo.toml on synthetic data and tiny models "
                           f"(in {SMOKE_DIR}/ unless --out).")
    ] = False,
    plan: Annotated[
        bool, typer.Option("--plan", help="Print what the sweep would do (pixelray plan) and run nothing.")
    ] = False,
) -> None:
    """Run (or resume) a sweep as a Ray job (--address: default 'auto' inside a Ray job, else 'local')."""
    overrides = sweep_overrides(out, data, metrics_port, metrics_linger, save_adversarial)
    in_job = os.environ.get("RAY_ADDRESS") or os.environ.get("RAY_JOB_ID")
    address = address or ("auto" if in_job else "local")
    try:
        if smoke_test:
            root = Path(out or SMOKE_DIR)
            refuse_lost_output(str(root))  # before the smoke test's data and models are written there
            data_dir, checkpoints = prepare_demo(root, images=600, heldout=300, epochs=3, finetune_epochs=2,
                                                 address=address)
            config = str(DEMO_CONFIG)  # the package's copy (jobs/demo.toml links to it)
            overrides.update(
                data=str(data_dir),
                models=tuple(f"checkpoint:{p}" for p in checkpoints),
                output_dir=str(root / "results"),
            )
        cfg = load_config(config, overrides)
        if plan:
            from pixelray.sweep.estimate import estimate_for, format_estimate
            from pixelray.sweep.plan import check_cost, format_plan, plan_sweep

            planned = plan_sweep(cfg)
            typer.echo(format_plan(planned))
            found = estimate_for(planned)  # from [run] throughput, where the config has it
            if found is not None:
                typer.echo(format_estimate(*found))
            check_cost(planned)
            return
        refuse_lost_output(cfg.output_dir)
        result = run_sweep(cfg, progress=progress, log=lambda m: typer.echo(m, err=True), address=address)
    except (ConfigError, SweepError, TrainError) as exc:
        typer.echo(f"error: {one_line(exc)}", err=True)
        raise typer.Exit(getattr(exc, "exit_code", 2)) from None  # SweepStopped (ray job stop): 128 + SIGTERM
    typer.echo(f"results: {result.cells_path}")


if __name__ == "__main__":
    app()
