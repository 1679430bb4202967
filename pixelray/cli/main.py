"""The ``pixelray`` command line (typer). A thin shell: it parses, calls the library, prints."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from pixelray import __version__
from pixelray.cli.cell import cell_app
from pixelray.cli.common import fail
from pixelray.cli.data import data_app, prepare_app
from pixelray.cli.models import weights_app
from pixelray.cli.train import train_augment_cmd
from pixelray.core.metrics import pixel_index, pixel_index_interval, wilson_interval
from pixelray.core.spec import PixelChange

app = typer.Typer(
    name="pixelray",
    help="Measure and repair the robustness of image classifiers to a few random pixel changes.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # plain help: Rich markup would eat "[output]" and the like
    add_completion=False,
)
app.add_typer(weights_app, name="weights")
app.add_typer(data_app, name="data")
app.add_typer(prepare_app, name="prepare")
app.command("train-augment")(train_augment_cmd)
app.add_typer(cell_app, name="cell")


def _version(value: bool) -> None:
    if value:
        typer.echo(f"pixelray {__version__}")
        raise typer.Exit()


#: The commands that compute with torch in the CLI's own process (the demo's base model, data check's model,
#: cell show's draws, train-augment's checks of the model): the process latches huge pages for itself before
#: torch allocates. The others (pixel-index, sweep, report, weights) do not import torch for it: they start
#: in a fraction of a second.
IN_PROCESS_TORCH = frozenset({"demo", "data", "cell", "train-augment"})


@app.callback()
def main(
    ctx: typer.Context,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Measure and repair the robustness of image classifiers to a few random pixel changes."""
    if ctx.invoked_subcommand in IN_PROCESS_TORCH:  # this process's CPU work; its Ray workers get theirs from Ray
        from pixelray.cpu_memory import use_huge_pages_here

        use_huge_pages_here()


def parse_amplitude(value: str) -> int | str:
    """'full' or an integer 1..255, from a command-line string."""
    return "full" if value.lower() == "full" else int(value) if value.isdigit() else value


@app.command("pixel-index")
def pixel_index_cmd(
    wrong: Annotated[int, typer.Option("--wrong", help="Misclassified images after the change.")],
    images: Annotated[int, typer.Option("--images", help="Images evaluated.")],
    count: Annotated[int, typer.Option("--count", help="Changed pixels per image (n).")],
    amplitude: Annotated[
        str, typer.Option("--amplitude", help="'full' (replace by 0..255) or a shift a in 1..255.")
    ] = "full",
    area: Annotated[
        int | None, typer.Option("--area", help="Side of the centred square changed (default: whole image).")
    ] = None,
    size: Annotated[int, typer.Option("--size", help="Image side in pixels (square images).")] = 224,
) -> None:
    """Pixel-index Pi = w / (p x r x a) and its 95% Wilson interval.

    Example: pixelray pixel-index --wrong 352 --images 10000 --count 64
    """
    for flag, value in (("--size", size), ("--images", images)):
        if value < 1:
            fail(f"{flag} {value}: must be an integer >= 1")
    if not 0 <= wrong <= images:
        fail(f"--wrong {wrong}: must be in 0..--images ({images})")
    try:
        change = PixelChange(count=count, amplitude=parse_amplitude(amplitude), area=area)
        change.check_image(size, size)
        pi = pixel_index(wrong, images, count, change.amplitude, area, size)
        low, high = pixel_index_interval(wrong, images, count, change.amplitude, area, size)
        w_low, w_high = wilson_interval(wrong, images)
    except ValueError as exc:
        fail(str(exc))
    typer.echo(f"Pi = {pi:.2f}  (95% CI {low:.2f} .. {high:.2f})")
    typer.echo(f"w = {wrong / images:.4%}  (95% CI {w_low:.4%} .. {w_high:.4%}), n = {count}, "
               f"amplitude = {change.amplitude}, area = {area or size}, image = {size}x{size}")


