"""curvature: the top Hessian eigenvalue of the loss (sharpness), globally and per layer.

Every ``every`` steps (and at step 0) the diagnostic estimates ``lambda_max``, the largest
eigenvalue of the Hessian ``H = d^2 L / d theta^2`` of the training loss ``L`` on the fixed probe
batch at the current weights, by power iteration on Hessian-vector products. ``L`` is the
compiled loss with its batch reduction (``mean`` or ``sum``, so with ``reduction: sum`` the
curvature is ``B`` times larger, as is the step the optimizer takes) plus any regularisation
losses of the model.

Tags:

* ``curvature/top_eigenvalue`` -- ``lambda_max(H)`` over all trainable parameters;
* ``curvature/<layer>/top_eigenvalue`` -- ``lambda_max(H_ll)`` of the layer's diagonal block
  (the curvature seen when only that layer's variables move);
* ``curvature/stability_limit`` -- the largest curvature the optimizer is stable on for a
  quadratic (below); ``curvature/sharpness_ratio`` = ``lambda_max / stability_limit``
  (``> 1``: gradient descent on the local quadratic model diverges along the top eigenvector);
* ``curvature/iterations`` -- Hessian-vector products used for the global estimate.

Stability limits, from the optimizer at the step of the estimate (``lr`` = its current
learning rate; Cohen et al., 2021, "Gradient descent on neural networks typically occurs at
the edge of stability", Appendix):

* SGD: ``2 / lr`` (``sharpness_ratio = lambda_max * lr / 2``);
* SGD with momentum ``beta`` (heavy ball, Keras's ``SGD(momentum=beta)``): ``(2 + 2 beta) / lr``;
* Nesterov momentum: ``(2 + 2 beta) / (lr (1 + 2 beta))``;
* any other optimizer (Adam, RMSprop, Adagrad, ...): the limit applies to the *preconditioned*
  Hessian, which this diagnostic does not compute, so only the eigenvalues are written (no
  limit, ratio or verdict). Gradient clipping is ignored.

Verdict: the first time ``sharpness_ratio > 1`` the diagnostic appends
``{"kind": "verdict", "layer": "model", "verdict": "unstable", "first_step": step, "message":
"sharpness above 2/lr ..."}`` to the model's observations (``observations_for(model).events``)
and to :meth:`Curvature.verdicts`.

Power iteration (``iterations`` at most, stopping early when the Rayleigh quotient changes by
at most ``tolerance`` relative; ``tolerance: 0`` always runs ``iterations``) converges to the
eigenvalue of largest *magnitude*, ``lambda_1``. When ``lambda_1 < 0`` (a non-convex loss with
strong negative curvature) a second power iteration on the shifted operator
``H - lambda_1 I`` (eigenvalues ``lambda - lambda_1 >= 0``) finds ``lambda_max - lambda_1``, so
the reported value is always the largest *algebraic* eigenvalue -- the one that matters for
stability. A zero Hessian (a loss linear in the parameters: the seed notebook's second
derivative of ``w*x + b`` is ``None``) gives 0. The start vector is
``tf.random.stateless_normal`` with ``seed`` (deterministic); with ``warm_start`` each later
estimate starts from the previous eigenvector, which usually converges in a few products.

Hessian-vector products are **back-over-back** with a persistent outer tape: the forward pass
and the gradient are computed once per estimate, and each product ``H v`` is one more backward
pass, ``outer.gradient(g, theta, output_gradients=v)``; a layer block is
``outer.gradient(g_l, theta_l, output_gradients=v_l) = H_ll v_l``. On the 784-512-512-10 MLP
benchmark (CPU, batch 256) that measured ~28 ms per product after the first, against ~50 ms for
a forward-over-back product (``tf.autodiff.ForwardAccumulator`` around a tape), which has to
redo the forward pass every time (:func:`hvp_forward_over_back` is kept as a cross-check).

Everything runs on the probe batch outside the train step, on tensors read from the model's
variables (also under a ``tf.distribute`` strategy); the computation is XLA-safe
(``jit_compile: true`` compiles it with XLA).
"""

from __future__ import annotations

import weakref
from typing import Callable, Sequence

import keras
import numpy as np
import tensorflow as tf

from gradlab import summaries
from gradlab.callbacks.base import Diagnostic, _count, check_int, check_number, register
from gradlab.callbacks.gradient_noise import layer_groups, loss_reduction, per_sample_loss_fn, read_params

