"""Tests of gradlab.callbacks.curvature: against exact Hessians (nested tapes + numpy), XLA, hooks, events."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

from gradlab.callbacks import observations_for
from gradlab.callbacks import curvature as cv
from gradlab.config import ModelConfig
from gradlab.losses import make_loss
from gradlab.models import build_model

RTOL = 1e-4


def _model(kind="softmax_linear", hidden=(), loss="cross_entropy", reduction="mean", activation="tanh", lr=0.1,
           features=4, classes=3):
    cfg = ModelConfig(kind=kind, hidden=list(hidden), activation=activation) if kind == "mlp" else ModelConfig()
    model = build_model(cfg, features=features, classes=classes, seed=0)
    model.compile(optimizer=keras.optimizers.SGD(lr), loss=make_loss(loss, reduction))
    return model


def _batch(n=8, features=4, classes=3, seed=0):
    rng = np.random.default_rng(seed)
    return (tf.constant(rng.normal(size=(n, features)).astype(np.float32)),
            tf.constant(rng.integers(0, classes, n).astype(np.int32)))


def exact_hessian(model, x, y) -> np.ndarray:
    """The full Hessian of the batch loss, from nested tapes over a flat parameter vector (float64 numpy)."""
    loss = cv.batch_loss_fn(model)
    params = cv.read_params(model)
    shapes = [p.shape for p in params]
    sizes = [int(np.prod(s)) for s in shapes]
    flat = tf.concat([tf.reshape(p, [-1]) for p in params], 0)

    def unflatten(f):
        return [tf.reshape(t, s) for t, s in zip(tf.split(f, sizes), shapes)]

    with tf.GradientTape() as outer:
        outer.watch(flat)
        with tf.GradientTape() as inner:
            inner.watch(flat)
            value = loss(unflatten(flat), x, y)
        grad = inner.gradient(value, flat)
    h = outer.jacobian(grad, flat).numpy().astype(np.float64)
    return (h + h.T) / 2.0


def _blocks(model, h):
    """Diagonal blocks of ``h`` per layer, in the order of ``layer_groups``."""
    sizes = [int(np.prod(v.shape)) for v in model.trainable_variables]
    offsets = np.cumsum([0] + sizes)
    out = {}
    for name, idx in cv.layer_groups(model).items():
        rows = np.concatenate([np.arange(offsets[i], offsets[i + 1]) for i in idx])
        out[name] = h[np.ix_(rows, rows)]
    return out


def _estimate(model, x, y, jit=False, iterations=2000, tolerance=1e-9):
    loss = cv.batch_loss_fn(model)
    groups = cv.layer_groups(model)

    @tf.function(jit_compile=jit)
    def f(params):
        return cv.hessian_top_eigenvalues(lambda p: loss(p, x, y), params, groups, iterations, tolerance)

    out = f(cv.read_params(model))
    return float(out["top_eigenvalue"]), {k: float(v) for k, v in out["blocks"].items()}


# ---------------------------------------------------------------------------------------------
# The math against numpy

@pytest.mark.parametrize("loss,reduction", [("cross_entropy", "mean"), ("mse", "sum")])
def test_seed_classifier_top_eigenvalue_matches_eigvalsh(loss, reduction):
    model = _model(loss=loss, reduction=reduction)
    x, y = _batch()
    h = exact_hessian(model, x, y)
    assert h.shape == (15, 15)  # 4x3 W + 3 b
    expected = np.linalg.eigvalsh(h)[-1]  # largest algebraic eigenvalue (what we report)
    got, blocks = _estimate(model, x, y)
    assert got == pytest.approx(expected, rel=RTOL)
    assert blocks["logits"] == pytest.approx(expected, rel=RTOL)  # one layer: its block is the whole Hessian


def test_embedding_model_top_eigenvalue_matches_eigvalsh():
    # An Embedding's gradient is tf.IndexedSlices: the Hessian-vector products must densify it.
    model = keras.Sequential([keras.Input((3,), dtype="int32"), keras.layers.Embedding(6, 2, name="embed"),
                              keras.layers.Flatten(), keras.layers.Dense(3, name="logits")])
    model.compile(optimizer=keras.optimizers.SGD(0.1),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    rng = np.random.default_rng(1)
    x = tf.constant(rng.integers(0, 6, (8, 3)).astype(np.int32))
    y = tf.constant(rng.integers(0, 3, 8).astype(np.int32))
    h = exact_hessian(model, x, y)
    assert h.shape == (12 + 18 + 3, 12 + 18 + 3)
    got, blocks = _estimate(model, x, y)
    assert got == pytest.approx(np.linalg.eigvalsh(h)[-1], rel=RTOL)
    for name, block in _blocks(model, h).items():
        assert blocks[name] == pytest.approx(np.linalg.eigvalsh(block)[-1], rel=RTOL, abs=1e-6), name


@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
def test_small_mlp_global_and_per_layer_match_eigvalsh(loss):
    model = _model(kind="mlp", hidden=(5,), loss=loss)
    x, y = _batch(n=16)
    h = exact_hessian(model, x, y)
    got, blocks = _estimate(model, x, y)
    assert got == pytest.approx(np.linalg.eigvalsh(h)[-1], rel=RTOL)
    for name, block in _blocks(model, h).items():
        assert blocks[name] == pytest.approx(np.linalg.eigvalsh(block)[-1], rel=RTOL), name


def test_largest_algebraic_not_largest_magnitude():
    """Power iteration alone finds the largest |lambda|; top_eigenvalue shifts to get lambda_max."""
    rng = np.random.default_rng(1)
    q, _ = np.linalg.qr(rng.normal(size=(6, 6)))
    a = tf.constant((q @ np.diag([-5.0, -1.0, 0.5, 1.0, 1.5, 2.0]) @ q.T).astype(np.float32))

    def matvec(v):
        return [tf.linalg.matvec(a, v[0])]

    v0 = cv.start_vector([(6,)], seed=0)
    lam1, _, _ = cv.power_iteration(matvec, v0, 1000, 1e-10)
    lam, vec, used = cv.top_eigenvalue(matvec, v0, 1000, 1e-10)
    assert float(lam1) == pytest.approx(-5.0, rel=RTOL)
    assert float(lam) == pytest.approx(2.0, rel=RTOL)
    assert int(used) > 0 and abs(float(np.linalg.norm(vec[0].numpy())) - 1.0) < 1e-5


def test_zero_hessian_gives_zero():
    """A loss linear in the parameters (the seed's w*x + b) has no curvature: 0, not NaN."""
    w = tf.constant([5.0])

    op = cv.HessianOperator(lambda p: tf.reduce_sum(p[0] * 3.0 + 4.0), [w])
    lam, _, used = cv.top_eigenvalue(op.matvec, [tf.constant([1.0])], 20, 1e-3)
    assert float(lam) == 0.0 and int(used) == 1


def test_forward_over_back_equals_back_over_back_and_exact():
    model = _model(kind="mlp", hidden=(5,), loss="mse")
    x, y = _batch(n=16)
    loss = cv.batch_loss_fn(model)
    params = cv.read_params(model)
    v = cv.start_vector([p.shape for p in params], seed=3)
    fob = cv.hvp_forward_over_back(lambda p: loss(p, x, y), params, v)
    bob = cv.HessianOperator(lambda p: loss(p, x, y), params).matvec(v)
    flat_v = np.concatenate([t.numpy().ravel() for t in v]).astype(np.float64)
    exact = exact_hessian(model, x, y) @ flat_v
    for got in (fob, bob):
        np.testing.assert_allclose(np.concatenate([t.numpy().ravel() for t in got]), exact, rtol=1e-4, atol=1e-6)


def test_xla_matches_graph():
    model = _model(kind="mlp", hidden=(5,), loss="cross_entropy")
    x, y = _batch(n=16)
    plain, plain_blocks = _estimate(model, x, y, jit=False, iterations=50, tolerance=0.0)
    xla, xla_blocks = _estimate(model, x, y, jit=True, iterations=50, tolerance=0.0)
    assert xla == pytest.approx(plain, rel=1e-4)
    for name in plain_blocks:
        assert xla_blocks[name] == pytest.approx(plain_blocks[name], rel=1e-4)


def test_start_vector_is_deterministic():
    a = cv.start_vector([(4, 3), (3,)], seed=7)
    b = cv.start_vector([(4, 3), (3,)], seed=7)
    c = cv.start_vector([(4, 3), (3,)], seed=8)
    for s, t in zip(a, b):
        np.testing.assert_array_equal(s.numpy(), t.numpy())
    assert not np.allclose(a[0].numpy(), c[0].numpy())


def test_stability_limits():
    assert cv.stability_limit(keras.optimizers.SGD(0.1)) == (pytest.approx(20.0), "2/lr")
    assert cv.stability_limit(keras.optimizers.SGD(0.1, momentum=0.9))[0] == pytest.approx(38.0)
    assert cv.stability_limit(keras.optimizers.SGD(0.1, momentum=0.9, nesterov=True))[0] == pytest.approx(
        3.8 / (0.1 * 2.8))
    assert cv.stability_limit(keras.optimizers.Adam(0.1))[0] is None
    # mixed precision wraps the optimizer: the limit is the wrapped SGD's
    assert cv.stability_limit(keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(0.1))) == (
        pytest.approx(20.0), "2/lr")


