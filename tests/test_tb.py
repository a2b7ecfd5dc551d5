"""gradlab tensorboard and the custom-scalars layout: a real TensorBoard server on 127.0.0.1."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from compare_helpers import BAD, GOOD, shared_sweep
from conftest import gradlab_cli
from gradlab import tb


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    return shared_sweep(tmp_path_factory)[0]


def test_layout_groups_each_layer_charts():
    layout = tb.custom_scalars_layout(["hidden_1", "logits"], activation_layers=["hidden_1"])
    titles = [c.title for c in layout.category]
    assert titles == ["gradlab: overview", "gradlab: layer hidden_1", "gradlab: layer logits"]
    hidden = layout.category[1]
    charts = {c.title: list(c.multiline.tag) for c in hidden.chart}
    assert list(charts) == ["hidden_1: gradient norm", "hidden_1: update ratio",
                            "hidden_1: saturated / dead fraction", "hidden_1: activation mean / std"]
    matches = lambda title, tag: any(re.match(p, tag) for p in charts[title])  # noqa: E731
    assert matches("hidden_1: gradient norm", "gradients/hidden_1/kernel/norm")
    assert matches("hidden_1: gradient norm", "gradients/hidden_1/layer_norm")
    assert not matches("hidden_1: gradient norm", "gradients/hidden_10/kernel/norm")
    assert not matches("hidden_1: gradient norm", "gradients/hidden_1/layer_norm/window_max")
    assert matches("hidden_1: saturated / dead fraction", "activations/hidden_1/dead_fraction")
    assert not matches("hidden_1: saturated / dead fraction", "activations/hidden_1/mean")
    assert [c.title for c in layout.category[2].chart] == ["logits: gradient norm", "logits: update ratio"]


def test_every_run_writes_its_layout(sweep):
    from tensorboard.backend.event_processing import event_accumulator
    from tensorboard.plugins.custom_scalar import layout_pb2, metadata
    from tensorboard.util import tensor_util

    acc = event_accumulator.EventAccumulator(str(sweep / GOOD[0]), size_guidance={"tensors": 0})
    acc.Reload()
    event = acc.Tensors(metadata.CONFIG_SUMMARY_TAG)[0]
    layout = layout_pb2.Layout.FromString(tensor_util.make_ndarray(event.tensor_proto).item())
    assert [c.title for c in layout.category] == ["gradlab: overview", "gradlab: layer hidden_1",
                                                  "gradlab: layer logits"]
    assert len(layout.category[1].chart) == 4  # hidden_1 has an activation: 2 gradient + 2 activation charts


def _get(url: str, data: dict | None = None, timeout: float = 60):
    body = None if data is None else json.dumps(data).encode()
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"} if body else {})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read().decode())


def test_tensorboard_serves_hparams_and_layout_on_localhost(sweep, tmp_path):
    port = tb.free_port()
    exe = Path(sys.executable).with_name("gradlab")
    log = open(tmp_path / "tb.log", "w")
    proc = subprocess.Popen([str(exe), "tensorboard", str(sweep), "--port", str(port)], stdout=log,
                            stderr=subprocess.STDOUT, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    base = f"http://127.0.0.1:{port}"
    try:
        experiment = None
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            try:
                experiment = _get(f"{base}/data/plugin/hparams/experiment", {"experimentName": ""})
                if experiment.get("hparamInfos"):
                    break
            except OSError:
                pass
            time.sleep(1)
        assert experiment and experiment.get("hparamInfos"), (tmp_path / "tb.log").read_text()[-2000:]
        assert {h["name"] for h in experiment["hparamInfos"]} == {"train.loss", "data.path"}
        assert {m["name"]["tag"] for m in experiment["metricInfos"]} >= {"final/loss", "final/accuracy"}

        groups = None
        for _ in range(30):  # sessions appear as the server's reload reaches the run directories
            groups = _get(f"{base}/data/plugin/hparams/session_groups", {
                "startIndex": 0, "sliceSize": 100, "aggregationType": "AGGREGATION_AVG",
                "allowedStatuses": ["STATUS_UNKNOWN", "STATUS_SUCCESS", "STATUS_FAILURE", "STATUS_RUNNING"],
                "colParams": [{"hparam": "train.loss"}, {"hparam": "data.path"},
                              {"metric": {"tag": "final/loss", "group": ""}}]})
            if len(groups.get("sessionGroups", [])) == 4 and all(
                    g["sessions"][0].get("metricValues") for g in groups["sessionGroups"] if g["name"] in GOOD):
                break
            time.sleep(1)
        by_name = {g["name"]: g for g in groups["sessionGroups"]}
        assert set(by_name) == set(GOOD + BAD)
        summary = json.loads((sweep / "sweep.json").read_text())
        for rec in summary["runs"]:
            g = by_name[rec["name"]]
            assert g["hparams"] == rec["values"]
            session = g["sessions"][0]
            if rec["status"] == "completed":
                assert session["status"] == "STATUS_SUCCESS"
                value = {m["name"]["tag"]: m["value"] for m in session["metricValues"]}["final/loss"]
                assert value == pytest.approx(rec["metrics"]["loss"], rel=1e-6)
            else:
                assert session["status"] == "STATUS_FAILURE"

        layout = _get(f"{base}/data/plugin/custom_scalars/layout")
        assert "gradlab: layer hidden_1" in [c["title"] for c in layout["category"]]
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        log.close()
    assert f"at http://127.0.0.1:{port}/" in (tmp_path / "tb.log").read_text()


def test_tensorboard_errors_are_one_line(tmp_path, sweep):
    proc = gradlab_cli("tensorboard", str(tmp_path / "nope"))
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        f"RUN_OR_SWEEP_DIR {str(tmp_path / 'nope')!r}: not a directory (give a run or sweep directory)"]
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        busy = s.getsockname()[1]
        from gradlab.errors import GradlabError

        with pytest.raises(GradlabError, match=rf"^--port {busy}: already in use on 127.0.0.1"):
            tb.launch(sweep, busy)


def test_ctrl_c_stops_tensorboard_with_exit_status_130(sweep, tmp_path):
    """Werkzeug swallows KeyboardInterrupt; gradlab still exits 130 on Ctrl-C, without a traceback."""
    port = tb.free_port()
    exe = Path(sys.executable).with_name("gradlab")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "gradlab.cli"]
    err = open(tmp_path / "stderr.log", "w+")
    proc = subprocess.Popen(cmd + ["tensorboard", str(sweep / GOOD[0]), "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=err, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    try:
        deadline = time.monotonic() + 120  # a bound on the wait for the server, not a timed assertion
        serving = False
        while not serving and time.monotonic() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/data/logdir", timeout=5) as r:
                    serving = r.status == 200
            except OSError:
                time.sleep(0.5)
        assert serving, (tmp_path / "stderr.log").read_text()[-2000:]
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
        log = (tmp_path / "stderr.log").read_text()
        assert proc.returncode == 130, log[-2000:]
        assert "Traceback" not in log and log.strip().splitlines()[-1] == "gradlab: interrupted"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        err.close()


def test_scalars_written_in_a_compiled_function_are_the_callbacks_events(tmp_path):
    """summaries.write_scalars_in_graph builds, in the graph, the same Summary bytes that
    summaries.write_events builds in Python (NaN and negative values included)."""
    import numpy as np
    import tensorflow as tf
    from tensorboard.compat.proto import event_pb2

    from gradlab import summaries

    tags = ["gradients/dense/kernel/norm", "gradients/global_norm", "x/y"]
    values = np.array([1.5, -2.25, np.nan], np.float32)
    in_graph, in_python = summaries.acquire_writer(str(tmp_path / "a")), summaries.acquire_writer(str(tmp_path / "b"))
    tf.function(lambda step, v: summaries.write_scalars_in_graph(in_graph, step, tags, v), autograph=False)(
        tf.constant(7, tf.int64), tf.constant(values))
    summaries.write_events(in_python, [(t, float(v), 7) for t, v in zip(tags, values)])
    summaries.release_writer(str(tmp_path / "a"))
    summaries.release_writer(str(tmp_path / "b"))

    def summaries_in(d):
        out = []
        for f in sorted(d.glob("events*")):
            for record in tf.data.TFRecordDataset(str(f)):
                event = event_pb2.Event.FromString(record.numpy())
                if event.HasField("summary"):
                    out.append((event.step, event.summary.SerializeToString()))
        return out

    written = summaries_in(tmp_path / "a")
    assert len(written) == 1 and written == summaries_in(tmp_path / "b")
