"""The model registry: specs, deterministic init, the pixel wrapper, offline weights, checkpoints, CLI.

No test downloads anything: TORCH_HOME points at an empty temp dir and every socket
connection attempt is recorded and refused, so a network attempt fails loudly.
"""

from __future__ import annotations

import datetime
import json
import re
import socket
import sys
import textwrap
import time

import pytest
import torch
from typer.testing import CliRunner

from pixelray.cli.models import weights_app
from pixelray.models import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    PRESETS,
    Classifier,
    Weights,
    WeightsDownloadError,
    WeightsMissingError,
    cached_weights,
    download_weights,
    load_model,
    model_info,
    require_weights,
    resolve_models,
    save_checkpoint,
    tiny,
    weights_file,
)


@pytest.fixture
def offline(monkeypatch):
    """Refuse (and record) every network attempt made through the socket module."""
    calls: list[tuple] = []

    def refuse(*args, **kwargs):
        calls.append(args)
        raise OSError("network disabled in tests")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    return calls


@pytest.fixture
def torch_home(tmp_path, monkeypatch):
    """An empty torch hub cache; returns its checkpoints directory."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    return tmp_path / "torch" / "hub" / "checkpoints"


def _images(n: int = 2, size: int = 64, seed: int = 0) -> torch.Tensor:
    """Random uint8 NHWC images."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, size, size, 3), dtype=torch.uint8, generator=gen)


def _same_state(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# ---------------------------------------------------------------------------- random init


@pytest.mark.parametrize("name", ["squeezenet1_1", "resnet18", "alexnet", "tiny"])
def test_random_init_is_deterministic_and_leaves_global_rng_alone(name):
    before = torch.get_rng_state()
    a = load_model(name, None, init_seed=3)
    b = load_model(name, "none", init_seed=3)
    c = load_model(name, Weights.NONE, init_seed=4)
    assert torch.equal(torch.get_rng_state(), before)
    assert _same_state(a, b)
    assert not _same_state(a, c)
    assert isinstance(a, Classifier) and a.name == name and a.weights == "none"
    assert not a.training and not any(m.training for m in a.modules())
    assert not any(p.requires_grad for p in a.parameters())
    assert a.state_dict().keys() == {f"net.{k}" for k in a.net.state_dict()}  # mean/std not persisted


def test_torchvision_model_meta_and_num_classes():
    model = load_model("squeezenet1_1", None, num_classes=7)
    assert (model.mean, model.std) == (IMAGENET_MEAN, IMAGENET_STD)
    assert model(_images()).shape == (2, 7)
    assert model_info(model) == {
        "name": "squeezenet1_1",
        "weights": "none",
        "num_classes": 7,
        "parameters": sum(p.numel() for p in model.net.parameters()),
    }
    assert load_model("squeezenet1_1", None).num_classes == 1000


# ---------------------------------------------------------------------------- the pixel wrapper


def test_classifier_gives_the_same_logits_for_every_input_layout():
    model = load_model("resnet18", None, num_classes=10)
    nhwc = _images(2, 48)
    nchw = nhwc.permute(0, 3, 1, 2).contiguous()
    unit = nchw.float() / 255
    with torch.inference_mode():
        ref = model(nhwc)
        outs = {
            "uint8 NCHW": model(nchw),
            "float NCHW": model(unit),
            "float NHWC": model(unit.permute(0, 2, 3, 1).contiguous()),
            "float channels_last": model(unit.contiguous(memory_format=torch.channels_last)),
            "float64 NCHW": model(unit.double()),
        }
    assert ref.dtype == torch.float32 and ref.shape == (2, 10)
    for what, out in outs.items():
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4, msg=what)


def test_nhwc_input_reaches_the_network_as_channels_last_without_copy():
    model = load_model("tiny", None)
    seen = []
    model.net.register_forward_pre_hook(
        lambda mod, args: seen.append(args[0].is_contiguous(memory_format=torch.channels_last))
    )
    model(_images(1, 32))
    model(_images(1, 32).permute(0, 3, 1, 2).contiguous())
    assert seen == [True, False]


