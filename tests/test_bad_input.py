"""The bad-input suite: wrong configs, data, checkpoints, output directories and options, through the CLI.

Every case runs ``pixelray ...`` (in-process, through typer's runner) and asserts: exit code 2
(1 for ``data check``, which lists problems), one line on stderr that starts with ``error:`` and
names the value, no traceback, and nothing written: the output directory does not exist
afterwards (or, for a running lock, is as it was). One case fails inside a unit, where the
fault can only be seen by reading the whole shard; it leaves the resume state of the units
that finished but no results table.

| id | input | refused with |
|----|-------|--------------|
| config-missing | the config file does not exist | `no such config file` |
| config-not-toml | the config is not TOML | `not valid TOML` |
| config-unknown-key | a top-level table `[extra]` | `unknown key(s) ['extra']` |
| config-unknown-model | `names = ["resnet1010"]` | `'resnet1010' is unknown; did you mean` |
| config-duplicate-model | a model named twice | `each model may appear once` |
| config-weights | `weights = "imagenet2"` | `weights = 'imagenet2'` |
| config-tiny-pretrained | `tiny` with `weights = "imagenet"` | `'tiny' has no pretrained weights` |
| config-filter | `[eval] filter = "some"` | `filter = 'some'` |
| config-eval-size | `[eval] size = 0` | `[eval] size = 0` |
| config-batch-size | `[eval] batch_size = 0` | `[eval] batch_size = 0` |
| config-seeds | `[eval] seeds = [-1]` | `[eval] seeds = [-1]` |
| config-count | `counts = [0]` | `count: 0 is invalid` |
| config-amplitude | `amplitudes = [300]` | `amplitude: 300 is outside 1..255` |
| config-area | `areas = [64]` on 32x32 images | `area: 64 is larger than the image` |
| config-ladder | a `pixels_to_failure` experiment, `max_count = 2000` on 32x32 images | `max_count: 2000 is larger` |
| config-attack-kind | `[attack] kind = "cw"` | `kind = 'cw': unknown attack` |
| config-verify | `[data] verify = "md5"` | `[data] verify = 'md5'` |
| run-device | `[run] device = "tpu"` | `[run] device = 'tpu'` |
| run-workers | `[run] workers = 0` | `[run] workers = 0: must be an integer >= 1` |
| run-threads | `[run] threads = -1` | `[run] threads = -1: must be an integer >= 1` |
| run-metrics-port | `[run] metrics_port = 70000` | `[run] metrics_port = 70000: must be in 0..65535` |
| run-metrics-busy | `--metrics-port` on a port in use | `127.0.0.1:PORT is in use` |
| run-linger | `--metrics-linger -1` | `metrics_linger = -1.0: must be a number of seconds >= 0` |
| data-missing | `[data] path` does not exist | `cannot read the manifest` |
| data-manifest-json | `manifest.json` is not JSON | `invalid manifest` |
| data-dotdot | a shard `../x.parquet` | `must be a path relative to the data set root` |
| data-encoded-dotdot | a shard `..%2Fx.parquet` under `file://` | `outside the data set root` |
| data-absolute | a shard `/etc/passwd` | `must be a path relative to the data set root` |
| data-duplicate-ids | two shards hold the same image ids (manifest consistent) | `image ids must be unique` |
| data-shard-missing | a listed shard is missing | `shard not found` |
| data-shard-truncated | a shard cut in half | `unreadable Parquet` |
| data-shard-swapped | a shard replaced by another shard's file | `image_id range 100..199 differs` |
| data-shard-size | a shard of 16x16 images in a 32x32 set | `image shape 16x16x3 differs` |
| data-shard-rows | the manifest's row count is wrong | `100 rows, but the manifest says 90` |
| data-shard-sha256 | one pixel of a shard changed (in a unit) | `sha256` |
| ckpt-missing | `checkpoint:` names no file | `does not exist` |
| ckpt-no-sidecar | the JSON sidecar is missing | `has no JSON sidecar` |
| ckpt-sidecar-json | the sidecar is not JSON | `is not valid JSON` |
| ckpt-sidecar-code | the sidecar's base is `evilmod:make` | `is not a built-in architecture` |
| ckpt-pickle | the file is a pickle that runs code | `not a weights-only state_dict` (and it did not run) |
| ckpt-not-state-dict | the file holds one tensor | `not a state_dict of tensors` |
| ckpt-wrong-base | the weights do not fit the base | `does not fit base` |
| ckpt-classes | a 7-class model on 10-class data | `predicts 7 classes but the data set has 10` |
| out-file | the output path is a file | `is a file, not a directory` |
| out-under-file | the output path lies under a file | `is a file` |
| out-unwritable | the output path cannot be created | `cannot create` |
| out-other-run | the output holds another config's run | `holds a run of another config` |
| out-locked | another sweep holds the output directory | `is in use by another run` |
| cli-size | `pixel-index --size -1` | `--size -1: must be an integer >= 1` |
| cli-wrong | `pixel-index --wrong 11 --images 10` | `--wrong 11: must be in 0..--images (10)` |
| cli-data-check | `data check` of a manifest pointing outside | `outside the data set root` (exit 1) |
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import socket
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from pixelray.cli import app
from pixelray.models import load_model, save_checkpoint, sidecar_path
from pixelray.shards import ShardWriter, read_shard


@dataclass
class Case:
    """What one case needs: a copy of the data, an output path, the config, the models."""

    tmp: Path
    data: Path
    models: list[str]
    out: Path = None  # type: ignore[assignment]
    raw: dict = field(default_factory=dict)
    args: list[str] = field(default_factory=list)
    keep: list = field(default_factory=list)  # sockets and locks held for the case

    def __post_init__(self):
        self.out = self.tmp / "out"
        self.raw = {
            "data": {"path": str(self.data)},
            "models": {"names": list(self.models), "weights": "none"},
            "eval": {"size": 50, "batch_size": 50},
            "grid": {"counts": [8]},
            "output": {"dir": str(self.out)},
            "run": {"device": "cpu", "threads": 2},  # said: no note that auto computes on CPU
        }

    def manifest(self, edit):
        body = json.loads((self.data / "manifest.json").read_text())
        edit(body)
        (self.data / "manifest.json").write_text(json.dumps(body))

    def checkpoint(self, name="model.pt", classes=10) -> Path:
        path = save_checkpoint(load_model("tiny", None, num_classes=classes), self.tmp / name, base="tiny")
        self.raw["models"]["names"] = [f"checkpoint:{path}"]
        return path

    def sidecar(self, path, edit):
        side = sidecar_path(path)
        meta = json.loads(side.read_text())
        edit(meta)
        side.write_text(json.dumps(meta))

    def shard(self, src: str, images=None, ids=None):
        """Rewrite shard ``src`` with other images or ids (same labels); returns its new manifest entry."""
        batch = read_shard(str(self.data / src))
        images = batch.images.numpy() if images is None else images
        ids = batch.image_ids.numpy() if ids is None else ids
        with ShardWriter(self.tmp / "re", name="x", height=images.shape[1], width=images.shape[2],
                         class_names=[str(i) for i in range(10)], source="t", rows_per_shard=len(images)) as w:
            w.add(ids, batch.labels.numpy(), images, [""] * len(images))
        os.replace(self.tmp / "re" / "shard-00000.parquet", self.data / src)
        return w.close().shards[0]


def _set(section, key, value):
    def edit(c: Case):
        c.raw.setdefault(section, {})[key] = value
    return edit


def _config_text(text):
    def edit(c: Case):
        c.args = [str(_write(c.tmp / "bad.toml", text))]
    return edit


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _busy_port(c: Case):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    c.keep.append(s)
    c.args += ["--metrics-port", str(s.getsockname()[1])]
    return s.getsockname()[1]


def _out_file(c: Case):
    c.out = c.tmp / "a-file"
    c.out.write_text("x")
    c.raw["output"]["dir"] = str(c.out)


def _out_under_file(c: Case):
    (c.tmp / "a-file").write_text("x")
    c.out = c.tmp / "a-file" / "out"
    c.raw["output"]["dir"] = str(c.out)


def _out_unwritable(c: Case):
    c.out = Path("/proc/pixelray-bad-input-out")
    c.raw["output"]["dir"] = str(c.out)


def _out_other_run(c: Case):
    c.out.mkdir()
    (c.out / "run.json").write_text('{"config_hash": "0123456789abcdef"}')


def _out_locked(c: Case):
    from pixelray.store.rundir import RunDir

    holder = RunDir(c.out)
    holder.claim("0123456789abcdef")
    c.keep.append(holder)


def _pickle(c: Case):
    path = c.checkpoint()

    class Boom:
        def __reduce__(self):
            return (Path.touch, (c.tmp / "pickle-ran",))

    path.write_bytes(pickle.dumps({"w": Boom()}))
    c.sidecar(path, lambda m: m.pop("sha256"))


def _tensor(c: Case):
    path = c.checkpoint()
    torch.save(torch.zeros(3), path)
    c.sidecar(path, lambda m: m.pop("sha256"))


def _wrong_base(c: Case):
    path = c.checkpoint()
    c.sidecar(path, lambda m: m.update(base="resnet18"))


def _swap(c: Case):
    shutil.copy(c.data / "shard-00001.parquet", c.data / "shard-00002.parquet")


def _smaller(c: Case):
    c.shard("shard-00004.parquet", read_shard(str(c.data / "shard-00004.parquet")).images.numpy()[:, ::2, ::2].copy())


def _one_pixel(c: Case):
    images = read_shard(str(c.data / "shard-00003.parquet")).images.numpy().copy()
    images[7, 5, 5, 0] ^= 0xFF
    c.shard("shard-00003.parquet", images)


def _truncate(c: Case):
    p = c.data / "shard-00001.parquet"
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def _rows(c: Case):
    def edit(b):
        b["shards"][0]["rows"] = 90
        b["num_images"] -= 10
    c.manifest(edit)


def _duplicates(c: Case):
    entry = c.shard("shard-00001.parquet", ids=read_shard(str(c.data / "shard-00001.parquet")).image_ids.numpy() - 50)
    c.manifest(lambda b: b["shards"][1].update(min_id=entry.min_id, max_id=entry.max_id, sha256=entry.sha256))


def _encoded(c: Case):
    os.replace(c.data / "shard-00005.parquet", c.tmp / "shard-00005.parquet")
    c.manifest(lambda b: b["shards"][5].update(file="..%2Fshard-00005.parquet"))
    c.raw["data"]["path"] = "file://" + str(c.data)


CASES = {
    "config-missing": (lambda c: c.args.append(str(c.tmp / "nope.toml")), "no such config file"),
    "config-not-toml": (_config_text("[data\npath = 1"), "not valid TOML"),
    "config-unknown-key": (lambda c: c.raw.update(extra={}), "unknown key(s) ['extra']"),
    "config-unknown-model": (_set("models", "names", ["resnet1010"]), "'resnet1010' is unknown; did you mean"),
    "config-duplicate-model": (_set("models", "names", ["tiny", "tiny"]), "each model may appear once"),
    "config-weights": (_set("models", "weights", "imagenet2"), "weights = 'imagenet2'"),
    "config-tiny-pretrained": (
        lambda c: c.raw["models"].update(names=["tiny"], weights="imagenet"), "'tiny' has no pretrained weights"),
    "config-filter": (_set("eval", "filter", "some"), "filter = 'some'"),
    "config-eval-size": (_set("eval", "size", 0), "[eval] size = 0"),
    "config-batch-size": (_set("eval", "batch_size", 0), "[eval] batch_size = 0"),
    "config-seeds": (_set("eval", "seeds", [-1]), "[eval] seeds = [-1]"),
    "config-count": (_set("grid", "counts", [0]), "count: 0 is invalid"),
    "config-amplitude": (_set("grid", "amplitudes", [300]), "amplitude: 300 is outside 1..255"),
    "config-area": (_set("grid", "areas", [64]), "area: 64 is larger than the image"),
    "config-ladder": (lambda c: c.raw.update(experiment=[{"name": "f", "family": "pixels_to_failure",
                                                          "max_count": 2000}]),
                      "max_count: 2000 is larger than the 1024 pixels"),
    "config-attack-kind": (lambda c: c.raw.update(attack={"kind": "cw"}), "kind = 'cw': unknown attack"),
    "config-verify": (_set("data", "verify", "md5"), "[data] verify = 'md5'"),
    "run-device": (_set("run", "device", "tpu"), "[run] device = 'tpu'"),
    "run-workers": (_set("run", "workers", 0), "[run] workers = 0: must be an integer >= 1"),
    "run-threads": (_set("run", "threads", -1), "[run] threads = -1: must be an integer >= 1"),
    "run-metrics-port": (_set("run", "metrics_port", 70000), "[run] metrics_port = 70000: must be in 0..65535"),
    "run-metrics-busy": (_busy_port, "is in use"),
    "run-linger": (lambda c: c.args.extend(["--metrics-linger", "-1"]), "metrics_linger = -1.0: must be a number"),
    "data-missing": (_set("data", "path", "/nonexistent/pixelray-data"), "cannot read the manifest"),
    "data-manifest-json": (lambda c: (c.data / "manifest.json").write_text("{"), "invalid manifest"),
    "data-dotdot": (lambda c: c.manifest(lambda b: b["shards"][0].update(file="../x.parquet")),
                    "must be a path relative to the data set root"),
    "data-encoded-dotdot": (_encoded, "outside the data set root"),
    "data-absolute": (lambda c: c.manifest(lambda b: b["shards"][0].update(file="/etc/passwd")),
                      "must be a path relative to the data set root"),
    "data-duplicate-ids": (_duplicates, "image_id 50 is also in shard-00000.parquet; image ids must be unique"),
    "data-shard-missing": (lambda c: (c.data / "shard-00002.parquet").unlink(), "shard not found"),
    "data-shard-truncated": (_truncate, "unreadable Parquet"),
    "data-shard-swapped": (_swap, "image_id range 100..199 differs"),
    "data-shard-size": (_smaller, "image shape 16x16x3 differs"),
    "data-shard-rows": (_rows, "100 rows, but the manifest says 90"),
    "data-shard-sha256": (_one_pixel, "sha256"),
    "ckpt-missing": (lambda c: c.raw["models"].update(names=[f"checkpoint:{c.tmp / 'nope.pt'}"]), "does not exist"),
    "ckpt-no-sidecar": (lambda c: sidecar_path(c.checkpoint()).unlink(), "has no JSON sidecar"),
    "ckpt-sidecar-json": (lambda c: sidecar_path(c.checkpoint()).write_text("{"), "is not valid JSON"),
    "ckpt-sidecar-code": (lambda c: c.sidecar(c.checkpoint(), lambda m: m.update(base="evilmod:make")),
                          "is not a built-in architecture"),
    "ckpt-pickle": (_pickle, "not a weights-only state_dict"),
    "ckpt-not-state-dict": (_tensor, "not a state_dict of tensors"),
    "ckpt-wrong-base": (_wrong_base, "does not fit base"),
    "ckpt-classes": (lambda c: c.checkpoint(classes=7), "predicts 7 classes but the data set has 10"),
    "out-file": (_out_file, "is a file, not a directory"),
    "out-under-file": (_out_under_file, "is a file"),
    "out-unwritable": (_out_unwritable, "cannot create"),
    "out-other-run": (_out_other_run, "holds a run of another config"),
    "out-locked": (_out_locked, "is in use by another run"),
}
#: Cases that can only be seen inside a unit (reading the whole shard): resume state may remain.
IN_UNIT = {"data-shard-sha256"}
#: Cases whose output directory existed before the sweep (and must be left as it was).
OUT_BEFORE = {"out-file", "out-other-run", "out-locked"}
#: Cases that need a worker (models load on the workers).
NEED_RAY = IN_UNIT  # every other case, checkpoints included, is refused before the driver joins Ray


def _snapshot(path: Path):
    if not path.exists():
        return None
    if path.is_file():
        return path.read_bytes()
    return sorted((str(p.relative_to(path)), p.read_bytes() if p.is_file() else None) for p in path.rglob("*"))


def test_the_suite_is_big_enough():
    assert len(CASES) + 3 >= 30  # + the three CLI-option cases below


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_is_refused_in_one_line(name, request, synthetic_dataset, tiny_checkpoints, tmp_path, monkeypatch):
    import tomli_w

    import pixelray.sweep.driver as driver

    if name in NEED_RAY:
        request.getfixturevalue("ray_local")
    else:  # a tripwire where the driver joins Ray: the refusal must come before it
        monkeypatch.setattr(driver, "connect", lambda *a, **k: (_ for _ in ()).throw(AssertionError("joined Ray")))
    build, message = CASES[name]
    data = tmp_path / "data"
    shutil.copytree(synthetic_dataset, data)
    case = Case(tmp_path, data, tiny_checkpoints[:1])
    build(case)
    try:
        if not case.args or case.args[0].startswith("--"):
            case.args.insert(0, str(_write(tmp_path / "sweep.toml", tomli_w.dumps(case.raw))))
        before = _snapshot(case.out)
        result = CliRunner().invoke(app, ["sweep", *case.args, "--no-progress"], prog_name="pixelray")
        after = _snapshot(case.out)
    finally:
        for held in case.keep:
            (held.release if hasattr(held, "release") else held.close)()
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert result.exit_code == 2, (result.exit_code, result.output)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines
    assert "Traceback" not in result.output
    if name in IN_UNIT:
        assert not (case.out / "cells.parquet").exists()
    else:
        assert after == before, "something was written"
    assert not (tmp_path / "pickle-ran").exists()


@pytest.mark.parametrize(("args", "message"), [
    (["pixel-index", "--wrong", "1", "--images", "10", "--count", "1", "--size", "-1"],
     "--size -1: must be an integer >= 1"),
    (["pixel-index", "--wrong", "11", "--images", "10", "--count", "1"], "--wrong 11: must be in 0..--images (10)"),
])
def test_bad_cli_options_are_refused_in_one_line(args, message):
    result = CliRunner().invoke(app, args, prog_name="pixelray")
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines


def test_data_check_refuses_a_manifest_that_points_outside(synthetic_dataset, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(synthetic_dataset, data)
    case = Case(tmp_path, data, [])
    _encoded(case)
    result = CliRunner().invoke(app, ["data", "check", case.raw["data"]["path"]], prog_name="pixelray")
    assert result.exit_code == 1
    assert "outside the data set root" in result.stderr and "Traceback" not in result.output
