"""The model registry: torchvision names, checkpoints, user factories; normalisation inside.

Every model is returned as a :class:`Classifier`: it takes pixels (uint8, or floats in
[0, 1]; NHWC or NCHW), normalises them with its weights' mean/std and returns logits.
So perturbations and attacks work in pixel space and never see normalisation.

A model spec is one of:

- a torchvision classification model name (``"resnet101"``, ``"densenet121"``, ...);
- ``"tiny"``: pixelray's own small CNN (the demo and the tests);
- ``"checkpoint:PATH"``: a state_dict saved by :func:`save_checkpoint` with its JSON sidecar; PATH may
  also be a run directory of ``pixelray train-augment`` (its ``model.pt`` with ``pixelray.json``);
- ``"module.path:factory"``: any user model; ``factory()`` returns an ``nn.Module``.

Pretrained weights are read from the torch hub cache (``$TORCH_HOME/hub/checkpoints``) and
never downloaded by :func:`load_model`: a missing file fails at once with
:class:`WeightsMissingError`, which says the file and the fix. :func:`download_weights`
(``pixelray weights download``) fills the cache where there is internet.

Random init is deterministic: the same spec and ``init_seed`` give the same weights in every
process, and the caller's global random state is left untouched.

Example:
    >>> import torch
    >>> model = load_model("tiny", weights=None, num_classes=10)
    >>> model(torch.zeros(2, 32, 32, 3, dtype=torch.uint8)).shape
    torch.Size([2, 10])
"""

from __future__ import annotations

from pixelray.models.checkpoints import (
    RUN_MODEL_FILE,
    RUN_SIDECAR_FILE,
    checkpoint_file,
    checkpoint_sidecar,
    save_checkpoint,
    sidecar_path,
)
from pixelray.models.download import download_weights
from pixelray.models.load import load_for_data, load_model
from pixelray.models.registry import (
    PRESETS,
    Weights,
    WeightsDownloadError,
    WeightsMissingError,
    cached_weights,
    check_weights_entry,
    require_weights,
    resolve_models,
    torchvision_models,
    weights_file,
)
from pixelray.models.wrapper import IMAGENET_MEAN, IMAGENET_STD, Classifier, LabelMap, TinyNet, model_info, tiny

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "PRESETS",
    "RUN_MODEL_FILE",
    "RUN_SIDECAR_FILE",
    "Classifier",
    "LabelMap",
    "TinyNet",
    "Weights",
    "WeightsDownloadError",
    "WeightsMissingError",
    "cached_weights",
    "checkpoint_file",
    "checkpoint_sidecar",
    "check_weights_entry",
    "download_weights",
    "load_for_data",
    "load_model",
    "model_info",
    "require_weights",
    "resolve_models",
    "save_checkpoint",
    "sidecar_path",
    "tiny",
    "torchvision_models",
    "weights_file",
]


