"""The shard format's types: the manifest, a shard's entry in it, a batch read, what a reader expects."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np
import torch

from pixelray.core.check import check_int, is_int

MANIFEST_NAME = "manifest.json"
#: ``format`` field of every manifest.
FORMAT = "pixelray-shards"
#: Version of the layout written here; readers accept this version.
FORMAT_VERSION = 1
#: Parquet key-value metadata key holding the image shape (``"H,W,3"``).
SHAPE_KEY = b"pixelray.image_shape"
COLUMNS = ("image_id", "label", "image", "source")
MAX_ROWS_LISTED = 5  # row-level problems listed per file and kind before "... and N more"
HASH_BLOCK = 8 << 20

class ShardError(ValueError):
    """A shard or manifest that cannot be read or is invalid; the message names the file."""


@dataclass(frozen=True)
class ShardInfo:
    """One shard as the manifest lists it.

    Args:
        file: path relative to the data set root, e.g. ``shard-00000.parquet``.
        rows: number of images in the shard.
        sha256: hex digest of the file's bytes.
        min_id: smallest ``image_id`` in the shard.
        max_id: largest ``image_id`` in the shard.
    """

    file: str
    rows: int
    sha256: str
    min_id: int
    max_id: int

    def __post_init__(self) -> None:
        if not self.file or self.file.startswith("/") or ".." in self.file.split("/"):
            raise ValueError(f"shards.file: {self.file!r} must be a path relative to the data set root")
        if not is_int(self.rows) or self.rows < 1:
            raise ValueError(f"shards.rows: {self.rows!r} for {self.file} must be an integer >= 1")
        if len(self.sha256) != 64 or any(c not in "0123456789abcdef" for c in self.sha256):
            raise ValueError(f"shards.sha256: {self.sha256!r} for {self.file} is not a lowercase hex sha256")
        if self.min_id > self.max_id:
            raise ValueError(f"shards.min_id: {self.min_id} > max_id {self.max_id} for {self.file}")


@dataclass(frozen=True)
class Manifest:
    """What a data set holds: image shape, classes and shards.

    Args:
        name: data set name, e.g. ``imagenet-val``.
        height: image height in pixels.
        width: image width in pixels.
        num_images: total number of images (the sum of the shards' rows).
        num_classes: number of classes; labels lie in ``0..num_classes-1``.
        class_names: readable class names, by label.
        class_ids: stable class identifiers by label (WordNet ids for ImageNet,
            class folder names for image folders).
        shards: the shards, in image_id order.
        source: where the data came from: ``imagenet``, ``folder``, ``synthetic``, ...
    """

    name: str
    height: int
    width: int
    num_images: int
    num_classes: int
    class_names: tuple[str, ...]
    class_ids: tuple[str, ...]
    shards: tuple[ShardInfo, ...]
    source: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "class_names", tuple(str(c) for c in self.class_names))
        object.__setattr__(self, "class_ids", tuple(str(c) for c in self.class_ids))
        object.__setattr__(self, "shards", tuple(self.shards))
        for field in ("height", "width", "num_classes"):
            check_int(getattr(self, field), field)
        if self.num_classes > 32767:
            raise ValueError(f"num_classes: {self.num_classes} does not fit the int16 label column (max 32767)")
        for field in ("class_names", "class_ids"):
            if len(getattr(self, field)) != self.num_classes:
                raise ValueError(
                    f"{field}: {len(getattr(self, field))} entries for num_classes {self.num_classes}; "
                    "give one per class"
                )
        if len(set(self.class_ids)) != self.num_classes:
            raise ValueError("class_ids: entries are not unique; give each class its own id")
        total = sum(s.rows for s in self.shards)
        if self.num_images != total:
            raise ValueError(
                f"num_images: {self.num_images} differs from the shards' total of {total} rows"
            )

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(height, width, 3)."""
        return self.height, self.width, 3

    def to_json(self) -> str:
        """The manifest as ``manifest.json`` text (stable key order, no timestamps)."""
        body: dict[str, Any] = {"format": FORMAT, "version": FORMAT_VERSION}
        body.update(asdict(self))
        body["channels"] = 3
        return json.dumps(body, indent=1, ensure_ascii=False) + "\n"

    @classmethod
    def from_json(cls, text: str, where: str = MANIFEST_NAME) -> Manifest:
        """Parse ``manifest.json`` text; ShardError naming ``where`` when it is invalid."""
        try:
            body = json.loads(text)
            if not isinstance(body, dict) or body.get("format") != FORMAT:
                raise ValueError(f"format: {body.get('format') if isinstance(body, dict) else body!r} "
                                 f"is not {FORMAT!r}")
            if body.get("version") != FORMAT_VERSION:
                raise ValueError(f"version: {body.get('version')!r} is not supported "
                                 f"(this pixelray reads version {FORMAT_VERSION})")
            shards = tuple(ShardInfo(**s) for s in body["shards"])
            return cls(
                name=str(body["name"]),
                height=body["height"],
                width=body["width"],
                num_images=body["num_images"],
                num_classes=body["num_classes"],
                class_names=tuple(body["class_names"]),
                class_ids=tuple(body["class_ids"]),
                shards=shards,
                source=str(body["source"]),
            )
        except (ValueError, KeyError, TypeError) as exc:
            detail = f"missing field {exc}" if isinstance(exc, KeyError) else str(exc)
            raise ShardError(f"{where}: invalid manifest ({detail}); re-run the conversion") from None


@dataclass(frozen=True)
class ShardBatch:
    """Images of one shard (or a subset of it) as torch tensors.

    Args:
        image_ids: int64 (N,).
        labels: int64 (N,).
        images: uint8 (N, H, W, 3), contiguous and writable.
    """

    image_ids: torch.Tensor
    labels: torch.Tensor
    images: torch.Tensor

    def __len__(self) -> int:
        return int(self.image_ids.shape[0])


@dataclass(frozen=True)
class ShardExpectation:
    """What a shard must be, from its manifest entry; :func:`read_shard` checks a read against it.

    Args:
        file: the shard's file name in the manifest (named in messages).
        rows: number of rows.
        min_id, max_id: the range of its image ids.
        shape: (H, W, 3) of every image.
        num_classes: labels lie in ``0..num_classes-1``.
        sha256: the file's digest; None skips the (whole-file) hash.
    """

    file: str
    rows: int
    min_id: int
    max_id: int
    shape: tuple[int, int, int]
    num_classes: int
    sha256: str | None = None

    @classmethod
    def of(cls, manifest: Manifest, info: ShardInfo, sha256: bool = False) -> ShardExpectation:
        return cls(info.file, info.rows, info.min_id, info.max_id, manifest.image_shape, manifest.num_classes,
                   info.sha256 if sha256 else None)

    def replace(self, **changes: Any) -> ShardExpectation:
        return replace(self, **changes)

    def mismatches(self, where: str, *, rows: int | None = None, shape: tuple[int, ...] | None = None,
                   ids: np.ndarray | None = None, labels: np.ndarray | None = None) -> list[str]:
        """How a shard's rows, image shape, ids (all of them) and labels differ from this expectation."""
        problems = []
        if rows is not None and rows != self.rows:
            problems.append(f"{where}: {rows} rows, but the manifest says {self.rows}")
        if shape is not None and tuple(shape) != tuple(self.shape):
            problems.append(f"{where}: image shape {_shape_text(shape)} differs from the manifest's "
                            f"{_shape_text(self.shape)}")
        if ids is not None and len(ids):
            low, high = int(ids.min()), int(ids.max())
            if (low, high) != (self.min_id, self.max_id):
                problems.append(f"{where}: image_id range {low}..{high} differs from the manifest's "
                                f"{self.min_id}..{self.max_id}")
            uniq, counts = np.unique(ids, return_counts=True)
            if (counts > 1).any():
                problems.append(f"{where}: image_id {int(uniq[counts > 1][0])} appears more than once; "
                                "image ids must be unique in the data set")
        if labels is not None and len(labels):
            bad = labels[(labels < 0) | (labels >= self.num_classes)]
            if len(bad):
                problems.append(f"{where}: labels {int(bad.min())}..{int(bad.max())} outside "
                                f"0..{self.num_classes - 1} (num_classes {self.num_classes})")
        return problems


def _shape_text(shape: Sequence[int]) -> str:
    return "x".join(str(int(v)) for v in shape)
