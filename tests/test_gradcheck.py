"""gradlab check: float64 tape gradients vs tf.test.compute_gradient finite differences."""

from __future__ import annotations

import itertools

import keras
import numpy as np
import pytest
import tensorflow as tf

from conftest import ROOT, gradlab_cli, tiny_config
from gradlab import gradcheck
from gradlab.config import load_config, load_raw


def test_relative_error_is_the_max_norm_error_over_the_variable_scale():
    t = np.array([1.0, -2.0, 0.5])
    n = np.array([1.0, -2.0 + 1e-3, 0.5])
    abs_err, rel = gradcheck.relative_error(t, n, floor=1e-6)
    assert abs_err == pytest.approx(1e-3) and rel == pytest.approx(1e-3 / 2.0, rel=1e-6)
    # an all-zero gradient is compared against the floor, not divided by zero
    assert gradcheck.relative_error(np.zeros(3), np.full(3, 1e-12), floor=1e-6)[1] == pytest.approx(1e-6)
    assert gradcheck.relative_error(np.zeros(0), np.zeros(0), floor=1e-6) == (0.0, 0.0)
    assert gradcheck.relative_error(np.array([np.nan]), np.array([1.0]), floor=1e-6)[1] == float("inf")
    # a flipped sign is an error of 2, a factor of two an error of 1/2
    assert gradcheck.relative_error(t, -t, floor=1e-6)[1] == pytest.approx(2.0)
    assert gradcheck.relative_error(t, 2 * t, floor=1e-6)[1] == pytest.approx(0.5)


CASES = [("softmax_linear", None)] + [("mlp", a) for a in ("sigmoid", "tanh", "relu", "leaky_relu", "linear")]
LOSSES = list(itertools.product(("cross_entropy", "mse"), ("mean", "sum")))


@pytest.mark.parametrize("i,kind,activation", [(i, *c) for i, c in enumerate(CASES)])
def test_passes_for_every_model_kind_activation_loss_and_reduction(i, kind, activation):
    """Each model case with two of the four loss x reduction pairs (every pair meets two cases or more)."""
    model = {"kind": kind} if kind == "softmax_linear" else {"kind": kind, "hidden": [5, 4], "activation": activation}
    for loss, reduction in (LOSSES[i % 4], LOSSES[(i + 1) % 4]):
        exp = load_config(tiny_config(model=model, train={"loss": loss, "reduction": reduction}))
        result = gradcheck.check_config(exp, batch=6)
        assert result.passed, gradcheck.format_result(result)
        names = [v.name for v in result.variables]
        layers = [f"hidden_{i}" for i in (1, 2)] if kind == "mlp" else []
        assert names == [f"{layer}/{var}" for layer in layers + ["logits"] for var in ("kernel", "bias")]
        assert result.max_rel_error < 1e-6
        assert all(v.checked == v.entries for v in result.variables)


def test_the_check_runs_in_float64_and_restores_the_policy():
    exp = load_config(tiny_config(model={"kind": "mlp", "hidden": [3]}))
    before = (keras.config.floatx(), keras.config.dtype_policy().name)
    result = gradcheck.check_config(exp, batch=4)
    assert (keras.config.floatx(), keras.config.dtype_policy().name) == before
    # float32 noise would give errors around 1e-3; float64 central differences are far below that
    assert result.max_rel_error < 1e-7 and result.batch == 4


class _Cube(keras.layers.Layer):
    """y = x^3 with a custom gradient: right (3x^2) or deliberately broken (2x^2)."""

    def __init__(self, broken: bool, **kwargs):
        super().__init__(**kwargs)
        self.broken = broken

    def call(self, x):
        broken = self.broken

        @tf.custom_gradient
        def cube(v):
            def grad(dy):
                return dy * (2.0 if broken else 3.0) * tf.square(v)
            return v * v * v, grad

        return cube(x)


def _cube_model(broken: bool):
    with gradcheck.float64_policy():
        inputs = keras.Input(shape=(4,))
        h = keras.layers.Dense(5, name="hidden_1", kernel_initializer=keras.initializers.RandomNormal(seed=1))(inputs)
        h = _Cube(broken, name="cube")(h)
        out = keras.layers.Dense(3, name="logits", kernel_initializer=keras.initializers.RandomNormal(seed=2))(h)
        model = keras.Model(inputs, out)
        from gradlab.losses import make_loss

        loss = make_loss("cross_entropy", "mean")
    return model, loss


def test_a_custom_op_with_a_broken_gradient_is_caught():
    x = np.random.default_rng(0).normal(size=(6, 4))
    y = np.array([0, 1, 2, 0, 1, 2])
    good = gradcheck.check_model(*_cube_model(broken=False), x, y)
    assert good.passed, gradcheck.format_result(good)
    bad = gradcheck.check_model(*_cube_model(broken=True), x, y)
    assert not bad.passed
    verdict = {v.name: v.passed for v in bad.variables}
    # only the variables whose gradient flows back through the broken op are wrong
    assert verdict == {"hidden_1/kernel": False, "hidden_1/bias": False, "logits/kernel": True, "logits/bias": True}
    worst = max(v.rel_error for v in bad.variables)
    assert 0.1 < worst < 1.0  # d(x^3) = 3x^2 claimed as 2x^2: off by a third of the true value
    assert "FAILED: 2 of 4 variables" in gradcheck.format_result(bad)


