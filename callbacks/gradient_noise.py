"""gradient_noise: per-sample gradient variance, GSNR and a norm-test batch size, per layer.

Every ``every`` steps (and at step 0) the diagnostic computes the gradient of the **per-sample**
loss ``l_i`` (the configured loss before its batch reduction) for each of the ``B`` samples of
the fixed probe batch, at the current weights, and reduces them to first and second moments per
parameter ``j``::

    m_j   = (1/B)     sum_i g_ij                      (mean per-sample gradient)
    v_j   = (1/(B-1)) sum_i (g_ij - m_j)^2            (unbiased per-sample variance)

Tags (``<layer>`` is the Keras layer name, e.g. ``hidden_1``; a layer's parameters are all of its
trainable variables together, e.g. kernel and bias). The same four quantities over *all*
parameters are written without a layer (``noise/gsnr`` ...):

* ``noise/<layer>/variance`` = ``(1/P) sum_j v_j`` over the layer's ``P`` parameters, i.e.
  ``tr(Sigma)/P`` -- the mean per-parameter variance of a single sample's gradient. (The
  variance of a mean-reduced mini-batch gradient of size ``b`` is this divided by ``b``.)
* ``noise/<layer>/gsnr`` -- gradient signal-to-noise ratio (Liu et al., 2020), the mean over
  the layer's parameters of ``r_j = m_j^2 / v_j``. Parameters whose variance is zero *to float32
  resolution* (``v_j <= 1e-6 * (1/B) sum_i g_ij^2``, which includes a unit that is dead for the
  whole probe batch, where every ``g_ij = 0``) have no defined ratio and are left out of the mean;
  a layer with no such parameter reports 0.
* ``noise/<layer>/norm_test`` -- the norm-test statistic of Byrd et al. (2012) and
  Bollapragada et al. (2018), ``T = tr(Sigma) / (B * ||m||^2)`` with
  ``tr(Sigma) = sum_j v_j``: the estimated ``E||g_B - grad F||^2 / ||grad F||^2`` of the
  probe batch's mean gradient. The batch passes the norm test with parameter ``theta`` when
  ``T <= theta^2``.
* ``noise/<layer>/batch_size`` -- the norm test's batch-size suggestion,
  ``b* = tr(Sigma) / (theta^2 * ||m||^2)``: the smallest batch whose mean gradient passes the
  norm test, i.e. whose expected squared error is at most ``theta^2`` times the squared norm of
  the true gradient (Bollapragada et al., 2018, eq. 3.9 with the sample variance).

When ``||m|| == 0`` the last two are undefined and are not written for that step. ``B`` must be
at least 2 (one sample has no variance).

How the per-sample gradients are computed (``method``):

* ``"vmap"`` -- for any Keras model: ``tf.vectorized_map`` (pfor) over the samples of a function
  that differentiates one sample's loss with respect to the parameters, evaluated with
  ``model.stateless_call`` on parameter *tensors*. This materialises ``chunk_size x P`` floats
  at a time, which is what makes per-sample gradients expensive.
* ``"dense"`` -- for a chain of ``keras.layers.Dense`` layers (every gradlab model): the
  per-sample gradient of a Dense kernel is the outer product ``a_i (x) delta_i`` of the layer's
  input row and ``delta_i = d l_i / d z_i`` at its pre-activation (bias: ``delta_i``), so
  ``sum_i g_i = A^T Delta`` and ``sum_i g_i^2 = (A*A)^T (Delta*Delta)`` (Goodfellow, 2015;
  BackPACK's ``SumGradSquared``) -- exact, with no ``B x P`` tensor. ``Delta`` comes from one
  backward pass of ``sum_i l_i``, which separates per sample because ``l_i`` depends only on
  row ``i`` (true for inference-mode Keras layers).
* ``"auto"`` (default) -- ``"dense"`` when the model is such a chain and reproduces the model's
  outputs on the probe batch (checked once per ``fit``), else ``"vmap"``.

The loss is the model's compiled loss (``model.loss``): a ``keras.losses.Loss`` (gradlab's
``mse``/``cross_entropy``, or any Keras loss) is called unreduced; a function or name is called
directly. Regularisation losses (``model.losses``) are not part of ``l_i``: they add the same
vector to every ``g_i``, so they would shift ``m`` but not ``v``. Sample weights are not used.

Where the samples come from (``source``):

* ``"step"`` -- the training step's own batch, inside the compiled step (a tap): for a gradlab
  model that is a chain of float32 Dense layers (every gradlab model) on one device, the step
  runs the chain itself (the same ops as ``Dense.call``), keeps each layer's input ``A`` and
  ``Delta = dL/dz`` from the backward pass it does anyway, and on due steps forms the moments
  above from them (``sum_i g_i`` is the step's own gradient times ``B`` for a mean loss, when the
  model has no regularisation losses). No second forward or backward pass: on the CPU benchmark
  this cut every-step cost from ~2.3x to ~1.7x. The statistics then describe the current
  training batch (they vary from batch to batch, as the batch does). Steps trained with sample
  weights write nothing.
* ``"probe"`` -- the fixed probe batch, outside the train step, on tensors read from the
  model's variables, so it is the same for a plain Keras model, a gradlab model, and a model
  under a ``tf.distribute`` strategy (reading a mirrored variable in cross-replica context gives
  its value).
* ``"auto"`` (default) -- ``"step"`` where it applies, else ``"probe"``.

The pure functions are XLA-safe (see the tests), and so is the step tap.
"""

