"""The fine-tune on one Ray Train worker: ``train_loop_per_worker`` and the model it trains.

Each worker reads its share of the training and held-out images (see ``pixelray.train.data``)
onto its device, builds the starting model with its head (:func:`build_model`), wraps it
with ``ray.train.torch.prepare_model`` (DDP when there are several workers) and trains:
per step, the augmentation runs on the device on the step's batch
(:func:`pixelray.core.augment.augment_batch`), then forward, loss, backward, optimiser step;
nothing waits for the host inside an epoch. After each epoch the held-out images are
scored clean and under the run's pixel change (each worker its share, the counts summed
over the workers), and rank 0 saves a checkpoint (model, optimiser, epoch, the table of
epochs so far) through ``ray.train.report``. A restarted worker group, or the same command
run again, resumes from the latest checkpoint (``ray.train.get_checkpoint``); since each
epoch's order and draws are a function of (seed, epoch, worker), the resumed run takes the
same steps the uninterrupted one would have.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from pixelray.config.train import FineTune, Head, Optimizer
from pixelray.core.augment import augment_batch, epoch_seed
from pixelray.core.spec import Cell
from pixelray.errors import one_line
from pixelray.models import Classifier, LabelMap, load_model
from pixelray.store.atomic import write_text_atomic
from pixelray.train.data import DataPlan, read_share

__all__ = ["CHECKPOINT_HISTORY", "CHECKPOINT_STATE", "LoopConfig", "ModelShape", "build_model",
           "TrainHooks", "replace_head", "shape_of", "skeleton", "train_loop_per_worker"]

#: Files of a Ray Train checkpoint: the state (torch, weights-only) and the epochs so far (JSON).
CHECKPOINT_STATE = "state.pt"
CHECKPOINT_HISTORY = "history.json"
_EVAL_BATCH = 256


@dataclass(frozen=True)
class TrainHooks:
    """For tests only (no config key or flag reaches it): observe the workers, make one die, or make one hold.

    Attributes:
        trace: a directory; every worker appends the image ids of each step to
            ``epoch<e>-rank<r>.txt`` there (to count which images each worker saw).
        die_in_epoch: the worker of ``die_rank`` kills its own process (SIGKILL) after its first
            step of this epoch, once: it writes ``marker`` (pid, time, epoch) first and does nothing
            once that file exists.
        hold_in_epoch: the worker of ``die_rank`` stops after its first step of this epoch, once: it
            writes ``hold_marker`` and sleeps until something kills it (a test killing the driver at
            a known point: the job's workers die with it).

    Before writing a marker the worker waits until Ray Train has registered the previous epoch's
    checkpoint, so that the test knows which checkpoint a restarted group (or a rerun) resumes from.
    """

    trace: str | None = None
    die_in_epoch: int | None = None
    die_rank: int = 0
    marker: str | None = None
    hold_in_epoch: int | None = None
    hold_marker: str | None = None

    def after_step(self, epoch: int, rank: int, image_ids: torch.Tensor) -> None:
        if self.trace is not None:
            with open(os.path.join(self.trace, f"epoch{epoch}-rank{rank}.txt"), "a") as f:
                f.write("".join(f"{i}\n" for i in image_ids.tolist()))
        if rank != self.die_rank:
            return
        if epoch == self.die_in_epoch and self._mark(self.marker, epoch):
            os.kill(os.getpid(), signal.SIGKILL)
        if epoch == self.hold_in_epoch and self._mark(self.hold_marker, epoch):
            while True:
                time.sleep(60)

    @staticmethod
    def _mark(marker: str | None, epoch: int) -> bool:
        """Write ``marker`` (pid, time, epoch) once the previous checkpoint is registered; False if it exists."""
        if marker is None or os.path.exists(marker):
            return False
        import ray.train

        ray.train.get_all_reported_checkpoints(consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED)
        write_text_atomic(json.dumps({"pid": os.getpid(), "time": time.time(), "epoch": epoch}), marker)
        return True


@dataclass(frozen=True)
class ModelShape:
    """What the trained model looks like, so the driver can rebuild it without pretrained weights.

    Attributes:
        arch: the built-in architecture (a torchvision name or ``"tiny"``).
        head_size: outputs of the network's last layer.
        labels: the data set label of each output (a replaced head), or None.
        num_classes: the label space (the model's classes).
        mean, std: the normalisation inside the classifier.
        source: the weights the fine-tune started from.
    """

    arch: str
    head_size: int
    labels: tuple[int, ...] | None
    num_classes: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    source: str


@dataclass(frozen=True)
class LoopConfig:
    """Everything a worker needs: the fine-tune, its data plan, the architecture, its name (metrics tag)."""

    run: FineTune
    plan: DataPlan
    arch: str
    name: str
    hooks: TrainHooks | None = None


def _head_name(net: nn.Module, outputs: int) -> str:
    """The name of the network's last layer: its last Linear or Conv2d, which must give ``outputs``."""
    layers = [(n, m) for n, m in net.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    if layers:
        name, layer = layers[-1]
        size = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
        if size == outputs:
            return name
    raise ValueError(f"head: cannot find the last layer of {type(net).__name__} (a Linear or 1x1 Conv2d with "
                     f"{outputs} outputs); use head = 'keep'")


def replace_head(model: Classifier, arch: str, labels: Sequence[int], num_classes: int, seed: int) -> Classifier:
    """``model`` with a new last layer for ``labels`` (random init, seeded), outputs at their data set labels.

    Every other tensor is the model's own: the architecture ``arch`` built with ``len(labels)``
    classes takes the model's state except the last layer, which must be the only difference.
    """
    inner = model.net.net if isinstance(model.net, LabelMap) else model.net
    outputs = len(model.net.labels) if isinstance(model.net, LabelMap) else model.num_classes
    head = _head_name(inner, outputs)
    fresh = load_model(arch, None, num_classes=len(labels), init_seed=seed).net
    state = {k: v for k, v in inner.state_dict().items() if not k.startswith(head + ".")}
    try:
        result = fresh.load_state_dict(state, strict=False)
    except RuntimeError as exc:
        raise ValueError(f"head: {arch} with {len(labels)} classes differs from the model in more than its last "
                         f"layer {head!r} ({one_line(exc, 200)})") from None
    if result.unexpected_keys or any(not k.startswith(head + ".") for k in result.missing_keys):
        raise ValueError(f"head: {arch} with {len(labels)} classes differs from the model in more than its last "
                         f"layer {head!r}")
    return Classifier(LabelMap(fresh, labels, num_classes), name=model.name, num_classes=num_classes,
                      mean=model.mean, std=model.std, weights=model.weights, source=model.source)


def build_model(run: FineTune, arch: str, labels: Sequence[int], num_classes: int) -> Classifier:
    """The model a fine-tune starts from, with the head ``run.head`` asks for; trainable, in train mode.

    Random init (``tiny``, or a torchvision name without weights) builds the head at its final
    size: the data set's classes (keep) or the training labels (replace). Pretrained weights and
    checkpoints keep their classes (keep) or get a new last layer (replace).

    Raises:
        ValueError: keep with training labels outside the model's classes, or a model whose last
            layer cannot be replaced.
    """
    labels = list(labels)
    if run.weights is None and not run.model.startswith("checkpoint:"):
        size = len(labels) if run.head is Head.REPLACE else num_classes
        model = load_model(run.model, None, num_classes=size, init_seed=run.seed)
        if run.head is Head.REPLACE:
            model = Classifier(LabelMap(model.net, labels, num_classes), name=model.name, num_classes=num_classes,
                               mean=model.mean, std=model.std, weights=model.weights, source=model.source)
    else:
        model = load_model(run.model, run.weights, init_seed=run.seed)
        if run.head is Head.REPLACE:
            model = replace_head(model, arch, labels, num_classes, run.seed)
        else:
            known = set(model.net.labels) if isinstance(model.net, LabelMap) else set(range(model.num_classes))
            outside = sorted(set(labels) - known)
            if outside:
                more = " ..." if len(outside) > 5 else ""
                raise ValueError(f"head = 'keep': the training images have labels {outside[:5]}{more} that "
                                 f"{run.model} does not predict (it has {model.num_classes} classes); use "
                                 "head = 'replace' (--head replace) for a new last layer")
    model.requires_grad_(True)
    return model.train()


def shape_of(model: Classifier, arch: str) -> ModelShape:
    """The :class:`ModelShape` of a model :func:`build_model` made."""
    mapped = isinstance(model.net, LabelMap)
    return ModelShape(arch=arch, head_size=len(model.net.labels) if mapped else model.num_classes,
                      labels=tuple(model.net.labels) if mapped else None, num_classes=model.num_classes,
                      mean=model.mean, std=model.std, source=model.source)


def skeleton(shape: ModelShape, name: str) -> Classifier:
    """A model of ``shape`` (random init) to load a trained state into; no pretrained weights needed."""
    net = load_model(shape.arch, None, num_classes=shape.head_size).net
    if shape.labels is not None:
        net = LabelMap(net, shape.labels, shape.num_classes)
    return Classifier(net, name=name, num_classes=shape.num_classes, mean=shape.mean, std=shape.std,
                      weights="checkpoint", source=shape.source)


def _optimizer(run: FineTune, params) -> torch.optim.Optimizer:
    if run.optimizer is Optimizer.SGD:
        return torch.optim.SGD(params, lr=run.lr, momentum=run.momentum, weight_decay=run.weight_decay)
    return torch.optim.AdamW(params, lr=run.lr, weight_decay=run.weight_decay)


@contextlib.contextmanager
def _seeded(seed: int, device: torch.device):
    """Global generators (dropout) seeded for a block, the caller's state restored afterwards."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, device_type=device.type if devices else "cuda"):
        torch.manual_seed(seed)
        yield


def _autocast(device: torch.device, amp: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16) if amp else contextlib.nullcontext()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _all_reduce(values: torch.Tensor, world: int) -> torch.Tensor:
    if world > 1:
        import torch.distributed as dist

        dist.all_reduce(values)
    return values


def _evaluate(model: Classifier, data, run: FineTune, world: int, device: torch.device) -> torch.Tensor:
    """[held-out images, correct clean, correct clean but wrong under the change], summed over the workers."""
    from pixelray.engine.evaluate import correct_under_cells, predict

    ids, labels, images = data
    counts = torch.zeros(3, dtype=torch.float64, device=device)
    if len(ids):
        correct = predict(model, images, _EVAL_BATCH, run.amp) == labels
        counts[0], counts[1] = len(ids), correct.sum()
        if run.augment.change is not None:
            changed = correct_under_cells(model, images, labels, ids, [Cell(run.augment.change, 0)], _EVAL_BATCH,
                                          run.amp)[0]
            counts[2] = (correct & ~changed).sum()
    return _all_reduce(counts, world)


def _resume(model: Classifier, opt: torch.optim.Optimizer) -> tuple[int, list[dict[str, Any]]]:
    """Load the latest checkpoint of this run, if any; returns (first epoch to train, epochs so far)."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return 1, []
    with checkpoint.as_directory() as folder:
        state = torch.load(os.path.join(folder, CHECKPOINT_STATE), map_location="cpu", weights_only=True)
        with open(os.path.join(folder, CHECKPOINT_HISTORY)) as f:
            history = json.load(f)["epochs"]
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    return int(state["epoch"]) + 1, history


def _report(row: dict[str, Any], history: list[dict[str, Any]], model: Classifier, opt, rank: int) -> None:
    import ray.train

    with tempfile.TemporaryDirectory(prefix="pixelray-ckpt-") as folder:
        checkpoint = None
        if rank == 0:
            state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": row["epoch"]}
            torch.save(state, os.path.join(folder, CHECKPOINT_STATE))
            with open(os.path.join(folder, CHECKPOINT_HISTORY), "w") as f:
                json.dump({"epochs": history}, f)
            checkpoint = ray.train.Checkpoint.from_directory(folder)
        ray.train.report(row, checkpoint=checkpoint, checkpoint_dir_name=f"epoch-{row['epoch']:04d}")


class _Metrics:
    """Epoch, loss, accuracy and images/s as Prometheus metrics through Ray's metrics agent."""

    def __init__(self, run: str):
        from ray.util import metrics

        tags = ("run",)
        self.tags = {"run": run}
        self.epoch = metrics.Gauge("pixelray_train_epoch", description="Last finished epoch.", tag_keys=tags)
        self.loss = metrics.Gauge("pixelray_train_loss", description="Mean training loss of the epoch.",
                                  tag_keys=tags)
        self.accuracy = metrics.Gauge("pixelray_train_accuracy", description="Training accuracy of the epoch.",
                                      tag_keys=tags)
        self.heldout = metrics.Gauge("pixelray_train_heldout_accuracy", description="Held-out clean accuracy.",
                                     tag_keys=tags)
        self.rate = metrics.Gauge("pixelray_train_images_per_second", description="Training images/s.",
                                  tag_keys=tags)
        self.images = metrics.Counter("pixelray_train_images", description="Training images seen.", tag_keys=tags)

    def record(self, row: dict[str, Any]) -> None:
        self.epoch.set(row["epoch"], tags=self.tags)
        self.loss.set(row["loss"], tags=self.tags)
        self.accuracy.set(row["train_accuracy"], tags=self.tags)
        self.heldout.set(row["heldout_accuracy"], tags=self.tags)
        self.rate.set(row["images_per_s"], tags=self.tags)
        self.images.inc(row["n_train"], tags=self.tags)


def _rate(num: float, den: float) -> float | None:
    return num / den if den else None


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train's per-worker function; ``config["loop"]`` is a :class:`LoopConfig`."""
    import ray.train
    import ray.train.torch

    loop: LoopConfig = config["loop"]
    run, plan = loop.run, loop.plan
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(run.threads or max(1, int(run.cpus_per_worker)))
    device = ray.train.torch.get_device()
    ids, labels, images = (t.to(device) for t in read_share(plan.train[rank]))
    heldout = tuple(t.to(device) for t in read_share(plan.heldout[rank]))
    model = build_model(run, loop.arch, plan.labels, plan.num_classes)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    ddp = ray.train.torch.prepare_model(model)
    opt = _optimizer(run, model.parameters())
    start, history = _resume(model, opt)
    metrics = _Metrics(loop.name) if rank == 0 else None
    per_worker = max(1, run.batch_size // world)
    steps = -(-len(ids) // per_worker)
    for epoch in range(start, run.epochs + 1):
        started = time.time()
        key = epoch_seed(run.seed, epoch)
        order = torch.randperm(len(ids), generator=torch.Generator().manual_seed(key * 64 + rank)).to(device)
        sums = torch.zeros(5, dtype=torch.float64, device=device)  # loss x n, n, correct, augmented, aug correct
        ddp.train()
        with _seeded(key * 64 + rank, device):
            for step in range(steps):
                pick = order[step * per_worker:(step + 1) * per_worker]
                batch, augmented = augment_batch(images[pick], ids[pick], run.augment, run.seed, epoch)
                truth = labels[pick]
                with _autocast(device, run.amp):
                    logits = ddp(batch)
                loss = nn.functional.cross_entropy(logits.float(), truth)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                with torch.no_grad():
                    right = logits.argmax(1) == truth
                    sums += torch.stack([loss.detach() * len(truth), torch.tensor(len(truth), device=device),
                                         right.sum(), augmented.sum(), (right & augmented).sum()]).double()
                if loop.hooks is not None:
                    loop.hooks.after_step(epoch, rank, ids[pick])
        _sync(device)
        seconds = time.time() - started
        s = _all_reduce(sums, world).tolist()
        model.eval()
        held = _evaluate(model, heldout, run, world, device).tolist()
        row = {
            "epoch": epoch, "loss": s[0] / s[1], "train_accuracy": s[2] / s[1],
            "augmented_accuracy": _rate(s[4], s[3]), "n_train": int(s[1]), "n_augmented": int(s[3]),
            "heldout_accuracy": held[1] / held[0], "heldout_wrong_rate": _rate(held[2], held[1])
            if run.augment.change is not None else None, "n_heldout": int(held[0]),
            "images_per_s": s[1] / seconds, "seconds": seconds, "eval_seconds": time.time() - started - seconds,
            "started": started, "finished": time.time(), "pid": os.getpid(), "workers": world,
        }
        history.append(row)
        _report(row, history, model, opt, rank)
        if metrics is not None:
            metrics.record(row)
