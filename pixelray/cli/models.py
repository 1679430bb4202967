"""``pixelray weights``: list and download pretrained torchvision weights (the torch hub cache).

A thin shell over :mod:`pixelray.models`; mounted on the main app by :mod:`pixelray.cli`.
"""

from __future__ import annotations

from typing import Annotated

import typer

from pixelray.cli.common import fail

__all__ = ["weights_app"]

weights_app = typer.Typer(
    help="List and download pretrained torchvision weights ($TORCH_HOME/hub/checkpoints).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # plain help: Rich markup would eat "[output]" and the like
    add_completion=False,
)

# pixelray.models (torch, torchvision) is imported inside the commands: `pixelray --help` stays fast.
_PRESET_HELP = "A preset of models, e.g. paper (resnet101 densenet121 vgg16 alexnet squeezenet1_1)."
_WEIGHTS_HELP = "imagenet (IMAGENET1K_V1, the paper's), default (torchvision's DEFAULT) or an entry name."


def _models(names: list[str] | None, preset: str | None, default: str | None) -> list[str]:
    """The models the user named: arguments plus a preset, else ``default``'s list (None: every one)."""
    from pixelray.models import PRESETS, resolve_models, torchvision_models

    wanted = list(names or [])
    if preset is not None:
        if preset not in PRESETS:
            fail(f"--preset: {preset!r} is unknown; allowed: {', '.join(PRESETS)}")
        wanted.append(preset)
    if not wanted:
        return list(torchvision_models()) if default is None else list(PRESETS[default])
    return resolve_models(wanted)


def _weights(value: str) -> str:
    """The --weights value, checked: a file-backed kind (not 'none')."""
    if value.strip().lower() == "none":
        fail("--weights: 'none' (random init) has no file; use imagenet or default")
    return value


@weights_app.command("list")
def list_cmd(
    names: Annotated[list[str] | None, typer.Argument(help="Model names or presets (default: the paper preset).",
                                                      show_default=False)] = None,
    preset: Annotated[str | None, typer.Option("--preset", help=_PRESET_HELP)] = None,
    weights: Annotated[str | None, typer.Option(
        "--weights", help=_WEIGHTS_HELP + " Default: imagenet and default.", show_default=False)] = None,
    all_models: Annotated[bool, typer.Option("--all", help="Every torchvision classification model.")] = False,
) -> None:
    """Show, per model, the weights file torchvision expects and whether it is cached here.

    Example: pixelray weights list --preset paper
    """
    from pixelray.models import cached_weights, torchvision_models, weights_file

    try:
        kinds = [_weights(weights)] if weights is not None else ["imagenet", "default"]
        models = list(torchvision_models()) if all_models else _models(names, preset, "paper")
        rows = cached_weights(models, weights=kinds)
        known = [m for m in models if m in torchvision_models()]
        if not rows and known:
            weights_file(known[0], kinds[0])  # raises, naming the entries this model has
    except ValueError as exc:
        fail(str(exc))
    if not rows:
        fail("no torchvision models named; pretrained weights exist only for torchvision models")
    width = max(len(r[0]) for r in rows)
    kind_width = max(8, *(len(r[1]) for r in rows))
    typer.echo(f"{'model':<{width}}  {'weights':<{kind_width}}  cached  file")
    for name, kind, path, present in rows:
        typer.echo(f"{name:<{width}}  {kind:<{kind_width}}  {'yes' if present else 'no':<6}  {path}")
    files = {(r[2], r[3]) for r in rows}
    cached = sum(present for _, present in files)
    typer.echo(f"{cached} of {len(files)} files cached in {rows[0][2].parent} (set TORCH_HOME to move it)")


@weights_app.command("download")
def download_cmd(
    names: Annotated[list[str] | None, typer.Argument(help="Model names or presets.", show_default=False)] = None,
    preset: Annotated[str | None, typer.Option("--preset", help=_PRESET_HELP)] = None,
    weights: Annotated[str, typer.Option("--weights", help=_WEIGHTS_HELP)] = "imagenet",
    timeout: Annotated[float, typer.Option("--timeout", min=0.1, help="Seconds to wait for the host.")] = 10.0,
    progress: Annotated[bool, typer.Option("--progress/--quiet", help="Show a progress bar.")] = True,
) -> None:
    """Download pretrained weights into the torch hub cache (needs internet; fails fast without).

    Example: pixelray weights download --preset paper --weights imagenet
    """
    from pixelray.models import WeightsDownloadError, download_weights, torchvision_models, weights_file

    weights = _weights(weights)
    if not names and preset is None:
        fail("name the models to download, or a preset (e.g. --preset paper)")
    try:
        models = [m for m in _models(names, preset, None) if m in torchvision_models()]
        if not models:
            fail("no torchvision models named; pretrained weights exist only for torchvision models")
        for name in models:
            path = weights_file(name, weights)
            if path.is_file():
                typer.echo(f"{name}: cached {path}")
                continue
            download_weights(name, weights, timeout=timeout, progress=progress)
            typer.echo(f"{name}: downloaded {path}")
    except ValueError as exc:
        fail(str(exc))
    except WeightsDownloadError as exc:
        fail(str(exc), code=1)
