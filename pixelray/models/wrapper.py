"""The wrapper every model is returned in (pixels in, normalisation inside, logits out) and the tiny CNN."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from pixelray.core.check import check_int, is_int

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_RANGE_TOL = 1e-6



def triple(field: str, value: Any, *, positive: bool = False) -> tuple[float, float, float]:
    """Three floats (one per RGB channel) from a tuple, list or tensor, checked."""
    try:
        items = value.tolist() if isinstance(value, torch.Tensor) else list(value)
        out = tuple(float(v) for v in torch.as_tensor(items, dtype=torch.float64).flatten().tolist())
    except (TypeError, ValueError, RuntimeError):
        out = ()
    if len(out) != 3 or any(v != v for v in out) or (positive and min(out) <= 0):
        need = "three positive numbers" if positive else "three numbers"
        raise ValueError(f"{field}: {value!r} is invalid; it must be {need}, one per RGB channel")
    return out  # type: ignore[return-value]


class Classifier(nn.Module):
    """An image classifier on pixels: normalisation inside, logits out.

    Takes uint8 images or float images in [0, 1], shaped (N, H, W, 3) or (N, 3, H, W);
    normalises them with ``mean``/``std`` and returns float logits (N, num_classes).
    NHWC input reaches the network as a channels_last NCHW view (no copy). Works under
    ``torch.inference_mode`` and with autograd (the gradient flows to a float input).

    Attributes:
        net: the wrapped network, which expects normalised NCHW floats.
        name: the model's name in result rows (e.g. ``"resnet101"``).
        num_classes: number of logits.
        mean, std: per-channel normalisation of [0, 1] pixels.
        weights: which weights it holds (``"imagenet"``, ``"default"``, ``"none"``, an entry
            name such as ``"IMAGENET1K_V2"``, ``"checkpoint"`` or ``"factory"``).
        source: where the weights came from (a file, an enum entry, a factory).
        metadata: free-form metadata from a checkpoint's sidecar (empty otherwise).
        check_range: check that float input lies in [0, 1] (one device sync per batch).
    """

    def __init__(
        self,
        net: nn.Module,
        *,
        name: str,
        num_classes: int,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        weights: str = "none",
        source: str = "",
        metadata: Mapping[str, Any] | None = None,
        check_range: bool = True,
    ) -> None:
        super().__init__()
        if not isinstance(net, nn.Module):
            raise ValueError(f"net: {type(net).__name__} is not a torch.nn.Module")
        check_int(num_classes, "num_classes")
        self.net = net
        self.name = str(name)
        self.num_classes = num_classes
        self.mean = triple("mean", mean)
        self.std = triple("std", std, positive=True)
        self.weights = str(weights)
        self.source = str(source)
        self.metadata = dict(metadata or {})
        self.check_range = bool(check_range)
        # Not persistent: the state_dict stays the network's own (with a "net." prefix).
        self.register_buffer("_mean", torch.tensor(self.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("_std", torch.tensor(self.std).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (N, num_classes) of a batch of uint8 or [0, 1] float images."""
        x = _as_nchw(x)
        if x.dtype == torch.uint8:
            # One new tensor, normalised in place: the same arithmetic in the same order as
            # ((x / 255) - mean) / std, so the same bits, without three more full-size tensors.
            return self.net(x.to(self._mean.dtype).div_(255).sub_(self._mean).div_(self._std))
        if x.is_floating_point():
            if self.check_range:
                _check_unit_range(x)
            return self.net((x.to(self._mean.dtype) - self._mean) / self._std)
        raise ValueError(
            f"images: dtype {x.dtype} is not supported; pass uint8 pixels or floats in [0, 1]"
        )

    def extra_repr(self) -> str:
        return f"name={self.name!r}, weights={self.weights!r}, num_classes={self.num_classes}"


