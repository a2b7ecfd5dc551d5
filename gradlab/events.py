"""Reading TensorBoard event files back, with TensorBoard's own reader (``EventAccumulator``)."""

from __future__ import annotations

import os
from pathlib import Path

SIZE_GUIDANCE = {"scalars": 0, "tensors": 0, "histograms": 0}  # 0 = keep everything


def event_dirs(root: str | os.PathLike) -> list[Path]:
    """Every directory under ``root`` (itself included) that holds ``events.out.tfevents.*`` files."""
    root = Path(root)
    return sorted({p.parent for p in root.rglob("events.out.tfevents.*")})


def _accumulator(path: Path):
    from tensorboard.backend.event_processing import event_accumulator

    acc = event_accumulator.EventAccumulator(str(path), size_guidance=SIZE_GUIDANCE)
    acc.Reload()
    return acc


def read_scalars(root: str | os.PathLike, subdir: str | None = None) -> dict[str, list[tuple[int, float]]]:
    """``{tag: [(step, value), ...]}`` of the scalar summaries under ``root``, sorted by step.

    ``tf.summary.scalar`` writes tensor summaries in TF2, so both the legacy scalar and the
    tensor channel are read. With ``subdir`` only that TensorBoard run (e.g. ``"train"``) is read;
    otherwise tags from several runs are prefixed with the run name (``validation/epoch_loss``),
    except for the ``train`` run and the root.
    """
    import numpy as np

    out: dict[str, list[tuple[int, float]]] = {}
    root = Path(root)
    dirs = [root / subdir] if subdir else event_dirs(root)
    for d in dirs:
        if not d.exists():
            continue
        rel = d.relative_to(root).as_posix() if not subdir else ""
        prefix = "" if rel in ("", ".", "train") else rel + "/"
        acc = _accumulator(d)
        tags = acc.Tags()
        for t in tags.get("scalars", []):
            out.setdefault(prefix + t, []).extend((e.step, float(e.value)) for e in acc.Scalars(t))
        for t in tags.get("tensors", []):
            events = acc.Tensors(t)
            values = []
            for e in events:
                arr = np.asarray(_tensor_value(e.tensor_proto))
                if arr.ndim == 0 and arr.dtype.kind in "fiu":
                    values.append((e.step, float(arr)))
            if values:
                out.setdefault(prefix + t, []).extend(values)
    return {k: sorted(v) for k, v in out.items()}


def _tensor_value(proto):
    from tensorboard.util import tensor_util

    return tensor_util.make_ndarray(proto)


def read_tags(root: str | os.PathLike, subdir: str | None = None) -> dict[str, set[str]]:
    """``{"scalars": {...}, "histograms": {...}, "text": {...}}`` tag sets of the summaries under ``root``."""
    root = Path(root)
    out: dict[str, set[str]] = {"scalars": set(), "histograms": set(), "text": set()}
    dirs = [root / subdir] if subdir else event_dirs(root)
    for d in dirs:
        if not d.exists():
            continue
        acc = _accumulator(d)
        for t in acc.Tags().get("tensors", []):
            plugin = acc.SummaryMetadata(t).plugin_data.plugin_name
            kind = {"scalars": "scalars", "histograms": "histograms", "text": "text"}.get(plugin)
            if kind:
                out[kind].add(t)
        out["scalars"].update(acc.Tags().get("scalars", []))
        out["histograms"].update(acc.Tags().get("histograms", []))
    return out


def read_text(root: str | os.PathLike, tag: str, subdir: str = "train") -> list[tuple[int, str]]:
    """``[(step, text)]`` of a ``tf.summary.text`` tag."""
    d = Path(root) / subdir
    acc = _accumulator(d)
    if tag not in acc.Tags().get("tensors", []):
        return []
    out = []
    for e in acc.Tensors(tag):
        arr = _tensor_value(e.tensor_proto)
        value = arr.item() if hasattr(arr, "item") and getattr(arr, "size", 1) == 1 else arr.ravel()[0]
        out.append((e.step, value.decode() if isinstance(value, bytes) else str(value)))
    return out
