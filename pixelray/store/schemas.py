"""The schemas of a sweep's results tables, in a module light enough for every reader.

The sweep writes these tables and the report reads them; neither direction needs
the other's imports (the sweep driver pulls in torch and the workers, the report
must not). ``pixelray.sweep`` re-exports them under the same names.
"""

from __future__ import annotations

import pyarrow as pa

__all__ = ["ATTACK_SCHEMA", "CELLS_SCHEMA", "FAILURE_SCHEMA", "IDS_SCHEMA", "TRANSFER_SCHEMA"]

#: cells.parquet: one row per experiment x model x cell (DESIGN.md "Results schema"). ``family`` is
#: ``pixel_change`` (count, amplitude, area, channels, positions set) or a corruption such as
#: ``impulse_noise`` (severity set; pixel_index null; equivalent_pixels: the pixel-change count with
#: the same wrong rate, and its interval). ``cell_id`` is the string that keys the cell's draws;
#: ``pixelray.core.spec.Cell.from_id`` (or ``Cell.from_columns`` on the count .. seed and image_size
#: columns) rebuilds the exact cell.
CELLS_SCHEMA = pa.schema([
    ("experiment", pa.string()), ("model", pa.string()), ("weights", pa.string()),
    ("attack", pa.string()), ("attack_params", pa.string()), ("eps", pa.float64()),
    ("family", pa.string()), ("count", pa.int64()), ("amplitude", pa.string()),
    ("area", pa.int64()), ("channels", pa.string()), ("positions", pa.string()), ("severity", pa.int64()),
    ("seed", pa.int64()), ("cell_id", pa.string()),
    ("n_images", pa.int64()), ("n_wrong", pa.int64()), ("n_restored", pa.int64()), ("accuracy", pa.float64()),
    ("wrong_rate", pa.float64()), ("restored_rate", pa.float64()), ("ci_low", pa.float64()),
    ("ci_high", pa.float64()), ("pixel_index", pa.float64()), ("equivalent_pixels", pa.float64()),
    ("equivalent_pixels_low", pa.float64()), ("equivalent_pixels_high", pa.float64()),
    ("image_size", pa.int64()), ("dataset", pa.string()),
    ("config_hash", pa.string()), ("pixelray_version", pa.string()), ("torch_version", pa.string()),
])

_RUN_COLUMNS = [
    ("dataset", pa.string()), ("config_hash", pa.string()),
    ("pixelray_version", pa.string()), ("torch_version", pa.string()),
]

#: attack.parquet: one row per model x eps, the attack's success rate.
ATTACK_SCHEMA = pa.schema([
    ("model", pa.string()), ("weights", pa.string()), ("attack", pa.string()), ("attack_params", pa.string()),
    ("eps", pa.float64()), ("keep", pa.string()), ("n_attacked", pa.int64()), ("n_success_float", pa.int64()),
    ("n_success", pa.int64()),
    ("success_rate_float", pa.float64()), ("success_rate", pa.float64()), ("ci_low", pa.float64()),
    ("ci_high", pa.float64()), ("n_kept", pa.int64()), ("image_size", pa.int64()), *_RUN_COLUMNS,
])

#: transfer.parquet: one row per source (attacked) model x target (judge) model x eps.
TRANSFER_SCHEMA = pa.schema([
    ("source_model", pa.string()), ("target_model", pa.string()), ("weights", pa.string()),
    ("attack", pa.string()), ("attack_params", pa.string()), ("eps", pa.float64()), ("n_images", pa.int64()),
    ("n_correct", pa.int64()),
    ("n_fooled", pa.int64()), ("fooled_rate", pa.float64()), ("ci_low", pa.float64()), ("ci_high", pa.float64()),
    *_RUN_COLUMNS,
])

#: attack_ids.parquet: which adversarial examples were kept, per model, attack (its name and parameters, as
#: in attack.parquet: FGSM and PGD at one eps keep different images) and eps. Runs written before the attack
#: columns read as they did (no such columns).
IDS_SCHEMA = pa.schema([("model", pa.string()), ("attack", pa.string()), ("attack_params", pa.string()),
                        ("eps", pa.float64()), ("image_id", pa.int64())])

#: failure.parquet: one row per experiment x model x ladder x image (pixels to failure, ``pixelray.core.ladder``).
#: ``target`` "wrong": an evaluation-set image, and ``n_fail`` the first ladder point whose first k changes make
#: the model misclassify it; "right": a kept adversarial example (``attack``, ``attack_params``, ``eps`` set), and
#: ``n_fail`` the first point that brings it back to its true class (pixels to restore). ``n_fail`` null: no flip
#: up to ``max_count``. ``n_fail_refined``: with ``refine``, the first flipped integer count (null otherwise);
#: ``n_last_correct``: the largest count known not to flip (0: the image unchanged); ``n_passes``: forward
#: passes spent on the image. ``Ladder.from_columns`` rebuilds the ladder from amplitude .. refine and image_size.
#: ``kind`` "random" (the ladder's random changes) or "worst_case" (``pixelray.core.worst``: the smallest point at
#: which the sparse search ``attack`` with ``attack_params`` finds an example within ``budget`` forward passes
#: per point; ``n_passes`` its forward passes in all; ``budget`` null for random rows).
FAILURE_SCHEMA = pa.schema([
    ("experiment", pa.string()), ("model", pa.string()), ("weights", pa.string()),
    ("attack", pa.string()), ("attack_params", pa.string()), ("eps", pa.float64()),
    ("family", pa.string()), ("kind", pa.string()), ("target", pa.string()),
    ("image_id", pa.int64()), ("label", pa.int64()),
    ("ladder_id", pa.string()), ("amplitude", pa.string()), ("area", pa.int64()), ("channels", pa.string()),
    ("seed", pa.int64()), ("steps_per_octave", pa.int64()), ("max_count", pa.int64()), ("search", pa.string()),
    ("refine", pa.bool_()),
    ("n_fail", pa.int64()), ("n_fail_refined", pa.int64()), ("n_last_correct", pa.int64()), ("n_passes", pa.int64()),
    ("image_size", pa.int64()), ("budget", pa.int64()), *_RUN_COLUMNS,
])
