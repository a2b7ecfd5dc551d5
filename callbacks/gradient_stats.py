"""gradient_stats: per-layer, per-variable gradient statistics.

Tags (``<layer>/<variable>`` as in Keras, e.g. ``hidden_1/kernel``):

* ``gradients/<layer>/<variable>/{norm,mean,std,max_abs,zero_fraction,update_ratio}`` at the
  due steps (``step % every == 0``);
* ``gradients/<layer>/layer_norm`` (the layer's variables together), ``gradients/global_norm``,
  ``gradients/logits/norm`` (``||dL/dlogits||_F`` over the batch) at the due steps;
* window statistics since the previous write, from every step: ``gradients/global_norm/window_max``,
  ``gradients/global_norm/window_mean``, ``gradients/<layer>/layer_norm/window_max``,
  ``gradients/logits/norm/window_max`` -- a spike between two writes lands here;
* histograms ``gradients/<layer>/<variable>`` every ``histogram_every`` steps (0 = never).

Math, for a gradient ``g`` with ``n`` entries: ``norm = sqrt(sum g^2)``, ``mean = sum g / n``,
``std = sqrt(mean (g - mean)^2)`` (population), ``max_abs = max |g|``,
``zero_fraction = #{g == 0} / n``.
``update_ratio = ||w_after - w_before|| / ||w_before||`` from
the update the optimizer actually applied; when ``||w_before|| == 0`` (a zero-initialised
variable) the denominator is ``||w_after||``, and 0/0 is reported as 0. An empty variable
(``n == 0``) reports zeros.

In a gradlab run (:class:`gradlab.train_step.GradlabModel`) everything comes from the real
step's gradients inside the compiled step: only the squared norms are computed on every step
(shared with other taps), the rest only on due steps. Any other Keras model gets the same
tags from a fixed probe batch (gradients at the current weights, with the model called with
``training=False``, so Dropout is off and BatchNormalization uses its moving statistics; no window
tags; the update ratio compares the weights before and after the due step's ``fit`` execution).
There the "logits" are the input of a final softmax/sigmoid activation when the model has one
(what Keras's cross-entropy uses even with ``from_logits=False``), else the model's output; with
several outputs, the norm is over all of them together.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from gradlab import summaries
from gradlab.callbacks.base import Diagnostic, check_int, probe_loss, register
from gradlab.train_step import StepWrite, Tap, TapVector, lazy_cond

STATS = ("norm", "mean", "std", "max_abs", "zero_fraction")


def variable_stats(g: tf.Tensor, squared_norm: tf.Tensor | None = None) -> dict[str, tf.Tensor]:
    """``norm, mean, std, max_abs, zero_fraction`` of one gradient (see the module docstring):
    :func:`stacked_variable_stats` of ``[g]``.

    ``squared_norm``: ``sum(g^2)`` when the caller has it already (the step computes it for
    every gradient).
    """
    g = tf.cast(tf.reshape(g, [-1]), tf.float32)
    if squared_norm is None:
        squared_norm = 2.0 * tf.nn.l2_loss(g)
    stats = stacked_variable_stats([g], tf.reshape(tf.cast(squared_norm, tf.float32), [1]))
    return {stat: vector[0] for stat, vector in stats.items()}


def stacked_variable_stats(grads, squared_norms: tf.Tensor) -> dict[str, tf.Tensor]:
    """``norm, mean, std, max_abs, zero_fraction`` of several gradients at once (see the module
    docstring): each statistic a float32 vector with one entry per gradient. An empty gradient
    (also one of unknown size that turns out empty) gives zeros.

    ``squared_norms``: the ``[len(grads)]`` vector of ``sum(g^2)`` (the step computes it for every
    gradient). Each gradient gets its own passes: sum, max, min, zero count, and a second pass for
    ``std`` only where ``sqrt(sum(g^2)/n - mean^2)`` is ill-conditioned (``mean^2 > E[g^2] / 2``;
    otherwise the subtraction loses at most one bit): there ``sqrt(sum((g - mean)^2) / n)``, exact
    also when ``|mean| >> std`` -- a slice of dynamic length, so the pass costs nothing when not
    needed (a functional If costs tens of microseconds a step). ``max_abs`` is ``max(max g, -min
    g)`` (no ``|g|`` temporary). Zeros are counted in float32 (exact below 2^24 entries) or int64,
    chosen from the known size: ``tf.math.zero_fraction`` decides in a tf.cond and
    ``tf.math.count_nonzero`` goes through int64, both dearer on a CPU. (Counting as ``n -
    sum(sign(g)^2)`` avoids the bool-to-float cast: ~1% of a step with statistics at every step,
    measured in lockstep; not adopted.) The scalar arithmetic after the passes runs once on the
    vectors, not once per gradient: in a step, where each small op costs several microseconds,
    that is about a hundred ops fewer for a three-layer MLP.
    """
    flat = [tf.cast(tf.reshape(g, [-1]), tf.float32) for g in grads]
    sizes = [f.shape.num_elements() for f in flat]  # None: unknown until run (may be empty)
    zero = tf.constant(0.0)

    def each(fn):  # one entry per gradient; 0 for a known-empty one (no reduction over nothing)
        return tf.stack([zero if size == 0 else fn(f, size) for f, size in zip(flat, sizes)])

    def padded(f, size):  # a gradient of unknown size with a 0 added: max/min defined when empty
        return tf.concat([f, [0.0]], 0) if size is None else f

    def zeros(f, size):
        count = tf.int64 if size is None or size > 2 ** 24 else tf.float32
        return tf.cast(tf.reduce_sum(tf.cast(tf.equal(f, 0.0), count)), tf.float32)

    n = tf.stack([tf.cast(tf.maximum(tf.size(f), 1), tf.float32) if size is None else tf.constant(float(max(size, 1)))
                  for f, size in zip(flat, sizes)])
    squared = tf.cast(squared_norms, tf.float32)
    mean = each(lambda f, _: tf.reduce_sum(f)) / n
    max_abs = tf.maximum(each(lambda f, size: tf.reduce_max(padded(f, size))),
                         -each(lambda f, size: tf.reduce_min(padded(f, size))))
    mean_square = squared / n
    one_pass = tf.logical_and(tf.math.is_finite(mean_square), mean * mean <= 0.5 * mean_square)
    means, two_pass_needed = tf.unstack(mean, num=len(flat)), tf.unstack(tf.logical_not(one_pass), num=len(flat))
    second = tf.stack([zero if size == 0 else 2.0 * tf.nn.l2_loss(_only_if(f, two_pass_needed[i]) - means[i])
                       for i, (f, size) in enumerate(zip(flat, sizes))])
    std = tf.where(one_pass, tf.sqrt(tf.maximum(mean_square - mean * mean, 0.0)), tf.sqrt(second / n))
    return {"norm": tf.sqrt(squared), "mean": mean, "std": std, "max_abs": max_abs,
            "zero_fraction": each(zeros) / n}


def update_ratios(delta_squared: tf.Tensor, before_squared: tf.Tensor) -> tf.Tensor:
    """``||delta|| / ||before||`` from ``||delta||^2`` and ``||before||^2`` (scalars or vectors).

    Where ``||before|| == 0`` the denominator is ``||after||``, which is ``||delta||`` there
    (``after = 0 + delta``): the ratio is 1, or 0 when nothing changed (0/0)."""
    d = tf.sqrt(tf.cast(delta_squared, tf.float32))
    b = tf.sqrt(tf.cast(before_squared, tf.float32))
    denom = tf.where(b > 0, b, d)
    return tf.where(denom > 0, d / tf.where(denom > 0, denom, 1.0), 0.0)


def _only_if(flat: tf.Tensor, pred: tf.Tensor) -> tf.Tensor:
    """``flat`` (1-D) when ``pred``, else its empty prefix: an op on the result costs a pass over
    ``flat`` only when ``pred`` holds (a full-range slice is the input itself, not a copy)."""
    return flat[:tf.where(pred, tf.size(flat), 0)]


def update_ratio(delta: tf.Tensor, before: tf.Tensor) -> tf.Tensor:
    """``||delta|| / ||before||`` with the zero-weight convention of the module docstring."""
    return update_ratios(2.0 * tf.nn.l2_loss(tf.cast(delta, tf.float32)), 2.0 * tf.nn.l2_loss(tf.cast(before, tf.float32)))


def _per_variable(names, stats: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
    """``{"layer/var/stat": scalar}`` from :func:`stacked_variable_stats`-style vectors (one entry
    per ``(layer, var)`` of ``names``)."""
    return {f"{layer}/{var}/{stat}": value for stat, vector in stats.items()
            for (layer, var), value in zip(names, tf.unstack(vector, num=len(names)))}


def _layer_norms(names, squared_norms: tf.Tensor) -> dict[str, tf.Tensor]:
    """``{"@layer_norm/<layer>": ..., "@global_norm": ...}`` from the ``[len(names)]`` squared
    norms of the variables ``names`` (``(layer, var)``): each layer's variables together, and all
    of them (one segment sum; in float32, as the step has them)."""
    layers = sorted({layer for layer, _ in names})
    layer_sq = tf.math.unsorted_segment_sum(tf.cast(squared_norms, tf.float32),
                                            [layers.index(layer) for layer, _ in names], len(layers))
    out = {f"@layer_norm/{layer}": value for layer, value in zip(layers, tf.unstack(tf.sqrt(layer_sq), num=len(layers)))}
    out["@global_norm"] = tf.sqrt(tf.reduce_sum(layer_sq))
    return out


def _due_tag(key: str) -> str:
    """The tag of a due output key (``@logits/norm``, ``@global_norm``, ``@layer_norm/<layer>``,
    ``<layer>/<var>/<stat>``)."""
    if key == "@logits/norm":
        return "gradients/logits/norm"
    if key == "@global_norm":
        return "gradients/global_norm"
    if key.startswith("@layer_norm/"):
        return summaries.tag("gradients", key[len("@layer_norm/"):], "layer_norm")
    layer, var, stat = key.rsplit("/", 2)
    return summaries.tag("gradients", layer, var, stat)


def logits_of(output: tf.Tensor) -> tf.Tensor:
    """The logits behind a model output: the input of its final softmax/sigmoid when Keras kept
    it (``_keras_logits``, which Keras's cross-entropy also uses with ``from_logits=False``),
    else the output itself."""
    return getattr(output, "_keras_logits", output)


def _joint_norm(grads) -> tf.Tensor:
    """``sqrt(sum ||g||^2)`` over the gradients that exist (0 when the loss ignores them all)."""
    squares = [2.0 * tf.nn.l2_loss(tf.cast(g, tf.float32)) for g in grads if g is not None]
    return tf.sqrt(tf.add_n(squares)) if squares else tf.constant(0.0)


@register("gradient_stats")
class GradientStats(Diagnostic):
    """Per-layer gradient statistics to TensorBoard (module docstring has the tags and math).

    Args:
        log_dir: TensorBoard directory.
        every: write every ``every`` steps.
        histogram_every: write gradient histograms every this many steps (a multiple of
            ``every`` is honoured exactly; 0 disables them).
        probe_data, probe_size: the probe batch for non-gradlab models.
    """

    uses_tap = True

    def __init__(self, *, log_dir: str | None = None, every: int = 10, histogram_every: int = 100,
                 probe_data=None, probe_size: int = 256):
        super().__init__(log_dir=log_dir, every=every, probe_data=probe_data, probe_size=probe_size)
        self.histogram_every = check_int("histogram_every", histogram_every, minimum=0)
        self._before = None
        self._stat_tags: dict[str, str] = {}  # due key -> tag
        self._tags: dict[str, str] = {}

    # ---- channel selection
    def wants_probe(self, model) -> bool:
        from gradlab.train_step import GradlabModel

        return not isinstance(model, GradlabModel)

    # ---- in-step tap
    def make_tap(self, model):
        names = summaries.variable_names(model)
        layers = sorted({layer for layer, _ in names})
        hist = self.histogram_every > 0

        layer_of = tf.constant([layers.index(layer) for layer, _ in names], tf.int32)
        window_names = ["global_norm", *(f"{layer}/layer_norm" for layer in layers), "logits/norm"]

        def every_step(inp):
            # A handful of ops for all layers (one segment sum), not a few per layer.
            layer_sq = tf.math.unsorted_segment_sum(inp.squared_norm_vector, layer_of, len(layers))
            logits_sq = 2.0 * tf.nn.l2_loss(tf.cast(inp.logits_grad, tf.float32))
            squares = tf.concat([[tf.reduce_sum(layer_sq)], layer_sq, [logits_sq]], 0)
            return TapVector(window_names, tf.sqrt(squares))

        def on_due(inp):
            out = {"@logits/norm": tf.norm(inp.logits_grad), **_layer_norms(names, inp.squared_norm_vector)}
            # Each statistic for all variables as one vector (stacked_variable_stats), then one
            # scalar output per variable and statistic.
            stats = stacked_variable_stats(inp.grads, inp.squared_norm_vector)
            updates, before_sq = inp.updates, inp.weight_squared_norms_before
            if updates is not None:
                # ||w_before||: taken before the update when it was recorded, else from the copy
                if before_sq is None:
                    before_sq = tf.stack([2.0 * tf.nn.l2_loss(w) for w in inp.weights_before])
                delta_sq = tf.stack([updates.squared_norm(i) for i in range(len(names))])
                stats["update_ratio"] = update_ratios(delta_sq, before_sq)
            out.update(_per_variable(names, stats))
            if hist:
                # Buckets (not gradient copies), and only at histogram steps.
                shape = [len(names), summaries.HISTOGRAM_BUCKETS, 3]
                out["@histograms"] = lazy_cond(
                    tf.equal(inp.step % self.histogram_every, 0),
                    lambda: tf.cast(tf.stack([summaries.histogram_buckets(g) for g in inp.grads]), tf.float32),
                    lambda: tf.zeros(shape, tf.float32))
            return out

        step_write = None
        writer = self.tap_writer() if model.step_writes_supported else None
        if writer is not None:  # the due step writes its scalars itself, where it can (StepWrite)
            keys = ["@logits/norm", "@global_norm", *(f"@layer_norm/{layer}" for layer in layers),
                    *(f"{layer}/{var}/{stat}" for layer, var in names for stat in (*STATS, "update_ratio"))]
            step_write = StepWrite(writer, {key: _due_tag(key) for key in keys}, tuple(self._window_tags(window_names)))
        return Tap(every_step=every_step, on_due=on_due, every=self.every, needs_updates=True, step_write=step_write)

    def _window_tags(self, names):
        """``(name, stat, tag)`` of the window scalars written with each due step."""
        for name in names:
            yield name, "max", self._tag(f"@window/{name}", "gradients", name, "window_max")
            if name == "global_norm":
                yield name, "mean", "gradients/global_norm/window_mean"

    def write_tap(self, step, values):
        if values["due"]:
            self._write_stats(values["due_step"], values["due"], written=values.get("due_written_in_step", False))
        window = values["window"]  # every step since the previous write
        tags, out = [], []
        for name, stat, tag in self._window_tags(window):
            tags.append(tag)
            out.append(window[name][stat])
        self.scalars(tags, out, step, written=values.get("window_written_in_step", False))

    def _tag(self, key: str, *parts: str):
        """``summaries.tag(*parts)``, worked out once per ``key``."""
        tag = self._tags.get(key)
        if tag is None:
            tag = self._tags[key] = summaries.tag(*parts)
        return tag

    def _write_stats(self, step: int, due: dict, written: bool = False) -> None:
        """Write one due step's statistics (``written``: the step wrote the scalars already;
        publish them to the observations only).

        ``due`` maps ``layer/var/stat`` to a value, ``@histograms`` to the gradients' histogram
        buckets (``[variables, k, 3]``, in variable order), ``@logits/norm`` to the
        logits-gradient norm and ``@layer_norm/<layer>``, ``@global_norm`` to the layer and
        global norms (:func:`_layer_norms`).
        """
        hist_due = self.histogram_every > 0 and step % self.histogram_every == 0
        stats = self._stat_tags
        tags, out = [], []
        for key, value in due.items():
            if key == "@histograms":
                if hist_due:
                    for (layer, var), buckets in zip(summaries.variable_names(self.model), value):
                        self.histogram(summaries.tag("gradients", layer, var), buckets, step, buckets=None)
                continue
            tag = stats.get(key)
            if tag is None:  # worked out once per key
                tag = stats[key] = _due_tag(key)
            tags.append(tag)
            out.append(float(value))
        self.scalars(tags, out, step, written=written)

    # ---- probe channel (any Keras model)
    def on_train_batch_begin(self, batch, logs=None):
        if self._probe_fn is None:
            return
        now = self.steps_done(batch, end=False)
        spe = int(getattr(self.model, "steps_per_execution", 1) or 1)
        if ((now + spe) // self.every) * self.every > now:
            self._before = [np.array(v.numpy(), dtype=np.float32) for v in self.model.trainable_variables]

    def probe(self, model, x, y):
        with tf.GradientTape() as tape:
            y_pred = model(x, training=False)
            loss = probe_loss(model, x, y, y_pred)
        variables = model.trainable_variables
        logits = [logits_of(t) for t in tf.nest.flatten(y_pred)]
        grads = tape.gradient(loss, list(variables) + logits)
        out = {"@logits/norm": _joint_norm(grads[len(variables):])}
        grads = [tf.zeros_like(v) if g is None else g for g, v in zip(grads[:len(variables)], variables)]
        squared = tf.stack([2.0 * tf.nn.l2_loss(tf.cast(g, tf.float32)) for g in grads])
        names = summaries.variable_names(model)
        out.update(_layer_norms(names, squared))
        out.update(_per_variable(names, stacked_variable_stats(grads, squared)))
        if self.histogram_every:
            out["@histograms"] = tf.stack([summaries.histogram_buckets(g) for g in grads])
        return out

    def write_probe(self, step, values):
        due = dict(values)
        if self._before is not None:
            for (layer, var), v, b in zip(summaries.variable_names(self.model), self.model.trainable_variables,
                                          self._before):
                delta = np.asarray(v.numpy(), np.float32) - b
                due[f"{layer}/{var}/update_ratio"] = float(update_ratio(delta, b))
            self._before = None
        self._write_stats(step, due)
