"""gradlab sweep: grid expansion, up-front validation, a real 4-run sweep with failures, HParams data."""

from __future__ import annotations

import json
import math

import pytest

from compare_helpers import BAD, GOOD, shared_sweep
from conftest import ROOT, gradlab_cli
from gradlab.errors import ConfigError, GradlabError
from gradlab.sweep import format_table, parse_axis, plan, split_values


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    return shared_sweep(tmp_path_factory)


# ---- parsing and planning (no training) ------------------------------------------------------

def test_split_values_respects_brackets_and_quotes():
    assert split_values("cross_entropy,mse") == ["cross_entropy", "mse"]
    assert split_values("0.1,1e-3,2") == [0.1, "1e-3", 2] or split_values("0.1,1e-3,2") == [0.1, 0.001, 2]
    assert split_values("[16,16],[32]") == [[16, 16], [32]]
    assert split_values("{kind: mlp, hidden: [4]},{kind: softmax_linear}") == [
        {"kind": "mlp", "hidden": [4]}, {"kind": "softmax_linear"}]
    assert split_values("'a,b',c") == ["a,b", "c"]
    assert split_values("true,false") == [True, False]


def test_parse_axis_errors_are_one_line_naming_the_key():
    assert parse_axis("train.loss=mse,cross_entropy") == ("train.loss", ["mse", "cross_entropy"])
    for text, needle in (("train.loss", "key.path=a,b,c"), ("train..loss=a", "not a valid key path"),
                         ("train.loss=a,,b", "empty value")):
        with pytest.raises(ConfigError) as err:
            parse_axis(text)
        assert len(str(err.value).splitlines()) == 1 and needle in str(err.value)


def test_grid_is_the_product_in_axis_order_last_axis_fastest():
    base = {"name": "g", "data": {"name": "synthetic", "samples": 30}, "diagnostics": []}
    p = plan(base, ["train.loss=cross_entropy,mse", "train.learning_rate=0.1,0.01,0.001", "train.epochs=1"])
    assert len(p.combinations) == 6
    assert p.varying == ["train.loss", "train.learning_rate"]
    assert [(c.experiment.train.loss, c.experiment.train.learning_rate) for c in p.combinations] == [
        ("cross_entropy", 0.1), ("cross_entropy", 0.01), ("cross_entropy", 0.001),
        ("mse", 0.1), ("mse", 0.01), ("mse", 0.001)]
    assert all(c.experiment.train.epochs == 1 for c in p.combinations)  # a one-value axis is a fixed override
    assert p.combinations[4].name == "004-loss=mse-learning_rate=0.01"
    assert "sweep" not in p.combinations[0].raw


def test_every_combination_is_validated_before_anything_runs(tmp_path):
    cfg = tmp_path / "s.yaml"
    cfg.write_text("name: s\ndata: {name: synthetic}\nmodel: {kind: mlp, hidden: [4]}\n"
                   "sweep:\n  model.kind: [mlp, softmax_linear]\n  train.loss: [mse, xent]\n")
    with pytest.raises(ConfigError) as err:
        plan(str(cfg), check_plugins=False)
    lines = str(err.value).splitlines()
    # the YAML line of the offending key (base config or sweep value); each problem once, naming a combination
    assert any(line.startswith(f"{cfg}:3: model.hidden: only used when model.kind is mlp") and
               "sweep combination 3 of 4: model.kind=softmax_linear, train.loss=mse" in line for line in lines)
    assert any(line.startswith(f"{cfg}:6: train.loss: 'xent' is not one of cross_entropy, mse") for line in lines)
    assert len(lines) == 2


def test_cli_rejects_a_bad_axis_value_with_one_line_and_creates_nothing(tmp_path):
    (tmp_path / "s.yaml").write_text("name: s\ndata: {name: synthetic, samples: 30}\ndiagnostics: []\n")
    proc = gradlab_cli("sweep", "s.yaml", "train.loss=cross_entropy,xent", "--sweep-dir", "out", cwd=tmp_path)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "train.loss: 'xent' is not one of cross_entropy, mse" in lines[0]
    assert "sweep axis train.loss=cross_entropy,xent" in lines[0] and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()


def test_shipped_sweep_config_every_combination_valid():
    p = plan(ROOT / "configs" / "sweep_loss_activation.yaml")
    exps = [c.experiment for c in p.combinations]
    assert len(exps) == 10
    assert {e.train.loss for e in exps} == {"cross_entropy", "mse"}
    assert {(e.model.kind, e.model.activation if e.model.kind == "mlp" else None) for e in exps} == {
        ("softmax_linear", None), ("mlp", "sigmoid"), ("mlp", "tanh"), ("mlp", "relu"), ("mlp", "leaky_relu")}
    assert p.hparam_values(p.combinations[1]) == {"train.loss": "cross_entropy", "model.kind": "mlp",
                                                  "model.hidden": "[16]", "model.activation": "sigmoid"}