def test_classifier_normalises_inside_with_its_mean_and_std():
    net = torch.nn.Flatten()
    model = Classifier(net, name="id", num_classes=12, mean=(0.5, 0.25, 0.0), std=(0.5, 0.25, 1.0))
    x = torch.tensor([[[[255, 0, 128]]]], dtype=torch.uint8)  # NHWC, 1 pixel
    torch.testing.assert_close(model(x), torch.tensor([[1.0, -1.0, 128 / 255]]))


def test_uint8_conversion_gives_the_bits_of_the_unfused_formula():
    # the network sees exactly ((x / 255) - mean) / std, as written out here, for both layouts
    seen = []
    model = load_model("tiny", None)
    model.net.register_forward_pre_hook(lambda mod, args: seen.append(args[0].clone()))
    nhwc = _images(3, 32, seed=5)
    mean = torch.tensor(model.mean).view(1, 3, 1, 1)
    std = torch.tensor(model.std).view(1, 3, 1, 1)
    expected = (nhwc.permute(0, 3, 1, 2).to(torch.float32) / 255 - mean) / std
    with torch.inference_mode():
        model(nhwc)
        model(nhwc.permute(0, 3, 1, 2).contiguous())
    assert torch.equal(seen[0], expected) and torch.equal(seen[1], expected)
    assert seen[0].is_contiguous(memory_format=torch.channels_last)


def test_classifier_supports_autograd_on_float_input():
    model = load_model("tiny", None)
    x = (_images(2, 32).permute(0, 3, 1, 2).float() / 255).requires_grad_(True)
    loss = torch.nn.functional.cross_entropy(model(x), torch.tensor([1, 2]))
    loss.backward()
    assert x.grad is not None and x.grad.shape == x.shape and x.grad.abs().sum() > 0


@pytest.mark.parametrize(
    ("images", "match"),
    [
        (torch.full((1, 3, 16, 16), 2.0), r"\[0, 1\]"),
        (torch.full((1, 3, 16, 16), -0.5), r"\[0, 1\]"),
        (torch.full((1, 3, 16, 16), float("nan")), r"\[0, 1\]"),
        (torch.zeros(1, 3, 16, 16, dtype=torch.int64), "dtype"),
        (torch.zeros(3, 16, 16), "shape"),
        (torch.zeros(1, 4, 16, 16), "RGB"),
    ],
)
def test_classifier_rejects_bad_input(images, match):
    model = load_model("tiny", None)
    with pytest.raises(ValueError, match=match):
        model(images)


def test_classifier_range_check_can_be_turned_off():
    model = load_model("tiny", None)
    model.check_range = False
    assert model(torch.full((1, 3, 16, 16), 2.0)).shape == (1, 10)


# ---------------------------------------------------------------------------- tiny


def test_tiny_is_small_and_takes_any_size_from_16():
    net = tiny(10)
    net.eval()
    assert sum(p.numel() for p in net.parameters()) < 1_000_000
    with torch.inference_mode():
        for size in (16, 32, 224):
            assert net(torch.zeros(2, 3, size, size)).shape == (2, 10)
    assert tiny(3).classifier.out_features == 3


def test_tiny_has_no_pretrained_weights():
    with pytest.raises(ValueError, match="tiny has no pretrained"):
        load_model("tiny")  # the default asks for imagenet weights
    assert load_model("tiny", None, num_classes=4).num_classes == 4


# ---------------------------------------------------------------------------- names


def test_unknown_model_lists_close_matches():
    with pytest.raises(ValueError, match="did you mean resnet101") as info:
        load_model("resnet10l")
    assert not isinstance(info.value, KeyError)
    with pytest.raises(ValueError, match="preset"):
        load_model("paper")
    with pytest.raises(ValueError, match="unknown"):
        resolve_models(["resnet18", "no such model"])


def test_resolve_models_expands_presets():
    assert resolve_models("paper") == list(PRESETS["paper"])
    assert PRESETS["paper"] == ("resnet101", "densenet121", "vgg16", "alexnet", "squeezenet1_1")
    assert resolve_models(["tiny", "paper", "alexnet", "checkpoint:x.pt"]) == [
        "tiny", *PRESETS["paper"], "checkpoint:x.pt"
    ]
    with pytest.raises(ValueError, match="empty"):
        resolve_models([])


def test_every_torchvision_classification_model_is_known():
    import torchvision

    for name in torchvision.models.list_models(module=torchvision.models):
        assert resolve_models(name) == [name]


