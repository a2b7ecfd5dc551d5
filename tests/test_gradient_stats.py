"""gradient_stats: pure statistics vs numpy, the step-0 gradient vs a closed form, plain Keras models,
a spike between writes with steps_per_execution > 1, and the exact tag set of a gradlab run."""

from __future__ import annotations

import os

import keras
import numpy as np
import pytest
import tensorflow as tf

import gradlab
from gradlab.callbacks import GradientStats, observations_for
from gradlab.callbacks.gradient_stats import stacked_variable_stats, update_ratio, update_ratios, variable_stats
from gradlab.data import load_iris
from gradlab.events import read_scalars, read_tags

RNG = np.random.default_rng(3)


# ---- pure functions vs numpy -------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(7, 5), (13,), (2, 3, 4)])
def test_variable_stats_match_numpy(shape):
    g = RNG.normal(size=shape).astype(np.float32)
    g.flat[::4] = 0.0
    stats = {k: float(v) for k, v in variable_stats(tf.constant(g)).items()}
    g64 = g.astype(np.float64)
    assert stats["norm"] == pytest.approx(np.linalg.norm(g64), rel=1e-6)
    assert stats["mean"] == pytest.approx(g64.mean(), abs=1e-7)
    assert stats["std"] == pytest.approx(g64.std(), rel=1e-5)
    assert stats["max_abs"] == pytest.approx(np.abs(g64).max())
    assert stats["zero_fraction"] == pytest.approx(np.mean(g == 0))


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "tf.function"])
@pytest.mark.parametrize("offset", [0.0, 1e-3, 0.01, 0.5, 1e3])
def test_variable_stats_std_is_exact_with_or_without_a_large_mean(offset, compiled):
    """``std`` from ``E[g^2] - mean^2`` when that is well conditioned, two-pass otherwise: either
    way it matches numpy (a one-pass std of ``1000 + N(0, 0.01)`` in float32 would be noise)."""
    g = (offset + 0.01 * RNG.normal(size=(400, 300))).astype(np.float32)
    g64 = g.astype(np.float64)
    stats_fn = tf.function(variable_stats) if compiled else variable_stats
    for squared_norm in (None, tf.constant(float(np.sum(g64 ** 2)), tf.float32)):
        stats = {k: float(v) for k, v in stats_fn(tf.constant(g), squared_norm).items()}
        assert stats["std"] == pytest.approx(g64.std(), rel=1e-5)
        assert stats["mean"] == pytest.approx(g64.mean(), rel=1e-5, abs=1e-9)


def test_zero_fraction_of_a_gradient_past_float32_integers():
    """Above 2^24 entries the zeros are counted in int64 (that path, against the exact fraction)."""
    g = np.ones(2 ** 24 + 7, np.float32)
    g[:2 ** 24 + 3] = 0.0  # 2^24 + 3 is not a float32 integer
    fraction = float(variable_stats(tf.constant(g))["zero_fraction"])
    assert fraction == pytest.approx((2 ** 24 + 3) / (2 ** 24 + 7), rel=1e-7)
    assert fraction < 1.0


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "tf.function"])
def test_zero_fraction_of_edge_values(compiled):
    """zero_fraction counts what TensorFlow's ``g == 0`` counts, eager and compiled: -0.0 is zero,
    +-Inf and NaN are not, and a subnormal is what the kernels make of it (TensorFlow flushes
    subnormals to zero on a CPU, so numpy's count differs by exactly those)."""
    tiny = np.float32(1e-45)  # the smallest float32 subnormal
    cases = [
        np.array([0.0, -0.0, tiny, -tiny, 1.0, 0.0], np.float32),
        np.array([np.inf, -np.inf, 0.0, 2.0, -0.0], np.float32),
        np.array([np.nan, 0.0, 1.0, -0.0, np.nan, 3.0, 0.0], np.float32),
        np.zeros(1000, np.float32),
        np.where(RNG.random(300_001) < 0.37, 0.0, RNG.normal(size=300_001)).astype(np.float32),
    ]
    stats_fn = tf.function(variable_stats) if compiled else variable_stats
    for g in cases:
        fraction = float(stats_fn(tf.constant(g))["zero_fraction"])
        by_comparison = int(tf.reduce_sum(tf.cast(tf.equal(tf.constant(g), 0.0), tf.int64)))
        assert round(fraction * g.size) == by_comparison, g[:8]
        subnormal = np.isfinite(g) & (g != 0) & (np.abs(g) < np.finfo(np.float32).tiny)
        assert by_comparison == np.count_nonzero(g == 0) + np.count_nonzero(subnormal)  # numpy, flushed


