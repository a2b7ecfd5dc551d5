"""The contract every gradlab diagnostic is written against -- and yours can be too.

A diagnostic is a Keras callback (:class:`Diagnostic`) with a schedule (``every``) and up to
two channels:

* **tap** (in the step, gradlab models only): override :meth:`Diagnostic.make_tap` to return a
  :class:`gradlab.train_step.Tap` of pure tensor functions; the compiled train step runs it on
  the real gradients and keeps window accumulators. :meth:`Diagnostic.write_tap` receives what
  :meth:`GradlabModel.read_due` returns when the schedule is due (the due step's outputs and the
  window of steps since the previous due step), and at the end of training the steps after the
  last due step.
* **probe** (outside the step, any Keras model): override :meth:`Diagnostic.probe`, a pure
  tensor function of ``(model, x, y)`` returning ``{name: tensor}``. The base class compiles it
  once with ``tf.function`` and runs it on a fixed probe batch at step 0 and whenever the
  schedule is due; :meth:`Diagnostic.write_probe` receives numpy values.

Scheduling, the probe batch, the summary writer and tag sanitising live here, so a diagnostic
is mostly math. State is reset in ``on_train_begin`` (one instance can be reused across
``fit`` calls); the writer is created lazily and released in ``on_train_end``.

Steps: the step of a value is ``optimizer.iterations`` -- for a tap, the iteration whose
gradient it is (step 0 = gradient at the initial weights); for a probe, the number of updates
applied to the weights it describes (step 0 = initial weights).

Example (a complete plug-in)::

    import tensorflow as tf
    from gradlab.callbacks import Diagnostic, register
    from gradlab.train_step import Tap

    @register("grad_sparsity")
    class GradSparsity(Diagnostic):
        '''Fraction of exactly-zero gradient entries, over the whole model.'''

        uses_tap = True  # (the base class attaches make_tap's Tap only then)

        def make_tap(self, model):
            def every_step(inp):
                zeros = tf.add_n([tf.reduce_sum(tf.cast(tf.equal(g, 0.0), tf.float32)) for g in inp.grads])
                total = sum(int(g.shape.num_elements()) for g in inp.grads)
                return {"zero_fraction": zeros / total}
            return Tap(every_step=every_step, every=self.every)

        def write_tap(self, step, values):
            w = values["window"]["zero_fraction"]
            self.scalar("sparsity/zero_fraction", w["last"], step)
            self.scalar("sparsity/zero_fraction_max", w["max"], step)
"""

from __future__ import annotations

import array
import collections.abc
import functools
import math
import numbers
import os
import warnings
import weakref
from collections import defaultdict
from typing import Any, ClassVar

import keras
import numpy as np
import tensorflow as tf

from gradlab import summaries
from gradlab.errors import first_line
from gradlab.train_step import GradlabModel, Tap

_REGISTRY: dict[str, type] = {}


def register(type_name: str):
    """Class decorator: make a diagnostic selectable from YAML as ``{type: type_name}``."""
    def deco(cls):
        cls.type_name = type_name
        _REGISTRY[type_name] = cls
        return cls
    return deco


def registered() -> dict[str, type]:
    """The diagnostics registered so far, by YAML type name."""
    return dict(_REGISTRY)


class Series(collections.abc.Sequence):
    """One observed scalar series: a sequence of ``(step, value)`` tuples, in the order added.

    Stored as two packed arrays (int64 steps, float64 values): 16 bytes a point instead of ~90
    for a list of tuples, which matters for a long run -- ``gradient_stats`` publishes ~50 values
    per write for a 3-layer MLP and hundreds for a deep model, every write of the run.
    Indexing gives a tuple (a slice, a list of tuples); it compares equal to a list of the same
    tuples.
    """

    __slots__ = ("steps", "values")

    def __init__(self, points=()):
        self.steps = array.array("q")
        self.values = array.array("d")
        for step, value in points:
            self.append((step, value))

    def append(self, point) -> None:
        step, value = point
        self.steps.append(int(step))
        self.values.append(float(value))

    def __len__(self) -> int:
        return len(self.steps)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return list(zip(self.steps[i], self.values[i]))
        return self.steps[i], self.values[i]

    def __iter__(self):
        return zip(self.steps, self.values)

    def __eq__(self, other):
        if isinstance(other, collections.abc.Sequence) and not isinstance(other, (str, bytes)):
            return len(self) == len(other) and all(a == tuple(b) for a, b in zip(self, other))
        return NotImplemented

    def __repr__(self) -> str:
        return f"Series({list(self)!r})"


