"""Calibration metrics of multi-label probabilities: ECE, Brier, NLL and reliability bins.

Each of the C outputs is its own binary problem (sigmoid, not softmax), so "confidence" here is the
predicted probability of the positive class and "accuracy" the observed positive frequency. With
`axis=None` the metrics pool all image-class pairs (flattened); with `axis=0` they are per class.
A NaN label (unknown: the image's dataset does not report that finding) is left out.
"""

from __future__ import annotations

import numpy as np


def _check_probs(y_true: np.ndarray, y_prob: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Validate same-shape 0/1/NaN labels and probabilities in [0, 1]; return both as float."""
    y = np.asarray(y_true, dtype=float)
    p = np.asarray(y_prob, dtype=float)
    if y.shape != p.shape or y.size == 0:
        raise ValueError(f"y_true {y.shape} and y_prob {p.shape} must share one non-empty shape")
    if not (np.isnan(y) | np.isin(y, (0.0, 1.0))).all():
        raise ValueError("y_true must hold only 0 and 1 (or NaN: unknown)")
    if not ((p >= 0.0) & (p <= 1.0)).all():
        raise ValueError("y_prob must be probabilities in [0, 1]")
    return y, p


def reliability_bins(y_true: np.ndarray, y_prob: np.ndarray, n_bins: int = 15) -> dict:
    """Equal-width bins over [0, 1] of all (flattened) predictions, for a reliability diagram.

    Args:
        y_true: 0/1 ground truth, any shape (e.g. (N, C)).
        y_prob: predicted probabilities, same shape.
        n_bins: number of equal-width bins; bin k holds [k/n, (k+1)/n), the last one includes 1.

    Returns:
        dict of (n_bins,) arrays: `centers`, `confidence` (mean predicted probability),
        `frequency` (observed positive rate) - both NaN in empty bins - and `counts`.
    """
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    y, p = _check_probs(y_true, y_prob)
    known = ~np.isnan(y.ravel())
    y, p = y.ravel()[known], p.ravel()[known]
    index = np.minimum((p * n_bins).astype(int), n_bins - 1)
    counts = np.bincount(index, minlength=n_bins)
    filled = counts > 0
    safe = np.where(filled, counts, 1)
    confidence = np.bincount(index, weights=p, minlength=n_bins) / safe
    frequency = np.bincount(index, weights=y, minlength=n_bins) / safe
    return {
        "centers": (np.arange(n_bins) + 0.5) / n_bins,
        "confidence": np.where(filled, confidence, np.nan),
        "frequency": np.where(filled, frequency, np.nan),
        "counts": counts,
    }


def expected_calibration_error(
    y_true: np.ndarray, y_prob: np.ndarray, n_bins: int = 15, axis: int | None = None
) -> float | np.ndarray:
    """Expected calibration error: count-weighted mean of |observed frequency - confidence|.

    Args:
        y_true: (N, C) 0/1 ground truth.
        y_prob: (N, C) predicted probabilities.
        n_bins: equal-width bins over [0, 1] (15 is the common choice in the literature).
        axis: None pools all image-class pairs into one ECE; 0 gives one ECE per class (C,).
    """
    if axis not in (None, 0):
        raise ValueError(f"axis must be None or 0, got {axis}")
    if axis == 0:
        y, p = np.asarray(y_true), np.asarray(y_prob)
        if y.ndim != 2:
            raise ValueError(f"axis=0 needs (N, C) arrays, got {y.shape}")
        return np.array(
            [expected_calibration_error(y[:, c], p[:, c], n_bins) for c in range(y.shape[1])]
        )
    bins = reliability_bins(y_true, y_prob, n_bins)
    gaps = np.abs(bins["frequency"] - bins["confidence"])
    filled = bins["counts"] > 0
    if not filled.any():
        return float("nan")  # no known label
    return float(np.sum(bins["counts"][filled] * gaps[filled]) / bins["counts"].sum())


def _known_mean(values: np.ndarray, axis: int | None) -> float | np.ndarray:
    """Mean over the non-NaN entries (NaN where there are none), without warnings."""
    known = ~np.isnan(values)
    total = np.where(known, values, 0.0).sum(axis=axis)
    count = known.sum(axis=axis)
    mean = np.where(count > 0, total / np.maximum(count, 1), np.nan)
    return float(mean) if axis is None else mean


def brier_score(
    y_true: np.ndarray, y_prob: np.ndarray, axis: int | None = None
) -> float | np.ndarray:
    """Mean squared difference between probability and outcome (0 is perfect, 0.25 is p = 0.5).

    Args:
        y_true: (N, C) 0/1 ground truth.
        y_prob: (N, C) predicted probabilities.
        axis: None averages over all elements; 0 gives one score per class.
    """
    y, p = _check_probs(y_true, y_prob)
    return _known_mean((p - y) ** 2, axis)


def nll(
    y_true: np.ndarray, y_prob: np.ndarray, eps: float = 1e-7, axis: int | None = None
) -> float | np.ndarray:
    """Mean binary cross-entropy (negative log-likelihood) of probabilities.

    Args:
        y_true: 0/1 ground truth.
        y_prob: predicted probabilities, same shape.
        eps: probabilities are clipped to [eps, 1 - eps] so that one confident mistake is large
            but finite.
        axis: None averages over all elements; 0 gives one value per class.
    """
    y, p = _check_probs(y_true, y_prob)
    p = np.clip(p, eps, 1.0 - eps)
    return _known_mean(-(y * np.log(p) + (1.0 - y) * np.log1p(-p)), axis)


def calibration_summary(y_true: np.ndarray, y_prob: np.ndarray) -> dict[str, float]:
    """Pooled ECE (15 bins), Brier score and NLL of (N, C) probabilities, for metrics.json."""
    return {
        "ECE": expected_calibration_error(y_true, y_prob),
        "Brier": brier_score(y_true, y_prob),
        "NLL": nll(y_true, y_prob),
    }
