"""DeLong's test for two correlated ROC-AUCs, its patient-clustered form, and Holm's correction.

The fast algorithm of Sun & Xu (2014, IEEE Signal Processing Letters 21(11)) computes DeLong's
structural components from midranks in O(N log N) instead of comparing every positive with every
negative. DeLong's variance treats images as independent; several radiographs of one patient are
not, so `clustered_delong_test` sums the components per patient (Obuchowski 1997, Biometrics
53(2):567-578), which reduces exactly to DeLong's test when every patient has one image.
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
    return float(aucs[0]), float(aucs[1]), _two_sided_p(difference, variance)


def _two_sided_p(difference: float, variance: float) -> float:
    """Normal two-sided p-value; with zero variance 1.0 for no difference, else 0.0."""
    if variance <= 0.0:
        return 1.0 if difference == 0.0 else 0.0
    return float(2.0 * norm.sf(abs(difference) / np.sqrt(variance)))


def clustered_auc_variance(
    y_true: np.ndarray, v10: np.ndarray, v01: np.ndarray, theta: float, cluster: np.ndarray
) -> float:
    """Obuchowski's (1997) variance of an AUC (or AUC difference) from clustered components.

    Args:
        y_true: (N,) bool ground truth.
        v10: (m,) structural components of the positives (in the order of `y_true`'s positives).
        v01: (n,) components of the negatives.
        theta: the AUC (or difference) the components average to.
        cluster: (N,) integer cluster (patient) index 0..I-1 of each image.

    Returns:
        The variance; NaN with fewer than two clusters holding positives or negatives.
    """
    n_clusters = int(cluster.max()) + 1
    m_i = np.bincount(cluster[y_true], minlength=n_clusters)
    n_i = np.bincount(cluster[~y_true], minlength=n_clusters)
    i1, i0 = int((m_i > 0).sum()), int((n_i > 0).sum())
    if i1 < 2 or i0 < 2:
        return float("nan")
    m, n = int(m_i.sum()), int(n_i.sum())
    d10 = np.bincount(cluster[y_true], weights=v10, minlength=n_clusters) - m_i * theta
    d01 = np.bincount(cluster[~y_true], weights=v01, minlength=n_clusters) - n_i * theta
    s10 = i1 / ((i1 - 1) * m) * np.sum(d10**2)
    s01 = i0 / ((i0 - 1) * n) * np.sum(d01**2)
    s11 = n_clusters / (n_clusters - 1) * np.sum(d10 * d01)
    return float(s10 / m + s01 / n + 2.0 * s11 / (m * n))


def clustered_delong_test(
    y_true: np.ndarray, prob_a: np.ndarray, prob_b: np.ndarray, groups: np.ndarray
) -> dict[str, float]:
    """Two-sided test that two models have the same AUC on paired, patient-clustered images.

    Obuchowski's (1997) nonparametric clustered ROC analysis applied to the difference of the
    two models' structural components: images of a patient may be correlated, patients are not.

    Args:
        y_true: (N,) 0/1 ground truth.
        prob_a: (N,) scores of model A.
        prob_b: (N,) scores of model B, same images in the same order.
        groups: (N,) patient id of each image.

    Returns:
        `auc_a`, `auc_b`, `difference` (a - b), `se` (its standard error) and `p_value`. The
        AUCs are NaN without positives or negatives; `se` and `p_value` are also NaN when fewer
        than two patients have a positive (or a negative) image; p is 1.0 when the difference
        has zero variance and is zero.
    """
    y, scores = _check_paired(y_true, prob_a, prob_b)
    groups = np.asarray(groups)
    if groups.shape != y.shape:
        raise ValueError(f"groups must hold one patient id per image ({len(y)})")
    nan = float("nan")
    if y.all() or not y.any():
        return {"auc_a": nan, "auc_b": nan, "difference": nan, "se": nan, "p_value": nan}
    aucs, v10, v01 = _structural_components(y, scores)
    _, cluster = np.unique(groups, return_inverse=True)
    difference = float(aucs[0] - aucs[1])
    variance = clustered_auc_variance(y, v10[0] - v10[1], v01[0] - v01[1], difference, cluster)
    untestable = np.isnan(variance)
    return {
        "auc_a": float(aucs[0]),
        "auc_b": float(aucs[1]),
        "difference": difference,
        "se": nan if untestable else float(np.sqrt(max(variance, 0.0))),
        "p_value": nan if untestable else _two_sided_p(difference, variance),
    }


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
