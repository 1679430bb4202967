"""Worst-case pixels to failure: the ladder a sparse (L0) search climbs, and its budget. No torch.

Random pixels to failure (:mod:`pixelray.core.ladder`) asks how many *random* changed pixels break an
image; the worst case asks how few a *search* needs. Per image, the smallest point k of a geometric
ladder (the random ladder's points: :func:`~pixelray.core.ladder.ladder_points`, whole image, full-range
changes) at which the sparse attack (:func:`pixelray.attacks.sparse.sparse_search`: at most k changed pixel
positions, ``budget`` forward passes per image and k) finds an example the model misclassifies. A search
that finds nothing at k within its budget says nothing certain about k (a longer search might), so the
result is an upper bound on the true minimum, and tighter with a larger budget.

``[[attack]] kind = "sparse"`` with ``ladder = true`` declares one (its ``budget``, ``seed``,
``steps_per_octave``, ``max_count``, ``search`` and ``size``: at most that many evaluation-set images per
model, lowest ids first). Its rows sit in ``failure.parquet`` beside the random ones: ``kind =
"worst_case"``, ``attack = "sparse"``, ``attack_params`` (budget, init, seed) and ``budget``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from pixelray.core.ladder import Ladder

__all__ = ["KIND", "PIXEL_ATTACKS", "WorstCase", "budget_text", "eps_k"]

#: ``failure.parquet``'s ``kind`` for these rows (the random ladders' rows say "random").
KIND = "worst_case"
#: The built-in attacks on pixel counts (``AttackSpec.unit = "pixels"``): their rows' ``eps`` holds k itself.
PIXEL_ATTACKS = ("sparse",)


def eps_k(eps: float, attack: str | None) -> int:
    """The config's step k of a row's ``eps``: k/255 for a radius, k itself for an attack on pixel counts."""
    return round(eps) if attack in PIXEL_ATTACKS else round(eps * 255)


def budget_text(eps: float, attack: str | None) -> str:
    """A row's ``eps`` as a person reads it: "ε = k/255", or "k = n pixels"."""
    k = eps_k(eps, attack)
    return f"k = {k} pixels" if attack in PIXEL_ATTACKS else f"ε = {k}/255"


@dataclass(frozen=True)
class WorstCase:
    """A worst-case ladder: the points of ``ladder`` (whole image, full range; its seed is the search's), searched
    with ``budget`` forward passes per image and point from ``init``; ``size``: at most that many images per model."""

    ladder: Ladder
    budget: int
    attack: str = "sparse"
    size: int | None = None
    init: str = "saliency"  # the search's start: "saliency" (one gradient, counted as 3 passes) or "random"

    def __post_init__(self) -> None:
        if self.ladder.refine:
            raise ValueError("refine: a worst-case ladder searches its points only; drop refine")
        if self.ladder.amplitude != "full" or self.ladder.area is not None or self.ladder.channels != "all":
            raise ValueError("a worst-case ladder changes whole pixels anywhere in the image (full range, whole "
                             "image, every channel)")
        if isinstance(self.budget, bool) or not isinstance(self.budget, int) or self.budget < 1:
            raise ValueError(f"budget: {self.budget!r} must be an integer >= 1 (forward passes per image and k)")

    @property
    def seed(self) -> int:
        return self.ladder.seed

    @property
    def label(self) -> str:
        """Everything that determines its rows (the unit tables' key): the points, the search and the budget."""
        return f"worst-{self.attack}-{self.init}-b{self.budget}-{self.ladder.label}"

    @property
    def params_label(self) -> str:
        """``attack_params`` of its rows: the search's own parameters, as the attack phase writes them."""
        return json.dumps({"budget": self.budget, "init": self.init, "seed": self.seed}, sort_keys=True)

    def points(self, height: int, width: int) -> tuple[int, ...]:
        return self.ladder.points(height, width)
