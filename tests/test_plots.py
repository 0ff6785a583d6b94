"""Specifications of the evaluation figures: each writes a real PNG and says what it shows."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from matplotlib.figure import Figure
from matplotlib.text import Text
from PIL import Image

from cxrfusion.evaluation import plots
from cxrfusion.labels import LABELS, NUM_LABELS
from cxrfusion.stats.calibration import reliability_bins
from cxrfusion.stats.referral import referral_curve


def _predictions(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = (rng.random((n, NUM_LABELS)) < 0.3).astype(np.uint8)
    return y, np.clip(0.3 + 0.3 * y + rng.normal(0, 0.15, y.shape), 0, 1)


def _assert_png(path: Path, min_size: tuple[int, int] = (300, 200)) -> None:
    """A readable PNG of at least `min_size` pixels that is not a single flat colour."""
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.width >= min_size[0] and image.height >= min_size[1]
        assert np.asarray(image.convert("L")).std() > 5


def _figure_texts(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Capture every text drawn on the figures the plots module saves (titles, labels, notes)."""
    texts: list[str] = []
    real_save = plots.save_figure

    def capture(figure: Figure, path: Path) -> Path:
        texts.extend(t.get_text() for t in figure.findobj(Text))
        return real_save(figure, path)

    monkeypatch.setattr(plots, "save_figure", capture)
    return texts


def test_roc_curves_skip_a_class_without_positives_and_say_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    texts = _figure_texts(monkeypatch)
    y, p = _predictions(200, seed=0)
    y[:, LABELS.index("Hernia")] = 0
    path = plots.plot_roc_curves(y, p, tmp_path / "roc.png")
    _assert_png(path, (1000, 800))
    assert "Hernia\nno AUC" in texts
    assert "skipped:\nno positives" in texts
    assert any(t.startswith("Atelectasis\nAUC = ") for t in texts)
    assert sum("skipped" in t for t in texts) == 1


def test_roc_curves_reject_the_wrong_number_of_labels(tmp_path: Path) -> None:
    y, p = _predictions(50, seed=1)
    with pytest.raises(ValueError, match="expected"):
        plots.plot_roc_curves(y[:, :3], p[:, :3], tmp_path / "roc.png")


def test_mc_histogram_marks_the_mean_and_std(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    texts = _figure_texts(monkeypatch)
    samples = np.random.default_rng(2).normal(0.7, 0.05, 25).clip(0, 1)
    path = plots.plot_mc_histogram(samples, "Effusion", "00000001_000.png", tmp_path / "mc.png")
    _assert_png(path)
    assert f"mean = {samples.mean():.3f}" in texts
    assert f"± std = {samples.std():.3f}" in texts
    assert any("00000001_000.png: Effusion, T = 25" in t for t in texts)


def test_prediction_grid_lists_top_predictions_with_their_spread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    texts = _figure_texts(monkeypatch)
    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, (3, 64, 64), dtype=np.uint8)
    means = rng.random((3, NUM_LABELS))
    means[0, LABELS.index("Cardiomegaly")] = 0.99
    stds = np.full((3, NUM_LABELS), 0.05)
    truth = [["Cardiomegaly", "Effusion"], [], ["Mass"]]
    path = plots.plot_prediction_grid(images, truth, means, stds, tmp_path / "grid.png", top=2)
    _assert_png(path)
    assert "Cardiomegaly  p = 0.99 ± 0.05" in texts
    assert "true: Cardiomegaly | Effusion" in texts and "true: No Finding" in texts
    assert sum(" p = " in t for t in texts) == 6


def test_prediction_grid_rejects_predictions_of_the_wrong_shape(tmp_path: Path) -> None:
    images = np.zeros((2, 8, 8), dtype=np.uint8)
    with pytest.raises(ValueError, match="means"):
        plots.plot_prediction_grid(
            images, [[], []], np.zeros((2, 3)), np.zeros((2, 3)), tmp_path / "g.png"
        )


def test_reliability_shows_ece_before_and_after(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    texts = _figure_texts(monkeypatch)
    y, p = _predictions(300, seed=4)
    before = reliability_bins(y, p**0.5)
    after = reliability_bins(y, p)
    path = plots.plot_reliability(before, tmp_path / "rel.png", bins_after=after)
    _assert_png(path)
    assert any(t.startswith("before temperature scaling (ECE = ") for t in texts)
    assert any(t.startswith("after temperature scaling (ECE = ") for t in texts)


def test_reliability_without_after_draws_one_series(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    texts = _figure_texts(monkeypatch)
    y, p = _predictions(300, seed=5)
    _assert_png(plots.plot_reliability(reliability_bins(y, p), tmp_path / "rel.png"))
    assert any(t.startswith("model (ECE = ") for t in texts)
    assert not any(t.startswith(("after", "before")) for t in texts)


def test_referral_curve_plot_annotates_the_last_point(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    texts = _figure_texts(monkeypatch)
    y, p = _predictions(200, seed=6)
    curve = referral_curve(y, p, np.random.default_rng(7).random(200))
    _assert_png(plots.plot_referral_curve(curve, tmp_path / "referral.png"))
    assert f"{curve['macro_auc'][-1]:.3f} on 100 images" in texts


NO_GLOBAL_STATE = """
import sys
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd

backend = dict.__getitem__(matplotlib.rcParams, "backend")
import cxrfusion.data.figures, cxrfusion.evaluation.evaluate, cxrfusion.training.callbacks
from cxrfusion.evaluation import plots
from cxrfusion.stats.calibration import reliability_bins
from cxrfusion.training.curves import plot_loss_curves

out = Path(sys.argv[1])
y = np.array([[0], [1], [1], [0]])
plots.plot_reliability(reliability_bins(y, np.array([[0.1], [0.9], [0.6], [0.3]])), out / "r.png")
plot_loss_curves(pd.DataFrame({"epoch": [0, 1], "train_loss": [1.0, 0.5]}), out / "l.png")
assert dict.__getitem__(matplotlib.rcParams, "backend") == backend, "backend changed"
# torchmetrics imports pyplot; cxrfusion must not have registered a figure with it.
pyplot = sys.modules.get("matplotlib.pyplot")
assert pyplot is None or pyplot.get_fignums() == [], "figures left open in pyplot"
"""


def test_importing_and_plotting_changes_no_matplotlib_global_state(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "MPLBACKEND"}  # start from the default
    done = subprocess.run(
        [sys.executable, "-c", NO_GLOBAL_STATE, str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "r.png").is_file() and (tmp_path / "l.png").is_file()
