"""The applied update, recorded as the optimizer writes it (no weight copy) or from a weight snapshot.

gradient_stats' ``update_ratio = ||w_after - w_before|| / ||w_before||`` needs the update the
optimizer applied. With one device and an optimizer whose writes to the weights all go through
its ``assign_add``/``assign_sub``, the step records those tensors (``_UpdateCapture``); for any
other optimizer it keeps float32 copies of the weights. Both must give the same ratios, and the
choice must be the right one for each optimizer.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from gradlab import events
from gradlab.callbacks import GradientStats, NonFiniteGuard
from gradlab.losses import make_loss
from gradlab.train_step import GradlabModel, update_capture_supported

RECORDED = {
    "sgd": lambda: keras.optimizers.SGD(0.05),
    "momentum": lambda: keras.optimizers.SGD(0.05, momentum=0.9, nesterov=True),
    "adam": lambda: keras.optimizers.Adam(0.01),
    "rmsprop": lambda: keras.optimizers.RMSprop(0.01),
    "clipnorm": lambda: keras.optimizers.SGD(0.05, clipnorm=0.1),
}
SNAPSHOT = {
    "adamw (weight decay writes the variable directly)": lambda: keras.optimizers.AdamW(0.01),
    "gradient accumulation (a conditional write)": lambda: keras.optimizers.SGD(0.05, gradient_accumulation_steps=2),
    "loss scaling (a conditional apply)": lambda: keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(0.05)),
    "ftrl (assign)": lambda: keras.optimizers.Ftrl(0.05),
}


def _model(constraint=None, seed=0):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((6,))
    h = keras.layers.Dense(8, activation="tanh", name="hidden", kernel_constraint=constraint)(inputs)
    return GradlabModel(inputs, keras.layers.Dense(3, name="out")(h))


def _data(n=48):
    rng = np.random.default_rng(3)
    return rng.normal(size=(n, 6)).astype(np.float32), rng.integers(0, 3, n).astype(np.int32)


@pytest.mark.parametrize("name", list(RECORDED) + list(SNAPSHOT))
def test_the_trial_trace_tells_which_optimizers_can_be_recorded(name):
    model = _model()
    optimizer = (RECORDED | SNAPSHOT)[name]()
    optimizer.build(model.trainable_variables)
    before = [v.numpy().copy() for v in model.trainable_variables]
    ok, reason = update_capture_supported(optimizer, model.trainable_variables)
    assert ok == (name in RECORDED), reason
    assert bool(reason) == (name in SNAPSHOT)
    # a trace only: no weight and no optimizer step changed
    assert int(optimizer.iterations.numpy()) == 0
    for b, v in zip(before, model.trainable_variables):
        np.testing.assert_array_equal(b, v.numpy())


def test_a_weight_constraint_is_a_write_the_recording_cannot_see():
    model = _model(constraint=keras.constraints.MaxNorm(1.0))
    optimizer = keras.optimizers.SGD(0.05)
    optimizer.build(model.trainable_variables)
    ok, reason = update_capture_supported(optimizer, model.trainable_variables)
    assert not ok and "AssignVariableOp" in reason


def _update_ratios(tmp_path, make_optimizer, *, record: bool, spe=1, every=1, guard=False, monkeypatch=None):
    """Train a few steps with gradient_stats; return the update_ratio series and the update mode."""
    model = _model()
    model.compile(optimizer=make_optimizer(), loss=make_loss("cross_entropy", "mean"), steps_per_execution=spe)
    if not record:  # force the weight snapshot
        monkeypatch.setattr("gradlab.train_step.update_capture_supported", lambda *a: (False, "forced by the test"))
    log_dir = tmp_path / ("recorded" if record else "snapshot")
    callbacks = [GradientStats(log_dir=str(log_dir), every=every, histogram_every=0)]
    if guard:
        callbacks.append(NonFiniteGuard(action="skip_step"))
    x, y = _data()
    model.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0, callbacks=callbacks)
    if not record:
        monkeypatch.undo()
    scalars = events.read_scalars(log_dir)
    ratios = {tag: dict(series) for tag, series in scalars.items() if tag.endswith("/update_ratio")}
    return ratios, model._gradlab_update_mode, model._gradlab_snapshot


# Each optimizer once and each schedule once (the suite's time is part of CI's budget).
@pytest.mark.parametrize("name, spe, every, guard", [("sgd", 1, 1, False), ("momentum", 4, 2, False),
                                                     ("adam", 1, 3, True), ("adam", 1, 1, False)],
                         ids=["sgd every step", "momentum spe 4 every 2", "adam skip_step guard every 3",
                              "adam every step"])
def test_recorded_updates_give_the_snapshot_s_ratios(tmp_path, monkeypatch, name, spe, every, guard):
    recorded, mode, snapshot = _update_ratios(tmp_path, RECORDED[name], record=True, spe=spe, every=every, guard=guard)
    assert mode == "capture" and snapshot is None  # no copy of the weights kept
    copied, mode, snapshot = _update_ratios(tmp_path, RECORDED[name], record=False, spe=spe, every=every,
                                            guard=guard, monkeypatch=monkeypatch)
    assert mode == "snapshot" and snapshot is not None
    assert set(recorded) == set(copied) == {f"gradients/{layer}/{var}/update_ratio"
                                            for layer in ("hidden", "out") for var in ("kernel", "bias")}
    for tag in recorded:
        # (with steps_per_execution 4 an execution writes its last due step only)
        assert sorted(recorded[tag]) == sorted(copied[tag]) and len(recorded[tag]) >= 4
        for step in recorded[tag]:
            # The recorded update is the tensor written; the snapshot's the float32 difference of the
            # weights, which loses digits to cancellation when the update is small against the weight.
            assert recorded[tag][step] == pytest.approx(copied[tag][step], rel=2e-3, abs=1e-7), (tag, step)
    assert min(v for series in recorded.values() for v in series.values()) > 0


def test_recorded_sgd_update_ratio_is_lr_times_gradient_norm_over_weight_norm(tmp_path):
    """SGD's update is exactly -lr * g: the ratio at step 0 is lr ||g|| / ||w_0||, from a second tape."""
    model = _model()
    model.compile(optimizer=keras.optimizers.SGD(0.05), loss=make_loss("cross_entropy", "mean"))
    x, y = _data(8)
    with tf.GradientTape() as tape:
        loss = make_loss("cross_entropy", "mean")(y, model(x))
    kernel = model.get_layer("hidden").kernel
    g = tape.gradient(loss, kernel).numpy().astype(np.float64)
    w0 = kernel.numpy().astype(np.float64)
    model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0,
              callbacks=[GradientStats(log_dir=str(tmp_path), every=1, histogram_every=0)])
    assert model._gradlab_update_mode == "capture"
    (step, got), = events.read_scalars(tmp_path)["gradients/hidden/kernel/update_ratio"]
    assert step == 0
    assert got == pytest.approx(0.05 * np.linalg.norm(g) / np.linalg.norm(w0), rel=1e-5)


