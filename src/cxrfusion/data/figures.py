"""The data figures of the report: label distribution (Figure 1) and sample radiographs (Figure 2)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from cxrfusion.labels import LABELS
from cxrfusion.plotting import new_figure, save_figure

SPLIT_COLOURS = {"train": "#4c72b0", "val": "#dd8452", "test": "#55a868"}


def plot_label_distribution(split: pd.DataFrame, path: Path) -> Path:
    """Images per pathology and split (plus No Finding), most frequent first."""
    counts = split.groupby("split")[list(LABELS)].sum().T
    counts.loc["No Finding"] = (
        split.assign(none=split[list(LABELS)].sum(axis=1) == 0).groupby("split")["none"].sum()
    )
    counts = counts[[s for s in ("train", "val", "test") if s in counts.columns]]
    counts = counts.loc[counts.sum(axis=1).sort_values().index]
    figure = new_figure((8, 6))
    ax = figure.subplots()
    left = np.zeros(len(counts))
    for name in counts.columns:
        ax.barh(counts.index, counts[name], left=left, color=SPLIT_COLOURS[name], label=name)
        left += counts[name].to_numpy()
    ax.legend()
    ax.set_xlabel("images")
    ax.set_title(
        f"Label distribution ({len(split):,} images, {split['Patient ID'].nunique():,} patients)"
    )
    for y, total in enumerate(counts.sum(axis=1)):
        ax.text(total, y, f" {int(total):,}", va="center", fontsize=8)
    return save_figure(figure, path)


def plot_sample_grid(images: np.ndarray, labels: list[str], path: Path, columns: int = 4) -> Path:
    """A grid of radiographs titled with their labels."""
    rows = int(np.ceil(len(images) / columns))
    figure = new_figure((3 * columns, 3.3 * rows))
    axes = figure.subplots(rows, columns)
    for ax in np.ravel(axes):
        ax.axis("off")
    for ax, image, text in zip(np.ravel(axes), images, labels, strict=False):
        ax.imshow(image, cmap="gray", vmin=0, vmax=255)
        ax.set_title(text, fontsize=8, wrap=True)
    return save_figure(figure, path)


def findings_text(row: pd.Series) -> str:
    """`Effusion | Mass` style text of a split row's positive labels, or No Finding."""
    positives = [name for name in LABELS if row[name] == 1]  # NaN (unknown) is not a finding
    return " | ".join(positives) if positives else "No Finding"
