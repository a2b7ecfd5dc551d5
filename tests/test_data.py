"""Datasets: bundled shapes, file formats, the checks with row-numbered errors, split and order."""

from __future__ import annotations

import numpy as np
import pytest

from gradlab.config import DataConfig, from_dict
from gradlab.data import load_arrays, make_blobs, make_data, split_indices
from gradlab.errors import DataError


def test_synthetic_defaults_are_the_seed_shape():
    a = load_arrays(from_dict({"data": {"name": "synthetic"}}).data, seed=0)
    assert a.x.shape == (300, 4) and a.classes == 3 and set(a.y) == {0, 1, 2}
    assert a.x.dtype == np.float32 and a.y.dtype == np.int32
    b = load_arrays(from_dict({"data": {"name": "synthetic", "samples": 50, "features": 7, "classes": 5}}).data)
    assert b.x.shape == (50, 7) and b.classes == 5


def test_synthetic_is_a_function_of_the_seed():
    np.testing.assert_array_equal(make_blobs(seed=1).x, make_blobs(seed=1).x)
    assert not np.array_equal(make_blobs(seed=1).x, make_blobs(seed=2).x)


def test_bundled_iris_and_digits():
    iris = load_arrays(DataConfig(name="iris"))
    assert iris.x.shape == (150, 4) and iris.classes == 3 and np.bincount(iris.y).tolist() == [50, 50, 50]
    assert iris.x[0].tolist() == pytest.approx([5.1, 3.5, 1.4, 0.2])
    digits = load_arrays(DataConfig(name="digits"))
    assert digits.x.shape == (1797, 64) and digits.classes == 10
    assert digits.x.min() == 0 and digits.x.max() == 16


def test_csv_with_and_without_header(tmp_path):
    rows = "1.0,2.0,0\n3.0,4.0,1\n5.0,6.0,2\n"
    (tmp_path / "h.csv").write_text("a,b,label\n" + rows)
    (tmp_path / "n.csv").write_text(rows)
    for name in ("h.csv", "n.csv"):
        a = load_arrays(DataConfig(name="csv", path=str(tmp_path / name)))
        assert a.x.tolist() == [[1, 2], [3, 4], [5, 6]] and a.y.tolist() == [0, 1, 2]
    b = load_arrays(DataConfig(name="csv", path=str(tmp_path / "n.csv"), label_column=0))
    assert b.y.tolist() == [1, 3, 5] and b.x.shape == (3, 2)


