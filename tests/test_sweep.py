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
