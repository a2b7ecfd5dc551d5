"""The compiled custom GradientTape train step, and the in-step *taps* diagnostics plug into.

:class:`GradlabModel` is a Keras 3 ``Model`` (usable as a functional model) whose
``train_step`` follows Keras's own TensorFlow step -- ``compute_loss``,
``optimizer.scale_loss``, ``tape.gradient``, ``optimizer.apply`` -- and, in the same compiled
graph, runs the registered taps on the real gradients.

A tap (:class:`Tap`) is a pair of pure tensor functions of :class:`TapInputs`:

* ``every_step(inputs) -> {name: scalar}`` (or a :class:`TapVector`) runs on every step. Each
  scalar is kept in accumulators over a *window* of steps: ``last``, ``mean``, ``max`` and
  ``min`` (in float64: a sum of float32 values does not overflow, and integers such as step
  numbers stay exact to 2^53). A spike between two writes therefore shows up in the window
  ``max``.
* ``on_due(inputs) -> {name: tensor}`` runs only on steps where ``step % every == 0`` (inside a
  :func:`lazy_cond`); its outputs (any shape) are stored with the step they were computed at,
  together with the tap's window as it stands at that step, and the window starts again. So a
  due step's window is exactly the steps since the previous due step, also with
  ``steps_per_execution > 1``.

Both must be XLA-safe: no summary ops, no Python side effects, no variable creation. (A tap
can still have its due step write scalars to TensorBoard: :class:`StepWrite` names them, and the
step writes them where it can.)
The Python side (a callback) takes a due step's outputs and window with
:meth:`GradlabModel.read_due` (with one replica they come with the execution's results: no
variable read) and the live window with :meth:`GradlabModel.read_tap` (which also resets it:
the window of a tap without ``on_due`` is the steps since the last read).

Cost. What a tap adds to a step not due is its ``every_step`` math plus one update of the
window accumulator that all taps share (one variable read and one assignment per step, however
many taps and scalars). With one replica, an execution in which no tap is due runs a *plain*
variant of the step, compiled without any due-step work (see
:meth:`GradlabModel.make_train_function`). In the full step the due-step work sits in
:func:`lazy_cond` branches, which stay functional ``If`` ops: a step that is not due runs no op
of them. (``tf.cond``'s default lowering to ``Switch``/``Merge`` makes the executor visit every
op of the untaken branch; for gradient_stats that was ~1 ms on a ~10 ms CPU step.) A tap due
on every step (``every: 1``) runs without a branch.

Step numbering: the step of a gradient is the optimizer's iteration count *before* the
update it produces, so step 0 describes the initial weights. A step skipped because of
NaN/Inf (``nonfinite`` with ``skip_step``, or the mixed-precision loss scaler) still counts
as a step, so TensorBoard steps never repeat.
"""

from __future__ import annotations

import collections.abc
import contextlib
import copy
import dataclasses
import functools
import weakref
from typing import Callable, Mapping

import keras
import numpy as np
import tensorflow as tf

from gradlab import summaries


@dataclasses.dataclass
class TapInputs:
    """What a tap sees inside the step. Gradients are unscaled (loss scaling undone) float32.

    Attributes:
        step: int64 scalar, the iteration count before this step's update.
        loss: float32 scalar, the loss that was minimised (unscaled, not divided by replicas).
        grads: one float32 gradient per trainable variable (``None`` never appears: a variable
            the loss does not depend on gets zeros).
        variables: the trainable variables, in the same order.
        logits: the model output of this step.
        logits_grad: d loss / d logits for this batch.
        updates: ``w_after - w_before`` per variable when a tap asked for them, else ``None``:
            the update the optimizer applied. A sequence built where it is read; its
            ``squared_norm(i)`` is ``sum(updates[i]^2)``, computed without building ``updates[i]``
            where that is cheaper. With one device and an optimizer whose every write
            to the weights goes through its ``assign_add``/``assign_sub`` (SGD, momentum, Adam,
            RMSprop, ...: :func:`update_capture_supported`) it is the tensor the optimizer wrote,
            recorded as it wrote it (no weight copy); otherwise the difference of the weights
            after the update and a float32 copy taken before it.
        weights_before: the float32 weights before this step's update when a tap asked for
            updates, else ``None`` (``variables`` hold the weights after it).
        weight_squared_norms_before: when the updates are recorded (see ``updates``),
            ``[sum(w_i^2)]`` of the weights before the update (float32 ``[len(variables)]``,
            computed before it on due steps); else ``None`` (read ``weights_before``).
        layer_inputs, pre_activation_grads: when a tap asked for them (``needs_layers``) and the
            model is a :func:`dense_chain` on one device, trained without sample weights: per
            ``Dense`` layer, its input ``A_l`` (``[B, in]``) and ``d loss / d z_l`` at its
            pre-activation ``z_l = A_l W_l + b_l`` (``[B, units]``, loss scaling undone);
            otherwise ``None``.
        overflow: with a ``LossScaleOptimizer`` (mixed_float16), a boolean scalar: this step's
            scaled gradients overflowed, so the optimizer skips its update and lowers its scale
            (routine, not the model's fault); ``None`` without loss scaling.
    """

    step: tf.Tensor
    loss: tf.Tensor
    grads: list
    variables: list
    logits: tf.Tensor
    logits_grad: tf.Tensor
    updates: list | None = None
    weights_before: list | None = None
    layer_inputs: list | None = None
    pre_activation_grads: list | None = None
    overflow: tf.Tensor | None = None
    weight_squared_norms_before: tf.Tensor | None = None

    @functools.cached_property
    def squared_norm_vector(self) -> tf.Tensor:
        """``[sum(g_i^2)]`` over the gradients (float32 ``[len(grads)]``), computed once per step and
        shared by every tap.

        ``2 * tf.nn.l2_loss(g)``: one fused pass per gradient, no ``g^2`` temporary.
        """
        return 2.0 * tf.stack([tf.nn.l2_loss(g) for g in self.grads])

    @functools.cached_property
    def squared_norms(self) -> list:
        """:attr:`squared_norm_vector` as a list of scalars."""
        return tf.unstack(self.squared_norm_vector, num=len(self.grads))


class TapVector(collections.abc.Mapping):
    """``every_step`` outputs given as one vector: output ``names[i]`` is ``vector[i]``.

    Return one from :attr:`Tap.every_step` instead of a dict of scalars to fold many values
    into the window with no op per value (on a CPU each small op costs a few microseconds a step).
    """

    def __init__(self, names, vector):
        self.names = list(names)
        if len(set(self.names)) != len(self.names):
            raise ValueError(f"TapVector: names must be unique, got {self.names}")
        self.vector = vector

    def __getitem__(self, name):
        return self.vector[self.names.index(name)]

    def __iter__(self):
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)


@dataclasses.dataclass(frozen=True)
class Tap:
    """An in-step diagnostic: see the module docstring."""

    every_step: Callable[[TapInputs], Mapping[str, tf.Tensor]] | None = None
    #: Outputs computed at due steps only. A tap with due outputs also has its window captured in
    #: the step at each due step, so with ``steps_per_execution > 1`` a write covers exactly the
    #: steps since the previous due step; a window-only tap is read after the execution (its window
    #: then runs to the execution's last step). ``StepMetrics`` returns its loss here for that reason.
    on_due: Callable[[TapInputs], Mapping[str, tf.Tensor]] | None = None
    every: int = 1
    needs_updates: bool = False
    #: An ``every_step`` output whose window max comes back with every execution's results, so
    #: that :meth:`GradlabModel.tap_signal` can check it with no variable read (e.g. "a
    #: nonfinite step happened").
    signal: str | None = None
    #: Ask for :attr:`TapInputs.layer_inputs` and :attr:`TapInputs.pre_activation_grads` (the
    #: step then runs the model's Dense chain itself, op for op as ``Dense.call``).
    needs_layers: bool = False
    #: Fold in the steps a ``LossScaleOptimizer`` skips because its scaled gradients overflowed
    #: (:attr:`TapInputs.overflow`). By default a tap's window and due outputs leave them out:
    #: their gradients are Inf/NaN by construction of the scale, not a property of the model.
    sees_overflow_steps: bool = False
    #: Scalars the step writes to TensorBoard itself at each due step (:class:`StepWrite`), in
    #: the compiled graph, where the step allows it (see :class:`StepWrite`).
    step_write: "StepWrite | None" = None


