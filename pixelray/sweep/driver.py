"""``run_sweep``: check everything that can be checked, claim the output, run the phases, write the results.

Order matters for "nothing wrong is ever silent, nothing half-done is ever left":

1. Before Ray: the config (already valid; no example placeholder left in a path), the data
   (manifest, and every shard's footer, ids and labels: :func:`~pixelray.shards.check_shards`),
   the plan (cells fit the images), the output directory (claimed with a lock; another config's run refused) and
   the metrics port. A failure here writes nothing.
2. Join Ray, start the workers, and load every model once (the preflight). A failure
   still writes nothing: the claim is undone.
3. ``run.json``, then the phases (clean, cells, attack), each unit file written as it
   finishes: from here on a killed run resumes where it stopped.
4. The results tables, each written atomically; the metrics endpoint lingers so the
   final counts can be scraped, then the lock is released.
"""

from __future__ import annotations

import contextlib
import json
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

from pixelray.config.sweep import SweepConfig
from pixelray.core.metrics import aggregate
from pixelray.errors import SweepError, SweepStopped, one_line
from pixelray.shards import Manifest, ShardError, check_shards, load_manifest, shard_uris
from pixelray.store.rundir import RunDir
from pixelray.sweep.attack import run_attack
from pixelray.sweep.attack_results import attack_results, write_adversarial_manifests
from pixelray.sweep.cells import run_cells
from pixelray.sweep.clean import run_clean, select_eval_set, write_eval_ids
from pixelray.sweep.context import RunContext
from pixelray.sweep.failure import failure_rows, run_failure
from pixelray.sweep.pool import WorkerPool, connect
from pixelray.sweep.results import (
    ATTACK_SCHEMA,
    CELLS_SCHEMA,
    FAILURE_SCHEMA,
    IDS_SCHEMA,
    TRANSFER_SCHEMA,
    add_equivalent_pixels,
    cell_rows,
    common_columns,
    versions,
)
from pixelray.telemetry import SweepTelemetry

__all__ = ["SweepResult", "check_checkpoints", "check_data", "run_sweep"]


@dataclass
class SweepResult:
    """Where the results went: local Paths, or URIs (str) in an object store."""

    out_dir: Path | str
    cells_path: Path | str
    clean_path: Path | str
    stats: dict[str, Any] = field(default_factory=dict)
    attack_path: Path | str | None = None  # with an [attack] section
    transfer_path: Path | str | None = None
    failure_path: Path | str | None = None  # with a pixels_to_failure experiment


def check_data(config: SweepConfig) -> tuple[Manifest, list[str]]:
    """The manifest and shard paths, after checking every shard's footer, ids and labels (no pixels)."""
    try:
        manifest = load_manifest(config.data)
        uris = shard_uris(config.data, manifest)
        check_shards(config.data, manifest)
    except (OSError, ShardError) as exc:
        raise SweepError(f"[data] path = {config.data!r}: {one_line(exc)}") from None
    return manifest, uris


def check_checkpoints(config: SweepConfig, num_classes: int) -> None:
    """Read and check every ``checkpoint:`` model here, before anything is claimed or Ray starts.

    A checkpoint is a file, like the data the driver has just checked: its sidecar, its weights-only
    state_dict, its base and its classes are refused in one line now rather than in a worker's
    preflight. The workers load it again where they run.
    """
    from pixelray.models import load_for_data
    from pixelray.models.registry import CHECKPOINT_PREFIX

    for spec in config.models:
        if spec.startswith(CHECKPOINT_PREFIX):
            try:
                load_for_data(spec, config.weights, num_classes)
            except (OSError, ValueError) as exc:
                raise SweepError(one_line(exc)) from None


def _start_telemetry(config: SweepConfig, progress: bool) -> SweepTelemetry:
    try:
        return SweepTelemetry(config.metrics_port, config.metrics_host, progress)
    except OSError as exc:
        where = f"{config.metrics_host}:{config.metrics_port}"
        raise SweepError(f"[run] metrics_port = {config.metrics_port}: {where} is in use or cannot be bound "
                         f"({exc.strerror or exc}); pick another port, or 0 for any free one") from None


