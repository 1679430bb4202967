"""Ladders (pixels to failure): the draws against a reference written from the README, nesting, and the searches
against a plain loop over every count."""

from __future__ import annotations

import math

import numpy as np
import pytest
import reference_perturb as ref
import torch
from exact_models import ExactNet, make0
from hypothesis import given, settings
from hypothesis import strategies as st

from pixelray.config.sweep import ConfigError, parse_config
from pixelray.core.ladder import Ladder, ladder_points
from pixelray.core.ladder_draws import LadderDraws, describe_ladder
from pixelray.engine.ladder import search_ladder

ladders = st.builds(
    Ladder,
    amplitude=st.sampled_from(["full", 1, 40, 255]),
    area=st.sampled_from([None, 1, 5, 16]),
    channels=st.sampled_from(["all", (0,), (1, 2)]),
    seed=st.integers(0, 2**31 - 1),
)


def _columns(ladder: Ladder) -> tuple[str, int | None, str]:
    channels = "all" if ladder.channels == "all" else ",".join(map(str, ladder.channels))
    return str(ladder.amplitude), ladder.area, channels


@settings(max_examples=30, deadline=None)
@given(ladder=ladders, image_id=st.integers(-2**40, 2**40), data=st.data())
def test_the_draws_equal_the_readme_reference(ladder, image_id, data):
    """Image with its first k changes, engine vs tests/reference_perturb.py (written from the README's words)."""
    ladder = ladder.for_image(16, 16)  # an area of 16 on 16 x 16 images is the whole image, as results name it
    size = ladder.size(16, 16)
    k = data.draw(st.integers(0, size))
    image = torch.from_numpy(np.random.default_rng(abs(image_id) % 1000).integers(0, 256, (16, 16, 3), np.uint8))
    amplitude, area, channels = _columns(ladder)
    the_id = ref.ladder_id(amplitude, area, channels, ladder.seed, 16)
    assert the_id == ladder.ladder_id
    expected = ref.ladder_image(image, image_id, k, the_id, amplitude, area, channels)
    draws = LadderDraws(ladder, 16, 16)
    assert torch.equal(draws.apply(image[None], [image_id], [k])[0], expected)
    nchw = draws.apply(image.permute(2, 0, 1)[None].contiguous(), [image_id], [k])[0]
    assert torch.equal(nchw.permute(1, 2, 0), expected)


@settings(max_examples=40, deadline=None)
@given(ladder=ladders, ids=st.lists(st.integers(-2**40, 2**40), min_size=1, max_size=6, unique=True), data=st.data())
def test_changes_nest_the_positions_and_values_at_k_are_those_at_any_larger_k(ladder, ids, data):
    size = ladder.size(16, 16)
    k = data.draw(st.integers(1, size))
    k2 = data.draw(st.integers(k, size))
    draws = LadderDraws(ladder, 16, 16)
    assert torch.equal(draws.order(ids, k2)[:, :k], draws.order(ids, k))
    assert torch.equal(draws.raw_values(ids, k2)[:, :k], draws.raw_values(ids, k))
    images = torch.from_numpy(np.random.default_rng(k).integers(0, 256, (len(ids), 16, 16, 3), np.uint8))
    small, large = draws.apply(images, ids, [k] * len(ids)), draws.apply(images, ids, [k2] * len(ids))
    pix = draws.pixels(draws.order(ids, k))  # the first k positions: the same new values in both images
    for i in range(len(ids)):
        ys, xs = pix[i] // 16, pix[i] % 16
        assert torch.equal(small[i, ys, xs], large[i, ys, xs])
        assert len(set(pix[i].tolist())) == k  # distinct positions
    outside = (small != images).any(-1).flatten(1)  # changed at k: only the first k positions
    allowed = torch.zeros_like(outside)
    allowed.scatter_(1, pix, True)
    assert not (outside & ~allowed).any()


def test_one_image_per_call_or_a_batch_in_any_order_draws_the_same():
    draws = LadderDraws(Ladder(amplitude=40, seed=9), 32, 32)
    images = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (5, 32, 32, 3), np.uint8))
    ids, counts = [3, 1, 4, 1_000_000_007, -5], [10, 0, 1024, 7, 300]
    batch = draws.apply(images, ids, counts)
    perm = [4, 2, 0, 3, 1]
    again = draws.apply(images[perm], [ids[i] for i in perm], [counts[i] for i in perm])
    assert torch.equal(again, batch[perm])
    for i in range(5):
        assert torch.equal(draws.apply(images[i : i + 1], ids[i : i + 1], counts[i : i + 1])[0], batch[i])


