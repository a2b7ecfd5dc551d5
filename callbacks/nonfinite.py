"""nonfinite: catch NaN/Inf in the loss or any gradient, in the step where it happens.

In a gradlab run (:class:`gradlab.train_step.GradlabModel`) a tap runs on every step, inside the
compiled step, on the real loss and gradients. For each trainable variable ``v_i`` with gradient
``g_i`` it uses the squared norm ``s_i = sum g_i^2`` the step computes anyway
(:attr:`TapInputs.squared_norms`): ``g_i`` is nonfinite when ``s_i`` is NaN or Inf. (A finite
gradient whose entries exceed ~1.8e19 overflows ``s_i`` and counts as Inf: the update would be
meaningless anyway.) Per window it keeps, for the loss and every variable, the *first step*
at which it was nonfinite (the window minimum of ``step if bad else +inf``), so the first bad
step and the variables affected at that step are exact, also with ``steps_per_execution > 1``
(the window keeps steps in float64: exact up to step 2^53).

The report names the step, the layer and the variable. When several gradients are nonfinite
at that step, the one named is the first in *backprop order* (the layer nearest the output
first), because a NaN created in a layer spreads from there towards the input::

    nonfinite gradient (NaN) at step 37 in hidden_2/kernel (first in backprop order; 4 of 6 gradients nonfinite), loss 0.53

Actions (``action``):

* ``stop`` (default): the bad step's update is not applied (``model.skip_nonfinite_steps``),
  training stops at the end of that execution, and a ``nonfinite_stop`` event is recorded; a
  gradlab run then saves the last finite weights, writes ``metrics.json`` with ``"stopped"``
  and exits with status 3 and the one-line message.
* ``skip_step``: steps with a nonfinite loss or gradient apply no update and training goes on;
  skipped steps still count as steps, and they do not enter the reported loss.
* ``warn``: report and go on (the update is applied, so the weights may become NaN).

The check runs after every ``every`` steps (default 1: every execution). When nothing happened
it costs no variable read: the window's "a step was bad" maximum comes back with the step's
results (:meth:`GradlabModel.tap_signal`; with several replicas, one read). With a
``LossScaleOptimizer`` (mixed_float16) only the loss counts: overflowing scaled gradients are
routine there and the optimizer skips them itself.

Any other Keras model: the loss in Keras's batch logs (the running mean of the epoch, so it turns
nonfinite at the first nonfinite step) is checked after every execution; the step reported is
the first step of the execution in which the loss went bad (exact with ``steps_per_execution:
1``), and the variables named are those whose gradients are nonfinite on the probe batch, when
there is probe data and some are. Every ``probe_every`` steps, and once more at the end of a
``fit`` that found nothing, the probe batch's loss and gradients are checked too: this catches a
nonfinite gradient with a finite training loss, reported as "found at step N" (the step of the
check; the first bad step may be earlier). ``skip_step`` needs a gradlab model.

Written on detection only: text ``nonfinite/report`` and scalar ``nonfinite/steps`` (the number
of nonfinite steps seen so far; on other Keras models, which see only the running loss and the
probe batch, the number of detections: at most one per epoch from the loss). Every detection is added to ``observations_for(model).events``
as ``{"kind": "nonfinite", "step", "layer", "variable", "what", "value", "message", ...}``, which
:class:`gradlab.callbacks.Health` turns into an ``exploding`` verdict.
"""

from __future__ import annotations

import functools
import logging
import math

import keras
import numpy as np
import tensorflow as tf

from gradlab import summaries
from gradlab.callbacks.base import Diagnostic, check_int, probe_loss, register
from gradlab.train_step import GradlabModel, Tap, TapVector

ACTIONS = ("stop", "skip_step", "warn")
log = logging.getLogger("gradlab.nonfinite")


def backprop_order(names: list[tuple[str, str]]) -> list[int]:
    """Indices of ``names`` (``(layer, variable)`` in model order) with the output's layer first.

    Layers are ordered by their first appearance, reversed; variables keep their order within
    a layer (``kernel`` before ``bias``).
    """
    layers: list[str] = []
    for layer, _ in names:
        if layer not in layers:
            layers.append(layer)
    rank = {layer: i for i, layer in enumerate(reversed(layers))}
    return sorted(range(len(names)), key=lambda i: (rank[names[i][0]], i))


