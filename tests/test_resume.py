"""Exact resume: SIGKILL a run at two different points, resume it, compare with an uninterrupted run.

The runs are subprocesses of the real CLI. A tiny user callback (``slowdown:Sleep``, written to
``tmp_path``) sleeps a few milliseconds per step so the kills land mid-training; it does not
touch the numbers. Checkpoints every 7 steps with 20 steps per epoch, so the kills resume
mid-epoch, where the data position, metric state and tap windows all matter.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from gradlab.events import read_scalars

GRADLAB = [sys.executable, "-m", "gradlab.cli"]
SLEEP = '''
import time, keras
class Sleep(keras.callbacks.Callback):
    def __init__(self, seconds=0.01):
        super().__init__(); self.seconds = seconds
    def on_train_batch_end(self, batch, logs=None):
        time.sleep(self.seconds)
'''


def _config(tmp_path: Path, **train) -> Path:
    (tmp_path / "slowdown.py").write_text(SLEEP)
    cfg = {
        "name": "resume", "seed": 3,
        "data": {"name": "synthetic", "samples": 200, "batch_size": 8, "validation_split": 0.2, "standardize": True},
        "model": {"kind": "mlp", "hidden": [16], "activation": "tanh"},
        "train": {"epochs": 6, "optimizer": "adam", "learning_rate": 0.01, "checkpoint_every": 7,
                  "keep_checkpoints": 2, **train},
        "diagnostics": [{"type": "gradient_stats", "every": 5}],
        "callbacks": [{"class": "slowdown:Sleep", "args": {"seconds": 0.015}}],
    }
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _env(tmp_path: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(tmp_path) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               TF_CPP_MIN_LOG_LEVEL="3")
    return env


def _ckpt_steps(run: Path) -> list[int]:
    d = run / "checkpoints"
    return sorted(int(p.name[5:-6]) for p in d.glob("ckpt-*.index")) if d.exists() else []


def _run_and_kill(cmd: list[str], run: Path, env: dict, after_step: int, timeout: float = 90) -> int:
    """Start ``cmd``; SIGKILL it once a checkpoint at step >= ``after_step`` is on disk."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    t0 = time.time()
    try:
        while time.time() - t0 < timeout:
            steps = _ckpt_steps(run)
            if steps and steps[-1] >= after_step:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                return steps[-1]
            if proc.poll() is not None:
                pytest.fail(f"run ended before it could be killed: {proc.stderr.read().decode()[-2000:]}")
            time.sleep(0.01)
        pytest.fail("timed out waiting for a checkpoint")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _weights(run: Path) -> list[np.ndarray]:
    import h5py

    out = []
    with h5py.File(run / "final.weights.h5") as f:
        f.visititems(lambda name, obj: out.append((name, obj[()])) if hasattr(obj, "shape") else None)
    return out


