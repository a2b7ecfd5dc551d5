#!/usr/bin/env python
"""Re-run every cell of the seed notebook through gradlab's own code.

For the deterministic cells (tape semantics, activation derivative tables) it prints gradlab's
value beside the value the notebook printed. The loss cells draw random inputs, so their
printed numbers cannot be reproduced; for them it checks the structural facts instead:
gradlab's losses equal the notebook's formulas, the tape gradients equal the closed forms,
and each row of the softmax gradient dL/dW sums to zero (as the notebook's printed rows do).

Exit status 0 when every check holds, 1 otherwise. ``python scripts/reproduce_seed.py``
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from gradlab.activations import FORWARD, derivative  # noqa: E402
from gradlab.config import ModelConfig  # noqa: E402
from gradlab.losses import make_loss  # noqa: E402
from gradlab.models import build_model  # noqa: E402

NOTEBOOK = {
    "sigmoid": [4.5386874e-05, 4.1860685e-04, 3.8362255e-03, 3.3258751e-02, 1.8632649e-01,
                1.8632641e-01, 3.3258699e-02, 3.8362255e-03, 4.1854731e-04, 4.5416677e-05],
    "tanh": [0.0, 7.1525562e-07, 5.9722963e-05, 5.0775758e-03, 3.5285267e-01,
             3.5285220e-01, 5.0775758e-03, 5.9722963e-05, 7.1525562e-07, 0.0],
    "relu": [0.0] * 5 + [1.0] * 5,
    "leaky_relu": [0.2] * 5 + [1.0] * 5,
}
# the notebook's printed gradients of its random loss cells, for their row-sum property
NOTEBOOK_MSE_DW = [[0.10581937, -0.27172017, 0.16590075], [-0.1837901, 0.27098364, -0.08719351],
                   [-0.11029556, 0.25394598, -0.14365038], [-0.16678412, 0.21020497, -0.04342084]]
NOTEBOOK_CE_DW = [[-0.33004153, -0.04946045, 0.379502], [-0.5197544, -0.24553359, 0.76528794],
                  [0.14473207, -0.17832686, 0.03359476], [-0.3088742, -0.09931926, 0.40819344]]

failures: list[str] = []


def check(label: str, ok: bool, detail: str = "") -> None:
    print(f"  [{'ok' if ok else 'FAIL'}] {label}{(': ' + detail) if detail else ''}")
    if not ok:
        failures.append(label)


def cell_tape_semantics() -> None:
    print("In[21]  y = x*w computed outside the tape -> notebook printed [None]")
    x, w = tf.constant(3.0), tf.constant(5.0)
    y = x * w
    with tf.GradientTape() as tape:
        tape.watch(w)
    got = tape.gradient(y, [w])
    check("gradient is [None]", got == [None], f"gradlab/TF gives {got}")

    print("In[22]  y = w*x inside the tape -> notebook printed 3.0")
    with tf.GradientTape() as tape:
        tape.watch(w)
        y2 = w * x
    got = float(tape.gradient(y2, [w])[0])
    check("dy/dw", got == 3.0, f"{got} (notebook 3.0)")

    print("In[28]  nested tapes on yn = w*x + b -> notebook printed 3.0 1.0 then None")
    xv, wv, bv = tf.Variable(3.0), tf.Variable(5.0), tf.Variable(4.0)
    with tf.GradientTape() as t1:
        with tf.GradientTape() as t2:
            yn = wv * xv + bv
        d_w, d_b = t2.gradient(yn, [wv, bv])
    dd_w = t1.gradient(d_w, wv)
    check("first derivatives", (float(d_w), float(d_b)) == (3.0, 1.0), f"{float(d_w)} {float(d_b)} (notebook 3.0 1.0)")
    check("second derivative of a linear function", dd_w is None, f"{dd_w} (notebook None)")


def cell_activations() -> None:
    s = tf.linspace(-10.0, 10.0, 10)
    for cell, name in (("In[34]", "sigmoid"), ("In[37]", "tanh"), ("In[42]", "relu"), ("In[42]", "leaky_relu")):
        with tf.GradientTape() as tape:
            tape.watch(s)
            y = FORWARD[name](s)
        tape_grad = tape.gradient(y, s).numpy()
        closed = derivative(name, s).numpy()
        print(f"{cell}  d{name}/dx on linspace(-10, 10, 10)")
        print(f"    {'x':>9} {'gradlab tape':>14} {'closed form':>14} {'notebook':>14}")
        for xi, a, b, c in zip(s.numpy(), tape_grad, closed, NOTEBOOK[name]):
            print(f"    {xi:>9.4f} {a:>14.7e} {b:>14.7e} {c:>14.7e}")
        check(f"{name}: tape matches the notebook within float32 round-off",
              np.allclose(tape_grad, NOTEBOOK[name], rtol=2e-6, atol=2e-7))
        check(f"{name}: closed form matches the notebook within float32 round-off",
              np.allclose(closed, NOTEBOOK[name], rtol=2e-6, atol=2e-7))


def _closed_form(loss: str, x, y, w, b) -> tuple[np.ndarray, np.ndarray]:
    z = x @ w + b
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    onehot = np.eye(w.shape[1])[y]
    if loss == "cross_entropy":
        dz = p - onehot
    else:
        g = 2 * (p - onehot) / w.shape[1]
        dz = p * (g - (p * g).sum(1, keepdims=True))
    return x.T @ dz, dz.sum(0)


def cell_losses() -> None:
    y = tf.constant([2, 0])
    for cell, loss, printed in (("In[50]", "mse", NOTEBOOK_MSE_DW), ("In[55]", "cross_entropy", NOTEBOOK_CE_DW)):
        print(f"{cell}  {loss} on the softmax linear classifier, 2 samples x 4 features, 3 classes (random)")
        model = build_model(ModelConfig(kind="softmax_linear"), features=4, classes=3, seed=47)
        layer = model.get_layer("logits")
        i = tf.random.stateless_normal([2, 4], seed=[47, 0])
        with tf.GradientTape(persistent=True) as tape:
            logits = model(i)
            ours = make_loss(loss, "sum")(y, logits)
            prob = tf.nn.softmax(i @ layer.kernel + layer.bias, axis=1)
            if loss == "mse":
                seed = tf.reduce_sum(tf.losses.MSE(tf.one_hot(y, depth=3), prob))
            else:
                seed = tf.reduce_sum(tf.losses.categorical_crossentropy(
                    tf.one_hot(y, depth=3), i @ layer.kernel + layer.bias, from_logits=True))
        check("gradlab's loss equals the notebook's formula", np.isclose(float(ours), float(seed), rtol=1e-6),
              f"{float(ours):.7f} vs {float(seed):.7f}")
        gw, gb = tape.gradient(ours, [layer.kernel, layer.bias])
        ew, eb = _closed_form(loss, i.numpy().astype(np.float64), y.numpy(),
                              layer.kernel.numpy().astype(np.float64), layer.bias.numpy().astype(np.float64))
        check("tape gradient equals the closed form", np.allclose(gw, ew, rtol=1e-4, atol=1e-6)
              and np.allclose(gb, eb, rtol=1e-4, atol=1e-6), f"max |diff| {np.abs(gw.numpy() - ew).max():.2e}")
        check("rows of dL/dW sum to zero (gradlab)", np.allclose(gw.numpy().sum(1), 0, atol=1e-6),
              f"{np.round(gw.numpy().sum(1), 8).tolist()}")
        check("rows of dL/dW sum to zero (notebook's printed)", np.allclose(np.sum(printed, 1), 0, atol=1e-6),
              f"{np.round(np.sum(printed, 1), 8).tolist()}")
        check("dL/db sums to zero", abs(float(tf.reduce_sum(gb))) < 1e-6)
        del tape


def main() -> int:
    print(f"TensorFlow {tf.__version__}; gradlab re-running the seed notebook\n")
    cell_tape_semantics()
    cell_activations()
    cell_losses()
    print()
    if failures:
        print(f"{len(failures)} check(s) FAILED: {', '.join(failures)}")
        return 1
    print("all checks hold")
    return 0


if __name__ == "__main__":
    sys.exit(main())
