"""``gradlab check``: tape gradients against finite differences, in float64, per variable.

The check rebuilds the configured model (same architecture, initializers and seed) with the
float64 dtype policy, takes the first ``batch`` training rows, and compares, for every trainable
variable ``w`` of the model:

* the **tape gradient** ``t = dL/dw`` (reverse mode, what training uses), with
* the **central finite difference** ``n_i = (L(w + delta e_i) - L(w - delta e_i)) / (2 delta)``,

both computed by TensorFlow's own ``tf.test.compute_gradient`` (``L`` is the configured loss
with its batch reduction, ``mean`` or ``sum``). A variable with more than ``max_entries``
entries is checked on a fixed random subset of them (a gather/scatter reparametrisation, so
the tape still differentiates the real model); ``max_entries=0`` checks every entry.

Error per variable (a max-norm relative error)::

    rel_error = max_i |t_i - n_i| / max(max_i |t_i|, max_i |n_i|, floor)
    floor     = atol * max(1, |L|)

The ``floor`` keeps a variable whose gradient is (almost) zero -- a dead ReLU layer, a
saturated sigmoid -- from turning the finite-difference rounding noise (about
``eps * |L| / delta``) into a large *relative* error: such a variable is compared in absolute
terms. A variable passes when ``rel_error <= tolerance``. A correct float64 gradient gives
about 1e-9; a wrong one (a missing factor, a flipped sign, a wrong derivative) gives 0.1 to 2.

Edge cases: at a kink (ReLU/leaky ReLU with a pre-activation within ``delta * |x|`` of 0) the
two one-sided slopes differ and the central difference is their average, so the check can
fail there although the gradient is right; ``delta`` is small (2**-20) to make this unlikely,
and the message says so. Mixed precision is ignored: the check is always float64.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import numpy as np

DEFAULT_TOLERANCE = 1e-4
DEFAULT_DELTA = 2.0 ** -20  # exactly representable; small enough to rarely straddle a ReLU kink
DEFAULT_ATOL = 1e-6
DEFAULT_BATCH = 8
DEFAULT_MAX_ENTRIES = 512


@dataclasses.dataclass(frozen=True)
class VariableCheck:
    """The check of one variable: ``name`` (``layer/variable``), ``shape``, how many entries were
    compared, the largest gradient magnitude, the max absolute and relative error, and the verdict."""

    name: str
    shape: tuple[int, ...]
    entries: int
    checked: int
    max_abs_gradient: float
    max_abs_error: float
    rel_error: float
    passed: bool


@dataclasses.dataclass(frozen=True)
class CheckResult:
    """All variables of one check, the loss value at the checked point and the settings used."""

    loss: float
    variables: tuple[VariableCheck, ...]
    tolerance: float
    delta: float
    batch: int

    @property
    def passed(self) -> bool:
        """True when every variable's ``rel_error`` is within ``tolerance``."""
        return all(v.passed for v in self.variables)

    @property
    def max_rel_error(self) -> float:
        return max((v.rel_error for v in self.variables), default=0.0)


def relative_error(theoretical: np.ndarray, numerical: np.ndarray, floor: float) -> tuple[float, float]:
    """``(max |t - n|, max |t - n| / max(max|t|, max|n|, floor))`` (see the module docstring).

    Empty arrays give ``(0.0, 0.0)``. A NaN/Inf anywhere gives ``inf`` (never a pass).
    """
    t = np.asarray(theoretical, dtype=np.float64).ravel()
    n = np.asarray(numerical, dtype=np.float64).ravel()
    if t.size == 0:
        return 0.0, 0.0
    if not (np.all(np.isfinite(t)) and np.all(np.isfinite(n))):
        return float("inf"), float("inf")
    abs_err = float(np.max(np.abs(t - n)))
    scale = max(float(np.max(np.abs(t))), float(np.max(np.abs(n))), float(floor))
    return abs_err, abs_err / scale if scale > 0 else 0.0


