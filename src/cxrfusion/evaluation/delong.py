"""DeLong's test for two correlated ROC-AUCs, and Holm's correction for testing many classes.

The fast algorithm of Sun & Xu (2014, IEEE Signal Processing Letters 21(11)) computes DeLong's
structural components from midranks in O(N log N) instead of comparing every positive with every
negative.
"""

from __future__ import annotations

import numpy as np
from scipy.stats import norm, rankdata


def _structural_components(
    y_true: np.ndarray, scores: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """AUCs and DeLong's structural components of K score rows on the same cases.

    Args:
        y_true: (N,) bool ground truth with at least one positive and one negative.
        scores: (K, N) scores of K models.

    Returns:
        aucs (K,); v10 (K, m): for each positive, the fraction of negatives it outranks (ties
        count one half); v01 (K, n): for each negative, the fraction of positives that outrank it.
    """
    positives, negatives = scores[:, y_true], scores[:, ~y_true]
    m, n = positives.shape[1], negatives.shape[1]
    rank_all = rankdata(np.concatenate([positives, negatives], axis=1), axis=1)
    rank_pos = rankdata(positives, axis=1)
    rank_neg = rankdata(negatives, axis=1)
    # A positive's rank among all cases minus its rank among positives = negatives below it.
    v10 = (rank_all[:, :m] - rank_pos) / n
    v01 = 1.0 - (rank_all[:, m:] - rank_neg) / m
    return v10.mean(axis=1), v10, v01


def _check_paired(y_true: np.ndarray, *probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Validate (N,) 0/1 labels and equally long finite score vectors; return bool y and (K, N)."""
    y = np.asarray(y_true)
    scores = np.asarray(probs, dtype=float)
    if y.ndim != 1 or scores.ndim != 2 or scores.shape[1] != y.shape[0]:
        raise ValueError(f"y_true {y.shape} and every score vector must be (N,) of one length")
    if not np.isin(y, (0, 1)).all():
        raise ValueError("y_true must hold only 0 and 1")
    if not np.isfinite(scores).all():
        raise ValueError("scores must be finite")
    return y.astype(bool), scores


def delong_covariance(y_true: np.ndarray, *probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """AUCs of K models on the same cases and DeLong's (K, K) covariance of those AUCs.

    Args:
        y_true: (N,) 0/1 ground truth.
        *probs: K score vectors of shape (N,), one per model, on the same cases in the same order.

    Returns:
        aucs (K,) and covariance (K, K); all NaN when there are fewer than two positives or two
        negatives (the variance needs two of each).
    """
    y, scores = _check_paired(y_true, *probs)
    k = scores.shape[0]
    if min(y.sum(), (~y).sum()) < 2:
        return np.full(k, np.nan), np.full((k, k), np.nan)
    aucs, v10, v01 = _structural_components(y, scores)
    return aucs, np.cov(v10) / v10.shape[1] + np.cov(v01) / v01.shape[1]


def delong_test(
    y_true: np.ndarray, prob_a: np.ndarray, prob_b: np.ndarray
) -> tuple[float, float, float]:
    """DeLong's two-sided test that two models have the same AUC on the same (paired) cases.

    Args:
        y_true: (N,) 0/1 ground truth.
        prob_a: (N,) scores of model A.
        prob_b: (N,) scores of model B, same cases in the same order.

    Returns:
        (auc_a, auc_b, p_value). The AUCs are NaN without positives or negatives; the p-value is
        NaN with fewer than two of either, and 1.0 when the difference has zero variance and the
        AUCs are equal (e.g. identical predictions).
    """
    y, scores = _check_paired(y_true, prob_a, prob_b)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan"), float("nan"), float("nan")
    aucs, v10, v01 = _structural_components(y, scores)
    if n_pos < 2 or n_neg < 2:
        return float(aucs[0]), float(aucs[1]), float("nan")
    # Variance of the difference from the differenced components: exactly 0 for identical inputs.
    variance = np.var(v10[0] - v10[1], ddof=1) / n_pos + np.var(v01[0] - v01[1], ddof=1) / n_neg
    difference = aucs[0] - aucs[1]
    if variance <= 0.0:
        p_value = 1.0 if difference == 0.0 else 0.0
    else:
        p_value = float(2.0 * norm.sf(abs(difference) / np.sqrt(variance)))
    return float(aucs[0]), float(aucs[1]), p_value


def holm(p_values: np.ndarray) -> np.ndarray:
    """Holm-Bonferroni adjusted p-values (step-down, monotone, capped at 1).

    Args:
        p_values: raw p-values, e.g. one DeLong test per class; NaNs (untestable classes) stay NaN
            and do not count among the tests.
    """
    p = np.asarray(p_values, dtype=float)
    adjusted = np.full_like(p, np.nan)
    tested = np.flatnonzero(~np.isnan(p))
    order = tested[np.argsort(p[tested], kind="stable")]
    m = order.size
    steps = (m - np.arange(m)) * p[order]
    adjusted[order] = np.minimum(np.maximum.accumulate(steps), 1.0)
    return adjusted
