"""Worst-case pixels to failure on a batch: per image, the smallest ladder point at which a sparse search
finds an example the model misclassifies (:mod:`pixelray.core.worst`). Plain torch, usable without Ray.

In rounds, like the random ladder's searches (:mod:`pixelray.engine.ladder`): a round runs the search on
every image still open at its next point; images at one point share the search's passes (in slices of
``batch_size``). ``scan`` climbs every point up to the first success; ``bisect`` tries the last point
first (an image the search cannot break there is left with none), then bisects between the largest
point known to fail and the smallest known to succeed: about log2(points) + 1 searches. Each search of
an image costs at most ``budget`` forward passes, fewer when it succeeds sooner; ``n_passes`` sums them.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from pixelray.core.worst import WorstCase
from pixelray.engine.evaluate import image_size

__all__ = ["WORST_FIELDS", "worst_case_outcomes", "worst_case_search"]

#: Per-image results, as failure.parquet holds them: the smallest point found (-1: none up to the last),
#: the largest point searched without success (-1: none; 0: no point below was searched), forward passes.
WORST_FIELDS = ("n_fail", "n_last_correct", "n_passes")


def worst_case_search(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, image_ids: torch.Tensor,
                      worst: WorstCase, batch_size: int) -> dict[str, np.ndarray]:
    """:data:`WORST_FIELDS` (int64 (N,)) for a batch of images the model classifies correctly."""
    from pixelray.attacks.sparse import sparse_search

    n = images.shape[0]
    points = np.asarray(worst.points(*image_size(images)), dtype=np.int64)
    found = np.full(n, len(points), dtype=np.int64)  # index of the smallest point known to succeed
    failed = np.full(n, -1, dtype=np.int64)  # index of the largest point known to fail
    passes = np.zeros(n, dtype=np.int64)

    def search(which: np.ndarray, at: np.ndarray) -> None:
        """Each image ``which[j]`` searched at point index ``at[j]``; updates found / failed / passes."""
        for index in np.unique(at):
            rows = which[at == index]
            for start in range(0, len(rows), batch_size):
                part = torch.from_numpy(rows[start:start + batch_size]).to(images.device)
                out = sparse_search(model, images[part], labels[part], int(points[index]), worst.budget, worst.seed,
                                    image_ids[part], init=worst.init)
                hit = out.success.cpu().numpy()
                chosen = part.cpu().numpy()
                passes[chosen] += out.queries.cpu().numpy()
                found[chosen[hit]] = index
                failed[chosen[~hit]] = index

    everyone = np.arange(n)
    if worst.ladder.search == "scan":
        for index in range(len(points)):
            open_ = everyone[found == len(points)]
            if not len(open_):
                break
            search(open_, np.full(len(open_), index))
    else:
        search(everyone, np.full(n, len(points) - 1))
        while True:
            open_ = everyone[(found < len(points)) & (found - failed > 1)]
            if not len(open_):
                break
            search(open_, (found[open_] + failed[open_]) // 2)
    return {
        "n_fail": np.where(found < len(points), points[np.minimum(found, len(points) - 1)], -1),
        "n_last_correct": np.where(failed >= 0, points[np.maximum(failed, 0)], 0),
        "n_passes": passes,
    }


def worst_case_outcomes(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, image_ids: torch.Tensor,
                        worsts: Sequence[tuple[WorstCase, int | None]], batch_size: int) -> dict[str, np.ndarray]:
    """Each worst-case ladder over the images with ids up to its cutoff (None: all): :data:`WORST_FIELDS` as
    int64 (W, N), -1 everywhere for the images a ladder does not search."""
    n = images.shape[0]
    out = {name: np.full((len(worsts), n), -1, dtype=np.int64) for name in WORST_FIELDS}
    ids = image_ids.cpu().numpy()
    for j, (worst, cutoff) in enumerate(worsts):
        chosen = np.flatnonzero(ids <= cutoff) if cutoff is not None else np.arange(n)
        if not len(chosen):
            continue
        index = torch.from_numpy(chosen).to(images.device)
        found = worst_case_search(model, images[index], labels[index], image_ids[index], worst, batch_size)
        for name in WORST_FIELDS:
            out[name][j, chosen] = found[name]
    return out
