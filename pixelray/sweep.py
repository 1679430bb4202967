"""The sweep driver: plan units, schedule them on ModelWorker actors, write results, resume.

Data flows one way: config -> plan -> units -> workers -> unit files -> cells.parquet.

Two phases run over (model, shard) units. The *clean* phase predicts every image
once per model; the driver then picks the evaluation set (``filter``,
``eval_size``; lowest image ids first). The *cells* phase runs every cell of the
plan over the evaluation-set images of each shard. Each finished unit is written
as its own Parquet file (temp + rename), so a rerun of the same config into the
same directory skips what is done; a different config there is refused.

With an ``[attack]`` section a third phase, *attack*, runs one unit per (model,
shard) over the attack's candidates: the images the ``[eval]`` filter admits (its
``size`` does not apply: the attack keeps ``[attack] size`` examples of its own).
The worker reads the shard once, makes the FGSM examples at every eps with the
unit's model, runs every cell over the eligible ones (those that fool the model
after uint8 rounding; every one with ``keep = "all"``) and has every model of the
sweep judge them. It returns per-image bits, which become the unit file. The
driver then keeps, per (model, eps), the ``size`` eligible examples with the
lowest image ids and sums the bits over them: the selection is exact and global,
whatever the shard layout, batch size or order in which units finish. Units are
run in image-id order, and a unit whose lowest candidate id lies above ``size``
eligible examples at every eps (among finished units) is skipped: its images
could not be kept.

Layout of an output directory::

    run.json                 config identity, hash and versions
    units/clean/<model>/<shard>.parquet
    units/cells/<model>/<shard>.parquet
    units/attack/<model>/<shard>.parquet   per (eps, image) bits, see _attack_unit_table
    image_ids.txt            the evaluated image ids (per-model filter: image_ids/<model>.txt)
    clean.parquet            model, image_id, label, prediction, correct
    cells.parquet            one row per experiment x model x cell (DESIGN.md "Results schema"),
                             and with an attack one more per experiment x model x eps x cell
    attack.parquet           one row per model x eps: the attack's success rate (ATTACK_SCHEMA)
    transfer.parquet         one row per source model x target model x eps (TRANSFER_SCHEMA)
    attack_ids.parquet       model, eps, image_id of every kept adversarial example
    stats.json               shard reads per phase, units run, timings

Attack rows of ``cells.parquet`` have ``attack = "fgsm"`` and ``eps`` = k/255 (the
step in [0, 1] pixel units, as ``attacks.fgsm`` takes it; ``[attack] eps`` gives k).
``n_images`` counts the kept examples, ``n_restored`` those the model classifies
correctly again after the pixel change, ``restored_rate = n_restored / n_images``;
``n_wrong = n_images - n_restored`` (still misclassified), so ``wrong_rate``, the
interval and ``pixel_index`` keep their meaning. ``n_restored`` and
``restored_rate`` are null in rows without an attack. The paper's Table 9 prints
``n_wrong`` as "Misclassification" and ``restored_rate`` as "Recognition rate".

``attack.parquet``: model, weights, attack, eps, keep, n_attacked, n_success_float,
n_success, success_rate_float, success_rate (misclassified before / after uint8
rounding), ci_low, ci_high (Wilson, on success_rate), n_kept, ... The rates are
over one deterministic set per model: the candidates up to the highest image id
kept at any eps (all candidates when some eps has fewer than ``size``).

``transfer.parquet``: source_model (attacked), target_model (judge), eps, n_images
(kept examples of the source), n_correct (the target predicts the true label),
n_fooled, fooled_rate, ci_low, ci_high, ... The diagonal (source = target) is the
source's own verdict. With ``filter = "all"`` every target classified the clean
images correctly, so ``fooled_rate`` is the rate at which the attack transfers.

Adversarial images never enter a results table. ``save_adversarial = DIR`` writes
every eligible example (a superset of the kept ones: see attack_ids.parquet) as a
pixelray data set per model and eps, ``DIR/<model>/eps<k>/`` (shards + manifest.json),
which a later sweep can name as its ``[data] path``. A resumed run adds the examples of
the units it runs; units finished by an earlier run without the option have none saved.
"""

