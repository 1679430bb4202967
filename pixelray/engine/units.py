"""The unit of work of a sweep: a phase, a model and a shard; its key names its unit file."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pixelray.shards import ShardExpectation

__all__ = ["Phase", "Unit", "model_slug"]


class Phase(str, Enum):
    """The phases of a sweep, in the order they run."""

    CLEAN = "clean"  # every model predicts every image once
    CELLS = "cells"  # every cell over the evaluation set
    ATTACK = "attack"  # adversarial examples, then every cell and every judge over them
    FAILURE = "failure"  # pixels to failure: every ladder over the evaluation set


@dataclass(frozen=True)
class Unit:
    """One piece of work: a phase, a model and a shard.

    ``image_ids`` (cells and attack phases) are the images of that shard to run:
    the evaluation set, or the attack's candidates.
    """

    phase: Phase
    model: str
    shard: str  # URI or path of the shard file
    shard_name: str  # its file name in the manifest, used for the unit file
    image_ids: tuple[int, ...] | None = None
    expect: ShardExpectation | None = None  # the manifest's entry; the read is checked against it
    attack: str | None = None  # the attack's name (attack phase)

    def __post_init__(self) -> None:
        object.__setattr__(self, "phase", Phase(self.phase))

    @property
    def key(self) -> str:
        stem = self.shard_name.rsplit(".", 1)[0]
        phase = self.phase.value if self.attack is None else f"{self.phase.value}/{self.attack}"
        return f"{phase}/{model_slug(self.model)}/{stem}"


def model_slug(name: str) -> str:
    """A file-name-safe, unique form of a model spec: its readable tail and a short hash of all of it."""
    readable = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)[-80:]
    return f"{readable}-{hashlib.sha256(name.encode()).hexdigest()[:8]}"
