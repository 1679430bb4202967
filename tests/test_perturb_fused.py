"""The fused engine (``Perturber``) against the code before it (``reference_perturb``), bit for bit.

Every draw must stay what it was: the same positions and values for every (seed, cell, image id),
whichever cells share a pass, in which layout, with which chunking, and however the forward
passes are grouped. The reference is the perturbation code of commit fbc5ed4, kept verbatim.
"""

from __future__ import annotations

import pytest
import reference_perturb as ref
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pixelray.core import perturber
from pixelray.core.perturb import Perturber, apply_pixel_changes, draw_positions
from pixelray.core.spec import Cell, PixelChange

PROPERTY = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def images_of(n, height, width, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, height, width, 3), generator=gen, dtype=torch.uint8)


@st.composite
def plans(draw, max_side=14, max_batch=5, max_cells=6):
    """(cells, images NHWC, ids): several cells of mixed kinds over one image size."""
    height, width = draw(st.integers(1, max_side)), draw(st.integers(1, max_side))
    cells = []
    for _ in range(draw(st.integers(1, max_cells))):
        area = draw(st.one_of(st.none(), st.integers(1, min(height, width))))
        pixels = height * width if area is None else area * area
        count = draw(st.integers(1, pixels))
        amplitude = draw(st.one_of(st.just("full"), st.integers(1, 255)))
        channels = draw(st.one_of(st.just("all"), st.lists(st.integers(0, 2), min_size=1, max_size=3,
                                                            unique=True).map(tuple)))
        positions = draw(st.sampled_from(["per-image", "per-image", "shared"]))
        cells.append(Cell(PixelChange(count, amplitude, area, channels, positions), draw(st.integers(0, 2**31 - 1))))
    n = draw(st.integers(1, max_batch))
    ids = draw(st.lists(st.integers(-(2**62), 2**62), min_size=n, max_size=n))
    return list(dict.fromkeys(cells)), images_of(n, height, width, draw(st.integers(0, 1000))), ids


def reference_stack(images, cells, ids):
    return torch.cat([ref.apply_pixel_changes(images, cell, ids) for cell in cells])


@PROPERTY
@given(plans())
def test_apply_equals_the_reference_for_every_cell(plan):
    cells, images, ids = plan
    height, width = images.shape[1:3]
    engine = Perturber(cells, height, width)
    assert torch.equal(engine.apply(images, ids), reference_stack(images, cells, ids))
    for cell, pos in zip(cells, engine.positions(ids), strict=True):
        assert torch.equal(pos, ref.draw_positions(cell, ids, height, width))


@PROPERTY
@given(plans(), st.integers(1, 4), st.integers(1, 4000))
def test_passes_give_every_cell_once_and_undo_their_changes(plan, per_pass, budget):
    cells, images, ids = plan
    n = len(ids)
    before = images.clone()
    engine = Perturber(cells, *images.shape[1:3], budget=budget)  # small budgets split groups into chunks
    seen = []
    for places, batch in engine.passes(images, ids, per_pass):
        assert 1 <= len(places) <= per_pass and batch.shape == (len(places) * n, *images.shape[1:])
        for j, i in enumerate(places):
            assert torch.equal(batch[j * n : (j + 1) * n], ref.apply_pixel_changes(images, cells[i], ids)), cells[i]
        seen += places
    assert sorted(seen) == list(range(len(cells)))
    assert torch.equal(images, before), "the input was modified"


@PROPERTY
@given(plans(max_side=8))
def test_layouts_agree_with_the_reference(plan):
    cells, images, ids = plan
    if images.shape[2] == 3:  # a 3-wide NCHW batch reads as NHWC (see image_layout)
        return
    nchw = images.permute(0, 3, 1, 2).contiguous()
    channels_last = images.permute(0, 3, 1, 2)
    engine = Perturber(cells, *images.shape[1:3])
    expected = reference_stack(images, cells, ids)
    for batch in (nchw, channels_last):
        assert torch.equal(engine.apply(batch, ids).permute(0, 2, 3, 1), expected)
        for places, out in engine.passes(batch, ids, 2):
            for j, i in enumerate(places):
                got = out[j * len(ids) : (j + 1) * len(ids)].permute(0, 2, 3, 1)
                assert torch.equal(got, ref.apply_pixel_changes(images, cells[i], ids))


