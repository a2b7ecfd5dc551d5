"""nonfinite: decoding and naming (pure), exact step/layer/variable inside the compiled step (also with
steps_per_execution > 1), the three actions, a stopped gradlab run (directory, exit status, one-line
message), and the plain-Keras fallback."""

from __future__ import annotations

import json
import math

import h5py
import keras
import numpy as np
import pytest
import tensorflow as tf

import gradlab
from gradlab.callbacks import NonFiniteGuard, observations_for
from gradlab.callbacks.nonfinite import backprop_order, describe, first_nonfinite
from gradlab.errors import NonFiniteError
from gradlab.events import read_scalars, read_text
from gradlab.train_step import GradlabModel

from conftest import gradlab_cli, read_metrics

INF = math.inf
NAMES = [("hidden_1", "kernel"), ("hidden_1", "bias"), ("hidden_2", "kernel"), ("hidden_2", "bias"),
         ("logits", "kernel"), ("logits", "bias")]


# ---- pure -----------------------------------------------------------------------------------------

def test_backprop_order_puts_the_output_layer_first():
    assert backprop_order(NAMES) == [4, 5, 2, 3, 0, 1]


def test_first_nonfinite_decodes_the_first_step_and_its_variables():
    # variable 2 bad from step 7, variables 0 and 1 from step 9 (after the NaN spread), loss fine
    found = first_nonfinite(INF, [9, 9, 7, INF, INF, INF], [9, INF, 7, INF, INF, INF])
    assert found == (7, False, False, {2}, {2})
    assert first_nonfinite(INF, [INF] * 6, [INF] * 6) is None
    # the loss and every gradient at the same step
    assert first_nonfinite(3, [3] * 6, [3] * 6, 3)[:3] == (3, True, True)


def test_describe_names_step_layer_and_variable():
    event = describe(7, NAMES, False, False, {0, 1, 2}, {2}, loss_value=0.5)
    assert (event["step"], event["layer"], event["variable"], event["value"]) == (7, "hidden_2", "kernel", "NaN")
    assert event["message"] == ("nonfinite gradient (NaN) at step 7 in hidden_2/kernel "
                                "(first in backprop order; 3 of 6 gradients nonfinite), loss 0.5")
    event = describe(4, NAMES, True, False, set(range(6)), set())
    assert event["what"] == "loss" and event["layer"] == "logits" and event["value"] == "Inf"
    assert event["message"].startswith("nonfinite loss (Inf) at step 4; 6 of 6 gradients nonfinite")


def test_bad_arguments_name_the_argument():
    with pytest.raises(ValueError, match=r"`action` \('halt'\) must be one of stop, skip_step, warn"):
        NonFiniteGuard(action="halt")
    with pytest.raises(ValueError, match=r"`every` \(0\)"):
        NonFiniteGuard(every=0)


# ---- in the compiled step: a NaN created in the middle of the network --------------------------------

class SqrtRelu(keras.layers.Layer):
    """``sqrt(relu(h))``: finite forward, but at ``h == 0`` the backward pass gives ``0 * inf = NaN``."""

    def call(self, h):
        return tf.sqrt(tf.nn.relu(h))


def _sqrt_model():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((3,))
    h = keras.layers.Dense(4, kernel_initializer="ones", name="hidden_1")(inputs)
    h = SqrtRelu(name="sqrt")(h)
    logits = keras.layers.Dense(3, name="logits")(h)
    return GradlabModel(inputs, logits)


def _sqrt_data(bad_step: int, batch: int = 2, steps: int = 12):
    x = np.abs(np.random.default_rng(0).normal(size=(batch * steps, 3))).astype(np.float32) + 0.5
    x[bad_step * batch] = 0.0  # hidden_1 pre-activation exactly 0 for this row
    y = (np.arange(batch * steps) % 3).astype(np.int32)
    return x, y


