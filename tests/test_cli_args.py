"""Command-line parsing: options and key.path=value arguments mix in any order; bad arguments are
one line naming the subcommand, exit status 2."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import ROOT
from gradlab.cli import _parser, main


@pytest.mark.parametrize("argv,key,expected", [
    (["check", "c.yaml", "--batch", "4", "train.reduction=sum"], "overrides", ["train.reduction=sum"]),
    (["sweep", "c.yaml", "--sweep-dir", "X", "train.epochs=1", "--jobs", "2", "train.loss=mse,cross_entropy"],
     "axes", ["train.epochs=1", "train.loss=mse,cross_entropy"]),
    (["run", "c.yaml", "--run-dir", "R", "train.epochs=1", "--quiet", "train.loss=mse"], "overrides",
     ["train.epochs=1", "train.loss=mse"]),
])
def test_options_before_overrides_leave_every_override(argv, key, expected):
    args = _parser().parse_args(argv)
    assert args.config == "c.yaml" and getattr(args, key) == expected


def test_options_anywhere_are_read_with_every_positional():
    args = _parser().parse_args(["sweep", "--jobs", "2", "c.yaml", "--quiet", "a.b=1,2", "--sweep-dir", "X", "c.d=3"])
    assert (args.config, args.jobs, args.sweep_dir, args.quiet, args.axes) == ("c.yaml", 2, "X", True,
                                                                              ["a.b=1,2", "c.d=3"])
    args = _parser().parse_args(["run", "--resume", "R"])
    assert (args.resume, args.config, args.overrides) == ("R", None, [])


@pytest.mark.parametrize("argv,needle", [
    (["check", "c.yaml", "--bogus", "train.reduction=sum"], "gradlab check: error: unrecognized arguments: --bogus"),
    (["sweep", "c.yaml", "--jobs", "x", "train.epochs=1"], "gradlab sweep: error: argument --jobs: invalid int"),
    (["report", "a", "b"], "gradlab report: error: unrecognized arguments: b"),
])
def test_a_bad_argument_is_one_line_naming_the_subcommand(argv, needle, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(needle), lines


def test_check_with_an_option_before_an_override_applies_the_override(capsys):
    assert main(["check", str(ROOT / "configs" / "default.yaml"), "--batch", "4", "train.reduction=sum"]) == 0
    out = capsys.readouterr().out
    assert "loss cross_entropy (sum)" in out and "on a batch of 4" in out


def test_the_command_imports_almost_nothing_before_it_handles_ctrl_c():
    """Until ``main`` runs, Ctrl-C prints Python's traceback: so importing ``gradlab.cli`` (and the
    package) must stay cheap -- no config, YAML or TensorFlow imports (they took ~60 ms)."""
    code = ("import sys, gradlab.cli; print(sorted(m for m in sys.modules if m.startswith(('gradlab', 'yaml', "
            "'tensorflow', 'keras', 'numpy'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "['gradlab', 'gradlab.cli']"


def test_submodules_are_attributes_of_the_lazy_package():
    code = "import gradlab; print(gradlab.config.__name__, gradlab.load_config.__module__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.split() == ["gradlab.config", "gradlab.config"]


def test_tensorflow_load_time_log_lines_follow_tf_cpp_min_log_level():
    """TensorFlow 2.21 prints these while loading, whatever TF_CPP_MIN_LOG_LEVEL says (seen on an
    AVX-512 CPU, the notice once glued to the next line); the CLI applies the level itself."""
    from gradlab.cli import _ABSL_NOTICE, _shown_at_log_level

    info = ("I0000 00:00:1795811987.543711    6103 port.cc:153] oneDNN custom operations are on. You may see "
            "slightly different numerical results due to floating-point round-off errors.")
    warning = "W1127 20:31:02.123456    6103 cpu_feature_guard.cc:227] something to know"
    error = "E0000 00:00:1795811989.102552    6103 cuda_dnn.cc:8] Unable to register cuDNN factory"
    other = ["a Python warning printed meanwhile", "", "I0000 is not a log line without its source location"]
    lines = [_ABSL_NOTICE, info, _ABSL_NOTICE + info, warning, error, *other]
    assert _shown_at_log_level(lines, 0) == lines
    assert _shown_at_log_level(lines, 1) == [warning, error, *other]
    assert _shown_at_log_level(lines, 2) == [error, *other]
    assert _shown_at_log_level(lines, 3) == other


def test_a_user_error_is_one_line_whatever_tensorflow_prints_while_loading(tmp_path):
    """End to end, as a user runs it: `gradlab validate` loads TensorFlow (every command but
    `schema` does) and a bad override is still one line."""
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    proc = subprocess.run([sys.executable, "-m", "gradlab.cli", "validate", str(ROOT / "configs" / "default.yaml"),
                           "train.steps_per_execution=4", "diagnostics=[{type: gradient_stats, every: 6}]"],
                          capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("command line: diagnostics.0.every: 6"), proc.stderr