def test_ladder_points_by_hand():
    assert ladder_points(1024, 1) == (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
    # 2**(i/4) + 0.5, floored: 1, 1.69, 1.91, 2.18, 2.5, 2.88, 3.33, 3.86, 4.5 ...
    assert ladder_points(10, 4) == (1, 2, 3, 4, 5, 6, 7, 8, 10)
    # 224 x 224: 2**(62/4) = 46341 is the last power below 50176; 63 exponents, some rounding to the same count
    assert ladder_points(50176, 4)[-1] == 50176
    assert len(ladder_points(50176, 4)) == len({math.floor(2 ** (i / 4) + 0.5) for i in range(63)}) + 1 == 59
    assert ladder_points(1024, 4, 100)[-1] == 100


def _plain_scan(model, image, label, image_id, ladder, height):
    """Every count from 1 up, one by one, with the reference draws: the verdict at each k."""
    amplitude, area, channels = _columns(ladder)
    the_id = ref.ladder_id(amplitude, area, channels, ladder.seed, height)
    top = ladder.points(height, height)[-1]
    changes = ref.ladder_changes(image, image_id, top, the_id, amplitude, area, channels)
    per = len(changes) // top
    versions, changed = [], image.clone()
    for k in range(1, top + 1):  # the image with its first k changes, one more change each time
        for y, x, c, new in changes[(k - 1) * per : k * per]:
            changed[y, x, c] = new
        versions.append(changed.permute(2, 0, 1).clone())
    with torch.no_grad():
        # one image per pass: ExactNet takes [0, 1] doubles (exact sums), a Classifier uint8 as the engine gives it
        predictions = [int(model(v[None].double() / 255 if isinstance(model, ExactNet) else v[None]).argmax())
                       for v in versions]
    return [p != label for p in predictions]  # wrong[k - 1]


@pytest.fixture(scope="module")
def exact_case():
    """ExactNet (exact logits on any CPU) and 12 random images labelled by it; a small area keeps the loop short."""
    model = make0().eval()
    images = torch.from_numpy(np.random.default_rng(3).integers(0, 256, (12, 32, 32, 3), np.uint8))
    with torch.no_grad():
        labels = model(images.permute(0, 3, 1, 2).double() / 255).argmax(1)
    return model, images, labels, torch.arange(12) * 11 + 5


@pytest.mark.parametrize("ladder", [Ladder(area=12, seed=1, refine=True),
                                    Ladder(amplitude=127, area=24, seed=2, steps_per_octave=2, max_count=300)])
def test_scan_finds_the_first_failing_point_of_a_plain_loop_over_every_count(exact_case, ladder):
    model, images, labels, ids = exact_case
    found = search_ladder(model, images.permute(0, 3, 1, 2), labels, ids, ladder, batch_size=5)
    points = ladder.points(32, 32)
    broke = 0
    for i in range(len(ids)):
        wrong = _plain_scan(model, images[i], int(labels[i]), int(ids[i]), ladder, 32)
        first = next((k for k in points if wrong[k - 1]), None)
        assert found["n_fail"][i] == (-1 if first is None else first)
        below = [k for k in points if first is None or k < first]
        assert not any(wrong[k - 1] for k in below)  # correct at every point below n_fail
        assert found["n_last_correct"][i] == (below[-1] if below else 0)
        assert found["n_passes"][i] == len(below) + (first is not None) + (
            math.ceil(math.log2(first - found["n_last_correct"][i])) if ladder.refine and first else 0)
        if ladder.refine and first is not None:  # the bisection's bracket: correct just below, wrong at it
            r = found["n_fail_refined"][i]
            assert found["n_last_correct"][i] < r <= first and wrong[r - 1] and (r == 1 or not wrong[r - 2])
        broke += first is not None
    assert 0 < broke < len(ids)  # the case has both kinds


def test_bisect_agrees_with_scan_where_breakage_is_monotone_and_says_it_may_not(exact_case):
    """On a monotone image bisect finds scan's point in fewer passes; ExactNet on random images is not always
    monotone, which is why scan is the default."""
    model, images, labels, ids = exact_case
    nchw = images.permute(0, 3, 1, 2)
    scan = search_ladder(model, nchw, labels, ids, Ladder(area=12, seed=1), 12)
    bisect = search_ladder(model, nchw, labels, ids, Ladder(area=12, seed=1, search="bisect"), 12)
    points = Ladder(area=12).points(32, 32)
    assert bisect["n_passes"].max() <= 1 + math.ceil(math.log2(len(points)))
    for i in range(len(ids)):
        wrong = _plain_scan(model, images[i], int(labels[i]), int(ids[i]), Ladder(area=12, seed=1), 32)
        flags = [wrong[k - 1] for k in points]
        if flags == sorted(flags):  # monotone on the ladder: once wrong, wrong
            assert bisect["n_fail"][i] == scan["n_fail"][i]


def test_searches_do_not_depend_on_the_batch(exact_case):
    model, images, labels, ids = exact_case
    nchw = images.permute(0, 3, 1, 2)
    ladder = Ladder(area=12, seed=4, refine=True)
    one = search_ladder(model, nchw, labels, ids, ladder, 1)
    perm = torch.randperm(12, generator=torch.Generator().manual_seed(0))
    many = search_ladder(model, nchw[perm], labels[perm], ids[perm], ladder, 7)
    for name in one:
        assert np.array_equal(one[name][perm.numpy()], many[name])


def test_describe_ladder_lists_the_first_changes_in_order():
    image = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (32, 32, 3), np.uint8))
    ladder = Ladder(amplitude=40, area=16, channels=(0, 2), seed=3)
    record = describe_ladder(ladder, 77, 5, 32, 32, image)
    changed = ref.ladder_image(image, 77, 5, ladder.ladder_id, "40", 16, "0,2")
    assert len(record.y) == 10 and record.channel[:2] == (0, 2)
    for y, x, c, new in zip(record.y, record.x, record.channel, record.value, strict=True):
        assert changed[y, x, c] == new
    assert int((changed != image).any(-1).sum()) <= 5


