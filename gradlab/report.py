"""``gradlab report``: one PNG of a run (or of every run of a sweep, side by side), from its event files.

One column per run, four panels per column:

1. **loss** -- ``step/loss`` over steps, with the per-epoch ``epoch_loss`` of the training and
   validation runs placed at the step each epoch ended (``epoch * steps / epochs``);
2. **gradient norm per layer** -- ``gradients/<layer>/layer_norm`` over steps, log scale (values
   ``<= 0`` cannot be drawn on a log axis and are left out); when a run only has per-variable
   norms, ``gradients/<layer>/<var>/norm`` is drawn instead;
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

from gradlab.errors import GradlabError, UsageError

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


def load_views(path: str | os.PathLike) -> tuple[str, list[RunView]]:
    """``(title, runs)`` for a run directory or a sweep directory (one view per combination).

    Raises:
        UsageError: ``path`` is neither a gradlab run nor a sweep directory.
    """
    from gradlab.events import read_scalars
    from gradlab.sweep import SUMMARY_FILE, describe_value, health_checked

    root = Path(path)
    if not root.is_dir():
        raise UsageError(f"RUN_OR_SWEEP_DIR {str(root)!r}: not a directory (give a run or sweep directory)")
    if (root / SUMMARY_FILE).exists():
        summary = json.loads((root / SUMMARY_FILE).read_text())
        entries = [(root / r["name"], r) for r in summary.get("runs", [])]
        title = f"sweep {summary.get('name', root.name)} ({root})"
    elif _is_run(root):
        entries, title = [(root, None)], f"run {root}"
    else:
        raise UsageError(f"RUN_OR_SWEEP_DIR {str(root)!r}: not a gradlab run (no metrics.json or config.yaml) "
                           "or sweep (no sweep.json)")
    views = []
    for run_dir, record in entries:
        metrics: dict[str, Any] = {}
        try:
            metrics = json.loads((run_dir / "metrics.json").read_text())
        except (OSError, ValueError):
            pass
        scalars = read_scalars(run_dir) if run_dir.is_dir() else {}
        steps, epochs = metrics.get("steps"), metrics.get("epochs_completed")
        status = (record or {}).get("status") or metrics.get("status", "unknown")
        error = (record or {}).get("error") or metrics.get("error")
        label = ", ".join(f"{k.split('.')[-1]}={describe_value(v)}"
                          for k, v in (record.get("hparams") or {}).items()) if record else ""
        try:
            import yaml

            checked = health_checked(yaml.safe_load((run_dir / "config.yaml").read_text()))
        except (OSError, ValueError, AttributeError):
            checked = (record or {}).get("health_checked", True)
        views.append(RunView(name=run_dir.name, run_dir=run_dir, status=status, error=error,
                             verdicts=list(metrics.get("verdicts") or []), health_checked=checked, scalars=scalars,
                             steps_per_epoch=steps / epochs if steps and epochs else None, label=label))
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
            for label, tag in panel.series.items():
                points = view.scalars[tag]
                xs = [s for s, _ in points]
                ys = [v for _, v in points]
                if tag.endswith("epoch_loss") and view.steps_per_epoch:
                    xs = [(s + 1) * view.steps_per_epoch for s in xs]
                style = "--" if label.endswith(" dead") or label.startswith("validation") else "-"
                if panel.log_scale:
                    pairs = [(x, y) for x, y in zip(xs, ys) if y > 0]
                    xs, ys = [p[0] for p in pairs], [p[1] for p in pairs]
                marker = "o" if len(xs) <= 12 else None
                ax.plot(xs, ys, style, label=label, marker=marker, markersize=3, linewidth=1.4)
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
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    width, height = (int(round(v)) for v in fig.get_size_inches() * 90)
    plt.close(fig)
    return ReportResult(path=out, size=(width, height), panels=drawn)


def report(path: str | os.PathLike, out: str | os.PathLike | None = None) -> ReportResult:
    """Draw the report of a run or sweep directory to ``out`` (default ``<dir>/report.png``).

    Raises:
        MissingPlotExtra: matplotlib is not installed (checked first, one line with the fix).
        UsageError: ``path`` is not a run or sweep directory, or ``out`` is not a ``.png`` file.
    """
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise MissingPlotExtra(INSTALL_HINT) from None
    target = Path(out) if out is not None else Path(path) / "report.png"
    if target.suffix.lower() != ".png":
        raise UsageError(f"--out {str(target)!r}: must be a .png file")
    title, views = load_views(path)
    return draw(views, target, title)