def first_nonfinite(loss_step: float, var_steps, nan_steps, loss_nan_step: float = math.inf):
    """Decode a window: the first bad step and what was bad there.

    Args:
        loss_step: the first step of the window with a nonfinite loss (``inf``: none).
        var_steps: per variable, the first step with a nonfinite gradient (``inf``: none).
        nan_steps: per variable, the first step with a NaN gradient (``inf``: none).
        loss_nan_step: the first step with a NaN loss.

    Returns:
        ``None`` when nothing was nonfinite, else ``(step, loss_bad, loss_is_nan, bad, nan)``:
        ``bad`` and ``nan`` are the sets of variable indices nonfinite / NaN at that step.
    """
    var_steps = np.asarray(var_steps, dtype=np.float64)
    nan_steps = np.asarray(nan_steps, dtype=np.float64)
    candidates = [loss_step] + ([float(var_steps.min())] if var_steps.size else [])
    first = min(candidates)
    if not math.isfinite(first):
        return None
    bad = {int(i) for i in np.flatnonzero(var_steps == first)}
    nan = {int(i) for i in np.flatnonzero(nan_steps == first)}
    return int(first), loss_step == first, loss_nan_step == first, bad, nan


def describe(step: int, names: list[tuple[str, str]], loss_bad: bool, loss_is_nan: bool, bad: set, nan: set,
             loss_value: float | None = None, probe: bool = False) -> dict:
    """The event dict for a nonfinite step (see the module docstring for the message).

    ``probe``: the gradients (and ``loss_value``) come from the probe batch, checked at ``step``
    (a plain Keras model): the message says where they were found, and that the first bad step
    may be earlier."""
    order = [i for i in backprop_order(names) if i in bad]
    first = order[0] if order else None
    layer, variable = names[first] if first is not None else ("", "")
    value = "NaN" if (first in nan if first is not None else loss_is_nan) else "Inf"
    counted = f"{len(bad)} of {len(names)} gradients nonfinite"
    if loss_bad and not probe:
        what = "loss"
        loss_kind = "NaN" if loss_is_nan else "Inf"
        message = f"nonfinite loss ({loss_kind}) at step {step}"
        if first is not None:
            message += f"; {counted}, first in backprop order {layer}/{variable}"
        value = loss_kind
    elif probe:
        what = "gradient" if first is not None else "loss"
        if first is None:
            value = "NaN" if loss_is_nan else "Inf"
            message = f"nonfinite loss ({value}) on the probe batch, found at step {step}"
        else:
            message = (f"nonfinite gradient ({value}) in {layer}/{variable} on the probe batch, found at step {step} "
                       f"(first in backprop order; {counted}; the first bad step may be earlier)")
        if loss_value is not None and math.isfinite(loss_value):
            message += f", probe loss {loss_value:.4g}"
    else:
        what = "gradient"
        message = f"nonfinite gradient ({value}) at step {step} in {layer}/{variable} (first in backprop order; {counted})"
        if loss_value is not None and math.isfinite(loss_value):
            message += f", loss {loss_value:.4g}"
    return {"kind": "nonfinite", "step": int(step), "layer": layer, "variable": variable, "what": what,
            "value": value, "nonfinite_gradients": len(bad), "gradients": len(names), "message": message}


