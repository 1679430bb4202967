"""A sparse (L0) attack: Sparse-RS random search over k pixel positions, optionally gradient-started. Pure numerics.

The threat model is the paper's full-range pixel change: an example may differ from its image
in at most ``k`` pixel positions (h, w), and at each of them the three channel values may take
any value in [0, 255]. The search is that of Sparse-RS (Croce et al., AAAI 2022), untargeted,
with the margin loss (true logit minus the largest other logit):

* an image's state is a set of ``k`` positions and a colour for each, a corner of the RGB cube
  {0, 255}^3 (so the examples are uint8 images exactly, and the model judges the very image
  that is returned);
* each iteration proposes to swap ``m`` of the ``k`` positions for unused ones with fresh
  colours, ``m`` falling with Sparse-RS's piecewise-constant schedule (``alpha_init`` 0.3 x k,
  then /2, /4, ... /20 at fixed fractions of the budget);
* the proposal replaces the state when the margin does not increase (ties accepted, so the
  search drifts across plateaus), or when it fools the model;
* an image is fooled when the model's argmax on its uint8 example is not its label; it then
  stops, and leaves the forward batch.

Batched: all images still being attacked take one iteration in one forward pass; the loop
runs over iterations, never over images. A new colour always differs from the pixel it
replaces (the value already there when that is a corner of the cube), so no change is wasted.

Randomness is not drawn from a global generator. Every draw is a counter-based hash of
(seed, image id, stream, iteration, draw index) with :func:`~pixelray.core.perturb.hash64`
(SplitMix64): an image's key is ``hash64(hash64(id * M + 2 seed + 1) + STREAM)``, and draw
``j`` of ``stream`` at iteration ``t`` is ``hash64(hash64(key + c(stream, t)) + hash64(j))``
with ``c(stream, t) = hash64(stream << 40 | t)``. So an image's example does not depend on its
batch, its place in it, or the batch order (as far as the model's logits do not).

The start (``init``): ``"random"`` (Sparse-RS, black-box) draws k distinct positions uniformly
and a colour for each. ``"saliency"`` (white-box) takes one gradient of the margin at the clean
image and starts from the k positions whose best cube corner (per channel: 255 where the
gradient is negative, else 0) lowers the margin most to first order, with those corners
(ties, such as zero gradients, in the random order). On the tiny CNN of
``benchmarks/sparse.py`` (50 images, 300 queries) it raises the success rate from 0.16 to 0.30
at k = 16, 0.36 to 0.60 at k = 32 and 0.58 to 0.92 at k = 64. The gradient is exact only as far
as the model's float arithmetic is: with ``"saliency"`` an image's example may depend on its
batch where the gradient's last bits do.

Queries are forward passes: an image is counted once for each forward pass it takes part in
(the first, on the initial set, included), at most ``budget``. The gradient of ``"saliency"``
(a forward and a backward pass to the input, which costs about two forward passes) counts as
3 queries, so its budget must be at least 4.

Example:
    >>> import torch
    >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 4))
    >>> images = torch.full((2, 8, 8, 3), 100, dtype=torch.uint8)
    >>> found = sparse_search(model, images, torch.tensor([0, 1]), k=3, budget=20, image_ids=torch.tensor([5, 6]))
    >>> found.adv.dtype, int((found.adv != images).any(dim=-1).sum(dim=(1, 2)).max()) <= 3
    (torch.uint8, True)
    >>> bool((found.queries <= 20).all())
    True
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from enum import Enum
from typing import NamedTuple

import torch

from pixelray.attacks.base import (
    AttackOutcome,
    AttackSpec,
    Param,
    PassCost,
    as_labels,
    check_logits,
    check_model,
    eval_mode,
    like,
    to_unit,
)
from pixelray.core.check import check_int
from pixelray.core.draws import check_uint8, first_occurrence, uniform
from pixelray.core.perturb import hash64, image_layout

__all__ = ["SPARSE", "Init", "SparseResult", "sparse", "sparse_search", "swap_count"]

_STREAM_KEY = 0x53505253  # "SPRS": the image keys of this attack
_ORDER, _COLOUR, _SLOT, _NEW, _NEW_COLOUR = 1, 2, 3, 4, 5  # draw streams
_MUL = -0x29173F0B2C5A8B1B  # an odd 64-bit multiplier (two's complement), spreads consecutive ids
_ALPHA_INIT = 0.3  # Sparse-RS's alpha_init for L0
# Sparse-RS's L0 schedule: the share of k swapped is alpha_init / divisor, the divisor set by the
# iteration on a 10,000-step scale (the budget rescaled to it): 0 -> 1, (0, 50] -> 2, (50, 200] -> 4, ...
_BOUNDS = (0, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)
_DIVISORS = (1, 2, 4, 5, 6, 8, 10, 12, 15, 20)
_EXTRA_CANDIDATES = 8  # unused-position candidates beyond 2 m: repeats among them are rare
GRADIENT_QUERIES = 3  # what the saliency start's forward + backward pass counts for


class Init(str, Enum):
    """How the search starts: ``random`` (black-box, Sparse-RS) or ``saliency`` (one gradient, white-box)."""

    RANDOM = "random"
    SALIENCY = "saliency"

    @classmethod
    def parse(cls, value: object) -> Init:
        try:
            return cls(value)
        except ValueError:
            raise ValueError(f"init: {value!r} is unknown; allowed: {[m.value for m in cls]}") from None


class SparseResult(NamedTuple):
    """What :func:`sparse_search` returns for a batch.

    Attributes:
        adv: the examples, uint8, in the input's shape and layout; each differs from its image in
            at most k pixel positions.
        success: per image, the model's argmax on ``adv`` is not the label (bool (N,)).
        queries: per image, the forward passes it took part in (int64 (N,), at most the budget; the
            gradient of ``init="saliency"`` counts 3).
    """

    adv: torch.Tensor
    success: torch.Tensor
    queries: torch.Tensor


def swap_count(iteration: int, budget: int, k: int) -> int:
    """How many of the k positions iteration ``iteration`` (1..budget-1) proposes to change: Sparse-RS's schedule."""
    scaled = int(iteration / budget * 10000)
    return min(k, max(int(_ALPHA_INIT / _DIVISORS[bisect.bisect_left(_BOUNDS, scaled)] * k), 1))


