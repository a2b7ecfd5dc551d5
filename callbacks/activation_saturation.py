"""activation_saturation: how much of each layer's activation still passes a gradient.

On a fixed probe batch (``n`` samples) and at the due steps (``step % every == 0``, and step 0),
every layer with an activation is run once and summarised. Let ``a`` be the layer's output with
the batch axis first and every other axis flattened into ``u`` *units*, so ``a`` is ``n x u``,
and ``f'`` the activation's local derivative written in terms of its output
(:func:`gradlab.activations.derivative_from_output`: ``s(1-s)`` for sigmoid, ``1-t^2`` for tanh,
the seed notebook's quantities). With ``tau = threshold`` (default 0.1):

* sigmoid, tanh -- ``saturated_fraction = #{(i, j): f'(a_ij) < tau * peak} / (n u)``, where
  ``peak`` is the derivative's maximum (1/4 for sigmoid, 1 for tanh). With ``tau = 0.1`` a
  sigmoid unit counts as saturated when ``s < 0.026`` or ``s > 0.974`` (``|x| > 3.6``), a tanh
  unit when ``|t| > 0.949`` (``|x| > 1.8``).
* relu -- ``dead_fraction = #{j: a_ij <= 0 for every i} / u`` (units that pass no gradient for
  any probe sample) and ``inactive_fraction = #{(i, j): a_ij <= 0} / (n u)``.
* leaky_relu -- ``leaky_fraction = #{(i, j): a_ij <= 0} / (n u)``: the fraction in the leaky
  region, where the gradient is scaled by alpha (0.2 in gradlab's models).
* softmax -- the model output when it is linear logits (gradlab's ``logits`` layer, whose
  softmax lives in the loss; ``output_softmax=True``), or any layer with a softmax activation.
  With ``p = softmax(z)`` per sample: ``saturated_fraction = #{i: max_k p_ik > 1 - tau} / n`` and
  ``entropy = (1/n) sum_i -sum_k p_ik log p_ik`` in nats (``0 log 0 = 0``; the maximum is
  ``log K`` for ``K`` classes).
* every analysed layer -- ``mean`` and ``std`` of ``a`` over all ``n u`` entries (population std),
  and ``preactivation_mean``/``preactivation_std`` of the layer's input to its activation where
  that is computable: for ``Dense`` it is ``x @ kernel + bias`` from the layer's input ``x`` (the
  probe sub-model outputs ``x``); for standalone activation layers (``Activation``, ``ReLU``,
  ``LeakyReLU``, ``Softmax``) it is their input; for linear layers it is the output itself. Other
  layers with a fused activation (for example ``Conv2D``) get no pre-activation statistics.
  Histograms ``activations/<layer>`` of ``a`` are written every ``histogram_every`` steps: at the
  first due step in each ``[k * histogram_every, (k + 1) * histogram_every)``
  (:func:`histogram_due`, a function of the step, so a resumed run writes the same ones).

Edge cases: a layer with no units (``u = 0``) reports 0 for every fraction, mean and std; a
constant activation (zero variance) has ``std = 0``; a ReLU unit at zero for the whole probe
batch counts as dead, one that is positive for a single sample does not. The probe batch must
have at least one sample.

Tags, at each due step: ``activations/<layer>/{mean,std}``, ``.../{preactivation_mean,
preactivation_std}`` (where computable), ``.../saturated_fraction`` (sigmoid, tanh, softmax),
``.../dead_fraction`` and ``.../inactive_fraction`` (relu), ``.../leaky_fraction`` (leaky_relu),
``.../entropy`` (softmax); histograms ``activations/<layer>``.

Which layers: the model's own (top-level) layers that have an ``activation`` attribute (``Dense``,
convolutions, ...) or are activation layers. Layers without one (``Dropout``, normalisation,
``Flatten``) are skipped; a nested model counts as one layer without an activation. The kind of
each analysed layer is published as ``observations_for(model).meta["activation"][layer]``, which
is how :class:`gradlab.callbacks.Health` knows which layers can saturate and which can die.
A subclassed model without a functional graph only gets its output analysed (as layer ``output``),
its kind read off the op that produced it (softmax, sigmoid, tanh, relu; else linear, or softmax
logits with ``output_softmax`` and more than one unit).
An LSTM or GRU layer (whose output is gated, not its ``activation`` of a pre-activation) is kind
``other``: mean and std only; ``SimpleRNN`` is analysed by its activation. A layer called more
than once (a shared layer) is measured at its first call in the model's graph. The probe runs
the model with ``training=False`` (Dropout off, BatchNormalization on its moving statistics).
"""

