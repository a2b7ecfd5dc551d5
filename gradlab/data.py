"""Datasets by name -> numpy arrays, checked, split and turned into ``tf.data`` pipelines.

Names (``data.name``):

* ``synthetic``: Gaussian blobs, ``data.samples`` x ``data.features`` with ``data.classes``
  classes (defaults: 300 x 4, 3 classes -- the seed's shape). Class ``k`` is centred at
  ``c_k ~ N(0, 2^2 I)`` and samples are ``c_k + N(0, cluster_std^2 I)``; classes are balanced and
  the rows interleaved (0, 1, 2, 0, 1, 2, ...). Everything is drawn from ``seed``.
* ``iris`` (150 x 4, 3 classes) and ``digits`` (1797 x 64, 10 classes): bundled package data,
  see ``gradlab/datasets/README.md`` for source and licence.
* ``npz`` (arrays ``x_key`` and ``y_key``) and ``csv`` (numeric columns, the label in
  ``label_column``; a first row that is not numeric is taken as a header) from ``data.path``.

Checks, each an error that names the file and the first bad row: labels must be integers in
``[0, classes)`` (``tf.one_hot`` would silently turn others into all-zero rows), features must be
finite, and features/labels must have matching lengths.

Split: ``validation_split`` holds out that fraction of *each class* (stratified), picked with a
permutation drawn from ``seed``; the training rows keep their original order, so
``shuffle: false`` trains on a fixed, documented order.
"""

from __future__ import annotations

import csv
import dataclasses
import gzip
import io
from importlib import resources
from pathlib import Path

import numpy as np

from gradlab.config import DataConfig
from gradlab.errors import DataError

PROBE_SIZE = 256


@dataclasses.dataclass(frozen=True)
class Arrays:
    """Features ``x`` (float32, N x F) and integer labels ``y`` (int32, N) plus where they came from."""

    x: np.ndarray
    y: np.ndarray
    classes: int
    source: str


@dataclasses.dataclass
class Data:
    """Everything the experiment needs from the data section."""

    train: object  # tf.data.Dataset of (x, y) batches
    validation: object | None
    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray | None
    y_val: np.ndarray | None
    features: int
    classes: int
    source: str

    def probe_batch(self, size: int = PROBE_SIZE) -> tuple[np.ndarray, np.ndarray]:
        """A fixed batch for probe diagnostics: the first ``size`` training rows, in order."""
        return self.x_train[:size], self.y_train[:size]


# ---------------------------------------------------------------------------------------------
# Loading

def _bundled(name: str) -> bytes:
    return resources.files("gradlab").joinpath("datasets", name).read_bytes()


def load_iris() -> Arrays:
    """The bundled iris data: 150 x 4, labels 0 (setosa), 1 (versicolor), 2 (virginica)."""
    text = _bundled("iris.csv").decode()
    rows = np.loadtxt(io.StringIO(text), delimiter=",", skiprows=1)
    return Arrays(rows[:, :4].astype(np.float32), rows[:, 4].astype(np.int32), 3, "iris (bundled)")


def load_digits() -> Arrays:
    """The bundled digits data: 1797 x 64 pixel counts in 0..16, labels 0..9."""
    text = gzip.decompress(_bundled("digits.csv.gz")).decode()
    rows = np.loadtxt(io.StringIO(text), delimiter=",")
    return Arrays(rows[:, :64].astype(np.float32), rows[:, 64].astype(np.int32), 10, "digits (bundled)")