Vector = list  # a list of tensors shaped like the parameters
ADAPTIVE_NOTE = ("the stability limit of an adaptive optimizer applies to the preconditioned Hessian; "
                 "only the raw eigenvalues are written")


# ---------------------------------------------------------------------------------------------
# Pure functions

def _dot(a: Vector, b: Vector) -> tf.Tensor:
    return tf.add_n([tf.reduce_sum(x * y) for x, y in zip(a, b)])


def _normalize(v: Vector) -> Vector:
    norm = tf.sqrt(_dot(v, v))
    return [x / tf.where(norm > 0, norm, 1.0) for x in v]


def start_vector(shapes: Sequence, seed: int) -> Vector:
    """A deterministic unit start vector: ``stateless_normal`` with ``seed``, one block per shape."""
    v = [tf.random.stateless_normal(s, seed=[seed, i], dtype=tf.float32) for i, s in enumerate(shapes)]
    return _normalize(v)


def _power_loop(matvec, v0: Vector, iterations: int, tolerance: float, shift_if_negative: bool):
    """Power iteration in one ``tf.while_loop``; optionally a second, shifted phase (see :func:`top_eigenvalue`).

    The loop state carries the shift ``s`` (0 in phase 0) and iterates ``A - s I``; when phase 0
    ends with ``lambda_1 < 0`` and ``shift_if_negative``, it restarts from ``v0`` with
    ``s = lambda_1``. One loop (rather than a second loop in a ``tf.cond``) keeps the traced graph
    -- each product is a whole backward pass -- half as large.
    """
    v0 = _normalize(v0)
    f32 = tf.float32

    def cond(i, k, phase, v, lam, shift, done):
        return tf.logical_not(done)

    def body(i, k, phase, v, lam, shift, done):
        w = [a - shift * b for a, b in zip(matvec(v), v)]
        new = _dot(v, w)
        norm = tf.sqrt(_dot(w, w))
        zero = tf.logical_not(norm > 0)
        v_next = [tf.where(zero, a, b / tf.where(zero, 1.0, norm)) for a, b in zip(v, w)]
        stop = tf.logical_or(zero, k + 1 >= iterations)
        if tolerance > 0:
            stop = tf.logical_or(stop, tf.logical_and(k > 0, tf.abs(new - lam) <= tolerance * tf.abs(new)))
        restart = tf.logical_and(stop, tf.logical_and(tf.equal(phase, 0), new < 0)) if shift_if_negative \
            else tf.constant(False)
        # phase 0 ended negative: start phase 1 on A - new I from v0
        v_next = [tf.where(restart, a, b) for a, b in zip(v0, v_next)]
        return (i + 1, tf.where(restart, 0, k + 1), tf.where(restart, 1, phase), v_next,
                tf.where(restart, tf.constant(0.0, f32), new), tf.where(restart, new, shift),
                tf.logical_and(stop, tf.logical_not(restart)))

    state = (tf.constant(0), tf.constant(0), tf.constant(0), v0, tf.constant(0.0, f32), tf.constant(0.0, f32),
             tf.constant(iterations <= 0))
    i, _, _, v, lam, shift, _ = tf.while_loop(cond, body, state)
    return lam + shift, v, i


def power_iteration(matvec: Callable[[Vector], Vector], v0: Vector, iterations: int,
                    tolerance: float = 0.0) -> tuple[tf.Tensor, Vector, tf.Tensor]:
    """Dominant eigenpair of a symmetric operator by power iteration (a ``tf.while_loop``).

    Each iteration computes ``w = A v``, the Rayleigh quotient ``lambda = v.w`` and
    ``v <- w/||w||``; it stops after ``iterations`` products, or when
    ``|lambda_k - lambda_{k-1}| <= tolerance |lambda_k|`` (never when ``tolerance`` is 0), or when
    ``w = 0`` (``A v = 0``: then ``lambda = 0``).

    Returns:
        ``(lambda, v, products)``: the eigenvalue of largest magnitude, the unit vector after the
        last product, and the number of products used.
    """
    return _power_loop(matvec, v0, iterations, tolerance, shift_if_negative=False)


