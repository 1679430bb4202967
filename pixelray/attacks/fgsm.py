"""FGSM (Goodfellow et al.) on a batch of images: pure numerics, no Ray, no I/O.

The attack works in [0, 1] pixel space: the model takes float NCHW input in
[0, 1] and normalises inside (pixelray's model wrapper does). An adversarial
example is an image, so :func:`fgsm` rounds the result to uint8;
:func:`fgsm_float` returns the unrounded example, and :func:`fgsm_with_success`
returns both with the model's predictions, so that the success rate can be
recorded before and after rounding.

Like torchattacks' ``Attack.__call__``, the model runs in eval mode during the
attack and every module's train/eval flag is restored afterwards. Only the
input gets a gradient (``torch.autograd.grad``): no parameter ``.grad`` is
touched and ``requires_grad`` is never changed. The loss is the *summed* cross
entropy, so each image's gradient is that of its own loss whatever the batch
(torchattacks uses the mean: the same signs, up to float rounding, without the
1/N factor that can underflow under mixed precision).

Reproducibility: the step's sign is exact where the gradient is not close to zero; where it
is, float rounding decides. On CPU the examples are deterministic and match torchattacks
bit for bit. Across batch sizes, devices or kernel choices a few near-zero components can
flip (CPU against CUDA: about 1% of values). On CUDA with TF32 convolutions (cuDNN's default)
about 1e-4 of values also change from run to run; with ``torch.backends.cudnn.allow_tf32 =
False`` runs repeat exactly and match torchattacks.

Example:
    >>> import torch
    >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 5))
    >>> images = torch.zeros(2, 4, 4, 3, dtype=torch.uint8)
    >>> adv = fgsm(model, images, torch.tensor([0, 1]), eps=2 / 255)
    >>> adv.dtype, tuple(adv.shape), int(adv.max()) <= 2
    (torch.uint8, (2, 4, 4, 3), True)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F

from pixelray.attacks.base import (
    AttackOutcome,
    AttackSpec,
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
from pixelray.core.perturb import image_layout

__all__ = ["FGSM", "FGSMOutcome", "fgsm", "fgsm_float", "fgsm_with_success"]


class FGSMOutcome(NamedTuple):
    """FGSM examples with the model's predictions on them.

    Attributes:
        adv: the adversarial images, uint8, in the input's layout.
        adv_float: the unrounded adversarial images, float NCHW in [0, 1].
        labels: the labels attacked, int64 (N,).
        pred_clean: the model's predictions on the clean images, int64 (N,).
        pred_float: predictions on ``adv_float``.
        pred_adv: predictions on ``adv`` (after uint8 rounding).
    """

    adv: torch.Tensor
    adv_float: torch.Tensor
    labels: torch.Tensor
    pred_clean: torch.Tensor
    pred_float: torch.Tensor
    pred_adv: torch.Tensor

    @property
    def success(self) -> torch.Tensor:
        """Per image: the uint8 example is misclassified (bool, (N,))."""
        return self.pred_adv != self.labels

    @property
    def success_float(self) -> torch.Tensor:
        """Per image: the unrounded example is misclassified (bool, (N,))."""
        return self.pred_float != self.labels


def _fgsm(
    model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor | Sequence[int], eps: float,
    labels_checked: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(adv_float NCHW, labels int64, clean logits); validates everything (the labels' range only
    unless ``labels_checked``: reading it synchronises with the device)."""
    check_model(model)
    eps = check_eps(eps)
    unit = to_unit(images)
    labels, span = as_labels(labels, unit.shape[0], unit.device, span=not labels_checked)
    if unit.shape[0] == 0:
        return unit.detach().clone(), labels, torch.zeros(0, 1, device=unit.device)
    # Grad must be on even inside a caller's no_grad or inference_mode; an inference
    # tensor cannot enter autograd, so the input is cloned outside inference mode.
    with eval_mode(model), torch.inference_mode(False), torch.enable_grad():
        x = unit.detach().clone().requires_grad_(True)
        logits = model(x)
        check_logits(logits, len(labels), span)
        loss = F.cross_entropy(logits, labels, reduction="sum")
        (grad,) = torch.autograd.grad(loss, x)
    adv = (x.detach() + eps * grad.sign()).clamp_(0, 1)
    return adv, labels, logits.detach()