def test_recorded_update_squared_norm_needs_no_negated_copy():
    """The step's recorded updates give ``sum(delta^2)`` from the tensor written: equal to the
    norm of the built (signed) delta for one assign_sub, and for several writes summed."""
    from gradlab.train_step import _UpdateCapture

    v = keras.Variable(RNG.normal(size=(5, 4)).astype(np.float32))
    opt = keras.optimizers.SGD(0.1)
    opt.build([v])
    capture = _UpdateCapture(opt, [v])
    a = tf.constant(RNG.normal(size=(5, 4)).astype(np.float32))
    b = tf.constant(RNG.normal(size=(5, 4)).astype(np.float32))
    with capture:
        opt.assign_sub(v, a)
    deltas = capture.deltas([v])
    np.testing.assert_allclose(deltas[0].numpy(), -a.numpy())
    assert float(deltas.squared_norm(0)) == pytest.approx(float(np.sum(a.numpy().astype(np.float64) ** 2)), rel=1e-6)
    with capture:  # a second write to the same variable: the delta is a - b... summed with signs
        opt.assign_add(v, b)
    deltas = capture.deltas([v])
    expected = (b.numpy().astype(np.float64) - a.numpy())
    np.testing.assert_allclose(deltas[0].numpy(), expected, rtol=1e-6)
    assert float(deltas.squared_norm(0)) == pytest.approx(float(np.sum(expected ** 2)), rel=1e-5)


def test_variable_stats_of_empty_gradient_are_zero():
    stats = {k: float(v) for k, v in variable_stats(tf.zeros([0, 3])).items()}
    assert stats == {"norm": 0.0, "mean": 0.0, "std": 0.0, "max_abs": 0.0, "zero_fraction": 0.0}


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "tf.function"])
def test_stacked_stats_equal_the_per_gradient_stats(compiled):
    """The vectorised statistics the step uses, gradient by gradient, against numpy (float64):
    an ordinary gradient, one whose mean dwarfs its spread (two-pass std), an empty one, one
    with zeros; a NaN entry makes norm, mean, std and max_abs NaN and leaves the zero count
    exact; and variable_stats of each one alone gives the same."""
    grads = [RNG.normal(size=(30, 20)).astype(np.float32),
             (1e3 + 0.01 * RNG.normal(size=(50,))).astype(np.float32),
             np.zeros((0, 4), np.float32),
             np.where(RNG.random((7, 9)) < 0.5, 0.0, RNG.normal(size=(7, 9))).astype(np.float32),
             np.array([1.0, np.nan, 0.0, -2.0], np.float32)]
    tensors = [tf.constant(g) for g in grads]
    squared = tf.stack([2.0 * tf.nn.l2_loss(t) for t in tensors])
    fn = tf.function(stacked_variable_stats) if compiled else stacked_variable_stats
    stacked = {k: v.numpy() for k, v in fn(tensors, squared).items()}
    for i, g in enumerate(grads):
        g64 = g.astype(np.float64).ravel()
        if g64.size == 0:
            expected = dict.fromkeys(("norm", "mean", "std", "max_abs", "zero_fraction"), 0.0)
        else:
            expected = {"norm": np.sqrt(np.sum(g64 ** 2)), "mean": g64.mean(), "std": g64.std(),
                        "max_abs": np.abs(g64).max(), "zero_fraction": np.mean(g64 == 0)}
        single = {k: float(v) for k, v in variable_stats(tensors[i], squared[i]).items()}
        for stat, value in expected.items():
            np.testing.assert_allclose(stacked[stat][i], value, rtol=1e-4, atol=1e-7, equal_nan=True,
                                       err_msg=f"{stat} of {i}")
            np.testing.assert_allclose(single[stat], stacked[stat][i], rtol=2e-5, equal_nan=True, err_msg=f"{stat} of {i}")
    g64 = grads[1].astype(np.float64)
    assert stacked["std"][1] == pytest.approx(g64.std(), rel=1e-4)  # the two-pass path, not noise
    assert list(stacked["zero_fraction"][2:4]) == [0.0, pytest.approx(np.mean(grads[3] == 0))]