@pytest.mark.parametrize("kwargs,message", [
    ({"iterations": 0}, "`iterations` (0) must be a positive integer"),
    ({"tolerance": -1.0}, "`tolerance` (-1.0) must be a non-negative number"),
    ({"every": 0}, "`every` (0) must be a positive integer"),
    ({"per_layer": "yes"}, "`per_layer` ('yes') must be true or false"),
])
def test_options_are_validated(kwargs, message):
    with pytest.raises(ValueError) as err:
        cv.Curvature(**kwargs)
    assert str(err.value) == message


# ---------------------------------------------------------------------------------------------
# Hooks and events

def test_hooks_any_keras_model_unstable_verdict(tmp_path):
    """A plain Keras model with a learning rate far above 2/lambda_max: tags, ratio and one verdict."""
    x, y = _batch(n=32)
    inputs = keras.Input((4,))
    model = keras.Model(inputs, keras.layers.Dense(3, name="out")(keras.layers.Dense(6, activation="tanh", name="h")(inputs)))
    model.compile(optimizer=keras.optimizers.SGD(50.0), loss=make_loss("cross_entropy"))
    cb = cv.Curvature(log_dir=str(tmp_path), every=2, iterations=100, tolerance=1e-6, probe_data=(x.numpy(), y.numpy()))
    model.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[cb])
    from gradlab.events import read_scalars

    scalars = read_scalars(tmp_path)
    assert set(scalars) == {"curvature/top_eigenvalue", "curvature/h/top_eigenvalue", "curvature/out/top_eigenvalue",
                            "curvature/iterations", "curvature/stability_limit", "curvature/sharpness_ratio"}
    assert [s for s, _ in scalars["curvature/top_eigenvalue"]] == [0, 2, 4]
    lam0 = scalars["curvature/top_eigenvalue"][0][1]
    assert scalars["curvature/stability_limit"][0][1] == pytest.approx(2 / 50.0)
    assert scalars["curvature/sharpness_ratio"][0][1] == pytest.approx(lam0 * 50.0 / 2, rel=1e-5)
    verdicts = cb.verdicts()
    assert len(verdicts) == 1 and verdicts[0]["verdict"] == "unstable" and verdicts[0]["layer"] == "model"
    assert verdicts[0]["first_step"] == 0 and "sharpness above 2/lr" in verdicts[0]["message"]
    assert observations_for(model).events.count(verdicts[0]) == 1