from __future__ import annotations

import keras
import tensorflow as tf

from gradlab.activations import DERIVATIVE_PEAK, derivative_from_output
from gradlab.callbacks.base import Diagnostic, check_int, check_number, register
from gradlab import summaries

SATURATING = ("sigmoid", "tanh")
KINDS = ("sigmoid", "tanh", "relu", "leaky_relu", "softmax", "linear", "other")
_ACTIVATION_LAYERS = (keras.layers.Activation, keras.layers.ReLU, keras.layers.LeakyReLU, keras.layers.Softmax)


# ---- pure statistics (tensors in, scalar tensors out) ------------------------------------------

def _flat(a) -> tf.Tensor:
    """``a`` as ``n x u`` float32 (batch axis first, the rest flattened into units)."""
    a = tf.cast(a, tf.float32)
    return tf.reshape(a, [tf.shape(a)[0], -1])


def _fraction(mask) -> tf.Tensor:
    """Fraction of true entries of ``mask``; 0 for an empty mask."""
    n = tf.size(mask)
    return tf.cast(tf.math.count_nonzero(mask), tf.float32) / tf.cast(tf.maximum(n, 1), tf.float32)


def moments(a) -> tuple[tf.Tensor, tf.Tensor]:
    """``(mean, std)`` of all entries of ``a`` (population std); ``(0, 0)`` when ``a`` is empty."""
    a = tf.reshape(tf.cast(a, tf.float32), [-1])
    n = tf.cast(tf.maximum(tf.size(a), 1), tf.float32)
    mean = tf.reduce_sum(a) / n
    return mean, tf.sqrt(tf.reduce_sum(tf.square(a - mean)) / n)


def saturated_fraction(a, kind: str, threshold: float) -> tf.Tensor:
    """Fraction of entries of the ``kind`` activation output ``a`` with ``f'(a) < threshold * peak``."""
    a = tf.cast(a, tf.float32)
    return _fraction(derivative_from_output(kind, a) < threshold * DERIVATIVE_PEAK[kind])


def dead_fraction(a) -> tf.Tensor:
    """Fraction of units (columns of ``n x u``) with ``a <= 0`` for every sample; 0 when ``u = 0``."""
    return _fraction(tf.reduce_all(_flat(a) <= 0.0, axis=0))


def inactive_fraction(a) -> tf.Tensor:
    """Fraction of entries with ``a <= 0`` (zero gradient for relu, alpha for leaky_relu)."""
    return _fraction(tf.cast(a, tf.float32) <= 0.0)


def softmax_stats(p, threshold: float) -> tuple[tf.Tensor, tf.Tensor]:
    """``(saturated_fraction, mean entropy)`` of probabilities ``p`` (``n x K``, rows summing to 1).

    ``saturated_fraction = #{i: max_k p_ik > 1 - threshold} / n``;
    ``entropy = mean_i -sum_k p_ik log p_ik`` with ``0 log 0 = 0``. Both are 0 when ``n = 0``.
    """
    p = _flat(p)
    n = tf.cast(tf.maximum(tf.shape(p)[0], 1), tf.float32)
    top = tf.reduce_max(tf.concat([p, tf.zeros([tf.shape(p)[0], 1])], axis=1), axis=1)
    sat = tf.reduce_sum(tf.cast(top > 1.0 - threshold, tf.float32)) / n
    entropy = tf.reduce_sum(-tf.math.xlogy(p, p)) / n
    return sat, entropy


