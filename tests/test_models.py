"""Models: the seed's classifier exactly, MLPs with the seed's activations, stable names."""

from __future__ import annotations

import numpy as np
import pytest

from gradlab.config import ModelConfig
from gradlab.models import build_model
from gradlab.train_step import GradlabModel


def test_softmax_linear_is_the_seed_classifier():
    model = build_model(ModelConfig(kind="softmax_linear"), features=4, classes=3, seed=0)
    assert isinstance(model, GradlabModel)
    assert [layer.name for layer in model.layers[1:]] == ["logits"]
    layer = model.get_layer("logits")
    w, b = layer.kernel.numpy(), layer.bias.numpy()
    assert w.shape == (4, 3) and b.shape == (3,)
    assert np.all(b == 0)  # b zeros, as in the seed
    x = np.random.default_rng(0).normal(size=(5, 4)).astype(np.float32)
    np.testing.assert_allclose(model(x).numpy(), x @ w + b, rtol=1e-5, atol=1e-6)  # logits = x @ W + b


def test_softmax_linear_default_kernel_is_standard_normal():
    model = build_model(ModelConfig(kind="softmax_linear"), features=400, classes=50, seed=1)
    w = model.get_layer("logits").kernel.numpy()
    assert abs(w.mean()) < 0.02 and w.std() == pytest.approx(1.0, rel=0.03)


@pytest.mark.parametrize("activation", ["sigmoid", "tanh", "relu", "leaky_relu", "linear"])
def test_mlp_layers_and_activation(activation):
    model = build_model(ModelConfig(kind="mlp", hidden=[6, 5], activation=activation), features=4, classes=3)
    names = [layer.name for layer in model.layers[1:]]
    assert names == ["hidden_1", "hidden_2", "logits"]
    assert model.get_layer("hidden_1").activation.__name__ == activation
    assert model.get_layer("logits").activation.__name__ == "linear"
    assert [v.path for v in model.trainable_variables] == [
        "hidden_1/kernel", "hidden_1/bias", "hidden_2/kernel", "hidden_2/bias", "logits/kernel", "logits/bias"]


def test_leaky_relu_slope_is_point_two():
    model = build_model(ModelConfig(kind="mlp", hidden=[1], activation="leaky_relu",
                                    kernel_initializer="ones", bias_initializer="zeros"), features=1, classes=2)
    layer = model.get_layer("hidden_1")
    assert float(layer(np.array([[-10.0]], np.float32))[0, 0]) == pytest.approx(-2.0)


def test_initializers_are_configurable_and_seeded():
    cfg = ModelConfig(kind="mlp", hidden=[8], activation="relu",
                      kernel_initializer={"name": "random_normal", "stddev": 3.0},
                      bias_initializer={"name": "constant", "value": -5.0})
    a = build_model(cfg, features=4, classes=3, seed=7)
    b = build_model(cfg, features=4, classes=3, seed=7)
    c = build_model(cfg, features=4, classes=3, seed=8)
    assert np.all(a.get_layer("hidden_1").bias.numpy() == -5.0)
    for va, vb in zip(a.trainable_variables, b.trainable_variables):
        np.testing.assert_array_equal(va.numpy(), vb.numpy())
    assert not np.array_equal(a.trainable_variables[0].numpy(), c.trainable_variables[0].numpy())
