"""``pixelray cell show``: the positions and values a cell changes in one image, from a result row's ``cell_id``.

A thin shell over :func:`pixelray.core.corrupt.describe_cell` (:func:`pixelray.core.perturb.describe_change`
for a pixel change); mounted on the main app by :mod:`pixelray.cli`. The Python equivalent::

    from pixelray.core.corrupt import describe_cell
    from pixelray.core.spec import Cell
    describe_cell(Cell.from_id(row.cell_id), image_id, 224, 224)
"""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Annotated

import typer

from pixelray.cli.common import fail

__all__ = ["cell_app"]

cell_app = typer.Typer(
    help="Reproduce a cell's draws: which pixels and values it changes in an image.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # plain help: Rich markup would eat "[output]" and the like
    add_completion=False,
)


def _image(data: str, image_id: int):
    """(the image (H, W, 3) uint8, height, width) of ``image_id`` in the data set at ``data``."""
    from pixelray.shards import ShardError, ShardExpectation, load_manifest, read_shard, shard_uris

    try:
        manifest = load_manifest(data)
        for uri, info in zip(shard_uris(data, manifest), manifest.shards, strict=True):
            if info.min_id <= image_id <= info.max_id:
                batch = read_shard(uri, [image_id], ShardExpectation.of(manifest, info))
                if len(batch):
                    return batch.images[0], manifest.height, manifest.width
    except (OSError, ShardError) as exc:
        fail(f"--data {data}: {exc}")
    fail(f"--image-id {image_id}: no such image in {data}")


@cell_app.command("show")
def show_cmd(
    cell_id: Annotated[str, typer.Argument(help="A cell id, e.g. the cell_id column of cells.parquet.")],
    image_id: Annotated[int, typer.Option("--image-id", help="The image's id.")],
    size: Annotated[
        str | None, typer.Option("--size", help="Image size, SIDE or HxW (default: from --data, else 224).")
    ] = None,
    data: Annotated[
        str | None,
        typer.Option("--data", help="The data set (shards + manifest): adds the image's old and new values."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object instead of a table.")] = False,
    count: Annotated[
        int | None, typer.Option("--count", help="A ladder's first COUNT changes (with a ladder_id; e.g. n_fail).")
    ] = None,
) -> None:
    """The pixels CELL_ID changes in image IMAGE_ID: position, channel, and the new value (or shift).

    CELL_ID is a cells.parquet cell_id, or a failure.parquet ladder_id with --count K: the image's
    first K changes on that ladder, in ladder order.

    Example: pixelray cell show n64-full-whole-all-per-image-seed0 --image-id 17 --size 224
    """
    from pixelray.core.corrupt import describe_cell
    from pixelray.core.ladder import Ladder
    from pixelray.core.ladder_draws import describe_ladder
    from pixelray.core.spec import Cell, Corruption

    image = None
    if data is not None:
        image, height, width = _image(data, image_id)
    if size is not None:
        try:
            parts = [int(p) for p in size.lower().split("x")]
            height, width = (parts[0], parts[0]) if len(parts) == 1 else parts
        except ValueError:
            fail(f"--size {size!r}: expected SIDE or HxW, e.g. 224 or 240x320")
        if image is not None and (height, width) != tuple(image.shape[:2]):
            fail(f"--size {size}: the images of --data are {image.shape[0]}x{image.shape[1]}")
    elif data is None:
        height = width = 224
    ladder = cell_id.startswith("ladder-")
    if ladder and count is None:
        fail(f"--count: {cell_id!r} is a ladder; add --count K for its first K changes (e.g. the row's n_fail)")
    if not ladder and count is not None:
        fail(f"--count {count}: only a ladder id (ladder-...) takes --count; a cell id names its own count")
    try:
        if ladder:
            cell = Ladder.from_id(cell_id).for_image(height, width)
            record = describe_ladder(cell, image_id, count, height, width, image)
        else:
            cell = Cell.from_id(cell_id, (height, width))
            record = describe_cell(cell, image_id, height, width, image)
    except ValueError as exc:
        fail(str(exc))
    if as_json:
        typer.echo(json.dumps({**asdict(record), "height": height, "width": width}))
        return
    if ladder:
        typer.echo(f"ladder {record.cell_id}, image {image_id} ({height}x{width}): its first {count} positions x "
                   f"{len(cell.channel_indices)} channels, amplitude {cell.amplitude}, in ladder order")
    elif isinstance(cell.change, Corruption):
        typer.echo(f"cell {record.cell_id}, image {image_id} ({height}x{width}): {cell.change.family} at severity "
                   f"{cell.change.severity}, {len(record.y)} of {height * width * 3} values replaced")
    else:
        typer.echo(f"cell {record.cell_id}, image {image_id} ({height}x{width}): {cell.change.count} positions x "
                   f"{len(cell.change.channel_indices)} channels, amplitude {cell.change.amplitude}")
    head = ["y", "x", "channel"] + (["old"] if record.old else []) + (["shift"] if record.shift else [])
    head += ["new"] if record.value else []
    typer.echo("  ".join(f"{h:>7}" for h in head))
    for k in range(len(record.y)):
        row = [record.y[k], record.x[k], "RGB"[record.channel[k]]]
        row += [record.old[k]] if record.old else []
        row += [f"{record.shift[k]:+d}"] if record.shift else []
        row += [record.value[k]] if record.value else []
        typer.echo("  ".join(f"{v!s:>7}" for v in row))
    if record.value is None:
        typer.echo("(a shift: the new value is the old one plus the shift, clipped to 0..255; give --data for it)")
