"""ImageNet (ILSVRC2012) validation images -> shards, with torchvision's eval transform.

Images go through ``Compose([Resize(256), CenterCrop(224)])`` on the RGB PIL image,
pixel for pixel as torchvision does, decoded in parallel Ray tasks
(:func:`pixelray.datasets.folder.convert_files`). Labels are indices into the
sorted WordNet ids, the class order of torchvision's ImageNet models.

Label layouts accepted:

* ``src/*.JPEG`` with ``labels`` = the devkit's ``ILSVRC2012_validation_ground_truth.txt``
  (one 1-based ILSVRC2012_ID per line, in sorted file order) and ``meta`` = the devkit's
  map from ILSVRC2012_IDs to WordNet ids, in the devkit's own class order (ILSVRC2012_ID 1
  is n02119789 kit fox): its ``data/meta.mat`` (read with scipy) or its
  ``data/map_clsloc.txt`` (lines ``n02119789 1 kit_fox``, the id on the line). A plain
  synset list (no ids on its lines) is taken as line k = ILSVRC2012_ID k, except one in
  sorted WordNet order -- Kaggle's ``LOC_synset_mapping.txt``, ``synset_words.txt`` --
  which is refused: its order is not the devkit's, and it would mislabel nearly every image.
* ``src/*.JPEG`` with ``labels`` = Kaggle's ``LOC_val_solution.csv`` (``ImageId,
  PredictionString``, first WordNet id used), or a text file of ``<file> <wnid>`` lines;
  ``meta`` optional (readable names, and the full class list).
* ``src/<wnid>/*.JPEG`` (class per folder), no ``labels``; ``meta`` optional.

Where ``ILSVRC2012_val_00000001`` is among the files, it must resolve to n01751748 (sea
snake), its published label; otherwise the labels and the map are mismatched, and the
conversion is refused.

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

__all__ = ["FIRST_VAL_IMAGE", "ImageNetInputs", "ImageNetLabels", "convert_imagenet", "devkit_synsets",
           "read_imagenet", "read_labels", "read_synsets"]

_WNID = re.compile(r"^n\d{8}$")
_VAL_NUMBER = re.compile(r"ILSVRC2012_val_(\d{8})$")


def _read_meta_mat(path: str) -> list[tuple[str, str]]:
    try:
        import scipy.io
    except ImportError:
        raise ValueError(
            f"meta: reading {path} needs scipy, which is not installed; install scipy, or pass the devkit's "
            "data/map_clsloc.txt (lines 'n02119789 1 kit_fox') instead"
        ) from None
    try:
        synsets = scipy.io.loadmat(path, squeeze_me=True)["synsets"]
        records = [(int(r["ILSVRC2012_ID"]), str(r["WNID"]), str(r["words"]), int(r["num_children"]))
                   for r in synsets]
    except (OSError, KeyError, ValueError, TypeError, IndexError) as exc:
        raise ValueError(f"meta: {path} is not an ILSVRC2012 devkit meta.mat ({exc!r}); give the devkit's "
                         "data/meta.mat or data/map_clsloc.txt") from None
    leaves = sorted((r for r in records if r[3] == 0), key=lambda r: r[0])
    if [r[0] for r in leaves] != list(range(1, len(leaves) + 1)):
        raise ValueError(f"meta: {path}: leaf synsets do not have ILSVRC2012_IDs 1..{len(leaves)}")
    return [(wnid, words) for _, wnid, words, _ in leaves]


def _read_text_synsets(path: str) -> tuple[list[tuple[str, str]], bool]:
    """Synsets of a text file, and whether its lines carry their ILSVRC2012_IDs (``map_clsloc.txt``)."""
    try:
        with open(path, encoding="utf-8") as f:
            rows = [(n, line.split()) for n, line in enumerate(f.read().splitlines(), 1) if line.strip()]
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"meta: cannot read {path} ({exc})") from None
    if not rows:
        raise ValueError(f"meta: {path} lists no synsets")
    for number, parts in rows:
        if not _WNID.match(parts[0]):
            raise ValueError(f"meta: {path} line {number}: {parts[0]!r} is not a WordNet id like n01440764; "
                             "expected lines 'n02119789 1 kit_fox' (map_clsloc.txt) or 'n01440764 tench, Tinca tinca'")
    numbered = [len(parts) > 1 and parts[1].isdigit() for _, parts in rows]
    if any(numbered) and not all(numbered):
        number = rows[numbered.index(False)][0]
        raise ValueError(f"meta: {path} line {number} has no ILSVRC2012_ID but other lines do; every line of "
                         "the devkit's map_clsloc.txt reads 'n02119789 1 kit_fox'")
    if len({parts[0] for _, parts in rows}) != len(rows):
        raise ValueError(f"meta: {path} lists a WordNet id twice")
    if not all(numbered):
        return [(parts[0], " ".join(parts[1:]) or parts[0]) for _, parts in rows], False
    ids = [int(parts[1]) for _, parts in rows]
    if sorted(ids) != list(range(1, len(ids) + 1)):
        off = next(i for i in range(1, len(ids) + 1) if ids.count(i) != 1)
        raise ValueError(f"meta: {path}: the ILSVRC2012_IDs on its lines must be 1..{len(ids)}, each once; "
                         f"{off} is {'missing' if off not in ids else 'there more than once'}")
    by_id = sorted(zip(ids, rows, strict=True))
    return [(parts[0], " ".join(parts[2:]).replace("_", " ") or parts[0]) for _, (_, parts) in by_id], True


def _read_synsets(path: str | os.PathLike[str]) -> tuple[list[tuple[str, str]], bool]:
    """:func:`read_synsets`, and whether the ILSVRC2012_IDs come from the file (meta.mat, map_clsloc.txt)."""
    path = os.fspath(path)
    if path.lower().endswith(".mat"):
        return _read_meta_mat(path), True
    return _read_text_synsets(path)


def read_synsets(path: str | os.PathLike[str]) -> list[tuple[str, str]]:
    """(wnid, readable name) per class, in ILSVRC2012_ID order (entry k-1 is ILSVRC2012_ID k).

    Reads the devkit's ``meta.mat`` (needs scipy), the devkit's ``map_clsloc.txt`` (lines
    ``n02119789 1 kit_fox``: the ILSVRC2012_ID is on the line, any line order;
    underscores in names become spaces), or a plain list of ``n01440764 tench, Tinca tinca``
    lines (``LOC_synset_mapping.txt`` / ``synset_words.txt`` style; a bare wnid per line
    is fine too), taken as line k = ILSVRC2012_ID k. A plain list in sorted WordNet order
    is refused as the devkit map by :func:`convert_imagenet` (see :func:`devkit_synsets`).
    """
    return _read_synsets(path)[0]


def _check_devkit_order(path: str, synsets: Sequence[tuple[str, str]], numbered: bool) -> None:
    wnids = [w for w, _ in synsets]
    if not numbered and len(wnids) > 1 and wnids == sorted(wnids):
        raise ValueError(
            f"meta: {path} lists WordNet ids in sorted order ({wnids[0]} first), not in the devkit's "
            "ILSVRC2012_ID order (1 = n02119789 kit fox), so it would mislabel the ground truth's images; pass "
            "--meta the devkit's data/meta.mat or data/map_clsloc.txt, or give Kaggle's LOC_val_solution.csv "
            "as --labels"
        )


def devkit_synsets(path: str | os.PathLike[str]) -> list[tuple[str, str]]:
    """The synsets that map the devkit ground truth's ILSVRC2012_IDs to WordNet ids (ILSVRC2012_ID order).

    ``meta.mat`` and ``map_clsloc.txt`` carry the ids. A plain list (no ids on its lines)
    is taken as line k = ILSVRC2012_ID k, unless its WordNet ids are sorted: that is
    Kaggle's ``LOC_synset_mapping.txt`` (or ``synset_words.txt``), whose order is not the
    devkit's (ILSVRC2012_ID 1 is n02119789 kit fox, not n01440764 tench), and following it
    would mislabel nearly every image.

    Raises:
        ValueError: unreadable, or a plain list in sorted WordNet order (one line naming the right files).
    """
    synsets, numbered = _read_synsets(path)
    _check_devkit_order(os.fspath(path), synsets, numbered)
    return synsets


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


#: A published fact of the set: the first validation image is a sea snake.
FIRST_VAL_IMAGE = ("ILSVRC2012_val_00000001", "n01751748", "sea snake")


@dataclass(frozen=True)
class ImageNetInputs:
    """Every input of an ImageNet conversion, read and checked (no Ray needed): the images and the classes."""

    src: str
    entries: tuple[ImageEntry, ...]
    class_ids: tuple[str, ...]
    class_names: tuple[str, ...]
    labels: str | None = None
    meta: str | None = None


def _devkit_wnids(src: str, lab: ImageNetLabels, stems: Sequence[str], meta: str | None,
                  read: tuple[list[tuple[str, str]], bool] | None) -> list[str]:
    """WordNet id per file from the devkit ground truth and the devkit map (``read``: what meta holds)."""
    if meta is None or read is None:
        raise ValueError(f"meta: required with the devkit ground truth {lab.path}: it maps ILSVRC2012_IDs to "
                         "WordNet ids; pass --meta the devkit's data/meta.mat or data/map_clsloc.txt")
    _check_devkit_order(meta, *read)
    synsets = read[0]
    named = all(_VAL_NUMBER.search(s) for s in stems)
    if not named and len(stems) != len(lab.ids):
        raise ValueError(f"labels: {lab.path} has {len(lab.ids)} lines but {src} holds {len(stems)} "
                         "images; the devkit ground truth needs the complete, sorted validation set")
    wnid_of = []
    for pos, stem in enumerate(stems):
        line = int(_VAL_NUMBER.search(stem).group(1)) if named else pos + 1
        if line > len(lab.ids):
            raise ValueError(f"labels: {lab.path} has {len(lab.ids)} lines, none for {stem} "
                             f"(line {line}); give the complete ground-truth file")
        ilsvrc = lab.ids[line - 1]
        if not 1 <= ilsvrc <= len(synsets):
            raise ValueError(f"labels: {lab.path} line {line}: ILSVRC2012_ID {ilsvrc} is outside "
                             f"1..{len(synsets)} (the synsets in {meta})")
        wnid_of.append(synsets[ilsvrc - 1][0])
    return wnid_of


def _flat_layout(src: str, labels: str, meta: str | None, read: tuple[list[tuple[str, str]], bool] | None,
                 ) -> tuple[list[str], list[int], list[str]]:
    """(files, image ids, WordNet ids) of a flat validation folder with a labels file."""
    lab = read_labels(labels)
    files = _flat_files(src)
    stems = [os.path.splitext(f)[0] for f in files]
    if lab.kind == "devkit":
        wnid_of = _devkit_wnids(src, lab, stems, meta, read)
    else:
        missing = [f for f, s in zip(files, stems, strict=True) if s not in lab.wnids]
        if missing:
            raise ValueError(f"labels: {lab.path} has no label for {missing[0]}"
                             f"{f' and {len(missing) - 1} more files' if len(missing) > 1 else ''}")
        wnid_of = [lab.wnids[s] for s in stems]
    return files, _image_ids(stems), wnid_of


def _check_first_image(files: Sequence[str], wnid_of: Sequence[str], labels: str | None, meta: str | None) -> None:
    """Refuse labels that contradict the published label of ``ILSVRC2012_val_00000001`` (a sea snake)."""
    stem, wnid, words = FIRST_VAL_IMAGE
    for rel, found in zip(files, wnid_of, strict=True):
        match = _VAL_NUMBER.search(os.path.splitext(os.path.basename(rel))[0])
        if match and int(match.group(1)) == 1 and found != wnid:
            given = (f"--labels {labels} and --meta {meta}" if labels and meta else
                     f"--labels {labels}" if labels else "the class folders")
            raise ValueError(f"labels: {rel} resolves to {found}, but ImageNet's {stem} is {wnid} ({words}): "
                             f"{given} are mismatched; use the devkit ground truth with the devkit's meta.mat or "
                             "map_clsloc.txt, or Kaggle's LOC_val_solution.csv alone")


def read_imagenet(
    src: str | os.PathLike[str],
    *,
    labels: str | os.PathLike[str] | None = None,
    meta: str | os.PathLike[str] | None = None,
) -> ImageNetInputs:
    """Read and check every input of :func:`convert_imagenet` (no Ray, nothing written).

    Checks that ``src`` holds images, that ``labels`` and ``meta`` are readable and
    agree with each other and with the files, and that ``ILSVRC2012_val_00000001``,
    where present, is labelled n01751748 (sea snake), as in ImageNet.

    Raises:
        ValueError: one line naming the input and the fix.
    """
    src = os.path.abspath(os.fspath(src))
    labels = None if labels is None else os.fspath(labels)
    meta = None if meta is None else os.fspath(meta)
    if not os.path.isdir(src):
        raise ValueError(f"src: {src} is not a directory; give the ILSVRC2012 validation image folder")
    read = _read_synsets(meta) if meta is not None else None
    if labels is not None:
        rel_files, ids, wnid_of = _flat_layout(src, labels, meta, read)
        folder_wnids = sorted(set(wnid_of))
    else:
        folder_wnids, listed = list_class_folders(src)
        bad = [f for f in folder_wnids if not _WNID.match(f)]
        if bad and meta is not None:
            raise ValueError(f"src: folder {bad[0]!r} in {src} is not a WordNet id; the class-per-folder "
                             "layout needs src/n01440764/... folders")
        rel_files = [rel for rel, _ in listed]
        wnid_of = [folder_wnids[label] for _, label in listed]
        ids = _image_ids([os.path.splitext(os.path.basename(r))[0] for r in rel_files])
    names = dict(read[0]) if read is not None else {w: w for w in folder_wnids}
    unknown = sorted(set(wnid_of) - names.keys())
    if unknown:
        raise ValueError(f"labels: WordNet id {unknown[0]} is not among the {len(names)} synsets in {meta}")
    _check_first_image(rel_files, wnid_of, labels, meta)
    class_ids = sorted(names) if read is not None else folder_wnids
    index = {w: i for i, w in enumerate(class_ids)}
    return ImageNetInputs(
        src=src,
        entries=tuple(ImageEntry(os.path.join(src, rel), rel, image_id, index[w])
                      for rel, image_id, w in zip(rel_files, ids, wnid_of, strict=True)),
        class_ids=tuple(class_ids), class_names=tuple(names[w] for w in class_ids),
        labels=None if labels is None else os.path.abspath(labels),
        meta=None if meta is None else os.path.abspath(meta),
    )


def convert_imagenet(
    src: str | os.PathLike[str] | ImageNetInputs,
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
        src: the validation folder (flat, with ``labels``) or a ``src/<wnid>/`` tree; or
            the :class:`ImageNetInputs` of :func:`read_imagenet` (then no ``labels``/``meta``),
            so a caller can check every input before it starts Ray.
        out_dir: output directory (must not exist or be empty).
        labels: labels file for a flat folder; ``None`` means class-per-folder.
        meta: ``meta.mat``, ``map_clsloc.txt`` or a synset list; required with the devkit ground truth.
        transform: default ``Transform(crop=224, resize=256)``, torchvision's eval transform.
        name: data set name.
        rows_per_shard: images per shard.
        files_per_task: files decoded per Ray task.
        compression: Parquet codec.
        progress: show a progress bar.
    """
    if isinstance(src, ImageNetInputs):
        if labels is not None or meta is not None:
            raise ValueError("labels, meta: already read into the ImageNetInputs given as src; pass neither")
        inputs = src
    else:
        inputs = read_imagenet(src, labels=labels, meta=meta)
    return convert_files(
        inputs.entries, out_dir,
        name=name, class_names=inputs.class_names, class_ids=inputs.class_ids, source="imagenet",
        transform=transform or Transform(crop=224, resize=256), rows_per_shard=rows_per_shard,
        files_per_task=files_per_task, compression=compression, progress=progress,
        report_extra={"src": inputs.src, "labels": inputs.labels, "meta": inputs.meta},
    )
