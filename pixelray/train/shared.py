"""Whether every node of the cluster sees a fine-tune's local output directory.

Ray Train writes its checkpoints under ``storage_path`` from rank 0, wherever rank 0 runs, and a
restarted group (a worker lost, the driver rerun) resumes from there. A local path on a cluster of
several nodes is only safe on a mount every node shares: otherwise the checkpoints land on one
node's disk, a rank 0 elsewhere cannot resume, and the driver cannot finish the run. So before
training, the driver writes a marker into the directory and a task on each alive node reads it back.
"""

from __future__ import annotations

import secrets
from pathlib import Path

from pixelray.errors import TrainError

__all__ = ["MARKER", "check_output_seen"]

MARKER = ".pixelray-shared-check"


def _reads(path: str) -> str | None:
    try:
        return Path(path).read_text()
    except OSError:
        return None


def check_output_seen(out_dir: str, timeout: float = 60.0) -> int:
    """Refuse (TrainError, one line) a local ``out_dir`` that an alive node of the connected cluster does
    not see; returns the number of nodes checked (1: a single node, nothing to check). Leaves nothing
    behind: the marker is removed, and so is the directory where this check made it."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = [n for n in ray.nodes() if n["Alive"]]
    if len(nodes) < 2:
        return len(nodes)
    out = Path(out_dir).resolve()
    made = [p for p in (out, *out.parents) if not p.exists()]
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise TrainError(f"[output] dir: cannot create {out} ({exc.strerror}); give a writable directory") from None
    marker, token = out / MARKER, secrets.token_hex(16)
    try:
        marker.write_text(token)
        read = ray.remote(num_cpus=0, max_retries=0)(_reads)
        refs = {n["NodeManagerAddress"] + " (" + n["NodeID"][:8] + ")": read.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(str(marker))
            for n in nodes}
        try:
            seen = dict(zip(refs, ray.get(list(refs.values()), timeout=timeout), strict=True))
        except ray.exceptions.GetTimeoutError:
            raise TrainError(f"[output] dir: could not check within {timeout:g} s that every node sees {out} "
                             "(a node did not run the check); try again once the cluster is settled") from None
    finally:
        marker.unlink(missing_ok=True)
        for folder in made:  # deepest first: only the directories this check created, and only if empty
            try:
                folder.rmdir()
            except OSError:
                break
    blind = sorted(node for node, text in seen.items() if text != token)
    if blind:
        raise TrainError(
            f"[output] dir: {out} is local to some nodes: {len(blind)} of {len(nodes)} node(s) do not see it "
            f"({', '.join(blind[:3])}{', ...' if len(blind) > 3 else ''}), so Ray Train workers there could not "
            "write or resume its checkpoints; give a directory on a mount every node shares (NFS, EFS, a "
            "ReadWriteMany claim)")
    return len(nodes)
