"""PGD (Madry et al., L-inf) on a batch of images: pure numerics, no Ray, no I/O.

``steps`` signed-gradient steps of ``step_size``, each projected back into the eps-ball
around the image and into [0, 1]: the same arithmetic, in the same order, as
torchattacks' ``PGD`` (so with ``random_start=False`` the examples match it bit for bit on
CPU). The loss is the summed cross entropy, as in :mod:`pixelray.attacks.fgsm`, so an
image's gradient does not depend on its batch.

The random start is not drawn from a global generator: each entry's offset is a
counter-based hash of (seed, image id, entry), uniform in [-eps, eps], like every draw in
pixelray. So a rerun, a retried unit or another batch size gives the same examples.

Example:
    >>> import torch
    >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 5))
    >>> images = torch.full((2, 4, 4, 3), 100, dtype=torch.uint8)
    >>> adv = pgd(model, images, torch.tensor([0, 1]), eps=4 / 255, step_size=1 / 255, steps=5,
    ...           image_ids=torch.tensor([7, 8]))
    >>> adv.dtype, int((adv.int() - 100).abs().max()) <= 4
    (torch.uint8, True)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from pixelray.attacks.base import (
    AttackOutcome,
    AttackSpec,
    Param,
    PassCost,
    as_labels,
    check_eps,
    check_logits,
    check_model,
    eval_mode,
    like,
    to_uint8,
    to_unit,
)
from pixelray.core.check import check_int
from pixelray.core.perturb import hash64, image_layout

__all__ = ["PGD", "pgd", "pgd_float", "start_offsets"]

_STREAM_START = 0x5047445354  # "PGDST": the stream of the random start's draws
_MUL = -0x29173F0B2C5A8B1B  # an odd 64-bit multiplier (two's complement), spreads consecutive ids


def _shr(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's ``>>`` is arithmetic)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def start_offsets(image_ids: torch.Tensor, shape: Sequence[int], eps: float, seed: int) -> torch.Tensor:
    """Offsets uniform in [-eps, eps], float32 NCHW of ``shape``, each a pure function of (seed, image id, entry).

    The entries are numbered in (H, W, C) order, so that an image's offsets do not
    depend on its layout either.
    """
    n, c, h, w = shape
    ids = image_ids.to(torch.int64).view(-1, 1)
    keys = hash64(hash64(ids * _MUL + (seed * 2 + 1)) + _STREAM_START)
    index = torch.arange(h * w * c, device=ids.device, dtype=torch.int64).view(1, -1)
    bits = hash64(keys + hash64(index))
    unit = _shr(bits, 11).to(torch.float64) * 2.0**-53  # [0, 1), 53 bits
    offsets = ((2 * unit - 1) * eps).to(torch.float32)
    return offsets.view(n, h, w, c).permute(0, 3, 1, 2).contiguous()


def _pgd(
    model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor | Sequence[int], eps: float,
    step_size: float, steps: int, random_start: bool, seed: int, image_ids: torch.Tensor | None,
    labels_checked: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(adv_float NCHW in [0, 1], labels int64); validates everything (the labels' range only unless
    ``labels_checked``)."""
    check_model(model)
    eps, step_size, steps = check_eps(eps), check_eps(step_size), check_int(steps, "steps")
    x0 = to_unit(images)
    labels, span = as_labels(labels, x0.shape[0], x0.device, span=not labels_checked)
    if x0.shape[0] == 0:
        return x0.detach().clone(), labels
    with eval_mode(model), torch.inference_mode(False), torch.enable_grad():
        x0 = x0.detach().clone()  # an inference tensor cannot enter autograd
        adv = x0.clone()
        if random_start:
            ids = torch.arange(len(x0), device=x0.device) if image_ids is None else torch.as_tensor(
                image_ids, device=x0.device)
            if ids.shape != (len(x0),):
                raise ValueError(f"image_ids: shape {tuple(ids.shape)} does not match {len(x0)} images")
            adv = torch.clamp(adv + start_offsets(ids, x0.shape, eps, seed), min=0, max=1).detach()
        for step in range(steps):
            adv.requires_grad_(True)
            logits = model(adv)
            if step == 0:
                check_logits(logits, len(labels), span)
            loss = F.cross_entropy(logits, labels, reduction="sum")
            (grad,) = torch.autograd.grad(loss, adv)
            adv = adv.detach() + step_size * grad.sign()
            delta = torch.clamp(adv - x0, min=-eps, max=eps)
            adv = torch.clamp(x0 + delta, min=0, max=1).detach()
    return adv, labels


def pgd_float(
    model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor | Sequence[int], eps: float,
    step_size: float, steps: int, random_start: bool = True, seed: int = 0, image_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Unrounded PGD examples, float NCHW in [0, 1] (arguments as :func:`pgd`)."""
    return _pgd(model, images, labels, eps, step_size, steps, random_start, seed, image_ids)[0]


def pgd(
    model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor | Sequence[int], eps: float,
    step_size: float, steps: int, random_start: bool = True, seed: int = 0, image_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """PGD examples as images: uint8 in the input's shape, layout and memory format.

    Args:
        model: a classifier taking float NCHW input in [0, 1] (normalisation inside), in eval
            mode during the attack (its modules' flags restored afterwards).
        images: uint8 (N, H, W, 3) or (N, 3, H, W), or float (N, 3, H, W) in [0, 1].
        labels: the true classes, integer (N,).
        eps: the L-inf radius in [0, 1] pixel units, e.g. 8/255.
        step_size: each step's size in [0, 1] pixel units, e.g. 2/255.
        steps: number of steps (>= 1).
        random_start: start from a uniform point of the eps-ball (drawn per (seed, image id)).
        seed: the random start's seed.
        image_ids: int64 (N,), key the random start; without them the position in the batch does.
    """
    adv = _pgd(model, images, labels, eps, step_size, steps, random_start, seed, image_ids)[0]
    return like(to_uint8(adv, image_layout(images)), images)


def _run(model, images, labels, image_ids, eps, *, steps, step, random_start, seed,
         report_float: bool = True) -> AttackOutcome:
    step_size = step / 255 if step is not None else min(1.0, 2.5 * eps / steps)
    adv_float, labels = _pgd(model, images, labels, eps, step_size, steps, random_start, seed, image_ids,
                             labels_checked=True)
    pixels = to_uint8(adv_float)
    success_float = None
    with eval_mode(model), torch.inference_mode():
        if report_float:
            success_float = model(adv_float).argmax(dim=1) != labels
        success = model(pixels.float().div_(255)).argmax(dim=1) != labels
    adv = like(pixels.permute(0, 2, 3, 1) if image_layout(images) == "NHWC" else pixels, images)
    return AttackOutcome(adv, success_float, success)


#: PGD for sweeps: ``[attack] kind = "pgd"``, ``steps``, ``step`` (k/255; default 2.5 x eps / steps),
#: ``random_start``, ``seed``.
PGD = AttackSpec(
    name="pgd",
    run=_run,
    params=(
        Param("steps", 10, (int,), "an integer >= 1", lambda v: v >= 1),
        Param("step", None, (int, float), "a step in pixel units k/255 in (0, 255], e.g. 2, or omit it for "
              "2.5 x eps / steps", lambda v: 0 < v <= 255),
        Param("random_start", True, (bool,), "true or false"),
        Param("seed", 0, (int,), "an integer in 0..2**31-1", lambda v: 0 <= v < 2**31),
    ),
    description="steps of projected signed gradient inside the eps-ball, random start per (seed, image id)",
    optional_float=True,
    cost=lambda report_float, steps, **_: PassCost(1 + report_float, steps),
)
