"""The compiled custom GradientTape train step, and the in-step *taps* diagnostics plug into.

:class:`GradlabModel` is a Keras 3 ``Model`` (usable as a functional model) whose
``train_step`` follows Keras's own TensorFlow step -- ``compute_loss``,
``optimizer.scale_loss``, ``tape.gradient``, ``optimizer.apply`` -- and, in the same compiled
graph, runs the registered taps on the real gradients.

A tap (:class:`Tap`) is a pair of pure tensor functions of :class:`TapInputs`:

* ``every_step(inputs) -> {name: scalar}`` runs on every step. Each scalar is kept in
  accumulators over the *window* since the last read: ``last``, ``mean``, ``max`` and ``min``.
  A spike between two writes therefore shows up in the window ``max``, also with
  ``steps_per_execution > 1``.
* ``on_due(inputs) -> {name: tensor}`` runs only on steps where ``step % every == 0`` (inside a
  ``tf.cond``); its outputs (any shape) are stored with the step they were computed at.

Both must be XLA-safe: no summary ops, no Python side effects, no variable creation.
The Python side (a callback) reads the accumulators with :meth:`GradlabModel.read_tap`,
writes them and resets the window.

Step numbering: the step of a gradient is the optimizer's iteration count *before* the
update it produces, so step 0 describes the initial weights. A step skipped because of
NaN/Inf (``nonfinite`` with ``skip_step``, or the mixed-precision loss scaler) still counts
as a step, so TensorBoard steps never repeat.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Mapping

import keras
import numpy as np
import tensorflow as tf


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
        updates: ``w_after - w_before`` per variable when a tap asked for them, else ``None``.
    """

    step: tf.Tensor
    loss: tf.Tensor
    grads: list
    variables: list
    logits: tf.Tensor
    logits_grad: tf.Tensor
    updates: list | None = None

    @functools.cached_property
    def squared_norms(self) -> list:
        """``sum(g^2)`` per gradient, computed once per step and shared by every tap."""
        return [tf.reduce_sum(tf.square(g)) for g in self.grads]


@dataclasses.dataclass(frozen=True)
class Tap:
    """An in-step diagnostic: see the module docstring."""

    every_step: Callable[[TapInputs], Mapping[str, tf.Tensor]] | None = None
    on_due: Callable[[TapInputs], Mapping[str, tf.Tensor]] | None = None
    every: int = 1
    needs_updates: bool = False