class Observations:
    """What diagnostics saw, shared per model: ``series[tag]`` is a :class:`Series` of
    ``(step, value)`` tuples.

    Health and reports read it; diagnostics add to it with :meth:`Diagnostic.scalar`. ``meta``
    holds facts such as each layer's activation (``meta["activation"][layer]``).
    """

    def __init__(self):
        self.series: dict[str, Series] = defaultdict(Series)
        self.meta: dict[str, dict] = defaultdict(dict)
        self.events: list[dict] = []

    def add(self, tag: str, step: int, value: float) -> None:
        self.series[tag].append((step, value))

    def clear(self) -> None:
        self.series.clear()
        self.meta.clear()
        self.events.clear()


_OBSERVATIONS: "weakref.WeakKeyDictionary[Any, Observations]" = weakref.WeakKeyDictionary()


def observations_for(model) -> Observations:
    """The shared :class:`Observations` of ``model`` (created on first use)."""
    obs = _OBSERVATIONS.get(model)
    if obs is None:
        obs = _OBSERVATIONS[model] = Observations()
    return obs


def check_int(name: str, value: Any, minimum: int = 1) -> int:
    """``value`` as an ``int`` when it is an integer (Python's or numpy's; not a bool) of at
    least ``minimum`` (1: positive, 0: non-negative), else a one-line ``ValueError`` naming
    ``name``, the value and what is allowed."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral) or value < minimum:
        what = {1: "a positive integer", 0: "a non-negative integer"}.get(minimum, f"an integer >= {minimum}")
        raise ValueError(f"`{name}` ({value!r}) must be {what}")
    return int(value)


def check_number(name: str, value: Any, *, minimum: float = 0.0, strict: bool = True,
                 below_one: bool = False) -> float:
    """``value`` as a ``float`` when it is a finite real number (Python's or numpy's; not a bool)
    above ``minimum`` (``strict``; else at least it) and, with ``below_one``, below 1; else a
    one-line ``ValueError`` naming ``name``, the value and what is allowed."""
    try:
        finite = isinstance(value, numbers.Real) and math.isfinite(value)
    except OverflowError:  # an int beyond float's range
        finite = False
    ok = (not isinstance(value, (bool, np.bool_)) and finite
          and (value > minimum if strict else value >= minimum) and not (below_one and value >= 1))
    if not ok:
        if below_one:
            what = f"a number in ({minimum:g}, 1)" if strict else f"a number in [{minimum:g}, 1)"
        elif minimum == 0:
            what = "a positive number" if strict else "a non-negative number"
        else:
            what = f"a number {'>' if strict else '>='} {minimum:g}"
        raise ValueError(f"`{name}` ({value!r}) must be {what}")
    return float(value)


def _check_log_dir(value: Any):
    if value is not None and not isinstance(value, (str, os.PathLike)):
        raise ValueError(f"`log_dir` ({value!r}) must be a directory path (str or os.PathLike) or None")
    return os.fspath(value) if value is not None else None


class Diagnostic(keras.callbacks.Callback):
    """Base class of gradlab diagnostics (see the module docstring).

    Args:
        log_dir: where to write TensorBoard events. ``None`` computes and publishes without
            writing (useful in tests and for :class:`Health`).
        every: write every ``every`` steps (a positive integer); step 0 is always included.
        probe_data: ``(x, y)`` arrays for probe diagnostics. Defaults to the probe batch a
            gradlab experiment provides (``model.gradlab_probe_batch``).
        probe_size: at most this many rows of ``probe_data`` are used.
    """

    type_name: ClassVar[str] = ""
    uses_tap: ClassVar[bool] = False
    uses_probe: ClassVar[bool] = False
    #: Convert :meth:`probe` with AutoGraph. Set False when it has no tensor-dependent Python
    #: control flow: converting a long probe costs seconds of start-up per run.
    probe_autograph: ClassVar[bool] = True
    #: The probe differentiates or evaluates the model's compiled loss: :meth:`check_probe_batch`
    #: then requires one. False for a probe that only runs the model forward.
    probe_needs_loss: ClassVar[bool] = True
    #: Options that are step schedules. In a gradlab run with ``train.steps_per_execution`` k > 1
    #: each must be a multiple of k (an unset one is rounded up): callbacks run between
    #: executions, and a due step's outputs are captured once per execution.
    schedule_options: ClassVar[tuple[str, ...]] = ("every",)

    def __init__(self, *, log_dir: str | None = None, every: int = 10, probe_data=None, probe_size: int = 256):
        super().__init__()
        self.log_dir = _check_log_dir(log_dir)
        self.every = check_int("every", every)
        self.probe_size = check_int("probe_size", probe_size)
        if probe_data is not None and (not isinstance(probe_data, (tuple, list)) or len(probe_data) != 2):
            raise ValueError("`probe_data` must be a pair (x, y)")
        self.probe_data = probe_data
        self._writer = None
        self._tap_writer = None  # held for a tap whose step writes (tap_writer), until detach or release_tap_writer
        self._in_fit = False  # between Keras's set_model (at the start of fit) and on_train_end
        self._began = False  # Diagnostic.on_train_begin ran in this fit (a subclass may forget super())
        self._warned_no_begin = False
        self._pending: list[tuple[str, float, int]] = []
        self._pending_histograms: list[tuple[str, np.ndarray, int]] = []
        self._tap_key: str | None = None
        self._probe_fn = None
        self._probe_model = None
        self._probed: tuple[int, int] | None = None  # (id(model), step) of the last probe
        self._probe_fns: dict = {}
        self._probe_batch = None
        self._epoch_start_step: int | None = None
        self._last_step = 0

    # ---- to override ------------------------------------------------------------------------
    def make_tap(self, model) -> Tap | None:
        """Return the in-step :class:`Tap`, or ``None`` to have no in-step channel."""
        return None

    def write_tap(self, step: int, values: dict) -> None:
        """Write what the tap accumulated: :meth:`GradlabModel.read_due`'s result at due steps
        (the due outputs and the window since the previous due step), :meth:`GradlabModel.read_tap`'s
        at the end of training (the steps after the last due step)."""

    def probe(self, model, x, y) -> dict:
        """Pure tensor function on the probe batch; return ``{name: tensor}``."""
        return {}

    def write_probe(self, step: int, values: dict) -> None:
        """Write the probe results (numpy values) computed at ``step``."""

    def wants_probe(self, model) -> bool:
        """Whether the probe channel runs for this model (default: when :attr:`uses_probe`)."""
        return self.uses_probe

    def probe_options(self, step: int) -> dict:
        """Keyword arguments for :meth:`probe` at ``step`` (default none). Each distinct set of
        options is compiled once, e.g. ``{"histograms": True}`` only at histogram steps."""
        return {}

    # ---- helpers for subclasses ---------------------------------------------------------------
    @property
    def writer(self):
        if self._writer is None and self.log_dir is not None:
            self._writer = summaries.acquire_writer(self.log_dir)
        return self._writer

    def scalar(self, tag: str, value: float, step: int) -> None:
        """Write one scalar (if there is a log_dir) and publish it to the model's observations.

        The value is published at once; the event is queued and written with the others of the
        same hook in one op (:meth:`flush_scalars`, which the base class runs at the
        end of its hooks: call it yourself when you write from a hook of your own that does not
        call ``super()``).
        """
        observations_for(self.model).add(tag, step, value)
        if self.log_dir is not None:
            self._pending.append((tag, float(value), int(step)))

    def scalars(self, tags, values, step: int, written: bool = False) -> None:
        """:meth:`scalar` for each of ``tags`` with ``values[i]``, all at ``step``: the same
        effect with less Python work per value (a diagnostic writing dozens of values a step).
        ``written``: the step wrote them already (a tap's :class:`~gradlab.train_step.StepWrite`):
        publish them to the observations only."""
        step = int(step)
        series = observations_for(self.model).series
        values = [float(v) for v in values]
        for tag, value in zip(tags, values):
            series[tag].append((step, value))
        if self.log_dir is not None and not written:
            self._pending.extend(zip(tags, values, [step] * len(values)))

    def tap_writer(self):
        """The summary writer for this diagnostic's tap to write in the step
        (:class:`~gradlab.train_step.StepWrite`), or None without a ``log_dir``. The compiled step
        captures it, so it is held until :meth:`detach` or :meth:`release_tap_writer`."""
        if self._tap_writer is None and self.log_dir is not None:
            self._tap_writer = summaries.acquire_writer(self.log_dir)
        return self._tap_writer

    def flush_scalars(self) -> None:
        """Write the queued scalars and histograms (see :meth:`scalar`)."""
        pending, self._pending = self._pending, []
        histograms, self._pending_histograms = self._pending_histograms, []
        if (not pending and not histograms) or self.log_dir is None:
            return
        held = self._writer is not None or self._in_fit  # in fit: kept open until on_train_end
        summaries.write_events(self.writer, pending, histograms)
        if not held:  # queued outside training (after on_train_end): do not keep a writer open
            summaries.release_writer(self.log_dir)
            self._writer = None

    def histogram(self, tag: str, values, step: int, buckets: int = summaries.HISTOGRAM_BUCKETS) -> None:
        """Write a TensorBoard histogram of ``values`` (see :func:`gradlab.summaries.histogram_buckets`).

        ``values`` may also be buckets computed already (in a tap or probe): a ``[k, 3]`` array
        passed with ``buckets=None``. Queued and written with the scalars (:meth:`flush_scalars`).
        """
        if self.log_dir is not None:
            if buckets is not None:
                values = summaries.histogram_buckets(values, buckets)
            self._pending_histograms.append((tag, np.asarray(values, np.float64), int(step)))

    def text(self, tag: str, markdown: str, step: int) -> None:
        if self.writer is not None:
            with self.writer.as_default():
                tf.summary.text(tag, markdown, step=int(step))

    def publish_meta(self, key: str, name: str, value: Any) -> None:
        observations_for(self.model).meta[key][name] = value

    @property
    def observations(self) -> Observations:
        return observations_for(self.model)

    def current_step(self) -> int:
        """The optimizer's iteration count (a variable read: a device sync)."""
        return int(self.model.optimizer.iterations.numpy())

    def steps_done(self, batch: int, *, end: bool = True) -> int:
        """Iteration count after ``on_train_batch_end(batch)`` (or before ``on_train_batch_begin(batch)``
        with ``end=False``), from the count read once at the start of the epoch.

        Keras passes the index in the epoch of the execution's last (first) step, so this costs no
        variable read per batch -- with four diagnostics those reads were a tenth of a step. With
        ``steps_per_execution > 1`` the last execution of an epoch may run fewer steps than Keras
        reports (the data ran out) or more than the epoch has (``steps_per_epoch`` with data
        left: Keras runs whole executions): there, and whenever the epoch's length is unknown,
        the count is read (once per epoch).
        """
        if self._epoch_start_step is None:
            return self.current_step()
        if end and int(getattr(self.model, "steps_per_execution", 1) or 1) > 1:
            steps = (self.params or {}).get("steps")
            if not steps or batch >= int(steps) - 1:
                return self.current_step()
        return self._epoch_start_step + batch + (1 if end else 0)

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch_start_step = self.current_step()

    def probe_batch(self):
        """The fixed ``(x, y)`` probe batch (explicit ``probe_data`` first, then the model's)."""
        data = self.probe_data if self.probe_data is not None else getattr(self.model, "gradlab_probe_batch", None)
        if data is None:
            raise ValueError(f"{type(self).__name__} needs a probe batch: pass probe_data=(x, y) "
                             "(for example a slice of your training data)")
        x, y = data  # a pair: checked by __init__
        model = self.model
        try:
            x = _take_rows(x, self.probe_size, _count(model, "inputs"), "x")
            y = _take_rows(y, self.probe_size, _count(model, "outputs"), "y")
        except ValueError as e:
            raise ValueError(f"{type(self).__name__}: {first_line(e)}") from None
        sizes = {int(t.shape[0]) for t in tf.nest.flatten((x, y))}
        if sizes == {0}:
            raise ValueError(f"{type(self).__name__}: probe_data has no samples (it needs at least one)")
        if len(sizes) > 1:
            raise ValueError(f"{type(self).__name__}: probe_data's arrays have different numbers of "
                             f"rows ({', '.join(map(str, sorted(sizes)))}); x and y must have one row per sample")
        return x, y

    def build_on_probe(self) -> None:
        """Create a subclassed model's variables (Keras builds it only at its first step) by running
        it on one probe row, for a diagnostic that needs them in ``on_train_begin``."""
        model = self.model
        if model.trainable_variables or model.non_trainable_variables:
            return
        x, _ = self.probe_batch()
        try:
            model(tf.nest.map_structure(lambda t: t[:1], x), training=False)
        except Exception as e:
            raise ValueError(f"{type(self).__name__}: probe_data does not fit the model: {first_line(e)[:300]}") from None
        if not model.trainable_variables:
            raise ValueError(f"{type(self).__name__}: {model.name!r} has no trainable variables")

    def check_probe_batch(self, model, x, y) -> None:
        """Raise a one-line ``ValueError`` when the probe batch does not fit ``model`` and (if
        :attr:`probe_needs_loss`) its loss (run eagerly on its first two rows, before anything is
        compiled). A model compiled without a loss is refused as such, not blamed on the data."""
        head = tf.nest.map_structure(lambda t: t[:2], (x, y))
        if self.probe_needs_loss and getattr(model, "_compile_loss", None) is None and not _overrides_compute_loss(model):
            raise ValueError(f"{type(self).__name__} needs the model's loss on the probe batch, and "
                             f"{model.name!r} was compiled without one (compile(loss=...))")
        try:
            y_pred = model(head[0], training=False)
            if self.probe_needs_loss:
                probe_loss(model, head[0], head[1], y_pred)
        except Exception as e:  # the model's or the loss's own message, shortened to one line
            raise ValueError(f"{type(self).__name__}: probe_data does not fit the model or its loss: "
                             f"{first_line(e)[:300]}") from None

    # ---- Keras hooks: schedule and dispatch ---------------------------------------------------
    def set_model(self, model):
        super().set_model(model)
        self._in_fit = True  # Keras calls this when fit starts (whatever a subclass's on_train_begin does)
        self._began = False

    def on_train_begin(self, logs=None):
        self._began = True
        self._last_step = self.current_step()
        self._epoch_start_step = None
        model = self.model
        self._tap_key = None
        if isinstance(model, GradlabModel) and self.uses_tap:
            key = self._tap_key_for()
            if key in model.tap_keys and model.tap_is_current(key) and self._step_writer_current(model, key):
                self._tap_key = key  # attached by an earlier fit: no retrace
                model.read_tap(key)  # start a fresh window
            else:
                tap = self.make_tap(model)
                if tap is not None:
                    self._tap_key = key
                    model.register_tap(key, tap)
                    model.make_train_function(force=True)
            if self._tap_key is not None:
                model.arm_step_write(key, True)  # the step writes its StepWrite during this fit only
        if self.wants_probe(model):
            self._probe_batch = self.probe_batch()
            if self._probe_fn is None or self._probe_model is not model:  # compiled once per model
                self.check_probe_batch(model, *self._probe_batch)
                self._probe_model, self._probe_fns = model, {}
                self._probe_fn = self._compiled_probe({})
            # Step 0, or a due step this diagnostic has not probed yet: another fit of the same
            # model starting where the last one ended (which probed it) would write it twice.
            if self._last_step % self.every == 0 and self._probed != (id(model), self._last_step):
                self._run_probe(self._last_step)

    def _tap_key_for(self) -> str:
        return f"{type(self).__name__}@{id(self)}"

    def _step_writer_current(self, model, key: str) -> bool:
        """Whether tap ``key``'s compiled step writes (if at all) with the writer this diagnostic
        holds now: one released and closed since is replaced by a new one, and the tap is made
        again."""
        write = model.tap_step_write(key)
        return write is None or write.writer is self.tap_writer()

    def on_train_batch_end(self, batch, logs=None):
        if not self._began and not self._warned_no_begin:
            self._warned_no_begin = True
            warnings.warn(f"{type(self).__name__}.on_train_begin did not call super().on_train_begin(logs): its "
                          "schedule, tap and probe were not set up, so it writes nothing in this fit", RuntimeWarning,
                          stacklevel=2)
        now = self.steps_done(batch)
        prev, self._last_step = self._last_step, now
        if now <= prev:
            return
        every = self.every
        if self._tap_key is not None:
            last_due = ((now - 1) // every) * every
            if last_due >= prev:  # a due step in [prev, now)
                values = self.model.read_due(self._tap_key)
                step = values["due_step"] if values["due_step"] >= 0 else last_due
                self.write_tap(step, values)
        if self._probe_fn is not None and (now // every) * every > prev:  # a due step in (prev, now]
            self._run_probe(now)
        if self._pending or self._pending_histograms:
            self.flush_scalars()

    def detach(self) -> None:
        """Remove this diagnostic's tap from its model (taps stay attached between ``fit`` calls)."""
        model = getattr(self, "model", None)
        if isinstance(model, GradlabModel):
            model.remove_tap(self._tap_key_for())
        self._tap_key = None
        self.release_tap_writer()

    def release_tap_writer(self) -> None:
        """Release the writer of :meth:`tap_writer`, keeping the tap attached. Taps write with it
        only during the fits this diagnostic is part of (it disarms them at the end of each, and
        here), so a closed writer is never used; the next fit with this diagnostic makes its tap
        again with a writer of its own. No change to the model's variables (under a multi-worker
        strategy, making one is a collective op the other workers must match): what a run does
        when training ends or fails."""
        model = getattr(self, "model", None)
        if isinstance(model, GradlabModel):
            model.arm_step_write(self._tap_key_for(), False)
        if self._tap_writer is not None:
            self._tap_writer = None
            summaries.release_writer(self.log_dir)

    def _compiled_probe(self, options: dict):
        """:meth:`probe` with ``options``, compiled once per model and set of options."""
        key = tuple(sorted(options.items()))
        fn = self._probe_fns.get(key)
        if fn is None:
            model = self._probe_model
            # A partial, not a lambda: TensorFlow counts retracing per code object, so the lambdas of
            # several diagnostics (one trace each) would add up to a bogus "frequent retracing" warning.
            fn = self._probe_fns[key] = tf.function(functools.partial(self.probe, model, **options),
                                                    reduce_retracing=True, autograph=self.probe_autograph)
        return fn

    def _run_probe(self, step: int) -> None:
        self._probed = (id(self._probe_model), step)
        x, y = self._probe_batch
        out = self._compiled_probe(self.probe_options(step))(x, y)
        self.write_probe(step, {k: np.asarray(v) for k, v in out.items()})
        self.flush_scalars()

    def on_train_end(self, logs=None):
        if self._tap_key is not None and isinstance(self.model, GradlabModel):
            # Flush the last, partial window (the steps after the last due step), labelled with
            # the last step it holds, so that no step goes unseen at the end of training either.
            values = self.model.read_tap(self._tap_key)
            if values["count"] > 0:
                # (a due step the step wrote itself has its own window there already)
                labelled = values["due_step"] >= 0 and not values["due_written_in_step"]
                self.write_tap(values["due_step"] if labelled else max(self._last_step - 1, 0), values)
            # The tap stays attached, so another fit with this callback does not retrace the step;
            # detach() removes it. Its step writes nothing until then.
            self.model.arm_step_write(self._tap_key, False)
        self.flush_scalars()
        self._in_fit = False
        if self._tap_writer is not None:  # what the step wrote (held open for the attached tap)
            self._tap_writer.flush()
        if self._writer is not None:
            summaries.release_writer(self.log_dir)
            self._writer = None


def probe_loss(model, x, y, y_pred) -> tf.Tensor:
    """``model.compute_loss`` on a probe batch, leaving the training metrics as they were.

    Keras's compiled loss also records each output's loss in a metric (``<output>_loss`` of a
    multi-output model); a probe between two steps would otherwise enter those epoch means.
    """
    metrics = list(getattr(getattr(model, "_compile_loss", None), "metrics", None) or [])
    saved = [[tf.identity(v) for v in m.variables] for m in metrics]
    loss = model.compute_loss(x=x, y=y, y_pred=y_pred, training=False)
    with tf.control_dependencies([loss]):
        for m, values in zip(metrics, saved):
            for v, value in zip(m.variables, values):
                v.assign(value)
    return loss


def _overrides_compute_loss(model) -> bool:
    """Whether ``model``'s class defines its own ``compute_loss`` (then it may need no compiled loss)."""
    return type(model).compute_loss is not keras.Model.compute_loss


def _count(model, attr: str) -> int | None:
    """How many inputs/outputs ``model`` has (None when Keras does not know yet)."""
    try:
        return len(getattr(model, attr))
    except Exception:  # a subclassed or not yet built model
        return None


def _take_rows(data, n: int, count: int | None, name: str):
    """The first ``n`` rows of ``data``: one array, or a list/tuple/dict of arrays for a model
    with several inputs or outputs (a list is one array when the model has a single one). When
    the count is unknown (a subclassed model), a list/tuple whose items are all arrays or tensors
    is several of them, as Keras's ``fit`` reads it."""
    several = "inputs" if name == "x" else "outputs"

    def rows(a):
        try:
            a = a if tf.is_tensor(a) else np.asarray(a)
        except ValueError:  # ragged nested lists
            a = None
        if a is None or a.dtype == object or a.ndim == 0:
            raise ValueError(f"probe_data's {name} must be an array with one row per sample (or a "
                             f"list/dict of such arrays for a model with several {several})")
        return tf.convert_to_tensor(a[:n])

    if isinstance(data, dict):
        return {k: rows(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)) and (count is not None and count > 1 or count is None and data and all(
            tf.is_tensor(v) or isinstance(v, np.ndarray) for v in data)):
        return type(data)(rows(v) for v in data)
    return rows(data)
