"""``pixelray train-augment``: the few-pixel-change fine-tune on Ray Train (paper section 4, Tables 10-11).

The driver checks everything it can before anything is written (the config, the data, the
model and its head, the output directory), then runs one Ray Train ``TorchTrainer`` per
fine-tune: ``ScalingConfig(num_workers, use_gpu)``, ``RunConfig(storage_path=RUN_DIR,
name="train", failure_config=FailureConfig(max_failures))``, the per-worker loop of
``pixelray.train.loop``. Ray Train V2 resumes a run rebuilt with the same storage path and name from
its latest checkpoint, so rerunning the same command after a crash (of a worker, or of this
driver) goes on from the last finished epoch; a worker lost mid-run is replaced and the group
resumes the same way, up to ``max_failures`` times.

Layout of a run directory (with a list of counts, one per count under ``n<count>/``)::

    run.json        the config's identity and hash, versions; another config is refused here
    model.pt        the fine-tuned network's state_dict (torch.load(weights_only=True))
    pixelray.json   its sidecar: architecture, starting weights, head and label map, augmentation,
                    data manifest checksums, epochs, lr, seed, versions, final metrics
    epochs.parquet  one row per epoch (EPOCHS_SCHEMA), each epoch once, however often it resumed
    train/          Ray Train's run: epoch-NNNN/ checkpoints (state.pt, history.json), its snapshot

A sweep names the result as ``checkpoint:RUN_DIR`` (or ``checkpoint:RUN_DIR/model.pt``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

from pixelray import __version__
from pixelray.config.train import FineTune, TrainAugmentConfig
from pixelray.cpu_memory import worker_env
from pixelray.errors import SweepError, TrainError, one_line
from pixelray.store.atomic import write_table_atomic
from pixelray.store.rundir import RunDir
from pixelray.store.storage import Location, is_remote, join_uri
from pixelray.train.data import DataPlan, plan_data
from pixelray.train.gpus import check_cluster_gpus, check_local_gpus, device_line, embedded
from pixelray.train.loop import (
    CHECKPOINT_HISTORY,
    CHECKPOINT_STATE,
    LoopConfig,
    ModelShape,
    TrainHooks,
    build_model,
    shape_of,
    skeleton,
    train_loop_per_worker,
)
from pixelray.train.progress import EpochLines
from pixelray.train.schedule import run_all, side_by_side
from pixelray.train.shared import check_output_seen

__all__ = ["EPOCHS_SCHEMA", "TrainError", "TrainResult", "prepare_run", "run_train_augment", "side_by_side"]

EPOCHS_SCHEMA = pa.schema([
    ("run", pa.string()), ("aug", pa.string()), ("count", pa.int64()), ("seed", pa.int64()),
    ("epoch", pa.int64()), ("loss", pa.float64()), ("train_accuracy", pa.float64()),
    ("augmented_accuracy", pa.float64()), ("heldout_accuracy", pa.float64()), ("heldout_wrong_rate", pa.float64()),
    ("n_train", pa.int64()), ("n_augmented", pa.int64()), ("n_heldout", pa.int64()),
    ("images_per_s", pa.float64()), ("seconds", pa.float64()), ("eval_seconds", pa.float64()),
    ("started", pa.float64()), ("finished", pa.float64()), ("pid", pa.int64()), ("workers", pa.int64()),
    ("config_hash", pa.string()),
])

_TRAIN_NAME = "train"  # Ray Train's run name: RUN_DIR/train
_RUN_FILE = "run.json"


@dataclass(frozen=True)
class Prepared:
    """A fine-tune checked and planned, ready to run (nothing written yet)."""

    run: FineTune
    plan: DataPlan
    shape: ModelShape
    name: str
    state: str  # "new", "resume" or "done"


@dataclass
class TrainResult:
    """What one fine-tune left in its run directory."""

    run_dir: Path | str  # a URI (str) for a run in object storage
    model_path: Path | str
    epochs_path: Path | str
    skipped: bool = False  # it was already done
    resumed_from: int = 0  # the last epoch an earlier invocation had finished (0: none)
    timing: dict[str, float] = field(default_factory=dict)  # connect_s, fit_started (unix time), fit_s


def _arch(run: FineTune) -> str:
    """The built-in architecture of the starting model (a checkpoint's sidecar base)."""
    if not run.model.startswith("checkpoint:"):
        return run.model
    from pixelray.models import checkpoint_sidecar

    base = checkpoint_sidecar(run.model.split(":", 1)[1])["base"]
    if base != "tiny" and ":" in base:
        raise ValueError(f"checkpoint: its sidecar names base {base!r}, not a built-in architecture; "
                         "train-augment fine-tunes torchvision models, 'tiny' and checkpoints of them")
    return base


def _local(path: str | None) -> str | None:
    """A local path made absolute (URIs as they are): Ray Train runs its workers in a directory of their own."""
    return path if path is None or "://" in path else os.path.abspath(os.path.expanduser(path))


def _for_workers(run: FineTune) -> FineTune:
    """The fine-tune with every local path absolute, for the workers (the identity keeps what the user wrote)."""
    model = run.model
    if model.startswith("checkpoint:"):
        model = "checkpoint:" + _local(model.split(":", 1)[1])
    return dataclasses.replace(run, model=model, data=_local(run.data), eval_data=_local(run.eval_data),
                               output_dir=_local(run.output_dir))


def _at(root: str, *parts: str) -> Path | str:
    """A file or folder of a run directory: a Path on a file system, a URI (str) in object storage."""
    return join_uri(root, *parts) if is_remote(root) else Path(root, *parts)


def _run_dir_state(run: FineTune) -> str:
    """'new', 'resume' or 'done'; TrainError when the directory holds something else."""
    out = Location(run.output_dir)
    if not out.exists():
        return "new"
    if out.is_file():
        raise TrainError(f"[output] dir: {out} is a file; give a directory")
    run_file = out.child(_RUN_FILE)
    if run_file.exists():
        try:
            meta = json.loads(run_file.read_bytes())
        except (OSError, json.JSONDecodeError):
            meta = {}
        previous = meta.get("config_hash") if isinstance(meta, dict) else None
        if previous != run.config_hash or meta.get("kind") != "train-augment":
            raise TrainError(f"[output] dir: {out} holds a run of another config (hash {previous} != "
                             f"{run.config_hash}); use another output directory (--out) or delete this one")
        done = all(out.child(name).exists() for name in ("model.pt", "pixelray.json", "epochs.parquet"))
        return "done" if done else "resume"
    if any(out.path.iterdir()) if out.path is not None else out.files():
        raise TrainError(f"[output] dir: {out} is not empty and holds no train-augment run; use an empty or new "
                         "directory (--out)")
    return "new"


def prepare_run(run: FineTune) -> Prepared:
    """Check a fine-tune and plan its data, before anything is written.

    Raises:
        TrainError: bad data, model, head or output directory, with the fix.
    """
    state = _run_dir_state(run)
    try:
        plan = plan_data(_local(run.data), _local(run.eval_data), images=run.images, eval_images=run.eval_images,
                         holdout=run.holdout, split_seed=run.split_seed, workers=run.workers)
    except ValueError as exc:
        raise TrainError(f"[data] path = {run.data!r}: {exc}") from None
    change = run.augment.change
    if change is not None:
        try:
            change.check_image(*plan.image_size)
        except ValueError as exc:
            raise TrainError(f"[augment] {exc}") from None
    try:
        arch = _arch(run)
        model = build_model(run, arch, plan.labels, plan.num_classes)  # loads the weights: a bad file fails here
    except (ValueError, RuntimeError) as exc:  # RuntimeError: WeightsMissingError
        raise TrainError(f"[model] name = {run.model!r}: {exc}") from None
    shape = shape_of(model, arch)
    if state != "new":
        _check_same_data(Location(run.output_dir), plan)
    return Prepared(run, plan, shape, Location(run.output_dir).name or "run", state)


def _check_same_data(out: Location, plan: DataPlan) -> None:
    """Refuse to resume over data that changed since the run began (same paths, other manifests)."""
    meta = json.loads(out.child(_RUN_FILE).read_bytes())
    for key in ("data_manifest_sha256", "eval_manifest_sha256"):
        if meta.get(key) not in (None, getattr(plan, key.removeprefix("data_"))):
            raise TrainError(f"[data] {out} was trained on other data ({key} {meta[key][:12]}... differs from "
                             "the manifest now); use another output directory (--out) or restore the data")


def _claim(out: str, config_hash: str, say) -> RunDir:
    """The run directory, locked for this process as a sweep's is (``run.lock``; a dead holder's is taken over)."""
    run_dir = RunDir(out, log=say)
    try:
        run_dir.claim(config_hash)
    except SweepError as exc:
        raise TrainError(str(exc)) from None
    return run_dir


def _versions() -> dict[str, str]:
    import ray
    import torch

    return {"pixelray": __version__, "torch": torch.__version__, "ray": ray.__version__}


def _failure_message(exc: BaseException) -> str:
    failures = getattr(exc, "worker_failures", None)
    if failures:
        rank, cause = sorted(failures.items())[0]
        cause = getattr(cause, "cause", None) or cause
        text = one_line(cause, 400)
        return f"worker {rank} failed: {type(cause).__name__}: {text}"
    return one_line(exc, 400)


def _fit(prepared: Prepared, hooks: TrainHooks | None, callbacks: list | None = None):
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    run = prepared.run
    loop = LoopConfig(run=_for_workers(run), plan=prepared.plan, arch=prepared.shape.arch, name=prepared.name,
                      hooks=hooks)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"loop": loop},
        scaling_config=ScalingConfig(num_workers=run.workers, use_gpu=run.use_gpu,
                                     resources_per_worker={"CPU": run.cpus_per_worker,
                                                           **({"GPU": 1} if run.use_gpu else {})}),
        run_config=RunConfig(
            **_storage(run.output_dir), name=_TRAIN_NAME,
            failure_config=FailureConfig(max_failures=run.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            callbacks=callbacks or [],
            # huge pages for CPU workers, set where Ray starts them (not in this process)
            worker_runtime_env={"env_vars": worker_env("cuda" if run.use_gpu else "cpu", run.huge_pages)},
        ),
    )
    return trainer.fit()


