"""TensorBoard writing in one place: tag sanitising and shared, lazily created file writers."""

from __future__ import annotations

import os
import re
import threading

import numpy as np

_UNSAFE = re.compile(r"[^A-Za-z0-9_.\-/]")
_lock = threading.Lock()
_writers: dict[str, list] = {}  # abs path -> [writer, users]


def sanitize(part: str) -> str:
    """Make one tag component safe: ``:`` and other characters become ``_``; no empty parts."""
    part = str(part).split(":")[0]  # drop TF's ':0' suffix
    return _UNSAFE.sub("_", part).strip("/") or "_"


def tag(*parts: str) -> str:
    """Join sanitised parts with ``/``: ``tag("gradients", "hidden_1", "kernel", "norm")``."""
    return "/".join(sanitize(p) for p in parts if p != "")


HISTOGRAM_BUCKETS = 30


def histogram_buckets(values, bucket_count: int = HISTOGRAM_BUCKETS):
    """TensorBoard histogram buckets of ``values`` as a ``[bucket_count, 3]`` float64 tensor.

    Row ``i`` is ``(left_edge, right_edge, count)``, the layout of TensorBoard's histogram plugin,
    and the buckets are the plugin's own (``tf.summary.histogram``): ``bucket_count`` equal-width
    buckets from ``min`` to ``max``, ``index = min(floor((x - min) / width), bucket_count - 1)``,
    computed in float64. Edge cases as there: all values equal puts them all in the last bucket,
    with every edge at that value; no values gives all zeros. Unlike the plugin, non-finite
    entries (NaN, +-Inf) are left out rather than spoiling every bucket.

    The plugin builds a ``[n, bucket_count]`` one-hot matrix (a 400k-entry gradient: 96 MB per
    histogram); this uses ``unsorted_segment_sum``: a few passes over ``values``, no large
    temporary, and XLA-safe, so it can run inside a compiled step.
    """
    import tensorflow as tf

    x = tf.reshape(tf.cast(values, tf.float64), [-1])
    finite = tf.math.is_finite(x)
    weight = tf.cast(finite, tf.float64)
    count = tf.reduce_sum(weight)
    lo = tf.reduce_min(tf.where(finite, x, tf.constant(np.inf, tf.float64)))
    hi = tf.reduce_max(tf.where(finite, x, tf.constant(-np.inf, tf.float64)))
    some = count > 0
    lo, hi = tf.where(some, lo, 0.0), tf.where(some, hi, 0.0)
    span = hi - lo
    width = tf.where(span > 0, span / bucket_count, 1.0)
    index = tf.cast(tf.floor((tf.where(finite, x, lo) - lo) / width), tf.int32)
    index = tf.where(span > 0, tf.minimum(index, bucket_count - 1), bucket_count - 1)
    counts = tf.math.unsorted_segment_sum(weight, index, bucket_count)
    edges = tf.concat([tf.linspace(lo, hi, bucket_count + 1)[:-1], [hi]], 0)
    buckets = tf.stack([edges[:-1], edges[1:], counts], axis=1)
    return tf.where(some, buckets, tf.zeros_like(buckets))


def write_histogram_buckets(name: str, buckets, step: int) -> bool:
    """Write precomputed :func:`histogram_buckets` to the default writer as a TensorBoard histogram."""
    import tensorflow as tf
    from tensorboard.plugins.histogram import metadata

    return tf.summary.write(name, tf.cast(buckets, tf.float64), step=step,
                            metadata=metadata.create_summary_metadata(display_name=None, description=None))


def variable_path(variable, model=None) -> tuple[str, str]:
    """``(layer, variable)`` names for a Keras variable, e.g. ``("hidden_1", "kernel")``.

    Keras 3 variables carry ``path`` like ``"hidden_1/kernel"``; a nested model gives
    ``"block/dense/kernel"``, which becomes layer ``block/dense``.
    """
    path = getattr(variable, "path", None) or getattr(variable, "name", "variable")
    path = str(path).split(":")[0]
    if "/" in path:
        layer, name = path.rsplit("/", 1)
    else:
        layer, name = "model", path
    return layer, name


def acquire_writer(log_dir: str):
    """A ``tf.summary`` file writer for ``log_dir``, shared by every caller until released."""
    import tensorflow as tf

    key = os.path.abspath(log_dir)
    with _lock:
        entry = _writers.get(key)
        if entry is None:
            # max_queue: events are buffered and written in batches (the default, 10, made a
            # diagnostic writing 50 scalars per step flush to disk 5 times a step); flush_millis
            # bounds how stale a live TensorBoard view can get. Writers are flushed at every
            # checkpoint, on Ctrl-C and at the end of training.
            entry = _writers[key] = [tf.summary.create_file_writer(key, max_queue=1000, flush_millis=10_000), 0]
        entry[1] += 1
        return entry[0]


_scalar_writers: dict[int, object] = {}  # number of scalars -> compiled writer
_tag_tensors: dict[tuple, object] = {}  # tag tuple -> string tensor


def write_scalars(writer, tags, values, steps) -> None:
    """Write ``values[i]`` as scalar ``tags[i]`` at ``steps[i]`` with ``writer``, in one compiled call.

    ``tf.summary.scalar`` in eager mode costs ~0.1 ms a value, and gradient_stats writes ~50
    values per write. Here one ``tf.function`` per *number* of values writes them all: the tags,
    values, steps and the writer's resource handle are its arguments, so it is traced once per
    process however many writers, runs and tag sets there are. The events are what
    ``tf.summary.scalar`` writes (a float32 tensor with the scalar plugin's metadata).
    """
    import tensorflow as tf

    handle = getattr(writer, "_resource", None)
    if handle is None:  # a writer without a resource handle: write one by one
        with writer.as_default():
            for t, v, s in zip(tags, values, steps):
                tf.summary.scalar(t, float(v), step=int(s))
        return
    n = len(tags)
    fn = _scalar_writers.get(n)
    if fn is None:
        from tensorboard.plugins.scalar import metadata

        serialized = metadata.create_summary_metadata(display_name=None, description=None).SerializeToString()

        def write(handle, tags, values, steps):
            for i in range(n):
                tf.raw_ops.WriteSummary(writer=handle, step=steps[i], tensor=values[i], tag=tags[i],
                                        summary_metadata=serialized)
            return tf.constant(True)

        # A concrete function: called directly, without tf.function's per-call argument matching.
        fn = _scalar_writers[n] = tf.function(write, autograph=False).get_concrete_function(
            tf.TensorSpec([], tf.resource), tf.TensorSpec([n], tf.string), tf.TensorSpec([n], tf.float32),
            tf.TensorSpec([n], tf.int64))
    tags = tuple(tags)
    tag_tensor = _tag_tensors.get(tags)
    if tag_tensor is None:
        if len(_tag_tensors) > 256:
            _tag_tensors.clear()
        tag_tensor = _tag_tensors[tags] = tf.constant(tags, tf.string)
    fn(handle, tag_tensor, tf.constant(values, tf.float32), tf.constant(steps, tf.int64))


def release_writer(log_dir: str) -> None:
    """Flush, and close the shared writer for ``log_dir`` when its last user releases it."""
    key = os.path.abspath(log_dir)
    with _lock:
        entry = _writers.get(key)
        if entry is None:
            return
        entry[1] -= 1
        entry[0].flush()
        if entry[1] <= 0:
            entry[0].close()
            del _writers[key]