def fgsm_float(
    model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor | Sequence[int], eps: float
) -> torch.Tensor:
    """Unrounded FGSM examples: ``clip(x + eps * sign(grad_x CE(model(x), y)), 0, 1)``.

    Args:
        model: a classifier taking float NCHW input in [0, 1] and returning logits (N, classes);
            run in eval mode, its modules' train/eval flags restored afterwards.
        images: uint8 (N, H, W, 3) or (N, 3, H, W), or float (N, 3, H, W) in [0, 1];
            on the model's device. Not modified.
        labels: the true class of each image, integer (N,).
        eps: the step in [0, 1] pixel units, e.g. ``2/255``.

    Returns:
        Float NCHW in [0, 1] (float32 for uint8 input, else the input's dtype), on the
        input's device: the model's input space, whatever the input layout.
    """
    return _fgsm(model, images, labels, eps)[0]


def fgsm(
    model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor | Sequence[int], eps: float
) -> torch.Tensor:
    """FGSM examples as images: :func:`fgsm_float` rounded to uint8, in the input's layout.

    Arguments as :func:`fgsm_float`. Returns uint8 with the input's shape, layout and
    memory format (NHWC in, NHWC out; float NCHW in, uint8 NCHW out). ``eps=0``
    returns the input pixels unchanged. An image's example depends only on that image
    and its label, up to float non-associativity in the model's kernels across batch sizes.
    """
    adv = _fgsm(model, images, labels, eps)[0]
    return like(to_uint8(adv, image_layout(images)), images)


def fgsm_with_success(
    model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor | Sequence[int], eps: float
) -> FGSMOutcome:
    """FGSM examples, rounded and not, with the model's predictions on clean, float and uint8.

    Arguments as :func:`fgsm_float`. Costs one forward+backward and two forward passes.
    The success rates before and after rounding are ``outcome.success_float.float().mean()``
    and ``outcome.success.float().mean()``; ``outcome.pred_clean == labels`` selects the
    images the model got right before the attack.
    """
    adv_float, labels, logits = _fgsm(model, images, labels, eps)
    pixels = to_uint8(adv_float)
    pred_float = pred_adv = pred_clean = logits.argmax(dim=1)
    if len(labels):
        with eval_mode(model), torch.inference_mode():
            pred_float = model(adv_float).argmax(dim=1)
            pred_adv = model(pixels.float().div_(255).to(adv_float.dtype)).argmax(dim=1)
    return FGSMOutcome(
        adv=like(pixels.permute(0, 2, 3, 1) if image_layout(images) == "NHWC" else pixels, images),
        adv_float=adv_float,
        labels=labels,
        pred_clean=pred_clean,
        pred_float=pred_float,
        pred_adv=pred_adv,
    )


def _run(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, image_ids: torch.Tensor,
         eps: float, *, report_float: bool = True) -> AttackOutcome:
    """The sweep's FGSM: :func:`fgsm_with_success`'s examples and verdicts, labels checked by the caller,
    and the unrounded examples judged only with ``report_float`` (one forward pass fewer without)."""
    adv_float, labels, _ = _fgsm(model, images, labels, eps, labels_checked=True)
    pixels = to_uint8(adv_float)
    adv = like(pixels.permute(0, 2, 3, 1) if image_layout(images) == "NHWC" else pixels, images)
    if not len(labels):
        none = torch.zeros(0, dtype=torch.bool, device=adv.device)
        return AttackOutcome(adv, none if report_float else None, none)
    success_float = None
    with eval_mode(model), torch.inference_mode():
        if report_float:
            success_float = model(adv_float).argmax(dim=1) != labels
        success = model(pixels.float().div_(255).to(adv_float.dtype)).argmax(dim=1) != labels
    return AttackOutcome(adv, success_float, success)


#: FGSM for sweeps (``[attack] kind = "fgsm"``): no parameters besides eps.
FGSM = AttackSpec(name="fgsm", run=_run, description="one signed-gradient step of size eps (the paper's Exp. 4)",
                  optional_float=True, cost=lambda report_float: PassCost(1 + report_float, 1))