@register("nonfinite")
class NonFiniteGuard(Diagnostic):
    """Detect NaN/Inf in the loss or gradients and stop, skip the step, or warn (module docstring).

    Args:
        log_dir: TensorBoard directory (``None``: don't write).
        action: ``stop`` | ``skip_step`` | ``warn``.
        every: check after every this many steps (1: after every execution).
        probe_every: plain Keras models only: also check the probe batch's gradients every this
            many steps (0: never; the loss is still checked after every execution).
        probe_data, probe_size: probe batch for plain Keras models (optional).
    """

    uses_tap = True
    schedule_options = ()  # the tap checks every step; `every` is only how often Python looks

    def __init__(self, *, log_dir: str | None = None, action: str = "stop", every: int = 1,
                 probe_every: int = 100, probe_data=None, probe_size: int = 256):
        super().__init__(log_dir=log_dir, every=every, probe_data=probe_data, probe_size=probe_size)
        if action not in ACTIONS:
            raise ValueError(f"`action` ({action!r}) must be one of {', '.join(ACTIONS)}")
        self.action = action
        self.probe_every = check_int("probe_every", probe_every, minimum=0)
        self.events: list[dict] = []
        self.count = 0
        self._names: list[tuple[str, str]] = []
        self._previous_skip = None
        self._grad_probe = None
        self._epoch_reported = False
        self._probe_checked: int | None = None  # the step of the last probe check (plain models)
        self._first_step = 0

    def wants_probe(self, model) -> bool:
        return False  # the plain-Keras probe runs on its own schedule (below)

    # ---- set-up
    def on_train_begin(self, logs=None):
        self.events, self.count = [], 0
        self._probe_checked = None
        model = self.model
        self._names = summaries.variable_names(model)
        self._grad_probe = None
        if isinstance(model, GradlabModel):
            if self._previous_skip is None:
                self._previous_skip = model.skip_nonfinite_steps
            if self.action in ("stop", "skip_step") and not model.skip_nonfinite_steps:
                model.skip_nonfinite_steps = True  # before the base class rebuilds the train function
        elif self.action == "skip_step":
            raise ValueError("`action` ('skip_step') needs a gradlab model (gradlab.train_step.GradlabModel); "
                             "with other Keras models use stop or warn")
        super().on_train_begin(logs)
        self._first_step = self._last_step

    def on_train_end(self, logs=None):
        model = self.model
        if self._tap_key is not None and isinstance(model, GradlabModel):
            self._check_tap(force=True)
        elif (not isinstance(model, GradlabModel) and self.probe_every and not self.events
              and self._probe_checked != self._last_step and self._last_step > self._first_step):
            # A plain model: a nonfinite gradient with a finite loss shows only on the probe batch,
            # whose schedule a short fit may never reach. Checked once more at the end.
            self._check_probe(self._last_step)
        super().on_train_end(logs)

    def detach(self) -> None:
        """Remove the tap and restore the model's ``skip_nonfinite_steps`` (both stay between fits)."""
        model = getattr(self, "model", None)
        super().detach()
        if isinstance(model, GradlabModel) and self._previous_skip is not None:
            model.skip_nonfinite_steps = self._previous_skip
            model.train_function = None
        self._previous_skip = None

    # ---- the tap
    def make_tap(self, model):
        n = len(model.trainable_variables)
        scaler = isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
        inf = tf.constant(np.inf, tf.float64)

        names = (["loss_step", *(f"g{i}" for i in range(n)), "loss_nan_step", *(f"n{i}" for i in range(n)), "bad"])

        def every_step(inp):
            # Vectorised over [loss, s_0 .. s_{n-1}]: about ten ops a step for any number of variables.
            step = tf.cast(inp.step, tf.float64)
            values = tf.concat([tf.reshape(tf.cast(inp.loss, tf.float32), [1]), inp.squared_norm_vector[:n]], 0)
            ok = tf.math.is_finite(values)
            bad = tf.logical_not(ok[0] if scaler else tf.reduce_all(ok))
            return TapVector(names, tf.concat([tf.where(ok, inf, step), tf.where(tf.math.is_nan(values), step, inf),
                                               tf.reshape(tf.cast(bad, tf.float64), [1])], 0))

        # It sees loss-scale overflow steps: a NaN loss at such a step is still the model's problem.
        return Tap(every_step=every_step, every=1, signal="bad", sees_overflow_steps=True)

    def on_train_batch_end(self, batch, logs=None):
        now = self.steps_done(batch)
        prev, self._last_step = self._last_step, now
        if now <= prev:
            return
        due = (now // self.every) * self.every > prev or self.every == 1
        if self._tap_key is not None:
            if due:
                self._check_tap()
            return
        reported = self._check_logs(prev, now, logs)
        # A probe due after an execution whose loss went bad sees the same divergence: one report.
        if not reported and self.probe_every and (now // self.probe_every) * self.probe_every > prev:
            self._check_probe(now)

    def _check_tap(self, force: bool = False) -> None:
        model = self.model
        flagged = model.tap_signal(self._tap_key)  # free: it came with the execution's results
        if flagged is None:
            flagged = model.peek_tap(self._tap_key, "bad", "max")
        if not flagged > 0:
            return
        values = model.read_tap(self._tap_key)
        window = values["window"]
        if not window:
            return
        n = len(self._names)
        scaler = isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
        var_steps = [window[f"g{i}"]["min"] for i in range(n)]
        found = first_nonfinite(window["loss_step"]["min"], var_steps if not scaler else [],
                                [window[f"n{i}"]["min"] for i in range(n)], window["loss_nan_step"]["min"])
        if found is None:
            return
        step, loss_bad, loss_nan, bad, nan = found
        if scaler:  # name the variables anyway, though only the loss decided
            bad = {i for i in range(n) if var_steps[i] == step}
        bad_steps = int(round(window["bad"]["mean"] * values["count"]))
        self._report(describe(step, self._names, loss_bad, loss_nan, bad, nan), bad_steps)

    # ---- plain Keras models
    def _check_logs(self, prev: int, now: int, logs) -> bool:
        """Report a loss that turned nonfinite in the execution of steps ``prev .. now - 1``;
        True if it did. The gradients named are the probe batch's, when there is one and some
        are nonfinite there; the loss is the training loss of the logs."""
        loss = (logs or {}).get("loss")
        try:
            loss = float(loss)
        except (TypeError, ValueError):
            return False
        if math.isfinite(loss) or self._epoch_reported:
            return False
        probed = self._probe_gradients()
        bad, nan = (probed[1], probed[2]) if probed is not None else (set(), set())
        event = describe(prev, self._names, True, math.isnan(loss), bad, nan)
        if bad:
            event["message"] += " (gradients on the probe batch)"
        self._epoch_reported = True  # the running mean stays nonfinite for the rest of the epoch
        self._report(event, 1)
        return True

    def on_epoch_begin(self, epoch, logs=None):
        super().on_epoch_begin(epoch, logs)
        self._epoch_reported = False

    def _check_probe(self, step: int) -> None:
        """Check the probe batch's loss and gradients at ``step``; report them if nonfinite."""
        self._probe_checked = step
        probed = self._probe_gradients()
        if probed is None:
            return
        loss, bad, nan = probed
        if bad or not math.isfinite(loss):
            event = describe(step, self._names, not math.isfinite(loss), math.isnan(loss), bad, nan, loss, probe=True)
            self._report(dict(event, source="probe batch"), 1)

    def _probe_gradients(self) -> tuple[float, set, set] | None:
        """``(loss, nonfinite, nan)`` on the probe batch: its loss and the indices of the variables
        whose gradients are nonfinite / NaN there; None without probe data."""
        data = self.probe_data if self.probe_data is not None else getattr(self.model, "gradlab_probe_batch", None)
        if data is None:
            return None
        if self._grad_probe is None:
            self._probe_xy = Diagnostic.probe_batch(self)
            self.check_probe_batch(self.model, *self._probe_xy)
            # A partial: TensorFlow counts retracing per code object, so a bound method's traces in
            # several guards would add up to a bogus "frequent retracing" warning.
            self._grad_probe = tf.function(functools.partial(self._grad_check), reduce_retracing=True,
                                           autograph=False)
        loss, sq = self._grad_probe(*self._probe_xy)
        loss, sq = float(loss), np.asarray(sq, dtype=np.float64)
        return loss, {int(i) for i in np.flatnonzero(~np.isfinite(sq))}, {int(i) for i in np.flatnonzero(np.isnan(sq))}

    def _grad_check(self, x, y):
        model = self.model
        with tf.GradientTape() as tape:
            y_pred = model(x, training=False)
            loss = probe_loss(model, x, y, y_pred)
        variables = model.trainable_variables
        grads = tape.gradient(loss, variables)
        sq = [tf.reduce_sum(tf.square(tf.cast(g, tf.float32))) if g is not None else tf.constant(0.0)
              for g in grads]
        return tf.cast(loss, tf.float32), tf.stack(sq) if sq else tf.zeros([0])

    # ---- reporting
    def _report(self, event: dict, bad_steps: int) -> None:
        if any(e["step"] == event["step"] for e in self.events[-2:]):
            return  # a plain model's step seen by both its probe and its loss log: one report
        first = not self.events
        self.count += max(bad_steps, 1)
        event = dict(event, action=self.action, count=self.count)
        self.events.append(event)
        obs = self.observations
        obs.events.append(event)
        step = event["step"]
        self.scalar("nonfinite/steps", self.count, step)
        self.flush_scalars()
        consequence = {"stop": "training stopped", "skip_step": "the update was skipped",
                       "warn": "training goes on"}[self.action]
        self.text("nonfinite/report", f"{event['message']} ({consequence})", step)
        if self.action == "stop":
            self.model.stop_training = True
            if first:
                stop = dict(event, kind="nonfinite_stop", message=f"training stopped: {event['message']}")
                obs.events.append(stop)
                if getattr(self.model, "gradlab_probe_batch", None) is None:  # gradlab runs raise NonFiniteError
                    log.warning("NonFiniteGuard: %s", stop["message"])
        elif first:
            log.warning("NonFiniteGuard: %s (%s; further nonfinite steps are counted in nonfinite/steps)",
                        event["message"], consequence)
