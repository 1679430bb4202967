"""The sparse (L0) attack: at most k positions, real successes, the budget a forward hook counts, draws per
(seed, image id), and a success rate at least that of torchattacks' sparse attacks at the same budget."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchattacks
from exact_models import ExactNet
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from torch import nn

from pixelray.attacks.base import AttackOutcome, to_uint8
from pixelray.attacks.sparse import SPARSE, sparse, sparse_search, swap_count
from pixelray.models import load_model


def exact_batch(n: int, seed: int) -> tuple[ExactNet, torch.Tensor, torch.Tensor]:
    """ExactNet (exact logits whatever the batch), random uint8 NHWC 32x32 images and the labels it gives them."""
    model = ExactNet(0)
    images = torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8))
    return model, images, np_predict(model, images.numpy())


def np_predict(model: nn.Module, images: np.ndarray) -> torch.Tensor:
    """The model's classes for uint8 NHWC NumPy images (the test's own route to the model: float NCHW / 255)."""
    with torch.no_grad():
        return model(torch.from_numpy(images).permute(0, 3, 1, 2).float().div(255)).argmax(1)


def changed(adv: np.ndarray, images: np.ndarray) -> np.ndarray:
    """bool (N, H, W): the positions where any channel differs (NHWC NumPy)."""
    return (adv != images).any(axis=-1)


class Seen:
    """A forward hook keeping every batch the model is given, and whether it ran in eval mode."""

    def __init__(self, model: nn.Module):
        self.batches: list[torch.Tensor] = []
        self.training: list[bool] = []
        self.handle = model.register_forward_hook(self._record)

    def _record(self, module, args, _out) -> None:
        self.batches.append(args[0].detach().clone())
        self.training.append(module.training)


def test_examples_change_at_most_k_positions_in_either_layout():
    model, images, labels = exact_batch(10, seed=1)
    for k in (1, 7, 40):
        found = sparse_search(model, images, labels, k, budget=25, seed=3)
        adv = found.adv
        assert adv.dtype == torch.uint8 and adv.shape == images.shape
        per_image = changed(adv.numpy(), images.numpy()).sum(axis=(1, 2))
        assert per_image.max() <= k and per_image.min() >= 1
        nchw = images.permute(0, 3, 1, 2).contiguous()
        other = sparse_search(model, nchw, labels, k, budget=25, seed=3)
        assert other.adv.shape == nchw.shape
        assert torch.equal(other.adv.permute(0, 2, 3, 1), adv)
        assert torch.equal(other.success, found.success) and torch.equal(other.queries, found.queries)
        assert torch.equal(sparse(model, images, labels, k, budget=25, seed=3), adv)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(h=st.integers(1, 6), w=st.integers(1, 6), n=st.integers(1, 4), data=st.data(),
       seed=st.integers(0, 2**31 - 1), budget=st.integers(1, 12), nchw=st.booleans())
def test_at_most_k_corner_coloured_positions_for_any_small_batch(h, w, n, data, seed, budget, nchw):
    assume(not (nchw and w == 3))  # (N, 3, H, 3) reads as NHWC (image_layout's rule for the ambiguous shape)
    k = data.draw(st.integers(1, h * w), label="k")
    rng = np.random.default_rng(seed)
    # pixels often already at 0 or 255: a new colour must still change them
    images = rng.choice(np.array([0, 255, 7, 128], dtype=np.uint8), size=(n, h, w, 3))
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * h * w, 3))
    with torch.no_grad():
        model[1].weight.copy_(torch.from_numpy(rng.normal(size=(3, 3 * h * w))))
    labels = torch.from_numpy(rng.integers(0, 3, n))
    given_images = torch.from_numpy(images)
    if nchw:
        given_images = given_images.permute(0, 3, 1, 2).contiguous()
    found = sparse_search(model, given_images, labels, k, budget, seed=seed % 1000)
    adv = found.adv.permute(0, 2, 3, 1).numpy() if nchw else found.adv.numpy()
    mask = changed(adv, images)
    assert found.adv.dtype == torch.uint8 and found.adv.shape == given_images.shape
    assert mask.sum(axis=(1, 2)).max() <= k and mask.sum(axis=(1, 2)).min() >= 1  # no change is wasted
    assert np.isin(adv[mask], [0, 255]).all()  # changed pixels take corners of the RGB cube
    assert ((1 <= found.queries) & (found.queries <= budget)).all()
    assert (found.queries[~found.success] == budget).all()


def test_successes_are_real_and_failures_are_classified_correctly():
    model, images, labels = exact_batch(24, seed=2)
    k = 12
    found = sparse_search(model, images, labels, k, budget=60, image_ids=torch.arange(100, 124))
    assert 0 < int(found.success.sum()) < 24  # both kinds are checked
    clean, adv = images.numpy(), found.adv.numpy()
    rebuilt = clean.copy()
    mask = changed(adv, clean)
    rebuilt[mask] = adv[mask]  # the changed pixels, read back from the examples, put on the clean images
    assert (mask.sum(axis=(1, 2)) <= k).all()
    pred = np_predict(model, rebuilt)
    assert (pred[found.success] != labels[found.success]).all()
    assert (pred[~found.success] == labels[~found.success]).all()


def _owner(batch: torch.Tensor, clean: torch.Tensor, k: int) -> torch.Tensor:
    """For each image of a forward batch (float NCHW), which clean image (uint8 NCHW) it is: the one it differs
    from in the fewest positions (at most k: the test checks it)."""
    pixels = to_uint8(batch)
    diff = (pixels.unsqueeze(1) != clean.unsqueeze(0)).any(dim=2).flatten(2).sum(dim=2)  # (batch, images)
    fewest, owner = diff.min(dim=1)
    assert int(fewest.max()) <= k
    return owner


def test_budget_holds_and_fooled_images_stop_spending():
    model, images, labels = exact_batch(16, seed=5)
    nchw = images.permute(0, 3, 1, 2).contiguous()
    k, budget = 10, 40
    seen = Seen(model)
    found = sparse_search(model, nchw, labels, k, budget)
    seen.handle.remove()
    counts = torch.zeros(16, dtype=torch.int64)
    last = {}
    for batch in seen.batches:
        owners = _owner(batch, nchw, k)
        counts += torch.bincount(owners, minlength=16)
        last.update({int(i): row for i, row in zip(owners, batch, strict=True)})
    assert torch.equal(counts, found.queries)
    assert int(found.queries.max()) <= budget
    assert len(seen.batches) <= budget
    assert 0 < int(found.success.sum()) < 16
    assert (found.queries[~found.success] == budget).all()
    assert int(found.queries[found.success].min()) < budget  # fooled images stopped early
    for i in found.success.nonzero().flatten().tolist():  # the last image a fooled one sent is its example
        assert torch.equal(to_uint8(last[i].unsqueeze(0))[0], found.adv[i])


class Constant(nn.Module):
    """Logits that ignore the image: class 0 by a margin of 1, so every proposal ties and is accepted."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tensor([1.0, 0.0, 0.0]).expand(len(x), 3) + 0 * x.flatten(1)[:, :1]