from __future__ import annotations

import json
import math
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
from pixelray.config import ConfigError, Filter, Keep, SweepConfig
from pixelray.metrics import aggregate, wilson_interval
from pixelray.results import ATTACK_SCHEMA, CELLS_SCHEMA, TRANSFER_SCHEMA
from pixelray.spec import Cell
from pixelray.telemetry import SweepTelemetry
from pixelray.worker import AttackPlan, ModelWorker, Unit, model_slug

__all__ = [
    "ATTACK_SCHEMA",
    "CELLS_SCHEMA",
    "TRANSFER_SCHEMA",
    "SweepError",
    "SweepResult",
    "connect",
    "run_sweep",
    "select_eval_set",
    "select_kept",
    "write_table_atomic",
]

_IDS_SCHEMA = pa.schema([("model", pa.string()), ("eps", pa.float64()), ("image_id", pa.int64())])


class SweepError(RuntimeError):
    """A sweep that cannot go on; the message says why and what to do."""


@dataclass
class SweepResult:
    out_dir: Path
    cells_path: Path
    clean_path: Path
    stats: dict[str, Any] = field(default_factory=dict)
    attack_path: Path | None = None  # with an [attack] section
    transfer_path: Path | None = None


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
    skip: Callable[[Unit], bool] | None = None,
) -> None:
    """Run ``units`` on the pool's workers until all are done.

    An idle worker takes a unit of the model it holds; when that model's work runs
    out it switches to the model with the most work left (fewest workers on it).
    A unit whose worker died is re-queued and the worker replaced; an error raised
    by the unit itself (bad data, missing weights) stops the sweep.

    ``skip(unit)`` (optional) drops units that are no longer needed before they are
    submitted. It must be monotone along each model's queue: once it holds for a
    unit it holds for every later unit of that model, which are dropped with it.
    """
    import ray
    from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError, RayTaskError

    pending: dict[str, deque[Unit]] = defaultdict(deque)
    for unit in units:
        pending[unit.model].append(unit)

    def drop_unneeded() -> None:
        for queue in pending.values():
            if queue and skip is not None and skip(queue[0]):
                for unit in queue:
                    telemetry.unit_done(unit.model, 0)
                queue.clear()

    def next_unit(worker: dict[str, Any]) -> Unit | None:
        drop_unneeded()
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

    while True:
        for worker in list(pool.workers):
            while len(worker["inflight"]) < pool.depth:
                unit = next_unit(worker)
                if unit is None:
                    break
                worker["inflight"][submit(worker["handle"], unit)] = unit
        refs = {ref: w for w in pool.workers for ref in w["inflight"]}
        if not refs:
            if any(pending.values()):
                raise SweepError("no worker could take the remaining units")
            return
        ready, _ = ray.wait(list(refs), num_returns=1, timeout=None)
        for ref in ready:
            worker = refs[ref]
            unit = worker["inflight"].pop(ref)
            try:
                result = ray.get(ref)
            except RayTaskError as exc:
                cause = _cause(exc)
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


def _preflight(pool: _Pool, config: SweepConfig) -> None:
    """Check on a worker (where models load) that every model's weights are there."""
    import ray
    from ray.exceptions import RayTaskError

    try:
        ray.get(pool.workers[0]["handle"].preflight.remote(list(config.models), config.weights))
    except RayTaskError as exc:
        raise SweepError(str(_cause(exc))) from None


def _cause(exc: Exception) -> BaseException:
    """The user's exception inside a Ray task error (bad data, missing weights), else the error itself."""
    return exc.cause if getattr(exc, "cause", None) is not None else exc