@pytest.mark.parametrize("spe,bad_step,stop_at", [(1, 5, 6), (4, 6, 8)])
def test_stop_names_the_exact_step_layer_and_variable(spe, bad_step, stop_at):
    model = _sqrt_model()
    model.compile(optimizer=keras.optimizers.SGD(0.01),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), steps_per_execution=spe)
    x, y = _sqrt_data(bad_step)
    guard = NonFiniteGuard(action="stop")
    model.fit(x, y, batch_size=2, epochs=1, shuffle=False, verbose=0, callbacks=[guard])
    event = guard.events[0]
    assert (event["step"], event["layer"], event["variable"], event["what"], event["value"]) == \
        (bad_step, "hidden_1", "kernel", "gradient", "NaN")
    assert "2 of 4 gradients nonfinite" in event["message"]
    assert int(model.optimizer.iterations.numpy()) == stop_at  # stopped at the end of that execution
    assert all(np.isfinite(w).all() for w in model.get_weights())  # the bad update was not applied
    stops = [e for e in observations_for(model).events if e["kind"] == "nonfinite_stop"]
    assert len(stops) == 1 and stops[0]["step"] == bad_step and stops[0]["message"].startswith("training stopped: ")
    assert model.skip_nonfinite_steps is True  # stays attached between fits (no retrace) ...
    guard.detach()
    assert model.skip_nonfinite_steps is False and model.tap_keys == []  # ... until detached


def test_skip_step_goes_on_and_keeps_weights_finite(tmp_path):
    model = _sqrt_model()
    model.compile(optimizer=keras.optimizers.SGD(0.01),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), steps_per_execution=3)
    x, y = _sqrt_data(4)
    guard = NonFiniteGuard(action="skip_step", log_dir=str(tmp_path))
    history = model.fit(x, y, batch_size=2, epochs=2, shuffle=False, verbose=0, callbacks=[guard])
    assert int(model.optimizer.iterations.numpy()) == 24  # skipped steps still count
    assert [e["step"] for e in guard.events] == [4, 16]  # once per epoch, exact
    assert guard.count == 2
    assert all(np.isfinite(w).all() for w in model.get_weights())
    assert all(np.isfinite(history.history["loss"]))
    assert [v for _, v in read_scalars(tmp_path)["nonfinite/steps"]] == [1.0, 2.0]
    assert "step 4 in hidden_1/kernel" in read_text(tmp_path, "nonfinite/report", subdir=".")[0][1]


def test_warn_applies_the_update():
    model = _sqrt_model()
    model.compile(optimizer=keras.optimizers.SGD(0.01),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x, y = _sqrt_data(3)
    guard = NonFiniteGuard(action="warn")
    model.fit(x, y, batch_size=2, epochs=1, shuffle=False, verbose=0, callbacks=[guard])
    assert guard.events[0]["step"] == 3
    assert int(model.optimizer.iterations.numpy()) == 12
    assert not np.isfinite(model.get_layer("hidden_1").get_weights()[0]).all()  # warn does not protect


# ---- a stopped gradlab run ---------------------------------------------------------------------------

def _overflow_npz(tmp_path, bad_row: int):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(40, 4)).astype(np.float32)
    x[bad_row] = 3e38  # finite, but x @ W overflows to inf
    y = (np.arange(40) % 3).astype(np.int32)
    path = tmp_path / "overflow.npz"
    np.savez(path, x=x, y=y)
    return path


def _stop_config(path):
    return {"name": "nanrun", "seed": 0, "data": {"name": "npz", "path": str(path), "batch_size": 4, "shuffle": False},
            "model": {"kind": "softmax_linear"}, "train": {"epochs": 2, "learning_rate": 0.01},
            "diagnostics": [{"type": "gradient_stats", "every": 2}, {"type": "nonfinite", "action": "stop"},
                            {"type": "health"}]}


def test_stopped_run_leaves_a_consistent_run_directory(tmp_path):
    path = _overflow_npz(tmp_path, bad_row=4 * 3 + 1)  # in the batch of step 3
    run_dir = tmp_path / "run"
    with pytest.raises(NonFiniteError) as err:
        gradlab.run(_stop_config(path), run_dir=run_dir, quiet=True)
    message = str(err.value)
    assert "\n" not in message and "step 3" in message and "logits/kernel" in message and str(run_dir) in message
    metrics = read_metrics(run_dir)
    assert metrics["status"] == "stopped"
    assert (metrics["stopped"]["step"], metrics["stopped"]["layer"], metrics["stopped"]["variable"]) == \
        (3, "logits", "kernel")
    assert metrics["steps"] == 4
    assert any(v["verdict"] == "exploding" and v["layer"] == "logits" and v["first_step"] == 3
               for v in metrics["verdicts"])
    assert (run_dir / "config.yaml").exists()
    with h5py.File(run_dir / "final.weights.h5") as f:
        arrays = []
        f.visititems(lambda name, obj: arrays.append(obj[()]) if isinstance(obj, h5py.Dataset) else None)
    assert arrays and all(np.isfinite(a).all() for a in arrays)  # the last finite weights
    assert read_text(run_dir, "nonfinite/report")