from __future__ import annotations

import logging
import weakref
from typing import Callable, Sequence

import keras
import numpy as np
import tensorflow as tf

from gradlab import summaries
from gradlab.callbacks.base import Diagnostic, check_int, check_number, register
from gradlab.errors import first_line

log = logging.getLogger("gradlab.gradient_noise")

METHODS = ("auto", "vmap", "dense")
SOURCES = ("auto", "step", "probe")
STATS = ("variance", "gsnr", "norm_test", "batch_size")
ZERO_VARIANCE_RTOL = 1e-6


# ---------------------------------------------------------------------------------------------
# The model as pure functions of parameter tensors

def per_sample_loss_fn(model) -> Callable[[tf.Tensor, tf.Tensor], tf.Tensor]:
    """The compiled loss of ``model`` as ``(y, y_pred) -> [B]`` per-sample values (float32).

    A loss given by name or as a function is wrapped as ``compile`` wraps it
    (``LossFunctionWrapper``, which lines up the ranks of labels and predictions: labels ``(B,)``
    against an output ``(B, 1)`` work). Extra trailing axes of an unreduced Keras loss are averaged
    (as Keras's ``sum_over_batch_size`` would). A loss function that reduces over the batch
    itself (returns a scalar) is evaluated on each sample as a batch of one, which is its
    per-sample value for a mean or a sum. Raises ``ValueError`` for a model compiled without a
    single loss (none, or a dict/list of losses for several outputs).
    """
    loss = getattr(model, "loss", None)
    if loss is None or isinstance(loss, (dict, list, tuple)):
        raise ValueError(f"{type(model).__name__} must be compiled with one loss for per-sample "
                         f"gradients (got {loss!r})")
    if isinstance(loss, str):
        loss = keras.losses.get(loss)
    if not isinstance(loss, keras.losses.Loss):
        from keras.src.losses.losses import LossFunctionWrapper  # what compile() wraps a function in

        loss = LossFunctionWrapper(loss, name=getattr(loss, "__name__", None))
    fn = loss.call

    def one_at_a_time(y, y_pred):
        return tf.vectorized_map(lambda pair: tf.reshape(tf.cast(fn(pair[0][None], pair[1][None]), tf.float32), []),
                                 (y, y_pred))

    def per_sample(y, y_pred):
        if tf.nest.is_nested(y_pred):  # a model with several outputs, compiled with one loss for all
            raise ValueError(f"{model.name!r} has {len(tf.nest.flatten(y_pred))} outputs; per-sample losses "
                             f"(gradient_noise, curvature) need a model with one output")
        values = tf.cast(fn(y, y_pred), tf.float32)
        rank = values.shape.rank
        if rank == 0:
            values = one_at_a_time(y, y_pred)
        elif rank is not None and rank > 1:
            values = tf.reduce_mean(values, axis=list(range(1, rank)))
        return values

    return per_sample