def test_stacked_stats_of_gradients_of_unknown_size():
    fn = tf.function(stacked_variable_stats, input_signature=[[tf.TensorSpec([None], tf.float32)] * 2,
                                                              tf.TensorSpec([2], tf.float32)])
    a, b = np.array([3.0, 0.0, -4.0], np.float32), np.array([], np.float32)
    out = {k: v.numpy() for k, v in fn([a, b], tf.constant([25.0, 0.0])).items()}
    assert out["norm"].tolist() == [5.0, 0.0] and out["max_abs"].tolist() == [4.0, 0.0]
    assert out["zero_fraction"][0] == pytest.approx(1 / 3) and out["zero_fraction"][1] == 0.0


def test_update_ratios_of_vectors_follow_the_zero_weight_convention():
    w = RNG.normal(size=(4, 3)).astype(np.float32)
    d = (RNG.normal(size=(4, 3)) * 0.01).astype(np.float32)
    cases = [(d, w), (d, np.zeros_like(w)), (np.zeros_like(w), np.zeros_like(w)), (np.zeros_like(w), w)]
    ratios = update_ratios(tf.constant([float(np.sum(c[0].astype(np.float64) ** 2)) for c in cases]),
                                   tf.constant([float(np.sum(c[1].astype(np.float64) ** 2)) for c in cases])).numpy()
    expected = [np.linalg.norm(d) / np.linalg.norm(w), 1.0, 0.0, 0.0]  # ||w|| = 0: / ||w_after|| = ||d||
    np.testing.assert_allclose(ratios, expected, rtol=1e-5)
    np.testing.assert_allclose([float(update_ratio(delta, before)) for delta, before in cases], expected, rtol=1e-5)


def test_update_ratio_and_zero_weight_convention():
    w = RNG.normal(size=(4, 3)).astype(np.float32)
    d = RNG.normal(size=(4, 3)).astype(np.float32) * 0.01
    assert float(update_ratio(d, w)) == pytest.approx(np.linalg.norm(d) / np.linalg.norm(w), rel=1e-5)
    assert float(update_ratio(d, np.zeros_like(w))) == pytest.approx(1.0)  # ||w_before|| = 0: divide by ||w_after||
    assert float(update_ratio(np.zeros_like(w), np.zeros_like(w))) == 0.0  # 0/0 is reported as 0


def test_bad_arguments_name_the_argument():
    with pytest.raises(ValueError, match=r"`every` \(0\) must be a positive integer"):
        GradientStats(every=0)
    with pytest.raises(ValueError, match=r"`histogram_every` \(-3\)"):
        GradientStats(histogram_every=-3)


# ---- values against an independent computation ---------------------------------------------------

def test_step0_kernel_gradient_matches_closed_form(tmp_path):
    """softmax_linear, zero init, one full batch in file order: dL/dW = X^T (softmax(0) - Y) / N."""
    cfg = {"name": "closed-form", "seed": 0,
           "data": {"name": "iris", "batch_size": 150, "shuffle": False},
           "model": {"kind": "softmax_linear", "kernel_initializer": "zeros"},
           "train": {"loss": "cross_entropy", "epochs": 2, "learning_rate": 0.1},
           "diagnostics": [{"type": "gradient_stats", "every": 1, "histogram_every": 0}]}
    result = gradlab.run(cfg, run_dir=tmp_path / "run", quiet=True)
    s = read_scalars(result.run_dir, "train")
    iris = load_iris()
    x, y = iris.x.astype(np.float64), np.eye(3)[iris.y]
    n = len(x)
    kernel_grad = x.T @ (1 / 3 - y) / n
    got = dict(s["gradients/logits/kernel/norm"])[0]
    assert abs(got - np.linalg.norm(kernel_grad)) / np.linalg.norm(kernel_grad) < 1e-5
    # d L / d logits = (p - Y) / N at step 0 (mean reduction)
    assert dict(s["gradients/logits/norm"])[0] == pytest.approx(np.linalg.norm((1 / 3 - y) / n), rel=1e-5)
    # the optimizer's actual update: W went from 0 to -lr * g, so the zero-weight convention gives 1
    assert dict(s["gradients/logits/kernel/update_ratio"])[0] == pytest.approx(1.0, rel=1e-6)
    assert dict(s["gradients/logits/kernel/zero_fraction"])[0] == pytest.approx(np.mean(kernel_grad == 0))