@pytest.mark.parametrize(
    ("name", "weights", "match"),
    [
        ("vit_h_14", "imagenet", "no IMAGENET1K_V1 weights.*IMAGENET1K_SWAG_E2E_V1"),
        ("resnet18", "IMAGENET1K_V2", "no IMAGENET1K_V2"),
        ("resnet18", "not a weights name!", "weights"),
        ("resnet18", 3, "weights"),
    ],
)
def test_bad_weights_names_are_refused(name, weights, match, torch_home):
    with pytest.raises(ValueError, match=match):
        load_model(name, weights)


def test_pretrained_head_size_is_checked(torch_home):
    with pytest.raises(ValueError, match="num_classes: 10 does not match the 1000"):
        load_model("resnet18", "imagenet", num_classes=10)


# ---------------------------------------------------------------------------- offline weights


@pytest.mark.parametrize("weights", ["imagenet", "default"])
@pytest.mark.parametrize("name", PRESETS["paper"])
def test_missing_weights_fail_fast_without_network(name, weights, offline, torch_home):
    expected = weights_file(name, weights)
    start = time.perf_counter()
    with pytest.raises(WeightsMissingError) as info:
        load_model(name, weights)
    assert time.perf_counter() - start < 1.0
    message = str(info.value)
    assert str(expected) in message and "pixelray weights download" in message
    assert "$TORCH_HOME/hub/checkpoints" in message
    assert offline == []
    assert not torch_home.exists() or not any(torch_home.iterdir())


def test_weights_file_follows_torchvision_url_and_torch_home(torch_home):
    import torchvision

    assert weights_file("resnet101", "imagenet") == torch_home / "resnet101-63fe2227.pth"
    enum = torchvision.models.ResNet101_Weights
    assert weights_file("resnet101", "default").name == enum.DEFAULT.url.rsplit("/", 1)[1]
    assert weights_file("resnet101", "IMAGENET1K_V2") == weights_file("resnet101", "default")
    for name, weights in [("resnet101", None), ("tiny", "imagenet"), ("checkpoint:x.pt", "imagenet")]:
        with pytest.raises(ValueError):
            weights_file(name, weights)


def _cache(name: str, state: dict) -> None:
    path = weights_file(name, "imagenet")
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)


def test_present_weights_load_from_the_cache(offline, torch_home):
    ref = load_model("squeezenet1_1", None, init_seed=11)
    _cache("squeezenet1_1", ref.net.state_dict())
    before = torch.get_rng_state()
    model = load_model("squeezenet1_1", "imagenet")
    assert torch.equal(torch.get_rng_state(), before)
    assert _same_state(model.net, ref.net)
    assert not _same_state(model.net, load_model("squeezenet1_1", None).net)
    assert model.weights == "imagenet" and "IMAGENET1K_V1" in model.source
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert offline == []


def test_densenet_old_style_keys_are_remapped_by_torchvision(offline, torch_home):
    ref = load_model("densenet121", None, init_seed=2)
    old = {re.sub(r"(denselayer\d+\.(?:norm|relu|conv))([12])\.", r"\1.\2.", k): v
           for k, v in ref.net.state_dict().items() if not k.endswith("num_batches_tracked")}
    assert any(".norm.1." in k for k in old)
    _cache("densenet121", old)
    assert _same_state(load_model("densenet121", "imagenet").net, ref.net)
    assert offline == []


@pytest.mark.parametrize("content", ["garbage", "pickle"])
def test_unreadable_or_unsafe_cache_file_is_refused(content, offline, torch_home):
    path = weights_file("squeezenet1_1", "imagenet")
    path.parent.mkdir(parents=True)
    if content == "garbage":
        path.write_bytes(b"not a torch file")
    else:  # loadable only with full unpickling: refused by weights_only=True
        torch.save({"when": datetime.datetime(2021, 1, 1)}, path)
    with pytest.raises(WeightsMissingError, match="cannot be read as a weights-only state_dict"):
        load_model("squeezenet1_1", "imagenet")


