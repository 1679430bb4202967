"""Fine-tune configuration (``pixelray train-augment``): TOML or flags in, frozen validated dataclasses out.

A config names the model to fine-tune, the data, the augmentation, the optimisation and
where the run goes. A list of counts (``count = [4, 8, 16, 32, 64]``) gives one fine-tune
per count, each in its own sub-directory ``n<count>`` of the output directory: that is how
``jobs/table10.toml`` gives the paper's five models. Every mistake is refused here, before
anything is read or written, with the key, the value and the fix (as for sweep configs).

Example:
    >>> cfg = parse_train_config({"model": {"name": "tiny"}, "data": {"path": "shards"},
    ...                           "augment": {"count": [4, 8]}, "output": {"dir": "runs/t"}})
    >>> [(run.augment.change.count, run.output_dir) for run in cfg.runs]
    [(4, 'runs/t/n4'), (8, 'runs/t/n8')]
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

from pixelray.config.tomlcheck import ConfigError, check_keys, check_placeholder, get_value, read_toml
from pixelray.core.augment import Aug, Augmentation
from pixelray.core.check import is_int
from pixelray.core.spec import PixelChange
from pixelray.store.storage import join_uri

__all__ = ["FLAG_KEYS", "FineTune", "Head", "Optimizer", "TrainAugmentConfig", "load_train_config",
           "parse_train_config"]


class Head(str, Enum):
    """What happens to the model's last layer."""

    KEEP = "keep"  # the model's own classes; the data set's labels must be among them
    REPLACE = "replace"  # a new last layer for the classes present in the training images (the paper)


class Optimizer(str, Enum):
    """The optimiser of the fine-tune."""

    SGD = "sgd"  # with momentum (default 0.9)
    ADAMW = "adamw"


#: Command-line flag -> (table, key) of the config it overrides.
FLAG_KEYS: dict[str, tuple[str, str]] = {
    "model": ("model", "name"), "weights": ("model", "weights"), "head": ("model", "head"),
    "data": ("data", "path"), "eval_data": ("data", "eval_path"), "images": ("data", "images"),
    "aug": ("augment", "aug"), "count": ("augment", "count"),
    "epochs": ("train", "epochs"), "lr": ("train", "lr"), "batch_size": ("train", "batch_size"),
    "seed": ("train", "seed"), "workers": ("run", "workers"), "use_gpu": ("run", "use_gpu"),
    "output_dir": ("output", "dir"),
}

_TABLES = {
    "model": {"name", "weights", "head"},
    "data": {"path", "eval_path", "images", "eval_images", "holdout", "split_seed"},
    "augment": {"aug", "count", "amplitude", "area", "channels", "positions", "fraction", "sigma"},
    "train": {"epochs", "lr", "optimizer", "momentum", "weight_decay", "batch_size", "seed"},
    "run": {"workers", "use_gpu", "amp", "threads", "cpus_per_worker", "max_failures", "huge_pages"},
    "output": {"dir"},
}


