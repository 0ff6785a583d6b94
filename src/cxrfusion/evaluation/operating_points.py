"""Operating points: thresholds chosen on the validation split, sensitivity and specificity on another.

A threshold picked on the split it is reported on flatters it; so each class's thresholds come
from validation and are then applied, unchanged, to the evaluated split. Two rules: Youden's J
(maximal sensitivity + specificity - 1) and the highest threshold that still reaches a target
sensitivity (90 % by default, a screening-style operating point). A case is positive when its
probability is at or above the threshold.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sklearn.metrics import roc_curve

from cxrfusion.evaluation.metrics import json_number
from cxrfusion.labels import LABELS

TARGET_SENSITIVITY = 0.9


def choose_thresholds(
    y_true: np.ndarray, y_prob: np.ndarray, target_sensitivity: float = TARGET_SENSITIVITY
) -> dict[str, float]:
    """Youden's and the target-sensitivity threshold of one class.

    Args:
        y_true: (N,) 0/1 validation truth.
        y_prob: (N,) validation probabilities.
        target_sensitivity: the sensitivity the second threshold must reach, in (0, 1].

    Returns:
        {"youden": t, "sensitivity": t}; NaN for both without positives or negatives.
    """
    y = np.asarray(y_true).astype(bool)
    if y.all() or not y.any():
        return {"youden": np.nan, "sensitivity": np.nan}
    fpr, tpr, thresholds = roc_curve(y, y_prob)
    # roc_curve's first threshold is +inf (nothing positive): never an operating point.
    fpr, tpr, thresholds = fpr[1:], tpr[1:], thresholds[1:]
    youden = thresholds[int(np.argmax(tpr - fpr))]
    reaching = np.flatnonzero(tpr >= target_sensitivity - 1e-12)
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
        chosen = choose_thresholds(y_val[:, c], p_val[:, c], target_sensitivity)
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
            sens, spec = sensitivity_specificity(y_true[:, c], y_prob[:, c], threshold)
            val_sens, val_spec = sensitivity_specificity(y_val[:, c], p_val[:, c], threshold)
            points[name] = {
                "threshold": float(threshold),
                "sensitivity": json_number(sens),
                "specificity": json_number(spec),
                "val_sensitivity": json_number(val_sens),
                "val_specificity": json_number(val_spec),
            }
        classes[label] = points
    return {"target_sensitivity": target_sensitivity, "classes": classes}
