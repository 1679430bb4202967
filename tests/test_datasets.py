"""Converters: real JPEG/PNG trees made with PIL, real Ray tasks, checked pixel for pixel against torchvision."""

from __future__ import annotations

import hashlib
import json
import os
import time

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import CenterCrop, Compose, Resize

from pixelray.datasets import Transform, convert_folder, convert_imagenet, load_image, make_synthetic
from pixelray.datasets.folder import ImageEntry, convert_files, list_class_folders
from pixelray.datasets.imagenet import read_labels, read_synsets
from pixelray.datasets.synthetic import render_synthetic
from pixelray.shards import check_dataset, load_manifest, read_shard, shard_uris

EVAL = Compose([Resize(256), CenterCrop(224)])

#: Synsets in ILSVRC2012_ID order, deliberately not sorted by WordNet id (as in the devkit); the sea snake
#: is real (ILSVRC2012_val_00000001's label), the others are made up.
SYNSETS = [("n03000003", "gamma, third"), ("n01751748", "sea snake"), ("n04000004", "delta"),
           ("n02000002", "beta")]
SEA_SNAKE_ID = 2
SORTED_WNIDS = sorted(w for w, _ in SYNSETS)


def photo(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """A smooth random RGB picture (JPEG-friendly, so the test resembles real photos)."""
    coarse = rng.integers(0, 256, (height // 16 + 1, width // 16 + 1, 3), dtype=np.uint8)
    img = Image.fromarray(coarse).resize((width, height), Image.BILINEAR)
    noise = rng.integers(-12, 13, (height, width, 3))
    return Image.fromarray(np.clip(np.asarray(img, np.int16) + noise, 0, 255).astype(np.uint8))


def save_odd_images(folder: str, names: dict[str, str], rng: np.random.Generator) -> None:
    """Greyscale, CMYK, RGBA PNG, palette PNG with transparency, truncated JPEG and garbage, by kind."""
    for kind, name in names.items():
        path = os.path.join(folder, name)
        base = photo(rng, 280, 250)
        if kind == "grey":
            base.convert("L").save(path, "JPEG")
        elif kind == "cmyk":
            base.convert("CMYK").save(path, "JPEG")
        elif kind == "rgba":
            rgba = base.convert("RGBA")
            rgba.putalpha(Image.fromarray(rng.integers(0, 256, (250, 280), dtype=np.uint8)))
            rgba.save(path, "PNG")
        elif kind == "palette":
            pal = base.convert("P", palette=Image.ADAPTIVE, colors=32)
            pal.info["transparency"] = 3
            pal.save(path, "PNG", transparency=3)
        elif kind == "truncated":
            base.save(path, "JPEG")
            data = open(path, "rb").read()
            open(path, "wb").write(data[: len(data) // 2])
        elif kind == "garbage":
            open(path, "wb").write(b"\xff\xd8\xff this is not a JPEG" * 10)
        else:  # pragma: no cover
            raise ValueError(kind)


def make_val_folder(root: str, n: int = 10, seed: int = 0) -> tuple[str, str, str, list[int]]:
    """A flat ILSVRC2012-style validation folder with the devkit ground truth and a synset mapping.

    Files 3..8 are the odd ones (grey, CMYK, RGBA, palette, truncated, garbage); file 1 is the
    sea snake, as in ImageNet.
    Returns (src, ground truth path, synset mapping path, ILSVRC2012_ID per file).
    """
    rng = np.random.default_rng(seed)
    src = os.path.join(root, "val")
    os.makedirs(src)
    odd = {"grey": 3, "cmyk": 4, "rgba": 5, "palette": 6, "truncated": 7, "garbage": 8}
    gt = [int(x) for x in rng.integers(1, len(SYNSETS) + 1, n)]
    gt[0] = SEA_SNAKE_ID
    for i in range(1, n + 1):
        ext = "png" if i in (odd["rgba"], odd["palette"]) else "JPEG"
        name = f"ILSVRC2012_val_{i:08d}.{ext}"
        if i in odd.values():
            save_odd_images(src, {next(k for k, v in odd.items() if v == i): name}, rng)
        else:
            size = [(300, 260), (240, 310), (200, 150)][i % 3]  # landscape, portrait, upscaled
            photo(rng, *size).save(os.path.join(src, name), "JPEG", quality=90)
    gt_path = os.path.join(root, "ILSVRC2012_validation_ground_truth.txt")
    open(gt_path, "w").write("".join(f"{g}\n" for g in gt))
    synset_path = os.path.join(root, "synsets.txt")
    open(synset_path, "w").write("".join(f"{w} {words}\n" for w, words in SYNSETS))
    return src, gt_path, synset_path, gt


def reference(path: str) -> np.ndarray:
    """torchvision's eval transform on the RGB PIL image: the ground truth for every converted pixel."""
    with Image.open(path) as img:
        return np.asarray(EVAL(img.convert("RGB")))


def read_all(root: str):
    batches = [read_shard(u) for u in shard_uris(root)]
    return (torch.cat([b.image_ids for b in batches]), torch.cat([b.labels for b in batches]),
            torch.cat([b.images for b in batches]))


# ---------------------------------------------------------------------------- imagenet


def test_imagenet_devkit_layout_matches_torchvision_and_skips_broken(ray_local, tmp_path):
    src, gt_path, synset_path, gt = make_val_folder(str(tmp_path))
    out = str(tmp_path / "out")
    result = convert_imagenet(src, out, labels=gt_path, meta=synset_path, rows_per_shard=3, files_per_task=3)
    assert sorted(s.file for s in result.skipped) == ["ILSVRC2012_val_00000007.JPEG",
                                                      "ILSVRC2012_val_00000008.JPEG"]
    assert "skipped 2 unreadable files" in result.summary
    report = json.load(open(os.path.join(out, "report.json")))
    assert report["files"] == 10 and report["written"] == 8
    assert {s["file"] for s in report["skipped"]} == {s.file for s in result.skipped}
    m = load_manifest(out)
    assert m.class_ids == tuple(SORTED_WNIDS) and m.class_names == ("sea snake", "beta", "gamma, third", "delta")
    assert (m.num_images, m.height, m.width, m.source, [s.rows for s in m.shards]) == (8, 224, 224,
                                                                                       "imagenet", [3, 3, 2])
    ids, labels, images = read_all(out)
    kept = [i for i in range(1, 11) if i not in (7, 8)]
    assert ids.tolist() == [i - 1 for i in kept]  # the validation index
    assert labels.tolist() == [SORTED_WNIDS.index(SYNSETS[gt[i - 1] - 1][0]) for i in kept]
    files = sorted(os.listdir(src))
    for row, i in enumerate(kept):
        assert np.array_equal(images[row].numpy(), reference(os.path.join(src, files[i - 1]))), files[i - 1]
    assert check_dataset(out) == []


def test_imagenet_class_folder_layout_with_meta(ray_local, tmp_path):
    rng = np.random.default_rng(1)
    src = tmp_path / "train"
    for k, wnid in enumerate(["n04000004", "n01751748"]):
        (src / wnid).mkdir(parents=True)
        for j in range(2):
            photo(rng, 300, 260).save(src / wnid / f"{wnid}_{j}.JPEG")
        save_odd_images(str(src / wnid), {["garbage", "cmyk"][k]: f"{wnid}_odd.JPEG"}, rng)
    meta = tmp_path / "LOC_synset_mapping.txt"
    meta.write_text("".join(f"{w} {n}\n" for w, n in sorted(SYNSETS)))
    result = convert_imagenet(src, tmp_path / "out", meta=meta, files_per_task=2)
    assert [s.file for s in result.skipped] == ["n04000004/n04000004_odd.JPEG"]
    m = load_manifest(str(tmp_path / "out"))
    assert m.num_classes == 4 and m.class_ids == tuple(SORTED_WNIDS)  # the full class list from meta
    ids, labels, images = read_all(str(tmp_path / "out"))
    assert ids.tolist() == [0, 1, 2, 3, 4] and labels.tolist() == [0, 0, 0, 3, 3]
    names = ["n01751748/n01751748_0.JPEG", "n01751748/n01751748_1.JPEG", "n01751748/n01751748_odd.JPEG",
             "n04000004/n04000004_0.JPEG", "n04000004/n04000004_1.JPEG"]
    for row, rel in enumerate(names):
        assert np.array_equal(images[row].numpy(), reference(str(src / rel))), rel


def test_meta_mat_and_label_formats(tmp_path):
    scipy_io = pytest.importorskip("scipy.io")
    fields = ["ILSVRC2012_ID", "WNID", "words", "gloss", "num_children", "children", "wordnet_height",
              "num_train_images"]
    records = [(k + 1, w, n, "", 0, np.zeros(0), 0, 1) for k, (w, n) in enumerate(SYNSETS)]
    records.append((len(SYNSETS) + 1, "n09000009", "a parent synset", "", 2, np.array([1, 2]), 1, 0))
    scipy_io.savemat(tmp_path / "meta.mat", {"synsets": np.array(records, dtype=[(f, "O") for f in fields])})
    assert read_synsets(tmp_path / "meta.mat") == SYNSETS
    (tmp_path / "syn.txt").write_text("n01440764 tench, Tinca tinca\nn01443537\n")
    assert read_synsets(tmp_path / "syn.txt") == [("n01440764", "tench, Tinca tinca"), ("n01443537", "n01443537")]
    (tmp_path / "bad.txt").write_text("n01440764 tench\ngoldfish\n")
    with pytest.raises(ValueError, match=r"bad\.txt line 2: 'goldfish' is not a WordNet id"):
        read_synsets(tmp_path / "bad.txt")
    (tmp_path / "LOC_val_solution.csv").write_text(
        "ImageId,PredictionString\nILSVRC2012_val_00000002,n01000001 1 2 3 4 n01000001 5 6 7 8\n")
    assert read_labels(tmp_path / "LOC_val_solution.csv").wnids == {"ILSVRC2012_val_00000002": "n01000001"}
    (tmp_path / "pairs.txt").write_text("ILSVRC2012_val_00000001.JPEG n02000002\n")
    assert read_labels(tmp_path / "pairs.txt").wnids == {"ILSVRC2012_val_00000001": "n02000002"}
    (tmp_path / "gt.txt").write_text("3\n1\n")
    assert read_labels(tmp_path / "gt.txt").ids == (3, 1)
    (tmp_path / "junk.txt").write_text("3 1 2\n")
    with pytest.raises(ValueError, match=r"junk\.txt line 1: '3 1 2' is not understood"):
        read_labels(tmp_path / "junk.txt")


def test_imagenet_kaggle_labels_without_meta(ray_local, tmp_path):
    rng = np.random.default_rng(2)
    src = tmp_path / "val"
    src.mkdir()
    for i in (3, 9):
        photo(rng, 260, 230).save(src / f"ILSVRC2012_val_{i:08d}.JPEG")
    (tmp_path / "sol.csv").write_text("ImageId,PredictionString\n"
                                      "ILSVRC2012_val_00000009,n02000002 1 1 9 9\n"
                                      "ILSVRC2012_val_00000003,n01000001 1 1 9 9\n")
    result = convert_imagenet(src, tmp_path / "out", labels=tmp_path / "sol.csv")
    assert result.manifest.class_ids == ("n01000001", "n02000002")
    ids, labels, _ = read_all(str(tmp_path / "out"))
    assert ids.tolist() == [2, 8] and labels.tolist() == [0, 1]


def test_imagenet_label_errors_are_clear_and_write_nothing(tmp_path):
    src, gt_path, synset_path, _ = make_val_folder(str(tmp_path), n=3)
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"meta: required with the devkit ground truth .*ground_truth\.txt"):
        convert_imagenet(src, out, labels=gt_path)
    open(gt_path, "w").write("1\n9\n1\n")
    with pytest.raises(ValueError, match=r"ground_truth\.txt line 2: ILSVRC2012_ID 9 is outside 1\.\.4"):
        convert_imagenet(src, out, labels=gt_path, meta=synset_path)
    open(gt_path, "w").write("1\n2\n")
    with pytest.raises(ValueError, match=r"has 2 lines, none for ILSVRC2012_val_00000003 \(line 3\)"):
        convert_imagenet(src, out, labels=gt_path, meta=synset_path)
    (tmp_path / "sol.csv").write_text("ImageId,PredictionString\nILSVRC2012_val_00000001,n01000001 1 1 2 2\n")
    with pytest.raises(ValueError, match=r"sol\.csv has no label for ILSVRC2012_val_00000002.JPEG and 1 more"):
        convert_imagenet(src, out, labels=tmp_path / "sol.csv")
    with pytest.raises(ValueError, match=r"src: .*nowhere is not a directory"):
        convert_imagenet(tmp_path / "nowhere", out, labels=gt_path, meta=synset_path)
    assert not out.exists()


# ---------------------------------------------------------------------------- folder


def test_200_image_tree_round_trips_exactly_against_torchvision(ray_local, tmp_path):
    """Converting a 200-image generated JPEG tree gives shards that round-trip exactly and match
    torchvision's resize/centre-crop output (through ImageFolder, ids = sample indices) to the pixel."""
    from torchvision.datasets import ImageFolder

    rng = np.random.default_rng(3)
    src = tmp_path / "tree"
    for c in range(4):
        (src / f"class_{c}").mkdir(parents=True)
        for j in range(50):
            w, h = int(rng.integers(260, 320)), int(rng.integers(230, 290))
            photo(rng, w, h).save(src / f"class_{c}" / f"img_{j:03d}.jpg", quality=85)
    out = tmp_path / "shards"
    result = convert_folder(src, out, rows_per_shard=64)
    assert not result.skipped and result.files == 200
    m = result.manifest
    assert m == load_manifest(str(out)) and [s.rows for s in m.shards] == [64, 64, 64, 8]
    assert m.class_ids == ("class_0", "class_1", "class_2", "class_3") and m.source == "folder"
    ids, labels, images = read_all(str(out))
    reference_set = ImageFolder(str(src), transform=EVAL)
    assert ids.tolist() == list(range(200)) and labels.tolist() == reference_set.targets
    for i in range(200):
        expected, target = reference_set[i]
        assert np.array_equal(images[i].numpy(), np.asarray(expected)), reference_set.samples[i][0]
    assert check_dataset(str(out)) == []


def test_no_resize_crops_and_skips_small_images(ray_local, tmp_path):
    rng = np.random.default_rng(4)
    src = tmp_path / "small"
    (src / "a").mkdir(parents=True)
    (src / "b" / "nested").mkdir(parents=True)
    photo(rng, 40, 36).save(src / "a" / "x.png")
    photo(rng, 32, 32).save(src / "b" / "nested" / "y.png")
    photo(rng, 20, 30).save(src / "b" / "z.png")
    (src / "b" / "notes.txt").write_text("not an image")
    result = convert_folder(src, tmp_path / "out", transform=Transform(crop=32, resize=None))
    assert [(s.file, "smaller than the 32x32 crop" in s.error) for s in result.skipped] == [("b/z.png", True)]
    ids, labels, images = read_all(str(tmp_path / "out"))
    assert ids.tolist() == [0, 2] and labels.tolist() == [0, 1]  # ImageFolder order: b/z.png (id 1) skipped
    assert np.array_equal(images[0].numpy(), np.asarray(CenterCrop(32)(Image.open(src / "a" / "x.png"))))
    assert np.array_equal(images[1].numpy(), np.asarray(Image.open(src / "b" / "nested" / "y.png")))


def test_all_files_broken_writes_nothing(ray_local, tmp_path):
    src = tmp_path / "broken"
    (src / "a").mkdir(parents=True)
    save_odd_images(str(src / "a"), {"garbage": "1.jpg", "truncated": "2.jpg"}, np.random.default_rng(5))
    with pytest.raises(ValueError, match=r"none of the 2 files could be decoded \(first: a/1\.jpg"):
        convert_folder(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_failure_mid_run_leaves_no_partial_output(ray_local, tmp_path):
    rng = np.random.default_rng(6)
    (tmp_path / "img").mkdir()
    entries = []
    for i in range(6):
        path = str(tmp_path / "img" / f"{i}.png")
        photo(rng, 40, 40).save(path)
        entries.append(ImageEntry(path, f"{i}.png", i, 0 if i < 5 else 7))  # the last label is invalid
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"labels: 7 \(image_id 5\) is outside 0\.\.1"):
        convert_files(entries, out, name="x", class_names=["a", "b"], source="test",
                      transform=Transform(crop=32, resize=None), rows_per_shard=2, files_per_task=2,
                      max_in_flight=1)
    assert not out.exists()


def test_listing_and_transform_errors(tmp_path):
    with pytest.raises(ValueError, match="src: .* is not a directory"):
        list_class_folders(tmp_path / "nope")
    (tmp_path / "empty" / "a").mkdir(parents=True)
    with pytest.raises(ValueError, match="src: no image files"):
        list_class_folders(tmp_path / "empty")
    with pytest.raises(ValueError, match=r"resize: 10 is invalid; it must be an integer >= crop \(32\)"):
        Transform(crop=32, resize=10)
    assert Transform.eval(224) == Transform(crop=224, resize=256) and Transform.eval(32).resize == 37


def test_load_image_converts_every_mode_to_rgb(tmp_path):
    rng = np.random.default_rng(7)
    kinds = {"grey": "g.jpg", "cmyk": "c.jpg", "rgba": "a.png", "palette": "p.png"}
    save_odd_images(str(tmp_path), kinds, rng)
    for name in kinds.values():
        out = load_image(str(tmp_path / name), Transform())
        assert out.shape == (224, 224, 3) and out.dtype == np.uint8
        assert np.array_equal(out, reference(str(tmp_path / name)))


# ---------------------------------------------------------------------------- synthetic


def test_synthetic_is_deterministic_and_balanced(tmp_path):
    a = make_synthetic(tmp_path / "a", classes=5, images=300, size=24, seed=3, rows_per_shard=128)
    b = make_synthetic(tmp_path / "b", classes=5, images=300, size=24, seed=3, rows_per_shard=128)
    c = make_synthetic(tmp_path / "c", classes=5, images=300, size=24, seed=4, rows_per_shard=128)
    assert a == b and [s.sha256 for s in a.shards] != [s.sha256 for s in c.shards]
    for s in a.shards:
        assert open(tmp_path / "a" / s.file, "rb").read() == open(tmp_path / "b" / s.file, "rb").read()
    assert hashlib.sha256(open(tmp_path / "a" / "manifest.json", "rb").read()).digest() == \
        hashlib.sha256(open(tmp_path / "b" / "manifest.json", "rb").read()).digest()
    ids, labels, images = read_all(str(tmp_path / "a"))
    assert ids.tolist() == list(range(300)) and torch.bincount(labels).tolist() == [60] * 5
    assert images.shape == (300, 24, 24, 3) and images.float().std() > 20
    assert a.class_names[:2] == ("circle-solid-hue000", "square-solid-hue072")
    assert check_dataset(str(tmp_path / "a")) == []


def test_synthetic_classes_differ_in_colour_and_generation_is_fast():
    labels = np.arange(10_000) % 10
    start = time.perf_counter()
    images = render_synthetic(labels, classes=10, size=32, rng=np.random.default_rng(0))
    assert time.perf_counter() - start < 10  # about 1 s on one core
    labels, images = labels[:2000], images[:2000]
    # the object's colour alone separates the classes: the brightest pixels' mean colour, nearest centroid
    flat = images.reshape(len(images), -1, 3).astype(np.float32)
    bright = np.take_along_axis(flat, np.argsort(flat.sum(-1), axis=1)[:, -40:, None], axis=1).mean(1)
    bright /= bright.sum(1, keepdims=True)
    centroids = np.stack([bright[:1000][labels[:1000] == c].mean(0) for c in range(10)])
    test = slice(1000, None)
    pred = np.argmin(((bright[test, None] - centroids[None]) ** 2).sum(-1), axis=1)
    assert (pred == labels[test]).mean() > 0.8


def test_synthetic_argument_errors(tmp_path):
    with pytest.raises(ValueError, match=r"classes: 1 is invalid; it must be an integer in 2\.\.1000"):
        make_synthetic(tmp_path / "x", classes=1)
    with pytest.raises(ValueError, match=r"size: 4 is invalid"):
        make_synthetic(tmp_path / "x", size=4)
    assert not (tmp_path / "x").exists()
