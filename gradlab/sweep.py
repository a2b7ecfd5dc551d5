"""``gradlab sweep``: a grid of experiments, each in its own run directory, compared at the end.

The grid
    Axes come from the config's ``sweep:`` section (``key.path: [values...]``) and from the
    command line (``key.path=a,b,c``; commas inside ``[...]``, ``{...}`` or quotes don't split,
    so ``model.hidden=[16,16],[32]`` is two values). A command-line axis replaces the YAML axis
    of the same key; a one-value axis is a fixed override. The grid is the Cartesian product in
    axis order (the last axis varies fastest): ``prod(len(values))`` combinations.

    A value is set at its key path. A mapping value for a whole section (``model: [{kind:
    softmax_linear}, {kind: mlp, hidden: [16], activation: relu}]``) *replaces* that section, so
    options that only exist for one choice (``model.activation`` for ``mlp``) can be swept
    together with the choice -- each option is complete on its own.

Validation
    Every combination is validated (schema and plug-in options) before anything runs or any
    directory is made. A problem is one line, ``FILE:LINE: key.path: message (sweep combination
    i of n: key=value, ...)``; a problem shared by several combinations is reported once.

Running
    The sweep directory (``--sweep-dir``, absent or empty; default ``log_dir/<name>-sweep-<time>``)
    holds ``sweep.json`` (the summary, rewritten after every run), ``configs/<run>.yaml`` (the
    exact config of each combination), ``logs/<run>.{out,err}`` and one run directory per
    combination, ``NNN-<key=value...>``. Each combination is a separate ``gradlab run``
    process -- ``jobs`` at a time -- so one run's crash, memory or TensorFlow global state
    (dtype policy, op determinism, logical devices) cannot affect another. A failed
    combination is recorded with its error line (``status: failed``, also in the run's
    ``metrics.json``) and the others go on. On Ctrl-C the running runs save a checkpoint and are
    ``interrupted`` (resumable with ``gradlab run --resume``); a run stopped before its
    ``config.yaml`` existed, and every run not yet started, is ``not run``: no directory, and the
    record's ``error`` gives the ``gradlab run ... --run-dir ...`` command that starts it.

HParams
    The sweep directory gets the HParams experiment (the varying hyperparameters and the
    metrics); each run directory gets its session (values, status, ``final/*`` metrics), so
    ``gradlab tensorboard SWEEP_DIR`` shows the runs in the HParams dashboard.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

from gradlab.config import Experiment, apply_overrides, dump_yaml, from_dict, load_raw, load_yaml, validate_plugins
from gradlab.errors import ConfigError, GradlabError, RunInterrupted, UsageError
from gradlab.experiment import health_checked, new_directory
from gradlab.resume import restore_handlers, resume_command, stop_signals_interrupt

SUMMARY_FILE = "sweep.json"
KEY_PATTERN = re.compile(r"^[A-Za-z_]\w*(\.\w+)*$")
SOURCE_CLI = "command line"
FINAL_METRICS = (("final/loss", "loss", "final training loss"),
                 ("final/accuracy", "accuracy", "final training accuracy"),
                 ("final/val_loss", "val_loss", "final validation loss"),
                 ("final/val_accuracy", "val_accuracy", "final validation accuracy"),
                 ("final/unhealthy_layers", None, "number of layers with a health verdict"))


# ---------------------------------------------------------------------------------------------
# Parsing axes

def split_values(text: str) -> list[Any]:
    """Split ``a,b,c`` at top-level commas and read each part as YAML.

    Commas inside brackets, braces or quotes do not split: ``[16,16],[32]`` is ``[[16, 16], [32]]``.
    An empty part (``a,,b``) is an error.
    """
    parts, depth, quote, cur = [], 0, None, []
    for ch in text:
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
            continue
        cur.append(ch)
    parts.append("".join(cur))
    values = []
    for part in parts:
        if not part.strip():
            raise ValueError("empty value")
        try:
            values.append(load_yaml(part))
        except yaml.YAMLError:
            values.append(part.strip())
    return values


def parse_axis(text: str) -> tuple[str, list[Any]]:
    """``key.path=a,b,c`` -> ``("key.path", [a, b, c])`` with YAML-typed values.

    Raises:
        ConfigError: a missing ``=``, a bad key path, or an empty value; one line naming it.
    """
    if "=" not in text:
        raise ConfigError([(SOURCE_CLI, None, text, "a sweep axis must look like key.path=a,b,c")])
    key, _, value_text = text.partition("=")
    key = key.strip()
    if not KEY_PATTERN.match(key):
        raise ConfigError([(SOURCE_CLI, None, key or text, "not a valid key path (use dots: train.learning_rate)")])
    try:
        values = split_values(value_text)
    except ValueError:
        raise ConfigError([(SOURCE_CLI, None, key, f"{value_text!r} has an empty value; give values like "
                                                   f"{key}=a,b,c")]) from None
    return key, values


# ---------------------------------------------------------------------------------------------
# The plan

@dataclasses.dataclass(frozen=True)
class Combination:
    """One point of the grid.

    Attributes:
        index: 0-based position in the grid.
        values: key path -> value of every axis (fixed ones included), in axis order.
        name: the run directory name, ``NNN-key=value-...`` (varying axes only).
        raw: the full config of this run as plain data (no ``sweep`` section).
        experiment: the validated experiment.
    """

    index: int
    values: dict[str, Any]
    name: str
    raw: dict
    experiment: Experiment


@dataclasses.dataclass(frozen=True)
class SweepPlan:
    """A validated grid: the base config, the axes, and every combination."""

    source: str
    name: str
    log_dir: str
    axes: dict[str, list[Any]]
    combinations: tuple[Combination, ...]

    @property
    def varying(self) -> list[str]:
        """The axes with more than one value (the ones that tell runs apart)."""
        return [k for k, v in self.axes.items() if len(v) > 1]

    def hparams(self, combo: Combination) -> dict[str, Any]:
        """The HParams of ``combo``: each varying axis, mappings flattened to ``key.sub`` leaves."""
        out: dict[str, Any] = {}
        for key in self.varying:
            _flatten(key, combo.values[key], out)
        return out

    def hparam_domains(self) -> dict[str, list[Any]]:
        """HParam name -> its values over all combinations (a leaf missing in some is left out there)."""
        out: dict[str, list[Any]] = {}
        for c in self.combinations:
            for k, v in self.hparams(c).items():
                out.setdefault(k, []).append(v)
        return out

    def hparam_values(self, combo: Combination) -> dict[str, bool | float | str]:
        """:meth:`hparams` converted to the HParams types of :meth:`hparam_domains`."""
        from gradlab import tb

        kinds = {k: tb.hparam_kind(v) for k, v in self.hparam_domains().items()}
        return {k: tb.hparam_value(v, kinds[k]) for k, v in self.hparams(combo).items()}


def _flatten(prefix: str, value: Any, out: dict) -> None:
    if isinstance(value, dict) and value:
        for k, v in value.items():
            _flatten(f"{prefix}.{k}", v, out)
    else:
        out[prefix] = value


def describe_value(value: Any) -> str:
    """A value in YAML flow style on one line (``mse``, ``[16, 16]``, ``{kind: mlp, hidden: [16]}``)."""
    if isinstance(value, str):
        return value
    text = dump_yaml(value, default_flow_style=True, width=10**6, sort_keys=False).strip()
    return text.removesuffix("...").strip()


def _slug_value(value: Any) -> str:
    if isinstance(value, dict):
        return "-".join(_slug_value(v) for v in value.values())
    if isinstance(value, list):
        return "x".join(_slug_value(v) for v in value) or "none"
    return str(value).lower() if isinstance(value, bool) or value is None else str(value)


def run_name(index: int, values: Mapping[str, Any], varying: Sequence[str], width: int = 3) -> str:
    """``NNN-key=value-key=value``: the index, then each varying axis's last key part (with the
    list it indexes: ``hidden.0``) and value, with characters other than letters, digits, ``.=_-``
    replaced by ``_``; at most 100 characters."""
    parts = [f"{short_key(k)}={_slug_value(values[k])}" for k in varying]
    slug = re.sub(r"[^A-Za-z0-9.=_-]+", "_", "-".join(parts)).strip("_")
    return (f"{index:0{width}d}" + (f"-{slug}" if slug else ""))[:100]


def _key_path(key: str) -> tuple:
    """``model.hidden.0`` -> ``("model", "hidden", 0)``: a number is a list index, as in overrides."""
    return tuple(int(p) if p.isdigit() else p for p in key.split("."))


def short_key(key: str) -> str:
    """The last part of a key path, and the parts before it while they are list indexes:
    ``train.loss`` -> ``loss``, ``model.hidden.0`` -> ``hidden.0``."""
    parts = key.split(".")
    n = len(parts) - 1
    while n > 0 and parts[n].isdigit():
        n -= 1
    return ".".join(parts[n:])


def _set_path(data: dict, key: str, value: Any) -> dict:
    """A copy of ``data`` with ``value`` at the key path ``key``, placed where ``gradlab run`` places
    an override (:func:`gradlab.config.apply_overrides` walks the path): a number indexes an item
    of an existing list (``model.hidden.0``, ``diagnostics.0.every``), a missing mapping is created,
    and the value replaces whatever is at the key (a whole section for a mapping value).

    Raises:
        _PathError: the path cannot be set (a list index out of range, a key inside a list or a
            scalar); its message is one line naming the index and what is allowed.
    """
    path = _key_path(key)
    try:
        out, _ = apply_overrides(data, [f"{key}=null"])  # walks (and checks) the path like `run`
    except ConfigError as err:
        dotted = err.problems[0][2] if err.problems else key
        where = _key_path(dotted) if dotted else path
        node = data
        for part in where[:-1]:  # the container that refused: it exists in `data` (only mappings are made)
            node = node[part]
        parent = ".".join(map(str, where[:-1])) or "the config"
        last = where[-1]
        if isinstance(node, list) and isinstance(last, int):
            allowed = f"indexes 0 to {len(node) - 1}" if node else "no index can be set"
            raise _PathError(dotted, f"list index {last} is out of range: {parent} has {len(node)} "
                                     f"item{'s' if len(node) != 1 else ''} ({allowed})") from None
        if isinstance(node, list):
            raise _PathError(dotted, f"{parent} is a list: index it with a number "
                                     f"(0 to {len(node) - 1})" if node else f"{parent} is an empty list") from None
        kind = _kind(node)
        raise _PathError(dotted, f"cannot set a key inside {parent}: it is {'an' if kind[0] in 'aeiou' else 'a'} "
                                 f"{kind} ({describe_value(node)}), not a mapping") from None
    node = out
    for part in path[:-1]:  # every part exists now
        node = node[part]
    node[path[-1]] = value
    return out


def _kind(value: Any) -> str:
    return {bool: "boolean", int: "integer", float: "number", str: "string"}.get(type(value), type(value).__name__)


class _PathError(Exception):
    """A sweep key path that cannot be set in the config: ``(dotted path, message)``."""

    def __init__(self, path: str, message: str):
        super().__init__(message)
        self.path, self.message = path, message


def _lines_for(lines: dict, path: tuple, yaml_key: str | None, value_index: int) -> dict:
    """Line numbers for one combination: a swept key (and everything under it) points at its
    value in the ``sweep:`` section."""
    if yaml_key is None:
        return lines
    out = {k: v for k, v in lines.items() if k[:len(path)] != path}
    src = ("sweep", yaml_key, value_index)
    out[path] = lines.get(src, lines.get(("sweep", yaml_key)))
    for k, v in lines.items():
        if k[:3] == src and len(k) > 3:
            out[path + k[3:]] = v
    return out


def plan(config: str | os.PathLike | Mapping[str, Any], axes: Sequence[str] = (), *,
         fixed: Sequence[str] = (), check_plugins: bool = True) -> SweepPlan:
    """Expand and validate the grid of ``config`` (its ``sweep:`` section) and ``axes`` (``key=a,b``).

    ``fixed``: ``key.path=value`` overrides applied to the base config first, read as ``gradlab
    run`` reads them (``a,b`` is one list value, not two combinations).

    Raises:
        ConfigError: the base config, an axis, or any combination is invalid. Each problem is one
            line; problems of combinations name the combination.
    """
    raw, file, lines = load_raw(config)
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError([(file, 1, "", "expected a mapping of sections at the top level")])
    raw, fixed_where = apply_overrides(raw, list(fixed))
    yaml_sweep = raw.get("sweep")
    grid: dict[str, list[Any]] = {}
    origin: dict[str, str | None] = {}  # axis -> YAML key (None: command line)
    axis_text: dict[str, str] = {}
    if yaml_sweep is not None:
        if not isinstance(yaml_sweep, dict) or not yaml_sweep:
            raise ConfigError([(file, lines.get(("sweep",)), "sweep",
                                f"expected a mapping of key.path: [values, ...], got {yaml_sweep!r}")])
        for key, values in yaml_sweep.items():
            if not isinstance(key, str) or not KEY_PATTERN.match(key):
                raise ConfigError([(file, lines.get(("sweep", key)), f"sweep.{key}",
                                    "not a valid key path (use dots: train.learning_rate)")])
            if not isinstance(values, list) or not values:
                raise ConfigError([(file, lines.get(("sweep", key)), f"sweep.{key}",
                                    f"expected a non-empty list of values, got {values!r}")])
            grid[key], origin[key] = list(values), key
    for text in axes:
        key, values = parse_axis(text)
        grid.pop(key, None)
        grid[key], origin[key], axis_text[key] = values, None, text
    if not grid:
        raise ConfigError([(file, None, "sweep", "nothing to sweep: add a `sweep:` section or axes like "
                                                 "train.loss=cross_entropy,mse")])
    base = {k: v for k, v in raw.items() if k != "sweep"}
    keys = list(grid)
    varying = [k for k in keys if len(grid[k]) > 1]
    combos_values = list(itertools.product(*(range(len(grid[k])) for k in keys)))
    total = len(combos_values)
    width = max(3, len(str(total - 1)))
    combinations, problems, seen = [], [], {}
    plugin_checked: dict[str, list] = {}
    for index, picks in enumerate(combos_values):
        values = {k: grid[k][i] for k, i in zip(keys, picks)}
        data = base
        combo_lines = dict(lines)
        overrides: dict[tuple, str] = dict(fixed_where)
        label = ", ".join(f"{k}={describe_value(values[k])}" for k in varying) or "the only combination"
        where = f"sweep combination {index + 1} of {total}: {label}"
        try:
            for key, i in zip(keys, picks):
                path = _key_path(key)
                try:
                    data = _set_path(data, key, _deepcopy(grid[key][i]))
                except _PathError as err:
                    if origin[key] is None:
                        raise ConfigError([(SOURCE_CLI, None, err.path,
                                            f"{err.message} [from sweep axis {axis_text[key]}]")]) from None
                    raise ConfigError([(file, lines.get(("sweep", origin[key])), f"sweep.{origin[key]}",
                                        err.message)]) from None
                if origin[key] is None:
                    overrides[path] = f"sweep axis {axis_text[key]}"
                else:
                    combo_lines = _lines_for(combo_lines, path, origin[key], i)
            exp = from_dict(data, file=file, lines=combo_lines, overrides=overrides)
            if check_plugins:
                key = json.dumps([exp.to_dict().get("diagnostics"), exp.to_dict().get("callbacks")], default=str)
                if key not in plugin_checked:
                    try:
                        validate_plugins(exp, lines=combo_lines)
                        plugin_checked[key] = []
                    except ConfigError as err:
                        plugin_checked[key] = err.problems
                if plugin_checked[key]:
                    raise ConfigError(plugin_checked[key])
        except ConfigError as err:
            for p in err.problems:
                text = ConfigError.format_one(*p)
                if text in seen:
                    seen[text][1] += 1
                    continue
                seen[text] = [where, 0]
                problems.append(text)
            continue
        combinations.append(Combination(index=index, values=values, name=run_name(index, values, varying, width),
                                        raw=data, experiment=exp))
    if problems:
        lines_out = []
        for text in problems:
            first, more = seen[text]
            lines_out.append(f"{text} ({first}" + (f"; and {more} more" if more else "") + ")")
        raise _SweepConfigError(lines_out)
    name = base.get("name", "experiment") if isinstance(base.get("name"), str) else "experiment"
    return SweepPlan(source=file, name=name, log_dir=combinations[0].experiment.log_dir, axes=grid,
                     combinations=tuple(combinations))


class _SweepConfigError(ConfigError):
    """A :class:`ConfigError` whose lines are already formatted."""

    def __init__(self, lines: list[str]):
        self.problems = []
        GradlabError.__init__(self, "\n".join(lines))


def _deepcopy(value: Any) -> Any:
    import copy

    return copy.deepcopy(value)


# ---------------------------------------------------------------------------------------------
# Running

@dataclasses.dataclass
class RunRecord:
    """The outcome of one combination, as stored in ``sweep.json``."""

    index: int
    name: str
    run_dir: str
    values: dict[str, Any]
    hparams: dict[str, Any]
    status: str = "pending"
    exit_code: int | None = None
    error: str | None = None
    seconds: float | None = None
    metrics: dict[str, Any] = dataclasses.field(default_factory=dict)
    verdicts: list[dict] = dataclasses.field(default_factory=list)
    health_checked: bool = True


@dataclasses.dataclass
class SweepResult:
    """What :func:`run_sweep` returns: the sweep directory and one record per combination."""

    sweep_dir: Path
    runs: list[RunRecord]

    @property
    def failed(self) -> list[RunRecord]:
        return [r for r in self.runs if r.status not in ("completed", "stopped")]


def make_sweep_dir(p: SweepPlan, sweep_dir: str | os.PathLike | None) -> Path:
    """Create the sweep directory: ``sweep_dir`` (absent or empty) or ``log_dir/<name>-sweep-<time>``."""
    return new_directory(sweep_dir, option="--sweep-dir", log_dir=p.log_dir, prefix=f"{p.name}-sweep", what="sweep")


def _child_command(config_file: Path, run_dir: Path) -> list[str]:
    return [sys.executable, "-m", "gradlab.cli", "run", str(config_file), "--run-dir", str(run_dir), "--quiet"]


def _last_line(path: Path) -> str | None:
    try:
        lines = [ln.strip() for ln in path.read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip()]
    except OSError:
        return None
    return lines[-1] if lines else None


def _finish(record: RunRecord, rc: int, sweep_dir: Path, started: float, ended: float,
            interrupted: bool = False, timed_out: float | None = None) -> None:
    """Read the run's ``metrics.json``, decide its status, and complete its run directory.
    ``interrupted``: the sweep was interrupted, so a run it had to kill counts as interrupted.
    ``timed_out``: the run was stopped after this ``--timeout`` (seconds): it failed, whatever
    it wrote on its way out (a run stopped by SIGTERM saves a checkpoint and says "interrupted").

    A run interrupted before it wrote its ``config.yaml`` never existed (``gradlab run`` removes
    such a directory itself): it is recorded as ``not run``, with the command that starts it, and
    no directory is left, so ``--run-dir`` can create it later."""
    from gradlab.experiment import CONFIG_FILE, METRICS_FILE, write_json

    run_dir = sweep_dir / record.name
    record.exit_code, record.seconds = rc, round(ended - started, 2)
    metrics: dict = {}
    try:
        metrics = json.loads((run_dir / METRICS_FILE).read_text())
    except (OSError, ValueError):
        metrics = {}
    status = metrics.get("status")
    if rc == 0 and status == "completed":
        record.status = "completed"
    elif status == "stopped":
        record.status = "stopped"
        record.error = (metrics.get("stopped") or {}).get("message") or _last_line(sweep_dir / "logs" /
                                                                                   f"{record.name}.err")
    elif timed_out is not None:
        record.status = "failed"
        record.error = f"stopped after the --timeout of {timed_out:g} seconds"
        if (run_dir / CONFIG_FILE).is_file() and status == "interrupted":
            record.error += f" (resume it with: {resume_command(run_dir)})"
    else:
        record.status = "interrupted" if rc in (130, -2) or (interrupted and rc < 0) else "failed"
        record.error = (_last_line(sweep_dir / "logs" / f"{record.name}.err") or metrics.get("error")
                        or f"gradlab run exited with status {rc}")
    if record.status == "interrupted" and not (run_dir / CONFIG_FILE).is_file():
        if run_dir.is_dir():  # made by the run, killed before its config.yaml: nothing there to resume
            shutil.rmtree(run_dir, ignore_errors=True)
        _not_run(record, sweep_dir, "interrupted before the run wrote its config.yaml (no directory is left)")
        return
    keep = ("loss", "accuracy", "val_loss", "val_accuracy", "steps", "epochs_completed")
    record.metrics = {k: metrics[k] for k in keep if k in metrics}
    record.verdicts = list(metrics.get("verdicts") or [])
    run_dir.mkdir(parents=True, exist_ok=True)
    if record.status in ("failed", "interrupted") and (status not in ("failed", "interrupted") or timed_out is not None):
        write_json(run_dir / METRICS_FILE, {"status": record.status, "error": record.error, "exit_code": rc})
    final = {tag: record.metrics.get(key) for tag, key, _ in FINAL_METRICS if key}
    if record.status in ("completed", "stopped"):
        final["final/unhealthy_layers"] = len({v.get("layer") for v in record.verdicts})
    from gradlab import tb

    tb.write_session(run_dir, record.hparams, status=record.status,
                     metrics={k: v for k, v in final.items() if v is not None},
                     group=record.name, start_time=started, end_time=ended, step=int(metrics.get("steps") or 0))


NOT_RUN = "not run"  # the status of a combination that never started (the sweep was interrupted)


def start_command(sweep_dir: str | os.PathLike, name: str) -> str:
    """The command that runs combination ``name`` of a sweep on its own, into its run directory."""
    root = Path(sweep_dir)
    return f"gradlab run {root / 'configs' / f'{name}.yaml'} --run-dir {root / name}"


def _not_run(record: RunRecord, sweep_dir: Path, why: str) -> None:
    record.status, record.metrics, record.verdicts = NOT_RUN, {}, []
    record.error = f"{why}; start it with: {start_command(sweep_dir, record.name)}"


def _summary(p: SweepPlan, sweep_dir: Path, records: list[RunRecord], status: str) -> dict:
    return {
        "name": p.name,
        "config": p.source,
        "status": status,
        "axes": {k: v for k, v in p.axes.items()},
        "varying": p.varying,
        "combinations": len(records),
        "completed": sum(r.status == "completed" for r in records),
        "stopped": sum(r.status == "stopped" for r in records),
        "failed": sum(r.status in ("failed", "interrupted") for r in records),
        "interrupted": sum(r.status == "interrupted" for r in records),
        "not_run": sum(r.status == NOT_RUN for r in records),
        "runs": [dataclasses.asdict(r) for r in records],
    }


def run_sweep(p: SweepPlan, *, sweep_dir: str | os.PathLike | None = None, jobs: int = 1,
              quiet: bool = False, timeout: float | None = None) -> SweepResult:
    """Run every combination of ``p`` as a ``gradlab run`` subprocess, ``jobs`` at a time.

    Args:
        p: the validated plan (:func:`plan`).
        sweep_dir: where to put the sweep (absent or empty); default ``log_dir/<name>-sweep-<time>``.
        jobs: parallel processes (>= 1).
        quiet: print no progress lines and no table.
        timeout: seconds a single run may take before it is killed and recorded as failed.

    Returns:
        A :class:`SweepResult`. Failed combinations are in it, not raised.

    Raises:
        UsageError: ``jobs`` < 1; RunDirError: the sweep directory cannot be made.
        RunInterrupted: (a ``KeyboardInterrupt``) Ctrl-C, SIGTERM or SIGHUP, after interrupting the
            running children and writing ``sweep.json``: runs that had written their ``config.yaml``
            are ``interrupted`` (``gradlab run --resume``); the others are ``not run``, with no
            directory, and their ``error`` is the command that starts them.
    """
    from gradlab import tb
    from gradlab.experiment import write_json

    if jobs < 1:
        raise UsageError(f"--jobs ({jobs}) must be a positive integer")
    root = make_sweep_dir(p, sweep_dir)
    (root / "configs").mkdir()
    (root / "logs").mkdir()
    records = [RunRecord(index=c.index, name=c.name, run_dir=str(root / c.name), values=c.values,
                         hparams=p.hparam_values(c), health_checked=health_checked(c.experiment.to_dict()))
               for c in p.combinations]
    hp_values = p.hparam_domains()
    has_val = any(c.experiment.data.validation_split > 0 for c in p.combinations)
    metrics = [(tag, desc) for tag, key, desc in FINAL_METRICS if has_val or key not in ("val_loss", "val_accuracy")]
    tb.write_hparams_config(root, hp_values, metrics)
    for c in p.combinations:
        (root / "configs" / f"{c.name}.yaml").write_text(dump_yaml(c.raw, sort_keys=False), encoding="utf-8")
    write_json(root / SUMMARY_FILE, _summary(p, root, records, "running"))
    if not quiet:
        print(f"sweep: {len(records)} runs of {p.source} in {root} ({jobs} at a time)", flush=True)

    pending = list(zip(p.combinations, records))
    running: dict[subprocess.Popen, tuple[RunRecord, float, list]] = {}
    done = 0
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": os.environ.get("TF_CPP_MIN_LOG_LEVEL", "3"), "PYTHONUNBUFFERED": "1"}
    previous = stop_signals_interrupt()  # runs have their own session: a hangup or kill must reach them via us
    try:
        while pending or running:
            while pending and len(running) < jobs:
                combo, record = pending.pop(0)
                out = open(root / "logs" / f"{combo.name}.out", "wb")
                err = open(root / "logs" / f"{combo.name}.err", "wb")
                # Its own session: a Ctrl-C at the terminal reaches the sweep only, which then
                # interrupts each run exactly once (a second SIGINT could cut its checkpoint short).
                proc = subprocess.Popen(_child_command(root / "configs" / f"{combo.name}.yaml", root / combo.name),
                                        stdout=out, stderr=err, stdin=subprocess.DEVNULL, env=env,
                                        start_new_session=True)
                record.status = "running"
                running[proc] = (record, time.time(), [out, err])
            time.sleep(0.1)
            for proc in list(running):
                record, started, files = running[proc]
                rc = proc.poll()
                timed_out = None
                if rc is None and timeout is not None and time.time() - started > timeout:
                    _stop(proc, grace=INTERRUPT_GRACE)  # (the time an interrupted run gets to save its checkpoint)
                    rc, timed_out = proc.returncode, timeout
                    with open(root / "logs" / f"{record.name}.err", "a") as f:
                        f.write(f"\ngradlab sweep: killed after the --timeout of {timeout:g} seconds\n")
                if rc is None:
                    continue
                del running[proc]
                for f in files:
                    f.close()
                _finish(record, rc, root, started, time.time(), timed_out=timed_out)
                done += 1
                write_json(root / SUMMARY_FILE, _summary(p, root, records, "running"))
                if not quiet:
                    extra = (f"loss {record.metrics['loss']:.4f}" if record.metrics.get("loss") is not None
                             else (record.error or ""))
                    print(f"[{done}/{len(records)}] {record.name}: {record.status} ({record.seconds:.1f}s) {extra}",
                          flush=True)
    except KeyboardInterrupt:
        _interrupt(list(running), quiet)
        for proc, (record, started, files) in running.items():
            for f in files:
                f.close()
            _finish(record, proc.returncode, root, started, time.time(), interrupted=True)
        for _, record in pending:
            _not_run(record, root, "the sweep was interrupted before this run started")
        write_json(root / SUMMARY_FILE, _summary(p, root, records, "interrupted"))
        if not quiet:
            print()
            print(format_table(p, records))
            print(f"\nsweep directory: {root}")
        raise RunInterrupted(_interrupted_line(root, records)) from None
    finally:
        restore_handlers(previous)
    write_json(root / SUMMARY_FILE, _summary(p, root, records, "finished"))
    result = SweepResult(sweep_dir=root, runs=records)
    if not quiet:
        print()
        print(format_table(p, records))
        print(f"\nsweep directory: {root}")
        print(f"compare: gradlab tensorboard {root}   (HParams tab)  |  gradlab report {root}")
    return result


def _interrupted_line(root: Path, records: Sequence[RunRecord]) -> str:
    """The one line an interrupted sweep ends with: what is resumable, what never started."""
    counts = {status: sum(r.status == status for r in records)
              for status in ("completed", "stopped", "failed", "interrupted", NOT_RUN)}
    parts = [f"{counts[s]} {s}" for s in ("completed", "stopped", "failed") if counts[s]]
    if counts["interrupted"]:
        parts.append(f"{counts['interrupted']} interrupted (resume with: gradlab run --resume RUN_DIR)")
    if counts[NOT_RUN]:
        parts.append(f"{counts[NOT_RUN]} not run (start with: gradlab run SWEEP_DIR/configs/RUN.yaml "
                     "--run-dir SWEEP_DIR/RUN)")
    return (f"gradlab sweep: interrupted; {', '.join(parts) or 'no run finished'}; "
            f"each run's status and command are in {root / SUMMARY_FILE}")


INTERRUPT_GRACE = 60.0  # seconds an interrupted run gets to save its checkpoint and exit


def _interrupt(procs: list, quiet: bool) -> None:
    """Ctrl-C of the sweep: give each running child one SIGINT -- it saves a checkpoint and exits
    130, resumable like any interrupted run -- and wait for them (at most :data:`INTERRUPT_GRACE`
    seconds; a second Ctrl-C stops waiting); then terminate what is left."""
    alive = [proc for proc in procs if proc.poll() is None]
    for proc in alive:
        proc.send_signal(signal.SIGINT)
    if alive and not quiet:
        print(f"gradlab sweep: interrupted; letting {len(alive)} running run(s) save a checkpoint "
              "(Ctrl-C again to stop them now)", file=sys.stderr, flush=True)
    deadline = time.time() + INTERRUPT_GRACE
    try:
        for proc in alive:
            try:
                proc.wait(timeout=max(deadline - time.time(), 0.0))
            except subprocess.TimeoutExpired:
                pass
    except KeyboardInterrupt:
        pass
    for proc in alive:
        _stop(proc)


def _stop(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """Terminate a child we started (SIGTERM: a run saves a checkpoint and stops); kill it if it
    does not exit within ``grace`` seconds."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# ---------------------------------------------------------------------------------------------
