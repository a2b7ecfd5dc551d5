"""Durable runs: checkpoints with TensorFlow's machinery, exact resume, Ctrl-C, event-file repair.

What a checkpoint holds (``tf.train.Checkpoint`` + ``tf.train.CheckpointManager`` in
``<run>/checkpoints``, the last ``train.keep_checkpoints`` kept):

* ``model`` and ``optimizer`` (weights, slots, ``iterations`` = the global step);
* ``metrics``: the Keras metric states (the running epoch means), so the epoch a run is resumed
  in reports the same epoch loss and accuracy as an uninterrupted run;
* ``tap_windows``: the diagnostics' in-step window accumulators, so a window cut by the interruption
  is written with the same values;
* ``data_position``: ``[epoch, batch in epoch, step]``. The batch order is a pure function of
  ``(seed, epoch)`` (:meth:`gradlab.data.Data.train_stream`), so the position is all the data
  state there is.

When checkpoints are taken: every ``train.checkpoint_every`` steps (a mid-epoch one at the end
of that batch, one that falls on an epoch boundary at the end of the epoch, after the epoch's
validation and TensorBoard scalars), at the end of training, and on Ctrl-C. Before each save
every TensorBoard writer is flushed, so everything logged before the checkpoint is on disk.

Resume (:func:`repair_events`): a run resumed from step ``c`` first removes, from every event
file of the run, what the interrupted process logged at or after ``c`` -- step-indexed tags
with ``step >= c``, epoch-indexed tags (Keras's ``epoch_*``) of epochs not completed at ``c`` --
and then logs those steps again. Every step therefore appears exactly once. Files are
rewritten atomically (temp file, fsync, rename), so a crash during the repair loses nothing.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import signal
import threading
from pathlib import Path
from typing import Any

import numpy as np

from gradlab.errors import RunDirError, RunInterrupted, StorageError
from gradlab.experiment import atomic_replace

log = logging.getLogger("gradlab.resume")

CHECKPOINT_DIR = "checkpoints"
STATE_FILE = "state.json"
EPOCH_TAG_PREFIX = "epoch_"
ITERATIONS_TAG_SUFFIX = "_vs_iterations"


def resume_command(run_dir: str | os.PathLike) -> str:
    return f"gradlab run --resume {shlex.quote(str(run_dir))}"


# ---------------------------------------------------------------------------------------------
# State file

def read_state(run_dir: Path) -> dict:
    try:
        return json.loads((run_dir / STATE_FILE).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as err:
        raise RunDirError(f"--resume {run_dir}: {STATE_FILE} is unreadable ({err})") from None


def check_resumable(run_dir: str | os.PathLike) -> Path:
    """The run directory to resume; raises :class:`RunDirError` if it cannot be resumed."""
    path = Path(run_dir)
    if not path.is_dir():
        raise RunDirError(f"--resume {path}: no such run directory")
    if not (path / "config.yaml").is_file():
        raise RunDirError(f"--resume {path}: no config.yaml, so this is not a gradlab run directory")
    state = read_state(path)
    if state.get("status") in ("completed", "stopped"):
        raise RunDirError(f"--resume {path}: the run already {state['status']} at step {state.get('step')}; "
                          "nothing to resume")
    return path


# ---------------------------------------------------------------------------------------------
# Event files

def _keep(tag: str, step: int, cut_step: int, cut_epoch: int) -> bool:
    if tag.startswith(EPOCH_TAG_PREFIX):  # Keras TensorBoard: step = epoch, written at the epoch's end
        return step < cut_epoch
    if tag.endswith(ITERATIONS_TAG_SUFFIX):  # Keras TensorBoard: step = iterations at the end of validation
        return step <= cut_step
    return step < cut_step


def repair_events(run_dir: str | os.PathLike, step: int, batches_per_epoch: int) -> int:
    """Drop what was logged at or after ``step`` from every event file under ``run_dir``.

    Returns the number of summary values removed. Truncated last records (a process killed
    mid-write) are dropped too.
    """
    import tensorflow as tf
    from tensorboard.compat.proto import event_pb2

    cut_epoch = step // max(1, batches_per_epoch)
    removed = 0
    for file in sorted(Path(run_dir).rglob("events.out.tfevents.*")):
        kept: list[bytes] = []
        changed = False
        try:
            for record in tf.data.TFRecordDataset(str(file)):
                raw = record.numpy()
                event = event_pb2.Event.FromString(raw)
                if event.HasField("summary"):
                    values = [v for v in event.summary.value if _keep(v.tag, event.step, step, cut_epoch)]
                    if len(values) != len(event.summary.value):
                        removed += len(event.summary.value) - len(values)
                        changed = True
                        if not values:
                            continue
                        del event.summary.value[:]
                        event.summary.value.extend(values)
                        raw = event.SerializeToString()
                kept.append(raw)
        except (tf.errors.DataLossError, tf.errors.OutOfRangeError):
            changed = True  # a torn last record: drop it
        if not changed:
            continue
        with atomic_replace(file) as tmp:
            with tf.io.TFRecordWriter(tmp) as writer:
                for raw in kept:
                    writer.write(raw)
    return removed


def flush_writers(callbacks) -> None:
    """Flush gradlab's shared summary writers and those of Keras TensorBoard callbacks."""
    from gradlab import summaries

    for cb in callbacks:  # gradlab diagnostics' queued scalars first
        flush_scalars = getattr(cb, "flush_scalars", None)
        if callable(flush_scalars):
            flush_scalars()
    with summaries._lock:
        writers = [entry[0] for entry in summaries._writers.values()]
    for cb in callbacks:
        writers.extend(getattr(cb, "_writers", {}).values())
    for w in writers:
        w.flush()


