"""The sweep driver: plan units, schedule them on ModelWorker actors, write results, resume.

Data flows one way: config -> plan -> units -> workers -> unit files -> cells.parquet.

Two phases run over (model, shard) units. The *clean* phase predicts every image
once per model; the driver then picks the evaluation set (``filter``,
``eval_size``; lowest image ids first). The *cells* phase runs every cell of the
plan over the evaluation-set images of each shard. Each finished unit is written
as its own Parquet file (temp + rename), so a rerun of the same config into the
same directory skips what is done; a different config there is refused.

Layout of an output directory::

    run.json                 config identity, hash and versions
    units/clean/<model>/<shard>.parquet
    units/cells/<model>/<shard>.parquet
    image_ids.txt            the evaluated image ids (per-model filter: image_ids/<model>.txt)
    clean.parquet            model, image_id, label, prediction, correct
    cells.parquet            one row per experiment x model x cell (DESIGN.md "Results schema")
    stats.json               shard reads per phase, units run, timings
"""

from __future__ import annotations

import json
import os
import time
from collections import defaultdict, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pixelray import __version__
from pixelray.config import ConfigError, Filter, SweepConfig
from pixelray.metrics import aggregate
from pixelray.spec import Cell
from pixelray.telemetry import SweepTelemetry
from pixelray.worker import ModelWorker, Unit, model_slug

__all__ = ["SweepError", "SweepResult", "connect", "run_sweep", "select_eval_set", "write_table_atomic"]

CELLS_SCHEMA = pa.schema([
    ("experiment", pa.string()), ("model", pa.string()), ("weights", pa.string()),
    ("attack", pa.string()), ("eps", pa.float64()), ("count", pa.int64()), ("amplitude", pa.string()),
    ("area", pa.int64()), ("channels", pa.string()), ("positions", pa.string()), ("seed", pa.int64()),
    ("n_images", pa.int64()), ("n_wrong", pa.int64()), ("accuracy", pa.float64()),
    ("wrong_rate", pa.float64()), ("ci_low", pa.float64()), ("ci_high", pa.float64()),
    ("pixel_index", pa.float64()), ("image_size", pa.int64()), ("dataset", pa.string()),
    ("config_hash", pa.string()), ("pixelray_version", pa.string()), ("torch_version", pa.string()),
])


class SweepError(RuntimeError):
    """A sweep that cannot go on; the message says why and what to do."""


@dataclass
class SweepResult:
    out_dir: Path
    cells_path: Path
    clean_path: Path
    stats: dict[str, Any] = field(default_factory=dict)


def write_table_atomic(table: pa.Table, path: Path) -> None:
    """Write a Parquet file so that readers see all of it or nothing (temp file + rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def _write_text_atomic(text: str, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def connect(address: str | None = None, num_cpus: int | None = None) -> None:
    """Join a Ray cluster (``auto`` or an address) or start an embedded local one (None/``local``)."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if address in (None, "", "local"):
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
    else:
        ray.init(address=address, log_to_driver=False)


def select_eval_set(
    clean: dict[str, dict[int, bool]], filt: Filter, size: int | None
) -> dict[str, np.ndarray]:
    """The evaluation-set image ids per model: filtered, then the ``size`` lowest ids.

    Args:
        clean: model -> {image_id: correct}.
        filt: ``all`` (correct for every model), ``per-model``, or ``none``.
        size: keep at most this many ids (lowest first); None keeps all.
    """
    models = list(clean)
    if filt is Filter.ALL:
        common = set.intersection(*(set(i for i, ok in clean[m].items() if ok) for m in models))
        ids = np.sort(np.fromiter(common, dtype=np.int64, count=len(common)))[:size]
        return {m: ids for m in models}
    out = {}
    for m in models:
        keep = [i for i, ok in clean[m].items() if ok] if filt is Filter.PER_MODEL else list(clean[m])
        out[m] = np.sort(np.asarray(keep, dtype=np.int64))[:size]
    return out


