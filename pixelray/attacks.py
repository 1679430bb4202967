"""FGSM on a batch of images: pure numerics, no Ray, no I/O.

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

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import NamedTuple

import torch
import torch.nn.functional as F

from pixelray.perturb import image_layout

__all__ = [
    "FGSMOutcome",
    "eval_mode",
    "fgsm",
    "fgsm_float",
    "fgsm_with_success",
    "predict",
    "to_uint8",
    "to_unit",
]


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


@contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Put every module of ``model`` in eval mode; restore each module's own flag on exit."""
    flags = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in flags:
            module.training = training


def _check_model(model: object) -> None:
    if not isinstance(model, torch.nn.Module):
        raise ValueError(
            f"model: {type(model).__name__} is not a torch.nn.Module; pass the classifier module "
            "(taking float NCHW input in [0, 1])"
        )


def _check_eps(eps: object) -> float:
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps):
        raise ValueError(f"eps: {eps!r} is not a finite number; give a step in [0, 1] pixel units, e.g. 2/255")
    if not 0 <= eps <= 1:
        hint = f" (did you mean {eps:g}/255?)" if 1 < eps <= 255 else ""
        raise ValueError(f"eps: {eps!r} is outside [0, 1]; give it in [0, 1] pixel units, e.g. 2/255{hint}")
    return float(eps)


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """The model input for a batch: float NCHW in [0, 1], validated.

    The result is contiguous NCHW whatever the input's layout or memory format, so that
    the model runs the same kernels, and gives the same numbers, for every layout.

    Args:
        images: uint8 (N, H, W, 3) or (N, 3, H, W), divided by 255 to float32;
            or a floating tensor (N, 3, H, W) in [0, 1], kept in its dtype.

    Raises:
        ValueError: naming ``images``, for another dtype, shape or a value outside [0, 1].
    """
    if not isinstance(images, torch.Tensor):
        raise ValueError(f"images: {type(images).__name__} is not a tensor; pass a torch.Tensor batch")
    if images.dtype == torch.uint8:
        pixels = images.permute(0, 3, 1, 2) if image_layout(images) == "NHWC" else images
        return pixels.to(torch.float32, memory_format=torch.contiguous_format).div_(255)
    if not images.is_floating_point():
        raise ValueError(
            f"images: dtype {images.dtype} is not supported; use uint8 pixels or float values in [0, 1]"
        )
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(
            f"images: float images must be (N, 3, H, W), got shape {tuple(images.shape)}; "
            "permute NHWC to NCHW or pass uint8 pixels"
        )
    if images.numel():
        lo, hi = (float(v) for v in torch.aminmax(images))
        if not (0 <= lo and hi <= 1):  # also catches NaN
            raise ValueError(
                f"images: float values span [{lo:g}, {hi:g}], outside [0, 1]; pass pixels in [0, 1] "
                "(divide uint8 by 255, and normalise inside the model, not before)"
            )
    return images.contiguous()


def to_uint8(unit: torch.Tensor, layout: str = "NCHW") -> torch.Tensor:
    """Round float NCHW images in [0, 1] to uint8 pixels, ``(x * 255).round()``, in ``layout``."""
    if layout not in ("NCHW", "NHWC"):
        raise ValueError(f"layout: {layout!r} is unknown; allowed: 'NCHW', 'NHWC'")
    pixels = unit.detach().float().mul(255).round_().clamp_(0, 255).to(torch.uint8)
    return pixels.permute(0, 2, 3, 1) if layout == "NHWC" else pixels


def _as_labels(
    labels: torch.Tensor | Sequence[int], n: int, device: torch.device
) -> tuple[torch.Tensor, tuple[int, int]]:
    """Labels as int64 (N,) on ``device``, and their (min, max) for the check against the logits."""
    if isinstance(labels, torch.Tensor):
        if labels.dtype == torch.bool or labels.is_floating_point() or labels.is_complex():
            raise ValueError(
                f"labels: dtype {labels.dtype} is not an integer class index; use int64 class indices"
            )
    else:
        try:
            labels = torch.as_tensor(labels, dtype=torch.int64)
        except (TypeError, ValueError, RuntimeError):
            raise ValueError(f"labels: {labels!r} is not a sequence of class indices") from None
    if labels.shape != (n,):
        raise ValueError(
            f"labels: shape {tuple(labels.shape)} does not match {n} images; pass one class index per image (N,)"
        )
    # Read the range now, where the device queue is short, not between forward and backward.
    span = tuple(int(v) for v in torch.aminmax(labels)) if n else (0, 0)
    return labels.to(device=device, dtype=torch.int64), span  # type: ignore[return-value]


def _check_logits(logits: torch.Tensor, n: int, span: tuple[int, int]) -> None:
    if logits.ndim != 2 or logits.shape[0] != n:
        raise ValueError(
            f"model: output shape {tuple(logits.shape)} is not (N={n}, classes); the model must return logits"
        )
    lo, hi = span
    if lo < 0 or hi >= logits.shape[1]:
        raise ValueError(
            f"labels: values span [{lo}, {hi}], outside the model's {logits.shape[1]} classes "
            f"[0, {logits.shape[1] - 1}]; check the label mapping"
        )


def _fgsm(
    model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor | Sequence[int], eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(adv_float NCHW, labels int64, clean logits); validates everything."""
    _check_model(model)
    eps = _check_eps(eps)
    unit = to_unit(images)
    labels, span = _as_labels(labels, unit.shape[0], unit.device)
    if unit.shape[0] == 0:
        return unit.detach().clone(), labels, torch.zeros(0, 1, device=unit.device)
    # Grad must be on even inside a caller's no_grad or inference_mode; an inference
    # tensor cannot enter autograd, so the input is cloned outside inference mode.
    with eval_mode(model), torch.inference_mode(False), torch.enable_grad():
        x = unit.detach().clone().requires_grad_(True)
        logits = model(x)
        _check_logits(logits, len(labels), span)
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
    return _like(to_uint8(adv, image_layout(images)), images)


def _like(pixels: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """``pixels`` copied into a uint8 tensor with ``images``' shape and strides."""
    return torch.empty_like(images, dtype=torch.uint8).copy_(pixels)


def predict(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The model's predicted classes (int64 (N,)) on a batch, in eval mode, without grad.

    ``images`` as in :func:`to_unit`; the model's train/eval flags are restored afterwards.
    """
    _check_model(model)
    unit = to_unit(images)
    with eval_mode(model), torch.inference_mode():
        logits = model(unit)
    if logits.ndim != 2 or logits.shape[0] != unit.shape[0]:
        raise ValueError(f"model: output shape {tuple(logits.shape)} is not (N={unit.shape[0]}, classes)")
    return logits.argmax(dim=1)


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
        adv=_like(pixels.permute(0, 2, 3, 1) if image_layout(images) == "NHWC" else pixels, images),
        adv_float=adv_float,
        labels=labels,
        pred_clean=pred_clean,
        pred_float=pred_float,
        pred_adv=pred_adv,
    )
