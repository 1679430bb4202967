"""FGSM: equality with torchattacks, properties of the examples, and a success trend over eps."""

from __future__ import annotations

import math

import pytest
import torch
import torchattacks
import torchvision
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from pixelray.attacks import (
    FGSM,
    PGD,
    check_labels,
    eval_mode,
    fgsm,
    fgsm_float,
    fgsm_with_success,
    predict,
    to_uint8,
    to_unit,
)
from pixelray.models import load_model

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
EPS_STEPS = [1, 2, 4, 8]  # k/255, the paper's Table 9


class Normalize(nn.Module):
    """Per-channel normalisation of [0, 1] NCHW input, as pixelray's model wrapper does."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def wrap(net: nn.Module) -> nn.Sequential:
    """A classifier on [0, 1] pixels: ImageNet normalisation, then ``net``."""
    return nn.Sequential(Normalize(IMAGENET_MEAN, IMAGENET_STD), net)


def tiny_cnn(num_classes: int = 10, seed: int = 0) -> nn.Sequential:
    """A small CNN with BatchNorm and Dropout, so that train mode would change its output."""
    with torch.random.fork_rng(devices=[]):  # seeded init; the global generator is left as it was
        torch.manual_seed(seed)
        return _tiny_cnn(num_classes)


def _tiny_cnn(num_classes: int) -> nn.Sequential:
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Dropout(0.5),
        nn.Linear(16 * 4, num_classes),
    )
    with torch.no_grad():  # non-trivial BatchNorm statistics
        net[1].running_mean.uniform_(-0.2, 0.2)
        net[1].running_var.uniform_(0.5, 2.0)
    return wrap(net).eval()


def torchvision_model(name: str, seed: int = 0) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return wrap(getattr(torchvision.models, name)(weights=None)).eval()


def pixelray_tiny() -> nn.Module:
    """pixelray's own Classifier around its tiny CNN (normalisation inside, parameters frozen)."""
    return load_model("tiny", weights=None, num_classes=10)


