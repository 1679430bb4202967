"""``pixelray weights``: list and download pretrained torchvision weights (the torch hub cache).

A thin shell over :mod:`pixelray.models`; mounted on the main app by :mod:`pixelray.cli`.
"""

from __future__ import annotations

from typing import Annotated

import typer

from pixelray.models import (
    PRESETS,
    Weights,
    WeightsDownloadError,
    cached_weights,
    download_weights,
    resolve_models,
    torchvision_models,
    weights_file,
)

__all__ = ["weights_app"]

weights_app = typer.Typer(
    help="List and download pretrained torchvision weights ($TORCH_HOME/hub/checkpoints).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

_PRESET_HELP = "A preset of models (" + "; ".join(k + ": " + " ".join(v) for k, v in PRESETS.items()) + ")."


def _fail(message: str, code: int = 2) -> None:
    """Print a one-line error to stderr and exit non-zero (no traceback)."""
    typer.echo(f"error: {' '.join(message.split())}", err=True)
    raise typer.Exit(code)


def _models(names: list[str] | None, preset: str | None, default: str | None) -> list[str]:
    """The models the user named: arguments plus a preset, else ``default``'s list."""
    wanted = list(names or [])
    if preset is not None:
        if preset not in PRESETS:
            _fail(f"--preset: {preset!r} is unknown; allowed: {', '.join(PRESETS)}")
        wanted.append(preset)
    if not wanted:
        return list(torchvision_models()) if default is None else list(PRESETS[default])
    return resolve_models(wanted)


@weights_app.command("list")
def list_cmd(
    names: Annotated[list[str] | None, typer.Argument(help="Model names or presets (default: the paper preset).",
                                                      show_default=False)] = None,
    preset: Annotated[str | None, typer.Option("--preset", help=_PRESET_HELP)] = None,
    weights: Annotated[Weights | None, typer.Option(
        "--weights", help="Which weights (default: imagenet and default).", show_default=False)] = None,
    all_models: Annotated[bool, typer.Option("--all", help="Every torchvision classification model.")] = False,
) -> None:
    """Show, per model, the weights file torchvision expects and whether it is cached here.

    Example: pixelray weights list --preset paper
    """
    try:
        if weights is Weights.NONE:
            _fail("--weights: 'none' has no file; use imagenet or default")
        models = list(torchvision_models()) if all_models else _models(names, preset, "paper")
        kinds = [weights] if weights is not None else [Weights.IMAGENET, Weights.DEFAULT]
        rows = cached_weights(models, weights=kinds)
    except ValueError as exc:
        _fail(str(exc))
    if not rows:
        _fail("no torchvision models named; pretrained weights exist only for torchvision models")
    width = max(len(r[0]) for r in rows)
    typer.echo(f"{'model':<{width}}  weights   cached  file")
    for name, kind, path, present in rows:
        typer.echo(f"{name:<{width}}  {kind:<8}  {'yes' if present else 'no':<6}  {path}")
    files = {(r[2], r[3]) for r in rows}
    cached = sum(present for _, present in files)
    typer.echo(f"{cached} of {len(files)} files cached in {rows[0][2].parent} (set TORCH_HOME to move it)")


@weights_app.command("download")
def download_cmd(
    names: Annotated[list[str] | None, typer.Argument(help="Model names or presets.", show_default=False)] = None,
    preset: Annotated[str | None, typer.Option("--preset", help=_PRESET_HELP)] = None,
    weights: Annotated[Weights, typer.Option("--weights", help="Which weights to fetch.")] = Weights.IMAGENET,
    timeout: Annotated[float, typer.Option("--timeout", min=0.1, help="Seconds to wait for the host.")] = 10.0,
    progress: Annotated[bool, typer.Option("--progress/--quiet", help="Show a progress bar.")] = True,
) -> None:
    """Download pretrained weights into the torch hub cache (needs internet; fails fast without).

    Example: pixelray weights download --preset paper --weights imagenet
    """
    if weights is Weights.NONE:
        _fail("--weights: 'none' has no file to download; use imagenet or default")
    if not names and preset is None:
        _fail("name the models to download, or a preset (e.g. --preset paper)")
    try:
        models = [m for m in _models(names, preset, None) if m in torchvision_models()]
        if not models:
            _fail("no torchvision models named; pretrained weights exist only for torchvision models")
        for name in models:
            path = weights_file(name, weights)
            if path.is_file():
                typer.echo(f"{name}: cached {path}")
                continue
            download_weights(name, weights, timeout=timeout, progress=progress)
            typer.echo(f"{name}: downloaded {path}")
    except ValueError as exc:
        _fail(str(exc))
    except WeightsDownloadError as exc:
        _fail(str(exc), code=1)