def top_eigenvalue(matvec: Callable[[Vector], Vector], v0: Vector, iterations: int,
                   tolerance: float = 0.0) -> tuple[tf.Tensor, Vector, tf.Tensor]:
    """The largest *algebraic* eigenvalue of a symmetric operator (not the largest magnitude).

    Power iteration gives ``lambda_1``, the eigenvalue of largest magnitude. If it is negative,
    power iteration on ``A - lambda_1 I`` (positive semi-definite, top eigenvalue
    ``lambda_max - lambda_1``), restarted from ``v0``, recovers ``lambda_max``. ``iterations``
    applies to each phase, so at most ``2 * iterations`` products.

    Returns:
        ``(lambda_max, eigenvector, products used)``.
    """
    return _power_loop(matvec, v0, iterations, tolerance, shift_if_negative=True)


class HessianOperator:
    """Hessian-vector products of ``loss_fn(params)`` at ``params``, back-over-back (module docstring).

    Build it inside a ``tf.function`` (or eagerly): the forward pass and the gradient are
    recorded once on a persistent outer tape; :meth:`matvec` and :meth:`block_matvec` then cost
    one backward pass each.
    """

    def __init__(self, loss_fn: Callable[[Vector], tf.Tensor], params: Sequence[tf.Tensor]):
        self.params = [tf.convert_to_tensor(p) for p in params]
        with tf.GradientTape(persistent=True) as outer:
            outer.watch(self.params)
            with tf.GradientTape() as inner:
                inner.watch(self.params)
                self.loss = loss_fn(self.params)
            # Densified on the outer tape (an Embedding's gradient is IndexedSlices).
            self.grads = _dense(inner.gradient(self.loss, self.params, unconnected_gradients=tf.UnconnectedGradients.ZERO))
        self._tape = outer

    def block_matvec(self, indices: Sequence[int]) -> Callable[[Vector], Vector]:
        """``v_b -> H_bb v_b`` for the diagonal block of the parameters ``indices``."""
        indices = list(indices)

        def matvec(v):
            return _dense(self._tape.gradient([self.grads[i] for i in indices], [self.params[i] for i in indices],
                                              output_gradients=list(v),
                                              unconnected_gradients=tf.UnconnectedGradients.ZERO))

        return matvec

    def matvec(self, v: Vector) -> Vector:
        """``H v`` over all parameters."""
        return self.block_matvec(range(len(self.params)))(v)


def _dense(tensors) -> list[tf.Tensor]:
    """Gradients as dense tensors (``tf.IndexedSlices`` of a gather, e.g. an Embedding, densified)."""
    return [tf.convert_to_tensor(t) if isinstance(t, tf.IndexedSlices) else t for t in tensors]


def hvp_forward_over_back(loss_fn: Callable[[Vector], tf.Tensor], params: Sequence[tf.Tensor], v: Vector) -> Vector:
    """``H v`` by forward-over-back: a ``tf.autodiff.ForwardAccumulator`` (tangent ``v``) around a tape."""
    params = [tf.convert_to_tensor(p) for p in params]
    with tf.autodiff.ForwardAccumulator(params, list(v)) as acc:
        with tf.GradientTape() as tape:
            tape.watch(params)
            loss = loss_fn(params)
        grads = _dense(tape.gradient(loss, params, unconnected_gradients=tf.UnconnectedGradients.ZERO))
    return [tf.zeros_like(p) if j is None else tf.convert_to_tensor(j)
            for p, j in zip(params, acc.jvp(grads, unconnected_gradients=tf.UnconnectedGradients.ZERO))]


def hessian_top_eigenvalues(loss_fn: Callable[[Vector], tf.Tensor], params: Sequence[tf.Tensor],
                            groups: dict[str, list[int]] | None, iterations: int, tolerance: float = 0.0,
                            v_global: Vector | None = None, v_blocks: Vector | None = None,
                            seed: int = 0) -> dict[str, object]:
    """Top eigenvalues of the Hessian of ``loss_fn`` at ``params``: global and per parameter group.

    Args:
        loss_fn: ``params -> scalar loss``.
        params: parameter tensors.
        groups: ``{name: indices}`` for the block eigenvalues (``None``: global only). The groups
            must not overlap.
        iterations, tolerance: per power iteration (see :func:`power_iteration`).
        v_global, v_blocks: start vectors (one tensor per parameter; for the blocks, the
            restriction to each group is used); default :func:`start_vector` with ``seed``.

    Returns:
        ``{"top_eigenvalue": scalar, "iterations": int32, "vector": Vector,
        "blocks": {name: scalar}, "block_vectors": Vector}``.
    """
    op = HessianOperator(loss_fn, params)
    shapes = [p.shape for p in op.params]
    v0 = list(v_global) if v_global is not None else start_vector(shapes, seed)
    lam, vec, used = top_eigenvalue(op.matvec, v0, iterations, tolerance)
    out: dict[str, object] = {"top_eigenvalue": lam, "iterations": used, "vector": vec, "blocks": {}}
    block_vectors = list(v_blocks) if v_blocks is not None else start_vector(shapes, seed + 1)
    for name, indices in (groups or {}).items():
        b_lam, b_vec, _ = top_eigenvalue(op.block_matvec(indices), [block_vectors[i] for i in indices],
                                         iterations, tolerance)
        out["blocks"][name] = b_lam
        for i, t in zip(indices, b_vec):
            block_vectors[i] = t
    out["block_vectors"] = block_vectors
    return out


