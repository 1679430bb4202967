"""PGD: equal to torchattacks without a random start; with one, a pure function of (seed, image id)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchattacks
from scipy import stats
from test_attacks import learnable_batch, random_batch, torchvision_model, trained_tiny_cnn

from pixelray.attacks import fgsm, get_attack, pgd, pgd_float, predict, to_uint8
from pixelray.attacks.pgd import start_offsets
from pixelray.models import load_model

EPS, ALPHA, STEPS = 8 / 255, 2 / 255, 5


def pixelray_tiny() -> torch.nn.Module:
    return load_model("tiny", weights=None, num_classes=10, init_seed=3)


@pytest.mark.parametrize(("name", "factory", "size"), [
    ("pixelray-tiny", pixelray_tiny, 32),
    ("resnet18", lambda: torchvision_model("resnet18"), 32),
])
def test_without_random_start_equals_torchattacks_bit_for_bit(name, factory, size):
    model = factory()
    images, labels = random_batch(6, size, seed=4, classes=10)
    unit = images.float() / 255
    for eps, alpha, steps in [(EPS, ALPHA, STEPS), (4 / 255, 1 / 255, 3), (16 / 255, 4 / 255, 2)]:
        theirs = torchattacks.PGD(model, eps=eps, alpha=alpha, steps=steps, random_start=False)(unit, labels)
        ours = pgd_float(model, images, labels, eps, alpha, steps, random_start=False)
        assert torch.equal(ours, theirs), f"{name}: {int((ours != theirs).sum())} values differ"
        assert torch.equal(pgd(model, images, labels, eps, alpha, steps, random_start=False), to_uint8(theirs))
    nhwc = images.permute(0, 2, 3, 1).contiguous()  # the layout changes nothing
    assert torch.equal(pgd(model, nhwc, labels, EPS, ALPHA, STEPS, random_start=False),
                       pgd(model, images, labels, EPS, ALPHA, STEPS, random_start=False).permute(0, 2, 3, 1))


@pytest.fixture(scope="module")
def tiny():
    return trained_tiny_cnn()


def test_random_start_repeats_and_does_not_depend_on_the_batch(tiny):
    images, labels = learnable_batch(12, seed=9)
    ids = torch.arange(1000, 1012)
    whole = pgd(tiny, images, labels, EPS, ALPHA, STEPS, seed=7, image_ids=ids)
    assert torch.equal(whole, pgd(tiny, images, labels, EPS, ALPHA, STEPS, seed=7, image_ids=ids))
    parts = torch.cat([pgd(tiny, images[s:s + 5], labels[s:s + 5], EPS, ALPHA, STEPS, seed=7, image_ids=ids[s:s + 5])
                       for s in range(0, 12, 5)])
    assert torch.equal(parts, whole)
    order = torch.randperm(12, generator=torch.Generator().manual_seed(0))
    shuffled = pgd(tiny, images[order], labels[order], EPS, ALPHA, STEPS, seed=7, image_ids=ids[order])
    assert torch.equal(shuffled, whole[order])
    assert not torch.equal(whole, pgd(tiny, images, labels, EPS, ALPHA, STEPS, seed=8, image_ids=ids))
    plain = pgd(tiny, images, labels, EPS, ALPHA, STEPS, random_start=False)
    assert not torch.equal(whole, plain)  # the start matters


def test_start_offsets_are_uniform_in_the_ball_and_keyed_by_id():
    ids = torch.tensor([3, 4, 5, 3])
    offsets = start_offsets(ids, (4, 3, 16, 16), 8 / 255, seed=0)
    assert offsets.dtype == torch.float32 and offsets.shape == (4, 3, 16, 16)
    assert float(offsets.abs().max()) <= 8 / 255
    assert torch.equal(offsets[0], offsets[3]) and not torch.equal(offsets[0], offsets[1])
    values = offsets[:3].flatten().double().numpy() / (8 / 255)
    assert stats.kstest(values, stats.uniform(loc=-1, scale=2).cdf).pvalue > 1e-3
    # neighbouring entries are not correlated
    assert abs(np.corrcoef(values[:-1], values[1:])[0, 1]) < 0.05


def test_pgd_stays_in_the_ball_and_beats_fgsm(tiny):
    images, labels = learnable_batch(64, seed=11)
    adv = pgd(tiny, images, labels, EPS, ALPHA, 10, image_ids=torch.arange(64))
    assert int((adv.int() - images.int()).abs().max()) <= 8
    wrong_pgd = int((predict(tiny, adv) != labels).sum())
    wrong_fgsm = int((predict(tiny, fgsm(tiny, images, labels, EPS)) != labels).sum())
    clean = int((predict(tiny, images) != labels).sum())
    assert wrong_pgd >= wrong_fgsm > clean


def test_the_sweep_interface_runs_pgd_with_its_parameters(tiny):
    spec = get_attack("pgd")
    params = spec.parse({"steps": 3, "step": 2, "seed": 5})
    assert params == {"random_start": True, "seed": 5, "step": 2.0, "steps": 3}
    images, labels = learnable_batch(8, seed=12)
    nhwc = images.permute(0, 2, 3, 1).contiguous()
    ids = torch.arange(8) + 40
    outcome = spec.run(tiny, nhwc, labels, ids, EPS, **params)
    expected = pgd(tiny, nhwc, labels, EPS, 2 / 255, 3, seed=5, image_ids=ids)
    assert torch.equal(outcome.adv, expected)
    assert torch.equal(outcome.success, predict(tiny, expected) != labels)
    default = spec.run(tiny, nhwc, labels, ids, EPS, **spec.parse({}))  # step = 2.5 x eps / steps
    assert torch.equal(default.adv, pgd(tiny, nhwc, labels, EPS, 2.5 * EPS / 10, 10, image_ids=ids))


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"steps": 0}, "steps: 0 is invalid"),
    ({"step_size": 2.0}, "outside"),
    ({"eps": -1 / 255}, "outside"),
])
def test_bad_arguments_are_refused(tiny, kwargs, match):
    images, labels = learnable_batch(2, seed=1)
    args = {"eps": EPS, "step_size": ALPHA, "steps": STEPS, **kwargs}
    with pytest.raises(ValueError, match=match):
        pgd(tiny, images, labels, **args)
