"""health: plain-language, per-layer verdicts from what the other diagnostics observed.

Health computes nothing on the model. It reads the shared observations of the model
(:func:`gradlab.callbacks.observations_for`): the scalars that ``gradient_stats`` and
``activation_saturation`` wrote, the activation kind of each layer, and ``nonfinite`` events.
A verdict holds for a layer at an observed step when its rule holds; each verdict is reported
once, with the **first step it held** (and the last, if it stopped holding before the end).

Rules, with the constructor argument of each threshold (defaults in brackets):

* **vanishing** -- from ``gradients/<layer>/layer_norm`` ``n_L(t)`` (the L2 norm of all the
  layer's gradients at due step ``t``). It holds when ``n_L(t) < vanishing_norm`` [1e-6] while
  the training loss is above ``converged_loss`` [1e-3] (a converged model legitimately has tiny
  gradients), or when ``n_L(t) / max_K n_K(t) < vanishing_ratio`` [1e-3] (tiny relative to the
  largest layer at the same step; never for the largest layer itself, so not for a model with
  one layer). All-zero gradients (``max_K n_K = 0``) count under the absolute rule.
* **exploding** -- from ``gradients/<layer>/layer_norm/window_max`` (the largest norm of every
  step in the window, gradlab runs) or else ``layer_norm``. It holds at a value ``v`` when
  ``v`` is NaN/Inf, or when at least ``exploding_min_history`` [3] earlier values exist and
  ``v > exploding_factor`` [10] times the median of the last ``exploding_window`` [10] earlier
  finite values (a median of 0 never triggers). A ``nonfinite`` event (NaN/Inf loss or
  gradient, see :mod:`gradlab.callbacks.nonfinite`) is an exploding verdict for the layer it
  names, at its exact step. And it holds when a layer's update is far larger than its weights:
  ``gradients/<layer>/<variable>/update_ratio = ||Δw|| / ||w|| > exploding_update_ratio`` [10]
  (or NaN/Inf: the norms overflowed float32) at two due steps in a row (a single one is the
  first update of weights initialised tiny), for any variable but the additive offsets
  (``bias``, ``beta``: they start at zero, where a small update is a large ratio). This catches divergence that the gradient norms do not show:
  cross-entropy's gradient is bounded by the inputs, so with a huge learning rate the weights
  (and the loss) blow up while every gradient norm stays ordinary.
* **dead** -- relu layers (``meta["activation"][layer] == "relu"``): ``activations/<layer>/
  dead_fraction > dead_fraction`` [0.5], i.e. most units are zero for every probe sample.
* **saturated** -- sigmoid/tanh layers: ``activations/<layer>/saturated_fraction >
  saturated_fraction`` [0.5], i.e. most unit activations have a local derivative below the
  ``activation_saturation`` threshold.

A verdict is a dict ``{"layer", "verdict", "first_step", "last_step", "value", "message"}``
(``value`` is the statistic at ``last_step``), e.g.
``hidden_1: 97% of sigmoid units saturated from step 40``. Verdicts are written as a markdown
table to the TensorBoard text tag ``health/verdicts`` (when they change, at the due steps, and
at the end of training), returned by :meth:`Health.verdicts` and, in a gradlab run, printed as
a table at the end and stored in ``metrics.json`` under ``"verdicts"``.

Health needs the other diagnostics on the same model (and before it in the callback list, so
it sees their latest values); without them it has nothing to judge and reports no verdicts.
"""

from __future__ import annotations

import bisect
import math
import statistics
from typing import Mapping, Sequence

from gradlab.callbacks.base import Diagnostic, check_int, check_number, register

VERDICTS = ("vanishing", "exploding", "dead", "saturated")
# Variables that start at zero and shift a layer's output: a small update is a large ratio there.
OFFSET_VARIABLES = ("bias", "beta")
LOSS_SERIES = "health/_loss"  # training loss from Keras's logs (observations only, never written)


def _layer_series(series: Mapping[str, Sequence], prefix: str, suffix: str) -> dict[str, list]:
    out = {}
    for tag, values in series.items():
        if tag.startswith(prefix) and tag.endswith(suffix):
            layer = tag[len(prefix): len(tag) - len(suffix)]
            if layer and values:
                out[layer] = sorted(values)
    return out