def batch_loss_fn(model) -> Callable[[Vector, tf.Tensor, tf.Tensor], tf.Tensor]:
    """``(params, x, y) -> L``: the compiled loss with its batch reduction, plus regularisation losses."""
    per_sample = per_sample_loss_fn(model)
    reduction = loss_reduction(model)

    def loss(params, x, y):
        non_trainable = [tf.convert_to_tensor(v.value) for v in model.non_trainable_variables]
        y_pred, _, extra = model.stateless_call(list(params), non_trainable, x, training=False, return_losses=True)
        values = per_sample(y, y_pred)
        total = tf.reduce_sum(values) if reduction == "sum" else tf.reduce_mean(values)
        for term in extra or []:
            total = total + tf.cast(tf.reduce_sum(term), tf.float32)
        return total

    return loss


def stability_limit(optimizer) -> tuple[float | None, str]:
    """``(limit, formula)``: the largest quadratic curvature the optimizer is stable on, or ``(None, why)``.

    See the module docstring; only ``keras.optimizers.SGD`` (plain, momentum, Nesterov) has one.
    """
    if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):  # mixed precision: the SGD inside
        optimizer = optimizer.inner_optimizer
    if type(optimizer) is not keras.optimizers.SGD:
        return None, ADAPTIVE_NOTE
    lr = float(np.asarray(keras.ops.convert_to_numpy(optimizer.learning_rate)))
    beta = float(getattr(optimizer, "momentum", 0.0) or 0.0)
    if beta == 0.0:
        return 2.0 / lr, "2/lr"
    if getattr(optimizer, "nesterov", False):
        return (2.0 + 2.0 * beta) / (lr * (1.0 + 2.0 * beta)), "(2+2β)/(lr(1+2β))"
    return (2.0 + 2.0 * beta) / lr, "(2+2β)/lr"


# ---------------------------------------------------------------------------------------------
# The diagnostic

