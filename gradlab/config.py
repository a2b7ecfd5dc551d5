"""The experiment schema: frozen dataclasses, strict validation, YAML with line numbers, overrides.

Nothing in this module imports TensorFlow, so ``gradlab validate`` and every config error
happen before any TensorFlow work. The one exception is checking the options of the
``diagnostics:`` entries, which asks the diagnostic classes themselves (see
:func:`validate_plugins`); that imports Keras but still runs before a run directory exists.

Schema conventions:

* every key has a type, a default and, where it applies, a set of allowed values or a range;
* unknown keys are errors with a did-you-mean suggestion;
* keys that only make sense for one choice (``data.path`` for file datasets, ``model.hidden``
  for ``mlp``) are errors when given for another;
* every problem is reported as ``FILE:LINE: key.path: what is wrong (what is allowed)``.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from gradlab.errors import ConfigError

DATASETS = ("synthetic", "iris", "digits", "npz", "csv", "tfrecord")
FILE_DATASETS = ("npz", "csv", "tfrecord")
MODEL_KINDS = ("softmax_linear", "mlp")
ACTIVATIONS = ("sigmoid", "tanh", "relu", "leaky_relu", "linear")
LOSSES = ("cross_entropy", "mse")
REDUCTIONS = ("mean", "sum")
OPTIMIZERS = ("sgd", "momentum", "adam", "adamw", "rmsprop", "adagrad")
DEVICES = ("auto", "cpu", "gpu")
PRECISIONS = ("float32", "mixed_float16", "mixed_bfloat16")
DISTRIBUTE = ("none", "mirrored", "multi_worker")
# Keras initializer names and the arguments each accepts (checked here, built in models.py).
INITIALIZERS: dict[str, tuple[str, ...]] = {
    "zeros": (),
    "ones": (),
    "constant": ("value",),
    "random_normal": ("mean", "stddev"),
    "random_uniform": ("minval", "maxval"),
    "truncated_normal": ("mean", "stddev"),
    "glorot_normal": (),
    "glorot_uniform": (),
    "he_normal": (),
    "he_uniform": (),
    "lecun_normal": (),
    "lecun_uniform": (),
    "orthogonal": ("gain",),
    "variance_scaling": ("scale", "mode", "distribution"),
}
# The string arguments of variance_scaling, with what Keras accepts.
INITIALIZER_CHOICES: dict[str, tuple[str, ...]] = {
    "mode": ("fan_in", "fan_out", "fan_avg"),
    "distribution": ("truncated_normal", "untruncated_normal", "normal", "uniform"),
}
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
SYNTHETIC_MAX_VALUES = 2**28  # float32 values of generated data (1 GiB), all in memory
NAME_MAX = 200  # the run directory adds "-YYYYmmdd-HHMMSS[-N]"; file systems allow 255 bytes
OVERRIDE_SOURCE = "command line"
FLOAT32_MAX = 3.4028234663852886e38  # numpy.finfo(numpy.float32).max (no numpy import here)


def _f(default: Any, kind: str, help: str, **rules: Any) -> Any:
    """A schema field: ``kind`` is the value type, ``rules`` are choices/minimum/maximum/only_for."""
    meta = {"kind": kind, "help": help, **rules}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class DataConfig:
    """The ``data`` section: which dataset, how it is batched and split."""

    name: str = _f("iris", "choice", "dataset: bundled, generated or a file", choices=DATASETS)
    path: str | None = _f(None, "path", "file to read; required for the npz, csv and tfrecord datasets",
                          only_for=("name", FILE_DATASETS))
    batch_size: int = _f(32, "int", "samples per training step", minimum=1, maximum=2**31 - 1)
    shuffle: bool = _f(True, "bool", "reshuffle every epoch; false keeps the file/generation order")
    shuffle_buffer: int = _f(10000, "int", "streamed files (npz, csv, tfrecord): rows in the shuffle buffer "
                             "(memory; in-memory datasets shuffle fully)", minimum=1,
                             only_for=("name", FILE_DATASETS))
    validation_split: float = _f(0.0, "float", "fraction of each class held out for validation (rows picked with the seed)",
                                 minimum=0.0, maximum=0.9)
    samples: int = _f(300, "int", "synthetic: number of samples (samples x features at most 2**28: "
                      "generated in memory)", minimum=2,
                      only_for=("name", ("synthetic",)))
    features: int = _f(4, "int", "synthetic: input features (the seed's 4)", minimum=1,
                       only_for=("name", ("synthetic",)))
    classes: int | None = _f(None, "int_or_null", "number of classes: synthetic default 3 (the seed's); "
                             "for files, inferred as max label + 1 unless given", minimum=2, maximum=2**31 - 1,
                             only_for=("name", ("synthetic",) + FILE_DATASETS))
    cluster_std: float = _f(1.0, "float", "synthetic: standard deviation of each Gaussian blob",
                            minimum=0.0, exclusive_minimum=True, only_for=("name", ("synthetic",)))
    standardize: bool = _f(False, "bool", "scale each feature to zero mean, unit variance (training-split statistics)")
    label_column: int = _f(-1, "int", "csv: index of the label column (negative counts from the end)",
                           only_for=("name", ("csv",)))
    header: str = _f("auto", "choice", "csv: is line 1 a header? auto: when a cell of it is a column name "
                     "(starts with a letter or '_' and is not a number); first_line: always; none: never "
                     "(a bad cell there is an error)",
                     choices=("auto", "first_line", "none"), only_for=("name", ("csv",)))
    x_key: str = _f("x", "str", "npz: array name of the features; tfrecord: float feature key",
                    only_for=("name", ("npz", "tfrecord")))
    y_key: str = _f("y", "str", "npz: array name of the labels; tfrecord: int64 feature key",
                    only_for=("name", ("npz", "tfrecord")))


@dataclass(frozen=True)
class ModelConfig:
    """The ``model`` section: the seed's softmax linear classifier or an MLP."""

    kind: str = _f("softmax_linear", "choice", "softmax_linear: logits = x @ W + b; mlp: hidden layers",
                   choices=MODEL_KINDS)
    hidden: list[int] = _f([], "int_list", "mlp: hidden layer widths, e.g. [64, 64]; required (at least one) for mlp",
                           only_for=("kind", ("mlp",)))
    activation: str = _f("relu", "choice", "mlp: hidden activation (leaky_relu has alpha 0.2 as in the seed)",
                         choices=ACTIVATIONS, only_for=("kind", ("mlp",)))
    kernel_initializer: Any = _f(None, "initializer",
                                 "name or {name: ..., args}; default: random_normal(stddev=1) for "
                                 "softmax_linear (the seed's tf.random.normal), glorot_uniform for mlp")
    bias_initializer: Any = _f("zeros", "initializer", "name or {name: ..., args}; the seed's b is zeros (null: zeros; "
                                                       "constant without value is 0)")


