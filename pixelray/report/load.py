"""Read sweep output directories into DataFrames, refusing anything that is not one.

A run directory is untrusted input: every table is checked against its schema
(``pixelray.store.schemas``) and its counts against each other before the report uses
it, and a wrong directory gets one sentence that names the path and the fix.
Nothing here writes a file, joins Ray or loads a model; checkpoint sidecars are
read as plain JSON for their name, base architecture and augmentation.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from pixelray.core.check import is_int
from pixelray.core.ladder import Ladder
from pixelray.errors import first_line
from pixelray.store.schemas import ATTACK_SCHEMA, CELLS_SCHEMA, FAILURE_SCHEMA, TRANSFER_SCHEMA

__all__ = ["ModelInfo", "ReportError", "Run", "load_runs"]

_SWEEP_HINT = "give the output directory of `pixelray sweep` (the one holding cells.parquet and run.json)"


class ReportError(ValueError):
    """A run directory the report cannot use; the message names the path and the fix."""


@dataclass(frozen=True)
class ModelInfo:
    """What the report knows of one model spec of a run.

    Attributes:
        spec: the model as the results name it (``resnet101``, ``checkpoint:PATH``, ...).
        label: a short, unique display name.
        base: the architecture: the spec itself, or a checkpoint sidecar's ``base``.
        augment_count: n of the n-pixel-change augmentation a checkpoint was trained with (None: none known).
        sidecar: the checkpoint's sidecar fields shown as provenance (empty for other models).
    """

    spec: str
    label: str
    base: str
    augment_count: int | None = None
    sidecar: dict[str, Any] = field(default_factory=dict)
    started_from: str | None = None  # the model a `pixelray train-augment` fine-tune started from

    @property
    def fine_tuned(self) -> bool:
        """Trained with n-pixel-change augmentation."""
        return self.augment_count is not None

    @property
    def derived(self) -> bool:
        """Fine-tuned from another model (augmented, or the ``aug = "none"`` control)."""
        return self.fine_tuned or self.started_from is not None

    def fine_tuned_from(self, base: ModelInfo) -> bool:
        """This model was fine-tuned from ``base``: the model its sidecar says it started from (the same spec,
        or a checkpoint of the same file name), else, where it does not say, the same architecture."""
        if self.started_from is None:
            return self.base == base.base
        if self.started_from == base.spec:
            return True
        ours, theirs = self.started_from.split(":", 1), base.spec.split(":", 1)
        return ours[0] == theirs[0] == "checkpoint" and Path(ours[1]).name == Path(theirs[1]).name


@dataclass
class Run:
    """One sweep output directory, read and checked."""

    path: Path
    name: str
    cells: pd.DataFrame
    clean: pd.DataFrame | None = None  # model, n_images, n_correct (per model, over every image)
    attack: pd.DataFrame | None = None
    transfer: pd.DataFrame | None = None
    corruptions: pd.DataFrame | None = None  # rows of a corruption family (impulse noise, ...), not pixel changes
    failure: pd.DataFrame | None = None  # failure.parquet: pixels to failure per (model, ladder, image)
    meta: dict[str, Any] = field(default_factory=dict)  # run.json
    stats: dict[str, Any] = field(default_factory=dict)  # stats.json
    image_ids: dict[str, int] = field(default_factory=dict)  # file (relative to the run) -> ids listed
    models: dict[str, ModelInfo] = field(default_factory=dict)


#: Columns that results written by earlier versions lack, and the value they read as (None: empty).
_LATER_COLUMNS = {
    "n_restored": None, "restored_rate": None, "attack_params": None, "family": "pixel_change", "severity": None,
    "equivalent_pixels": None, "equivalent_pixels_low": None, "equivalent_pixels_high": None, "cell_id": None,
}


def _read_table(path: Path, schema: pa.Schema) -> pd.DataFrame:
    """A results table, checked against ``schema`` (names and types) and cast to it."""
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as exc:
        raise ReportError(f"{path} is not a readable Parquet file ({first_line(exc)}); {_SWEEP_HINT}") from None
    known = {"n_wrong", "n_success", "n_fooled"} & set(table.column_names)  # a results table, if an old one
    for name, value in _LATER_COLUMNS.items():
        if name in schema.names and name not in table.column_names and known:
            field = schema.field(name)
            table = table.append_column(field, pa.array([value] * len(table), field.type))
    missing = [name for name in schema.names if name not in table.column_names]
    if missing:
        shown = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
        raise ReportError(f"{path} is not a pixelray results table (no column {shown}); it may be another "
                          f"tool's Parquet: {_SWEEP_HINT}")
    try:
        table = table.select(schema.names).cast(schema)
    except (pa.ArrowException, ValueError) as exc:
        raise ReportError(f"{path}: a column has the wrong type ({first_line(exc)}); {_SWEEP_HINT}") from None
    return table.to_pandas()


def _check_counts(df: pd.DataFrame, path: Path, k: str, n: str, keys: tuple[str, ...]) -> None:
    """Refuse nulls in ``keys`` and counts outside 0 <= k <= n."""
    for col in (*keys, k, n):
        if df[col].isna().any():
            raise ReportError(f"{path}: column {col} has missing values; {_SWEEP_HINT}")
    bad = df[(df[n] < 0) | (df[k] < 0) | (df[k] > df[n])]
    if len(bad):
        row = bad.iloc[0]
        raise ReportError(f"{path}: {k} = {row[k]} of {n} = {row[n]} is impossible (need 0 <= {k} <= {n}); "
                          "the file is damaged: rerun the sweep into a new directory")


_FAILURE_KEYS = ("model", "target", "image_id", "ladder_id", "amplitude", "channels", "seed", "steps_per_octave",
                 "max_count", "search", "refine", "image_size")
_DAMAGED = "the file is damaged: rerun the sweep into a new directory"


def _check_ladders(df: pd.DataFrame, path: Path) -> None:
    """Every ladder of failure.parquet rebuilds (``Ladder.from_columns``) into its own ``ladder_id``."""
    columns = ["ladder_id", "amplitude", "area", "channels", "seed", "steps_per_octave", "max_count", "search",
               "refine", "image_size"]
    for row in df[columns].drop_duplicates().to_dict("records"):
        try:
            ladder_id = Ladder.from_columns(row).ladder_id
        except (ValueError, TypeError) as exc:
            raise ReportError(f"{path}: ladder {row['ladder_id']!r} has invalid columns ({first_line(exc)}); "
                              f"{_DAMAGED}") from None
        if ladder_id != row["ladder_id"]:
            raise ReportError(f"{path}: ladder_id {row['ladder_id']!r} does not match its columns (amplitude .. "
                              f"seed read as {ladder_id!r}); {_DAMAGED}")


def _check_failure(df: pd.DataFrame, path: Path) -> None:
    """Refuse failure.parquet rows the survival section could misread: nulls where a value is needed, an unknown
    target, an adversarial row without its attack, counts beyond the ladder, a ladder that does not rebuild."""
    for col in _FAILURE_KEYS:
        if df[col].isna().any():
            raise ReportError(f"{path}: column {col} has missing values; {_SWEEP_HINT}")
    bad = sorted(set(df["target"]) - {"wrong", "right"})
    if bad:
        raise ReportError(f"{path}: column target holds {bad[0]!r}; allowed: 'wrong', 'right'; {_SWEEP_HINT}")
    right = df[df["target"] == "right"]
    if right["attack"].isna().any() or right["eps"].isna().any():
        raise ReportError(f"{path}: rows with target 'right' (adversarial examples) need attack and eps; {_DAMAGED}")
    for col in ("n_fail", "n_fail_refined"):
        outside = df[df[col].notna() & ((df[col] < 0) | (df[col] > df["max_count"]))]
        if len(outside):
            row = outside.iloc[0]
            raise ReportError(f"{path}: {col} = {row[col]} is outside 0 .. max_count = {row['max_count']}; "
                              f"{_DAMAGED}")
    _check_ladders(df, path)


def _read_json(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    try:
        value = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ReportError(f"{path} is not valid JSON ({first_line(exc)}); {_SWEEP_HINT}") from None
    if not isinstance(value, dict):
        raise ReportError(f"{path} must hold a JSON object; {_SWEEP_HINT}")
    return value


def _refuse_non_run(path: Path) -> None:
    """One sentence on why ``path`` is not a finished sweep directory, raised when it is not one."""
    if not path.exists():
        raise ReportError(f"{path} does not exist; {_SWEEP_HINT}")
    if not path.is_dir():
        raise ReportError(f"{path} is not a directory; {_SWEEP_HINT}")
    if (path / "cells.parquet").is_file():
        return
    if (path / "run.json").exists() or (path / "units").is_dir():
        raise ReportError(f"{path} holds an unfinished sweep (run.json or units/ but no cells.parquet): rerun the "
                          "same `pixelray sweep` command with the same --out to finish it, then report")
    if (path / "manifest.json").exists():
        raise ReportError(f"{path} is a data set (manifest.json), not sweep results; {_SWEEP_HINT}")
    others = sorted(p.name for p in path.glob("*.parquet"))
    if others:
        raise ReportError(f"{path} holds Parquet files ({', '.join(others[:3])}) but no cells.parquet: not a "
                          f"pixelray sweep output; {_SWEEP_HINT}")
    raise ReportError(f"{path} holds no sweep results (no cells.parquet); {_SWEEP_HINT}")


def _clean_accuracy(path: Path) -> pd.DataFrame | None:
    """Per model: images predicted and how many correctly, from clean.parquet (None without it)."""
    if not path.exists():
        return None
    try:
        table = pq.read_table(path, columns=["model", "correct"])
    except (pa.ArrowException, OSError, KeyError) as exc:
        raise ReportError(f"{path} is not a pixelray clean table ({first_line(exc)}); {_SWEEP_HINT}") from None
    df = table.to_pandas()
    return (df.groupby("model", sort=False)["correct"].agg(n_images="size", n_correct="sum")
            .astype("int64").reset_index())


def _image_id_files(path: Path) -> dict[str, int]:
    files = ([path / "image_ids.txt"] if (path / "image_ids.txt").exists() else []) + sorted(
        (path / "image_ids").glob("*.txt"))
    out = {}
    for f in files:
        with open(f, "rb") as fh:
            out[str(f.relative_to(path))] = sum(1 for line in fh if line.strip())
    return out


def _sidecar(spec: str) -> dict[str, Any]:
    """The JSON sidecar of a ``checkpoint:PATH`` model, if it can be found ({} otherwise); never the weights."""
    raw = Path(spec.split(":", 1)[1]).expanduser()
    if raw.is_dir():  # a `pixelray train-augment` run directory: its model.pt and pixelray.json
        raw = raw / "model.pt"
    # as models.sidecar_path looks: PATH.json, the same stem .json, a run directory's pixelray.json
    for side in (raw.with_name(raw.name + ".json"), raw.with_suffix(".json"), raw.with_name("pixelray.json")):
        try:
            value = json.loads(side.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            continue
        if isinstance(value, dict):
            return {"file": str(side), **value}
    return {}


def _augment_count(metadata: Any) -> int | None:
    """n of the augmentation a checkpoint was trained with: ``augment_count``, ``augment.count``, or what
    ``pixelray train-augment`` writes, ``augment.change.count`` with ``augment.aug = "pixels"`` (its
    ``aug = "none"`` control and its other augmentations have none)."""
    if not isinstance(metadata, dict):
        return None
    value = metadata.get("augment_count")
    augment = metadata.get("augment")
    if value is None and isinstance(augment, dict):
        value = augment.get("count")
        change = augment.get("change")
        if value is None and augment.get("aug") == "pixels" and isinstance(change, dict):
            value = change.get("count")
    if value is None and isinstance(augment, int):
        value = augment
    return value if is_int(value) and value >= 1 else None


def _model_info(spec: str) -> ModelInfo:
    if not spec.startswith("checkpoint:"):
        return ModelInfo(spec, spec, spec)
    side = _sidecar(spec)
    path = Path(spec.split(":", 1)[1])
    name = side.get("name") if isinstance(side.get("name"), str) else path.stem
    base = side.get("base") if isinstance(side.get("base"), str) else "unknown"
    shown = {k: side[k] for k in ("file", "base", "sha256", "weights_from", "metadata") if k in side}
    metadata = side.get("metadata") if isinstance(side.get("metadata"), dict) else {}
    started = metadata.get("started_from") if isinstance(metadata.get("started_from"), str) else None
    return ModelInfo(spec, name or path.name, base, _augment_count(metadata), shown, started)


def load_run(path: str | Path) -> Run:
    """Read and check one sweep output directory; raises ReportError when it is not a finished one."""
    path = Path(path)
    _refuse_non_run(path)
    table = _read_table(path / "cells.parquet", CELLS_SCHEMA)
    table["family"] = table["family"].fillna("pixel_change")  # rows written before corruption families existed
    _check_counts(table, path / "cells.parquet", "n_wrong", "n_images", ("model",))
    cells = table[table.family == "pixel_change"].reset_index(drop=True)  # the paper's tables
    _check_counts(cells, path / "cells.parquet", "n_wrong", "n_images", ("model", "count", "amplitude"))
    attacked = cells[cells.attack.notna()]
    if attacked.n_restored.isna().any() or (attacked.n_restored + attacked.n_wrong != attacked.n_images).any():
        raise ReportError(f"{path / 'cells.parquet'}: attack rows need n_restored = n_images - n_wrong; "
                          "the file is damaged: rerun the sweep into a new directory")
    run = Run(path=path, name=path.resolve().name or str(path), cells=cells)
    run.corruptions = table[table.family != "pixel_change"].reset_index(drop=True)
    run.clean = _clean_accuracy(path / "clean.parquet")
    if (path / "attack.parquet").exists():
        run.attack = _read_table(path / "attack.parquet", ATTACK_SCHEMA)
        _check_counts(run.attack, path / "attack.parquet", "n_success", "n_attacked", ("model", "eps"))
    if (path / "transfer.parquet").exists():
        run.transfer = _read_table(path / "transfer.parquet", TRANSFER_SCHEMA)
        _check_counts(run.transfer, path / "transfer.parquet", "n_fooled", "n_images",
                      ("source_model", "target_model", "eps"))
    if (path / "failure.parquet").exists():
        run.failure = _read_table(path / "failure.parquet", FAILURE_SCHEMA)
        _check_failure(run.failure, path / "failure.parquet")
    run.meta = _read_json(path / "run.json")
    run.stats = _read_json(path / "stats.json")
    run.image_ids = _image_id_files(path)
    return run


def _unique_labels(runs: list[Run]) -> None:
    """Give every (run, model) a display label, adding the run's name where two runs share one."""
    specs = {r.name: list(dict.fromkeys([*r.cells.model, *([] if r.failure is None else r.failure.model)]))
             for r in runs}
    infos = {(r.name, m): _model_info(m) for r in runs for m in specs[r.name]}
    seen: dict[str, set[tuple[str, str]]] = {}
    for key, info in infos.items():
        seen.setdefault(info.label, set()).add((key[0], info.spec))
    for (run_name, spec), info in infos.items():
        label = info.label
        if len({s for _, s in seen[label]}) > 1 and spec != label:
            label = f"{label} [{spec.split(':', 1)[-1]}]"  # two specs, one name: show the path
        if len({r for r, _ in seen[info.label]}) > 1:
            label = f"{label} ({run_name})"
        infos[(run_name, spec)] = dataclasses.replace(info, label=label)
    for r in runs:
        r.models = {m: infos[(r.name, m)] for m in specs[r.name]}


def load_runs(paths: list[str | Path]) -> list[Run]:
    """Read and check every run directory (all of them before anything else happens)."""
    if not paths:
        raise ReportError(f"no run directory given; {_SWEEP_HINT}")
    runs = [load_run(p) for p in paths]
    names = [r.name for r in runs]
    for i, r in enumerate(runs):  # same directory name twice: number them
        if names.count(r.name) > 1:
            r.name = f"{r.name}#{names[:i + 1].count(r.name)}"
    _unique_labels(runs)
    return runs