# The table

def verdict_text(record: RunRecord | Mapping[str, Any], checked: bool = True) -> str:
    """``healthy``, ``hidden_1 vanishing, logits saturated``, ``not checked`` (no ``health``
    diagnostic and no verdicts) or ``-`` for a run without results."""
    rec = record if isinstance(record, Mapping) else dataclasses.asdict(record)
    if rec["status"] not in ("completed", "stopped"):
        return "-"
    verdicts = rec.get("verdicts") or []
    if not verdicts:
        return "healthy" if checked else "not checked (no health diagnostic)"
    return ", ".join(f"{v.get('layer')} {v.get('verdict')}" for v in verdicts)


def format_table(p: SweepPlan | None, records: Sequence[RunRecord | Mapping[str, Any]],
                 varying: Sequence[str] | None = None) -> str:
    """The comparison table: run, the varying axes, status, final loss/accuracy, verdicts.

    Failed runs are listed below the table with their error line.
    """
    recs = [r if isinstance(r, Mapping) else dataclasses.asdict(r) for r in records]
    varying = list(varying if varying is not None else (p.varying if p else []))
    has_val = any("val_loss" in (r.get("metrics") or {}) for r in recs)
    header = ["run"] + [k for k in varying] + ["status", "loss", "accuracy"] + (
        ["val_loss", "val_acc"] if has_val else []) + ["health verdicts"]

    def num(m, key, fmt):
        v = m.get(key)
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            return "-"
        return format(v, fmt) if math.isfinite(v) else str(v)

    rows = []
    for r in recs:
        m = r.get("metrics") or {}
        row = [r["name"]] + [describe_value(r["values"].get(k)) for k in varying] + [
            r["status"], num(m, "loss", ".4f"), num(m, "accuracy", ".3f")]
        if has_val:
            row += [num(m, "val_loss", ".4f"), num(m, "val_accuracy", ".3f")]
        row.append(verdict_text(r, r.get("health_checked", True)))
        rows.append(row)
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    widths[-1] = 0  # the last column is not padded
    fmt = lambda row: "  ".join(str(x).ljust(w) for x, w in zip(row, widths)).rstrip()  # noqa: E731
    out = [fmt(header), fmt(["-" * w if w else "-" * 15 for w in widths])] + [fmt(r) for r in rows]
    failed = [r for r in recs if r["status"] not in ("completed", "stopped")]
    if failed:
        out.append("")
        out.append(f"{len(failed)} of {len(recs)} runs did not finish:")
        out += [f"  {r['name']}: {r['status']}: {r.get('error') or 'no error recorded'}" for r in failed]
    return "\n".join(out)


def load_summary(sweep_dir: str | os.PathLike) -> dict:
    """Read ``sweep.json`` of a sweep directory."""
    return json.loads((Path(sweep_dir) / SUMMARY_FILE).read_text())