def test_each_step_swaps_the_scheduled_number_of_positions_and_ties_are_accepted():
    images = torch.from_numpy(np.random.default_rng(4).integers(1, 255, (2, 3, 16, 16), dtype=np.uint8))
    k, budget = 40, 1000
    model = Constant()
    seen = Seen(model)
    found = sparse_search(model, images, torch.tensor([0, 0]), k, budget)
    seen.handle.remove()
    assert not found.success.any() and (found.queries == budget).all() and len(seen.batches) == budget
    sets = [(to_uint8(batch) != images).any(dim=1).flatten(1) for batch in seen.batches]  # (2, P) each
    assert all(int(s.sum(dim=1).max()) == k == int(s.sum(dim=1).min()) for s in sets)
    for step in range(1, 40):  # each candidate is the previous one (accepted: a tie) with m positions swapped
        swapped = (sets[step - 1] & ~sets[step]).sum(dim=1)
        assert swapped.tolist() == [swap_count(step, budget, k)] * 2
    assert torch.equal(to_uint8(seen.batches[-1]), found.adv)  # the last candidate, accepted, is the example


def test_draws_depend_on_seed_and_image_id_not_on_the_batch():
    model, images, labels = exact_batch(13, seed=7)
    ids = torch.arange(500, 513)
    k, budget = 6, 30
    whole = sparse_search(model, images, labels, k, budget, seed=11, image_ids=ids)
    again = sparse_search(model, images, labels, k, budget, seed=11, image_ids=ids)
    assert all(torch.equal(a, b) for a, b in zip(whole, again, strict=True))
    parts = [sparse_search(model, images[s:s + 4], labels[s:s + 4], k, budget, seed=11, image_ids=ids[s:s + 4])
             for s in range(0, 13, 4)]
    for field in range(3):
        assert torch.equal(torch.cat([p[field] for p in parts]), whole[field])
    order = torch.randperm(13, generator=torch.Generator().manual_seed(0))
    shuffled = sparse_search(model, images[order], labels[order], k, budget, seed=11, image_ids=ids[order])
    for field in range(3):
        assert torch.equal(shuffled[field], whole[field][order])
    other = sparse_search(model, images, labels, k, budget, seed=12, image_ids=ids)
    assert (changed(other.adv.numpy(), whole.adv.numpy()).sum(axis=(1, 2)) > 0).all()  # another search per image
    # without ids the position in the batch keys the draws
    plain = sparse_search(model, images, labels, k, budget, seed=11)
    assert torch.equal(plain.adv, sparse_search(model, images, labels, k, budget, seed=11,
                                                 image_ids=torch.arange(13)).adv)


