"""TensorBoard integration beyond scalars: HParams data, the custom-scalars layout, the launcher.

Everything here writes event files with TensorBoard's own protos and record format
(``tensorboard.summary.writer.record_writer``) from plain Python: no TensorFlow import, so
the sweep driver stays light while its runs train in other processes.

* :func:`write_hparams_config` puts the HParams *experiment* (every swept hyperparameter with
  its domain, and the metrics) in the sweep directory; :func:`write_session` puts one
  *session* (a run's hyperparameter values, its end status and final metrics as scalars
  ``final/<metric>``) in each run directory. The HParams dashboard pairs them: a session is a
  TensorBoard run with session-start info, and a metric ``MetricName(group="", tag)`` is read
  from the session's own run.
* :func:`write_layout` writes a custom-scalars layout (``custom_scalars`` plugin) grouping each
  layer's gradient and activation charts; :func:`gradlab.experiment.run` calls it at run start.
* :func:`launch` serves TensorBoard on ``127.0.0.1``.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from gradlab.errors import UsageError

HOST = "127.0.0.1"
DEFAULT_PORT = 6006
FINAL_PREFIX = "final/"
_uid = [0]


class EventWriter:
    """Append-only writer of one ``events.out.tfevents.*`` file in ``log_dir`` (created if needed).

    Use as a context manager; every :meth:`summary` is flushed on :meth:`close`.
    """

    def __init__(self, log_dir: str | os.PathLike, suffix: str = ".gradlab"):
        from tensorboard.compat.proto import event_pb2
        from tensorboard.summary.writer.record_writer import RecordWriter

        self._event_pb2 = event_pb2
        Path(log_dir).mkdir(parents=True, exist_ok=True)
        _uid[0] += 1
        name = (f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}.{os.getpid()}."
                f"{_uid[0]}{suffix}")
        self.path = Path(log_dir) / name
        self._writer = RecordWriter(open(self.path, "wb"))
        self._write(event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2"))

    def _write(self, event) -> None:
        self._writer.write(event.SerializeToString())

    def summary(self, summary_pb, step: int = 0, wall_time: float | None = None) -> None:
        """Write a ``summary_pb2.Summary`` at ``step``."""
        self._write(self._event_pb2.Event(wall_time=wall_time or time.time(), step=int(step), summary=summary_pb))

    def scalar(self, tag: str, value: float, step: int = 0) -> None:
        """Write a scalar summary (the ``scalars`` plugin's float32 tensor format)."""
        from tensorboard.plugins.scalar.summary_v2 import scalar_pb

        self.summary(scalar_pb(tag, float(value)), step)

    def close(self) -> None:
        self._writer.flush()
        self._writer.close()

    def __enter__(self) -> "EventWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ---------------------------------------------------------------------------------------------
# HParams

def hparam_kind(values: Iterable[Any]) -> str:
    """``"bool"``, ``"float"`` (ints and floats, mixed or not) or ``"str"`` (anything else, or a mix)."""
    vals = list(values)
    if vals and all(isinstance(v, bool) for v in vals):
        return "bool"
    if vals and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals):
        return "float"
    return "str"


def hparam_value(value: Any, kind: str) -> bool | float | str:
    """``value`` as an HParams value of ``kind``; lists and mappings become YAML flow strings."""
    if kind == "bool":
        return bool(value)
    if kind == "float":
        return float(value)
    if isinstance(value, str):
        return value
    import yaml

    text = yaml.safe_dump(value, default_flow_style=True, width=10**6).strip()
    return text.removesuffix("...").strip()


def hparam_domain(values: Iterable[Any]):
    """An HParams ``Discrete`` domain holding ``values`` converted by :func:`hparam_value`."""
    from tensorboard.plugins.hparams import summary_v2 as hp

    vals = list(values)
    kind = hparam_kind(vals)
    converted = sorted(set(hparam_value(v, kind) for v in vals))
    return hp.Discrete(converted, dtype={"bool": bool, "float": float, "str": str}[kind])


