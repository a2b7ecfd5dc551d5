"""Tests of gradlab.callbacks.gradient_noise: per-sample gradients vs a Python loop, statistics vs numpy."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from gradlab.callbacks import gradient_noise as gn
from gradlab.callbacks import observations_for
from gradlab.config import ModelConfig
from gradlab.losses import PER_SAMPLE, make_loss
from gradlab.models import build_model


def _model(kind="softmax_linear", hidden=(), loss="cross_entropy", reduction="mean", activation="tanh"):
    cfg = ModelConfig(kind=kind, hidden=list(hidden), activation=activation) if kind == "mlp" else ModelConfig()
    model = build_model(cfg, features=4, classes=3, seed=0)
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss=make_loss(loss, reduction))
    return model


def _batch(n=12, seed=0):
    rng = np.random.default_rng(seed)
    return (tf.constant(rng.normal(size=(n, 4)).astype(np.float32)),
            tf.constant(rng.integers(0, 3, n).astype(np.int32)))


def loop_gradients(model, loss_name, x, y) -> list[np.ndarray]:
    """The reference: one tape per sample in a Python loop, the gradlab loss on a batch of one."""
    per_sample = PER_SAMPLE[loss_name]
    out = [[] for _ in model.trainable_variables]
    for i in range(int(x.shape[0])):
        with tf.GradientTape() as tape:
            loss = per_sample(y[i:i + 1], model(x[i:i + 1], training=False))[0]
        for slot, g in zip(out, tape.gradient(loss, model.trainable_variables)):
            slot.append(g.numpy())
    return [np.stack(s) for s in out]


def numpy_statistics(grads: list[np.ndarray], groups: dict[str, list[int]], theta: float) -> dict[str, float]:
    """The module docstring's definitions, in float64 numpy, two-pass, from per-sample gradients."""
    n = grads[0].shape[0]
    flat = [g.reshape(n, -1).astype(np.float64) for g in grads]

    def stats(indices):
        g = np.concatenate([flat[i] for i in indices], axis=1)
        mean = g.mean(0)
        var = ((g - mean) ** 2).sum(0) / (n - 1)
        keep = var > gn.ZERO_VARIANCE_RTOL * (g ** 2).mean(0)
        trace, msq = var.sum(), (mean ** 2).sum()
        return {"variance": var.mean(), "gsnr": (mean[keep] ** 2 / var[keep]).mean() if keep.any() else 0.0,
                "norm_test": trace / (n * msq), "batch_size": trace / (theta ** 2 * msq)}

    out = {}
    for name, idx in groups.items():
        out.update({f"{name}/{k}": v for k, v in stats(idx).items()})
    out.update(stats(range(len(flat))))
    return out


CASES = [("softmax_linear", (), "cross_entropy"), ("softmax_linear", (), "mse"),
         ("mlp", (5,), "cross_entropy"), ("mlp", (5, 4), "mse")]


@pytest.mark.parametrize("kind,hidden,loss", CASES)
def test_per_sample_gradients_match_python_loop(kind, hidden, loss):
    model = _model(kind, hidden, loss)
    x, y = _batch()
    got = tf.function(lambda p, x, y: gn.per_sample_gradients(gn.output_fn(model), gn.per_sample_loss_fn(model),
                                                              p, x, y))(gn.read_params(model), x, y)
    want = loop_gradients(model, loss, x, y)
    for g, w in zip(got, want):
        assert g.shape == w.shape
        np.testing.assert_allclose(g.numpy(), w, rtol=1e-6, atol=1e-6)


