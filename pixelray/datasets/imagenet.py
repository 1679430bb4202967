"""ImageNet (ILSVRC2012) validation images -> shards, with torchvision's eval transform.

Images go through ``Compose([Resize(256), CenterCrop(224)])`` on the RGB PIL image,
pixel for pixel as torchvision does, decoded in parallel Ray tasks
(:func:`pixelray.datasets.folder.convert_files`). Labels are indices into the
sorted WordNet ids, the class order of torchvision's ImageNet models.

Label layouts accepted:

* ``src/*.JPEG`` with ``labels`` = the devkit's ``ILSVRC2012_validation_ground_truth.txt``
  (one 1-based ILSVRC2012_ID per line, in sorted file order) and ``meta`` = a synset
  list in ILSVRC2012_ID order: the devkit's ``meta.mat`` (read with scipy) or a text
  file with lines ``n01440764 tench, Tinca tinca`` whose line k is ILSVRC2012_ID k.
* ``src/*.JPEG`` with ``labels`` = Kaggle's ``LOC_val_solution.csv`` (``ImageId,
  PredictionString``, first WordNet id used), or a text file of ``<file> <wnid>`` lines;
  ``meta`` optional (readable names, and the full class list).
* ``src/<wnid>/*.JPEG`` (class per folder), no ``labels``; ``meta`` optional.

Image ids are the validation index (``ILSVRC2012_val_00000001.JPEG`` -> 0) when every
file carries one, so ids stay stable on a partial copy; otherwise the position in
sorted file order.
"""

from __future__ import annotations

import csv
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass

from pixelray.datasets.folder import (
    IMAGE_EXTENSIONS,
    ConvertResult,
    ImageEntry,
    Transform,
    convert_files,
    list_class_folders,
)

__all__ = ["ImageNetLabels", "convert_imagenet", "read_labels", "read_synsets"]

_WNID = re.compile(r"^n\d{8}$")
_VAL_NUMBER = re.compile(r"ILSVRC2012_val_(\d{8})$")


def _read_meta_mat(path: str) -> list[tuple[str, str]]:
    try:
        import scipy.io
    except ImportError:
        raise ValueError(
            f"meta: reading {path} needs scipy, which is not installed; install scipy, or pass a synset "
            "mapping text file (lines 'n01440764 tench, Tinca tinca' in ILSVRC2012_ID order)"
        ) from None
    try:
        synsets = scipy.io.loadmat(path, squeeze_me=True)["synsets"]
        records = [(int(r["ILSVRC2012_ID"]), str(r["WNID"]), str(r["words"]), int(r["num_children"]))
                   for r in synsets]
    except (OSError, KeyError, ValueError, TypeError, IndexError) as exc:
        raise ValueError(f"meta: {path} is not an ILSVRC2012 devkit meta.mat ({exc!r}); give the devkit's "
                         "data/meta.mat or a synset mapping text file") from None
    leaves = sorted((r for r in records if r[3] == 0), key=lambda r: r[0])
    if [r[0] for r in leaves] != list(range(1, len(leaves) + 1)):
        raise ValueError(f"meta: {path}: leaf synsets do not have ILSVRC2012_IDs 1..{len(leaves)}")
    return [(wnid, words) for _, wnid, words, _ in leaves]


def read_synsets(path: str | os.PathLike[str]) -> list[tuple[str, str]]:
    """(wnid, readable name) per class, in ILSVRC2012_ID order (entry k-1 is ILSVRC2012_ID k).

    Reads ``meta.mat`` (needs scipy) or a text file of ``n01440764 tench, Tinca tinca``
    lines (``LOC_synset_mapping.txt`` / ``synset_words.txt`` style; a bare wnid per line
    is fine too).
    """
    path = os.fspath(path)
    if path.lower().endswith(".mat"):
        return _read_meta_mat(path)
    out = []
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"meta: cannot read {path} ({exc})") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        wnid, _, words = line.strip().partition(" ")
        if not _WNID.match(wnid):
            raise ValueError(f"meta: {path} line {number}: {wnid!r} is not a WordNet id like n01440764; "
                             "expected lines 'n01440764 tench, Tinca tinca'")
        out.append((wnid, words.strip() or wnid))
    if not out:
        raise ValueError(f"meta: {path} lists no synsets")
    if len({w for w, _ in out}) != len(out):
        raise ValueError(f"meta: {path} lists a WordNet id twice")
    return out