def _image_keys(image_ids: torch.Tensor, seed: int) -> torch.Tensor:
    """One int64 key per image, (N, 1): a hash of (seed, image id) in this attack's stream."""
    return hash64(hash64(image_ids.view(-1, 1) * _MUL + (seed * 2 + 1)) + _STREAM_KEY)


def _draws(keys: torch.Tensor, stream: int, iteration: int, count: int) -> torch.Tensor:
    """int64 hash bits (N, count): draw j of ``stream`` at ``iteration``, for each image key (N, 1)."""
    step = int(hash64(torch.tensor((stream << 40) | iteration, dtype=torch.int64)))  # host-side constant
    index = hash64(torch.arange(count, dtype=torch.int64, device=keys.device))
    return hash64(hash64(keys + step) + index)


def _corner_codes(pixels: torch.Tensor) -> torch.Tensor:
    """Per position of uint8 (N, 3, P) pixels: the cube corner it sits on (0..7, bit c = channel c is 255), or -1."""
    full, zero = pixels == 255, pixels == 0
    code = (full.long() << torch.arange(3, device=pixels.device).view(1, 3, 1)).sum(dim=1)
    return torch.where((full | zero).all(dim=1), code, -1)


def _new_colours(bits: torch.Tensor, avoid: torch.Tensor) -> torch.Tensor:
    """Corner codes uniform over the 8 corners, or over the 7 other than ``avoid`` where it is >= 0."""
    return torch.where(avoid < 0, uniform(bits, 8), (avoid + 1 + uniform(bits, 7)) % 8)


def _corner_values(codes: torch.Tensor) -> torch.Tensor:
    """Corner codes (N, k) as channel values in {0, 1}, float32 (N, 3, k)."""
    bits = codes.unsqueeze(1) >> torch.arange(3, device=codes.device).view(1, 3, 1)
    return (bits & 1).to(torch.float32)


