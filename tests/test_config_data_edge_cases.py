"""Edge cases of the path YAML config -> data -> model -> loss -> training -> run directory.

Each test runs the CLI as a user would and states the contract it checks: bad input is ONE
line naming the key (or the file and row), exit status 2, no traceback, and no run directory
left behind; a config that ``gradlab validate`` accepts must run.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import gradlab_cli, tiny_config


def _write_cfg(tmp_path: Path, cfg: dict, name: str = "exp.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def _lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.strip()]


def _assert_bad_input(proc, log_dir: Path, *needles: str) -> None:
    """The contract for bad input: exit 2, one line that names the problem, no run directory."""
    lines = _lines(proc.stderr)
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert "internal error" not in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert len(lines) == 1, proc.stderr
    for needle in needles:
        assert needle in lines[0], proc.stderr
    assert not log_dir.exists() or not any(log_dir.iterdir()), sorted(p.name for p in log_dir.iterdir())


# --- config: values `gradlab validate` accepts but `gradlab run` crashes on ---------------------

def test_bias_initializer_null_is_accepted_by_validate_and_then_runs(tmp_path):
    # validate says "ok"; run said "gradlab: internal error: TypeError: 'NoneType' object is not
    # subscriptable" (exit 1) and left a run directory with status "failed".
    log_dir = tmp_path / "runs"
    cfg = _write_cfg(tmp_path, tiny_config(model={"kind": "softmax_linear", "bias_initializer": None},
                                           log_dir=str(log_dir)))
    assert gradlab_cli("validate", str(cfg)).returncode == 0
    proc = gradlab_cli("run", "--quiet", str(cfg))
    assert proc.returncode == 0, proc.stderr


def test_constant_initializer_without_value_is_accepted_by_validate_and_then_runs(tmp_path):
    # `kernel_initializer: constant` passes validation; run said "gradlab: internal error:
    # KeyError: 'value'" (exit 1) and left a failed run directory.
    log_dir = tmp_path / "runs"
    cfg = _write_cfg(tmp_path, tiny_config(model={"kind": "softmax_linear", "kernel_initializer": "constant"},
                                           log_dir=str(log_dir)))
    assert gradlab_cli("validate", str(cfg)).returncode == 0
    proc = gradlab_cli("run", "--quiet", str(cfg))
    assert proc.returncode == 0, proc.stderr


def test_initializer_argument_in_exponent_notation_is_a_number(tmp_path, write_yaml):
    # PyYAML (YAML 1.1) reads 1e-3 as a string; gradlab's YamlLoader reads it as a number, so an
    # initializer's stddev: 1e-3 is accepted like train.learning_rate: 1e-3.
    cfg = write_yaml("data: {name: synthetic}\n"
                     "model: {kernel_initializer: {name: random_normal, stddev: 1e-3}}\n"
                     "train: {learning_rate: 1e-3}\n")
    proc = gradlab_cli("validate", str(cfg))
    assert proc.returncode == 0, proc.stderr


def test_synthetic_data_too_large_for_memory_is_refused_by_validate(tmp_path, write_yaml):
    # 1e8 x 1e8 values: validate said ok and the run died of MemoryError as an "internal error"
    cfg = write_yaml("data: {name: synthetic, samples: 100000000, features: 100000000}\n")
    proc = gradlab_cli("validate", str(cfg))
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert ":1: data.samples: synthetic data is generated in memory: samples x features = 100000000 x 100000000" in lines[0]
    assert gradlab_cli("validate", str(write_yaml("data: {name: synthetic, samples: 100000, features: 2000}\n"))
                       ).returncode == 0


# --- config: overrides and error lines -----------------------------------------------------------

def test_override_with_comma_and_broken_yaml_is_one_config_line(tmp_path, write_yaml):
    # `model.hidden=[64,64` (a missing bracket) gave "gradlab: internal error: ParserError: while
    # parsing a flow sequence" with exit status 1.
    cfg = write_yaml("data: {name: synthetic}\nmodel: {kind: mlp, hidden: [8]}\n")
    proc = gradlab_cli("validate", str(cfg), "model.hidden=[64,64")
    assert proc.returncode == 2, proc.stderr
    assert "internal error" not in proc.stderr
    assert _lines(proc.stderr)[0].startswith("command line: model.hidden:"), proc.stderr


def test_one_bad_choice_is_one_line_not_a_cascade_of_wrong_ones(tmp_path, write_yaml):
    # `data: {name: CSV, path: a.csv}` gave two lines; the second is false:
    # "data.path: only used when data.name is npz or csv or tfrecord (here data.name is iris); remove it"
    cfg = write_yaml("data: {name: CSV, path: a.csv}\n")
    proc = gradlab_cli("validate", str(cfg))
    assert proc.returncode == 2
    lines = _lines(proc.stderr)
    assert ": data.name: 'CSV' is not one of" in lines[0], proc.stderr
    assert len(lines) == 1, proc.stderr


# --- data files ----------------------------------------------------------------------------------

def _rows(n: int = 30, classes: int = 3) -> list[str]:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, 2))
    return [f"{a:.4f},{b:.4f},{i % classes}" for i, (a, b) in enumerate(x)]


def _data_cfg(tmp_path: Path, name: str, path: Path, **data) -> tuple[Path, Path]:
    log_dir = tmp_path / "runs"
    cfg = tiny_config(data={"name": name, "path": str(path), "batch_size": 8, **data}, log_dir=str(log_dir))
    for key in ("samples",):
        cfg["data"].pop(key, None)
    cfg["train"]["epochs"] = 1
    return _write_cfg(tmp_path, cfg), log_dir


def _csv_bytes(row_3=None, row_1=None, newline="\n") -> bytes:
    rows = _rows()
    if row_3 is not None:
        rows[3] = row_3
    if row_1 is not None:
        rows[1] = row_1
    return (newline.join(["x1,x2,label", *rows]) + newline).encode("utf-8")


@pytest.mark.parametrize("content, where, needle", [
    # Python's float() reads "1.0\xa0" (a spreadsheet's trailing NBSP); TensorFlow's decode_csv then
    # failed during training: "gradlab: internal error: InvalidArgumentError" (exit 1), run dir left.
    (_csv_bytes(row_3="1.0\u00a0,2.0,1"), ":5", "is not a number"),
    # Old-Mac "\r" line endings: Python's csv module read the rows, tf.data saw one line:
    # "internal error: FailedPreconditionError" (exit 1).
    (_csv_bytes(newline="\r"), ":1", "lone carriage return"),
    # '"1.0\n",2.0,1' is one row for Python's csv module but two lines for tf.data.
    (_csv_bytes(row_3='"1.0\n",2.0,1'), ":5", "spans several lines"),
    # A label 1e20 was reported as "label -9223372036854775808 is outside [0, inf)", after a
    # numpy RuntimeWarning and its source line on stderr.
    (_csv_bytes(row_1="1.0,2.0,1e20"), ":3", "label 1e+20 is outside"),
], ids=["non_breaking_space", "cr_line_endings", "multiline_cell", "huge_label"])
def test_a_csv_the_training_pipeline_would_misread_is_refused_before_the_run(tmp_path, content, where, needle):
    data = tmp_path / "bad.csv"
    data.write_bytes(content)
    cfg, log_dir = _data_cfg(tmp_path, "csv", data)
    proc = gradlab_cli("run", "--quiet", str(cfg))
    _assert_bad_input(proc, log_dir, f"{data}{where}", needle)


def test_complex_npz_features_are_an_error(tmp_path):
    # README (Datasets): "complex numbers ... are errors too". A complex-valued npz trained with
    # exit status 0 (the imaginary parts silently dropped by astype(float32)).
    rng = np.random.default_rng(0)
    data = tmp_path / "complex.npz"
    np.savez(data, x=rng.normal(size=(30, 3)).astype(complex) * (1 + 1j), y=np.arange(30) % 3)
    cfg, log_dir = _data_cfg(tmp_path, "npz", data)
    proc = gradlab_cli("run", "--quiet", str(cfg))
    _assert_bad_input(proc, log_dir, str(data))


def test_streamed_file_run_prints_no_ran_out_of_data_warning(tmp_path):
    # Every csv/npz/tfrecord run ends with Keras's "UserWarning: Your input ran out of data;
    # interrupting training..." on stderr (from the final model.evaluate in
    # experiment._final_metrics), although training ran every step.
    data = tmp_path / "ok.csv"
    data.write_text("x1,x2,label\n" + "\n".join(_rows()) + "\n")
    cfg, log_dir = _data_cfg(tmp_path, "csv", data)
    proc = gradlab_cli("run", "--quiet", str(cfg))
    assert proc.returncode == 0, proc.stderr
    assert "ran out of data" not in proc.stderr, proc.stderr


# --- metrics.json ---------------------------------------------------------------------------------

def test_epochs_completed_after_a_nonfinite_stop_in_the_first_epoch(tmp_path):
    # Stopped by NaN at step 2 of a 3-batch epoch, metrics.json said "epochs_completed": 1.
    log_dir = tmp_path / "runs"
    cfg = tiny_config(data={"cluster_std": 1000.0}, log_dir=str(log_dir),
                      train={"learning_rate": 1e38, "reduction": "sum", "epochs": 2},
                      diagnostics=[{"type": "nonfinite", "action": "stop"}])
    path = _write_cfg(tmp_path, cfg)
    proc = gradlab_cli("run", "--quiet", str(path))
    assert proc.returncode == 3, proc.stderr
    (run_dir,) = list(log_dir.iterdir())
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "stopped"
    per_epoch = 3  # 60 samples, batch 20
    assert metrics["steps"] < per_epoch
    assert metrics["epochs_completed"] == metrics["steps"] // per_epoch, metrics


def test_top_level_values_are_shown_as_yaml_spells_them(tmp_path, write_yaml):
    # seed: true was reported as "got True", name: null as "None must be ..."
    cfg = write_yaml("seed: true\nname: null\nlog_dir: 5\n")
    proc = gradlab_cli("validate", str(cfg))
    assert proc.returncode == 2
    text = proc.stderr
    assert "seed: expected an integer in [0, 2**31), got boolean true" in text
    assert "name: null must be" in text and "log_dir: expected a non-empty directory path, got integer 5" in text
    assert "True" not in text and "None" not in text


@pytest.mark.parametrize("text, line, key", [
    ("name: x\n\n1: a\n", 3, "1"),
    ("name: x\ntrue: 3\n", 2, "true"),
    ("name: x\n~: 3\n", 2, "null"),
    ("name: x\ndata:\n  name: iris\n  2.5: x\n", 4, "data.2.5"),
])
def test_a_key_yaml_reads_as_a_number_or_boolean_is_reported_at_its_line(write_yaml, text, line, key):
    # `1: a` at the top level was reported without a line ("exp.yaml: 1: unknown key"): the line
    # table was keyed by the key's text '1', the parsed data by the integer 1. `true` was shown as
    # Python's True.
    from gradlab.config import ConfigError, load_config

    cfg = write_yaml(text)
    with pytest.raises(ConfigError) as err:
        load_config(cfg, check_plugins=False)
    assert [(p[1], p[2]) for p in err.value.problems] == [(line, key)], err.value.problems