def make_blobs(samples: int = 300, features: int = 4, classes: int = 3, cluster_std: float = 1.0,
               seed: int = 0) -> Arrays:
    """Gaussian blobs (see the module docstring)."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(0.0, 2.0, size=(classes, features))
    y = np.arange(samples) % classes
    x = centers[y] + rng.normal(0.0, cluster_std, size=(samples, features))
    return Arrays(x.astype(np.float32), y.astype(np.int32), classes, "synthetic")


def _is_number(cell: str) -> bool:
    try:
        float(cell)
        return True
    except ValueError:
        return False


def load_csv(path: str, label_column: int = -1) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """Read a numeric CSV; returns ``x``, raw labels, and the 1-based file line of each row."""
    try:
        handle = open(path, newline="", encoding="utf-8")
    except OSError as err:
        raise DataError(f"{path}: cannot open data file ({err.strerror or type(err).__name__})") from None
    xs, ys, lines = [], [], []
    width = None
    with handle:
        for lineno, row in enumerate(csv.reader(handle), start=1):
            if not row or all(not c.strip() for c in row):
                continue
            if width is None and lineno == 1 and not all(_is_number(c) for c in row):
                continue  # header
            if width is None:
                width = len(row)
                if width < 2:
                    raise DataError(f"{path}:{lineno}: a row needs at least one feature and a label, got {width} column")
                if not -width <= label_column < width:
                    raise DataError(f"{path}: data.label_column ({label_column}) is outside the {width} columns")
            if len(row) != width:
                raise DataError(f"{path}:{lineno}: expected {width} columns like the first row, got {len(row)}")
            try:
                values = [float(c) for c in row]
            except ValueError:
                bad = next(c for c in row if not _is_number(c))
                raise DataError(f"{path}:{lineno}: {bad!r} is not a number") from None
            label = values.pop(label_column if label_column >= 0 else width + label_column)
            xs.append(values)
            ys.append(label)
            lines.append(lineno)
    if not xs:
        raise DataError(f"{path}: no data rows")
    return np.asarray(xs, dtype=np.float64), np.asarray(ys, dtype=np.float64), lines


def load_npz(path: str, x_key: str = "x", y_key: str = "y") -> tuple[np.ndarray, np.ndarray]:
    """Read arrays ``x_key`` and ``y_key`` from an ``.npz`` file (no pickles)."""
    try:
        with np.load(path, allow_pickle=False) as f:
            missing = [k for k in (x_key, y_key) if k not in f.files]
            if missing:
                raise DataError(f"{path}: no array named {missing[0]!r} (arrays in the file: {', '.join(f.files) or 'none'}; "
                                f"set data.x_key / data.y_key)")
            return np.asarray(f[x_key]), np.asarray(f[y_key])
    except DataError:
        raise
    except (OSError, ValueError) as err:
        raise DataError(f"{path}: cannot read npz file ({err})") from None


def check_arrays(x: np.ndarray, y: np.ndarray, classes: int | None, source: str,
                 rows: list[int] | None = None, row_word: str = "row") -> Arrays:
    """Validate and convert features/labels; errors name ``source`` and the first bad row.

    ``rows`` maps array index -> the row number to report (file lines for CSV); by default
    0-based indices are reported.
    """
    def where(i: int) -> str:
        return f"{source}:{rows[i]}" if rows is not None else f"{source}: {row_word} {i}"

    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if x.ndim == 1:
        x = x[:, None]
    if x.ndim != 2:
        raise DataError(f"{source}: features must be a 2-D array (samples x features), got shape {x.shape}")
    if y.ndim != 1:
        raise DataError(f"{source}: labels must be a 1-D array of class indices, got shape {y.shape}")
    if len(x) != len(y):
        raise DataError(f"{source}: {len(x)} feature rows but {len(y)} labels")
    if len(x) == 0:
        raise DataError(f"{source}: no samples")
    if not np.issubdtype(x.dtype, np.number) or not np.issubdtype(y.dtype, np.number):
        raise DataError(f"{source}: features and labels must be numeric (got {x.dtype} and {y.dtype})")
    finite = np.isfinite(x).all(axis=1)
    if not finite.all():
        i = int(np.argmin(finite))
        raise DataError(f"{where(i)}: feature is NaN or Inf ({x[i][~np.isfinite(x[i])][0]})")
    yf = y.astype(np.float64)
    bad = ~np.isfinite(yf) | (yf != np.round(yf))
    if bad.any():
        i = int(np.argmax(bad))
        raise DataError(f"{where(i)}: label {y[i].item()!r} is not an integer class index")
    yi = yf.astype(np.int64)
    n_classes = classes if classes is not None else int(yi.max()) + 1
    out = (yi < 0) | (yi >= n_classes)
    if out.any():
        i = int(np.argmax(out))
        raise DataError(f"{where(i)}: label {yi[i]} is outside [0, {n_classes}) "
                        f"({'data.classes' if classes is not None else 'labels must be >= 0'})")
    if n_classes < 2:
        raise DataError(f"{source}: found only {n_classes} class; a classifier needs at least 2")
    return Arrays(x.astype(np.float32), yi.astype(np.int32), n_classes, source)


def load_arrays(cfg: DataConfig, seed: int = 0) -> Arrays:
    """Load the dataset named by ``cfg.name`` as checked arrays."""
    if cfg.name == "synthetic":
        return make_blobs(cfg.samples, cfg.features, cfg.classes or 3, cfg.cluster_std, seed)
    if cfg.name == "iris":
        return load_iris()
    if cfg.name == "digits":
        return load_digits()
    if cfg.name == "csv":
        x, y, lines = load_csv(cfg.path, cfg.label_column)
        return check_arrays(x, y, cfg.classes, cfg.path, rows=lines)
    if cfg.name == "npz":
        if not Path(cfg.path).is_file():
            raise DataError(f"{cfg.path}: data file not found (data.path)")
        x, y = load_npz(cfg.path, cfg.x_key, cfg.y_key)
        return check_arrays(x, y, cfg.classes, cfg.path, row_word="row")
    raise DataError(f"data.name: {cfg.name!r} is not a known dataset")


# ---------------------------------------------------------------------------------------------
# Split and pipeline

def split_indices(y: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified split: ``round(fraction * n_k)`` random rows of each class ``k`` go to validation.

    Returns sorted ``(train_idx, val_idx)``; training rows keep their original order.
    """
    if fraction <= 0:
        return np.arange(len(y)), np.arange(0)
    rng = np.random.default_rng(seed + 7919)
    val = []
    for k in np.unique(y):
        idx = np.flatnonzero(y == k)
        take = int(round(fraction * len(idx)))
        val.extend(rng.permutation(idx)[:take].tolist())
    val_idx = np.sort(np.asarray(val, dtype=np.int64))
    train_mask = np.ones(len(y), bool)
    train_mask[val_idx] = False
    return np.flatnonzero(train_mask), val_idx