def activation_stats(a, kind: str, threshold: float, pre=None, is_logits: bool = False) -> dict[str, tf.Tensor]:
    """Every statistic of one layer (see the module docstring); ``pre`` is the pre-activation or None.

    ``is_logits``: ``a`` are logits whose softmax is taken in the loss (``kind`` must be ``softmax``).
    """
    out = {}
    out["mean"], out["std"] = moments(a)
    if pre is not None:
        out["preactivation_mean"], out["preactivation_std"] = moments(pre)
    if kind in SATURATING:
        out["saturated_fraction"] = saturated_fraction(a, kind, threshold)
    elif kind == "relu":
        out["dead_fraction"] = dead_fraction(a)
        out["inactive_fraction"] = inactive_fraction(a)
    elif kind == "leaky_relu":
        out["leaky_fraction"] = inactive_fraction(a)
    elif kind == "softmax":
        p = tf.nn.softmax(_flat(a), axis=-1) if is_logits else a
        out["saturated_fraction"], out["entropy"] = softmax_stats(p, threshold)
    return out


# ---- which layers, and what kind -----------------------------------------------------------------

def activation_kind(layer) -> str | None:
    """The activation kind of ``layer`` (one of :data:`KINDS`), or ``None`` if it has no activation."""
    if isinstance(layer, keras.layers.ReLU):
        if getattr(layer, "negative_slope", 0.0):
            return "leaky_relu"
        plain = getattr(layer, "max_value", None) is None and not getattr(layer, "threshold", 0.0)
        return "relu" if plain else "other"
    if isinstance(layer, keras.layers.LeakyReLU):
        return "leaky_relu"
    if isinstance(layer, keras.layers.Softmax):
        return "softmax"
    if isinstance(layer, keras.Model):
        return None
    if isinstance(layer, keras.layers.RNN) and not isinstance(layer, keras.layers.SimpleRNN):
        # An LSTM's or GRU's output is not its `activation` of a pre-activation (h = o * tanh(c),
        # a gated mix for GRU), so 1 - h^2 is not a tanh derivative there: measured as "other".
        return "other"
    fn = getattr(layer, "activation", None)
    if fn is None or not callable(fn):
        return None
    name = getattr(fn, "__name__", "")
    return name if name in KINDS else "other"


class _Plan:
    """What to compute for one layer: its kind and how to get the pre-activation."""

    def __init__(self, name: str, layer, kind: str, pre: str | None, is_logits: bool):
        self.name, self.layer, self.kind, self.pre, self.is_logits = name, layer, kind, pre, is_logits


def _plan(model, output_softmax: bool) -> list[_Plan]:
    outputs = list(getattr(model, "outputs", None) or [])
    plans = []
    for layer in model.layers:
        if isinstance(layer, keras.layers.InputLayer):
            continue
        kind = activation_kind(layer)
        if kind is None:
            continue
        try:
            out = layer.output
        except (AttributeError, ValueError):
            continue
        is_logits = any(out is o for o in outputs) and _softmax_logits(kind, out, output_softmax)
        if is_logits:
            kind = "softmax"
        if isinstance(layer, _ACTIVATION_LAYERS):
            pre = "input"
        elif kind == "linear" or is_logits:
            pre = "output"
        elif isinstance(layer, keras.layers.Dense):
            pre = "dense"
        else:
            pre = None
        plans.append(_Plan(layer.name, layer, kind, pre, is_logits))
    return plans


def _softmax_logits(kind: str | None, output, output_softmax: bool) -> bool:
    """Whether a model output of ``kind`` is logits of a softmax: linear, with more than one unit,
    and ``output_softmax`` on (the rule for functional and subclassed models alike)."""
    shape = tuple(output.shape) if getattr(output.shape, "rank", 1) is not None else ()  # Keras or TF shape
    units = int(shape[-1] or 0) if shape else 0
    return kind == "linear" and output_softmax and units > 1