def _storage(out: str) -> dict[str, Any]:
    """Ray Train's ``storage_path`` (and, in object storage, its ``storage_filesystem``) for a run directory."""
    if not is_remote(out):
        return {"storage_path": str(Path(out).resolve())}
    import pyarrow.fs as pafs

    fs, path = pafs.FileSystem.from_uri(out)
    return {"storage_path": path, "storage_filesystem": fs}


def _epochs_table(history: list[dict[str, Any]], prepared: Prepared) -> pa.Table:
    run = prepared.run
    change = run.augment.change
    common = {"run": prepared.name, "aug": run.augment.label, "count": change.count if change else None,
              "seed": run.seed, "config_hash": run.config_hash}
    rows = [{**common, **{k: row.get(k) for k in EPOCHS_SCHEMA.names if k not in common}} for row in history]
    return pa.Table.from_pylist(rows, schema=EPOCHS_SCHEMA)


def _finish(prepared: Prepared, checkpoint, versions: dict[str, str]) -> tuple[Any, Any, list[dict[str, Any]]]:
    """model.pt + pixelray.json + epochs.parquet from the run's last checkpoint."""
    import torch

    from pixelray.models import RUN_MODEL_FILE, RUN_SIDECAR_FILE, save_checkpoint

    run, out = prepared.run, prepared.run.output_dir
    with checkpoint.as_directory() as folder:
        state = torch.load(os.path.join(folder, CHECKPOINT_STATE), map_location="cpu", weights_only=True)
        history = json.loads(Path(folder, CHECKPOINT_HISTORY).read_text())["epochs"]
    if [row["epoch"] for row in history] != list(range(1, run.epochs + 1)):
        raise TrainError(f"{out}: the last checkpoint holds epochs {[r['epoch'] for r in history]}, not "
                         f"1..{run.epochs}; delete {out} and run again")
    model = skeleton(prepared.shape, prepared.name)
    model.load_state_dict(state["model"])
    final = {k: history[-1][k] for k in ("loss", "train_accuracy", "augmented_accuracy", "heldout_accuracy",
                                          "heldout_wrong_rate", "n_train", "n_heldout")}
    final = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in final.items()}  # JSON
    metadata = {
        "train_augment": {"config_hash": run.config_hash, "config": run.identity()},
        "augment": run.augment.identity(), "aug": run.augment.label, "head": run.head.value,
        "label_space": prepared.plan.num_classes, "started_from": run.model, "data": run.data,
        "data_manifest_sha256": prepared.plan.manifest_sha256, "eval_data": run.eval_data,
        "eval_manifest_sha256": prepared.plan.eval_manifest_sha256, "images": prepared.plan.n_train,
        "epochs": run.epochs, "lr": run.lr, "optimizer": run.optimizer.value, "batch_size": run.batch_size,
        "seed": run.seed, "workers": run.workers, "versions": versions, "final": final,
    }
    if is_remote(out):  # saved here, then each file put in place atomically (a temporary key, a copy)
        with tempfile.TemporaryDirectory(prefix="pixelray-model-") as local:
            save_checkpoint(model, Path(local, RUN_MODEL_FILE), base=prepared.shape.arch, metadata=metadata,
                            name=prepared.name, sidecar_file=Path(local, RUN_SIDECAR_FILE))
            for name in (RUN_MODEL_FILE, RUN_SIDECAR_FILE):
                Location(join_uri(out, name)).write_bytes(Path(local, name).read_bytes())
        Location(join_uri(out, "epochs.parquet")).write_table(_epochs_table(history, prepared))
        return _at(out, RUN_MODEL_FILE), _at(out, "epochs.parquet"), history
    model_path = save_checkpoint(model, Path(out, RUN_MODEL_FILE), base=prepared.shape.arch, metadata=metadata,
                                 name=prepared.name, sidecar_file=Path(out, RUN_SIDECAR_FILE))
    epochs_path = Path(out, "epochs.parquet")
    write_table_atomic(_epochs_table(history, prepared), epochs_path)
    return model_path, epochs_path, history