@register("curvature")
class Curvature(Diagnostic):
    """Top Hessian eigenvalue (sharpness), globally and per layer, on the probe batch (module docstring).

    Args:
        log_dir: TensorBoard directory (``None``: publish to observations only).
        every: estimate every ``every`` steps (and at step 0); default 100.
        iterations: at most this many Hessian-vector products per power iteration (> 0).
        tolerance: stop when the eigenvalue changes by at most this fraction (>= 0; 0 never
            stops early).
        per_layer: also estimate each layer's diagonal-block eigenvalue (one more power
            iteration per layer).
        warm_start: start each estimate from the previous eigenvector.
        seed: seed of the deterministic start vector.
        jit_compile: compile the estimate with XLA. Off by default: on the CPU benchmark it was
            no faster and its first call compiled for ~5 s longer.
        probe_data, probe_size: the probe batch (default: the gradlab experiment's).
    """

    uses_probe = True
    probe_autograph = False  # explicit tf.while_loop / tf.cond only

    def __init__(self, *, log_dir: str | None = None, every: int = 100, iterations: int = 20,
                 tolerance: float = 1e-3, per_layer: bool = True, warm_start: bool = True, seed: int = 0,
                 jit_compile: bool = False, probe_data=None, probe_size: int = 256):
        super().__init__(log_dir=log_dir, every=every, probe_data=probe_data, probe_size=probe_size)
        self.iterations = check_int("iterations", iterations)
        self.tolerance = check_number("tolerance", tolerance, strict=False)
        for name, value in (("per_layer", per_layer), ("warm_start", warm_start), ("jit_compile", jit_compile)):
            if not isinstance(value, bool):
                raise ValueError(f"`{name}` ({value!r}) must be true or false")
        seed = check_int("seed", seed, minimum=0)
        self.per_layer, self.warm_start, self.seed, self.jit_compile = per_layer, warm_start, seed, jit_compile
        self._verdicts: list[dict] = []
        self._vectors: tuple[list, list] | None = None  # start vectors: global, blocks (tf.Variables)

    def verdicts(self) -> list[dict]:
        """The verdicts found in the last ``fit`` (``[]`` or one ``"unstable"`` verdict)."""
        return list(self._verdicts)

    def on_train_begin(self, logs=None):
        self._verdicts = []
        self.build_on_probe()  # a subclassed model's variables, before they are grouped by layer
        self._groups = layer_groups(self.model) if self.per_layer else {}
        outputs = _count(self.model, "outputs")
        if outputs is not None and outputs > 1:
            raise ValueError(f"curvature needs a model with one output (its loss is built from per-sample "
                             f"losses); {self.model.name!r} has {outputs}")
        self._loss = batch_loss_fn(self.model)
        shapes = [tuple(v.shape) for v in self.model.trainable_variables]
        key = (tuple(shapes), tuple(map(tuple, self._groups.values())), id(getattr(self.model, "loss", None)))
        owner = getattr(self, "_compute_owner", None)
        same_model = owner is not None and owner() is self.model and self._compute_key == key
        # The start vectors live in variables: the compiled probe reads them when it runs (a
        # Python value would be frozen into it when traced) and, with warm_start, the estimate
        # stores its eigenvectors there. They carry over to the next fit of the same model
        # (training goes on from the same weights); a new model starts from the seeded vectors.
        if not same_model:  # the compiled estimate and the vectors are reused across fit calls
            self._compute = tf.function(self._estimate, jit_compile=self.jit_compile, reduce_retracing=True,
                                        autograph=False)
            self._compute_key, self._compute_owner = key, weakref.ref(self.model)
            with tf.init_scope():
                self._vectors = tuple([tf.Variable(t, trainable=False) for t in start_vector(shapes, seed)]
                                      for seed in (self.seed, self.seed + 1))
        elif not self.warm_start:
            for variables, seed in zip(self._vectors, (self.seed, self.seed + 1)):
                for var, t in zip(variables, start_vector(shapes, seed)):
                    var.assign(t)
        self._limit_note_written = False
        super().on_train_begin(logs)

    def _estimate(self, params, x, y, v_global, v_blocks):
        """The pure computation: eigenvalues at ``params`` on ``(x, y)`` from the start vectors in
        the variables ``v_global``, ``v_blocks``, into which the eigenvectors go with ``warm_start``."""
        out = hessian_top_eigenvalues(lambda p: self._loss(p, x, y), params, self._groups, self.iterations,
                                      self.tolerance, v_global=[v.value() for v in v_global],
                                      v_blocks=[v.value() for v in v_blocks])
        if self.warm_start:
            for variables, vectors in ((v_global, out["vector"]), (v_blocks, out["block_vectors"])):
                for var, t in zip(variables, vectors):
                    var.assign(t)
        values = {"top_eigenvalue": out["top_eigenvalue"], "iterations": out["iterations"]}
        values.update({f"{name}/top_eigenvalue": lam for name, lam in out["blocks"].items()})
        return values

    def probe(self, model, x, y):
        v_global, v_blocks = self._vectors
        return self._compute(read_params(model), x, y, v_global, v_blocks)

    def write_probe(self, step, values):
        lam = float(values["top_eigenvalue"])
        self.scalar("curvature/top_eigenvalue", lam, step)
        self.scalar("curvature/iterations", float(values["iterations"]), step)
        for key, value in values.items():
            if key.endswith("/top_eigenvalue") and not key.startswith("@"):
                self.scalar(summaries.tag("curvature", *key.split("/")), float(value), step)
        limit, formula = stability_limit(self.model.optimizer)
        if limit is None:
            if not self._limit_note_written:
                self.text("curvature/stability_limit", ADAPTIVE_NOTE, step)
                self._limit_note_written = True
            return
        ratio = lam / limit
        self.scalar("curvature/stability_limit", limit, step)
        self.scalar("curvature/sharpness_ratio", ratio, step)
        if ratio > 1.0 and not self._verdicts:
            verdict = {"kind": "verdict", "layer": "model", "verdict": "unstable", "first_step": int(step),
                       "message": f"sharpness above {formula}: top Hessian eigenvalue {lam:.4g} > "
                                  f"{formula} = {limit:.4g} (ratio {ratio:.3g}) at step {int(step)}"}
            self._verdicts.append(verdict)
            self.observations.events.append(verdict)
