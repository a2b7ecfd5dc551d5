"""Datasets by name -> numpy arrays, checked, split and turned into ``tf.data`` pipelines.

Names (``data.name``):

* ``synthetic``: Gaussian blobs, ``data.samples`` x ``data.features`` with ``data.classes``
  classes (defaults: 300 x 4, 3 classes -- the seed's shape). Class ``k`` is centred at
  ``c_k ~ N(0, 2^2 I)`` and samples are ``c_k + N(0, cluster_std^2 I)``; classes are balanced and
  the rows interleaved (0, 1, 2, 0, 1, 2, ...). Everything is drawn from ``seed``.
* ``iris`` (150 x 4, 3 classes) and ``digits`` (1797 x 64, 10 classes): bundled package data,
  see ``gradlab/datasets/README.md`` for source and licence.
* ``npz`` (arrays ``x_key`` and ``y_key``), ``csv`` (numeric columns, the label in
  ``label_column``; line 1 may be a header, ``data.header``) and ``tfrecord``
  (``tf.train.Example`` records with a float feature ``x_key`` of length F and an int64 feature
  ``y_key``; :func:`write_tfrecord` writes one) from ``data.path``.

File datasets are **streamed** (:func:`make_data`): one streaming pass checks every row and
counts the rows (memory O(features), not O(rows)), then ``tf.data`` reads the file again for
every epoch. ``load_arrays`` still loads a file whole, for tools that want arrays.

Checks, each an error that names the file and the first bad row: labels must be integers in
``[0, classes)`` (``tf.one_hot`` would silently turn others into all-zero rows), features must be
finite, and features/labels must have matching lengths.

Split: ``validation_split`` holds out that fraction of *each class* (stratified), picked with a
permutation drawn from ``seed``; the training rows keep their original order, so
``shuffle: false`` trains on a fixed, documented order. Streamed files cannot be stratified
without holding every label, so there row ``i`` goes to validation when a seeded hash of ``i``
falls below the fraction (:func:`row_in_validation`; about that fraction, decided per row).

Data order for training (:meth:`Data.train_stream`) is a pure function of ``(seed, epoch)``:
epoch ``e`` is shuffled with a seed derived from both, so a run resumed at step ``s`` rebuilds
exactly the batches an uninterrupted run would have seen from step ``s`` on.
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
    """Everything the experiment needs from the data section.

    ``train`` reshuffles on every iteration (for interactive use); experiments use
    :meth:`train_stream`, whose order is a pure function of ``(seed, epoch)``. For streamed
    files (``streamed``), ``x_train``/``y_train`` hold only the first :data:`PROBE_SIZE`
    training rows and ``x_val``/``y_val`` are ``None``; ``eval_train``/``eval_validation``
    are unshuffled batched pipelines over all rows in both cases.
    """

    train: object  # tf.data.Dataset of (x, y) batches
    validation: object | None
    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray | None
    y_val: np.ndarray | None
    features: int
    classes: int
    source: str
    streamed: bool = False
    train_rows: int = 0
    batch_size: int = 32
    base_train: object = None  # unbatched, unshuffled, standardised training rows (tf.data)
    shuffle: bool = True
    shuffle_buffer: int = 0
    seed: int = 0
    eval_train: object = None
    eval_validation: object = None

    @property
    def batches_per_epoch(self) -> int:
        """Training steps per epoch: ``ceil(train_rows / batch_size)``."""
        return -(-self.train_rows // self.batch_size)

    def probe_batch(self, size: int = PROBE_SIZE) -> tuple[np.ndarray, np.ndarray]:
        """A fixed batch for probe diagnostics: the first ``size`` training rows, in order."""
        return self.x_train[:size], self.y_train[:size]

    def epoch_batches(self, epoch):
        """The batches of epoch ``epoch`` (a Python int or an int64 tensor), in training order."""
        import tensorflow as tf

        ds = self.base_train
        if self.shuffle:
            if isinstance(epoch, int):
                seed = self.seed * 1_000_003 + epoch + 17
            else:
                # Inside flat_map (a function graph): TF's get_seed compares (graph seed, op seed)
                # with (0, 0) in Python, which fails for a tensor op seed when the global seed is
                # 0. Give this function graph a fixed non-zero graph seed (determinism unchanged).
                tf.compat.v1.get_default_graph().seed = 1_000_003
                seed = tf.cast(self.seed, tf.int64) * 1_000_003 + tf.cast(epoch, tf.int64) + 17
            ds = ds.shuffle(self.shuffle_buffer, seed=seed, reshuffle_each_iteration=False)
        return ds.batch(self.batch_size)

    def train_stream(self, epochs: int, start_step: int = 0):
        """All training batches from global step ``start_step`` to the end of epoch ``epochs - 1``.

        Epoch ``e`` is :meth:`epoch_batches` ``(e)``; the stream starts at epoch
        ``start_step // batches_per_epoch`` and skips the batches already trained on, so an
        interrupted run resumed at step ``s`` sees exactly the batches an uninterrupted run
        sees from step ``s`` on.
        """
        import tensorflow as tf

        per_epoch = self.batches_per_epoch
        first, skip = divmod(start_step, per_epoch)
        ds = tf.data.Dataset.range(first, epochs).flat_map(self.epoch_batches)
        if skip:
            ds = ds.skip(skip)
        total = max(0, epochs * per_epoch - start_step)
        return ds.apply(tf.data.experimental.assert_cardinality(total)).prefetch(tf.data.AUTOTUNE)


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


def _number(cell: str) -> float:
    """``float(cell)`` as TensorFlow's CSV decoder reads it: no ``1_000`` digit groups, and ASCII
    only (Python's ``float`` also takes non-ASCII digits and spaces such as a spreadsheet's
    non-breaking space, which the decoder refuses mid-training)."""
    if "_" in cell or not cell.isascii():
        raise ValueError(cell)
    return float(cell)


def _csv_lines(handle, path: str):
    """The physical lines of a CSV opened with ``newline=""``, refusing what the checked rows and
    ``tf.data.TextLineDataset`` (one row per line feed) would read differently: a line ended by a
    lone carriage return (classic Mac OS)."""
    for lineno, line in enumerate(handle, start=1):
        if line.endswith("\r"):
            raise DataError(f"{path}:{lineno}: the line ends with a lone carriage return (\\r, classic Mac "
                            f"line endings); save the file with \\n or \\r\\n line endings")
        yield line


def _one_line_row(row: list[str], path: str, lineno: int) -> None:
    """Refuse a row whose quoted cell spans lines (the training pipeline reads one row per line)."""
    if any("\n" in c or "\r" in c for c in row):
        raise DataError(f"{path}:{lineno}: a quoted cell spans several lines; put each row on one line")


def _is_number(cell: str) -> bool:
    try:
        _number(cell)
        return True
    except ValueError:
        return False


def load_csv(path: str, label_column: int = -1, header: str = "auto") -> tuple[np.ndarray, np.ndarray, list[int]]:
    """Read a whole numeric CSV; returns ``x``, raw labels, and the 1-based file line of each row.

    The same row parser as the streamed pipeline (:func:`_csv_chunks`): line 1 may be a header
    (``header``, see :func:`_csv_layout`), blank lines are skipped, and errors name the file and line.
    """
    cfg = DataConfig(name="csv", path=path, label_column=label_column, header=header)
    xs, ys, lines, chunk_lines = [], [], [], []
    for x, y in _csv_chunks(cfg, chunk_lines):
        xs.append(x)
        ys.append(y)
        lines.extend(chunk_lines)
    return (np.concatenate(xs).astype(np.float64), np.concatenate(ys).astype(np.float64), lines)


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


def check_rows(x: np.ndarray, y: np.ndarray, classes: int | None, where) -> np.ndarray:
    """Check rows of features and labels; return the labels as int64.

    Features must be finite; labels must be integers (any numeric dtype with integral values)
    in ``[0, classes)``, or ``>= 0`` when ``classes`` is ``None`` (the caller then infers the
    number of classes). ``where(i)`` names row ``i`` in the error (file and line or row index).
    """
    with np.errstate(over="ignore", invalid="ignore"):  # training sees float32: check what it will see
        finite = np.isfinite(np.asarray(x, dtype=np.float32)).all(axis=1) if x.size else np.ones(len(x), bool)
    if not finite.all():
        i = int(np.argmin(finite))
        with np.errstate(over="ignore", invalid="ignore"):
            bad = x[i][~np.isfinite(np.asarray(x[i], dtype=np.float32))][0]
        what = "NaN or Inf" if not np.isfinite(bad) else "beyond float32's range (|x| > 3.4e38)"
        raise DataError(f"{where(i)}: feature is {what} ({bad})")
    yf = y.astype(np.float64)
    bad = ~np.isfinite(yf) | (yf != np.round(yf))
    if bad.any():
        i = int(np.argmax(bad))
        raise DataError(f"{where(i)}: label {y[i].item()!r} is not an integer class index")
    # Compared as floats, before the cast to int64 (which wraps labels beyond 2^63 to negatives).
    # (Beyond 2^53 a float is no longer an exact integer; below it, a large label is reported by
    # inferred_classes, which says how to mean it.)
    out = (yf < 0) | (yf >= classes) if classes is not None else (yf < 0) | (yf >= 2.0 ** 53)
    if out.any():
        i = int(np.argmax(out))
        bound = (f"[0, {classes}) (data.classes)" if classes is not None else
                 "[0, 2^53) (labels are class indices)")
        label = int(yf[i]) if abs(yf[i]) < 2.0 ** 53 else y[i].item()
        raise DataError(f"{where(i)}: label {label} is outside {bound}")
    return yf.astype(np.int64)


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
    if not all(np.issubdtype(a.dtype, np.number) and not np.issubdtype(a.dtype, np.complexfloating) for a in (x, y)):
        raise DataError(f"{source}: features and labels must be real numbers (got {x.dtype} and {y.dtype})")
    yi = check_rows(x, y, classes, where)
    n_classes = classes if classes is not None else inferred_classes(int(yi.max()), source)
    if n_classes < 2:
        raise DataError(f"{source}: found only {n_classes} class; a classifier needs at least 2")
    return Arrays(x.astype(np.float32), yi.astype(np.int32), n_classes, source)


def _require_file(path: str) -> None:
    """``DataError`` unless ``path`` is a file (``data.path``)."""
    if Path(path).is_dir():
        raise DataError(f"{path}: is a directory, not a data file (data.path)")
    if not Path(path).is_file():
        raise DataError(f"{path}: data file not found (data.path)")


MAX_INFERRED_CLASSES = 100_000


def inferred_classes(max_label: int, source: str) -> int:
    """``max_label + 1``, the number of classes of labels ``0..max_label`` -- refused above
    :data:`MAX_INFERRED_CLASSES`, where a stray large label would silently make a huge output
    layer (set ``data.classes`` to mean it)."""
    if max_label + 1 > MAX_INFERRED_CLASSES:
        raise DataError(f"{source}: the largest label, {max_label}, would make {max_label + 1} classes; labels "
                        f"must be class indices 0..K-1 (set data.classes to confirm a K above {MAX_INFERRED_CLASSES})")
    return max_label + 1


def load_arrays(cfg: DataConfig, seed: int = 0) -> Arrays:
    """Load the dataset named by ``cfg.name`` as checked arrays."""
    if cfg.name == "synthetic":
        return make_blobs(cfg.samples, cfg.features, cfg.classes or 3, cfg.cluster_std, seed)
    if cfg.name == "iris":
        return load_iris()
    if cfg.name == "digits":
        return load_digits()
    if cfg.name == "csv":
        _require_file(cfg.path)
        x, y, lines = load_csv(cfg.path, cfg.label_column, cfg.header)
        return check_arrays(x, y, cfg.classes, cfg.path, rows=lines)
    if cfg.name == "npz":
        _require_file(cfg.path)
        x, y = load_npz(cfg.path, cfg.x_key, cfg.y_key)
        return check_arrays(x, y, cfg.classes, cfg.path, row_word="row")
    if cfg.name == "tfrecord":
        _require_file(cfg.path)
        parts = list(_tfrecord_chunks(cfg))
        if not parts:
            raise DataError(f"{cfg.path}: no samples")
        x, y = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
        return check_arrays(x, y, cfg.classes, cfg.path, row_word="record")
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
    """Load (or stream-check), split, optionally standardise, and build the ``tf.data`` pipelines."""
    if cfg.name in STREAMED:
        return _make_streamed(cfg, seed)
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
    base = tf.data.Dataset.from_tensor_slices((x_train, y_train))
    return Data(train=train, validation=validation, x_train=x_train, y_train=y_train, x_val=x_val, y_val=y_val,
                features=int(arrays.x.shape[1]), classes=arrays.classes, source=arrays.source,
                streamed=False, train_rows=len(x_train), batch_size=cfg.batch_size, base_train=base,
                shuffle=cfg.shuffle, shuffle_buffer=len(x_train), seed=seed,
                eval_train=base.batch(EVAL_BATCH), eval_validation=(
                    None if x_val is None else tf.data.Dataset.from_tensor_slices((x_val, y_val)).batch(EVAL_BATCH)))


# ---------------------------------------------------------------------------------------------
# Streaming file datasets: a checking pass, then tf.data reads the file for every epoch

STREAMED = ("npz", "csv", "tfrecord")
EVAL_BATCH = 1024
CHUNK_ROWS = 4096
_HASH_MOD = 1_000_000


def row_in_validation(index, seed: int, fraction: float):
    """Whether row ``index`` (int array or int64 tensor) of a streamed file is a validation row.

    ``h = (index * 2654435761 + 7919 * seed + 12345) mod 2^32``; the row is held out when
    ``h mod 10^6 < fraction * 10^6``. Numpy and TensorFlow give the same answer.
    """
    cut = int(round(fraction * _HASH_MOD))
    if isinstance(index, np.ndarray):
        h = (index.astype(np.int64) * 2654435761 + 7919 * seed + 12345) % (1 << 32)
        return (h % _HASH_MOD) < cut
    import tensorflow as tf

    h = tf.math.floormod(tf.cast(index, tf.int64) * 2654435761 + 7919 * seed + 12345, 1 << 32)
    return tf.math.floormod(h, _HASH_MOD) < cut


@dataclasses.dataclass
class _Scan:
    """What the checking pass learned: counts, label range, per-feature sums, the first rows."""

    features: int = 0
    rows: int = 0
    train_rows: int = 0
    val_rows: int = 0
    max_label: int = -1
    sum: np.ndarray | None = None
    sumsq: np.ndarray | None = None
    head_x: list = dataclasses.field(default_factory=list)
    head_y: list = dataclasses.field(default_factory=list)


def _check_chunk(scan: _Scan, x: np.ndarray, y: np.ndarray, first_row: int, cfg: DataConfig, seed: int,
                 where) -> None:
    """Check one chunk of rows (``where(i)`` names row ``first_row + i``) and fold it into ``scan``."""
    if x.ndim != 2:
        raise DataError(f"{cfg.path}: features must be a 2-D array (samples x features), got shape {x.shape}")
    yi = check_rows(x, y, cfg.classes, where)
    if scan.sum is None:
        scan.features = x.shape[1]
        scan.sum = np.zeros(x.shape[1], np.float64)
        scan.sumsq = np.zeros(x.shape[1], np.float64)
    idx = np.arange(first_row, first_row + len(x), dtype=np.int64)
    val = row_in_validation(idx, seed, cfg.validation_split) if cfg.validation_split > 0 else np.zeros(len(x), bool)
    train = ~val
    xt = x[train].astype(np.float64)
    scan.sum += xt.sum(axis=0)
    scan.sumsq += np.square(xt).sum(axis=0)
    scan.rows += len(x)
    scan.train_rows += int(train.sum())
    scan.val_rows += int(val.sum())
    if len(yi):
        scan.max_label = max(scan.max_label, int(yi.max()))
    need = PROBE_SIZE - len(scan.head_y)
    if need > 0:
        scan.head_x.extend(x[train][:need].astype(np.float32))
        scan.head_y.extend(yi[train][:need].astype(np.int32))


# ---- npz: read the .npy members of the zip in chunks ------------------------------------------

class _NpyStream:
    """Sequential chunked reader of one ``.npy`` member of an ``.npz`` (stored or deflated)."""

    def __init__(self, path: str, key: str):
        import zipfile

        self.path, self.key = path, key
        try:
            self.zip = zipfile.ZipFile(path)
        except (OSError, zipfile.BadZipFile) as err:
            raise DataError(f"{path}: cannot read npz file ({err})") from None
        names = [n[:-4] for n in self.zip.namelist() if n.endswith(".npy")]
        if key not in names:
            self.zip.close()
            raise _MissingArray(names)
        self.f = self.zip.open(key + ".npy")
        try:
            version = np.lib.format.read_magic(self.f)
            shape, fortran, dtype = (np.lib.format.read_array_header_1_0(self.f) if version == (1, 0)
                                     else np.lib.format.read_array_header_2_0(self.f))
        except ValueError as err:
            raise DataError(f"{path}: array {key!r} is not a readable .npy array ({err})") from None
        if dtype.hasobject:
            raise DataError(f"{path}: array {key!r} holds Python objects (pickles are not read)")
        self.shape, self.fortran, self.dtype = shape, fortran, dtype
        self.row_items = int(np.prod(shape[1:])) if len(shape) > 1 else 1
        self.read_rows = 0

    def chunk(self, rows: int) -> np.ndarray:
        n = min(rows, (self.shape[0] if self.shape else 0) - self.read_rows)
        if n <= 0:
            return np.zeros((0,) + tuple(self.shape[1:]), self.dtype)
        data = self.f.read(n * self.row_items * self.dtype.itemsize)
        arr = np.frombuffer(data, dtype=self.dtype).reshape((n,) + tuple(self.shape[1:]))
        self.read_rows += n
        return arr

    def close(self) -> None:
        self.f.close()
        self.zip.close()


class _MissingArray(Exception):
    def __init__(self, names):
        self.names = names


def _npz_open(cfg: DataConfig) -> tuple[_NpyStream, _NpyStream]:
    streams = []
    try:
        for key in (cfg.x_key, cfg.y_key):
            streams.append(_NpyStream(cfg.path, key))
    except _MissingArray as err:
        for st in streams:
            st.close()
        raise DataError(f"{cfg.path}: no array named {key!r} (arrays in the file: {', '.join(err.names) or 'none'}; "
                        f"set data.x_key / data.y_key)") from None
    xs, ys = streams
    if xs.fortran or ys.fortran:
        xs.close(), ys.close()
        raise DataError(f"{cfg.path}: Fortran-ordered arrays cannot be streamed (save with np.savez of C-ordered arrays)")
    ysh = ys.shape[:1] if len(ys.shape) == 2 and ys.shape[1] == 1 else ys.shape
    if len(xs.shape) not in (1, 2):
        raise DataError(f"{cfg.path}: features must be a 2-D array (samples x features), got shape {xs.shape}")
    if len(ysh) != 1:
        raise DataError(f"{cfg.path}: labels must be a 1-D array of class indices, got shape {ys.shape}")
    if xs.shape[0] != ys.shape[0]:
        raise DataError(f"{cfg.path}: {xs.shape[0]} feature rows but {ys.shape[0]} labels")
    if not all(np.issubdtype(a.dtype, np.number) and not np.issubdtype(a.dtype, np.complexfloating)
               for a in (xs, ys)):
        raise DataError(f"{cfg.path}: features and labels must be real numbers (got {xs.dtype} and {ys.dtype})")
    return xs, ys


def _npz_chunks(cfg: DataConfig):
    """Yield ``(x float32 [n, F], y [n])`` chunks of an npz file, in order."""
    xs, ys = _npz_open(cfg)
    try:
        while True:
            x, y = xs.chunk(CHUNK_ROWS), ys.chunk(CHUNK_ROWS)
            if len(x) == 0:
                return
            if x.ndim == 1:
                x = x[:, None]
            yield x, y.reshape(len(y))
    finally:
        xs.close()
        ys.close()


# ---- csv ----------------------------------------------------------------------------------------

def _is_name(cell: str) -> bool:
    """A column name: starts with a letter or ``_`` (a typo'd number such as ``1.4x`` or an empty
    cell from a trailing comma is not one)."""
    cell = cell.strip()
    return bool(cell) and (cell[0].isalpha() or cell[0] == "_")


def _csv_layout(path: str, label_column: int, header_rule: str = "auto") -> tuple[bool, int]:
    """``(has_header, width)``: whether line 1 is skipped as a header (``data.header``), and the
    width of the first data row. ``auto``: line 1 is a header when at least one of its cells is a
    column name (:func:`_is_name`: ``x1,x2,label``; ``0,1,2,label`` as pandas writes numbered
    columns; ``,x1,label`` with pandas' unnamed index; ``150,4,setosa,...``); a line 1 without one
    (``5.1,1.4x,0``, a typo; ``5.1,3.5,0,``, a trailing comma) is a data row whose bad cell is
    reported. A UTF-8 byte-order mark (Excel's "CSV UTF-8") is ignored."""
    header = False
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            for lineno, row in enumerate(csv.reader(_csv_lines(handle, path)), start=1):
                if not row or all(not c.strip() for c in row):
                    continue
                _one_line_row(row, path, lineno)
                if lineno == 1 and (header_rule == "first_line" or header_rule == "auto" and any(
                        _is_name(c) and not _is_number(c) for c in row)):
                    header = True
                    continue
                width = len(row)
                if width < 2:
                    raise DataError(f"{path}:{lineno}: a row needs at least one feature and a label, got {width} column")
                if not -width <= label_column < width:
                    raise DataError(f"{path}: data.label_column ({label_column}) is outside the {width} columns")
                return header, width
    except OSError as err:
        raise DataError(f"{path}: cannot open data file ({err.strerror or type(err).__name__})") from None
    except UnicodeDecodeError:
        raise DataError(f"{path}: not a UTF-8 text file") from None
    raise DataError(f"{path}: no data rows")


def _csv_chunks(cfg: DataConfig, lines_out: list):
    """Yield ``(x, y)`` chunks of a CSV, checking each row; ``lines_out`` gets each chunk's file lines."""
    path, label_column = cfg.path, cfg.label_column
    header, width = _csv_layout(path, label_column, cfg.header)
    col = label_column if label_column >= 0 else width + label_column
    xs, ys, lines = [], [], []
    with open(path, newline="", encoding="utf-8-sig") as handle:
        for lineno, row in enumerate(csv.reader(_csv_lines(handle, path)), start=1):
            if (lineno == 1 and header) or not row or all(not c.strip() for c in row):
                continue
            _one_line_row(row, path, lineno)
            if len(row) != width:
                raise DataError(f"{path}:{lineno}: expected {width} columns like the first row, got {len(row)}")
            try:
                values = [_number(c) for c in row]
            except ValueError:
                bad = next(c for c in row if not _is_number(c))
                hint = " (if line 1 is a header, set data.header: first_line)" if lineno == 1 else ""
                raise DataError(f"{path}:{lineno}: {bad!r} is not a number{hint}") from None
            ys.append(values.pop(col))
            xs.append(values)
            lines.append(lineno)
            if len(xs) == CHUNK_ROWS:
                lines_out[:] = lines
                yield np.asarray(xs), np.asarray(ys)
                xs, ys, lines = [], [], []
    if xs:
        lines_out[:] = lines
        yield np.asarray(xs), np.asarray(ys)


def _csv_dataset(cfg: DataConfig, width: int, header: bool):
    import tensorflow as tf

    col = cfg.label_column if cfg.label_column >= 0 else width + cfg.label_column
    lines = tf.data.TextLineDataset(cfg.path)
    if header:
        lines = lines.skip(1)
    else:  # the first line may start with a UTF-8 byte-order mark
        lines = lines.map(lambda t: tf.strings.regex_replace(t, "^\ufeff", ""))
    lines = lines.filter(lambda t: tf.strings.length(tf.strings.regex_replace(t, r"[\s,]", "")) > 0)

    def parse(line):
        cols = tf.io.decode_csv(line, record_defaults=[[0.0]] * width)
        y = tf.cast(cols[col], tf.int32)
        x = tf.stack([c for i, c in enumerate(cols) if i != col])
        return tf.cast(x, tf.float32), y

    return lines.map(parse, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


# ---- TFRecord -----------------------------------------------------------------------------------

def write_tfrecord(path: str, x: np.ndarray, y: np.ndarray, x_key: str = "x", y_key: str = "y") -> None:
    """Write ``(features, label)`` rows as ``tf.train.Example`` records (the ``tfrecord`` dataset format)."""
    import tensorflow as tf

    with tf.io.TFRecordWriter(str(path)) as writer:
        for xi, yi in zip(np.asarray(x, np.float32), np.asarray(y)):
            ex = tf.train.Example(features=tf.train.Features(feature={
                x_key: tf.train.Feature(float_list=tf.train.FloatList(value=np.ravel(xi).tolist())),
                y_key: tf.train.Feature(int64_list=tf.train.Int64List(value=[int(yi)]))}))
            writer.write(ex.SerializeToString())


def _tfrecord_chunks(cfg: DataConfig):
    """Yield ``(x, y)`` chunks of a TFRecord file of Examples, checking the record layout."""
    import tensorflow as tf

    spec = {cfg.x_key: tf.io.VarLenFeature(tf.float32), cfg.y_key: tf.io.VarLenFeature(tf.int64)}
    ds = tf.data.TFRecordDataset(cfg.path).batch(CHUNK_ROWS)
    first = 0
    width = None
    consumed = 0  # bytes of the records read: each is its data plus 16 (length, two CRCs)
    it = iter(ds)
    while True:
        try:
            raw = next(it)
        except StopIteration:
            # TensorFlow stops silently at a record header cut short (a truncated copy): the
            # records must account for every byte of the file.
            size = Path(cfg.path).stat().st_size
            if consumed != size:
                raise DataError(f"{cfg.path}: record {first}: truncated TFRecord data ({size - consumed} bytes "
                                f"after the last whole record; {first} records read)") from None
            return
        except tf.errors.DataLossError:
            bad = first
            try:  # find the exact record, one at a time
                for _ in tf.data.TFRecordDataset(cfg.path).skip(first):
                    bad += 1
            except tf.errors.DataLossError:
                pass
            raise DataError(f"{cfg.path}: record {bad}: corrupted or truncated TFRecord data") from None
        except tf.errors.OpError as err:
            raise DataError(f"{cfg.path}: cannot read TFRecord file ({err.message.splitlines()[0]})") from None
        try:
            parsed = tf.io.parse_example(raw, spec)
        except tf.errors.InvalidArgumentError:
            for i in range(int(raw.shape[0])):  # find the first record that does not parse
                try:
                    tf.io.parse_single_example(raw[i], spec)
                except tf.errors.InvalidArgumentError as err:
                    raise DataError(f"{cfg.path}: record {first + i}: not an Example with float feature "
                                    f"{cfg.x_key!r} and int64 feature {cfg.y_key!r} "
                                    f"({err.message.splitlines()[0][:120]})") from None
            raise
        xsp, ysp = parsed[cfg.x_key], parsed[cfg.y_key]
        n = int(raw.shape[0])
        consumed += int(tf.reduce_sum(tf.strings.length(raw))) + 16 * n
        xlen = np.bincount(xsp.indices[:, 0].numpy(), minlength=n)
        ylen = np.bincount(ysp.indices[:, 0].numpy(), minlength=n)
        if width is None:
            width = int(xlen[0])
            if width == 0:
                raise DataError(f"{cfg.path}: record 0: feature {cfg.x_key!r} is missing or empty (data.x_key)")
        bad = np.flatnonzero((xlen != width) | (ylen != 1))
        if len(bad):
            i = int(bad[0])
            what = (f"{cfg.y_key!r} must hold exactly one label, got {ylen[i]}" if ylen[i] != 1 else
                    f"{cfg.x_key!r} has {xlen[i]} values, expected {width} like record 0")
            raise DataError(f"{cfg.path}: record {first + i}: {what}")
        x = tf.sparse.to_dense(xsp).numpy().reshape(n, width)
        y = tf.sparse.to_dense(ysp).numpy().reshape(n)
        yield x, y
        first += n


def _tfrecord_dataset(cfg: DataConfig, width: int):
    import tensorflow as tf

    spec = {cfg.x_key: tf.io.FixedLenFeature([width], tf.float32), cfg.y_key: tf.io.FixedLenFeature([], tf.int64)}

    def parse(raw):
        ex = tf.io.parse_example(raw, spec)
        return ex[cfg.x_key], tf.cast(ex[cfg.y_key], tf.int32)

    return tf.data.TFRecordDataset(cfg.path).batch(CHUNK_ROWS).map(parse).unbatch()


def _make_streamed(cfg: DataConfig, seed: int) -> Data:
    """Check a file in one streaming pass, then build pipelines that read it with ``tf.data``."""
    import tensorflow as tf

    path = cfg.path
    _require_file(path)
    scan = _Scan()
    first = 0
    if cfg.name == "csv":
        lines: list = []
        chunks = _csv_chunks(cfg, lines)
        where_of = lambda first: (lambda i: f"{path}:{lines[i]}")  # noqa: E731 - file line numbers
    elif cfg.name == "npz":
        chunks = _npz_chunks(cfg)
        where_of = lambda first: (lambda i: f"{path}: row {first + i}")  # noqa: E731
    else:
        chunks = _tfrecord_chunks(cfg)
        where_of = lambda first: (lambda i: f"{path}: record {first + i}")  # noqa: E731
    for x, y in chunks:
        if scan.sum is not None and x.shape[1] != scan.features:
            raise DataError(f"{where_of(first)(0)}: {x.shape[1]} features, expected {scan.features}")
        _check_chunk(scan, x, y, first, cfg, seed, where_of(first))
        first += len(x)
    if scan.rows == 0:
        raise DataError(f"{path}: no samples")
    classes = cfg.classes if cfg.classes is not None else inferred_classes(scan.max_label, path)
    if classes < 2:
        raise DataError(f"{path}: found only {classes} class; a classifier needs at least 2")
    if cfg.validation_split > 0 and scan.val_rows == 0:
        raise DataError(f"data.validation_split: {cfg.validation_split} of {scan.rows} samples leaves no "
                        "validation rows (raise it, or set 0)")
    if scan.train_rows == 0:
        raise DataError(f"data.validation_split: {cfg.validation_split} leaves no training rows")

    features = scan.features
    if cfg.name == "csv":
        header, width = _csv_layout(path, cfg.label_column, cfg.header)
        rows = _csv_dataset(cfg, width, header)
    elif cfg.name == "npz":
        sig = (tf.TensorSpec([None, features], tf.float32), tf.TensorSpec([None], tf.int32))
        rows = tf.data.Dataset.from_generator(
            lambda: ((x.astype(np.float32), y.astype(np.int32)) for x, y in _npz_chunks(cfg)),
            output_signature=sig).unbatch()
    else:
        rows = _tfrecord_dataset(cfg, features)
    mean = std = None
    if cfg.standardize:
        n = max(scan.train_rows, 1)
        mean = scan.sum / n
        std = np.sqrt(np.maximum(scan.sumsq / n - mean ** 2, 0.0))
        std = np.where(std > 0, std, 1.0)
        m32, s32 = tf.constant(mean, tf.float32), tf.constant(std, tf.float32)
        rows = rows.map(lambda x, y: ((x - m32) / s32, y))
    if cfg.validation_split > 0:
        frac = cfg.validation_split
        indexed = rows.enumerate()

        def is_val(i, xy):
            return row_in_validation(i, seed, frac)

        def is_train(i, xy):
            return tf.logical_not(row_in_validation(i, seed, frac))

        def drop_index(i, xy):
            return xy

        train_rows = indexed.filter(is_train).map(drop_index)
        val_rows = indexed.filter(is_val).map(drop_index)
    else:
        train_rows, val_rows = rows, None
    head_x = np.asarray(scan.head_x, np.float32).reshape(-1, features)
    head_y = np.asarray(scan.head_y, np.int32)
    if mean is not None:
        head_x = ((head_x - mean) / std).astype(np.float32)
    buffer = max(1, min(cfg.shuffle_buffer, scan.train_rows))
    train = train_rows
    if cfg.shuffle:
        train = train.shuffle(buffer, seed=seed, reshuffle_each_iteration=True)
    train = train.batch(cfg.batch_size).prefetch(tf.data.AUTOTUNE)

    def batched(rows, count: int, size: int):
        """``rows`` in batches, with their number declared: the scan counted the rows, and Keras
        warns "Your input ran out of data" at the end of a dataset of unknown length."""
        return rows.batch(size).apply(tf.data.experimental.assert_cardinality(-(-count // size)))

    validation = batched(val_rows, scan.val_rows, cfg.batch_size) if val_rows is not None else None
    return Data(train=train, validation=validation, x_train=head_x, y_train=head_y, x_val=None, y_val=None,
                features=features, classes=classes, source=path, streamed=True, train_rows=scan.train_rows,
                batch_size=cfg.batch_size, base_train=train_rows, shuffle=cfg.shuffle, shuffle_buffer=buffer,
                seed=seed, eval_train=batched(train_rows, scan.train_rows, EVAL_BATCH),
                eval_validation=None if val_rows is None else batched(val_rows, scan.val_rows, EVAL_BATCH))
