"""The shard format: write, read (zero-copy, subsets, URIs), validate. Real Parquet files, no mocks."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from helpers import wait_for

from pixelray.shards import (
    MANIFEST_NAME,
    Manifest,
    ShardError,
    ShardInfo,
    ShardWriter,
    check_dataset,
    load_manifest,
    read_shard,
    shard_uris,
)


def _images(n: int, h: int = 6, w: int = 5, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


def _write(root, n=23, rows=10, h=6, w=5, classes=4, ids=None):
    images = _images(n, h, w)
    ids = np.arange(100, 100 + n) if ids is None else np.asarray(ids)
    labels = np.arange(n) % classes
    with ShardWriter(root, name="t", height=h, width=w, class_names=[f"c{i}" for i in range(classes)],
                     source="test", rows_per_shard=rows) as writer:
        writer.add(ids[:7], labels[:7], images[:7], [f"f{i}" for i in ids[:7]])  # uneven batches
        writer.add(torch.from_numpy(ids[7:]), torch.from_numpy(labels[7:]), torch.from_numpy(images[7:]),
                   [f"f{i}" for i in ids[7:]])
    return ids, labels, images


# ---------------------------------------------------------------------------- write / read


def test_round_trip_shards_manifest_and_checksums(tmp_path):
    root = tmp_path / "ds"
    ids, labels, images = _write(root)
    m = load_manifest(str(root))
    assert (m.name, m.height, m.width, m.num_images, m.num_classes, m.source) == ("t", 6, 5, 23, 4, "test")
    assert m.class_names == m.class_ids == ("c0", "c1", "c2", "c3")
    assert [s.rows for s in m.shards] == [10, 10, 3]
    assert [(s.min_id, s.max_id) for s in m.shards] == [(100, 109), (110, 119), (120, 122)]
    for info, uri in zip(m.shards, shard_uris(str(root)), strict=True):
        assert hashlib.sha256(open(uri, "rb").read()).hexdigest() == info.sha256
    batches = [read_shard(u) for u in shard_uris(str(root))]
    assert torch.equal(torch.cat([b.image_ids for b in batches]), torch.from_numpy(ids))
    assert torch.equal(torch.cat([b.labels for b in batches]), torch.from_numpy(labels))
    assert torch.equal(torch.cat([b.images for b in batches]), torch.from_numpy(images))
    b = batches[0]
    assert b.images.dtype == torch.uint8 and b.image_ids.dtype == b.labels.dtype == torch.int64
    assert b.images.shape == (10, 6, 5, 3) and b.images.is_contiguous() and len(b) == 10
    b.images[0, 0, 0, 0] = 7  # writable, no warning, no copy needed by the caller
    schema = pq.read_schema(shard_uris(str(root))[0])
    assert schema.field("image_id").type == pa.int64() and schema.field("label").type == pa.int16()
    assert schema.field("image").type == pa.binary(6 * 5 * 3) and schema.field("source").type == pa.string()
    assert pq.read_table(shard_uris(str(root))[0]).column("source").to_pylist()[:2] == ["f100", "f101"]
    assert check_dataset(str(root)) == []


def test_a_whole_shard_is_read_without_copying_the_pixels(tmp_path):
    # The claim: the tensor shares the buffer Parquet decoded into. Checked with Arrow's own
    # accounting: while the batch lives, Arrow's pool holds (at least) the pixels, and they go
    # back to the pool when the tensor is dropped. A reader that copied into torch memory would
    # leave nothing in Arrow's pool. A subset read copies once, into torch memory.
    # Arrow's pool is the process's: other threads (pre-buffered IO finishing late on a loaded
    # machine) may hold a little for a moment, so "given back" waits for the pool to settle;
    # a buffer the tensor kept would never be given back.
    import gc

    def given_back(limit: int) -> bool:
        gc.collect()
        return pa.total_allocated_bytes() - before < limit

    root = tmp_path / "ds"
    _write(root, n=64, rows=64, h=64, w=64)
    uri = shard_uris(str(root))[0]
    pixels = 64 * 64 * 64 * 3
    gc.collect()
    before = pa.total_allocated_bytes()
    batch = read_shard(uri)
    held = pa.total_allocated_bytes() - before
    assert held >= pixels, f"Arrow holds {held} bytes while the batch lives; the pixels are {pixels}"
    view = batch.images
    del batch
    gc.collect()
    assert pa.total_allocated_bytes() - before >= pixels  # the tensor alone keeps the buffer alive
    del view
    assert wait_for(lambda: given_back(pixels // 8), timeout=10)  # and it was the pixels' buffer
    # a subset: one copy into torch memory, Arrow's buffer freed on return
    sub = read_shard(uri, image_ids=list(range(100, 132)))
    assert sub.images.shape == (32, 64, 64, 3)
    assert wait_for(lambda: given_back(pixels // 8), timeout=10), pa.total_allocated_bytes() - before


def test_read_count_counts_calls_in_this_thread(tmp_path):
    import threading

    from pixelray.shards import read_count

    root = tmp_path / "ds"
    _write(root)
    uri = shard_uris(str(root))[0]
    start = read_count()
    read_shard(uri)
    read_shard(uri, image_ids=[101])
    with pytest.raises(ShardError):
        read_shard(str(root / "missing.parquet"))  # a failed read is a read too
    assert read_count() - start == 3
    other = []
    thread = threading.Thread(target=lambda: (read_shard(uri), other.append(read_count())))
    thread.start()
    thread.join()
    assert other == [1] and read_count() - start == 3  # each thread counts its own


def test_read_shard_subset_keeps_shard_order_and_ignores_other_ids(tmp_path):
    root = tmp_path / "ds"
    ids, labels, images = _write(root)
    uri = shard_uris(str(root))[0]
    sub = read_shard(uri, image_ids=[107, 101, 5000, 104, 101])
    assert sub.image_ids.tolist() == [101, 104, 107]
    assert torch.equal(sub.images, torch.from_numpy(images[[1, 4, 7]]))
    assert sub.labels.tolist() == labels[[1, 4, 7]].tolist()
    assert sub.images.is_contiguous()
    empty = read_shard(uri, image_ids=np.array([1, 2]))
    assert len(empty) == 0 and empty.images.shape == (0, 6, 5, 3)
    full = read_shard(uri, image_ids=range(100, 200))
    assert torch.equal(full.images, read_shard(uri).images)


def test_file_uri_and_manifest_helpers(tmp_path):
    root = tmp_path / "ds"
    ids, _, images = _write(root)
    uri_root = f"file://{root}"
    assert load_manifest(uri_root) == load_manifest(str(root))
    uris = shard_uris(uri_root)
    assert uris[0] == f"file://{root}/shard-00000.parquet"
    assert torch.equal(read_shard(uris[1], image_ids=[111]).images[0], torch.from_numpy(images[11]))
    assert check_dataset(uri_root) == []


def test_reader_accepts_fixed_shape_tensor_and_many_row_groups(tmp_path):
    images = _images(9, 4, 3)
    storage = pa.FixedSizeListArray.from_arrays(pa.array(images.reshape(-1)), 4 * 3 * 3)
    tensor = pa.ExtensionArray.from_storage(pa.fixed_shape_tensor(pa.uint8(), [4, 3, 3]), storage)
    table = pa.table({"image_id": pa.array(range(9), pa.int64()), "label": pa.array([0] * 9, pa.int16()),
                      "image": tensor, "source": pa.array(["x"] * 9)})
    path = str(tmp_path / "tensor.parquet")
    pq.write_table(table, path, row_group_size=4)  # a foreign writer: three row groups
    batch = read_shard(path)
    assert batch.images.shape == (9, 4, 3, 3) and torch.equal(batch.images, torch.from_numpy(images))
    sub = read_shard(path, image_ids=[8, 1, 5])
    assert sub.image_ids.tolist() == [1, 5, 8] and torch.equal(sub.images, torch.from_numpy(images[[1, 5, 8]]))


def test_reader_rejects_missing_shape_and_names_file(tmp_path):
    table = pa.table({"image_id": pa.array([0], pa.int64()), "label": pa.array([0], pa.int16()),
                      "image": pa.array([b"\0" * 30], pa.binary(30))})  # 30 bytes: 10 pixels, not square
    path = str(tmp_path / "odd.parquet")
    pq.write_table(table, path)
    with pytest.raises(ShardError, match=r"odd\.parquet.*cannot tell H from W"):
        read_shard(path)
    with pytest.raises(ShardError, match=r"missing\.parquet: shard not found"):
        read_shard(str(tmp_path / "missing.parquet"))


def test_truncated_shard_raises_shard_error_naming_file(tmp_path):
    root = tmp_path / "ds"
    _write(root)
    uri = shard_uris(str(root))[1]
    data = open(uri, "rb").read()
    open(uri, "wb").write(data[: len(data) // 2])
    with pytest.raises(ShardError, match=r"shard-00001\.parquet: unreadable Parquet") as info:
        read_shard(uri)
    assert isinstance(info.value, ValueError)


# ---------------------------------------------------------------------------- writer checks


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"images": np.zeros((2, 6, 5), np.uint8)}, r"images: uint8 \(2, 6, 5\) is invalid"),
        ({"images": np.zeros((2, 6, 5, 3), np.float32)}, r"images: float32"),
        ({"labels": [0, 4]}, r"labels: 4 \(image_id 1\) is outside 0\.\.3"),
        ({"image_ids": [3, 3]}, r"image_ids: 3 appears more than once"),
        ({"sources": ["a"]}, r"must have the same length"),
    ],
)
def test_writer_rejects_bad_rows(tmp_path, kwargs, match):
    args = {"image_ids": [0, 1], "labels": [0, 1], "images": np.zeros((2, 6, 5, 3), np.uint8),
            "sources": ["a", "b"]} | kwargs
    writer = ShardWriter(tmp_path / "ds", name="t", height=6, width=5, class_names=list("abcd"), source="x")
    with pytest.raises(ValueError, match=match):
        writer.add(**args)


def test_writer_rejects_ids_seen_in_an_earlier_batch(tmp_path):
    writer = ShardWriter(tmp_path / "ds", name="t", height=1, width=1, class_names=["a"], source="x")
    writer.add([5], [0], np.zeros((1, 1, 1, 3), np.uint8), ["a"])
    with pytest.raises(ValueError, match="image_ids: 5 appears more than once"):
        writer.add([6, 5], [0, 0], np.zeros((2, 1, 1, 3), np.uint8), ["b", "c"])


def test_writer_refuses_non_empty_dir_and_bad_arguments(tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(ValueError, match=r"out_dir: .*full exists and is not an empty directory"):
        ShardWriter(tmp_path / "full", name="t", height=2, width=2, class_names=["a"], source="x")
    with pytest.raises(ValueError, match="rows_per_shard: 0 is invalid"):
        ShardWriter(tmp_path / "a", name="t", height=2, width=2, class_names=["a"], source="x", rows_per_shard=0)
    with pytest.raises(ValueError, match="class_ids: 1 entries for 2 class_names"):
        ShardWriter(tmp_path / "b", name="t", height=2, width=2, class_names=["a", "b"], class_ids=["x"],
                    source="x")
    with pytest.raises(ValueError, match=r"out_dir: s3://bucket/ds is a URI; ShardWriter writes a local"):
        ShardWriter("s3://bucket/ds", name="t", height=2, width=2, class_names=["a"], source="x")
    with pytest.raises(ValueError, match="compression: 'zip' is unknown"):
        ShardWriter(tmp_path / "c", name="t", height=2, width=2, class_names=["a"], source="x",
                    compression="zip")


def test_failed_write_leaves_no_output(tmp_path):
    root = tmp_path / "ds"
    with pytest.raises(RuntimeError, match="boom"):
        with ShardWriter(root, name="t", height=2, width=2, class_names=["a"], source="x",
                         rows_per_shard=2) as writer:
            writer.add(range(5), [0] * 5, np.zeros((5, 2, 2, 3), np.uint8), list("abcde"))
            assert len(os.listdir(root)) == 2  # two full shards on disk already
            raise RuntimeError("boom")
    assert not root.exists()
    with pytest.raises(ValueError, match="no images were added"):
        with ShardWriter(root, name="t", height=2, width=2, class_names=["a"], source="x"):
            pass
    assert not root.exists()


def test_manifest_validates_itself():
    shard = ShardInfo("shard-00000.parquet", 2, "0" * 64, 0, 1)
    good = dict(name="t", height=2, width=2, num_images=2, num_classes=1, class_names=("a",),
                class_ids=("a",), shards=(shard,), source="x")
    assert Manifest.from_json(Manifest(**good).to_json()) == Manifest(**good)
    with pytest.raises(ValueError, match="num_images: 3 differs from the shards' total of 2"):
        Manifest(**good | {"num_images": 3})
    with pytest.raises(ValueError, match="class_names: 2 entries for num_classes 1"):
        Manifest(**good | {"class_names": ("a", "b")})
    with pytest.raises(ValueError, match="shards.file: '../x' must be a path relative"):
        ShardInfo("../x", 1, "0" * 64, 0, 0)
    with pytest.raises(ShardError, match=r"manifest\.json: invalid manifest \(missing field 'shards'\)"):
        Manifest.from_json(json.dumps({"format": "pixelray-shards", "version": 1}))


# ---------------------------------------------------------------------------- validation


def _rewrite(root: str, file: str, table: pa.Table, **info) -> None:
    """Replace one shard and update its manifest entry, so only the content is wrong."""
    path = os.path.join(root, file)
    pq.write_table(table, path, row_group_size=max(1, table.num_rows))
    manifest_path = os.path.join(root, MANIFEST_NAME)
    body = json.load(open(manifest_path))
    for entry in body["shards"]:
        if entry["file"] == file:
            entry["sha256"] = hashlib.sha256(open(path, "rb").read()).hexdigest()
            entry.update(info)
    json.dump(body, open(manifest_path, "w"))


def corrupt(root: str, kind: str) -> str:
    """Break a copy of the synthetic data set in one way; return the file that check must name."""
    file = "shard-00002.parquet"
    path = os.path.join(root, file)
    table = pq.read_table(path)
    if kind == "truncated":
        data = open(path, "rb").read()
        open(path, "wb").write(data[: len(data) - 100])
    elif kind == "wrong-shape":
        small = np.zeros((table.num_rows, 16 * 16 * 3), np.uint8)
        image = pa.FixedSizeBinaryArray.from_buffers(pa.binary(16 * 16 * 3), table.num_rows,
                                                     [None, pa.py_buffer(small)])
        table = table.set_column(2, "image", image).replace_schema_metadata(
            {b"pixelray.image_shape": b"16,16,3"})
        _rewrite(root, file, table)
    elif kind == "label-out-of-range":
        labels = table.column("label").to_numpy().copy()
        labels[17] = 10
        _rewrite(root, file, table.set_column(1, "label", pa.array(labels, pa.int16())))
    elif kind == "duplicate-ids":
        ids = table.column("image_id").to_numpy().copy()
        ids[3] = 42  # image 42 lives in shard 0
        _rewrite(root, file, table.set_column(0, "image_id", pa.array(ids, pa.int64())),
                 min_id=int(ids.min()), max_id=int(ids.max()))
    elif kind == "checksum":
        pq.write_table(table, path, compression="none")  # same rows, other bytes: readable, but not the file
    elif kind == "missing":
        os.remove(path)
    else:  # pragma: no cover
        raise ValueError(kind)
    return file


CORRUPTIONS = {
    "truncated": r"shard-00002\.parquet: unreadable Parquet",
    "wrong-shape": r"shard-00002\.parquet: image shape 16x16x3 differs from the manifest's 32x32x3",
    "label-out-of-range": r"shard-00002\.parquet: row 17: label 10 is outside 0\.\.9",
    "duplicate-ids": r"shard-00002\.parquet: row 3: image_id 42 duplicates shard-00000\.parquet row 42",
    "checksum": r"shard-00002\.parquet: checksum mismatch",
    "missing": r"shard-00002\.parquet: listed in manifest\.json but missing",
}


@pytest.mark.parametrize("kind", sorted(CORRUPTIONS))
def test_check_dataset_names_file_and_row(synthetic_dataset, tmp_path, kind):
    root = str(tmp_path / "copy")
    shutil.copytree(synthetic_dataset, root)
    assert check_dataset(root) == []
    corrupt(root, kind)
    problems = check_dataset(root)
    assert any(re.search(CORRUPTIONS[kind], p) for p in problems), problems


def test_check_dataset_flags_stray_and_temporary_files(synthetic_dataset, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(synthetic_dataset, root)
    shutil.copy(root / "shard-00000.parquet", root / "shard-00099.parquet")
    (root / ".shard-00006.parquet.123.tmp").write_bytes(b"half")
    problems = check_dataset(str(root))
    assert any(p.startswith("shard-00099.parquet: not listed in manifest.json") for p in problems)
    assert any(p.startswith(".shard-00006.parquet.123.tmp: leftover temporary file") for p in problems)
    assert check_dataset(str(tmp_path / "nothing"))[0].startswith(str(tmp_path / "nothing" / "manifest.json"))


def test_synthetic_fixture_is_sound(synthetic_dataset):
    m = load_manifest(synthetic_dataset)
    assert (m.num_images, m.num_classes, m.height, len(m.shards)) == (600, 10, 32, 6)
    assert check_dataset(synthetic_dataset) == []
