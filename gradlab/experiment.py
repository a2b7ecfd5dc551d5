"""Experiment assembly: config -> data, model, loss, callbacks -> ``fit`` -> run directory.

Order matters and is the contract:

1. the config is validated completely (``load_config``), before any TensorFlow work;
2. the device is resolved and the data loaded and checked -- still no run directory;
3. only then is the run directory created; it never overwrites an existing run;
4. training runs; whatever happens after this point (NaN stop, Ctrl-C, an error) the run
   directory keeps ``config.yaml`` and gets a ``metrics.json`` saying how the run ended.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Mapping

import yaml

from gradlab.config import Experiment, load_config
from gradlab.errors import DeviceError, GradlabError, NonFiniteError, RunDirError

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

def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically: a temp file in the same directory, fsync, rename."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


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


def write_json(path: str | os.PathLike, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True, default=_json_default) + "\n")


def make_run_dir(exp: Experiment, run_dir: str | os.PathLike | None = None) -> Path:
    """Create the run directory: ``run_dir`` if given (absent or empty), else ``log_dir/<name>-<time>``."""
    if run_dir is not None:
        path = Path(run_dir)
        if path.exists() and (not path.is_dir() or any(path.iterdir())):
            raise RunDirError(f"--run-dir {path}: already exists and is not empty; gradlab never overwrites a run "
                              "(choose a new directory, or --resume it)")
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise RunDirError(f"--run-dir {path}: cannot create it ({err.strerror or err})") from None
        return path
    base = Path(exp.log_dir)
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    try:
        base.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise RunDirError(f"log_dir: cannot create {str(base)!r} ({err.strerror or err})") from None
    for n in range(1000):
        path = base / (f"{exp.name}-{stamp}" + (f"-{n}" if n else ""))
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
        except OSError as err:
            raise RunDirError(f"log_dir: cannot create a run directory in {str(base)!r} ({err.strerror or err})") from None
    raise RunDirError(f"log_dir: too many runs named {exp.name}-{stamp} in {base}")


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
                          "(install gradlab[gpu] on a machine with CUDA, or use device: auto | cpu)")
    resolved = "gpu" if gpus and train.device in ("auto", "gpu") else "cpu"
    try:
        if resolved == "cpu" and gpus:
            tf.config.set_visible_devices([], "GPU")
        if train.cpu_devices > 1:
            cpu = tf.config.list_physical_devices("CPU")[0]
            tf.config.set_logical_device_configuration(
                cpu, [tf.config.LogicalDeviceConfiguration() for _ in range(train.cpu_devices)])
    except RuntimeError:
        # TensorFlow is already initialised in this process (a second run in one Python session).
        if train.cpu_devices > 1 and len(tf.config.list_logical_devices("CPU")) != train.cpu_devices:
            raise DeviceError(f"train.cpu_devices: {train.cpu_devices} logical CPUs cannot be set up after "
                              "TensorFlow has started in this process; run in a new process") from None
    for gpu in gpus if resolved == "gpu" else []:
        try:
            tf.config.experimental.set_memory_growth(gpu, True)
        except (RuntimeError, ValueError):
            pass
    return resolved


def set_determinism(seed: int, device: str) -> None:
    """Seed Python, NumPy and TF; on CPU also make TF's ops deterministic (bit-identical reruns)."""
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(seed)
    if device == "cpu":
        tf.config.experimental.enable_op_determinism()


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
    train = model.evaluate(data.x_train, data.y_train, batch_size=1024, verbose=0, return_dict=True)
    out["train"] = {k: float(v) for k, v in train.items()}
    out["loss"], out["accuracy"] = out["train"]["loss"], out["train"]["accuracy"]
    if data.x_val is not None:
        val = model.evaluate(data.x_val, data.y_val, batch_size=1024, verbose=0, return_dict=True)
        out["validation"] = {k: float(v) for k, v in val.items()}
        out["val_loss"], out["val_accuracy"] = out["validation"]["loss"], out["validation"]["accuracy"]
    return out


