"""Specifications of the evaluation report: one self-contained HTML file and its Markdown twin."""

from __future__ import annotations

import base64
import io
import re
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from matplotlib.patches import Rectangle
from PIL import Image

from cxrfusion.evaluation.report import (
    Section,
    auc_table,
    calibration_table,
    write_report,
)
from cxrfusion.labels import LABELS, NUM_LABELS
from cxrfusion.plotting import new_figure, save_figure
from cxrfusion.stats.metrics import auc_summary

CHROMIUM = Path("/usr/bin/chromium")
# A colour no default matplotlib artist uses: finding it in a screenshot proves a figure was drawn.
MARKER_RGB = (255, 0, 255)


def _figure(path: Path, title: str) -> Path:
    figure = new_figure((4, 3))
    ax = figure.subplots()
    ax.plot([0, 1, 2], [1, 0, 2], color="#0072B2")
    ax.add_patch(Rectangle((0.2, 0.2), 1.2, 1.2, color=np.array(MARKER_RGB) / 255))
    ax.set_title(title)
    return save_figure(figure, path)


def _summary() -> dict:
    rng = np.random.default_rng(0)
    y = (rng.random((120, NUM_LABELS)) < 0.3).astype(np.uint8)
    y[:, LABELS.index("Hernia")] = 0
    p = np.clip(0.3 + 0.3 * y + rng.normal(0, 0.2, y.shape), 0, 1)
    return auc_summary(y, p, groups=np.arange(120) // 2, n_resamples=50)


def _sections(tmp_path: Path) -> list[Section]:
    return [
        Section(
            "Data", text="Test split of <b>synthetic</b> images.\n\n- 120 images\n- 60 patients"
        ),
        Section("Per-class AUC", table=auc_table(_summary()), caption="95 % CI: patient bootstrap"),
        Section(
            "Calibration",
            table=calibration_table({"ECE": 0.081, "Brier": 0.12}, {"ECE": 0.02, "Brier": 0.11}),
        ),
        Section(
            "ROC curves", figure=_figure(tmp_path / "figs" / "roc.png", "ROC"), caption="Fig 5"
        ),
        Section("Reliability", figure=_figure(tmp_path / "figs" / "rel.png", "Reliability")),
        Section("Run config", code="model: fusion\nepochs: 25\nnote: a < b & c\n"),
    ]


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """One report shared by the tests that only read it (its figures take a second to draw)."""
    root = tmp_path_factory.mktemp("report")
    return write_report(root / "eval_test", "Evaluation <fusion> & friends", _sections(root))


def test_html_report_is_self_contained(report: tuple[Path, Path]) -> None:
    html_path, _ = report
    html = html_path.read_text(encoding="utf-8")
    assert 'src="http' not in html and "<script" not in html.lower()
    assert "<link" not in html.lower() and "url(" not in html
    sources = re.findall(r'<img src="([^"]+)"', html)
    assert len(sources) == 2 == html.count("<img")
    for source in sources:
        prefix, data = source.split(",", 1)
        assert prefix == "data:image/png;base64"
        with Image.open(io.BytesIO(base64.b64decode(data, validate=True))) as image:
            assert image.format == "PNG"


def test_html_report_escapes_text(report: tuple[Path, Path]) -> None:
    html = report[0].read_text(encoding="utf-8")
    assert "<title>Evaluation &lt;fusion&gt; &amp; friends</title>" in html
    assert "<b>synthetic</b>" not in html and "&lt;b&gt;synthetic&lt;/b&gt;" in html
    assert "<pre>model: fusion\nepochs: 25\nnote: a &lt; b &amp; c\n</pre>" in html


def test_html_report_has_tables_lists_and_contents(report: tuple[Path, Path]) -> None:
    html = report[0].read_text(encoding="utf-8")
    assert html.count("<table>") == 2
    assert "<li>120 images</li><li>60 patients</li>" in html
    assert html.count('<a href="#section-') == 6 and 'id="section-6"' in html
    assert "<td>Hernia</td><td>n/a</td><td>n/a</td><td>0</td><td>120</td>" in html


def test_auc_table_shows_ci_counts_and_a_macro_row() -> None:
    summary = _summary()
    table = auc_table(summary)
    assert list(table.index) == [*LABELS, "Macro"]
    assert list(table.columns) == ["AUC", "95 % CI", "positives", "negatives"]
    cardio = summary["classes"]["Cardiomegaly"]
    assert table.loc["Cardiomegaly", "AUC"] == cardio["auc"]
    assert (
        table.loc["Cardiomegaly", "95 % CI"] == f"{cardio['ci_low']:.3f} - {cardio['ci_high']:.3f}"
    )
    assert table.loc["Macro", "AUC"] == summary["macro"]["auc"]
    assert np.isnan(table.loc["Hernia", "AUC"]) and table.loc["Hernia", "95 % CI"] == "n/a"


def test_markdown_report_has_tables_and_relative_figure_links(report: tuple[Path, Path]) -> None:
    html_path, md_path = report
    assert md_path == html_path.with_suffix(".md")
    md = md_path.read_text(encoding="utf-8")
    assert md.startswith("# Evaluation <fusion> & friends\n")
    assert "![Fig 5](../figs/roc.png)" in md and "![Reliability](../figs/rel.png)" in md
    assert (md_path.parent / "../figs/roc.png").is_file()
    assert "| pathology | AUC | 95 % CI | positives | negatives |" in md
    assert "| Hernia | n/a | n/a | 0 | 120 |" in md
    assert "| ECE | 0.081 | 0.020 |" in md
    assert "```\nmodel: fusion\nepochs: 25\nnote: a < b & c\n```" in md


def test_markdown_table_cells_cannot_break_the_row(tmp_path: Path) -> None:
    table = pd.DataFrame({"note": ["a | b"]}, index=pd.Index(["x"], name="row"))
    _, md_path = write_report(tmp_path, "t", [Section("s", table=table)])
    assert "| x | a \\| b |" in md_path.read_text(encoding="utf-8")


def test_a_figure_that_is_not_png_is_rejected(tmp_path: Path) -> None:
    jpeg = tmp_path / "fig.jpg"
    Image.new("L", (8, 8)).save(jpeg)
    with pytest.raises(ValueError, match="PNG"):
        write_report(tmp_path, "t", [Section("s", figure=jpeg)])
    assert not (tmp_path / "report.html").exists()


def _console_lines(stderr: str) -> list[str]:
    """Page console messages and uncaught errors that chromium logs with --enable-logging=stderr.

    Chromium logs every console message as `...:CONSOLE:<line>] "<text>", source: ...` (its level
    is not printed); the report runs no script, so any such line is a fault.
    """
    return [line for line in stderr.splitlines() if ":CONSOLE" in line or "Uncaught" in line]


def _screenshot(html_path: Path, work: Path) -> tuple[Path, str]:
    shot = work / "shot.png"
    command = [
        str(CHROMIUM),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={work / 'profile'}",
        "--enable-logging=stderr",
        "--v=0",
        f"--screenshot={shot}",
        "--window-size=1200,3000",
        html_path.resolve().as_uri(),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    return shot, done.stderr


@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium")
def test_report_renders_in_headless_chromium(report: tuple[Path, Path], tmp_path: Path) -> None:
    shot, stderr = _screenshot(report[0], tmp_path)
    assert shot.is_file(), stderr[-2000:]
    assert _console_lines(stderr) == []
    with Image.open(shot) as image:
        assert image.format == "PNG" and image.size == (1200, 3000)
        pixels = np.asarray(image.convert("RGB")).reshape(-1, 3)
    assert pixels.std() > 20
    assert len(np.unique(pixels.astype(np.uint32) @ np.array([1 << 16, 1 << 8, 1]))) > 50
    near_marker = np.abs(pixels.astype(int) - MARKER_RGB).max(axis=1) <= 12
    assert near_marker.sum() > 2 * 1000, "the embedded figures were not drawn"


@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium")
def test_headless_check_catches_a_page_error(tmp_path: Path) -> None:
    page = tmp_path / "broken.html"
    page.write_text("<!DOCTYPE html><html><body><script>missing();</script></body></html>")
    _, stderr = _screenshot(page, tmp_path)
    assert any("Uncaught ReferenceError" in line for line in _console_lines(stderr))
