"""Per-class ROC-AUC and AUPRC, macro AUC and patient-level bootstrap intervals and tests.

Honest numbers: a class without positives (or without negatives) has no AUC (NaN, never 0) and is left
out of the macro mean, so it can never lower it; confidence intervals resample *patients*, because the
images of one patient are not independent cases. A NaN label (a finding the image's dataset does not
report) is left out of its class: a class is scored on its known labels only.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence

import numpy as np
from sklearn.metrics import average_precision_score, roc_curve

from cxrfusion.labels import LABELS

logger = logging.getLogger(__name__)


def _check_scores(y_true: np.ndarray, y_prob: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Validate an (N, C) pair of 0/1/NaN labels and finite scores; return both as float."""
    y = np.asarray(y_true, dtype=float)
    p = np.asarray(y_prob, dtype=float)
    if y.ndim != 2 or y.shape != p.shape or y.size == 0:
        raise ValueError(
            f"y_true {y.shape} and y_prob {p.shape} must share one non-empty (N, C) shape"
        )
    if not (np.isnan(y) | np.isin(y, (0, 1))).all():
        raise ValueError("y_true must hold only 0 and 1 (or NaN: unknown)")
    if not np.isfinite(p).all():
        raise ValueError("y_prob must be finite")
    return y, p


class _SortedScores:
    """One data set sorted once per class, so that the AUC of any reweighting of its images is cheap.

    A bootstrap resample is a reweighting (weight = how often an image was drawn), so the sort and
    the tie groups are computed here once and each resample costs one `bincount` over N*C entries.
    The AUC is the Mann-Whitney statistic with ties counted one half (what midranks give).
    A NaN label is counted in a slot past the last group, which no class reads.
    """

    def __init__(self, y_true: np.ndarray, y_prob: np.ndarray) -> None:
        n_images, n_classes = y_prob.shape
        order = np.argsort(y_prob, axis=0, kind="stable")
        sorted_prob = np.take_along_axis(y_prob, order, axis=0)
        starts_group = np.ones_like(sorted_prob, dtype=bool)
        starts_group[1:] = sorted_prob[1:] != sorted_prob[:-1]
        # Class-major flattening numbers the tie groups of class c after those of class c - 1.
        group = np.cumsum(starts_group.T.ravel()) - 1
        label = np.take_along_axis(y_true, order, axis=0).T.ravel()
        self.image = order.T.ravel()
        self.n_groups = int(group[-1]) + 1
        known = ~np.isnan(label)
        self.key = np.where(known, 2 * group + np.nan_to_num(label), 2 * self.n_groups)
        self.key = self.key.astype(np.int64)
        self.first_group = group[::n_images]
        self.class_of_group = np.repeat(
            np.arange(n_classes), np.diff(np.append(self.first_group, self.n_groups))
        )

    def auc(self, weights: np.ndarray) -> np.ndarray:
        """Per-class AUC with image i counted `weights[i]` times; NaN where a class lacks either side."""
        counts = np.bincount(self.key, weights=weights[self.image], minlength=2 * self.n_groups + 1)
        neg, pos = counts[0 : 2 * self.n_groups : 2], counts[1 : 2 * self.n_groups : 2]
        below = np.cumsum(neg) - neg
        below -= below[self.first_group][self.class_of_group]
        wins = np.add.reduceat(pos * (below + 0.5 * neg), self.first_group)
        n_pos = np.add.reduceat(pos, self.first_group)
        n_neg = np.add.reduceat(neg, self.first_group)
        defined = (n_pos > 0) & (n_neg > 0)
        return np.where(defined, wins / np.where(defined, n_pos * n_neg, 1.0), np.nan)


def per_class_auc(
    y_true: np.ndarray, y_prob: np.ndarray, sample_weight: np.ndarray | None = None
) -> np.ndarray:
    """ROC-AUC of each class (equal to `sklearn.metrics.roc_auc_score`, ties included).

    Args:
        y_true: (N, C) 0/1 ground truth; NaN where unknown (left out of its class).
        y_prob: (N, C) scores; any monotone score works (probabilities or logits).
        sample_weight: (N,) non-negative weight of each image, e.g. how often a bootstrap drew it;
            None counts every image once.

    Returns:
        (C,) AUCs; NaN for a class with no positives or no negatives among its known labels.
    """
    y, p = _check_scores(y_true, y_prob)
    weights = np.ones(len(y)) if sample_weight is None else np.asarray(sample_weight, dtype=float)
    if weights.shape != (len(y),) or (weights < 0).any():
        raise ValueError(f"sample_weight must be {len(y)} non-negative numbers")
    return _SortedScores(y, p).auc(weights)