def _render(clean: torch.Tensor, positions: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """Float (N, 3, P) images in [0, 1] with the corner colours ``codes`` (N, k) at ``positions`` (N, k)."""
    index = positions.unsqueeze(1).expand(-1, 3, -1)
    return clean.clone().scatter_(2, index, _corner_values(codes).to(clean.dtype))


def _margin_and_fooled(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The margin (true logit minus the largest other, float32) and whether the argmax is not the label."""
    logits = logits.float()
    true = logits.gather(1, labels.view(-1, 1)).squeeze(1)
    other = logits.scatter(1, labels.view(-1, 1), float("-inf")).amax(dim=1)
    return true - other, logits.argmax(dim=1) != labels


def _first_distinct(candidates: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``m`` distinct values of each row (N, C), in row order, as (N, m), and which of them exist."""
    keep = first_occurrence(candidates)
    rank = keep.cumsum(dim=1) - 1
    keep &= rank < m
    out = torch.full((len(candidates), m + 1), -1, dtype=candidates.dtype, device=candidates.device)
    out.scatter_(1, torch.where(keep, rank, m), torch.where(keep, candidates, -1))  # column m: a dump
    return out[:, :m], out[:, :m] >= 0


def _random_start(keys: torch.Tensor, codes: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A uniform random order of the positions per image (N, P) (its first k: the set) and the set's colours."""
    order = torch.argsort(_draws(keys, _ORDER, 0, codes.shape[1]), dim=1)
    avoid = codes.gather(1, order[:, :k]).long()
    return order, _new_colours(_draws(keys, _COLOUR, 0, k), avoid)


def _margin_gradient(model: torch.nn.Module, clean: torch.Tensor, labels: torch.Tensor, shape: tuple[int, ...],
                     span: tuple[int, int] | None) -> torch.Tensor:
    """d margin / d input at the clean images, (N, 3, P); the summed margin, so each image's is its own."""
    with torch.inference_mode(False), torch.enable_grad():
        x = clean.detach().clone().view(shape).requires_grad_(True)  # an inference tensor cannot enter autograd
        logits = model(x)
        check_logits(logits, len(x), span)
        margin, _ = _margin_and_fooled(logits, labels.clone())  # (a clone: the caller may be in inference mode)
        (grad,) = torch.autograd.grad(margin.sum(), x)
    return grad.flatten(2)


def _saliency_start(keys: torch.Tensor, codes: torch.Tensor, k: int, clean: torch.Tensor,
                    grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions ordered by the first-order margin change of their best corner (most negative first, ties in
    the random order), and the first k's colours: that corner, or a random other one where it is the pixel."""
    corner = (grad < 0).to(clean.dtype)  # 255 where raising the channel lowers the margin
    gain = (grad * (corner - clean)).sum(dim=1)  # (N, P), <= 0
    shuffled = torch.argsort(_draws(keys, _ORDER, 0, codes.shape[1]), dim=1)
    order = shuffled.gather(1, torch.argsort(gain.gather(1, shuffled), dim=1, stable=True))
    best = (corner.long() << torch.arange(3, device=clean.device).view(1, 3, 1)).sum(dim=1).gather(1, order[:, :k])
    there = codes.gather(1, order[:, :k]).long()
    return order, torch.where(best == there, _new_colours(_draws(keys, _COLOUR, 0, k), there), best)


class _Proposal(NamedTuple):
    slots: torch.Tensor  # (n, m) which of the k set entries change
    targets: torch.Tensor  # (n, m) where in the order the outgoing position goes (the slot itself if none)
    incoming: torch.Tensor  # (n, m) the position each slot takes (the same one if no unused position was found)
    positions: torch.Tensor  # (n, k) the proposed set
    colours: torch.Tensor  # (n, k) its colours


def _propose(keys: torch.Tensor, order: torch.Tensor, colours: torch.Tensor, codes: torch.Tensor,
             rows: torch.Tensor, iteration: int, m: int) -> _Proposal:
    """For the images ``rows`` (n,): swap ``m`` random set entries for random unused positions with new colours.

    ``keys`` (N, 1), ``order`` (N, P), ``colours`` (N, k) and ``codes`` (N, P) are the whole batch's; only the
    rows' few entries are read.
    """
    k, at = colours.shape[1], rows.view(-1, 1)
    keys, current, colours = keys[rows], order[rows, :k], colours[rows]
    slots = torch.topk(_draws(keys, _SLOT, iteration, k), m, dim=1, largest=False).indices  # a uniform m-subset
    unused = order.shape[1] - k
    if unused:
        tail, found = _first_distinct(uniform(_draws(keys, _NEW, iteration, 2 * m + _EXTRA_CANDIDATES), unused), m)
        targets = torch.where(found, tail + k, slots)
    else:  # every position is in the set: recolour in place
        targets, found = slots, torch.zeros_like(slots, dtype=torch.bool)
    outgoing = current.gather(1, slots)
    incoming = torch.where(found, order[at, targets], outgoing)
    # a new colour differs from what is there now: the clean pixel at a new position, the set's colour at an old one
    avoid = torch.where(found, codes[at, incoming].long(), colours.gather(1, slots))
    new = _new_colours(_draws(keys, _NEW_COLOUR, iteration, m), avoid)
    return _Proposal(slots, targets, incoming, current.scatter(1, slots, incoming), colours.scatter(1, slots, new))


def _accept(order: torch.Tensor, colours: torch.Tensor, rows: torch.Tensor, proposal: _Proposal) -> None:
    """Write the accepted proposals (``rows``: their images; ``proposal``: theirs alone) into the state, in place."""
    at = rows.view(-1, 1)
    outgoing = order[at, proposal.slots]
    order[at, proposal.slots] = proposal.incoming
    # the outgoing position takes the incoming one's place among the unused (no-op where none came in)
    order[at, proposal.targets] = torch.where(proposal.targets == proposal.slots, proposal.incoming, outgoing)
    colours[rows] = proposal.colours


def _check_args(images: object, k: object, budget: object, seed: object, init: Init) -> tuple[int, int]:
    """(H, W) of a uint8 batch after checking every argument; ValueError naming the argument and the fix."""
    check_uint8(images)
    layout = image_layout(images)
    h, w = images.shape[1:3] if layout == "NHWC" else images.shape[2:]
    check_int(k, "k", 1, h * w, high_text=f"H*W = {h * w} (pixel positions per image)")
    check_int(budget, "budget")
    if init is Init.SALIENCY and budget <= GRADIENT_QUERIES:
        raise ValueError(f"budget: {budget!r} is too small for init='saliency'; it must be >= {GRADIENT_QUERIES + 1} "
                         f"(the gradient counts {GRADIENT_QUERIES} queries)")
    check_int(seed, "seed", 0, 2**31 - 1, high_text="2**31-1")
    return h, w


def _ids(image_ids: torch.Tensor | Sequence[int] | None, n: int, device: torch.device) -> torch.Tensor:
    if image_ids is None:
        return torch.arange(n, device=device)
    ids = torch.as_tensor(image_ids, device=device)
    if ids.shape != (n,) or ids.is_floating_point() or ids.dtype == torch.bool:
        raise ValueError(f"image_ids: {ids.dtype} shape {tuple(ids.shape)} does not give one integer id per image "
                         f"({n}); pass int64 (N,) or None")
    return ids.to(torch.int64)


class _State(NamedTuple):
    """An image batch's search state, updated in place."""

    order: torch.Tensor  # (N, P) int64: the positions, the set first (k), then the unused ones
    colours: torch.Tensor  # (N, k) int64: the set's corner codes
    queries: torch.Tensor  # (N,) int64: forward passes spent


def _random_search(model: torch.nn.Module, clean: torch.Tensor, labels: torch.Tensor, keys: torch.Tensor,
                   codes: torch.Tensor, state: _State, passes: int, shape: tuple[int, ...],
                   span: tuple[int, int] | None) -> torch.Tensor:
    """Sparse-RS from ``state`` with at most ``passes`` forward passes per image; returns which images are fooled."""
    order, colours, queries = state
    k = colours.shape[1]
    with torch.inference_mode():
        logits = model(_render(clean, order[:, :k], colours).view(shape))
        check_logits(logits, len(clean), span)
        best, fooled = _margin_and_fooled(logits, labels)
        queries += 1
        for iteration in range(1, passes):
            rows = (~fooled).nonzero().squeeze(1)
            if not len(rows):
                break
            proposal = _propose(keys, order, colours, codes, rows, iteration, swap_count(iteration, passes, k))
            candidates = _render(clean[rows], proposal.positions, proposal.colours).view(-1, *shape[1:])
            margin, hit = _margin_and_fooled(model(candidates), labels[rows])
            queries[rows] += 1
            take = hit | (margin <= best[rows])
            _accept(order, colours, rows[take], _Proposal(*(part[take] for part in proposal)))
            best[rows] = torch.where(take, margin, best[rows])
            fooled[rows] = hit
    return fooled


def _search(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor | Sequence[int], k: int,
            budget: int, seed: int, image_ids: torch.Tensor | Sequence[int] | None, init: Init | str,
            labels_checked: bool = False) -> SparseResult:
    check_model(model)
    init = Init.parse(init)
    h, w = _check_args(images, k, budget, seed, init)
    clean = to_unit(images).view(-1, 3, h * w)  # float (N, 3, P) in [0, 1], contiguous
    n, device = clean.shape[0], clean.device
    labels, span = as_labels(labels, n, device, span=not labels_checked)
    keys = _image_keys(_ids(image_ids, n, device), seed)
    pixels = (images.permute(0, 3, 1, 2) if image_layout(images) == "NHWC" else images).reshape(n, 3, h * w)
    queries = torch.zeros(n, dtype=torch.int64, device=device)
    if n == 0:
        return SparseResult(images.clone(), queries.bool(), queries)
    codes = _corner_codes(pixels).to(torch.int8)
    spent = GRADIENT_QUERIES if init is Init.SALIENCY else 0
    with eval_mode(model):
        if init is Init.SALIENCY:
            grad = _margin_gradient(model, clean, labels, (n, 3, h, w), span)
            order, colours = _saliency_start(keys, codes, k, clean, grad)
        else:
            order, colours = _random_start(keys, codes, k)
        queries += spent
        fooled = _random_search(model, clean, labels, keys, codes, _State(order, colours, queries), budget - spent,
                                (n, 3, h, w), span)
    return SparseResult(_to_images(pixels, order[:, :k], colours, images), fooled, queries)


def _to_images(pixels: torch.Tensor, positions: torch.Tensor, colours: torch.Tensor,
               images: torch.Tensor) -> torch.Tensor:
    """The uint8 examples in ``images``' shape and layout: ``pixels`` (N, 3, P) with the corner colours set."""
    values = _corner_values(colours).mul_(255).to(torch.uint8)
    out = pixels.clone().scatter_(2, positions.unsqueeze(1).expand(-1, 3, -1), values)
    if image_layout(images) == "NHWC":
        return like(out.view(len(out), 3, *images.shape[1:3]).permute(0, 2, 3, 1), images)
    return like(out.view(images.shape), images)


def sparse_search(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor | Sequence[int], k: int,
                  budget: int, seed: int = 0, image_ids: torch.Tensor | Sequence[int] | None = None,
                  init: Init | str = Init.RANDOM) -> SparseResult:
    """Sparse-RS on a batch: examples within k changed pixel positions, whether each fools the model, its queries.

    Args:
        model: a classifier taking float NCHW input in [0, 1] (normalisation inside), run in eval
            mode under ``torch.inference_mode`` (its modules' flags restored afterwards).
        images: uint8 (N, H, W, 3) or (N, 3, H, W).
        labels: the true classes, integer (N,).
        k: pixel positions an example may change, 1..H*W.
        budget: forward passes per image at most (>= 1; >= 4 with ``init="saliency"``); a fooled image
            stops spending.
        seed: keys the draws with the image ids (0..2**31-1).
        image_ids: int64 (N,), key the draws; without them the position in the batch does.
        init: ``"random"`` (black-box) or ``"saliency"`` (one gradient, counted as 3 queries; see the module
            docstring).

    Raises:
        ValueError: naming the argument, for a bad model, images, labels, k, budget, seed, image_ids or init.
    """
    return _search(model, images, labels, k, budget, seed, image_ids, init)


def sparse(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor | Sequence[int], k: int, budget: int,
           seed: int = 0, image_ids: torch.Tensor | Sequence[int] | None = None,
           init: Init | str = Init.RANDOM) -> torch.Tensor:
    """The examples of :func:`sparse_search` alone: uint8 in the input's shape and layout."""
    return _search(model, images, labels, k, budget, seed, image_ids, init).adv


def _run(model, images, labels, image_ids, eps, *, budget, seed, init) -> AttackOutcome:
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not float(eps).is_integer():
        raise ValueError(f"eps: {eps!r} is not a whole number; for the sparse attack eps is the pixel count k, "
                         "e.g. 4 (not 4/255)")
    found = _search(model, images, labels, int(eps), budget, seed, image_ids, init, labels_checked=True)
    return AttackOutcome(found.adv, None, found.success, found.queries)


#: The sparse attack for sweeps: ``[attack] kind = "sparse"`` with ``k = [...]`` (pixel counts: the sweep passes k
#: itself as ``eps``, and the rows' ``eps`` hold it), ``budget`` (forward passes per image and k, the start's
#: gradient counting 3), ``seed`` and ``init`` ("saliency", the default: white-box start; "random": black-box).
SPARSE = AttackSpec(
    name="sparse",
    run=_run,
    params=(
        Param("budget", 1000, (int,), "an integer >= 4 (forward passes per image; a gradient start counts 3)",
              lambda v: v > GRADIENT_QUERIES),
        Param("seed", 0, (int,), "an integer in 0..2**31-1", lambda v: 0 <= v < 2**31),
        Param("init", Init.SALIENCY.value, (str,), f"one of {[m.value for m in Init]}",
              lambda v: v in {m.value for m in Init}),
    ),
    needs_grad=True,  # the saliency start (the worker then keeps TF32 off: exact gradients)
    description="Sparse-RS random search over at most k changed pixel positions (RGB-cube corners), started from "
                "the margin's gradient or at random, budget forward passes per image, draws per (seed, image id)",
    optional_float=False,
    cost=lambda report_float, budget, **_: PassCost(budget, 0, bound=True),
    unit="pixels",
)
