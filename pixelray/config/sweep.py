"""Sweep configuration: TOML in, frozen validated dataclasses out.

A config names the data, the models, the evaluation set and the grid, either as
one cross product (``[grid]``) or as named experiments (``[[experiment]]``), and
optionally an adversarial attack (``[attack]``, see :class:`AttackConfig`) whose
examples go through the same grid. Every mistake is refused here, before any
work starts, with the key, the value and the fix.

Example:
    >>> cfg = parse_config({"data": {"path": "shards"}, "models": {"names": ["tiny"], "weights": "none"},
    ...                     "grid": {"counts": [4, 8]}, "output": {"dir": "out"}})
    >>> [c.cell_id for _, c in cfg.cells(image_size=(32, 32))]
    ['n4-full-whole-all-per-image-seed0', 'n8-full-whole-all-per-image-seed0']
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from enum import Enum
from pathlib import Path
from typing import Any

from pixelray.config.attack import AttackConfig, Keep, parse_attacks
from pixelray.config.run import check_run, parse_throughput, run_fields
from pixelray.config.tomlcheck import ConfigError, check_keys, check_placeholder, get_value, int_list, read_toml
from pixelray.core.ladder import FAMILY as LADDER_FAMILY
from pixelray.core.ladder import SEARCHES, Ladder
from pixelray.core.spec import CORRUPTIONS, PIXEL_CHANGE, Cell, Corruption, PixelChange, parse_channels
from pixelray.core.worst import WorstCase

__all__ = [
    "AttackConfig",
    "ConfigError",
    "Experiment",
    "Filter",
    "Keep",
    "SweepConfig",
    "Verify",
    "load_config",
    "parse_config",
]


class Filter(str, Enum):
    """Which images enter the evaluation set after the clean pass."""

    ALL = "all"  # images every model classifies correctly (the paper)
    PER_MODEL = "per-model"  # images each model classifies correctly, per model
    NONE = "none"  # every image


class Verify(str, Enum):
    """How a worker checks each shard it reads against the manifest."""

    AUTO = "auto"  # sha256 for local files, basic for object stores
    SHA256 = "sha256"  # basic, plus the whole file's sha256 (once per shard and worker)
    BASIC = "basic"  # rows, image shape, id range, labels


@dataclass(frozen=True)
class Experiment:
    """A named grid: counts x amplitudes x areas x channels (x the config's seeds).

    With ``family`` other than ``pixel_change`` (e.g. ``impulse_noise``) the grid is the
    corruption's ``severities`` instead. With ``family = "pixels_to_failure"`` it is one ladder
    (:class:`~pixelray.core.ladder.Ladder`) per seed: the one amplitude, area and channels, and
    ``ladder`` = (steps_per_octave, max_count, search, refine).
    """

    name: str
    counts: tuple[int, ...]
    amplitudes: tuple[int | str, ...] = ("full",)
    areas: tuple[int | None, ...] = (None,)
    channels: tuple[str | tuple[int, ...], ...] = ("all",)
    positions: str = "per-image"
    family: str = PIXEL_CHANGE
    severities: tuple[int, ...] = ()
    ladder: tuple[int, int | None, str, bool] | None = None

    def identity(self) -> dict[str, Any]:
        """What determines its cells; a pixel-change grid's reads as before corruptions existed (same hash),
        and every grid's as before ladders existed."""
        out = asdict(self)
        if self.family == PIXEL_CHANGE:
            del out["family"], out["severities"]
        if self.ladder is None:
            del out["ladder"]
        return out

    def ladders(self, seeds: tuple[int, ...], image_size: tuple[int, int] | None = None) -> list[Ladder]:
        """This experiment's ladders, one per seed (none unless ``family = "pixels_to_failure"``)."""
        if self.ladder is None:
            return []
        steps, top, search, refine = self.ladder
        out = []
        for seed in seeds:
            ladder = Ladder(self.amplitudes[0], self.areas[0], self.channels[0], seed, steps, top,  # type: ignore[arg-type]
                            search, refine)
            out.append(ladder if image_size is None else ladder.for_image(*image_size))
        return out

    def changes(self, image_size: tuple[int, int] | None = None) -> list[PixelChange | Corruption]:
        """Every change of this experiment; an area equal to a square image is the whole image."""
        if self.ladder is not None:
            return []
        if self.family != PIXEL_CHANGE:
            return [Corruption(self.family, severity) for severity in self.severities]
        out = []
        for count in self.counts:
            for amplitude in self.amplitudes:
                for area in self.areas:
                    if image_size and area is not None and image_size[0] == image_size[1] == area:
                        area = None
                    for channels in self.channels:
                        out.append(PixelChange(count, amplitude, area, channels, self.positions))
        return out


@dataclass(frozen=True)
class SweepConfig:
    """A whole sweep: data, models, evaluation set, experiments, output and run settings."""

    data: str
    models: tuple[str, ...]
    experiments: tuple[Experiment, ...]
    output_dir: str
    weights: str | None = "imagenet"
    filter: Filter = Filter.ALL
    eval_size: int | None = None
    seeds: tuple[int, ...] = (0,)
    batch_size: int = 64
    device: str = "auto"
    workers: int | None = None  # CPU workers
    gpus: int | str | None = None  # GPU workers: N, "M..N" (at least M, up to N) or "all" (config.run.gpu_range)
    placement_timeout: float = 600.0  # seconds a worker may wait to be placed: then given up, or the sweep stops
    threads: int | None = None
    amp: bool | str = False  # autocast: True (fp16 on CUDA, bf16 on CPU), "bf16" or "fp16"
    metrics_port: int | None = None
    metrics_host: str = "127.0.0.1"
    metrics_linger: float = 5.0  # seconds the metrics endpoint stays up after the final tables
    verify: Verify = Verify.AUTO
    attacks: tuple[AttackConfig, ...] = ()  # [attack], or several [[attack]] tables
    cells_per_pass: int | None = None  # cells per forward pass (cells x images); None: fill batch_size images
    cuda_graphs: bool = False  # replay the cells' passes from CUDA graphs (CUDA only; off until trusted)
    huge_pages: bool = True  # CPU workers back large tensors with transparent huge pages (same bits, faster)
    save_adversarial: str | None = None  # directory for adversarial image shards (optional)
    max_cost: int | None = None  # refuse a sweep whose plan forwards more images than this (all models)
    max_hours: float | None = None  # ... or whose estimated device time (under ``throughput``) is above this
    throughput: tuple[str, ...] = ()  # '[MODEL=]IMAGES_PER_S[:GRAD]' (pixelray.sweep.estimate.parse_throughput)

    @property
    def attack_runs(self) -> tuple[AttackConfig, ...]:
        """The attacks of the attack phase (every ``[attack]`` but the worst-case ladders)."""
        return tuple(a for a in self.attacks if a.ladder is None)

    def worst_cases(self) -> list[tuple[str, WorstCase]]:
        """(attack name, worst-case ladder) of each ``[attack] ladder = true``, in config order."""
        return [(a.name, a.worst_case()) for a in self.attacks if a.ladder is not None]

    def check_attacks(self, image_size: tuple[int, int]) -> None:
        """ConfigError for an attack's ``k`` or a worst-case ladder that the images cannot hold."""
        for i, attack in enumerate(self.attacks):
            try:
                attack.check_image(*image_size)
            except ValueError as exc:
                raise ConfigError(f"[{'attack' if len(self.attacks) == 1 else f'attack #{i + 1}'}] {exc}") from None

    def cells(self, image_size: tuple[int, int] | None = None) -> list[tuple[str, Cell]]:
        """(experiment name, cell) pairs in config order; a cell may appear under several experiments."""
        pairs = []
        for exp in self.experiments:
            for change in exp.changes(image_size):
                if image_size is not None:
                    try:
                        change.check_image(*image_size)
                    except ValueError as exc:
                        raise ConfigError(f"experiment {exp.name!r}: {exc}") from None
                for seed in self.seeds:
                    pairs.append((exp.name, Cell(change, seed)))
        return pairs

    def ladders(self, image_size: tuple[int, int] | None = None) -> list[tuple[str, Ladder]]:
        """(experiment name, ladder) pairs of the ``pixels_to_failure`` experiments, in config order."""
        pairs = []
        for exp in self.experiments:
            for ladder in exp.ladders(self.seeds, image_size):
                if image_size is not None:
                    try:
                        ladder.check_image(*image_size)
                    except ValueError as exc:
                        raise ConfigError(f"experiment {exp.name!r}: {exc}") from None
                pairs.append((exp.name, ladder))
        return pairs

    def check_placeholders(self) -> None:
        """ConfigError for a path still holding an example's placeholder (``s3://YOUR-BUCKET/...``): checked
        when a sweep starts, not when a config is read (the example configs are valid templates)."""
        check_placeholder(self.data, "[data] path", "--data")
        for name in self.models:
            if name.startswith("checkpoint:"):
                check_placeholder(name, "[models] names")
        check_placeholder(self.output_dir, "[output] dir", "--out")
        check_placeholder(self.save_adversarial, "[output] save_adversarial", "--save-adversarial")

    def unique_cells(self, image_size: tuple[int, int] | None = None) -> list[Cell]:
        """Each distinct cell once (cells shared by experiments are evaluated once)."""
        return list(dict.fromkeys(cell for _, cell in self.cells(image_size)))

    def identity(self) -> dict[str, Any]:
        """What determines the results (not where they go or how fast they run)."""
        return {
            "data": self.data,
            "models": list(self.models),
            "weights": self.weights,
            "filter": self.filter.value,
            "eval_size": self.eval_size,
            "seeds": list(self.seeds),
            "experiments": [e.identity() for e in self.experiments],
            # only when present, so that a config without [attack] keeps its hash, and one attack as before
            **({"attack": self.attacks[0].identity()} if len(self.attacks) == 1 else {}),
            **({"attacks": [a.identity() for a in self.attacks]} if len(self.attacks) > 1 else {}),
        }

    @property
    def config_hash(self) -> str:
        """Short stable hash of :meth:`identity`."""
        blob = json.dumps(self.identity(), sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


_TOP_KEYS = {"data", "models", "eval", "grid", "experiment", "attack", "output", "run"}


def _corruption_experiment(table: dict, where: str, name: str, family: str) -> Experiment:
    check_keys(table, {"name", "family", "severities"}, where)
    if family not in CORRUPTIONS:
        raise ConfigError(f"[{where}] family = {family!r}: unknown; allowed: "
                          f"{[PIXEL_CHANGE, LADDER_FAMILY, *sorted(CORRUPTIONS)]}")
    levels = sorted(CORRUPTIONS[family])
    severities = int_list(table, "severities", where, tuple(levels))
    bad = [v for v in severities if v not in levels]
    if bad or len(set(severities)) != len(severities):
        raise ConfigError(f"[{where}] severities = {list(severities)!r}: distinct values from {levels}")
    return Experiment(name, (), family=family, severities=severities)


def _ladder_experiment(table: dict, where: str, name: str) -> Experiment:
    """``family = "pixels_to_failure"``: one ladder's change (amplitude, area, channels) and its search."""
    check_keys(table, {"name", "family", "amplitude", "area", "channels", "steps_per_octave", "max_count", "search",
                       "refine"}, where)
    amplitude = get_value(table, "amplitude", where, (str, int), "full", fix="'full' or an integer shift 1..255")
    area = get_value(table, "area", where, (str, int), None, fix="a square side in pixels, or 'whole'")
    area = None if area in ("whole", "all") else area
    channels = get_value(table, "channels", where, (str, int, list), "all", fix="'all', or e.g. ['R'] or [0, 2]")
    steps = get_value(table, "steps_per_octave", where, int, 4, fix="ladder points per doubling, e.g. 4")
    top = get_value(table, "max_count", where, int, None, fix="the last count, or omit it for the whole area")
    search = get_value(table, "search", where, str, "scan", fix=f"one of {list(SEARCHES)}")
    refine = get_value(table, "refine", where, bool, False, fix="true or false")
    try:
        ladder = Ladder(amplitude, area, channels, 0, steps, top, search, refine)
    except ValueError as exc:
        raise ConfigError(f"[{where}] {exc}") from None
    return Experiment(name, (), (ladder.amplitude,), (ladder.area,), (ladder.channels,), family=LADDER_FAMILY,
                      ladder=(steps, top, search, refine))


def _experiment(table: dict, where: str, name: str) -> Experiment:
    family = get_value(table, "family", where, str, PIXEL_CHANGE, fix="e.g. family = 'impulse_noise'")
    if family == LADDER_FAMILY:
        return _ladder_experiment(table, where, name)
    if family != PIXEL_CHANGE:
        return _corruption_experiment(table, where, name, family)
    allowed = {"name", "family", "counts", "amplitudes", "areas", "channels", "positions"}
    check_keys(table, allowed, where)
    counts = int_list(table, "counts", where)
    amplitudes = tuple(get_value(table, "amplitudes", where, list, ["full"], fix="e.g. ['full', 10, 40]"))
    areas = tuple(None if a in ("whole", "all") else a for a in get_value(table, "areas", where, list, [None]))
    channels = tuple(get_value(table, "channels", where, list, ["all"], fix="e.g. ['all'] or [[0]]"))
    positions = get_value(table, "positions", where, str, "per-image")
    exp = Experiment(name, counts, amplitudes, areas, channels, positions)
    try:
        normal = [parse_channels(c) for c in channels]
        exp = Experiment(name, counts, amplitudes, areas, tuple(normal), positions)
        exp.changes()
    except ValueError as exc:
        raise ConfigError(f"[{where}] {exc}") from None
    return exp


def _weights(value: Any, names: tuple[str, ...]) -> str | None:
    """``[models] weights``: 'imagenet', 'default', 'none' or a weights entry such as 'IMAGENET1K_V2'
    (the model registry's own names), checked against every torchvision model of the sweep."""
    from pixelray.models import check_weights_entry

    allowed = "'imagenet', 'default', 'none' or a torchvision weights entry such as 'IMAGENET1K_V2'"
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"[models] weights = {value!r}: allowed: {allowed}")
    try:
        label = check_weights_entry(value, names)
    except ValueError as exc:
        raise ConfigError(f"[models] weights = {value!r}: {exc}") from None
    return None if label == "none" else label


def parse_config(raw: dict[str, Any], source: str = "<config>", overrides: dict[str, Any] | None = None) -> SweepConfig:
    """Validate a parsed TOML document into a :class:`SweepConfig`.

    ``overrides`` (e.g. ``{"output_dir": ...}`` from the command line) replace fields.
    """
    check_keys(raw, _TOP_KEYS, source)
    # each section's fields of SweepConfig, checked in this order (the first mistake is the one reported)
    fields: dict[str, Any] = {
        **_data_fields(raw, source),
        **_model_fields(raw, source),
        **_eval_fields(raw, source),
        "experiments": _experiments(raw, source),
        "attacks": parse_attacks(raw, source),
        **_output_fields(raw, source),
        **run_fields(raw, source),
    }
    for key, value in (overrides or {}).items():
        if value is not None:
            fields[key] = value
    check_run(fields)
    if fields["throughput"]:
        parse_throughput(fields["throughput"], fields["models"])  # names only this config's models
    if fields["save_adversarial"] and not fields["attacks"]:
        raise ConfigError(f"{source}: save_adversarial = {fields['save_adversarial']!r} but there is no [attack] "
                          "section; add [attack] kind = 'fgsm' or drop the option")
    if not fields["output_dir"]:
        raise ConfigError(f"{source}: no output directory; add [output] dir = 'results/NAME' or pass --out DIR")
    return SweepConfig(**fields)


def _data_fields(raw: dict, source: str) -> dict[str, Any]:
    """``[data]``: the path of the shards and how workers verify them."""
    data = get_value(raw, "data", source, dict, fix="add [data] path = 'DIR'")
    check_keys(data, {"path", "verify"}, "data")
    data_path = get_value(data, "path", "data", str, fix="a local directory of shards or a URI such as s3://bucket/shards")
    verify = get_value(data, "verify", "data", str, "auto")
    try:
        verify = Verify(verify)
    except ValueError:
        raise ConfigError(f"[data] verify = {verify!r}: allowed: {[v.value for v in Verify]}") from None
    return {"data": data_path, "verify": verify}


def _model_names(models_t: dict) -> tuple[str, ...]:
    """``[models] names`` (after a ``preset``'s, if any), each a well-formed spec named once."""
    if "preset" in models_t:
        from pixelray.models import PRESETS  # light import: the registry table only

        preset = get_value(models_t, "preset", "models", str)
        if preset not in PRESETS:
            raise ConfigError(f"[models] preset = {preset!r}: unknown; allowed: {sorted(PRESETS)}")
        names = tuple(PRESETS[preset]) + tuple(models_t.get("names", ()))
    else:
        names = tuple(get_value(models_t, "names", "models", list, fix="e.g. names = ['resnet101', 'vgg16']"))
    if not names or not all(isinstance(n, str) and n for n in names):
        raise ConfigError(f"[models] names = {list(names)!r}: expected a non-empty list of model names")
    if len(set(names)) != len(names):
        raise ConfigError(f"[models] names = {list(names)!r}: each model may appear once")
    from pixelray.models import resolve_models

    try:
        resolve_models(list(names))  # the form of each spec, with close matches for a typo; nothing is loaded
    except ValueError as exc:
        raise ConfigError(f"[models] {exc}") from None
    return names


def _model_fields(raw: dict, source: str) -> dict[str, Any]:
    """``[models]``: the model names and their weights."""
    models_t = get_value(raw, "models", source, dict, fix="add [models] names = ['resnet101'] or preset = 'paper'")
    check_keys(models_t, {"names", "preset", "weights"}, "models")
    names = _model_names(models_t)
    weights = _weights(models_t.get("weights", "imagenet"), names)
    if weights is not None and "tiny" in names:
        raise ConfigError(f"[models] weights = {weights!r}: 'tiny' has no pretrained weights; "
                          "set weights = 'none' (random init) or name a trained 'checkpoint:PATH'")
    return {"models": names, "weights": weights}


def _eval_fields(raw: dict, source: str) -> dict[str, Any]:
    """``[eval]``: the filter, the evaluation set's size, the seeds and the batch size."""
    ev = get_value(raw, "eval", source, dict, {})
    check_keys(ev, {"filter", "size", "seeds", "batch_size"}, "eval")
    try:
        filt = Filter(ev.get("filter", "all"))
    except ValueError:
        raise ConfigError(
            f"[eval] filter = {ev.get('filter')!r}: allowed: {[f.value for f in Filter]}"
        ) from None
    size = get_value(ev, "size", "eval", int, None, fix="a positive number of images, or omit it for all")
    if size is not None and size < 1:
        raise ConfigError(f"[eval] size = {size}: must be >= 1, or omit it for all images")
    seeds = int_list(ev, "seeds", "eval", (0,))
    if any(not 0 <= s < 2**31 for s in seeds) or len(set(seeds)) != len(seeds):
        raise ConfigError(f"[eval] seeds = {list(seeds)}: distinct integers in 0..2**31-1")
    batch_size = get_value(ev, "batch_size", "eval", int, 64)
    if batch_size < 1:
        raise ConfigError(f"[eval] batch_size = {batch_size}: must be >= 1")
    return {"filter": filt, "eval_size": size, "seeds": seeds, "batch_size": batch_size}


def _experiments(raw: dict, source: str) -> tuple[Experiment, ...]:
    """``[grid]`` and the ``[[experiment]]`` tables, in that order: at least one, names distinct."""
    experiments: list[Experiment] = []
    if "grid" in raw:
        experiments.append(_experiment(get_value(raw, "grid", source, dict), "grid", "grid"))
    for i, table in enumerate(get_value(raw, "experiment", source, list, [])):
        where = f"experiment #{i + 1}"
        if not isinstance(table, dict):
            raise ConfigError(f"[{where}] expected a table [[experiment]]")
        name = get_value(table, "name", where, str, fix="give each [[experiment]] a name")
        experiments.append(_experiment(table, f"experiment {name!r}", name))
    if not experiments:
        raise ConfigError(f"{source}: no grid; add [grid] counts = [...] or one or more [[experiment]] tables")
    names_seen = [e.name for e in experiments]
    if len(set(names_seen)) != len(names_seen):
        raise ConfigError(f"experiment names must be distinct, got {names_seen}")
    return tuple(experiments)


def _output_fields(raw: dict, source: str) -> dict[str, Any]:
    """``[output]``: where the results go, and the adversarial examples (optional)."""
    out = get_value(raw, "output", source, dict, {})
    check_keys(out, {"dir", "save_adversarial"}, "output")
    output_dir = get_value(out, "dir", "output", str, None)
    save_adversarial = get_value(out, "save_adversarial", "output", str, None, fix="a directory for adversarial shards")
    return {"output_dir": output_dir, "save_adversarial": save_adversarial}


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> SweepConfig:
    """Read and validate a TOML sweep config."""
    return parse_config(read_toml(path), str(path), overrides)
