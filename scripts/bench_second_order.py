"""Cost of the second-order diagnostics on the MLP benchmark (to be folded into scripts/bench.py).

The benchmark: an MLP 784-512-512-10 (relu; gradlab's ``build_model``), 60,000 synthetic
samples, SGD, batch 256, cross-entropy, ``model.fit`` in this process. Each configuration is
timed over whole epochs after a warm-up epoch with the same model and callbacks (so tracing of
the train step and of the probes is excluded from the ratio; the warm-up epoch's time is
printed too, as the one-time cost). The probe batch is the first 256 training
rows (gradlab's default). Rows:

* baseline: no diagnostics;
* schedule only: an empty :class:`Diagnostic` -- the base class's per-step work (it reads
  ``optimizer.iterations`` after every batch), which every diagnostic pays;
* curvature every 100 steps, at most 20 power iterations (default tolerance 1e-3, warm start);
* curvature every 100 steps, exactly 20 iterations (tolerance 0, no warm start) -- the worst case;
* curvature every 100 steps, default tolerance, without the per-layer eigenvalues;
* gradient_noise every step;
* gradient_noise every 10 steps (its default schedule).

Prints samples/s and the ratio ``time / baseline time`` (lower is better; Cockpit's published
per-step figures on a CPU MLP: NormTest 12.7x, HessMaxEV 67x). The machine may be shared, so
the timed epochs are interleaved round-robin across the rows (``--rounds``) and the median is
reported with the min-max spread.

Usage::

    python scripts/bench_second_order.py            # 60,000 samples, 3 interleaved epochs per row
    python scripts/bench_second_order.py --quick    # 12,800 samples
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from gradlab.callbacks.base import Diagnostic  # noqa: E402
from gradlab.callbacks.curvature import Curvature  # noqa: E402
from gradlab.callbacks.gradient_noise import GradientNoise  # noqa: E402
from gradlab.config import ModelConfig  # noqa: E402
from gradlab.losses import make_loss  # noqa: E402
from gradlab.models import build_model  # noqa: E402

BATCH = 256


def make_data(samples: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(samples, 784)).astype(np.float32)
    y = rng.integers(0, 10, samples).astype(np.int32)
    return x, y


def make_model() -> keras.Model:
    model = build_model(ModelConfig(kind="mlp", hidden=[512, 512], activation="relu"), features=784, classes=10,
                        seed=0)
    model.compile(optimizer=keras.optimizers.SGD(0.01), loss=make_loss("cross_entropy"))
    return model


class ScheduleOnly(Diagnostic):
    """A diagnostic that computes nothing: the cost of the base class's per-step schedule check."""

    uses_probe = False


def setup(callbacks_factory, x, y):
    """A fresh model, its callbacks and dataset, after one warm-up epoch (tracing and compilation).

    Returns ``(model, callbacks, dataset, warm-up seconds)``. Later epochs reuse the same model
    and callback instances (which keep their compiled functions), so they measure the steady
    per-step cost that a long run pays.
    """
    model = make_model()
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(BATCH).prefetch(2)
    callbacks = callbacks_factory()
    start = time.perf_counter()
    model.fit(ds, epochs=1, verbose=0, callbacks=callbacks)
    return model, callbacks, ds, time.perf_counter() - start


def time_epoch(model, callbacks, ds) -> float:
    start = time.perf_counter()
    model.fit(ds, epochs=1, verbose=0, callbacks=callbacks)
    return time.perf_counter() - start


def rows(probe):
    return [
        ("baseline (no diagnostics)", lambda: []),
        ("schedule only (empty Diagnostic)", lambda: [ScheduleOnly(every=100)]),
        ("curvature every 100, <=20 it (tol 1e-3, warm start)",
         lambda: [Curvature(every=100, iterations=20, probe_data=probe)]),
        ("curvature every 100, exactly 20 it (tol 0, cold)",
         lambda: [Curvature(every=100, iterations=20, tolerance=0.0, warm_start=False, probe_data=probe)]),
        ("curvature every 100, <=20 it, global only (per_layer: false)",
         lambda: [Curvature(every=100, iterations=20, per_layer=False, probe_data=probe)]),
        ("gradient_noise every step", lambda: [GradientNoise(every=1, probe_data=probe)]),
        ("gradient_noise every 10 steps", lambda: [GradientNoise(every=10, probe_data=probe)]),
    ]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="12,800 samples instead of 60,000")
    parser.add_argument("--samples", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=3,
                        help="timed epochs per row, interleaved round-robin across rows (median)")
    args = parser.parse_args(argv)
    samples = args.samples or (12_800 if args.quick else 60_000)
    x, y = make_data(samples)
    probe = (x[:BATCH], y[:BATCH])
    steps = -(-samples // BATCH)
    print(f"MLP 784-512-512-10 relu, SGD, batch {BATCH}, {samples} samples ({steps} steps/epoch), "
          f"probe batch {BATCH}, {os.cpu_count()} CPUs, tensorflow {tf.__version__}; "
          f"median of {args.rounds} interleaved epochs", flush=True)
    table = rows(probe)
    prepared = [setup(factory, x, y) for _, factory in table]
    times: list[list[float]] = [[] for _ in table]
    for _ in range(args.rounds):  # interleaved, so that load from other processes hits every row alike
        for i, (model, callbacks, ds, _) in enumerate(prepared):
            times[i].append(time_epoch(model, callbacks, ds))
    base = statistics.median(times[0])
    print(f"{'configuration':<62} {'samples/s':>10} {'ratio':>7} {'min-max ratio':>14} {'warm-up epoch (s)':>18}")
    for (name, _), (_, _, _, warm), t in zip(table, prepared, times):
        med = statistics.median(t)
        spread = f"{min(t) / base:.2f}-{max(t) / base:.2f}"
        print(f"{name:<62} {samples / med:>10.0f} {med / base:>6.2f}x {spread:>14} {warm:>18.1f}")

if __name__ == "__main__":
    main()
