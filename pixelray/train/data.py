"""Which images a fine-tune trains and is evaluated on, and which worker reads which.

**How the data reaches the workers.** The driver reads only the ``image_id`` and ``label``
columns of the shards (no pixels) and plans: the training images, the held-out images,
and for each Ray Train worker a disjoint share of both, as (shard, image ids) pairs. Each
worker then reads its own share with :func:`pixelray.shards.read_shard`, once, and keeps it
on its device for every epoch; only a shuffled order and the augmentation are drawn afresh
per epoch. So every image is read by one worker, and nothing reads the data set once per
worker.

Why not Ray Data (``read_parquet`` + ``get_dataset_shard`` + ``iter_torch_batches``)? A
fine-tune of the paper's kind trains on ~1,000 images for 20 epochs: the whole share fits
on the device (1,000 ImageNet images are 150 MB of uint8), so a streaming pipeline would
re-read, re-decode and re-send the same images every epoch to buy nothing. Its read tasks
also need CPUs of their own beside the training workers (on a small machine, none are
left), and its order depends on task scheduling; here the partition and each epoch's order
are a function of the config, so a resumed run trains on exactly the batches the first one
would have. The price: a worker's share must fit in its memory. For a fine-tune on far more
images than fit, Ray Data streaming is the right tool.

**Selection.** Images are ranked by a hash of (``split_seed``, image id), a seeded
permutation that does not depend on the shard layout. Without ``eval_data``, a further hash
puts ``holdout`` of the ids aside as held-out images. The training images are the
``images`` lowest-ranked of the rest; the evaluated held-out images the ``eval_images``
lowest-ranked held-out ones. The training images are cut to a multiple of the number of
workers (at most ``workers - 1`` are left out) so that every worker runs the same number of
steps, which DDP needs.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import numpy as np
import torch

from pixelray.core.perturb import hash64

__all__ = ["DataPlan", "Share", "plan_data", "read_share"]

_STREAM_RANK = 21
_STREAM_HOLDOUT = 22


@dataclass(frozen=True)
class Share:
    """One worker's images: (shard URI, image ids in that shard) pairs."""

    parts: tuple[tuple[str, tuple[int, ...]], ...]

    def __len__(self) -> int:
        return sum(len(ids) for _, ids in self.parts)

    @property
    def image_ids(self) -> list[int]:
        return [i for _, ids in self.parts for i in ids]


@dataclass(frozen=True)
class DataPlan:
    """The images of a fine-tune and each worker's share of them.

    Attributes:
        train: one :class:`Share` per worker, equal sizes, disjoint.
        heldout: one :class:`Share` per worker, disjoint (sizes may differ by one).
        labels: the distinct labels of the training images, sorted.
        num_classes: the data set's label space (its manifest's classes).
        image_size: (height, width).
        manifest_sha256: checksum of the training data set's manifest; ``eval_manifest_sha256``
            of the held-out one (the same without ``eval_data``).
        dropped: training images left out so that the shares are equal.
    """

    train: tuple[Share, ...]
    heldout: tuple[Share, ...]
    labels: tuple[int, ...]
    num_classes: int
    image_size: tuple[int, int]
    manifest_sha256: str
    eval_manifest_sha256: str
    dropped: int = 0

    @property
    def n_train(self) -> int:
        return sum(len(s) for s in self.train)

    @property
    def n_heldout(self) -> int:
        return sum(len(s) for s in self.heldout)


def _manifest_sha256(root: str) -> str:
    """sha256 of a data set's manifest.json as stored (what `sha256sum manifest.json` prints)."""
    import pyarrow.fs as pafs

    from pixelray.shards import MANIFEST_NAME

    where = f"{root.rstrip('/')}/{MANIFEST_NAME}"
    fs, path = pafs.FileSystem.from_uri(where) if "://" in where else (pafs.LocalFileSystem(), os.path.abspath(where))
    with fs.open_input_stream(path) as f:
        return hashlib.sha256(f.read()).hexdigest()


def _index(root: str):
    """Manifest, and for every shard (uri, ids, labels)."""
    from pixelray.shards import load_manifest, read_labels, shard_uris

    manifest = load_manifest(root)
    return manifest, [(uri, *read_labels(uri)) for uri in shard_uris(root)]


def _hash_unit(ids: np.ndarray, seed: int, stream: int) -> np.ndarray:
    """A float in [0, 1) per id: a hash of (seed, stream, id)."""
    bits = hash64(hash64(torch.from_numpy(ids) + (stream << 40)) + seed).numpy()
    return ((bits & ((1 << 63) - 1)) >> 10).astype(np.float64) / float(1 << 53)