# ---------------------------------------------------------------------------------------------
# Checkpoints

def _tap_variables(model) -> list:
    return model.tap_variables() if hasattr(model, "tap_variables") else []


class Checkpointer:
    """Model, optimizer, metric states, tap windows and data position, via ``tf.train.Checkpoint``.

    Args:
        model: the compiled (and built) model.
        directory: where the ``CheckpointManager`` keeps its checkpoints (the chief's
            ``<run>/checkpoints``; a temporary directory on the other workers of a multi-worker run).
        keep: how many checkpoints to keep.
    """

    def __init__(self, model, directory: str | os.PathLike, keep: int):
        import tensorflow as tf

        self.model = model
        self.directory = Path(directory)
        self.keep = keep
        with model.distribute_strategy.scope():
            self.position = tf.Variable([0, 0, 0], dtype=tf.int64, trainable=False, name="data_position")
        self._ckpt = None
        self._manager = None
        self._taps: tuple = ()

    def _objects(self, with_taps: bool) -> dict:
        objs = dict(model=self.model, optimizer=self.model.optimizer,
                    metrics=list(self.model.metrics_variables), data_position=self.position)
        if with_taps:
            # "tap_windows": the shared window layout of this version (checkpoints of earlier
            # versions saved "taps"; their windows are not restored, the run goes on with fresh ones).
            objs["tap_windows"] = _tap_variables(self.model)
        return objs

    def manager(self):
        import tensorflow as tf

        taps = tuple(id(v) for v in _tap_variables(self.model))
        if self._manager is not None and taps != self._taps:  # taps came or went: track the live variables
            self._manager = None
        if self._manager is None:
            self._taps = taps
            self._ckpt = tf.train.Checkpoint(**self._objects(with_taps=True))
            self._manager = tf.train.CheckpointManager(self._ckpt, str(self.directory), max_to_keep=self.keep,
                                                       checkpoint_name="ckpt")
        return self._manager

    def latest(self, directory: str | os.PathLike | None = None) -> str | None:
        import tensorflow as tf

        return tf.train.latest_checkpoint(str(directory or self.directory))

    def restore(self, path: str) -> dict[str, Any]:
        """Restore everything but the tap windows; returns the position and metric values."""
        import tensorflow as tf

        tf.train.Checkpoint(**self._objects(with_taps=False)).restore(path).expect_partial()
        epoch, batch, step = (int(v) for v in self.position.numpy())
        return {"epoch": epoch, "batch": batch, "step": step,
                "metrics": [np.array(v.numpy()) for v in self.model.metrics_variables]}

    def restore_taps(self, path: str) -> None:
        import tensorflow as tf

        variables = _tap_variables(self.model)
        if not variables:
            return
        try:
            tf.train.Checkpoint(tap_windows=variables).restore(path).expect_partial()
        except (ValueError, tf.errors.InvalidArgumentError) as e:  # other diagnostics than when saved
            log.warning("resume: the diagnostics' windows were not restored (%s); they start empty",
                        str(e).splitlines()[0])
            return
        self.model.taps_restored()  # their due outputs were written by the interrupted run

    def save(self, step: int, batches_per_epoch: int) -> str:
        epoch, batch = divmod(step, batches_per_epoch)
        self.position.assign([epoch, batch, step])
        return self.manager().save(checkpoint_number=step)


