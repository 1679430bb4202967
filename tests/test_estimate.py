"""What a sweep costs before it runs: the passes an attack unit counts, rates per model, the estimate, max_cost."""

from __future__ import annotations

import re

import pytest
import torch

from pixelray.attacks import get_attack
from pixelray.config.run import parse_throughput
from pixelray.config.sweep import ConfigError, parse_config
from pixelray.core.ladder import Ladder
from pixelray.core.spec import Cell, PixelChange
from pixelray.engine.adversarial import attack_images, attack_outcomes
from pixelray.models import load_model
from pixelray.sweep.estimate import estimate, throughput_from_stats
from pixelray.sweep.plan import PhasePlan, SweepPlan


class Counted:
    """Images through a model's forward, apart for passes with gradients: a counter the code cannot set."""

    def __init__(self, model: torch.nn.Module):
        self.plain = self.grad = 0
        model.register_forward_hook(self._seen)

    def _seen(self, module, args, output) -> None:
        if torch.is_grad_enabled() and not torch.is_inference_mode_enabled():
            self.grad += len(args[0])
        else:
            self.plain += len(args[0])


@pytest.mark.parametrize(("kind", "params", "report_float", "keep_all"), [
    ("fgsm", (), True, False),
    ("fgsm", (), False, True),
    ("pgd", (("random_start", True), ("seed", 0), ("step", None), ("steps", 3)), False, False),
])
def test_an_attack_unit_counts_the_images_its_models_see(kind, params, report_float, keep_all):
    """The worker's count (``attack_images``) against forward hooks on the attacked model and on a judge: the
    attack's verdicts and gradient steps, the cells and the judge over the eligible examples, the restore
    ladders; the attacked model's own verdict is not a pass."""
    model, judge = load_model("tiny", None, num_classes=10), load_model("tiny", None, num_classes=10, init_seed=1)
    seen, judged = Counted(model.net), Counted(judge.net)
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (23, 32, 32, 3), generator=gen, dtype=torch.uint8)
    labels = torch.randint(0, 10, (23,), generator=gen)
    ids = torch.arange(100, 123)
    cells = [Cell(PixelChange(c)) for c in (4, 64)]
    ladders = (Ladder(seed=0, max_count=64),)
    bits = attack_outcomes(model, images, labels, ids, (8, 32), cells, [None, judge], 10, keep_all=keep_all,
                           attack=kind, params=params, report_float=report_float, ladders=ladders, size=5)
    cost = get_attack(kind).passes(dict(params), report_float)
    forward, grad = attack_images(bits, cost, keep_all, len(cells), judges=1)
    assert (forward, grad) == (seen.plain + judged.plain, seen.grad + judged.grad)
    assert grad == 2 * 23 * (3 if kind == "pgd" else 1) and judged.grad == 0  # by hand: eps x images x steps
    assert bits["success"].any()  # the cells and the judge had examples to see


def test_the_costs_of_the_built_in_attacks():
    assert get_attack("fgsm").passes({}, report_float=False) == (1, 1, False)
    assert get_attack("fgsm").passes({}, report_float=True) == (2, 1, False)
    assert get_attack("pgd").passes({"steps": 7, "step": None, "random_start": True, "seed": 0}, False) == (1, 7, False)
    plugin = get_attack("toy_attack:TOY")  # no cost given: one verdict pass, no gradient (needs_grad False)
    assert plugin.passes({"shift": 1}, report_float=True) == (1, 0, False)


def test_rates_given_per_model_or_for_all():
    rates = parse_throughput(["900:300", "vgg=400"], ["resnet", "vgg"])
    assert (rates["resnet"].forward, rates["resnet"].grad) == (900, 300)
    assert (rates["vgg"].forward, rates["vgg"].grad) == (400, 400 / 3)  # a third with gradients by default
    assert parse_throughput(["vgg=400"], ["resnet", "vgg"]).keys() == {"vgg"}
    for bad, said in (("fast", "expected [MODEL=]IMAGES_PER_S"), ("vgg=-1", "positive"), ("x=5", "'x' is not a model"),
                      ("vgg=1:nan", "positive")):
        with pytest.raises(ConfigError, match=re.escape(said)):
            parse_throughput([bad], ["resnet", "vgg"])