def check_function(loss_fn: Callable[[list], object], values: Sequence[np.ndarray], names: Sequence[str], *,
                   tolerance: float = DEFAULT_TOLERANCE, delta: float = DEFAULT_DELTA, atol: float = DEFAULT_ATOL,
                   max_entries: int = DEFAULT_MAX_ENTRIES, seed: int = 0, batch: int = 0) -> CheckResult:
    """Check ``loss_fn(weights) -> scalar`` at ``values`` with ``tf.test.compute_gradient``.

    Args:
        loss_fn: maps a list of float64 tensors shaped like ``values`` to a scalar float64 loss.
        values: the point to check at, one array per variable (cast to float64).
        names: a name per variable, used in the report.
        tolerance: the largest ``rel_error`` that passes.
        delta: the finite-difference step.
        atol: the floor factor (``floor = atol * max(1, |L|)``).
        max_entries: entries checked per variable at most (a fixed random subset); 0 = all.
        seed: picks the subset.
        batch: recorded in the result (the number of samples behind ``loss_fn``).

    Returns:
        A :class:`CheckResult`; ``result.passed`` is the verdict.
    """
    import tensorflow as tf

    base = [tf.constant(np.asarray(v, dtype=np.float64)) for v in values]
    rng = np.random.default_rng(seed)
    picks = []
    for v in base:
        size = int(np.prod(v.shape)) if v.shape.rank else 1
        if max_entries and size > max_entries:
            idx = np.sort(rng.choice(size, size=max_entries, replace=False))
        else:
            idx = np.arange(size)
        picks.append(idx)

    def substituted(*subsets):
        full = []
        for v, idx, sub in zip(base, picks, subsets):
            flat = tf.reshape(v, [-1])
            flat = tf.tensor_scatter_nd_update(flat, idx.reshape(-1, 1), tf.reshape(sub, [-1]))
            full.append(tf.reshape(flat, tf.shape(v)))
        return tf.reshape(loss_fn(full), [])

    fn = tf.function(substituted, reduce_retracing=True)
    start = [tf.gather(tf.reshape(v, [-1]), idx) for v, idx in zip(base, picks)]
    loss_value = float(fn(*start).numpy())
    theoretical, numerical = tf.test.compute_gradient(fn, start, delta=delta)
    floor = atol * max(1.0, abs(loss_value)) if np.isfinite(loss_value) else atol
    checks = []
    for name, v, idx, t, n in zip(names, base, picks, theoretical, numerical):
        abs_err, rel = relative_error(t, n, floor)
        checks.append(VariableCheck(
            name=name, shape=tuple(int(d) for d in v.shape), entries=int(np.prod(v.shape)) if v.shape.rank else 1,
            checked=len(idx), max_abs_gradient=float(np.max(np.abs(t))) if np.size(t) else 0.0,
            max_abs_error=abs_err, rel_error=rel, passed=bool(rel <= tolerance)))
    return CheckResult(loss=loss_value, variables=tuple(checks), tolerance=tolerance, delta=delta, batch=batch)


def check_model(model, loss, x: np.ndarray, y: np.ndarray, **kwargs) -> CheckResult:
    """Check a built Keras model and loss on the batch ``(x, y)``.

    The loss is ``loss(y, model(x))`` evaluated with ``model.stateless_call``, so the weights
    are substituted functionally and the model is left untouched. Build the model under the
    ``float64`` dtype policy (see :func:`float64_policy`) for a meaningful check.

    Args:
        model: a built Keras model whose output is what ``loss`` expects (logits for gradlab).
        loss: ``loss(y_true, y_pred) -> scalar`` (a ``keras.losses.Loss`` or a function).
        x, y: the batch.
        **kwargs: passed to :func:`check_function`.

    Raises:
        ValueError: a trainable variable is not float64, or ``loss`` is a ``keras.losses.Loss``
            that computes in another dtype (it takes ``floatx`` when it is created, so one made
            outside :func:`float64_policy` rounds to float32 and fails a correct model).
    """
    import keras
    import tensorflow as tf

    from gradlab.summaries import variable_names

    trainable = list(model.trainable_variables)
    low = [f"{'/'.join(n)} ({v.dtype})" for n, v in zip(variable_names(model), trainable) if v.dtype != "float64"]
    if low:
        raise ValueError(f"check_model needs a float64 model: build it inside `with gradcheck.float64_policy():` "
                         f"(not float64: {', '.join(low[:3])}{' ...' if len(low) > 3 else ''})")
    if isinstance(loss, keras.losses.Loss) and loss.dtype != "float64":
        raise ValueError(f"the loss {type(loss).__name__} computes in {loss.dtype} (a Keras loss takes floatx when "
                         "it is created): create it inside `with gradcheck.float64_policy():` too")
    non_trainable = [v.value for v in model.non_trainable_variables]
    x64 = tf.constant(np.asarray(x, dtype=np.float64))
    y_t = tf.constant(np.asarray(y))

    def loss_fn(weights):
        out, _ = model.stateless_call(weights, non_trainable, x64, training=False)
        return loss(y_t, out)

    names = ["/".join(pair) for pair in variable_names(model)]
    values = [np.asarray(v.numpy(), dtype=np.float64) for v in trainable]
    kwargs.setdefault("batch", int(np.shape(x)[0]))
    return check_function(loss_fn, values, names, **kwargs)