def _dense_chain(model, plans: list[_Plan]) -> bool:
    """Whether ``model`` is a :func:`gradlab.train_step.dense_chain` planned layer for layer.

    Then the probe walks the chain itself, computing each pre-activation once and the activation
    from it, instead of a forward pass plus a second matmul per layer for the pre-activations
    (Keras fuses the activation into ``Dense``): half the probe's work.
    """
    from gradlab.train_step import dense_chain

    layers = dense_chain(model)
    return layers is not None and len(layers) == len(plans) and all(
        plan.layer is layer and plan.pre in ("dense", "output") for layer, plan in zip(layers, plans))


def _dense_chain_forward(plans: list[_Plan], x) -> list:
    """``[a_1, z_1, a_2, z_2, ...]`` (activation, pre-activation) along a :func:`_dense_chain`."""
    from gradlab.train_step import _chain_forward

    out, inputs, pre = _chain_forward([plan.layer for plan in plans], x)
    activations = inputs[1:] + [out]
    return [t for a, z in zip(activations, pre) for t in (a, z)]


def histogram_due(step: int, every: int, histogram_every: int) -> bool:
    """Whether the probe at ``step`` writes histograms: at the first due step (a multiple of
    ``every``) in each run of ``histogram_every`` steps, ``[k h, (k + 1) h)``. A function of the
    step alone, so a resumed run writes the histograms of an uninterrupted one; never when
    ``histogram_every`` is 0."""
    if histogram_every <= 0:
        return False
    due = step // every * every  # the due step this probe is for
    return (due - every) // histogram_every < due // histogram_every


