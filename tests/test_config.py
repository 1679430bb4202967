"""Sweep configs: every mistake refused before work starts, naming the key, the value and the fix."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from pixelray.config.run import gpu_range
from pixelray.config.sweep import ConfigError, Filter, load_config, parse_config
from pixelray.core.spec import PixelChange

JOBS = Path(__file__).resolve().parents[1] / "jobs"


def base(**over):
    raw = {
        "data": {"path": "shards"},
        "models": {"names": ["tiny"], "weights": "none"},
        "grid": {"counts": [4, 8]},
        "output": {"dir": "out"},
    }
    raw.update(over)
    return raw


@pytest.mark.parametrize("name", ["paper.toml", "full_grid.toml", "demo.toml"])
def test_shipped_configs_load(name):
    cfg = load_config(JOBS / name)
    assert cfg.unique_cells((224, 224) if name != "demo.toml" else (32, 32))


def test_paper_config_is_tables_6_to_8_on_the_five_models():
    cfg = load_config(JOBS / "paper.toml")
    assert cfg.models == ("resnet101", "densenet121", "vgg16", "alexnet", "squeezenet1_1")
    assert cfg.filter is Filter.ALL and cfg.eval_size == 10000 and cfg.weights == "imagenet"
    pairs = cfg.cells((224, 224))
    assert {e for e, _ in pairs} >= {"count", "amplitude", "area"}
    # Table 8's area 224 is the whole image: the same cells as Table 6, evaluated once
    unique = cfg.unique_cells((224, 224))
    assert len(unique) == 5 + 25 + 20
    assert all(c.change.area in (None, 200, 150, 100, 50) for c in unique)


@pytest.mark.parametrize(
    "raw, message",
    [
        (base(data={}), r"\[data\] path: missing"),
        (base(models={"names": []}), r"\[models\] names"),
        (base(models={"names": ["a", "a"]}), "each model may appear once"),
        (base(models={"names": ["resnet1010"]}), r"\[models\] model: 'resnet1010' is unknown; did you mean resnet101"),
        (base(models={"preset": "nope"}), r"preset = 'nope': unknown; allowed: \['paper'\]"),
        (base(models={"names": ["tiny"], "weights": "v 2"}), r"weights = 'v 2': weights: 'v 2' is invalid; use"),
        (base(models={"names": ["tiny"], "weights": 2}), r"weights = 2: allowed: 'imagenet', 'default', 'none'"),
        (base(models={"names": ["resnet18"], "weights": "v2"}),
         r"weights = 'v2': weights: 'v2' is invalid; use 'imagenet' \(IMAGENET1K_V1\), 'default', 'none' or a "),
        (base(models={"names": ["resnet18"], "weights": "IMAGENET1K_V9"}),
         r"weights = 'IMAGENET1K_V9': weights: resnet18 has no IMAGENET1K_V9 weights; use 'default' \(IMAGENET1K_V1\)"),
        (base(models={"names": ["resnet101", "vgg16"], "weights": "IMAGENET1K_V2"}),
         r"vgg16 has no IMAGENET1K_V2 weights"),
        (base(run={"cells_per_pass": 0}), r"\[run\] cells_per_pass = 0: must be an integer >= 1"),
        (base(run={"cells_per_pass": "max"}), r"\[run\] cells_per_pass = 'max': allowed: 'auto' or an integer"),
        (base(run={"device": "cpu", "cuda_graphs": True}), r"cuda_graphs = true needs a CUDA device"),
        (base(attack={"kind": "fgsm", "report_float": "yes"}), r"\[attack\] report_float = 'yes': expected bool"),
        (base(models={"names": ["tiny"]}), r"weights = 'imagenet': 'tiny' has no pretrained weights; set weights"),
        (base(eval={"filter": "some"}), r"filter = 'some': allowed: \['all', 'per-model', 'none'\]"),
        (base(eval={"size": 0}), r"size = 0: must be >= 1"),
        (base(eval={"seeds": [1, 1]}), r"seeds = \[1, 1\]"),
        (base(eval={"batch_size": "big"}), r"batch_size = 'big': expected int"),
        (base(grid={"counts": []}), r"counts = \[\]: expected a non-empty list"),
        (base(grid={"counts": [0]}), r"count: 0 is invalid"),
        (base(grid={"counts": [4], "amplitudes": [300]}), r"amplitude: 300 is outside 1..255"),
        (base(grid={"counts": [4], "channels": [["X"]]}), r"unknown channel 'X'"),
        (base(grid={"counts": [4], "colour": 1}), r"\[grid\] unknown key\(s\) \['colour'\]"),
        (base(run={"device": "tpu"}), r"device = 'tpu': allowed"),
        *[(base(run={"gpus": bad}), rf"\[run\] gpus = {re.escape(repr(bad))}: must be a number of GPU workers >= 1, "
           r"a range 'M..N' with 1 <= M <= N") for bad in (0, -2, "3..1", "0..2", "2..", "some")],
        (base(run={"device": "cpu", "gpus": "1..2"}), r"gpus = '1..2' with device = 'cpu'"),
        (base(bogus={}), r"unknown key\(s\) \['bogus'\]"),
        ({k: v for k, v in base().items() if k != "grid"}, "no grid"),
        ({k: v for k, v in base().items() if k != "output"}, "no output directory"),
    ],
)
def test_invalid_configs_are_refused_with_key_value_and_fix(raw, message):
    with pytest.raises(ConfigError, match=message):
        parse_config(raw)


@pytest.mark.parametrize(("gpus", "fewest_most"), [(1, (1, 1)), (4, (4, 4)), ("2..5", (2, 5)), (" 1 .. 1 ", (1, 1)),
                                                   ("all", (1, None))])
def test_gpus_is_a_number_a_range_or_all(gpus, fewest_most):
    cfg = parse_config(base(run={"gpus": gpus}))
    assert cfg.gpus == gpus and gpu_range(cfg.gpus) == fewest_most


def test_a_cell_larger_than_the_images_is_refused_at_planning():
    cfg = parse_config(base(grid={"counts": [4], "areas": [64]}))
    with pytest.raises(ConfigError, match="area: 64 is larger than the image"):
        cfg.cells((32, 32))


def test_area_equal_to_the_image_is_the_whole_image_and_shared_cells_run_once():
    raw = base()
    del raw["grid"]
    raw["experiment"] = [
        {"name": "count", "counts": [4, 8]},
        {"name": "area", "counts": [4, 8], "areas": [32, 16]},
    ]
    cfg = parse_config(raw)
    assert len(cfg.cells((32, 32))) == 2 + 4
    assert [c.change for c in cfg.unique_cells((32, 32))] == [
        PixelChange(4), PixelChange(8), PixelChange(4, area=16), PixelChange(8, area=16)
    ]


@pytest.mark.parametrize(("given", "label"), [("IMAGENET1K_V2", "IMAGENET1K_V2"), ("imagenet1k_v2", "IMAGENET1K_V2"),
                                              ("imagenet", "imagenet"), ("default", "default"), ("none", None)])
def test_weights_names_of_the_model_registry_are_accepted(given, label):
    # the registry's own names (torchvision's entries), as `pixelray weights download` takes them
    cfg = parse_config(base(models={"names": ["resnet101", "resnet50"], "weights": given}))
    assert cfg.weights == label


def test_run_options_of_the_hot_path():
    cfg = parse_config(base(run={"cells_per_pass": 4, "cuda_graphs": True}))
    assert (cfg.cells_per_pass, cfg.cuda_graphs) == (4, True)
    assert parse_config(base()).cells_per_pass is None and not parse_config(base()).cuda_graphs  # None: "auto"
    assert parse_config(base(run={"cells_per_pass": "auto"})).cells_per_pass is None
    assert cfg.config_hash == parse_config(base()).config_hash  # how fast it runs is not identity


def test_overrides_and_config_hash():
    cfg = parse_config(base(), overrides={"output_dir": "elsewhere", "metrics_port": None})
    assert cfg.output_dir == "elsewhere"
    assert cfg.config_hash == parse_config(base()).config_hash  # where results go is not identity
    assert cfg.config_hash != parse_config(base(grid={"counts": [4, 16]})).config_hash


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[data\npath = 1")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)