def test_cli_exit_status_3_and_one_line_message(tmp_path):
    path = _overflow_npz(tmp_path, bad_row=9)  # step 2
    cfg = tmp_path / "nan.yaml"
    cfg.write_text(json.dumps(_stop_config(path)))  # JSON is YAML
    proc = gradlab_cli("run", str(cfg), "--run-dir", str(tmp_path / "cli-run"), "--quiet")
    assert proc.returncode == 3, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("training stopped: nonfinite") and "at step 2" in lines[-1] and "logits" in lines[-1]
    assert read_metrics(tmp_path / "cli-run")["status"] == "stopped"


# ---- plain Keras models ----------------------------------------------------------------------------

def _plain_model():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((4,))
    h = keras.layers.Dense(5, activation="relu", name="dense_a")(inputs)
    out = keras.layers.Dense(3, name="dense_b")(h)
    model = keras.Model(inputs, out)
    model.compile(optimizer=keras.optimizers.SGD(0.01),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def test_plain_keras_model_stops_on_nonfinite_loss():
    model = _plain_model()
    x = np.random.default_rng(0).normal(size=(32, 4)).astype(np.float32)
    y = (np.arange(32) % 3).astype(np.int32)
    x[4 * 2] = 3e38  # batch of step 2
    guard = NonFiniteGuard(action="stop", probe_data=(x[:8], y[:8]))
    model.fit(x, y, batch_size=4, epochs=1, shuffle=False, verbose=0, callbacks=[guard])
    assert int(model.optimizer.iterations.numpy()) == 3
    event = guard.events[0]
    assert event["step"] == 2 and event["what"] == "loss"
    assert event["layer"] == "dense_b"  # the probe gradients at the (now NaN) weights name the output layer first


def test_plain_model_nonfinite_loss_with_finite_gradients_is_reported_as_the_loss():
    """The training loss turns NaN at step 5 while every gradient stays finite (a NaN term cut
    off from backprop): with probe data the report is the loss at step 5, and no gradient, layer
    or Inf is made up from an all-finite probe batch."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((4,))
    out = keras.layers.Dense(3, name="dense_b")(inputs)
    model = keras.Model(inputs, out)
    ce = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    counter = tf.Variable(0, trainable=False)

    def loss(y_true, y_pred):
        # NaN (cut off from backprop) at the sixth training call: step 5
        step = counter.assign_add(1) - 1
        bad = tf.where(tf.equal(step, 5), tf.constant(np.nan, tf.float32), 0.0)
        return ce(y_true, y_pred) + tf.stop_gradient(bad)

    model.compile(optimizer=keras.optimizers.SGD(0.01), loss=loss)
    x = np.random.default_rng(0).normal(size=(32, 4)).astype(np.float32)
    y = (np.arange(32) % 3).astype(np.int32)
    guard = NonFiniteGuard(action="warn", probe_data=(x[:8], y[:8]))
    model.fit(x, y, batch_size=4, epochs=1, shuffle=False, verbose=0, callbacks=[guard])
    assert all(np.isfinite(v.numpy()).all() for v in model.trainable_variables)
    event = guard.events[0]
    assert event["step"] == 5 and event["what"] == "loss" and event["value"] == "NaN", event
    assert event["layer"] == "" and event["nonfinite_gradients"] == 0, event
    assert event["message"] == "nonfinite loss (NaN) at step 5", event["message"]


def test_plain_model_nonfinite_gradient_with_finite_loss_is_found_at_the_end_of_a_short_fit():
    """A NaN gradient whose loss stays finite (sqrt at 0 in the forward pass: finite value,
    infinite derivative) shows only on the probe batch. A fit shorter than `probe_every` is
    checked once more at its end, and the report says where and when it was found."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((4,))
    h = keras.layers.Dense(4, name="dense_a", kernel_initializer="zeros")(inputs)
    h = keras.layers.Lambda(lambda t: tf.sqrt(tf.nn.relu(t)), name="root")(h)  # d/dt sqrt at 0: Inf
    out = keras.layers.Dense(3, name="dense_b")(h)
    model = keras.Model(inputs, out)
    model.compile(optimizer=keras.optimizers.SGD(0.0),  # no update: the loss stays finite throughout
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x = np.random.default_rng(0).normal(size=(16, 4)).astype(np.float32)
    y = (np.arange(16) % 3).astype(np.int32)
    guard = NonFiniteGuard(action="warn", probe_data=(x[:8], y[:8]))  # probe_every 100 > 4 steps
    history = model.fit(x, y, batch_size=4, epochs=1, shuffle=False, verbose=0, callbacks=[guard])
    assert math.isfinite(history.history["loss"][-1])
    assert len(guard.events) == 1, guard.events
    event = guard.events[0]
    assert event["step"] == 4 and event["what"] == "gradient" and event["layer"] == "dense_a", event
    assert event["source"] == "probe batch"
    # (step 4 is the end of the fit: probe_every's schedule never came due in these 4 steps)
    assert "on the probe batch, found at step 4" in event["message"], event["message"]


def test_plain_keras_model_cannot_skip_steps():
    model = _plain_model()
    with pytest.raises(ValueError, match="`action` \\('skip_step'\\) needs a gradlab model"):
        model.fit(np.zeros((4, 4)), np.zeros(4), verbose=0, callbacks=[NonFiniteGuard(action="skip_step")])


def test_loss_scale_overflow_steps_are_not_reported_as_exploding(tmp_path):
    """mixed_float16 on unstandardised digits: the loss scaler's first scales overflow the float16
    gradients for several steps (routine: it skips them and halves its scale). Those steps are
    left out of the gradient statistics, so nothing is Inf and Health gives no exploding verdict."""
    cfg = {"name": "mp", "seed": 0, "data": {"name": "digits", "standardize": False},
           "model": {"kind": "mlp", "hidden": [64]},
           "train": {"precision": "mixed_float16", "epochs": 1, "learning_rate": 0.01},
           "diagnostics": [{"type": "gradient_stats", "every": 1, "histogram_every": 0},
                           {"type": "nonfinite", "action": "stop"}, {"type": "health"}]}
    result = gradlab.run(cfg, run_dir=tmp_path / "run", quiet=True)
    assert result.metrics["status"] == "completed"
    scalars = read_scalars(result.run_dir)
    norms = scalars["gradients/global_norm"]
    assert all(math.isfinite(v) for _, v in scalars["gradients/global_norm/window_max"])
    assert all(math.isfinite(v) for tag, series in scalars.items() if tag.startswith("gradients/")
               for _, v in series), "an overflow step entered the gradient statistics"
    # the skipped steps have no due write of their own (every: 1): some steps are missing
    steps = [s for s, _ in norms]
    assert len(steps) < result.metrics["steps"], "no step overflowed: the test no longer tests anything"
    assert not any(v["verdict"] == "exploding" for v in result.metrics["verdicts"]), result.metrics["verdicts"]


def test_an_epoch_whose_every_step_was_skipped_has_no_loss_not_zero(tmp_path):
    """A learning rate of 1e37 makes every step after the first nonfinite; skip_step skips them,
    so epoch 1 trained no step: its loss is NaN (null in metrics.json), never a perfect 0."""
    cfg = {"name": "nan", "seed": 0, "data": {"name": "iris", "batch_size": 16},
           "model": {"kind": "mlp", "hidden": [8], "activation": "relu"},
           "train": {"learning_rate": 1.0e37, "epochs": 2},
           "diagnostics": [{"type": "nonfinite", "action": "skip_step"}]}
    result = gradlab.run(cfg, run_dir=tmp_path / "run", quiet=True)
    epoch_loss = read_scalars(result.run_dir)["epoch_loss"]
    assert [s for s, _ in epoch_loss] == [0, 1]
    assert math.isfinite(epoch_loss[0][1]) and epoch_loss[0][1] > 0
    assert math.isnan(epoch_loss[1][1])
    assert read_metrics(result.run_dir)["loss"] is None


def test_plain_model_with_steps_per_execution_records_one_divergence_once():
    # steps_per_execution 4, probe every 4: the loss of the execution of steps 0-3 turns NaN at
    # step 2 (reported at the execution's first step, 0), and the probe after that execution (step
    # 4) found the same NaN weights and recorded the divergence a second time.
    model = _plain_model()
    model.compile(optimizer=keras.optimizers.SGD(0.01), steps_per_execution=4,
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x = np.random.default_rng(0).normal(size=(16, 4)).astype(np.float32)
    y = (np.arange(16) % 3).astype(np.int32)
    x[4 * 2] = 3e38  # batch of step 2
    guard = NonFiniteGuard(action="warn", probe_every=4, probe_data=(x[:4], y[:4]))
    model.fit(x, y, batch_size=4, epochs=1, shuffle=False, verbose=0, callbacks=[guard])
    assert [e["step"] for e in guard.events] == [0], guard.events
    assert guard.count == 1