def loss_reduction(model) -> str:
    """``"sum"`` when the compiled loss sums over the batch, else ``"mean"``."""
    loss = getattr(model, "loss", None)
    return "sum" if getattr(loss, "reduction", None) == "sum" else "mean"


def output_fn(model) -> Callable[[Sequence[tf.Tensor], tf.Tensor], tf.Tensor]:
    """``(params, x) -> model(x, training=False)`` with the trainable variables replaced by ``params``."""
    def call(params, x):
        non_trainable = [tf.convert_to_tensor(v.value) for v in model.non_trainable_variables]
        out, _ = model.stateless_call(list(params), non_trainable, x, training=False)
        return out

    return call


def read_params(model) -> list[tf.Tensor]:
    """The model's trainable variables as float32 tensors (a mirrored variable reads its value)."""
    return [tf.cast(tf.convert_to_tensor(v.value), tf.float32) for v in model.trainable_variables]


def layer_groups(model) -> dict[str, list[int]]:
    """``{layer name: [indices into model.trainable_variables]}``, in first-appearance order."""
    groups: dict[str, list[int]] = {}
    for i, (layer, _) in enumerate(summaries.variable_names(model)):
        groups.setdefault(layer, []).append(i)
    return groups


# ---------------------------------------------------------------------------------------------
# Per-sample gradients and their moments

def per_sample_gradients(out_fn, loss_fn, params: Sequence[tf.Tensor], x: tf.Tensor, y: tf.Tensor) -> list[tf.Tensor]:
    """Per-sample gradients ``g_i = d l_i / d params``, one ``[B, *param.shape]`` tensor per parameter.

    Vectorised with ``tf.vectorized_map`` (pfor): the function differentiating one sample's
    loss (a batch of one) is converted into batched ops, not run in a Python loop. A parameter
    the loss does not depend on gets zeros. A model pfor cannot convert (an Embedding feeding an
    LSTM: its variant tensors) falls back to ``tf.map_fn``, one sample after another, with one
    warning per model.

    Args:
        out_fn: ``(params, x) -> y_pred`` (see :func:`output_fn`).
        loss_fn: ``(y, y_pred) -> [B]`` per-sample losses (see :func:`per_sample_loss_fn`).
        params: the parameter tensors.
        x, y: the batch.
    """
    params = [tf.convert_to_tensor(p) for p in params]

    def one(sample):
        xi, yi = sample
        with tf.GradientTape() as tape:
            tape.watch(params)
            loss = loss_fn(yi[None], out_fn(params, xi[None]))[0]
        return [tf.convert_to_tensor(g) for g in
                tape.gradient(loss, params, unconnected_gradients=tf.UnconnectedGradients.ZERO)]

    key = out_fn  # one output function per model (output_fn): its pfor verdict is remembered
    if key not in _PFOR_FAILED:
        tf_logger = logging.getLogger("tensorflow")
        level = tf_logger.level
        tf_logger.setLevel(logging.CRITICAL)  # pfor logs every op it fails on before it gives up
        try:
            return tf.vectorized_map(one, (x, y))
        except Exception as err:  # pfor cannot convert some models (e.g. Embedding then LSTM: variant tensors)
            _PFOR_FAILED[key] = True
            log.warning("gradient_noise: tf.vectorized_map cannot batch this model's per-sample gradients "
                        "(%s: %s); computing them one sample at a time instead (slower)",
                        type(err).__name__, first_line(err)[:200])
        finally:
            tf_logger.setLevel(level)
    return tf.map_fn(one, (x, y), fn_output_signature=[tf.TensorSpec(p.shape, p.dtype) for p in params])


_PFOR_FAILED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # output functions pfor failed on