def per_class_average_precision(y_true: np.ndarray, y_prob: np.ndarray) -> np.ndarray:
    """AUPRC (average precision, sklearn's step-wise sum) of each class.

    Its chance level is the class prevalence, not 0.5: report the two side by side.

    Returns:
        (C,) values; NaN for a class with no positives (precision is undefined).
    """
    y, p = _check_scores(y_true, y_prob)
    values = []
    for c in range(y.shape[1]):
        known = ~np.isnan(y[:, c])
        positive = y[known, c] == 1
        values.append(average_precision_score(positive, p[known, c]) if positive.any() else np.nan)
    return np.array(values)


def macro_auc(aucs: np.ndarray) -> float:
    """Mean of the defined per-class AUCs: a NaN class (no positives) never lowers it.

    Returns NaN when no class is defined.
    """
    aucs = np.asarray(aucs, dtype=float)
    defined = aucs[~np.isnan(aucs)]
    return float(defined.mean()) if defined.size else float("nan")


def _percentile_interval(samples: np.ndarray, level: float) -> tuple[float, float, int]:
    """Percentile interval of the non-NaN bootstrap samples, and how many there were."""
    valid = samples[~np.isnan(samples)]
    if valid.size == 0:
        return float("nan"), float("nan"), 0
    tail = 50.0 * (1.0 - level)
    low, high = np.percentile(valid, [tail, 100.0 - tail])
    return float(low), float(high), int(valid.size)