def test_plain_keras_model_with_its_own_fit_writes_gradient_tags(tmp_path):
    keras.utils.set_random_seed(0)
    inputs = keras.Input((5,))
    h = keras.layers.Dense(7, activation="tanh", name="enc")(inputs)
    out = keras.layers.Dense(3, name="head")(h)
    model = keras.Model(inputs, out)
    model.compile(optimizer=keras.optimizers.SGD(0.05),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x = RNG.normal(size=(64, 5)).astype(np.float32)
    y = RNG.integers(0, 3, 64)
    probe = (x[:32], y[:32])
    cb = GradientStats(log_dir=str(tmp_path), every=2, histogram_every=4, probe_data=probe)
    model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0, callbacks=[cb])

    tags = read_tags(tmp_path)
    expected = {"gradients/global_norm", "gradients/logits/norm"}
    for layer in ("enc", "head"):
        expected.add(f"gradients/{layer}/layer_norm")
        for var in ("kernel", "bias"):
            expected |= {f"gradients/{layer}/{var}/{s}" for s in
                         ("norm", "mean", "std", "max_abs", "zero_fraction", "update_ratio")}
    assert tags["scalars"] == expected
    assert tags["histograms"] == {f"gradients/{l}/{v}" for l in ("enc", "head") for v in ("kernel", "bias")}

    s = read_scalars(tmp_path)
    assert [step for step, _ in s["gradients/enc/kernel/norm"]] == [0, 2, 4]
    # the last value describes the final weights: compare with an independent tape on the probe batch
    with tf.GradientTape() as tape:
        loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)(probe[1], model(probe[0]))
    g = tape.gradient(loss, model.get_layer("enc").kernel)
    assert s["gradients/enc/kernel/norm"][-1][1] == pytest.approx(float(tf.norm(g)), rel=1e-4)
    # published for Health as well
    assert observations_for(model).series["gradients/head/layer_norm"][-1][0] == 4


def test_spike_between_writes_lands_in_window_max(tmp_path):
    """steps_per_execution 4, writes every 8 steps: a huge input row at step 5 (never a due step)."""
    rng = np.random.default_rng(0)
    n, batch, spike_step = 48, 4, 5
    x = rng.normal(size=(n, 4)).astype(np.float32)
    y = (np.arange(n) % 3).astype(np.int32)
    x[spike_step * batch] *= 1e4  # one row of the batch trained at step 5
    path = tmp_path / "spike.npz"
    np.savez(path, x=x, y=y)
    cfg = {"name": "spike", "seed": 0,
           "data": {"name": "npz", "path": str(path), "batch_size": batch, "shuffle": False},
           "model": {"kind": "softmax_linear", "kernel_initializer": "zeros"},
           "train": {"loss": "cross_entropy", "epochs": 1, "learning_rate": 1e-6, "steps_per_execution": 4},
           "diagnostics": [{"type": "gradient_stats", "every": 8, "histogram_every": 0}]}
    result = gradlab.run(cfg, run_dir=tmp_path / "run", quiet=True)
    s = read_scalars(result.run_dir, "train")
    due = dict(s["gradients/global_norm"])
    window = dict(s["gradients/global_norm/window_max"])
    assert sorted(due) == [0, 8]  # the due steps, exactly, although executions end at 3, 7, 11
    # Windows are captured in the step at each due step: window 8 holds steps 1..8, including the
    # spike at 5 (though the execution ends at 11); steps 9..11 are written at the end of training.
    assert sorted(window) == [0, 8, 11]
    assert window[8] > 100 * max(due.values())
    assert window[0] < 2 * due[0] and window[11] < 2 * due[8]
    assert dict(s["gradients/logits/layer_norm/window_max"])[8] > 100 * dict(s["gradients/logits/layer_norm"])[8]