def moments_vmap(out_fn, loss_fn, params, x, y, chunk_size: int = 64) -> tuple[list, list]:
    """``(sum_i g_i, sum_i g_i^2)`` per parameter from :func:`per_sample_gradients`, ``chunk_size`` samples at a time.

    Chunking bounds the memory to ``chunk_size x P`` floats; with a batch size unknown at trace
    time the whole batch is one chunk.
    """
    n = x.shape[0]
    starts = range(0, n, chunk_size) if n is not None else [None]
    s1 = [tf.zeros(p.shape, tf.float32) for p in params]
    s2 = [tf.zeros(p.shape, tf.float32) for p in params]
    for start in starts:
        xs, ys = (x, y) if start is None else (x[start:start + chunk_size], y[start:start + chunk_size])
        grads = per_sample_gradients(out_fn, loss_fn, params, xs, ys)
        s1 = [a + tf.reduce_sum(g, 0) for a, g in zip(s1, grads)]
        s2 = [a + tf.reduce_sum(tf.square(g), 0) for a, g in zip(s2, grads)]
    return s1, s2


class DenseChain:
    """A model that is a chain of ``keras.layers.Dense`` layers, as pure functions of parameter tensors.

    Attributes:
        layers: the Dense layers in order.
        kernel_index, bias_index: each layer's kernel/bias position in ``model.trainable_variables``
            (``None`` for no bias).
    """

    def __init__(self, layers, kernel_index: list[int], bias_index: list[int | None]):
        self.layers, self.kernel_index, self.bias_index = layers, kernel_index, bias_index

    @classmethod
    def of(cls, model) -> "DenseChain | None":
        """The chain for ``model``, or ``None`` when it is not one (any non-Dense layer with weights,
        LoRA or quantised Dense, a variable outside the Dense layers, nested models)."""
        layers = [ly for ly in getattr(model, "layers", []) if not isinstance(ly, keras.layers.InputLayer)]
        if not layers or any(type(ly) is not keras.layers.Dense for ly in layers):
            return None
        if any(getattr(ly, "lora_enabled", False) or getattr(ly.dtype_policy, "quantization_mode", None)
               for ly in layers):
            return None
        position = {id(v): i for i, v in enumerate(model.trainable_variables)}
        kernels, biases, used = [], [], set()
        for ly in layers:
            if not ly.trainable or id(ly.kernel) not in position:
                return None
            kernels.append(position[id(ly.kernel)])
            biases.append(position.get(id(ly.bias)) if ly.bias is not None else None)
            if ly.bias is not None and biases[-1] is None:
                return None
            used.update(i for i in (kernels[-1], biases[-1]) if i is not None)
        if used != set(range(len(position))):
            return None
        return cls(layers, kernels, biases)

    def forward(self, params, x, watch=None):
        """The chain's output; with a tape ``watch``, also ``(inputs a_l, pre-activations z_l)``."""
        h = tf.cast(x, tf.float32)
        inputs, pre = [], []
        for ly, k, b in zip(self.layers, self.kernel_index, self.bias_index):
            inputs.append(h)
            z = tf.matmul(h, params[k])
            if b is not None:
                z = z + params[b]
            if watch is not None:
                watch.watch(z)
            pre.append(z)
            h = ly.activation(z) if ly.activation is not None else z
        return h, inputs, pre

    def moments(self, loss_fn, params, x, y) -> tuple[list, list]:
        """``(sum_i g_i, sum_i g_i^2)`` per parameter, exact, without per-sample tensors (module docstring)."""
        with tf.GradientTape() as tape:
            out, inputs, pre = self.forward(params, x, watch=tape)
            total = tf.reduce_sum(loss_fn(y, out))
        deltas = tape.gradient(total, pre, unconnected_gradients=tf.UnconnectedGradients.ZERO)
        s1 = [None] * len(params)
        s2 = [None] * len(params)
        for a, d, k, b in zip(inputs, deltas, self.kernel_index, self.bias_index):
            s1[k] = tf.matmul(a, d, transpose_a=True)
            s2[k] = tf.matmul(tf.square(a), tf.square(d), transpose_a=True)
            if b is not None:
                s1[b] = tf.reduce_sum(d, 0)
                s2[b] = tf.reduce_sum(tf.square(d), 0)
        return s1, s2


# ---------------------------------------------------------------------------------------------
# Statistics

