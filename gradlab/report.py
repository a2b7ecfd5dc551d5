"""``gradlab report``: one PNG of a run (or of every run of a sweep, side by side), from its event files.

One column per run, four panels per column:

1. **loss** -- ``step/loss`` over steps, with the per-epoch ``epoch_loss`` of the training and
   validation runs placed at the step each epoch ended (``epoch * steps / epochs``);
2. **gradient norm per layer** -- ``gradients/<layer>/layer_norm`` over steps, log scale; a norm
   of exactly 0 (a dead layer), which a log axis cannot show, is drawn as a down-pointing marker
   at the bottom of the panel (a tenth of the smallest positive norm) and its legend entry says
   so; when a run only has per-variable norms, ``gradients/<layer>/<var>/norm`` is drawn instead;
3. **activation health per layer** -- ``activations/<layer>/saturated_fraction`` (solid) and
   ``dead_fraction`` (dashed), in ``[0, 1]``;
4. **verdicts** -- the health verdicts in ``metrics.json`` (or the run's status and error line).

A panel without data says so in place of a plot. Everything is read back with TensorBoard's own
reader (:mod:`gradlab.events`). matplotlib is optional (``pip install 'gradlab[plot]'``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import textwrap
from pathlib import Path
from typing import Any

from gradlab.errors import GradlabError, UsageError, first_line

INSTALL_HINT = "gradlab report needs matplotlib, an optional extra: pip install 'gradlab[plot]'"
PANELS = ("loss", "gradient norm", "activation health", "verdicts")
_LAYER_NORM = re.compile(r"^gradients/(.+)/layer_norm$")
_VAR_NORM = re.compile(r"^gradients/(.+)/([^/]+)/norm$")
_ACT = re.compile(r"^activations/(.+)/(saturated|dead)_fraction$")


class MissingPlotExtra(GradlabError):
    """matplotlib is not installed."""

    exit_code = 2


@dataclasses.dataclass
class RunView:
    """What the report shows of one run: its scalars, status, verdicts and sweep hyperparameters."""

    name: str
    run_dir: Path
    status: str
    error: str | None
    verdicts: list[dict]
    health_checked: bool
    scalars: dict[str, list[tuple[int, float]]]
    steps_per_epoch: float | None
    label: str = ""
    metrics: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Panel:
    """One drawn panel: its run, which of :data:`PANELS`, and ``series`` label -> source tag."""

    run: str
    kind: str
    series: dict[str, str]
    log_scale: bool = False


@dataclasses.dataclass
class ReportResult:
    """The written PNG, its size in pixels, and the panels drawn (for tests and tools)."""

    path: Path
    size: tuple[int, int]
    panels: list[Panel]


def _is_run(path: Path) -> bool:
    return (path / "metrics.json").exists() or (path / "config.yaml").exists()


FINAL_KEYS = ("loss", "accuracy", "val_loss", "val_accuracy", "steps", "epochs_completed")
_JSON_TYPES = ((bool, "true/false"), (dict, "an object"), (list, "a list"), (str, "a string"),
               ((int, float), "a number"), (type(None), "null"))


def _got(value: Any) -> str:
    """``a list ([1, 2])``: the JSON type of ``value`` and the value itself, shortened, for a message."""
    kind = next((name for types, name in _JSON_TYPES if isinstance(value, types)), type(value).__name__)
    try:
        text = json.dumps(value, default=str)
    except ValueError:
        text = repr(value)
    return f"{kind} ({text if len(text) <= 40 else text[:37] + '...'})"


def _read_json(path: Path, what: str) -> Any:
    """The parsed JSON of ``path``, or ``None`` when the file does not exist.

    Raises:
        UsageError: the file exists but cannot be read (a directory, no permission) or is not
            valid JSON (including bytes that are not UTF-8); one line naming the file.
    """
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as err:
        raise UsageError(f"{path}: cannot read {what} ({err.strerror or first_line(err)})") from None
    try:
        return json.loads(data)
    except ValueError as err:  # JSONDecodeError and UnicodeDecodeError
        raise UsageError(f"{path}: not valid JSON ({first_line(err)}); expected {what}") from None


def _check(path: Path, key: str, value: Any, types: tuple, allowed: str) -> None:
    """Raise a one-line :class:`UsageError` unless ``value`` (at ``key`` in ``path``) is one of ``types``.

    ``bool`` never counts as a number, although it is an ``int`` in Python."""
    if isinstance(value, bool) and bool not in types:
        ok = False
    else:
        ok = isinstance(value, types)
    if not ok:
        raise UsageError(f"{path}: {key}: expected {allowed}, got {_got(value)}")


def _check_verdicts(path: Path, key: str, verdicts: Any) -> None:
    _check(path, key, verdicts, (list, type(None)), "a list of verdict objects or null")
    for i, v in enumerate(verdicts or []):
        _check(path, f"{key}[{i}]", v, (dict,), "a verdict object")


def _load_summary(path: Path) -> dict[str, Any]:
    """The sweep's ``sweep.json``, checked enough to draw it.

    Raises:
        UsageError: not valid JSON, not an object, ``runs`` not a list of run records (objects
            whose ``name`` is a plain directory name), or a record field of the wrong type.
    """
    what = "the sweep summary gradlab sweep writes"
    summary = _read_json(path, what)
    _check(path, "top level", summary, (dict,), f"an object ({what})")
    runs = summary.get("runs", [])
    _check(path, "runs", runs, (list,), "a list of run records")
    for i, rec in enumerate(runs):
        key = f"runs[{i}]"
        _check(path, key, rec, (dict,), "a run record (an object)")
        name = rec.get("name")
        if not isinstance(name, str) or not name or Path(name).name != name or name in (".", ".."):
            raise UsageError(f"{path}: {key}.name: expected the name of a run directory in the sweep "
                             f"directory, got {_got(name)}")
        for field, types, allowed in (("status", (str, type(None)), "a string or null"),
                                      ("error", (str, type(None)), "a string or null"),
                                      ("hparams", (dict, type(None)), "an object or null"),
                                      ("metrics", (dict, type(None)), "an object or null"),
                                      ("health_checked", (bool, type(None)), "true, false or null")):
            _check(path, f"{key}.{field}", rec.get(field), types, allowed)
        _check_verdicts(path, f"{key}.verdicts", rec.get("verdicts"))
        _check_final(path, f"{key}.metrics", rec.get("metrics") or {})
    _check(path, "name", summary.get("name"), (str, type(None)), "a string or null")
    return summary


def _check_final(path: Path, key: str, metrics: dict) -> None:
    for field in ("steps", "epochs_completed"):
        _check(path, f"{key}.{field}" if key else field, metrics.get(field), (int, float, type(None)),
               "a number or null")


def _load_metrics(run_dir: Path) -> dict[str, Any] | None:
    """The run's own ``metrics.json`` (``None`` when it has none), checked enough to draw it.

    Raises:
        UsageError: unreadable, not valid JSON, not an object, or ``status``/``error``/``verdicts``/
            ``steps``/``epochs_completed`` of the wrong type.
    """
    path = run_dir / "metrics.json"
    what = "the metrics gradlab run writes"
    metrics = _read_json(path, what)
    if metrics is None and not path.exists():
        return None
    _check(path, "top level", metrics, (dict,), f"an object ({what})")
    for field in ("status", "error"):
        _check(path, field, metrics.get(field), (str, type(None)), "a string or null")
    _check_verdicts(path, "verdicts", metrics.get("verdicts"))
    _check_final(path, "", metrics)
    return metrics


def _load_config(run_dir: Path) -> dict[str, Any] | None:
    """The run's ``config.yaml`` (``None`` when it has none or it is empty).

    Raises:
        UsageError: unreadable, not valid YAML (with the line), not a mapping, or ``diagnostics``
            not a list.
    """
    import yaml

    from gradlab.config import load_yaml

    path = run_dir / "config.yaml"
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        reason = err.strerror if isinstance(err, OSError) and err.strerror else first_line(err)
        raise UsageError(f"{path}: cannot read the run's config ({reason})") from None
    try:
        config = load_yaml(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        problem = getattr(err, "problem", None) or first_line(err)
        raise UsageError(f"{where}: not valid YAML ({problem}); expected the config gradlab run saves") from None
    if config is None:
        return None
    _check(path, "top level", config, (dict,), "a mapping (the config gradlab run saves)")
    _check(path, "diagnostics", config.get("diagnostics"), (list, type(None)), "a list or null")
    return config


def load_views(path: str | os.PathLike) -> tuple[str, list[RunView]]:
    """``(title, runs)`` for a run directory or a sweep directory (one view per combination).

    Each run's own ``metrics.json`` wins over its record in the sweep's ``sweep.json``: the run
    writes it last (a run interrupted in the sweep and finished later with ``gradlab run
    --resume`` is ``completed`` with its final metrics and verdicts, although ``sweep.json`` still
    says ``interrupted``). The record is the fallback for a run without ``metrics.json`` (never
    started, or killed before writing it), and for the error line when both give the same status.
    A run without a ``status`` anywhere is ``unknown``. An empty ``config.yaml`` counts as absent.

    Raises:
        UsageError: ``path`` is neither a gradlab run nor a sweep directory, or its ``sweep.json``,
            a run's ``metrics.json`` or ``config.yaml`` cannot be read, does not parse, or holds
            a value of the wrong type (one line naming the file and key).
    """
    from gradlab.events import read_scalars
    from gradlab.experiment import health_checked
    from gradlab.sweep import SUMMARY_FILE, describe_value, short_key

    root = Path(path)
    if not root.is_dir():
        raise UsageError(f"RUN_OR_SWEEP_DIR {str(root)!r}: not a directory (give a run or sweep directory)")
    if (root / SUMMARY_FILE).exists():
        summary = _load_summary(root / SUMMARY_FILE)
        entries = [(root / r["name"], r) for r in summary.get("runs", [])]
        title = f"sweep {summary.get('name') or root.name} ({root})"
    elif _is_run(root):
        entries, title = [(root, None)], f"run {root}"
    else:
        raise UsageError(f"RUN_OR_SWEEP_DIR {str(root)!r}: not a gradlab run (no metrics.json or config.yaml) "
                           "or sweep (no sweep.json)")
    views = []
    for run_dir, record in entries:
        record = record or {}
        own = _load_metrics(run_dir) if run_dir.is_dir() else None
        if own is not None and own.get("status"):
            status = own["status"]
            error = own.get("error") or (record.get("error") if record.get("status") == status else None)
        else:
            status = record.get("status") or (own or {}).get("status") or "unknown"
            error = record.get("error") or (own or {}).get("error")
        if own is not None:
            final = {k: own[k] for k in FINAL_KEYS if k in own}
            verdicts = list(own.get("verdicts") or [])
        else:
            final = dict(record.get("metrics") or {})
            verdicts = list(record.get("verdicts") or [])
        scalars = read_scalars(run_dir) if run_dir.is_dir() else {}
        steps, epochs = final.get("steps"), final.get("epochs_completed")
        label = ", ".join(f"{short_key(k)}={describe_value(v)}"
                          for k, v in (record.get("hparams") or {}).items())
        config = _load_config(run_dir) if run_dir.is_dir() else None
        if config is not None:
            checked = health_checked(config)
        else:
            checked = record.get("health_checked")
            checked = True if checked is None else checked
        views.append(RunView(name=run_dir.name, run_dir=run_dir, status=status, error=error,
                             verdicts=verdicts, health_checked=checked, scalars=scalars,
                             steps_per_epoch=steps / epochs if steps and epochs else None, label=label,
                             metrics=final))
    return title, views


def plan_panels(view: RunView) -> list[Panel]:
    """The four panels of one run, with the tags each one draws (empty when there is no data)."""
    tags = sorted(view.scalars)
    loss = {}
    if "step/loss" in view.scalars:
        loss["train (step mean)"] = "step/loss"
    if "epoch_loss" in view.scalars:
        loss["train (epoch mean)"] = "epoch_loss"
    if "validation/epoch_loss" in view.scalars:
        loss["validation (epoch)"] = "validation/epoch_loss"
    grads = {m.group(1): t for t in tags if (m := _LAYER_NORM.match(t))}
    if not grads:
        grads = {f"{m.group(1)}/{m.group(2)}": t for t in tags
                 if (m := _VAR_NORM.match(t)) and t != "gradients/logits/norm"}
    acts = {f"{m.group(1)} {m.group(2)}": t for t in tags if (m := _ACT.match(t))}
    verdicts = {f"{v.get('layer')}: {v.get('verdict')}": "metrics.json" for v in view.verdicts}
    return [Panel(view.name, "loss", loss), Panel(view.name, "gradient norm", grads, log_scale=True),
            Panel(view.name, "activation health", acts), Panel(view.name, "verdicts", verdicts)]


def _verdict_text(view: RunView) -> str:
    lines = []
    if view.status not in ("completed", "stopped"):
        lines.append(f"status: {view.status}")
        if view.error:
            lines += textwrap.wrap(view.error, 48)
        return "\n".join(lines)
    if view.status == "stopped":
        lines.append("stopped: non-finite loss or gradient")
    if not view.verdicts:
        lines.append("healthy: no layer vanished,\nexploded, died or saturated" if view.health_checked
                     else "no verdicts: the health\ndiagnostic did not run")
    for v in view.verdicts:
        head = f"{v.get('layer')}: {v.get('verdict')}" + (f" (step {v['first_step']})" if v.get("first_step") is not None
                                                          else "")
        lines.append(head)
        if v.get("message"):
            lines += ["  " + ln for ln in textwrap.wrap(str(v["message"]), 46)]
    return "\n".join(lines)


def draw(views: list[RunView], out: str | os.PathLike, title: str = "") -> ReportResult:
    """Draw the figure of ``views`` (one column each) to the PNG ``out``.

    Raises:
        MissingPlotExtra: matplotlib is not installed.
        UsageError: ``out`` cannot be written (see :func:`_save_png`); nothing is left at ``out``.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise MissingPlotExtra(INSTALL_HINT) from None

    ncols = max(1, len(views))
    fig, axes = plt.subplots(len(PANELS), ncols, figsize=(4.6 * ncols, 12.5), squeeze=False,
                             gridspec_kw={"height_ratios": [1, 1, 1, 0.75]})
    drawn: list[Panel] = []
    for col, view in enumerate(views):
        for row, panel in enumerate(plan_panels(view)):
            ax = axes[row][col]
            drawn.append(panel)
            if panel.kind == "verdicts":
                ax.axis("off")
                color = ("tab:green" if view.status == "completed" and not view.verdicts and view.health_checked
                         else "gray" if view.status == "completed" and not view.verdicts else "tab:red")
                ax.text(0.0, 1.0, _verdict_text(view), va="top", ha="left", fontsize=9, family="monospace",
                        color=color, transform=ax.transAxes)
                ax.set_title("health verdicts", fontsize=10)
                continue
            if not panel.series:
                ax.text(0.5, 0.5, f"no {panel.kind} data\nin this run", ha="center", va="center",
                        transform=ax.transAxes, color="gray")
                ax.set_xticks([])
                ax.set_yticks([])
            floor = _log_floor([view.scalars[tag] for tag in panel.series.values()]) if panel.log_scale else None
            for label, tag in panel.series.items():
                points = view.scalars[tag]
                xs = [s for s, _ in points]
                ys = [v for _, v in points]
                if tag.endswith("epoch_loss") and view.steps_per_epoch:
                    xs = [(s + 1) * view.steps_per_epoch for s in xs]
                style = "--" if label.endswith(" dead") or label.startswith("validation") else "-"
                zeros = []
                if panel.log_scale:
                    zeros = [x for x, y in zip(xs, ys) if y <= 0]
                    pairs = [(x, y) for x, y in zip(xs, ys) if y > 0]
                    xs, ys = [p[0] for p in pairs], [p[1] for p in pairs]
                marker = "o" if len(xs) <= 12 else None
                if zeros:
                    label += " (all 0, at the bottom)" if not xs else " (0 at the bottom)"
                (line,) = ax.plot(xs, ys, style, label=label, marker=marker, markersize=3, linewidth=1.4)
                if zeros:
                    ax.plot(zeros, [floor] * len(zeros), "v", color=line.get_color(), markersize=5)
            if panel.series:
                if panel.log_scale and ax.lines and any(len(ln.get_xdata()) for ln in ax.lines):
                    ax.set_yscale("log")
                if panel.kind == "activation health":
                    ax.set_ylim(-0.03, 1.03)
                ax.set_xlabel("step", fontsize=8)
                ax.tick_params(labelsize=8)
                ax.grid(True, alpha=0.3)
                ax.legend(fontsize=7, loc="best")
            names = {"loss": "loss", "gradient norm": "gradient norm per layer (log)",
                     "activation health": "saturated / dead fraction per layer"}
            ax.set_title(names[panel.kind], fontsize=10)
        head = "\n".join([view.name] + textwrap.wrap(view.label, 44))
        axes[0][col].set_title(f"{head}\nloss", fontsize=10)
    if title:
        fig.suptitle(title, fontsize=12)
    fig.tight_layout(rect=(0, 0, 1, 0.97 if title else 1))
    out = Path(out)
    try:
        _save_png(fig, out)
        width, height = (int(round(v)) for v in fig.get_size_inches() * 90)
    finally:
        plt.close(fig)
    return ReportResult(path=out, size=(width, height), panels=drawn)