def test_warm_start_converges_in_fewer_products():
    model = _model(kind="mlp", hidden=(5,))
    x, y = _batch(n=16)
    loss, params = cv.batch_loss_fn(model), cv.read_params(model)
    cold = cv.hessian_top_eigenvalues(lambda p: loss(p, x, y), params, None, 500, 1e-6)
    warm = cv.hessian_top_eigenvalues(lambda p: loss(p, x, y), params, None, 500, 1e-6, v_global=cold["vector"])
    assert float(warm["top_eigenvalue"]) == pytest.approx(float(cold["top_eigenvalue"]), rel=1e-4)
    assert int(warm["iterations"]) <= 3 < int(cold["iterations"])


def test_warm_start_within_a_fit_and_into_the_next_fit_of_the_same_model(tmp_path):
    from gradlab.events import read_scalars

    """Within a fit and across fits: the compiled probe reads the start vectors when it runs (a
    Python value read at trace time would freeze the first one)."""
    x, y = _batch(n=16)
    model = _model(kind="mlp", hidden=(5,), lr=1e-6)  # the weights barely move: the eigenvector stays

    def iterations(cb, log_dir):
        model.fit(x, y, batch_size=16, epochs=1, verbose=0, callbacks=[cb])
        return [int(v) for _, v in read_scalars(log_dir)["curvature/iterations"]]

    def curvature(log_dir, **kw):
        return cv.Curvature(log_dir=str(log_dir), every=1, iterations=200, tolerance=1e-6,
                            probe_data=(x.numpy(), y.numpy()), **kw)

    cb = curvature(tmp_path / "warm")
    first = iterations(cb, tmp_path / "warm")
    second = iterations(cb, tmp_path / "warm")[len(first):]  # the same callback, the next fit
    assert first[0] > 3 and first[1] <= 3  # the next estimate of the same fit starts from the last eigenvector
    assert second[0] <= 3
    cold = curvature(tmp_path / "cold", warm_start=False)
    assert iterations(cold, tmp_path / "cold")[0] > 3


