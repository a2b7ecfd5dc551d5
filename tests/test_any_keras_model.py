"""The diagnostics on other people's Keras models, trained by their own ``fit``: probability outputs,
Sequential names, several inputs and outputs, bad probe data, partial executions, recurrent layers."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from gradlab.callbacks import (ActivationSaturation, Diagnostic, GradientNoise, GradientStats, Health, NonFiniteGuard,
                               observations_for)
from gradlab.events import read_scalars


def _data(n=32, features=4, classes=3, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, features)).astype(np.float32), rng.integers(0, classes, n).astype(np.int32)


def test_softmax_output_with_from_logits_false_logs_the_pre_softmax_gradient(tmp_path):
    # Keras computes this cross-entropy from the logits behind the softmax, so dL/d(probabilities)
    # does not exist; the logged logits gradient is dL/dz, z the softmax's input: (p - onehot) / N.
    x, y = _data()
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, activation="softmax", name="out")])
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="sparse_categorical_crossentropy")
    w0 = [v.numpy() for v in model.trainable_variables]
    model.fit(x, y, epochs=1, batch_size=32, shuffle=False, verbose=0,
              callbacks=[GradientStats(log_dir=str(tmp_path), every=1, probe_data=(x, y))])
    z = x @ w0[0] + w0[1]
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    expected = np.linalg.norm((p - np.eye(3)[y]) / len(y))
    got = dict(read_scalars(tmp_path)["gradients/logits/norm"])[0]
    assert got == pytest.approx(expected, rel=1e-5)


def test_sequential_model_tags_carry_layer_names_without_the_model_name(tmp_path):
    x, y = _data()
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(5, activation="relu", name="hidden"),
                              keras.layers.Dense(3, name="out")], name="my_sequential")
    model.compile(optimizer="sgd", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x, y, epochs=1, batch_size=16, verbose=0,
              callbacks=[GradientStats(log_dir=str(tmp_path), every=1, probe_data=(x, y))])
    tags = set(read_scalars(tmp_path))
    assert {"gradients/hidden/kernel/norm", "gradients/out/bias/std", "gradients/hidden/layer_norm"} <= tags
    assert not any("my_sequential" in t for t in tags)


def _two_in_two_out(seed=0):
    keras.utils.set_random_seed(seed)
    a, b = keras.Input((4,), name="a"), keras.Input((2,), name="b")
    h = keras.layers.Dense(5, activation="tanh", name="h")(keras.layers.Concatenate()([a, b]))
    model = keras.Model([a, b], {"cls": keras.layers.Dense(3, activation="softmax", name="cls")(h),
                                 "reg": keras.layers.Dense(1, name="reg")(h)})
    model.compile(optimizer=keras.optimizers.SGD(0.05), loss={"cls": "sparse_categorical_crossentropy", "reg": "mse"})
    return model


def test_several_inputs_and_outputs_work_and_leave_the_training_metrics_alone(tmp_path):
    rng = np.random.default_rng(0)
    xa, xb = rng.normal(size=(32, 4)).astype(np.float32), rng.normal(size=(32, 2)).astype(np.float32)
    y = {"cls": rng.integers(0, 3, 32), "reg": rng.normal(size=(32, 1)).astype(np.float32)}
    plain, probed = _two_in_two_out(), _two_in_two_out()
    probed.set_weights(plain.get_weights())
    kwargs = dict(epochs=2, batch_size=8, shuffle=False, verbose=0)
    h_plain = plain.fit([xa, xb], y, **kwargs)
    callbacks = [GradientStats(log_dir=str(tmp_path), every=1, probe_data=([xa, xb], y)),
                 ActivationSaturation(log_dir=str(tmp_path), every=1, probe_data=([xa, xb], y)),
                 NonFiniteGuard(log_dir=str(tmp_path), probe_every=1, probe_data=([xa, xb], y))]
    h_probed = probed.fit([xa, xb], y, callbacks=callbacks, **kwargs)
    # the probes' loss evaluations did not enter Keras's per-output loss means
    for key in ("loss", "cls_loss", "reg_loss"):
        np.testing.assert_allclose(h_probed.history[key], h_plain.history[key], rtol=1e-6)
    s = read_scalars(tmp_path)
    assert {"gradients/h/kernel/norm", "gradients/reg/bias/norm", "gradients/logits/norm",
            "activations/h/saturated_fraction"} <= set(s)
    assert len(s["gradients/logits/norm"]) == 9  # steps 0..8


def test_per_sample_diagnostics_refuse_several_inputs_clearly():
    rng = np.random.default_rng(0)
    x = [rng.normal(size=(8, 4)).astype(np.float32), rng.normal(size=(8, 2)).astype(np.float32)]
    y = {"cls": rng.integers(0, 3, 8), "reg": rng.normal(size=(8, 1)).astype(np.float32)}
    model = _two_in_two_out()
    with pytest.raises(ValueError, match="one input and one output"):
        model.fit(x, y, epochs=1, verbose=0, callbacks=[GradientNoise(log_dir=None, probe_data=(x, y))])


@pytest.mark.parametrize("probe,message", [
    (lambda x, y: (x[:, :3], y), "probe_data does not fit the model or its loss: .*expected axis -1"),
    (lambda x, y: (x[:0], y[:0]), "probe_data has no samples"),
    (lambda x, y: (x[:10], y[:8]), r"different numbers of rows \(8, 10\)"),
    (lambda x, y: (x, None), "probe_data's y must be an array"),
])
def test_bad_probe_data_is_one_clear_line(probe, message):
    x, y = _data()
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    model.compile(optimizer="sgd", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    with pytest.raises(ValueError, match=message) as err:
        model.fit(x, y, epochs=1, verbose=0, callbacks=[GradientStats(log_dir=None, probe_data=probe(x, y))])
    assert "\n" not in str(err.value) and str(err.value).startswith("GradientStats: ")


def test_short_last_execution_of_an_epoch_is_labelled_with_its_real_steps():
    # 10 batches, steps_per_execution 3: executions of 3, 3, 3 and 1 steps. Keras reports the last
    # one as if it had 3 steps; the labels must follow the optimizer's iteration count.
    x, y = _data(10)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, name="out")])
    model.compile(optimizer="sgd", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  steps_per_execution=3)
    model.fit(x, y, batch_size=1, epochs=2, verbose=0,
              callbacks=[GradientStats(log_dir=None, every=1, probe_data=(x, y))])
    steps = [s for s, _ in observations_for(model).series["gradients/global_norm"]]
    assert int(model.optimizer.iterations.numpy()) == 20
    assert steps == [0, 3, 6, 9, 10, 13, 16, 19, 20]


def test_nonfinite_warn_on_a_plain_model_reports_each_step_once():
    x, y = _data(24)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, activation="relu"), keras.layers.Dense(3)])
    model.compile(optimizer=keras.optimizers.SGD(1e6),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    guard = NonFiniteGuard(log_dir=None, action="warn", probe_every=1, probe_data=(x[:16], y[:16]))
    model.fit(x * 100, y, batch_size=4, epochs=3, verbose=0, callbacks=[guard])
    steps = [e["step"] for e in guard.events]
    assert steps, "the run was meant to diverge"
    assert steps == sorted(set(steps))
    assert guard.count <= int(model.optimizer.iterations.numpy()) + 1
    from_probe = [e["message"] for e in guard.events if e.get("source") == "probe batch"]
    assert from_probe and all(f"on the probe batch, found at step {e['step']}" in e["message"]
                              for e in guard.events if e.get("source") == "probe batch")


def test_gated_recurrent_layers_are_not_measured_as_tanh():
    x = np.random.default_rng(0).normal(size=(8, 5, 3)).astype(np.float32)
    y = np.zeros(8, np.int32)
    model = keras.Sequential([keras.Input((5, 3)), keras.layers.LSTM(4, name="lstm"),
                              keras.layers.Dense(2, activation="tanh", name="dense")])
    model.compile(optimizer="sgd", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x, y, epochs=1, verbose=0, callbacks=[ActivationSaturation(log_dir=None, probe_data=(x, y))])
    kinds = observations_for(model).meta["activation"]
    assert kinds["lstm"] == "other" and kinds["dense"] == "tanh"
    assert "activations/lstm/saturated_fraction" not in observations_for(model).series


def test_several_probe_diagnostics_on_several_models_do_not_warn_of_retracing():
    import logging

    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("tensorflow")
    logger.addHandler(handler)
    try:
        x, y = _data(64)
        # each diagnostic traces its probe once per model: not "frequent retracing" (TensorFlow
        # warns from the sixth trace of one function within a few calls)
        for _ in range(6):
            model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(5, activation="tanh"), keras.layers.Dense(3)])
            model.compile(optimizer="sgd", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
            model.fit(x, y, epochs=1, verbose=0, callbacks=[
                GradientStats(log_dir=None, every=2, probe_data=(x, y)),
                ActivationSaturation(log_dir=None, every=2, probe_data=(x, y)),
                GradientNoise(log_dir=None, every=2, probe_data=(x, y)),
                NonFiniteGuard(log_dir=None, action="warn", probe_every=1, probe_data=(x, y))])
    finally:
        logger.removeHandler(handler)
    # (Keras's own train functions share one code object across models: their warning is not ours)
    assert not [r.getMessage() for r in records
                if "retracing" in r.getMessage() and "TensorFlowTrainer" not in r.getMessage()]


def test_steps_per_epoch_with_data_left_counts_the_whole_last_execution():
    # steps_per_epoch 3, steps_per_execution 2, a repeating dataset: Keras runs whole executions,
    # so an epoch ends after 4 steps; the labels must follow the optimizer's count.
    x, y = _data(64)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, name="out")])
    model.compile(optimizer="sgd", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  steps_per_execution=2)
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(4).repeat()
    model.fit(ds, steps_per_epoch=3, epochs=2, verbose=0,
              callbacks=[GradientStats(log_dir=None, every=1, probe_data=(x, y))])
    steps = [s for s, _ in observations_for(model).series["gradients/global_norm"]]
    total = int(model.optimizer.iterations.numpy())
    assert steps == sorted(set(steps)) and steps[-1] == total and total in (6, 8)


def test_constructor_arguments_take_numpy_numbers_and_name_a_bad_log_dir(tmp_path):
    # schedules and thresholds often come out of numpy arrays or config tables
    stats = GradientStats(log_dir=tmp_path, every=np.int64(5), histogram_every=np.int32(10), probe_size=np.int64(8))
    assert (stats.every, stats.histogram_every, stats.probe_size) == (5, 10, 8)
    assert type(stats.every) is int and stats.log_dir == str(tmp_path)
    assert Health(dead_fraction=np.float32(0.25)).thresholds["dead_fraction"] == 0.25
    with pytest.raises(ValueError, match=r"^`log_dir` \(5\) must be a directory path \(str or os.PathLike\) or None$"):
        GradientStats(log_dir=5)
    with pytest.raises(ValueError, match=r"^`every` \(True\) must be a positive integer$"):
        GradientStats(every=True)
    with pytest.raises(ValueError, match=r"`every` \(np.int64\(0\)\) must be a positive integer"):
        GradientStats(every=np.int64(0))
    with pytest.raises(ValueError, match=r"^`dead_fraction` \(np.float64\(1.0\)\) must be a number in \(0, 1\)$"):
        Health(dead_fraction=np.float64(1.0))
    with pytest.raises(ValueError, match=r"^`converged_loss` \(1000000000.*\) must be a positive number$"):
        Health(converged_loss=10**400)  # an int beyond float's range: not an OverflowError
    with pytest.raises(ValueError, match=r"^`probe_every` \(2.5\) must be a non-negative integer$"):
        NonFiniteGuard(probe_every=2.5)


def test_a_subclass_that_skips_super_on_train_begin_is_told_so():
    class Forgetful(Diagnostic):
        uses_probe = True

        def on_train_begin(self, logs=None):  # no super(): nothing is set up
            self.started = True

        def probe(self, model, x, y):
            return {"o": tf.reduce_mean(model(x))}

        def write_probe(self, step, values):
            self.scalar("mine/o", values["o"], step)

    x, y = _data()
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    model.compile(optimizer="sgd", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    diag = Forgetful(every=2, probe_data=(x, y))
    with pytest.warns(RuntimeWarning, match=r"Forgetful.on_train_begin did not call super\(\).on_train_begin"):
        model.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[diag])
    assert "mine/o" not in observations_for(model).series