class float64_policy:
    """Context manager: Keras ``floatx`` and dtype policy float64 inside, restored on exit."""

    def __enter__(self):
        import keras

        self._floatx, self._policy = keras.config.floatx(), keras.config.dtype_policy()
        keras.config.set_floatx("float64")
        keras.config.set_dtype_policy("float64")
        return self

    def __exit__(self, *exc):
        import keras

        keras.config.set_floatx(self._floatx)
        keras.config.set_dtype_policy(self._policy)
        return False


def check_config(exp, *, batch: int = DEFAULT_BATCH, **kwargs) -> CheckResult:
    """Check the model and loss of a validated :class:`~gradlab.config.Experiment`.

    Uses the first ``batch`` training rows of the configured data (fewer if there are fewer),
    the configured model kind, hidden widths, activation and initializers with ``exp.seed``, and
    ``exp.train.loss`` with ``exp.train.reduction``.
    """
    from gradlab.data import make_data
    from gradlab.losses import make_loss
    from gradlab.models import build_model

    if batch < 1:
        from gradlab.errors import UsageError

        raise UsageError(f"--batch ({batch}) must be a positive integer")
    data = make_data(exp.data, exp.seed)
    x, y = data.x_train[:batch], data.y_train[:batch]
    with float64_policy():
        model = build_model(exp.model, features=data.features, classes=data.classes, seed=exp.seed)
        loss = make_loss(exp.train.loss, exp.train.reduction)
        kwargs.setdefault("seed", exp.seed)
        return check_model(model, loss, x, y, **kwargs)


def format_result(result: CheckResult, kinks: bool = True) -> str:
    """The table ``gradlab check`` prints: one line per variable and a verdict line; on a failure,
    with ``kinks`` (a model with relu/leaky_relu units), a hint that a kink can cause it."""
    width = max([len(v.name) for v in result.variables] + [8])
    lines = [f"{'variable':<{width}}  {'shape':<12} {'checked':>9}  {'max |grad|':>11}  {'max rel error':>13}",
             ]
    for v in result.variables:
        checked = f"{v.checked}/{v.entries}" if v.checked != v.entries else str(v.entries)
        mark = "ok" if v.passed else "FAIL"
        lines.append(f"{v.name:<{width}}  {str(list(v.shape)):<12} {checked:>9}  {v.max_abs_gradient:11.3e}  "
                     f"{v.rel_error:13.3e}  {mark}")
    failed = [v.name for v in result.variables if not v.passed]
    head = (f"loss {result.loss:.6g} on a batch of {result.batch}, float64, central differences with "
            f"delta {result.delta:.3g}")
    if failed:
        verdict = (f"FAILED: {len(failed)} of {len(result.variables)} variables above tolerance "
                   f"{result.tolerance:g} ({', '.join(failed)})" + (
                       "; a kink of relu/leaky_relu within delta of a pre-activation can also cause this -- "
                       "rerun with another --batch to tell" if kinks else ""))
    else:
        verdict = (f"passed: every variable within tolerance {result.tolerance:g} "
                   f"(max rel error {result.max_rel_error:.2e})")
    return "\n".join([head] + lines + [verdict])