def test_rows_rebuild_their_ladder_from_columns():
    ladder = Ladder(amplitude=10, area=8, channels=(1,), seed=5, steps_per_octave=2, max_count=40, refine=True)
    row = {"amplitude": "10", "area": 8, "channels": "1", "seed": 5, "steps_per_octave": 2, "max_count": 40,
           "search": "scan", "refine": True, "image_size": 32}
    assert Ladder.from_columns(row) == ladder
    whole = {**row, "area": 32, "max_count": 1024, "channels": "all", "refine": False}
    assert Ladder.from_columns(whole).ladder_id == "ladder-a10-whole-all-seed5"
    assert Ladder.from_columns(whole).max_count is None


BASE = {"data": {"path": "d"}, "models": {"names": ["tiny"], "weights": "none"}, "output": {"dir": "o"}}


def test_config_takes_a_ladder_experiment_and_refuses_mistakes_in_one_line():
    cfg = parse_config({**BASE, "experiment": [{"name": "f", "family": "pixels_to_failure", "area": 16,
                                                "amplitude": 40, "channels": ["R"], "refine": True}],
                        "eval": {"seeds": [0, 1]}})
    assert cfg.cells((32, 32)) == [] and [lad.ladder_id for _, lad in cfg.ladders((32, 32))] == [
        "ladder-a40-s16-c0-seed0", "ladder-a40-s16-c0-seed1"]
    bad = [({"max_count": 300, "area": 16}, "max_count: 300 is larger than area 16x16"),
           ({"search": "binary"}, "search: 'binary' is unknown"),
           ({"steps_per_octave": 0}, "steps_per_octave: 0 is invalid"),
           ({"counts": [4]}, "unknown key(s) ['counts']")]
    for extra, message in bad:
        with pytest.raises(ConfigError, match=None) as err:
            parse_config({**BASE, "experiment": [{"name": "f", "family": "pixels_to_failure", **extra}]})
        assert message in str(err.value) and "\n" not in str(err.value)
    too_big = parse_config({**BASE, "experiment": [{"name": "f", "family": "pixels_to_failure", "max_count": 2000}]})
    with pytest.raises(ConfigError, match="max_count: 2000 is larger than the 1024 pixels"):
        too_big.ladders((32, 32))


def test_pixels_to_restore_an_adversarial_example_is_the_first_point_that_brings_back_its_class(exact_case):
    """The attack unit's ladders over its examples (target "right"), against the plain loop over every count."""
    from pixelray.engine.adversarial import attack_outcomes
    from pixelray.models import load_model

    _, images, _, ids = exact_case
    model = load_model("tiny", None, num_classes=10, init_seed=0).eval()  # differentiable (ExactNet rounds)
    nchw = images.permute(0, 3, 1, 2)
    with torch.no_grad():
        labels = model(nchw).argmax(1)
    ladder = Ladder(area=12, seed=7, refine=True)
    kept = {}

    def keep(_e, ex_ids, _labels, examples):
        kept.update({int(i): ex.permute(1, 2, 0).clone() for i, ex in zip(ex_ids, examples, strict=True)})

    bits = attack_outcomes(model, nchw, labels, ids, [32], [], [None], 5, ladders=[ladder], on_examples=keep)
    assert kept and len(kept) < len(ids)  # some examples fool the model, some do not
    points = ladder.points(32, 32)
    restored = 0
    for i, image_id in enumerate(ids.tolist()):
        n_fail = bits["n_fail"][0, 0, i]
        if image_id not in kept:
            assert n_fail == -1 and bits["n_passes"][0, 0, i] == -1  # not eligible: no search
            continue
        still_wrong = _plain_scan(model, kept[image_id], int(labels[i]), image_id, ladder, 32)  # wrong[k - 1]
        first = next((k for k in points if not still_wrong[k - 1]), None)
        assert n_fail == (-1 if first is None else first)
        if first is not None:
            r = bits["n_fail_refined"][0, 0, i]
            assert not still_wrong[r - 1] and (r == 1 or still_wrong[r - 2])
            restored += 1
    assert restored
