"""Operating points: thresholds chosen on the validation split, sensitivity and specificity on another.

A threshold picked on the split it is reported on flatters it; so each class's thresholds come
from validation and are then applied, unchanged, to the evaluated split. Two rules: Youden's J
(maximal sensitivity + specificity - 1) and the highest threshold that still reaches a target
sensitivity (90 % by default, a screening-style operating point). A case is positive when its
probability is at or above the threshold.

Both rules search every distinct validation score with exact integer counts: an ROC curve thinned
to its corners (`roc_curve`'s default) hides thresholds inside runs of positives, and J computed as
`tpr - fpr` in floating point breaks exact ties by rounding noise.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from cxrfusion.labels import LABELS
from cxrfusion.stats.metrics import json_number

TARGET_SENSITIVITY = 0.9


def _threshold_counts(
    y_true: np.ndarray, y_prob: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every distinct score as a threshold, highest first, with the exact counts it gives.

    Returns:
        (thresholds, true positives, false positives): int64 counts of cases >= each threshold.
    """
    y = np.asarray(y_true).astype(bool)
    p = np.asarray(y_prob, dtype=float)
    thresholds = np.unique(p)[::-1]
    tp = y.sum() - np.searchsorted(np.sort(p[y]), thresholds, side="left")
    fp = (~y).sum() - np.searchsorted(np.sort(p[~y]), thresholds, side="left")
    return thresholds, tp.astype(np.int64), fp.astype(np.int64)


def choose_thresholds(
    y_true: np.ndarray, y_prob: np.ndarray, target_sensitivity: float = TARGET_SENSITIVITY
) -> dict[str, float]:
    """Youden's and the target-sensitivity threshold of one class.

    Youden's J = tp/P - fp/N is compared as the integer tp*N - fp*P; among exact ties the
    highest threshold wins (the fewest positive calls).

    Args:
        y_true: (N,) 0/1 validation truth.
        y_prob: (N,) validation probabilities.
        target_sensitivity: the sensitivity the second threshold must reach, in (0, 1].

    Returns:
        {"youden": t, "sensitivity": t}; NaN for both without positives or negatives.
    """
    y = np.asarray(y_true).astype(bool)
    if y.size == 0 or y.all() or not y.any():
        return {"youden": np.nan, "sensitivity": np.nan}
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    thresholds, tp, fp = _threshold_counts(y, y_prob)
    youden = thresholds[int(np.argmax(tp * n_neg - fp * n_pos))]  # argmax: first = highest
    reaching = np.flatnonzero(tp / n_pos >= target_sensitivity - 1e-12)
    return {"youden": float(youden), "sensitivity": float(thresholds[reaching[0]])}


def sensitivity_specificity(
    y_true: np.ndarray, y_prob: np.ndarray, threshold: float
) -> tuple[float, float]:
    """(sensitivity, specificity) of `y_prob >= threshold`; NaN for a side without cases."""
    y = np.asarray(y_true).astype(bool)
    called = np.asarray(y_prob) >= threshold
    sensitivity = called[y].mean() if y.any() else np.nan
    specificity = (~called[~y]).mean() if (~y).any() else np.nan
    return float(sensitivity), float(specificity)


def operating_points(
    y_val: np.ndarray,
    p_val: np.ndarray,
    y_true: np.ndarray,
    y_prob: np.ndarray,
    labels: Sequence[str] = LABELS,
    target_sensitivity: float = TARGET_SENSITIVITY,
) -> dict:
    """Per class: the validation thresholds and the sensitivity/specificity they give.

    Args:
        y_val, p_val: (M, C) validation truth and probabilities (the thresholds' source).
        y_true, y_prob: (N, C) truth and probabilities of the evaluated split.
        labels: one name per column.
        target_sensitivity: the sensitivity the second rule reaches on validation.

    Returns:
        JSON-ready {"target_sensitivity", "classes": {label: {"youden": {...},
        "sensitivity_target": {...}}}}, each point with `threshold`, `sensitivity`,
        `specificity` (evaluated split) and `val_sensitivity`, `val_specificity`; null where
        undefined.
    """
    classes = {}
    for c, label in enumerate(labels):
        # Each class on its known labels only (NaN: the dataset does not report it).
        val_known, known = ~np.isnan(y_val[:, c]), ~np.isnan(y_true[:, c])
        yv, pv = y_val[val_known, c], p_val[val_known, c]
        yt, pt = y_true[known, c], y_prob[known, c]
        chosen = choose_thresholds(yv, pv, target_sensitivity)
        points = {}
        for name, key in (("youden", "youden"), ("sensitivity_target", "sensitivity")):
            threshold = chosen[key]
            if np.isnan(threshold):
                points[name] = dict.fromkeys(
                    (
                        "threshold",
                        "sensitivity",
                        "specificity",
                        "val_sensitivity",
                        "val_specificity",
                    )  # fmt: skip
                )
                continue
            sens, spec = sensitivity_specificity(yt, pt, threshold)
            val_sens, val_spec = sensitivity_specificity(yv, pv, threshold)
            points[name] = {
                "threshold": float(threshold),
                "sensitivity": json_number(sens),
                "specificity": json_number(spec),
                "val_sensitivity": json_number(val_sens),
                "val_specificity": json_number(val_spec),
            }
        classes[label] = points
    return {"target_sensitivity": target_sensitivity, "classes": classes}