@pytest.mark.parametrize("init", ["random", "saliency"])
def test_model_runs_in_eval_mode_and_keeps_its_flags(init):
    model = load_model("tiny", None, num_classes=10, init_seed=1).train()
    images = torch.randint(0, 256, (3, 16, 16, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    seen = Seen(model)
    sparse(model, images, torch.tensor([1, 2, 3]), 2, budget=5, init=init)
    assert seen.training and not any(seen.training)
    assert model.training and all(m.training for m in model.modules())
    with torch.inference_mode():  # a caller in inference mode: the gradient start still works
        labels = torch.tensor([1, 2, 3])
        assert sparse(model, images, labels, 2, budget=5, init=init).shape == images.shape


def test_swap_count_follows_the_sparse_rs_schedule():
    # alpha_init 0.3 of k, halved after 0.5% of the budget, ... a twentieth after 80% (Sparse-RS, L0)
    assert [swap_count(i, 10000, 100) for i in (1, 50, 51, 200, 201, 500, 501, 1000, 2000, 4000, 6000, 8000, 8001)] \
        == [15, 15, 7, 7, 6, 6, 5, 5, 3, 3, 2, 2, 1]
    assert swap_count(1, 10, 1) == 1 and swap_count(9, 10, 3) == 1


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"k": 0}, "k: 0 is invalid; it must be an integer in 1..H\\*W = 64"),
    ({"k": 65}, "k: 65 is invalid"),
    ({"k": 2.0}, "k: 2.0 is invalid"),
    ({"budget": 0}, "budget: 0 is invalid; it must be an integer >= 1"),
    ({"budget": True}, "budget: True is invalid"),
    ({"seed": -1}, "seed: -1 is invalid"),
    ({"images": torch.zeros(2, 8, 8, 3)}, "images: expected dtype uint8"),
    ({"images": torch.zeros(2, 8, 8, 4, dtype=torch.uint8)}, "images: expected a batch"),
    ({"labels": torch.tensor([0])}, "labels: shape"),
    ({"labels": torch.tensor([0, 9])}, "labels: values span \\[0, 9\\], outside the model's 4 classes"),
    ({"labels": torch.tensor([0, 9]), "init": "saliency"}, "labels: values span \\[0, 9\\]"),
    ({"image_ids": torch.tensor([1, 2, 3])}, "image_ids:"),
    ({"model": lambda x: x}, "model: function is not a torch.nn.Module"),
    ({"init": "gradient"}, "init: 'gradient' is unknown; allowed: \\['random', 'saliency'\\]"),
    ({"init": "saliency", "budget": 3}, "budget: 3 is too small for init='saliency'; it must be >= 4"),
])
def test_bad_arguments_fail_naming_the_argument(kwargs, message):
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 64, 4))
    args = {"model": model, "images": torch.zeros(2, 8, 8, 3, dtype=torch.uint8), "labels": torch.tensor([0, 1]),
            "k": 2, "budget": 5, **kwargs}
    with pytest.raises(ValueError, match=message):
        sparse_search(**args)


