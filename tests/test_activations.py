"""Golden tests from the seed notebook: activation derivative tables and tape semantics."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from gradlab.activations import DERIVATIVE_PEAK, FORWARD, derivative, derivative_from_output

# The seed notebook's printed outputs for tape.gradient(f(s), s) at s = linspace(-10, 10, 10).
SEED_TABLES = {
    "sigmoid": [4.5386874e-05, 4.1860685e-04, 3.8362255e-03, 3.3258751e-02, 1.8632649e-01,
                1.8632641e-01, 3.3258699e-02, 3.8362255e-03, 4.1854731e-04, 4.5416677e-05],
    "tanh": [0.0000000e+00, 7.1525562e-07, 5.9722963e-05, 5.0775758e-03, 3.5285267e-01,
             3.5285220e-01, 5.0775758e-03, 5.9722963e-05, 7.1525562e-07, 0.0000000e+00],
    "relu": [0., 0., 0., 0., 0., 1., 1., 1., 1., 1.],
    "leaky_relu": [0.2, 0.2, 0.2, 0.2, 0.2, 1., 1., 1., 1., 1.],
}
# float32 round-off: s(1-s) and 1-t^2 lose absolute precision ~eps near saturation.
ATOL, RTOL = 2e-7, 2e-6


@pytest.mark.parametrize("name", sorted(SEED_TABLES))
def test_tape_derivative_matches_seed_table(name):
    s = tf.linspace(-10.0, 10.0, 10)
    with tf.GradientTape() as tape:
        tape.watch(s)
        y = FORWARD[name](s)
    (grad,) = tape.gradient(y, [s])
    np.testing.assert_allclose(grad.numpy(), SEED_TABLES[name], atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("name", sorted(SEED_TABLES))
def test_closed_form_derivative_matches_seed_table(name):
    s = tf.linspace(-10.0, 10.0, 10)
    np.testing.assert_allclose(derivative(name, s).numpy(), SEED_TABLES[name], atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("name", sorted(FORWARD))
def test_closed_form_equals_tape_on_random_inputs(name):
    x = tf.random.stateless_normal([1000], seed=[1, 2]) * 4.0
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = FORWARD[name](x)
    tape_grad = tape.gradient(y, x)
    np.testing.assert_allclose(derivative_from_output(name, y).numpy(), tape_grad.numpy(), atol=1e-6)


def test_derivative_peaks():
    x = tf.constant([0.0, 1e-3, -1e-3])
    assert derivative("sigmoid", x).numpy().max() == pytest.approx(DERIVATIVE_PEAK["sigmoid"], rel=1e-5)
    assert derivative("tanh", x).numpy().max() == pytest.approx(DERIVATIVE_PEAK["tanh"], rel=1e-5)


def test_leaky_relu_alpha_is_the_seeds():
    # the notebook's tf.nn.leaky_relu default alpha
    assert FORWARD["leaky_relu"](tf.constant(-10.0)).numpy() == pytest.approx(-2.0)


def test_unknown_activation_is_a_clear_error():
    with pytest.raises(ValueError, match="`name`"):
        derivative_from_output("swish", tf.constant(1.0))


def test_gradient_of_computation_outside_the_tape_is_none():
    # seed cell In[21]: y = x*w computed before the tape -> [None]
    x, w = tf.constant(3.0), tf.constant(5.0)
    y = x * w
    with tf.GradientTape() as tape:
        tape.watch(w)
    assert tape.gradient(y, [w]) == [None]


def test_gradient_inside_the_tape():
    # seed cell In[22]: d(w*x)/dw = x = 3
    x, w = tf.constant(3.0), tf.constant(5.0)
    with tf.GradientTape() as tape:
        tape.watch(w)
        y = w * x
    assert tape.gradient(y, [w])[0].numpy() == 3.0


def test_second_derivative_of_linear_function_is_none():
    # seed cell In[28]: nested tapes; d2(w*x+b)/dw2 is None (the first derivative x does not depend on w)
    x, w, b = tf.Variable(3.0), tf.Variable(5.0), tf.Variable(4.0)
    with tf.GradientTape() as t1:
        with tf.GradientTape() as t2:
            yn = w * x + b
        d_w, d_b = t2.gradient(yn, [w, b])
    assert (d_w.numpy(), d_b.numpy()) == (3.0, 1.0)
    assert t1.gradient(d_w, w) is None


def test_persistent_tape_allows_several_gradients():
    # seed cell In[42]: one persistent tape, gradients of relu and leaky_relu
    s = tf.linspace(-10.0, 10.0, 10)
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(s)
        y2, y3 = FORWARD["relu"](s), FORWARD["leaky_relu"](s)
    np.testing.assert_array_equal(tape.gradient(y2, s).numpy(), SEED_TABLES["relu"])
    np.testing.assert_allclose(tape.gradient(y3, s).numpy(), SEED_TABLES["leaky_relu"])
    del tape