# The run options of `pixelray sweep`, shared with its Ray job entry point jobs/sweep.py (which adds --config
# and --smoke-test); tests/test_entry_points.py checks that the two take the same ones.
SweepOut = Annotated[str | None, typer.Option("--out", help="Output directory (overrides [output] dir).")]
SweepData = Annotated[str | None, typer.Option("--data", help="Data set: shards or a URI (overrides [data] path).")]
SweepAddress = Annotated[
    str | None,
    typer.Option("--address", help="'local' starts an embedded Ray; 'auto' or ray://... joins a cluster."),
]
SweepMetricsPort = Annotated[
    int | None,
    typer.Option("--metrics-port", help="Serve Prometheus metrics on 127.0.0.1:PORT (0 = any free port)."),
]
SweepMetricsLinger = Annotated[
    float | None,
    typer.Option("--metrics-linger", help="Seconds the metrics endpoint stays up after the last table "
                 "is written, for a final scrape (default 5; [run] metrics_linger)."),
]
SweepProgress = Annotated[bool, typer.Option("--progress/--no-progress", help="Show a progress bar.")]
SweepSaveAdversarial = Annotated[
    str | None,
    typer.Option(
        "--save-adversarial",
        help="Write the attacks' adversarial examples as pixelray shards under DIR/<attack>/<model>/eps<k>/ "
        "(overrides [output] save_adversarial).",
        metavar="DIR",
    ),
]


def sweep_overrides(out, data, metrics_port, metrics_linger, save_adversarial) -> dict:
    """The sweep options as :func:`pixelray.config.sweep.load_config` overrides (None: the config's value)."""
    return {"output_dir": out, "data": data, "metrics_port": metrics_port, "metrics_linger": metrics_linger,
            "save_adversarial": save_adversarial}


@app.command("sweep")
def sweep_cmd(
    config: Annotated[str, typer.Argument(help="Sweep config (TOML), e.g. jobs/paper.toml.")],
    out: SweepOut = None,
    data: SweepData = None,
    address: SweepAddress = "local",
    metrics_port: SweepMetricsPort = None,
    metrics_linger: SweepMetricsLinger = None,
    progress: SweepProgress = True,
    save_adversarial: SweepSaveAdversarial = None,
) -> None:
    """Run (or resume) a grid sweep; results land as Parquet under the output directory."""
    from pixelray.config.sweep import ConfigError, load_config
    from pixelray.sweep import SweepError, run_sweep

    try:
        cfg = load_config(config, sweep_overrides(out, data, metrics_port, metrics_linger, save_adversarial))
        result = run_sweep(cfg, progress=progress, log=lambda m: typer.echo(m, err=True), address=address)
    except (ConfigError, SweepError) as exc:
        fail(str(exc), getattr(exc, "exit_code", 2))  # SweepStopped: 128 + the signal
    _summary(result.out_dir)


@app.command("plan")
def plan_cmd(
    config: Annotated[str, typer.Argument(help="Sweep config (TOML), e.g. jobs/paper.toml.")],
    out: SweepOut = None,
    data: SweepData = None,
    calibrate: Annotated[bool, typer.Option(
        "--calibrate", help="Run the sweep's own units on a sample of the data here ([run] device) and scale their "
        "time to the plan: the estimate sees the filter's rate, the attacks' success and every cost.")] = False,
    throughput: Annotated[list[str] | None, typer.Option(
        "--throughput", metavar="[MODEL=]IMG_S[:GRAD_IMG_S]",
        help="Images per second through each model (repeat per model, or once for all; the rate with gradients "
             "defaults to a third): estimate from these ([run] throughput is used when no source is given).")] = None,
    stats: Annotated[str | None, typer.Option(
        "--stats", metavar="STATS_JSON", help="Estimate from the rates a finished run of these models measured "
        "(its stats.json).")] = None,
    workers: Annotated[int | None, typer.Option(
        "--workers", min=1, help="Workers the time is spread over (default: [run] workers, the top of [run] gpus, "
        "or 1).")] = None,
    sample: Annotated[int, typer.Option("--sample", min=1, help="Images per model in the --calibrate pilot (the "
                                        "lowest ids of the first shard).")] = 64,
) -> None:
    """What a sweep would do, without running a model: units, images forwarded per model and phase, data read,
    and (with a throughput) the time it will compute.

    The config, the data and the checkpoints are checked as `pixelray sweep` checks them (the same errors).
    Images through the model without and with gradients (an attack's steps) are counted apart; figures marked
    <= are bounds (the [eval] filter, an attack's success or a ladder's breaking point decides). With rates
    (--throughput, --stats, [run] throughput) the time is the model's passes over those figures: at most; with
    --calibrate it is a pilot's, scaled.
    """
    from pixelray.config.sweep import ConfigError, load_config
    from pixelray.sweep import SweepError
    from pixelray.sweep.estimate import estimate_for, format_estimate
    from pixelray.sweep.plan import check_cost, format_plan, plan_sweep

    try:
        cfg = load_config(config, {"data": data, "output_dir": out})  # as the sweep's: the same refusals
        plan = plan_sweep(cfg)
        typer.echo(format_plan(plan))
        found = estimate_for(plan, measure=calibrate, given=throughput or (), stats=stats, workers=workers,
                             sample=sample, say=typer.echo)
        if found is not None:
            typer.echo(format_estimate(*found))
        check_cost(plan)  # above [run] max_cost: the sweep's refusal, after the plan that shows why
    except (ConfigError, SweepError) as exc:
        fail(str(exc))