def test_cached_weights_and_require_weights(offline, torch_home):
    rows = cached_weights("paper")
    assert {r[0] for r in rows} == set(PRESETS["paper"])
    assert all(not present for *_, present in rows)
    assert ("resnet101", "imagenet", torch_home / "resnet101-63fe2227.pth", False) in rows
    with pytest.raises(WeightsMissingError, match=r"5 weights files.*alexnet-owt-7be5be79\.pth"):
        require_weights("paper")
    _cache("alexnet", {})
    assert ("alexnet", "imagenet", weights_file("alexnet", "imagenet"), True) in cached_weights(["alexnet"])
    assert cached_weights(["tiny", "checkpoint:x.pt"]) == []
    assert len(cached_weights()) >= 80  # every torchvision model
    require_weights(["alexnet", "tiny"])
    require_weights("paper", None)
    with pytest.raises(WeightsMissingError, match="vgg16-397923af.pth"):
        require_weights(["alexnet", "vgg16"])


def test_download_is_a_no_op_when_present_and_fails_fast_offline(offline, torch_home):
    _cache("squeezenet1_1", {})
    assert download_weights("squeezenet1_1") == weights_file("squeezenet1_1", "imagenet")
    assert offline == []
    start = time.perf_counter()
    with pytest.raises(WeightsDownloadError, match="cannot reach download.pytorch.org.*alexnet-owt"):
        download_weights("alexnet", timeout=1)
    assert time.perf_counter() - start < 2.0
    assert not weights_file("alexnet", "imagenet").exists()


def test_download_cannot_hang_on_a_silent_network(monkeypatch, torch_home):
    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: time.sleep(5))
    start = time.perf_counter()
    with pytest.raises(WeightsDownloadError, match="no answer within 0.2 s"):
        download_weights("alexnet", timeout=0.2)
    assert time.perf_counter() - start < 1.5


# ---------------------------------------------------------------------------- checkpoints


def test_checkpoint_round_trip_gives_identical_logits(tmp_path):
    model = load_model("tiny", None, num_classes=5, init_seed=7)
    path = save_checkpoint(model, tmp_path / "runs" / "tiny-aug.pt", base="tiny",
                           metadata={"augment": {"count": 4}, "epochs": 3})
    assert path == tmp_path / "runs" / "tiny-aug.pt"
    assert sorted(p.name for p in path.parent.iterdir()) == ["tiny-aug.pt", "tiny-aug.pt.json"]
    state = torch.load(path, weights_only=True)
    assert state.keys() == model.net.state_dict().keys()
    side = json.loads((tmp_path / "runs" / "tiny-aug.pt.json").read_text())
    assert side["base"] == "tiny" and side["num_classes"] == 5 and len(side["sha256"]) == 64

    before = torch.get_rng_state()
    loaded = load_model(f"checkpoint:{path}", init_seed=99)
    assert torch.equal(torch.get_rng_state(), before)
    assert (loaded.name, loaded.weights, loaded.num_classes) == ("tiny-aug", "checkpoint", 5)
    assert loaded.metadata == {"augment": {"count": 4}, "epochs": 3}
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    x = _images(4, 32)
    with torch.inference_mode():
        assert torch.equal(loaded(x), model(x))


def test_checkpoint_of_a_torchvision_model_keeps_mean_std_and_head(tmp_path):
    model = load_model("squeezenet1_1", None, num_classes=3, init_seed=1)
    path = save_checkpoint(model, tmp_path / "sq.pt", base="squeezenet1_1", name="sq-finetuned")
    (tmp_path / "sq.pt.json").rename(tmp_path / "sq.json")  # the same-stem sidecar is found too
    loaded = load_model(f"checkpoint:{path}")
    assert (loaded.name, loaded.mean, loaded.std) == ("sq-finetuned", model.mean, model.std)
    x = _images(2, 64)
    with torch.inference_mode():
        assert torch.equal(loaded(x), model(x))


def test_checkpoint_accepts_wrapper_prefixed_keys(tmp_path):
    model = load_model("tiny", None, init_seed=5)
    path = tmp_path / "ddp.pt"
    torch.save({f"module.{k}": v for k, v in model.net.state_dict().items()}, path)
    sidecar = {"base": "tiny", "num_classes": 10, "mean": [0.5] * 3, "std": [0.5] * 3}
    (tmp_path / "ddp.json").write_text(json.dumps(sidecar))
    loaded = load_model(f"checkpoint:{path}")
    assert _same_state(loaded.net, model.net) and loaded.mean == (0.5, 0.5, 0.5)


