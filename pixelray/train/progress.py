"""train-augment's progress: one line per finished epoch, as Ray Train reports it.

Ray Train calls a ``ray.train.UserCallback`` on its controller (an actor) after every
``ray.train.report``; the callback puts rank 0's epoch row into a queue actor, and a thread of the
driver prints it. Epochs an earlier invocation finished are not reported again: they are not news.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

__all__ = ["EpochLines"]


def _epochs_to_driver(queue):
    """A ``ray.train.UserCallback`` for Ray Train's controller: each epoch's row, as rank 0 reported it,
    into the driver's queue (defined here: ``ray.train`` is imported only where a fine-tune runs)."""
    from ray.train import UserCallback

    class EpochsToDriver(UserCallback):
        def __init__(self, queue):
            self.queue = queue

        def after_report(self, run_context, metrics, checkpoint):
            if metrics and metrics[0]:
                self.queue.put(metrics[0])

    return EpochsToDriver(queue)


class EpochLines:
    """Prints one line per finished epoch as Ray Train reports it: a ``ray.train.UserCallback`` on the
    controller hands rank 0's epoch row to this driver through a queue actor (epochs an earlier
    invocation finished are not reported again: they are not news)."""

    def __init__(self, name: str, epochs: int, change, say: Callable[[str], None]):
        from ray.util.queue import Queue

        self.name, self.epochs = name, epochs
        self.probe = f"n{change.count}" if change is not None else None
        self.say = say
        self.queue = Queue(actor_options={"num_cpus": 0})
        self.callback = _epochs_to_driver(self.queue)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="pixelray-train-progress", daemon=True)

    def __enter__(self) -> EpochLines:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        import ray
        from ray.util.queue import Empty

        self._stop.set()
        self._thread.join()
        try:
            while True:
                self.say(self.line(self.queue.get_nowait()))
        except Empty:
            pass
        ray.kill(self.queue.actor)

    def _watch(self) -> None:
        from ray.util.queue import Empty

        while not self._stop.is_set():
            try:
                row = self.queue.get(timeout=0.5)
            except Empty:
                continue
            self.say(self.line(row))

    def line(self, row: dict[str, Any]) -> str:
        aug = row.get("augmented_accuracy")
        wrong = row.get("heldout_wrong_rate")
        return (f"{self.name} epoch {row['epoch']}/{self.epochs}: loss {row['loss']:.4f}, train acc "
                f"{row['train_accuracy']:.1%}" + (f" (augmented {aug:.1%})" if aug is not None else "")
                + f", held-out acc {row['heldout_accuracy']:.1%}"
                + (f", wrong under {self.probe} {wrong:.1%}" if wrong is not None else "")
                + f", {row['images_per_s']:,.0f} img/s, {row['seconds']:.1f} s")
