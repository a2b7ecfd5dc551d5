"""gradlab's diagnostics: Keras callbacks, one per module, written against :mod:`gradlab.callbacks.base`.

Use them from YAML (``diagnostics: [{type: gradient_stats, every: 10}]``) or in Python with any
Keras model::

    from gradlab.callbacks import GradientStats, ActivationSaturation, NonFiniteGuard, Health
    model.fit(x, y, callbacks=[GradientStats(log_dir="logs", every=10, probe_data=(x[:256], y[:256]))])
"""

from gradlab.callbacks.base import Diagnostic, Observations, observations_for, register, registered
from gradlab.callbacks.gradient_stats import GradientStats
from gradlab.callbacks.step_metrics import StepMetrics

__all__ = ["Diagnostic", "Observations", "observations_for", "register", "registered",
           "GradientStats", "StepMetrics"]

# Optional modules register themselves on import; a missing one must not break the others.
for _name, _cls in (("activation_saturation", "ActivationSaturation"), ("nonfinite", "NonFiniteGuard"),
                    ("health", "Health"), ("curvature", "Curvature"), ("gradient_noise", "GradientNoise")):
    try:
        _module = __import__(f"gradlab.callbacks.{_name}", fromlist=[_cls])
    except ModuleNotFoundError as _err:  # not written yet
        if _err.name != f"gradlab.callbacks.{_name}":
            raise
        continue
    globals()[_cls] = getattr(_module, _cls)
    __all__.append(_cls)
