"""Experiment assembly: config -> data, model, loss, callbacks -> ``fit`` -> run directory.

Order matters and is the contract:

1. the config is validated completely (``load_config``), before any TensorFlow work;
2. the device is resolved and the data loaded and checked -- still no run directory;
3. only then is the run directory created; it never overwrites an existing run;
4. training runs; whatever happens after this point (NaN stop, Ctrl-C, an error) the run
   directory keeps ``config.yaml`` and gets a ``metrics.json`` saying how the run ended.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import json
import math
import os
import secrets
import shlex
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Mapping


from gradlab.config import Experiment, check_execution_fits_epoch, dump_yaml, load_config, round_to_execution
from gradlab.errors import DeviceError, NonFiniteError, RunDirError, RunInterrupted, StorageError

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.json"
WEIGHTS_FILE = "final.weights.h5"


@dataclasses.dataclass(frozen=True)
class RunResult:
    """What :func:`run` returns: the run directory and the final metrics (as in ``metrics.json``)."""

    run_dir: Path
    metrics: dict[str, Any]


# ---------------------------------------------------------------------------------------------
# Files

@contextlib.contextmanager
def atomic_replace(path: str | os.PathLike):
    """Yield a temp path beside ``path``; on success fsync it and rename it over ``path``.

    Whatever writes the temp file (text, a TFRecord writer), a crash leaves either the old file
    or the new one, never a half-written one; on error the temp file is removed.
    """
    path = Path(path)
    while True:  # like tempfile.mkstemp, but with the umask's mode (mkstemp's files are 0600)
        tmp = str(path.parent / f".{path.name}.{secrets.token_hex(6)}")
        try:
            os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
            break
        except FileExistsError:
            continue
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_replace`)."""
    with atomic_replace(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)


def _json_default(obj):
    try:
        import numpy as np

        if isinstance(obj, np.generic):
            return obj.item()
        if isinstance(obj, np.ndarray):
            return obj.tolist()
    except ImportError:  # pragma: no cover
        pass
    return str(obj)