def _out_problem(out: Path) -> str | None:
    """Why the PNG cannot go to ``out`` (it is a directory, or an existing ancestor of it is not
    one), or ``None`` when nothing on the path rules it out."""
    if out.is_dir():
        return "is a directory"
    for parent in out.parents:
        if parent.exists():
            return None if parent.is_dir() else f"{str(parent)!r} is not a directory"
    return None


def _log_floor(series: list) -> float:
    """Where a log-scale panel draws its zeros: a tenth of the smallest positive value of its
    ``series`` (lists of ``(step, value)``), or 1e-12 when none is positive."""
    positive = [v for points in series for _, v in points if v > 0]
    return min(positive) / 10 if positive else 1e-12


def _save_png(fig, out: Path) -> None:
    """Write ``fig`` to ``out`` atomically: parent directories created, the PNG written to a
    temporary file next to it and renamed over ``out``, so a failure (or Ctrl-C) leaves no
    partial PNG behind.

    Raises:
        UsageError: the parent cannot be created or the file cannot be written (a parent that
            is a file, no permission, a read-only or full disk); one line naming ``--out``.
    """
    import secrets

    def fail(reason: str) -> UsageError:
        return UsageError(f"--out {str(out)!r}: cannot write the report: {reason} "
                          "(give a .png path in a writable directory)")

    problem = _out_problem(out)
    if problem:
        raise fail(problem)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise fail(f"cannot create directory {str(out.parent)!r} ({err.strerror or first_line(err)})") from None
    tmp = out.parent / f".{out.name}.{secrets.token_hex(4)}.tmp"
    try:
        with open(tmp, "xb") as f:
            fig.savefig(f, format="png", dpi=90)
        os.replace(tmp, out)
    except OSError as err:
        raise fail(err.strerror or first_line(err)) from None
    finally:
        if tmp.exists():
            try:
                tmp.unlink()
            except OSError:
                pass


def report(path: str | os.PathLike, out: str | os.PathLike | None = None) -> ReportResult:
    """Draw the report of a run or sweep directory to ``out`` (default ``<dir>/report.png``).

    Raises:
        MissingPlotExtra: matplotlib is not installed (checked first, one line with the fix).
        UsageError: ``path`` is not a run or sweep directory or holds a file gradlab cannot read
            (:func:`load_views`); ``out`` is not a ``.png`` file, is a directory, lies under a file,
            or cannot be created or written. A failed write leaves no partial PNG, and an existing
            ``out`` is replaced only by a complete one.
    """
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise MissingPlotExtra(INSTALL_HINT) from None
    target = Path(out) if out is not None else Path(path) / "report.png"
    if target.suffix.lower() != ".png":
        raise UsageError(f"--out {str(target)!r}: must be a .png file")
    problem = _out_problem(target)
    if problem and Path(path).is_dir():  # fail before reading the runs; a bad RUN_OR_SWEEP_DIR is named first
        raise UsageError(f"--out {str(target)!r}: cannot write the report: {problem} "
                         "(give a .png path in a writable directory)")
    title, views = load_views(path)
    return draw(views, target, title)
