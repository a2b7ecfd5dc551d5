"""The seed notebook's two losses, by name.

Both take integer class labels ``y`` of shape ``(batch,)`` and logits of shape
``(batch, classes)``, and return one value per sample; the batch reduction
(``mean`` or ``sum``) is applied by :func:`make_loss`.

* ``mse`` (the seed's ``tf.losses.MSE(one_hot, softmax(logits))``): per sample,
  ``mean_k (onehot_k - softmax(z)_k)^2``. Its gradient with respect to the logits is
  ``J_softmax(z)^T * 2 (p - onehot) / K``, which shrinks towards zero as the softmax
  saturates, whether the prediction is right or wrong.
* ``cross_entropy`` (the seed's ``categorical_crossentropy(..., from_logits=True)``):
  ``-log softmax(z)_y``, computed stably from the logits. Its gradient with respect to the
  logits is ``p - onehot``, which stays large while the prediction is wrong.

``reduction: sum`` is the seed's ``reduce_sum`` over the batch; ``mean`` divides that by the
batch size (Keras's ``sum_over_batch_size``). Logits in float16/bfloat16 (mixed precision) are
cast to float32 first, so the loss is always float32.
"""

from __future__ import annotations

import keras
import tensorflow as tf

LOSS_NAMES = ("cross_entropy", "mse")
KERAS_REDUCTION = {"mean": "sum_over_batch_size", "sum": "sum"}


def _one_hot(y, logits):
    y = tf.cast(tf.reshape(y, [-1]), tf.int32)
    return tf.one_hot(y, depth=tf.shape(logits)[-1], dtype=logits.dtype)


def _loss_dtype(logits):
    """Half-precision logits are computed in float32; float32 and float64 (``gradlab check``) are kept."""
    logits = tf.convert_to_tensor(logits)
    return tf.cast(logits, tf.float32) if logits.dtype in (tf.float16, tf.bfloat16) else logits


def mse_on_softmax(y, logits):
    """Per-sample ``mean_k (onehot(y)_k - softmax(logits)_k)^2`` (the seed's MSE loss)."""
    logits = _loss_dtype(logits)
    prob = tf.nn.softmax(logits, axis=-1)
    return tf.reduce_mean(tf.square(_one_hot(y, logits) - prob), axis=-1)


def cross_entropy_from_logits(y, logits):
    """Per-sample ``-log softmax(logits)_y``, computed from the logits (stable)."""
    logits = _loss_dtype(logits)
    labels = tf.cast(tf.reshape(y, [-1]), tf.int32)
    return tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits)


PER_SAMPLE = {"mse": mse_on_softmax, "cross_entropy": cross_entropy_from_logits}


@keras.saving.register_keras_serializable(package="gradlab")
class GradlabLoss(keras.losses.Loss):
    """A Keras loss wrapping one of the seed's per-sample losses with a batch reduction."""

    def __init__(self, kind: str = "cross_entropy", reduction: str = "mean", name: str | None = None, **kwargs):
        if kind not in PER_SAMPLE:
            raise ValueError(f"`kind` ({kind!r}) must be one of {', '.join(PER_SAMPLE)}")
        if reduction not in KERAS_REDUCTION:
            raise ValueError(f"`reduction` ({reduction!r}) must be one of {', '.join(KERAS_REDUCTION)}")
        kwargs.pop("dtype", None)
        super().__init__(name=name or kind, reduction=KERAS_REDUCTION[reduction])
        self.kind, self.batch_reduction = kind, reduction

    def call(self, y_true, y_pred):
        return PER_SAMPLE[self.kind](y_true, y_pred)

    def get_config(self):
        return {"kind": self.kind, "reduction": self.batch_reduction, "name": self.name}


def make_loss(name: str, reduction: str = "mean") -> GradlabLoss:
    """The loss named ``name`` (``cross_entropy`` | ``mse``) with ``reduction`` (``mean`` | ``sum``)."""
    return GradlabLoss(kind=name, reduction=reduction)


def reduce(per_sample, reduction: str):
    """Apply a batch reduction to per-sample losses (``sum`` or ``mean``)."""
    return tf.reduce_sum(per_sample) if reduction == "sum" else tf.reduce_mean(per_sample)
