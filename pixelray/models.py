"""The model registry: torchvision names, checkpoints, user factories; normalisation inside.

Every model is returned as a :class:`Classifier`: it takes pixels (uint8, or floats in
[0, 1]; NHWC or NCHW), normalises them with its weights' mean/std and returns logits.
So perturbations and attacks work in pixel space and never see normalisation.

A model spec is one of:

- a torchvision classification model name (``"resnet101"``, ``"densenet121"``, ...);
- ``"tiny"``: pixelray's own small CNN (the demo and the tests);
- ``"checkpoint:PATH"``: a state_dict saved by :func:`save_checkpoint` with its JSON sidecar; PATH may
  also be a run directory of ``pixelray train-augment`` (its ``model.pt`` with ``pixelray.json``);
- ``"module.path:factory"``: any user model; ``factory()`` returns an ``nn.Module``.

Pretrained weights are read from the torch hub cache (``$TORCH_HOME/hub/checkpoints``) and
never downloaded by :func:`load_model`: a missing file fails at once with
:class:`WeightsMissingError`, which says the file and the fix. :func:`download_weights`
(``pixelray weights download``) fills the cache where there is internet.

Random init is deterministic: the same spec and ``init_seed`` give the same weights in every
process, and the caller's global random state is left untouched.

Example:
    >>> model = load_model("tiny", weights=None, num_classes=10)
    >>> model(torch.zeros(2, 32, 32, 3, dtype=torch.uint8)).shape
    torch.Size([2, 10])
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import importlib
import inspect
import json
import os
import re
import socket
import threading
import urllib.request
import zipfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from enum import Enum
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
import torchvision
from torch import nn

from pixelray.atomic import write_atomic

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "PRESETS",
    "RUN_MODEL_FILE",
    "RUN_SIDECAR_FILE",
    "Classifier",
    "LabelMap",
    "TinyNet",
    "Weights",
    "WeightsDownloadError",
    "WeightsMissingError",
    "cached_weights",
    "checkpoint_file",
    "checkpoint_sidecar",
    "check_weights_entry",
    "download_weights",
    "load_model",
    "model_info",
    "require_weights",
    "resolve_models",
    "save_checkpoint",
    "sidecar_path",
    "tiny",
    "torchvision_models",
    "weights_file",
]

#: Named model lists; a preset name may stand wherever a list of model specs is expected.
PRESETS: dict[str, tuple[str, ...]] = {
    "paper": ("resnet101", "densenet121", "vgg16", "alexnet", "squeezenet1_1"),
}

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_CHECKPOINT_PREFIX = "checkpoint:"
_FACTORY_RE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")
_ENTRY_RE = re.compile(r"^[A-Z][A-Z0-9]*(_[A-Z0-9]+)*_V[0-9]+$")  # torchvision entry names: IMAGENET1K_V2
_SIDECAR_FORMAT = "pixelray.checkpoint"
_WRAPPER_PREFIXES = ("module.", "_orig_mod.", "net.")  # DDP, torch.compile, a saved Classifier
_RANGE_TOL = 1e-6

#: A run directory (``checkpoint:DIR``) holds its state_dict and sidecar under these names.
RUN_MODEL_FILE = "model.pt"
RUN_SIDECAR_FILE = "pixelray.json"


class Weights(str, Enum):
    """Which pretrained weights a torchvision model gets."""

    IMAGENET = "imagenet"  # IMAGENET1K_V1: the weights of the paper's time
    DEFAULT = "default"  # torchvision's DEFAULT (V2 for several models, e.g. ResNet101)
    NONE = "none"  # random init, deterministic for a given init_seed


class WeightsMissingError(RuntimeError):
    """Pretrained weights are not in the torch hub cache (or cannot be read from it)."""


class WeightsDownloadError(RuntimeError):
    """Pretrained weights could not be downloaded (no internet, bad hash, ...)."""


# ---------------------------------------------------------------------------- the wrapper


def _triple(field: str, value: Any, *, positive: bool = False) -> tuple[float, float, float]:
    """Three floats (one per RGB channel) from a tuple, list or tensor, checked."""
    try:
        items = value.tolist() if isinstance(value, torch.Tensor) else list(value)
        out = tuple(float(v) for v in torch.as_tensor(items, dtype=torch.float64).flatten().tolist())
    except (TypeError, ValueError, RuntimeError):
        out = ()
    if len(out) != 3 or any(v != v for v in out) or (positive and min(out) <= 0):
        need = "three positive numbers" if positive else "three numbers"
        raise ValueError(f"{field}: {value!r} is invalid; it must be {need}, one per RGB channel")
    return out  # type: ignore[return-value]


class Classifier(nn.Module):
    """An image classifier on pixels: normalisation inside, logits out.

    Takes uint8 images or float images in [0, 1], shaped (N, H, W, 3) or (N, 3, H, W);
    normalises them with ``mean``/``std`` and returns float logits (N, num_classes).
    NHWC input reaches the network as a channels_last NCHW view (no copy). Works under
    ``torch.inference_mode`` and with autograd (the gradient flows to a float input).

    Attributes:
        net: the wrapped network, which expects normalised NCHW floats.
        name: the model's name in result rows (e.g. ``"resnet101"``).
        num_classes: number of logits.
        mean, std: per-channel normalisation of [0, 1] pixels.
        weights: which weights it holds (``"imagenet"``, ``"default"``, ``"none"``, an entry
            name such as ``"IMAGENET1K_V2"``, ``"checkpoint"`` or ``"factory"``).
        source: where the weights came from (a file, an enum entry, a factory).
        metadata: free-form metadata from a checkpoint's sidecar (empty otherwise).
        check_range: check that float input lies in [0, 1] (one device sync per batch).
    """

    def __init__(
        self,
        net: nn.Module,
        *,
        name: str,
        num_classes: int,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        weights: str = "none",
        source: str = "",
        metadata: Mapping[str, Any] | None = None,
        check_range: bool = True,
    ) -> None:
        super().__init__()
        if not isinstance(net, nn.Module):
            raise ValueError(f"net: {type(net).__name__} is not a torch.nn.Module")
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes: {num_classes!r} is invalid; it must be an integer >= 1")
        self.net = net
        self.name = str(name)
        self.num_classes = num_classes
        self.mean = _triple("mean", mean)
        self.std = _triple("std", std, positive=True)
        self.weights = str(weights)
        self.source = str(source)
        self.metadata = dict(metadata or {})
        self.check_range = bool(check_range)
        # Not persistent: the state_dict stays the network's own (with a "net." prefix).
        self.register_buffer("_mean", torch.tensor(self.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("_std", torch.tensor(self.std).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (N, num_classes) of a batch of uint8 or [0, 1] float images."""
        x = _as_nchw(x)
        if x.dtype == torch.uint8:
            # One new tensor, normalised in place: the same arithmetic in the same order as
            # ((x / 255) - mean) / std, so the same bits, without three more full-size tensors.
            return self.net(x.to(self._mean.dtype).div_(255).sub_(self._mean).div_(self._std))
        if x.is_floating_point():
            if self.check_range:
                _check_unit_range(x)
            return self.net((x.to(self._mean.dtype) - self._mean) / self._std)
        raise ValueError(
            f"images: dtype {x.dtype} is not supported; pass uint8 pixels or floats in [0, 1]"
        )

    def extra_repr(self) -> str:
        return f"name={self.name!r}, weights={self.weights!r}, num_classes={self.num_classes}"