@dataclass(frozen=True)
class TrainConfig:
    """The ``train`` section: loss, optimizer, schedule, device and compilation."""

    loss: str = _f("cross_entropy", "choice", "cross_entropy (from logits) or mse (on softmax, the seed's)",
                   choices=LOSSES)
    reduction: str = _f("mean", "choice", "mean or sum over the batch (sum reproduces the seed's reduce_sum)",
                        choices=REDUCTIONS)
    optimizer: str = _f("sgd", "choice", "optimizer", choices=OPTIMIZERS)
    learning_rate: float = _f(0.1, "float", "step size", minimum=0.0, exclusive_minimum=True)
    momentum: float = _f(0.9, "float", "momentum: the momentum coefficient", minimum=0.0, maximum=1.0,
                         exclusive_maximum=True, only_for=("optimizer", ("momentum",)))
    clip_norm: float | None = _f(None, "float_or_null", "clip the global gradient norm to this value",
                                 minimum=0.0, exclusive_minimum=True)
    epochs: int = _f(10, "int", "passes over the training data", minimum=1)
    device: str = _f("auto", "choice", "auto uses a GPU when one is visible", choices=DEVICES)
    jit_compile: bool = _f(False, "bool", "compile the train step with XLA")
    steps_per_execution: int = _f(1, "int", "train steps per compiled call; must divide the batches of an epoch, and "
                                  "every diagnostic's `every` (and log_every) must be a multiple of it "
                                  "(unset defaults are rounded up)", minimum=1)
    precision: str = _f("float32", "choice", "compute dtype policy; variables stay float32",
                        choices=PRECISIONS)
    log_every: int = _f(10, "int", "write step/loss (the mean over the steps since the last write) every N steps",
                        minimum=1)
    checkpoint_every: int = _f(0, "int", "save a checkpoint every N steps (0: only at the end)", minimum=0)
    keep_checkpoints: int = _f(3, "int", "how many checkpoints to keep", minimum=1)
    distribute: str = _f("none", "choice", "tf.distribute strategy", choices=DISTRIBUTE)
    cpu_devices: int = _f(0, "int", "split the CPU into N logical devices (0: don't); lets mirrored run on a CPU (more than 1 needs "
                          "distribute: mirrored)",
                          minimum=0, maximum=64)


@dataclass(frozen=True)
class DiagnosticSpec:
    """One entry of ``diagnostics:``: a diagnostic ``type`` and its options."""

    type: str
    options: Mapping[str, Any]
    line: int | None = None


@dataclass(frozen=True)
class CallbackSpec:
    """One entry of ``callbacks:``: any Keras callback by import path, ``module:Class``."""

    cls: str
    args: Mapping[str, Any]
    line: int | None = None


@dataclass(frozen=True)
class Experiment:
    """A validated experiment. Build it with :func:`load_config` or :func:`from_dict`."""

    name: str = "experiment"
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    diagnostics: tuple[DiagnosticSpec, ...] | None = None
    callbacks: tuple[CallbackSpec, ...] = ()
    log_dir: str = "runs"
    sweep: Mapping[str, tuple[Any, ...]] | None = None
    source: str = "<dict>"

    def to_dict(self) -> dict[str, Any]:
        """The resolved config as plain YAML-able data (what ``config.yaml`` in a run holds)."""
        out: dict[str, Any] = {"name": self.name, "seed": self.seed}
        for section in ("data", "model", "train"):
            obj = getattr(self, section)
            values = {}
            for f in dataclasses.fields(obj):
                only = f.metadata.get("only_for")
                if only and getattr(obj, only[0]) not in only[1]:
                    continue  # does not apply to this choice (and would be rejected on reload)
                values[f.name] = getattr(obj, f.name)
            out[section] = values
        out["diagnostics"] = (None if self.diagnostics is None else
                              [{"type": d.type, **dict(d.options)} for d in self.diagnostics])
        out["callbacks"] = [{"class": c.cls, "args": dict(c.args)} for c in self.callbacks]
        out["log_dir"] = self.log_dir
        if self.sweep:
            out["sweep"] = {k: list(v) for k, v in self.sweep.items()}
        return out


