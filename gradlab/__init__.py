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

_HOMES = {"run": "experiment", "RunResult": "experiment", "Experiment": "config", "load_config": "config",
          "ConfigError": "errors", "GradlabError": "errors"}


def __getattr__(name):
    # Everything is imported on first use, so that `import gradlab` (and the `gradlab` command
    # before it sets up its Ctrl-C handling) is nearly free.
    import importlib
    import importlib.util

    home = _HOMES.get(name)
    if home is not None:
        return getattr(importlib.import_module(f"gradlab.{home}"), name)
    if not name.startswith("_") and importlib.util.find_spec(f"gradlab.{name}") is not None:
        return importlib.import_module(f"gradlab.{name}")  # `gradlab.config` as before: a submodule
    raise AttributeError(f"module 'gradlab' has no attribute {name!r}")