def _read_unit_tables(paths: Iterable[Path]) -> pa.Table | None:
    tables = [pq.read_table(p) for p in paths]
    return pa.concat_tables(tables) if tables else None


def _versions() -> dict[str, str]:
    import torch

    return {"pixelray_version": __version__, "torch_version": torch.__version__}


def _refuse_another_run(out: Path, config: SweepConfig) -> None:
    """Refuse an output directory that holds another config's run (before any work)."""
    run_file = out / "run.json"
    if run_file.exists():
        previous = json.loads(run_file.read_text()).get("config_hash")
        if previous != config.config_hash:
            raise SweepError(
                f"{out} holds a run of another config (hash {previous} != {config.config_hash}); "
                "use another output directory (--out) or delete this one"
            )


def _start_run_dir(out: Path, config: SweepConfig) -> None:
    """Create the output directory and run.json, or clear a resumed one of half-written files."""
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.rglob(".*.tmp-*"):  # half-written files of a killed run: never read, removed
        stale.unlink()
    run_file = out / "run.json"
    if not run_file.exists():
        meta = {"config_hash": config.config_hash, "config": config.identity(), **_versions(), "created": time.time()}
        _write_text_atomic(json.dumps(meta, indent=2, default=str) + "\n", run_file)


def _channels_label(cell: Cell) -> str:
    ch = cell.change.channels
    return "all" if ch == "all" else ",".join(map(str, ch))


def run_sweep(
    config: SweepConfig,
    *,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    address: str | None = None,
) -> SweepResult:
    """Run (or resume) a whole sweep.

    The config, the data set and the plan are checked first; only then does it join Ray
    (the connected cluster, else ``address``: None/``local`` starts an embedded one,
    ``auto`` or an address joins a cluster).
    """
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
    _refuse_another_run(out, config)
    connect(address)
    telemetry = SweepTelemetry(config.metrics_port, config.metrics_host, progress)
    if telemetry.port:
        say(f"metrics: http://{config.metrics_host}:{telemetry.port}/metrics")
    phases = ("clean", "cells", "attack") if config.attack is not None else ("clean", "cells")
    stats: dict[str, Any] = {"reads": dict.fromkeys(phases, 0), "units_run": dict.fromkeys(phases, 0)}
    attack_units: list[Unit] = []
    t_start = time.perf_counter()
    pool = _Pool(config, telemetry)
    weights, num_classes = config.weights, manifest.num_classes
    try:
        _preflight(pool, config)  # nothing is written before the models are known to load
        _start_run_dir(out, config)
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

        # Phase 3: the attack, its cells and its judges over the candidates of each (model, shard).
        if config.attack is not None:
            attack_units = _run_attack_phase(
                config, pool, telemetry, clean_units, correct, shard_ids, cells, unit_path, stats, num_classes
            )
        telemetry.close_bar()
    finally:
        pool.shutdown()
        telemetry.close()

    # Results.
    clean_table = _read_unit_tables(unit_path(u) for u in clean_units)
    clean_path = out / "clean.parquet"
    write_table_atomic(clean_table.sort_by([("model", "ascending"), ("image_id", "ascending")]), clean_path)
    common = {
        "weights": config.weights or "none", "dataset": manifest.name, "config_hash": config.config_hash,
        **_versions(),
    }
    rows = _cell_rows(config, cell_pairs, [unit_path(u) for u in cell_units], size, common)
    attack_path = transfer_path = None
    if config.attack is not None:
        tables = _attack_results(config, manifest, cell_pairs, attack_units, unit_path, size, common)
        rows += tables["cells"]
        attack_path, transfer_path = out / "attack.parquet", out / "transfer.parquet"
        write_table_atomic(pa.Table.from_pylist(tables["attack"], schema=ATTACK_SCHEMA), attack_path)
        write_table_atomic(pa.Table.from_pylist(tables["transfer"], schema=TRANSFER_SCHEMA), transfer_path)
        write_table_atomic(pa.Table.from_pylist(tables["ids"], schema=_IDS_SCHEMA), out / "attack_ids.parquet")
        if config.save_adversarial:
            _write_adversarial_manifests(config, manifest, attack_units, unit_path)
    cells_path = out / "cells.parquet"
    write_table_atomic(pa.Table.from_pylist(aggregate(rows, size), schema=CELLS_SCHEMA), cells_path)
    stats.update({
        "shards": len(uris), "models": len(config.models), "cells": len(cells),
        "eval_images": {m: int(len(v)) for m, v in eval_ids.items()},
        "wall_s": time.perf_counter() - t_start, "config_hash": config.config_hash,
    })
    stats.update(_attack_stats(attack_units, unit_path))
    _write_text_atomic(json.dumps(stats, indent=2) + "\n", out / "stats.json")
    return SweepResult(out, cells_path, clean_path, stats, attack_path, transfer_path)


