"""Whole runs: accuracy on iris, the run directory, determinism, device and precision handling."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import yaml

import gradlab
from conftest import ROOT, gradlab_cli, read_metrics, tiny_config
from gradlab.events import read_scalars


def _weights(run_dir, include_optimizer: bool = False) -> list[np.ndarray]:
    """The model's arrays in final.weights.h5 (``layers/...``), in file order."""
    out = []
    with h5py.File(Path(run_dir) / "final.weights.h5", "r") as f:
        f.visititems(lambda name, obj: out.append((name, obj[()])) if isinstance(obj, h5py.Dataset) else None)
    return [a for name, a in sorted(out) if include_optimizer or name.startswith("layers/")]


def test_iris_softmax_linear_cross_entropy_reaches_95_percent(tmp_path):
    cfg = {"name": "iris", "seed": 0,
           "data": {"name": "iris", "batch_size": 16, "standardize": True},
           "model": {"kind": "softmax_linear"},
           "train": {"loss": "cross_entropy", "learning_rate": 0.5, "epochs": 40},
           "diagnostics": []}
    result = gradlab.run(cfg, run_dir=tmp_path / "run", quiet=True)
    assert result.metrics["accuracy"] >= 0.95, result.metrics


def test_run_directory_contents(tmp_path):
    cfg = tiny_config(data={"validation_split": 0.2}, train={"log_every": 1},
                      diagnostics=[{"type": "gradient_stats", "every": 1}])
    result = gradlab.run(cfg, run_dir=tmp_path / "run", quiet=True)
    run = result.run_dir
    assert (run / "config.yaml").exists() and (run / "metrics.json").exists() and (run / "final.weights.h5").exists()
    resolved = yaml.safe_load((run / "config.yaml").read_text())
    assert gradlab.load_config(resolved).to_dict() == resolved
    metrics = read_metrics(run)
    assert metrics == result.metrics
    (tmp_path / "plain").write_text("")  # an ordinary file's mode under this umask
    mode = (tmp_path / "plain").stat().st_mode & 0o777
    assert {(run / f).stat().st_mode & 0o777 for f in ("config.yaml", "metrics.json")} == {mode}
    for key in ("loss", "accuracy", "val_loss", "val_accuracy", "steps", "status"):
        assert key in metrics
    assert metrics["status"] == "completed"
    steps_per_epoch = 48 // 20 + 1  # 48 training rows after a 20% split, batch 20
    assert metrics["steps"] == 2 * steps_per_epoch
    scalars = read_scalars(run)
    assert [s for s, _ in scalars["epoch_loss"]] == [0, 1]
    assert [s for s, _ in scalars["validation/epoch_loss"]] == [0, 1]
    assert [s for s, _ in scalars["step/loss"]] == list(range(metrics["steps"]))
    # the final metrics are those of the saved weights
    x = np.asarray(metrics["loss"])
    assert np.isfinite(x)


def test_same_seed_gives_bit_identical_weights_and_other_seed_does_not(tmp_path):
    cfg = tiny_config(model={"kind": "mlp", "hidden": [8], "activation": "tanh"},
                      data={"shuffle": True}, diagnostics=[{"type": "gradient_stats", "every": 2}])
    a = gradlab.run(cfg, run_dir=tmp_path / "a", quiet=True)
    b = gradlab.run(cfg, run_dir=tmp_path / "b", quiet=True)
    c = gradlab.run({**cfg, "seed": 1}, run_dir=tmp_path / "c", quiet=True)
    wa, wb, wc = (_weights(r.run_dir, include_optimizer=True) for r in (a, b, c))
    assert len(_weights(a.run_dir)) == 4  # 2 kernels + 2 biases, plus the optimizer state
    for x, y in zip(wa, wb):
        np.testing.assert_array_equal(x, y)
    assert any(not np.array_equal(x, z) for x, z in zip(wa, wc))


