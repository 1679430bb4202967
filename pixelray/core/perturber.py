"""The fused engine: every cell of a plan applied to batches in a few launches (see :mod:`pixelray.core.perturb`)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from pixelray.core.draws import (
    GOLDEN,
    MASK63,
    SHARED_IMAGE_ID,
    STREAM_MUL,
    STREAM_POSITION,
    STREAM_VALUE,
    as_ids,
    check_uint8,
    first_occurrence,
    i64,
    image_layout,
    index_hashes,
    mix,
    value_index,
)
from pixelray.core.spec import Cell

__all__ = ["Perturber"]

_TOPK_FACTOR = 8  # areas with <= 8x count positions hash every position instead
_BUDGET = 1 << 23  # int64 elements per fused hash pass (64 MiB); larger groups are split into chunks


@dataclass
class _Group:
    """Cells whose positions are drawn the same way, run together in one hash pass.

    Tensors have the group's cells as their first dimension (slice them for a chunk).
    """

    kind: str  # "candidates", "topk" (every area position hashed) or "shared" (positions fixed per cell)
    index: tuple[int, ...]  # the cells' places in the plan
    count: int  # the largest count; rows with fewer repeat their slot 0 in the spare slots
    channels: tuple[int, ...]  # channels drawn (all three when the cells choose differently)
    area: int  # topk: positions per image (every cell of the group has this area)
    counts: torch.Tensor  # (G, 1, 1)
    pmod: torch.Tensor  # (G, 1, 1) area sizes (candidates: the positions' modulus)
    vmod: torch.Tensor  # (G, 1, 1) 256 for full, 2a+1 for a shift
    shift: torch.Tensor | None  # (G, 1, 1, 1) a (0 for full); None when every cell is full
    full: torch.Tensor | None  # (G, 1, 1, 1) bool, None unless full and shift cells mix
    chmask: torch.Tensor | None  # (G, 1, 1, C) bool: the cell changes this channel; None when all do
    valid: torch.Tensor | None  # (G, 1, count) bool: slot < the cell's count; None when counts agree
    cols: torch.Tensor | None  # (G, 1, 1) area width; None when every cell is the whole image
    wrap: torch.Tensor | None  # (G, 1, 1) image width - area width
    base: torch.Tensor | None  # (G, 1, 1) top * width + left
    shared: torch.Tensor | None  # (G, 1, count) area positions of "shared" cells

    def rows(self, g0: int, g1: int) -> _Group:
        """The same group restricted to its cells g0..g1 (views)."""
        def cut(t):
            return None if t is None else t[g0:g1]

        return _Group(self.kind, self.index[g0:g1], self.count, self.channels, self.area, *(
            cut(t) for t in (self.counts, self.pmod, self.vmod, self.shift, self.full, self.chmask, self.valid,
                             self.cols, self.wrap, self.base, self.shared)))


class Perturber:
    """Every cell of a plan, applied to batches of ``height`` x ``width`` images on one device.

    Build it once (it hashes the image-independent half of every stream and lays out the
    cells' parameters as tensors), then call :meth:`apply` or :meth:`passes` per batch.
    The draws equal :func:`apply_pixel_changes` cell by cell, bit for bit.

    Args:
        cells: the cells, in plan order.
        height, width: the image size.
        device: where the batches live.
        budget: int64 elements per fused hash pass; bigger groups run in chunks.
    """

    def __init__(self, cells: Sequence[Cell], height: int, width: int, device: torch.device | str = "cpu",
                 budget: int = _BUDGET):
        self.cells = tuple(cells)
        self.height, self.width = int(height), int(width)
        self.device = torch.device(device)
        self.budget = budget
        for cell in self.cells:
            cell.change.check_image(self.height, self.width)
        self._table_cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        by_kind: dict[tuple, list[int]] = {}
        for i, cell in enumerate(self.cells):
            by_kind.setdefault(self._kind(cell), []).append(i)
        self.groups = [self._group(key[0], tuple(index)) for key, index in by_kind.items()]
        order = [i for group in self.groups for i in group.index]
        # cell keys with the first hash's add folded in, in group order (the keys pass runs once per batch)
        self._cell_keys = torch.tensor([i64(self.cells[i].key + GOLDEN) for i in order],
                                       dtype=torch.int64, device=self.device).view(-1, 1)
        self._offsets: dict[tuple, torch.Tensor] = {}

    # --- building

    def _kind(self, cell: Cell, shared: bool = True) -> tuple:
        """How a cell's positions are drawn: ("shared",), ("topk", area size) or ("candidates",)."""
        change = cell.change
        rows, cols = change.region(self.height, self.width)[2:]
        if shared and change.positions == "shared":
            return ("shared",)
        if rows * cols <= _TOPK_FACTOR * change.count:
            return ("topk", rows * cols)
        return ("candidates",)

    def _group(self, kind: str, index: tuple[int, ...]) -> _Group:
        cells = [self.cells[i] for i in index]
        changes = [c.change for c in cells]
        dev = self.device

        def column(values, dtype=torch.int64, dims=3):
            return torch.tensor(values, dtype=dtype, device=dev).view(-1, *([1] * (dims - 1)))

        count = max(c.count for c in changes)
        chosen = {c.channel_indices for c in changes}
        channels = next(iter(chosen)) if len(chosen) == 1 else (0, 1, 2)
        regions = [c.region(self.height, self.width) for c in changes]
        sizes = [rows * cols for _, _, rows, cols in regions]
        amps = [0 if c.amplitude == "full" else int(c.amplitude) for c in changes]
        whole = all((rows, cols) == (self.height, self.width) for _, _, rows, cols in regions)
        mixed_amp = 0 < sum(a == 0 for a in amps) < len(amps)
        group = _Group(
            kind=kind, index=index, count=count, channels=channels, area=sizes[0],
            counts=column([c.count for c in changes]),
            pmod=column(sizes),
            vmod=column([256 if a == 0 else 2 * a + 1 for a in amps]),
            shift=None if not any(amps) else column(amps, dims=4),
            full=column([a == 0 for a in amps], torch.bool, dims=4) if mixed_amp else None,
            chmask=None if len(chosen) == 1 else (
                torch.tensor([[ch in c.channel_indices for ch in channels] for c in changes], device=dev)
                .view(len(changes), 1, 1, len(channels))),
            valid=None if all(c.count == count for c in changes) else (
                torch.arange(count, device=dev).view(1, 1, -1) < column([c.count for c in changes])),
            cols=None if whole else column([cols for *_, cols in regions]),
            wrap=None if whole else column([self.width - cols for *_, cols in regions]),
            base=None if whole else column([top * self.width + left for top, left, *_ in regions]),
            shared=None,
        )
        if kind == "shared":  # one position list per cell, drawn once for the image id -1
            ids = torch.full((1,), SHARED_IMAGE_ID, dtype=torch.int64, device=dev)
            lists = []
            for i, cell in zip(index, cells, strict=True):
                solo = self._group(self._kind(cell, shared=False)[0], (i,))
                keys = mix(mix(ids * STREAM_MUL + i64(cell.key + GOLDEN)) + GOLDEN).view(1, 1)
                pos = self._draw(solo, keys, values=False)[0]  # (1, 1, count)
                spare = count - cell.change.count  # spare slots repeat slot 0, like the others
                lists.append(torch.cat([pos, pos[..., :1].expand(-1, -1, spare)], dim=-1) if spare else pos)
            group.shared = torch.cat(lists)
        return group

    def _tables(self, group: _Group, draws: int, values: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """(hashes, moduli): position-stream hashes (``draws`` of them) then, with ``values``, value-stream
        hashes, one (L,) tensor; and each entry's modulus per cell (G, 1, L) (candidates only). Cached."""
        key = (group.kind, group.index, draws, values)
        if key not in self._table_cache:
            parts, mods = [], []
            if draws:
                parts.append(index_hashes(STREAM_POSITION, draws, self.device))
                mods.append(group.pmod.expand(-1, -1, draws))
            if values:
                index = value_index(group.count, group.channels)
                parts.append(index_hashes(STREAM_VALUE, index, self.device))
                mods.append(group.vmod.expand(-1, -1, len(index)))
            self._table_cache[key] = (torch.cat(parts), torch.cat(mods, dim=-1))
        return self._table_cache[key]

    # --- per batch

    def _keys(self, ids: torch.Tensor) -> torch.Tensor:
        """(cells, N) int64: the image keys of every (cell, image), in group order, in one pass."""
        return mix(mix(ids * STREAM_MUL + self._cell_keys) + GOLDEN)

    def _draw(self, group: _Group, keys: torch.Tensor, values: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Area positions (G, N, count) and raw value draws (G, N, count, C) of a group, from one hash pass.

        Raw draws are integers in [0, 256) (full) or [0, 2a] (a shift of a): the new value, or
        the shift plus a. ``keys`` (G, N) are the group's image keys.
        """
        shape = (*keys.shape, group.count, len(group.channels))
        keys3 = keys.unsqueeze(-1)
        if group.kind == "shared":
            table, mod = self._tables(group, 0)
            bits = mix(keys3 + table).bitwise_and_(MASK63).remainder_(mod)
            return group.shared.expand(-1, keys.shape[1], -1), bits.view(shape)
        if group.kind == "topk":
            table = self._tables(group, group.area, values)[0]
            bits = mix(keys3 + table).bitwise_and_(MASK63)
            pos = torch.topk(bits[..., : group.area], group.count, dim=-1, largest=False, sorted=True).indices
            raw = bits[..., group.area:].remainder_(group.vmod).view(shape) if values else None
            return pos, raw
        draws = 2 * group.count + 32
        while True:  # rarely more than one round; each round extends the same streams
            table, mod = self._tables(group, draws, values)
            bits = mix(keys3 + table).bitwise_and_(MASK63).remainder_(mod)
            cand = bits[..., :draws]
            first = first_occurrence(cand)
            seen = first.cumsum(dim=-1)
            if keys.device.type != "cpu":
                # A host sync here would stall the device. With area > 8 x count, fewer than `count`
                # distinct values among 2 x count + 32 draws has probability below 1e-30 per image,
                # and it fails loudly rather than giving other positions.
                torch._assert_async((seen[..., -1:] >= group.counts).all(),
                                    "pixelray: too few distinct candidate positions")
            elif not bool((seen[..., -1:] >= group.counts).all()):
                draws *= 2
                continue
            slot = torch.where(first & (seen <= group.counts), seen - 1, group.count)
            pos = torch.empty((*keys.shape, group.count + 1), dtype=torch.int64, device=keys.device)
            pos = pos.scatter_(-1, slot, cand)[..., : group.count]
            return pos, bits[..., draws:].view(shape) if values else None

    def _pixels(self, group: _Group, area_pos: torch.Tensor) -> torch.Tensor:
        """Flat pixel indices ``y * width + x`` from area indices (each cell's centred square)."""
        if group.cols is None:
            return area_pos
        rows = torch.div(area_pos, group.cols, rounding_mode="floor")
        return torch.addcmul(area_pos, rows, group.wrap).add_(group.base)

    def _row_offsets(self, n: int, layout: str, channels: tuple[int, ...]) -> tuple[torch.Tensor, int]:
        """((1, n, 1, C) logical offsets of each image's channels, the pixel stride) for ``put_``/``take``."""
        hw = self.height * self.width
        key = (n, layout, channels)
        if key not in self._offsets:
            ch = torch.tensor(channels, dtype=torch.int64, device=self.device)
            if layout == "NHWC":
                rows, ch_stride = torch.arange(n, device=self.device) * (hw * 3), 1
            else:
                rows, ch_stride = torch.arange(n, device=self.device) * (hw * 3), hw
            self._offsets[key] = rows.view(1, n, 1, 1) + (ch * ch_stride).view(1, 1, 1, -1)
        return self._offsets[key], (3 if layout == "NHWC" else 1)

    def _changes(self, group: _Group, keys: torch.Tensor, images: torch.Tensor, layout: str,
                 need_orig: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(entries, new uint8 values, old values or None) of a group over a batch: entries are logical
        indices into ``images`` (G, N, count, C); duplicates (spare slots) carry equal values."""
        area_pos, raw = self._draw(group, keys)
        if group.valid is not None:  # spare slots repeat slot 0: the same entry, the same value
            area_pos = torch.where(group.valid, area_pos, area_pos[..., :1])
            raw = torch.where(group.valid.unsqueeze(-1), raw, raw[..., :1, :])
        offsets, stride = self._row_offsets(images.shape[0], layout, group.channels)
        entries = torch.add(offsets, self._pixels(group, area_pos).unsqueeze(-1), alpha=stride)
        orig = None
        if need_orig or group.shift is not None or group.chmask is not None:
            orig = torch.take(images, entries)
        new = raw
        if group.shift is not None:
            shifted = (raw - group.shift + orig).clamp_(0, 255)
            new = shifted if group.full is None else torch.where(group.full, raw, shifted)
        if group.chmask is not None:
            new = torch.where(group.chmask, new, orig)
        return entries, new.to(torch.uint8), orig

    def _chunks(self, group: _Group, n: int) -> Iterator[_Group]:
        width = (2 * group.count + 32 if group.kind == "candidates" else group.area if group.kind == "topk" else 0)
        width += group.count * len(group.channels)
        step = max(1, self.budget // max(1, n * width))
        if step >= len(group.index):
            yield group
            return
        for g0 in range(0, len(group.index), step):
            yield group.rows(g0, g0 + step)

    def _check(self, images: torch.Tensor, ids: torch.Tensor | Sequence[int]) -> tuple[str, torch.Tensor]:
        check_uint8(images)
        layout = image_layout(images)
        size = tuple(images.shape[1:3] if layout == "NHWC" else images.shape[2:4])
        if size != (self.height, self.width):
            raise ValueError(f"images: {size[0]}x{size[1]} images, but the plan is for "
                             f"{self.height}x{self.width}")
        ids = as_ids(ids, images.device)
        if len(ids) != images.shape[0]:
            raise ValueError(f"image_ids: {len(ids)} ids for a batch of {images.shape[0]} images")
        return layout, ids

    def _each(self, images: torch.Tensor, ids: torch.Tensor, layout: str, need_orig: bool):
        """Per chunk of a group: (the chunk, entries, new values, old values)."""
        keys = self._keys(ids)
        start = 0
        for group in self.groups:
            for chunk in self._chunks(group, len(ids)):
                rows = keys[start : start + len(chunk.index)]
                start += len(chunk.index)
                yield (chunk, *self._changes(chunk, rows, images, layout, need_orig))

    def apply(self, images: torch.Tensor, image_ids: torch.Tensor | Sequence[int]) -> torch.Tensor:
        """Every cell over the batch: a new (cells x N, ...) tensor, cell-major in plan order, the input's layout."""
        layout, ids = self._check(images, image_ids)
        n = images.shape[0]
        out = images.repeat(len(self.cells), 1, 1, 1)
        if n == 0 or not self.cells:
            return out
        for chunk, entries, new, _ in self._each(images, ids, layout, need_orig=False):
            out.put_(entries + self._place_offsets(chunk.index, images[0].numel() * n), new)
        return out

    def _place_offsets(self, places: tuple[int, ...], stride: int) -> torch.Tensor:
        """(G, 1, 1, 1) offsets of the cells' blocks in a cell-major stack (cached: no copy per batch)."""
        key = ("places", places, stride)
        if key not in self._offsets:
            self._offsets[key] = (torch.tensor(places, dtype=torch.int64) * stride).to(self.device).view(-1, 1, 1, 1)
        return self._offsets[key]

    def passes(self, images: torch.Tensor, image_ids: torch.Tensor | Sequence[int],
               cells_per_pass: int = 1) -> Iterator[tuple[tuple[int, ...], torch.Tensor]]:
        """Yield (cell places, a batch of ``len(places) x N`` changed images) until every cell has run.

        The batch is a scratch buffer holding ``cells_per_pass`` copies of ``images``; the
        changes are written into it and undone (the old values written back) when the next
        pass is asked for: no whole-batch copy per cell. Use each yielded batch before asking
        for the next one. Cells come group by group, not in plan order: use the places.
        """
        layout, ids = self._check(images, image_ids)
        n = images.shape[0]
        if n == 0 or not self.cells:
            return
        step = max(1, int(cells_per_pass))
        if step == 1:
            scratch = images.clone()
        else:
            cl = layout == "NCHW" and images.is_contiguous(memory_format=torch.channels_last)
            fmt = torch.channels_last if cl else torch.contiguous_format
            scratch = torch.empty((step * n, *images.shape[1:]), dtype=torch.uint8, device=images.device,
                                  memory_format=fmt)
            scratch.view(step, *images.shape).copy_(images.expand(step, *images.shape))
        per_image = images[0].numel()
        for chunk, entries, new, orig in self._each(images, ids, layout, need_orig=True):
            if step == 1:  # one view per cell from one op each
                for i, where, changed, old in zip(chunk.index, entries.unbind(0), new.unbind(0), orig.unbind(0),
                                                  strict=True):
                    scratch.put_(where, changed)
                    yield (i,), scratch
                    scratch.put_(where, old)
                continue
            for q0 in range(0, len(chunk.index), step):
                q = min(step, len(chunk.index) - q0)
                where = entries[q0 : q0 + q]
                where = where + (torch.arange(q, device=images.device) * (per_image * n)).view(-1, 1, 1, 1)
                scratch.put_(where, new[q0 : q0 + q])
                yield chunk.index[q0 : q0 + q], scratch if q == step else scratch[: q * n]
                scratch.put_(where, orig[q0 : q0 + q])

    def positions(self, image_ids: torch.Tensor | Sequence[int]) -> list[torch.Tensor]:
        """Flat pixel indices (N, count) of each cell, in plan order (no values drawn)."""
        ids = as_ids(image_ids, self.device)
        keys = self._keys(ids)
        out: list[torch.Tensor | None] = [None] * len(self.cells)
        start = 0
        for group in self.groups:
            for chunk in self._chunks(group, len(ids)):
                rows = keys[start : start + len(chunk.index)]
                start += len(chunk.index)
                pos = self._pixels(chunk, self._draw(chunk, rows, values=False)[0])
                for j, i in enumerate(chunk.index):
                    out[i] = pos[j, :, : self.cells[i].change.count]
        return out  # type: ignore[return-value]
