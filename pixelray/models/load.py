"""``load_model``: any model spec as a :class:`~pixelray.models.wrapper.Classifier`, eval mode, frozen."""

from __future__ import annotations

from pixelray.core.check import check_int
from pixelray.models.build import build_net, load_factory, load_torchvision
from pixelray.models.checkpoints import load_checkpoint
from pixelray.models.registry import Weights, parse_weights, spec_kind, weights_label
from pixelray.models.wrapper import Classifier


def load_model(
    spec: str,
    weights: str | Weights | None = "imagenet",
    *,
    num_classes: int | None = None,
    init_seed: int = 0,
) -> Classifier:
    """Build a :class:`Classifier` from a model spec, in eval mode, parameters frozen.

    Args:
        spec: a torchvision classification model name, ``"tiny"``, ``"checkpoint:PATH"`` or
            ``"module.path:factory"`` (see the module docstring).
        weights: for torchvision models, ``"imagenet"`` (IMAGENET1K_V1, the paper's weights),
            ``"default"`` (torchvision's DEFAULT), an entry name such as ``"IMAGENET1K_V2"``,
            or None/``"none"`` for random init. ``"tiny"`` has no pretrained weights and needs
            ``"none"``; checkpoints and factories bring their own weights and ignore it.
        num_classes: size of the head; by default the weights' (1000 for ImageNet), 10 for tiny.
            A checkpoint, or a factory without a ``num_classes`` parameter, must already match it.
        init_seed: seed of the random init (the same in every process); the global generator
            is left as it was.

    Raises:
        ValueError: a bad spec, weights name, num_classes, or a missing or malformed checkpoint.
        WeightsMissingError: pretrained weights are not in the torch hub cache (no download is tried).
    """
    kind = spec_kind(spec)
    parsed = parse_weights(weights)
    check_int(num_classes, "num_classes", none_ok=True)
    check_int(init_seed, "init_seed", 0, 2**63 - 1, high_text="2**63-1")
    if kind == "torchvision":
        model = load_torchvision(spec, parsed, num_classes, init_seed)
    elif kind == "tiny":
        if parsed is not Weights.NONE:
            raise ValueError(f"weights: tiny has no pretrained {weights_label(parsed)!r} weights; use "
                             "weights='none' (random init) or a trained 'checkpoint:PATH'")
        classes = 10 if num_classes is None else num_classes
        model = Classifier(build_net("tiny", classes, init_seed), name="tiny", num_classes=classes,
                           weights="none", source=f"tiny random init (seed {init_seed})")
    elif kind == "checkpoint":
        model = load_checkpoint(spec, num_classes, init_seed)
    else:
        model = load_factory(spec, num_classes, init_seed)
    model.eval()
    model.requires_grad_(False)
    return model


def load_for_data(spec: str, weights: str | Weights | None, num_classes: int) -> Classifier:
    """The model a sweep evaluates on a data set of ``num_classes`` classes.

    A random init is built with that head; a checkpoint brings its own head, which must match
    (ValueError naming the model and the fix otherwise).
    """
    fit_head = parse_weights(weights) is Weights.NONE and spec_kind(spec) != "checkpoint"
    net = load_model(spec, weights, num_classes=num_classes if fit_head else None)
    if net.num_classes != num_classes:
        raise ValueError(f"model {spec!r} predicts {net.num_classes} classes but the data set has {num_classes}; "
                         "use a model/checkpoint trained for this data set")
    return net