def test_jobs_and_sweep_dir_are_checked(tmp_path):
    from gradlab.errors import RunDirError
    from gradlab.sweep import run_sweep

    p = plan({"data": {"name": "synthetic"}, "diagnostics": []}, ["train.loss=mse,cross_entropy"])
    with pytest.raises(GradlabError, match=r"--jobs \(0\) must be a positive integer"):
        run_sweep(p, sweep_dir=tmp_path / "a", jobs=0)
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "x").write_text("")
    with pytest.raises(RunDirError, match="already exists and is not empty"):
        run_sweep(p, sweep_dir=tmp_path / "b")


# ---- a real sweep, through the console script --------------------------------------------------

def test_four_combinations_leave_four_run_dirs(sweep):
    root, proc = sweep
    runs = sorted(p.name for p in root.iterdir() if p.is_dir() and p.name[:3].isdigit())
    assert runs == sorted(GOOD + BAD)
    for name in runs:
        assert (root / name / "metrics.json").exists()
        assert (root / "configs" / f"{name}.yaml").exists()
    summary = json.loads((root / "sweep.json").read_text())
    assert summary["combinations"] == 4 and summary["status"] == "finished"
    assert summary["varying"] == ["train.loss", "data.path"]


def test_failing_combination_is_recorded_and_does_not_stop_the_others(sweep):
    root, proc = sweep
    if proc is not None:
        assert proc.returncode == 1, proc.stderr
        assert proc.stderr.strip().splitlines()[-1].startswith("gradlab sweep: 2 of 4 runs failed")
    summary = json.loads((root / "sweep.json").read_text())
    by_name = {r["name"]: r for r in summary["runs"]}
    for name in BAD:
        rec = by_name[name]
        assert rec["status"] == "failed" and rec["exit_code"] == 2
        assert "bad.csv" in rec["error"] and "7" in rec["error"], rec["error"]  # the data error line, kept
        assert json.loads((root / name / "metrics.json").read_text())["status"] == "failed"
    # run 002 started after 001 had failed: the sweep went on
    for name in GOOD:
        rec = by_name[name]
        assert rec["status"] == "completed" and rec["exit_code"] == 0
        assert math.isfinite(rec["metrics"]["loss"]) and 0 <= rec["metrics"]["accuracy"] <= 1
        run_metrics = json.loads((root / name / "metrics.json").read_text())
        assert rec["metrics"]["loss"] == run_metrics["loss"]
    assert summary["completed"] == 2 and summary["failed"] == 2


def test_comparison_table_printed_at_the_end(sweep):
    root, proc = sweep
    if proc is None:
        pytest.skip("the shared sweep ran in another module")
    out = proc.stdout
    table = out[out.index("run "):]
    header = table.splitlines()[0].split()
    assert header[:4] == ["run", "train.loss", "data.path", "status"]  # YAML axis, then command-line axis
    assert {"loss", "accuracy", "val_loss", "health"} <= set(header)
    summary = json.loads((root / "sweep.json").read_text())
    for rec in summary["runs"]:
        line = next(line for line in table.splitlines() if line.startswith(rec["name"]))
        assert rec["status"] in line
        if rec["status"] == "completed":
            assert f"{rec['metrics']['loss']:.4f}" in line
    assert "2 of 4 runs did not finish:" in table
    assert format_table(None, summary["runs"], summary["varying"]).splitlines()[0] == table.splitlines()[0]


