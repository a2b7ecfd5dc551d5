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
Records that belong to no step are kept whatever ``c`` is: the custom-scalars layout and the
HParams session start (its hyperparameters). The HParams session end and its ``final/*``
metrics, written into the run's root by ``gradlab sweep`` when an interrupted run ended, are
dropped: the run is no longer ended, and whatever finishes it writes a new end. What the
diagnostics write at the end of training (``health/verdicts``' final table) is labelled with
the last step, ``steps_total - 1``; a run resumed from its final checkpoint (interrupted after
training, e.g. in the final evaluation) writes it again, so that record is dropped too. The final
checkpoint is always taken after those end-of-training writes (and the tap windows they empty).

Checkpoints are tried newest first (:meth:`Checkpointer.restore_latest`): an unreadable one (a
missing or corrupt data or index file) is named in a one-line warning and the one before it is
tried; the events are then repaired to the step of the checkpoint actually restored. When none
is readable, nothing is modified and the resume fails with one line naming the directory.

One process at a time (:func:`lock_run_dir`): a run holds an exclusive ``flock`` on
``<run>/.gradlab.lock`` from the moment its directory exists (or its resume starts) until it
ends, so a second ``gradlab run --resume`` of the same directory -- or of a run that is still
training -- stops with ``RUN_DIR is in use by another gradlab process (pid N)`` (exit 2). The
operating system releases the lock when the process dies, so a run killed with ``kill -9``
(whose ``state.json`` still says ``running``) can be resumed. Where ``fcntl`` does not exist
(Windows) runs are not locked: do not resume a run directory twice at once there.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shlex
import signal
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np

from gradlab.errors import RunDirError, RunInterrupted, StorageError
from gradlab.experiment import atomic_replace

log = logging.getLogger("gradlab.resume")

CHECKPOINT_DIR = "checkpoints"
STATE_FILE = "state.json"
LOCK_FILE = ".gradlab.lock"
EPOCH_TAG_PREFIX = "epoch_"
ITERATIONS_TAG_SUFFIX = "_vs_iterations"
# Records that belong to no step: kept by the repair whatever the cut.
STEPLESS_TAGS = ("custom_scalars__config__",        # tensorboard.plugins.custom_scalar.metadata.CONFIG_SUMMARY_TAG
                 "_hparams_/session_start_info")    # tensorboard.plugins.hparams.metadata.SESSION_START_INFO_TAG
# How an ended run ended (gradlab.tb.write_session, in the run's root): stale once it is resumed.
SESSION_END_TAG = "_hparams_/session_end_info"
SESSION_METRIC_PREFIX = "final/"
# Written at the end of training, labelled with the last step (callbacks/health.py).
END_OF_TRAINING_TAGS = ("health/verdicts",)


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
    """The run directory to resume; raises :class:`RunDirError` if it cannot be resumed.

    A ``running`` status is accepted: it is what a killed process leaves. Whether another process
    is still running the directory is for :func:`lock_run_dir` to say (call this again once the
    lock is held: the other process may have finished in between).
    """
    path = Path(run_dir)
    if not path.is_dir():
        raise RunDirError(f"--resume {path}: no such run directory")
    if not (path / "config.yaml").is_file():
        raise RunDirError(f"--resume {path}: no config.yaml, so this is not a gradlab run directory")
    state = read_state(path)
    if state.get("status") in ("completed", "stopped"):
        step = state.get("step")
        if state["status"] == "stopped":  # the step of the NaN/Inf, as the stopped run reported it
            step = state.get("stopped_step", _stopped_step(path, step))
        raise RunDirError(f"--resume {path}: the run already {state['status']} at step {step}; "
                          "nothing to resume")
    return path


def _stopped_step(path: Path, default):
    """The step a NaN/Inf stopped the run at, from ``metrics.json`` (runs of earlier versions)."""
    try:
        stopped = json.loads((path / "metrics.json").read_text(encoding="utf-8")).get("stopped") or {}
        return int(stopped["step"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return default


# ---------------------------------------------------------------------------------------------
# One process per run directory

class RunLock:
    """An exclusive ``flock`` on ``<run>/.gradlab.lock``, held until :meth:`release` (see the
    module docstring). The file holds the owner's pid; it stays when the lock is released."""

    def __init__(self, run_dir: Path, fd: int | None):
        self.run_dir = run_dir
        self.path = run_dir / LOCK_FILE
        self._fd = fd

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            import fcntl

            fcntl.flock(fd, fcntl.LOCK_UN)
        except (ImportError, OSError):
            pass
        os.close(fd)  # closing alone releases it too

    def discard(self) -> None:
        """Release the lock and remove its file (a run directory given up before it held a run)."""
        try:
            self.path.unlink()
        except OSError:
            pass
        self.release()

    def __enter__(self) -> "RunLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def lock_run_dir(run_dir: str | os.PathLike) -> RunLock:
    """Lock ``run_dir`` for this process; :class:`RunDirError` if another process holds it.

    Without ``fcntl`` (Windows), or on a filesystem that cannot lock, the returned lock holds
    nothing (see the module docstring).
    """
    path = Path(run_dir)
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks here; documented
        return RunLock(path, None)
    lock_path = path / LOCK_FILE
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as err:
        raise RunDirError(f"{path}: cannot create {LOCK_FILE} ({err.strerror or err})") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise RunDirError(f"{path} is in use by another gradlab process{_lock_owner(lock_path)}") from None
    except OSError as err:  # e.g. ENOLCK: a filesystem without locks; go on unlocked
        os.close(fd)
        log.warning("%s: cannot lock the run directory (%s); make sure no other gradlab process uses it",
                    path, err.strerror or err)
        return RunLock(path, None)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
    except OSError:
        pass  # the pid is only for the other process's message
    return RunLock(path, fd)


def _lock_owner(lock_path: Path) -> str:
    try:
        pid = int(lock_path.read_text(encoding="utf-8").split()[0])
    except (OSError, ValueError, IndexError):
        return ""
    return f" (pid {pid})"


def interrupted_message(run_dir, step: int | None, saved: int | None, checkpoints) -> str:
    """The one line of a Ctrl-C: where the run stopped, which checkpoint it resumes from, how."""
    how = f"resume with: {resume_command(run_dir)}"
    at = f" at step {step}" if step is not None else ""
    if saved is None or saved < 0:
        return f"gradlab: interrupted{at}; no checkpoint yet, so the run resumes from step 0; {how}"
    if saved == step:
        return f"gradlab: interrupted{at}; checkpoint saved in {checkpoints}; {how}"
    return f"gradlab: interrupted{at}; the last checkpoint (step {saved}) is in {checkpoints}; {how}"


# ---------------------------------------------------------------------------------------------
# Event files

def _keep(tag: str, step: int, cut_step: int, cut_epoch: int, *, root: bool = False,
          end_cut: int | None = None) -> bool:
    if tag in STEPLESS_TAGS:  # the layout, the HParams session start: no step, nothing rewrites them
        return True
    if root and (tag == SESSION_END_TAG or tag.startswith(SESSION_METRIC_PREFIX)):
        return False  # how the run ended (gradlab sweep): it is no longer ended
    if end_cut is not None and tag in END_OF_TRAINING_TAGS and step >= end_cut:
        return False  # the end of training is written again by the resumed run
    if tag.startswith(EPOCH_TAG_PREFIX):  # Keras TensorBoard: step = epoch, written at the epoch's end
        return step < cut_epoch
    if tag.endswith(ITERATIONS_TAG_SUFFIX):  # Keras TensorBoard: step = iterations at the end of validation
        return step <= cut_step
    return step < cut_step


def repair_events(run_dir: str | os.PathLike, step: int, batches_per_epoch: int,
                  steps_total: int | None = None) -> int:
    """Drop what was logged at or after ``step`` from every event file under ``run_dir``.

    Returns the number of summary values removed. Truncated last records (a process killed
    mid-write) are dropped too. Step-less records (the custom-scalars layout, the HParams
    session start) are kept, the session end of an earlier ending is dropped; with
    ``steps_total`` (the run's last step + 1), resuming from the final checkpoint also drops the
    end-of-training records labelled ``steps_total - 1`` (see the module docstring).
    """
    import tensorflow as tf
    from tensorboard.compat.proto import event_pb2

    cut_epoch = step // max(1, batches_per_epoch)
    end_cut = max(steps_total - 1, 0) if steps_total is not None and step >= steps_total else None
    root_dir = Path(run_dir).resolve()
    removed = 0
    for file in sorted(Path(run_dir).rglob("events.out.tfevents.*")):
        root = file.parent.resolve() == root_dir
        kept: list[bytes] = []
        changed = False
        try:
            for record in tf.data.TFRecordDataset(str(file)):
                raw = record.numpy()
                event = event_pb2.Event.FromString(raw)
                if event.HasField("summary"):
                    values = [v for v in event.summary.value
                              if _keep(v.tag, event.step, step, cut_epoch, root=root, end_cut=end_cut)]
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


def has_layout(run_dir: str | os.PathLike) -> bool:
    """Whether an event file in the root of ``run_dir`` holds the custom-scalars layout."""
    import tensorflow as tf
    from tensorboard.compat.proto import event_pb2

    for file in Path(run_dir).glob("events.out.tfevents.*"):
        try:
            for record in tf.data.TFRecordDataset(str(file)):
                event = event_pb2.Event.FromString(record.numpy())
                if any(v.tag == STEPLESS_TAGS[0] for v in event.summary.value):
                    return True
        except (tf.errors.DataLossError, tf.errors.OutOfRangeError):  # a torn record: the rest is unread
            continue
    return False


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


def release_step_writers(callbacks) -> None:
    """Release the summary writers that diagnostics hold for their compiled step to write with
    (``StepWrite``): after a run, nothing may keep its event files open. The model is done
    training, so its taps stay as they are (see ``Diagnostic.release_tap_writer``)."""
    for cb in callbacks:
        release = getattr(cb, "release_tap_writer", None)
        if callable(release):
            release()


def release_writers(callbacks) -> None:
    """After a run ended by an exception (no ``on_train_end``): flush and release the summary
    writers its callbacks hold, as ``on_train_end`` would, without writing anything more.

    Otherwise their buffered events reach the disk whenever the process ends -- after a resume
    in the same process has repaired the files (written twice) or replaced them (lost) -- and
    the shared writers of gradlab's diagnostics stay open for the next run in that directory.
    """
    from gradlab import summaries

    for cb in callbacks:
        try:
            release = getattr(cb, "release_tap_writer", None)
            if callable(release):
                release()  # the writer its compiled step captured
            if getattr(cb, "_writer", None) is not None and getattr(cb, "log_dir", None) is not None:
                summaries.release_writer(cb.log_dir)  # flushes; closes with its last user
                cb._writer = None
            if hasattr(cb, "_in_fit"):
                cb._in_fit = False
            close = getattr(cb, "_close_writers", None)  # keras.callbacks.TensorBoard
            if callable(close) and isinstance(getattr(cb, "_writers", None), dict):
                close()
                cb._writers.clear()
        except Exception as err:  # never hide the error that ended the run
            log.debug("releasing the writers of %s failed: %s", type(cb).__name__, err)


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

    def candidates(self, directory: str | os.PathLike | None = None) -> list[str]:
        """Every checkpoint of ``directory``, newest (highest step) first: those the manager's
        index lists (even when their files are gone) and any ``ckpt-N.index`` on disk."""
        import tensorflow as tf

        d = Path(directory or self.directory)
        found: dict[str, None] = {}
        try:
            state = tf.train.get_checkpoint_state(str(d))
        except (ValueError, tf.errors.OpError):  # a damaged index: the files on disk still count
            state = None
        if state is not None:
            for prefix in [*state.all_model_checkpoint_paths, state.model_checkpoint_path]:
                found[os.path.normpath(prefix)] = None
        for index in d.glob("ckpt-*.index"):
            found[os.path.normpath(str(index)[:-len(".index")])] = None

        def number(prefix: str) -> int:
            m = re.search(r"-(\d+)$", prefix)
            return int(m.group(1)) if m else -1

        return sorted((p for p in found if number(p) >= 0), key=number, reverse=True)

    def restore_latest(self, directory: str | os.PathLike | None = None,
                       run_dir: str | os.PathLike | None = None) -> tuple[dict[str, Any] | None, str | None]:
        """Restore the newest readable checkpoint: ``(restore()'s result, its path)``, or
        ``(None, None)`` when there is no checkpoint at all.

        Each unreadable newer checkpoint is named in a one-line warning on stderr. One whose save
        was cut short (TensorFlow's ``ckpt-N_temp`` shard directory is still there) and that
        does not restore is skipped the same way, and does not count as unreadable. When there
        are checkpoints but none is readable, raises :class:`RunDirError` (one line naming the
        directory) before anything was written.
        """
        d = Path(directory or self.directory)
        failures: list[tuple[str, str]] = []
        for path in self.candidates(d):
            restored, why = _try_restore(self, path)
            if restored is None and Path(f"{path}_temp").is_dir():
                # TensorFlow writes the shards there, merges them, then removes it: a save that
                # was cut short (full disk, killed process). Not a damaged run: ignored.
                print(f"gradlab: warning: checkpoint {path} was never completed (its save was cut short); "
                      "ignored", file=sys.stderr, flush=True)
                continue
            if restored is None:
                failures.append((path, why))
                continue
            for bad, reason in failures:
                print(f"gradlab: warning: checkpoint {bad} is unreadable ({reason}); "
                      "resuming from an earlier one", file=sys.stderr, flush=True)
            return restored, path
        if failures:
            where = f"--resume {run_dir}: " if run_dir is not None else ""
            names = ", ".join(Path(p).name for p, _ in failures)
            raise NoReadableCheckpoint(f"{where}no readable checkpoint in {d} ({names}; "
                                       f"{Path(failures[0][0]).name}: {failures[0][1]}); nothing was changed")
        return None, None

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

    def discard_incomplete(self, step: int) -> None:
        """Remove what a failed :meth:`save` at ``step`` left (a torn ``ckpt-<step>.index``, data
        files, the ``ckpt-<step>_temp`` directory TensorFlow writes the shards into), so that a
        resume does not find it. Best effort: the disk may still be full or gone."""
        import shutil

        prefix = self.directory / f"ckpt-{step}"
        index = Path(f"{prefix}.index")
        if not Path(f"{prefix}_temp").is_dir() and index.is_file() and index.stat().st_size > 0:
            # Written whole (the manager's bookkeeping after it failed, e.g. deleting the oldest
            # checkpoint): a resume can use it.
            return
        shutil.rmtree(f"{prefix}_temp", ignore_errors=True)
        for leftover in self.directory.glob(f"ckpt-{step}.*"):
            try:
                leftover.unlink()
            except OSError:
                pass


class NoReadableCheckpoint(RunDirError):
    """A run directory has checkpoints and none of them can be read (exit status 2)."""


def _try_restore(checkpointer: "Checkpointer", path: str) -> tuple[dict[str, Any] | None, str | None]:
    """``(checkpointer.restore(path), None)``, or ``(None, why)`` when the checkpoint is unreadable
    (nothing restored then).

    TensorFlow's Python warnings are off meanwhile: a damaged checkpoint's failed restore logs
    several lines ("... deleted with unrestored values") that are not gradlab's one line.
    """
    import gc

    import tensorflow as tf

    logger = tf.get_logger()
    level = logger.level
    logger.setLevel("ERROR")
    try:
        try:
            # Read (and checksum) every tensor before restoring any: a restore reads only what it
            # restores, so a damaged tap window would otherwise fail later, in the middle of fit.
            reader = tf.train.load_checkpoint(path)
            for name in reader.get_variable_to_dtype_map():
                reader.get_tensor(name)
            return checkpointer.restore(path), None
        except Exception as err:  # a damaged checkpoint fails in many ways (OpError, IndexError, ...)
            why = _reason(err)
        gc.collect()  # the failed restore's objects (freed with the exception) warn when collected
        return None, why
    finally:
        logger.setLevel(level)


def make_callback(**kwargs):
    """The Keras callback that checkpoints and finishes a resume (built here to import Keras lazily)."""
    import keras

    class _Resume(keras.callbacks.Callback):
        """Checkpoints on schedule, at the end and on Ctrl-C; finishes the restore of a resumed run."""

        def __init__(self, *, checkpointer: Checkpointer, batches_per_epoch: int, every: int, chief: bool,
                     run_dir: Path | None, restored: dict | None, restored_path: str | None,
                     callbacks: list, on_save=None, steps_total: int | None = None):
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
            self.steps_total = steps_total
            self.last_saved = restored["step"] if restored else -1
            self.interrupted = False
            self._previous_handlers: dict = {}

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
                kept = (f"the last good checkpoint (step {self.last_saved}) is intact" if self.last_saved >= 0
                        else "no checkpoint was completed before (a resume starts from step 0)")
                self.ckpt.discard_incomplete(step)  # a torn checkpoint would block the resume
                raise StorageError(
                    f"{self.ckpt.directory}: cannot write the checkpoint at step {step} "
                    f"({_reason(err)}); {kept} -- free space, then "
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
            # Ctrl-C, and what a scheduler or a closed terminal sends (SIGTERM: timeout, docker
            # stop, Slurm, Kubernetes; SIGHUP): save a checkpoint at the next step and stop.
            self._previous_handlers = install_stop_handler(self._on_sigint)

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
            # The final checkpoint waits for on_train_end, after the diagnostics' end-of-training
            # writes (and the tap windows they empty): a resume from it repeats none of them.
            final = self.steps_total is not None and step >= self.steps_total
            if self._due(step) and not (final and not self.interrupted):
                self.save(step)
            if self.interrupted:
                self._interrupt(step)

        def _interrupt(self, step: int):
            self.save(step)
            self._restore_handler()
            where = self.run_dir if self.run_dir is not None else self.ckpt.directory
            raise RunInterrupted(interrupted_message(where, step, step, self.ckpt.directory))

        def on_train_end(self, logs=None):
            step = self.step()
            self.save(step)
            self._restore_handler()
            if self.interrupted:  # Ctrl-C while the diagnostics wrote their end of training
                self._interrupt(step)

        def _restore_handler(self):
            previous, self._previous_handlers = self._previous_handlers, {}
            restore_handlers(previous)

    return _Resume(**kwargs)


# The signals that stop a run the way Ctrl-C does (those this platform has).
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))


def install_stop_handler(handler, signals=STOP_SIGNALS) -> dict:
    """Set ``handler`` for each of ``signals`` that is not ignored, and return the previous
    handlers (for :func:`restore_handlers`). A signal whose handler is ``SIG_IGN`` keeps it: the
    caller's choice (``nohup`` ignores SIGHUP so that a run outlives the terminal; a shell
    starts background jobs with SIGINT ignored). Nothing is changed outside the main thread."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    previous = {}
    for signum in signals:
        if signal.getsignal(signum) is not signal.SIG_IGN:
            previous[signum] = signal.signal(signum, handler)
    return previous


def restore_handlers(previous: dict) -> None:
    """Put back the handlers :func:`install_stop_handler` returned (one installed from C, which
    Python reports as None and cannot reinstall, becomes the default action)."""
    for signum, handler in previous.items():
        signal.signal(signum, signal.SIG_DFL if handler is None else handler)


def stop_signals_interrupt() -> dict:
    """Make SIGTERM and SIGHUP (``kill``, ``timeout``, a scheduler, a closed terminal) raise
    ``KeyboardInterrupt``, as Ctrl-C does, so that what is running is recorded as interrupted
    rather than killed with nothing written. (During ``fit`` a run's checkpointing callback
    replaces this with its own handler, which saves a checkpoint at the next step.) Returns the
    previous handlers, for :func:`restore_handlers`."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt

    return install_stop_handler(interrupt, [s for s in STOP_SIGNALS if s != signal.SIGINT])


def _reason(err: BaseException) -> str:
    if isinstance(err, OSError):
        return err.strerror or str(err)
    msg = getattr(err, "message", None) or str(err)
    msg = re.sub(r"^\s*\{\{function_node [^}]*\}\}\s*", "", msg)  # TensorFlow's op-function preamble
    lines = [line.strip() for line in msg.splitlines() if line.strip()]
    return lines[0][:200] if lines else type(err).__name__