def test_spec_takes_k_through_eps_and_checks_its_params():
    model, images, labels = exact_batch(5, seed=9)
    ids = torch.arange(5) + 40
    for init in ("random", "saliency"):
        out = SPARSE.run(model, images, labels, ids, 4.0, **SPARSE.parse({"budget": 20, "seed": 2, "init": init}))
        assert isinstance(out, AttackOutcome) and out.success_float is None
        found = sparse_search(model, images, labels, 4, 20, seed=2, image_ids=ids, init=init)
        assert torch.equal(out.adv, found.adv) and torch.equal(out.success, found.success)
        assert torch.equal(out.queries, found.queries)  # the sweep counts the passes the search spent
    assert SPARSE.parse({}) == {"budget": 1000, "seed": 0, "init": "saliency"}
    assert SPARSE.needs_grad and not SPARSE.optional_float and SPARSE.unit == "pixels"
    assert SPARSE.passes({"budget": 50, "seed": 0, "init": "random"}, False) == (50, 0, True)  # a bound
    for bad, said in (({"budget": 3}, "budget = 3: must be an integer >= 4"), ({"init": "grad"}, "init = 'grad'")):
        with pytest.raises(ValueError, match=said):
            SPARSE.parse(bad)
    with pytest.raises(ValueError, match="eps: 0.0156.* pixel count k"):
        SPARSE.run(model, images, labels, ids, 4 / 255, budget=5, seed=0, init="random")


# ------------------------------------------------------------------ against torchattacks, same forward passes


class _Cost:
    """Forward hook: images given to the model (forward passes), and, through a hook on the logits, the rows a
    gradient flows back through (backward passes). Cost in forward passes: forward + 2 x backward."""

    def __init__(self, model: nn.Module):
        self.forward = self.backward = 0
        self.handle = model.register_forward_hook(self._seen)

    def _seen(self, _m, args, out) -> None:
        self.forward += args[0].shape[0]
        if out.requires_grad:
            out.register_hook(self._back)

    def _back(self, grad: torch.Tensor) -> None:
        self.backward += grad.shape[0]

    def per_image(self, n: int) -> float:
        return (self.forward + 2 * self.backward) / n


@pytest.fixture(scope="module")
def trained(tiny_checkpoints, tmp_path_factory):
    """The session's tiny CNN and 24 held-out images (uint8 NCHW) it classifies correctly, with their labels."""
    from pixelray.datasets.synthetic import make_synthetic
    from pixelray.train.fit import load_all

    model = load_model(tiny_checkpoints[0])
    model.check_range = False  # SparseFool evaluates points outside [0, 1]
    held = tmp_path_factory.mktemp("held") / "synthetic"
    make_synthetic(held, classes=10, images=80, size=32, seed=1, rows_per_shard=80)
    _, labels, pixels = load_all(str(held))
    images = pixels.permute(0, 3, 1, 2).contiguous()
    with torch.inference_mode():
        right = model(images).argmax(1) == labels
    return model, images[right][:24], labels[right][:24]


