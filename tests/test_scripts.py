"""The scripts a user runs: the seed reproduction must pass; the benchmark must run (not timed here)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import ROOT


def test_reproduce_seed_script_passes():
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "reproduce_seed.py")], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "all checks hold" in proc.stdout
    assert proc.stdout.count("[ok]") >= 20 and "[FAIL]" not in proc.stdout


def test_bench_script_runs_and_prints_ratios():
    """A smoke run on tiny data: the script works end to end, the lockstep block included. Its
    figures are not asserted (noisy machine)."""
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench.py"), "--samples", "1024", "--rounds", "1",
                           "--block", "step,lockstep"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "gradlab GradientTape step, batch 256" in proc.stdout and "x" in proc.stdout
    lockstep = proc.stdout.split("[lockstep]", 1)[1]  # the step-interleaved block (Keras's fit loop, by hand)
    for label in ("gradlab, default diagnostics", "gradlab, gradient_stats every step", "control: no diagnostics again"):
        assert label in lockstep


def test_readme_config_reference_is_current():
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "update_readme.py"), "--check"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("xla", [False, True])
def test_bench_floor_computes_the_statistics_it_stands_for(xla):
    """The floor rows of scripts/bench.py are a lower bound only if FloorSGD really does the
    statistics' arithmetic on the step's own gradients, on due steps only: checked against numpy
    on gradients from a second tape (also its XLA-fused variant)."""
    import numpy as np
    import tensorflow as tf

    sys.path.insert(0, str(ROOT / "scripts"))
    import bench

    x, y = bench.make_data(512, seed=3)
    model, loss = bench.make_model("floor")
    model.stats_every = 2
    optimizer = bench.FloorSGD(0.01, n_variables=len(model.trainable_variables), xla=xla)
    model.compile(optimizer=optimizer, loss=loss, jit_compile=False)

    def expected(xb, yb):
        before = [v.numpy() for v in model.trainable_variables]
        with tf.GradientTape() as tape:
            value = loss(yb, model(xb, training=True))
        grads = [g.numpy().ravel() for g in tape.gradient(value, model.trainable_variables)]
        return ([float(np.sum(g.astype(np.float64) ** 2)) for g in grads],
                [[g.sum() for g in grads], [g.max() for g in grads], [g.min() for g in grads],
                 [float(np.sum(g == 0)) for g in grads], [float(np.sum(w.astype(np.float64) ** 2)) for w in before]])

    norms, stats = expected(x[:256], y[:256])
    model.fit(x[:256], y[:256], batch_size=256, epochs=1, shuffle=False, verbose=0)  # step 0: due
    np.testing.assert_allclose(optimizer.kept_norms.numpy(), norms, rtol=1e-4)
    np.testing.assert_allclose(optimizer.kept_stats.numpy(), stats, rtol=1e-4, atol=1e-6)
    norms, _ = expected(x[256:], y[256:])
    model.fit(x[256:], y[256:], batch_size=256, epochs=1, shuffle=False, verbose=0)  # step 1: not due
    np.testing.assert_allclose(optimizer.kept_norms.numpy(), norms, rtol=1e-4)
    np.testing.assert_allclose(optimizer.kept_stats.numpy(), stats, rtol=1e-4, atol=1e-6)  # unchanged
    assert int(optimizer.iterations.numpy()) == 2
