"""What every attack shares: input checks, eval mode, uint8 <-> [0, 1], and the interface a sweep calls.

An attack is a pure function on a batch plus an :class:`AttackSpec`: its name in
result rows, its parameters (each with a default and a rule, checked when a config is
read, before any work), whether it needs gradients, and a ``run`` function::

    run(model, images, labels, image_ids, eps, **params) -> AttackOutcome

``images`` are uint8 (N, H, W, 3) or (N, 3, H, W) on the model's device, ``labels`` int64
(N,) on the same device and within the model's classes (the caller checks them, once per
unit: ``run`` is called per batch and should not synchronise with the host), ``eps`` is in
[0, 1] pixel units (k/255), ``image_ids`` key any random draw (so that an image's example
does not depend on its batch). The outcome holds the uint8 examples in the input's layout
and, per image, whether the model misclassifies the uint8 example and (when asked) the
unrounded one. A spec with ``optional_float`` takes ``report_float=False`` and then skips
the forward pass that only the unrounded verdict needs. The worker and the driver know only
this interface: ``[attack] kind`` names a built-in spec (``fgsm``, ``pgd``) or a
``module.path:SPEC`` of the user's own.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from pixelray.core.perturb import image_layout

__all__ = [
    "AttackOutcome", "AttackSpec", "Param", "PassCost", "check_labels", "eval_mode", "predict", "to_uint8", "to_unit",
]


class AttackOutcome(NamedTuple):
    """What an attack's ``run`` returns for a batch.

    Attributes:
        adv: the adversarial images, uint8, in the input's layout.
        success_float: per image, the model misclassifies the unrounded example (bool (N,));
            None when the run was asked not to report it.
        success: per image, the model misclassifies the uint8 example (bool (N,)).
        queries: per image, the forward passes the attack spent (int64 (N,)), from an attack whose cost is a
            bound (a search that stops once the image is fooled); None otherwise.
    """

    adv: torch.Tensor
    success_float: torch.Tensor | None
    success: torch.Tensor
    queries: torch.Tensor | None = None


@dataclass(frozen=True)
class Param:
    """One parameter of an attack as a config gives it.

    Args:
        name: the key in ``[attack]``.
        default: used when the config omits it (None: no value, the attack decides).
        kinds: accepted Python types (bool is never taken for an int).
        rule: what a good value is, for messages (e.g. "an integer >= 1").
        check: returns True for a good value.
    """

    name: str
    default: Any
    kinds: tuple[type, ...]
    rule: str
    check: Callable[[Any], bool] = lambda value: True

    def parse(self, value: Any) -> Any:
        if value is None and self.default is None:
            return None
        ok_type = isinstance(value, self.kinds) and (bool in self.kinds or not isinstance(value, bool))
        if not ok_type or not self.check(value):
            raise ValueError(f"{self.name} = {value!r}: must be {self.rule}")
        return float(value) if float in self.kinds and bool not in self.kinds else value


class PassCost(NamedTuple):
    """What an attack costs per image and eps, in passes of the image through the model.

    Attributes:
        forward: inference forward passes (the verdict on the uint8 example included).
        grad: forward-and-backward passes (the gradient steps).
        bound: an upper bound: the attack may stop sooner for an image (a search that ends once the image is
            fooled); the outcome then says how many it took.
    """

    forward: int
    grad: int
    bound: bool = False


@dataclass(frozen=True)
class AttackSpec:
    """An attack a sweep can run (see the module docstring).

    Args:
        name: its name in result rows (``attack`` column).
        run: ``run(model, images, labels, image_ids, eps, **params) -> AttackOutcome``.
        params: its parameters besides eps.
        needs_grad: it differentiates through the model (the worker then turns TF32 off).
        description: one line for ``--help`` and docs.
        optional_float: ``run`` takes ``report_float`` (bool); with False it may return
            ``success_float=None`` and save the forward pass of the unrounded examples.
        cost: ``cost(report_float=..., **params) -> PassCost``: the passes per image and eps (what ``pixelray
            plan`` counts and a worker reports); None: one forward pass (the verdict), plus one gradient pass
            when ``needs_grad``.
        unit: what the attack's budget counts. ``"linf"``: a radius, ``[attack] eps = [k, ...]``, passed to
            ``run`` as k/255 and written as k/255 in the rows' ``eps``; ``"pixels"``: a number of changed pixel
            positions, ``[attack] k = [k, ...]``, passed to ``run`` and written in ``eps`` as k itself.
    """

    name: str
    run: Callable[..., AttackOutcome]
    params: tuple[Param, ...] = ()
    needs_grad: bool = True
    description: str = ""
    optional_float: bool = False
    cost: Callable[..., PassCost] | None = None
    unit: str = "linf"

    def budget(self, k: int) -> float:
        """What ``run`` takes as ``eps`` (and the rows hold) for the config's step ``k``: k/255, or k pixels."""
        return k / 255 if self.unit == "linf" else float(k)

    def passes(self, params: Mapping[str, Any], report_float: bool) -> PassCost:
        """The passes per image and eps under ``params`` (see ``cost``)."""
        if self.cost is None:
            return PassCost(1, int(self.needs_grad))
        return self.cost(report_float=report_float and self.optional_float, **dict(params))

    def parse(self, given: Mapping[str, Any]) -> dict[str, Any]:
        """Every parameter, from ``given`` or its default, checked; ValueError names the key, value and rule."""
        names = [p.name for p in self.params]
        extra = sorted(set(given) - set(names))
        if extra:
            raise ValueError(f"unknown key(s) {extra} for kind = {self.name!r}; allowed: {sorted(names)}")
        return {p.name: p.parse(given.get(p.name, p.default)) for p in self.params}


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