def bootstrap_auc_ci(
    y_true: np.ndarray,
    y_prob: np.ndarray,
    groups: np.ndarray,
    n_resamples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> dict:
    """Per-class and macro AUC with percentile confidence intervals from a patient bootstrap.

    Each resample draws patients with replacement and takes all images of every drawn patient
    (a cluster bootstrap). A resample in which a class lacks positives or negatives is skipped for
    that class; the macro AUC averages the classes defined on the full data, so a resample that
    loses one of them is skipped for the macro (its mean would estimate a different quantity).

    Args:
        y_true: (N, C) 0/1 ground truth.
        y_prob: (N, C) scores.
        groups: (N,) patient id of each image; images sharing an id are resampled together.
        n_resamples: bootstrap resamples (1000 gives stable 95 % bounds).
        seed: seed of the numpy Generator that draws the patients.
        level: coverage of the interval, in (0, 1).

    Returns:
        dict with `auc`, `ci_low`, `ci_high` ((C,) arrays), `n_valid` ((C,) resamples used per
        class), `macro_auc`, `macro_ci_low`, `macro_ci_high`, `macro_n_valid`, `n_images`,
        `n_patients`, `n_resamples`, `level`, `seed`. Undefined values are NaN.
    """
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    point, replicates = bootstrap_auc_replicates(y_true, y_prob, groups, n_resamples, seed)
    defined = ~np.isnan(point)
    columns = [_percentile_interval(replicates[:, c], level) for c in range(point.size)]
    # All-defined classes only: a NaN in any of them makes the resample's mean NaN (skipped).
    macro_low, macro_high, macro_valid = _percentile_interval(
        replicates[:, defined].mean(axis=1) if defined.any() else np.full(n_resamples, np.nan),
        level,
    )
    return {
        "auc": point,
        "ci_low": np.array([c[0] for c in columns]),
        "ci_high": np.array([c[1] for c in columns]),
        "n_valid": np.array([c[2] for c in columns]),
        "macro_auc": macro_auc(point),
        "macro_ci_low": macro_low,
        "macro_ci_high": macro_high,
        "macro_n_valid": macro_valid,
        "n_images": int(np.asarray(groups).size),
        "n_patients": len(np.unique(groups)),
        "n_resamples": n_resamples,
        "level": level,
        "seed": seed,
    }


def bootstrap_auc_replicates(
    y_true: np.ndarray, y_prob: np.ndarray, groups: np.ndarray, n_resamples: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Per-class AUC (C,) and its patient-bootstrap replicates (n_resamples, C), NaN where undefined.

    Args: as in `bootstrap_auc_ci`.
    """
    y, p = _check_scores(y_true, y_prob)
    scores = _SortedScores(y, p)
    started = time.perf_counter()
    replicates = np.array(
        [scores.auc(w) for w in _patient_draws(groups, len(y), n_resamples, seed)]
    )
    logger.debug(
        "bootstrap: %d resamples of %d images in %.2f s",
        n_resamples,
        len(y),
        time.perf_counter() - started,
    )
    return scores.auc(np.ones(len(y))), replicates


def _patient_draws(
    groups: np.ndarray, n_images: int, n_resamples: int, seed: int
) -> Iterator[np.ndarray]:
    """Per resample, how often each image was drawn when patients are drawn with replacement."""
    groups = np.asarray(groups)
    if groups.shape != (n_images,):
        raise ValueError(
            f"groups must hold one patient id per image ({n_images}), got {groups.shape}"
        )
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be >= 1, got {n_resamples}")
    _, patient = np.unique(groups, return_inverse=True)
    n_patients = int(patient.max()) + 1
    rng = np.random.default_rng(seed)
    for _ in range(n_resamples):
        drawn = np.bincount(rng.integers(0, n_patients, n_patients), minlength=n_patients)
        yield drawn[patient].astype(float)


def paired_bootstrap_auc_difference(
    y_true: np.ndarray,
    prob_a: np.ndarray,
    prob_b: np.ndarray,
    groups: np.ndarray,
    n_resamples: int = 2000,
    seed: int = 0,
    level: float = 0.95,
) -> dict:
    """AUC(A) - AUC(B) on the same images with a paired patient-cluster bootstrap.

    Each resample draws patients with replacement and scores both models on the same draw, so
    the correlation between the models and between a patient's images are both kept. The
    two-sided p-value uses the shifted null: the bootstrap differences centred on the observed
    one estimate the null distribution, and p = (1 + #{|d* - d| >= |d|}) / (1 + valid resamples).
    A resample without a positive or a negative is skipped (not counted as valid).

    Args:
        y_true: (N,) 0/1 ground truth of one class.
        prob_a: (N,) scores of model A.
        prob_b: (N,) scores of model B.
        groups: (N,) patient id of each image.
        n_resamples: bootstrap resamples.
        seed: seed of the patient draws.
        level: coverage of the percentile interval of the difference.

    Returns:
        dict with `difference`, `ci_low`, `ci_high`, `se` (bootstrap standard deviation),
        `p_value`, `n_valid`, `n_resamples`; NaN where undefined.
    """
    y = np.asarray(y_true)
    both = np.column_stack([y, y])
    scores = _SortedScores(*_check_scores(both, np.column_stack([prob_a, prob_b])))
    observed = scores.auc(np.ones(len(y)))
    difference = float(observed[0] - observed[1])
    replicates = np.array(
        [np.subtract(*scores.auc(w)) for w in _patient_draws(groups, len(y), n_resamples, seed)]
    )
    valid = replicates[~np.isnan(replicates)]
    low, high, n_valid = _percentile_interval(replicates, level)
    undefined = np.isnan(difference) or n_valid == 0
    extreme = np.abs(valid - difference) >= abs(difference) - 1e-12
    return {
        "difference": difference,
        "ci_low": low,
        "ci_high": high,
        "se": float(valid.std(ddof=1)) if n_valid > 1 else float("nan"),
        "p_value": float("nan") if undefined else float((1 + extreme.sum()) / (1 + n_valid)),
        "n_valid": n_valid,
        "n_resamples": n_resamples,
    }


def unpaired_bootstrap_auc_difference(
    a: tuple[np.ndarray, np.ndarray, np.ndarray],
    b: tuple[np.ndarray, np.ndarray, np.ndarray],
    n_resamples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> dict:
    """Per-class AUC on two independent sets of patients and AUC(B) - AUC(A), with intervals.

    For one model scored on different patients (internal vs external test data): each set is
    resampled by patient on its own (A with `seed`, so its intervals equal `bootstrap_auc_ci`'s,
    B with `seed + 1`), and the difference's interval is the percentile interval of the
    replicates' differences. The macro values average the classes defined in both sets.

    Args:
        a, b: (y_true, y_prob, groups) of each set, as in `bootstrap_auc_ci`, with the same C.
        n_resamples, seed, level: as in `bootstrap_auc_ci`.

    Returns:
        dict of (C,) arrays `auc_a`, `ci_low_a`, `ci_high_a`, `auc_b`, `ci_low_b`, `ci_high_b`,
        `difference`, `ci_low`, `ci_high`, `n_valid` (resamples in which both sides were
        defined; `macro_n_valid[_a|_b]`: every class of the macro), the bool array `in_macro`, and
        floats `macro_a`, `macro_b`,
        `macro_difference`, with intervals `macro_ci_low[_a|_b]`, `macro_ci_high[_a|_b]`
        (the difference's without suffix); NaN where undefined.
    """
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if np.shape(a[1])[1:] != np.shape(b[1])[1:]:
        raise ValueError(f"the two sets have different classes: {np.shape(a[1])}, {np.shape(b[1])}")
    point_a, reps_a = bootstrap_auc_replicates(*a, n_resamples=n_resamples, seed=seed)
    point_b, reps_b = bootstrap_auc_replicates(*b, n_resamples=n_resamples, seed=seed + 1)
    out: dict = {"auc_a": point_a, "auc_b": point_b, "difference": point_b - point_a}
    for side, reps in (("a", reps_a), ("b", reps_b)):
        intervals = [_percentile_interval(reps[:, c], level) for c in range(point_a.size)]
        out[f"ci_low_{side}"] = np.array([i[0] for i in intervals])
        out[f"ci_high_{side}"] = np.array([i[1] for i in intervals])
    differences = reps_b - reps_a
    intervals = [_percentile_interval(differences[:, c], level) for c in range(point_a.size)]
    out["ci_low"] = np.array([i[0] for i in intervals])
    out["ci_high"] = np.array([i[1] for i in intervals])
    out["n_valid"] = np.array([i[2] for i in intervals])
    both = ~np.isnan(point_a) & ~np.isnan(point_b)
    out["in_macro"] = both
    for suffix, point, reps in (
        ("_a", point_a, reps_a),
        ("_b", point_b, reps_b),
        ("", None, differences),
    ):
        macro_reps = reps[:, both].mean(axis=1) if both.any() else np.full(n_resamples, np.nan)
        low, high, valid = _percentile_interval(macro_reps, level)
        out[f"macro_ci_low{suffix}"], out[f"macro_ci_high{suffix}"] = low, high
        out[f"macro_n_valid{suffix}"] = valid
        if point is not None:
            out[f"macro{suffix}"] = macro_auc(point[both])
    out["macro_difference"] = out["macro_b"] - out["macro_a"]
    return out


def roc_curve_points(
    y_true: np.ndarray, y_prob: np.ndarray
) -> list[tuple[np.ndarray, np.ndarray] | None]:
    """ROC curve (fpr, tpr) of each class, for plotting; None for a class without both sides."""
    y, p = _check_scores(y_true, y_prob)
    curves: list[tuple[np.ndarray, np.ndarray] | None] = []
    for c in range(y.shape[1]):
        known = ~np.isnan(y[:, c])
        positive = y[known, c] == 1
        if positive.all() or not positive.any():
            curves.append(None)
            continue
        fpr, tpr, _ = roc_curve(positive, p[known, c])
        curves.append((fpr, tpr))
    return curves


def json_number(value: float | None) -> float | None:
    """A float for JSON: None instead of NaN (JSON has no NaN)."""
    return None if value is None or np.isnan(value) else float(value)


def auc_summary(
    y_true: np.ndarray,
    y_prob: np.ndarray,
    groups: np.ndarray,
    labels: Sequence[str] = LABELS,
    n_resamples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> dict:
    """JSON-ready AUC table: per class and macro AUC with patient-bootstrap CIs; null for undefined.

    Args:
        y_true, y_prob, groups, n_resamples, seed, level: as in `bootstrap_auc_ci`.
        labels: one name per column of `y_true`, in column order (the 14 pathologies by default).

    Returns:
        {"classes": {label: {auc, ci_low, ci_high, n_valid, positives, negatives}},
         "macro": {auc, ci_low, ci_high, n_valid}, "n_images", "n_patients", "n_resamples",
         "level", "seed"}; `n_valid` counts the resamples in which the class (for the macro:
        every class defined on the full data) had positives and negatives: the CI's basis.
    """
    y = np.asarray(y_true)
    if y.ndim != 2 or y.shape[1] != len(labels):
        raise ValueError(f"y_true has shape {y.shape}, expected (N, {len(labels)}) for the labels")
    ci = bootstrap_auc_ci(y, y_prob, groups, n_resamples=n_resamples, seed=seed, level=level)
    positives = (y == 1).sum(axis=0)
    negatives = (y == 0).sum(axis=0)
    classes = {
        label: {
            "auc": json_number(ci["auc"][c]),
            "ci_low": json_number(ci["ci_low"][c]),
            "ci_high": json_number(ci["ci_high"][c]),
            "n_valid": int(ci["n_valid"][c]),
            "positives": int(positives[c]),
            "negatives": int(negatives[c]),
        }
        for c, label in enumerate(labels)
    }
    return {
        "classes": classes,
        "macro": {
            "auc": json_number(ci["macro_auc"]),
            "ci_low": json_number(ci["macro_ci_low"]),
            "ci_high": json_number(ci["macro_ci_high"]),
            "n_valid": int(ci["macro_n_valid"]),
        },
        "n_images": ci["n_images"],
        "n_patients": ci["n_patients"],
        "n_resamples": n_resamples,
        "level": level,
        "seed": seed,
    }