def _run_one(prepared: Prepared, say, progress: bool, hooks: TrainHooks | None) -> TrainResult:
    run, out = prepared.run, Location(prepared.run.output_dir)
    lock = _claim(run.output_dir, run.config_hash, say)
    try:
        versions = _versions()
        if not out.child(_RUN_FILE).exists():
            meta = {"kind": "train-augment", "config_hash": run.config_hash, "config": run.identity(),
                    "data_manifest_sha256": prepared.plan.manifest_sha256,
                    "eval_manifest_sha256": prepared.plan.eval_manifest_sha256,
                    "versions": versions, "created": time.time()}
            out.child(_RUN_FILE).write_text(json.dumps(meta, indent=2, default=str) + "\n")
        done = sorted({rel.split("/", 1)[0] for rel in out.child(_TRAIN_NAME).files() if rel.startswith("epoch-")})
        say(f"{prepared.name}: {run.augment.label}, {prepared.plan.n_train} training images "
            f"({run.workers} worker{'s' if run.workers > 1 else ''}), {prepared.plan.n_heldout} held out, "
            f"{run.epochs} epochs" + (f"; checkpoints found ({done[-1]}): resuming" if done else ""))
        t0 = time.time()
        with EpochLines(prepared.name, run.epochs, run.augment.change, say) if progress else _nothing() as watch:
            try:
                result = _fit(prepared, hooks, [watch.callback] if progress else None)
            except Exception as exc:  # noqa: BLE001 - Ray Train's errors: worker group or controller
                raise TrainError(f"{prepared.name}: training failed ({_failure_message(exc)}); rerun the same "
                                 "command to resume from the last checkpoint") from None
        fit_s = time.time() - t0
        if result.checkpoint is None:
            raise TrainError(f"{prepared.name}: Ray Train reported no checkpoint; delete {out} and run again")
        model_path, epochs_path, history = _finish(prepared, result.checkpoint, versions)
    finally:
        lock.release()
    earlier = [row["epoch"] for row in history if row["finished"] < t0]
    say(f"{prepared.name}: done -> {out} (model.pt, pixelray.json, epochs.parquet)")
    return TrainResult(_at(run.output_dir), model_path, epochs_path, resumed_from=max(earlier, default=0),
                       timing={"fit_started": t0, "fit_s": fit_s})


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None