SECTIONS = {"data": DataConfig, "model": ModelConfig, "train": TrainConfig}
TOP_LEVEL = ("name", "seed", "data", "model", "train", "diagnostics", "callbacks", "log_dir", "sweep")


# ----------------------------------------------------------------------------------------------
# YAML with line numbers

def _dotted(path: tuple) -> str:
    """A key path as YAML spells it: ``data.1``, ``true`` (not Python's ``True``), ``null``."""
    return ".".join("null" if p is None else str(p).lower() if isinstance(p, bool) else str(p) for p in path)


def _node_key(key_node: yaml.Node) -> Any:
    """A mapping key as the safe loader makes it (``1`` an int, ``true`` a bool), so the line
    table is keyed like the parsed data; the node's text if it is no plain value."""
    try:
        key = yaml.constructor.SafeConstructor().construct_object(key_node, deep=True)
        hash(key)
        return key
    except Exception:  # an unhashable key: yaml.load reports it
        return key_node.value


def _node_lines(node: yaml.Node, prefix: tuple, lines: dict, problems: list, file: str) -> None:
    if isinstance(node, yaml.MappingNode):
        seen: set = set()
        for key_node, value_node in node.value:
            key = _node_key(key_node)
            path = prefix + (key,)
            line = key_node.start_mark.line + 1
            if key in seen:
                problems.append((file, line, _dotted(path), "duplicate key (each key may appear once)"))
            seen.add(key)
            lines[path] = line
            _node_lines(value_node, path, lines, problems, file)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            lines[prefix + (i,)] = item.start_mark.line + 1
            _node_lines(item, prefix + (i,), lines, problems, file)


class YamlLoader(yaml.SafeLoader):
    """PyYAML's safe loader, reading numbers as YAML 1.2 does: ``1e-6`` is a float (YAML 1.1, which
    PyYAML follows, needs ``1.0e-6`` and reads ``1e-6`` as the string '1e-6'). Used for every
    config file, override and sweep value."""


class YamlDumper(yaml.SafeDumper):
    """PyYAML's safe dumper, knowing the same numbers as :class:`YamlLoader`: a *string* such as
    '1e3' is written quoted, so that what gradlab writes (a run's ``config.yaml``, a sweep's
    configs) reads back as it was."""


_FLOAT_12 = re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                  |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                  |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                  |[-+]?\.(?:inf|Inf|INF)
                  |\.(?:nan|NaN|NAN))$""", re.X)
for _cls in (YamlLoader, YamlDumper):  # (copies of SafeLoader's / SafeDumper's resolvers: those are unchanged)
    _cls.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT_12, list("-+0123456789."))


def load_yaml(text: str) -> Any:
    """``yaml.safe_load`` with :class:`YamlLoader`."""
    return yaml.load(text, Loader=YamlLoader)  # noqa: S506 - a SafeLoader


def dump_yaml(data: Any, **kwargs) -> str:
    """``yaml.safe_dump`` with :class:`YamlDumper` (what :func:`load_yaml` reads back unchanged)."""
    return yaml.dump(data, Dumper=YamlDumper, **kwargs)


def parse_yaml(text: str, file: str) -> tuple[Any, dict[tuple, int]]:
    """Parse YAML with the safe loader and return ``(data, {key path tuple: line})``."""
    try:
        node = yaml.compose(text, Loader=YamlLoader)
        data = load_yaml(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        what = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError([(file, line, "", f"YAML syntax error: {what}")]) from None
    lines: dict[tuple, int] = {}
    problems: list = []
    if node is not None:
        _node_lines(node, (), lines, problems, file)
    if problems:
        raise ConfigError(problems)
    return data, lines


# ----------------------------------------------------------------------------------------------
# Validation

def _suggest(word: str, options) -> str:
    options = [str(o) for o in options]
    same_letters = [o for o in options if o.lower() == str(word).lower()]  # `CSV` for csv
    close = same_letters or difflib.get_close_matches(str(word), options, n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


def _described(value: Any) -> str:
    """A value as YAML spells it, with its type: ``null``, ``boolean true``, ``string '1e3'``."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"boolean {str(value).lower()}"
    return f"{_type_name(value)} {value!r}"


def _type_name(value: Any) -> str:
    return "null" if value is None else {bool: "boolean", int: "integer", float: "number", str: "string",
                                         list: "list", dict: "mapping"}.get(type(value), type(value).__name__)


class _Checker:
    """Collects problems; ``where(path)`` maps a key path to ``(file, line)``."""

    def __init__(self, file: str, lines: dict[tuple, int], overrides: dict[tuple, str] | None = None):
        self.file, self.lines, self.overrides = file, lines, overrides or {}
        self.problems: list[tuple[str, int | None, str, str]] = []

    def add(self, path: tuple, message: str) -> None:
        dotted = _dotted(path)
        if any(p[2] == dotted for p in self.problems):
            return  # one problem per key: the first is the cause, later checks would repeat it
        for n in range(len(path), 0, -1):  # an override of this key or of a parent wins
            if path[:n] in self.overrides:
                self.problems.append((OVERRIDE_SOURCE, None, dotted, f"{message} [from {self.overrides[path[:n]]}]"))
                return
        if path not in self.lines:  # a key the file does not have, made by an override below it
            below = next((text for key, text in self.overrides.items() if key[:len(path)] == path), None)
            if below is not None:
                self.problems.append((OVERRIDE_SOURCE, None, dotted, f"{message} [from {below}]"))
                return
        line = None
        for n in range(len(path), 0, -1):
            if path[:n] in self.lines:
                line = self.lines[path[:n]]
                break
        self.problems.append((self.file, line, dotted, message))


