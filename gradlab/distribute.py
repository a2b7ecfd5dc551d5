"""``train.distribute``: none | mirrored | multi_worker, with TensorFlow's own ``tf.distribute``.

* ``none``: the default strategy (one device).
* ``mirrored``: ``tf.distribute.MirroredStrategy`` over the local GPUs; on a CPU-only machine
  with ``train.cpu_devices: N`` over N logical CPU devices (set up by
  :func:`gradlab.experiment.configure_device` before TensorFlow starts).
* ``multi_worker``: ``tf.distribute.MultiWorkerMirroredStrategy``, configured by the
  ``TF_CONFIG`` environment variable (``{"cluster": {"worker": [...]}, "task": {"type":
  "worker", "index": i}}``). Worker 0 is the chief: it alone writes TensorBoard logs,
  checkpoints, ``metrics.json`` and the final weights; the other workers keep their (required)
  checkpoint copies in a temporary directory that is deleted at the end.

The gradient handling under several replicas lives in
:meth:`gradlab.train_step.GradlabModel._gradlab_global` (one all-reduce, global clipping,
global statistics), as do the workarounds for Keras 3's multi-worker ``fit`` (keras#20585).
"""

from __future__ import annotations

import json
import os
import shlex

from gradlab.errors import DeviceError, WorkerLostError


def tf_config() -> dict:
    raw = os.environ.get("TF_CONFIG", "")
    if not raw:
        return {}
    try:
        return json.loads(raw)
    except ValueError:
        raise DeviceError("TF_CONFIG is not valid JSON (see docs/scale.md for its form)") from None


def task_index() -> int:
    return int(tf_config().get("task", {}).get("index", 0))


def make_strategy(train):
    """The ``tf.distribute`` strategy for ``train.distribute``; must be created before other TF work."""
    import tensorflow as tf

    if train.distribute == "none":
        return tf.distribute.get_strategy()
    if train.distribute == "mirrored":
        gpus = tf.config.list_logical_devices("GPU")
        if gpus:
            return tf.distribute.MirroredStrategy([d.name for d in gpus])
        cpus = tf.config.list_logical_devices("CPU")
        return tf.distribute.MirroredStrategy([d.name for d in cpus],
                                              cross_device_ops=tf.distribute.ReductionToOneDevice())
    cfg = tf_config()
    workers = cfg.get("cluster", {}).get("worker", [])
    task = cfg.get("task", {})
    if not workers or task.get("type") != "worker":
        raise DeviceError("train.distribute: multi_worker needs TF_CONFIG with cluster.worker addresses and "
                          "task {type: worker, index: i} (see docs/scale.md)")
    options = tf.distribute.experimental.CommunicationOptions(
        implementation=tf.distribute.experimental.CommunicationImplementation.RING)
    try:
        return tf.distribute.MultiWorkerMirroredStrategy(communication_options=options)
    except (RuntimeError, ValueError) as err:
        raise DeviceError(f"train.distribute: cannot start multi_worker ({str(err).splitlines()[0]})") from None


def is_multi_worker(strategy) -> bool:
    import tensorflow as tf

    return isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy) and \
        strategy.extended._in_multi_worker_mode()


def is_chief(strategy) -> bool:
    """Worker 0 of a multi-worker cluster, or the only process otherwise."""
    if not is_multi_worker(strategy):
        return True
    return task_index() == 0


_LOST = ("UnavailableError", "AbortedError", "DeadlineExceededError", "CancelledError", "InternalError",
         "UnknownError", "FailedPreconditionError")


def raise_if_worker_lost(err: BaseException, strategy, run_dir, step: int | None) -> None:
    """Turn a collective failure of a multi-worker run into a one-line :class:`WorkerLostError`."""
    import tensorflow as tf

    if not is_multi_worker(strategy) or not isinstance(err, tf.errors.OpError):
        return
    if type(err).__name__ not in _LOST:
        return
    first = (err.message or type(err).__name__).splitlines()[0][:160]
    where = f" at step {step}" if step is not None else ""
    raise WorkerLostError(f"gradlab: worker {task_index()}: lost contact with another worker{where} "
                          f"({type(err).__name__}: {first}); the last checkpoint is intact -- restart every worker "
                          f"with: gradlab run --resume {shlex.quote(str(run_dir))}") from None