def _as_nchw(x: torch.Tensor) -> torch.Tensor:
    """An NCHW view of an NHWC or NCHW batch (NHWC becomes a channels_last view)."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"images: {type(x).__name__} is not a torch.Tensor")
    if x.dim() != 4:
        raise ValueError(
            f"images: shape {tuple(x.shape)} is not a batch; use (N, H, W, 3) or (N, 3, H, W)"
        )
    if x.shape[1] == 3:  # NCHW wins when both dims are 3 (only for 3-pixel-high images)
        return x
    if x.shape[-1] == 3:
        return x.permute(0, 3, 1, 2)
    raise ValueError(
        f"images: shape {tuple(x.shape)} has no RGB axis of size 3; use (N, H, W, 3) or (N, 3, H, W)"
    )


def _check_unit_range(x: torch.Tensor) -> None:
    """Raise ValueError unless every value of float ``x`` is in [0, 1] (NaN fails too)."""
    if x.numel() == 0:
        return
    lo, hi = torch.aminmax(x.detach())
    if not bool((lo >= -_RANGE_TOL) & (hi <= 1 + _RANGE_TOL)):
        raise ValueError(
            f"images: float input must be in [0, 1] (got min {float(lo):.4g}, max {float(hi):.4g}); "
            "pass uint8 pixels or floats divided by 255 - normalisation happens inside the model"
        )


class LabelMap(nn.Module):
    """A head over a subset of a data set's classes, its outputs put at their data set labels.

    A fine-tune with a new head (``head = "replace"``) predicts only the classes present in
    its training images; output ``i`` means data set label ``labels[i]``. This module returns
    logits over the whole label space (``num_classes``), so that ``argmax`` is a data set
    label and a sweep scores it like any other model. Classes the head lacks get a logit far
    below every other one: never predicted, and finite, so a loss over them stays finite.

    Args:
        net: the network; it returns ``len(labels)`` logits.
        labels: the data set label of each output, distinct, in ``0 .. num_classes - 1``.
        num_classes: size of the label space.
    """

    def __init__(self, net: nn.Module, labels: Sequence[int], num_classes: int) -> None:
        super().__init__()
        labels = list(labels)
        if (isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1 or not labels
                or any(isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < num_classes for v in labels)
                or len(set(labels)) != len(labels)):
            raise ValueError(f"label map: labels {labels!r} must be distinct integers in 0..num_classes-1 "
                             f"(num_classes {num_classes!r}), one per output of the head")
        self.net = net
        self.labels = tuple(labels)
        self.num_classes = num_classes
        self.register_buffer("_index", torch.tensor(labels, dtype=torch.int64), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.net(x)
        out = logits.new_full((logits.shape[0], self.num_classes), torch.finfo(logits.dtype).min / 4)
        return out.index_copy(1, self._index, logits)

    def extra_repr(self) -> str:
        return f"outputs={len(self.labels)}, num_classes={self.num_classes}"


def model_info(model: Classifier) -> dict[str, Any]:
    """The model's identity for result rows: name, weights, num_classes, parameters."""
    return {
        "name": model.name,
        "weights": model.weights,
        "num_classes": model.num_classes,
        "parameters": sum(p.numel() for p in model.net.parameters()),
    }