def _experiments_of(cell_pairs) -> tuple[dict[str, list[str]], dict[str, Cell]]:
    """cell_id -> the experiments naming it (config order), and cell_id -> Cell (plan order)."""
    experiments_of: dict[str, list[str]] = defaultdict(list)
    by_id: dict[str, Cell] = {}
    for exp, cell in cell_pairs:
        if exp not in experiments_of[cell.cell_id]:
            experiments_of[cell.cell_id].append(exp)
        by_id[cell.cell_id] = cell
    return experiments_of, by_id


def _cell_columns(cell: Cell, size: tuple[int, int]) -> dict[str, Any]:
    change = cell.change
    height, width = size
    area = change.area if change.area is not None else (height if height == width else None)
    return {
        "count": change.count, "amplitude": str(change.amplitude), "area": area, "channels": _channels_label(cell),
        "positions": change.positions, "seed": cell.seed,
    }


def _cell_rows(config, cell_pairs, paths, size, common) -> list[dict[str, Any]]:
    """Per-unit counts -> rows per (experiment, model, cell) in the results schema, to be summed by aggregate."""
    experiments_of, by_id = _experiments_of(cell_pairs)
    table = _read_unit_tables(paths)
    unit_rows = table.to_pylist() if table is not None else []
    exp_order = {e.name: i for i, e in enumerate(config.experiments)}
    model_order = {m: i for i, m in enumerate(config.models)}
    cell_order = {cell_id: i for i, cell_id in enumerate(by_id)}
    rows = []
    for r in unit_rows:
        cell = by_id.get(r["cell_id"])
        if cell is None:
            raise ConfigError(f"unit result names cell {r['cell_id']!r}, which is not in this config's plan")
        for exp in experiments_of[r["cell_id"]]:
            rows.append({
                **common, "attack": None, "eps": None, "experiment": exp, "model": r["model"],
                **_cell_columns(cell, size), "cell_id": r["cell_id"],
                "n_images": r["n_images"], "n_wrong": r["n_wrong"], "n_restored": None,
            })
    rows.sort(key=lambda r: (exp_order[r["experiment"]], model_order[r["model"]], cell_order[r["cell_id"]]))
    for row in rows:
        del row["cell_id"]
    return rows


# ---------------------------------------------------------------------------- the attack phase

_META_CELLS, _META_JUDGES, _META_SAVED = b"pixelray.cells", b"pixelray.judges", b"pixelray.saved"


