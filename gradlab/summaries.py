"""TensorBoard writing in one place: tag sanitising and shared, lazily created file writers."""

from __future__ import annotations

import os
import re
import struct
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
    histogram). Here the counts come from ``tf.histogram_fixed_width``, whose CPU kernel
    computes the same index in float64 (:func:`_fixed_width_counts`; the GPU kernel bins against
    the levels ``min + i * width`` instead, so there a value exactly on a bucket edge may land
    in the neighbouring bucket: not run on a GPU); under XLA, which has no
    kernel for it, from ``unsorted_segment_sum`` (:func:`_segment_counts`, about 2.5x slower on
    a CPU). The choice is made when the function is traced, so it can run inside a compiled
    step either way. Both give identical buckets (tested against the plugin).
    """
    import tensorflow as tf
    from tensorflow.python.ops import control_flow_util

    in_xla = control_flow_util.GraphOrParentsInXlaContext(tf.compat.v1.get_default_graph())
    return (_segment_counts if in_xla else _fixed_width_counts)(values, bucket_count)


def _bucket_rows(lo, hi, counts, some, bucket_count: int):
    """``[bucket_count, 3]`` rows from the range and counts; all zeros when not ``some``."""
    import tensorflow as tf

    edges = tf.concat([tf.linspace(lo, hi, bucket_count + 1)[:-1], [hi]], 0)
    buckets = tf.stack([edges[:-1], edges[1:], counts], axis=1)
    return tf.where(some, buckets, tf.zeros_like(buckets))


def _fixed_width_counts(values, bucket_count: int):
    """:func:`histogram_buckets` with ``tf.histogram_fixed_width`` (not XLA-compilable).

    Its kernel computes ``min((max(x, lo) - lo) / ((hi - lo) / k), k - 1)`` in the input's type,
    so ``x`` is cast to float64 first: the plugin's index, operation for operation. Non-finite
    entries are counted in bucket 0 as ``lo`` and taken out of it again; the minimum and maximum
    are found in the input's own type (exact: the cast to float64 preserves order and values).
    """
    import tensorflow as tf

    v = tf.reshape(values, [-1])
    if v.dtype not in (tf.float16, tf.bfloat16, tf.float32, tf.float64):
        v = tf.cast(v, tf.float64)
    finite = tf.math.is_finite(v)
    nonfinite = tf.reduce_sum(tf.cast(tf.logical_not(finite), tf.float64))
    count = tf.cast(tf.size(v), tf.float64) - nonfinite
    inf = tf.constant(np.inf, v.dtype)
    some = count > 0
    lo = tf.where(some, tf.cast(tf.reduce_min(tf.where(finite, v, inf)), tf.float64), 0.0)
    hi = tf.where(some, tf.cast(tf.reduce_max(tf.where(finite, v, -inf)), tf.float64), 0.0)
    spread = hi > lo
    x = tf.cast(tf.where(finite, v, tf.cast(lo, v.dtype)), tf.float64)
    # The kernel refuses an empty range (lo + 1 may equal lo, e.g. 1e17): with a single value the
    # counts are set below, and the kernel gets [0, 1].
    value_range = tf.stack([tf.where(spread, lo, 0.0), tf.where(spread, hi, 1.0)])
    counts = tf.histogram_fixed_width(x, value_range, nbins=bucket_count)
    counts = tf.cast(counts, tf.float64) - tf.one_hot(0, bucket_count, dtype=tf.float64) * nonfinite
    counts = tf.where(spread, counts, tf.one_hot(bucket_count - 1, bucket_count, dtype=tf.float64) * count)
    return _bucket_rows(lo, hi, counts, some, bucket_count)


def _segment_counts(values, bucket_count: int):
    """:func:`histogram_buckets` with ``unsorted_segment_sum`` (XLA-safe): a few passes over
    ``values``, no large temporary."""
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
    return _bucket_rows(lo, hi, counts, some, bucket_count)


def write_histogram_buckets(name: str, buckets, step: int) -> bool:
    """Write precomputed :func:`histogram_buckets` to the default writer as a TensorBoard histogram."""
    import tensorflow as tf
    from tensorboard.plugins.histogram import metadata

    return tf.summary.write(name, tf.cast(buckets, tf.float64), step=step,
                            metadata=metadata.create_summary_metadata(display_name=None, description=None))


def variable_path(variable, model=None) -> tuple[str, str]:
    """``(layer, variable)`` names for a Keras variable, e.g. ``("hidden_1", "kernel")``.

    Keras 3 variables carry ``path`` like ``"hidden_1/kernel"``; a nested model gives
    ``"block/dense/kernel"``, which becomes layer ``block/dense``. Sequential and subclassed
    models put their own name first (``"sequential/hidden_1/kernel"``): given ``model``, that
    prefix is dropped, so tags read ``gradients/hidden_1/kernel/...`` whatever the model's
    kind or name (and match the layer names other diagnostics use).
    """
    path = getattr(variable, "path", None) or getattr(variable, "name", "variable")
    path = str(path).split(":")[0]
    prefix = f"{getattr(model, 'name', None)}/" if model is not None else None
    if prefix and path.startswith(prefix) and "/" in path[len(prefix):]:
        path = path[len(prefix):]
    if "/" in path:
        layer, name = path.rsplit("/", 1)
    else:
        layer, name = "model", path
    return layer, name


def variable_names(model) -> list[tuple[str, str]]:
    """``(layer, variable)`` of each of ``model``'s trainable variables (see :func:`variable_path`)."""
    return [variable_path(v, model) for v in model.trainable_variables]


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