@dataclasses.dataclass(frozen=True)
class StepWrite:
    """What a tap's due step writes to TensorBoard from inside the compiled step.

    * ``writer``: a ``tf.summary`` file writer (it must stay open while the tap is attached: the
      compiled step captures it);
    * ``due``: ``{due output name: tag}`` for scalar ``on_due`` outputs;
    * ``window``: ``(every_step name, stat, tag)`` with ``stat`` one of ``last, mean, max, min``,
      from the window captured at the due step (the steps since the previous due step).

    All of them go out as one ``Summary`` at the due step
    (:func:`gradlab.summaries.write_scalars_in_graph`), with no Python after the step. This
    happens only where the step can do it: one replica, no ``tf.distribute`` strategy, not
    compiled with XLA (:attr:`GradlabModel.step_writes_supported`), and while the tap is armed
    (:meth:`GradlabModel.arm_step_write`: a :class:`~gradlab.callbacks.Diagnostic` arms its tap
    for the fits it is part of, so a later fit without it writes nothing). Elsewhere nothing is
    written in the step and the callback writes as usual: :meth:`GradlabModel.read_due` says
    which (``"due_written_in_step"``, ``"window_written_in_step"``).
    """

    writer: object
    due: Mapping[str, str] = dataclasses.field(default_factory=dict)
    window: tuple = ()


def lazy_cond(pred, true_fn: Callable, false_fn: Callable):
    """``tf.cond(pred, true_fn, false_fn)`` whose untaken branch costs nothing.

    Inside a ``tf.function`` (not compiled with XLA), TensorFlow lowers ``tf.cond`` to
    ``Switch``/``Merge`` ops so that branch ops can start as their inputs arrive; the price is
    that the executor still visits every op of the untaken branch (as a dead tensor) on every
    step. For rarely-taken branches with many ops -- a diagnostic's due-step work -- that is
    most of its cost. This keeps the ``If`` op functional: the taken branch runs as one function
    call and the other not at all. Under XLA and in eager mode it is plain ``tf.cond``.

    The outputs must be tensors (not ``None``); branches may assign variables.

    With a GPU visible it is plain ``tf.cond``, TensorFlow's own default there: both forms read
    the predicate on the host (the GPU ``Switch`` kernel keeps it in host memory, as ``If``
    does), and on a GPU the executor's visit of dead ops is cheap next to kernel launches while
    a functional ``If`` adds a function call. Reasoned, not measured on a GPU.
    """
    out = tf.cond(pred, true_fn, false_fn)
    if not tf.executing_eagerly() and not _gpu_visible():
        for t in tf.nest.flatten(out):
            op = t.op
            if op.type == "Identity" and op.inputs:  # cond_v2 wraps the If outputs in Identity ops
                op = op.inputs[0].op
            if op.type in ("If", "StatelessIf"):
                from tensorflow.core.framework import attr_value_pb2

                op._set_attr("_lower_using_switch_merge", attr_value_pb2.AttrValue(b=False))
                break
    return out


@functools.lru_cache(maxsize=None)
def _gpu_visible() -> bool:
    return bool(tf.config.list_logical_devices("GPU"))


def _float32_scalar(value) -> tf.Tensor:
    """``value`` as a float32 scalar tensor, adding no op when it is one already (a due step
    stacks dozens of them)."""
    value = tf.convert_to_tensor(value)
    if value.shape.rank != 0:
        value = tf.reshape(value, [])
    return value if value.dtype == tf.float32 else tf.cast(value, tf.float32)


class _Lazy(collections.abc.Sequence):
    """Per variable, a tensor built by ``build(i)`` where a tap reads it: inside its due-step
    branch, so the other steps pay nothing (the updates, the weights before them).

    :meth:`squared_norm` gives ``sum(x_i^2)`` without building ``x_i`` where ``squared_norm``
    (given) knows a cheaper way."""

    def __init__(self, n: int, build: Callable, squared_norm: Callable | None = None):
        self.n, self.build, self._squared_norm = n, build, squared_norm

    def squared_norm(self, i: int) -> tf.Tensor:
        """``sum(self[i]^2)`` as a float32 scalar."""
        if self._squared_norm is not None:
            return self._squared_norm(i)
        return 2.0 * tf.nn.l2_loss(tf.cast(self[i], tf.float32))

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(self.n)[i]]
        return self.build(range(self.n)[i])


class _UpdateCapture:
    """Record the updates a Keras optimizer applies, as it applies them, instead of copying the weights.

    While active, the optimizer's ``assign_add``/``assign_sub`` (which every built-in Keras
    optimizer's ``update_step`` goes through) are wrapped so that, per trainable variable, the
    tensor added or subtracted is kept: ``delta = sum(added) - sum(subtracted)`` is the update
    the optimizer applied (exact: the tensor it wrote, before rounding into the weight). No
    weight copy is made: a snapshot of the weights costs a copy of every trainable variable
    (memory and, on a CPU, ~0.4 ms per due step for a 670k-parameter MLP) plus a pass to
    subtract it.

    It is only used when :func:`update_capture_supported` has shown, on a trial trace of the
    optimizer's ``apply``, that those two methods are the *only* writes to every trainable
    variable: no ``assign`` (constraints, EMA overwrite), no direct ``tf.Variable`` write
    (Keras's weight decay), no write inside a nested function (gradient accumulation, the loss
    scaler's conditional apply), and every weight is float32 or float64 (into a bfloat16 or
    float16 weight an update is rounded, and much of a small one lost: the recorded tensor would
    not be the change). Otherwise the step falls back to the weight snapshot. A sparse update (an
    Embedding's rows, written by a scatter) is recorded as the dense sum of its rows.
    """

    def __init__(self, optimizer, variables):
        self.optimizer = optimizer
        self.keys = {optimizer._var_key(v): i for i, v in enumerate(variables)}
        self.added: list[list] = [[] for _ in variables]

    def _record(self, variable, value, sign):
        i = self.keys.get(self.optimizer._var_key(variable))
        if i is None:
            return  # an optimizer variable (moments), not a trainable weight
        if isinstance(value, tf.IndexedSlices):  # an Embedding's rows, written by a scatter
            rows = int(variable.shape[0])
            # Summed per row, as the scatter adds repeated rows (built here, where the write is:
            # on a due step, or in the apply branch; a pass over the table).
            value = tf.math.unsorted_segment_sum(tf.cast(value.values, tf.float32), value.indices, rows)
        self.added[i].append((sign, tf.cast(value, tf.float32)))

    def __enter__(self):
        opt = self.optimizer
        add, sub = opt.assign_add, opt.assign_sub

        def assign_add(variable, value):
            self._record(variable, value, 1.0)
            return add(variable, value)

        def assign_sub(variable, value):
            self._record(variable, value, -1.0)
            return sub(variable, value)

        opt.assign_add, opt.assign_sub = assign_add, assign_sub  # instance attributes shadow the methods
        return self

    def __exit__(self, *exc):
        del self.optimizer.assign_add, self.optimizer.assign_sub

    def values(self) -> list:
        """The recorded tensors, flat (what a branch that applied the update returns)."""
        return [value for parts in self.added for _, value in parts]

    def deltas(self, variables, values=None) -> "_Lazy":
        """Per variable, the float32 update applied: ``sum(added) - sum(subtracted)`` (zeros for
        a variable the optimizer left alone), built where it is read, so a step that is not due
        pays no pass for it. ``values``: :meth:`values` as they came out of a branch."""
        values = iter(self.values() if values is None else values)
        signed = [[(sign, next(values)) for sign, _ in parts] for parts in self.added]
        variables = list(variables)

        def build(i):
            delta = None
            for sign, value in signed[i]:
                term = value if sign > 0 else -value
                delta = term if delta is None else delta + term
            return tf.zeros(variables[i].shape, tf.float32) if delta is None else tf.reshape(delta, variables[i].shape)

        def squared_norm(i):
            # One write (SGD's assign_sub, Adam's, ...): its sign does not change the norm, so
            # no negated copy of the update is made.
            if len(signed[i]) == 1:
                return 2.0 * tf.nn.l2_loss(signed[i][0][1])
            return 2.0 * tf.nn.l2_loss(build(i))

        return _Lazy(len(variables), build, squared_norm)


_WRITES = {"AssignAddVariableOp", "AssignSubVariableOp"}


