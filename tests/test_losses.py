"""The seed's two losses: gradients against numpy closed forms, at sum and mean reduction."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from gradlab.config import ModelConfig
from gradlab.losses import GradlabLoss, cross_entropy_from_logits, make_loss, mse_on_softmax
from gradlab.models import build_model


def _softmax(z):
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def numpy_grads(loss, x, y, w, b, reduction):
    """Closed-form dL/dW, dL/db for logits = x @ W + b."""
    n, k = x.shape[0], w.shape[1]
    p = _softmax(x @ w + b)
    onehot = np.eye(k)[y]
    if loss == "cross_entropy":
        dz = p - onehot  # X^T (softmax - Y)
    else:  # mse: mean_k (y - p)^2 -> dL/dp = 2 (p - y) / K, back through J = diag(p) - p p^T
        g = 2.0 * (p - onehot) / k
        dz = p * (g - (p * g).sum(axis=1, keepdims=True))
    if reduction == "mean":
        dz = dz / n
    return x.T @ dz, dz.sum(axis=0)


@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_gradients_match_closed_form(loss, reduction):
    rng = np.random.default_rng(3)
    x = rng.normal(size=(7, 4)).astype(np.float64)
    y = rng.integers(0, 3, size=7)
    w = rng.normal(size=(4, 3))
    b = rng.normal(size=3) * 0.1
    wv, bv = tf.Variable(w), tf.Variable(b)
    with tf.GradientTape() as tape:
        logits = tf.constant(x) @ wv + bv
        value = make_loss(loss, reduction)(tf.constant(y), logits)
    gw, gb = tape.gradient(value, [wv, bv])
    ew, eb = numpy_grads(loss, x, y, w, b, reduction)
    np.testing.assert_allclose(gw.numpy(), ew, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(gb.numpy(), eb, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
def test_gradlab_model_gradients_match_closed_form(loss):
    """Same check through gradlab's own softmax_linear model (float32)."""
    model = build_model(ModelConfig(kind="softmax_linear"), features=4, classes=3, seed=5)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(6, 4)).astype(np.float32)
    y = np.array([2, 0, 1, 1, 0, 2])
    with tf.GradientTape() as tape:
        value = make_loss(loss, "sum")(y, model(x))
    layer = model.get_layer("logits")
    gw, gb = tape.gradient(value, [layer.kernel, layer.bias])
    ew, eb = numpy_grads(loss, x.astype(np.float64), y, layer.kernel.numpy().astype(np.float64),
                         layer.bias.numpy().astype(np.float64), "sum")
    np.testing.assert_allclose(gw.numpy(), ew, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(gb.numpy(), eb, rtol=1e-4, atol=1e-6)


def test_sum_reduction_reproduces_the_seed_cells_exactly():
    """The seed's formulas, verbatim, against gradlab's losses with reduction sum."""
    i = tf.random.stateless_normal([2, 4], seed=[0, 1])
    w = tf.random.stateless_normal([4, 3], seed=[0, 2])
    b = tf.zeros([3])
    y = tf.constant([2, 0])
    logits = i @ w + b
    seed_mse = tf.reduce_sum(tf.losses.MSE(tf.one_hot(y, depth=3), tf.nn.softmax(logits, axis=1)))
    seed_ce = tf.reduce_sum(tf.losses.categorical_crossentropy(tf.one_hot(y, depth=3), logits, from_logits=True))
    np.testing.assert_allclose(make_loss("mse", "sum")(y, logits).numpy(), seed_mse.numpy(), rtol=1e-6)
    np.testing.assert_allclose(make_loss("cross_entropy", "sum")(y, logits).numpy(), seed_ce.numpy(), rtol=1e-6)


def test_mean_is_sum_over_batch_size():
    z = tf.random.stateless_normal([5, 3], seed=[4, 4])
    y = tf.constant([0, 1, 2, 1, 0])
    for name in ("mse", "cross_entropy"):
        s = make_loss(name, "sum")(y, z).numpy()
        m = make_loss(name, "mean")(y, z).numpy()
        assert m == pytest.approx(s / 5, rel=1e-6)


def test_softmax_gradient_rows_sum_to_zero():
    """Structural fact the seed's random cells show: each row of dL/dW sums to 0 (softmax shift invariance)."""
    rng = np.random.default_rng(9)
    x = tf.constant(rng.normal(size=(2, 4)), tf.float32)
    for name in ("mse", "cross_entropy"):
        w, b = tf.Variable(rng.normal(size=(4, 3)).astype(np.float32)), tf.Variable(tf.zeros([3]))
        with tf.GradientTape() as tape:
            value = make_loss(name, "sum")(tf.constant([2, 0]), x @ w + b)
        gw, gb = tape.gradient(value, [w, b])
        np.testing.assert_allclose(gw.numpy().sum(axis=1), 0.0, atol=1e-6)
        assert abs(float(tf.reduce_sum(gb))) < 1e-6


def test_mse_gradient_fades_as_softmax_saturates_but_cross_entropy_does_not():
    """The seed's point: for a confidently wrong prediction, MSE's logit gradient vanishes."""
    y = tf.constant([0])
    for scale, expect_small in ((1.0, False), (30.0, True)):
        z = tf.Variable([[-1.0, 1.0, 0.0]]) * scale
        z = tf.Variable(z)
        with tf.GradientTape(persistent=True) as tape:
            mse = mse_on_softmax(y, z)
            ce = cross_entropy_from_logits(y, z)
        g_mse = float(tf.norm(tape.gradient(mse, z)))
        g_ce = float(tf.norm(tape.gradient(ce, z)))
        assert g_ce > 0.5
        assert (g_mse < 1e-6) == expect_small


def test_mixed_precision_logits_give_float32_loss():
    z = tf.cast(tf.random.stateless_normal([4, 3], seed=[1, 1]), tf.float16)
    assert make_loss("mse")(tf.constant([0, 1, 2, 0]), z).dtype == tf.float32


def test_bad_names_raise_naming_the_argument():
    with pytest.raises(ValueError, match="`kind`"):
        GradlabLoss(kind="xent")
    with pytest.raises(ValueError, match="`reduction`"):
        GradlabLoss(reduction="avg")