class _Track:
    """First/last step a rule held for one (layer, verdict)."""

    def __init__(self):
        self.first = self.last = None
        self.value = None
        self.extra: dict = {}

    def hold(self, step: int, value: float, **extra) -> None:
        """The rule held at ``step``. Several rules (and variables) may feed one track, each in
        step order but not in step order together: the first and last step are the min and max,
        and the value and details are those of the latest step."""
        if self.first is None or step < self.first:
            self.first = step
        if self.last is None or step >= self.last:
            self.last, self.value = step, value
            if extra:
                self.extra = extra


def judge(series: Mapping[str, Sequence[tuple[int, float]]], kinds: Mapping[str, str] | None = None,
          events: Sequence[Mapping] = (), *, vanishing_norm: float = 1e-6, vanishing_ratio: float = 1e-3,
          converged_loss: float = 1e-3, exploding_factor: float = 10.0, exploding_window: int = 10,
          exploding_min_history: int = 3, exploding_update_ratio: float = 10.0, dead_fraction: float = 0.5,
          saturated_fraction: float = 0.5) -> list[dict]:
    """The verdicts for observed ``series`` (``{tag: [(step, value), ...]}``); see the module docstring.

    ``kinds`` maps a layer to its activation kind; ``events`` are observation events (only
    ``kind == "nonfinite"`` ones are used). Pure: the tests call it directly.
    """
    kinds = dict(kinds or {})
    tracks: dict[tuple[str, str], _Track] = {}
    last_seen: dict[str, int] = {}

    def track(layer: str, verdict: str) -> _Track:
        return tracks.setdefault((layer, verdict), _Track())

    # -- vanishing
    norms = _layer_series(series, "gradients/", "/layer_norm")
    loss = sorted(series.get(LOSS_SERIES, ()))
    by_step: dict[int, dict[str, float]] = {}
    for layer, values in norms.items():
        for step, value in values:
            by_step.setdefault(step, {})[layer] = value
        last_seen[f"{layer}:vanishing"] = values[-1][0]

    loss_steps = [s for s, _ in loss]

    def loss_at(step: int) -> float | None:
        """The last loss recorded at or before ``step`` (the first one before any); a binary
        search, so judging stays linear in the length of the run (it was quadratic)."""
        if not loss:
            return None
        i = bisect.bisect_right(loss_steps, step)
        return loss[i - 1][1] if i else loss[0][1]

    for step in sorted(by_step):
        layer_norms = by_step[step]
        finite = {k: v for k, v in layer_norms.items() if math.isfinite(v)}
        if not finite:
            continue
        big_layer = max(finite, key=finite.get)
        big = finite[big_layer]
        current_loss = loss_at(step)
        not_converged = current_loss is None or not math.isfinite(current_loss) or current_loss > converged_loss
        for layer, value in finite.items():
            absolute = value < vanishing_norm and not_converged
            relative = big > 0 and layer != big_layer and value / big < vanishing_ratio
            if absolute or relative:
                track(layer, "vanishing").hold(step, value, ratio=(value / big if big > 0 else 0.0), largest=big_layer)

    # -- exploding: jumps
    window_max = _layer_series(series, "gradients/", "/layer_norm/window_max")
    for layer in set(norms) | set(window_max):
        values = window_max.get(layer) or norms.get(layer, [])
        history: list[float] = []
        for step, value in values:
            if not math.isfinite(value):
                track(layer, "exploding").hold(step, value, reason="nonfinite")
            elif len(history) >= exploding_min_history:
                median = statistics.median(history[-exploding_window:])
                if median > 0 and value > exploding_factor * median:
                    track(layer, "exploding").hold(step, value, reason="jump", median=median)
            if math.isfinite(value):
                history.append(value)
        if values:
            last_seen[f"{layer}:exploding"] = values[-1][0]
    # -- exploding: updates far larger than the weights they change, at two due steps in a row
    # (one alone is the first update of weights initialised tiny: Adam moves each by ~lr)
    for tag, values in series.items():
        if not (tag.startswith("gradients/") and tag.endswith("/update_ratio")):
            continue
        layer, _, variable = tag[len("gradients/"):-len("/update_ratio")].rpartition("/")
        if not layer or variable in OFFSET_VARIABLES:
            continue
        values = sorted(values)
        big = [not math.isfinite(v) or v > exploding_update_ratio for _, v in values]  # inf, NaN: overflowed
        for i, (step, value) in enumerate(values):
            if big[i] and ((i > 0 and big[i - 1]) or (i + 1 < len(values) and big[i + 1])):
                # (written at due steps only: holding at the last one, it holds to the end)
                track(layer, "exploding").hold(step, value, reason="update", variable=variable,
                                               to_the_end=i == len(values) - 1)
        if values:
            last_seen[f"{layer}:exploding"] = max(last_seen.get(f"{layer}:exploding", -1), max(s for s, _ in values))

    # -- exploding: nonfinite events (exact step)
    for event in events:
        if event.get("kind") != "nonfinite":
            continue
        layer = event.get("layer") or "loss"
        t = track(layer, "exploding")
        step = int(event["step"])
        if t.first is None or step < t.first:
            t.first = step
            t.extra = {"reason": "event", "event": dict(event)}
            t.value = math.nan
        t.last = max(t.last if t.last is not None else step, step)
        last_seen[f"{layer}:exploding"] = max(last_seen.get(f"{layer}:exploding", step), step)

    # -- dead and saturated
    for verdict, stat, threshold, allowed in (("dead", "dead_fraction", dead_fraction, ("relu",)),
                                              ("saturated", "saturated_fraction", saturated_fraction,
                                               ("sigmoid", "tanh"))):
        for layer, values in _layer_series(series, "activations/", f"/{stat}").items():
            if kinds.get(layer) not in allowed:
                continue
            for step, value in values:
                if value > threshold:
                    track(layer, verdict).hold(step, value)
            last_seen[f"{layer}:{verdict}"] = values[-1][0]

    verdicts = []
    for (layer, verdict), t in tracks.items():
        if t.first is None:
            continue
        ended = t.last is not None and t.last < last_seen.get(f"{layer}:{verdict}", t.last)
        ended = ended and not t.extra.get("to_the_end", False)
        verdicts.append({"layer": layer, "verdict": verdict, "first_step": int(t.first), "last_step": int(t.last),
                         "value": None if t.value is None or not math.isfinite(t.value) else float(t.value),
                         "message": _message(layer, verdict, t, kinds.get(layer), ended)})
    verdicts.sort(key=lambda v: (v["first_step"], VERDICTS.index(v["verdict"]), v["layer"]))
    return verdicts