def _check_value(chk: _Checker, path: tuple, value: Any, meta: dict) -> Any:
    """Validate one value against its field metadata; return the normalised value or None."""
    kind = meta["kind"]
    if kind == "bool":
        if not isinstance(value, bool):
            chk.add(path, f"expected true or false, got {_described(value)}")
            return None
        return value
    if kind in ("int", "float", "float_or_null", "int_or_null"):
        if kind.endswith("_or_null") and value is None:
            return None
        if kind == "int_or_null":
            kind = "int"
        if kind != "int" and isinstance(value, str):  # PyYAML reads 1e-3 as a string
            try:
                value = float(value)
            except ValueError:
                pass
        ok = isinstance(value, int) and not isinstance(value, bool)
        if kind != "int":
            ok = ok or isinstance(value, float)
        if not ok:
            want = "an integer" if kind == "int" else "a number"
            hint = ""
            if kind == "int" and isinstance(value, str):
                try:
                    as_float = float(value)
                    if as_float.is_integer():  # PyYAML reads 1e3 as a string
                        hint = f" (write {int(as_float)})"
                except (ValueError, OverflowError):
                    pass
            chk.add(path, f"expected {want}, got {_described(value)}{hint}")
            return None
        if kind != "int":
            value = float(value)
            if not math.isfinite(value):
                chk.add(path, f"expected a finite number, got {value!r}")
                return None
        return _check_range(chk, path, value, meta)
    if kind == "choice":
        choices = meta["choices"]
        if not isinstance(value, str) or value not in choices:
            if isinstance(value, bool):  # YAML 1.1 reads yes/no/on/off as booleans: say so, in YAML's words
                chk.add(path, f"{'true' if value else 'false'} (YAML reads yes/no/on/off as a boolean) is not one "
                              f"of {', '.join(choices)}")
            else:
                chk.add(path, f"{value!r} is not one of {', '.join(choices)}{_suggest(value, choices)}")
            return None
        return value
    if kind in ("str", "path"):
        if not isinstance(value, str) or not value:
            if kind == "path" and value is None:
                return None
            chk.add(path, f"expected a non-empty string, got {_described(value)}")
            return None
        return os.path.expanduser(value) if kind == "path" else value
    if kind == "int_list":
        if isinstance(value, int) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            chk.add(path, f"expected a list of positive integers such as [64, 64], got {value!r}")
            return None
        bad = [v for v in value if v < 1]
        if bad:
            chk.add(path, f"layer widths must be >= 1, got {bad[0]} in {value}")
            return None
        return list(value)
    if kind == "initializer":
        return _check_initializer(chk, path, value)
    raise AssertionError(kind)


def _check_range(chk: _Checker, path: tuple, value: float, meta: dict):
    lo, hi = meta.get("minimum"), meta.get("maximum")
    lo_x, hi_x = meta.get("exclusive_minimum", False), meta.get("exclusive_maximum", False)
    if lo is not None and (value < lo or (lo_x and value == lo)):
        chk.add(path, f"{value!r} is out of range (must be {'>' if lo_x else '>='} {lo})")
        return None
    if hi is not None and (value > hi or (hi_x and value == hi)):
        chk.add(path, f"{value!r} is out of range (must be {'<' if hi_x else '<='} {hi})")
        return None
    return value


def _check_initializer(chk: _Checker, path: tuple, value: Any):
    """The checked initializer (a name, or ``{name, **args}``); ``None`` (YAML ``null``) stands for
    the key's default. ``constant`` without ``value`` is 0, as in Keras."""
    if value is None:
        return None
    if isinstance(value, str):
        name, args = value, {}
    elif isinstance(value, dict):
        if "name" not in value:
            chk.add(path, f"an initializer mapping needs a 'name' key, e.g. {{name: random_normal, stddev: 2.0}}; got {value!r}")
            return None
        name, args = value["name"], {k: v for k, v in value.items() if k != "name"}
    else:
        chk.add(path, f"expected an initializer name or mapping, got {_described(value)}")
        return None
    if not isinstance(name, str) or name not in INITIALIZERS:
        chk.add(path, f"{name!r} is not one of {', '.join(INITIALIZERS)}"
                      f"{_suggest(name, INITIALIZERS) if isinstance(name, str) else ''}")
        return None
    if name == "orthogonal" and path[-1] == "bias_initializer":
        chk.add(path, "orthogonal needs a matrix (a kernel); a bias is a vector")
        return None
    allowed = INITIALIZERS[name]
    for key, arg in list(args.items()):
        if key not in INITIALIZER_CHOICES and isinstance(arg, str):  # PyYAML reads 1e-3 as a string
            try:
                arg = args[key] = float(arg)
            except ValueError:
                pass
        if key not in allowed:
            chk.add(path + (key,), f"{name} takes no argument {key!r} (allowed: {', '.join(allowed) or 'none'})"
                    f"{_suggest(key, allowed)}")
            return None
        if key in INITIALIZER_CHOICES:
            choices = INITIALIZER_CHOICES[key]
            if key == "distribution" and isinstance(arg, str):
                arg = arg.lower()  # as Keras reads it (mode is case-sensitive there)
            if not isinstance(arg, str) or arg not in choices:
                chk.add(path + (key,), f"{arg!r} is not one of {', '.join(choices)}")
                return None
        elif isinstance(arg, bool) or not isinstance(arg, (int, float)) or not math.isfinite(arg):
            chk.add(path + (key,), f"expected a finite number, got {_described(arg)}")
            return None
        elif key in ("stddev", "scale") and arg <= 0:
            chk.add(path + (key,), f"{arg!r} is out of range (must be > 0)")
            return None
        elif abs(arg) > FLOAT32_MAX:  # the weights are float32: Keras fails to convert it
            chk.add(path + (key,), f"{arg!r} is beyond float32's range (|value| <= {FLOAT32_MAX:.4g})")
            return None
    if name == "random_uniform" and args.get("minval", -0.05) >= args.get("maxval", 0.05):
        chk.add(path, f"random_uniform needs minval < maxval, got [{args.get('minval', -0.05)}, "
                      f"{args.get('maxval', 0.05)}]")
        return None
    return {"name": name, **args} if args else name


