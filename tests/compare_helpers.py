"""Shared by test_sweep, test_report and test_tb: one real sweep per pytest session, run like a user.

The sweep -- 2 losses (the config's ``sweep:`` section) x 2 data files (a command-line axis), one
file broken, ``--jobs 2`` -- is run once through the ``gradlab sweep`` console script; later
callers in the same session reuse its directory.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np

from conftest import gradlab_cli

SWEEP_AXES = ("data.path=good.csv,bad.csv",)
GOOD = ("000-loss=cross_entropy-path=good.csv", "002-loss=mse-path=good.csv")
BAD = ("001-loss=cross_entropy-path=bad.csv", "003-loss=mse-path=bad.csv")


def diagnostics_yaml() -> str:
    """gradient_stats every step, plus the activation/health diagnostics when they are installed."""
    from gradlab.callbacks import registered

    names = registered()
    items = ["{type: gradient_stats, every: 1}"]
    if "activation_saturation" in names:
        items.append("{type: activation_saturation, every: 2}")
    if "health" in names:
        items.append("{type: health}")
    return "[" + ", ".join(items) + "]"


def write_inputs(root: Path) -> Path:
    """A tiny MLP config over a CSV of 3 Gaussian blobs, a good CSV and a broken one (label 7 of 3)."""
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 2, size=(3, 4))
    y = np.arange(48) % 3
    x = centres[y] + rng.normal(0, 0.7, size=(48, 4))
    rows = "\n".join(",".join(f"{v:.4f}" for v in xi) + f",{yi}" for xi, yi in zip(x, y))
    (root / "good.csv").write_text("f1,f2,f3,f4,label\n" + rows + "\n")
    (root / "bad.csv").write_text("f1,f2,f3,f4,label\n" + rows + "\n0.1,0.2,0.3,0.4,7\n")
    cfg = root / "sweep.yaml"
    cfg.write_text(f"""name: compare-test
seed: 0
data: {{name: csv, path: good.csv, classes: 3, batch_size: 12, shuffle: false, validation_split: 0.25}}
model: {{kind: mlp, hidden: [6], activation: tanh}}
train: {{loss: cross_entropy, epochs: 2, learning_rate: 0.2}}
diagnostics: {diagnostics_yaml()}
sweep:
  train.loss: [cross_entropy, mse]
""")
    return cfg


def shared_sweep(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess | None]:
    """``(sweep_dir, completed process)``: the session's sweep, run on first use (~30 s on 2 cores)."""
    root = tmp_path_factory.getbasetemp() / "gradlab-shared-sweep"
    done = root / "done"
    if done.exists():
        return root / "sweep", _RESULT.get("proc")
    root.mkdir(exist_ok=True)
    write_inputs(root)
    proc = gradlab_cli("sweep", "sweep.yaml", *SWEEP_AXES, "--jobs", "2", "--sweep-dir", "sweep", cwd=root,
                       timeout=400)
    _RESULT["proc"] = proc
    done.write_text(str(proc.returncode))
    return root / "sweep", proc


_RESULT: dict = {}