def _finite_or_null(obj):
    """``obj`` with every NaN/Inf number replaced by ``None``: JSON has no NaN, and files such as
    ``metrics.json`` must parse with any JSON reader (a diverged run's loss is ``null``)."""
    if isinstance(obj, dict):
        return {k: _finite_or_null(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite_or_null(v) for v in obj]
    if hasattr(obj, "tolist") and type(obj).__module__ == "numpy":  # numpy scalars and arrays
        return _finite_or_null(obj.tolist())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def write_json(path: str | os.PathLike, data: Any) -> None:
    text = json.dumps(_finite_or_null(data), indent=2, sort_keys=True, default=_json_default, allow_nan=False)
    atomic_write_text(path, text + "\n")


def new_directory(explicit: str | os.PathLike | None, *, option: str, log_dir: str, prefix: str,
                  what: str = "run") -> Path:
    """Create a fresh directory and return it; never reuse one that holds anything.

    ``explicit`` (from ``option``, e.g. ``--run-dir``) must be absent or empty; otherwise
    ``log_dir/<prefix>-<YYYYmmdd-HHMMSS>[-N]`` is created, ``N`` counting up on a clash.
    Raises :class:`RunDirError` with one line naming the option or ``log_dir``.
    """
    if explicit is not None:
        path = Path(explicit)
        if path.exists() and not path.is_dir():
            raise RunDirError(f"{option} {path}: is a file, not a directory (choose a new directory)")
        if path.exists() and any(path.iterdir()):
            raise RunDirError(f"{option} {path}: already exists and is not empty; gradlab never overwrites a {what} "
                              f"(choose a new directory{', or --resume it' if what == 'run' else ''})")
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise RunDirError(f"{option} {path}: cannot create it ({err.strerror or err})") from None
        return path
    base = Path(log_dir)
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    if base.exists() and not base.is_dir():
        raise RunDirError(f"log_dir: {str(base)!r} is a file, not a directory")
    try:
        base.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise RunDirError(f"log_dir: cannot create {str(base)!r} ({err.strerror or err})") from None
    for n in range(1000):
        path = base / (f"{prefix}-{stamp}" + (f"-{n}" if n else ""))
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
        except OSError as err:
            raise RunDirError(f"log_dir: cannot create a {what} directory in {str(base)!r} "
                              f"({err.strerror or err})") from None
    raise RunDirError(f"log_dir: too many {what}s named {prefix}-{stamp} in {base}")


def make_run_dir(exp: Experiment, run_dir: str | os.PathLike | None = None) -> Path:
    """Create the run directory: ``run_dir`` if given (absent or empty), else ``log_dir/<name>-<time>``."""
    return new_directory(run_dir, option="--run-dir", log_dir=exp.log_dir, prefix=exp.name)


# ---------------------------------------------------------------------------------------------
# Device, precision, determinism

def configure_device(train) -> str:
    """Resolve ``train.device`` (auto | cpu | gpu) to ``"cpu"`` or ``"gpu"``; must run before TF starts.

    ``train.cpu_devices = N`` splits the CPU into N logical devices (for ``mirrored`` on a CPU).
    Raises :class:`DeviceError` when a GPU is asked for and none is visible.
    """
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if train.device == "gpu" and not gpus:
        raise DeviceError("train.device: 'gpu' was requested but TensorFlow sees no GPU "
                          "(install gradlab[gpu] on a machine with CUDA and check that CUDA_VISIBLE_DEVICES is not empty, "
                          "or use device: auto | cpu)")
    resolved = "gpu" if gpus and train.device in ("auto", "gpu") else "cpu"
    try:
        if gpus:  # (all of them for a GPU run: the default, set so that a started TensorFlow is noticed)
            tf.config.set_visible_devices([] if resolved == "cpu" else gpus, "GPU")
        if train.cpu_devices > 1:
            cpu = tf.config.list_physical_devices("CPU")[0]
            tf.config.set_logical_device_configuration(
                cpu, [tf.config.LogicalDeviceConfiguration() for _ in range(train.cpu_devices)])
    except RuntimeError:
        # TensorFlow is already initialised in this process (a second run in one Python session).
        if train.cpu_devices > 1 and len(tf.config.list_logical_devices("CPU")) != train.cpu_devices:
            raise DeviceError(f"train.cpu_devices: {train.cpu_devices} logical CPUs cannot be set up after "
                              "TensorFlow has started in this process; run in a new process") from None
        # The visible GPUs can no longer change either: a run must not report a device it is not on.
        visible = bool(tf.config.list_logical_devices("GPU"))
        if visible != (resolved == "gpu"):
            raise DeviceError(f"train.device: {train.device!r} means {resolved} here, but TensorFlow has already "
                              f"started in this process with {'a GPU' if visible else 'no GPU'} visible; run in a "
                              "new process") from None
    for gpu in gpus if resolved == "gpu" else []:
        try:
            tf.config.experimental.set_memory_growth(gpu, True)
        except (RuntimeError, ValueError):
            pass
    return resolved


def set_determinism(seed: int, device: str, jit_compile: bool = False) -> None:
    """Seed Python, NumPy and TF; on CPU also make TF's ops deterministic (bit-identical reruns).

    Keras refuses XLA while op determinism is on, so a ``jit_compile`` run keeps the seeds but
    not op determinism (XLA on CPU is deterministic in practice, but not guaranteed).
    """
    import keras
    import tensorflow as tf
    from tensorflow.python.framework import config as tf_config

    keras.utils.set_random_seed(seed)
    if device == "cpu" and not jit_compile:
        tf.config.experimental.enable_op_determinism()
    elif tf_config.is_op_determinism_enabled():
        tf_config.disable_op_determinism()


def make_optimizer(train):
    """The Keras optimizer for the ``train`` section (``clip_norm`` clips the global norm)."""
    import keras

    kwargs: dict[str, Any] = {"learning_rate": train.learning_rate}
    if train.clip_norm is not None:
        kwargs["global_clipnorm"] = train.clip_norm
    name = train.optimizer
    if name == "sgd":
        return keras.optimizers.SGD(**kwargs)
    if name == "momentum":
        return keras.optimizers.SGD(momentum=train.momentum, **kwargs)
    return {"adam": keras.optimizers.Adam, "adamw": keras.optimizers.AdamW,
            "rmsprop": keras.optimizers.RMSprop, "adagrad": keras.optimizers.Adagrad}[name](**kwargs)


# ---------------------------------------------------------------------------------------------
# The run

def build(exp: Experiment, data, device: str):
    """Build and compile the model for ``exp`` (the global dtype policy must already be set)."""
    import keras

    from gradlab.losses import make_loss
    from gradlab.models import build_model

    model = build_model(exp.model, features=data.features, classes=data.classes, seed=exp.seed)
    model.compile(optimizer=make_optimizer(exp.train), loss=make_loss(exp.train.loss, exp.train.reduction),
                  metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
                  jit_compile=exp.train.jit_compile, steps_per_execution=exp.train.steps_per_execution)
    model.gradlab_probe_batch = data.probe_batch()
    return model


def _final_metrics(model, data) -> dict[str, Any]:
    out: dict[str, Any] = {}
    train = model.evaluate(data.eval_train, verbose=0, return_dict=True)
    out["train"] = {k: float(v) for k, v in train.items()}
    out["loss"], out["accuracy"] = out["train"]["loss"], out["train"]["accuracy"]
    if data.eval_validation is not None:
        val = model.evaluate(data.eval_validation, verbose=0, return_dict=True)
        out["validation"] = {k: float(v) for k, v in val.items()}
        out["val_loss"], out["val_accuracy"] = out["validation"]["loss"], out["validation"]["accuracy"]
    return out


def _save_weights_atomic(model, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp.weights.h5")
    model.save_weights(str(tmp))
    os.replace(tmp, path)


def _storage_error(path, err: BaseException, what: str, run_dir) -> StorageError:
    from gradlab.resume import _reason, resume_command

    return StorageError(f"{path}: cannot write {what} ({_reason(err)}); checkpoints are intact -- free space, then "
                        f"{resume_command(run_dir)}")


def run(config: str | os.PathLike | Mapping[str, Any] | Experiment | None = None,
        overrides: list[str] | tuple[str, ...] = (), *, run_dir: str | os.PathLike | None = None,
        resume: str | os.PathLike | None = None, verbose: int | str = "auto", quiet: bool = False) -> RunResult:
    """Run one experiment (or resume an interrupted one) and return its run directory and final metrics.

    Args:
        config: a YAML path, a mapping, or an :class:`Experiment` (omit it with ``resume``).
        overrides: ``key.path=value`` strings, typed by the schema.
        run_dir: use this directory (absent or empty) instead of ``log_dir/<name>-<time>``.
        resume: continue the run in this directory from its last checkpoint, with the
            configuration saved there (``config.yaml``); see :mod:`gradlab.resume`.
        verbose: Keras ``fit`` verbosity.
        quiet: print nothing (no verdict table, no TensorBoard hint).

    Raises:
        ConfigError, DataError, DeviceError, RunDirError: before any run directory exists.
        NonFiniteError: training hit NaN/Inf with ``nonfinite`` action ``stop``; the run
            directory is complete (weights, ``metrics.json`` with ``"stopped"``).
        RunInterrupted: Ctrl-C; a checkpoint was saved (also a ``KeyboardInterrupt``).
        RunDirError: also when another process runs (or resumes) the same run directory: a run
            holds a lock on its directory until it ends (:func:`gradlab.resume.lock_run_dir`).
        StorageError: the disk filled or a write failed mid-run; the last checkpoint is intact.
        WorkerLostError: a worker of a multi-worker run died; the last checkpoint is intact.
    """
    with contextlib.ExitStack() as held:  # the run directory's lock, until the run has ended
        return _run(config, overrides, run_dir=run_dir, resume=resume, verbose=verbose, quiet=quiet, held=held)


def _owns_run_dir(exp: Experiment) -> bool:
    """Whether this process writes the run directory: the chief of a multi-worker run (worker 0,
    known from ``TF_CONFIG`` before TensorFlow starts), or the only process."""
    from gradlab import distribute

    return exp.train.distribute != "multi_worker" or distribute.task_index() == 0


def _run(config, overrides, *, run_dir, resume, verbose, quiet, held: contextlib.ExitStack) -> RunResult:
    from gradlab import resume as resume_mod

    if resume is not None:
        if config is not None or overrides or run_dir is not None:
            raise RunDirError("--resume takes the run directory only: the run's own config.yaml is used "
                              "(no config file, overrides or --run-dir)")
        resume_dir = resume_mod.check_resumable(resume)
        exp = load_config(resume_dir / CONFIG_FILE)
        if _owns_run_dir(exp):
            held.enter_context(resume_mod.lock_run_dir(resume_dir))
            resume_mod.check_resumable(resume_dir)  # the process that held the lock may have finished the run
    else:
        if config is None:
            raise RunDirError("run: give a config (or resume=RUN_DIR)")
        exp = config if isinstance(config, Experiment) else load_config(config, overrides)
        resume_dir = None
        if exp.data.path is not None and not os.path.isabs(exp.data.path):
            # Saved absolute in the run's config.yaml, so --resume works from any directory.
            exp = dataclasses.replace(exp, data=dataclasses.replace(exp.data, path=os.path.abspath(exp.data.path)))
        if exp.sweep:
            print("gradlab run: this config has a sweep: section; it trains the base config only "
                  "(gradlab sweep runs the grid)", file=sys.stderr)
    import keras

    from gradlab import distribute, plugins
    from gradlab.callbacks import StepMetrics, observations_for
    from gradlab.data import make_data

    device = configure_device(exp.train)
    strategy = distribute.make_strategy(exp.train)  # before any other TF work (MultiWorkerMirroredStrategy)
    chief = distribute.is_chief(strategy)
    data = make_data(exp.data, exp.seed)
    check_execution_fits_epoch(exp, data.batches_per_epoch)
    work_dir = None  # where a non-chief worker keeps its throw-away checkpoints
    if resume_dir is not None:
        path = resume_dir
    elif chief:
        existed = run_dir is not None and Path(run_dir).exists()
        path = make_run_dir(exp, run_dir)
        lock = held.enter_context(resume_mod.lock_run_dir(path))  # before anything is written
        try:
            write_json_config(path, exp)
        except OSError as err:
            lock.discard()  # leave the directory as it was: absent or empty
            raise RunDirError(f"{path}: cannot write {CONFIG_FILE} ({err.strerror or err})") from None
        except KeyboardInterrupt:  # Ctrl-C before the run existed: leave no empty run directory behind
            if not (path / CONFIG_FILE).exists():
                lock.discard()
                if not existed:
                    shutil.rmtree(path, ignore_errors=True)
            raise
    else:
        path = Path(run_dir) if run_dir is not None else None
    if not chief:
        work_dir = Path(tempfile.mkdtemp(prefix="gradlab-worker-"))
    set_determinism(exp.seed, device, exp.train.jit_compile)
    previous_policy = keras.config.dtype_policy()
    keras.config.set_dtype_policy(exp.train.precision)
    status: dict[str, Any] = {"status": "running"}
    per_epoch = data.batches_per_epoch
    ckpt_dir = (path / resume_mod.CHECKPOINT_DIR) if chief else (work_dir / resume_mod.CHECKPOINT_DIR)

    def write_state(**fields):
        if chief:
            state = {"status": "running", "batches_per_epoch": per_epoch, "epochs": exp.train.epochs,
                     "steps_total": per_epoch * exp.train.epochs, "resume": resume_mod.resume_command(path)}
            state.update(resume_mod.read_state(path) if (path / resume_mod.STATE_FILE).exists() else {})
            state.update(fields)
            write_json(path / resume_mod.STATE_FILE, state)

    stopped: list = []
    fit_started = False
    model = resume_cb = None
    callbacks: list = []
    try:
        with strategy.scope():
            model = build(exp, data, device)
        checkpointer = resume_mod.Checkpointer(model, ckpt_dir, exp.train.keep_checkpoints)
        restored = restored_path = None
        if resume_dir is not None:
            with strategy.scope():
                x0, y0 = data.probe_batch(2)
                model._symbolic_build(data_batch=(x0, y0))  # optimizer and metric variables, to restore into
            # the newest readable checkpoint (an unreadable one is named, and skipped)
            restored, restored_path = checkpointer.restore_latest(path / resume_mod.CHECKPOINT_DIR, run_dir=path)
            start = restored["step"] if restored else 0
            if chief:
                resume_mod.repair_events(path, start, per_epoch, steps_total=per_epoch * exp.train.epochs)
                if not resume_mod.has_layout(path):  # killed before it was written (or torn)
                    from gradlab.tb import write_model_layout

                    write_model_layout(path, model)
        else:
            start = 0
            if chief:
                from gradlab.tb import write_model_layout

                write_model_layout(path, model)  # custom-scalars layout: each layer's charts grouped (gradlab.tb)
        if chief:
            write_state(status="running", step=start)
        log_dir = str(path / "train") if chief else None
        diagnostics, user_callbacks = plugins.build_callbacks(exp, log_dir)
        if restored and chief:
            obs = observations_for(model)  # what Health & co. saw before the interruption
            from gradlab.events import read_scalars

            for tag, points in read_scalars(path, "train").items():
                for step, value in points:
                    obs.add(tag, step, value)
        # Every run logs the step loss (train.log_every); a step_metrics entry in `diagnostics`
        # takes its place rather than writing the same tags twice.
        own = any(isinstance(d, StepMetrics) for d in diagnostics)
        callbacks = [] if own else [StepMetrics(log_dir=log_dir, every=round_to_execution(
            exp.train.log_every, exp.train.steps_per_execution))]
        callbacks += diagnostics
        if chief:
            callbacks.append(keras.callbacks.TensorBoard(log_dir=str(path), update_freq="epoch", write_graph=False))
        callbacks += user_callbacks
        resume_cb = resume_mod.make_callback(
            checkpointer=checkpointer, batches_per_epoch=per_epoch, every=exp.train.checkpoint_every,
            chief=chief, run_dir=path if chief else None, restored=restored, restored_path=restored_path,
            callbacks=list(callbacks), steps_total=per_epoch * exp.train.epochs,
            on_save=(lambda step, ckpt: write_state(step=step, checkpoint=ckpt)) if chief else None)
        callbacks.append(resume_cb)
        if verbose == "auto":
            verbose = 0 if quiet else (1 if sys.stdout.isatty() else 2)
        model._gradlab_capture_iterator = True
        fit_started = True  # from here on, Ctrl-C is the checkpointing callback's to handle
        try:
            model.fit(data.train_stream(exp.train.epochs, start), validation_data=data.validation,
                                epochs=exp.train.epochs, initial_epoch=start // per_epoch, steps_per_epoch=per_epoch,
                                callbacks=callbacks, verbose=verbose, shuffle=False)
        except Exception as err:
            distribute.raise_if_worker_lost(err, strategy, path if chief else path or work_dir,
                                            int(model.optimizer.iterations.numpy()) if chief else None)
            plugins.raise_if_user_code(err, exp, diagnostics, user_callbacks)
            raise
        resume_mod.release_step_writers(callbacks)  # the run's training is over: their event files close
        metrics = _final_metrics(model, data)
        metrics["steps"] = int(model.optimizer.iterations.numpy())
        # Whole epochs of steps trained: Keras also logs an epoch that a stop (NaN guard) cut short.
        metrics["epochs_completed"] = min(exp.train.epochs, metrics["steps"] // per_epoch)
        metrics["device"] = device
        metrics["replicas"] = int(strategy.num_replicas_in_sync)
        if restored:
            metrics["resumed_from_step"] = restored["step"]
        obs = observations_for(model)
        verdicts = [v for d in diagnostics for v in getattr(d, "verdicts", lambda: [])()]
        metrics["verdicts"] = verdicts
        stopped = [e for e in obs.events if e.get("kind") == "nonfinite_stop"]
        if stopped:
            metrics["stopped"] = stopped[0]
        metrics["status"] = "stopped" if stopped else "completed"
        metrics["weights_sha256"] = weights_digest(model)
        if chief:
            try:
                _save_weights_atomic(model, path / WEIGHTS_FILE)
                write_json(path / METRICS_FILE, metrics)
                # a stopped run is reported at the step of its NaN/Inf (as NonFiniteError says)
                write_state(status=metrics["status"], step=metrics["steps"],
                            **({"stopped_step": int(stopped[0]["step"])} if stopped else {}))
            except OSError as err:
                raise _storage_error(path, err, "the final weights and metrics", path) from None
        elif not quiet:
            print(f"gradlab: worker {distribute.task_index()} finished at step {metrics['steps']}, "
                  f"final weights sha256 {metrics['weights_sha256']}")
    except BaseException as err:
        if isinstance(err, resume_mod.NoReadableCheckpoint):
            raise  # found before anything was changed: the run directory stays as it was
        if resume_cb is not None:
            resume_cb._restore_handler()  # Ctrl-C must work again in this process
        resume_mod.release_writers(callbacks)  # their events on disk now, not at the process's exit
        kind = "interrupted" if isinstance(err, KeyboardInterrupt) else "failed"
        status = {"status": kind, "error": f"{type(err).__name__}: {err}".splitlines()[0]}
        if chief and path is not None and path.exists():
            try:
                current = json.loads((path / METRICS_FILE).read_text()) if (path / METRICS_FILE).exists() else {}
                if current.get("status") not in ("completed", "stopped"):
                    write_json(path / METRICS_FILE, status)
                write_state(status=kind, error=status["error"])
            except (OSError, ValueError):
                pass  # the disk may be what failed; the checkpoint and config are what resume needs
            if isinstance(err, KeyboardInterrupt) and not isinstance(err, RunInterrupted) and not fit_started:
                # Ctrl-C before training (and its checkpointing) began: still a resumable run.
                raise RunInterrupted("gradlab: interrupted before training started; resume with: "
                                     f"{resume_mod.resume_command(path)}") from None
            if isinstance(err, KeyboardInterrupt) and not isinstance(err, RunInterrupted):
                # Ctrl-C outside the checkpointing callback's reach (the final evaluation, a second
                # Ctrl-C): the run resumes from its last checkpoint, and the message says so.
                raise RunInterrupted(resume_mod.interrupted_message(
                    path, _step_or_none(model), resume_cb.last_saved if resume_cb is not None else None,
                    ckpt_dir)) from None
        raise
    finally:
        keras.config.set_dtype_policy(previous_policy)
        if work_dir is not None:
            shutil.rmtree(work_dir, ignore_errors=True)
    if not quiet and chief:
        print_summary(path, metrics, judged=health_checked(exp.to_dict()))
    if stopped:
        raise NonFiniteError(stopped[0]["message"] + f" (run directory: {path})")
    return RunResult(run_dir=path, metrics=metrics)


def _step_or_none(model) -> int | None:
    """The model's global step, or None (no model yet, or no readable step)."""
    try:
        return int(model.optimizer.iterations.numpy())
    except Exception:
        return None


def weights_digest(model) -> str:
    """sha256 of the model's weights (float bytes, in order): equal digests = bit-identical weights."""
    import hashlib

    import numpy as np

    h = hashlib.sha256()
    for w in model.get_weights():
        h.update(np.ascontiguousarray(w).tobytes())
    return h.hexdigest()


def write_json_config(path: Path, exp: Experiment) -> None:
    atomic_write_text(path / CONFIG_FILE, dump_yaml(exp.to_dict(), sort_keys=False))


def health_checked(config: Mapping[str, Any] | None) -> bool:
    """Whether a run with this (resolved) config ran the ``health`` diagnostic, which makes verdicts.

    ``diagnostics`` absent or null means the default set, which includes ``health``.
    """
    diagnostics = (config or {}).get("diagnostics")
    if diagnostics is None:
        return True
    return any((d.get("type") if isinstance(d, Mapping) else d) == "health" for d in diagnostics)


def print_summary(path: Path, metrics: dict, judged: bool = True) -> None:
    """Print the verdict table, the final metrics, where the logs are and how to view them.
    Without the ``health`` diagnostic nothing was judged, and the table says so."""
    verdicts = metrics.get("verdicts") or []
    print()
    if not judged and not verdicts:
        print("Health verdicts: not checked (no health diagnostic in this run's diagnostics)")
    elif verdicts:
        print("Health verdicts:")
        width = max(len(v["layer"]) for v in verdicts)
        for v in verdicts:
            print(f"  {v['layer']:<{width}}  {v['verdict']:<10} {v['message']}")
    else:
        print("Health verdicts: none (no layer vanished, exploded, died or saturated)")
    line = f"final train loss {metrics['loss']:.4f}, accuracy {metrics['accuracy']:.3f}"
    if "val_loss" in metrics:
        line += f"; validation loss {metrics['val_loss']:.4f}, accuracy {metrics['val_accuracy']:.3f}"
    print(line)
    print(f"run directory: {path}")
    print(f"view it: tensorboard --logdir {shlex.quote(str(path))}")
