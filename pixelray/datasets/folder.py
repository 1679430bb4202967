"""Image files -> shards, decoded in parallel as Ray tasks; and the class-per-folder layout.

:func:`convert_files` is the machinery every image converter shares: it decodes
batches of files in Ray tasks (one CPU each), applies a :class:`Transform` (by
default torchvision's eval transform: resize the short side bilinearly with
antialiasing, centre-crop), streams the results back in order with a bounded
number of tasks in flight, and writes them through a :class:`ShardWriter`. Files
that cannot be decoded are skipped and listed in ``report.json``; any other
failure leaves no output behind.

:func:`convert_folder` applies it to a ``src/<class>/<image>`` tree, with the
same class order and image order as torchvision's ``ImageFolder``: image ids are
``ImageFolder`` sample indices.

Ray: the caller normally initialises Ray (the CLI starts a local instance when
none is running); otherwise the first task starts one with Ray's defaults.
"""

from __future__ import annotations

import functools
import json
import os
import time
import warnings
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from pixelray.core.check import check_int, is_int
from pixelray.shards import Manifest, ShardWriter

__all__ = [
    "IMAGE_EXTENSIONS",
    "REPORT_NAME",
    "ConvertResult",
    "ImageEntry",
    "Skipped",
    "Transform",
    "convert_files",
    "convert_folder",
    "list_class_folders",
    "load_image",
]

#: File extensions treated as images (torchvision's ``IMG_EXTENSIONS``), compared case-insensitively.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
#: Name of the conversion report written beside the shards.
REPORT_NAME = "report.json"


@dataclass(frozen=True)
class Transform:
    """Resize the short side to ``resize`` (bilinear, antialiased), then centre-crop ``crop`` x ``crop``.

    ``Transform(crop=224, resize=256)`` is torchvision's ImageNet eval transform,
    ``Compose([Resize(256), CenterCrop(224)])`` on the RGB PIL image; ``resize=None``
    only crops, and images smaller than the crop are rejected rather than padded.
    """

    crop: int = 224
    resize: int | None = 256

    def __post_init__(self) -> None:
        if not is_int(self.crop) or self.crop < 1:
            raise ValueError(f"crop: {self.crop!r} is invalid; it must be an image side >= 1 (pixels)")
        if self.resize is not None and (not is_int(self.resize) or self.resize < self.crop):
            raise ValueError(f"resize: {self.resize!r} is invalid; it must be an integer >= crop "
                             f"({self.crop}) or None")

    @classmethod
    def eval(cls, size: int = 224) -> Transform:
        """The standard eval transform at any size: resize to ``round(size * 256 / 224)``, crop ``size``."""
        return cls(crop=size, resize=round(size * 256 / 224))

    def to_dict(self) -> dict[str, int | None]:
        """JSON-friendly form, for reports."""
        return {"resize": self.resize, "crop": self.crop}


def load_image(path: str, transform: Transform) -> np.ndarray:
    """Decode one image file, convert it to RGB and transform it: uint8 (crop, crop, 3).

    Raises:
        OSError, ValueError, ...: the file cannot be decoded or is too small for the crop.
    """
    from PIL import Image
    from torchvision.transforms import CenterCrop, Resize

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # palette transparency, EXIF and size warnings: not our concern
        with Image.open(path) as image:
            rgb = image.convert("RGB")
    if transform.resize is not None:
        rgb = Resize(transform.resize)(rgb)
    elif min(rgb.size) < transform.crop:
        raise ValueError(f"image is {rgb.width}x{rgb.height}, smaller than the {transform.crop}x"
                         f"{transform.crop} crop (no resize)")
    out = np.asarray(CenterCrop(transform.crop)(rgb), dtype=np.uint8)
    if out.shape != (transform.crop, transform.crop, 3):  # pragma: no cover - PIL guarantees RGB
        raise ValueError(f"decoded to shape {out.shape}, expected ({transform.crop}, {transform.crop}, 3)")
    return out


