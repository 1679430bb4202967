"""Where a run's numbers come from: config and hash, data and manifest, weights, versions, timing.

Read from ``run.json``, ``stats.json``, the evaluated-id files, checkpoint
sidecars and, when the data set is a local directory, its ``manifest.json``
(its sha256 identifies the data set's listing; a remote data set is not read:
the report makes no network request).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pixelray.report.load import Run

__all__ = ["Provenance", "provenance"]


@dataclass(frozen=True)
class Provenance:
    """One run's provenance: ordered (item, value) pairs and its full config as JSON text."""

    run: str
    path: str
    items: list[tuple[str, str]]
    config_json: str


def _manifest(data: Any) -> list[tuple[str, str]]:
    if not isinstance(data, str) or not data:
        return [("data set path", "not recorded (no run.json)")]
    if "://" in data:
        return [("data set path", data), ("manifest", "not read: a remote data set (the report stays offline)")]
    path = Path(data) / "manifest.json"
    try:
        raw = path.read_bytes()
        manifest = json.loads(raw)
    except (OSError, ValueError):
        return [("data set path", data), ("manifest", f"{path} not readable from here")]
    if not isinstance(manifest, dict):
        return [("data set path", data), ("manifest", f"{path} is not a JSON object")]
    shape = f"{manifest.get('height')}×{manifest.get('width')}"
    return [
        ("data set path", data),
        ("manifest", f"{path} (sha256 {hashlib.sha256(raw).hexdigest()})"),
        ("data set", f"{manifest.get('name')}: {manifest.get('num_images')} images {shape}, "
                     f"{manifest.get('num_classes')} classes, source {manifest.get('source')}"),
    ]


def _joined(values) -> str:
    shown = sorted({str(v) for v in values if v is not None and v == v})
    return ", ".join(shown) if shown else "not recorded"


def _timing(run: Run) -> list[tuple[str, str]]:
    stats = run.stats
    wall = stats.get("wall_s")
    plain = run.cells[run.cells["attack"].isna()].drop_duplicates(
        subset=["model", "count", "amplitude", "area", "channels", "positions", "seed"])
    evaluations = int(plain["n_images"].sum())
    out = [("cell evaluations", f"{evaluations:,} (image × model × cell, without the attack's)")]
    if isinstance(wall, (int, float)) and wall > 0:
        out.append(("wall time", f"{wall:.1f} s (the last invocation of the sweep: a resumed run counts only "
                                 "its own part)"))
        out.append(("throughput", f"{evaluations / wall:,.0f} cell evaluations per second"))
    else:
        out.append(("wall time", "not recorded (no stats.json)"))
    for key in ("units_run", "reads"):
        if isinstance(stats.get(key), dict):
            out.append((key.replace("_", " "), ", ".join(f"{k} {v}" for k, v in stats[key].items())))
    return out


def provenance(run: Run) -> Provenance:
    meta, config = run.meta, run.meta.get("config") if isinstance(run.meta.get("config"), dict) else {}
    hashes = set(run.cells["config_hash"].dropna())
    recorded = meta.get("config_hash")
    hash_text = str(recorded or _joined(hashes))
    if recorded and hashes and hashes != {recorded}:
        hash_text += f" (cells.parquet says {_joined(hashes)}: the results do not belong to this run.json)"
    created = meta.get("created")
    items = [("config hash", hash_text)]
    if isinstance(created, (int, float)):
        items.append(("started", datetime.fromtimestamp(created, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")))
    items.append(("data set name", _joined(run.cells["dataset"])))
    items += _manifest(config.get("data"))
    items.append(("image size", _joined(run.cells["image_size"])))
    for key in ("filter", "eval_size", "seeds"):
        if key in config:
            items.append((key.replace("_", " "), json.dumps(config[key])))
    for spec, info in run.models.items():
        weights = _joined(run.cells.loc[run.cells["model"] == spec, "weights"])
        text = f"{spec} (weights {weights})"
        if info.sidecar:
            side = info.sidecar
            text += f"; sidecar {side.get('file')}, base {side.get('base')}, sha256 {side.get('sha256')}"
            if info.augment_count is not None:
                text += f", trained with {info.augment_count}-pixel-change augmentation"
        elif spec.startswith("checkpoint:"):
            text += "; sidecar not found from here"
        items.append((f"model {info.label}", text))
    items.append(("pixelray version", str(meta.get("pixelray_version") or _joined(run.cells["pixelray_version"]))))
    items.append(("torch version", str(meta.get("torch_version") or _joined(run.cells["torch_version"]))))
    ids = run.image_ids
    items.append(("evaluated image ids", "; ".join(f"{n:,} in {run.path / f}" for f, n in ids.items())
                  if ids else "no image_ids.txt"))
    items += _timing(run)
    text = json.dumps(config, indent=2, sort_keys=True, default=str) if config else "(no run.json)"
    return Provenance(run.name, str(run.path), items, text)
