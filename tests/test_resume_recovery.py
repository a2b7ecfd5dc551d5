"""Resume edge cases: a Ctrl-C after training, a resume from step 0, unreadable checkpoints,
histograms after a resume, a NaN-stopped run.

Every run is in-process and tiny (iris, an MLP with 4 tanh units, 3 epochs of 8 steps,
checkpoints every 8 steps). A run is interrupted deterministically by a user callback that sends
this process SIGINT after a chosen step (once: a marker file remembers it), which gradlab's
checkpointing callback turns into a checkpoint and a ``RunInterrupted``. Each resumed run must end
with exactly the TensorBoard records of an uninterrupted run: the same ``(directory, tag, step)``
multiset over every event file, scalars, histograms, text and metadata alike.
"""

from __future__ import annotations

import collections
import json
import re
import shutil
from pathlib import Path

import pytest

import gradlab
from gradlab import cli
from gradlab import experiment as experiment_mod
from gradlab.errors import NonFiniteError, RunDirError, RunInterrupted, UserCodeError

CALLBACKS = '''
import os, signal, keras

class InterruptAt(keras.callbacks.Callback):
    """SIGINT to this process after step `step`, once (the marker file remembers it)."""
    def __init__(self, step, marker):
        super().__init__(); self.step, self.marker = step, marker
    def on_train_batch_end(self, batch, logs=None):
        if int(self.model.optimizer.iterations.numpy()) == self.step and not os.path.exists(self.marker):
            open(self.marker, "w").close()
            os.kill(os.getpid(), signal.SIGINT)

class FailAt(InterruptAt):
    """A crash (no checkpoint, no Ctrl-C handling) after step `step`, once."""
    def on_train_batch_end(self, batch, logs=None):
        if int(self.model.optimizer.iterations.numpy()) == self.step and not os.path.exists(self.marker):
            open(self.marker, "w").close()
            raise RuntimeError("crash for the test")
'''

STEPS = 24  # 3 epochs x 8 batches (iris: 120 training rows, batch 16)


def _config(**callback) -> dict:
    cfg = {
        "name": "edges", "seed": 0,
        "data": {"name": "iris", "batch_size": 16, "validation_split": 0.2, "standardize": True},
        "model": {"kind": "mlp", "hidden": [4], "activation": "tanh"},
        "train": {"learning_rate": 0.5, "epochs": 3, "checkpoint_every": 8},
        "diagnostics": [{"type": "gradient_stats", "every": 5},
                        {"type": "activation_saturation", "every": 5, "histogram_every": 8},
                        {"type": "nonfinite"}, {"type": "health"}],
    }
    if callback:
        cfg["callbacks"] = [callback]
    return cfg


def records(run_dir: Path) -> collections.Counter:
    """``(directory, tag, step)`` -> how many times it was written, over every event file."""
    import tensorflow as tf
    from tensorboard.compat.proto import event_pb2

    out: collections.Counter = collections.Counter()
    for file in sorted(Path(run_dir).rglob("events.out.tfevents.*")):
        where = file.parent.relative_to(run_dir).as_posix()
        for raw in tf.data.TFRecordDataset(str(file)):
            event = event_pb2.Event.FromString(raw.numpy())
            for value in event.summary.value:
                out[(where, value.tag, event.step)] += 1
    return out


def assert_same_records(run: Path, ref: Path) -> None:
    got, want = records(run), records(ref)
    assert not [k for k, n in want.items() if n > 1], "the reference run itself has duplicates"
    dups = sorted(k for k, n in got.items() if n > 1)
    assert not dups, f"written more than once: {dups[:10]}"
    assert sorted(set(got) - set(want)) == [] and sorted(set(want) - set(got)) == []


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """The callbacks module on sys.path and the uninterrupted reference run (once per module)."""
    root = tmp_path_factory.mktemp("edges")
    (root / "edge_callbacks.py").write_text(CALLBACKS)
    mp = pytest.MonkeyPatch()
    mp.syspath_prepend(str(root))
    ref = gradlab.run(_config(), run_dir=root / "ref", quiet=True, verbose=0)
    yield root, ref
    mp.undo()


def _interrupted(root: Path, name: str, step: int) -> Path:
    """A run directory interrupted by Ctrl-C after ``step``."""
    run = root / name
    cfg = _config(**{"class": "edge_callbacks:InterruptAt", "args": {"step": step, "marker": str(root / f"{name}.m")}})
    with pytest.raises(RunInterrupted, match=f"interrupted at step {step}; checkpoint saved"):
        gradlab.run(cfg, run_dir=run, quiet=True, verbose=0)
    return run


