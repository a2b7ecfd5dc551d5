"""gradlab: make gradients visible in TensorFlow/Keras training.

Library entry points (importing ``gradlab`` does not import TensorFlow)::

    import gradlab
    exp = gradlab.load_config("configs/default.yaml", ["train.epochs=5"])  # validates like the CLI
    result = gradlab.run(exp)          # or gradlab.run("configs/x.yaml", ["train.loss=mse"])
    result.run_dir, result.metrics
"""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["run", "load_config", "Experiment", "RunResult", "ConfigError", "GradlabError"]

from gradlab.config import Experiment, load_config
from gradlab.errors import ConfigError, GradlabError


def __getattr__(name):
    if name in ("run", "RunResult"):
        from gradlab import experiment

        return getattr(experiment, name)
    raise AttributeError(f"module 'gradlab' has no attribute {name!r}")