def _as_nchw(x: torch.Tensor) -> torch.Tensor:
    """An NCHW view of an NHWC or NCHW batch (NHWC becomes a channels_last view)."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"images: {type(x).__name__} is not a torch.Tensor")
    if x.dim() != 4:
        raise ValueError(
            f"images: shape {tuple(x.shape)} is not a batch; use (N, H, W, 3) or (N, 3, H, W)"
        )
    if x.shape[1] == 3:  # NCHW wins when both dims are 3 (only for 3-pixel-high images)
        return x
    if x.shape[-1] == 3:
        return x.permute(0, 3, 1, 2)
    raise ValueError(
        f"images: shape {tuple(x.shape)} has no RGB axis of size 3; use (N, H, W, 3) or (N, 3, H, W)"
    )


def _check_unit_range(x: torch.Tensor) -> None:
    """Raise ValueError unless every value of float ``x`` is in [0, 1] (NaN fails too)."""
    if x.numel() == 0:
        return
    lo, hi = torch.aminmax(x.detach())
    if not bool((lo >= -_RANGE_TOL) & (hi <= 1 + _RANGE_TOL)):
        raise ValueError(
            f"images: float input must be in [0, 1] (got min {float(lo):.4g}, max {float(hi):.4g}); "
            "pass uint8 pixels or floats divided by 255 - normalisation happens inside the model"
        )


class LabelMap(nn.Module):
    """A head over a subset of a data set's classes, its outputs put at their data set labels.

    A fine-tune with a new head (``head = "replace"``) predicts only the classes present in
    its training images; output ``i`` means data set label ``labels[i]``. This module returns
    logits over the whole label space (``num_classes``), so that ``argmax`` is a data set
    label and a sweep scores it like any other model. Classes the head lacks get a logit far
    below every other one: never predicted, and finite, so a loss over them stays finite.

    Args:
        net: the network; it returns ``len(labels)`` logits.
        labels: the data set label of each output, distinct, in ``0 .. num_classes - 1``.
        num_classes: size of the label space.
    """

    def __init__(self, net: nn.Module, labels: Sequence[int], num_classes: int) -> None:
        super().__init__()
        labels = list(labels)
        if (not is_int(num_classes) or num_classes < 1 or not labels
                or any(not is_int(v) or not 0 <= v < num_classes for v in labels)
                or len(set(labels)) != len(labels)):
            raise ValueError(f"label map: labels {labels!r} must be distinct integers in 0..num_classes-1 "
                             f"(num_classes {num_classes!r}), one per output of the head")
        self.net = net
        self.labels = tuple(labels)
        self.num_classes = num_classes
        self.register_buffer("_index", torch.tensor(labels, dtype=torch.int64), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.net(x)
        out = logits.new_full((logits.shape[0], self.num_classes), torch.finfo(logits.dtype).min / 4)
        return out.index_copy(1, self._index, logits)

    def extra_repr(self) -> str:
        return f"outputs={len(self.labels)}, num_classes={self.num_classes}"


def model_info(model: Classifier) -> dict[str, Any]:
    """The model's identity for result rows: name, weights, num_classes, parameters."""
    return {
        "name": model.name,
        "weights": model.weights,
        "num_classes": model.num_classes,
        "parameters": sum(p.numel() for p in model.net.parameters()),
    }


# ---------------------------------------------------------------------------- tiny


class TinyNet(nn.Module):
    """pixelray's small CNN: four conv blocks with BatchNorm, global average pool, linear head.

    About 60 k parameters; takes 3 x H x W for any H, W >= 16.
    """

    def __init__(self, num_classes: int = 10, width: int = 16) -> None:
        super().__init__()
        check_int(num_classes, "num_classes")
        chans = (3, width, 2 * width, 4 * width, 4 * width)
        layers: list[nn.Module] = []
        for i in range(4):
            layers += [
                nn.Conv2d(chans[i], chans[i + 1], 3, padding=1, bias=False),
                nn.BatchNorm2d(chans[i + 1]),
                nn.ReLU(inplace=True),
            ]
            if i > 0:
                layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(chans[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


def tiny(num_classes: int = 10) -> nn.Module:
    """pixelray's small CNN (:class:`TinyNet`), randomly initialised from the global generator."""
    return TinyNet(num_classes)
