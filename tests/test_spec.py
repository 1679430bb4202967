"""PixelChange and Cell: validation (field, value and allowed range in every message), normalisation,
stable identity."""

from __future__ import annotations

import dataclasses
import hashlib
import re

import pytest

from pixelray.core.spec import Cell, PixelChange, Positions, parse_channels


def _raises(match_parts: list[str], func, *args, **kwargs) -> str:
    """Call ``func`` expecting a ValueError whose message contains every part; return the message."""
    with pytest.raises(ValueError) as info:
        func(*args, **kwargs)
    message = str(info.value)
    for part in match_parts:
        assert part in message, f"{part!r} not in {message!r}"
    return message


# --- count -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("count", [0, -1, -64, True, 1.5, "4", None])
def test_count_must_be_a_positive_integer(count):
    _raises(["count", repr(count), ">= 1"], PixelChange, count=count)


def test_count_larger_than_area_fails_at_construction():
    _raises(["count", "5", "area 2x2", "4"], PixelChange, count=5, area=2)
    _raises(["count", "40001", "40000"], PixelChange, count=200 * 200 + 1, area=200)
    assert PixelChange(count=4, area=2).count == 4  # exactly the area is allowed


def test_count_larger_than_image_fails_in_check_image():
    change = PixelChange(count=36)  # no area: only the image can say
    change.check_image(6, 6)
    _raises(["count", "36", "5x7", "35"], change.check_image, 5, 7)


def test_area_larger_than_image_fails_in_check_image():
    change = PixelChange(count=4, area=10)
    change.check_image(10, 12)
    _raises(["area", "10", "8x12", "<= 8"], change.check_image, 8, 12)
    _raises(["area", "10", "12x9", "<= 9"], change.check_image, 12, 9)
    _raises(["area", "300", "224x224", "<= 224"], PixelChange(count=64, area=300).check_image, 224, 224)


@pytest.mark.parametrize("area", [0, -3, True, 2.5, "200"])
def test_area_must_be_a_positive_integer_or_none(area):
    _raises(["area", repr(area), ">= 1"], PixelChange, count=1, area=area)


# --- amplitude -------------------------------------------------------------------------------------


@pytest.mark.parametrize("amplitude", [0, 256, -1, 1000, "half", "0", "256", "-5", "", True, 1.5, None])
def test_amplitude_outside_range(amplitude):
    _raises(["amplitude", repr(amplitude), "1..255"], PixelChange, count=1, amplitude=amplitude)


@pytest.mark.parametrize(
    ("given", "normal"),
    [("full", "full"), ("FULL", "full"), ("Full", "full"), (1, 1), (255, 255), ("10", 10)],
)
def test_amplitude_normalises(given, normal):
    assert PixelChange(count=1, amplitude=given).amplitude == normal


# --- channels --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "normal"),
    [
        ("all", "all"),
        ("ALL", "all"),
        ("R", (0,)),
        ("r", (0,)),
        ("red", (0,)),
        ("G", (1,)),
        ("Blue", (2,)),
        (0, (0,)),
        (2, (2,)),
        ("1", (1,)),
        ((0,), (0,)),
        (["B", "R"], (0, 2)),
        (("g", 2, 2), (1, 2)),
        ([0, 1, 2], "all"),
        (("R", "G", "B"), "all"),
        (("red", 1, "2"), "all"),
    ],
)
def test_channels_normalise(given, normal):
    assert parse_channels(given) == normal
    change = PixelChange(count=1, channels=given)
    assert change.channels == normal
    assert change.channel_indices == ((0, 1, 2) if normal == "all" else normal)


@pytest.mark.parametrize("channels", ["X", "alpha", 3, -1, "3", ("R", "Y"), [0, 5], True, 1.5])
def test_unknown_channel(channels):
    message = _raises(["channels"], PixelChange, count=1, channels=channels)
    assert re.search(r"'all'.*0(\.\.|, 1, )2.*R", message), message


@pytest.mark.parametrize("channels", [(), [], None])
def test_empty_or_missing_channels(channels):
    _raises(["channels", "'all'"], PixelChange, count=1, channels=channels)


# --- positions -------------------------------------------------------------------------------------