@register("activation_saturation")
class ActivationSaturation(Diagnostic):
    """Per-layer activation saturation, dead units and pre-activation statistics on a probe batch.

    See the module docstring for the statistics, tags and edge cases.

    Args:
        log_dir: TensorBoard directory (``None``: compute and publish only).
        every: probe every ``every`` steps (and at step 0).
        threshold: ``tau`` in (0, 1): a sigmoid/tanh unit is saturated when its local derivative
            is below ``tau`` times the derivative's peak; a softmax output when its largest
            probability exceeds ``1 - tau``.
        histogram_every: write activation histograms every this many steps (0: never).
        output_softmax: treat a linear multi-unit model output as logits of a softmax (gradlab's
            models; Keras models trained ``from_logits=True``).
        probe_data, probe_size: the probe batch (default: the one a gradlab run provides).
    """

    uses_probe = True
    probe_autograph = False
    probe_needs_loss = False  # a forward pass only

    def __init__(self, *, log_dir: str | None = None, every: int = 100, threshold: float = 0.1,
                 histogram_every: int = 100, output_softmax: bool = True, probe_data=None, probe_size: int = 256):
        super().__init__(log_dir=log_dir, every=every, probe_data=probe_data, probe_size=probe_size)
        threshold = check_number("threshold", threshold, below_one=True)
        histogram_every = check_int("histogram_every", histogram_every, minimum=0)
        if not isinstance(output_softmax, bool):
            raise ValueError(f"`output_softmax` ({output_softmax!r}) must be true or false")
        self.threshold = float(threshold)
        self.histogram_every = histogram_every
        self.output_softmax = output_softmax
        self._plans: list[_Plan] = []
        self._submodel = None
        self._tags: dict[str, str] = {}

    # ---- set-up
    def on_train_begin(self, logs=None):
        self._plans, self._submodel = self._build(self.model)
        for plan in self._plans:
            self.publish_meta("activation", plan.name, plan.kind)
        super().on_train_begin(logs)

    def probe_batch(self):
        x, y = super().probe_batch()
        if int(tf.shape(tf.nest.flatten(x)[0])[0]) < 1:
            raise ValueError("`probe_data` must have at least one sample")
        return x, y

    def _build(self, model):
        inputs = getattr(model, "inputs", None)
        try:
            plans = _plan(model, self.output_softmax) if inputs else []
        except (AttributeError, ValueError):
            plans = []
        if not plans:  # subclassed model: only its output
            return [self._output_plan(model)], None
        if _dense_chain(model, plans):
            return plans, None
        tensors = []
        for plan in plans:
            tensors.append(plan.layer.output)
            tensors.append(plan.layer.input if plan.pre in ("input", "dense") else plan.layer.output)
        sub_inputs = inputs[0] if len(inputs) == 1 else inputs
        return plans, keras.Model(sub_inputs, tensors, name=f"{model.name}_activation_probe")

    def _output_plan(self, model) -> _Plan:
        """The plan for a model without a functional graph: its output, whose kind is read off the
        op that produced it (traced once on a probe row): ``Softmax``/``Sigmoid``/``Tanh``/``Relu``
        give that kind (no pre-activation to report); anything else is linear, and with
        ``output_softmax`` and more than one unit, logits of a softmax -- the same rules as for
        a functional model's output layer."""
        x, _ = self.probe_batch()
        head = tf.nest.map_structure(lambda t: t[:1], x)
        try:
            if not model.variables:  # built eagerly first: Keras creates the variables at the first call
                model(head, training=False)
            out = tf.function(lambda t: model(t, training=False), autograph=False).get_concrete_function(head).outputs
        except Exception:  # let the probe check report it
            out = []
        t = out[0] if len(out) == 1 else None
        while t is not None and t.op.type in ("Identity", "IdentityN", "Cast"):
            t = t.op.inputs[0] if t.op.inputs else None
        kind = {"Softmax": "softmax", "Sigmoid": "sigmoid", "Tanh": "tanh", "Relu": "relu"}.get(
            t.op.type if t is not None else "")
        if kind is not None:
            return _Plan("output", None, kind, None, False)
        if len(out) == 1 and _softmax_logits("linear", out[0], self.output_softmax):
            return _Plan("output", None, "softmax", "output", True)
        return _Plan("output", None, "linear", "output", False)

    # ---- probe
    def probe_options(self, step: int) -> dict:
        # Histogram buckets only at histogram steps (the base class compiles each variant once).
        return {"histograms": histogram_due(step, self.every, self.histogram_every)}

    def probe(self, model, x, y, histograms: bool | None = None):
        """The statistics of every planned layer on ``x`` (and histogram buckets when ``histograms``)."""
        if histograms is None:
            histograms = self.histogram_every > 0
        if self._submodel is not None:
            values = self._submodel(x, training=False)
        elif len(self._plans) and self._plans[0].layer is not None:
            values = _dense_chain_forward(self._plans, x)
        else:
            values = [model(x, training=False)] * 2
        out = {}
        for i, plan in enumerate(self._plans):
            a, inp = values[2 * i], values[2 * i + 1]
            if plan.pre == "dense" and self._submodel is None:
                pre, inp = inp, None  # the chain forward returned the pre-activation itself
            elif plan.pre == "dense":
                kernel = tf.cast(plan.layer.kernel, tf.float32)
                inp = tf.cast(inp, tf.float32)
                pre = tf.tensordot(inp, kernel, [[inp.shape.rank - 1], [0]])
                if plan.layer.use_bias:
                    pre = pre + tf.cast(plan.layer.bias, tf.float32)
            elif plan.pre in ("input", "output"):
                pre = inp
            else:
                pre = None
            for stat, value in activation_stats(a, plan.kind, self.threshold, pre, plan.is_logits).items():
                out[f"{plan.name}/{stat}"] = value
            if histograms:
                out[f"{plan.name}/@histogram"] = summaries.histogram_buckets(a)
        return out

    def write_probe(self, step, values):
        tags = self._tags
        for key, value in values.items():
            tag = tags.get(key)
            if tag is None:
                layer, stat = key.rsplit("/", 1)
                tag = tags[key] = summaries.tag("activations", layer, "" if stat == "@histogram" else stat)
            if key.endswith("/@histogram"):
                self.histogram(tag, value, step, buckets=None)
            else:
                self.scalar(tag, float(value), step)