def test_ctrl_c_in_the_final_evaluation_says_how_to_resume_and_the_resume_writes_nothing_twice(env, monkeypatch,
                                                                                            capsys):
    root, ref = env
    run = root / "final-eval"
    real = experiment_mod._final_metrics

    def ctrl_c_once(model, data):
        monkeypatch.setattr(experiment_mod, "_final_metrics", real)
        raise KeyboardInterrupt

    monkeypatch.setattr(experiment_mod, "_final_metrics", ctrl_c_once)
    capsys.readouterr()
    # the CLI's path, in this process: one line, exit status 130, the resume command
    code = cli.main(["run", str(_write(root / "final-eval.yaml", _config())), "--run-dir", str(run), "--quiet"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 130
    assert err == [f"gradlab: interrupted at step {STEPS}; checkpoint saved in {run / 'checkpoints'}; "
                   f"resume with: gradlab run --resume {run}"]
    result = gradlab.run(resume=run, quiet=True, verbose=0)
    assert result.metrics["resumed_from_step"] == STEPS
    assert result.metrics["weights_sha256"] == ref.metrics["weights_sha256"]
    assert_same_records(run, ref.run_dir)  # health/verdicts and the last tap windows once each


def test_a_resume_from_step_0_keeps_the_layout_and_the_hparams_session(env):
    from gradlab import tb

    root, ref = env
    run = root / "step0"
    cfg = _config(**{"class": "edge_callbacks:FailAt", "args": {"step": 3, "marker": str(root / "step0.m")}})
    # (the user's callback raised: reported as theirs, naming the config entry)
    with pytest.raises(UserCodeError, match=r"callbacks.0 \(edge_callbacks:FailAt\) raised RuntimeError in "
                                            r"on_train_batch_end: crash for the test"):
        gradlab.run(cfg, run_dir=run, quiet=True, verbose=0)
    assert not list((run / "checkpoints").glob("ckpt-*.index"))  # so the resume starts at step 0
    # what gradlab sweep writes into an interrupted run's directory
    tb.write_session(run, {"train.learning_rate": 0.5}, status="interrupted", metrics={}, group="step0")
    result = gradlab.run(resume=run, quiet=True, verbose=0)
    assert "resumed_from_step" not in result.metrics  # no checkpoint: a fresh start in the same directory
    assert result.metrics["weights_sha256"] == ref.metrics["weights_sha256"]
    got = records(run)
    session = {k: n for k, n in got.items() if k[1].startswith("_hparams_/")}
    # the session's start (its hyperparameters) stays; its end (status "interrupted") is stale
    assert session == {(".", "_hparams_/session_start_info", 0): 1}
    for key in session:
        del got[key]
    assert got == records(ref.run_dir)  # incl. the custom-scalars layout, once


def test_unreadable_checkpoints_are_skipped_newest_first(env, capsys):
    root, ref = env
    run = _interrupted(root, "fallback", 20)
    ckpts = run / "checkpoints"
    assert sorted(p.name for p in ckpts.glob("*.index")) == ["ckpt-16.index", "ckpt-20.index", "ckpt-8.index"]
    none_readable = root / "none-readable"
    shutil.copytree(run, none_readable)

    # the latest's data file is gone, the one before has an empty index: resume from step 8
    next(ckpts.glob("ckpt-20.data-*")).unlink()
    (ckpts / "ckpt-16.index").write_bytes(b"")
    capsys.readouterr()
    result = gradlab.run(resume=run, quiet=True, verbose=0)
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 2 and "ckpt-20 is unreadable" in err[0] and "ckpt-16 is unreadable" in err[1], err
    assert result.metrics["resumed_from_step"] == 8
    assert result.metrics["weights_sha256"] == ref.metrics["weights_sha256"]
    assert_same_records(run, ref.run_dir)

    # none readable: one line naming the directory, exit status 2, nothing changed
    ckpts = none_readable / "checkpoints"
    data = next(ckpts.glob("ckpt-20.data-*"))
    data.write_bytes(b"x" * data.stat().st_size)  # bit rot: every tensor's checksum fails
    (ckpts / "ckpt-16.index").write_bytes(b"")
    next(ckpts.glob("ckpt-8.data-*")).unlink()
    before = _snapshot(none_readable)
    capsys.readouterr()
    assert cli.main(["run", "--resume", str(none_readable), "--quiet"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and f"no readable checkpoint in {none_readable / 'checkpoints'}" in err[0], err
    assert _snapshot(none_readable) == before


def test_a_resumed_run_writes_the_activation_histograms_of_an_uninterrupted_one(env):
    root, ref = env
    # probes every 5 steps, histograms at the first probe of every 8 steps: 0, 10, 20 -- not 15,
    # the first probe after a resume from step 12
    run = _interrupted(root, "histograms", 12)
    result = gradlab.run(resume=run, quiet=True, verbose=0)
    assert result.metrics["resumed_from_step"] == 12
    hist = sorted(s for (d, tag, s) in records(run) if tag == "activations/hidden_1")
    assert hist == [0, 10, 20]
    assert_same_records(run, ref.run_dir)


def test_a_nan_stopped_run_and_its_resume_name_the_same_step(tmp_path, capsys):
    cfg = {"name": "nan", "data": {"name": "iris", "batch_size": 16}, "train": {"learning_rate": 1e38, "epochs": 2},
           "diagnostics": [{"type": "nonfinite"}]}
    with pytest.raises(NonFiniteError) as info:
        gradlab.run(cfg, run_dir=tmp_path / "r", quiet=True, verbose=0)
    step = int(re.search(r" at step (\d+)", str(info.value)).group(1))
    with pytest.raises(RunDirError) as again:
        gradlab.run(resume=tmp_path / "r", quiet=True)
    assert str(again.value) == f"--resume {tmp_path / 'r'}: the run already stopped at step {step}; nothing to resume"
    assert json.loads((tmp_path / "r" / "state.json").read_text())["stopped_step"] == step


def _write(path: Path, cfg: dict) -> Path:
    path.write_text(json.dumps(cfg))  # JSON is YAML
    return path


def _snapshot(run: Path) -> dict:
    """Every file's bytes, but the lock file's (it holds the pid of the last process that locked)."""
    return {p.relative_to(run).as_posix(): p.read_bytes() for p in sorted(run.rglob("*"))
            if p.is_file() and p.name != ".gradlab.lock"}