def check_model(model: object) -> None:
    if not isinstance(model, torch.nn.Module):
        raise ValueError(
            f"model: {type(model).__name__} is not a torch.nn.Module; pass the classifier module "
            "(taking float NCHW input in [0, 1])"
        )


def check_eps(eps: object) -> float:
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


def as_labels(
    labels: torch.Tensor | Sequence[int], n: int, device: torch.device, span: bool = True
) -> tuple[torch.Tensor, tuple[int, int] | None]:
    """Labels as int64 (N,) on ``device``, and their (min, max) for the check against the logits.

    With ``span=False`` (labels checked by the caller, e.g. once per unit) the range is not
    read: reading it synchronises with the device.
    """
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
    lo_hi = (tuple(int(v) for v in torch.aminmax(labels)) if n else (0, 0)) if span else None
    return labels.to(device=device, dtype=torch.int64), lo_hi  # type: ignore[return-value]


def check_labels(labels: torch.Tensor, num_classes: int | None) -> None:
    """ValueError unless every label is a class index of a model with ``num_classes`` logits (one host sync).

    Callers that run an attack batch by batch check the whole unit's labels once with this,
    then call the attack's ``run`` (whose own check would synchronise per batch).
    """
    if labels.dtype == torch.bool or labels.is_floating_point() or labels.is_complex():
        raise ValueError(f"labels: dtype {labels.dtype} is not an integer class index; use int64 class indices")
    if not labels.numel():
        return
    lo, hi = (int(v) for v in torch.aminmax(labels))
    if lo < 0 or (num_classes is not None and hi >= num_classes):
        top = "" if num_classes is None else f" [0, {num_classes - 1}]"
        raise ValueError(f"labels: values span [{lo}, {hi}], outside the model's classes{top}; "
                         "check the label mapping")


def check_logits(logits: torch.Tensor, n: int, span: tuple[int, int] | None) -> None:
    if logits.ndim != 2 or logits.shape[0] != n:
        raise ValueError(
            f"model: output shape {tuple(logits.shape)} is not (N={n}, classes); the model must return logits"
        )
    if span is None:
        return
    lo, hi = span
    if lo < 0 or hi >= logits.shape[1]:
        raise ValueError(
            f"labels: values span [{lo}, {hi}], outside the model's {logits.shape[1]} classes "
            f"[0, {logits.shape[1] - 1}]; check the label mapping"
        )



def like(pixels: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """``pixels`` copied into a uint8 tensor with ``images``' shape and strides."""
    return torch.empty_like(images, dtype=torch.uint8).copy_(pixels)


def predict(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The model's predicted classes (int64 (N,)) on a batch, in eval mode, without grad.

    ``images`` as in :func:`to_unit`; the model's train/eval flags are restored afterwards.
    """
    check_model(model)
    unit = to_unit(images)
    with eval_mode(model), torch.inference_mode():
        logits = model(unit)
    if logits.ndim != 2 or logits.shape[0] != unit.shape[0]:
        raise ValueError(f"model: output shape {tuple(logits.shape)} is not (N={unit.shape[0]}, classes)")
    return logits.argmax(dim=1)