def make_callback(**kwargs):
    """The Keras callback that checkpoints and finishes a resume (built here to import Keras lazily)."""
    import keras

    class _Resume(keras.callbacks.Callback):
        """Checkpoints on schedule, at the end and on Ctrl-C; finishes the restore of a resumed run."""

        def __init__(self, *, checkpointer: Checkpointer, batches_per_epoch: int, every: int, chief: bool,
                     run_dir: Path | None, restored: dict | None, restored_path: str | None,
                     callbacks: list, on_save=None):
            super().__init__()
            self.ckpt = checkpointer
            self.per_epoch = batches_per_epoch
            self.every = every
            self.chief = chief
            self.run_dir = run_dir
            self.restored = restored
            self.restored_path = restored_path
            self.others = callbacks
            self.on_save = on_save
            self.last_saved = restored["step"] if restored else -1
            self.interrupted = False
            self._previous_handler = None

        # -- helpers
        def step(self) -> int:
            return int(self.model.optimizer.iterations.numpy())

        def save(self, step: int) -> None:
            if step == self.last_saved:
                return
            try:
                flush_writers(self.others)
                path = self.ckpt.save(step, self.per_epoch)
            except (OSError, Exception) as err:  # tf.errors.OpError is not an OSError
                import tensorflow as tf

                if not isinstance(err, (OSError, tf.errors.OpError)):
                    raise
                where = self.run_dir if self.run_dir is not None else self.ckpt.directory
                prev = f"step {self.last_saved}" if self.last_saved >= 0 else "none yet"
                raise StorageError(
                    f"{self.ckpt.directory}: cannot write the checkpoint at step {step} "
                    f"({_reason(err)}); the last good checkpoint ({prev}) is intact -- free space, then "
                    f"{resume_command(where)}") from None
            self.last_saved = step
            if self.on_save is not None:
                self.on_save(step, path)

        def _due(self, step: int) -> bool:
            return self.every > 0 and step // self.every > max(self.last_saved, 0) // self.every

        # -- Keras hooks
        def on_train_begin(self, logs=None):
            self.interrupted = False
            if self.restored_path:
                self.ckpt.restore_taps(self.restored_path)
            if threading.current_thread() is threading.main_thread():
                self._previous_handler = signal.signal(signal.SIGINT, self._on_sigint)

        def _on_sigint(self, signum, frame):
            if self.interrupted:  # a second Ctrl-C: stop now (the last checkpoint stays valid)
                raise KeyboardInterrupt
            self.interrupted = True

        def on_epoch_begin(self, epoch, logs=None):
            it = getattr(self.model, "_gradlab_epoch_iterator", None)
            r = self.restored
            first_partial = r is not None and epoch == r["epoch"] and r["batch"] > 0
            if it is not None:
                it.steps_per_epoch = self.per_epoch - r["batch"] if first_partial else self.per_epoch
            if first_partial:  # Keras reset the metrics just before this hook: bring back the epoch so far
                for var, value in zip(self.model.metrics_variables, r["metrics"]):
                    var.assign(value)

        def on_train_batch_end(self, batch, logs=None):
            step = self.step()
            if self.interrupted and step % self.per_epoch:  # on an epoch boundary: after the epoch's end
                self._interrupt(step)
            if step % self.per_epoch and self._due(step):
                self.save(step)

        def on_epoch_end(self, epoch, logs=None):
            step = self.step()
            if self._due(step):
                self.save(step)
            if self.interrupted:
                self._interrupt(step)

        def _interrupt(self, step: int):
            self.save(step)
            self._restore_handler()
            where = self.run_dir if self.run_dir is not None else self.ckpt.directory
            raise RunInterrupted(f"gradlab: interrupted at step {step}; checkpoint saved in "
                                 f"{self.ckpt.directory}; resume with: {resume_command(where)}")

        def on_train_end(self, logs=None):
            self.save(self.step())
            self._restore_handler()

        def _restore_handler(self):
            if self._previous_handler is not None:
                signal.signal(signal.SIGINT, self._previous_handler)
                self._previous_handler = None

    return _Resume(**kwargs)


def _reason(err: BaseException) -> str:
    if isinstance(err, OSError):
        return err.strerror or str(err)
    msg = getattr(err, "message", None) or str(err)
    return msg.splitlines()[0][:200] if msg else type(err).__name__