def update_capture_supported(optimizer, variables) -> tuple[bool, str]:
    """Whether :class:`_UpdateCapture` sees every write ``optimizer.apply`` makes to ``variables``.

    Traces ``apply`` once on zero gradients (a trace only: nothing runs, no state changes) with
    the capture active, and compares, per variable, the recorded ``assign_add``/``assign_sub``
    calls with the ops of the traced graph that use the variable's handle: every such op must be
    a read or one of the recorded writes, all in the same graph. Returns ``(ok, reason)``.
    """
    variables = list(variables)
    for v in variables:  # the recorded tensor is the update before it is rounded into the weight
        if v.dtype not in ("float32", "float64", tf.float32, tf.float64):
            return False, (f"variable {v.name} is {getattr(v.dtype, 'name', v.dtype)}: an update rounds into it, "
                           "so only the weights' change says what was applied")
    report: dict = {}

    def trial():
        grads = [tf.zeros(v.shape, v.dtype) for v in variables]
        with _UpdateCapture(optimizer, variables) as capture:
            optimizer.apply(grads, variables)
        report["capture"] = capture
        report["graph"] = tf.compat.v1.get_default_graph()
        return tf.constant(0)

    try:
        tf.function(trial, autograph=False).get_concrete_function()
    except Exception as err:  # noqa: BLE001 - any failure means: use the snapshot
        return False, f"the trial trace failed ({type(err).__name__})"
    capture, graph = report["capture"], report["graph"]
    internal = {id(ext): inner for ext, inner in graph.captures}
    for i, v in enumerate(variables):
        handle = internal.get(id(getattr(v, "value", v).handle))
        if handle is None:
            return False, f"variable {v.name} is not used by the optimizer's apply"
        writes = 0
        for consumer in handle.consumers():
            if consumer.type == "ReadVariableOp":
                continue
            if consumer.type not in _WRITES:
                return False, f"variable {v.name} is written by a {consumer.type} op"
            writes += 1
        recorded = capture.added[i]
        if writes != len(recorded) or any(value.graph is not graph for _, value in recorded):
            return False, f"variable {v.name} has writes the capture does not see"
    return True, ""


_ON_READ = dict(trainable=False, synchronization=tf.VariableSynchronization.ON_READ,
                aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)
# ON_READ: each replica updates its own copy with no cross-replica sync (the tap values are
# computed from the global gradient, identical on every replica; an ON_WRITE assignment would
# need a merge_call, which the due-step branches cannot contain); reads and checkpoints take
# the first replica's copy.


class _LossMean(keras.metrics.Mean):
    """Keras's loss tracker, except that the mean of no steps is NaN, not 0: an epoch whose every
    step was skipped as nonfinite (weight 0) has no loss, and must not look perfect."""

    def result(self):
        return tf.where(self.count > 0, super().result(), tf.constant(np.nan, self.dtype))


class _Snapshot:
    """Float32 copies of the trainable variables taken before an update (plain object: untracked)."""

    def __init__(self, variables):
        self.values = [tf.Variable(tf.zeros(v.shape, tf.float32), **_ON_READ) for v in variables]


class _TapState:
    """One tap: its columns in the shared window and its due-step output variables.

    A plain object, so Keras and tf.train.Checkpoint don't track it. The window columns are
    ``[lo, hi)`` of :attr:`GradlabModel._gradlab_window`: one per ``every_step`` scalar, in
    :attr:`window_names` order, then one that counts the steps of the window.
    """

    def __init__(self, tap: Tap, window_names: list[str], due_specs: dict[str, tf.TensorShape]):
        self.tap = tap
        self.window_names = window_names
        self.lo = self.hi = 0
        self.reset_at = 0  # train-function executions before the last read_tap reset
        # Scalar due outputs live in one vector (one assignment in the step, one tensor to read);
        # the others in a variable each.
        self.due_scalar_names = [name for name, shape in due_specs.items() if shape.rank == 0]
        self.due_scalars = tf.Variable(tf.zeros([len(self.due_scalar_names)]), **_ON_READ)
        self.due = {name: tf.Variable(tf.zeros(shape), **_ON_READ)
                    for name, shape in due_specs.items() if shape.rank != 0}
        self.due_step = tf.Variable(-1, dtype=tf.int64, **_ON_READ)
        # A tap with due outputs gets its window captured (and restarted) at its due steps, in
        # the step itself: the window written with the due outputs is exactly the steps since the
        # previous due step, also with steps_per_execution > 1.
        self.has_due = bool(tap.on_due) and bool(due_specs)
        self.captured = tf.Variable(_empty_window(self.width), **_ON_READ) if self.has_due else None
        self.consumed = -1  # the last due step handed to Python (read_due / read_tap)
        self.variable_ids: tuple = ()  # the trainable variables it was made for (register_tap)
        self.signal_index: int | None = None  # set by GradlabModel._layout_window
        # Whether the full step, as last traced, writes the tap's StepWrite itself (train_step).
        self.writes_in_step = False
        # Whether it does so now: set by GradlabModel.arm_step_write (a diagnostic arms it for the
        # fits it is part of). Made by register_tap where the step can write at all.
        self.step_write_armed = None
        self.armed = False  # its value, as last set
        self._read_fns: dict = {}

    @property
    def step_writes_now(self) -> bool:
        """Whether the step writes the tap's :class:`StepWrite` scalars itself: it was traced to,
        and the tap is armed."""
        return self.writes_in_step and self.armed

    @property
    def width(self) -> int:
        return len(self.window_names) + 1


class _Window:
    """The shared window variable and the last signals (a plain object: Keras does not track it)."""

    def __init__(self):
        self.var = None
        # What the last execution brought back with its results, and its index:
        # ({_SIGNALS: window maxima of the taps' signals, _DUE: {tap key: (due_step, due_scalars,
        # captured window, {name: due value})}}, execution index).
        self.returned = None
        self.executions = 0  # train-function executions so far
        # Execution-level schedule (one replica): the step the next execution starts at, from the
        # last execution's results (None: read the optimizer's count), and whether the step being
        # traced is the plain variant (no tap due in the whole execution: no due-step work in it).
        self.next_step: int | None = None
        self.plain = False
        self.plain_executions = 0  # executions that ran the plain variant (for tests and benchmarks)
        # ((optimizer, trainable variable ids), update_capture_supported's answer) for the last check
        self.capture_checked: tuple = ((lambda: None, ()), (False, ""))


def _empty_window(columns: int) -> np.ndarray:
    """Rows ``last, sum, max, min`` of an empty window: 0, 0, -inf, +inf."""
    return np.stack([np.zeros(columns), np.zeros(columns), np.full(columns, -np.inf),
                     np.full(columns, np.inf)]).astype(np.float64)


