"""One process per run directory: a run holds a lock on its directory until it ends.

A second process resuming the same directory -- or resuming a run that is still training --
stops at once with one line and exit status 2, instead of training beside it and writing every
TensorBoard step twice. A process that dies releases the lock (the SIGKILL test in
test_resume.py resumes a killed run whose state.json still says "running").
"""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

import gradlab
from gradlab import resume as resume_mod
from gradlab.errors import RunDirError

GATE = '''
import os, time, keras

class Gate(keras.callbacks.Callback):
    """After step `step`, the first process to get here says so (file `ready`) and waits for the
    file `go`; any later process goes straight on."""
    def __init__(self, step, folder):
        super().__init__(); self.step, self.folder = step, folder
    def on_train_batch_end(self, batch, logs=None):
        if int(self.model.optimizer.iterations.numpy()) != self.step:
            return
        try:
            os.close(os.open(os.path.join(self.folder, "ready"), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return
        for _ in range(6000):  # a safety net (10 min), not a timing assumption
            if os.path.exists(os.path.join(self.folder, "go")):
                return
            time.sleep(0.1)
'''

CFG = {
    "name": "lock", "seed": 0,
    "data": {"name": "iris", "batch_size": 16},
    "model": {"kind": "softmax_linear"},
    "train": {"epochs": 2, "checkpoint_every": 4},
    "diagnostics": [{"type": "gradient_stats", "every": 2}],
}


def _wait_for(path: Path, proc: subprocess.Popen, what: str) -> None:
    deadline = time.time() + 300  # a safety net for a stuck run, not a timing assumption
    while not path.exists():
        if proc.poll() is not None:
            pytest.fail(f"the run ended before {what}: {proc.stderr.read()[-2000:]}")
        if time.time() > deadline:
            pytest.fail(f"no {what} after 300 s")
        time.sleep(0.05)


def _duplicates(run: Path) -> list:
    import tensorflow as tf
    from tensorboard.compat.proto import event_pb2

    seen: collections.Counter = collections.Counter()
    for file in run.rglob("events.out.tfevents.*"):
        for raw in tf.data.TFRecordDataset(str(file)):
            event = event_pb2.Event.FromString(raw.numpy())
            for value in event.summary.value:
                seen[(file.parent.name, value.tag, event.step)] += 1
    return [k for k, n in seen.items() if n > 1]


def test_resuming_a_run_that_is_still_training_is_refused(tmp_path):
    (tmp_path / "gate.py").write_text(GATE)
    cfg = dict(CFG, callbacks=[{"class": "gate:Gate", "args": {"step": 5, "folder": str(tmp_path)}}])
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    run = tmp_path / "run"
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3",
               PYTHONPATH=str(tmp_path) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "gradlab.cli", "run"]
    first = subprocess.Popen(cmd + [str(tmp_path / "c.yaml"), "--run-dir", str(run), "--quiet"], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(tmp_path / "ready", first, "step 5")  # training, with a checkpoint at step 4
        assert json.loads((run / "state.json").read_text())["status"] == "running"
        second = subprocess.run(cmd + ["--resume", str(run), "--quiet"], env=env, capture_output=True, text=True,
                                timeout=300)
        assert second.returncode == 2, second.stderr[-2000:]
        assert [line for line in second.stderr.splitlines() if line.strip()] == [
            f"{run} is in use by another gradlab process (pid {first.pid})"]
    finally:
        (tmp_path / "go").touch()
        _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err[-2000:]
    assert json.loads((run / "metrics.json").read_text())["status"] == "completed"
    assert _duplicates(run) == []


def test_a_locked_run_directory_is_not_resumed_and_is_resumable_once_released(tmp_path):
    run = tmp_path / "run"
    # a run killed before its first checkpoint: config.yaml, state "running"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump(CFG))
    (run / "state.json").write_text(json.dumps({"status": "running", "step": 0}))
    held = resume_mod.lock_run_dir(run)  # another process's lock (flock: one per open file, also in-process)
    try:
        with pytest.raises(RunDirError) as info:
            gradlab.run(resume=run, quiet=True, verbose=0)
        assert str(info.value) == f"{run} is in use by another gradlab process (pid {os.getpid()})"
        assert json.loads((run / "state.json").read_text()) == {"status": "running", "step": 0}  # untouched
    finally:
        held.release()
    result = gradlab.run(resume=run, quiet=True, verbose=0)  # released (as by a dead process): resumable
    assert result.metrics["status"] == "completed"


def test_without_fcntl_runs_are_not_locked(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "fcntl", None)  # as on Windows: `import fcntl` fails
    first = resume_mod.lock_run_dir(tmp_path)
    second = resume_mod.lock_run_dir(tmp_path)  # no error: degraded, documented
    first.release()
    second.release()
    assert not (tmp_path / resume_mod.LOCK_FILE).exists()
