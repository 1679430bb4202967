"""Model specs and pretrained weights: names, presets, weights entries and the torch hub cache (nothing is loaded)."""

from __future__ import annotations

import difflib
import functools
import os
import re
from collections.abc import Sequence
from enum import Enum
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch

#: Named model lists; a preset name may stand wherever a list of model specs is expected.
PRESETS: dict[str, tuple[str, ...]] = {
    "paper": ("resnet101", "densenet121", "vgg16", "alexnet", "squeezenet1_1"),
}

CHECKPOINT_PREFIX = "checkpoint:"
_FACTORY_RE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")
_ENTRY_RE = re.compile(r"^[A-Z][A-Z0-9]*(_[A-Z0-9]+)*_V[0-9]+$")  # torchvision entry names: IMAGENET1K_V2


class Weights(str, Enum):
    """Which pretrained weights a torchvision model gets."""

    IMAGENET = "imagenet"  # IMAGENET1K_V1: the weights of the paper's time
    DEFAULT = "default"  # torchvision's DEFAULT (V2 for several models, e.g. ResNet101)
    NONE = "none"  # random init, deterministic for a given init_seed


class WeightsMissingError(RuntimeError):
    """Pretrained weights are not in the torch hub cache (or cannot be read from it)."""


class WeightsDownloadError(RuntimeError):
    """Pretrained weights could not be downloaded (no internet, bad hash, ...)."""




@functools.lru_cache(maxsize=1)
def torchvision_models() -> tuple[str, ...]:
    """Every torchvision classification model name, sorted."""
    import torchvision  # here, not above: ~1.5 s that checkpoints of built-in architectures never need

    return tuple(sorted(torchvision.models.list_models(module=torchvision.models)))


def known_names() -> list[str]:
    return [*torchvision_models(), "tiny"]


def _unknown_model(spec: str) -> ValueError:
    if spec in PRESETS:
        return ValueError(f"model: {spec!r} is a preset, not a model; expand it with resolve_models "
                          f"({', '.join(PRESETS[spec])})")
    close = difflib.get_close_matches(spec.lower(), known_names(), n=5, cutoff=0.6)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    return ValueError(
        f"model: {spec!r} is unknown; {hint}use a torchvision classification model name "
        "(`pixelray weights list --all`), 'tiny', 'checkpoint:PATH' or 'module.path:factory'"
    )


