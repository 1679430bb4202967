"""Hand-made sweep output directories with known counts, for the report tests.

Two runs, written with pyarrow in the sweep's own schemas:

- ``base``: the paper's setting (224 x 224, 10,000 images) for resnet101, densenet121 (ImageNet weights)
  and ``mynet`` (not a paper model), plus an augmented ResNet101 checkpoint (``r101-aug4``) that
  judges resnet101's FGSM examples;
- ``tuned``: the same checkpoint and resnet101 on 1,000 images (Table 10's size).

Every count here is chosen by hand; the tests compute the expected rates and intervals
from these numbers with scipy, never with pixelray.
"""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pixelray.store.schemas import FAILURE_SCHEMA
from pixelray.sweep import ATTACK_SCHEMA, CELLS_SCHEMA, TRANSFER_SCHEMA

EPS = 2 / 255


def cell(model, count, n_images, n_wrong, *, amplitude="full", area=224, attack=None, eps=None, n_restored=None,
         weights="imagenet", experiment="count", seed=0, image_size=224):
    """One cells.parquet row; the derived columns are left empty (the report must not rely on them)."""
    return {
        "experiment": experiment, "model": model, "weights": weights, "attack": attack, "eps": eps,
        "count": count, "amplitude": amplitude, "area": area, "channels": "all", "positions": "per-image",
        "seed": seed, "n_images": n_images, "n_wrong": n_wrong, "n_restored": n_restored, "accuracy": None,
        "wrong_rate": None, "restored_rate": None, "ci_low": None, "ci_high": None, "pixel_index": None,
        "image_size": image_size, "dataset": "handmade", "config_hash": "feedc0ffee", "pixelray_version": "0.1.0",
        "torch_version": "2.x",
    }


def _run_columns():
    return {"dataset": "handmade", "config_hash": "feedc0ffee", "pixelray_version": "0.1.0", "torch_version": "2.x"}


def checkpoint(root: Path, name: str, base: str, augment_count: int | None) -> str:
    """A checkpoint spec whose sidecar (the only file the report reads) names its base and augmentation."""
    path = root / "models" / f"{name}.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    sidecar = {"base": base, "name": name, "num_classes": 1000, "sha256": "ab" * 32,
               "metadata": {"augment_count": augment_count}}
    path.with_name(path.name + ".json").write_text(json.dumps(sidecar))
    return f"checkpoint:{path}"


def write_base_run(root: Path) -> tuple[Path, str]:
    """The base run; returns (its directory, the augmented checkpoint's spec)."""
    out = root / "base"
    out.mkdir(parents=True)
    aug = checkpoint(root, "r101-aug4", "resnet101", 4)
    n = 10_000
    rows = [
        # Table 6 (and 5 at n = 64): resnet101 at n = 4, 8, 64 only (16 and 32 absent)
        cell("resnet101", 4, n, 82), cell("resnet101", 8, n, 150), cell("resnet101", 64, n, 416),
        cell("densenet121", 4, n, 65), cell("densenet121", 64, n, 400),
        cell("mynet", 4, n, 10), cell("mynet", 64, n, 20),
        cell(aug, 4, n, 30),
        # the same resnet101 n = 4 cell named by a second experiment: one measurement, one row in the tables
        cell("resnet101", 4, n, 82, experiment="area"),
        # Table 7: shift amplitude 40
        cell("resnet101", 4, n, 13, amplitude="40", experiment="amplitude"),
        cell("resnet101", 64, n, 80, amplitude="40", experiment="amplitude"),
        # Table 8: area 100
        cell("resnet101", 4, n, 69, area=100, experiment="area"),
        # Table 9: FGSM at eps 2/255, 10,000 kept examples, 3,303 restored at n = 4
        cell("resnet101", 4, n, 6697, attack="fgsm", eps=EPS, n_restored=3303),
        cell("resnet101", 8, n, 5000, attack="fgsm", eps=EPS, n_restored=5000),
    ]
    pq.write_table(pa.Table.from_pylist(rows, schema=CELLS_SCHEMA), out / "cells.parquet")
    clean = {"model": ["resnet101"] * 20 + ["densenet121"] * 20, "image_id": list(range(20)) * 2,
             "label": [0] * 40, "prediction": [0] * 18 + [1] * 2 + [0] * 20,
             "correct": [True] * 18 + [False] * 2 + [True] * 20}
    pq.write_table(pa.table(clean), out / "clean.parquet")
    attack = [{"model": "resnet101", "weights": "imagenet", "attack": "fgsm", "eps": EPS, "keep": "successful",
               "n_attacked": 12_000, "n_success_float": 10_100, "n_success": 10_000, "success_rate_float": None,
               "success_rate": None, "ci_low": None, "ci_high": None, "n_kept": 10_000, "image_size": 224,
               **_run_columns()}]
    pq.write_table(pa.Table.from_pylist(attack, schema=ATTACK_SCHEMA), out / "attack.parquet")
    transfer = [
        {"source_model": src, "target_model": tgt, "weights": "imagenet", "attack": "fgsm", "eps": EPS,
         "n_images": 10_000, "n_correct": correct, "n_fooled": 10_000 - correct, "fooled_rate": None,
         "ci_low": None, "ci_high": None, **_run_columns()}
        for src, tgt, correct in [("resnet101", "resnet101", 0), ("resnet101", aug, 7510),
                                  ("resnet101", "densenet121", 6000), ("densenet121", "resnet101", 5000)]
    ]
    pq.write_table(pa.Table.from_pylist(transfer, schema=TRANSFER_SCHEMA), out / "transfer.parquet")
    data = root / "data"
    data.mkdir()
    (data / "manifest.json").write_text(json.dumps({"name": "handmade", "height": 224, "width": 224,
                                                    "num_images": 20, "num_classes": 2, "source": "test"}))
    config = {"data": str(data), "models": ["resnet101", "densenet121", "mynet", aug], "weights": "imagenet",
              "filter": "all", "eval_size": 10000, "seeds": [0]}
    (out / "run.json").write_text(json.dumps({"config_hash": "feedc0ffee", "config": config,
                                              "pixelray_version": "0.1.0", "torch_version": "2.x",
                                              "created": 1700000000.0}))
    (out / "stats.json").write_text(json.dumps({"wall_s": 10.0, "units_run": {"clean": 2, "cells": 4}}))
    (out / "image_ids.txt").write_text("".join(f"{i}\n" for i in range(3)))
    return out, aug