@pytest.mark.parametrize("name", list(SNAPSHOT))
def test_optimizers_the_recording_cannot_see_fall_back_to_the_snapshot(tmp_path, name):
    model = _model()
    model.compile(optimizer=SNAPSHOT[name](), loss=make_loss("cross_entropy", "mean"))
    x, y = _data(16)
    model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0,
              callbacks=[GradientStats(log_dir=str(tmp_path), every=1, histogram_every=0)])
    assert model._gradlab_update_mode == "snapshot" and model._gradlab_snapshot is not None
    assert model._gradlab_update_capture_refused
    ratios = events.read_scalars(tmp_path)["gradients/hidden/kernel/update_ratio"]
    # (with gradient accumulation the optimizer counts one iteration per applied update: step 0 only)
    expected = [0] if "accumulation" in name else [0, 1]
    assert [s for s, _ in ratios] == expected and all(np.isfinite(v) for _, v in ratios)
    if "accumulation" not in name:
        assert ratios[-1][1] > 0


def test_a_new_optimizer_is_checked_again(tmp_path):
    # The trial trace runs once per optimizer; compiling the model again with another optimizer
    # must not reuse the first one's answer.
    model = _model()
    x, y = _data(16)
    stats = GradientStats(log_dir=str(tmp_path), every=1, histogram_every=0)
    for make, mode in ((lambda: keras.optimizers.SGD(0.05), "capture"), (lambda: keras.optimizers.AdamW(0.01), "snapshot"),
                       (lambda: keras.optimizers.Adam(0.01), "capture")):
        model.compile(optimizer=make(), loss=make_loss("cross_entropy", "mean"))
        model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0, callbacks=[stats])
        assert model._gradlab_update_mode == mode
