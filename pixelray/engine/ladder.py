"""Pixels to failure: per image, the smallest ladder point at which the model's verdict flips.

For a clean image (``target = "wrong"``) that is the first k whose first k changes make the model
misclassify it; for an adversarial example (``target = "right"``), the first k that brings it back
to its true class (pixels to restore). Plain torch, usable without Ray.

Searches (:class:`~pixelray.core.ladder.Ladder`'s ``search``), each in rounds: a round evaluates every
image still searching at its next count, in passes of ``batch_size`` images (images at different counts
share a pass); an image that has flipped leaves the search.

- ``scan``: every ladder point in order up to the first flip: exact (no assumption of monotonicity);
  an image costs one forward pass per point it survives, plus the one where it flips.
- ``bisect``: the last point first (an image that survives it survives the ladder), then bisection over
  the points: about log2(points) + 1 passes; it assumes that an image, once flipped, stays flipped.
- ``refine``: after either, bisection over the integers between the last unflipped point and the first
  flipped one (same assumption), giving ``n_fail_refined``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from pixelray.core.ladder import Ladder
from pixelray.core.ladder_draws import LadderDraws
from pixelray.engine.evaluate import amp_autocast, image_size

__all__ = ["LADDER_FIELDS", "TARGETS", "ladder_outcomes", "search_ladder"]

#: The per-image results of a search, in the order unit tables and failure.parquet hold them.
LADDER_FIELDS = ("n_fail", "n_fail_refined", "n_last_correct", "n_passes")

#: What a search looks for: the model misclassifies (clean images) or classifies correctly (adversarial examples).
TARGETS = ("wrong", "right")


class _Verdicts:
    """Forward passes of images with their first k changes; counts the passes each image took part in."""

    def __init__(self, model, images, labels, ids, draws: LadderDraws, batch_size: int, amp, target: str):
        self.model, self.images, self.labels, self.ids = model, images, labels, ids
        self.draws, self.batch_size, self.amp, self.target = draws, batch_size, amp, target
        self.passes = np.zeros(images.shape[0], dtype=np.int64)

    def flipped(self, which: np.ndarray, counts: np.ndarray) -> np.ndarray:
        """bool per entry: image ``which[j]`` with its first ``counts[j]`` changes reaches the target."""
        if len(which) == 0:
            return np.zeros(0, dtype=bool)
        order = np.argsort(counts, kind="stable")  # similar counts share a pass: fewer draws per pass
        which, counts = which[order], counts[order]
        dev = self.images.device
        out = []
        with torch.inference_mode(), amp_autocast(dev, self.amp):
            for start in range(0, len(which), self.batch_size):
                index = torch.from_numpy(which[start : start + self.batch_size]).to(dev)
                k = torch.from_numpy(counts[start : start + self.batch_size]).to(dev)
                changed = self.draws.apply_(self.images[index], self.ids[index], k)  # indexing made a copy
                pred = self.model(changed).argmax(dim=1)
                truth = self.labels[index]
                out.append(pred != truth if self.target == "wrong" else pred == truth)
        np.add.at(self.passes, which, 1)
        hit = torch.cat(out).cpu().numpy()
        result = np.empty_like(hit)
        result[order] = hit
        return result


def search_ladder(
    model: torch.nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    image_ids: torch.Tensor,
    ladder: Ladder,
    batch_size: int,
    amp: bool | str = False,
    *,
    target: str = "wrong",
    flipped_at_zero: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """The ladder's search over a batch (see the module docstring); per-image numpy arrays.

    Args:
        images, labels, image_ids: uint8 (N, H, W, 3) or (N, 3, H, W), int64 (N,), (N,), on the model's device.
        target: ``"wrong"`` or ``"right"`` (:data:`TARGETS`).
        flipped_at_zero: bool (N,): images already at the target unchanged (known from an earlier pass);
            they get ``n_fail = 0`` and no pass. None: none are.

    Returns:
        ``n_fail`` (the first flipped ladder point; -1: none up to the last point), ``n_fail_refined``
        (with ``refine``: the first flipped count between the last unflipped point and ``n_fail``; else -1),
        ``n_last_correct`` (the largest count known not to flip: the point before ``n_fail``, 0 for the
        unchanged image, the last point for a survivor; -1 where flipped at zero) and ``n_passes`` (forward
        passes the image took part in).
    """
    if target not in TARGETS:
        raise ValueError(f"target: {target!r} is unknown; allowed: {list(TARGETS)}")
    n = images.shape[0]
    points = np.asarray(ladder.points(*image_size(images)), dtype=np.int64)
    draws = LadderDraws(ladder, *image_size(images), images.device)
    verdicts = _Verdicts(model, images, labels, image_ids, draws, batch_size, amp, target)
    done0 = np.zeros(n, dtype=bool) if flipped_at_zero is None else np.asarray(flipped_at_zero, dtype=bool)
    # lo / hi: indices into points of the last known unflipped point (-1: the unchanged image) and the first
    # known flipped one (len(points): none known)
    lo = np.full(n, -1, dtype=np.int64)
    hi = np.full(n, len(points), dtype=np.int64)
    live = np.flatnonzero(~done0)
    if ladder.search == "scan":
        for i, k in enumerate(points):
            if len(live) == 0:
                break
            hit = verdicts.flipped(live, np.full(len(live), k))
            hi[live[hit]] = i
            lo[live[~hit]] = i
            live = live[~hit]
    else:
        hit = verdicts.flipped(live, np.full(len(live), points[-1]))
        lo[live[~hit]] = len(points) - 1  # survives the last point: assumed to survive every one
        hi[live[hit]] = len(points) - 1
        live = live[hit]
        while len(live := live[hi[live] - lo[live] > 1]):
            mid = (lo[live] + hi[live]) // 2
            hit = verdicts.flipped(live, points[mid])
            hi[live[hit]] = mid[hit]
            lo[live[~hit]] = mid[~hit]
    found = (~done0) & (hi < len(points))
    n_fail = np.where(found, points[np.minimum(hi, len(points) - 1)], -1)
    n_fail[done0] = 0
    last = np.where(lo >= 0, points[np.maximum(lo, 0)], 0)
    last[done0] = -1
    refined = np.full(n, -1, dtype=np.int64)
    if ladder.refine:
        refined[done0] = 0
        low, high = last.copy(), n_fail.copy()
        live = np.flatnonzero(found)
        while len(live := live[high[live] - low[live] > 1]):
            mid = (low[live] + high[live]) // 2
            hit = verdicts.flipped(live, mid)
            high[live[hit]] = mid[hit]
            low[live[~hit]] = mid[~hit]
        refined[found] = high[found]
    return {"n_fail": n_fail, "n_fail_refined": refined, "n_last_correct": last, "n_passes": verdicts.passes}


def ladder_outcomes(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, image_ids: torch.Tensor,
                    ladders: Sequence[Ladder], batch_size: int, amp: bool | str = False, *, target: str = "wrong",
                    flipped_at_zero: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """:func:`search_ladder` under every ladder: each of :data:`LADDER_FIELDS` as an int64 (ladders, N) array."""
    n = images.shape[0]
    out = {name: np.zeros((len(ladders), n), dtype=np.int64) for name in LADDER_FIELDS}
    for i, ladder in enumerate(ladders):
        found = search_ladder(model, images, labels, image_ids, ladder, batch_size, amp, target=target,
                              flipped_at_zero=flipped_at_zero)
        for name in LADDER_FIELDS:
            out[name][i] = found[name]
    return out