def _write_checkpoint(tmp_path, sidecar: object | None = None, state: object | None = None):
    path = tmp_path / "m.pt"
    torch.save(load_model("tiny", None).net.state_dict() if state is None else state, path)
    if sidecar is not None:
        text = sidecar if isinstance(sidecar, str) else json.dumps(sidecar)
        (tmp_path / "m.pt.json").write_text(text)
    return f"checkpoint:{path}"


_GOOD = {"base": "tiny", "num_classes": 10, "mean": [0.5] * 3, "std": [0.5] * 3}


@pytest.mark.parametrize(
    ("sidecar", "state", "match"),
    [
        (None, None, "has no JSON sidecar"),
        ("{not json", None, "not valid JSON"),
        ([1, 2], None, "JSON object"),
        ({k: v for k, v in _GOOD.items() if k != "base"}, None, "lacks 'base'"),
        ({**_GOOD, "num_classes": "ten"}, None, "num_classes"),
        ({**_GOOD, "std": [0.5, 0.0, 0.5]}, None, "std"),
        ({**_GOOD, "base": "alexnet"}, None, "does not fit base 'alexnet'"),
        ({**_GOOD, "base": "checkpoint:other.pt"}, None, "base 'checkpoint:other.pt' is not a built-in architecture"),
        ({**_GOOD, "base": "resnet10l"}, None, "did you mean"),
        ({**_GOOD, "sha256": "0" * 64}, None, "does not match the sha256"),
        (_GOOD, {"when": datetime.datetime(2021, 1, 1)}, "not a weights-only state_dict"),
        (_GOOD, [1, 2, 3], "not a state_dict"),
    ],
)
def test_bad_checkpoints_fail_clearly(tmp_path, sidecar, state, match):
    spec = _write_checkpoint(tmp_path, sidecar, state)
    with pytest.raises(ValueError, match=match):
        load_model(spec)


def test_missing_checkpoint_and_bad_save_arguments(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_model(f"checkpoint:{tmp_path / 'nope.pt'}")
    with pytest.raises(ValueError, match="names no file"):
        load_model("checkpoint:")
    model = load_model("tiny", None)
    with pytest.raises(ValueError, match="JSON-serialisable"):
        save_checkpoint(model, tmp_path / "m.pt", base="tiny", metadata={"bad": object()})
    with pytest.raises(ValueError, match="base"):
        save_checkpoint(model, tmp_path / "m.pt", base="checkpoint:x.pt")
    with pytest.raises(ValueError, match="Classifier"):
        save_checkpoint(model.net, tmp_path / "m.pt", base="tiny")
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------- user factories

_FACTORIES = """
import torch
from torch import nn


class Scaled(nn.Module):
    mean = (0.5, 0.5, 0.5)
    std = (0.25, 0.25, 0.25)

    def __init__(self, num_classes=3):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.head = nn.Linear(4, num_classes)

    def forward(self, x):
        return self.head(self.conv(x).mean(dim=(2, 3)))


def make(num_classes=3):
    return Scaled(num_classes)


def plain():
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 6))


def not_a_module():
    return 5
"""


@pytest.fixture
def factories(tmp_path, monkeypatch):
    """A user module of model factories, importable as ``pixelray_test_factories``."""
    (tmp_path / "pixelray_test_factories.py").write_text(textwrap.dedent(_FACTORIES))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "pixelray_test_factories", raising=False)
    yield "pixelray_test_factories"
    sys.modules.pop("pixelray_test_factories", None)


