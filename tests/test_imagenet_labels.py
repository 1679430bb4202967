"""Issue 21: ImageNet labels follow the devkit's class order, or the conversion is refused before Ray starts.

A small fake validation set in the devkit layout (``ILSVRC2012_val_000000NN.JPEG`` of a few
pixels, a ground truth of ILSVRC2012_IDs) with a devkit-style map (``map_clsloc.txt`` lines
``wnid id name``, shuffled). The expected labels are worked out by hand from the map below.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from typer.testing import CliRunner

from pixelray.cli import app
from pixelray.datasets.imagenet import convert_imagenet, devkit_synsets, read_imagenet, read_synsets
from pixelray.shards import load_manifest, read_shard, shard_uris

runner = CliRunner()

#: ILSVRC2012_ID -> (WordNet id, name), in the devkit's order (1..5 as in the devkit; the sea snake,
#: 490 there, is 6 in this small map). Sorted by WordNet id the classes are:
#: 0 n01751748 sea snake, 1 n02096294 Australian terrier, 2 n02100735 English setter,
#: 3 n02102040 English springer, 4 n02110185 Siberian husky, 5 n02119789 kit fox.
DEVKIT = {1: ("n02119789", "kit_fox"), 2: ("n02100735", "English_setter"), 3: ("n02110185", "Siberian_husky"),
          4: ("n02096294", "Australian_terrier"), 5: ("n02102040", "English_springer"), 6: ("n01751748", "sea_snake")}
#: ground truth, line k = ILSVRC2012_val_0000000k; image 1 is the sea snake, as in ImageNet
GROUND_TRUTH = [6, 1, 2, 3, 4, 5, 1, 6, 3, 2]
#: the labels by hand: ID 6 -> 0, 1 -> 5, 2 -> 2, 3 -> 4, 4 -> 1, 5 -> 3
EXPECTED_LABELS = [0, 5, 2, 4, 1, 3, 5, 0, 4, 2]


def make_devkit_set(root, ground_truth=GROUND_TRUTH):
    """(src, ground truth, map_clsloc.txt, sorted LOC_synset_mapping.txt) of a tiny devkit-layout set."""
    from PIL import Image

    rng = np.random.default_rng(0)
    src = root / "ILSVRC2012_img_val"
    src.mkdir()
    for k in range(1, len(ground_truth) + 1):
        pixels = rng.integers(0, 256, (6, 5, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(src / f"ILSVRC2012_val_{k:08d}.JPEG")
    gt = root / "ILSVRC2012_validation_ground_truth.txt"
    gt.write_text("".join(f"{i}\n" for i in ground_truth))
    clsloc = root / "map_clsloc.txt"
    order = [4, 1, 6, 2, 5, 3]  # any line order: the id is on the line
    clsloc.write_text("".join(f"{DEVKIT[i][0]} {i} {DEVKIT[i][1]}\n" for i in order))
    loc = root / "LOC_synset_mapping.txt"  # Kaggle's: sorted WordNet ids, no ids on the lines
    loc.write_text("".join(f"{w} {n.replace('_', ' ')}\n" for w, n in sorted(DEVKIT.values())))
    return src, gt, clsloc, loc


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def one_error_line(result) -> str:
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert "Traceback" not in result.output
    return lines[0]


def test_map_clsloc_gives_sorted_wnid_labels_and_data_check_counts_classes(ray_local, tmp_path):
    src, gt, clsloc, _ = make_devkit_set(tmp_path)
    out = tmp_path / "out"
    result = invoke("prepare", "imagenet", "--src", src, "--labels", gt, "--meta", clsloc, "--out", out,
                    "--rows-per-shard", 4, "--no-progress")
    assert result.exit_code == 0, result.output
    m = load_manifest(str(out))
    assert m.class_ids == ("n01751748", "n02096294", "n02100735", "n02102040", "n02110185", "n02119789")
    assert m.class_names[0] == "sea snake" and m.class_names[5] == "kit fox"
    batches = [read_shard(u) for u in shard_uris(str(out))]
    ids = [i for b in batches for i in b.image_ids.tolist()]
    labels = [v for b in batches for v in b.labels.tolist()]
    assert ids == list(range(10)) and labels == EXPECTED_LABELS

    check = invoke("data", "check", out)
    assert check.exit_code == 0, check.output
    # counts by label: 0: 2, 1: 1, 2: 2, 3: 1, 4: 2, 5: 2
    assert check.stdout.splitlines() == [
        "ok: 10 images in 3 shards",
        "per class: 1 to 2 images in 6 classes (fewest: n02096294 Australian terrier; most: n01751748 sea snake)",
    ]


def test_sorted_synset_list_as_devkit_map_is_refused_in_one_line_writing_nothing(tmp_path):
    src, gt, _, loc = make_devkit_set(tmp_path)
    out = tmp_path / "out"
    result = invoke("prepare", "imagenet", "--src", src, "--labels", gt, "--meta", loc, "--out", out)
    line = one_error_line(result)
    assert "LOC_synset_mapping.txt lists WordNet ids in sorted order" in line
    for fix in ("meta.mat", "map_clsloc.txt", "LOC_val_solution.csv"):
        assert fix in line
    assert not out.exists()
    with pytest.raises(ValueError, match="sorted order"):
        devkit_synsets(loc)
    # the same list is fine where it only names classes (a class-per-folder tree, Kaggle's labels)
    assert read_synsets(loc)[0] == ("n01751748", "sea snake")


def test_map_clsloc_and_plain_lists_are_read(tmp_path):
    _, _, clsloc, _ = make_devkit_set(tmp_path)
    synsets = read_synsets(clsloc)
    assert [w for w, _ in synsets] == [DEVKIT[i][0] for i in range(1, 7)]  # ILSVRC2012_ID order
    assert synsets[0] == ("n02119789", "kit fox") and devkit_synsets(clsloc) == synsets
    plain = tmp_path / "devkit_order.txt"  # a plain list not in sorted order: line k is ILSVRC2012_ID k
    plain.write_text("".join(f"{DEVKIT[i][0]} {DEVKIT[i][1]}\n" for i in range(1, 7)))
    assert devkit_synsets(plain) == [(w, n) for w, n in (DEVKIT[i] for i in range(1, 7))]
    (tmp_path / "dup.txt").write_text("n02119789 1 kit_fox\nn02100735 1 English_setter\n")
    with pytest.raises(ValueError, match=r"ILSVRC2012_IDs on its lines must be 1\.\.2, each once; 1 is there more"):
        read_synsets(tmp_path / "dup.txt")
    (tmp_path / "mixed.txt").write_text("n02119789 1 kit_fox\nn02100735 English setter\n")
    with pytest.raises(ValueError, match=r"mixed\.txt line 2 has no ILSVRC2012_ID but other lines do"):
        read_synsets(tmp_path / "mixed.txt")


def test_first_validation_image_must_be_a_sea_snake(tmp_path):
    # the ground truth says image 1 is ILSVRC2012_ID 1 (kit fox): the labels and the map disagree with ImageNet
    src, gt, clsloc, _ = make_devkit_set(tmp_path, ground_truth=[1] + GROUND_TRUTH[1:])
    result = invoke("prepare", "imagenet", "--src", src, "--labels", gt, "--meta", clsloc, "--out", tmp_path / "o")
    line = one_error_line(result)
    assert "ILSVRC2012_val_00000001.JPEG resolves to n02119789" in line and "n01751748 (sea snake)" in line
    assert "mismatched" in line and not (tmp_path / "o").exists()
    gt.write_text("".join(f"{i}\n" for i in GROUND_TRUTH))
    inputs = read_imagenet(src, labels=gt, meta=clsloc)  # the sea snake: accepted
    assert [e.label for e in inputs.entries] == EXPECTED_LABELS

    csv = tmp_path / "LOC_val_solution.csv"
    rows = [f"ILSVRC2012_val_{k:08d},{DEVKIT[i][0]} 1 2 3 4" for k, i in enumerate(GROUND_TRUTH, 1)]
    csv.write_text("ImageId,PredictionString\n" + "\n".join(rows) + "\n")
    assert [e.label for e in read_imagenet(src, labels=csv).entries] == EXPECTED_LABELS
    csv.write_text("ImageId,PredictionString\n" + "\n".join([rows[0].replace("n01751748", "n02119789")]
                                                             + rows[1:]) + "\n")
    with pytest.raises(ValueError, match=r"val_00000001\.JPEG resolves to n02119789, but .* is n01751748"):
        read_imagenet(src, labels=csv)

    tree = tmp_path / "tree"
    (tree / "n02119789").mkdir(parents=True)
    os.rename(src / "ILSVRC2012_val_00000001.JPEG", tree / "n02119789" / "ILSVRC2012_val_00000001.JPEG")
    with pytest.raises(ValueError, match=r"n02119789/ILSVRC2012_val_00000001\.JPEG resolves to n02119789.*"
                                         r"the class folders are mismatched"):
        convert_imagenet(tree, tmp_path / "o")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("case", ["missing-src", "empty-src", "missing-labels", "sorted-meta", "short-gt"])
def test_prepare_checks_inputs_before_starting_ray(tmp_path, monkeypatch, case):
    import ray

    src, gt, clsloc, loc = make_devkit_set(tmp_path)
    meta = loc if case == "sorted-meta" else clsloc
    if case == "missing-src":
        src = tmp_path / "nonexist"
    elif case == "empty-src":
        src = tmp_path / "empty"
        src.mkdir()
    elif case == "missing-labels":
        gt = tmp_path / "none.txt"
    elif case == "short-gt":
        gt.write_text("6\n1\n")
    started = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)  # as in a fresh process: the CLI would start one
    monkeypatch.setattr(ray, "init", lambda *a, **k: started.append(k) or pytest.fail("Ray was started"))
    result = invoke("prepare", "imagenet", "--src", src, "--labels", gt, "--meta", meta, "--out", tmp_path / "o")
    line = one_error_line(result)
    assert started == [] and not (tmp_path / "o").exists()
    expected = {"missing-src": "nonexist is not a directory", "empty-src": "src: no image files",
                "missing-labels": "labels: cannot read", "sorted-meta": "sorted order",
                "short-gt": "has 2 lines, none for ILSVRC2012_val_00000003"}[case]
    assert expected in line, line
