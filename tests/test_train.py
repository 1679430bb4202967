"""The tiny CNN learns the synthetic data set; augmentation uses the sweep's own perturbation."""

from __future__ import annotations

import pytest
import torch

from pixelray.core.spec import PixelChange
from pixelray.datasets.synthetic import make_synthetic
from pixelray.models import load_model
from pixelray.train.fit import TrainConfig, fit, load_all


@pytest.fixture(scope="module")
def train_test(tmp_path_factory):
    root = tmp_path_factory.mktemp("learn")
    make_synthetic(root / "train", classes=10, images=1000, size=32, seed=0, rows_per_shard=500)
    make_synthetic(root / "test", classes=10, images=300, size=32, seed=1, rows_per_shard=300)
    return str(root / "train"), str(root / "test")


def accuracy(model, root):
    _, labels, images = load_all(root)
    with torch.inference_mode():
        return float((model(images).argmax(1) == labels).float().mean())


def test_tiny_cnn_exceeds_95_percent_on_held_out_synthetic_data(train_test):
    train, test = train_test
    model = load_model("tiny", None, num_classes=10, init_seed=0)
    assert accuracy(model, test) < 0.5  # untrained: chance level, so the bar below means learning
    fit(model, train, TrainConfig(epochs=4, seed=0))
    assert accuracy(model, test) > 0.95


def test_training_is_deterministic_with_and_without_augmentation(train_test):
    train, _ = train_test
    states = []
    for _ in range(2):
        model = load_model("tiny", None, num_classes=10, init_seed=3)
        fit(model, train, TrainConfig(epochs=1, seed=5, augment=PixelChange(8)))
        states.append(model.state_dict())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    plain = load_model("tiny", None, num_classes=10, init_seed=3)
    fit(plain, train, TrainConfig(epochs=1, seed=5))
    assert not all(torch.equal(states[0][k], v) for k, v in plain.state_dict().items())


def test_bad_training_settings_are_refused():
    with pytest.raises(ValueError, match="epochs: 0"):
        TrainConfig(epochs=0)
    with pytest.raises(ValueError, match="lr"):
        TrainConfig(lr=0)
