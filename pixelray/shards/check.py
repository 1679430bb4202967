"""Checking a data set: the driver's quick pre-check of every shard, and the full check of ``pixelray data check``."""

from __future__ import annotations

import posixpath
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pixelray.errors import one_line
from pixelray.shards.format import (
    COLUMNS,
    MANIFEST_NAME,
    MAX_ROWS_LISTED,
    Manifest,
    ShardError,
    ShardExpectation,
    ShardInfo,
)
from pixelray.shards.paths import load_manifest, resolve, shard_uri
from pixelray.shards.read import image_shape, int_column, read_labels
from pixelray.shards.write import is_temp, sha256_file


def _inspect(root: str, info: ShardInfo, manifest: Manifest) -> tuple[str | None, np.ndarray | None]:
    """(first problem or None, image ids) of one shard, from its footer, ids and labels only."""
    try:
        uri = shard_uri(root, info.file)
    except ShardError as exc:
        return str(exc), None
    fs, path = resolve(uri)
    expect = ShardExpectation.of(manifest, info)
    try:
        with fs.open_input_file(path) as f:
            pf = pq.ParquetFile(f)
            schema = pf.schema_arrow
            missing = [c for c in COLUMNS[:3] if c not in schema.names]
            if missing:
                return f"{uri}: missing column(s) {', '.join(missing)} (columns: {', '.join(schema.names)})", None
            shape = image_shape(schema, uri)
            table = pf.read(columns=["image_id", "label"])
    except ShardError as exc:
        return str(exc), None
    except FileNotFoundError:
        return f"{uri}: shard not found", None
    except (OSError, pa.ArrowException) as exc:
        return (f"{uri}: unreadable Parquet ({one_line(exc)}); the file is truncated or corrupt, re-run the "
                "conversion or check the copy"), None
    try:
        ids = int_column(table, "image_id", uri)
        labels = int_column(table, "label", uri)
    except ShardError as exc:
        return str(exc), None
    problems = expect.mismatches(uri, rows=table.num_rows, shape=shape, ids=ids, labels=labels)
    return (problems[0] if problems else None), ids


def check_shards(root: str, manifest: Manifest | None = None, threads: int = 8) -> None:
    """Check every shard against the manifest without reading pixels: where it lies, the footer
    (columns, image shape, rows), the ids (range, unique across the data set) and the labels.

    Cheap (two small columns per shard), so a sweep runs it before any work; the pixels
    and the sha256 are checked by the worker that reads the shard.

    Raises:
        ShardError: the first problem, in manifest order, naming the shard.
    """
    manifest = manifest or load_manifest(root)
    with ThreadPoolExecutor(max(1, min(threads, len(manifest.shards)))) as pool:
        found = list(pool.map(lambda info: _inspect(root, info, manifest), manifest.shards))
    for problem, _ in found:
        if problem:
            raise ShardError(problem)
    ranges = sorted((info.min_id, info.max_id) for info in manifest.shards)
    if all(prev[1] < cur[0] for prev, cur in zip(ranges, ranges[1:], strict=False)):
        return  # disjoint ranges (checked above against the ids) cannot share an id
    ids = np.concatenate([f[1] for f in found])
    which = np.concatenate([np.full(len(f[1]), i) for i, f in enumerate(found)])
    order = np.argsort(ids, kind="stable")
    dup = np.flatnonzero(ids[order][1:] == ids[order][:-1])
    if len(dup):
        first, second = order[dup[0]], order[dup[0] + 1]
        raise ShardError(f"{manifest.shards[which[second]].file}: image_id {int(ids[second])} is also in "
                         f"{manifest.shards[which[first]].file}; image ids must be unique across the data set "
                         "(`pixelray data check` lists them all)")





def _rows_text(rows: np.ndarray) -> str:
    shown = ", ".join(str(int(r)) for r in rows[:MAX_ROWS_LISTED])
    more = f" and {len(rows) - MAX_ROWS_LISTED} more" if len(rows) > MAX_ROWS_LISTED else ""
    return f"row{'s' if len(rows) > 1 else ''} {shown}{more}"


