"""Random pixel changes on a batch of uint8 images, vectorised, fused across cells, deterministic per image.

Every random draw is a counter-based hash of (cell key, image_id, stream, index)
computed with torch int64 ops on the batch's device. So an image gets the same
change whatever batch it sits in, its position there, the device, or a retry.

Positions: the hash gives a stream of candidate positions per image, uniform over
the centred area; the first ``count`` distinct ones in stream order form a uniform
``count``-subset. When the area holds few more positions than ``count`` (at most
``_TOPK_FACTOR`` times as many), every position gets a hash instead and the
``count`` smallest are taken: also a uniform subset, without a long tail of
repeated candidates.

How it runs (the launch count matters on a GPU, where each op is a kernel launch of a
few microseconds and a small model's forward pass of a batch takes about a millisecond):
a :class:`Perturber` is built once per plan (cells, image size, device) and holds every
constant: the hashes of the stream indices (which depend on no image), the per-cell
parameters as small tensors, the shared position lists. Per batch, the keys of every
(cell, image) are hashed in one pass; then each group of cells that draws the same way
(candidates, top-k over an area, or shared positions) gets its positions and values from
one fused hash pass over a (cells, images, draws) tensor, and the changed entries are
written with one ``put_``. The draws are bit for bit those of a cell run alone (the
candidate stream's first ``count`` distinct values do not depend on how long the stream
is; a shorter count takes a prefix of the top-k). :func:`apply_pixel_changes` and
:func:`draw_positions` are a one-cell plan.

Example:
    >>> import torch
    >>> from pixelray.spec import Cell, PixelChange
    >>> images = torch.zeros(2, 8, 8, 3, dtype=torch.uint8)
    >>> out = apply_pixel_changes(images, Cell(PixelChange(count=4)), [10, 11])
    >>> int((out != images).any(dim=-1).sum(dim=(1, 2)).max()) <= 4
    True
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pixelray.spec import Cell

__all__ = [
    "ChangeRecord", "Perturber", "apply_pixel_changes", "describe_change", "draw_positions", "draw_values", "hash64",
    "image_layout",
]

_MASK64 = (1 << 64) - 1
_MASK63 = (1 << 63) - 1
_TOPK_FACTOR = 8  # areas with <= 8x count positions hash every position instead
_STREAM_POSITION = 1
_STREAM_VALUE = 2
_SHARED_IMAGE_ID = -1  # the image id that keys the one position list of positions="shared"
_BUDGET = 1 << 23  # int64 elements per fused hash pass (64 MiB); larger groups are split into chunks


def _i64(value: int) -> int:
    """A 64-bit pattern as the signed int64 torch stores."""
    value &= _MASK64
    return value - (1 << 64) if value >= 1 << 63 else value


_GOLDEN = _i64(0x9E3779B97F4A7C15)
_MUL1 = _i64(0xBF58476D1CE4E5B9)
_MUL2 = _i64(0x94D049BB133111EB)
_STREAM_MUL = _i64(0xD6E8FEB86659FD93)


def _shr(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's ``>>`` is arithmetic)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def _mix_(z: torch.Tensor) -> torch.Tensor:
    """SplitMix64's finaliser after its first add, in place on an int64 tensor the caller owns."""
    z.bitwise_xor_(_shr(z, 30)).mul_(_MUL1)
    z.bitwise_xor_(_shr(z, 27)).mul_(_MUL2)
    return z.bitwise_xor_(_shr(z, 31))


def hash64(x: torch.Tensor) -> torch.Tensor:
    """SplitMix64 finaliser on an int64 tensor (wrapping arithmetic); returns int64 bits."""
    return _mix_(x + _GOLDEN)


def _image_keys(cell: Cell, image_ids: torch.Tensor) -> torch.Tensor:
    """One int64 key per image: a hash of (cell key, image_id)."""
    return hash64(hash64(image_ids * _STREAM_MUL + _i64(cell.key)))


def _uniform(bits: torch.Tensor, n: int) -> torch.Tensor:
    """Integers in [0, n) from hash bits (63 bits mod n: bias below n / 2**63)."""
    return (bits & _MASK63) % n