def readme_tags() -> set[str]:
    """The tags in the README's "TensorBoard tags" tables: each backticked name of a row's first
    cell, ``.../x`` completed with the previous name's prefix."""
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = text[text.index("## TensorBoard tags"):text.index("\n## ", text.index("## TensorBoard tags") + 5)]
    tags = set()
    for row in section.splitlines():
        if not row.startswith("| `"):
            continue
        previous = None
        for name in re.findall(r"`([^`]+)`", row.split(" | ")[0]):
            if name.startswith(".../") and previous:
                name = previous.rsplit("/", 1)[0] + name[3:]
            tags.add(name)
            previous = name
    return tags


def generic_tag(tag: str, layers, variables) -> str:
    """``gradients/hidden_1/kernel/norm`` -> ``gradients/<layer>/<variable>/norm``."""
    parts = tag.split("/")
    if parts[0] in ("gradients", "activations") and len(parts) > 1 and parts[1] in layers:
        if not (parts[0] == "gradients" and parts[1] == "logits" and parts[2:3] == ["norm"]):
            parts[1] = "<layer>"
            if len(parts) > 2 and parts[2] in variables:
                parts[2] = "<variable>"
    return "/".join(parts)


def test_default_run_writes_exactly_the_documented_tags(tmp_path):
    """No ``diagnostics`` key: the default set. The expected set is built from docs/diagnostics.md's rules."""
    cfg = {"name": "tags", "seed": 0,
           "data": {"name": "iris", "batch_size": 40, "shuffle": False, "validation_split": 0.2},
           "model": {"kind": "mlp", "hidden": [6], "activation": "relu"}, "train": {"epochs": 2}}
    result = gradlab.run(cfg, run_dir=tmp_path / "run", quiet=True)
    tags = read_tags(result.run_dir, "train")
    layers, variables = ("hidden_1", "logits"), ("kernel", "bias")
    stats = ("norm", "mean", "std", "max_abs", "zero_fraction", "update_ratio")
    expected = {"gradients/global_norm", "gradients/global_norm/window_max", "gradients/global_norm/window_mean",
                "gradients/logits/norm", "gradients/logits/norm/window_max"}
    expected |= {f"gradients/{l}/{v}/{s}" for l in layers for v in variables for s in stats}
    expected |= {f"gradients/{l}/layer_norm" for l in layers} | {f"gradients/{l}/layer_norm/window_max" for l in layers}
    every_layer = ("mean", "std", "preactivation_mean", "preactivation_std")
    expected |= {f"activations/{l}/{s}" for l in layers for s in every_layer}
    expected |= {"activations/hidden_1/dead_fraction", "activations/hidden_1/inactive_fraction",
                 "activations/logits/saturated_fraction", "activations/logits/entropy"}
    expected |= {"step/loss", "step/loss_max", "step/loss_last", "step/accuracy"}  # step_metrics
    expected |= {"epoch_loss", "epoch_accuracy", "epoch_learning_rate"}  # Keras's TensorBoard callback
    assert tags["scalars"] == expected
    assert tags["histograms"] == ({f"gradients/{l}/{v}" for l in layers for v in variables}
                                  | {f"activations/{l}" for l in layers})
    assert tags["text"] == {"health/verdicts"}
    # and every tag written, in train/ and validation/, is in the README's tables
    documented = readme_tags()
    written = set().union(*tags.values()) | set().union(*read_tags(result.run_dir, "validation").values())
    missing = {t for t in written if generic_tag(t, layers, variables) not in documented}
    assert not missing, f"written but not in the README's TensorBoard tags tables: {sorted(missing)}"


def test_taps_stay_attached_between_fits_without_retracing():
    """A second fit with the same diagnostic reuses the compiled step (retracing costs seconds)."""
    from gradlab.config import ModelConfig
    from gradlab.losses import make_loss
    from gradlab.models import build_model

    model = build_model(ModelConfig(kind="mlp", hidden=[4], activation="tanh"), features=3, classes=2)
    model.compile(optimizer="sgd", loss=make_loss("cross_entropy"))
    x = np.random.default_rng(0).normal(size=(20, 3)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int32)
    stats = GradientStats(every=2, histogram_every=0)
    model.fit(x, y, batch_size=10, epochs=1, verbose=0, callbacks=[stats])
    compiled = model.train_function
    model.fit(x, y, batch_size=10, epochs=1, verbose=0, callbacks=[stats])
    assert model.train_function is compiled and len(model.tap_keys) == 1
    assert [s for s, _ in observations_for(model).series["gradients/global_norm"]] == [0, 2]
    stats.detach()
    assert model.tap_keys == []