def _decode_batch(paths: Sequence[str], transform: Transform) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Decode a batch: (positions decoded, images (k, S, S, 3), error per failed position or '')."""
    images, ok, errors = [], [], []
    for i, path in enumerate(paths):
        try:
            images.append(load_image(path, transform))
            ok.append(i)
            errors.append("")
        except Exception as exc:  # noqa: BLE001 - any decoding failure is reported, never fatal
            errors.append(f"{type(exc).__name__}: {exc}")
    side = transform.crop
    stacked = np.stack(images) if images else np.zeros((0, side, side, 3), np.uint8)
    return np.array(ok, dtype=np.int64), stacked, errors


@functools.cache
def _remote_decode():
    import ray

    return ray.remote(num_cpus=1, max_retries=3)(_decode_batch)


@dataclass(frozen=True)
class ImageEntry:
    """One source image: its file, its name in the data set, its id and label."""

    path: str
    source: str
    image_id: int
    label: int


@dataclass(frozen=True)
class Skipped:
    """A source file that could not be converted, and why."""

    file: str
    error: str


@dataclass(frozen=True)
class ConvertResult:
    """What a conversion wrote, and what it skipped."""

    manifest: Manifest
    out_dir: str
    files: int
    skipped: tuple[Skipped, ...]
    seconds: float

    @property
    def report_path(self) -> str:
        """Path of ``report.json``."""
        return os.path.join(self.out_dir, REPORT_NAME)

    @property
    def summary(self) -> str:
        """One line for people, e.g. ``wrote 198 images in 2 shards to out/; skipped 2 ...``."""
        shards = len(self.manifest.shards)
        line = (f"wrote {self.manifest.num_images} images in {shards} shard{'' if shards == 1 else 's'} to "
                f"{self.out_dir} in {self.seconds:.1f} s")
        if self.skipped:
            line += (f"; skipped {len(self.skipped)} unreadable file{'s' if len(self.skipped) > 1 else ''} "
                     f"(listed in {self.report_path})")
        return line


def convert_files(
    entries: Sequence[ImageEntry],
    out_dir: str | os.PathLike[str],
    *,
    name: str,
    class_names: Sequence[str],
    class_ids: Sequence[str] | None = None,
    source: str,
    transform: Transform,
    rows_per_shard: int = 1000,
    files_per_task: int = 32,
    max_in_flight: int | None = None,
    compression: str = "zstd",
    progress: bool = False,
    report_extra: dict | None = None,
) -> ConvertResult:
    """Decode image files in parallel Ray tasks and write them as shards, in image_id order.

    Args:
        entries: the images; ids must be unique.
        out_dir: output directory (must not exist or be empty).
        name: data set name for the manifest.
        class_names: readable class names, by label.
        class_ids: stable class ids, by label (default: the names).
        source: origin recorded in the manifest (``imagenet``, ``folder``, ...).
        transform: resize and crop applied to every image.
        rows_per_shard: images per shard.
        files_per_task: files decoded by one Ray task.
        max_in_flight: tasks submitted but not yet written (bounds memory);
            default twice the cluster's CPUs.
        compression: Parquet codec of the shards.
        progress: show a tqdm progress bar on stderr.
        report_extra: more fields for ``report.json``.

    Raises:
        ValueError: bad arguments, or not one file could be decoded (nothing is written).
    """
    import ray
    from tqdm.auto import tqdm

    check_int(files_per_task, "files_per_task")
    entries = sorted(entries, key=lambda e: e.image_id)
    if not entries:
        raise ValueError(f"{name}: no image files to convert")
    started = time.perf_counter()
    decode = _remote_decode()
    if max_in_flight is None:
        max_in_flight = _default_in_flight()
    batches = [entries[i:i + files_per_task] for i in range(0, len(entries), files_per_task)]
    transform_ref = ray.put(transform)
    skipped: list[Skipped] = []
    with ShardWriter(out_dir, name=name, height=transform.crop, width=transform.crop,
                     class_names=class_names, class_ids=class_ids, source=source,
                     rows_per_shard=rows_per_shard, compression=compression) as writer, \
            tqdm(total=len(entries), unit="img", desc=f"convert {name}", disable=not progress,
                 dynamic_ncols=True) as bar:
        for batch, decoded in _decoded_in_order(batches, decode, transform_ref, max_in_flight):
            skipped += _write_decoded(writer, batch, decoded)
            bar.update(len(batch))
            if skipped:
                bar.set_postfix(skipped=len(skipped), refresh=False)
        if len(skipped) == len(entries):
            first = skipped[0]
            raise ValueError(f"none of the {len(entries)} files could be decoded (first: {first.file}: "
                             f"{first.error}); nothing was written")
        seconds = time.perf_counter() - started
        writer.add_file(REPORT_NAME, _report(name, source, len(entries), skipped, transform, seconds, report_extra))
        manifest = writer.close()
    return ConvertResult(manifest=manifest, out_dir=writer.out_dir, files=len(entries),
                         skipped=tuple(skipped), seconds=seconds)


def _default_in_flight() -> int:
    """Twice the cluster's CPUs (at least 2), starting a local Ray when none is running."""
    import ray

    if not ray.is_initialized():
        ray.init(address="local", include_dashboard=False, _node_ip_address="127.0.0.1")
    return max(2, 2 * int(ray.cluster_resources().get("CPU", 1)))


