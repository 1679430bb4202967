"""The counter-based hash every draw of pixelray comes from, and the small tensors built from it.

A draw is a function of (cell key, image id, stream, index) alone: SplitMix64's finaliser over
int64 tensors with wrapping arithmetic, on the batch's device, so an image's draws do not depend
on its batch, its place in it, the device or a retry. :mod:`pixelray.core.perturb` (pixel changes),
:mod:`pixelray.core.corrupt` (impulse noise), PGD's random start and the fine-tune's augmentation all
draw from here.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from pixelray.core.spec import Cell

__all__ = ["check_uint8", "hash64", "image_layout", "image_pixels"]

_MASK64 = (1 << 64) - 1
MASK63 = (1 << 63) - 1
STREAM_POSITION = 1
STREAM_VALUE = 2
SHARED_IMAGE_ID = -1  # the image id that keys the one position list of positions="shared"


def i64(value: int) -> int:
    """A 64-bit pattern as the signed int64 torch stores."""
    value &= _MASK64
    return value - (1 << 64) if value >= 1 << 63 else value


GOLDEN = i64(0x9E3779B97F4A7C15)
_MUL1 = i64(0xBF58476D1CE4E5B9)
_MUL2 = i64(0x94D049BB133111EB)
STREAM_MUL = i64(0xD6E8FEB86659FD93)


def shr(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's ``>>`` is arithmetic)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def mix(z: torch.Tensor) -> torch.Tensor:
    """SplitMix64's finaliser after its first add, in place on an int64 tensor the caller owns."""
    z.bitwise_xor_(shr(z, 30)).mul_(_MUL1)
    z.bitwise_xor_(shr(z, 27)).mul_(_MUL2)
    return z.bitwise_xor_(shr(z, 31))


def hash64(x: torch.Tensor) -> torch.Tensor:
    """SplitMix64 finaliser on an int64 tensor (wrapping arithmetic); returns int64 bits."""
    return mix(x + GOLDEN)


def image_keys(cell: Cell, image_ids: torch.Tensor) -> torch.Tensor:
    """One int64 key per image: a hash of (cell key, image_id)."""
    return hash64(hash64(image_ids * STREAM_MUL + i64(cell.key)))


def uniform(bits: torch.Tensor, n: int) -> torch.Tensor:
    """Integers in [0, n) from hash bits (63 bits mod n: bias below n / 2**63)."""
    return (bits & MASK63) % n


def stream_bits(keys: torch.Tensor, stream: int, index: torch.Tensor) -> torch.Tensor:
    """Hash bits for (image key, stream, index); keys (N, 1), index broadcastable."""
    return hash64(keys + hash64(index + (stream << 40)))


def as_ids(image_ids: torch.Tensor | Sequence[int], device: torch.device) -> torch.Tensor:
    ids = torch.as_tensor(image_ids, dtype=torch.int64, device=device)
    if ids.ndim != 1:
        raise ValueError(f"image_ids: expected one id per image (1-D), got shape {tuple(ids.shape)}")
    return ids


def _first_distinct(candidates: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``count`` distinct values per row, in row order, and whether each row had enough."""
    first = first_occurrence(candidates)
    enough = first.sum(dim=-1) >= count
    keep = first & (first.cumsum(dim=-1) <= count)
    return keep, enough


def first_occurrence(candidates: torch.Tensor) -> torch.Tensor:
    """bool, same shape: True where a value appears for the first time in its row (last dim)."""
    ordered, order = torch.sort(candidates, dim=-1, stable=True)
    new = F.pad(ordered[..., 1:] != ordered[..., :-1], (1, 0), value=True)
    return torch.empty_like(new).scatter_(-1, order, new)


@functools.lru_cache(maxsize=256)
def index_hashes(stream: int, index: tuple[int, ...] | int, device: torch.device) -> torch.Tensor:
    """``hash64(index + (stream << 40)) + GOLDEN`` (int64) on ``device``: the image-independent half
    of a stream's draws, with the next hash's first add folded in. ``index`` an int means ``range(index)``."""
    idx = torch.arange(index, dtype=torch.int64) if isinstance(index, int) else torch.tensor(index, dtype=torch.int64)
    return (hash64(idx + (stream << 40)) + GOLDEN).to(device)


def value_index(count: int, channels: tuple[int, ...]) -> tuple[int, ...]:
    """The value stream's indices ``k * 4 + channel``, k-major, as :func:`draw_values` numbers them."""
    return tuple(k * 4 + c for k in range(count) for c in channels)


def channel_tensor(channels: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """Channel indices as a tensor on ``device`` (no host-to-device copy for all three)."""
    if channels == (0, 1, 2):
        return torch.arange(3, device=device)
    return torch.tensor(channels, device=device)


def image_layout(images: torch.Tensor) -> str:
    """``"NHWC"`` or ``"NCHW"`` for a 4-D image batch with 3 channels; ValueError otherwise."""
    if images.ndim == 4 and images.shape[-1] == 3:
        return "NHWC"
    if images.ndim == 4 and images.shape[1] == 3:
        return "NCHW"
    raise ValueError(
        f"images: expected a batch (N, H, W, 3) or (N, 3, H, W), got shape {tuple(images.shape)}"
    )


def check_uint8(images: object, what: str = "images") -> None:
    """ValueError unless ``images`` is a torch uint8 tensor; a NumPy array is named as one, with the fix
    (not "expected dtype uint8, got uint8": NumPy's uint8 is not torch's)."""
    if not isinstance(images, torch.Tensor):
        kind = f"{type(images).__module__}.{type(images).__qualname__}"
        raise ValueError(f"{what}: expected a torch.Tensor, got a {kind}; convert it with torch.from_numpy(...)"
                         if kind.startswith("numpy.") else f"{what}: expected a torch.Tensor, got a {kind}")
    if images.dtype != torch.uint8:
        raise ValueError(f"{what}: expected dtype uint8, got {images.dtype}; convert pixel values to uint8 first")


def image_pixels(image: object, height: int, width: int) -> torch.Tensor:
    """One image as an (H, W, 3) uint8 tensor (a view), from a torch tensor or a NumPy array (copied), laid
    out (H, W, 3) or (3, H, W); ValueError naming the dtype and shape found otherwise."""
    if not isinstance(image, torch.Tensor):
        try:
            image = torch.tensor(image)  # a NumPy array (or nested lists); NumPy's uint8 becomes torch's
        except (TypeError, ValueError, RuntimeError):
            raise ValueError(f"image: expected a torch.Tensor or a NumPy array, got a {type(image).__name__}") from None
    if image.ndim != 3:
        raise ValueError(f"image: expected uint8 ({height}, {width}, 3), got {image.dtype} {tuple(image.shape)}")
    pixels = image.permute(1, 2, 0) if image.shape[0] == 3 and image.shape[-1] != 3 else image
    if tuple(pixels.shape) != (height, width, 3) or pixels.dtype != torch.uint8:
        raise ValueError(f"image: expected uint8 ({height}, {width}, 3), got {pixels.dtype} {tuple(pixels.shape)}")
    return pixels
