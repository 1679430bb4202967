"""The worker's hot path without Ray: cells per pass, the counted reads, and (on a GPU) pinned copies and graphs.

The expectations come from a plain loop: the perturbation code of fbc5ed4 (``reference_perturb``)
applied cell by cell, one forward pass per cell, as the sweep did before the fused engine.
"""

from __future__ import annotations

import pytest
import reference_perturb as ref
import torch

from pixelray.core.spec import Cell, PixelChange
from pixelray.engine.evaluate import correct_under_cells
from pixelray.engine.units import Unit
from pixelray.engine.worker import ModelWorker
from pixelray.models import load_model
from pixelray.shards import read_shard, shard_uris

CELLS = [Cell(PixelChange(n, a, s), seed) for n in (8, 200) for a in ("full", 60) for s in (None, 16) for seed in (0,)]
CELLS += [Cell(PixelChange(30, area=12, channels=(1,)), 2), Cell(PixelChange(5, positions="shared"), 4)]


def plain_loop(model, images, labels, ids, cells, batch_size):
    out = torch.empty(len(cells), len(ids), dtype=torch.bool)
    with torch.inference_mode():
        for start in range(0, len(ids), batch_size):
            part = slice(start, start + batch_size)
            for i, cell in enumerate(cells):
                changed = ref.apply_pixel_changes(images[part], cell, ids[part])
                out[i, part] = model(changed).argmax(1) == labels[part]
    return out


@pytest.fixture(scope="module")
def shard(synthetic_dataset):
    return read_shard(shard_uris(synthetic_dataset)[0])


@pytest.mark.parametrize("cells_per_pass", [1, 3, 16])
def test_correct_under_cells_equals_a_plain_loop(tiny_checkpoints, shard, cells_per_pass):
    model = load_model(tiny_checkpoints[0], None).to(memory_format=torch.channels_last)
    expected = plain_loop(model, shard.images, shard.labels, shard.image_ids, CELLS, 37)
    got = correct_under_cells(model, shard.images, shard.labels, shard.image_ids, CELLS, 37,
                              cells_per_pass=cells_per_pass)
    assert torch.equal(got, expected)
    assert 0 < int((~expected).sum()) < expected.numel()  # the cells do some damage, not all


def test_by_default_a_small_shard_fills_each_pass_with_cells_and_the_verdicts_do_not_change(tiny_checkpoints, shard):
    """cells_per_pass = None (the sweep's default): a slice of 6 images with batch_size 40 stacks up to 6 cells per
    pass (40 // 6; cells drawn alike stack, so the plan's groups of cells cap it), so that a small shard's passes
    hold up to batch_size images; the verdicts equal the plain loop's."""
    model = load_model(tiny_checkpoints[0], None).to(memory_format=torch.channels_last)
    images, labels, ids = shard.images[:6], shard.labels[:6], shard.image_ids[:6]
    sizes = []
    hook = model.register_forward_hook(lambda _m, args, _out: sizes.append(args[0].shape[0]))
    got = correct_under_cells(model, images, labels, ids, CELLS, 40, cells_per_pass=None)
    hook.remove()
    assert torch.equal(got, plain_loop(model, images, labels, ids, CELLS, 40))
    assert sum(sizes) == 6 * len(CELLS) and 6 < max(sizes) <= 36 and len(sizes) < len(CELLS)
    assert all(size % 6 == 0 for size in sizes)  # whole copies of the slice, one per cell


def test_a_unit_reports_the_reads_it_made(synthetic_dataset, tiny_checkpoints):
    uri = shard_uris(synthetic_dataset)[0]
    worker = ModelWorker(device="cpu", threads=1, batch_size=50)
    unit = Unit("cells", tiny_checkpoints[0], uri, uri.rsplit("/", 1)[-1], tuple(range(0, 100, 3)))
    result = worker.run(unit, None, 10, CELLS)
    assert result["reads"] == 1 and result["n_images"].tolist() == [34] * len(CELLS)

    class Rereading(ModelWorker):  # a worker that reads its shard again per cell: the count must show it
        def run(self, unit, *args, **kwargs):
            self.unit = unit
            return super().run(unit, *args, **kwargs)

        def _perturber(self, cells, images):  # inside the unit's run, as a per-cell re-read would be
            for _ in cells:
                self._read(self.unit)
            return super()._perturber(cells, images)

    assert Rereading(device="cpu", threads=1).run(unit, None, 10, CELLS)["reads"] == 1 + len(CELLS)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_worker_with_pinned_copies_and_graphs_gives_the_cpu_counts(synthetic_dataset, tiny_checkpoints):
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    uri = shard_uris(synthetic_dataset)[0]
    unit = Unit("cells", tiny_checkpoints[0], uri, uri.rsplit("/", 1)[-1])
    cpu = ModelWorker(device="cpu", batch_size=25).run(unit, None, 10, CELLS)
    for options in ({}, {"cells_per_pass": 4}, {"cuda_graphs": True}, {"cuda_graphs": True, "cells_per_pass": 4}):
        worker = ModelWorker(device="cuda", batch_size=25, **options)
        batch = worker._read(unit)
        assert batch.images.is_pinned()
        for _ in range(2):  # the second run replays the captured graphs
            gpu = worker.run(unit, None, 10, CELLS)
            assert gpu["n_wrong"].tolist() == cpu["n_wrong"].tolist(), options


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graph_predictions_equal_the_eager_ones(tiny_checkpoints, shard):
    from pixelray.core.perturb import Perturber
    from pixelray.engine.evaluate import CellGraphs

    model = load_model(tiny_checkpoints[0], None).cuda().to(memory_format=torch.channels_last)
    images, labels, ids = shard.images.cuda(), shard.labels.cuda(), shard.image_ids.cuda()
    plan = Perturber(CELLS, 32, 32, "cuda")
    eager = correct_under_cells(model, images, labels, ids, CELLS, 20, perturber=plan)
    graphs = CellGraphs(torch.device("cuda"))
    for per_pass in (1, 5):
        for _ in range(2):
            got = correct_under_cells(model, images, labels, ids, CELLS, 20, perturber=plan, graphs=graphs,
                                      cells_per_pass=per_pass)
            assert torch.equal(got, eager)
