#!/usr/bin/env python
"""Throughput of gradlab's custom GradientTape step and the cost of its diagnostics.

Everything runs in one process, on the same data and model, alternating variants over several
rounds, and reports samples/s (best of the rounds) and ratios against the baseline of the same
block. The machine is noisy (a shared VM whose second core comes and goes), so it also reports
the ratio of CPU time (``time.process_time``: all threads of this process), which is what a
diagnostic costs in work and is not skewed by time the process spends descheduled.

Model: MLP 784-512-512-10 (relu), cross-entropy from logits, SGD(0.01); data: 60,000 synthetic
samples (``--samples``), one epoch per timing.

Blocks:

1. step: Keras's built-in ``train_step`` (plain ``keras.Model``) vs gradlab's ``GradlabModel``
   at batch 256, ``steps_per_execution=1`` (target ratio >= 1.00).
2. batch 32: Keras's default settings vs gradlab with ``steps_per_execution`` 1 and 16.
3. overhead: gradlab without diagnostics vs the default diagnostics set, and vs gradient_stats
   every step (targets <= 1.03x and <= 1.10x slowdown).
   breakdown (not in the default run): each diagnostic of the default set alone, to see where
   the defaults' cost goes. Both end with a control row: the no-diagnostics variant again,
   whose ratios show how far this run's noise alone moves a ratio from 1.
4. second_order: curvature every 100 steps with 20 power iterations (target <= 1.3x) and every step,
   gradient_noise every step (<= 2x) and every 10 steps (<= 1.15x): curvature on the probe batch
   of 256, gradient_noise from the training step (its default in gradlab runs) and, for
   comparison, from the probe batch.

5. lockstep, lockstep_breakdown (not in the default run), lockstep_second_order: the variants
   of overhead, breakdown and second_order run in *lockstep*: one step of each variant in turn, the order rotating
   (``run_lockstep``). On this VM the machine's state (one core or two, other tenants) changes
   between epochs by more than the costs measured, so epoch-level ratios move by 5-20% from run
   to run, control rows included; step-interleaved variants share the machine's state, and the
   control row stays within ~1%. These are the figures to compare with the targets. The other
   blocks also print a "per step" ratio (group medians by ``step % 100`` over each variant's
   epochs of the fast state), better than epoch times but still exposed to the same drift.

6. floor, lockstep_floor (the latter in the default run): the arithmetic of the gradient
   statistics alone (floor_xla, lockstep_floor_xla, not in the default run: the same with XLA
   fusing each gradient's reductions) (:class:`FloorSGD`: the same TensorFlow reductions on the step's gradients,
   with nothing around them) next to the diagnostics that need it: how much of their cost is the
   arithmetic and how much everything else, and a floor for the targets on this machine.

Every diagnostic writes its TensorBoard events (to a temporary directory), as in a real run.

Usage: ``python scripts/bench.py [--quick] [--rounds N] [--samples N] [--block step,batch32,overhead,lockstep,lockstep_floor] [--threads N]``
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from gradlab import plugins  # noqa: E402
from gradlab.callbacks import Curvature, GradientNoise, GradientStats  # noqa: E402
from gradlab.losses import make_loss  # noqa: E402
from gradlab.train_step import GradlabModel  # noqa: E402


def make_data(samples: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(samples, 784)).astype(np.float32)
    y = rng.integers(0, 10, size=samples).astype(np.int32)
    return x, y


def make_model(kind: str, seed: int = 0):
    """``kind``: "keras" (Keras's built-in step), "gradlab" (GradlabModel) or "floor" (:class:`FloorModel`)."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((784,), name="features")
    h = keras.layers.Dense(512, activation="relu", name="hidden_1")(inputs)
    h = keras.layers.Dense(512, activation="relu", name="hidden_2")(h)
    logits = keras.layers.Dense(10, name="logits")(h)
    if kind == "keras":
        model = keras.Model(inputs, logits)
        loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    elif kind == "floor":
        model = FloorModel(inputs=inputs, outputs=logits)
        loss = make_loss("cross_entropy", "mean")
    else:
        model = GradlabModel(inputs=inputs, outputs=logits)
        loss = make_loss("cross_entropy", "mean")
    return model, loss


class FloorSGD(keras.optimizers.SGD):
    """SGD that first does the *arithmetic* of gradlab's gradient statistics, and nothing else:
    what these TensorFlow reductions cost in a step, a floor for any implementation built on them.

    * ``norms_every_step``: ``sum(g^2)`` of every gradient at every step (``tf.nn.l2_loss``: one
      fused pass). gradlab needs it at every step for the window max that catches a spike between
      two writes and for the NaN/Inf guard (a gradient with a NaN/Inf has a NaN/Inf squared norm).
    * due steps (``due``, set by :class:`FloorModel` per execution): ``sum g``, ``max g``, ``min g``
      and the zero count (``mean, max_abs, zero_fraction``; ``std`` follows from the sums), and
      ``sum(w^2)`` of the weights before the update (the update ratio's denominator). The update's
      own norm is left out: for SGD it is ``lr * ||g||``, known from the squared norm.

    No window, no branch (:class:`FloorModel` runs a due and a plain compiled step, chosen in
    Python), no writes, no Python per step: the results go into one variable each, so that the
    ops are not pruned, and the update waits only for the weight norms.

    ``xla``: the same arithmetic in XLA-compiled clusters inside the (not XLA-compiled) step
    (:func:`_xla_norms`, :func:`_xla_stats`), where XLA can fuse the reductions over one
    gradient into one pass: the alternative to TensorFlow's separate reductions (block
    ``floor_xla``)."""

    def __init__(self, learning_rate, *, n_variables, norms_every_step=True, xla=False, **kwargs):
        super().__init__(learning_rate, **kwargs)
        self.norms_every_step, self.due, self.xla = norms_every_step, False, xla
        self.kept_norms = tf.Variable(tf.zeros([n_variables]), trainable=False)
        self.kept_stats = tf.Variable(tf.zeros([5, n_variables]), trainable=False)

    def apply_gradients(self, grads_and_vars):
        grads_and_vars = list(grads_and_vars)
        if self.xla:
            grads = [g for g, _ in grads_and_vars]
            before = []
            if self.due:
                stats = _xla_stats(grads, [tf.convert_to_tensor(v) for _, v in grads_and_vars])
                self.kept_norms.assign(stats[0])
                self.kept_stats.assign(stats[1:])
                before = [stats]
            elif self.norms_every_step:
                self.kept_norms.assign(_xla_norms(grads))
            with tf.control_dependencies(before):
                return super().apply_gradients(grads_and_vars)
        grads = [tf.reshape(g, [-1]) for g, _ in grads_and_vars]
        if self.norms_every_step:
            self.kept_norms.assign(2.0 * tf.stack([tf.nn.l2_loss(g) for g in grads]))
        before = []
        if self.due:
            before = [2.0 * tf.stack([tf.nn.l2_loss(v) for _, v in grads_and_vars])]
            self.kept_stats.assign(tf.stack([
                tf.stack([tf.reduce_sum(g) for g in grads]), tf.stack([tf.reduce_max(g) for g in grads]),
                tf.stack([tf.reduce_min(g) for g in grads]),
                tf.stack([tf.reduce_sum(tf.cast(tf.equal(g, 0.0), tf.float32)) for g in grads]), before[0]]))
        with tf.control_dependencies(before):
            return super().apply_gradients(grads_and_vars)


@tf.function(jit_compile=True)
def _xla_norms(grads):
    """``sum(g^2)`` of every gradient, as one XLA cluster."""
    return tf.stack([tf.reduce_sum(tf.square(g)) for g in grads])


@tf.function(jit_compile=True)
def _xla_stats(grads, weights):
    """``[sum g^2, sum g, max g, min g, #(g == 0), sum w^2]`` per variable (rows), as one XLA cluster."""
    rows = []
    for g, w in zip(grads, weights):
        g = tf.reshape(g, [-1])
        rows.append(tf.stack([tf.reduce_sum(g * g), tf.reduce_sum(g), tf.reduce_max(g), tf.reduce_min(g),
                              tf.reduce_sum(tf.cast(tf.equal(g, 0.0), tf.float32)), tf.reduce_sum(tf.square(w))]))
    return tf.stack(rows, axis=1)


class FloorModel(keras.Model):
    """A plain Keras model (Keras's own ``train_step``) compiled with a :class:`FloorSGD`: two
    compiled steps, one with the due-step arithmetic, one without, chosen in Python from the
    step count (``stats_every``; 0: never due). ``steps_per_execution`` must be 1."""

    stats_every = 0

    def make_train_function(self, force=False):
        if self.train_function is not None and not force:
            return self.train_function
        optimizer, fns = self.optimizer, {}
        for due in (False, True):  # traced at its first call, with optimizer.due set as below
            super().make_train_function(force=True)
            fns[due] = self.train_function

        def train_function(iterator):
            step = int(optimizer.iterations.numpy()) if self._floor_step is None else self._floor_step
            optimizer.due = bool(self.stats_every) and step % self.stats_every == 0
            self._floor_step = step + 1
            return fns[optimizer.due](iterator)

        self._floor_step = None  # read from the optimizer at the first execution, then counted here
        self.train_function = train_function
        return train_function


# Step costs are grouped by ``step % PERIOD``: every schedule in the blocks divides it, so steps of
# one group do the same work (see ``Variant.per_step``).
PERIOD = 100
# This VM's second core comes and goes for whole epochs, which then run ~1.8x slower. The
# "per step" ratio uses each variant's epochs of the fast state only: those whose median step is
# within FAST_STATE of the variant's fastest epoch (far below 1.8; a variant none of whose epochs
# ran in the fast state shows as a ratio off by that much).
FAST_STATE = 1.4


class StepClock(keras.callbacks.Callback):
    """Stamps the start of every batch (``on_train_batch_begin``, which Keras calls on the main
    thread before the step). ``async_safe``, and it has no ``on_train_batch_end``: adding it does
    not change how Keras dispatches the other callbacks (a callback with a batch-end hook makes
    Keras run them all synchronously), so it measures the variants as they run without it."""

    async_safe = True

    def __init__(self):
        super().__init__()
        self.stamps, self.cpu_stamps, self.first_step = [], [], 0

    def on_epoch_begin(self, epoch, logs=None):
        self.first_step = int(self.model.optimizer.iterations.numpy())  # once per epoch, every variant
        self.stamps, self.cpu_stamps = [], []

    def on_train_batch_begin(self, batch, logs=None):
        self.stamps.append(time.perf_counter())
        self.cpu_stamps.append(time.process_time())


class Variant:
    """One configuration to time: model kind, batch size, steps_per_execution, callbacks factory;
    for ``kind="floor"``, ``floor=(norms_every_step, stats_every[, xla])`` (:class:`FloorSGD`)."""

    def __init__(self, label, kind="gradlab", batch=256, spe=1, callbacks=None, floor=(True, 0)):
        self.label, self.kind, self.batch, self.spe, self.floor = label, kind, batch, spe, floor
        self.callbacks = callbacks or (lambda model, x, y: [])
        self.times: list[float] = []
        self.cpu: list[float] = []  # samples per CPU-second of this process (all threads)
        self.clock = StepClock()
        # per timed epoch: (its median step time, {step % PERIOD: seconds from one batch start to
        # the next}, the same in CPU seconds)
        self.epochs: list[tuple[float, dict[int, list[float]], dict[int, list[float]]]] = []

    def setup(self, x, y):
        self.model, loss = make_model(self.kind)
        optimizer = keras.optimizers.SGD(0.01)
        if self.kind == "floor":
            optimizer = FloorSGD(0.01, n_variables=len(self.model.trainable_variables), norms_every_step=self.floor[0],
                                 xla=len(self.floor) > 2 and self.floor[2])
            self.model.stats_every = self.floor[1]
        self.model.compile(optimizer=optimizer, loss=loss,
                           metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
                           steps_per_execution=self.spe, jit_compile=False)
        if self.kind == "gradlab":
            self.model.gradlab_probe_batch = (x[:256], y[:256])
        self.ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(self.batch).prefetch(tf.data.AUTOTUNE)
        self.cbs = self.callbacks(self.model, x, y)
        # warm-up: trace and run a few steps (with the callbacks, so taps are traced too)
        self.model.fit(self.ds.take(max(4, 2 * self.spe)), epochs=1, verbose=0, callbacks=self.cbs)

    def time_epoch(self, samples):
        # Each timing is a separate fit(), whose set-up objects pile up between timings and trigger
        # full (generation-2) garbage collections of ~250 ms at random points of random variants;
        # in one long fit there are none (measured). Collect before the clock starts.
        gc.collect()
        start, cpu = time.perf_counter(), time.process_time()
        self.model.fit(self.ds, epochs=1, verbose=0, callbacks=self.cbs + [self.clock])
        elapsed, cpu_used = time.perf_counter() - start, time.process_time() - cpu
        self.times.append(samples / elapsed)
        self.cpu.append(samples / cpu_used)
        # Batch i's interval (its start to the next batch's start: its steps, the callbacks after
        # them, the fit loop), per step, belongs to its first step; the last batch has no next start.
        clock, first = self.clock, self.clock.first_step
        groups: dict[int, list[float]] = {}
        cpu_groups: dict[int, list[float]] = {}
        for i in range(len(clock.stamps) - 1):
            key = (first + i * self.spe) % PERIOD
            groups.setdefault(key, []).append((clock.stamps[i + 1] - clock.stamps[i]) / self.spe)
            cpu_groups.setdefault(key, []).append((clock.cpu_stamps[i + 1] - clock.cpu_stamps[i]) / self.spe)
        if groups:
            self.epochs.append((statistics.median(t for g in groups.values() for t in g), groups, cpu_groups))

    def per_step(self, cpu: bool = False) -> tuple[float | None, int]:
        """Seconds per step (``cpu``: CPU seconds of the process, all threads) from the epochs of
        the machine's fast state (median step within ``FAST_STATE`` of this variant's fastest
        epoch), and how many epochs that is.

        The median interval of each ``step % PERIOD`` group, averaged over the groups: a due step
        and the steps between writes keep their share of the mean (every group counts once per
        period, as in a long run), while a stall, which lands on random steps, drops out of each
        group's median."""
        if not self.epochs:
            return None, 0
        slowest_epoch = FAST_STATE * min(epoch[0] for epoch in self.epochs)
        kept = [epoch[2 if cpu else 1] for epoch in self.epochs if epoch[0] <= slowest_epoch]
        merged: dict[int, list[float]] = {}
        for groups in kept:
            for key, times in groups.items():
                merged.setdefault(key, []).extend(times)
        if not merged:
            return None, 0
        return sum(statistics.median(t) for t in merged.values()) / len(merged), len(kept)

    def epoch_in_steps(self, steps: int | None = None):
        """One epoch of ``fit``, one execution per ``next()``: what Keras 3's TensorFlow ``fit`` does
        (its epoch iterator, a CallbackList built as ``fit`` builds it, the same hooks in the same
        order), so that :func:`run_lockstep` can interleave variants step by step. Each ``next()``
        yields ``(step, seconds, cpu_seconds)`` of one batch: its begin hook, the compiled step and
        its end hook. Uses Keras internals (``TFEpochIterator``); the timed work is fit's own."""
        from keras.src.backend.tensorflow.trainer import TFEpochIterator

        model = self.model
        epoch = TFEpochIterator(x=self.ds, steps_per_epoch=steps, distribute_strategy=model.distribute_strategy,
                                steps_per_execution=model.steps_per_execution)
        callbacks = keras.callbacks.CallbackList(self.cbs, add_history=True, add_progbar=False, verbose=0, epochs=1,
                                                 steps=epoch.num_batches, model=model)
        model.stop_training = False
        model.make_train_function()
        callbacks.on_train_begin()
        model.reset_metrics()
        callbacks.on_epoch_begin(0)
        first = int(model.optimizer.iterations.numpy())
        logs = {}
        with epoch.catch_stop_iteration():
            for i, (begin, end, iterator) in enumerate(epoch):
                start, cpu = time.perf_counter(), time.process_time()
                callbacks.on_train_batch_begin(begin)
                logs = model.train_function(iterator)
                callbacks.on_train_batch_end(end, logs)
                yield first + i * self.spe, time.perf_counter() - start, time.process_time() - cpu
                if model.stop_training:
                    break
        callbacks.on_epoch_end(0, dict(model._get_metrics_result_or_logs(logs)))
        callbacks.on_train_end()

    @property
    def best(self) -> float:
        return max(self.times)

    @property
    def median(self) -> float:
        return statistics.median(self.times)


_TMP = tempfile.TemporaryDirectory(prefix="gradlab-bench-")


def log_dir(name: str) -> str:
    """A fresh TensorBoard directory: diagnostics are timed writing their events, as in a run."""
    return tempfile.mkdtemp(prefix=name + "-", dir=_TMP.name)


def default_diagnostics(model, x, y):
    specs = plugins.default_specs()
    path = log_dir("defaults")
    return [plugins.instantiate_diagnostic(plugins.resolve_diagnostic(s.type), s, log_dir=path) for s in specs]


def only(spec: dict):
    """One diagnostic of the default set, built as a run builds it (for the ``breakdown`` block)."""
    def build(model, x, y):
        from gradlab.config import DiagnosticSpec

        s = DiagnosticSpec(type=spec["type"], options={k: v for k, v in spec.items() if k != "type"})
        return [plugins.instantiate_diagnostic(plugins.resolve_diagnostic(s.type), s, log_dir=log_dir(s.type))]
    return build


def gradient_stats_every_step(model, x, y):
    return [GradientStats(log_dir=log_dir("gradient_stats"), every=1, histogram_every=0)]


def curvature_every(n):
    return lambda model, x, y: [Curvature(log_dir=log_dir("curvature"), every=n, iterations=20)]


def curvature_exactly_20(model, x, y):
    return [Curvature(log_dir=log_dir("curvature"), every=100, iterations=20, tolerance=0.0, warm_start=False)]


def noise_every(n, source="auto"):
    return lambda model, x, y: [GradientNoise(log_dir=log_dir("noise"), every=n, source=source)]


# The first variant again, timed like the others: its ratios against the first are this run's
# noise floor (a difference smaller than their distance from 1.000 is not resolved).
CONTROL = "control: no diagnostics again"

BLOCKS = {
    "step": lambda: [Variant("keras built-in step, batch 256", kind="keras"),
                     Variant("gradlab GradientTape step, batch 256")],
    "batch32": lambda: [Variant("keras defaults, batch 32", kind="keras", batch=32),
                        Variant("gradlab, batch 32, steps_per_execution=1", batch=32),
                        Variant("gradlab, batch 32, steps_per_execution=16", batch=32, spe=16)],
    "overhead": lambda: [Variant("gradlab, no diagnostics"),
                         Variant("gradlab, default diagnostics", callbacks=default_diagnostics),
                         Variant("gradlab, gradient_stats every step", callbacks=gradient_stats_every_step),
                         Variant(CONTROL)],
    "breakdown": lambda: [Variant("gradlab, no diagnostics"),
                          *(Variant(f"only {d['type']}" + (f" every {d['every']}" if "every" in d else ""),
                                    callbacks=only(d)) for d in plugins.DEFAULT_DIAGNOSTICS),
                          Variant("only gradient_stats every 10, no histograms",
                                  callbacks=only({"type": "gradient_stats", "every": 10, "histogram_every": 0})),
                          Variant("gradlab, default diagnostics", callbacks=default_diagnostics),
                          Variant(CONTROL)],
    # The arithmetic alone (FloorSGD), next to the diagnostics that need it: a floor for any
    # implementation of these statistics built on the same TensorFlow reductions.
    "floor": lambda: [Variant("gradlab, no diagnostics"),
                      Variant("floor: Keras step, nothing computed", kind="floor", floor=(False, 0)),
                      Variant("floor: squared norms every step", kind="floor", floor=(True, 0)),
                      Variant("floor: + statistics every 10 steps", kind="floor", floor=(True, 10)),
                      Variant("floor: + statistics every step", kind="floor", floor=(True, 1)),
                      Variant("gradlab, default diagnostics", callbacks=default_diagnostics),
                      Variant("gradlab, gradient_stats every step", callbacks=gradient_stats_every_step),
                      Variant(CONTROL)],
    # The same arithmetic with XLA fusing each gradient's reductions (in clusters inside the step).
    "floor_xla": lambda: [Variant("gradlab, no diagnostics"),
                          Variant("floor: Keras step, nothing computed", kind="floor", floor=(False, 0)),
                          Variant("floor: squared norms every step", kind="floor", floor=(True, 0)),
                          Variant("floor XLA: squared norms every step", kind="floor", floor=(True, 0, True)),
                          Variant("floor: + statistics every step", kind="floor", floor=(True, 1)),
                          Variant("floor XLA: + statistics every step", kind="floor", floor=(True, 1, True)),
                          Variant(CONTROL)],
    "second_order": lambda: [Variant("gradlab, no diagnostics"),
                             Variant("curvature every 100 steps, <=20 iterations", callbacks=curvature_every(100)),
                             Variant("curvature every step, <=20 iterations", callbacks=curvature_every(1)),
                             Variant("curvature every 100 steps, exactly 20 iter.", callbacks=curvature_exactly_20),
                             Variant("gradient_noise every step", callbacks=noise_every(1)),
                             Variant("gradient_noise every 10 steps", callbacks=noise_every(10)),
                             Variant("gradient_noise every step, probe source", callbacks=noise_every(1, "probe"))],
}


def per_step_ratio(measured, base_step, rounds, epochs: bool = True) -> str:
    step, used = measured
    counted = f" ({used}/{rounds})" if epochs else ""
    if step is None or not base_step:
        return f"{'-':>9}{counted}"
    return f"{step / base_step:>8.3f}x{counted}"


def run_block(name, variants, x, y, rounds):
    for v in variants:
        v.setup(x, y)
    for r in range(rounds):
        order = variants if r % 2 == 0 else list(reversed(variants))
        for v in order:
            v.time_epoch(len(x))
    base = variants[0]
    print(f"\n[{name}] {len(x)} samples; wall clock: best of {rounds} epochs (median in its own column); "
          f"CPU time: median samples per CPU-second; paired: median over rounds of the slowdown "
          f"against the first variant's epoch of the same round; per step: median time per step in "
          f"each group of steps with the same step % {PERIOD}, averaged over the groups, from the epochs of "
          f"the machine's fast state (median step within {FAST_STATE}x of the variant's fastest epoch; how many of "
          f"the {rounds} epochs: in brackets; Variant.per_step); CPU/step: the same in CPU time")
    print(f"  {'variant':<46} {'samples/s':>10} {'vs first':>9} {'slowdown':>9} {'median':>9}"
          f" {'CPU slowdown':>13} {'paired':>8} {'per step':>9} {'epochs'} {'CPU/step':>9}")
    base_cpu = statistics.median(base.cpu)
    base_step, base_step_cpu = base.per_step()[0], base.per_step(cpu=True)[0]
    for v in variants:
        ratio = v.best / base.best
        cpu_ratio = base_cpu / statistics.median(v.cpu)
        # Epochs of one round run back to back, so they are likelier to see the same machine state
        # (one core or two) than the best epochs of two variants are.
        paired = statistics.median(b / t for b, t in zip(base.times, v.times))
        print(f"  {v.label:<46} {v.best:>10,.0f} {ratio:>8.3f}x {1 / ratio:>8.3f}x {v.median:>9,.0f}"
              f" {cpu_ratio:>12.3f}x {paired:>7.3f}x {per_step_ratio(v.per_step(), base_step, rounds)}"
              f" {per_step_ratio(v.per_step(cpu=True), base_step_cpu, rounds, epochs=False)}")
    return {v.label: v.best for v in variants}


def run_lockstep(name, variants, x, y, rounds):
    """Every variant runs its epoch one step at a time, in turn (the order rotating from step to
    step), so that step ``i`` of every variant sees the machine in the same state: on this VM the
    state changes between epochs by more than the costs measured, and epoch-level comparisons
    cannot separate the two. Reported per variant: the median time of each group of steps with
    the same ``step % PERIOD`` (every variant has the same step counts), averaged over the
    groups, against the first variant. Wall time only: the process's CPU time covers whatever
    its threads do while a step runs, which here includes the other variants' leftovers."""
    for v in variants:
        v.setup(x, y)
    steps = len(x) // variants[0].batch
    wall = [dict() for _ in variants]
    for r in range(rounds):
        gc.collect()
        runs = [v.epoch_in_steps(steps) for v in variants]
        for tick in range(steps):
            order = list(range(len(variants)))
            k = tick % len(order)
            for j in order[k:] + order[:k]:
                timed = next(runs[j], None)
                if timed is None:  # a callback stopped training (fit would stop too): no fair comparison left
                    raise SystemExit(f"lockstep: {variants[j].label!r} stopped training after {tick} of {steps} steps")
                step, seconds, _ = timed
                if tick < steps - 1:  # the last step also closes the epoch in some variants
                    wall[j].setdefault(step % PERIOD, []).append(seconds)
        for run in runs:  # on_epoch_end, on_train_end
            for _ in run:
                pass

    def per_step(groups):
        return sum(statistics.median(t) for t in groups.values()) / len(groups)

    base = per_step(wall[0])
    print(f"\n[{name}] {len(x)} samples, {rounds} epochs per variant, run in lockstep (one step of each "
          f"variant in turn); per step: median of each step % {PERIOD} group, averaged over the groups")
    print(f"  {'variant':<46} {'ms/step':>9} {'slowdown':>9}")
    for v, groups in zip(variants, wall):
        t = per_step(groups)
        print(f"  {v.label:<46} {t * 1e3:>9.3f} {t / base:>8.3f}x")


# A lockstep block runs the variants of the named block (run_lockstep).
LOCKSTEP = {"lockstep": "overhead", "lockstep_breakdown": "breakdown", "lockstep_second_order": "second_order",
            "lockstep_floor": "floor", "lockstep_floor_xla": "floor_xla"}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="6,000 samples and 2 rounds (a smoke run, noisy)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--samples", type=int, default=60_000)
    p.add_argument("--block", default="step,batch32,overhead,lockstep,lockstep_floor,second_order,lockstep_second_order",
                   help="comma-separated: " + ",".join([*BLOCKS, *LOCKSTEP]))
    p.add_argument("--threads", type=int, default=0,
                   help="TensorFlow intra- and inter-op threads (0: TensorFlow's default, all cores). On a "
                        "machine whose cores come and go, 1 gives steadier ratios -- of a different, "
                        "single-core configuration")
    args = p.parse_args(argv)
    if args.threads < 0:
        print(f"--threads: {args.threads} is negative; give 0 (all cores) or a positive count", file=sys.stderr)
        return 2
    if args.threads:
        tf.config.threading.set_intra_op_parallelism_threads(args.threads)
        tf.config.threading.set_inter_op_parallelism_threads(args.threads)
    if args.quick:
        args.samples, args.rounds = 6_000, 2
    unknown = [b for b in args.block.split(",") if b not in BLOCKS and b not in LOCKSTEP]
    if unknown:
        print(f"--block: {unknown[0]!r} is not one of {', '.join([*BLOCKS, *LOCKSTEP])}", file=sys.stderr)
        return 2
    if any(b in LOCKSTEP for b in args.block.split(",")) and args.samples < 512:
        print(f"--samples: {args.samples} is too few for a lockstep block (it times every step but the "
              "last of an epoch of batches of 256: give at least 512)", file=sys.stderr)
        return 2
    x, y = make_data(args.samples)
    print(f"TensorFlow {tf.__version__}, Keras {keras.__version__}, devices: "
          f"{[d.device_type for d in tf.config.list_logical_devices()]}, intra-op threads: "
          f"{tf.config.threading.get_intra_op_parallelism_threads() or 'default'}")
    for name in args.block.split(","):
        if name in LOCKSTEP:
            run_lockstep(name, BLOCKS[LOCKSTEP[name]](), x, y, args.rounds)
        else:
            run_block(name, BLOCKS[name](), x, y, args.rounds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