def _message(layer: str, verdict: str, t: _Track, kind: str | None, ended: bool) -> str:
    # "from step F" while it still holds; "at step F" for a one-off; "from step F (until step L)"
    when = f"at step {t.first}" if ended and t.last == t.first else (
        f"from step {t.first}" + (f" (until step {t.last})" if ended else ""))
    if verdict == "saturated":
        return f"{layer}: {t.value:.0%} of {kind} units saturated {when}"
    if verdict == "dead":
        return f"{layer}: {t.value:.0%} of {kind} units dead {when}"
    if verdict == "vanishing":
        largest = t.extra.get("largest")
        rel = "" if largest in (None, layer) else f", {t.extra.get('ratio', 0.0):.1e} of {largest}'s"
        return f"{layer}: gradient vanishing {when} (norm {t.value:.1e}{rel})"
    # exploding
    reason = t.extra.get("reason")
    if reason == "event":
        event = t.extra["event"]
        where = f"{event.get('layer')}/{event.get('variable')}" if event.get("layer") else "the loss"
        what = "loss" if event.get("what") == "loss" else "gradient"
        return f"{layer}: {what} became {event.get('value', 'nonfinite')} at step {t.first} ({where})"
    if reason == "nonfinite":
        return f"{layer}: gradient norm became nonfinite {when}"
    if reason == "update":
        if not math.isfinite(t.value):  # ||Δw|| (and ||w||) beyond float32's range
            return f"{layer}: updates too large for float32 ({t.extra.get('variable')}: update_ratio {t.value}) {when}"
        return f"{layer}: updates {t.value:.3g}x the size of the weights ({t.extra.get('variable')}) {when}"
    median = t.extra.get("median", 0.0)
    return f"{layer}: gradient norm jumped to {t.value:.3g} ({t.value / median:.0f}x its recent median {median:.3g}) {when}"


