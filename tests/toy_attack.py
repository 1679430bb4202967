"""A toy attack that a test plugs into a sweep through the attack interface alone.

``[attack] kind = "toy_attack:TOY"``: brighten images with an even id and darken those
with an odd id by eps (``shift`` times). No gradient, no randomness.
"""

from __future__ import annotations

import torch

from pixelray.attacks import AttackOutcome, AttackSpec, Param


def toy(images: torch.Tensor, image_ids: torch.Tensor, eps: float, shift: int) -> torch.Tensor:
    """uint8 images moved by ``shift * eps * 255`` (up for even ids, down for odd), clipped."""
    sign = torch.where(image_ids % 2 == 0, 1, -1).view(-1, 1, 1, 1)
    step = round(shift * eps * 255)
    return (images.to(torch.int32) + sign * step).clamp(0, 255).to(torch.uint8)


def _run(model, images, labels, image_ids, eps, *, shift):
    adv = toy(images, image_ids, eps, shift)
    with torch.inference_mode():
        wrong = model(adv).argmax(dim=1) != labels
    return AttackOutcome(adv, wrong, wrong)


TOY = AttackSpec(
    name="toy", run=_run, needs_grad=False, description="brighten even ids, darken odd ids",
    params=(Param("shift", 1, (int,), "an integer >= 1", lambda v: v >= 1),),
)