def _check_section(chk: _Checker, name: str, raw: Any, cls) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        chk.add((name,), f"expected a mapping of keys, got {_described(raw)}")
        return cls()
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in fields:
            chk.add((name, key), f"unknown key (allowed: {', '.join(fields)}){_suggest(key, fields)}")
            continue
        checked = _check_value(chk, (name, key), value, dict(fields[key].metadata))
        if checked is not None or value is None and fields[key].metadata["kind"] in ("path", "initializer",
                                                                                      "float_or_null"):
            values[key] = checked
    section = cls(**values)
    # keys that only apply to one choice of another key
    for key in raw:
        if key not in fields:
            continue
        only = fields[key].metadata.get("only_for")
        if only and raw[key] is not None:
            other, allowed = only
            if other in raw and other not in values:  # `other` itself was refused: it decides nothing
                continue
            actual = getattr(section, other)
            if actual not in allowed:
                chk.add((name, key), f"only used when {name}.{other} is {' or '.join(allowed)} "
                                     f"(here {name}.{other} is {actual}); remove it")
    return section


def schedule_problem(every: int, steps_per_execution: int) -> str | None:
    """Why a schedule of ``every`` steps cannot be kept with ``steps_per_execution``, or None.

    Callbacks run between compiled executions, and a due step's outputs are captured once per
    execution, so with ``steps_per_execution = k > 1`` a schedule must be a multiple of ``k``:
    its due steps are then the first step of an execution (one per execution), and a probe at
    step ``n`` sees the weights after exactly ``n`` updates. ``every <= 0`` (never) is fine.
    """
    k = steps_per_execution
    if k <= 1 or every <= 0 or every % k == 0:
        return None
    lower = every // k * k
    use = f"{lower} or {lower + k}" if lower else f"{k}"
    return (f"{every} is not a multiple of train.steps_per_execution ({k}): diagnostics run between "
            f"executions of {k} steps; use {use}")


def check_execution_fits_epoch(exp: "Experiment", batches_per_epoch: int) -> None:
    """Raise :class:`ConfigError` unless ``train.steps_per_execution`` divides the batches of an
    epoch: Keras runs whole executions, so otherwise an epoch would train past its end (extra
    steps, shifted epochs and step labels). Needs the data, so it runs when a run starts."""
    k = exp.train.steps_per_execution
    if k <= 1 or batches_per_epoch % k == 0:
        return
    n = batches_per_epoch
    divisors = sorted(sorted((d for d in range(1, n + 1) if n % d == 0), key=lambda d: (abs(d - k), d))[:4])
    raise ConfigError([(exp.source, None, "train.steps_per_execution",
                        f"{k} does not divide the {batches_per_epoch} batches of an epoch (data.batch_size "
                        f"{exp.data.batch_size}): an execution would run past the epoch's end; use "
                        f"{', '.join(map(str, divisors))}, or change data.batch_size")])


