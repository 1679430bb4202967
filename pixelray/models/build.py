"""Building a model: torchvision architectures (cached weights or a seeded random init) and user factories."""

from __future__ import annotations

import importlib
import inspect
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pixelray.core.check import is_int
from pixelray.errors import first_line
from pixelray.models.registry import (
    Weights,
    WeightsMissingError,
    entry_file,
    missing_message,
    torchvision_models,
    weights_entry,
    weights_label,
)
from pixelray.models.wrapper import IMAGENET_MEAN, IMAGENET_STD, Classifier, tiny, triple


@contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Run a block with the CPU generator seeded, restoring the caller's state afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _check_loadable(name: str, label: str, path: Path) -> None:
    """Refuse a cached weights file that is not a plain, weights-only state_dict."""
    try:
        torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as exc:  # noqa: BLE001 - unpickling, truncation, wrong format
        raise WeightsMissingError(
            f"{name} weights '{label}' in {path} cannot be read as a weights-only state_dict "
            f"({first_line(exc, typed=True, limit=300)}); delete it and run `pixelray weights download {name}`"
        ) from exc


def load_torchvision(name: str, kind: Weights | str, num_classes: int | None, init_seed: int) -> Classifier:
    import torchvision  # here, not at the top: ~1.5 s that the tiny CNN and user factories never need

    entry = weights_entry(name, kind)
    label = weights_label(kind)
    meta_entry = entry if entry is not None else torchvision.models.get_model_weights(name).DEFAULT
    transform = meta_entry.transforms()
    builder = torchvision.models.get_model_builder(name)
    if entry is None:
        classes = num_classes if num_classes is not None else len(meta_entry.meta["categories"])
        with _seeded(init_seed):
            net = builder(weights=None, num_classes=classes)
        source = f"torchvision:{name} random init (seed {init_seed})"
    else:
        categories = entry.meta.get("categories")
        classes = len(categories) if categories else 1000
        if num_classes is not None and num_classes != classes:
            raise ValueError(
                f"num_classes: {num_classes} does not match the {classes} classes of {name} "
                f"weights '{label}'; leave num_classes unset, or use weights='none' for a new head"
            )
        path = entry_file(entry)
        if not path.is_file():
            raise WeightsMissingError(missing_message(name, label, path))
        _check_loadable(name, label, path)
        # The file is present, so torchvision's loader reads it from the cache (no network),
        # and applies its own key fixes (e.g. DenseNet's old-style names).
        with _seeded(init_seed):
            net = builder(weights=entry, progress=False)
        source = f"torchvision:{type(entry).__name__}.{entry.name} ({path})"
    return Classifier(net, name=name, num_classes=classes, mean=transform.mean, std=transform.std,
                      weights=label, source=source)


def _import_factory(spec: str) -> Callable[..., Any]:
    module_name, attr = spec.split(":", 1)
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"model: cannot import module {module_name!r} of {spec!r} ({exc}); "
                         "check the module path and that it is importable on every worker") from exc
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"model: module {module_name!r} has no {attr!r} (in {spec!r}); "
                             "name a function or class that returns a torch.nn.Module")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"model: {spec!r} is not callable; name a function or class returning an nn.Module")
    return obj


def _accepts_num_classes(factory: Callable[..., Any]) -> bool:
    try:
        params = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):
        return True
    return any(p.name == "num_classes" or p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


def _head_size(net: nn.Module) -> int | None:
    """The output size of the last Linear layer registered in ``net`` (its usual head)."""
    linears = [m for m in net.modules() if isinstance(m, nn.Linear)]
    return linears[-1].out_features if linears else None


def load_factory(spec: str, num_classes: int | None, init_seed: int) -> Classifier:
    factory = _import_factory(spec)
    pass_classes = num_classes is not None and _accepts_num_classes(factory)
    with _seeded(init_seed):
        net = factory(num_classes=num_classes) if pass_classes else factory()
    if not isinstance(net, nn.Module):
        raise ValueError(f"model: {spec} returned {type(net).__name__}, not a torch.nn.Module")
    classes = getattr(net, "num_classes", None) or (num_classes if pass_classes else None) or _head_size(net)
    classes = classes or num_classes
    if num_classes is not None and classes != num_classes:
        raise ValueError(f"num_classes: {spec} predicts {classes} classes, not {num_classes}, and takes no "
                         "num_classes argument; leave num_classes unset or add that parameter to the factory")
    mean = getattr(net, "mean", IMAGENET_MEAN)
    std = getattr(net, "std", IMAGENET_STD)
    if isinstance(net, Classifier):
        net = net.net
    if not is_int(classes):
        raise ValueError(f"num_classes: cannot tell how many classes {spec} predicts; pass num_classes "
                         "or give the module a num_classes attribute")
    return Classifier(net, name=spec.rsplit(":", 1)[1], num_classes=classes, mean=triple("mean", mean),
                      std=triple("std", std, positive=True), weights="factory", source=f"factory:{spec}")


def build_net(base: str, num_classes: int, init_seed: int) -> nn.Module:
    """A randomly initialised network of built-in architecture ``base`` (a checkpoint's skeleton).

    Only torchvision names and ``tiny``: a checkpoint never makes pixelray import or call code.
    """
    if base == "tiny":
        with _seeded(init_seed):
            return tiny(num_classes)
    if is_builtin(base):
        return load_torchvision(base, Weights.NONE, num_classes, init_seed).net
    raise ValueError(f"base: {base!r} is not a built-in architecture ({BUILTIN_HINT})")


BUILTIN_HINT = "a torchvision classification model name or 'tiny'"


def is_builtin(base: str) -> bool:
    """True for an architecture pixelray builds itself (torchvision names, tiny); never imports anything."""
    return base == "tiny" or base in torchvision_models()