def markdown_table(verdicts: Sequence[Mapping]) -> str:
    """The verdicts as a markdown table (what ``health/verdicts`` shows)."""
    if not verdicts:
        return "No verdicts: no layer vanished, exploded, died or saturated."
    rows = ["| layer | verdict | first step | message |", "|---|---|---|---|"]
    rows += [f"| {v['layer']} | {v['verdict']} | {v['first_step']} | {v['message']} |" for v in verdicts]
    return "\n".join(rows)


@register("health")
class Health(Diagnostic):
    """Per-layer verdicts: vanishing, exploding, dead, saturated (thresholds in the module docstring).

    Args:
        log_dir: TensorBoard directory (``None``: don't write).
        every: re-judge every this many steps and write ``health/verdicts`` when they changed.
            Judging reads the whole history (linear in the steps so far), so in long runs the
            re-judging interval grows to 2% of the steps so far (from step 2,500 with the default
            50): the table in TensorBoard refreshes less often, the total cost stays linear in the
            run length, and the verdicts (their first steps) are the same. The end of training
            always judges.
        vanishing_norm, vanishing_ratio, converged_loss, exploding_factor, exploding_window,
        exploding_min_history, exploding_update_ratio, dead_fraction, saturated_fraction: see
        :func:`judge`.
    """

    schedule_options = ()  # `every` is a re-judging cadence: any value works between executions

    def __init__(self, *, log_dir: str | None = None, every: int = 50, vanishing_norm: float = 1e-6,
                 vanishing_ratio: float = 1e-3, converged_loss: float = 1e-3, exploding_factor: float = 10.0,
                 exploding_window: int = 10, exploding_min_history: int = 3,
                 exploding_update_ratio: float = 10.0, dead_fraction: float = 0.5,
                 saturated_fraction: float = 0.5, probe_data=None, probe_size: int = 256):
        super().__init__(log_dir=log_dir, every=every, probe_data=probe_data, probe_size=probe_size)
        self.thresholds = {
            "vanishing_norm": check_number("vanishing_norm", vanishing_norm),
            "vanishing_ratio": check_number("vanishing_ratio", vanishing_ratio, below_one=True),
            "converged_loss": check_number("converged_loss", converged_loss),
            "exploding_factor": check_number("exploding_factor", exploding_factor),
            "exploding_window": check_int("exploding_window", exploding_window),
            "exploding_min_history": check_int("exploding_min_history", exploding_min_history),
            "exploding_update_ratio": check_number("exploding_update_ratio", exploding_update_ratio),
            "dead_fraction": check_number("dead_fraction", dead_fraction, below_one=True),
            "saturated_fraction": check_number("saturated_fraction", saturated_fraction, below_one=True),
        }
        if self.thresholds["exploding_factor"] <= 1:
            raise ValueError(f"`exploding_factor` ({exploding_factor!r}) must be greater than 1")
        self._written: list | None = None
        self._final: list[dict] | None = None
        self._judged_at: int | None = None

    def on_train_begin(self, logs=None):
        self._written, self._final, self._judged_at = None, None, None
        super().on_train_begin(logs)

    def on_train_batch_end(self, batch, logs=None):
        prev = self._last_step
        super().on_train_batch_end(batch, logs)
        now = self._last_step
        if now <= prev:
            return
        loss = (logs or {}).get("loss")
        try:
            self.observations.add(LOSS_SERIES, now - 1, float(loss))
        except (TypeError, ValueError):
            pass
        if (now // self.every) * self.every > prev:
            last = self._judged_at
            if last is None or now - last >= max(self.every, now // 50):  # see `every` in the class docstring
                self._judged_at = now
                self._write(now - 1)

    def on_train_end(self, logs=None):
        self._final = None
        self._write(max(self._last_step - 1, 0), final=True)
        self._final = self.verdicts()
        super().on_train_end(logs)

    def _write(self, step: int, final: bool = False) -> None:
        verdicts = self.verdicts()
        key = [(v["layer"], v["verdict"], v["first_step"], v["last_step"]) for v in verdicts]
        if self._written is None:
            if not (verdicts or final):
                return
        elif key == self._written:
            return
        self.text("health/verdicts", markdown_table(verdicts), step)
        self._written = key

    def verdicts(self) -> list[dict]:
        """The current verdicts (after training: the final ones)."""
        if self._final is not None:
            return list(self._final)
        if self.model is None:
            return []
        obs = self.observations
        return judge(obs.series, obs.meta.get("activation", {}), obs.events, **self.thresholds)
