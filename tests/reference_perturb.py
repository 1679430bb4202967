"""The perturbation code as it was at fbc5ed4 (before the fused engine), kept verbatim as a reference.

Tests compare today's ``pixelray.core.perturb`` with it on random cells, batches and layouts: every
draw must be bit for bit what this code gave. It is not imported by the package.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from pixelray.core.spec import Cell

__all__ = ["apply_pixel_changes", "draw_positions", "draw_values", "hash64", "image_layout"]

_MASK64 = (1 << 64) - 1
_TOPK_FACTOR = 8  # areas with <= 8x count positions hash every position instead
_STREAM_POSITION = 1
_STREAM_VALUE = 2
_SHARED_IMAGE_ID = -1  # the image id that keys the one position list of positions="shared"


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


def hash64(x: torch.Tensor) -> torch.Tensor:
    """SplitMix64 finaliser on an int64 tensor (wrapping arithmetic); returns int64 bits."""
    z = x + _GOLDEN
    z = (z ^ _shr(z, 30)) * _MUL1
    z = (z ^ _shr(z, 27)) * _MUL2
    return z ^ _shr(z, 31)


def _image_keys(cell: Cell, image_ids: torch.Tensor) -> torch.Tensor:
    """One int64 key per image: a hash of (cell key, image_id)."""
    return hash64(hash64(image_ids * _STREAM_MUL + _i64(cell.key)))


def _uniform(bits: torch.Tensor, n: int) -> torch.Tensor:
    """Integers in [0, n) from hash bits (63 bits mod n: bias below n / 2**63)."""
    return (bits & ((1 << 63) - 1)) % n


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
    ordered, order = torch.sort(candidates, dim=1, stable=True)
    repeat = torch.zeros_like(ordered, dtype=torch.bool)
    repeat[:, 1:] = ordered[:, 1:] == ordered[:, :-1]
    first = torch.empty_like(repeat).scatter_(1, order, ~repeat)
    enough = first.sum(dim=1) >= count
    keep = first & (first.cumsum(dim=1) <= count)
    return keep, enough


def _area_positions(cell: Cell, ids: torch.Tensor, area_size: int) -> torch.Tensor:
    """(N, count) distinct indices in [0, area_size), uniform; a pure function of (cell, id)."""
    count = cell.change.count
    keys = _image_keys(cell, ids).unsqueeze(1)
    if area_size <= _TOPK_FACTOR * count:
        every = torch.arange(area_size, device=ids.device)
        scores = _stream(keys, _STREAM_POSITION, every) & ((1 << 63) - 1)
        return torch.topk(scores, count, dim=1, largest=False, sorted=True).indices
    n_draws = 2 * count + 32
    while True:  # rarely more than one round; each round extends the same stream
        index = torch.arange(n_draws, device=ids.device)
        candidates = _uniform(_stream(keys, _STREAM_POSITION, index), area_size)
        keep, enough = _first_distinct(candidates, count)
        if ids.device.type != "cpu":
            # A host sync here would stall the device on every call. With area > 8 x count,
            # fewer than `count` distinct values among 2 x count + 32 draws has probability
            # below 1e-30, and it fails loudly rather than giving other positions.
            torch._assert_async(enough.all(), "pixelray: too few distinct candidate positions")
            return _select(candidates, keep, count)
        if bool(enough.all()):
            return _select(candidates, keep, count)
        n_draws *= 2


def _select(candidates: torch.Tensor, keep: torch.Tensor, count: int) -> torch.Tensor:
    """The kept candidates of each row, in row order, without a host sync (unlike boolean indexing)."""
    slot = torch.where(keep, keep.cumsum(dim=1) - 1, count)  # dropped ones go to a spare column
    out = torch.empty((candidates.shape[0], count + 1), dtype=candidates.dtype, device=candidates.device)
    return out.scatter_(1, slot, candidates)[:, :count]


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
    change = cell.change
    change.check_image(height, width)
    device = image_ids.device if isinstance(image_ids, torch.Tensor) else torch.device("cpu")
    ids = _as_ids(image_ids, device)
    top, left, rows, cols = change.region(height, width)
    if change.positions == "shared":
        shared = torch.full((1,), _SHARED_IMAGE_ID, dtype=torch.int64, device=device)
        flat = _area_positions(cell, shared, rows * cols).expand(len(ids), -1)
    else:
        flat = _area_positions(cell, ids, rows * cols)
    return (flat // cols + top) * width + (flat % cols + left)


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
    out = images.clone()
    if images.shape[0] == 0:
        return out
    flat = draw_positions(cell, ids, height, width)  # (N, count)
    ys, xs = (flat // width).unsqueeze(-1), (flat % width).unsqueeze(-1)
    ch = _channels(cell.change.channel_indices, images.device).view(1, 1, -1)
    rows = torch.arange(images.shape[0], device=images.device).view(-1, 1, 1)
    index = (rows, ys, xs, ch) if layout == "NHWC" else (rows, ch, ys, xs)
    index = torch.broadcast_tensors(*index)
    out.index_put_(index, draw_values(cell, ids, out[index]))
    return out


# --- Ladders (pixels to failure), written from the README's "Ladders" section, not from pixelray.core.ladder_draws:
# the engine's draws must equal these bit for bit.

def ladder_id(amplitude: str, area: int | None, channels: str, seed: int, image_side: int) -> str:
    """The id that keys a ladder's draws, from failure.parquet's columns (area = the side means the whole image)."""
    amp = "full" if amplitude == "full" else f"a{int(amplitude)}"
    whole = area is None or area == image_side
    ch = "all" if channels == "all" else "c" + "".join(channels.split(","))
    return f"ladder-{amp}-{'whole' if whole else f's{area}'}-{ch}-seed{seed}"


def ladder_points(size: int, steps_per_octave: int, max_count: int) -> list[int]:
    """floor(2 ** (i / steps) + 0.5) for i = 0, 1, ... while <= max_count, each once, then max_count."""
    import math

    out, i = [], 0
    while math.floor(2 ** (i / steps_per_octave) + 0.5) <= max_count:
        k = math.floor(2 ** (i / steps_per_octave) + 0.5)
        if k not in out:
            out.append(k)
        i += 1
    return out if out[-1] == max_count else [*out, max_count]


def ladder_changes(image: torch.Tensor, image_id: int, k: int, the_id: str, amplitude: str, area: int | None,
                   channels: str) -> list[tuple[int, int, int, int]]:
    """The first ``k`` changes of the ladder ``the_id`` in one (H, W, 3) uint8 image: (y, x, channel, new value)."""
    import hashlib

    height, width = image.shape[:2]
    side_h, side_w = (height, width) if area is None or area == height == width else (area, area)
    top, left = (height - side_h) // 2, (width - side_w) // 2
    size = side_h * side_w
    key = int.from_bytes(hashlib.sha256(the_id.encode()).digest()[:8], "little") & (2**63 - 1)
    image_key = hash64(hash64(torch.tensor([image_id]) * _STREAM_MUL + _i64(key)))  # (1,)
    scores = (hash64(image_key + hash64(torch.arange(size) + (_STREAM_POSITION << 40))) & ((1 << 63) - 1)).tolist()
    b = max(1, (size - 1).bit_length())
    order = sorted(range(size), key=lambda q: (scores[q] >> b, q))
    chans = [0, 1, 2] if channels == "all" else [int(c) for c in channels.split(",")]
    index = torch.tensor([j * 4 + c for j in range(k) for c in chans], dtype=torch.int64)
    draws = (hash64(image_key + hash64(index + (_STREAM_VALUE << 40))) & ((1 << 63) - 1)).tolist()
    out = []
    for n, (j, c) in enumerate((j, c) for j in range(k) for c in chans):
        y, x = top + order[j] // side_w, left + order[j] % side_w
        if amplitude == "full":
            new = draws[n] % 256
        else:
            a = int(amplitude)
            new = min(255, max(0, int(image[y, x, c]) + draws[n] % (2 * a + 1) - a))
        out.append((y, x, c, new))
    return out


def ladder_image(image: torch.Tensor, image_id: int, k: int, the_id: str, amplitude: str, area: int | None,
                 channels: str) -> torch.Tensor:
    """One (H, W, 3) uint8 image with its first ``k`` changes of the ladder ``the_id``."""
    out = image.clone()
    for y, x, c, new in ladder_changes(image, image_id, k, the_id, amplitude, area, channels):
        out[y, x, c] = new
    return out