def test_csv_errors_name_file_and_line(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("a,b,label\n1,2,0\n3,4,1\n5,6,7\n")
    with pytest.raises(DataError, match=rf"{path}:4: label 7 is outside \[0, 3\)"):
        load_arrays(DataConfig(name="csv", path=str(path), classes=3))
    path.write_text("1,2,0\n3,nan,1\n")
    with pytest.raises(DataError, match=rf"{path}:2: feature is NaN or Inf"):
        load_arrays(DataConfig(name="csv", path=str(path)))
    path.write_text("1,2,0\n3,4\n")
    with pytest.raises(DataError, match=rf"{path}:2: expected 3 columns"):
        load_arrays(DataConfig(name="csv", path=str(path)))
    path.write_text("1,2,0\n3,x,1\n")
    with pytest.raises(DataError, match=rf"{path}:2: 'x' is not a number"):
        load_arrays(DataConfig(name="csv", path=str(path)))
    path.write_text("1,2,0\n3,4,-1\n")
    with pytest.raises(DataError, match=rf"{path}:2: label -1 is outside"):
        load_arrays(DataConfig(name="csv", path=str(path)))
    path.write_text("1,2,0\n3,4,1.5\n")
    with pytest.raises(DataError, match=rf"{path}:2: label 1.5 is not an integer"):
        load_arrays(DataConfig(name="csv", path=str(path)))


ROWS = "1.0,2.0,0\n3.0,4.0,1\n5.0,6.0,2\n"


@pytest.mark.parametrize("first,header,kept", [
    ("a,b,label\n", "auto", 3),          # column names
    ("0,1,label\n", "auto", 3),          # pandas' numbered columns
    ("150,4,setosa\n", "auto", 3),       # sklearn's iris.csv style
    (",x1,label\n", "auto", 3),          # pandas' unnamed index column (to_csv's default)
    ("#x1,x2,label\n", "auto", 3),       # a commented header
    ("", "auto", 3),                      # no header
    ("9.0,9.0,1\n", "first_line", 3),    # a numeric header line, skipped on request
    ("\ufeffa,b,label\n", "auto", 3),    # Excel's "CSV UTF-8" byte-order mark, with a header
    ("\ufeff7.0,8.0,1\n", "auto", 4),    # ... and without one: the first row is kept
])
def test_csv_header_rule(tmp_path, first, header, kept):
    path = tmp_path / "d.csv"
    path.write_text(first + ROWS, encoding="utf-8")
    a = load_arrays(DataConfig(name="csv", path=str(path), header=header))
    assert len(a.x) == kept and a.x[-1].tolist() == [5, 6]


@pytest.mark.parametrize("first,header,bad", [
    ("5.0,1.4x,0\n", "auto", r"'1.4x' is not a number \(if line 1 is a header, set data.header: first_line\)"),
    ("5.0,6.0,1,\n", "auto", "expected 3 columns|'' is not a number"),  # trailing comma
    ("a,b,label\n", "none", "'a' is not a number"),
    ("1_000,2.0,1\n", "auto", "'1_000' is not a number"),  # Python reads it, TensorFlow's CSV decoder does not
])
def test_csv_line_one_problems_are_reported_at_line_one(tmp_path, first, header, bad):
    path = tmp_path / "d.csv"
    path.write_text(first + ROWS)
    with pytest.raises(DataError, match=rf"{path}:1: ({bad})"):
        load_arrays(DataConfig(name="csv", path=str(path), header=header))


def test_features_beyond_float32_are_reported(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("1,2,0\n3,1e300,1\n")
    with pytest.raises(DataError, match=rf"{path}:2: feature is beyond float32's range .* \(1e\+300\)"):
        load_arrays(DataConfig(name="csv", path=str(path)))
    npz = tmp_path / "d.npz"
    np.savez(npz, x=np.array([[1.0, 2.0], [3.0, -1e39]]), y=np.array([0, 1]))
    with pytest.raises(DataError, match="row 1: feature is beyond float32's range"):
        load_arrays(DataConfig(name="npz", path=str(npz)))


def test_npz(tmp_path):
    path = tmp_path / "d.npz"
    x = np.arange(12, dtype=np.float64).reshape(6, 2)
    np.savez(path, x=x, y=np.array([0, 1, 2, 0, 1, 2]))
    a = load_arrays(DataConfig(name="npz", path=str(path)))
    assert a.x.shape == (6, 2) and a.classes == 3
    np.savez(path, features=x, y=np.array([0, 1, 2, 0, 1, 2]))
    with pytest.raises(DataError, match="no array named 'x'.*features"):
        load_arrays(DataConfig(name="npz", path=str(path)))
    np.savez(path, x=x, y=np.array([0, 1, 2]))
    with pytest.raises(DataError, match="6 feature rows but 3 labels"):
        load_arrays(DataConfig(name="npz", path=str(path)))
    x[4, 1] = np.inf
    np.savez(path, x=x, y=np.array([0, 1, 2, 0, 1, 2]))
    with pytest.raises(DataError, match="row 4: feature is NaN or Inf"):
        load_arrays(DataConfig(name="npz", path=str(path)))
    with pytest.raises(DataError, match="not found"):
        load_arrays(DataConfig(name="npz", path=str(tmp_path / "missing.npz")))


def test_labels_outside_classes_name_first_bad_row(tmp_path):
    path = tmp_path / "d.npz"
    np.savez(path, x=np.zeros((5, 2)), y=np.array([0, 1, 3, 4, 1]))
    with pytest.raises(DataError, match=r"row 2: label 3 is outside \[0, 3\)"):
        load_arrays(DataConfig(name="npz", path=str(path), classes=3))


def test_split_is_stratified_deterministic_and_keeps_training_order():
    y = np.repeat([0, 1, 2], 50)
    tr, va = split_indices(y, 0.2, seed=0)
    assert np.bincount(y[va]).tolist() == [10, 10, 10]
    assert np.all(np.diff(tr) > 0) and len(set(tr) | set(va)) == 150
    tr2, va2 = split_indices(y, 0.2, seed=0)
    np.testing.assert_array_equal(va, va2)


def test_no_shuffle_gives_a_fixed_order():
    cfg = from_dict({"data": {"name": "iris", "shuffle": False, "batch_size": 10}}).data
    data = make_data(cfg, seed=0)
    first_x, first_y = next(iter(data.train))
    np.testing.assert_array_equal(first_x.numpy(), data.x_train[:10])
    again = make_data(cfg, seed=0)
    epoch1 = np.concatenate([b[1].numpy() for b in again.train])
    epoch2 = np.concatenate([b[1].numpy() for b in again.train])
    np.testing.assert_array_equal(epoch1, epoch2)


def test_shuffle_reshuffles_each_epoch_deterministically():
    cfg = from_dict({"data": {"name": "iris", "shuffle": True, "batch_size": 150}}).data
    a = make_data(cfg, seed=3)
    e1, e2 = [next(iter(a.train))[1].numpy() for _ in range(2)]
    assert not np.array_equal(e1, e2)
    b = make_data(cfg, seed=3)
    np.testing.assert_array_equal(next(iter(b.train))[1].numpy(), e1)


def test_validation_split_too_small():
    cfg = from_dict({"data": {"name": "synthetic", "samples": 10, "validation_split": 0.01}}).data
    with pytest.raises(DataError, match="validation_split"):
        make_data(cfg)


def test_standardize_uses_training_statistics():
    cfg = from_dict({"data": {"name": "iris", "standardize": True, "validation_split": 0.2}}).data
    d = make_data(cfg)
    np.testing.assert_allclose(d.x_train.mean(axis=0), 0, atol=1e-5)
    np.testing.assert_allclose(d.x_train.std(axis=0), 1, atol=1e-4)


def test_a_stray_huge_label_or_complex_features_are_refused(tmp_path):
    npz = tmp_path / "d.npz"
    np.savez(npz, x=np.zeros((3, 2)), y=np.array([0, 1, 10**12]))
    with pytest.raises(DataError, match=r"largest label, 1000000000000, would make .*set data.classes"):
        load_arrays(DataConfig(name="npz", path=str(npz)))
    np.savez(npz, x=np.zeros((3, 2), complex), y=np.array([0, 1, 1]))
    with pytest.raises(DataError, match="must be real numbers"):
        load_arrays(DataConfig(name="npz", path=str(npz)))


def test_a_directory_given_as_data_path_is_named_as_one(tmp_path):
    for name in ("csv", "npz", "tfrecord"):
        with pytest.raises(DataError, match=rf"^{tmp_path}: is a directory, not a data file \(data.path\)$"):
            load_arrays(DataConfig(name=name, path=str(tmp_path)))
