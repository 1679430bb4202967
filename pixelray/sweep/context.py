"""What the phases of one sweep share, and the one way they run units: load what is done, run the rest."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from pixelray.config.sweep import SweepConfig, Verify
from pixelray.core.ladder import Ladder
from pixelray.core.spec import Cell
from pixelray.engine.units import Phase, Unit
from pixelray.shards import Manifest, ShardExpectation, ShardInfo
from pixelray.store.rundir import RunDir, fingerprint
from pixelray.sweep.pool import WorkerPool, schedule
from pixelray.telemetry import SweepTelemetry

__all__ = ["RunContext"]


@dataclass
class RunContext:
    """One sweep in progress: its config, data, plan, output directory, workers and counters.

    Attributes:
        config: the validated config.
        manifest: the data set's manifest.
        uris: each shard's path or URI, in manifest order (checked to lie inside the data root).
        cell_pairs: (experiment, cell) in config order; ``cells`` holds each cell once.
        run_dir: the claimed output directory.
        pool: the workers.
        telemetry: metrics and the progress bar.
        say: where messages for the user go.
        stats: per phase, for ``stats.json``: ``reads`` (shard reads the workers made, counted in
            their reader), ``units_run`` (units finished, counted here), ``images`` (images the workers
            forwarded in this run's units, x cells: ``pixelray plan`` predicts them), ``grad_images`` (of them,
            those an attack also sent back through the model for a gradient), and the workers' seconds
            ``compute_s`` (holding the device) and ``read_s`` (reading and staging shards); ``by_model``:
            ``images``, ``grad_images`` and ``compute_s`` per model and phase (what ``pixelray plan --stats``
            reads a throughput from).
    """

    config: SweepConfig
    manifest: Manifest
    uris: list[str]
    cell_pairs: list[tuple[str, Cell]]
    run_dir: RunDir
    pool: WorkerPool
    telemetry: SweepTelemetry
    say: Callable[[str], None]
    stats: dict[str, dict[str, int]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._info = {info.file: info for info in self.manifest.shards}

    @property
    def cells(self) -> list[Cell]:
        return list(dict.fromkeys(cell for _, cell in self.cell_pairs))

    @property
    def ladder_pairs(self) -> list[tuple[str, Ladder]]:
        """(experiment, ladder) of the ``pixels_to_failure`` experiments, in config order."""
        return self.config.ladders(self.size)

    @property
    def size(self) -> tuple[int, int]:
        return self.manifest.height, self.manifest.width

    @property
    def num_classes(self) -> int:
        return self.manifest.num_classes

    def shards(self) -> list[tuple[str, ShardInfo]]:
        return list(zip(self.uris, self.manifest.shards, strict=True))

    def expect(self, info: ShardInfo) -> ShardExpectation:
        """What a worker checks a read of this shard against; the sha256 by the ``[data] verify`` policy."""
        local = "://" not in self.config.data or self.config.data.startswith("file://")
        verify = self.config.verify
        sha = verify is Verify.SHA256 or (verify is Verify.AUTO and local)
        return ShardExpectation.of(self.manifest, info, sha256=sha)

    def unit(self, phase: Phase, model: str, uri: str, info: ShardInfo, image_ids=None, attack=None) -> Unit:
        ids = None if image_ids is None else tuple(int(i) for i in image_ids)
        return Unit(phase, model, uri, info.file, ids, self.expect(info), attack)

    def unit_print(self, unit: Unit) -> str:
        """The fingerprint a unit file must carry: config, unit, the shard's bytes and the images."""
        info = self._info[unit.shard_name]
        images = None
        if unit.image_ids is not None:
            images = hashlib.sha256(np.asarray(unit.image_ids, dtype=np.int64).tobytes()).hexdigest()
        return fingerprint(config=self.config.config_hash, unit=unit.key, shard=info.sha256, images=images)

    def run_units(
        self,
        phase: Phase,
        units: list[Unit],
        submit: Callable[[Any, Unit], Any],
        to_table: Callable[[Unit, dict], pa.Table],
        *,
        on_table: Callable[[Unit, pa.Table], None] | None = None,
        skip: Callable[[Unit], bool] | None = None,
        label: str | None = None,
    ) -> dict[str, pa.Table]:
        """Each unit's table, by unit key: from its file when that is whole and of this plan, else computed.

        ``to_table(unit, result)`` turns a worker's result into the unit file's table;
        ``on_table`` sees every table as it becomes known (resumed ones first); units that
        ``skip`` drops (see :func:`~pixelray.sweep.pool.schedule`) have no table. ``label``
        names this run of the phase in the progress bar and metrics (default: the phase);
        ``stats`` sum over a phase's runs.
        """
        tables: dict[str, pa.Table] = {}
        todo = []
        for unit in units:
            table = self.run_dir.load_unit(unit.key, self.unit_print(unit))
            if table is None:
                todo.append(unit)
                continue
            tables[unit.key] = table
            if on_table is not None:
                on_table(unit, table)
        name = phase.value
        for counter in ("reads", "units_run", "images", "grad_images", "compute_s", "read_s"):
            self.stats.setdefault(counter, {}).setdefault(name, 0)

        def done(unit: Unit, result: dict) -> None:
            table = to_table(unit, result)
            self.run_dir.write_unit(unit.key, table, self.unit_print(unit))
            tables[unit.key] = table
            self.stats["reads"][name] += int(result["reads"])  # counted in the worker's reader
            self.stats["units_run"][name] += 1  # counted here, as units finish
            self.stats["images"][name] += int(result["images"])  # images forwarded (x cells), the worker's count
            self.stats["grad_images"][name] += int(result["grad_images"])
            self.stats["compute_s"][name] += float(result["compute_s"])
            self.stats["read_s"][name] += float(result["read_s"])
            mine = self.stats.setdefault("by_model", {}).setdefault(unit.model, {}).setdefault(
                name, {"images": 0, "grad_images": 0, "compute_s": 0.0})
            for key, kind in (("images", int), ("grad_images", int), ("compute_s", float)):
                mine[key] += kind(result[key])
            self.telemetry.unit_done(unit.model, int(result["images"]))
            if on_table is not None:
                on_table(unit, table)

        self.telemetry.start_phase(label or name, len(units), len(units) - len(todo))
        schedule(self.pool, todo, submit, done, self.telemetry, skip=skip)
        return tables