def test_hooks_reuse_resets_state():
    x, y = _batch(n=16)
    model = _model(kind="mlp", hidden=(5,), lr=0.01)
    cb = cv.Curvature(every=1, iterations=30, tolerance=1e-4, probe_data=(x.numpy(), y.numpy()), jit_compile=False)
    model.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[cb])
    series = observations_for(model).series
    assert [s for s, _ in series["curvature/top_eigenvalue"]] == [0, 1, 2]
    assert cb.verdicts() == []  # lr 0.01: far below 2/lr
    cb._verdicts.append({"stale": True})
    model.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[cb])  # the same instance again
    assert cb.verdicts() == []


def test_gradlab_run_writes_documented_tags(tmp_path):
    from gradlab.events import read_scalars
    from gradlab.experiment import run

    cfg = {"name": "second-order", "seed": 0,
           "data": {"name": "synthetic", "samples": 64, "batch_size": 16, "shuffle": False},
           "model": {"kind": "mlp", "hidden": [8]},
           "train": {"loss": "mse", "learning_rate": 0.5, "epochs": 3},
           "diagnostics": [{"type": "curvature", "every": 5}, {"type": "gradient_noise", "every": 5}]}
    result = run(cfg, run_dir=tmp_path / "run", quiet=True)
    scalars = read_scalars(result.run_dir)
    layers = ("hidden_1", "logits")
    expected = {"curvature/top_eigenvalue", "curvature/iterations", "curvature/stability_limit",
                "curvature/sharpness_ratio"} | {f"curvature/{ly}/top_eigenvalue" for ly in layers}
    expected |= {f"noise/{s}" for s in ("variance", "gsnr", "norm_test", "batch_size")}
    expected |= {f"noise/{ly}/{s}" for ly in layers for s in ("variance", "gsnr", "norm_test", "batch_size")}
    ours = {t for t in scalars if t.startswith(("curvature/", "noise/"))}
    assert ours == expected
    for tag in expected:
        assert [s for s, _ in scalars[tag]] == [0, 5, 10], tag  # 12 steps
        assert all(np.isfinite(v) for _, v in scalars[tag])
    ratio = dict(scalars["curvature/sharpness_ratio"])
    lam = dict(scalars["curvature/top_eigenvalue"])
    assert ratio[5] == pytest.approx(lam[5] * 0.5 / 2, rel=1e-5)
    assert result.metrics["verdicts"] == []


# ---------------------------------------------------------------------------------------------
# tf.distribute: logical devices must be configured before TensorFlow starts -> a subprocess

MIRRORED_SCRIPT = textwrap.dedent("""
    import json, sys
    import numpy as np, tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import keras
    from gradlab.callbacks import observations_for
    from gradlab.callbacks.curvature import Curvature
    from gradlab.callbacks.gradient_noise import GradientNoise
    from gradlab.config import ModelConfig
    from gradlab.losses import make_loss
    from gradlab.models import build_model

    rng = np.random.default_rng(0)
    x = rng.normal(size=(32, 4)).astype("float32"); y = rng.integers(0, 3, 32).astype("int32")

    def train(strategy):
        with strategy.scope():
            model = build_model(ModelConfig(kind="mlp", hidden=[6]), features=4, classes=3, seed=0)
            model.compile(optimizer=keras.optimizers.SGD(0.1), loss=make_loss("cross_entropy"))
        cbs = [Curvature(every=2, iterations=100, tolerance=0.0, probe_data=(x, y)),
               GradientNoise(every=2, source="probe", probe_data=(x, y))]  # the same batch on both
        model.fit(x, y, batch_size=8, epochs=1, verbose=0, shuffle=False, callbacks=cbs)
        series = observations_for(model).series
        return {k: list(v) for k, v in series.items()}, str(type(model.trainable_variables[0].value))

    mirrored, var_type = train(tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]))
    single, _ = train(tf.distribute.get_strategy())
    json.dump({"mirrored": mirrored, "single": single, "var_type": var_type}, sys.stdout)
""")


def test_under_mirrored_strategy_two_logical_cpus():
    """Both diagnostics under MirroredStrategy (2 logical CPUs) equal a single-device run."""
    import json

    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, "-c", MIRRORED_SCRIPT], capture_output=True, text=True, env=env,
                          timeout=240, cwd=Path(__file__).resolve().parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "Mirrored" in out["var_type"]
    mirrored, single = out["mirrored"], out["single"]
    tags = {t for t in single if t.startswith(("curvature/", "noise/"))}
    assert "curvature/top_eigenvalue" in tags and "noise/hidden_1/gsnr" in tags
    assert tags == {t for t in mirrored if t.startswith(("curvature/", "noise/"))}
    for tag in tags:
        got, want = np.array(mirrored[tag]), np.array(single[tag])
        np.testing.assert_array_equal(got[:, 0], want[:, 0])
        np.testing.assert_allclose(got[:, 1], want[:, 1], rtol=2e-3, atol=1e-6, err_msg=tag)