@dataclass(frozen=True)
class FineTune:
    """One fine-tune: everything its driver and its workers need, validated.

    Attributes:
        model: a torchvision name, ``"tiny"`` or ``"checkpoint:PATH"`` (a file or a run directory).
        weights: ``"imagenet"``, ``"default"`` or None (random init; checkpoints bring their own).
        data: the training data set (shards); ``eval_data``: the held-out one, or None for a
            held-out split of ``data`` by image id (``holdout`` of the ids, keyed by ``split_seed``).
        images: training images (the lowest of a seeded permutation of the ids); None: all.
        eval_images: held-out images evaluated after each epoch (lowest of the same permutation).
        augment: the augmentation and the pixel change it applies and probes with.
        head: keep the model's classes or replace the last layer.
        epochs, lr, optimizer, momentum, weight_decay, batch_size (global, split over the
            workers), seed: the optimisation.
        workers, use_gpu, amp, threads, cpus_per_worker, max_failures: how it runs.
        output_dir: the run directory.
    """

    model: str
    data: str
    output_dir: str
    augment: Augmentation
    weights: str | None = None
    eval_data: str | None = None
    images: int | None = None
    eval_images: int | None = 1000
    holdout: float = 0.2
    split_seed: int = 0
    head: Head = Head.KEEP
    epochs: int = 20
    lr: float = 0.001
    optimizer: Optimizer = Optimizer.SGD
    momentum: float = 0.9
    weight_decay: float = 0.0
    batch_size: int = 32
    seed: int = 0
    workers: int = 1
    use_gpu: bool = False
    amp: bool = False
    threads: int | None = None
    cpus_per_worker: float = 1.0
    max_failures: int = 3
    huge_pages: bool = True  # CPU workers back large tensors with transparent huge pages (same bits, faster)

    def identity(self) -> dict[str, Any]:
        """What determines the result (not where it goes or how fast it runs)."""
        return {
            "model": self.model, "weights": self.weights, "data": self.data, "eval_data": self.eval_data,
            "images": self.images, "eval_images": self.eval_images,
            "holdout": None if self.eval_data else self.holdout, "split_seed": self.split_seed,
            "augment": self.augment.identity(), "head": self.head.value, "epochs": self.epochs, "lr": self.lr,
            "optimizer": self.optimizer.value,
            "momentum": self.momentum if self.optimizer is Optimizer.SGD else None,
            "weight_decay": self.weight_decay, "batch_size": self.batch_size, "seed": self.seed,
            "workers": self.workers, "amp": self.amp,
        }

    @property
    def config_hash(self) -> str:
        """Short stable hash of :meth:`identity`."""
        blob = json.dumps(self.identity(), sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


@dataclass(frozen=True)
class TrainAugmentConfig:
    """A whole ``train-augment`` invocation: one :class:`FineTune` per count."""

    runs: tuple[FineTune, ...]
    output_dir: str

    def check_placeholders(self) -> None:
        """ConfigError for a path still holding an example's placeholder (``s3://YOUR-BUCKET/...``): checked
        when the fine-tunes start, not when a config is read (the example configs are valid templates)."""
        for run in self.runs:
            if run.model.startswith("checkpoint:"):
                check_placeholder(run.model, "[model] name", "--model")
            check_placeholder(run.data, "[data] path", "--data")
            check_placeholder(run.eval_data, "[data] eval_path", "--eval-data")
        check_placeholder(self.output_dir, "[output] dir", "--out")


def _number(table: dict, key: str, where: str, default: Any, check, need: str) -> Any:
    value = get_value(table, key, where, (int, float), default, fix=need)
    if value is not None and (not math.isfinite(value) or not check(value)):
        raise ConfigError(f"[{where}] {key} = {value!r}: {need}")
    return value


def _int(table: dict, key: str, where: str, default: Any, low: int, need: str) -> Any:
    value = get_value(table, key, where, int, default, fix=need)
    if value is not None and value < low:
        raise ConfigError(f"[{where}] {key} = {value!r}: {need}")
    return value


def _choice(table: dict, key: str, where: str, enum: type[Enum], default: str) -> Any:
    value = get_value(table, key, where, str, default, fix=f"one of {[e.value for e in enum]}")
    try:
        return enum(value)
    except ValueError:
        raise ConfigError(f"[{where}] {key} = {value!r}: unknown; allowed: {[e.value for e in enum]}") from None


def _model(table: dict) -> tuple[str, str | None]:
    from pixelray.models import resolve_models

    name = get_value(table, "name", "model", str, fix="pass --model NAME or set [model] name, e.g. 'resnet101'")
    try:
        resolve_models([name])  # the form of the spec, with close matches for a typo; nothing is loaded
    except ValueError as exc:
        raise ConfigError(f"[model] name = {name!r}: {exc}") from None
    builtin = name == "tiny" or name.startswith("checkpoint:") or ":" not in name
    if not builtin:
        raise ConfigError(f"[model] name = {name!r}: train-augment fine-tunes built-in architectures (a torchvision "
                          "name, 'tiny') or a checkpoint of one; a checkpoint's sidecar may name only those")
    own = name == "tiny" or name.startswith("checkpoint:")
    weights = get_value(table, "weights", "model", str, "none" if own else "imagenet",
                   fix="'imagenet', 'default' or 'none'")
    if weights not in ("imagenet", "default", "none"):
        raise ConfigError(f"[model] weights = {weights!r}: allowed: 'imagenet', 'default', 'none'")
    if own and weights != "none":
        raise ConfigError(f"[model] weights = {weights!r}: {name!r} brings its own weights (tiny has no pretrained "
                          "ones); set weights = 'none' (--weights none)")
    return name, None if weights == "none" else weights


def _augment(table: dict) -> tuple[Aug, list[PixelChange | None], float, float]:
    where = "augment"
    kind = _choice(table, "aug", where, Aug, "pixels")
    counts = get_value(table, "count", where, (int, list), None, fix="an integer >= 1 or a list, e.g. [4, 8, 16]")
    many = isinstance(counts, list)
    counts = counts if many else [counts]
    if many and (not counts or len(set(map(str, counts))) != len(counts)):
        raise ConfigError(f"[augment] count = {counts!r}: expected a non-empty list of distinct integers")
    if kind is Aug.PIXELS and counts == [None]:
        raise ConfigError("[augment] count: missing; aug = 'pixels' needs count = N (--count N)")
    channels = table.get("channels", "all")
    amplitude = table.get("amplitude", "full")
    area = table.get("area")
    positions = get_value(table, "positions", where, str, "per-image", fix="'per-image' or 'shared'")
    changes: list[PixelChange | None] = []
    for count in counts:
        if count is None:
            changes.append(None)
            continue
        if not is_int(count):
            raise ConfigError(f"[augment] count = {count!r}: expected an integer >= 1")
        try:
            changes.append(PixelChange(count, amplitude, area, channels, positions))
        except ValueError as exc:
            raise ConfigError(f"[augment] {exc}") from None
    fraction = _number(table, "fraction", where, 1.0, lambda v: 0 < v <= 1, "a number in (0, 1], e.g. 0.5")
    sigma = _number(table, "sigma", where, 8.0, lambda v: v > 0, "a positive number of pixel units, e.g. 8")
    return kind, changes, fraction, sigma


def parse_train_config(
    raw: dict[str, Any], source: str = "<config>", overrides: dict[str, Any] | None = None
) -> TrainAugmentConfig:
    """Validate a parsed TOML document (possibly empty) and command-line ``overrides`` into runs.

    ``overrides`` maps flag names (:data:`FLAG_KEYS`) to values; None values are ignored.
    """
    raw = {k: dict(v) if isinstance(v, dict) else v for k, v in raw.items()}
    for flag, value in (overrides or {}).items():
        if value is not None:
            table, key = FLAG_KEYS[flag]
            raw.setdefault(table, {})
            if isinstance(raw[table], dict):
                raw[table][key] = value
    check_keys(raw, set(_TABLES), source)
    tables = {}
    for name, allowed in _TABLES.items():
        tables[name] = get_value(raw, name, source, dict, {}, fix=f"make [{name}] a table")
        check_keys(tables[name], allowed, name)
    model, weights = _model(tables["model"])
    head = _choice(tables["model"], "head", "model", Head, "keep")

    data_t = tables["data"]
    data = get_value(data_t, "path", "data", str, fix="pass --data DIR or set [data] path, a directory of shards")
    eval_data = get_value(data_t, "eval_path", "data", str, None, fix="a directory of held-out shards")
    images = _int(data_t, "images", "data", None, 1, "a positive number of training images, or omit it for all")
    eval_images = _int(data_t, "eval_images", "data", 1000, 1, "a positive number of held-out images")
    holdout = _number(data_t, "holdout", "data", 0.2, lambda v: 0 < v < 1, "a fraction in (0, 1), e.g. 0.2")
    split_seed = _int(data_t, "split_seed", "data", 0, 0, "an integer >= 0")

    kind, changes, fraction, sigma = _augment(tables["augment"])

    tr = tables["train"]
    epochs = _int(tr, "epochs", "train", 20, 1, "an integer >= 1 (--epochs)")
    lr = _number(tr, "lr", "train", 0.001, lambda v: v > 0, "a positive learning rate, e.g. 0.001 (--lr)")
    optimizer = _choice(tr, "optimizer", "train", Optimizer, "sgd")
    momentum = _number(tr, "momentum", "train", 0.9, lambda v: 0 <= v < 1, "a number in [0, 1), e.g. 0.9")
    weight_decay = _number(tr, "weight_decay", "train", 0.0, lambda v: v >= 0, "a number >= 0")
    batch_size = _int(tr, "batch_size", "train", 32, 1, "an integer >= 1 (images per step, all workers)")
    seed = _int(tr, "seed", "train", 0, 0, "an integer in 0..2**31-1")
    if seed >= 2**31:
        raise ConfigError(f"[train] seed = {seed}: an integer in 0..2**31-1")

    run = tables["run"]
    workers = _int(run, "workers", "run", 1, 1, "an integer >= 1 (--workers)")
    if batch_size < workers:
        raise ConfigError(f"[train] batch_size = {batch_size}: smaller than workers = {workers}; every worker "
                          "needs at least one image per step")
    use_gpu = get_value(run, "use_gpu", "run", bool, False, fix="true or false")
    amp = get_value(run, "amp", "run", bool, False, fix="true or false (bf16 autocast)")
    threads = _int(run, "threads", "run", None, 1, "an integer >= 1 (torch threads per worker)")
    cpus = _number(run, "cpus_per_worker", "run", 1.0, lambda v: v > 0, "a positive number of CPUs")
    max_failures = _int(run, "max_failures", "run", 3, -1, "an integer >= 0, or -1 for no limit")
    huge_pages = get_value(run, "huge_pages", "run", bool, True, fix="true or false")

    out = get_value(tables["output"], "dir", "output", str, None, fix="a directory")
    if not out:
        raise ConfigError(f"{source}: no output directory; add [output] dir = 'runs/NAME' or pass --out DIR")
    many = isinstance(tables["augment"].get("count"), list)
    runs = []
    for change in changes:
        try:
            augment = Augmentation(kind, change, fraction, sigma)
        except ValueError as exc:
            raise ConfigError(f"[augment] {exc}") from None
        run_dir = join_uri(out, f"n{change.count}") if many and change is not None else out
        runs.append(FineTune(
            model=model, data=data, output_dir=run_dir, augment=augment, weights=weights, eval_data=eval_data,
            images=images, eval_images=eval_images, holdout=float(holdout), split_seed=split_seed, head=head,
            epochs=epochs, lr=float(lr), optimizer=optimizer, momentum=float(momentum),
            weight_decay=float(weight_decay), batch_size=batch_size, seed=seed, workers=workers, use_gpu=use_gpu,
            amp=amp, threads=threads, cpus_per_worker=float(cpus), max_failures=max_failures, huge_pages=huge_pages,
        ))
    return TrainAugmentConfig(tuple(runs), out)


def load_train_config(path: str | Path | None, overrides: dict[str, Any] | None = None) -> TrainAugmentConfig:
    """Read and validate a TOML fine-tune config (None: the flags alone)."""
    if path is None:
        return parse_train_config({}, "<flags>", overrides)
    return parse_train_config(read_toml(path), str(path), overrides)