class _Pool:
    """ModelWorker actors, each with up to ``depth`` units in flight (the second one prefetches)."""

    def __init__(self, config: SweepConfig, telemetry: SweepTelemetry, depth: int = 2):
        import ray

        resources = ray.cluster_resources()
        gpus = int(resources.get("GPU", 0))
        device = config.device if config.device != "auto" else ("cuda" if gpus else "cpu")
        if device == "cuda" and not gpus:
            raise SweepError("[run] device = 'cuda' but the Ray cluster has no GPUs; use device = 'auto' or 'cpu'")
        self.n = config.workers or (gpus if device == "cuda" else 1)
        cpus = int(resources.get("CPU", 1))
        threads = config.threads or max(1, cpus // self.n)
        self.options = dict(
            num_gpus=1 if device == "cuda" else 0,
            num_cpus=1,
            max_concurrency=depth,
            max_restarts=3,
            max_task_retries=3,
        )
        self.args = dict(device=device, threads=threads, batch_size=config.batch_size, amp=config.amp)
        self.depth = depth
        self.telemetry = telemetry
        self._serial = 0
        self.workers: list[dict[str, Any]] = [self._spawn() for _ in range(self.n)]

    def _spawn(self) -> dict[str, Any]:
        import ray

        self._serial += 1
        name = f"pixelray-worker-{os.getpid()}-{self._serial}"
        handle = ray.remote(ModelWorker).options(name=name, **self.options).remote(**self.args)
        return {"handle": handle, "name": name, "model": None, "inflight": {}}

    def replace(self, worker: dict[str, Any]) -> None:
        import ray

        self.workers.remove(worker)
        ray.kill(worker["handle"], no_restart=True)
        self.workers.append(self._spawn())
        self.telemetry.worker_replaced()

    def shutdown(self) -> None:
        import ray

        for w in self.workers:
            ray.kill(w["handle"], no_restart=True)
        self.workers = []


def _schedule(
    pool: _Pool,
    units: list[Unit],
    submit: Callable[[Any, Unit], Any],
    on_done: Callable[[Unit, dict], None],
    telemetry: SweepTelemetry,
) -> None:
    """Run ``units`` on the pool's workers until all are done.

    An idle worker takes a unit of the model it holds; when that model's work runs
    out it switches to the model with the most work left (fewest workers on it).
    A unit whose worker died is re-queued and the worker replaced; an error raised
    by the unit itself (bad data, missing weights) stops the sweep.
    """
    import ray
    from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError, RayTaskError

    pending: dict[str, deque[Unit]] = defaultdict(deque)
    for unit in units:
        pending[unit.model].append(unit)

    def next_unit(worker: dict[str, Any]) -> Unit | None:
        model = worker["model"]
        if not pending.get(model):
            left = {m: q for m, q in pending.items() if q}
            if not left:
                return None
            holders = defaultdict(int)
            for w in pool.workers:
                holders[w["model"]] += 1
            model = max(left, key=lambda m: len(left[m]) / (1 + holders[m]))
            worker["model"] = model
        return pending[model].popleft()

    remaining = len(units)
    while remaining:
        for worker in list(pool.workers):
            while len(worker["inflight"]) < pool.depth:
                unit = next_unit(worker)
                if unit is None:
                    break
                worker["inflight"][submit(worker["handle"], unit)] = unit
        refs = {ref: w for w in pool.workers for ref in w["inflight"]}
        if not refs:
            raise SweepError("no worker could take the remaining units")
        ready, _ = ray.wait(list(refs), num_returns=1, timeout=None)
        for ref in ready:
            worker = refs[ref]
            unit = worker["inflight"].pop(ref)
            try:
                result = ray.get(ref)
            except RayTaskError as exc:
                cause = exc.cause if getattr(exc, "cause", None) is not None else exc
                raise SweepError(f"unit {unit.key} failed: {type(cause).__name__}: {cause}") from None
            except (ActorDiedError, ActorUnavailableError, RayActorError) as exc:
                telemetry.unit_failed()
                pending[unit.model].appendleft(unit)
                for other in worker["inflight"].values():
                    pending[other.model].appendleft(other)
                worker["inflight"].clear()
                if not isinstance(exc, ActorUnavailableError) and worker in pool.workers:
                    pool.replace(worker)
                continue
            on_done(unit, result)
            remaining -= 1


def _preflight(pool: _Pool, config: SweepConfig) -> None:
    """Check on a worker (where models load) that every model's weights are there."""
    import ray
    from ray.exceptions import RayTaskError

    try:
        ray.get(pool.workers[0]["handle"].preflight.remote(list(config.models), config.weights))
    except RayTaskError as exc:
        cause = exc.cause if getattr(exc, "cause", None) is not None else exc
        raise SweepError(str(cause)) from None


def _read_unit_tables(paths: Iterable[Path]) -> pa.Table | None:
    tables = [pq.read_table(p) for p in paths]
    return pa.concat_tables(tables) if tables else None


def _versions() -> dict[str, str]:
    import torch

    return {"pixelray_version": __version__, "torch_version": torch.__version__}


def _check_run_dir(out: Path, config: SweepConfig) -> None:
    """Create run.json, or refuse a directory that holds another config's run."""
    run_file = out / "run.json"
    for stale in out.rglob(".*.tmp-*"):  # half-written files of a killed run: never read, removed
        stale.unlink()
    if run_file.exists():
        previous = json.loads(run_file.read_text())
        if previous.get("config_hash") != config.config_hash:
            raise SweepError(
                f"{out} holds a run of another config (hash {previous.get('config_hash')} != "
                f"{config.config_hash}); use another output directory (--out) or delete this one"
            )
        return
    meta = {"config_hash": config.config_hash, "config": config.identity(), **_versions(), "created": time.time()}
    _write_text_atomic(json.dumps(meta, indent=2, default=str) + "\n", run_file)


def _channels_label(cell: Cell) -> str:
    ch = cell.change.channels
    return "all" if ch == "all" else ",".join(map(str, ch))


def run_sweep(config: SweepConfig, *, progress: bool = True, log: Callable[[str], None] | None = None) -> SweepResult:
    """Run (or resume) a whole sweep on the connected Ray cluster (an embedded one if none)."""
    import torch  # noqa: F401  (versions)

    from pixelray.shards import load_manifest, shard_uris

    say = log or (lambda msg: None)
    try:
        manifest = load_manifest(config.data)
    except (OSError, ValueError) as exc:
        raise SweepError(f"[data] path = {config.data!r}: {exc}") from None
    size = (manifest.height, manifest.width)
    cell_pairs = config.cells(size)
    cells = list(dict.fromkeys(c for _, c in cell_pairs))
    uris = shard_uris(config.data)
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    _check_run_dir(out, config)
    connect(None)
    telemetry = SweepTelemetry(config.metrics_port, config.metrics_host, progress)
    if telemetry.port:
        say(f"metrics: http://{config.metrics_host}:{telemetry.port}/metrics")
    stats: dict[str, Any] = {"reads": {"clean": 0, "cells": 0}, "units_run": {"clean": 0, "cells": 0}}
    t_start = time.perf_counter()
    pool = _Pool(config, telemetry)
    weights, num_classes = config.weights, manifest.num_classes
    try:
        _preflight(pool, config)
        # Phase 1: clean predictions, one unit per (model, shard).
        shards = list(zip(uris, manifest.shards, strict=True))
        clean_units = [Unit("clean", m, uri, info.file) for m in config.models for uri, info in shards]
        unit_path = lambda u: out / "units" / f"{u.key}.parquet"  # noqa: E731

        def clean_done(unit: Unit, res: dict) -> None:
            n = len(res["image_id"])
            table = pa.table({
                "model": pa.array([unit.model] * n, pa.string()),
                "image_id": pa.array(res["image_id"], pa.int64()),
                "label": pa.array(res["label"], pa.int64()),
                "prediction": pa.array(res["prediction"], pa.int64()),
                "correct": pa.array(res["prediction"] == res["label"], pa.bool_()),
            })
            write_table_atomic(table, unit_path(unit))
            stats["reads"]["clean"] += res["reads"]
            stats["units_run"]["clean"] += 1
            telemetry.unit_done(unit.model, n)

        todo = [u for u in clean_units if not unit_path(u).exists()]
        telemetry.start_phase("clean", len(clean_units), len(clean_units) - len(todo))
        _schedule(pool, todo, lambda h, u: h.run.remote(u, weights, num_classes), clean_done, telemetry)

        # The evaluation set.
        correct: dict[str, dict[int, bool]] = {m: {} for m in config.models}
        shard_ids: dict[tuple[str, str], np.ndarray] = {}
        for unit in clean_units:
            t = pq.read_table(unit_path(unit), columns=["image_id", "correct"])
            ids = t["image_id"].to_numpy()
            correct[unit.model].update(zip(ids.tolist(), t["correct"].to_pylist(), strict=True))
            shard_ids[(unit.model, unit.shard)] = ids
        eval_ids = select_eval_set(correct, config.filter, config.eval_size)
        if config.filter is Filter.PER_MODEL:
            for m, ids in eval_ids.items():
                _write_text_atomic("".join(f"{i}\n" for i in ids), out / "image_ids" / f"{model_slug(m)}.txt")
        else:
            _write_text_atomic("".join(f"{i}\n" for i in eval_ids[config.models[0]]), out / "image_ids.txt")

        # Phase 2: every cell over the evaluation images of each (model, shard).
        cell_units = []
        for unit in clean_units:
            wanted = np.intersect1d(shard_ids[(unit.model, unit.shard)], eval_ids[unit.model])
            if len(wanted):
                cell_units.append(Unit("cells", unit.model, unit.shard, unit.shard_name, tuple(wanted.tolist())))

        def cells_done(unit: Unit, res: dict) -> None:
            n = len(cells)
            table = pa.table({
                "model": pa.array([unit.model] * n, pa.string()),
                "cell_id": pa.array([c.cell_id for c in cells], pa.string()),
                "n_images": pa.array(res["n_images"], pa.int64()),
                "n_wrong": pa.array(res["n_wrong"], pa.int64()),
            })
            write_table_atomic(table, unit_path(unit))
            stats["reads"]["cells"] += res["reads"]
            stats["units_run"]["cells"] += 1
            telemetry.unit_done(unit.model, int(res["n_images"].sum()))

        todo = [u for u in cell_units if not unit_path(u).exists()]
        telemetry.start_phase("cells", len(cell_units), len(cell_units) - len(todo))
        _schedule(pool, todo, lambda h, u: h.run.remote(u, weights, num_classes, cells), cells_done, telemetry)
        telemetry.close_bar()
    finally:
        pool.shutdown()
        telemetry.close()

    # Results.
    clean_table = _read_unit_tables(unit_path(u) for u in clean_units)
    clean_path = out / "clean.parquet"
    write_table_atomic(clean_table.sort_by([("model", "ascending"), ("image_id", "ascending")]), clean_path)
    rows = _cell_rows(config, manifest, cell_pairs, [unit_path(u) for u in cell_units], size)
    cells_path = out / "cells.parquet"
    write_table_atomic(pa.Table.from_pylist(rows, schema=CELLS_SCHEMA), cells_path)
    stats.update({
        "shards": len(uris), "models": len(config.models), "cells": len(cells),
        "eval_images": {m: int(len(v)) for m, v in eval_ids.items()},
        "wall_s": time.perf_counter() - t_start, "config_hash": config.config_hash,
    })
    _write_text_atomic(json.dumps(stats, indent=2) + "\n", out / "stats.json")
    return SweepResult(out, cells_path, clean_path, stats)


def _cell_rows(config, manifest, cell_pairs, paths, size) -> list[dict[str, Any]]:
    """Per-unit counts -> one row per (experiment, model, cell), in the results schema."""
    experiments_of: dict[str, list[str]] = defaultdict(list)
    by_id: dict[str, Cell] = {}
    for exp, cell in cell_pairs:
        if exp not in experiments_of[cell.cell_id]:
            experiments_of[cell.cell_id].append(exp)
        by_id[cell.cell_id] = cell
    table = _read_unit_tables(paths)
    unit_rows = table.to_pylist() if table is not None else []
    height, width = size
    common = {
        "weights": config.weights or "none", "attack": None, "eps": None, "dataset": manifest.name,
        "config_hash": config.config_hash, **_versions(),
    }
    exp_order = {e.name: i for i, e in enumerate(config.experiments)}
    model_order = {m: i for i, m in enumerate(config.models)}
    cell_order = {cell_id: i for i, cell_id in enumerate(by_id)}
    rows = []
    for r in unit_rows:
        cell = by_id.get(r["cell_id"])
        if cell is None:
            raise ConfigError(f"unit result names cell {r['cell_id']!r}, which is not in this config's plan")
        change = cell.change
        area = change.area if change.area is not None else (height if height == width else None)
        for exp in experiments_of[r["cell_id"]]:
            rows.append({
                **common, "experiment": exp, "model": r["model"], "count": change.count,
                "amplitude": str(change.amplitude), "area": area, "channels": _channels_label(cell),
                "positions": change.positions, "seed": cell.seed, "cell_id": r["cell_id"],
                "n_images": r["n_images"], "n_wrong": r["n_wrong"],
            })
    rows.sort(key=lambda r: (exp_order[r["experiment"]], model_order[r["model"]], cell_order[r["cell_id"]]))
    return [{k: v for k, v in row.items() if k != "cell_id"} for row in aggregate(rows, size)]
