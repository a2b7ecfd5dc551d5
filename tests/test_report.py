"""gradlab report: a PNG whose panels follow the run's event tags, for a run and a sweep."""

from __future__ import annotations

import re
import sys

import numpy as np
import pytest

from compare_helpers import BAD, GOOD, shared_sweep
from conftest import gradlab_cli
from gradlab.events import read_scalars
from gradlab.report import PANELS, report


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    return shared_sweep(tmp_path_factory)[0]


def _pixels(path):
    from PIL import Image

    with Image.open(path) as img:
        return img.size, np.asarray(img.convert("L"), dtype=np.float64)


def test_run_report_png_panels_match_the_run_tags(sweep, tmp_path):
    run = sweep / GOOD[0]
    result = report(run, tmp_path / "run.png")
    size, gray = _pixels(result.path)
    assert size == result.size and 300 <= size[0] <= 1200 and 800 <= size[1] <= 1600
    assert gray.std() > 10 and (gray < 128).mean() > 0.005  # not blank: lines and text on white

    tags = set(read_scalars(run))
    panels = {p.kind: p for p in result.panels}
    assert list(panels) == list(PANELS)
    assert set(panels["loss"].series.values()) == {"step/loss", "epoch_loss", "validation/epoch_loss"} & tags
    assert "step/loss" in panels["loss"].series.values()
    layers = {m.group(1) for t in tags if (m := re.match(r"^gradients/(.+)/layer_norm$", t))}
    assert layers == {"hidden_1", "logits"}
    assert set(panels["gradient norm"].series) == layers and panels["gradient norm"].log_scale
    acts = {t for t in tags if re.match(r"^activations/.+/(saturated|dead)_fraction$", t)}
    assert set(panels["activation health"].series.values()) == acts  # empty until that diagnostic exists