_Decoded = tuple[np.ndarray, np.ndarray, list[str]]  # what _decode_batch returns


def _decoded_in_order(batches: Sequence[Sequence[ImageEntry]], decode, transform_ref,
                      max_in_flight: int) -> Iterator[tuple[Sequence[ImageEntry], _Decoded]]:
    """Each batch with its decoding, in order: one Ray task per batch, at most ``max_in_flight`` not yet taken."""
    import ray

    pending: deque = deque()
    for submitted, batch in enumerate(batches, start=1):
        pending.append((batch, decode.remote([e.path for e in batch], transform_ref)))
        while len(pending) >= max_in_flight or (submitted == len(batches) and pending):
            done_batch, ref = pending.popleft()
            decoded = ray.get(ref)
            del ref
            yield done_batch, decoded


def _write_decoded(writer: ShardWriter, batch: Sequence[ImageEntry], decoded: _Decoded) -> list[Skipped]:
    """Write a batch's decoded images; the files that failed, and why."""
    ok, images, errors = decoded
    kept = [batch[int(i)] for i in ok]
    writer.add([e.image_id for e in kept], [e.label for e in kept], images, [e.source for e in kept])
    return [Skipped(e.source, err) for e, err in zip(batch, errors, strict=True) if err]


def _report(name: str, source: str, files: int, skipped: Sequence[Skipped], transform: Transform, seconds: float,
            extra: dict | None) -> bytes:
    """``report.json``: what was converted, what was skipped and why, how, and how long it took."""
    report = {
        "name": name,
        "source": source,
        "files": files,
        "written": files - len(skipped),
        "skipped": [{"file": s.file, "error": s.error} for s in skipped],
        "transform": transform.to_dict(),
        "seconds": round(seconds, 3),
        **(extra or {}),
    }
    return (json.dumps(report, indent=1, ensure_ascii=False) + "\n").encode()


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")


def list_class_folders(src: str | os.PathLike[str]) -> tuple[list[str], list[tuple[str, int]]]:
    """Classes and images of a ``src/<class>/<image>`` tree, in torchvision ``ImageFolder`` order.

    Returns:
        (class folder names sorted, [(path relative to src, class index)] in ImageFolder order).

    Raises:
        ValueError: ``src`` is not a directory or holds no class folder with images.
    """
    src = os.fspath(src)
    if not os.path.isdir(src):
        raise ValueError(f"src: {src} is not a directory; give the root of a class-per-folder image tree")
    classes = sorted(e.name for e in os.scandir(src) if e.is_dir() and not e.name.startswith("."))
    files: list[tuple[str, int]] = []
    for index, cls in enumerate(classes):
        for root, dirs, names in sorted(os.walk(os.path.join(src, cls), followlinks=True)):
            dirs[:] = [d for d in dirs if not d.startswith(".")]
            for fname in sorted(names):
                if _is_image(fname):
                    files.append((os.path.relpath(os.path.join(root, fname), src).replace(os.sep, "/"), index))
    if not files:
        raise ValueError(f"src: no image files ({', '.join(IMAGE_EXTENSIONS)}) in class folders under {src}; "
                         "expected src/<class>/<image>")
    return classes, files


def convert_folder(
    src: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    transform: Transform | None = None,
    name: str | None = None,
    rows_per_shard: int = 1000,
    files_per_task: int = 32,
    compression: str = "zstd",
    progress: bool = False,
) -> ConvertResult:
    """Convert a class-per-folder image tree (``src/<class>/<image>``) into shards.

    Classes are the sorted folder names (labels 0..K-1); image ids are the images'
    indices in torchvision ``ImageFolder`` order. A class folder without images still
    counts as a class, so labels stay aligned with a model trained on the full tree.

    Args:
        src: root of the tree.
        out_dir: output directory (must not exist or be empty).
        transform: resize/crop (default: :meth:`Transform.eval` at 224).
        name: data set name (default: the name of ``src``).
        rows_per_shard: images per shard.
        files_per_task: files decoded per Ray task.
        compression: Parquet codec.
        progress: show a progress bar.
    """
    transform = transform or Transform.eval(224)
    classes, files = list_class_folders(src)
    root = os.path.abspath(os.fspath(src))
    entries = [ImageEntry(os.path.join(root, rel), rel, i, label) for i, (rel, label) in enumerate(files)]
    return convert_files(
        entries, out_dir,
        name=name or os.path.basename(root.rstrip(os.sep)),
        class_names=classes, class_ids=classes, source="folder", transform=transform,
        rows_per_shard=rows_per_shard, files_per_task=files_per_task, compression=compression,
        progress=progress, report_extra={"src": root},
    )