# ---------------------------------------------------------------------------- tiny


class TinyNet(nn.Module):
    """pixelray's small CNN: four conv blocks with BatchNorm, global average pool, linear head.

    About 60 k parameters; takes 3 x H x W for any H, W >= 16.
    """

    def __init__(self, num_classes: int = 10, width: int = 16) -> None:
        super().__init__()
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes: {num_classes!r} is invalid; it must be an integer >= 1")
        chans = (3, width, 2 * width, 4 * width, 4 * width)
        layers: list[nn.Module] = []
        for i in range(4):
            layers += [
                nn.Conv2d(chans[i], chans[i + 1], 3, padding=1, bias=False),
                nn.BatchNorm2d(chans[i + 1]),
                nn.ReLU(inplace=True),
            ]
            if i > 0:
                layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(chans[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


def tiny(num_classes: int = 10) -> nn.Module:
    """pixelray's small CNN (:class:`TinyNet`), randomly initialised from the global generator."""
    return TinyNet(num_classes)


# ---------------------------------------------------------------------------- names


@functools.lru_cache(maxsize=1)
def torchvision_models() -> tuple[str, ...]:
    """Every torchvision classification model name, sorted."""
    return tuple(sorted(torchvision.models.list_models(module=torchvision.models)))


def _known_names() -> list[str]:
    return [*torchvision_models(), "tiny"]


def _unknown_model(spec: str) -> ValueError:
    if spec in PRESETS:
        return ValueError(f"model: {spec!r} is a preset, not a model; expand it with resolve_models "
                          f"({', '.join(PRESETS[spec])})")
    close = difflib.get_close_matches(spec.lower(), _known_names(), n=5, cutoff=0.6)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    return ValueError(
        f"model: {spec!r} is unknown; {hint}use a torchvision classification model name "
        "(`pixelray weights list --all`), 'tiny', 'checkpoint:PATH' or 'module.path:factory'"
    )


def _kind(spec: str) -> str:
    """Which form a model spec has: torchvision, tiny, checkpoint or factory."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"model: {spec!r} is not a model spec; use a model name, "
                         "'checkpoint:PATH' or 'module.path:factory'")
    if spec.startswith(_CHECKPOINT_PREFIX):
        if not spec[len(_CHECKPOINT_PREFIX):].strip():
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
            _kind(spec)
            if spec not in out:
                out.append(spec)
    if not out:
        raise ValueError(f"models: {names_or_preset!r} is empty; name at least one model or a preset "
                         f"({', '.join(PRESETS)})")
    return out


# ---------------------------------------------------------------------------- weights


def _parse_weights(weights: str | Weights | None) -> Weights | str:
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


def _weights_label(weights: Weights | str) -> str:
    return weights.value if isinstance(weights, Weights) else weights


def check_weights_entry(weights: str | Weights | None, names: Sequence[str]) -> str:
    """The weights' label (``imagenet``, ``default``, ``none`` or an entry name such as ``IMAGENET1K_V2``),
    after checking that every torchvision model among ``names`` has an explicitly named entry.

    Nothing is loaded or read. Raises ValueError for a malformed name, or naming the model
    and the entries it has.
    """
    kind = _parse_weights(weights)
    if not isinstance(kind, Weights):
        for name in names:
            if _kind(name) == "torchvision":
                _entry(name, kind)
    return _weights_label(kind)


def _entry(name: str, weights: Weights | str) -> Any:
    """The torchvision weights enum entry for a model, or None for random init."""
    if weights is Weights.NONE:
        return None
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


def _torchvision_name(name: str) -> str:
    if _kind(name) != "torchvision":
        raise ValueError(f"model: {name!r} is not a torchvision model; pretrained weights exist only "
                         "for torchvision classification models")
    return name


def _cache_dir() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


def _entry_file(entry: Any) -> Path:
    return _cache_dir() / os.path.basename(urlparse(entry.url).path)


def weights_file(name: str, weights: str | Weights = "imagenet") -> Path:
    """Where torchvision caches a model's pretrained weights: ``$TORCH_HOME/hub/checkpoints/<file>``.

    The file name is the one in torchvision's enum URL (e.g. ``resnet101-63fe2227.pth``).
    """
    entry = _entry(_torchvision_name(name), _parse_weights(weights))
    if entry is None:
        raise ValueError(f"weights: 'none' has no file; use 'imagenet' or 'default' for {name}")
    return _entry_file(entry)


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
    kinds = [_parse_weights(w) for w in weights]
    rows = []
    for name in models:
        if _kind(name) != "torchvision":
            continue
        for kind in kinds:
            if kind is Weights.NONE:
                continue
            try:
                path = _entry_file(_entry(name, kind))
            except ValueError:
                continue
            rows.append((name, _weights_label(kind), path, path.is_file()))
    return rows


def _missing_message(name: str, label: str, path: Path) -> str:
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
    kind = _parse_weights(weights)
    if kind is Weights.NONE:
        return
    missing = [
        (name, path)
        for name in resolve_models(names)
        if _kind(name) == "torchvision"
        for path in [_entry_file(_entry(name, kind))]
        if not path.is_file()
    ]
    if len(missing) == 1:
        raise WeightsMissingError(_missing_message(missing[0][0], _weights_label(kind), missing[0][1]))
    if missing:
        raise WeightsMissingError(
            f"{len(missing)} weights files are not in the torch hub cache ({missing[0][1].parent}): "
            f"{', '.join(p.name for _, p in missing)}. Fix: run `pixelray weights download "
            f"{' '.join(n for n, _ in missing)} --weights {_weights_label(kind).lower()}` on a machine "
            "with internet and copy the files into $TORCH_HOME/hub/checkpoints here"
        )


# ---------------------------------------------------------------------------- download


def _probe(host: str, port: int, timeout: float) -> str | None:
    """None when a TCP connection to host:port opens within ``timeout`` s, else the reason.

    Runs in a daemon thread so a DNS lookup that never answers cannot hang the caller.
    """
    outcome: dict[str, str] = {}

    def attempt() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                outcome["ok"] = ""
        except Exception as exc:  # noqa: BLE001 - any failure means "not reachable"
            outcome["error"] = f"{type(exc).__name__}: {exc}"

    thread = threading.Thread(target=attempt, name="pixelray-probe", daemon=True)
    thread.start()
    thread.join(timeout)
    if "ok" in outcome:
        return None
    return outcome.get("error", f"no answer within {timeout:g} s")


def _endpoint(url: str) -> tuple[str, int]:
    """The host and port a download of ``url`` connects to first (its proxy, if one is set)."""
    parts = urlparse(url)
    proxy = urllib.request.getproxies().get(parts.scheme)
    if proxy and not urllib.request.proxy_bypass(parts.hostname or ""):
        proxy_parts = urlparse(proxy if "://" in proxy else f"http://{proxy}")
        return proxy_parts.hostname or "", proxy_parts.port or 80
    return parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80)


@contextmanager
def _socket_timeout(seconds: float) -> Iterator[None]:
    """Make every new socket give up after ``seconds`` of silence (a stalled download fails)."""
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


def download_weights(
    name: str, weights: str | Weights = "imagenet", *, timeout: float = 10.0, progress: bool = True
) -> Path:
    """Download a model's pretrained weights into the torch hub cache (a no-op when present).

    Checks first that the download host answers within ``timeout`` seconds, so a machine
    without internet fails fast instead of hanging. The file's SHA-256 prefix (in its name)
    is verified, and it is written atomically (torch.hub writes a ``.partial`` then renames).

    Raises:
        WeightsDownloadError: the host is unreachable or the download failed.
    """
    kind = _parse_weights(weights)
    entry = _entry(_torchvision_name(name), kind)
    if entry is None:
        raise ValueError(f"weights: 'none' has no file to download; use 'imagenet' or 'default' for {name}")
    path = _entry_file(entry)
    if path.is_file():
        return path
    host, port = _endpoint(entry.url)
    reason = _probe(host, port, timeout)
    if reason is not None:
        raise WeightsDownloadError(
            f"cannot reach {host}:{port} to download {path.name} ({reason}); no internet here? "
            f"Run `pixelray weights download {name} --weights {_weights_label(kind).lower()}` on a "
            f"machine with internet and copy {path.name} into $TORCH_HOME/hub/checkpoints ({path.parent})"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    match = torch.hub.HASH_REGEX.search(path.name)
    try:
        with _socket_timeout(timeout):
            torch.hub.download_url_to_file(entry.url, str(path), match.group(1) if match else None, progress)
    except Exception as exc:  # noqa: BLE001 - urllib, OSError and the hash check all mean "failed"
        raise WeightsDownloadError(
            f"downloading {entry.url} to {path} failed ({type(exc).__name__}: {exc}); try again, "
            f"or copy {path.name} into {path.parent} from a machine that has it"
        ) from exc
    return path


# ---------------------------------------------------------------------------- loading


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
            f"({_first_line(exc)}); delete it and run `pixelray weights download {name}`"
        ) from exc


def _load_torchvision(name: str, kind: Weights | str, num_classes: int | None, init_seed: int) -> Classifier:
    entry = _entry(name, kind)
    label = _weights_label(kind)
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
        path = _entry_file(entry)
        if not path.is_file():
            raise WeightsMissingError(_missing_message(name, label, path))
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


def _load_factory(spec: str, num_classes: int | None, init_seed: int) -> Classifier:
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
    if not isinstance(classes, int) or isinstance(classes, bool):
        raise ValueError(f"num_classes: cannot tell how many classes {spec} predicts; pass num_classes "
                         "or give the module a num_classes attribute")
    return Classifier(net, name=spec.rsplit(":", 1)[1], num_classes=classes, mean=_triple("mean", mean),
                      std=_triple("std", std, positive=True), weights="factory", source=f"factory:{spec}")


def _build_net(base: str, num_classes: int, init_seed: int) -> nn.Module:
    """A randomly initialised network of built-in architecture ``base`` (a checkpoint's skeleton).

    Only torchvision names and ``tiny``: a checkpoint never makes pixelray import or call code.
    """
    if base == "tiny":
        with _seeded(init_seed):
            return tiny(num_classes)
    if _is_builtin(base):
        return _load_torchvision(base, Weights.NONE, num_classes, init_seed).net
    raise ValueError(f"base: {base!r} is not a built-in architecture ({_BUILTIN_HINT})")


_BUILTIN_HINT = "a torchvision classification model name or 'tiny'"


def _is_builtin(base: str) -> bool:
    """True for an architecture pixelray builds itself (torchvision names, tiny); never imports anything."""
    return base == "tiny" or base in torchvision_models()


def _first_line(exc: BaseException) -> str:
    """An exception's message on one line (torch's unpickling errors run to a page)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"[:300]


def sidecar_path(path: str | os.PathLike[str]) -> Path:
    """The JSON sidecar of a checkpoint: ``PATH.json`` if it exists, else the same stem ``.json``,
    else (for a run directory's ``model.pt``) the ``pixelray.json`` beside it.

    For a new checkpoint (none exists) this is ``PATH.json``, where :func:`save_checkpoint` writes.
    """
    path = Path(path)
    beside = path.with_name(path.name + ".json")
    stem = path.with_suffix(".json")
    run = path.with_name(RUN_SIDECAR_FILE)
    if beside.exists():
        return beside
    if stem.exists() and stem != path:
        return stem
    if path.name == RUN_MODEL_FILE and run.exists():
        return run
    return beside


def checkpoint_file(path: str | os.PathLike[str]) -> Path:
    """The state_dict file a ``checkpoint:PATH`` names: PATH itself, or a run directory's ``model.pt``."""
    path = Path(path).expanduser()
    if path.is_dir():
        inside = path / RUN_MODEL_FILE
        if not inside.is_file():
            raise ValueError(f"checkpoint: {path} is a directory without {RUN_MODEL_FILE}; name a run directory "
                             "of `pixelray train-augment` that finished, or the state_dict file itself")
        return inside
    return path


def _read_sidecar(path: Path) -> dict[str, Any]:
    side = sidecar_path(path)
    if not side.is_file():
        raise ValueError(f"checkpoint: {path} has no JSON sidecar; expected {side} or "
                         f"{path.with_suffix('.json')} (save checkpoints with pixelray.models.save_checkpoint)")
    try:
        meta = json.loads(side.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"checkpoint: sidecar {side} is not valid JSON ({exc}); rewrite it with "
                         "save_checkpoint or fix it by hand") from exc
    if not isinstance(meta, dict):
        raise ValueError(f"checkpoint: sidecar {side} must hold a JSON object, not {type(meta).__name__}")
    for key in ("base", "num_classes", "mean", "std"):
        if key not in meta:
            raise ValueError(f"checkpoint: sidecar {side} lacks {key!r}; it needs base, num_classes, "
                             "mean and std")
    if not isinstance(meta["base"], str) or not _is_builtin(meta["base"]):
        close = difflib.get_close_matches(str(meta["base"]).lower(), _known_names(), n=3, cutoff=0.6)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ValueError(f"checkpoint: sidecar {side}: base {meta['base']!r} is not a built-in architecture{hint} "
                         f"({_BUILTIN_HINT}); a file never names code to run: for an architecture of your own, "
                         "load the weights in your own 'module.path:factory' named in the config")
    classes = meta["num_classes"]
    if isinstance(classes, bool) or not isinstance(classes, int) or classes < 1:
        raise ValueError(f"checkpoint: sidecar {side}: num_classes {classes!r} must be an integer >= 1")
    if not isinstance(meta.get("metadata", {}), dict):
        raise ValueError(f"checkpoint: sidecar {side}: metadata must be a JSON object")
    if meta.get("label_map") is not None:
        _check_label_map(meta["label_map"], classes, side)
    try:
        meta["mean"] = _triple("mean", meta["mean"])
        meta["std"] = _triple("std", meta["std"], positive=True)
    except ValueError as exc:
        raise ValueError(f"checkpoint: sidecar {side}: {exc}") from None
    meta["_sidecar"] = str(side)
    return meta


def _check_label_map(label_map: Any, head_size: int, side: Path) -> None:
    """A sidecar's label map: ``{"labels": [data set label of each output], "num_classes": label space}``."""
    labels = label_map.get("labels") if isinstance(label_map, dict) else None
    space = label_map.get("num_classes") if isinstance(label_map, dict) else None
    try:
        LabelMap(nn.Identity(), labels if isinstance(labels, list) else [], space)  # the one check
    except ValueError as exc:
        raise ValueError(f"checkpoint: sidecar {side}: {exc}") from None
    if len(labels) != head_size:
        raise ValueError(f"checkpoint: sidecar {side}: label_map has {len(labels)} labels for a head of "
                         f"{head_size} outputs (num_classes); they must match")


def checkpoint_sidecar(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The checked sidecar of a checkpoint file or run directory (base, num_classes, label_map, metadata, ...)."""
    file = checkpoint_file(path)
    if not file.is_file():
        raise ValueError(f"checkpoint: {file} does not exist or is not a file")
    return _read_sidecar(file)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _strip_wrappers(state: dict[str, Any]) -> dict[str, Any]:
    """Drop a prefix every key shares from a wrapper (DDP ``module.``, torch.compile, Classifier)."""
    changed = True
    while changed and state:
        changed = False
        for prefix in _WRAPPER_PREFIXES:
            if all(k.startswith(prefix) for k in state):
                state = {k[len(prefix):]: v for k, v in state.items()}
                changed = True
    return state


def _load_checkpoint(spec: str, num_classes: int | None, init_seed: int) -> Classifier:
    path = checkpoint_file(spec[len(_CHECKPOINT_PREFIX):])
    if not path.is_file():
        raise ValueError(f"checkpoint: {path} does not exist or is not a file; check the path in {spec!r}")
    meta = _read_sidecar(path)
    label_map = meta.get("label_map")
    classes = label_map["num_classes"] if label_map else meta["num_classes"]
    if num_classes is not None and num_classes != classes:
        raise ValueError(f"num_classes: {num_classes} does not match the checkpoint's {classes} "
                         f"({meta['_sidecar']}); leave num_classes unset")
    if meta.get("sha256") and meta["sha256"] != _sha256(path):
        raise ValueError(f"checkpoint: {path} does not match the sha256 in {meta['_sidecar']}; the pair "
                         "was mixed up or the file changed - save it again")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - unpickling errors come in many types
        raise ValueError(f"checkpoint: {path} is not a weights-only state_dict ({_first_line(exc)}); save it "
                         "with save_checkpoint (torch.save of a state_dict)") from exc
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"checkpoint: {path} holds {type(state).__name__}, not a state_dict of tensors")
    net = _build_net(meta["base"], meta["num_classes"], init_seed)
    try:
        net.load_state_dict(_strip_wrappers(dict(state)))
    except RuntimeError as exc:  # missing, unexpected or mis-shaped tensors
        first = " ".join(str(exc).split())[:400]
        raise ValueError(f"checkpoint: {path} does not fit base {meta['base']!r} ({first}); fix 'base' "
                         f"or 'num_classes' in {meta['_sidecar']}") from exc
    if label_map:
        net = LabelMap(net, label_map["labels"], label_map["num_classes"])
    return Classifier(net, name=str(meta.get("name") or path.stem), num_classes=classes,
                      mean=meta["mean"], std=meta["std"], weights="checkpoint", source=f"checkpoint:{path}",
                      metadata=meta.get("metadata", {}))


def load_model(
    spec: str,
    weights: str | Weights | None = "imagenet",
    *,
    num_classes: int | None = None,
    init_seed: int = 0,
) -> Classifier:
    """Build a :class:`Classifier` from a model spec, in eval mode, parameters frozen.

    Args:
        spec: a torchvision classification model name, ``"tiny"``, ``"checkpoint:PATH"`` or
            ``"module.path:factory"`` (see the module docstring).
        weights: for torchvision models, ``"imagenet"`` (IMAGENET1K_V1, the paper's weights),
            ``"default"`` (torchvision's DEFAULT), an entry name such as ``"IMAGENET1K_V2"``,
            or None/``"none"`` for random init. ``"tiny"`` has no pretrained weights and needs
            ``"none"``; checkpoints and factories bring their own weights and ignore it.
        num_classes: size of the head; by default the weights' (1000 for ImageNet), 10 for tiny.
            A checkpoint, or a factory without a ``num_classes`` parameter, must already match it.
        init_seed: seed of the random init (the same in every process); the global generator
            is left as it was.

    Raises:
        ValueError: a bad spec, weights name, num_classes, or a missing or malformed checkpoint.
        WeightsMissingError: pretrained weights are not in the torch hub cache (no download is tried).
    """
    kind = _kind(spec)
    parsed = _parse_weights(weights)
    if num_classes is not None and (isinstance(num_classes, bool) or not isinstance(num_classes, int)
                                    or num_classes < 1):
        raise ValueError(f"num_classes: {num_classes!r} is invalid; it must be an integer >= 1 or None")
    if isinstance(init_seed, bool) or not isinstance(init_seed, int) or not 0 <= init_seed < 2**63:
        raise ValueError(f"init_seed: {init_seed!r} is invalid; it must be an integer in 0..2**63-1")
    if kind == "torchvision":
        model = _load_torchvision(spec, parsed, num_classes, init_seed)
    elif kind == "tiny":
        if parsed is not Weights.NONE:
            raise ValueError(f"weights: tiny has no pretrained {_weights_label(parsed)!r} weights; use "
                             "weights='none' (random init) or a trained 'checkpoint:PATH'")
        classes = 10 if num_classes is None else num_classes
        model = Classifier(_build_net("tiny", classes, init_seed), name="tiny", num_classes=classes,
                           weights="none", source=f"tiny random init (seed {init_seed})")
    elif kind == "checkpoint":
        model = _load_checkpoint(spec, num_classes, init_seed)
    else:
        model = _load_factory(spec, num_classes, init_seed)
    model.eval()
    model.requires_grad_(False)
    return model


# ---------------------------------------------------------------------------- saving


def _atomic_write(path: Path, write: Callable[[Any], None]) -> str:
    """Write a file atomically (:func:`pixelray.atomic.write_atomic`); returns the sha256 of the file as written
    (read back: torch.save's zip writer may seek)."""
    write_atomic(path, write)
    return _sha256(path)


def save_checkpoint(
    model: Classifier,
    path: str | os.PathLike[str],
    *,
    base: str,
    metadata: Mapping[str, Any] | None = None,
    name: str | None = None,
    sidecar_file: str | os.PathLike[str] | None = None,
) -> Path:
    """Save a model as a plain state_dict plus a JSON sidecar ``PATH.json``, each atomically.

    ``load_model("checkpoint:PATH")`` rebuilds it: architecture ``base`` (a torchvision name or
    ``"tiny"``; never user code), the model's num_classes and mean/std, then the
    state_dict, read with ``torch.load(weights_only=True)``. A model whose ``net`` is a
    :class:`LabelMap` (a replaced head) is saved as its bare network, with the label map in the
    sidecar, and loads back as the same :class:`LabelMap`.

    Args:
        model: the classifier to save (its ``net`` state_dict is stored, on CPU).
        path: the state_dict file, e.g. ``runs/x/model.pt``; parent folders are created.
        base: the built-in architecture the state_dict fits (a torchvision name or ``"tiny"``).
        metadata: free-form JSON-serialisable data (augmentation, data set, epochs, ...).
        name: the loaded model's name in result rows; default: the file's stem.
        sidecar_file: where the sidecar goes instead of ``PATH.json``: only ``pixelray.json`` beside a
            ``model.pt`` (a run directory), which :func:`sidecar_path` finds.

    Returns:
        The state_dict path.
    """
    if not isinstance(model, Classifier):
        raise ValueError(f"model: {type(model).__name__} is not a Classifier; wrap it or use load_model")
    if _kind(base) == "checkpoint":
        raise ValueError(f"base: {base!r} is a checkpoint; name the architecture (e.g. {model.name!r})")
    if not _is_builtin(base):
        raise ValueError(f"base: {base!r} is not a built-in architecture ({_BUILTIN_HINT}); a checkpoint may "
                         "not name code to run, so save user architectures' state_dicts yourself")
    path = Path(path).expanduser()
    if path.suffix == ".json":
        raise ValueError(f"path: {path} ends in .json, the sidecar's suffix; use e.g. model.pt")
    side = path.with_name(path.name + ".json")
    if sidecar_file is not None:
        side = Path(sidecar_file).expanduser()
        if side != path.with_name(RUN_SIDECAR_FILE) or path.name != RUN_MODEL_FILE:
            raise ValueError(f"sidecar_file: {side} is not {RUN_SIDECAR_FILE} beside {RUN_MODEL_FILE}; a sidecar "
                             f"goes at PATH.json or, in a run directory, at {RUN_SIDECAR_FILE} beside {RUN_MODEL_FILE}")
    net, head_size, label_map = model.net, model.num_classes, None
    if isinstance(net, LabelMap):
        label_map = {"labels": list(net.labels), "num_classes": net.num_classes}
        net, head_size = net.net, len(net.labels)
    sidecar = {
        "format": _SIDECAR_FORMAT,
        "version": 1,
        "base": base,
        "name": name or path.stem,
        "num_classes": head_size,
        "mean": list(model.mean),
        "std": list(model.std),
        "weights_from": model.source,
        "metadata": dict(metadata or {}),
        "torch_version": torch.__version__,
        "torchvision_version": torchvision.__version__,
    }
    if label_map is not None:
        sidecar["label_map"] = label_map
    try:
        json.dumps(sidecar, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"metadata: not JSON-serialisable ({exc}); use str, numbers, lists and dicts") from exc
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu") for k, v in net.state_dict().items()}
    sidecar["sha256"] = _atomic_write(path, lambda f: torch.save(state, f))
    text = json.dumps(sidecar, indent=2, sort_keys=True) + "\n"
    _atomic_write(side, lambda f: f.write(text.encode()))
    return path
