"""Fine-tune configs and data plans: the paper's setting, every mistake refused, disjoint shares (no Ray)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pixelray.config.sweep import ConfigError, load_config
from pixelray.config.train import Head, Optimizer, load_train_config, parse_train_config
from pixelray.core.augment import Aug
from pixelray.core.spec import PixelChange
from pixelray.shards import read_shard, shard_uris
from pixelray.train.data import plan_data

JOBS = Path(__file__).resolve().parents[1] / "jobs"


def base(**over):
    raw = {"model": {"name": "tiny"}, "data": {"path": "shards"}, "augment": {"count": 4}, "output": {"dir": "runs/x"}}
    raw.update(over)
    return raw


def test_table10_config_is_the_papers_fine_tune_one_run_per_count():
    cfg = load_train_config(JOBS / "table10.toml")
    assert [run.output_dir for run in cfg.runs] == [f"results/table10/n{n}" for n in (4, 8, 16, 32, 64)]
    for run, n in zip(cfg.runs, (4, 8, 16, 32, 64), strict=True):
        assert (run.model, run.weights, run.head) == ("resnet101", "imagenet", Head.REPLACE)
        assert (run.images, run.epochs, run.lr, run.optimizer, run.momentum) == (1000, 20, 0.001, Optimizer.SGD, 0.9)
        assert run.augment.kind is Aug.PIXELS and run.augment.fraction == 1.0
        assert run.augment.change == PixelChange(n, "full", None, (0,), "shared")  # Algorithm 1, literally
    assert len({run.config_hash for run in cfg.runs}) == 5


def test_table10_sweep_config_plans_the_base_and_the_five_fine_tunes():
    cfg = load_config(JOBS / "table10_sweep.toml")
    assert cfg.models == ("resnet101", *(f"checkpoint:results/table10/n{n}" for n in (4, 8, 16, 32, 64)))
    cells = cfg.unique_cells((224, 224))
    assert [c.change.count for c in cells] == [4, 8, 16, 32, 64] * 2
    assert {c.change.channels for c in cells} == {"all", (0,)}
    assert len(cfg.attacks) == 1 and cfg.attacks[0].size == 10000 and cfg.eval_size == 1000


def test_flags_alone_make_one_run_and_override_a_config(tmp_path):
    flags = {"model": "tiny", "weights": "none", "data": "D", "count": 4, "epochs": 2, "output_dir": "R"}
    (run,) = load_train_config(None, flags).runs
    assert (run.model, run.weights, run.data, run.epochs, run.output_dir) == ("tiny", None, "D", 2, "R")
    assert run.augment.change == PixelChange(4)
    cfg = load_train_config(JOBS / "table10.toml", {"count": 8, "output_dir": str(tmp_path / "r"), "epochs": 1})
    (run,) = cfg.runs  # one count from the command line: one run, in the directory itself
    assert run.augment.change.count == 8 and run.output_dir == str(tmp_path / "r") and run.epochs == 1
    assert run.augment.change.channels == (0,)  # the rest of [augment] stays


def test_the_control_and_the_baselines_share_the_probe_and_everything_else():
    runs = {aug: parse_train_config(base(augment={"aug": aug, "count": 8})).runs[0]
            for aug in ("pixels", "none", "gaussian", "standard")}
    assert {r.augment.change for r in runs.values()} == {PixelChange(8)}
    assert len({r.config_hash for r in runs.values()}) == 4
    assert parse_train_config(base(augment={"aug": "none"})).runs[0].augment.change is None


def test_where_results_go_and_how_fast_they_run_are_not_identity():
    a = parse_train_config(base()).runs[0]
    b = parse_train_config(base(output={"dir": "elsewhere"}, run={"threads": 2, "max_failures": 0})).runs[0]
    assert a.config_hash == b.config_hash
    assert a.config_hash != parse_train_config(base(train={"seed": 1})).runs[0].config_hash


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (base(model={"name": "resnet1010"}), r"\[model\] name = 'resnet1010': .*did you mean resnet101"),
        (base(model={"name": "pkg.mod:factory"}), r"built-in architectures"),
        (base(model={"name": "tiny", "weights": "imagenet"}), r"weights = 'imagenet': 'tiny' brings its own"),
        (base(model={"name": "tiny", "head": "swap"}), r"head = 'swap': unknown; allowed: \['keep', 'replace'\]"),
        (base(augment={"count": 0}), r"\[augment\] count: 0 is invalid; it must be an integer >= 1"),
        (base(augment={"count": 100, "area": 8}), r"count: 100 is larger than area 8x8 = 64 pixels"),
        (base(augment={"count": [4, 4]}), r"count = \[4, 4\]: expected a non-empty list of distinct"),
        (base(augment={"aug": "pixels"}), r"count: missing; aug = 'pixels' needs count = N"),
        (base(augment={"aug": "mixup", "count": 4}), r"aug = 'mixup': unknown"),
        (base(augment={"count": 4, "fraction": 1.5}), r"fraction = 1.5: a number in \(0, 1\]"),
        (base(augment={"count": 4, "channels": ["X"]}), r"unknown channel 'X'"),
        (base(train={"epochs": 0}), r"\[train\] epochs = 0: an integer >= 1"),
        (base(train={"lr": 0}), r"\[train\] lr = 0: a positive learning rate"),
        (base(train={"lr": -0.1}), r"\[train\] lr = -0.1: a positive learning rate"),
        (base(train={"lr": "fast"}), r"\[train\] lr = 'fast': expected int or float"),
        (base(train={"optimizer": "lbfgs"}), r"optimizer = 'lbfgs': unknown; allowed: \['sgd', 'adamw'\]"),
        (base(train={"batch_size": 2}, run={"workers": 4}), r"batch_size = 2: smaller than workers = 4"),
        (base(data={"path": "d", "holdout": 1.0}), r"holdout = 1.0: a fraction in \(0, 1\)"),
        (base(data={"path": "d", "colour": 1}), r"\[data\] unknown key\(s\) \['colour'\]"),
        (base(bogus={}), r"unknown key\(s\) \['bogus'\]"),
        ({k: v for k, v in base().items() if k != "output"}, "no output directory"),
        ({k: v for k, v in base().items() if k != "data"}, r"\[data\] path: missing; pass --data DIR"),
    ],
)
def test_invalid_configs_are_refused_with_key_value_and_fix(raw, message):
    with pytest.raises(ConfigError, match=message) as info:
        parse_train_config(raw)
    assert "\n" not in str(info.value)


def _ids_of(root):
    return sorted(i for uri in shard_uris(root) for i in read_shard(uri).image_ids.tolist())


def test_shares_are_disjoint_equal_and_cover_the_training_images(synthetic_dataset):
    plan = plan_data(synthetic_dataset, None, images=None, eval_images=None, holdout=0.2, split_seed=0, workers=3)
    train = [set(s.image_ids) for s in plan.train]
    held = [set(s.image_ids) for s in plan.heldout]
    assert len({len(s) for s in train}) == 1 and plan.dropped < 3  # equal shares, at most workers - 1 left out
    assert sum(map(len, train)) == plan.n_train
    assert not (train[0] & train[1] or train[1] & train[2] or train[0] & train[2])
    everything = set(_ids_of(synthetic_dataset))  # read independently of the plan
    assert set.union(*train, *held) <= everything
    assert len(set.union(*train)) + plan.dropped + len(set.union(*held)) == len(everything) == 600
    assert not set.union(*train) & set.union(*held)
    assert 0.13 < plan.n_heldout / 600 < 0.27  # holdout 0.2 of 600 ids: within 3.4 standard errors
    assert plan.labels == tuple(range(10)) and plan.num_classes == 10 and plan.image_size == (32, 32)


def test_the_selection_is_a_seeded_permutation_independent_of_the_shard_layout(synthetic_dataset, tmp_path):
    from pixelray.datasets.synthetic import make_synthetic

    other = tmp_path / "same-images-other-shards"
    make_synthetic(other, classes=10, images=600, size=32, seed=0, rows_per_shard=37)
    assert _ids_of(other) == _ids_of(synthetic_dataset)

    def train_ids(root, n, seed=0):
        plan = plan_data(str(root), None, images=n, eval_images=50, holdout=0.2, split_seed=seed, workers=1)
        return plan.train[0].image_ids, plan.heldout[0].image_ids

    small, held = train_ids(synthetic_dataset, 100)
    big, held_big = train_ids(synthetic_dataset, 200)
    assert len(small) == 100 and set(small) < set(big) and held == held_big  # the lowest ranks: a prefix
    assert sorted(train_ids(other, 100)[0]) == sorted(small) and sorted(train_ids(other, 100)[1]) == sorted(held)
    assert set(train_ids(synthetic_dataset, 100, seed=1)[0]) != set(small)
    assert set(small) != set(sorted(_ids_of(synthetic_dataset))[:100])  # not simply the lowest ids


def test_too_few_images_and_a_mismatched_eval_set_are_refused(synthetic_dataset, tmp_path):
    from pixelray.datasets.synthetic import make_synthetic

    with pytest.raises(ValueError, match="images: 5000 training images asked for, but .* has only"):
        plan_data(synthetic_dataset, None, images=5000, eval_images=10, holdout=0.2, split_seed=0, workers=1)
    other = tmp_path / "c12"
    make_synthetic(other, classes=12, images=24, size=32, seed=0, rows_per_shard=24)
    with pytest.raises(ValueError, match="must share the training data's size and label space"):
        plan_data(synthetic_dataset, str(other), images=None, eval_images=10, holdout=0.2, split_seed=0, workers=1)
