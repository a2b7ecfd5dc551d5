"""The in-step machinery diagnostics share: histogram buckets, lazy_cond, the shared tap window."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf
from tensorboard.plugins.histogram import summary_v2 as tb_histogram

from gradlab import events, summaries
from gradlab.losses import make_loss
from gradlab.train_step import GradlabModel, Tap, TapVector, lazy_cond


@pytest.mark.parametrize("data", [
    np.random.default_rng(0).normal(size=(64, 33)),
    np.random.default_rng(1).integers(-3, 4, size=500).astype(np.float64),  # many ties, edges on values
    np.full(17, 2.5),                                                            # a single value
    np.full(4, 1e17),                                                            # one value where v + 1 == v
    np.array([1e-30, -1e-30, 0.0]),
    np.random.default_rng(2).normal(size=5).astype(np.float32),
])
@pytest.mark.parametrize("counts", [summaries._fixed_width_counts, summaries._segment_counts],
                         ids=["fixed_width", "segments"])
def test_histogram_buckets_match_tensorboards_own(data, counts):
    ours = counts(tf.constant(data), 30).numpy()
    theirs = tb_histogram._buckets(tf.constant(data), tf.constant(30)).numpy()
    np.testing.assert_array_equal(ours[:, 2], theirs[:, 2])
    np.testing.assert_allclose(ours[:, :2], theirs[:, :2], rtol=1e-12, atol=0)
    assert ours[:, 2].sum() == data.size


@pytest.mark.parametrize("counts", [summaries._fixed_width_counts, summaries._segment_counts],
                         ids=["fixed_width", "segments"])
def test_histogram_buckets_leave_out_nonfinite_and_handle_empty(counts):
    for data in (np.array([0.0, 1.0, np.nan, 2.0, np.inf, -np.inf, 3.0]),
                 np.array([np.nan, 5.0, 5.0, -np.inf]),  # one finite value: all in the last bucket
                 np.array([-np.inf, 2.0, np.nan, 0.5, 1.0], np.float32)):  # a non-finite entry first
        ours = counts(tf.constant(data), 3).numpy()
        theirs = tb_histogram._buckets(tf.constant(data[np.isfinite(data)]), tf.constant(3)).numpy()
        np.testing.assert_array_equal(ours, theirs)
    for empty in (np.zeros([0]), np.array([np.nan, np.inf])):
        np.testing.assert_array_equal(counts(tf.constant(empty), 4).numpy(), np.zeros([4, 3]))


def test_histogram_buckets_pick_the_fast_kernel_outside_xla():
    data = tf.constant(np.random.default_rng(5).normal(size=50))
    graph = tf.function(lambda t: summaries.histogram_buckets(t, 5)).get_concrete_function(data).graph
    assert "HistogramFixedWidth" in {op.type for op in graph.get_operations()}
    graph = tf.function(lambda t: summaries.histogram_buckets(t, 5), jit_compile=True).get_concrete_function(data).graph
    assert "HistogramFixedWidth" not in {op.type for op in graph.get_operations()}


def test_histogram_buckets_compile_with_xla():
    data = np.random.default_rng(3).normal(size=1000).astype(np.float32)
    fn = tf.function(lambda t: summaries.histogram_buckets(t, 7), jit_compile=True)
    np.testing.assert_allclose(fn(tf.constant(data)).numpy(), summaries.histogram_buckets(tf.constant(data), 7).numpy())


def test_written_buckets_read_back_as_a_tensorboard_histogram(tmp_path):
    data = np.random.default_rng(4).normal(size=300)
    writer = tf.summary.create_file_writer(str(tmp_path))
    with writer.as_default():
        summaries.write_histogram_buckets("h/x", summaries.histogram_buckets(tf.constant(data)), step=5)
    writer.close()
    assert events.read_tags(tmp_path)["histograms"] == {"h/x"}
    from tensorboard.backend.event_processing import event_accumulator

    acc = event_accumulator.EventAccumulator(str(tmp_path), size_guidance=events.SIZE_GUIDANCE)
    acc.Reload()
    (event,) = acc.Tensors("h/x")
    buckets = events._tensor_value(event.tensor_proto)
    assert event.step == 5 and buckets.shape == (30, 3) and buckets[:, 2].sum() == 300


def test_write_scalars_writes_what_tf_summary_scalar_writes(tmp_path):
    from tensorboard.backend.event_processing import event_accumulator

    tags = [f"g/layer_{i}/kernel/norm" for i in range(40)] + ["nan", "inf", "neg"]
    values = list(np.random.default_rng(0).normal(size=40) * 1e4) + [np.nan, -np.inf, -0.5]
    steps = [3] * 20 + [7] * 23  # two steps: two raw writes
    ours, reference = tmp_path / "ours", tmp_path / "reference"
    writer = summaries.acquire_writer(str(ours))
    summaries.write_scalars(writer, tags, values, steps)
    summaries.release_writer(str(ours))
    writer = tf.summary.create_file_writer(str(reference))
    with writer.as_default():
        for t, v, s in zip(tags, values, steps):
            tf.summary.scalar(t, v, step=s)
    writer.close()
    read = []
    for path in (ours, reference):
        acc = event_accumulator.EventAccumulator(str(path), size_guidance=events.SIZE_GUIDANCE)
        acc.Reload()
        assert sorted(acc.Tags()["tensors"]) == sorted(tags)
        assert all(acc.SummaryMetadata(t).plugin_data.plugin_name == "scalars" for t in tags)
        read.append({t: [(e.step, float(tf.make_ndarray(e.tensor_proto))) for e in acc.Tensors(t)] for t in tags})
    assert read[0].keys() == read[1].keys()
    for t in tags:
        (step, ours_value), = read[0][t]
        (ref_step, ref_value), = read[1][t]
        assert step == ref_step
        np.testing.assert_array_equal(np.float32(ours_value), np.float32(ref_value))
    assert set(events.read_tags(ours)["scalars"]) == set(tags)


def test_tap_vector_outputs_fold_like_scalars_and_are_checked():
    model = _model()
    x = np.random.default_rng(1).normal(size=(8, 3)).astype(np.float32)
    y = np.array([0, 1] * 4)
    with pytest.raises(ValueError, match="2 names but a vector of shape"):
        model.register_tap("bad", Tap(every_step=lambda inp: TapVector(["a", "b"], tf.zeros([3]))))
    with pytest.raises(ValueError, match="names must be unique"):
        TapVector(["a", "a"], tf.zeros([2]))
    model.register_tap("scalars", Tap(every_step=lambda inp: {"step": tf.cast(inp.step, tf.float32), "sq": tf.add_n(inp.squared_norms)}))
    model.register_tap("vector", Tap(every_step=lambda inp: TapVector(
        ["step", "sq"], tf.stack([tf.cast(inp.step, tf.float32), tf.reduce_sum(inp.squared_norm_vector)])), signal="step"))
    model.fit(x, y, batch_size=2, epochs=1, verbose=0, shuffle=False)  # steps 0..3
    assert model.tap_signal("vector") == 3.0
    scalars, vector = model.read_tap("scalars"), model.read_tap("vector")
    assert vector["count"] == scalars["count"] == 4
    assert vector["window"]["step"] == {"last": 3.0, "mean": 1.5, "max": 3.0, "min": 0.0}
    for stat in ("last", "mean", "max", "min"):
        np.testing.assert_allclose(vector["window"]["sq"][stat], scalars["window"]["sq"][stat], rtol=1e-6)


def test_write_events_histograms_read_back_like_write_histogram_buckets(tmp_path):
    from tensorboard.backend.event_processing import event_accumulator

    data = np.random.default_rng(5).normal(size=(3, 200))
    buckets = [summaries.histogram_buckets(tf.constant(d), 7 + i).numpy() for i, d in enumerate(data)]
    ours, reference = tmp_path / "ours", tmp_path / "reference"
    writer = summaries.acquire_writer(str(ours))
    summaries.write_events(writer, scalars=[("s", 2.5, 4)],
                           histograms=[(f"h/{i}", b, 4 + i) for i, b in enumerate(buckets)])
    summaries.release_writer(str(ours))
    writer = tf.summary.create_file_writer(str(reference))
    with writer.as_default():
        tf.summary.scalar("s", 2.5, step=4)
        for i, b in enumerate(buckets):
            summaries.write_histogram_buckets(f"h/{i}", b, step=4 + i)
    writer.close()
    read = []
    for path in (ours, reference):
        assert events.read_tags(path)["histograms"] == {"h/0", "h/1", "h/2"}
        acc = event_accumulator.EventAccumulator(str(path), size_guidance=events.SIZE_GUIDANCE)
        acc.Reload()
        read.append({t: [(e.step, events._tensor_value(e.tensor_proto)) for e in acc.Tensors(t)]
                     for t in ("h/0", "h/1", "h/2", "s")})
    for tag in read[1]:
        (step, value), = read[0][tag]
        (ref_step, ref_value), = read[1][tag]
        assert step == ref_step
        np.testing.assert_array_equal(value, ref_value)
    assert read[0]["h/2"][0][1].shape == (9, 3)


def _if_ops(graph) -> list:
    ops = [op for op in graph.get_operations() if op.type in ("If", "StatelessIf")]
    return ops


def test_lazy_cond_runs_only_the_taken_branch_and_stays_functional():
    v = tf.Variable(0.0)

    @tf.function
    def f(flag):
        return lazy_cond(flag, lambda: v.assign_add(1.0) * 2.0, lambda: tf.constant(-1.0))

    assert float(f(tf.constant(True))) == 2.0 and float(f(tf.constant(False))) == -1.0
    assert float(v.numpy()) == 1.0  # the false call did not run the true branch's assignment
    (op,) = _if_ops(f.get_concrete_function(tf.TensorSpec([], tf.bool)).graph)
    assert op.get_attr("_lower_using_switch_merge") is False
    plain = tf.function(lambda flag: tf.cond(flag, lambda: v + 1.0, lambda: v - 1.0))
    (op,) = _if_ops(plain.get_concrete_function(tf.TensorSpec([], tf.bool)).graph)
    assert op.get_attr("_lower_using_switch_merge") is True  # what lazy_cond changes
    xla = tf.function(lambda flag: lazy_cond(flag, lambda: v + 1.0, lambda: v - 1.0), jit_compile=True)
    assert float(xla(tf.constant(False))) == 0.0


def _model():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((3,))
    logits = keras.layers.Dense(2, name="head")(inputs)
    model = GradlabModel(inputs, logits)
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss=make_loss("cross_entropy", "mean"))
    return model


def test_taps_share_one_window_and_keep_it_when_another_tap_comes_or_goes():
    model = _model()
    weights = len(model.weights)
    x = np.random.default_rng(0).normal(size=(8, 3)).astype(np.float32)
    y = np.array([0, 1] * 4)
    model.register_tap("loss", Tap(every_step=lambda inp: {"loss": inp.loss, "step": tf.cast(inp.step, tf.float32)}))
    model.register_tap("norm", Tap(every_step=lambda inp: {"sq": tf.add_n(inp.squared_norms)}))
    model.fit(x, y, batch_size=2, epochs=1, verbose=0, shuffle=False)  # steps 0..3
    assert model._gradlab_window.shape == (4, 5)  # (last, sum, max, min) x (loss, step, count, sq, count)
    assert len(model.weights) == weights  # tap state is not a model weight (save_weights, summaries)
    loss = model.read_tap("loss")
    assert loss["count"] == 4
    assert loss["window"]["step"] == {"last": 3.0, "mean": 1.5, "max": 3.0, "min": 0.0}
    # the other tap's window was not reset by that read; a third tap keeps it open
    model.register_tap("extra", Tap(every_step=lambda inp: {"one": tf.constant(1.0)}))
    model.fit(x[:4], y[:4], batch_size=2, epochs=1, verbose=0, shuffle=False)  # steps 4, 5
    assert model.read_tap("norm")["count"] == 6
    assert model.read_tap("loss")["window"]["step"]["min"] == 4.0
    model.remove_tap("loss")
    assert model._gradlab_window.shape == (4, 4)
    assert model.read_tap("extra", reset=False)["count"] == 2  # kept through the re-layout
    model.fit(x[:2], y[:2], batch_size=2, epochs=1, verbose=0, shuffle=False)  # step 6
    extra = model.read_tap("extra")
    assert extra["count"] == 3 and extra["window"]["one"]["max"] == 1.0
    assert model.peek_tap("norm", "sq", "max") > 0


def test_signal_must_be_an_every_step_output_and_goes_stale_on_relayout():
    model = _model()
    with pytest.raises(ValueError, match="signal 'nope' is not one of its every_step outputs"):
        model.register_tap("bad", Tap(every_step=lambda inp: {"a": inp.loss}, signal="nope"))
    model.register_tap("flag", Tap(every_step=lambda inp: {"a": tf.constant(1.0)}, signal="a"))
    x = np.zeros((4, 3), np.float32)
    model.fit(x, np.zeros(4), batch_size=2, epochs=1, verbose=0)
    assert model.tap_signal("flag") == 1.0
    model.register_tap("other", Tap(every_step=lambda inp: {"b": tf.constant(2.0)}, signal="b"))
    assert model.tap_signal("flag") is None and model.tap_signal("other") is None  # old layout: unknown
    model.fit(x, np.zeros(4), batch_size=2, epochs=1, verbose=0)
    assert (model.tap_signal("flag"), model.tap_signal("other")) == (1.0, 2.0)


def test_taps_see_gradients_with_the_loss_scale_factor_undone():
    x = np.random.default_rng(1).normal(size=(4, 3)).astype(np.float32)
    y = np.array([0, 1, 0, 1])
    norms = []
    for factor in (None, 64.0):
        model = _model()
        model.compile(optimizer=keras.optimizers.SGD(0.1, loss_scale_factor=factor),
                      loss=make_loss("cross_entropy", "mean"))
        model.register_tap("n", Tap(every_step=lambda inp: {"sq": tf.add_n(inp.squared_norms)}))
        model.fit(x, y, batch_size=4, epochs=1, verbose=0, shuffle=False)
        norms.append(model.read_tap("n")["window"]["sq"]["last"])
    assert norms[1] == pytest.approx(norms[0], rel=1e-5)


def test_due_window_is_captured_in_the_step_and_handed_out_once():
    """every 5 with steps_per_execution 3: executions end at steps 2, 5, 8, 11; due steps 0, 5, 10."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((3,))
    model = GradlabModel(inputs, keras.layers.Dense(2)(inputs))
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss=make_loss("cross_entropy", "mean"), steps_per_execution=3)
    step = lambda inp: tf.cast(inp.step, tf.float32)  # noqa: E731
    model.register_tap("t", Tap(every_step=lambda inp: {"step": step(inp)},
                                on_due=lambda inp: {"twice": 2.0 * step(inp)}, every=5))
    x = np.random.default_rng(0).normal(size=(24, 3)).astype(np.float32)
    model.fit(x, np.arange(24) % 2, batch_size=2, epochs=1, verbose=0, shuffle=False)  # steps 0..11
    holder, state = model._gradlab_window_holder, model._gradlab_taps["t"]
    returned = holder.returned
    assert returned is not None  # one replica: the due values came with the execution's results

    def due_read():
        values = model.read_due("t")
        return values["due_step"], values["count"], values["window"], {k: float(v) for k, v in values["due"].items()}

    first = due_read()
    # window: steps 6..10 (the previous due step's window ended at 5), though the execution ran on to 11
    assert first == (10, 5, {"step": {"last": 10.0, "mean": 8.0, "max": 10.0, "min": 6.0}}, {"twice": 20.0})
    assert due_read() == (-1, 0, {}, {})  # handed out once
    # without the returned values (several replicas): read from the variables, the same
    holder.returned, state.consumed = None, -1
    assert due_read() == first
    holder.returned, state.consumed = returned, -1
    assert due_read() == first
    tail = model.read_tap("t")  # the end of training: the steps after the last due step, no due outputs again
    assert (tail["due_step"], tail["count"], tail["window"]["step"]["min"], tail["due"]) == (-1, 1, 11.0, {})
    model.fit(x[:4], np.arange(4) % 2, batch_size=2, epochs=1, verbose=0, shuffle=False)  # steps 12, 13: none due
    assert due_read() == (-1, 0, {}, {})