def run_train_augment(
    config: TrainAugmentConfig,
    *,
    address: str | None = None,
    log: Callable[[str], None] | None = None,
    progress: bool = True,
    hooks: TrainHooks | None = None,
) -> list[TrainResult]:
    """Run (or resume) every fine-tune of ``config``; returns one :class:`TrainResult` per fine-tune.

    Every fine-tune is checked and planned before the first one starts or anything is written.
    Then it joins Ray (the connected cluster, else ``address``: None/``local`` starts an embedded
    one, ``auto`` or an address joins a cluster).

    Args:
        hooks: for tests only: trace the workers' images, or make one die (see :class:`TrainHooks`).

    With ``use_gpu``, an embedded local Ray on a machine without (enough) CUDA GPUs, or a cluster
    without them and without an autoscaler that can add them, is refused at once: Ray Train would
    wait for them forever.

    Raises:
        ConfigError: a path still holds an example's placeholder (``s3://YOUR-BUCKET/...``).
        TrainError: with the reason and the fix.
    """
    from pixelray.models import RUN_MODEL_FILE
    from pixelray.sweep import connect

    say = log or (lambda msg: None)
    config.check_placeholders()  # ConfigError: an example's s3://YOUR-BUCKET left in a path
    if len(config.runs) > 1 and Location(join_uri(config.output_dir, _RUN_FILE)).exists():
        raise TrainError(f"[output] dir: {config.output_dir} holds a single run; a list of counts needs a "
                         "directory of its own (one sub-directory per count)")
    todo = [run for run in config.runs if _run_dir_state(run) != "done"]
    gpus = max((run.workers for run in todo if run.use_gpu), default=0)  # one per worker
    if todo and embedded(address):
        check_local_gpus(gpus)  # before anything slow: a machine without CUDA fails at once
    prepared = [prepare_run(run) for run in config.runs]
    results: list[TrainResult] = []
    t0 = time.time()
    if todo:
        if not gpus:
            say(device_line(todo, gpus))
        connect(address)
        reach = check_cluster_gpus(gpus, say)
        for run in todo:  # a local directory on several nodes: every one must see it (a shared mount)
            if "://" not in run.output_dir:
                check_output_seen(run.output_dir)
        if gpus:
            say(device_line(todo, gpus))
    connect_s = time.time() - t0
    for item in prepared:
        if item.state == "done":
            say(f"{item.name}: already done in {item.run.output_dir}; delete it to train again")
    train = [item for item in prepared if item.state != "done"]
    at_once = side_by_side([item.run for item in train], reach) if len(train) > 1 else 1
    if at_once > 1:
        say(f"{len(train)} fine-tunes, {at_once} at a time: the cluster has (or can add) room for the workers of "
            f"{at_once}")
    trained = run_all(train, at_once, lambda item: _run_one(item, say, progress, hooks))
    for item in prepared:
        out = item.run.output_dir
        if item.state == "done":
            results.append(TrainResult(_at(out), _at(out, RUN_MODEL_FILE), _at(out, "epochs.parquet"), skipped=True))
        else:
            result = trained[id(item)]
            result.timing["connect_s"] = connect_s
            results.append(result)
    return results