@dataclass(frozen=True)
class ImageNetLabels:
    """Labels read from a labels file: ILSVRC2012_IDs by line (devkit), or a WordNet id per file stem."""

    path: str
    ids: tuple[int, ...] | None = None
    wnids: dict[str, str] | None = None

    @property
    def kind(self) -> str:
        """``"devkit"`` (ILSVRC2012_IDs by line) or ``"wnid"`` (a WordNet id per file)."""
        return "devkit" if self.ids is not None else "wnid"


def read_labels(path: str | os.PathLike[str]) -> ImageNetLabels:
    """Read a validation labels file: devkit ground truth, Kaggle ``LOC_val_solution.csv``, or ``<file> <wnid>``."""
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"labels: cannot read {path} ({exc})") from None
    lines = [line.strip() for line in text.splitlines()]
    if lines and lines[0].replace(" ", "").lower().startswith("imageid,predictionstring"):
        wnids = {}
        for number, row in enumerate(csv.reader(lines[1:]), 2):
            if not row:
                continue
            if len(row) < 2 or not row[1].split() or not _WNID.match(row[1].split()[0]):
                raise ValueError(f"labels: {path} line {number}: {','.join(row)!r} has no WordNet id; "
                                 "expected 'ImageId,n01751748 ...'")
            wnids[os.path.splitext(row[0])[0]] = row[1].split()[0]
        return ImageNetLabels(path, wnids=wnids)
    body = [(n, line) for n, line in enumerate(lines, 1) if line]
    if body and all(line.isdigit() for _, line in body):
        end = len(lines)
        while end and not lines[end - 1]:
            end -= 1
        if any(not line for line in lines[:end]):
            raise ValueError(f"labels: {path} has blank lines; the devkit ground truth has one id per line")
        return ImageNetLabels(path, ids=tuple(int(line) for _, line in body))
    wnids = {}
    for number, line in body:
        parts = line.split()
        if len(parts) != 2 or not _WNID.match(parts[1]):
            raise ValueError(
                f"labels: {path} line {number}: {line!r} is not understood; give the devkit ground truth "
                "(one ILSVRC2012_ID per line), Kaggle's LOC_val_solution.csv, or '<file> <wnid>' lines"
            )
        wnids[os.path.splitext(os.path.basename(parts[0]))[0]] = parts[1]
    return ImageNetLabels(path, wnids=wnids)


def _image_ids(stems: Sequence[str]) -> list[int]:
    """Validation index per file when every name has one (and they are unique), else positions."""
    numbers = []
    for stem in stems:
        match = _VAL_NUMBER.search(stem)
        if match is None:
            return list(range(len(stems)))
        numbers.append(int(match.group(1)) - 1)
    return numbers if len(set(numbers)) == len(numbers) else list(range(len(stems)))


def _flat_files(src: str) -> list[str]:
    names = sorted(e.name for e in os.scandir(src)
                   if e.is_file() and e.name.lower().endswith(IMAGE_EXTENSIONS) and not e.name.startswith("."))
    if not names:
        raise ValueError(f"src: no image files ({', '.join(IMAGE_EXTENSIONS)}) directly in {src}; give the "
                         "ILSVRC2012 validation folder, or a class-per-folder tree without --labels")
    return names