def test_hparams_data_parsed_with_tensorboard_readers(sweep):
    from tensorboard.backend.event_processing import event_accumulator
    from tensorboard.plugins.hparams import api_pb2, metadata

    root, _ = sweep

    def acc(path):
        a = event_accumulator.EventAccumulator(str(path), size_guidance={"tensors": 0})
        a.Reload()
        return a

    top = acc(root)
    content = top.PluginTagToContent(metadata.PLUGIN_NAME)[metadata.EXPERIMENT_TAG]
    experiment = metadata.parse_experiment_plugin_data(content)
    hparams = {h.name: h for h in experiment.hparam_infos}
    assert set(hparams) == {"train.loss", "data.path"}
    assert list(hparams["train.loss"].domain_discrete.values) and \
        sorted(v.string_value for v in hparams["train.loss"].domain_discrete.values) == ["cross_entropy", "mse"]
    metric_tags = {m.name.tag for m in experiment.metric_infos}
    assert {"final/loss", "final/accuracy", "final/val_loss", "final/val_accuracy"} <= metric_tags

    summary = json.loads((root / "sweep.json").read_text())
    for rec in summary["runs"]:
        a = acc(root / rec["name"])
        tags = a.PluginTagToContent(metadata.PLUGIN_NAME)
        start = metadata.parse_session_start_info_plugin_data(tags[metadata.SESSION_START_INFO_TAG])
        end = metadata.parse_session_end_info_plugin_data(tags[metadata.SESSION_END_INFO_TAG])
        assert {k: v.string_value for k, v in start.hparams.items()} == rec["values"]
        assert start.group_name == rec["name"]
        if rec["status"] == "completed":
            assert end.status == api_pb2.STATUS_SUCCESS
            final = a.Tensors("final/loss")[-1]
            from tensorboard.util import tensor_util

            assert float(tensor_util.make_ndarray(final.tensor_proto)) == pytest.approx(rec["metrics"]["loss"],
                                                                                         rel=1e-6)
        else:
            assert end.status == api_pb2.STATUS_FAILURE


# ---- list-index key paths, as `gradlab run` overrides take them --------------------------------

def test_list_index_axes_set_one_item_as_run_overrides_do(tmp_path):
    cfg = tmp_path / "s.yaml"
    cfg.write_text("name: s\ndata: {name: synthetic, samples: 30}\nmodel: {kind: mlp, hidden: [32, 32]}\n"
                   "diagnostics: [{type: gradient_stats, every: 10}, {type: health}]\n"
                   "sweep:\n  model.hidden.1: [4, 2]\n")
    p = plan(str(cfg), ["diagnostics.0.every=5,7"])
    assert [list(c.experiment.model.hidden) for c in p.combinations] == [[32, 4], [32, 4], [32, 2], [32, 2]]
    assert [[(d.type, d.options) for d in c.experiment.diagnostics] for c in p.combinations][:2] == [
        [("gradient_stats", {"every": 5}), ("health", {})], [("gradient_stats", {"every": 7}), ("health", {})]]
    assert [c.name for c in p.combinations][:2] == ["000-hidden.1=4-every=5", "001-hidden.1=4-every=7"]


def test_a_list_index_out_of_range_is_one_line_naming_index_and_length(tmp_path):
    cfg = tmp_path / "s.yaml"
    cfg.write_text("name: s\nmodel: {kind: mlp, hidden: [4, 4]}\nsweep:\n  model.hidden.2: [1, 2]\n")
    with pytest.raises(ConfigError) as err:
        plan(str(cfg), check_plugins=False)
    assert str(err.value) == (f"{cfg}:4: sweep.model.hidden.2: list index 2 is out of range: model.hidden has 2 "
                              "items (indexes 0 to 1) (sweep combination 1 of 2: model.hidden.2=1; and 1 more)")
    cfg.write_text("name: s\nmodel: {kind: mlp, hidden: [4, 4]}\ndiagnostics: [{type: health}]\n")
    with pytest.raises(ConfigError) as err:
        plan(str(cfg), ["diagnostics.5.every=1,2"], check_plugins=False)
    assert len(str(err.value).splitlines()) == 1
    assert str(err.value).startswith("command line: diagnostics.5: list index 5 is out of range: diagnostics has 1 "
                                     "item (indexes 0 to 0)")
    assert "[from sweep axis diagnostics.5.every=1,2]" in str(err.value)


# ---- validate checks a sweep config as sweep does ----------------------------------------------

