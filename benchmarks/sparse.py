"""Sparse (L0) attacks at an equal forward-pass budget: pixelray's Sparse-RS beside torchattacks' Pixle,
OnePixel, SparseFool and JSMA, on the same held-out images and model.

The model is the tiny CNN trained for ``--epochs`` on ``--train`` synthetic 32x32 images; the images
attacked are the first ``--images`` held-out ones it classifies correctly. For each k of ``--k``
(pixel positions an example may change) every budgeted attack gets about ``--budget`` forward passes per
image, a backward pass counting as 2 (it costs about two forward passes):

* ``sparse``: :func:`pixelray.attacks.sparse.sparse_search`, black-box, with ``budget`` (exactly);
* ``sparse-saliency``: the same from the gradient start (``init="saliency"``: one forward and one
  backward pass, counted 3 of the budget): the white-box step measured against the search without it;
* ``pixle``: ``torchattacks.Pixle``, patches of at most k pixels (sides 1..floor(sqrt k)), 10 iterations per
  restart and as many restarts as the budget pays for (2 forward passes per iteration: loss and check);
* ``onepixel``: ``torchattacks.OnePixel(pixels=k)``, the smallest population (5 k) and as many
  differential-evolution steps as the budget pays for (none past the first population when 5 k > budget);
* ``sparsefool``, ``jsma``: white-box and not budgeted (``--sparsefool-steps``; JSMA may change k
  channel values, two per step, toward label + 1): their cost is what it is, reported beside the others
  (SparseFool: DeepFool's per-class gradients; JSMA: a forward and 10 backward passes per step).

An example counts as a success only if, rounded to uint8 (an adversarial example is an image), the model
misclassifies it and it differs from its image in at most k pixel positions (Pixle, SparseFool and JSMA
are not k-bounded: ``success_any_l0`` gives their rate without that rule). Passes are counted by hooks on
the model, for every attack alike: a forward hook (images it was given) and, on logits that carry a
gradient, a tensor hook (rows a gradient flows back through: backward passes). Reported per attack and
k: success rate, seconds per image, forward and backward passes per image, forward passes and cost
(forward + 2 x backward) per success. torchattacks draws from NumPy's and torch's global generators: both
are seeded with ``--seed`` before each of its runs. Times are wall-clock on a shared machine: compare them
within one run.

Prints the table as it goes and one JSON line at the end.

Usage:
    python benchmarks/sparse.py                       # 50 images, budget 300, k = 1, 2, 4, 8, 16, 32, 64
    python benchmarks/sparse.py --images 30 --k 4,16 --budget 1000 --skip jsma,onepixel
"""

from __future__ import annotations

import os

# OpenMP threads sleep when they wait instead of spinning (as tests/conftest.py sets for the suite): on a shared
# 2-core machine spinning threads made every attack here up to 30x slower. Read when torch loads: set before it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from typing import NamedTuple  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from timing import device_name  # noqa: E402

from pixelray.attacks.base import predict, to_uint8  # noqa: E402
from pixelray.attacks.sparse import sparse_search  # noqa: E402
from pixelray.models import load_model  # noqa: E402

ATTACKS = ("sparse", "sparse-saliency", "pixle", "onepixel", "sparsefool", "jsma")


class _Passes:
    """Hooks counting the images the model is given (forward passes) and the rows of its logits a gradient
    flows back through (backward passes): counts the attacks cannot set."""

    def __init__(self, model: torch.nn.Module):
        self.forward = self.backward = 0
        model.register_forward_hook(self._seen)

    def _seen(self, _module, args, out) -> None:
        self.forward += args[0].shape[0]
        if out.requires_grad:
            out.register_hook(self._back)

    def _back(self, grad: torch.Tensor) -> None:
        self.backward += grad.shape[0]


def _tiny(train: int, held: int, epochs: int) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """The tiny CNN trained on synthetic images, and ``held`` held-out images (uint8 NCHW) with their labels."""
    from pixelray.datasets.synthetic import make_synthetic
    from pixelray.train.fit import TrainConfig, fit, load_all

    with tempfile.TemporaryDirectory(prefix="pixelray-bench-") as tmp:
        make_synthetic(os.path.join(tmp, "train"), classes=10, images=train, size=32, seed=0, rows_per_shard=500)
        make_synthetic(os.path.join(tmp, "held"), classes=10, images=held, size=32, seed=1, rows_per_shard=500)
        model = load_model("tiny", None, num_classes=10, init_seed=0)
        fit(model, os.path.join(tmp, "train"), TrainConfig(epochs=epochs))
        _, labels, pixels = load_all(os.path.join(tmp, "held"))
    model.check_range = False  # SparseFool evaluates points outside [0, 1] (lam x DeepFool's step)
    return model.eval(), pixels.permute(0, 3, 1, 2).contiguous(), labels


