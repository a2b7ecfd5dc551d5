"""Models built from the ``model`` section: the seed's softmax linear classifier and MLPs.

Every model outputs **logits**; the softmax lives in the loss (and in the diagnostics that
look at probabilities). Layer names are stable, because TensorBoard tags are built from them:

* ``softmax_linear``: one ``Dense`` layer named ``logits``, ``logits = x @ W + b`` -- exactly the
  seed's classifier. By default ``W ~ N(0, 1)`` (the seed's ``tf.random.normal``) and ``b = 0``.
* ``mlp``: ``Dense`` layers ``hidden_1 ... hidden_n`` with the configured activation
  (``leaky_relu`` uses alpha 0.2, as in the seed), then a linear ``Dense`` named ``logits``.
  Default kernel initializer ``glorot_uniform``, biases zero.

Under a mixed-precision policy the ``logits`` layer computes in float32, so the softmax and the
loss see float32 logits; all variables are float32 either way.
"""

from __future__ import annotations

from typing import Any

import keras

from gradlab.config import ModelConfig
from gradlab.train_step import GradlabModel

DEFAULT_KERNEL = {"softmax_linear": {"name": "random_normal", "stddev": 1.0}, "mlp": "glorot_uniform"}


def make_initializer(spec: Any, seed: int | None = None) -> keras.initializers.Initializer:
    """A Keras initializer from a config value: a name, or ``{name: ..., **args}``
    (``constant`` without a ``value`` is 0, Keras's default)."""
    if isinstance(spec, str):
        name, args = spec, {}
    else:
        name, args = spec["name"], {k: v for k, v in spec.items() if k != "name"}
    config = dict(args)
    if name == "constant":
        config.setdefault("value", 0.0)
    if name not in ("zeros", "ones", "constant") and seed is not None:
        config["seed"] = seed
    return keras.initializers.get({"class_name": name, "config": config})


def build_model(cfg: ModelConfig, *, features: int, classes: int, seed: int = 0) -> GradlabModel:
    """Build the model described by ``cfg`` for ``features`` inputs and ``classes`` outputs.

    Each layer's initializers get their own seed derived from ``seed``, so two builds with the
    same seed give identical weights.
    """
    kernel_spec = cfg.kernel_initializer if cfg.kernel_initializer is not None else DEFAULT_KERNEL[cfg.kind]
    bias_spec = cfg.bias_initializer if cfg.bias_initializer is not None else "zeros"  # null: the default
    inputs = keras.Input(shape=(features,), name="features")
    x = inputs
    widths = list(cfg.hidden) if cfg.kind == "mlp" else []
    for i, width in enumerate(widths, start=1):
        x = keras.layers.Dense(
            width, activation=cfg.activation, name=f"hidden_{i}",
            kernel_initializer=make_initializer(kernel_spec, seed * 1000 + 2 * i),
            bias_initializer=make_initializer(bias_spec, seed * 1000 + 2 * i + 1))(x)
    n = len(widths) + 1
    logits = keras.layers.Dense(
        classes, activation=None, name="logits", dtype="float32" if _mixed() else None,
        kernel_initializer=make_initializer(kernel_spec, seed * 1000 + 2 * n),
        bias_initializer=make_initializer(bias_spec,
            seed * 1000 + 2 * n + 1))(x)
    return GradlabModel(inputs=inputs, outputs=logits, name=cfg.kind)


def _mixed() -> bool:
    return keras.config.dtype_policy().name.startswith("mixed")