def _summary(out_dir) -> None:
    """A compact view of a run: wrong rate per cell and model, corruptions with their equivalent
    pixel counts, and each attack's success rate."""
    from pathlib import Path

    import pandas as pd

    from pixelray.store.storage import Location

    run = Location(out_dir)
    df = run.child("cells.parquet").read_table().to_pandas()
    typer.echo(f"results: {run.child('cells.parquet')} ({len(df)} rows)")
    short = {m: Path(m.split(":", 1)[-1]).name if m.startswith("checkpoint:") else m for m in df.model.unique()}
    df = df.assign(model=df.model.map(short))
    plain = df[df.attack.isna() & (df.family == "pixel_change")].astype({"count": "Int64", "area": "Int64"})
    noise = df[df.attack.isna() & (df.family != "pixel_change")]
    with pd.option_context("display.width", 120, "display.max_rows", 60, "display.max_columns", 12):
        if len(plain):
            table = plain.pivot_table(index=["experiment", "count", "amplitude", "area"], columns="model",
                                      values="wrong_rate", sort=False)
            typer.echo("\nmisclassified after the change (%):")
            typer.echo((100 * table).round(2).to_string())
        if len(noise):
            noise = noise.astype({"severity": "Int64"})
            table = noise.assign(wrong=(100 * noise.wrong_rate).round(2), pixels=noise.equivalent_pixels.round(0))
            table = table.pivot_table(index=["family", "severity"], columns="model", values=["wrong", "pixels"],
                                      sort=False)
            typer.echo("\ncorruptions: misclassified (%) and the pixel-change count doing as much damage (pixels):")
            typer.echo(table.to_string())
        attack_path = run.child("attack.parquet")
        if attack_path.exists():
            attack = attack_path.read_table().to_pandas().assign(model=lambda d: d.model.map(short))
            attack = attack.assign(eps=(attack.eps * 255).round().astype(int))
            typer.echo("\nattack success rate (%), eps in k/255 (restored counts per cell: cells.parquet, n_restored):")
            table = attack.pivot_table(index=["attack", "eps"], columns="model", values="success_rate", sort=False)
            typer.echo((100 * table).round(2).to_string())
        failure_path = run.child("failure.parquet")
        if failure_path.exists():
            _failure_summary(failure_path.read_table().to_pandas().assign(model=lambda d: d.model.map(short)))


def _failure_summary(fail) -> None:
    """Median pixels to failure (clean images) and to restore (attacks) per ladder and model; "> N": survives."""
    import numpy as np
    import pandas as pd

    fail = fail.assign(eps=(fail.eps * 255).round().astype("Int64"), n=fail.n_fail.fillna(np.inf))
    keys = ["experiment", "ladder_id", "attack", "eps"]
    rows: dict[tuple, dict[str, str]] = {}
    for key, group in fail.groupby(keys, dropna=False, sort=False):
        for model, part in group.groupby("model", sort=False):
            median = float(np.quantile(part.n, 0.5, method="lower"))  # the ceil(n/2)-th, as the report
            text = f"> {int(part.max_count.max())}" if median == np.inf else f"{median:.0f}"
            rows.setdefault(tuple("" if pd.isna(k) else k for k in key), {})[model] = text
    typer.echo("\npixels to failure, median per image (attack rows: pixels to restore its examples; failure.parquet):")
    table = pd.DataFrame.from_dict(rows, orient="index")
    table.index = pd.MultiIndex.from_tuples(list(rows), names=keys)
    typer.echo(table.to_string())