def round_to_execution(every: int, steps_per_execution: int) -> int:
    """``every`` rounded up to a multiple of ``steps_per_execution`` (0 stays 0): how a default
    schedule is kept with ``steps_per_execution > 1`` (see :func:`schedule_problem`)."""
    k = max(1, steps_per_execution)
    return -(-every // k) * k if every > 0 else every


def _check_cross(chk: _Checker, exp: dict) -> None:
    data, model, train = exp["data"], exp["model"], exp["train"]
    log_every = ("train", "log_every")
    if log_every in chk.lines or log_every in chk.overrides:  # unset: rounded up (round_to_execution)
        problem = schedule_problem(train.log_every, train.steps_per_execution)
        if problem:
            chk.add(log_every, problem)
    if train.jit_compile and train.distribute != "none":
        # Keras compiles the whole strategy.run with XLA, and the step gathers the replicas'
        # logits and labels into a tensor whose size comes from an all-reduce (not a constant).
        chk.add(("train", "jit_compile"), f"XLA cannot compile gradlab's step under train.distribute: "
                                          f"{train.distribute} (the replicas' gathers have no static shape); "
                                          "set jit_compile: false or distribute: none")
    if data.name == "synthetic" and data.samples * data.features > SYNTHETIC_MAX_VALUES:
        size = data.samples * data.features * 4 / 2**30
        chk.add(("data", "samples"), f"synthetic data is generated in memory: samples x features = "
                                     f"{data.samples} x {data.features} = {data.samples * data.features:,} values "
                                     f"({size:,.1f} GiB of float32), more than {SYNTHETIC_MAX_VALUES:,} (1 GiB); "
                                     f"for more, write it to a file and stream it (data.name: tfrecord)")
    if data.name in FILE_DATASETS and not data.path:
        chk.add(("data", "path"), f"required when data.name is {data.name} (the file to read)")
    if model.kind == "mlp" and not model.hidden:
        chk.add(("model", "hidden"), "required when model.kind is mlp: a list of widths such as [64, 64]")
    if train.distribute != "none" and train.device == "gpu" and train.cpu_devices:
        chk.add(("train", "cpu_devices"), "logical CPU devices are for CPU runs; remove it when train.device is gpu")
    if train.distribute == "none" and train.cpu_devices > 1:
        chk.add(("train", "cpu_devices"), "only used with train.distribute: mirrored (set it, or remove cpu_devices)")


def _check_diagnostics(chk: _Checker, raw: Any) -> tuple[DiagnosticSpec, ...] | None:
    if raw is None:
        return None
    if not isinstance(raw, list):
        chk.add(("diagnostics",), f"expected a list such as [{{type: gradient_stats, every: 10}}], got {_type_name(raw)}")
        return None
    specs = []
    for i, item in enumerate(raw):
        if isinstance(item, str):
            item = {"type": item}
        if not isinstance(item, dict) or not isinstance(item.get("type"), str):
            chk.add(("diagnostics", i), f"expected a type name or a mapping with a 'type' key (gradient_stats, or "
                                        f"{{type: gradient_stats, every: 10}}), got {item!r}")
            continue
        options = {k: v for k, v in item.items() if k != "type"}
        specs.append(DiagnosticSpec(type=item["type"], options=options, line=chk.lines.get(("diagnostics", i))))
    return tuple(specs)


def _check_callbacks(chk: _Checker, raw: Any) -> tuple[CallbackSpec, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        chk.add(("callbacks",), f"expected a list such as [{{class: 'my_module:MyCallback', args: {{}}}}], "
                                f"got {_type_name(raw)}")
        return ()
    specs = []
    for i, item in enumerate(raw):
        if not isinstance(item, dict) or not isinstance(item.get("class"), str):
            chk.add(("callbacks", i), f"expected a mapping with a 'class' key ('module:Class'), got {item!r}")
            continue
        extra = set(item) - {"class", "args"}
        if extra:
            k = sorted(extra)[0]
            chk.add(("callbacks", i, k), f"unknown key (allowed: class, args){_suggest(k, ['class', 'args'])}")
            continue
        target = item["class"]
        if not re.match(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$", target):
            chk.add(("callbacks", i, "class"), f"{target!r} is not an import path of the form 'package.module:ClassName'")
            continue
        args = item.get("args") or {}
        if not isinstance(args, dict):
            chk.add(("callbacks", i, "args"), f"expected a mapping of keyword arguments, got {_type_name(args)}")
            continue
        specs.append(CallbackSpec(cls=target, args=args, line=chk.lines.get(("callbacks", i))))
    return tuple(specs)


def _check_sweep(chk: _Checker, raw: Any) -> dict | None:
    if raw is None:
        return None
    if not isinstance(raw, dict) or not raw:
        chk.add(("sweep",), f"expected a mapping of key.path: [values, ...], got {raw!r}")
        return None
    out = {}
    for key, values in raw.items():
        if not isinstance(values, list) or not values:
            chk.add(("sweep", key), f"expected a non-empty list of values, got {values!r}")
            continue
        out[key] = tuple(values)
    return out


def from_dict(raw: Any, *, file: str = "<dict>", lines: dict[tuple, int] | None = None,
              overrides: dict[tuple, str] | None = None) -> Experiment:
    """Validate plain data (as parsed from YAML) into a frozen :class:`Experiment`.

    Raises:
        ConfigError: with one line per problem found; nothing is half-applied.
    """
    chk = _Checker(file, lines or {}, overrides)
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError([(file, 1, "", f"expected a mapping of sections at the top level, got {_type_name(raw)}")])
    for key in raw:
        if key not in TOP_LEVEL:
            chk.add((key,), f"unknown key (allowed: {', '.join(TOP_LEVEL)}){_suggest(key, TOP_LEVEL)}")
    values: dict[str, Any] = {}
    name = raw.get("name", "experiment")
    if not isinstance(name, str) or not NAME_PATTERN.match(name) or len(name) > NAME_MAX:
        shown = repr(name) if isinstance(name, str) else _described(name)
        chk.add(("name",), f"{shown} must be a letter or digit followed by letters, digits, '_', '.', '-', "
                           f"of at most {NAME_MAX} characters (it becomes a directory name)")
    else:
        values["name"] = name
    seed = raw.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**31:
        chk.add(("seed",), f"expected an integer in [0, 2**31), got {_described(seed)}")
    else:
        values["seed"] = seed
    log_dir = raw.get("log_dir", "runs")
    if not isinstance(log_dir, str) or not log_dir:
        chk.add(("log_dir",), f"expected a non-empty directory path, got {_described(log_dir)}")
    else:
        values["log_dir"] = os.path.expanduser(log_dir)  # "~/runs" is the home directory, as in a shell
    for section, cls in SECTIONS.items():
        values[section] = _check_section(chk, section, raw.get(section), cls)
    _check_cross(chk, values)
    values["diagnostics"] = _check_diagnostics(chk, raw.get("diagnostics"))
    values["callbacks"] = _check_callbacks(chk, raw.get("callbacks"))
    values["sweep"] = _check_sweep(chk, raw.get("sweep"))
    if chk.problems:
        raise ConfigError(chk.problems)
    return Experiment(source=file, **values)


# ----------------------------------------------------------------------------------------------
# Overrides

def parse_override(text: str) -> tuple[tuple, Any]:
    """Split ``key.path=value``; the value is read as YAML (``0.1``, ``true``, ``[64, 64]``)."""
    if "=" not in text:
        raise ConfigError([(OVERRIDE_SOURCE, None, text, "an override must look like key.path=value")])
    key, _, value_text = text.partition("=")
    key = key.strip()
    if not key or not re.match(r"^[A-Za-z_][\w]*(\.[\w]+)*$", key):
        raise ConfigError([(OVERRIDE_SOURCE, None, key or text, "not a valid key path (use dots: train.learning_rate)")])
    path = tuple(int(p) if p.isdigit() else p for p in key.split("."))
    try:
        value = load_yaml(value_text) if value_text.strip() else ""
    except yaml.YAMLError:  # not YAML (e.g. `[64,64`): the text itself, for validation to name
        return path, value_text
    if isinstance(value, str) and "," in value and not value_text.strip().startswith(("'", '"')):
        value = [_yaml_or_text(p) for p in value.split(",")]  # a=1,2,3 is the list [1, 2, 3]
    return path, value


def _yaml_or_text(text: str) -> Any:
    try:
        return load_yaml(text)
    except yaml.YAMLError:
        return text


def apply_overrides(raw: Any, overrides: list[str] | tuple[str, ...]) -> tuple[dict, dict[tuple, str]]:
    """Apply ``key.path=value`` strings to a deep copy of ``raw``; returns it and the overridden paths."""
    import copy

    if raw is not None and not isinstance(raw, dict):  # left for from_dict to reject, with its type
        return raw, {}
    data = copy.deepcopy(raw) if isinstance(raw, dict) else {}
    where: dict[tuple, str] = {}
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for i, part in enumerate(path[:-1]):
            if isinstance(node, list) and isinstance(part, int) and part < len(node):
                node = node[part]
                continue
            if not isinstance(node, dict):
                raise ConfigError([(OVERRIDE_SOURCE, None, ".".join(map(str, path[: i + 1])),
                                    f"cannot set a key inside a {_type_name(node)} [from {text}]")])
            if node.get(part) is None:
                node[part] = {}
            node = node[part]
        last = path[-1]
        if isinstance(node, list) and isinstance(last, int) and last < len(node):
            node[last] = value
        elif isinstance(node, dict):
            node[last] = value
        else:
            raise ConfigError([(OVERRIDE_SOURCE, None, ".".join(map(str, path)),
                                f"cannot set this key here [from {text}]")])
        where[path] = text
    return data, where


def load_raw(config: str | Path | Mapping[str, Any]) -> tuple[Any, str, dict]:
    """Read a config path (YAML) or take a mapping; returns ``(data, file label, lines)``."""
    if isinstance(config, Mapping):
        return dict(config), "<dict>", {}
    path = Path(config)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError([(str(path), None, "", "config file not found")]) from None
    except (IsADirectoryError, PermissionError, UnicodeDecodeError) as err:
        why = {IsADirectoryError: "it is a directory, not a YAML file", PermissionError: "permission denied",
               UnicodeDecodeError: f"not UTF-8 text: byte {getattr(err, 'start', 0)} is not valid UTF-8"}[type(err)]
        raise ConfigError([(str(path), None, "", f"cannot read config ({why})")]) from None
    data, lines = parse_yaml(text, str(path))
    return data, str(path), lines


def load_config(config: str | Path | Mapping[str, Any], overrides: list[str] | tuple[str, ...] = (),
                *, check_plugins: bool = True) -> Experiment:
    """Load and validate an experiment from a YAML path or a mapping, with ``key.path=value`` overrides.

    This is exactly what ``gradlab validate`` and ``gradlab run`` do before any training.

    Raises:
        ConfigError: one line per problem, ``FILE:LINE: key.path: message``.
    """
    raw, file, lines = load_raw(config)
    data, where = apply_overrides(raw, list(overrides))
    try:
        exp = from_dict(data, file=file, lines=lines, overrides=where)
    except ConfigError as err:
        if not check_plugins:
            raise
        # Every problem at once: also those of the diagnostics and callbacks, which the plug-ins
        # judge (skipped where the sections themselves are malformed: those are reported above).
        extra = [p for p in _plugin_problems_of(data, file, lines, where) if p not in err.problems]
        raise ConfigError(err.problems + extra) from None
    if check_plugins:
        validate_plugins(exp, lines=lines, overrides=where)
    return exp


def _plugin_problems_of(data: Any, file: str, lines: dict, where: dict) -> list[tuple]:
    """:func:`gradlab.plugins.check_specs` on the ``diagnostics`` and ``callbacks`` of a raw
    config that failed validation elsewhere (``steps_per_execution`` 1 unless it is valid)."""
    import types

    from gradlab import plugins

    if not isinstance(data, dict):
        return []
    scratch = _Checker(file, lines, where)  # their own structural problems are reported by from_dict
    diagnostics = _check_diagnostics(scratch, data.get("diagnostics"))
    callbacks = _check_callbacks(scratch, data.get("callbacks"))
    train = data.get("train") if isinstance(data.get("train"), dict) else {}
    spe = train.get("steps_per_execution", 1)
    spe = spe if type(spe) is int and spe >= 1 else 1
    exp = types.SimpleNamespace(diagnostics=diagnostics, callbacks=callbacks, source=file,
                                train=types.SimpleNamespace(steps_per_execution=spe))
    return plugins.check_specs(exp, lines, where)


def validate_plugins(exp: Experiment, lines: dict[tuple, int] | None = None,
                     overrides: dict[tuple, str] | None = None) -> None:
    """Check ``diagnostics`` types and options and ``callbacks`` import paths by asking the plug-ins."""
    from gradlab import plugins

    problems = plugins.check_specs(exp, lines, overrides)
    if problems:
        raise ConfigError(problems)


# ----------------------------------------------------------------------------------------------
# JSON Schema

def _field_schema(f: dataclasses.Field) -> dict:
    meta = f.metadata
    kind = meta["kind"]
    out: dict[str, Any] = {"description": meta["help"]}
    if kind == "bool":
        out["type"] = "boolean"
    elif kind == "int":
        out["type"] = "integer"
    elif kind == "int_or_null":
        out["type"] = ["integer", "null"]
    elif kind in ("float", "float_or_null"):
        out["type"] = ["number", "null"] if kind == "float_or_null" else "number"
    elif kind == "choice":
        out["enum"] = list(meta["choices"])
    elif kind in ("str",):
        out["type"] = "string"
    elif kind == "path":
        out["type"] = ["string", "null"]
    elif kind == "int_list":
        out.update(type="array", items={"type": "integer", "minimum": 1})
    elif kind == "initializer":
        out["anyOf"] = [{"type": "null"}, {"enum": list(INITIALIZERS)},
                        {"type": "object", "required": ["name"],
                         "properties": {"name": {"enum": list(INITIALIZERS)}}}]
    for rule, key in (("minimum", "minimum"), ("maximum", "maximum")):
        if rule in meta:
            exclusive = meta.get(f"exclusive_{rule}", False)
            out[f"exclusive{rule.capitalize()}" if exclusive else key] = meta[rule]
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
    out["default"] = default
    return out


def json_schema() -> dict:
    """A JSON Schema (draft 2020-12) of the experiment file, for editor autocompletion."""
    def section(cls):
        return {"type": "object", "additionalProperties": False, "description": cls.__doc__.strip(),
                "properties": {f.name: _field_schema(f) for f in dataclasses.fields(cls)}}

    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "gradlab experiment",
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "name": {"type": "string", "pattern": NAME_PATTERN.pattern, "maxLength": NAME_MAX, "default": "experiment"},
            "seed": {"type": "integer", "minimum": 0, "maximum": 2**31 - 1, "default": 0},
            "data": section(DataConfig),
            "model": section(ModelConfig),
            "train": section(TrainConfig),
            "diagnostics": {"type": ["array", "null"], "description": "diagnostics to run; omit for the default set, [] for none",
                            "items": {"anyOf": [
                                {"type": "string", "description": "a type with its default options"},
                                {"type": "object", "required": ["type"],
                                 "properties": {"type": {"type": "string"}, "every": {"type": "integer", "minimum": 1}}}]}},
            "callbacks": {"type": "array", "description": "extra Keras callbacks by import path",
                          "items": {"type": "object", "required": ["class"], "additionalProperties": False,
                                    "properties": {"class": {"type": "string", "pattern": "^[A-Za-z_][\\w.]*:[A-Za-z_]\\w*$"},
                                                   "args": {"type": "object"}}}},
            "log_dir": {"type": "string", "minLength": 1, "default": "runs"},
            "sweep": {"type": "object", "description": "grid: key.path -> list of values",
                      "additionalProperties": {"type": "array", "minItems": 1}},
        },
    }


def dump_schema() -> str:
    return json.dumps(json_schema(), indent=2, default=str)


def reference_markdown() -> str:
    """The config reference table for the README, generated from the schema (a test keeps them in sync)."""
    def allowed(f: dataclasses.Field) -> str:
        m = f.metadata
        if m["kind"] == "choice":
            return " \\| ".join(f"`{c}`" for c in m["choices"])
        if m["kind"] == "initializer":
            return ("one of " + ", ".join(f"`{n}`" for n in INITIALIZERS) + " (`orthogonal`: kernels only), "
                    "or `{name: ..., args}`")
        parts = []
        if "minimum" in m:
            parts.append(f"{'>' if m.get('exclusive_minimum') else '>='} {m['minimum']}")
        if "maximum" in m:
            parts.append(f"{'<' if m.get('exclusive_maximum') else '<='} {m['maximum']}")
        kind = {"int": "integer", "float": "number", "bool": "boolean", "str": "string", "path": "file path",
                "int_list": "list of integers >= 1", "float_or_null": "number or null", "int_or_null": "integer or null"}
        return (kind.get(m["kind"], m["kind"]) + (", " + ", ".join(parts) if parts else ""))

    rows = ["| key | default | allowed | meaning |", "|---|---|---|---|",
            "| `name` | `experiment` | a letter or digit, then letters, digits, `_.-`; at most 200 characters | run directory prefix |",
            "| `seed` | `0` | integer in [0, 2**31) | seeds data, initializers, shuffling |",
            "| `log_dir` | `runs` | directory | where run directories are created |"]
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            only = f.metadata.get("only_for")
            note = f" (only when `{section}.{only[0]}` is {' or '.join(only[1])})" if only else ""
            rows.append(f"| `{section}.{f.name}` | `{json.dumps(default)}` | {allowed(f)} | {f.metadata['help']}{note} |")
    rows += ["| `diagnostics` | default set | list of `{type: NAME, ...options}` or bare `NAME`s (default options) | omit for the defaults, `[]` for none |",
             "| `callbacks` | `[]` | list of `{class: 'module:Class', args: {...}}` | extra Keras callbacks |",
             "| `sweep` | none | mapping `key.path: [values]` | a grid for `gradlab sweep` |"]
    return "\n".join(rows)
