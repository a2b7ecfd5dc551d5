"""Extension: a user's own Diagnostic (tap and probe) selected from YAML by import path, and an arbitrary
Keras callback from ``callbacks:`` -- both written into a plug-in module outside the package."""

from __future__ import annotations

import json
import sys
import textwrap

import pytest

import gradlab
from gradlab.errors import ConfigError
from gradlab.events import read_scalars

from conftest import gradlab_cli

PLUGIN = textwrap.dedent('''
    """A third-party plug-in, written exactly like the example in docs/diagnostics.md."""
    import json

    import keras
    import tensorflow as tf

    from gradlab.callbacks import Diagnostic
    from gradlab.train_step import Tap


    class MyDiag(Diagnostic):
        """Tap: fraction of exactly-zero gradient entries per step. Probe: mean |logit| on the probe batch."""

        uses_tap = True
        uses_probe = True

        def __init__(self, *, log_dir=None, every=10, scale=1.0, probe_data=None, probe_size=256):
            super().__init__(log_dir=log_dir, every=every, probe_data=probe_data, probe_size=probe_size)
            if not scale > 0:
                raise ValueError(f"`scale` ({scale!r}) must be positive")
            self.scale = scale

        def make_tap(self, model):
            total = sum(int(v.shape.num_elements()) for v in model.trainable_variables)

            def every_step(inp):
                zeros = tf.add_n([tf.reduce_sum(tf.cast(tf.equal(g, 0.0), tf.float32)) for g in inp.grads])
                return {"zero_fraction": zeros / total, "loss": inp.loss * self.scale}

            return Tap(every_step=every_step, every=self.every)

        def write_tap(self, step, values):
            w = values["window"]
            self.scalar("mine/zero_fraction", w["zero_fraction"]["last"], step)
            self.scalar("mine/loss_max", w["loss"]["max"], step)

        def probe(self, model, x, y):
            return {"mean_abs_logit": tf.reduce_mean(tf.abs(model(x, training=False)))}

        def write_probe(self, step, values):
            self.scalar("mine/mean_abs_logit", float(values["mean_abs_logit"]), step)


    class MyCallback(keras.callbacks.Callback):
        def __init__(self, path, tag="hello"):
            super().__init__()
            self.path, self.tag, self.batches = path, tag, 0

        def on_train_batch_end(self, batch, logs=None):
            self.batches += 1

        def on_train_end(self, logs=None):
            with open(self.path, "w") as f:
                json.dump({"tag": self.tag, "batches": self.batches,
                           "steps": int(self.model.optimizer.iterations.numpy())}, f)
''')


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    name = f"my_gradlab_plugin_{tmp_path.name.replace('-', '_')}"
    (tmp_path / f"{name}.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    sys.modules.pop(name, None)


def _config(module: str, out: str, **diag):
    return {"name": "ext", "seed": 0,
            "data": {"name": "synthetic", "samples": 60, "batch_size": 10, "shuffle": False},
            "model": {"kind": "mlp", "hidden": [4], "activation": "relu"},
            "train": {"epochs": 2, "learning_rate": 0.1, "log_every": 1},
            "diagnostics": [{"type": f"{module}:MyDiag", "every": 3, "scale": 2.0, **diag}],
            "callbacks": [{"class": f"{module}:MyCallback", "args": {"path": out, "tag": "from-yaml"}}]}


def test_plugin_diagnostic_and_callback_from_yaml(tmp_path, plugin):
    out = tmp_path / "callback.json"
    yaml_path = tmp_path / "ext.yaml"
    yaml_path.write_text(json.dumps(_config(plugin, str(out))))
    result = gradlab.run(yaml_path, run_dir=tmp_path / "run", quiet=True)

    s = read_scalars(result.run_dir, "train")
    assert {t for t in s if t.startswith("mine/")} == {"mine/zero_fraction", "mine/loss_max", "mine/mean_abs_logit"}
    assert [step for step, _ in s["mine/zero_fraction"]] == [0, 3, 6, 9, 11]  # due steps, then the final flush
    assert [step for step, _ in s["mine/mean_abs_logit"]] == [0, 3, 6, 9, 12]  # weights after 12 updates
    assert all(0.0 <= v <= 1.0 for _, v in s["mine/zero_fraction"])
    # the tap saw the real per-step losses: its window max at due step 3 (steps 1..3) is 2x the largest
    # of the per-step losses gradlab's step_metrics logged for those steps (it writes every step here)
    step_loss = dict(s["step/loss_last"])
    assert dict(s["mine/loss_max"])[3] == pytest.approx(2.0 * max(step_loss[k] for k in (1, 2, 3)), rel=1e-5)
    assert json.loads(out.read_text()) == {"tag": "from-yaml", "batches": 12, "steps": 12}


def test_plugin_option_errors_are_reported_with_the_yaml_line(tmp_path, plugin):
    yaml_path = tmp_path / "bad.yaml"
    yaml_path.write_text(
        "diagnostics:\n"
        f"  - {{type: '{plugin}:MyDiag', scale: -1}}\n"
        f"  - {{type: '{plugin}:Nope'}}\n"
        "callbacks:\n"
        f"  - {{class: '{plugin}:MyCallback', args: {{nope: 1}}}}\n")
    with pytest.raises(ConfigError) as err:
        gradlab.load_config(yaml_path)
    lines = str(err.value).splitlines()
    assert any(line.startswith("bad.yaml:2:") or ":2: diagnostics.0.scale: `scale` (-1)" in line for line in lines), lines
    assert any(":3: diagnostics.1.type:" in line and "Nope" in line for line in lines), lines
    assert any(":5: callbacks.0.args:" in line for line in lines), lines


def test_failing_user_code_is_tied_to_its_config_entry(tmp_path, monkeypatch):
    name = f"failing_plugin_{tmp_path.name.replace('-', '_')}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent('''
        import keras
        class Boom(keras.callbacks.Callback):
            def __init__(self):
                raise RuntimeError("constructor boom")
    '''))
    (tmp_path / f"{name}_broken.py").write_text("def (:\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yaml_path = tmp_path / "bad.yaml"
    yaml_path.write_text("callbacks:\n"
                         f"  - {{class: '{name}:Boom'}}\n"
                         f"  - {{class: '{name}_broken:X'}}\n")
    try:
        with pytest.raises(ConfigError) as err:
            gradlab.load_config(yaml_path)
    finally:
        sys.modules.pop(name, None)
    lines = str(err.value).splitlines()
    assert any(":2: callbacks.0.args:" in line and "RuntimeError: constructor boom" in line for line in lines), lines
    assert any(":3: callbacks.1.class:" in line and "raised SyntaxError" in line for line in lines), lines


def test_the_plugin_example_in_the_base_class_docstring_works_as_written(tmp_path, monkeypatch):
    """callbacks/base.py's module docstring shows "a complete plug-in": run it, as written, from YAML."""
    from gradlab.callbacks import base

    doc = base.__doc__
    example = textwrap.dedent(doc[doc.index("Example (a complete plug-in)::") + len("Example (a complete plug-in)::"):])
    name = f"docstring_plugin_{tmp_path.name.replace('-', '_')}"
    (tmp_path / f"{name}.py").write_text(example)
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = _config(name, str(tmp_path / "unused.json"))
    cfg["diagnostics"] = [{"type": f"{name}:GradSparsity", "every": 3}]
    cfg["callbacks"] = []
    try:
        result = gradlab.run(cfg, run_dir=tmp_path / "run", quiet=True)
    finally:
        sys.modules.pop(name, None)
        base._REGISTRY.pop("grad_sparsity", None)
    scalars = read_scalars(result.run_dir)
    zero = scalars.get("sparsity/zero_fraction")
    assert zero, sorted(scalars)
    assert [s for s, _ in zero][:3] == [0, 3, 6]
    assert all(0.0 <= v <= 1.0 for _, v in zero)
    assert [s for s, _ in scalars["sparsity/zero_fraction_max"]] == [s for s, _ in zero]


def test_user_code_raising_during_training_is_one_line_naming_its_entry(tmp_path):
    """A user's callback (or own diagnostic) that raises in a hook is the user's error, not
    gradlab's: one line naming the config entry and the hook, exit status 2, the run failed."""
    name = f"raising_plugin_{tmp_path.name.replace('-', '_')}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent('''
        import keras
        from gradlab.callbacks import Diagnostic

        class RaisesTrain(keras.callbacks.Callback):
            def on_train_batch_end(self, batch, logs=None):
                if batch == 2:
                    raise ValueError("boom in batch\\nsecond line")

        class RaisesProbe(Diagnostic):
            uses_probe = True

            def write_probe(self, step, values):
                raise KeyError("no such thing")
    '''))
    base = {"name": "ext", "seed": 0, "data": {"name": "synthetic", "samples": 60, "batch_size": 10},
            "model": {"kind": "softmax_linear"}, "train": {"epochs": 1}}
    cases = [({"callbacks": [{"class": f"{name}:RaisesTrain"}]},
              f"callbacks.0 ({name}:RaisesTrain) raised ValueError in on_train_batch_end: boom in batch"),
             ({"diagnostics": [{"type": "nonfinite"}, {"type": f"{name}:RaisesProbe", "every": 2}]},
              f"diagnostics.1 ({name}:RaisesProbe) raised KeyError in write_probe: 'no such thing'")]
    for i, (extra, expected) in enumerate(cases):
        cfg = tmp_path / f"c{i}.json"
        cfg.write_text(json.dumps({**base, **extra}))  # JSON is YAML
        run = tmp_path / f"run{i}"
        proc = gradlab_cli("run", str(cfg), "--run-dir", str(run), "--quiet", env={"PYTHONPATH": str(tmp_path)})
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert lines == [expected], lines
        assert json.loads((run / "metrics.json").read_text())["status"] == "failed"


def test_only_the_users_own_code_is_blamed_on_the_user():
    """An error from gradlab's base class running for a user's subclass stays gradlab's; one from
    the user's own method names it (the innermost such frame)."""
    import types

    from gradlab.callbacks import Diagnostic
    from gradlab.config import DiagnosticSpec
    from gradlab.errors import UserCodeError
    from gradlab.plugins import raise_if_user_code

    class Mine(Diagnostic):
        def helper(self):
            raise RuntimeError("mine")

        def on_epoch_end(self, epoch, logs=None):
            self.helper()

    diag = Mine()
    exp = types.SimpleNamespace(diagnostics=(DiagnosticSpec(type="pkg:Mine", options={}),), callbacks=())
    try:
        diag.probe_batch()  # gradlab's code (no probe data): its ValueError is not the user's
    except ValueError as err:
        raise_if_user_code(err, exp, [diag], [])  # does not raise
    with pytest.raises(UserCodeError, match=r"^diagnostics.0 \(pkg:Mine\) raised RuntimeError in helper: mine$"):
        try:
            diag.on_epoch_end(0)
        except RuntimeError as err:
            raise_if_user_code(err, exp, [diag], [])