class _TapState:
    """Accumulator variables of one tap. A plain object, so Keras and tf.train.Checkpoint don't track it."""

    def __init__(self, tap: Tap, window_names: list[str], due_specs: dict[str, tf.TensorShape]):
        self.tap = tap
        self.window_names = window_names
        n = len(window_names)
        agg = dict(trainable=False, aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)
        self.last = tf.Variable(tf.zeros([n]), **agg)
        self.sum = tf.Variable(tf.zeros([n]), **agg)
        self.max = tf.Variable(tf.fill([n], -np.inf), **agg)
        self.min = tf.Variable(tf.fill([n], np.inf), **agg)
        self.count = tf.Variable(0, dtype=tf.int64, **agg)
        self.due = {name: tf.Variable(tf.zeros(shape), **agg) for name, shape in due_specs.items()}
        self.due_step = tf.Variable(-1, dtype=tf.int64, **agg)

    def reset_window(self) -> None:
        self.sum.assign(tf.zeros_like(self.sum))
        self.max.assign(tf.fill(tf.shape(self.max), -np.inf))
        self.min.assign(tf.fill(tf.shape(self.min), np.inf))
        self.count.assign(0)
        self.due_step.assign(-1)


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
        self.skip_nonfinite_steps = False

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
            updates=[tf.zeros(v.shape, tf.float32) for v in variables] if tap.needs_updates else None)
        window = list(tap.every_step(probe)) if tap.every_step else []
        for name, value in (tap.every_step(probe).items() if tap.every_step else ()):
            if tf.convert_to_tensor(value).shape.rank != 0:
                raise ValueError(f"tap {key!r}: every_step output {name!r} must be a scalar")
        due = {name: tf.convert_to_tensor(v).shape for name, v in (tap.on_due(probe).items() if tap.on_due else ())}
        strategy = self.distribute_strategy
        with strategy.scope():
            self._gradlab_taps[key] = _TapState(tap, window, due)
        self.train_function = None  # retrace with the new tap

    def remove_tap(self, key: str) -> None:
        """Remove the tap ``key`` if present."""
        if self._gradlab_taps.pop(key, None) is not None:
            self.train_function = None

    @property
    def tap_keys(self) -> list[str]:
        return list(self._gradlab_taps)

    def read_tap(self, key: str, reset: bool = True) -> dict:
        """Read a tap's accumulators (numpy) and, by default, start a new window.

        Returns ``{"count": steps in window, "window": {name: {last, mean, max, min}},
        "due_step": step of the due outputs or -1, "due": {name: array}}``.
        """
        state = self._gradlab_taps[key]
        count = int(state.count.numpy())
        last, total = state.last.numpy(), state.sum.numpy()
        vmax, vmin = state.max.numpy(), state.min.numpy()
        window = {}
        if count:
            for i, name in enumerate(state.window_names):
                window[name] = {"last": float(last[i]), "mean": float(total[i] / count),
                                "max": float(vmax[i]), "min": float(vmin[i])}
        due_step = int(state.due_step.numpy())
        due = {name: var.numpy() for name, var in state.due.items()} if due_step >= 0 else {}
        if reset:
            state.reset_window()
        return {"count": count, "window": window, "due_step": due_step, "due": due}

    def _run_taps(self, inputs: TapInputs) -> None:
        for state in self._gradlab_taps.values():
            tap = state.tap
            if tap.every_step and state.window_names:
                out = tap.every_step(inputs)
                vec = tf.stack([tf.cast(tf.reshape(out[n], []), tf.float32) for n in state.window_names])
                state.last.assign(vec)
                state.sum.assign_add(vec)
                state.max.assign(tf.maximum(state.max, vec))
                state.min.assign(tf.minimum(state.min, vec))
            state.count.assign_add(1)
            if tap.on_due and state.due:
                def write_due(state=state, tap=tap):
                    out = tap.on_due(inputs)
                    for name, var in state.due.items():
                        var.assign(tf.cast(tf.reshape(out[name], var.shape), tf.float32))
                    state.due_step.assign(inputs.step)
                    return tf.constant(True)

                tf.cond(tf.equal(inputs.step % tap.every, 0), write_due, lambda: tf.constant(False))

    # ---- the step ---------------------------------------------------------------------------
    def train_step(self, data):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        variables = self.trainable_variables
        optimizer = self.optimizer
        step = tf.cast(optimizer.iterations, tf.int64)
        with tf.GradientTape() as tape:
            logits = self(x, training=True)
            loss = self.compute_loss(x=x, y=y, y_pred=logits, sample_weight=sample_weight, training=True)
            scaled_loss = optimizer.scale_loss(loss)
        grads_and_logits = tape.gradient(scaled_loss, list(variables) + [logits])
        grads, logits_grad = grads_and_logits[:-1], grads_and_logits[-1]
        grads = [tf.zeros_like(v) if g is None else g for g, v in zip(grads, variables)]
        replicas = tf.distribute.get_strategy().num_replicas_in_sync
        # Keras divides the loss by the number of replicas (so summed gradients are global); undo it for logging.
        unscaled_loss = loss * replicas if replicas > 1 else loss
        self._loss_tracker.update_state(unscaled_loss, sample_weight=tf.shape(tf.nest.flatten(x)[0])[0])

        if self._gradlab_taps or self.skip_nonfinite_steps:
            inputs = self._tap_inputs(step, unscaled_loss, grads, variables, logits, logits_grad, replicas)
        else:
            inputs = None

        finite = None
        if self.skip_nonfinite_steps:
            finite = tf.math.is_finite(loss)
            for sq in inputs.squared_norms:
                finite = tf.logical_and(finite, tf.math.is_finite(sq))

        before = None
        if inputs is not None and any(s.tap.needs_updates for s in self._gradlab_taps.values()):
            before = [tf.identity(v) for v in variables]

        if finite is None:
            optimizer.apply(grads, variables)
        else:
            def apply():
                optimizer.apply(grads, variables)
                return tf.constant(True)

            def skip():
                optimizer.iterations.assign_add(1)
                return tf.constant(False)

            tf.cond(finite, apply, skip)
        self._count_skipped_mixed_precision_step(step)

        if inputs is not None:
            if before is not None:
                inputs.updates = [tf.cast(v, tf.float32) - tf.cast(b, tf.float32) for v, b in zip(variables, before)]
            self._run_taps(inputs)
        return self.compute_metrics(x, y, logits, sample_weight=sample_weight)

    def _tap_inputs(self, step, loss, grads, variables, logits, logits_grad, replicas) -> TapInputs:
        """Unscale gradients, and with several replicas all-reduce them, for the taps only."""
        optimizer = self.optimizer
        inv_scale = None
        if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
            inv_scale = 1.0 / tf.cast(optimizer.dynamic_scale, tf.float32)
        tap_grads = [tf.cast(g, tf.float32) for g in grads]
        logits_grad = tf.cast(logits_grad, tf.float32)
        if inv_scale is not None:
            tap_grads = [g * inv_scale for g in tap_grads]
            logits_grad = logits_grad * inv_scale
        if replicas > 1:
            ctx = tf.distribute.get_replica_context()
            tap_grads = ctx.all_reduce(tf.distribute.ReduceOp.SUM, tap_grads)
            loss = ctx.all_reduce(tf.distribute.ReduceOp.MEAN, loss)
        return TapInputs(step=step, loss=tf.cast(loss, tf.float32), grads=tap_grads, variables=list(variables),
                         logits=tf.cast(logits, tf.float32), logits_grad=logits_grad)

    def _count_skipped_mixed_precision_step(self, step) -> None:
        """Keep ``iterations`` counting steps when the loss scaler skipped a non-finite update."""
        if isinstance(self.optimizer, keras.optimizers.LossScaleOptimizer):
            skipped = tf.equal(tf.cast(self.optimizer.iterations, tf.int64), step)
            self.optimizer.iterations.assign_add(tf.cast(skipped, self.optimizer.iterations.dtype))