def test_validate_checks_each_combination_not_the_incomplete_base(tmp_path, capsys):
    from gradlab.cli import main

    cfg = tmp_path / "sw5.yaml"
    cfg.write_text("name: sw5\nmodel: {kind: mlp}\ntrain: {epochs: 1}\n"
                   "sweep: {model: [{kind: softmax_linear}, {kind: mlp, hidden: [4]}]}\n")
    assert len(plan(str(cfg)).combinations) == 2  # what gradlab sweep accepts and runs
    assert main(["validate", str(cfg)]) == 0, capsys.readouterr().err
    assert "sweep: 2 combinations ok" in capsys.readouterr().out
    # a problem every combination keeps is still reported: once, at its YAML line
    cfg.write_text("name: sw5\nmodel: {kind: mlp}\ntrain: {epochs: 0}\n"
                   "sweep: {model: [{kind: softmax_linear}, {kind: mlp, hidden: [4]}]}\n")
    assert main(["validate", str(cfg)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{cfg}:3: train.epochs: 0 is out of range"), lines


# ---- Ctrl-C while a run is still starting --------------------------------------------------------

HOLD_MODULE = '''"""Holds each `gradlab run` of the test sweep in config validation, before its run directory exists,
until the sweep passes its Ctrl-C on (only the first run: a later `gradlab run` is not held)."""
import os
import sys
import time

import keras

_MARK = os.environ["GRADLAB_TEST_HOLD"]
if "--run-dir" in sys.argv and not os.path.exists(_MARK):
    open(_MARK, "w").close()
    parent = os.getppid()
    for _ in range(6000):  # a SIGINT ends this; without one, stop with the sweep (at most 10 minutes)
        if os.getppid() != parent:
            os._exit(1)
        time.sleep(0.1)


class Noop(keras.callbacks.Callback):
    pass
'''


def test_ctrl_c_while_a_run_starts_leaves_no_directory_and_a_run_that_can_be_started(tmp_path, monkeypatch):
    import os
    import signal
    import subprocess
    import sys
    import time

    (tmp_path / "holdstart.py").write_text(HOLD_MODULE)
    cfg = tmp_path / "s.yaml"
    cfg.write_text("name: s\ndata: {name: synthetic, samples: 30, batch_size: 10}\ntrain: {epochs: 1}\n"
                   "diagnostics: []\ncallbacks: [{class: 'holdstart:Noop'}]\n"
                   "sweep: {train.learning_rate: [0.1, 0.05]}\n")
    mark, root = tmp_path / "held", tmp_path / "sweep"
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "GRADLAB_TEST_HOLD": str(mark),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.Popen([sys.executable, "-m", "gradlab.cli", "sweep", str(cfg), "--sweep-dir", str(root),
                             "--quiet"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            cwd=tmp_path)
    try:
        give_up = time.monotonic() + 300  # only so that a broken sweep cannot hang the suite
        while not mark.exists():  # the first run is held, before its run directory exists
            if proc.poll() is not None or time.monotonic() > give_up:
                pytest.fail(f"the first run was never held: {proc.poll()} {proc.communicate()}")
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)  # as a terminal's Ctrl-C reaches the sweep
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err
    summary = json.loads((root / "sweep.json").read_text())
    for rec in summary["runs"]:
        assert rec["status"] == "not run" and not (root / rec["name"]).exists(), rec
        command = f"gradlab run {root / 'configs' / (rec['name'] + '.yaml')} --run-dir {root / rec['name']}"
        assert rec["error"].endswith(f"start it with: {command}"), rec["error"]
    assert summary["status"] == "interrupted" and summary["not_run"] == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gradlab sweep: interrupted; 2 not run"), err
    # what that command does starts the run that was stopped while starting (in-process: faster)
    import gradlab

    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("GRADLAB_TEST_HOLD", str(mark))  # already there: not held again
    monkeypatch.chdir(tmp_path)
    first = summary["runs"][0]["name"]
    result = gradlab.run(root / "configs" / f"{first}.yaml", run_dir=root / first, quiet=True)
    assert result.metrics["status"] == "completed"
    assert json.loads((root / first / "metrics.json").read_text())["status"] == "completed"


def test_finish_removes_a_run_directory_without_config_yaml_and_keeps_a_resumable_one(tmp_path):
    from gradlab.sweep import RunRecord, _finish

    root = tmp_path / "sweep"
    (root / "logs").mkdir(parents=True)
    for name in ("000-a", "001-b"):
        (root / name).mkdir()  # made by `gradlab run`, which was then killed
        (root / "logs" / f"{name}.err").write_text("gradlab: interrupted\n")
    (root / "001-b" / "config.yaml").write_text("name: b\n")  # this one got as far as a resumable run
    a, b = (RunRecord(index=i, name=n, run_dir=str(root / n), values={}, hparams={})
            for i, n in enumerate(("000-a", "001-b")))
    _finish(a, -15, root, 0.0, 1.0, interrupted=True)
    _finish(b, -15, root, 0.0, 1.0, interrupted=True)
    assert a.status == "not run" and not (root / "000-a").exists()
    assert a.error.endswith(f"gradlab run {root / 'configs' / '000-a.yaml'} --run-dir {root / '000-a'}")
    assert b.status == "interrupted" and (root / "001-b" / "config.yaml").exists()
    assert json.loads((root / "001-b" / "metrics.json").read_text())["status"] == "interrupted"