def test_factory_models(factories):
    before = torch.get_rng_state()
    model = load_model(f"{factories}:make", num_classes=5, init_seed=1)
    again = load_model(f"{factories}:make", num_classes=5, init_seed=1)
    assert torch.equal(torch.get_rng_state(), before)
    assert _same_state(model, again)
    assert (model.name, model.num_classes, model.weights) == ("make", 5, "factory")
    assert (model.mean, model.std) == ((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    assert model(_images(2, 16)).shape == (2, 5)
    assert not model.training and not any(p.requires_grad for p in model.parameters())

    plain = load_model(f"{factories}:plain")
    assert (plain.num_classes, plain.mean, plain.std) == (6, IMAGENET_MEAN, IMAGENET_STD)
    assert load_model(f"{factories}:plain", num_classes=6).num_classes == 6  # matches: fine
    assert load_model(f"{factories}:Scaled").num_classes == 3
    assert load_model("pixelray.models:tiny", num_classes=4).num_classes == 4


@pytest.mark.parametrize(
    ("attr", "kwargs", "match"),
    [
        ("not_a_module", {}, "not a torch.nn.Module"),
        ("missing", {}, "has no 'missing'"),
        ("plain", {"num_classes": 3}, "predicts 6 classes, not 3, and takes no num_classes"),
    ],
)
def test_bad_factories_fail_clearly(factories, attr, kwargs, match):
    with pytest.raises(ValueError, match=match):
        load_model(f"{factories}:{attr}", **kwargs)


def test_unimportable_factory_module():
    with pytest.raises(ValueError, match="cannot import module 'no_such_pixelray_module'"):
        load_model("no_such_pixelray_module:make")


# ---------------------------------------------------------------------------- CLI


def test_cli_weights_list(offline, torch_home):
    _cache("alexnet", {})
    result = CliRunner().invoke(weights_app, ["list", "--preset", "paper", "--weights", "imagenet"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["model", "weights", "cached", "file"]
    assert re.search(r"alexnet\s+imagenet\s+yes\s+.*alexnet-owt-7be5be79\.pth", result.stdout)
    assert re.search(r"vgg16\s+imagenet\s+no\s+.*vgg16-397923af\.pth", result.stdout)
    assert "1 of 5 files cached" in lines[-1]
    assert offline == []


def test_cli_weights_download_offline_fails_fast_with_one_line(offline, torch_home):
    start = time.perf_counter()
    result = CliRunner().invoke(weights_app, ["download", "squeezenet1_1", "--timeout", "1"])
    assert time.perf_counter() - start < 3.0
    assert result.exit_code == 1
    err = result.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: cannot reach")
    assert "squeezenet1_1-b8a52dc0.pth" in err[0] and "Traceback" not in result.output
    assert not weights_file("squeezenet1_1", "imagenet").exists()


def test_cli_weights_list_explicit_entry_and_main_app(offline, torch_home):
    from pixelray.cli import app

    result = CliRunner().invoke(app, ["weights", "list", "resnet101", "--weights", "IMAGENET1K_V2"])
    assert result.exit_code == 0, result.output
    assert re.search(r"resnet101\s+IMAGENET1K_V2\s+no\s+.*resnet101-cd907fc2\.pth", result.stdout)
    assert CliRunner().invoke(app, ["weights", "list"]).exit_code == 0
    assert offline == []


@pytest.mark.parametrize(
    "args", [["download"], ["download", "resnt"], ["download", "alexnet", "--weights", "none"],
             ["list", "--preset", "nope"], ["list", "--weights", "bogus!"], ["list", "tiny"],
             ["list", "vit_h_14", "--weights", "imagenet"]],
)
def test_cli_weights_bad_arguments(args, offline, torch_home):
    result = CliRunner().invoke(weights_app, args)
    assert result.exit_code == 2
    assert result.stderr.startswith("error: ") and len(result.stderr.strip().splitlines()) == 1
    assert offline == []



def test_checkpoints_of_built_in_bases_load_and_check_without_torchvision(synthetic_dataset, tiny_checkpoints):
    """torchvision costs ~1.5 CPU-s to import (torchvision.ops pulls in torch._dynamo): a driver that checks a
    sweep of tiny-CNN checkpoints and a worker that loads them never import it; a torchvision name does."""
    import subprocess

    spec = tiny_checkpoints[0]
    code = textwrap.dedent(f"""
        import sys
        from pixelray.config.sweep import parse_config
        from pixelray.engine.worker import ModelWorker
        parse_config({{"data": {{"path": {str(synthetic_dataset)!r}}}, "models": {{"names": [{spec!r}],
                      "weights": "none"}}, "grid": {{"counts": [4]}}, "output": {{"dir": "unused"}}}})
        ModelWorker(device="cpu", threads=1).preflight([{spec!r}], None, 10)
        before = "torchvision" in sys.modules
        from pixelray.models import load_model
        load_model("squeezenet1_1", weights="none", num_classes=10)
        print(before, "torchvision" in sys.modules)
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["False", "True"], done.stdout
