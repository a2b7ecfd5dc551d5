"""Streamed file datasets (npz, csv, TFRecord): same rows as loading whole, row-numbered errors, exact positions."""

from __future__ import annotations

import numpy as np
import pytest

from gradlab.config import from_dict
from gradlab.data import load_arrays, make_data, row_in_validation, write_tfrecord
from gradlab.errors import DataError


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("stream")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(9000, 5)).astype(np.float32)  # > CHUNK_ROWS: several chunks
    y = (np.arange(9000) % 3).astype(np.int64)
    np.savez(d / "a.npz", x=x, y=y)
    np.savetxt(d / "a.csv", np.c_[x, y], delimiter=",", header="a,b,c,d,e,label", comments="", fmt="%.9g")
    write_tfrecord(str(d / "a.tfrecord"), x, y)
    return d, x, y


def _cfg(name, path, **kw):
    return from_dict({"data": {"name": name, "path": str(path), "batch_size": 256, **kw}}).data


@pytest.mark.parametrize("name", ["npz", "csv", "tfrecord"])
def test_streamed_rows_equal_the_file(files, name):
    d, x, y = files
    data = make_data(_cfg(name, d / f"a.{name}", shuffle=False), seed=0)
    assert data.streamed and data.train_rows == 9000 and data.classes == 3 and data.batches_per_epoch == 36
    xs = np.concatenate([b[0].numpy() for b in data.eval_train])
    ys = np.concatenate([b[1].numpy() for b in data.eval_train])
    np.testing.assert_array_equal(ys, y)
    np.testing.assert_allclose(xs, x, rtol=1e-6)
    np.testing.assert_array_equal(data.x_train, xs[:256])  # probe rows = the first training rows


def test_split_and_standardize_streaming(files):
    d, x, y = files
    data = make_data(_cfg("npz", d / "a.npz", validation_split=0.2, standardize=True), seed=4)
    val = row_in_validation(np.arange(9000), 4, 0.2)
    assert data.train_rows == int((~val).sum()) and 0.17 < val.mean() < 0.23
    xt = x[~val]
    got = np.concatenate([b[0].numpy() for b in data.eval_train])
    np.testing.assert_allclose(got, (xt - xt.mean(0)) / xt.std(0), rtol=1e-4, atol=1e-5)
    gv = np.concatenate([b[1].numpy() for b in data.eval_validation])
    np.testing.assert_array_equal(gv, y[val])


def test_train_stream_position_is_a_pure_function_of_seed_and_step(files):
    d, _, _ = files
    data = make_data(_cfg("tfrecord", d / "a.tfrecord", shuffle_buffer=500), seed=1)
    full = [b[1].numpy() for b in data.train_stream(2)]
    assert len(full) == 72 and not np.array_equal(full[0], full[36])  # epochs differ
    tail = [b[1].numpy() for b in data.train_stream(2, start_step=41)]
    assert len(tail) == 31
    for a, b in zip(full[41:], tail):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("name", ["npz", "csv", "tfrecord"])
def test_bad_rows_name_the_file_and_row(tmp_path, name):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(6000, 3)).astype(np.float32)
    y = (np.arange(6000) % 2).astype(np.int64)
    x[5123, 1] = np.nan
    path = tmp_path / f"bad.{name}"
    if name == "npz":
        np.savez(path, x=x, y=y)
        where = f"{path}: row 5123: feature is NaN"
    elif name == "csv":
        np.savetxt(path, np.c_[x, y], delimiter=",", fmt="%.6g")
        where = f"{path}:5124: feature is NaN"  # file lines are 1-based, no header
    else:
        write_tfrecord(str(path), x, y)
        where = f"{path}: record 5123: feature is NaN"
    with pytest.raises(DataError, match="^" + where.replace(".", r"\.")):
        make_data(_cfg(name, path), seed=0)
    y[4500] = 5
    x[5123, 1] = 0
    if name == "npz":
        np.savez(path, x=x, y=y)
    elif name == "csv":
        np.savetxt(path, np.c_[x, y], delimiter=",", fmt="%.6g")
    else:
        write_tfrecord(str(path), x, y)
    with pytest.raises(DataError, match=r"(4500|:4501): label 5 is outside \[0, 2\)"):
        make_data(_cfg(name, path, classes=2), seed=0)


def test_tfrecord_layout_errors(tmp_path):
    import tensorflow as tf

    path = tmp_path / "mixed.tfrecord"
    with tf.io.TFRecordWriter(str(path)) as w:
        for i in range(5):
            n = 4 if i != 3 else 3
            ex = tf.train.Example(features=tf.train.Features(feature={
                "x": tf.train.Feature(float_list=tf.train.FloatList(value=[0.5] * n)),
                "y": tf.train.Feature(int64_list=tf.train.Int64List(value=[i % 2]))}))
            w.write(ex.SerializeToString())
    with pytest.raises(DataError, match=r"mixed\.tfrecord: record 3: 'x' has 3 values, expected 4"):
        make_data(_cfg("tfrecord", path), seed=0)
    with pytest.raises(DataError, match=r"record 0: feature 'feats' is missing"):
        make_data(_cfg("tfrecord", path, x_key="feats"), seed=0)
    whole = path.read_bytes()
    path.write_bytes(whole[:-7])  # torn last record
    with pytest.raises(DataError, match=r"record 4: corrupted or truncated"):
        load_arrays(_cfg("tfrecord", path))
    # cut inside a record's 12-byte header (its length and the length's CRC): TensorFlow stops
    # there without an error, as if the file ended one record earlier
    good = tmp_path / "good.tfrecord"
    write_tfrecord(str(good), np.ones((5, 4), np.float32), np.arange(5) % 2)
    whole = good.read_bytes()
    start = 0
    for _ in range(4):  # the offset of record 4: walk the length fields
        start += int.from_bytes(whole[start:start + 8], "little") + 16
    good.write_bytes(whole[:start + 7])
    with pytest.raises(DataError, match=r"good\.tfrecord: record 4: truncated TFRecord data \(7 bytes after the "
                                        r"last whole record; 4 records read\)"):
        make_data(_cfg("tfrecord", good), seed=0)
    good.write_bytes(whole)
    assert make_data(_cfg("tfrecord", good), seed=0) is not None


def test_streamed_csv_with_a_byte_order_mark_and_no_header(tmp_path):
    path = tmp_path / "bom.csv"
    rows = [f"{i}.5,{i % 2}" for i in range(40)]
    path.write_text("\ufeff" + "\n".join(rows) + "\n", encoding="utf-8")
    data = make_data(_cfg("csv", path, shuffle=False, shuffle_buffer=8), seed=0)
    xs = np.concatenate([b[0].numpy() for b in data.eval_train])
    assert data.streamed and xs[:, 0].tolist() == [i + 0.5 for i in range(40)]