def test_paper_sized_grid_matches_the_reference():
    # 224 x 224, the paper's counts, amplitudes and areas: one candidate group with mixed counts,
    # shifts and regions, plus a top-k cell and a shared one
    cells = [Cell(PixelChange(n, a, s), seed) for n in (4, 64) for a in ("full", 10, 127) for s in (None, 50)
             for seed in (0, 1)]
    cells += [Cell(PixelChange(40, area=16, channels=(0,))), Cell(PixelChange(8, area=100, positions="shared"), 2)]
    images = images_of(6, 224, 224, seed=3)
    ids = [0, 1, 2, 1000, 2**40, -5]
    engine = Perturber(cells, 224, 224)
    assert {g.kind for g in engine.groups} == {"candidates", "topk", "shared"}
    assert torch.equal(engine.apply(images, ids), reference_stack(images, cells, ids))


def test_candidates_running_short_extend_the_stream_like_the_reference(monkeypatch):
    # the candidate path on a crowded area: some rows need a second round of candidates
    monkeypatch.setattr(perturber, "_TOPK_FACTOR", 0)
    monkeypatch.setattr(ref, "_TOPK_FACTOR", 0)
    cells = [Cell(PixelChange(20, area=5), 4), Cell(PixelChange(3, area=5, amplitude=9), 1)]
    images, ids = images_of(300, 9, 9), torch.arange(300)
    engine = Perturber(cells, 9, 9)
    assert [g.kind for g in engine.groups] == ["candidates"]
    assert torch.equal(engine.apply(images, ids), reference_stack(images, cells, ids))
    assert torch.equal(apply_pixel_changes(images, cells[0], ids), ref.apply_pixel_changes(images, cells[0], ids))


def test_the_reference_test_would_catch_a_changed_stream():
    # the comparison is not vacuous: another stream index gives other draws
    cell = Cell(PixelChange(8), 0)
    ids = torch.arange(50)
    assert not torch.equal(draw_positions(cell, ids, 32, 32), draw_positions(Cell(PixelChange(8), 1), ids, 32, 32))
    real = ref._STREAM_POSITION
    try:
        ref._STREAM_POSITION = 3
        assert not torch.equal(draw_positions(cell, ids, 32, 32), ref.draw_positions(cell, ids, 32, 32))
    finally:
        ref._STREAM_POSITION = real


def test_bad_batches_are_refused():
    engine = Perturber([Cell(PixelChange(4))], 8, 8)
    with pytest.raises(ValueError, match="images: 9x8 images, but the plan is for 8x8"):
        engine.apply(images_of(2, 9, 8), [0, 1])
    with pytest.raises(ValueError, match="image_ids: 3 ids for a batch of 2"):
        engine.apply(images_of(2, 8, 8), [0, 1, 2])
    with pytest.raises(ValueError, match="expected dtype uint8"):
        list(engine.passes(images_of(2, 8, 8).float(), [0, 1]))
    with pytest.raises(ValueError, match="area: 9 is larger"):
        Perturber([Cell(PixelChange(4, area=9))], 8, 8)
    assert engine.apply(images_of(0, 8, 8), []).shape == (0, 8, 8, 3)
    assert list(engine.passes(images_of(0, 8, 8), [])) == []


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fused_engine_on_gpu_equals_the_cpu_reference():
    cells = [Cell(PixelChange(n, a, s), 0) for n in (4, 64) for a in ("full", 10) for s in (None, 50)]
    cells += [Cell(PixelChange(40, area=16)), Cell(PixelChange(8, area=100, positions="shared"), 2)]
    images, ids = images_of(32, 224, 224), torch.arange(32) * 7 - 3
    expected = reference_stack(images, cells, ids)
    engine = Perturber(cells, 224, 224, "cuda")
    assert torch.equal(engine.apply(images.cuda(), ids.cuda()).cpu(), expected)
    for places, out in engine.passes(images.cuda(), ids.cuda(), 3):
        for j, i in enumerate(places):
            assert torch.equal(out[j * 32 : (j + 1) * 32].cpu(), expected[i * 32 : (i + 1) * 32])
