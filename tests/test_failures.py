"""Failure modes: each is one line and loses nothing (unwritable log_dir, disk full, Ctrl-C).

A dead worker is tested in test_multiworker.py. The full disk is simulated by injecting
``OSError(ENOSPC)`` into the second checkpoint write (no tiny filesystem is needed, so the test
runs anywhere, also unprivileged); the run must stop with a one-line error, keep the first
checkpoint, and resume from it to the same weights as an uninterrupted run.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time

import pytest

import gradlab
from gradlab import resume as resume_mod
from gradlab.errors import RunDirError, StorageError

CFG = {
    "name": "fail", "seed": 1,
    "data": {"name": "synthetic", "samples": 120, "batch_size": 8},
    "model": {"kind": "softmax_linear"},
    "train": {"epochs": 3, "checkpoint_every": 5, "optimizer": "adam", "learning_rate": 0.05},
    "diagnostics": [{"type": "gradient_stats", "every": 3}],
}


def test_unwritable_log_dir_is_one_line_before_training(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(RunDirError) as info:
        gradlab.run(dict(CFG, log_dir=str(blocker / "runs")), quiet=True)
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith("log_dir: cannot create") and str(blocker) in msg
    proc = subprocess.run([sys.executable, "-m", "gradlab.cli", "run", "configs/default.yaml",
                           f"log_dir={blocker}/runs", "train.epochs=1"], capture_output=True, text=True,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                          env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"), timeout=120)
    assert proc.returncode == 2
    assert [line for line in proc.stderr.splitlines() if line.strip()] == [
        f"log_dir: cannot create '{blocker}/runs' (Not a directory)"]


def test_disk_full_at_a_checkpoint_keeps_the_last_one_and_resumes_exactly(tmp_path, monkeypatch):
    ref = gradlab.run(CFG, run_dir=tmp_path / "ref", quiet=True, verbose=0)
    calls = {"n": 0}
    real_save = resume_mod.Checkpointer.save

    def full_disk(self, step, per_epoch):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(self, step, per_epoch)

    monkeypatch.setattr(resume_mod.Checkpointer, "save", full_disk)
    run = tmp_path / "run"
    with pytest.raises(StorageError) as info:
        gradlab.run(CFG, run_dir=run, quiet=True, verbose=0)
    msg = str(info.value)
    assert "\n" not in msg and "No space left on device" in msg and "step 10" in msg
    assert "the last good checkpoint (step 5) is intact" in msg and f"gradlab run --resume {run}" in msg
    assert json.loads((run / "metrics.json").read_text())["status"] == "failed"
    monkeypatch.setattr(resume_mod.Checkpointer, "save", real_save)
    result = gradlab.run(resume=run, quiet=True, verbose=0)
    assert result.metrics["resumed_from_step"] == 5
    assert result.metrics["weights_sha256"] == ref.metrics["weights_sha256"]


def test_disk_full_at_the_first_checkpoint_leaves_a_run_that_resumes_from_step_0(tmp_path, monkeypatch, capfd):
    """The first save fails halfway (a torn index and TensorFlow's shard directory, as a full
    disk leaves them): the run stops in one line, the torn files are removed, and the resume
    starts from step 0 and reaches the uninterrupted run's weights. A torn save that nobody could
    clean up (a killed process) is skipped with a warning."""
    ref = gradlab.run(CFG, run_dir=tmp_path / "ref", quiet=True, verbose=0)
    real_save = resume_mod.Checkpointer.save

    def torn(self, step, per_epoch):
        (self.directory / f"ckpt-{step}_temp").mkdir(parents=True, exist_ok=True)
        (self.directory / f"ckpt-{step}_temp" / "part-00000-of-00001.data-00000-of-00001").write_bytes(b"x" * 10)
        (self.directory / f"ckpt-{step}.index").write_bytes(b"")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    run = tmp_path / "run"
    with monkeypatch.context() as m:
        m.setattr(resume_mod.Checkpointer, "save", torn)
        with pytest.raises(StorageError, match=r"step 5 \(No space left on device\); no checkpoint was completed before \(a resume starts from step 0\) -- free space"):
            gradlab.run(CFG, run_dir=run, quiet=True, verbose=0)
    assert not list((run / "checkpoints").glob("ckpt-5*")), "the torn checkpoint was left behind"
    # what a process killed in the middle of a save leaves, which no one could remove
    (run / "checkpoints" / "ckpt-5_temp").mkdir()
    (run / "checkpoints" / "ckpt-5.index").write_bytes(b"")
    capfd.readouterr()
    assert resume_mod.Checkpointer.save is real_save
    result = gradlab.run(resume=run, quiet=True, verbose=0)
    warned = capfd.readouterr().err
    assert f"checkpoint {run / 'checkpoints' / 'ckpt-5'} was never completed" in warned, warned
    assert "resumed_from_step" not in result.metrics
    assert result.metrics["steps"] == ref.metrics["steps"]
    assert result.metrics["weights_sha256"] == ref.metrics["weights_sha256"]


def test_a_save_that_fails_after_writing_its_checkpoint_keeps_it(tmp_path, monkeypatch):
    """A failure in the checkpoint manager's bookkeeping after the checkpoint itself was written
    (updating its index file, deleting the oldest one): that checkpoint is whole, is not
    discarded as torn, and the resume continues from it."""
    ref = gradlab.run(CFG, run_dir=tmp_path / "ref", quiet=True, verbose=0)
    real_save = resume_mod.Checkpointer.save
    calls = {"n": 0}

    def written_then_failed(self, step, per_epoch):
        path = real_save(self, step, per_epoch)
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return path

    run = tmp_path / "run"
    with monkeypatch.context() as m:
        m.setattr(resume_mod.Checkpointer, "save", written_then_failed)
        with pytest.raises(StorageError, match=r"step 10 \(No space left on device\)"):
            gradlab.run(CFG, run_dir=run, quiet=True, verbose=0)
    assert (run / "checkpoints" / "ckpt-10.index").is_file()
    result = gradlab.run(resume=run, quiet=True, verbose=0)
    assert result.metrics["resumed_from_step"] == 10
    assert result.metrics["weights_sha256"] == ref.metrics["weights_sha256"]


STOP_SIGNALS = [getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name)]


@pytest.mark.parametrize("signum", STOP_SIGNALS)
def test_a_stop_signal_saves_a_checkpoint_and_prints_the_resume_command(tmp_path, signum):
    """Ctrl-C, and what `kill`, `timeout`, docker, Slurm or a closed terminal send."""
    cfg = dict(CFG, train=dict(CFG["train"], epochs=200, checkpoint_every=1000))
    path = tmp_path / "c.json"
    path.write_text(json.dumps(cfg))  # JSON is YAML
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "gradlab.cli", "run", str(path), "--run-dir", str(run), "--quiet"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
    t0 = time.time()
    while not list((run / "train").glob("events.out.tfevents.*")) if run.exists() else True:
        assert time.time() - t0 < 120 and proc.poll() is None
        time.sleep(0.05)
    time.sleep(0.5)
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-2000:]
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("gradlab: interrupted at step ")
    assert lines[0].endswith(f"resume with: gradlab run --resume {run}")
    step = int(lines[0].split("step ")[1].split(";")[0])
    assert (run / "checkpoints" / f"ckpt-{step}.index").exists()
    state = json.loads((run / "state.json").read_text())
    assert state["status"] == "interrupted" and state["step"] == step


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_stopping_a_sweep_lets_the_running_run_save_a_checkpoint(tmp_path, signum):
    cfg = dict(CFG, train=dict(CFG["train"], epochs=200, checkpoint_every=1000),
               sweep={"train.learning_rate": [0.05, 0.01]})
    path = tmp_path / "s.json"
    path.write_text(json.dumps(cfg))
    root = tmp_path / "sweep"
    proc = subprocess.Popen([sys.executable, "-m", "gradlab.cli", "sweep", str(path), "--sweep-dir", str(root)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
    t0 = time.time()
    while not list(root.glob("*/train/events.out.tfevents.*")):
        assert time.time() - t0 < 120 and proc.poll() is None
        time.sleep(0.05)
    time.sleep(0.5)
    # the sweep only, as a terminal's Ctrl-C or a kill reaches it (its runs have their own session)
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    summary = json.loads((root / "sweep.json").read_text())
    first, second = summary["runs"]
    assert first["status"] == "interrupted" and first["exit_code"] == 130 and second["status"] == "not run"
    run = root / first["name"]
    state = json.loads((run / "state.json").read_text())
    assert state["status"] == "interrupted"
    assert (run / "checkpoints" / f"ckpt-{state['step']}.index").exists()


def test_ctrl_c_before_training_started_is_still_resumable(tmp_path, monkeypatch):
    from gradlab import plugins
    from gradlab.errors import RunInterrupted

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    cfg = dict(CFG, train=dict(CFG["train"], epochs=1))
    with monkeypatch.context() as m:
        m.setattr(plugins, "build_callbacks", interrupted)
        with pytest.raises(RunInterrupted, match=f"before training started; resume with: gradlab run --resume {tmp_path / 'r'}"):
            gradlab.run(cfg, run_dir=tmp_path / "r", quiet=True)
    assert json.loads((tmp_path / "r" / "state.json").read_text())["status"] == "interrupted"
    result = gradlab.run(None, resume=tmp_path / "r", quiet=True)
    assert result.metrics["status"] == "completed" and result.metrics["steps"] == 15


def test_a_file_where_a_directory_should_be_is_named_as_one(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("keep me")
    with pytest.raises(RunDirError, match=r"--run-dir .*afile: is a file, not a directory"):
        gradlab.run(CFG, run_dir=afile, quiet=True)
    with pytest.raises(RunDirError, match=r"log_dir: '.*afile' is a file, not a directory"):
        gradlab.run(dict(CFG, log_dir=str(afile)), quiet=True)
    assert afile.read_text() == "keep me"


def test_a_sweep_run_past_its_timeout_is_failed_and_resumable(tmp_path):
    """--timeout stops a run with SIGTERM: the run saves a checkpoint on its way out, and the
    sweep records it as failed (timed out), with the command that resumes it. (A run is
    training ~3 s after the sweep starts it on this machine: 12 s leave it time to be in fit.)"""
    cfg = dict(CFG, train=dict(CFG["train"], epochs=2000, checkpoint_every=1000), sweep={"seed": [0]})
    path = tmp_path / "s.json"
    path.write_text(json.dumps(cfg))
    root = tmp_path / "sweep"
    proc = subprocess.run([sys.executable, "-m", "gradlab.cli", "sweep", str(path), "--sweep-dir", str(root),
                           "--timeout", "12"], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
    assert proc.returncode == 1, proc.stderr[-2000:]
    (record,) = json.loads((root / "sweep.json").read_text())["runs"]
    run = root / record["name"]
    assert record["status"] == "failed" and record["error"].startswith("stopped after the --timeout of 12 seconds")
    assert json.loads((run / "metrics.json").read_text())["status"] == "failed"
    state = json.loads((run / "state.json").read_text())
    assert state["status"] == "interrupted", state  # it was given the time to save its checkpoint
    assert (run / "checkpoints" / f"ckpt-{state['step']}.index").exists()
    assert record["error"].endswith(f"(resume it with: gradlab run --resume {run})")


@pytest.mark.skipif(not hasattr(signal, "SIGHUP"), reason="no SIGHUP on this platform")
def test_a_run_started_under_nohup_keeps_ignoring_sighup(tmp_path):
    """nohup (or a caller) ignores SIGHUP so that the run outlives its terminal: gradlab leaves
    that choice alone, and Ctrl-C still works."""
    cfg = dict(CFG, train=dict(CFG["train"], epochs=200, checkpoint_every=1000))
    path = tmp_path / "c.json"
    path.write_text(json.dumps(cfg))
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "gradlab.cli", "run", str(path), "--run-dir", str(run), "--quiet"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"),
                            preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN))
    t0 = time.time()
    while not list((run / "train").glob("events.out.tfevents.*")) if run.exists() else True:
        assert time.time() - t0 < 120 and proc.poll() is None
        time.sleep(0.05)
    time.sleep(0.5)
    proc.send_signal(signal.SIGHUP)
    time.sleep(2.0)
    assert proc.poll() is None, "SIGHUP stopped a run that was started ignoring it"
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-2000:]
