"""Found in review of the recorded updates (``_UpdateCapture``): cases where gradient_stats'
update_ratio was not ``||w_after - w_before|| / ||w_before||`` of the weights the step actually
left behind (each failed before its fix).

Each test trains one step (one batch) and compares the logged ratio with the ratio of the weights
read (numpy) before and after ``fit``.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest

from gradlab import events
from gradlab.callbacks import GradientStats, NonFiniteGuard
from gradlab.losses import make_loss
from gradlab.train_step import GradlabModel


def _one_step_ratio(tmp_path, model, optimizer, x, y, variable, tag, *, jit=False, guard=False):
    """(logged update_ratio of ``tag`` at step 0, numpy ratio of ``variable`` before/after the step)."""
    model.compile(optimizer=optimizer, loss=make_loss("cross_entropy", "mean"), jit_compile=jit)
    before = np.asarray(variable.numpy(), np.float64)
    callbacks = [GradientStats(log_dir=str(tmp_path), every=1, histogram_every=0)]
    if guard:
        callbacks.append(NonFiniteGuard(action="skip_step"))
    model.fit(x, y, batch_size=len(x), epochs=1, shuffle=False, verbose=0, callbacks=callbacks)
    after = np.asarray(variable.numpy(), np.float64)
    (step, got), = events.read_scalars(tmp_path)[tag]
    assert step == 0
    return got, np.linalg.norm(after - before) / np.linalg.norm(before)


def _embedding_model():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((4,), dtype="int32")
    h = keras.layers.Flatten()(keras.layers.Embedding(20, 5, name="emb")(inputs))
    return GradlabModel(inputs, keras.layers.Dense(3, name="out")(h))


@pytest.mark.parametrize("make_optimizer", [lambda: keras.optimizers.SGD(0.5), lambda: keras.optimizers.Adagrad(0.5)],
                         ids=["sgd", "adagrad"])
def test_sparse_embedding_update_is_recorded(tmp_path, make_optimizer):
    """An Embedding's gradient is a tf.IndexedSlices: SGD/Adagrad write it with scatter_sub. The
    trial trace (dense zero gradients) says "supported", the step's capture marks the sparse write
    invalid but nothing reads that, and the embedding's update_ratio is logged as 0 every step."""
    model = _embedding_model()
    rng = np.random.default_rng(3)
    x, y = rng.integers(0, 20, (8, 4)).astype(np.int32), rng.integers(0, 3, 8).astype(np.int32)
    got, expected = _one_step_ratio(tmp_path, model, make_optimizer(), x, y, model.get_layer("emb").embeddings,
                                    "gradients/emb/embeddings/update_ratio")
    assert expected > 0.01
    assert got == pytest.approx(expected, rel=1e-3)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_low_precision_weights_ratio_is_the_change_actually_applied(tmp_path, dtype):
    """With bfloat16/float16 weights the optimizer's float32-cast update is rounded when written
    into the weight (much of a small update is lost); the recorded tensor is the update *before*
    that rounding, so the ratio is not that of the weights' actual change (the snapshot path's)."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((6,))
    h = keras.layers.Dense(8, activation="tanh", name="hidden", dtype=dtype)(inputs)
    model = GradlabModel(inputs, keras.layers.Dense(3, name="out", dtype="float32")(h))
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(8, 6)).astype(np.float32), rng.integers(0, 3, 8).astype(np.int32)
    got, expected = _one_step_ratio(tmp_path, model, keras.optimizers.SGD(0.001), x, y,
                                    model.get_layer("hidden").kernel, "gradients/hidden/kernel/update_ratio")
    assert got == pytest.approx(expected, rel=1e-2, abs=1e-7)


def test_snapshot_path_under_xla_with_skip_step_guard(tmp_path):
    """Pre-existing (also at ece82a1), in the weight-snapshot path the change keeps as fallback
    (here: AdamW): jit_compile=True + NonFiniteGuard(skip_step) + every=1 logs update_ratio 0 on
    every (finite, applied) step."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((6,))
    h = keras.layers.Dense(8, activation="tanh", name="hidden")(inputs)
    model = GradlabModel(inputs, keras.layers.Dense(3, name="out")(h))
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(8, 6)).astype(np.float32), rng.integers(0, 3, 8).astype(np.int32)
    got, expected = _one_step_ratio(tmp_path, model, keras.optimizers.AdamW(0.01), x, y,
                                    model.get_layer("hidden").kernel, "gradients/hidden/kernel/update_ratio",
                                    jit=True, guard=True)
    assert model._gradlab_update_mode == "snapshot"
    assert expected > 1e-3
    assert got == pytest.approx(expected, rel=1e-3)