def convert_imagenet(
    src: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    labels: str | os.PathLike[str] | None = None,
    meta: str | os.PathLike[str] | None = None,
    transform: Transform | None = None,
    name: str = "imagenet-val",
    rows_per_shard: int = 1000,
    files_per_task: int = 32,
    compression: str = "zstd",
    progress: bool = False,
) -> ConvertResult:
    """Convert ImageNet validation images into shards (see the module docstring for layouts).

    Args:
        src: the validation folder (flat, with ``labels``) or a ``src/<wnid>/`` tree.
        out_dir: output directory (must not exist or be empty).
        labels: labels file for a flat folder; ``None`` means class-per-folder.
        meta: ``meta.mat`` or a synset mapping text file; required with the devkit ground truth.
        transform: default ``Transform(crop=224, resize=256)``, torchvision's eval transform.
        name: data set name.
        rows_per_shard: images per shard.
        files_per_task: files decoded per Ray task.
        compression: Parquet codec.
        progress: show a progress bar.
    """
    transform = transform or Transform(crop=224, resize=256)
    src = os.path.abspath(os.fspath(src))
    if not os.path.isdir(src):
        raise ValueError(f"src: {src} is not a directory; give the ILSVRC2012 validation image folder")
    synsets = read_synsets(meta) if meta is not None else None
    if labels is not None:
        lab = read_labels(labels)
        files = _flat_files(src)
        stems = [os.path.splitext(f)[0] for f in files]
        ids = _image_ids(stems)
        if lab.kind == "devkit":
            if synsets is None:
                raise ValueError(f"meta: required with the devkit ground truth {lab.path}: it maps "
                                 "ILSVRC2012_IDs to WordNet ids; pass --meta meta.mat or a synset mapping file")
            named = all(_VAL_NUMBER.search(s) for s in stems)
            if not named and len(files) != len(lab.ids):
                raise ValueError(f"labels: {lab.path} has {len(lab.ids)} lines but {src} holds {len(files)} "
                                 "images; the devkit ground truth needs the complete, sorted validation set")
            wnid_of = []
            for stem, pos in zip(stems, range(len(files)), strict=True):
                line = int(_VAL_NUMBER.search(stem).group(1)) if named else pos + 1
                if line > len(lab.ids):
                    raise ValueError(f"labels: {lab.path} has {len(lab.ids)} lines, none for {stem} "
                                     f"(line {line}); give the complete ground-truth file")
                ilsvrc = lab.ids[line - 1]
                if not 1 <= ilsvrc <= len(synsets):
                    raise ValueError(f"labels: {lab.path} line {line}: ILSVRC2012_ID {ilsvrc} is outside "
                                     f"1..{len(synsets)} (the synsets in {meta})")
                wnid_of.append(synsets[ilsvrc - 1][0])
        else:
            missing = [f for f, s in zip(files, stems, strict=True) if s not in lab.wnids]
            if missing:
                raise ValueError(f"labels: {lab.path} has no label for {missing[0]}"
                                 f"{f' and {len(missing) - 1} more files' if len(missing) > 1 else ''}")
            wnid_of = [lab.wnids[s] for s in stems]
        rel_files = files
        folder_wnids = sorted(set(wnid_of))
    else:
        folders, listed = list_class_folders(src)
        bad = [f for f in folders if not _WNID.match(f)]
        if bad and synsets is not None:
            raise ValueError(f"src: folder {bad[0]!r} in {src} is not a WordNet id; the class-per-folder "
                             "layout needs src/n01440764/... folders")
        rel_files = [rel for rel, _ in listed]
        wnid_of = [folders[label] for _, label in listed]
        ids = _image_ids([os.path.splitext(os.path.basename(r))[0] for r in rel_files])
        folder_wnids = folders
    if synsets is not None:
        names = dict(synsets)
        unknown = sorted(set(wnid_of) - names.keys())
        if unknown:
            raise ValueError(f"labels: WordNet id {unknown[0]} is not among the {len(names)} synsets in {meta}")
        class_ids = sorted(names)
        class_names = [names[w] for w in class_ids]
    else:
        class_ids = folder_wnids
        class_names = list(folder_wnids)
    index = {w: i for i, w in enumerate(class_ids)}
    entries = [ImageEntry(os.path.join(src, rel), rel, image_id, index[w])
               for rel, image_id, w in zip(rel_files, ids, wnid_of, strict=True)]
    return convert_files(
        entries, out_dir,
        name=name, class_names=class_names, class_ids=class_ids, source="imagenet", transform=transform,
        rows_per_shard=rows_per_shard, files_per_task=files_per_task, compression=compression,
        progress=progress,
        report_extra={"src": src, "labels": None if labels is None else os.path.abspath(os.fspath(labels)),
                      "meta": None if meta is None else os.path.abspath(os.fspath(meta))},
    )