def write_tuned_run(root: Path, aug: str) -> Path:
    """The fine-tuned models' run on 1,000 images (Table 10's setting)."""
    out = root / "tuned"
    out.mkdir(parents=True)
    n = 1000
    rows = [cell(aug, 4, n, 22), cell(aug, 8, n, 40),
            cell("resnet101", 4, n, 50)]
    pq.write_table(pa.Table.from_pylist(rows, schema=CELLS_SCHEMA), out / "cells.parquet")
    return out


def control_checkpoint(root: Path, name: str, base: str, started_from: str) -> str:
    """A checkpoint fine-tuned from ``started_from`` without augmentation (``pixelray train-augment``'s
    ``aug = "none"`` control), as its sidecar says."""
    path = root / "models" / f"{name}.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    sidecar = {"base": base, "name": name, "num_classes": 1000, "sha256": "cd" * 32,
               "metadata": {"augment": {"aug": "none"}, "started_from": started_from}}
    path.with_name(path.name + ".json").write_text(json.dumps(sidecar))
    return f"checkpoint:{path}"


def failure_row(model, image_id, n_fail, *, n_fail_refined=None, refine=False, target="wrong", attack=None,
                eps=None, attack_params=None, weights="imagenet", experiment="ladder", seed=0, steps_per_octave=1,
                max_count=16, image_size=32, search="scan"):
    """One failure.parquet row of a full-range, whole-image ladder on ``image_size``-square images (ladder_id
    written out by hand); n_last_correct and n_passes are filler (the report does not read them)."""
    return {
        "experiment": experiment, "model": model, "weights": weights, "attack": attack,
        "attack_params": attack_params, "eps": eps, "family": "pixels_to_failure", "kind": "random",
        "target": target, "image_id": image_id, "label": 0, "ladder_id": f"ladder-full-whole-all-seed{seed}",
        "amplitude": "full", "area": image_size, "channels": "all", "seed": seed,
        "steps_per_octave": steps_per_octave, "max_count": max_count, "search": search, "refine": refine,
        "n_fail": n_fail, "n_fail_refined": n_fail_refined, "n_last_correct": None, "n_passes": 3,
        "image_size": image_size, **_run_columns(),
    }


def write_failure_run(root: Path, cells: list[dict], failure: list[dict] | None, name: str = "ladder") -> Path:
    """A run directory of ``cells`` (cells.parquet rows) and, unless None, ``failure`` (failure.parquet rows)."""
    out = root / name
    out.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(cells, schema=CELLS_SCHEMA), out / "cells.parquet")
    if failure is not None:
        pq.write_table(pa.Table.from_pylist(failure, schema=FAILURE_SCHEMA), out / "failure.parquet")
    return out


class _Refs(HTMLParser):
    """Every attribute of a page that makes a browser fetch something, and CSS url(...) references."""

    FETCHING = {"src", "href", "srcset", "poster", "data", "action", "background", "xlink:href", "formaction"}

    def __init__(self) -> None:
        super().__init__()
        self.refs: list[tuple[str, str, str]] = []
        self.in_style = False

    def handle_starttag(self, tag, attrs):
        self.in_style = tag == "style"
        for name, value in attrs:
            if name in self.FETCHING:
                self.refs.append((tag, name, value or ""))
            if name == "style":
                self.refs += [(tag, "style url", u) for u in re.findall(r"url\(([^)]*)\)", value or "")]

    def handle_endtag(self, tag):
        self.in_style = False

    def handle_data(self, data):
        if self.in_style:
            self.refs += [("style", "url", u) for u in re.findall(r"url\(([^)]*)\)|@import", data)]


def external_refs(html: str) -> list[tuple[str, str, str]]:
    """The references of a page that could leave the file: anything but data: URIs and #fragments."""
    parser = _Refs()
    parser.feed(html)
    return [r for r in parser.refs if not re.match(r"\s*['\"]?(data:|#)", r[2])]