def test_per_sample_gradients_of_a_model_pfor_cannot_convert_fall_back_to_a_loop(caplog):
    # Embedding then LSTM: tf.vectorized_map fails on the LSTM's variant tensors.
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((5,), dtype="int32"), keras.layers.Embedding(10, 3),
                              keras.layers.LSTM(2), keras.layers.Dense(2)])
    model.compile(optimizer="sgd", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    rng = np.random.default_rng(0)
    x = tf.constant(rng.integers(0, 10, (4, 5)).astype(np.int32))
    y = tf.constant(rng.integers(0, 2, 4).astype(np.int32))
    with caplog.at_level("WARNING", logger="gradlab.gradient_noise"):
        got = tf.function(lambda p, x, y: gn.per_sample_gradients(
            gn.output_fn(model), gn.per_sample_loss_fn(model), p, x, y))(gn.read_params(model), x, y)
    assert "one sample at a time" in caplog.text
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    for i in range(4):
        with tf.GradientTape() as tape:
            value = loss(y[i:i + 1], model(x[i:i + 1]))
        for g, w in zip(got, tape.gradient(value, model.trainable_variables)):
            np.testing.assert_allclose(g[i].numpy(), tf.convert_to_tensor(w).numpy(), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("kind,hidden,loss", CASES)
def test_dense_moments_equal_vmap_moments(kind, hidden, loss):
    model = _model(kind, hidden, loss)
    x, y = _batch(n=20)
    params = gn.read_params(model)
    chain = gn.DenseChain.of(model)
    assert chain is not None
    loss_fn = gn.per_sample_loss_fn(model)
    d1, d2 = chain.moments(loss_fn, params, x, y)
    v1, v2 = gn.moments_vmap(gn.output_fn(model), loss_fn, params, x, y, chunk_size=7)  # 3 uneven chunks
    for a, b in zip(d1 + d2, v1 + v2):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("kind,hidden,loss", CASES)
def test_statistics_match_numpy(kind, hidden, loss):
    model = _model(kind, hidden, loss)
    x, y = _batch(n=16)
    grads = loop_gradients(model, loss, x, y)
    groups = gn.layer_groups(model)
    s1 = [tf.constant(g.sum(0)) for g in grads]
    s2 = [tf.constant((g.astype(np.float64) ** 2).sum(0).astype(np.float32)) for g in grads]
    got = {k: float(v) for k, v in gn.noise_statistics(s1, s2, 16, groups, theta=0.7).items()}
    want = numpy_statistics(grads, groups, theta=0.7)
    assert set(got) == set(want)
    for key in want:
        assert got[key] == pytest.approx(want[key], rel=1e-4), key


def test_edge_cases_zero_gradients_and_zero_variance():
    """A dead unit (all g = 0) is left out of GSNR; a zero mean gradient leaves the norm test undefined."""
    s1 = [tf.constant([0.0, 4.0, 2.0])]        # param 0 dead; param 1 identical in all 4 samples (g=1)
    s2 = [tf.constant([0.0, 4.0, 2.0])]        # param 2: two samples g=1, two g=0
    out = {k: float(v) for k, v in gn.noise_statistics(s1, s2, 4, {"a": [0]}).items()}
    # only param 2 has variance: mean 0.5, var (1 - 4*0.25)/3 = 1/3 -> r = 0.25/(1/3) = 0.75
    assert out["a/gsnr"] == pytest.approx(0.75)
    assert out["a/variance"] == pytest.approx((1 / 3) / 3)
    zero = {k: float(v) for k, v in gn.noise_statistics([tf.zeros([3])], [tf.zeros([3])], 4, {"a": [0]}).items()}
    assert zero["a/gsnr"] == 0.0 and zero["a/variance"] == 0.0
    assert np.isnan(zero["a/norm_test"]) and np.isnan(zero["a/batch_size"])


def test_xla_matches_graph():
    model = _model("mlp", (5,), "mse")
    x, y = _batch(n=16)
    groups = gn.layer_groups(model)
    chain, loss_fn, out_fn = gn.DenseChain.of(model), gn.per_sample_loss_fn(model), gn.output_fn(model)

    def dense(p, x, y):
        return gn.noise_statistics(*chain.moments(loss_fn, p, x, y), tf.shape(x)[0], groups)

    def vmap(p, x, y):
        return gn.noise_statistics(*gn.moments_vmap(out_fn, loss_fn, p, x, y), tf.shape(x)[0], groups)

    params = gn.read_params(model)
    ref = {k: float(v) for k, v in tf.function(dense)(params, x, y).items()}
    for fn in (dense, vmap):
        xla = tf.function(fn, jit_compile=True)(params, x, y)
        for key, value in xla.items():
            assert float(value) == pytest.approx(ref[key], rel=1e-4), (fn.__name__, key)


def test_reduction_does_not_change_per_sample_statistics():
    x, y = _batch()
    stats = []
    for reduction in ("mean", "sum"):
        model = _model("mlp", (5,), "cross_entropy", reduction)
        stats.append(gn.GradientNoise(probe_data=(x.numpy(), y.numpy()), jit_compile=False))
        model.fit(x, y, batch_size=12, epochs=1, verbose=0, callbacks=[stats[-1]])
        stats[-1] = dict(observations_for(model).series)
    assert stats[0]["noise/gsnr"][0] == pytest.approx(stats[1]["noise/gsnr"][0])


def test_hooks_dense_and_vmap_methods_agree_and_tags(tmp_path):
    """Drive the hooks on any Keras model: a Dense chain picks 'dense'; a model with other layers 'vmap'."""
    from gradlab.events import read_scalars

    x, y = _batch(n=16)
    inputs = keras.Input((4,))
    h = keras.layers.Dense(5, activation="tanh", name="h")(inputs)
    out = keras.layers.Dense(3, name="out")(keras.layers.Activation("linear", name="identity")(h))
    model = keras.Model(inputs, out)  # an Activation layer: not a Dense chain
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss=make_loss("mse"))
    chain_in = keras.Input((4,))
    chain_out = keras.layers.Dense(3, name="out")(keras.layers.Dense(5, activation="tanh", name="h")(chain_in))
    chain_model = keras.Model(chain_in, chain_out)
    chain_model.compile(optimizer=keras.optimizers.SGD(0.1), loss=make_loss("mse"))
    chain_model.set_weights(model.get_weights())
    values = {}
    for m, log in ((model, tmp_path / "vmap"), (chain_model, tmp_path / "dense")):
        cb = gn.GradientNoise(log_dir=str(log), every=1, probe_data=(x.numpy(), y.numpy()))
        m.fit(x, y, batch_size=16, epochs=1, verbose=0, callbacks=[cb])  # one step: probes at 0 and 1
        values[cb.method_used] = read_scalars(log)
    assert set(values) == {"vmap", "dense"}
    expected = {f"noise/{p}{s}" for p in ("", "h/", "out/") for s in ("variance", "gsnr", "norm_test", "batch_size")}
    assert set(values["vmap"]) == set(values["dense"]) == expected
    for tag in expected:
        assert [s for s, _ in values["dense"][tag]] == [0, 1]
        np.testing.assert_allclose(np.array(values["vmap"][tag]), np.array(values["dense"][tag]), rtol=1e-4)


def test_method_dense_rejects_other_models():
    x, y = _batch()
    inputs = keras.Input((4,))
    out = keras.layers.Dense(3)(keras.layers.LayerNormalization()(inputs))
    model = keras.Model(inputs, out)
    model.compile(optimizer="sgd", loss=make_loss("cross_entropy"))
    with pytest.raises(ValueError, match="method='dense' needs a chain"):
        model.fit(x, y, epochs=1, verbose=0, callbacks=[gn.GradientNoise(method="dense", probe_data=(x, y))])


@pytest.mark.parametrize("kwargs,message", [
    ({"theta": 0}, "`theta` (0) must be a positive number"),
    ({"method": "loop"}, "`method` ('loop') must be one of auto, vmap, dense"),
    ({"chunk_size": 0}, "`chunk_size` (0) must be a positive integer"),
    ({"probe_size": 1}, "`probe_size` (1) must be at least 2 (one sample has no variance)"),
])
def test_options_are_validated(kwargs, message):
    with pytest.raises(ValueError) as err:
        gn.GradientNoise(**kwargs)
    assert str(err.value) == message


@pytest.mark.parametrize("kind,hidden,loss", CASES)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_step_source_equals_probe_source_on_the_same_batch(kind, hidden, loss, reduction):
    """In a gradlab model the statistics come from the training step's own layer inputs and deltas;
    on the step-0 batch (the probe batch here) they must equal the probe computation."""
    x, y = _batch(n=12, seed=3)
    got = {}
    for source in ("step", "probe"):
        model = _model(kind, hidden, loss, reduction)
        cb = gn.GradientNoise(every=1, source=source, probe_data=(x.numpy(), y.numpy()))
        model.fit(x, y, batch_size=12, epochs=1, verbose=0, shuffle=False, callbacks=[cb])
        assert cb.source_used == source
        got[source] = {k: v[0] for k, v in observations_for(model).series.items() if k.startswith("noise/")}
    assert got["step"].keys() == got["probe"].keys() and len(got["step"]) >= 8
    for key, (step, value) in got["step"].items():
        assert step == got["probe"][key][0] == 0
        assert value == pytest.approx(got["probe"][key][1], rel=2e-5, abs=1e-7), key


def test_step_source_leaves_training_unchanged():
    """With the noise tap the step runs the Dense chain itself: same weights as Keras's forward."""
    x, y = _batch(n=24, seed=4)
    weights = []
    for callbacks in ([], [gn.GradientNoise(every=2, source="step")]):
        model = _model("mlp", (5, 4), "cross_entropy", activation="relu")
        model.fit(x, y, batch_size=8, epochs=2, verbose=0, shuffle=False, callbacks=callbacks)
        weights.append([w.numpy() for w in model.trainable_variables])
    for a, b in zip(*weights):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_step_source_needs_a_gradlab_dense_chain():
    x, y = _batch()
    inputs = keras.Input((4,))
    model = keras.Model(inputs, keras.layers.Dense(3)(inputs))
    model.compile(optimizer="sgd", loss=make_loss("cross_entropy"))
    with pytest.raises(ValueError, match=r"`source` \('step'\) needs a gradlab model"):
        model.fit(x, y, epochs=1, verbose=0, callbacks=[gn.GradientNoise(source="step", probe_data=(x, y))])
    cb = gn.GradientNoise(probe_data=(x, y))  # auto: the probe for a plain Keras model
    model.fit(x, y, epochs=1, verbose=0, callbacks=[cb])
    assert cb.source_used == "probe"
    with pytest.raises(ValueError, match=r"`source` \('batch'\) must be one of auto, step, probe"):
        gn.GradientNoise(source="batch")


def test_step_source_writes_nothing_for_a_one_sample_batch():
    x, y = _batch(n=13, seed=5)
    model = _model("mlp", (5,), "cross_entropy")
    cb = gn.GradientNoise(every=1, source="step")
    model.fit(x, y, batch_size=12, epochs=1, verbose=0, shuffle=False, callbacks=[cb])  # steps 0 (12), 1 (1)
    assert [s for s, _ in observations_for(model).series["noise/gsnr"]] == [0]
