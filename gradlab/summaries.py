"""TensorBoard writing in one place: tag sanitising and shared, lazily created file writers."""

from __future__ import annotations

import os
import re
import threading

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
            entry = _writers[key] = [tf.summary.create_file_writer(key), 0]
        entry[1] += 1
        return entry[0]


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