class _StopOnSignals:
    """SIGTERM (``ray job stop``, a pod ending) and SIGINT (Ctrl-C) end the sweep as an error would.

    The signal raises :class:`SweepStopped` where the driver is (waiting on its workers): scheduling
    stops, the ``finally`` blocks end the workers and release the output directory, and the finished
    units stay for a rerun. Only the first signal counts, so that the
    clean-up is not cut short by a second one. Main thread only (where Python delivers signals);
    :meth:`arm` again after ``ray.init``, which installs a SIGTERM handler of its own (``sys.exit``).
    """

    def __init__(self):
        self.caught: list[int] = []
        self.before: dict = {}

    def _stop(self, signum, _frame):
        if self.caught:
            return  # cleaning up after the first one
        self.caught.append(signum)
        raise self.stopped()

    def stopped(self) -> SweepStopped:
        signum = self.caught[0]
        return SweepStopped(f"stopped by {signal.Signals(signum).name}: the finished units are kept; run the "
                            "same command again to resume", 128 + signum)

    def arm(self) -> None:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                previous = signal.signal(sig, self._stop)
                self.before.setdefault(sig, previous)

    @contextlib.contextmanager
    def armed(self) -> Iterator[_StopOnSignals]:
        self.arm()
        try:
            yield self
        finally:
            for sig, handler in self.before.items():
                signal.signal(sig, handler)


def run_sweep(
    config: SweepConfig,
    *,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    address: str | None = None,
) -> SweepResult:
    """Run (or resume) a whole sweep (see the module docstring for the order of things).

    ``address``: None/``local`` starts an embedded Ray, ``auto`` or an address joins a
    cluster; an already connected Ray is used as it is. Raises ConfigError first when a path
    still holds an example's placeholder (``s3://YOUR-BUCKET/...``), SweepError for the rest, and
    :class:`~pixelray.errors.SweepStopped` (a SweepError) after SIGTERM or SIGINT (:class:`_StopOnSignals`).
    """
    with _StopOnSignals().armed() as signals:
        try:
            return _run_sweep(config, progress, log or (lambda msg: None), address, signals)
        except SweepStopped:
            raise
        except BaseException:
            # raised inside Ray's compiled code (ray.wait), the stop arrives as a SystemError around it
            if signals.caught:
                raise signals.stopped() from None
            raise


def _run_sweep(config: SweepConfig, progress: bool, say: Callable[[str], None], address: str | None,
               signals: _StopOnSignals) -> SweepResult:
    t_start = time.perf_counter()
    config.check_placeholders()  # ConfigError: an example's s3://YOUR-BUCKET left in a path
    manifest, uris = check_data(config)
    check_checkpoints(config, manifest.num_classes)
    cell_pairs = config.cells((manifest.height, manifest.width))
    config.ladders((manifest.height, manifest.width))  # ConfigError now (a max_count the images cannot hold)
    config.check_attacks((manifest.height, manifest.width))  # ... or an attack's k
    if config.max_cost is not None or config.max_hours is not None:  # the plan's cost, before anything is claimed
        from pixelray.sweep.plan import check_cost, plan_sweep

        check_cost(plan_sweep(config, (manifest, uris)))
    run_dir = RunDir(config.output_dir, log=say)
    run_dir.claim(config.config_hash)
    telemetry = pool = None
    started = False
    try:
        run_dir.refuse_another_config(config.config_hash)
        telemetry = _start_telemetry(config, progress)
        if telemetry.port:
            say(f"metrics: http://{config.metrics_host}:{telemetry.port}/metrics")
        connect(address)
        signals.arm()  # ray.init has just put its own SIGTERM handler (sys.exit) in place of ours
        pool = WorkerPool(config, telemetry, say=say)
        pool.call("preflight", list(config.models), config.weights, manifest.num_classes)
        run_dir.start({
            "config_hash": config.config_hash, "config": config.identity(), **versions(), "created": time.time(),
        })
        started = True
        ctx = RunContext(config, manifest, uris, cell_pairs, run_dir, pool, telemetry, say)
        clean = run_clean(ctx)
        eval_ids = select_eval_set(clean.correct, config.filter, config.eval_size)
        write_eval_ids(ctx, eval_ids)
        counts = run_cells(ctx, clean, eval_ids) if ctx.cells else None
        failures = run_failure(ctx, clean, eval_ids, list(dict.fromkeys(lad for _, lad in ctx.ladder_pairs)),
                               list(dict.fromkeys(w for _, w in config.worst_cases())))
        attacks = [run_attack(ctx, clean, attack) for attack in config.attack_runs]
        telemetry.close_bar()
        ctx.stats["workers"] = {"used": pool.used, "restarts": pool.restarts, "given_up": pool.given_up}
        pool.shutdown()
        result = _write_results(ctx, clean, eval_ids, counts, failures, attacks, t_start)
        telemetry.close(linger=config.metrics_linger)
        return result
    except BaseException:
        if not started:
            run_dir.abandon()
        raise
    finally:
        if pool is not None:
            pool.shutdown()
        if telemetry is not None:
            telemetry.close()
        run_dir.release()