def _attack_unit_table(res: dict, eps: tuple[int, ...], cells: list[Cell], judges: tuple[str, ...]) -> pa.Table:
    """A worker's bits as one row per (eps, image): eps (k), image_id, label, success_float, success,
    restored (one bool per cell, in the plan's order) and correct_by (one per judge, in the sweep's model
    order); the cell ids, the judges and any saved shards are in the file's metadata."""
    n_eps, n = res["success"].shape

    def per_row(bits: np.ndarray) -> pa.Array:  # (E, K, N) -> (E * N) lists of K
        k = bits.shape[1]
        flat = np.ascontiguousarray(bits.transpose(0, 2, 1)).reshape(-1)
        return pa.FixedSizeListArray.from_arrays(pa.array(flat, pa.bool_()), k)

    table = pa.table({
        "eps": pa.array(np.repeat(np.asarray(eps, dtype=np.int64), n), pa.int64()),
        "image_id": pa.array(np.tile(res["image_id"], n_eps), pa.int64()),
        "label": pa.array(np.tile(res["label"], n_eps), pa.int64()),
        "success_float": pa.array(res["success_float"].reshape(-1), pa.bool_()),
        "success": pa.array(res["success"].reshape(-1), pa.bool_()),
        "restored": per_row(res["restored"]),
        "correct_by": per_row(res["correct_by"]),
    })
    return table.replace_schema_metadata({
        _META_CELLS: json.dumps([c.cell_id for c in cells]),
        _META_JUDGES: json.dumps(list(judges)),
        _META_SAVED: json.dumps(res.get("saved") or [None] * n_eps),
    })


def select_kept(image_ids: np.ndarray, eligible: np.ndarray, size: int | None) -> np.ndarray:
    """Indices of the kept examples: the ``size`` eligible ones with the lowest ids (all with None), id order."""
    index = np.flatnonzero(eligible)
    return index[np.argsort(image_ids[index], kind="stable")][:size]


class _KeptSoFar:
    """Eligible image ids per (model, eps) from the attack units finished so far; decides which units to skip."""

    def __init__(self, n_eps: int, size: int | None, keep_all: bool):
        self.size, self.keep_all = size, keep_all
        self.ids: dict[str, list[list[np.ndarray]]] = defaultdict(lambda: [[] for _ in range(n_eps)])

    def add(self, model: str, table: pa.Table, eps: tuple[int, ...]) -> None:
        t_eps = table["eps"].to_numpy()
        ids = table["image_id"].to_numpy()
        ok = table["success"].to_numpy(zero_copy_only=False)
        for e, k in enumerate(eps):
            mine = t_eps == k
            self.ids[model][e].append(ids[mine] if self.keep_all else ids[mine & ok])

    def covers(self, unit: Unit) -> bool:
        """True when ``size`` eligible examples below the unit's lowest candidate id exist at every eps."""
        if self.size is None or self.keep_all or not unit.image_ids:
            return False
        low = unit.image_ids[0]
        per_eps = self.ids[unit.model]
        return all(sum(int((a < low).sum()) for a in parts) >= self.size for parts in per_eps)


def _run_attack_phase(config, pool, telemetry, clean_units, correct, shard_ids, cells, unit_path, stats, num_classes):
    """Plan, skip what is done, and run the attack units; returns every planned unit (run, resumed or skipped)."""
    attack = config.attack
    keep_all = attack.keep is Keep.ALL
    # keep = "all" knows its examples now: the ``size`` lowest candidate ids.
    candidates = select_eval_set(correct, config.filter, attack.size if keep_all else None)
    units = []
    for unit in clean_units:
        wanted = np.intersect1d(shard_ids[(unit.model, unit.shard)], candidates[unit.model])
        if len(wanted):
            units.append(Unit("attack", unit.model, unit.shard, unit.shard_name, tuple(wanted.tolist())))
    units.sort(key=lambda u: u.image_ids[0])  # lowest ids first: later units may prove unneeded
    save_dir = os.path.abspath(config.save_adversarial) if config.save_adversarial else None  # workers' cwd differs
    plan = AttackPlan(attack.eps, keep_all, tuple(config.models), save_dir)
    kept = _KeptSoFar(len(attack.eps), attack.size, keep_all)
    todo = []
    for unit in units:
        path = unit_path(unit)
        if path.exists():
            kept.add(unit.model, pq.read_table(path, columns=["eps", "image_id", "success"]), attack.eps)
        else:
            todo.append(unit)

    def attack_done(unit: Unit, res: dict) -> None:
        table = _attack_unit_table(res, attack.eps, cells, plan.judges)
        write_table_atomic(table, unit_path(unit))
        kept.add(unit.model, table, attack.eps)
        stats["reads"]["attack"] += res["reads"]
        stats["units_run"]["attack"] += 1
        telemetry.unit_done(unit.model, len(res["image_id"]) * len(attack.eps))

    telemetry.start_phase("attack", len(units), len(units) - len(todo))
    _schedule(
        pool, todo, lambda h, u: h.run.remote(u, config.weights, num_classes, cells, plan), attack_done, telemetry,
        skip=kept.covers,
    )
    return units


