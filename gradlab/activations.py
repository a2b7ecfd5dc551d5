"""The seed's activations and their local derivatives, by name.

The derivatives are the quantities the seed notebook computes with the tape and that
activation saturation is defined by:

* sigmoid ``s = 1/(1+e^-x)``: ``s' = s (1 - s)``, peak 1/4 at x = 0;
* tanh ``t``: ``t' = 1 - t^2``, peak 1 at x = 0;
* relu: ``1`` for x > 0 and ``0`` for x <= 0 (TensorFlow's convention at 0);
* leaky_relu with alpha 0.2 (the notebook's ``tf.nn.leaky_relu`` default): ``1`` for x > 0, ``0.2`` otherwise;
* linear: ``1``.

Each derivative is written in terms of the activation's *output* where that is possible,
which is what lets saturation be measured from activations alone.
"""

from __future__ import annotations

import tensorflow as tf

LEAKY_ALPHA = 0.2
ACTIVATION_NAMES = ("sigmoid", "tanh", "relu", "leaky_relu", "linear")

FORWARD = {
    "sigmoid": tf.sigmoid,
    "tanh": tf.tanh,
    "relu": tf.nn.relu,
    "leaky_relu": lambda x: tf.nn.leaky_relu(x, alpha=LEAKY_ALPHA),
    "linear": tf.identity,
}

# Peak of the local derivative; saturation is "derivative < threshold * peak".
DERIVATIVE_PEAK = {"sigmoid": 0.25, "tanh": 1.0, "relu": 1.0, "leaky_relu": 1.0, "linear": 1.0}


def derivative_from_output(name: str, out):
    """Local derivative ``f'(x)`` from the output ``out = f(x)``.

    For relu/leaky_relu the sign of the output equals the sign of the input, so the
    derivative follows from the output too (an output of exactly 0 counts as x <= 0).
    """
    if name == "sigmoid":
        return out * (1.0 - out)
    if name == "tanh":
        return 1.0 - tf.square(out)
    if name == "relu":
        return tf.cast(out > 0, out.dtype)
    if name == "leaky_relu":
        return tf.where(out > 0, tf.ones_like(out), tf.fill(tf.shape(out), tf.cast(LEAKY_ALPHA, out.dtype)))
    if name == "linear":
        return tf.ones_like(out)
    raise ValueError(f"`name` ({name!r}) must be one of {', '.join(ACTIVATION_NAMES)}")


def derivative(name: str, x):
    """Closed-form ``f'(x)`` of the activation ``name`` at the pre-activation ``x``."""
    return derivative_from_output(name, FORWARD[name](x))