def test_never_overwrites_an_existing_run(tmp_path, write_yaml):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.json").write_text('{"precious": true}')
    cfg = write_yaml(yaml.safe_dump(tiny_config()))
    proc = gradlab_cli("run", str(cfg), "--run-dir", str(run), cwd=tmp_path)
    assert proc.returncode == 2 and "already exists" in proc.stderr and "Traceback" not in proc.stderr
    assert (run / "metrics.json").read_text() == '{"precious": true}'


def test_default_run_dir_is_log_dir_name_timestamp(tmp_path):
    cfg = tiny_config(log_dir=str(tmp_path / "logs"), name="named")
    first = gradlab.run(cfg, quiet=True).run_dir
    second = gradlab.run(cfg, quiet=True).run_dir
    assert first.parent == tmp_path / "logs" and first.name.startswith("named-")
    assert first != second and (first / "metrics.json").exists() and (second / "metrics.json").exists()


def test_gpu_without_gpu_is_a_clear_error(tmp_path, write_yaml):
    cfg = write_yaml(yaml.safe_dump(tiny_config(train={"device": "gpu"})))
    proc = gradlab_cli("run", str(cfg), cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().startswith("train.device: 'gpu' was requested but TensorFlow sees no GPU")
    assert not (tmp_path / "runs").exists()


def test_bad_data_is_one_line_and_no_run_dir(tmp_path, write_yaml):
    data = tmp_path / "d.csv"
    data.write_text("1,2,0\n3,4,1\n5,6,9\n")
    cfg = tiny_config()
    cfg["data"] = {"name": "csv", "path": str(data), "classes": 3, "shuffle": False, "batch_size": 2}
    cfg = write_yaml(yaml.safe_dump(cfg))
    proc = gradlab_cli("run", str(cfg), cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"{data}:3: label 9 is outside [0, 3) (data.classes)"
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("precision", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision_step(tmp_path, precision):
    """Variables stay float32, gradients reach the taps unscaled, and training still works."""
    import keras

    base = tiny_config(data={"samples": 60, "batch_size": 60}, train={"epochs": 1},
                       diagnostics=[{"type": "gradient_stats", "every": 1}])
    ref = gradlab.run(base, run_dir=tmp_path / "f32", quiet=True)
    mixed = gradlab.run({**base, "train": {**base["train"], "precision": precision}},
                        run_dir=tmp_path / "mixed", quiet=True)
    assert keras.config.dtype_policy().name == "float32"  # the global policy is restored
    a = read_scalars(ref.run_dir)["gradients/logits/kernel/norm"][0]
    b = read_scalars(mixed.run_dir)["gradients/logits/kernel/norm"][0]
    assert a[0] == b[0] == 0
    # float16 has ~3 decimal digits; a loss-scaled gradient would be off by 2**15
    assert b[1] == pytest.approx(a[1], rel=2e-2)
    assert all(w.dtype == np.float32 for w in _weights(mixed.run_dir))


def test_mixed_float16_uses_loss_scaling(tmp_path):
    from gradlab.config import from_dict
    from gradlab.data import make_data
    from gradlab.experiment import build
    import keras

    exp = from_dict(tiny_config(train={"precision": "mixed_float16"}))
    keras.config.set_dtype_policy("mixed_float16")
    try:
        model = build(exp, make_data(exp.data), "cpu")
    finally:
        keras.config.set_dtype_policy("float32")
    assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    assert all(v.dtype == "float32" for v in model.trainable_variables)


def test_jit_compile_and_steps_per_execution(tmp_path):
    cfg = tiny_config(train={"jit_compile": True, "steps_per_execution": 3, "epochs": 2},
                      diagnostics=[{"type": "gradient_stats", "every": 3}])
    result = gradlab.run(cfg, run_dir=tmp_path / "run", quiet=True)
    assert result.metrics["steps"] == 6
    scalars = read_scalars(result.run_dir)
    # due steps 0 and 3 (the first step of each execution); the window of the steps after the
    # last due step is written when training ends, at the last step
    assert [s for s, _ in scalars["gradients/global_norm"]] == [0, 3]
    assert [s for s, _ in scalars["gradients/global_norm/window_max"]] == [0, 3, 5]


def test_python_api_validates_like_the_cli():
    with pytest.raises(gradlab.ConfigError) as err:
        gradlab.load_config({"train": {"loss": "xent"}})
    assert "train.loss" in str(err.value)
    with pytest.raises(gradlab.ConfigError):
        gradlab.run({"model": {"kind": "mlp"}})


def test_make_run_style_cli_prints_log_location_and_tensorboard_command(tmp_path, write_yaml):
    cfg = write_yaml(yaml.safe_dump(tiny_config()))
    proc = gradlab_cli("run", str(cfg), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    run_dirs = list((tmp_path / "runs").iterdir())
    assert len(run_dirs) == 1
    assert "run directory: runs/" in proc.stdout
    assert f"tensorboard --logdir runs/{run_dirs[0].name}" in proc.stdout


def test_a_step_metrics_entry_replaces_the_built_in_one(tmp_path):
    # train.log_every's step_metrics is always there; listing one in diagnostics must not log twice.
    result = gradlab.run(tiny_config(diagnostics=[{"type": "step_metrics", "every": 2}]), run_dir=tmp_path / "r",
                         quiet=True)
    steps = [s for s, _ in read_scalars(result.run_dir)["step/loss"]]
    assert steps == sorted(set(steps)) and steps[:2] == [0, 2]


def test_metrics_of_a_diverged_run_are_strict_json(tmp_path):
    import json

    cfg = tiny_config(train={"learning_rate": 1e38, "epochs": 4}, diagnostics=[{"type": "nonfinite", "action": "warn"}])
    result = gradlab.run(cfg, run_dir=tmp_path / "r", quiet=True)
    assert not np.isfinite(result.metrics["loss"]), "the run was meant to diverge"

    def no_constants(name):
        raise ValueError(f"{name} is not JSON")

    for name in ("metrics.json", "state.json"):
        data = json.loads((result.run_dir / name).read_text(), parse_constant=no_constants)
        assert data["status"] == "completed"
    assert json.loads((result.run_dir / "metrics.json").read_text())["loss"] is None


@pytest.mark.parametrize("device,logical_gpus,message", [
    ("cpu", ["GPU:0"], "train.device: 'cpu' means cpu here, but TensorFlow has already started in this process with "
                       "a GPU visible; run in a new process"),
    ("gpu", [], "train.device: 'gpu' means gpu here, but TensorFlow has already started in this process with no "
                "GPU visible; run in a new process"),
    ("auto", [], "train.device: 'auto' means gpu here"),
])
def test_a_device_tensorflow_can_no_longer_switch_to_is_refused_not_misreported(monkeypatch, device, logical_gpus,
                                                                               message):
    """A second run in one process (a notebook) cannot change the visible GPUs: it must not train
    on a GPU while reporting the CPU, or the reverse. (Simulated: this machine has no GPU.)"""
    import tensorflow as tf

    from gradlab.errors import DeviceError
    from gradlab.experiment import configure_device

    def started(devices, kind=None):
        raise RuntimeError("Visible devices cannot be modified after being initialized")

    real_logical = tf.config.list_logical_devices
    monkeypatch.setattr(tf.config, "list_physical_devices",
                        lambda kind=None: ["GPU:0"] if kind == "GPU" else real_logical(kind))
    monkeypatch.setattr(tf.config, "set_visible_devices", started)
    monkeypatch.setattr(tf.config, "list_logical_devices",
                        lambda kind=None: logical_gpus if kind == "GPU" else real_logical(kind))
    train = gradlab.load_config(ROOT / "configs" / "default.yaml", [f"train.device={device}"]).train
    with pytest.raises(DeviceError) as err:
        configure_device(train)
    assert str(err.value).startswith(message)
    # the same device as the started process: fine
    monkeypatch.setattr(tf.config, "list_logical_devices",
                        lambda kind=None: (["GPU:0"] if device != "cpu" else []) if kind == "GPU" else real_logical(kind))
    monkeypatch.setattr(tf.config.experimental, "set_memory_growth", lambda gpu, on: None)
    assert configure_device(train) == ("cpu" if device == "cpu" else "gpu")