def _attack_stats(units: list[Unit], unit_path) -> dict[str, Any]:
    if not units:
        return {}
    done = sum(unit_path(u).exists() for u in units)
    return {"attack_units": {"planned": len(units), "done": done, "skipped": len(units) - done}}


def _load_attack_units(units: list[Unit], unit_path, cell_ids: list[str], judges: list[str]) -> pa.Table | None:
    tables = []
    for unit in units:
        path = unit_path(unit)
        if not path.exists():
            continue
        table = pq.read_table(path)
        meta = table.schema.metadata or {}
        if json.loads(meta.get(_META_CELLS, b"[]")) != cell_ids or json.loads(meta.get(_META_JUDGES, b"[]")) != judges:
            raise SweepError(f"{path}: written for another plan of cells or models; delete it and rerun")
        tables.append(table.replace_schema_metadata(None))
    return pa.concat_tables(tables) if tables else None


def _bits(table: pa.Table, column: str, width: int) -> np.ndarray:
    values = table[column].combine_chunks().flatten().to_numpy(zero_copy_only=False)
    return values.reshape(-1, width)


def _attack_results(config, manifest, cell_pairs, units, unit_path, size, common) -> dict[str, list[dict]]:
    """Unit bits -> kept examples per (model, eps) -> rows of cells (attack rows), attack, transfer and ids."""
    attack = config.attack
    keep_all = attack.keep is Keep.ALL
    experiments_of, by_id = _experiments_of(cell_pairs)
    cell_ids, judges = list(by_id), list(config.models)
    exp_order = {e.name: i for i, e in enumerate(config.experiments)}
    name = attack.kind.value
    out: dict[str, list[dict]] = {"cells": [], "attack": [], "transfer": [], "ids": []}
    for model in config.models:
        mine = [u for u in units if u.model == model]
        table = _load_attack_units(mine, unit_path, cell_ids, judges)
        if table is None:
            table = _empty_attack_table(len(cell_ids), len(judges))
        t_eps = table["eps"].to_numpy()
        ids_all = table["image_id"].to_numpy()
        ok_all = table["success"].to_numpy(zero_copy_only=False)
        ok_float_all = table["success_float"].to_numpy(zero_copy_only=False)
        restored_all = _bits(table, "restored", len(cell_ids))
        correct_all = _bits(table, "correct_by", len(judges))
        rows_of = [np.flatnonzero(t_eps == k) for k in attack.eps]
        chosen = [
            r[select_kept(ids_all[r], np.ones(len(r), bool) if keep_all else ok_all[r], attack.size)] for r in rows_of
        ]
        # One deterministic set for the success rates: candidates up to the highest kept id at any eps
        # (every unit below it has run), or every candidate when some eps kept fewer than ``size``.
        full = attack.size is not None and all(len(c) == attack.size for c in chosen)
        cutoff = max(int(ids_all[c[-1]]) for c in chosen) if full else None
        if cutoff is not None:
            missing = [u for u in mine if u.image_ids[0] <= cutoff and not unit_path(u).exists()]
            if missing:
                raise SweepError(f"attack units {[u.key for u in missing]} are missing below the kept ids; rerun")
        for e, k in enumerate(attack.eps):
            eps = k / 255
            r, c = rows_of[e], chosen[e]
            attacked = r if cutoff is None else r[ids_all[r] <= cutoff]
            n_att, n_ok = len(attacked), int(ok_all[attacked].sum())
            low, high = wilson_interval(n_ok, n_att) if n_att else (math.nan, math.nan)
            out["attack"].append({
                **common, "model": model, "attack": name, "eps": eps, "keep": attack.keep.value,
                "n_attacked": n_att, "n_success_float": int(ok_float_all[attacked].sum()), "n_success": n_ok,
                "success_rate_float": ok_float_all[attacked].mean() if n_att else math.nan,
                "success_rate": n_ok / n_att if n_att else math.nan, "ci_low": low, "ci_high": high,
                "n_kept": len(c), "image_size": size[0],
            })
            out["ids"] += [{"model": model, "eps": eps, "image_id": int(i)} for i in ids_all[c]]
            restored = restored_all[c].sum(axis=0)
            for cell_id, n_restored in zip(cell_ids, restored.tolist(), strict=True):
                for exp in experiments_of[cell_id]:
                    out["cells"].append({
                        **common, "experiment": exp, "model": model, "attack": name, "eps": eps,
                        **_cell_columns(by_id[cell_id], size), "n_images": len(c),
                        "n_wrong": len(c) - n_restored, "n_restored": n_restored,
                        "_order": (exp_order[exp], config.models.index(model), e, cell_ids.index(cell_id)),
                    })
            correct = correct_all[c].sum(axis=0)
            for target, n_correct in zip(judges, correct.tolist(), strict=True):
                fooled = len(c) - n_correct
                low, high = wilson_interval(fooled, len(c)) if len(c) else (math.nan, math.nan)
                out["transfer"].append({
                    **common, "source_model": model, "target_model": target, "attack": name, "eps": eps,
                    "n_images": len(c), "n_correct": n_correct, "n_fooled": fooled,
                    "fooled_rate": fooled / len(c) if len(c) else math.nan, "ci_low": low, "ci_high": high,
                })
    out["cells"].sort(key=lambda row: row["_order"])
    for row in out["cells"]:
        del row["_order"]
    return out


