"""A real TensorBoard server serves the gradient scalars of a gradlab run over its HTTP API."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

import gradlab
from gradlab.events import read_scalars

TENSORBOARD = Path(sys.executable).with_name("tensorboard")
START_TIMEOUT = 90.0  # seconds for the server to load the run


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get_json(url: str):
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read().decode())


@pytest.mark.skipif(not TENSORBOARD.exists(), reason="the tensorboard console script is not installed in this environment")
def test_tensorboard_serves_gradient_scalars(tmp_path):
    cfg = {"name": "tb", "seed": 0, "data": {"name": "iris", "batch_size": 50, "shuffle": False},
           "model": {"kind": "mlp", "hidden": [8], "activation": "tanh"},
           "train": {"epochs": 4, "learning_rate": 0.1},
           "diagnostics": [{"type": "gradient_stats", "every": 3, "histogram_every": 0}]}
    run_dir = gradlab.run(cfg, run_dir=tmp_path / "run", quiet=True).run_dir
    expected = read_scalars(run_dir, "train")["gradients/hidden_1/kernel/norm"]

    port = _free_port()
    proc = subprocess.Popen([str(TENSORBOARD), "--logdir", str(run_dir), "--host", "127.0.0.1", "--port", str(port),
                             "--reload_interval", "1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
                            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    base = f"http://127.0.0.1:{port}"
    tag = "gradients/hidden_1/kernel/norm"
    try:
        deadline = time.monotonic() + START_TIMEOUT
        data, last_error = None, None
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"tensorboard exited with {proc.returncode}: {proc.stderr.read().decode()[-2000:]}")
            try:
                tags = _get_json(f"{base}/data/plugin/scalars/tags")
                if tag in tags.get("train", {}):
                    query = urllib.parse.urlencode({"run": "train", "tag": tag})
                    data = _get_json(f"{base}/data/plugin/scalars/scalars?{query}")
                    if len(data) == len(expected):
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError, json.JSONDecodeError) as err:
                last_error = err
            time.sleep(0.5)
        else:
            pytest.fail(f"tensorboard did not serve {tag} within {START_TIMEOUT:.0f}s (last error: {last_error})")
        tags = _get_json(f"{base}/data/plugin/scalars/tags")["train"]
        assert {"gradients/global_norm", "gradients/logits/norm", "gradients/hidden_1/layer_norm"} <= set(tags)
        # each point is [wall_time, step, value]
        assert [(step, value) for _, step, value in data] == [(s, pytest.approx(v, rel=1e-6)) for s, v in expected]
        assert [s for s, _ in expected] == [0, 3, 6, 9]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        proc.stderr.close()
    assert proc.returncode is not None
