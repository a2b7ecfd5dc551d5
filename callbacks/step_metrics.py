"""step_metrics: the training loss per step, exact, from the step itself.

Tags, every ``every`` steps: ``step/loss`` (mean of the per-step losses since the previous
write), ``step/loss_max`` and ``step/loss_last``; plus ``step/<metric>`` for each Keras metric
in the logs (Keras reports the running mean over the epoch so far, e.g. ``step/accuracy``).

For a :class:`gradlab.train_step.GradlabModel` the loss comes from a tap, so every step counts
even with ``steps_per_execution > 1``. For other models the Keras logs are written.
"""

from __future__ import annotations

from gradlab.callbacks.base import Diagnostic, register
from gradlab.train_step import Tap


@register("step_metrics")
class StepMetrics(Diagnostic):
    """Per-step loss and metrics (see the module docstring)."""

    uses_tap = True

    def make_tap(self, model):
        # A due output (the due step's loss) makes the step capture the window at each due step, so
        # a write covers the steps since the previous due step also with steps_per_execution > 1.
        return Tap(every_step=lambda inp: {"loss": inp.loss}, on_due=lambda inp: {"loss": inp.loss},
                   every=self.every)

    def write_tap(self, step, values):
        w = values["window"].get("loss")
        if w:
            self.scalar("step/loss", w["mean"], step)
            self.scalar("step/loss_max", w["max"], step)
            self.scalar("step/loss_last", w["last"], step)

    def on_train_batch_end(self, batch, logs=None):
        prev = self._last_step
        super().on_train_batch_end(batch, logs)
        now = self._last_step
        if now <= prev:
            return
        self._last_logs = (logs, now - 1)
        if ((now - 1) // self.every) * self.every >= prev:
            self._write_logs()
            self.flush_scalars()

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        self._last_logs = None  # (Keras logs, step) of the last execution not yet written

    def on_train_end(self, logs=None):
        # The metrics of the last step, like step/loss's last window: the end of training is seen.
        self._write_logs()
        super().on_train_end(logs)

    def _write_logs(self) -> None:
        if not getattr(self, "_last_logs", None):
            return
        logs, step = self._last_logs
        self._last_logs = None
        for name, value in (logs or {}).items():
            if name == "loss" and self._tap_key is not None:
                continue
            try:
                self.scalar(f"step/{name}", float(value), step)
            except (TypeError, ValueError):
                continue