def _empty_attack_table(n_cells: int, n_judges: int) -> pa.Table:
    empty = pa.array([], pa.bool_())
    return pa.table({
        "eps": pa.array([], pa.int64()), "image_id": pa.array([], pa.int64()), "label": pa.array([], pa.int64()),
        "success_float": empty, "success": empty,
        "restored": pa.FixedSizeListArray.from_arrays(empty, n_cells),
        "correct_by": pa.FixedSizeListArray.from_arrays(empty, n_judges),
    })


def _write_adversarial_manifests(config, manifest, units, unit_path) -> None:
    """One pixelray data set per (model, eps) under ``save_adversarial``: the saved shards + manifest.json."""
    from pixelray.shards import MANIFEST_NAME, Manifest, ShardInfo

    root = Path(config.save_adversarial)
    for model in config.models:
        saved: list[list[dict]] = [[] for _ in config.attack.eps]
        for unit in units:
            path = unit_path(unit)
            if unit.model != model or not path.exists():
                continue
            meta = pq.read_schema(path).metadata or {}
            for e, info in enumerate(json.loads(meta.get(_META_SAVED, b"[]"))):
                if info:
                    saved[e].append(info)
        for e, k in enumerate(config.attack.eps):
            if not saved[e]:
                continue
            shards = tuple(ShardInfo(**s) for s in sorted(saved[e], key=lambda s: s["min_id"]))
            adv = Manifest(
                name=f"{manifest.name}-{config.attack.kind.value}-eps{k}-{model_slug(model)}",
                height=manifest.height, width=manifest.width, num_images=sum(s.rows for s in shards),
                num_classes=manifest.num_classes, class_names=manifest.class_names, class_ids=manifest.class_ids,
                shards=shards, source=config.attack.kind.value,
            )
            _write_text_atomic(adv.to_json(), root / model_slug(model) / f"eps{k}" / MANIFEST_NAME)