def test_cli_check_exits_non_zero_for_a_broken_loss_gradient(tmp_path, monkeypatch, capsys):
    """The whole `gradlab check` path (config -> model -> loss) with the seed's MSE broken."""
    from gradlab import cli, losses

    right = losses.PER_SAMPLE["mse"]

    def broken_mse(y, logits):
        @tf.custom_gradient
        def scale(z):
            return z, lambda dy: 1.5 * dy  # claims d/dz z = 1.5
        return right(y, scale(logits))

    cfg = tmp_path / "c.yaml"
    cfg.write_text("data: {name: synthetic, samples: 30}\nmodel: {kind: mlp, hidden: [4], activation: sigmoid}\n"
                   "train: {loss: mse}\ndiagnostics: []\n")
    assert cli.main(["check", str(cfg)]) == 0
    monkeypatch.setitem(losses.PER_SAMPLE, "mse", broken_mse)
    capsys.readouterr()
    assert cli.main(["check", str(cfg)]) == 1
    out = capsys.readouterr().out
    assert out.count("FAIL") >= 4 and "FAILED: 4 of 4 variables above tolerance 0.0001" in out


def _shipped_experiments():
    from gradlab.sweep import plan

    for path in sorted((ROOT / "configs").glob("*.yaml")):
        raw, _, _ = load_raw(str(path))
        if isinstance(raw, dict) and raw.get("sweep"):
            for c in plan(str(path), check_plugins=False).combinations:
                yield f"{path.name}[{c.name}]", c.experiment
        else:
            yield path.name, load_config(str(path), check_plugins=False)


def test_check_passes_on_every_shipped_config():
    seen = 0
    for label, exp in _shipped_experiments():
        result = gradcheck.check_config(exp, max_entries=128)
        assert result.passed, f"{label}\n{gradcheck.format_result(result)}"
        seen += 1
    assert seen >= 11  # default.yaml and the 10 runs of sweep_loss_activation.yaml, at least


def test_cli_check_as_a_user(tmp_path):
    proc = gradlab_cli("check", str(ROOT / "configs" / "default.yaml"), "train.loss=mse", "train.reduction=sum")
    assert proc.returncode == 0, proc.stderr
    assert "softmax_linear, loss mse (sum)" in proc.stdout
    for name in ("logits/kernel", "logits/bias"):
        line = next(line for line in proc.stdout.splitlines() if line.startswith(name))
        assert line.rstrip().endswith("ok") and float(line.split()[-2]) < 1e-6
    assert "passed: every variable within tolerance" in proc.stdout
    bad = gradlab_cli("check", str(ROOT / "configs" / "default.yaml"), "--tolerance", "-1")
    assert bad.returncode == 2 and bad.stderr.strip() == "--tolerance (-1) must be a positive number, such as 1e-4"


def test_a_float32_loss_or_model_is_refused_not_checked():
    """A Keras loss created outside float64_policy computes in float32 and would fail a correct
    model with errors ~0.7; a float32 model likewise. Both are refused with one line."""
    import keras

    x = np.random.default_rng(0).normal(size=(6, 4))
    y = np.array([0, 1, 2, 0, 1, 2])
    model, _ = _cube_model(broken=False)
    with pytest.raises(ValueError, match="create it inside `with gradcheck.float64_policy"):
        gradcheck.check_model(model, keras.losses.SparseCategoricalCrossentropy(from_logits=True), x, y)
    with gradcheck.float64_policy():
        loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    assert gradcheck.check_model(model, loss, x, y).passed
    inputs = keras.Input((4,))
    float32_model = keras.Model(inputs, keras.layers.Dense(3, name="logits")(inputs))
    with pytest.raises(ValueError, match=r"needs a float64 model.*logits/kernel \(float32\)"):
        gradcheck.check_model(float32_model, loss, x, y)


def test_the_kink_hint_appears_only_for_models_with_relu_units(tmp_path):
    import subprocess
    import sys

    from conftest import ROOT

    def last_line(config):
        proc = subprocess.run([sys.executable, "-m", "gradlab.cli", "check", config, "--tolerance", "1e-15"],
                              capture_output=True, text=True, cwd=ROOT)
        assert proc.returncode == 1, proc.stderr
        return proc.stdout.strip().splitlines()[-1]

    assert "kink" not in last_line("configs/default.yaml")  # softmax_linear: no relu anywhere
    assert "kink of relu/leaky_relu" in last_line("configs/demo_relu_dead.yaml")