# ---- statistics written by the compiled step itself (StepWrite) ---------------------------------

def _mlp_and_data(seed=0):
    from gradlab.config import ModelConfig
    from gradlab.losses import make_loss
    from gradlab.models import build_model

    model = build_model(ModelConfig(kind="mlp", hidden=[5, 4], activation="tanh"), features=3, classes=3, seed=seed)
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss=make_loss("cross_entropy"))
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(40, 3)).astype(np.float32)
    y = (np.arange(40) % 3).astype(np.int32)
    return model, x, y


def _fit_gradient_stats(log_dir, in_step: bool, jit_compile=False):
    model, x, y = _mlp_and_data()
    if jit_compile:
        model.compile(optimizer=keras.optimizers.SGD(0.1), loss=model.loss, jit_compile=True)
    stats = GradientStats(log_dir=str(log_dir), every=2, histogram_every=0)
    if not in_step:
        stats.tap_writer = lambda: None  # the callback's own write path
    model.fit(x, y, batch_size=8, epochs=2, verbose=0, shuffle=False, callbacks=[stats])
    state = model._gradlab_taps[stats._tap_key]
    return model, stats, state.writes_in_step


def test_step_writes_the_same_events_as_the_callback(tmp_path):
    """The step's own write and the callback's write give the same tags, steps and values (the
    layer and global norms to float32 rounding: the step sums squared norms, Python norms), and
    the observations Health reads are the values written."""
    model_a, stats_a, in_step = _fit_gradient_stats(tmp_path / "step", in_step=True)
    model_b, _, python_side = _fit_gradient_stats(tmp_path / "callback", in_step=False)
    assert in_step and not python_side
    a, b = read_scalars(tmp_path / "step"), read_scalars(tmp_path / "callback")
    assert set(a) == set(b) and "gradients/global_norm/window_mean" in a
    for tag in b:
        assert [s for s, _ in a[tag]] == [s for s, _ in b[tag]], tag
        np.testing.assert_allclose([v for _, v in a[tag]], [v for _, v in b[tag]], rtol=2e-6, atol=1e-9, err_msg=tag)
    # each event once (10 steps: due at 0, 2, .., 8; the end of training adds step 9's window)
    assert [s for s, _ in a["gradients/global_norm"]] == [0, 2, 4, 6, 8]
    assert [s for s, _ in a["gradients/global_norm/window_max"]] == [0, 2, 4, 6, 8, 9]
    series = observations_for(model_a).series
    for tag, points in a.items():
        np.testing.assert_allclose([v for _, v in points], np.float32([v for _, v in series[tag]]), rtol=0, err_msg=tag)
    stats_a.detach()


@pytest.fixture
def no_op_determinism():
    """Keras compiles nothing with XLA while op determinism is on, and a gradlab run earlier in
    this process turns it on (process-wide): off for the test, restored after."""
    from tensorflow.python.framework import config

    was = config.is_op_determinism_enabled()
    config.disable_op_determinism()
    yield
    if was:
        config.enable_op_determinism()


def test_step_write_falls_back_to_the_callback_under_xla(tmp_path, no_op_determinism):
    model, stats, in_step = _fit_gradient_stats(tmp_path, in_step=True, jit_compile=True)
    assert model.jit_compile and not in_step  # no summary op in an XLA step: the callback writes
    assert [s for s, _ in read_scalars(tmp_path)["gradients/global_norm"]] == [0, 2, 4, 6, 8]
    stats.detach()