def changed_positions(adv: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """Per image, the pixel positions (h, w) where any channel differs (uint8 NCHW in)."""
    return (adv != images).any(dim=1).flatten(1).sum(dim=1)


def _pixle(model, k: int, budget: int):
    import torchattacks

    side = max(1, math.isqrt(k))
    iterations = 10
    restarts = max(1, (budget - 1) // (2 * iterations))
    return torchattacks.Pixle(model, x_dimensions=(1, side), y_dimensions=(1, side), restarts=restarts,
                              max_iterations=iterations)


def _onepixel(model, k: int, budget: int):
    import torchattacks

    population = 5 * k  # popsize below 5 k still gives one member per bound
    steps = max(0, (budget - population) // (population + 1))
    return torchattacks.OnePixel(model, pixels=k, steps=steps, popsize=1, inf_batch=512)


def _sparsefool(model, steps: int):
    import torchattacks

    return torchattacks.SparseFool(model, steps=steps)


def _jsma(model, k: int, num_features: int):
    import torchattacks

    return torchattacks.JSMA(model, theta=1.0, gamma=min(1.0, k / num_features))  # at most ~k values changed


def _run_torchattacks(attack, images: torch.Tensor, labels: torch.Tensor, seed: int) -> torch.Tensor:
    np.random.seed(seed)
    torch.manual_seed(seed)
    return to_uint8(attack(images.float() / 255, labels))


class _Run(NamedTuple):
    adv: torch.Tensor  # uint8 NCHW
    forward: int  # forward passes (images), all images together
    backward: int  # backward passes (images)
    seconds: float


def _timed(passes: _Passes, attack: Callable[[], torch.Tensor]) -> _Run:
    passes.forward = passes.backward = 0
    start = time.perf_counter()
    adv = attack()
    return _Run(adv, passes.forward, passes.backward, time.perf_counter() - start)


def _scores(model: torch.nn.Module, run: _Run, images: torch.Tensor, labels: torch.Tensor, k: int) -> dict:
    adv, forward, backward, seconds = run
    wrong = predict(model, adv) != labels
    within = changed_positions(adv, images) <= k
    success = int((wrong & within).sum())
    n = len(images)
    return {"success_rate": success / n, "success_any_l0": float(wrong.float().mean()),
            "s_per_image": seconds / n, "forwards_per_image": forward / n, "backwards_per_image": backward / n,
            "forwards_per_success": forward / success if success else None,
            "cost_per_success": (forward + 2 * backward) / success if success else None,
            "median_changed": float(changed_positions(adv, images).float().median())}


_HEAD = (f"{'k':>4} {'attack':<16} {'success':>7} {'any-L0':>6} {'s/image':>8} {'fwd/image':>9} {'bwd/image':>9} "
         f"{'fwd/success':>11} {'cost/success':>12}")


def _line(r: dict) -> str:
    def per(v: float | None) -> str:
        return "-" if v is None else f"{v:.0f}"

    return (f"{r['k']:>4} {r['attack']:<16} {r['success_rate']:>7.3f} {r['success_any_l0']:>6.3f} "
            f"{r['s_per_image']:>8.4f} {r['forwards_per_image']:>9.1f} {r['backwards_per_image']:>9.1f} "
            f"{per(r['forwards_per_success']):>11} {per(r['cost_per_success']):>12}")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=50, help="held-out images attacked (correctly classified)")
    parser.add_argument("--budget", type=int, default=300, help="forward passes per image")
    parser.add_argument("--k", default="1,2,4,8,16,32,64", help="pixel counts, comma-separated")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train", type=int, default=600, help="training images of the tiny CNN")
    parser.add_argument("--epochs", type=int, default=2, help="its training epochs")
    parser.add_argument("--sparsefool-steps", type=int, default=1, help="SparseFool's outer steps (1: ~120 passes)")
    parser.add_argument("--skip", default="", help="attacks left out, comma-separated, of " + ",".join(ATTACKS))
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    ks = [int(v) for v in args.k.split(",")]
    skip = {v for v in args.skip.split(",") if v}
    if args.images < 1 or args.budget < 4 or min(ks) < 1 or skip - set(ATTACKS):
        parser.error(f"--images and every k must be >= 1, --budget >= 4; --skip takes names of {ATTACKS}")
    if args.threads:
        torch.set_num_threads(args.threads)

    model, pixels, labels = _tiny(args.train, max(2 * args.images, 200), args.epochs)
    keep = predict(model, pixels) == labels
    images, labels = pixels[keep][: args.images], labels[keep][: args.images]
    ids = torch.arange(len(images))
    passes = _Passes(model)
    num_features = images[0].numel()

    runs: dict[str, Callable[[int], Callable[[], torch.Tensor]]] = {
        "sparse": lambda k: lambda: sparse_search(model, images, labels, k, args.budget, args.seed, ids).adv,
        "sparse-saliency": lambda k: lambda: sparse_search(model, images, labels, k, args.budget, args.seed, ids,
                                                           init="saliency").adv,
        "pixle": lambda k: lambda: _run_torchattacks(_pixle(model, k, args.budget), images, labels, args.seed),
        "onepixel": lambda k: lambda: _run_torchattacks(_onepixel(model, k, args.budget), images, labels, args.seed),
        "sparsefool": lambda k: lambda: _run_torchattacks(_sparsefool(model, args.sparsefool_steps), images, labels,
                                                          args.seed),
        "jsma": lambda k: lambda: _run_torchattacks(_jsma(model, k, num_features), images, labels, args.seed),
    }
    sparse_search(model, images[:4], labels[:4], 1, 5)  # first calls build thread pools: not timed
    once = functools.cache(lambda name: _timed(passes, runs[name](0)))  # SparseFool: not k-bounded, run once
    rows = []
    print(_HEAD, "-" * len(_HEAD), sep="\n", flush=True)
    for k in ks:
        for name in ATTACKS:
            if name not in skip:
                run = once(name) if name == "sparsefool" else _timed(passes, runs[name](k))
                rows.append({"k": k, "attack": name, **_scores(model, run, images, labels, k)})
                print(_line(rows[-1]), flush=True)
    out = {"benchmark": "sparse", "images": len(images), "size": 32, "budget": args.budget, "seed": args.seed,
           "train": args.train, "epochs": args.epochs, "device": device_name(torch.device("cpu")),
           "threads": torch.get_num_threads(), "load_average": round(os.getloadavg()[0], 2), "results": rows}
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
