"""activation_saturation: pure statistics vs numpy, saturation rules vs hand-computed cases, the
callback on plain Keras models (functional and Sequential), and its tags read back from disk."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from gradlab.callbacks import ActivationSaturation, observations_for
from gradlab.callbacks import activation_saturation as act
from gradlab.events import read_scalars, read_tags

RNG = np.random.default_rng(7)


def _np(t):
    return float(np.asarray(t))


# ---- pure statistics vs numpy ------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(17, 5), (3, 4, 2), (1, 1)])
def test_moments_match_numpy(shape):
    a = RNG.normal(2.0, 3.0, size=shape).astype(np.float32)
    mean, std = act.moments(a)
    assert _np(mean) == pytest.approx(a.astype(np.float64).mean(), rel=1e-5, abs=1e-6)
    assert _np(std) == pytest.approx(a.astype(np.float64).std(), rel=1e-5)


def test_moments_of_empty_and_constant_are_zero():
    mean, std = act.moments(np.zeros((4, 0), np.float32))
    assert (_np(mean), _np(std)) == (0.0, 0.0)
    mean, std = act.moments(np.full((6, 3), 2.5, np.float32))
    assert _np(mean) == 2.5 and _np(std) == 0.0


@pytest.mark.parametrize("kind,f,peak", [("sigmoid", lambda x: 1 / (1 + np.exp(-x)), 0.25),
                                         ("tanh", np.tanh, 1.0)])
@pytest.mark.parametrize("threshold", [0.05, 0.1, 0.5])
def test_saturated_fraction_matches_numpy(kind, f, peak, threshold):
    x = RNG.normal(0, 4.0, size=(64, 9))
    a = f(x).astype(np.float32)
    deriv = a * (1 - a) if kind == "sigmoid" else 1 - a ** 2
    expected = np.mean(deriv < threshold * peak)
    assert _np(act.saturated_fraction(a, kind, threshold)) == pytest.approx(expected, abs=1e-7)


def test_dead_and_inactive_fraction_match_numpy():
    a = np.maximum(RNG.normal(-0.5, 1.0, size=(8, 40)), 0).astype(np.float32)
    a[:, :5] = 0.0  # five units dead for the whole batch
    assert _np(act.dead_fraction(a)) == pytest.approx(np.mean(np.all(a <= 0, axis=0)))
    assert _np(act.inactive_fraction(a)) == pytest.approx(np.mean(a <= 0))


def test_softmax_stats_match_numpy():
    z = RNG.normal(0, 3.0, size=(50, 4))
    p = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    sat, ent = act.softmax_stats(p.astype(np.float32), 0.1)
    assert _np(sat) == pytest.approx(np.mean(p.max(1) > 0.9))
    assert _np(ent) == pytest.approx(np.mean(-(p * np.log(p)).sum(1)), rel=1e-5)


# ---- the rules on hand-computed cases -----------------------------------------------------------

def test_sigmoid_rule_hand_cases():
    # s'(x) = s(1-s); tau = 0.1 -> saturated iff s(1-s) < 0.025, i.e. |x| > ln((1+sqrt(0.9))/(1-sqrt(0.9))) = 3.636
    s = 1 / (1 + np.exp(-np.array([[0.0, 3.6, 3.7, -3.7, 10.0, -20.0]])))
    assert _np(act.saturated_fraction(s.astype(np.float32), "sigmoid", 0.1)) == pytest.approx(4 / 6)


def test_tanh_rule_hand_cases():
    # 1 - t^2 < 0.1 iff |t| > sqrt(0.9) = 0.9487
    t = np.array([[0.0, 0.9, 0.948, 0.95, -0.99, 1.0]], np.float32)
    assert _np(act.saturated_fraction(t, "tanh", 0.1)) == pytest.approx(3 / 6)


def test_relu_dead_unit_needs_zero_for_every_sample():
    a = np.array([[0.0, 0.0, 1.0, 0.0],
                  [0.0, 2.0, 0.0, 0.0],
                  [0.0, 0.0, 0.0, 0.0]], np.float32)
    assert _np(act.dead_fraction(a)) == pytest.approx(2 / 4)  # units 0 and 3
    assert _np(act.inactive_fraction(a)) == pytest.approx(10 / 12)


def test_empty_layer_reports_zero_fractions():
    empty = np.zeros((5, 0), np.float32)
    assert _np(act.dead_fraction(empty)) == 0.0
    assert _np(act.saturated_fraction(empty, "sigmoid", 0.1)) == 0.0


def test_softmax_saturation_hand_case_and_entropy_bounds():
    p = np.array([[1.0, 0.0, 0.0], [0.95, 0.05, 0.0], [1 / 3, 1 / 3, 1 / 3], [0.5, 0.5, 0.0]], np.float32)
    sat, ent = act.softmax_stats(p, 0.1)
    assert _np(sat) == pytest.approx(2 / 4)  # max p 1.0 and 0.95 exceed 0.9
    h = [0.0, -(0.95 * np.log(0.95) + 0.05 * np.log(0.05)), np.log(3), np.log(2)]  # 0 log 0 = 0
    assert _np(ent) == pytest.approx(np.mean(h), rel=1e-5)


def test_activation_kind_of_layers():
    assert act.activation_kind(keras.layers.Dense(3, activation="sigmoid")) == "sigmoid"
    assert act.activation_kind(keras.layers.Dense(3, activation="leaky_relu")) == "leaky_relu"
    assert act.activation_kind(keras.layers.Dense(3)) == "linear"
    assert act.activation_kind(keras.layers.Dense(3, activation="gelu")) == "other"
    assert act.activation_kind(keras.layers.ReLU()) == "relu"
    assert act.activation_kind(keras.layers.ReLU(negative_slope=0.1)) == "leaky_relu"
    assert act.activation_kind(keras.layers.Softmax()) == "softmax"
    assert act.activation_kind(keras.layers.Dropout(0.5)) is None


def test_bad_arguments_name_the_argument():
    with pytest.raises(ValueError, match=r"`threshold` \(1.5\)"):
        ActivationSaturation(threshold=1.5)
    with pytest.raises(ValueError, match=r"`every` \(0\) must be a positive integer"):
        ActivationSaturation(every=0)
    with pytest.raises(ValueError, match=r"`histogram_every` \(-1\)"):
        ActivationSaturation(histogram_every=-1)


# ---- the callback on plain Keras models ---------------------------------------------------------

def _functional():
    inputs = keras.Input((6,), name="x")
    h = keras.layers.Dense(8, activation="tanh", name="squash")(inputs)
    h = keras.layers.Dense(10, name="pre")(h)
    h = keras.layers.ReLU(name="rect")(h)
    h = keras.layers.Dropout(0.1, name="drop")(h)
    h = keras.layers.Dense(5, activation="leaky_relu", name="leaky")(h)
    out = keras.layers.Dense(3, name="out")(h)
    return keras.Model(inputs, out)


def test_functional_model_tags_and_values(tmp_path):
    keras.utils.set_random_seed(1)
    model = _functional()
    model.compile(optimizer="sgd", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x = RNG.normal(size=(40, 6)).astype(np.float32)
    y = RNG.integers(0, 3, 40)
    cb = ActivationSaturation(log_dir=str(tmp_path), every=2, histogram_every=2, probe_data=(x[:16], y[:16]))
    model.fit(x, y, batch_size=10, epochs=1, verbose=0, callbacks=[cb])

    kinds = observations_for(model).meta["activation"]
    assert kinds == {"squash": "tanh", "pre": "linear", "rect": "relu", "leaky": "leaky_relu", "out": "softmax"}

    tags = read_tags(tmp_path)
    base = {"mean", "std", "preactivation_mean", "preactivation_std"}
    expected = set()
    for layer, extra in {"squash": {"saturated_fraction"}, "pre": set(), "rect": {"dead_fraction", "inactive_fraction"},
                         "leaky": {"leaky_fraction"}, "out": {"saturated_fraction", "entropy"}}.items():
        expected |= {f"activations/{layer}/{s}" for s in base | extra}
    assert tags["scalars"] == expected
    assert tags["histograms"] == {f"activations/{n}" for n in ("squash", "pre", "rect", "leaky", "out")}

    # values at the final step against an independent forward pass on the probe batch
    scalars = read_scalars(tmp_path)
    assert [s for s, _ in scalars["activations/squash/mean"]] == [0, 2, 4]
    xp = x[:16]
    w, b = model.get_layer("squash").get_weights()
    pre = xp @ w + b
    t = np.tanh(pre)
    assert scalars["activations/squash/preactivation_std"][-1][1] == pytest.approx(pre.std(), rel=1e-4)
    assert scalars["activations/squash/saturated_fraction"][-1][1] == pytest.approx(np.mean(1 - t ** 2 < 0.1))
    w2, b2 = model.get_layer("pre").get_weights()
    r = np.maximum(t @ w2 + b2, 0)
    assert scalars["activations/rect/dead_fraction"][-1][1] == pytest.approx(np.mean(np.all(r <= 0, axis=0)))
    assert scalars["activations/rect/preactivation_mean"][-1][1] == pytest.approx((t @ w2 + b2).mean(), abs=1e-5)
    logits = model.predict(xp, verbose=0)
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    assert scalars["activations/out/entropy"][-1][1] == pytest.approx(np.mean(-(p * np.log(p)).sum(1)), rel=1e-4)


def test_sequential_model_and_reuse(tmp_path):
    keras.utils.set_random_seed(2)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(6, activation="sigmoid", name="s"),
                              keras.layers.Dense(2, activation="softmax", name="p")])
    model.compile(optimizer="sgd", loss="sparse_categorical_crossentropy")
    x = RNG.normal(size=(12, 4)).astype(np.float32)
    y = RNG.integers(0, 2, 12)
    cb = ActivationSaturation(log_dir=None, every=1, probe_data=(x, y))
    model.fit(x, y, batch_size=6, epochs=1, verbose=0, callbacks=[cb])
    model.fit(x, y, batch_size=6, epochs=1, verbose=0, callbacks=[cb])  # one instance, two fits
    series = observations_for(model).series
    assert [s for s, _ in series["activations/s/saturated_fraction"]] == [0, 1, 2, 3, 4]  # step 2 once
    p = model.predict(x, verbose=0)
    assert series["activations/p/entropy"][-1][1] == pytest.approx(np.mean(-(p * np.log(p)).sum(1)), rel=1e-4)


def test_needs_a_probe_batch():
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(2, activation="relu")])
    model.compile(optimizer="sgd", loss="mse")
    with pytest.raises(ValueError, match="probe_data"):
        model.fit(np.zeros((4, 2)), np.zeros((4, 2)), verbose=0, callbacks=[ActivationSaturation()])


@pytest.mark.parametrize("activation", ["sigmoid", "relu"])
def test_dense_chain_probe_matches_the_submodel_probe(monkeypatch, activation):
    from gradlab.models import build_model
    from gradlab.config import ModelConfig

    model = build_model(ModelConfig(kind="mlp", hidden=[7, 5], activation=activation), features=4, classes=3)
    x = np.random.default_rng(0).normal(size=(32, 4)).astype(np.float32) * 3
    chain = ActivationSaturation(probe_data=(x, np.zeros(32)))
    chain.set_model(model)
    plans, sub = chain._build(model)
    assert sub is None  # gradlab's MLP is a plain Dense chain: no submodel, no second matmul
    chain._plans, chain._submodel = plans, sub
    monkeypatch.setattr(act, "_dense_chain", lambda model, plans: False)
    other = ActivationSaturation(probe_data=(x, np.zeros(32)))
    other.set_model(model)
    other._plans, other._submodel = other._build(model)
    assert other._submodel is not None
    a = chain.probe(model, tf.constant(x), None, histograms=True)
    b = other.probe(model, tf.constant(x), None, histograms=True)
    assert a.keys() == b.keys() and len(a) > 10
    for key in a:
        np.testing.assert_allclose(np.asarray(a[key]), np.asarray(b[key]), rtol=1e-5, atol=1e-6, err_msg=key)
