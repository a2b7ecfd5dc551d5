"""train.steps_per_execution > 1 in gradlab runs: an execution must fit the epoch, and every
schedule must be a multiple of it (callbacks run between executions); unset defaults are
rounded up. Checked through the CLI (one line, exit 2, no run directory) and by reading the
event files of a run back."""

from __future__ import annotations

import pytest
import yaml

import gradlab
from conftest import gradlab_cli, read_metrics, tiny_config
from gradlab.events import read_scalars


@pytest.mark.parametrize("overrides, key, wanted", [
    (["train.steps_per_execution=4", "train.log_every=10"], "train.log_every", "use 8 or 12"),
    (["train.steps_per_execution=4", "diagnostics=[{type: gradient_stats, every: 6}]"], "diagnostics.0.every",
     "use 4 or 8"),
    (["train.steps_per_execution=8", "diagnostics=[{type: curvature, every: 5}]"], "diagnostics.0.every", "use 8"),
    (["train.jit_compile=true", "train.distribute=mirrored", "train.cpu_devices=2"], "train.jit_compile",
     "XLA cannot compile gradlab's step under train.distribute: mirrored"),
    (["model.kernel_initializer={name: constant, value: 1.0e+39}"], "model.kernel_initializer.value",
     "beyond float32's range"),
])
def test_validate_refuses_with_one_line(overrides, key, wanted):
    proc = gradlab_cli("validate", "configs/default.yaml", *overrides, cwd=gradlab.config.Path(__file__).parents[1])
    assert proc.returncode == 2, proc.stdout
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and f"{key}:" in lines[0] and wanted in lines[0], proc.stderr


def test_schedules_that_fit_and_options_that_are_not_schedules_pass():
    exp = gradlab.load_config({"train": {"steps_per_execution": 4, "log_every": 8}, "diagnostics": [
        {"type": "gradient_stats", "every": 8}, {"type": "nonfinite", "every": 1}, {"type": "health", "every": 3}]})
    assert exp.train.steps_per_execution == 4


def test_an_execution_that_does_not_fit_the_epoch_is_refused_before_the_run_exists(tmp_path):
    # 60 samples / batch 20 = 3 batches per epoch; Keras would run whole executions of 2 past it
    cfg = tmp_path / "exp.yaml"
    cfg.write_text(yaml.safe_dump(tiny_config(train={"steps_per_execution": 2})))
    proc = gradlab_cli("run", str(cfg), "--run-dir", str(tmp_path / "run"))
    assert proc.returncode == 2
    assert "train.steps_per_execution: 2 does not divide the 3 batches of an epoch" in proc.stderr
    assert "use 1, 3, or change data.batch_size" in proc.stderr  # the divisors nearest 2, either side
    assert len(proc.stderr.strip().splitlines()) == 1 and not (tmp_path / "run").exists()


def test_defaults_are_rounded_up_and_every_due_step_is_written(tmp_path):
    # 120 samples / batch 10 = 12 batches per epoch, 3 epochs = 36 steps in executions of 4.
    # Default diagnostics (gradient_stats every 10 -> 12) and log_every 10 -> 12.
    cfg = tiny_config(data={"samples": 120, "batch_size": 10}, train={"epochs": 3, "steps_per_execution": 4})
    del cfg["diagnostics"]
    run = gradlab.run(cfg, run_dir=tmp_path / "spe4", quiet=True)
    base_cfg = dict(cfg, train={**cfg["train"], "steps_per_execution": 1, "log_every": 12},
                    diagnostics=[{"type": "gradient_stats", "every": 12}])
    base = gradlab.run(base_cfg, run_dir=tmp_path / "spe1", quiet=True)
    assert run.metrics["steps"] == base.metrics["steps"] == 36
    assert read_metrics(run.run_dir)["weights_sha256"] == read_metrics(base.run_dir)["weights_sha256"]
    scalars, ref = read_scalars(run.run_dir), read_scalars(base.run_dir)
    # every due step 0, 12, 24 (the first step of an execution); the window after the last due
    # step is written at the last step
    assert [s for s, _ in scalars["gradients/global_norm"]] == [0, 12, 24]
    for tag in ("gradients/global_norm/window_max", "step/loss"):
        assert [s for s, _ in scalars[tag]] == [0, 12, 24, 35], tag
    # Keras's running metrics: at the last step of each execution with a due step, and at the end
    assert [s for s, _ in ref["step/accuracy"]] == [0, 12, 24, 35]
    assert [s for s, _ in scalars["step/accuracy"]] == [3, 15, 27, 35]
    # the same values as the run with one step per execution and the same schedule
    for tag in ("gradients/global_norm", "gradients/global_norm/window_max", "step/loss"):
        assert [s for s, _ in ref[tag]] == [s for s, _ in scalars[tag]], tag
        for (_, a), (_, b) in zip(scalars[tag], ref[tag]):
            assert a == pytest.approx(b, rel=1e-5), tag