_value_heads: dict[tuple[str, str], bytes] = {}  # (plugin, tag) -> serialized Summary.Value without its tensor
_SCALAR_TENSOR_HEAD = b"\x42\x0a\x08\x01\x12\x00\x2a\x04"  # tensor{dtype: DT_FLOAT, shape: [], float_val: (4 bytes)}


def _value_head(plugin: str, tag: str) -> bytes:
    """``Summary.Value(tag=tag, metadata=<plugin's metadata>)`` serialized, cached per tag."""
    head = _value_heads.get((plugin, tag))
    if head is None:
        from tensorboard.compat.proto import summary_pb2

        if plugin == "scalars":
            from tensorboard.plugins.scalar import metadata
        else:
            from tensorboard.plugins.histogram import metadata
        if len(_value_heads) > 65536:
            _value_heads.clear()
        meta = metadata.create_summary_metadata(display_name=None, description=None)
        head = _value_heads[(plugin, tag)] = summary_pb2.Summary.Value(tag=tag, metadata=meta).SerializeToString()
    return head


def scalar_value(tag: str, value: float) -> bytes:
    """One ``Summary.value`` entry (field 1, length-delimited) as ``tf.summary.scalar`` writes it:
    the scalar plugin's metadata and a scalar ``DT_FLOAT`` tensor.

    The bytes are the cached ``tag`` + ``metadata`` fields followed by the ``tensor`` field
    (field 8: ``dtype`` DT_FLOAT, an empty ``tensor_shape``, one packed ``float_val``). Protocol
    buffers accept fields in any order, so the concatenation is a valid message, and
    concatenated entries are a valid ``Summary``. Everything but the 4 value bytes is a
    per-tag constant (:func:`_scalar_prefix`).
    """
    return _scalar_prefix(tag) + _pack_float(value)


_scalar_prefixes: dict[str, bytes] = {}
_pack_float = struct.Struct("<f").pack


def _scalar_prefix(tag: str) -> bytes:
    """The bytes of :func:`scalar_value` before its 4 value bytes, cached per tag (the entry's
    length does not depend on the value)."""
    prefix = _scalar_prefixes.get(tag)
    if prefix is None:
        body = _value_head("scalars", tag) + _SCALAR_TENSOR_HEAD
        if len(_scalar_prefixes) > 65536:
            _scalar_prefixes.clear()
        prefix = _scalar_prefixes[tag] = b"\x0a" + _varint(len(body) + 4) + body
    return prefix


