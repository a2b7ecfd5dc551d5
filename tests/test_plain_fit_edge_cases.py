"""Edge cases of gradlab's callbacks in ordinary ``model.fit`` calls on plain Keras models.

Each test reproduced a defect found by exercising the callbacks the way users do.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from gradlab.callbacks import ActivationSaturation, Curvature, GradientNoise, observations_for

L = keras.layers


def _binary_data(n=64, features=6, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, features)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.float32)  # shape (n,): the usual layout for a Dense(1, sigmoid) classifier
    return x, y


def _sigmoid_classifier():
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((6,)), L.Dense(5, activation="tanh", name="h"),
                              L.Dense(1, activation="sigmoid", name="out")])
    model.compile(optimizer=keras.optimizers.SGD(0.05), loss="binary_crossentropy")
    return model


@pytest.mark.parametrize("make", [
    lambda probe: Curvature(log_dir=None, every=2, iterations=5, probe_data=probe),
    lambda probe: GradientNoise(log_dir=None, every=2, probe_data=probe),
], ids=["curvature", "gradient_noise"])
def test_string_binary_crossentropy_with_1d_labels_works_as_in_keras(make):
    # Keras trains this model (labels (n,), output (n, 1), loss="binary_crossentropy") and so do
    # GradientStats/NonFiniteGuard; Curvature and GradientNoise call the bare loss function
    # without Keras's squeeze_or_expand_to_same_rank and die with "Arguments `target` and `output`
    # must have the same rank" deep inside TensorFlow.
    x, y = _binary_data()
    model = _sigmoid_classifier()
    diag = make((x[:32], y[:32]))
    model.fit(x, y, epochs=1, batch_size=32, verbose=0, callbacks=[diag])
    series = observations_for(model).series
    assert any(tag.startswith(("curvature/", "noise/")) for tag in series)


@pytest.mark.parametrize("dropout", [False, True], ids=["dense_chain", "vmap"])
def test_gradient_noise_variance_with_a_batch_mean_custom_loss_is_not_scaled_by_batch_squared(dropout):
    # A custom loss function returning the batch mean (a scalar) is accepted by Keras and trains
    # exactly like "mse". GradientNoise's Dense-chain path sums that scalar as if it were the
    # per-sample losses, so every per-sample delta is divided by B: noise/variance comes out
    # B**2 = 1024 times too small, silently (norm_test/gsnr are scale-free and stay right).
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 6)).astype(np.float32)
    y = rng.normal(size=(64, 1)).astype(np.float32)

    def batch_mean_mse(y_true, y_pred):
        return tf.reduce_mean(tf.square(y_true - y_pred))

    variances = {}
    for name, loss in (("builtin", "mse"), ("custom", batch_mean_mse)):
        keras.utils.set_random_seed(0)
        layers = [L.Dense(5, activation="tanh", name="h")] + ([L.Dropout(0.5)] if dropout else []) + [L.Dense(1, name="out")]
        model = keras.Sequential([keras.Input((6,)), *layers])
        model.compile(optimizer=keras.optimizers.SGD(0.01), loss=loss)
        model.fit(x, y, epochs=1, batch_size=32, verbose=0,
                  callbacks=[GradientNoise(log_dir=None, every=100, probe_data=(x[:32], y[:32]))])
        variances[name] = dict(observations_for(model).series["noise/variance"])[0]
    assert variances["custom"] == pytest.approx(variances["builtin"], rel=1e-4)


class SubclassedNet(keras.Model):
    def __init__(self, units, activation=None):
        super().__init__()
        self.hidden = L.Dense(8, activation="tanh")
        self.head = L.Dense(units, activation=activation)

    def call(self, x, training=False):
        return self.head(self.hidden(x))


def test_subclassed_single_unit_output_is_not_reported_as_a_saturated_softmax():
    # A subclassed regression model: its one output unit is softmaxed (p = 1 for every sample), so
    # activation_saturation writes activations/output/saturated_fraction = 1.0 and entropy = 0.0
    # for an output that is neither saturated nor a distribution. A functional model with the same
    # layers gets no softmax statistics for a 1-unit output.
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 6)).astype(np.float32)
    y = rng.normal(size=(64, 1)).astype(np.float32)
    keras.utils.set_random_seed(0)
    model = SubclassedNet(1)
    model.compile(optimizer=keras.optimizers.SGD(0.01), loss="mse")
    model.fit(x, y, epochs=1, batch_size=32, verbose=0,
              callbacks=[ActivationSaturation(log_dir=None, every=1, probe_data=(x[:32], y[:32]))])
    series = observations_for(model).series
    assert "activations/output/saturated_fraction" not in series
    assert "activations/output/entropy" not in series


def test_subclassed_softmax_output_entropy_is_that_of_its_probabilities():
    # A subclassed classifier that outputs probabilities (softmax head, from_logits=False): the
    # probe applies a second softmax to them, so the logged entropy is that of softmax(p), close
    # to log(K), not the entropy of the model's own predictions.
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 6)).astype(np.float32) * 3
    y = rng.integers(0, 3, 64).astype(np.int32)
    keras.utils.set_random_seed(0)
    model = SubclassedNet(3, "softmax")
    model.compile(optimizer=keras.optimizers.SGD(0.01), loss="sparse_categorical_crossentropy")
    model.fit(x, y, epochs=1, batch_size=64, verbose=0,
              callbacks=[ActivationSaturation(log_dir=None, every=1, probe_data=(x[:32], y[:32]))])
    p = model(x[:32], training=False).numpy().astype(np.float64)
    expected = float(np.mean(-np.sum(p * np.log(np.maximum(p, 1e-30)), axis=1)))
    got = dict(observations_for(model).series["activations/output/entropy"])[1]
    assert got == pytest.approx(expected, rel=1e-3)


def test_curvature_refuses_a_multi_output_model_with_one_shared_loss_in_one_line():
    # README: gradient_noise and curvature "need per-sample losses of one output and refuse such
    # models with a one-line error". With one loss for both outputs (loss="mse", valid in Keras),
    # Curvature instead fails inside TensorFlow: "Dimension 1 in both shapes must be equal ...
    # From merging shape 0 with other shapes. for '{{node packed}} = Pack..." (several lines).
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 6)).astype(np.float32)
    ya, yb = rng.normal(size=(64, 1)).astype(np.float32), rng.normal(size=(64, 2)).astype(np.float32)
    keras.utils.set_random_seed(0)
    inp = keras.Input((6,))
    h = L.Dense(5, activation="tanh", name="h")(inp)
    model = keras.Model(inp, [L.Dense(1, name="a")(h), L.Dense(2, name="b")(h)])
    model.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse")
    with pytest.raises(ValueError) as err:
        model.fit(x, [ya, yb], epochs=1, batch_size=32, verbose=0,
                  callbacks=[Curvature(log_dir=None, every=2, iterations=3, probe_data=(x[:32], [ya[:32], yb[:32]]))])
    message = str(err.value)
    assert "\n" not in message
    assert "output" in message or "one loss" in message


def test_activation_saturation_does_not_need_a_compiled_loss():
    # A model whose loss lives in its own train_step (compile(optimizer) only, the GAN/VAE
    # pattern). Activation statistics need only a forward pass, yet ActivationSaturation refuses
    # with "probe_data does not fit the model or its loss: No loss to compute", blaming the
    # probe data.
    class OwnLoss(keras.Model):
        def train_step(self, data):
            x, y = data
            with tf.GradientTape() as tape:
                loss = tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(y, self(x, training=True),
                                                                                   from_logits=True))
            grads = tape.gradient(loss, self.trainable_variables)
            self.optimizer.apply_gradients(zip(grads, self.trainable_variables))
            return {"loss": loss}

    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 6)).astype(np.float32)
    y = rng.integers(0, 3, 64).astype(np.int32)
    keras.utils.set_random_seed(0)
    inp = keras.Input((6,))
    model = OwnLoss(inp, L.Dense(3, name="out")(L.Dense(5, activation="relu", name="h")(inp)))
    model.compile(optimizer=keras.optimizers.SGD(0.05))
    model.fit(x, y, epochs=1, batch_size=32, verbose=0,
              callbacks=[ActivationSaturation(log_dir=None, every=1, probe_data=(x[:32], y[:32]))])
    assert "activations/h/dead_fraction" in observations_for(model).series
    # a diagnostic that does need the loss says so, rather than blaming the probe data
    from gradlab.callbacks import GradientStats

    with pytest.raises(ValueError, match=r"^GradientStats needs the model's loss .* compiled without one"):
        model.fit(x, y, epochs=1, batch_size=32, verbose=0,
                  callbacks=[GradientStats(log_dir=None, every=1, probe_data=(x[:32], y[:32]))])


def test_per_sample_losses_refuse_a_subclassed_model_with_two_outputs_in_one_line():
    # A subclassed model does not tell Keras how many outputs it has before it is called: the
    # refusal then comes when the loss is traced, still as one line naming the model.
    class TwoHeads(keras.Model):
        def __init__(self):
            super().__init__(name="two_heads")
            self.h, self.a, self.b = L.Dense(4, activation="tanh"), L.Dense(1), L.Dense(1)

        def call(self, x, training=False):
            h = self.h(x)
            return self.a(h), self.b(h)

    rng = np.random.default_rng(0)
    x = rng.normal(size=(32, 6)).astype(np.float32)
    ys = (rng.normal(size=(32, 1)).astype(np.float32), rng.normal(size=(32, 1)).astype(np.float32))
    keras.utils.set_random_seed(0)
    model = TwoHeads()
    model.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse")
    with pytest.raises(ValueError) as err:
        model.fit(x, ys, epochs=1, batch_size=16, verbose=0,
                  callbacks=[Curvature(log_dir=None, every=1, iterations=3, probe_data=(x[:16], (ys[0][:16], ys[1][:16])))])
    assert "'two_heads' has 2 outputs" in str(err.value).splitlines()[0]


def test_a_second_fit_does_not_probe_the_boundary_step_twice(tmp_path):
    # fit 1 ends at a due step and probes it; fit 2 of the same model starts there: the same
    # weights, the same step, written once.
    from gradlab.callbacks import GradientStats
    from gradlab.events import read_scalars

    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 6)).astype(np.float32)
    y = rng.integers(0, 3, 64).astype(np.int32)
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((6,)), L.Dense(5, activation="relu", name="h"), L.Dense(3, name="out")])
    model.compile(optimizer=keras.optimizers.SGD(0.05), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    diag = GradientStats(log_dir=str(tmp_path), every=2, probe_data=(x[:16], y[:16]))
    for _ in range(2):
        model.fit(x, y, epochs=1, batch_size=16, verbose=0, callbacks=[diag])
    steps = [s for s, _ in read_scalars(tmp_path)["gradients/global_norm"]]
    assert steps == [0, 2, 4, 6, 8]