@pytest.mark.parametrize("positions", ["random", "SHARED", "", None, 1])
def test_unknown_positions_mode(positions):
    parts = ["positions", repr(positions), "'per-image'", "'shared'"]
    _raises(parts, PixelChange, count=1, positions=positions)


def test_positions_accept_enum_and_store_string():
    assert PixelChange(count=1, positions=Positions.SHARED).positions == "shared"
    assert PixelChange(count=1, positions="per-image").positions == "per-image"
    assert PixelChange(count=1, positions=Positions.SHARED) == PixelChange(count=1, positions="shared")


# --- region ----------------------------------------------------------------------------------------


def test_region_is_centred():
    assert PixelChange(count=1).region(5, 7) == (0, 0, 5, 7)
    assert PixelChange(count=1, area=3).region(5, 7) == (1, 2, 3, 3)
    assert PixelChange(count=1, area=4).region(5, 7) == (0, 1, 4, 4)
    assert PixelChange(count=1, area=200).region(224, 224) == (12, 12, 200, 200)
    assert PixelChange(count=1, area=50).region(224, 224) == (87, 87, 50, 50)


# --- Cell ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [-1, 2**31, True, "0", 1.0, None])
def test_cell_seed_range(seed):
    _raises(["seed", repr(seed), "2**31-1"], Cell, PixelChange(count=1), seed=seed)


def test_cell_needs_a_pixel_change():
    _raises(["change"], Cell, {"count": 4})


def test_cell_id_is_stable_and_readable():
    assert Cell(PixelChange(count=64, area=200)).cell_id == "n64-full-s200-all-per-image-seed0"
    cell = Cell(PixelChange(count=4, amplitude=10, channels=("R",), positions="shared"), seed=7)
    assert cell.cell_id == "n4-a10-whole-c0-shared-seed7"
    assert Cell(PixelChange(count=8, channels=["b", "g"]), seed=2**31 - 1).cell_id == (
        "n8-full-whole-c12-per-image-seed2147483647"
    )


def test_cell_key_is_pinned():
    # Pinned: a change here changes every random draw and invalidates stored results.
    assert Cell(PixelChange(count=64, area=200)).key == 1037039753207330453
    cell = Cell(PixelChange(count=4, amplitude=10, channels=("R",), positions="shared"), seed=7)
    assert cell.key == 997390246871481088
    digest = hashlib.sha256(cell.cell_id.encode()).digest()
    assert cell.key == int.from_bytes(digest[:8], "little") & (2**63 - 1)


def test_cell_keys_differ_between_cells_and_seeds():
    cells = [
        Cell(PixelChange(count=n, amplitude=a, area=s, channels=ch, positions=pos), seed=seed)
        for n in (4, 8, 16, 32, 64)
        for a in ("full", 10, 127)
        for s in (None, 50, 200)
        for ch in ("all", (0,))
        for pos in ("per-image", "shared")
        for seed in (0, 1, 2)
    ]
    assert len({c.cell_id for c in cells}) == len(cells)
    assert len({c.key for c in cells}) == len(cells)
    assert all(0 <= c.key < 2**63 for c in cells)


def test_equal_specs_are_equal_and_hash_alike():
    a = PixelChange(count=8, amplitude="10", channels=["R"])
    b = PixelChange(count=8, amplitude=10, channels=(0,))
    assert a == b and hash(a) == hash(b)
    assert Cell(a, 3) == Cell(b, 3) and hash(Cell(a, 3)) == hash(Cell(b, 3))
    assert Cell(a, 3).key == Cell(b, 3).key
    assert Cell(a, 3) != Cell(a, 4)
    assert len({a, b, Cell(a), Cell(b), Cell(a, 1)}) == 3
    assert {Cell(a): "x"}[Cell(b)] == "x"


def test_specs_are_frozen():
    change = PixelChange(count=8)
    cell = Cell(change)
    with pytest.raises(dataclasses.FrozenInstanceError):
        change.count = 9  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cell.seed = 1  # type: ignore[misc]


def test_replace_revalidates():
    change = PixelChange(count=8, area=10)
    with pytest.raises(ValueError, match="count"):
        dataclasses.replace(change, area=2)
    assert dataclasses.replace(change, amplitude="40").amplitude == 40