def test_sigkill_twice_then_resume_is_bit_identical(tmp_path, monkeypatch):
    import gradlab

    cfg = _config(tmp_path)
    env = _env(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    ref, run = tmp_path / "ref", tmp_path / "run"

    # kill 1: mid-epoch 2 (21 steps per epoch); kill 2, in the resumed process, in epoch 4 or later
    first = _run_and_kill(GRADLAB + ["run", str(cfg), "--run-dir", str(run), "--quiet"], run, env, after_step=28)
    state = json.loads((run / "state.json").read_text())
    assert state["status"] == "running"  # SIGKILL leaves no chance to write anything else
    second = _run_and_kill(GRADLAB + ["run", "--resume", str(run), "--quiet"], run, env, after_step=first + 35)
    assert second > first
    # the uninterrupted reference and the final resume run in this process (saves two TF start-ups)
    gradlab.run(str(cfg), run_dir=ref, quiet=True, verbose=0)
    result = gradlab.run(resume=run, quiet=True, verbose=0)
    # The kill can land after ckpt-<second>'s files exist but before the manager records it as the
    # latest; then the previous checkpoint is the one to resume. Either way the second process's
    # committed progress is kept.
    assert first < result.metrics["resumed_from_step"] <= second

    m_ref = json.loads((ref / "metrics.json").read_text())
    m_run = json.loads((run / "metrics.json").read_text())
    assert m_run["status"] == "completed" and m_run["steps"] == m_ref["steps"] == 6 * 21
    assert m_run["weights_sha256"] == m_ref["weights_sha256"]
    for (n1, w1), (n2, w2) in zip(_weights(ref), _weights(run)):
        assert n1 == n2
        np.testing.assert_array_equal(w1, w2)
    assert m_run["loss"] == m_ref["loss"] and m_run["val_loss"] == m_ref["val_loss"]

    # TensorBoard: every step exactly once, same values as the uninterrupted run
    s_ref, s_run = read_scalars(ref), read_scalars(run)
    assert set(s_ref) == set(s_run)
    for tag in s_ref:
        steps_ref = [s for s, _ in s_ref[tag]]
        steps_run = [s for s, _ in s_run[tag]]
        assert steps_run == steps_ref, tag
        assert len(set(steps_run)) == len(steps_run), f"{tag}: duplicate steps"
        np.testing.assert_allclose([v for _, v in s_run[tag]], [v for _, v in s_ref[tag]], rtol=0, atol=0,
                                   err_msg=tag)
    assert [s for s, _ in s_ref["epoch_loss"]] == list(range(6))


def test_tap_windows_from_other_diagnostics_are_not_restored_and_training_goes_on(tmp_path, caplog):
    """A checkpoint saved with other taps (or by an earlier gradlab) restores everything else;
    the windows start empty, with a warning, instead of failing the resume."""
    import keras

    from gradlab.losses import make_loss
    from gradlab.resume import Checkpointer
    from gradlab.train_step import GradlabModel, Tap

    def model_with(taps):
        keras.utils.set_random_seed(0)
        inputs = keras.Input((3,))
        model = GradlabModel(inputs, keras.layers.Dense(2, name="head")(inputs))
        model.compile(optimizer=keras.optimizers.SGD(0.1), loss=make_loss("cross_entropy", "mean"))
        for name, outputs in taps.items():
            model.register_tap(name, Tap(every_step=lambda inp, outputs=outputs: {o: inp.loss for o in outputs}))
        return model

    x = np.random.default_rng(0).normal(size=(4, 3)).astype(np.float32)
    y = np.array([0, 1, 0, 1])
    saved = model_with({"a": ["l1", "l2", "l3"]})
    saved.fit(x, y, batch_size=2, epochs=1, verbose=0)
    path = Checkpointer(saved, tmp_path / "ckpt", keep=1).save(step=2, batches_per_epoch=2)

    other = model_with({"b": ["l1"]})
    ckpt = Checkpointer(other, tmp_path / "ckpt", keep=1)
    ckpt.restore(path)
    with caplog.at_level("WARNING", logger="gradlab.resume"):
        ckpt.restore_taps(path)
    assert "windows were not restored" in caplog.text
    for a, b in zip(saved.trainable_variables, other.trainable_variables):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    assert other.read_tap("b")["count"] == 0
    other.fit(x, y, batch_size=2, epochs=1, verbose=0)
    assert other.read_tap("b")["count"] == 2 and int(other.optimizer.iterations.numpy()) == 4


def test_resume_with_steps_per_execution_is_exact(tmp_path, monkeypatch):
    """Executions of 3 steps (21 batches per epoch), schedules that are multiples of 3, a
    checkpoint every 7 steps (taken at execution ends): killed once and resumed, the run has the
    uninterrupted run's weights and every tag at the same steps with the same values."""
    import gradlab

    (tmp_path / "slowdown.py").write_text(SLEEP)
    cfg = yaml.safe_load(_config(tmp_path).read_text())
    cfg["train"].update(steps_per_execution=3, log_every=3)
    cfg["diagnostics"] = [{"type": "gradient_stats", "every": 6}, {"type": "activation_saturation", "every": 9},
                          {"type": "nonfinite"}, {"type": "health"}]
    cfg["callbacks"][0]["args"]["seconds"] = 0.02
    path = tmp_path / "spe.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = _env(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    ref, run = tmp_path / "ref", tmp_path / "run"
    _run_and_kill(GRADLAB + ["run", str(path), "--run-dir", str(run), "--quiet"], run, env, after_step=28)
    gradlab.run(str(path), run_dir=ref, quiet=True, verbose=0)
    result = gradlab.run(resume=run, quiet=True, verbose=0)
    assert result.metrics["resumed_from_step"] >= 28
    m_ref, m_run = (json.loads((d / "metrics.json").read_text()) for d in (ref, run))
    assert m_run["weights_sha256"] == m_ref["weights_sha256"]
    s_ref, s_run = read_scalars(ref), read_scalars(run)
    assert set(s_ref) == set(s_run)
    for tag in s_ref:
        assert [s for s, _ in s_run[tag]] == [s for s, _ in s_ref[tag]], tag
        np.testing.assert_allclose([v for _, v in s_run[tag]], [v for _, v in s_ref[tag]], rtol=1e-6, err_msg=tag)