def _rate(model, adv: torch.Tensor, images: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    """Share of uint8 examples misclassified and within k changed positions (counted here, in NumPy)."""
    within = changed(adv.permute(0, 2, 3, 1).numpy(), images.permute(0, 2, 3, 1).numpy()).sum(axis=(1, 2)) <= k
    wrong = np_predict(model, adv.permute(0, 2, 3, 1).numpy()) != labels
    return float((wrong & torch.from_numpy(within)).float().mean())


def _theirs(attack, images, labels) -> torch.Tensor:
    np.random.seed(0)  # torchattacks draws from the global generators
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return to_uint8(attack(images.float() / 255, labels))


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # SparseFool's NumPy 2 copy-keyword warning
def test_success_at_least_that_of_torchattacks_at_the_same_budget(trained):
    """Each attack's cost is counted by hooks: forward passes, plus 2 per backward pass (white-box ones)."""
    model, images, labels = trained
    n, budget, k = len(images), 150, 24
    cost = _Cost(model)

    def measure(run) -> tuple[torch.Tensor, float]:
        cost.forward = cost.backward = 0
        adv = run()
        return adv, cost.per_image(n)

    side = int(k**0.5)
    runs = {
        "sparse": lambda: sparse(model, images, labels, k, budget),
        # 1 + 2 forward passes per iteration (loss, check), patches of at most k pixels
        "pixle": lambda: _theirs(torchattacks.Pixle(
            model, x_dimensions=(1, side), y_dimensions=(1, side), restarts=(budget - 1) // 20, max_iterations=10),
            images, labels),
        # a population of 5 k: (steps + 1) x 5 k + steps forward passes
        "onepixel": lambda: _theirs(torchattacks.OnePixel(
            model, pixels=k, popsize=1, steps=(budget - 5 * k) // (5 * k + 1)), images, labels),
        # neither k- nor budget-bounded: one step keeps its cost under the budget
        "sparsefool": lambda: _theirs(torchattacks.SparseFool(model, steps=1), images, labels),
    }
    measured = {name: measure(run) for name, run in runs.items()}
    cost.handle.remove()
    rates = {name: _rate(model, adv, images, labels, k) for name, (adv, _) in measured.items()}
    spent = {name: spent for name, (_, spent) in measured.items()}
    assert max(spent.values()) <= budget, spent
    best = max(rates[name] for name in ("pixle", "onepixel", "sparsefool"))
    assert rates["sparse"] >= best - 2 / n, (rates, spent)
    assert rates["sparse"] > 0.1  # not a comparison of zeros


def test_saliency_start_counts_its_gradient_and_is_stronger(trained):
    model, images, labels = trained
    k, budget = 16, 60
    seen = Seen(model)
    start = sparse_search(model, images, labels, k, budget, init="saliency")
    seen.handle.remove()
    counts = sum(torch.bincount(_owner(batch, images, k), minlength=len(images)) for batch in seen.batches)
    assert torch.equal(counts + 2, start.queries)  # the gradient's forward pass counts 3 (its backward 2)
    assert int(start.queries.max()) <= budget
    adv = start.adv.permute(0, 2, 3, 1).numpy()
    assert (changed(adv, images.permute(0, 2, 3, 1).numpy()).sum(axis=(1, 2)) <= k).all()
    assert torch.equal(np_predict(model, adv) != labels, start.success)
    plain = sparse_search(model, images, labels, k, budget)
    assert int(start.success.sum()) >= int(plain.success.sum()) + 3, (start.success.sum(), plain.success.sum())
