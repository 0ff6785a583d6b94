"""The evaluation figures: ROC curves, MC-dropout histogram, prediction grid, reliability, referral.

Each function draws one figure, saves it atomically with `save_figure` and returns its path.
Colours are from the Okabe-Ito palette, which stays distinguishable with colour-vision deficiency.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from cxrfusion.labels import LABELS
from cxrfusion.plotting import new_figure, save_figure
from cxrfusion.stats.metrics import macro_auc, per_class_auc, roc_curve_points

BLUE, VERMILLION, GREY = "#0072B2", "#D55E00", "#7f7f7f"
TICKS = (0.0, 0.5, 1.0)


def plot_roc_curves(
    y_true: np.ndarray, y_prob: np.ndarray, path: Path, labels: Sequence[str] = LABELS
) -> Path:
    """One ROC panel per pathology in a 4-column grid, titled with its AUC and positives.

    A class without positives (or negatives) has no curve: its panel says so instead.

    Args:
        y_true: (N, C) 0/1 ground truth.
        y_prob: (N, C) predicted probabilities.
        path: PNG file to write.
        labels: one name per column, in column order (the 14 pathologies by default).
    """
    if np.shape(y_true)[1:] != (len(labels),):
        raise ValueError(f"y_true has shape {np.shape(y_true)}, expected (N, {len(labels)})")
    curves = roc_curve_points(y_true, y_prob)
    aucs = per_class_auc(y_true, y_prob)
    positives = (np.asarray(y_true) == 1).sum(axis=0)
    columns = 4
    rows = int(np.ceil(len(labels) / columns))
    figure = new_figure((3.2 * columns, 3.2 * rows))
    axes = figure.subplots(rows, columns, squeeze=False)
    for ax in axes.ravel()[len(labels) :]:
        ax.axis("off")
    for ax, label, curve, auc, n_pos in zip(
        axes.ravel(), labels, curves, aucs, positives, strict=False
    ):
        ax.plot([0, 1], [0, 1], linestyle="--", color=GREY, linewidth=0.8)
        ax.set(xlim=(0, 1), ylim=(0, 1.02), aspect="equal", xticks=TICKS, yticks=TICKS)
        ax.tick_params(labelsize=7)
        if curve is None:
            ax.set_title(f"{label}\nno AUC", fontsize=9)
            side = "positives" if n_pos == 0 else "negatives"
            ax.text(0.5, 0.5, f"skipped:\nno {side}", ha="center", va="center", color=GREY)
            continue
        ax.plot(*curve, color=BLUE, linewidth=1.5)
        ax.set_title(f"{label}\nAUC = {auc:.3f} (n+ = {n_pos})", fontsize=9)
    for i, ax in enumerate(axes.ravel()[: len(labels)]):
        if i + columns >= len(labels):  # lowest panel of its column
            ax.set_xlabel("false positive rate", fontsize=8)
        if i % columns == 0:
            ax.set_ylabel("true positive rate", fontsize=8)
    figure.suptitle(
        f"ROC curves per pathology ({len(y_true):,} images, macro AUC = {macro_auc(aucs):.3f})"
    )
    figure.tight_layout()
    return save_figure(figure, path)


def plot_mc_histogram(samples: np.ndarray, label: str, image_name: str, path: Path) -> Path:
    """Histogram of the T MC-dropout probabilities of one image's class, mean and +-1 std marked.

    Args:
        samples: (T,) probabilities of `label` from T stochastic forward passes.
        label: the pathology the samples belong to (usually the image's top class).
        image_name: image file name, for the title.
        path: PNG file to write.
    """
    samples = np.asarray(samples, dtype=float)
    if samples.ndim != 1 or samples.size < 2:
        raise ValueError(f"samples must be (T,) with T >= 2, got {samples.shape}")
    mean, std = samples.mean(), samples.std()
    figure = new_figure((6, 3.8))
    ax = figure.subplots()
    ax.hist(samples, bins=np.linspace(0, 1, 41), color=BLUE, alpha=0.8, edgecolor="white")
    ax.axvspan(mean - std, mean + std, color=VERMILLION, alpha=0.15, label=f"± std = {std:.3f}")
    ax.axvline(mean, color=VERMILLION, linewidth=2, label=f"mean = {mean:.3f}")
    ax.set(xlim=(0, 1), xlabel=f"P({label})", ylabel="MC-dropout samples")
    ax.set_title(f"{image_name}: {label}, T = {samples.size} stochastic passes")
    ax.legend(loc="upper left")
    return save_figure(figure, path)


def plot_prediction_grid(
    images: np.ndarray,
    true_labels: list[list[str]],
    means: np.ndarray,
    stds: np.ndarray,
    path: Path,
    top: int = 3,
) -> Path:
    """Radiographs with their true labels and top predictions as "p = 0.82 ± 0.05".

    A predicted pathology that is among the image's true labels is printed in bold.

    Args:
        images: (N, H, W) uint8 radiographs.
        true_labels: per image, the names of its positive pathologies (empty for No Finding).
        means: (N, 14) mean MC-dropout probabilities, LABELS order.
        stds: (N, 14) their standard deviations.
        path: PNG file to write.
        top: how many of the most probable pathologies to list per image.
    """
    means, stds = np.asarray(means, dtype=float), np.asarray(stds, dtype=float)
    n_images = len(images)
    if np.ndim(images) != 3 or len(true_labels) != n_images:
        raise ValueError("images must be (N, H, W) with one true-label list per image")
    if means.shape != (n_images, len(LABELS)) or stds.shape != means.shape:
        raise ValueError(f"means and stds must be ({n_images}, {len(LABELS)})")
    columns = min(n_images, 4)
    rows = int(np.ceil(n_images / columns))
    figure = new_figure((3.4 * columns, 4.6 * rows))
    axes = figure.subplots(rows, columns, squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, image, truth, mean, std in zip(
        axes.ravel(), images, true_labels, means, stds, strict=False
    ):
        ax.imshow(image, cmap="gray", vmin=0, vmax=255)
        ax.set_title("true: " + (" | ".join(truth) or "No Finding"), fontsize=8, wrap=True)
        for line, c in enumerate(np.argsort(-mean, kind="stable")[:top]):
            ax.text(
                0.0,
                -0.04 - 0.08 * line,
                f"{LABELS[c]}  p = {mean[c]:.2f} ± {std[c]:.2f}",
                transform=ax.transAxes,
                va="top",
                fontsize=8,
                fontweight="bold" if LABELS[c] in truth else "normal",
            )
    figure.suptitle(f"Top-{top} predictions (bold: a true label)")
    figure.tight_layout()
    return save_figure(figure, path)


def _ece(bins: dict) -> float:
    """Expected calibration error from reliability bins (count-weighted mean gap)."""
    counts = np.asarray(bins["counts"], dtype=float)
    gaps = np.abs(np.asarray(bins["frequency"], float) - np.asarray(bins["confidence"], float))
    filled = counts > 0
    return float(np.sum(counts[filled] * gaps[filled]) / counts.sum())


def plot_reliability(bins_before: dict, path: Path, bins_after: dict | None = None) -> Path:
    """Reliability diagram (observed frequency vs confidence) over a histogram of bin counts.

    Args:
        bins_before: `reliability_bins` output of the model's probabilities (before scaling).
        path: PNG file to write.
        bins_after: the same after temperature scaling, drawn alongside when given.
    """
    first = "model" if bins_after is None else "before temperature scaling"
    series = [(first, bins_before, VERMILLION, "o")]
    if bins_after is not None:
        series.append(("after temperature scaling", bins_after, BLUE, "s"))
    figure = new_figure((6, 7))
    top, bottom = figure.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    top.plot([0, 1], [0, 1], linestyle="--", color=GREY, label="perfect calibration")
    width = 1.0 / len(bins_before["centers"])
    for offset, (name, bins, colour, marker) in enumerate(series):
        filled = np.asarray(bins["counts"]) > 0
        top.plot(
            np.asarray(bins["confidence"])[filled],
            np.asarray(bins["frequency"])[filled],
            marker=marker,
            color=colour,
            label=f"{name} (ECE = {_ece(bins):.3f})",
        )
        shift = (offset - (len(series) - 1) / 2) * width / len(series)
        bottom.bar(
            np.asarray(bins["centers"]) + shift,
            bins["counts"],
            width=width / len(series),
            color=colour,
            alpha=0.8,
        )
    top.set(xlim=(0, 1), ylim=(0, 1), ylabel="observed positive frequency")
    top.set_title("Reliability diagram (all image-class pairs)")
    top.legend(loc="upper left")
    bottom.set(yscale="log", xlabel="predicted probability", ylabel="predictions per bin")
    figure.tight_layout()
    return save_figure(figure, path)


def plot_referral_curve(curve: dict, path: Path) -> Path:
    """Macro AUC on the retained images against the percentage referred for review.

    Args:
        curve: `referral_curve` output (`fraction_referred`, `macro_auc`, `n_retained`).
        path: PNG file to write.
    """
    percent = 100.0 * np.asarray(curve["fraction_referred"], dtype=float)
    auc = np.asarray(curve["macro_auc"], dtype=float)
    figure = new_figure((6, 4))
    ax = figure.subplots()
    ax.axhline(auc[0], color=GREY, linestyle="--", linewidth=1, label="no referral")
    ax.plot(percent, auc, marker="o", color=BLUE, label="retained images")
    ax.annotate(
        f"{auc[-1]:.3f} on {curve['n_retained'][-1]:,} images",
        (percent[-1], auc[-1]),
        textcoords="offset points",
        xytext=(-6, 8),
        ha="right",
        va="bottom",
        fontsize=8,
    )
    ax.margins(y=0.15)
    ax.set(xlabel="most uncertain images referred (%)", ylabel="macro ROC-AUC")
    ax.set_title("Referral: AUC on the images the model keeps")
    ax.legend(loc="best")  # clear of the curve, whichever way it goes
    return save_figure(figure, path)


def plot_forest(table: dict[str, np.ndarray], names: Sequence[str], path: Path) -> Path:
    """AUC with its interval on two data sets, one row per finding: a forest plot.

    Args:
        table: (R,) arrays `auc_a`, `ci_low_a`, `ci_high_a`, `auc_b`, `ci_low_b`, `ci_high_b`
            (NaN where undefined), one entry per row, top row first.
        names: the R row names, then the two sets' names (R + 2 strings).
        path: PNG file to write.
    """
    rows, (name_a, name_b) = list(names[:-2]), names[-2:]
    y = np.arange(len(rows))[::-1].astype(float)
    figure = new_figure((7.0, 0.42 * len(rows) + 1.4))
    ax = figure.subplots()
    for side, name, colour, shift, marker in (
        ("a", name_a, BLUE, 0.14, "o"),
        ("b", name_b, VERMILLION, -0.14, "s"),
    ):
        auc = table[f"auc_{side}"]
        low, high = table[f"ci_low_{side}"], table[f"ci_high_{side}"]
        errors = np.vstack([auc - low, high - auc])
        ax.errorbar(auc, y + shift, xerr=np.nan_to_num(errors), fmt=marker, color=colour,
                    markersize=5, capsize=2, linewidth=1.2, label=name)  # fmt: skip
    ax.axvline(0.5, color=GREY, linestyle="--", linewidth=0.8)
    ax.set(yticks=y, ylim=(-0.7, len(rows) - 0.3), xlabel="ROC-AUC (95 % patient-bootstrap CI)")
    ax.set_yticklabels(rows, fontsize=9)
    ax.set_xlim(min(0.4, float(np.nanmin([table["ci_low_a"], table["ci_low_b"]]) - 0.02)), 1.0)
    ax.grid(axis="x", color="#e0e0e0", linewidth=0.6)
    # above the axes: inside, it would cover whatever row has low AUCs
    ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=2, fontsize=8, frameon=False)
    return save_figure(figure, path)
