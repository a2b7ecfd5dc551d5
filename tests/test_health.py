"""health: each rule on hand-made observation series (pure), argument checks, and the demo configs,
each run for real, producing its documented verdict (in metrics.json, the printed table and
TensorBoard text)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

import gradlab
from gradlab.callbacks import Health
from gradlab.callbacks.health import LOSS_SERIES, judge, markdown_table
from gradlab.events import read_scalars, read_text

from conftest import ROOT


def _only(verdicts, verdict):
    return [v for v in verdicts if v["verdict"] == verdict]


# ---- rules on hand-made series ------------------------------------------------------------------

def test_vanishing_absolute_and_relative():
    series = {
        "gradients/hidden_1/layer_norm": [(0, 1e-2), (10, 1e-4), (20, 5e-7)],   # absolute at 20
        "gradients/hidden_2/layer_norm": [(0, 1.0), (10, 1.0), (20, 1.0)],
        "gradients/logits/layer_norm": [(0, 2.0), (10, 5.0), (20, 4.0)],
        LOSS_SERIES: [(0, 1.1), (20, 0.9)],
    }
    v = _only(judge(series), "vanishing")
    assert [(x["layer"], x["first_step"]) for x in v] == [("hidden_1", 10)]  # 1e-4 / 5.0 < 1e-3 at step 10
    assert v[0]["message"] == "hidden_1: gradient vanishing from step 10 (norm 5.0e-07, 1.2e-07 of logits's)"


def test_vanishing_ignores_a_converged_model_but_not_imbalance():
    series = {"gradients/logits/layer_norm": [(0, 1e-2), (10, 1e-8)], LOSS_SERIES: [(0, 0.5), (10, 1e-5)]}
    assert judge(series) == []  # tiny gradient, tiny loss: converged, not vanishing
    series[LOSS_SERIES] = [(0, 0.5), (10, 0.4)]
    assert [(v["layer"], v["first_step"]) for v in judge(series)] == [("logits", 10)]
    # one layer: the relative rule can never fire (a layer is not tiny relative to itself)
    assert judge({"gradients/logits/layer_norm": [(0, 1e-3)]}) == []


def test_all_zero_gradients_vanish_by_the_absolute_rule():
    series = {"gradients/a/layer_norm": [(0, 0.0)], "gradients/b/layer_norm": [(0, 0.0)]}
    assert sorted(v["layer"] for v in judge(series)) == ["a", "b"]


def test_exploding_jump_over_recent_median():
    values = [1.0, 1.2, 0.9, 1.1, 30.0, 1.0, 1.0]
    series = {"gradients/h/layer_norm": [(10 * i, 1.0) for i in range(7)],
              "gradients/h/layer_norm/window_max": [(10 * i, x) for i, x in enumerate(values)]}
    v = _only(judge(series), "exploding")
    assert len(v) == 1 and v[0]["first_step"] == 40 and v[0]["last_step"] == 40
    assert v[0]["message"] == "h: gradient norm jumped to 30 (29x its recent median 1.05) at step 40"
    assert _only(judge(series, exploding_factor=50.0), "exploding") == []
    # fewer earlier values than exploding_min_history: no jump can be judged yet
    early = {"gradients/h/layer_norm": [(0, 1.0), (10, 100.0)]}
    assert judge(early) == []


def test_exploding_nonfinite_values_and_events():
    series = {"gradients/h/layer_norm": [(0, 1.0), (10, math.nan)]}
    v = judge(series)
    assert [(x["layer"], x["verdict"], x["first_step"]) for x in v] == [("h", "exploding", 10)]
    event = {"kind": "nonfinite", "step": 7, "layer": "h", "variable": "kernel", "what": "gradient", "value": "NaN",
             "message": "..."}
    v = judge(series, events=[event])
    assert v[0]["first_step"] == 7 and v[0]["message"] == "h: gradient became NaN at step 7 (h/kernel)"


def test_exploding_updates_far_larger_than_the_weights():
    """A huge learning rate with cross-entropy: the gradient norms stay ordinary (bounded by the
    inputs) while each update dwarfs the weights. Offsets (bias) are not judged: they start at 0."""
    series = {"gradients/h/layer_norm": [(0, 1.0), (10, 1.1), (20, 0.9), (30, 1.0)],
              "gradients/h/kernel/update_ratio": [(0, 0.01), (10, 250.0), (20, 400.0), (30, 0.5)],
              "gradients/h/bias/update_ratio": [(0, 1.0), (10, 1e6), (20, 1e6), (30, 1e6)],
              "gradients/out/kernel/update_ratio": [(0, math.inf), (10, math.nan)],
              # tiny initial weights: only the first update is large -- not a divergence
              "gradients/tiny/kernel/update_ratio": [(0, 900.0), (10, 0.1), (20, 0.05)]}
    v = _only(judge(series), "exploding")
    assert [(x["layer"], x["first_step"], x["last_step"]) for x in v] == [("out", 0, 10), ("h", 10, 20)]
    assert v[0]["message"] == "out: updates too large for float32 (kernel: update_ratio nan) from step 0"
    assert v[1]["message"] == "h: updates 400x the size of the weights (kernel) from step 10 (until step 20)"
    assert [x["layer"] for x in _only(judge(series, exploding_update_ratio=300.0), "exploding")] == ["out"]


def test_rules_feeding_one_verdict_out_of_step_order_keep_first_before_last():
    # the jump rule holds at 60-90, the update rule at 10-20: one exploding verdict from 10 to 90
    norms = [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 50.0, 50.0, 60.0, 70.0]
    series = {"gradients/h/layer_norm": [(10 * i, x) for i, x in enumerate(norms)],
              "gradients/h/kernel/update_ratio": [(10, 50.0), (20, 60.0), (30, 0.1)]}
    (v,) = _only(judge(series), "exploding")
    assert (v["first_step"], v["last_step"]) == (10, 90), v
    assert v["message"].startswith("h: gradient norm jumped to 70"), v["message"]


def test_tiny_initial_weights_trained_by_adam_are_not_exploding(tmp_path):
    # Adam's first update is ~lr per weight: 1e-3 against weights of ~1e-5 is a ratio of ~100
    result = gradlab.run(ROOT / "configs" / "default.yaml",
                         ["model.kernel_initializer={name: random_normal, stddev: 1.0e-5}", "train.optimizer=adam",
                          "train.learning_rate=1e-3", "train.epochs=3"], run_dir=tmp_path / "run", quiet=True)
    ratios = read_scalars(result.run_dir)["gradients/logits/kernel/update_ratio"]
    assert ratios[0][1] > 10, ratios  # the case this test is about
    assert not [v for v in result.metrics["verdicts"] if v["verdict"] == "exploding"], result.metrics["verdicts"]


def test_a_diverging_run_with_bounded_gradients_gets_an_exploding_verdict(tmp_path):
    # learning rate 1e30 on raw iris: the loss reaches ~1e31 while the gradient norms stay ~5
    result = gradlab.run(ROOT / "configs" / "default.yaml", ["train.learning_rate=1e30", "data.standardize=false",
                                                             "train.epochs=2"], run_dir=tmp_path / "run", quiet=True)
    assert result.metrics["loss"] > 1e20
    assert ("logits", "exploding", 0) in {(v["layer"], v["verdict"], v["first_step"])
                                          for v in result.metrics["verdicts"]}, result.metrics["verdicts"]


def test_dead_and_saturated_need_the_right_activation():
    series = {"activations/r/dead_fraction": [(0, 0.2), (50, 0.75), (100, 0.8)],
              "activations/s/saturated_fraction": [(0, 0.97), (50, 0.97), (100, 0.3)],
              "activations/out/saturated_fraction": [(0, 1.0)]}
    v = judge(series, {"r": "relu", "s": "sigmoid", "out": "softmax"})
    assert [(x["layer"], x["verdict"], x["first_step"]) for x in v] == [("s", "saturated", 0), ("r", "dead", 50)]
    assert v[0]["message"] == "s: 97% of sigmoid units saturated from step 0 (until step 50)"
    assert v[1]["message"] == "r: 80% of relu units dead from step 50"
    assert judge(series, {}) == []  # unknown kinds: no dead/saturated verdicts
    assert _only(judge(series, {"s": "tanh"}, saturated_fraction=0.99), "saturated") == []


def test_judging_cost_stays_linear_in_long_runs():
    """``loss_at`` was a linear scan per judged step (judging 16k steps took 0.3 s, 100k steps
    minutes: this test would not finish in CI's time); and re-judging the whole history every
    50 steps is quadratic over a run. No timing here: the rule and the schedule are checked."""
    n = 100_000
    series = {LOSS_SERIES: [(s, 1.0 / (1 + s)) for s in range(n)]}
    for layer in ("hidden_1", "logits"):
        series[f"gradients/{layer}/layer_norm"] = [(s, 1.0 if layer == "logits" else 1e-9) for s in range(0, n, 10)]
    verdicts = judge(series)
    assert [(v["layer"], v["verdict"], v["first_step"]) for v in verdicts] == [("hidden_1", "vanishing", 0)]

    class Model:  # what the schedule needs of a model: nothing (no tap, no probe)
        pass

    health = Health(every=50)
    health.set_model(Model())
    health._last_step, health._epoch_start_step, health._began = 0, 0, True  # (what on_train_begin sets)
    judged = []
    health._write = lambda step, final=False: judged.append(step + 1)
    for batch in range(20_000):
        health.on_train_batch_end(batch, {"loss": 1.0})
    assert judged[:3] == [50, 100, 150]  # short runs: every `every` steps
    gaps = [b - a for a, b in zip(judged, judged[1:])]
    assert all(gap >= max(50, step // 50) for gap, step in zip(gaps, judged[1:]))
    assert judged[-1] >= 20_000 - 20_000 // 50 - 50  # still refreshed towards the end
    assert len(judged) < 20_000 // 50 / 2  # far fewer than every 50 steps


def test_markdown_table():
    assert markdown_table([]).startswith("No verdicts")
    table = markdown_table([{"layer": "a", "verdict": "dead", "first_step": 3, "message": "a: x"}])
    assert table.splitlines()[2] == "| a | dead | 3 | a: x |"


@pytest.mark.parametrize("kwargs,match", [
    ({"vanishing_norm": 0}, r"`vanishing_norm` \(0\) must be a positive number"),
    ({"dead_fraction": 1.5}, r"`dead_fraction` \(1.5\) must be a number in \(0, 1\)"),
    ({"exploding_factor": 1.0}, r"`exploding_factor` \(1.0\) must be greater than 1"),
    ({"exploding_window": 0}, r"`exploding_window` \(0\) must be a positive integer"),
])
def test_bad_thresholds_name_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Health(**kwargs)


def test_bad_threshold_in_yaml_names_the_key(write_yaml):
    from gradlab.errors import ConfigError

    path = write_yaml("diagnostics:\n  - {type: health, saturated_fraction: 2}\n")
    with pytest.raises(ConfigError, match=r"exp.yaml:2: diagnostics.0.saturated_fraction: `saturated_fraction` \(2\)"):
        gradlab.load_config(path)


# ---- the demo configs produce their verdicts -------------------------------------------------------

def _run_demo(name: str, tmp_path: Path, capsys):
    result = gradlab.run(ROOT / "configs" / f"{name}.yaml", run_dir=tmp_path / name, verbose=0)
    printed = capsys.readouterr().out
    verdicts = {(v["layer"], v["verdict"]) for v in result.metrics["verdicts"]}
    for v in result.metrics["verdicts"]:
        assert v["message"] in printed  # the table printed at the end of the run
    text = read_text(result.run_dir, "health/verdicts")
    assert text and all(f"| {layer} | {verdict} |" in text[-1][1] for layer, verdict in verdicts)
    return result, verdicts


def test_demo_sigmoid_saturation(tmp_path, capsys):
    result, verdicts = _run_demo("demo_sigmoid_saturation", tmp_path, capsys)
    assert {("hidden_1", "saturated"), ("hidden_2", "saturated")} <= verdicts
    assert all(v["first_step"] == 0 for v in result.metrics["verdicts"] if v["verdict"] == "saturated")


def test_demo_relu_dead(tmp_path, capsys):
    result, verdicts = _run_demo("demo_relu_dead", tmp_path, capsys)
    assert {("hidden_1", "dead"), ("hidden_2", "dead")} <= verdicts
    assert not any(v == "saturated" for _, v in verdicts)


def test_demo_mse_vs_cross_entropy(tmp_path, capsys):
    mse, mse_verdicts = _run_demo("demo_mse", tmp_path, capsys)
    xent, xent_verdicts = _run_demo("demo_cross_entropy", tmp_path, capsys)
    assert ("logits", "vanishing") in mse_verdicts
    assert xent_verdicts == set()
    g_mse = [v for _, v in read_scalars(mse.run_dir, "train")["gradients/logits/norm"]]
    g_xent = [v for _, v in read_scalars(xent.run_dir, "train")["gradients/logits/norm"]]
    assert len(g_mse) == len(g_xent) >= 4
    assert max(g_mse) < 1e-3 * min(g_xent)  # the seed's point: MSE's logit gradients vanish under saturation
    assert xent.metrics["accuracy"] > mse.metrics["accuracy"] + 0.1


def test_a_run_without_health_says_its_verdicts_were_not_checked(tmp_path, write_yaml):
    import yaml

    from conftest import gradlab_cli, tiny_config

    cfg = write_yaml(yaml.safe_dump(tiny_config(diagnostics=[{"type": "gradient_stats"}])))
    proc = gradlab_cli("run", str(cfg), "--run-dir", str(tmp_path / "run"))
    assert proc.returncode == 0, proc.stderr
    assert "Health verdicts: not checked (no health diagnostic" in proc.stdout
    assert "Health verdicts: none" not in proc.stdout


def test_observations_store_series_compactly_and_read_like_lists():
    """A long run publishes millions of points (gradient_stats: ~50 per write for a small MLP).
    As a list of ``(step, value)`` tuples a point cost ~90 bytes; a Series stores 16."""
    import tracemalloc

    from gradlab.callbacks import observations_for

    class Model:
        pass

    obs = observations_for(Model())
    obs.add("a", 0, 0.5)
    obs.add("a", 10, float("nan"))
    obs.add("a", 20, 2)
    series = obs.series["a"]
    assert len(series) == 3 and series[0] == (0, 0.5) and series[-1] == (20, 2.0)
    assert series[1:][1] == (20, 2.0) and [s for s, _ in series] == [0, 10, 20]
    assert series[:1] == [(0, 0.5)] and sorted(series)[0] == (0, 0.5)
    assert math.isnan(series[1][1]) and series[1][0] == 10
    obs.add("c", 3, 1.5)
    assert obs.series["c"] == [(3, 1.5)] and obs.series["c"] != [(3, 1.0)] and obs.series["c"] != []
    assert judge({"gradients/x/layer_norm": series}) == judge({"gradients/x/layer_norm": list(series)})

    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for step in range(100_000):
        obs.add("b", step, step * 0.5)
    used = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    assert used / 100_000 < 20, f"{used / 100_000:.1f} bytes per observed point"
