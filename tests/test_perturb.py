"""apply_pixel_changes, draw_positions, draw_values, hash64: contract, determinism and uniformity.

Property tests run on small images (hypothesis); the statistical tests use fixed seeds and ids, so
they are deterministic: a chi-square statistic is compared with its 99.9% quantile, and would move
past it for a bias of a few percent.
"""

from __future__ import annotations

import hashlib
import math
from itertools import combinations, permutations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pixelray.core import draws, perturber
from pixelray.core.perturb import apply_pixel_changes, draw_positions, draw_values, hash64, image_layout
from pixelray.core.spec import Cell, PixelChange

PROPERTY = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# --- helpers ---------------------------------------------------------------------------------------


def random_images(n: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    """A reproducible uint8 NHWC batch (its own generator: no global random state)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, height, width, 3), generator=gen, dtype=torch.uint8)


def pattern_images(n: int, height: int, width: int) -> torch.Tensor:
    """A fixed, non-constant uint8 NHWC batch for the golden tests."""
    i = torch.arange(n * height * width * 3, dtype=torch.int64).view(n, height, width, 3)
    return ((i * 37 + (i // 7) * 11) % 256).to(torch.uint8)


def changed_mask(cell: Cell, ids, height: int, width: int) -> torch.Tensor:
    """(N, H, W, 3) bool: the entries the cell may change (drawn positions x chosen channels)."""
    flat = draw_positions(cell, ids, height, width)
    mask = torch.zeros(len(flat), height * width, 3, dtype=torch.bool)
    ch = torch.tensor(cell.change.channel_indices)
    rows = torch.arange(len(flat)).view(-1, 1, 1)
    mask[rows, flat.unsqueeze(-1), ch.view(1, 1, -1)] = True
    return mask.view(len(flat), height, width, 3)


def chi_square(observed: torch.Tensor, expected: float | torch.Tensor) -> float:
    observed = observed.double()
    expected = torch.as_tensor(expected, dtype=torch.float64)
    return float(((observed - expected) ** 2 / expected).sum())


def chi_square_critical(df: int, z: float = 3.090232306167813) -> float:
    """Upper quantile of chi-square(df), Wilson-Hilferty approximation; z = 3.09 gives 99.9%."""
    c = 2.0 / (9.0 * df)
    return df * (1.0 - c + z * math.sqrt(c)) ** 3


def assert_uniform(values: torch.Tensor, n_bins: int, what: str) -> None:
    observed = torch.bincount(values.reshape(-1), minlength=n_bins)
    assert len(observed) == n_bins, f"{what}: value outside 0..{n_bins - 1}"
    stat = chi_square(observed, values.numel() / n_bins)
    limit = chi_square_critical(n_bins - 1)
    assert stat < limit, f"{what}: chi-square {stat:.1f} >= {limit:.1f} (df={n_bins - 1}); not uniform"


# --- strategies ------------------------------------------------------------------------------------


@st.composite
def cases(draw, max_side: int = 12, max_batch: int = 5):
    """(cell, images NHWC uint8, ids) over random specs, image sizes, batch sizes and seeds."""
    height = draw(st.integers(1, max_side))
    width = draw(st.integers(1, max_side))
    area = draw(st.one_of(st.none(), st.integers(1, min(height, width))))
    pixels = height * width if area is None else area * area
    count = draw(st.one_of(st.integers(1, pixels), st.just(pixels)))
    amplitude = draw(st.one_of(st.just("full"), st.integers(1, 255), st.sampled_from([1, 10, 127, 255])))
    channels = draw(
        st.one_of(
            st.just("all"),
            st.lists(st.integers(0, 2), min_size=1, max_size=3, unique=True).map(tuple),
        )
    )
    positions = draw(st.sampled_from(["per-image", "shared"]))
    seed = draw(st.integers(0, 2**31 - 1))
    n = draw(st.integers(1, max_batch))
    ids = draw(st.lists(st.integers(-(2**62), 2**62), min_size=n, max_size=n))
    image_seed = draw(st.integers(0, 2**31 - 1))
    cell = Cell(PixelChange(count, amplitude, area, channels, positions), seed)
    return cell, random_images(n, height, width, image_seed), ids


# --- hash64 ----------------------------------------------------------------------------------------

_M64 = (1 << 64) - 1


def splitmix64_reference(x: int) -> int:
    """SplitMix64's output function on state x + golden (Steele, Lea & Flood 2014), in plain Python."""
    z = (x + 0x9E3779B97F4A7C15) & _M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


def test_hash64_is_splitmix64():
    values = [0, 1, 2, -1, 12345678901234, 2**62 + 17, 2**63 - 1, -(2**63), -987654321]
    got = hash64(torch.tensor(values, dtype=torch.int64))
    assert got.dtype == torch.int64
    for value, bits in zip(values, got.tolist(), strict=True):
        assert bits & _M64 == splitmix64_reference(value & _M64)
    assert int(got[0]) & _M64 == 0xE220A8397B1DCDAF  # the first SplitMix64 output from seed 0


@pytest.mark.parametrize(
    "to_ids",
    [
        pytest.param(lambda ids: ids, id="list"),
        pytest.param(tuple, id="tuple"),
        pytest.param(lambda ids: torch.tensor(ids, dtype=torch.int32), id="int32"),
        pytest.param(lambda ids: torch.tensor(ids, dtype=torch.int16), id="int16"),
        pytest.param(lambda ids: np.asarray(ids, dtype=np.int64), id="numpy"),
        pytest.param(lambda ids: torch.tensor(ids, dtype=torch.int64)[::1], id="int64"),
    ],
)
def test_draws_do_not_depend_on_how_ids_are_passed(to_ids):
    ids = [0, 1, 7, 31000, -3, 2**14]
    images = random_images(len(ids), 16, 12)
    for cell in (Cell(PixelChange(8, amplitude=20)), Cell(PixelChange(8, area=3, positions="shared"), 5)):
        reference_ids = torch.tensor(ids, dtype=torch.int64)
        assert torch.equal(draw_positions(cell, to_ids(ids), 16, 12), draw_positions(cell, reference_ids, 16, 12))
        assert torch.equal(
            apply_pixel_changes(images, cell, to_ids(ids)), apply_pixel_changes(images, cell, reference_ids)
        )
        original = images.view(len(ids), -1, 3)[:, :8].contiguous()
        assert torch.equal(draw_values(cell, to_ids(ids), original), draw_values(cell, reference_ids, original))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_same_draws_on_gpu_as_on_cpu():
    ids = torch.arange(64) * 1009 - 5
    images = random_images(64, 32, 24)
    for cell in (Cell(PixelChange(16)), Cell(PixelChange(16, amplitude=10, area=4), 3)):
        cpu = apply_pixel_changes(images, cell, ids)
        gpu = apply_pixel_changes(images.cuda(), cell, ids.cuda())
        assert gpu.device.type == "cuda"
        assert torch.equal(cpu, gpu.cpu())
        assert torch.equal(draw_positions(cell, ids, 32, 24), draw_positions(cell, ids.cuda(), 32, 24).cpu())


# --- golden outputs (pin the random streams bit for bit) -------------------------------------------

GOLDEN_IDS = [0, 1, 2, 1000, 2**40, -5]
GOLDEN = [
    (
        Cell(PixelChange(64), 0), 224, 224,
        "18482c18779f978512d03fb1e551319e9b4613bfac28e8b61f48aa3e372a5513",
        [368, 48213, 23542, 18808, 23901, 30319],
    ),
    (
        Cell(PixelChange(16, amplitude=10, area=50, channels=(0,)), 3), 224, 224,
        "c9c4a3d013dc63fba6c2ec685a4f483b004281e993c71b97c5c635fcd8835d7c",
        [20486, 22954, 25880, 26984, 26765, 22296],
    ),
    (
        Cell(PixelChange(8, amplitude=127, area=8, positions="shared"), 1), 224, 224,
        "1492dd0661779c2ba44554334825091c2fb4cdf4642c4515f9da4058c680b7dc",
        [24977, 24527, 25201, 24306, 24979, 25869],
    ),
    (
        Cell(PixelChange(5, channels=("G", "B")), 2), 13, 17,
        "4cda87fd2cc5ff9ef17a7af312a6a75375393edfc4e421eb535afd7e83a947a6",
        [119, 79, 35, 73, 122],
    ),
    (
        Cell(PixelChange(20, amplitude=40, area=5), 9), 13, 17,
        "c2b2219cdf854b5bac863779b848d4a11a56ee0b53a07b977b1ddf3f57c6c6ad",
        [76, 109, 74, 111, 95, 125],
    ),
]


@pytest.mark.parametrize(("cell", "height", "width", "digest", "first"), GOLDEN, ids=[g[0].cell_id for g in GOLDEN])
def test_golden_outputs(cell, height, width, digest, first):
    images = pattern_images(len(GOLDEN_IDS), height, width)
    out = apply_pixel_changes(images, cell, GOLDEN_IDS)
    assert draw_positions(cell, GOLDEN_IDS, height, width)[0, : len(first)].tolist() == first
    assert hashlib.sha256(out.numpy().tobytes()).hexdigest() == digest
    nchw = apply_pixel_changes(images.permute(0, 3, 1, 2).contiguous(), cell, GOLDEN_IDS)
    assert hashlib.sha256(nchw.permute(0, 2, 3, 1).contiguous().numpy().tobytes()).hexdigest() == digest


# --- properties over random specs, sizes, batches and seeds ----------------------------------------


@PROPERTY
@given(cases())
def test_positions_distinct_and_inside_the_centred_area(case):
    cell, images, ids = case
    n, height, width = images.shape[:3]
    flat = draw_positions(cell, ids, height, width)
    assert flat.shape == (n, cell.change.count) and flat.dtype == torch.int64
    assert flat.device.type == "cpu"
    for row in flat.tolist():
        assert len(set(row)) == cell.change.count
    top, left, rows, cols = cell.change.region(height, width)
    if cell.change.area is not None:
        s = cell.change.area
        assert (top, left, rows, cols) == ((height - s) // 2, (width - s) // 2, s, s)
    ys, xs = flat // width, flat % width
    assert bool(((ys >= top) & (ys < top + rows) & (xs >= left) & (xs < left + cols)).all())
    if cell.change.positions == "shared":
        assert bool((flat == flat[:1]).all())


@PROPERTY
@given(cases())
def test_changes_only_drawn_positions_and_channels_within_amplitude(case):
    cell, images, ids = case
    n, height, width = images.shape[:3]
    before = images.clone()
    out = apply_pixel_changes(images, cell, ids)
    assert torch.equal(images, before), "the input was modified"
    assert out.dtype == torch.uint8 and out.shape == images.shape
    assert out.data_ptr() != images.data_ptr()
    diff = out != images
    allowed = changed_mask(cell, ids, height, width)
    assert not bool((diff & ~allowed).any()), "changed outside the drawn positions or channels"
    if cell.change.amplitude != "full":
        shift = (out.to(torch.int16) - images.to(torch.int16)).abs()
        assert int(shift.max()) <= cell.change.amplitude


@PROPERTY
@given(cases())
def test_layouts_and_memory_formats_agree(case):
    cell, images, ids = case
    out = apply_pixel_changes(images, cell, ids)
    # NCHW contiguous (a 3-wide NCHW batch is read as NHWC, see image_layout)
    if images.shape[2] != 3:
        nchw = images.permute(0, 3, 1, 2).contiguous()
        assert image_layout(nchw) == "NCHW"
        got = apply_pixel_changes(nchw, cell, ids)
        assert got.is_contiguous() and got.shape == nchw.shape
        assert torch.equal(got.permute(0, 2, 3, 1), out)
        # NCHW in channels_last memory format: the NHWC buffer seen as NCHW
        cl = images.permute(0, 3, 1, 2)
        assert cl.is_contiguous(memory_format=torch.channels_last)
        got = apply_pixel_changes(cl, cell, ids)
        assert got.shape == cl.shape and got.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(got.permute(0, 2, 3, 1), out)
    # a non-contiguous NHWC view gives the values of its contiguous copy
    wide = torch.zeros(*images.shape[:2], 2 * images.shape[2], 3, dtype=torch.uint8)
    wide[:, :, ::2] = images
    view = wide[:, :, ::2]
    assert torch.equal(view, images)
    assert torch.equal(apply_pixel_changes(view, cell, ids), out)


@PROPERTY
@given(cases(), st.randoms(use_true_random=False))
def test_an_image_gets_the_same_change_alone_or_anywhere_in_a_batch(case, rnd):
    cell, images, ids = case
    out = apply_pixel_changes(images, cell, ids)
    order = list(range(len(ids)))
    rnd.shuffle(order)
    shuffled = apply_pixel_changes(images[order], cell, [ids[i] for i in order])
    assert torch.equal(shuffled, out[order])
    for i in range(len(ids)):
        assert torch.equal(apply_pixel_changes(images[i : i + 1], cell, [ids[i]]), out[i : i + 1])
    # the same id twice gets the same change
    twice = apply_pixel_changes(torch.cat([images[:1], images[:1]]), cell, [ids[0], ids[0]])
    assert torch.equal(twice[0], out[0]) and torch.equal(twice[1], out[0])


def _check_big_batch(cell: Cell, n: int = 1000) -> None:
    height = width = 16
    images = random_images(n, height, width, seed=11)
    ids = torch.arange(n, dtype=torch.int64) * 7919 + 3
    out = apply_pixel_changes(images, cell, ids)
    flat = torch.sort(draw_positions(cell, ids, height, width), dim=1).values
    assert bool((flat[:, 1:] != flat[:, :-1]).all()), "positions repeat within an image"
    # uneven chunks, in reverse order
    bounds = [0, 1, 8, 100, 333, 334, 999, n]
    parts = [(a, b) for a, b in zip(bounds[:-1], bounds[1:], strict=True)][::-1]
    for a, b in parts:
        assert torch.equal(apply_pixel_changes(images[a:b], cell, ids[a:b]), out[a:b])
    for i in (0, 1, 499, 998, 999):
        assert torch.equal(apply_pixel_changes(images[i : i + 1], cell, ids[i : i + 1]), out[i : i + 1])
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(5))
    assert torch.equal(apply_pixel_changes(images[perm], cell, ids[perm]), out[perm])


@pytest.mark.parametrize(
    "cell",
    [
        Cell(PixelChange(8), 1),  # candidate path
        Cell(PixelChange(40, amplitude=70, area=16, channels=(0,)), 2),  # top-k path (256 <= 8 x 40)
        Cell(PixelChange(8, area=10, positions="shared"), 3),
    ],
    ids=lambda c: c.cell_id,
)
def test_big_batch_matches_small_batches(cell):
    _check_big_batch(cell)


def test_big_batch_matches_small_batches_when_candidates_run_short(monkeypatch):
    # Force the candidate path on a crowded area, where some images need more than one round of
    # candidates: extending the stream must not change the images that had enough in round one.
    monkeypatch.setattr(perturber, "_TOPK_FACTOR", 0)
    cell = Cell(PixelChange(20, area=5), 4)  # 25 positions, 72 candidates in round one
    ids = torch.arange(1000)
    keys = draws.image_keys(cell, ids).unsqueeze(1)
    first_round = draws.uniform(draws.stream_bits(keys, draws.STREAM_POSITION, torch.arange(72)), 25)
    _, enough = draws._first_distinct(first_round, 20)
    assert 0 < int((~enough).sum()) < 1000, "the case should mix images with and without a second round"
    _check_big_batch(cell)


def test_first_distinct():
    candidates = torch.tensor([[3, 3, 1, 3, 2, 0], [5, 5, 5, 5, 5, 5], [0, 1, 2, 3, 4, 5]])
    keep, enough = draws._first_distinct(candidates, 3)
    assert enough.tolist() == [True, False, True]
    assert candidates[0][keep[0]].tolist() == [3, 1, 2]
    assert candidates[2][keep[2]].tolist() == [0, 1, 2]


# --- seeds, ids, shared positions ------------------------------------------------------------------


def test_another_seed_or_id_gives_another_change():
    images = random_images(4, 32, 32)
    ids = [10, 11, 12, 13]
    outs = [apply_pixel_changes(images, Cell(PixelChange(16), seed), ids) for seed in range(8)]
    positions = [draw_positions(Cell(PixelChange(16), seed), ids, 32, 32) for seed in range(8)]
    for a, b in combinations(range(8), 2):
        assert not torch.equal(outs[a], outs[b])
        for i in range(4):
            assert set(positions[a][i].tolist()) != set(positions[b][i].tolist())
    # within one seed, images with different ids get different positions
    for i, j in combinations(range(4), 2):
        assert set(positions[0][i].tolist()) != set(positions[0][j].tolist())
    # when every position changes, the values still depend on the seed
    full = [apply_pixel_changes(images[:, :4, :4].contiguous(), Cell(PixelChange(16, area=4), s), ids) for s in (0, 1)]
    assert not torch.equal(full[0], full[1])


def test_cells_differing_in_one_field_draw_differently():
    base = PixelChange(16, amplitude=40, area=20)
    variants = [
        base,
        PixelChange(16, amplitude=41, area=20),
        PixelChange(16, amplitude=40, area=20, channels=(0, 1)),
        PixelChange(16, amplitude=40, area=21),
        PixelChange(17, amplitude=40, area=20),
    ]
    ids = [0, 1, 2]
    draws = [draw_positions(Cell(v), ids, 32, 32)[:, :16] for v in variants]
    for a, b in combinations(range(len(draws)), 2):
        assert not torch.equal(draws[a], draws[b])


def test_shared_positions_are_the_same_list_for_every_image_and_batch():
    cell = Cell(PixelChange(12, area=20, positions="shared"), 6)
    a = draw_positions(cell, [0, 1, 2, 3], 32, 32)
    b = draw_positions(cell, [99, -1, 2**50], 32, 32)
    assert bool((a == a[0]).all()) and bool((b == a[0]).all())
    assert not torch.equal(a[0], draw_positions(Cell(cell.change, 7), [0], 32, 32)[0])
    # the values are still drawn per image
    images = torch.full((3, 32, 32, 3), 128, dtype=torch.uint8)
    out = apply_pixel_changes(images, cell, [0, 1, 2])
    assert not torch.equal(out[0], out[1]) and not torch.equal(out[1], out[2])
    changed = (out != images).any(dim=-1).view(3, -1)
    assert bool(changed[:, a[0]].any(dim=0).all()) and not bool(changed.any(dim=0).sum() > 12)


# --- values ----------------------------------------------------------------------------------------


def test_full_amplitude_values_cover_0_to_255_uniformly():
    cell = Cell(PixelChange(64), 8)
    ids = torch.arange(2000)
    values = draw_values(cell, ids, torch.zeros(2000, 64, 3, dtype=torch.uint8))
    assert values.dtype == torch.uint8 and values.shape == (2000, 64, 3)
    assert_uniform(values.long(), 256, "full-amplitude values")
    for c in range(3):  # each channel on its own
        assert_uniform(values[:, :, c].long(), 256, f"full-amplitude values, channel {c}")
    # and through apply_pixel_changes, on a batch of images
    images = torch.zeros(1000, 16, 16, 3, dtype=torch.uint8)
    out = apply_pixel_changes(images, Cell(PixelChange(32), 1), torch.arange(1000))
    drawn = out.view(1000, -1, 3)[torch.arange(1000).view(-1, 1), draw_positions(Cell(PixelChange(32), 1),
                                                                                 torch.arange(1000), 16, 16)]
    assert torch.equal(torch.unique(drawn), torch.arange(256, dtype=torch.uint8))


def test_channels_are_drawn_independently():
    values = draw_values(Cell(PixelChange(64), 2), torch.arange(2000), torch.zeros(2000, 64, 3, dtype=torch.uint8))
    pairs = values[..., 0].long() // 16 * 16 + values[..., 1].long() // 16  # 256 joint bins of (R, G)
    assert_uniform(pairs, 256, "(R, G) pairs")
    assert float((values[..., 0] == values[..., 1]).float().mean()) < 2 / 256


@pytest.mark.parametrize("amplitude", [1, 10, 40, 127])
def test_shift_values_are_centred_and_uniform(amplitude):
    n = 4000
    cell = Cell(PixelChange(16, amplitude=amplitude), 3)
    grey = torch.full((n, 16, 3), 128, dtype=torch.uint8)
    shift = draw_values(cell, torch.arange(n), grey).long() - 128
    assert int(shift.min()) == -amplitude and int(shift.max()) == amplitude
    sd = math.sqrt(((2 * amplitude + 1) ** 2 - 1) / 12)
    assert abs(float(shift.double().mean())) < 4 * sd / math.sqrt(shift.numel())
    assert_uniform(shift + amplitude, 2 * amplitude + 1, f"shift +-{amplitude}")


def test_shift_clips_to_0_255():
    cell = Cell(PixelChange(16, amplitude=100), 0)
    for level, edge in ((250, 255), (5, 0)):
        base = torch.full((500, 16, 3), level, dtype=torch.uint8)
        values = draw_values(cell, torch.arange(500), base).long()
        assert int((values - level).abs().max()) <= 100
        hit = float((values == edge).float().mean())
        # the mass beyond the edge (95 of the 201 shifts) lands on it
        assert abs(hit - 96 / 201) < 0.02


# --- uniformity of positions -----------------------------------------------------------------------


def _draw(cell: Cell, n: int, height: int, width: int) -> tuple[torch.Tensor, int]:
    """Positions of n images, as indices into the area (row-major), and the area's size."""
    flat = draw_positions(cell, torch.arange(n) * 31 + 17, height, width)
    top, left, rows, cols = cell.change.region(height, width)
    return (flat // width - top) * cols + (flat % width - left), rows * cols


@pytest.mark.parametrize(
    ("change", "height", "width"),
    [
        pytest.param(PixelChange(4, area=10), 12, 12, id="candidates-area-10"),  # 100 > 8 x 4
        pytest.param(PixelChange(3), 5, 7, id="candidates-whole-5x7"),  # 35 > 8 x 3
        pytest.param(PixelChange(4, area=4), 9, 6, id="topk-area-4"),  # 16 <= 8 x 4
        pytest.param(PixelChange(11, area=9), 9, 9, id="topk-area-9"),  # 81 <= 8 x 11
    ],
)
def test_positions_are_uniform_over_the_area(change, height, width):
    cell = Cell(change, 1)
    positions, size = _draw(cell, 20000, height, width)
    path_is_topk = size <= perturber._TOPK_FACTOR * change.count
    assert path_is_topk == (change.area in (4, 9))
    assert_uniform(positions, size, "all positions")
    # the order within an image carries no bias: the first and the last drawn are uniform too
    assert_uniform(positions[:, 0], size, "first position")
    assert_uniform(positions[:, -1], size, "last position")


@pytest.mark.parametrize("topk_factor", [8, 0], ids=["topk", "candidates"])
def test_pairs_are_uniform_subsets(monkeypatch, topk_factor):
    monkeypatch.setattr(perturber, "_TOPK_FACTOR", topk_factor)
    cell = Cell(PixelChange(2, area=3), 2)  # 9 positions: 36 subsets, 72 ordered pairs
    positions, size = _draw(cell, 36000, 3, 3)
    first, second = positions[:, 0], positions[:, 1]
    assert bool((first != second).all())
    ordered = {pair: i for i, pair in enumerate(permutations(range(9), 2))}
    codes = torch.tensor([ordered[(a, b)] for a, b in zip(first.tolist(), second.tolist(), strict=True)])
    assert_uniform(codes, 72, "ordered pairs")


def test_the_chi_square_check_catches_a_small_bias():
    # The same check on a sample 8% more likely to hit the lower half of 100 positions must fail.
    weights = torch.ones(100)
    weights[:50] = 1.08
    sample = torch.multinomial(weights, 80000, replacement=True, generator=torch.Generator().manual_seed(0))
    with pytest.raises(AssertionError, match="not uniform"):
        assert_uniform(sample, 100, "biased sample")
    assert abs(chi_square_critical(15) - 37.70) < 0.3  # table value of the 99.9% quantile, df = 15
    assert abs(chi_square_critical(99) - 148.23) < 0.5


# --- bad input -------------------------------------------------------------------------------------


def test_bad_input():
    images = random_images(2, 8, 8)
    cell = Cell(PixelChange(4))
    with pytest.raises(ValueError, match="images: expected dtype uint8"):
        apply_pixel_changes(images.float(), cell, [0, 1])
    with pytest.raises(ValueError, match=r"images: expected a batch .*\(2, 8, 8\)"):
        apply_pixel_changes(images[..., 0], cell, [0, 1])
    with pytest.raises(ValueError, match="image_ids: 3 ids for a batch of 2"):
        apply_pixel_changes(images, cell, [0, 1, 2])
    with pytest.raises(ValueError, match="image_ids: expected one id per image"):
        apply_pixel_changes(images, cell, [[0, 1]])
    with pytest.raises(ValueError, match="count: 65 is larger"):
        apply_pixel_changes(images, Cell(PixelChange(65)), [0, 1])
    with pytest.raises(ValueError, match="area: 9 is larger"):
        apply_pixel_changes(images, Cell(PixelChange(4, area=9)), [0, 1])
    with pytest.raises(ValueError, match="area: 9 is larger"):
        draw_positions(Cell(PixelChange(4, area=9)), [0], 8, 8)


def test_empty_batch():
    images = torch.zeros(0, 8, 8, 3, dtype=torch.uint8)
    out = apply_pixel_changes(images, Cell(PixelChange(4)), [])
    assert out.shape == images.shape and out.dtype == torch.uint8
    assert draw_positions(Cell(PixelChange(4)), [], 8, 8).shape == (0, 4)
