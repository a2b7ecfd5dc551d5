"""The scripts a user runs: the seed reproduction must pass; the benchmark must run (not timed here)."""

from __future__ import annotations

import subprocess
import sys

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