def test_sweep_report_puts_runs_side_by_side_via_the_cli(sweep, tmp_path):
    out = tmp_path / "sweep.png"
    proc = gradlab_cli("report", str(sweep), "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"report: {out}")
    (w, h), gray = _pixels(out)
    one_run_width = report(sweep / GOOD[0], tmp_path / "one.png").size[0]
    assert w == pytest.approx(4 * one_run_width, rel=0.02) and h < 1600
    assert gray.std() > 10
    # each column is drawn: the columns of good runs have curves, not only white
    cols = np.array_split(gray, 4, axis=1)
    assert all((c < 200).mean() > 0.003 for c in cols)

    from gradlab.report import load_views, plan_panels

    _, views = load_views(sweep)
    assert [v.name for v in views] == sorted(GOOD + BAD)
    failed = [v for v in views if v.name in BAD]
    assert all(v.status == "failed" and "bad.csv" in v.error for v in failed)
    assert all(not p.series for v in failed for p in plan_panels(v) if p.kind != "verdicts")


def test_without_matplotlib_one_line_says_how_to_get_it(sweep, monkeypatch, capsys):
    from gradlab import cli

    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    assert cli.main(["report", str(sweep)]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines() == ["gradlab report needs matplotlib, an optional extra: pip install 'gradlab[plot]'"]
    assert not (sweep / "report.png").exists()


def test_not_a_run_directory_is_one_line(tmp_path):
    from gradlab import cli

    (tmp_path / "empty").mkdir()
    proc = gradlab_cli("report", str(tmp_path / "empty"))
    assert proc.returncode == 2  # bad input
    assert proc.stderr.strip() == (f"RUN_OR_SWEEP_DIR {str(tmp_path / 'empty')!r}: not a gradlab run "
                                   "(no metrics.json or config.yaml) or sweep (no sweep.json)")
    assert cli.main(["report", str(tmp_path), "--out", str(tmp_path / "x.jpg")]) == 2


# --- a run resumed after its sweep was interrupted; bad input is one line, exit status 2 ----------

def _copy_sweep(sweep, tmp_path):
    import shutil

    copy = tmp_path / "sweep"
    shutil.copytree(sweep, copy, ignore=shutil.ignore_patterns("report.png"))
    return copy


def _edit_record(sweep_dir, name, **fields):
    import json

    summary = json.loads((sweep_dir / "sweep.json").read_text())
    for rec in summary["runs"]:
        if rec["name"] == name:
            rec.update(fields)
    (sweep_dir / "sweep.json").write_text(json.dumps(summary))


def test_a_run_resumed_after_the_sweep_was_interrupted_reports_its_own_status(sweep, tmp_path):
    """sweep.json still says interrupted (the sweep wrote it before the resume); the run's own
    metrics.json, written when the resumed run completed, wins: status, error and final metrics."""
    import json

    from gradlab.report import _verdict_text, load_views

    copy = _copy_sweep(sweep, tmp_path)
    own = json.loads((copy / GOOD[0] / "metrics.json").read_text())
    assert own["status"] == "completed"
    _edit_record(copy, GOOD[0], status="interrupted", exit_code=130, metrics={}, verdicts=[],
                 error=f"gradlab: interrupted at step 3; checkpoint saved in {copy / GOOD[0]}/checkpoints; "
                       f"resume with: gradlab run --resume {copy / GOOD[0]}")
    views = {v.name: v for v in load_views(copy)[1]}
    view = views[GOOD[0]]
    assert (view.status, view.error) == ("completed", None)
    assert view.metrics["loss"] == own["loss"] and view.metrics["steps"] == own["steps"]
    assert view.steps_per_epoch == own["steps"] / own["epochs_completed"]
    assert view.verdicts == own.get("verdicts", [])
    text = _verdict_text(view)
    assert "interrupted" not in text and "resume" not in text

    # sweep.json is the fallback for a run without metrics.json (e.g. killed before writing it)
    (copy / GOOD[1] / "metrics.json").unlink()
    _edit_record(copy, GOOD[1], status="interrupted", error="gradlab: interrupted at step 2", metrics={"steps": 2})
    view = {v.name: v for v in load_views(copy)[1]}[GOOD[1]]
    assert (view.status, view.error, view.metrics) == ("interrupted", "gradlab: interrupted at step 2", {"steps": 2})


def _one_line_exit_2(capsys, *argv):
    from gradlab import cli

    status = cli.main(["report", *argv])
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert status == 2 and len(lines) == 1 and "internal error" not in err and "Traceback" not in err, (status, err)
    return lines[0]


def test_an_unwritable_out_is_one_line_and_writes_nothing(sweep, tmp_path, capsys):
    run = sweep / GOOD[0]
    afile = tmp_path / "somefile.yaml"
    afile.write_text("x: 1\n")
    for out in (afile / "r.png", afile / "deeper" / "r.png"):
        line = _one_line_exit_2(capsys, str(run), "--out", str(out))
        assert line == (f"--out {str(out)!r}: cannot write the report: {str(afile)!r} is not a directory "
                        "(give a .png path in a writable directory)")
    (tmp_path / "dir.png").mkdir()
    line = _one_line_exit_2(capsys, str(run), "--out", str(tmp_path / "dir.png"))
    assert line.startswith(f"--out {str(tmp_path / 'dir.png')!r}: cannot write the report: is a directory")
    assert afile.read_text() == "x: 1\n" and list((tmp_path / "dir.png").iterdir()) == []


@pytest.mark.skipif(not __import__("os").path.isdir("/proc/self"), reason="needs Linux /proc")
def test_an_out_under_proc_is_one_line(sweep, capsys):
    line = _one_line_exit_2(capsys, str(sweep / GOOD[0]), "--out", "/proc/x/r.png")
    assert line.startswith("--out '/proc/x/r.png': cannot write the report: ")
    assert line.endswith("(give a .png path in a writable directory)")


def test_a_failed_write_leaves_no_partial_png(sweep, tmp_path, monkeypatch):
    """The PNG goes to a temporary file renamed over --out: a write that fails half-way (disk full)
    leaves neither a partial PNG nor the temporary file, and an existing report untouched."""
    import errno

    from matplotlib.figure import Figure

    from gradlab.errors import UsageError

    def half_written(self, fname, *args, **kwargs):
        f = open(fname, "wb") if isinstance(fname, (str, __import__("os").PathLike)) else fname
        f.write(b"\x89PNG\r\n\x1a\n partial")
        f.flush()
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Figure, "savefig", half_written)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    (out_dir / "old.png").write_bytes(b"old report")
    for name in ("new.png", "old.png"):
        with pytest.raises(UsageError, match=r"cannot write the report: No space left on device"):
            report(sweep / GOOD[0], out_dir / name)
    assert sorted(p.name for p in out_dir.iterdir()) == ["old.png"]
    assert (out_dir / "old.png").read_bytes() == b"old report"


@pytest.mark.parametrize("text, message", [
    ("{bad", "not valid JSON (Expecting property name enclosed in double quotes: line 1 column 2 (char 1)); "
             "expected the sweep summary gradlab sweep writes"),
    ("[1,2]", "top level: expected an object (the sweep summary gradlab sweep writes), got a list ([1, 2])"),
    ('{"runs": 3}', "runs: expected a list of run records, got a number (3)"),
    ('{"runs": [7]}', "runs[0]: expected a run record (an object), got a number (7)"),
    ('{"runs": [{"name": "../x"}]}', 'runs[0].name: expected the name of a run directory in the sweep directory, '
                                     'got a string ("../x")'),
    ('{"runs": [{"name": "r", "hparams": [1]}]}', "runs[0].hparams: expected an object or null, got a list ([1])"),
    ('{"runs": [{"name": "r", "verdicts": ["x"]}]}', 'runs[0].verdicts[0]: expected a verdict object, got a string ("x")'),
])
def test_a_broken_sweep_json_is_one_line(tmp_path, capsys, text, message):
    (tmp_path / "sweep.json").write_text(text)
    line = _one_line_exit_2(capsys, str(tmp_path), "--out", str(tmp_path / "r.png"))
    assert line == f"{tmp_path / 'sweep.json'}: {message}"
    assert not (tmp_path / "r.png").exists()


@pytest.mark.parametrize("file, text, message", [
    ("metrics.json", "[1]", ": top level: expected an object (the metrics gradlab run writes), got a list ([1])"),
    ("metrics.json", "null", ": top level: expected an object (the metrics gradlab run writes), got null (null)"),
    ("metrics.json", "{1: 2}", ": not valid JSON (Expecting property name enclosed in double quotes: line 1 "
                               "column 2 (char 1)); expected the metrics gradlab run writes"),
    ("metrics.json", '{"verdicts": 3}', ": verdicts: expected a list of verdict objects or null, got a number (3)"),
    ("metrics.json", '{"status": "completed", "steps": "6", "epochs_completed": 2}',
     ': steps: expected a number or null, got a string ("6")'),
    ("metrics.json", '{"status": ["completed"]}', ': status: expected a string or null, got a list (["completed"])'),
    ("config.yaml", "name: x\ntrain: {epochs: [1\n", ":3: not valid YAML (expected ',' or ']', but got "
                                                   "'<stream end>'); expected the config gradlab run saves"),
    ("config.yaml", "- 1\n- 2\n", ": top level: expected a mapping (the config gradlab run saves), got a list ([1, 2])"),
    ("config.yaml", "diagnostics: 5\n", ": diagnostics: expected a list or null, got a number (5)"),
])
def test_a_broken_run_file_is_one_line(tmp_path, capsys, file, text, message):
    run = tmp_path / "run"
    run.mkdir()
    (run / file).write_text(text)
    line = _one_line_exit_2(capsys, str(run), "--out", str(tmp_path / "r.png"))
    assert line == f"{run / file}{message}"
    assert not (tmp_path / "r.png").exists()


def test_a_broken_run_metrics_json_in_a_sweep_is_one_line(sweep, tmp_path, capsys):
    copy = _copy_sweep(sweep, tmp_path)
    (copy / GOOD[1] / "metrics.json").write_text("[1]")
    line = _one_line_exit_2(capsys, str(copy), "--out", str(tmp_path / "r.png"))
    assert line.startswith(f"{copy / GOOD[1] / 'metrics.json'}: top level: expected an object")




def test_a_dead_layer_with_zero_gradient_norms_is_drawn_not_dropped(tmp_path, monkeypatch):
    """Norms of exactly 0 cannot sit on a log axis; they used to vanish from the panel, hiding
    the very layers that are dead. They are drawn at the bottom, and the legend says so."""
    import matplotlib.pyplot as plt

    import gradlab
    from conftest import ROOT

    result = gradlab.run(ROOT / "configs" / "demo_relu_dead.yaml", ["train.epochs=1"], run_dir=tmp_path / "run",
                         quiet=True)
    zero = {layer for layer in ("hidden_1", "hidden_2")
            if all(v == 0 for _, v in read_scalars(result.run_dir)[f"gradients/{layer}/layer_norm"])}
    assert zero, "the demo no longer has a layer with all-zero gradients"
    figures = []
    real_close = plt.close
    monkeypatch.setattr(plt, "close", lambda fig=None: figures.append(fig) or real_close(fig))
    report(result.run_dir, tmp_path / "dead.png")
    ax = figures[0].axes[PANELS.index("gradient norm")]
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert {f"{layer} (all 0, at the bottom)" for layer in zero} <= set(legend), legend
    bottoms = [ln for ln in ax.lines if ln.get_marker() == "v"]
    assert len(bottoms) == len(zero)
    drawn = [y for ln in ax.lines if ln.get_marker() != "v" for y in ln.get_ydata()]
    assert drawn and all(0 < y < min(drawn) for ln in bottoms for y in ln.get_ydata())  # below every norm