def histogram_value(tag: str, buckets) -> bytes:
    """One ``Summary.value`` entry for precomputed :func:`histogram_buckets` (``[k, 3]``): what
    :func:`write_histogram_buckets` writes (a ``DT_DOUBLE`` tensor, the histogram plugin's metadata)."""
    from tensorboard.compat.proto import tensor_pb2, tensor_shape_pb2, types_pb2

    array = np.ascontiguousarray(np.asarray(buckets, dtype="<f8"))
    tensor = tensor_pb2.TensorProto(
        dtype=types_pb2.DT_DOUBLE, tensor_content=array.tobytes(),
        tensor_shape=tensor_shape_pb2.TensorShapeProto(
            dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=d) for d in array.shape])).SerializeToString()
    body = _value_head("histograms", tag) + b"\x42" + _varint(len(tensor)) + tensor
    return b"\x0a" + _varint(len(body)) + body


def _varint(n: int) -> bytes:
    if n < 0x80:
        return bytes((n,))
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def write_events(writer, scalars=(), histograms=()) -> None:
    """Write ``scalars`` (``(tag, value, step)``) and ``histograms`` (``(tag, buckets, step)``,
    precomputed :func:`histogram_buckets`) with ``writer``.

    ``tf.summary.scalar`` costs ~0.1 ms a value in eager mode and gradient_stats writes ~50
    values per write. Here everything of one step goes out as one serialized ``Summary``
    (the events ``tf.summary.scalar`` / :func:`write_histogram_buckets` would write; see
    :func:`scalar_value`) in one ``WriteRawProtoSummary`` op: one op per distinct step, whatever
    the number of values.
    """
    import tensorflow as tf

    handle = getattr(writer, "_resource", None)
    if handle is None:  # a writer without a resource handle (no-op writer): write one by one
        with writer.as_default():
            for t, v, s in scalars:
                tf.summary.scalar(t, float(v), step=int(s))
            for t, b, s in histograms:
                write_histogram_buckets(t, b, int(s))
        return
    by_step: dict[int, list] = {}
    prefix, pack = _scalar_prefixes.get, _pack_float
    for t, v, s in scalars:
        parts = by_step.get(s)
        if parts is None:
            parts = by_step[int(s)] = []
        parts.append(prefix(t) or _scalar_prefix(t))
        parts.append(pack(v))
    for t, b, s in histograms:
        by_step.setdefault(int(s), []).append(histogram_value(t, b))
    for step, parts in by_step.items():
        tf.raw_ops.WriteRawProtoSummary(writer=handle, step=tf.constant(step, tf.int64),
                                        tensor=tf.constant(b"".join(parts), tf.string))  # (dtype given: ~15 us less)


def write_scalars_in_graph(writer, step, tags, values) -> None:
    """Write ``values[i]`` (a float32 vector, static length ``len(tags)``) as scalar ``tags[i]`` at
    ``step``, from inside a compiled function: the op :func:`write_events` runs in Python, here
    part of the graph, so a step that writes its own statistics spends no Python on them.

    The ``Summary`` is assembled in the graph: the per-tag constant prefixes of
    :func:`scalar_value` (built here, at trace time) joined with each value's 4 little-endian
    bytes, cut from the end of ``tf.io.serialize_tensor(values)`` (a ``TensorProto`` whose
    ``tensor_content`` holds the raw values last, in the host's byte order: little-endian on
    every platform TensorFlow ships for). The events are byte for byte those of
    :func:`write_events` (and ``tf.summary.scalar``'s values). ``writer`` needs a resource handle
    (``tf.summary.create_file_writer``); the compiled function captures it, so it must outlive
    the function, or at least every execution of the op (put it in a branch not taken once the
    writer is closed). Not XLA-compilable (string ops, a summary op).
    """
    import tensorflow as tf

    k = len(tags)
    if k == 0:
        return
    data = tf.io.serialize_tensor(tf.reshape(tf.cast(values, tf.float32), [k]))
    raw = tf.strings.substr(data, tf.strings.length(data) - 4 * k + tf.range(0, 4 * k, 4), tf.fill([k], 4))
    prefixes = tf.constant([_scalar_prefix(t) for t in tags], tf.string)
    summary = tf.strings.reduce_join(tf.strings.join([prefixes, raw]))
    tf.raw_ops.WriteRawProtoSummary(writer=writer._resource, step=tf.cast(step, tf.int64), tensor=summary)


def write_scalars(writer, tags, values, steps) -> None:
    """Write ``values[i]`` as scalar ``tags[i]`` at ``steps[i]`` (:func:`write_events`)."""
    write_events(writer, scalars=zip(tags, values, steps))


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
