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