@app.command("report")
def report_cmd(
    run_dirs: Annotated[
        list[str],
        typer.Argument(help="Sweep output directories, e.g. results/paper results/paper-finetuned.", metavar="RUN_DIR"),
    ],
    out: Annotated[
        str | None, typer.Option("--out", help="Where report.md, report.html and plots/ go (default: RUN_DIR/report).")
    ] = None,
    formats: Annotated[str, typer.Option("--format", help="Comma-separated list of html, md.")] = "html,md",
) -> None:
    """The paper's tables beside the paper's figures, plots and provenance, from finished sweeps.

    Reads results only (no model runs, no network): report.html is self-contained, report.md shows plots/*.png.
    """
    from pixelray.report import ReportError, write_report

    try:
        written = write_report(run_dirs, out, formats)
    except ReportError as exc:
        fail(str(exc))
    except OSError as exc:
        fail(f"cannot write the report: {exc}; choose another --out")
    for kind in ("html", "md"):
        if kind in written:
            typer.echo(f"report: {written[kind]}")


@app.command("demo")
def demo_cmd(
    out: Annotated[str, typer.Option("--out", help="Where the demo's data, models and results go.")] = "demo-out",
    config: Annotated[
        str | None, typer.Option("--config", help="The demo sweep config (default: the one in the package).")
    ] = None,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Show a progress bar.")] = True,
    images: Annotated[int, typer.Option("--images", min=10, help="Synthetic training images.")] = 2000,
    heldout: Annotated[int, typer.Option("--heldout", min=10, help="Synthetic held-out images (the sweep's).")] = 500,
    epochs: Annotated[int, typer.Option("--epochs", min=1, help="Epochs of the base model's training.")] = 6,
    finetune_epochs: Annotated[
        int, typer.Option("--finetune-epochs", min=1, help="Epochs of each train-augment fine-tune.")
    ] = 3,
) -> None:
    """Run the whole pipeline on an embedded local Ray: synthetic data, a tiny CNN, its fine-tunes, a sweep.

    The base model is trained in-process; `train-augment` (Ray Train, one worker) fine-tunes it twice,
    without augmentation (the control) and with pixel-change augmentation; the sweep measures all
    three on held-out images, side by side. Data and models already under --out are reused (the
    size and epoch options then change nothing): remove the folder to make them anew.
    """
    from pathlib import Path

    from pixelray.cli.demo import DEMO_CONFIG, prepare_demo
    from pixelray.config.sweep import ConfigError, load_config
    from pixelray.sweep import SweepError, run_sweep
    from pixelray.train.driver import TrainError

    try:
        data, checkpoints = prepare_demo(out, images=images, heldout=heldout, epochs=epochs,
                                         finetune_epochs=finetune_epochs, log=lambda m: typer.echo(m, err=True))
    except (ConfigError, TrainError) as exc:
        fail(str(exc))
    overrides = {
        "data": str(data),
        "models": tuple(f"checkpoint:{p}" for p in checkpoints),
        "output_dir": str(Path(out) / "results"),
    }
    try:
        cfg = load_config(config or DEMO_CONFIG, overrides)
        result = run_sweep(cfg, progress=progress, log=lambda m: typer.echo(m, err=True), address="local")
    except (ConfigError, SweepError) as exc:
        fail(str(exc))
    _summary(result.out_dir)
    typer.echo(f"\nquery it: python -c \"import pandas as pd; print(pd.read_parquet('{result.cells_path}'))\"")
    from pixelray.report import ReportError, write_report

    try:
        written = write_report([result.out_dir])
    except (ReportError, OSError) as exc:
        fail(f"the demo's report: {exc}")
    typer.echo(f"report: {written['html']} (and report.md beside it)")


def run() -> None:  # pragma: no cover - console entry for `python -m pixelray`
    sys.exit(app())