def run(config: str | os.PathLike | Mapping[str, Any] | Experiment, overrides: list[str] | tuple[str, ...] = (),
        *, run_dir: str | os.PathLike | None = None, verbose: int | str = "auto", quiet: bool = False) -> RunResult:
    """Run one experiment and return its run directory and final metrics.

    Args:
        config: a YAML path, a mapping, or an :class:`Experiment`.
        overrides: ``key.path=value`` strings, typed by the schema.
        run_dir: use this directory (absent or empty) instead of ``log_dir/<name>-<time>``.
        verbose: Keras ``fit`` verbosity.
        quiet: print nothing (no verdict table, no TensorBoard hint).

    Raises:
        ConfigError, DataError, DeviceError, RunDirError: before any run directory exists.
        NonFiniteError: training hit NaN/Inf with ``nonfinite`` action ``stop``; the run
            directory is complete (weights, ``metrics.json`` with ``"stopped"``).
    """
    exp = config if isinstance(config, Experiment) else load_config(config, overrides)
    import keras

    from gradlab import plugins
    from gradlab.callbacks import StepMetrics, observations_for
    from gradlab.data import make_data

    device = configure_device(exp.train)
    data = make_data(exp.data, exp.seed)
    path = make_run_dir(exp, run_dir)
    write_json_config(path, exp)
    set_determinism(exp.seed, device)
    previous_policy = keras.config.dtype_policy()
    keras.config.set_dtype_policy(exp.train.precision)
    status: dict[str, Any] = {"status": "running"}
    try:
        model = build(exp, data, device)
        diagnostics, user_callbacks = plugins.build_callbacks(exp, str(path / "train"))
        callbacks = [StepMetrics(log_dir=str(path / "train"), every=min(10, max(1, exp.train.steps_per_execution)))]
        callbacks += diagnostics
        callbacks.append(keras.callbacks.TensorBoard(log_dir=str(path), update_freq="epoch", write_graph=False))
        callbacks += user_callbacks
        if verbose == "auto":
            verbose = 0 if quiet else (1 if sys.stdout.isatty() else 2)
        history = model.fit(data.train, validation_data=data.validation, epochs=exp.train.epochs,
                            callbacks=callbacks, verbose=verbose)
        metrics = _final_metrics(model, data)
        metrics["steps"] = int(model.optimizer.iterations.numpy())
        metrics["epochs_completed"] = len(history.history.get("loss", []))
        metrics["device"] = device
        obs = observations_for(model)
        verdicts = [v for d in diagnostics for v in getattr(d, "verdicts", lambda: [])()]
        metrics["verdicts"] = verdicts
        stopped = [e for e in obs.events if e.get("kind") == "nonfinite_stop"]
        if stopped:
            metrics["stopped"] = stopped[0]
        model.save_weights(str(path / WEIGHTS_FILE))
        metrics["status"] = "stopped" if stopped else "completed"
        write_json(path / METRICS_FILE, metrics)
    except BaseException as err:
        status = {"status": "failed" if not isinstance(err, KeyboardInterrupt) else "interrupted",
                  "error": f"{type(err).__name__}: {err}".splitlines()[0]}
        if not (path / METRICS_FILE).exists():
            write_json(path / METRICS_FILE, status)
        raise
    finally:
        keras.config.set_dtype_policy(previous_policy)
    if not quiet:
        print_summary(path, metrics)
    if stopped:
        raise NonFiniteError(stopped[0]["message"] + f" (run directory: {path})")
    return RunResult(run_dir=path, metrics=metrics)


def write_json_config(path: Path, exp: Experiment) -> None:
    atomic_write_text(path / CONFIG_FILE, yaml.safe_dump(exp.to_dict(), sort_keys=False))


def print_summary(path: Path, metrics: dict) -> None:
    """Print the verdict table, the final metrics, where the logs are and how to view them."""
    verdicts = metrics.get("verdicts") or []
    print()
    if verdicts:
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
    print(f"view it: tensorboard --logdir {path}")
