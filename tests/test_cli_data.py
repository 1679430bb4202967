"""``pixelray data ...`` and ``pixelray prepare ...`` end to end: real files, real Ray, exit codes."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
from test_datasets import make_val_folder, photo, save_odd_images
from test_shards import CORRUPTIONS, corrupt
from typer.testing import CliRunner

from pixelray.cli import app
from pixelray.shards import load_manifest

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def test_prepare_synthetic_then_check_ok(tmp_path):
    result = invoke("prepare", "synthetic", "--out", tmp_path / "a", "--classes", 4, "--images", 120,
                    "--size", 16, "--seed", 7, "--rows-per-shard", 50)
    assert result.exit_code == 0, result.output
    assert "wrote 120 images (4 classes, 16x16) in 3 shards" in result.stdout
    check = invoke("data", "check", tmp_path / "a")
    assert check.exit_code == 0
    assert check.stdout.splitlines() == ["ok: 120 images in 3 shards", "per class: 30 images in each of 4 classes"]
    again = invoke("prepare", "synthetic", "--out", tmp_path / "b", "--classes", 4, "--images", 120,
                   "--size", 16, "--seed", 7, "--rows-per-shard", 50)
    assert again.exit_code == 0
    assert load_manifest(str(tmp_path / "a")).shards == load_manifest(str(tmp_path / "b")).shards
    info = invoke("data", "info", tmp_path / "a")
    assert info.exit_code == 0 and "120 images, 16x16 RGB, 4 classes, 3 shards" in info.stdout
    bad = invoke("prepare", "synthetic", "--out", tmp_path / "c", "--classes", 1)
    assert bad.exit_code == 2 and "error: classes: 1 is invalid" in bad.stderr
    assert not (tmp_path / "c").exists()


def test_data_check_counts_images_per_class(tmp_path):
    assert invoke("prepare", "synthetic", "--out", tmp_path / "s", "--classes", 4, "--images", 3,
                  "--size", 8).exit_code == 0
    check = invoke("data", "check", tmp_path / "s")
    assert check.exit_code == 0 and check.stdout.splitlines() == [
        "ok: 3 images in 1 shards",
        "per class: 0 to 1 images in 4 classes (fewest: syn0003 ring-solid-hue270; most: syn0000 "
        "circle-solid-hue000); 1 class has no images",
    ]


@pytest.mark.parametrize("kind", sorted(CORRUPTIONS))
def test_data_check_reports_each_problem_and_exits_1(synthetic_dataset, tmp_path, kind):
    root = tmp_path / "copy"
    shutil.copytree(synthetic_dataset, root)
    corrupt(str(root), kind)
    result = invoke("data", "check", root)
    assert result.exit_code == 1
    assert re.search("problem: " + CORRUPTIONS[kind], result.stderr), result.stderr
    assert f"in {root}" in result.stderr and "ok:" not in result.stdout


def test_data_check_missing_dataset(tmp_path):
    result = invoke("data", "check", tmp_path / "none")
    assert result.exit_code == 1 and "manifest.json: cannot read the manifest" in result.stderr
    assert invoke("data", "info", tmp_path / "none").exit_code == 2


def _tree(root, broken: bool = True):
    rng = np.random.default_rng(0)
    for cls in ("cat", "dog"):
        (root / cls).mkdir(parents=True)
        photo(rng, 90, 70).save(root / cls / "1.jpg")
    if broken:
        save_odd_images(str(root / "dog"), {"truncated": "2.jpg"}, rng)


def test_prepare_folder_skips_broken_jpeg_reports_it_and_exits_1(ray_local, tmp_path):
    _tree(tmp_path / "src")
    out = tmp_path / "out"
    result = invoke("prepare", "folder", "--src", tmp_path / "src", "--out", out, "--size", 48, "--no-progress")
    assert result.exit_code == 1, result.output
    assert re.search(r"skipped: dog/2\.jpg: OSError: .*truncated", result.stderr), result.stderr
    assert "wrote 2 images in 1 shard to" in result.stdout and "report.json" in result.stdout
    report = json.load(open(out / "report.json"))
    assert [s["file"] for s in report["skipped"]] == ["dog/2.jpg"]
    assert report["transform"] == {"resize": 55, "crop": 48}
    assert invoke("data", "check", out).stdout.splitlines() == ["ok: 2 images in 1 shards",
                                                                "per class: 1 image in each of 2 classes"]
    ok = invoke("prepare", "folder", "--src", tmp_path / "src", "--out", tmp_path / "out2", "--size", 48,
                "--resize", 60, "--allow-skipped", "--no-progress")
    assert ok.exit_code == 0, ok.output
    assert json.load(open(tmp_path / "out2" / "report.json"))["transform"] == {"resize": 60, "crop": 48}


def test_prepare_folder_failures_leave_no_partial_output(ray_local, tmp_path):
    src = tmp_path / "src"
    (src / "a").mkdir(parents=True)
    save_odd_images(str(src / "a"), {"garbage": "1.jpg"}, np.random.default_rng(1))
    result = invoke("prepare", "folder", "--src", src, "--out", tmp_path / "out", "--no-progress")
    assert result.exit_code == 2 and "error: none of the 1 files could be decoded (first: a/1.jpg" in result.stderr
    assert not (tmp_path / "out").exists()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    result = invoke("prepare", "folder", "--src", src, "--out", tmp_path / "full", "--no-progress")
    assert result.exit_code == 2 and "exists and is not an empty directory" in result.stderr
    assert os.listdir(tmp_path / "full") == ["keep.txt"]
    result = invoke("prepare", "folder", "--src", src, "--out", tmp_path / "x", "--resize", 300, "--no-resize")
    assert result.exit_code == 2 and "--resize and --no-resize exclude each other" in result.stderr


def test_prepare_imagenet_devkit_via_cli(ray_local, tmp_path):
    src, gt_path, synset_path, _ = make_val_folder(str(tmp_path), n=8)
    missing = invoke("prepare", "imagenet", "--src", src, "--labels", gt_path, "--out", tmp_path / "o1")
    assert missing.exit_code == 2 and "meta: required with the devkit ground truth" in missing.stderr
    result = invoke("prepare", "imagenet", "--src", src, "--labels", gt_path, "--meta", synset_path,
                    "--out", tmp_path / "o2", "--rows-per-shard", 4, "--allow-skipped", "--no-progress")
    assert result.exit_code == 0, result.output
    assert "skipped: ILSVRC2012_val_00000007.JPEG" in result.stderr
    assert "skipped: ILSVRC2012_val_00000008.JPEG" in result.stderr
    assert "wrote 6 images in 2 shards" in result.stdout
    assert load_manifest(str(tmp_path / "o2")).class_ids[0] == "n01751748"
    assert not (tmp_path / "o1").exists()


def test_console_script_check(synthetic_dataset, tmp_path):
    exe = os.path.join(os.path.dirname(sys.executable), "pixelray")
    ok = subprocess.run([exe, "data", "check", synthetic_dataset], capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0 and ok.stdout.splitlines()[0] == "ok: 600 images in 6 shards", ok.stderr
    root = tmp_path / "copy"
    shutil.copytree(synthetic_dataset, root)
    corrupt(str(root), "truncated")
    bad = subprocess.run([exe, "data", "check", str(root)], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1 and "shard-00002.parquet: unreadable Parquet" in bad.stderr


def _relabelled(src: str, out, shift: int) -> str:
    """A copy of a data set with every label moved by ``shift`` (mod the classes): what a wrong class map does."""
    from pixelray.shards import ShardWriter, read_shard, shard_uris

    m = load_manifest(src)
    with ShardWriter(out, name="relabelled", height=m.height, width=m.width, class_names=m.class_names,
                     source="test", rows_per_shard=100) as writer:
        for uri in shard_uris(src):
            b = read_shard(uri)
            writer.add(b.image_ids.tolist(), ((b.labels + shift) % m.num_classes).tolist(), b.images.numpy(),
                       [f"{i}.png" for i in b.image_ids.tolist()])
    return str(out)


def test_data_check_with_a_model_flags_wrong_labels(synthetic_dataset, tiny_checkpoints, tmp_path, monkeypatch):
    import torch

    from pixelray.models import load_model
    from pixelray.shards import read_shard, shard_uris

    spec = tiny_checkpoints[0]
    model = load_model(spec)  # the expected count: every image (600 asked, 600 there), by a plain loop
    with torch.inference_mode():
        batches = [read_shard(u) for u in shard_uris(synthetic_dataset)]
        right = sum(int((model(b.images).argmax(1) == b.labels).sum()) for b in batches)
    assert right > 300
    ok = invoke("data", "check", synthetic_dataset, "--model", spec, "--images", 600)
    assert ok.exit_code == 0, ok.output
    assert ok.stdout.splitlines()[-1] == f"labels: {spec} classifies {right} of 600 images correctly " \
                                        f"({right / 600:.1%})"
    wrong = _relabelled(synthetic_dataset, tmp_path / "shifted", 1)  # every label moved by one class
    flagged = invoke("data", "check", wrong, "--model", spec, "--images", 200)
    assert flagged.exit_code == 1, flagged.output
    assert "of 200 images correctly" in flagged.stderr and "the labels look wrong" in flagged.stderr
    # pretrained weights that are not cached: the check is skipped and says so; nothing is downloaded
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-cache"))
    skipped = invoke("data", "check", synthetic_dataset, "--model", "resnet18")
    assert skipped.exit_code == 0, skipped.output
    assert "labels: not checked" in skipped.stderr and not (tmp_path / "empty-cache").exists()
    bad = invoke("data", "check", synthetic_dataset, "--model", "tiny")  # tiny has no pretrained weights
    assert bad.exit_code == 2 and bad.stderr.count("\n") == 1 and "--model tiny" in bad.stderr, bad.output
