"""The training figure: loss and validation AUC per epoch (the report's Figure 6)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from cxrfusion.plotting import new_figure, save_figure


def plot_loss_curves(history: pd.DataFrame, path: Path) -> Path:
    """Training and validation loss, and validation macro AUC, per epoch (the report's Figure 6).

    Args:
        history: metrics.csv rows (`epoch`, `train_loss`, `val_loss`, `val_auc_macro`, `phase`);
            missing columns are left out of the figure.
        path: PNG file to write.
    """
    figure = new_figure((11, 4))
    loss_ax, auc_ax = figure.subplots(1, 2)
    for column, label in (("train_loss", "training"), ("val_loss", "validation")):
        if column in history:
            loss_ax.plot(history["epoch"] + 1, history[column], marker="o", label=label)
    loss_ax.set(xlabel="epoch", ylabel="loss", title="Loss")
    loss_ax.legend()
    if "val_auc_macro" in history:
        auc_ax.plot(history["epoch"] + 1, history["val_auc_macro"], marker="o", color="C2")
    auc_ax.set(xlabel="epoch", ylabel="macro ROC-AUC", title="Validation macro ROC-AUC")
    if "phase" in history and (history["phase"] == 2).any() and (history["phase"] == 1).any():
        switch = history.loc[history["phase"] == 2, "epoch"].min() + 0.5
        for ax in (loss_ax, auc_ax):
            ax.axvline(switch, color="grey", linestyle="--", linewidth=1)
            ax.text(switch, ax.get_ylim()[1], " phase 2", va="top", fontsize=8, color="grey")
    return save_figure(figure, path)