def write_hparams_config(log_dir: str | os.PathLike, hparams: Mapping[str, Sequence[Any]],
                         metrics: Sequence[tuple[str, str]], time_created: float | None = None) -> Path:
    """Write the HParams experiment: ``hparams`` maps a name to its values, ``metrics`` are
    ``(tag, description)`` pairs read from each session's own run. Returns the event file."""
    from tensorboard.plugins.hparams import summary_v2 as hp

    params = [hp.HParam(name, hparam_domain(values)) for name, values in hparams.items()]
    mets = [hp.Metric(tag, group="", display_name=tag.removeprefix(FINAL_PREFIX), description=desc)
            for tag, desc in metrics]
    with EventWriter(log_dir) as w:
        w.summary(hp.hparams_config_pb(params, mets, time_created_secs=time_created or time.time()))
        return w.path


HPARAMS_STATUS = {"completed": "STATUS_SUCCESS", "stopped": "STATUS_FAILURE", "failed": "STATUS_FAILURE",
                  "interrupted": "STATUS_FAILURE", "running": "STATUS_RUNNING"}


def write_session(run_dir: str | os.PathLike, hparams: Mapping[str, Any], *, status: str,
                  metrics: Mapping[str, float], group: str | None = None, start_time: float | None = None,
                  end_time: float | None = None, step: int = 0) -> Path:
    """Write one HParams session into ``run_dir``: start info, final metrics, end info.

    Args:
        hparams: name -> bool, number or string (as :func:`hparam_value` makes them, matching the
            domains of the experiment).
        status: gradlab run status (``completed``, ``stopped``, ``failed``, ...), mapped to the
            HParams ``Status``.
        metrics: tag (``final/loss``) -> value; non-finite values are skipped.
        group: the session group name (default: the directory name).
    """
    import math

    from tensorboard.compat.proto import summary_pb2
    from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2
    from tensorboard.plugins.hparams import summary_v2 as hp

    run_dir = Path(run_dir)
    with EventWriter(run_dir) as w:
        w.summary(hp.hparams_pb(dict(hparams), trial_id=group or run_dir.name, start_time_secs=start_time or time.time()))
        for tag, value in metrics.items():
            if value is not None and math.isfinite(float(value)):
                w.scalar(tag, float(value), step)
        end = plugin_data_pb2.SessionEndInfo(status=getattr(api_pb2, HPARAMS_STATUS.get(status, "STATUS_UNKNOWN")),
                                             end_time_secs=end_time or time.time())
        summary = summary_pb2.Summary()
        summary.value.add(tag=metadata.SESSION_END_INFO_TAG, tensor=metadata.NULL_TENSOR,
                          metadata=metadata.create_summary_metadata(
                              plugin_data_pb2.HParamsPluginData(session_end_info=end)))
        w.summary(summary)
        return w.path


# ---------------------------------------------------------------------------------------------
# Custom scalars

def custom_scalars_layout(layers: Sequence[str], activation_layers: Sequence[str] = ()):
    """A ``layout_pb2.Layout``: an overview category, then one category per layer.

    Per layer ``L``: *gradient norm* (``gradients/L/<var>/norm`` and ``gradients/L/layer_norm``),
    *update ratio* (``gradients/L/<var>/update_ratio``), and for the layers in
    ``activation_layers`` *saturated / dead fraction* and *activation mean / std*
    (``activations/L/...``). Chart tags are regular expressions anchored at both ends.
    """
    from tensorboard.plugins.custom_scalar import layout_pb2

    def chart(title: str, *patterns: str):
        return layout_pb2.Chart(title=title, multiline=layout_pb2.MultilineChartContent(tag=list(patterns)))

    categories = [layout_pb2.Category(title="gradlab: overview", chart=[
        chart("loss", r"^step/loss$", r"^epoch_loss$"),
        chart("global gradient norm", r"^gradients/global_norm(/window_max)?$"),
        chart("logits gradient norm", r"^gradients/logits/norm(/window_max)?$"),
    ])]
    for layer in layers:
        q = re.escape(layer)
        charts = [chart(f"{layer}: gradient norm", rf"^gradients/{q}/[^/]+/norm$", rf"^gradients/{q}/layer_norm$"),
                  chart(f"{layer}: update ratio", rf"^gradients/{q}/[^/]+/update_ratio$")]
        if layer in activation_layers:
            charts += [chart(f"{layer}: saturated / dead fraction", rf"^activations/{q}/(saturated|dead)_fraction$"),
                       chart(f"{layer}: activation mean / std", rf"^activations/{q}/(mean|std)$")]
        categories.append(layout_pb2.Category(title=f"gradlab: layer {layer}", chart=charts))
    return layout_pb2.Layout(category=categories)