def test_step_writer_is_held_while_the_tap_is_attached(tmp_path):
    """The compiled step captured the writer: it stays open after the fit, a fit without the
    callback writes nothing with it (the tap is disarmed), and detach() releases it."""
    from gradlab import summaries

    model, stats, _ = _fit_gradient_stats(tmp_path, in_step=True)
    key = str(tmp_path.resolve())
    assert key in summaries._writers  # held by the tap, after on_train_end released the callback's
    x, y = _mlp_and_data()[1:]
    model.fit(x, y, batch_size=8, epochs=1, verbose=0, shuffle=False)  # no callback: the tap runs, unarmed
    stats.detach()
    assert key not in summaries._writers and model.tap_keys == []
    assert [s for s, _ in read_scalars(tmp_path)["gradients/global_norm"]] == [0, 2, 4, 6, 8]


def test_a_released_step_writer_is_replaced_at_the_next_fit(tmp_path):
    """After release_tap_writer (what a run does at its end) the shared writer is closed; a fit
    without the callback does not touch it, and the next fit with the callback makes its tap
    again with a new writer and writes."""
    from gradlab import summaries

    model, stats, _ = _fit_gradient_stats(tmp_path, in_step=True)
    old = model.tap_step_write(stats._tap_key).writer
    stats.release_tap_writer()
    assert str(tmp_path.resolve()) not in summaries._writers  # closed: its last user let it go
    x, y = _mlp_and_data()[1:]
    model.fit(x, y, batch_size=8, epochs=1, verbose=0, shuffle=False)  # would fail if it wrote with it
    model.fit(x, y, batch_size=8, epochs=1, verbose=0, shuffle=False, callbacks=[stats])
    assert model.tap_step_write(stats._tap_key).writer is not old
    assert model._gradlab_taps[stats._tap_key].writes_in_step
    stats.detach()
    steps = [s for s, _ in read_scalars(tmp_path)["gradients/global_norm"]]
    assert steps == [0, 2, 4, 6, 8, 16, 18]  # steps 10-14: the fit without the callback


def test_step_write_names_are_checked_at_registration():
    from gradlab.train_step import StepWrite, Tap, TapVector

    model, _, _ = _mlp_and_data()
    writer = tf.summary.create_file_writer(tempfile_dir())
    every = lambda inp: TapVector(["a"], tf.ones([1]))  # noqa: E731
    due = lambda inp: {"s": tf.constant(1.0), "v": tf.ones([2])}  # noqa: E731
    cases = [(StepWrite(writer, {"nope": "t"}), "due output 'nope' is not a scalar"),
             (StepWrite(writer, {"v": "t"}), "due output 'v' is not a scalar"),
             (StepWrite(writer, {}, (("b", "max", "t"),)), "window output 'b' is not one of"),
             (StepWrite(writer, {}, (("a", "median", "t"),)), "statistic 'median' must be one of"),
             (StepWrite(object(), {"s": "t"}), "needs a tf.summary file writer")]
    for write, message in cases:
        with pytest.raises(ValueError, match=message):
            model.register_tap("t", Tap(every_step=every, on_due=due, every=2, step_write=write))
    with pytest.raises(ValueError, match="no on_due outputs"):
        model.register_tap("t", Tap(every_step=every, every=2, step_write=StepWrite(writer, {})))


def tempfile_dir() -> str:
    import tempfile

    return tempfile.mkdtemp(prefix="gradlab-test-")


def test_a_run_leaves_no_event_file_open(tmp_path):
    """The step wrote gradient_stats' scalars (the writer was held for it), and the run released
    that writer when training ended."""
    from gradlab import summaries

    cfg = {"name": "open", "seed": 0, "data": {"name": "iris", "batch_size": 30},
           "model": {"kind": "mlp", "hidden": [4]}, "train": {"epochs": 1},
           "diagnostics": [{"type": "gradient_stats", "every": 2, "histogram_every": 0}]}
    held = []
    acquire = summaries.acquire_writer

    def watch(log_dir):
        held.append(os.path.abspath(log_dir))
        return acquire(log_dir)

    summaries.acquire_writer = watch
    try:
        result = gradlab.run(cfg, run_dir=tmp_path / "run", quiet=True)
    finally:
        summaries.acquire_writer = acquire
    train = os.path.abspath(result.run_dir / "train")
    assert train in held and train not in summaries._writers
    steps = [s for s, _ in read_scalars(result.run_dir, "train")["gradients/global_norm"]]
    assert steps and steps == list(range(0, 2 * len(steps), 2))