def make_data(cfg: DataConfig, seed: int = 0) -> Data:
    """Load, check, split, optionally standardise, and build the ``tf.data`` pipelines."""
    import tensorflow as tf

    arrays = load_arrays(cfg, seed)
    train_idx, val_idx = split_indices(arrays.y, cfg.validation_split, seed)
    if cfg.validation_split > 0 and len(val_idx) == 0:
        raise DataError(f"data.validation_split: {cfg.validation_split} of {len(arrays.y)} samples leaves no "
                        "validation rows (raise it, or set 0)")
    if len(train_idx) == 0:
        raise DataError(f"data.validation_split: {cfg.validation_split} leaves no training rows")
    x_train, y_train = arrays.x[train_idx], arrays.y[train_idx]
    x_val, y_val = (arrays.x[val_idx], arrays.y[val_idx]) if len(val_idx) else (None, None)
    if cfg.standardize:
        mean, std = x_train.mean(axis=0), x_train.std(axis=0)
        std = np.where(std > 0, std, 1.0)  # a constant feature stays constant (0) instead of NaN
        x_train = ((x_train - mean) / std).astype(np.float32)
        if x_val is not None:
            x_val = ((x_val - mean) / std).astype(np.float32)

    train = tf.data.Dataset.from_tensor_slices((x_train, y_train))
    if cfg.shuffle:
        train = train.shuffle(len(x_train), seed=seed, reshuffle_each_iteration=True)
    train = train.batch(cfg.batch_size).prefetch(tf.data.AUTOTUNE)
    validation = None
    if x_val is not None:
        validation = tf.data.Dataset.from_tensor_slices((x_val, y_val)).batch(cfg.batch_size)
    return Data(train=train, validation=validation, x_train=x_train, y_train=y_train, x_val=x_val, y_val=y_val,
                features=int(arrays.x.shape[1]), classes=arrays.classes, source=arrays.source)