def _due_tap_model(spe: int, jit_compile: bool = False):
    keras.utils.set_random_seed(0)
    inputs = keras.Input((3,))
    model = GradlabModel(inputs, keras.layers.Dense(2)(inputs))
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss=make_loss("cross_entropy", "mean"),
                  steps_per_execution=spe, jit_compile=jit_compile)
    step = lambda inp: tf.cast(inp.step, tf.float32)  # noqa: E731
    model.register_tap("t", Tap(every_step=lambda inp: {"step": step(inp)},
                                on_due=lambda inp: {"twice": 2.0 * step(inp)}, every=5))
    return model


class _DueRecorder(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.seen = []

    def on_train_batch_end(self, batch, logs=None):
        values = self.model.read_due("t")
        if values["due_step"] >= 0:
            self.seen.append((values["due_step"], values["count"], float(values["due"]["twice"])))


@pytest.mark.parametrize("spe, plain, xla", [(1, 18, False), (3, 2, False), (3, 2, True)])
def test_executions_with_no_due_step_run_the_plain_variant(spe, plain, xla):
    """every 5, two fits of 12 steps. An execution with no due step, other than the first of a
    fit, runs the variant compiled without due-step work -- spe 1: all 24 but the first of each
    fit (steps 0, 12) and the due steps 5, 10, 15, 20; spe 3: the executions of steps 6-8 and
    21-23 -- and every due step's outputs and window still arrive."""
    model = _due_tap_model(spe, jit_compile=xla)
    x = np.random.default_rng(0).normal(size=(24, 3)).astype(np.float32)
    recorder = _DueRecorder()
    holder = model._gradlab_window_holder
    for _ in range(2):
        model.fit(x, np.arange(24) % 2, batch_size=2, epochs=1, verbose=0, shuffle=False, callbacks=[recorder])
    assert holder.plain_executions == plain
    assert recorder.seen == [(0, 1, 0.0), (5, 5, 10.0), (10, 5, 20.0), (15, 5, 30.0), (20, 5, 40.0)]
    tail = model.read_tap("t")  # steps 21..23, after the last due step
    assert (tail["count"], tail["window"]["step"]["min"], tail["window"]["step"]["max"]) == (3, 21.0, 23.0)


def test_plain_variant_refuses_a_step_that_is_due():
    """Were the schedule in Python ever wrong, the plain step would lose a due step's outputs:
    it fails instead (here the count it relies on is corrupted on purpose)."""
    model = _due_tap_model(1)

    class Corrupt(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            if batch == 9:  # the next execution runs step 10, which is due: claim it starts at 11
                model._gradlab_window_holder.next_step = 11

    x = np.zeros((24, 3), np.float32)
    with pytest.raises(tf.errors.InvalidArgumentError, match="internal error: a tap was due at step"):
        model.fit(x, np.arange(24) % 2, batch_size=2, epochs=1, verbose=0, shuffle=False, callbacks=[Corrupt()])


def test_plain_variant_only_when_no_tap_of_any_schedule_is_due():
    """Taps every 3 and every 4, steps_per_execution 2, steps 0..23: only the executions of steps
    10-11 and 22-23 contain no multiple of 3 or 4 (the first, 0-1, is a fit's first anyway)."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((3,))
    model = GradlabModel(inputs, keras.layers.Dense(2)(inputs))
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss=make_loss("cross_entropy", "mean"), steps_per_execution=2)
    step = lambda inp: tf.cast(inp.step, tf.float32)  # noqa: E731
    for every in (3, 4):
        model.register_tap(f"t{every}", Tap(every_step=lambda inp: {"step": step(inp)},
                                            on_due=lambda inp: {"step": step(inp)}, every=every))
    seen = {3: [], 4: []}

    class Record(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            for every in seen:
                values = model.read_due(f"t{every}")
                if values["due_step"] >= 0:
                    seen[every].append(int(values["due"]["step"]))

    x = np.random.default_rng(0).normal(size=(48, 3)).astype(np.float32)
    model.fit(x, np.arange(48) % 2, batch_size=2, epochs=1, verbose=0, shuffle=False, callbacks=[Record()])
    assert model._gradlab_window_holder.plain_executions == 2
    assert seen == {3: list(range(0, 24, 3)), 4: list(range(0, 24, 4))}


def test_window_sums_do_not_overflow_and_keep_float64_values_exact():
    # The window was float32: four steps of a value near float32's max summed to inf (the
    # window mean of a diverging loss read inf while every value was finite), and a step count
    # above 2^24 could not be told from its neighbour.
    model = _model()
    x = np.zeros((8, 3), np.float32)
    y = np.array([0, 1] * 4)
    big = float(np.finfo(np.float32).max) / 2
    model.register_tap("big", Tap(every_step=lambda inp: {
        "huge": tf.constant(big, tf.float32),
        "late_step": tf.cast(inp.step, tf.float64) + (2 ** 24 + 1)}))
    model.fit(x, y, batch_size=2, epochs=1, verbose=0, shuffle=False)  # steps 0..3
    window = model.read_tap("big")["window"]
    assert window["huge"]["mean"] == pytest.approx(big, rel=1e-7)
    assert window["late_step"] == {"last": 2 ** 24 + 4.0, "mean": 2 ** 24 + 2.5,
                                   "max": 2 ** 24 + 4.0, "min": 2 ** 24 + 1.0}


def test_a_tap_is_made_again_when_a_layer_is_frozen_between_fits(tmp_path):
    # The tap of an earlier fit stayed attached, built for four gradients; after freezing a
    # layer the step has two and the second fit crashed in the tap ("Dimensions must be equal").
    from gradlab.callbacks import GradientStats, NonFiniteGuard

    keras.utils.set_random_seed(0)
    inputs = keras.Input((6,))
    h = keras.layers.Dense(8, activation="tanh", name="hidden")(inputs)
    model = GradlabModel(inputs, keras.layers.Dense(3, name="out")(h))
    x = np.random.default_rng(3).normal(size=(16, 6)).astype(np.float32)
    y = np.arange(16) % 3
    callbacks = [GradientStats(log_dir=str(tmp_path), every=1, histogram_every=0), NonFiniteGuard()]
    model.compile(optimizer=keras.optimizers.SGD(0.01), loss=make_loss("cross_entropy", "mean"))
    model.fit(x, y, batch_size=8, epochs=1, verbose=0, shuffle=False, callbacks=callbacks)  # steps 0, 1
    model.get_layer("hidden").trainable = False
    model.compile(optimizer=keras.optimizers.SGD(0.01), loss=make_loss("cross_entropy", "mean"))
    model.fit(x, y, batch_size=8, epochs=1, verbose=0, shuffle=False, callbacks=callbacks)  # steps 0, 1 again
    scalars = events.read_scalars(tmp_path)
    assert [s for s, _ in scalars["gradients/hidden/kernel/norm"]] == [0, 1]  # only the first fit's
    assert len(scalars["gradients/out/kernel/norm"]) == 4  # both fits (a new optimizer counts from 0)