def noise_statistics(s1: Sequence[tf.Tensor], s2: Sequence[tf.Tensor], n, groups: dict[str, list[int]],
                     theta: float = 0.9) -> dict[str, tf.Tensor]:
    """Variance, GSNR, norm-test statistic and batch-size suggestion per group and overall.

    Args:
        s1, s2: per parameter, ``sum_i g_i`` and ``sum_i g_i^2`` over ``n`` samples.
        n: the number of samples ``B`` (``>= 2``), a Python int or scalar tensor.
        groups: ``{name: parameter indices}``; the overall statistics use every parameter.
        theta: the norm test's parameter (``0 < theta``).

    Returns:
        ``{"<group>/<stat>": float32 scalar}`` and ``{"<stat>": ...}`` overall, for the stats
        ``variance, gsnr, norm_test, batch_size`` defined in the module docstring
        (``norm_test``/``batch_size`` are NaN when the mean gradient is zero). Per parameter the
        arithmetic is float32: ``v_j = (sum g^2 - B m^2)/(B-1)`` then has a relative error of
        about ``6e-8 * (1 + r_j)``, well inside what a GSNR needs, and a variance lost to that
        cancellation (``r_j >~ 1e6``) is caught by the zero-variance rule. Sums over parameters
        are float64.
    """
    n = tf.cast(n, tf.float32)
    n64 = tf.cast(n, tf.float64)
    per_param = []
    # Per parameter, written to take few passes over the (large) parameter arrays -- this is most
    # of a due step's cost. With a2 = a^2 and d = b - a2/n = (n-1) v_j: sum v = sum relu(d)/(n-1),
    # sum m^2 = sum a2/n^2, v_j > rtol * b/n <=> relu(d) > rtol (n-1)/n * b, and
    # m_j^2/v_j = (n-1)/n^2 * a2/relu(d); the constant factors are applied to the sums.
    threshold = ZERO_VARIANCE_RTOL * (n - 1.0) / n
    for a, b in zip(s1, s2):
        a = tf.cast(a, tf.float32)
        b = tf.cast(b, tf.float32)
        a2 = tf.square(a)
        pos = tf.nn.relu(b - a2 * (1.0 / n))
        kept = tf.where(pos > threshold * b, pos, 0.0)
        sums = [tf.cast(tf.reduce_sum(t), tf.float64)
                for t in (pos, a2, tf.math.divide_no_nan(a2, kept), tf.math.sign(kept))]
        per_param.append([sums[0] / (n64 - 1.0), sums[1] / (n64 * n64), sums[2] * (n64 - 1.0) / (n64 * n64),
                          sums[3], tf.constant(float(a.shape.num_elements() or 0), tf.float64)])

    def stats(indices):
        trace, msq, ratio_sum, count, size = (tf.add_n([per_param[i][k] for i in indices]) for k in range(5))
        nan = tf.constant(np.nan, tf.float64)
        safe_msq = tf.where(msq > 0, msq, 1.0)
        return {
            "variance": tf.where(size > 0, trace / tf.maximum(size, 1.0), 0.0),
            "gsnr": tf.where(count > 0, ratio_sum / tf.maximum(count, 1.0), 0.0),
            "norm_test": tf.where(msq > 0, trace / (n64 * safe_msq), nan),
            "batch_size": tf.where(msq > 0, trace / (theta ** 2 * safe_msq), nan),
        }

    out: dict[str, tf.Tensor] = {}
    for name, indices in groups.items():
        for stat, value in stats(indices).items():
            out[f"{name}/{stat}"] = tf.cast(value, tf.float32)
    for stat, value in stats(range(len(per_param))).items():
        out[stat] = tf.cast(value, tf.float32)
    return out


def noise_statistics_names(groups: dict[str, list[int]]) -> list[str]:
    """The keys :func:`noise_statistics` returns for ``groups``."""
    return [f"{g}/{s}" for g in groups for s in STATS] + list(STATS)


# ---------------------------------------------------------------------------------------------
# The diagnostic