def _check_shard(root: str, info: ShardInfo, manifest: Manifest, fs: pafs.FileSystem,
                 ) -> tuple[list[str], np.ndarray | None]:
    """Problems with one shard, and its image_ids (None when unreadable)."""
    try:
        uri = shard_uri(root, info.file)
    except ShardError as exc:
        return [str(exc)], None
    path = resolve(uri)[1]
    name = info.file
    problems: list[str] = []
    if fs.get_file_info(path).type != pafs.FileType.File:
        return [f"{name}: listed in {MANIFEST_NAME} but missing"], None
    digest = sha256_file(fs, path)
    if digest != info.sha256:
        problems.append(f"{name}: checksum mismatch (sha256 {digest[:12]}... differs from the manifest's "
                        f"{info.sha256[:12]}...); the file changed after conversion or is corrupt")
    try:
        with fs.open_input_file(path) as f:
            pf = pq.ParquetFile(f, pre_buffer=True)  # coalesced reads: fewer requests on object stores
            schema = pf.schema_arrow
            table = pf.read(use_threads=True)
    except (OSError, pa.ArrowException) as exc:
        problems.append(f"{name}: unreadable Parquet ({exc}); the file is truncated or corrupt, "
                        "re-run the conversion")
        return problems, None
    missing = [c for c in COLUMNS if c not in schema.names]
    if missing:
        problems.append(f"{name}: missing column(s) {', '.join(missing)} (columns: {', '.join(schema.names)})")
    expected = {"image_id": pa.int64(), "label": pa.int16(), "source": pa.string()}
    for col, typ in expected.items():
        if col in schema.names and schema.field(col).type != typ:
            problems.append(f"{name}: column '{col}' is {schema.field(col).type}; expected {typ}")
    if "image" in schema.names:
        try:
            shape = image_shape(schema, name)
            if shape != manifest.image_shape:
                problems.append(f"{name}: image shape {'x'.join(map(str, shape))} differs from the "
                                f"manifest's {'x'.join(map(str, manifest.image_shape))}")
        except ShardError as exc:
            problems.append(str(exc))
        nulls = np.flatnonzero(table.column("image").is_null().to_numpy(zero_copy_only=False))
        if len(nulls):
            problems.append(f"{name}: {_rows_text(nulls)}: image is null")
    if table.num_rows != info.rows:
        problems.append(f"{name}: {table.num_rows} rows, but {MANIFEST_NAME} says {info.rows}")
    ids = None
    if "image_id" in schema.names and pa.types.is_integer(schema.field("image_id").type):
        col = table.column("image_id")
        nulls = np.flatnonzero(col.is_null().to_numpy(zero_copy_only=False))
        if len(nulls):
            problems.append(f"{name}: {_rows_text(nulls)}: image_id is null")
        ids = col.fill_null(-1).to_numpy().astype(np.int64)
        if len(ids) and (ids.min() != info.min_id or ids.max() != info.max_id):
            problems.append(f"{name}: image_id range {ids.min()}..{ids.max()} differs from the manifest's "
                            f"{info.min_id}..{info.max_id}")
    if "label" in schema.names and pa.types.is_integer(schema.field("label").type):
        col = table.column("label")
        labels = col.fill_null(-1).to_numpy().astype(np.int64)
        bad = np.flatnonzero((labels < 0) | (labels >= manifest.num_classes))
        if len(bad):
            problems.append(f"{name}: {_rows_text(bad)}: label {int(labels[bad[0]])}"
                            f"{' (and others)' if len(set(labels[bad].tolist())) > 1 else ''} is outside "
                            f"0..{manifest.num_classes - 1} (num_classes {manifest.num_classes})")
    return problems, ids


def check_dataset(root: str) -> list[str]:
    """Validate a data set: manifest, schema, shapes, labels, unique ids, checksums, readability.

    Returns:
        Human-readable problems, each naming the file (and rows where relevant);
        an empty list when the data set is sound.
    """
    try:
        manifest = load_manifest(root)
    except ShardError as exc:
        return [str(exc)]
    fs, root_path = resolve(root)
    problems: list[str] = []
    id_arrays: list[tuple[str, np.ndarray]] = []
    for info in manifest.shards:
        found, ids = _check_shard(root, info, manifest, fs)
        problems += found
        if ids is not None:
            id_arrays.append((info.file, ids))
    if id_arrays:
        all_ids = np.concatenate([ids for _, ids in id_arrays])
        files = np.concatenate([np.full(len(ids), i) for i, (_, ids) in enumerate(id_arrays)])
        rows = np.concatenate([np.arange(len(ids)) for _, ids in id_arrays])
        order = np.argsort(all_ids, kind="stable")
        sorted_ids = all_ids[order]
        dup = np.flatnonzero(sorted_ids[1:] == sorted_ids[:-1]) + 1
        reported = 0
        for pos in dup:
            if reported == MAX_ROWS_LISTED:
                problems.append(f"... and {len(dup) - reported} more duplicate image_ids")
                break
            first, other = order[pos - 1], order[pos]
            problems.append(
                f"{id_arrays[files[other]][0]}: row {rows[other]}: image_id {sorted_ids[pos]} duplicates "
                f"{id_arrays[files[first]][0]} row {rows[first]}; image ids must be unique"
            )
            reported += 1
    try:
        listed = {s.file for s in manifest.shards}
        for entry in fs.get_file_info(pafs.FileSelector(root_path)):
            base = posixpath.basename(entry.path.replace("\\", "/"))
            if base.endswith(".parquet") and base not in listed:
                problems.append(f"{base}: not listed in {MANIFEST_NAME}; remove it or re-run the conversion")
            elif is_temp(base):
                problems.append(f"{base}: leftover temporary file from an interrupted run; delete it")
    except OSError:
        pass  # listing is optional (some object stores forbid it)
    return problems


def class_counts(root: str, manifest: Manifest | None = None) -> np.ndarray:
    """Images per class (index = label), from every shard's label column (no pixels read).

    Raises:
        ShardError: a shard is missing or unreadable (``check_dataset`` lists every problem).
    """
    manifest = manifest or load_manifest(root)
    counts = np.zeros(manifest.num_classes, np.int64)
    for info in manifest.shards:
        labels = read_labels(shard_uri(root, info.file))[1]
        counts += np.bincount(labels[(labels >= 0) & (labels < manifest.num_classes)],
                              minlength=manifest.num_classes)
    return counts


def class_counts_line(manifest: Manifest, counts: np.ndarray) -> str:
    """One line on the images per class, e.g. ``per class: 50 images in each of 1000 classes`` (ImageNet val)."""
    def named(label: int) -> str:
        cid, cname = manifest.class_ids[label], manifest.class_names[label]
        return cid if cid == cname else f"{cid} {cname}"

    low, high = int(counts.min()), int(counts.max())
    k = len(counts)
    if low == high:
        return f"per class: {low} image{'' if low == 1 else 's'} in each of {k} class{'' if k == 1 else 'es'}"
    line = (f"per class: {low} to {high} images in {k} classes (fewest: {named(int(counts.argmin()))}; "
            f"most: {named(int(counts.argmax()))})")
    empty = int((counts == 0).sum())
    if empty:
        line += f"; {empty} class{'es have' if empty > 1 else ' has'} no images"
    return line
