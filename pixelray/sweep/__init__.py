"""The sweep driver: plan units, schedule them on ModelWorker actors, write results, resume.

Data flows one way: config -> plan -> units -> workers -> unit files -> cells.parquet.

Two phases run over (model, shard) units. The *clean* phase predicts every image
once per model; the driver then picks the evaluation set (``filter``,
``eval_size``; lowest image ids first). The *cells* phase runs every cell of the
plan over the evaluation-set images of each shard. Each finished unit is written
as its own Parquet file (temp + rename) stamped with a fingerprint of what it was
computed from, so a rerun of the same config into the same directory skips what is
done and recomputes anything unreadable or foreign; a different config there is
refused, and one run at a time holds the directory (``run.lock``).

With an ``[attack]`` section a third phase, *attack*, runs one unit per (model,
shard) over the attack's candidates: the images the ``[eval]`` filter admits (its
``size`` does not apply: the attack keeps ``[attack] size`` examples of its own).
The worker reads the shard once, makes the examples (FGSM, PGD, ...) at every eps with the
unit's model, runs every cell over the eligible ones (those that fool the model
after uint8 rounding; every one with ``keep = "all"``) and has every model of the
sweep judge them. It returns per-image bits, which become the unit file. The
driver then keeps, per (model, eps), the ``size`` eligible examples with the
lowest image ids and sums the bits over them: the selection is exact and global,
whatever the shard layout, batch size or order in which units finish. Units are
run in image-id order, and a unit whose lowest candidate id lies above ``size``
eligible examples at every eps (among finished units) is skipped: its images
could not be kept.

With a ``pixels_to_failure`` experiment a *failure* phase runs every ladder over the images each model
classifies correctly unchanged (``failure``: the searches of :mod:`pixelray.engine.ladder`), and the attack
units search the same ladders over the examples they may keep (pixels to restore); both land in
``failure.parquet``.

Layout of an output directory::

    run.lock                 held by the run in progress (config hash, pid, host)
    run.json                 config identity, hash and versions
    units/clean/<model>/<shard>.parquet
    units/cells/<model>/<shard>.parquet
    units/attack/<model>/<shard>.parquet   per (eps, image) bits (sweep.attack.attack_unit_table)
    units/failure/<model>/<shard>.parquet  per (ladder, image) counts (sweep.failure.failure_unit_table)
    image_ids.txt            the evaluated image ids (per-model filter: image_ids/<model>.txt)
    clean.parquet            model, image_id, label, prediction, correct
    cells.parquet            one row per experiment x model x cell (DESIGN.md "Results schema"),
                             and with an attack one more per experiment x model x eps x cell
    attack.parquet           one row per model x eps: the attack's success rate (ATTACK_SCHEMA)
    transfer.parquet         one row per source model x target model x eps (TRANSFER_SCHEMA)
    attack_ids.parquet       model, attack, attack_params, eps, image_id of every kept adversarial example
    failure.parquet          one row per experiment x model x ladder x image: pixels to failure (FAILURE_SCHEMA)
    stats.json               shard reads per phase, units run, timings
    rejected/                unit files that could not be used (unreadable, another plan), kept for a look

The attack's tables are described in :mod:`pixelray.sweep.attack_results`. The modules:
``driver`` (run_sweep: the order of things), ``context`` (what the phases share, and
how units are resumed or run), ``pool`` (workers, scheduling, retries), ``devices`` (the
device, from what the cluster has and can get), ``clean``, ``cells``, ``attack`` (the
phases), ``failure`` (the ladders' phase and rows), ``results`` and ``attack_results`` (the tables).
"""

from pixelray.errors import SweepError, SweepStopped
from pixelray.sweep.attack import select_kept
from pixelray.sweep.clean import select_eval_set
from pixelray.sweep.driver import SweepResult, run_sweep
from pixelray.sweep.pool import connect
from pixelray.sweep.results import ATTACK_SCHEMA, CELLS_SCHEMA, FAILURE_SCHEMA, TRANSFER_SCHEMA

__all__ = [
    "ATTACK_SCHEMA",
    "CELLS_SCHEMA",
    "FAILURE_SCHEMA",
    "TRANSFER_SCHEMA",
    "SweepError",
    "SweepStopped",
    "SweepResult",
    "connect",
    "run_sweep",
    "select_eval_set",
    "select_kept",
]
