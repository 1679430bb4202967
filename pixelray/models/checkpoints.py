"""Checkpoints: a state_dict with its JSON sidecar (or a train-augment run directory), saved and loaded."""

from __future__ import annotations

import difflib
import hashlib
import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pixelray.core.check import is_int
from pixelray.errors import first_line, one_line
from pixelray.models.build import BUILTIN_HINT, build_net, is_builtin
from pixelray.models.registry import CHECKPOINT_PREFIX, known_names, spec_kind
from pixelray.models.wrapper import Classifier, LabelMap, triple
from pixelray.store.atomic import write_atomic

_SIDECAR_FORMAT = "pixelray.checkpoint"
_WRAPPER_PREFIXES = ("module.", "_orig_mod.", "net.")  # DDP, torch.compile, a saved Classifier

#: A run directory (``checkpoint:DIR``) holds its state_dict and sidecar under these names.
RUN_MODEL_FILE = "model.pt"
RUN_SIDECAR_FILE = "pixelray.json"


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
    """The state_dict file a ``checkpoint:PATH`` names: PATH itself, or a run directory's ``model.pt``; for a
    URI (``s3://...``), the local copy of it (:mod:`pixelray.models.remote`)."""
    from pixelray.store.storage import is_remote

    if is_remote(path):
        from pixelray.models.remote import fetch_checkpoint

        return fetch_checkpoint(os.fspath(path))
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
    if not isinstance(meta["base"], str) or not is_builtin(meta["base"]):
        close = difflib.get_close_matches(str(meta["base"]).lower(), known_names(), n=3, cutoff=0.6)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ValueError(f"checkpoint: sidecar {side}: base {meta['base']!r} is not a built-in architecture{hint} "
                         f"({BUILTIN_HINT}); a file never names code to run: for an architecture of your own, "
                         "load the weights in your own 'module.path:factory' named in the config")
    classes = meta["num_classes"]
    if not is_int(classes) or classes < 1:
        raise ValueError(f"checkpoint: sidecar {side}: num_classes {classes!r} must be an integer >= 1")
    if not isinstance(meta.get("metadata", {}), dict):
        raise ValueError(f"checkpoint: sidecar {side}: metadata must be a JSON object")
    if meta.get("label_map") is not None:
        _check_label_map(meta["label_map"], classes, side)
    try:
        meta["mean"] = triple("mean", meta["mean"])
        meta["std"] = triple("std", meta["std"], positive=True)
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


def load_checkpoint(spec: str, num_classes: int | None, init_seed: int) -> Classifier:
    path = checkpoint_file(spec[len(CHECKPOINT_PREFIX):])
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
        raise ValueError(f"checkpoint: {path} is not a weights-only state_dict "
                         f"({first_line(exc, typed=True, limit=300)}); save it "
                         "with save_checkpoint (torch.save of a state_dict)") from exc
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"checkpoint: {path} holds {type(state).__name__}, not a state_dict of tensors")
    net = build_net(meta["base"], meta["num_classes"], init_seed)
    try:
        net.load_state_dict(_strip_wrappers(dict(state)))
    except RuntimeError as exc:  # missing, unexpected or mis-shaped tensors
        first = one_line(exc, 400)
        raise ValueError(f"checkpoint: {path} does not fit base {meta['base']!r} ({first}); fix 'base' "
                         f"or 'num_classes' in {meta['_sidecar']}") from exc
    if label_map:
        net = LabelMap(net, label_map["labels"], label_map["num_classes"])
    return Classifier(net, name=str(meta.get("name") or path.stem), num_classes=classes,
                      mean=meta["mean"], std=meta["std"], weights="checkpoint", source=f"checkpoint:{path}",
                      metadata=meta.get("metadata", {}))



def _atomic_write(path: Path, write: Callable[[Any], None]) -> str:
    """Write a file atomically (:func:`pixelray.store.atomic.write_atomic`); returns the sha256 of the file as written
    (read back: torch.save's zip writer may seek)."""
    write_atomic(path, write)
    return _sha256(path)


def _torchvision_version() -> str:
    import torchvision  # here, not at the top: loading a checkpoint of the tiny CNN never imports it

    return torchvision.__version__


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
    if spec_kind(base) == "checkpoint":
        raise ValueError(f"base: {base!r} is a checkpoint; name the architecture (e.g. {model.name!r})")
    if not is_builtin(base):
        raise ValueError(f"base: {base!r} is not a built-in architecture ({BUILTIN_HINT}); a checkpoint may "
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
        "torchvision_version": _torchvision_version(),
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