def spec_kind(spec: str) -> str:
    """Which form a model spec has: torchvision, tiny, checkpoint or factory."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"model: {spec!r} is not a model spec; use a model name, "
                         "'checkpoint:PATH' or 'module.path:factory'")
    if spec.startswith(CHECKPOINT_PREFIX):
        if not spec[len(CHECKPOINT_PREFIX):].strip():
            raise ValueError(f"model: {spec!r} names no file; use 'checkpoint:PATH'")
        return "checkpoint"
    if spec == "tiny":
        return "tiny"
    if spec in torchvision_models():
        return "torchvision"
    if _FACTORY_RE.match(spec):
        return "factory"
    raise _unknown_model(spec)


def resolve_models(names_or_preset: Sequence[str] | str) -> list[str]:
    """Model specs from a preset name, a spec, or a list of both (presets expanded, duplicates dropped).

    Each spec's form is checked (an unknown name fails with close matches); nothing is loaded.

    >>> resolve_models("paper")
    ['resnet101', 'densenet121', 'vgg16', 'alexnet', 'squeezenet1_1']
    """
    items = [names_or_preset] if isinstance(names_or_preset, str) else list(names_or_preset)
    out: list[str] = []
    for item in items:
        for spec in PRESETS.get(item, (item,)) if isinstance(item, str) else (item,):
            spec_kind(spec)
            if spec not in out:
                out.append(spec)
    if not out:
        raise ValueError(f"models: {names_or_preset!r} is empty; name at least one model or a preset "
                         f"({', '.join(PRESETS)})")
    return out


# ---------------------------------------------------------------------------- weights


def parse_weights(weights: str | Weights | None) -> Weights | str:
    """A :class:`Weights` member, or an explicit torchvision entry name (checked per model)."""
    if weights is None:
        return Weights.NONE
    if isinstance(weights, Weights):
        return weights
    if isinstance(weights, str):
        try:
            return Weights(weights.strip().lower())
        except ValueError:
            if _ENTRY_RE.match(weights.strip().upper()):
                return weights.strip().upper()
    raise ValueError(
        f"weights: {weights!r} is invalid; use 'imagenet' (IMAGENET1K_V1), 'default', 'none' "
        "or a torchvision entry name such as 'IMAGENET1K_V2'"
    )


def weights_label(weights: Weights | str) -> str:
    return weights.value if isinstance(weights, Weights) else weights


def check_weights_entry(weights: str | Weights | None, names: Sequence[str]) -> str:
    """The weights' label (``imagenet``, ``default``, ``none`` or an entry name such as ``IMAGENET1K_V2``),
    after checking that every torchvision model among ``names`` has an explicitly named entry.

    Nothing is loaded or read. Raises ValueError for a malformed name, or naming the model
    and the entries it has.
    """
    kind = parse_weights(weights)
    if not isinstance(kind, Weights):
        for name in names:
            if spec_kind(name) == "torchvision":
                weights_entry(name, kind)
        if kind not in weights_entries():  # checked even where no model of ``names`` would use it
            close = difflib.get_close_matches(kind, weights_entries(), n=3, cutoff=0.8)
            raise ValueError(f"weights: no torchvision model has {kind} weights; use 'imagenet', 'default', "
                             f"'none' or an entry such as {', '.join(close or ('IMAGENET1K_V1', 'IMAGENET1K_V2'))}")
    return weights_label(kind)


@functools.lru_cache(maxsize=1)
def weights_entries() -> frozenset[str]:
    """Every weights entry name of a torchvision classification model (IMAGENET1K_V1, IMAGENET1K_V2, ...)."""
    import torchvision

    return frozenset(e.name for name in torchvision_models() for e in torchvision.models.get_model_weights(name))


def weights_entry(name: str, weights: Weights | str) -> Any:
    """The torchvision weights enum entry for a model, or None for random init."""
    if weights is Weights.NONE:
        return None
    import torchvision

    enum = torchvision.models.get_model_weights(name)
    entries = [e.name for e in enum]
    if weights is Weights.DEFAULT:
        return enum.DEFAULT
    wanted = "IMAGENET1K_V1" if weights is Weights.IMAGENET else weights
    if wanted in entries:
        return enum[wanted]
    raise ValueError(
        f"weights: {name} has no {wanted} weights; use 'default' ({enum.DEFAULT.name}), 'none' "
        f"or one of {', '.join(entries)}"
    )


def torchvision_name(name: str) -> str:
    if spec_kind(name) != "torchvision":
        raise ValueError(f"model: {name!r} is not a torchvision model; pretrained weights exist only "
                         "for torchvision classification models")
    return name


def _cache_dir() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


def entry_file(entry: Any) -> Path:
    return _cache_dir() / os.path.basename(urlparse(entry.url).path)


def weights_file(name: str, weights: str | Weights = "imagenet") -> Path:
    """Where torchvision caches a model's pretrained weights: ``$TORCH_HOME/hub/checkpoints/<file>``.

    The file name is the one in torchvision's enum URL (e.g. ``resnet101-63fe2227.pth``).
    """
    entry = weights_entry(torchvision_name(name), parse_weights(weights))
    if entry is None:
        raise ValueError(f"weights: 'none' has no file; use 'imagenet' or 'default' for {name}")
    return entry_file(entry)


def cached_weights(
    names: Sequence[str] | str | None = None,
    weights: Sequence[str | Weights] = (Weights.IMAGENET, Weights.DEFAULT),
) -> list[tuple[str, str, Path, bool]]:
    """(model, weights, expected file, present) for each torchvision model and weights kind.

    Args:
        names: model names or presets; None means every torchvision classification model.
            Specs that are not torchvision models (tiny, checkpoints, factories) are skipped.
        weights: the kinds to list; a kind a model lacks (e.g. IMAGENET1K_V1 for vit_h_14)
            is skipped.
    """
    models = torchvision_models() if names is None else resolve_models(names)
    kinds = [parse_weights(w) for w in weights]
    rows = []
    for name in models:
        if spec_kind(name) != "torchvision":
            continue
        for kind in kinds:
            if kind is Weights.NONE:
                continue
            try:
                path = entry_file(weights_entry(name, kind))
            except ValueError:
                continue
            rows.append((name, weights_label(kind), path, path.is_file()))
    return rows


def missing_message(name: str, label: str, path: Path) -> str:
    return (
        f"{name} weights '{label}' are not in the torch hub cache: expected {path}. "
        f"Fix: run `pixelray weights download {name} --weights {label.lower()}` on a machine with "
        f"internet and copy the file into $TORCH_HOME/hub/checkpoints ({path.parent}) here, "
        "or use weights='none' for random init"
    )


def require_weights(names: Sequence[str] | str, weights: str | Weights = "imagenet") -> None:
    """Raise :class:`WeightsMissingError` naming every missing weights file of these models.

    A cheap preflight for a sweep: it only looks at files. Non-torchvision specs are skipped.
    """
    kind = parse_weights(weights)
    if kind is Weights.NONE:
        return
    missing = [
        (name, path)
        for name in resolve_models(names)
        if spec_kind(name) == "torchvision"
        for path in [entry_file(weights_entry(name, kind))]
        if not path.is_file()
    ]
    if len(missing) == 1:
        raise WeightsMissingError(missing_message(missing[0][0], weights_label(kind), missing[0][1]))
    if missing:
        raise WeightsMissingError(
            f"{len(missing)} weights files are not in the torch hub cache ({missing[0][1].parent}): "
            f"{', '.join(p.name for _, p in missing)}. Fix: run `pixelray weights download "
            f"{' '.join(n for n, _ in missing)} --weights {weights_label(kind).lower()}` on a machine "
            "with internet and copy the files into $TORCH_HOME/hub/checkpoints here"
        )