def learnable_batch(n: int, seed: int, classes: int = 4, size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 noise images whose class is a faint brighter quadrant: learnable in a few steps."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, (n,), generator=gen)
    images = torch.randint(0, 225, (n, 3, size, size), generator=gen, dtype=torch.uint8)
    half = size // 2
    for c in range(classes):
        row, col = divmod(c, 2)
        images[labels == c, :, row * half : (row + 1) * half, col * half : (col + 1) * half] += 30
    return images, labels


def trained_tiny_cnn(classes: int = 4, steps: int = 40) -> nn.Module:
    """tiny_cnn trained with Adam on :func:`learnable_batch` until it gets the task right."""
    model = tiny_cnn(classes).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    with torch.random.fork_rng(devices=[]):  # Dropout draws from the global generator
        torch.manual_seed(0)
        for step in range(steps):
            images, labels = learnable_batch(64, seed=step, classes=classes)
            loss = nn.functional.cross_entropy(model(images.float() / 255), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.zero_grad(set_to_none=True)
    return model.eval()


def num_classes(model: nn.Module, size: int) -> int:
    with torch.no_grad():
        return model(torch.zeros(1, 3, size, size)).shape[1]


def random_batch(n: int, size: int, seed: int, classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 NCHW images and int64 labels from a private generator."""
    gen = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, size, size), generator=gen, dtype=torch.uint8)
    labels = torch.randint(0, classes, (n,), generator=gen)
    return images, labels


@pytest.fixture(scope="module")
def tiny() -> nn.Module:
    return tiny_cnn()


# --- equality with torchattacks ----------------------------------------------------------------

MODELS = {
    "tiny-cnn": (lambda: tiny_cnn(), 16, 8),
    "squeezenet1_1": (lambda: torchvision_model("squeezenet1_1"), 32, 6),
    "resnet18": (lambda: torchvision_model("resnet18"), 32, 6),
    "pixelray-tiny": (pixelray_tiny, 32, 8),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_matches_torchattacks(name: str) -> None:
    # bit for bit on CPU, as attacks/fgsm.py promises: the public function and the sweep's run
    factory, size, n = MODELS[name]
    model = factory()
    images, labels = random_batch(n, size, seed=1, classes=num_classes(model, size))
    unit = images.float() / 255
    for k in EPS_STEPS:
        eps = k / 255
        theirs = to_uint8(torchattacks.FGSM(model, eps=eps)(unit, labels))
        ours = fgsm(model, images, labels, eps)
        assert torch.equal(ours, theirs), f"{name} eps={k}/255: {int((ours != theirs).sum())} values differ"
        swept = FGSM.run(model, images, labels, torch.arange(n), eps, report_float=False)
        assert torch.equal(swept.adv, theirs), f"{name} eps={k}/255 (sweep)"
        assert torch.equal(swept.success, predict(model, theirs) != labels)
    # float input and NHWC input give the same examples
    assert torch.equal(fgsm(model, unit, labels, eps), ours)
    nhwc = images.permute(0, 2, 3, 1).contiguous()
    assert torch.equal(fgsm(model, nhwc, labels, eps), ours.permute(0, 2, 3, 1))


def test_float_example_matches_torchattacks(tiny: nn.Module) -> None:
    images, labels = random_batch(8, 16, seed=2, classes=10)
    unit = images.float() / 255
    theirs = torchattacks.FGSM(tiny, eps=4 / 255)(unit, labels)
    ours = fgsm_float(tiny, images, labels, 4 / 255)
    assert ours.dtype == torch.float32 and ours.shape == unit.shape
    assert torch.equal(ours, theirs)


# --- properties ----------------------------------------------------------------------------------

batches = st.tuples(
    st.integers(1, 4),  # batch
    st.integers(8, 20),  # side
    st.sampled_from(["NHWC", "NCHW"]),
    st.integers(0, 2**31 - 1),  # seed
)
eps_values = st.one_of(
    st.sampled_from([0.0, 1 / 255, 2 / 255, 8 / 255, 1.0]), st.floats(0, 0.2, allow_nan=False)
)


def _batch(n: int, side: int, layout: str, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = random_batch(n, side, seed, classes=10)
    if seed % 3 == 0:  # saturated pixels, where clipping matters
        images = torch.where(images > 128, 255, 0).to(torch.uint8)
    return (images.permute(0, 2, 3, 1).contiguous() if layout == "NHWC" else images), labels


@settings(max_examples=40, deadline=None)
@given(batch=batches, eps=eps_values)
def test_fgsm_properties(tiny: nn.Module, batch: tuple, eps: float) -> None:
    images, labels = _batch(*batch)
    before = images.clone()
    adv = fgsm(tiny, images, labels, eps)
    assert torch.equal(images, before), "input modified"
    assert adv.dtype == torch.uint8 and adv.shape == images.shape and adv.stride() == images.stride()
    step = (adv.int() - images.int()).abs()
    assert int(step.max()) <= math.ceil(round(eps * 255, 6))
    if eps == 0:
        assert torch.equal(adv, images)
    k = eps * 255
    if abs(k - round(k)) < 1e-6:  # a whole number of uint8 steps: every pixel moves by exactly k or clips
        k = round(k)
        clipped = (adv == 0) | (adv == 255)
        assert bool(((step == k) | (step == 0) | clipped).all())
    # deterministic
    assert torch.equal(fgsm(tiny, images, labels, eps), adv)


@settings(max_examples=20, deadline=None)
@given(batch=batches, eps=st.sampled_from([1 / 255, 2 / 255, 8 / 255]))
def test_batch_invariance(tiny: nn.Module, batch: tuple, eps: float) -> None:
    images, labels = _batch(*batch)
    together = fgsm(tiny, images, labels, eps)
    alone = torch.cat([fgsm(tiny, images[i : i + 1], labels[i : i + 1], eps) for i in range(len(images))])
    assert torch.equal(together, alone)
    # and in a bigger batch, at another position
    n = len(images)
    padded = fgsm(tiny, torch.cat([images.flip(0), images]), torch.cat([labels.flip(0), labels]), eps)
    assert torch.equal(padded[n:], together)


def test_model_state_restored_and_no_parameter_grads() -> None:
    model = tiny_cnn()
    model.train()
    model[1][1].eval()  # a module in eval inside a model in train: restored as it was
    model[1][0].weight.requires_grad_(False)  # a frozen parameter stays frozen
    flags = {name: m.training for name, m in model.named_modules()}
    needs = {name: p.requires_grad for name, p in model.named_parameters()}
    images, labels = random_batch(4, 16, seed=3, classes=10)
    adv = fgsm(model, images, labels, 4 / 255)
    assert {name: m.training for name, m in model.named_modules()} == flags
    assert {name: p.requires_grad for name, p in model.named_parameters()} == needs
    assert all(p.grad is None for p in model.parameters())
    # the attack ran in eval mode: Dropout and BatchNorm in train mode would change it
    assert torch.equal(adv, fgsm(tiny_cnn().eval(), images, labels, 4 / 255))


def test_state_restored_after_error(tiny: nn.Module) -> None:
    tiny.train()
    try:
        with pytest.raises(ValueError, match="labels"):
            fgsm(tiny, *random_batch(2, 16, seed=4, classes=10)[:1], torch.tensor([0, 10]), 2 / 255)
        assert tiny.training
    finally:
        tiny.eval()


@pytest.mark.parametrize("context", [torch.no_grad, torch.inference_mode])
def test_works_inside_no_grad_and_inference_mode(tiny: nn.Module, context) -> None:
    images, labels = random_batch(4, 16, seed=5, classes=10)
    expected = fgsm(tiny, images, labels, 4 / 255)
    with context():
        images_in = images.clone()  # an inference tensor under inference_mode
        assert torch.equal(fgsm(tiny, images_in, labels, 4 / 255), expected)
        outcome = fgsm_with_success(tiny, images_in, labels, 4 / 255)
    assert torch.equal(outcome.adv, expected)


def test_channels_last_and_float_layouts(tiny: nn.Module) -> None:
    images, labels = random_batch(3, 16, seed=6, classes=10)
    expected = fgsm(tiny, images, labels, 2 / 255)
    cl = images.contiguous(memory_format=torch.channels_last)
    out = fgsm(tiny, cl, labels, 2 / 255)
    assert out.is_contiguous(memory_format=torch.channels_last) and torch.equal(out, expected)
    out = fgsm(tiny, images.float() / 255, labels, 2 / 255)
    assert out.dtype == torch.uint8 and out.shape == images.shape and torch.equal(out, expected)


def test_empty_batch(tiny: nn.Module) -> None:
    images = torch.zeros(0, 16, 16, 3, dtype=torch.uint8)
    labels = torch.zeros(0, dtype=torch.int64)
    assert fgsm(tiny, images, labels, 2 / 255).shape == images.shape
    outcome = fgsm_with_success(tiny, images, labels, 2 / 255)
    assert outcome.success.shape == (0,)


def test_fgsm_with_success_is_consistent(tiny: nn.Module) -> None:
    images, labels = random_batch(8, 16, seed=7, classes=10)
    nhwc = images.permute(0, 2, 3, 1)
    outcome = fgsm_with_success(tiny, nhwc, labels, 8 / 255)
    assert torch.equal(outcome.adv, fgsm(tiny, nhwc, labels, 8 / 255))
    assert torch.equal(outcome.adv_float, fgsm_float(tiny, nhwc, labels, 8 / 255))
    assert torch.equal(outcome.pred_clean, predict(tiny, images))
    assert torch.equal(outcome.pred_adv, predict(tiny, outcome.adv))
    assert torch.equal(outcome.pred_float, predict(tiny, outcome.adv_float))
    assert torch.equal(outcome.success, outcome.pred_adv != labels)


# --- the sweep's runs: no host syncs, the unrounded verdict only when asked --------------------

# Ops that wait for the device on CUDA: reading a value (item, bool, int), a data-dependent
# size (nonzero, boolean masks), a range read for a check (aminmax), an explicit sync.
SYNCING_OPS = {"aten::_local_scalar_dense", "aten::item", "aten::is_nonzero", "aten::nonzero", "aten::aminmax",
               "aten::masked_select", "aten::unique_consecutive", "aten::_unique2"}


def ops_of(fn) -> set[str]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return {e.name for e in prof.events()}


def test_the_profiler_sees_a_sync_where_there_is_one(tiny: nn.Module) -> None:
    # the check below is not vacuous: the public function reads the labels' range
    images, labels = random_batch(8, 16, seed=3, classes=10)
    assert SYNCING_OPS & ops_of(lambda: fgsm(tiny, images, labels, 2 / 255))


@pytest.mark.parametrize("spec", [FGSM, PGD], ids=lambda s: s.name)
@pytest.mark.parametrize("report_float", [True, False])
def test_sweep_runs_do_not_synchronise_with_the_host(tiny: nn.Module, spec, report_float: bool) -> None:
    images, labels = random_batch(8, 16, seed=3, classes=10)
    params = spec.parse({})
    ops = ops_of(lambda: spec.run(tiny, images, labels, torch.arange(8), 4 / 255, report_float=report_float,
                                  **params))
    assert not SYNCING_OPS & ops, sorted(SYNCING_OPS & ops)


@pytest.mark.parametrize("spec", [FGSM, PGD], ids=lambda s: s.name)
def test_report_float_adds_the_unrounded_verdict_and_changes_nothing_else(tiny: nn.Module, spec) -> None:
    images, labels = random_batch(16, 16, seed=4, classes=10)
    params = spec.parse({})
    with_float = spec.run(tiny, images, labels, torch.arange(16), 8 / 255, report_float=True, **params)
    without = spec.run(tiny, images, labels, torch.arange(16), 8 / 255, report_float=False, **params)
    assert without.success_float is None
    assert torch.equal(with_float.adv, without.adv) and torch.equal(with_float.success, without.success)
    # the reference: the unrounded example, judged one image at a time
    reference = (fgsm_float if spec is FGSM else None)
    if reference is not None:
        expected = torch.stack([predict(tiny, reference(tiny, images[i : i + 1], labels[i : i + 1], 8 / 255))[0]
                                != labels[i] for i in range(16)])
        assert torch.equal(with_float.success_float, expected)


def test_labels_are_checked_once_by_the_caller() -> None:
    check_labels(torch.tensor([0, 9]), 10)
    with pytest.raises(ValueError, match=r"labels: values span \[0, 10\], outside the model's classes \[0, 9\]"):
        check_labels(torch.tensor([0, 10]), 10)
    with pytest.raises(ValueError, match=r"labels: values span \[-1, 3\]"):
        check_labels(torch.tensor([-1, 3]), None)
    with pytest.raises(ValueError, match="not an integer class index"):
        check_labels(torch.tensor([0.0]), 10)


# --- success over eps ---------------------------------------------------------------------------


def test_success_grows_with_eps_and_beats_random_signs() -> None:
    """On a trained model, success rises with eps and beats random signs of the same size.

    Labels are the model's own clean predictions, so success at eps=0 is exactly 0. With the
    gradient's sign flipped the attack would push towards the label and succeed far less.
    """
    model = trained_tiny_cnn()
    images, truth = learnable_batch(128, seed=10_000)
    labels = predict(model, images)
    assert float((labels == truth).float().mean()) >= 0.9, "the tiny model did not learn the task"
    rates = {}
    for k in [0, 2, 8, 32]:
        outcome = fgsm_with_success(model, images, labels, k / 255)
        rates[k] = float(outcome.success.float().mean())
        assert abs(rates[k] - float(outcome.success_float.float().mean())) <= 0.1, k
    assert rates[0] == 0
    assert rates[2] <= rates[8] + 0.02 and rates[8] <= rates[32] + 0.02, rates
    assert rates[32] >= 0.8 and rates[32] >= rates[2] + 0.5, rates
    gen = torch.Generator().manual_seed(9)
    signs = torch.randint(0, 2, images.shape, generator=gen) * 2 - 1
    noisy = to_uint8((images.float() / 255 + signs * 32 / 255).clamp(0, 1))
    random_rate = float((predict(model, noisy) != labels).float().mean())
    assert rates[32] >= random_rate + 0.5, (rates, random_rate)


# --- validation ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("images", "labels", "eps", "match"),
    [
        (torch.zeros(2, 3, 8, 8, dtype=torch.int32), [0, 1], 0.01, "images: dtype torch.int32"),
        (torch.zeros(2, 8, 8, 3), [0, 1], 0.01, r"images: float images must be \(N, 3, H, W\)"),
        (torch.full((2, 3, 8, 8), 2.0), [0, 1], 0.01, r"images: float values span \[2, 2\]"),
        (torch.full((2, 3, 8, 8), float("nan")), [0, 1], 0.01, "images: float values span"),
        (torch.zeros(2, 4, 8, 8, dtype=torch.uint8), [0, 1], 0.01, "images: expected a batch"),
        ([[0]], [0, 1], 0.01, "images: list is not a tensor"),
        (torch.zeros(2, 3, 8, 8), [0, 1], 8, r"eps: 8 is outside \[0, 1\].*8/255"),
        (torch.zeros(2, 3, 8, 8), [0, 1], -0.1, r"eps: -0.1 is outside \[0, 1\]"),
        (torch.zeros(2, 3, 8, 8), [0, 1], float("nan"), "eps: nan is not a finite number"),
        (torch.zeros(2, 3, 8, 8), [0, 1], True, "eps: True"),
        (torch.zeros(2, 3, 8, 8), [0], 0.01, r"labels: shape \(1,\) does not match 2 images"),
        (torch.zeros(2, 3, 8, 8), torch.tensor([0.0, 1.0]), 0.01, "labels: dtype torch.float32"),
        (torch.zeros(2, 3, 8, 8), [0, 10], 0.01, r"labels: values span \[0, 10\].*10 classes"),
        (torch.zeros(2, 3, 8, 8), [-1, 0], 0.01, r"labels: values span \[-1, 0\]"),
    ],
)
def test_bad_input_is_a_value_error(tiny, images, labels, eps, match) -> None:
    with pytest.raises(ValueError, match=match):
        fgsm(tiny, images, labels, eps)


def test_bad_model_and_output(tiny: nn.Module) -> None:
    images, labels = random_batch(2, 8, seed=0, classes=10)
    with pytest.raises(ValueError, match="model: function is not a torch.nn.Module"):
        fgsm(lambda x: x, images, labels, 0.01)
    with pytest.raises(ValueError, match=r"model: output shape \(2, 3, 8, 8\)"):
        fgsm(nn.Identity(), images, labels, 0.01)
    with pytest.raises(ValueError, match="layout"):
        to_uint8(torch.zeros(1, 3, 2, 2), "CHW")


def test_to_unit_and_to_uint8_round_trip() -> None:
    images, _ = random_batch(2, 8, seed=0, classes=10)
    nhwc = images.permute(0, 2, 3, 1)
    assert torch.equal(to_unit(nhwc), images.float() / 255)
    assert torch.equal(to_uint8(to_unit(images)), images)
    assert torch.equal(to_uint8(to_unit(nhwc), "NHWC"), nhwc)


def test_eval_mode_restores() -> None:
    model = tiny_cnn().train()
    with eval_mode(model):
        assert not any(m.training for m in model.modules())
    assert all(m.training for m in model.modules())


# --- device ------------------------------------------------------------------------------------


@pytest.fixture
def no_tf32():
    """fp32 convolutions in full precision: with TF32 (cuDNN's default) about 1e-4 of the
    gradient signs, those of near-zero components, change from run to run."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_torchattacks_and_stays_on_device(no_tf32) -> None:
    model = torchvision_model("resnet18").cuda()
    images, labels = random_batch(16, 64, seed=10, classes=1000)
    images, labels = images.cuda(), labels.cuda()
    for k in EPS_STEPS:
        ours = fgsm(model, images, labels, k / 255)
        assert ours.device == images.device
        theirs = to_uint8(torchattacks.FGSM(model, eps=k / 255)(images.float() / 255, labels))
        assert torch.equal(ours, theirs), k  # TF32 off: the same bits as on CPU's promise
        assert torch.equal(predict(model, ours), predict(model, theirs)), k
        assert torch.equal(fgsm(model, images, labels, k / 255), ours), k


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_sweep_runs_do_not_synchronise_on_cuda(no_tf32) -> None:
    model = torchvision_model("resnet18").cuda()
    images, labels = random_batch(16, 64, seed=10, classes=1000)
    images, labels, ids = images.cuda(), labels.cuda(), torch.arange(16, device="cuda")
    for spec in (FGSM, PGD):
        spec.run(model, images, labels, ids, 4 / 255, report_float=False, **spec.parse({}))  # warm-up
        torch.cuda.set_sync_debug_mode("error")
        try:
            spec.run(model, images, labels, ids, 4 / 255, report_float=False, **spec.parse({}))
        finally:
            torch.cuda.set_sync_debug_mode("default")