class GradlabModel(keras.Model):
    """A Keras model whose ``train_step`` is gradlab's GradientTape step with diagnostics taps.

    Build it like a functional model, ``GradlabModel(inputs, outputs)``; the output must be the
    logits. Everything Keras offers (``compile``, ``fit``, callbacks, ``save_weights``) works as
    usual. Extra attribute:

    * ``skip_nonfinite_steps``: when true, a step whose loss or gradients are NaN/Inf applies
      no update (set by ``NonFiniteGuard(action="skip_step")`` before training).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._gradlab_taps: dict[str, _TapState] = {}
        self._gradlab_window_holder = _Window()
        self.skip_nonfinite_steps = False
        self._gradlab_snapshot = None
        self._gradlab_update_mode = None  # see _prepare_updates
        self._gradlab_update_capture_refused = ""

    def compile(self, *args, **kwargs):
        super().compile(*args, **kwargs)
        self._loss_tracker = _LossMean(name="loss")

    # ---- taps -------------------------------------------------------------------------------
    def register_tap(self, key: str, tap: Tap) -> None:
        """Add (or replace) the tap ``key``; the train function is retraced at the next ``fit``.

        Must be called outside ``fit``'s compiled function (``Callback.set_model`` is a good
        place). The model must be built.
        """
        variables = list(self.trainable_variables)
        if not variables:
            raise ValueError("register_tap: the model has no trainable variables; build it first")
        out_units = int(self.outputs[0].shape[-1])
        probe = TapInputs(
            step=tf.constant(0, tf.int64), loss=tf.constant(0.0),
            grads=[tf.zeros(v.shape, tf.float32) for v in variables], variables=variables,
            logits=tf.zeros([2, out_units]), logits_grad=tf.zeros([2, out_units]),
            updates=_Lazy(len(variables), lambda i: tf.zeros(variables[i].shape, tf.float32)) if tap.needs_updates else None,
            weights_before=[tf.zeros(v.shape, tf.float32) for v in variables] if tap.needs_updates else None)
        if tap.needs_layers:
            chain = dense_chain(self)
            if chain is None:
                raise ValueError(f"tap {key!r} needs layer inputs, which only a chain of float32 Dense layers "
                                 "provides (see gradlab.train_step.dense_chain)")
            probe.layer_inputs = [tf.zeros([2, int(ly.kernel.shape[0])]) for ly in chain]
            probe.pre_activation_grads = [tf.zeros([2, int(ly.kernel.shape[1])]) for ly in chain]
        every_step = tap.every_step(probe) if tap.every_step else {}
        window = list(every_step)
        if tap.signal is not None and tap.signal not in window:
            raise ValueError(f"tap {key!r}: signal {tap.signal!r} is not one of its every_step outputs {window}")
        if isinstance(every_step, TapVector):
            shape = tf.convert_to_tensor(every_step.vector).shape
            if shape.rank != 1 or shape[0] != len(window):
                raise ValueError(f"tap {key!r}: its TapVector has {len(window)} names but a vector of shape {shape}")
        else:
            for name, value in every_step.items():
                if tf.convert_to_tensor(value).shape.rank != 0:
                    raise ValueError(f"tap {key!r}: every_step output {name!r} must be a scalar")
        due = {name: tf.convert_to_tensor(v).shape for name, v in (tap.on_due(probe).items() if tap.on_due else ())}
        if tap.step_write is not None:
            _check_step_write(key, tap.step_write, window, due)
        strategy = self.distribute_strategy
        with strategy.scope():
            self._gradlab_taps.pop(key, None)  # a replaced tap starts a new window
            self._gradlab_taps[key] = _TapState(tap, window, due)
            self._gradlab_taps[key].variable_ids = tuple(id(v) for v in variables)
        if tap.step_write is not None and self.step_writes_supported:
            # (no strategy here, so the variable is no collective op other workers must match)
            self._gradlab_taps[key].step_write_armed = tf.Variable(False, trainable=False)
        self._layout_window()
        self.train_function = None  # retrace with the new tap

    @property
    def step_writes_supported(self) -> bool:
        """Whether the compiled step can write a tap's :class:`StepWrite` itself: no
        ``tf.distribute`` strategy (each replica would write) and no XLA (no kernel for the
        string and summary ops)."""
        return self._distribute_strategy is None and not tf.distribute.has_strategy() and not self.jit_compile

    def arm_step_write(self, key: str, armed: bool) -> None:
        """Let tap ``key``'s step write its :class:`StepWrite` scalars (``armed``), or not. A
        disarmed step does not touch the writer (its write sits in a branch not taken), so the
        writer may be closed meanwhile. No-op for a tap whose step cannot write."""
        state = self._gradlab_taps.get(key)
        if state is not None and state.step_write_armed is not None:
            state.step_write_armed.assign(armed)
            state.armed = armed

    def tap_step_write(self, key: str) -> "StepWrite | None":
        """The :class:`StepWrite` tap ``key`` was registered with (None if none or no such tap)."""
        state = self._gradlab_taps.get(key)
        return None if state is None else state.tap.step_write

    def remove_tap(self, key: str) -> None:
        """Remove the tap ``key`` if present."""
        if self._gradlab_taps.pop(key, None) is not None:
            self._layout_window()
            self.train_function = None

    def _layout_window(self) -> None:
        """(Re)build the shared window variable for the current taps, keeping open windows."""
        previous = self._gradlab_window
        kept = previous.numpy() if previous is not None else None
        columns, moves, signals = 0, [], 0
        for state in self._gradlab_taps.values():
            if kept is not None and state.hi > state.lo:  # laid out before: keep its open window
                moves.append((columns, state.lo, state.hi))
            state.lo, state.hi = columns, columns + state.width
            # its position among the returned signals (train_step gathers them in this order)
            state.signal_index = signals if state.tap.signal in state.window_names else None
            signals += state.signal_index is not None
            state._read_fns.clear()  # they captured the previous variable
            columns = state.hi
        initial = _empty_window(columns)
        for lo, old_lo, old_hi in moves:
            initial[:, lo:lo + old_hi - old_lo] = kept[:, old_lo:old_hi]
        self._gradlab_window_holder.var = None
        self._gradlab_window_holder.returned = None  # laid out for the previous columns
        if columns:
            with self.distribute_strategy.scope():
                self._gradlab_window_holder.var = tf.Variable(initial, **_ON_READ)

    @property
    def _gradlab_window(self):
        """The window accumulators of every tap: ``[4, columns]`` rows last, sum, max, min (or None)."""
        return self._gradlab_window_holder.var

    def tap_variables(self) -> list:
        """Every variable the taps keep (checkpointed with a run, so a resume continues the windows)."""
        out = [self._gradlab_window] if self._gradlab_window is not None else []
        for state in self._gradlab_taps.values():
            out += [state.due_step, state.due_scalars]
            out += [state.captured] if state.captured is not None else []
            out += [state.due[name] for name in sorted(state.due)]
        return out

    def taps_restored(self) -> None:
        """Call after restoring :meth:`tap_variables` from a checkpoint: the restored due outputs
        were written by the run that saved them, so :meth:`read_tap` does not hand them out again."""
        for state in self._gradlab_taps.values():
            state.consumed = int(state.due_step.numpy())

    def _tap_due_fn(self, state: _TapState):
        """A compiled function returning a tap's due outputs and the window captured with them."""
        fn = state._read_fns.get("due")
        if fn is None:
            def read():
                return (tf.identity(state.due_step), tf.identity(state.due_scalars), tf.identity(state.captured),
                        {name: tf.identity(var) for name, var in state.due.items()})

            fn = state._read_fns["due"] = tf.function(read, autograph=False)
        return fn

    def _tap_read_fn(self, state: _TapState, reset: bool):
        """A compiled function returning a tap's window columns and due outputs (and resetting its window)."""
        fn = state._read_fns.get(reset)
        if fn is None:
            window, lo, hi = self._gradlab_window, state.lo, state.hi
            mask = np.zeros((4, window.shape[1]), bool)
            mask[1:, lo:hi] = True  # sum, max, min of this tap's columns; `last` survives a reset
            empty = _empty_window(window.shape[1])

            def read():
                acc = tf.identity(window.value())
                values = (acc[:, lo:hi], tf.identity(state.due_step), tf.identity(state.due_scalars),
                          {name: tf.identity(var) for name, var in state.due.items()})
                if reset:
                    with tf.control_dependencies(tf.nest.flatten(values)):
                        window.assign(tf.where(tf.constant(mask), tf.constant(empty), acc))
                        state.due_step.assign(-1)
                return values

            fn = state._read_fns[reset] = tf.function(read, autograph=False)
        return fn

    @property
    def tap_keys(self) -> list[str]:
        return list(self._gradlab_taps)

    def tap_is_current(self, key: str) -> bool:
        """Whether tap ``key`` was made for the model's current trainable variables (a layer frozen
        or unfrozen since changes them, and a tap's shapes and names with them)."""
        state = self._gradlab_taps.get(key)
        return state is not None and state.variable_ids == tuple(id(v) for v in self.trainable_variables)

    def read_tap(self, key: str, reset: bool = True) -> dict:
        """Read a tap's live window (numpy) and, by default, start a new one.

        Returns ``{"count": steps in window, "window": {name: {last, mean, max, min}},
        "due_step": step of the due outputs or -1, "due": {name: array}, "due_written_in_step":
        bool, "window_written_in_step": bool}`` (the last two: whether the step wrote the tap's
        :class:`StepWrite` scalars of these due outputs / of this window itself). For a tap with due
        outputs, ``due`` holds the last due step's outputs if :meth:`read_due` has not handed
        them out yet (else it is empty and ``due_step`` -1), and the window is the steps after
        that due step.

        The read (and reset) is one compiled call: reading the variables one by one in eager
        mode costs several times more per write. The window is kept in float64: its sums do
        not overflow for float32 values, and ``count`` (and a step a tap keeps as float64) is
        exact up to 2^53.
        """
        state = self._gradlab_taps[key]
        columns, due_step, due_scalars, due_values = self._tap_read_fn(state, reset)()
        due_step = int(due_step.numpy())
        if due_step <= state.consumed:
            due_step = -1
        # the due outputs (not this live window) were written by the step that made them
        values = self._tap_values(state, columns.numpy(), due_step, due_scalars, due_values,
                                  due_written=due_step >= 0 and state.step_writes_now)
        if reset:
            state.reset_at = self._gradlab_window_holder.executions
            state.consumed = -1  # the step reset its due outputs too
        return values

    def read_due(self, key: str) -> dict:
        """The outputs of tap ``key``'s last due step with the window captured at that step.

        Same layout as :meth:`read_tap`; the window is the steps after the previous due step up
        to and including this one. Each due step is handed out once: a second call (or one with
        no due step since) returns ``count`` 0, no window and ``due_step`` -1. With one replica
        the values come with the execution's results (no variable read); a tap without due
        outputs is read (and reset) with :meth:`read_tap`.
        """
        state = self._gradlab_taps[key]
        if not state.has_due:
            return self.read_tap(key)
        returned = self._returned(_DUE, state)
        if returned is not None and key in returned:
            due_step, due_scalars, captured, due_values = returned[key]
        else:
            due_step, due_scalars, captured, due_values = self._tap_due_fn(state)()
        due_step = int(due_step.numpy())
        if due_step < 0 or due_step <= state.consumed:
            return {"count": 0, "window": {}, "due_step": -1, "due": {},
                    "due_written_in_step": False, "window_written_in_step": False}
        state.consumed = due_step
        return self._tap_values(state, captured.numpy(), due_step, due_scalars, due_values,
                                due_written=state.step_writes_now, window_written=state.step_writes_now)

    def _returned(self, name: str, state: _TapState):
        """What the last execution returned under ``name`` (``_SIGNALS`` or ``_DUE``), or None when
        nothing was returned (several replicas) or it predates the tap's last reset."""
        returned = self._gradlab_window_holder.returned
        if returned is None or returned[1] < state.reset_at:
            return None
        return returned[0].get(name)

    @staticmethod
    def _tap_values(state: _TapState, columns, due_step: int, due_scalars, due_values, *,
                    due_written: bool = False, window_written: bool = False) -> dict:
        last, total, vmax, vmin = columns
        count = int(total[-1])
        window = {}
        if count:
            for i, name in enumerate(state.window_names):
                window[name] = {"last": float(last[i]), "mean": float(total[i] / count),
                                "max": float(vmax[i]), "min": float(vmin[i])}
        due = {}
        if due_step >= 0:
            due = dict(zip(state.due_scalar_names, due_scalars.numpy()))
            due.update((name, value.numpy()) for name, value in due_values.items())
        return {"count": count, "window": window, "due_step": due_step, "due": due,
                "due_written_in_step": due_written, "window_written_in_step": window_written}

    def peek_tap(self, key: str, name: str, stat: str = "max") -> float:
        """One window statistic (``last``, ``max`` or ``min``) of ``every_step`` output ``name``, without reset.

        A cheap check (one variable read) for callbacks that must look after every execution
        but only rarely need the full :meth:`read_tap`. For an empty window ``max`` is -inf,
        ``min`` +inf and ``last`` the previous window's last value.
        """
        state = self._gradlab_taps[key]
        if stat not in ("last", "max", "min"):
            raise ValueError(f"`stat` ({stat!r}) must be one of last, max, min")
        index = state.lo + state.window_names.index(name)
        row = ("last", "sum", "max", "min").index(stat)
        return float(self._gradlab_window.value().numpy()[row, index])

    def _run_taps(self, inputs: TapInputs, due_at: Callable, return_due: bool, plain: bool = False):
        """Run every tap; returns the window maxima of the taps' signals (or None) and, with
        ``return_due``, each due tap's ``(due_step, due_scalars, captured window, {name: value})``.
        ``due_at(every)`` is the step's ``step % every == 0``. ``plain``: no tap is due (no due-step work)."""
        states = list(self._gradlab_taps.values())
        window = self._gradlab_window
        signals = new = None
        due_now = {} if plain else {id(state): due_at(state.tap.every) for state in states if state.has_due}
        # A loss-scale overflow step is left out of the taps that don't see such steps: their
        # window is unchanged by it and a due step that overflowed is not captured (the next one
        # covers it).
        overflow = inputs.overflow if any(not s.tap.sees_overflow_steps for s in states) else None
        if overflow is not None:
            for state in states:
                if id(state) in due_now and not state.tap.sees_overflow_steps:
                    due_now[id(state)] = tf.logical_and(due_now[id(state)], tf.logical_not(overflow))
        if window is not None:
            # Every tap's every-step scalars and a 1 per tap (its step count) in one vector, folded
            # into the shared window with one read and one assignment.
            pieces, scalars = [], []
            for state in states:
                if state.window_names:
                    out = state.tap.every_step(inputs)
                    if isinstance(out, TapVector):
                        if scalars:
                            pieces.append(tf.stack(scalars))
                            scalars = []
                        if out.names != state.window_names:
                            raise ValueError(f"a tap's TapVector names changed after registration: "
                                             f"{state.window_names} -> {out.names}")
                        pieces.append(tf.cast(out.vector, tf.float64))
                    else:
                        for n in state.window_names:
                            value = tf.cast(out[n], tf.float64)
                            scalars.append(value if value.shape.rank == 0 else tf.reshape(value, []))
                scalars.append(tf.constant(1.0, tf.float64))
            pieces.append(tf.stack(scalars))
            vec = pieces[0] if len(pieces) == 1 else tf.concat(pieces, 0)
            acc = window.value()
            new = tf.stack([vec, acc[1] + vec, tf.maximum(acc[2], vec), tf.minimum(acc[3], vec)])
            if overflow is not None:
                blind = tf.concat([tf.fill([s.width], not s.tap.sees_overflow_steps) for s in states], 0)
                new = tf.where(tf.logical_and(overflow, blind)[tf.newaxis, :], acc, new)
            stored = new
            if due_now:  # a due tap's window is captured below and restarts (its `last` row survives)
                flags = tf.concat([tf.fill([s.width], due_now[id(s)]) if s.has_due else tf.zeros([s.width], tf.bool)
                                   for s in states], 0)
                restart = tf.logical_and(tf.constant([[False], [True], [True], [True]]), flags[tf.newaxis, :])
                stored = tf.where(restart, tf.constant(_empty_window(int(new.shape[1]))), new)
            window.assign(stored)
            columns = [state.lo + state.window_names.index(state.tap.signal)
                       for state in states if state.tap.signal in state.window_names]
            if columns:
                signals = tf.gather(new[2], columns)
        for state in states:
            tap = state.tap
            if state.has_due and not plain:
                # (set at each trace of the full step; read_due reports it. The armed variable
                # exists for taps with a StepWrite; XLA may have been switched on since.)
                state.writes_in_step = state.step_write_armed is not None and self.step_writes_supported
                def write_due(state=state, tap=tap):
                    # A shallow copy: what the branch computes first (e.g. squared_norms) is cached
                    # on the copy, never on the step's inputs, whose tensors live outside the branch.
                    out = tap.on_due(copy.copy(inputs))
                    scalars = None
                    if state.due_scalar_names:
                        scalars = tf.stack([_float32_scalar(out[name]) for name in state.due_scalar_names])
                        state.due_scalars.assign(scalars)
                    for name, var in state.due.items():
                        var.assign(tf.cast(tf.reshape(out[name], var.shape), tf.float32))
                    # Written when armed, and once per step: the count stands still while an
                    # optimizer accumulates gradients (read_due hands such a step out once too).
                    write_now = None
                    if state.writes_in_step:
                        write_now = tf.logical_and(state.step_write_armed.value(),
                                                   tf.not_equal(state.due_step.value(), inputs.step))
                    state.due_step.assign(inputs.step)
                    captured = new[:, state.lo:state.hi]
                    state.captured.assign(captured)
                    if state.writes_in_step:
                        def write(state=state, scalars=scalars, captured=captured):
                            tags, values = _step_write_values(state, scalars, captured)
                            summaries.write_scalars_in_graph(state.tap.step_write.writer, inputs.step, tags, values)
                            return tf.constant(True)

                        # A plain (lowered) tf.cond: a few dead ops when not taken, and the writer
                        # is not touched then (a disarmed tap's writer may be closed).
                        tf.cond(write_now, write, lambda: tf.constant(False))
                    return tf.constant(True)

                _when([due_now[id(state)]], write_due, lazy_cond)
        due = None
        if return_due:  # read after the assignments above (automatic control dependencies)
            due = {key: (state.due_step.value(), state.due_scalars.value(), state.captured.value(),
                         {name: var.value() for name, var in state.due.items()})
                   for key, state in self._gradlab_taps.items() if state.has_due} or None
        return signals, due

    # ---- the step ---------------------------------------------------------------------------
    def train_step(self, data):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        variables = self.trainable_variables
        optimizer = self.optimizer
        if not optimizer.built:  # so the loss scale is a variable the taps can read (first trace only)
            optimizer.build(variables)
        step = tf.cast(optimizer.iterations, tf.int64)
        replicas = tf.distribute.get_strategy().num_replicas_in_sync
        plain = self._gradlab_window_holder.plain and replicas == 1  # see make_train_function
        chain = None
        if replicas == 1 and sample_weight is None and any(
                s.tap.needs_layers and (s.tap.every_step or not plain) for s in self._gradlab_taps.values()):
            chain = dense_chain(self)
        layer_inputs, pre = None, []
        with tf.GradientTape() as tape:
            if chain is None:
                logits = self(x, training=True)
            else:  # the same ops as Dense.call, keeping each layer's input and pre-activation
                logits, layer_inputs, pre = _chain_forward(chain, x)
            loss = self.compute_loss(x=x, y=y, y_pred=logits, sample_weight=sample_weight, training=True)
            if replicas > 1:
                loss = self._replica_share(loss, x)
            scaled_loss = optimizer.scale_loss(loss)
        n_vars = len(variables)
        all_grads = tape.gradient(scaled_loss, list(variables) + [logits] + pre)
        grads, logits_grad, pre_grads = all_grads[:n_vars], all_grads[n_vars], all_grads[n_vars + 1:]
        grads = [tf.zeros_like(v) if g is None else g for g, v in zip(grads, variables)]
        y_metrics = y
        if replicas > 1:
            # One all-reduce, here: the taps, the clipping and the update all see the global gradient.
            grads, unscaled_loss, logits, logits_grad, y_metrics, batch_weight = self._gradlab_global(
                grads, loss, logits, logits_grad, y)
        else:
            unscaled_loss = loss

        if self._gradlab_taps or self.skip_nonfinite_steps:
            inputs = self._tap_inputs(step, unscaled_loss, grads, variables, logits, logits_grad, replicas)
            if chain is not None:
                inputs.layer_inputs = layer_inputs
                inputs.pre_activation_grads = [tf.zeros_like(z) if d is None else self._unscale(d)
                                               for d, z in zip(pre_grads, pre)]
        else:
            inputs = None

        finite = None
        if self.skip_nonfinite_steps:
            finite = tf.math.is_finite(inputs.loss)  # all-reduced: every replica takes the same branch
            # With a LossScaleOptimizer, overflowing (scaled) gradients are routine: the optimizer
            # skips them and lowers its scale, so it must see them. Only the loss decides here.
            if not isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
                finite = tf.logical_and(finite, tf.reduce_all(tf.math.is_finite(inputs.squared_norm_vector)))

        batch = tf.shape(tf.nest.flatten(x)[0])[0] if replicas == 1 else batch_weight
        if finite is None:
            self._loss_tracker.update_state(unscaled_loss, sample_weight=batch)
        else:  # a skipped step does not enter the reported (epoch) loss
            self._loss_tracker.update_state(tf.where(finite, unscaled_loss, tf.zeros_like(unscaled_loss)),
                                            sample_weight=tf.where(finite, batch, tf.zeros_like(batch)))

        before = None
        due_by_every: dict[int, tf.Tensor] = {}  # `step % every == 0`, built once per schedule

        def due_at(every: int):
            """``step % every == 0``: a tensor, or the Python ``True`` for ``every == 1``."""
            if every not in due_by_every:
                due_by_every[every] = True if every == 1 else tf.equal(step % every, 0)
            return due_by_every[every]

        if plain and inputs is not None and not self.jit_compile:  # (XLA drops Assert ops, with a warning)
            # Compiled for executions in which no tap is due: none of the due-step work is here.
            # Python chose it from the step count (make_train_function); were it ever wrong, a
            # due step would silently lose its outputs, so that fails loudly instead.
            everys = sorted(_due_schedules(self._gradlab_taps.values()))
            if everys:
                tf.debugging.Assert(tf.logical_not(tf.reduce_any(tf.stack([due_at(e) for e in everys]))),
                                    ["gradlab: internal error: a tap was due at step", step,
                                     "in a step compiled without due-step work"])
        update_taps = [s.tap for s in self._gradlab_taps.values() if s.tap.needs_updates]
        capture = before_sq = None
        if (inputs is not None and update_taps and not plain and self._gradlab_update_mode == "capture"
                and replicas == 1 and not tf.distribute.has_strategy()):
            # The updates are recorded as the optimizer writes them (_UpdateCapture); only the
            # norms of the weights before them are taken here, on due steps, and the update
            # waits for them (so no weight is copied on write).
            def norms():
                return 2.0 * tf.stack([tf.nn.l2_loss(tf.cast(v, tf.float32)) for v in variables])

            preds = [due_at(tap.every) for tap in update_taps]
            if any(p is True for p in preds):
                before_sq = norms()
            else:
                any_due = preds[0] if len(preds) == 1 else tf.reduce_any(tf.stack(preds))
                before_sq = tf.cond(any_due, norms, lambda: tf.zeros([len(variables)]))
            capture = _UpdateCapture(optimizer, variables)
        elif inputs is not None and update_taps and self._gradlab_snapshot is not None:
            before = self._gradlab_snapshot.values

            def snapshot():
                for b, v in zip(before, variables):
                    b.assign(tf.cast(v, tf.float32))
                return tf.constant(True)

            if not plain:
                # A plain (lowered) tf.cond: its untaken branch is a dozen dead ops, cheaper than
                # the function call of a functional If (lazy_cond) on every step.
                _when([due_at(tap.every) for tap in update_taps], snapshot, tf.cond)

        deltas = None
        with contextlib.ExitStack() as stack:
            if capture is not None:
                stack.enter_context(tf.control_dependencies([before_sq]))
                stack.enter_context(capture)
            deltas, after = self._apply(grads, variables, finite, replicas, capture, keep_after=before is not None)
        self._count_skipped_mixed_precision_step(step)

        signals = due = None
        if inputs is not None:
            if deltas is not None:
                inputs.updates = deltas
                inputs.weights_before = _Lazy(len(variables), lambda i: tf.cast(variables[i], tf.float32) - deltas[i])
                inputs.weight_squared_norms_before = before_sq
            elif before is not None:
                weights_after = ((lambda i: tf.cast(variables[i], tf.float32)) if after is None
                                 else after.__getitem__)
                inputs.updates = _Lazy(len(variables), lambda i: weights_after(i) - before[i])
                inputs.weights_before = list(before)
            if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
                inputs.overflow = tf.logical_not(tf.reduce_all(tf.math.is_finite(inputs.squared_norm_vector)))
            signals, due = self._run_taps(inputs, due_at, return_due=replicas == 1 and not plain, plain=plain)
        logs = self._gradlab_logs(self.compute_metrics(x, y_metrics, logits, sample_weight=sample_weight))
        if replicas == 1:  # with several replicas Keras would reduce them: they are read from the variables
            if due is not None:
                logs = dict(logs, **{_DUE: due})
            if self._gradlab_taps:
                # The step the next execution starts at, followed by the taps' signals: one float64
                # vector (exact up to step 2^53), because every output of the step costs work at
                # every execution (a second small output: 0.04-0.1 ms a step, lockstep-measured).
                head = tf.cast(optimizer.iterations, tf.float64)[tf.newaxis]
                logs = dict(logs, **{_STEP_AND_SIGNALS: head if signals is None else tf.concat([head, signals], 0)})
        return logs

    def _apply(self, grads, variables, finite, replicas, capture, keep_after=False):
        """``optimizer.apply``, skipped when ``finite`` is false. Returns ``(deltas, after)``: the
        recorded updates (with ``capture``; zeros on a skipped step) or None, and with
        ``keep_after`` the float32 weights after the update where they come out of a branch (else
        None: read the variables)."""
        optimizer = self.optimizer
        if finite is None:
            optimizer.apply(grads, variables)
            return (None if capture is None else capture.deltas(variables)), None
        if replicas > 1 or tf.distribute.has_strategy():
            # tf.cond around optimizer.apply would hold a cross-replica merge_call, which tf.distribute
            # does not support (also with one replica); apply a zero gradient instead (SGD: no
            # change; momentum/Adam: one step of moment decay). Every replica takes the same branch
            # (global gradient).
            optimizer.apply([tf.where(finite, g, tf.zeros_like(g)) for g in grads], variables)
            return (None if capture is None else capture.deltas(variables)), None

        def weights():
            return [tf.cast(v, tf.float32) for v in variables] if keep_after else []

        def apply():
            optimizer.apply(grads, variables)
            return tf.constant(True), (capture.values() if capture is not None else []), weights()

        def skip():  # (traced after apply: the recorded tensors' shapes are known)
            optimizer.iterations.assign_add(1)
            return tf.constant(False), ([tf.zeros_like(v) for v in capture.values()]
                                        if capture is not None else []), weights()

        # Plain tf.cond: the apply branch is the one taken, and its predicate depends on the
        # gradients (a functional If would wait on it, and on a GPU copy it to the host).
        _, values, after = tf.cond(finite, apply, skip)
        # `after`: the weights read inside the branch that updated them. Under XLA a read after
        # this cond was seen to return the weights before it (update_ratio 0 with a weight
        # snapshot taken on every step).
        return (None if capture is None else capture.deltas(variables, values)), (list(after) if keep_after else None)

    def make_train_function(self, force=False):
        """Keras's train function, wrapped: it takes the taps' signals and due outputs out of the
        step's results and, with one replica, runs each execution in one of two compiled variants.

        An execution in which no tap is due (no step ``s`` with ``s % every == 0`` among its
        ``steps_per_execution`` steps, for any tap with due-step work) runs a *plain* variant
        compiled without any due-step work: no branch, no weight snapshot, no layer inputs kept
        for a tap that only uses them when due. The others run the full step. The choice is made
        in Python from the step count, which every execution returns (the first execution of
        each ``fit`` runs the full step: the count may have changed in between, e.g. by a
        restore); the plain variant asserts that the choice was right.
        """
        if force or self.train_function is None:
            self._prepare_updates()
        super().make_train_function(force)
        fn = self.train_function
        runtime = self._gradlab_window_holder
        runtime.next_step = None  # a new fit: the count may have been changed (restore, user)
        if fn is None or getattr(fn, "_gradlab_inner", None) is not None:
            return fn
        plain_fn = None

        def plain_variant():
            nonlocal plain_fn
            if plain_fn is None:  # a second Keras train function, traced with runtime.plain set
                super(GradlabModel, self).make_train_function(force=True)
                plain_fn, self.train_function = self.train_function, train_function
            return plain_fn

        def train_function(iterator):
            variant = fn
            if runtime.next_step is not None:  # else: the first execution of a fit (or no taps)
                everys = _due_schedules(self._gradlab_taps.values())
                first, last = runtime.next_step, runtime.next_step + max(int(self.steps_per_execution or 1), 1) - 1
                if everys and all((last // e) * e < first for e in everys):
                    variant = plain_variant()
            runtime.plain = variant is not fn
            runtime.plain_executions += runtime.plain
            try:
                logs = variant(iterator)
            finally:
                runtime.plain = False
            if isinstance(logs, dict) and (_DUE in logs or _STEP_AND_SIGNALS in logs):
                logs = dict(logs)
                returned = {_DUE: logs.pop(_DUE)} if _DUE in logs else {}
                packed = logs.pop(_STEP_AND_SIGNALS, None)
                runtime.next_step = None
                if packed is not None:  # [next step, *signals] (train_step)
                    packed = packed.numpy()
                    runtime.next_step = int(packed[0])
                    if packed.shape[0] > 1:
                        returned[_SIGNALS] = packed[1:]
                runtime.returned = (returned, runtime.executions)
            runtime.executions += 1
            return logs

        train_function._gradlab_inner = fn
        self.train_function = train_function
        return train_function

    def _prepare_updates(self) -> None:
        """Choose how the step gives taps the applied update (``self._gradlab_update_mode``):
        ``"capture"`` (recorded as the optimizer writes it: :class:`_UpdateCapture`) when the
        model trains on one device and :func:`update_capture_supported` holds for its optimizer,
        else ``"snapshot"`` (float32 copies of the weights, kept in variables made here); None
        when no tap asks for updates. Runs eagerly, before the train function is traced."""
        self._gradlab_update_mode = None
        if not any(s.tap.needs_updates for s in self._gradlab_taps.values()) or getattr(self, "optimizer", None) is None:
            return
        variables = list(self.trainable_variables)
        optimizer = self.optimizer
        if self._distribute_strategy is None and not tf.distribute.has_strategy():
            if not optimizer.built:
                optimizer.build(variables)
            # One trial trace per optimizer (a weak reference, not its id: a new optimizer may reuse an id).
            runtime = self._gradlab_window_holder  # a plain object: Keras and checkpoints don't track it
            checked_for, variables_ids = runtime.capture_checked[0]
            if checked_for() is not optimizer or variables_ids != tuple(id(v) for v in variables):
                key = (weakref.ref(optimizer), tuple(id(v) for v in variables))  # (not kept alive by it)
                runtime.capture_checked = (key, update_capture_supported(optimizer, variables))
            ok, self._gradlab_update_capture_refused = runtime.capture_checked[1]
            if ok:
                self._gradlab_update_mode = "capture"
                self._gradlab_snapshot = None  # a copy of every weight less
                return
        self._gradlab_update_mode = "snapshot"
        snapshot = getattr(self, "_gradlab_snapshot", None)
        if snapshot is None or [b.shape for b in snapshot.values] != [v.shape for v in variables]:
            with self.distribute_strategy.scope():
                self._gradlab_snapshot = _Snapshot(variables)

    def tap_signal(self, key: str) -> float | None:
        """The window max of tap ``key``'s ``signal`` after the last execution, or None if unknown.

        It comes with the execution's results (no variable read). None when the tap has no
        signal, before the first execution, after a :meth:`read_tap` reset not yet followed by
        an execution, and with several replicas (use :meth:`peek_tap` then).
        """
        state = self._gradlab_taps.get(key)
        values = None if state is None or state.signal_index is None else self._returned(_SIGNALS, state)
        return None if values is None else float(values[state.signal_index])

    # ---- tf.distribute ------------------------------------------------------------------------
    def _gradlab_global(self, grads, loss, logits, logits_grad, y):
        """Under ``replicas > 1`` (in the replica context): the global gradient, loss and batch.

        * gradients: ``all_reduce(SUM)`` of the per-replica gradients of Keras's per-replica loss
          (which Keras already divides by the replica count for mean reductions) -- exactly the
          sum Keras's optimizer would form. Keras's own all-reduce in the optimizer is switched
          off for this model (:func:`_skip_optimizer_all_reduce`), so the gradient is reduced
          once and ``global_clipnorm`` clips the *global* gradient (Keras clips before its
          all-reduce, i.e. per replica).
        * loss: ``all_reduce(SUM)`` of the per-replica loss: the mean over the global batch for
          ``mean`` (weighted by each replica's rows, :meth:`_replica_share`: exact for uneven
          splits too), the global sum for ``sum``.
        * logits, dL/dlogits and labels: gathered from all replicas (the global batch, in order),
          so taps and metrics see every replica's samples.
        * batch weight: the global batch size, used to weight the loss tracker identically on
          every replica.
        """
        ctx = tf.distribute.get_replica_context()
        _skip_optimizer_all_reduce(self.optimizer)
        grads = ctx.all_reduce(tf.distribute.ReduceOp.SUM, list(grads))
        global_loss = ctx.all_reduce(tf.distribute.ReduceOp.SUM, loss)
        logits = _gather(ctx, logits)
        logits_grad = _gather(ctx, logits_grad)
        y = _gather(ctx, y) if y is not None else None
        return grads, global_loss, logits, logits_grad, y, tf.shape(logits)[0]

    def _replica_share(self, loss, x):
        """A replica's loss, weighted so that the sum over replicas is the global batch's mean.

        For a mean reduction Keras's per-replica loss is ``mean_r / R``, and ``sum_r mean_r / R``
        is the global mean only when the batch splits evenly (the last batch of an epoch often
        doesn't: 15 rows on 2 replicas are 8 + 7). Returns ``loss * R * n_r / N`` (``n_r`` this
        replica's rows, ``N`` the global batch): ``sum_r n_r mean_r / N``, exact for any split,
        unchanged (a factor of exactly 1) for equal ones. A replica with no rows contributes 0
        (its mean of nothing would be NaN). Other reductions are returned unchanged.
        """
        if getattr(self.loss, "reduction", None) != "sum_over_batch_size":
            return loss
        ctx = tf.distribute.get_replica_context()
        rows = tf.cast(tf.shape(tf.nest.flatten(x)[0])[0], tf.float32)
        share = float(ctx.num_replicas_in_sync) * rows / ctx.all_reduce(tf.distribute.ReduceOp.SUM, rows)
        return tf.where(rows > 0, loss * tf.cast(share, loss.dtype), tf.zeros_like(loss))

    def _gradlab_logs(self, logs):
        """Keras 3 reduces step outputs under MultiWorkerMirroredStrategy with
        ``strategy.reduce("MEAN", v, axis=0)``, which fails on scalars (keras#20585,
        tensorflow#72388); give it rank-1 values there. The values are identical on every replica
        (global loss and metrics), so the mean is the value."""
        if _is_multi_worker(self.distribute_strategy):
            return {k: tf.reshape(v, [1]) for k, v in logs.items()}
        return logs

    def test_step(self, data):
        replicas = tf.distribute.get_strategy().num_replicas_in_sync
        if replicas == 1:
            return super().test_step(data)
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        logits = self(x, training=False)
        loss = self._replica_share(self.compute_loss(x=x, y=y, y_pred=logits, sample_weight=sample_weight,
                                                     training=False), x)
        ctx = tf.distribute.get_replica_context()
        global_loss = ctx.all_reduce(tf.distribute.ReduceOp.SUM, loss)
        logits = _gather(ctx, logits)
        y = _gather(ctx, y)
        self._loss_tracker.update_state(global_loss, sample_weight=tf.shape(logits)[0])
        return self._gradlab_logs(self.compute_metrics(x, y, logits, sample_weight=sample_weight))

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        # Keras 3 builds the model from the first *distributed* batch, reducing it with
        # strategy.reduce(MEAN), which fails under MultiWorkerMirroredStrategy (keras#20585) and,
        # under any strategy, when the batch does not split evenly over the replicas (per-replica
        # batches of 8 and 7 rows cannot be added). The shapes are all it needs: build from a
        # small local batch instead.
        if iterator is not None and getattr(self, "_gradlab_capture_iterator", False):
            # gradlab.resume shortens the first epoch of a run resumed mid-epoch through it.
            self._gradlab_capture_iterator = False
            self._gradlab_epoch_iterator = iterator
        sample = getattr(self, "gradlab_probe_batch", None)
        strategy = self._distribute_strategy
        if data_batch is None and sample is not None and strategy is not None and strategy.num_replicas_in_sync > 1:
            x, y = sample
            return super()._maybe_symbolic_build(data_batch=(x[:2], y[:2]))
        return super()._maybe_symbolic_build(iterator=iterator, data_batch=data_batch)

    def _tap_inputs(self, step, loss, grads, variables, logits, logits_grad, replicas) -> TapInputs:
        """Unscale gradients, and with several replicas all-reduce them, for the taps only."""
        tap_grads = [self._unscale(g) for g in grads]
        logits_grad = self._unscale(logits_grad)
        # With replicas > 1 the step passes the global (all-reduced) gradient and loss and the
        # gathered logits already (GradlabModel._gradlab_global).
        return TapInputs(step=step, loss=tf.cast(loss, tf.float32), grads=tap_grads, variables=list(variables),
                         logits=tf.cast(logits, tf.float32), logits_grad=logits_grad)

    def _loss_scale(self):
        """The factor ``optimizer.scale_loss`` multiplies the loss by (float32), or None for 1.

        A ``LossScaleOptimizer`` uses its dynamic scale; any other Keras optimizer its
        ``loss_scale_factor`` (None by default).
        """
        optimizer = self.optimizer
        if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
            return tf.cast(optimizer.dynamic_scale, tf.float32)
        factor = getattr(optimizer, "loss_scale_factor", None)
        return None if factor is None else tf.constant(float(factor), tf.float32)

    def _unscale(self, t):
        """``t`` (a gradient of the scaled loss) as float32, with the loss scaling undone."""
        t = tf.cast(t, tf.float32)
        scale = self._loss_scale()
        return t if scale is None else t / scale

    def _count_skipped_mixed_precision_step(self, step) -> None:
        """Keep ``iterations`` counting steps when the loss scaler skipped a non-finite update."""
        if isinstance(self.optimizer, keras.optimizers.LossScaleOptimizer):
            skipped = tf.equal(tf.cast(self.optimizer.iterations, tf.int64), step)
            self.optimizer.iterations.assign_add(tf.cast(skipped, self.optimizer.iterations.dtype))


_SIGNALS = "_gradlab_tap_signals"
_DUE = "_gradlab_tap_due"
_STEP_AND_SIGNALS = "_gradlab_step_and_signals"  # [next step, *window maxima of the signals]


def _check_step_write(key: str, write: StepWrite, window: list[str], due: dict) -> None:
    """Raise ValueError if ``write`` names a due output that is not a scalar ``on_due`` output,
    an ``every_step`` output the tap does not have, or an unknown window statistic."""
    if not due:
        raise ValueError(f"tap {key!r}: step_write is written at due steps, and the tap has no on_due outputs")
    if getattr(write.writer, "_resource", None) is None:
        raise ValueError(f"tap {key!r}: its step_write needs a tf.summary file writer "
                         f"(tf.summary.create_file_writer), got {type(write.writer).__name__}")
    for name in write.due:
        if name not in due or due[name].rank != 0:
            raise ValueError(f"tap {key!r}: step_write due output {name!r} is not a scalar on_due output "
                             f"(scalar outputs: {[n for n, shape in due.items() if shape.rank == 0]})")
    for entry in write.window:
        name, stat, _ = entry
        if name not in window:
            raise ValueError(f"tap {key!r}: step_write window output {name!r} is not one of its every_step outputs {window}")
        if stat not in _WINDOW_STATS:
            raise ValueError(f"tap {key!r}: step_write window statistic {stat!r} must be one of {', '.join(_WINDOW_STATS)}")


def _step_write_values(state: _TapState, scalars, captured) -> tuple[list[str], tf.Tensor]:
    """The tags of ``state.tap.step_write`` and their values (float32) at a due step, from the
    stacked due scalars and the captured window columns (rows last, sum, max, min; the last
    column counts the steps)."""
    write = state.tap.step_write
    tags, parts = [], []
    if write.due:
        parts.append(tf.gather(scalars, [state.due_scalar_names.index(name) for name in write.due]))
        tags += list(write.due.values())
    if write.window:
        width = len(state.window_names) + 1
        rows = tf.stack([captured[0], captured[1] / tf.maximum(captured[1, -1], 1.0), captured[2], captured[3]])
        index = [_WINDOW_STATS.index(stat) * width + state.window_names.index(name) for name, stat, _ in write.window]
        parts.append(tf.cast(tf.gather(tf.reshape(rows, [-1]), index), tf.float32))
        tags += [tag for _, _, tag in write.window]
    return tags, parts[0] if len(parts) == 1 else tf.concat(parts, 0)


_WINDOW_STATS = ("last", "mean", "max", "min")


def _when(preds: list, fn: Callable, cond: Callable) -> None:
    """Run ``fn`` when any of ``preds`` holds: directly if one is the Python ``True`` (due on
    every step: no branch), else in ``cond(any, fn, no-op)`` (``tf.cond`` or :func:`lazy_cond`)."""
    if any(p is True for p in preds):
        fn()
    else:
        cond(preds[0] if len(preds) == 1 else tf.reduce_any(tf.stack(preds)), fn, lambda: tf.constant(False))


def _due_schedules(states) -> set[int]:
    """The ``every`` of each tap with due-step work (due outputs, or the weight snapshot)."""
    return {state.tap.every for state in states if state.has_due or state.tap.needs_updates}


def dense_chain(model) -> list | None:
    """The model's layers if it is a plain chain of float32 ``keras.layers.Dense`` layers, else None.

    A chain: one input, every layer (but the input layer) exactly ``Dense`` (no subclass, LoRA or
    quantisation, no activity regulariser), computing in float32, each fed by the previous
    layer's output, the last one the model's only output. gradlab's models are chains. For a
    chain the train step can run the forward pass itself (:func:`_chain_forward`) and keep what
    per-sample statistics need.
    """
    inputs = list(getattr(model, "inputs", None) or [])
    outputs = list(getattr(model, "outputs", None) or [])
    layers = [ly for ly in getattr(model, "layers", []) if not isinstance(ly, keras.layers.InputLayer)]
    if len(inputs) != 1 or len(outputs) != 1 or not layers or len(inputs[0].shape) != 2:
        return None
    previous = inputs[0]
    for ly in layers:
        if type(ly) is not keras.layers.Dense or getattr(ly, "lora_enabled", False) \
                or getattr(ly.dtype_policy, "quantization_mode", None) or ly.activity_regularizer is not None:
            return None
        try:
            if ly.compute_dtype != "float32" or ly.input is not previous:
                return None
        except (AttributeError, ValueError):
            return None
        previous = ly.output
    return layers if previous is outputs[0] else None


def _chain_forward(layers, x):
    """``(output, [A_l], [z_l])`` along a :func:`dense_chain`: ``z = A @ W (+ b)``, ``A_next = act(z)``."""
    h = tf.cast(tf.nest.flatten(x)[0], tf.float32)
    inputs, pre = [], []
    for ly in layers:
        inputs.append(h)
        z = tf.matmul(h, ly.kernel)
        if ly.bias is not None:
            z = tf.add(z, ly.bias)
        pre.append(z)
        h = ly.activation(z) if ly.activation is not None else z
    return h, inputs, pre


def _is_multi_worker(strategy) -> bool:
    return strategy is not None and isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy) \
        and strategy.extended._in_multi_worker_mode()


def _identity_all_reduce(grads_and_vars):
    return list(grads_and_vars)


def _skip_optimizer_all_reduce(optimizer) -> None:
    """Let ``optimizer`` apply the gradients it is given (already all-reduced by the step).

    Keras's TF optimizer all-reduces (SUM) inside ``apply``, after clipping; gradlab reduces
    once in the step instead, so the clipping and the taps see the global gradient.
    """
    for opt in (optimizer, getattr(optimizer, "inner_optimizer", None)):
        if opt is not None and hasattr(opt, "_all_reduce_sum_gradients"):
            opt._all_reduce_sum_gradients = _identity_all_reduce


def _gather(ctx, t):
    """Concatenate ``t`` over the replicas along axis 0, in replica order (the global batch).

    Built from ``all_reduce(SUM)`` of zero-padded slices (exact: ``x + 0 = x``), because
    ``ReplicaContext.all_gather`` fails under MultiWorkerMirroredStrategy ("destinations can not
    be empty") and needs equal shapes; replicas may hold different batch sizes here.
    """
    dtype = t.dtype
    t = tf.cast(t, tf.float32) if dtype.is_integer else t  # labels: small integers, exact in float32
    replicas = ctx.num_replicas_in_sync
    rid = tf.cast(ctx.replica_id_in_sync_group, tf.int32)
    n = tf.shape(t)[0]
    sizes = ctx.all_reduce(tf.distribute.ReduceOp.SUM, tf.one_hot(rid, replicas, dtype=tf.float32) * tf.cast(n, tf.float32))
    sizes = tf.cast(sizes, tf.int32)
    offset = tf.reduce_sum(sizes[:rid])
    total = tf.reduce_sum(sizes)
    index = tf.reshape(tf.range(offset, offset + n), [-1, 1])
    padded = tf.scatter_nd(index, t, tf.concat([[total], tf.shape(t)[1:]], 0))
    out = ctx.all_reduce(tf.distribute.ReduceOp.SUM, padded)
    return tf.cast(out, dtype) if dtype.is_integer else out