def _plan(models=("tiny", "resnet18")) -> SweepPlan:
    config = parse_config({"data": {"path": "/nowhere"}, "models": {"names": list(models), "weights": "none"},
                           "grid": {"counts": [1]}, "output": {"dir": "/tmp/x"}})
    phases = (PhasePlan("clean", 1, 1000, True), PhasePlan("attack:pgd", 1, 3000, False, grad_images=2000))
    return SweepPlan(config, 1000, 1, (32, 32), 10, 1, 1, (), phases, None)


def test_the_estimate_is_the_images_over_the_rates_spread_over_the_workers():
    rates = parse_throughput(["tiny=1000:500", "resnet18=2000:250"], ["tiny", "resnet18"])
    est = estimate(_plan(), rates, workers=2)
    # by hand: tiny: 1000/1000 + 3000/1000 + 2000/500 = 8 s; resnet18: 0.5 + 1.5 + 8 = 10 s
    assert est.seconds == {"tiny": 8.0, "resnet18": 10.0} and est.compute_s == 18.0 and est.wall_s == 9.0
    assert est.by_phase == {"clean": 1.5, "attack:pgd": 16.5}
    with pytest.raises(ConfigError, match=r"no throughput for model\(s\) \['resnet18'\]"):
        estimate(_plan(), {"tiny": rates["tiny"]})


def test_rates_read_back_from_a_runs_stats():
    """A run's by_model figures: forward from the phases without gradients; grad from what the attack's seconds
    leave after its inference images (numbers chosen by hand)."""
    stats = {"by_model": {"a": {"clean": {"images": 600, "grad_images": 0, "compute_s": 0.5},
                                "cells": {"images": 1400, "grad_images": 0, "compute_s": 1.5},
                                "attack": {"images": 3000, "grad_images": 1000, "compute_s": 7.0}}}}
    (rate,) = throughput_from_stats(stats, ["a"], "s.json").values()
    assert rate.forward == 1000.0  # 2000 images in 2 s
    assert rate.grad == 250.0  # 7 s - 3000 / 1000 = 4 s for 1000 images
    with pytest.raises(ConfigError, match="s.json: no figures for model 'b'"):
        throughput_from_stats(stats, ["b"], "s.json")


def test_max_cost_in_device_hours_needs_rates_and_refuses_above_them(tmp_path):
    from pixelray.errors import SweepError
    from pixelray.sweep.plan import check_cost

    raw = {"data": {"path": "/nowhere"}, "models": {"names": ["tiny", "resnet18"], "weights": "none"},
           "grid": {"counts": [1]}, "output": {"dir": str(tmp_path)}}
    with pytest.raises(ConfigError, match=r"max_cost = '0.005 device-hours' needs the models' speed"):
        parse_config({**raw, "run": {"max_cost": "0.005 device-hours"}})
    for bad in ("5 hours", "-1 device-hours", "0 gpu-hours"):
        with pytest.raises(ConfigError, match="expected a number of images forwarded"):
            parse_config({**raw, "run": {"max_cost": bad}})
    with pytest.raises(ConfigError, match="'vgg11' is not a model"):
        parse_config({**raw, "run": {"throughput": ["vgg11=5"]}})
    plan = _plan()
    for hours, refused in ((18 / 3600, False), (17.9 / 3600, True)):  # the estimate above: 18 s
        config = parse_config({**raw, "run": {"max_cost": f"{hours} device-hours",
                                              "throughput": ["tiny=1000:500", "resnet18=2000:250"]}})
        limited = SweepPlan(config, *[getattr(plan, f) for f in list(SweepPlan.__dataclass_fields__)[1:]])
        if refused:
            with pytest.raises(SweepError, match=r"may take 0.01 device-hours under \[run\] throughput"):
                check_cost(limited)
        else:
            check_cost(limited)
