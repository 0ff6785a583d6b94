"""The figures of one evaluation, drawn into its folder: what each shows is in plots.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from cxrfusion.evaluation import plots
from cxrfusion.labels import LABELS
from cxrfusion.stats.calibration import reliability_bins


def _examples(uncertainty: np.ndarray, count: int) -> np.ndarray:
    """Positions of the most uncertain half and the most confident half of `count` images."""
    order = np.argsort(uncertainty, kind="stable")
    uncertain, confident = order[::-1][: (count + 1) // 2], order[: count // 2]
    return np.concatenate([uncertain, confident])


def evaluation_figures(
    out: Path,
    rows: pd.DataFrame,
    y: np.ndarray,
    samples: np.ndarray,
    summary: dict[str, np.ndarray],
    referral: dict,
    unscaled_mean: np.ndarray | None = None,
) -> dict[str, Path]:
    """ROC curves, reliability (before and after temperature scaling), referral curve, MC histogram.

    Args:
        out: the evaluation folder.
        rows: the evaluated split.csv rows, in prediction order.
        y: (N, 14) truth.
        samples: (T, N, 14) probabilities of the final predictor's dropout samples.
        summary: `summarise_samples(samples)`.
        referral: `referral_curve` output.
        unscaled_mean: (N, 14) mean probabilities before temperature scaling, or None when the
            predictor was not scaled (the reliability diagram then has one series).
    """
    mean = summary["mean"]
    before, after = (mean, None) if unscaled_mean is None else (unscaled_mean, mean)
    figures = {
        "roc": plots.plot_roc_curves(y, mean, out / "roc_curves.png"),
        "reliability": plots.plot_reliability(
            reliability_bins(y, before),
            out / "reliability.png",
            None if after is None else reliability_bins(y, after),
        ),
        "referral": plots.plot_referral_curve(referral, out / "referral_curve.png"),
    }
    most_uncertain = int(np.argmax(summary["uncertainty"]))
    top = int(np.argmax(mean[most_uncertain]))
    figures["mc_histogram"] = plots.plot_mc_histogram(
        samples[:, most_uncertain, top],
        LABELS[top],
        rows["Image Index"].iloc[most_uncertain],
        out / "mc_histogram.png",
    )
    return figures


def example_figures(
    out: Path,
    model,
    dataset,
    rows: pd.DataFrame,
    y: np.ndarray,
    summary: dict[str, np.ndarray],
    count: int,
) -> dict[str, Path]:
    """The prediction grid and a Grad-CAM figure of the `count` most and least uncertain images."""
    # Imported here: pytorch-grad-cam is only needed when Grad-CAM figures are drawn.
    from cxrfusion.evaluation.predictions import model_input
    from cxrfusion.explain import figure_name, gradcam, save_gradcam_figure

    mean = summary["mean"]
    picked = _examples(summary["uncertainty"], count)
    images = np.asarray(dataset.images[dataset.rows[picked]])
    truth = [[label for label, v in zip(LABELS, y[i], strict=True) if v] for i in picked]
    figures = {
        "grid": plots.plot_prediction_grid(
            images, truth, mean[picked], summary["std"][picked], out / "prediction_grid.png"
        )
    }
    for rank, position in enumerate(picked):
        image, _, _ = dataset[int(position)]
        x = model_input(model, image.unsqueeze(0))
        best = np.argsort(-mean[position])[:3]
        heatmaps = {LABELS[c]: gradcam(model, x, int(c)) for c in best}
        probs = {LABELS[c]: float(mean[position, c]) for c in best}
        name = rows["Image Index"].iloc[position]
        figures[f"gradcam {name}"] = save_gradcam_figure(
            image[0].numpy(), heatmaps, probs, out / figure_name(f"gradcam_{rank}", name)
        )
    return figures
