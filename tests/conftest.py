"""Shared test helpers: tiny configs, running the CLI as a user would, reading run directories."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SEED_NOTEBOOK = ROOT.parent / "shared" / "seed" / "000_f39b71778de53cac.txt"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def gradlab_cli(*args: str, cwd: str | os.PathLike | None = None, timeout: float = 300,
                env: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``gradlab ARGS`` in a subprocess (the console script of this environment)."""
    exe = Path(sys.executable).with_name("gradlab")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "gradlab.cli"]
    full_env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", **(env or {})}
    return subprocess.run(cmd + list(args), cwd=cwd, capture_output=True, text=True, timeout=timeout, env=full_env)


def tiny_config(**sections) -> dict:
    """A fast experiment (seed classifier on 60 synthetic samples, 2 epochs) with section overrides."""
    cfg = {
        "name": "tiny",
        "seed": 0,
        "data": {"name": "synthetic", "samples": 60, "batch_size": 20, "shuffle": False},
        "model": {"kind": "softmax_linear"},
        "train": {"loss": "cross_entropy", "epochs": 2, "learning_rate": 0.1},
        "diagnostics": [],
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(cfg.get(key), dict):
            cfg[key] = {**cfg[key], **value}
        else:
            cfg[key] = value
    return cfg


def read_metrics(run_dir) -> dict:
    return json.loads((Path(run_dir) / "metrics.json").read_text())


@pytest.fixture
def write_yaml(tmp_path):
    """Write YAML text to a file in tmp_path and return its path."""
    def _write(text: str, name: str = "exp.yaml") -> Path:
        path = tmp_path / name
        path.write_text(text)
        return path
    return _write