@register("gradient_noise")
class GradientNoise(Diagnostic):
    """Per-layer gradient noise from per-sample gradients of the training or probe batch (module docstring).

    Args:
        log_dir: TensorBoard directory (``None``: publish to observations only).
        every: run every ``every`` steps (and at step 0).
        theta: the norm test's ``theta`` (> 0; Bollapragada et al. use values in (0, 1)).
        method: ``"auto"``, ``"vmap"`` (any model) or ``"dense"`` (Dense chains; ``auto``
            picks it when it applies).
        chunk_size: samples per ``vectorized_map`` call in the ``vmap`` method (bounds memory).
        jit_compile: compile the computation with XLA (the variables are read outside it). Off by
            default: on the CPU benchmark it was no faster in steady state and its first call
            compiled for ~4 s longer.
        source: ``"auto"``, ``"step"`` (the training batch, in the step) or ``"probe"`` (the
            probe batch); see the module docstring.
        probe_data: ``(x, y)``; defaults to the gradlab experiment's probe batch.
        probe_size: at most this many probe rows (at least 2 are needed).

    Raises:
        ValueError: a bad option (named, with its value); at ``fit`` time, a probe batch of
            fewer than 2 samples, ``method="dense"`` for a model that is not a Dense chain, or
            ``source="step"`` where the step source does not apply.
    """

    uses_probe = True
    uses_tap = True
    probe_autograph = False  # no tensor-dependent Python control flow

    def __init__(self, *, log_dir: str | None = None, every: int = 10, theta: float = 0.9, method: str = "auto",
                 chunk_size: int = 64, jit_compile: bool = False, source: str = "auto", probe_data=None,
                 probe_size: int = 256):
        super().__init__(log_dir=log_dir, every=every, probe_data=probe_data, probe_size=probe_size)
        if source not in SOURCES:
            raise ValueError(f"`source` ({source!r}) must be one of {', '.join(SOURCES)}")
        self.source = source
        self.source_used: str | None = None
        if probe_size < 2:
            raise ValueError(f"`probe_size` ({probe_size!r}) must be at least 2 (one sample has no variance)")
        self.theta = check_number("theta", theta)
        if method not in METHODS:
            raise ValueError(f"`method` ({method!r}) must be one of {', '.join(METHODS)}")
        self.method = method
        self.chunk_size = check_int("chunk_size", chunk_size)
        if not isinstance(jit_compile, bool):
            raise ValueError(f"`jit_compile` ({jit_compile!r}) must be true or false")
        self.jit_compile = jit_compile
        self.method_used: str | None = None
        self._chain: DenseChain | None = None

    # ---- source: the training step itself, or the probe batch
    def _step_source(self, model) -> bool:
        """Whether the statistics come from the training step (a tap) for ``model`` (see the class doc)."""
        from gradlab.train_step import GradlabModel, dense_chain

        weights = getattr(getattr(model, "_compile_loss", None), "_user_loss_weights", None)
        possible = (isinstance(model, GradlabModel) and self.method in ("auto", "dense")
                    and model.distribute_strategy.num_replicas_in_sync == 1 and weights is None
                    and dense_chain(model) is not None and DenseChain.of(model) is not None)
        if self.source == "step" and not possible:
            raise ValueError("`source` ('step') needs a gradlab model that is a chain of float32 Dense layers "
                             "trained on one device; use source='auto' or 'probe'")
        return possible and self.source != "probe"

    def wants_probe(self, model) -> bool:
        return self.source_used == "probe"

    def make_tap(self, model):
        if self.source_used != "step":
            return None
        from gradlab.train_step import Tap

        chain = DenseChain.of(model)
        groups, theta = layer_groups(model), self.theta
        n_params = len(model.trainable_variables)
        # Without regularisation losses the step's own gradient is sum_i g_i / D: no extra matmul.
        reuse_grads = not model.losses
        mean = loss_reduction(model) == "mean"

        def on_due(inp):
            if inp.layer_inputs is None:  # sample weights: no per-sample losses here
                return {name: tf.constant(np.nan, tf.float32)
                        for name in noise_statistics_names(groups)}
            n = tf.shape(inp.layer_inputs[0])[0]
            # Delta = dL/dz_l of the batch loss; the per-sample delta_i is D * Delta_i (D = B for a
            # mean over the batch, 1 for a sum).
            factor = tf.cast(n, tf.float32) if mean else tf.constant(1.0)
            s1, s2 = [None] * n_params, [None] * n_params
            for a, d, k, b in zip(inp.layer_inputs, inp.pre_activation_grads, chain.kernel_index, chain.bias_index):
                d = d * factor
                s1[k] = inp.grads[k] * factor if reuse_grads else tf.matmul(a, d, transpose_a=True)
                s2[k] = tf.matmul(tf.square(a), tf.square(d), transpose_a=True)
                if b is not None:
                    s1[b] = inp.grads[b] * factor if reuse_grads else tf.reduce_sum(d, 0)
                    s2[b] = tf.reduce_sum(tf.square(d), 0)
            stats = noise_statistics(s1, s2, tf.maximum(n, 2), groups, theta)
            # A batch of one sample (a last, partial batch) has no variance: write nothing.
            return {k: tf.where(n >= 2, v, tf.constant(np.nan, tf.float32)) for k, v in stats.items()}

        return Tap(on_due=on_due, every=self.every, needs_layers=True)

    def write_tap(self, step, values):
        if values["due"]:
            self.write_probe(values["due_step"], values["due"])

    def on_train_begin(self, logs=None):
        self.source_used = "step" if self._step_source(self.model) else "probe"
        if self.source_used == "step":
            self._chain, self.method_used = DenseChain.of(self.model), "dense"
            Diagnostic.on_train_begin(self, logs)
            return
        x, y = self.probe_batch()
        self.build_on_probe()
        for name, data in (("inputs", x), ("outputs", y)):
            if tf.nest.is_nested(data):
                count = len(tf.nest.flatten(data))
                raise ValueError(f"gradient_noise needs a model with one input and one output for per-sample "
                                 f"gradients; {self.model.name!r} has " + (f"{count} {name}" if count > 1 else
                                 f"its {name[:-1]} in a {type(data).__name__}"))
        if x.shape[0] is not None and x.shape[0] < 2:
            raise ValueError(f"gradient_noise needs a probe batch of at least 2 samples (got {x.shape[0]})")
        self._loss_fn = per_sample_loss_fn(self.model)
        self._out_fn = output_fn(self.model)
        self._groups = layer_groups(self.model)
        self._chain = None
        self.method_used = "vmap"
        if self.method in ("auto", "dense"):
            chain = DenseChain.of(self.model)
            if chain is not None and self._chain_matches(chain, x):
                self._chain, self.method_used = chain, "dense"
            elif self.method == "dense":
                raise ValueError(f"method='dense' needs a chain of keras.layers.Dense layers; "
                                 f"{self.model.name!r} is not one (use method='auto' or 'vmap')")
        key = (self.method_used, tuple(map(tuple, self._groups.values())), id(getattr(self.model, "loss", None)))
        owner = getattr(self, "_compute_owner", None)
        if owner is None or owner() is not self.model or self._compute_key != key:  # reuse across fit calls
            self._compute = tf.function(self._statistics, jit_compile=self.jit_compile, reduce_retracing=True,
                                        autograph=False)
            self._compute_key, self._compute_owner = key, weakref.ref(self.model)
        super().on_train_begin(logs)

    def _chain_matches(self, chain: DenseChain, x) -> bool:
        """Whether the Dense chain reproduces the model's output on ``x`` (guards odd topologies)."""
        try:
            params = read_params(self.model)
            mine = chain.forward(params, x)[0].numpy()
            ref = np.asarray(self._out_fn(params, x), dtype=np.float32)
        except Exception:  # noqa: BLE001 - any failure means "not a plain chain"
            return False
        if mine.shape != ref.shape:
            return False
        scale = max(1.0, float(np.max(np.abs(ref))) if ref.size else 1.0)
        return bool(np.allclose(mine, ref, rtol=1e-3, atol=1e-4 * scale))

    def _statistics(self, params, x, y):
        """The pure computation: parameters and probe batch -> statistics (module docstring)."""
        if self._chain is not None:
            s1, s2 = self._chain.moments(self._loss_fn, params, x, y)
        else:
            s1, s2 = moments_vmap(self._out_fn, self._loss_fn, params, x, y, self.chunk_size)
        return noise_statistics(s1, s2, tf.shape(x)[0], self._groups, self.theta)

    def probe(self, model, x, y):
        return self._compute(read_params(model), x, y)

    def write_probe(self, step, values):
        for key, value in values.items():
            value = float(value)
            if np.isfinite(value):
                self.scalar(summaries.tag("noise", *key.split("/")), value, step)
