"""Checkpoints of fine-tune runs: a run directory as ``checkpoint:DIR``, and heads with a label map."""

from __future__ import annotations

import json

import pytest
import torch

from pixelray.models import Classifier, LabelMap, checkpoint_sidecar, load_model, save_checkpoint


def _images(n: int = 4, size: int = 32, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, size, size, 3), dtype=torch.uint8, generator=gen)


def _mapped(labels=(2, 5, 7), space=10, seed=3) -> Classifier:
    net = load_model("tiny", None, num_classes=len(labels), init_seed=seed).net
    return Classifier(LabelMap(net, labels, space), name="mapped", num_classes=space)


def test_a_run_directory_loads_by_directory_or_by_its_model_file(tmp_path):
    model = load_model("tiny", None, num_classes=10, init_seed=4)
    run = tmp_path / "run"
    save_checkpoint(model, run / "model.pt", base="tiny", name="n4", sidecar_file=run / "pixelray.json")
    assert sorted(p.name for p in run.iterdir()) == ["model.pt", "pixelray.json"]
    x = _images()
    for spec in (f"checkpoint:{run}", f"checkpoint:{run / 'model.pt'}"):
        loaded = load_model(spec)
        assert loaded.name == "n4"
        with torch.inference_mode():
            assert torch.equal(loaded(x), model(x))
    assert checkpoint_sidecar(run)["base"] == "tiny"


def test_label_map_puts_each_output_at_its_data_set_label():
    model = _mapped()
    x = _images()
    with torch.inference_mode():
        own = model.net.net((x.permute(0, 3, 1, 2).float() / 255 - model._mean) / model._std)
        out = model(x)
    assert out.shape == (4, 10)
    assert torch.equal(out[:, [2, 5, 7]], own)  # the head's outputs, at their labels
    absent = [c for c in range(10) if c not in (2, 5, 7)]
    assert (out[:, absent] < own.min() - 1e30).all()  # never predicted
    assert set(out.argmax(1).tolist()) <= {2, 5, 7}
    loss = torch.nn.functional.cross_entropy(out, torch.tensor([0, 2, 5, 9]))
    assert torch.isfinite(loss)


def test_a_replaced_head_round_trips_with_its_label_map(tmp_path):
    model = _mapped()
    run = tmp_path / "run"
    save_checkpoint(model, run / "model.pt", base="tiny", sidecar_file=run / "pixelray.json")
    side = json.loads((run / "pixelray.json").read_text())
    assert side["num_classes"] == 3 and side["label_map"] == {"labels": [2, 5, 7], "num_classes": 10}
    assert torch.load(run / "model.pt", weights_only=True).keys() == model.net.net.state_dict().keys()
    loaded = load_model(f"checkpoint:{run}")
    assert loaded.num_classes == 10 and isinstance(loaded.net, LabelMap) and loaded.net.labels == (2, 5, 7)
    x = _images()
    with torch.inference_mode():
        assert torch.equal(loaded(x), model(x))


@pytest.mark.parametrize(
    ("label_map", "match"),
    [
        ({"labels": [2, 2, 7], "num_classes": 10}, "distinct"),
        ({"labels": [2, 5, 10], "num_classes": 10}, "0..num_classes-1"),
        ({"labels": [2, 5], "num_classes": 10}, "2 labels for a head of 3"),
        ({"labels": "2,5,7", "num_classes": 10}, "label map"),
        ([2, 5, 7], "label map"),
    ],
)
def test_a_bad_label_map_in_a_sidecar_is_refused(tmp_path, label_map, match):
    run = tmp_path / "run"
    save_checkpoint(_mapped(), run / "model.pt", base="tiny", sidecar_file=run / "pixelray.json")
    side = json.loads((run / "pixelray.json").read_text())
    (run / "pixelray.json").write_text(json.dumps({**side, "label_map": label_map}))
    with pytest.raises(ValueError, match=match):
        load_model(f"checkpoint:{run}")


def test_a_directory_without_a_model_and_a_misplaced_sidecar_are_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="directory without model.pt"):
        load_model(f"checkpoint:{tmp_path / 'empty'}")
    model = load_model("tiny", None)
    with pytest.raises(ValueError, match="sidecar_file"):
        save_checkpoint(model, tmp_path / "m.pt", base="tiny", sidecar_file=tmp_path / "pixelray.json")
    with pytest.raises(ValueError, match="sidecar_file"):
        save_checkpoint(model, tmp_path / "model.pt", base="tiny", sidecar_file=tmp_path / "other.json")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]