def _write_results(ctx: RunContext, clean, eval_ids, counts: pa.Table | None, failures: pa.Table | None,
                   attacks: list, t_start: float) -> SweepResult:
    config, run_dir, size = ctx.config, ctx.run_dir, ctx.size
    clean_path = run_dir.file("clean.parquet")
    clean_path.write_table(clean.table())
    common = common_columns(config, ctx.manifest.name)
    rows = cell_rows(config, ctx.cell_pairs, counts, size, common)
    stats: dict[str, Any] = {}
    attack_path = transfer_path = failure_path = None
    worst_pairs = config.worst_cases()
    failure = failure_rows(config, ctx.ladder_pairs, failures, size, common, worst_pairs)
    if attacks:
        tables: dict[str, list[dict]] = {"cells": [], "attack": [], "transfer": [], "ids": [], "failure": []}
        for done in attacks:
            for name, part in attack_results(config, ctx.cell_pairs, done, size, common).items():
                tables[name] += part
            if config.save_adversarial:
                write_adversarial_manifests(config, ctx.manifest, done)
        rows += tables["cells"]
        failure += tables["failure"]
        attack_path, transfer_path = run_dir.file("attack.parquet"), run_dir.file("transfer.parquet")
        attack_path.write_table(pa.Table.from_pylist(tables["attack"], schema=ATTACK_SCHEMA))
        transfer_path.write_table(pa.Table.from_pylist(tables["transfer"], schema=TRANSFER_SCHEMA))
        run_dir.file("attack_ids.parquet").write_table(pa.Table.from_pylist(tables["ids"], schema=IDS_SCHEMA))
    if ctx.ladder_pairs or worst_pairs:
        failure_path = run_dir.file("failure.parquet")
        failure_path.write_table(pa.Table.from_pylist(failure, schema=FAILURE_SCHEMA))
        stats["failure"] = {"images": sum(r["target"] == "wrong" and r["kind"] == "random" for r in failure),
                            "passes": sum(r["n_passes"] for r in failure if r["target"] == "wrong")}
    cells_path = run_dir.file("cells.parquet")
    rows = add_equivalent_pixels(aggregate(rows, size), size)
    cells_path.write_table(pa.Table.from_pylist(rows, schema=CELLS_SCHEMA))
    stats.update(ctx.stats)
    stats.update({
        "shards": len(ctx.uris), "models": len(config.models), "cells": len(ctx.cells),
        "eval_images": {m: int(len(v)) for m, v in eval_ids.items()},
        "wall_s": time.perf_counter() - t_start, "config_hash": config.config_hash,
    })
    if attacks:
        stats["attack_units"] = {done.attack.name: done.stats() for done in attacks}
    run_dir.file("stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    return SweepResult(_place(run_dir.loc), _place(cells_path), _place(clean_path), stats,
                       attack_path and _place(attack_path), transfer_path and _place(transfer_path),
                       failure_path and _place(failure_path))


def _place(loc):
    """A local result as a Path, one in an object store as its URI."""
    return loc.path if loc.path is not None else loc.uri