def write_layout(log_dir: str | os.PathLike, layers: Sequence[str], activation_layers: Sequence[str] = ()) -> Path:
    """Write :func:`custom_scalars_layout` to an event file in ``log_dir``; returns the file."""
    from tensorboard.compat.proto import summary_pb2
    from tensorboard.plugins.custom_scalar import metadata
    from tensorboard.util import tensor_util

    layout = custom_scalars_layout(layers, activation_layers)
    summary = summary_pb2.Summary()
    summary.value.add(tag=metadata.CONFIG_SUMMARY_TAG, metadata=metadata.create_summary_metadata(),
                      tensor=tensor_util.make_tensor_proto(layout.SerializeToString()))
    with EventWriter(log_dir) as w:
        w.summary(summary)
        return w.path


def write_model_layout(run_dir: str | os.PathLike, model) -> Path | None:
    """The layout for a built Keras model: layers with trainable weights; hidden (non-``logits``)
    layers with an activation also get activation charts. Never raises (a layout is a nicety)."""
    try:
        from gradlab.summaries import variable_names

        layers = list(dict.fromkeys(layer for layer, _ in variable_names(model)))
        acts = [layer.name for layer in model.layers if getattr(layer, "activation", None) is not None
                and layer.name != "logits" and layer.name in layers]
        return write_layout(run_dir, layers, acts)
    except Exception:  # pragma: no cover - never let the layout break a run
        return None


# ---------------------------------------------------------------------------------------------
# Launcher

def free_port(host: str = HOST) -> int:
    """A TCP port that is free on ``host`` right now."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def tensorboard_argv(logdir: str | os.PathLike, port: int) -> list[str]:
    """The TensorBoard command-line arguments :func:`launch` uses."""
    return ["--logdir", str(logdir), "--host", HOST, "--port", str(port), "--reload_interval", "5"]


def launch(logdir: str | os.PathLike, port: int = DEFAULT_PORT) -> int:
    """Serve TensorBoard for ``logdir`` on ``http://127.0.0.1:port/`` until Ctrl-C.

    Returns TensorBoard's own exit status when the server stops by itself (0 on SIGTERM, which
    TensorBoard handles). Ctrl-C (SIGINT) stops the server cleanly (its socket closed, its info
    file removed) and then raises ``KeyboardInterrupt``, which the CLI reports as one line with
    exit status 130: Werkzeug's ``serve_forever`` swallows the ``KeyboardInterrupt`` and returns
    normally, so without this the command would exit 0. The SIGINT handler is installed only
    when called from the main thread (elsewhere Python cannot install one), and the previous
    handler is restored afterwards.

    Raises:
        UsageError: ``logdir`` is not a directory with event files, or the port is taken.
        KeyboardInterrupt: Ctrl-C, after the server stopped.
    """
    path = Path(logdir)
    if not path.is_dir():
        raise UsageError(f"RUN_OR_SWEEP_DIR {str(path)!r}: not a directory (give a run or sweep directory)")
    if not any(path.rglob("events.out.tfevents.*")):
        raise UsageError(f"RUN_OR_SWEEP_DIR {str(path)!r}: no TensorBoard event files under it "
                           "(give a gradlab run or sweep directory)")
    if not 1 <= port <= 65535:
        raise UsageError(f"--port {port}: must be between 1 and 65535")
    with socket.socket() as s:
        try:
            s.bind((HOST, port))
        except OSError:
            raise UsageError(f"--port {port}: already in use on {HOST} (choose another, e.g. --port "
                               f"{free_port()})") from None
    from tensorboard import program

    board = program.TensorBoard()
    board.configure(argv=[None] + tensorboard_argv(path, port))
    print(f"gradlab: TensorBoard for {path} at http://{HOST}:{port}/ (Ctrl-C to stop)", flush=True)
    interrupted: list[int] = []

    def on_sigint(signum, frame):
        interrupted.append(signum)
        raise KeyboardInterrupt

    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, on_sigint) if main_thread else None
    try:
        status = int(board.main() or 0)
    finally:
        if main_thread:
            signal.signal(signal.SIGINT, previous)
    if interrupted:  # the server caught the KeyboardInterrupt and shut down; report Ctrl-C
        raise KeyboardInterrupt
    return status