def _split(shards, chosen: np.ndarray, workers: int, equal: bool) -> tuple[tuple[Share, ...], int]:
    """Chosen ids in file order, cut into ``workers`` contiguous shares (each worker reads few shards)."""
    keep = set(chosen.tolist())
    ordered = [(uri, int(i)) for uri, ids, _ in shards for i in ids.tolist() if int(i) in keep]
    dropped = len(ordered) % workers if equal else 0
    ordered = ordered[: len(ordered) - dropped]
    bounds = np.linspace(0, len(ordered), workers + 1).round().astype(int)
    shares = []
    for w in range(workers):
        parts: dict[str, list[int]] = {}
        for uri, i in ordered[bounds[w]:bounds[w + 1]]:
            parts.setdefault(uri, []).append(i)
        shares.append(Share(tuple((uri, tuple(ids)) for uri, ids in parts.items())))
    return tuple(shares), dropped


def _lowest(ids: np.ndarray, rank: np.ndarray, n: int | None) -> np.ndarray:
    return ids[np.argsort(rank, kind="stable")][:n]


def plan_data(
    data: str,
    eval_data: str | None,
    *,
    images: int | None,
    eval_images: int | None,
    holdout: float,
    split_seed: int,
    workers: int,
) -> DataPlan:
    """Plan the training and held-out images and each worker's share (reads ids and labels only).

    Raises:
        ValueError (a :class:`pixelray.shards.ShardError` for unreadable data): with the path and the fix.
    """
    manifest, shards = _index(data)
    all_ids = np.concatenate([ids for _, ids, _ in shards]) if shards else np.empty(0, np.int64)
    all_labels = np.concatenate([labels for _, _, labels in shards]) if shards else np.empty(0, np.int64)
    rank = _hash_unit(all_ids, split_seed, _STREAM_RANK)
    if eval_data is None:
        held = _hash_unit(all_ids, split_seed, _STREAM_HOLDOUT) < holdout
        pool, eval_shards = ~held, shards
        eval_ids = _lowest(all_ids[held], rank[held], eval_images)
    else:
        pool = np.ones(len(all_ids), dtype=bool)
        eval_manifest, eval_shards = _index(eval_data)
        if (eval_manifest.height, eval_manifest.width) != (manifest.height, manifest.width) \
                or eval_manifest.num_classes != manifest.num_classes:
            raise ValueError(f"eval_data: {eval_data} has {eval_manifest.num_classes} classes of "
                             f"{eval_manifest.height}x{eval_manifest.width} images, {data} has "
                             f"{manifest.num_classes} of {manifest.height}x{manifest.width}; held-out images "
                             "must share the training data's size and label space")
        e_ids = np.concatenate([ids for _, ids, _ in eval_shards]) if eval_shards else np.empty(0, np.int64)
        eval_ids = _lowest(e_ids, _hash_unit(e_ids, split_seed, _STREAM_RANK), eval_images)
    train_ids = _lowest(all_ids[pool], rank[pool], images)
    if images is not None and len(train_ids) < images:
        raise ValueError(f"images: {images} training images asked for, but {data} has only {len(train_ids)}"
                         f"{' outside the held-out split' if eval_data is None else ''}; lower images or omit it")
    if len(train_ids) < workers:
        raise ValueError(f"images: {len(train_ids)} training images for {workers} workers; every worker needs "
                         "at least one")
    if not len(eval_ids):
        raise ValueError(f"eval_data: no held-out images in {eval_data or data}; add images or raise holdout")
    train, dropped = _split(shards, train_ids, workers, equal=True)
    heldout, _ = _split(eval_shards, eval_ids, workers, equal=False)
    kept = set(i for s in train for i in s.image_ids)
    labels = np.unique(all_labels[np.isin(all_ids, np.fromiter(kept, np.int64, len(kept)))])
    return DataPlan(
        train=train, heldout=heldout, labels=tuple(int(v) for v in labels), num_classes=manifest.num_classes,
        image_size=(manifest.height, manifest.width),
        manifest_sha256=_manifest_sha256(data), eval_manifest_sha256=_manifest_sha256(eval_data or data),
        dropped=dropped,
    )


def read_share(share: Share) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(image_ids, labels, images) of a share, on the CPU; each shard of it read once."""
    from pixelray.shards import read_shard

    batches = [read_shard(uri, list(ids)) for uri, ids in share.parts]
    if not batches:
        return torch.empty(0, dtype=torch.int64), torch.empty(0, dtype=torch.int64), torch.empty(0, dtype=torch.uint8)
    return (torch.cat([b.image_ids for b in batches]), torch.cat([b.labels for b in batches]),
            torch.cat([b.images for b in batches]))