def _stream(keys: torch.Tensor, stream: int, index: torch.Tensor) -> torch.Tensor:
    """Hash bits for (image key, stream, index); keys (N, 1), index broadcastable."""
    return hash64(keys + hash64(index + (stream << 40)))


def _as_ids(image_ids: torch.Tensor | Sequence[int], device: torch.device) -> torch.Tensor:
    ids = torch.as_tensor(image_ids, dtype=torch.int64, device=device)
    if ids.ndim != 1:
        raise ValueError(f"image_ids: expected one id per image (1-D), got shape {tuple(ids.shape)}")
    return ids


def _first_distinct(candidates: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``count`` distinct values per row, in row order, and whether each row had enough."""
    first = _first_occurrence(candidates)
    enough = first.sum(dim=-1) >= count
    keep = first & (first.cumsum(dim=-1) <= count)
    return keep, enough


def _first_occurrence(candidates: torch.Tensor) -> torch.Tensor:
    """bool, same shape: True where a value appears for the first time in its row (last dim)."""
    ordered, order = torch.sort(candidates, dim=-1, stable=True)
    new = F.pad(ordered[..., 1:] != ordered[..., :-1], (1, 0), value=True)
    return torch.empty_like(new).scatter_(-1, order, new)


# ---------------------------------------------------------------------------- constant tables


@functools.lru_cache(maxsize=256)
def _index_hashes(stream: int, index: tuple[int, ...] | int, device: torch.device) -> torch.Tensor:
    """``hash64(index + (stream << 40)) + GOLDEN`` (int64) on ``device``: the image-independent half
    of a stream's draws, with the next hash's first add folded in. ``index`` an int means ``range(index)``."""
    idx = torch.arange(index, dtype=torch.int64) if isinstance(index, int) else torch.tensor(index, dtype=torch.int64)
    return (hash64(idx + (stream << 40)) + _GOLDEN).to(device)


def _value_index(count: int, channels: tuple[int, ...]) -> tuple[int, ...]:
    """The value stream's indices ``k * 4 + channel``, k-major, as :func:`draw_values` numbers them."""
    return tuple(k * 4 + c for k in range(count) for c in channels)


# ---------------------------------------------------------------------------- the fused engine


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
        self._cell_keys = torch.tensor([_i64(self.cells[i].key + _GOLDEN) for i in order],
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
            ids = torch.full((1,), _SHARED_IMAGE_ID, dtype=torch.int64, device=dev)
            lists = []
            for i, cell in zip(index, cells, strict=True):
                solo = self._group(self._kind(cell, shared=False)[0], (i,))
                keys = _mix_(_mix_(ids * _STREAM_MUL + _i64(cell.key + _GOLDEN)) + _GOLDEN).view(1, 1)
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
                parts.append(_index_hashes(_STREAM_POSITION, draws, self.device))
                mods.append(group.pmod.expand(-1, -1, draws))
            if values:
                index = _value_index(group.count, group.channels)
                parts.append(_index_hashes(_STREAM_VALUE, index, self.device))
                mods.append(group.vmod.expand(-1, -1, len(index)))
            self._table_cache[key] = (torch.cat(parts), torch.cat(mods, dim=-1))
        return self._table_cache[key]

    # --- per batch

    def _keys(self, ids: torch.Tensor) -> torch.Tensor:
        """(cells, N) int64: the image keys of every (cell, image), in group order, in one pass."""
        return _mix_(_mix_(ids * _STREAM_MUL + self._cell_keys) + _GOLDEN)

    def _draw(self, group: _Group, keys: torch.Tensor, values: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Area positions (G, N, count) and raw value draws (G, N, count, C) of a group, from one hash pass.

        Raw draws are integers in [0, 256) (full) or [0, 2a] (a shift of a): the new value, or
        the shift plus a. ``keys`` (G, N) are the group's image keys.
        """
        shape = (*keys.shape, group.count, len(group.channels))
        keys3 = keys.unsqueeze(-1)
        if group.kind == "shared":
            table, mod = self._tables(group, 0)
            bits = _mix_(keys3 + table).bitwise_and_(_MASK63).remainder_(mod)
            return group.shared.expand(-1, keys.shape[1], -1), bits.view(shape)
        if group.kind == "topk":
            table = self._tables(group, group.area, values)[0]
            bits = _mix_(keys3 + table).bitwise_and_(_MASK63)
            pos = torch.topk(bits[..., : group.area], group.count, dim=-1, largest=False, sorted=True).indices
            raw = bits[..., group.area:].remainder_(group.vmod).view(shape) if values else None
            return pos, raw
        draws = 2 * group.count + 32
        while True:  # rarely more than one round; each round extends the same streams
            table, mod = self._tables(group, draws, values)
            bits = _mix_(keys3 + table).bitwise_and_(_MASK63).remainder_(mod)
            cand = bits[..., :draws]
            first = _first_occurrence(cand)
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
        if images.dtype != torch.uint8:
            raise ValueError(f"images: expected dtype uint8, got {images.dtype}; convert pixel values to uint8 first")
        layout = image_layout(images)
        size = tuple(images.shape[1:3] if layout == "NHWC" else images.shape[2:4])
        if size != (self.height, self.width):
            raise ValueError(f"images: {size[0]}x{size[1]} images, but the plan is for "
                             f"{self.height}x{self.width}")
        ids = _as_ids(ids, images.device)
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
        ids = _as_ids(image_ids, self.device)
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


@functools.lru_cache(maxsize=64)
def _one_cell(cell: Cell, height: int, width: int, device: torch.device, topk_factor: int) -> Perturber:
    """A cached one-cell plan (``topk_factor`` keys the cache: tests change the module's factor)."""
    return Perturber([cell], height, width, device)


def _plan(cell: Cell, height: int, width: int, device: torch.device) -> Perturber:
    return _one_cell(cell, height, width, device, _TOPK_FACTOR)


def _channels(channels: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """Channel indices as a tensor on ``device`` (no host-to-device copy for all three)."""
    if channels == (0, 1, 2):
        return torch.arange(3, device=device)
    return torch.tensor(channels, device=device)


def draw_positions(
    cell: Cell, image_ids: torch.Tensor | Sequence[int], height: int, width: int
) -> torch.Tensor:
    """Flat pixel indices ``y * width + x`` changed in each image, shape (N, count), int64.

    Positions are distinct within an image and uniform over the centred area of
    ``cell.change``. With ``positions="shared"`` every row is the same list.
    The result is on ``image_ids``' device (CPU for a sequence).
    """
    cell.change.check_image(height, width)
    device = image_ids.device if isinstance(image_ids, torch.Tensor) else torch.device("cpu")
    ids = _as_ids(image_ids, device)
    if len(ids) == 0:
        return torch.empty((0, cell.change.count), dtype=torch.int64, device=device)
    return _plan(cell, height, width, device).positions(ids)[0]


def draw_values(
    cell: Cell, image_ids: torch.Tensor | Sequence[int], original: torch.Tensor
) -> torch.Tensor:
    """New uint8 values for the changed entries.

    Args:
        cell: the cell.
        image_ids: (N,) ids, any integer dtype (hashed as int64, like every draw).
        original: (N, count, C) uint8, the current values at the drawn positions
            for the C changed channels.
    """
    change = cell.change
    keys = _image_keys(cell, _as_ids(image_ids, original.device)).view(-1, 1, 1)
    n, count, n_ch = original.shape
    k = torch.arange(count, device=original.device).view(1, -1, 1)
    ch = _channels(change.channel_indices, original.device).view(1, 1, -1)
    bits = _stream(keys, _STREAM_VALUE, k * 4 + ch)
    if change.amplitude == "full":
        return _uniform(bits, 256).to(torch.uint8)
    a = int(change.amplitude)
    shift = _uniform(bits, 2 * a + 1) - a
    return (original.to(torch.int64) + shift).clamp_(0, 255).to(torch.uint8)


def image_layout(images: torch.Tensor) -> str:
    """``"NHWC"`` or ``"NCHW"`` for a 4-D image batch with 3 channels; ValueError otherwise."""
    if images.ndim == 4 and images.shape[-1] == 3:
        return "NHWC"
    if images.ndim == 4 and images.shape[1] == 3:
        return "NCHW"
    raise ValueError(
        f"images: expected a batch (N, H, W, 3) or (N, 3, H, W), got shape {tuple(images.shape)}"
    )


def apply_pixel_changes(
    images: torch.Tensor, cell: Cell, image_ids: torch.Tensor | Sequence[int]
) -> torch.Tensor:
    """Apply ``cell``'s pixel change to a uint8 batch; returns a new tensor.

    Args:
        images: uint8, (N, H, W, 3) or (N, 3, H, W), any memory format, any device.
        cell: what to change, and the seed.
        image_ids: one int64 id per image; the draws for an image depend only on
            (cell, its id).

    Returns:
        A new tensor of the same shape, dtype, memory format and device; the input
        is not modified.
    """
    if images.dtype != torch.uint8:
        raise ValueError(f"images: expected dtype uint8, got {images.dtype}; convert pixel values to uint8 first")
    layout = image_layout(images)
    ids = _as_ids(image_ids, images.device)
    if len(ids) != images.shape[0]:
        raise ValueError(f"image_ids: {len(ids)} ids for a batch of {images.shape[0]} images")
    height, width = images.shape[1:3] if layout == "NHWC" else images.shape[2:4]
    cell.change.check_image(height, width)
    out = images.clone()
    if images.shape[0] == 0:
        return out
    plan = _plan(cell, height, width, images.device)
    for _, entries, new, _ in plan._each(images, ids, layout, need_orig=False):
        out.put_(entries, new)
    return out


@dataclass(frozen=True)
class ChangeRecord:
    """What a cell does to one image: the changed entries, in draw order.

    Attributes:
        cell_id: the cell (its id keys every draw).
        image_id: the image.
        y, x, channel: one entry per changed (position, channel), position-major.
        value: the new value of each entry (uint8); for a shift, known only with the image.
        shift: for a shift amplitude, the drawn shift of each entry before clipping; None for full.
        old: the image's value of each entry, when the image was given.
    """

    cell_id: str
    image_id: int
    y: tuple[int, ...]
    x: tuple[int, ...]
    channel: tuple[int, ...]
    value: tuple[int, ...] | None
    shift: tuple[int, ...] | None
    old: tuple[int, ...] | None = None


def describe_change(cell: Cell, image_id: int, height: int, width: int,
                    image: torch.Tensor | None = None) -> ChangeRecord:
    """The positions and values ``cell`` changes in image ``image_id`` (reproduces one image of a sweep).

    Args:
        cell: the cell (e.g. ``Cell.from_id(row.cell_id)`` or ``Cell.from_columns(row)``).
        image_id: the image's id.
        height, width: the image size.
        image: the image's uint8 pixels (H, W, 3) or (3, H, W); needed for the new values of a
            shift amplitude, optional for full.
    """
    pos = draw_positions(cell, [int(image_id)], height, width)[0]
    channels = cell.change.channel_indices
    ys = [int(p) // width for p in pos for _ in channels]
    xs = [int(p) % width for p in pos for _ in channels]
    chs = [c for _ in pos for c in channels]
    old = None
    if image is not None:
        pixels = image.permute(1, 2, 0) if image_layout(image[None]) == "NCHW" else image
        if tuple(pixels.shape) != (height, width, 3) or pixels.dtype != torch.uint8:
            raise ValueError(f"image: expected uint8 ({height}, {width}, 3), got {pixels.dtype} "
                             f"{tuple(pixels.shape)}")
        old = pixels[torch.tensor(ys), torch.tensor(xs), torch.tensor(chs)].view(1, len(pos), len(channels))
    probe = torch.zeros(1, len(pos), len(channels), dtype=torch.uint8) if old is None else old
    shift = None
    if cell.change.amplitude != "full":
        a = int(cell.change.amplitude)
        keys = _image_keys(cell, torch.tensor([int(image_id)])).view(-1, 1, 1)
        k = torch.arange(len(pos)).view(1, -1, 1)
        bits = _stream(keys, _STREAM_VALUE, k * 4 + _channels(channels, torch.device("cpu")).view(1, 1, -1))
        shift = tuple((_uniform(bits, 2 * a + 1) - a).flatten().tolist())
    value = None if cell.change.amplitude != "full" and old is None else tuple(
        draw_values(cell, [int(image_id)], probe).flatten().tolist())
    return ChangeRecord(cell.cell_id, int(image_id), tuple(ys), tuple(xs), tuple(chs), value, shift,
                        None if old is None else tuple(old.flatten().tolist()))
